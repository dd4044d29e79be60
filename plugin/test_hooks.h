// Fault-injection points for the fault matrix (tests/faults) and the
// integration tests. LIVEMIG_TEST_CRASH_AT=NAME[,NAME...] makes the process
// kill itself with SIGKILL the first time it reaches a point with that name,
// exactly as kill -9 at that instant would. Read once; unset, a point costs
// one branch. The points (grep crash_point) are listed in docs/handover.md.
#pragma once

namespace livemig {

void crash_point(const char* name);

// Sleeps as many milliseconds as the environment variable `name` says (read
// each call; unset or 0: no sleep), to widen a race window in a test.
void test_delay(const char* name);

}  // namespace livemig
