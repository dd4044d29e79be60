#include "common/segment_geometry.h"

#include <cstdint>
#include <string>

#include <catch2/catch.hpp>

#include "tests/support/strings.h"

using livemig::IndexRange;
using livemig::SegmentGeometry;
using livemig::Status;

using livemig::contains;

namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

// A geometry that must be valid; fails the test otherwise.
SegmentGeometry geometry(uint64_t image, uint64_t block, uint64_t segment) {
  auto g = SegmentGeometry::make(image, block, segment);
  INFO("image=" << image << " block=" << block << " segment=" << segment);
  REQUIRE(g.is_ok());
  return *g;
}

}  // namespace

TEST_CASE("a geometry with a partial last block counts it as a block") {
  auto g = SegmentGeometry::make(10 * 4096 + 100, 4096, 16384);
  REQUIRE(g.is_ok());
  CHECK(g->block_count() == 11);
  CHECK(g->segment_count() == 3);
  CHECK(g->block_length(10) == 100);
  CHECK(g->segment_length(2) == 2 * 4096 + 100);
  CHECK(g->blocks_of_segment(2) == IndexRange{8, 11});
}

TEST_CASE("a block size that is not a power of two is rejected naming block-size") {
  for (uint64_t bs : {uint64_t{3000}, uint64_t{4097}, uint64_t{6144}, 3 * KiB}) {
    INFO("block size " << bs);
    Status s = SegmentGeometry::check_sizes(bs, MiB);
    CHECK_FALSE(s.is_ok());
    CHECK(contains(s.message(), "block-size"));
    CHECK(contains(s.message(), std::to_string(bs)));
    CHECK(contains(s.message(), "power of two"));
    auto g = SegmentGeometry::make(MiB, bs, MiB);
    CHECK_FALSE(g.is_ok());
    CHECK(contains(g.status().message(), "block-size"));
  }
}

TEST_CASE("a block size below 512 bytes is rejected naming block-size") {
  for (uint64_t bs : {uint64_t{0}, uint64_t{1}, uint64_t{256}, uint64_t{511}}) {
    INFO("block size " << bs);
    Status s = SegmentGeometry::check_sizes(bs, MiB);
    CHECK_FALSE(s.is_ok());
    CHECK(contains(s.message(), "block-size"));
    CHECK(contains(s.message(), "512"));
    CHECK(s.errno_value() != 0);
  }
  CHECK(SegmentGeometry::check_sizes(512, 512).is_ok());
}

TEST_CASE("a segment size that is not a power of two is rejected naming segment-size") {
  for (uint64_t ss : {uint64_t{0}, 3 * MiB, uint64_t{4096 * 3}, MiB + 4096}) {
    INFO("segment size " << ss);
    Status s = SegmentGeometry::check_sizes(4096, ss);
    CHECK_FALSE(s.is_ok());
    CHECK(contains(s.message(), "segment-size"));
    CHECK(contains(s.message(), "power of two"));
    auto g = SegmentGeometry::make(MiB, 4096, ss);
    CHECK_FALSE(g.is_ok());
    CHECK(contains(g.status().message(), "segment-size"));
  }
}

TEST_CASE("a segment smaller than a block is rejected naming both keys") {
  Status s = SegmentGeometry::check_sizes(64 * KiB, 4 * KiB);
  CHECK_FALSE(s.is_ok());
  CHECK(contains(s.message(), "segment-size=4096"));
  CHECK(contains(s.message(), "block-size=65536"));
  CHECK_FALSE(SegmentGeometry::make(MiB, 8192, 4096).is_ok());
}

TEST_CASE("a segment of exactly one block is accepted") {
  auto g = geometry(10 * 4096, 4096, 4096);
  CHECK(g.blocks_per_segment() == 1);
  CHECK(g.block_count() == 10);
  CHECK(g.segment_count() == 10);
  CHECK(g.blocks_of_segment(7) == IndexRange{7, 8});
}

TEST_CASE("valid sizes are accepted and reported back") {
  CHECK(SegmentGeometry::check_sizes(SegmentGeometry::kDefaultBlockSize,
                                     SegmentGeometry::kDefaultSegmentSize)
            .is_ok());
  auto g = geometry(64 * MiB, 4096, MiB);
  CHECK(g.image_size() == 64 * MiB);
  CHECK(g.block_size() == 4096);
  CHECK(g.segment_size() == MiB);
  CHECK(g.blocks_per_segment() == 256);

  auto d = SegmentGeometry::make(MiB);
  REQUIRE(d.is_ok());
  CHECK(d->block_size() == SegmentGeometry::kDefaultBlockSize);
  CHECK(d->segment_size() == SegmentGeometry::kDefaultSegmentSize);
}

TEST_CASE("block and segment counts round a partial last unit up") {
  SECTION("image a whole number of segments") {
    auto g = geometry(4 * MiB, 4096, MiB);
    CHECK(g.block_count() == 1024);
    CHECK(g.segment_count() == 4);
  }
  SECTION("image one byte past a segment") {
    auto g = geometry(4 * MiB + 1, 4096, MiB);
    CHECK(g.block_count() == 1025);
    CHECK(g.segment_count() == 5);
    CHECK(g.block_length(1024) == 1);
    CHECK(g.segment_length(4) == 1);
  }
  SECTION("image one byte short of a block") {
    auto g = geometry(4095, 4096, MiB);
    CHECK(g.block_count() == 1);
    CHECK(g.segment_count() == 1);
    CHECK(g.block_length(0) == 4095);
  }
  SECTION("image exactly one block") {
    auto g = geometry(4096, 4096, MiB);
    CHECK(g.block_count() == 1);
    CHECK(g.segment_count() == 1);
    CHECK(g.segment_length(0) == 4096);
  }
}

TEST_CASE("unit lookups map offsets to the block and segment that hold them") {
  auto g = geometry(4 * MiB, 4096, MiB);
  CHECK(g.block_of(0) == 0);
  CHECK(g.block_of(4095) == 0);
  CHECK(g.block_of(4096) == 1);
  CHECK(g.segment_of(MiB - 1) == 0);
  CHECK(g.segment_of(MiB) == 1);
  CHECK(g.segment_of_block(255) == 0);
  CHECK(g.segment_of_block(256) == 1);
  CHECK(g.block_offset(3) == 3 * 4096);
  CHECK(g.segment_offset(2) == 2 * MiB);
  CHECK(g.block_length(5) == 4096);
  CHECK(g.block_length(1024) == 0);    // past the end
  CHECK(g.segment_length(4) == 0);     // past the end
}

TEST_CASE("a range inside one block touches that block and covers none unless whole") {
  auto g = geometry(16 * 4096, 4096, 4 * 4096);
  CHECK(g.blocks_touched(4096 + 10, 100) == IndexRange{1, 2});
  CHECK(g.blocks_covered(4096 + 10, 100).empty());
  CHECK(g.blocks_covered(4096 + 10, 100).count() == 0);
  CHECK(g.segments_touched(4096 + 10, 100) == IndexRange{0, 1});

  // The whole block, aligned.
  CHECK(g.blocks_touched(4096, 4096) == IndexRange{1, 2});
  CHECK(g.blocks_covered(4096, 4096) == IndexRange{1, 2});

  // Starts on the boundary, stops short of the next.
  CHECK(g.blocks_touched(4096, 4095) == IndexRange{1, 2});
  CHECK(g.blocks_covered(4096, 4095).empty());

  // Ends exactly on the boundary but starts late.
  CHECK(g.blocks_touched(4097, 4095) == IndexRange{1, 2});
  CHECK(g.blocks_covered(4097, 4095).empty());

  // One byte.
  CHECK(g.blocks_touched(0, 1) == IndexRange{0, 1});
  CHECK(g.blocks_covered(0, 1).empty());
}

TEST_CASE("an aligned range spanning blocks touches and covers the same blocks") {
  auto g = geometry(16 * 4096, 4096, 4 * 4096);
  CHECK(g.blocks_touched(2 * 4096, 3 * 4096) == IndexRange{2, 5});
  CHECK(g.blocks_covered(2 * 4096, 3 * 4096) == IndexRange{2, 5});
  CHECK(g.segments_touched(2 * 4096, 3 * 4096) == IndexRange{0, 2});
}

TEST_CASE("an unaligned range spanning blocks covers only the whole blocks inside it") {
  auto g = geometry(16 * 4096, 4096, 4 * 4096);
  // [4096+1, 4*4096+1): touches 1..4, covers 2..3.
  CHECK(g.blocks_touched(4097, 3 * 4096) == IndexRange{1, 5});
  CHECK(g.blocks_covered(4097, 3 * 4096) == IndexRange{2, 4});
  // Straddles one boundary: touches two, covers none.
  CHECK(g.blocks_touched(4000, 200) == IndexRange{0, 2});
  CHECK(g.blocks_covered(4000, 200).empty());
  CHECK(g.blocks_covered(4000, 200).count() == 0);
  // Starts mid-block, ends on a boundary.
  CHECK(g.blocks_touched(100, 2 * 4096 - 100) == IndexRange{0, 2});
  CHECK(g.blocks_covered(100, 2 * 4096 - 100) == IndexRange{1, 2});
  // Starts on a boundary, ends mid-block.
  CHECK(g.blocks_touched(0, 2 * 4096 + 1) == IndexRange{0, 3});
  CHECK(g.blocks_covered(0, 2 * 4096 + 1) == IndexRange{0, 2});
}

TEST_CASE("a range spanning segments touches every segment it crosses") {
  auto g = geometry(16 * 4096, 4096, 4 * 4096);  // 4 segments of 4 blocks
  // Last byte of segment 0 and first of segment 1.
  CHECK(g.segments_touched(4 * 4096 - 1, 2) == IndexRange{0, 2});
  CHECK(g.blocks_touched(4 * 4096 - 1, 2) == IndexRange{3, 5});
  CHECK(g.blocks_covered(4 * 4096 - 1, 2).empty());
  // Across three segments.
  CHECK(g.segments_touched(3 * 4096, 6 * 4096) == IndexRange{0, 3});
  // A whole segment, aligned: only that one.
  CHECK(g.segments_touched(4 * 4096, 4 * 4096) == IndexRange{1, 2});
  // The whole image.
  CHECK(g.segments_touched(0, 16 * 4096) == IndexRange{0, 4});
  CHECK(g.blocks_touched(0, 16 * 4096) == IndexRange{0, 16});
  CHECK(g.blocks_covered(0, 16 * 4096) == IndexRange{0, 16});
}

TEST_CASE("an empty range touches and covers nothing") {
  auto g = geometry(16 * 4096, 4096, 4 * 4096);
  CHECK(g.blocks_touched(4096, 0).empty());
  CHECK(g.blocks_touched(4097, 0).empty());
  CHECK(g.blocks_covered(4096, 0).empty());
  CHECK(g.blocks_covered(4097, 0).empty());
  CHECK(g.segments_touched(4 * 4096, 0).empty());
  CHECK(g.segments_touched(5 * 4096 + 3, 0).empty());
}

TEST_CASE("the partial last block counts as covered only when the range reaches the image end") {
  const uint64_t image = 10 * 4096 + 100;  // block 10 holds 100 bytes
  auto g = geometry(image, 4096, 4 * 4096);
  REQUIRE(g.block_count() == 11);

  SECTION("the whole partial block") {
    CHECK(g.blocks_touched(10 * 4096, 100) == IndexRange{10, 11});
    CHECK(g.blocks_covered(10 * 4096, 100) == IndexRange{10, 11});
  }
  SECTION("the partial block minus its last byte") {
    CHECK(g.blocks_touched(10 * 4096, 99) == IndexRange{10, 11});
    CHECK(g.blocks_covered(10 * 4096, 99).empty());
  }
  SECTION("the partial block minus its first byte") {
    CHECK(g.blocks_touched(10 * 4096 + 1, 99) == IndexRange{10, 11});
    CHECK(g.blocks_covered(10 * 4096 + 1, 99).empty());
  }
  SECTION("a range from an earlier block to the end") {
    CHECK(g.blocks_touched(8 * 4096, 2 * 4096 + 100) == IndexRange{8, 11});
    CHECK(g.blocks_covered(8 * 4096, 2 * 4096 + 100) == IndexRange{8, 11});
    CHECK(g.blocks_covered(8 * 4096 + 1, 2 * 4096 + 99) == IndexRange{9, 11});
  }
  SECTION("a range from an earlier block stopping one byte short of the end") {
    CHECK(g.blocks_touched(8 * 4096, 2 * 4096 + 99) == IndexRange{8, 11});
    CHECK(g.blocks_covered(8 * 4096, 2 * 4096 + 99) == IndexRange{8, 10});
  }
  SECTION("the whole image") {
    CHECK(g.blocks_touched(0, image) == IndexRange{0, 11});
    CHECK(g.blocks_covered(0, image) == IndexRange{0, 11});
    CHECK(g.segments_touched(0, image) == IndexRange{0, 3});
  }
  SECTION("an empty range at the image end") {
    CHECK(g.blocks_covered(image, 0).empty());
  }
  SECTION("the last segment is touched by the partial block") {
    CHECK(g.segments_touched(10 * 4096 + 50, 50) == IndexRange{2, 3});
  }
}

TEST_CASE("range_length clips the last block to the image end") {
  const uint64_t image = 10 * 4096 + 100;
  auto g = geometry(image, 4096, 4 * 4096);
  CHECK(g.range_length({0, 1}) == 4096);
  CHECK(g.range_length({2, 5}) == 3 * 4096);
  CHECK(g.range_length({10, 11}) == 100);
  CHECK(g.range_length({8, 11}) == 2 * 4096 + 100);
  CHECK(g.range_length({0, 11}) == image);
  CHECK(g.range_offset({8, 11}) == 8 * 4096);
  // Ranges past the end are clipped or empty.
  CHECK(g.range_length({8, 20}) == 2 * 4096 + 100);
  CHECK(g.range_length({11, 12}) == 0);
  CHECK(g.range_length({5, 5}) == 0);
  CHECK(g.range_length({6, 5}) == 0);
  // A whole-block image: no clipping.
  auto h = geometry(8 * 4096, 4096, 4 * 4096);
  CHECK(h.range_length({0, 8}) == 8 * 4096);
  CHECK(h.range_length({7, 8}) == 4096);
}

TEST_CASE("blocks_of_segment gives the last partial segment only the blocks that exist") {
  // 2 full segments of 4 blocks, then a segment of 2 blocks, the last partial.
  const uint64_t image = 9 * 4096 + 1;
  auto g = geometry(image, 4096, 4 * 4096);
  REQUIRE(g.block_count() == 10);
  REQUIRE(g.segment_count() == 3);
  CHECK(g.blocks_of_segment(0) == IndexRange{0, 4});
  CHECK(g.blocks_of_segment(1) == IndexRange{4, 8});
  CHECK(g.blocks_of_segment(2) == IndexRange{8, 10});
  CHECK(g.blocks_of_segment(2).count() == 2);
  CHECK(g.range_length(g.blocks_of_segment(2)) == g.segment_length(2));
  CHECK(g.segment_length(2) == 4096 + 1);
  // A segment past the end holds no blocks.
  CHECK(g.blocks_of_segment(3).empty());
  // Every block belongs to the segment that lists it.
  for (uint64_t s = 0; s < g.segment_count(); ++s) {
    IndexRange r = g.blocks_of_segment(s);
    for (uint64_t b = r.first; b < r.last; ++b) CHECK(g.segment_of_block(b) == s);
  }
  // The segments' blocks partition the image.
  uint64_t total = 0;
  for (uint64_t s = 0; s < g.segment_count(); ++s) total += g.range_length(g.blocks_of_segment(s));
  CHECK(total == image);
}

TEST_CASE("a zero-size image has no blocks and no segments") {
  auto g = geometry(0, 4096, MiB);
  CHECK(g.image_size() == 0);
  CHECK(g.block_count() == 0);
  CHECK(g.segment_count() == 0);
  CHECK(g.blocks_touched(0, 0).empty());
  CHECK(g.blocks_covered(0, 0).empty());
  CHECK(g.segments_touched(0, 0).empty());
  CHECK(g.blocks_of_segment(0).empty());
  CHECK(g.block_length(0) == 0);
  CHECK(g.segment_length(0) == 0);
  CHECK(g.range_length({0, 1}) == 0);
}

TEST_CASE("a geometry with small blocks and large segments keeps the counts consistent") {
  const uint64_t image = 3 * MiB + 512 + 17;
  auto g = geometry(image, 512, MiB);
  CHECK(g.blocks_per_segment() == 2048);
  CHECK(g.block_count() == 3 * 2048 + 2);
  CHECK(g.segment_count() == 4);
  CHECK(g.blocks_of_segment(3) == IndexRange{3 * 2048, 3 * 2048 + 2});
  CHECK(g.block_length(3 * 2048 + 1) == 17);
  CHECK(g.blocks_covered(0, image).count() == g.block_count());
}

TEST_CASE("the automatic segment size is 1M up to 64G and keeps larger images at 65536 segments") {
  CHECK(SegmentGeometry::auto_segment_size(0, 4096) == MiB);
  CHECK(SegmentGeometry::auto_segment_size(64 * 1024 * MiB, 4096) == MiB);
  CHECK(SegmentGeometry::auto_segment_size(64 * 1024 * MiB + 1, 4096) == 2 * MiB);
  CHECK(SegmentGeometry::auto_segment_size(uint64_t{1} << 40, 4096) == 16 * MiB);
  CHECK(SegmentGeometry::auto_segment_size(MiB, 2 * MiB) == 2 * MiB);  // never below a block
  for (uint64_t size : {uint64_t{1} << 40, (uint64_t{3} << 40) + 12345, uint64_t{1} << 50}) {
    auto g = SegmentGeometry::make(size, 4096, SegmentGeometry::auto_segment_size(size, 4096));
    REQUIRE(g.is_ok());
    CHECK(g->segment_count() <= SegmentGeometry::kMaxAutoSegments);
    CHECK(g->segment_count() > SegmentGeometry::kMaxAutoSegments / 2);
  }
}
