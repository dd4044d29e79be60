// The phase machine: this side's role, phase and io mode, changed together by
// one transition function along a table of legal edges, and persisted by the
// same call (DESIGN.md "Phases", docs/handover.md).
//
// Design notes
// ------------
// A state is (role, phase, io mode). The io mode is what the write gate does
// with each request; role and phase are what status shows and what a restart
// recovers from the state file. The legal edges are the table kEdges in
// phase_machine.cpp; an edge not in it is a bug, refused with an error that
// names both states.
//
// One transition, in this order:
//   1. check the edge;
//   2. persist: write the record (role and phase from the new state, plus
//      the caller's changes), or remove the state file;
//   3. publish the new state and its io mode at the gate;
//   4. if the edge drains, wait until no request runs under the old mode.
// A persistence failure leaves the old state in force. So what is on disk is
// never behind what requests see: the fence (Sync -> Handover) is durable
// before the first write is refused and before HANDOVER is sent; the commit
// (destination PreCopy -> PostCopy) is durable before the first write is
// accepted and before HANDOVER_ACK; "not committed" (Handover -> Sync) is
// durable before the source takes writes again.
//
// Transitions are serialized (one at a time, drains included); state() and
// wait_for() may be called from any thread, but never while holding a lock
// that a request in the gate may wait for.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "common/mutex.h"
#include "common/state_file.h"
#include "common/status.h"
#include "plugin/io_gate.h"

namespace livemig {

enum class Phase { Idle, Monitoring, PreCopy, Sync, Handover, PostCopy, Done, Cancelled, Failed };
enum class Role { None, Source, Destination };

const char* phase_name(Phase p);
const char* role_name(Role r);
Result<Phase> parse_phase(const std::string& s);
Result<Role> parse_role(const std::string& s);
// A migration is under way in this phase.
bool is_active(Phase p);

struct EngineState {
  Role role = Role::None;
  Phase phase = Phase::Idle;
  IoMode io = IoMode::Local;
  bool operator==(const EngineState&) const = default;
};
// "source/Sync/source-tracking"
std::string describe(const EngineState& s);

// What a transition does with the state file.
enum class Persist {
  Write,   // write the record with the new role and phase (the default)
  Remove,  // delete the file: nothing about this migration survives a restart
  Keep,    // leave the file as it is (the state is not one a restart recovers)
  TryWrite,  // write, but take the new state even if the write fails (for
             // facts a restart can learn again, such as the source's record
             // that the destination committed)
};

// One legal edge. from_phases is a bit mask of phases (bit = 1 << Phase).
struct Edge {
  Role from_role;
  uint32_t from_phases;
  IoMode from_io;
  EngineState to;
  bool drain;        // wait until no request runs under the old io mode
  const char* what;  // for logs
};
constexpr uint32_t phase_bit(Phase p) { return 1u << static_cast<unsigned>(p); }
// The table of legal edges.
std::span<const Edge> legal_edges();
// The edge from `from` to `to`, or null.
const Edge* find_edge(const EngineState& from, const EngineState& to);

class PhaseMachine {
 public:
  using RecordUpdate = std::function<void(MigrationRecord&)>;

  explicit PhaseMachine(IoGate& gate) : gate_(gate) {}

  EngineState state() const;
  // The current record (empty if there is no state file).
  MigrationRecord record() const;
  bool has_file() const;
  // The state file, for the presence journal (which writes only bitmap
  // pages). Valid until the next begin() or a Persist::Remove transition.
  StateFile* file();

  // At start-up, before any request: take up a recovered state.
  void restore(const EngineState& s, std::unique_ptr<StateFile> file);
  // A migration starts: adopts `file` (already written with the new record)
  // and moves to `to` along a legal edge.
  Status begin(std::unique_ptr<StateFile> file, const EngineState& to);
  // Moves to `to` (see the design notes). `update` changes the record
  // before it is written.
  Status transition(const EngineState& to, const RecordUpdate& update = {}, Persist persist = Persist::Write);
  // Changes the record only (same state), durably.
  Status update_record(const RecordUpdate& update);

  // Waits until pred(state()) or the timeout; returns pred's last value.
  bool wait_for(const std::function<bool(const EngineState&)>& pred, std::chrono::milliseconds timeout) const;
  // Wakes wait_for() callers to check their predicate again (e.g. on stop).
  void notify_all() { cv_.notify_all(); }

 private:
  Status check_edge(const EngineState& from, const EngineState& to, const Edge** edge) const;
  Status persist(const EngineState& to, const RecordUpdate& update, Persist persist) REQUIRES(transition_mu_);
  void publish(const EngineState& to, const Edge& edge) REQUIRES(transition_mu_);

  IoGate& gate_;
  Mutex transition_mu_;  // one transition at a time, drain included
  mutable Mutex mu_;
  mutable CondVar cv_;
  EngineState state_ GUARDED_BY(mu_);
  std::unique_ptr<StateFile> file_ GUARDED_BY(mu_);
};

}  // namespace livemig
