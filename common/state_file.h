// The durable state of one migration, kept beside the image as
// "<image>.livemig-state", so that a side killed with -9 at any moment can
// restart where it was (DESIGN.md "Phases", invariant 2).
//
// Design notes
// ------------
// File layout (all integers little-endian, like the bitmap words):
//
//   offset 0     header slot A (4 KiB)
//   offset 4096  header slot B (4 KiB)
//   offset 8192  presence bitmap: BlockBitmap::serialize() bytes, one bit per
//                block, bit i of u64 word w is block 64*w + i;
//                ((blocks + 63) / 64) * 8 bytes, where
//                blocks = ceil(image_size / block_size). The file ends there.
//
// A header slot:
//
//   0   8 bytes  magic "LMSTATE1"
//   8   u64      generation (1 for the record written by create(), +1 per write)
//   16  u32      length of the JSON text, at most 4096 - 24
//   20  u32      CRC-32C (common/crc32c.h) of bytes 0..19 followed by the JSON
//   24  length   the MigrationRecord as a JSON object
//   ..           zero padding to 4096
//
// A slot is valid if its magic, length and CRC check and its JSON holds a
// well-formed record. open() uses the valid slot with the highest generation.
// write_record() writes the *other* slot (never the one holding the current
// record) with generation + 1, then fdatasync()s. A write torn by a crash
// therefore leaves a slot that fails its CRC, and the previous record, in the
// untouched slot, wins: the header is never lost, only the last change to it,
// and only if write_record() had not returned.
//
// The bitmap is updated in place, one 4 KiB page (32768 blocks) at a time.
// mark_present() sets the blocks' bits in memory and the page's bit in a
// second, in-memory bitmap of pages that need writing ("dirty pages"). sync()
// claims each dirty page (clears its page bit first), writes the page's
// current words, and fdatasync()s once for all of them (group commit).
// Because a page is claimed before its words are read, a bit set during a
// sync either makes it into the written words or leaves its page marked for
// the next sync: it is never dropped.
//
// What a crash can lose: once a handover has committed, presence bits only
// ever go 0 -> 1 (before it, the commit clears the bits of the blocks it still
// owes, mark_missing(), and syncs that before its record), and every page write carries a superset of the bits of the last
// completed write of that page. A page write torn by a crash (or never made)
// can therefore only lose bits set after the last sync() that returned ok;
// every bit marked before a caller's sync() started is on disk once that
// sync() returns ok. A lost bit costs a block pulled again from the source
// (correct, if wasteful) — unless a local write made it present, which is why
// the destination's flush reply waits for sync() (invariant 2).
//
// If fdatasync() fails, the kernel may already have dropped the dirty pages
// it could not write, and a later fdatasync() may report success without
// writing them. So an fdatasync() failure is sticky: every later sync() and
// write_record() returns the same error, and the migration must be restarted
// from a re-opened state file.
//
// One StateFile per file at a time: create() and open() take an exclusive
// flock() on the file (kept until the StateFile is destroyed), so open() in a
// second nbdkit on the same image (or a second open() in this process) fails
// with EBUSY instead of corrupting the state. create() does not check the old
// file's lock: it replaces the file by rename, so a StateFile still open on
// the old file goes on writing to an unlinked inode. Drop (or replace) it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "common/block_bitmap.h"
#include "common/mutex.h"
#include "common/segment_geometry.h"
#include "common/status.h"

namespace livemig {

// What recovery needs to know about one migration.
struct MigrationRecord {
  std::string migration_id;
  std::string role;   // "source" | "destination"
  std::string phase;  // "PreCopy", "Sync", "Handover", "PostCopy", "Done", ...
  std::string peer;   // host:port of the other side
  std::string mode;   // "precopy", "postcopy", "livefs", "hybrid", "auto"
  uint64_t image_size = 0;
  uint64_t block_size = 4096;
  // The handover commit (docs/handover.md). Source: the generation of its
  // latest handover attempt, persisted before it fences; the one the
  // operator aborted with `resolve --abort`. Destination: the generation it
  // committed (0: none), persisted before it acknowledges.
  uint64_t handover_generation = 0;
  uint64_t committed_generation = 0;
  uint64_t aborted_generation = 0;
  // Destination: the committed generation the source confirmed it knows of
  // (until then the destination does not end the migration on its own).
  uint64_t confirmed_generation = 0;
  nlohmann::json extra = nlohmann::json::object();  // anything else, kept as is

  bool operator==(const MigrationRecord&) const = default;
};

class StateFile {
 public:
  static constexpr char kMagic[9] = "LMSTATE1";
  static constexpr uint64_t kSlotSize = 4096;
  static constexpr uint64_t kSlotHeaderSize = 24;
  static constexpr uint64_t kMaxRecordBytes = kSlotSize - kSlotHeaderSize;
  static constexpr uint64_t kBitmapOffset = 2 * kSlotSize;
  static constexpr uint64_t kPageBytes = 4096;
  static constexpr uint64_t kBlocksPerPage = kPageBytes * 8;

  // The state file that belongs to an image: "<image>.livemig-state".
  static std::string path_for_image(const std::string& image_path);

  // Creates the file (replacing any old one atomically: written as
  // "<path>.tmp", fsync'd, renamed over path, directory fsync'd) with `record`
  // in slot A (generation 1), an invalid slot B and an all-clear bitmap.
  // Errors name the path: bad record (role not source/destination, block_size
  // not a power of two, JSON over kMaxRecordBytes), I/O errors. A StateFile
  // still open on the old file keeps it (now unlinked): replace that object.
  static Result<std::unique_ptr<StateFile>> create(const std::string& path, const MigrationRecord& record);

  // Opens an existing file: loads the newest valid header slot and the bitmap.
  // Errors name the path and what is wrong: no valid header (with each slot's
  // reason), bitmap size mismatch or truncated bitmap (with the sizes), file
  // in use, I/O errors.
  static Result<std::unique_ptr<StateFile>> open(const std::string& path);

  // Deletes the file (and a leftover "<path>.tmp") and fsyncs the directory.
  // A file that does not exist is not an error.
  static Status remove(const std::string& path);

  // Closes the file. Does not sync: marks not yet synced are dropped, exactly
  // as if the process had been killed.
  ~StateFile();
  StateFile(const StateFile&) = delete;
  StateFile& operator=(const StateFile&) = delete;

  const std::string& path() const { return path_; }
  // The current record. REQUIRES: no write_record() runs concurrently.
  const MigrationRecord& record() const { return record_; }
  // Generation of the current record (1 after create()).
  uint64_t generation() const;

  // Replaces the record: writes the slot not holding the current record with
  // generation + 1, then fdatasync()s. On error the previous record stays
  // current, on disk and here. image_size and block_size cannot change.
  Status write_record(const MigrationRecord& record);

  // Number of blocks the bitmap covers.
  uint64_t block_count() const { return present_.size(); }
  // The presence bitmap. Read it freely; set bits only with mark_present(),
  // or they are not written by sync().
  BlockBitmap& present() { return present_; }
  const BlockBitmap& present() const { return present_; }

  // Sets the blocks' presence bits and marks their bitmap pages for the next
  // sync(). Lock-free, any thread. REQUIRES: blocks.last <= block_count()
  void mark_present(IndexRange blocks);

  // Clears the blocks' presence bits and marks their pages, as mark_present()
  // sets them. Only before a commit (the header's "What a crash can lose"):
  // a handover that synced its bits and then failed leaves them for the next
  // attempt, whose owed blocks must read as missing. REQUIRES: no concurrent
  // mark_present() on the same blocks; blocks.last <= block_count()
  void mark_missing(IndexRange blocks);

  // Writes every marked bitmap page and fdatasync()s (skipped if no page was
  // marked). Ok means every mark_present() that returned before this call
  // started is durable. Any thread; concurrent callers take turns.
  Status sync();

 private:
  StateFile(std::string path, int fd, MigrationRecord record, uint64_t generation, int slot);

  // Writes the marked pages [run.first, run.last) of the bitmap.
  Status write_pages(IndexRange run) REQUIRES(mu_);

  const std::string path_;
  const int fd_;
  BlockBitmap present_;      // one bit per block; lock-free
  BlockBitmap dirty_pages_;  // one bit per 4 KiB bitmap page needing a write; lock-free

  // Serializes sync() and write_record(): each is a sequence of pwrites and
  // one fdatasync that must not interleave with another's claims. Guards
  // record_ (writes), generation_, slot_, unsynced_ and failed_.
  mutable Mutex mu_;
  MigrationRecord record_;
  uint64_t generation_ GUARDED_BY(mu_);
  int slot_ GUARDED_BY(mu_);               // 0 = A, 1 = B: the slot holding record_
  bool unsynced_ GUARDED_BY(mu_) = false;  // bitmap pages written but not yet fdatasync'd
  Status failed_ GUARDED_BY(mu_);          // sticky fdatasync failure; ok if none
};

}  // namespace livemig
