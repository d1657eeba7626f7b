// The checksum that seals published parameter slots: XXH3-64 from Debian's libxxhash, through
// its runtime-dispatched entry point (AVX2/AVX-512 where the CPU has them, SSE2 otherwise).
#pragma once

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxh_x86dispatch.h>
#include <xxhash.h>

#include <cstddef>
#include <cstdint>

namespace shardps {

inline uint64_t Checksum(const void* data, size_t n) { return XXH3_64bits_dispatch(data, n); }

// The same checksum over data fed in pieces (equal to Checksum of the concatenation).
class StreamingChecksum {
 public:
  StreamingChecksum() { XXH3_64bits_reset(&state_); }
  void Update(const void* data, size_t n) { XXH3_64bits_update_dispatch(&state_, data, n); }
  uint64_t Digest() const { return XXH3_64bits_digest(&state_); }

 private:
  XXH3_state_t state_;
};

}  // namespace shardps
