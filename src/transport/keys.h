// The packed remote keys of the backends that carry an opaque key (ucx: its packed rkey;
// verbs: the memory region's rkey): what a peer needs to put into or get from a region
// (docs/protocol.md, "Remote keys").
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/codec.h"
#include "shardps/status.h"
#include "transport/memory.h"

namespace shardps::transport {

// Packed key: [u64 region id][u64 checksum of id, base, size and rkey][rkey bytes].
struct KeyParts {
  uint64_t region = 0;
  Bytes rkey;
};

uint64_t KeySum(uint64_t region, uint64_t base, uint64_t size, const uint8_t* rkey, size_t n);
// The key of region `region` at `base`, `size` bytes, with the backend's own key bytes.
RemoteKey PackKey(uint64_t region, uint64_t base, uint64_t size, const void* rkey, size_t n);
// Splits a key; InvalidArgument when it is not a key of this kind or its checksum does not match.
Status ParseKey(const RemoteKey& key, KeyParts* out);

}  // namespace shardps::transport
