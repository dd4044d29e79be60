// The plugin's keys (`nbdkit livemig.so image=vm.img key=value ...`), parsed
// and checked. Every key is handled in PluginConfig::set and documented in
// kConfigHelp, docs/man/nbdkit-livemig-plugin.pod (tests/packaging fails when
// the page and kConfigHelp differ) and the README's "Plugin keys" section.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/migration_params.h"
#include "common/segment_geometry.h"
#include "common/status.h"
#include "common/tls_context.h"
#include "plugin/engine_context.h"

namespace livemig {

inline constexpr const char* kConfigHelp =
    "image=<FILE>           (required) The raw image file to serve.\n"
    "readonly=<BOOL>        Open the image read-only (default false).\n"
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
    "secret=<FILE>          Pre-shared key (>= 16 bytes) authenticating peers;\n"
    "                       required when listen= is not a loopback address.\n"
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
  std::string secret_path;
  TlsSettings tls;
  HandoverPolicy handover = HandoverPolicy::Explicit;
  AcceptIncoming accept_incoming = AcceptIncoming::Empty;
  double peer_timeout = 15.0;
  std::string state_file;    // empty = <image>.livemig-state
  std::string base;          // base image, empty = none

  // Applies one key=value; an unknown key or a bad value is an error naming it.
  Status set(std::string_view key, std::string_view value);
  // Checks the keys against each other once all are set.
  Status complete() const;
};

// Where a plugin without secret= keeps its random key: beside the state
// file (IMAGE.livemig-key for the default state file IMAGE.livemig-state).
std::string generated_key_path(const PluginConfig& config, const std::string& state_path);

// Parses sizes like "4096", "4K", "1M", "2G" (binary units). Error names `key`.
Result<uint64_t> parse_size(std::string_view key, std::string_view value);
// Parses a positive number of seconds.
Result<double> parse_seconds(std::string_view key, std::string_view value);
// Parses true/false, yes/no, on/off, 1/0.
Result<bool> parse_bool(std::string_view key, std::string_view value);

}  // namespace livemig
