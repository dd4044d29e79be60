#include "plugin/engine_stats.h"

#include <catch2/catch.hpp>

using namespace livemig;

TEST_CASE("latency histogram: percentiles within a bucket's width, memory fixed") {
  LatencyHistogram h;
  CHECK(h.summary().is_null());
  for (int i = 1; i <= 1000; ++i) h.add(i * 0.1);  // 0.1 .. 100 ms
  auto s = h.summary();
  CHECK(s["count"] == 1000);
  CHECK(s["mean"].get<double>() == Approx(50.05).epsilon(0.001));
  CHECK(s["p50"].get<double>() >= 50.0);
  CHECK(s["p50"].get<double>() <= 50.0 * 1.2);
  CHECK(s["p99"].get<double>() >= 99.0);
  CHECK(s["p99"].get<double>() <= 100.0);  // never above the max seen
  CHECK(s["max"].get<double>() == Approx(100.0));
  for (int i = 0; i < 1'000'000; ++i) h.add(1.0);  // a million samples cost no memory
  CHECK(h.count() == 1'001'000);
  h.reset();
  CHECK(h.summary().is_null());
}
