// The local raw image: positioned I/O on one file descriptor shared by every
// connection (thread model parallel), with the semantics NBD asks for.
// Every method returns 0 or -1 with errno set, like the system calls beneath;
// the nbdkit shims turn errno into the NBD error.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "common/status.h"

namespace livemig {

class ImageFile {
 public:
  // Opens `path` read-write (or read-only). With create, a missing file is
  // created empty (a migration destination takes its size from the source).
  // Error names the path and reason.
  static Result<ImageFile> open(const std::string& path, bool readonly, bool create = false);

  ImageFile(ImageFile&& other) noexcept;
  ImageFile& operator=(ImageFile&&) = delete;
  ImageFile(const ImageFile&) = delete;
  ~ImageFile();

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_.load(std::memory_order_acquire); }
  // Sets the file's size (ftruncate). For an empty destination image only.
  int resize(uint64_t size);
  bool readonly() const { return readonly_; }
  int fd() const { return fd_; }

  // Reads exactly count bytes (past EOF reads as zeros).
  int pread(void* buf, uint64_t count, uint64_t offset) const;
  // Writes exactly count bytes; with fua the data is durable on return.
  int pwrite(const void* buf, uint64_t count, uint64_t offset, bool fua);
  // fdatasync. Sticky: once an fdatasync (or a FUA write) failed in
  // writeback, every later flush fails with that errno. Linux reports a
  // writeback error once per file and may drop the pages it could not
  // write; a later fdatasync would succeed without them, so success after
  // a failure would be a lie (the lesson of PostgreSQL's "fsyncgate").
  int flush();
  // The errno of the first failed sync, 0 if none.
  int sync_error() const { return sync_error_.load(); }
  // Starts writing the range back to disk without waiting (sync_file_range),
  // so that a later flush() finds little left to write. Advisory.
  void start_writeback(uint64_t count, uint64_t offset);
  // Writes exactly count bytes for a bulk copy nobody reads soon (a
  // destination's pushed data and background pulls): around the page cache
  // (O_DIRECT, from an aligned copy) where the file system allows it, the
  // range is aligned to its direct I/O unit and it is at least
  // kMinDirectWrite long; else pwrite() and start_writeback(). Not durable
  // until flush(). The caller keeps the page cache's users off the range
  // meanwhile (a direct write and a cached write of the same bytes at once
  // may leave either).
  int write_around_cache(const void* buf, uint64_t count, uint64_t offset);
  // A direct write waits for the disk, a cached one only for a copy: the
  // direct write saves CPU per byte (no page-cache copy, no writeback), but
  // on short runs the wait dominates. The scattered 4 KiB blocks of a hot
  // set, pulled one by one in post-copy, took 1.7x as long written direct.
  // Whole 256 KiB frames (a bulk copy) are written direct.
  static constexpr uint64_t kMinDirectWrite = 128u << 10;
  // The memory page size: a page of the cache holds this many bytes of the file.
  static uint64_t page_size();
  // True when write_around_cache() can bypass the page cache here.
  bool direct_writes() const { return direct_fd_ >= 0 && direct_ok_.load(std::memory_order_relaxed); }
  // Deallocates the range (punches a hole); the range then reads as zeros.
  int trim(uint64_t count, uint64_t offset, bool fua);
  // Makes the range read as zeros. may_trim allows a hole; fast_zero asks to
  // fail with ENOTSUP rather than fall back to writing zeros.
  int zero(uint64_t count, uint64_t offset, bool may_trim, bool fast_zero, bool fua);

  // Reports [offset, offset+count) as alternating data and hole extents, in
  // order, using SEEK_DATA/SEEK_HOLE. emit(offset, length, is_hole) returns
  // false to stop early.
  int extents(uint64_t count, uint64_t offset,
              const std::function<bool(uint64_t, uint64_t, bool)>& emit) const;

 private:
  ImageFile(std::string path, int fd, uint64_t size, bool readonly);
  void open_direct();
  // Writes with O_DIRECT as far as the kernel takes them: the bytes written
  // (the rest is for a cached write), or -1 with errno.
  int64_t pwrite_direct(const char* buf, uint64_t count, uint64_t offset);
  int write_zeros(uint64_t count, uint64_t offset);
  void note_sync_error(int err);

  std::string path_;
  int fd_ = -1;
  std::atomic<uint64_t> size_{0};
  bool readonly_ = false;
  std::atomic<int> sync_error_{0};
  // A second descriptor with O_DIRECT (-1: the file system refuses it), and
  // the alignment its writes need (offset and length; memory).
  int direct_fd_ = -1;
  uint32_t direct_offset_align_ = 0;
  uint32_t direct_memory_align_ = 0;
  std::atomic<bool> direct_ok_{true};  // false once a direct write was refused as misaligned
};

}  // namespace livemig
