// Big-endian (network order) encoding for the peer protocol: fixed-position
// loads and stores, a ByteWriter that appends fields to a std::string, and a
// ByteReader that parses fields from untrusted bytes.
//
// ByteReader never reads past its input, never throws, and checks every
// length and count against its limit (and against the bytes left) before the
// caller allocates anything for it. Its error is sticky, like a stream's: the
// first failure is kept, later reads return zeros/empties, and finish()
// reports it. So a decoder reads its fields in a straight line and checks once
// at the end. Errors are protocol_error() Status values: truncation and
// trailing bytes are BadFrame, a length over its limit is TooLarge.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "common/protocol_format.h"
#include "common/status.h"

namespace livemig {

inline void store_be16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void store_be32(uint8_t* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}
inline void store_be64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}
inline uint16_t load_be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
inline uint32_t load_be32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t load_be64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}

// Little-endian (the state file's header slots, CRC-32C's table fold,
// lm-workload's on-disk formats), whatever the host's order.
inline void store_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}
inline void store_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}
inline uint32_t load_le32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A view of a string's bytes as unsigned bytes.
inline std::span<const uint8_t> byte_span(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Appends big-endian fields to a string it does not own.
class ByteWriter {
 public:
  // REQUIRES: out outlives the writer.
  explicit ByteWriter(std::string* out) : out_(out) {}

  void u8(uint8_t v) { out_->push_back(static_cast<char>(v)); }
  void u16(uint16_t v);
  void u32(uint32_t v);
  void u64(uint64_t v);
  // The bytes as they are, no length.
  void bytes(const void* data, size_t n) { out_->append(static_cast<const char*>(data), n); }
  void bytes(std::span<const uint8_t> b) { bytes(b.data(), b.size()); }
  template <size_t N>
  void array(const std::array<uint8_t, N>& a) {
    bytes(a.data(), N);
  }
  // A u32 length, then the bytes. REQUIRES: s.size() <= UINT32_MAX
  void string(std::string_view s);

 private:
  std::string* out_;
};

// Reads big-endian fields from bytes it does not own. Field names given to
// each read appear in error messages ("ACK payload: truncated at offset ...").
class ByteReader {
 public:
  // `what` names the whole ("HELLO payload"). REQUIRES: bytes outlive the reader.
  ByteReader(std::span<const uint8_t> bytes, std::string_view what) : in_(bytes), what_(what) {}

  uint8_t u8(std::string_view field);
  uint16_t u16(std::string_view field);
  uint32_t u32(std::string_view field);
  uint64_t u64(std::string_view field);
  // The next n bytes, a view into the input; empty after a failure.
  std::span<const uint8_t> bytes(size_t n, std::string_view field);
  template <size_t N>
  std::array<uint8_t, N> array(std::string_view field) {
    std::array<uint8_t, N> a{};
    auto b = bytes(N, field);
    if (b.size() == N) std::copy(b.begin(), b.end(), a.begin());
    return a;
  }
  // A u32 length then that many bytes. The length is checked against
  // max_length (TooLarge) and the bytes left (BadFrame) before allocating.
  std::string string(uint32_t max_length, std::string_view field);
  // A u32 element count, checked against max_count (TooLarge) and against the
  // bytes left for elements of element_size bytes (BadFrame), so the caller
  // may reserve() the result. 0 after a failure.
  uint32_t count(uint32_t max_count, size_t element_size, std::string_view field);
  // Everything not read yet, consumed.
  std::span<const uint8_t> rest();

  size_t remaining() const { return in_.size() - pos_; }
  bool ok() const { return status_.is_ok(); }
  // Records a failure found by the caller (a bad field value); the first
  // failure wins. REQUIRES: !s.is_ok()
  void fail(Status s);
  // Records a failure with `code` and "<what>: <message>".
  void fail(ErrorCode code, std::string_view message);
  // The first failure, or BadFrame if bytes are left over, or ok.
  Status finish() const;
  const std::string& what() const { return what_; }

 private:
  // True (and advances) if n bytes are left; records a truncation otherwise.
  bool take(size_t n, std::string_view field, const uint8_t** p);

  std::span<const uint8_t> in_;
  size_t pos_ = 0;
  std::string what_;
  Status status_;
};

}  // namespace livemig
