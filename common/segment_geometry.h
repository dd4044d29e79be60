// The geometry of one image: its size, the block (unit of dirty and presence
// tracking) and the segment (unit of heat ranking and scheduling).
//
// A block is a power of two bytes; a segment is a power-of-two multiple of the
// block. The image size need not be a multiple of either: the last block and
// the last segment may be partial, and they are still counted as one.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace livemig {

// A half-open range [first, last) of unit indexes (blocks or segments).
struct IndexRange {
  uint64_t first = 0;
  uint64_t last = 0;
  uint64_t count() const { return last - first; }
  bool empty() const { return first >= last; }
  bool operator==(const IndexRange&) const = default;
};

class SegmentGeometry {
 public:
  static constexpr uint32_t kDefaultBlockSize = 4096;
  static constexpr uint64_t kDefaultSegmentSize = 1024 * 1024;
  // The segment size when none is configured: kDefaultSegmentSize, or
  // larger for images of more than kMaxAutoSegments of it (64 GiB), so that
  // per-segment state (heat counters, ranks) costs at most a few MiB
  // whatever the size (issue #15).
  static constexpr uint64_t kMaxAutoSegments = 65536;
  static uint64_t auto_segment_size(uint64_t image_size, uint64_t block_size);

  // Checks the sizes and returns the geometry, or an error naming what is
  // wrong (not a power of two, segment not a multiple of block, ...).
  static Result<SegmentGeometry> make(uint64_t image_size, uint64_t block_size = kDefaultBlockSize,
                                      uint64_t segment_size = kDefaultSegmentSize);

  // Checks block_size and segment_size alone (config time, before the image
  // size is known). Returns an error naming the offending key.
  static Status check_sizes(uint64_t block_size, uint64_t segment_size);

  uint64_t image_size() const { return image_size_; }
  uint64_t block_size() const { return uint64_t{1} << block_shift_; }
  uint64_t segment_size() const { return uint64_t{1} << segment_shift_; }
  uint64_t block_count() const { return block_count_; }
  uint64_t segment_count() const { return segment_count_; }
  uint64_t blocks_per_segment() const { return uint64_t{1} << (segment_shift_ - block_shift_); }

  // REQUIRES: offset < image_size()
  uint64_t block_of(uint64_t offset) const { return offset >> block_shift_; }
  uint64_t segment_of(uint64_t offset) const { return offset >> segment_shift_; }
  uint64_t segment_of_block(uint64_t block) const { return block >> (segment_shift_ - block_shift_); }

  // The blocks that the byte range [offset, offset+length) touches, partial
  // ones included. REQUIRES: offset + length <= image_size()
  IndexRange blocks_touched(uint64_t offset, uint64_t length) const;
  // The blocks that [offset, offset+length) covers entirely. The image's last
  // partial block counts as covered when the range reaches the image's end.
  IndexRange blocks_covered(uint64_t offset, uint64_t length) const;
  // The segments that [offset, offset+length) touches.
  IndexRange segments_touched(uint64_t offset, uint64_t length) const;
  // The blocks of one segment (the last may hold fewer).
  IndexRange blocks_of_segment(uint64_t segment) const;

  // Byte offset and length of a block, clipped to the image's end.
  uint64_t block_offset(uint64_t block) const { return block << block_shift_; }
  uint64_t block_length(uint64_t block) const;
  // Byte range of blocks [r.first, r.last), clipped to the image's end.
  uint64_t range_offset(IndexRange r) const { return block_offset(r.first); }
  uint64_t range_length(IndexRange r) const;
  uint64_t segment_offset(uint64_t segment) const { return segment << segment_shift_; }
  uint64_t segment_length(uint64_t segment) const;

 private:
  SegmentGeometry(uint64_t image_size, unsigned block_shift, unsigned segment_shift);

  uint64_t image_size_ = 0;
  unsigned block_shift_ = 12;
  unsigned segment_shift_ = 20;
  uint64_t block_count_ = 0;
  uint64_t segment_count_ = 0;
};

}  // namespace livemig
