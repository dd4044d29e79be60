#include "common/migration_policy.h"

#include <catch2/catch.hpp>

#include <limits>

#include "common/transfer_planner.h"

using namespace livemig;

namespace {
std::vector<HeatCounts> heat_of(std::initializer_list<std::pair<double, double>> rw) {
  std::vector<HeatCounts> h;
  for (auto [r, w] : rw) h.push_back({r, w, r * 4096, w * 4096});
  return h;
}
}  // namespace

namespace {
PolicyParams params(MigrationMode mode, double threshold = 0) {
  PolicyParams p;
  p.mode = mode;
  p.threshold = threshold;
  return p;
}
}  // namespace

TEST_CASE("livefs pushes exactly the segments scoring at or above the threshold", "[policy]") {
  PolicyParams p{MigrationMode::Livefs, 5, {}, 0};
  auto heat = heat_of({{0, 0}, {20, 0}, {0, 20}, {10, 9}, {10, 10}});
  auto set = initial_send_set(p, heat);
  // f = (0.5 r + 0.5 w) / 2
  CHECK_FALSE(set[0].push);  // f = 0
  CHECK(set[1].push);        // f = 5
  CHECK(set[2].push);        // f = 5
  CHECK_FALSE(set[3].push);  // f = 4.75
  CHECK(set[4].push);        // f = 5
  CHECK(set[1].reason == SetReason::ScoreAbove);
  CHECK(set[3].reason == SetReason::ScoreBelow);
}

TEST_CASE("livefs with threshold 0 pushes everything, like precopy", "[policy]") {
  PolicyParams livefs{MigrationMode::Livefs, 0, {}, 0};
  PolicyParams precopy = params(MigrationMode::Precopy);
  auto heat = heat_of({{0, 0}, {5, 1}, {0, 0}});
  auto a = initial_send_set(livefs, heat), b = initial_send_set(precopy, heat);
  for (size_t s = 0; s < heat.size(); ++s) CHECK(a[s].push == b[s].push);
}

TEST_CASE("livefs with threshold infinity pushes nothing, like postcopy", "[policy]") {
  PolicyParams livefs{MigrationMode::Livefs, std::numeric_limits<double>::infinity(), {}, 0};
  PolicyParams postcopy = params(MigrationMode::Postcopy);
  auto heat = heat_of({{1e9, 1e9}, {5, 1}, {0, 0}});
  auto a = initial_send_set(livefs, heat), b = initial_send_set(postcopy, heat);
  for (size_t s = 0; s < heat.size(); ++s) {
    CHECK_FALSE(a[s].push);
    CHECK(a[s].push == b[s].push);
  }
}

TEST_CASE("the weights decide whether read-hot or write-hot segments are pushed", "[policy]") {
  auto heat = heat_of({{40, 0}, {0, 40}});
  // f = 20 for the weighted kind, 0 for the other.
  PolicyParams reads{MigrationMode::Livefs, 15, HeatWeights::make(1, 0).value(), 0};
  PolicyParams writes{MigrationMode::Livefs, 15, HeatWeights::make(0, 1).value(), 0};
  auto r = initial_send_set(reads, heat), w = initial_send_set(writes, heat);
  CHECK((r[0].push && !r[1].push));
  CHECK((!w[0].push && w[1].push));
}

namespace {
std::vector<SegmentLoad> writes_of(std::vector<double> writes, double bytes_per_s = 0) {
  std::vector<SegmentLoad> out;
  for (double w : writes) out.push_back({w, bytes_per_s});
  return out;
}
constexpr uint64_t kSeg = 1 << 20;
}  // namespace

TEST_CASE("hybrid stops pushing a segment once it was written threshold times", "[policy]") {
  PolicyParams p = params(MigrationMode::Hybrid, 3);
  auto set = initial_send_set(p, heat_of({{0, 0}, {0, 0}, {0, 0}}));
  std::vector<unsigned> resends;
  auto load = writes_of({0, 2, 3});
  std::vector<uint64_t> redirtied = {0, 2, 3};
  update_send_set(p, set, load, redirtied, resends, kSeg, 1);
  CHECK(set[0].push);
  CHECK(set[1].push);
  CHECK_FALSE(set[2].push);
  CHECK(set[2].reason == SetReason::WrittenTooOften);
  load[1].writes_since_start = 5;
  update_send_set(p, set, load, redirtied, resends, kSeg, 1);
  CHECK_FALSE(set[1].push);
}

TEST_CASE("hybrid skips a segment that reached the threshold just before its push", "[policy]") {
  PolicyParams p = params(MigrationMode::Hybrid, 4);
  CHECK_FALSE(defer_before_push(p, {3, 1e9}, kSeg, 10));
  auto why = defer_before_push(p, {4, 0}, kSeg, 0);
  REQUIRE(why);
  CHECK(*why == SetReason::WrittenTooOften);
}

TEST_CASE("hybrid and auto push the least written segments first; precopy and livefs in offset order",
          "[policy]") {
  std::vector<SegmentLoad> load = {{9, 0}, {0, 5e6}, {0, 0}, {2, 0}, {0, 0}};
  CHECK(push_order(params(MigrationMode::Hybrid), load) == std::vector<uint64_t>{2, 4, 1, 3, 0});
  CHECK(push_order(params(MigrationMode::Auto), load) == std::vector<uint64_t>{2, 4, 1, 3, 0});
  CHECK(push_order(params(MigrationMode::Precopy), load) == std::vector<uint64_t>{0, 1, 2, 3, 4});
  CHECK(push_order(params(MigrationMode::Livefs), load) == std::vector<uint64_t>{0, 1, 2, 3, 4});
}

TEST_CASE("auto defers a segment that would be re-written before handover, pushes one that stays clean",
          "[policy]") {
  PolicyParams p = params(MigrationMode::Auto);
  // 1 MiB/s into a 1 MiB segment: within 2 s of handover it is re-written
  // over twice; within 10 ms only 1% of it is.
  auto why = defer_before_push(p, {0, 1 << 20}, kSeg, 2);
  REQUIRE(why);
  CHECK(*why == SetReason::Rewritten);
  CHECK_FALSE(defer_before_push(p, {0, 1 << 20}, kSeg, 0.01));
  // Never written: pushed however long the rest takes.
  CHECK_FALSE(defer_before_push(p, {0, 0}, kSeg, 1e6));
  // The boundary is kAutoRewriteShare of the segment.
  CHECK(defer_before_push(p, {0, kAutoRewriteShare * kSeg}, kSeg, 1.0));
  CHECK_FALSE(defer_before_push(p, {0, kAutoRewriteShare * kSeg * 0.99}, kSeg, 1.0));
  // Other modes never defer on rate.
  CHECK_FALSE(defer_before_push(params(MigrationMode::Precopy), {100, 1e12}, kSeg, 10));
  CHECK_FALSE(defer_before_push(params(MigrationMode::Livefs), {100, 1e12}, kSeg, 10));
}

TEST_CASE("auto stops pushing when the guest writes at least as fast as the pushes drain", "[policy]") {
  PolicyParams p = params(MigrationMode::Auto);
  CHECK(guest_outwrites_pushes(p, 100e6, 100e6));
  CHECK(guest_outwrites_pushes(p, 300e6, 100e6));
  CHECK_FALSE(guest_outwrites_pushes(p, 99e6, 100e6));
  CHECK_FALSE(guest_outwrites_pushes(p, 0, 0));  // nothing measured yet
  for (auto m : {MigrationMode::Precopy, MigrationMode::Livefs, MigrationMode::Hybrid, MigrationMode::Postcopy})
    CHECK_FALSE(guest_outwrites_pushes(params(m), 1e12, 1));
}

TEST_CASE("auto resends a re-dirtied segment that will stay clean, defers one that will not", "[policy]") {
  PolicyParams p = params(MigrationMode::Auto);
  auto set = initial_send_set(p, heat_of({{0, 0}, {0, 0}, {0, 0}}));
  std::vector<unsigned> resends;
  std::vector<SegmentLoad> load = {{0, 0}, {1, 1000}, {500, 50e6}};
  std::vector<uint64_t> redirtied = {0, 1, 200};
  update_send_set(p, set, load, redirtied, resends, kSeg, 0.5);
  CHECK(set[0].push);  // never re-written: stays
  CHECK(set[1].push);  // 500 bytes expected before handover: resend
  CHECK_FALSE(set[2].push);
  CHECK(set[2].reason == SetReason::Rewritten);
}

TEST_CASE("auto defers a segment re-written in more than max_resends rounds", "[policy]") {
  PolicyParams p = params(MigrationMode::Auto);
  p.max_resends = 2;
  auto set = initial_send_set(p, heat_of({{0, 0}}));
  std::vector<unsigned> resends;
  auto load = writes_of({10}, 100);
  std::vector<uint64_t> redirtied = {1};
  update_send_set(p, set, load, redirtied, resends, kSeg, 0.1);
  update_send_set(p, set, load, redirtied, resends, kSeg, 0.1);
  CHECK(set[0].push);
  update_send_set(p, set, load, redirtied, resends, kSeg, 0.1);
  CHECK_FALSE(set[0].push);
}

TEST_CASE("after handover livefs fetches by score, hybrid by write count, auto the least written first, precopy by offset", "[policy]") {
  auto heat = heat_of({{1, 0}, {50, 0}, {0, 9}});
  std::vector<double> writes = {7, 0, 9};
  CHECK(fetch_order(fetch_priority(params(MigrationMode::Livefs), heat, writes)) == std::vector<uint64_t>{1, 2, 0});
  CHECK(fetch_order(fetch_priority(params(MigrationMode::Hybrid), heat, writes)) == std::vector<uint64_t>{2, 0, 1});
  CHECK(fetch_order(fetch_priority(params(MigrationMode::Auto), heat, writes)) == std::vector<uint64_t>{1, 0, 2});
  CHECK(fetch_order(fetch_priority(params(MigrationMode::Precopy), heat, writes)) == std::vector<uint64_t>{0, 1, 2});
  CHECK(fetch_order(fetch_priority(params(MigrationMode::Postcopy), heat, writes)) == std::vector<uint64_t>{0, 1, 2});
}

TEST_CASE("an unknown mode is rejected with the list of modes", "[policy]") {
  auto m = parse_mode("turbo");
  REQUIRE_FALSE(m.is_ok());
  CHECK(m.status().message().find("livefs") != std::string::npos);
  CHECK(parse_mode("hybrid").value() == MigrationMode::Hybrid);
}
