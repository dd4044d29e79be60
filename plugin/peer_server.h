// The peer port: a TCP listener (listen=HOST:PORT) for peer plugins and for
// orchestration from another host. Each connection authenticates (HMAC
// challenge-response, docs/protocol.md); then a "peer" connection is handed
// to the migration engine, and a "control" connection takes CONTROL frames,
// each answered with a CONTROL_REPLY carrying the same JSON as the local
// control socket.
//
// Like the control socket: bind() in .get_ready (plain system calls, so a bad
// address stops start-up), start() in .after_fork on the engine's io_context.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <boost/asio/io_context.hpp>

#include "common/peer_auth.h"
#include "common/peer_link.h"
#include "common/status.h"

namespace livemig {

class WorkPool;

class PeerServer {
 public:
  using ControlHandler = std::function<std::string(std::string_view request)>;
  using PeerHandler = std::function<void(const std::shared_ptr<PeerLink>&)>;
  // Where refused connections are reported (a wrong key, TLS that does not
  // match): a line for the operator's log.
  using Logger = std::function<void(const std::string&)>;

  // Binds and listens on `where`. Errors name the address.
  static Result<std::unique_ptr<PeerServer>> bind(const HostPort& where);
  ~PeerServer();

  // The port actually bound (useful with port 0).
  uint16_t port() const { return port_; }

  // Starts accepting on `io`. CONTROL requests run on `control_pool` (they
  // may wait for the peer, whose frames arrive on io's thread); when it is
  // full the request gets ERROR(Busy).
  void start(boost::asio::io_context& io, Secret secret, PeerLink::Options options, PeerHandler on_peer,
             ControlHandler on_control, WorkPool* control_pool, Logger log);

  struct Impl;  // the acceptor and handlers, shared with the accept loop

 private:
  PeerServer(int fd, uint16_t port) : fd_(fd), port_(port) {}
  int fd_;
  uint16_t port_;
  std::shared_ptr<Impl> impl_;
};

}  // namespace livemig
