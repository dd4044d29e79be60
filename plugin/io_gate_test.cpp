#include "plugin/io_gate.h"

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

using namespace livemig;
using namespace std::chrono_literals;

TEST_CASE("io gate: a request runs under the mode it entered with") {
  IoGate gate;
  gate.set_mode(IoMode::SourceTracking);
  GatePass pass(gate);
  gate.set_mode(IoMode::SourceHandover);
  CHECK(pass.mode() == IoMode::SourceTracking);
  GatePass later(gate);
  CHECK(later.mode() == IoMode::SourceHandover);
}

TEST_CASE("io gate: drain waits for a request that entered under the old mode") {
  IoGate gate;
  gate.set_mode(IoMode::SourceTracking);
  auto ticket = gate.enter();
  gate.set_mode(IoMode::SourceHandover);
  auto drained = std::async(std::launch::async, [&] { gate.drain(); });
  CHECK(drained.wait_for(100ms) == std::future_status::timeout);
  gate.leave(ticket);
  CHECK(drained.wait_for(5s) == std::future_status::ready);
}

TEST_CASE("io gate: a request that enters while drain waits does not hold it up") {
  IoGate gate;
  gate.set_mode(IoMode::SourceTracking);
  auto before = gate.enter();
  gate.set_mode(IoMode::SourceHandover);
  auto drained = std::async(std::launch::async, [&] { gate.drain(); });
  std::this_thread::sleep_for(50ms);
  auto during = gate.enter();  // held for the rest of the test
  CHECK(during.mode == IoMode::SourceHandover);
  gate.leave(before);
  CHECK(drained.wait_for(5s) == std::future_status::ready);
  gate.leave(during);
}

// The fence's promise: once drain() returns, no request that read the old
// mode is still in the gate, whatever the interleaving.
TEST_CASE("io gate: under load, no request of the old mode outlives drain") {
  IoGate gate;
  gate.set_mode(IoMode::SourceTracking);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> old_mode_inside{0};
  std::vector<std::thread> requests;
  for (int t = 0; t < 4; ++t)
    requests.emplace_back([&] {
      while (!stop) {
        GatePass pass(gate);
        if (pass.mode() == IoMode::SourceTracking) {
          old_mode_inside.fetch_add(1);
          std::this_thread::yield();
          old_mode_inside.fetch_sub(1);
        }
      }
    });
  for (int round = 0; round < 200; ++round) {
    gate.set_mode(round % 2 ? IoMode::SourceTracking : IoMode::SourceHandover);
    gate.drain();
    if (round % 2 == 0) REQUIRE(old_mode_inside.load() == 0);
  }
  stop = true;
  for (auto& t : requests) t.join();
  CHECK(gate.in_flight() == 0);
}
