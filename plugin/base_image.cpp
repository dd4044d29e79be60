#include "plugin/base_image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "common/byte_order.h"

namespace livemig {
namespace {

constexpr char kMagic[8] = {'L', 'M', 'S', 'U', 'M', 'S', '0', '1'};

// The cache's header, in host byte order (the cache never leaves the host).
struct CacheHeader {
  char magic[8];
  uint32_t block_size;
  uint32_t reserved;
  uint64_t size;
  uint64_t mtime_ns;
  uint64_t count;
};

}  // namespace

uint64_t block_checksum(const void* data, size_t length) { return XXH3_64bits(data, length); }

Status read_base_note(const BaseImage* base, const DataPayload& p, uint64_t block_size, std::string& out) {
  if (!base)
    return protocol_error(ErrorCode::BaseMismatch,
                          fmt::format("a BASE note for {} bytes at {}, but this plugin has no base=", p.length,
                                      p.offset));
  const uint64_t blocks = p.length / block_size;
  if (p.offset % block_size != 0 || p.length % block_size != 0 || p.bytes.size() != blocks * 8)
    return protocol_error(ErrorCode::BadFrame, fmt::format("a BASE note for {} bytes at {} with {} checksum bytes is "
                                                           "not one checksum per {}-byte block",
                                                           p.length, p.offset, p.bytes.size(), block_size));
  out.resize(p.length);
  if (base->pread(out.data(), p.length, p.offset) < 0)
    return protocol_error(ErrorCode::Internal, fmt::format("reading base image {}: {}", base->path(),
                                                           std::strerror(errno)));
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t mine = block_checksum(out.data() + i * block_size, block_size);
    const uint64_t theirs = load_be64(p.bytes.data() + i * 8);
    if (mine != theirs)
      return protocol_error(ErrorCode::BaseMismatch,
                            fmt::format("block {} of base image {} differs from the source's data (checksum {:016x}, "
                                        "the source's {:016x}): the base is damaged or not the same",
                                        p.offset / block_size + i, base->path(), mine, theirs));
  }
  return Status::ok();
}

BaseImage::~BaseImage() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<BaseImage>> BaseImage::open(const std::string& path, uint32_t block_size, const Log& log) {
  std::unique_ptr<BaseImage> b(new BaseImage);
  b->path_ = path;
  b->block_size_ = block_size;
  b->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (b->fd_ < 0) return errno_error("base image", path);
  struct stat st {};
  if (fstat(b->fd_, &st) != 0) return errno_error("base image", path);
  if (!S_ISREG(st.st_mode)) return Status::error(fmt::format("base image {}: not a regular file", path), EINVAL);
  b->size_ = static_cast<uint64_t>(st.st_size);
  const uint64_t mtime_ns = uint64_t(st.st_mtim.tv_sec) * 1'000'000'000 + uint64_t(st.st_mtim.tv_nsec);
  if (Status s = b->load_cache(mtime_ns); !s) {
    log(fmt::format("base image {}: {}; computing the checksums of its {} blocks (one read of the base)", path,
                    s.message(), b->size_ / block_size));
    if (Status c = b->compute(log); !c) return c;
    b->write_cache(mtime_ns, log);
  }
  XXH3_state_t* st3 = XXH3_createState();
  XXH3_64bits_reset(st3);
  XXH3_64bits_update(st3, &b->size_, sizeof b->size_);
  XXH3_64bits_update(st3, &b->block_size_, sizeof b->block_size_);
  XXH3_64bits_update(st3, b->hashes_.data(), b->hashes_.size() * sizeof(uint64_t));
  b->identity_ = fmt::format("{:016x}", XXH3_64bits_digest(st3));
  XXH3_freeState(st3);
  return b;
}

int BaseImage::pread(void* buf, uint64_t count, uint64_t offset) const {
  auto* p = static_cast<char*>(buf);
  while (count > 0) {
    ssize_t n = ::pread(fd_, p, count, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) {  // past the base's end: zeros, as in the image
      std::memset(p, 0, count);
      return 0;
    }
    p += n;
    count -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return 0;
}

// The cache is trusted only for the base it was made from: same size, block
// size and mtime (a base is read-only; a changed one gets new checksums).
Status BaseImage::load_cache(uint64_t mtime_ns) {
  const std::string cache = cache_path(path_);
  FILE* f = std::fopen(cache.c_str(), "rb");
  if (!f) return Status::error(fmt::format("no checksum cache {}", cache), errno);
  CacheHeader h{};
  const uint64_t want = size_ / block_size_;
  bool ok = std::fread(&h, sizeof h, 1, f) == 1 && std::memcmp(h.magic, kMagic, sizeof kMagic) == 0 &&
            h.block_size == block_size_ && h.size == size_ && h.mtime_ns == mtime_ns && h.count == want;
  if (ok) {
    hashes_.resize(want);
    ok = std::fread(hashes_.data(), sizeof(uint64_t), want, f) == want && std::fgetc(f) == EOF;
  }
  std::fclose(f);
  if (ok) return Status::ok();
  hashes_.clear();
  return Status::error(fmt::format("the checksum cache {} is not this base's (size, block size or mtime "
                                   "changed) or is damaged",
                                   cache));
}

Status BaseImage::compute(const Log& log) {
  const uint64_t blocks = size_ / block_size_;
  constexpr uint64_t kChunk = 8u << 20;
  std::vector<char> buf(kChunk - kChunk % block_size_);
  hashes_.clear();
  hashes_.reserve(blocks);
  for (uint64_t b = 0; b < blocks;) {
    const uint64_t n = std::min<uint64_t>(buf.size() / block_size_, blocks - b);
    if (pread(buf.data(), n * block_size_, b * block_size_) < 0) return errno_error("reading base image", path_);
    for (uint64_t i = 0; i < n; ++i) hashes_.push_back(block_checksum(buf.data() + i * block_size_, block_size_));
    b += n;
  }
  log(fmt::format("base image {}: {} block checksums computed", path_, blocks));
  return Status::ok();
}

// Written whole to a temporary file and renamed over the old one, so that
// a crash leaves the old cache or the new one, never half of one.
void BaseImage::write_cache(uint64_t mtime_ns, const Log& log) const {
  const std::string cache = cache_path(path_), tmp = cache + ".tmp";
  CacheHeader h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.block_size = block_size_;
  h.size = size_;
  h.mtime_ns = mtime_ns;
  h.count = hashes_.size();
  FILE* f = std::fopen(tmp.c_str(), "wb");
  bool ok = f && std::fwrite(&h, sizeof h, 1, f) == 1 &&
            std::fwrite(hashes_.data(), sizeof(uint64_t), hashes_.size(), f) == hashes_.size() &&
            std::fflush(f) == 0 && fdatasync(fileno(f)) == 0;
  if (f) ok = std::fclose(f) == 0 && ok;
  if (ok && std::rename(tmp.c_str(), cache.c_str()) == 0) return;
  log(fmt::format("base image {}: cannot write the checksum cache {} ({}); they are computed again at the next "
                  "start",
                  path_, cache, std::strerror(errno)));
  std::remove(tmp.c_str());
}

}  // namespace livemig
