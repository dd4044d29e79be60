#include "plugin/latency_pacer.h"

#include <thread>

#include <catch2/catch.hpp>

#include "plugin/guest_latency.h"

using livemig::CumulativeHistogram;
using livemig::GuestLatency;
using livemig::LatencyPacer;
using livemig::PacerConfig;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t kBaseline = 100'000;  // ns

PacerConfig config(double bound = 1.2, uint64_t max_rate = 0) {
  return {.bound = bound, .min_rate = 16 * MiB, .max_rate = max_rate, .baseline_p99_ns = kBaseline,
          .baseline_requests = 10'000};
}

// A window of `seconds` in which the transfer moved `rate` bytes/s and the
// guest's p99 was `p99` ns over 1000 requests.
uint64_t window(LatencyPacer& p, uint64_t rate, uint64_t p99, double seconds = 0.25) {
  return p.on_window(1000, p99, static_cast<uint64_t>(double(rate) * seconds), seconds);
}

}  // namespace

TEST_CASE("histogram: buckets are within 1/8 of a power of two; percentiles come from the window only") {
  for (uint64_t v : {0ull, 7ull, 8ull, 100ull, 4096ull, 123'456ull, 10'000'000'000ull}) {
    uint64_t mid = CumulativeHistogram::bucket_middle(CumulativeHistogram::bucket_of(v));
    CHECK(double(mid) >= double(v) * 0.93);
    CHECK(double(mid) <= double(v) * 1.07 + 1);
  }
  CumulativeHistogram h;
  for (int i = 0; i < 1000; ++i) h.add(1'000'000);  // before the window: 1 ms
  auto before = h.snapshot();
  for (int i = 0; i < 990; ++i) h.add(10'000);  // 10 us
  for (int i = 0; i < 10; ++i) h.add(500'000);  // 500 us, the slowest 1%
  auto after = h.snapshot();
  CHECK(CumulativeHistogram::count(after, before) == 1000);
  CHECK(CumulativeHistogram::percentile(after, before, 0.5) == Approx(10'000).epsilon(0.07));
  CHECK(CumulativeHistogram::percentile(after, before, 0.99) == Approx(10'000).epsilon(0.07));
  CHECK(CumulativeHistogram::percentile(after, before, 0.995) == Approx(500'000).epsilon(0.07));
  CHECK(CumulativeHistogram::percentile(after, after, 0.99) == 0);
}

TEST_CASE("guest latency: a request that waited for the peer is left out; the next one counts") {
  GuestLatency g;
  auto t0 = GuestLatency::Clock::now();
  GuestLatency::begin_request();
  GuestLatency::skip_current_request();
  g.record(t0, t0 + 5ms);
  GuestLatency::begin_request();
  g.record(t0, t0 + 20us);
  auto b = g.baseline();
  CHECK(CumulativeHistogram::count(b.now, b.since) == 1);
  CHECK(CumulativeHistogram::percentile(b.now, b.since, 1.0) == Approx(20'000).epsilon(0.07));
}

TEST_CASE("guest latency: the baseline covers the last 10-15 s, not what came before") {
  GuestLatency g;
  auto t0 = GuestLatency::Clock::time_point{} + 1000s;
  for (int i = 0; i < 100; ++i) g.record(t0, t0 + 1ms);  // slow, long ago
  for (int s = 1; s <= 20; ++s)
    for (int i = 0; i < 10; ++i) g.record(t0 + std::chrono::seconds(s), t0 + std::chrono::seconds(s) + 10us);
  auto b = g.baseline();
  uint64_t n = CumulativeHistogram::count(b.now, b.since);
  CHECK(n >= 100);  // at least 10 s of 10 requests a second
  CHECK(n <= 160);
  CHECK(CumulativeHistogram::percentile(b.now, b.since, 0.99) == Approx(10'000).epsilon(0.07));
}

TEST_CASE("pacer: a guest within its bound leaves the transfer unpaced") {
  LatencyPacer p(config());
  REQUIRE(p.active());
  for (int i = 0; i < 20; ++i) CHECK(window(p, 100 * MiB, kBaseline * 11 / 10) == 0);
}

TEST_CASE("pacer: a guest over its bound halves the rate down to min_rate, never below") {
  LatencyPacer p(config());
  CHECK(window(p, 100 * MiB, kBaseline * 2) == 50 * MiB);
  CHECK(window(p, 50 * MiB, kBaseline * 2) == 25 * MiB);
  CHECK(window(p, 25 * MiB, kBaseline * 2) == 16 * MiB);  // the floor: the migration still ends
  CHECK(window(p, 16 * MiB, kBaseline * 5) == 16 * MiB);
  CHECK(p.to_json()["windows_over_bound"] == 4);
}

TEST_CASE("pacer: once the guest recovers the rate climbs back and the cap is lifted") {
  LatencyPacer p(config());
  window(p, 100 * MiB, kBaseline);  // the fastest unpaced rate seen
  uint64_t rate = window(p, 100 * MiB, kBaseline * 3);
  REQUIRE(rate == 50 * MiB);
  int windows = 0;
  while (rate != 0 && windows < 100) {
    uint64_t next = window(p, rate, kBaseline);
    if (next != 0) CHECK(next > rate);
    rate = next;
    ++windows;
  }
  CHECK(rate == 0);
  CHECK(windows <= 40);
}

TEST_CASE("pacer: max_rate stays the ceiling, paced or not") {
  LatencyPacer p(config(1.2, 40 * MiB));
  CHECK(window(p, 40 * MiB, kBaseline) == 40 * MiB);
  CHECK(window(p, 40 * MiB, kBaseline * 2) == 20 * MiB);
  for (int i = 0; i < 50; ++i) CHECK(window(p, 40 * MiB, kBaseline) <= 40 * MiB);
  CHECK(p.rate() == 40 * MiB);
}

TEST_CASE("pacer: a ceiling changed while the transfer runs holds at once, also below min_rate and in a probe") {
  LatencyPacer p(config(1.2, 40 * MiB));
  CHECK(window(p, 40 * MiB, kBaseline) == 40 * MiB);
  p.set_max_rate(8 * MiB);  // below min_rate (16 MiB): the operator's limit wins
  CHECK(p.rate() == 8 * MiB);
  for (int i = 0; i < 20; ++i) CHECK(window(p, 8 * MiB, kBaseline) <= 8 * MiB);
  CHECK(window(p, 8 * MiB, kBaseline * 3) <= 8 * MiB);
  // Raised: a rate at the old ceiling follows it up.
  p.set_max_rate(8 * MiB);
  CHECK(window(p, 8 * MiB, kBaseline) == 8 * MiB);
  p.set_max_rate(64 * MiB);
  CHECK(p.rate() == 64 * MiB);
  CHECK(p.max_rate() == 64 * MiB);
  // A rate the guest lowered stays lower when the ceiling rises.
  CHECK(window(p, 64 * MiB, kBaseline * 3) == 32 * MiB);
  p.set_max_rate(0);
  CHECK(p.rate() == 32 * MiB);
  // Lifted: no ceiling, and the pacer alone decides.
  CHECK(p.to_json()["max_rate"] == 0);

  PacerConfig probing = config(1.2, 40 * MiB);
  probing.probe_every = 4;
  LatencyPacer q(probing);
  CHECK(window(q, 40 * MiB, kBaseline) == 16 * MiB);  // the first window probes at min_rate
  q.set_max_rate(4 * MiB);
  CHECK(window(q, 4 * MiB, kBaseline) == 4 * MiB);  // the probe ends: back to the rate before, under the new ceiling
}

TEST_CASE("pacer: without a guest measure, set_max_rate is the rate") {
  LatencyPacer p(PacerConfig{.max_rate = 10 * MiB});
  p.set_max_rate(3 * MiB);
  CHECK(p.rate() == 3 * MiB);
  CHECK(p.on_window(1000, kBaseline * 10, 3 * MiB, 1) == 3 * MiB);
  p.set_max_rate(0);
  CHECK(p.rate() == 0);
}

TEST_CASE("pacer: an idle guest, a thin baseline or no bound pace nothing") {
  LatencyPacer idle(config());
  CHECK(idle.on_window(5, kBaseline * 10, 25 * MiB, 0.25) == 0);  // 5 requests: not a signal
  PacerConfig thin = config();
  thin.baseline_requests = 50;
  LatencyPacer p(thin);
  CHECK_FALSE(p.active());
  CHECK(window(p, 100 * MiB, kBaseline * 10) == 0);
  LatencyPacer off(config(0));
  CHECK_FALSE(off.active());
  CHECK(window(off, 100 * MiB, kBaseline * 10) == 0);
}

TEST_CASE("pacer: a probe window at min_rate sets this side's own baseline, so a slower disk is not a reason to crawl") {
  PacerConfig c = config();
  c.probe_every = 4;
  LatencyPacer p(c);
  const uint64_t local = kBaseline * 3;  // this side's guest is 3x slower, migration or not
  CHECK(window(p, 100 * MiB, local) == 16 * MiB);  // over the source's baseline; and the first probe starts
  CHECK(p.probing());
  CHECK(window(p, 16 * MiB, local) == 50 * MiB);  // the probe ends: back to the rate before it
  CHECK(p.to_json()["local_baseline_p99_ms"] == Approx(local / 1e6));
  CHECK(window(p, 50 * MiB, local * 11 / 10) > 50 * MiB);  // within 1.2x of the local baseline: climbs
  CHECK(window(p, 60 * MiB, local * 2) == 16 * MiB);  // 4th window: over, halved, then probing again
  CHECK(p.probing());
  CHECK(p.to_json()["probes"] == 2);
}

TEST_CASE("pacer: without probes the source's baseline alone judges the guest") {
  LatencyPacer p(config());
  CHECK(window(p, 100 * MiB, kBaseline * 3) == 50 * MiB);
  CHECK(window(p, 50 * MiB, kBaseline * 3) == 25 * MiB);
  CHECK_FALSE(p.probing());
  CHECK(p.to_json()["probes"] == 0);
}

TEST_CASE("pacer: a fastest rate first measured low is measured again, so the time budget follows the link") {
  PacerConfig c = config();
  c.max_slowdown = 1.3;
  LatencyPacer p(c);
  // The first window moves 40 MiB/s (the link starting up, holes crossing
  // as notes), the guest over its bound from the start and throughout.
  uint64_t rate = window(p, 40 * MiB, kBaseline * 3);
  CHECK(rate == 40 * MiB * 10 / 13);
  bool unpaced = false;
  for (int i = 0; i < 2 * int(LatencyPacer::kRemeasureEvery) && !unpaced; ++i) {
    rate = window(p, rate, kBaseline * 3);  // the cap binds: the window moves all it allows
    unpaced = rate == 0;
  }
  REQUIRE(unpaced);  // one window unpaced, in which the link shows 120 MiB/s
  rate = window(p, 120 * MiB, kBaseline * 3);
  CHECK(rate >= 120 * MiB * 10 / 13);
  CHECK(p.to_json()["remeasures"] == 1);
  // A cap that does not bind (the link moves less) is no reason to measure again.
  for (int i = 0; i < 3 * int(LatencyPacer::kRemeasureEvery); ++i) CHECK(window(p, rate / 2, kBaseline * 3) != 0);
}

TEST_CASE("pacer: max_slowdown keeps the rate at the fastest unpaced rate / max_slowdown at least") {
  PacerConfig c = config();
  c.max_slowdown = 1.25;
  LatencyPacer p(c);
  CHECK(window(p, 100 * MiB, kBaseline * 3) == 80 * MiB);  // halving would give 50: the budget says 80
  CHECK(window(p, 80 * MiB, kBaseline * 3) == 80 * MiB);
  CHECK(p.to_json()["windows_over_bound"] == 2);
}

TEST_CASE("transfer pacer: the tail is paced by max_rate alone, not by the guest") {
  using Clock = std::chrono::steady_clock;
  GuestLatency guest;
  PacerConfig c = config();
  c.min_rate = MiB;
  livemig::TransferPacer pacer(&guest, c);
  auto seconds_since = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  // A guest at 100x its baseline: the rate falls to min_rate after a window.
  const auto deadline = Clock::now() + 5s;
  while (pacer.to_json()["rate"] != c.min_rate && Clock::now() < deadline) {
    const auto now = Clock::now();
    for (int i = 0; i < 100; ++i) guest.record(now - 10ms, now);
    pacer.take(16 << 10);
    std::this_thread::sleep_for(20ms);
  }
  REQUIRE(pacer.to_json()["rate"] == c.min_rate);
  CHECK(pacer.to_json()["unpaced_tail"] == false);

  // 2 MiB at min_rate would take 2 s; as the tail it is not held back.
  auto t0 = Clock::now();
  pacer.take(2 * MiB, false);
  CHECK(seconds_since(t0) < 0.5);
  CHECK(pacer.to_json()["unpaced_tail"] == true);
  CHECK(pacer.to_json()["rate"] == 0);
  // The operator's ceiling still holds in the tail: 2 MiB at 4 MiB/s.
  pacer.set_max_rate(4 * MiB);
  pacer.take(0, false);
  t0 = Clock::now();
  pacer.take(2 * MiB, false);
  const double took = seconds_since(t0);
  CHECK(took >= 0.3);
  CHECK(took < 1.5);
  CHECK(pacer.to_json()["rate"] == 4 * MiB);
}

TEST_CASE("pacer: no probe when what is left would be moved before the probe could pay for itself") {
  PacerConfig c = config();
  c.probe_every = 4;  // a probe period of 4 windows, 1 s
  LatencyPacer p(c);
  p.set_remaining(50 * MiB);  // half a second at 100 MiB/s
  CHECK(window(p, 100 * MiB, kBaseline) == 0);  // within the bound: unpaced, and no probe
  CHECK_FALSE(p.probing());
  CHECK(p.to_json()["probes_skipped"] == 1);
  p.set_remaining(500 * MiB);  // 5 s: worth a probe
  for (int i = 0; i < 2; ++i) CHECK(window(p, 100 * MiB, kBaseline) == 0);
  CHECK(window(p, 100 * MiB, kBaseline) == 16 * MiB);  // the 4th window starts one
  CHECK(p.probing());
  // Not known (0): probes as before.
  LatencyPacer unknown(c);
  CHECK(window(unknown, 100 * MiB, kBaseline) == 16 * MiB);
  CHECK(unknown.probing());
  CHECK(unknown.to_json()["probes_skipped"] == 0);
}
