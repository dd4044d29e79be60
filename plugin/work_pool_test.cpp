#include "plugin/work_pool.h"

#include <atomic>
#include <chrono>
#include <future>
#include <stdexcept>

#include <catch2/catch.hpp>

using namespace livemig;
using namespace std::chrono_literals;

TEST_CASE("work pool: a full queue refuses the job instead of growing") {
  WorkPool pool("test", 1, 2);
  std::promise<void> release;
  auto gate = release.get_future().share();
  pool.start();
  std::atomic<int> ran{0};
  REQUIRE(pool.try_post([&, gate] { gate.wait(); ran++; }));
  while (pool.running() == 0) std::this_thread::sleep_for(1ms);
  CHECK(pool.try_post([&] { ran++; }));
  CHECK(pool.try_post([&] { ran++; }));
  CHECK_FALSE(pool.try_post([&] { ran++; }));  // 1 running + 2 queued: full
  release.set_value();
  pool.stop();
  CHECK(ran == 3);
}

TEST_CASE("work pool: no thread runs before start, and queued jobs run at stop") {
  WorkPool pool("test", 2, 8);
  std::atomic<int> ran{0};
  REQUIRE(pool.try_post([&] { ran++; }));
  std::this_thread::sleep_for(50ms);
  CHECK(ran == 0);
  pool.start();
  pool.stop();
  CHECK(ran == 1);
  CHECK_FALSE(pool.try_post([&] { ran++; }));
}

TEST_CASE("work pool: a job that throws does not end the pool") {
  WorkPool pool("test", 1, 8);
  pool.start();
  std::atomic<int> ran{0};
  REQUIRE(pool.try_post([] { throw std::runtime_error("boom"); }));
  REQUIRE(pool.try_post([&] { ran++; }));
  pool.stop();
  CHECK(ran == 1);
}
