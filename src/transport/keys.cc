#include "transport/keys.h"

#include "core/checksum.h"

namespace shardps::transport {

uint64_t KeySum(uint64_t region, uint64_t base, uint64_t size, const uint8_t* rkey, size_t n) {
  Bytes b;
  Writer w(&b);
  w.Put(region);
  w.Put(base);
  w.Put(size);
  w.PutRaw(rkey, n);
  return Checksum(b.data(), b.size());
}

Status ParseKey(const RemoteKey& key, KeyParts* out) {
  Reader r(key.packed.data(), key.packed.size());
  uint64_t sum = 0;
  if (!r.Get(&out->region) || !r.Get(&sum) || r.remaining() == 0)
    return Status::InvalidArgument("remote key is not a key of this backend");
  auto rest = r.rest();
  if (KeySum(out->region, key.base, key.size, rest.data(), rest.size()) != sum)
    return Status::InvalidArgument("remote key is corrupt (checksum mismatch)");
  out->rkey.assign(rest.begin(), rest.end());
  return Status::OK();
}

RemoteKey PackKey(uint64_t region, uint64_t base, uint64_t size, const void* rkey, size_t n) {
  RemoteKey key;
  key.base = base;
  key.size = size;
  Writer w(&key.packed);
  w.Put(region);
  w.Put(KeySum(region, base, size, static_cast<const uint8_t*>(rkey), n));
  w.PutRaw(rkey, n);
  return key;
}

}  // namespace shardps::transport
