// fuzz_frame: the peer protocol's decoder (common/frame_codec.h) on what a
// peer could send.
//
// Input: one options byte, then a byte stream read the way a receiver reads
// a connection: a kFrameHeaderSize header, decode_header(), then
// payload_length bytes, decode_message(); the first failure ends the stream
// (the receiver would send ERROR and close).
//   options bit 0: the peer has authenticated (limit kMaxFramePayload, else
//                  kMaxPreAuthPayload)
//   options bit 1: overwrite each header's CRC with the payload's, so that
//                  random payloads get past the CRC into the parsers
// Each header and payload is copied into a buffer of exactly its size, so
// ASan sees a read one byte past either.
//
// Invariants:
//   - a frame that decodes re-encodes (encode_message) to exactly the bytes it
//     came from, and those decode to an equal payload (one encoding per value);
//   - a DATA frame's encode_data_prefix + bytes is that same frame;
//   - every decode error can be reported: make_error_payload() encodes, and
//     status_from_error() of it is an error.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "common/byte_order.h"
#include "common/crc32c.h"
#include "common/frame_codec.h"
#include "common/protocol_format.h"
#include "tests/fuzz/fuzz_support.h"

using namespace livemig;

namespace {

std::string hex_prefix(std::span<const uint8_t> b) {
  std::string s;
  for (size_t i = 0; i < b.size() && i < 48; ++i) {
    static const char kHex[] = "0123456789abcdef";
    s += kHex[b[i] >> 4];
    s += kHex[b[i] & 15];
  }
  return s;
}

// A decode error must become an ERROR frame the receiver can send.
void check_reportable(const Status& s) {
  FUZZ_CHECK(!s.is_ok(), "an error result holds an ok status");
  ErrorPayload e = make_error_payload(s);
  Result<std::string> frame = encode_message(e, 0);
  FUZZ_CHECK(frame.is_ok(), "the ERROR for \"%s\" does not encode: %s", s.message().c_str(),
             frame.status().message().c_str());
  FUZZ_CHECK(!status_from_error(e).is_ok(), "status_from_error of an ERROR is ok");
}

void check_round_trip(const FrameHeader& h, std::span<const uint8_t> header, std::span<const uint8_t> payload,
                      const AnyPayload& p, uint32_t max_payload) {
  const char* type = frame_type_name(h.type);
  FUZZ_CHECK(frame_type_of(p) == h.type, "a %s header decoded as a %s payload", type,
             frame_type_name(frame_type_of(p)));
  Result<std::string> again = std::visit([&](const auto& v) { return encode_message(v, h.request_id); }, p);
  FUZZ_CHECK(again.is_ok(), "a decoded %s does not encode again: %s", type, again.status().message().c_str());
  std::span<const uint8_t> bytes = byte_span(*again);
  FUZZ_CHECK(bytes.size() == header.size() + payload.size(), "%s: %zu bytes re-encode to %zu", type,
             header.size() + payload.size(), bytes.size());
  FUZZ_CHECK(std::ranges::equal(bytes.first(header.size()), header), "%s: header %s re-encodes as %s", type,
             hex_prefix(header).c_str(), hex_prefix(bytes.first(header.size())).c_str());
  FUZZ_CHECK(std::ranges::equal(bytes.subspan(header.size()), payload), "%s: payload %s re-encodes as %s", type,
             hex_prefix(payload).c_str(), hex_prefix(bytes.subspan(header.size())).c_str());

  // The re-encoded copy lives in its own buffers, like a frame on another link.
  std::vector<uint8_t> h2_bytes(bytes.begin(), bytes.begin() + kFrameHeaderSize);
  std::vector<uint8_t> p2_bytes(bytes.begin() + kFrameHeaderSize, bytes.end());
  Result<FrameHeader> h2 = decode_header(h2_bytes.data(), max_payload);
  FUZZ_CHECK(h2.is_ok(), "%s: re-encoded header fails: %s", type, h2.status().message().c_str());
  FUZZ_CHECK(*h2 == h, "%s: re-encoded header decodes differently", type);
  Result<AnyPayload> p2 = decode_message(*h2, p2_bytes);
  FUZZ_CHECK(p2.is_ok(), "%s: re-encoded payload fails: %s", type, p2.status().message().c_str());
  FUZZ_CHECK(*p2 == p, "%s: re-encoded payload decodes to another value", type);

  if (const auto* data = std::get_if<DataPayload>(&p)) {
    std::string prefix = encode_data_prefix(*data, h.request_id);
    prefix.append(reinterpret_cast<const char*>(data->bytes.data()), data->bytes.size());
    FUZZ_CHECK(prefix == *again, "DATA: encode_data_prefix + bytes differs from encode_message");
  }
  if (const auto* e = std::get_if<ErrorPayload>(&p)) {
    Status s = status_from_error(*e);
    FUZZ_CHECK(!s.is_ok(), "a received ERROR stands for an ok status");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::FuzzInput in(data, size);
  const uint8_t options = in.byte();
  const uint32_t max_payload = (options & 1) ? kMaxFramePayload : kMaxPreAuthPayload;
  const bool fix_crc = options & 2;

  while (in.left() >= kFrameHeaderSize) {
    std::string_view hb = in.bytes(kFrameHeaderSize);
    std::vector<uint8_t> header(hb.begin(), hb.end());
    // Only the length is needed to cut the payload from the stream; the
    // decoder still checks the header as received (CRC patched if asked).
    const uint32_t length = load_be32(header.data() + kHeaderLengthOffset);
    std::string_view pb = in.bytes(length);
    std::vector<uint8_t> payload(pb.begin(), pb.end());
    if (fix_crc) store_be32(header.data() + kHeaderCrcOffset, payload.empty() ? 0 : crc32c(payload.data(), payload.size()));

    Result<FrameHeader> h = decode_header(header.data(), max_payload);
    if (!h) {
      check_reportable(h.status());
      return 0;
    }
    FUZZ_CHECK(h->payload_length <= max_payload, "a header over the limit passed: %u > %u", h->payload_length,
               max_payload);
    Result<AnyPayload> p = decode_message(*h, payload);
    if (!p) {
      check_reportable(p.status());
      return 0;
    }
    FUZZ_CHECK(payload.size() == h->payload_length, "decoded a %zu-byte payload whose header says %u",
               payload.size(), h->payload_length);
    check_round_trip(*h, header, payload, *p, max_payload);
  }
  return 0;
}
