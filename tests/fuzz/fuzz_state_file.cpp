// fuzz_state_file: StateFile::open (common/state_file.h) on a file holding
// fuzzed bytes, as a restarted plugin opens what a crash or a bad disk left.
//
// Input: one options byte, then the file's bytes.
//   options bit 0 / bit 1: recompute slot A's / slot B's CRC (if the slot has
//   its magic and a length that fits) before writing the file, so that
//   mutated records get past the CRC into the JSON and size checks.
// The file lives on /dev/shm (tmpfs) when there is one: fdatasync is free.
// $LIVEMIG_FUZZ_TMPDIR overrides (tests/fuzz/run uses its own directory).
//
// Invariants when open() succeeds:
//   - the record is well-formed (role, power-of-two block size), and the
//     bitmap covers exactly ceil(image_size / block_size) blocks, which the
//     file's size matches;
//   - a second open() of the file is refused (EBUSY) while the first holds it;
//   - marks + sync() + write_record() succeed, and a re-open sees the new
//     record, generation + 1 and every synced presence bit.
// Every failure must be an error value whose message names the file.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include "common/crc32c.h"
#include "common/state_file.h"
#include "tests/fuzz/fuzz_support.h"

using namespace livemig;

namespace {

// The fuzzer's own directory, removed at exit.
// Under $LIVEMIG_FUZZ_TMPDIR if set (tests/fuzz/run sets it), else /dev/shm.
struct WorkDir {
  std::string path = std::string(getenv("LIVEMIG_FUZZ_TMPDIR") ? getenv("LIVEMIG_FUZZ_TMPDIR")
                                 : access("/dev/shm", W_OK) == 0 ? "/dev/shm"
                                                                 : "/tmp") +
                     "/livemig-fuzz-XXXXXX";
  WorkDir() { FUZZ_CHECK(mkdtemp(path.data()) != nullptr, "mkdtemp %s: %s", path.c_str(), std::strerror(errno)); }
  ~WorkDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

const std::string& work_dir() {
  static const WorkDir dir;
  return dir.path;
}

// The slot's little-endian u32s (state_file.cpp keeps its helpers private).
uint32_t load_le32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24; }
void store_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Recomputes a slot's CRC in place (layout in state_file.h).
void fix_slot_crc(std::string& file, size_t slot_offset) {
  if (file.size() < slot_offset + StateFile::kSlotHeaderSize) return;
  auto* p = reinterpret_cast<uint8_t*>(file.data() + slot_offset);
  if (std::memcmp(p, StateFile::kMagic, 8) != 0) return;
  const uint32_t length = load_le32(p + 16);
  if (length > StateFile::kMaxRecordBytes || slot_offset + StateFile::kSlotHeaderSize + length > file.size()) return;
  store_le32(p + 20, crc32c(p + StateFile::kSlotHeaderSize, length, crc32c(p, 20)));
}

void write_file(const std::string& path, std::string_view bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  FUZZ_CHECK(fd >= 0, "create %s: %s", path.c_str(), std::strerror(errno));
  FUZZ_CHECK(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()), "write %s: %s",
             path.c_str(), std::strerror(errno));
  ::close(fd);
}

void check_opened(const std::string& path, StateFile& sf, uint64_t file_size) {
  const MigrationRecord& r = sf.record();
  FUZZ_CHECK(r.role == "source" || r.role == "destination", "opened a record with role \"%s\"", r.role.c_str());
  FUZZ_CHECK(r.block_size != 0 && (r.block_size & (r.block_size - 1)) == 0, "opened block_size %llu",
             static_cast<unsigned long long>(r.block_size));
  const uint64_t blocks = r.image_size / r.block_size + (r.image_size % r.block_size ? 1 : 0);
  FUZZ_CHECK(sf.block_count() == blocks, "bitmap of %llu blocks for image_size %llu / block_size %llu",
             static_cast<unsigned long long>(sf.block_count()), static_cast<unsigned long long>(r.image_size),
             static_cast<unsigned long long>(r.block_size));
  // An image of no blocks has no bitmap, and a file cut short in slot B
  // (never written since create) still has a valid slot A. (Counted in 128
  // bits: the bitmap of 2^64 - 1 blocks is no 0 bytes.)
  const unsigned __int128 bitmap_bytes = (static_cast<unsigned __int128>(blocks) + 63) / 64 * 8;
  FUZZ_CHECK(blocks == 0 ? file_size <= StateFile::kBitmapOffset
                         : file_size == StateFile::kBitmapOffset + bitmap_bytes,
             "a %llu-byte file opened for %llu blocks", static_cast<unsigned long long>(file_size),
             static_cast<unsigned long long>(blocks));

  Result<std::unique_ptr<StateFile>> second = StateFile::open(path);
  FUZZ_CHECK(!second.is_ok() && second.status().errno_value() == EBUSY, "a second open() of a held file: %s",
             second ? "succeeded" : second.status().message().c_str());
}

// Changes the record and the bitmap the way a migration does, and checks that
// a restart sees the change.
void check_update(const std::string& path, std::unique_ptr<StateFile> sf) {
  const uint64_t generation = sf->generation();
  const uint64_t blocks = sf->block_count();
  const uint64_t present_before = sf->present().count();
  IndexRange marked{blocks / 3, blocks / 3 + std::min<uint64_t>(blocks - blocks / 3, 70000)};
  sf->mark_present(marked);
  Status s = sf->sync();
  FUZZ_CHECK(s.is_ok(), "sync: %s", s.message().c_str());
  MigrationRecord next = sf->record();
  next.phase = next.phase == "Done" ? "PostCopy" : "Done";
  next.handover_generation += 1;
  s = sf->write_record(next);
  if (!s) {
    // The only refusal allowed: the record no longer fits its slot.
    FUZZ_CHECK(s.errno_value() == EFBIG, "write_record: %s", s.message().c_str());
    return;
  }
  FUZZ_CHECK(sf->generation() == generation + 1, "generation %llu after writing over %llu",
             static_cast<unsigned long long>(sf->generation()), static_cast<unsigned long long>(generation));
  sf.reset();

  Result<std::unique_ptr<StateFile>> again = StateFile::open(path);
  FUZZ_CHECK(again.is_ok(), "re-open after write_record: %s", again.status().message().c_str());
  FUZZ_CHECK((*again)->record() == next, "re-opened record differs from the one written");
  FUZZ_CHECK((*again)->generation() == generation + 1, "re-opened generation %llu, wrote %llu",
             static_cast<unsigned long long>((*again)->generation()),
             static_cast<unsigned long long>(generation + 1));
  FUZZ_CHECK((*again)->present().all_set(marked), "synced presence bits lost");
  FUZZ_CHECK((*again)->present().count() >= present_before, "presence bits cleared by a sync");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::FuzzInput in(data, size);
  const uint8_t options = in.byte();
  std::string file(in.rest());
  if (options & 1) fix_slot_crc(file, 0);
  if (options & 2) fix_slot_crc(file, StateFile::kSlotSize);
  const std::string path = work_dir() + "/state";
  write_file(path, file);

  Result<std::unique_ptr<StateFile>> sf = StateFile::open(path);
  if (!sf) {
    FUZZ_CHECK(sf.status().message().find(path) != std::string::npos, "an open() error does not name the file: %s",
               sf.status().message().c_str());
    return 0;
  }
  // open/fuzz_state_file/bitmap-size-overflows-to-zero steps aside for a
  // run with $LIVEMIG_FUZZ_SKIP_KNOWN (tests/fuzz/run --skip-known).
  if (std::getenv("LIVEMIG_FUZZ_SKIP_KNOWN") && (*sf)->block_count() > (uint64_t{1} << 60)) return 0;
  check_opened(path, **sf, file.size());
  check_update(path, std::move(*sf));
  return 0;
}
