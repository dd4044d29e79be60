#include "plugin/latency_pacer.h"

#include <algorithm>
#include <thread>

namespace livemig {

LatencyPacer::LatencyPacer(PacerConfig config)
    : config_(config),
      active_(config.bound > 0 && config.baseline_p99_ns > 0 && config.baseline_requests >= kMinBaselineRequests),
      rate_(config.max_rate),
      max_rate_(config.max_rate) {}

void LatencyPacer::set_max_rate(uint64_t max_rate) {
  const uint64_t old = max_rate_.exchange(max_rate, std::memory_order_relaxed);
  uint64_t rate = rate_.load(std::memory_order_relaxed);
  if (!active_ || rate == old) rate = max_rate;  // at the ceiling: follows it
  else if (max_rate != 0 && (rate == 0 || rate > max_rate)) rate = max_rate;
  rate_.store(rate, std::memory_order_relaxed);
}

uint64_t LatencyPacer::on_window(uint64_t requests, uint64_t p99_ns, uint64_t bytes, double seconds) {
  if (!active_ || seconds <= 0) return rate();
  const uint64_t n = windows_.fetch_add(1, std::memory_order_relaxed) + 1;
  if (requests < kMinRequests) p99_ns = 0;  // an idle guest: nothing to protect
  last_p99_ns_.store(p99_ns, std::memory_order_relaxed);
  const uint64_t moved = static_cast<uint64_t>(double(bytes) / seconds);
  uint64_t rate;
  if (probing_) {
    // The transfer was held to min_rate: the guest's latency here with
    // (almost) no migration traffic.
    if (p99_ns != 0) local_baseline_ns_.store(p99_ns, std::memory_order_relaxed);
    probing_ = false;
    rate = rate_before_probe_;
  } else {
    const uint64_t cap = rate_.load(std::memory_order_relaxed);
    rate = next_rate(p99_ns, moved);
    // The budget's reference measured again (header): one window unpaced.
    if (config_.max_slowdown >= 1 && n % kRemeasureEvery == 0 && rate != 0 && cap != 0 && cap != max_rate() &&
        moved * 10 >= cap * 9) {
      remeasures_.fetch_add(1, std::memory_order_relaxed);
      rate = 0;
    }
  }
  if (config_.probe_every != 0 && (n == 1 || n % config_.probe_every == 0) && worth_probing(moved)) {
    probes_.fetch_add(1, std::memory_order_relaxed);
    probing_ = true;
    rate_before_probe_ = rate;
    rate = config_.min_rate;
  }
  // The ceiling last: it may be below min_rate once the operator lowered it.
  if (const uint64_t ceiling = max_rate(); ceiling != 0 && (rate == 0 || rate > ceiling)) rate = ceiling;
  rate_.store(rate, std::memory_order_relaxed);
  return rate;
}

uint64_t LatencyPacer::next_rate(uint64_t p99_ns, uint64_t moved) {
  uint64_t rate = rate_.load(std::memory_order_relaxed);
  const uint64_t max_rate = max_rate_.load(std::memory_order_relaxed);
  const bool capped_by_us = rate != 0 && rate != max_rate;
  if (!capped_by_us) fastest_unpaced_ = std::max(fastest_unpaced_, moved);
  const uint64_t baseline = std::max(config_.baseline_p99_ns, local_baseline_ns_.load(std::memory_order_relaxed));
  const bool over = p99_ns > config_.bound * double(baseline);
  if (over) {
    windows_over_.fetch_add(1, std::memory_order_relaxed);
    const uint64_t from = rate == 0 ? moved : std::min(rate, std::max(moved, floor()));
    rate = std::max(floor(), from / 2);
  } else if (capped_by_us) {
    rate += std::max(config_.min_rate, fastest_unpaced_ / 16);
    if (rate > 2 * fastest_unpaced_) rate = 0;  // lifted
  }
  if (rate != 0) rate = std::max(rate, floor());
  return rate;
}

bool LatencyPacer::worth_probing(uint64_t moved) {
  const uint64_t remaining = remaining_.load(std::memory_order_relaxed);
  const double probe_period = config_.probe_every * std::chrono::duration<double>(kWindow).count();
  if (remaining == 0 || moved == 0 || double(remaining) / double(moved) >= probe_period) return true;
  probes_skipped_.fetch_add(1, std::memory_order_relaxed);
  return false;
}

uint64_t LatencyPacer::floor() const {
  if (config_.max_slowdown < 1) return config_.min_rate;
  return std::max(config_.min_rate, static_cast<uint64_t>(double(fastest_unpaced_) / config_.max_slowdown));
}

TransferPacer::TransferPacer(const GuestLatency* guest, PacerConfig config)
    : guest_(guest),
      pacer_(guest ? config : PacerConfig{.max_rate = config.max_rate}),
      limiter_(config.max_rate),
      wanted_max_rate_(config.max_rate),
      applied_max_rate_(config.max_rate) {}

void TransferPacer::apply_max_rate() {
  if (const uint64_t wanted = wanted_max_rate_.load(std::memory_order_relaxed); wanted != applied_max_rate_) {
    applied_max_rate_ = wanted;
    pacer_.set_max_rate(wanted);
    limiter_.set_rate(tail_.load(std::memory_order_relaxed) ? wanted : pacer_.rate());
  }
}

void TransferPacer::take(uint64_t bytes, bool pace) {
  apply_max_rate();
  if (!pace && !tail_.exchange(true, std::memory_order_relaxed)) limiter_.set_rate(applied_max_rate_);
  if (pacer_.active() && !tail_.load(std::memory_order_relaxed)) {
    const auto now = std::chrono::steady_clock::now();
    window_bytes_ += bytes;
    if (window_start_ == std::chrono::steady_clock::time_point{}) {
      window_start_ = now;
      window_start_counts_ = guest_->snapshot();
    } else if (now - window_start_ >= LatencyPacer::kWindow) {
      const auto counts = guest_->snapshot();
      const uint64_t requests = CumulativeHistogram::count(counts, window_start_counts_);
      const uint64_t p99 = CumulativeHistogram::percentile(counts, window_start_counts_, 0.99);
      const double seconds = std::chrono::duration<double>(now - window_start_).count();
      limiter_.set_rate(pacer_.on_window(requests, p99, window_bytes_, seconds));
      window_start_ = now;
      window_start_counts_ = counts;
      window_bytes_ = 0;
    }
  }
  limiter_.charge(bytes);
  // Slices of at most 50 ms: a ceiling raised meanwhile ends the wait early.
  for (double owed; (owed = limiter_.seconds_owed()) > 0; apply_max_rate())
    std::this_thread::sleep_for(std::chrono::duration<double>(std::min(owed, 0.05)));
}

nlohmann::json TransferPacer::to_json() const {
  nlohmann::json j = pacer_.to_json();
  const bool tail = tail_.load(std::memory_order_relaxed);
  j["unpaced_tail"] = tail;
  if (tail) j["rate"] = max_rate();  // what the limiter applies now, not the pacer's last decision
  return j;
}

nlohmann::json LatencyPacer::to_json() const {
  return {{"guest_latency_bound", config_.bound},
          {"active", active_},
          {"baseline_p99_ms", double(config_.baseline_p99_ns) / 1e6},
          {"baseline_requests", config_.baseline_requests},
          {"local_baseline_p99_ms", double(local_baseline_ns_.load(std::memory_order_relaxed)) / 1e6},
          {"probes", probes_.load(std::memory_order_relaxed)},
          {"probes_skipped", probes_skipped_.load(std::memory_order_relaxed)},
          {"window_p99_ms", double(last_p99_ns_.load(std::memory_order_relaxed)) / 1e6},
          {"rate", rate()},
          {"max_rate", max_rate()},
          {"min_rate", config_.min_rate},
          {"max_slowdown", config_.max_slowdown},
          {"windows", windows_.load(std::memory_order_relaxed)},
          {"windows_over_bound", windows_over_.load(std::memory_order_relaxed)},
          {"remeasures", remeasures_.load(std::memory_order_relaxed)}};
}

}  // namespace livemig
