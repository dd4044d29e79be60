#include "client-tools/migrate_nbd_commands.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "client-tools/interrupt_scope.h"
#include "client-tools/migrate_nbd_output.h"
#include "client/control_client.h"
#include "client/units.h"
#include "common/migration_params.h"
#include "common/thread_nice.h"

namespace livemig::mig {

using client::ControlClient;
using client::SecretChoice;
using client::Target;
using client::Timeouts;
using client::choose_secret;
using client::format_ms;
using client::format_rate;
using client::parse_rate;
using client::parse_size;

using nlohmann::json;
using std::chrono::milliseconds;

void print_error(const std::string& message) { std::fprintf(stderr, "migrate-nbd: %s\n", message.c_str()); }

namespace {

// Replies of requests that block in the plugin: migrate (connects to the
// destination and waits for its START reply), handover (up to 120 s in the
// plugin), verify (hashes the whole image).
constexpr milliseconds kLongReply{300'000};
// How many ranges one verify request asks for, so that the reply stays well
// under a CONTROL_REPLY frame's 1 MiB (about 20 bytes per range).
constexpr uint64_t kVerifyRangesPerRequest = 16384;

int usage(const std::string& message) {
  print_error(message);
  return kExitUsage;
}

int failure(const std::string& message) {
  print_error(message);
  return kExitFailure;
}

json error_json(const Status& s) { return {{"ok", false}, {"error", s.message()}}; }

// What every subcommand shares: its targets, the secret and the timeouts.
class Context {
 public:
  explicit Context(const CommonOptions& o) : o_(o) {}

  // The source side (or the only side): --socket PATH or --from HOST:PORT.
  Result<Target> from_target() const {
    if (!o_.socket.empty() && !o_.from.empty())
      return Status::error("give --from HOST:PORT or --socket PATH, not both");
    if (!o_.socket.empty()) return Target::local(o_.socket);
    if (o_.from.empty()) return Status::error("--from HOST:PORT (or --socket PATH) is required");
    auto hp = parse_host_port(o_.from);
    if (!hp) return Status::error("--from " + hp.status().message());
    return Target::remote(*hp);
  }

  // The destination side, if --to was given.
  Result<std::optional<Target>> to_target() const {
    if (o_.to.empty()) return std::optional<Target>();
    auto hp = parse_host_port(o_.to);
    if (!hp) return Status::error("--to " + hp.status().message());
    return std::optional<Target>(Target::remote(*hp));
  }

  // A client for t; the secret is loaded for the first remote target.
  Result<std::unique_ptr<ControlClient>> client(const Target& t) {
    if (t.kind == Target::Kind::Remote && !secret_) {
      std::string warning;
      auto s = choose_secret(o_.secret_file, o_.tls, &warning);
      if (!s) return s.status();
      if (!warning.empty()) print_error("warning: " + warning);
      secret_ = std::make_shared<const SecretChoice>(std::move(*s));
    }
    Timeouts t_out;
    if (o_.timeout > 0) t_out.connect = t_out.reply = timeout();
    return std::make_unique<ControlClient>(t, secret_, t_out);
  }

  // The reply timeout of a blocking request.
  milliseconds long_timeout() const { return o_.timeout > 0 ? timeout() : kLongReply; }

  const CommonOptions& options() const { return o_; }

 private:
  milliseconds timeout() const { return milliseconds(static_cast<int64_t>(o_.timeout * 1000)); }

  const CommonOptions& o_;
  std::shared_ptr<const SecretChoice> secret_;
};

// A side the tool talks to.
struct Side {
  std::string name;  // "from" or "to"
  std::unique_ptr<ControlClient> client;
};

SideStatus ask_status(Side& s) {
  SideStatus st;
  st.side = s.name;
  st.address = s.client->target().label();
  st.reply = s.client->call({{"op", "status"}});
  return st;
}

std::string phase_of(const SideStatus& s) {
  if (!s.reply) return "";
  const json& j = s.reply.value();
  return j.contains("phase") && j["phase"].is_string() ? j["phase"].get<std::string>() : "";
}

// ---------------------------------------------------------------- watch loop


enum class WatchOutput { Screen, Lines, Json, Quiet };

int terminal_width() {
  winsize ws{};
  if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 20) return ws.ws_col;
  return 80;
}

std::string clock_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[16];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &tm);
  return buf;
}

// Draws `screen` over the previous one: back to its first line, each line
// cut to the terminal width and cleared to its end, the rest below cleared.
class ScreenPainter {
 public:
  ScreenPainter() { std::fputs("\x1b[?25l", stdout); }  // hide the cursor
  ~ScreenPainter() {
    std::fputs("\x1b[?25h", stdout);
    std::fflush(stdout);
  }
  void paint(const std::string& screen) {
    int width = terminal_width();
    std::string out;
    if (lines_ > 0) out += fmt::format("\x1b[{}F", lines_);
    lines_ = 0;
    size_t pos = 0;
    while (pos < screen.size()) {
      size_t nl = screen.find('\n', pos);
      if (nl == std::string::npos) nl = screen.size();
      std::string line = screen.substr(pos, nl - pos);
      if (static_cast<int>(line.size()) >= width) line.resize(width - 1);
      out += line + "\x1b[K\n";
      ++lines_;
      pos = nl + 1;
    }
    out += "\x1b[J";
    std::fputs(out.c_str(), stdout);
    std::fflush(stdout);
  }

 private:
  int lines_ = 0;
};

struct WatchResult {
  bool interrupted = false;
  std::string final_phase;  // of the first side
  std::vector<SideStatus> last;
  Status error;  // the first side could not be asked at the start
};

// Polls every side each `interval` seconds and shows it, until the first
// side's phase is final (Done, Failed, Cancelled, Idle) or Ctrl-C.
// A side that stops answering is shown as unreachable and asked again.
WatchResult watch_loop(std::vector<Side>& sides, double interval, WatchOutput mode, const std::string& title) {
  WatchResult r;
  InterruptScope interrupt;
  std::unique_ptr<ScreenPainter> painter;
  if (mode == WatchOutput::Screen) painter = std::make_unique<ScreenPainter>();
  const auto period = milliseconds(static_cast<int64_t>(std::max(interval, 0.1) * 1000));
  for (bool first = true;; first = false) {
    auto next = std::chrono::steady_clock::now() + period;
    std::vector<SideStatus> now;
    for (Side& s : sides) now.push_back(ask_status(s));
    if (first && !now[0].reply) {
      r.error = now[0].reply.status();
      return r;
    }
    r.last = now;
    switch (mode) {
      case WatchOutput::Screen:
        painter->paint(render_watch_screen(
            fmt::format("migrate-nbd watch   {}   every {:g} s   Ctrl-C to quit", clock_now(), interval) +
                (title.empty() ? "" : "\n" + title),
            now, terminal_width()));
        break;
      case WatchOutput::Lines:
        std::printf("%s\n", render_watch_line(clock_now(), now).c_str());
        std::fflush(stdout);
        break;
      case WatchOutput::Json: {
        json j = {{"time", std::time(nullptr)}};
        for (auto& s : now) j[s.side] = s.reply ? s.reply.value() : error_json(s.reply.status());
        print_json(j);
        std::fflush(stdout);
        break;
      }
      case WatchOutput::Quiet:
        break;
    }
    std::string phase = phase_of(now[0]);
    if (is_final_phase(phase)) {
      r.final_phase = phase;
      return r;
    }
    while (std::chrono::steady_clock::now() < next && !InterruptScope::interrupted())
      std::this_thread::sleep_for(milliseconds(50));
    if (InterruptScope::interrupted()) {
      r.interrupted = true;
      return r;
    }
  }
}

WatchOutput output_mode(bool json_output) {
  if (json_output) return WatchOutput::Json;
  return ::isatty(STDOUT_FILENO) ? WatchOutput::Screen : WatchOutput::Lines;
}

// The last line after a watch: how it ended.
std::string ending_line(const WatchResult& w) {
  const SideStatus& s = w.last.at(0);
  const json& st = s.reply.value();
  const json m = st.value("migration", json::object());
  if (w.final_phase == "Done")
    return fmt::format("migration {} Done: total time {}, handover pause {}", m.value("id", "?"),
                       format_ms(m.value("total_time_ms", int64_t{-1})), format_ms(m.value("handover_pause_ms", int64_t{-1})));
  if (w.final_phase == "Idle") return fmt::format("no migration at {} (phase Idle)", s.address);
  std::string err = m.value("last_error", st.value("last_error", std::string()));
  return fmt::format("migration {} {}{}", m.value("id", "?"), w.final_phase, err.empty() ? "" : ": " + err);
}

// Opens clients for the source side (--from or --socket; optional unless
// from_required) and, if given, the destination (--to). On an error prints it
// and returns the exit status: kExitUsage for a bad option, kExitFailure for
// an unusable secret file.
std::optional<int> open_sides(Context& ctx, std::vector<Side>* sides, bool from_required = true) {
  if (ctx.options().timeout < 0) return usage("--timeout must be 0 (the defaults) or more seconds");
  std::vector<std::pair<std::string, Target>> targets;
  if (from_required || !ctx.options().from.empty() || !ctx.options().socket.empty()) {
    auto from = ctx.from_target();
    if (!from) return usage(from.status().message());
    targets.emplace_back("from", *from);
  }
  auto to = ctx.to_target();
  if (!to) return usage(to.status().message());
  if (*to) targets.emplace_back("to", **to);
  for (auto& [name, target] : targets) {
    auto c = ctx.client(target);
    if (!c) return failure(c.status().message());
    sides->push_back({name, std::move(*c)});
  }
  return std::nullopt;
}

}  // namespace

// ---------------------------------------------------------------- start

// The heat-driven modes' parameters; the plugin checks them too.
Status add_policy(const StartOptions& o, json& req) {
  if (!o.threshold.empty()) {
    if (o.threshold == "max" || o.threshold == "inf") {
      req["threshold"] = "max";
    } else {
      char* end = nullptr;
      double t = std::strtod(o.threshold.c_str(), &end);
      if (end == o.threshold.c_str() || *end || !(t >= 0))
        return Status::error(fmt::format("--threshold '{}': must be a non-negative number or max", o.threshold));
      req["threshold"] = t;
    }
  }
  if (o.w_read) req["w_read"] = *o.w_read;
  if (o.w_write) req["w_write"] = *o.w_write;
  if (!o.monitor_period.empty()) {
    if (o.monitor_period == "history") {
      req["monitor_period"] = "history";
    } else {
      char* end = nullptr;
      double t = std::strtod(o.monitor_period.c_str(), &end);
      if (end == o.monitor_period.c_str() || *end || !(t >= 0))
        return Status::error(fmt::format("--monitor-period '{}': must be seconds or history", o.monitor_period));
      req["monitor_period"] = t;
    }
  }
  if (o.max_resends) req["max_resends"] = *o.max_resends;
  return Status::ok();
}

Result<json> migrate_request(const StartOptions& o) {
  static const std::set<std::string> kModes = {"precopy", "postcopy", "livefs", "hybrid", "auto"};
  if (!kModes.count(o.mode))
    return Status::error(fmt::format("--mode '{}': must be precopy, postcopy, livefs, hybrid or auto", o.mode));
  if (!o.handover.empty())
    if (auto policy = parse_handover_policy(o.handover); !policy)
      return Status::error(fmt::format("--handover: {}", policy.status().message()));
  if (o.to.empty()) return Status::error("--to HOST:PORT (the destination's peer port) is required");
  json req = {{"op", "migrate"}, {"to", o.to}, {"mode", o.mode}};
  if (!o.from.empty()) req["from"] = o.from;
  if (!o.handover.empty()) req["handover"] = o.handover;
  struct SizeField {
    const std::string& text;
    const char* flag;
    const char* key;
    bool rate;
  };
  for (const SizeField& f : {SizeField{o.handover_size, "--handover-size", "handover_size", false},
                             SizeField{o.max_rate, "--max-rate", "max_rate", true},
                             SizeField{o.min_rate, "--min-rate", "min_rate", true},
                             SizeField{o.transfer_unit, "--transfer-unit", "transfer_unit", false}}) {
    if (f.text.empty()) continue;
    auto v = f.rate ? parse_rate(f.text, f.flag) : parse_size(f.text, f.flag);
    if (!v) return v.status();
    req[f.key] = *v;
  }
  if (o.max_rounds) {
    if (*o.max_rounds < 1 || *o.max_rounds > 10000) return Status::error("--max-rounds must be from 1 to 10000");
    req["max_rounds"] = *o.max_rounds;
  }
  struct FactorField {
    const std::optional<double>& value;
    const char* flag;
    const char* key;
    const char* zero_means;
  };
  for (const FactorField& f : {FactorField{o.guest_latency_bound, "--guest-latency-bound", "guest_latency_bound", "off"},
                               FactorField{o.max_slowdown, "--max-slowdown", "max_slowdown", "no limit"}}) {
    if (!f.value) continue;
    if (!is_pacing_factor(*f.value))
      return Status::error(
          fmt::format("{} {}: must be 0 ({}) or a factor from 1 to 1000", f.flag, *f.value, f.zero_means));
    req[f.key] = *f.value;
  }
  if (o.migration_nice) {
    if (*o.migration_nice < 0 || *o.migration_nice > kMaxMigrationNice)
      return Status::error(fmt::format("--migration-nice {}: must be from 0 to {}", *o.migration_nice,
                                       kMaxMigrationNice));
    req["migration_nice"] = *o.migration_nice;
  }
  if (!o.compression.empty()) {
    if (auto c = parse_compression(o.compression); !c)
      return Status::error(fmt::format("--compression: {}", c.status().message()));
    req["compression"] = o.compression;
  }
  if (o.interval <= 0) return Status::error("--interval must be more than 0 seconds");
  if (Status s = add_policy(o, req); !s) return s;
  return req;
}

std::optional<int> make_migrate_request(const StartOptions& o, json* out) {
  auto request = migrate_request(o);
  if (!request) return usage(request.status().message());
  *out = std::move(*request);
  return std::nullopt;
}

int run_start(const StartOptions& o) {
  json req;
  if (auto rc = make_migrate_request(o, &req)) return *rc;
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  auto reply = sides[0].client->call(req, ctx.long_timeout());
  if (!reply) return failure(reply.status().message());
  std::string id = reply->value("id", reply->value("migration_id", std::string("?")));
  if (!o.wait) {
    if (o.json)
      print_json(*reply);
    else
      std::printf("migration %s started: %s from %s to %s\n", id.c_str(), o.mode.c_str(),
                  sides[0].client->target().label().c_str(), o.to.c_str());
    return kExitOk;
  }
  if (!o.json) {
    std::printf("migration %s started: %s from %s to %s\n", id.c_str(), o.mode.c_str(),
                sides[0].client->target().label().c_str(), o.to.c_str());
    std::fflush(stdout);
  }
  WatchOutput mode = o.json ? WatchOutput::Quiet : output_mode(false);
  WatchResult w = watch_loop(sides, o.interval, mode, "");
  if (!w.error.is_ok()) return failure(w.error.message());
  if (w.interrupted) {
    if (!o.json) std::printf("stopped watching; migration %s goes on\n", id.c_str());
    return kExitInterrupted;
  }
  if (o.json) {
    json j = {{"migration", *reply}};
    for (auto& s : w.last) j[s.side] = s.reply ? s.reply.value() : error_json(s.reply.status());
    j["result"] = w.final_phase;
    print_json(j);
  } else {
    std::printf("%s\n", ending_line(w).c_str());
  }
  return w.final_phase == "Done" ? kExitOk : kExitFailure;
}

// ---------------------------------------------------------------- for other files

PluginPair::PluginPair() = default;
PluginPair::~PluginPair() = default;
PluginPair::PluginPair(PluginPair&&) noexcept = default;

std::optional<int> open_plugin_pair(const CommonOptions& o, PluginPair* out) {
  if (o.to.empty()) return usage("--to HOST:PORT (the destination's peer port) is required");
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  out->from = std::move(sides.at(0).client);
  out->to = std::move(sides.at(1).client);
  out->long_timeout = ctx.long_timeout();
  return std::nullopt;
}

// ---------------------------------------------------------------- status

int run_status(const CommonOptions& o) {
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  std::vector<SideStatus> got;
  for (Side& s : sides) got.push_back(ask_status(s));
  int rc = kExitOk;
  json j = json::object();
  bool first = true;
  for (const SideStatus& s : got) {
    if (!s.reply) {
      print_error(s.reply.status().message());
      rc = kExitFailure;
    }
    if (o.json) {
      j[s.side] = s.reply ? s.reply.value() : error_json(s.reply.status());
    } else if (s.reply) {
      std::printf("%s%s", first ? "" : "\n", render_status(s).c_str());
      first = false;
    }
  }
  if (o.json) print_json(j);
  return rc;
}

// ---------------------------------------------------------------- stats

int run_stats(const CommonOptions& o, size_t top) {
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  json req = {{"op", "stats"}};
  if (top > 0) req["top"] = top;
  auto reply = sides[0].client->call(req);
  if (!reply) return failure(reply.status().message());
  if (o.json) {
    print_json(*reply);
    return kExitOk;
  }
  std::fputs(render_stats(*reply).c_str(), stdout);
  return kExitOk;
}

// ---------------------------------------------------------------- watch

int run_watch(const WatchOptions& o) {
  if (o.interval <= 0) return usage("--interval must be more than 0 seconds");
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  WatchOutput mode = output_mode(o.json);
  WatchResult w = watch_loop(sides, o.interval, mode, "");
  if (!w.error.is_ok()) return failure(w.error.message());
  if (w.interrupted) return kExitInterrupted;
  if (mode == WatchOutput::Screen || mode == WatchOutput::Lines) std::printf("%s\n", ending_line(w).c_str());
  return w.final_phase == "Done" || w.final_phase == "Idle" ? kExitOk : kExitFailure;
}

// ---------------------------------------------------------------- handover, cancel

int run_handover(const CommonOptions& o) {
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  auto reply = sides[0].client->call({{"op", "handover"}}, ctx.long_timeout());
  if (!reply) return failure(reply.status().message());
  if (o.json) {
    print_json(*reply);
  } else {
    std::printf("handover done: storage paused for %s; phase %s (the destination is authoritative)\n",
                format_ms(reply->value("handover_pause_ms", int64_t{-1})).c_str(),
                reply->value("phase", std::string("?")).c_str());
  }
  return kExitOk;
}

int run_cancel(const CommonOptions& o) {
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  auto reply = sides[0].client->call({{"op", "cancel"}}, ctx.long_timeout());
  if (!reply) return failure(reply.status().message());
  if (o.json)
    print_json(*reply);
  else
    std::printf("migration cancelled (phase %s); %s keeps serving its image\n",
                reply->value("phase", std::string("?")).c_str(), sides[0].client->target().label().c_str());
  return kExitOk;
}

int run_set_rate(const CommonOptions& o, const std::string& rate_text) {
  auto rate = parse_rate(rate_text, "RATE");
  if (!rate) return usage(rate.status().message());
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  json replies = json::object();
  for (Side& side : sides) {
    auto reply = side.client->call({{"op", "set-rate"}, {"max_rate", *rate}});
    if (!reply) return failure(reply.status().message());
    replies[side.name] = *reply;
    if (!o.json)
      std::printf("%s: max_rate now %s\n", side.client->target().label().c_str(),
                  *rate ? format_rate(double(*rate)).c_str() : "no cap");
  }
  if (o.json) print_json(replies);
  return kExitOk;
}

int run_resolve(const CommonOptions& o, bool abort) {
  if (!abort)
    return usage("resolve needs --abort: the only resolution an operator can make is that the destination is "
                 "gone (see migrate-nbd resolve --help)");
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  auto reply = sides[0].client->call({{"op", "resolve"}, {"abort", true}}, ctx.long_timeout());
  if (!reply) return failure(reply.status().message());
  if (o.json)
    print_json(*reply);
  else
    std::printf("handover %llu aborted; %s serves its image again\nwarning: %s\n",
                static_cast<unsigned long long>(reply->value("aborted_generation", uint64_t{0})),
                sides[0].client->target().label().c_str(), reply->value("warning", std::string()).c_str());
  return kExitOk;
}

// ---------------------------------------------------------------- release

int run_release(const CommonOptions& o, bool unfence) {
  if (o.from.empty() && o.socket.empty() && o.to.empty())
    return usage("give the side to release: --from HOST:PORT, --to HOST:PORT or --socket PATH");
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides, /*from_required=*/false)) return *rc;
  int rc = kExitOk;
  json j = json::object();
  for (Side& s : sides) {
    json request = {{"op", "release"}};
    if (unfence) request["unfence"] = true;
    auto reply = s.client->call(request);
    if (!reply) {
      print_error(reply.status().message());
      rc = kExitFailure;
      j[s.name] = error_json(reply.status());
      continue;
    }
    j[s.name] = *reply;
    if (!o.json) {
      bool fenced = reply->value("fenced", false);
      std::printf("released %s (was %s)%s\n", s.client->target().label().c_str(),
                  reply->value("was", std::string("?")).c_str(),
                  fenced ? "; it stays fenced (read-only): it handed its image over, so its copy is stale" : "");
    }
  }
  if (o.json) print_json(j);
  return rc;
}

// ---------------------------------------------------------------- verify

namespace {

// Hashes of [0, size) at one side, asked for in pieces of at most
// kVerifyRangesPerRequest ranges; the merged reply looks like one verify reply.
Result<json> verify_side(ControlClient& client, uint64_t size, uint64_t range_size, milliseconds timeout) {
  json merged;
  json hashes = json::array();
  const uint64_t piece = range_size * kVerifyRangesPerRequest;
  uint64_t offset = 0;
  do {
    uint64_t length = std::min(piece, size - offset);
    auto reply = client.call({{"op", "verify"}, {"range_size", range_size}, {"offset", offset}, {"length", length}},
                             timeout);
    if (!reply) return reply.status();
    if (!reply->contains("hashes") || !(*reply)["hashes"].is_array())
      return Status::error(fmt::format("{}: the verify reply has no hashes", client.target().label()));
    if (merged.is_null()) merged = *reply;
    for (auto& h : (*reply)["hashes"]) hashes.push_back(h);
    offset += length;
  } while (offset < size);
  merged["offset"] = 0;
  merged["length"] = size;
  merged["hashes"] = std::move(hashes);
  return merged;
}

}  // namespace

int run_verify(const VerifyOptions& o) {
  auto range = parse_size(o.range_size, "--range-size");
  if (!range) return usage(range.status().message());
  if (*range == 0 || *range > (uint64_t{1} << 30)) return usage("--range-size must be from 1 byte to 1G");
  if (o.to.empty()) return usage("--to HOST:PORT (the other image's plugin) is required");
  Context ctx(o);
  std::vector<Side> sides;
  if (auto rc = open_sides(ctx, &sides)) return *rc;
  Side& from = sides[0];
  Side& to = sides[1];

  // Sizes first: images of different sizes are not hashed at all.
  SideStatus sf = ask_status(from);
  SideStatus st = ask_status(to);
  for (auto* s : {&sf, &st})
    if (!s->reply) return failure(s->reply.status().message());
  uint64_t size_from = sf.reply->value("size", uint64_t{0});
  uint64_t size_to = st.reply->value("size", uint64_t{0});
  VerifyResult v;
  if (size_from != size_to) {
    v.sizes_differ = true;
    v.size_from = size_from;
    v.size_to = size_to;
    v.range_size = *range;
  } else {
    // Both sides hash at the same time.
    Result<json> hf = Status::error("not asked"), ht = Status::error("not asked");
    std::thread t([&] { ht = verify_side(*to.client, size_to, *range, ctx.long_timeout()); });
    hf = verify_side(*from.client, size_from, *range, ctx.long_timeout());
    t.join();
    for (auto* h : {&hf, &ht})
      if (!*h) return failure(h->status().message());
    auto cmp = compare_verify(*hf, *ht);
    if (!cmp) return failure(cmp.status().message());
    v = *cmp;
  }
  if (o.json) {
    json j = v.to_json();
    j["from"] = from.client->target().label();
    j["to"] = to.client->target().label();
    print_json(j);
  } else {
    std::fputs(render_verify(v).c_str(), stdout);
  }
  return v.equal ? kExitOk : kExitFailure;
}

}  // namespace livemig::mig
