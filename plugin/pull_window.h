// How many bytes of background pulls a destination keeps in flight: enough
// to fill the link (its bandwidth-delay product), never fewer than a floor.
// A fixed 2 MiB moved 20 MiB/s at 100 ms round trip whatever the link
// (issue #15). Measured like BBR does: the round trip is the smallest pull
// latency seen, the rate the largest delivery rate seen lately; the window
// is kGain times their product. The gain lets the window grow by half each
// round trip while the link has room; once it is full, it leaves at most
// half a round trip of background data queued, which is what a demand read
// may wait behind. A pull's latency includes its own time on the link (8 ms
// for 1 MiB at 1 Gbit/s), so on a LAN the window settles at about 1.5
// units: the floor is one unit.
// Not thread-safe: the destination's pull_mu_ guards it.
#pragma once

#include <chrono>
#include <cstdint>

namespace livemig {

class PullWindow {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr double kGain = 1.5;

  PullWindow(uint64_t min_bytes, uint64_t max_bytes) : min_(min_bytes), max_(max_bytes) {}

  // A background pull of `bytes`, asked at `asked`, fully answered at `now`.
  void on_answer(uint64_t bytes, Clock::time_point asked, Clock::time_point now);
  // The bytes to keep in flight now.
  uint64_t bytes() const;
  // The estimates (0 until measured).
  double rtt_seconds() const { return rtt_ > 0 ? rtt_ : 0; }
  double rate() const { return best_rate_; }

 private:
  const uint64_t min_, max_;
  // The smallest latency of the migration. Not forgotten after a while as
  // BBR does: once the window is full every pull waits behind the queue it
  // makes, so a fresh minimum would include that queue and grow the window
  // further; a migration is short next to how often routes change.
  double rtt_ = -1;
  // Delivery rate over intervals of a round trip (at least 50 ms); the best
  // of the last kRateSamples intervals.
  static constexpr int kRateSamples = 10;
  double rates_[kRateSamples] = {};
  int next_rate_ = 0;
  double best_rate_ = 0;
  uint64_t interval_bytes_ = 0;
  Clock::time_point interval_start_{};
};

}  // namespace livemig
