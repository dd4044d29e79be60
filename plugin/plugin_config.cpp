#include "plugin/plugin_config.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include <fmt/format.h>

#include "common/peer_link.h"

namespace livemig {

namespace {

// A size read by nbdkit_parse_size, which reported a bad value itself.
Result<uint64_t> read_size(std::string_view key, std::string_view value, const NbdkitParsers& parse) {
  int64_t n = parse.parse_size(std::string(value).c_str());
  if (n < 0) return Status::error(fmt::format("{}={}: not a size", key, value));
  return static_cast<uint64_t>(n);
}

// A boolean read by nbdkit_parse_bool, which reported a bad value itself.
Result<bool> read_bool(std::string_view key, std::string_view value, const NbdkitParsers& parse) {
  int b = parse.parse_bool(std::string(value).c_str());
  if (b < 0) return Status::error(fmt::format("{}={}: not a boolean", key, value));
  return b == 1;
}

// The key in secret=+FILE, -FD or -, read by nbdkit_read_password (the first
// line, its newline removed); the buffer is wiped before it is freed.
Result<Secret> read_password_secret(std::string_view value, const NbdkitParsers& parse) {
  const std::string what = fmt::format("secret={}", value);
  char* password = nullptr;
  if (parse.read_password(std::string(value).c_str(), &password) == -1)
    return Status::error(what + ": cannot read the key");
  auto secret = Secret::from_bytes(password ? std::string_view(password) : std::string_view(), what);
  if (password) {
    explicit_bzero(password, std::strlen(password));
    std::free(password);
  }
  return secret;
}

}  // namespace

Result<double> parse_seconds(std::string_view key, std::string_view value) {
  double d = 0;
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), d);
  if (ec != std::errc() || end != value.data() + value.size() || !(d > 0) || !std::isfinite(d))
    return Status::error(fmt::format("{}={}: expected a positive number of seconds", key, value));
  return d;
}

Status PluginConfig::set(std::string_view key, std::string_view value, const NbdkitParsers& parse) {
  if (key == "image") {
    if (value.empty()) return Status::error("image=: the image path is empty");
    image = value;
  } else if (key == "readonly") {
    auto b = read_bool(key, value, parse);
    if (!b) return b.status();
    readonly = *b;
  } else if (key == "block-size") {
    auto n = read_size(key, value, parse);
    if (!n) return n.status();
    block_size = *n;
  } else if (key == "segment-size") {
    auto n = read_size(key, value, parse);
    if (!n) return n.status();
    segment_size = *n;
  } else if (key == "heat-half-life") {
    auto d = parse_seconds(key, value);
    if (!d) return d.status();
    heat_half_life = *d;
  } else if (key == "peer-timeout") {
    auto d = parse_seconds(key, value);
    if (!d) return d.status();
    peer_timeout = *d;
  } else if (key == "listen") {
    auto hp = parse_host_port(std::string(value), true);
    if (!hp) return Status::error(fmt::format("listen={}: {}", value, hp.status().message()));
    listen = value;
  } else if (key == "secret") {
    if (value.empty()) return Status::error("secret=: the key file path is empty");
    if (value.front() == '+' || value.front() == '-') {
      // nbdkit's password forms. A plain value stays a path (read later by
      // load_secret, as migrate-nbd reads it), never the key itself.
      auto s = read_password_secret(value, parse);
      if (!s) return s.status();
      secret = std::move(*s);
      secret_path = value.front() == '+' ? std::string(value.substr(1)) : std::string();
    } else {
      secret = Secret();
      secret_path = value;
    }
  } else if (key == "handover") {
    auto policy = parse_handover_policy(std::string(value));
    if (!policy) return Status::error(fmt::format("handover={}: {}", value, policy.status().message()));
    handover = *policy;
  } else if (key == "accept-incoming") {
    auto a = parse_accept_incoming(std::string(value));
    if (!a) return a.status();
    accept_incoming = *a;
  } else if (key == "tls") {
    auto m = parse_tls_mode(std::string(value));
    if (!m) return m.status();
    tls.mode = *m;
  } else if (key == "tls-certificates") {
    if (value.empty()) return Status::error("tls-certificates=: the directory is empty");
    tls.certificates = value;
  } else if (key == "tls-psk") {
    if (value.empty()) return Status::error("tls-psk=: the path is empty");
    tls.psk_file = value;
  } else if (key == "tls-psk-identity") {
    tls.psk_identity = value;
  } else if (key == "state-file") {
    if (value.empty()) return Status::error("state-file=: the path is empty");
    state_file = value;
  } else if (key == "base") {
    if (value.empty()) return Status::error("base=: the base image path is empty");
    base = value;
  } else if (key == "control") {
    if (value.empty()) return Status::error("control=: the socket path is empty");
    control_path = value;
  } else {
    return Status::error(fmt::format("unknown key '{}' (see nbdkit livemig --help)", key));
  }
  return Status::ok();
}

std::string generated_key_path(const PluginConfig& config, const std::string& state_path) {
  const std::string suffix = ".livemig-state";
  if (config.state_file.empty() && state_path.size() > suffix.size() &&
      state_path.compare(state_path.size() - suffix.size(), suffix.size(), suffix) == 0)
    return state_path.substr(0, state_path.size() - suffix.size()) + ".livemig-key";
  return state_path + ".key";
}

Status PluginConfig::complete() const {
  if (image.empty()) return Status::error("the image=<FILE> key is required");
  // sockaddr_un::sun_path holds 108 bytes including the terminating NUL.
  if (control_path.size() > 107)
    return Status::error(fmt::format("control={}: a Unix socket path may be at most 107 bytes long", control_path));
  const bool remote = !listen.empty() && !is_loopback_host(parse_host_port(listen, true).value().host);
  if (remote && secret_path.empty() && secret.empty())
    return Status::error(fmt::format(
        "listen={} is not a loopback address: peers must authenticate, so secret=<FILE> is required", listen));
  auto use_tls = tls.enabled();
  if (!use_tls) return use_tls.status();
  if (remote && !*use_tls && tls.mode != TlsMode::Off)
    return Status::error(fmt::format("listen={} is not a loopback address: the disk would cross the network in clear "
                                     "text; give tls-certificates=DIR or tls-psk=FILE (or say tls=off)",
                                     listen));
  return SegmentGeometry::check_sizes(block_size, segment_size.value_or(SegmentGeometry::kDefaultSegmentSize));
}

}  // namespace livemig
