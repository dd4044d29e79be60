// The write gate: the one part of the engine that every NBD request passes
// through. It holds the io mode (what a request does on this side now) and
// counts the requests in flight, so that the engine can change the mode and
// then wait until no request still runs under the old one (the fence at
// handover; retiring a session's state).
//
// Design notes
// ------------
// Cost (invariant 6): a request does two atomic loads of the epoch, one
// increment and one decrement of a counter, and one load of the mode: no
// lock. The counters and the mode sit on cache lines of their own.
//
// Draining, after Linux's SRCU: a request reads the epoch e, increments
// inflight_[e & 1], reads the mode, then reads the epoch again; if it moved,
// it takes its increment back and starts over. set_mode() stores the new
// mode; drain() flips the epoch (e -> e + 1) and waits for inflight_[e & 1]
// to reach 0. Why that suffices (all atomics sequentially consistent): a
// request that read the old mode read it before the store, so its second
// epoch load came before the flip or it would have started over; so it
// counted in inflight_[e & 1], before the flip, and the wait sees it. A
// request that enters after the flip counts in the other parity and never
// holds up the wait (the re-check is what makes one flip enough: without
// it a request could count under an epoch two flips old).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

namespace livemig {

// What a request does on this side (see PhaseMachine for when each applies).
enum class IoMode : uint8_t {
  Local,           // no migration, or a destination that is done: plain pass-through
  SourceTracking,  // source before handover: a write marks its blocks owed
  SourceHandover,  // source inside the handover window (the fence): reads and
                   // writes wait (bounded) until the commit is resolved
  SourceForward,   // source after the commit: reads and writes answered by the
                   // destination (write_forward.h)
  DestProxy,       // destination before handover: reads and writes answered by the source
  DestPost,        // destination after the commit: authoritative; a read of a
                   // missing block pulls it first
  Fenced,          // an incomplete or stale image kept for a later migration:
                   // writes EROFS, reads local (nothing claims it is current)
  Stale,           // a destination whose committed handover the operator
                   // aborted at the source: refuses reads (EIO) and writes (EROFS)
};

const char* io_mode_name(IoMode m);
// The side whose image holds the truth accepts writes.
bool io_mode_authoritative(IoMode m);

class IoGate {
 public:
  // One request's pass: the epoch it counted in and the mode it runs under.
  struct Ticket {
    uint32_t epoch;
    IoMode mode;
  };

  Ticket enter() {
    for (;;) {
      uint32_t e = epoch_.load();
      inflight_[e & 1].value.fetch_add(1);
      IoMode m = mode_.value.load();
      if (epoch_.load() == e) return {e, m};
      inflight_[e & 1].value.fetch_sub(1);  // a drain flipped meanwhile: count again
    }
  }
  void leave(const Ticket& t) { inflight_[t.epoch & 1].value.fetch_sub(1); }

  IoMode mode() const { return mode_.value.load(); }
  // Publishes a new mode for the requests that enter from now on.
  void set_mode(IoMode m) { mode_.value.store(m); }
  // Returns once every request that entered before drain() was called has
  // left (so none that read an older mode is still in the gate). Requests
  // that enter meanwhile do not hold it up. A request must therefore never
  // wait in the gate for something that needs a drain to finish (the engine
  // waits for a handover's resolution outside the gate). Concurrent drains
  // take turns.
  void drain();
  // Requests in the gate now (for status and tests).
  int64_t in_flight() const { return inflight_[0].value.load() + inflight_[1].value.load(); }

 private:
  void wait_for_parity(uint32_t parity);

  struct alignas(64) Counter {
    std::atomic<int64_t> value{0};
  };
  struct alignas(64) Mode {
    std::atomic<IoMode> value{IoMode::Local};
  };
  Mode mode_;
  alignas(64) std::atomic<uint32_t> epoch_{0};
  Counter inflight_[2];
  std::mutex drain_mu_;
};

// Leaves the gate at the end of a scope.
class GatePass {
 public:
  explicit GatePass(IoGate& gate) : gate_(gate), ticket_(gate.enter()) {}
  ~GatePass() { gate_.leave(ticket_); }
  GatePass(const GatePass&) = delete;
  GatePass& operator=(const GatePass&) = delete;
  IoMode mode() const { return ticket_.mode; }

 private:
  IoGate& gate_;
  IoGate::Ticket ticket_;
};

}  // namespace livemig
