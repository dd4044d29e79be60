#include "plugin/io_gate.h"

#include <chrono>
#include <thread>

namespace livemig {

const char* io_mode_name(IoMode m) {
  switch (m) {
    case IoMode::Local: return "local";
    case IoMode::SourceTracking: return "source-tracking";
    case IoMode::SourceHandover: return "source-handover";
    case IoMode::SourceForward: return "source-forward";
    case IoMode::DestProxy: return "destination-proxy";
    case IoMode::DestPost: return "destination-postcopy";
    case IoMode::Fenced: return "fenced";
    case IoMode::Stale: return "stale";
  }
  return "?";
}

bool io_mode_authoritative(IoMode m) {
  return m == IoMode::Local || m == IoMode::SourceTracking || m == IoMode::DestPost;
}

void IoGate::drain() {
  std::lock_guard lock(drain_mu_);
  wait_for_parity(epoch_.fetch_add(1) & 1);
}

void IoGate::wait_for_parity(uint32_t parity) {
  // Requests are short (a local I/O) or bounded by a timeout (a read waiting
  // for the peer): poll, backing off to 1 ms.
  auto pause = std::chrono::microseconds(10);
  while (inflight_[parity].value.load() > 0) {
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

}  // namespace livemig
