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
//
// Memory follows the bits, not the size (issue #15): the bits live in pages
// of 32768 (4 KiB of words, 128 MiB of image at 4 KiB blocks). A page whose
// bits are all clear or all set costs one pointer in the directory (null, or
// a marker); it gets words of its own the first time a change leaves it mixed.
// A 1 TiB image's owed set, all set at the start of a migration, costs 64 KiB
// instead of 32 MiB; so does a destination's presence map, all set but the
// blocks still to pull. Pages with words are never freed before the bitmap
// (another thread may be using them: lock-free, no reclamation), so the
// memory is that of the pages ever mixed, at most the dense size.
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

  // Set (clear) every bit of r; return how many changed, atomically per
  // word: a bit changed concurrently is counted by exactly one of the two.
  // clear_range is a sender's claim: a bit set concurrently is either
  // counted and cleared, or left set. REQUIRES: r.last <= size()
  uint64_t set_range(IndexRange r);
  uint64_t clear_range(IndexRange r);
  uint64_t test_and_clear_range(IndexRange r) { return clear_range(r); }
  bool all_set(IndexRange r) const;
  bool none_set(IndexRange r) const;
  uint64_t count_range(IndexRange r) const;

  // Number of set bits (a snapshot; exact only while nobody writes).
  uint64_t count() const { return count_range({0, bits_}); }

  // Index of the first set (clear) bit at or after `from`, or size() if none.
  uint64_t find_next_set(uint64_t from) const { return find_next(from, true); }
  uint64_t find_next_clear(uint64_t from) const { return find_next(from, false); }
  // The first run of contiguous set bits starting at or after `from`, at most
  // max_len long; empty (first == last == size()) if there is none.
  IndexRange next_set_run(uint64_t from, uint64_t max_len = UINT64_MAX) const;

  // Little-endian bytes of the words, (size()+7)/8 bytes rounded up to 8.
  std::string serialize() const;
  // Loads from serialize()'s output; false if the length does not match.
  bool deserialize(std::string_view bytes);
  // Loads words [first_word, first_word + bytes.size() / 8) from serialize()'s
  // format (a page of a state file); bits beyond size() stay clear. false if
  // the words do not fit or bytes is not whole words.
  bool load_words(uint64_t first_word, std::string_view bytes);

  // Bytes of memory the bits take now (directory and mixed pages).
  uint64_t memory_bytes() const;

  static constexpr uint64_t kPageWords = 512;
  static constexpr uint64_t kPageBits = kPageWords * 64;

 private:
  struct Page {
    std::atomic<uint64_t> words[kPageWords];
  };
  // The directory entry of a page whose bits are all set (never dereferenced).
  static Page* full_marker() { return reinterpret_cast<Page*>(alignof(Page)); }
  static bool is_words(const Page* p) { return p != nullptr && p != full_marker(); }

  uint64_t word_count() const { return (bits_ + 63) / 64; }
  uint64_t page_count() const { return (word_count() + kPageWords - 1) / kPageWords; }
  // The bits of word w that exist (all but the last word's tail).
  uint64_t valid_mask(uint64_t w) const;
  // Word w's value (a page without words reads as all clear or all set).
  uint64_t load_word(uint64_t w) const;
  // Page p with words of its own, made from what it is now if it has none.
  Page* words_of(uint64_t p);
  // Calls fn(word_index, mask) for each word that r touches.
  template <typename Fn>
  void for_each_word(IndexRange r, Fn&& fn) const;
  // r's part in each page: fn(page, IndexRange of bits, whole page?).
  template <typename Fn>
  void for_each_page(IndexRange r, Fn&& fn) const;
  uint64_t change_range(IndexRange r, bool set);
  uint64_t find_next(uint64_t from, bool value) const;
  void free_pages();

  uint64_t bits_;
  std::unique_ptr<std::atomic<Page*>[]> dir_;
  std::atomic<uint64_t> pages_with_words_{0};

 public:
  ~BlockBitmap();
  BlockBitmap(BlockBitmap&& other) noexcept;
  BlockBitmap& operator=(BlockBitmap&& other) noexcept;
  BlockBitmap(const BlockBitmap&) = delete;
  BlockBitmap& operator=(const BlockBitmap&) = delete;
};

}  // namespace livemig
