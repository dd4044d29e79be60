#include "common/uninitialized_buffer.h"

#include <unistd.h>

#include <catch2/catch.hpp>

using namespace livemig;

TEST_CASE("page-offset buffers: what follows the header is page-aligned, and a freed block serves the next of its size") {
  constexpr size_t kHeader = 16;
  using Bytes = std::vector<uint8_t, PageOffsetAllocator<uint8_t, kHeader>>;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uint8_t* first = nullptr;
  {
    Bytes b(kHeader + (256 << 10));
    CHECK((reinterpret_cast<uintptr_t>(b.data()) + kHeader) % page == 0);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i);  // every byte is usable
    first = b.data();
  }
  Bytes again(kHeader + (256 << 10));
  CHECK(again.data() == first);  // the cached block, not fresh pages
  Bytes other(kHeader + 100);
  CHECK(other.data() != first);
  CHECK((reinterpret_cast<uintptr_t>(other.data()) + kHeader) % page == 0);
}

TEST_CASE("aligned block cache: odd sizes freed once do not keep the frames' size out") {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t frame_bytes = (256 << 10) + page;
  // More blocks of odd sizes than the cache holds, each freed once (as a
  // post-copy's short pulls would), then a frame's.
  for (size_t pages = 1; pages <= 40; ++pages)
    AlignedBlockCache::give(std::aligned_alloc(page, pages * page), pages * page);
  void* frame = std::aligned_alloc(page, frame_bytes);
  AlignedBlockCache::give(frame, frame_bytes);
  CHECK(AlignedBlockCache::take(frame_bytes) == frame);  // kept: the oldest odd block made room
  std::free(frame);
  CHECK(AlignedBlockCache::take(frame_bytes) == nullptr);
}
