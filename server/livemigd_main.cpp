// livemigd: the livemig migrations daemon (server/daemon.h).
//
//   livemigd --config /etc/livemig/livemigd.conf
//   livemigd --database /tmp/q.db --socket /tmp/livemigd.sock --max-concurrent 2 --host-bandwidth 1Gbit
//
// Runs in the foreground (systemd: deploy/systemd/livemigd.service) and logs
// to stderr. SIGTERM or SIGINT stops it; migrations running in the plugins go
// on, and the next livemigd re-attaches to them.
#include <signal.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "client/tls_options.h"
#include "client/units.h"
#include "common/version.h"
#include "server/config_file.h"
#include "server/daemon.h"

namespace d = livemig::daemon;
using livemig::Result;
using livemig::Status;

namespace {

// Long options that are no configuration keys.
const std::set<std::string> kNotKeys = {"config", "help", "version"};

// The configuration keys: livemigd's long options without --.
std::string known_keys(const CLI::App& app) {
  std::string keys;
  for (const CLI::Option* opt : app.get_options()) {
    for (const std::string& name : opt->get_lnames()) {
      if (kNotKeys.count(name)) continue;
      keys += (keys.empty() ? "" : ", ") + name;
    }
  }
  return keys;
}

// Gives each entry of the configuration file at `path` to the long option of
// its name, unless the command line gave that option (the command line wins).
// Every error names the file, the line and the key. Returns where each value
// it applied came from ("FILE line N" by key), for checks made later.
Result<std::map<std::string, std::string>> apply_config_file(CLI::App& app, const std::string& path) {
  auto entries = d::read_config_file(path);
  if (!entries) return entries.status();
  std::map<std::string, std::string> origins;
  for (const d::ConfigEntry& e : *entries) {
    const std::string where = d::config_where(path, e);
    CLI::Option* opt = kNotKeys.count(e.key) ? nullptr : app.get_option_no_throw("--" + e.key);
    if (!opt)
      return Status::error(
          fmt::format("{}: unknown key '{}' (the keys are livemigd's long options without --: {})", where, e.key,
                      known_keys(app)));
    if (opt->count() > 0) continue;
    try {
      opt->add_result(e.value);
      opt->run_callback();  // CLI11's checks and conversion, as for the command line
    } catch (const CLI::Error& err) {
      // CLI11 says "--KEY: what is wrong"; the key is named already.
      std::string why = err.what();
      for (const std::string& named : {"--" + e.key + ": ", e.key + "=" + e.value + ": "})
        if (why.rfind(named, 0) == 0) why.erase(0, named.size());
      return Status::error(fmt::format("{}: {} = {}: {}", where, e.key, e.value, why));
    }
    origins[e.key] = where;
  }
  return origins;
}

// A number of seconds, positive (or, with zero_ok, not negative). CLI11's
// PositiveNumber would print its range as a 309-digit number.
CLI::Validator seconds(bool zero_ok) {
  return CLI::Validator(
      [zero_ok](std::string& v) -> std::string {
        double x = 0;
        if (CLI::detail::lexical_cast(v, x) && std::isfinite(x) && (zero_ok ? x >= 0 : x > 0)) return {};
        return fmt::format("expected {} number of seconds, got '{}'", zero_ok ? "a non-negative" : "a positive", v);
      },
      zero_ok ? "NONNEGATIVE" : "POSITIVE");
}

// A whole number of at least 1, with no upper bound but the type's.
CLI::Validator at_least_one() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        unsigned x = 0;
        if (CLI::detail::lexical_cast(v, x) && x >= 1) return {};
        return fmt::format("expected a whole number of at least 1, got '{}'", v);
      },
      "N>=1");
}

}  // namespace

int main(int argc, char** argv) {
  d::DaemonConfig c;
  std::string bandwidth = "0";
  std::string config_path;
  CLI::App app(
      "livemigd: the livemig migrations daemon. Takes migration tasks from `migrate-nbd submit` on its Unix\n"
      "socket, keeps them in SQLite, runs them by priority (FIFO within one) within --max-concurrent and\n"
      "--host-bandwidth, polls both plugins of every running task (heartbeats, one loop for all) and resumes\n"
      "tasks after a plugin or livemigd itself restarts.\n\nExample: livemigd --config /etc/livemig/livemigd.conf",
      "livemigd");
  app.set_version_flag("--version", std::string("livemigd ") + livemig::kVersion, "print livemigd's version and exit");
  app.add_option("--config", config_path,
                 "read options from FILE: one `key = value` a line, keys as the long options below without --, "
                 "# comments (deploy/livemigd.conf.example); options on the command line win. An unknown key, a "
                 "bad value or a line without = stops livemigd with the file, line and key")
      ->type_name("FILE");
  app.add_option("--database", c.database, "the task queue (SQLite, WAL mode)")->type_name("PATH")->capture_default_str();
  app.add_option("--socket", c.socket, "the control socket for migrate-nbd (created with mode 0600)")
      ->type_name("PATH")
      ->capture_default_str();
  app.add_option("--max-concurrent", c.max_concurrent, "migrations running at once at most (any number)")
      ->type_name("N")
      ->check(at_least_one())
      ->capture_default_str();
  app.add_option("--host-bandwidth", bandwidth,
                 "bandwidth limit per host, summed over the migrations it takes part in (as source or destination): "
                 "bytes/s as a SIZE (100M) or bits/s (1Gbit); 0 = no limit")
      ->type_name("RATE")
      ->capture_default_str();
  app.add_option("--heartbeat-interval", c.heartbeat_interval, "seconds between two status polls of a plugin")
      ->type_name("SECONDS")
      ->check(seconds(false))
      ->capture_default_str();
  app.add_option("--heartbeat-timeout", c.heartbeat_timeout,
                 "a plugin that has not answered for this many seconds is marked down")
      ->type_name("SECONDS")
      ->check(seconds(false))
      ->capture_default_str();
  app.add_option("--secret", c.secret_file,
                 "the plugins' pre-shared key file (default: $LIVEMIG_SECRET_FILE; required)")
      ->type_name("FILE");
  livemig::client::add_tls_options(&app, c.tls);
  app.add_option("--max-attempts", c.max_attempts,
                 "migrate requests per task (the first start and restarts after failures) before it fails")
      ->type_name("N")
      ->check(CLI::Range(1u, 1000u))
      ->capture_default_str();
  app.add_option("--retry-delay", c.retry_delay, "seconds between two restarts of a task")
      ->type_name("SECONDS")
      ->check(seconds(true))
      ->capture_default_str();
  app.add_option("--metrics-listen", c.metrics_listen,
                 "serve Prometheus metrics of every migration and watched plugin at http://HOST:PORT/metrics, e.g. "
                 "127.0.0.1:9471 ([::1]:9471 for IPv6, 0.0.0.0:9471 for every interface: there is no "
                 "authentication); default: off")
      ->type_name("HOST:PORT");
  app.footer("Exit status: 0 after SIGTERM/SIGINT, 1 if it cannot start (bad database, socket, key or metrics "
             "address), 2 for a bad command line or config file.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "livemigd: %s (see livemigd --help)\n", e.what());
    return 2;
  }
  std::map<std::string, std::string> origins;  // key -> "FILE line N", for values the file gave
  if (!config_path.empty()) {
    auto applied = apply_config_file(app, config_path);
    if (!applied) {
      std::fprintf(stderr, "livemigd: %s\n", applied.status().message().c_str());
      return 2;
    }
    origins = std::move(*applied);
  }
  const auto bandwidth_origin = origins.find("host-bandwidth");
  auto rate = livemig::client::parse_rate(
      bandwidth, bandwidth_origin == origins.end() ? "--host-bandwidth" : bandwidth_origin->second + ": host-bandwidth");
  if (!rate) {
    std::fprintf(stderr, "livemigd: %s\n", rate.status().message().c_str());
    return 2;
  }
  c.host_bandwidth = *rate;
  if (c.heartbeat_timeout < c.heartbeat_interval)
    std::fprintf(stderr, "livemigd: warning: --heartbeat-timeout %g is shorter than --heartbeat-interval %g\n",
                 c.heartbeat_timeout, c.heartbeat_interval);

  // Signals are taken by sigwait below; every thread inherits the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto daemon = d::Daemon::create(c);
  if (!daemon) {
    std::fprintf(stderr, "livemigd: %s\n", daemon.status().message().c_str());
    return 1;
  }
  (*daemon)->start();
  std::fprintf(stderr,
               "livemigd: serving %s; database %s; max-concurrent %u; host bandwidth %s; heartbeat every %g s, "
               "down after %g s; metrics %s\n",
               c.socket.c_str(), c.database.c_str(), c.max_concurrent,
               c.host_bandwidth ? livemig::client::format_rate(static_cast<double>(c.host_bandwidth)).c_str()
                                : "unlimited",
               c.heartbeat_interval, c.heartbeat_timeout,
               c.metrics_listen.empty()
                   ? "off"
                   : fmt::format("on port {} ({})", (*daemon)->metrics_port(), c.metrics_listen).c_str());
  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "livemigd: signal %d: stopping (running migrations go on in the plugins)\n", sig);
  (*daemon)->stop();
  return 0;
}
