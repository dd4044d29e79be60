#include "server/task_store.h"

#include <chrono>

#include <fmt/format.h>

#include "common/json_limits.h"
#include "common/peer_link.h"

namespace livemig::daemon {

double now_unix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

using nlohmann::json;

namespace {

constexpr int kSchemaVersion = 2;  // 2: priority

constexpr const char* kSchema = R"(
CREATE TABLE IF NOT EXISTS tasks (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  source TEXT NOT NULL,
  destination TEXT NOT NULL,
  mode TEXT NOT NULL,
  request TEXT NOT NULL,
  state TEXT NOT NULL,
  migration_id TEXT NOT NULL DEFAULT '',
  rate_cap INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  phase TEXT NOT NULL DEFAULT '',
  error TEXT NOT NULL DEFAULT '',
  note TEXT NOT NULL DEFAULT '',
  submitted_at REAL NOT NULL,
  started_at REAL NOT NULL DEFAULT 0,
  finished_at REAL NOT NULL DEFAULT 0,
  source_down_since REAL NOT NULL DEFAULT 0,
  destination_down_since REAL NOT NULL DEFAULT 0,
  blocks_total INTEGER NOT NULL DEFAULT 0,
  blocks_left INTEGER NOT NULL DEFAULT 0,
  priority INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state);
)";

constexpr const char* kColumns =
    "id, name, source, destination, mode, request, state, migration_id, rate_cap, attempts, cancel_requested, "
    "phase, error, note, submitted_at, started_at, finished_at, source_down_since, destination_down_since, "
    "blocks_total, blocks_left, priority";

Result<Task> read_row(const SqliteStmt& s) {
  Task t;
  t.id = s.column_int64(0);
  t.name = s.column_text(1);
  t.source = s.column_text(2);
  t.destination = s.column_text(3);
  t.mode = s.column_text(4);
  t.request = parse_json(s.column_text(5));
  if (!t.request.is_object()) return Status::error(fmt::format("task {}: its request is not a JSON object", t.id), EIO);
  auto st = parse_state(s.column_text(6));
  if (!st) return Status::error(fmt::format("task {}: {}", t.id, st.status().message()), EIO);
  t.state = *st;
  t.migration_id = s.column_text(7);
  t.rate_cap = static_cast<uint64_t>(s.column_int64(8));
  t.priority = static_cast<int>(s.column_int64(21));
  t.attempts = static_cast<int>(s.column_int64(9));
  t.cancel_requested = s.column_int64(10) != 0;
  t.phase = s.column_text(11);
  t.error = s.column_text(12);
  t.note = s.column_text(13);
  t.submitted_at = s.column_double(14);
  t.started_at = s.column_double(15);
  t.finished_at = s.column_double(16);
  t.source_down_since = s.column_double(17);
  t.destination_down_since = s.column_double(18);
  t.blocks_total = static_cast<uint64_t>(s.column_int64(19));
  t.blocks_left = static_cast<uint64_t>(s.column_int64(20));
  return t;
}

std::string host_of(const std::string& address) {
  auto hp = parse_host_port(address);
  return hp ? hp->host : address;
}

}  // namespace

const char* state_name(TaskState s) {
  switch (s) {
    case TaskState::Queued: return "queued";
    case TaskState::Running: return "running";
    case TaskState::Done: return "done";
    case TaskState::Failed: return "failed";
    case TaskState::Cancelled: return "cancelled";
  }
  return "?";
}

Result<TaskState> parse_state(const std::string& s) {
  for (TaskState t : {TaskState::Queued, TaskState::Running, TaskState::Done, TaskState::Failed, TaskState::Cancelled})
    if (s == state_name(t)) return t;
  return Status::error(fmt::format("unknown task state '{}'", s));
}

bool is_final(TaskState s) { return s == TaskState::Done || s == TaskState::Failed || s == TaskState::Cancelled; }

bool transition_allowed(TaskState from, TaskState to) {
  if (from == to) return false;  // staying put is not a transition (update() allows it)
  switch (from) {
    case TaskState::Queued: return to == TaskState::Running || to == TaskState::Cancelled;
    case TaskState::Running: return to == TaskState::Done || to == TaskState::Failed || to == TaskState::Cancelled;
    default: return false;
  }
}

std::string Task::source_host() const { return host_of(source); }
std::string Task::destination_host() const { return host_of(destination); }

json Task::to_json() const {
  json j = {{"id", id},
            {"name", name},
            {"source", source},
            {"destination", destination},
            {"mode", mode},
            {"request", request},
            {"state", state_name(state)},
            {"migration_id", migration_id},
            {"rate_cap", rate_cap},
            {"attempts", attempts},
            {"cancel_requested", cancel_requested},
            {"phase", phase},
            {"error", error},
            {"note", note},
            {"submitted_at", submitted_at},
            {"started_at", started_at},
            {"finished_at", finished_at},
            {"source_down_since", source_down_since},
            {"destination_down_since", destination_down_since},
            {"blocks_total", blocks_total},
            {"blocks_left", blocks_left},
            {"priority", priority}};
  return j;
}

Result<std::unique_ptr<TaskStore>> TaskStore::open(const std::string& path) {
  auto db = SqliteDb::open(path);
  if (!db) return db.status();
  // WAL: readers do not block the writer and a commit is one append; FULL:
  // a commit is on disk before it returns, so an answered submit survives
  // even a power cut.
  if (Status s = (*db)->exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"); !s) return s;
  auto v = (*db)->prepare("PRAGMA user_version");
  if (!v) return v.status();
  auto row = v->step();
  if (!row) return row.status();
  int64_t version = *row ? v->column_int64(0) : 0;
  if (version > kSchemaVersion)
    return Status::error(fmt::format("database {}: schema version {} is newer than this livemigd's ({})", path,
                                     version, kSchemaVersion),
                         EIO);
  // Version 1 had no priority: every task it kept has the default, 0.
  if (version == 1)
    if (Status s = (*db)->exec("ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;"); !s) return s;
  if (Status s = (*db)->exec(std::string(kSchema) + fmt::format("PRAGMA user_version={};", kSchemaVersion)); !s)
    return s;
  return std::unique_ptr<TaskStore>(new TaskStore(std::move(*db)));
}

Status TaskStore::add(Task& task) {
  MutexLock lock(mu_);
  task.state = TaskState::Queued;
  task.submitted_at = now_unix();
  auto st = db_->prepare(
      "INSERT INTO tasks (name, source, destination, mode, request, state, submitted_at, priority) VALUES (?1, ?2, "
      "?3, ?4, ?5, ?6, ?7, ?8)");
  if (!st) return st.status();
  st->bind(1, task.name).bind(2, task.source).bind(3, task.destination).bind(4, task.mode);
  st->bind(5, task.request.dump()).bind(6, std::string(state_name(task.state))).bind(7, task.submitted_at);
  st->bind(8, int64_t{task.priority});
  if (Status s = st->run(); !s) return s;
  task.id = db_->last_insert_rowid();
  return Status::ok();
}

Result<std::optional<Task>> TaskStore::get(int64_t id) {
  MutexLock lock(mu_);
  auto st = db_->prepare(fmt::format("SELECT {} FROM tasks WHERE id = ?1", kColumns));
  if (!st) return st.status();
  st->bind(1, id);
  auto row = st->step();
  if (!row) return row.status();
  if (!*row) return std::optional<Task>();
  auto t = read_row(*st);
  if (!t) return t.status();
  return std::optional<Task>(std::move(*t));
}

Result<std::vector<Task>> TaskStore::list(bool active_only) {
  MutexLock lock(mu_);
  auto st = db_->prepare(fmt::format("SELECT {} FROM tasks {} ORDER BY id", kColumns,
                                     active_only ? "WHERE state IN ('queued', 'running')" : ""));
  if (!st) return st.status();
  std::vector<Task> out;
  for (;;) {
    auto row = st->step();
    if (!row) return row.status();
    if (!*row) break;
    auto t = read_row(*st);
    if (!t) return t.status();
    out.push_back(std::move(*t));
  }
  return out;
}

Status TaskStore::update(const Task& t) {
  MutexLock lock(mu_);
  auto cur = db_->prepare("SELECT state FROM tasks WHERE id = ?1");
  if (!cur) return cur.status();
  cur->bind(1, t.id);
  auto row = cur->step();
  if (!row) return row.status();
  if (!*row) return Status::error(fmt::format("no task {}", t.id), ENOENT);
  auto was = parse_state(cur->column_text(0));
  if (!was) return was.status();
  if (*was != t.state && !transition_allowed(*was, t.state))
    return Status::error(fmt::format("task {}: {} -> {} is not a valid change of state", t.id, state_name(*was),
                                     state_name(t.state)),
                         EINVAL);
  auto st = db_->prepare(
      "UPDATE tasks SET state = ?2, migration_id = ?3, rate_cap = ?4, attempts = ?5, cancel_requested = ?6, phase = "
      "?7, error = ?8, note = ?9, started_at = ?10, finished_at = ?11, source_down_since = ?12, "
      "destination_down_since = ?13, blocks_total = ?14, blocks_left = ?15 WHERE id = ?1");
  if (!st) return st.status();
  st->bind(1, t.id).bind(2, std::string(state_name(t.state))).bind(3, t.migration_id);
  st->bind(4, static_cast<int64_t>(t.rate_cap)).bind(5, int64_t{t.attempts}).bind(6, int64_t{t.cancel_requested});
  st->bind(7, t.phase).bind(8, t.error).bind(9, t.note).bind(10, t.started_at).bind(11, t.finished_at);
  st->bind(12, t.source_down_since).bind(13, t.destination_down_since);
  st->bind(14, static_cast<int64_t>(t.blocks_total)).bind(15, static_cast<int64_t>(t.blocks_left));
  return st->run();
}

}  // namespace livemig::daemon
