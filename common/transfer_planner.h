// How block sets turn into transfers: runs of contiguous blocks coalesced into
// transfer units (never crossing a segment, so a unit locks one segment at the
// destination), zero detection (all-zero blocks cross as zero notes, not data),
// and the order in which remaining segments are fetched after handover.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/block_bitmap.h"
#include "common/segment_geometry.h"

namespace livemig {

// The first run of set bits at or after block `from`, at most max_blocks long
// and within one segment; empty ({size, size}) if no bit is set.
// REQUIRES: max_blocks > 0
IndexRange next_transfer_unit(const BlockBitmap& bits, const SegmentGeometry& g, uint64_t from,
                              uint64_t max_blocks);

// The same, but the run must also lie within [limit.first, limit.last).
IndexRange next_transfer_unit_in(const BlockBitmap& bits, const SegmentGeometry& g, IndexRange limit,
                                 uint64_t from, uint64_t max_blocks);

// True if all n bytes at p are zero.
bool is_all_zero(const void* p, size_t n);

// A run of blocks that are all zero or all carry data.
struct ZeroSplit {
  IndexRange blocks;
  bool zero = false;
};

// Splits `data`, the bytes of blocks `blocks` (the last may be partial at the
// image's end), into maximal runs of all-zero and data blocks.
std::vector<ZeroSplit> split_zero_runs(const SegmentGeometry& g, IndexRange blocks, const char* data);

// Coalesced runs of set bits in `bits`, in block order.
std::vector<IndexRange> set_runs(const BlockBitmap& bits);

// Segment indexes in the order a destination fetches them after handover:
// decreasing priority, equal priorities in index order.
std::vector<uint64_t> fetch_order(std::span<const double> priority);

}  // namespace livemig
