// The migration engine: a small coordinator over the parts that each do one
// job (DESIGN.md "Phases", docs/handover.md).
//
//   io_gate           the write gate: io mode + requests in flight; the only
//                     part the nbdkit callbacks pass through
//   phase_machine     role, phase and io mode, changed together along a table
//                     of legal edges and persisted by the same call
//   source_session    owed blocks, the pusher, the handover and its resolution
//   destination_session  pushes received, the commit, presence, pulls, reconnects
//   presence_journal  durability order at the destination (data before bits)
//   proxy_reader      reads answered by the other side, any size
//   block_sender      image contents onto the link (pushes, PULL, SUMS answers)
//   engine_stats      the measures
//   work_pool         bounded threads for disk work and control requests
//
// What the coordinator does: the data path (dispatch on the io mode the gate
// hands out), the control operations, recovery at start-up, and routing of
// peer frames to the session whose link they came on. At most one session
// exists: a std::variant holds a SourceSession or a DestinationSession, so
// the two roles' state cannot coexist. A session is replaced only when no
// request can still use it: the io mode then no longer names a session, and
// the gate has drained.
//
// Threads: nbdkit's request threads (data path); one io thread runs every
// peer link (frames, heartbeats); the disk pool answers PULLs and SUMS and
// syncs pushes; the control pool handles START and CONTROL frames (they may
// wait for the peer, whose frames arrive on the io thread); each session has
// a worker (the source's pusher, the destination's puller and persister).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <variant>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "common/mutex.h"
#include "plugin/destination_session.h"
#include "plugin/engine_context.h"
#include "plugin/source_session.h"

namespace livemig {

class MigrationEngine {
 public:
  explicit MigrationEngine(EngineContext ctx);
  ~MigrationEngine();

  // Start-up: reads the state file, if any, and takes up the state it
  // records (docs/handover.md, "Restarts"). Runs before threads start.
  Status recover();
  // Starts the io thread and the recovered session's threads (after nbdkit forks).
  void start();
  // Stops every thread and closes links. Idempotent.
  void stop();
  boost::asio::io_context& io() { return io_; }
  const Secret& secret() const { return ctx_.secret; }
  const std::shared_ptr<TlsContext>& tls() const { return ctx_.tls; }
  WorkPool& control_pool() { return control_pool_; }
  // The peer address as bound (listen= with port 0 gets its real port here).
  // Call before start().
  void set_listen_address(const std::string& address) { ctx_.listen = address; }

  // ---- data path (nbdkit callbacks, any thread)
  IoMode io_mode() const { return gate_.mode(); }
  int read(void* buf, uint32_t count, uint64_t offset);
  // A client's write, trim or zero (request.op is not Flush) under the rules
  // of the current io mode: applied here where this side is authoritative,
  // forwarded to the side that is otherwise (write_forward.h), refused
  // (EROFS) on a fenced or stale image. 0, or -1 with errno.
  int change(const ForwardPayload& request, bool fast_zero = false);
  int flush();
  // The last NBD client of this side disconnected.
  void on_last_client_closed();

  // ---- control operations (any thread but the io thread)
  nlohmann::json status_json();
  nlohmann::json migrate(const nlohmann::json& request);
  nlohmann::json handover(const nlohmann::json& request);
  // A handover group's member (the source): asks its coordinator now and
  // waits for the outcome.
  nlohmann::json group_resolve(const nlohmann::json& request);
  void log(const std::string& message) const { ctx_.log(message); }
  nlohmann::json cancel(const nlohmann::json& request);
  nlohmann::json resolve(const nlohmann::json& request);
  nlohmann::json release(const nlohmann::json& request);
  nlohmann::json verify(const nlohmann::json& request);
  // A running migration's max_rate, changed (livemigd sharing a host's
  // bandwidth between the migrations it runs). Not persisted: a restarted
  // side starts again from the migrate request's.
  nlohmann::json set_rate(const nlohmann::json& request);
  nlohmann::json segments_json(size_t limit);

  // ---- peer side (io thread)
  // An authenticated connection whose purpose is "peer".
  void on_peer_link(const std::shared_ptr<PeerLink>& link);

 private:
  using Session = std::variant<std::monostate, std::shared_ptr<SourceSession>, std::shared_ptr<DestinationSession>>;

  // change() and flush(), for this side's clients or (forwarded) the
  // other side's: a forwarded request is never sent on again (ESTALE where
  // this side is not authoritative either).
  int apply(const ForwardPayload& request, bool fast_zero, bool forwarded);
  // A request applied to the local image under `mode`, inside the gate.
  int apply_as(IoMode mode, const ForwardPayload& request, bool fast_zero);
  // A request sent to the authoritative side, inside the gate.
  int forward(IoMode mode, const ForwardPayload& request);
  // A FORWARD from the migration's link: applied on the forward pool.
  void on_forward(const std::shared_ptr<PeerLink>& link, PeerLink::Frame frame);
  int write_begin(uint64_t offset, uint64_t length, IoMode mode, IndexRange* locked);
  int write_end(uint64_t offset, uint64_t length, bool ok, bool fua, IoMode mode, IndexRange locked);
  // A read under `mode`, inside the gate.
  int read_as(IoMode mode, void* buf, uint32_t count, uint64_t offset);
  SourceSession* source() const;
  DestinationSession* destination() const;
  Session current_session() const;
  // Stops and drops the session; the gate has drained. Not on the io thread.
  // Its threads' priority goes back to the guest's (set_migration_nice(0)).
  void retire_session() REQUIRES(ops_mu_);
  // The io thread and the disk pool run at `nice` (MigrationParams::
  // migration_nice) from their next task on; a session's own threads set
  // theirs as they start.
  void set_migration_nice(int nice);

  void start_link(const std::shared_ptr<PeerLink>& link);
  void on_frame(const std::shared_ptr<PeerLink>& link, PeerLink::Frame& frame);
  void on_link_closed(const std::shared_ptr<PeerLink>& link, const Status& why);
  void on_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id, const StartPayload& p);
  void on_resume_start(const std::shared_ptr<PeerLink>& link, uint64_t request_id, const StartPayload& p,
                       const nlohmann::json& params);
  Status accept_start(const std::shared_ptr<PeerLink>& link, const StartPayload& p, bool* had_copy);
  Status check_incoming(const EngineState& st, bool* had_copy) REQUIRES(ops_mu_);
  void measure_guest_baseline(MigrationParams& p) const;
  Result<MigrationParams> destination_params(const StartPayload& p);
  Status check_base(const std::string& identity) const;
  nlohmann::json unfence_released(const EngineState& st) REQUIRES(ops_mu_);
  // How this side dials a peer (its name, timeouts, TLS).
  PeerLink::Options link_options() const;
  Result<std::shared_ptr<PeerLink>> connect(const std::string& address);
  Result<nlohmann::json> control_call(const std::string& address, const nlohmann::json& request);
  Status recover_source(const MigrationRecord& rec, Phase phase, std::unique_ptr<StateFile> file);
  Status recover_destination(const MigrationRecord& rec, Phase phase, std::unique_ptr<StateFile> file);
  nlohmann::json progress_json();
  void schedule_tick();

  EngineContext ctx_;
  boost::asio::io_context io_{1};
  std::unique_ptr<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::thread io_thread_;
  std::unique_ptr<boost::asio::steady_timer> tick_timer_;
  std::atomic<bool> stopping_{false};

  IoGate gate_;
  PhaseMachine machine_{gate_};
  EngineStats stats_;
  WorkPool disk_pool_{"livemig-disk", 4, 256};
  WorkPool control_pool_{"livemig-control", 4, 64};
  // The other side's clients' requests (FORWARD): as many as its nbdkit
  // threads send at once, each waiting for this disk.
  WorkPool forward_pool_{"livemig-forward", 8, 256};
  BlockSender sender_;
  EngineServices services_;

  // Serializes the operations that start or end a session (migrate, START,
  // release); may be held while a session stops. Never taken on the io thread.
  Mutex ops_mu_;
  // Guards session_ briefly (the io thread takes it). The data path reads
  // session_ without it while the io mode names the session (see above).
  mutable std::mutex session_mu_;
  Session session_;
  std::atomic<bool> migrating_{false};  // a migrate request is between its checks and its start
  bool received_migration_ GUARDED_BY(ops_mu_) = false;  // this process accepted a START
};

}  // namespace livemig
