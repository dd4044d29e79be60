#include "client-tools/lm_workload_block.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "common/byte_order.h"

namespace livemig::workload {
namespace {

constexpr size_t kWordsPerSector = kSectorSize / 8;  // 64
constexpr size_t kChecksumWord = 5;                  // bytes 40..47
constexpr size_t kFirstFillWord = 6;                 // bytes 48..511

uint64_t fill_key(const BlockId& id, uint32_t sector) {
  uint64_t k = mix64(id.seed ^ 0x6a09e667f3bcc908ULL);
  k = mix64(k ^ id.block);
  k = mix64(k ^ id.generation);
  return mix64(k ^ sector);
}

// Checksum of the sector's words other than the checksum word itself.
uint64_t sector_checksum(const uint8_t* sector) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t w = 0; w < kWordsPerSector; ++w) {
    if (w == kChecksumWord) continue;
    h = mix64(h ^ (load_le64(sector + 8 * w) + w * 0x9e3779b97f4a7c15ULL));
  }
  return h;
}

void encode_sector(const BlockId& id, uint32_t block_size, uint32_t index, uint8_t* s) {
  store_le64(s + 0, kBlockMagic);
  store_le64(s + 8, id.block);
  store_le64(s + 16, id.generation);
  store_le64(s + 24, id.seed);
  store_le32(s + 32, block_size);
  store_le32(s + 36, index);
  uint64_t state = fill_key(id, index);
  for (size_t w = kFirstFillWord; w < kWordsPerSector; ++w) {
    state += 0x9e3779b97f4a7c15ULL;  // splitmix64 stream
    store_le64(s + 8 * w, mix64(state));
  }
  store_le64(s + 8 * kChecksumWord, sector_checksum(s));
}

// One sector read back.
struct SectorInfo {
  enum class Kind { kValid, kZero, kInvalid } kind = Kind::kInvalid;
  BlockId id;
  const char* why = "";  // kInvalid: reason
  bool operator==(const SectorInfo& o) const {
    if (kind != o.kind) return false;
    if (kind == Kind::kValid) return id == o.id;
    if (kind == Kind::kInvalid) return std::strcmp(why, o.why) == 0;
    return true;
  }
};

SectorInfo decode_sector(const uint8_t* s, uint32_t block_size, uint32_t index) {
  SectorInfo info;
  bool zero = true;
  for (size_t i = 0; i < kSectorSize; ++i) {
    if (s[i] != 0) {
      zero = false;
      break;
    }
  }
  if (zero) {
    info.kind = SectorInfo::Kind::kZero;
    return info;
  }
  if (load_le64(s) != kBlockMagic) {
    info.why = "not lm-workload data";
    return info;
  }
  if (load_le64(s + 8 * kChecksumWord) != sector_checksum(s)) {
    info.why = "bad checksum";
    return info;
  }
  BlockId id{load_le64(s + 8), load_le64(s + 16), load_le64(s + 24)};
  if (load_le32(s + 32) != block_size) {
    info.why = "written with another block size";
    return info;
  }
  if (load_le32(s + 36) != index) {
    info.why = "sector from another position in its block";
    return info;
  }
  uint8_t expected[kSectorSize];
  encode_sector(id, block_size, index, expected);
  if (std::memcmp(expected, s, kSectorSize) != 0) {
    info.why = "fill does not match its header";
    return info;
  }
  info.kind = SectorInfo::Kind::kValid;
  info.id = id;
  return info;
}

std::string describe_sector(const SectorInfo& s) {
  switch (s.kind) {
    case SectorInfo::Kind::kValid:
      return fmt::format("block {} generation {}", s.id.block, s.id.generation);
    case SectorInfo::Kind::kZero:
      return "zeros";
    case SectorInfo::Kind::kInvalid:
      return s.why;
  }
  return "?";
}

}  // namespace

uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

void encode_block(const BlockId& id, std::span<uint8_t> out) {
  const auto block_size = static_cast<uint32_t>(out.size());
  for (uint32_t i = 0; i < block_size / kSectorSize; ++i)
    encode_sector(id, block_size, i, out.data() + static_cast<size_t>(i) * kSectorSize);
}

DecodedBlock decode_block(std::span<const uint8_t> data) {
  const auto block_size = static_cast<uint32_t>(data.size());
  const uint32_t sectors = block_size / kSectorSize;
  DecodedBlock d;
  SectorInfo first = decode_sector(data.data(), block_size, 0);
  d.first_sector_valid = first.kind == SectorInfo::Kind::kValid;
  d.any_valid_sector = d.first_sector_valid;
  if (d.first_sector_valid) {
    d.id = first.id;
    d.sector_ids.push_back(first.id);
  }

  // Describe the block as runs of equal sectors ("sectors 0-3: ...; sectors 4-7: ...").
  std::string detail;
  SectorInfo run = first;
  uint32_t run_start = 0;
  bool uniform = true;
  auto close_run = [&](uint32_t end) {
    if (!detail.empty()) detail += "; ";
    if (end - run_start == 1)
      detail += fmt::format("sector {}: {}", run_start, describe_sector(run));
    else
      detail += fmt::format("sectors {}-{}: {}", run_start, end - 1, describe_sector(run));
  };
  for (uint32_t i = 1; i < sectors; ++i) {
    SectorInfo s = decode_sector(data.data() + static_cast<size_t>(i) * kSectorSize, block_size, i);
    if (s.kind == SectorInfo::Kind::kValid) {
      d.any_valid_sector = true;
      if (std::find(d.sector_ids.begin(), d.sector_ids.end(), s.id) == d.sector_ids.end())
        d.sector_ids.push_back(s.id);
    }
    if (!(s == run)) {
      uniform = false;
      close_run(i);
      run = s;
      run_start = i;
    }
  }
  if (uniform && first.kind == SectorInfo::Kind::kValid) {
    d.kind = DecodedBlock::Kind::kValid;
    return d;
  }
  if (uniform && first.kind == SectorInfo::Kind::kZero) {
    d.kind = DecodedBlock::Kind::kZero;
    return d;
  }
  close_run(sectors);
  d.kind = DecodedBlock::Kind::kMixed;
  d.detail = std::move(detail);
  return d;
}

std::string describe(const DecodedBlock& d, uint64_t expected_seed) {
  switch (d.kind) {
    case DecodedBlock::Kind::kZero:
      return "zeros";
    case DecodedBlock::Kind::kValid:
      if (d.id.seed != expected_seed)
        return fmt::format("block {} generation {} of another run (seed {:#x})", d.id.block,
                           d.id.generation, d.id.seed);
      return fmt::format("block {} generation {}", d.id.block, d.id.generation);
    case DecodedBlock::Kind::kMixed:
      return fmt::format("torn or corrupt ({})", d.detail);
  }
  return "?";
}

}  // namespace livemig::workload
