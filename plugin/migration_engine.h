// The migration engine: one state machine for both roles of a migration.
//
// Design notes
// ------------
// Phases (DESIGN.md): Idle -> PreCopy -> Sync -> Handover -> PostCopy -> Done,
// plus Cancelled and Failed. A mode (precopy, postcopy, ...) is only a set of
// parameters of this engine.
//
// The data path reads one atomic, io_mode_, on every request:
//   Local          no migration, or this side is done: plain pass-through
//   SourceTracking source before handover: a write marks its blocks owed
//   Fenced         source from handover on: writes get EROFS
//   DestProxy      destination before handover: writes get EROFS, reads go to
//                  the source (so no reader sees a stale block)
//   DestPost       destination after handover: authoritative; a read of a
//                  missing block pulls it first, a write completes locally
//
// Source bitmaps. owed_: bit set = the destination does not have this
// block's current contents. Migration start sets every bit; a write sets its
// blocks' bits AFTER its data is in the image; the pusher clears a run's bits
// (test_and_clear) BEFORE it reads the run. So a write racing a send either
// lands before the read (sent now) or sets the bit again (sent later): a
// block crosses again only if written after its last send (invariant 3), and
// no write is missed. At handover owed_ is the remaining set.
//
// Destination bitmaps. present_: bit set = the local image holds the block's
// final data (pulled, or written locally after handover); bits only go 0 -> 1.
// pulling_: a pull of the block is in flight, so a second reader waits for it
// instead of pulling again. Applying pulled data and a client write to a
// missing block both hold the block's segment lock while they check
// present_, write and set present_, so pulled data never overwrites a newer
// local write. Durability (invariant 2): present bits reach the state file
// only after the data they cover was fdatasync'd (persist()); a flush or FUA
// reply waits for persist().
//
// Handover: the source persists phase Handover, fences (io_mode_ = Fenced),
// waits until no write is in flight, and sends HANDOVER with owed_ as ranges
// with heat. The destination fsyncs the data it received, persists
// present = not remaining with phase PostCopy, switches to DestPost and only
// then answers HANDOVER_ACK. After handover the destination pulls the rest
// (background pulls in heat order, at most a few in flight, demand pulls
// with priority ahead of them) until every block is present: Done.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "common/block_bitmap.h"
#include "common/heat_map.h"
#include "common/migration_params.h"
#include "common/migration_policy.h"
#include "common/peer_link.h"
#include "common/segment_geometry.h"
#include "common/state_file.h"
#include "common/status.h"
#include "plugin/image_file.h"

namespace livemig {

enum class Phase { Idle, Monitoring, PreCopy, Sync, Handover, PostCopy, Done, Cancelled, Failed };
enum class Role { None, Source, Destination };
enum class IoMode : uint8_t { Local, SourceTracking, Fenced, DestProxy, DestPost };

const char* phase_name(Phase p);
const char* role_name(Role r);
Result<Phase> parse_phase(const std::string& s);

// What the engine needs from the plugin.
struct EngineContext {
  ImageFile* image = nullptr;
  const SegmentGeometry* geometry = nullptr;
  std::unique_ptr<HeatMap>* heat_slot = nullptr;  // the plugin's, replaced by resize_image
  Secret secret;
  std::string state_path;
  std::string listen;         // our peer address as configured (may be empty)
  std::string handover_policy = "explicit";
  std::chrono::milliseconds peer_timeout{15000};
  std::string node_name = "livemig";
  // Grows an empty image to the source's size (a destination that started on
  // an empty or missing image). Rebuilds the geometry in place.
  std::function<Status(uint64_t)> resize_image;
  // Called about once a second on the engine's thread (heat decay).
  std::function<void()> tick;
  // Where the engine reports what happens (nbdkit_debug in the plugin).
  std::function<void(const std::string&)> log = [](const std::string&) {};
};

class MigrationEngine {
 public:
  explicit MigrationEngine(EngineContext ctx);
  ~MigrationEngine();

  // Start-up: reads the state file, if any, and takes up the role it records
  // (a restarted destination in PostCopy resumes pulling, a restarted source
  // after handover stays fenced and serves pulls). Runs before threads start.
  Status recover();
  // Starts the engine's io thread (after nbdkit forks).
  void start();
  // Stops every thread and closes links. Idempotent.
  void stop();
  boost::asio::io_context& io() { return io_; }
  const Secret& secret() const { return ctx_.secret; }
  // The peer address as bound (listen= with port 0 gets its real port here).
  // Call before start().
  void set_listen_address(const std::string& address) { ctx_.listen = address; }

  // ---- data path (nbdkit callbacks, any thread) ----
  IoMode io_mode() const { return io_mode_.load(); }
  int read(void* buf, uint32_t count, uint64_t offset);
  // Runs do_write (which returns 0 or -1 with errno) under the rules of the
  // current phase. fua: the write must be durable on return.
  template <typename Fn>
  int write(uint64_t offset, uint64_t length, bool fua, Fn&& do_write);
  int flush();
  // The last NBD client of this side disconnected.
  void on_last_client_closed();

  // ---- control operations (any thread but the io thread) ----
  nlohmann::json status_json();
  nlohmann::json migrate(const nlohmann::json& request);
  nlohmann::json handover(const nlohmann::json& request);
  nlohmann::json cancel(const nlohmann::json& request);
  nlohmann::json release(const nlohmann::json& request);
  nlohmann::json verify(const nlohmann::json& request);
  // Per segment: score, writes during the migration, send set and why.
  nlohmann::json segments_json(size_t limit);

  // ---- peer side (io thread) ----
  // An authenticated connection whose purpose is "peer".
  void on_peer_link(const std::shared_ptr<PeerLink>& link);

 private:
  struct PullEntry {
    IndexRange blocks;
    uint64_t bytes_left = 0;
    bool background = false;
    // For proxied reads (destination before handover): where the bytes go.
    char* proxy_buf = nullptr;
    uint64_t proxy_offset = 0;
    uint64_t proxy_length = 0;
    bool proxy_failed = false;
  };
  struct SourceProgress;

  // write() helpers
  int begin_write(uint64_t offset, uint64_t length, IndexRange* locked_segments);
  void end_write(uint64_t offset, uint64_t length, bool ok, IndexRange locked_segments);
  void lock_segments(IndexRange segs);
  void unlock_segments(IndexRange segs);

  // Frames (io thread).
  void on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame);
  void on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why);
  void on_start(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const StartPayload& p);
  void on_data(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const DataPayload& p);
  void on_pull(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const PullPayload& p);
  void serve_pull(PeerLink& link, uint64_t request_id, const PullPayload& p, bool ensure);
  void on_handover(const std::shared_ptr<PeerLink>& link, const FrameHeader& h, const HandoverPayload& p);
  void on_done(const DonePayload& p);
  void on_peer_error(const ErrorPayload& p);

  // Source.
  void source_run();
  bool push_pass(bool* interrupted);
  bool monitor();
  void after_round(double seconds, uint64_t bytes_sent);
  bool still_pushed(uint64_t seg, uint64_t bytes_left);
  bool pushes_measured() const;
  double push_throughput() const;
  uint64_t owed_in_send_set();
  SegmentLoad segment_load(uint64_t seg) const;
  std::vector<SegmentLoad> segment_loads() const;
  std::vector<double> writes_since_start() const;
  bool push_unit(IndexRange unit);
  uint64_t send_blocks(PeerLink& link, IndexRange blocks, uint64_t request_id, bool priority);
  Status do_handover();
  void throttle(uint64_t bytes);
  std::vector<HandoverRange> remaining_ranges();

  // Destination.
  Status prepare_destination(const StartPayload& p);
  Status apply_data(const DataPayload& p, bool post_handover);
  Status ensure_present(IndexRange blocks, bool priority);
  int proxy_read(void* buf, uint32_t count, uint64_t offset);
  void destination_run();
  bool issue_pull(IndexRange blocks, bool background);
  void finish_pull(uint64_t request_id, uint64_t bytes);
  Status persist();
  Status reconnect_to_source();
  void send_progress();
  void finish_destination();

  // Shared.
  HeatMap& heat() const { return **ctx_.heat_slot; }
  void set_phase(Phase p);
  Status save_record();
  std::shared_ptr<PeerLink> current_link();
  void fail(const std::string& why, Phase end = Phase::Failed);
  nlohmann::json progress_json();
  void record_read_delay(double ms);

  EngineContext ctx_;
  boost::asio::io_context io_{1};
  std::unique_ptr<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::thread io_thread_;
  std::thread worker_;  // source pusher or destination puller
  std::unique_ptr<boost::asio::steady_timer> tick_timer_;
  void schedule_tick();

  // Read by every request; on cache lines of their own so that writers
  // bumping inflight_writes_ do not slow readers of io_mode_.
  alignas(64) std::atomic<IoMode> io_mode_{IoMode::Local};
  alignas(64) std::atomic<int64_t> inflight_writes_{0};
  alignas(64) std::atomic<bool> stopping_{false};
  // Source: the destination acknowledged the handover, so reads go there.
  std::atomic<bool> reads_to_destination_{false};
  // Destination: threads answering the old source's proxied reads.
  std::atomic<int> pull_servers_{0};

  // Guards the migration's identity and phase and the link pointer. Never
  // taken on the data path while io_mode_ is Local.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Role role_ = Role::None;                  // GUARDED_BY(mu_)
  Phase phase_ = Phase::Idle;               // GUARDED_BY(mu_)
  MigrationParams params_;                  // GUARDED_BY(mu_)
  std::string migration_id_;                // GUARDED_BY(mu_)
  std::string peer_address_;                // GUARDED_BY(mu_)
  std::string last_error_;                  // GUARDED_BY(mu_)
  std::shared_ptr<PeerLink> link_;          // GUARDED_BY(mu_)
  std::unique_ptr<StateFile> state_;        // GUARDED_BY(mu_) (pointer)
  bool handover_requested_ = false;         // GUARDED_BY(mu_)
  bool cancel_requested_ = false;           // GUARDED_BY(mu_)
  bool ready_ = false;                      // GUARDED_BY(mu_)
  bool converged_ = false;                  // GUARDED_BY(mu_)
  std::string ready_reason_;                // GUARDED_BY(mu_)
  nlohmann::json peer_progress_;            // GUARDED_BY(mu_)
  uint64_t handover_ranges_received_ = 0;   // GUARDED_BY(mu_)
  std::vector<HandoverRange> pending_handover_;  // GUARDED_BY(mu_)
  std::vector<double> segment_priority_;    // GUARDED_BY(mu_)
  std::vector<SegmentDecision> send_set_;   // GUARDED_BY(mu_) source: per segment
  std::vector<unsigned> resends_;           // source worker only
  std::vector<HeatCounts> rank_heat_;       // GUARDED_BY(mu_) the ranking window

  std::unique_ptr<BlockBitmap> owed_;     // source
  std::unique_ptr<BlockBitmap> present_;  // destination
  std::unique_ptr<BlockBitmap> pulling_;  // destination
  std::unique_ptr<std::mutex[]> segment_locks_;  // destination, one per segment
  // Source, set when pushing starts (after monitoring): cumulative heat then,
  // and the decayed history the policy may rate segments by.
  std::vector<HeatCounts> heat_at_start_;
  std::vector<HeatCounts> history_at_start_;
  std::chrono::steady_clock::time_point precopy_started_at_{};

  // Pull bookkeeping (destination).
  std::mutex pull_mu_;
  std::condition_variable pull_cv_;
  std::map<uint64_t, PullEntry> pulls_;       // GUARDED_BY(pull_mu_)
  uint64_t background_bytes_in_flight_ = 0;   // GUARDED_BY(pull_mu_)
  std::vector<IndexRange> unpersisted_;       // GUARDED_BY(pull_mu_): present, data not yet fsync'd
  std::mutex persist_mu_;                     // serializes persist()
  uint64_t unsynced_push_bytes_ = 0;          // io thread only
  std::future<void> push_sync_;               // io thread only: the fdatasync of pushed data

  // Measures.
  std::chrono::steady_clock::time_point started_at_{};
  std::atomic<int64_t> total_time_ms_{-1};
  std::atomic<int64_t> handover_pause_ms_{-1};
  std::atomic<uint64_t> rounds_{0};
  std::atomic<uint64_t> data_blocks_sent_{0};
  std::atomic<uint64_t> data_blocks_pushed_{0};  // by the pre-copy pusher, before handover
  std::atomic<uint64_t> zero_blocks_sent_{0};
  std::atomic<uint64_t> payload_bytes_sent_{0};
  std::atomic<uint64_t> blocks_dirtied_{0};    // block-writes at the source during migration
  std::atomic<uint64_t> demand_pulls_{0};
  std::atomic<uint64_t> background_pulls_{0};
  std::atomic<uint64_t> blocks_received_{0};
  std::atomic<uint64_t> link_bytes_before_{0};  // wire bytes of links that closed
  std::mutex delay_mu_;
  std::vector<double> read_delays_ms_;  // GUARDED_BY(delay_mu_)
  // Rate samples for status: (time, bytes sent, blocks dirtied).
  double last_rate_time_ = 0;
  uint64_t last_rate_bytes_ = 0;
  uint64_t last_rate_dirty_ = 0;
  double link_rate_ = 0;
  double block_rate_ = 0;
  uint64_t last_rate_left_ = 0;
  double dirty_rate_ = 0;
  // Token bucket for max_rate.
  std::chrono::steady_clock::time_point bucket_time_{};
  double bucket_tokens_ = 0;
};

// ---- inline data path ----

template <typename Fn>
int MigrationEngine::write(uint64_t offset, uint64_t length, bool fua, Fn&& do_write) {
  IndexRange locked{0, 0};
  if (begin_write(offset, length, &locked) < 0) return -1;
  int rc = do_write();
  int saved = errno;
  end_write(offset, length, rc == 0, locked);
  if (rc == 0 && fua && io_mode_.load() == IoMode::DestPost) rc = persist().is_ok() ? 0 : (saved = EIO, -1);
  errno = saved;
  return rc;
}

}  // namespace livemig
