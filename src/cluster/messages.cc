#include "cluster/messages.h"

#include <algorithm>
#include <cmath>

namespace shardps::cluster {

const char* RoleName(Role r) { return r == Role::kServer ? "server" : "worker"; }

void ClusterView::Encode(Writer* w) const {
  w->Put(num_servers);
  w->Put(num_workers);
  w->Put<uint32_t>(static_cast<uint32_t>(servers.size()));
  for (const auto& s : servers) {
    w->Put(s.node_id);
    w->PutString(s.address);
  }
  w->Put<uint8_t>(static_cast<uint8_t>(mode));
  w->Put(staleness);
  w->Put<uint8_t>(static_cast<uint8_t>(aggregate));
  w->Put(sync_quorum);
  w->Put<uint32_t>(static_cast<uint32_t>(worker_weights.size()));
  for (float x : worker_weights) w->Put(x);
  w->Put<uint8_t>(static_cast<uint8_t>(weight_rule));
  w->Put(chunk_bytes);
  w->Put(heartbeat_ms);
  w->Put(heartbeat_timeout_ms);
  w->PutString(transport);
  w->Put<uint32_t>(static_cast<uint32_t>(worker_nodes.size()));
  for (uint32_t n : worker_nodes) w->Put(n);
  w->Put(job_id);
  w->Put(replicas);
  w->Put(failover_timeout_ms);
}

uint32_t ClusterView::num_pushers() const {
  if (worker_nodes.empty()) return num_workers;
  uint32_t n = 0;
  for (uint32_t x : worker_nodes) n = std::max(n, x + 1);
  return n;
}

bool ClusterView::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&num_servers) || !r->Get(&num_workers) || !r->Get(&n) || n > 65536 || !r->Fits(n, 8))
    return false;
  servers.resize(n);
  for (auto& s : servers)
    if (!r->Get(&s.node_id) || !r->GetString(&s.address, 1024)) return false;
  uint8_t m = 0, a = 0, wr = 0;
  uint32_t nw = 0;
  if (!r->Get(&m) || !r->Get(&staleness) || !r->Get(&a) || !r->Get(&sync_quorum) || !r->Get(&nw) ||
      m > 2 || a > 1 || (nw != 0 && nw != num_workers) || !r->Fits(nw, 4))
    return false;
  worker_weights.resize(nw);
  for (auto& x : worker_weights)
    if (!r->Get(&x) || !std::isfinite(x) || x < 0) return false;
  if (!r->Get(&wr) || wr > 1) return false;
  mode = static_cast<Mode>(m);
  aggregate = static_cast<Aggregate>(a);
  weight_rule = static_cast<WeightRule>(wr);
  uint32_t nn = 0;
  if (!r->Get(&chunk_bytes) || !r->Get(&heartbeat_ms) || !r->Get(&heartbeat_timeout_ms) ||
      !r->GetString(&transport, 64) || !r->Get(&nn) || (nn != 0 && nn != num_workers) ||
      !r->Fits(nn, 4))
    return false;
  worker_nodes.resize(nn);
  // Node numbers are dense: each below the number of workers, and every one below the largest
  // is some worker's.
  std::vector<bool> seen(nn, false);
  for (auto& x : worker_nodes) {
    if (!r->Get(&x) || x >= nn) return false;
    seen[x] = true;
  }
  const uint32_t nodes = nn == 0 ? 0 : num_pushers();
  for (uint32_t i = 0; i < nodes; ++i)
    if (!seen[i]) return false;
  return r->Get(&job_id) && r->Get(&replicas) && replicas <= 1 && r->Get(&failover_timeout_ms);
}

void ServerDown::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(rank);
}

bool ServerDown::Decode(Reader* r) { return r->Get(&epoch) && r->Get(&rank); }

void ServerJoined::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(rank);
  w->Put(node_id);
  w->PutString(address);
}

bool ServerJoined::Decode(Reader* r) {
  return r->Get(&epoch) && r->Get(&rank) && rank < kMaxServers && r->Get(&node_id) &&
         r->GetString(&address, 1024) && !address.empty();
}

void ServerReached::Encode(Writer* w) const {
  w->Put(rank);
  w->PutString(error);
}

bool ServerReached::Decode(Reader* r) { return r->Get(&rank) && r->GetString(&error, 4096); }

void WorkerDown::Encode(Writer* w) const { w->Put(rank); }

bool WorkerDown::Decode(Reader* r) { return r->Get(&rank); }

void WorkerUp::Encode(Writer* w) const { w->Put(rank); }

bool WorkerUp::Decode(Reader* r) { return r->Get(&rank); }

void CheckpointGate::Encode(Writer* w) const {
  w->Put(id);
  w->Put(timeout_ms);
}

bool CheckpointGate::Decode(Reader* r) { return r->Get(&id) && r->Get(&timeout_ms); }

namespace {
constexpr uint32_t kMaxCheckpointTensors = 1 << 20;
// An optional float (a push's or a step's learning rate): u8 present (0 or 1), then the value.
void PutOptional(Writer* w, const std::optional<float>& v) {
  w->Put<uint8_t>(v ? 1 : 0);
  if (v) w->Put(*v);
}
[[nodiscard]] bool GetOptional(Reader* r, std::optional<float>* v) {
  uint8_t has = 0;
  if (!r->Get(&has) || has > 1) return false;
  v->reset();
  if (has == 0) return true;
  float x = 0;
  if (!r->Get(&x)) return false;
  *v = x;
  return true;
}
constexpr size_t kMaxTensorName = 1024;
constexpr uint32_t kMaxWorkers = 65536;
}  // namespace

void CheckpointCounts::Encode(Writer* w) const {
  w->Put(id);
  w->Put(static_cast<uint32_t>(tensors.size()));
  for (const auto& [name, seq] : tensors) {
    w->PutString(name);
    w->Put(seq);
  }
}

bool CheckpointCounts::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&id) || !r->Get(&n) || n > kMaxCheckpointTensors || n > r->remaining() / 12)
    return false;
  tensors.resize(n);
  for (auto& [name, seq] : tensors)
    if (!r->GetString(&name, kMaxTensorName) || !r->Get(&seq)) return false;
  return true;
}

uint64_t CheckpointCut::Bound(Mode mode, uint32_t w) const {
  if (issued.empty()) return step;  // a worker's own cuts
  if (mode == Mode::kAsync) return w < issued.size() && issued[w] != kNotHeld ? issued[w] : 0;
  uint64_t most = mode == Mode::kSync ? step : 0;
  for (uint64_t s : issued)
    if (s != kNotHeld) most = std::max(most, s);
  return most;
}

void CheckpointCut::Encode(Writer* w) const {
  w->PutString(tensor);
  w->Put(static_cast<uint32_t>(issued.size()));
  for (uint64_t s : issued) w->Put(s);
  w->Put(step);
}

bool CheckpointCut::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->GetString(&tensor, kMaxTensorName) || !r->Get(&n) || n > kMaxWorkers ||
      n > r->remaining() / 8)  // each u64, then the step
    return false;
  issued.resize(n);
  for (auto& s : issued)
    if (!r->Get(&s)) return false;
  return r->Get(&step);
}

namespace {
void EncodeCuts(Writer* w, const std::vector<CheckpointCut>& cuts) {
  w->Put(static_cast<uint32_t>(cuts.size()));
  for (const auto& c : cuts) c.Encode(w);
}

bool DecodeCuts(Reader* r, std::vector<CheckpointCut>* cuts) {
  uint32_t n = 0;
  // A cut is at least 16 bytes: an empty name, no counts, the step.
  if (!r->Get(&n) || n > kMaxCheckpointTensors || n > r->remaining() / 16) return false;
  cuts->resize(n);
  for (auto& c : *cuts)
    if (!c.Decode(r)) return false;
  return true;
}
}  // namespace

void CheckpointCuts::Encode(Writer* w) const {
  w->Put(id);
  w->Put<uint8_t>(static_cast<uint8_t>(mode));
  w->PutString(dir);
  w->Put(timeout_ms);
  EncodeCuts(w, cuts);
}

bool CheckpointCuts::Decode(Reader* r) {
  uint8_t m = 0;
  if (!r->Get(&id) || !r->Get(&m) || m > static_cast<uint8_t>(Mode::kSsp)) return false;
  mode = static_cast<Mode>(m);
  return r->GetString(&dir, 4096) && !dir.empty() && dir.front() == '/' && r->Get(&timeout_ms) &&
         DecodeCuts(r, &cuts);
}

void CheckpointDone::Encode(Writer* w) const {
  w->Put(id);
  EncodeStatus(w, status);
  w->PutString(about);
}

bool CheckpointDone::Decode(Reader* r) {
  return r->Get(&id) && DecodeStatus(r, &status) && r->GetString(&about, 65536);
}

void TakeCheckpoint::Encode(Writer* w) const {
  w->PutString(dir);
  w->Put(timeout_ms);
}

bool TakeCheckpoint::Decode(Reader* r) {
  return r->GetString(&dir, 4096) && !dir.empty() && dir.front() == '/' && r->Get(&timeout_ms);
}

void SaveChunksRequest::Encode(Writer* w) const {
  w->PutString(dir);
  w->PutString(name);
  w->Put(wait_ms);
  EncodeCuts(w, cuts);
}

bool SaveChunksRequest::Decode(Reader* r) {
  // A file name of its own in an absolute directory.
  return r->GetString(&dir, 4096) && !dir.empty() && dir.front() == '/' &&
         r->GetString(&name, 256) && !name.empty() && name.find('/') == std::string::npos &&
         name != "." && name != ".." && r->Get(&wait_ms) && DecodeCuts(r, &cuts);
}

void ForwardedStep::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(chunk_id);
  w->Put(seq);
  PutOptional(w, lr);
  w->Put(scale);
  w->PutVector(std::span<const uint32_t>(pushers));
}

bool ForwardedStep::Decode(Reader* r) {
  return r->Get(&epoch) && r->Get(&chunk_id) && r->Get(&seq) && GetOptional(r, &lr) &&
         r->Get(&scale) && r->GetVector(&pushers, kMaxWorkers);
}

void ReplicaMembership::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(chunk_id);
  w->Put(pusher);
  w->Put<uint8_t>(static_cast<uint8_t>(change));
  w->Put(from);
}

bool ReplicaMembership::Decode(Reader* r) {
  uint8_t c = 0;
  if (!r->Get(&epoch) || !r->Get(&chunk_id) || !r->Get(&pusher) || !r->Get(&c) || c > 2 ||
      !r->Get(&from))
    return false;
  change = static_cast<MembershipChange>(c);
  return true;
}

void BackupOrders::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(static_cast<uint32_t>(items.size()));
  for (const auto& it : items) {
    w->Put(it.chunk_id);
    w->Put(it.backup);
  }
}

bool BackupOrders::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&epoch) || !r->Get(&n) || n > r->remaining() / 12) return false;
  items.resize(n);
  for (auto& it : items)
    if (!r->Get(&it.chunk_id) || !r->Get(&it.backup)) return false;
  return true;
}

void BackupRebuilt::Encode(Writer* w) const {
  w->Put(chunk_id);
  w->Put(backup);
  w->PutString(error);
}

bool BackupRebuilt::Decode(Reader* r) {
  return r->Get(&chunk_id) && r->Get(&backup) && r->GetString(&error, 4096);
}

void InstallReplica::Encode(Writer* w) const {
  w->Put(epoch);
  item.Encode(w);
  w->Put(version);
  w->Put(steps);
  w->Put(static_cast<uint32_t>(last_seq.size()));
  for (uint64_t s : last_seq) w->Put(s);
  w->Put(static_cast<uint32_t>(removed.size()));
  for (uint32_t p : removed) w->Put(p);
  w->Put(static_cast<uint32_t>(join_from.size()));
  for (uint64_t f : join_from) w->Put(f);
  w->Put(m_floats);
  w->Put(v_floats);
}

bool InstallReplica::Decode(Reader* r, uint32_t pushers) {
  uint32_t n = 0;
  if (!r->Get(&epoch) || !item.Decode(r) || !r->Get(&version) || !r->Get(&steps) || !r->Get(&n) ||
      n > pushers || n > r->remaining() / 8)
    return false;
  last_seq.resize(n);
  for (auto& s : last_seq)
    if (!r->Get(&s)) return false;
  if (!r->Get(&n) || n > pushers || n > r->remaining() / 4) return false;
  removed.resize(n);
  for (auto& p : removed)
    if (!r->Get(&p)) return false;
  if (!r->Get(&n) || n > pushers || n > r->remaining() / 8) return false;
  join_from.resize(n);
  for (auto& f : join_from)
    if (!r->Get(&f)) return false;
  return r->Get(&m_floats) && r->Get(&v_floats);
}

void RegisterRequest::Encode(Writer* w) const {
  w->Put<uint8_t>(static_cast<uint8_t>(role));
  w->Put(rank);
  w->PutString(data_address);
  w->PutString(host);
  w->Put(pid);
  w->PutString(transport);
  w->PutString(node);
  w->Put(local_rank);
  w->Put(local_size);
}

bool RegisterRequest::Decode(Reader* r) {
  uint8_t ro = 0;
  if (!r->Get(&ro) || (ro != 1 && ro != 2)) return false;
  role = static_cast<Role>(ro);
  return r->Get(&rank) && r->GetString(&data_address, 1024) && r->GetString(&host, 1024) &&
         r->Get(&pid) && r->GetString(&transport, 64) && r->GetString(&node, 1024) &&
         r->Get(&local_rank) && r->Get(&local_size);
}

void RegisterReply::Encode(Writer* w) const {
  w->Put(node_id);
  w->Put(rank);
  view.Encode(w);
  w->Put<uint8_t>(rejoined ? 1 : 0);
  w->Put<uint8_t>(joined ? 1 : 0);
  w->Put(epoch);
  w->PutVector(std::span<const uint32_t>(dead_servers));
  w->PutVector(std::span<const uint32_t>(removed_workers));
}

bool RegisterReply::Decode(Reader* r) {
  uint8_t j = 0, s = 0;
  if (!r->Get(&node_id) || !r->Get(&rank) || !view.Decode(r) || !r->Get(&j) || j > 1 ||
      !r->Get(&s) || s > 1 || !r->Get(&epoch) || !r->GetVector(&dead_servers, kMaxServers) ||
      !r->GetVector(&removed_workers, kMaxWorkers))
    return false;
  rejoined = j == 1;
  joined = s == 1;
  for (uint32_t d : dead_servers)
    if (d >= view.servers.size()) return false;
  for (uint32_t w : removed_workers)
    if (w >= view.num_workers) return false;
  return true;
}

void EncodeOptimizer(const OptimizerConfig& o, Writer* w) {
  w->Put<uint8_t>(static_cast<uint8_t>(o.kind));
  w->Put(o.lr);
  w->Put(o.weight_decay);
  w->Put(o.momentum);
  w->Put<uint8_t>(o.nesterov ? 1 : 0);
  w->Put(o.beta1);
  w->Put(o.beta2);
  w->Put(o.eps);
  w->Put(o.initial_accumulator);
}

bool DecodeOptimizer(Reader* r, OptimizerConfig* o) {
  uint8_t k = 0, nesterov = 0;
  if (!r->Get(&k) || k > 3) return false;
  o->kind = static_cast<OptimizerKind>(k);
  if (!r->Get(&o->lr) || !r->Get(&o->weight_decay) || !r->Get(&o->momentum) || !r->Get(&nesterov) ||
      !r->Get(&o->beta1) || !r->Get(&o->beta2) || !r->Get(&o->eps) ||
      !r->Get(&o->initial_accumulator))
    return false;
  o->nesterov = nesterov != 0;
  return true;
}

namespace {
bool DecodeCodecs(Reader* r, CreateChunkItem* it) {
  uint8_t push = 0, pull = 0;
  if (!r->Get(&push) || !r->Get(&it->push_block) || !r->Get(&pull)) return false;
  if (push > static_cast<uint8_t>(Codec::kTopK) || pull > static_cast<uint8_t>(Codec::kBf16))
    return false;
  it->push_codec = static_cast<Codec>(push);
  it->pull_codec = static_cast<Codec>(pull);
  return it->push_block > 0;
}
}  // namespace

void CreateChunkItem::Encode(Writer* w) const {
  w->Put(chunk_id);
  w->PutString(tensor);
  w->Put(offset);
  w->Put(numel);
  EncodeOptimizer(optimizer, w);
  w->Put(static_cast<uint8_t>(push_codec));
  w->Put(push_block);
  w->Put(static_cast<uint8_t>(pull_codec));
  w->Put(primary);
  w->Put(backup);
}

bool CreateChunkItem::Decode(Reader* r) {
  return r->Get(&chunk_id) && r->GetString(&tensor, 4096) && r->Get(&offset) && r->Get(&numel) &&
         DecodeOptimizer(r, &optimizer) && DecodeCodecs(r, this) && r->Get(&primary) &&
         r->Get(&backup);
}

void ChunkSlots::Encode(Writer* w) const {
  key.Encode(w);
  w->Put(slot_stride);
  w->Put(version);
  w->Put(next_seq);
}

bool ChunkSlots::Decode(Reader* r) {
  return key.Decode(r) && r->Get(&slot_stride) && r->Get(&version) && r->Get(&next_seq);
}

void LandingGrant::Encode(Writer* w, uint32_t buffer, uint64_t offset,
                          const transport::RemoteKey& key) {
  w->Put(buffer);
  w->Put(offset);
  key.Encode(w);
}

bool LandingGrant::Decode(Reader* r) { return r->Get(&buffer) && r->Get(&offset) && key.Decode(r); }

void BarrierRequest::Encode(Writer* w) const {
  w->PutString(name);
  w->Put(timeout_ms);
}

bool BarrierRequest::Decode(Reader* r) { return r->GetString(&name, 256) && r->Get(&timeout_ms); }

void DeclareRequest::Encode(Writer* w) const {
  w->Put<uint32_t>(static_cast<uint32_t>(items.size()));
  for (const auto& it : items) {
    w->PutString(it.name);
    w->Put(it.numel);
  }
}

bool DeclareRequest::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&n) || n > (1u << 20) || !r->Fits(n, 12)) return false;
  items.resize(n);
  for (auto& it : items)
    if (!r->GetString(&it.name, 4096) || !r->Get(&it.numel)) return false;
  return true;
}

void DeclareReply::Encode(Writer* w) const {
  w->Put<uint32_t>(static_cast<uint32_t>(tensors.size()));
  for (const auto& t : tensors) {
    w->Put<uint32_t>(static_cast<uint32_t>(t.chunks.size()));
    for (const auto& p : t.chunks) {
      w->Put(p.chunk_id);
      w->Put(p.server);
      w->Put(p.backup);
      w->Put(p.offset);
      w->Put(p.numel);
    }
  }
}

bool DeclareReply::Decode(Reader* r, uint32_t servers) {
  uint32_t n = 0;
  if (!r->Get(&n) || !r->Fits(n, 4)) return false;
  tensors.resize(n);
  for (auto& t : tensors) {
    uint32_t k = 0;
    if (!r->Get(&k) || k > (1u << 24) || !r->Fits(k, 32)) return false;
    t.chunks.resize(k);
    for (auto& c : t.chunks)
      if (!r->Get(&c.chunk_id) || !r->Get(&c.server) || !r->Get(&c.backup) || !r->Get(&c.offset) ||
          !r->Get(&c.numel) || c.server >= servers ||
          (c.backup != kNoServer && (c.backup >= servers || c.backup == c.server)))
        return false;
  }
  return true;
}

void CreateChunksRequest::Encode(Writer* w) const {
  w->Put<uint32_t>(static_cast<uint32_t>(items.size()));
  for (const auto& it : items) it.Encode(w);
  w->Put(worker);
  w->Put(static_cast<uint32_t>(rejoin_from.size()));
  for (uint64_t f : rejoin_from) w->Put(f);
}

bool CreateChunksRequest::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&n) || n > (1u << 20)) return false;
  // One at a time: the vector grows with what arrived, not with the count the peer claims.
  items.clear();
  for (uint32_t k = 0; k < n; ++k)
    if (!items.emplace_back().Decode(r)) return false;
  if (!r->Get(&worker) || worker < -1 || !r->Get(&n) || n > items.size()) return false;
  rejoin_from.resize(n);
  for (auto& f : rejoin_from)
    if (!r->Get(&f)) return false;
  return true;
}

void CreateChunksReply::Encode(Writer* w) const {
  w->Put<uint32_t>(static_cast<uint32_t>(chunks.size()));
  for (const auto& c : chunks) c.Encode(w);
}

bool CreateChunksReply::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&n) || n > (1u << 20)) return false;
  chunks.clear();
  for (uint32_t k = 0; k < n; ++k)
    if (!chunks.emplace_back().Decode(r)) return false;
  return true;
}

void GrantRequest::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(chunk_id);
  w->Put(bytes);
  w->Put(worker);
  w->Put(seq);
}

bool GrantRequest::Decode(Reader* r) {
  return r->Get(&epoch) && r->Get(&chunk_id) && r->Get(&bytes) && r->Get(&worker) && r->Get(&seq);
}

void PushDone::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(chunk_id);
  w->Put(buffer);
  w->Put(worker);
  w->Put(seq);
  w->Put(bytes);
  w->Put(base_version);
  PutOptional(w, lr);
}

bool PushDone::Decode(Reader* r) {
  return r->Get(&epoch) && r->Get(&chunk_id) && r->Get(&buffer) && r->Get(&worker) &&
         r->Get(&seq) && r->Get(&bytes) && r->Get(&base_version) && GetOptional(r, &lr);
}

void PushAck::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(version);
  w->Put<uint8_t>(static_cast<uint8_t>((has_ahead ? 1 : 0) | (late ? 2 : 0)));
  if (has_ahead) LandingGrant::Encode(w, ahead.buffer, ahead.offset, ahead.key);
}

bool PushAck::Decode(Reader* r) {
  uint8_t a = 0;
  if (!r->Get(&epoch) || !r->Get(&version) || !r->Get(&a) || a > 3) return false;
  has_ahead = (a & 1) != 0;
  late = (a & 2) != 0;
  return !has_ahead || ahead.Decode(r);
}

void EncodeStatus(Writer* w, const Status& st) {
  w->Put<int32_t>(static_cast<int32_t>(st.code()));
  w->PutString(st.message());
}

bool DecodeStatus(Reader* r, Status* st) {
  int32_t code = 0;
  std::string msg;
  if (!r->Get(&code) || !r->GetString(&msg)) return false;
  switch (code) {
    case 0:
      *st = Status::OK();
      break;
    case static_cast<int32_t>(Status::Code::kTimeout):
      *st = Status::Timeout(msg);
      break;
    case static_cast<int32_t>(Status::Code::kInvalidArgument):
      *st = Status::InvalidArgument(msg);
      break;
    case static_cast<int32_t>(Status::Code::kUnavailable):
      *st = Status::Unavailable(msg);
      break;
    case static_cast<int32_t>(Status::Code::kNotFound):
      *st = Status::NotFound(msg);
      break;
    case static_cast<int32_t>(Status::Code::kAborted):
      *st = Status::Aborted(msg);
      break;
    default:
      *st = Status::RemoteError(msg);
  }
  return true;
}

Bytes ReplyMeta(uint64_t request_id, const Status& st, const Bytes& body) {
  Bytes b;
  Writer w(&b);
  w.Put(request_id);
  EncodeStatus(&w, st);
  w.PutRaw(body.data(), body.size());
  return b;
}

bool ParseReplyHead(Reader* r, uint64_t* request_id, Status* st) {
  return r->Get(request_id) && DecodeStatus(r, st);
}

namespace {
constexpr uint8_t kEntryPush = 1, kEntryPull = 2, kEntryLr = 4;
constexpr size_t kMinEntryBytes = 9;    // chunk id, flags
constexpr size_t kMinResultBytes = 21;  // entry, code, message length, version, flags
}  // namespace

void BatchRequest::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(worker);
  w->Put(static_cast<uint32_t>(entries.size()));
  for (const auto& e : entries) {
    w->Put(e.chunk_id);
    w->Put<uint8_t>(static_cast<uint8_t>((e.push ? kEntryPush : 0) | (e.pull ? kEntryPull : 0) |
                                         (e.push && e.lr ? kEntryLr : 0)));
    if (!e.push) continue;
    w->Put(e.seq);
    w->Put(e.bytes);
    w->Put(e.base_version);
    if (e.lr) w->Put(*e.lr);
  }
}

bool BatchRequest::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&epoch) || !r->Get(&worker) || !r->Get(&n)) return false;
  if (n == 0 || n > kMaxBatchEntries || !r->Fits(n, kMinEntryBytes)) return r->Fail();
  entries.assign(n, {});
  for (auto& e : entries) {
    uint8_t flags = 0;
    if (!r->Get(&e.chunk_id) || !r->Get(&flags)) return false;
    if (flags == 0 || flags > 7 || ((flags & kEntryLr) && !(flags & kEntryPush))) return r->Fail();
    e.push = (flags & kEntryPush) != 0;
    e.pull = (flags & kEntryPull) != 0;
    if (!e.push) continue;
    if (!r->Get(&e.seq) || !r->Get(&e.bytes) || !r->Get(&e.base_version)) return false;
    if (flags & kEntryLr) {
      float lr = 0;
      if (!r->Get(&lr)) return false;
      e.lr = lr;
    }
  }
  return true;
}

void BatchAnswer::Encode(Writer* w) const {
  w->Put(epoch);
  w->Put(batch);
  w->Put(static_cast<uint32_t>(results.size()));
  for (const auto& x : results) {
    w->Put(x.entry);
    EncodeStatus(w, x.status);
    w->Put(x.version);
    w->Put<uint8_t>(static_cast<uint8_t>((x.late ? 1 : 0) | (x.pulled_bytes ? 2 : 0)));
    if (x.pulled_bytes == 0) continue;
    w->Put(x.pulled_version);
    w->Put(x.pulled_bytes);
  }
}

bool BatchAnswer::Decode(Reader* r) {
  uint32_t n = 0;
  if (!r->Get(&epoch) || !r->Get(&batch) || !r->Get(&n)) return false;
  if (n == 0 || n > kMaxBatchEntries || !r->Fits(n, kMinResultBytes)) return r->Fail();
  results.assign(n, {});
  for (auto& x : results) {
    uint8_t flags = 0;
    if (!r->Get(&x.entry) || x.entry >= kMaxBatchEntries || !DecodeStatus(r, &x.status) ||
        !r->Get(&x.version) || !r->Get(&flags))
      return r->Fail();
    if (flags > 3) return r->Fail();
    x.late = (flags & 1) != 0;
    if (!(flags & 2)) continue;
    if (!r->Get(&x.pulled_version) || !r->Get(&x.pulled_bytes) || x.pulled_bytes == 0)
      return r->Fail();
  }
  return true;
}

}  // namespace shardps::cluster
