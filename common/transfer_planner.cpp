#include "common/transfer_planner.h"

#include <algorithm>
#include <cstring>
#include <numeric>

namespace livemig {

IndexRange next_transfer_unit_in(const BlockBitmap& bits, const SegmentGeometry& g, IndexRange limit,
                                 uint64_t from, uint64_t max_blocks) {
  const uint64_t none = bits.size();
  uint64_t first = bits.find_next_set(std::max(from, limit.first), limit.last);
  if (first >= limit.last || first >= none) return {none, none};
  uint64_t seg_end = g.blocks_of_segment(g.segment_of_block(first)).last;
  uint64_t cap = std::min({seg_end, limit.last, first + max_blocks});
  return {first, bits.find_next_clear(first, cap)};
}

IndexRange next_transfer_unit(const BlockBitmap& bits, const SegmentGeometry& g, uint64_t from,
                              uint64_t max_blocks) {
  return next_transfer_unit_in(bits, g, {0, bits.size()}, from, max_blocks);
}

bool is_all_zero(const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  // Check the first 16 bytes directly, then compare the buffer with itself
  // shifted by 16: memcmp is vectorised, so this runs at memory speed.
  size_t head = std::min<size_t>(n, 16);
  for (size_t i = 0; i < head; ++i)
    if (b[i]) return false;
  return n <= 16 || std::memcmp(b, b + 16, n - 16) == 0;
}

std::vector<ZeroSplit> split_zero_runs(const SegmentGeometry& g, IndexRange blocks, const char* data) {
  std::vector<ZeroSplit> out;
  const uint64_t base = g.block_offset(blocks.first);
  for (uint64_t b = blocks.first; b < blocks.last; ++b) {
    bool zero = is_all_zero(data + (g.block_offset(b) - base), g.block_length(b));
    if (!out.empty() && out.back().zero == zero && out.back().blocks.last == b)
      out.back().blocks.last = b + 1;
    else
      out.push_back({{b, b + 1}, zero});
  }
  return out;
}

std::vector<IndexRange> set_runs(const BlockBitmap& bits) {
  std::vector<IndexRange> out;
  for (IndexRange r = bits.next_set_run(0); !r.empty() && r.first < bits.size(); r = bits.next_set_run(r.last))
    out.push_back(r);
  return out;
}

std::vector<uint64_t> fetch_order(std::span<const double> priority) {
  std::vector<uint64_t> order(priority.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](uint64_t a, uint64_t b) { return priority[a] > priority[b]; });
  return order;
}

}  // namespace livemig
