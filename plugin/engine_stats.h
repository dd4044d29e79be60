// What one migration measured, for status and the benchmarks (DESIGN.md
// "Measures"): counters bumped from any thread with relaxed atomics, wire
// bytes of links that came and went, rates sampled when status asks, and the
// post-handover read delay as a bounded histogram (memory does not grow
// with the number of delayed reads).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

#include <nlohmann/json.hpp>

#include "common/mutex.h"

namespace livemig {

// Latencies in buckets a quarter of a power of two wide (about 19% apart),
// from 1 microsecond to over an hour. Percentiles are a bucket's upper edge.
class LatencyHistogram {
 public:
  void add(double ms);
  uint64_t count() const;
  // {"count", "mean", "p50", "p99", "max"} in ms; null if empty.
  nlohmann::json summary() const;
  void reset();

 private:
  static constexpr size_t kBuckets = 160;
  static size_t bucket_of(double ms);
  static double upper_edge(size_t bucket);
  mutable Mutex mu_;
  std::array<uint64_t, kBuckets> buckets_ GUARDED_BY(mu_){};
  uint64_t count_ GUARDED_BY(mu_) = 0;
  double sum_ GUARDED_BY(mu_) = 0;
  double max_ GUARDED_BY(mu_) = 0;
};

struct EngineStats {
  using Clock = std::chrono::steady_clock;
  static int64_t ms_since(Clock::time_point t);

  // Resets everything for a new migration started now.
  void reset();

  Clock::time_point started_at{};
  std::atomic<int64_t> total_time_ms{-1};
  std::atomic<int64_t> handover_pause_ms{-1};
  std::atomic<uint64_t> rounds{0};
  std::atomic<uint64_t> data_blocks_sent{0};
  std::atomic<uint64_t> data_blocks_pushed{0};  // by the pre-copy pusher, before handover
  std::atomic<uint64_t> zero_blocks_sent{0};
  std::atomic<uint64_t> payload_bytes_sent{0};
  std::atomic<uint64_t> blocks_dirtied{0};  // block-writes at the source during the migration
  std::atomic<uint64_t> blocks_resynced{0};  // owed blocks found equal at the destination by checksum
  std::atomic<uint64_t> demand_pulls{0};
  std::atomic<uint64_t> background_pulls{0};
  std::atomic<uint64_t> pull_errors{0};     // pulls answered with an ERROR (each retried or reported)
  std::atomic<uint64_t> blocks_received{0};
  std::atomic<uint64_t> reconnects{0};
  // DATA frames this side compressed (source) or decompressed (destination):
  // their plain bytes and the bytes that crossed instead.
  std::atomic<uint64_t> compressed_frames{0};
  std::atomic<uint64_t> compressed_plain_bytes{0};
  std::atomic<uint64_t> compressed_wire_bytes{0};
  // Blocks that crossed as BASE notes (source), that the destination read
  // from its base, and notes it refused because a block of its base differed
  // (the source then sends plain).
  std::atomic<uint64_t> base_blocks_sent{0};
  std::atomic<uint64_t> base_blocks_received{0};
  std::atomic<uint64_t> base_mismatches{0};
  LatencyHistogram read_delay;
  // Client requests this side sent to the authoritative side (write_forward.h),
  // and the ones it applied for the other side's clients.
  std::atomic<uint64_t> forwarded_requests{0};
  std::atomic<uint64_t> forwarded_bytes{0};
  std::atomic<uint64_t> requests_applied_for_peer{0};
  LatencyHistogram forward_delay;

  // Rates over the time since the previous sample (at most every 0.5 s).
  struct Rates {
    double link_bytes_per_s = 0;
    double dirty_blocks_per_s = 0;
    double eta_seconds = -1;
  };
  Rates sample_rates(uint64_t wire_bytes, uint64_t blocks_left);

 private:
  Mutex rate_mu_;
  double last_time_ GUARDED_BY(rate_mu_) = 0;
  uint64_t last_bytes_ GUARDED_BY(rate_mu_) = 0;
  uint64_t last_dirty_ GUARDED_BY(rate_mu_) = 0;
  uint64_t last_left_ GUARDED_BY(rate_mu_) = 0;
  double block_rate_ GUARDED_BY(rate_mu_) = 0;
  Rates rates_ GUARDED_BY(rate_mu_);
};

}  // namespace livemig
