#include "common/heat_map.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace livemig {

Result<HeatWeights> HeatWeights::make(double read, double write) {
  if (!(read >= 0 && read <= 1) || !(write >= 0 && write <= 1))
    return Status::error(fmt::format("heat weights must lie in [0, 1] (got read={}, write={})", read, write));
  if (std::fabs(read + write - 1.0) > 1e-9)
    return Status::error(fmt::format("heat weights must add up to 1 (got {} + {} = {})", read, write, read + write));
  return HeatWeights{read, write};
}

std::vector<RankedSegment> rank_segments(std::span<const HeatCounts> heat, HeatWeights w) {
  std::vector<RankedSegment> out;
  out.reserve(heat.size());
  for (uint64_t i = 0; i < heat.size(); ++i) out.push_back({i, heat_score(heat[i], w)});
  std::stable_sort(out.begin(), out.end(),
                   [](const RankedSegment& a, const RankedSegment& b) { return a.score > b.score; });
  return out;
}

HeatMap::HeatMap(const SegmentGeometry& geometry, double half_life_seconds)
    : geometry_(geometry),
      half_life_(half_life_seconds),
      counters_(new Counters[std::max<uint64_t>(1, geometry.segment_count())]),
      decayed_(geometry.segment_count()),
      last_seen_(geometry.segment_count()) {
  for (uint64_t s = 0; s < std::max<uint64_t>(1, geometry.segment_count()); ++s)
    for (int k = 0; k < 2; ++k) {
      counters_[s].ops[k].store(0, std::memory_order_relaxed);
      counters_[s].bytes[k].store(0, std::memory_order_relaxed);
    }
}

void HeatMap::record(uint64_t offset, uint64_t length, int kind) {
  if (length == 0) return;
  IndexRange segs = geometry_.segments_touched(offset, length);
  uint64_t end = offset + length;
  for (uint64_t s = segs.first; s < segs.last; ++s) {
    uint64_t seg_start = geometry_.segment_offset(s);
    uint64_t seg_end = seg_start + geometry_.segment_size();
    uint64_t bytes = std::min(end, seg_end) - std::max(offset, seg_start);
    counters_[s].ops[kind].fetch_add(1, std::memory_order_relaxed);
    counters_[s].bytes[kind].fetch_add(bytes, std::memory_order_relaxed);
  }
}

HeatCounts HeatMap::cumulative(uint64_t s) const {
  const Counters& c = counters_[s];
  return {double(c.ops[0].load(std::memory_order_relaxed)), double(c.ops[1].load(std::memory_order_relaxed)),
          double(c.bytes[0].load(std::memory_order_relaxed)), double(c.bytes[1].load(std::memory_order_relaxed))};
}

std::vector<HeatCounts> HeatMap::cumulative_snapshot() const {
  std::vector<HeatCounts> out(segment_count());
  for (uint64_t s = 0; s < segment_count(); ++s) out[s] = cumulative(s);
  return out;
}

void HeatMap::decay_tick(double now) {
  MutexLock lock(decay_mutex_);
  double factor = ticked_ ? std::exp2(-std::max(0.0, now - last_tick_) / half_life_) : 1.0;
  for (uint64_t s = 0; s < segment_count(); ++s) {
    HeatCounts cum = cumulative(s);
    HeatCounts& d = decayed_[s];
    HeatCounts& seen = last_seen_[s];
    d.reads = d.reads * factor + (cum.reads - seen.reads);
    d.writes = d.writes * factor + (cum.writes - seen.writes);
    d.read_bytes = d.read_bytes * factor + (cum.read_bytes - seen.read_bytes);
    d.write_bytes = d.write_bytes * factor + (cum.write_bytes - seen.write_bytes);
    seen = cum;
  }
  last_tick_ = now;
  ticked_ = true;
}

std::vector<HeatCounts> HeatMap::decayed_snapshot() const {
  MutexLock lock(decay_mutex_);
  return decayed_;
}

}  // namespace livemig
