// Ctrl-C (and SIGTERM, when asked) while a command waits: the handler only
// sets a flag that the command's wait loops look at, so the command can clean
// up (restore the cursor, roll a migration back) before it exits. A second
// signal kills the process (SA_RESETHAND).
#pragma once

#include <csignal>

namespace livemig::mig {

class InterruptScope {
 public:
  // Installs the handler and clears the flag; the destructor restores the
  // previous handlers.
  explicit InterruptScope(bool also_sigterm = false);
  ~InterruptScope();
  InterruptScope(const InterruptScope&) = delete;
  InterruptScope& operator=(const InterruptScope&) = delete;

  // True once a signal arrived while a scope was installed.
  static bool interrupted();

 private:
  bool also_sigterm_;
  struct sigaction old_int_ {}, old_term_ {};
};

}  // namespace livemig::mig
