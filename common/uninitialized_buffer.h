// A byte vector whose resize() leaves the new bytes uninitialized: for
// buffers that a read fills right away (a frame's payload), where a
// std::vector<uint8_t> would first zero every byte (a memset of each
// 256 KiB frame the link receives).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace livemig {

template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  using std::allocator<T>::allocator;
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  // Value-less construction default-initializes: nothing for a byte.
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

using UninitializedBytes = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

// The last few page-aligned blocks freed, for the next allocation of the
// same size: with an aligned_alloc for every 260 KiB frame the destination
// spent 6x the CPU per byte (fresh pages each time, it seems; this cache
// took the cost away). The oldest block makes room for a newer one, so
// that odd sizes freed once do not keep the frames' size out.
class AlignedBlockCache {
 public:
  static void* take(size_t bytes) {
    std::lock_guard lock(mu());
    auto& c = cache();
    for (auto it = c.rbegin(); it != c.rend(); ++it)
      if (it->first == bytes) {
        void* raw = it->second;
        c.erase(std::next(it).base());
        return raw;
      }
    return nullptr;
  }
  static void give(void* raw, size_t bytes) {
    void* oldest = nullptr;
    {
      std::lock_guard lock(mu());
      auto& c = cache();
      if (c.size() == kMaxBlocks) {
        oldest = c.front().second;
        c.erase(c.begin());
      }
      c.emplace_back(bytes, raw);
    }
    std::free(oldest);
  }

 private:
  static constexpr size_t kMaxBlocks = 16;  // 4 MiB of 256 KiB frames at most
  // Never destroyed: a frame may be freed during exit, and the blocks stay
  // reachable for the leak checker.
  static std::mutex& mu() {
    static auto* m = new std::mutex;
    return *m;
  }
  static std::vector<std::pair<size_t, void*>>& cache() {
    static auto* c = new std::vector<std::pair<size_t, void*>>;
    return *c;
  }
};

// Like DefaultInitAllocator, but every block starts kBefore bytes before a
// page boundary: what follows a kBefore-byte header in it is page-aligned.
// A DATA frame's payload read into one has its block data page-aligned, so
// the destination writes it with O_DIRECT as it is, without first copying
// it to an aligned buffer (ImageFile::write_around_cache).
template <class T, size_t kBefore>
struct PageOffsetAllocator : DefaultInitAllocator<T> {
  using value_type = T;
  PageOffsetAllocator() = default;
  template <class U>
  PageOffsetAllocator(const PageOffsetAllocator<U, kBefore>&) noexcept {}  // NOLINT: rebinding converts
  template <class U>
  struct rebind {
    using other = PageOffsetAllocator<U, kBefore>;
  };
  static size_t page() {
    static const size_t p = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    return p;
  }
  static size_t lead() { return page() - kBefore; }  // kBefore < every page size there is
  static size_t block_bytes(size_t n) { return (lead() + n * sizeof(T) + page() - 1) / page() * page(); }
  T* allocate(size_t n) {
    static_assert(kBefore % alignof(T) == 0);
    void* raw = AlignedBlockCache::take(block_bytes(n));
    if (!raw) raw = std::aligned_alloc(page(), block_bytes(n));
    if (!raw) throw std::bad_alloc();
    return reinterpret_cast<T*>(static_cast<char*>(raw) + lead());
  }
  void deallocate(T* p, size_t n) noexcept {
    AlignedBlockCache::give(reinterpret_cast<char*>(p) - lead(), block_bytes(n));
  }
  template <class U>
  bool operator==(const PageOffsetAllocator<U, kBefore>&) const noexcept {
    return true;
  }
};

}  // namespace livemig
