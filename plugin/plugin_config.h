// The plugin's keys (`nbdkit livemig.so image=vm.img key=value ...`), parsed
// and checked. Every key is handled in PluginConfig::set and documented in
// kConfigHelp, docs/man/nbdkit-livemig-plugin.pod (tests/packaging fails when
// the page and kConfigHelp differ) and the README's "Plugin keys" section.
// Sizes, booleans and keys read as passwords go through nbdkit's own parsers
// (NbdkitParsers), so that `block-size=4k` or `readonly=on` means what it
// means to every nbdkit plugin; the checks on top (ranges, powers of two)
// are livemig's.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/migration_params.h"
#include "common/peer_auth.h"
#include "common/segment_geometry.h"
#include "common/status.h"
#include "common/tls_context.h"
#include "plugin/engine_context.h"

namespace livemig {

inline constexpr const char* kConfigHelp =
    "image=<FILE>           (required) The raw image file to serve.\n"
    "readonly=<BOOL>        Deprecated: use nbdkit -r. Opens the image file\n"
    "                       read-only as well (default false).\n"
    "block-size=<SIZE>      Dirty/presence tracking unit, a power of two, 512..1M\n"
    "                       (default 4K: the smallest write a guest issues).\n"
    "segment-size=<SIZE>    Heat ranking unit, a power-of-two multiple of\n"
    "                       block-size (default 1M; for images over 64G,\n"
    "                       size/65536 rounded up to a power of two).\n"
    "heat-half-life=<SECS>  Decay half-life of the heat history (default 60).\n"
    "control=<PATH>         Unix control socket (mode 0600), JSON lines:\n"
    "                       {\"op\":\"status\"}, {\"op\":\"stats\"}, ...\n"
    "listen=<HOST:PORT>     Peer port for migrations and remote control.\n"
    "                       A destination may start on an empty or missing\n"
    "                       image: it takes its size from the source.\n"
    "secret=<FILE>|+<FILE>|-<FD>|-\n"
    "                       Pre-shared key (>= 16 bytes) authenticating peers;\n"
    "                       required when listen= is not a loopback address.\n"
    "                       FILE: the key file, read as migrate-nbd --secret\n"
    "                       reads it. +FILE, -FD, -: read as nbdkit reads a\n"
    "                       password (first line of FILE, of FD, or typed).\n"
    "                       Without it a random key is made in a 0600 file\n"
    "                       beside the state file (IMAGE.livemig-key).\n"
    "handover=explicit|auto|on-disconnect|on-destination-io\n"
    "                       Default handover trigger of migrations started\n"
    "                       here (default explicit).\n"
    "tls=auto|on|off        TLS 1.3 on the peer link (default auto: on when\n"
    "                       credentials are given; required on a non-loopback\n"
    "                       listen=, where tls=off must be said explicitly).\n"
    "tls-certificates=<DIR> x509 credentials in QEMU's tls-creds-x509 layout\n"
    "                       (ca-cert.pem, server-cert.pem, server-key.pem,\n"
    "                       client-cert.pem, client-key.pem).\n"
    "tls-psk=<FILE>         TLS pre-shared keys, nbdkit --tls-psk format.\n"
    "tls-psk-identity=<ID>  The identity used when connecting (default: first).\n"
    "accept-incoming=empty|always|never\n"
    "                       When this plugin may become a migration destination\n"
    "                       (default empty: only onto an image without data\n"
    "                       that no client wrote to, or its own partial copy).\n"
    "peer-timeout=<SECS>    A silent peer is dead after this (default 15).\n"
    "state-file=<FILE>      Migration state (default <image>.livemig-state).\n"
    "base=<FILE>            A read-only base image both hosts hold (the template\n"
    "                       the VM was deployed from): blocks equal to it cross\n"
    "                       as 8-byte notes. Give the same base to both plugins.\n"
    "                       Its block checksums are cached in <FILE>.livemig-sums.";

// nbdkit's value parsers, with nbdkit's signatures. Each reports a bad value
// itself (nbdkit_error, nbdkit's own message) and returns -1. The plugin
// passes nbdkit_parse_size, nbdkit_parse_bool and nbdkit_read_password; unit
// tests, which run without nbdkit, pass fakes that follow nbdkit's documented
// semantics for the values they use.
struct NbdkitParsers {
  int64_t (*parse_size)(const char* str);
  int (*parse_bool)(const char* str);
  int (*read_password)(const char* value, char** password);  // *password from malloc
};

struct PluginConfig {
  std::string image;
  bool readonly = false;
  uint64_t block_size = SegmentGeometry::kDefaultBlockSize;
  std::optional<uint64_t> segment_size;  // none: SegmentGeometry::auto_segment_size
  // The segment size for an image of `image_size` bytes.
  uint64_t segment_size_for(uint64_t image_size) const {
    return segment_size.value_or(SegmentGeometry::auto_segment_size(image_size, block_size));
  }
  double heat_half_life = 60.0;
  std::string control_path;
  std::string listen;        // HOST:PORT, empty = no peer port
  std::string secret_path;   // secret=FILE or +FILE; empty for -FD and -
  Secret secret;             // secret=+FILE, -FD or -: read during .config
  TlsSettings tls;
  HandoverPolicy handover = HandoverPolicy::Explicit;
  AcceptIncoming accept_incoming = AcceptIncoming::Empty;
  double peer_timeout = 15.0;
  std::string state_file;    // empty = <image>.livemig-state
  std::string base;          // base image, empty = none

  // Applies one key=value, reading sizes, booleans and passwords with
  // `parse`; an unknown key or a bad value is an error naming it.
  Status set(std::string_view key, std::string_view value, const NbdkitParsers& parse);
  // Checks the keys against each other once all are set.
  Status complete() const;
};

// Where a plugin without secret= keeps its random key: beside the state
// file (IMAGE.livemig-key for the default state file IMAGE.livemig-state).
std::string generated_key_path(const PluginConfig& config, const std::string& state_path);

// Parses a positive number of seconds, fractions allowed ("0.5"): nbdkit has
// no parser for those. The error names `key`.
Result<double> parse_seconds(std::string_view key, std::string_view value);

}  // namespace livemig
