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
//   hybrid    (active push / prioritized prefetch) push every segment, but
//             stop pushing one once it was written >= threshold times during
//             the migration; after handover fetch by decreasing write count.
//   auto      push everything once; after that, defer a segment that keeps
//             being re-written when re-writes outrun what the link drains
//             (or after max_resends), so that nothing is sent twice for
//             nothing; fetch by decreasing write count.
#pragma once

#include <cstdint>
#include <limits>
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
  Rewritten,      // auto: re-written faster than the link drains / too often
};
const char* reason_name(SetReason r);

struct SegmentDecision {
  bool push = true;  // in the send set: pushed (and resent) before handover
  SetReason reason = SetReason::All;
};

// The send set at migration start. `heat` is the ranking window (monitoring
// delta or decayed history), one entry per segment.
std::vector<SegmentDecision> initial_send_set(const PolicyParams& p, std::span<const HeatCounts> heat);

// What the engine measured in one pre-copy round.
struct RoundStats {
  double seconds = 0;
  uint64_t bytes_sent = 0;       // payload pushed this round
  uint64_t bytes_redirtied = 0;  // bytes of already-sent blocks written again this round
};

// Updates the send set after a round. writes_since_start: per-segment write
// counts since the migration started; redirtied: per-segment blocks that
// were re-dirtied during the round (owed again after being sent);
// resends: per-segment count of rounds in which it was resent (updated here).
void update_send_set(const PolicyParams& p, std::vector<SegmentDecision>& set,
                     std::span<const double> writes_since_start, std::span<const uint64_t> redirtied,
                     std::vector<unsigned>& resends, const RoundStats& round);

// Priority of each segment for fetching after handover (higher first; equal
// priorities go in offset order).
std::vector<double> fetch_priority(const PolicyParams& p, std::span<const HeatCounts> heat,
                                   std::span<const double> writes_since_start);

}  // namespace livemig
