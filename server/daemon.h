// livemigd: the migrations daemon (DESIGN.md, "Control"). It takes migration
// tasks from `migrate-nbd submit` on its Unix socket, keeps them in SQLite
// (server/task_store.h), starts them by priority (FIFO within one) within
// max-concurrent and the per-host bandwidth limit (server/scheduler.h),
// watches both plugins of every running task with heartbeats (the status
// op), and carries a task through plugin failures by the recovery rules
// (scheduler.h, judge()).
//
// Threads:
//   - the control socket's I/O thread, and one short-lived thread per request
//     (common/control_server.h): submit, list, show, cancel, status;
//   - the scheduler thread: every 200 ms, judges the running tasks from the
//     heartbeats and acts (migrate, cancel), then starts queued tasks and
//     moves the running ones' rate caps with the running set (set-rate:
//     never to a plugin the heartbeats call down, each call bounded by
//     heartbeat-timeout);
//   - the heartbeat thread: one loop polls every plugin in use, whatever
//     their number (server/heartbeat.h);
//   - with metrics-listen, prometheus-cpp's HTTP threads: each scrape reads
//     the tasks and the heartbeats' last replies (server/metrics.h).
// The plugin-side migration runs on without the daemon: a restarted daemon
// finds its running tasks in the database and re-attaches to them through
// the same judge() rules.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "client/control_client.h"
#include "common/control_server.h"
#include "common/mutex.h"
#include "common/status.h"
#include "server/heartbeat.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/task_store.h"

namespace livemig::daemon {

struct DaemonConfig {
  std::string database = "/var/lib/livemig/livemigd.db";
  std::string socket = "/run/livemig/livemigd.sock";
  unsigned max_concurrent = 1;
  uint64_t host_bandwidth = 0;     // bytes/s per host, 0 = no limit
  double heartbeat_interval = 1;   // seconds between status polls of a plugin
  double heartbeat_timeout = 5;    // a plugin silent this long is down
  std::string secret_file;         // else $LIVEMIG_SECRET_FILE; required
  TlsSettings tls;                 // TLS to the plugins' peer ports
  unsigned max_attempts = 5;       // migrate requests per task before it fails
  double retry_delay = 2;          // seconds between two restarts of a task
  std::string metrics_listen;      // Prometheus metrics on HOST:PORT; empty: none
};

class Daemon {
 public:
  // Opens the database and binds the socket; starts no thread.
  static Result<std::unique_ptr<Daemon>> create(const DaemonConfig& config);
  ~Daemon();

  // Starts the threads. Returns at once.
  void start();
  // Stops every thread; running migrations go on in the plugins.
  void stop();

  // One control request (a JSON line) and its reply; any thread.
  std::string handle(std::string_view line);

  // The port the metrics are served on; 0 without metrics-listen.
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }

 private:
  Daemon(DaemonConfig config, std::unique_ptr<TaskStore> store, std::shared_ptr<const client::SecretChoice> secret);

  nlohmann::json op_submit(const nlohmann::json& req);
  nlohmann::json op_list(const nlohmann::json& req);
  nlohmann::json op_show(const nlohmann::json& req);
  nlohmann::json op_cancel(const nlohmann::json& req);
  nlohmann::json op_status(const nlohmann::json& req);

  void scheduler_loop();
  void tick();
  void tend(const Task& task);
  void start_queued();
  // Sends migrate for `task` at its source. first: the task's first start.
  // Both calls run on a thread of their own (call_plugin): the scheduler
  // thread never waits for a plugin's migrate or cancel.
  void issue_migrate(int64_t id, bool first);
  void issue_cancel(int64_t id);
  // Claims task `id` for one plugin call; false while one is in flight.
  bool claim_call(int64_t id);
  bool call_in_flight(int64_t id);
  // Runs fn on a thread of its own for the task claimed by claim_call(),
  // and releases the claim when fn returns. Scheduler thread only.
  void call_plugin(int64_t id, std::function<void()> fn);
  client::Timeouts long_call_timeouts() const;
  // Changes a running task's cap at its plugins (set-rate); true once the
  // side moving its data took it (the source before handover, the
  // destination after), and then records it in the task. Calls no plugin
  // the heartbeats call down; a call takes at most heartbeat-timeout.
  bool issue_set_rate(int64_t id, uint64_t cap);
  // The heartbeats call down the plugin that must take the task's set-rate.
  bool rate_holder_down(const Task& task);
  // Reads the task, applies fn, writes it back if fn returns true. Under mu_.
  template <typename Fn>
  void modify(int64_t id, Fn&& fn);
  // What the heartbeats last said of the plugin at `address`; down_since: 0
  // or when it went silent; answered_at: when that status arrived.
  PluginView view_of(const std::string& address, double* down_since,
                     std::chrono::steady_clock::time_point* answered_at);
  void watch_addresses(const std::vector<Task>& running);
  void log(const std::string& message);
  // What a scrape shows (server/metrics.h); any thread.
  MetricsSnapshot metrics_snapshot();
  // Keeps what the plugins' statuses say of a running task's migration.
  void record_figures(const Task& task, const nlohmann::json& source_status, const nlohmann::json& destination_status,
                      bool ours_source, bool ours_destination, bool handed_over);

  DaemonConfig config_;
  std::unique_ptr<TaskStore> store_;
  std::shared_ptr<const client::SecretChoice> secret_;
  std::unique_ptr<ControlServer> server_;

  Mutex mu_;  // also serializes read-modify-writes of tasks
  CondVar changed_;  // a task changed state
  std::map<int64_t, std::chrono::steady_clock::time_point> retry_at_ GUARDED_BY(mu_);
  // When migrate was last answered for a task (statuses older than that
  // cannot show its migration).
  std::map<int64_t, std::chrono::steady_clock::time_point> issued_at_ GUARDED_BY(mu_);
  // Tasks with a migrate or cancel call in flight: tend() sends no other.
  std::set<int64_t> in_flight_ GUARDED_BY(mu_);

  // The plugins' heartbeats (thread-safe itself); set by start() before
  // any thread that uses it, reset by stop() after they ended.
  std::unique_ptr<HeartbeatLoop> heartbeats_;

  // The last migration figures per task, kept past its end for the metrics.
  Mutex figures_mu_;
  std::map<int64_t, TaskFigures> figures_ GUARDED_BY(figures_mu_);
  // Null without metrics-listen; set before start(), reset first by stop()
  // (other threads test config_.metrics_listen instead).
  std::unique_ptr<MetricsExporter> metrics_;

  std::atomic<bool> stopping_{false};
  std::mutex wake_mu_;
  std::condition_variable wake_;
  std::thread scheduler_;
  // The threads of migrate and cancel calls; finished ones are joined by the
  // next call_plugin(), the rest by stop() once the scheduler has ended.
  struct PluginCall {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<PluginCall> calls_;  // scheduler thread, then stop()
};

}  // namespace livemig::daemon
