// handover=on-destination-io: the rule that says the VM has moved.
//
// A hypervisor that starts the VM on the destination without telling anyone
// shows it only by I/O: the destination's clients start writing (their
// writes and flushes reach the source forwarded, DestProxy) and the source's
// own clients stop. The source hands over once
//   1. at least one write, trim, zero or flush forwarded from the
//      destination was applied here in this migration,
//   2. the last forwarded one came after the last local one (the side that
//      wrote last is the destination), and
//   3. no local client has written or flushed for `quiet` (default 1 s).
// Reads do not count on either side: a monitoring tool that reads the
// source does not keep the disk there, and a destination that only reads
// has not started the VM's writes. (2) keeps a single early write on the
// destination (a probe, a partition-table read-modify-write) from handing
// over a VM that is still running at the source and merely idle for a second.
//
// Times are steady-clock nanoseconds; note_* are called from the data path
// (any thread), due() from the source's worker.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace livemig {

class DestinationIoTrigger {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kDefaultQuiet{1000};

  explicit DestinationIoTrigger(Clock::time_point started, std::chrono::nanoseconds quiet = kDefaultQuiet)
      : quiet_ns_(quiet.count()), last_local_(ns(started)) {}

  void note_local(Clock::time_point now) { last_local_.store(ns(now), std::memory_order_relaxed); }
  void note_forwarded(Clock::time_point now) {
    forwarded_.fetch_add(1, std::memory_order_relaxed);
    last_forwarded_.store(ns(now), std::memory_order_relaxed);
  }

  bool due(Clock::time_point now) const {
    const int64_t local = last_local_.load(std::memory_order_relaxed);
    const int64_t forwarded = last_forwarded_.load(std::memory_order_relaxed);
    return forwarded_.load(std::memory_order_relaxed) > 0 && forwarded > local && ns(now) - local >= quiet_ns_;
  }

  uint64_t forwarded_requests() const { return forwarded_.load(std::memory_order_relaxed); }
  // How long the source's own clients have not written (since the migration
  // started, if they never did).
  std::chrono::milliseconds local_quiet(Clock::time_point now) const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::nanoseconds(ns(now) - last_local_.load(std::memory_order_relaxed)));
  }

 private:
  static int64_t ns(Clock::time_point t) { return t.time_since_epoch().count(); }

  const int64_t quiet_ns_;
  std::atomic<int64_t> last_local_;
  std::atomic<int64_t> last_forwarded_{0};
  std::atomic<uint64_t> forwarded_{0};
};

}  // namespace livemig
