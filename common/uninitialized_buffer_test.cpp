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
