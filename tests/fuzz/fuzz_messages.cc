// Every control-plane and data-plane message decoder (src/cluster/messages.h: register, view,
// barrier, declare and its reply, create chunks and its reply, grants, push notifications and
// acknowledgements, batches and their answers; the remote key, the optimizer, the reply head): the
// first byte picks the decoder, the rest is what came off the wire. A decoder must never read out
// of bounds or crash; what it accepts must survive a round trip (encode it, decode that, encode
// again: the same bytes).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cluster/messages.h"
#include "core/codec.h"

namespace {

using namespace shardps;
using namespace shardps::cluster;

template <typename T>
void RoundTrip(const uint8_t* data, size_t size) {
  Reader r(data, size);
  T v;
  if (!v.Decode(&r)) return;
  Bytes a, b;
  Writer wa(&a);
  v.Encode(&wa);
  Reader ra(a.data(), a.size());
  T again;
  if (!again.Decode(&ra) || !ra.done()) std::abort();  // what it wrote, it must read
  Writer wb(&b);
  again.Encode(&wb);
  if (a != b) std::abort();
}

// LandingGrant encodes through a static (it avoids copying the pool's key).
struct Grant {
  LandingGrant g;
  bool Decode(Reader* r) { return g.Decode(r); }
  void Encode(Writer* w) const { LandingGrant::Encode(w, g.buffer, g.offset, g.key); }
};

struct Optimizer {
  OptimizerConfig o;
  bool Decode(Reader* r) { return DecodeOptimizer(r, &o); }
  void Encode(Writer* w) const { EncodeOptimizer(o, w); }
};

void ReplyHead(const uint8_t* data, size_t size) {
  Reader r(data, size);
  uint64_t id = 0;
  Status st;
  if (!ParseReplyHead(&r, &id, &st)) return;
  auto rest = r.rest();
  Bytes meta = ReplyMeta(id, st, Bytes(rest.begin(), rest.end()));
  Reader again(meta.data(), meta.size());
  uint64_t id2 = 0;
  Status st2;
  if (!ParseReplyHead(&again, &id2, &st2) || id2 != id || st2.ok() != st.ok()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t which = data[0];
  data++;
  size--;
  switch (which % 36) {
    case 0:
      RoundTrip<ClusterView>(data, size);
      break;
    case 1:
      RoundTrip<RegisterRequest>(data, size);
      break;
    case 2:
      RoundTrip<RegisterReply>(data, size);
      break;
    case 3:
      RoundTrip<CreateChunkItem>(data, size);
      break;
    case 4:
      RoundTrip<ChunkSlots>(data, size);
      break;
    case 5:
      RoundTrip<Grant>(data, size);
      break;
    case 6:
      RoundTrip<GrantRequest>(data, size);
      break;
    case 7:
      RoundTrip<PushDone>(data, size);
      break;
    case 8:
      RoundTrip<PushAck>(data, size);
      break;
    case 9:
      RoundTrip<transport::RemoteKey>(data, size);
      break;
    case 10:
      RoundTrip<Optimizer>(data, size);
      break;
    case 11:
      ReplyHead(data, size);
      break;
    case 13:
      RoundTrip<BarrierRequest>(data, size);
      break;
    case 14:
      RoundTrip<DeclareRequest>(data, size);
      break;
    case 15:
      RoundTrip<DeclareReply>(data, size);
      break;
    case 16:
      RoundTrip<CreateChunksRequest>(data, size);
      break;
    case 17:
      RoundTrip<CreateChunksReply>(data, size);
      break;
    case 18:
      RoundTrip<BatchRequest>(data, size);
      break;
    case 19:
      RoundTrip<BatchAnswer>(data, size);
      break;
    case 20:
      RoundTrip<ServerDown>(data, size);
      break;
    case 21:
      RoundTrip<WorkerDown>(data, size);
      break;
    case 22:
      RoundTrip<BackupOrders>(data, size);
      break;
    case 23:
      RoundTrip<BackupRebuilt>(data, size);
      break;
    case 24:
      RoundTrip<InstallReplica>(data, size);
      break;
    case 25:
      RoundTrip<WorkerUp>(data, size);
      break;
    case 26:
      RoundTrip<ReplicaMembership>(data, size);
      break;
    case 27:
      RoundTrip<CheckpointGate>(data, size);
      break;
    case 28:
      RoundTrip<CheckpointCounts>(data, size);
      break;
    case 29:
      RoundTrip<CheckpointCuts>(data, size);
      break;
    case 30:
      RoundTrip<CheckpointDone>(data, size);
      break;
    case 31:
      RoundTrip<TakeCheckpoint>(data, size);
      break;
    case 32:
      RoundTrip<SaveChunksRequest>(data, size);
      break;
    case 33:
      RoundTrip<ServerJoined>(data, size);
      break;
    case 34:
      RoundTrip<ServerReached>(data, size);
      break;
    case 35:
      RoundTrip<ForwardedStep>(data, size);
      break;
    case 12: {
      // Counts read off the wire before vectors are sized.
      Reader r(data, size);
      uint32_t n = 0;
      if (r.Get(&n) && r.Fits(n, 12)) {
        std::vector<uint64_t> v;
        v.reserve(n);
      }
      Bytes b;
      std::vector<float> f;
      std::string s;
      Reader r2(data, size);
      (void)r2.GetBytes(&b, 1 << 20);
      (void)r2.GetVector(&f, 1 << 20);
      (void)r2.GetString(&s);
      break;
    }
  }
  return 0;
}
