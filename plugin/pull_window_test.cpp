#include "plugin/pull_window.h"

#include <algorithm>
#include <map>

#include <catch2/catch.hpp>

using livemig::PullWindow;
using namespace std::chrono_literals;

namespace {
constexpr uint64_t MiB = 1 << 20;

// A link of `rate` bytes/s and round trip `rtt`, and a puller that keeps
// window() in flight in 1 MiB pulls, asking the next as each is answered
// (a pull leaves after half a round trip, waits for the link, arrives half
// a round trip later). Returns the window after `duration`.
uint64_t simulate(PullWindow& w, double rate, std::chrono::milliseconds rtt, std::chrono::seconds duration) {
  using Clock = PullWindow::Clock;
  const auto transfer = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(MiB / rate));
  auto now = Clock::time_point{} + 1h;
  const auto end = now + duration;
  auto link_free = now;
  std::multimap<Clock::time_point, Clock::time_point> answers;  // arrival -> asked
  uint64_t in_flight = 0;
  auto ask = [&] {
    while (in_flight < w.bytes()) {
      link_free = std::max(link_free, now + rtt / 2) + transfer;
      answers.emplace(link_free + rtt / 2, now);
      in_flight += MiB;
    }
  };
  ask();
  while (now < end && !answers.empty()) {
    auto [arrived, asked] = *answers.begin();
    answers.erase(answers.begin());
    now = arrived;
    in_flight -= MiB;
    w.on_answer(MiB, asked, now);
    ask();
  }
  return w.bytes();
}
}  // namespace

TEST_CASE("pull window: the floor until anything is measured") {
  PullWindow w(2 * MiB, 64 * MiB);
  CHECK(w.bytes() == 2 * MiB);
  CHECK(w.rtt_seconds() == 0);
}

TEST_CASE("pull window: grows to the bandwidth-delay product of a long fat link, within the cap") {
  const double rate = 125e6;  // 1 Gbit/s
  PullWindow lan(MiB, 64 * MiB), wan(MiB, 64 * MiB), far(MiB, 16 * MiB);
  const uint64_t at_lan = simulate(lan, rate, 1ms, 5s);
  const uint64_t at_wan = simulate(wan, rate, 100ms, 20s);
  const uint64_t at_far = simulate(far, rate, 200ms, 20s);
  INFO("lan " << at_lan << " wan " << at_wan << " rtt " << wan.rtt_seconds() << " rate " << wan.rate());
  CHECK(at_lan >= MiB);                        // 125 KB of BDP: a unit and a half,
  CHECK(at_lan <= 2 * MiB);                    // the unit's own transfer time counted
  CHECK(wan.rtt_seconds() == Approx(0.1).margin(0.01));
  CHECK(at_wan >= uint64_t(1.0 * rate * 0.1));  // the link is full ...
  CHECK(at_wan <= uint64_t(1.6 * rate * wan.rtt_seconds()));  // ... with at most half a round trip more
  CHECK(at_far == 16 * MiB);                   // the cap
}
