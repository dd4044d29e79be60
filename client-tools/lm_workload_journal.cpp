#include "client-tools/lm_workload_journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <ctime>
#include <functional>

#include <fmt/format.h>

#include "common/byte_order.h"

#include "client-tools/lm_workload_block.h"

namespace livemig::workload {
namespace {

void put64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

uint64_t header_checksum(const uint8_t* h) {
  uint64_t c = 0x4c4d574c4a524e31ULL;
  for (int w = 0; w < 7; ++w) c = mix64(c ^ load_le64(h + 8 * w));
  return c;
}

uint32_t record_check(uint32_t type, uint64_t a, uint64_t b) {
  return static_cast<uint32_t>(mix64(mix64(type ^ 0x5bd1e995ULL) ^ a) ^ mix64(b + 0x9e3779b97f4a7c15ULL));
}

std::string errno_text(int err) { return std::strerror(err); }

Status write_all(int fd, const uint8_t* data, size_t len, const std::string& path) {
  while (len > 0) {
    ssize_t n = ::write(fd, data, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::error(fmt::format("journal {}: write: {}", path, errno_text(errno)), errno);
    }
    data += n;
    len -= static_cast<size_t>(n);
  }
  return Status::ok();
}

struct RawRecord {
  uint32_t type;
  uint64_t a;
  uint64_t b;
};

// Reads the header and calls `fn` for each good record; counts a torn tail.
Status scan(const std::string& path, JournalSummary& s,
            const std::function<void(uint64_t index, const RawRecord&)>& fn) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(fmt::format("cannot open journal {}: {}", path, errno_text(errno)), errno);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};

  uint8_t h[kJournalHeaderSize];
  size_t got = 0;
  while (got < sizeof h) {
    ssize_t n = ::read(fd, h + got, sizeof h - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::error(fmt::format("journal {}: read: {}", path, errno_text(errno)), errno);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got < sizeof h)
    return Status::error(fmt::format("journal {} is too short to be an lm-workload journal", path));
  if (load_le64(h) != kJournalMagic)
    return Status::error(fmt::format("{} is not an lm-workload journal (bad magic)", path));
  if (load_le32(h + 8) == 1)
    return Status::error(fmt::format(
        "journal {} has version 1, which does not record connections, so the writes a flush made durable "
        "cannot be told from those a killed server lost; start a new journal (write --overwrite)",
        path));
  if (load_le32(h + 8) != kJournalVersion)
    return Status::error(fmt::format("journal {} has unsupported version {}", path, load_le32(h + 8)));
  if (load_le32(h + 12) != kJournalHeaderSize || load_le32(h + 20) != kJournalRecordSize ||
      load_le64(h + 56) != header_checksum(h))
    return Status::error(fmt::format("journal {} has a corrupt header", path));
  s.header.block_size = load_le32(h + 16);
  s.header.seed = load_le64(h + 24);
  s.header.export_size = load_le64(h + 32);
  s.header.created = load_le64(h + 40);

  std::vector<uint8_t> buf(kJournalRecordSize * 4096);
  size_t have = 0;
  uint64_t index = 0;
  uint64_t good_bytes = kJournalHeaderSize;
  uint64_t bad_bytes = 0;  // bytes since the first bad record
  for (;;) {
    ssize_t n = ::read(fd, buf.data() + have, buf.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::error(fmt::format("journal {}: read: {}", path, errno_text(errno)), errno);
    have += static_cast<size_t>(n);
    size_t off = 0;
    while (have - off >= kJournalRecordSize) {
      const uint8_t* r = buf.data() + off;
      RawRecord rec{load_le32(r), load_le64(r + 8), load_le64(r + 16)};
      bool good = load_le32(r + 4) == record_check(rec.type, rec.a, rec.b) && rec.type >= 1 &&
                  rec.type <= static_cast<uint32_t>(RecordType::kConnect);
      if (good && bad_bytes > 0)
        return Status::error(fmt::format(
            "journal {} is corrupt: bad record at byte {} followed by good ones", path, good_bytes));
      if (good) {
        fn(index++, rec);
        good_bytes += kJournalRecordSize;
      } else {
        bad_bytes += kJournalRecordSize;
      }
      off += kJournalRecordSize;
    }
    std::memmove(buf.data(), buf.data() + off, have - off);
    have -= off;
    if (n == 0) break;
  }
  s.records = index;
  s.valid_bytes = good_bytes;
  s.torn_tail_bytes = bad_bytes + have;
  return Status::ok();
}

}  // namespace

Result<JournalSummary> read_journal(const std::string& path) {
  // Pass 1: per connection epoch (records from one CONNECT to the next; epoch 0
  // is before the first), the FLUSH_ISSUED record of its latest flush that
  // completed in the same epoch.
  JournalSummary s;
  struct IssuedFlush {
    uint64_t index;
    uint64_t epoch;
  };
  std::unordered_map<uint64_t, IssuedFlush> issued_flushes;
  std::vector<uint64_t> covered_before{0};  // per epoch: its ACK records with index < this are covered
  Status st = scan(path, s, [&](uint64_t index, const RawRecord& r) {
    const uint64_t epoch = covered_before.size() - 1;
    switch (static_cast<RecordType>(r.type)) {
      case RecordType::kConnect:
        covered_before.push_back(0);
        break;
      case RecordType::kFlushIssued:
        issued_flushes[r.a] = IssuedFlush{index, epoch};
        break;
      case RecordType::kFlushDone:
        if (auto it = issued_flushes.find(r.a); it != issued_flushes.end() && it->second.epoch == epoch)
          covered_before[epoch] = std::max(covered_before[epoch], it->second.index);
        break;
      default:
        break;
    }
  });
  if (!st) return st;

  // Pass 2: per-block histories and counters.
  JournalSummary out;
  uint64_t epoch = 0;
  st = scan(path, out, [&](uint64_t index, const RawRecord& r) {
    switch (static_cast<RecordType>(r.type)) {
      case RecordType::kConnect:
        epoch++;
        out.connections++;
        break;
      case RecordType::kRunStart:
        out.runs++;
        out.last_run_ended = false;
        break;
      case RecordType::kAck:
      case RecordType::kAckFua: {
        bool fua = static_cast<RecordType>(r.type) == RecordType::kAckFua;
        BlockHistory& b = out.blocks[r.a];
        b.acked = std::max(b.acked, r.b);
        b.issued = std::max(b.issued, r.b);
        if (fua || index < covered_before[epoch]) b.durable = std::max(b.durable, r.b);
        out.acks++;
        if (fua) out.fua_acks++;
        break;
      }
      case RecordType::kWriteFailed: {
        BlockHistory& b = out.blocks[r.a];
        b.issued = std::max(b.issued, r.b);
        out.failed_writes++;
        break;
      }
      case RecordType::kFlushIssued:
        out.flushes_issued++;
        out.next_flush_id = std::max(out.next_flush_id, r.a + 1);
        break;
      case RecordType::kFlushDone:
        out.flushes_done++;
        break;
      case RecordType::kSwitch:
        out.switches++;
        break;
      case RecordType::kRunEnd:
        out.last_run_ended = true;
        if (r.a != 0) out.runs_failed++;
        break;
    }
  });
  if (!st) return st;
  return out;
}

Result<std::unique_ptr<JournalWriter>> JournalWriter::create(const std::string& path,
                                                              const JournalHeader& header) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return Status::error(fmt::format("cannot create journal {}: {}", path, errno_text(errno)), errno);
  std::unique_ptr<JournalWriter> w(new JournalWriter(fd, path));
  std::vector<uint8_t> h;
  put64(h, kJournalMagic);
  put32(h, kJournalVersion);
  put32(h, kJournalHeaderSize);
  put32(h, header.block_size);
  put32(h, kJournalRecordSize);
  put64(h, header.seed);
  put64(h, header.export_size);
  put64(h, header.created ? header.created : static_cast<uint64_t>(std::time(nullptr)));
  put64(h, 0);
  put64(h, header_checksum(h.data()));
  if (Status st = write_all(fd, h.data(), h.size(), path); !st) return st;
  if (::fsync(fd) != 0)
    return Status::error(fmt::format("journal {}: fsync: {}", path, errno_text(errno)), errno);
  // Make the new directory entry durable too.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? std::string(".") : path.substr(0, std::max<size_t>(slash, 1));
  if (int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return w;
}

Result<std::unique_ptr<JournalWriter>> JournalWriter::open_append(const std::string& path,
                                                                   const JournalSummary& summary) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0)
    return Status::error(fmt::format("cannot open journal {}: {}", path, errno_text(errno)), errno);
  std::unique_ptr<JournalWriter> w(new JournalWriter(fd, path));
  if (summary.torn_tail_bytes > 0 && ::ftruncate(fd, static_cast<off_t>(summary.valid_bytes)) != 0)
    return Status::error(fmt::format("journal {}: truncating torn tail: {}", path, errno_text(errno)), errno);
  if (::lseek(fd, 0, SEEK_END) < 0)
    return Status::error(fmt::format("journal {}: seek: {}", path, errno_text(errno)), errno);
  return w;
}

JournalWriter::~JournalWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void JournalWriter::add(RecordType type, uint64_t a, uint64_t b) {
  auto t = static_cast<uint32_t>(type);
  put32(buffer_, t);
  put32(buffer_, record_check(t, a, b));
  put64(buffer_, a);
  put64(buffer_, b);
  if (type == RecordType::kAckFua || type == RecordType::kFlushDone) sync_wanted_ = true;
}

Status JournalWriter::write_out() {
  if (buffer_.empty()) return Status::ok();
  Status st = write_all(fd_, buffer_.data(), buffer_.size(), path_);
  buffer_.clear();
  return st;
}

Status JournalWriter::sync() {
  if (Status st = write_out(); !st) return st;
  if (::fdatasync(fd_) != 0)
    return Status::error(fmt::format("journal {}: fdatasync: {}", path_, errno_text(errno)), errno);
  sync_wanted_ = false;
  return Status::ok();
}

}  // namespace livemig::workload
