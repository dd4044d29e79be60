// A token bucket for max_rate: bytes per second on the wire, with at most
// 50 ms of burst. One thread uses a limiter (the source's pusher, the
// destination's puller, through TransferPacer), set_rate() included.
// charge() books the bytes sent; seconds_owed() tells how long to wait
// before sending more. The caller sleeps in short slices, so that a rate
// raised meanwhile (set-rate) shortens a wait begun at a lower one.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace livemig {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;

  explicit RateLimiter(uint64_t bytes_per_second) : rate_(double(bytes_per_second)) {}

  // 0: no cap.
  void set_rate(uint64_t bytes_per_second) {
    if (double(bytes_per_second) == rate_) return;
    refill(Clock::now());
    rate_ = double(bytes_per_second);
    tokens_ = std::min(tokens_, rate_ * 0.05);
    if (rate_ == 0) tokens_ = 0;  // no debt survives the cap's end
  }

  void charge(uint64_t bytes) {
    if (rate_ == 0) return;
    refill(Clock::now());
    tokens_ -= double(bytes);
  }

  // How long until the bytes charged so far are paid for at the current rate.
  double seconds_owed() {
    if (rate_ == 0) return 0;
    refill(Clock::now());
    return tokens_ < 0 ? -tokens_ / rate_ : 0;
  }

 private:
  void refill(Clock::time_point now) {
    if (last_ == Clock::time_point{}) last_ = now;
    const double dt = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    if (rate_ != 0) tokens_ = std::min(tokens_ + dt * rate_, rate_ * 0.05);
  }

  double rate_;
  Clock::time_point last_{};
  double tokens_ = 0;
};

}  // namespace livemig
