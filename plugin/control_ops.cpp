#include "plugin/control_ops.h"

#include <algorithm>
#include <functional>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/version.h"
#include "common/heat_map.h"
#include "common/json_limits.h"
#include "plugin/group_decisions.h"
#include "plugin/guest_latency.h"
#include "plugin/migration_engine.h"
#include "plugin/peer_server.h"
#include "plugin/test_hooks.h"

namespace livemig {
namespace {

using nlohmann::json;

json error_reply(const std::string& message) { return {{"ok", false}, {"error", message}}; }

json op_counter(const OpCounter& c, bool with_bytes = true) {
  json j = {{"count", c.count.load(std::memory_order_relaxed)}};
  if (with_bytes) j["bytes"] = c.bytes.load(std::memory_order_relaxed);
  return j;
}

json status(PluginState& st, const json&) {
  const SegmentGeometry& g = *st.geometry;
  json j = st.engine->status_json();
  j.update(json{{"ok", true},
          {"version", kVersion},
          {"image", st.config.image},
          {"size", g.image_size()},
          {"block_size", g.block_size()},
          {"segment_size", g.segment_size()},
          {"blocks", g.block_count()},
          {"segments", g.segment_count()},
          {"readonly", st.config.readonly},
          {"listen", st.config.listen},
          {"secret_file", st.config.secret_path},
          {"tls", st.engine->tls() ? st.engine->tls()->describe() : std::string("off")},
          {"peer_port", st.peer ? st.peer->port() : 0},
          {"connections", st.connections.load(std::memory_order_relaxed)},
          {"uptime_seconds", st.uptime_seconds()}});
  return j;
}

json segment_json(const SegmentGeometry& g, uint64_t s, const HeatCounts& cum, const HeatCounts& dec,
                  HeatWeights w) {
  return {{"segment", s},
          {"offset", g.segment_offset(s)},
          {"reads", static_cast<uint64_t>(cum.reads)},
          {"writes", static_cast<uint64_t>(cum.writes)},
          {"read_bytes", static_cast<uint64_t>(cum.read_bytes)},
          {"write_bytes", static_cast<uint64_t>(cum.write_bytes)},
          {"decayed_reads", dec.reads},
          {"decayed_writes", dec.writes},
          {"score", heat_score(dec, w)}};
}

// "top": N lists the N hottest segments by decayed score; otherwise every
// segment that has seen any request, in index order.
Result<json> heat_json(PluginState& st, const json& req) {
  const SegmentGeometry& g = *st.geometry;
  const HeatWeights w;
  st.heat->decay_tick(st.uptime_seconds());
  std::vector<HeatCounts> cum = st.heat->cumulative_snapshot();
  std::vector<HeatCounts> dec = st.heat->decayed_snapshot();
  json segs = json::array();
  if (req.contains("top")) {
    if (!req["top"].is_number_unsigned())
      return Status::error("stats: \"top\" must be a non-negative integer");
    uint64_t top = req["top"].get<uint64_t>();
    for (const RankedSegment& r : rank_segments(dec, w)) {
      if (segs.size() >= top) break;
      segs.push_back(segment_json(g, r.segment, cum[r.segment], dec[r.segment], w));
    }
  } else {
    for (uint64_t s = 0; s < cum.size(); ++s)
      if (cum[s].reads > 0 || cum[s].writes > 0) segs.push_back(segment_json(g, s, cum[s], dec[s], w));
  }
  return json{{"half_life_seconds", st.heat->half_life()},
              {"weights", {{"read", w.read}, {"write", w.write}}},
              {"segment_size", g.segment_size()},
              {"segments", std::move(segs)}};
}

// The guests' request latency since the plugin started (guest_latency.h) as
// a Prometheus histogram: cumulative counts at fixed bounds in seconds. A
// count at a bound takes the histogram's buckets that end below it, so it
// never counts a slower request but may miss one up to 12.5% faster than the
// bound; the sum adds each bucket's middle.
json latency_json(const GuestLatency& latency) {
  static constexpr double kBounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,     10};
  const CumulativeHistogram::Counts counts = latency.snapshot();
  uint64_t total = 0;
  double sum = 0;
  for (int b = 0; b < CumulativeHistogram::kBuckets; ++b) {
    total += counts[b];
    sum += static_cast<double>(counts[b]) * static_cast<double>(CumulativeHistogram::bucket_middle(b)) / 1e9;
  }
  json buckets = json::array();
  uint64_t below = 0;
  int b = 0;
  for (double bound : kBounds) {
    for (const int end = CumulativeHistogram::bucket_of(static_cast<uint64_t>(bound * 1e9)); b < end; ++b)
      below += counts[b];
    buckets.push_back({{"le_seconds", bound}, {"count", below}});
  }
  return {{"count", total}, {"sum_seconds", sum}, {"buckets", std::move(buckets)}};
}

json stats(PluginState& st, const json& req) {
  Result<json> heat = heat_json(st, req);
  if (!heat) return error_reply(heat.status().message());
  const RequestCounters& c = st.counters;
  return {{"ok", true},
          {"uptime_seconds", st.uptime_seconds()},
          {"connections", st.connections.load(std::memory_order_relaxed)},
          {"requests",
           {{"pread", op_counter(c.pread)},
            {"pwrite", op_counter(c.pwrite)},
            {"flush", op_counter(c.flush, false)},
            {"trim", op_counter(c.trim)},
            {"zero", op_counter(c.zero)},
            {"extents", op_counter(c.extents, false)},
            {"cache", op_counter(c.cache)},
            {"errors", c.errors.count.load(std::memory_order_relaxed)}}},
          {"latency", latency_json(st.guest_latency)},
          {"heat", std::move(*heat)},
          {"migration_segments", st.engine->segments_json(4096)}};
}

// ---- handover groups (docs/handover.md, "Groups"): this plugin as the
// coordinator that records each group's decision.

Result<std::string> group_of(const json& req) {
  auto g = req.find("group");
  if (g == req.end() || !g->is_string()) return Status::error("\"group\" (a group id string) is required");
  std::string group = g->get<std::string>();
  if (Status s = check_group_id(group); !s) return s;
  return group;
}

// {group, decision: commit|abort} -> the recorded decision. The first
// decision for a group wins; a different later one is refused, with the
// recorded one in "decision".
json group_decide(PluginState& st, const json& req) {
  auto group = group_of(req);
  if (!group) return error_reply(group.status().message());
  if (!st.groups) return error_reply("this plugin keeps no group decisions");
  auto d = req.find("decision");
  if (d == req.end() || !d->is_string()) return error_reply("\"decision\" (\"commit\" or \"abort\") is required");
  auto decision = parse_group_decision(d->get<std::string>());
  if (!decision) return error_reply(decision.status().message());
  auto recorded = st.groups->decide(*group, *decision);
  if (!recorded) return error_reply(fmt::format("recording the decision of group {}: {}", *group,
                                                recorded.status().message()));
  if (recorded->now && recorded->decision == GroupDecision::Commit) crash_point("coordinator-after-commit");
  json j = {{"group", *group}, {"decision", group_decision_name(recorded->decision)}, {"recorded_now", recorded->now}};
  if (recorded->decision != *decision) {
    j["ok"] = false;
    j["error"] = fmt::format("group {} is already decided: {}", *group, group_decision_name(recorded->decision));
    return j;
  }
  st.engine->log(fmt::format("group {}: {} ({})", *group, group_decision_name(recorded->decision),
                             recorded->now ? "recorded" : "already recorded"));
  j["ok"] = true;
  return j;
}

// {group} -> decision: commit, abort or undecided.
json group_outcome(PluginState& st, const json& req) {
  auto group = group_of(req);
  if (!group) return error_reply(group.status().message());
  if (!st.groups) return error_reply("this plugin keeps no group decisions");
  auto o = st.groups->outcome(*group);
  if (!o) return error_reply(o.status().message());
  return {{"ok", true}, {"group", *group}, {"decision", o->has_value() ? group_decision_name(**o) : "undecided"}};
}

using Handler = std::function<json(PluginState&, const json&)>;

const std::map<std::string, Handler, std::less<>>& handlers() {
  static const std::map<std::string, Handler, std::less<>> table = {
      {"status", status},
      {"stats", stats},
      {"migrate", [](PluginState& st, const json& r) { return st.engine->migrate(r); }},
      {"handover", [](PluginState& st, const json& r) { return st.engine->handover(r); }},
      {"group-decide", group_decide},
      {"group-outcome", group_outcome},
      {"group-resolve", [](PluginState& st, const json& r) { return st.engine->group_resolve(r); }},
      {"cancel", [](PluginState& st, const json& r) { return st.engine->cancel(r); }},
      {"resolve", [](PluginState& st, const json& r) { return st.engine->resolve(r); }},
      {"release", [](PluginState& st, const json& r) { return st.engine->release(r); }},
      {"verify", [](PluginState& st, const json& r) { return st.engine->verify(r); }},
      {"set-rate", [](PluginState& st, const json& r) { return st.engine->set_rate(r); }},
  };
  return table;
}

json dispatch(PluginState& st, std::string_view line) {
  if (!json_depth_within(line))
    return error_reply(fmt::format("request JSON nests arrays or objects deeper than {} levels", kMaxJsonDepth));
  json req = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (req.is_discarded())
    return error_reply(fmt::format("request is not valid JSON: {:.80}", line));
  if (!req.is_object()) return error_reply("request must be a JSON object such as {\"op\":\"status\"}");
  auto op = req.find("op");
  if (op == req.end() || !op->is_string())
    return error_reply("request has no \"op\" string (try {\"op\":\"status\"})");
  auto& table = handlers();
  auto it = table.find(op->get<std::string>());
  if (it == table.end()) {
    std::string known;
    for (auto& [name, _] : table) known += (known.empty() ? "" : ", ") + name;
    return error_reply(fmt::format("unknown op \"{}\" (known: {})", op->get<std::string>(), known));
  }
  json reply = it->second(st, req);
  reply["op"] = it->first;
  return reply;
}

}  // namespace

std::string handle_control_request(PluginState& st, std::string_view line) {
  try {
    return dispatch(st, line).dump(-1, ' ', false, json::error_handler_t::replace);
  } catch (const std::exception& e) {
    return error_reply(fmt::format("internal error: {}", e.what())).dump(-1, ' ', false, json::error_handler_t::replace);
  }
}

}  // namespace livemig
