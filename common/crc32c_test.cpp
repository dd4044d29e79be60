#include "common/crc32c.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using livemig::crc32c;
using livemig::crc32c_hardware;
using livemig::crc32c_hardware_available;
using livemig::crc32c_software;

namespace {

std::vector<uint8_t> random_bytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

}  // namespace

TEST_CASE("crc32c of the check string 123456789 is 0xE3069283", "[crc32c]") {
  const char* s = "123456789";
  CHECK(crc32c(s, 9) == 0xE3069283u);
  CHECK(crc32c_software(s, 9) == 0xE3069283u);
  if (crc32c_hardware_available()) CHECK(crc32c_hardware(s, 9) == 0xE3069283u);
}

TEST_CASE("crc32c matches the RFC 3720 test vectors", "[crc32c]") {
  uint8_t buf[32];
  std::memset(buf, 0, sizeof buf);
  CHECK(crc32c(buf, 32) == 0x8A9136AAu);
  CHECK(crc32c_software(buf, 32) == 0x8A9136AAu);
  std::memset(buf, 0xFF, sizeof buf);
  CHECK(crc32c(buf, 32) == 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(i);
  CHECK(crc32c(buf, 32) == 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(31 - i);
  CHECK(crc32c(buf, 32) == 0x113FDB5Cu);
}

TEST_CASE("crc32c of no bytes leaves the running crc unchanged", "[crc32c]") {
  CHECK(crc32c(nullptr, 0) == 0u);
  CHECK(crc32c("", 0, 0x12345678u) == 0x12345678u);
  CHECK(crc32c_software(nullptr, 0, 0xDEADBEEFu) == 0xDEADBEEFu);
}

TEST_CASE("crc32c extended piece by piece equals crc32c of the whole", "[crc32c]") {
  std::mt19937_64 rng(7);
  auto data = random_bytes(rng, 1000);
  uint32_t whole = crc32c(data.data(), data.size());
  for (size_t split : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{500},
                       size_t{999}, size_t{1000}}) {
    INFO("split at " << split);
    uint32_t first = crc32c(data.data(), split);
    CHECK(crc32c(data.data() + split, data.size() - split, first) == whole);
    CHECK(crc32c_software(data.data() + split, data.size() - split,
                          crc32c_software(data.data(), split)) == whole);
  }
}

TEST_CASE("crc32c hardware and software agree on every length and alignment", "[crc32c]") {
  if (!crc32c_hardware_available()) {
    WARN("no SSE4.2 on this CPU: only the software path is tested");
    return;
  }
  std::mt19937_64 rng(12345);
  auto data = random_bytes(rng, 4096 + 64);
  for (size_t align = 0; align < 16; ++align) {
    for (size_t len = 0; len <= 300; ++len) {
      INFO("align " << align << " length " << len);
      const uint8_t* p = data.data() + align;
      uint32_t seed = static_cast<uint32_t>(rng());
      REQUIRE(crc32c_hardware(p, len, seed) == crc32c_software(p, len, seed));
    }
  }
  for (size_t len : {size_t{1023}, size_t{1024}, size_t{4095}, size_t{4096}}) {
    INFO("length " << len);
    CHECK(crc32c_hardware(data.data() + 3, len) == crc32c_software(data.data() + 3, len));
  }
}

TEST_CASE("crc32c of a large buffer matches the software path", "[crc32c]") {
  std::mt19937_64 rng(99);
  auto data = random_bytes(rng, 16 * 1024 * 1024 + 5);
  CHECK(crc32c(data.data() + 1, data.size() - 1) ==
        crc32c_software(data.data() + 1, data.size() - 1));
}

TEST_CASE("crc32c detects a single flipped bit anywhere", "[crc32c]") {
  std::mt19937_64 rng(3);
  auto data = random_bytes(rng, 64);
  uint32_t good = crc32c(data.data(), data.size());
  for (size_t bit = 0; bit < data.size() * 8; ++bit) {
    data[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    CHECK(crc32c(data.data(), data.size()) != good);
    data[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
  }
}
