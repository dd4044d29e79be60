#include "common/block_bitmap.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>
#include <thread>
#include <utility>

namespace livemig {

namespace {
constexpr uint64_t kAllOnes = ~uint64_t{0};
constexpr uint64_t kPageBytes = BlockBitmap::kPageWords * 8;

uint64_t mask_of(unsigned lo, uint64_t n) { return (n == 64 ? kAllOnes : ((uint64_t{1} << n) - 1)) << lo; }

// Whether a page of words is one page of the system's, so that madvise can
// give exactly it back.
bool can_release() {
  static const bool ok = ::sysconf(_SC_PAGESIZE) == static_cast<long>(kPageBytes);
  return ok;
}
}  // namespace

BlockBitmap::BlockBitmap(uint64_t bits) : bits_(bits), dir_(new std::atomic<uint64_t>[page_count()]) {
  for (uint64_t p = 0; p < page_count(); ++p) dir_[p].store(kClear, std::memory_order_relaxed);
  if (page_count() == 0) return;
  // Reserved, not committed: only the pages ever mixed take memory.
  void* m = ::mmap(nullptr, page_count() * kPageBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  words_ = static_cast<uint64_t*>(m);
}

BlockBitmap::~BlockBitmap() { unmap(); }

void BlockBitmap::unmap() {
  if (words_) ::munmap(words_, page_count() * kPageBytes);
  words_ = nullptr;
}

BlockBitmap::BlockBitmap(BlockBitmap&& other) noexcept
    : bits_(std::exchange(other.bits_, 0)),
      dir_(std::move(other.dir_)),
      words_(std::exchange(other.words_, nullptr)),
      mixed_pages_(other.mixed_pages_.exchange(0)) {}

BlockBitmap& BlockBitmap::operator=(BlockBitmap&& other) noexcept {
  if (this == &other) return *this;
  unmap();
  bits_ = std::exchange(other.bits_, 0);
  dir_ = std::move(other.dir_);
  words_ = std::exchange(other.words_, nullptr);
  mixed_pages_.store(other.mixed_pages_.exchange(0));
  return *this;
}

uint64_t BlockBitmap::valid_mask(uint64_t w) const {
  return (w == word_count() - 1 && (bits_ & 63)) ? (uint64_t{1} << (bits_ & 63)) - 1 : kAllOnes;
}

uint64_t BlockBitmap::entry(uint64_t p) const {
  for (;;) {
    uint64_t e = dir_[p].load(std::memory_order_acquire);
    if ((e & kKindMask) != kLocked) return e;
    std::this_thread::yield();
  }
}

uint64_t BlockBitmap::load_word(uint64_t w) const {
  switch (entry(w / kPageWords) & kKindMask) {
    case kClear:
      return 0;
    case kSet:
      return valid_mask(w);
    default:
      return word_ref(w).load(std::memory_order_acquire);
  }
}

// A clear page's words are zero already (never touched, or given back); a
// set page's are filled while its entry is locked, so no reader sees them
// half filled.
void BlockBitmap::pin(uint64_t p) {
  uint64_t e = dir_[p].load(std::memory_order_acquire);
  for (;;) {
    const uint64_t kind = e & kKindMask;
    if (kind == kLocked) {
      std::this_thread::yield();
      e = dir_[p].load(std::memory_order_acquire);
    } else if (kind == kMixed) {
      if (dir_[p].compare_exchange_weak(e, e + kWriter, std::memory_order_acq_rel)) return;
    } else if (kind == kClear) {
      if (dir_[p].compare_exchange_weak(e, kMixed + kWriter, std::memory_order_acq_rel)) {
        mixed_pages_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    } else if (dir_[p].compare_exchange_weak(e, kLocked, std::memory_order_acq_rel)) {  // set
      const uint64_t first = p * kPageWords, last = std::min(first + kPageWords, word_count());
      for (uint64_t w = first; w < last; ++w) word_ref(w).store(valid_mask(w), std::memory_order_relaxed);
      mixed_pages_.fetch_add(1, std::memory_order_relaxed);
      dir_[p].store(kMixed + kWriter, std::memory_order_release);
      return;
    }
  }
}

void BlockBitmap::try_release(uint64_t p) {
  const uint64_t first = p * kPageWords, last = std::min(first + kPageWords, word_count());
  auto all_clear = [&] {
    for (uint64_t w = first; w < last; ++w)
      if (word_ref(w).load(std::memory_order_acquire) != 0) return false;
    return true;
  };
  uint64_t e = kMixed;  // mixed, no writers
  if (!all_clear() || !dir_[p].compare_exchange_strong(e, kLocked, std::memory_order_acq_rel)) return;
  if (!all_clear()) {  // a writer got in before the lock
    dir_[p].store(kMixed, std::memory_order_release);
    return;
  }
  // Zero already: giving the memory back changes nothing a reader sees.
  if (can_release()) ::madvise(words_ + first, kPageBytes, MADV_DONTNEED);
  mixed_pages_.fetch_sub(1, std::memory_order_relaxed);
  dir_[p].store(kClear, std::memory_order_release);
}

uint64_t BlockBitmap::change_bit(uint64_t i, bool set) {
  const uint64_t p = (i >> 6) / kPageWords;
  const uint64_t uniform = entry(p) & kKindMask;
  if (uniform == (set ? kSet : kClear)) return 0;
  const uint64_t bit = uint64_t{1} << (i & 63);
  pin(p);
  const uint64_t old = set ? word_ref(i >> 6).fetch_or(bit, std::memory_order_acq_rel)
                           : word_ref(i >> 6).fetch_and(~bit, std::memory_order_acq_rel);
  unpin(p);
  return (set ? ~old : old) & bit ? 1 : 0;
}

bool BlockBitmap::test(uint64_t i) const { return (load_word(i >> 6) >> (i & 63)) & 1; }

bool BlockBitmap::set(uint64_t i) { return change_bit(i, true) == 0; }

bool BlockBitmap::clear(uint64_t i) { return change_bit(i, false) == 1; }

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

// A whole page that is all clear (set) becomes all set (clear) by its
// directory entry alone; otherwise its words change one by one, and a page
// a clear leaves all clear gives its memory back. Counts the bits that
// changed, atomically per word or page: a bit changed concurrently by
// another thread is counted by one of the two.
uint64_t BlockBitmap::change_range(IndexRange r, bool set) {
  const uint64_t to = set ? kSet : kClear, from = set ? kClear : kSet;
  uint64_t changed = 0;
  for_each_page(r, [&](uint64_t p, IndexRange bits, bool whole) {
    uint64_t e = entry(p);
    if (e == to) return;
    if (whole && e == from && dir_[p].compare_exchange_strong(e, to, std::memory_order_acq_rel)) {
      changed += bits.count();
      return;
    }
    if (e == to) return;  // the exchange failed because it already was
    pin(p);
    for_each_word(bits, [&](uint64_t w, uint64_t m) {
      const uint64_t old = set ? word_ref(w).fetch_or(m, std::memory_order_acq_rel)
                               : word_ref(w).fetch_and(~m, std::memory_order_acq_rel);
      changed += std::popcount((set ? ~old : old) & m);
    });
    unpin(p);
    if (!set) try_release(p);
  });
  return changed;
}

uint64_t BlockBitmap::set_range(IndexRange r) { return change_range(r, true); }

uint64_t BlockBitmap::clear_range(IndexRange r) { return change_range(r, false); }

bool BlockBitmap::all_set(IndexRange r) const { return count_range(r) == r.count(); }

bool BlockBitmap::none_set(IndexRange r) const { return r.last <= r.first || find_next_set(r.first) >= r.last; }

uint64_t BlockBitmap::count_range(IndexRange r) const {
  uint64_t n = 0;
  for_each_page(r, [&](uint64_t p, IndexRange bits, bool) {
    switch (entry(p) & kKindMask) {
      case kClear:
        return;
      case kSet:
        n += bits.count();
        return;
      default:
        for_each_word(bits, [&](uint64_t w, uint64_t m) {
          n += std::popcount(word_ref(w).load(std::memory_order_relaxed) & m);
        });
    }
  });
  return n;
}

// Skips a page whose bits are all equal in one step.
uint64_t BlockBitmap::find_next(uint64_t from, bool value, uint64_t limit) const {
  const uint64_t hit = value ? kSet : kClear;  // a page whose every bit equals value
  const uint64_t flip = value ? 0 : kAllOnes;  // words to look for set bits in
  const uint64_t end = std::min(limit, bits_);
  while (from < end) {
    const uint64_t p = from / kPageBits;
    const uint64_t page_last = std::min((p + 1) * kPageBits, end);
    const uint64_t kind = entry(p) & kKindMask;
    if (kind == hit) return from;
    if (kind == kMixed) {
      const uint64_t last_word = (page_last + 63) / 64;
      uint64_t w = from >> 6;
      uint64_t v = ((word_ref(w).load(std::memory_order_acquire) ^ flip) & valid_mask(w)) & (kAllOnes << (from & 63));
      while (true) {
        if (v) return std::min(end, (w << 6) + std::countr_zero(v));
        if (++w >= last_word) break;
        v = (word_ref(w).load(std::memory_order_acquire) ^ flip) & valid_mask(w);
      }
    }
    from = page_last;
  }
  return end;
}

IndexRange BlockBitmap::next_set_run(uint64_t from, uint64_t max_len) const {
  uint64_t first = find_next_set(from);
  if (first >= bits_) return {bits_, bits_};
  return {first, find_next_clear(first, max_len > bits_ - first ? bits_ : first + max_len)};
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
    // Words that are all clear (set) are changed as a range: a whole page
    // of them needs no memory.
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
      pin(p);
      for (uint64_t k = w; k < page_end; ++k) word_ref(k).store(word_at(k), std::memory_order_release);
      unpin(p);
    }
    w = page_end;
  }
  return true;
}

uint64_t BlockBitmap::memory_bytes() const {
  return sizeof(*this) + page_count() * sizeof(std::atomic<uint64_t>) +
         mixed_pages_.load(std::memory_order_relaxed) * kPageBytes;
}

}  // namespace livemig
