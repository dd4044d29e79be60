#include "common/segment_geometry.h"

#include <algorithm>
#include <bit>

#include <fmt/format.h>

namespace livemig {
namespace {

uint64_t div_round_up(uint64_t a, unsigned shift) {
  return (a >> shift) + ((a & ((uint64_t{1} << shift) - 1)) != 0);
}

}  // namespace

Status SegmentGeometry::check_sizes(uint64_t block_size, uint64_t segment_size) {
  if (block_size < 512 || !std::has_single_bit(block_size))
    return Status::error(
        fmt::format("block-size={}: must be a power of two of at least 512 bytes", block_size));
  // A block must fit in one DATA frame with room to spare (protocol_format.h).
  if (block_size > (uint64_t{1} << 20))
    return Status::error(fmt::format("block-size={}: must be at most 1M", block_size));
  if (!std::has_single_bit(segment_size))
    return Status::error(fmt::format("segment-size={}: must be a power of two", segment_size));
  if (segment_size < block_size)
    return Status::error(fmt::format(
        "segment-size={} is smaller than block-size={}: a segment must be a whole number of blocks",
        segment_size, block_size));
  if (segment_size > (uint64_t{1} << 40))
    return Status::error(fmt::format("segment-size={}: must be at most 1T", segment_size));
  return Status::ok();
}

uint64_t SegmentGeometry::auto_segment_size(uint64_t image_size, uint64_t block_size) {
  const uint64_t per_segment = image_size / kMaxAutoSegments + (image_size % kMaxAutoSegments != 0);
  return std::max({kDefaultSegmentSize, block_size, std::bit_ceil(per_segment)});
}

Result<SegmentGeometry> SegmentGeometry::make(uint64_t image_size, uint64_t block_size,
                                              uint64_t segment_size) {
  if (Status s = check_sizes(block_size, segment_size); !s) return s;
  if (image_size > (uint64_t{1} << 62))
    return Status::error(fmt::format("image size {} is too large", image_size));
  return SegmentGeometry(image_size, std::countr_zero(block_size), std::countr_zero(segment_size));
}

SegmentGeometry::SegmentGeometry(uint64_t image_size, unsigned block_shift, unsigned segment_shift)
    : image_size_(image_size),
      block_shift_(block_shift),
      segment_shift_(segment_shift),
      block_count_(div_round_up(image_size, block_shift)),
      segment_count_(div_round_up(image_size, segment_shift)) {}

IndexRange SegmentGeometry::blocks_touched(uint64_t offset, uint64_t length) const {
  if (length == 0) return {block_of(offset), block_of(offset)};
  return {offset >> block_shift_, div_round_up(offset + length, block_shift_)};
}

IndexRange SegmentGeometry::blocks_covered(uint64_t offset, uint64_t length) const {
  uint64_t first = div_round_up(offset, block_shift_);
  uint64_t end = offset + length;
  uint64_t last = end == image_size_ ? block_count_ : (end >> block_shift_);
  if (last < first) last = first;
  return {first, last};
}

IndexRange SegmentGeometry::segments_touched(uint64_t offset, uint64_t length) const {
  if (length == 0) return {segment_of(offset), segment_of(offset)};
  return {offset >> segment_shift_, div_round_up(offset + length, segment_shift_)};
}

IndexRange SegmentGeometry::blocks_of_segment(uint64_t segment) const {
  uint64_t first = segment << (segment_shift_ - block_shift_);
  return {std::min(first, block_count_), std::min(first + blocks_per_segment(), block_count_)};
}

uint64_t SegmentGeometry::block_length(uint64_t block) const {
  uint64_t off = block_offset(block);
  return off >= image_size_ ? 0 : std::min(block_size(), image_size_ - off);
}

uint64_t SegmentGeometry::range_length(IndexRange r) const {
  if (r.empty()) return 0;
  uint64_t off = block_offset(r.first);
  if (off >= image_size_) return 0;
  return std::min(block_offset(r.last), image_size_) - off;
}

uint64_t SegmentGeometry::segment_length(uint64_t segment) const {
  uint64_t off = segment_offset(segment);
  return off >= image_size_ ? 0 : std::min(segment_size(), image_size_ - off);
}

}  // namespace livemig
