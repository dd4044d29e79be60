#include "client-tools/lm_workload_verify.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "client-tools/lm_workload_block.h"
#include "client-tools/lm_workload_journal.h"
#include "client-tools/lm_workload_util.h"

namespace livemig::workload {
namespace {

constexpr uint64_t kReadChunkBytes = 1u << 20;

// What one block may hold.
struct Expectation {
  bool initial_ok = false;  // the content the image had before any write
  uint64_t min_gen = 0;     // acceptable generations, when max_gen > 0
  uint64_t max_gen = 0;
  bool written = false;     // the journal names the block
};

struct Mismatch {
  uint64_t block;
  std::string expected;
  std::string found;
  nlohmann::json found_json;
  Expectation expectation;
};

class Verifier {
 public:
  Verifier(const VerifyOptions& o, JournalSummary&& s) : opt_(o), journal_(std::move(s)) {}
  int run();

 private:
  Expectation expectation_for(uint64_t block) const;
  bool acceptable(uint64_t block, const Expectation& e, const DecodedBlock& d) const;
  std::string describe_expected(const Expectation& e) const;
  void check_block(uint64_t block, const uint8_t* data);
  void check_run(uint64_t first, uint64_t count);
  void add_mismatch(uint64_t block, const Expectation& e, std::string found, nlohmann::json found_json);

  const VerifyOptions& opt_;
  JournalSummary journal_;
  NbdHandle h_;
  uint64_t export_size_ = 0;
  uint32_t bs_ = 0;
  uint64_t checked_ = 0;
  uint64_t ok_ = 0;
  uint64_t checked_written_ = 0;
  uint64_t checked_untouched_ = 0;
  uint64_t mismatched_ = 0;
  std::vector<Mismatch> listed_;
  std::vector<uint8_t> buf_;
};

Expectation Verifier::expectation_for(uint64_t block) const {
  Expectation e;
  auto it = journal_.blocks.find(block);
  if (it == journal_.blocks.end()) {
    e.initial_ok = true;
    return e;
  }
  e.written = true;
  const BlockHistory& b = it->second;
  if (opt_.durable_only) {
    // At least what a completed flush/FUA covered, at most what was ever sent.
    e.initial_ok = b.durable == 0;
    e.min_gen = std::max<uint64_t>(b.durable, 1);
    e.max_gen = b.issued;
  } else if (b.acked == 0) {
    e.initial_ok = true;  // only failed (never acknowledged) writes
  } else {
    e.min_gen = e.max_gen = b.acked;
  }
  return e;
}

bool Verifier::acceptable(uint64_t block, const Expectation& e, const DecodedBlock& d) const {
  const uint64_t seed = journal_.header.seed;
  if (d.kind == DecodedBlock::Kind::kValid && d.id.seed == seed && d.id.block == block && e.max_gen > 0 &&
      d.id.generation >= e.min_gen && d.id.generation <= e.max_gen)
    return true;
  if (!e.initial_ok) return false;
  if (opt_.initial == "zero") return d.kind == DecodedBlock::Kind::kZero;
  // --initial any: anything but (part of) a block written by this journal's runs.
  for (const BlockId& id : d.sector_ids)
    if (id.seed == seed) return false;
  return true;
}

std::string Verifier::describe_expected(const Expectation& e) const {
  std::string initial = opt_.initial == "zero" ? "zeros" : "its initial content";
  std::string gens;
  if (e.max_gen > 0)
    gens = e.min_gen == e.max_gen ? fmt::format("generation {}", e.min_gen)
                                  : fmt::format("a generation in {}..{}", e.min_gen, e.max_gen);
  if (e.initial_ok && !gens.empty()) return fmt::format("{} or {}", initial, gens);
  if (e.initial_ok) return e.written ? fmt::format("{} (no write acknowledged)", initial)
                                     : fmt::format("{} (never written)", initial);
  return gens;
}

void Verifier::add_mismatch(uint64_t block, const Expectation& e, std::string found, nlohmann::json found_json) {
  mismatched_++;
  if (listed_.size() < opt_.max_listed)
    listed_.push_back(Mismatch{block, describe_expected(e), std::move(found), std::move(found_json), e});
}

void Verifier::check_block(uint64_t block, const uint8_t* data) {
  const Expectation e = expectation_for(block);
  checked_++;
  (e.written ? checked_written_ : checked_untouched_)++;
  DecodedBlock d = decode_block(std::span<const uint8_t>(data, bs_));
  if (acceptable(block, e, d)) {
    ok_++;
    return;
  }
  nlohmann::json fj;
  switch (d.kind) {
    case DecodedBlock::Kind::kZero:
      fj = {{"kind", "zero"}};
      break;
    case DecodedBlock::Kind::kValid:
      fj = {{"kind", "valid"}, {"block", d.id.block}, {"generation", d.id.generation}, {"seed", d.id.seed}};
      break;
    case DecodedBlock::Kind::kMixed:
      fj = {{"kind", "mixed"}, {"detail", d.detail}};
      break;
  }
  std::string found = describe(d, journal_.header.seed);
  if (d.kind == DecodedBlock::Kind::kValid && d.id.seed == journal_.header.seed && d.id.block == block)
    found = fmt::format("generation {}", d.id.generation);
  else if (d.kind == DecodedBlock::Kind::kValid && d.id.seed == journal_.header.seed)
    found = fmt::format("the content of block {} generation {} (misplaced write)", d.id.block, d.id.generation);
  if (!opt_.durable_only) {
    auto it = journal_.blocks.find(block);
    if (it != journal_.blocks.end() && it->second.issued > it->second.acked)
      found += fmt::format(" [generation {} was sent but never acknowledged]", it->second.issued);
  }
  add_mismatch(block, e, std::move(found), std::move(fj));
}

void Verifier::check_run(uint64_t first, uint64_t count) {
  // Blocks the journal names beyond this export's last whole block.
  const uint64_t whole_blocks = export_size_ / bs_;
  const uint64_t inside = first >= whole_blocks ? 0 : std::min(count, whole_blocks - first);
  for (uint64_t b = first + inside; b < first + count; ++b) {
    const Expectation e = expectation_for(b);
    checked_++;
    (e.written ? checked_written_ : checked_untouched_)++;
    add_mismatch(b, e, "nothing: the block is beyond the end of the export", {{"kind", "beyond-end"}});
  }
  count = inside;

  uint64_t chunk = kReadChunkBytes;
  if (int64_t max = nbd_get_block_size(h_.get(), LIBNBD_SIZE_MAXIMUM); max > 0)
    chunk = std::min<uint64_t>(chunk, static_cast<uint64_t>(max));
  const uint64_t per_read = std::max<uint64_t>(1, chunk / bs_);
  while (count > 0) {
    const uint64_t n = std::min(count, per_read);
    buf_.resize(n * bs_);
    if (nbd_pread(h_.get(), buf_.data(), buf_.size(), first * bs_, 0) == -1) {
      std::string why = nbd_last_error();
      for (uint64_t b = first; b < first + n; ++b) {
        const Expectation e = expectation_for(b);
        checked_++;
        (e.written ? checked_written_ : checked_untouched_)++;
        add_mismatch(b, e, "a read error: " + why, {{"kind", "read-error"}, {"detail", why}});
      }
      if (nbd_aio_is_dead(h_.get()) || nbd_aio_is_closed(h_.get())) {
        error("connection lost during verify: {}", why);
        throw std::runtime_error("connection lost");
      }
    } else {
      for (uint64_t i = 0; i < n; ++i) check_block(first + i, buf_.data() + i * bs_);
    }
    first += n;
    count -= n;
  }
}

int Verifier::run() {
  bs_ = journal_.header.block_size;
  if (bs_ < kMinBlockSize || bs_ % kSectorSize || bs_ > kMaxBlockSize) {
    error("journal {} has an invalid block size {}", opt_.journal, bs_);
    return kExitUsage;
  }
  if (journal_.torn_tail_bytes)
    warn("journal {}: ignoring a torn tail of {} bytes", opt_.journal, journal_.torn_tail_bytes);
  if (!journal_.last_run_ended)
    warn("journal {}: the last write run did not finish (killed?): its last acknowledgements may be missing",
         opt_.journal);

  auto c = nbd_connect(opt_.uri);
  if (!c) {
    error("{}", c.status().message());
    return kExitUsage;
  }
  h_ = std::move(c->handle);
  export_size_ = c->size;
  if (export_size_ != journal_.header.export_size)
    warn("export size {} differs from the journal's {}", export_size_, journal_.header.export_size);

  std::optional<BlockRange> range;
  if (opt_.blocks || !opt_.region.empty()) {
    auto r = resolve_range(opt_.blocks, opt_.region, bs_, export_size_);
    if (!r) {
      error("{}", r.status().message());
      return kExitUsage;
    }
    range = *r;
  }

  // Runs of blocks to read: the range, plus journal blocks outside it grouped
  // into runs of consecutive numbers.
  std::vector<uint64_t> named;
  named.reserve(journal_.blocks.size());
  for (const auto& [block, hist] : journal_.blocks)
    if (!range || block < range->first || block - range->first >= range->count) named.push_back(block);
  std::sort(named.begin(), named.end());
  try {
    size_t i = 0;
    auto flush_named_until = [&](uint64_t limit) {
      while (i < named.size() && named[i] < limit) {
        size_t j = i + 1;
        while (j < named.size() && named[j] == named[j - 1] + 1 && named[j] < limit) ++j;
        check_run(named[i], j - i);
        i = j;
      }
    };
    if (range) {
      flush_named_until(range->first);
      check_run(range->first, range->count);
    }
    flush_named_until(UINT64_MAX);
  } catch (const std::runtime_error&) {
    return kExitUsage;
  }

  const bool ok = mismatched_ == 0;
  const std::string mode = opt_.durable_only ? "durable-only" : "exact";
  if (opt_.json) {
    nlohmann::json j;
    j["ok"] = ok;
    j["mode"] = mode;
    j["uri"] = opt_.uri;
    j["journal"] = opt_.journal;
    j["seed"] = journal_.header.seed;
    j["block_size"] = bs_;
    j["checked"] = checked_;
    j["checked_written"] = checked_written_;
    j["checked_never_written"] = checked_untouched_;
    j["ok_blocks"] = ok_;
    j["mismatched"] = mismatched_;
    j["mismatches"] = nlohmann::json::array();
    for (const auto& m : listed_) {
      nlohmann::json e = {{"initial_ok", m.expectation.initial_ok}};
      if (m.expectation.max_gen > 0) {
        e["generation_min"] = m.expectation.min_gen;
        e["generation_max"] = m.expectation.max_gen;
      }
      j["mismatches"].push_back({{"block", m.block},
                                 {"offset", m.block * bs_},
                                 {"expected", e},
                                 {"expected_text", m.expected},
                                 {"found", m.found_json},
                                 {"found_text", m.found}});
    }
    fmt::print("{}\n", j.dump(2));
    return ok ? kExitOk : kExitFailed;
  }
  note("verify {} against journal {} (seed {:#x}, block size {}, {} mode)", opt_.uri, opt_.journal,
       journal_.header.seed, bs_, mode);
  for (const auto& m : listed_)
    note("MISMATCH block {} (offset {}): expected {}, found {}", m.block, m.block * bs_, m.expected, m.found);
  if (mismatched_ > listed_.size()) note("... and {} more mismatched blocks", mismatched_ - listed_.size());
  note("checked {} blocks ({} written, {} never written): {} ok, {} mismatched", checked_, checked_written_,
       checked_untouched_, ok_, mismatched_);
  note("verify {}", ok ? "OK" : "FAILED");
  return ok ? kExitOk : kExitFailed;
}

}  // namespace

int run_verify(const VerifyOptions& options) {
  auto s = read_journal(options.journal);
  if (!s) {
    error("{}", s.status().message());
    return kExitUsage;
  }
  Verifier v(options, std::move(*s));
  return v.run();
}

int run_journal_info(const JournalOptions& options) {
  auto s = read_journal(options.journal);
  if (!s) {
    error("{}", s.status().message());
    return kExitUsage;
  }
  const JournalSummary& j = *s;
  uint64_t durable_blocks = 0;
  uint64_t max_gen = 0;
  for (const auto& [block, h] : j.blocks) {
    if (h.durable) durable_blocks++;
    max_gen = std::max(max_gen, h.issued);
  }
  std::optional<BlockHistory> hist;
  if (options.block) {
    auto it = j.blocks.find(*options.block);
    hist = it == j.blocks.end() ? BlockHistory{} : it->second;
  }
  if (options.json) {
    nlohmann::json out = {{"journal", options.journal},
                          {"block_size", j.header.block_size},
                          {"seed", j.header.seed},
                          {"export_size", j.header.export_size},
                          {"created", j.header.created},
                          {"records", j.records},
                          {"blocks_written", j.blocks.size()},
                          {"blocks_durable", durable_blocks},
                          {"max_generation", max_gen},
                          {"acks", j.acks},
                          {"fua_acks", j.fua_acks},
                          {"failed_writes", j.failed_writes},
                          {"flushes_issued", j.flushes_issued},
                          {"flushes_done", j.flushes_done},
                          {"switches", j.switches},
                          {"connections", j.connections},
                          {"runs", j.runs},
                          {"runs_failed", j.runs_failed},
                          {"last_run_ended", j.last_run_ended},
                          {"torn_tail_bytes", j.torn_tail_bytes}};
    if (hist)
      out["block"] = {{"block", *options.block},
                      {"acked", hist->acked},
                      {"durable", hist->durable},
                      {"issued", hist->issued}};
    fmt::print("{}\n", out.dump(2));
    return kExitOk;
  }
  fmt::print("journal {}: block size {}, seed {:#x}, export size {}\n", options.journal, j.header.block_size,
             j.header.seed, j.header.export_size);
  fmt::print("  {} records, {} runs ({} failed{}), {} switches, {} connections\n", j.records, j.runs,
             j.runs_failed, j.last_run_ended ? "" : ", the last one unfinished", j.switches, j.connections);
  fmt::print("  {} blocks written ({} with a durable generation), highest generation {}\n", j.blocks.size(),
             durable_blocks, max_gen);
  fmt::print("  {} writes acknowledged ({} FUA), {} failed attempts, {}/{} flushes completed\n", j.acks,
             j.fua_acks, j.failed_writes, j.flushes_done, j.flushes_issued);
  if (j.torn_tail_bytes) fmt::print("  torn tail: {} bytes ignored\n", j.torn_tail_bytes);
  if (hist)
    fmt::print("  block {}: acknowledged generation {}, durable generation {}, highest issued {}\n",
               *options.block, hist->acked, hist->durable, hist->issued);
  return kExitOk;
}

}  // namespace livemig::workload
