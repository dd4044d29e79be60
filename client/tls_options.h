// The command-line options that choose TLS to the plugins' peer ports, the
// same for every program that talks to plugins (migrate-nbd, livemigd).
#pragma once

#include <CLI/CLI.hpp>

#include "common/tls_context.h"

namespace livemig::client {

// Adds --tls, --tls-certificates, --tls-psk and --tls-psk-identity (the
// plugin's keys of the same names) to `app`, stored in `o`.
// REQUIRES: `o` outlives `app`'s parsing.
void add_tls_options(CLI::App* app, TlsSettings& o);

}  // namespace livemig::client
