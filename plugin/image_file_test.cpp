#include "plugin/image_file.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.h"

using namespace livemig;

namespace {

constexpr uint64_t kImageSize = 4u << 20;

std::string make_image(const TempDir& dir, uint64_t size) {
  std::string path = dir / "image.img";
  std::ofstream(path, std::ios::binary).close();
  REQUIRE(::truncate(path.c_str(), static_cast<off_t>(size)) == 0);
  return path;
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

// Pages of [offset, offset+length) of the file in the page cache.
size_t resident_pages(const std::string& path, uint64_t offset, uint64_t length) {
  auto f = ImageFile::open(path, true);
  REQUIRE(f);
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, f->fd(), static_cast<off_t>(offset));
  REQUIRE(map != MAP_FAILED);
  const size_t page = ImageFile::page_size();
  std::vector<unsigned char> vec((length + page - 1) / page);
  REQUIRE(::mincore(map, length, vec.data()) == 0);
  ::munmap(map, length);
  size_t n = 0;
  for (unsigned char v : vec) n += v & 1;
  return n;
}

// False (with a warning) where the file system has no direct I/O: the
// direct path cannot be tested there.
bool has_direct_io(const ImageFile& image, const TempDir& dir) {
  if (!image.direct_writes())
    WARN("no direct I/O on the file system of " << dir.path() << ": only the cached path is tested");
  return image.direct_writes();
}

}  // namespace

TEST_CASE("image file: write_around_cache writes every byte, aligned or not, from any buffer") {
  TempDir dir;
  const std::string path = make_image(dir, kImageSize);
  auto image = ImageFile::open(path, false);
  REQUIRE(image);
  std::string expected(kImageSize, '\0');
  struct Write {
    uint64_t offset, length;
    size_t buffer_shift;  // the source buffer's distance from an aligned address
  };
  const std::vector<Write> writes = {
      {0, 256 << 10, 0},            // aligned: the direct path where the file system has one
      {1 << 20, 256 << 10, 1},      // aligned range, misaligned buffer: copied first
      {(2 << 20) + 100, 1000, 0},   // unaligned offset and length: cached
      {3 << 20, 4096 + 512, 3},     // unaligned length
      {kImageSize - 8192, 8192, 0}  // the image's end
  };
  uint32_t seed = 1;
  for (const Write& w : writes) {
    const std::string data = random_bytes(w.length, seed++);
    std::vector<char> holder(w.length + 4096 + w.buffer_shift);
    char* buf = holder.data() + (4096 - reinterpret_cast<uintptr_t>(holder.data()) % 4096) + w.buffer_shift;
    std::memcpy(buf, data.data(), w.length);
    REQUIRE(image->write_around_cache(buf, w.length, w.offset) == 0);
    expected.replace(w.offset, w.length, data);
  }
  // Overwrite part of a direct write with a cached one and the other way round.
  const std::string over = random_bytes(8192, seed++);
  REQUIRE(image->pwrite(over.data(), over.size(), 4096, false) == 0);
  expected.replace(4096, over.size(), over);
  const std::string back = random_bytes(ImageFile::kMinDirectWrite, seed++);
  REQUIRE(image->write_around_cache(back.data(), back.size(), 0) == 0);
  expected.replace(0, back.size(), back);
  REQUIRE(image->flush() == 0);

  std::string got(kImageSize, '\0');
  REQUIRE(image->pread(got.data(), got.size(), 0) == 0);
  REQUIRE(got == expected);
  // And from a fresh descriptor, past any cache the first one kept.
  auto again = ImageFile::open(path, true);
  REQUIRE(again);
  REQUIRE(again->pread(got.data(), got.size(), 0) == 0);
  REQUIRE(got == expected);
}

TEST_CASE("image file: aligned writes around the cache leave no page of theirs in it") {
  TempDir dir;
  const std::string path = make_image(dir, kImageSize);
  auto image = ImageFile::open(path, false);
  REQUIRE(image);
  if (!has_direct_io(*image, dir)) return;
  const std::string data = random_bytes(1 << 20, 7);
  REQUIRE(image->write_around_cache(data.data(), data.size(), 0) == 0);
  REQUIRE(image->pwrite(data.data(), data.size(), 2 << 20, false) == 0);
  REQUIRE(image->flush() == 0);
  CHECK(resident_pages(path, 0, 1 << 20) == 0);
  // The measure itself works: the cached write's pages are there.
  CHECK(resident_pages(path, 2 << 20, 1 << 20) > 0);
}

TEST_CASE("image file: aligned runs shorter than kMinDirectWrite are written cached, longer ones around it") {
  TempDir dir;
  const std::string path = make_image(dir, kImageSize);
  auto image = ImageFile::open(path, false);
  REQUIRE(image);
  if (!has_direct_io(*image, dir)) return;
  // A scattered hot set's blocks, one page each: a direct write would wait
  // for the disk on every one of them.
  const uint64_t page = ImageFile::page_size();
  const std::string block = random_bytes(page, 11);
  for (uint64_t off = 0; off < (1 << 20); off += 4 * page)
    REQUIRE(image->write_around_cache(block.data(), block.size(), off) == 0);
  const std::string shorter = random_bytes(ImageFile::kMinDirectWrite - page, 12);
  REQUIRE(image->write_around_cache(shorter.data(), shorter.size(), 2 << 20) == 0);
  const std::string whole = random_bytes(ImageFile::kMinDirectWrite, 13);
  REQUIRE(image->write_around_cache(whole.data(), whole.size(), 3 << 20) == 0);
  CHECK(resident_pages(path, 0, 1 << 20) == (1 << 20) / (4 * page));
  CHECK(resident_pages(path, 2 << 20, shorter.size()) == shorter.size() / page);
  CHECK(resident_pages(path, 3 << 20, whole.size()) == 0);
  REQUIRE(image->flush() == 0);
  std::string got(whole.size(), '\0');
  auto again = ImageFile::open(path, true);
  REQUIRE(again);
  for (auto [off, want] : {std::pair<uint64_t, const std::string*>{0, &block}, {2 << 20, &shorter}, {3 << 20, &whole}}) {
    got.resize(want->size());
    REQUIRE(again->pread(got.data(), got.size(), off) == 0);
    CHECK(got == *want);
  }
}
