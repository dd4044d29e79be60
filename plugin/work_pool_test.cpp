#include "plugin/work_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <stdexcept>

#include <catch2/catch.hpp>

#include "common/thread_nice.h"

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

TEST_CASE("work pool: jobs run at the nice value set for the pool, changed between jobs") {
  // Only ever lower the priority (a higher value): raising it needs a privilege.
  const int caller = this_thread_nice();
  const int first = std::min(caller + 3, kMaxMigrationNice);
  const int second = std::min(first + 2, kMaxMigrationNice);
  WorkPool pool("test", 2, 8);
  pool.set_nice(first);
  pool.start();
  auto nice_of_a_job = [&pool] {
    auto seen = std::make_shared<std::promise<int>>();
    REQUIRE(pool.try_post([seen] { seen->set_value(this_thread_nice()); }));
    return seen->get_future().get();
  };
  CHECK(nice_of_a_job() == first);
  pool.set_nice(second);
  for (int i = 0; i < 4; ++i) CHECK(nice_of_a_job() == second);  // whichever thread runs it
  CHECK(this_thread_nice() == caller);  // the caller's own is unchanged
  pool.stop();
}
