#include "client-tools/interrupt_scope.h"

#include <atomic>

namespace livemig::mig {

namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void on_interrupt(int) { g_interrupted = true; }

}  // namespace

InterruptScope::InterruptScope(bool also_sigterm) : also_sigterm_(also_sigterm) {
  g_interrupted = false;
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int_);
  if (also_sigterm_) sigaction(SIGTERM, &sa, &old_term_);
}

InterruptScope::~InterruptScope() {
  sigaction(SIGINT, &old_int_, nullptr);
  if (also_sigterm_) sigaction(SIGTERM, &old_term_, nullptr);
}

bool InterruptScope::interrupted() { return g_interrupted; }

}  // namespace livemig::mig
