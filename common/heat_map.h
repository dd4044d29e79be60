// Per-segment heat: how often and how much each segment is read and written.
//
// The hot path (record_read / record_write, called on every NBD request) only
// does relaxed atomic increments on cumulative counters, one cache line per
// segment, so requests never share a lock. A background tick (decay_tick, from
// the plugin's timer thread) folds what arrived since the last tick into
// exponentially decayed counters, guarded by a mutex that only the tick and
// readers of the decayed view take. Migration policies rank segments either by
// the decayed history or by the difference of two cumulative snapshots (a
// monitoring period, as in LiveFS).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "common/mutex.h"
#include "common/segment_geometry.h"
#include "common/status.h"

namespace livemig {

// Heat of one segment: operation counts and byte counts.
struct HeatCounts {
  double reads = 0;
  double writes = 0;
  double read_bytes = 0;
  double write_bytes = 0;
};

// LiveFS eq. (1) weights: f = (w1*reads + w2*writes) / 2, w1 + w2 = 1.
struct HeatWeights {
  double read = 0.5;
  double write = 0.5;
  // Checks 0 <= w <= 1 and read + write == 1.
  static Result<HeatWeights> make(double read, double write);
};

// LiveFS eq. (1).
inline double heat_score(const HeatCounts& c, HeatWeights w) {
  return (w.read * c.reads + w.write * c.writes) / 2;
}

struct RankedSegment {
  uint64_t segment = 0;
  double score = 0;
};

// Segments sorted by decreasing score; equal scores keep index order, so the
// ranking is deterministic.
std::vector<RankedSegment> rank_segments(std::span<const HeatCounts> heat, HeatWeights w);

class HeatMap {
 public:
  // half_life_seconds: the decayed counters lose half their weight in this
  // time. REQUIRES: half_life_seconds > 0.
  HeatMap(const SegmentGeometry& geometry, double half_life_seconds);

  const SegmentGeometry& geometry() const { return geometry_; }
  uint64_t segment_count() const { return geometry_.segment_count(); }
  double half_life() const { return half_life_; }

  // Hot path. Counts one operation in every segment the range touches and the
  // bytes that fall in each. REQUIRES: offset + length <= image size.
  void record_read(uint64_t offset, uint64_t length) { record(offset, length, 0); }
  void record_write(uint64_t offset, uint64_t length) { record(offset, length, 1); }

  // Cumulative counters since start (never decayed).
  HeatCounts cumulative(uint64_t segment) const;
  std::vector<HeatCounts> cumulative_snapshot() const;

  // Folds the counts since the previous tick into the decayed counters:
  // decayed = decayed * 2^(-(now - last)/half_life) + delta.
  // now_seconds is any monotonic clock; the first call only sets the origin
  // and takes in everything counted so far.
  void decay_tick(double now_seconds);
  std::vector<HeatCounts> decayed_snapshot() const;

 private:
  struct alignas(64) Counters {
    std::atomic<uint64_t> ops[2];
    std::atomic<uint64_t> bytes[2];
  };
  void record(uint64_t offset, uint64_t length, int kind);

  SegmentGeometry geometry_;
  double half_life_;
  std::unique_ptr<Counters[]> counters_;

  mutable Mutex decay_mutex_;
  std::vector<HeatCounts> decayed_ GUARDED_BY(decay_mutex_);
  std::vector<HeatCounts> last_seen_ GUARDED_BY(decay_mutex_);
  double last_tick_ GUARDED_BY(decay_mutex_) = 0;
  bool ticked_ GUARDED_BY(decay_mutex_) = false;
};

}  // namespace livemig
