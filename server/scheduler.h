// livemigd's decisions as pure functions, so that tests can prove them
// without plugins: which queued tasks start now and at what rate cap
// (plan_starts), and what a running task needs given what both plugins say
// (judge: the recovery rules of DESIGN.md, "Phases").
//
// Starting. Tasks start by priority (0 normal .. kMaxPriority, the operator's
// "urgent"), higher first, and in FIFO order within a priority: a task
// never starts before one of its priority submitted earlier, nor before a
// queued one of a higher priority. At most max_concurrent run at once; any
// number may (30 at once to evacuate a host is the case issue #15 names).
//
// Bandwidth. With a per-host limit L, every running task has a rate cap
// (passed to the plugin's migrate op as max_rate, changed later with its
// set-rate op) and, for every host, the caps of the tasks touching it (as
// source or destination) add up to at most L. The caps follow the set of
// running tasks (share_bandwidth): weighted max-min fairness, the weight
// being priority + 1 (an urgent task of priority 1 gets twice a normal
// one's share), each task also held to its own max_rate; what a task cannot
// use on one host (its other host, or its own max_rate, is tighter) goes to
// the others. Tasks of equal priority get equal shares; a lone task gets
// all of L; when one ends, the others get its share. A queued task starts
// when a slot is free and its share on each of its hosts (among the tasks
// running there, itself and those behind it that may start with it) would
// be at least L / (4 * max_concurrent); otherwise it waits, and so does
// everything behind it. When tasks start, the running ones whose caps fall
// are lowered (set-rate) before the new ones start, so that a host's limit
// holds throughout.
//
// Pinned tasks. A running task whose cap cannot be changed now (the plugin
// that must take set-rate is down, or the call failed) goes on at the cap
// it has, as far as the planner can know: it is planned with that cap
// (pinned), never changed, and the others share what it leaves of each of
// its hosts' limit. A queued task starts if its share of that remainder is
// big enough; a pinned task therefore never stops the queue by itself. A
// pinned task without a cap (0) holds its hosts' whole limit. If the pinned
// tasks alone fill a host, the other tasks there get the smallest cap,
// 1 byte/s (0 would mean none).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace livemig::daemon {

struct SchedulerLimits {
  unsigned max_concurrent = 1;
  uint64_t host_bandwidth = 0;  // bytes/s per host; 0 = no limit
};

// What the planner needs to know of a task.
inline constexpr int kMaxPriority = 9;

struct TaskSlot {
  int64_t id = 0;
  std::string source_host, destination_host;
  uint64_t max_rate = 0;  // the submitter's own cap, 0 = none
  uint64_t rate_cap = 0;  // running tasks: the cap they run with now
  int priority = 0;       // 0 .. kMaxPriority; higher starts first
  bool pinned = false;    // running tasks: rate_cap cannot be changed now
};

struct StartDecision {
  int64_t id = 0;
  uint64_t rate_cap = 0;  // 0 = no cap
};

struct StartPlan {
  std::vector<StartDecision> start;
  // Running tasks whose cap changes (new cap), once those in `start` run
  // too: lower the ones that fall before starting, raise the rest after.
  // Never a pinned task.
  std::vector<StartDecision> rerate;
  // Why the first queued task that does not start waits; empty if none waits.
  std::string waiting;
  int64_t waiting_id = 0;
};

// Each task's cap (id -> bytes/s, 0 = none) when `tasks` run together under
// a per-host limit (0: each its own max_rate). A pinned task keeps its
// rate_cap; the others share what it leaves.
std::map<int64_t, uint64_t> share_bandwidth(const std::vector<TaskSlot>& tasks, uint64_t host_bandwidth);

// `running` and `queued` (in FIFO order: submission) as they are now.
StartPlan plan_starts(const std::vector<TaskSlot>& running, const std::vector<TaskSlot>& queued,
                      const SchedulerLimits& limits);

// One plugin as the last heartbeat saw it.
struct PluginView {
  bool up = false;              // answered within the heartbeat timeout
  std::string phase;            // Idle, PreCopy, ..., Done, Cancelled, Failed
  std::string role;             // none, source, destination
  std::string migration_id;     // of the migration it knows, if any
  std::string peer;             // its migration's peer address
  bool fenced = false;
  std::string last_error;
  // A source whose handover is unresolved (docs/handover.md): why, and the
  // command that ends it if the destination is gone for good.
  std::string needs_resolution;
  std::string resolution_command;
};

enum class Action {
  Wait,      // nothing to do now (running normally, or waiting for a host)
  Start,     // issue migrate at the source (first start or a restart)
  Adopt,     // the source runs our migration but we never saw its id: take it
  Cancel,    // a cancel was asked for and the source can still cancel
  Done,
  Failed,
  Cancelled,
};

struct Verdict {
  Verdict() = default;
  Verdict(Action a, std::string n, std::string id = "") : action(a), note(std::move(n)), adopt_id(std::move(id)) {}
  Action action = Action::Wait;
  std::string note;      // for people: what the task waits for / why
  std::string adopt_id;  // Adopt
};

// The task's side of judge().
struct TaskView {
  std::string migration_id;  // empty: migrate not (yet) answered
  std::string destination;   // the address migrate was sent with ("to")
  bool cancel_requested = false;
};

// The recovery rules for a running task:
//  - after handover (either side reports our migration in Handover, PostCopy
//    or Done) the destination owns the data: wait for Done, whoever is down
//    (a restarted destination reloads its map and pulls again; a restarted
//    source serves pulls); a source whose handover is unresolved says
//    "needs resolution" and the command to run, for as long as it is;
//  - before handover, a source running our migration: wait (note a host
//    that is down: the source resumes when it is back); a source that failed
//    or forgot it: Start again from pre-copy once the destination is up and
//    no longer busy with it;
//  - a cancel asked for before handover is carried out; after it, refused.
Verdict judge(const TaskView& task, const PluginView& source, const PluginView& destination);

}  // namespace livemig::daemon
