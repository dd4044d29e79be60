#include "common/frame_codec.h"

#include <fmt/format.h>

#include <algorithm>
#include <cassert>

#include "common/byte_order.h"
#include "common/crc32c.h"

namespace livemig {
namespace {

// Collects the first failed check of one payload, with the frame name in front.
class Checks {
 public:
  explicit Checks(FrameType type) : type_(type) {}

  template <typename... Args>
  void require(bool cond, ErrorCode code, fmt::format_string<Args...> f, Args&&... args) {
    if (cond || !status_.is_ok()) return;
    status_ = protocol_error(code, fmt::format("{} payload: {}", frame_type_name(type_),
                                               fmt::format(f, std::forward<Args>(args)...)));
  }
  void length(std::string_view field, size_t len, uint32_t max) {
    require(len <= max, ErrorCode::TooLarge, "{} length {} exceeds the limit {}", field, len, max);
  }
  // first + count must not wrap around 2^64.
  void no_overflow(std::string_view field, uint64_t first, uint64_t count) {
    require(count <= UINT64_MAX - first, ErrorCode::BadFrame, "{} ({} + {}) overflows 64 bits",
            field, first, count);
  }
  Status status() const { return status_; }

 private:
  FrameType type_;
  Status status_;
};

// ---- HELLO
void write(ByteWriter& w, const HelloPayload& p) {
  w.u16(p.protocol_version);
  w.array(p.nonce);
  w.string(p.peer_name);
  w.string(p.purpose);
}
void read(ByteReader& r, HelloPayload& p) {
  p.protocol_version = r.u16("protocol_version");
  p.nonce = r.array<kNonceSize>("nonce");
  p.peer_name = r.string(kMaxStringLength, "peer_name");
  p.purpose = r.string(kMaxStringLength, "purpose");
}
Status check(const HelloPayload& p) {
  Checks c(p.kType);
  c.length("peer_name", p.peer_name.size(), kMaxStringLength);
  c.length("purpose", p.purpose.size(), kMaxStringLength);
  c.require(p.purpose == kPurposePeer || p.purpose == kPurposeControl, ErrorCode::BadFrame,
            "purpose \"{}\" is neither \"{}\" nor \"{}\"", p.purpose, kPurposePeer,
            kPurposeControl);
  return c.status();
}

// ---- AUTH, AUTH_OK, HANDOVER_ACK
void write(ByteWriter& w, const AuthPayload& p) { w.array(p.mac); }
void read(ByteReader& r, AuthPayload& p) { p.mac = r.array<kMacSize>("mac"); }
Status check(const AuthPayload&) { return Status::ok(); }

void write(ByteWriter& w, const AuthOkPayload& p) { w.array(p.mac); }
void read(ByteReader& r, AuthOkPayload& p) { p.mac = r.array<kMacSize>("mac"); }
Status check(const AuthOkPayload&) { return Status::ok(); }

void write(ByteWriter& w, const HandoverAckPayload& p) { w.u64(p.generation); }
void read(ByteReader& r, HandoverAckPayload& p) { p.generation = r.u64("generation"); }
Status check(const HandoverAckPayload&) { return Status::ok(); }

void write(ByteWriter& w, const PushAckPayload& p) { w.u64(p.frames); }
void read(ByteReader& r, PushAckPayload& p) { p.frames = r.u64("frames"); }
Status check(const PushAckPayload&) { return Status::ok(); }

// ---- SUMS, SUMS_REPLY
void write(ByteWriter& w, const SumsPayload& p) {
  w.u64(p.offset);
  w.u32(p.unit);
  w.u32(p.count);
}
void read(ByteReader& r, SumsPayload& p) {
  p.offset = r.u64("offset");
  p.unit = r.u32("unit");
  p.count = r.u32("count");
}
Status check(const SumsPayload& p) {
  Checks c(p.kType);
  c.require(p.unit > 0 && p.count > 0, ErrorCode::BadFrame, "unit {} and count {} must not be 0", p.unit, p.count);
  c.require(p.count <= kMaxSumsCount, ErrorCode::TooLarge, "count {} exceeds the limit {}", p.count, kMaxSumsCount);
  c.require(uint64_t{p.unit} * p.count <= kMaxSumsBytes, ErrorCode::TooLarge, "{} units of {} bytes exceed {} bytes",
            p.count, p.unit, kMaxSumsBytes);
  c.no_overflow("offset + unit * count", p.offset, uint64_t{p.unit} * p.count);
  return c.status();
}

void write(ByteWriter& w, const SumsReplyPayload& p) {
  w.u64(p.offset);
  w.u32(p.unit);
  w.u32(static_cast<uint32_t>(p.hashes.size()));
  for (uint64_t h : p.hashes) w.u64(h);
}
void read(ByteReader& r, SumsReplyPayload& p) {
  p.offset = r.u64("offset");
  p.unit = r.u32("unit");
  uint32_t n = r.count(kMaxSumsCount, 8, "hash count");
  p.hashes.reserve(n);
  for (uint32_t i = 0; i < n && r.ok(); ++i) p.hashes.push_back(r.u64("hash"));
}
Status check(const SumsReplyPayload& p) {
  Checks c(p.kType);
  c.require(p.hashes.size() <= kMaxSumsCount, ErrorCode::TooLarge, "{} hashes exceed the limit {}", p.hashes.size(),
            kMaxSumsCount);
  return c.status();
}

// ---- FORWARD, FORWARD_REPLY
void write(ByteWriter& w, const ForwardPayload& p) {
  w.u32(static_cast<uint32_t>(p.op));
  w.u32(p.flags);
  w.u64(p.offset);
  w.u32(p.length);
  w.bytes(p.bytes);
}
void read(ByteReader& r, ForwardPayload& p) {
  p.op = static_cast<ForwardOp>(r.u32("op"));
  p.flags = r.u32("flags");
  p.offset = r.u64("offset");
  p.length = r.u32("length");
  p.bytes = r.rest();
}
Status check(const ForwardPayload& p) {
  Checks c(p.kType);
  const auto op = static_cast<uint32_t>(p.op);
  c.require(op >= 1 && op <= kMaxForwardOp, ErrorCode::BadFrame, "unknown op {}", op);
  c.require((p.flags & ~(kForwardFua | kForwardMayTrim)) == 0, ErrorCode::BadFrame, "unknown flags {:#x}", p.flags);
  c.require(p.length <= kMaxDataLength, ErrorCode::TooLarge, "length {} exceeds the limit {}", p.length,
            kMaxDataLength);
  c.no_overflow("offset + length", p.offset, p.length);
  if (p.op == ForwardOp::Write)
    c.require(p.bytes.size() == p.length, ErrorCode::BadFrame, "length {} but {} data bytes", p.length,
              p.bytes.size());
  else
    c.require(p.bytes.empty(), ErrorCode::BadFrame, "{} data bytes after an op that takes none", p.bytes.size());
  if (p.op == ForwardOp::Flush)
    c.require(p.offset == 0 && p.length == 0, ErrorCode::BadFrame, "a flush with offset {} length {}", p.offset,
              p.length);
  return c.status();
}

void write(ByteWriter& w, const ForwardReplyPayload& p) { w.u32(p.error); }
void read(ByteReader& r, ForwardReplyPayload& p) { p.error = r.u32("error"); }
Status check(const ForwardReplyPayload&) { return Status::ok(); }

// ---- START
void write(ByteWriter& w, const StartPayload& p) {
  w.string(p.mode);
  w.string(p.params_json);
  w.u64(p.image_size);
  w.u32(p.block_size);
  w.u64(p.segment_size);
  w.string(p.migration_id);
}
void read(ByteReader& r, StartPayload& p) {
  p.mode = r.string(kMaxStringLength, "mode");
  p.params_json = r.string(kMaxControlJson, "params_json");
  p.image_size = r.u64("image_size");
  p.block_size = r.u32("block_size");
  p.segment_size = r.u64("segment_size");
  p.migration_id = r.string(kMaxStringLength, "migration_id");
}
Status check(const StartPayload& p) {
  Checks c(p.kType);
  c.length("mode", p.mode.size(), kMaxStringLength);
  c.length("params_json", p.params_json.size(), kMaxControlJson);
  c.length("migration_id", p.migration_id.size(), kMaxStringLength);
  return c.status();
}

// ---- DATA
void write_data_header(ByteWriter& w, const DataPayload& p) {
  w.u64(p.offset);
  w.u32(p.length);
  w.u32(p.flags);
}
void write(ByteWriter& w, const DataPayload& p) {
  write_data_header(w, p);
  w.bytes(p.bytes);
}
void read(ByteReader& r, DataPayload& p) {
  p.offset = r.u64("offset");
  p.length = r.u32("length");
  p.flags = r.u32("flags");
  p.bytes = r.rest();
}
Status check(const DataPayload& p) {
  Checks c(p.kType);
  bool zero = p.flags & kFlagZero;
  bool compressed = p.flags & kFlagCompressed;
  bool base = p.flags & kFlagBase;
  c.require((p.flags & ~(kFlagZero | kFlagCompressed | kFlagBase)) == 0, ErrorCode::BadFrame,
            "unknown flags {:#x}", p.flags);
  c.require(int(zero) + int(compressed) + int(base) <= 1, ErrorCode::BadFrame,
            "more than one of the zero, compressed and base flags");
  c.require(p.length <= kMaxDataLength, ErrorCode::TooLarge, "length {} exceeds the limit {}",
            p.length, kMaxDataLength);
  c.no_overflow("offset + length", p.offset, p.length);
  size_t n = p.bytes.size();
  if (zero) {
    c.require(n == 0, ErrorCode::BadFrame, "zero flag but {} data bytes follow", n);
  } else if (base) {
    // One 8-byte checksum per block, and no block is smaller than 512 bytes.
    c.require(n > 0 && n % 8 == 0 && n <= p.length / 64, ErrorCode::BadFrame,
              "base flag with {} checksum bytes for {} bytes of blocks", n, p.length);
  } else if (compressed) {
    c.require(n > 0, ErrorCode::BadFrame, "compressed flag but no data bytes");
    c.require(n <= kMaxDataLength, ErrorCode::TooLarge, "{} compressed bytes exceed the limit {}",
              n, kMaxDataLength);
  } else {
    c.require(n == p.length, ErrorCode::BadFrame, "length {} but {} data bytes", p.length, n);
  }
  return c.status();
}

// ---- ACK, PULL, CANCEL_PULL
void write(ByteWriter& w, const AckPayload& p) {
  w.u64(p.acked_request_id);
  w.u64(p.offset);
  w.u32(p.length);
}
void read(ByteReader& r, AckPayload& p) {
  p.acked_request_id = r.u64("acked_request_id");
  p.offset = r.u64("offset");
  p.length = r.u32("length");
}
Status check(const AckPayload& p) {
  Checks c(p.kType);
  c.no_overflow("offset + length", p.offset, p.length);
  return c.status();
}

void write(ByteWriter& w, const PullPayload& p) {
  w.u64(p.offset);
  w.u32(p.length);
  w.u8(p.priority);
}
void read(ByteReader& r, PullPayload& p) {
  p.offset = r.u64("offset");
  p.length = r.u32("length");
  p.priority = r.u8("priority");
}
Status check(const PullPayload& p) {
  Checks c(p.kType);
  c.no_overflow("offset + length", p.offset, p.length);
  return c.status();
}

void write(ByteWriter& w, const CancelPullPayload& p) {
  w.u64(p.offset);
  w.u32(p.length);
}
void read(ByteReader& r, CancelPullPayload& p) {
  p.offset = r.u64("offset");
  p.length = r.u32("length");
}
Status check(const CancelPullPayload& p) {
  Checks c(p.kType);
  c.no_overflow("offset + length", p.offset, p.length);
  return c.status();
}

// ---- HANDOVER
void write(ByteWriter& w, const HandoverPayload& p) {
  w.u64(p.generation);
  w.u64(p.remaining_blocks);
  w.u32(static_cast<uint32_t>(p.ranges.size()));
  for (const HandoverRange& range : p.ranges) {
    w.u64(range.first_block);
    w.u64(range.block_count);
    w.u32(range.heat);
  }
}
void read(ByteReader& r, HandoverPayload& p) {
  p.generation = r.u64("generation");
  p.remaining_blocks = r.u64("remaining_blocks");
  uint32_t n = r.count(kMaxHandoverRanges, kHandoverRangeSize, "range count");
  p.ranges.reserve(n);
  for (uint32_t i = 0; i < n && r.ok(); ++i) {
    HandoverRange range;
    range.first_block = r.u64("first_block");
    range.block_count = r.u64("block_count");
    range.heat = r.u32("heat");
    p.ranges.push_back(range);
  }
}
Status check(const HandoverPayload& p) {
  Checks c(p.kType);
  c.require(p.ranges.size() <= kMaxHandoverRanges, ErrorCode::TooLarge,
            "{} ranges exceed the limit {}", p.ranges.size(), kMaxHandoverRanges);
  uint64_t end = 0;  // end of the previous range
  for (size_t i = 0; i < p.ranges.size(); ++i) {
    const HandoverRange& range = p.ranges[i];
    c.require(range.block_count > 0, ErrorCode::BadFrame, "range {} is empty", i);
    c.require(range.first_block >= end, ErrorCode::BadFrame,
              "range {} starts at block {}, before the end {} of the range before it", i,
              range.first_block, end);
    c.no_overflow("range first_block + block_count", range.first_block, range.block_count);
    if (!c.status().is_ok()) break;
    end = range.first_block + range.block_count;
  }
  return c.status();
}

// ---- PROGRESS, CONTROL, CONTROL_REPLY: one JSON text
template <typename T>
void write_json(ByteWriter& w, const T& p) {
  w.string(p.json);
}
template <typename T>
void read_json(ByteReader& r, T& p) {
  p.json = r.string(kMaxControlJson, "json");
}
template <typename T>
Status check_json(const T& p) {
  Checks c(p.kType);
  c.length("json", p.json.size(), kMaxControlJson);
  return c.status();
}
void write(ByteWriter& w, const ProgressPayload& p) { write_json(w, p); }
void read(ByteReader& r, ProgressPayload& p) { read_json(r, p); }
Status check(const ProgressPayload& p) { return check_json(p); }
void write(ByteWriter& w, const ControlPayload& p) { write_json(w, p); }
void read(ByteReader& r, ControlPayload& p) { read_json(r, p); }
Status check(const ControlPayload& p) { return check_json(p); }
void write(ByteWriter& w, const ControlReplyPayload& p) { write_json(w, p); }
void read(ByteReader& r, ControlReplyPayload& p) { read_json(r, p); }
Status check(const ControlReplyPayload& p) { return check_json(p); }
void write(ByteWriter& w, const StartOkPayload& p) { write_json(w, p); }
void read(ByteReader& r, StartOkPayload& p) { read_json(r, p); }
Status check(const StartOkPayload& p) { return check_json(p); }

// ---- HEARTBEAT, ERROR, DONE
void write(ByteWriter& w, const HeartbeatPayload& p) {
  w.u64(p.sequence);
  w.u64(p.sender_time_ns);
}
void read(ByteReader& r, HeartbeatPayload& p) {
  p.sequence = r.u64("sequence");
  p.sender_time_ns = r.u64("sender_time_ns");
}
Status check(const HeartbeatPayload&) { return Status::ok(); }

void write(ByteWriter& w, const ErrorPayload& p) {
  w.u32(p.code);
  w.string(p.message);
}
void read(ByteReader& r, ErrorPayload& p) {
  p.code = r.u32("code");
  p.message = r.string(kMaxStringLength, "message");
}
Status check(const ErrorPayload& p) {
  Checks c(p.kType);
  c.length("message", p.message.size(), kMaxStringLength);
  return c.status();
}

void write(ByteWriter& w, const DonePayload& p) {
  w.u64(p.total_bytes_sent);
  w.u64(p.total_blocks);
}
void read(ByteReader& r, DonePayload& p) {
  p.total_bytes_sent = r.u64("total_bytes_sent");
  p.total_blocks = r.u64("total_blocks");
}
Status check(const DonePayload&) { return Status::ok(); }

// Fills the header fields of the frame in out[0, kFrameHeaderSize) from the
// payload that follows them.
void finish_frame(std::string& out, FrameType type, uint32_t flags, uint64_t request_id) {
  FrameHeader h;
  h.type = type;
  h.flags = flags;
  h.request_id = request_id;
  h.payload_length = static_cast<uint32_t>(out.size() - kFrameHeaderSize);
  h.payload_crc32c = crc32c(out.data() + kFrameHeaderSize, h.payload_length);
  encode_header(h, reinterpret_cast<uint8_t*>(out.data()));
}

// Decodes payload as alternative I of AnyPayload if that is `type`'s, else
// tries the next alternative.
template <size_t I = 0>
Result<AnyPayload> decode_as(FrameType type, std::span<const uint8_t> payload) {
  if constexpr (I == std::variant_size_v<AnyPayload>) {
    return protocol_error(ErrorCode::UnknownType,
                          fmt::format("unknown frame type {}", static_cast<uint16_t>(type)));
  } else {
    using T = std::variant_alternative_t<I, AnyPayload>;
    static_assert(static_cast<size_t>(T::kType) == I + 1, "AnyPayload is in FrameType order");
    if (T::kType != type) return decode_as<I + 1>(type, payload);
    Result<T> p = decode_payload<T>(payload);
    if (!p) return p.status();
    return AnyPayload(std::move(*p));
  }
}

}  // namespace

bool ForwardPayload::operator==(const ForwardPayload& o) const {
  return op == o.op && flags == o.flags && offset == o.offset && length == o.length && std::ranges::equal(bytes, o.bytes);
}

bool DataPayload::operator==(const DataPayload& o) const {
  return offset == o.offset && length == o.length && flags == o.flags &&
         std::ranges::equal(bytes, o.bytes);
}

void encode_header(const FrameHeader& h, uint8_t* out) {
  store_be32(out + kHeaderMagicOffset, kFrameMagic);
  store_be16(out + kHeaderVersionOffset, h.version);
  store_be16(out + kHeaderTypeOffset, static_cast<uint16_t>(h.type));
  store_be32(out + kHeaderFlagsOffset, h.flags);
  store_be64(out + kHeaderRequestIdOffset, h.request_id);
  store_be32(out + kHeaderLengthOffset, h.payload_length);
  store_be32(out + kHeaderCrcOffset, h.payload_crc32c);
}

Result<FrameHeader> decode_header(const uint8_t* bytes, uint32_t max_payload) {
  uint32_t magic = load_be32(bytes + kHeaderMagicOffset);
  if (magic != kFrameMagic) {
    return protocol_error(ErrorCode::BadMagic,
                          fmt::format("frame magic {:#010x} is not {:#010x} (\"LMIG\"): not a "
                                      "livemig peer, or the stream lost its framing",
                                      magic, kFrameMagic));
  }
  FrameHeader h;
  h.version = load_be16(bytes + kHeaderVersionOffset);
  if (h.version != kProtocolVersion) {
    return protocol_error(ErrorCode::BadVersion,
                          fmt::format("frame version {} is not supported (this side speaks {})",
                                      h.version, kProtocolVersion));
  }
  uint16_t type = load_be16(bytes + kHeaderTypeOffset);
  if (!is_known_frame_type(type)) {
    return protocol_error(ErrorCode::UnknownType, fmt::format("unknown frame type {}", type));
  }
  h.type = static_cast<FrameType>(type);
  h.flags = load_be32(bytes + kHeaderFlagsOffset);
  if ((h.flags & ~allowed_flags(h.type)) != 0) {
    return protocol_error(
        ErrorCode::BadFrame,
        fmt::format("{} frame has flags {:#x} it may not carry", frame_type_name(h.type), h.flags));
  }
  h.request_id = load_be64(bytes + kHeaderRequestIdOffset);
  h.payload_length = load_be32(bytes + kHeaderLengthOffset);
  h.payload_crc32c = load_be32(bytes + kHeaderCrcOffset);
  uint32_t limit = std::min(max_payload, max_payload_length(h.type));
  if (h.payload_length > limit) {
    return protocol_error(ErrorCode::TooLarge,
                          fmt::format("{} frame payload length {} exceeds the limit {}",
                                      frame_type_name(h.type), h.payload_length, limit));
  }
  return h;
}

Status verify_payload(const FrameHeader& h, std::span<const uint8_t> payload) {
  if (payload.size() != h.payload_length) {
    return protocol_error(ErrorCode::BadFrame,
                          fmt::format("{} frame has {} payload bytes, its header says {}",
                                      frame_type_name(h.type), payload.size(), h.payload_length));
  }
  uint32_t crc = crc32c(payload.data(), payload.size());
  if (crc != h.payload_crc32c) {
    return protocol_error(ErrorCode::BadCrc,
                          fmt::format("{} frame payload CRC-32C {:#010x} does not match the "
                                      "header's {:#010x}",
                                      frame_type_name(h.type), crc, h.payload_crc32c));
  }
  return Status::ok();
}

std::string encode_frame(FrameType type, uint32_t flags, uint64_t request_id,
                         std::string_view payload) {
  assert(payload.size() <= max_payload_length(type));
  assert((flags & ~allowed_flags(type)) == 0);
  std::string out(kFrameHeaderSize, '\0');
  out.append(payload);
  finish_frame(out, type, flags, request_id);
  return out;
}

template <Payload T>
Status validate_payload(const T& p) {
  return check(p);
}

template <Payload T>
std::string encode_payload(const T& p) {
  std::string out;
  ByteWriter w(&out);
  write(w, p);
  return out;
}

template <Payload T>
Result<T> decode_payload(std::span<const uint8_t> payload) {
  ByteReader r(payload, fmt::format("{} payload", frame_type_name(T::kType)));
  T p;
  read(r, p);
  if (Status s = r.finish(); !s) return s;
  if (Status s = check(p); !s) return s;
  return p;
}

template <Payload T>
Result<std::string> encode_message(const T& p, uint64_t request_id) {
  if (Status s = check(p); !s) return s;
  std::string out(kFrameHeaderSize, '\0');
  ByteWriter w(&out);
  write(w, p);
  assert(out.size() - kFrameHeaderSize <= max_payload_length(T::kType));
  finish_frame(out, T::kType, frame_flags(p), request_id);
  return out;
}

#define LIVEMIG_INSTANTIATE_PAYLOAD(T)                            \
  template Status validate_payload<T>(const T&);                  \
  template std::string encode_payload<T>(const T&);               \
  template Result<T> decode_payload<T>(std::span<const uint8_t>); \
  template Result<std::string> encode_message<T>(const T&, uint64_t);
LIVEMIG_INSTANTIATE_PAYLOAD(HelloPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(AuthPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(AuthOkPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(StartPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(DataPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(AckPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(HandoverPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(PullPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(CancelPullPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(ProgressPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(HeartbeatPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(ErrorPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(DonePayload)
LIVEMIG_INSTANTIATE_PAYLOAD(ControlPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(ControlReplyPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(HandoverAckPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(PushAckPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(StartOkPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(SumsPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(SumsReplyPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(ForwardPayload)
LIVEMIG_INSTANTIATE_PAYLOAD(ForwardReplyPayload)
#undef LIVEMIG_INSTANTIATE_PAYLOAD

Result<AnyPayload> decode_message(const FrameHeader& h, std::span<const uint8_t> payload) {
  if (Status s = verify_payload(h, payload); !s) return s;
  Result<AnyPayload> p = decode_as(h.type, payload);
  if (!p) return p;
  // PREPARE lives in the header only: the payload takes it from there.
  if (auto* hp = std::get_if<HandoverPayload>(&*p)) hp->prepare = (h.flags & kFlagPrepare) != 0;
  if (auto* ap = std::get_if<HandoverAckPayload>(&*p)) ap->prepare = (h.flags & kFlagPrepare) != 0;
  uint32_t implied = std::visit([](const auto& v) { return frame_flags(v); }, *p);
  if (implied != h.flags) {
    return protocol_error(
        ErrorCode::BadFrame,
        fmt::format("{} frame header flags {:#x} do not match its payload's {:#x}",
                    frame_type_name(h.type), h.flags, implied));
  }
  return p;
}

std::string encode_data_prefix(const DataPayload& p, uint64_t request_id) {
  assert(check(p).is_ok());
  std::string out(kFrameHeaderSize, '\0');
  ByteWriter w(&out);
  write_data_header(w, p);
  FrameHeader h;
  h.type = FrameType::Data;
  h.flags = p.flags;
  h.request_id = request_id;
  h.payload_length = static_cast<uint32_t>(kDataHeaderSize + p.bytes.size());
  h.payload_crc32c = crc32c(p.bytes.data(), p.bytes.size(),
                            crc32c(out.data() + kFrameHeaderSize, kDataHeaderSize));
  encode_header(h, reinterpret_cast<uint8_t*>(out.data()));
  return out;
}

ErrorPayload make_error_payload(const Status& s) {
  ErrorPayload e;
  e.code = static_cast<uint32_t>(error_code_of(s));
  e.message = s.message().substr(0, kMaxStringLength);
  return e;
}

Status status_from_error(const ErrorPayload& e) {
  ErrorCode code =
      e.code >= 1 && e.code <= kMaxErrorCode ? static_cast<ErrorCode>(e.code) : ErrorCode::Internal;
  return protocol_error(code,
                        fmt::format("peer reported {}: {}", error_code_name(e.code), e.message));
}

}  // namespace livemig
