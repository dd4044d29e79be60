// Fault-injection points for the fault matrix (tests/faults) and the
// integration tests. LIVEMIG_TEST_CRASH_AT=NAME[,NAME...] makes the process
// kill itself with SIGKILL the first time it reaches a point with that name,
// exactly as kill -9 at that instant would. Read once; unset, a point costs
// one branch. The points (grep crash_point) are listed in docs/handover.md.
#pragma once

namespace livemig {

void crash_point(const char* name);

// The milliseconds the environment variable `name` says to sleep at a
// point, to widen a race window in a test (unset or 0: 0). A point on a
// hot path reads it once and keeps it.
int test_delay_ms(const char* name);
// Sleeps test_delay_ms(name) (read each call).
void test_delay(const char* name);

}  // namespace livemig
