// migrate-nbd qemu-migrate: a QEMU live migration together with the storage
// migration of its disk (DESIGN.md, "Handover"):
//
//   migrate-nbd qemu-migrate --from src:10809 --to dst:10809 --mode precopy
//       --qmp-src /run/src.qmp --qmp-dst /run/dst.qmp --migrate-uri tcp:dst:4444
//
// Both QEMUs attach their disk as an NBD export of their own livemig plugin;
// the destination QEMU was started with -incoming defer. Steps, each named in
// progress lines and in errors:
//   1 connect QMP      both monitors; the source is not migrating, the
//                      destination is in 'inmigrate'
//   2 capabilities     pause-before-switchover and events on both sides, no
//                      block migration (the disk moves through livemig)
//   3 incoming         migrate-incoming on the destination
//   4 storage start    the storage migration, handover=explicit
//   5 storage ready    until the source plugin says ready (postcopy: at once)
//   6 RAM migration    migrate on the source
//   7 pre-switchover   until QEMU pauses there (the VM is stopped)
//   8 handover         the storage handover (the destination is authoritative)
//   9 continue         migrate-continue
//  10 completed        the source reports 'completed', the destination runs
//  11 storage done     the rest of the disk arrives post-copy (unless
//                      --no-wait-storage)
// A failure up to step 8 rolls back: migrate_cancel on the source QEMU and
// cancel of the storage migration, so the source VM keeps running on its
// disk. After the handover nothing can be rolled back: a QEMU failure then
// stops the source VM (its disk is fenced) and says where the disk is.
#pragma once

#include <string>
#include <vector>

#include "client-tools/migrate_nbd_commands.h"

namespace CLI {
class App;
}

namespace livemig::mig {

struct QemuMigrateOptions : StartOptions {
  std::string qmp_src;        // the source QEMU's QMP socket
  std::string qmp_dst;        // the destination QEMU's QMP socket
  std::string migrate_uri;    // where the source QEMU sends its state: tcp:HOST:PORT
  std::string incoming_uri;   // what the destination listens on; default migrate_uri
  std::string max_bandwidth;  // QEMU's RAM migration cap (a RATE); empty: QEMU's
  double ready_timeout = 600;  // seconds for the storage to become ready
  double qemu_timeout = 600;   // seconds for QEMU to reach pre-switchover, and to complete
  bool no_wait_storage = false;
  // Several disks (--disk FROM,TO, repeatable; instead of --from/--to): one
  // storage migration each, handed over as one group at pre-switchover
  // (migrate_nbd_group.h).
  std::vector<std::string> disks;
  double group_timeout = 30;
};

inline constexpr const char* kQemuMigrateExample =
    "migrate-nbd qemu-migrate --from src:10809 --to dst:10809 --mode precopy --qmp-src /run/src.qmp "
    "--qmp-dst /run/dst.qmp --migrate-uri tcp:dst:4444";
inline constexpr const char* kQemuMigrateDetails =
    "Each QEMU attaches its disk as an NBD export of its own livemig plugin; the\n"
    "destination QEMU runs with -incoming defer. QEMU migrates RAM and devices only\n"
    "(no block migration); the storage is handed over while QEMU waits at\n"
    "pre-switchover. A failure before the handover cancels both migrations, so the\n"
    "source VM keeps running; errors name the step that failed.\n"
    "A VM with several disks: --disk FROM,TO for each (instead of --from/--to), one\n"
    "plugin pair per disk; every disk is handed over at the one switchover as a\n"
    "group, all or none (migrate-nbd handover --help, docs/handover.md \"Groups\").";

// Adds the subcommand and its own options (the storage options of `start`,
// the QMP sockets and URIs) to `app`; the caller adds the common ones.
CLI::App* add_qemu_migrate_command(CLI::App& app, QemuMigrateOptions& o);

int run_qemu_migrate(const QemuMigrateOptions& o);

}  // namespace livemig::mig
