// The checksum of ShardPS (packed remote keys, for one): XXH3-64 from Debian's libxxhash, through
// its runtime-dispatched entry point (AVX2/AVX-512 where the CPU has them, SSE2 otherwise).
#pragma once

#include <xxh_x86dispatch.h>
#include <xxhash.h>

#include <cstddef>
#include <cstdint>

namespace shardps {

inline uint64_t Checksum(const void* data, size_t n) { return XXH3_64bits_dispatch(data, n); }

}  // namespace shardps
