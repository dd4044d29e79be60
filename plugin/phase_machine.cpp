#include "plugin/phase_machine.h"

#include <fmt/format.h>

#include "common/enum_names.h"

namespace livemig {
namespace {

constexpr uint32_t bit(Phase p) { return phase_bit(p); }
constexpr uint32_t kBeforeHandover = bit(Phase::Monitoring) | bit(Phase::PreCopy) | bit(Phase::Sync);
constexpr uint32_t kEnded = bit(Phase::Idle) | bit(Phase::Done) | bit(Phase::Cancelled) | bit(Phase::Failed);
constexpr uint32_t kIdleOrFailed = bit(Phase::Idle) | bit(Phase::Cancelled) | bit(Phase::Failed);

using R = Role;
using P = Phase;
using M = IoMode;

// Every legal edge. Reading guide: a source goes Monitoring -> PreCopy ->
// Sync -> Handover (fenced, the commit unresolved) and from there either to
// PostCopy (the destination committed) or back to Sync (it did not), or, on an
// explicit refusal or the operator's abort, ends writable (None/Failed/Local).
// A destination goes PreCopy -> PostCopy (its commit) -> Done; before the
// commit it may end Cancelled/Failed holding a partial copy (Fenced), which a
// later START resumes; after it only the operator's abort ends it (Stale).
constexpr Edge kEdges[] = {
    // A migration starts at the source.
    // It drains: a write that entered before tracking began must land before
    // the first push reads its block (it marks nothing).
    {R::None, kEnded, M::Local, {R::Source, P::Monitoring, M::SourceTracking}, true, "migrate (monitoring)"},
    {R::None, kEnded, M::Local, {R::Source, P::PreCopy, M::SourceTracking}, true, "migrate"},
    // A finished destination serves the whole image: it may move it on (or
    // back to where it came from) without a release first.
    {R::Destination, bit(P::Done), M::Local, {R::Source, P::Monitoring, M::SourceTracking}, true,
     "migrate onward (monitoring)"},
    {R::Destination, bit(P::Done), M::Local, {R::Source, P::PreCopy, M::SourceTracking}, true, "migrate onward"},
    {R::Source, bit(P::Monitoring), M::SourceTracking, {R::Source, P::PreCopy, M::SourceTracking}, false,
     "monitoring done"},
    {R::Source, bit(P::PreCopy), M::SourceTracking, {R::Source, P::Sync, M::SourceTracking}, false,
     "first pass done"},
    // The fence: no write may still be in flight once HANDOVER is built.
    {R::Source, kBeforeHandover, M::SourceTracking, {R::Source, P::Handover, M::SourceHandover}, true, "fence"},
    {R::Source, bit(P::Handover), M::SourceHandover, {R::Source, P::PostCopy, M::SourceForward}, false,
     "handover committed"},
    {R::Source, bit(P::Handover), M::SourceHandover, {R::Source, P::Sync, M::SourceTracking}, false,
     "handover not committed: resume"},
    {R::Source, bit(P::Handover), M::SourceHandover, {R::None, P::Failed, M::Local}, false,
     "handover refused or aborted"},
    {R::Source, kBeforeHandover, M::SourceTracking, {R::None, P::Cancelled, M::Local}, false, "cancelled"},
    {R::Source, kBeforeHandover, M::SourceTracking, {R::None, P::Failed, M::Local}, false, "failed"},
    // DONE may overtake the handover call's wake-up: it implies the commit.
    {R::Source, bit(P::Handover), M::SourceHandover, {R::Source, P::Done, M::SourceForward}, false, "done"},
    {R::Source, bit(P::PostCopy), M::SourceForward, {R::Source, P::Done, M::SourceForward}, false, "done"},
    // Release: a former source stays fenced (its image is older).
    {R::Source, bit(P::Done), M::SourceForward, {R::None, P::Idle, M::Fenced}, false, "release (stays fenced)"},
    {R::None, kIdleOrFailed, M::Local, {R::None, P::Idle, M::Local}, false, "release"},
    {R::None, bit(P::Idle), M::Fenced, {R::None, P::Idle, M::Fenced}, false, "release (stays fenced)"},
    // The operator makes a former source's stale copy a disk of its own.
    {R::None, bit(P::Idle), M::Fenced, {R::None, P::Idle, M::Local}, false, "release --unfence"},

    // A migration starts at the destination: on an empty image, on a former
    // source's stale image (migrate back), on its own earlier partial copy,
    // or (accept-incoming=always) over a finished one.
    {R::None, kEnded, M::Local, {R::Destination, P::PreCopy, M::DestProxy}, false, "start"},
    {R::None, bit(P::Idle), M::Fenced, {R::Destination, P::PreCopy, M::DestProxy}, false, "start on a stale image"},
    {R::Destination, kIdleOrFailed, M::Fenced, {R::Destination, P::PreCopy, M::DestProxy}, false,
     "start on a partial copy"},
    {R::Destination, bit(P::Done), M::Local, {R::Destination, P::PreCopy, M::DestProxy}, false,
     "start over a finished copy"},
    // The commit.
    {R::Destination, bit(P::PreCopy), M::DestProxy, {R::Destination, P::PostCopy, M::DestPost}, false,
     "handover committed"},
    {R::Destination, bit(P::PreCopy), M::DestProxy, {R::Destination, P::Cancelled, M::Fenced}, false, "cancelled"},
    {R::Destination, bit(P::PreCopy), M::DestProxy, {R::None, P::Cancelled, M::Local}, false,
     "cancelled before anything arrived"},
    {R::Destination, bit(P::PreCopy), M::DestProxy, {R::Destination, P::Failed, M::Fenced}, false, "failed"},
    {R::Destination, bit(P::PostCopy), M::DestPost, {R::Destination, P::Done, M::Local}, false, "done"},
    // The operator aborted the handover this side committed: it lost.
    {R::Destination, bit(P::PostCopy), M::DestPost, {R::Destination, P::Failed, M::Stale}, true, "handover lost"},
    // Release of a destination that is not authoritative (or is done).
    {R::Destination, bit(P::PreCopy), M::DestProxy, {R::None, P::Idle, M::Local}, false, "release"},
    {R::Destination, kIdleOrFailed, M::Fenced, {R::None, P::Idle, M::Local}, false, "release"},
    {R::Destination, bit(P::Failed), M::Stale, {R::None, P::Idle, M::Local}, true, "release"},
    {R::Destination, bit(P::Done), M::Local, {R::None, P::Idle, M::Local}, false, "release"},
};

}  // namespace

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::Idle: return "Idle";
    case Phase::Monitoring: return "Monitoring";
    case Phase::PreCopy: return "PreCopy";
    case Phase::Sync: return "Sync";
    case Phase::Handover: return "Handover";
    case Phase::PostCopy: return "PostCopy";
    case Phase::Done: return "Done";
    case Phase::Cancelled: return "Cancelled";
    case Phase::Failed: return "Failed";
  }
  return "?";
}

const char* role_name(Role r) {
  switch (r) {
    case Role::None: return "none";
    case Role::Source: return "source";
    case Role::Destination: return "destination";
  }
  return "?";
}

Result<Phase> parse_phase(const std::string& s) {
  constexpr Phase kAll[] = {Phase::Idle,     Phase::Monitoring, Phase::PreCopy,   Phase::Sync,  Phase::Handover,
                            Phase::PostCopy, Phase::Done,       Phase::Cancelled, Phase::Failed};
  if (auto p = enum_by_name(s, kAll, phase_name)) return *p;
  return Status::error(fmt::format("unknown phase '{}'", s));
}

Result<Role> parse_role(const std::string& s) {
  constexpr Role kAll[] = {Role::None, Role::Source, Role::Destination};
  if (auto r = enum_by_name(s, kAll, role_name)) return *r;
  return Status::error(fmt::format("unknown role '{}'", s));
}

bool is_active(Phase p) {
  return p == Phase::Monitoring || p == Phase::PreCopy || p == Phase::Sync || p == Phase::Handover ||
         p == Phase::PostCopy;
}

std::string describe(const EngineState& s) {
  return fmt::format("{}/{}/{}", role_name(s.role), phase_name(s.phase), io_mode_name(s.io));
}

std::span<const Edge> legal_edges() { return kEdges; }

const Edge* find_edge(const EngineState& from, const EngineState& to) {
  for (const Edge& e : kEdges)
    if (e.from_role == from.role && (e.from_phases & phase_bit(from.phase)) && e.from_io == from.io && e.to == to)
      return &e;
  return nullptr;
}

EngineState PhaseMachine::state() const {
  MutexLock lock(mu_);
  return state_;
}

MigrationRecord PhaseMachine::record() const {
  MutexLock lock(mu_);
  return file_ ? file_->record() : MigrationRecord{};
}

bool PhaseMachine::has_file() const {
  MutexLock lock(mu_);
  return file_ != nullptr;
}

StateFile* PhaseMachine::file() {
  MutexLock lock(mu_);
  return file_.get();
}

void PhaseMachine::restore(const EngineState& s, std::unique_ptr<StateFile> file) {
  MutexLock lock(mu_);
  state_ = s;
  file_ = std::move(file);
  gate_.set_mode(s.io);
}

Status PhaseMachine::check_edge(const EngineState& from, const EngineState& to, const Edge** edge) const {
  *edge = find_edge(from, to);
  if (*edge) return Status::ok();
  return Status::error(fmt::format("illegal transition {} -> {}", describe(from), describe(to)), EINVAL);
}

Status PhaseMachine::begin(std::unique_ptr<StateFile> file, const EngineState& to) {
  MutexLock serial(transition_mu_);
  const Edge* edge;
  if (Status s = check_edge(state(), to, &edge); !s) return s;
  {
    MutexLock lock(mu_);
    file_ = std::move(file);
  }
  publish(to, *edge);
  if (edge->drain) gate_.drain();
  return Status::ok();
}

Status PhaseMachine::transition(const EngineState& to, const RecordUpdate& update, Persist how) {
  MutexLock serial(transition_mu_);
  const Edge* edge;
  if (Status s = check_edge(state(), to, &edge); !s) return s;
  Status persisted = persist(to, update, how);
  if (!persisted && how != Persist::TryWrite) return persisted;
  publish(to, *edge);
  if (edge->drain) gate_.drain();
  return persisted;
}

Status PhaseMachine::update_record(const RecordUpdate& update) {
  MutexLock serial(transition_mu_);
  return persist(state(), update, Persist::Write);
}

Status PhaseMachine::persist(const EngineState& to, const RecordUpdate& update, Persist how) {
  UniqueLock lock(mu_);
  if (!file_ || how == Persist::Keep) return Status::ok();
  if (how == Persist::Remove) {
    std::string path = file_->path();
    file_.reset();
    return StateFile::remove(path);
  }
  MigrationRecord rec = file_->record();
  if (to.role != Role::None) rec.role = role_name(to.role);
  rec.phase = phase_name(to.phase);
  if (update) update(rec);
  return file_->write_record(rec);
}

void PhaseMachine::publish(const EngineState& to, const Edge&) {
  {
    MutexLock lock(mu_);
    state_ = to;
    gate_.set_mode(to.io);
  }
  cv_.notify_all();
}

bool PhaseMachine::wait_for(const std::function<bool(const EngineState&)>& pred,
                            std::chrono::milliseconds timeout) const {
  UniqueLock lock(mu_);
  return cv_.wait_for(lock, timeout, [&]() REQUIRES(mu_) { return pred(state_); });
}

}  // namespace livemig
