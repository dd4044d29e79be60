#include "server/scheduler.h"

#include <map>
#include <random>

#include <catch2/catch.hpp>
#include <fmt/format.h>

using namespace livemig::daemon;

namespace {

TaskSlot slot(int64_t id, const std::string& src, const std::string& dst, uint64_t max_rate = 0, uint64_t cap = 0,
              int priority = 0) {
  return {id, src, dst, max_rate, cap, priority};
}

constexpr uint64_t M = 1u << 20;

}  // namespace

namespace {

PluginView view(bool up, std::string phase, std::string role, std::string id, std::string peer, bool fenced,
                std::string last_error) {
  PluginView v;
  v.up = up;
  v.phase = std::move(phase);
  v.role = std::move(role);
  v.migration_id = std::move(id);
  v.peer = std::move(peer);
  v.fenced = fenced;
  v.last_error = std::move(last_error);
  return v;
}

}  // namespace

TEST_CASE("scheduler: never more than max-concurrent run, and starts follow FIFO order") {
  std::vector<TaskSlot> queued = {slot(1, "a", "b"), slot(2, "c", "d"), slot(3, "e", "f")};
  auto plan = plan_starts({}, queued, {2, 0});
  REQUIRE(plan.start.size() == 2);
  CHECK(plan.start[0].id == 1);
  CHECK(plan.start[1].id == 2);
  CHECK(plan.waiting_id == 3);
  CHECK(plan.waiting.find("max-concurrent 2") != std::string::npos);

  // Two running: nothing starts.
  auto full = plan_starts({slot(1, "a", "b"), slot(2, "c", "d")}, {slot(3, "e", "f")}, {2, 0});
  CHECK(full.start.empty());
  CHECK(full.waiting_id == 3);

  // One ends: the next in line starts, not a later one.
  auto next = plan_starts({slot(2, "c", "d")}, {slot(3, "e", "f"), slot(4, "g", "h")}, {2, 0});
  REQUIRE(next.start.size() == 1);
  CHECK(next.start[0].id == 3);

  // Without a bandwidth limit the submitter's own cap is passed on as it is.
  auto own = plan_starts({}, {slot(5, "a", "b", 7 * M)}, {1, 0});
  REQUIRE(own.start.size() == 1);
  CHECK(own.start[0].rate_cap == 7 * M);
}

TEST_CASE("scheduler: a lone task gets the whole host bandwidth") {
  auto plan = plan_starts({}, {slot(1, "a", "b")}, {4, 100 * M});
  REQUIRE(plan.start.size() == 1);
  CHECK(plan.start[0].rate_cap == 100 * M);
}

TEST_CASE("scheduler: tasks starting together on a host split its bandwidth and never exceed it") {
  std::vector<TaskSlot> queued = {slot(1, "a", "b"), slot(2, "a", "c"), slot(3, "a", "d")};
  auto plan = plan_starts({}, queued, {2, 100 * M});
  REQUIRE(plan.start.size() == 2);
  CHECK(plan.start[0].rate_cap == 50 * M);
  CHECK(plan.start[1].rate_cap == 50 * M);
  CHECK(plan.start[0].rate_cap + plan.start[1].rate_cap <= 100 * M);

  // Three slots, three tasks on host a: a third each.
  auto three = plan_starts({}, queued, {3, 99 * M});
  REQUIRE(three.start.size() == 3);
  uint64_t sum = 0;
  for (auto& d : three.start) {
    CHECK(d.rate_cap == 33 * M);
    sum += d.rate_cap;
  }
  CHECK(sum <= 99 * M);
}

TEST_CASE("scheduler: a task's cap is the smaller share of its two hosts and of its own max_rate") {
  // Host b carries a running task (75 of 100): the new a->b task and it
  // share b, 50 each, and the running one is lowered to 50 first.
  auto plan = plan_starts({slot(1, "c", "b", 0, 75 * M)}, {slot(2, "a", "b")}, {4, 100 * M});
  REQUIRE(plan.start.size() == 1);
  CHECK(plan.start[0].rate_cap == 50 * M);
  REQUIRE(plan.rerate.size() == 1);
  CHECK(plan.rerate[0].id == 1);
  CHECK(plan.rerate[0].rate_cap == 50 * M);
  // Its own max_rate is lower still: the running task gets the rest of b.
  auto own = plan_starts({slot(1, "c", "b", 0, 75 * M)}, {slot(2, "a", "b", 10 * M)}, {4, 100 * M});
  REQUIRE(own.start.size() == 1);
  CHECK(own.start[0].rate_cap == 10 * M);
  REQUIRE(own.rerate.size() == 1);
  CHECK(own.rerate[0].rate_cap == 90 * M);
  // Disjoint hosts do not share: nothing running changes.
  auto other = plan_starts({slot(1, "c", "d", 0, 100 * M)}, {slot(2, "a", "b")}, {4, 100 * M});
  REQUIRE(other.start.size() == 1);
  CHECK(other.start[0].rate_cap == 100 * M);
  CHECK(other.rerate.empty());
}

TEST_CASE("scheduler: shares follow the running set: what one task cannot use goes to the others, and an ended task's share too") {
  // a->b and a->c share a; b is also carried by x->b: a->b is held to 50 on
  // b, and a->c takes the other 50 of a.
  auto caps = share_bandwidth({slot(1, "a", "b"), slot(2, "a", "c"), slot(3, "x", "b")}, 100 * M);
  CHECK(caps[1] == 50 * M);
  CHECK(caps[2] == 50 * M);
  CHECK(caps[3] == 50 * M);
  // a->b held to 20 by its own max_rate: a->c gets 80, not 50.
  auto held = share_bandwidth({slot(1, "a", "b", 20 * M), slot(2, "a", "c")}, 100 * M);
  CHECK(held[1] == 20 * M);
  CHECK(held[2] == 80 * M);
  // One of three ends: the two left get half each, and plan_starts says to raise them.
  auto plan = plan_starts({slot(2, "a", "c", 0, 30 * M), slot(3, "a", "d", 0, 30 * M)}, {}, {3, 90 * M});
  REQUIRE(plan.rerate.size() == 2);
  CHECK(plan.rerate[0].rate_cap == 45 * M);
  CHECK(plan.rerate[1].rate_cap == 45 * M);
  // Weighted: priority 2 (weight 3) against a normal task.
  auto weighted = share_bandwidth({slot(1, "a", "b", 0, 0, 2), slot(2, "a", "c")}, 100 * M);
  CHECK(weighted[1] == 75 * M);
  CHECK(weighted[2] == 25 * M);
  // A task started before the limit was set (no cap) is given one.
  auto uncapped = plan_starts({slot(1, "a", "b", 0, 0)}, {}, {4, 100 * M});
  REQUIRE(uncapped.rerate.size() == 1);
  CHECK(uncapped.rerate[0].rate_cap == 100 * M);
  // Random sets never take a host over its limit nor leave a task without a cap.
  std::mt19937 rng(7);
  for (int round = 0; round < 200; ++round) {
    std::vector<TaskSlot> tasks;
    int n = 1 + int(rng() % 40);
    for (int i = 0; i < n; ++i)
      tasks.push_back(slot(i, fmt::format("h{}", rng() % 5), fmt::format("h{}", 5 + rng() % 5),
                           rng() % 3 ? 0 : (1 + rng() % 50) * M, 0, int(rng() % 10)));
    const uint64_t L = (1 + rng() % 200) * M;
    auto c = share_bandwidth(tasks, L);
    std::map<std::string, uint64_t> used;
    for (const TaskSlot& t : tasks) {
      REQUIRE(c[t.id] > 0);
      if (t.max_rate) REQUIRE(c[t.id] <= t.max_rate);
      used[t.source_host] += c[t.id];
      used[t.destination_host] += c[t.id];
    }
    for (auto& [h, u] : used) REQUIRE(u <= L);
  }
}

TEST_CASE("scheduler: a task waits when its share of a host would be too thin, and so does everything behind it") {
  // Three urgent tasks (weight 10 each) run on a; a normal one would get
  // 1/31 of it, less than L / (4 x max-concurrent 4).
  auto plan = plan_starts({slot(1, "a", "b", 0, 33 * M, 9), slot(2, "a", "c", 0, 33 * M, 9),
                           slot(3, "a", "d", 0, 33 * M, 9)},
                          {slot(4, "a", "e"), slot(5, "x", "y")}, {4, 100 * M});
  CHECK(plan.start.empty());
  CHECK(plan.waiting_id == 4);
  CHECK(plan.waiting.find("bandwidth on host a") != std::string::npos);
  // A normal task beside one running normal task shares: it starts.
  auto shared = plan_starts({slot(1, "a", "b", 0, 100 * M)}, {slot(2, "a", "c"), slot(3, "x", "y")}, {4, 100 * M});
  CHECK(shared.start.size() == 2);
}

TEST_CASE("scheduler: 30 tasks at once (issue #15) all start together with equal shares of the link") {
  // 30 pairs between two hosts, as in tests/bench/many; 1 Gbit/s.
  const uint64_t L = 125'000'000;
  std::vector<TaskSlot> queued;
  for (int i = 1; i <= 30; ++i) queued.push_back(slot(i, "src", "dst"));
  auto plan = plan_starts({}, queued, {30, L});
  REQUIRE(plan.start.size() == 30);
  CHECK(plan.waiting_id == 0);
  uint64_t sum = 0;
  for (auto& d : plan.start) {
    CHECK(d.rate_cap >= L / 30);  // equal but for the rounding of L / 30
    CHECK(d.rate_cap <= L / 30 + 1);
    sum += d.rate_cap;
  }
  CHECK(sum <= L);
  // Ten more than max-concurrent: 30 start, the 31st waits for a slot.
  for (int i = 31; i <= 40; ++i) queued.push_back(slot(i, "src", "dst"));
  auto more = plan_starts({}, queued, {30, L});
  CHECK(more.start.size() == 30);
  CHECK(more.waiting_id == 31);
  // No cap on max-concurrent but the operator's: 2000 at once start.
  std::vector<TaskSlot> lots;
  for (int i = 1; i <= 2000; ++i) lots.push_back(slot(i, fmt::format("s{}", i % 50), fmt::format("d{}", i % 70)));
  CHECK(plan_starts({}, lots, {5000, 0}).start.size() == 2000);
}

TEST_CASE("scheduler: a task the operator marks urgent starts before earlier ones, FIFO within a priority") {
  std::vector<TaskSlot> queued = {slot(1, "a", "b"), slot(2, "c", "d"), slot(3, "e", "f", 0, 0, 1),
                                  slot(4, "g", "h", 0, 0, 5), slot(5, "i", "j", 0, 0, 1)};
  auto plan = plan_starts({}, queued, {3, 0});
  REQUIRE(plan.start.size() == 3);
  CHECK(plan.start[0].id == 4);
  CHECK(plan.start[1].id == 3);
  CHECK(plan.start[2].id == 5);
  CHECK(plan.waiting_id == 1);
  // Equal priorities: plain FIFO, as before.
  auto fifo = plan_starts({}, {slot(7, "a", "b", 0, 0, 2), slot(8, "c", "d", 0, 0, 2)}, {1, 0});
  REQUIRE(fifo.start.size() == 1);
  CHECK(fifo.start[0].id == 7);
}

TEST_CASE("scheduler: tasks starting together split a host's bandwidth by priority + 1") {
  // An urgent task (priority 1) and two normal ones on host a: weights 2, 1, 1.
  std::vector<TaskSlot> queued = {slot(1, "a", "b"), slot(2, "a", "c"), slot(3, "a", "d", 0, 0, 1)};
  auto plan = plan_starts({}, queued, {3, 100 * M});
  REQUIRE(plan.start.size() == 3);
  CHECK(plan.start[0].id == 3);
  CHECK(plan.start[0].rate_cap == 50 * M);
  CHECK(plan.start[1].rate_cap == 25 * M);
  CHECK(plan.start[2].rate_cap == 25 * M);
}

namespace {

// A running task whose plugin cannot take set-rate now.
TaskSlot pinned(TaskSlot t) {
  t.pinned = true;
  return t;
}

// Each running task's cap once `plan` is carried out, and each started one's.
std::map<int64_t, uint64_t> caps_after(const std::vector<TaskSlot>& running, const StartPlan& plan) {
  std::map<int64_t, uint64_t> caps;
  for (const TaskSlot& r : running) caps[r.id] = r.rate_cap;
  for (const StartDecision& d : plan.rerate) caps[d.id] = d.rate_cap;
  for (const StartDecision& d : plan.start) caps[d.id] = d.rate_cap;
  return caps;
}

}  // namespace

TEST_CASE("scheduler: a pinned task (its plugin cannot take set-rate) keeps its cap, the others share the rest") {
  // Unpinned, task 1 would fall to 50 so that task 2 starts with 50.
  auto free_plan = plan_starts({slot(1, "a", "b", 0, 60 * M)}, {slot(2, "a", "c")}, {2, 100 * M});
  REQUIRE(free_plan.rerate.size() == 1);
  CHECK(free_plan.rerate[0].rate_cap == 50 * M);
  // Pinned at 60, it is never changed: task 2 starts with the 40 left.
  auto plan = plan_starts({pinned(slot(1, "a", "b", 0, 60 * M))}, {slot(2, "a", "c")}, {2, 100 * M});
  CHECK(plan.rerate.empty());
  REQUIRE(plan.start.size() == 1);
  CHECK(plan.start[0].id == 2);
  CHECK(plan.start[0].rate_cap == 40 * M);
  CHECK(plan.waiting_id == 0);
  // The others running there share the rest; those that fall are in rerate
  // (lowered before the start), the pinned one is not.
  std::vector<TaskSlot> running = {pinned(slot(1, "a", "b", 0, 30 * M)), slot(2, "a", "c", 0, 70 * M)};
  auto shared = plan_starts(running, {slot(3, "a", "d")}, {3, 100 * M});
  REQUIRE(shared.start.size() == 1);
  CHECK(shared.start[0].rate_cap == 35 * M);
  REQUIRE(shared.rerate.size() == 1);
  CHECK(shared.rerate[0].id == 2);
  CHECK(shared.rerate[0].rate_cap == 35 * M);
  auto caps = caps_after(running, shared);
  CHECK(caps[1] == 30 * M);
  CHECK(caps[1] + caps[2] + caps[3] <= 100 * M);
  // A pinned task on another host leaves this one alone.
  auto apart = plan_starts({pinned(slot(1, "x", "y", 0, 100 * M))}, {slot(2, "a", "b")}, {2, 100 * M});
  REQUIRE(apart.start.size() == 1);
  CHECK(apart.start[0].rate_cap == 100 * M);
  // share_bandwidth itself: the pinned cap stays, even when a share would raise it.
  auto alone = share_bandwidth({pinned(slot(1, "a", "b", 0, 20 * M)), slot(2, "a", "c")}, 100 * M);
  CHECK(alone[1] == 20 * M);
  CHECK(alone[2] == 80 * M);
}

TEST_CASE("scheduler: a queued task starts beside a pinned one if its share of the remainder is big enough") {
  // The hung plugin's case (6M of 8M pinned, max-concurrent 2): the new task
  // starts with the 2M left, at least 8M / (4 x 2).
  auto hung = plan_starts({pinned(slot(1, "a", "b", 6 * M, 6 * M))}, {slot(2, "a", "c")}, {2, 8 * M});
  REQUIRE(hung.start.size() == 1);
  CHECK(hung.start[0].rate_cap == 2 * M);
  CHECK(hung.rerate.empty());
  // 90 of 100 pinned: 10 left is less than 100 / (4 x 2): it waits.
  auto thin = plan_starts({pinned(slot(1, "a", "b", 0, 90 * M))}, {slot(2, "a", "c")}, {2, 100 * M});
  CHECK(thin.start.empty());
  CHECK(thin.waiting_id == 2);
  CHECK(thin.waiting.find("bandwidth on host a") != std::string::npos);
  // 80 pinned: 20 left is enough.
  auto enough = plan_starts({pinned(slot(1, "a", "b", 0, 80 * M))}, {slot(2, "a", "c")}, {2, 100 * M});
  REQUIRE(enough.start.size() == 1);
  CHECK(enough.start[0].rate_cap == 20 * M);
  // A pinned task without a cap holds its hosts' whole limit.
  auto uncapped = plan_starts({pinned(slot(1, "a", "b", 0, 0))}, {slot(2, "a", "c"), slot(3, "x", "y")}, {3, 100 * M});
  CHECK(uncapped.start.empty());
  CHECK(uncapped.waiting_id == 2);
  CHECK(uncapped.rerate.empty());
}

TEST_CASE("scheduler: with pinned tasks a host's caps never add up to more than its limit") {
  // Running sets as an earlier plan left them (caps within the limit), some
  // pinned, some ended, new ones queued: pinned caps never change, and the
  // caps once the plan is carried out stay within the limit on every host.
  std::mt19937 rng(11);
  for (int round = 0; round < 300; ++round) {
    const uint64_t L = (1 + rng() % 200) * M;
    const unsigned m = 1 + rng() % 12;
    std::vector<TaskSlot> before;
    const int n = 1 + int(rng() % m);
    for (int i = 0; i < n; ++i)
      before.push_back(slot(i, fmt::format("h{}", rng() % 4), fmt::format("h{}", 4 + rng() % 4),
                            rng() % 3 ? 0 : (1 + rng() % 50) * M, 0, int(rng() % 3)));
    const auto earlier = share_bandwidth(before, L);
    std::vector<TaskSlot> running, queued;
    for (TaskSlot t : before) {
      if (rng() % 4 == 0) continue;  // ended
      t.rate_cap = earlier.at(t.id);
      t.pinned = rng() % 3 == 0;
      running.push_back(t);
    }
    for (int i = 0; i < 5; ++i)
      queued.push_back(slot(100 + i, fmt::format("h{}", rng() % 4), fmt::format("h{}", 4 + rng() % 4)));
    const auto plan = plan_starts(running, queued, {m, L});
    for (const StartDecision& d : plan.rerate)
      for (const TaskSlot& r : running)
        if (r.id == d.id) REQUIRE_FALSE(r.pinned);
    auto caps = caps_after(running, plan);
    std::map<std::string, uint64_t> used;
    std::vector<TaskSlot> all = running;
    for (const TaskSlot& q : queued)
      if (caps.count(q.id)) all.push_back(q);
    for (const TaskSlot& t : all) {
      REQUIRE(caps[t.id] > 0);
      used[t.source_host] += caps[t.id];
      used[t.destination_host] += caps[t.id];
    }
    for (auto& [h, u] : used) REQUIRE(u <= L);
  }
}

TEST_CASE("judge: before handover a source running our migration is left alone") {
  PluginView src = view(true, "PreCopy", "source", "m1", "10.0.0.2:1", false, "");
  PluginView dst = view(true, "PreCopy", "destination", "m1", "10.0.0.1:1", false, "");
  auto v = judge({"m1", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Wait);
  CHECK(v.note.empty());
  dst.up = false;
  v = judge({"m1", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Wait);
  CHECK(v.note.find("destination down") != std::string::npos);
}

TEST_CASE("judge: a failed receiver before handover restarts from pre-copy once it is back") {
  // The destination restarted: it abandoned the migration; the source failed it.
  PluginView src = view(true, "Failed", "none", "m1", "10.0.0.2:1", false, "connection to the destination lost");
  PluginView dst = view(true, "Failed", "destination", "m1", "10.0.0.1:1", true, "restarted during PreCopy");
  auto v = judge({"m1", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Start);
  CHECK(v.note.find("pre-copy") != std::string::npos);
  // Still down: wait.
  dst.up = false;
  CHECK(judge({"m1", "10.0.0.2:1", false}, src, dst).action == Action::Wait);
  // The destination has not noticed yet: wait.
  PluginView busy = view(true, "PreCopy", "destination", "m1", "10.0.0.1:1", false, "");
  CHECK(judge({"m1", "10.0.0.2:1", false}, src, busy).action == Action::Wait);
  // A restarted source (forgot the migration: Idle or Failed) restarts it too.
  PluginView idle = view(true, "Idle", "none", "", "", false, "");
  PluginView dst_failed = view(true, "Failed", "destination", "m1", "10.0.0.1:1", true, "");
  CHECK(judge({"m1", "10.0.0.2:1", false}, idle, dst_failed).action == Action::Start);
}

TEST_CASE("judge: after handover the daemon waits for Done whoever is down") {
  PluginView src = view(true, "PostCopy", "source", "m1", "10.0.0.2:1", true, "");
  PluginView dst = view(false, "", "", "", "", false, "");
  auto v = judge({"m1", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Wait);
  CHECK(v.note.find("resumes pulling") != std::string::npos);
  // A source that failed after handover stays fenced: still not a restart.
  PluginView failed_src = view(true, "Failed", "source", "m1", "10.0.0.2:1", true, "x");
  CHECK(judge({"m1", "10.0.0.2:1", false}, failed_src, dst).action == Action::Wait);
  // Source down, destination pulling.
  PluginView down = view(false, "", "", "", "", false, "");
  PluginView pulling = view(true, "PostCopy", "destination", "m1", "10.0.0.1:1", false, "");
  CHECK(judge({"m1", "10.0.0.2:1", false}, down, pulling).action == Action::Wait);
  // Either side Done: done.
  PluginView done = view(true, "Done", "destination", "m1", "10.0.0.1:1", false, "");
  CHECK(judge({"m1", "10.0.0.2:1", false}, down, done).action == Action::Done);
  PluginView src_done = view(true, "Done", "source", "m1", "10.0.0.2:1", true, "");
  CHECK(judge({"m1", "10.0.0.2:1", false}, src_done, down).action == Action::Done);
  // Cancel after handover is not carried out.
  CHECK(judge({"m1", "10.0.0.2:1", true}, src, pulling).action == Action::Wait);
}

TEST_CASE("judge: an unresolved handover is reported with the command that ends it, never a restart") {
  PluginView src = view(true, "Handover", "source", "m1", "10.0.0.2:1", true, "");
  src.needs_resolution = "handover 1 unanswered: link closed";
  src.resolution_command = "migrate-nbd resolve --abort --from 10.0.0.1:1";
  PluginView dst = view(false, "", "", "", "", false, "");
  auto v = judge({"m1", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Wait);
  CHECK(v.note.find("NEEDS RESOLUTION: handover 1 unanswered") != std::string::npos);
  CHECK(v.note.find("migrate-nbd resolve --abort --from 10.0.0.1:1") != std::string::npos);
  // A cancel asked for meanwhile is not carried out (it may have committed).
  CHECK(judge({"m1", "10.0.0.2:1", true}, src, dst).action == Action::Wait);
}

TEST_CASE("judge: a migrate whose answer was lost is adopted, not issued twice") {
  PluginView src = view(true, "PreCopy", "source", "m7", "10.0.0.2:1", false, "");
  PluginView dst = view(true, "PreCopy", "destination", "m7", "10.0.0.1:1", false, "");
  auto v = judge({"", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Adopt);
  CHECK(v.adopt_id == "m7");
  // Busy with someone else's migration: wait rather than start.
  PluginView other = view(true, "PreCopy", "source", "m8", "10.0.0.5:1", false, "");
  CHECK(judge({"", "10.0.0.2:1", false}, other, dst).action == Action::Wait);
  // Idle: start.
  PluginView idle = view(true, "Idle", "none", "", "", false, "");
  CHECK(judge({"", "10.0.0.2:1", false}, idle, dst).action == Action::Start);
}

TEST_CASE("judge: cancel before handover is carried out at the source") {
  PluginView src = view(true, "Sync", "source", "m1", "10.0.0.2:1", false, "");
  PluginView dst = view(true, "PreCopy", "destination", "m1", "10.0.0.1:1", false, "");
  CHECK(judge({"m1", "10.0.0.2:1", true}, src, dst).action == Action::Cancel);
  PluginView cancelled = view(true, "Cancelled", "none", "m1", "10.0.0.2:1", false, "");
  CHECK(judge({"m1", "10.0.0.2:1", false}, cancelled, dst).action == Action::Cancelled);
}

TEST_CASE("judge: a source busy with another migration fails the task") {
  PluginView src = view(true, "PreCopy", "source", "m9", "10.0.0.7:1", false, "");
  PluginView dst = view(true, "Idle", "none", "", "", false, "");
  auto v = judge({"m1", "10.0.0.2:1", false}, src, dst);
  CHECK(v.action == Action::Failed);
  CHECK(v.note.find("another migration") != std::string::npos);
}
