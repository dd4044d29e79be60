#include "plugin/image_file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include <fmt/format.h>

namespace livemig {

Result<ImageFile> ImageFile::open(const std::string& path, bool readonly, bool create) {
  int flags = (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | (create && !readonly ? O_CREAT : 0);
  int fd = ::open(path.c_str(), flags, 0600);
  if (fd < 0) return Status::error(fmt::format("image={}: {}", path, std::strerror(errno)), errno);
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    ::close(fd);
    return Status::error(fmt::format("image={}: fstat: {}", path, std::strerror(e)), e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::error(fmt::format("image={}: not a regular file", path), EINVAL);
  }
  return ImageFile(path, fd, static_cast<uint64_t>(st.st_size), readonly);
}

ImageFile::ImageFile(std::string path, int fd, uint64_t size, bool readonly)
    : path_(std::move(path)), fd_(fd), size_(size), readonly_(readonly) {}

ImageFile::ImageFile(ImageFile&& other) noexcept
    : path_(std::move(other.path_)), fd_(other.fd_), size_(other.size()), readonly_(other.readonly_) {
  other.fd_ = -1;
}

ImageFile::~ImageFile() {
  if (fd_ >= 0) ::close(fd_);
}

int ImageFile::pread(void* buf, uint64_t count, uint64_t offset) const {
  char* p = static_cast<char*>(buf);
  while (count > 0) {
    ssize_t r = ::pread(fd_, p, count, offset);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) {  // the file shrank under us: what is past EOF reads as zeros
      std::memset(p, 0, count);
      return 0;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

int ImageFile::pwrite(const void* buf, uint64_t count, uint64_t offset, bool fua) {
  const char* p = static_cast<const char*>(buf);
  // RWF_DSYNC makes this one write durable without syncing the whole file.
  int flags = fua ? RWF_DSYNC : 0;
  while (count > 0) {
    struct iovec iov = {const_cast<char*>(p), count};
    ssize_t r = ::pwritev2(fd_, &iov, 1, offset, flags);
    if (r < 0 && errno == EOPNOTSUPP && flags) {  // old kernel or odd file system
      flags = 0;
      fua = true;
      continue;
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      // A synchronous write that failed in writeback (EIO) consumed the
      // file's error report: a later fdatasync would not see it.
      if (flags && errno == EIO) note_sync_error(errno);
      return -1;
    }
    p += r;
    count -= r;
    offset += r;
  }
  if (fua && flags == 0) return flush();
  return 0;
}

int ImageFile::resize(uint64_t size) {
  if (::ftruncate(fd_, static_cast<off_t>(size)) < 0) return -1;
  size_.store(size, std::memory_order_release);
  return 0;
}

void ImageFile::start_writeback(uint64_t count, uint64_t offset) {
  (void)::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(count), SYNC_FILE_RANGE_WRITE);
}

int ImageFile::flush() {
  if (int e = sync_error_.load(); e != 0) {
    errno = e;
    return -1;
  }
  while (::fdatasync(fd_) < 0) {
    if (errno == EINTR) continue;
    note_sync_error(errno);
    return -1;
  }
  return 0;
}

void ImageFile::note_sync_error(int err) {
  int expected = 0;
  sync_error_.compare_exchange_strong(expected, err ? err : EIO);
}

int ImageFile::trim(uint64_t count, uint64_t offset, bool fua) {
  if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count) < 0) {
    // Trim is advisory: where holes cannot be punched, the data stays. But a
    // later read must not see stale data if the client counts on zeros, so
    // write zeros instead; this keeps trim's contents defined on every fs.
    if (errno != EOPNOTSUPP && errno != ENOSYS) return -1;
    if (write_zeros(count, offset) < 0) return -1;
  }
  return fua ? flush() : 0;
}

int ImageFile::zero(uint64_t count, uint64_t offset, bool may_trim, bool fast_zero, bool fua) {
  if (may_trim && ::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count) == 0)
    return fua ? flush() : 0;
  if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, count) == 0)
    return fua ? flush() : 0;
  if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) return -1;
  if (fast_zero) {  // the client prefers to know that zeroing would be slow
    errno = ENOTSUP;
    return -1;
  }
  if (write_zeros(count, offset) < 0) return -1;
  return fua ? flush() : 0;
}

int ImageFile::write_zeros(uint64_t count, uint64_t offset) {
  static const std::vector<char> zeros(1 << 20, 0);
  while (count > 0) {
    uint64_t n = std::min<uint64_t>(count, zeros.size());
    if (pwrite(zeros.data(), n, offset, false) < 0) return -1;
    count -= n;
    offset += n;
  }
  return 0;
}

int ImageFile::extents(uint64_t count, uint64_t offset,
                       const std::function<bool(uint64_t, uint64_t, bool)>& emit) const {
  const uint64_t end = offset + count;
  while (offset < end) {
    // lseek with SEEK_DATA/SEEK_HOLE only returns a position; we never use the
    // file offset for I/O (pread/pwrite), so concurrent calls do not interfere.
    off_t data = ::lseek(fd_, offset, SEEK_DATA);
    if (data < 0 && errno != ENXIO) {
      if (errno == EINVAL || errno == EOPNOTSUPP) {  // no sparse support: all data
        emit(offset, end - offset, false);
        return 0;
      }
      return -1;
    }
    uint64_t data_start = data < 0 ? size() : static_cast<uint64_t>(data);
    if (data_start > offset) {
      uint64_t hole_end = std::min(data_start, end);
      if (!emit(offset, hole_end - offset, true)) return 0;
      offset = hole_end;
      if (offset >= end) break;
    }
    off_t hole = ::lseek(fd_, offset, SEEK_HOLE);
    if (hole < 0) return -1;
    uint64_t data_end = std::min<uint64_t>(static_cast<uint64_t>(hole), end);
    if (data_end <= offset) data_end = end;  // the file changed under us: call the rest data
    if (!emit(offset, data_end - offset, false)) return 0;
    offset = data_end;
  }
  return 0;
}

}  // namespace livemig
