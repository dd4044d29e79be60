// livemigd's Prometheus metrics (livemigd --metrics-listen ADDR): one scrape
// target for every migration the daemon runs and every plugin it watches.
//
// Design notes
// ------------
// Nothing is kept in prometheus-cpp's registry: at each scrape the exporter
// asks the daemon for a MetricsSnapshot (its tasks and the last status and
// stats replies of the plugins it polls) and metric_families() turns that
// into the exposition, a pure function tested without sockets. So a series
// exists exactly as long as what it describes, and a scrape never sees a
// half-updated migration.
//
// Which tasks: queued and running ones, and those that ended in the last
// kFinishedShown seconds (so that a scrape sees a migration's last figures
// and its end); older ones drop out and keep the series count bounded.
//
// Per migration (labels task, name, source, destination, mode):
//   livemig_migration_state{state}            1 for the task's state, 0 others
//   livemig_migration_phase{phase}            1 for the plugins' phase
//   livemig_migration_remaining_bytes         left to copy (0 once Done)
//   livemig_migration_link_bytes_per_second   measured link rate
//   livemig_migration_dirty_bytes_per_second  rate the guest dirties copied data
//   livemig_migration_handover_pause_seconds  the guest's write pause at handover
//   livemig_migration_demand_pull_delay_seconds  summary: reads that waited for a pull
//   livemig_migration_restarts_total          migrate re-issued after a failure
// and per side (label side = source or destination, each plugin's own count):
//   livemig_migration_wire_bytes_total        bytes on the peer links
//   livemig_migration_demand_pulls_total      blocks pulled for a guest read
//   livemig_migration_errors_total{kind}      pull errors, reconnects
// The gauges come from the side that reports the migration: the source
// before handover, the destination after (as `migrate-nbd status` shows).
//
// Per plugin (label plugin = its peer address):
//   livemig_plugin_up                         answered within heartbeat-timeout
//   livemig_plugin_connections                NBD clients connected
//   livemig_plugin_requests_total{op}         requests served
//   livemig_plugin_request_bytes_total{op}    bytes read, written, trimmed, ...
//   livemig_plugin_request_errors_total       requests that failed
//   livemig_plugin_request_duration_seconds   histogram of request latency
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <prometheus/metric_family.h>

#include "common/status.h"
#include "server/task_store.h"

namespace prometheus {
class Exposer;
class Collectable;
}  // namespace prometheus

namespace livemig::daemon {

// Seconds an ended task stays in the metrics.
constexpr double kFinishedShown = 600;

// One task and what its plugins last said of its migration.
struct TaskFigures {
  Task task;
  nlohmann::json source;       // the source's status "migration" object, or null
  nlohmann::json destination;  // the destination's, or null
  bool reported_by_destination = false;  // after handover: gauges from destination
  uint64_t block_size = 0;     // of the image; 0 = not known yet
};

// One plugin the daemon polls.
struct PluginFigures {
  std::string address;  // "HOST:PORT", its peer port
  bool up = false;
  nlohmann::json stats;  // its last {"op":"stats"} reply, or null
};

struct MetricsSnapshot {
  std::vector<TaskFigures> tasks;
  std::vector<PluginFigures> plugins;
};

// The exposition of `snapshot`, families in a fixed order.
std::vector<prometheus::MetricFamily> metric_families(const MetricsSnapshot& snapshot);

// Serves /metrics on an address (prometheus-cpp's pull exposer, civetweb):
// each scrape calls `collect` on the exposer's thread.
class MetricsExporter {
 public:
  using Collect = std::function<MetricsSnapshot()>;

  // Listens on `address` ("127.0.0.1:9471", "[::1]:9471"; port 0: any).
  // REQUIRES: `collect` may be called until this object is destroyed.
  static Result<std::unique_ptr<MetricsExporter>> start(const std::string& address, Collect collect);
  ~MetricsExporter();

  // The port it listens on.
  int port() const;

 private:
  MetricsExporter() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Collectable> collectable_;
};

}  // namespace livemig::daemon
