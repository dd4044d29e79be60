#include "common/byte_order.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>

using namespace livemig;

TEST_CASE("byte writer output reads back field by field", "[frame]") {
  std::string out;
  ByteWriter w(&out);
  w.u8(0xAB);
  w.u16(0x1234);
  w.u32(0xDEADBEEF);
  w.u64(0x0102030405060708);
  w.string("hello");
  w.array(std::array<uint8_t, 3>{7, 8, 9});
  CHECK(out.size() == 1 + 2 + 4 + 8 + 4 + 5 + 3);
  CHECK(out.substr(1, 2) == "\x12\x34");

  ByteReader r(byte_span(out), "test");
  CHECK(r.u8("a") == 0xAB);
  CHECK(r.u16("b") == 0x1234);
  CHECK(r.u32("c") == 0xDEADBEEF);
  CHECK(r.u64("d") == 0x0102030405060708);
  CHECK(r.string(5, "e") == "hello");
  CHECK(r.array<3>("f") == std::array<uint8_t, 3>{7, 8, 9});
  CHECK(r.finish().is_ok());
}

TEST_CASE("byte reader keeps the first failure and returns zeros after it", "[frame]") {
  std::string in("\x00\x01\x02", 3);
  ByteReader r(byte_span(in), "thing");
  CHECK(r.u16("first") == 1);
  CHECK(r.u32("second") == 0);
  CHECK_FALSE(r.ok());
  CHECK(r.u8("third") == 0);  // a byte is there, but the reader has failed
  Status s = r.finish();
  CHECK(s.message() == "thing: truncated at second: needs 4 bytes, 1 left");
  CHECK(error_code_of(s) == ErrorCode::BadFrame);
}

TEST_CASE("byte reader rejects a string longer than its limit as too large", "[frame]") {
  std::string in;
  ByteWriter w(&in);
  w.string("abcdef");
  ByteReader r(byte_span(in), "thing");
  CHECK(r.string(5, "name").empty());
  CHECK(error_code_of(r.finish()) == ErrorCode::TooLarge);
  CHECK(r.finish().message() == "thing: name length 6 exceeds the limit 5");
}

TEST_CASE("byte reader reports bytes left over as trailing", "[frame]") {
  std::string in("\x00\x01\x02", 3);
  ByteReader r(byte_span(in), "thing");
  r.u16("x");
  CHECK(r.finish().message() == "thing: 1 trailing bytes");
}

TEST_CASE("big-endian loads invert stores", "[frame]") {
  uint8_t b[8];
  store_be64(b, 0x8877665544332211);
  CHECK(b[0] == 0x88);
  CHECK(b[7] == 0x11);
  CHECK(load_be64(b) == 0x8877665544332211);
  store_be32(b, 0xA1B2C3D4);
  CHECK(load_be32(b) == 0xA1B2C3D4);
  store_be16(b, 0xBEEF);
  CHECK(load_be16(b) == 0xBEEF);
}

TEST_CASE("little-endian loads read the low byte first", "[frame]") {
  const uint8_t bytes[8] = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x88};
  CHECK(load_le32(bytes) == 0x04030201u);
  CHECK(load_le64(bytes) == 0x8807060504030201ull);
  CHECK(load_be32(bytes) == 0x01020304u);
}

TEST_CASE("little-endian stores put the low byte first and load back", "[frame]") {
  uint8_t bytes[8] = {};
  store_le64(bytes, 0x8807060504030201ull);
  CHECK(bytes[0] == 0x01);
  CHECK(bytes[7] == 0x88);
  CHECK(load_le64(bytes) == 0x8807060504030201ull);
  store_le32(bytes, 0xa0b0c0d0u);
  CHECK(bytes[0] == 0xd0);
  CHECK(load_le32(bytes) == 0xa0b0c0d0u);
}
