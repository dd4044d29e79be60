# Sanitizer and fuzzing builds (issue #13). Included from the top-level
# CMakeLists.txt before any target is defined, so that the flags below reach
# every target: the static libraries, the plugin .so, the tools and the tests.
#
#   LIVEMIG_SANITIZE=""                   a normal build (the default)
#   LIVEMIG_SANITIZE="address,undefined"  ASan + UBSan; undefined behaviour
#                                         aborts (-fno-sanitize-recover)
#   LIVEMIG_SANITIZE="thread"             TSan
#   LIVEMIG_FUZZ=ON (clang only)          libFuzzer targets in tests/fuzz; the
#                                         whole tree is compiled with
#                                         -fsanitize=fuzzer-no-link,address,undefined
#                                         so that the code the targets link is
#                                         instrumented for coverage too
#
# The plugin .so of a sanitizer build needs the sanitizer's runtime loaded
# first in the (uninstrumented) nbdkit that loads it: LD_PRELOAD it.
# tests/sanitize/run and tests/fuzz/run configure build-asan/, build-tsan/ and
# build-fuzz/ this way and say how to run them.

set_property(CACHE LIVEMIG_SANITIZE PROPERTY STRINGS "" "address,undefined" "thread")

if(LIVEMIG_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "LIVEMIG_FUZZ=ON needs clang (libFuzzer), e.g. -DCMAKE_CXX_COMPILER=clang++-14; "
                        "this is ${CMAKE_CXX_COMPILER_ID}. tests/fuzz/run configures build-fuzz/ so.")
  endif()
  if(NOT LIVEMIG_SANITIZE STREQUAL "" AND NOT LIVEMIG_SANITIZE STREQUAL "address,undefined")
    message(FATAL_ERROR "LIVEMIG_FUZZ=ON implies LIVEMIG_SANITIZE=address,undefined, not '${LIVEMIG_SANITIZE}'")
  endif()
  set(LIVEMIG_SANITIZE "address,undefined")
endif()

if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  # Boost 1.74's Asio looks for clang's coroutines in libc++'s
  # <experimental/coroutine> only; with libstdc++ (as on Debian) it must be
  # told they are there. And its awaitable.hpp uses std::exchange without
  # including <utility>, which g++'s headers happen to pull in and clang's
  # path through them does not.
  add_compile_definitions(BOOST_ASIO_HAS_CO_AWAIT=1)
  add_compile_options(-include utility)
endif()

if(NOT LIVEMIG_SANITIZE STREQUAL "")
  string(REPLACE "," ";" _livemig_sanitizers "${LIVEMIG_SANITIZE}")
  foreach(s IN LISTS _livemig_sanitizers)
    if(NOT s MATCHES "^(address|undefined|thread)$")
      message(FATAL_ERROR "LIVEMIG_SANITIZE: unknown sanitizer '${s}' (use address,undefined or thread)")
    endif()
  endforeach()
  if("thread" IN_LIST _livemig_sanitizers AND "address" IN_LIST _livemig_sanitizers)
    message(FATAL_ERROR "LIVEMIG_SANITIZE: thread and address cannot be combined")
  endif()
  set(_livemig_compile -fsanitize=${LIVEMIG_SANITIZE} -fno-omit-frame-pointer)
  if("undefined" IN_LIST _livemig_sanitizers)
    list(APPEND _livemig_compile -fno-sanitize-recover=undefined)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # GCC leaves a float converted to an integer it does not fit (UB) out
      # of -fsanitize=undefined; clang includes it. JSON numbers such as
      # 1e30 given where an integer is expected end up there.
      list(APPEND _livemig_compile -fsanitize=float-cast-overflow)
    endif()
    if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
      # clang 14 cannot emit -fsanitize=function's prologue data for the
      # split functions of a coroutine ("error: Cannot represent a difference
      # across sections", common/control_server.cpp): leave that one check out.
      list(APPEND _livemig_compile -fno-sanitize=function)
    endif()
  endif()
  if(LIVEMIG_FUZZ)
    # Coverage instrumentation without libFuzzer's main(); the fuzz targets
    # link -fsanitize=fuzzer themselves (tests/fuzz/CMakeLists.txt).
    list(APPEND _livemig_compile -fsanitize=fuzzer-no-link)
  endif()
  add_compile_options(${_livemig_compile})
  add_link_options(-fsanitize=${LIVEMIG_SANITIZE})
  message(STATUS "livemig: sanitizers ${LIVEMIG_SANITIZE}")
endif()

# The fuzz targets (LIVEMIG_FUZZ) or, in every other build, their replayers:
# plain programs that run the same fuzz code over the checked-in corpus and
# crash files, as CTest's "fuzz: replay corpus" tests.
if(BUILD_TESTING OR LIVEMIG_FUZZ)
  add_subdirectory(${PROJECT_SOURCE_DIR}/tests/fuzz ${PROJECT_BINARY_DIR}/tests/fuzz)
endif()
