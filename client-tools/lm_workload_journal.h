// The lm-workload journal: an append-only binary file that records, for every
// write the tool issued, whether the server acknowledged it, and which writes a
// completed flush or FUA write made durable. `lm-workload verify` replays it to
// know what every block must hold.
//
// Layout (all integers little-endian):
//
//   header, 64 bytes:
//        0  8  magic "LMWLJRN1"
//        8  4  version (2)
//       12  4  header size (64)
//       16  4  block size
//       20  4  record size (24)
//       24  8  seed (also written into every block, see lm_workload_block.h)
//       32  8  export size in bytes when the journal was created
//       40  8  creation time, seconds since the epoch
//       48  8  reserved (0)
//       56  8  checksum of bytes 0..55
//   then records, 24 bytes each:
//        0  4  type (RecordType)
//        4  4  check: low 32 bits of a hash of (type, a, b)
//        8  8  a
//       16  8  b
//
// Record types and their fields:
//   RUN_START     a = first block of the run's region, b = number of blocks
//   CONNECT       a = connection number within the run (1, 2, ...): the tool
//                 opened a connection, the first of the run, after a lost one
//                 or to the target of a switch. It starts a connection epoch:
//                 every record up to the next CONNECT belongs to it
//   ACK           a = block, b = generation: the server acknowledged the write
//   ACK_FUA       same, for a write sent with FUA: durable on acknowledgement
//   WRITE_FAILED  a = block, b = generation: issued, completed with an error or
//                 lost with the connection; it may or may not have landed, and
//                 is retried with the same generation
//   FLUSH_ISSUED  a = flush id. Covers every ACK of its epoch before this record
//   FLUSH_DONE    a = flush id: the flush completed successfully
//   SWITCH        a = switch number within the run: the tool moved to another
//                 server (after the CONNECT to it; the old server was flushed
//                 before, in the old epoch)
//   RUN_END       a = 0 clean / 1 failed, b = writes acknowledged in the run
//
// Derived per block (see read_journal):
//   acked   = highest generation with an ACK/ACK_FUA record
//   durable = highest generation with an ACK_FUA record, or an ACK record that
//             precedes, in the same epoch, the FLUSH_ISSUED record of a flush
//             whose FLUSH_DONE is in that epoch too. A flush only makes durable
//             what its own server process acknowledged: an ACK whose epoch
//             ended without a completed flush (the server was killed, or the
//             flush before a switch failed) stays acknowledged but not durable,
//             whatever later connections flush
//   issued  = highest generation with any record (ACK, ACK_FUA, WRITE_FAILED)
// A generation is never issued twice with different content, and a block never
// has two writes in flight, so acked is what the block holds if the server
// loses nothing, and durable..issued bounds it if the server crashed.
//
// Versions: version 1 had no CONNECT record, so its flushes cannot be tied to
// the connection whose writes they covered (its reader counted every ACK before
// any completed flush as durable, which is wrong after a server restart).
// read_journal() refuses version-1 journals with a message saying so; write a
// new journal.
//
// Durability of the journal itself: records are written to the file after every
// event-loop iteration and fdatasync'ed after a flush or FUA completion and at
// exit. A torn tail (partial or garbled last records) is ignored with a warning.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace livemig::workload {

inline constexpr uint64_t kJournalMagic = 0x314E524A4C574D4CULL;  // "LMWLJRN1" little-endian
inline constexpr uint32_t kJournalVersion = 2;
inline constexpr uint32_t kJournalHeaderSize = 64;
inline constexpr uint32_t kJournalRecordSize = 24;

enum class RecordType : uint32_t {
  kRunStart = 1,
  kAck = 2,
  kAckFua = 3,
  kWriteFailed = 4,
  kFlushIssued = 5,
  kFlushDone = 6,
  kSwitch = 7,
  kRunEnd = 8,
  kConnect = 9,  // version 2
};

struct JournalHeader {
  uint32_t block_size = 0;
  uint64_t seed = 0;
  uint64_t export_size = 0;
  uint64_t created = 0;
};

// What the journal says about one block. 0 means "no such generation".
struct BlockHistory {
  uint64_t acked = 0;
  uint64_t durable = 0;
  uint64_t issued = 0;
};

struct JournalSummary {
  JournalHeader header;
  std::unordered_map<uint64_t, BlockHistory> blocks;
  uint64_t records = 0;
  uint64_t acks = 0;
  uint64_t fua_acks = 0;
  uint64_t failed_writes = 0;
  uint64_t flushes_issued = 0;
  uint64_t flushes_done = 0;
  uint64_t switches = 0;
  uint64_t connections = 0;      // CONNECT records
  uint64_t runs = 0;
  uint64_t runs_failed = 0;      // RUN_END with a = 1
  bool last_run_ended = true;    // false: the last run has no RUN_END (the tool died)
  uint64_t next_flush_id = 1;
  uint64_t valid_bytes = 0;      // header + good records
  uint64_t torn_tail_bytes = 0;  // ignored bytes at the end
};

// Reads and replays a journal. Fails on a missing file, a bad header, a
// version-1 journal, or a bad record that is followed by good ones (a torn
// tail is only counted).
Result<JournalSummary> read_journal(const std::string& path);

// Appends records. Not thread-safe; one writer per file.
class JournalWriter {
 public:
  // Creates (or truncates) `path` and writes the header durably.
  static Result<std::unique_ptr<JournalWriter>> create(const std::string& path,
                                                       const JournalHeader& header);
  // Opens an existing journal read by read_journal() for appending; cuts off a torn tail.
  static Result<std::unique_ptr<JournalWriter>> open_append(const std::string& path,
                                                            const JournalSummary& summary);
  ~JournalWriter();
  JournalWriter(const JournalWriter&) = delete;
  JournalWriter& operator=(const JournalWriter&) = delete;

  // Buffers one record. ACK_FUA and FLUSH_DONE make sync_wanted() true.
  void add(RecordType type, uint64_t a, uint64_t b = 0);
  // Writes buffered records to the file (no fsync).
  Status write_out();
  // write_out() then fdatasync().
  Status sync();
  bool sync_wanted() const { return sync_wanted_; }
  const std::string& path() const { return path_; }

 private:
  JournalWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
  std::vector<uint8_t> buffer_;
  bool sync_wanted_ = false;
};

}  // namespace livemig::workload
