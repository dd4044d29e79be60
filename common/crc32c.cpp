#include "common/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include "common/byte_order.h"

namespace livemig {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78;

// kTables[0] is the classic byte-at-a-time table; kTables[k][b] is the CRC of
// byte b followed by k zero bytes, which lets the loop fold 8 bytes at once.
using Tables = std::array<std::array<uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1) ? kPolyReflected : 0);
    t[0][b] = c;
  }
  for (size_t k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  }
  return t;
}

constexpr Tables kTables = make_tables();

// The working register (already inverted) over n bytes, 8 at a time.
uint32_t software_raw(const uint8_t* p, size_t n, uint32_t c) {
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v = load_le64(p) ^ c;
    c = kTables[7][v & 0xFF] ^ kTables[6][(v >> 8) & 0xFF] ^ kTables[5][(v >> 16) & 0xFF] ^
        kTables[4][(v >> 24) & 0xFF] ^ kTables[3][(v >> 32) & 0xFF] ^ kTables[2][(v >> 40) & 0xFF] ^
        kTables[1][(v >> 48) & 0xFF] ^ kTables[0][v >> 56];
  }
  for (; n > 0; --n, ++p) c = (c >> 8) ^ kTables[0][(c ^ *p) & 0xFF];
  return c;
}

#if defined(__x86_64__)
// The working register over n bytes: single bytes up to 8-byte alignment,
// then 8 bytes per crc32 instruction, then the tail.
__attribute__((target("sse4.2"))) uint32_t hardware_raw(const uint8_t* p, size_t n, uint32_t c) {
  for (; n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0; --n, ++p) c = _mm_crc32_u8(c, *p);
  uint64_t c64 = c;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c64 = _mm_crc32_u64(c64, v);
  }
  c = static_cast<uint32_t>(c64);
  for (; n > 0; --n, ++p) c = _mm_crc32_u8(c, *p);
  return c;
}
#endif

using Impl = uint32_t (*)(const void*, size_t, uint32_t);

Impl choose_impl() { return crc32c_hardware_available() ? crc32c_hardware : crc32c_software; }

}  // namespace

uint32_t crc32c_software(const void* data, size_t n, uint32_t crc) {
  return ~software_raw(static_cast<const uint8_t*>(data), n, ~crc);
}

bool crc32c_hardware_available() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

uint32_t crc32c_hardware(const void* data, size_t n, uint32_t crc) {
#if defined(__x86_64__)
  return ~hardware_raw(static_cast<const uint8_t*>(data), n, ~crc);
#else
  return crc32c_software(data, n, crc);
#endif
}

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  static const Impl impl = choose_impl();
  return impl(data, n, crc);
}

}  // namespace livemig
