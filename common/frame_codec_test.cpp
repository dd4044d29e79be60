#include "common/frame_codec.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/byte_order.h"
#include "common/crc32c.h"
#include "common/protocol_format.h"
#include "tests/support/strings.h"

using namespace livemig;

namespace {

// The name of a failed Status's error code ("BadFrame"), "ok" if it is ok.
std::string code_of(const Status& s) {
  return s.is_ok() ? "ok" : error_code_name(static_cast<uint32_t>(error_code_of(s)));
}

// The same for a Result: "ok" if it holds a value.
template <typename T>
std::string code_of(const Result<T>& r) {
  return r.is_ok() ? "ok" : code_of(r.status());
}

std::span<const uint8_t> bytes_of(const std::string& s) { return byte_span(s); }

const std::vector<uint8_t>& block_bytes() {
  static const std::vector<uint8_t> v = [] {
    std::vector<uint8_t> b(100);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 7 + 3);
    return b;
  }();
  return v;
}

NonceBytes counting_array(uint8_t first) {
  NonceBytes a;
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(first + i);
  return a;
}

// One or more valid payloads of every frame type, with non-default fields.
std::vector<AnyPayload> samples() {
  std::vector<AnyPayload> v;
  v.push_back(HelloPayload{1, counting_array(1), "source-host", "peer"});
  v.push_back(HelloPayload{2, counting_array(50), "dest", "control"});
  v.push_back(AuthPayload{counting_array(200)});
  v.push_back(AuthOkPayload{counting_array(100)});
  v.push_back(StartPayload{"pre-copy", R"({"rate":"100M"})", 1ull << 40, 65536, 1 << 20, "mig-42"});
  auto& b = block_bytes();
  v.push_back(DataPayload{1ull << 33, static_cast<uint32_t>(b.size()), 0, {b.data(), b.size()}});
  v.push_back(DataPayload{4096, 1 << 20, kFlagZero, {}});
  v.push_back(DataPayload{8192, 65536, kFlagCompressed, {b.data(), 10}});
  v.push_back(DataPayload{8192, 65536, kFlagBase, {b.data(), 96}});
  v.push_back(AckPayload{77, 1ull << 35, 65536});
  v.push_back(HandoverPayload{3, 600, {{0, 100, 7}, {100, 400, 0}, {1000, 100, 0xFFFFFFFF}}});
  v.push_back(HandoverPayload{1, 0, {}});
  v.push_back(PullPayload{1ull << 30, 4096, 1});
  v.push_back(PullPayload{0, 65536, 0});
  v.push_back(CancelPullPayload{1ull << 30, 4096});
  v.push_back(ProgressPayload{R"({"sent":123,"remaining":456})"});
  v.push_back(HeartbeatPayload{9, 1'700'000'000'000'000'000ull});
  v.push_back(ErrorPayload{static_cast<uint32_t>(ErrorCode::SizeMismatch), "image sizes differ"});
  v.push_back(DonePayload{1ull << 40, 1ull << 24});
  v.push_back(ControlPayload{R"({"op":"status"})"});
  v.push_back(ControlReplyPayload{R"({"ok":true})"});
  v.push_back(HandoverAckPayload{7});
  v.push_back(PushAckPayload{1ull << 40});
  v.push_back(StartOkPayload{R"({"phase":"PreCopy","resync":false})"});
  v.push_back(SumsPayload{1ull << 30, 1 << 20, 1024});
  v.push_back(SumsReplyPayload{1ull << 30, 1 << 20, {1, 2, 0xFFFFFFFFFFFFFFFFull}});
  v.push_back(SumsReplyPayload{0, 4096, {}});
  v.push_back(ForwardPayload{ForwardOp::Write, kForwardFua, 1ull << 33, static_cast<uint32_t>(b.size()),
                             {b.data(), b.size()}});
  v.push_back(ForwardPayload{ForwardOp::Zero, kForwardMayTrim, 4096, 1 << 20, {}});
  v.push_back(ForwardPayload{ForwardOp::Trim, 0, 0, 512, {}});
  v.push_back(ForwardPayload{ForwardOp::Flush, 0, 0, 0, {}});
  v.push_back(ForwardReplyPayload{0});
  v.push_back(ForwardReplyPayload{28});  // ENOSPC
  return v;
}

std::string payload_bytes(const AnyPayload& p) {
  return std::visit([](const auto& v) { return encode_payload(v); }, p);
}

// Decodes `bytes` as the payload type that `like` holds.
Status decode_like(const AnyPayload& like, std::span<const uint8_t> bytes) {
  return std::visit(
      [&](const auto& v) -> Status {
        using T = std::decay_t<decltype(v)>;
        auto r = decode_payload<T>(bytes);
        return r ? Status::ok() : r.status();
      },
      like);
}

// A frame with a valid header (length and CRC right) around arbitrary bytes,
// even bytes too long for the type (which encode_frame does not allow).
std::string frame_around(FrameType type, uint32_t flags, std::string_view payload) {
  FrameHeader h;
  h.type = type;
  h.flags = flags;
  h.request_id = 1;
  h.payload_length = static_cast<uint32_t>(payload.size());
  h.payload_crc32c = crc32c(payload.data(), payload.size());
  std::string frame(kFrameHeaderSize, '\0');
  encode_header(h, reinterpret_cast<uint8_t*>(frame.data()));
  return frame.append(payload);
}

Result<FrameHeader> header_of(const std::string& frame, uint32_t max = kMaxFramePayload) {
  REQUIRE(frame.size() >= kFrameHeaderSize);
  return decode_header(reinterpret_cast<const uint8_t*>(frame.data()), max);
}

// Decodes a whole frame: header, then payload.
Result<AnyPayload> decode_frame(const std::string& frame, uint32_t max = kMaxFramePayload) {
  auto h = header_of(frame, max);
  if (!h) return h.status();
  return decode_message(*h, bytes_of(frame).subspan(kFrameHeaderSize));
}

}  // namespace

TEST_CASE("every payload type survives a round trip through a whole frame", "[frame]") {
  bool seen[kMaxFrameType + 1] = {};
  uint64_t request_id = 1000;
  for (const AnyPayload& p : samples()) {
    FrameType type = frame_type_of(p);
    INFO(frame_type_name(type));
    seen[static_cast<size_t>(type)] = true;
    auto frame = std::visit([&](const auto& v) { return encode_message(v, request_id); }, p);
    REQUIRE(frame.is_ok());
    auto h = header_of(*frame);
    REQUIRE(h.is_ok());
    CHECK(h->type == type);
    CHECK(h->request_id == request_id);
    CHECK(h->payload_length == frame->size() - kFrameHeaderSize);
    auto decoded = decode_message(*h, bytes_of(*frame).subspan(kFrameHeaderSize));
    REQUIRE(decoded.is_ok());
    CHECK(*decoded == p);
    ++request_id;
  }
  for (uint16_t t = kMinFrameType; t <= kMaxFrameType; ++t) {
    INFO("frame type " << t);
    CHECK(seen[t]);
  }
}

TEST_CASE("every payload type survives a round trip through its payload bytes", "[frame]") {
  for (const AnyPayload& p : samples()) {
    INFO(frame_type_name(frame_type_of(p)));
    std::visit(
        [](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          std::string bytes = encode_payload(v);
          auto back = decode_payload<T>(bytes_of(bytes));
          REQUIRE(back.is_ok());
          CHECK(*back == v);
          CHECK(validate_payload(v).is_ok());
        },
        p);
  }
}

TEST_CASE("a payload cut short at every byte is rejected as a bad frame", "[frame]") {
  for (const AnyPayload& p : samples()) {
    INFO(frame_type_name(frame_type_of(p)));
    std::string bytes = payload_bytes(p);
    // Compressed DATA bytes and a BASE note's checksums run to the end of the
    // payload, so only the frame's length and CRC (and zstd's framing, or the
    // receiver's count of blocks) can tell that they were cut.
    size_t cuts = bytes.size();
    if (auto* d = std::get_if<DataPayload>(&p); d && (d->flags & (kFlagCompressed | kFlagBase)))
      cuts = kDataHeaderSize + 1;
    for (size_t n = 0; n < cuts; ++n) {
      INFO("prefix of " << n << " of " << bytes.size() << " bytes");
      Status s = decode_like(p, bytes_of(bytes).first(n));
      REQUIRE_FALSE(s.is_ok());
      CHECK(code_of(s) == "BadFrame");
      // The same cut inside a frame whose header and CRC agree with it.
      auto frame = frame_around(frame_type_of(p), 0, bytes.substr(0, n));
      auto h = header_of(frame);
      REQUIRE(h.is_ok());
      auto d = decode_message(*h, bytes_of(frame).subspan(kFrameHeaderSize));
      CHECK_FALSE(d.is_ok());
    }
  }
}

TEST_CASE("a payload with a byte too many is rejected as a bad frame", "[frame]") {
  for (const AnyPayload& p : samples()) {
    INFO(frame_type_name(frame_type_of(p)));
    if (frame_type_of(p) == FrameType::Data) continue;  // DATA's tail is its data
    std::string bytes = payload_bytes(p) + "x";
    Status s = decode_like(p, bytes_of(bytes));
    CHECK(code_of(s) == "BadFrame");
    // FORWARD's tail is its data too: a byte more no longer matches its length.
    CHECK(contains(s.message(), frame_type_of(p) == FrameType::Forward ? "bytes" : "trailing"));
  }
}

TEST_CASE("a payload shorter than its header says is rejected before parsing", "[frame]") {
  std::string frame = *encode_message(HeartbeatPayload{1, 2}, 5);
  auto h = header_of(frame);
  REQUIRE(h.is_ok());
  Status s = verify_payload(*h, bytes_of(frame).subspan(kFrameHeaderSize, 15));
  CHECK(code_of(s) == "BadFrame");
  CHECK(contains(s.message(), "15 payload bytes"));
}

TEST_CASE("a frame header has the documented big-endian layout", "[frame]") {
  std::string frame =
      *encode_message(PullPayload{0x0102030405060708, 0x1000, 1}, 0x1122334455667788);
  const auto* b = reinterpret_cast<const uint8_t*>(frame.data());
  REQUIRE(frame.size() == kFrameHeaderSize + 13);
  const uint8_t header[24] = {'L',  'M',  'I',  'G',  0,    2,    0,    8,    0, 0, 0, 4,
                              0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0, 13};
  CHECK(std::memcmp(b, header, sizeof header) == 0);
  CHECK(load_be32(b + kHeaderCrcOffset) == crc32c(b + kFrameHeaderSize, 13));
  const uint8_t payload[13] = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x10, 0, 1};
  CHECK(std::memcmp(b + kFrameHeaderSize, payload, sizeof payload) == 0);
}

TEST_CASE("a header with the wrong magic is rejected as BadMagic", "[frame]") {
  std::string frame = *encode_message(HeartbeatPayload{}, 1);
  frame[0] = 'X';
  auto h = header_of(frame);
  REQUIRE_FALSE(h.is_ok());
  CHECK(code_of(h) == "BadMagic");
  CHECK(contains(h.status().message(), "magic 0x584d4947"));
}

TEST_CASE("a header with another protocol version is rejected as BadVersion", "[frame]") {
  std::string frame = *encode_message(HeartbeatPayload{}, 1);
  for (uint16_t v : {uint16_t{0}, uint16_t{1}, uint16_t{3}, uint16_t{0xFFFF}}) {
    store_be16(reinterpret_cast<uint8_t*>(frame.data()) + kHeaderVersionOffset, v);
    auto h = header_of(frame);
    REQUIRE_FALSE(h.is_ok());
    CHECK(code_of(h) == "BadVersion");
    CHECK(contains(h.status().message(), "version " + std::to_string(v)));
  }
}

TEST_CASE("a header with an unknown frame type is rejected as UnknownType", "[frame]") {
  std::string frame = *encode_message(HeartbeatPayload{}, 1);
  for (uint16_t t : {uint16_t{0}, uint16_t{kMaxFrameType + 1}, uint16_t{0xFFFF}}) {
    store_be16(reinterpret_cast<uint8_t*>(frame.data()) + kHeaderTypeOffset, t);
    auto h = header_of(frame);
    REQUIRE_FALSE(h.is_ok());
    CHECK(code_of(h) == "UnknownType");
    CHECK(contains(h.status().message(), "type " + std::to_string(t)));
  }
}

TEST_CASE("a payload whose CRC does not match is rejected as BadCrc", "[frame]") {
  std::string frame = *encode_message(ControlPayload{R"({"op":"status"})"}, 1);
  for (size_t i = kFrameHeaderSize; i < frame.size(); ++i) {
    std::string bad = frame;
    bad[i] ^= 0x01;
    auto d = decode_frame(bad);
    REQUIRE_FALSE(d.is_ok());
    CHECK(code_of(d) == "BadCrc");
  }
  std::string bad = frame;
  bad[kHeaderCrcOffset] ^= 0x80;
  CHECK(code_of(decode_frame(bad)) == "BadCrc");
}

TEST_CASE("a header flag the frame type does not allow is rejected", "[frame]") {
  std::string frame = *encode_message(HeartbeatPayload{}, 1);
  store_be32(reinterpret_cast<uint8_t*>(frame.data()) + kHeaderFlagsOffset, kFlagZero);
  CHECK(code_of(header_of(frame)) == "BadFrame");
  std::string data = *encode_message(DataPayload{0, 4096, kFlagZero, {}}, 1);
  store_be32(reinterpret_cast<uint8_t*>(data.data()) + kHeaderFlagsOffset, kFlagPriority);
  CHECK(code_of(header_of(data)) == "BadFrame");
}

TEST_CASE("header flags that disagree with the payload are rejected", "[frame]") {
  std::string payload = encode_payload(DataPayload{0, 4096, kFlagZero, {}});
  auto d = decode_frame(frame_around(FrameType::Data, 0, payload));
  REQUIRE_FALSE(d.is_ok());
  CHECK(code_of(d) == "BadFrame");
  CHECK(contains(d.status().message(), "flags"));
  std::string pull = encode_payload(PullPayload{0, 4096, 1});
  CHECK(code_of(decode_frame(frame_around(FrameType::Pull, 0, pull))) == "BadFrame");
  CHECK(decode_frame(frame_around(FrameType::Pull, kFlagPriority, pull)).is_ok());
}

TEST_CASE("a payload length over the type's limit is rejected from the header alone", "[frame]") {
  uint8_t h[kFrameHeaderSize];
  FrameHeader fh;
  fh.type = FrameType::Data;
  fh.payload_length = kDataHeaderSize + kMaxDataLength + 1;
  encode_header(fh, h);
  auto r = decode_header(h, kMaxFramePayload);
  REQUIRE_FALSE(r.is_ok());
  CHECK(code_of(r) == "TooLarge");
  CHECK(contains(r.status().message(), std::to_string(fh.payload_length)));

  fh.payload_length = kDataHeaderSize + kMaxDataLength;
  encode_header(fh, h);
  CHECK(decode_header(h, kMaxFramePayload).is_ok());

  fh.type = FrameType::Heartbeat;
  fh.payload_length = 17;
  encode_header(fh, h);
  CHECK(code_of(decode_header(h, kMaxFramePayload)) == "TooLarge");

  fh.type = FrameType::Handover;
  fh.payload_length = UINT32_MAX;
  encode_header(fh, h);
  CHECK(code_of(decode_header(h, kMaxFramePayload)) == "TooLarge");
  fh.payload_length = kMaxHandoverPayload;
  encode_header(fh, h);
  CHECK(decode_header(h, kMaxFramePayload).is_ok());
}

TEST_CASE("before authentication a frame larger than a HELLO is rejected", "[frame]") {
  uint8_t h[kFrameHeaderSize];
  FrameHeader fh;
  fh.type = FrameType::Start;
  fh.payload_length = kMaxPreAuthPayload + 1;
  encode_header(fh, h);
  auto r = decode_header(h, kMaxPreAuthPayload);
  REQUIRE_FALSE(r.is_ok());
  CHECK(code_of(r) == "TooLarge");
  CHECK(decode_header(h, kMaxFramePayload).is_ok());
  HelloPayload biggest{1, {}, std::string(kMaxStringLength, 'n'), "control"};
  biggest.purpose = "peer";
  std::string frame = *encode_message(biggest, 1);
  CHECK(decode_frame(frame, kMaxPreAuthPayload).is_ok());
}

TEST_CASE("a string length over its limit is rejected before allocation", "[frame]") {
  // peer_name claims 4 GiB - 1 while 3 bytes follow: no 4 GiB string is made.
  std::string p;
  ByteWriter w(&p);
  w.u16(1);
  w.array(NonceBytes{});
  w.u32(UINT32_MAX);
  w.bytes("abc", 3);
  auto r = decode_payload<HelloPayload>(bytes_of(p));
  REQUIRE_FALSE(r.is_ok());
  CHECK(code_of(r) == "TooLarge");
  CHECK(contains(r.status().message(), "peer_name length 4294967295 exceeds the limit 4096"));

  std::string j;
  ByteWriter wj(&j);
  wj.u32(kMaxControlJson + 1);
  auto c = decode_payload<ControlPayload>(bytes_of(j));
  CHECK(code_of(c) == "TooLarge");

  // A length within the limit but past the end is a truncation.
  std::string t;
  ByteWriter wt(&t);
  wt.u32(kMaxControlJson);
  wt.bytes("{}", 2);
  auto d = decode_payload<ControlReplyPayload>(bytes_of(t));
  CHECK(code_of(d) == "BadFrame");
}

TEST_CASE("a handover range count over its limit is rejected before reserving", "[frame]") {
  std::string p;
  ByteWriter w(&p);
  w.u64(1);
  w.u64(10);
  w.u32(kMaxHandoverRanges + 1);
  auto r = decode_payload<HandoverPayload>(bytes_of(p));
  REQUIRE_FALSE(r.is_ok());
  CHECK(code_of(r) == "TooLarge");

  // Within the limit but more ranges than bytes: rejected as truncated, with
  // nothing reserved (the count is checked against the bytes left first).
  std::string q;
  ByteWriter wq(&q);
  wq.u64(1);
  wq.u64(10);
  wq.u32(kMaxHandoverRanges);
  wq.u64(0);
  wq.u64(1);
  wq.u32(0);
  auto s = decode_payload<HandoverPayload>(bytes_of(q));
  CHECK(code_of(s) == "BadFrame");
  CHECK(contains(s.status().message(), "range count 4194304 needs 83886080 bytes, 20 left"));
}

TEST_CASE("handover ranges that overlap, go backwards, are empty or overflow are rejected",
          "[frame]") {
  auto bad = [](std::vector<HandoverRange> ranges) {
    HandoverPayload p{1, 0, std::move(ranges)};
    CHECK_FALSE(validate_payload(p).is_ok());
    std::string bytes = encode_payload(p);
    return code_of(decode_payload<HandoverPayload>(bytes_of(bytes)));
  };
  CHECK(bad({{0, 10, 0}, {5, 10, 0}}) == "BadFrame");
  CHECK(bad({{100, 10, 0}, {0, 10, 0}}) == "BadFrame");
  CHECK(bad({{0, 0, 0}}) == "BadFrame");
  CHECK(bad({{UINT64_MAX, 2, 0}}) == "BadFrame");
  HandoverPayload adjacent{1, 20, {{0, 10, 1}, {10, 10, 2}}};
  CHECK(validate_payload(adjacent).is_ok());
}

TEST_CASE("DATA bytes must match its length and flags", "[frame]") {
  auto& b = block_bytes();
  std::span<const uint8_t> ten{b.data(), 10};
  auto code = [](const DataPayload& p) {
    std::string bytes = encode_payload(p);
    return code_of(decode_payload<DataPayload>(bytes_of(bytes)));
  };
  CHECK(code(DataPayload{0, 11, 0, ten}) == "BadFrame");
  CHECK(code(DataPayload{0, 9, 0, ten}) == "BadFrame");
  CHECK(code(DataPayload{0, 10, kFlagZero, ten}) == "BadFrame");
  CHECK(code(DataPayload{0, 10, kFlagZero | kFlagCompressed, {}}) == "BadFrame");
  CHECK(code(DataPayload{0, 10, kFlagCompressed, {}}) == "BadFrame");
  CHECK(code(DataPayload{0, 10, 16, ten}) == "BadFrame");
  // BASE: 8-byte checksums, at most one per 512 bytes, no other flag with it.
  std::vector<uint8_t> sums(16, 1);
  CHECK(code(DataPayload{0, 8192, kFlagBase, {sums.data(), 16}}) == "ok");
  CHECK(code(DataPayload{0, 8192, kFlagBase, {sums.data(), 12}}) == "BadFrame");
  CHECK(code(DataPayload{0, 8192, kFlagBase, {}}) == "BadFrame");
  CHECK(code(DataPayload{0, 512, kFlagBase, {sums.data(), 16}}) == "BadFrame");
  CHECK(code(DataPayload{0, 8192, kFlagBase | kFlagCompressed, {sums.data(), 16}}) == "BadFrame");
  CHECK(code(DataPayload{0, 8192, kFlagBase | kFlagZero, {}}) == "BadFrame");
  CHECK(code(DataPayload{UINT64_MAX - 5, 10, 0, ten}) == "BadFrame");
  CHECK(code(DataPayload{0, kMaxDataLength + 1, kFlagZero, {}}) == "TooLarge");
  CHECK(code(DataPayload{0, kMaxDataLength, kFlagZero, {}}) == "ok");
  CHECK(code(DataPayload{0, 10, 0, ten}) == "ok");
}

TEST_CASE("a FORWARD with an unknown op or flag, bytes that do not match, or a flush with a range is refused",
          "[frame]") {
  auto& b = block_bytes();
  std::span<const uint8_t> ten{b.data(), 10};
  auto code = [](const ForwardPayload& p) {
    std::string bytes = encode_payload(p);
    return code_of(decode_payload<ForwardPayload>(bytes_of(bytes)));
  };
  CHECK(code(ForwardPayload{ForwardOp::Write, 0, 0, 10, ten}) == "ok");
  CHECK(code(ForwardPayload{ForwardOp::Write, 0, 0, 11, ten}) == "BadFrame");
  CHECK(code(ForwardPayload{ForwardOp::Zero, 0, 0, 10, ten}) == "BadFrame");
  CHECK(code(ForwardPayload{static_cast<ForwardOp>(0), 0, 0, 0, {}}) == "BadFrame");
  CHECK(code(ForwardPayload{static_cast<ForwardOp>(5), 0, 0, 0, {}}) == "BadFrame");
  CHECK(code(ForwardPayload{ForwardOp::Trim, 4, 0, 10, {}}) == "BadFrame");
  CHECK(code(ForwardPayload{ForwardOp::Flush, 0, 4096, 0, {}}) == "BadFrame");
  CHECK(code(ForwardPayload{ForwardOp::Trim, 0, UINT64_MAX - 5, 10, {}}) == "BadFrame");
  CHECK(code(ForwardPayload{ForwardOp::Zero, 0, 0, kMaxDataLength + 1, {}}) == "TooLarge");
}

TEST_CASE("a DATA prefix followed by the bytes is the same frame as encode_message", "[frame]") {
  auto& b = block_bytes();
  for (const DataPayload& p :
       {DataPayload{512, 100, 0, {b.data(), 100}}, DataPayload{0, 4096, kFlagZero, {}},
        DataPayload{4096, 4096, kFlagCompressed, {b.data(), 30}}}) {
    std::string prefix = encode_data_prefix(p, 99);
    CHECK(prefix.size() == kFrameHeaderSize + kDataHeaderSize);
    std::string whole =
        prefix + std::string(reinterpret_cast<const char*>(p.bytes.data()), p.bytes.size());
    CHECK(whole == *encode_message(p, 99));
    auto d = decode_frame(whole);
    REQUIRE(d.is_ok());
    CHECK(std::get<DataPayload>(*d) == p);
  }
}

TEST_CASE("a decoded DATA payload points into the received buffer without copying", "[frame]") {
  auto& b = block_bytes();
  std::string frame = *encode_message(DataPayload{0, 100, 0, {b.data(), 100}}, 1);
  auto d = decode_frame(frame);
  REQUIRE(d.is_ok());
  const auto& data = std::get<DataPayload>(*d);
  CHECK(data.bytes.data() ==
        reinterpret_cast<const uint8_t*>(frame.data()) + kFrameHeaderSize + kDataHeaderSize);
}

TEST_CASE("a HELLO with an unknown purpose or trailing bytes (a version 1 MAC) is rejected", "[frame]") {
  HelloPayload p{1, {}, "host", "admin"};
  CHECK(code_of(validate_payload(p)) == "BadFrame");
  CHECK(code_of(encode_message(p, 1)) == "BadFrame");
  std::string bytes = encode_payload(p);
  auto r = decode_payload<HelloPayload>(bytes_of(bytes));
  CHECK(code_of(r) == "BadFrame");
  CHECK(contains(r.status().message(), "purpose \"admin\""));

  std::string m = encode_payload(HelloPayload{1, {}, "host", "peer"});
  m.push_back(1);  // version 1's has_mac, and its MAC
  m.append(32, 'm');
  CHECK(code_of(decode_payload<HelloPayload>(bytes_of(m))) == "BadFrame");
}

TEST_CASE("encode_message refuses a payload the peer would reject", "[frame]") {
  CHECK(code_of(encode_message(ControlReplyPayload{std::string(kMaxControlJson + 1, ' ')}, 1)) ==
        "TooLarge");
  StartPayload long_mode{std::string(kMaxStringLength + 1, 'm'), "", 0, 0, 0, ""};
  CHECK(code_of(encode_message(long_mode, 1)) == "TooLarge");
  CHECK(encode_message(ControlReplyPayload{std::string(kMaxControlJson, ' ')}, 1).is_ok());
}

TEST_CASE("every error code maps to its own errno and back", "[frame]") {
  for (uint32_t c = 1; c <= kMaxErrorCode; ++c) {
    auto code = static_cast<ErrorCode>(c);
    INFO(error_code_name(c));
    Status s = protocol_error(code, "x");
    CHECK_FALSE(s.is_ok());
    CHECK(error_code_of(s) == code);
    CHECK(std::string(error_code_name(c)) != "Unknown");
  }
  CHECK(error_code_of(Status::error("not permitted", EPERM)) == ErrorCode::Internal);
  CHECK(error_code_of(Status::error("disk full", ENOSPC)) == ErrorCode::NoSpace);
  CHECK(std::string(error_code_name(0)) == "Unknown");
  CHECK(std::string(error_code_name(kMaxErrorCode + 1)) == "Unknown");
}

TEST_CASE("an ERROR frame carries a Status's code and message to the peer", "[frame]") {
  Status s = protocol_error(ErrorCode::SizeMismatch, "source is 10 GiB, destination 8 GiB");
  ErrorPayload e = make_error_payload(s);
  CHECK(e.code == static_cast<uint32_t>(ErrorCode::SizeMismatch));
  auto frame = encode_message(e, 3);
  REQUIRE(frame.is_ok());
  auto d = decode_frame(*frame);
  REQUIRE(d.is_ok());
  Status back = status_from_error(std::get<ErrorPayload>(*d));
  CHECK(error_code_of(back) == ErrorCode::SizeMismatch);
  CHECK(back.message() == "peer reported SizeMismatch: source is 10 GiB, destination 8 GiB");

  ErrorPayload long_message = make_error_payload(Status::error(std::string(10000, 'e'), EIO));
  CHECK(long_message.message.size() == kMaxStringLength);
  CHECK(long_message.code == static_cast<uint32_t>(ErrorCode::Internal));
  CHECK(encode_message(long_message, 1).is_ok());

  Status unknown = status_from_error(ErrorPayload{999, "new"});
  CHECK(error_code_of(unknown) == ErrorCode::Internal);
  CHECK(contains(unknown.message(), "Unknown"));
}

TEST_CASE("every frame type has its wire name", "[frame]") {
  CHECK(std::string(frame_type_name(FrameType::Hello)) == "HELLO");
  CHECK(std::string(frame_type_name(FrameType::CancelPull)) == "CANCEL_PULL");
  CHECK(std::string(frame_type_name(FrameType::HandoverAck)) == "HANDOVER_ACK");
  CHECK(std::string(frame_type_name(static_cast<FrameType>(99))) == "UNKNOWN");
  for (uint16_t t = kMinFrameType; t <= kMaxFrameType; ++t) {
    CHECK(std::string(frame_type_name(static_cast<FrameType>(t))) != "UNKNOWN");
  }
}

TEST_CASE("random garbage never crashes the decoder", "[frame]") {
  std::mt19937_64 rng(20240601);
  auto random_string = [&](size_t n) {
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
  };
  const auto all = samples();
  int decoded = 0;
  for (int i = 0; i < 4000; ++i) {
    // Raw garbage as a header.
    std::string raw = random_string(kFrameHeaderSize + rng() % 64);
    (void)decode_frame(raw);
    // Garbage payload behind a valid header of a random type and flags.
    auto type = static_cast<FrameType>(kMinFrameType + rng() % kMaxFrameType);
    uint32_t flags = static_cast<uint32_t>(rng()) & allowed_flags(type);
    std::string garbage = random_string(rng() % 96);
    auto d = decode_frame(frame_around(type, flags, garbage));
    if (d)
      ++decoded;
    else
      CHECK_FALSE(d.status().message().empty());
    // A valid payload with a few bytes changed, behind a valid header.
    const AnyPayload& p = all[rng() % all.size()];
    std::string mutated = payload_bytes(p);
    for (int k = 0; k < 3 && !mutated.empty(); ++k)
      mutated[rng() % mutated.size()] = static_cast<char>(rng());
    auto m = decode_frame(frame_around(
        frame_type_of(p), std::visit([](const auto& v) { return frame_flags(v); }, p), mutated));
    if (m) ++decoded;
  }
  INFO(decoded << " of the garbage frames happened to be valid");
  SUCCEED();
}

TEST_CASE("each frame type's payload limit is the one docs/protocol.md lists", "[frame]") {
  const uint32_t documented[kMaxFrameType + 1] = {
      0,  8234,    32, 32,   1056800, 16777232, 20,      83886100, 13,
      12, 1048580, 16, 4104, 16,      1048580,  1048580, 8,  8, 1048580, 16, 524304, 16777236, 4};
  for (uint16_t t = kMinFrameType; t <= kMaxFrameType; ++t) {
    INFO(frame_type_name(static_cast<FrameType>(t)));
    CHECK(max_payload_length(static_cast<FrameType>(t)) == documented[t]);
    CHECK(max_payload_length(static_cast<FrameType>(t)) <= kMaxFramePayload);
    if (t != static_cast<uint16_t>(FrameType::Handover)) {
      CHECK(max_payload_length(static_cast<FrameType>(t)) <= kMaxPayload);
    }
  }
  CHECK(kMaxPreAuthPayload == max_payload_length(FrameType::Hello));
  CHECK(kMaxPreAuthPayload >= max_payload_length(FrameType::Error));
}

TEST_CASE("the largest payload of each fixed-size type is exactly its encoding", "[frame]") {
  CHECK(encode_payload(AuthPayload{}).size() == max_payload_length(FrameType::Auth));
  CHECK(encode_payload(AuthOkPayload{}).size() == max_payload_length(FrameType::AuthOk));
  CHECK(encode_payload(AckPayload{}).size() == max_payload_length(FrameType::Ack));
  CHECK(encode_payload(PullPayload{}).size() == max_payload_length(FrameType::Pull));
  CHECK(encode_payload(CancelPullPayload{}).size() == max_payload_length(FrameType::CancelPull));
  CHECK(encode_payload(HeartbeatPayload{}).size() == max_payload_length(FrameType::Heartbeat));
  CHECK(encode_payload(DonePayload{}).size() == max_payload_length(FrameType::Done));
  CHECK(encode_payload(HandoverAckPayload{}).size() == max_payload_length(FrameType::HandoverAck));
  CHECK(encode_payload(PushAckPayload{}).size() == max_payload_length(FrameType::PushAck));
  CHECK(encode_payload(SumsPayload{}).size() == max_payload_length(FrameType::Sums));
  CHECK(encode_payload(ForwardReplyPayload{}).size() == max_payload_length(FrameType::ForwardReply));
  CHECK(encode_payload(ForwardPayload{ForwardOp::Zero, 0, 0, kMaxDataLength, {}}).size() + kMaxDataLength ==
        max_payload_length(FrameType::Forward));
  CHECK(encode_payload(SumsReplyPayload{0, 1, std::vector<uint64_t>(kMaxSumsCount)}).size() ==
        max_payload_length(FrameType::SumsReply));
  HelloPayload hello{1, {}, std::string(kMaxStringLength, 'n'), "peer"};
  hello.purpose.resize(0);
  std::string big = encode_payload(hello);
  // A HELLO with both strings at their limit (purpose padded here) fills the limit.
  CHECK(big.size() + kMaxStringLength == max_payload_length(FrameType::Hello));
}

TEST_CASE("a SUMS asking for nothing, too many hashes or too many bytes is refused", "[frame]") {
  CHECK(validate_payload(SumsPayload{0, 1 << 20, 1024}).is_ok());
  CHECK(code_of(validate_payload(SumsPayload{0, 0, 1})) == "BadFrame");
  CHECK(code_of(validate_payload(SumsPayload{0, 4096, 0})) == "BadFrame");
  CHECK(code_of(validate_payload(SumsPayload{0, 4096, kMaxSumsCount + 1})) == "TooLarge");
  CHECK(code_of(validate_payload(SumsPayload{0, 1u << 30, 2})) == "TooLarge");
  CHECK(code_of(validate_payload(SumsPayload{UINT64_MAX - 10, 4096, 1})) == "BadFrame");
  // A reply whose count promises more hashes than the bytes that follow.
  std::string p;
  ByteWriter w(&p);
  w.u64(0);
  w.u32(4096);
  w.u32(kMaxSumsCount);
  w.u64(1);
  CHECK(code_of(decode_payload<SumsReplyPayload>(bytes_of(p))) == "BadFrame");
}

TEST_CASE("a group's PREPARE flag travels in the header of HANDOVER and HANDOVER_ACK only", "[frame]") {
  HandoverPayload prepare{4, 100, {{0, 100, 1}}, /*prepare=*/true};
  auto frame = encode_message(prepare, 9);
  REQUIRE(frame.is_ok());
  auto h = header_of(*frame);
  REQUIRE(h.is_ok());
  CHECK(h->flags == kFlagPrepare);
  auto decoded = decode_frame(*frame);
  REQUIRE(decoded.is_ok());
  CHECK(std::get<HandoverPayload>(*decoded) == prepare);
  // Without the flag it is the commit: the payload bytes are the same.
  HandoverPayload commit = prepare;
  commit.prepare = false;
  CHECK(encode_payload(commit) == encode_payload(prepare));
  auto plain = decode_frame(*encode_message(commit, 9));
  REQUIRE(plain.is_ok());
  CHECK_FALSE(std::get<HandoverPayload>(*plain).prepare);

  auto ack = decode_frame(*encode_message(HandoverAckPayload{4, true}, 9));
  REQUIRE(ack.is_ok());
  CHECK(std::get<HandoverAckPayload>(*ack).prepare);
  CHECK_FALSE(std::get<HandoverAckPayload>(*decode_frame(*encode_message(HandoverAckPayload{4}, 9))).prepare);

  // Any other type with the bit, or HANDOVER with another bit, is a bad frame.
  std::string pull = *encode_message(PullPayload{0, 4096, 0}, 1);
  store_be32(reinterpret_cast<uint8_t*>(pull.data()) + kHeaderFlagsOffset, kFlagPrepare);
  CHECK(code_of(header_of(pull)) == "BadFrame");
  std::string other = *frame;
  store_be32(reinterpret_cast<uint8_t*>(other.data()) + kHeaderFlagsOffset, kFlagPrepare | kFlagZero);
  CHECK(code_of(header_of(other)) == "BadFrame");
}
