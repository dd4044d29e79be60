#include "common/migration_policy.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include <fmt/format.h>

namespace livemig {

const char* mode_name(MigrationMode m) {
  switch (m) {
    case MigrationMode::Precopy: return "precopy";
    case MigrationMode::Postcopy: return "postcopy";
    case MigrationMode::Livefs: return "livefs";
    case MigrationMode::Hybrid: return "hybrid";
    case MigrationMode::Auto: return "auto";
  }
  return "?";
}

Result<MigrationMode> parse_mode(const std::string& s) {
  for (MigrationMode m : {MigrationMode::Precopy, MigrationMode::Postcopy, MigrationMode::Livefs,
                          MigrationMode::Hybrid, MigrationMode::Auto})
    if (s == mode_name(m)) return m;
  return Status::error(fmt::format("unknown mode \"{}\" (precopy, postcopy, livefs, hybrid or auto)", s));
}

const char* reason_name(SetReason r) {
  switch (r) {
    case SetReason::All: return "mode pushes every segment";
    case SetReason::None: return "mode pushes nothing before handover";
    case SetReason::ScoreAbove: return "score >= threshold";
    case SetReason::ScoreBelow: return "score < threshold";
    case SetReason::WrittenTooOften: return "written >= threshold times during migration";
    case SetReason::Rewritten: return "would be re-written before handover";
    case SetReason::GuestOutwrites: return "the guest writes faster than the link drains";
  }
  return "?";
}

std::vector<SegmentDecision> initial_send_set(const PolicyParams& p, std::span<const HeatCounts> heat) {
  std::vector<SegmentDecision> set(heat.size());
  for (size_t s = 0; s < heat.size(); ++s) {
    switch (p.mode) {
      case MigrationMode::Postcopy: set[s] = {false, SetReason::None}; break;
      case MigrationMode::Livefs: {
        bool push = heat_score(heat[s], p.weights) >= p.threshold;
        set[s] = {push, push ? SetReason::ScoreAbove : SetReason::ScoreBelow};
        break;
      }
      default: set[s] = {true, SetReason::All}; break;
    }
  }
  return set;
}

namespace {

// auto: the share of a segment expected to be re-written within `seconds`.
double expected_rewrite_share(const SegmentLoad& load, uint64_t segment_bytes, double seconds) {
  if (segment_bytes == 0) return 0;
  return load.write_bytes_per_s * seconds / double(segment_bytes);
}

}  // namespace

std::vector<uint64_t> push_order(const PolicyParams& p, std::span<const SegmentLoad> load) {
  std::vector<uint64_t> order(load.size());
  std::iota(order.begin(), order.end(), uint64_t{0});
  if (p.mode == MigrationMode::Hybrid || p.mode == MigrationMode::Auto) {
    auto key = [&](uint64_t s) { return std::pair(load[s].writes_since_start, load[s].write_bytes_per_s); };
    std::stable_sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) { return key(a) < key(b); });
  }
  return order;
}

std::optional<SetReason> defer_before_push(const PolicyParams& p, const SegmentLoad& load,
                                           uint64_t segment_bytes, double seconds_to_handover) {
  if (p.mode == MigrationMode::Hybrid && load.writes_since_start >= p.threshold) return SetReason::WrittenTooOften;
  if (p.mode == MigrationMode::Auto &&
      expected_rewrite_share(load, segment_bytes, seconds_to_handover) >= kAutoRewriteShare)
    return SetReason::Rewritten;
  return std::nullopt;
}

bool guest_outwrites_pushes(const PolicyParams& p, double guest_write_bytes_per_s, double push_bytes_per_s) {
  return p.mode == MigrationMode::Auto && push_bytes_per_s > 0 && guest_write_bytes_per_s >= push_bytes_per_s;
}

void update_send_set(const PolicyParams& p, std::vector<SegmentDecision>& set, std::span<const SegmentLoad> load,
                     std::span<const uint64_t> redirtied, std::vector<unsigned>& resends, uint64_t segment_bytes,
                     double seconds_to_handover) {
  resends.resize(set.size(), 0);
  for (size_t s = 0; s < set.size(); ++s) {
    if (!set[s].push) continue;
    if (p.mode == MigrationMode::Hybrid && load[s].writes_since_start >= p.threshold) {
      set[s] = {false, SetReason::WrittenTooOften};
    } else if (p.mode == MigrationMode::Auto && redirtied[s] > 0) {
      // Resend only what will likely stay clean until handover; a segment
      // that keeps being re-written is cheaper to move once, afterwards.
      if (expected_rewrite_share(load[s], segment_bytes, seconds_to_handover) >= kAutoRewriteShare ||
          ++resends[s] > p.max_resends)
        set[s] = {false, SetReason::Rewritten};
    }
  }
}

std::vector<double> fetch_priority(const PolicyParams& p, std::span<const HeatCounts> heat,
                                   std::span<const double> writes_since_start) {
  std::vector<double> prio(heat.size(), 0.0);
  for (size_t s = 0; s < heat.size(); ++s) {
    switch (p.mode) {
      case MigrationMode::Livefs: prio[s] = heat_score(heat[s], p.weights); break;
      case MigrationMode::Hybrid: prio[s] = writes_since_start[s]; break;
      // The least written first: a segment the guest keeps re-writing may
      // be overwritten whole at the destination and need no fetch at all.
      case MigrationMode::Auto: prio[s] = -writes_since_start[s]; break;
      default: break;  // offset order
    }
  }
  return prio;
}

}  // namespace livemig
