// livemigd's queue: every migration task and its state, kept in SQLite (WAL
// mode, synchronous=FULL) so that a restart of the daemon, kill -9 included,
// loses no task: a task is in the database before submit answers, and every
// change of state is written before the daemon acts on it.
//
// States and their edges (transition_allowed):
//   queued   -> running | cancelled
//   running  -> done | failed | cancelled
//   done, failed, cancelled: final.
// Order: tasks start by priority (higher first), and in the order of their
// ids (the submission order) within a priority.
// Threading: a TaskStore serializes its calls with its own mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/mutex.h"
#include "common/status.h"
#include "server/sqlite_db.h"

namespace livemig::daemon {

enum class TaskState { Queued, Running, Done, Failed, Cancelled };

const char* state_name(TaskState s);
Result<TaskState> parse_state(const std::string& s);
bool is_final(TaskState s);
// The edges above.
bool transition_allowed(TaskState from, TaskState to);

// The time now as a Unix time in seconds (the tasks' timestamps, the
// heartbeats' down_since).
double now_unix();

struct Task {
  int64_t id = 0;
  std::string name;         // for people: the source image's file name, or --name
  std::string source;       // the source plugin's peer address, resolved: "10.0.0.1:10809"
  std::string destination;  // the destination plugin's peer address, resolved
  std::string mode;
  // The migrate request the daemon sends the source (op, to, from, mode and
  // the mode's parameters); max_rate in it is the submitter's own cap.
  nlohmann::json request = nlohmann::json::object();
  TaskState state = TaskState::Queued;
  std::string migration_id;  // the plugin's id; empty until migrate was answered
  uint64_t rate_cap = 0;     // bytes/s granted by the scheduler (0 = none)
  int attempts = 0;          // migrate requests issued
  bool cancel_requested = false;
  std::string phase;         // the plugins' phase last seen
  std::string error;         // why it failed, or the last recovery
  std::string note;          // what it is waiting for, for people
  double submitted_at = 0;   // Unix time, seconds
  double started_at = 0;     // 0 = not yet
  double finished_at = 0;
  double source_down_since = 0;  // 0 = up (or not watched)
  double destination_down_since = 0;
  uint64_t blocks_total = 0;
  uint64_t blocks_left = 0;
  int priority = 0;          // 0 normal .. kMaxPriority most urgent (scheduler.h)

  // The host part of source/destination: the unit of the bandwidth limit.
  std::string source_host() const;
  std::string destination_host() const;
  nlohmann::json to_json() const;
};

class TaskStore {
 public:
  // Opens or creates the database at `path` (WAL mode).
  static Result<std::unique_ptr<TaskStore>> open(const std::string& path);

  // Inserts `task` as queued (its id and submitted_at are set).
  Status add(Task& task);
  Result<std::optional<Task>> get(int64_t id);
  // Every task in id order; active_only: queued and running ones.
  Result<std::vector<Task>> list(bool active_only);
  // Writes every mutable field. A change of state must be an edge above.
  Status update(const Task& task);

 private:
  explicit TaskStore(std::unique_ptr<SqliteDb> db) : db_(std::move(db)) {}
  Mutex mu_;
  std::unique_ptr<SqliteDb> db_ GUARDED_BY(mu_);
};

}  // namespace livemig::daemon
