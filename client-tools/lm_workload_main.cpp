// lm-workload: a verifying NBD writer and its verifier. It proves "no
// acknowledged write is lost" across a live migration: `write` behaves like a
// hypervisor's NBD client and journals every acknowledged write, `verify` reads
// the export back and checks every block against the journal.
//
//   nbdkit -f -U /tmp/a.sock memory 64M &
//   lm-workload write --uri 'nbd+unix:///?socket=/tmp/a.sock' --journal /tmp/j --blocks 4096 --duration 5
//   lm-workload verify --uri 'nbd+unix:///?socket=/tmp/a.sock' --journal /tmp/j --blocks 4096
#include <cstdio>
#include <algorithm>
#include <utility>
#include <vector>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "common/version.h"
#include "client-tools/lm_workload_block.h"
#include "client-tools/lm_workload_util.h"
#include "client-tools/lm_workload_verify.h"
#include "client-tools/lm_workload_write.h"

namespace {

using namespace livemig::workload;

const std::vector<std::pair<std::string, std::string>>& examples() {
  static const std::vector<std::pair<std::string, std::string>> m = {
      {"write",
       "  lm-workload write --uri nbd://src-host:10809 --journal /tmp/wl.journal --region 0:256M \\\n"
       "      --pattern hot:0.1:0.9 --rate 2000 --duration 60 --flush-every 1000 --switch-file /tmp/wl.switch"},
      {"verify",
       "  lm-workload verify --uri nbd://dst-host:10809 --journal /tmp/wl.journal --region 0:256M"},
      {"journal", "  lm-workload journal --journal /tmp/wl.journal --block 17"},
  };
  return m;
}

// Puts the example command line(s) first in every --help.
class ExampleFormatter : public CLI::Formatter {
 public:
  std::string make_description(const CLI::App* app) const override {
    std::string out = "Example:\n";
    auto it = std::find_if(examples().begin(), examples().end(),
                           [&](const auto& e) { return e.first == app->get_name(); });
    if (it != examples().end()) {
      out += it->second + "\n";
    } else {
      out = "Examples:\n";
      for (const auto& [name, text] : examples()) out += text + "\n";
    }
    return out + "\n" + CLI::Formatter::make_description(app);
  }
};

CLI::Validator block_size_validator() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        auto n = parse_size(v);
        if (!n || *n < kMinBlockSize || *n % kSectorSize || *n > kMaxBlockSize)
          return "must be a multiple of 512 between 512 and 32M";
        v = std::to_string(*n);
        return {};
      },
      "SIZE");
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  CLI::App app{"lm-workload: a verifying NBD writer (proves no acknowledged write is lost across a "
               "live migration) and its verifier. Exit status: 0 ok, 1 verification or workload "
               "failed, 2 bad arguments or setup error.",
               "lm-workload"};
  app.formatter(std::make_shared<ExampleFormatter>());
  app.set_version_flag("--version", std::string("lm-workload ") + livemig::kVersion,
                       "print lm-workload's version and exit");
  app.require_subcommand(1);

  // --- write
  WriteOptions w;
  std::string pattern = "random";
  uint64_t blocks = 0, count = 0, seed = 0;
  double duration = 0;
  auto* write = app.add_subcommand(
      "write",
      "Write self-describing blocks through one NBD connection with a queue of asynchronous writes, "
      "journal every acknowledged write, and switch server when the switch file names a new one.");
  write->add_option("--uri", w.uri, "NBD URI of the server, e.g. nbd://host:10809 or nbd+unix:///?socket=PATH")
      ->required();
  write->add_option("--journal", w.journal, "journal file (created; see --append / --overwrite)")->required();
  auto* bs_opt = write->add_option("--block-size", w.block_size, "bytes per write, a multiple of 512")
                     ->transform(block_size_validator())
                     ->capture_default_str();
  auto* blocks_opt = write->add_option("--blocks", blocks, "write blocks 0..N-1 (default: the whole export)")
                         ->check(CLI::PositiveNumber);
  write->add_option("--region", w.region, "write the byte range OFFSET:LEN, e.g. 0:256M (block aligned)")
      ->excludes(blocks_opt);
  write->add_option("--pattern", pattern, "random | sequential | hot:FRACTION:PROB (PROB of writes go to the "
                                          "first FRACTION of the region)")
      ->capture_default_str();
  write->add_option("--rate", w.rate, "writes per second (0 = unthrottled)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  auto* dur_opt = write->add_option("--duration", duration, "seconds to write for (default: until SIGINT)")
                      ->check(CLI::PositiveNumber);
  write->add_option("--count", count, "number of writes to issue")->check(CLI::PositiveNumber)->excludes(dur_opt);
  write->add_option("--queue-depth", w.queue_depth, "writes in flight at once")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  write->add_option("--fua-every", w.fua_every, "send every Nth write with FUA (0 = never)")->capture_default_str();
  write->add_option("--flush-every", w.flush_every, "flush after every N acknowledged writes (0 = only at the end)")
      ->capture_default_str();
  write->add_option("--switch-file", w.switch_file,
                    "poll PATH (and re-read it on SIGUSR1): when its first line is a new NBD URI, drain, flush, "
                    "reconnect there and write 'switched URI' to PATH.done");
  auto* seed_opt = write->add_option("--seed", seed, "seed of block contents and choices (default: random)");
  write->add_option("--stats-interval", w.stats_interval, "seconds between progress lines (0 = none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  write->add_option("--retry-timeout", w.retry_timeout,
                    "seconds a refused (EPERM/EROFS) or failed write is retried before giving up")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bool no_final_flush = false;
  write->add_flag("--no-final-flush", no_final_flush,
                  "do not flush before exiting (like a guest that never flushes): the last writes stay "
                  "acknowledged but not durable");
  write->add_option("--json-out", w.json_out, "write totals (IOPS, latency percentiles, switches) as JSON here");
  auto* append_opt = write->add_flag("--append", w.append, "continue an existing journal (same block size and seed)");
  write->add_flag("--overwrite", w.overwrite, "replace an existing journal")->excludes(append_opt);

  // --- verify
  VerifyOptions v;
  uint64_t vblocks = 0;
  auto* verify = app.add_subcommand(
      "verify", "Read back every block the journal names and check it holds its last acknowledged generation.");
  verify->add_option("--uri", v.uri, "NBD URI of the server to read")->required();
  verify->add_option("--journal", v.journal, "journal written by lm-workload write")->required();
  verify->add_flag("--durable-only", v.durable_only,
                   "accept any generation between the last durable one (FUA, or flushed on the connection "
                   "that wrote it) and the last issued one (after a server was killed)");
  auto* vblocks_opt = verify->add_option("--blocks", vblocks, "also check that never-written blocks in 0..N-1 "
                                                              "still hold their initial content")
                          ->check(CLI::PositiveNumber);
  verify->add_option("--region", v.region, "or in the byte range OFFSET:LEN")->excludes(vblocks_opt);
  verify->add_option("--initial", v.initial, "what never-written blocks hold: zero, or any (not checked, but must "
                                             "not hold this journal's data)")
      ->check(CLI::IsMember({"zero", "any"}))
      ->capture_default_str();
  verify->add_option("--max-listed", v.max_listed, "mismatched blocks to list")->capture_default_str();
  verify->add_flag("--json", v.json, "print a machine-readable summary");

  // --- journal
  JournalOptions jo;
  uint64_t jblock = 0;
  auto* journal = app.add_subcommand("journal", "Summarise a journal (and one block's history with --block).");
  journal->add_option("--journal", jo.journal, "journal file")->required();
  auto* jblock_opt = journal->add_option("--block", jblock, "block number to show");
  journal->add_flag("--json", jo.json, "machine-readable output");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    for (auto& c : what)
      if (c == '\n') c = ' ';
    fmt::print(stderr, "lm-workload: error: {} (see lm-workload --help)\n", what);
    return kExitUsage;
  }

  if (write->parsed()) {
    w.block_size_given = bs_opt->count() > 0;
    if (blocks_opt->count()) w.blocks = blocks;
    if (dur_opt->count()) w.duration = duration;
    if (count > 0) w.count = count;
    if (seed_opt->count()) w.seed = seed;
    w.pattern_text = pattern;
    w.final_flush = !no_final_flush;
    if (auto p = parse_pattern(pattern); !p) {
      fmt::print(stderr, "lm-workload: error: {}\n", p.status().message());
      return kExitUsage;
    }
    return run_write(w);
  }
  if (verify->parsed()) {
    if (vblocks_opt->count()) v.blocks = vblocks;
    return run_verify(v);
  }
  if (journal->parsed()) {
    if (jblock_opt->count()) jo.block = jblock;
    return run_journal_info(jo);
  }
  return kExitUsage;
}
