// The command-line options that describe one migration (mode, parameters,
// handover, rate), shared by `migrate-nbd start` and `migrate-nbd submit`
// (livemigd), which send the same migrate request.
#pragma once

#include <CLI/CLI.hpp>

#include "client-tools/migrate_nbd_commands.h"

namespace livemig::mig {

// Adds --mode (required), the mode's parameters, --handover (unless the
// command decides the handover itself), --handover-size, --max-rate,
// --max-rounds and --transfer-unit to `app`, stored in `o`.
void add_migration_options(CLI::App* app, StartOptions& o, bool with_handover = true);

}  // namespace livemig::mig
