// The replayer: a main() for a fuzz target's LLVMFuzzerTestOneInput, so that
// a normal (g++, or sanitizer) build runs the checked-in corpus and crash
// files through the same code libFuzzer does, without clang.
//
//   fuzz_frame_replay tests/fuzz/corpus/fuzz_frame tests/fuzz/crashes/fuzz_frame
//   fuzz_frame_replay --expect-crash tests/fuzz/open/fuzz_frame
//
// Each argument is a file or a directory (its files, in name order; names
// starting with '.' are skipped). An input that breaks an invariant aborts
// the program with the input's name on stderr. With --expect-crash every
// input runs in a child process and must fail there: those are reproducers
// of bugs not fixed yet; once one passes, the bug is fixed and its file
// belongs in crashes/ (a regression test from then on).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);
// In a sanitizer build: where reports go (tests/sanitize/run collects files).
extern "C" __attribute__((weak)) void __sanitizer_set_report_path(const char* path);

namespace {

namespace fs = std::filesystem;

std::vector<fs::path> inputs_of(const fs::path& arg) {
  std::vector<fs::path> files;
  if (fs::is_directory(arg)) {
    for (const auto& e : fs::directory_iterator(arg))
      if (e.is_regular_file() && e.path().filename().string()[0] != '.') files.push_back(e.path());
    std::sort(files.begin(), files.end());
  } else if (fs::is_regular_file(arg)) {
    files.push_back(arg);
  } else {
    std::fprintf(stderr, "replay: %s: no such file or directory\n", arg.c_str());
    std::exit(2);
  }
  return files;
}

void run_one(const fs::path& file) {
  std::ifstream f(file, std::ios::binary);
  std::vector<uint8_t> bytes{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  if (!f.eof() && f.fail()) {
    std::fprintf(stderr, "replay: %s: cannot read\n", file.c_str());
    std::exit(2);
  }
  std::fprintf(stderr, "replay: %s (%zu bytes)\n", file.c_str(), bytes.size());
  // A copy of exactly the input's size, so a read past its end is seen by ASan.
  auto* copy = new uint8_t[bytes.size()];
  std::memcpy(copy, bytes.data(), bytes.size());
  LLVMFuzzerTestOneInput(copy, bytes.size());
  delete[] copy;
}

// True if running `file` in a child process fails (a signal or an exit status other than 0).
bool fails_in_child(const fs::path& file) {
  std::fflush(nullptr);
  pid_t pid = fork();
  if (pid < 0) {
    std::perror("replay: fork");
    std::exit(2);
  }
  if (pid == 0) {
    // An expected failure's sanitizer report is no finding: to stderr, not
    // to the report files that tests/sanitize/run fails on.
    if (__sanitizer_set_report_path) __sanitizer_set_report_path("stderr");
    run_one(file);
    std::fflush(nullptr);
    _exit(0);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
  bool expect_crash = false;
  std::vector<fs::path> files;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--expect-crash") == 0) {
      expect_crash = true;
      continue;
    }
    for (auto& f : inputs_of(argv[i])) files.push_back(f);
  }
  size_t still_failing = 0;
  for (const auto& f : files) {
    if (!expect_crash) {
      run_one(f);
      continue;
    }
    if (fails_in_child(f)) {
      ++still_failing;
    } else {
      std::fprintf(stderr,
                   "replay: %s no longer fails: the bug it reproduces is fixed. Move it to "
                   "tests/fuzz/crashes/<target>/ so that it guards against a regression.\n",
                   f.c_str());
    }
  }
  if (expect_crash) {
    std::printf("replay: %zu of %zu open findings still fail\n", still_failing, files.size());
    return still_failing == files.size() ? 0 : 1;
  }
  std::printf("replay: %zu inputs ran clean\n", files.size());
  return 0;
}
