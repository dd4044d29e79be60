#include "common/block_bitmap.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <utility>

namespace livemig {

namespace {
constexpr uint64_t kAllOnes = ~uint64_t{0};

uint64_t mask_of(unsigned lo, uint64_t n) { return (n == 64 ? kAllOnes : ((uint64_t{1} << n) - 1)) << lo; }
}  // namespace

BlockBitmap::BlockBitmap(uint64_t bits) : bits_(bits), dir_(new std::atomic<Page*>[page_count()]) {
  for (uint64_t p = 0; p < page_count(); ++p) dir_[p].store(nullptr, std::memory_order_relaxed);
}

BlockBitmap::~BlockBitmap() { free_pages(); }

void BlockBitmap::free_pages() {
  if (!dir_) return;
  for (uint64_t p = 0; p < page_count(); ++p)
    if (Page* page = dir_[p].load(std::memory_order_relaxed); is_words(page)) delete page;
  dir_.reset();
}

BlockBitmap::BlockBitmap(BlockBitmap&& other) noexcept
    : bits_(std::exchange(other.bits_, 0)),
      dir_(std::move(other.dir_)),
      pages_with_words_(other.pages_with_words_.exchange(0)) {}

BlockBitmap& BlockBitmap::operator=(BlockBitmap&& other) noexcept {
  if (this == &other) return *this;
  free_pages();
  bits_ = std::exchange(other.bits_, 0);
  dir_ = std::move(other.dir_);
  pages_with_words_.store(other.pages_with_words_.exchange(0));
  return *this;
}

uint64_t BlockBitmap::valid_mask(uint64_t w) const {
  return (w == word_count() - 1 && (bits_ & 63)) ? (uint64_t{1} << (bits_ & 63)) - 1 : kAllOnes;
}

uint64_t BlockBitmap::load_word(uint64_t w) const {
  Page* page = dir_[w / kPageWords].load(std::memory_order_acquire);
  if (page == nullptr) return 0;
  if (page == full_marker()) return valid_mask(w);
  return page->words[w % kPageWords].load(std::memory_order_acquire);
}

// A page gets words the first time a change leaves it mixed; racing
// threads agree on one (compare-and-swap), and the loser's copy is dropped.
// A page that went from full to clear (or back) meanwhile is copied again.
BlockBitmap::Page* BlockBitmap::words_of(uint64_t p) {
  Page* cur = dir_[p].load(std::memory_order_acquire);
  while (!is_words(cur)) {
    auto fresh = std::make_unique<Page>();
    for (uint64_t k = 0; k < kPageWords; ++k) {
      const uint64_t w = p * kPageWords + k;  // a full page's bits beyond size() stay clear
      fresh->words[k].store(cur == full_marker() && w < word_count() ? valid_mask(w) : 0, std::memory_order_relaxed);
    }
    if (dir_[p].compare_exchange_strong(cur, fresh.get(), std::memory_order_acq_rel)) {
      pages_with_words_.fetch_add(1, std::memory_order_relaxed);
      return fresh.release();
    }
  }
  return cur;
}

bool BlockBitmap::test(uint64_t i) const { return (load_word(i >> 6) >> (i & 63)) & 1; }

bool BlockBitmap::set(uint64_t i) {
  const uint64_t p = (i >> 6) / kPageWords;
  if (dir_[p].load(std::memory_order_acquire) == full_marker()) return true;
  const uint64_t bit = uint64_t{1} << (i & 63);
  return words_of(p)->words[(i >> 6) % kPageWords].fetch_or(bit, std::memory_order_acq_rel) & bit;
}

bool BlockBitmap::clear(uint64_t i) {
  const uint64_t p = (i >> 6) / kPageWords;
  if (dir_[p].load(std::memory_order_acquire) == nullptr) return false;
  const uint64_t bit = uint64_t{1} << (i & 63);
  return words_of(p)->words[(i >> 6) % kPageWords].fetch_and(~bit, std::memory_order_acq_rel) & bit;
}

template <typename Fn>
void BlockBitmap::for_each_word(IndexRange r, Fn&& fn) const {
  uint64_t i = r.first;
  while (i < r.last) {
    uint64_t w = i >> 6;
    unsigned lo = i & 63;
    uint64_t n = std::min<uint64_t>(64 - lo, r.last - i);
    fn(w, mask_of(lo, n));
    i += n;
  }
}

template <typename Fn>
void BlockBitmap::for_each_page(IndexRange r, Fn&& fn) const {
  uint64_t i = r.first;
  while (i < r.last) {
    const uint64_t p = i / kPageBits;
    const uint64_t page_first = p * kPageBits;
    const uint64_t page_last = std::min(page_first + kPageBits, bits_);
    const uint64_t end = std::min(r.last, page_last);
    fn(p, IndexRange{i, end}, i == page_first && end == page_last);
    i = end;
  }
}

// A whole page whose bits are all clear (set) becomes all set (clear) by
// its directory entry alone; a page with words changes word by word (it
// keeps them: another thread may be changing them too). Counts the bits
// that changed, atomically per word or page: a bit changed concurrently
// by another thread is counted by one of the two.
uint64_t BlockBitmap::change_range(IndexRange r, bool set) {
  Page* const to = set ? full_marker() : nullptr;
  Page* const from = set ? nullptr : full_marker();
  uint64_t changed = 0;
  for_each_page(r, [&](uint64_t p, IndexRange bits, bool whole) {
    Page* cur = dir_[p].load(std::memory_order_acquire);
    if (cur == to) return;
    if (whole && cur == from && dir_[p].compare_exchange_strong(cur, to, std::memory_order_acq_rel)) {
      changed += bits.count();
      return;
    }
    if (cur == to) return;  // the exchange failed because it already was
    Page* page = words_of(p);
    for_each_word(bits, [&](uint64_t w, uint64_t m) {
      auto& word = page->words[w % kPageWords];
      const uint64_t old = set ? word.fetch_or(m, std::memory_order_acq_rel)
                               : word.fetch_and(~m, std::memory_order_acq_rel);
      changed += std::popcount((set ? ~old : old) & m);
    });
  });
  return changed;
}

uint64_t BlockBitmap::set_range(IndexRange r) { return change_range(r, true); }

uint64_t BlockBitmap::clear_range(IndexRange r) { return change_range(r, false); }

bool BlockBitmap::all_set(IndexRange r) const { return count_range(r) == r.count(); }

bool BlockBitmap::none_set(IndexRange r) const {
  return r.last <= r.first || (find_next_set(r.first) >= r.last);
}

uint64_t BlockBitmap::count_range(IndexRange r) const {
  uint64_t n = 0;
  for_each_page(r, [&](uint64_t p, IndexRange bits, bool) {
    Page* page = dir_[p].load(std::memory_order_acquire);
    if (page == nullptr) return;
    if (page == full_marker()) {
      n += bits.count();
      return;
    }
    for_each_word(bits, [&](uint64_t w, uint64_t m) {
      n += std::popcount(page->words[w % kPageWords].load(std::memory_order_relaxed) & m);
    });
  });
  return n;
}

// Skips a page without words in one step.
uint64_t BlockBitmap::find_next(uint64_t from, bool value) const {
  Page* const uniform_hit = value ? full_marker() : nullptr;  // every bit equals value
  const uint64_t flip = value ? 0 : kAllOnes;                 // words to look for set bits in
  while (from < bits_) {
    const uint64_t p = from / kPageBits;
    const uint64_t page_last = std::min((p + 1) * kPageBits, bits_);
    Page* page = dir_[p].load(std::memory_order_acquire);
    if (page == uniform_hit) return from;
    if (is_words(page)) {
      const uint64_t last_word = (page_last + 63) / 64;
      uint64_t w = from >> 6;
      uint64_t v = (page->words[w % kPageWords].load(std::memory_order_acquire) ^ flip) & (kAllOnes << (from & 63));
      while (true) {
        if (v) return std::min(bits_, (w << 6) + std::countr_zero(v));
        if (++w >= last_word) break;
        v = page->words[w % kPageWords].load(std::memory_order_acquire) ^ flip;
      }
    }
    from = page_last;
  }
  return bits_;
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
    uint64_t v = load_word(w);
    for (int b = 0; b < 8; ++b) out[w * 8 + b] = static_cast<char>((v >> (8 * b)) & 0xff);
  }
  return out;
}

bool BlockBitmap::deserialize(std::string_view bytes) {
  if (bytes.size() != word_count() * 8) return false;
  return load_words(0, bytes);
}

bool BlockBitmap::load_words(uint64_t first_word, std::string_view bytes) {
  if (bytes.size() % 8 != 0 || first_word > word_count() || bytes.size() / 8 > word_count() - first_word)
    return false;
  const uint64_t end_word = first_word + bytes.size() / 8;
  auto word_at = [&](uint64_t w) {
    uint64_t v = 0;
    for (int b = 0; b < 8; ++b) v |= uint64_t{static_cast<unsigned char>(bytes[(w - first_word) * 8 + b])} << (8 * b);
    return v & valid_mask(w);
  };
  for (uint64_t w = first_word; w < end_word;) {
    const uint64_t p = w / kPageWords;
    const uint64_t page_end = std::min((p + 1) * kPageWords, end_word);
    // A whole page of clear (set) words needs no words of its own.
    bool zeros = true, ones = true;
    for (uint64_t k = w; k < page_end; ++k) {
      const uint64_t v = word_at(k);
      zeros = zeros && v == 0;
      ones = ones && v == valid_mask(k);
    }
    const IndexRange bits{w * 64, std::min(page_end * 64, bits_)};
    if (zeros || ones) {
      change_range(bits, ones);
    } else {
      Page* page = words_of(p);
      for (uint64_t k = w; k < page_end; ++k) page->words[k % kPageWords].store(word_at(k), std::memory_order_release);
    }
    w = page_end;
  }
  return true;
}

uint64_t BlockBitmap::memory_bytes() const {
  return sizeof(*this) + page_count() * sizeof(std::atomic<Page*>) +
         pages_with_words_.load(std::memory_order_relaxed) * sizeof(Page);
}

}  // namespace livemig
