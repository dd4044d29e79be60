#include "server/metrics.h"

#include <cerrno>
#include <cstdio>
#include <exception>
#include <limits>

#include <fmt/format.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>

namespace livemig::daemon {

using nlohmann::json;
using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

namespace {

using Labels = std::vector<ClientMetric::Label>;

constexpr TaskState kStates[] = {TaskState::Queued, TaskState::Running, TaskState::Done, TaskState::Failed,
                                 TaskState::Cancelled};

// The families in the order they are exposed; each built up by add().
class Families {
 public:
  MetricFamily& family(const std::string& name, MetricType type, const std::string& help) {
    for (MetricFamily& f : families_)
      if (f.name == name) return f;
    families_.push_back({name, help, type, {}});
    return families_.back();
  }

  // A counter or gauge sample.
  void add(const std::string& name, MetricType type, const std::string& help, Labels labels, double value) {
    ClientMetric m;
    m.label = std::move(labels);
    if (type == MetricType::Counter) m.counter.value = value;
    else m.gauge.value = value;
    family(name, type, help).metric.push_back(std::move(m));
  }

  // Drops the families no sample was added to.
  std::vector<MetricFamily> take() {
    std::vector<MetricFamily> out;
    for (MetricFamily& f : families_)
      if (!f.metric.empty()) out.push_back(std::move(f));
    return out;
  }

 private:
  std::vector<MetricFamily> families_;
};

Labels with(Labels labels, std::string name, std::string value) {
  labels.push_back({std::move(name), std::move(value)});
  return labels;
}

// A number in `j` at `key`, if there is one.
bool number(const json& j, const char* key, double* out) {
  if (!j.is_object()) return false;
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return false;
  *out = it->get<double>();
  return true;
}

void add_task(Families& f, const TaskFigures& t) {
  const Task& task = t.task;
  const Labels base = {{"task", std::to_string(task.id)},
                       {"name", task.name},
                       {"source", task.source},
                       {"destination", task.destination},
                       {"mode", task.mode}};
  for (TaskState s : kStates)
    f.add("livemig_migration_state", MetricType::Gauge,
          "The task's state in livemigd's queue: 1 for the state it is in, 0 for the others",
          with(base, "state", state_name(s)), s == task.state ? 1 : 0);
  if (!task.phase.empty())
    f.add("livemig_migration_phase", MetricType::Gauge, "The migration's phase as its plugins last reported it (1)",
          with(base, "phase", task.phase), 1);

  // Gauges: from the side that reports the migration.
  const json& m = t.reported_by_destination ? t.destination : t.source;
  double v = 0;
  const char* remaining_help = "Bytes still to copy to the destination";
  if (task.state == TaskState::Done)
    f.add("livemig_migration_remaining_bytes", MetricType::Gauge, remaining_help, base, 0);
  else if (number(m, "bytes_left", &v))
    f.add("livemig_migration_remaining_bytes", MetricType::Gauge, remaining_help, base, v);
  if (number(m, "link_bytes_per_second", &v))
    f.add("livemig_migration_link_bytes_per_second", MetricType::Gauge,
          "The rate the migration's peer links carry, measured", base, v);
  if (t.block_size > 0 && number(m, "dirty_blocks_per_second", &v))
    f.add("livemig_migration_dirty_bytes_per_second", MetricType::Gauge,
          "The rate the guest writes over data already copied", base, v * static_cast<double>(t.block_size));
  // The source measures the pause; the destination may report it too.
  if ((number(t.source, "handover_pause_ms", &v) && v >= 0) ||
      (number(t.destination, "handover_pause_ms", &v) && v >= 0))
    f.add("livemig_migration_handover_pause_seconds", MetricType::Gauge,
          "How long the guest's writes were held at handover", base, v / 1000);
  if (const json& delay = t.destination.is_object() ? t.destination.value("read_delay_ms", json()) : json();
      delay.is_object()) {
    ClientMetric s;
    s.label = base;
    const double count = delay.value("count", 0.0);
    s.summary.sample_count = static_cast<uint64_t>(count);
    s.summary.sample_sum = delay.value("mean", 0.0) * count / 1000;
    s.summary.quantile = {{0.5, delay.value("p50", 0.0) / 1000}, {0.99, delay.value("p99", 0.0) / 1000}};
    f.family("livemig_migration_demand_pull_delay_seconds", MetricType::Summary,
             "How long the destination's guest reads waited for blocks pulled from the source")
        .metric.push_back(std::move(s));
  }
  f.add("livemig_migration_restarts_total", MetricType::Counter,
        "Times livemigd restarted the migration from pre-copy after a failure", base,
        task.attempts > 1 ? task.attempts - 1 : 0);

  // Counters: each side's own.
  using Side = std::pair<const char*, const json*>;
  for (const auto& [side, mj] : {Side{"source", &t.source}, Side{"destination", &t.destination}}) {
    const Labels labels = with(base, "side", side);
    if (number(*mj, "wire_bytes", &v))
      f.add("livemig_migration_wire_bytes_total", MetricType::Counter,
            "Bytes this side's peer links carried for the migration (after compression, with framing)", labels, v);
    if (number(*mj, "demand_pulls", &v))
      f.add("livemig_migration_demand_pulls_total", MetricType::Counter,
            "Blocks pulled from the source because a guest read needed them", labels, v);
    using Kind = std::pair<const char*, const char*>;  // label value, key in the status
    for (const auto& [kind, key] : {Kind{"pull", "pull_errors"}, Kind{"reconnect", "reconnects"}})
      if (number(*mj, key, &v))
        f.add("livemig_migration_errors_total", MetricType::Counter,
              "Errors the migration met and carried on through: pulls answered with an error, peer links lost",
              with(labels, "kind", kind), v);
  }
}

void add_plugin(Families& f, const PluginFigures& p) {
  const Labels base = {{"plugin", p.address}};
  f.add("livemig_plugin_up", MetricType::Gauge, "Whether the plugin answered livemigd's last status poll in time",
        base, p.up ? 1 : 0);
  const json& st = p.stats;
  if (!st.is_object()) return;
  double v = 0;
  if (number(st, "connections", &v))
    f.add("livemig_plugin_connections", MetricType::Gauge, "NBD clients connected to the plugin", base, v);
  if (const json& req = st.value("requests", json()); req.is_object()) {
    for (const auto& [op, c] : req.items()) {
      if (op == "errors") {
        if (c.is_number())
          f.add("livemig_plugin_request_errors_total", MetricType::Counter, "NBD requests the plugin failed", base,
                c.get<double>());
        continue;
      }
      if (number(c, "count", &v))
        f.add("livemig_plugin_requests_total", MetricType::Counter, "NBD requests the plugin served",
              with(base, "op", op), v);
      if (number(c, "bytes", &v))
        f.add("livemig_plugin_request_bytes_total", MetricType::Counter,
              "Bytes the plugin's NBD requests covered (read, written, trimmed, zeroed, cached)", with(base, "op", op),
              v);
    }
  }
  if (const json& lat = st.value("latency", json()); lat.is_object() && lat.value("buckets", json()).is_array()) {
    ClientMetric h;
    h.label = base;
    h.histogram.sample_count = lat.value("count", uint64_t{0});
    h.histogram.sample_sum = lat.value("sum_seconds", 0.0);
    for (const json& b : lat["buckets"])
      h.histogram.bucket.push_back({b.value("count", uint64_t{0}), b.value("le_seconds", 0.0)});
    h.histogram.bucket.push_back({h.histogram.sample_count, std::numeric_limits<double>::infinity()});
    f.family("livemig_plugin_request_duration_seconds", MetricType::Histogram,
             "Time the plugin took for its guests' reads, writes, trims and zeroes")
        .metric.push_back(std::move(h));
  }
}

// Hands prometheus-cpp what the daemon says at each scrape.
class SnapshotCollectable : public prometheus::Collectable {
 public:
  explicit SnapshotCollectable(MetricsExporter::Collect collect) : collect_(std::move(collect)) {}
  std::vector<MetricFamily> Collect() const override {
    try {
      return metric_families(collect_());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "livemigd: metrics: %s\n", e.what());
      return {};
    }
  }

 private:
  MetricsExporter::Collect collect_;
};

}  // namespace

std::vector<MetricFamily> metric_families(const MetricsSnapshot& snapshot) {
  Families f;
  for (const TaskFigures& t : snapshot.tasks) add_task(f, t);
  for (const PluginFigures& p : snapshot.plugins) add_plugin(f, p);
  return f.take();
}

Result<std::unique_ptr<MetricsExporter>> MetricsExporter::start(const std::string& address, Collect collect) {
  std::unique_ptr<MetricsExporter> e(new MetricsExporter);
  try {
    e->exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& ex) {
    return Status::error(fmt::format("metrics-listen {}: cannot listen there ({})", address, ex.what()), EADDRINUSE);
  }
  e->collectable_ = std::make_shared<SnapshotCollectable>(std::move(collect));
  e->exposer_->RegisterCollectable(e->collectable_);
  return e;
}

MetricsExporter::~MetricsExporter() {
  // Stop serving before the collectable (and what it calls) goes away.
  exposer_.reset();
}

int MetricsExporter::port() const {
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

}  // namespace livemig::daemon
