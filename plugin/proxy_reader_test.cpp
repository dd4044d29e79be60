#include "plugin/proxy_reader.h"

#include <cstring>
#include <future>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/support/link_pair.h"

using namespace livemig;
using namespace std::chrono_literals;

namespace {

Secret key() { return Secret::from_bytes("0123456789abcdef-proxy").value(); }

// The byte at image offset o: a pattern a reader can check.
uint8_t pattern(uint64_t o) { return static_cast<uint8_t>((o * 7 + (o >> 12)) & 0xff); }

// The authoritative side: answers each PULL as `answer` says.
void serve(LinkPair& pair, std::function<void(PeerLink&, uint64_t, const PullPayload&)> answer,
           std::vector<PullPayload>* seen = nullptr, std::mutex* mu = nullptr) {
  pair.server->start(
      [=](const std::shared_ptr<PeerLink>& l, PeerLink::Frame& f) {
        if (auto* p = std::get_if<PullPayload>(&f.message)) {
          if (seen) {
            std::lock_guard lock(*mu);
            seen->push_back(*p);
          }
          answer(*l, f.header.request_id, *p);
        }
      },
      [](auto&, auto&) {});
}

void answer_with_pattern(PeerLink& l, uint64_t id, const PullPayload& p) {
  std::string bytes(p.length, '\0');
  for (uint64_t i = 0; i < p.length; ++i) bytes[i] = static_cast<char>(pattern(p.offset + i));
  // In frames of 1 MiB, as block_sender does.
  for (uint64_t off = 0; off < p.length; off += 1 << 20) {
    uint64_t n = std::min<uint64_t>(1 << 20, p.length - off);
    l.send_data(DataPayload{p.offset + off, static_cast<uint32_t>(n), 0,
                            {reinterpret_cast<const uint8_t*>(bytes.data() + off), n}},
                id);
  }
}

}  // namespace

TEST_CASE("proxy reader: a read larger than a frame is split into pulls within the limit and arrives whole") {
  LinkPair pair(key(), key());
  std::vector<PullPayload> seen;
  std::mutex mu;
  serve(pair, answer_with_pattern, &seen, &mu);
  ProxyReader reader(10s);
  pair.client->start([&](auto&, PeerLink::Frame& f) {
    if (auto* d = std::get_if<DataPayload>(&f.message)) reader.on_data(f.header.request_id, *d);
  }, [&](auto&, auto& why) { reader.fail_all(why); });
  const uint64_t size = 40u << 20, offset = 12345;  // over kMaxDataLength, unaligned
  std::vector<uint8_t> buf(size);
  REQUIRE(reader.read(*pair.client, buf.data(), size, offset) == 0);
  for (uint64_t i = 0; i < size; i += 4093) REQUIRE(buf[i] == pattern(offset + i));
  std::lock_guard lock(mu);
  CHECK(seen.size() == (size + ProxyReader::kProxyChunk - 1) / ProxyReader::kProxyChunk);
  for (const PullPayload& p : seen) {
    CHECK(p.length <= kMaxDataLength);
    CHECK(p.priority != 0);
  }
  CHECK(reader.pending() == 0);
}

TEST_CASE("proxy reader: an ERROR for one piece fails the read at once with its errno") {
  LinkPair pair(key(), key());
  serve(pair, [](PeerLink& l, uint64_t id, const PullPayload&) {
    l.send(make_error_payload(protocol_error(ErrorCode::NoSpace, "disk full")), id);
  });
  ProxyReader reader(30s);
  pair.client->start([&](auto&, PeerLink::Frame& f) {
    if (auto* e = std::get_if<ErrorPayload>(&f.message)) reader.on_error(f.header.request_id, status_from_error(*e));
  }, [&](auto&, auto& why) { reader.fail_all(why); });
  std::vector<uint8_t> buf(4096);
  auto t0 = std::chrono::steady_clock::now();
  CHECK(reader.read(*pair.client, buf.data(), buf.size(), 0) == -1);
  CHECK(errno == ENOSPC);
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
}

TEST_CASE("proxy reader: replies outside the pull or compressed fail the read and are not copied") {
  LinkPair pair(key(), key());
  serve(pair, [](PeerLink& l, uint64_t id, const PullPayload& p) {
    static const std::string junk(8192, 'J');
    // 8 KiB for a 4 KiB pull: outside what was asked.
    l.send_data(DataPayload{p.offset, 8192, 0, {reinterpret_cast<const uint8_t*>(junk.data()), 8192}}, id);
  });
  ProxyReader reader(10s);
  pair.client->start([&](auto&, PeerLink::Frame& f) {
    if (auto* d = std::get_if<DataPayload>(&f.message)) reader.on_data(f.header.request_id, *d);
  }, [&](auto&, auto& why) { reader.fail_all(why); });
  std::vector<uint8_t> buf(4096 + 16, 0);
  CHECK(reader.read(*pair.client, buf.data(), 4096, 0) == -1);
  CHECK(errno == EPROTO);
  CHECK(buf[4096] == 0);  // nothing written past the buffer

  // A COMPRESSED reply with fewer bytes than its length: refused, not copied.
  uint8_t small[16] = {1};
  DataPayload compressed{0, 4096, kFlagCompressed, {small, sizeof small}};
  CHECK(reader.on_data(999, compressed) == false);  // no such read: ignored
}

TEST_CASE("proxy reader: a closed link fails a waiting read at once") {
  LinkPair pair(key(), key());
  serve(pair, [](PeerLink&, uint64_t, const PullPayload&) {});  // never answers
  ProxyReader reader(30s);
  pair.client->start([](auto&, auto&) {}, [&](auto&, auto& why) { reader.fail_all(why); });
  std::vector<uint8_t> buf(4096);
  auto read = std::async(std::launch::async, [&] { return reader.read(*pair.client, buf.data(), buf.size(), 0); });
  std::this_thread::sleep_for(100ms);
  pair.client->close(Status::error("cut", EPIPE));
  REQUIRE(read.wait_for(5s) == std::future_status::ready);
  CHECK(read.get() == -1);
}
