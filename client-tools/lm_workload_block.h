// Block content format of lm-workload: every block the tool writes says what it
// is, so a verifier can tell a right block from a stale, torn, misplaced or
// foreign one by reading it alone.
//
// A block is a whole number of 512-byte sectors. Every sector holds, little-endian:
//
//   offset size  field
//        0    8  magic "LMWLBLK1"
//        8    8  block number (absolute: byte offset / block size)
//       16    8  generation (1 for the first write of the block, +1 per write)
//       24    8  seed (identifies the run / journal)
//       32    4  block size in bytes
//       36    4  sector index inside the block
//       40    8  checksum: hash of bytes 0..39 and 48..511
//       48  464  fill: a pseudo-random stream keyed by (seed, block, generation,
//                sector index)
//
// Because every sector carries the header, a block torn at sector granularity
// (half old generation, half new) is reported as such, and a block written to
// the wrong offset is reported with the block number it was meant for.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace livemig::workload {

inline constexpr uint32_t kSectorSize = 512;
inline constexpr uint64_t kBlockMagic = 0x314B4C424C574D4CULL;  // "LMWLBLK1" little-endian
inline constexpr uint32_t kMinBlockSize = kSectorSize;
inline constexpr uint32_t kMaxBlockSize = 32u << 20;

// Identity of one written block version.
struct BlockId {
  uint64_t block = 0;
  uint64_t generation = 0;
  uint64_t seed = 0;
  bool operator==(const BlockId&) const = default;
};

// Fills `out` with the content of `id` for a block of out.size() bytes.
// REQUIRES: out.size() is a non-zero multiple of kSectorSize.
void encode_block(const BlockId& id, std::span<uint8_t> out);

// What a block read back holds.
struct DecodedBlock {
  enum class Kind {
    kValid,   // every sector is a correct sector of the same (block, gen, seed)
    kZero,    // every byte is zero
    kMixed,   // sectors disagree (torn write) or some are corrupt / foreign data
  };
  Kind kind = Kind::kZero;
  BlockId id;           // kValid: the block's identity; kMixed: sector 0's if it is valid
  bool first_sector_valid = false;
  bool any_valid_sector = false;  // at least one sector decodes as an lm-workload sector
  std::vector<BlockId> sector_ids;  // distinct identities of the valid sectors
  std::string detail;   // kMixed: a short description of each run of sectors
};

// Decodes a block of data.size() bytes that was read back from the export.
// REQUIRES: data.size() is a non-zero multiple of kSectorSize.
DecodedBlock decode_block(std::span<const uint8_t> data);

// Human description of a decoded block: "block 5 generation 7", "zeros", ...
std::string describe(const DecodedBlock& d, uint64_t expected_seed);

// 64-bit mixing function (splitmix64 finaliser), exposed for the journal checksum.
uint64_t mix64(uint64_t x);

}  // namespace livemig::workload
