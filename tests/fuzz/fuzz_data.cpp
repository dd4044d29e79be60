// fuzz_data: what the destination does with DATA it cannot write as it
// came (plugin/link_compression.h, plugin/base_image.h): a COMPRESSED
// frame's zstd bytes and a BASE note's checksums, as a peer could send them.
//
// Input: one flags byte (bit 0: a BASE note, else COMPRESSED), a u32
// length (taken modulo kMaxDataLength + 1), a u16 block number (the offset,
// in 4 KiB blocks, modulo twice the fuzz base's size), then the data bytes.
// The base is fixed: kBaseBlocks blocks, block b filled with byte b + 1,
// made once in a temporary file (its checksum cache beside it).
//
// Invariants:
//   - decoding either fails with BadFrame or BaseMismatch (a base that
//     cannot be read is Internal), or yields exactly `length` bytes;
//   - a note that passes reads as the base's bytes at its offset;
//   - decompressed data compresses and decompresses back to itself.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "common/protocol_format.h"
#include "plugin/base_image.h"
#include "plugin/link_compression.h"
#include "tests/fuzz/fuzz_support.h"

using namespace livemig;

namespace {

constexpr uint32_t kBlock = 4096;
constexpr uint64_t kBaseBlocks = 16;

const BaseImage& fuzz_base() {
  static std::unique_ptr<BaseImage> base = [] {
    char dir[] = "/tmp/livemig-fuzz-base-XXXXXX";
    FUZZ_CHECK(mkdtemp(dir) != nullptr, "mkdtemp failed");
    const std::string path = std::string(dir) + "/base.img";
    {
      std::ofstream f(path, std::ios::binary);
      for (uint64_t b = 0; b < kBaseBlocks; ++b) f << std::string(kBlock, char(b + 1));
    }
    auto opened = BaseImage::open(path, kBlock, [](const std::string&) {});
    FUZZ_CHECK(opened.is_ok(), "cannot open the fuzz base: %s", opened.status().message().c_str());
    return std::move(*opened);
  }();
  return *base;
}

void check_failure(const Status& s, bool base) {
  const ErrorCode code = error_code_of(s);
  FUZZ_CHECK(code == ErrorCode::BadFrame || (base && (code == ErrorCode::BaseMismatch || code == ErrorCode::Internal)),
             "decoding failed with %s: %s", error_code_name(uint32_t(code)), s.message().c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::FuzzInput in(data, size);
  const bool base = in.byte() & 1;
  const uint32_t length = in.integral<uint32_t>() % (kMaxDataLength + 1);
  const uint64_t offset = uint64_t(in.integral<uint16_t>() % (2 * kBaseBlocks)) * kBlock;
  const std::string bytes(in.rest());
  DataPayload p{offset, length, base ? kFlagBase : kFlagCompressed,
                {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}};
  std::string out;
  Status s = base ? read_base_note(&fuzz_base(), p, kBlock, out) : decompress_frame(p, out);
  if (!s) {
    check_failure(s, base);
    return 0;
  }
  FUZZ_CHECK(out.size() == length, "decoded %zu bytes for a %u-byte DATA", out.size(), length);
  if (base) {
    std::string expect(length, '\0');
    FUZZ_CHECK(fuzz_base().pread(expect.data(), length, offset) == 0, "reading the fuzz base");
    FUZZ_CHECK(out == expect, "a note that passed does not read as the base at %llu",
               static_cast<unsigned long long>(offset));
    return 0;
  }
  std::string again, back;
  if (compress_frame({reinterpret_cast<const uint8_t*>(out.data()), out.size()}, 1, again)) {
    DataPayload q{offset, length, kFlagCompressed, {reinterpret_cast<const uint8_t*>(again.data()), again.size()}};
    FUZZ_CHECK(decompress_frame(q, back).is_ok() && back == out, "compressed data does not decompress back");
  }
  return 0;
}
