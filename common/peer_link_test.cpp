#include "common/peer_link.h"

#include "tests/support/link_pair.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <future>
#include <thread>

#include <fmt/format.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>

using namespace livemig;
namespace asio = boost::asio;
using asio::ip::tcp;

namespace {

Secret secret(const char* s) { return Secret::from_bytes(s).value(); }

}  // namespace

TEST_CASE("a priority frame overtakes queued background frames, waiting for at most one in flight", "[peer_link]") {
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  REQUIRE(pair.server);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint64_t> order;  // request ids in arrival order
  pair.server->start(
      [&](const std::shared_ptr<PeerLink>&, PeerLink::Frame& f) {
        std::lock_guard lock(mu);
        order.push_back(f.header.request_id);
        cv.notify_all();
      },
      [](const std::shared_ptr<PeerLink>&, const Status&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});

  // 64 background frames of 256 KiB queued at once, then one demand frame.
  // The io thread is held while they are queued, so that the writer finds
  // them all queued, as it does when pulls pile up behind a busy link.
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  asio::post(pair.io, [released] { released.wait(); });
  std::string bytes(256 * 1024, 'b');
  const int kBackground = 64;
  for (int i = 1; i <= kBackground; ++i) {
    DataPayload d{uint64_t(i) * bytes.size(), uint32_t(bytes.size()), 0,
                  {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}};
    pair.client->send_data(d, i, false);
  }
  pair.client->send(PullPayload{0, 4096, 1}, 1000, true);
  release.set_value();

  std::unique_lock lock(mu);
  REQUIRE(cv.wait_for(lock, std::chrono::seconds(20), [&] { return order.size() == kBackground + 1; }));
  auto pos = std::find(order.begin(), order.end(), 1000) - order.begin();
  // The demand frame goes out first (the writer was idle when it was
  // queued): it waits for no queued background frame. A writer busy with a
  // frame would make it wait for that one frame only.
  CHECK(pos <= 1);
}

TEST_CASE("a call gets the reply with its request id, and an ERROR reply becomes its status", "[peer_link]") {
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  pair.server->start(
      [](const std::shared_ptr<PeerLink>& l, PeerLink::Frame& f) {
        auto* c = std::get_if<ControlPayload>(&f.message);
        if (c && c->json == "fail")
          l->send(make_error_payload(protocol_error(ErrorCode::Busy, "busy now")), f.header.request_id);
        else if (c)
          l->send(ControlReplyPayload{"re:" + c->json}, f.header.request_id);
      },
      [](auto&, auto&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});
  auto ok = pair.client->call(ControlPayload{"hello"}, std::chrono::seconds(5));
  REQUIRE(ok.is_ok());
  CHECK(std::get<ControlReplyPayload>(ok->message).json == "re:hello");
  auto bad = pair.client->call(ControlPayload{"fail"}, std::chrono::seconds(5));
  REQUIRE_FALSE(bad.is_ok());
  CHECK(bad.status().message().find("busy now") != std::string::npos);
  CHECK(error_code_of(bad.status()) == ErrorCode::Busy);
}

TEST_CASE("pipelined calls get their replies in the requests' order, whatever order they arrive in", "[peer_link]") {
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  // The server answers the requests it holds in reverse once it has all 5;
  // "fail" with an ERROR, which stays a frame (call_all is call_for_reply).
  std::vector<std::pair<uint64_t, std::string>> held;
  pair.server->start(
      [&held](const std::shared_ptr<PeerLink>& l, PeerLink::Frame& f) {
        auto* c = std::get_if<ControlPayload>(&f.message);
        if (!c) return;
        held.emplace_back(f.header.request_id, c->json);
        if (held.size() < 5) return;
        for (auto it = held.rbegin(); it != held.rend(); ++it) {
          if (it->second == "fail")
            l->send(make_error_payload(protocol_error(ErrorCode::Busy, "busy now")), it->first);
          else
            l->send(ControlReplyPayload{"re:" + it->second}, it->first);
        }
      },
      [](auto&, auto&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});
  std::vector<ControlPayload> requests = {{"a"}, {"b"}, {"fail"}, {"d"}, {"e"}};
  auto replies = pair.client->call_all(requests, std::chrono::seconds(5));
  REQUIRE(replies.size() == 5);
  for (size_t i : {0, 1, 3, 4}) {
    REQUIRE(replies[i].is_ok());
    CHECK(std::get<ControlReplyPayload>(replies[i]->message).json == "re:" + requests[i].json);
  }
  REQUIRE(replies[2].is_ok());
  CHECK(std::holds_alternative<ErrorPayload>(replies[2]->message));
  // A closed link fails every call at once.
  pair.client->close(Status::error("test closes it", EPIPE));
  auto closed = pair.client->call_all(requests, std::chrono::seconds(5));
  REQUIRE(closed.size() == 5);
  for (auto& r : closed) CHECK_FALSE(r.is_ok());
}

TEST_CASE("call_async runs its handler on the io thread with the reply, or once with the link's failure", "[peer_link]") {
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  // The server answers "a" and holds "hang" for ever.
  pair.server->start(
      [](const std::shared_ptr<PeerLink>& l, PeerLink::Frame& f) {
        auto* c = std::get_if<ControlPayload>(&f.message);
        if (c && c->json != "hang") l->send(ControlReplyPayload{"re:" + c->json}, f.header.request_id);
      },
      [](auto&, auto&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});
  std::promise<std::string> answered, failed;
  std::promise<bool> answered_on_io;
  const auto io_thread = pair.thread.get_id();
  pair.client->call_async(ControlPayload{"hang"}, [&](Result<PeerLink::Frame> r) {
    failed.set_value(r ? "a reply" : r.status().message());
  });
  pair.client->call_async(ControlPayload{"a"}, [&](Result<PeerLink::Frame> r) {
    answered_on_io.set_value(std::this_thread::get_id() == io_thread);
    answered.set_value(r ? std::get<ControlReplyPayload>(r->message).json : r.status().message());
  });
  // The held call does not delay the answered one.
  auto a = answered.get_future();
  REQUIRE(a.wait_for(std::chrono::seconds(5)) == std::future_status::ready);
  CHECK(a.get() == "re:a");
  CHECK(answered_on_io.get_future().get());
  auto f = failed.get_future();
  CHECK(f.wait_for(std::chrono::milliseconds(200)) == std::future_status::timeout);
  pair.client->close(Status::error("the caller gives up", ETIMEDOUT));
  REQUIRE(f.wait_for(std::chrono::seconds(5)) == std::future_status::ready);
  CHECK(f.get().find("the caller gives up") != std::string::npos);
  // On a closed link the handler still runs, once, with the failure.
  std::promise<std::string> late;
  pair.client->call_async(ControlPayload{"a"}, [&](Result<PeerLink::Frame> r) {
    late.set_value(r ? "a reply" : r.status().message());
  });
  auto l = late.get_future();
  REQUIRE(l.wait_for(std::chrono::seconds(5)) == std::future_status::ready);
  CHECK(l.get().find("closed") != std::string::npos);
}

TEST_CASE("a wrong secret fails the connection on the client side", "[peer_link]") {
  Status st;
  LinkPair pair(secret("0123456789abcdef-key"), secret("another-secret-0123456"), &st);
  CHECK_FALSE(pair.client);
  CHECK_FALSE(st.is_ok());
  CHECK(st.message().find("authentication") != std::string::npos);
}

// TlsStream (common/tls_stream.h): one SSL object read and written at once
// by the link's reader and writer, with the socket buffers full both ways,
// so that writes stop half way (partial writes) and reads wait mid-record.
TEST_CASE("over TLS, 1 MiB frames sent both ways at once arrive whole and in order", "[peer_link][tls]") {
  TempDir dir;
  const std::string psk = dir / "keys.psk";
  std::ofstream(psk) << "unit:" << std::string(64, 'a') << "\n";
  ::chmod(psk.c_str(), 0600);
  TlsSettings settings;
  settings.psk_file = psk;
  PeerLink::Options options;
  options.tls = TlsContext::make(settings).value();
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"), nullptr, options);
  REQUIRE(pair.client);
  REQUIRE(pair.server);
  REQUIRE(pair.client->tls());
  REQUIRE(pair.server->tls());

  constexpr int kFrames = 32;
  constexpr size_t kBytes = 1 << 20;
  auto pattern = [](int frame, int side) {
    std::vector<uint8_t> v(kBytes);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(i * 7 + frame * 13 + side);
    return v;
  };
  std::mutex mu;
  std::condition_variable cv;
  int received[2] = {0, 0};
  std::vector<std::string> errors;
  auto receiver = [&](int side) {
    return [&, side](const std::shared_ptr<PeerLink>&, PeerLink::Frame& f) {
      auto* d = std::get_if<DataPayload>(&f.message);
      std::lock_guard lock(mu);
      const int n = received[side]++;
      std::vector<uint8_t> want = pattern(n, 1 - side);  // sent by the other side
      if (!d || d->offset != uint64_t(n) * kBytes || !std::equal(d->bytes.begin(), d->bytes.end(), want.begin(), want.end()))
        errors.push_back(fmt::format("side {} frame {}: wrong frame or bytes", side, n));
      cv.notify_all();
    };
  };
  pair.client->start(receiver(0), [](auto&, auto&) {});
  pair.server->start(receiver(1), [](auto&, auto&) {});
  std::vector<std::vector<uint8_t>> out[2];
  for (int side : {0, 1})
    for (int i = 0; i < kFrames; ++i) out[side].push_back(pattern(i, side));
  std::thread other([&] {
    for (int i = 0; i < kFrames; ++i)
      pair.server->send_data(DataPayload{uint64_t(i) * kBytes, uint32_t(kBytes), 0, out[1][i]}, i + 1, false);
  });
  for (int i = 0; i < kFrames; ++i)
    pair.client->send_data(DataPayload{uint64_t(i) * kBytes, uint32_t(kBytes), 0, out[0][i]}, i + 1, false);
  other.join();
  std::unique_lock lock(mu);
  REQUIRE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return received[0] == kFrames && received[1] == kFrames; }));
  CHECK(errors.empty());
  for (auto& e : errors) UNSCOPED_INFO(e);
}

// Issue #13: a connection that closed before its first byte held its
// handshake slot until the deadline (the server never saw the EOF), so
// a stranger's burst of closed connections locked real peers out.
TEST_CASE("a client that closes before its first byte ends the server's handshake at once", "[peer_link]") {
  asio::io_context io;
  tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  PeerLink::Options options;
  options.read_timeout = std::chrono::seconds(30);  // the deadline must not be what ends it
  std::promise<Status> ended;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto sock = co_await acceptor.async_accept(asio::use_awaitable);
        auto link = co_await PeerLink::accept(std::move(sock), secret("0123456789abcdef-key"), options);
        ended.set_value(link ? Status::ok() : link.status());
      },
      asio::detached);
  std::thread io_thread([&] { io.run(); });
  {
    asio::io_context client_io;
    tcp::socket client(client_io);
    client.connect(acceptor.local_endpoint());
    // Let the server start waiting for the first bytes before the close.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  auto result = ended.get_future();
  bool done = result.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  if (!done) io.stop();  // let the thread end: the test has failed
  io_thread.join();
  REQUIRE(done);
  Status s = result.get();
  CHECK_FALSE(s.is_ok());
  CHECK(s.message().find("closed") != std::string::npos);
}

TEST_CASE("host:port parsing names what is wrong", "[peer_link]") {
  CHECK(parse_host_port("10.0.0.1:10809").value().port == 10809);
  CHECK(parse_host_port("[::1]:7").value().host == "::1");
  CHECK_FALSE(parse_host_port("nohost").is_ok());
  CHECK_FALSE(parse_host_port("h:0").is_ok());
  CHECK(parse_host_port("h:0", true).is_ok());
  CHECK_FALSE(parse_host_port("h:70000").is_ok());
  CHECK(is_loopback_host("127.0.0.5"));
  CHECK(is_loopback_host("localhost"));
  CHECK_FALSE(is_loopback_host("0.0.0.0"));
}

TEST_CASE("DATA frames built in reused buffers arrive exactly as sent, whatever the order of their sizes",
          "[peer_link]") {
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  REQUIRE(pair.server);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<uint64_t, std::string>> got;  // (offset, bytes) in arrival order
  pair.server->start(
      [&](const std::shared_ptr<PeerLink>&, PeerLink::Frame& f) {
        auto* d = std::get_if<DataPayload>(&f.message);
        if (!d) return;
        std::lock_guard lock(mu);
        got.emplace_back(d->offset, std::string(reinterpret_cast<const char*>(d->bytes.data()), d->bytes.size()));
        cv.notify_all();
      },
      [](const std::shared_ptr<PeerLink>&, const Status&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});

  // Large and smaller frames alternate, so that a buffer kept from a large
  // frame builds a smaller one: a stale tail or a wrong length would show.
  const std::vector<size_t> sizes = {256 << 10, 64 << 10, 200 << 10, 4096, 256 << 10, 65 << 10, 128 << 10};
  std::vector<std::string> sent;
  for (int round = 0; round < 20; ++round)
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::string bytes(sizes[i], '\0');
      for (size_t k = 0; k < bytes.size(); ++k) bytes[k] = static_cast<char>((k * 31 + sent.size() * 7) & 0xff);
      DataPayload d{uint64_t(sent.size()) << 20, uint32_t(bytes.size()), 0,
                    {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}};
      pair.client->send_data(d, 0, false);
      sent.push_back(std::move(bytes));
      if (sent.size() % 5 == 0) pair.client->wait_queue_below(1, std::chrono::seconds(10));  // let buffers return
    }

  std::unique_lock lock(mu);
  REQUIRE(cv.wait_for(lock, std::chrono::seconds(20), [&] { return got.size() == sent.size(); }));
  for (size_t i = 0; i < sent.size(); ++i) {
    CHECK(got[i].first == uint64_t(i) << 20);
    CHECK(got[i].second == sent[i]);
  }
}

TEST_CASE("threads waiting for the send queue to drain each wake at their own limit", "[peer_link]") {
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  REQUIRE(pair.server);
  // A slow reader (5 ms a frame, about 50 MiB/s), so that the sender's
  // queue drains for a second or more once the socket buffers are full.
  std::atomic<size_t> frames_read{0};
  pair.server->start(
      [&](const std::shared_ptr<PeerLink>&, PeerLink::Frame& f) {
        if (!std::holds_alternative<DataPayload>(f.message)) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        frames_read++;
      },
      [](const std::shared_ptr<PeerLink>&, const Status&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});

  constexpr size_t kFrame = 256 << 10, kFrames = 192, kHigh = 24u << 20;
  const std::string bytes(kFrame, 'x');
  for (size_t i = 0; i < kFrames; ++i)
    pair.client->send_data(DataPayload{i * kFrame, uint32_t(kFrame), 0,
                                       {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}},
                           0, false);
  REQUIRE(pair.client->queued_bytes() >= kHigh + (4u << 20));

  // One waits for the queue to be nearly empty, one only for it to fall
  // below kHigh: the second must wake at its own limit, while the first
  // still waits (each would also wake, late, at its timeout).
  auto empty = std::async(std::launch::async, [&] { return pair.client->wait_queue_below(1, std::chrono::seconds(30)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const bool high = pair.client->wait_queue_below(kHigh, std::chrono::seconds(30));
  const size_t queued_at_high = pair.client->queued_bytes();
  CHECK(high);
  CHECK(queued_at_high < kHigh);
  CHECK(queued_at_high >= (2u << 20));  // the drain went on: it did not wait for the other's limit
  CHECK(empty.wait_for(std::chrono::seconds(0)) == std::future_status::timeout);
  CHECK(empty.get());
  CHECK(pair.client->queued_bytes() == 0);
}

TEST_CASE("a received DATA frame's block data starts on a page boundary", "[peer_link]") {
  // So the destination writes it with O_DIRECT as it is (no aligned copy).
  LinkPair pair(secret("0123456789abcdef-key"), secret("0123456789abcdef-key"));
  REQUIRE(pair.client);
  REQUIRE(pair.server);
  std::promise<std::pair<uintptr_t, std::string>> got;
  std::atomic<bool> first{true};
  pair.server->start(
      [&](const std::shared_ptr<PeerLink>&, PeerLink::Frame& f) {
        auto* d = std::get_if<DataPayload>(&f.message);
        if (!d || !first.exchange(false)) return;
        got.set_value({reinterpret_cast<uintptr_t>(d->bytes.data()),
                       std::string(reinterpret_cast<const char*>(d->bytes.data()), d->bytes.size())});
      },
      [](const std::shared_ptr<PeerLink>&, const Status&) {});
  pair.client->start([](auto&, auto&) {}, [](auto&, auto&) {});
  std::string bytes(64 << 10, '\0');
  for (size_t k = 0; k < bytes.size(); ++k) bytes[k] = static_cast<char>(k * 13 + 5);
  pair.client->send_data(DataPayload{1 << 20, uint32_t(bytes.size()), 0,
                                     {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}},
                         0, false);
  auto arrived = got.get_future();
  REQUIRE(arrived.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  auto [address, data] = arrived.get();
  CHECK(address % static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE)) == 0);
  CHECK(data == bytes);
}
