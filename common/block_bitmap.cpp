#include "common/block_bitmap.h"

#include <algorithm>
#include <bit>
#include <cstring>

namespace livemig {

BlockBitmap::BlockBitmap(uint64_t bits)
    : bits_(bits), words_(new std::atomic<uint64_t>[(bits + 63) / 64]) {
  for (uint64_t i = 0; i < word_count(); ++i) words_[i].store(0, std::memory_order_relaxed);
}

bool BlockBitmap::test(uint64_t i) const {
  return (word(i).load(std::memory_order_acquire) >> (i & 63)) & 1;
}

bool BlockBitmap::set(uint64_t i) {
  uint64_t bit = uint64_t{1} << (i & 63);
  return word(i).fetch_or(bit, std::memory_order_acq_rel) & bit;
}

bool BlockBitmap::clear(uint64_t i) {
  uint64_t bit = uint64_t{1} << (i & 63);
  return word(i).fetch_and(~bit, std::memory_order_acq_rel) & bit;
}

template <typename Fn>
void BlockBitmap::for_each_word(IndexRange r, Fn&& fn) const {
  uint64_t i = r.first;
  while (i < r.last) {
    uint64_t w = i >> 6;
    unsigned lo = i & 63;
    uint64_t n = std::min<uint64_t>(64 - lo, r.last - i);
    uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << lo;
    fn(w, mask);
    i += n;
  }
}

void BlockBitmap::set_range(IndexRange r) {
  for_each_word(r, [&](uint64_t w, uint64_t m) { words_[w].fetch_or(m, std::memory_order_acq_rel); });
}

void BlockBitmap::clear_range(IndexRange r) {
  for_each_word(r, [&](uint64_t w, uint64_t m) { words_[w].fetch_and(~m, std::memory_order_acq_rel); });
}

uint64_t BlockBitmap::test_and_clear_range(IndexRange r) {
  uint64_t n = 0;
  for_each_word(r, [&](uint64_t w, uint64_t m) {
    n += std::popcount(words_[w].fetch_and(~m, std::memory_order_acq_rel) & m);
  });
  return n;
}

bool BlockBitmap::all_set(IndexRange r) const {
  bool all = true;
  for_each_word(r, [&](uint64_t w, uint64_t m) {
    all = all && (words_[w].load(std::memory_order_acquire) & m) == m;
  });
  return all;
}

bool BlockBitmap::none_set(IndexRange r) const {
  bool none = true;
  for_each_word(r, [&](uint64_t w, uint64_t m) {
    none = none && (words_[w].load(std::memory_order_acquire) & m) == 0;
  });
  return none;
}

uint64_t BlockBitmap::count_range(IndexRange r) const {
  uint64_t n = 0;
  for_each_word(r, [&](uint64_t w, uint64_t m) {
    n += std::popcount(words_[w].load(std::memory_order_relaxed) & m);
  });
  return n;
}

uint64_t BlockBitmap::find_next_set(uint64_t from) const {
  if (from >= bits_) return bits_;
  uint64_t w = from >> 6;
  uint64_t v = words_[w].load(std::memory_order_acquire) & (~uint64_t{0} << (from & 63));
  while (true) {
    if (v) return std::min(bits_, (w << 6) + std::countr_zero(v));
    if (++w >= word_count()) return bits_;
    v = words_[w].load(std::memory_order_acquire);
  }
}

uint64_t BlockBitmap::find_next_clear(uint64_t from) const {
  if (from >= bits_) return bits_;
  uint64_t w = from >> 6;
  uint64_t v = ~words_[w].load(std::memory_order_acquire) & (~uint64_t{0} << (from & 63));
  while (true) {
    if (v) return std::min(bits_, (w << 6) + std::countr_zero(v));
    if (++w >= word_count()) return bits_;
    v = ~words_[w].load(std::memory_order_acquire);
  }
}

IndexRange BlockBitmap::next_set_run(uint64_t from, uint64_t max_len) const {
  uint64_t first = find_next_set(from);
  if (first >= bits_) return {bits_, bits_};
  uint64_t last = find_next_clear(first);
  if (last - first > max_len) last = first + max_len;
  return {first, last};
}

std::string BlockBitmap::serialize() const {
  std::string out(word_count() * 8, '\0');
  for (uint64_t w = 0; w < word_count(); ++w) {
    uint64_t v = words_[w].load(std::memory_order_acquire);
    for (int b = 0; b < 8; ++b) out[w * 8 + b] = static_cast<char>((v >> (8 * b)) & 0xff);
  }
  return out;
}

bool BlockBitmap::deserialize(std::string_view bytes) {
  if (bytes.size() != word_count() * 8) return false;
  for (uint64_t w = 0; w < word_count(); ++w) {
    uint64_t v = 0;
    for (int b = 0; b < 8; ++b) v |= uint64_t{static_cast<unsigned char>(bytes[w * 8 + b])} << (8 * b);
    if (w == word_count() - 1 && (bits_ & 63)) v &= (uint64_t{1} << (bits_ & 63)) - 1;
    words_[w].store(v, std::memory_order_release);
  }
  return true;
}

}  // namespace livemig
