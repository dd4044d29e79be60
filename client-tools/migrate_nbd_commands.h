// The subcommands of migrate-nbd. Each takes its parsed options, talks to the
// plugins through ControlClient, prints for people (or JSON with --json) and
// returns the exit status:
//   0  success (verify: the images are equal; start --wait: Done)
//   1  failure: a plugin refused or could not be reached, the images differ,
//      the migration ended Failed or Cancelled
//   2  a bad command line (also a bad --mode or SIZE)
//   130 interrupted (Ctrl-C in watch)
// Errors are one line on stderr, "migrate-nbd: ...".
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "common/tls_context.h"

namespace livemig::client {
class ControlClient;
}  // namespace livemig::client

namespace livemig::mig {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitInterrupted = 130;

struct CommonOptions {
  std::string from;         // HOST:PORT of the source's peer port
  std::string to;           // HOST:PORT of the destination's peer port
  std::string socket;       // the plugin's local control socket, instead of from
  std::string secret_file;  // else $LIVEMIG_SECRET_FILE; a peer port needs one
  TlsSettings tls;          // TLS to peer ports
  double timeout = 0;       // seconds; 0: the defaults of each request
  bool json = false;
};

struct StartOptions : CommonOptions {
  std::string mode;
  std::string handover;       // empty: the source plugin's handover= default
  std::string handover_size;  // SIZE strings, empty: the plugin's default
  std::string max_rate;
  std::string min_rate;  // guest-first pacing's floor
  std::string transfer_unit;
  std::string compression;  // empty: auto
  std::optional<double> guest_latency_bound;  // unset: the mode's default
  std::optional<int> migration_nice;          // unset: 0
  std::optional<double> max_slowdown;         // unset: the mode's default
  std::optional<unsigned> max_rounds;
  // Heat-driven modes (livefs, hybrid, auto); empty/unset: the mode's default.
  std::string threshold;  // a number, or "max"
  std::optional<double> w_read, w_write;
  std::string monitor_period;  // seconds, or "history"
  std::optional<unsigned> max_resends;
  bool wait = false;
  double interval = 1;
};

struct WatchOptions : CommonOptions {
  double interval = 1;
};

struct VerifyOptions : CommonOptions {
  std::string range_size = "64M";
};

// The migrate control request (plugin/control_ops.cpp) that `start` sends,
// built from the options; an error names the bad option. submit (livemigd)
// sends the same request.
Result<nlohmann::json> migrate_request(const StartOptions& o);

int run_start(const StartOptions& o);

// For subcommands in other files (migrate_nbd_qemu.cpp): on a bad option
// these print the error and return the exit status; nullopt on success.
//
// migrate_request, with a bad option printed as a usage error.
std::optional<int> make_migrate_request(const StartOptions& o, nlohmann::json* out);
// Clients of the source (--from or --socket) and the destination (--to).
struct PluginPair {
  std::unique_ptr<client::ControlClient> from, to;
  std::chrono::milliseconds long_timeout{0};  // for migrate and handover replies
  PluginPair();
  ~PluginPair();
  PluginPair(PluginPair&&) noexcept;
};
std::optional<int> open_plugin_pair(const CommonOptions& o, PluginPair* out);
int run_status(const CommonOptions& o);
// Per-segment heat and, during a migration, the policy's decision per segment.
int run_stats(const CommonOptions& o, size_t top);
int run_watch(const WatchOptions& o);
int run_handover(const CommonOptions& o);
int run_cancel(const CommonOptions& o);
// set-rate RATE: a running migration's max_rate, at the source (and at the
// destination with --to: its post-copy pulls).
int run_set_rate(const CommonOptions& o, const std::string& rate);
// resolve --abort: unfences a source whose handover is unresolved.
int run_resolve(const CommonOptions& o, bool abort);
int run_release(const CommonOptions& o, bool unfence);
int run_verify(const VerifyOptions& o);

// Prints "migrate-nbd: <message>" on stderr.
void print_error(const std::string& message);

}  // namespace livemig::mig
