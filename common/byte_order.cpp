#include "common/byte_order.h"

#include <fmt/format.h>

namespace livemig {

void ByteWriter::u16(uint16_t v) {
  uint8_t b[2];
  store_be16(b, v);
  bytes(b, sizeof b);
}

void ByteWriter::u32(uint32_t v) {
  uint8_t b[4];
  store_be32(b, v);
  bytes(b, sizeof b);
}

void ByteWriter::u64(uint64_t v) {
  uint8_t b[8];
  store_be64(b, v);
  bytes(b, sizeof b);
}

void ByteWriter::string(std::string_view s) {
  u32(static_cast<uint32_t>(s.size()));
  bytes(s.data(), s.size());
}

bool ByteReader::take(size_t n, std::string_view field, const uint8_t** p) {
  if (!ok()) return false;
  if (n > remaining()) {
    fail(ErrorCode::BadFrame,
         fmt::format("truncated at {}: needs {} bytes, {} left", field, n, remaining()));
    return false;
  }
  *p = in_.data() + pos_;
  pos_ += n;
  return true;
}

uint8_t ByteReader::u8(std::string_view field) {
  const uint8_t* p;
  return take(1, field, &p) ? p[0] : 0;
}

uint16_t ByteReader::u16(std::string_view field) {
  const uint8_t* p;
  return take(2, field, &p) ? load_be16(p) : 0;
}

uint32_t ByteReader::u32(std::string_view field) {
  const uint8_t* p;
  return take(4, field, &p) ? load_be32(p) : 0;
}

uint64_t ByteReader::u64(std::string_view field) {
  const uint8_t* p;
  return take(8, field, &p) ? load_be64(p) : 0;
}

std::span<const uint8_t> ByteReader::bytes(size_t n, std::string_view field) {
  const uint8_t* p;
  if (!take(n, field, &p)) return {};
  return {p, n};
}

std::string ByteReader::string(uint32_t max_length, std::string_view field) {
  uint32_t n = u32(field);
  if (!ok()) return {};
  if (n > max_length) {
    fail(ErrorCode::TooLarge,
         fmt::format("{} length {} exceeds the limit {}", field, n, max_length));
    return {};
  }
  auto b = bytes(n, field);
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

uint32_t ByteReader::count(uint32_t max_count, size_t element_size, std::string_view field) {
  uint32_t n = u32(field);
  if (!ok()) return 0;
  if (n > max_count) {
    fail(ErrorCode::TooLarge, fmt::format("{} {} exceeds the limit {}", field, n, max_count));
    return 0;
  }
  if (uint64_t{n} * element_size > remaining()) {
    fail(ErrorCode::BadFrame, fmt::format("truncated: {} {} needs {} bytes, {} left", field, n,
                                          uint64_t{n} * element_size, remaining()));
    return 0;
  }
  return n;
}

std::span<const uint8_t> ByteReader::rest() {
  if (!ok()) return {};
  auto r = in_.subspan(pos_);
  pos_ = in_.size();
  return r;
}

void ByteReader::fail(Status s) {
  if (ok()) status_ = std::move(s);
}

void ByteReader::fail(ErrorCode code, std::string_view message) {
  if (ok()) status_ = protocol_error(code, fmt::format("{}: {}", what_, message));
}

Status ByteReader::finish() const {
  if (!ok()) return status_;
  if (remaining() != 0) {
    return protocol_error(ErrorCode::BadFrame,
                          fmt::format("{}: {} trailing bytes", what_, remaining()));
  }
  return Status::ok();
}

}  // namespace livemig
