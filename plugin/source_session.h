// The source side of one migration: what the destination still owes, the
// pre-copy pusher, the handover and its resolution, and the source's part
// after the commit (answering pulls, forwarding reads).
//
// Design notes
// ------------
// owed: bit set = the destination does not hold this block's current data
// durably. A migration sets every bit (or, resuming after this side
// restarted, sets every bit and clears those the destination's checksums
// match); a guest write sets its blocks' bits AFTER its data is in the image;
// the pusher clears a run's bits (test_and_clear) BEFORE it reads the run. So
// a write racing a push either lands before the read (sent now) or sets the
// bits again (sent later): a block crosses again only if written after its
// last send (invariant 3), and no write is missed.
//
// Pushed frames are owed until the destination says they are durable: each
// push is listed (blocks, the number of pushed frames on the link once it is
// queued); PUSH_ACK(n) drops the entries whose frames are among the first n;
// a link that closes puts the rest back into owed. So after a cut link (or a
// restart of the destination) the migration resumes where it was and
// re-sends only what was not yet durable there.
//
// The handover (docs/handover.md): the pusher lets queued pushes drain,
// persists phase Handover with a new generation g and fences (the write
// gate drains in-flight writes), sends HANDOVER(g) with the owed set, and
// waits for the answer:
//   HANDOVER_ACK(g)  committed: PostCopy, reads go to the destination;
//   ERROR            an explicit refusal: the source unfences at once (the
//                    migration fails, the source keeps serving);
//   nothing          (link lost, timeout, this side restarted) unresolved:
//                    the source stays fenced and asks the destination on
//                    every reconnect (START resume g) whether it committed
//                    g; yes -> PostCopy, no -> back to Sync, unfenced. The
//                    operator's `resolve --abort` unfences without an
//                    answer; a destination that later comes back with g
//                    committed is told it lost (ERROR HandoverLost).
//
// A group member (docs/handover.md, "Groups"; handover request with group
// and coordinator) sends HANDOVER(g) with PREPARE first: the destination
// checks and syncs but does not commit. Then the source stays fenced and
// follows the group's decision, which the coordinator records:
//   commit           HANDOVER(g) again without PREPARE (the usual commit,
//                    over a new link if need be);
//   abort            back to Sync, unfenced (the migration goes on);
//   undecided        asked again; after group_timeout the source records
//                    abort itself (presumed abort; the first decision wins).
// A coordinator that cannot be reached is asked again: the source never
// unfences on its own word, since commit may be recorded. The group is
// persisted with phase Handover (record extra "group"), so a restarted
// source follows it too.
//
// Threads: one worker runs the migration (monitor, push rounds, handover,
// reconnects, resolution); frames arrive on the io thread; PULLs are served
// on the disk pool. mu_ guards what they share.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/block_bitmap.h"
#include "common/migration_params.h"
#include "common/migration_policy.h"
#include "common/mutex.h"
#include "common/peer_link.h"
#include "plugin/destination_io_trigger.h"
#include "plugin/engine_context.h"
#include "plugin/latency_pacer.h"
#include "plugin/link_compression.h"
#include "plugin/proxy_reader.h"
#include "plugin/session_link.h"
#include "plugin/write_forward.h"

namespace livemig {

class SourceSession : public std::enable_shared_from_this<SourceSession> {
 public:
  // How the session begins.
  enum class Begin {
    Fresh,      // a new migration (migrate request); resync if the destination holds a copy
    Restarted,  // this side restarted before handover: owed is unknown, resync first
    InWindow,   // this side restarted inside the handover window: resolve first
    Committed,  // this side restarted after the commit: serve pulls, forward reads
  };

  SourceSession(EngineServices& s, std::string migration_id, MigrationParams params, Begin begin,
                uint64_t handover_generation);
  ~SourceSession();
  SourceSession(const SourceSession&) = delete;
  SourceSession& operator=(const SourceSession&) = delete;

  const std::string& id() const { return id_; }
  const MigrationParams& params() const { return params_; }
  // Starts the worker. link: the link START went over (Fresh), else null;
  // resync: the destination said it holds a copy worth comparing.
  void start(std::shared_ptr<PeerLink> link, bool resync);
  // Stops the worker and closes the link. Not on the io thread.
  void stop();

  // ---- data path (any thread, inside the gate)
  void on_guest_write(IndexRange blocks);
  // A write, trim, zero or flush applied here (SourceTracking): from one of
  // this side's clients, or forwarded from the destination's
  // (handover=on-destination-io watches both).
  void on_client_write(bool forwarded);
  // SourceForward: a read answered by the destination.
  int forward_read(void* buf, uint32_t count, uint64_t offset);
  // SourceForward: a client's write, trim, zero or flush, applied by the destination.
  int forward(const ForwardPayload& request);

  // ---- peer (io thread)
  bool owns(const PeerLink* link) const;
  void on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame);
  void on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why);
  // The destination reconnected after the commit (START resume), claiming
  // `committed`. Answers on `link` (START_OK or ERROR).
  void on_resume_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id, uint64_t committed);

  // ---- control (any thread but the io thread)
  // A handover; with "group" and "coordinator" (and "group_timeout"
  // seconds), a group member's prepare: answers once prepared.
  nlohmann::json request_handover(const nlohmann::json& request);
  // A group member: asks the coordinator now and waits for the outcome.
  nlohmann::json group_resolve();
  nlohmann::json request_cancel();
  // A new max_rate for the pushes (any thread; the pusher applies it).
  void set_max_rate(uint64_t bytes_per_second) { pacer_.set_max_rate(bytes_per_second); }
  nlohmann::json resolve_abort();
  void on_last_client_closed();
  // Status of this migration (the "migration" object of status).
  nlohmann::json progress_json();
  // Per segment: score, writes during the migration, send set and why.
  nlohmann::json segments_json(size_t limit);

 private:
  struct Push {
    IndexRange blocks;
    uint64_t frames_end;  // pushed frames on the link once queued; UINT64_MAX while queuing
  };
  // The handover group this side's handover belongs to.
  struct Group {
    std::string id;
    std::string coordinator;  // HOST:PORT of the plugin that records the decision
    std::chrono::milliseconds timeout{30'000};  // undecided this long after prepare: abort
    nlohmann::json to_json() const;
    static Result<Group> from_json(const nlohmann::json& j);
  };
  struct Attempt {
    uint64_t number = 0;  // handover attempts started
    uint64_t done = 0;    // attempts with an outcome
    std::string outcome;  // "committed", "refused: ...", "unresolved: ...", "not committed"
  };

  // worker
  void run();
  void migrate();
  void follow_post_copy();
  bool begin_pushing();
  bool monitor();
  void push_round(bool* ready, uint64_t* prev_left, int* not_shrinking);
  bool push_pass(bool* interrupted);
  bool push_unit(IndexRange unit);
  bool still_pushed(uint64_t seg, uint64_t bytes_left);
  void after_round(double seconds, uint64_t bytes_sent);
  bool reconnect_before_handover();
  bool resync();
  struct Span {
    uint64_t offset, length;  // bytes of the image
  };
  bool compare_level(PeerLink& link, const std::vector<Span>& spans, uint64_t unit, std::vector<Span>& finer);
  SendEncoding encoding();
  void do_handover();
  // HANDOVER(gen) with the owed set (several frames if need be); the
  // answer to its last frame.
  Result<PeerLink::Frame> send_handover(PeerLink& link, uint64_t gen, bool prepare);
  void resolve_handover();
  // A group member inside the window: follows the coordinator's decision.
  void follow_group();
  // The group decided commit: HANDOVER(g) without PREPARE. False: not yet
  // (the destination cannot be reached, or refused; resolution_ says why).
  bool commit_group(uint64_t gen);
  // Asks the coordinator (decide: records abort first). "commit", "abort"
  // or "undecided".
  Result<std::string> ask_coordinator(const Group& g, bool decide_abort);
  // The operator's resolve --abort inside the window.
  void operator_abort(uint64_t gen);
  void committed(uint64_t generation);
  void refused(const Status& why);
  void unfence_failed(const std::string& message, const Status& why);
  void end_before_handover(Phase end, const std::string& why);
  void record_pause();
  bool handover_due();
  // handover=on-destination-io and its rule holds (sets handover_requested_).
  bool destination_io_fired_locked() REQUIRES(mu_);
  void set_ready(bool converged, std::string why);
  void finish_attempt(std::string outcome);
  bool wait_worker(std::chrono::milliseconds d);

  // helpers
  std::shared_ptr<PeerLink> current_link() const;
  // SourceForward: the link to the destination, dialled if there is none.
  std::shared_ptr<PeerLink> forwarding_link();
  struct DialAnswer {
    std::shared_ptr<PeerLink> link;  // not adopted yet
    std::string phase;               // the destination's
  };
  // Dials the destination and asks where the migration stands (a resume
  // START; probe: asking only, see resume_start).
  Result<DialAnswer> dial_destination(bool probe);
  // Tells the destination on `link` that this side knows of the commit.
  void confirm_commit(const std::shared_ptr<PeerLink>& link);
  void adopt_link(const std::shared_ptr<PeerLink>& link);
  bool pushes_measured() const;
  double push_throughput() const;
  uint64_t owed_in_send_set();
  SegmentLoad segment_load(uint64_t seg) const;
  std::vector<SegmentLoad> segment_loads() const;
  std::vector<double> writes_since_start() const;
  std::vector<HandoverRange> remaining_ranges();
  void serve_pull(const std::shared_ptr<PeerLink>& link, uint64_t id, const PullPayload& p);
  void on_push_ack(uint64_t frames);
  void on_peer_error(const std::shared_ptr<PeerLink>& link, uint64_t id, const ErrorPayload& e);
  void on_done();

  EngineServices& s_;
  const std::string id_;
  const MigrationParams params_;
  const Begin begin_;
  BlockBitmap owed_;
  ProxyReader forward_;
  ForwardedWrites forwarded_writes_;  // what a forwarded flush covers
  SessionLink link_;
  std::thread worker_;
  std::atomic<bool> stopping_{false};

  mutable Mutex mu_;
  CondVar cv_;
  bool handover_requested_ GUARDED_BY(mu_) = false;
  bool cancel_requested_ GUARDED_BY(mu_) = false;
  bool abort_requested_ GUARDED_BY(mu_) = false;
  bool needs_resync_ GUARDED_BY(mu_) = false;
  bool ready_ GUARDED_BY(mu_) = false;
  bool converged_ GUARDED_BY(mu_) = false;
  std::string ready_reason_ GUARDED_BY(mu_);
  std::string last_error_ GUARDED_BY(mu_);
  std::string resolution_ GUARDED_BY(mu_);  // why the window is unresolved
  std::optional<Group> group_ GUARDED_BY(mu_);  // set by a group handover request
  std::chrono::steady_clock::time_point prepared_at_ GUARDED_BY(mu_){};  // PREPARE sent
  bool group_poke_ GUARDED_BY(mu_) = false;  // group-resolve: ask the coordinator now
  bool group_unreadable_ GUARDED_BY(mu_) = false;  // restarted with a group it cannot read: fenced
  uint64_t generation_ GUARDED_BY(mu_);  // the current or last handover
  Attempt attempt_ GUARDED_BY(mu_);
  nlohmann::json peer_progress_ GUARDED_BY(mu_);
  std::vector<SegmentDecision> send_set_ GUARDED_BY(mu_);
  std::vector<HeatCounts> rank_heat_ GUARDED_BY(mu_);  // the ranking window
  std::vector<unsigned> resends_;             // worker only
  // Set when pushing starts (after monitoring), read by the worker and
  // (under mu_) by status.
  std::vector<HeatCounts> heat_at_start_;
  std::vector<HeatCounts> history_at_start_;
  std::chrono::steady_clock::time_point precopy_started_at_{};
  // When the last fence began (steady clock, ns; 0: none in this process).
  std::atomic<int64_t> fence_started_ns_{0};

  // One thread at a time dials the destination for forwarding (forwarding_link).
  std::mutex dial_mu_;

  Mutex push_mu_;
  std::deque<Push> unacked_ GUARDED_BY(push_mu_);
  uint64_t pushed_frames_ GUARDED_BY(push_mu_) = 0;  // on the current link

  TransferPacer pacer_;  // max_rate and the guest-first bound (worker only)
  CompressionGovernor compression_;
  std::atomic<bool> base_refused_{false};  // the destination's base differs somewhere: no more notes
  DestinationIoTrigger destination_io_;
};

}  // namespace livemig
