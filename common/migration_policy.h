// What to move before handover and in what order after: the modes of
// DESIGN.md as pure functions of measured heat, so the engine stays one
// engine and a mode is only a set of parameters.
//
//   precopy   push every segment; resend what is re-written; fetch the rest
//             in offset order.
//   postcopy  push nothing; fetch everything after handover in offset order.
//   livefs    (LiveFS) rank segments by f = (w1*reads + w2*writes)/2 over a
//             monitoring window (or the decayed history); push the segments
//             with f >= threshold; after handover fetch the rest by
//             decreasing f. threshold 0 with no monitoring = precopy,
//             threshold infinity = postcopy.
//   hybrid    (active push / prioritized prefetch) push every segment,
//             coldest first, but skip one once it was written >= threshold
//             times during the migration (checked again just before it is
//             pushed); after handover fetch by decreasing write count.
//   auto      push every segment once, coldest first; just before pushing
//             one, and again before resending it, estimate how much of it
//             the guest will re-write before handover (its measured write
//             rate times the time the link needs for what is left) and defer
//             it past handover when that is a sizeable share: a deferred
//             segment crosses the link once, a pushed-then-rewritten one
//             twice. Fetch the least written first (demand reads go first
//             anyway): what the guest re-writes whole at the destination
//             then needs no fetch.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/heat_map.h"
#include "common/status.h"

namespace livemig {

enum class MigrationMode { Precopy, Postcopy, Livefs, Hybrid, Auto };

const char* mode_name(MigrationMode m);
Result<MigrationMode> parse_mode(const std::string& s);

struct PolicyParams {
  MigrationMode mode = MigrationMode::Precopy;
  // livefs: score threshold; hybrid: write count. Infinity = never push.
  double threshold = 0;
  HeatWeights weights;
  // livefs: seconds to monitor before choosing; < 0 = rank from the decayed
  // history and start at once.
  double monitor_period = 0;
  // auto: how often a segment is resent at most before it is deferred.
  unsigned max_resends = 2;
};

// Why a segment is where it is (shown to operators by status/stats).
enum class SetReason {
  All,            // precopy/hybrid/auto: everything is pushed
  None,           // postcopy: nothing is pushed
  ScoreAbove,     // livefs: score >= threshold
  ScoreBelow,     // livefs: score < threshold
  WrittenTooOften,  // hybrid: written >= threshold times during migration
  Rewritten,      // auto: would be re-written before handover / resent too often
  GuestOutwrites,  // auto: the guest writes faster than the pushes drain
};
const char* reason_name(SetReason r);

struct SegmentDecision {
  bool push = true;  // in the send set: pushed (and resent) before handover
  SetReason reason = SetReason::All;
};

// What the engine measured about one segment when the policy decides on it.
struct SegmentLoad {
  double writes_since_start = 0;  // write requests during this migration
  double write_bytes_per_s = 0;   // measured now, or from the decayed history
};

// auto: defer a segment when the share of it expected to be re-written
// before handover reaches this (re-writes cost it a second crossing; this
// bounds what pushing a segment may waste to 5% of it).
constexpr double kAutoRewriteShare = 0.05;

// The send set at migration start. `heat` is the ranking window (monitoring
// delta or decayed history), one entry per segment.
std::vector<SegmentDecision> initial_send_set(const PolicyParams& p, std::span<const HeatCounts> heat);

// The order in which a pre-copy pass visits the segments: offset order for
// precopy and livefs; for hybrid and auto the least written first, so that
// hot segments come last and have the most time to show they are hot.
std::vector<uint64_t> push_order(const PolicyParams& p, std::span<const SegmentLoad> load);

// Checked just before a segment of the send set is pushed: the reason to
// defer it instead, if any. seconds_to_handover: how long the link needs for
// what is left to push (the time the segment would have to stay clean).
std::optional<SetReason> defer_before_push(const PolicyParams& p, const SegmentLoad& load,
                                           uint64_t segment_bytes, double seconds_to_handover);

// auto: true when the guest writes (anywhere in the image) at least as fast
// as the pushes drain. The source is then busy with the guest, what it pushes
// competes with it and is likely written again, while what the guest writes
// at the destination after handover crosses no link: the rest waits for
// handover. Both rates in bytes per second, measured over the same time.
bool guest_outwrites_pushes(const PolicyParams& p, double guest_write_bytes_per_s, double push_bytes_per_s);

// Updates the send set after a round. load: per segment, as measured now;
// redirtied: per-segment blocks that were re-dirtied during the round (owed
// again after being sent); resends: per-segment count of rounds in which it
// was resent (updated here); seconds_to_handover: what the link needs for the
// send set's owed blocks at the throughput of the round.
void update_send_set(const PolicyParams& p, std::vector<SegmentDecision>& set, std::span<const SegmentLoad> load,
                     std::span<const uint64_t> redirtied, std::vector<unsigned>& resends, uint64_t segment_bytes,
                     double seconds_to_handover);

// Priority of each segment for fetching after handover (higher first; equal
// priorities go in offset order).
std::vector<double> fetch_priority(const PolicyParams& p, std::span<const HeatCounts> heat,
                                   std::span<const double> writes_since_start);

}  // namespace livemig
