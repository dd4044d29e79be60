#include "plugin/guest_latency.h"

#include <algorithm>
#include <bit>
#include <cmath>

namespace livemig {
namespace {

thread_local bool skip_request = false;

int64_t ns_of(GuestLatency::Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

}  // namespace

// Values below 8 ns have a bucket each; above, a power of two 2^e is split
// in 8 buckets of width 2^(e-3).
int CumulativeHistogram::bucket_of(uint64_t ns) {
  if (ns < kSubBuckets) return static_cast<int>(ns);
  const int e = std::bit_width(ns) - 1;  // 2^e <= ns < 2^(e+1), e >= 3
  const int sub = static_cast<int>((ns >> (e - 3)) & (kSubBuckets - 1));
  return std::min(kBuckets - 1, (e - 2) * kSubBuckets + sub);
}

uint64_t CumulativeHistogram::bucket_middle(int bucket) {
  if (bucket < kSubBuckets) return static_cast<uint64_t>(bucket);
  const int e = bucket / kSubBuckets + 2, sub = bucket % kSubBuckets;
  const uint64_t width = uint64_t{1} << (e - 3);
  return (kSubBuckets + sub) * width + width / 2;
}

CumulativeHistogram::Counts CumulativeHistogram::snapshot() const {
  Counts c;
  for (int i = 0; i < kBuckets; ++i) c[i] = counts_[i].load(std::memory_order_relaxed);
  return c;
}

uint64_t CumulativeHistogram::count(const Counts& later, const Counts& earlier) {
  uint64_t n = 0;
  for (int i = 0; i < kBuckets; ++i) n += later[i] - earlier[i];
  return n;
}

uint64_t CumulativeHistogram::percentile(const Counts& later, const Counts& earlier, double q) {
  const uint64_t n = count(later, earlier);
  if (n == 0) return 0;
  const auto rank = static_cast<uint64_t>(std::ceil(std::clamp(q, 0.0, 1.0) * double(n)));
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += later[i] - earlier[i];
    if (seen >= std::max<uint64_t>(rank, 1)) return bucket_middle(i);
  }
  return bucket_middle(kBuckets - 1);
}

void GuestLatency::record(Clock::time_point started, Clock::time_point now) {
  if (skip_request) {
    skip_request = false;
    return;
  }
  histogram_.add(static_cast<uint64_t>(std::max<int64_t>(0, ns_of(now) - ns_of(started))));
  if (ns_of(now) >= next_rotation_ns_.load(std::memory_order_relaxed)) maybe_rotate(now);
}

void GuestLatency::begin_request() { skip_request = false; }

void GuestLatency::skip_current_request() { skip_request = true; }

void GuestLatency::maybe_rotate(Clock::time_point now) {
  if (!ring_mu_.try_lock()) return;
  MutexLock lock(ring_mu_, std::adopt_lock);
  if (ns_of(now) < next_rotation_ns_.load(std::memory_order_relaxed)) return;
  ring_[next_slot_] = histogram_.snapshot();
  next_slot_ = (next_slot_ + 1) % static_cast<int>(ring_.size());
  next_rotation_ns_.store(ns_of(now + kBaselineStep), std::memory_order_relaxed);
}

GuestLatency::Window GuestLatency::baseline() const {
  MutexLock lock(ring_mu_);
  // The slot written next is the oldest (all zero until the ring has
  // turned: then the window starts when the plugin did).
  return Window{histogram_.snapshot(), ring_[next_slot_]};
}

}  // namespace livemig
