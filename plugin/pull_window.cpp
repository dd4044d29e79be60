#include "plugin/pull_window.h"

#include <algorithm>

namespace livemig {

namespace {
constexpr double kMinInterval = 0.05;  // seconds

double seconds(PullWindow::Clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

void PullWindow::on_answer(uint64_t bytes, Clock::time_point asked, Clock::time_point now) {
  if (interval_start_ == Clock::time_point{}) interval_start_ = asked;
  const double latency = seconds(now - asked);
  if (rtt_ < 0 || latency < rtt_) rtt_ = latency;
  interval_bytes_ += bytes;
  const double elapsed = seconds(now - interval_start_);
  if (elapsed >= std::max(kMinInterval, rtt_seconds())) {
    rates_[next_rate_] = interval_bytes_ / elapsed;
    next_rate_ = (next_rate_ + 1) % kRateSamples;
    best_rate_ = *std::max_element(rates_, rates_ + kRateSamples);
    interval_bytes_ = 0;
    interval_start_ = now;
  }
}

uint64_t PullWindow::bytes() const {
  if (rtt_ <= 0 || best_rate_ <= 0) return min_;
  const double bdp = best_rate_ * rtt_;
  return std::clamp<uint64_t>(static_cast<uint64_t>(kGain * bdp), min_, max_);
}

}  // namespace livemig
