// CRC32C (Castagnoli), the checksum of checkpoint files (docs/fault-tolerance.md). Debian
// bookworm packages no C library for it (only a Python one), so it is written here: the SSE4.2
// instruction where the CPU has it, a table otherwise; both give the same value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace shardps {

// The CRC32C of `n` bytes at `data`, continuing from `crc` (0 to start).
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);

}  // namespace shardps
