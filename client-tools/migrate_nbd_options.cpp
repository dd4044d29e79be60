#include "client-tools/migrate_nbd_options.h"

namespace livemig::mig {

void add_migration_options(CLI::App* app, StartOptions& o, bool with_handover) {
  app->add_option("--mode", o.mode, "precopy, postcopy, livefs, hybrid or auto")->required()->type_name("MODE");
  app->add_option("--threshold", o.threshold,
                  "livefs: push segments scoring at least this (max = none: postcopy); hybrid: stop pushing a "
                  "segment written this many times (default 4)")
      ->type_name("N");
  app->add_option("--w-read", o.w_read, "livefs: weight of reads in the score (w-read + w-write = 1)")
      ->type_name("W");
  app->add_option("--w-write", o.w_write, "livefs: weight of writes in the score")->type_name("W");
  app->add_option("--monitor-period", o.monitor_period,
                  "livefs: seconds of monitoring before choosing, or history (rank from the decayed heat)")
      ->type_name("SECONDS");
  app->add_option("--max-resends", o.max_resends, "auto: rounds a segment is resent before it is deferred (default 2)")
      ->type_name("N");
  if (with_handover)
    app->add_option("--handover", o.handover,
                    "explicit (migrate-nbd handover), auto (once converged), on-disconnect (when the last "
                    "client of the source disconnects) or on-destination-io (when the destination's clients "
                    "write and the source's have been quiet for 1 s); default: the source plugin's handover= key")
        ->type_name("WHEN");
  app->add_option("--handover-size", o.handover_size, "hand over once at most this much is left (default 64M)")
      ->type_name("SIZE");
  app->add_option("--max-rate", o.max_rate, "cap the migration's bandwidth (default: no cap)")->type_name("RATE");
  app->add_option("--guest-latency-bound", o.guest_latency_bound,
                  "guest first: slow the migration while the guest's p99 request latency is above FACTOR times "
                  "its p99 before the migration (0: off; default 1.2 for auto, off for the other modes)")
      ->type_name("FACTOR");
  app->add_option("--min-rate", o.min_rate, "the slowest that --guest-latency-bound makes the migration (default 16M)")
      ->type_name("RATE");
  app->add_option("--max-slowdown", o.max_slowdown,
                  "the most --guest-latency-bound may slow the transfer, as a factor of its unpaced rate (0: no "
                  "limit but --min-rate; default 1.3 for auto, 0 for the other modes)")
      ->type_name("FACTOR");
  app->add_option("--migration-nice", o.migration_nice,
                  "guest first: run the threads that move the data, on both sides, at this nice value (0 to "
                  "19): on full CPUs the guest's requests run first (default 0)")
      ->type_name("N");
  app->add_option("--max-rounds", o.max_rounds, "pre-copy rounds before the rest goes post-copy (default 30)")
      ->type_name("N");
  app->add_option("--transfer-unit", o.transfer_unit, "largest single transfer (default 1M)")->type_name("SIZE");
  app->add_option("--compression", o.compression,
                  "zstd on the link: auto (when the link, not the CPU, is the bottleneck and the data "
                  "compresses; the default), off, zstd (level 1) or zstd:LEVEL (-7 to 19)")
      ->type_name("HOW");
}

}  // namespace livemig::mig
