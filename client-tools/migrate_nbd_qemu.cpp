#include "client-tools/migrate_nbd_qemu.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "client-tools/interrupt_scope.h"
#include "client-tools/migrate_nbd_group.h"
#include "client-tools/migrate_nbd_options.h"
#include "client-tools/qmp_client.h"
#include "client/control_client.h"
#include "client/units.h"

namespace livemig::mig {

using client::ControlClient;
using client::format_bytes;
using client::format_ms;
using client::parse_rate;

using nlohmann::json;
using qmp::QmpClient;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

CLI::App* add_qemu_migrate_command(CLI::App& app, QemuMigrateOptions& o) {
  auto* q = app.add_subcommand(
      "qemu-migrate", "Live-migrates a QEMU VM and its disk: RAM through QEMU, the disk through livemig.");
  q->add_option("--qmp-src", o.qmp_src, "the source QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off)")
      ->required()
      ->type_name("PATH");
  q->add_option("--qmp-dst", o.qmp_dst, "the destination QEMU's QMP socket (QEMU started with -incoming defer)")
      ->required()
      ->type_name("PATH");
  q->add_option("--migrate-uri", o.migrate_uri, "where the source QEMU sends the VM state, e.g. tcp:dst-host:4444")
      ->required()
      ->type_name("URI");
  q->add_option("--incoming-uri", o.incoming_uri,
                "what the destination QEMU listens on (default: --migrate-uri), e.g. tcp:0.0.0.0:4444")
      ->type_name("URI");
  q->add_option("--max-bandwidth", o.max_bandwidth, "cap QEMU's RAM migration (default: QEMU's own)")
      ->type_name("RATE");
  q->add_option("--ready-timeout", o.ready_timeout, "seconds for the storage to become ready (default 600)")
      ->type_name("SECONDS");
  q->add_option("--qemu-timeout", o.qemu_timeout,
                "seconds for QEMU to reach pre-switchover, and again to complete (default 600)")
      ->type_name("SECONDS");
  q->add_option("--disk", o.disks,
                "a disk of the VM (instead of --from/--to): its source's and destination's peer ports; repeatable, "
                "every disk handed over together")
      ->type_name("FROM,TO");
  q->add_option("--group-timeout", o.group_timeout,
                "with several disks: seconds a prepared source waits for the group's decision (default 30)")
      ->type_name("SECONDS");
  q->add_flag("--no-wait-storage", o.no_wait_storage,
              "return once the VM runs at the destination, while the disk still arrives post-copy");
  // The storage migration: the options of start (the handover is explicit).
  add_migration_options(q, o, /*with_handover=*/false);
  q->add_option("--interval", o.interval, "seconds between progress lines while waiting (default 1)")
      ->type_name("SECONDS");
  return q;
}

namespace {

constexpr milliseconds kQmpConnect{10'000};
constexpr milliseconds kQmpCommand{30'000};
// How often the waits look at QEMU and the plugins.
constexpr milliseconds kPoll{100};
// Rolling back: how long to wait for QEMU to leave the migration.
constexpr milliseconds kCancelWait{30'000};

// Ctrl-C (or SIGTERM) during a wait fails the step, so the migration is
// rolled back like after any other failure; a second one kills the process.

milliseconds seconds_ms(double s) { return milliseconds(static_cast<int64_t>(s * 1000)); }

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A step failed: which one and why.
struct Failure {
  std::string step;
  std::string message;
};

// One run of the subcommand. Each step returns nullopt or the failure;
// run() rolls back after a failure.
// One disk's storage migration: its plugins and its migration.
struct StorageDisk {
  std::unique_ptr<ControlClient> from, to;
  std::string from_address, to_address;  // as the migrate request names them
  std::string id;                        // the migration, once started
  bool started = false;
  std::string label() const { return from->target().label() + " -> " + to_address; }
};

class QemuMigration {
 public:
  // One disk, or several handed over as one group (coordinator: the first
  // disk's destination).
  QemuMigration(const QemuMigrateOptions& o, std::vector<StorageDisk> disks, milliseconds long_timeout,
                std::unique_ptr<ControlClient> coordinator)
      : o_(o), disks_(std::move(disks)), long_timeout_(long_timeout), coordinator_(std::move(coordinator)) {}

  int run() {
    t0_ = Clock::now();
    InterruptScope interrupt(/*also_sigterm=*/true);
    std::optional<Failure> f = steps();
    if (!f) return kExitOk;
    std::vector<std::string> undone = roll_back();
    std::string after = qemu_completed_ ? " (the VM runs at the destination)"
                        : handed_over_  ? " (after the storage handover: nothing could be rolled back)"
                                        : "";
    if (o_.json) {
      print({{"result", "failed"}, {"step", f->step}, {"error", f->message}, {"rollback", undone},
             {"storage_handed_over", handed_over_}});
    } else {
      for (const std::string& line : undone) std::printf("rollback: %s\n", line.c_str());
      std::fflush(stdout);
    }
    print_error(fmt::format("qemu-migrate failed at step '{}': {}{}", f->step, f->message, after));
    return InterruptScope::interrupted() ? kExitInterrupted : kExitFailure;
  }

 private:
  // ---------------------------------------------------------------- output

  void print(json j) {
    if (!o_.json) return;
    if (!j.contains("result")) j["elapsed_seconds"] = since(t0_);
    std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
    std::fflush(stdout);
  }

  // One progress line: text for people, or {"step": ..., fields} with --json.
  void progress(const std::string& step, const std::string& text, json fields = json::object()) {
    if (o_.json) {
      fields["step"] = step;
      print(std::move(fields));
      return;
    }
    std::printf("[%6.1f s] %s\n", since(t0_), text.c_str());
    std::fflush(stdout);
  }

  // ---------------------------------------------------------------- steps

  std::optional<Failure> steps() {
    using Step = std::optional<Failure> (QemuMigration::*)();
    for (Step s : {&QemuMigration::connect_qmp, &QemuMigration::set_capabilities, &QemuMigration::start_incoming,
                   &QemuMigration::start_storage, &QemuMigration::wait_storage_ready,
                   &QemuMigration::start_ram, &QemuMigration::wait_pre_switchover, &QemuMigration::hand_over,
                   &QemuMigration::continue_migration, &QemuMigration::wait_completed,
                   &QemuMigration::wait_storage_done}) {
      if (auto f = (this->*s)()) return f;
    }
    return std::nullopt;
  }

  std::optional<Failure> connect_qmp() {
    const char* step = "connect QMP";
    for (StorageDisk& d : disks_) {
      auto to = d.to->call({{"op", "status"}});
      if (!to) return Failure{step, to.status().message()};
    }
    auto s = QmpClient::connect(o_.qmp_src, kQmpConnect);
    if (!s) return Failure{step, "source QEMU: " + s.status().message()};
    src_ = std::move(*s);
    auto d = QmpClient::connect(o_.qmp_dst, kQmpConnect);
    if (!d) return Failure{step, "destination QEMU: " + d.status().message()};
    dst_ = std::move(*d);

    auto st = src_->execute("query-status", {}, kQmpCommand);
    if (!st) return Failure{step, "source QEMU: " + st.status().message()};
    src_was_running_ = st->value("running", false);
    std::string src_state = st->value("status", std::string("?"));
    auto qm = src_->execute("query-migrate", {}, kQmpCommand);
    if (!qm) return Failure{step, "source QEMU: " + qm.status().message()};
    static const std::set<std::string> kBusy = {"setup", "active", "pre-switchover", "device", "cancelling",
                                                "postcopy-active", "postcopy-paused", "postcopy-recover",
                                                "wait-unplug"};
    if (kBusy.count(qm->value("status", std::string())))
      return Failure{step, fmt::format("the source QEMU is already migrating (status {})", qm->value("status", ""))};
    if (src_state == "inmigrate" || src_state == "postmigrate")
      return Failure{step, fmt::format("the source QEMU is in state '{}', not a VM to migrate", src_state)};

    auto dt = dst_->execute("query-status", {}, kQmpCommand);
    if (!dt) return Failure{step, "destination QEMU: " + dt.status().message()};
    if (dt->value("status", std::string()) != "inmigrate")
      return Failure{step, fmt::format("the destination QEMU is in state '{}', not waiting for a migration (start "
                                       "it with -incoming defer)",
                                       dt->value("status", std::string("?")))};
    progress(step,
             fmt::format("QMP: source QEMU {} ({}), destination QEMU {} (inmigrate)", o_.qmp_src, src_state, o_.qmp_dst),
             {{"source_status", src_state}, {"destination_status", "inmigrate"}});
    return std::nullopt;
  }

  // The same capabilities on both sides: pause-before-switchover (the source
  // waits for the storage handover), events, and no block migration.
  std::optional<Failure> set_capabilities() {
    const char* step = "set migration capabilities";
    json caps = json::array({{{"capability", "pause-before-switchover"}, {"state", true}},
                             {{"capability", "events"}, {"state", true}}});
    auto have = src_->execute("query-migrate-capabilities", {}, kQmpCommand);
    if (!have) return Failure{step, "source QEMU: " + have.status().message()};
    for (const json& c : *have)
      if (c.value("capability", "") == "block" && c.value("state", false))
        caps.push_back({{"capability", "block"}, {"state", false}});
    for (auto [client, side] : {std::pair{src_.get(), "source"}, std::pair{dst_.get(), "destination"}}) {
      auto r = client->execute("migrate-set-capabilities", {{"capabilities", caps}}, kQmpCommand);
      if (!r) return Failure{step, fmt::format("{} QEMU: {}", side, r.status().message())};
    }
    if (!o_.max_bandwidth.empty()) {
      auto rate = parse_rate(o_.max_bandwidth, "--max-bandwidth");
      if (!rate) return Failure{step, rate.status().message()};
      auto r = src_->execute("migrate-set-parameters", {{"max-bandwidth", *rate}}, kQmpCommand);
      if (!r) return Failure{step, "source QEMU: " + r.status().message()};
    }
    progress(step, "capabilities: pause-before-switchover and events on both QEMUs; no block migration",
             {{"capabilities", caps}});
    return std::nullopt;
  }

  std::optional<Failure> start_incoming() {
    const char* step = "start the incoming migration";
    const std::string& uri = o_.incoming_uri.empty() ? o_.migrate_uri : o_.incoming_uri;
    auto r = dst_->execute("migrate-incoming", {{"uri", uri}}, kQmpCommand);
    if (!r) return Failure{step, "destination QEMU: " + r.status().message()};
    progress(step, "destination QEMU listens on " + uri, {{"uri", uri}});
    return std::nullopt;
  }

  std::optional<Failure> start_storage() {
    const char* step = "start the storage migration";
    for (StorageDisk& d : disks_) {
      QemuMigrateOptions one = o_;
      one.from = d.from_address;
      one.to = d.to_address;
      json req;
      if (make_migrate_request(one, &req)) return Failure{step, "bad storage options"};  // checked before
      req["handover"] = "explicit";
      auto reply = d.from->call(req, long_timeout_);
      if (!reply) return Failure{step, reply.status().message()};
      storage_started_ = d.started = true;
      d.id = reply->value("id", reply->value("migration_id", std::string("?")));
      progress(step,
               fmt::format("storage migration {} started: {} from {} to {}", d.id, o_.mode,
                           d.from->target().label(), d.to_address),
               {{"migration", d.id}, {"mode", o_.mode}});
    }
    return std::nullopt;
  }

  // The source plugin's status; a migration that ended Failed or Cancelled
  // is an error.
  Result<json> storage_status(StorageDisk& d) {
    auto st = d.from->call({{"op", "status"}});
    if (!st) return st.status();
    std::string phase = st->value("phase", std::string());
    if (phase == "Failed" || phase == "Cancelled") {
      std::string why = st->value("last_error", st->value("migration", json::object()).value("last_error", ""));
      return Status::error(fmt::format("the storage migration{} is {}{}",
                                       disks_.size() > 1 ? " of " + d.label() : "", phase,
                                       why.empty() ? "" : ": " + why));
    }
    return st;
  }

  // Sleeps about `d` while reading both monitors, so that a QEMU that exits
  // is noticed at once; an error names the QEMU.
  std::optional<std::string> watch_qemus(milliseconds d) {
    if (InterruptScope::interrupted()) return "interrupted";
    auto ev = src_->wait_event(d);
    if (!ev) return "source QEMU: " + ev.status().message();
    auto dv = dst_->wait_event(milliseconds(0));
    if (!dv) return "destination QEMU: " + dv.status().message();
    src_->take_events();
    dst_->take_events();
    return std::nullopt;
  }

  std::optional<Failure> wait_storage_ready() {
    const char* step = "wait for the storage to be ready";
    const auto deadline = Clock::now() + seconds_ms(o_.ready_timeout);
    auto next_line = Clock::now();
    std::vector<bool> ready(disks_.size(), false);
    for (;;) {
      bool line = Clock::now() >= next_line;
      for (size_t i = 0; i < disks_.size(); ++i) {
        if (ready[i]) continue;
        auto st = storage_status(disks_[i]);
        if (!st) return Failure{step, st.status().message()};
        const json m = st->value("migration", json::object());
        const std::string which = disks_.size() > 1 ? fmt::format(" {}", disks_[i].label()) : "";
        if (m.value("ready", false)) {
          ready[i] = true;
          progress(step,
                   fmt::format("storage{} ready ({}): {} left", which, m.value("ready_reason", std::string("ready")),
                               format_bytes(m.value("bytes_left", 0.0))),
                   {{"phase", st->value("phase", "")}, {"bytes_left", m.value("bytes_left", 0)},
                    {"ready_reason", m.value("ready_reason", "")}});
        } else if (line) {
          progress(step,
                   fmt::format("storage{} {}: {} left, {} on the wire", which, st->value("phase", std::string("?")),
                               format_bytes(m.value("bytes_left", 0.0)), format_bytes(m.value("wire_bytes", 0.0))),
                   {{"phase", st->value("phase", "")}, {"bytes_left", m.value("bytes_left", 0)}});
        }
      }
      if (std::all_of(ready.begin(), ready.end(), [](bool r) { return r; })) return std::nullopt;
      if (line) next_line = Clock::now() + seconds_ms(o_.interval);
      if (Clock::now() > deadline)
        return Failure{step, fmt::format("not ready after {:g} s (see --ready-timeout)", o_.ready_timeout)};
      if (auto e = watch_qemus(milliseconds(200))) return Failure{step, *e};
    }
  }

  std::optional<Failure> start_ram() {
    const char* step = "start the RAM migration";
    auto r = src_->execute("migrate", {{"uri", o_.migrate_uri}}, kQmpCommand);
    if (!r) return Failure{step, "source QEMU: " + r.status().message()};
    ram_started_ = true;
    progress(step, "QEMU migration started to " + o_.migrate_uri, {{"uri", o_.migrate_uri}});
    return std::nullopt;
  }

  // query-migrate at the source, or why not; a failed or cancelled QEMU
  // migration is an error with QEMU's reason.
  Result<json> qemu_migration() {
    auto qm = src_->execute("query-migrate", {}, kQmpCommand);
    if (!qm) return Status::error("source QEMU: " + qm.status().message());
    std::string status = qm->value("status", std::string());
    if (status == "failed" || status == "cancelled" || status == "cancelling")
      return Status::error(fmt::format("the QEMU migration {}{}", status == "failed" ? "failed" : "was cancelled",
                                       qm->contains("error-desc") ? ": " + qm->value("error-desc", "") : ""));
    return qm;
  }

  std::optional<Failure> wait_pre_switchover() {
    const char* step = "wait for QEMU to reach pre-switchover";
    const auto deadline = Clock::now() + seconds_ms(o_.qemu_timeout);
    auto next_line = Clock::now() + seconds_ms(o_.interval);
    auto next_storage = Clock::now();
    for (;;) {
      auto qm = qemu_migration();
      if (!qm) return Failure{step, qm.status().message()};
      std::string status = qm->value("status", std::string());
      const json ram = qm->value("ram", json::object());
      if (status == "pre-switchover") {
        progress(step,
                 fmt::format("QEMU paused at pre-switchover (the VM is stopped): {} of RAM sent",
                             format_bytes(ram.value("transferred", 0.0))),
                 {{"status", status}, {"ram_transferred", ram.value("transferred", 0)}});
        return std::nullopt;
      }
      if (status == "completed" || status == "device")
        return Failure{step, "QEMU went past pre-switchover without pausing (pause-before-switchover is off?)"};
      if (Clock::now() >= next_line) {
        progress(step,
                 fmt::format("QEMU migration {}: {} of RAM sent, {} left", status,
                             format_bytes(ram.value("transferred", 0.0)), format_bytes(ram.value("remaining", 0.0))),
                 {{"status", status}, {"ram_transferred", ram.value("transferred", 0)},
                  {"ram_remaining", ram.value("remaining", 0)}});
        next_line = Clock::now() + seconds_ms(o_.interval);
      }
      if (Clock::now() >= next_storage) {  // the storage must still be able to hand over
        for (StorageDisk& d : disks_) {
          auto st = storage_status(d);
          if (!st) return Failure{step, st.status().message()};
        }
        next_storage = Clock::now() + milliseconds(1000);
      }
      if (Clock::now() > deadline)
        return Failure{step, fmt::format("QEMU did not reach pre-switchover in {:g} s (see --qemu-timeout)",
                                         o_.qemu_timeout)};
      if (auto e = watch_qemus(kPoll)) return Failure{step, *e};
    }
  }

  std::optional<Failure> hand_over() {
    const char* step = "hand the storage over";
    // The last moment to back out: is the destination QEMU still there?
    auto dt = dst_->execute("query-status", {}, milliseconds(5000));
    if (!dt) return Failure{step, "destination QEMU: " + dt.status().message() + " (not handing over)"};
    if (dt->value("status", std::string()) != "inmigrate")
      return Failure{step, fmt::format("the destination QEMU is in state '{}' (not handing over)",
                                       dt->value("status", std::string("?")))};
    if (disks_.size() > 1) return hand_over_group(step);
    StorageDisk& d = disks_[0];
    auto reply = d.from->call({{"op", "handover"}}, long_timeout_);
    if (!reply) {
      // Did the source fence itself before it failed? Then the destination
      // may hold the truth, and nothing may be rolled back.
      auto st = d.from->call({{"op", "status"}});
      if (!st || !st->value("authoritative", false)) handed_over_ = true;
      return Failure{step, reply.status().message()};
    }
    handed_over_ = true;
    progress(step,
             fmt::format("storage handed over: storage paused for {}; {} is authoritative",
                         format_ms(reply->value("handover_pause_ms", int64_t{-1})), d.to_address),
             {{"handover_pause_ms", reply->value("handover_pause_ms", int64_t{-1})},
              {"phase", reply->value("phase", "")}});
    return std::nullopt;
  }

  // Several disks: one group, all or none (migrate_nbd_group.h).
  std::optional<Failure> hand_over_group(const char* step) {
    std::vector<GroupDisk> group;
    std::vector<std::unique_ptr<ControlClient>> sources;
    for (StorageDisk& d : disks_) {
      group.push_back({d.from_address, d.to_address});
      sources.push_back(std::move(d.from));
    }
    GroupOutcome g = run_group(group, sources, *coordinator_, o_.group_timeout, long_timeout_,
                               [&](const std::string& line) { progress(step, line); });
    for (size_t i = 0; i < disks_.size(); ++i) disks_[i].from = std::move(sources[i]);
    if (g.decision == "commit") handed_over_ = true;
    if (g.decision == "unknown") {
      // The coordinator may hold commit: the disks may be the destinations'.
      handed_over_ = true;
      return Failure{step, g.error};
    }
    if (!g.all_done) return Failure{step, g.error};
    progress(step, fmt::format("storage handed over: {} disks, group {}; every destination is authoritative",
                               disks_.size(), g.group),
             {{"group", g.group}, {"disks", g.disks}});
    return std::nullopt;
  }

  std::optional<Failure> continue_migration() {
    const char* step = "continue the QEMU migration";
    auto r = src_->execute("migrate-continue", {{"state", "pre-switchover"}}, kQmpCommand);
    if (!r) return Failure{step, "source QEMU: " + r.status().message()};
    progress(step, "QEMU migration continues (migrate-continue)");
    return std::nullopt;
  }

  std::optional<Failure> wait_completed() {
    const char* step = "wait for the QEMU migration to complete";
    const auto deadline = Clock::now() + seconds_ms(o_.qemu_timeout);
    json done;
    int completed_polls = 0;
    for (;;) {
      auto qm = qemu_migration();
      if (!qm) return Failure{step, qm.status().message()};
      // QEMU says 'completed' a moment before it fills in total-time and
      // downtime: ask again for those (briefly).
      if (qm->value("status", std::string()) == "completed") {
        done = *qm;
        if (done.value("total-time", int64_t{0}) > 0 || ++completed_polls > 10) break;
      }
      if (Clock::now() > deadline)
        return Failure{step, fmt::format("not completed in {:g} s (see --qemu-timeout)", o_.qemu_timeout)};
      if (auto e = watch_qemus(kPoll)) return Failure{step, *e};
    }
    // The destination leaves 'inmigrate' once it has loaded the state. It
    // runs the VM if the source ran it; a destination started with -S stops
    // in 'paused' instead, and is resumed here. A VM that was not running
    // stays as it was (paused, prelaunch).
    std::string got;
    for (auto dl = Clock::now() + milliseconds(60'000);;) {
      auto dt = dst_->execute("query-status", {}, kQmpCommand);
      if (!dt) return Failure{step, "destination QEMU: " + dt.status().message()};
      got = dt->value("status", std::string());
      if (got == "running" || (!src_was_running_ && got != "inmigrate")) break;
      if (got == "paused") {
        auto c = dst_->execute("cont", {}, kQmpCommand);
        if (!c) return Failure{step, "resuming the destination VM: " + c.status().message()};
        progress(step, "destination VM resumed (cont): it was started with -S", {{"resumed", true}});
        continue;
      }
      if (got != "inmigrate")
        return Failure{step, fmt::format("the destination QEMU is in state '{}', expected 'running'", got)};
      if (Clock::now() > dl)
        return Failure{step, "the destination QEMU is still 'inmigrate' 60 s after the source completed"};
      if (auto e = watch_qemus(kPoll)) return Failure{step, *e};
    }
    progress(step,
             fmt::format("QEMU migration completed: total {}, downtime {}; the destination VM is {}",
                         format_ms(done.value("total-time", int64_t{-1})),
                         format_ms(done.value("downtime", int64_t{-1})), got),
             {{"total_time_ms", done.value("total-time", int64_t{-1})},
              {"downtime_ms", done.value("downtime", int64_t{-1})},
              {"destination_status", got}});
    ram_done_ = std::move(done);
    qemu_completed_ = true;
    return std::nullopt;
  }

  std::optional<Failure> wait_storage_done() {
    const char* step = "wait for the storage migration to finish";
    json m;
    std::string phase;
    json storage = json::array();
    for (StorageDisk& d : disks_) {
      for (auto next_line = Clock::now() + seconds_ms(o_.interval);;) {
        auto st = d.from->call({{"op", "status"}});
        if (!st) return Failure{step, st.status().message()};
        phase = st->value("phase", std::string());
        m = st->value("migration", json::object());
        if (phase == "Done" || o_.no_wait_storage) break;
        if (InterruptScope::interrupted()) return Failure{step, "interrupted; the VM runs at the destination and the storage migration goes on"};
        if (phase == "Failed" || phase == "Cancelled")
          return Failure{step, fmt::format("the storage migration is {}: {}", phase,
                                           st->value("last_error", m.value("last_error", std::string())))};
        if (Clock::now() >= next_line) {
          progress(step, fmt::format("storage{} {}: {} left", disks_.size() > 1 ? " " + d.label() : "", phase,
                                     format_bytes(m.value("bytes_left", 0.0))),
                   {{"phase", phase}, {"bytes_left", m.value("bytes_left", 0)}});
          next_line = Clock::now() + seconds_ms(o_.interval);
        }
        std::this_thread::sleep_for(milliseconds(200));
      }
      storage.push_back(m);
    }
    if (o_.json) {
      json result = {{"result", "completed"},
                     {"qemu", {{"total_time_ms", ram_done_.value("total-time", int64_t{-1})},
                               {"downtime_ms", ram_done_.value("downtime", int64_t{-1})}}},
                     {"storage", disks_.size() > 1 ? storage : m},
                     {"storage_phase", phase}};
      print(result);
    } else {
      std::printf("VM migrated in %.1f s: QEMU downtime %s, storage pause %s, storage %s%s%s\n", since(t0_),
                  format_ms(ram_done_.value("downtime", int64_t{-1})).c_str(),
                  format_ms(m.value("handover_pause_ms", int64_t{-1})).c_str(), phase.c_str(),
                  phase == "Done" ? fmt::format(" (total time {})", format_ms(m.value("total_time_ms", int64_t{-1})))
                                        .c_str()
                                  : "; the rest of the disk arrives post-copy",
                  disks_.size() > 1 ? fmt::format(" ({} disks; the last one's figures)", disks_.size()).c_str() : "");
    }
    return std::nullopt;
  }

  // ---------------------------------------------------------------- rollback

  // Undoes what can be undone; returns one line per action for people.
  std::vector<std::string> roll_back() {
    std::vector<std::string> done;
    if (qemu_completed_) return done;  // the VM runs at the destination: nothing to undo
    if (handed_over_) {
      // A failed QEMU migration resumes the source VM, but its disk is fenced
      // now: stop it rather than let the guest see write errors.
      if (src_ && src_->usable()) {
        auto r = src_->execute("stop", {}, kQmpCommand);
        done.push_back(r ? "source VM stopped: its disk is fenced, the destination plugin " + disks_[0].to_address +
                               (disks_.size() > 1 ? " (and the other disks' destinations)" : "") +
                               " holds the disk now"
                         : "could not stop the source VM: " + r.status().message());
      }
      return done;
    }
    if (ram_started_ && src_ && src_->usable()) {
      auto r = src_->execute("migrate_cancel", {}, kQmpCommand);
      if (!r) {
        done.push_back("migrate_cancel on the source QEMU failed: " + r.status().message());
      } else {
        std::string status = "?";
        for (auto dl = Clock::now() + kCancelWait; Clock::now() < dl;) {
          auto qm = src_->execute("query-migrate", {}, kQmpCommand);
          if (!qm) break;
          status = qm->value("status", std::string("?"));
          if (status == "cancelled" || status == "failed" || status == "completed") break;
          src_->wait_event(kPoll);
        }
        done.push_back("QEMU migration cancelled on the source (status " + status + ")");
      }
    }
    for (StorageDisk& d : disks_) {
      if (!d.started || !d.from) continue;
      auto r = d.from->call({{"op", "cancel"}}, long_timeout_);
      done.push_back(r ? "storage migration " + d.id + " cancelled; " + d.from->target().label() +
                             " keeps serving the disk"
                       : "cancelling the storage migration " + d.id + ": " + r.status().message());
    }
    if (src_ && src_->usable()) {
      auto st = src_->execute("query-status", {}, kQmpCommand);
      if (st && src_was_running_ && !st->value("running", false)) {
        auto c = src_->execute("cont", {}, kQmpCommand);
        done.push_back(c ? "source VM resumed" : "could not resume the source VM: " + c.status().message());
      } else if (st) {
        done.push_back("the source VM is " + st->value("status", std::string("?")));
      }
    }
    return done;
  }

  const QemuMigrateOptions& o_;
  std::vector<StorageDisk> disks_;
  milliseconds long_timeout_;
  std::unique_ptr<ControlClient> coordinator_;  // several disks: disks_[0]'s destination
  Clock::time_point t0_;
  std::unique_ptr<QmpClient> src_, dst_;
  bool src_was_running_ = false;
  bool storage_started_ = false;
  bool ram_started_ = false;
  bool handed_over_ = false;
  bool qemu_completed_ = false;
  json ram_done_;
};

}  // namespace

int run_qemu_migrate(const QemuMigrateOptions& o) {
  json req;
  {
    // The storage options, checked once (with several disks, each disk's
    // request differs only in from and to).
    QemuMigrateOptions check = o;
    if (!o.disks.empty() && check.to.empty()) check.to = o.disks[0].substr(o.disks[0].find(',') + 1);
    if (auto rc = make_migrate_request(check, &req)) return *rc;
  }
  if (!o.max_bandwidth.empty()) {
    if (auto r = parse_rate(o.max_bandwidth, "--max-bandwidth"); !r) {
      print_error(r.status().message());
      return kExitUsage;
    }
  }
  if (o.ready_timeout <= 0 || o.qemu_timeout <= 0) {
    print_error("--ready-timeout and --qemu-timeout must be more than 0 seconds");
    return kExitUsage;
  }
  std::vector<StorageDisk> disks;
  std::unique_ptr<ControlClient> coordinator;
  milliseconds long_timeout{0};
  if (o.disks.empty()) {
    PluginPair plugins;
    if (auto rc = open_plugin_pair(o, &plugins)) return *rc;
    disks.push_back({std::move(plugins.from), std::move(plugins.to), o.from, o.to, "", false});
    long_timeout = plugins.long_timeout;
  } else {
    if (!o.from.empty() || !o.to.empty() || !o.socket.empty()) {
      print_error("give --disk FROM,TO for each disk, or --from and --to for one, not both");
      return kExitUsage;
    }
    std::vector<GroupDisk> group;
    if (auto rc = parse_group_disks(o.disks, o.group_timeout, &group)) return *rc;
    std::vector<std::unique_ptr<ControlClient>> sources, destinations;
    if (auto rc = open_group_clients(o, group, &sources, &coordinator)) return *rc;
    std::vector<GroupDisk> reversed;  // destinations' clients: the same helper, sides swapped
    for (const GroupDisk& d : group) reversed.push_back({d.to, d.from});
    std::unique_ptr<ControlClient> unused;
    if (auto rc = open_group_clients(o, reversed, &destinations, &unused)) return *rc;
    for (size_t i = 0; i < group.size(); ++i)
      disks.push_back({std::move(sources[i]), std::move(destinations[i]), group[i].from, group[i].to, "", false});
    long_timeout = o.timeout > 0 ? milliseconds(static_cast<int64_t>(o.timeout * 1000)) : milliseconds(300'000);
  }
  return QemuMigration(o, std::move(disks), long_timeout, std::move(coordinator)).run();
}

}  // namespace livemig::mig
