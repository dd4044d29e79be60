#include "plugin/destination_session.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "common/json_limits.h"
#include "common/thread_name.h"
#include "common/thread_nice.h"
#include "common/transfer_planner.h"
#include "plugin/link_compression.h"
#include "plugin/test_hooks.h"
#include "plugin/write_forward.h"

namespace livemig {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// Background pulls in flight, in transfer units, at least: small, so that a
// demand pull waits behind little. More when the link's bandwidth-delay
// product is larger (PullWindow: about 1.5 units on a LAN), up to
// kMaxBackgroundWindow.
constexpr uint64_t kBackgroundWindowUnits = 1;
constexpr uint64_t kMaxBackgroundWindow = 64u << 20;
// Pushed bytes a destination receives between two fdatasyncs.
constexpr uint64_t kPushSyncBytes = 8u << 20;
// Bytes of answers to PULLs queued on the link before a server thread waits.
constexpr size_t kServeWindowBytes = 16u << 20;
// After a background pull failed (the source's read error, this disk full).
constexpr auto kBackgroundPause = std::chrono::seconds(1);
// How often post-copy's presence reaches the state file without a flush:
// what a restarted destination pulls again is at most this much of pulls.
constexpr auto kPersistInterval = std::chrono::seconds(5);
// Guest-first pacing of background pulls re-measures this side's own
// baseline one window in 16 (every 4 s).
constexpr unsigned kPacerProbeEvery = 16;

// Demand pulls that failed, remembered for their readers at most.
constexpr size_t kMaxFailedPulls = 4096;

}  // namespace

DestinationSession::DestinationSession(EngineServices& s, std::string migration_id, MigrationParams params)
    : s_(s),
      id_(std::move(migration_id)),
      params_(std::move(params)),
      proxy_(s.ctx.peer_timeout * 2),
      pacer_(s.ctx.guest_latency, s.pacer_config(params_, kPacerProbeEvery)),
      pull_window_(kBackgroundWindowUnits * std::min<uint64_t>(params_.transfer_unit, kMaxDataLength),
                   kMaxBackgroundWindow) {}

DestinationSession::~DestinationSession() { stop(); }

void DestinationSession::start_precopy(std::shared_ptr<PeerLink> link, bool had_copy) {
  if (link) link_.adopt(link);
  MutexLock lock(mu_);
  had_copy_ = had_copy;
}

void DestinationSession::start_committed(BlockBitmap present) { become_authoritative(std::move(present), {}); }

void DestinationSession::start_pulling() {
  if (puller_.joinable()) return;
  // Guest first: both run at the migration's nice value (MigrationParams).
  puller_ = std::thread([this] {
    set_this_thread_nice(params_.migration_nice);
    pull_loop();
  });
  persister_ = std::thread([this] {
    set_this_thread_nice(params_.migration_nice);
    persist_loop();
  });
  name_thread(puller_, "livemig-pull");
  name_thread(persister_, "livemig-persist");
}

void DestinationSession::stop() {
  if (stopping_.exchange(true)) return;
  std::shared_ptr<PeerLink> link = link_.take();
  pull_cv_.notify_all();
  if (link) link->close(Status::error("plugin is shutting down", ESHUTDOWN));
  if (puller_.joinable()) puller_.join();
  if (persister_.joinable()) persister_.join();
}

void DestinationSession::tick() {
  if (s_.machine.state().phase != Phase::PreCopy) return;
  if (auto link = current_link()) return maybe_sync_pushes(link, true);
  // The source resumes a lost link within resume_timeout or gives up; past
  // that (and a margin) it gave up: end here too, keeping the partial copy
  // for the next migration to compare with.
  double down = std::chrono::duration<double>(Clock::now() - link_.down_since()).count();
  if (down <= params_.resume_timeout + 2 * std::chrono::duration<double>(s_.ctx.peer_timeout).count()) return;
  set_error(fmt::format("the source did not resume the migration within {:.0f} s", down));
  if (Status st = s_.machine.transition({Role::Destination, Phase::Failed, IoMode::Fenced}); !st)
    s_.log(fmt::format("migration {}: {}", id_, st.message()));
}

// ------------------------------------------------------------ links

bool DestinationSession::owns(const PeerLink* link) const { return link_.owns(link); }

bool DestinationSession::link_up() const {
  auto link = link_.get();
  return link && !link->closed();
}

std::shared_ptr<PeerLink> DestinationSession::current_link() const { return link_.get(); }

void DestinationSession::adopt_link(const std::shared_ptr<PeerLink>& link) {
  {
    MutexLock lock(push_mu_);
    pushed_frames_ = 0;
  }
  link_.adopt(link);
  pull_cv_.notify_all();
}

void DestinationSession::set_error(std::string message) {
  s_.log(fmt::format("migration {}: {}", id_, message));
  MutexLock lock(mu_);
  last_error_ = std::move(message);
}

void DestinationSession::on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame) {
  const FrameHeader& h = frame.header;
  if (auto* data = std::get_if<DataPayload>(&frame.message)) {
    // Decompressed, or read from the base, here, so that nothing after sees
    // anything but plain data; a bad frame ends the link (pushes are sent
    // again, pulls asked again; after a BaseMismatch the source sends plain).
    thread_local std::string plain;
    if (data->flags & (kFlagCompressed | kFlagBase)) {
      if (Status s = decode_data(*data, plain); !s) {
        set_error(s.message());
        return link->refuse(h.request_id, s);
      }
      data->flags = 0;
      data->bytes = {reinterpret_cast<const uint8_t*>(plain.data()), plain.size()};
    }
    if (h.request_id == 0) on_push(link, *data);
    else if (!proxy_.on_data(h.request_id, *data)) on_pulled(h.request_id, *data);
  } else if (auto* hp = std::get_if<HandoverPayload>(&frame.message)) {
    on_handover(link, h.request_id, *hp);
  } else if (auto* pull = std::get_if<PullPayload>(&frame.message)) {
    serve_pull(link, h.request_id, *pull);
  } else if (auto* sums = std::get_if<SumsPayload>(&frame.message)) {
    serve_sums(link, h.request_id, *sums);
  } else if (auto* err = std::get_if<ErrorPayload>(&frame.message)) {
    Status why = status_from_error(*err);
    if (h.request_id != 0 && proxy_.on_error(h.request_id, why)) return;
    if (h.request_id != 0 && s_.machine.state().phase != Phase::PreCopy) {
      fail_pull(h.request_id, why.errno_value());  // about one pull: that pull fails, post-copy goes on
      return;
    }
    on_source_error(link, *err);
  } else if (auto* progress = std::get_if<ProgressPayload>(&frame.message)) {
    json j = parse_json_object(progress->json);
    if (j.is_discarded()) j = json();
    if (uint64_t gen = json_uint(j, "committed_generation", 0, "PROGRESS").value_or(0); gen != 0) confirm(gen);
    MutexLock lock(mu_);
    peer_progress_ = std::move(j);
  } else if (!std::holds_alternative<CancelPullPayload>(frame.message)) {
    link->refuse(h.request_id, protocol_error(ErrorCode::Protocol, fmt::format("unexpected {} frame at the destination",
                                                                            frame_type_name(h.type))));
  }
}

// The plain data of a COMPRESSED frame or a BASE note, counted.
Status DestinationSession::decode_data(const DataPayload& p, std::string& plain) {
  if (p.flags & kFlagBase) {
    Status s = read_base_note(s_.ctx.base, p, s_.geometry().block_size(), plain);
    if (!s && error_code_of(s) == ErrorCode::BaseMismatch) s_.stats.base_mismatches.fetch_add(1);
    if (s) s_.stats.base_blocks_received.fetch_add(p.length / s_.geometry().block_size(), std::memory_order_relaxed);
    return s;
  }
  Status s = decompress_frame(p, plain);
  if (!s) return s;
  s_.stats.compressed_frames.fetch_add(1, std::memory_order_relaxed);
  s_.stats.compressed_plain_bytes.fetch_add(p.length, std::memory_order_relaxed);
  s_.stats.compressed_wire_bytes.fetch_add(p.bytes.size(), std::memory_order_relaxed);
  return Status::ok();
}

void DestinationSession::on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why) {
  if (!link_.drop(link)) return;
  s_.log(fmt::format("migration {}: link to the source lost: {}", id_, why.message()));
  {
    // A handover half received on that link is void: the source asks again.
    MutexLock lock(commit_mu_);
    pending_.clear();
    pending_generation_ = pending_blocks_ = 0;
  }
  proxy_.fail_all(why);
  if (pulling_) {
    // Pulls in flight died with the link: forget them so they are asked again.
    MutexLock lock(pull_mu_);
    for (auto& [id, p] : pulls_) pulling_->clear_range(p.blocks);
    pulls_.clear();
    background_bytes_in_flight_ = 0;
  }
  pull_cv_.notify_all();
}

Status ended_before_commit(const std::string& id, const std::string& phase) {
  return protocol_error(ErrorCode::NotCommitted,
                        fmt::format("migration {} ended here ({}) before any handover was committed", id, phase));
}

void DestinationSession::on_resume_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id, bool probe) {
  MutexLock commit(commit_mu_);
  EngineState st = s_.machine.state();
  const bool before = st.phase == Phase::PreCopy;
  const bool after = st.phase == Phase::PostCopy || st.phase == Phase::Done;
  if (st.role == Role::Destination && (st.phase == Phase::Failed || st.phase == Phase::Cancelled) &&
      s_.machine.record().committed_generation == 0)
    return link->refuse(request_id, ended_before_commit(id_, phase_name(st.phase)));
  if (st.role != Role::Destination || !(before || after)) {
    Status s = protocol_error(ErrorCode::UnknownMigration,
                              fmt::format("migration {} ended here ({}): nothing to resume", id_, describe(st)));
    link->refuse(request_id, s);
    return;
  }
  json answer = {{"phase", phase_name(st.phase)}, {"committed_generation", s_.machine.record().committed_generation}};
  if (probe && st.phase == Phase::PostCopy) return link->send(StartOkPayload{answer.dump()}, request_id);
  pending_.clear();
  pending_generation_ = pending_blocks_ = 0;
  adopt_link(link);
  s_.stats.reconnects++;
  link->send(StartOkPayload{answer.dump()}, request_id);
}

void DestinationSession::on_source_error(const std::shared_ptr<PeerLink>& link, const ErrorPayload& e) {
  Status why = status_from_error(e);
  EngineState st = s_.machine.state();
  if (st.phase != Phase::PreCopy) {
    s_.log(fmt::format("migration {}: the source reported: {}", id_, why.message()));
    return;  // after the commit this side owns the data; it keeps pulling
  }
  const bool cancelled = error_code_of(why) == ErrorCode::Cancelled;
  bool had_copy;
  {
    MutexLock lock(mu_);
    last_error_ = why.message();
    had_copy = had_copy_;
  }
  Status s;
  if (cancelled && !had_copy && blocks_received() == 0) {
    // Nothing arrived and nothing was here: the image is as it was before
    // START (empty). Serve it again rather than stay fenced.
    s = s_.machine.transition({Role::None, Phase::Cancelled, IoMode::Local}, {}, Persist::Remove);
  } else {
    // A partial copy: kept (fenced) for a later migration to compare with.
    s = s_.machine.transition({Role::Destination, cancelled ? Phase::Cancelled : Phase::Failed, IoMode::Fenced});
  }
  if (!s) s_.log(fmt::format("migration {}: {}", id_, s.message()));
  link->close(why);
}

// ------------------------------------------------------------ before the commit

void DestinationSession::on_push(const std::shared_ptr<PeerLink>& link, const DataPayload& p) {
  const SegmentGeometry& g = s_.geometry();
  const uint64_t size = g.image_size();
  Status status;
  if (s_.machine.state().phase != Phase::PreCopy)
    status = protocol_error(ErrorCode::Protocol, "pushed DATA outside pre-copy");
  else if (p.offset > size || p.length > size - p.offset || p.offset % g.block_size() != 0 ||
           (p.length % g.block_size() != 0 && p.offset + p.length != size))
    status = protocol_error(ErrorCode::BadFrame, fmt::format("DATA offset {} length {} is not a block range of the "
                                                          "{}-byte image",
                                                          p.offset, p.length, size));
  if (status.is_ok()) {
    const bool zero = p.flags & kFlagZero;
    // Pushed data bypasses the page cache: nobody reads it before the
    // handover (this side is fenced), and a cached copy costs a page-cache
    // copy, writeback and reclaim, about six times the CPU per byte.
    int rc = zero ? s_.image().zero(p.length, p.offset, true, false, false)
                  : s_.image().write_around_cache(p.bytes.data(), p.length, p.offset);
    if (rc < 0)
      status = protocol_error(ErrorCode::Internal,
                           fmt::format("writing {} bytes at {} of {}: {}", p.length, p.offset, s_.image().path(),
                                       std::strerror(errno)));
  }
  if (status.is_ok()) {
    s_.stats.blocks_received.fetch_add(g.blocks_touched(p.offset, p.length).count(), std::memory_order_relaxed);
    {
      MutexLock lock(push_mu_);
      pushed_frames_++;
      unsynced_bytes_ += p.length;
    }
    maybe_sync_pushes(link, false);
    return;
  }
  // This side cannot take the data: the migration fails here (the source,
  // told so, serves on; this partial copy is kept, fenced).
  set_error(status.message());
  link->send(make_error_payload(status), 0);
  s_.machine.transition({Role::Destination, Phase::Failed, IoMode::Fenced});
  link->close(status);
}

// Syncs pushed data off the io thread, one sync at a time, as pre-copy goes
// (so the sync at handover has little left to write: the pause stays bounded
// by handover-size, invariant 5), then acknowledges the frames it covers.
void DestinationSession::maybe_sync_pushes(const std::shared_ptr<PeerLink>& link, bool force) {
  uint64_t frames;
  {
    MutexLock lock(push_mu_);
    if (sync_running_ || unsynced_bytes_ == 0 || (!force && unsynced_bytes_ < kPushSyncBytes)) return;
    sync_running_ = true;
    unsynced_bytes_ = 0;
    frames = pushed_frames_;
  }
  auto self = shared_from_this();
  bool queued = s_.disk_pool.try_post([self, link, frames] {
    int rc = self->s_.image().flush();
    int err = errno;
    {
      MutexLock lock(self->push_mu_);
      self->sync_running_ = false;
    }
    if (rc == 0) {
      link->send(PushAckPayload{frames}, 0);
      return;
    }
    Status s = protocol_error(ErrorCode::Internal, fmt::format("syncing pushed data to {}: {}",
                                                               self->s_.image().path(), std::strerror(err)));
    self->set_error(s.message());
    link->send(make_error_payload(s), 0);
    self->s_.machine.transition({Role::Destination, Phase::Failed, IoMode::Fenced});
    link->close(s);
  });
  if (!queued) {
    MutexLock lock(push_mu_);
    sync_running_ = false;  // the next push or tick tries again
  }
}

void DestinationSession::serve_sums(const std::shared_ptr<PeerLink>& link, uint64_t id, const SumsPayload& p) {
  auto self = shared_from_this();
  bool queued = s_.disk_pool.try_post([self, link, id, p] {
    // Hashes of what is durable here: the source trusts matching units.
    if (self->s_.image().flush() < 0) {
      link->send(make_error_payload(protocol_error(ErrorCode::Internal,
                                                   fmt::format("syncing before checksums: {}", std::strerror(errno)))),
                 id);
      return;
    }
    auto reply = self->s_.sender.sums(p);
    if (reply) link->send(*reply, id);
    else link->send(make_error_payload(reply.status()), id);
  });
  if (!queued) link->send(make_error_payload(protocol_error(ErrorCode::Busy, "too many requests queued")), id);
}

void DestinationSession::on_handover(const std::shared_ptr<PeerLink>& link, uint64_t request_id,
                                     const HandoverPayload& p) {
  const SegmentGeometry& g = s_.geometry();
  UniqueLock lock(commit_mu_);
  EngineState st = s_.machine.state();
  Status status;
  if (st.role != Role::Destination || st.phase != Phase::PreCopy)
    status = protocol_error(ErrorCode::Protocol, fmt::format("HANDOVER in phase {}", phase_name(st.phase)));
  else if (p.generation == 0 || (pending_generation_ != 0 && p.generation != pending_generation_))
    status = protocol_error(ErrorCode::BadFrame, fmt::format("HANDOVER generation {} (this handover is {})",
                                                          p.generation, pending_generation_));
  else if (pending_generation_ != 0 && p.prepare != pending_prepare_)
    status = protocol_error(ErrorCode::BadFrame, "HANDOVER frames of one handover differ in their PREPARE flag");
  uint64_t end = pending_.empty() ? 0 : pending_.back().first_block + pending_.back().block_count;
  for (const HandoverRange& r : p.ranges) {
    if (!status.is_ok()) break;
    if (r.first_block > g.block_count() || r.block_count > g.block_count() - r.first_block)
      status = protocol_error(ErrorCode::BadFrame, fmt::format("HANDOVER range {}+{} outside the image's {} blocks",
                                                            r.first_block, r.block_count, g.block_count()));
    else if (r.first_block < end)
      status = protocol_error(ErrorCode::BadFrame, fmt::format("HANDOVER range at block {} overlaps or precedes the "
                                                            "one ending at {}",
                                                            r.first_block, end));
    end = r.first_block + r.block_count;
  }
  if (!status.is_ok()) {
    pending_.clear();
    pending_generation_ = pending_blocks_ = 0;
    lock.unlock();
    link->refuse(request_id, status);
    return;
  }
  pending_generation_ = p.generation;
  pending_prepare_ = p.prepare;
  for (const HandoverRange& r : p.ranges) {
    pending_.push_back(r);
    pending_blocks_ += r.block_count;
  }
  if (pending_blocks_ < p.remaining_blocks) return;  // more frames follow
  if (p.prepare) return prepare(link, request_id, p.generation);
  commit(link, request_id, p.generation);
}

// A handover group's first phase (docs/handover.md, "Groups"): the ranges
// were checked as for a commit; the image and the record are synced (a disk
// that fails now refuses here, before the group decides), and nothing is
// committed: this side stays in PreCopy, not authoritative. If the group
// commits, the source sends HANDOVER(g) again without PREPARE.
void DestinationSession::prepare(const std::shared_ptr<PeerLink>& link, uint64_t request_id, uint64_t generation) {
  crash_point("destination-before-prepare");
  if (!flush_or_refuse(link, request_id)) return;
  if (Status s = s_.machine.update_record({}); !s) {
    refuse(link, request_id, s);
    return;
  }
  pending_.clear();
  pending_generation_ = pending_blocks_ = 0;
  crash_point("destination-after-prepare");
  link->send(HandoverAckPayload{generation, /*prepare=*/true}, request_id);
  s_.log(fmt::format("migration {}: prepared handover {} (not committed)", id_, generation));
}

void DestinationSession::commit(const std::shared_ptr<PeerLink>& link, uint64_t request_id, uint64_t generation) {
  const SegmentGeometry& g = s_.geometry();
  crash_point("destination-before-commit");
  // Everything the source pushed is durable before we claim it present.
  if (!flush_or_refuse(link, request_id)) return;
  BlockBitmap present(g.block_count());
  present.set_range({0, g.block_count()});
  std::vector<double> priority(g.segment_count(), 0.0);
  for (const HandoverRange& r : pending_) {
    present.clear_range({r.first_block, r.first_block + r.block_count});
    // The source ranks segments for fetching (offset order for precopy and
    // postcopy, score or write count for the heat-driven modes).
    uint64_t seg = g.segment_of_block(r.first_block);
    priority[seg] = std::max(priority[seg], double(r.heat));
  }
  if (StateFile* file = s_.machine.file()) {
    // An earlier attempt of this migration that synced its bits and then
    // failed may have marked some of these blocks present: they are owed now.
    for (const HandoverRange& r : pending_) file->mark_missing({r.first_block, r.first_block + r.block_count});
    for (IndexRange r : set_runs(present)) file->mark_present(r);
    if (Status s = file->sync(); !s) {
      refuse(link, request_id, s);
      return;
    }
  }
  crash_point("destination-after-presence-synced");
  become_authoritative(std::move(present), std::move(priority));
  // The commit point: the record says PostCopy with generation g.
  Status s = s_.machine.transition({Role::Destination, Phase::PostCopy, IoMode::DestPost},
                                   [generation](MigrationRecord& r) { r.committed_generation = generation; });
  if (!s) {
    refuse(link, request_id, s);
    return;
  }
  crash_point("destination-after-commit");
  pending_.clear();
  pending_generation_ = pending_blocks_ = 0;
  link->send(HandoverAckPayload{generation}, request_id);
  s_.log(fmt::format("migration {}: committed handover {}", id_, generation));
  start_pulling();
}

// The image synced, or the handover refused (false) because it could not be.
bool DestinationSession::flush_or_refuse(const std::shared_ptr<PeerLink>& link, uint64_t request_id) {
  if (s_.image().flush() >= 0) return true;
  refuse(link, request_id,
         protocol_error(ErrorCode::Internal, fmt::format("syncing {}: {}", s_.image().path(), std::strerror(errno))));
  return false;
}

// This side did not commit: it says so, and keeps
// its partial copy (fenced) for a later migration.
void DestinationSession::refuse(const std::shared_ptr<PeerLink>& link, uint64_t request_id, const Status& why) {
  Status refusal = protocol_error(error_code_of(why) == ErrorCode::NoSpace ? ErrorCode::NoSpace : ErrorCode::Internal,
                                  fmt::format("handover refused: {}", why.message()));
  set_error(refusal.message());
  pending_.clear();
  pending_generation_ = pending_blocks_ = 0;
  link->send(make_error_payload(refusal), request_id);
  s_.machine.transition({Role::Destination, Phase::Failed, IoMode::Fenced});
}

// ------------------------------------------------------------ after the commit

void DestinationSession::become_authoritative(BlockBitmap present, std::vector<double> priority) {
  const SegmentGeometry& g = s_.geometry();
  presence_ = std::make_unique<PresenceJournal>(s_.image(), s_.machine.file(), std::move(present));
  pulling_ = std::make_unique<BlockBitmap>(g.block_count());
  segment_locks_ = std::make_unique<std::mutex[]>(g.segment_count() + 1);
  segment_priority_ = priority.empty() ? std::vector<double>(g.segment_count(), 0.0) : std::move(priority);
}

int DestinationSession::proxy_read(void* buf, uint32_t count, uint64_t offset) {
  // A lost link is resumed by the source: wait for it a while.
  std::shared_ptr<PeerLink> link = link_.wait_up(s_.ctx.peer_timeout, stopping_);
  if (!link) {
    errno = EIO;
    return -1;
  }
  return proxy_.read(*link, buf, count, offset);
}

int DestinationSession::forward(const ForwardPayload& request) {
  std::shared_ptr<PeerLink> link = link_.wait_up(s_.ctx.peer_timeout, stopping_);
  if (!link) {
    errno = ESTALE;  // the engine retries until its deadline
    return -1;
  }
  return forward_request(*link, request, forward_timeout(s_.ctx.peer_timeout), s_.stats);
}

int DestinationSession::read(void* buf, uint32_t count, uint64_t offset) {
  IndexRange blocks = s_.geometry().blocks_touched(offset, count);
  if (!presence_->all_present(blocks)) {
    auto t0 = Clock::now();
    if (Status s = ensure_present(blocks); !s) {
      errno = s.errno_value();
      return -1;
    }
    s_.stats.read_delay.add(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return s_.image().pread(buf, count, offset);
}

int DestinationSession::begin_write(uint64_t offset, uint64_t length, IndexRange* locked) {
  if (length == 0) return 0;
  const SegmentGeometry& g = s_.geometry();
  IndexRange touched = g.blocks_touched(offset, length);
  if (presence_->all_present(touched)) return 0;
  // A write that covers only part of a missing block needs the rest of the
  // block from the source first.
  IndexRange covered = g.blocks_covered(offset, length);
  for (uint64_t edge : {touched.first, touched.last - 1}) {
    bool partial = edge < covered.first || edge >= covered.last;
    if (partial && !presence_->test(edge)) {
      if (Status s = ensure_present({edge, edge + 1}); !s) {
        errno = s.errno_value();
        return -1;
      }
    }
  }
  *locked = g.segments_touched(offset, length);
  lock_segments(*locked);
  return 0;
}

void DestinationSession::end_write(uint64_t offset, uint64_t length, bool ok, IndexRange locked) {
  if (locked.empty()) return;
  if (ok) presence_->mark(s_.geometry().blocks_touched(offset, length));
  unlock_segments(locked);
}

Status DestinationSession::persist() { return presence_ ? presence_->persist() : Status::ok(); }

void DestinationSession::lock_segments(IndexRange segs) {
  for (uint64_t i = segs.first; i < segs.last; ++i) segment_locks_[i].lock();
}

void DestinationSession::unlock_segments(IndexRange segs) {
  for (uint64_t i = segs.last; i-- > segs.first;) segment_locks_[i].unlock();
}

void DestinationSession::on_pulled(uint64_t id, const DataPayload& p) {
  if (!presence_ || s_.machine.state().phase != Phase::PostCopy) return;  // a late reply
  Status s = apply_pulled(p, is_background_pull(id));
  if (!s) {
    fail_pull(id, s.errno_value());
    return;
  }
  finish_pull(id, p.length);
}

bool DestinationSession::is_background_pull(uint64_t id) {
  MutexLock lock(pull_mu_);
  auto it = pulls_.find(id);
  return it != pulls_.end() && it->second.background;
}

Status DestinationSession::apply_pulled(const DataPayload& p, bool background) {
  const SegmentGeometry& g = s_.geometry();
  const uint64_t size = g.image_size();
  if (p.offset > size || p.length > size - p.offset || p.offset % g.block_size() != 0 ||
      (p.length % g.block_size() != 0 && p.offset + p.length != size) || (p.flags & kFlagCompressed))
    return protocol_error(ErrorCode::BadFrame, fmt::format("pulled DATA offset {} length {} flags {:#x} is not a "
                                                           "plain block range of the {}-byte image",
                                                           p.offset, p.length, p.flags, size));
  const bool zero = p.flags & kFlagZero;
  // A background pull's data is written around the page cache, as pushes
  // are (on_push): nobody waits to read it. This is safe beside the guest's
  // cached I/O only because no page holds two blocks: the guest writes a
  // missing block under the segment lock held here, and a present one is
  // never written by a pull. A demand pull's reader reads the block next:
  // cached.
  const bool around_cache = background && g.block_size() % ImageFile::page_size() == 0;
  IndexRange blocks = g.blocks_touched(p.offset, p.length);
  IndexRange segs = g.segments_touched(p.offset, p.length);
  Status status;
  lock_segments(segs);
  // Only blocks still missing: a block present here may hold a newer write.
  for (uint64_t b = blocks.first; b < blocks.last;) {
    b = std::max(b, std::min(blocks.last, presence_->find_next_missing(b)));
    if (b >= blocks.last) break;
    IndexRange run{b, std::min(blocks.last, presence_->find_next_present(b))};
    uint64_t off = g.range_offset(run), len = g.range_length(run);
    const char* data = reinterpret_cast<const char*>(p.bytes.data()) + (off - p.offset);
    int rc = zero           ? s_.image().zero(len, off, true, false, false)
             : around_cache ? s_.image().write_around_cache(data, len, off)
                            : s_.image().pwrite(data, len, off, false);
    if (rc < 0) {
      int e = errno;
      status = Status::error(fmt::format("writing pulled blocks at {} of {}: {}", off, s_.image().path(),
                                         std::strerror(e)),
                             e);
      break;
    }
    presence_->mark(run);
    s_.stats.blocks_received.fetch_add(run.count(), std::memory_order_relaxed);
    b = run.last;
  }
  unlock_segments(segs);
  // Start the writeback now, as pushes do: left to the persister's
  // fdatasync, a second of pulled data (100 MiB on a 1 Gbit/s link) was
  // written back and block-allocated in one go, and the guest's writes
  // queued behind it on the file's locks (dips to zero IOPS for 1-2 s).
  if (status && !zero && !around_cache) s_.image().start_writeback(p.length, p.offset);
  {
    MutexLock lock(mu_);
    if (status.errno_value() == ENOSPC)
      space_error_ = fmt::format("{}: no space left on device; {} bytes still to pull", s_.image().path(),
                                 presence_->missing() * g.block_size());
    else if (status)
      space_error_.clear();
  }
  pull_cv_.notify_all();
  return status;
}

// The pull's request id, 0 if the link is down.
uint64_t DestinationSession::issue_pull(IndexRange blocks, bool background) {
  auto link = current_link();
  if (!link || link->closed()) return 0;
  const SegmentGeometry& g = s_.geometry();
  uint64_t id = link->next_request_id();
  uint64_t len = g.range_length(blocks);
  pulling_->set_range(blocks);
  pulls_[id] = Pull{blocks, len, background, Clock::now()};
  if (background) {
    background_bytes_in_flight_ += len;
    s_.stats.background_pulls.fetch_add(1, std::memory_order_relaxed);
  } else {
    s_.stats.demand_pulls.fetch_add(1, std::memory_order_relaxed);
  }
  link->send(PullPayload{g.range_offset(blocks), static_cast<uint32_t>(len), uint8_t(background ? 0 : 1)}, id,
             !background);
  return id;
}

void DestinationSession::finish_pull(uint64_t id, uint64_t bytes) {
  MutexLock lock(pull_mu_);
  auto it = pulls_.find(id);
  if (it == pulls_.end()) return;
  Pull& p = it->second;
  p.bytes_left -= std::min(p.bytes_left, bytes);
  if (p.bytes_left > 0) return;
  pulling_->clear_range(p.blocks);
  if (p.background) {
    const uint64_t len = s_.geometry().range_length(p.blocks);
    background_bytes_in_flight_ -= std::min(background_bytes_in_flight_, len);
    pull_window_.on_answer(len, p.asked, Clock::now());
  }
  pulls_.erase(it);
  pull_cv_.notify_all();
}

void DestinationSession::fail_pull(uint64_t id, int err) {
  s_.stats.pull_errors.fetch_add(1, std::memory_order_relaxed);
  MutexLock lock(pull_mu_);
  auto it = pulls_.find(id);
  if (it == pulls_.end()) return;
  Pull& p = it->second;
  pulling_->clear_range(p.blocks);
  if (p.background) {
    background_bytes_in_flight_ -= std::min(background_bytes_in_flight_, s_.geometry().range_length(p.blocks));
    background_paused_until_ = Clock::now() + kBackgroundPause;
  } else {
    if (failed_pulls_.size() >= kMaxFailedPulls) failed_pulls_.clear();
    failed_pulls_[id] = err ? err : EIO;
  }
  pulls_.erase(it);
  pull_cv_.notify_all();
}

// Waits until `blocks` are present, pulling (with priority) those that are
// neither present nor on their way. Fails with the errno of a pull of ours
// that failed, or EIO when nothing arrived within 4 peer timeouts.
Status DestinationSession::ensure_present(IndexRange blocks) {
  const SegmentGeometry& g = s_.geometry();
  auto deadline = Clock::now() + s_.ctx.peer_timeout * 4;
  std::vector<uint64_t> mine;
  UniqueLock lock(pull_mu_);
  for (bool waited = false;; waited = true) {
    if (presence_->all_present(blocks)) return Status::ok();
    if (!waited) GuestLatency::skip_current_request();  // a miss: not what pacing can lower
    if (stopping_) return Status::error("plugin is shutting down", ESHUTDOWN);
    for (uint64_t id : mine) {
      if (auto f = failed_pulls_.find(id); f != failed_pulls_.end()) {
        int err = f->second;
        failed_pulls_.erase(f);
        return Status::error(fmt::format("pulling blocks {}..{} from the source: {}", blocks.first, blocks.last,
                                         std::strerror(err)),
                             err);
      }
    }
    for (uint64_t b = blocks.first; b < blocks.last; ++b) {
      if (presence_->test(b) || pulling_->test(b)) continue;
      uint64_t end = b + 1, seg_end = g.blocks_of_segment(g.segment_of_block(b)).last;
      while (end < blocks.last && end < seg_end && !presence_->test(end) && !pulling_->test(end)) ++end;
      uint64_t id = issue_pull({b, end}, false);
      if (id == 0) break;  // link down: wait for the reconnect
      mine.push_back(id);
      b = end - 1;
    }
    if (Clock::now() > deadline)
      return Status::error(fmt::format("blocks {}..{} did not arrive from the source in time", blocks.first,
                                       blocks.last),
                           EIO);
    pull_cv_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

void DestinationSession::serve_pull(const std::shared_ptr<PeerLink>& link, uint64_t id, const PullPayload& p) {
  // A destination restarted in Done has no presence map: it holds every
  // block, and the old source's clients still read through it.
  const Phase phase = s_.machine.state().phase;
  if (phase == Phase::PreCopy || (!presence_ && phase != Phase::Done)) {
    Status s = protocol_error(ErrorCode::NotAuthoritative, "PULL sent to a destination before the commit");
    link->send(make_error_payload(s), id);
    return;
  }
  auto self = shared_from_this();
  bool queued = s_.disk_pool.try_post([self, link, id, p] {
    const SegmentGeometry& g = self->s_.geometry();
    Status s;
    if (p.length == 0 || p.offset > g.image_size() || p.length > g.image_size() - p.offset)
      s = protocol_error(ErrorCode::BadFrame, fmt::format("PULL of {} bytes at {} outside the image", p.length,
                                                          p.offset));
    if (s && self->s_.machine.state().phase == Phase::PostCopy)
      s = self->ensure_present(g.blocks_touched(p.offset, p.length));
    if (s) s = self->s_.sender.answer_pull(*link, id, p);
    if (!s) link->send(make_error_payload(s), id);
    link->wait_queue_below(kServeWindowBytes, self->s_.ctx.peer_timeout);
  });
  if (!queued)
    link->send(make_error_payload(protocol_error(ErrorCode::Busy, "too many reads queued at the destination")), id);
}

void DestinationSession::persist_loop() {
  // Presence reaches the state file every kPersistInterval on this thread of
  // its own (its fdatasync must not stall the pulls), and only when blocks
  // were marked since. Nothing depends on it but how much a restarted
  // destination pulls again: a client's flush persists at once. Its cost
  // is the guest's: each fdatasync also writes back every page the guest
  // dirtied since; once a second it made the guest's requests in post-copy
  // cost 1.7-2x the CPU they cost after Done, every 5 s 1.2-1.5x
  // (issue #18, docs/bench/guest-first.md).
  while (!stopping_ && s_.machine.state().phase == Phase::PostCopy) {
    {
      UniqueLock lock(pull_mu_);
      pull_cv_.wait_for(lock, kPersistInterval, [&] { return stopping_.load(); });
    }
    if (stopping_) return;
    if (!presence_->has_unpersisted()) continue;
    if (Status s = persist(); !s) set_error(fmt::format("persisting presence: {}", s.message()));
  }
}

// The source knows of the commit (it said so, or answered our resume
// START after it): from now on this side may end the migration on its own.
// Until then it does not go Done: a source whose operator aborted the
// handover must get the chance to tell it that it lost.
void DestinationSession::confirm(uint64_t generation) {
  if (generation != s_.machine.record().committed_generation || confirmed_) return;
  Status s = s_.machine.update_record([generation](MigrationRecord& r) { r.confirmed_generation = generation; });
  if (!s) return set_error(fmt::format("recording the source's confirmation: {}", s.message()));
  confirmed_ = true;
  pull_cv_.notify_all();
}

void DestinationSession::pull_loop() {
  const SegmentGeometry& g = s_.geometry();
  const uint64_t unit_blocks =
      std::max<uint64_t>(1, std::min<uint64_t>(params_.transfer_unit, kMaxDataLength) / g.block_size());
  const std::vector<uint64_t> order = fetch_order(segment_priority_);
  auto last_progress = Clock::now();
  // Only ever set here, never cleared: confirm() (on the io thread, when the
  // source's PROGRESS arrives) may run between this read and the store, and
  // storing false over its true left the destination in PostCopy for ever.
  const MigrationRecord rec = s_.machine.record();
  test_delay("LIVEMIG_TEST_PULLER_START_DELAY_MS");
  if (rec.confirmed_generation == rec.committed_generation) confirmed_ = true;
  while (!stopping_ && (presence_->missing() > 0 || !confirmed_)) {
    EngineState st = s_.machine.state();
    if (st.role != Role::Destination || st.phase != Phase::PostCopy)
      return s_.log(fmt::format("migration {}: background pulls end in {}", id_, describe(st)));  // lost, or released
    if (!current_link()) {
      if (Status s = reconnect_to_source(); !s) {
        if (s_.machine.state().phase != Phase::PostCopy)  // told it lost
          return s_.log(fmt::format("migration {}: background pulls end: {}", id_, s.message()));
        set_error(fmt::format("reconnecting to the source: {}", s.message()));
        UniqueLock lock(pull_mu_);
        pull_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_.load(); });
      }
      continue;
    }
    for (uint64_t seg : order) {
      if (stopping_ || !current_link()) break;
      if (!pull_segment(seg, unit_blocks)) break;
      if (EngineStats::ms_since(last_progress) >= 1000) {
        last_progress = Clock::now();
        send_progress();
      }
    }
    // Wait for what is in flight, then look again (pulls lost to a dropped
    // link or refused by the source are asked again on the next pass).
    UniqueLock lock(pull_mu_);
    pull_cv_.wait_for(lock, std::chrono::milliseconds(100),
                      [&]() REQUIRES(pull_mu_) { return stopping_.load() || pulls_.empty(); });
  }
  if (stopping_) return s_.log(fmt::format("migration {}: background pulls end: shutting down", id_));
  finish();
}

// Pulls the missing blocks of one segment in the background, a window at a
// time. False if the link went down.
bool DestinationSession::pull_segment(uint64_t seg, uint64_t unit_blocks) {
  const SegmentGeometry& g = s_.geometry();
  IndexRange segment = g.blocks_of_segment(seg);
  for (uint64_t b = segment.first; b < segment.last && !stopping_;) {
    UniqueLock lock(pull_mu_);
    pull_cv_.wait_for(lock, std::chrono::milliseconds(100), [&]() REQUIRES(pull_mu_) {
      return stopping_ ||
             (background_bytes_in_flight_ < pull_window_.bytes() && Clock::now() >= background_paused_until_);
    });
    if (background_bytes_in_flight_ >= pull_window_.bytes() || Clock::now() < background_paused_until_) {
      lock.unlock();
      if (!current_link()) return false;
      continue;
    }
    // The next run of blocks neither present nor on their way.
    b = presence_->find_next_missing(b);
    while (b < segment.last && pulling_->test(b)) b = presence_->find_next_missing(b + 1);
    if (b >= segment.last) break;
    uint64_t end = b + 1;
    while (end < segment.last && end - b < unit_blocks && !presence_->test(end) && !pulling_->test(end)) ++end;
    if (!issue_pull({b, end}, true)) return false;
    lock.unlock();
    if (auto link = current_link()) pay_for_received(*link);
    b = end;
  }
  return true;
}

// max_rate caps what crosses the wire, as the source's pushes do: the
// puller pays for the bytes that arrived since it last paid, so a hole
// costs its zero note, not its length (charging each pull's range made a
// post-copy of a sparse image take image size / max_rate).
void DestinationSession::pay_for_received(const PeerLink& link) {
  const uint64_t received = link.bytes_received();
  if (&link != paid_link_ || received < paid_received_) {
    // A link seen for the first time: pay from now on (it may have carried
    // all of pre-copy before).
    paid_link_ = &link;
    paid_received_ = received;
  }
  pacer_.take(received - paid_received_, !in_tail());
  paid_received_ = received;
}

// The tail (no more missing than a handover's pause would move) is not
// paced. missing() walks the presence bitmap (thousands of pages on a 1 TiB
// image), so it is counted at most every 100 ms, not on every pull; once
// reached, the tail lasts (post-copy only fills blocks in).
bool DestinationSession::in_tail() {
  if (pacer_.in_tail()) return true;
  const auto now = Clock::now();
  if (now - tail_checked_at_ < std::chrono::milliseconds(100)) return false;
  tail_checked_at_ = now;
  const uint64_t missing = presence_->missing() * s_.geometry().block_size();
  pacer_.set_remaining(missing);
  return missing <= params_.handover_size;
}

Status DestinationSession::reconnect_to_source() {
  auto link = s_.connect(params_.from);
  if (!link) return link.status();
  const SegmentGeometry& g = s_.geometry();
  json p = {{"resume", true}, {"committed_generation", s_.machine.record().committed_generation}};
  StartPayload start{mode_name(params_.mode()), p.dump(), g.image_size(), static_cast<uint32_t>(g.block_size()),
                     g.segment_size(), id_};
  auto ok = expect_reply<StartOkPayload>((*link)->call_for_reply(start, kReplyTimeout));
  if (ok) {
    adopt_link(*link);
    s_.stats.reconnects++;
    confirm(s_.machine.record().committed_generation);  // the source answered after the commit
    return Status::ok();
  }
  Status why = ok.status();
  (*link)->close(why);
  if (error_code_of(why) == ErrorCode::HandoverLost) lost(why);
  return why;
}

// The operator aborted at the source the handover this side committed:
// another writer owns the data now. Refuse to serve (ESTALE) until released.
void DestinationSession::lost(const Status& why) {
  set_error(fmt::format("this destination lost the handover: {}", why.message()));
  if (Status s = s_.machine.transition({Role::Destination, Phase::Failed, IoMode::Stale}); !s)
    s_.log(fmt::format("migration {}: {}", id_, s.message()));
}

void DestinationSession::send_progress() {
  auto link = current_link();
  if (!link) return;
  json j = {{"blocks_left", presence_->missing()}, {"blocks_received", blocks_received()}};
  link->send(ProgressPayload{j.dump()}, 0);
}

void DestinationSession::finish() {
  if (Status s = persist(); !s) {
    set_error(fmt::format("persisting the final state: {}", s.message()));
    return;
  }
  s_.stats.total_time_ms = EngineStats::ms_since(s_.stats.started_at);
  if (Status s = s_.machine.transition({Role::Destination, Phase::Done, IoMode::Local}); !s) {
    set_error(fmt::format("recording Done: {}", s.message()));
    return;
  }
  crash_point("destination-after-done");  // recorded, not yet told: the source asks (docs/handover.md)
  if (auto link = current_link()) link->send(DonePayload{s_.stats.payload_bytes_sent.load(), s_.geometry().block_count()}, 0);
  s_.log(fmt::format("migration {}: done", id_));
}

// ------------------------------------------------------------ status

nlohmann::json DestinationSession::progress_json() {
  EngineState st = s_.machine.state();
  json window;
  {
    MutexLock lock(pull_mu_);
    window = {{"bytes", pull_window_.bytes()},
              {"rtt_ms", pull_window_.rtt_seconds() * 1000},
              {"rate_bytes_per_second", pull_window_.rate()}};
  }
  MutexLock lock(mu_);
  uint64_t left = presence_ ? presence_->missing() : s_.geometry().block_count();
  if (st.phase == Phase::Done) left = 0;
  json j = {{"id", id_},
            {"mode", mode_name(params_.mode())},
            {"peer", params_.from},
            {"params", params_.to_json()},
            {"blocks_left", left},
            {"committed_generation", s_.machine.record().committed_generation},
            {"pacing", pacer_.to_json()},
            {"pull_window", window}};
  j["params"]["max_rate"] = pacer_.max_rate();  // set-rate may have changed it
  link_.describe(j);
  if (!peer_progress_.is_null()) j["peer_progress"] = peer_progress_;
  if (!last_error_.empty()) j["last_error"] = last_error_;
  if (!space_error_.empty()) j["no_space"] = space_error_;
  return j;
}

}  // namespace livemig
