#include "common/protocol_format.h"

#include <cerrno>
#include <iterator>

namespace livemig {
namespace {

constexpr uint32_t string_field(uint32_t max) { return kStringPrefixSize + max; }

struct ErrorCodeInfo {
  const char* name;
  int err;
};

// Indexed by code; [0] is the fallback for unknown codes.
constexpr ErrorCodeInfo kErrorCodes[] = {
    {"Unknown", EIO},
    {"BadFrame", EPROTO},
    {"BadMagic", EILSEQ},
    {"BadVersion", EPROTONOSUPPORT},
    {"UnknownType", EBADRQC},
    {"TooLarge", EMSGSIZE},
    {"BadCrc", EBADMSG},
    {"AuthFailed", EACCES},
    {"Busy", EBUSY},
    {"SizeMismatch", ERANGE},
    {"NotAuthoritative", ESTALE},
    {"Protocol", ENOMSG},
    {"Internal", EIO},
    {"Cancelled", ECANCELED},
    {"HandoverLost", ENOTRECOVERABLE},
    {"NotEmpty", ENOTEMPTY},
    {"NoSpace", ENOSPC},
    {"UnknownMigration", ESRCH},
    {"TlsRequired", EKEYREJECTED},
    {"NotCommitted", ECONNABORTED},
    {"BaseMismatch", EMEDIUMTYPE},
};
static_assert(std::size(kErrorCodes) == kMaxErrorCode + 1);

}  // namespace

const char* frame_type_name(FrameType type) {
  switch (type) {
    case FrameType::Hello: return "HELLO";
    case FrameType::Auth: return "AUTH";
    case FrameType::AuthOk: return "AUTH_OK";
    case FrameType::Start: return "START";
    case FrameType::Data: return "DATA";
    case FrameType::Ack: return "ACK";
    case FrameType::Handover: return "HANDOVER";
    case FrameType::Pull: return "PULL";
    case FrameType::CancelPull: return "CANCEL_PULL";
    case FrameType::Progress: return "PROGRESS";
    case FrameType::Heartbeat: return "HEARTBEAT";
    case FrameType::Error: return "ERROR";
    case FrameType::Done: return "DONE";
    case FrameType::Control: return "CONTROL";
    case FrameType::ControlReply: return "CONTROL_REPLY";
    case FrameType::HandoverAck: return "HANDOVER_ACK";
    case FrameType::PushAck: return "PUSH_ACK";
    case FrameType::StartOk: return "START_OK";
    case FrameType::Sums: return "SUMS";
    case FrameType::SumsReply: return "SUMS_REPLY";
    case FrameType::Forward: return "FORWARD";
    case FrameType::ForwardReply: return "FORWARD_REPLY";
  }
  return "UNKNOWN";
}

uint32_t max_payload_length(FrameType type) {
  switch (type) {
    case FrameType::Hello: return kMaxPreAuthPayload;
    case FrameType::Auth: return kMacSize;
    case FrameType::AuthOk: return kMacSize;
    case FrameType::Start:
      return string_field(kMaxStringLength) + string_field(kMaxControlJson) + 8 + 4 + 8 +
             string_field(kMaxStringLength);
    case FrameType::Data: return kDataHeaderSize + kMaxDataLength;
    case FrameType::Ack: return 8 + 8 + 4;
    case FrameType::Handover: return kMaxHandoverPayload;
    case FrameType::Pull: return 8 + 4 + 1;
    case FrameType::CancelPull: return 8 + 4;
    case FrameType::Progress:
    case FrameType::Control:
    case FrameType::ControlReply: return string_field(kMaxControlJson);
    case FrameType::Heartbeat: return 8 + 8;
    case FrameType::Error: return 4 + string_field(kMaxStringLength);
    case FrameType::Done: return 8 + 8;
    case FrameType::HandoverAck: return 8;
    case FrameType::PushAck: return 8;
    case FrameType::StartOk: return string_field(kMaxControlJson);
    case FrameType::Sums: return kSumsFixedSize;
    case FrameType::SumsReply: return kSumsFixedSize + 8 * kMaxSumsCount;
    case FrameType::Forward: return kForwardHeaderSize + kMaxDataLength;
    case FrameType::ForwardReply: return 4;
  }
  return 0;
}

const char* error_code_name(uint32_t code) {
  return code <= kMaxErrorCode ? kErrorCodes[code].name : kErrorCodes[0].name;
}

int error_code_errno(ErrorCode code) {
  auto i = static_cast<uint32_t>(code);
  return i <= kMaxErrorCode ? kErrorCodes[i].err : EIO;
}

Status protocol_error(ErrorCode code, std::string message) {
  return Status::error(std::move(message), error_code_errno(code));
}

ErrorCode error_code_of(const Status& s) {
  for (uint32_t i = 1; i <= kMaxErrorCode; ++i) {
    if (kErrorCodes[i].err == s.errno_value()) return static_cast<ErrorCode>(i);
  }
  return ErrorCode::Internal;
}

}  // namespace livemig
