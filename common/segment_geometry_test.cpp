#include "common/segment_geometry.h"

#include <catch2/catch.hpp>

using livemig::IndexRange;
using livemig::SegmentGeometry;

TEST_CASE("a geometry with a partial last block counts it as a block") {
  auto g = SegmentGeometry::make(10 * 4096 + 100, 4096, 16384);
  REQUIRE(g.is_ok());
  CHECK(g->block_count() == 11);
  CHECK(g->segment_count() == 3);
  CHECK(g->block_length(10) == 100);
  CHECK(g->segment_length(2) == 2 * 4096 + 100);
  CHECK(g->blocks_of_segment(2) == IndexRange{8, 11});
}
