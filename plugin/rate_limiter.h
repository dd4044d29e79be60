// A token bucket for max_rate: bytes per second on the wire, with at most
// 50 ms of burst. take() sleeps the calling thread as long as needed. One
// thread uses a limiter (the source's pusher, the destination's puller);
// set_rate() is called by that thread too (TransferPacer).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>

namespace livemig {

class RateLimiter {
 public:
  explicit RateLimiter(uint64_t bytes_per_second) : rate_(bytes_per_second) {}

  // 0: no cap.
  void set_rate(uint64_t bytes_per_second) {
    if (double(bytes_per_second) == rate_) return;
    rate_ = double(bytes_per_second);
    tokens_ = std::min(tokens_, rate_ * 0.05);
  }

  void take(uint64_t bytes) {
    if (rate_ == 0) return;
    auto now = std::chrono::steady_clock::now();
    if (last_ == std::chrono::steady_clock::time_point{}) last_ = now;
    double dt = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    tokens_ = std::min(tokens_ + dt * rate_, rate_ * 0.05);
    tokens_ -= double(bytes);
    if (tokens_ < 0) std::this_thread::sleep_for(std::chrono::duration<double>(-tokens_ / rate_));
  }

 private:
  double rate_;
  std::chrono::steady_clock::time_point last_{};
  double tokens_ = 0;
};

}  // namespace livemig
