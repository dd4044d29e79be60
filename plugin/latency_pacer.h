// Guest first (Yang 2016): paces a migration's background transfer so that
// the guest's request latency stays within `bound` times what it was before
// the migration started.
//
// Design notes
// ------------
// AIMD on the transfer's rate, one decision per window (kWindow):
//  - the window's p99 above bound x the baseline's p99: the rate halves
//    (from what the transfer actually moved, when it was not capped yet),
//    never below `min_rate`, so the migration always makes progress and
//    still ends, nor below the fastest unpaced rate / `max_slowdown` (a
//    time budget: auto's default 1.3 keeps the transfer within 1.3x of its
//    unpaced time, whatever the guest);
//  - otherwise it grows by a sixteenth of the fastest unpaced rate seen (at
//    least min_rate); once above twice that, the cap is lifted.
// The fastest unpaced rate is what the time budget is measured against, but
// the first windows can make it look slow (TLS and TCP starting, a sparse
// disk's holes crossing as notes of a few bytes) and a capped transfer never
// shows it again: a budget of 1.3x then held a 1 TiB migration at a third
// of the link. So while the budget is on and its cap binds (the window moved
// 90% of it or more), one window in kRemeasureEvery runs unpaced, and the
// fastest rate is measured again.
// A window with fewer than kMinRequests guest requests says nothing about
// the guest (it is idle: nothing to protect), and neither does a baseline of
// fewer than kMinBaselineRequests: the pacer then leaves the rate alone.
// `max_rate`, when set, stays the ceiling, above min_rate too; the operator
// (livemigd sharing a host's bandwidth) may change it while the transfer
// runs (set_max_rate).
// The destination's guest runs on another disk than the source's, often
// slower while blocks are being allocated: judged against the source's
// baseline alone it would hold post-copy at min_rate for nothing. So it
// probes (probe_every): one window in 16 the transfer is held to min_rate
// and the guest's p99 then becomes the local baseline (the bound applies to
// the higher of the two). Not when the caller said (set_remaining) that the
// rest of the transfer would be moved within 16 windows anyway.
// Pure logic: the caller measures (GuestLatency) and applies the rate
// (RateLimiter); unit tests drive it with made-up windows.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "plugin/guest_latency.h"
#include "plugin/rate_limiter.h"

namespace livemig {

struct PacerConfig {
  double bound = 0;               // 0: no pacing
  uint64_t min_rate = 0;          // bytes/s the transfer keeps at least
  uint64_t max_rate = 0;          // bytes/s at most, 0 = no cap
  uint64_t baseline_p99_ns = 0;   // the guest's p99 before the migration
  uint64_t baseline_requests = 0; // how many requests that p99 is of
  // Every this many windows (and after the first), hold the transfer to
  // min_rate for one window and take the guest's p99 then as this side's
  // own baseline, when higher (0: never).
  unsigned probe_every = 0;
  // The rate never goes below the fastest unpaced rate seen / this (0:
  // no such floor, min_rate only): a time budget for guest-first.
  double max_slowdown = 0;
};

class LatencyPacer {
 public:
  static constexpr auto kWindow = std::chrono::milliseconds(250);
  static constexpr uint64_t kMinRequests = 20;
  static constexpr uint64_t kMinBaselineRequests = 200;
  static constexpr uint64_t kRemeasureEvery = 8;

  explicit LatencyPacer(PacerConfig config);

  // True when the guest's latency steers the rate (bound set, baseline
  // meaningful).
  bool active() const { return active_; }
  // One window's observation: the guest's requests in it and their p99,
  // and the bytes the transfer moved in `seconds`. Returns the rate to
  // apply, bytes/s (0 = no cap).
  uint64_t on_window(uint64_t requests, uint64_t p99_ns, uint64_t bytes, double seconds);
  uint64_t rate() const { return rate_.load(std::memory_order_relaxed); }
  bool probing() const { return probing_; }
  // A new ceiling (0 = none), on the thread that calls on_window(). A rate
  // the guest's latency lowered stays lower; one at the old ceiling moves
  // to the new.
  void set_max_rate(uint64_t max_rate);
  uint64_t max_rate() const { return max_rate_.load(std::memory_order_relaxed); }
  // What the transfer still has to move, in bytes (0: not known; any
  // thread). A probe is skipped while that would be moved within
  // probe_every windows at the last window's rate: its window at min_rate
  // would cost more time than the rest of the transfer could gain from a
  // looser bound (a 1 s post-copy took 0.2 s longer for its probe).
  void set_remaining(uint64_t bytes) { remaining_.store(bytes, std::memory_order_relaxed); }

  // For status (any thread).
  nlohmann::json to_json() const;

 private:
  const PacerConfig config_;
  const bool active_;
  std::atomic<uint64_t> rate_;         // 0 = no cap
  std::atomic<uint64_t> max_rate_;     // the ceiling, 0 = none (config's, then set_max_rate's)
  uint64_t fastest_unpaced_ = 0;       // bytes/s
  uint64_t next_rate(uint64_t p99_ns, uint64_t moved);
  uint64_t floor() const;  // min_rate, or the max_slowdown budget's rate if higher
  bool worth_probing(uint64_t moved);  // counts a skipped probe

  bool probing_ = false;
  uint64_t rate_before_probe_ = 0;
  std::atomic<uint64_t> local_baseline_ns_{0};
  std::atomic<uint64_t> probes_{0};
  std::atomic<uint64_t> probes_skipped_{0};
  std::atomic<uint64_t> remaining_{0};
  std::atomic<uint64_t> last_p99_ns_{0};
  std::atomic<uint64_t> windows_over_{0}, windows_{0};
  std::atomic<uint64_t> remeasures_{0};
};

// The rate of one background transfer (the source's pushes, the
// destination's background pulls): max_rate, lowered while the guest
// suffers. One thread calls take(); set_max_rate(), max_rate() and
// to_json() from any (a new ceiling applies at the next take()).
class TransferPacer {
 public:
  // `guest` may be null (no measure: max_rate only).
  TransferPacer(const GuestLatency* guest, PacerConfig config);
  // The transfer moved `bytes` more: decides the rate again once a window,
  // then sleeps as long as the rate requires. pace false: the transfer's
  // tail (what is left fits in a handover's pause), paced by max_rate
  // alone from now on: yielding there would only keep the migration's most
  // fragile phase open longer.
  void take(uint64_t bytes, bool pace = true);
  void set_max_rate(uint64_t bytes_per_second) { wanted_max_rate_.store(bytes_per_second, std::memory_order_relaxed); }
  uint64_t max_rate() const { return wanted_max_rate_.load(std::memory_order_relaxed); }
  bool in_tail() const { return tail_.load(std::memory_order_relaxed); }
  void set_remaining(uint64_t bytes) { pacer_.set_remaining(bytes); }
  nlohmann::json to_json() const;

 private:
  // A ceiling set_max_rate() asked for, applied (take()'s thread).
  void apply_max_rate();

  const GuestLatency* const guest_;
  LatencyPacer pacer_;
  RateLimiter limiter_;
  CumulativeHistogram::Counts window_start_counts_{};
  std::chrono::steady_clock::time_point window_start_{};
  uint64_t window_bytes_ = 0;
  std::atomic<uint64_t> wanted_max_rate_;  // set_max_rate()'s, applied by take()
  uint64_t applied_max_rate_;              // take()'s thread only
  std::atomic<bool> tail_{false};          // take(..., false) was called: max_rate alone
};

}  // namespace livemig
