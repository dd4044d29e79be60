#include "client-tools/lm_workload_util.h"

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstdio>

namespace livemig::workload {

std::string nbd_last_error() {
  const char* e = nbd_get_error();
  std::string s = e ? e : "unknown libnbd error";
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

Result<NbdConnection> nbd_connect(const std::string& uri) {
  NbdConnection c;
  c.handle.reset(nbd_create());
  if (!c.handle) return Status::error(fmt::format("nbd_create: {}", nbd_last_error()), ENOMEM);
  nbd_handle* h = c.handle.get();
  // The URI is the operator's (a command-line argument): let it name a TLS
  // key file (nbds://...?tls-psk-file=) or a certificate directory.
  nbd_set_uri_allow_local_file(h, true);
  if (nbd_connect_uri(h, uri.c_str()) == -1)
    return Status::error(fmt::format("cannot connect to {}: {}", uri, nbd_last_error()),
                         nbd_get_errno() ? nbd_get_errno() : ECONNREFUSED);
  int64_t size = nbd_get_size(h);
  if (size < 0)
    return Status::error(fmt::format("{}: cannot get export size: {}", uri, nbd_last_error()));
  c.size = static_cast<uint64_t>(size);
  c.read_only = nbd_is_read_only(h) == 1;
  c.can_fua = nbd_can_fua(h) == 1;
  c.can_flush = nbd_can_flush(h) == 1;
  return c;
}

std::optional<uint64_t> parse_size(const std::string& text) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return std::nullopt;
  size_t pos = 0;
  uint64_t v = 0;
  try {
    v = std::stoull(text, &pos, 10);
  } catch (...) {
    return std::nullopt;
  }
  std::string suffix = text.substr(pos);
  if (!suffix.empty() && (suffix.back() == 'B' || suffix.back() == 'b')) suffix.pop_back();
  if (suffix.size() == 2 && (suffix[1] == 'i' || suffix[1] == 'I')) suffix.pop_back();
  int shift = 0;
  if (suffix.empty()) shift = 0;
  else if (suffix.size() == 1) {
    switch (std::toupper(static_cast<unsigned char>(suffix[0]))) {
      case 'K': shift = 10; break;
      case 'M': shift = 20; break;
      case 'G': shift = 30; break;
      case 'T': shift = 40; break;
      default: return std::nullopt;
    }
  } else {
    return std::nullopt;
  }
  if (shift && v > (UINT64_MAX >> shift)) return std::nullopt;
  return v << shift;
}

Result<BlockRange> resolve_range(std::optional<uint64_t> blocks, const std::string& region,
                                 uint32_t block_size, uint64_t export_size) {
  const uint64_t export_blocks = export_size / block_size;
  BlockRange r;
  if (!region.empty()) {
    auto colon = region.find(':');
    if (colon == std::string::npos)
      return Status::error(fmt::format("--region {}: expected OFFSET:LEN, e.g. 0:256M", region));
    auto off = parse_size(region.substr(0, colon));
    auto len = parse_size(region.substr(colon + 1));
    if (!off || !len)
      return Status::error(fmt::format("--region {}: OFFSET and LEN must be sizes like 4096, 64K, 256M", region));
    if (*off % block_size || *len % block_size)
      return Status::error(fmt::format("--region {}: offset and length must be multiples of the block size {}",
                                       region, block_size));
    if (*len == 0) return Status::error(fmt::format("--region {}: length is zero", region));
    if (*off > export_size || *len > export_size - *off)
      return Status::error(fmt::format("--region {}: beyond the end of the export ({} bytes)", region, export_size));
    r.first = *off / block_size;
    r.count = *len / block_size;
  } else if (blocks) {
    if (*blocks == 0) return Status::error("--blocks must be at least 1");
    if (*blocks > export_blocks)
      return Status::error(fmt::format("--blocks {}: the export holds only {} whole blocks of {} bytes",
                                       *blocks, export_blocks, block_size));
    r.first = 0;
    r.count = *blocks;
  } else {
    if (export_blocks == 0)
      return Status::error(fmt::format("the export ({} bytes) is smaller than one block of {} bytes",
                                       export_size, block_size));
    r.first = 0;
    r.count = export_blocks;
  }
  if (export_size % block_size && r.first + r.count == export_blocks)
    fmt::print(stderr,
               "lm-workload: note: the export size {} is not a multiple of the block size {}: "
               "the last partial block ({} bytes at offset {}) is skipped\n",
               export_size, block_size, export_size % block_size, export_blocks * block_size);
  return r;
}

int LatencyHistogram::bucket_of(uint64_t ns) {
  if (ns < (1u << kSubBits)) return static_cast<int>(ns);
  int msb = 63 - std::countl_zero(ns);             // >= kSubBits
  int shift = msb - kSubBits;                      // keep kSubBits+1 significant bits
  uint64_t sub = (ns >> shift) & ((1u << kSubBits) - 1);
  return ((shift + 1) << kSubBits) + static_cast<int>(sub);
}

uint64_t LatencyHistogram::bucket_mid(int bucket) {
  int group = bucket >> kSubBits;
  uint64_t sub = static_cast<uint64_t>(bucket & ((1 << kSubBits) - 1));
  if (group == 0) return sub;
  int shift = group - 1;
  uint64_t low = ((uint64_t{1} << kSubBits) | sub) << shift;
  return low + ((uint64_t{1} << shift) >> 1);
}

void LatencyHistogram::record(uint64_t ns) {
  buckets_[static_cast<size_t>(bucket_of(ns))]++;
  count_++;
  sum_ += ns;
  max_ = std::max(max_, ns);
}

void LatencyHistogram::merge(const LatencyHistogram& o) {
  for (size_t i = 0; i < buckets_.size(); ++i) buckets_[i] += o.buckets_[i];
  count_ += o.count_;
  sum_ += o.sum_;
  max_ = std::max(max_, o.max_);
}

uint64_t LatencyHistogram::percentile(double q) const {
  if (count_ == 0) return 0;
  auto rank = static_cast<uint64_t>(q * static_cast<double>(count_));
  if (rank >= count_) rank = count_ - 1;
  uint64_t seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen > rank) return std::min(bucket_mid(static_cast<int>(i)), max_);
  }
  return max_;
}

std::string format_ms(uint64_t ns) {
  double ms = static_cast<double>(ns) / 1e6;
  if (ms < 10) return fmt::format("{:.2f} ms", ms);
  if (ms < 100) return fmt::format("{:.1f} ms", ms);
  return fmt::format("{:.0f} ms", ms);
}

}  // namespace livemig::workload
