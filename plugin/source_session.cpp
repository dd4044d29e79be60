#include "plugin/source_session.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "common/json_limits.h"
#include "common/thread_name.h"
#include "common/thread_nice.h"
#include "common/transfer_planner.h"
#include "plugin/group_decisions.h"
#include "plugin/test_hooks.h"
#include "plugin/write_forward.h"

namespace livemig {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// Bytes of pushed data queued on the link before the pusher waits.
constexpr size_t kPushWindowBytes = 8u << 20;
// Pushed bytes before the pusher trusts its measured throughput.
constexpr uint64_t kMinPushSample = 4u << 20;
// Queued push data the source lets drain before it fences.
constexpr size_t kHandoverDrainBytes = 256u << 10;
// HANDOVER ranges per frame (each range is 20 bytes on the wire).
constexpr size_t kHandoverRangesPerFrame = 512 * 1024;
// Bytes of answers to PULLs queued on the link before a server thread waits.
constexpr size_t kServeWindowBytes = 16u << 20;
// Between two attempts to reach a lost peer.
constexpr auto kRetryPause = std::chrono::seconds(1);
// A checksum unit that differs is compared again in this many parts (1 MiB,
// 256 KiB, 64 KiB, 16 KiB, 4 KiB): a lone written block costs 4 x 4
// checksums (128 bytes, 3% of the block; 16 parts cost 2 x 16, twice that).
constexpr uint64_t kResyncRefine = 4;
// SUMS requests in flight at once during a resync (the destination queues
// at most 256 disk jobs; a fuller queue answers Busy).
constexpr size_t kResyncBatch = 64;
// Differing units closer than this many finer units are compared finer in
// one SUMS, equal units between them included: a checksum is 8 bytes, a
// SUMS and its reply about 150 (frames, TLS) and a disk job at the peer.
constexpr uint64_t kResyncMergeGap = 16;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

json error_reply(const std::string& message) { return {{"ok", false}, {"error", message}}; }

// The START a source sends to ask a destination where the migration stands.
// probe: only asks (a destination in post-copy answers without making this
// its link: it dials us itself, and two links dialled at once close each other).
StartPayload resume_start(const SegmentGeometry& g, const std::string& id, const MigrationParams& params,
                          uint64_t generation, bool probe = false) {
  json p = params.to_json();
  p["resume"] = true;
  p["handover_generation"] = generation;
  if (probe) p["probe"] = true;
  return StartPayload{mode_name(params.mode()), p.dump(), g.image_size(), static_cast<uint32_t>(g.block_size()),
                      g.segment_size(), id};
}

// The "phase" of a START_OK's JSON ("" if it has none).
std::string phase_of(const json& answer) {
  auto it = answer.is_object() ? answer.find("phase") : answer.end();
  return it != answer.end() && it->is_string() ? it->get<std::string>() : "";
}

}  // namespace

SourceSession::SourceSession(EngineServices& s, std::string migration_id, MigrationParams params, Begin begin,
                             uint64_t handover_generation)
    : s_(s),
      id_(std::move(migration_id)),
      params_(std::move(params)),
      begin_(begin),
      owed_(s.geometry().block_count()),
      forward_(s.ctx.peer_timeout * 2),
      generation_(handover_generation),
      pacer_(s.ctx.guest_latency, s.pacer_config(params_)),
      compression_(params_.compression, params_.max_rate),
      destination_io_(std::chrono::steady_clock::now()) {
  owed_.set_range({0, owed_.size()});
}

SourceSession::~SourceSession() { stop(); }

void SourceSession::start(std::shared_ptr<PeerLink> link, bool resync) {
  if (link) link_.adopt(link);
  {
    MutexLock lock(mu_);
    needs_resync_ = resync || begin_ == Begin::Restarted || begin_ == Begin::InWindow;
  }
  if (begin_ == Begin::InWindow) {
    // A group member restarted inside the window follows the group's
    // decision (the record is restored by now).
    json g = s_.machine.record().extra.value("group", json());
    if (!g.is_null()) {
      auto group = Group::from_json(g);
      MutexLock lock(mu_);
      if (group) {
        group_ = *group;
        prepared_at_ = Clock::now();
      } else {
        // Commit may be recorded for it: never ask the destination alone.
        group_unreadable_ = true;
        resolution_ = fmt::format("the state file's handover group is unreadable ({}): only the operator can "
                                  "decide (`migrate-nbd resolve --abort`)",
                                  group.status().message());
      }
    }
  }
  worker_ = std::thread([this] { run(); });
  name_thread(worker_, "livemig-push");
}

void SourceSession::stop() {
  if (stopping_.exchange(true)) return;
  std::shared_ptr<PeerLink> link = link_.take();
  cv_.notify_all();
  s_.machine.notify_all();
  if (link) link->close(Status::error("plugin is shutting down", ESHUTDOWN));
  if (worker_.joinable()) worker_.join();
}

// ------------------------------------------------------------ data path

void SourceSession::on_guest_write(IndexRange blocks) {
  owed_.set_range(blocks);
  s_.stats.blocks_dirtied.fetch_add(blocks.count(), std::memory_order_relaxed);
}

void SourceSession::on_client_write(bool forwarded) {
  const auto now = std::chrono::steady_clock::now();
  if (!forwarded) return destination_io_.note_local(now);
  destination_io_.note_forwarded(now);
  // Wakes a worker waiting out the monitoring period or for a trigger.
  if (params_.handover == HandoverPolicy::OnDestinationIo) cv_.notify_all();
}

int SourceSession::forward_read(void* buf, uint32_t count, uint64_t offset) {
  std::shared_ptr<PeerLink> link = forwarding_link();
  if (!link) {
    errno = EIO;
    return -1;
  }
  return forward_.read(*link, buf, count, offset);
}

// After the commit the destination reconnects to us while it pulls: wait
// for its link. Once it is done it does not, and a link lost then would
// leave this side's clients with nothing to forward to: dial the
// destination (one dialer at a time), and wait for a link a while. (Dialling
// in post-copy too raced the destination's own reconnect: each side adopted
// the link it made, closing the other's, and post-copy could stall.)
std::shared_ptr<PeerLink> SourceSession::forwarding_link() {
  if (auto link = link_.get()) return link;
  if (s_.machine.state().phase != Phase::Done) return link_.wait_up(s_.ctx.peer_timeout, stopping_);
  {
    std::lock_guard dial(dial_mu_);
    if (auto link = link_.get()) return link;
    if (auto answer = dial_destination(false)) {
      adopt_link(answer->link);
      s_.stats.reconnects++;
      // The destination adopted this link before it answered; tell it
      // again that this side knows of the commit (a confirmation sent on
      // a link it had replaced was refused, and without one it never ends
      // the migration). A link the destination dials gets it in START_OK.
      confirm_commit(answer->link);
      return answer->link;
    }
  }
  return link_.wait_up(s_.ctx.peer_timeout, stopping_);
}

Result<SourceSession::DialAnswer> SourceSession::dial_destination(bool probe) {
  uint64_t gen;
  {
    MutexLock lock(mu_);
    gen = generation_;
  }
  auto connected = s_.connect(params_.to);
  if (!connected) return connected.status();
  auto ok = expect_reply<StartOkPayload>(
      (*connected)->call_for_reply(resume_start(s_.geometry(), id_, params_, gen, probe), kReplyTimeout));
  if (!ok) {
    (*connected)->close(ok.status());
    return ok.status();
  }
  return DialAnswer{*connected, phase_of(parse_json_object(ok->json))};
}

// After the commit the destination dials this side while it pulls, and
// says DONE on its link when it holds every block. A DONE lost with that
// link (cut as it was sent, or the destination killed between recording
// Done and sending it) left this side in PostCopy for ever: a destination
// that is done never dials again. So while this side has had no link for
// twice peer-timeout (a destination still pulling would have dialled by
// then), it asks the destination where it stands, every peer-timeout.
void SourceSession::follow_post_copy() {
  const auto quiet = 2 * s_.ctx.peer_timeout;
  std::string last_answer;
  while (!stopping_) {
    {
      UniqueLock lock(mu_);
      cv_.wait_for(lock, s_.ctx.peer_timeout, [&] { return stopping_.load(); });
    }
    EngineState st = s_.machine.state();
    if (stopping_ || st.role != Role::Source || st.phase != Phase::PostCopy) return;
    if (current_link() || Clock::now() - link_.down_since() < quiet) continue;
    std::lock_guard dial(dial_mu_);
    auto answer = dial_destination(true);
    std::string said = answer ? "it is in " + answer->phase : answer.status().message();
    if (said != last_answer)  // once per change, not every peer-timeout
      s_.log(fmt::format("migration {}: no link from the destination after the commit; asked it: {}", id_, said));
    last_answer = said;
    if (!answer) continue;
    if (answer->phase != "Done") {
      answer->link->close(Status::error("only asked: the destination dials this side itself"));
      continue;
    }
    adopt_link(answer->link);
    s_.stats.reconnects++;
    on_done();
  }
}

int SourceSession::forward(const ForwardPayload& request) {
  std::shared_ptr<PeerLink> link = forwarding_link();
  if (!link) {
    errno = ESTALE;  // the engine retries until its deadline
    return -1;
  }
  const bool flush = request.op == ForwardOp::Flush;
  uint64_t mark = 0;
  const bool was_failing = forwarded_writes_.failing();
  if (flush && !forwarded_writes_.flush_may_cover(link, &mark)) {
    if (!was_failing)
      s_.log(fmt::format("migration {}: a flush fails: writes forwarded before the link to the destination was "
                         "replaced may be lost with it (flushes fail until this side's clients disconnect)",
                         id_));
    errno = EIO;
    return -1;
  }
  int rc = forward_request(*link, request, forward_timeout(s_.ctx.peer_timeout), s_.stats);
  if (rc == 0 && flush) forwarded_writes_.flushed(mark);
  if (rc == 0 && !flush) forwarded_writes_.acknowledged(link, request.flags & kForwardFua);
  return rc;
}

// ------------------------------------------------------------ links

bool SourceSession::owns(const PeerLink* link) const { return link_.owns(link); }

std::shared_ptr<PeerLink> SourceSession::current_link() const { return link_.get(); }

void SourceSession::adopt_link(const std::shared_ptr<PeerLink>& link) {
  {
    MutexLock lock(push_mu_);
    pushed_frames_ = 0;
  }
  link_.adopt(link);
  cv_.notify_all();
}

void SourceSession::confirm_commit(const std::shared_ptr<PeerLink>& link) {
  uint64_t gen = s_.machine.record().committed_generation;
  if (gen == 0) {
    MutexLock lock(mu_);
    gen = generation_;
  }
  link->send(ProgressPayload{json{{"committed_generation", gen}}.dump()}, 0);
}

void SourceSession::on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame) {
  const FrameHeader& h = frame.header;
  if (auto* pull = std::get_if<PullPayload>(&frame.message)) {
    serve_pull(link, h.request_id, *pull);
  } else if (auto* ack = std::get_if<PushAckPayload>(&frame.message)) {
    on_push_ack(ack->frames);
  } else if (auto* data = std::get_if<DataPayload>(&frame.message); data && h.request_id != 0) {
    if (!forward_.on_data(h.request_id, *data)) {
      // A late answer to a read that gave up: nothing waits for it.
    }
  } else if (auto* err = std::get_if<ErrorPayload>(&frame.message)) {
    on_peer_error(link, h.request_id, *err);
  } else if (std::holds_alternative<DonePayload>(frame.message)) {
    on_done();
  } else if (auto* progress = std::get_if<ProgressPayload>(&frame.message)) {
    MutexLock lock(mu_);
    peer_progress_ = parse_json_object(progress->json);
    if (peer_progress_.is_discarded()) peer_progress_ = json();
  } else if (!std::holds_alternative<CancelPullPayload>(frame.message)) {
    link->refuse(h.request_id, protocol_error(ErrorCode::Protocol, fmt::format("unexpected {} frame at the source",
                                                                            frame_type_name(h.type))));
  }
}

void SourceSession::on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why) {
  if (!link_.drop(link)) return;
  s_.log(fmt::format("migration {}: link to the destination lost: {}", id_, why.message()));
  // What was pushed but not acknowledged durable is owed again.
  {
    MutexLock lock(push_mu_);
    for (const Push& p : unacked_) owed_.set_range(p.blocks);
    unacked_.clear();
    pushed_frames_ = 0;
  }
  forward_.fail_all(why);
  cv_.notify_all();
}

void SourceSession::on_push_ack(uint64_t frames) {
  MutexLock lock(push_mu_);
  while (!unacked_.empty() && unacked_.front().frames_end <= frames) unacked_.pop_front();
}

void SourceSession::on_peer_error(const std::shared_ptr<PeerLink>& link, uint64_t id, const ErrorPayload& e) {
  Status why = status_from_error(e);
  if (id != 0 && forward_.on_error(id, why)) return;
  if (error_code_of(why) == ErrorCode::BaseMismatch) {
    // A block of the destination's base differs from ours: the rest of the
    // migration goes plain, on a new link (what was in flight is asked or
    // sent again).
    s_.log(fmt::format("migration {}: the destination refused a base note ({}); sending plain from now on", id_,
                       why.message()));
    base_refused_ = true;
    link->close(why);
    return;
  }
  EngineState st = s_.machine.state();
  s_.log(fmt::format("migration {}: the destination reported: {}", id_, why.message()));
  if (st.role == Role::Source && (st.phase == Phase::Monitoring || st.phase == Phase::PreCopy ||
                                  st.phase == Phase::Sync)) {
    // Before handover the destination gave up (a disk error, say): this side
    // still owns the image and goes on serving.
    end_before_handover(Phase::Failed, why.message());
    link->close(why);
  }
  // After the commit an error about one request is that request's (the
  // destination retries); it never ends the post-copy.
}

// The handover pause: from the fence until this side knew the destination
// is authoritative (its ACK, or a DONE that overtook it). The first wins.
void SourceSession::record_pause() {
  int64_t start = fence_started_ns_.load();
  if (start == 0) return;  // fenced by an earlier process
  int64_t expected = -1;
  int64_t ms = (Clock::now().time_since_epoch().count() - start) / 1'000'000;
  s_.stats.handover_pause_ms.compare_exchange_strong(expected, ms);
}

void SourceSession::on_done() {
  EngineState st = s_.machine.state();
  if (st.role != Role::Source || (st.phase != Phase::PostCopy && st.phase != Phase::Handover)) return;
  if (st.phase == Phase::Handover) record_pause();  // DONE implies the commit
  s_.stats.total_time_ms = EngineStats::ms_since(s_.stats.started_at);
  if (Status s = s_.machine.transition({Role::Source, Phase::Done, IoMode::SourceForward}); !s)
    s_.log(fmt::format("migration {}: recording Done: {}", id_, s.message()));
  cv_.notify_all();
}

void SourceSession::on_resume_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id,
                                    uint64_t committed_generation) {
  EngineState st = s_.machine.state();
  uint64_t generation;
  {
    MutexLock lock(mu_);
    generation = generation_;
  }
  if (s_.machine.record().aborted_generation == committed_generation && committed_generation != 0) {
    Status lost = protocol_error(
        ErrorCode::HandoverLost,
        fmt::format("migration {}: the operator aborted handover {} at the source; the source serves the image "
                    "and this destination's copy is stale (release it)",
                    id_, committed_generation));
    link->refuse(request_id, lost);
    return;
  }
  const bool in_window = st.role == Role::Source && st.phase == Phase::Handover;
  const bool after = st.role == Role::Source && (st.phase == Phase::PostCopy || st.phase == Phase::Done);
  if (!(in_window && committed_generation == generation) && !after) {
    Status s = protocol_error(ErrorCode::UnknownMigration,
                              fmt::format("migration {} is {} here: nothing to resume after a commit", id_,
                                          describe(st)));
    link->refuse(request_id, s);
    return;
  }
  adopt_link(link);
  if (in_window) committed(generation);
  link->send(StartOkPayload{json{{"phase", phase_name(s_.machine.state().phase)}}.dump()}, request_id);
}

void SourceSession::serve_pull(const std::shared_ptr<PeerLink>& link, uint64_t id, const PullPayload& p) {
  auto self = shared_from_this();
  bool queued = s_.disk_pool.try_post([self, link, id, p] {
    if (Status s = self->s_.sender.answer_pull(*link, id, p, self->encoding()); !s)
      link->send(make_error_payload(s), id);
    // Backpressure: this thread (one of a few) waits while the link is full.
    link->wait_queue_below(kServeWindowBytes, self->s_.ctx.peer_timeout);
  });
  if (!queued)
    link->send(make_error_payload(protocol_error(ErrorCode::Busy, "too many reads queued at the source")), id);
}

// ------------------------------------------------------------ control

nlohmann::json SourceSession::request_handover(const nlohmann::json& request) {
  std::optional<Group> group;
  if (request.contains("group_timeout") && !request.contains("group") && !request.contains("coordinator"))
    return error_reply("group_timeout is for a group handover only: give group and coordinator with it, or leave it "
                       "out");
  if (request.contains("group") || request.contains("coordinator")) {
    json timeout_ms = 30'000;  // group_timeout left out: 30 s
    if (auto t = request.find("group_timeout"); t != request.end()) {
      // Checked here, in seconds, before the conversion to an integer.
      if (!t->is_number() || !(t->get<double>() >= 0.1 && t->get<double>() <= 86'400))
        return error_reply(fmt::format("group handover: group_timeout must be a number of seconds from 0.1 to 86400, "
                                       "not {:.40}",
                                       t->dump()));
      timeout_ms = static_cast<int64_t>(t->get<double>() * 1000);
    }
    json g = {{"id", request.value("group", json())},
              {"coordinator", request.value("coordinator", json())},
              {"timeout_ms", timeout_ms}};
    auto parsed = Group::from_json(g);
    if (!parsed) return error_reply(fmt::format("group handover: {}", parsed.status().message()));
    if (params_.handover != HandoverPolicy::Explicit)
      return error_reply(fmt::format("group handover: migration {} runs with handover={}; a group member must be "
                                     "migrated with handover=explicit, so that only the group hands it over",
                                     id_, handover_policy_name(params_.handover)));
    if (s_.machine.state().phase == Phase::Handover)
      return error_reply("group handover: a handover is already in its window here");
    group = std::move(*parsed);
  }
  uint64_t target;
  {
    UniqueLock lock(mu_);
    if (group_ && s_.machine.state().phase == Phase::Handover)
      return error_reply(fmt::format("migration {} is prepared in group {}: it follows that group's decision "
                                     "(group-resolve), not a handover request",
                                     id_, group_->id));
    group_ = std::move(group);
    target = attempt_.number + 1;
    handover_requested_ = true;
  }
  cv_.notify_all();
  UniqueLock lock(mu_);
  bool answered = cv_.wait_for(lock, std::chrono::seconds(120), [&]() REQUIRES(mu_) {
    EngineState st = s_.machine.state();
    return attempt_.done >= target || stopping_ || st.role != Role::Source ||
           st.phase == Phase::Done || st.phase == Phase::PostCopy;
  });
  EngineState st = s_.machine.state();
  if (st.phase == Phase::PostCopy || st.phase == Phase::Done)
    return {{"ok", true}, {"phase", phase_name(st.phase)}, {"handover_pause_ms", s_.stats.handover_pause_ms.load()}};
  if (answered && group_ && attempt_.outcome == "prepared")
    return {{"ok", true},      {"prepared", true},          {"phase", phase_name(st.phase)},
            {"group", group_->id}, {"generation", generation_}, {"migration_id", id_}};
  std::string why = !answered ? "no outcome within 120 s" : attempt_.outcome.empty() ? last_error_ : attempt_.outcome;
  return error_reply(fmt::format("{} did not complete ({}): {}", group_ ? "the group's prepare" : "handover",
                                 describe(st), why));
}

nlohmann::json SourceSession::group_resolve() {
  {
    MutexLock lock(mu_);
    if (!group_ || s_.machine.state().phase != Phase::Handover) {
      EngineState st = s_.machine.state();
      json j = {{"ok", true}, {"phase", phase_name(st.phase)}, {"outcome", attempt_.outcome}};
      if (!group_ && st.phase == Phase::Handover)
        return error_reply(fmt::format("migration {} is in a handover window of no group", id_));
      return j;
    }
    group_poke_ = true;
  }
  cv_.notify_all();
  s_.machine.wait_for([](const EngineState& s) { return s.phase != Phase::Handover; }, std::chrono::seconds(120));
  EngineState st = s_.machine.state();
  MutexLock lock(mu_);
  if (st.phase == Phase::Handover)
    return error_reply(fmt::format("still in the handover window after 120 s: {}", resolution_));
  return {{"ok", true}, {"phase", phase_name(st.phase)}, {"outcome", attempt_.outcome}};
}

nlohmann::json SourceSession::request_cancel() {
  EngineState st = s_.machine.state();
  if (st.phase == Phase::Handover)
    return error_reply("cannot cancel inside the handover window: the destination may have committed; "
                       "wait for the resolution, or run `migrate-nbd resolve --abort` if it is gone for good");
  if (st.role != Role::Source || !is_active(st.phase))
    return error_reply(fmt::format("cannot cancel in phase {}: {}", phase_name(st.phase),
                                   st.phase == Phase::PostCopy ? "the destination is authoritative after handover"
                                                               : "no migration runs"));
  {
    MutexLock lock(mu_);
    cancel_requested_ = true;
  }
  cv_.notify_all();
  s_.machine.wait_for([](const EngineState& s) { return s.role != Role::Source || !is_active(s.phase) ||
                                                         s.phase == Phase::Handover; },
                      std::chrono::seconds(60));
  st = s_.machine.state();
  if (st.phase != Phase::Cancelled)
    return error_reply(fmt::format("cancel did not take effect: {}", describe(st)));
  return {{"ok", true}, {"phase", phase_name(st.phase)}};
}

nlohmann::json SourceSession::resolve_abort() {
  EngineState st = s_.machine.state();
  if (st.role != Role::Source || st.phase != Phase::Handover)
    return error_reply(fmt::format("nothing to resolve: this side is {} (resolve --abort is for a source "
                                   "inside an unresolved handover window)",
                                   describe(st)));
  {
    MutexLock lock(mu_);
    abort_requested_ = true;
  }
  cv_.notify_all();
  s_.machine.wait_for([](const EngineState& s) { return s.phase != Phase::Handover; }, std::chrono::seconds(30));
  st = s_.machine.state();
  if (st.phase == Phase::Handover) return error_reply("the abort did not take effect within 30 s");
  if (st.phase != Phase::Failed)
    return error_reply(fmt::format("the destination answered first: {} (nothing aborted)", describe(st)));
  return {{"ok", true},
          {"phase", phase_name(st.phase)},
          {"aborted_generation", s_.machine.record().aborted_generation},
          {"warning", "the source serves its image again; if the destination did commit, what its clients wrote "
                      "since is lost, and it will refuse to serve when it reconnects"}};
}

void SourceSession::on_last_client_closed() {
  forwarded_writes_.clients_gone();
  if (params_.handover != HandoverPolicy::OnDisconnect) return;
  EngineState st = s_.machine.state();
  if (st.role != Role::Source || !(st.phase == Phase::Monitoring || st.phase == Phase::PreCopy ||
                                   st.phase == Phase::Sync))
    return;
  {
    MutexLock lock(mu_);
    handover_requested_ = true;
  }
  cv_.notify_all();
}

// ------------------------------------------------------------ worker

bool SourceSession::wait_worker(std::chrono::milliseconds d) {
  UniqueLock lock(mu_);
  cv_.wait_for(lock, d, [&]() REQUIRES(mu_) { return stopping_ || cancel_requested_ || abort_requested_; });
  return !stopping_;
}

void SourceSession::run() {
  set_this_thread_nice(params_.migration_nice);  // guest first: see MigrationParams
  if (begin_ != Begin::Committed) migrate();
  follow_post_copy();
}

// Until the handover is committed: monitor, push, hand over.
void SourceSession::migrate() {
  if (begin_ == Begin::Fresh) {
    if (!monitor()) {
      if (!stopping_) end_before_handover(Phase::Cancelled, "cancelled during monitoring");
      return;
    }
  } else if (!begin_pushing()) {
    return;
  }
  bool ready = false;
  uint64_t prev_left = UINT64_MAX;
  int not_shrinking = 0;
  while (!stopping_) {
    EngineState st = s_.machine.state();
    if (st.role != Role::Source) return;
    if (st.phase == Phase::Handover) {
      bool in_group, unreadable, abort;
      uint64_t gen;
      {
        MutexLock lock(mu_);
        in_group = group_.has_value();
        unreadable = group_unreadable_;
        abort = abort_requested_;
        gen = generation_;
      }
      if (in_group) follow_group();
      else if (unreadable && abort) operator_abort(gen);
      else if (unreadable) wait_worker(kRetryPause);
      else resolve_handover();
      continue;
    }
    if (st.phase != Phase::Monitoring && st.phase != Phase::PreCopy && st.phase != Phase::Sync) return;
    bool cancel, compare;
    {
      MutexLock lock(mu_);
      cancel = cancel_requested_;
      compare = needs_resync_;
      ready = ready_;
    }
    if (cancel) {
      end_before_handover(Phase::Cancelled, "cancelled at the source");
      return;
    }
    if (!current_link()) {
      if (!reconnect_before_handover()) return;
      continue;
    }
    if (compare) {
      if (!resync()) wait_worker(kRetryPause);
      continue;
    }
    if (handover_due()) {
      do_handover();
      continue;
    }
    push_round(&ready, &prev_left, &not_shrinking);
  }
}

// Starts pushing without a monitoring period (a restarted source): ranks
// from the decayed history.
bool SourceSession::begin_pushing() {
  MutexLock lock(mu_);
  rank_heat_ = s_.heat().decayed_snapshot();
  send_set_ = initial_send_set(params_.policy, rank_heat_);
  resends_.assign(send_set_.size(), 0);
  heat_at_start_ = s_.heat().cumulative_snapshot();
  history_at_start_ = s_.heat().decayed_snapshot();
  precopy_started_at_ = Clock::now();
  return true;
}

// LiveFS's monitoring period: counts reads and writes per segment for
// monitor_period seconds (or takes the decayed history). False if cancelled.
bool SourceSession::monitor() {
  const PolicyParams& pol = params_.policy;
  std::vector<HeatCounts> window;
  if (pol.mode == MigrationMode::Livefs && pol.monitor_period < 0) {
    window = s_.heat().decayed_snapshot();
  } else if (pol.mode == MigrationMode::Livefs && pol.monitor_period > 0) {
    std::vector<HeatCounts> before = s_.heat().cumulative_snapshot();
    {
      UniqueLock lock(mu_);
      cv_.wait_for(lock, std::chrono::duration<double>(pol.monitor_period),
                   [&]() REQUIRES(mu_) {
                     return cancel_requested_ || destination_io_fired_locked() || handover_requested_ ||
                            stopping_.load();
                   });
      if (cancel_requested_ || stopping_) return false;
    }
    window = s_.heat().cumulative_snapshot();
    for (size_t i = 0; i < window.size(); ++i) {
      window[i].reads -= before[i].reads;
      window[i].writes -= before[i].writes;
      window[i].read_bytes -= before[i].read_bytes;
      window[i].write_bytes -= before[i].write_bytes;
    }
  } else {
    window.assign(s_.geometry().segment_count(), HeatCounts{});
  }
  {
    MutexLock lock(mu_);
    rank_heat_ = window;
    send_set_ = initial_send_set(pol, window);
    resends_.assign(send_set_.size(), 0);
    heat_at_start_ = s_.heat().cumulative_snapshot();
    history_at_start_ = s_.heat().decayed_snapshot();
    precopy_started_at_ = Clock::now();
  }
  if (s_.machine.state().phase == Phase::Monitoring)
    return s_.machine.transition({Role::Source, Phase::PreCopy, IoMode::SourceTracking}).is_ok();
  return true;
}

bool SourceSession::handover_due() {
  MutexLock lock(mu_);
  return destination_io_fired_locked() || handover_requested_ || (ready_ && params_.handover == HandoverPolicy::Auto);
}

bool SourceSession::destination_io_fired_locked() {
  if (params_.handover != HandoverPolicy::OnDestinationIo || handover_requested_) return false;
  const auto now = std::chrono::steady_clock::now();
  if (!destination_io_.due(now)) return false;
  handover_requested_ = true;
  s_.log(fmt::format("migration {}: handover=on-destination-io: {} requests forwarded from the destination's "
                     "clients, this side's quiet for {} ms: handing over",
                     id_, destination_io_.forwarded_requests(), destination_io_.local_quiet(now).count()));
  return true;
}

void SourceSession::set_ready(bool converged, std::string why) {
  {
    MutexLock lock(mu_);
    ready_ = true;
    converged_ = converged;
    ready_reason_ = std::move(why);
  }
  cv_.notify_all();
}

// One round of pushes and what it tells about convergence (invariant 4).
void SourceSession::push_round(bool* ready, uint64_t* prev_left, int* not_shrinking) {
  const SegmentGeometry& g = s_.geometry();
  bool pushing;
  {
    UniqueLock lock(mu_);
    pushing = std::any_of(send_set_.begin(), send_set_.end(), [](auto& d) { return d.push; });
    if (!pushing && !*ready) {
      lock.unlock();
      set_ready(false, fmt::format("{}: nothing is pushed before handover", mode_name(params_.mode())));
      return;
    }
    if (*ready && (!pushing || owed_.count() == 0)) {  // nothing to push: wait for the trigger
      cv_.wait_for(lock, std::chrono::milliseconds(50));
      return;
    }
  }
  bool interrupted = false;
  s_.stats.rounds.fetch_add(1);
  auto round_start = Clock::now();
  uint64_t sent_before = s_.stats.payload_bytes_sent.load();
  if (!push_pass(&interrupted)) return;  // the link failed: the loop reconnects
  if (s_.machine.state().phase == Phase::PreCopy)
    s_.machine.transition({Role::Source, Phase::Sync, IoMode::SourceTracking});
  if (interrupted) return;
  after_round(seconds_since(round_start), s_.stats.payload_bytes_sent.load() - sent_before);
  if (*ready) return;
  const uint64_t handover_blocks = (params_.handover_size + g.block_size() - 1) / g.block_size();
  uint64_t left = owed_in_send_set();
  if (left <= handover_blocks) {
    set_ready(true, fmt::format("converged: {} blocks of the send set left <= handover-size", left));
  } else if (s_.stats.rounds >= params_.max_rounds) {
    set_ready(false, fmt::format("max_rounds {} reached with {} blocks left; the rest goes post-copy",
                                 params_.max_rounds, left));
  } else if (double(left) > 0.9 * double(*prev_left) && ++*not_shrinking >= 2) {
    // Two rounds that shrank the set by less than 10%: resending will not
    // converge, the guest re-dirties about as fast as the link drains.
    set_ready(false, fmt::format("the guest dirties as fast as the link drains ({} blocks left, shrinking < 10%); "
                                 "the rest goes post-copy",
                                 left));
  }
  *prev_left = left;
}

// One pass over the owed blocks of the send set, in the policy's order. False
// if the link failed. *interrupted: a handover, cancel or stop request ended
// the pass early.
bool SourceSession::push_pass(bool* interrupted) {
  const SegmentGeometry& g = s_.geometry();
  const uint64_t unit_blocks = std::max<uint64_t>(1, params_.transfer_unit / g.block_size());
  std::vector<bool> push(g.segment_count());
  std::vector<uint64_t> order;
  {
    MutexLock lock(mu_);
    for (uint64_t seg = 0; seg < g.segment_count(); ++seg) push[seg] = send_set_[seg].push;
    order = push_order(params_.policy, segment_loads());
  }
  // Owed blocks of the send set from each position of the pass on: a segment
  // pushed at position i must stay clean while the link carries owed_from[i].
  std::vector<uint64_t> owed_from(order.size() + 1, 0);
  for (size_t i = order.size(); i-- > 0;)
    owed_from[i] = owed_from[i + 1] + (push[order[i]] ? owed_.count_range(g.blocks_of_segment(order[i])) : 0);
  // A unit in a hole that goes on grows to a zero note of up to 16 MiB (in
  // a segment): a 1 TiB sparse image's holes cross as 65536 notes, not a
  // million. send_blocks looks at the extents again after the claim.
  const uint64_t hole_unit_blocks = std::max<uint64_t>(unit_blocks, kMaxDataLength / g.block_size());
  auto next_unit = [&](IndexRange blocks, uint64_t from) {
    IndexRange unit = next_transfer_unit_in(owed_, g, blocks, from, unit_blocks);
    if (unit.count() == unit_blocks && hole_unit_blocks > unit_blocks) {
      uint64_t hole = s_.sender.hole_blocks_at({unit.first, std::min(blocks.last, unit.first + hole_unit_blocks)});
      if (hole > unit_blocks) unit = next_transfer_unit_in(owed_, g, blocks, unit.first, hole);
    }
    return unit;
  };
  *interrupted = false;
  for (size_t i = 0; i < order.size(); ++i) {
    const uint64_t seg = order[i];
    if (!push[seg] || !still_pushed(seg, owed_from[i] * g.block_size())) continue;
    IndexRange blocks = g.blocks_of_segment(seg);
    for (IndexRange unit = next_unit(blocks, blocks.first); !unit.empty() && unit.first < blocks.last;
         unit = next_unit(blocks, unit.last)) {
      {
        MutexLock lock(mu_);
        if (cancel_requested_ || destination_io_fired_locked() || handover_requested_ || stopping_) {
          *interrupted = true;
          return true;
        }
      }
      if (!push_unit(unit)) return false;
    }
  }
  return true;
}

// Background data is compressed as the governor decides, and crosses as
// BASE notes where equal to the base the destination confirmed it holds.
SendEncoding SourceSession::encoding() {
  const bool base = !params_.base_identity.empty() && !base_refused_ && s_.ctx.base &&
                    s_.ctx.base->identity() == params_.base_identity;
  return {&compression_, base ? s_.ctx.base : nullptr};
}

bool SourceSession::push_unit(IndexRange unit) {
  auto link = current_link();
  if (!link || link->closed()) return false;
  // Listed before it is claimed and sent: a link that closes meanwhile puts
  // it back into owed.
  auto it = [&] {
    MutexLock lock(push_mu_);
    unacked_.push_back({unit, UINT64_MAX});
    return std::prev(unacked_.end());
  }();
  (void)it;
  // Claim before reading: a write that lands after this sets the bits again.
  owed_.test_and_clear_range(unit);
  uint64_t before = link->bytes_enqueued();
  auto sent = s_.sender.send_blocks(*link, unit, 0, false, encoding());
  {
    MutexLock lock(push_mu_);
    pushed_frames_ += sent ? sent->frames : 0;
    // The entry is the last one still queuing (only this thread pushes),
    // unless the link closed and on_link_closed emptied the list.
    for (auto r = unacked_.rbegin(); r != unacked_.rend(); ++r)
      if (r->frames_end == UINT64_MAX) {
        r->frames_end = pushed_frames_;
        break;
      }
  }
  if (!sent) {
    owed_.set_range(unit);
    link->close(sent.status());  // a local read error: the loop retries on a new link
    return false;
  }
  s_.stats.data_blocks_pushed.fetch_add(sent->data_blocks, std::memory_order_relaxed);
  // max_rate caps what crosses the wire: a hole's zero note costs a header.
  pacer_.take(link->bytes_enqueued() - before);
  while (!link->wait_queue_below(kPushWindowBytes, std::chrono::milliseconds(200))) {
    if (link->closed() || stopping_) return false;
  }
  return true;
}

// Asks the policy, just before pushing `seg`, whether it should rather wait
// until after handover; `bytes_left` of the send set, this segment's
// included, are still to be pushed in this pass.
bool SourceSession::still_pushed(uint64_t seg, uint64_t bytes_left) {
  const SegmentGeometry& g = s_.geometry();
  MutexLock lock(mu_);
  double seconds_to_handover = double(bytes_left) / push_throughput();
  auto why = defer_before_push(params_.policy, segment_load(seg), g.segment_size(), seconds_to_handover);
  if (!why && pushes_measured() &&
      guest_outwrites_pushes(params_.policy,
                             double(s_.stats.blocks_dirtied.load()) * g.block_size() / seconds_since(precopy_started_at_),
                             push_throughput()))
    why = SetReason::GuestOutwrites;
  if (why) send_set_[seg] = {false, *why};
  return !why;
}

// Enough has been pushed to tell the rate.
bool SourceSession::pushes_measured() const {
  return s_.stats.payload_bytes_sent.load() >= kMinPushSample && seconds_since(precopy_started_at_) >= 0.5;
}

// Payload bytes per second the pushes achieve; before enough has been sent
// to tell, the rate cap or the papers' 1 Gbit/s.
double SourceSession::push_throughput() const {
  double sent = double(s_.stats.payload_bytes_sent.load());
  double seconds = seconds_since(precopy_started_at_);
  if (sent >= kMinPushSample && seconds > 0) return sent / seconds;
  return pacer_.max_rate() ? double(pacer_.max_rate()) : 125e6;
}

uint64_t SourceSession::owed_in_send_set() {
  const SegmentGeometry& g = s_.geometry();
  MutexLock lock(mu_);
  uint64_t n = 0;
  for (uint64_t seg = 0; seg < g.segment_count(); ++seg)
    if (send_set_[seg].push) n += owed_.count_range(g.blocks_of_segment(seg));
  return n;
}

// How much the guest writes a segment: since the migration started, and its
// write rate, the larger of the rate measured since then and the one the
// decayed history implies (a migration just started has measured little).
SegmentLoad SourceSession::segment_load(uint64_t seg) const {
  HeatCounts now = s_.heat().cumulative(seg);
  HeatCounts start = seg < heat_at_start_.size() ? heat_at_start_[seg] : HeatCounts{};
  SegmentLoad load{now.writes - start.writes, 0};
  double seconds = seconds_since(precopy_started_at_);
  if (seconds >= 0.5) load.write_bytes_per_s = (now.write_bytes - start.write_bytes) / seconds;
  if (seg < history_at_start_.size())
    load.write_bytes_per_s =
        std::max(load.write_bytes_per_s, history_at_start_[seg].write_bytes * std::log(2.0) / s_.heat().half_life());
  return load;
}

std::vector<SegmentLoad> SourceSession::segment_loads() const {
  std::vector<SegmentLoad> loads(s_.geometry().segment_count());
  for (uint64_t seg = 0; seg < loads.size(); ++seg) loads[seg] = segment_load(seg);
  return loads;
}

std::vector<double> SourceSession::writes_since_start() const {
  std::vector<HeatCounts> now = s_.heat().cumulative_snapshot();
  std::vector<double> w(now.size());
  for (size_t i = 0; i < now.size(); ++i)
    w[i] = now[i].writes - (i < heat_at_start_.size() ? heat_at_start_[i].writes : 0);
  return w;
}

// Lets the policy move segments out of the send set after a complete round.
void SourceSession::after_round(double seconds, uint64_t bytes_sent) {
  const SegmentGeometry& g = s_.geometry();
  std::vector<uint64_t> redirtied(g.segment_count());
  // After a whole pass, an owed block of a pushed segment was written again
  // after it was sent.
  for (uint64_t seg = 0; seg < g.segment_count(); ++seg) redirtied[seg] = owed_.count_range(g.blocks_of_segment(seg));
  MutexLock lock(mu_);
  uint64_t owed_bytes = 0;
  for (uint64_t seg = 0; seg < g.segment_count(); ++seg)
    if (send_set_[seg].push) owed_bytes += redirtied[seg] * g.block_size();
  double throughput = bytes_sent > 0 && seconds > 0 ? double(bytes_sent) / seconds : push_throughput();
  update_send_set(params_.policy, send_set_, segment_loads(), redirtied, resends_, g.segment_size(),
                  double(owed_bytes) / throughput);
}

// The link to the destination was lost before handover: reach it again and
// resume (owed holds what it lacks), within resume_timeout.
bool SourceSession::reconnect_before_handover() {
  const Clock::time_point since = link_.down_since();
  while (!stopping_) {
    {
      MutexLock lock(mu_);
      if (cancel_requested_) return true;  // the loop ends the migration
    }
    if (seconds_since(since) > params_.resume_timeout) {
      end_before_handover(Phase::Failed, fmt::format("the destination {} could not be reached again within {} s",
                                                     params_.to, params_.resume_timeout));
      return false;
    }
    auto link = s_.connect(params_.to);
    if (link) {
      auto ok = expect_reply<StartOkPayload>(
          (*link)->call_for_reply(resume_start(s_.geometry(), id_, params_, 0), kReplyTimeout));
      if (ok) {
        adopt_link(*link);
        s_.stats.reconnects++;
        s_.log(fmt::format("migration {}: resumed with the destination", id_));
        return true;
      }
      Status why = ok.status();
      (*link)->close(why);
      if (error_code_of(why) == ErrorCode::UnknownMigration || error_code_of(why) == ErrorCode::Busy ||
          error_code_of(why) == ErrorCode::NotCommitted) {
        end_before_handover(Phase::Failed, fmt::format("the destination cannot resume: {}", why.message()));
        return false;
      }
      MutexLock lock(mu_);
      last_error_ = fmt::format("resuming: {}", why.message());
    } else {
      MutexLock lock(mu_);
      last_error_ = fmt::format("reconnecting to the destination: {}", link.status().message());
    }
    if (!wait_worker(kRetryPause)) return false;
  }
  return false;
}

// The owed set is unknown (this side restarted) or the destination holds an
// older copy: compare checksums and keep owed only the blocks that differ.
// Level by level: every transfer unit first; then the units that differ,
// adjacent ones joined, kResyncRefine times finer; down to single blocks,
// so that one block written in a MiB costs that block and 128 bytes of
// checksums, not the MiB (DRBD's csums-alg, rsync). Each level's SUMS go
// out pipelined (one round trip per batch, not per range).
bool SourceSession::resync() {
  const SegmentGeometry& g = s_.geometry();
  auto link = current_link();
  if (!link) return false;
  std::vector<Span> level = {{0, g.image_size()}};
  const uint64_t owed_before = owed_.count();
  for (uint64_t unit = std::max<uint64_t>(params_.transfer_unit, g.block_size()); !level.empty() && !stopping_;
       unit = std::max<uint64_t>(unit / kResyncRefine, g.block_size())) {
    std::vector<Span> finer;
    if (!compare_level(*link, level, unit, finer)) {
      // What this level had claimed and not settled is owed again.
      for (const std::vector<Span>* spans : {&level, &finer})
        for (const Span& sp : *spans) owed_.set_range(g.blocks_touched(sp.offset, sp.length));
      return false;
    }
    level = std::move(finer);
  }
  // Equal blocks: those no longer owed (a span merged across equal units
  // compares some twice; counting here counts each once).
  const uint64_t owed_after = owed_.count();
  if (owed_before > owed_after) s_.stats.blocks_resynced.fetch_add(owed_before - owed_after);
  MutexLock lock(mu_);
  needs_resync_ = stopping_;
  return !stopping_;
}

// Compares `spans` by checksums of `unit` bytes. A unit is claimed (its
// owed bits cleared) before it is read, so a write racing the comparison
// sets its bits again; equal units stay clear, differing ones go to
// `finer` (or, at block size, are owed). False if the link failed.
bool SourceSession::compare_level(PeerLink& link, const std::vector<Span>& spans, uint64_t unit,
                                  std::vector<Span>& finer) {
  const SegmentGeometry& g = s_.geometry();
  const uint64_t per_call = std::min<uint64_t>(kMaxSumsCount, kMaxSumsBytes / unit);
  std::vector<SumsPayload> requests;
  for (const Span& sp : spans)
    for (uint64_t off = sp.offset, end = sp.offset + sp.length; off < end; off += per_call * unit)
      requests.push_back({off, static_cast<uint32_t>(unit),
                          static_cast<uint32_t>(std::min<uint64_t>(per_call, (end - off + unit - 1) / unit))});
  for (size_t first = 0; first < requests.size() && !stopping_; first += kResyncBatch) {
    std::vector<SumsPayload> batch(requests.begin() + first,
                                   requests.begin() + std::min(requests.size(), first + kResyncBatch));
    auto replies = link.call_all(batch, kReplyTimeout);
    for (size_t r = 0; r < batch.size(); ++r) {
      auto reply = expect_reply<SumsReplyPayload>(std::move(replies[r]));
      if (!reply) {
        MutexLock lock(mu_);
        last_error_ = fmt::format("checksum resync: {}", reply.status().message());
        return false;
      }
      const auto& hashes = reply->hashes;
      const uint64_t merge_gap = kResyncMergeGap * std::max<uint64_t>(unit / kResyncRefine, g.block_size());
      for (uint32_t i = 0; i < hashes.size(); ++i) {
        const uint64_t o = batch[r].offset + uint64_t{i} * unit, n = std::min(unit, g.image_size() - o);
        const IndexRange blocks = g.blocks_touched(o, n);
        owed_.test_and_clear_range(blocks);
        auto mine = s_.sender.hash_range(o, n);
        if (mine && *mine == hashes[i]) continue;
        if (unit == g.block_size() || !mine) {
          owed_.set_range(blocks);
        } else if (!finer.empty() && o - (finer.back().offset + finer.back().length) <= merge_gap) {
          finer.back().length = o + n - finer.back().offset;
        } else {
          finer.push_back({o, n});
        }
      }
    }
  }
  return !stopping_;
}

std::vector<HandoverRange> SourceSession::remaining_ranges() {
  const SegmentGeometry& g = s_.geometry();
  // The fetch order after handover, as a rank per segment (higher first).
  std::vector<double> prio;
  {
    MutexLock lock(mu_);
    prio = fetch_priority(params_.policy, rank_heat_, writes_since_start());
  }
  std::vector<uint64_t> order = fetch_order(prio);
  std::vector<uint32_t> rank(g.segment_count());
  for (size_t i = 0; i < order.size(); ++i) rank[order[i]] = static_cast<uint32_t>(order.size() - i);
  std::vector<HandoverRange> out;
  for (IndexRange r : set_runs(owed_)) {
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

void SourceSession::finish_attempt(std::string outcome) {
  {
    MutexLock lock(mu_);
    attempt_.done = attempt_.number;
    attempt_.outcome = std::move(outcome);
    handover_requested_ = false;
  }
  cv_.notify_all();
}

Result<PeerLink::Frame> SourceSession::send_handover(PeerLink& link, uint64_t gen, bool prepare) {
  std::vector<HandoverRange> ranges = remaining_ranges();
  const uint64_t remaining = owed_.count();
  size_t sent = 0;
  Result<PeerLink::Frame> reply = Status::error("no HANDOVER sent");
  do {
    size_t n = std::min(kHandoverRangesPerFrame, ranges.size() - sent);
    HandoverPayload hp{gen, remaining, {ranges.begin() + sent, ranges.begin() + sent + n}, prepare};
    sent += n;
    if (sent < ranges.size()) link.send(hp, link.next_request_id());
    else reply = link.call_for_reply(hp, kReplyTimeout);
  } while (sent < ranges.size());
  return reply;
}

void SourceSession::do_handover() {
  auto link = current_link();
  if (!link) return;
  // Let pushed data already queued drain first, while the guest still runs:
  // HANDOVER must follow it on the link, and waiting behind it inside the
  // fence would make the pause grow with the push window.
  while (!link->closed() && !link->wait_queue_below(kHandoverDrainBytes, std::chrono::milliseconds(200))) {
  }
  uint64_t gen = s_.machine.record().handover_generation + 1;
  std::optional<Group> group;
  {
    MutexLock lock(mu_);
    attempt_.number++;
    group = group_;
  }
  // Writes most of the guest's dirty pages out while it still runs, so the
  // sync inside the fence below has little left (an error here is sticky:
  // that sync reports it).
  (void)s_.image().flush();
  fence_started_ns_ = Clock::now().time_since_epoch().count();
  crash_point("source-before-fence");
  // Durable before the fence: a source restarted from here on knows it may
  // no longer be authoritative. The transition drains in-flight writes.
  // A group member records its group with the fence: restarted inside the
  // window, it follows the group's decision (never the destination's word
  // that it did not commit: that is true until the group says commit).
  Status fenced = s_.machine.transition({Role::Source, Phase::Handover, IoMode::SourceHandover},
                                        [gen, &group](MigrationRecord& r) {
                                          r.handover_generation = gen;
                                          if (group) r.extra["group"] = group->to_json();
                                          else r.extra.erase("group");
                                        });
  if (!fenced) {
    finish_attempt(fmt::format("refused: cannot record the handover: {}", fenced.message()));
    return;
  }
  {
    MutexLock lock(mu_);
    generation_ = gen;
    resolution_.clear();
    prepared_at_ = Clock::now();
  }
  crash_point("source-after-fence");
  // Every write acknowledged here is on disk before the destination may
  // commit: from the commit on, a flush at the destination (or forwarded to
  // it) answers for all completed writes, and the blocks it has not pulled
  // yet exist only in this image. Without this sync a power loss at this
  // host during post-copy would lose writes a flush had covered.
  if (s_.image().flush() < 0) {
    const std::string why = fmt::format("syncing the source image before the handover: {}", std::strerror(errno));
    link->refuse(0, protocol_error(ErrorCode::Internal, "migration failed at the source: " + why));
    return unfence_failed(why, Status::error(why, EIO));
  }
  Result<PeerLink::Frame> reply = send_handover(*link, gen, group.has_value());
  crash_point("source-after-handover-reply");
  const bool refusal = is_refusal(reply);
  auto ack = expect_reply<HandoverAckPayload>(std::move(reply));
  if (group) {
    if (ack && ack->generation == gen && ack->prepare) {
      crash_point("source-after-prepare");
      s_.log(fmt::format("migration {}: prepared handover {} in group {}; waiting for the decision at {}", id_, gen,
                         group->id, group->coordinator));
      return finish_attempt("prepared");  // follow_group() takes it from here
    }
    if (ack && ack->generation == gen) {
      // A destination that committed on a PREPARE: it is authoritative, whatever the group does.
      s_.log(fmt::format("migration {}: the destination committed handover {} on a PREPARE (group {})", id_, gen,
                         group->id));
      return committed(gen);
    }
    if (refusal) {
      // The destination refused: it never commits g. The group cannot
      // commit without this member: say so at the coordinator (best effort;
      // the orchestrator does too), then serve the image again.
      (void)ask_coordinator(*group, /*decide_abort=*/true);
      return refused(ack.status());
    }
    // No answer: the destination did not commit (a PREPARE never does), but
    // the group's decision is the coordinator's; follow_group() asks it.
    {
      MutexLock lock(mu_);
      resolution_ = fmt::format("the prepare of handover {} was not answered: {}", gen, ack.status().message());
    }
    link->close(Status::error("prepare unanswered", ETIMEDOUT));
    return finish_attempt(fmt::format("unresolved: the prepare was not answered ({}); the source follows group {}'s "
                                      "decision",
                                      ack.status().message(), group->id));
  }
  if (ack && ack->generation == gen) return committed(gen);
  if (refusal) return refused(ack.status());
  // No answer: the destination may or may not have committed.
  Status why = ack ? Status::error(fmt::format("acknowledged generation {}, not {}", ack->generation, gen), EPROTO)
                   : ack.status();
  {
    MutexLock lock(mu_);
    resolution_ = fmt::format("handover {} unanswered: {}", gen, why.message());
  }
  link->close(Status::error("handover unanswered", ETIMEDOUT));
  finish_attempt(fmt::format("unresolved: {}; the source stays fenced until the destination answers "
                             "(or `migrate-nbd resolve --abort`)",
                             why.message()));
}

// The destination committed handover `generation`: it is authoritative.
void SourceSession::committed(uint64_t generation) {
  EngineState st = s_.machine.state();
  if (st.phase == Phase::Handover) {
    // The commit is the destination's; recording it here only saves a
    // resolution after a restart, so a failed write does not hold it up.
    Status s = s_.machine.transition({Role::Source, Phase::PostCopy, IoMode::SourceForward},
                                     [generation](MigrationRecord& r) { r.committed_generation = generation; },
                                     Persist::TryWrite);
    if (!s) s_.log(fmt::format("migration {}: {}", id_, s.message()));
  }
  record_pause();
  // Tells the destination this side knows of the commit: it may end the
  // migration on its own from now on (a resolve --abort is no longer possible).
  if (auto link = current_link()) confirm_commit(link);
  {
    MutexLock lock(mu_);
    resolution_.clear();
  }
  finish_attempt("committed");
}

// The destination refused the handover: it did not commit, so this side is
// still the one that holds the truth. Unfence at once.
void SourceSession::refused(const Status& why) {
  unfence_failed(fmt::format("the destination refused the handover: {}", why.message()), why);
}

// The handover did not happen and never will in this attempt: the
// migration fails, this side serves its image again, the link closes.
void SourceSession::unfence_failed(const std::string& message, const Status& why) {
  {
    MutexLock lock(mu_);
    last_error_ = message;
    resolution_.clear();
  }
  if (Status s = s_.machine.transition({Role::None, Phase::Failed, IoMode::Local}, {}, Persist::Remove); !s)
    s_.log(fmt::format("migration {}: {}", id_, s.message()));
  s_.log(fmt::format("migration {}: {}; the source serves its image again", id_, message));
  if (auto link = current_link()) link->close(why);
  finish_attempt("refused: " + message);
}

// Asks the destination, over and over, whether it committed the handover.
void SourceSession::resolve_handover() {
  uint64_t gen;
  {
    MutexLock lock(mu_);
    gen = generation_;
  }
  while (!stopping_ && s_.machine.state().phase == Phase::Handover) {
    bool abort;
    {
      MutexLock lock(mu_);
      abort = abort_requested_;
    }
    if (abort) return operator_abort(gen);
    auto link = current_link();
    if (!link) {
      auto connected = s_.connect(params_.to);
      if (!connected) {
        MutexLock lock(mu_);
        resolution_ = fmt::format("the destination {} cannot be reached: {}", params_.to,
                                  connected.status().message());
      } else {
        link = *connected;
      }
    }
    if (link) {
      auto ok = expect_reply<StartOkPayload>(
          link->call_for_reply(resume_start(s_.geometry(), id_, params_, gen), kReplyTimeout));
      if (ok) {
        json answer = parse_json_object(ok->json);
        uint64_t committed_gen = json_uint(answer, "committed_generation", 0, "START_OK").value_or(0);
        std::string phase = phase_of(answer);
        adopt_link(link);
        if (committed_gen == gen) {
          committed(gen);
          return;
        }
        if (phase == "PreCopy") {
          // Not committed, and it never will be: the destination dropped
          // the handover when this link replaced the old one.
          Status s = s_.machine.transition({Role::Source, Phase::Sync, IoMode::SourceTracking});
          finish_attempt(fmt::format("not committed: the destination did not commit handover {}; the source "
                                     "resumed the migration{}",
                                     gen, s ? "" : ": " + s.message()));
          MutexLock lock(mu_);
          resolution_.clear();
          return;
        }
        MutexLock lock(mu_);
        resolution_ = fmt::format("the destination answered {} (committed {}), not handover {}", answer.dump(),
                                  committed_gen, gen);
      } else {
        Status why = ok.status();
        link->close(why);
        if (error_code_of(why) == ErrorCode::NotCommitted) {
          // The destination ended the migration before any commit: handover
          // gen never will be. This side holds the truth; unfence.
          refused(why);
          return;
        }
        MutexLock lock(mu_);
        resolution_ = fmt::format("asking the destination about handover {}: {}", gen, why.message());
      }
    }
    if (!wait_worker(kRetryPause)) return;
  }
}

// ------------------------------------------------------------ groups

json SourceSession::Group::to_json() const {
  return {{"id", id}, {"coordinator", coordinator}, {"timeout_ms", timeout.count()}};
}

Result<SourceSession::Group> SourceSession::Group::from_json(const json& j) {
  if (!j.is_object()) return Status::error("not an object");
  Group g;
  auto id = j.find("id");
  if (id == j.end() || !id->is_string()) return Status::error("\"group\" (a group id string) is required");
  g.id = id->get<std::string>();
  if (Status s = check_group_id(g.id); !s) return s;
  auto c = j.find("coordinator");
  if (c == j.end() || !c->is_string()) return Status::error("\"coordinator\" (HOST:PORT) is required");
  g.coordinator = c->get<std::string>();
  if (auto hp = parse_host_port(g.coordinator); !hp)
    return Status::error(fmt::format("coordinator {}", hp.status().message()));
  auto t = j.find("timeout_ms");
  if (t != j.end()) {
    if (!t->is_number() || t->get<double>() < 100 || t->get<double>() > 86'400'000)
      return Status::error("group_timeout must be 0.1 to 86400 seconds");
    g.timeout = std::chrono::milliseconds(t->get<int64_t>());
  }
  return g;
}

Result<std::string> SourceSession::ask_coordinator(const Group& g, bool decide_abort) {
  json req = decide_abort ? json{{"op", "group-decide"}, {"group", g.id}, {"decision", "abort"}}
                          : json{{"op", "group-outcome"}, {"group", g.id}};
  auto reply = s_.control(g.coordinator, req);
  if (!reply) return Status::error(fmt::format("asking the coordinator {}: {}", g.coordinator, reply.status().message()),
                                   reply.status().errno_value());
  // group-decide answers a decision recorded before (even a different one)
  // in "decision"; anything else without one is an error.
  auto d = reply->find("decision");
  if (d != reply->end() && d->is_string()) {
    std::string decision = d->get<std::string>();
    if (decision == "commit" || decision == "abort" || (!decide_abort && decision == "undecided")) return decision;
  }
  return Status::error(fmt::format("the coordinator {} answered {:.200}", g.coordinator, reply->dump()), EPROTO);
}

// Inside the window, a group member does what the group decided. It never
// unfences on its own: only an abort recorded at the coordinator (by the
// orchestrator, or by this side once group_timeout passed undecided) lets
// it, because a commit may be recorded there that it has not heard of.
void SourceSession::follow_group() {
  Group g;
  uint64_t gen;
  Clock::time_point deadline;
  {
    MutexLock lock(mu_);
    g = *group_;
    gen = generation_;
    deadline = prepared_at_ + g.timeout;
  }
  bool presumed = false;
  while (!stopping_ && s_.machine.state().phase == Phase::Handover) {
    bool abort;
    {
      MutexLock lock(mu_);
      abort = abort_requested_;
      group_poke_ = false;
    }
    if (abort) return operator_abort(gen);
    const bool decide_abort = Clock::now() >= deadline;
    auto decision = ask_coordinator(g, decide_abort);
    if (decision && decide_abort && !presumed) {
      presumed = true;
      s_.log(fmt::format("migration {}: group {} undecided {} ms after the prepare: recorded abort at {} (it says {})",
                         id_, g.id, g.timeout.count(), g.coordinator, *decision));
    }
    if (!decision) {
      MutexLock lock(mu_);
      resolution_ = fmt::format("group {}: {}; the source stays fenced until the coordinator answers "
                                "(or `migrate-nbd resolve --abort`)",
                                g.id, decision.status().message());
    } else if (*decision == "commit") {
      if (commit_group(gen)) return;
    } else if (*decision == "abort") {
      // Nothing was committed (a PREPARE never commits, and the commit
      // HANDOVER goes only after a commit decision): back to Sync.
      Status s = s_.machine.transition({Role::Source, Phase::Sync, IoMode::SourceTracking},
                                       [](MigrationRecord& r) { r.extra.erase("group"); });
      s_.log(fmt::format("migration {}: group {} aborted: handover {} not committed; the source serves its image and "
                         "goes on{}",
                         id_, g.id, gen, s ? "" : ": " + s.message()));
      {
        MutexLock lock(mu_);
        group_.reset();
        resolution_.clear();
      }
      return finish_attempt(fmt::format("aborted: group {} decided abort; the migration goes on", g.id));
    } else {
      MutexLock lock(mu_);
      resolution_ = fmt::format("group {}: waiting for the decision at {}", g.id, g.coordinator);
    }
    UniqueLock lock(mu_);
    auto pause = decision && *decision == "undecided" ? std::chrono::milliseconds(200) : std::chrono::milliseconds(1000);
    cv_.wait_for(lock, pause, [&]() REQUIRES(mu_) { return stopping_ || abort_requested_ || group_poke_; });
  }
}

bool SourceSession::commit_group(uint64_t gen) {
  auto link = current_link();
  if (!link || link->closed()) {
    auto connected = s_.connect(params_.to);
    if (!connected) {
      MutexLock lock(mu_);
      resolution_ = fmt::format("the group decided commit; the destination {} cannot be reached: {}", params_.to,
                                connected.status().message());
      return false;
    }
    auto ok = expect_reply<StartOkPayload>(
        (*connected)->call_for_reply(resume_start(s_.geometry(), id_, params_, gen), kReplyTimeout));
    if (!ok) {
      (*connected)->close(ok.status());
      MutexLock lock(mu_);
      resolution_ = fmt::format("the group decided commit; asking the destination: {}", ok.status().message());
      return false;
    }
    json answer = parse_json_object(ok->json);
    adopt_link(*connected);
    link = *connected;
    if (json_uint(answer, "committed_generation", 0, "START_OK").value_or(0) == gen) {
      committed(gen);
      return true;
    }
    if (phase_of(answer) != "PreCopy") {
      MutexLock lock(mu_);
      resolution_ = fmt::format("the group decided commit; the destination answered {}", answer.dump());
      return false;
    }
  }
  Result<PeerLink::Frame> reply = send_handover(*link, gen, /*prepare=*/false);
  const bool refusal = is_refusal(reply);
  auto ack = expect_reply<HandoverAckPayload>(std::move(reply));
  if (ack && ack->generation == gen && !ack->prepare) {
    committed(gen);
    return true;
  }
  // Refused after the group decided commit (its disk failed since the
  // prepare, say): the other disks are the destinations' now. This one
  // stays fenced for the operator; asked again meanwhile.
  Status why = ack ? Status::error(fmt::format("answered generation {} (prepare {})", ack->generation, ack->prepare))
                   : ack.status();
  {
    MutexLock lock(mu_);
    resolution_ = fmt::format("the group decided commit, but the destination {} handover {}: {}",
                              refusal ? "refused" : "did not answer", gen, why.message());
  }
  if (!refusal) link->close(Status::error("commit unanswered", ETIMEDOUT));
  return false;
}

void SourceSession::operator_abort(uint64_t gen) {
  Status s = s_.machine.transition({Role::None, Phase::Failed, IoMode::Local},
                                   [gen](MigrationRecord& r) { r.aborted_generation = gen; });
  MutexLock lock(mu_);
  last_error_ = s ? fmt::format("handover {} aborted by the operator", gen)
                  : fmt::format("aborting handover {}: {}", gen, s.message());
  abort_requested_ = false;
  if (s) {
    attempt_.done = attempt_.number;
    attempt_.outcome = last_error_;
  }
  cv_.notify_all();
}

void SourceSession::end_before_handover(Phase end, const std::string& why) {
  s_.log(fmt::format("migration {} {}: {}", id_, end == Phase::Cancelled ? "cancelled" : "failed", why));
  {
    MutexLock lock(mu_);
    last_error_ = why;
  }
  std::shared_ptr<PeerLink> link = current_link();
  Status s = s_.machine.transition({Role::None, end, IoMode::Local}, {}, Persist::Remove);
  if (!s) s_.log(fmt::format("migration {}: {}", id_, s.message()));
  if (link) {
    Status code = end == Phase::Cancelled ? protocol_error(ErrorCode::Cancelled, "migration cancelled at the source")
                                          : protocol_error(ErrorCode::Internal, "migration failed at the source: " + why);
    link->refuse(0, code);
  }
  cv_.notify_all();
}

// ------------------------------------------------------------ status

nlohmann::json SourceSession::progress_json() {
  EngineState st = s_.machine.state();
  MutexLock lock(mu_);
  uint64_t left = owed_.count();
  // After handover the destination knows what is left; the source shows
  // what it last reported.
  if (st.phase == Phase::Done) left = 0;
  else if (st.phase == Phase::PostCopy && peer_progress_.is_object())
    left = peer_progress_.value("blocks_left", left);
  json j = {{"id", id_},
            {"mode", mode_name(params_.mode())},
            {"peer", params_.to},
            {"params", params_.to_json()},
            {"blocks_left", left},
            {"ready", ready_},
            {"converged", converged_},
            {"ready_reason", ready_reason_},
            {"handover_generation", generation_},
            {"pacing", pacer_.to_json()},
            {"compression", compression_.to_json()}};
  j["params"]["max_rate"] = pacer_.max_rate();  // set-rate may have changed it
  link_.describe(j);
  if (!peer_progress_.is_null()) j["peer_progress"] = peer_progress_;
  if (!last_error_.empty()) j["last_error"] = last_error_;
  if (!attempt_.outcome.empty()) j["handover_outcome"] = attempt_.outcome;
  if (group_ && st.phase == Phase::Handover) j["group"] = group_->to_json();
  if (forwarded_writes_.failing()) j["forwarded_flushes_fail"] = true;
  if (params_.handover == HandoverPolicy::OnDestinationIo)
    j["destination_io"] = {{"forwarded_requests", destination_io_.forwarded_requests()},
                           {"local_quiet_ms", destination_io_.local_quiet(std::chrono::steady_clock::now()).count()}};
  if (st.phase == Phase::Handover && !resolution_.empty())
    j["needs_resolution"] = {
        {"why", resolution_},
        {"generation", generation_},
        {"command", fmt::format("migrate-nbd resolve --abort --from {} (only if the destination {} is gone for "
                                "good: if it committed, what its clients wrote since is lost)",
                                params_.from.empty() ? s_.ctx.listen : params_.from, params_.to)}};
  return j;
}

nlohmann::json SourceSession::segments_json(size_t limit) {
  const SegmentGeometry& g = s_.geometry();
  MutexLock lock(mu_);
  json out = json::array();
  if (send_set_.empty()) return out;
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
                   {"owed_blocks", owed_.count_range(g.blocks_of_segment(seg))}});
  }
  return out;
}

}  // namespace livemig
