#include "common/heat_map.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/support/strings.h"

using livemig::HeatCounts;
using livemig::HeatMap;
using livemig::HeatWeights;
using livemig::RankedSegment;
using livemig::SegmentGeometry;
using livemig::heat_score;
using livemig::rank_segments;

using livemig::contains;

namespace {

constexpr uint64_t MiB = 1024 * 1024;

SegmentGeometry geometry(uint64_t image, uint64_t block = 4096, uint64_t segment = MiB) {
  auto g = SegmentGeometry::make(image, block, segment);
  REQUIRE(g.is_ok());
  return *g;
}

std::vector<uint64_t> order_of(const std::vector<RankedSegment>& ranked) {
  std::vector<uint64_t> out;
  for (const auto& r : ranked) out.push_back(r.segment);
  return out;
}

HeatCounts counts(double reads, double writes) { return HeatCounts{reads, writes, 0, 0}; }

}  // namespace

TEST_CASE("HeatWeights::make accepts weights in [0, 1] that add up to 1") {
  HeatWeights d;
  CHECK(d.read == 0.5);
  CHECK(d.write == 0.5);
  for (auto [r, w] : {std::pair{0.5, 0.5}, std::pair{1.0, 0.0}, std::pair{0.0, 1.0},
                      std::pair{0.25, 0.75}, std::pair{0.3, 0.7}, std::pair{0.1, 0.9}}) {
    INFO("read " << r << " write " << w);
    auto hw = HeatWeights::make(r, w);
    REQUIRE(hw.is_ok());
    CHECK(hw->read == r);
    CHECK(hw->write == w);
  }
}

TEST_CASE("HeatWeights::make rejects a weight outside [0, 1] with a message") {
  for (auto [r, w] : {std::pair{-0.1, 1.1}, std::pair{1.1, -0.1}, std::pair{-1.0, 0.5},
                      std::pair{0.5, 2.0}, std::pair{std::nan(""), 0.5}, std::pair{0.5, std::nan("")},
                      std::pair{std::numeric_limits<double>::infinity(), 0.0}}) {
    INFO("read " << r << " write " << w);
    auto hw = HeatWeights::make(r, w);
    REQUIRE_FALSE(hw.is_ok());
    CHECK(contains(hw.status().message(), "[0, 1]"));
    CHECK(contains(hw.status().message(), "heat weights"));
    CHECK(hw.status().errno_value() != 0);
  }
}

TEST_CASE("HeatWeights::make rejects weights whose sum is not 1 with a message") {
  for (auto [r, w] : {std::pair{0.5, 0.6}, std::pair{0.2, 0.2}, std::pair{0.0, 0.0}, std::pair{1.0, 1.0},
                      std::pair{0.5, 0.4999}}) {
    INFO("read " << r << " write " << w);
    auto hw = HeatWeights::make(r, w);
    REQUIRE_FALSE(hw.is_ok());
    CHECK(contains(hw.status().message(), "add up to 1"));
  }
}

TEST_CASE("heat_score is LiveFS's f = (w1*reads + w2*writes) / 2") {
  HeatCounts c = counts(10, 4);
  CHECK(heat_score(c, HeatWeights{0.5, 0.5}) == Approx(3.5));   // (5 + 2) / 2
  CHECK(heat_score(c, HeatWeights{1.0, 0.0}) == Approx(5.0));   // reads only
  CHECK(heat_score(c, HeatWeights{0.0, 1.0}) == Approx(2.0));   // writes only
  CHECK(heat_score(c, HeatWeights{0.8, 0.2}) == Approx(4.4));   // (8 + 0.8) / 2
  CHECK(heat_score(c, HeatWeights{0.25, 0.75}) == Approx(2.75));  // (2.5 + 3) / 2
  CHECK(heat_score(counts(0, 0), HeatWeights{}) == 0);
  // Byte counts do not enter the score.
  CHECK(heat_score(HeatCounts{10, 4, 1e9, 1e9}, HeatWeights{}) == Approx(3.5));
  CHECK(heat_score(counts(1000, 3000), HeatWeights{}) == Approx(1000));
}

TEST_CASE("rank_segments orders by decreasing score") {
  std::vector<HeatCounts> heat = {counts(1, 1), counts(50, 50), counts(0, 0), counts(10, 30), counts(200, 0)};
  auto ranked = rank_segments(heat, HeatWeights{});
  REQUIRE(ranked.size() == heat.size());
  CHECK(order_of(ranked) == std::vector<uint64_t>{4, 1, 3, 0, 2});
  CHECK(ranked[0].score == Approx(50));  // (0.5*200)/2
  CHECK(ranked[1].score == Approx(25));
  CHECK(ranked[2].score == Approx(10));
  CHECK(ranked[3].score == Approx(0.5));
  CHECK(ranked[4].score == 0);
  for (size_t i = 1; i < ranked.size(); ++i) CHECK(ranked[i - 1].score >= ranked[i].score);
}

TEST_CASE("rank_segments keeps index order for equal scores") {
  // Scores: 2, 5, 2, 5, 0, 2, 5 — with ties of several kinds, including
  // equal scores from different read/write mixes.
  std::vector<HeatCounts> heat = {counts(4, 4), counts(10, 10), counts(8, 0), counts(0, 20),
                                  counts(0, 0), counts(2, 6),   counts(20, 0)};
  auto ranked = rank_segments(heat, HeatWeights{});
  CHECK(order_of(ranked) == std::vector<uint64_t>{1, 3, 6, 0, 2, 5, 4});

  // All equal: identity order.
  std::vector<HeatCounts> flat(100, counts(3, 3));
  auto r2 = rank_segments(flat, HeatWeights{});
  for (uint64_t i = 0; i < r2.size(); ++i) CHECK(r2[i].segment == i);

  // Nothing to rank.
  CHECK(rank_segments(std::vector<HeatCounts>{}, HeatWeights{}).empty());
}

TEST_CASE("heat weights change the order of read-heavy and write-heavy segments") {
  // Segment 0 is read-heavy, 1 write-heavy, 2 lukewarm on both.
  std::vector<HeatCounts> heat = {counts(100, 10), counts(10, 100), counts(40, 40)};

  auto read_heavy = rank_segments(heat, *HeatWeights::make(0.9, 0.1));
  CHECK(order_of(read_heavy) == std::vector<uint64_t>{0, 2, 1});
  CHECK(read_heavy[0].score == Approx(45.5));  // (90 + 1) / 2
  CHECK(read_heavy[2].score == Approx(9.5));   // (9 + 10) / 2

  auto write_heavy = rank_segments(heat, *HeatWeights::make(0.1, 0.9));
  CHECK(order_of(write_heavy) == std::vector<uint64_t>{1, 2, 0});
  CHECK(write_heavy[0].score == Approx(45.5));

  // Equal weights: 0 and 1 tie at 27.5 and keep index order, above 2 at 20.
  auto even = rank_segments(heat, HeatWeights{});
  CHECK(order_of(even) == std::vector<uint64_t>{0, 1, 2});
  CHECK(even[0].score == Approx(27.5));
  CHECK(even[1].score == Approx(27.5));
  CHECK(even[2].score == Approx(20));

  // Pure weights.
  CHECK(order_of(rank_segments(heat, HeatWeights{1, 0})) == std::vector<uint64_t>{0, 2, 1});
  CHECK(order_of(rank_segments(heat, HeatWeights{0, 1})) == std::vector<uint64_t>{1, 2, 0});
}

TEST_CASE("a new heat map has every counter at zero") {
  HeatMap h(geometry(4 * MiB), 30);
  CHECK(h.segment_count() == 4);
  CHECK(h.half_life() == 30);
  CHECK(h.geometry().segment_size() == MiB);
  auto snap = h.cumulative_snapshot();
  REQUIRE(snap.size() == 4);
  for (const auto& c : snap) {
    CHECK(c.reads == 0);
    CHECK(c.writes == 0);
    CHECK(c.read_bytes == 0);
    CHECK(c.write_bytes == 0);
  }
  auto dec = h.decayed_snapshot();
  REQUIRE(dec.size() == 4);
  for (const auto& c : dec) CHECK(c.writes == 0);
}

TEST_CASE("a request inside one segment counts one op and its bytes there") {
  HeatMap h(geometry(4 * MiB), 30);
  h.record_read(MiB + 100, 4096);
  h.record_write(2 * MiB, 512);
  h.record_write(2 * MiB + 4096, 8192);

  auto c1 = h.cumulative(1);
  CHECK(c1.reads == 1);
  CHECK(c1.read_bytes == 4096);
  CHECK(c1.writes == 0);
  CHECK(c1.write_bytes == 0);
  auto c2 = h.cumulative(2);
  CHECK(c2.writes == 2);
  CHECK(c2.write_bytes == 512 + 8192);
  CHECK(c2.reads == 0);
  CHECK(h.cumulative(0).reads == 0);
  CHECK(h.cumulative(0).writes == 0);
  CHECK(h.cumulative(3).writes == 0);
}

TEST_CASE("a request across a segment boundary counts one op in each and splits the bytes exactly") {
  HeatMap h(geometry(4 * MiB), 30);
  h.record_write(MiB - 1000, 3000);  // 1000 bytes in segment 0, 2000 in segment 1
  CHECK(h.cumulative(0).writes == 1);
  CHECK(h.cumulative(0).write_bytes == 1000);
  CHECK(h.cumulative(1).writes == 1);
  CHECK(h.cumulative(1).write_bytes == 2000);
  CHECK(h.cumulative(2).writes == 0);

  // Across three segments: 10 bytes, a whole segment, 20 bytes.
  h.record_read(MiB - 10, MiB + 30);
  CHECK(h.cumulative(0).reads == 1);
  CHECK(h.cumulative(0).read_bytes == 10);
  CHECK(h.cumulative(1).reads == 1);
  CHECK(h.cumulative(1).read_bytes == MiB);
  CHECK(h.cumulative(2).reads == 1);
  CHECK(h.cumulative(2).read_bytes == 20);
  CHECK(h.cumulative(3).reads == 0);

  // Ending exactly on a boundary does not touch the next segment.
  h.record_read(0, MiB);
  CHECK(h.cumulative(0).reads == 2);
  CHECK(h.cumulative(0).read_bytes == 10 + MiB);
  CHECK(h.cumulative(1).reads == 1);

  // The whole image: one op per segment, total bytes = image size.
  HeatMap w(geometry(4 * MiB), 30);
  w.record_write(0, 4 * MiB);
  double total = 0;
  for (const auto& c : w.cumulative_snapshot()) {
    CHECK(c.writes == 1);
    CHECK(c.write_bytes == MiB);
    total += c.write_bytes;
  }
  CHECK(total == 4 * MiB);
}

TEST_CASE("a request into the last partial segment counts only the bytes that exist") {
  const uint64_t image = 2 * MiB + 12345;
  HeatMap h(geometry(image), 30);
  REQUIRE(h.segment_count() == 3);
  h.record_write(2 * MiB - 5, 12345 + 5);  // to the image end
  CHECK(h.cumulative(1).writes == 1);
  CHECK(h.cumulative(1).write_bytes == 5);
  CHECK(h.cumulative(2).writes == 1);
  CHECK(h.cumulative(2).write_bytes == 12345);
}

TEST_CASE("a zero-length request counts nothing") {
  HeatMap h(geometry(4 * MiB), 30);
  h.record_read(MiB, 0);
  h.record_write(0, 0);
  for (const auto& c : h.cumulative_snapshot()) {
    CHECK(c.reads == 0);
    CHECK(c.writes == 0);
  }
}

TEST_CASE("cumulative_snapshot reports every segment's counters") {
  HeatMap h(geometry(3 * MiB + 1), 30);
  REQUIRE(h.segment_count() == 4);
  for (int i = 0; i < 5; ++i) h.record_read(0, 4096);
  for (int i = 0; i < 3; ++i) h.record_write(MiB, 100);
  h.record_write(3 * MiB, 1);
  auto s = h.cumulative_snapshot();
  REQUIRE(s.size() == 4);
  CHECK(s[0].reads == 5);
  CHECK(s[0].read_bytes == 5 * 4096);
  CHECK(s[0].writes == 0);
  CHECK(s[1].writes == 3);
  CHECK(s[1].write_bytes == 300);
  CHECK(s[2].reads == 0);
  CHECK(s[2].writes == 0);
  CHECK(s[3].writes == 1);
  CHECK(s[3].write_bytes == 1);
  for (uint64_t i = 0; i < 4; ++i) {
    CHECK(s[i].reads == h.cumulative(i).reads);
    CHECK(s[i].writes == h.cumulative(i).writes);
  }
  // A snapshot is a copy: later requests do not change it.
  h.record_read(0, 1);
  CHECK(s[0].reads == 5);
  CHECK(h.cumulative(0).reads == 6);
  // The difference of two snapshots is the monitoring period's heat.
  auto later = h.cumulative_snapshot();
  CHECK(later[0].reads - s[0].reads == 1);
  CHECK(later[1].writes - s[1].writes == 0);
  // Snapshots feed the ranking.
  auto ranked = rank_segments(later, HeatWeights{});
  CHECK(ranked[0].segment == 0);
  CHECK(ranked[1].segment == 1);
}

TEST_CASE("the first decay_tick takes everything counted so far at factor 1") {
  HeatMap h(geometry(2 * MiB), 10);
  for (int i = 0; i < 8; ++i) h.record_write(0, 4096);
  for (int i = 0; i < 4; ++i) h.record_read(MiB, 512);
  // Before any tick, the decayed view is empty.
  CHECK(h.decayed_snapshot()[0].writes == 0);
  // The first tick's time is only the origin, however large: nothing decays.
  h.decay_tick(1000.0);
  auto d = h.decayed_snapshot();
  CHECK(d[0].writes == 8);
  CHECK(d[0].write_bytes == 8 * 4096);
  CHECK(d[1].reads == 4);
  CHECK(d[1].read_bytes == 4 * 512);
  CHECK(d[0].reads == 0);
  CHECK(d[1].writes == 0);
}

TEST_CASE("after one half-life with no new requests the decayed counts halve") {
  HeatMap h(geometry(2 * MiB), 10);
  for (int i = 0; i < 8; ++i) h.record_write(0, 4096);
  for (int i = 0; i < 4; ++i) h.record_read(MiB, 512);
  h.decay_tick(100.0);
  h.decay_tick(110.0);  // one half-life
  auto d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(4));
  CHECK(d[0].write_bytes == Approx(4 * 4096));
  CHECK(d[1].reads == Approx(2));
  CHECK(d[1].read_bytes == Approx(2 * 512));

  h.decay_tick(130.0);  // two more half-lives
  d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(1));
  CHECK(d[1].reads == Approx(0.5));

  h.decay_tick(135.0);  // half a half-life
  d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(1 / std::sqrt(2.0)));

  // The cumulative counters never decay.
  CHECK(h.cumulative(0).writes == 8);
  CHECK(h.cumulative(1).reads == 4);
}

TEST_CASE("counts since the last tick are added undecayed") {
  HeatMap h(geometry(2 * MiB), 10);
  for (int i = 0; i < 8; ++i) h.record_write(0, 4096);
  h.decay_tick(0.0);
  for (int i = 0; i < 3; ++i) h.record_write(0, 4096);
  h.record_read(MiB, 100);
  h.decay_tick(10.0);  // old 8 halve to 4; the new 3 come in whole
  auto d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(4 + 3));
  CHECK(d[0].write_bytes == Approx((4 + 3) * 4096.0));
  CHECK(d[1].reads == Approx(1));
  CHECK(d[1].read_bytes == Approx(100));

  // A tick at the same time decays nothing and adds only what is new.
  h.record_write(0, 4096);
  h.decay_tick(10.0);
  d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(8));

  // A later tick with nothing new decays from the last tick's time.
  h.decay_tick(20.0);
  d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(4));

  // A clock that goes backwards does not inflate the counts.
  h.decay_tick(15.0);
  d = h.decayed_snapshot();
  CHECK(d[0].writes == Approx(4));
}

TEST_CASE("decayed heat ranks recent activity above old activity") {
  HeatMap h(geometry(2 * MiB), 1);
  for (int i = 0; i < 100; ++i) h.record_write(0, 4096);  // old burst in segment 0
  h.decay_tick(0);
  for (int i = 0; i < 10; ++i) h.record_write(MiB, 4096);  // recent, in segment 1
  h.decay_tick(10);  // ten half-lives: 100 -> ~0.1
  auto ranked = rank_segments(h.decayed_snapshot(), HeatWeights{});
  CHECK(ranked[0].segment == 1);
  CHECK(ranked[1].segment == 0);
  // Cumulative heat still ranks the old burst first.
  CHECK(rank_segments(h.cumulative_snapshot(), HeatWeights{})[0].segment == 0);
}

TEST_CASE("a heat map of a zero-size image has no segments") {
  HeatMap h(geometry(0), 10);
  CHECK(h.segment_count() == 0);
  CHECK(h.cumulative_snapshot().empty());
  h.decay_tick(1);
  h.decay_tick(2);
  CHECK(h.decayed_snapshot().empty());
  h.record_write(0, 0);
}

TEST_CASE("concurrent record_write from several threads gives exact cumulative totals") {
  constexpr int kThreads = 4;
  constexpr int kOpsEach = 50000;
  const uint64_t image = 8 * MiB + 4096;
  auto g = geometry(image, 4096, MiB);
  HeatMap h(g, 10);

  // Each thread's requests, fixed in advance so a serial replay can check.
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> plans(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    std::mt19937_64 rng(1000 + t);
    for (int n = 0; n < kOpsEach; ++n) {
      uint64_t len = 1 + rng() % (3 * MiB / 2);
      uint64_t off = rng() % (image - len + 1);
      plans[t].push_back({off, len});
    }
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (auto [off, len] : plans[t]) {
        h.record_write(off, len);
        h.record_read(off, 1);
      }
    });
  // A tick running alongside must not disturb the cumulative counters.
  std::thread ticker([&] {
    for (int i = 0; i < 200; ++i) h.decay_tick(i * 0.01);
  });
  for (auto& th : threads) th.join();
  ticker.join();

  // Expected per-segment totals, computed without HeatMap.
  std::vector<uint64_t> ops(g.segment_count()), bytes(g.segment_count()), reads(g.segment_count());
  uint64_t total_len = 0;
  for (const auto& plan : plans)
    for (auto [off, len] : plan) {
      total_len += len;
      reads[off / MiB] += 1;
      for (uint64_t s = off / MiB; s <= (off + len - 1) / MiB; ++s) {
        uint64_t lo = std::max(off, s * MiB), hi = std::min(off + len, (s + 1) * MiB);
        ops[s] += 1;
        bytes[s] += hi - lo;
      }
    }
  auto snap = h.cumulative_snapshot();
  REQUIRE(snap.size() == g.segment_count());
  double sum_bytes = 0, sum_reads = 0;
  for (uint64_t s = 0; s < g.segment_count(); ++s) {
    INFO("segment " << s);
    CHECK(snap[s].writes == double(ops[s]));
    CHECK(snap[s].write_bytes == double(bytes[s]));
    CHECK(snap[s].reads == double(reads[s]));
    CHECK(snap[s].read_bytes == double(reads[s]));
    sum_bytes += snap[s].write_bytes;
    sum_reads += snap[s].reads;
  }
  CHECK(sum_bytes == double(total_len));
  CHECK(sum_reads == double(kThreads * kOpsEach));

  // After the writers stop, one more tick brings the decayed view up to date:
  // with no time passing, it holds at most the cumulative totals.
  h.decay_tick(2.0);
  auto d = h.decayed_snapshot();
  for (uint64_t s = 0; s < g.segment_count(); ++s) CHECK(d[s].writes <= snap[s].writes + 1e-6);
}
