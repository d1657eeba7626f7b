// The remote keys of the ucx backend: what a peer needs to put into or get from a region
// (docs/protocol.md, "Remote keys").
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/codec.h"
#include "shardps/status.h"
#include "transport/memory.h"

namespace shardps::transport::ucx {

// Packed key: [u64 region id][u64 checksum of id, base, size and rkey][rkey bytes].
struct KeyParts {
  uint64_t region = 0;
  Bytes rkey;
};

uint64_t KeySum(uint64_t region, uint64_t base, uint64_t size, const uint8_t* rkey, size_t n);
// The key of region `region` at `base`, `size` bytes, with UCX's packed rkey.
RemoteKey PackKey(uint64_t region, uint64_t base, uint64_t size, const void* rkey, size_t n);
// Splits a key; InvalidArgument when it is not a ucx key or its checksum does not match.
Status ParseKey(const RemoteKey& key, KeyParts* out);

}  // namespace shardps::transport::ucx
