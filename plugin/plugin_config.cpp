#include "plugin/plugin_config.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <string>

#include <fmt/format.h>

#include "common/peer_link.h"

namespace livemig {

Result<uint64_t> parse_size(std::string_view key, std::string_view value) {
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
  std::string_view suffix(end, value.data() + value.size() - end);
  if (ec != std::errc() || value.empty())
    return Status::error(fmt::format("{}={}: not a size (expected a number such as 4096, 4K or 1M)", key, value));
  unsigned shift = 0;
  if (suffix.size() == 1 || (suffix.size() == 3 && (suffix.substr(1) == "iB" || suffix.substr(1) == "ib"))) {
    switch (std::toupper(static_cast<unsigned char>(suffix[0]))) {
      case 'B': shift = 0; break;
      case 'K': shift = 10; break;
      case 'M': shift = 20; break;
      case 'G': shift = 30; break;
      case 'T': shift = 40; break;
      default:
        return Status::error(fmt::format("{}={}: unknown size suffix '{}'", key, value, suffix));
    }
  } else if (!suffix.empty()) {
    return Status::error(fmt::format("{}={}: unknown size suffix '{}'", key, value, suffix));
  }
  if (shift && n > (UINT64_MAX >> shift))
    return Status::error(fmt::format("{}={}: too large", key, value));
  return n << shift;
}

Result<bool> parse_bool(std::string_view key, std::string_view value) {
  std::string v(value);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
  if (v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off") return false;
  return Status::error(fmt::format("{}={}: not a boolean (expected true or false)", key, value));
}

Result<double> parse_seconds(std::string_view key, std::string_view value) {
  double d = 0;
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), d);
  if (ec != std::errc() || end != value.data() + value.size() || !(d > 0) || !std::isfinite(d))
    return Status::error(fmt::format("{}={}: expected a positive number of seconds", key, value));
  return d;
}

Status PluginConfig::set(std::string_view key, std::string_view value) {
  if (key == "image") {
    if (value.empty()) return Status::error("image=: the image path is empty");
    image = value;
  } else if (key == "readonly") {
    auto b = parse_bool(key, value);
    if (!b) return b.status();
    readonly = *b;
  } else if (key == "block-size") {
    auto n = parse_size(key, value);
    if (!n) return n.status();
    block_size = *n;
  } else if (key == "segment-size") {
    auto n = parse_size(key, value);
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
    secret_path = value;
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
  if (remote && secret_path.empty())
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
