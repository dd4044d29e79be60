#include "plugin/group_decisions.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <string>

#include <fmt/format.h>

namespace livemig {
namespace {

// fsyncs the directory that holds `path` (a new file's entry).
Status sync_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? std::string(".") : path.substr(0, std::max<size_t>(slash, 1));
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno_error("opening directory", dir);
  int rc = ::fsync(fd);
  Status s = rc < 0 ? errno_error("syncing directory", dir) : Status::ok();
  ::close(fd);
  return s;
}

}  // namespace

const char* group_decision_name(GroupDecision d) { return d == GroupDecision::Commit ? "commit" : "abort"; }

Result<GroupDecision> parse_group_decision(std::string_view text) {
  if (text == "commit") return GroupDecision::Commit;
  if (text == "abort") return GroupDecision::Abort;
  return Status::error(fmt::format("decision \"{:.40}\" is neither \"commit\" nor \"abort\"", text));
}

Status check_group_id(std::string_view group) {
  if (group.empty() || group.size() > 128)
    return Status::error(fmt::format("group id must be 1 to 128 bytes, not {}", group.size()));
  for (char c : group)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' || c == '-'))
      return Status::error(fmt::format("group id \"{:.128}\" may hold only letters, digits and . _ : -", group));
  return Status::ok();
}

std::string GroupDecisions::path_for_image(const std::string& image_path) {
  return image_path + ".livemig-groups";
}

Status GroupDecisions::load_locked() {
  if (loaded_) return Status::ok();
  int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    loaded_ = true;
    return Status::ok();
  }
  if (fd < 0) return errno_error("opening", path_);
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status s = errno_error("reading", path_);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  // A last line without its newline was cut short by a crash and never
  // answered: drop it, so the next record starts on a line of its own.
  size_t whole = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
  if (whole != text.size()) {
    if (::ftruncate(fd, static_cast<off_t>(whole)) < 0 || ::fdatasync(fd) < 0) {
      Status s = errno_error("dropping a torn last line of", path_);
      ::close(fd);
      return s;
    }
    text.resize(whole);
  }
  ::close(fd);
  size_t line_no = 0;
  for (size_t at = 0; at < text.size();) {
    size_t nl = text.find('\n', at);
    std::string_view line(text.data() + at, nl - at);
    at = nl + 1;
    ++line_no;
    size_t sp = line.find(' ');
    auto d = parse_group_decision(line.substr(0, sp == std::string_view::npos ? line.size() : sp));
    std::string_view group = sp == std::string_view::npos ? std::string_view() : line.substr(sp + 1);
    if (!d || !check_group_id(group))
      return Status::error(fmt::format("{} line {}: not \"commit GROUP\" or \"abort GROUP\": {:.160}", path_,
                                       line_no, line),
                           EILSEQ);
    decided_.try_emplace(std::string(group), *d);  // the first line for a group wins
  }
  loaded_ = true;
  return Status::ok();
}

Result<std::optional<GroupDecision>> GroupDecisions::outcome(const std::string& group) {
  MutexLock lock(mu_);
  if (Status s = load_locked(); !s) return s;
  auto it = decided_.find(group);
  if (it == decided_.end()) return std::optional<GroupDecision>();
  return std::optional<GroupDecision>(it->second);
}

Result<GroupDecisions::Recorded> GroupDecisions::decide(const std::string& group, GroupDecision d) {
  if (Status s = check_group_id(group); !s) return s;
  MutexLock lock(mu_);
  if (Status s = load_locked(); !s) return s;
  if (auto it = decided_.find(group); it != decided_.end()) return Recorded{it->second, false};
  const bool existed = ::access(path_.c_str(), F_OK) == 0;
  int fd = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return errno_error("opening", path_);
  const std::string line = fmt::format("{} {}\n", group_decision_name(d), group);
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::write(fd, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    done += static_cast<size_t>(n);
  }
  Status s = done < line.size() ? errno_error("writing", path_)
             : ::fdatasync(fd) < 0 ? errno_error("syncing", path_)
                                   : Status::ok();
  ::close(fd);
  if (s && !existed) s = sync_dir(path_);
  if (!s) {
    // What reached the file is unknown: read it again before the next answer.
    loaded_ = false;
    decided_.clear();
    return s;
  }
  decided_.emplace(group, d);
  return Recorded{d, true};
}

}  // namespace livemig
