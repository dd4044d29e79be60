#include "common/migration_params.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "common/enum_names.h"
#include "common/json_limits.h"
#include "common/peer_link.h"
#include "common/protocol_format.h"
#include "common/thread_nice.h"

namespace livemig {

using nlohmann::json;

namespace {

Result<uint64_t> json_size(const json& j, const char* key, uint64_t dflt) { return json_uint(j, key, dflt, "migrate"); }

Result<std::string> json_string(const json& j, const char* key, const std::string& dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_string()) return Status::error(fmt::format("migrate: \"{}\" must be a string", key));
  return it->get<std::string>();
}

// threshold: a number, or "max"/"inf" (never push: livefs = postcopy).
// monitor_period: seconds, or "history" (rank from the decayed heat).
Status parse_policy(const json& j, PolicyParams& p) {
  if (p.mode == MigrationMode::Hybrid) p.threshold = 4;  // Nicolae & Cappello's default order of magnitude
  if (auto it = j.find("threshold"); it != j.end() && !it->is_null()) {
    if (it->is_string() && (*it == "max" || *it == "inf"))
      p.threshold = std::numeric_limits<double>::infinity();
    else if (it->is_number() && it->get<double>() >= 0)
      p.threshold = it->get<double>();
    else
      return Status::error("migrate: \"threshold\" must be a non-negative number or \"max\"");
  }
  auto read_weight = json_number(j, "w_read", 0.5, "migrate");
  auto write_weight = json_number(j, "w_write", 0.5, "migrate");
  if (!read_weight) return read_weight.status();
  if (!write_weight) return write_weight.status();
  double wr = *read_weight, ww = *write_weight;
  if (j.contains("w_read") && !j.contains("w_write")) ww = 1 - wr;
  if (j.contains("w_write") && !j.contains("w_read")) wr = 1 - ww;
  auto w = HeatWeights::make(wr, ww);
  if (!w) return Status::error("migrate: " + w.status().message());
  p.weights = *w;
  if (auto it = j.find("monitor_period"); it != j.end() && !it->is_null()) {
    if (it->is_string() && *it == "history")
      p.monitor_period = -1;
    else if (it->is_number() && it->get<double>() >= 0 && it->get<double>() <= 86400)
      p.monitor_period = it->get<double>();
    else
      return Status::error("migrate: \"monitor_period\" must be seconds (0 to 86400) or \"history\"");
  }
  if (auto it = j.find("max_resends"); it != j.end() && !it->is_null()) {
    if (!it->is_number_unsigned() || it->get<uint64_t>() > 1000)
      return Status::error("migrate: \"max_resends\" must be an integer from 0 to 1000");
    p.max_resends = static_cast<unsigned>(it->get<uint64_t>());
  }
  return Status::ok();
}

json policy_json(const PolicyParams& p) {
  json j = {{"w_read", p.weights.read}, {"w_write", p.weights.write}, {"max_resends", p.max_resends}};
  j["threshold"] = std::isinf(p.threshold) ? json("max") : json(p.threshold);
  j["monitor_period"] = p.monitor_period < 0 ? json("history") : json(p.monitor_period);
  return j;
}
// A pacing factor (is_pacing_factor); `zero_means` says what 0 does.
Result<double> json_factor(const json& j, const char* key, double dflt, const char* zero_means) {
  auto v = json_number(j, key, dflt, "migrate");
  if (!v) return v.status();
  if (!is_pacing_factor(*v))
    return Status::error(fmt::format("migrate: \"{}\" must be 0 ({}) or a factor from 1 to 1000", key, zero_means));
  return *v;
}

// Guest-first pacing: the bound (auto paces by default), its floor, and the
// baseline the source measured (or the operator gave).
Status parse_pacing(const json& j, MigrationParams& p) {
  const bool automatic = p.mode() == MigrationMode::Auto;
  auto bound = json_factor(j, "guest_latency_bound", automatic ? kDefaultGuestLatencyBound : 0, "no pacing");
  if (!bound) return bound.status();
  p.guest_latency_bound = *bound;
  auto slowdown = json_factor(j, "max_slowdown", automatic ? kDefaultMaxSlowdown : 0, "no limit");
  if (!slowdown) return slowdown.status();
  p.max_slowdown = *slowdown;
  auto min_rate = json_size(j, "min_rate", p.min_rate);
  auto p99 = json_size(j, "guest_baseline_p99_ns", 0);
  auto requests = json_size(j, "guest_baseline_requests", 0);
  for (auto* r : {&min_rate, &p99, &requests})
    if (!*r) return r->status();
  if (*min_rate == 0) return Status::error("migrate: \"min_rate\" must be more than 0 bytes/s");
  const bool given = j.contains("min_rate") && !j["min_rate"].is_null();
  if (given && p.max_rate != 0 && *min_rate > p.max_rate)
    return Status::error(fmt::format("migrate: min_rate {} is above max_rate {}", *min_rate, p.max_rate));
  // The default floor yields to a lower max_rate.
  p.min_rate = given || p.max_rate == 0 ? *min_rate : std::min(*min_rate, p.max_rate);
  p.guest_baseline_p99_ns = *p99;
  p.guest_baseline_requests = *requests;
  if (auto it = j.find("migration_nice"); it != j.end() && !it->is_null()) {
    // is_number_integer: a value built in C++ from an int is signed, one parsed from text unsigned.
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > kMaxMigrationNice)
      return Status::error(fmt::format("migrate: \"migration_nice\" must be an integer from 0 to {}",
                                       kMaxMigrationNice));
    p.migration_nice = static_cast<int>(it->get<int64_t>());
  }
  return Status::ok();
}
}  // namespace

const char* handover_policy_name(HandoverPolicy p) {
  switch (p) {
    case HandoverPolicy::Explicit: return "explicit";
    case HandoverPolicy::Auto: return "auto";
    case HandoverPolicy::OnDisconnect: return "on-disconnect";
    case HandoverPolicy::OnDestinationIo: return "on-destination-io";
  }
  return "?";
}

Result<HandoverPolicy> parse_handover_policy(const std::string& s) {
  constexpr HandoverPolicy kAll[] = {HandoverPolicy::Explicit, HandoverPolicy::Auto, HandoverPolicy::OnDisconnect,
                                     HandoverPolicy::OnDestinationIo};
  if (auto p = enum_by_name(s, kAll, handover_policy_name)) return *p;
  return Status::error(fmt::format("handover \"{}\" must be explicit, auto, on-disconnect or on-destination-io", s));
}

std::string Compression::name() const {
  switch (kind) {
    case Kind::Auto: return "auto";
    case Kind::Off: return "off";
    case Kind::Zstd: return fmt::format("zstd:{}", level);
  }
  return "?";
}

Result<Compression> parse_compression(const std::string& s) {
  if (s == "auto") return Compression{};
  if (s == "off") return Compression{Compression::Kind::Off};
  if (s == "zstd") return Compression{Compression::Kind::Zstd, 1};
  int level = 0;
  if (s.starts_with("zstd:")) {
    const char* first = s.data() + 5;
    const char* last = s.data() + s.size();
    auto [end, ec] = std::from_chars(first, last, level);
    if (ec == std::errc() && end == last && first != last && level >= kMinCompressionLevel &&
        level <= kMaxCompressionLevel)
      return Compression{Compression::Kind::Zstd, level};
  }
  return Status::error(fmt::format("compression \"{}\" must be auto, off, zstd or zstd:LEVEL (LEVEL from {} to {})",
                                   s, kMinCompressionLevel, kMaxCompressionLevel));
}

Result<MigrationParams> MigrationParams::from_json(const json& j, HandoverPolicy default_handover) {
  MigrationParams p;
  p.handover = default_handover;
  auto mode = json_string(j, "mode", "precopy");
  if (!mode) return mode.status();
  auto m = parse_mode(*mode);
  if (!m) return Status::error("migrate: " + m.status().message());
  p.policy.mode = *m;
  if (Status s = parse_policy(j, p.policy); !s) return s;
  auto to = json_string(j, "to", "");
  if (!to) return to.status();
  p.to = *to;
  if (p.to.empty()) return Status::error("migrate: \"to\" (the destination HOST:PORT) is required");
  if (auto hp = parse_host_port(p.to); !hp) return Status::error("migrate: to=" + hp.status().message());
  auto from = json_string(j, "from", "");
  if (!from) return from.status();
  p.from = *from;
  auto handover = json_string(j, "handover", handover_policy_name(p.handover));
  if (!handover) return handover.status();
  auto policy = parse_handover_policy(*handover);
  if (!policy) return Status::error("migrate: " + policy.status().message());
  p.handover = *policy;
  if (auto it = j.find("resume_timeout"); it != j.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() < 0 || it->get<double>() > 7 * 86400)
      return Status::error("migrate: \"resume_timeout\" must be seconds from 0 to 604800");
    p.resume_timeout = it->get<double>();
  }
  auto hs = json_size(j, "handover_size", p.handover_size);
  auto rate = json_size(j, "max_rate", p.max_rate);
  auto rounds = json_size(j, "max_rounds", p.max_rounds);
  auto unit = json_size(j, "transfer_unit", p.transfer_unit);
  for (auto* r : {&hs, &rate, &rounds, &unit})
    if (!*r) return r->status();
  p.handover_size = *hs;
  p.max_rate = *rate;
  if (*rounds < 1 || *rounds > 10000) return Status::error("migrate: max_rounds must be from 1 to 10000");
  p.max_rounds = static_cast<unsigned>(*rounds);
  if (*unit < 4096 || *unit > kMaxDataLength || (*unit & (*unit - 1)))
    return Status::error(fmt::format("migrate: transfer_unit {} must be a power of two from 4096 to {}", *unit,
                                     kMaxDataLength));
  p.transfer_unit = *unit;
  if (Status s = parse_pacing(j, p); !s) return s;
  auto compression = json_string(j, "compression", "auto");
  if (!compression) return compression.status();
  auto c = parse_compression(*compression);
  if (!c) return Status::error("migrate: " + c.status().message());
  p.compression = *c;
  auto base = json_string(j, "base_identity", "");
  if (!base) return base.status();
  if (!base->empty() && (base->size() != 16 || base->find_first_not_of("0123456789abcdef") != std::string::npos))
    return Status::error(fmt::format("migrate: \"base_identity\" \"{}\" must be 16 hex digits", *base));
  p.base_identity = *base;
  return p;
}

json MigrationParams::to_json() const {
  json j = policy_json(policy);
  j.update(json{{"mode", mode_name(policy.mode)}, {"to", to},
          {"from", from},           {"handover", handover_policy_name(handover)},
          {"resume_timeout", resume_timeout},
          {"handover_size", handover_size}, {"max_rate", max_rate},
          {"max_rounds", max_rounds},       {"transfer_unit", transfer_unit},
          {"guest_latency_bound", guest_latency_bound}, {"min_rate", min_rate}, {"max_slowdown", max_slowdown},
          {"guest_baseline_p99_ns", guest_baseline_p99_ns}, {"guest_baseline_requests", guest_baseline_requests},
          {"migration_nice", migration_nice},
          {"compression", compression.name()}, {"base_identity", base_identity}});
  return j;
}
}  // namespace livemig
