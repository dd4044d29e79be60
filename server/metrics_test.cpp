#include "server/metrics.h"

#include <string>

#include <catch2/catch.hpp>
#include <prometheus/text_serializer.h>

using namespace livemig::daemon;
using nlohmann::json;

namespace {

std::string exposition(const MetricsSnapshot& s) {
  return prometheus::TextSerializer().Serialize(metric_families(s));
}

bool has(const std::string& text, const std::string& line) {
  return text.find(line) != std::string::npos;
}

// Every line of `want` is in the exposition `text`.
void check_lines(const std::string& text, std::initializer_list<std::string> want) {
  for (const std::string& line : want) {
    INFO(line);
    CHECK(has(text, line));
  }
}

TaskFigures running_task() {
  TaskFigures t;
  t.task.id = 7;
  t.task.name = "vm.img";
  t.task.source = "10.0.0.1:10809";
  t.task.destination = "10.0.0.2:10809";
  t.task.mode = "precopy";
  t.task.state = TaskState::Running;
  t.task.phase = "PreCopy";
  t.task.attempts = 2;
  t.block_size = 4096;
  t.source = {{"bytes_left", 1048576},     {"wire_bytes", 5000},     {"link_bytes_per_second", 2e6},
              {"dirty_blocks_per_second", 10}, {"handover_pause_ms", -1}, {"pull_errors", 0},
              {"reconnects", 1}};
  return t;
}

const std::string kLabels =
    R"(task="7",name="vm.img",source="10.0.0.1:10809",destination="10.0.0.2:10809",mode="precopy")";

}  // namespace

TEST_CASE("a running migration shows its state, phase, bytes left, rates and the source's counters") {
  std::string text = exposition({{running_task()}, {}});
  check_lines(text, {"# TYPE livemig_migration_state gauge",
                     "livemig_migration_state{" + kLabels + ",state=\"running\"} 1",
                     "livemig_migration_state{" + kLabels + ",state=\"queued\"} 0",
                     "livemig_migration_phase{" + kLabels + ",phase=\"PreCopy\"} 1",
                     "livemig_migration_remaining_bytes{" + kLabels + "} 1048576",
                     "livemig_migration_link_bytes_per_second{" + kLabels + "} 2000000",
                     "livemig_migration_dirty_bytes_per_second{" + kLabels + "} 40960",
                     "# TYPE livemig_migration_wire_bytes_total counter",
                     "livemig_migration_wire_bytes_total{" + kLabels + ",side=\"source\"} 5000",
                     "livemig_migration_errors_total{" + kLabels + ",side=\"source\",kind=\"reconnect\"} 1",
                     "livemig_migration_restarts_total{" + kLabels + "} 1"});
}

TEST_CASE("no handover pause is shown before the handover, and no side that has not reported") {
  std::string text = exposition({{running_task()}, {}});
  CHECK_FALSE(has(text, "livemig_migration_handover_pause_seconds"));
  CHECK_FALSE(has(text, "side=\"destination\""));
  CHECK_FALSE(has(text, "livemig_migration_demand_pull_delay_seconds"));
}

TEST_CASE("after handover the gauges are the destination's; a done migration has nothing left") {
  TaskFigures t = running_task();
  t.task.state = TaskState::Done;
  t.task.phase = "Done";
  t.reported_by_destination = true;
  t.source["handover_pause_ms"] = 12;
  t.destination = {{"bytes_left", 4096},
                   {"wire_bytes", 7000},
                   {"link_bytes_per_second", 3e6},
                   {"demand_pulls", 3},
                   {"read_delay_ms", {{"count", 4}, {"mean", 2.5}, {"p50", 2}, {"p99", 5}, {"max", 5}}}};
  std::string text = exposition({{t}, {}});
  check_lines(text, {"livemig_migration_state{" + kLabels + ",state=\"done\"} 1",
                     "livemig_migration_remaining_bytes{" + kLabels + "} 0",
                     "livemig_migration_link_bytes_per_second{" + kLabels + "} 3000000",
                     "livemig_migration_handover_pause_seconds{" + kLabels + "} 0.012",
                     "livemig_migration_wire_bytes_total{" + kLabels + ",side=\"destination\"} 7000",
                     "livemig_migration_demand_pulls_total{" + kLabels + ",side=\"destination\"} 3",
                     "# TYPE livemig_migration_demand_pull_delay_seconds summary",
                     "livemig_migration_demand_pull_delay_seconds{" + kLabels + ",quantile=\"0.99\"} 0.005",
                     "livemig_migration_demand_pull_delay_seconds_count{" + kLabels + "} 4",
                     "livemig_migration_demand_pull_delay_seconds_sum{" + kLabels + "} 0.01"});
}

TEST_CASE("a plugin shows whether it is up, its requests by op, errors and a latency histogram") {
  PluginFigures p;
  p.address = "10.0.0.1:10809";
  p.up = true;
  p.stats = {{"connections", 2},
             {"requests",
              {{"pread", {{"count", 10}, {"bytes", 40960}}}, {"flush", {{"count", 3}}}, {"errors", 1}}},
             {"latency",
              {{"count", 13},
               {"sum_seconds", 0.02},
               {"buckets", {{{"le_seconds", 0.001}, {"count", 12}}, {{"le_seconds", 0.01}, {"count", 13}}}}}}};
  PluginFigures down;
  down.address = "10.0.0.2:10809";
  std::string text = exposition({{}, {p, down}});
  check_lines(text, {"livemig_plugin_up{plugin=\"10.0.0.1:10809\"} 1",
                     "livemig_plugin_up{plugin=\"10.0.0.2:10809\"} 0",
                     "livemig_plugin_connections{plugin=\"10.0.0.1:10809\"} 2",
                     "livemig_plugin_requests_total{plugin=\"10.0.0.1:10809\",op=\"pread\"} 10",
                     "livemig_plugin_requests_total{plugin=\"10.0.0.1:10809\",op=\"flush\"} 3",
                     "livemig_plugin_request_bytes_total{plugin=\"10.0.0.1:10809\",op=\"pread\"} 40960"});
  CHECK_FALSE(has(text, "op=\"flush\"} 0"));
  check_lines(text, {"livemig_plugin_request_errors_total{plugin=\"10.0.0.1:10809\"} 1",
                     "# TYPE livemig_plugin_request_duration_seconds histogram",
                     "livemig_plugin_request_duration_seconds_bucket{plugin=\"10.0.0.1:10809\",le=\"0.001\"} 12",
                     "livemig_plugin_request_duration_seconds_bucket{plugin=\"10.0.0.1:10809\",le=\"+Inf\"} 13",
                     "livemig_plugin_request_duration_seconds_count{plugin=\"10.0.0.1:10809\"} 13"});
}

TEST_CASE("nothing to show is an empty exposition") {
  CHECK(metric_families({}).empty());
}
