#include "common/state_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <vector>

#include "common/byte_order.h"
#include "common/crc32c.h"
#include "common/json_limits.h"

namespace livemig {

namespace {

std::string errno_text(int e) { return std::strerror(e); }

Status io_error(const std::string& path, const char* op, int e) {
  return Status::error("state file " + path + ": " + op + ": " + errno_text(e), e);
}

// Writes all n bytes at offset, retrying short writes and EINTR.
Status pwrite_all(int fd, const std::string& path, const void* data, size_t n, uint64_t offset) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t r = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return io_error(path, "pwrite", errno);
    }
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return Status::ok();
}

// Reads up to n bytes at offset; returns how many (fewer only at end of file).
Result<size_t> pread_all(int fd, const std::string& path, void* data, size_t n, uint64_t offset) {
  char* p = static_cast<char*>(data);
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, p + got, n - got, static_cast<off_t>(offset + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return io_error(path, "pread", errno);
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return got;
}

Status fsync_dir_of(const std::string& path) {
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return Status::error("state file " + path + ": open directory " + dir.string() + ": " + errno_text(errno), errno);
  int rc = ::fsync(dfd);
  int e = errno;
  ::close(dfd);
  if (rc != 0) return Status::error("state file " + path + ": fsync directory " + dir.string() + ": " + errno_text(e), e);
  return Status::ok();
}

// Takes the exclusive lock that says "a StateFile has this file open".
Status lock_file(int fd, const std::string& path) {
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK)
      return Status::error("state file " + path + " is in use by another process (or another StateFile)", EBUSY);
    return io_error(path, "flock", errno);
  }
  return Status::ok();
}

uint64_t block_count_of(uint64_t image_size, uint64_t block_size) {
  return image_size / block_size + (image_size % block_size ? 1 : 0);
}

uint64_t bitmap_bytes_of(uint64_t blocks) { return (blocks + 63) / 64 * 8; }

constexpr uint64_t kMaxImageSize = uint64_t{1} << 62;

// Checks what a record must satisfy to be written. `what` prefixes messages.
Status check_record(const MigrationRecord& r, const std::string& what) {
  if (r.role != "source" && r.role != "destination")
    return Status::error(what + ": role must be \"source\" or \"destination\", not \"" + r.role + "\"", EINVAL);
  if (r.block_size == 0 || !std::has_single_bit(r.block_size))
    return Status::error(what + ": block_size " + std::to_string(r.block_size) + " is not a power of two", EINVAL);
  // The bitmap's size must not overflow (2^64 - 1 one-byte blocks made it 0
  // bytes: found by fuzz_state_file). The plugin's images are at most 2^62
  // bytes (SegmentGeometry), so their bitmaps at most 2^59 bytes.
  if (r.image_size > kMaxImageSize)
    return Status::error(what + ": image_size " + std::to_string(r.image_size) + " is over the limit of " +
                             std::to_string(kMaxImageSize),
                         EINVAL);
  return Status::ok();
}

Result<std::string> record_to_json(const MigrationRecord& r, const std::string& what) {
  try {
    nlohmann::json j = {
        {"migration_id", r.migration_id},
        {"role", r.role},
        {"phase", r.phase},
        {"peer", r.peer},
        {"mode", r.mode},
        {"image_size", r.image_size},
        {"block_size", r.block_size},
        {"handover_generation", r.handover_generation},
        {"committed_generation", r.committed_generation},
        {"aborted_generation", r.aborted_generation},
        {"confirmed_generation", r.confirmed_generation},
        {"extra", r.extra},
    };
    return j.dump();
  } catch (const std::exception& e) {
    return Status::error(what + ": cannot encode the record: " + e.what(), EINVAL);
  }
}

// Parses a record; an error (whose message is the reason) if it is not one.
Result<MigrationRecord> record_from_json(std::string_view text) {
  try {
    nlohmann::json j = parse_json(text);
    if (j.is_discarded()) return Status::error("bad JSON (or nested deeper than " + std::to_string(kMaxJsonDepth) + " levels)", EIO);
    if (!j.is_object()) return Status::error("JSON is not an object", EIO);
    auto str = [&](const char* key, std::string* out) -> bool {
      auto it = j.find(key);
      if (it == j.end() || !it->is_string()) return false;
      *out = it->get<std::string>();
      return true;
    };
    auto u64 = [&](const char* key, uint64_t* out) -> bool {
      auto it = j.find(key);
      if (it == j.end() || !it->is_number_unsigned()) return false;
      *out = it->get<uint64_t>();
      return true;
    };
    MigrationRecord r;
    for (auto [key, out] : {std::pair{"migration_id", &r.migration_id}, std::pair{"role", &r.role},
                            std::pair{"phase", &r.phase}, std::pair{"peer", &r.peer}, std::pair{"mode", &r.mode}}) {
      if (!str(key, out)) return Status::error(std::string("field \"") + key + "\" missing or not a string", EIO);
    }
    if (!u64("image_size", &r.image_size)) return Status::error("field \"image_size\" missing or not unsigned", EIO);
    if (!u64("block_size", &r.block_size)) return Status::error("field \"block_size\" missing or not unsigned", EIO);
    // Generations came with the handover commit; a record without them has none.
    for (auto [key, out] : {std::pair{"handover_generation", &r.handover_generation},
                            std::pair{"committed_generation", &r.committed_generation},
                            std::pair{"aborted_generation", &r.aborted_generation},
                            std::pair{"confirmed_generation", &r.confirmed_generation}}) {
      if (j.contains(key) && !u64(key, out))
        return Status::error(std::string("field \"") + key + "\" is not unsigned", EIO);
    }
    auto extra = j.find("extra");
    r.extra = extra == j.end() ? nlohmann::json::object() : *extra;
    Status ok = check_record(r, "record");
    if (!ok) return ok;
    return r;
  } catch (const std::exception& e) {
    return Status::error(std::string("bad JSON: ") + e.what(), EIO);
  }
}

// The 4 KiB image of one header slot.
Result<std::string> encode_slot(const MigrationRecord& r, uint64_t generation, const std::string& what) {
  Result<std::string> json = record_to_json(r, what);
  if (!json) return json;
  if (json->size() > StateFile::kMaxRecordBytes)
    return Status::error(what + ": the record is " + std::to_string(json->size()) + " bytes of JSON; at most " +
                             std::to_string(StateFile::kMaxRecordBytes) + " fit in a header slot",
                         EFBIG);
  std::string slot(StateFile::kSlotSize, '\0');
  auto* p = reinterpret_cast<uint8_t*>(slot.data());
  std::memcpy(p, StateFile::kMagic, 8);
  store_le64(p + 8, generation);
  store_le32(p + 16, static_cast<uint32_t>(json->size()));
  std::memcpy(p + StateFile::kSlotHeaderSize, json->data(), json->size());
  uint32_t crc = crc32c(p + StateFile::kSlotHeaderSize, json->size(), crc32c(p, 20));
  store_le32(p + 20, crc);
  return slot;
}

struct DecodedSlot {
  uint64_t generation = 0;
  MigrationRecord record;
};

// Decodes one slot from the bytes read at its offset (possibly fewer than
// kSlotSize if the file is short); an error whose message is the reason.
Result<DecodedSlot> decode_slot(std::string_view bytes) {
  if (bytes.size() < StateFile::kSlotHeaderSize) return Status::error("missing (file too short)", EIO);
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  if (std::memcmp(p, StateFile::kMagic, 8) != 0) return Status::error("bad magic", EIO);
  uint64_t generation = load_le64(p + 8);
  uint32_t length = load_le32(p + 16);
  uint32_t stored_crc = load_le32(p + 20);
  if (length > StateFile::kMaxRecordBytes) return Status::error("bad length " + std::to_string(length), EIO);
  if (StateFile::kSlotHeaderSize + length > bytes.size()) return Status::error("truncated", EIO);
  uint32_t crc = crc32c(p + StateFile::kSlotHeaderSize, length, crc32c(p, 20));
  if (crc != stored_crc) return Status::error("CRC mismatch", EIO);
  Result<MigrationRecord> r = record_from_json(bytes.substr(StateFile::kSlotHeaderSize, length));
  if (!r) return r.status();
  return DecodedSlot{generation, std::move(*r)};
}

}  // namespace

std::string StateFile::path_for_image(const std::string& image_path) { return image_path + ".livemig-state"; }

StateFile::StateFile(std::string path, int fd, MigrationRecord record, uint64_t generation, int slot)
    : path_(std::move(path)),
      fd_(fd),
      present_(block_count_of(record.image_size, record.block_size)),
      dirty_pages_((bitmap_bytes_of(block_count_of(record.image_size, record.block_size)) + kPageBytes - 1) /
                   kPageBytes),
      record_(std::move(record)),
      generation_(generation),
      slot_(slot) {}

StateFile::~StateFile() { ::close(fd_); }

uint64_t StateFile::generation() const {
  MutexLock lock(mu_);
  return generation_;
}

Result<std::unique_ptr<StateFile>> StateFile::create(const std::string& path, const MigrationRecord& record) {
  const std::string what = "state file " + path;
  Status st = check_record(record, what);
  if (!st) return st;
  Result<std::string> slot_a = encode_slot(record, 1, what);
  if (!slot_a) return slot_a.status();

  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::error(what + ": create " + tmp + ": " + errno_text(errno), errno);
  auto fail = [&](Status s) -> Result<std::unique_ptr<StateFile>> {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  if (!(st = lock_file(fd, tmp))) return fail(st);

  // Slot A, then slot B all zero (no magic: invalid).
  std::string header = *slot_a + std::string(kSlotSize, '\0');
  if (!(st = pwrite_all(fd, path, header.data(), header.size(), 0))) return fail(st);
  uint64_t bytes = bitmap_bytes_of(block_count_of(record.image_size, record.block_size));
  if (::ftruncate(fd, static_cast<off_t>(kBitmapOffset + bytes)) != 0) return fail(io_error(path, "ftruncate", errno));
  // Reserve the bitmap's blocks now, so that sync() does not meet ENOSPC
  // later. Best effort: not every file system can.
  if (bytes > 0) {
    int rc = ::posix_fallocate(fd, static_cast<off_t>(kBitmapOffset), static_cast<off_t>(bytes));
    if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) return fail(io_error(path, "fallocate", rc));
  }
  if (::fsync(fd) != 0) return fail(io_error(path, "fsync", errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    return fail(Status::error(what + ": rename " + tmp + ": " + errno_text(errno), errno));
  if (!(st = fsync_dir_of(path))) {
    ::close(fd);
    return st;
  }
  return std::unique_ptr<StateFile>(new StateFile(path, fd, record, 1, 0));
}

Result<std::unique_ptr<StateFile>> StateFile::open(const std::string& path) {
  const std::string what = "state file " + path;
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return io_error(path, "open", errno);
  auto fail = [&](Status s) -> Result<std::unique_ptr<StateFile>> {
    ::close(fd);
    return s;
  };
  Status st = lock_file(fd, path);
  if (!st) return fail(st);
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) return fail(io_error(path, "fstat", errno));
  uint64_t file_size = static_cast<uint64_t>(sb.st_size);

  std::string header(kBitmapOffset, '\0');
  Result<size_t> got = pread_all(fd, path, header.data(), header.size(), 0);
  if (!got) return fail(got.status());
  header.resize(*got);

  std::optional<DecodedSlot> best;
  int best_slot = -1;
  std::string reasons;
  for (int s = 0; s < 2; ++s) {
    std::string_view bytes;
    if (header.size() > s * kSlotSize) bytes = std::string_view(header).substr(s * kSlotSize, kSlotSize);
    Result<DecodedSlot> d = decode_slot(bytes);
    if (!d) {
      reasons += std::string(reasons.empty() ? "" : "; ") + "slot " + (s == 0 ? "A" : "B") + ": " +
                 d.status().message();
      continue;
    }
    if (!best || d->generation > best->generation) {
      best = std::move(*d);
      best_slot = s;
    }
  }
  if (!best) return fail(Status::error(what + ": no valid header (" + reasons + ")", EIO));

  const MigrationRecord& r = best->record;
  uint64_t blocks = block_count_of(r.image_size, r.block_size);
  uint64_t want = bitmap_bytes_of(blocks);
  uint64_t have = file_size > kBitmapOffset ? file_size - kBitmapOffset : 0;
  std::string geometry = std::to_string(blocks) + " blocks (image_size " + std::to_string(r.image_size) +
                         " / block_size " + std::to_string(r.block_size) + ")";
  if (have < want)
    return fail(Status::error(what + ": truncated bitmap: " + std::to_string(have) + " bytes, but " + geometry +
                                  " need " + std::to_string(want),
                              EIO));
  if (have > want)
    return fail(Status::error(what + ": bitmap size mismatch: " + std::to_string(have) + " bytes, but " + geometry +
                                  " need " + std::to_string(want),
                              EIO));

  uint64_t generation = best->generation;
  std::unique_ptr<StateFile> sf(new StateFile(path, fd, std::move(best->record), generation, best_slot));
  // A page at a time: a 1 TiB image's 32 MiB bitmap is never in memory
  // whole (BlockBitmap keeps uniform pages without words).
  std::string page(kPageBytes, '\0');
  for (uint64_t at = 0; at < want; at += kPageBytes) {
    const uint64_t n = std::min<uint64_t>(kPageBytes, want - at);
    got = pread_all(fd, path, page.data(), n, kBitmapOffset + at);
    if (!got) return got.status();  // sf closes fd
    if (*got != n)
      return Status::error(what + ": truncated bitmap: read " + std::to_string(at + *got) + " of " +
                               std::to_string(want) + " bytes",
                           EIO);
    if (!sf->present_.load_words(at / 8, std::string_view(page).substr(0, n)))
      return Status::error(what + ": bitmap does not match " + geometry, EIO);
  }
  return sf;
}

Status StateFile::remove(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return io_error(path, "unlink", errno);
  ::unlink((path + ".tmp").c_str());
  return fsync_dir_of(path);
}

Status StateFile::write_record(const MigrationRecord& record) {
  const std::string what = "state file " + path_;
  Status st = check_record(record, what);
  if (!st) return st;
  MutexLock lock(mu_);
  if (!failed_.is_ok()) return failed_;
  if (record.image_size != record_.image_size || record.block_size != record_.block_size)
    return Status::error(what + ": image_size and block_size cannot change (" + std::to_string(record_.image_size) +
                             "/" + std::to_string(record_.block_size) + " -> " +
                             std::to_string(record.image_size) + "/" + std::to_string(record.block_size) + ")",
                         EINVAL);
  Result<std::string> slot = encode_slot(record, generation_ + 1, what);
  if (!slot) return slot.status();
  int other = 1 - slot_;
  // A failed or torn pwrite leaves only the other slot damaged; the current
  // one still holds record_, and the next attempt rewrites the same slot.
  if (!(st = pwrite_all(fd_, path_, slot->data(), slot->size(), other * kSlotSize))) return st;
  if (::fdatasync(fd_) != 0) {
    failed_ = io_error(path_, "fdatasync", errno);
    return failed_;
  }
  unsynced_ = false;  // that fdatasync covered any bitmap pages written before
  record_ = record;
  generation_ += 1;
  slot_ = other;
  return Status::ok();
}

void StateFile::mark_present(IndexRange blocks) {
  if (blocks.empty()) return;
  // Bits first, then the page mark: a sync() that claims the page afterwards
  // reads words that include these bits (set_range and the claim are acq_rel).
  present_.set_range(blocks);
  dirty_pages_.set_range({blocks.first / kBlocksPerPage, (blocks.last - 1) / kBlocksPerPage + 1});
}

void StateFile::mark_missing(IndexRange blocks) {
  if (blocks.empty()) return;
  present_.clear_range(blocks);
  dirty_pages_.set_range({blocks.first / kBlocksPerPage, (blocks.last - 1) / kBlocksPerPage + 1});
}

Status StateFile::write_pages(IndexRange run) {
  const uint64_t total_bytes = bitmap_bytes_of(present_.size());
  const uint64_t byte_first = run.first * kPageBytes;
  const uint64_t byte_last = std::min(run.last * kPageBytes, total_bytes);
  const uint64_t word_first = byte_first / 8;
  std::vector<uint64_t> words((byte_last - byte_first) / 8, 0);

  // Copy the pages' bits out of present_, run by run of set bits.
  const uint64_t bit_last = std::min(run.last * kBlocksPerPage, present_.size());
  uint64_t pos = run.first * kBlocksPerPage;
  while (pos < bit_last) {
    IndexRange r = present_.next_set_run(pos);
    if (r.first >= bit_last) break;
    uint64_t last = std::min(r.last, bit_last);
    for (uint64_t i = r.first; i < last;) {
      uint64_t w = i / 64 - word_first;
      unsigned lo = i & 63;
      uint64_t n = std::min<uint64_t>(64 - lo, last - i);
      words[w] |= (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << lo;
      i += n;
    }
    pos = last;
  }

  std::string buf(words.size() * 8, '\0');
  for (size_t w = 0; w < words.size(); ++w) store_le64(reinterpret_cast<uint8_t*>(buf.data()) + w * 8, words[w]);
  return pwrite_all(fd_, path_, buf.data(), buf.size(), kBitmapOffset + byte_first);
}

Status StateFile::sync() {
  // Pages written per pwrite, at most (1 MiB).
  constexpr uint64_t kMaxRunPages = 256;
  MutexLock lock(mu_);
  if (!failed_.is_ok()) return failed_;
  uint64_t from = 0;
  while (true) {
    IndexRange run = dirty_pages_.next_set_run(from, kMaxRunPages);
    if (run.empty()) break;
    // Claim before reading the words: a mark made after the claim sets the
    // page bit again and is written by the next sync(). Only sync(), under
    // mu_, clears page bits, so every bit of `run` is still set.
    dirty_pages_.test_and_clear_range(run);
    Status st = write_pages(run);
    if (!st) {
      // Still owed. Pages written before this one stay claimed; unsynced_
      // makes the next sync() fdatasync them even if it writes nothing.
      dirty_pages_.set_range(run);
      return st;
    }
    unsynced_ = true;
    from = run.last;
  }
  // A caller whose pages an earlier sync() claimed waited for mu_, so that
  // sync() had written them and either fdatasync'd or left unsynced_ set (or
  // failed_): with neither set, nothing of this caller's is left to make durable.
  if (!unsynced_) return Status::ok();
  if (::fdatasync(fd_) != 0) {
    failed_ = io_error(path_, "fdatasync", errno);
    return failed_;
  }
  unsynced_ = false;
  return Status::ok();
}

}  // namespace livemig
