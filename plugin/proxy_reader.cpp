#include "plugin/proxy_reader.h"

#include <cerrno>
#include <cstring>
#include <vector>

namespace livemig {

int ProxyReader::read(PeerLink& link, void* buf, uint64_t count, uint64_t offset) {
  std::vector<uint64_t> ids;
  std::vector<PullPayload> pulls;
  UniqueLock lock(mu_);
  for (uint64_t done = 0; done < count; done += kProxyChunk) {
    uint64_t n = std::min(kProxyChunk, count - done);
    uint64_t id = link.next_request_id();
    pieces_[id] = Piece{static_cast<char*>(buf) + done, offset + done, n, n};
    ids.push_back(id);
    pulls.push_back(PullPayload{offset + done, static_cast<uint32_t>(n), 1});
  }
  lock.unlock();
  for (size_t i = 0; i < ids.size(); ++i) link.send(pulls[i], ids[i], true);
  lock.lock();
  auto complete = [&]() REQUIRES(mu_) {
    for (uint64_t id : ids)
      if (pieces_.at(id).bytes_left > 0) return false;
    return true;
  };
  auto failed = [&]() REQUIRES(mu_) {
    for (uint64_t id : ids)
      if (pieces_.at(id).error) return true;
    return false;
  };
  // A link that closed before the PULLs were queued never calls fail_all()
  // for them: check it too (fail_all wakes us for one that closes later).
  bool in_time = cv_.wait_for(lock, timeout_, [&]() REQUIRES(mu_) { return complete() || failed() || link.closed(); });
  int error = !in_time ? ETIMEDOUT : complete() ? 0 : failed() ? 0 : EIO;
  for (uint64_t id : ids) {
    if (!error) error = pieces_.at(id).error;
    pieces_.erase(id);
  }
  if (error) {
    errno = error;
    return -1;
  }
  return 0;
}

bool ProxyReader::on_data(uint64_t id, const DataPayload& d) {
  MutexLock lock(mu_);
  auto it = pieces_.find(id);
  if (it == pieces_.end()) return false;
  Piece& p = it->second;
  const bool inside = d.offset >= p.offset && d.offset - p.offset <= p.length &&
                      d.length <= p.length - (d.offset - p.offset);
  const bool plain = !(d.flags & kFlagCompressed) && ((d.flags & kFlagZero) || d.bytes.size() == d.length);
  if (!inside || !plain) {
    p.error = EPROTO;  // a reply outside what was asked, or data we cannot use
  } else if (d.flags & kFlagZero) {
    std::memset(p.buf + (d.offset - p.offset), 0, d.length);
  } else {
    std::memcpy(p.buf + (d.offset - p.offset), d.bytes.data(), d.length);
  }
  p.bytes_left -= std::min<uint64_t>(p.bytes_left, d.length);
  cv_.notify_all();
  return true;
}

bool ProxyReader::on_error(uint64_t id, const Status& why) {
  MutexLock lock(mu_);
  auto it = pieces_.find(id);
  if (it == pieces_.end()) return false;
  it->second.error = why.errno_value() ? why.errno_value() : EIO;
  cv_.notify_all();
  return true;
}

void ProxyReader::fail_all(const Status&) {
  MutexLock lock(mu_);
  for (auto& [id, p] : pieces_) p.error = EIO;
  cv_.notify_all();
}

size_t ProxyReader::pending() const {
  MutexLock lock(mu_);
  return pieces_.size();
}

}  // namespace livemig
