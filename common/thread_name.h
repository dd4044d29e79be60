// Names a thread as ps, top and perf show it (the kernel keeps 15
// characters), so that a profile says which part of livemig spent the time.
#pragma once

#include <pthread.h>

#include <string>
#include <thread>

namespace livemig {

inline void name_thread(std::thread& t, const std::string& name) {
  pthread_setname_np(t.native_handle(), name.substr(0, 15).c_str());
}

}  // namespace livemig
