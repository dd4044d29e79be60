// The control client: sends one control request (a JSON object,
// plugin/control_ops.cpp) to a livemig plugin and returns its reply.
// migrate-nbd and livemigd both talk to plugins through it.
//
// A plugin takes the same requests on two channels:
//   remote  CONTROL frames over its authenticated peer port (listen=): a
//           PeerLink connected with purpose "control" (common/peer_link.h);
//   local   its Unix control socket (control=): one JSON line in, one out.
//
// A client keeps its connection open between calls (migrate-nbd watch and
// livemigd's monitors poll every second) and reconnects on the next call
// after a connection failed.
// Threading: one client is used by one thread at a time.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/peer_auth.h"
#include "common/peer_link.h"
#include "common/tls_context.h"
#include "common/status.h"

namespace livemig::client {

// Where control requests go.
struct Target {
  enum class Kind { Remote, Local };
  Kind kind = Kind::Remote;
  HostPort address;         // Remote
  std::string socket_path;  // Local

  static Target remote(HostPort where);
  static Target local(std::string path);
  // "10.0.0.2:10809" or "socket /run/livemig/vm.sock", for messages.
  std::string label() const;
  // The address to hand to a peer ("to"/"from" of migrate); empty if Local.
  std::string peer_address() const;
};

// The credentials for remote targets: the pre-shared key and where it came
// from, and TLS (null: plaintext).
struct SecretChoice {
  Secret secret;
  std::string source;  // the file
  bool present = false;  // a key file was given: remote targets can be reached
  std::shared_ptr<TlsContext> tls;
};

// --secret FILE if given, else $LIVEMIG_SECRET_FILE, else none (a local
// --socket needs no key; a peer port does: there is no built-in key); TLS
// as `tls` says. A key file readable by others sets *warning.
Result<SecretChoice> choose_secret(const std::string& secret_file, const TlsSettings& tls, std::string* warning);

// What a failed PeerLink::connect() to a plugin's peer port means, for
// people: "cannot reach ...", "authentication failed at ... (this side used
// ...)", "TLS with ... failed", "... does not speak the livemig peer protocol".
Status describe_connect_failure(const Status& failure, const HostPort& where, const SecretChoice& secret,
                                std::chrono::milliseconds timeout);


struct Timeouts {
  std::chrono::milliseconds connect{10'000};
  std::chrono::milliseconds reply{30'000};
};

class ControlClient {
 public:
  // Does not connect yet: the first call() does. `secret` matters for remote
  // targets only.
  ControlClient(Target target, std::shared_ptr<const SecretChoice> secret, Timeouts timeouts);
  ~ControlClient();
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  const Target& target() const { return target_; }

  // Connects now (if not connected). Errors are one line for people:
  // "cannot reach 10.0.0.2:10809: Connection refused", "authentication
  // failed at ...: wrong secret ...".
  Status connect();

  // Sends `request` and returns the plugin's reply. An "ok": false reply
  // becomes an error "<target>: <the plugin's error>"; a failure of the
  // connection becomes an error too, and the next call reconnects.
  // `reply_timeout` overrides Timeouts::reply.
  Result<nlohmann::json> call(const nlohmann::json& request,
                              std::optional<std::chrono::milliseconds> reply_timeout = std::nullopt);

  // Like call(), but returns an "ok": false reply as it is.
  Result<nlohmann::json> call_raw(const nlohmann::json& request,
                                  std::optional<std::chrono::milliseconds> reply_timeout = std::nullopt);

  class Channel;  // one connection (remote or local), in the .cpp

 private:
  Target target_;
  std::shared_ptr<const SecretChoice> secret_;
  Timeouts timeouts_;
  std::unique_ptr<Channel> channel_;
};

}  // namespace livemig::client
