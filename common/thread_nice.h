// Guest first: a migration's own threads may run at a lower CPU priority (a
// higher nice value) than the threads that serve the guest's requests, so
// that on a host whose CPUs are full the scheduler gives the guest the CPU
// first and the migration the rest (migration param migration_nice).
// Linux keeps the nice value per thread: setpriority(2) with a thread id
// changes that thread alone. Lowering a thread's priority needs no privilege;
// raising it again (a lower value) needs CAP_SYS_NICE or RLIMIT_NICE.
#pragma once

#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>

namespace livemig {

inline constexpr int kMaxMigrationNice = 19;

// Sets the calling thread's nice value: 0, or the errno of the failure.
inline int set_this_thread_nice(int nice) {
  return setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), nice) == 0 ? 0 : errno;
}

// The calling thread's nice value.
inline int this_thread_nice() {
  errno = 0;
  return getpriority(PRIO_PROCESS, static_cast<id_t>(gettid()));
}

}  // namespace livemig
