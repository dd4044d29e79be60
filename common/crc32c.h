// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), the
// checksum of every peer-protocol payload (docs/protocol.md).
//
// On x86-64 CPUs with SSE4.2 the crc32 instruction computes it; elsewhere a
// portable slicing-by-8 table does. The choice is made once, at the first
// call. Both give the same value for every input.
#pragma once

#include <cstddef>
#include <cstdint>

namespace livemig {

// Extends `crc` (the CRC-32C of the bytes before these; 0 for none) with n
// bytes at data, so that crc32c(b, nb, crc32c(a, na)) == crc32c(a || b).
// crc32c("123456789", 9) == 0xE3069283.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// The portable implementation, same contract as crc32c(). For tests and
// benchmarks.
uint32_t crc32c_software(const void* data, size_t n, uint32_t crc = 0);

// True if this CPU has the SSE4.2 crc32 instruction (and this is x86-64).
bool crc32c_hardware_available();

// The SSE4.2 implementation, same contract as crc32c().
// REQUIRES: crc32c_hardware_available()
uint32_t crc32c_hardware(const void* data, size_t n, uint32_t crc = 0);

}  // namespace livemig
