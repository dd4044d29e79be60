#include "plugin/link_compression.h"

#include <zstd.h>

#include <random>
#include <vector>

#include <catch2/catch.hpp>

using namespace livemig;
using namespace std::chrono_literals;

namespace {

std::vector<uint8_t> text_like(size_t n) {
  std::vector<uint8_t> v(n);
  const char* words[] = {"block ", "storage ", "migration ", "segment ", "nbdkit ", "handover "};
  std::mt19937 rng(7);
  for (size_t i = 0; i < n;) {
    for (const char* c = words[rng() % 6]; *c && i < n; ++c) v[i++] = uint8_t(*c);
  }
  return v;
}

std::vector<uint8_t> random_bytes(size_t n) {
  std::vector<uint8_t> v(n);
  std::mt19937_64 rng(11);
  for (auto& b : v) b = uint8_t(rng());
  return v;
}

DataPayload compressed(uint64_t offset, uint32_t length, const std::string& z) {
  return DataPayload{offset, length, kFlagCompressed, {reinterpret_cast<const uint8_t*>(z.data()), z.size()}};
}

std::string bad_frame_message(const DataPayload& p) {
  std::string out;
  Status s = decompress_frame(p, out);
  REQUIRE_FALSE(s);
  CHECK(error_code_of(s) == ErrorCode::BadFrame);
  return s.message();
}

}  // namespace

TEST_CASE("link compression: a compressible frame round-trips; random data is refused as not worth it") {
  auto text = text_like(256 << 10);
  std::string z;
  REQUIRE(compress_frame(text, 1, z));
  CHECK(z.size() < text.size() / 3);
  std::string plain;
  REQUIRE(decompress_frame(compressed(4096, uint32_t(text.size()), z), plain));
  CHECK(std::equal(plain.begin(), plain.end(), text.begin(), text.end()));
  for (int level : {kMinCompressionLevel, -5, 3, kMaxCompressionLevel}) {
    REQUIRE(compress_frame(text, level, z));
    REQUIRE(decompress_frame(compressed(0, uint32_t(text.size()), z), plain));
    CHECK(std::equal(plain.begin(), plain.end(), text.begin(), text.end()));
  }
  auto noise = random_bytes(256 << 10);
  CHECK_FALSE(compress_frame(noise, 1, z));
  CHECK_FALSE(compress_frame({}, 1, z));
}

TEST_CASE("link compression: a frame that is not exactly `length` bytes of zstd is a bad frame") {
  auto text = text_like(64 << 10);
  std::string z;
  REQUIRE(compress_frame(text, 1, z));
  const uint32_t n = uint32_t(text.size());
  CHECK(bad_frame_message(compressed(0, n * 2, z)).find("holds 65536 bytes") != std::string::npos);
  CHECK(bad_frame_message(compressed(0, n / 2, z)).find("holds 65536 bytes") != std::string::npos);
  CHECK(bad_frame_message(compressed(0, n, z.substr(0, z.size() - 5))).find("truncated") != std::string::npos);
  CHECK(bad_frame_message(compressed(0, n, z + "xy")).find("2 bytes after") != std::string::npos);
  CHECK(bad_frame_message(compressed(0, n, std::string(40, 'g'))).find("not a zstd frame") != std::string::npos);
  // A frame that does not state its size (streamed without a pledged size).
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 0);
  std::string unsized(ZSTD_compressBound(n), '\0');
  size_t len = ZSTD_compress2(c, unsized.data(), unsized.size(), text.data(), n);
  ZSTD_freeCCtx(c);
  REQUIRE_FALSE(ZSTD_isError(len));
  unsized.resize(len);
  CHECK(bad_frame_message(compressed(0, n, unsized)).find("does not state its size") != std::string::npos);
  // A corrupted block inside a frame of the right size.
  std::string corrupt = z;
  for (size_t i = 12; i < corrupt.size(); i += 7) corrupt[i] = char(corrupt[i] ^ 0x5a);
  std::string out;
  CHECK_FALSE(decompress_frame(compressed(0, n, corrupt), out));
}

TEST_CASE("compression governor: off never compresses, zstd:N always tries N, a disabled one never") {
  auto now = CompressionGovernor::Clock::now();
  CompressionGovernor off(Compression{Compression::Kind::Off}, 0);
  CompressionGovernor fixed(Compression{Compression::Kind::Zstd, 5}, 0);
  for (int i = 0; i < 100; ++i) {
    CHECK_FALSE(off.level_for_next(8 << 20, 0, now));
    CHECK(fixed.level_for_next(0, 0, now) == 5);
  }
  CHECK(off.to_json()["active"] == false);
  CHECK(fixed.to_json()["setting"] == "zstd:5");
  fixed.disable("the destination cannot decompress");
  CHECK_FALSE(fixed.level_for_next(8 << 20, 0, now));
  CHECK(fixed.to_json()["reason"] == "the destination cannot decompress");
}

TEST_CASE("compression governor: auto compresses only while the link is backed up and the data shrinks") {
  CompressionGovernor gov(Compression{}, 0);
  auto t = CompressionGovernor::Clock::now();
  // The sender never finds data waiting in the queue: the link keeps up.
  for (int i = 0; i < 200; ++i) CHECK_FALSE(gov.level_for_next(0, 0, t));
  CHECK(gov.to_json()["reason"].get<std::string>().find("link keeps up") != std::string::npos);
  // The queue backs up: compression starts within a few dozen frames.
  int first = -1;
  for (int i = 0; i < 100 && first < 0; ++i)
    if (gov.level_for_next(4 << 20, 0, t)) first = i;
  CHECK(first > 0);
  CHECK(first < 40);
  // Frames stop shrinking: only one in kProbeEvery is tried.
  for (int i = 0; i < 100; ++i) gov.record_try(1, 256 << 10, 0, 100us);
  int tried = 0;
  for (unsigned i = 0; i < 32 * CompressionGovernor::kProbeEvery; ++i) tried += gov.level_for_next(4 << 20, 0, t) ? 1 : 0;
  CHECK(tried == 32);
  // They shrink again (a probe found it): every frame is tried.
  for (int i = 0; i < 100; ++i) gov.record_try(1, 256 << 10, 64 << 10, 500us);
  CHECK(gov.level_for_next(4 << 20, 0, t));
  CHECK(gov.level_for_next(4 << 20, 0, t));
  // The queue drains (the sender is the bottleneck now): it stops.
  bool stopped = false;
  for (int i = 0; i < 100 && !stopped; ++i) stopped = !gov.level_for_next(0, 0, t);
  CHECK(stopped);
}

namespace {

// A governor that saw a backed-up link writing `link_rate` bytes/s and
// frames compressing to `ratio` at `speed` bytes/s with level 1.
CompressionGovernor::Clock::time_point drive(CompressionGovernor& gov, double link_rate, double ratio, double speed) {
  auto t = CompressionGovernor::Clock::now();
  uint64_t sent = 0;
  const uint64_t in = 256 << 10;
  auto took = std::chrono::nanoseconds(static_cast<int64_t>(double(in) / speed * 1e9));
  for (int i = 0; i < 400; ++i) {
    t += 50ms;
    sent += uint64_t(link_rate * 0.05);
    gov.level_for_next(4 << 20, sent, t);
    gov.record_try(1, in, uint64_t(double(in) * ratio), took);
  }
  return t;
}

std::optional<int> level_after(double link_rate, double ratio, double speed, uint64_t max_rate = 0) {
  CompressionGovernor gov(Compression{}, max_rate);
  auto t = drive(gov, link_rate, ratio, speed);
  return gov.level_for_next(4 << 20, 0, t);  // sent 0 < last: a fresh sample, same decision
}

}  // namespace

TEST_CASE("compression governor: auto's level follows the link against the CPU") {
  const double mb = 1e6;
  // 100 Mbit/s, data compressing 3x, level 1 at 470 MB/s: the strongest level.
  CHECK(level_after(12 * mb, 0.33, 470 * mb) == 3);
  // 1 Gbit/s: level 3 cannot keep up with 350 MB/s of plain data, 1 cannot
  // with the margin, -1 can.
  CHECK(level_after(117 * mb, 0.33, 470 * mb) == -1);
  // 10 Gbit/s: even the fastest level is slower than what the link carries
  // compressed, but faster than the link plain: the fastest.
  CHECK(level_after(900 * mb, 0.33, 800 * mb) == -5);
  // 25 Gbit/s and a slow CPU: none (but a probe now and then).
  auto none = level_after(3000 * mb, 0.33, 400 * mb);
  CHECK((!none || *none == -5));
  // max_rate caps the wire below the link: the cap decides, also when the
  // queue never backed up (a paced sender does not fill it).
  CHECK(level_after(117 * mb, 0.33, 470 * mb, 12'000'000) == 3);
  CompressionGovernor capped(Compression{}, 12'000'000);
  auto t = CompressionGovernor::Clock::now();
  for (int i = 0; i < 50; ++i) {
    capped.level_for_next(0, uint64_t(i) * 600'000, t += 50ms);
    capped.record_try(3, 256 << 10, 80 << 10, 1ms);
  }
  CHECK(capped.level_for_next(0, 0, t) == 3);
}
