// What the fuzz targets share: a checked invariant that aborts (so libFuzzer
// and the replayer report it as a crash with the input that broke it), and a
// reader that takes typed values off the front of the fuzzer's bytes.
// Built with g++ (the replayers) as well as clang, so it uses no libFuzzer
// header (FuzzedDataProvider).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

// Aborts with a message if `cond` is false: an invariant the code under test
// broke. printf-style message after the condition.
#define FUZZ_CHECK(cond, ...)                                                      \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n  ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                           \
      std::fprintf(stderr, "\n");                                                  \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

namespace livemig::fuzz {

// Reads the fuzzer's bytes front to back. Past the end every read yields
// zeros (or an empty view), so a target never has to check what is left.
class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : p_(data), n_(size) {}

  bool empty() const { return n_ == 0; }
  size_t left() const { return n_; }

  uint8_t byte() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }

  // An integer from the next sizeof(T) bytes, little-endian.
  template <typename T>
    requires std::is_integral_v<T>
  T integral() {
    std::make_unsigned_t<T> v = 0;
    for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<std::make_unsigned_t<T>>(byte()) << (8 * i);
    return static_cast<T>(v);
  }

  // The next n bytes (fewer if fewer are left).
  std::string_view bytes(size_t n) {
    n = std::min(n, n_);
    std::string_view v(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    n_ -= n;
    return v;
  }

  // N bytes, zero-filled past the end.
  template <size_t N>
  std::array<uint8_t, N> array() {
    std::array<uint8_t, N> a{};
    std::string_view b = bytes(N);
    std::memcpy(a.data(), b.data(), b.size());
    return a;
  }

  std::string_view rest() { return bytes(n_); }

 private:
  const uint8_t* p_;
  size_t n_;
};

}  // namespace livemig::fuzz
