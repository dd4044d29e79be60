#include "plugin/base_image.h"

#include <sys/stat.h>
#include <sys/time.h>

#include <fstream>
#include <vector>

#include <catch2/catch.hpp>

#include "common/byte_order.h"
#include "tests/support/temp_dir.h"

using namespace livemig;

namespace {

constexpr uint32_t kBaseBlock = 4096;

// A base of `blocks` blocks, block b filled with byte `fill(b)`, plus `tail`
// bytes (a partial last block).
std::string write_base(const TempDir& dir, uint64_t blocks, char first = 'a', size_t tail = 0) {
  std::string path = dir / "base.img";
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  for (uint64_t b = 0; b < blocks; ++b) f << std::string(kBaseBlock, char(first + b % 20));
  f << std::string(tail, 'z');
  return path;
}

struct Logged {
  std::vector<std::string> lines;
  BaseImage::Log fn() {
    return [this](const std::string& l) { lines.push_back(l); };
  }
  bool computed() const {
    for (const auto& l : lines)
      if (l.find("checksums computed") != std::string::npos) return true;
    return false;
  }
};

// A BASE note for blocks [first, first+n) carrying `sums`.
DataPayload note(uint64_t first, uint64_t n, std::vector<uint8_t>& sums) {
  return DataPayload{first * kBaseBlock, static_cast<uint32_t>(n * kBaseBlock), kFlagBase, {sums.data(), sums.size()}};
}

std::vector<uint8_t> sums_of(const BaseImage& base, uint64_t first, uint64_t n) {
  std::vector<uint8_t> s(n * 8);
  for (uint64_t i = 0; i < n; ++i) store_be64(s.data() + i * 8, base.block_hash(first + i));
  return s;
}

}  // namespace

TEST_CASE("base image: checksums are computed once, cached beside the base, and recomputed when it changes") {
  TempDir dir;
  std::string path = write_base(dir, 40, 'a', 100);
  Logged first;
  auto base = BaseImage::open(path, kBaseBlock, first.fn());
  REQUIRE(base);
  CHECK(first.computed());
  CHECK((*base)->full_blocks() == 40);  // the partial last block is never equal to a block
  CHECK((*base)->block_hash(3) == block_checksum(std::string(kBaseBlock, 'd').data(), kBaseBlock));
  struct stat st {};
  REQUIRE(stat(BaseImage::cache_path(path).c_str(), &st) == 0);
  CHECK(uint64_t(st.st_size) == 40 + 40 * 8);  // a 40-byte header, 8 bytes per block
  Logged second;
  auto again = BaseImage::open(path, kBaseBlock, second.fn());
  REQUIRE(again);
  CHECK_FALSE(second.computed());  // from the cache
  CHECK((*again)->identity() == (*base)->identity());
  // The base changes (another template under the same name): new mtime,
  // new checksums, another identity.
  write_base(dir, 40, 'b', 100);
  struct timeval later[2] = {{2000000000, 0}, {2000000000, 0}};
  REQUIRE(utimes(path.c_str(), later) == 0);
  Logged third;
  auto changed = BaseImage::open(path, kBaseBlock, third.fn());
  REQUIRE(changed);
  CHECK(third.computed());
  CHECK((*changed)->identity() != (*base)->identity());
  // A damaged cache is not trusted.
  { std::ofstream(BaseImage::cache_path(path), std::ios::binary | std::ios::app) << "junk"; }
  Logged fourth;
  REQUIRE(BaseImage::open(path, kBaseBlock, fourth.fn()));
  CHECK(fourth.computed());
  CHECK_FALSE(BaseImage::open(dir / "missing.img", kBaseBlock, fourth.fn()));
}

TEST_CASE("base image: a note is read from the base and checked block by block against the source's checksums") {
  TempDir dir;
  std::string path = write_base(dir, 16);
  Logged log;
  auto base = BaseImage::open(path, kBaseBlock, log.fn());
  REQUIRE(base);
  const BaseImage& b = **base;
  std::string out;
  auto sums = sums_of(b, 4, 3);
  REQUIRE(read_base_note(&b, note(4, 3, sums), kBaseBlock, out));
  CHECK(out == std::string(kBaseBlock, 'e') + std::string(kBaseBlock, 'f') + std::string(kBaseBlock, 'g'));
  // The source's data differs from this base in the middle block (this
  // base rotted, or is another template): BaseMismatch, naming the block.
  store_be64(sums.data() + 8, 12345);
  Status s = read_base_note(&b, note(4, 3, sums), kBaseBlock, out);
  REQUIRE_FALSE(s);
  CHECK(error_code_of(s) == ErrorCode::BaseMismatch);
  CHECK(s.message().find("block 5 of base image") != std::string::npos);
  // No base here at all.
  CHECK(error_code_of(read_base_note(nullptr, note(4, 3, sums), kBaseBlock, out)) == ErrorCode::BaseMismatch);
  // One checksum short, or a note not on block boundaries: a bad frame.
  std::vector<uint8_t> short_sums(16);
  CHECK(error_code_of(read_base_note(&b, note(4, 3, short_sums), kBaseBlock, out)) == ErrorCode::BadFrame);
  DataPayload unaligned{100, 2 * kBaseBlock, kFlagBase, {short_sums.data(), 16}};
  CHECK(error_code_of(read_base_note(&b, unaligned, kBaseBlock, out)) == ErrorCode::BadFrame);
}
