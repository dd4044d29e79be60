// Test support: a connected, authenticated pair of PeerLinks over loopback
// TCP, on one io thread of their own.
#pragma once

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <future>
#include <memory>
#include <thread>

#include "common/peer_link.h"

namespace livemig {

// A pre-shared key both ends of a test's links use.
inline Secret test_secret() { return Secret::from_bytes("0123456789abcdef-test-key").value(); }

// A connected pair of PeerLinks over loopback TCP, on one io thread.
struct LinkPair {
  boost::asio::io_context io;
  std::unique_ptr<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::thread thread;
  std::shared_ptr<PeerLink> client, server;
  PeerLink::Options options;  // outlives the accept coroutine, which holds a reference
  std::unique_ptr<boost::asio::ip::tcp::acceptor> acceptor;

  // `link_options` for both ends (e.g. with TLS).
  explicit LinkPair(const Secret& server_secret, const Secret& client_secret, Status* connect_status = nullptr,
                    PeerLink::Options link_options = {})
      : options(std::move(link_options)) {
    work =
        std::make_unique<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>>(io.get_executor());
    thread = std::thread([this] { io.run(); });
    acceptor = std::make_unique<boost::asio::ip::tcp::acceptor>(
        io, boost::asio::ip::tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    uint16_t port = acceptor->local_endpoint().port();
    std::promise<std::shared_ptr<PeerLink>> accepted;
    boost::asio::co_spawn(
        io,
        [&]() -> boost::asio::awaitable<void> {
          auto sock = co_await acceptor->async_accept(boost::asio::use_awaitable);
          auto link = co_await PeerLink::accept(std::move(sock), server_secret, options);
          accepted.set_value(link ? *link : nullptr);
        },
        boost::asio::detached);
    auto c = PeerLink::connect(io, HostPort{"127.0.0.1", port}, client_secret, kPurposePeer, options,
                               std::chrono::seconds(5));
    if (connect_status) *connect_status = c ? Status::ok() : c.status();
    client = c ? *c : nullptr;
    server = accepted.get_future().get();
  }
  ~LinkPair() {
    if (client) client->close(Status::error("test over"));
    if (server) server->close(Status::error("test over"));
    work.reset();
    io.stop();
    thread.join();
    acceptor.reset();
  }
};

}  // namespace livemig
