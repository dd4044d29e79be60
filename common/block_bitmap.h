// A fixed-size bitmap of blocks that many threads may change at once.
//
// Each bit is one block of the image. Migration uses it for two sets:
//   dirty   - bit set: the block was written since it was last sent to the peer
//             (a resend is owed); cleared when a send of it starts.
//   present - bit set: the destination's image holds this block's final data
//             (written locally or pulled); clear: it must still come from the
//             source.
// Every operation is lock-free on std::atomic<uint64_t> words. test_and_clear
// lets a sender claim a dirty block so that a concurrent writer's set, which
// happens after the claim, is never lost (DRBD's lesson: a send must not clear a
// bit that a newer write set).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/segment_geometry.h"

namespace livemig {

class BlockBitmap {
 public:
  explicit BlockBitmap(uint64_t bits = 0);

  uint64_t size() const { return bits_; }

  // REQUIRES: i < size()
  bool test(uint64_t i) const;
  // Sets bit i; returns its previous value.
  bool set(uint64_t i);
  // Clears bit i; returns its previous value.
  bool clear(uint64_t i);

  // REQUIRES: r.last <= size()
  void set_range(IndexRange r);
  void clear_range(IndexRange r);
  // Clears every bit of r and returns how many of them were set, atomically
  // per word: a bit set concurrently is either counted and cleared, or left set.
  uint64_t test_and_clear_range(IndexRange r);
  bool all_set(IndexRange r) const;
  bool none_set(IndexRange r) const;
  uint64_t count_range(IndexRange r) const;

  // Number of set bits (a snapshot; exact only while nobody writes).
  uint64_t count() const { return count_range({0, bits_}); }

  // Index of the first set (clear) bit at or after `from`, or size() if none.
  uint64_t find_next_set(uint64_t from) const;
  uint64_t find_next_clear(uint64_t from) const;
  // The first run of contiguous set bits starting at or after `from`, at most
  // max_len long; empty (first == last == size()) if there is none.
  IndexRange next_set_run(uint64_t from, uint64_t max_len = UINT64_MAX) const;

  // Little-endian bytes of the words, (size()+7)/8 bytes rounded up to 8.
  std::string serialize() const;
  // Loads from serialize()'s output; false if the length does not match.
  bool deserialize(std::string_view bytes);

 private:
  std::atomic<uint64_t>& word(uint64_t i) const { return words_[i >> 6]; }
  uint64_t word_count() const { return (bits_ + 63) / 64; }
  // Calls fn(word_index, mask) for each word that r touches.
  template <typename Fn>
  void for_each_word(IndexRange r, Fn&& fn) const;

  uint64_t bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace livemig
