#include "server/task_store.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include <catch2/catch.hpp>

using namespace livemig::daemon;

namespace {

// A database path in a fresh directory, removed with it.
struct TempDb {
  TempDb() {
    char tmpl[] = "/tmp/livemigd-test-XXXXXX";
    dir = ::mkdtemp(tmpl);
    path = dir + "/q.db";
  }
  ~TempDb() { std::filesystem::remove_all(dir); }
  std::string dir, path;
};

Task make_task(const std::string& source) {
  Task t;
  t.name = "vm-" + source;
  t.source = source;
  t.destination = "10.0.0.9:10809";
  t.mode = "precopy";
  t.request = {{"from", source}, {"to", t.destination}, {"mode", "precopy"}};
  return t;
}

}  // namespace

TEST_CASE("task store: tasks come back in submission (FIFO) order") {
  TempDb db;
  auto store = TaskStore::open(db.path);
  REQUIRE(store);
  std::vector<int64_t> ids;
  for (const char* s : {"10.0.0.3:1", "10.0.0.1:1", "10.0.0.2:1"}) {
    Task t = make_task(s);
    REQUIRE((*store)->add(t));
    CHECK(t.state == TaskState::Queued);
    CHECK(t.submitted_at > 0);
    ids.push_back(t.id);
  }
  CHECK(ids[0] < ids[1]);
  CHECK(ids[1] < ids[2]);
  auto all = (*store)->list(true);
  REQUIRE(all);
  REQUIRE(all->size() == 3);
  CHECK((*all)[0].source == "10.0.0.3:1");
  CHECK((*all)[1].source == "10.0.0.1:1");
  CHECK((*all)[2].source == "10.0.0.2:1");
}

TEST_CASE("task store: only the allowed state transitions are written") {
  CHECK(transition_allowed(TaskState::Queued, TaskState::Running));
  CHECK(transition_allowed(TaskState::Queued, TaskState::Cancelled));
  CHECK(transition_allowed(TaskState::Running, TaskState::Done));
  CHECK(transition_allowed(TaskState::Running, TaskState::Failed));
  CHECK(transition_allowed(TaskState::Running, TaskState::Cancelled));
  CHECK_FALSE(transition_allowed(TaskState::Queued, TaskState::Done));
  CHECK_FALSE(transition_allowed(TaskState::Done, TaskState::Running));
  CHECK_FALSE(transition_allowed(TaskState::Failed, TaskState::Queued));
  CHECK_FALSE(transition_allowed(TaskState::Cancelled, TaskState::Running));

  TempDb db;
  auto store = TaskStore::open(db.path);
  REQUIRE(store);
  Task t = make_task("10.0.0.1:1");
  REQUIRE((*store)->add(t));
  t.state = TaskState::Done;
  auto bad = (*store)->update(t);
  REQUIRE_FALSE(bad);
  CHECK(bad.message().find("queued -> done") != std::string::npos);
  t.state = TaskState::Running;
  t.migration_id = "abc";
  REQUIRE((*store)->update(t));
  t.state = TaskState::Done;
  REQUIRE((*store)->update(t));
  t.state = TaskState::Running;
  CHECK_FALSE((*store)->update(t));
  auto got = (*store)->get(t.id);
  REQUIRE(got);
  REQUIRE(*got);
  CHECK((*got)->state == TaskState::Done);
  auto active = (*store)->list(true);
  REQUIRE(active);
  CHECK(active->empty());
}

TEST_CASE("task store: every field survives closing and reopening the database") {
  TempDb db;
  int64_t id = 0;
  {
    auto store = TaskStore::open(db.path);
    REQUIRE(store);
    Task q = make_task("10.0.0.1:1");
    REQUIRE((*store)->add(q));
    Task r = make_task("10.0.0.2:2");
    REQUIRE((*store)->add(r));
    r.state = TaskState::Running;
    r.migration_id = "0123456789abcdef";
    r.rate_cap = 50u << 20;
    r.attempts = 2;
    r.cancel_requested = true;
    r.phase = "Sync";
    r.error = "restarted from pre-copy";
    r.note = "destination down";
    r.started_at = 1000.5;
    r.destination_down_since = 1001.25;
    r.blocks_total = 4096;
    r.blocks_left = 17;
    REQUIRE((*store)->update(r));
    id = r.id;
  }
  auto store = TaskStore::open(db.path);
  REQUIRE(store);
  auto got = (*store)->get(id);
  REQUIRE(got);
  REQUIRE(*got);
  const Task& t = **got;
  CHECK(t.state == TaskState::Running);
  CHECK(t.migration_id == "0123456789abcdef");
  CHECK(t.rate_cap == (50u << 20));
  CHECK(t.attempts == 2);
  CHECK(t.cancel_requested);
  CHECK(t.phase == "Sync");
  CHECK(t.error == "restarted from pre-copy");
  CHECK(t.note == "destination down");
  CHECK(t.started_at == 1000.5);
  CHECK(t.destination_down_since == 1001.25);
  CHECK(t.blocks_total == 4096);
  CHECK(t.blocks_left == 17);
  CHECK(t.request["to"] == "10.0.0.9:10809");
  CHECK(t.source_host() == "10.0.0.2");
  auto active = (*store)->list(true);
  REQUIRE(active);
  REQUIRE(active->size() == 2);
  CHECK((*active)[0].state == TaskState::Queued);
  auto none = (*store)->get(id + 100);
  REQUIRE(none);
  CHECK_FALSE(*none);
}

TEST_CASE("task store: the database is in WAL mode") {
  TempDb db;
  REQUIRE(TaskStore::open(db.path));
  auto raw = SqliteDb::open(db.path);
  REQUIRE(raw);
  auto st = (*raw)->prepare("PRAGMA journal_mode");
  REQUIRE(st);
  auto row = st->step();
  REQUIRE(row);
  REQUIRE(*row);
  CHECK(st->column_text(0) == "wal");
}

TEST_CASE("task store: a task's priority is kept, and a schema-1 database opens with priority 0 for its tasks") {
  TempDb db;
  {
    // What livemigd kept before priorities (schema version 1).
    auto old = SqliteDb::open(db.path);
    REQUIRE(old);
    REQUIRE((*old)->exec(R"(
CREATE TABLE tasks (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
  mode TEXT NOT NULL, request TEXT NOT NULL, state TEXT NOT NULL, migration_id TEXT NOT NULL DEFAULT '',
  rate_cap INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0, phase TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
  note TEXT NOT NULL DEFAULT '', submitted_at REAL NOT NULL, started_at REAL NOT NULL DEFAULT 0,
  finished_at REAL NOT NULL DEFAULT 0, source_down_since REAL NOT NULL DEFAULT 0,
  destination_down_since REAL NOT NULL DEFAULT 0, blocks_total INTEGER NOT NULL DEFAULT 0,
  blocks_left INTEGER NOT NULL DEFAULT 0);
INSERT INTO tasks (name, source, destination, mode, request, state, submitted_at)
  VALUES ('old', '10.0.0.1:1', '10.0.0.2:1', 'precopy', '{}', 'queued', 1);
PRAGMA user_version=1;)"));
  }
  auto store = TaskStore::open(db.path);
  REQUIRE(store);
  auto old = (*store)->get(1);
  REQUIRE(old);
  REQUIRE(*old);
  CHECK((*old)->priority == 0);
  Task urgent = make_task("10.0.0.3:10809");
  urgent.priority = 5;
  REQUIRE((*store)->add(urgent));
  auto back = (*store)->get(urgent.id);
  REQUIRE(back);
  REQUIRE(*back);
  CHECK((*back)->priority == 5);
  CHECK((*back)->to_json()["priority"] == 5);
}
