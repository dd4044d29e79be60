// `lm-workload verify` (is every block what the journal says?) and
// `lm-workload journal` (what does a journal say?).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace livemig::workload {

struct VerifyOptions {
  std::string uri;
  std::string journal;
  bool durable_only = false;
  std::optional<uint64_t> blocks;  // also check never-written blocks in 0..N-1
  std::string region;              // or in OFFSET:LEN
  std::string initial = "zero";    // what never-written blocks hold: zero | any
  bool json = false;
  unsigned max_listed = 20;
};

// Returns the exit code: 0 all blocks right, 1 some wrong, 2 could not verify.
int run_verify(const VerifyOptions& options);

struct JournalOptions {
  std::string journal;
  std::optional<uint64_t> block;
  bool json = false;
};

// Prints what a journal records; returns the exit code.
int run_journal_info(const JournalOptions& options);

}  // namespace livemig::workload
