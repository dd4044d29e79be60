#include "plugin/migration_engine.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>

#include <fmt/format.h>

#include "common/control_reply.h"
#include "common/enum_names.h"
#include "common/json_limits.h"
#include "common/thread_name.h"
#include "common/thread_nice.h"
#include "common/transfer_planner.h"

namespace livemig {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

json error_reply(const std::string& message) { return {{"ok", false}, {"error", message}}; }

// The destination's START_OK lists what it decompresses; an older one says
// nothing and gets plain DATA.
bool accepts_zstd(const json& start_ok) {
  auto it = start_ok.is_object() ? start_ok.find("decompress") : start_ok.end();
  if (it == start_ok.end() || !it->is_array()) return false;
  return std::find(it->begin(), it->end(), json("zstd")) != it->end();
}

std::string new_migration_id() {
  std::random_device rd;
  return fmt::format("{:08x}{:08x}", rd(), rd());
}

// True if the image holds any data (SEEK_DATA finds some).
bool image_has_data(const ImageFile& image) {
  bool data = false;
  image.extents(image.size(), 0, [&](uint64_t, uint64_t, bool hole) {
    data = !hole;
    return hole;  // stop at the first data extent
  });
  return data;
}

}  // namespace

const char* accept_incoming_name(AcceptIncoming a) {
  switch (a) {
    case AcceptIncoming::Empty: return "empty";
    case AcceptIncoming::Always: return "always";
    case AcceptIncoming::Never: return "never";
  }
  return "?";
}

Result<AcceptIncoming> parse_accept_incoming(const std::string& s) {
  constexpr AcceptIncoming kAll[] = {AcceptIncoming::Empty, AcceptIncoming::Always, AcceptIncoming::Never};
  if (auto a = enum_by_name(s, kAll, accept_incoming_name)) return *a;
  return Status::error(fmt::format("accept-incoming={}: expected empty, always or never", s));
}

// ---------------------------------------------------------------- life cycle

MigrationEngine::MigrationEngine(EngineContext ctx)
    : ctx_(std::move(ctx)),
      sender_(*ctx_.image, *ctx_.geometry, stats_),
      services_{ctx_, io_, gate_, machine_, stats_, disk_pool_, sender_,
                [this](const std::string& address) { return connect(address); },
                [this](const std::string& address, const json& request) { return control_call(address, request); }} {}

MigrationEngine::~MigrationEngine() { stop(); }

Status MigrationEngine::recover() {
  struct stat st;
  if (::stat(ctx_.state_path.c_str(), &st) != 0) return Status::ok();
  auto file = StateFile::open(ctx_.state_path);
  if (!file) return Status::error(fmt::format("{} (remove the state file to start afresh)", file.status().message()));
  const MigrationRecord rec = (*file)->record();
  const SegmentGeometry& g = *ctx_.geometry;
  if (rec.image_size != g.image_size() || rec.block_size != g.block_size())
    return Status::error(fmt::format(
        "state file {} is for an image of {} bytes with {}-byte blocks, but image={} has {} bytes and "
        "block-size={}",
        ctx_.state_path, rec.image_size, rec.block_size, ctx_.image->path(), g.image_size(), g.block_size()));
  auto phase = parse_phase(rec.phase);
  auto role = parse_role(rec.role);
  if (!phase || !role)
    return Status::error(fmt::format("state file {}: {}", ctx_.state_path,
                                     (!phase ? phase.status() : role.status()).message()));
  if (*role == Role::Source) return recover_source(rec, *phase, std::move(*file));
  if (*role == Role::Destination) return recover_destination(rec, *phase, std::move(*file));
  return Status::error(fmt::format("state file {}: role '{}' owns no migration", ctx_.state_path, rec.role));
}

// A restarted source takes up where it was: before handover it resumes (its
// owed set is lost, so it compares checksums first); inside the handover
// window it stays fenced until the commit is resolved; after the commit it
// serves pulls; a handover it aborted is remembered (Failed, writable).
Status MigrationEngine::recover_source(const MigrationRecord& rec, Phase phase, std::unique_ptr<StateFile> file) {
  auto params = MigrationParams::from_json(rec.extra.value("params", json::object()), ctx_.handover_policy);
  if (!params) return Status::error(fmt::format("state file {}: {}", ctx_.state_path, params.status().message()));
  SourceSession::Begin begin;
  EngineState state;
  switch (phase) {
    case Phase::Monitoring:
    case Phase::PreCopy:
    case Phase::Sync:
      begin = SourceSession::Begin::Restarted;
      state = {Role::Source, Phase::PreCopy, IoMode::SourceTracking};
      break;
    case Phase::Handover:
      begin = SourceSession::Begin::InWindow;
      state = {Role::Source, Phase::Handover, IoMode::SourceHandover};
      break;
    case Phase::PostCopy:
    case Phase::Done:
      begin = SourceSession::Begin::Committed;
      state = {Role::Source, phase, IoMode::SourceForward};
      break;
    case Phase::Idle:  // released after Done: still fenced (its copy is older)
      machine_.restore({Role::None, Phase::Idle, IoMode::Fenced}, std::move(file));
      return Status::ok();
    default:  // Failed/Cancelled: kept for its aborted generation
      machine_.restore({Role::None, phase, IoMode::Local}, std::move(file));
      return Status::ok();
  }
  auto session = std::make_shared<SourceSession>(services_, rec.migration_id, *params, begin, rec.handover_generation);
  session_ = session;
  set_migration_nice(params->migration_nice);
  machine_.restore(state, std::move(file));
  stats_.reset();
  return Status::ok();
}

// A restarted destination: before the commit it waits for the source to
// resume (its data stays); after it, it reloads presence and pulls on.
Status MigrationEngine::recover_destination(const MigrationRecord& rec, Phase phase,
                                            std::unique_ptr<StateFile> file) {
  auto params = MigrationParams::from_json(rec.extra.value("params", json::object()), ctx_.handover_policy);
  if (!params) return Status::error(fmt::format("state file {}: {}", ctx_.state_path, params.status().message()));
  auto session = std::make_shared<DestinationSession>(services_, rec.migration_id, *params);
  EngineState state{Role::Destination, phase, IoMode::Fenced};
  switch (phase) {
    case Phase::PreCopy:
    case Phase::Sync:
    case Phase::Handover:  // a handover not committed: void
      state = {Role::Destination, Phase::PreCopy, IoMode::DestProxy};
      break;
    case Phase::PostCopy:
      state.io = IoMode::DestPost;
      break;
    case Phase::Done:
      state.io = IoMode::Local;
      break;
    default:  // Cancelled/Failed: a partial copy, or a lost commit
      state.io = rec.committed_generation > 0 ? IoMode::Stale : IoMode::Fenced;
      break;
  }
  StateFile* f = file.get();
  machine_.restore(state, std::move(file));
  session_ = session;
  set_migration_nice(params->migration_nice);
  stats_.reset();
  if (state.io == IoMode::DestPost) {
    BlockBitmap present(f->present().size());
    for (IndexRange r : set_runs(f->present())) present.set_range(r);
    session->start_committed(std::move(present));  // pulls once start() runs
  } else if (state.io == IoMode::DestProxy) {
    session->start_precopy(nullptr, true);
  }
  return Status::ok();
}

void MigrationEngine::start() {
  work_ = std::make_unique<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>(
      io_.get_executor());
  tick_timer_ = std::make_unique<boost::asio::steady_timer>(io_);
  schedule_tick();
  io_thread_ = std::thread([this] { io_.run(); });
  name_thread(io_thread_, "livemig-io");
  disk_pool_.start();
  control_pool_.start();
  forward_pool_.start();
  if (auto* s = source()) s->start(nullptr, false);
  if (auto* d = destination(); d && gate_.mode() == IoMode::DestPost) d->start_pulling();
}

void MigrationEngine::schedule_tick() {
  tick_timer_->expires_after(std::chrono::seconds(1));
  tick_timer_->async_wait([this](boost::system::error_code ec) {
    if (ec || stopping_) return;
    if (ctx_.tick) ctx_.tick();
    Session s = current_session();
    if (auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s)) (*dst)->tick();
    schedule_tick();
  });
}

void MigrationEngine::stop() {
  if (stopping_.exchange(true)) return;
  Session s = current_session();
  std::visit(
      [](auto& session) {
        if constexpr (!std::is_same_v<std::decay_t<decltype(session)>, std::monostate>) session->stop();
      },
      s);
  machine_.notify_all();
  control_pool_.stop();
  forward_pool_.stop();
  disk_pool_.stop();
  work_.reset();
  io_.stop();
  if (io_thread_.joinable()) io_thread_.join();
  tick_timer_.reset();
}

MigrationEngine::Session MigrationEngine::current_session() const {
  std::lock_guard lock(session_mu_);
  return session_;
}

// The data path reads the session without a lock: it exists while the io
// mode names it (it is replaced only after the gate drained).
SourceSession* MigrationEngine::source() const {
  auto* s = std::get_if<std::shared_ptr<SourceSession>>(&session_);
  return s ? s->get() : nullptr;
}

DestinationSession* MigrationEngine::destination() const {
  auto* d = std::get_if<std::shared_ptr<DestinationSession>>(&session_);
  return d ? d->get() : nullptr;
}

// REQUIRES: the io mode names no session (Local or Fenced).
void MigrationEngine::retire_session() {
  gate_.drain();
  Session old;
  {
    std::lock_guard lock(session_mu_);
    old = std::exchange(session_, Session{});
  }
  if (!std::holds_alternative<std::monostate>(old)) set_migration_nice(0);
  std::visit(
      [](auto& session) {
        if constexpr (!std::is_same_v<std::decay_t<decltype(session)>, std::monostate>) session->stop();
      },
      old);
}

void MigrationEngine::set_migration_nice(int nice) {
  disk_pool_.set_nice(nice);
  boost::asio::post(io_, [this, nice] {
    // Lowering the priority always works; raising it back needs CAP_SYS_NICE.
    if (int err = set_this_thread_nice(nice))
      ctx_.log(fmt::format("cannot set the io thread's nice value to {}: {}", nice, std::strerror(err)));
  });
}

// ---------------------------------------------------------------- data path

int MigrationEngine::read(void* buf, uint32_t count, uint64_t offset) {
  {
    GatePass pass(gate_);
    if (pass.mode() != IoMode::SourceHandover) return read_as(pass.mode(), buf, count, offset);
  }
  // Inside the handover window nobody knows yet which image holds the
  // truth: wait (bounded) for the resolution, outside the gate (the fence
  // drains it, and must not wait for us), then read where it says.
  machine_.wait_for([](const EngineState& s) { return s.phase != Phase::Handover; }, ctx_.peer_timeout);
  GatePass pass(gate_);
  if (pass.mode() == IoMode::SourceHandover) {
    errno = EIO;  // still unresolved
    return -1;
  }
  return read_as(pass.mode(), buf, count, offset);
}

int MigrationEngine::read_as(IoMode mode, void* buf, uint32_t count, uint64_t offset) {
  switch (mode) {
    case IoMode::Local:
    case IoMode::SourceTracking:
    case IoMode::Fenced:
      return ctx_.image->pread(buf, count, offset);
    case IoMode::SourceHandover:
      break;  // see read()
    case IoMode::SourceForward:
      return source()->forward_read(buf, count, offset);
    case IoMode::DestProxy:
      return destination()->proxy_read(buf, count, offset);
    case IoMode::DestPost:
      return destination()->read(buf, count, offset);
    case IoMode::Stale:
      // NBD has no ESTALE (nbdkit would send EINVAL): EIO, and status says why.
      errno = EIO;
      return -1;
  }
  errno = EIO;
  return -1;
}

namespace {

// Memory the tracking of a destination image may take (bitmaps and heat
// counters): with 4 KiB blocks and 1 MiB segments (about 1/6500 of the image)
// 4 GiB covers some 26 TiB.
constexpr uint64_t kMaxTrackingBytes = uint64_t{4} << 30;

// The modes of a side that is not authoritative but knows which side is.
bool forwards(IoMode m) { return m == IoMode::DestProxy || m == IoMode::SourceForward; }

}  // namespace

int MigrationEngine::change(const ForwardPayload& request, bool fast_zero) {
  return apply(request, fast_zero, /*forwarded=*/false);
}

int MigrationEngine::flush() { return apply(ForwardPayload{ForwardOp::Flush, 0, 0, 0, {}}, false, false); }

int MigrationEngine::apply(const ForwardPayload& request, bool fast_zero, bool forwarded) {
  const auto deadline = std::chrono::steady_clock::now() + 2 * ctx_.peer_timeout;
  for (;;) {
    IoMode mode;
    {
      GatePass pass(gate_);
      mode = pass.mode();
      if (mode != IoMode::SourceHandover && !forwards(mode)) {
        int rc = apply_as(mode, request, fast_zero);
        if (rc == 0 && mode == IoMode::SourceTracking) source()->on_client_write(forwarded);
        return rc;
      }
      if (forwards(mode) && !forwarded) {
        if (fast_zero) {  // a zero that crosses the network is not fast
          errno = ENOTSUP;
          return -1;
        }
        int rc = forward(mode, request);
        if (rc == 0 || errno != ESTALE) return rc;
      }
    }
    if (forwarded && forwards(mode)) {  // never sent on: the sender looks again
      errno = ESTALE;
      return -1;
    }
    // Inside the handover window, or authority moved while the request
    // travelled: wait (bounded) outside the gate, which the fence drains,
    // until the io mode changes; then look again.
    if (std::chrono::steady_clock::now() > deadline) {
      errno = EIO;  // the handover stays unresolved; status says so
      return -1;
    }
    machine_.wait_for([mode](const EngineState& s) { return s.io != mode; }, std::chrono::milliseconds(200));
  }
}

int MigrationEngine::apply_as(IoMode mode, const ForwardPayload& r, bool fast_zero) {
  const bool fua = r.flags & kForwardFua;
  if (r.op == ForwardOp::Flush) {
    if (mode != IoMode::DestPost) return ctx_.image->flush();
    if (Status s = destination()->persist(); !s) {
      errno = s.errno_value();
      return -1;
    }
    return 0;
  }
  IndexRange locked{0, 0};
  if (write_begin(r.offset, r.length, mode, &locked) < 0) return -1;
  int rc;
  switch (r.op) {
    case ForwardOp::Write: rc = ctx_.image->pwrite(r.bytes.data(), r.length, r.offset, fua); break;
    case ForwardOp::Trim: rc = ctx_.image->trim(r.length, r.offset, fua); break;
    default: rc = ctx_.image->zero(r.length, r.offset, r.flags & kForwardMayTrim, fast_zero, fua); break;
  }
  return write_end(r.offset, r.length, rc == 0, fua, mode, locked) < 0 ? -1 : rc;
}

int MigrationEngine::forward(IoMode mode, const ForwardPayload& request) {
  return mode == IoMode::DestProxy ? destination()->forward(request) : source()->forward(request);
}

int MigrationEngine::write_begin(uint64_t offset, uint64_t length, IoMode mode, IndexRange* locked) {
  switch (mode) {
    case IoMode::Local:
    case IoMode::SourceTracking:
      return 0;
    case IoMode::DestPost:
      return destination()->begin_write(offset, length, locked);
    default:
      errno = EROFS;  // not the authoritative side
      return -1;
  }
}

int MigrationEngine::write_end(uint64_t offset, uint64_t length, bool ok, bool fua, IoMode mode, IndexRange locked) {
  int saved = errno;
  int rc = 0;
  if (mode == IoMode::SourceTracking && ok && length > 0)
    source()->on_guest_write(ctx_.geometry->blocks_touched(offset, length));
  if (mode == IoMode::DestPost) {
    destination()->end_write(offset, length, ok, locked);
    if (ok && fua) {
      if (Status s = destination()->persist(); !s) {
        saved = s.errno_value();
        rc = -1;
      }
    }
  }
  errno = saved;
  return rc;
}

void MigrationEngine::on_last_client_closed() {
  Session s = current_session();
  if (auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s)) (*src)->on_last_client_closed();
}

// ---------------------------------------------------------------- links

PeerLink::Options MigrationEngine::link_options() const {
  PeerLink::Options opts;
  opts.local_name = ctx_.node_name;
  opts.read_timeout = ctx_.peer_timeout;
  opts.tls = ctx_.tls;
  return opts;
}

Result<std::shared_ptr<PeerLink>> MigrationEngine::connect(const std::string& address) {
  auto where = parse_host_port(address);
  if (!where) return Status::error(fmt::format("peer address '{}': {}", address, where.status().message()));
  auto link = PeerLink::connect(io_, *where, ctx_.secret, kPurposePeer, link_options(), kConnectTimeout);
  if (!link) return link.status();
  start_link(*link);
  return link;
}

// A control request to another plugin (a handover group's coordinator): a
// connection of its own, closed after the reply.
Result<json> MigrationEngine::control_call(const std::string& address, const json& request) {
  auto where = parse_host_port(address);
  if (!where) return Status::error(fmt::format("address '{}': {}", address, where.status().message()));
  auto link = PeerLink::connect(io_, *where, ctx_.secret, kPurposeControl, link_options(), kConnectTimeout);
  if (!link) return link.status();
  (*link)->start([](const std::shared_ptr<PeerLink>&, PeerLink::Frame&) {},  // only the reply matters
                 [](const std::shared_ptr<PeerLink>&, const Status&) {});
  auto reply = (*link)->call(ControlPayload{request.dump()}, ctx_.peer_timeout);
  (*link)->close(Status::error("control request answered", ECONNRESET));
  return control_reply_json(std::move(reply), address);
}

void MigrationEngine::on_peer_link(const std::shared_ptr<PeerLink>& link) { start_link(link); }

void MigrationEngine::start_link(const std::shared_ptr<PeerLink>& link) {
  link->start([this](auto& l, auto& f) { on_frame(l, f); }, [this](auto& l, auto& why) { on_link_closed(l, why); });
}

// Frames of a migration's link go to its session; START (which makes a
// link a migration's) to the control pool; a FORWARD on another link gets
// ESTALE (not applied); anything else is refused: DATA, PULL, HANDOVER,
// DONE are accepted only on the migration's own link.
void MigrationEngine::on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame) {
  const uint64_t id = frame.header.request_id;
  if (auto* start = std::get_if<StartPayload>(&frame.message)) {
    bool queued = control_pool_.try_post([this, link, id, p = *start] { on_start(link, id, p); });
    if (!queued) {
      Status busy = protocol_error(ErrorCode::Busy, "too many requests queued");
      link->refuse(id, busy);
    }
    return;
  }
  Session s = current_session();
  auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s);
  auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s);
  const bool own_link = (src && (*src)->owns(link.get())) || (dst && (*dst)->owns(link.get()));
  if (own_link && std::holds_alternative<ForwardPayload>(frame.message)) return on_forward(link, std::move(frame));
  if (src && own_link) return (*src)->on_frame(link, frame);
  if (dst && own_link) return (*dst)->on_frame(link, frame);
  if (std::holds_alternative<ErrorPayload>(frame.message)) {
    link->close(status_from_error(std::get<ErrorPayload>(frame.message)));
    return;
  }
  if (std::holds_alternative<ForwardPayload>(frame.message)) {
    // Not applied here. Most likely the peer adopted this link (a resume
    // START it answered) before this side read the answer and adopted it
    // too: ESTALE makes the peer send it again, and the link stays.
    link->send(ForwardReplyPayload{static_cast<uint32_t>(ESTALE)}, id);
    return;
  }
  Status s2 = protocol_error(ErrorCode::Protocol, fmt::format("{} frame on a link that is not this side's migration "
                                                              "link",
                                                              frame_type_name(frame.header.type)));
  link->refuse(id, s2);
}

// On the io thread: the request runs on the forward pool (it may wait for
// the disk, a pull, or the handover's resolution). The frame moves along:
// the request's bytes point into its payload.
void MigrationEngine::on_forward(const std::shared_ptr<PeerLink>& link, PeerLink::Frame frame) {
  const uint64_t id = frame.header.request_id;
  bool queued = forward_pool_.try_post([this, link, id, f = std::make_shared<PeerLink::Frame>(std::move(frame))] {
    const auto& request = std::get<ForwardPayload>(f->message);
    int rc = apply(request, /*fast_zero=*/false, /*forwarded=*/true);
    uint32_t error = rc == 0 ? 0 : static_cast<uint32_t>(errno ? errno : EIO);
    if (rc == 0) {
      stats_.requests_applied_for_peer.fetch_add(1, std::memory_order_relaxed);
      if (request.op != ForwardOp::Flush) (*ctx_.heat_slot)->record_write(request.offset, request.length);
    }
    link->send(ForwardReplyPayload{error}, id);
  });
  if (!queued) link->send(ForwardReplyPayload{static_cast<uint32_t>(EBUSY)}, id);
}

void MigrationEngine::on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why) {
  ctx_.log(fmt::format("link to {} closed: {}", link->remote(), why.message()));
  Session s = current_session();
  if (auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s)) (*src)->on_link_closed(link, why);
  if (auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s)) (*dst)->on_link_closed(link, why);
}

// On the control pool: a START makes this side a destination (or, with
// "resume", asks where a migration stands).
void MigrationEngine::on_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id, const StartPayload& p) {
  json params = parse_json_object(p.params_json);
  if (params.is_discarded()) params = json::object();
  if (params.value("resume", false)) return on_resume_start(link, request_id, p, params);
  bool had_copy = false;
  Status s;
  try {
    s = accept_start(link, p, &had_copy);
  } catch (const std::bad_alloc&) {  // bitmaps for a size the peer chose
    s = protocol_error(ErrorCode::Internal,
                       fmt::format("cannot migrate an image of {} bytes here: out of memory", p.image_size));
  }
  if (!s) {
    ctx_.log(fmt::format("START refused: {}", s.message()));
    link->refuse(request_id, s);
    return;
  }
  link->send(StartOkPayload{json{{"phase", "PreCopy"}, {"resync", had_copy}, {"decompress", {"zstd"}}}.dump()},
             request_id);
}

void MigrationEngine::on_resume_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id,
                                      const StartPayload& p, const json& params) {
  const SegmentGeometry& g = *ctx_.geometry;
  if (p.image_size != g.image_size() || p.block_size != g.block_size())
    return link->refuse(request_id,
                        protocol_error(ErrorCode::SizeMismatch,
                                       fmt::format("resume of migration {}: the peer's image is {} bytes in {}-byte "
                                                   "blocks, this one {} bytes in {}-byte blocks",
                                                   p.migration_id, p.image_size, p.block_size, g.image_size(),
                                                   g.block_size())));
  Session s = current_session();
  if (auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s); dst && (*dst)->id() == p.migration_id)
    return (*dst)->on_resume_start(link, request_id, json_bool(params, "probe", false, "START").value_or(false));
  uint64_t committed = json_uint(params, "committed_generation", 0, "START").value_or(0);
  if (auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s); src && (*src)->id() == p.migration_id)
    return (*src)->on_resume_start(link, request_id, committed);
  MigrationRecord rec = machine_.record();
  const bool mine = rec.migration_id == p.migration_id;
  Status refusal;
  if (mine && committed != 0 && rec.aborted_generation == committed)
    refusal = protocol_error(ErrorCode::HandoverLost,
                             fmt::format("migration {}: the operator aborted handover {} at the source; its copy "
                                         "there is the one that counts",
                                         p.migration_id, committed));
  else if (mine && rec.role == "destination" && (rec.phase == "Failed" || rec.phase == "Cancelled") &&
           rec.committed_generation == 0)
    refusal = ended_before_commit(p.migration_id, rec.phase);  // e.g. after a restart of the destination
  else
    refusal = protocol_error(ErrorCode::UnknownMigration, fmt::format("no migration {} to resume here", p.migration_id));
  link->refuse(request_id, refusal);
}

// Whether this side may become a destination now (accept-incoming=).
Status MigrationEngine::check_incoming(const EngineState& st, bool* had_copy) {
  if (is_active(st.phase))
    return protocol_error(ErrorCode::Busy, fmt::format("busy: already {} of a migration (phase {})",
                                                       role_name(st.role), phase_name(st.phase)));
  if (st.role == Role::Source || st.io == IoMode::SourceForward)
    return protocol_error(ErrorCode::Busy, "this side is fenced (it handed its image over); release it first");
  if (ctx_.accept_incoming == AcceptIncoming::Never)
    return protocol_error(ErrorCode::Busy, "this plugin does not accept migrations (accept-incoming=never)");
  if (st.io == IoMode::Stale)
    return protocol_error(ErrorCode::Busy, "this side lost a handover; release it first");
  // A partial copy of an earlier migration, or a released former source:
  // its contents are ours to overwrite, and worth comparing.
  *had_copy = st.io == IoMode::Fenced;
  if (st.io != IoMode::Local) return Status::ok();
  const bool data = image_has_data(*ctx_.image);
  *had_copy = data;
  if (ctx_.accept_incoming == AcceptIncoming::Always) return Status::ok();
  if (ctx_.client_writes() > 0)
    return protocol_error(ErrorCode::NotEmpty,
                          fmt::format("image {} is in use: NBD clients wrote to it since the plugin started; refusing "
                                      "to overwrite it (start the destination plugin with accept-incoming=always "
                                      "to allow this)",
                                      ctx_.image->path()));
  // Data that only ever arrived by a migration into this plugin (no client
  // wrote since it started) is no guest's: a released partial copy.
  if (data && !received_migration_)
    return protocol_error(ErrorCode::NotEmpty,
                          fmt::format("image {} holds data; refusing to overwrite it (start the destination plugin "
                                      "with accept-incoming=always to allow this)",
                                      ctx_.image->path()));
  return Status::ok();
}

// A source that names a base image migrates blocks equal to it as notes:
// this side must hold the same base.
Status MigrationEngine::check_base(const std::string& identity) const {
  if (identity.empty()) return Status::ok();
  if (!ctx_.base)
    return protocol_error(ErrorCode::BaseMismatch,
                          fmt::format("the source migrates against base image {}, but this plugin has no base= "
                                      "(give it the same base image, or migrate without base= at the source)",
                                      identity));
  if (ctx_.base->identity() != identity)
    return protocol_error(ErrorCode::BaseMismatch,
                          fmt::format("base image mismatch: the source's base is {}, this plugin's base {} is {} "
                                      "(not the same template)",
                                      identity, ctx_.base->path(), ctx_.base->identity()));
  return Status::ok();
}

Result<MigrationParams> MigrationEngine::destination_params(const StartPayload& p) {
  const SegmentGeometry& g = *ctx_.geometry;
  if (p.block_size != g.block_size())
    return protocol_error(ErrorCode::SizeMismatch,
                          fmt::format("block size mismatch: source {} bytes, destination block-size={}", p.block_size,
                                      g.block_size()));
  const bool resize = ctx_.image->size() != p.image_size;
  if (resize && (ctx_.image->size() != 0 || !ctx_.resize_image))
    return protocol_error(ErrorCode::SizeMismatch,
                          fmt::format("size mismatch: source image is {} bytes, destination image {} is {} bytes",
                                      p.image_size, ctx_.image->path(), ctx_.image->size()));
  if (resize) {
    // A size the peer chose: bounded here, not by an allocation failing
    // (which an allocator may not report, e.g. under overcommit or ASan).
    const uint64_t blocks = p.image_size / g.block_size() + 1;
    const uint64_t segments = p.image_size / g.segment_size() + 1;
    const uint64_t tracking = 3 * (blocks / 8 + 1) + 64 * segments;  // bitmaps, heat counters
    if (p.image_size > (uint64_t{1} << 62) || tracking > kMaxTrackingBytes)
      return protocol_error(ErrorCode::Internal,
                            fmt::format("cannot migrate an image of {} bytes here: tracking it needs about {} MiB of "
                                        "memory, more than the {} MiB allowed (out of memory)",
                                        p.image_size, tracking >> 20, kMaxTrackingBytes >> 20));
  }
  json request = parse_json_object(p.params_json);
  if (request.is_discarded())
    return protocol_error(ErrorCode::BadFrame, "START parameters are not a JSON object (or nest too deep)");
  auto params = MigrationParams::from_json(request, ctx_.handover_policy);
  if (!params) return protocol_error(ErrorCode::BadFrame, params.status().message());
  if (Status s = check_base(params->base_identity); !s) return s;
  if (resize)
    if (Status s = ctx_.resize_image(p.image_size); !s) return protocol_error(ErrorCode::Internal, s.message());
  return params;
}

Status MigrationEngine::accept_start(const std::shared_ptr<PeerLink>& link, const StartPayload& p, bool* had_copy) {
  MutexLock ops(ops_mu_);
  if (migrating_) return protocol_error(ErrorCode::Busy, "busy: this side is starting a migration of its own");
  EngineState st = machine_.state();
  if (Status s = check_incoming(st, had_copy); !s) return s;
  // An empty image grows to the source's size below; if the migration then
  // cannot start (no memory for a huge size, no state file), it shrinks
  // back, so that a later START with a sane size is not refused.
  const bool was_empty = ctx_.image->size() == 0;
  struct Shrink {
    MigrationEngine* e;
    bool armed;
    ~Shrink() {
      if (armed && e->ctx_.resize_image && e->ctx_.image->size() != 0) e->ctx_.resize_image(0);
    }
  } shrink{this, was_empty};
  auto params = destination_params(p);
  if (!params) return params.status();
  const SegmentGeometry& g = *ctx_.geometry;
  MigrationRecord rec{.migration_id = p.migration_id,
                      .role = "destination",
                      .phase = "PreCopy",
                      .peer = params->from,
                      .mode = mode_name(params->mode()),
                      .image_size = p.image_size,
                      .block_size = g.block_size(),
                      .extra = json{{"params", params->to_json()}}};
  auto file = StateFile::create(ctx_.state_path, rec);
  if (!file) return protocol_error(ErrorCode::Internal, file.status().message());
  shrink.armed = false;
  retire_session();
  received_migration_ = true;
  auto session = std::make_shared<DestinationSession>(services_, p.migration_id, *params);
  {
    std::lock_guard lock(session_mu_);
    session_ = session;
  }
  set_migration_nice(params->migration_nice);
  stats_.reset();
  session->start_precopy(link, *had_copy);
  if (Status s = machine_.begin(std::move(*file), {Role::Destination, Phase::PreCopy, IoMode::DestProxy}); !s)
    return protocol_error(ErrorCode::Internal, s.message());
  ctx_.log(fmt::format("migration {}: destination, from {}", p.migration_id, params->from));
  return Status::ok();
}

// ---------------------------------------------------------------- control

// Guest first: what the migration must not raise is the guest's latency over
// the last 10-15 s (unless the operator gave a baseline: then it is trusted
// as if measured over enough requests).
void MigrationEngine::measure_guest_baseline(MigrationParams& p) const {
  if (p.guest_latency_bound == 0 || !ctx_.guest_latency) return;
  if (p.guest_baseline_p99_ns != 0) {
    p.guest_baseline_requests = std::max(p.guest_baseline_requests, LatencyPacer::kMinBaselineRequests);
    return;
  }
  const GuestLatency::Window w = ctx_.guest_latency->baseline();
  p.guest_baseline_requests = CumulativeHistogram::count(w.now, w.since);
  p.guest_baseline_p99_ns = CumulativeHistogram::percentile(w.now, w.since, 0.99);
}

json MigrationEngine::migrate(const json& req) {
  auto params = MigrationParams::from_json(req, ctx_.handover_policy);
  if (!params) return error_reply(params.status().message());
  if (ctx_.secret.empty())
    return error_reply("this plugin has no key to authenticate to the destination: start it with secret=FILE (the "
                       "destination's key) or listen=");
  UniqueLock ops(ops_mu_);
  EngineState st = machine_.state();
  if (migrating_ || is_active(st.phase))
    return error_reply(migrating_ ? std::string("a migration is already running here (another migrate request is "
                                                "starting it)")
                                  : fmt::format("a migration is already running here ({} in phase {})",
                                                role_name(st.role), phase_name(st.phase)));
  if (st.io != IoMode::Local)
    return error_reply(st.role == Role::Destination
                           ? "this side holds the incomplete image of a migration: release it first"
                           : "this side is fenced (it handed its image over): release it first");
  // The checks hold until this request has started or failed: a second
  // migrate (or a START) meanwhile is refused, not run side by side.
  migrating_ = true;
  ops.unlock();
  struct Reset {
    std::atomic<bool>& flag;
    ~Reset() { flag = false; }
  } reset{migrating_};

  if (params->from.empty()) params->from = ctx_.listen;
  const SegmentGeometry& g = *ctx_.geometry;
  if (params->transfer_unit < g.block_size()) params->transfer_unit = g.block_size();
  params->base_identity = ctx_.base ? ctx_.base->identity() : "";
  measure_guest_baseline(*params);
  auto link = connect(params->to);
  if (!link) return error_reply(fmt::format("cannot reach destination {}", link.status().message()));
  std::string id = new_migration_id();
  StartPayload start{mode_name(params->mode()), params->to_json().dump(), g.image_size(),
                     static_cast<uint32_t>(g.block_size()), g.segment_size(), id};
  auto reply = (*link)->call(start, kReplyTimeout);
  if (!reply || !std::holds_alternative<StartOkPayload>(reply->message)) {
    Status why = reply ? Status::error("unexpected reply to START", EPROTO) : reply.status();
    (*link)->close(why);
    return error_reply(fmt::format("destination {} refused the migration: {}", params->to, why.message()));
  }
  json answer = parse_json_object(std::get<StartOkPayload>(reply->message).json);
  const bool resync = answer.is_object() && answer.value("resync", false);
  if (!accepts_zstd(answer) && params->compression.kind != Compression::Kind::Off) {
    ctx_.log(fmt::format("destination {} cannot decompress DATA (an older livemig): compression off",
                         params->to));
    params->compression = Compression{Compression::Kind::Off};
  }
  const bool monitoring = params->policy.mode == MigrationMode::Livefs && params->policy.monitor_period > 0;
  const Phase first = monitoring ? Phase::Monitoring : Phase::PreCopy;
  MigrationRecord rec{.migration_id = id,
                      .role = "source",
                      .phase = phase_name(first),
                      .peer = params->to,
                      .mode = mode_name(params->mode()),
                      .image_size = g.image_size(),
                      .block_size = g.block_size(),
                      .extra = json{{"params", params->to_json()}}};
  // A failure from here on tells the destination, which then drops the
  // migration (and is not left fenced).
  auto give_up = [&](const Status& why) {
    Status cancel = protocol_error(ErrorCode::Cancelled, "the source could not start: " + why.message());
    (*link)->send(make_error_payload(cancel), 0);
    (*link)->close(cancel);
    return error_reply(why.message());
  };
  auto file = StateFile::create(ctx_.state_path, rec);
  if (!file) return give_up(file.status());
  ops.lock();
  retire_session();
  auto session = std::make_shared<SourceSession>(services_, id, *params, SourceSession::Begin::Fresh, 0);
  {
    std::lock_guard lock(session_mu_);
    session_ = session;
  }
  set_migration_nice(params->migration_nice);
  stats_.reset();
  if (Status s = machine_.begin(std::move(*file), {Role::Source, first, IoMode::SourceTracking}); !s)
    return give_up(s);
  session->start(*link, resync);
  ctx_.log(fmt::format("migration {}: source, to {} ({})", id, params->to, mode_name(params->mode())));
  return {{"ok", true}, {"migration_id", id}, {"id", id}, {"mode", mode_name(params->mode())},
          {"to", params->to}, {"resync", resync}};
}

json MigrationEngine::group_resolve(const json&) {
  Session s = current_session();
  auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s);
  if (!src) return error_reply(fmt::format("group-resolve is for a group member's source; this side is {}",
                                           describe(machine_.state())));
  return (*src)->group_resolve();
}

json MigrationEngine::handover(const json& req) {
  Session s = current_session();
  auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s);
  EngineState st = machine_.state();
  if (!src || st.role != Role::Source)
    return error_reply(fmt::format("handover is requested at the source; this side is {}", describe(st)));
  if (!(st.phase == Phase::Monitoring || st.phase == Phase::PreCopy || st.phase == Phase::Sync ||
        st.phase == Phase::Handover))
    return error_reply(fmt::format("nothing to hand over in phase {}", phase_name(st.phase)));
  return (*src)->request_handover(req);
}

json MigrationEngine::cancel(const json&) {
  Session s = current_session();
  EngineState st = machine_.state();
  if (st.role == Role::Destination) return error_reply("cancel the migration at its source; this side is the destination");
  auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s);
  if (!src || st.role != Role::Source || !is_active(st.phase))
    return error_reply(fmt::format("no migration to cancel (phase {})", phase_name(st.phase)));
  return (*src)->request_cancel();
}

json MigrationEngine::set_rate(const json& req) {
  if (!req.contains("max_rate")) return error_reply("set-rate takes \"max_rate\": bytes per second (0: no cap)");
  auto rate = json_uint(req, "max_rate", 0, "set-rate");
  if (!rate) return error_reply(rate.status().message());
  EngineState st = machine_.state();
  if (!is_active(st.phase))
    return error_reply(fmt::format("no migration to pace (phase {})", phase_name(st.phase)));
  Session s = current_session();
  if (auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s)) (*src)->set_max_rate(*rate);
  else if (auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s)) (*dst)->set_max_rate(*rate);
  else return error_reply(fmt::format("no migration to pace: this side is {}", describe(st)));
  ctx_.log(fmt::format("max_rate set to {} bytes/s", *rate));
  return {{"ok", true}, {"max_rate", *rate}};
}

json MigrationEngine::resolve(const json& req) {
  if (!req.value("abort", false))
    return error_reply("resolve takes \"abort\": true (the operator's decision that the destination is gone)");
  Session s = current_session();
  auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s);
  if (!src) return error_reply(fmt::format("nothing to resolve: this side is {}", describe(machine_.state())));
  return (*src)->resolve_abort();
}

json MigrationEngine::release(const json& req) {
  auto unfence = json_bool(req, "unfence", false, "release");
  if (!unfence) return error_reply(unfence.status().message());
  MutexLock ops(ops_mu_);
  EngineState st = machine_.state();
  Session s = current_session();
  if (*unfence) return unfence_released(st);
  EngineState to{Role::None, Phase::Idle, IoMode::Local};
  if (st.role == Role::Source) {
    if (st.phase != Phase::Done)
      return error_reply(fmt::format("cannot release during phase {}{}", phase_name(st.phase),
                                     st.phase == Phase::PostCopy ? ": the destination still pulls from this side" : ""));
    to.io = IoMode::Fenced;  // a former source stays fenced: its image is older
  } else if (st.role == Role::Destination) {
    auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s);
    if (st.phase == Phase::PostCopy)
      return error_reply(fmt::format("cannot release: this destination is authoritative and still misses {} blocks "
                                     "that only the source holds; releasing would lose them",
                                     dst ? (*dst)->progress_json().value("blocks_left", uint64_t{0}) : 0));
    if (st.phase == Phase::PreCopy && dst && (*dst)->link_up())
      return error_reply("cannot release during phase PreCopy: the migration runs (cancel it at the source)");
  } else if (st.io == IoMode::Fenced) {
    to.io = IoMode::Fenced;
  }
  // A former source's fence outlives a restart: its state file stays,
  // phase Idle (recover() restores it fenced). Anything else is forgotten.
  const Persist how = to.io == IoMode::Fenced ? Persist::Write : Persist::Remove;
  if (st.role != Role::None || st.phase != Phase::Idle || machine_.has_file()) {
    if (Status r = machine_.transition(to, {}, how); !r) return error_reply(r.message());
  }
  retire_session();
  return {{"ok", true}, {"was", phase_name(st.phase)}, {"fenced", to.io == IoMode::Fenced}};
}

// The operator's word that a released former
// source's stale copy is now a disk of its own (its VM runs elsewhere).
json MigrationEngine::unfence_released(const EngineState& st) {
  if (st.role != Role::None || st.phase != Phase::Idle || st.io != IoMode::Fenced)
    return error_reply(fmt::format("nothing to unfence: this side is {} ({}); only a released former source is "
                                   "fenced idle",
                                   describe(st), st.role == Role::Source ? "release it first" : "not fenced"));
  if (Status r = machine_.transition({Role::None, Phase::Idle, IoMode::Local}, {}, Persist::Remove); !r)
    return error_reply(r.message());
  ctx_.log("released former source unfenced by the operator: its copy is writable again");
  return {{"ok", true}, {"was", "Idle"}, {"fenced", false}};
}

json MigrationEngine::verify(const json& req) {
  IoMode mode = gate_.mode();
  if (mode == IoMode::DestProxy) return error_reply("this side is a destination before handover: its image is not complete");
  if (mode == IoMode::DestPost)
    return error_reply(fmt::format("this destination still misses blocks; verify once the migration is Done"));
  if (mode == IoMode::Stale) return error_reply("this destination lost its handover: its image is not the migration's");
  const uint64_t size = ctx_.image->size();
  auto offset_field = json_uint(req, "offset", 0, "verify");
  if (!offset_field) return error_reply(offset_field.status().message());
  const uint64_t offset = *offset_field;
  auto length_field = json_uint(req, "length", size - std::min(offset, size), "verify");
  auto range_field = json_uint(req, "range_size", uint64_t{64} << 20, "verify");
  if (!length_field) return error_reply(length_field.status().message());
  if (!range_field) return error_reply(range_field.status().message());
  const uint64_t length = *length_field, range = *range_field;
  if (offset > size || length > size - offset) return error_reply("verify: range beyond the image's end");
  if (range == 0 || range > (uint64_t{1} << 30)) return error_reply("verify: range_size must be from 1 to 1G");
  if (length / range > 1'000'000) return error_reply("verify: too many ranges; raise range_size");
  json hashes = json::array();
  for (uint64_t off = offset; off < offset + length; off += range) {
    auto h = sender_.hash_range(off, std::min(range, offset + length - off));
    if (!h) return error_reply(fmt::format("verify: {}", h.status().message()));
    hashes.push_back(fmt::format("{:016x}", *h));
  }
  return {{"ok", true}, {"size", size}, {"offset", offset}, {"length", length}, {"range_size", range},
          {"algorithm", "xxh3-64"}, {"hashes", std::move(hashes)}};
}

json MigrationEngine::segments_json(size_t limit) {
  Session s = current_session();
  if (auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s)) return (*src)->segments_json(limit);
  return json::array();
}

// ---------------------------------------------------------------- status

json MigrationEngine::progress_json() {
  Session s = current_session();
  json j;
  std::shared_ptr<PeerLink> link;
  if (auto* src = std::get_if<std::shared_ptr<SourceSession>>(&s)) j = (*src)->progress_json();
  else if (auto* dst = std::get_if<std::shared_ptr<DestinationSession>>(&s)) j = (*dst)->progress_json();
  else return nullptr;
  const SegmentGeometry& g = *ctx_.geometry;
  uint64_t left = j.value("blocks_left", uint64_t{0});
  const uint64_t wire = j.value("wire_bytes", uint64_t{0});  // the session's links (session_link.h)
  EngineStats::Rates rates = stats_.sample_rates(wire, left);
  double elapsed = stats_.started_at == Clock::time_point{}
                       ? 0
                       : std::chrono::duration<double>(Clock::now() - stats_.started_at).count();
  j.update(json{{"elapsed_seconds", elapsed},
                {"blocks_total", g.block_count()},
                {"bytes_left", left * g.block_size()},
                {"rounds", stats_.rounds.load()},
                {"data_blocks_sent", stats_.data_blocks_sent.load()},
                {"data_blocks_pushed", stats_.data_blocks_pushed.load()},
                {"zero_blocks_sent", stats_.zero_blocks_sent.load()},
                {"payload_bytes_sent", stats_.payload_bytes_sent.load()},
                {"blocks_dirtied", stats_.blocks_dirtied.load()},
                {"blocks_resynced", stats_.blocks_resynced.load()},
                {"blocks_received", stats_.blocks_received.load()},
                {"link_bytes_per_second", rates.link_bytes_per_s},
                {"dirty_blocks_per_second", rates.dirty_blocks_per_s},
                {"eta_seconds", rates.eta_seconds},
                {"handover_pause_ms", stats_.handover_pause_ms.load()},
                {"total_time_ms", stats_.total_time_ms.load()},
                {"demand_pulls", stats_.demand_pulls.load()},
                {"background_pulls", stats_.background_pulls.load()},
                {"pull_errors", stats_.pull_errors.load()},
                {"reconnects", stats_.reconnects.load()},
                {"forwarded_requests", stats_.forwarded_requests.load()},
                {"forwarded_bytes", stats_.forwarded_bytes.load()},
                {"requests_applied_for_peer", stats_.requests_applied_for_peer.load()}});
  if (uint64_t frames = stats_.compressed_frames.load(); frames > 0) {
    json& c = j["compression"];  // the source's governor may have started it
    c.update({{"frames", frames},
              {"plain_bytes", stats_.compressed_plain_bytes.load()},
              {"wire_bytes", stats_.compressed_wire_bytes.load()}});
  }
  const uint64_t base_blocks = stats_.base_blocks_sent.load() + stats_.base_blocks_received.load();
  if (base_blocks > 0 || stats_.base_mismatches.load() > 0)
    j["base"] = {{"blocks", base_blocks},
                 {"bytes", base_blocks * g.block_size()},
                 {"refused_notes", stats_.base_mismatches.load()}};
  if (json delay = stats_.read_delay.summary(); !delay.is_null()) j["read_delay_ms"] = delay;
  if (json delay = stats_.forward_delay.summary(); !delay.is_null()) j["forward_delay_ms"] = delay;
  return j;
}

json MigrationEngine::status_json() {
  EngineState st = machine_.state();
  json j = {{"role", role_name(st.role)},
            {"phase", phase_name(st.phase)},
            {"io_mode", io_mode_name(st.io)},
            {"authoritative", io_mode_authoritative(st.io)},
            // Whether this side's image takes no writes, its clients' or
            // forwarded ones (forwarded writes are not refused: issue #17).
            {"fenced", st.io == IoMode::Fenced || st.io == IoMode::SourceHandover || st.io == IoMode::SourceForward ||
                           st.io == IoMode::Stale}};
  if (json m = progress_json(); !m.is_null()) {
    j["migration"] = m;
    if (m.contains("last_error")) j["last_error"] = m["last_error"];
    if (m.contains("needs_resolution")) j["needs_resolution"] = m["needs_resolution"];
  }
  if (int e = ctx_.image->sync_error(); e != 0)
    j["image_sync_error"] = fmt::format("{}: an fdatasync failed ({}); every flush fails until the plugin is "
                                        "restarted and the disk checked",
                                        ctx_.image->path(), std::strerror(e));
  return j;
}

}  // namespace livemig
