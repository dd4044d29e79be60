// faultfs: a passthrough FUSE file system whose disk fails on command, for
// tests that need a destination disk to fail (dm-flakey is not available).
//
//   mkdir -p /tmp/back /tmp/mnt && echo 'fsync eio-once' > /tmp/faults
//   faultfs /tmp/back /tmp/mnt --faults /tmp/faults -f &
//   ... (the first fsync under /tmp/mnt fails with EIO) ...
//   fusermount3 -u /tmp/mnt
//
// Design notes
//
// Passthrough. Every path is resolved relative to an fd of BACKING_DIR
// (openat and friends), so faultfs never depends on its working directory.
// An open file's handle (fi->fh) is its backing fd; operations on an open
// file use that fd, so they keep working after the file is renamed or
// unlinked (hard_remove: an unlinked open file is not renamed to
// .fuse_hidden*, its operations get a NULL path).
//
// Kernel caching. The writeback cache is turned off in init(): every write()
// reaches write() below before it returns, so an injected write error is that
// write's error. Attribute and entry timeouts are 0 because BACKING_DIR may be
// changed behind faultfs's back (tests look at the backing files).
//
// Locks. There is no flock (or POSIX lock) operation on purpose: without one
// the kernel keeps flock() locks locally, per open file description, which is
// exactly flock's semantics for every process using this mount.
//
// Faults. The faults file is looked at (stat) by every operation that can
// fail on command; it is read again when its inode, size or mtime change (a
// writer that replaces it with the same size within one clock tick should set
// a new mtime; tests/faults/faultfs.py does). A missing file means no faults;
// a file that does not parse is reported on stderr, counted as
// bad-faults-file, and means no faults. Reading a file again re-arms its
// "eio-once" rules. Each injected fault is one line on stderr and one count in
// FILE.stats, rewritten (atomically) whenever a count changes.
//
// Space. "space BYTES" caps the blocks of all regular files below
// BACKING_DIR (st_blocks * 512, summed by walking the tree at each allocating
// write while such a rule is active; a file that is unlinked but still open is
// not counted). A write or fallocate whose range has blocks that are not yet
// allocated (SEEK_DATA/SEEK_HOLE on the backing fd) fails with ENOSPC, all of
// it, if those blocks would take the total past BYTES. statfs reports the cap.
//
// libfuse 3.14's fuse_main() prints "Ignoring invalid max threads value
// 4294967295 > max (100000)." at start: harmless (libfuse issue #1003), the
// default thread limit applies.

#define FUSE_USE_VERSION 35
#include <fuse.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

constexpr const char* kUsage =
    "Usage: faultfs BACKING_DIR MOUNTPOINT --faults FILE [--exit-with-parent] [FUSE options]\n"
    "       faultfs --check-faults FILE\n"
    "\n"
    "Example: faultfs /tmp/back /tmp/mnt --faults /tmp/faults -f\n"
    "\n"
    "Mounts a passthrough of BACKING_DIR on MOUNTPOINT that injects the faults\n"
    "listed in FILE (read again whenever it changes; missing = no faults) and\n"
    "keeps counts of injected faults in FILE.stats. One fault a line, '#' starts\n"
    "a comment, each optionally limited to files whose path ends with SUFFIX:\n"
    "  fsync eio [path=SUFFIX]        every fsync/fdatasync fails with EIO\n"
    "  fsync eio-once [path=SUFFIX]   the next fsync/fdatasync fails with EIO\n"
    "  write eio [path=SUFFIX]        every write fails with EIO\n"
    "  space BYTES [path=SUFFIX]      files below BACKING_DIR may allocate at most\n"
    "                                 BYTES (suffix K, M, G, T: powers of 1024);\n"
    "                                 beyond, writes and fallocate fail with ENOSPC\n"
    "  delay-fsync MS [path=SUFFIX]   each fsync/fdatasync sleeps MS milliseconds\n"
    "\n"
    "--exit-with-parent  exit (and unmount) when the parent process dies; use with -f\n"
    "--check-faults FILE parse FILE, print what is wrong, exit 0 if it is valid\n";

// ---------------------------------------------------------------------------
// Fault rules: the faults file's syntax.

enum class FaultKind { FsyncEio, FsyncEioOnce, WriteEio, Space, DelayFsync };
constexpr size_t kFaultKinds = 5;

// The name of each kind in FILE.stats and in log lines.
constexpr std::array<const char*, kFaultKinds> kFaultNames = {"fsync-eio", "fsync-eio-once", "write-eio", "space",
                                                             "delay-fsync"};

const char* name_of(FaultKind k) { return kFaultNames[static_cast<size_t>(k)]; }

struct FaultRule {
  FaultKind kind;
  uint64_t value = 0;       // space: bytes; delay-fsync: milliseconds
  std::string path_suffix;  // empty: every file
  int line = 0;             // in the faults file
};

// True if the rule applies to a file at `path` (NULL: an unlinked file, which
// only rules without a path filter match).
bool matches(const FaultRule& r, const char* path) {
  if (r.path_suffix.empty()) return true;
  if (path == nullptr) return false;
  return std::string_view(path).ends_with(r.path_suffix);
}

// Parses "123" into *out, and with `suffixes` also "64K", "1M", "2G", "1T"
// (powers of 1024).
bool parse_number(std::string_view s, bool suffixes, uint64_t* out) {
  uint64_t scale = 1;
  if (suffixes && !s.empty()) {
    switch (s.back()) {
      case 'K': case 'k': scale = uint64_t{1} << 10; break;
      case 'M': case 'm': scale = uint64_t{1} << 20; break;
      case 'G': case 'g': scale = uint64_t{1} << 30; break;
      case 'T': case 't': scale = uint64_t{1} << 40; break;
      default: break;
    }
    if (scale != 1) s.remove_suffix(1);
  }
  if (s.empty() || s.size() > 19 || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  uint64_t v = std::stoull(std::string(s));
  if (v > UINT64_MAX / scale) return false;
  *out = v * scale;
  return true;
}

struct ParsedFaults {
  std::vector<FaultRule> rules;
  std::string error;  // empty if the text parsed
};

// Parses the faults file's text; on the first bad line, returns its error
// ("line N: ...") and no rules.
ParsedFaults parse_faults(const std::string& text) {
  ParsedFaults out;
  std::istringstream in(text);
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (auto hash = line.find('#'); hash != std::string::npos) line.erase(hash);
    std::istringstream words(line);
    std::vector<std::string> w;
    for (std::string word; words >> word;) w.push_back(word);
    if (w.empty()) continue;
    auto fail = [&](const std::string& why) {
      out.rules.clear();
      out.error = "line " + std::to_string(n) + ": " + why;
      return out;
    };
    FaultRule r{FaultKind::FsyncEio, 0, {}, n};
    if (w.size() < 2) return fail("'" + w[0] + "' needs an argument");
    if (w[0] == "fsync" && w[1] == "eio") {
      r.kind = FaultKind::FsyncEio;
    } else if (w[0] == "fsync" && w[1] == "eio-once") {
      r.kind = FaultKind::FsyncEioOnce;
    } else if (w[0] == "write" && w[1] == "eio") {
      r.kind = FaultKind::WriteEio;
    } else if (w[0] == "space") {
      r.kind = FaultKind::Space;
      if (!parse_number(w[1], true, &r.value)) return fail("space: bad size '" + w[1] + "'");
    } else if (w[0] == "delay-fsync") {
      r.kind = FaultKind::DelayFsync;
      if (!parse_number(w[1], false, &r.value)) return fail("delay-fsync: bad milliseconds '" + w[1] + "'");
    } else {
      return fail("unknown fault '" + w[0] + " " + w[1] + "'");
    }
    for (size_t i = 2; i < w.size(); ++i) {
      if (!w[i].starts_with("path=") || w[i].size() == 5 || !r.path_suffix.empty())
        return fail("unexpected '" + w[i] + "' (only one path=SUFFIX may follow)");
      r.path_suffix = w[i].substr(5);
    }
    out.rules.push_back(std::move(r));
  }
  return out;
}

// ---------------------------------------------------------------------------
// The active faults, their counts and FILE.stats.

class Faults {
 public:
  explicit Faults(std::string path) : path_(std::move(path)), stats_path_(path_ + ".stats") {}

  // Writes FILE.stats with every count at zero.
  void start() {
    std::lock_guard lock(mu_);
    write_stats_locked();
  }

  // Sleeps for a matching delay-fsync rule, then returns the error to inject
  // into an fsync of `path` (EIO), or 0 to let it through.
  int before_fsync(const char* path) {
    uint64_t delay_ms = 0;
    {
      std::lock_guard lock(mu_);
      refresh_locked();
      for (const FaultRule& r : rules_) {
        if (r.kind == FaultKind::DelayFsync && matches(r, path)) {
          delay_ms = r.value;
          record_locked(r, "fsync", path);
          break;
        }
      }
    }
    if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    std::lock_guard lock(mu_);
    refresh_locked();
    for (size_t i = 0; i < rules_.size(); ++i) {
      const FaultRule& r = rules_[i];
      if (!matches(r, path)) continue;
      if (r.kind == FaultKind::FsyncEio || (r.kind == FaultKind::FsyncEioOnce && !fired_[i])) {
        fired_[i] = true;
        record_locked(r, "fsync", path);
        return EIO;
      }
    }
    return 0;
  }

  // Returns the error to inject into a write to `path` (EIO), or 0.
  int before_write(const char* path) {
    std::lock_guard lock(mu_);
    refresh_locked();
    for (const FaultRule& r : rules_) {
      if (r.kind == FaultKind::WriteEio && matches(r, path)) {
        record_locked(r, "write", path);
        return EIO;
      }
    }
    return 0;
  }

  // The smallest space cap that applies to `path`, if any (path NULL: only
  // caps without a path filter).
  std::optional<uint64_t> space_limit(const char* path) {
    std::lock_guard lock(mu_);
    refresh_locked();
    std::optional<uint64_t> limit;
    for (const FaultRule& r : rules_)
      if (r.kind == FaultKind::Space && matches(r, path)) limit = std::min(limit.value_or(UINT64_MAX), r.value);
    return limit;
  }

  // Counts and logs an ENOSPC injected by the space cap into `op` on `path`.
  void record_space(const char* op, const char* path, uint64_t limit) {
    std::lock_guard lock(mu_);
    for (const FaultRule& r : rules_) {
      if (r.kind == FaultKind::Space && r.value == limit && matches(r, path)) {
        record_locked(r, op, path);
        return;
      }
    }
  }

 private:
  // Reads the faults file again if it changed since the last look.
  void refresh_locked() {
    struct stat st {};
    bool exists = ::stat(path_.c_str(), &st) == 0;
    Identity now{exists, st.st_dev, st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec};
    if (now == seen_) return;
    seen_ = now;
    rules_.clear();
    if (exists) {
      std::string text;
      if (FILE* f = std::fopen(path_.c_str(), "re")) {
        char buf[4096];
        for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
        std::fclose(f);
      }
      ParsedFaults parsed = parse_faults(text);
      if (!parsed.error.empty()) {
        std::fprintf(stderr, "faultfs: %s: %s; no faults until it changes\n", path_.c_str(), parsed.error.c_str());
        ++bad_files_;
        write_stats_locked();
      }
      rules_ = std::move(parsed.rules);
    }
    fired_.assign(rules_.size(), false);
  }

  // Counts one injection of rule `r` into `op` on `path` and logs it.
  void record_locked(const FaultRule& r, const char* op, const char* path) {
    ++counts_[static_cast<size_t>(r.kind)];
    std::fprintf(stderr, "faultfs: injected %s into %s %s (%s line %d)\n", name_of(r.kind), op,
                 path ? path : "(unlinked file)", path_.c_str(), r.line);
    write_stats_locked();
  }

  // Replaces FILE.stats: "KIND COUNT" lines, then "bad-faults-file COUNT".
  void write_stats_locked() {
    std::string text;
    for (size_t k = 0; k < kFaultKinds; ++k) text += std::string(kFaultNames[k]) + " " + std::to_string(counts_[k]) + "\n";
    text += "bad-faults-file " + std::to_string(bad_files_) + "\n";
    const std::string tmp = stats_path_ + ".tmp";
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    if (fd >= 0) ok = ::close(fd) == 0 && ok;
    if (!ok || ::rename(tmp.c_str(), stats_path_.c_str()) != 0)
      std::fprintf(stderr, "faultfs: cannot write %s: %s\n", stats_path_.c_str(), std::strerror(errno));
  }

  struct Identity {
    bool exists = false;
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    time_t mtime_sec = 0;
    long mtime_nsec = 0;
    bool operator==(const Identity&) const = default;
  };

  const std::string path_;
  const std::string stats_path_;
  std::mutex mu_;
  Identity seen_;                            // GUARDED_BY(mu_)
  std::vector<FaultRule> rules_;             // GUARDED_BY(mu_)
  std::vector<bool> fired_;                  // GUARDED_BY(mu_): per rule, for eio-once
  std::array<uint64_t, kFaultKinds> counts_{};  // GUARDED_BY(mu_)
  uint64_t bad_files_ = 0;                   // GUARDED_BY(mu_)
};

// ---------------------------------------------------------------------------
// Globals: FUSE's high-level callbacks take no context of ours.

int g_backing = -1;          // BACKING_DIR, O_RDONLY | O_DIRECTORY
Faults* g_faults = nullptr;  // set before fuse_main
std::mutex g_space_mu;       // held across the check and the write while a space cap applies

// `path` (always absolute under the mount) relative to BACKING_DIR.
const char* rel(const char* path) { return path[1] != '\0' ? path + 1 : "."; }

// The result of a call that returns -1 and sets errno, as FUSE wants it.
int result(int r) { return r < 0 ? -errno : 0; }

// Sum of st_blocks * 512 of the regular files below directory `dirfd`.
uint64_t allocated_bytes_below(int dirfd) {
  int fd = ::openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return 0;
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    ::close(fd);
    return 0;
  }
  uint64_t total = 0;
  while (struct dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    struct stat st {};
    if (::fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISREG(st.st_mode)) {
      total += static_cast<uint64_t>(st.st_blocks) * 512;
    } else if (S_ISDIR(st.st_mode)) {
      int sub = ::openat(fd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0) {
        total += allocated_bytes_below(sub);
        ::close(sub);
      }
    }
  }
  ::closedir(d);
  return total;
}

// Bytes of [offset, offset + len), widened to whole blocks, that file `fd`
// has no blocks for yet (holes and the part past its end).
uint64_t unallocated_bytes(int fd, off_t offset, off_t len) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return static_cast<uint64_t>(len);
  const off_t bs = st.st_blksize > 0 ? st.st_blksize : 4096;
  off_t pos = offset / bs * bs;
  const off_t end = (offset + len + bs - 1) / bs * bs;
  uint64_t holes = 0;
  while (pos < end) {
    off_t data = ::lseek(fd, pos, SEEK_DATA);
    if (data < 0 && errno != ENXIO) return static_cast<uint64_t>(len);  // no hole map: assume all new
    if (data < 0 || data >= end) {
      holes += end - pos;
      break;
    }
    data = data / bs * bs;
    if (data > pos) holes += data - pos;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) break;
    pos = std::max(pos, (hole + bs - 1) / bs * bs);
  }
  return holes;
}

// Checks an allocating write or fallocate of [offset, offset + len) to `fd`
// (file `path`) against a space cap. Returns 0 or -ENOSPC; while a cap
// applies, *lock holds g_space_mu so that the caller's write is not raced by
// another's check.
int check_space(const char* op, const char* path, int fd, off_t offset, off_t len, std::unique_lock<std::mutex>* lock) {
  std::optional<uint64_t> limit = g_faults->space_limit(path);
  if (!limit) return 0;
  *lock = std::unique_lock(g_space_mu);
  uint64_t more = unallocated_bytes(fd, offset, len);
  if (more == 0) return 0;
  uint64_t used = allocated_bytes_below(g_backing);
  if (used + more <= *limit) return 0;
  g_faults->record_space(op, path, *limit);
  return -ENOSPC;
}

// ---------------------------------------------------------------------------
// FUSE operations, in the order of struct fuse_operations.

int ff_getattr(const char* path, struct stat* st, fuse_file_info* fi) {
  if (fi != nullptr) return result(::fstat(static_cast<int>(fi->fh), st));
  if (path == nullptr) return -ESTALE;
  return result(::fstatat(g_backing, rel(path), st, AT_SYMLINK_NOFOLLOW));
}

int ff_mkdir(const char* path, mode_t mode) { return result(::mkdirat(g_backing, rel(path), mode)); }

int ff_unlink(const char* path) { return result(::unlinkat(g_backing, rel(path), 0)); }

int ff_rmdir(const char* path) { return result(::unlinkat(g_backing, rel(path), AT_REMOVEDIR)); }

int ff_rename(const char* from, const char* to, unsigned int flags) {
  return result(::renameat2(g_backing, rel(from), g_backing, rel(to), flags));
}

int ff_chmod(const char* path, mode_t mode, fuse_file_info* fi) {
  if (fi != nullptr) return result(::fchmod(static_cast<int>(fi->fh), mode));
  return result(::fchmodat(g_backing, rel(path), mode, 0));
}

int ff_truncate(const char* path, off_t size, fuse_file_info* fi) {
  if (fi != nullptr) return result(::ftruncate(static_cast<int>(fi->fh), size));
  int fd = ::openat(g_backing, rel(path), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  int r = result(::ftruncate(fd, size));
  ::close(fd);
  return r;
}

int ff_open(const char* path, fuse_file_info* fi) {
  int fd = ::openat(g_backing, rel(path), fi->flags | O_CLOEXEC);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  return 0;
}

int ff_read(const char* path, char* buf, size_t size, off_t offset, fuse_file_info* fi) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(static_cast<int>(fi->fh), buf + done, size - done, offset + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;  // not a short read: the kernel would take that for end of file
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return static_cast<int>(done);
}

int ff_write(const char* path, const char* buf, size_t size, off_t offset, fuse_file_info* fi) {
  if (int err = g_faults->before_write(path)) return -err;
  const int fd = static_cast<int>(fi->fh);
  std::unique_lock<std::mutex> space_lock;
  if (int r = check_space("write", path, fd, offset, static_cast<off_t>(size), &space_lock)) return r;
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(fd, buf + done, size - done, offset + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    done += static_cast<size_t>(n);
  }
  return static_cast<int>(done);
}

int ff_statfs(const char* path, struct statvfs* st) {
  if (::fstatvfs(g_backing, st) != 0) return -errno;
  if (std::optional<uint64_t> limit = g_faults->space_limit(nullptr)) {
    const uint64_t unit = st->f_frsize != 0 ? st->f_frsize : st->f_bsize;
    const uint64_t used = allocated_bytes_below(g_backing);
    const uint64_t free_units = *limit > used ? (*limit - used) / unit : 0;
    st->f_blocks = *limit / unit;
    st->f_bfree = std::min<uint64_t>(st->f_bfree, free_units);
    st->f_bavail = std::min<uint64_t>(st->f_bavail, free_units);
  }
  return 0;
}

int ff_flush(const char* path, fuse_file_info* fi) {
  // Called at each close() of a descriptor of the file: report what closing
  // a duplicate of the backing fd reports (delayed errors of NFS and the like).
  int dup = ::dup(static_cast<int>(fi->fh));
  if (dup < 0) return -errno;
  return result(::close(dup));
}

int ff_release(const char* path, fuse_file_info* fi) {
  ::close(static_cast<int>(fi->fh));
  return 0;
}

int ff_fsync(const char* path, int datasync, fuse_file_info* fi) {
  if (int err = g_faults->before_fsync(path)) return -err;  // a failed fsync promises nothing: skip the real one
  const int fd = static_cast<int>(fi->fh);
  return result(datasync ? ::fdatasync(fd) : ::fsync(fd));
}

int ff_opendir(const char* path, fuse_file_info* fi) {
  int fd = ::openat(g_backing, rel(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  return 0;
}

int ff_readdir(const char* path, void* buf, fuse_fill_dir_t filler, off_t offset, fuse_file_info* fi,
               fuse_readdir_flags flags) {
  // A fresh descriptor per listing: its own position, from the start.
  int fd = ::openat(static_cast<int>(fi->fh), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -errno;
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    int err = errno;
    ::close(fd);
    return -err;
  }
  while (struct dirent* e = ::readdir(d)) {
    struct stat st {};
    st.st_ino = e->d_ino;
    st.st_mode = static_cast<mode_t>(DTTOIF(e->d_type));
    if (filler(buf, e->d_name, &st, 0, static_cast<fuse_fill_dir_flags>(0)) != 0) break;
  }
  ::closedir(d);
  return 0;
}

int ff_releasedir(const char* path, fuse_file_info* fi) {
  ::close(static_cast<int>(fi->fh));
  return 0;
}

int ff_fsyncdir(const char* path, int datasync, fuse_file_info* fi) {
  const int fd = static_cast<int>(fi->fh);
  return result(datasync ? ::fdatasync(fd) : ::fsync(fd));
}

void* ff_init(fuse_conn_info* conn, fuse_config* cfg) {
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;  // a write's error must be the write's
  cfg->use_ino = 1;
  cfg->hard_remove = 1;
  cfg->nullpath_ok = 0;  // keep paths: the path= filters need the current name
  cfg->entry_timeout = 0;
  cfg->attr_timeout = 0;
  cfg->negative_timeout = 0;
  cfg->direct_io = 0;
  cfg->kernel_cache = 0;
  return nullptr;
}

int ff_access(const char* path, int mask) { return result(::faccessat(g_backing, rel(path), mask, 0)); }

int ff_create(const char* path, mode_t mode, fuse_file_info* fi) {
  int fd = ::openat(g_backing, rel(path), fi->flags | O_CREAT | O_CLOEXEC, mode);
  if (fd < 0) return -errno;
  fi->fh = static_cast<uint64_t>(fd);
  return 0;
}

int ff_utimens(const char* path, const struct timespec tv[2], fuse_file_info* fi) {
  if (fi != nullptr) return result(::futimens(static_cast<int>(fi->fh), tv));
  return result(::utimensat(g_backing, rel(path), tv, AT_SYMLINK_NOFOLLOW));
}

int ff_fallocate(const char* path, int mode, off_t offset, off_t len, fuse_file_info* fi) {
  const int fd = static_cast<int>(fi->fh);
  std::unique_lock<std::mutex> space_lock;
  if (!(mode & FALLOC_FL_PUNCH_HOLE))
    if (int r = check_space("fallocate", path, fd, offset, len, &space_lock)) return r;
  return result(::fallocate(fd, mode, offset, len));
}

off_t ff_lseek(const char* path, off_t offset, int whence, fuse_file_info* fi) {
  off_t r = ::lseek(static_cast<int>(fi->fh), offset, whence);
  return r < 0 ? -errno : r;
}

fuse_operations make_operations() {
  fuse_operations ops{};
  ops.getattr = ff_getattr;
  ops.mkdir = ff_mkdir;
  ops.unlink = ff_unlink;
  ops.rmdir = ff_rmdir;
  ops.rename = ff_rename;
  ops.chmod = ff_chmod;
  ops.truncate = ff_truncate;
  ops.open = ff_open;
  ops.read = ff_read;
  ops.write = ff_write;
  ops.statfs = ff_statfs;
  ops.flush = ff_flush;
  ops.release = ff_release;
  ops.fsync = ff_fsync;
  ops.opendir = ff_opendir;
  ops.readdir = ff_readdir;
  ops.releasedir = ff_releasedir;
  ops.fsyncdir = ff_fsyncdir;
  ops.init = ff_init;
  ops.access = ff_access;
  ops.create = ff_create;
  ops.utimens = ff_utimens;
  ops.fallocate = ff_fallocate;
  ops.lseek = ff_lseek;
  return ops;
}

// `faultfs --check-faults FILE`: 0 if FILE parses (or is missing), else 1.
int check_faults_file(const char* path) {
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) {
    if (errno == ENOENT) return 0;
    std::fprintf(stderr, "faultfs: %s: %s\n", path, std::strerror(errno));
    return 1;
  }
  std::string text;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
  std::fclose(f);
  ParsedFaults parsed = parse_faults(text);
  if (parsed.error.empty()) return 0;
  std::fprintf(stderr, "faultfs: %s: %s\n", path, parsed.error.c_str());
  return 1;
}

int usage_error(const char* why) {
  std::fprintf(stderr, "faultfs: %s\n\n%s", why, kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string backing;
  std::string faults_path;
  bool exit_with_parent = false;
  std::vector<char*> fuse_argv{argv[0]};
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--check-faults") {
      if (i + 1 >= argc) return usage_error("--check-faults needs a FILE");
      return check_faults_file(argv[i + 1]);
    } else if (a == "--faults") {
      if (i + 1 >= argc) return usage_error("--faults needs a FILE");
      faults_path = argv[++i];
    } else if (a.starts_with("--faults=")) {
      faults_path = a.substr(9);
    } else if (a == "--exit-with-parent") {
      exit_with_parent = true;
    } else if (a == "-o" && i + 1 < argc) {
      fuse_argv.push_back(argv[i]);
      fuse_argv.push_back(argv[++i]);
    } else if (!a.starts_with("-") && backing.empty()) {
      backing = a;
    } else {
      fuse_argv.push_back(argv[i]);  // MOUNTPOINT and FUSE's own options
    }
  }
  if (backing.empty()) return usage_error("no BACKING_DIR");
  if (faults_path.empty()) return usage_error("no --faults FILE");
  if (fuse_argv.size() < 2) return usage_error("no MOUNTPOINT");

  if (exit_with_parent) {
    pid_t parent = ::getppid();
    if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || ::getppid() != parent) return 1;
  }
  g_backing = ::open(backing.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (g_backing < 0) {
    std::fprintf(stderr, "faultfs: %s: %s\n", backing.c_str(), std::strerror(errno));
    return 1;
  }
  // Absolute, since FUSE changes directory to / when it daemonizes.
  Faults faults(std::filesystem::absolute(faults_path).string());
  faults.start();
  g_faults = &faults;

  static char fs_names[] = "fsname=faultfs,subtype=faultfs";
  static char dash_o[] = "-o";
  fuse_argv.push_back(dash_o);
  fuse_argv.push_back(fs_names);
  fuse_argv.push_back(nullptr);
  const fuse_operations ops = make_operations();
  return fuse_main(static_cast<int>(fuse_argv.size()) - 1, fuse_argv.data(), &ops, nullptr);
}
