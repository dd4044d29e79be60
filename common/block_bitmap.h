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
// bits are all clear or all set costs only its directory entry; it gets
// words the first time a change leaves it mixed, and gives them back when a
// clear leaves it all clear. The words of every page sit at a fixed place in
// one reserved (never touched until used) mapping: a page's memory exists
// only while it is mixed, and is returned with madvise. A 1 TiB image's owed
// set, all set at the start and cleared unit by unit as a sender claims it,
// costs 64 KiB of directory and a few pages, not 32 MiB; so does a
// destination's presence map.
//
// Lock-free still: a directory entry holds the page's kind (clear, set,
// mixed, or locked for the few instructions of a change of kind) and, while
// mixed, how many threads are changing its words. A mixed page becomes clear
// again only when nobody is changing it; a thread that reads its words
// meanwhile reads zeros, which is what the page then holds.
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

  // Index of the first set (clear) bit at or after `from` and before
  // `limit`, or min(limit, size()) if none. A limit keeps the search short:
  // without one, a run that goes on to the end of a 1 TiB disk's bitmap is
  // walked to its end.
  uint64_t find_next_set(uint64_t from, uint64_t limit = UINT64_MAX) const { return find_next(from, true, limit); }
  uint64_t find_next_clear(uint64_t from, uint64_t limit = UINT64_MAX) const { return find_next(from, false, limit); }
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
  // A directory entry: kind in the low 2 bits, writers (mixed only) above.
  enum Kind : uint64_t { kClear = 0, kSet = 1, kMixed = 2, kLocked = 3 };
  static constexpr uint64_t kKindMask = 3;
  static constexpr uint64_t kWriter = 4;

  uint64_t word_count() const { return (bits_ + 63) / 64; }
  uint64_t page_count() const { return (word_count() + kPageWords - 1) / kPageWords; }
  // The bits of word w that exist (all but the last word's tail).
  uint64_t valid_mask(uint64_t w) const;
  std::atomic_ref<uint64_t> word_ref(uint64_t w) const { return std::atomic_ref<uint64_t>(words_[w]); }
  // Page p's entry, once it is not locked.
  uint64_t entry(uint64_t p) const;
  // Word w's value (a page without words reads as all clear or all set).
  uint64_t load_word(uint64_t w) const;
  // Makes page p mixed (filling its words from what it was) and counts this
  // thread as one of its writers; unpin() when done.
  void pin(uint64_t p);
  void unpin(uint64_t p) { dir_[p].fetch_sub(kWriter, std::memory_order_acq_rel); }
  // Page p, mixed, all clear and without writers: becomes clear, and its
  // memory goes back to the system.
  void try_release(uint64_t p);
  // Calls fn(word_index, mask) for each word that r touches.
  template <typename Fn>
  void for_each_word(IndexRange r, Fn&& fn) const;
  // r's part in each page: fn(page, IndexRange of bits, whole page?).
  template <typename Fn>
  void for_each_page(IndexRange r, Fn&& fn) const;
  uint64_t change_range(IndexRange r, bool set);
  uint64_t change_bit(uint64_t i, bool set);
  uint64_t find_next(uint64_t from, bool value, uint64_t limit) const;
  void unmap();

  uint64_t bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> dir_;
  uint64_t* words_ = nullptr;  // page_count() * 4 KiB, reserved, touched only when mixed
  std::atomic<uint64_t> mixed_pages_{0};

 public:
  ~BlockBitmap();
  BlockBitmap(BlockBitmap&& other) noexcept;
  BlockBitmap& operator=(BlockBitmap&& other) noexcept;
  BlockBitmap(const BlockBitmap&) = delete;
  BlockBitmap& operator=(const BlockBitmap&) = delete;
};

}  // namespace livemig
