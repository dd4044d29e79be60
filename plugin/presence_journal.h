// The presence journal: which blocks a destination holds after the commit,
// and the order in which that becomes durable (invariant 2).
//
// Design notes
// ------------
// present: bit set = the local image holds the block's final data (pulled,
// or written by a client after the commit). Bits only go 0 -> 1. A clear bit
// must still come from the source; a set bit must never be pulled again,
// because a client may have written the block since.
//
// The rule that keeps a flushed write: data is durable before the bit that
// claims it, and a bit is never visible before it belongs to the batch the
// next persist() takes. So:
//   mark(r)    sets r's bits AND appends r to the unpersisted batch, under
//              one lock. (Setting the bits first and appending later let a
//              flush answer between the two without the bits on disk: after
//              kill -9 the block was pulled again over the flushed write.)
//   persist()  takes the batch, fdatasyncs the image (the data of every run
//              in it was written before its mark()), then sets the runs in
//              the state file's bitmap and syncs that. On failure the runs
//              go back into the batch. Calls take turns: a flush whose
//              write landed while another persist() ran waits and syncs
//              again.
// A client write to a block whose bit is set needs no mark: the bit is
// either on disk or in a batch that the flush's persist() will take or wait
// for. Image sync errors are sticky (ImageFile::flush), and so are the
// state file's (StateFile::sync): a later persist() cannot claim data that a
// failed writeback dropped.
//
// Test hook: LIVEMIG_TEST_MARK_DELAY_MS=N makes mark() sleep N ms between
// setting the bits and appending the batch (inside the lock), to widen the
// window the rule above closes (tests/integration/test_faults.py).
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "common/block_bitmap.h"
#include "common/mutex.h"
#include "common/state_file.h"
#include "common/status.h"
#include "plugin/image_file.h"

namespace livemig {

class PresenceJournal {
 public:
  // `present` holds the initial bits (the commit's, or recovered from the
  // state file, which already has them). `file` may be null (no state
  // file: nothing is persisted but the image sync).
  PresenceJournal(ImageFile& image, StateFile* file, BlockBitmap present);

  bool test(uint64_t block) const { return present_.test(block); }
  bool all_present(IndexRange blocks) const { return present_.all_set(blocks); }
  uint64_t find_next_missing(uint64_t from) const { return present_.find_next_clear(from); }
  uint64_t find_next_present(uint64_t from) const { return present_.find_next_set(from); }
  uint64_t missing() const { return present_.size() - present_.count(); }
  uint64_t blocks() const { return present_.size(); }

  // The blocks' data is in the image (not yet synced): claim them.
  void mark(IndexRange blocks);
  // Blocks were marked since the last persist() took its batch.
  bool has_unpersisted() {
    MutexLock lock(batch_mu_);
    return !batch_.empty();
  }
  // Makes every mark() that returned before this call durable, with the data
  // it covers. Errors name the step (image sync, state file).
  Status persist();

 private:
  ImageFile& image_;
  StateFile* const file_;
  BlockBitmap present_;
  const int mark_delay_ms_;  // test hook, 0 normally

  Mutex batch_mu_;
  std::vector<IndexRange> batch_ GUARDED_BY(batch_mu_);  // marked, not yet persisted
  std::mutex persist_mu_;          // persist() calls take turns
};

}  // namespace livemig
