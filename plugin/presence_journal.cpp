#include "plugin/presence_journal.h"

#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "plugin/test_hooks.h"

namespace livemig {

PresenceJournal::PresenceJournal(ImageFile& image, StateFile* file, BlockBitmap present)
    : image_(image), file_(file), present_(std::move(present)), mark_delay_ms_(test_delay_ms("LIVEMIG_TEST_MARK_DELAY_MS")) {}

void PresenceJournal::mark(IndexRange blocks) {
  if (blocks.empty()) return;
  MutexLock lock(batch_mu_);
  present_.set_range(blocks);
  if (mark_delay_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(mark_delay_ms_));
  batch_.push_back(blocks);
}

Status PresenceJournal::persist() {
  std::lock_guard serial(persist_mu_);
  std::vector<IndexRange> runs;
  {
    MutexLock lock(batch_mu_);
    runs.swap(batch_);
  }
  auto put_back = [&] {
    MutexLock lock(batch_mu_);
    batch_.insert(batch_.end(), runs.begin(), runs.end());
  };
  // Data first, then the bits that claim it.
  if (image_.flush() < 0) {
    int e = errno;
    put_back();
    return Status::error(fmt::format("syncing {}: {}", image_.path(), std::strerror(e)), e);
  }
  if (!file_) return Status::ok();
  for (IndexRange r : runs) file_->mark_present(r);
  if (Status s = file_->sync(); !s) {
    put_back();
    return s;
  }
  return Status::ok();
}

}  // namespace livemig
