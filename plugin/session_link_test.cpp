#include "plugin/session_link.h"

#include <future>

#include <catch2/catch.hpp>

#include "tests/support/link_pair.h"

using namespace livemig;
using namespace std::chrono_literals;

TEST_CASE("session link: only the adopted link is the session's; a resumed one replaces and closes it") {
  LinkPair first(test_secret(), test_secret()), second(test_secret(), test_secret());
  SessionLink link;
  CHECK_FALSE(link.owns(first.client.get()));
  link.adopt(first.client);
  CHECK(link.owns(first.client.get()));
  CHECK_FALSE(link.owns(second.client.get()));
  link.adopt(second.client);
  CHECK(link.owns(second.client.get()));
  CHECK(first.client->closed());  // the replaced link is closed
  CHECK_FALSE(link.drop(first.client));  // a stale close does not drop the current link
  CHECK(link.get() == second.client);
  CHECK(link.drop(second.client));
  CHECK(link.get() == nullptr);
}

TEST_CASE("session link: wait_up returns when a link is adopted, or empty after the timeout") {
  LinkPair pair(test_secret(), test_secret());
  SessionLink link;
  std::atomic<bool> stopping{false};
  auto t0 = std::chrono::steady_clock::now();
  CHECK(link.wait_up(50ms, stopping) == nullptr);
  CHECK(std::chrono::steady_clock::now() - t0 >= 50ms);
  auto waiter = std::async(std::launch::async, [&] { return link.wait_up(5s, stopping); });
  std::this_thread::sleep_for(50ms);
  link.adopt(pair.client);
  CHECK(waiter.get() == pair.client);
}

TEST_CASE("session link: expect_reply tells an explicit refusal from silence") {
  Result<PeerLink::Frame> silence = Status::error("no reply within 60000 ms", ETIMEDOUT);
  CHECK_FALSE(is_refusal(silence));
  CHECK(expect_reply<HandoverAckPayload>(silence).status().errno_value() == ETIMEDOUT);
  PeerLink::Frame refusal;
  refusal.message = make_error_payload(protocol_error(ErrorCode::NoSpace, "disk full"));
  Result<PeerLink::Frame> refused = refusal;
  CHECK(is_refusal(refused));
  CHECK(error_code_of(expect_reply<HandoverAckPayload>(refused).status()) == ErrorCode::NoSpace);
  PeerLink::Frame ack;
  ack.message = HandoverAckPayload{4};
  auto ok = expect_reply<HandoverAckPayload>(Result<PeerLink::Frame>(ack));
  REQUIRE(ok);
  CHECK(ok->generation == 4);
}

TEST_CASE("session link: wire bytes count every link the session had, replaced and dropped ones included") {
  LinkPair first(test_secret(), test_secret()), second(test_secret(), test_secret());
  for (LinkPair* p : {&first, &second})
    p->server->start([](auto&, auto&) {}, [](auto&, auto&) {});
  SessionLink link;
  auto wire = [&] {
    nlohmann::json j;
    link.describe(j);
    return j["wire_bytes"].get<uint64_t>();
  };
  CHECK(wire() == 0);
  link.adopt(first.client);
  first.client->send(ProgressPayload{std::string(1000, 'x')}, 0);
  REQUIRE(first.client->wait_queue_below(1, 5s));
  const uint64_t first_bytes = first.client->bytes_sent() + first.client->bytes_received();
  CHECK(first_bytes > 1000);
  CHECK(wire() == first_bytes);
  link.adopt(second.client);  // a resumed link replaces the first
  second.client->send(ProgressPayload{std::string(500, 'y')}, 0);
  REQUIRE(second.client->wait_queue_below(1, 5s));
  const uint64_t second_bytes = second.client->bytes_sent() + second.client->bytes_received();
  CHECK(wire() == first_bytes + second_bytes);
  CHECK(link.drop(second.client));
  CHECK(wire() == first_bytes + second_bytes);
}
