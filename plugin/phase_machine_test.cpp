#include "plugin/phase_machine.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <future>
#include <set>
#include <string>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.h"

using namespace livemig;
using namespace std::chrono_literals;

namespace {

std::unique_ptr<StateFile> source_file(const std::string& path) {
  MigrationRecord rec{"m1", "source", "PreCopy", "dst:1", "precopy", 1 << 20, 4096};
  auto f = StateFile::create(path, rec);
  REQUIRE(f);
  return std::move(*f);
}

}  // namespace

TEST_CASE("phase machine: an edge not in the table is refused and changes nothing") {
  IoGate gate;
  PhaseMachine m(gate);
  m.restore({Role::Source, Phase::PreCopy, IoMode::SourceTracking}, nullptr);
  // A source cannot go back to tracking writes after the commit.
  Status s = m.transition({Role::Source, Phase::PreCopy, IoMode::SourceTracking});
  CHECK_FALSE(s);  // PreCopy -> PreCopy is no edge
  m.restore({Role::Source, Phase::PostCopy, IoMode::SourceForward}, nullptr);
  s = m.transition({Role::Source, Phase::Sync, IoMode::SourceTracking});
  REQUIRE_FALSE(s);
  CHECK(s.message().find("source/PostCopy/source-forward -> source/Sync/source-tracking") != std::string::npos);
  CHECK(m.state() == EngineState{Role::Source, Phase::PostCopy, IoMode::SourceForward});
  CHECK(gate.mode() == IoMode::SourceForward);
}

TEST_CASE("phase machine: no edge lets two sides be writable or leaves a fenced source without resolution") {
  for (const Edge& e : legal_edges()) {
    INFO(e.what << " -> " << describe(e.to));
    // A destination becomes writable only by its commit (PreCopy -> PostCopy)
    // or when it is done or released.
    if (e.to.role == Role::Destination && io_mode_authoritative(e.to.io))
      CHECK((e.to.phase == Phase::PostCopy || e.to.phase == Phase::Done));
    // The fence drains: no write may still be in flight once HANDOVER is built.
    if (e.to.io == IoMode::SourceHandover) CHECK(e.drain);
    // Leaving the handover window goes to the commit, back to tracking, or
    // to a writable end (refused or aborted): never to another fenced state.
    if (e.from_io == IoMode::SourceHandover && e.to.io != IoMode::SourceHandover)
      CHECK((e.to.io == IoMode::SourceForward || e.to.io == IoMode::SourceTracking || e.to.io == IoMode::Local));
  }
}

TEST_CASE("phase machine: a finished destination may become a source; an unfinished one may not") {
  IoGate gate;
  PhaseMachine m(gate);
  m.restore({Role::Destination, Phase::PostCopy, IoMode::DestPost}, nullptr);
  CHECK_FALSE(m.transition({Role::Source, Phase::PreCopy, IoMode::SourceTracking}));
  m.restore({Role::Destination, Phase::Failed, IoMode::Fenced}, nullptr);
  CHECK_FALSE(m.transition({Role::Source, Phase::PreCopy, IoMode::SourceTracking}));
  m.restore({Role::Destination, Phase::Done, IoMode::Local}, nullptr);
  REQUIRE(m.transition({Role::Source, Phase::PreCopy, IoMode::SourceTracking}));
  CHECK(gate.mode() == IoMode::SourceTracking);
}

TEST_CASE("phase machine: a transition writes role and phase to the state file before requests see it") {
  TempDir dir;
  std::string path = dir / "state";
  IoGate gate;
  PhaseMachine m(gate);
  m.restore({Role::None, Phase::Idle, IoMode::Local}, nullptr);
  REQUIRE(m.begin(source_file(path), {Role::Source, Phase::PreCopy, IoMode::SourceTracking}));
  REQUIRE(m.transition({Role::Source, Phase::Handover, IoMode::SourceHandover},
                       [](MigrationRecord& r) { r.handover_generation = 3; }));
  CHECK(gate.mode() == IoMode::SourceHandover);
  // What a restart would read.
  m.restore({Role::None, Phase::Idle, IoMode::Local}, nullptr);  // closes the file (drops the lock)
  auto f = StateFile::open(path);
  REQUIRE(f);
  CHECK((*f)->record().phase == "Handover");
  CHECK((*f)->record().role == "source");
  CHECK((*f)->record().handover_generation == 3);
}

TEST_CASE("phase machine: the fence waits for the writes in flight") {
  IoGate gate;
  PhaseMachine m(gate);
  m.restore({Role::Source, Phase::Sync, IoMode::SourceTracking}, nullptr);
  auto write = gate.enter();
  auto fenced = std::async(std::launch::async,
                           [&] { return m.transition({Role::Source, Phase::Handover, IoMode::SourceHandover}); });
  CHECK(fenced.wait_for(100ms) == std::future_status::timeout);
  CHECK(gate.mode() == IoMode::SourceHandover);  // new writes are refused meanwhile
  gate.leave(write);
  REQUIRE(fenced.wait_for(5s) == std::future_status::ready);
  CHECK(fenced.get());
}

TEST_CASE("phase machine: Persist::Remove deletes the state file") {
  TempDir dir;
  std::string path = dir / "state";
  IoGate gate;
  PhaseMachine m(gate);
  m.restore({Role::None, Phase::Idle, IoMode::Local}, nullptr);
  REQUIRE(m.begin(source_file(path), {Role::Source, Phase::PreCopy, IoMode::SourceTracking}));
  REQUIRE(m.transition({Role::None, Phase::Cancelled, IoMode::Local}, {}, Persist::Remove));
  CHECK_FALSE(m.has_file());
  CHECK(access(path.c_str(), F_OK) != 0);
}

TEST_CASE("phase machine: wait_for wakes on a transition") {
  IoGate gate;
  PhaseMachine m(gate);
  m.restore({Role::Source, Phase::Handover, IoMode::SourceHandover}, nullptr);
  auto waiter = std::async(std::launch::async, [&] {
    return m.wait_for([](const EngineState& s) { return s.phase != Phase::Handover; }, 5000ms);
  });
  std::this_thread::sleep_for(50ms);
  REQUIRE(m.transition({Role::Source, Phase::PostCopy, IoMode::SourceForward}));
  CHECK(waiter.get());
}

TEST_CASE("phase machine: names parse back to the enums") {
  for (Phase p : {Phase::Idle, Phase::Monitoring, Phase::PreCopy, Phase::Sync, Phase::Handover, Phase::PostCopy,
                  Phase::Done, Phase::Cancelled, Phase::Failed})
    CHECK(parse_phase(phase_name(p)).value() == p);
  for (Role r : {Role::None, Role::Source, Role::Destination}) CHECK(parse_role(role_name(r)).value() == r);
  CHECK_FALSE(parse_phase("precopy"));
}
