// A base image (issue #14): a read-only template both hosts hold (the cloud
// image a VM was deployed from), given as base=FILE to both plugins. A block
// of the migrated image equal to the base's block at the same offset
// crosses as a BASE note (its checksum, 8 bytes) and the destination copies
// it from its own base.
//
// Deciding "equal" reads no base at migration time: the plugin keeps an
// xxh3-64 per block of the base, computed once (one read of the base) and
// cached beside it in FILE.livemig-sums (8 bytes per block: 2 MiB per GiB,
// held in memory), valid while the base's size, block size and mtime are
// those it was computed for. The source hashes each block it reads to send
// anyway (xxh3 runs at memory speed) and compares with the cached checksum.
//
// Two hosts' bases are the same base when their identities agree: an
// xxh3-64 over the size, the block size and every block's checksum. A START
// whose base identity differs from the destination's is refused. The
// destination still checks every block it copies: it hashes what it read
// from its base against the checksum in the note (the source's data), so a
// block that rotted in the destination's base is fetched from the source
// instead, never copied.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/frame_codec.h"
#include "common/status.h"

namespace livemig {

class BaseImage {
 public:
  using Log = std::function<void(const std::string&)>;
  // Opens `path` read-only and loads its checksums from the cache beside it,
  // or computes them (and writes the cache if it can; a read-only directory
  // only costs the computation at every start). Errors name the path.
  static Result<std::unique_ptr<BaseImage>> open(const std::string& path, uint32_t block_size, const Log& log);
  ~BaseImage();
  BaseImage(const BaseImage&) = delete;
  BaseImage& operator=(const BaseImage&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  // 16 hex digits.
  const std::string& identity() const { return identity_; }
  // Blocks wholly inside the base: only these can be equal to it.
  uint64_t full_blocks() const { return hashes_.size(); }
  uint64_t block_hash(uint64_t block) const { return hashes_[block]; }
  // Reads exactly count bytes of the base (-1 and errno on error).
  int pread(void* buf, uint64_t count, uint64_t offset) const;

  // The cache file beside `path`.
  static std::string cache_path(const std::string& path) { return path + ".livemig-sums"; }

 private:
  BaseImage() = default;
  Status load_cache(uint64_t mtime_ns);
  Status compute(const Log& log);
  void write_cache(uint64_t mtime_ns, const Log& log) const;

  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint32_t block_size_ = 0;
  std::vector<uint64_t> hashes_;
  std::string identity_;
};

// The xxh3-64 of one block, as BASE notes and the cache carry it.
uint64_t block_checksum(const void* data, size_t length);

// The data a BASE note stands for, read from `base` into `out` (p.length
// bytes), every block checked against the note's checksum. BaseMismatch if
// there is no base or a block differs (nothing of the note may then be
// written: the source sends it again, plain); BadFrame if the note does not
// cover whole blocks with one checksum each.
Status read_base_note(const BaseImage* base, const DataPayload& p, uint64_t block_size, std::string& out);

}  // namespace livemig
