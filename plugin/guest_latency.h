// The guest's request latency as this plugin sees it: the time each read,
// write, trim or zero spends in the plugin (the disk, the engine's locks, a
// forwarded round trip). A migration compares it with the same measure
// before it started and slows down when the guest suffers (LatencyPacer,
// Yang 2016: the migration must not raise the guest's I/O latency).
//
// Design notes
// ------------
// record() is on every request's path: one relaxed atomic increment in a
// histogram of cumulative counts, 8 buckets per power of two (9%
// resolution, enough for a 1.2x bound). Nothing is ever reset: a window is
// the difference of two snapshots, so readers never race writers for a
// zeroing, and lost updates cannot happen.
// The baseline: every 5 s the first request that sees the time has come
// saves a snapshot in a ring of 3 (under a try-lock: a request never
// waits); baseline() is now minus the oldest, the last 10-15 s of requests.
// A request that waited for the peer (a demand pull at a destination in
// post-copy) says so with skip_current_request(): its latency is what a
// miss costs, which pacing the background work cannot lower, and counting it
// would make the pacer starve the post-copy that ends the misses.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

#include "common/mutex.h"

namespace livemig {

// Latencies in cumulative counts that only grow (engine_stats.h has the
// locked, resettable kind for status summaries).
class CumulativeHistogram {
 public:
  static constexpr int kSubBuckets = 8;
  static constexpr int kBuckets = 38 * kSubBuckets;  // up to 2^40 ns (18 min)
  using Counts = std::array<uint64_t, kBuckets>;

  static int bucket_of(uint64_t ns);
  static uint64_t bucket_middle(int bucket);  // a representative value, ns

  void add(uint64_t ns) { counts_[bucket_of(ns)].fetch_add(1, std::memory_order_relaxed); }
  Counts snapshot() const;

  // Of the requests counted in `later` but not in `earlier`:
  static uint64_t count(const Counts& later, const Counts& earlier);
  // ...the latency that a fraction q (0 < q <= 1) of them did not exceed
  // (0 when there were none).
  static uint64_t percentile(const Counts& later, const Counts& earlier, double q);

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
};

class GuestLatency {
 public:
  // A request begins on this thread (clears a skip left by another).
  static void begin_request();
  using Clock = std::chrono::steady_clock;
  static constexpr auto kBaselineStep = std::chrono::seconds(5);

  // Called when a guest request ends; `started` is when it began.
  void record(Clock::time_point started, Clock::time_point now = Clock::now());
  // The request this thread serves now waited for the peer: record()
  // leaves it out (see the design notes), and clears the mark.
  static void skip_current_request();

  CumulativeHistogram::Counts snapshot() const { return histogram_.snapshot(); }
  // The requests of the last 10-15 s (since the plugin started, if sooner):
  // `now` and the snapshot it is measured from.
  struct Window {
    CumulativeHistogram::Counts now, since;
  };
  Window baseline() const;

 private:
  void maybe_rotate(Clock::time_point now);

  CumulativeHistogram histogram_;
  std::atomic<int64_t> next_rotation_ns_{0};
  mutable Mutex ring_mu_;
  std::array<CumulativeHistogram::Counts, 3> ring_ GUARDED_BY(ring_mu_){};
  int next_slot_ GUARDED_BY(ring_mu_) = 0;
};

// Times one guest request, from construction to destruction.
class RequestTimer {
 public:
  explicit RequestTimer(GuestLatency& latency) : latency_(latency) { GuestLatency::begin_request(); }
  ~RequestTimer() { latency_.record(started_); }
  RequestTimer(const RequestTimer&) = delete;
  RequestTimer& operator=(const RequestTimer&) = delete;

 private:
  GuestLatency& latency_;
  const GuestLatency::Clock::time_point started_ = GuestLatency::Clock::now();
};

}  // namespace livemig
