// The write loop of lm-workload.
//
// One libnbd handle in asynchronous mode, driven by our own poll(2) loop so that
// signals (through a signalfd), the switch file, retries, the rate limiter and
// progress lines all share one thread and one clock. Design rules:
//
// - A block never has two writes in flight: the generation a block holds after
//   the server acknowledged a write is then exactly that write's generation.
// - A slot is one write "in progress": in flight, or refused and waiting to be
//   retried. Retries keep their slot (and their block), so a fenced server fills
//   the queue with retries and new writes stop, as a guest's would.
// - Every issued generation ends up in the journal: ACK when acknowledged,
//   WRITE_FAILED when it completed with an error or was lost with the
//   connection. A write that libnbd refused to send is not journalled.
// - Switching server: stop issuing, wait until nothing is in flight (replies
//   come from the old server), flush the old server, connect to the new one,
//   then retry what was refused and go on.
// - Every connection opened (the first, after a lost one, after a switch) is a
//   CONNECT record: a flush makes durable only the acknowledgements of its own
//   connection, so the journal must say where one ends.
#include "client-tools/lm_workload_write.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "client-tools/lm_workload_block.h"
#include "client-tools/lm_workload_journal.h"
#include "client-tools/lm_workload_util.h"

namespace livemig::workload {

Result<Pattern> parse_pattern(const std::string& text) {
  Pattern p;
  if (text == "random") return p;
  if (text == "sequential") {
    p.kind = Pattern::Kind::kSequential;
    return p;
  }
  if (text.rfind("hot:", 0) == 0) {
    auto rest = text.substr(4);
    auto colon = rest.find(':');
    if (colon != std::string::npos) {
      try {
        size_t n1 = 0, n2 = 0;
        std::string f = rest.substr(0, colon), q = rest.substr(colon + 1);
        p.hot_fraction = std::stod(f, &n1);
        p.hot_probability = std::stod(q, &n2);
        if (n1 == f.size() && n2 == q.size() && p.hot_fraction > 0 && p.hot_fraction <= 1 &&
            p.hot_probability >= 0 && p.hot_probability <= 1) {
          p.kind = Pattern::Kind::kHot;
          return p;
        }
      } catch (...) {
      }
    }
    return Status::error(fmt::format(
        "--pattern {}: expected hot:FRACTION:PROB with 0 < FRACTION <= 1 and 0 <= PROB <= 1, e.g. hot:0.1:0.9",
        text));
  }
  return Status::error(fmt::format("--pattern {}: expected random, sequential or hot:FRACTION:PROB", text));
}

namespace {

using std::chrono::duration;
using std::chrono::duration_cast;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return duration<double>(b - a).count();
}

bool is_refusal(int err) { return err == EPERM || err == EROFS || err == EACCES; }

struct SwitchRecord {
  std::string from;
  std::string to;
  double pause_ms = 0;
  uint64_t drained = 0;
};

class Workload;

// One write in progress.
struct Slot {
  enum class State { kFree, kInFlight, kRetryWait };
  Workload* owner = nullptr;
  uint32_t index = 0;
  State state = State::kFree;
  uint64_t block = 0;  // absolute block number
  uint64_t generation = 0;
  bool fua = false;
  std::vector<uint8_t> buf;
  // Set by the completion callback.
  bool done = false;
  int error = 0;
  Clock::time_point issued_at;
  // Retry bookkeeping: set at the first failure of this (block, generation).
  bool failing = false;
  bool failure_journalled = false;
  Clock::time_point first_failure;
  Clock::time_point retry_at;
  unsigned attempts = 0;
  int last_error = 0;
};

class Workload {
 public:
  explicit Workload(const WriteOptions& o) : opt_(o) {}
  int run();

  // Called by libnbd (from inside nbd_aio_notify_* or nbd_close).
  static int on_write_done(void* user_data, int* error);
  static int on_flush_done(void* user_data, int* error);

 private:
  // Setup.
  Status setup();
  Status install_signals();
  void adopt(NbdConnection&& c);
  void journal_connection();

  // Loop steps.
  void handle_signals();
  void poll_switch_file(bool forced);
  void maybe_finish_switch();
  void try_reconnect();
  void issue_work();
  void issue_write(Slot& s);
  void issue_flush();
  void process_completions();
  void on_write_error(Slot& s, int err, bool sent, const std::string& why);
  void connection_lost(const std::string& why);
  void drop_connection();
  void complete_switch(const std::string& to);
  void print_stats(bool force);
  int poll_timeout_ms() const;
  bool finished() const;
  void fatal(const std::string& why);
  void finish_journal(bool ok);
  void report(double elapsed);

  std::optional<uint64_t> pick_block();
  bool want_new_writes() const;

  const WriteOptions& opt_;
  Pattern pattern_;
  BlockRange range_;
  uint32_t bs_ = 0;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  uint64_t seq_cursor_ = 0;
  uint64_t hot_blocks_ = 0;

  NbdHandle h_;
  std::string uri_;           // current server
  std::string initial_uri_;
  uint64_t export_size_ = 0;
  bool can_fua_ = false;
  bool can_flush_ = false;

  std::unique_ptr<JournalWriter> journal_;
  uint64_t next_flush_id_ = 1;
  uint64_t connections_ = 0;  // CONNECT records of this run

  std::vector<uint64_t> gen_;   // per block in range: last issued generation
  std::vector<uint8_t> busy_;   // per block in range: a write is in progress
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;
  std::vector<uint32_t> completed_;  // filled by on_write_done
  unsigned in_flight_ = 0;
  unsigned retry_waiting_ = 0;

  struct Flush {
    bool in_flight = false;
    bool done = false;
    int error = 0;
    uint64_t id = 0;
  } flush_;
  uint64_t acked_since_flush_ = 0;  // on the current connection

  // Counters.
  uint64_t issued_new_ = 0;
  uint64_t acked_ = 0;
  uint64_t fua_acked_ = 0;
  uint64_t write_errors_ = 0;
  uint64_t retries_ = 0;
  uint64_t flushes_done_ = 0;
  uint64_t flush_failures_ = 0;
  LatencyHistogram total_hist_;
  LatencyHistogram interval_hist_;
  uint64_t interval_acked_ = 0;

  // Time.
  Clock::time_point start_;
  Clock::time_point last_stats_;
  Clock::time_point next_stats_;
  Clock::time_point next_switch_poll_;
  double tokens_ = 0;
  double burst_ = 1;
  Clock::time_point last_refill_;

  // Switching and reconnecting.
  std::optional<std::string> switch_target_;
  Clock::time_point switch_requested_at_;
  uint64_t switch_drained_ = 0;
  std::vector<SwitchRecord> switches_;
  bool disconnected_ = false;
  Clock::time_point lost_at_;
  Clock::time_point next_reconnect_;
  bool reconnect_failure_logged_ = false;
  bool refusal_logged_ = false;
  std::string unterminated_switch_line_;  // first line without '\n' seen at the last poll

  // Stopping.
  int sigfd_ = -1;
  bool stop_new_ = false;       // duration/count reached or signal: no new writes
  bool interrupted_ = false;    // SIGINT/SIGTERM: abandon retries
  uint64_t abandoned_ = 0;
  std::string fatal_;
};

int Workload::on_write_done(void* user_data, int* error) {
  auto* s = static_cast<Slot*>(user_data);
  s->done = true;
  s->error = *error;
  s->owner->completed_.push_back(s->index);
  return 1;
}

int Workload::on_flush_done(void* user_data, int* error) {
  auto* f = static_cast<Workload*>(user_data);
  f->flush_.done = true;
  f->flush_.error = *error;
  return 1;
}

Status Workload::install_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  if (sigprocmask(SIG_BLOCK, &set, nullptr) != 0)
    return Status::error(fmt::format("sigprocmask: {}", std::strerror(errno)));
  sigfd_ = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sigfd_ < 0) return Status::error(fmt::format("signalfd: {}", std::strerror(errno)));
  signal(SIGPIPE, SIG_IGN);
  return Status::ok();
}

void Workload::adopt(NbdConnection&& c) {
  h_ = std::move(c.handle);
  can_fua_ = c.can_fua;
  can_flush_ = c.can_flush;
  if (c.read_only) warn("{} exports read-only: writes will be refused", uri_);
  if (opt_.fua_every && !can_fua_) warn("{} does not support FUA: writes are sent without it", uri_);
  if (opt_.flush_every && !can_flush_) warn("{} does not support flush: no flushes are sent", uri_);
}

void Workload::journal_connection() {
  journal_->add(RecordType::kConnect, ++connections_);
  acked_since_flush_ = 0;  // a flush here cannot cover the old connection's writes
}

Status Workload::setup() {
  if (auto p = parse_pattern(opt_.pattern_text); p) pattern_ = *p;
  else return p.status();

  // The journal decides block size and seed when continuing it.
  std::optional<JournalSummary> previous;
  struct stat st {};
  bool journal_exists = ::stat(opt_.journal.c_str(), &st) == 0 && st.st_size > 0;
  if (journal_exists && !opt_.append && !opt_.overwrite)
    return Status::error(fmt::format(
        "journal {} already exists: pass --append to continue it or --overwrite to start a new one",
        opt_.journal));
  bs_ = opt_.block_size;
  seed_ = opt_.seed ? *opt_.seed : std::random_device{}() * 0x100000000ULL + std::random_device{}();
  if (journal_exists && opt_.append) {
    auto s = read_journal(opt_.journal);
    if (!s) return s.status();
    previous = std::move(*s);
    if (opt_.block_size_given && opt_.block_size != previous->header.block_size)
      return Status::error(fmt::format("--block-size {} differs from the journal's block size {}",
                                       opt_.block_size, previous->header.block_size));
    if (opt_.seed && *opt_.seed != previous->header.seed)
      return Status::error(fmt::format("--seed {} differs from the journal's seed {}", *opt_.seed,
                                       previous->header.seed));
    bs_ = previous->header.block_size;
    seed_ = previous->header.seed;
    if (previous->torn_tail_bytes)
      warn("journal {}: ignoring a torn tail of {} bytes", opt_.journal, previous->torn_tail_bytes);
  }

  uri_ = initial_uri_ = opt_.uri;
  auto c = nbd_connect(uri_);
  if (!c) return c.status();
  if (c->read_only) return Status::error(fmt::format("{} exports read-only: cannot write to it", uri_));
  export_size_ = c->size;
  if (previous && previous->header.export_size != export_size_)
    warn("export size {} differs from the journal's {}", export_size_, previous->header.export_size);
  adopt(std::move(*c));

  auto r = resolve_range(opt_.blocks, opt_.region, bs_, export_size_);
  if (!r) return r.status();
  range_ = *r;
  hot_blocks_ = pattern_.kind == Pattern::Kind::kHot
                    ? std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(pattern_.hot_fraction *
                                                                            static_cast<double>(range_.count))))
                    : range_.count;
  hot_blocks_ = std::min(hot_blocks_, range_.count);

  gen_.assign(range_.count, 0);
  busy_.assign(range_.count, 0);
  if (previous) {
    for (const auto& [block, hist] : previous->blocks)
      if (block >= range_.first && block - range_.first < range_.count)
        gen_[block - range_.first] = hist.issued;
    next_flush_id_ = previous->next_flush_id;
  }

  Result<std::unique_ptr<JournalWriter>> j =
      previous ? JournalWriter::open_append(opt_.journal, *previous)
               : JournalWriter::create(opt_.journal, JournalHeader{bs_, seed_, export_size_, 0});
  if (!j) return j.status();
  journal_ = std::move(*j);
  journal_->add(RecordType::kRunStart, range_.first, range_.count);
  journal_connection();
  if (Status s = journal_->sync(); !s) return s;

  // The run's own random stream: the seed, and which run of the journal this is.
  rng_.seed(mix64(seed_ ^ (previous ? previous->runs + 1 : 1)));

  const unsigned depth = static_cast<unsigned>(std::min<uint64_t>(opt_.queue_depth, range_.count));
  if (depth < opt_.queue_depth)
    warn("queue depth {} limited to {}: the region has only {} blocks", opt_.queue_depth, depth, range_.count);
  slots_.resize(depth);
  for (uint32_t i = 0; i < depth; ++i) {
    slots_[i].owner = this;
    slots_[i].index = i;
    slots_[i].buf.resize(bs_);
    free_slots_.push_back(depth - 1 - i);
  }
  completed_.reserve(depth * 2);

  if (opt_.rate > 0) {
    burst_ = std::max(1.0, opt_.rate / 100.0);  // 10 ms worth of writes
    tokens_ = 1;
  }
  return install_signals();
}

std::optional<uint64_t> Workload::pick_block() {
  const uint64_t n = range_.count;
  for (int attempt = 0; attempt < 32; ++attempt) {
    uint64_t i = 0;
    switch (pattern_.kind) {
      case Pattern::Kind::kRandom:
        i = std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_);
        break;
      case Pattern::Kind::kSequential:
        i = seq_cursor_;
        seq_cursor_ = (seq_cursor_ + 1) % n;
        break;
      case Pattern::Kind::kHot: {
        bool hot = hot_blocks_ == n ||
                   std::uniform_real_distribution<double>(0, 1)(rng_) < pattern_.hot_probability;
        i = hot ? std::uniform_int_distribution<uint64_t>(0, hot_blocks_ - 1)(rng_)
                : std::uniform_int_distribution<uint64_t>(hot_blocks_, n - 1)(rng_);
        break;
      }
    }
    if (!busy_[i]) return i;
  }
  return std::nullopt;
}

bool Workload::want_new_writes() const {
  return !stop_new_ && fatal_.empty() && !switch_target_ && !disconnected_ &&
         !(opt_.count && issued_new_ >= *opt_.count);
}

void Workload::issue_write(Slot& s) {
  s.done = false;
  s.error = 0;
  s.state = Slot::State::kInFlight;
  s.issued_at = Clock::now();
  in_flight_++;
  uint32_t flags = s.fua && can_fua_ ? LIBNBD_CMD_FLAG_FUA : 0;
  nbd_completion_callback cb{.callback = on_write_done, .user_data = &s, .free = nullptr};
  int64_t cookie = nbd_aio_pwrite(h_.get(), s.buf.data(), bs_, s.block * bs_, cb, flags);
  std::string why = "the connection died while sending";
  if (cookie == -1) {
    const int err = nbd_get_errno() ? nbd_get_errno() : EIO;
    why = nbd_last_error();
    if (!s.done) {
      // Not queued, so never sent: nothing to journal.
      in_flight_--;
      on_write_error(s, err, /*sent=*/false, why);
    }
  }
  // Sending can find the connection dead (libnbd then fails every command in flight).
  if (nbd_aio_is_dead(h_.get()) || nbd_aio_is_closed(h_.get())) connection_lost(why);
}

void Workload::issue_flush() {
  flush_ = Flush{};
  flush_.in_flight = true;
  flush_.id = next_flush_id_++;
  journal_->add(RecordType::kFlushIssued, flush_.id);
  acked_since_flush_ = 0;
  nbd_completion_callback cb{.callback = on_flush_done, .user_data = this, .free = nullptr};
  if (nbd_aio_flush(h_.get(), cb, 0) == -1 && !flush_.done) {
    flush_.in_flight = false;
    flush_failures_++;
    warn("flush to {} not sent: {}", uri_, nbd_last_error());
  }
}

void Workload::issue_work() {
  if (!h_ || switch_target_ || disconnected_) return;
  const auto now = Clock::now();

  // Retries first: they are older than anything new.
  if (retry_waiting_ && fatal_.empty()) {
    for (Slot& s : slots_) {
      if (!h_) break;
      if (s.state == Slot::State::kRetryWait && s.retry_at <= now) {
        retry_waiting_--;
        retries_++;
        issue_write(s);
      }
    }
  }

  // New writes, within the queue depth and the rate.
  if (opt_.rate > 0) {
    tokens_ = std::min(burst_, tokens_ + opt_.rate * seconds_between(last_refill_, now));
    last_refill_ = now;
  }
  while (h_ && want_new_writes() && !free_slots_.empty() && (opt_.rate <= 0 || tokens_ >= 1)) {
    auto pick = pick_block();
    if (!pick) break;  // every candidate is busy: wait for a completion
    Slot& s = slots_[free_slots_.back()];
    free_slots_.pop_back();
    busy_[*pick] = 1;
    s.block = range_.first + *pick;
    s.generation = ++gen_[*pick];
    issued_new_++;
    s.fua = opt_.fua_every && issued_new_ % opt_.fua_every == 0;
    s.failing = false;
    s.failure_journalled = false;
    s.attempts = 0;
    encode_block(BlockId{s.block, s.generation, seed_}, s.buf);
    if (opt_.rate > 0) tokens_ -= 1;
    issue_write(s);
  }

  if (h_ && opt_.flush_every && can_flush_ && !flush_.in_flight && acked_since_flush_ >= opt_.flush_every &&
      fatal_.empty())
    issue_flush();
}

void Workload::on_write_error(Slot& s, int err, bool sent, const std::string& why) {
  const auto now = Clock::now();
  write_errors_++;
  if (sent && !s.failure_journalled) {
    journal_->add(RecordType::kWriteFailed, s.block, s.generation);
    s.failure_journalled = true;
  }
  if (!s.failing) {
    s.failing = true;
    s.first_failure = now;
  }
  s.last_error = err;
  s.attempts++;
  s.state = Slot::State::kRetryWait;
  retry_waiting_++;
  auto backoff = milliseconds(std::min(1000, 50 << std::min(s.attempts, 5u)));
  s.retry_at = now + backoff;
  if (!refusal_logged_) {
    refusal_logged_ = true;
    if (is_refusal(err))
      note("{} refuses writes ({}): holding them for retry after a switch or a backoff (up to {} s)", uri_,
           std::strerror(err), opt_.retry_timeout);
    else
      warn("write to {} failed ({}); retrying for up to {} s", uri_,
           why == std::strerror(err) ? why : fmt::format("{}: {}", std::strerror(err), why), opt_.retry_timeout);
  }
  if (seconds_between(s.first_failure, now) > opt_.retry_timeout)
    fatal(fmt::format("write of block {} (generation {}) not acknowledged after {} s of retries: {}", s.block,
                      s.generation, opt_.retry_timeout, std::strerror(err)));
}

void Workload::process_completions() {
  // Callbacks only append; handle them here, outside libnbd.
  for (size_t k = 0; k < completed_.size(); ++k) {
    Slot& s = slots_[completed_[k]];
    if (s.state != Slot::State::kInFlight) continue;
    in_flight_--;
    if (s.error == 0) {
      const auto now = Clock::now();
      const uint64_t ns = static_cast<uint64_t>(duration_cast<nanoseconds>(now - s.issued_at).count());
      journal_->add(s.fua && can_fua_ ? RecordType::kAckFua : RecordType::kAck, s.block, s.generation);
      total_hist_.record(ns);
      interval_hist_.record(ns);
      acked_++;
      interval_acked_++;
      acked_since_flush_++;
      if (s.fua && can_fua_) fua_acked_++;
      busy_[s.block - range_.first] = 0;
      s.state = Slot::State::kFree;
      s.failing = false;
      free_slots_.push_back(s.index);
      refusal_logged_ = false;
    } else {
      on_write_error(s, s.error, /*sent=*/true, std::strerror(s.error));
    }
  }
  completed_.clear();

  if (flush_.in_flight && flush_.done) {
    flush_.in_flight = false;
    if (flush_.error == 0) {
      journal_->add(RecordType::kFlushDone, flush_.id);
      flushes_done_++;
    } else {
      flush_failures_++;
      warn("flush to {} failed: {}", uri_, std::strerror(flush_.error));
    }
  }
}

void Workload::connection_lost(const std::string& why) {
  if (!h_) return;
  warn("connection to {} lost: {}", uri_, why);
  drop_connection();
  disconnected_ = true;
  lost_at_ = Clock::now();
  next_reconnect_ = lost_at_ + milliseconds(200);
  reconnect_failure_logged_ = false;
}

void Workload::drop_connection() {
  h_.reset();  // nbd_close: may still run completion callbacks
  process_completions();
  for (Slot& s : slots_) {
    if (s.state == Slot::State::kInFlight) {
      in_flight_--;
      on_write_error(s, ENOTCONN, /*sent=*/true, "connection lost");
    }
  }
  if (flush_.in_flight) {
    flush_.in_flight = false;
    flush_failures_++;
  }
}

void Workload::try_reconnect() {
  const auto now = Clock::now();
  if (!disconnected_ || now < next_reconnect_) return;
  const std::string target = switch_target_ ? *switch_target_ : uri_;
  auto c = nbd_connect(target);
  if (!c) {
    if (seconds_between(lost_at_, now) > opt_.retry_timeout) {
      fatal(fmt::format("no usable server for {} s: {}", opt_.retry_timeout, c.status().message()));
      return;
    }
    if (!reconnect_failure_logged_) {
      warn("{}; retrying for up to {} s", c.status().message(), opt_.retry_timeout);
      reconnect_failure_logged_ = true;
    }
    next_reconnect_ = now + milliseconds(500);
    return;
  }
  if (c->size != export_size_) {
    fatal(fmt::format("{} exports {} bytes, but the workload runs on {} bytes", target, c->size, export_size_));
    return;
  }
  disconnected_ = false;
  const std::string previous = uri_;
  uri_ = target;
  adopt(std::move(*c));
  journal_connection();
  if (switch_target_) complete_switch(target);
  else note("reconnected to {}", uri_);
  for (Slot& s : slots_)
    if (s.state == Slot::State::kRetryWait) s.retry_at = now;
}

void Workload::poll_switch_file(bool forced) {
  if (opt_.switch_file.empty()) {
    if (forced) warn("SIGUSR1 ignored: no --switch-file given");
    return;
  }
  std::ifstream in(opt_.switch_file);
  if (!in) {
    if (forced) warn("SIGUSR1: cannot read switch file {}", opt_.switch_file);
    return;
  }
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto nl = content.find('\n');
  if (nl == std::string::npos && !forced && content != unterminated_switch_line_) {
    // Maybe still being written: take a line without newline only once it
    // has stayed the same for one polling period (or on SIGUSR1).
    unterminated_switch_line_ = content;
    return;
  }
  unterminated_switch_line_.clear();
  std::string line = content.substr(0, nl);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
  while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.erase(0, 1);
  if (line.empty() || line == uri_ || (switch_target_ && line == *switch_target_)) {
    if (forced) note("SIGUSR1: switch file names no new server");
    return;
  }
  if (!fatal_.empty()) return;
  if (!switch_target_) {
    switch_requested_at_ = Clock::now();
    switch_drained_ = in_flight_;
  }
  switch_target_ = line;
  note("switching to {}: draining {} in-flight write(s) from {}", line, in_flight_, uri_);
}

void Workload::maybe_finish_switch() {
  if (!switch_target_ || in_flight_ > 0 || flush_.in_flight || disconnected_) return;
  // Nothing is in flight: every reply came from the old server. Make what it
  // acknowledged durable there, then leave it.
  if (h_) {
    if (can_flush_) {
      const uint64_t id = next_flush_id_++;
      journal_->add(RecordType::kFlushIssued, id);
      if (nbd_flush(h_.get(), 0) == 0) {
        journal_->add(RecordType::kFlushDone, id);
        flushes_done_++;
      } else {
        flush_failures_++;
        warn("flush to {} before the switch failed: {}", uri_, nbd_last_error());
      }
      if (Status st = journal_->sync(); !st) {
        fatal(st.message());
        return;
      }
    }
    nbd_shutdown(h_.get(), 0);
    h_.reset();
  }
  // From here on the reconnect path owns it: try at once.
  disconnected_ = true;
  lost_at_ = Clock::now();
  next_reconnect_ = lost_at_;
  reconnect_failure_logged_ = false;
  try_reconnect();
}

void Workload::complete_switch(const std::string& to) {
  const auto now = Clock::now();
  SwitchRecord r;
  r.to = to;
  r.from = switches_.empty() ? initial_uri_ : switches_.back().to;
  r.pause_ms = seconds_between(switch_requested_at_, now) * 1000.0;
  r.drained = switch_drained_;
  switches_.push_back(r);
  switch_target_.reset();
  journal_->add(RecordType::kSwitch, switches_.size());
  note("switched to {} (pause {:.1f} ms, {} in-flight write(s) drained, {} held for retry)", to, r.pause_ms,
       r.drained, retry_waiting_);
  const std::string done = opt_.switch_file + ".done";
  int fd = ::open(done.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  std::string line = fmt::format("switched {}\n", to);
  if (fd < 0 || ::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
    warn("cannot write {}: {}", done, std::strerror(errno));
  if (fd >= 0) ::close(fd);
  refusal_logged_ = false;
}

void Workload::handle_signals() {
  signalfd_siginfo si;
  while (::read(sigfd_, &si, sizeof si) == sizeof si) {
    const int sig = static_cast<int>(si.ssi_signo);
    if (sig == SIGUSR1) {
      poll_switch_file(/*forced=*/true);
    } else if (!interrupted_) {
      interrupted_ = true;
      stop_new_ = true;
      note("{}: stopping after {} in-flight write(s) complete (again to stop at once)", strsignal(sig), in_flight_);
    } else if (h_) {
      // Second signal: do not wait for the server. In-flight writes are
      // journalled as WRITE_FAILED (they may or may not have landed).
      fatal(fmt::format("{} again: stopping without waiting for {} in-flight write(s)", strsignal(sig), in_flight_));
      drop_connection();
    }
  }
}

void Workload::fatal(const std::string& why) {
  if (!fatal_.empty()) return;
  fatal_ = why;
  stop_new_ = true;
  error("{}", why);
}

bool Workload::finished() const {
  if (in_flight_ > 0 || flush_.in_flight) return false;
  if (!fatal_.empty() || interrupted_) return true;  // retries are abandoned
  if (retry_waiting_ > 0 || switch_target_) return false;
  if (stop_new_) return true;
  return opt_.count && issued_new_ >= *opt_.count;
}

int Workload::poll_timeout_ms() const {
  const auto now = Clock::now();
  auto until = now + milliseconds(100);  // switch file polling, duration end
  if (opt_.stats_interval > 0) until = std::min(until, next_stats_);
  if (disconnected_) until = std::min(until, next_reconnect_);
  if (retry_waiting_)
    for (const Slot& s : slots_)
      if (s.state == Slot::State::kRetryWait) until = std::min(until, s.retry_at);
  if (opt_.rate > 0 && tokens_ < 1 && !free_slots_.empty() && want_new_writes())
    until = std::min(until, now + duration_cast<Clock::duration>(duration<double>((1 - tokens_) / opt_.rate)));
  if (until <= now) return 0;
  return static_cast<int>(std::ceil(duration<double, std::milli>(until - now).count()));
}

void Workload::print_stats(bool force) {
  const auto now = Clock::now();
  if (!force && (opt_.stats_interval <= 0 || now < next_stats_)) return;
  const double dt = seconds_between(last_stats_, now);
  std::string extra;
  if (retry_waiting_) extra += fmt::format("  retrying {}", retry_waiting_);
  if (switch_target_) extra += "  (switching)";
  if (disconnected_) extra += "  (disconnected)";
  const bool any = interval_hist_.count() > 0;
  note("[{:7.1f} s] acked {}  {:.0f} IOPS  p50 {}  p99 {}  uri {}{}", seconds_between(start_, now), acked_,
       dt > 0 ? static_cast<double>(interval_acked_) / dt : 0.0,
       any ? format_ms(interval_hist_.percentile(0.5)) : "-", any ? format_ms(interval_hist_.percentile(0.99)) : "-",
       uri_, extra);
  interval_hist_.reset();
  interval_acked_ = 0;
  last_stats_ = now;
  while (next_stats_ <= now) next_stats_ += duration_cast<Clock::duration>(duration<double>(opt_.stats_interval));
}

void Workload::finish_journal(bool ok) {
  journal_->add(RecordType::kRunEnd, ok ? 0 : 1, acked_);
  if (Status st = journal_->sync(); !st) {
    error("{}", st.message());
    fatal_ = fatal_.empty() ? st.message() : fatal_;
  }
}

void Workload::report(double elapsed) {
  const double iops = elapsed > 0 ? static_cast<double>(acked_) / elapsed : 0;
  std::string sw;
  for (const auto& s : switches_) sw += fmt::format("{}{:.1f} ms", sw.empty() ? "" : ", ", s.pause_ms);
  note("done in {:.2f} s: {} writes acknowledged ({:.0f} IOPS), latency p50 {} p99 {} max {}; {} FUA, {} "
       "flushes, {} write errors, {} retries; {} switch(es){}",
       elapsed, acked_, iops, format_ms(total_hist_.percentile(0.5)), format_ms(total_hist_.percentile(0.99)),
       format_ms(total_hist_.max()), fua_acked_, flushes_done_, write_errors_, retries_, switches_.size(),
       sw.empty() ? "" : " (pause " + sw + ")");
  if (opt_.json_out.empty()) return;
  nlohmann::json j;
  j["ok"] = fatal_.empty() && abandoned_ == 0;
  j["error"] = fatal_;
  j["uri_initial"] = initial_uri_;
  j["uri_final"] = uri_;
  j["journal"] = opt_.journal;
  j["seed"] = seed_;
  j["block_size"] = bs_;
  j["first_block"] = range_.first;
  j["blocks"] = range_.count;
  j["pattern"] = opt_.pattern_text;
  j["queue_depth"] = slots_.size();
  j["rate"] = opt_.rate;
  j["elapsed_s"] = elapsed;
  j["writes_issued"] = issued_new_;
  j["writes_acked"] = acked_;
  j["fua_acked"] = fua_acked_;
  j["flushes"] = flushes_done_;
  j["flush_failures"] = flush_failures_;
  j["write_errors"] = write_errors_;
  j["retries"] = retries_;
  j["writes_abandoned"] = abandoned_;
  j["iops"] = iops;
  auto ms = [](uint64_t ns) { return static_cast<double>(ns) / 1e6; };
  j["latency_ms"] = {{"p50", ms(total_hist_.percentile(0.5))},
                     {"p90", ms(total_hist_.percentile(0.9))},
                     {"p99", ms(total_hist_.percentile(0.99))},
                     {"p999", ms(total_hist_.percentile(0.999))},
                     {"max", ms(total_hist_.max())},
                     {"mean", total_hist_.mean() / 1e6}};
  j["switches"] = nlohmann::json::array();
  for (const auto& s : switches_)
    j["switches"].push_back({{"from", s.from}, {"to", s.to}, {"pause_ms", s.pause_ms}, {"drained", s.drained}});
  std::ofstream out(opt_.json_out);
  out << j.dump(2) << "\n";
  if (!out) warn("cannot write {}", opt_.json_out);
}

int Workload::run() {
  if (Status st = setup(); !st) {
    error("{}", st.message());
    return kExitUsage;
  }
  note("writing {} blocks of {} bytes from block {} on {} (seed {:#x}, pattern {}, queue depth {}, rate {})",
       range_.count, bs_, range_.first, uri_, seed_, opt_.pattern_text, slots_.size(),
       opt_.rate > 0 ? fmt::format("{:.0f}/s", opt_.rate) : std::string("unthrottled"));

  start_ = last_stats_ = last_refill_ = Clock::now();
  next_stats_ = start_ + duration_cast<Clock::duration>(duration<double>(opt_.stats_interval));
  next_switch_poll_ = start_;
  const auto deadline =
      opt_.duration ? start_ + duration_cast<Clock::duration>(duration<double>(*opt_.duration)) : Clock::time_point::max();

  for (;;) {
    auto now = Clock::now();
    if (now >= deadline && !stop_new_) stop_new_ = true;
    if (now >= next_switch_poll_) {
      poll_switch_file(false);
      next_switch_poll_ = now + milliseconds(100);
    }
    maybe_finish_switch();
    try_reconnect();
    issue_work();
    if (finished()) break;
    if (Status st = journal_->sync_wanted() ? journal_->sync() : journal_->write_out(); !st) fatal(st.message());
    if (!fatal_.empty() && !h_) break;

    pollfd fds[2];
    nfds_t n = 0;
    fds[n++] = pollfd{sigfd_, POLLIN, 0};
    if (h_) {
      int fd = nbd_aio_get_fd(h_.get());
      unsigned dir = static_cast<unsigned>(nbd_aio_get_direction(h_.get()));
      short ev = 0;
      if (dir & LIBNBD_AIO_DIRECTION_READ) ev |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) ev |= POLLOUT;
      if (fd >= 0) fds[n++] = pollfd{fd, ev, 0};
    }
    int r = ::poll(fds, n, poll_timeout_ms());
    if (r < 0 && errno != EINTR) {
      fatal(fmt::format("poll: {}", std::strerror(errno)));
      break;
    }
    if (r > 0 && (fds[0].revents & POLLIN)) handle_signals();
    if (r > 0 && n > 1 && h_) {
      int rc = 0;
      if (fds[1].revents & (POLLIN | POLLHUP | POLLERR))
        rc = nbd_aio_notify_read(h_.get());
      else if (fds[1].revents & POLLOUT)
        rc = nbd_aio_notify_write(h_.get());
      else if (fds[1].revents & POLLNVAL)
        rc = -1;
      if (rc == -1 || nbd_aio_is_dead(h_.get()) || nbd_aio_is_closed(h_.get())) {
        std::string why = rc == -1 ? nbd_last_error() : std::string("server closed the connection");
        process_completions();
        connection_lost(why);
      }
    }
    process_completions();
    print_stats(false);
  }

  // Retries still waiting are abandoned (interrupted or fatal): they are in the
  // journal as WRITE_FAILED if they were ever sent.
  for (Slot& s : slots_)
    if (s.state == Slot::State::kRetryWait) abandoned_++;
  if (abandoned_) warn("{} write(s) never acknowledged (abandoned)", abandoned_);

  // A last flush so that everything acknowledged is durable.
  if (h_ && fatal_.empty() && can_flush_ && opt_.final_flush) {
    const uint64_t id = next_flush_id_++;
    journal_->add(RecordType::kFlushIssued, id);
    if (nbd_flush(h_.get(), 0) == 0) {
      journal_->add(RecordType::kFlushDone, id);
      flushes_done_++;
    } else {
      flush_failures_++;
      warn("final flush to {} failed: {}", uri_, nbd_last_error());
    }
  }
  if (h_) nbd_shutdown(h_.get(), 0);
  const double elapsed = seconds_between(start_, Clock::now());
  finish_journal(fatal_.empty() && abandoned_ == 0);
  report(elapsed);
  h_.reset();
  return fatal_.empty() && abandoned_ == 0 ? kExitOk : kExitFailed;
}

}  // namespace

int run_write(const WriteOptions& options) {
  Workload w(options);
  return w.run();
}

}  // namespace livemig::workload
