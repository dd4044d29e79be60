#include "plugin/engine_stats.h"

#include <algorithm>
#include <cmath>

namespace livemig {

size_t LatencyHistogram::bucket_of(double ms) {
  double us = std::max(ms * 1000.0, 1.0);
  auto b = static_cast<size_t>(std::floor(std::log2(us) * 4));
  return std::min(b, kBuckets - 1);
}

double LatencyHistogram::upper_edge(size_t bucket) { return std::exp2((bucket + 1) / 4.0) / 1000.0; }

void LatencyHistogram::add(double ms) {
  MutexLock lock(mu_);
  buckets_[bucket_of(ms)]++;
  count_++;
  sum_ += ms;
  max_ = std::max(max_, ms);
}

uint64_t LatencyHistogram::count() const {
  MutexLock lock(mu_);
  return count_;
}

nlohmann::json LatencyHistogram::summary() const {
  MutexLock lock(mu_);
  if (count_ == 0) return nullptr;
  auto percentile = [&](double q) REQUIRES(mu_) {
    uint64_t rank = static_cast<uint64_t>(std::ceil(q * count_)), seen = 0;
    for (size_t b = 0; b < kBuckets; ++b)
      if ((seen += buckets_[b]) >= rank) return std::min(upper_edge(b), max_);
    return max_;
  };
  return {{"count", count_}, {"mean", sum_ / count_}, {"p50", percentile(0.5)}, {"p99", percentile(0.99)},
          {"max", max_}};
}

void LatencyHistogram::reset() {
  MutexLock lock(mu_);
  buckets_.fill(0);
  count_ = 0;
  sum_ = max_ = 0;
}

int64_t EngineStats::ms_since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

void EngineStats::reset() {
  started_at = Clock::now();
  total_time_ms = handover_pause_ms = -1;
  for (auto* c : {&rounds, &data_blocks_sent, &data_blocks_pushed, &zero_blocks_sent, &payload_bytes_sent,
                  &blocks_dirtied, &blocks_resynced, &demand_pulls, &background_pulls, &pull_errors,
                  &blocks_received, &reconnects, &compressed_frames, &compressed_plain_bytes, &compressed_wire_bytes,
                  &base_blocks_sent, &base_blocks_received, &base_mismatches,
                  &forwarded_requests, &forwarded_bytes, &requests_applied_for_peer})
    c->store(0);
  read_delay.reset();
  forward_delay.reset();
}

EngineStats::Rates EngineStats::sample_rates(uint64_t wire_bytes, uint64_t blocks_left) {
  MutexLock lock(rate_mu_);
  double now = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
  if (now - last_time_ >= 0.5) {
    double dt = now - last_time_;
    if (last_time_ > 0) {
      rates_.link_bytes_per_s = (wire_bytes - std::min(wire_bytes, last_bytes_)) / dt;
      uint64_t dirty = blocks_dirtied.load();
      rates_.dirty_blocks_per_s = (dirty - std::min(dirty, last_dirty_)) / dt;
      // Blocks done per second: holes count, though they cost no bandwidth.
      double done_rate = (double(last_left_) - double(blocks_left)) / dt;
      block_rate_ = done_rate > 0 ? done_rate : block_rate_ * 0.5;
    }
    last_time_ = now;
    last_bytes_ = wire_bytes;
    last_dirty_ = blocks_dirtied.load();
    last_left_ = blocks_left;
  }
  rates_.eta_seconds = blocks_left == 0 ? 0 : block_rate_ > 0.5 ? blocks_left / block_rate_ : -1;
  return rates_;
}

}  // namespace livemig
