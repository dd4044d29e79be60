// The destination side of one migration: before the commit it receives
// pushes (acknowledging them once durable) and reads through the source;
// at HANDOVER it commits; after the commit it is authoritative and pulls
// what it lacks (demand pulls ahead of background ones), reconnecting to the
// source whenever the link drops, until every block is present.
//
// Design notes
// ------------
// Before the commit. Pushed DATA is written as it arrives and synced every
// few MiB off the io thread; after each sync PUSH_ACK(n) tells the source the
// first n pushed frames of this link are durable (the source re-sends the
// rest after a cut link). A lost link leaves this side in PreCopy waiting for
// the source to resume (START resume); its data stays.
//
// The commit (HANDOVER(g), maybe in several frames, ranges ascending and
// disjoint across frames, inside the image): sync the image; build presence
// = not remaining; write and sync the presence bitmap; write the record
// (phase PostCopy, committed_generation g): that write is the commit point;
// switch to DestPost; answer HANDOVER_ACK(g). Any failure before the record
// write is an explicit refusal (ERROR): this side did not commit, and the
// source unfences. The commit runs on the io thread and a resume START takes
// commit_mu_, so a source asking "did you commit g?" gets an answer that no
// commit in progress can change afterwards.
//
// After the commit. present lives in the PresenceJournal (durability rules
// there); pulling = a pull of the block is in flight, so a second reader
// waits for it. Pulled data and a client write to a missing block both hold
// the block's segment lock while they check presence, write and mark, so
// pulled data never overwrites a newer local write. An ERROR about one pull
// fails that pull only: a reader waiting for it gets its errno (ENOSPC when
// this disk is full, with the path and bytes missing in status); background
// pulls retry after a pause. Only the operator's abort at the source
// (HandoverLost on reconnect) ends this side's authority.
//
// Threads: frames on the io thread; the puller and the persister (once a
// second) after the commit; PULL/SUMS answers and push syncs on the disk pool.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/block_bitmap.h"
#include "common/migration_params.h"
#include "common/mutex.h"
#include "common/peer_link.h"
#include "plugin/engine_context.h"
#include "plugin/latency_pacer.h"
#include "plugin/presence_journal.h"
#include "plugin/proxy_reader.h"
#include "plugin/pull_window.h"
#include "plugin/session_link.h"

namespace livemig {

// The answer of a destination whose record of migration `id` says it ended
// in `phase` (Failed or Cancelled: reached only from PreCopy, so before any
// commit) to a source asking about a handover: NotCommitted, so that the
// source may unfence.
Status ended_before_commit(const std::string& id, const std::string& phase);

class DestinationSession : public std::enable_shared_from_this<DestinationSession> {
 public:
  DestinationSession(EngineServices& s, std::string migration_id, MigrationParams params);
  ~DestinationSession();
  DestinationSession(const DestinationSession&) = delete;
  DestinationSession& operator=(const DestinationSession&) = delete;

  const std::string& id() const { return id_; }
  // Before the commit: waits for pushes (link may be null after a restart:
  // the source resumes). had_copy: the image held a copy before this START.
  void start_precopy(std::shared_ptr<PeerLink> link, bool had_copy);
  // After the commit (a restart in PostCopy): presence as recovered. The
  // threads start with start_pulling() (after nbdkit forked).
  void start_committed(BlockBitmap present);
  void start_pulling();
  // Stops the threads and closes the link. Not on the io thread.
  void stop();
  // Once a second (engine tick): syncs pushed data that waits.
  void tick();

  // ---- data path (any thread, inside the gate)
  int proxy_read(void* buf, uint32_t count, uint64_t offset);  // DestProxy
  int forward(const ForwardPayload& request);                  // DestProxy: to the source
  int read(void* buf, uint32_t count, uint64_t offset);        // DestPost
  // DestPost writes: begin (may pull a partly written edge block, may lock
  // segments into *locked), the write, end (marks the blocks present).
  int begin_write(uint64_t offset, uint64_t length, IndexRange* locked);
  void end_write(uint64_t offset, uint64_t length, bool ok, IndexRange locked);
  // A flush or FUA reply at DestPost waits for this.
  Status persist();

  // ---- peer (io thread, except on_resume_start: a control thread)
  bool owns(const PeerLink* link) const;
  void on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame);
  void on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why);
  // The source asks where this migration stands (START resume); answers on
  // `link` and makes it this migration's link.
  // probe: the source only asks where the migration stands; in post-copy
  // the link stays this side's own (it dials the source itself).
  void on_resume_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id, bool probe);

  // ---- status
  nlohmann::json progress_json();
  // A new max_rate for the background pulls (any thread; the puller applies it).
  void set_max_rate(uint64_t bytes_per_second) { pacer_.set_max_rate(bytes_per_second); }
  bool link_up() const;
  uint64_t blocks_received() const { return s_.stats.blocks_received.load(); }

 private:
  struct Pull {
    IndexRange blocks;
    uint64_t bytes_left = 0;
    bool background = false;
    std::chrono::steady_clock::time_point asked{};
  };

  // before the commit
  Status decode_data(const DataPayload& p, std::string& plain);
  void on_push(const std::shared_ptr<PeerLink>& link, const DataPayload& p);
  void maybe_sync_pushes(const std::shared_ptr<PeerLink>& link, bool force);
  void on_handover(const std::shared_ptr<PeerLink>& link, uint64_t request_id, const HandoverPayload& p);
  void commit(const std::shared_ptr<PeerLink>& link, uint64_t request_id, uint64_t generation) REQUIRES(commit_mu_);
  // A handover group's PREPARE: commit's checks and syncs, no commit.
  void prepare(const std::shared_ptr<PeerLink>& link, uint64_t request_id, uint64_t generation) REQUIRES(commit_mu_);
  void refuse(const std::shared_ptr<PeerLink>& link, uint64_t request_id, const Status& why) REQUIRES(commit_mu_);
  bool flush_or_refuse(const std::shared_ptr<PeerLink>& link, uint64_t request_id) REQUIRES(commit_mu_);
  void on_source_error(const std::shared_ptr<PeerLink>& link, const ErrorPayload& e);
  void serve_sums(const std::shared_ptr<PeerLink>& link, uint64_t id, const SumsPayload& p);
  // after the commit
  void become_authoritative(BlockBitmap present, std::vector<double> priority);
  void on_pulled(uint64_t id, const DataPayload& p);
  Status apply_pulled(const DataPayload& p, bool background);
  bool is_background_pull(uint64_t id);
  uint64_t issue_pull(IndexRange blocks, bool background) REQUIRES(pull_mu_);
  void finish_pull(uint64_t id, uint64_t bytes);
  void fail_pull(uint64_t id, int err);
  Status ensure_present(IndexRange blocks);
  void serve_pull(const std::shared_ptr<PeerLink>& link, uint64_t id, const PullPayload& p);
  void pull_loop();
  bool pull_segment(uint64_t seg, uint64_t unit_blocks);
  void pay_for_received(const PeerLink& link);
  bool in_tail();  // the puller's thread
  void persist_loop();
  Status reconnect_to_source();
  void send_progress();
  void finish();
  void lost(const Status& why);
  void confirm(uint64_t generation);

  std::shared_ptr<PeerLink> current_link() const;
  void adopt_link(const std::shared_ptr<PeerLink>& link);
  void lock_segments(IndexRange segs);
  void unlock_segments(IndexRange segs);
  void set_error(std::string message);

  EngineServices& s_;
  const std::string id_;
  const MigrationParams params_;
  ProxyReader proxy_;
  SessionLink link_;
  std::atomic<bool> stopping_{false};

  mutable Mutex mu_;
  std::string last_error_ GUARDED_BY(mu_);
  std::string space_error_ GUARDED_BY(mu_);  // the disk is full (cleared by a write that succeeds)
  nlohmann::json peer_progress_ GUARDED_BY(mu_);
  bool had_copy_ GUARDED_BY(mu_) = false;

  // Before the commit (io thread, and the sync job under push_mu_).
  Mutex commit_mu_;                      // a commit and a resume START exclude each other
  std::vector<HandoverRange> pending_ GUARDED_BY(commit_mu_);
  uint64_t pending_generation_ GUARDED_BY(commit_mu_) = 0;
  bool pending_prepare_ GUARDED_BY(commit_mu_) = false;  // its frames carry PREPARE
  uint64_t pending_blocks_ GUARDED_BY(commit_mu_) = 0;
  Mutex push_mu_;
  uint64_t pushed_frames_ GUARDED_BY(push_mu_) = 0;  // pushed DATA frames received on the current link
  uint64_t unsynced_bytes_ GUARDED_BY(push_mu_) = 0;
  bool sync_running_ GUARDED_BY(push_mu_) = false;

  // After the commit. Set once, before the state turns DestPost.
  std::unique_ptr<PresenceJournal> presence_;
  std::unique_ptr<BlockBitmap> pulling_;
  std::unique_ptr<std::mutex[]> segment_locks_;
  std::vector<double> segment_priority_;
  std::thread puller_;
  std::thread persister_;
  std::atomic<bool> confirmed_{false};  // the source confirmed the commit (record.confirmed_generation)
  TransferPacer pacer_;  // max_rate and the guest-first bound cap background pulls too (puller only)
  // What the puller has paid the limiter for: bytes received on this link.
  const PeerLink* paid_link_ = nullptr;  // puller only
  uint64_t paid_received_ = 0;           // puller only
  std::chrono::steady_clock::time_point tail_checked_at_{};  // puller only: when in_tail() last counted the missing blocks

  Mutex pull_mu_;
  CondVar pull_cv_;
  std::map<uint64_t, Pull> pulls_ GUARDED_BY(pull_mu_);
  std::map<uint64_t, int> failed_pulls_ GUARDED_BY(pull_mu_);  // demand pulls that got an error
  uint64_t background_bytes_in_flight_ GUARDED_BY(pull_mu_) = 0;
  PullWindow pull_window_ GUARDED_BY(pull_mu_);
  std::chrono::steady_clock::time_point background_paused_until_ GUARDED_BY(pull_mu_){};
};

}  // namespace livemig
