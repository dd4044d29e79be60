// The peer protocol's wire format: constants and layouts (after LevelDB's
// db/log_format.h). docs/protocol.md describes the same format for people;
// change both together. The codec is common/frame_codec.h.
//
// Every frame is a 28-byte header followed by payload_length payload bytes.
// All integers are big-endian (network order, like NBD):
//
//   offset  size  field
//        0     4  magic            kFrameMagic, "LMIG"
//        4     2  version          kProtocolVersion
//        6     2  type             FrameType
//        8     4  flags            kFlag* bits; each type allows only its own
//       12     8  request_id       chosen by the sender; a reply echoes it
//       20     4  payload_length   <= max_payload_length(type)
//       24     4  payload_crc32c   CRC-32C of the payload bytes (0 if none)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace livemig {

inline constexpr uint32_t kFrameMagic = 0x4C4D4947;  // "LMIG"
inline constexpr uint16_t kProtocolVersion = 2;
inline constexpr size_t kFrameHeaderSize = 28;

inline constexpr size_t kHeaderMagicOffset = 0;
inline constexpr size_t kHeaderVersionOffset = 4;
inline constexpr size_t kHeaderTypeOffset = 6;
inline constexpr size_t kHeaderFlagsOffset = 8;
inline constexpr size_t kHeaderRequestIdOffset = 12;
inline constexpr size_t kHeaderLengthOffset = 20;
inline constexpr size_t kHeaderCrcOffset = 24;
static_assert(kHeaderCrcOffset + 4 == kFrameHeaderSize);

enum class FrameType : uint16_t {
  Hello = 1,
  Auth = 2,
  AuthOk = 3,
  Start = 4,
  Data = 5,
  Ack = 6,
  Handover = 7,
  Pull = 8,
  CancelPull = 9,
  Progress = 10,
  Heartbeat = 11,
  Error = 12,
  Done = 13,
  Control = 14,
  ControlReply = 15,
  HandoverAck = 16,
  PushAck = 17,
  StartOk = 18,
  Sums = 19,
  SumsReply = 20,
  Forward = 21,
  ForwardReply = 22,
};
inline constexpr uint16_t kMinFrameType = 1;
inline constexpr uint16_t kMaxFrameType = 22;

// True if `type` is one of FrameType's values.
inline constexpr bool is_known_frame_type(uint16_t type) {
  return type >= kMinFrameType && type <= kMaxFrameType;
}
// The wire name in upper case ("HELLO", "CANCEL_PULL"), "UNKNOWN" otherwise.
const char* frame_type_name(FrameType type);

// Header flags.
inline constexpr uint32_t kFlagZero = 1;        // DATA: the range reads as zeros; no bytes follow
inline constexpr uint32_t kFlagCompressed = 2;  // DATA: the bytes are zstd-compressed
inline constexpr uint32_t kFlagPriority = 4;    // PULL: a demand read, served before background
inline constexpr uint32_t kFlagBase = 8;        // DATA: equal to the base image; the bytes are block checksums
inline constexpr uint32_t kFlagPrepare = 16;    // HANDOVER, HANDOVER_ACK: a group's prepare, not the commit
// The header flags that a frame of `type` may carry (others are a bad frame).
inline constexpr uint32_t allowed_flags(FrameType type) {
  switch (type) {
    case FrameType::Data: return kFlagZero | kFlagCompressed | kFlagBase;
    case FrameType::Pull: return kFlagPriority;
    case FrameType::Handover:
    case FrameType::HandoverAck: return kFlagPrepare;
    default: return 0;
  }
}

// Limits. A receiver checks each length against its limit before it
// allocates anything for it.
inline constexpr uint32_t kMaxDataLength = 16 * 1024 * 1024;  // block bytes in one DATA
inline constexpr uint32_t kMaxPayload = kMaxDataLength + 64;  // any frame but HANDOVER
inline constexpr uint32_t kMaxControlJson = 1024 * 1024;      // each JSON text
inline constexpr uint32_t kMaxHandoverRanges = 4 * 1024 * 1024;
inline constexpr uint32_t kMaxSumsCount = 64 * 1024;                 // hashes in one SUMS_REPLY
inline constexpr uint64_t kMaxSumsBytes = uint64_t{1} << 30;         // image bytes one SUMS covers
inline constexpr uint32_t kMaxStringLength = 4096;  // names, ids, messages
inline constexpr size_t kNonceSize = 32;
inline constexpr size_t kMacSize = 32;  // HMAC-SHA256

// Fixed parts of payloads.
inline constexpr uint32_t kStringPrefixSize = 4;  // u32 length before each string
inline constexpr uint32_t kDataHeaderSize = 16;   // offset u64, length u32, flags u32
inline constexpr uint32_t kHandoverRangeSize = 20;
inline constexpr uint32_t kHandoverFixedSize = 20;  // generation u64, remaining_blocks u64, count u32
inline constexpr uint32_t kSumsFixedSize = 16;      // offset u64, unit u32, count u32
inline constexpr uint32_t kForwardHeaderSize = 20;  // op u32, flags u32, offset u64, length u32

// FORWARD: what a client asked of the side that is not authoritative
// (issue #17), applied by the one that is.
enum class ForwardOp : uint32_t { Write = 1, Trim = 2, Zero = 3, Flush = 4 };
inline constexpr uint32_t kMaxForwardOp = 4;
inline constexpr uint32_t kForwardFua = 1;      // the result must be durable on reply
inline constexpr uint32_t kForwardMayTrim = 2;  // Zero: a hole is fine
// HANDOVER is the one frame that may exceed kMaxPayload (about 80 MiB).
inline constexpr uint32_t kMaxHandoverPayload =
    kHandoverFixedSize + kMaxHandoverRanges * kHandoverRangeSize;
static_assert(uint64_t{kHandoverFixedSize} + uint64_t{kMaxHandoverRanges} * kHandoverRangeSize <=
              UINT32_MAX);

// The largest payload a frame of `type` can have.
uint32_t max_payload_length(FrameType type);
// The largest payload of any frame: the limit for an authenticated peer.
inline constexpr uint32_t kMaxFramePayload = std::max(kMaxPayload, kMaxHandoverPayload);
// The largest payload of the frames allowed before authentication (HELLO,
// AUTH, AUTH_OK, ERROR): the limit for a peer that has not authenticated.
inline constexpr uint32_t kMaxPreAuthPayload = 2 + kNonceSize + 2 * (kStringPrefixSize + kMaxStringLength);

// HELLO purposes.
inline constexpr std::string_view kPurposePeer = "peer";
inline constexpr std::string_view kPurposeControl = "control";

// The code in an ERROR frame.
enum class ErrorCode : uint32_t {
  BadFrame = 1,           // a payload that does not parse (truncated, trailing bytes, bad field)
  BadMagic = 2,           // the header does not start with "LMIG"
  BadVersion = 3,         // a protocol version this side does not speak
  UnknownType = 4,        // a frame type this side does not know
  TooLarge = 5,           // a length or count over its limit
  BadCrc = 6,             // the payload does not match its CRC-32C
  AuthFailed = 7,         // the peer does not hold the shared secret
  Busy = 8,               // already migrating / already connected
  SizeMismatch = 9,       // the two images differ in size or geometry
  NotAuthoritative = 10,  // the request needs the side that owns the data
  Protocol = 11,          // a valid frame at the wrong time
  Internal = 12,          // a local failure (I/O error, ...)
  Cancelled = 13,         // the source cancelled the migration
  HandoverLost = 14,      // the operator aborted the handover this destination committed
  NotEmpty = 15,          // the destination image holds data it will not overwrite
  NoSpace = 16,           // the destination's disk is full
  UnknownMigration = 17,  // no such migration here (to resume or resolve)
  TlsRequired = 18,       // a plaintext client at a plugin that requires TLS
  NotCommitted = 19,      // the destination ended the migration before any commit: the source may unfence
  BaseMismatch = 20,      // the two plugins' base images differ (or one has none)
};
inline constexpr uint32_t kMaxErrorCode = 20;

// The name ("BadCrc"), "Unknown" for a value outside the enum.
const char* error_code_name(uint32_t code);

// Protocol errors are Status values whose errno slot carries the code, as a
// distinct errno that still means something to an NBD client:
//   BadFrame EPROTO, BadMagic EILSEQ, BadVersion EPROTONOSUPPORT,
//   UnknownType EBADRQC, TooLarge EMSGSIZE, BadCrc EBADMSG, AuthFailed EACCES,
//   Busy EBUSY, SizeMismatch ERANGE, NotAuthoritative ESTALE, Protocol ENOMSG,
//   Internal EIO, Cancelled ECANCELED, HandoverLost ENOTRECOVERABLE,
//   NotEmpty ENOTEMPTY, NoSpace ENOSPC, UnknownMigration ESRCH,
//   TlsRequired EKEYREJECTED (the errno of every TLS failure), NotCommitted
//   ECONNABORTED, BaseMismatch EMEDIUMTYPE.
int error_code_errno(ErrorCode code);
// A Status for `code`; the message says what is wrong.
Status protocol_error(ErrorCode code, std::string message);
// The code of a Status made by protocol_error (or of any Status with one of
// the errnos above); Internal for every other errno.
// REQUIRES: !s.is_ok()
ErrorCode error_code_of(const Status& s);

}  // namespace livemig
