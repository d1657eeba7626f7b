// Registered memory and the keys that let a peer access it one-sidedly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/codec.h"
#include "shardps/status.h"

namespace shardps::transport {

// Where registered memory lives. Every backend registers host memory; CUDA device memory only
// where the backend can (Context::CanRegister).
enum class MemoryKind : uint8_t { kHost = 0, kCuda = 1 };
const char* MemoryKindName(MemoryKind k);

// What a peer needs to write into or read from a registered region: the region's base address
// (in the owner's address space; offsets are relative to it) and size, and a backend-specific
// packed key (tcp: region id and a random secret; ucx: a packed rkey). Travels through the
// control plane; see docs/protocol.md for its encoding.
struct RemoteKey {
  uint64_t base = 0;
  uint64_t size = 0;
  Bytes packed;

  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
  bool empty() const { return packed.empty(); }
};

// Memory registered with a transport context, allocated by the transport (for UCX that is
// what makes shared-memory RMA truly one-sided). Owned by the caller; destroying it
// deregisters it: a later remote access with its key is refused. Memory stays alive until
// operations that were already in flight against it have finished. Thread-safe accessors.
class MemoryRegion {
 public:
  virtual ~MemoryRegion() = default;
  virtual void* data() const = 0;
  virtual size_t size() const = 0;
  virtual const RemoteKey& remote_key() const = 0;
  virtual MemoryKind kind() const { return MemoryKind::kHost; }
};

// A range of a local registered region: where a one-sided operation takes its bytes from or
// puts them (backends that need local registration, verbs, use the region's handle; the others
// its address).
struct LocalSpan {
  const MemoryRegion* region = nullptr;
  uint64_t offset = 0;
  uint64_t length = 0;
};

}  // namespace shardps::transport
