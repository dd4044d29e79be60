// migrate-nbd: orchestrates one live storage migration between two livemig
// plugins (DESIGN.md, "Control").
//
//   migrate-nbd start --from src:10809 --to dst:10809 --secret /etc/livemig/psk --mode precopy --wait
//
// This file is the command line (CLI11); the subcommands are in
// migrate_nbd_commands.cpp, the control client in client/control_client.cpp and
// what people see in migrate_nbd_output.cpp.
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/version.h"
#include "client-tools/migrate_nbd_commands.h"
#include "client-tools/migrate_nbd_daemon.h"
#include "client-tools/migrate_nbd_group.h"
#include "client-tools/migrate_nbd_options.h"
#include "client-tools/migrate_nbd_qemu.h"
#include "client/tls_options.h"

namespace mig = livemig::mig;

namespace {

constexpr const char* kFooter =
    "HOST:PORT is a plugin's peer port (its listen= key); --socket PATH talks to the\n"
    "plugin's local control socket (control=) instead of --from. A peer port needs\n"
    "the plugin's key: --secret FILE, else $LIVEMIG_SECRET_FILE (a plugin started\n"
    "without secret= made a random one: IMAGE.livemig-key, mode 0600).\n"
    "Exit status: 0 success, 1 failure (refused, unreachable, images differ,\n"
    "migration not Done), 2 bad command line, 130 interrupted.";

// Help that starts with an example command line; the subcommand list shows
// the description alone.
class HelpFormatter : public CLI::Formatter {
 public:
  std::string make_description(const CLI::App* app) const override {
    auto it = examples.find(app->get_name());
    std::string example = it == examples.end() ? "" : "Example: " + it->second + "\n\n";
    auto more = details.find(app->get_name());
    return example + CLI::Formatter::make_description(app) +
           (more == details.end() ? "" : more->second + "\n") + "\n";
  }
  std::map<std::string, std::string> examples;
  std::map<std::string, std::string> details;  // after the description
};

// The options every subcommand has.
void add_common(CLI::App* sub, mig::CommonOptions& o, bool with_to, const char* from_help) {
  sub->add_option("--from", o.from, from_help)->type_name("HOST:PORT");
  if (with_to) sub->add_option("--to", o.to, "the destination plugin's peer port")->type_name("HOST:PORT");
  sub->add_option("--socket", o.socket, "the plugin's local control socket, instead of --from")->type_name("PATH");
  sub->add_option("--secret", o.secret_file, "pre-shared key file (default: $LIVEMIG_SECRET_FILE)")
      ->type_name("FILE");
  sub->add_option("--timeout", o.timeout,
                  "give up on connecting or on a reply after this long (default: 10 to connect, "
                  "30 for a reply, 300 for migrate, handover and verify)")
      ->type_name("SECONDS");
  sub->add_flag("--json", o.json, "print JSON for scripts instead of text for people");
  livemig::client::add_tls_options(sub, o.tls);
  sub->footer(kFooter);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app(
      "Orchestrates one live storage migration between two livemig nbdkit plugins.",
      "migrate-nbd");
  app.set_version_flag("--version", std::string("migrate-nbd ") + livemig::kVersion,
                       "print migrate-nbd's version and exit");
  auto help = std::make_shared<HelpFormatter>();
  help->examples = {
      {"migrate-nbd", "migrate-nbd start --from src:10809 --to dst:10809 --secret /etc/livemig/psk --mode precopy --wait"},
      {"start", "migrate-nbd start --from src:10809 --to dst:10809 --mode precopy --handover auto --wait"},
      {"stats", "migrate-nbd stats --from src:10809 --top 10"},
      {"status", "migrate-nbd status --from src:10809 --to dst:10809"},
      {"watch", "migrate-nbd watch --from src:10809 --to dst:10809 --interval 1"},
      {"handover", "migrate-nbd handover --from src:10809   (a group: --disk src:10809,dst:10809 --disk ...)"},
      {"cancel", "migrate-nbd cancel --from src:10809"},
      {"set-rate", "migrate-nbd set-rate --from src:10809 --to dst:10809 200M"},
      {"resolve", "migrate-nbd resolve --abort --from src:10809"},
      {"release", "migrate-nbd release --from src:10809 --to dst:10809"},
      {"verify", "migrate-nbd verify --from src:10809 --to dst:10809 --range-size 64M"},
  };
  help->details = {
      {"start",
       "SIZE takes the binary suffixes K, M, G, T. RATE is bytes/s as a SIZE (100M) or\n"
       "bits/s as tc writes them (500Mbit, 1Gbit = 125,000,000 bytes/s); 0 = no cap.\n"
       "Options not given take the source plugin's defaults. With --wait, exits 0 only\n"
       "if the migration ends Done."},
      {"watch",
       "Redrawn in place on a terminal (Ctrl-C to quit; the migration goes on); one\n"
       "line per interval when stdout is not a terminal, one JSON object per line with\n"
       "--json. Exits 0 on Done or Idle, 1 on Failed or Cancelled."},
      {"handover",
       "Waits until the handover is done: from then on the destination is authoritative.\n"
       "With --disk FROM,TO (repeatable; instead of --from), the disks of one VM are handed\n"
       "over as a group, all or none: every source prepares, then the first disk's\n"
       "destination records the decision (commit if all prepared, else abort) and every\n"
       "source follows it. Each disk's migration must run with --handover explicit. A\n"
       "prepared source whose orchestrator vanished records abort after --group-timeout\n"
       "(unless commit was recorded first). See docs/handover.md, \"Groups\"."},
      {"verify",
       "Each plugin hashes its own image (xxh3-64) range by range; only the hashes\n"
       "cross the network. Images of different sizes are not hashed."},
      {"release",
       "A source that handed its image over stays fenced (read-only) after release."},
      {"resolve",
       "For a source whose handover is unresolved (status says \"needs resolution\"): the\n"
       "destination did not answer whether it committed, and cannot be reached. The\n"
       "source stays fenced until it can; --abort is your decision that it is gone for\n"
       "good: the source serves its image again. If the destination did commit, what\n"
       "its clients wrote since is lost (split brain); when it comes back it is told\n"
       "it lost and refuses to serve until released. See docs/handover.md."},
  };
  app.formatter(help);  // subcommands inherit it
  app.require_subcommand(1);
  app.footer(kFooter);

  mig::StartOptions start;
  auto* s = app.add_subcommand(
      "start",
"Starts a migration of the source's image to the destination.");
  add_common(s, start, true, "the source plugin's peer port");
  mig::add_migration_options(s, start);
  s->add_flag("--wait", start.wait, "show progress until the migration is Done, Failed or Cancelled");
  s->add_option("--interval", start.interval, "seconds between progress updates with --wait (default 1)")
      ->type_name("SECONDS");

  mig::CommonOptions status;
  auto* st = app.add_subcommand("status",
                                "Shows the state of one or both sides and of their migration.");
  add_common(st, status, true, "the (source) plugin's peer port");

  mig::CommonOptions stats;
  size_t stats_top = 0;
  auto* sts = app.add_subcommand("stats",
                                 "Shows request counters, segment heat and, during a migration, each segment's "
                                 "score, the set it is in and why.");
  add_common(sts, stats, false, "the plugin's peer port");
  sts->add_option("--top", stats_top, "only the N hottest segments (default: every segment with heat)")
      ->type_name("N");

  mig::WatchOptions watch;
  auto* w = app.add_subcommand(
      "watch",
"Shows the migration's progress until it is Done, Failed, Cancelled or Idle.");
  add_common(w, watch, true, "the (source) plugin's peer port");
  w->add_option("--interval", watch.interval, "seconds between updates (default 1)")->type_name("SECONDS");

  mig::GroupHandoverOptions handover;
  auto* h = app.add_subcommand("handover",
"Hands storage over to the destination and prints the storage pause.");
  add_common(h, handover, false, "the source plugin's peer port");
  h->add_option("--disk", handover.disks,
                "a disk of a group handed over together: its source's and destination's peer ports (repeatable)")
      ->type_name("FROM,TO");
  h->add_option("--group-timeout", handover.group_timeout,
                "seconds a prepared source waits for the group's decision before it records abort (default 30)")
      ->type_name("SECONDS");

  mig::CommonOptions cancel;
  auto* c = app.add_subcommand("cancel",
                               "Cancels a migration before handover; the source keeps its image.");
  add_common(c, cancel, false, "the source plugin's peer port");

  mig::CommonOptions set_rate;
  std::string set_rate_value;
  auto* sr = app.add_subcommand("set-rate",
                                "Changes a running migration's bandwidth cap (the source's pushes; with --to, the "
                                "destination's post-copy pulls too).");
  add_common(sr, set_rate, true, "the source plugin's peer port");
  sr->add_option("RATE", set_rate_value, "bytes/s as a SIZE (100M) or bits/s (500Mbit); 0 = no cap")
      ->required()
      ->type_name("RATE");

  mig::CommonOptions resolve;
  bool resolve_abort = false;
  auto* rs = app.add_subcommand("resolve",
                                "Ends an unresolved handover at the source (--abort: the destination is gone).");
  add_common(rs, resolve, false, "the source plugin's peer port");
  rs->add_flag("--abort", resolve_abort, "unfence the source; the destination's commit, if any, is lost (required)");

  mig::CommonOptions release;
  bool release_unfence = false;
  auto* r = app.add_subcommand("release",
"Forgets a finished, failed or cancelled migration at the given side(s).");
  add_common(r, release, true, "a plugin's peer port (the source)");
  r->add_flag("--unfence", release_unfence,
              "make a released former source's stale copy writable again (its VM runs elsewhere now; it stays "
              "fenced otherwise, also across restarts)");

  mig::VerifyOptions verify;
  auto* v = app.add_subcommand("verify",
"Compares the two images range by range; exit 0 if equal, 1 if they differ.");
  add_common(v, verify, true, "the source plugin's peer port");
  v->add_option("--range-size", verify.range_size, "bytes hashed per range (default 64M)")->type_name("SIZE");

  // qemu-migrate (migrate_nbd_qemu.cpp): a QEMU live migration with its disk.
  mig::QemuMigrateOptions qemu_migrate;
  help->examples["qemu-migrate"] = mig::kQemuMigrateExample;
  help->details["qemu-migrate"] = mig::kQemuMigrateDetails;
  auto* qm = mig::add_qemu_migrate_command(app, qemu_migrate);
  add_common(qm, qemu_migrate, true, "the source plugin's peer port");

  // livemigd: submit, list, show, cancel ID (client-tools/migrate_nbd_daemon.h).
  mig::DaemonCommands daemon_commands;
  mig::add_daemon_commands(app, daemon_commands, help->examples);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return mig::kExitOk;
  } catch (const CLI::CallForAllHelp&) {
    std::fputs(app.help("", CLI::AppFormatMode::All).c_str(), stdout);
    return mig::kExitOk;
  } catch (const CLI::CallForVersion& e) {
    std::printf("%s\n", e.what());
    return mig::kExitOk;
  } catch (const CLI::ParseError& e) {
    std::string sub;
    for (auto* x : app.get_subcommands()) sub = " " + x->get_name();
    mig::print_error(fmt::format("{} (see migrate-nbd{} --help)", e.what(), sub));
    return mig::kExitUsage;
  }

  if (auto rc = mig::run_daemon_command(daemon_commands)) return *rc;
  if (s->parsed()) return mig::run_start(start);
  if (st->parsed()) return mig::run_status(status);
  if (sts->parsed()) return mig::run_stats(stats, stats_top);
  if (w->parsed()) return mig::run_watch(watch);
  if (h->parsed()) return handover.disks.empty() ? mig::run_handover(handover) : mig::run_group_handover(handover);
  if (c->parsed()) return mig::run_cancel(cancel);
  if (sr->parsed()) return mig::run_set_rate(set_rate, set_rate_value);
  if (rs->parsed()) return mig::run_resolve(resolve, resolve_abort);
  if (r->parsed()) return mig::run_release(release, release_unfence);
  if (v->parsed()) return mig::run_verify(verify);
  if (qm->parsed()) return mig::run_qemu_migrate(qemu_migrate);
  return mig::kExitUsage;
}
