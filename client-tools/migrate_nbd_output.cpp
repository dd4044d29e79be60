#include "client-tools/migrate_nbd_output.h"
#include "client/units.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <fmt/format.h>


namespace livemig::mig {

using client::format_bytes;
using client::format_ms;
using client::format_rate;
using client::format_seconds;

using nlohmann::json;

namespace {

// Tolerant getters: a field the plugin did not send reads as the default.
double num(const json& j, const char* key, double dflt = 0) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : dflt;
}
bool is_count(const json& v) { return v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0); }
uint64_t count(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && is_count(*it) ? it->get<uint64_t>() : 0;
}
int64_t signed_num(const json& j, const char* key, int64_t dflt = -1) {
  auto it = j.find(key);
  return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : dflt;
}
std::string str(const json& j, const char* key, const std::string& dflt = "") {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : dflt;
}
bool flag(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}
const json& object(const json& j, const char* key) {
  static const json kEmpty = json::object();
  auto it = j.find(key);
  return it != j.end() && it->is_object() ? *it : kEmpty;
}

// The other side's address. (The plugin replaces the "peer" address with the
// peer's progress object once the destination reports progress; the params
// still name both sides.)
std::string peer_of(const json& st, const json& m) {
  if (auto p = str(m, "peer"); !p.empty()) return p;
  return str(object(m, "params"), str(st, "role") == "destination" ? "from" : "to");
}

// How far a side is, as well as its status tells:
//  - a destination learns what is left only at handover, so before it its
//    blocks_left says nothing (known = false);
//  - a source's own count stops at handover (it does not see which blocks
//    the destination pulled), so after it the destination's progress that the
//    source receives ("peer" as an object) is used, and Done means nothing
//    is left.
struct Progress {
  bool known = true;
  uint64_t total = 0, left = 0, done = 0;
  double fraction = 0;
  double bytes_left = 0;
  double eta = -1;  // seconds, -1 unknown or over
  std::string note;
};

Progress progress_of(const json& st, const json& m) {
  Progress p;
  const std::string role = str(st, "role"), phase = str(st, "phase");
  const json* src = &m;
  if (role == "destination" && phase != "PostCopy" && phase != "Done") p.known = false;
  auto peer = m.find("peer");
  if (role == "source" && (phase == "Handover" || phase == "PostCopy") && peer != m.end() && peer->is_object() &&
      peer->contains("blocks_left")) {
    src = &*peer;
    p.note = " (as the destination reports)";
  }
  p.total = count(m, "blocks_total");
  p.left = std::min(count(*src, "blocks_left"), p.total);
  p.bytes_left = num(*src, "bytes_left");
  p.eta = num(*src, "eta_seconds", -1);
  if (phase == "Done") p.left = 0, p.bytes_left = 0;
  if (is_final_phase(phase)) p.eta = -1;
  p.done = p.total - p.left;
  p.fraction = p.total ? double(p.done) / double(p.total) : 0;
  return p;
}

// Bytes of image data this side moved: pushed (source) or received (destination).
double moved_bytes(const json& st, const json& m) {
  if (str(st, "role") == "destination") return double(count(m, "blocks_received")) * num(st, "block_size");
  return num(m, "payload_bytes_sent");
}

std::string bar(double fraction, int width) {
  width = std::max(width, 10);
  int filled = static_cast<int>(std::floor(fraction * width + 1e-9));
  filled = std::clamp(filled, 0, width);
  return "[" + std::string(filled, '#') + std::string(width - filled, '.') + "]";
}

std::string ready_text(const json& m) {
  if (!flag(m, "ready")) return "no";
  std::string reason = str(m, "ready_reason");
  return fmt::format("yes, {}{}", flag(m, "converged") ? "converged" : "not converged",
                     reason.empty() ? "" : " (" + reason + ")");
}

std::string dirty_text(const json& st, const json& m) {
  double blocks = num(m, "dirty_blocks_per_second");
  return fmt::format("{} ({:.0f} blocks/s)", format_rate(blocks * num(st, "block_size")), blocks);
}

std::string read_delay_text(const json& m) {
  const json& d = object(m, "read_delay_ms");
  if (d.empty()) return "-";
  return fmt::format("mean {:.2f} ms, p50 {:.2f} ms, p99 {:.2f} ms, max {:.2f} ms over {} reads", num(d, "mean"),
                     num(d, "p50"), num(d, "p99"), num(d, "max"), count(d, "count"));
}


}  // namespace

// Guest-first pacing: the rate it holds the transfer to, and why; and the
// nice value of the threads that move the data, when not the guest's.
std::string pacing_text(const json& m) {
  const uint64_t nice = count(object(m, "params"), "migration_nice");
  const std::string movers = nice > 0 ? fmt::format("; data movers at nice {}", nice) : "";
  const json& pc = object(m, "pacing");
  if (!flag(pc, "active"))
    return (num(pc, "guest_latency_bound") > 0 ? "off (too few guest requests to measure)" : "off") + movers;
  const std::string rate = num(pc, "rate") > 0 ? "held to " + format_rate(num(pc, "rate")) : "not slowed";
  return fmt::format("{}: guest p99 {:.2f} ms, bound {}x its {:.2f} ms before ({} of {} windows over){}", rate,
                     num(pc, "window_p99_ms"), num(pc, "guest_latency_bound"), num(pc, "baseline_p99_ms"),
                     count(pc, "windows_over_bound"), count(pc, "windows"), movers);
}

namespace {

// Compression on the link: what it saved, and (at the source) what auto
// decided and why.
std::string compression_text(const json& m) {
  const json& c = object(m, "compression");
  std::string out;
  if (count(c, "frames") > 0) {
    double plain = num(c, "plain_bytes"), wire = num(c, "wire_bytes");
    out = fmt::format("{} of data crossed as {} ({:.1f}x, {} frames)", format_bytes(plain), format_bytes(wire),
                      wire > 0 ? plain / wire : 0.0, count(c, "frames"));
  }
  std::string setting = str(c, "setting");
  if (!setting.empty()) {
    std::string now = flag(c, "active") ? fmt::format("compressing at level {}", signed_num(c, "level")) : "not compressing";
    std::string reason = str(c, "reason");
    out += fmt::format("{}{}: {}{}", out.empty() ? "" : "; ", setting, now, reason.empty() ? "" : " (" + reason + ")");
  }
  return out;
}

std::string error_of(const json& st, const json& m) {
  std::string e = str(m, "last_error");
  return e.empty() ? str(st, "last_error") : e;
}

}  // namespace

bool is_final_phase(const std::string& phase) {
  return phase == "Done" || phase == "Failed" || phase == "Cancelled" || phase == "Idle";
}

std::string render_status(const SideStatus& s) {
  std::string out = fmt::format("{} {}\n", s.side, s.address);
  if (!s.reply) return out + fmt::format("  error           {}\n", s.reply.status().message());
  const json& st = s.reply.value();
  auto line = [&out](const char* name, const std::string& value) {
    out += fmt::format("  {:<16}{}\n", name, value);
  };
  auto sub = [&out](const char* name, const std::string& value) {
    out += fmt::format("    {:<16}{}\n", name, value);
  };
  line("image", fmt::format("{} ({}, {} blocks of {}{})", str(st, "image", "?"), format_bytes(num(st, "size")),
                            count(st, "blocks"), format_bytes(num(st, "block_size")),
                            flag(st, "readonly") ? ", read-only" : ""));
  line("role", str(st, "role", "?"));
  line("phase", str(st, "phase", "?"));
  line("io mode", str(st, "io_mode", "?"));
  line("authoritative", flag(st, "authoritative") ? "yes" : flag(st, "fenced") ? "no (fenced)" : "no");
  line("clients", std::to_string(count(st, "connections")));
  const json& m = object(st, "migration");
  if (m.empty()) {
    line("migration", "none");
  } else {
    const json& params = object(m, "params");
    std::string peer = peer_of(st, m);
    line("migration", fmt::format("{}, {} {} {}, handover {}", str(m, "id", "?"), str(m, "mode", "?"),
                                  str(st, "role") == "destination" ? "from" : "to", peer.empty() ? "?" : peer,
                                  str(params, "handover", "?")));
    Progress p = progress_of(st, m);
    if (p.known) {
      sub("blocks left", fmt::format("{} of {} ({:.1f}% done){}", p.left, p.total, 100 * p.fraction, p.note));
      sub("bytes left", format_bytes(p.bytes_left));
    } else {
      sub("blocks left", "known at handover (the source tracks them until then)");
    }
    if (str(st, "role") == "destination")
      sub("received", fmt::format("{} blocks ({})", count(m, "blocks_received"), format_bytes(moved_bytes(st, m))));
    else
      sub("bytes sent", fmt::format("{} payload ({} data blocks, {} zero notes)",
                                    format_bytes(num(m, "payload_bytes_sent")), count(m, "data_blocks_sent"),
                                    count(m, "zero_blocks_sent")));
    sub("wire bytes", format_bytes(num(m, "wire_bytes")));
    sub("rounds", std::to_string(count(m, "rounds")));
    sub("ready", ready_text(m));
    sub("link", format_rate(num(m, "link_bytes_per_second")) + (flag(m, "link_up") ? "" : " (link down)"));
    sub("dirty rate", dirty_text(st, m));
    sub("ETA", format_seconds(p.eta));
    sub("handover pause", format_ms(signed_num(m, "handover_pause_ms")));
    sub("total time", format_ms(signed_num(m, "total_time_ms")));
    sub("elapsed", format_seconds(num(m, "elapsed_seconds", -1)));
    sub("pulls", fmt::format("{} demand, {} background", count(m, "demand_pulls"), count(m, "background_pulls")));
    sub("read delay", read_delay_text(m));
    if (m.contains("pacing")) sub("guest first", pacing_text(m));
    if (m.contains("compression")) sub("compression", compression_text(m));
    if (const json& b = object(m, "base"); !b.empty())
      sub("base image", fmt::format("{} blocks ({}) as notes, read from the base at the destination{}",
                                    count(b, "blocks"), format_bytes(num(b, "bytes")),
                                    count(b, "refused_notes") > 0 ? " (a block of the destination's base differed: "
                                                                    "the rest crossed plain)"
                                                                  : ""));
    if (count(m, "reconnects") > 0 || count(m, "pull_errors") > 0)
      sub("reconnects", fmt::format("{} ({} pull errors)", count(m, "reconnects"), count(m, "pull_errors")));
    if (count(m, "blocks_resynced") > 0)
      sub("resynced", fmt::format("{} blocks equal at the destination (checksums)", count(m, "blocks_resynced")));
    if (std::string ns = str(m, "no_space"); !ns.empty()) sub("disk full", ns);
  }
  if (const json& r = object(st, "needs_resolution"); !r.empty()) {
    line("NEEDS RESOLUTION", str(r, "why"));
    line("", "run: " + str(r, "command"));
  }
  if (std::string e = str(st, "image_sync_error"); !e.empty()) line("IMAGE SYNC ERROR", e);
  if (std::string e = error_of(st, m); !e.empty()) line("last error", e);
  return out;
}

std::string render_watch_screen(const std::string& header, const std::vector<SideStatus>& sides, int width) {
  std::string out = header + "\n";
  int bar_width = std::clamp(width - 40, 10, 60);
  for (const SideStatus& s : sides) {
    out += "\n";
    if (!s.reply) {
      out += fmt::format("{:<4} {}  unreachable: {}\n", s.side, s.address, s.reply.status().message());
      continue;
    }
    const json& st = s.reply.value();
    const json& m = object(st, "migration");
    const bool dest = str(st, "role") == "destination";
    out += fmt::format("{:<4} {}  {}  {}", s.side, s.address, str(st, "role", "?"), str(st, "phase", "?"));
    if (!m.empty())
      out += dest ? fmt::format("  ({})", str(m, "mode", "?"))
                  : fmt::format("  ({}, round {})", str(m, "mode", "?"), count(m, "rounds"));
    if (int64_t pause = signed_num(m, "handover_pause_ms"); pause >= 0)
      out += fmt::format("  handover pause {}", format_ms(pause));
    out += "\n";
    if (m.empty()) {
      out += "  no migration\n";
      continue;
    }
    const std::string link = format_rate(num(m, "link_bytes_per_second"));
    const std::string elapsed = format_seconds(num(m, "elapsed_seconds", -1));
    Progress p = progress_of(st, m);
    if (!p.known) {  // a destination before handover
      out += fmt::format("  receiving: {} blocks ({}) so far, wire {}\n", count(m, "blocks_received"),
                         format_bytes(moved_bytes(st, m)), format_bytes(num(m, "wire_bytes")));
      out += fmt::format("  link {}   elapsed {}\n", link, elapsed);
    } else {
      out += fmt::format("  {} {:5.1f}%  {}/{} blocks{}\n", bar(p.fraction, bar_width), 100 * p.fraction, p.done,
                         p.total, p.note);
      out += fmt::format("  {} {} (wire {})   left {} ({} blocks)\n", dest ? "received" : "sent",
                         format_bytes(moved_bytes(st, m)), format_bytes(num(m, "wire_bytes")),
                         format_bytes(p.bytes_left), p.left);
      if (dest)
        out += fmt::format("  pulls {} demand, {} background   read delay {}\n", count(m, "demand_pulls"),
                           count(m, "background_pulls"), read_delay_text(m));
      else
        out += fmt::format("  dirty {}\n", dirty_text(st, m));
      out += fmt::format("  link {}   ETA {}   elapsed {}\n", link, format_seconds(p.eta), elapsed);
    }
    if (!dest) out += fmt::format("  ready {}\n", ready_text(m));
    if (std::string e = error_of(st, m); !e.empty()) out += fmt::format("  error: {}\n", e);
  }
  return out;
}

std::string render_watch_line(const std::string& clock, const std::vector<SideStatus>& sides) {
  std::string out = clock;
  for (const SideStatus& s : sides) {
    if (sides.size() > 1) out += fmt::format(" | {}", s.side);
    if (!s.reply) {
      out += fmt::format(" unreachable: {}", s.reply.status().message());
      continue;
    }
    const json& st = s.reply.value();
    const json& m = object(st, "migration");
    out += fmt::format(" {}", str(st, "phase", "?"));
    if (m.empty()) continue;
    Progress p = progress_of(st, m);
    if (!p.known) {
      out += fmt::format(" received {} blocks ({}), link {}", count(m, "blocks_received"),
                         format_bytes(moved_bytes(st, m)), format_rate(num(m, "link_bytes_per_second")));
    } else {
      out += fmt::format(" {:.1f}% {}/{} blocks, moved {}, left {}, dirty {}, link {}, ETA {}", 100 * p.fraction,
                         p.done, p.total, format_bytes(moved_bytes(st, m)), format_bytes(p.bytes_left),
                         format_rate(num(m, "dirty_blocks_per_second") * num(st, "block_size")),
                         format_rate(num(m, "link_bytes_per_second")), format_seconds(p.eta));
    }
    if (std::string e = error_of(st, m); !e.empty()) out += fmt::format(", error: {}", e);
  }
  return out;
}

// ---------------------------------------------------------------- verify

json VerifyResult::to_json() const {
  json ranges_json = json::array();
  for (auto& [off, len] : differing) ranges_json.push_back({{"offset", off}, {"length", len}});
  json j = {{"equal", equal},         {"size_from", size_from}, {"size_to", size_to},
            {"range_size", range_size}, {"ranges", ranges},       {"algorithm", algorithm}};
  if (sizes_differ) j["sizes_differ"] = true;
  j["differing"] = std::move(ranges_json);
  return j;
}

Result<VerifyResult> compare_verify(const json& from, const json& to) {
  for (const json* r : {&from, &to}) {
    if (!r->is_object() || !r->contains("hashes") || !r->at("hashes").is_array() || !r->contains("size") ||
        !is_count(r->at("size")) || !r->contains("range_size") ||
        !is_count(r->at("range_size")))
      return Status::error("a verify reply lacks size, range_size or hashes");
  }
  VerifyResult v;
  v.size_from = from["size"].get<uint64_t>();
  v.size_to = to["size"].get<uint64_t>();
  v.range_size = from["range_size"].get<uint64_t>();
  v.algorithm = str(from, "algorithm", "?");
  if (str(to, "algorithm", "?") != v.algorithm)
    return Status::error(fmt::format("the two sides hash with different algorithms ({} and {})", v.algorithm,
                                     str(to, "algorithm", "?")));
  if (to["range_size"].get<uint64_t>() != v.range_size)
    return Status::error("the two sides used different range sizes");
  if (v.size_from != v.size_to) {
    v.sizes_differ = true;
    return v;
  }
  const json& a = from["hashes"];
  const json& b = to["hashes"];
  if (a.size() != b.size()) return Status::error("the two sides sent different numbers of ranges for the same size");
  const uint64_t start = count(from, "offset");
  const uint64_t end = start + (from.contains("length") ? count(from, "length") : v.size_from - start);
  v.ranges = a.size();
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    uint64_t off = start + i * v.range_size;
    v.differing.emplace_back(off, std::min(v.range_size, end - std::min(off, end)));
  }
  v.equal = v.differing.empty();
  return v;
}

std::string render_verify(const VerifyResult& v) {
  if (v.sizes_differ)
    return fmt::format("images differ in size: from has {} ({} bytes), to has {} ({} bytes)\n",
                       format_bytes(double(v.size_from)), v.size_from, format_bytes(double(v.size_to)), v.size_to);
  if (v.equal)
    return fmt::format("images are equal ({} ranges of {}, {})\n", v.ranges, format_bytes(double(v.range_size)),
                       v.algorithm);
  std::string out = fmt::format("images differ in {} of {} ranges of {} ({}):\n", v.differing.size(), v.ranges,
                                format_bytes(double(v.range_size)), v.algorithm);
  for (auto& [off, len] : v.differing)
    out += fmt::format("  offset {} ({}), length {} ({})\n", off, format_bytes(double(off)), len,
                       format_bytes(double(len)));
  return out;
}

}  // namespace livemig::mig

namespace livemig::mig {

std::string render_stats(const nlohmann::json& st) {
  std::string out;
  const auto& req = st.value("requests", nlohmann::json::object());
  out += fmt::format("requests (uptime {:.0f} s):\n", st.value("uptime_seconds", 0.0));
  for (const char* op : {"pread", "pwrite", "flush", "trim", "zero", "extents", "cache"}) {
    if (!req.contains(op)) continue;
    const auto& c = req[op];
    out += fmt::format("  {:<8} {:>12}", op, c.value("count", uint64_t{0}));
    if (c.contains("bytes")) out += fmt::format("  {:>12}", format_bytes(c.value("bytes", uint64_t{0})));
    out += "\n";
  }
  const auto& heat = st.value("heat", nlohmann::json::object());
  const auto& segs = heat.value("segments", nlohmann::json::array());
  if (!segs.empty()) {
    out += fmt::format("heat (score = (w_r*reads + w_w*writes)/2, decayed, half-life {:g} s):\n",
                       heat.value("half_life_seconds", 0.0));
    out += fmt::format("  {:>8} {:>10} {:>9} {:>9} {:>10}\n", "segment", "offset", "reads", "writes", "score");
    for (const auto& s : segs)
      out += fmt::format("  {:>8} {:>10} {:>9} {:>9} {:>10.1f}\n", s.value("segment", uint64_t{0}),
                         format_bytes(s.value("offset", uint64_t{0})), s.value("reads", uint64_t{0}),
                         s.value("writes", uint64_t{0}), s.value("score", 0.0));
  }
  const auto& mig = st.value("migration_segments", nlohmann::json::array());
  if (!mig.empty()) {
    out += "migration policy (segments with heat or a decision of their own):\n";
    out += fmt::format("  {:>8} {:>10} {:>10} {:>8} {:>8} {:<15} {}\n", "segment", "offset", "score", "writes",
                       "owed", "set", "why");
    for (const auto& s : mig)
      out += fmt::format("  {:>8} {:>10} {:>10.1f} {:>8.0f} {:>8} {:<15} {}\n", s.value("segment", uint64_t{0}),
                         format_bytes(s.value("offset", uint64_t{0})), s.value("score", 0.0),
                         s.value("writes_during_migration", 0.0), s.value("owed_blocks", uint64_t{0}),
                         s.value("set", std::string()), s.value("why", std::string()));
  }
  return out;
}

void print_json(const nlohmann::json& j) {
  std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
}

}  // namespace livemig::mig
