#include "common/migration_policy.h"

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
    case SetReason::Rewritten: return "re-written faster than the link drains";
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

void update_send_set(const PolicyParams& p, std::vector<SegmentDecision>& set,
                     std::span<const double> writes_since_start, std::span<const uint64_t> redirtied,
                     std::vector<unsigned>& resends, const RoundStats& round) {
  resends.resize(set.size(), 0);
  // auto: re-writes that outrun half of what the link drained this round
  // will not converge by resending; defer the segments that cause them.
  const bool outrun = round.bytes_redirtied * 2 >= round.bytes_sent && round.bytes_redirtied > 0;
  for (size_t s = 0; s < set.size(); ++s) {
    if (!set[s].push) continue;
    if (p.mode == MigrationMode::Hybrid && writes_since_start[s] >= p.threshold) {
      set[s] = {false, SetReason::WrittenTooOften};
    } else if (p.mode == MigrationMode::Auto && redirtied[s] > 0) {
      if (outrun || ++resends[s] > p.max_resends) set[s] = {false, SetReason::Rewritten};
    }
  }
}

std::vector<double> fetch_priority(const PolicyParams& p, std::span<const HeatCounts> heat,
                                   std::span<const double> writes_since_start) {
  std::vector<double> prio(heat.size(), 0.0);
  for (size_t s = 0; s < heat.size(); ++s) {
    switch (p.mode) {
      case MigrationMode::Livefs: prio[s] = heat_score(heat[s], p.weights); break;
      case MigrationMode::Hybrid:
      case MigrationMode::Auto: prio[s] = writes_since_start[s]; break;
      default: break;  // offset order
    }
  }
  return prio;
}

}  // namespace livemig
