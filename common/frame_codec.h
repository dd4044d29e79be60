// Encoding and decoding of peer-protocol frames (docs/protocol.md,
// common/protocol_format.h). A pure library: bytes in, values out, no sockets.
//
// Receiving a frame, in order:
//   1. read kFrameHeaderSize bytes; decode_header() checks magic, version,
//      type, flags and the payload length against the limit, before the
//      receiver allocates the payload buffer;
//   2. read payload_length bytes; decode_message() checks the CRC-32C and
//      parses the payload into the matching struct (or decode_payload<T> when
//      only one type is acceptable, after verify_payload()).
// Sending: encode_message(payload, request_id) builds header + payload.
//
// Every failure is a protocol_error() Status: error_code_of(status) is the
// ErrorCode for the ERROR frame that the receiver sends before it closes the
// connection (make_error_payload() builds it), and the message names the
// frame, the field and the offending value. Decoding never reads out of
// bounds, never throws, and never allocates for a length that is over its
// limit or longer than the bytes that are there.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "common/protocol_format.h"
#include "common/status.h"

namespace livemig {

// A decoded header (magic is implied: decode_header rejects any other).
struct FrameHeader {
  uint16_t version = kProtocolVersion;
  FrameType type = FrameType::Heartbeat;
  uint32_t flags = 0;
  uint64_t request_id = 0;
  uint32_t payload_length = 0;
  uint32_t payload_crc32c = 0;
  bool operator==(const FrameHeader&) const = default;
};

// Writes h (with kFrameMagic in front) as kFrameHeaderSize bytes at out.
void encode_header(const FrameHeader& h, uint8_t* out);
// Parses and checks a header: BadMagic, BadVersion, UnknownType, BadFrame
// (flags the type does not allow), TooLarge (payload_length over
// min(max_payload, max_payload_length(type))). Pass kMaxPreAuthPayload before
// the peer has authenticated, kMaxFramePayload after.
// REQUIRES: bytes points to kFrameHeaderSize readable bytes.
Result<FrameHeader> decode_header(const uint8_t* bytes, uint32_t max_payload);
// BadFrame if payload is not h.payload_length bytes, BadCrc if its CRC-32C is
// not h.payload_crc32c.
Status verify_payload(const FrameHeader& h, std::span<const uint8_t> payload);
// A whole frame: the header (length and CRC computed) and the payload.
// REQUIRES: payload.size() <= max_payload_length(type),
//           (flags & ~allowed_flags(type)) == 0
std::string encode_frame(FrameType type, uint32_t flags, uint64_t request_id,
                         std::string_view payload);

using NonceBytes = std::array<uint8_t, kNonceSize>;  // same type as peer_auth's Nonce
using MacBytes = std::array<uint8_t, kMacSize>;      // same type as peer_auth's Mac

// Payloads, one per FrameType; field order is wire order. Strings are a u32
// length then bytes; every integer is big-endian.

// Both directions of the handshake's first step.
struct HelloPayload {
  static constexpr FrameType kType = FrameType::Hello;
  uint16_t protocol_version = kProtocolVersion;
  NonceBytes nonce{};
  std::string peer_name;              // <= kMaxStringLength
  std::string purpose{kPurposePeer};  // kPurposePeer or kPurposeControl
  bool operator==(const HelloPayload&) const = default;
};

struct AuthPayload {
  static constexpr FrameType kType = FrameType::Auth;
  MacBytes mac{};
  bool operator==(const AuthPayload&) const = default;
};

// The server's proof, sent once the client proved itself.
struct AuthOkPayload {
  static constexpr FrameType kType = FrameType::AuthOk;
  MacBytes mac{};
  bool operator==(const AuthOkPayload&) const = default;
};

struct StartPayload {
  static constexpr FrameType kType = FrameType::Start;
  std::string mode;         // <= kMaxStringLength
  std::string params_json;  // <= kMaxControlJson
  uint64_t image_size = 0;
  uint32_t block_size = 0;
  uint64_t segment_size = 0;
  std::string migration_id;  // <= kMaxStringLength
  bool operator==(const StartPayload&) const = default;
};

// Block data for [offset, offset+length). `bytes` is a view: after decoding
// it points into the payload buffer and is valid while that buffer is.
struct DataPayload {
  static constexpr FrameType kType = FrameType::Data;
  uint64_t offset = 0;
  uint32_t length = 0;             // <= kMaxDataLength; the uncompressed length
  uint32_t flags = 0;              // kFlagZero or kFlagCompressed or 0, mirrored in the header
  std::span<const uint8_t> bytes;  // empty if zero; length bytes if plain;
                                   // 1..kMaxDataLength zstd bytes if compressed
  bool operator==(const DataPayload& o) const;
};

struct AckPayload {
  static constexpr FrameType kType = FrameType::Ack;
  uint64_t acked_request_id = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  bool operator==(const AckPayload&) const = default;
};

// Blocks [first_block, first_block+block_count), and how hot they are.
struct HandoverRange {
  uint64_t first_block = 0;
  uint64_t block_count = 0;  // > 0
  uint32_t heat = 0;
  bool operator==(const HandoverRange&) const = default;
};

// The set the destination must still fetch; ranges ascending and disjoint.
// generation: this handover attempt of the migration (docs/handover.md).
struct HandoverPayload {
  static constexpr FrameType kType = FrameType::Handover;
  uint64_t generation = 0;
  uint64_t remaining_blocks = 0;
  std::vector<HandoverRange> ranges;  // <= kMaxHandoverRanges; u32 count first
  // A group's first phase (docs/handover.md, "Groups"): check and sync, do
  // not commit. Carried as the header's PREPARE flag, not in the payload.
  bool prepare = false;
  bool operator==(const HandoverPayload&) const = default;
};

struct PullPayload {
  static constexpr FrameType kType = FrameType::Pull;
  uint64_t offset = 0;
  uint32_t length = 0;
  uint8_t priority = 0;  // 0 background; nonzero demand, mirrored as kFlagPriority
  bool operator==(const PullPayload&) const = default;
};

struct CancelPullPayload {
  static constexpr FrameType kType = FrameType::CancelPull;
  uint64_t offset = 0;
  uint32_t length = 0;
  bool operator==(const CancelPullPayload&) const = default;
};

struct ProgressPayload {
  static constexpr FrameType kType = FrameType::Progress;
  std::string json;  // <= kMaxControlJson
  bool operator==(const ProgressPayload&) const = default;
};

struct HeartbeatPayload {
  static constexpr FrameType kType = FrameType::Heartbeat;
  uint64_t sequence = 0;
  uint64_t sender_time_ns = 0;
  bool operator==(const HeartbeatPayload&) const = default;
};

struct ErrorPayload {
  static constexpr FrameType kType = FrameType::Error;
  uint32_t code = 0;    // an ErrorCode; unknown values are accepted
  std::string message;  // <= kMaxStringLength
  bool operator==(const ErrorPayload&) const = default;
};

struct DonePayload {
  static constexpr FrameType kType = FrameType::Done;
  uint64_t total_bytes_sent = 0;
  uint64_t total_blocks = 0;
  bool operator==(const DonePayload&) const = default;
};

struct ControlPayload {
  static constexpr FrameType kType = FrameType::Control;
  std::string json;  // <= kMaxControlJson
  bool operator==(const ControlPayload&) const = default;
};

struct ControlReplyPayload {
  static constexpr FrameType kType = FrameType::ControlReply;
  std::string json;  // <= kMaxControlJson
  bool operator==(const ControlReplyPayload&) const = default;
};

// The destination committed handover `generation` (it is authoritative now),
// or, with prepare (the header's PREPARE flag), is prepared to commit it.
struct HandoverAckPayload {
  static constexpr FrameType kType = FrameType::HandoverAck;
  uint64_t generation = 0;
  bool prepare = false;  // the header's PREPARE flag
  bool operator==(const HandoverAckPayload&) const = default;
};

// The first `frames` pushed DATA frames (request id 0) the destination
// received on this link are durable there.
struct PushAckPayload {
  static constexpr FrameType kType = FrameType::PushAck;
  uint64_t frames = 0;
  bool operator==(const PushAckPayload&) const = default;
};

// The destination's answer to START: what it holds (one JSON object).
struct StartOkPayload {
  static constexpr FrameType kType = FrameType::StartOk;
  std::string json;  // <= kMaxControlJson
  bool operator==(const StartOkPayload&) const = default;
};

// Asks for xxh3-64 hashes of `count` units of `unit` bytes from `offset` on
// (the last one cut at the image's end). count <= kMaxSumsCount,
// unit * count <= kMaxSumsBytes.
struct SumsPayload {
  static constexpr FrameType kType = FrameType::Sums;
  uint64_t offset = 0;
  uint32_t unit = 0;
  uint32_t count = 0;
  bool operator==(const SumsPayload&) const = default;
};

struct SumsReplyPayload {
  static constexpr FrameType kType = FrameType::SumsReply;
  uint64_t offset = 0;
  uint32_t unit = 0;
  std::vector<uint64_t> hashes;  // <= kMaxSumsCount; u32 count first
  bool operator==(const SumsReplyPayload&) const = default;
};

// A client's write, trim, zero or flush that reached the side that is not
// authoritative (issue #17): the authoritative side applies it as its own
// client's and answers FORWARD_REPLY with the same request id. `bytes` is a
// view, as in DataPayload: `length` bytes for Write, none otherwise; a Flush
// has offset and length 0.
struct ForwardPayload {
  static constexpr FrameType kType = FrameType::Forward;
  ForwardOp op = ForwardOp::Write;
  uint32_t flags = 0;  // kForwardFua, kForwardMayTrim
  uint64_t offset = 0;
  uint32_t length = 0;  // <= kMaxDataLength
  std::span<const uint8_t> bytes;
  bool operator==(const ForwardPayload& o) const;
};

// The outcome of a FORWARD: 0, or the errno the client gets (Linux numbers).
// ESTALE: the receiver is not authoritative either (the sender looks again
// at where authority is, and retries).
struct ForwardReplyPayload {
  static constexpr FrameType kType = FrameType::ForwardReply;
  uint32_t error = 0;
  bool operator==(const ForwardReplyPayload&) const = default;
};

// Any payload; alternative i is the payload of FrameType i + 1.
using AnyPayload = std::variant<HelloPayload, AuthPayload, AuthOkPayload, StartPayload, DataPayload,
                                AckPayload, HandoverPayload, PullPayload, CancelPullPayload,
                                ProgressPayload, HeartbeatPayload, ErrorPayload, DonePayload,
                                ControlPayload, ControlReplyPayload, HandoverAckPayload, PushAckPayload,
                                StartOkPayload, SumsPayload, SumsReplyPayload, ForwardPayload,
                                ForwardReplyPayload>;
static_assert(std::variant_size_v<AnyPayload> == kMaxFrameType);

namespace detail {
template <typename T, typename V>
struct IsAlternative;
template <typename T, typename... Ts>
struct IsAlternative<T, std::variant<Ts...>> : std::disjunction<std::is_same<T, Ts>...> {};
}  // namespace detail

// One of the payload structs above.
template <typename T>
concept Payload = detail::IsAlternative<T, AnyPayload>::value;

// The frame type of the payload that `p` holds.
inline FrameType frame_type_of(const AnyPayload& p) {
  return static_cast<FrameType>(p.index() + 1);
}

// The header flags that go with p (DATA's flags, PULL's priority, HANDOVER's
// and HANDOVER_ACK's prepare; else 0).
template <Payload T>
uint32_t frame_flags(const T& p) {
  if constexpr (std::is_same_v<T, DataPayload>)
    return p.flags;
  else if constexpr (std::is_same_v<T, PullPayload>)
    return p.priority != 0 ? kFlagPriority : 0;
  else if constexpr (std::is_same_v<T, HandoverPayload> || std::is_same_v<T, HandoverAckPayload>)
    return p.prepare ? kFlagPrepare : 0;
  else
    return 0;
}

// Checks what decode_payload checks beyond the byte layout: string lengths,
// counts, flags, ranges that overflow, DATA bytes matching length, HELLO
// purpose, HANDOVER ranges ascending, disjoint and non-empty.
template <Payload T>
Status validate_payload(const T& p);
// The payload bytes alone (no header, no checks).
template <Payload T>
std::string encode_payload(const T& p);
// Parses exactly payload.size() bytes as a T and validates it. Errors:
// BadFrame (truncated, trailing bytes, bad field), TooLarge (a length over its
// limit). A DataPayload's bytes point into `payload`.
template <Payload T>
Result<T> decode_payload(std::span<const uint8_t> payload);
// A whole frame for p: validate_payload(p), then header + payload.
template <Payload T>
Result<std::string> encode_message(const T& p, uint64_t request_id);

// Checks the payload against h (size, CRC), parses it as h.type's payload,
// and checks that h.flags are the flags the payload implies. A DataPayload's
// bytes point into `payload`.
Result<AnyPayload> decode_message(const FrameHeader& h, std::span<const uint8_t> payload);

// The frame header and DATA header for p (kFrameHeaderSize + kDataHeaderSize
// bytes, CRC computed over p.bytes too): send them, then p.bytes, e.g. as two
// Asio buffers, so block data is never copied.
// REQUIRES: validate_payload(p).is_ok()
std::string encode_data_prefix(const DataPayload& p, uint64_t request_id);

// The ERROR payload that reports s: error_code_of(s) and s's message, cut to
// kMaxStringLength bytes. REQUIRES: !s.is_ok()
ErrorPayload make_error_payload(const Status& s);
// The Status a received ERROR stands for: its code (Internal if unknown) and
// "peer reported <CodeName>: <message>".
Status status_from_error(const ErrorPayload& e);

}  // namespace livemig
