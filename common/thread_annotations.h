// Clang thread-safety annotations (-Wthread-safety), as LevelDB's
// port/thread_annotations.h and Abseil's base/thread_annotations.h: a lock's
// declaration says what it guards and the compiler checks every access. The
// macros expand to nothing on other compilers. See
// https://clang.llvm.org/docs/ThreadSafetyAnalysis.html.
//
// The locks the annotations name are livemig::Mutex (common/mutex.h):
// libstdc++'s std::mutex and std::lock_guard carry no annotations.
#pragma once

#if defined(__clang__)
#define LIVEMIG_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define LIVEMIG_THREAD_ANNOTATION(x)
#endif

// On a data member: read and written only with the capability held.
#define GUARDED_BY(x) LIVEMIG_THREAD_ANNOTATION(guarded_by(x))
// On a pointer member: what it points to is guarded (the pointer is not).
#define PT_GUARDED_BY(x) LIVEMIG_THREAD_ANNOTATION(pt_guarded_by(x))
// On a lock: the locks that must be taken before or after it.
#define ACQUIRED_BEFORE(...) LIVEMIG_THREAD_ANNOTATION(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) LIVEMIG_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
// On a function: the caller holds these (exclusively / shared).
#define REQUIRES(...) LIVEMIG_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) LIVEMIG_THREAD_ANNOTATION(requires_shared_capability(__VA_ARGS__))
// On a function: the caller does not hold these (the function takes them).
#define EXCLUDES(...) LIVEMIG_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
// On a function: it takes / gives back / tries to take the capability.
#define ACQUIRE(...) LIVEMIG_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define RELEASE(...) LIVEMIG_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) LIVEMIG_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
// On a function: it returns the capability named (an accessor of a lock).
#define RETURN_CAPABILITY(x) LIVEMIG_THREAD_ANNOTATION(lock_returned(x))
// On a function: a run-time check that the capability is held.
#define ASSERT_CAPABILITY(x) LIVEMIG_THREAD_ANNOTATION(assert_capability(x))
// On a class: it is a lock (CAPABILITY) or an RAII holder of one (SCOPED_CAPABILITY).
#define CAPABILITY(x) LIVEMIG_THREAD_ANNOTATION(capability(x))
#define SCOPED_CAPABILITY LIVEMIG_THREAD_ANNOTATION(scoped_lockable)
// On a function: not checked. Say why beside it.
#define NO_THREAD_SAFETY_ANALYSIS LIVEMIG_THREAD_ANNOTATION(no_thread_safety_analysis)
