#include "common/transfer_planner.h"

#include <catch2/catch.hpp>

#include <string>
#include <vector>

using namespace livemig;

namespace {
SegmentGeometry geom(uint64_t size, uint64_t block = 4096, uint64_t seg = 4 * 4096) {
  return SegmentGeometry::make(size, block, seg).value();
}
}  // namespace

TEST_CASE("a transfer unit coalesces contiguous set blocks but stops at a segment boundary", "[planner]") {
  SegmentGeometry g = geom(16 * 4096);  // 4 segments of 4 blocks
  BlockBitmap bits(g.block_count());
  bits.set_range({2, 11});
  CHECK(next_transfer_unit(bits, g, 0, 100) == IndexRange{2, 4});
  CHECK(next_transfer_unit(bits, g, 4, 100) == IndexRange{4, 8});
  CHECK(next_transfer_unit(bits, g, 8, 100) == IndexRange{8, 11});
  CHECK(next_transfer_unit(bits, g, 11, 100).empty());
}

TEST_CASE("a transfer unit is at most max_blocks long and respects its limit range", "[planner]") {
  SegmentGeometry g = geom(16 * 4096, 4096, 16 * 4096);
  BlockBitmap bits(g.block_count());
  bits.set_range({0, 16});
  CHECK(next_transfer_unit(bits, g, 0, 3) == IndexRange{0, 3});
  CHECK(next_transfer_unit_in(bits, g, {5, 7}, 0, 100) == IndexRange{5, 7});
  CHECK(next_transfer_unit_in(bits, g, {5, 7}, 7, 100).empty());
}

TEST_CASE("zero blocks are told apart from data blocks, the partial last block included", "[planner]") {
  SegmentGeometry g = geom(3 * 4096 + 100);
  std::string data(3 * 4096 + 100, '\0');
  data[4096 + 17] = 'x';      // block 1 has data
  data[3 * 4096 + 99] = 'y';  // the partial last block has data in its last byte
  auto runs = split_zero_runs(g, {0, 4}, data.data());
  REQUIRE(runs.size() == 4);
  CHECK((runs[0].blocks == IndexRange{0, 1} && runs[0].zero));
  CHECK((runs[1].blocks == IndexRange{1, 2} && !runs[1].zero));
  CHECK((runs[2].blocks == IndexRange{2, 3} && runs[2].zero));
  CHECK((runs[3].blocks == IndexRange{3, 4} && !runs[3].zero));
}

TEST_CASE("is_all_zero finds a single non-zero byte anywhere", "[planner]") {
  std::vector<char> buf(4096, 0);
  CHECK(is_all_zero(buf.data(), buf.size()));
  for (size_t i : {size_t{0}, size_t{15}, size_t{16}, size_t{2000}, size_t{4095}}) {
    buf[i] = 1;
    CHECK_FALSE(is_all_zero(buf.data(), buf.size()));
    buf[i] = 0;
  }
  CHECK(is_all_zero(buf.data(), 0));
}

TEST_CASE("set runs list every maximal run in order", "[planner]") {
  BlockBitmap bits(200);
  bits.set_range({0, 3});
  bits.set_range({64, 130});
  bits.set(199);
  auto runs = set_runs(bits);
  REQUIRE(runs.size() == 3);
  CHECK(runs[0] == IndexRange{0, 3});
  CHECK(runs[1] == IndexRange{64, 130});
  CHECK(runs[2] == IndexRange{199, 200});
}

TEST_CASE("segments are fetched in decreasing priority, ties in index order", "[planner]") {
  std::vector<double> prio = {1, 5, 0, 5, 3};
  CHECK(fetch_order(prio) == std::vector<uint64_t>{1, 3, 4, 0, 2});
}
