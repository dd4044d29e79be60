#include "plugin/migration_engine.h"

#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <random>

#include <boost/asio/executor_work_guard.hpp>
#include <fmt/format.h>

#include "common/transfer_planner.h"

namespace livemig {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// Bytes of pushed data queued on the link before the pusher waits.
constexpr size_t kPushWindowBytes = 8u << 20;
// Background pulls in flight at the destination, in transfer units. Small, so
// that a demand pull waits behind at most this much (invariant: a demand read
// waits for at most the in-flight units, not for a queue).
constexpr uint64_t kBackgroundWindowUnits = 2;
// Block data in one DATA frame at most (a multiple of every block size).
constexpr uint64_t kMaxFrameData = 256u << 10;
// Pushed bytes before the pusher trusts its measured throughput.
constexpr uint64_t kMinPushSample = 4u << 20;
// Queued push data the source lets drain before it fences.
constexpr size_t kHandoverDrainBytes = 256u << 10;
// Pushed bytes a destination receives between two fdatasyncs.
constexpr uint64_t kPushSyncBytes = 8u << 20;
// HANDOVER ranges per frame (each range is 20 bytes on the wire).
constexpr size_t kHandoverRangesPerFrame = 512 * 1024;
constexpr auto kConnectTimeout = std::chrono::seconds(10);
constexpr auto kReplyTimeout = std::chrono::seconds(60);

json error_reply(const std::string& message) { return {{"ok", false}, {"error", message}}; }

std::string new_migration_id() {
  std::random_device rd;
  return fmt::format("{:08x}{:08x}", rd(), rd());
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int64_t ms_since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

const char* io_mode_name(IoMode m) {
  switch (m) {
    case IoMode::Local: return "local";
    case IoMode::SourceTracking: return "source-tracking";
    case IoMode::Fenced: return "fenced";
    case IoMode::DestProxy: return "destination-proxy";
    case IoMode::DestPost: return "destination-postcopy";
  }
  return "?";
}

bool active_phase(Phase p) {
  return p == Phase::Monitoring || p == Phase::PreCopy || p == Phase::Sync || p == Phase::Handover || p == Phase::PostCopy;
}

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
  for (Phase p : {Phase::Idle, Phase::Monitoring, Phase::PreCopy, Phase::Sync, Phase::Handover, Phase::PostCopy, Phase::Done,
                  Phase::Cancelled, Phase::Failed})
    if (s == phase_name(p)) return p;
  return Status::error(fmt::format("unknown phase '{}'", s));
}

// ---------------------------------------------------------------- life cycle

MigrationEngine::MigrationEngine(EngineContext ctx) : ctx_(std::move(ctx)) {}

MigrationEngine::~MigrationEngine() { stop(); }

Status MigrationEngine::recover() {
  struct stat st;
  if (::stat(ctx_.state_path.c_str(), &st) != 0) return Status::ok();
  auto sf = StateFile::open(ctx_.state_path);
  if (!sf)
    return Status::error(fmt::format("{} (remove the state file to start afresh)", sf.status().message()));
  const MigrationRecord rec = (*sf)->record();
  const SegmentGeometry& g = *ctx_.geometry;
  if (rec.image_size != g.image_size() || rec.block_size != g.block_size())
    return Status::error(fmt::format(
        "state file {} is for an image of {} bytes with {}-byte blocks, but image={} has {} bytes and "
        "block-size={}",
        ctx_.state_path, rec.image_size, rec.block_size, ctx_.image->path(), g.image_size(), g.block_size()));
  auto phase = parse_phase(rec.phase);
  if (!phase) return Status::error(fmt::format("state file {}: {}", ctx_.state_path, phase.status().message()));
  std::lock_guard lock(mu_);
  migration_id_ = rec.migration_id;
  peer_address_ = rec.peer;
  if (auto p = MigrationParams::from_json(rec.extra.value("params", json::object()), ctx_.handover_policy))
    params_ = *p;
  params_.mode = rec.mode;
  const bool handed_over = *phase == Phase::Handover || *phase == Phase::PostCopy || *phase == Phase::Done;
  if (!handed_over) {
    // The migration never handed over: this side still (or again) owns its
    // image. The migration is abandoned; start a new one.
    StateFile::remove(ctx_.state_path);
    phase_ = Phase::Failed;
    last_error_ = fmt::format("restarted during {} as {}: migration {} abandoned", rec.phase, rec.role,
                              rec.migration_id);
    if (rec.role == "destination") {  // an incomplete image: refuse writes until released
      role_ = Role::Destination;
      io_mode_ = IoMode::Fenced;
    } else {
      role_ = Role::None;
    }
    return Status::ok();
  }
  if (rec.role == "source") {
    role_ = Role::Source;
    phase_ = *phase == Phase::Done ? Phase::Done : Phase::PostCopy;
    io_mode_ = IoMode::Fenced;
    reads_to_destination_ = *phase != Phase::Handover;
  } else if (rec.role == "destination") {
    role_ = Role::Destination;
    phase_ = *phase;
    if (*phase == Phase::Done) {
      io_mode_ = IoMode::Local;
    } else {
      present_ = std::make_unique<BlockBitmap>(g.block_count());
      for (IndexRange r : set_runs((*sf)->present())) present_->set_range(r);
      pulling_ = std::make_unique<BlockBitmap>(g.block_count());
      segment_locks_ = std::make_unique<std::mutex[]>(g.segment_count() + 1);
      phase_ = Phase::PostCopy;
      io_mode_ = IoMode::DestPost;
    }
  } else {
    return Status::error(fmt::format("state file {}: unknown role '{}'", ctx_.state_path, rec.role));
  }
  state_ = std::move(*sf);
  started_at_ = Clock::now();
  return Status::ok();
}

void MigrationEngine::start() {
  work_ = std::make_unique<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>(
      io_.get_executor());
  tick_timer_ = std::make_unique<boost::asio::steady_timer>(io_);
  schedule_tick();
  io_thread_ = std::thread([this] { io_.run(); });
  std::lock_guard lock(mu_);
  if (role_ == Role::Destination && phase_ == Phase::PostCopy)
    worker_ = std::thread([this] { destination_run(); });
}

void MigrationEngine::schedule_tick() {
  tick_timer_->expires_after(std::chrono::seconds(1));
  tick_timer_->async_wait([this](boost::system::error_code ec) {
    if (ec || stopping_) return;
    if (ctx_.tick) ctx_.tick();
    schedule_tick();
  });
}

void MigrationEngine::stop() {
  if (stopping_.exchange(true)) return;
  {
    std::lock_guard lock(mu_);
    cancel_requested_ = true;
    if (link_) link_->close(Status::error("plugin is shutting down", ESHUTDOWN));
  }
  cv_.notify_all();
  pull_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  while (pull_servers_.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  work_.reset();
  io_.stop();
  if (io_thread_.joinable()) io_thread_.join();
  tick_timer_.reset();
}

// ---------------------------------------------------------------- data path

int MigrationEngine::read(void* buf, uint32_t count, uint64_t offset) {
  IoMode mode = io_mode_.load();
  // The side that is not authoritative answers reads through the one that is.
  if (mode == IoMode::DestProxy || (mode == IoMode::Fenced && reads_to_destination_.load()))
    return proxy_read(buf, count, offset);
  if (mode == IoMode::DestPost) {
    IndexRange blocks = ctx_.geometry->blocks_touched(offset, count);
    if (!present_->all_set(blocks)) {
      auto t0 = Clock::now();
      if (Status s = ensure_present(blocks, true); !s) {
        errno = s.errno_value();
        return -1;
      }
      record_read_delay(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
  }
  return ctx_.image->pread(buf, count, offset);
}

int MigrationEngine::begin_write(uint64_t offset, uint64_t length, IndexRange* locked) {
  // Counted before the fence check (Dekker): the fencer sets Fenced, then
  // waits for the count to drop to zero, so no write slips past it.
  inflight_writes_.fetch_add(1);
  IoMode mode = io_mode_.load();
  if (mode == IoMode::Fenced || mode == IoMode::DestProxy) {
    inflight_writes_.fetch_sub(1);
    errno = EROFS;
    return -1;
  }
  if (mode != IoMode::DestPost || length == 0) return 0;
  const SegmentGeometry& g = *ctx_.geometry;
  IndexRange touched = g.blocks_touched(offset, length);
  if (present_->all_set(touched)) return 0;
  // A write that covers only part of a missing block needs the rest of the
  // block from the source first.
  IndexRange covered = g.blocks_covered(offset, length);
  for (uint64_t edge : {touched.first, touched.last - 1}) {
    bool partial = edge < covered.first || edge >= covered.last;
    if (partial && !present_->test(edge)) {
      if (Status s = ensure_present({edge, edge + 1}, true); !s) {
        inflight_writes_.fetch_sub(1);
        errno = s.errno_value();
        return -1;
      }
    }
  }
  *locked = g.segments_touched(offset, length);
  lock_segments(*locked);
  return 0;
}

void MigrationEngine::end_write(uint64_t offset, uint64_t length, bool ok, IndexRange locked) {
  if (ok && length > 0) {
    // Read the mode after the data is in the image: a migration that started
    // before this point sees the block owed (see the design notes).
    IoMode mode = io_mode_.load();
    if ((mode == IoMode::SourceTracking || mode == IoMode::Fenced) && owed_) {
      IndexRange blocks = ctx_.geometry->blocks_touched(offset, length);
      owed_->set_range(blocks);
      blocks_dirtied_.fetch_add(blocks.count(), std::memory_order_relaxed);
    }
    if (!locked.empty()) {
      IndexRange blocks = ctx_.geometry->blocks_touched(offset, length);
      present_->set_range(blocks);
      std::lock_guard lock(pull_mu_);
      unpersisted_.push_back(blocks);
    }
  }
  if (!locked.empty()) unlock_segments(locked);
  inflight_writes_.fetch_sub(1);
}

void MigrationEngine::lock_segments(IndexRange segs) {
  for (uint64_t s = segs.first; s < segs.last; ++s) segment_locks_[s].lock();
}

void MigrationEngine::unlock_segments(IndexRange segs) {
  for (uint64_t s = segs.last; s-- > segs.first;) segment_locks_[s].unlock();
}

int MigrationEngine::flush() {
  if (io_mode_.load() == IoMode::DestPost) {
    Status s = persist();
    if (!s) {
      errno = s.errno_value();
      return -1;
    }
    return 0;
  }
  return ctx_.image->flush();
}

void MigrationEngine::on_last_client_closed() {
  std::lock_guard lock(mu_);
  if (role_ == Role::Source && (phase_ == Phase::Monitoring || phase_ == Phase::PreCopy || phase_ == Phase::Sync) &&
      params_.handover == "on-disconnect") {
    handover_requested_ = true;
    cv_.notify_all();
  }
}

// ---------------------------------------------------------------- shared helpers

std::shared_ptr<PeerLink> MigrationEngine::current_link() {
  std::lock_guard lock(mu_);
  return link_;
}

void MigrationEngine::set_phase(Phase p) {
  phase_ = p;
  cv_.notify_all();
}

// REQUIRES: mu_ held.
Status MigrationEngine::save_record() {
  if (!state_) return Status::ok();
  MigrationRecord rec = state_->record();
  rec.phase = phase_name(phase_);
  rec.extra["params"] = params_.to_json();
  return state_->write_record(rec);
}

void MigrationEngine::fail(const std::string& why, Phase end) {
  ctx_.log(fmt::format("migration {}: {}", end == Phase::Cancelled ? "cancelled" : "failed", why));
  std::unique_lock lock(mu_);
  if (!active_phase(phase_) && phase_ != Phase::Idle) return;
  last_error_ = why;
  IoMode mode = io_mode_.load();
  if (mode == IoMode::SourceTracking) {
    // Before handover the source still owns the data: it stops tracking and
    // goes on serving.
    io_mode_ = IoMode::Local;
    role_ = Role::None;
  } else if (mode == IoMode::DestProxy) {
    // The destination's image is incomplete: it keeps refusing writes (and
    // claims no authority) until released or given a new migration.
    io_mode_ = IoMode::Fenced;
  }
  if (mode == IoMode::SourceTracking || mode == IoMode::DestProxy) {
    state_.reset();
    StateFile::remove(ctx_.state_path);
  }
  set_phase(end);
  auto link = std::move(link_);
  lock.unlock();
  if (link) link->close(Status::error(why, EIO));
}

void MigrationEngine::record_read_delay(double ms) {
  std::lock_guard lock(delay_mu_);
  if (read_delays_ms_.size() < 1'000'000) read_delays_ms_.push_back(ms);
}

// ---------------------------------------------------------------- control

json MigrationEngine::migrate(const json& req) {
  auto params = MigrationParams::from_json(req, ctx_.handover_policy);
  if (!params) return error_reply(params.status().message());
  {
    std::lock_guard lock(mu_);
    if (active_phase(phase_))
      return error_reply(fmt::format("a migration is already running here ({} in phase {}, id {})",
                                     role_name(role_), phase_name(phase_), migration_id_));
    if (io_mode_.load() != IoMode::Local)
      return error_reply(role_ == Role::Destination
                             ? "this side holds the incomplete image of an abandoned migration: release it first"
                             : "this side is fenced (it handed its image over): release it first");
  }
  if (params->from.empty()) params->from = ctx_.listen;
  const SegmentGeometry& g = *ctx_.geometry;
  if (params->transfer_unit < g.block_size()) params->transfer_unit = g.block_size();
  auto where = parse_host_port(params->to).value();
  PeerLink::Options opts;
  opts.local_name = ctx_.node_name;
  opts.read_timeout = ctx_.peer_timeout;
  auto link = PeerLink::connect(io_, where, ctx_.secret, kPurposePeer, opts, kConnectTimeout);
  if (!link) return error_reply(fmt::format("cannot reach destination {}", link.status().message()));
  (*link)->start([this](auto& l, auto& f) { on_frame(l, f); }, [this](auto& l, auto& why) { on_link_closed(l, why); });

  std::string id = new_migration_id();
  StartPayload start{params->mode, params->to_json().dump(), g.image_size(),
                     static_cast<uint32_t>(g.block_size()), g.segment_size(), id};
  auto reply = (*link)->call(start, kReplyTimeout);
  if (!reply) {
    (*link)->close(reply.status());
    return error_reply(fmt::format("destination {} refused the migration: {}", params->to, reply.status().message()));
  }
  MigrationRecord rec{id, "source", "PreCopy", params->to, params->mode, g.image_size(), g.block_size(),
                      json{{"params", params->to_json()}}};
  auto sf = StateFile::create(ctx_.state_path, rec);
  if (!sf) {
    (*link)->close(sf.status());
    return error_reply(sf.status().message());
  }
  if (worker_.joinable()) worker_.join();
  {
    std::lock_guard lock(mu_);
    owed_ = std::make_unique<BlockBitmap>(g.block_count());
    owed_->set_range({0, g.block_count()});
    heat_at_start_ = heat().cumulative_snapshot();
    send_set_.assign(g.segment_count(), SegmentDecision{});
    rank_heat_.assign(g.segment_count(), HeatCounts{});
    state_ = std::move(*sf);
    role_ = Role::Source;
    params_ = *params;
    migration_id_ = id;
    peer_address_ = params->to;
    link_ = *link;
    handover_requested_ = cancel_requested_ = ready_ = converged_ = false;
    ready_reason_.clear();
    last_error_.clear();
    peer_progress_ = json();
    started_at_ = Clock::now();
    total_time_ms_ = handover_pause_ms_ = -1;
    rounds_ = data_blocks_sent_ = data_blocks_pushed_ = zero_blocks_sent_ = payload_bytes_sent_ = blocks_dirtied_ = 0;
    set_phase(Phase::PreCopy);
    reads_to_destination_ = false;
    io_mode_ = IoMode::SourceTracking;
    worker_ = std::thread([this] { source_run(); });
  }
  return {{"ok", true}, {"migration_id", id}, {"id", id}, {"mode", params->mode}, {"to", params->to}};
}

json MigrationEngine::handover(const json&) {
  std::unique_lock lock(mu_);
  if (role_ != Role::Source)
    return error_reply(fmt::format("handover is requested at the source; this side is {} ({})", role_name(role_),
                                   phase_name(phase_)));
  if (phase_ != Phase::Monitoring && phase_ != Phase::PreCopy && phase_ != Phase::Sync && phase_ != Phase::Handover)
    return error_reply(fmt::format("nothing to hand over in phase {}", phase_name(phase_)));
  handover_requested_ = true;
  cv_.notify_all();
  cv_.wait_for(lock, std::chrono::seconds(120), [&] {
    return phase_ == Phase::PostCopy || phase_ == Phase::Done || phase_ == Phase::Failed ||
           phase_ == Phase::Cancelled;
  });
  if (phase_ != Phase::PostCopy && phase_ != Phase::Done)
    return error_reply(fmt::format("handover did not complete: phase {}: {}", phase_name(phase_), last_error_));
  return {{"ok", true}, {"phase", phase_name(phase_)}, {"handover_pause_ms", handover_pause_ms_.load()}};
}

json MigrationEngine::cancel(const json&) {
  std::unique_lock lock(mu_);
  if (role_ == Role::Destination)
    return error_reply("cancel the migration at its source; this side is the destination");
  if (role_ != Role::Source || !active_phase(phase_))
    return error_reply(fmt::format("no migration to cancel (phase {})", phase_name(phase_)));
  if (phase_ != Phase::Monitoring && phase_ != Phase::PreCopy && phase_ != Phase::Sync)
    return error_reply(fmt::format("cannot cancel in phase {}: the destination is authoritative after handover",
                                   phase_name(phase_)));
  cancel_requested_ = true;
  cv_.notify_all();
  lock.unlock();
  if (worker_.joinable()) worker_.join();
  lock.lock();
  return {{"ok", true}, {"phase", phase_name(phase_)}};
}

json MigrationEngine::release(const json&) {
  std::lock_guard lock(mu_);
  if (active_phase(phase_))
    return error_reply(fmt::format("cannot release during phase {}", phase_name(phase_)));
  state_.reset();
  StateFile::remove(ctx_.state_path);
  Phase was = phase_;
  // A fenced source stays fenced: its image is older than the destination's.
  // An abandoned destination serves its (incomplete) image again.
  if (role_ == Role::Destination && io_mode_.load() == IoMode::Fenced) io_mode_ = IoMode::Local;
  role_ = Role::None;
  set_phase(Phase::Idle);
  return {{"ok", true}, {"was", phase_name(was)}, {"fenced", io_mode_.load() == IoMode::Fenced}};
}

json MigrationEngine::verify(const json& req) {
  IoMode mode = io_mode_.load();
  if (mode == IoMode::DestProxy)
    return error_reply("this side is a destination before handover: its image is not complete");
  if (mode == IoMode::DestPost)
    return error_reply(fmt::format("this destination still misses {} blocks; verify once the migration is Done",
                                   present_->size() - present_->count()));
  const uint64_t size = ctx_.image->size();
  uint64_t offset = req.value("offset", uint64_t{0});
  uint64_t length = req.value("length", size - std::min(offset, size));
  uint64_t range = req.value("range_size", uint64_t{64} << 20);
  if (offset > size || length > size - offset) return error_reply("verify: range beyond the image's end");
  if (range == 0 || range > (uint64_t{1} << 30)) return error_reply("verify: range_size must be from 1 to 1G");
  if (length / range > 1'000'000) return error_reply("verify: too many ranges; raise range_size");
  json hashes = json::array();
  std::vector<char> buf(std::min<uint64_t>(range, 4u << 20));
  for (uint64_t off = offset; off < offset + length; off += range) {
    uint64_t n = std::min(range, offset + length - off);
    XXH3_state_t* st = XXH3_createState();
    XXH3_64bits_reset(st);
    for (uint64_t done = 0; done < n;) {
      uint64_t chunk = std::min<uint64_t>(buf.size(), n - done);
      if (ctx_.image->pread(buf.data(), chunk, off + done) < 0) {
        XXH3_freeState(st);
        return error_reply(fmt::format("verify: reading {} at {}: {}", chunk, off + done, std::strerror(errno)));
      }
      XXH3_64bits_update(st, buf.data(), chunk);
      done += chunk;
    }
    hashes.push_back(fmt::format("{:016x}", XXH3_64bits_digest(st)));
    XXH3_freeState(st);
  }
  return {{"ok", true}, {"size", size}, {"offset", offset}, {"length", length}, {"range_size", range},
          {"algorithm", "xxh3-64"}, {"hashes", std::move(hashes)}};
}

json MigrationEngine::progress_json() {
  const SegmentGeometry& g = *ctx_.geometry;
  json j;
  uint64_t left = 0;
  if (role_ == Role::Source && owed_) left = owed_->count();
  if (role_ == Role::Destination && present_) left = present_->size() - present_->count();
  // After handover the destination knows what is left; the source shows
  // what it last reported.
  if (role_ == Role::Source && (phase_ == Phase::PostCopy || phase_ == Phase::Done))
    left = phase_ == Phase::Done             ? 0
           : peer_progress_.is_object() ? peer_progress_.value("blocks_left", left)
                                        : left;
  if (role_ == Role::Destination && phase_ == Phase::Done) left = 0;
  uint64_t wire = link_bytes_before_.load();
  if (link_) wire += link_->bytes_sent() + link_->bytes_received();
  double elapsed = started_at_ == Clock::time_point{} ? 0 : seconds_since(started_at_);
  // Rates over the time since the previous status call (at most every 0.5 s).
  double now = seconds_since(Clock::time_point{});
  if (now - last_rate_time_ >= 0.5) {
    double dt = now - last_rate_time_;
    if (last_rate_time_ > 0) {
      link_rate_ = (wire - last_rate_bytes_) / dt;
      dirty_rate_ = (blocks_dirtied_.load() - last_rate_dirty_) / dt;
      // Blocks done per second: holes count, though they cost no bandwidth.
      double done_rate = (double(last_rate_left_) - double(left)) / dt;
      block_rate_ = done_rate > 0 ? done_rate : block_rate_ * 0.5;
    }
    last_rate_time_ = now;
    last_rate_bytes_ = wire;
    last_rate_dirty_ = blocks_dirtied_.load();
    last_rate_left_ = left;
  }
  double eta = left == 0 ? 0 : block_rate_ > 0.5 ? left / block_rate_ : -1;
  j = {{"id", migration_id_},
       {"mode", params_.mode},
       {"peer", peer_address_},
       {"params", params_.to_json()},
       {"elapsed_seconds", elapsed},
       {"blocks_total", g.block_count()},
       {"blocks_left", left},
       {"bytes_left", left * g.block_size()},
       {"rounds", rounds_.load()},
       {"ready", ready_},
       {"converged", converged_},
       {"ready_reason", ready_reason_},
       {"data_blocks_sent", data_blocks_sent_.load()},
       {"data_blocks_pushed", data_blocks_pushed_.load()},
       {"zero_blocks_sent", zero_blocks_sent_.load()},
       {"payload_bytes_sent", payload_bytes_sent_.load()},
       {"blocks_dirtied", blocks_dirtied_.load()},
       {"blocks_received", blocks_received_.load()},
       {"wire_bytes", wire},
       {"link_bytes_per_second", link_rate_},
       {"dirty_blocks_per_second", dirty_rate_},
       {"eta_seconds", eta},
       {"handover_pause_ms", handover_pause_ms_.load()},
       {"total_time_ms", total_time_ms_.load()},
       {"demand_pulls", demand_pulls_.load()},
       {"background_pulls", background_pulls_.load()},
       {"link_up", link_ != nullptr && !link_->closed()}};
  {
    std::lock_guard lock(delay_mu_);
    if (!read_delays_ms_.empty()) {
      std::vector<double> d = read_delays_ms_;
      std::sort(d.begin(), d.end());
      double sum = 0;
      for (double x : d) sum += x;
      j["read_delay_ms"] = {{"count", d.size()},
                            {"mean", sum / d.size()},
                            {"p50", d[d.size() / 2]},
                            {"p99", d[std::min(d.size() - 1, d.size() * 99 / 100)]},
                            {"max", d.back()}};
    }
  }
  if (!peer_progress_.is_null()) j["peer_progress"] = peer_progress_;
  if (!last_error_.empty()) j["last_error"] = last_error_;
  return j;
}

json MigrationEngine::status_json() {
  std::lock_guard lock(mu_);
  IoMode mode = io_mode_.load();
  bool authoritative = mode == IoMode::Local || mode == IoMode::SourceTracking || mode == IoMode::DestPost;
  json j = {{"role", role_name(role_)},
            {"phase", phase_name(phase_)},
            {"io_mode", io_mode_name(mode)},
            {"authoritative", authoritative},
            {"fenced", mode == IoMode::Fenced}};
  if (role_ != Role::None || !migration_id_.empty()) j["migration"] = progress_json();
  if (!last_error_.empty()) j["last_error"] = last_error_;
  return j;
}

// ---------------------------------------------------------------- frames

void MigrationEngine::on_peer_link(const std::shared_ptr<PeerLink>& link) {
  link->start([this](auto& l, auto& f) { on_frame(l, f); }, [this](auto& l, auto& why) { on_link_closed(l, why); });
}

void MigrationEngine::on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame) {
  const FrameHeader& h = frame.header;
  std::visit(
      [&](auto& p) {
        using T = std::decay_t<decltype(p)>;
        if constexpr (std::is_same_v<T, StartPayload>) on_start(link, h, p);
        else if constexpr (std::is_same_v<T, DataPayload>) on_data(link, h, p);
        else if constexpr (std::is_same_v<T, PullPayload>) on_pull(link, h, p);
        else if constexpr (std::is_same_v<T, HandoverPayload>) on_handover(link, h, p);
        else if constexpr (std::is_same_v<T, DonePayload>) on_done(p);
        else if constexpr (std::is_same_v<T, ErrorPayload>) on_peer_error(p);
        else if constexpr (std::is_same_v<T, ProgressPayload>) {
          std::lock_guard lock(mu_);
          peer_progress_ = json::parse(p.json, nullptr, false);
        } else if constexpr (std::is_same_v<T, CancelPullPayload>) {
          // Pulls are answered at once; there is nothing queued to cancel.
        } else {
          link->send(make_error_payload(protocol_error(
                         ErrorCode::Protocol, fmt::format("unexpected {} frame on a peer link", frame_type_name(h.type)))),
                     h.request_id);
          link->close(Status::error("unexpected frame", EPROTO));
        }
      },
      frame.message);
}

void MigrationEngine::on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why) {
  ctx_.log(fmt::format("link to {} closed: {}", link->remote(), why.message()));
  std::unique_lock lock(mu_);
  if (link != link_) return;
  link_bytes_before_ += link->bytes_sent() + link->bytes_received();
  link_.reset();
  Phase phase = phase_;
  Role role = role_;
  lock.unlock();
  if (role == Role::Destination) {
    // Pulls in flight died with the link: forget them so they are asked again.
    std::lock_guard pl(pull_mu_);
    for (auto& [id, e] : pulls_) {
      if (e.proxy_buf) e.proxy_failed = true;
      else pulling_->clear_range(e.blocks);
    }
    std::erase_if(pulls_, [](auto& kv) { return !kv.second.proxy_buf; });
    background_bytes_in_flight_ = 0;
    pull_cv_.notify_all();
  }
  if (phase == Phase::Monitoring || phase == Phase::PreCopy || phase == Phase::Sync)
    fail(fmt::format("connection to the {} lost: {}", role == Role::Source ? "destination" : "source", why.message()));
  cv_.notify_all();
}

void MigrationEngine::on_peer_error(const ErrorPayload& p) {
  Status s = status_from_error(p);
  bool cancelled = p.message.find("cancelled") != std::string::npos;
  fail(s.message(), cancelled ? Phase::Cancelled : Phase::Failed);
}

void MigrationEngine::on_start(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const StartPayload& p) {
  json params = json::parse(p.params_json, nullptr, false);
  bool resume = params.is_object() && params.value("resume", false);
  std::unique_lock lock(mu_);
  if (resume) {
    // The destination came back (or reconnected) after handover.
    if (role_ != Role::Source || p.migration_id != migration_id_ ||
        (phase_ != Phase::PostCopy && phase_ != Phase::Handover && phase_ != Phase::Done)) {
      lock.unlock();
      link->send(make_error_payload(protocol_error(ErrorCode::Protocol,
                                                   fmt::format("no migration {} to resume here", p.migration_id))),
                 h.request_id);
      link->close(Status::error("resume refused", EPROTO));
      return;
    }
    if (link_ && link_ != link) link_->close(Status::error("replaced by a resumed link", EPIPE));
    link_ = link;
    lock.unlock();
    link->send(AckPayload{h.request_id, 0, 0}, h.request_id);
    return;
  }
  const bool fenced_unreleased = io_mode_.load() == IoMode::Fenced && role_ == Role::Source && phase_ != Phase::Idle;
  if (active_phase(phase_) || fenced_unreleased) {
    std::string why = fenced_unreleased
                          ? "this side is fenced (it handed its image over); release it first"
                          : fmt::format("busy: already {} of migration {} (phase {})", role_name(role_), migration_id_,
                                        phase_name(phase_));
    lock.unlock();
    link->send(make_error_payload(protocol_error(ErrorCode::Busy, why)), h.request_id);
    link->close(Status::error(why, EBUSY));
    return;
  }
  lock.unlock();
  Status s = prepare_destination(p);
  if (!s) {
    link->send(make_error_payload(s), h.request_id);
    link->close(s);
    return;
  }
  lock.lock();
  link_ = link;
  lock.unlock();
  link->send(AckPayload{h.request_id, 0, 0}, h.request_id);
}

Status MigrationEngine::prepare_destination(const StartPayload& p) {
  const SegmentGeometry& g = *ctx_.geometry;
  if (p.block_size != g.block_size())
    return protocol_error(ErrorCode::SizeMismatch,
                          fmt::format("block size mismatch: source {} bytes, destination block-size={}", p.block_size,
                                      g.block_size()));
  if (ctx_.image->size() != p.image_size) {
    if (ctx_.image->size() != 0 || !ctx_.resize_image)
      return protocol_error(ErrorCode::SizeMismatch,
                            fmt::format("size mismatch: source image is {} bytes, destination image {} is {} bytes",
                                        p.image_size, ctx_.image->path(), ctx_.image->size()));
    if (Status s = ctx_.resize_image(p.image_size); !s) return protocol_error(ErrorCode::Internal, s.message());
  }
  auto params = MigrationParams::from_json(json::parse(p.params_json, nullptr, false), ctx_.handover_policy);
  if (!params) return protocol_error(ErrorCode::BadFrame, params.status().message());
  MigrationRecord rec{p.migration_id, "destination", "PreCopy", params->from, p.mode,
                      p.image_size,   g.block_size(), json{{"params", params->to_json()}}};
  auto sf = StateFile::create(ctx_.state_path, rec);
  if (!sf) return protocol_error(ErrorCode::Internal, sf.status().message());
  std::lock_guard lock(mu_);
  state_ = std::move(*sf);
  role_ = Role::Destination;
  params_ = *params;
  migration_id_ = p.migration_id;
  peer_address_ = params->from;
  last_error_.clear();
  started_at_ = Clock::now();
  total_time_ms_ = handover_pause_ms_ = -1;
  blocks_received_ = demand_pulls_ = background_pulls_ = 0;
  pending_handover_.clear();
  handover_ranges_received_ = 0;
  set_phase(Phase::PreCopy);
  io_mode_ = IoMode::DestProxy;
  return Status::ok();
}

void MigrationEngine::on_data(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const DataPayload& p) {
  IoMode mode = io_mode_.load();
  if (h.request_id == 0) {  // pushed before handover
    if (mode != IoMode::DestProxy) {
      link->close(protocol_error(ErrorCode::Protocol, "pushed DATA outside pre-copy"));
      return;
    }
    if (Status s = apply_data(p, false); !s) {
      link->send(make_error_payload(s), 0);
      link->close(s);
    }
    return;
  }
  {
    std::unique_lock lock(pull_mu_);
    auto it = pulls_.find(h.request_id);
    if (it != pulls_.end() && it->second.proxy_buf) {
      PullEntry& e = it->second;
      // The reply must lie inside the bytes this read asked for.
      if (p.offset < e.proxy_offset || p.offset - e.proxy_offset > e.proxy_length ||
          p.length > e.proxy_length - (p.offset - e.proxy_offset)) {
        e.proxy_failed = true;
      } else if (p.flags & kFlagZero) {
        std::memset(e.proxy_buf + (p.offset - e.proxy_offset), 0, p.length);
      } else {
        std::memcpy(e.proxy_buf + (p.offset - e.proxy_offset), p.bytes.data(), p.length);
      }
      e.bytes_left -= std::min<uint64_t>(e.bytes_left, p.length);
      pull_cv_.notify_all();
      return;
    }
  }
  if (mode != IoMode::DestPost) return;  // a late reply after the migration ended
  if (Status s = apply_data(p, true); !s) {
    link->send(make_error_payload(s), 0);
    link->close(s);
    return;
  }
  finish_pull(h.request_id, p.length);
}

Status MigrationEngine::apply_data(const DataPayload& p, bool post_handover) {
  const SegmentGeometry& g = *ctx_.geometry;
  const uint64_t size = g.image_size();
  if (p.offset > size || p.length > size - p.offset || p.offset % g.block_size() != 0 ||
      (p.length % g.block_size() != 0 && p.offset + p.length != size))
    return protocol_error(ErrorCode::BadFrame,
                          fmt::format("DATA offset {} length {} is not a block range of the {}-byte image", p.offset,
                                      p.length, size));
  if (p.flags & kFlagCompressed) return protocol_error(ErrorCode::BadFrame, "compressed DATA is not supported");
  const bool zero = p.flags & kFlagZero;
  auto write_range = [&](uint64_t off, uint64_t len) {
    if (zero) return ctx_.image->zero(len, off, true, false, false);
    return ctx_.image->pwrite(p.bytes.data() + (off - p.offset), len, off, false);
  };
  IndexRange blocks = g.blocks_touched(p.offset, p.length);
  if (!post_handover) {
    if (write_range(p.offset, p.length) < 0)
      return protocol_error(ErrorCode::Internal, fmt::format("writing {} bytes at {}: {}", p.length, p.offset,
                                                             std::strerror(errno)));
    blocks_received_.fetch_add(blocks.count(), std::memory_order_relaxed);
    if (!(p.flags & kFlagZero)) ctx_.image->start_writeback(p.length, p.offset);
    // Sync as pre-copy goes, so the fdatasync at handover has little left to
    // write: the handover pause stays bounded by handover-size, not by how
    // much of the image sits in the page cache (invariant 5).
    // The sync runs off the io thread, one at a time: waiting for the disk
    // here would stall the link (a sync that fails shows again in the one
    // the handover waits for).
    unsynced_push_bytes_ += p.length;
    if (unsynced_push_bytes_ >= kPushSyncBytes &&
        (!push_sync_.valid() || push_sync_.wait_for(std::chrono::seconds(0)) == std::future_status::ready)) {
      unsynced_push_bytes_ = 0;
      push_sync_ = std::async(std::launch::async, [image = ctx_.image] { image->flush(); });
    }
    return Status::ok();
  }
  IndexRange segs = g.segments_touched(p.offset, p.length);
  lock_segments(segs);
  Status status;
  std::vector<IndexRange> applied;
  for (uint64_t b = blocks.first; b < blocks.last;) {
    b = std::max(b, std::min(blocks.last, present_->find_next_clear(b)));
    if (b >= blocks.last) break;
    uint64_t e = std::min(blocks.last, present_->find_next_set(b));
    IndexRange run{b, e};
    if (write_range(g.range_offset(run), g.range_length(run)) < 0) {
      status = protocol_error(ErrorCode::Internal, fmt::format("writing pulled blocks at {}: {}", g.range_offset(run),
                                                               std::strerror(errno)));
      break;
    }
    present_->set_range(run);
    applied.push_back(run);
    blocks_received_.fetch_add(run.count(), std::memory_order_relaxed);
    b = e;
  }
  {
    std::lock_guard lock(pull_mu_);
    unpersisted_.insert(unpersisted_.end(), applied.begin(), applied.end());
  }
  unlock_segments(segs);
  pull_cv_.notify_all();
  return status;
}

void MigrationEngine::finish_pull(uint64_t request_id, uint64_t bytes) {
  std::lock_guard lock(pull_mu_);
  auto it = pulls_.find(request_id);
  if (it == pulls_.end()) return;
  PullEntry& e = it->second;
  e.bytes_left -= std::min(e.bytes_left, bytes);
  if (e.bytes_left > 0) return;
  pulling_->clear_range(e.blocks);
  if (e.background) background_bytes_in_flight_ -= std::min(background_bytes_in_flight_,
                                                             ctx_.geometry->range_length(e.blocks));
  pulls_.erase(it);
  pull_cv_.notify_all();
}

void MigrationEngine::on_pull(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const PullPayload& p) {
  const uint64_t size = ctx_.image->size();
  Status bad;
  Role role;
  Phase phase;
  {
    std::lock_guard lock(mu_);
    role = role_;
    phase = phase_;
  }
  if (p.offset > size || p.length > size - p.offset || p.length > kMaxDataLength || p.length == 0)
    bad = protocol_error(ErrorCode::BadFrame,
                         fmt::format("PULL offset {} length {} outside the {}-byte image", p.offset, p.length, size));
  else if (role == Role::Destination && (phase == Phase::PostCopy || phase == Phase::Done)) {
    // The old source proxies a read: answer from the authoritative image,
    // pulling missing blocks first. Not on the io thread, which must go on
    // receiving the DATA those pulls wait for.
    ++pull_servers_;
    std::thread([this, link, id = h.request_id, p] {
      serve_pull(*link, id, p, true);
      --pull_servers_;
    }).detach();
    return;
  } else if (role != Role::Source)
    bad = protocol_error(ErrorCode::NotAuthoritative, "PULL sent to a side that is not authoritative");
  if (!bad) {
    link->send(make_error_payload(bad), h.request_id);
    link->close(bad);
    return;
  }
  serve_pull(*link, h.request_id, p, false);
}

// Answers one PULL from the local image. ensure: pull missing blocks first
// (a destination answering its old source).
void MigrationEngine::serve_pull(PeerLink& link, uint64_t request_id, const PullPayload& p, bool ensure) {
  const SegmentGeometry& g = *ctx_.geometry;
  const uint64_t size = g.image_size();
  if (ensure && io_mode_.load() == IoMode::DestPost) {
    if (Status s = ensure_present(g.blocks_touched(p.offset, p.length), true); !s) {
      link.send(make_error_payload(protocol_error(ErrorCode::Internal, s.message())), request_id);
      return;
    }
  }
  bool priority = p.priority != 0;
  bool aligned = p.offset % g.block_size() == 0 && (p.length % g.block_size() == 0 || p.offset + p.length == size);
  if (aligned) {
    send_blocks(link, g.blocks_touched(p.offset, p.length), request_id, priority);
    return;
  }
  // An unaligned proxied read: the exact bytes, in one frame.
  std::string buf(p.length, '\0');
  if (ctx_.image->pread(buf.data(), p.length, p.offset) < 0) {
    Status s = protocol_error(ErrorCode::Internal, fmt::format("reading at {}: {}", p.offset, std::strerror(errno)));
    link.send(make_error_payload(s), request_id);
    return;
  }
  DataPayload d{p.offset, p.length, 0, {reinterpret_cast<const uint8_t*>(buf.data()), buf.size()}};
  link.send_data(d, request_id, priority);
  payload_bytes_sent_ += p.length;
}

// Returns the number of data blocks sent (holes and zero blocks not counted).
uint64_t MigrationEngine::send_blocks(PeerLink& link, IndexRange blocks, uint64_t request_id, bool priority) {
  const SegmentGeometry& g = *ctx_.geometry;
  const uint64_t off = g.range_offset(blocks), len = g.range_length(blocks);
  auto send_zero = [&](IndexRange r) {
    DataPayload d{g.range_offset(r), static_cast<uint32_t>(g.range_length(r)), kFlagZero, {}};
    link.send_data(d, request_id, priority);
    zero_blocks_sent_.fetch_add(r.count(), std::memory_order_relaxed);
  };
  // Holes cross as zero notes without being read.
  std::vector<std::pair<IndexRange, bool>> parts;  // (blocks, is_hole)
  ctx_.image->extents(len, off, [&](uint64_t o, uint64_t l, bool hole) {
    IndexRange r = hole ? g.blocks_covered(o, l) : g.blocks_touched(o, l);
    r.first = std::max(r.first, blocks.first);
    r.last = std::min(r.last, blocks.last);
    if (!parts.empty() && parts.back().first.last > r.first) r.first = parts.back().first.last;
    if (r.empty()) return true;
    if (!parts.empty() && parts.back().first.last < r.first) parts.push_back({{parts.back().first.last, r.first}, false});
    else if (parts.empty() && r.first > blocks.first) parts.push_back({{blocks.first, r.first}, false});
    parts.push_back({r, hole});
    return true;
  });
  uint64_t covered_to = parts.empty() ? blocks.first : parts.back().first.last;
  if (covered_to < blocks.last) parts.push_back({{covered_to, blocks.last}, false});
  std::string buf;
  uint64_t data_blocks = 0;
  for (auto& [r, hole] : parts) {
    if (hole) {
      send_zero(r);
      continue;
    }
    buf.resize(g.range_length(r));
    if (ctx_.image->pread(buf.data(), buf.size(), g.range_offset(r)) < 0) {
      link.close(protocol_error(ErrorCode::Internal, fmt::format("reading {} bytes at {}: {}", buf.size(),
                                                                 g.range_offset(r), std::strerror(errno))));
      return data_blocks;
    }
    for (const ZeroSplit& z : split_zero_runs(g, r, buf.data())) {
      if (z.zero) {
        send_zero(z.blocks);
        continue;
      }
      // Frames of at most kMaxFrameData: a demand pull's priority frame
      // overtakes queued background data at the next frame boundary.
      for (uint64_t zoff = g.range_offset(z.blocks), zend = zoff + g.range_length(z.blocks); zoff < zend;) {
        uint64_t zlen = std::min<uint64_t>(std::max(kMaxFrameData, g.block_size()), zend - zoff);
        DataPayload d{zoff, static_cast<uint32_t>(zlen), 0,
                      {reinterpret_cast<const uint8_t*>(buf.data() + (zoff - g.range_offset(r))), zlen}};
        link.send_data(d, request_id, priority);
        payload_bytes_sent_.fetch_add(zlen, std::memory_order_relaxed);
        zoff += zlen;
      }
      data_blocks_sent_.fetch_add(z.blocks.count(), std::memory_order_relaxed);
      data_blocks += z.blocks.count();
    }
  }
  return data_blocks;
}

void MigrationEngine::on_handover(const std::shared_ptr<PeerLink>& link, const FrameHeader& h,
                                  const HandoverPayload& p) {
  std::unique_lock lock(mu_);
  if (role_ != Role::Destination || phase_ != Phase::PreCopy) {
    Status s = protocol_error(ErrorCode::Protocol, fmt::format("HANDOVER in phase {}", phase_name(phase_)));
    lock.unlock();
    link->send(make_error_payload(s), h.request_id);
    link->close(s);
    return;
  }
  const SegmentGeometry& g = *ctx_.geometry;
  for (const HandoverRange& r : p.ranges) {
    if (r.first_block > g.block_count() || r.block_count > g.block_count() - r.first_block) {
      Status s = protocol_error(ErrorCode::BadFrame, "HANDOVER range outside the image");
      lock.unlock();
      link->send(make_error_payload(s), h.request_id);
      link->close(s);
      return;
    }
    pending_handover_.push_back(r);
    handover_ranges_received_ += r.block_count;
  }
  if (handover_ranges_received_ < p.remaining_blocks) return;  // more frames follow

  // Everything the source pushed is durable before we claim it present.
  auto t0 = Clock::now();
  Status s;
  if (ctx_.image->flush() < 0) s = protocol_error(ErrorCode::Internal, std::strerror(errno));
  auto present = std::make_unique<BlockBitmap>(g.block_count());
  present->set_range({0, g.block_count()});
  std::vector<double> priority(g.segment_count(), 0.0);
  for (const HandoverRange& r : pending_handover_) {
    present->clear_range({r.first_block, r.first_block + r.block_count});
    // The source ranks segments for fetching (offset order for precopy and
    // postcopy, score or write count for the heat-driven modes).
    uint64_t seg = g.segment_of_block(r.first_block);
    priority[seg] = std::max(priority[seg], double(r.heat));
  }
  if (s) {
    for (IndexRange r : set_runs(*present)) state_->mark_present(r);
    MigrationRecord rec = state_->record();
    rec.phase = "PostCopy";
    rec.extra["params"] = params_.to_json();
    s = state_->sync();
    if (s) s = state_->write_record(rec);
  }
  if (!s) {
    lock.unlock();
    link->send(make_error_payload(s), h.request_id);
    fail(fmt::format("handover: {}", s.message()));
    return;
  }
  present_ = std::move(present);
  pulling_ = std::make_unique<BlockBitmap>(g.block_count());
  segment_locks_ = std::make_unique<std::mutex[]>(g.segment_count() + 1);
  segment_priority_ = std::move(priority);
  pending_handover_.clear();
  set_phase(Phase::PostCopy);
  io_mode_ = IoMode::DestPost;
  lock.unlock();
  link->send(HandoverAckPayload{}, h.request_id);
  (void)t0;
  if (worker_.joinable()) worker_.join();
  worker_ = std::thread([this] { destination_run(); });
}

void MigrationEngine::on_done(const DonePayload&) {
  std::lock_guard lock(mu_);
  if (role_ != Role::Source) return;
  total_time_ms_ = ms_since(started_at_);
  set_phase(Phase::Done);
  save_record();
}

// ---------------------------------------------------------------- source

void MigrationEngine::throttle(uint64_t bytes) {
  uint64_t rate = params_.max_rate;
  if (rate == 0) return;
  auto now = Clock::now();
  if (bucket_time_ == Clock::time_point{}) bucket_time_ = now;
  double dt = std::chrono::duration<double>(now - bucket_time_).count();
  bucket_time_ = now;
  // At most 50 ms of burst.
  bucket_tokens_ = std::min(bucket_tokens_ + dt * rate, rate * 0.05);
  bucket_tokens_ -= double(bytes);
  if (bucket_tokens_ < 0)
    std::this_thread::sleep_for(std::chrono::duration<double>(-bucket_tokens_ / rate));
}

bool MigrationEngine::push_unit(IndexRange unit) {
  auto link = current_link();
  if (!link || link->closed()) return false;
  // Claim before reading: a write that lands after this sets the bits again.
  owed_->test_and_clear_range(unit);
  uint64_t before = link->bytes_enqueued();
  data_blocks_pushed_.fetch_add(send_blocks(*link, unit, 0, false), std::memory_order_relaxed);
  // max_rate caps what crosses the wire: a hole's zero note costs a header.
  throttle(link->bytes_enqueued() - before);
  while (!link->wait_queue_below(kPushWindowBytes, std::chrono::milliseconds(200))) {
    if (link->closed()) return false;
  }
  return true;
}

// One pass over the owed blocks of the send set, in the policy's order. False
// if the link failed. *interrupted: a handover or cancel request stopped the
// pass early.
bool MigrationEngine::push_pass(bool* interrupted) {
  const SegmentGeometry& g = *ctx_.geometry;
  const uint64_t unit_blocks = std::max<uint64_t>(1, params_.transfer_unit / g.block_size());
  std::vector<bool> push(g.segment_count());
  std::vector<uint64_t> order;
  {
    std::lock_guard lock(mu_);
    for (uint64_t seg = 0; seg < g.segment_count(); ++seg) push[seg] = send_set_[seg].push;
    order = push_order(params_.policy, segment_loads());
  }
  // Owed blocks of the send set from each position of the pass on: a segment
  // pushed at position i must stay clean while the link carries owed_from[i].
  std::vector<uint64_t> owed_from(order.size() + 1, 0);
  for (size_t i = order.size(); i-- > 0;)
    owed_from[i] = owed_from[i + 1] + (push[order[i]] ? owed_->count_range(g.blocks_of_segment(order[i])) : 0);
  *interrupted = false;
  for (size_t i = 0; i < order.size(); ++i) {
    const uint64_t seg = order[i];
    if (!push[seg] || !still_pushed(seg, owed_from[i] * g.block_size())) continue;
    IndexRange blocks = g.blocks_of_segment(seg);
    for (IndexRange unit = next_transfer_unit_in(*owed_, g, blocks, blocks.first, unit_blocks); !unit.empty() &&
                                                                                                   unit.first < blocks.last;
         unit = next_transfer_unit_in(*owed_, g, blocks, unit.last, unit_blocks)) {
      {
        std::lock_guard lock(mu_);
        if (cancel_requested_ || handover_requested_ || stopping_) {
          *interrupted = true;
          return true;
        }
      }
      if (!push_unit(unit)) return false;
    }
  }
  return true;
}

// Asks the policy, just before pushing `seg`, whether it should rather wait
// until after handover; `bytes_left` of the send set, this segment's
// included, are still to be pushed in this pass.
bool MigrationEngine::still_pushed(uint64_t seg, uint64_t bytes_left) {
  const SegmentGeometry& g = *ctx_.geometry;
  std::lock_guard lock(mu_);
  double seconds_to_handover = double(bytes_left) / push_throughput();
  auto why = defer_before_push(params_.policy, segment_load(seg), g.segment_size(), seconds_to_handover);
  if (!why && pushes_measured() &&
      guest_outwrites_pushes(params_.policy,
                             double(blocks_dirtied_.load()) * g.block_size() / seconds_since(precopy_started_at_),
                             push_throughput()))
    why = SetReason::GuestOutwrites;
  if (why) send_set_[seg] = {false, *why};
  return !why;
}

// Enough has been pushed to tell the rate.
bool MigrationEngine::pushes_measured() const {
  return payload_bytes_sent_.load() >= kMinPushSample && seconds_since(precopy_started_at_) >= 0.5;
}

// Payload bytes per second the pushes achieve; before enough has been sent
// to tell, the rate cap or the papers' 1 Gbit/s.
double MigrationEngine::push_throughput() const {
  double sent = double(payload_bytes_sent_.load());
  double seconds = seconds_since(precopy_started_at_);
  if (sent >= kMinPushSample && seconds > 0) return sent / seconds;
  return params_.max_rate ? double(params_.max_rate) : 125e6;
}

uint64_t MigrationEngine::owed_in_send_set() {
  const SegmentGeometry& g = *ctx_.geometry;
  std::lock_guard lock(mu_);
  uint64_t n = 0;
  for (uint64_t seg = 0; seg < g.segment_count(); ++seg)
    if (send_set_[seg].push) n += owed_->count_range(g.blocks_of_segment(seg));
  return n;
}

// How much the guest writes a segment: since the migration started, and its
// write rate, the larger of the rate measured since then and the one the
// decayed history implies (a migration just started has measured little).
SegmentLoad MigrationEngine::segment_load(uint64_t seg) const {
  HeatCounts now = heat().cumulative(seg);
  HeatCounts start = seg < heat_at_start_.size() ? heat_at_start_[seg] : HeatCounts{};
  SegmentLoad load{now.writes - start.writes, 0};
  double seconds = seconds_since(precopy_started_at_);
  if (seconds >= 0.5) load.write_bytes_per_s = (now.write_bytes - start.write_bytes) / seconds;
  if (seg < history_at_start_.size())
    load.write_bytes_per_s =
        std::max(load.write_bytes_per_s, history_at_start_[seg].write_bytes * std::log(2.0) / heat().half_life());
  return load;
}

std::vector<SegmentLoad> MigrationEngine::segment_loads() const {
  std::vector<SegmentLoad> loads(ctx_.geometry->segment_count());
  for (uint64_t seg = 0; seg < loads.size(); ++seg) loads[seg] = segment_load(seg);
  return loads;
}

std::vector<double> MigrationEngine::writes_since_start() const {
  std::vector<HeatCounts> now = heat().cumulative_snapshot();
  std::vector<double> w(now.size());
  for (size_t s = 0; s < now.size(); ++s) w[s] = now[s].writes - (s < heat_at_start_.size() ? heat_at_start_[s].writes : 0);
  return w;
}

// Lets the policy move segments out of the send set after a complete round.
void MigrationEngine::after_round(double seconds, uint64_t bytes_sent) {
  const SegmentGeometry& g = *ctx_.geometry;
  std::vector<uint64_t> redirtied(g.segment_count());
  // After a whole pass, an owed block of a pushed segment was written again
  // after it was sent.
  for (uint64_t seg = 0; seg < g.segment_count(); ++seg) redirtied[seg] = owed_->count_range(g.blocks_of_segment(seg));
  std::lock_guard lock(mu_);
  uint64_t owed_bytes = 0;
  for (uint64_t seg = 0; seg < g.segment_count(); ++seg)
    if (send_set_[seg].push) owed_bytes += redirtied[seg] * g.block_size();
  double throughput = bytes_sent > 0 && seconds > 0 ? double(bytes_sent) / seconds : push_throughput();
  update_send_set(params_.policy, send_set_, segment_loads(), redirtied, resends_, g.segment_size(),
                  double(owed_bytes) / throughput);
}

// LiveFS's monitoring period: counts reads and writes per segment for
// monitor_period seconds (or takes the decayed history). False if cancelled.
bool MigrationEngine::monitor() {
  const PolicyParams& pol = params_.policy;
  std::vector<HeatCounts> window;
  if (pol.mode == MigrationMode::Livefs && pol.monitor_period < 0) {
    window = heat().decayed_snapshot();
  } else if (pol.mode == MigrationMode::Livefs && pol.monitor_period > 0) {
    std::vector<HeatCounts> before = heat().cumulative_snapshot();
    std::unique_lock lock(mu_);
    set_phase(Phase::Monitoring);
    cv_.wait_for(lock, std::chrono::duration<double>(pol.monitor_period),
                 [&] { return cancel_requested_ || handover_requested_ || stopping_.load(); });
    if (cancel_requested_ || stopping_) return false;
    lock.unlock();
    window = heat().cumulative_snapshot();
    for (size_t s = 0; s < window.size(); ++s) {
      window[s].reads -= before[s].reads;
      window[s].writes -= before[s].writes;
      window[s].read_bytes -= before[s].read_bytes;
      window[s].write_bytes -= before[s].write_bytes;
    }
  } else {
    window.assign(ctx_.geometry->segment_count(), HeatCounts{});
  }
  std::lock_guard lock(mu_);
  rank_heat_ = window;
  send_set_ = initial_send_set(pol, window);
  resends_.assign(send_set_.size(), 0);
  heat_at_start_ = heat().cumulative_snapshot();
  history_at_start_ = heat().decayed_snapshot();
  precopy_started_at_ = Clock::now();
  set_phase(Phase::PreCopy);
  return true;
}

std::vector<HandoverRange> MigrationEngine::remaining_ranges() {
  const SegmentGeometry& g = *ctx_.geometry;
  // The fetch order after handover, as a rank per segment (higher first).
  std::vector<double> prio;
  {
    std::lock_guard lock(mu_);
    prio = fetch_priority(params_.policy, rank_heat_, writes_since_start());
  }
  std::vector<uint64_t> order = fetch_order(prio);
  std::vector<uint32_t> rank(g.segment_count());
  for (size_t i = 0; i < order.size(); ++i) rank[order[i]] = static_cast<uint32_t>(order.size() - i);
  std::vector<HandoverRange> out;
  for (IndexRange r : set_runs(*owed_)) {
    // Split at segment boundaries so each range carries its segment's rank.
    for (uint64_t b = r.first; b < r.last;) {
      uint64_t seg = g.segment_of_block(b);
      uint64_t end = std::min(r.last, g.blocks_of_segment(seg).last);
      out.push_back({b, end - b, rank[seg]});
      b = end;
    }
  }
  return out;
}

Status MigrationEngine::do_handover() {
  // Let pushed data already queued drain first, while the guest still runs:
  // HANDOVER must follow it on the link, and waiting behind it inside the
  // fence would make the pause grow with the push window.
  if (auto link = current_link()) {
    while (!link->closed() && !link->wait_queue_below(kHandoverDrainBytes, std::chrono::milliseconds(200))) {
    }
  }
  auto fence_start = Clock::now();
  {
    std::lock_guard lock(mu_);
    set_phase(Phase::Handover);
    // Durable before the fence: a source restarted from here on knows it may
    // no longer be authoritative.
    if (Status s = save_record(); !s) return s;
  }
  io_mode_ = IoMode::Fenced;
  while (inflight_writes_.load() > 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
  // No fdatasync here: the remaining blocks are read from this image (its
  // page cache survives a kill -9 of this process), and syncing what the
  // guest wrote without a flush would make the pause grow with it (it is
  // synced after the handover instead).
  auto link = current_link();
  if (!link) return Status::error("the destination link is down", EPIPE);
  std::vector<HandoverRange> ranges = remaining_ranges();
  uint64_t remaining = owed_->count();
  size_t sent = 0;
  Result<PeerLink::Frame> reply = Status::error("no HANDOVER sent");
  do {
    size_t n = std::min(kHandoverRangesPerFrame, ranges.size() - sent);
    HandoverPayload hp{remaining, {ranges.begin() + sent, ranges.begin() + sent + n}};
    sent += n;
    if (sent < ranges.size()) link->send(hp, link->next_request_id());
    else reply = link->call(hp, kReplyTimeout);
  } while (sent < ranges.size());
  if (!reply) return Status::error(fmt::format("handover not acknowledged: {}", reply.status().message()), EIO);
  {
    std::lock_guard lock(mu_);
    handover_pause_ms_ = ms_since(fence_start);
    reads_to_destination_ = true;
    // A destination with nothing to fetch sends DONE right after the ACK;
    // the link thread may have handled it (on_done) before this thread
    // woke from the call. Done must not go back to PostCopy.
    if (phase_ == Phase::Handover) set_phase(Phase::PostCopy);
    if (Status s = save_record(); !s) return s;
  }
  ctx_.image->flush();
  return Status::ok();
}

void MigrationEngine::source_run() {
  const SegmentGeometry& g = *ctx_.geometry;
  uint64_t handover_blocks = (params_.handover_size + g.block_size() - 1) / g.block_size();
  uint64_t prev_left = UINT64_MAX;
  int not_shrinking = 0;
  bool ready = false;
  auto mark_ready = [&](bool converged, std::string why) {
    ready = true;
    std::lock_guard lock(mu_);
    ready_ = true;
    converged_ = converged;
    ready_reason_ = std::move(why);
    cv_.notify_all();
  };
  if (!monitor()) {
    std::lock_guard lock(mu_);
    if (!stopping_) cancel_requested_ = true;
  }
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (cancel_requested_ || stopping_) break;
      if (handover_requested_ || (ready && params_.handover == "auto")) break;
      bool pushing = std::any_of(send_set_.begin(), send_set_.end(), [](auto& d) { return d.push; });
      if (!pushing && !ready) {
        lock.unlock();
        mark_ready(false, fmt::format("{}: nothing is pushed before handover", params_.mode));
        continue;
      }
      if (ready && (!pushing || owed_->count() == 0)) {  // nothing to push: wait for the trigger
        cv_.wait_for(lock, std::chrono::milliseconds(50));
        continue;
      }
    }
    bool interrupted = false;
    rounds_.fetch_add(1);
    auto round_start = Clock::now();
    uint64_t sent_before = payload_bytes_sent_.load();
    if (!push_pass(&interrupted)) {
      fail("lost the destination during pre-copy");
      return;
    }
    {
      std::lock_guard lock(mu_);
      if (phase_ == Phase::PreCopy) set_phase(Phase::Sync);
    }
    if (interrupted) continue;
    after_round(seconds_since(round_start), payload_bytes_sent_.load() - sent_before);
    if (ready) continue;
    uint64_t left = owed_in_send_set();
    if (left <= handover_blocks) {
      mark_ready(true, fmt::format("converged: {} blocks of the send set left <= handover-size", left));
    } else if (rounds_ >= params_.max_rounds) {
      mark_ready(false, fmt::format("max_rounds {} reached with {} blocks left; the rest goes post-copy",
                                    params_.max_rounds, left));
    } else if (double(left) > 0.9 * double(prev_left) && ++not_shrinking >= 2) {
      // Two rounds that shrank the set by less than 10%: resending will not
      // converge, the guest re-dirties about as fast as the link drains.
      mark_ready(false, fmt::format("the guest dirties as fast as the link drains ({} blocks left, shrinking < 10%); "
                                    "the rest goes post-copy",
                                    left));
    }
    prev_left = left;
  }
  std::unique_lock lock(mu_);
  if (cancel_requested_ || stopping_) {
    if (stopping_) return;
    // Cancelled before handover: the source keeps its image and goes on.
    io_mode_ = IoMode::Local;
    auto link = std::move(link_);
    state_.reset();
    StateFile::remove(ctx_.state_path);
    role_ = Role::None;
    set_phase(Phase::Cancelled);
    lock.unlock();
    if (link) {
      link->send(make_error_payload(protocol_error(ErrorCode::Protocol, "migration cancelled at the source")), 0);
      link->close(Status::error("cancelled", ECANCELED));
    }
    return;
  }
  lock.unlock();
  if (Status s = do_handover(); !s) {
    std::lock_guard l2(mu_);
    last_error_ = s.message();
    set_phase(Phase::Failed);  // stays fenced: the destination may have taken over
  }
}

json MigrationEngine::segments_json(size_t limit) {
  const SegmentGeometry& g = *ctx_.geometry;
  std::lock_guard lock(mu_);
  json out = json::array();
  if (role_ != Role::Source || send_set_.empty()) return out;
  std::vector<double> writes = writes_since_start();
  for (uint64_t seg = 0; seg < send_set_.size() && out.size() < limit; ++seg) {
    double score = seg < rank_heat_.size() ? heat_score(rank_heat_[seg], params_.policy.weights) : 0;
    if (score == 0 && writes[seg] == 0 && send_set_[seg].reason == SetReason::All) continue;
    out.push_back({{"segment", seg},
                   {"offset", g.segment_offset(seg)},
                   {"score", score},
                   {"writes_during_migration", writes[seg]},
                   {"set", send_set_[seg].push ? "push" : "after-handover"},
                   {"why", reason_name(send_set_[seg].reason)},
                   {"owed_blocks", owed_ ? owed_->count_range(g.blocks_of_segment(seg)) : 0}});
  }
  return out;
}

// ---------------------------------------------------------------- destination

int MigrationEngine::proxy_read(void* buf, uint32_t count, uint64_t offset) {
  auto link = current_link();
  if (!link || link->closed()) {
    errno = EIO;
    return -1;
  }
  uint64_t id = link->next_request_id();
  std::unique_lock lock(pull_mu_);
  pulls_[id] = PullEntry{{0, 0}, count, false, static_cast<char*>(buf), offset, count, false};
  link->send(PullPayload{offset, count, 1}, id, true);
  bool done = pull_cv_.wait_for(lock, ctx_.peer_timeout * 2, [&] {
    auto& e = pulls_[id];
    return e.bytes_left == 0 || e.proxy_failed || stopping_;
  });
  bool failed = !done || pulls_[id].proxy_failed || stopping_;
  pulls_.erase(id);
  if (failed) {
    errno = EIO;
    return -1;
  }
  return 0;
}

// REQUIRES: pull_mu_ held.
bool MigrationEngine::issue_pull(IndexRange blocks, bool background) {
  auto link = current_link();
  if (!link || link->closed()) return false;
  const SegmentGeometry& g = *ctx_.geometry;
  uint64_t id = link->next_request_id();
  uint64_t len = g.range_length(blocks);
  pulling_->set_range(blocks);
  pulls_[id] = PullEntry{blocks, len, background};
  if (background) {
    background_bytes_in_flight_ += len;
    background_pulls_.fetch_add(1, std::memory_order_relaxed);
  } else {
    demand_pulls_.fetch_add(1, std::memory_order_relaxed);
  }
  link->send(PullPayload{g.range_offset(blocks), static_cast<uint32_t>(len), uint8_t(background ? 0 : 1)}, id,
             !background);
  return true;
}

Status MigrationEngine::ensure_present(IndexRange blocks, bool priority) {
  const SegmentGeometry& g = *ctx_.geometry;
  auto deadline = Clock::now() + ctx_.peer_timeout * 4;
  std::unique_lock lock(pull_mu_);
  for (;;) {
    if (present_->all_set(blocks)) return Status::ok();
    if (stopping_) return Status::error("plugin is shutting down", ESHUTDOWN);
    // Pull what is missing and not already on its way; share pulls in flight.
    for (uint64_t b = blocks.first; b < blocks.last; ++b) {
      if (present_->test(b) || pulling_->test(b)) continue;
      uint64_t end = b + 1, seg_end = g.blocks_of_segment(g.segment_of_block(b)).last;
      while (end < blocks.last && end < seg_end && !present_->test(end) && !pulling_->test(end)) ++end;
      if (!issue_pull({b, end}, !priority)) break;  // link down: wait for the reconnect
      b = end - 1;
    }
    if (Clock::now() > deadline)
      return Status::error(fmt::format("blocks {}..{} did not arrive from the source in time", blocks.first,
                                       blocks.last),
                           EIO);
    pull_cv_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

Status MigrationEngine::persist() {
  std::lock_guard serial(persist_mu_);
  std::vector<IndexRange> ranges;
  {
    std::lock_guard lock(pull_mu_);
    ranges.swap(unpersisted_);
  }
  // Data first, then the bits that claim it (see the design notes).
  if (ctx_.image->flush() < 0) {
    int e = errno;
    std::lock_guard lock(pull_mu_);
    unpersisted_.insert(unpersisted_.end(), ranges.begin(), ranges.end());
    return Status::error(fmt::format("flush: {}", std::strerror(e)), e);
  }
  StateFile* sf;
  {
    std::lock_guard lock(mu_);
    sf = state_.get();
  }
  if (!sf) return Status::ok();
  for (IndexRange r : ranges) sf->mark_present(r);
  return sf->sync();
}

Status MigrationEngine::reconnect_to_source() {
  std::string peer, id, mode;
  {
    std::lock_guard lock(mu_);
    peer = peer_address_;
    id = migration_id_;
    mode = params_.mode;
  }
  auto where = parse_host_port(peer);
  if (!where) return Status::error(fmt::format("cannot reconnect: source address '{}': {}", peer,
                                               where.status().message()));
  PeerLink::Options opts;
  opts.local_name = ctx_.node_name;
  opts.read_timeout = ctx_.peer_timeout;
  auto link = PeerLink::connect(io_, *where, ctx_.secret, kPurposePeer, opts, kConnectTimeout);
  if (!link) return link.status();
  (*link)->start([this](auto& l, auto& f) { on_frame(l, f); }, [this](auto& l, auto& why) { on_link_closed(l, why); });
  const SegmentGeometry& g = *ctx_.geometry;
  StartPayload start{mode, json{{"resume", true}}.dump(), g.image_size(), static_cast<uint32_t>(g.block_size()),
                     g.segment_size(), id};
  auto reply = (*link)->call(start, kReplyTimeout);
  if (!reply) {
    (*link)->close(reply.status());
    return reply.status();
  }
  std::lock_guard lock(mu_);
  link_ = *link;
  return Status::ok();
}

void MigrationEngine::send_progress() {
  auto link = current_link();
  if (!link) return;
  json j;
  {
    std::lock_guard lock(mu_);
    j = progress_json();
  }
  j.erase("peer_progress");
  link->send(ProgressPayload{j.dump()}, 0);
}

void MigrationEngine::destination_run() {
  const SegmentGeometry& g = *ctx_.geometry;
  const uint64_t unit_blocks =
      std::max<uint64_t>(1, std::min<uint64_t>(params_.transfer_unit, kMaxDataLength) / g.block_size());
  const uint64_t window = kBackgroundWindowUnits * unit_blocks * g.block_size();
  std::vector<uint64_t> order;
  {
    std::lock_guard lock(mu_);
    order = fetch_order(segment_priority_.empty() ? std::vector<double>(g.segment_count(), 0.0) : segment_priority_);
  }
  auto last_tick = Clock::now();
  // Presence reaches the state file once a second, on a thread of its own:
  // its fdatasync must not stall the pulls.
  std::atomic<bool> pulling_done{false};
  std::thread persister([&] {
    std::unique_lock lock(pull_mu_);
    while (!stopping_ && !pulling_done) {
      if (pull_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_ || pulling_done; })) break;
      lock.unlock();
      persist();
      lock.lock();
    }
  });
  while (!stopping_ && present_->count() < g.block_count()) {
    if (!current_link()) {
      Status s = reconnect_to_source();
      if (!s) {
        {
          std::lock_guard lock(mu_);
          last_error_ = fmt::format("reconnecting to the source: {}", s.message());
        }
        std::unique_lock lock(pull_mu_);
        pull_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_.load(); });
      }
      continue;
    }
    for (uint64_t seg : order) {
      if (stopping_ || !current_link()) break;
      IndexRange segment = g.blocks_of_segment(seg);
      for (uint64_t b = segment.first; b < segment.last && !stopping_;) {
        std::unique_lock lock(pull_mu_);
        pull_cv_.wait_for(lock, std::chrono::milliseconds(100),
                          [&] { return background_bytes_in_flight_ < window || stopping_; });
        if (background_bytes_in_flight_ >= window) {
          lock.unlock();
          if (!current_link()) break;
          continue;
        }
        // The next run of blocks neither present nor on their way.
        b = present_->find_next_clear(b);
        while (b < segment.last && pulling_->test(b)) b = present_->find_next_clear(b + 1);
        if (b >= segment.last) break;
        uint64_t end = b + 1;
        while (end < segment.last && end - b < unit_blocks && !present_->test(end) && !pulling_->test(end)) ++end;
        if (!issue_pull({b, end}, true)) break;
        lock.unlock();
        throttle(g.range_length({b, end}));  // max_rate caps post-copy pulls too
        b = end;
      }
      if (ms_since(last_tick) >= 1000) {
        last_tick = Clock::now();
        send_progress();
      }
    }
    // Wait for what is in flight, then look again (pulls lost to a dropped
    // link are asked again on the next pass).
    std::unique_lock lock(pull_mu_);
    pull_cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return stopping_.load() || pulls_.empty(); });
  }
  {
    std::lock_guard lock(pull_mu_);
    pulling_done = true;
  }
  pull_cv_.notify_all();
  persister.join();
  if (!stopping_) finish_destination();
}

void MigrationEngine::finish_destination() {
  if (Status s = persist(); !s) {
    std::lock_guard lock(mu_);
    last_error_ = fmt::format("persisting the final state: {}", s.message());
    return;
  }
  std::shared_ptr<PeerLink> link;
  {
    std::lock_guard lock(mu_);
    total_time_ms_ = ms_since(started_at_);
    set_phase(Phase::Done);
    save_record();
    io_mode_ = IoMode::Local;
    link = link_;
  }
  if (link) link->send(DonePayload{payload_bytes_sent_.load(), ctx_.geometry->block_count()}, 0);
}

}  // namespace livemig
