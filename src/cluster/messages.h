// Control-plane messages between coordinator, servers and workers (docs/protocol.md,
// "Messages"). Every request's metadata starts with a u64 request id; every reply is a
// kReply message whose metadata is [request id][status code][status message][body].
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/codec.h"
#include "shardps/status.h"
#include "shardps/types.h"
#include "transport/memory.h"

namespace shardps::cluster {

enum Tag : uint32_t {
  kReply = 1,
  // a client (`shardps checkpoint`) -> coordinator: TakeCheckpoint; the reply's body is a
  // string saying what was written (docs/fault-tolerance.md, "Checkpoints of a running job")
  kTakeCheckpoint = 9,
  // node -> coordinator
  kRegister = 10,
  kHeartbeat = 11,
  kBarrier = 12,
  kDeclare = 13,
  kGoodbye = 14,
  kReportFailure = 15,
  kBackupRebuilt = 16,     // BackupRebuilt (server, request id 0): a new backup of a chunk is whole
  kWorkerRestored = 17,    // WorkerUp (server, request id 0): its chunks wait for a rejoined worker
  kCheckpointCounts = 18,  // CheckpointCounts (worker, request id 0): its pushes issued so far
  kCheckpointDone = 19,    // CheckpointDone (worker 0, request id 0): how the checkpoint ended
  // coordinator -> node (request id 0, no reply)
  kNodeFailed = 20,
  kShutdown = 21,
  kServerDown = 22,      // ServerDown: a server was replaced by its chunks' backups
  kWorkerDown = 23,      // WorkerDown (to servers): a worker was removed from the job
  kRebuildBackups = 24,  // BackupOrders (to a chunk's primary): copy these chunks to new backups
  kBackupsAdded = 25,    // BackupOrders (to workers): these chunks have a new backup
  kWorkerUp = 26,        // WorkerUp (to servers): a removed worker rejoins the job
  // Checkpoints of a running job (to workers): CheckpointGate (hold new pushes, say what was
  // issued), CheckpointCuts (push up to the cut; worker 0 writes the checkpoint), and
  // CheckpointGate again (timeout 0) to release the held pushes.
  kCheckpointGate = 27,
  kCheckpointCuts = 28,
  kCheckpointRelease = 29,
  // worker -> server
  kCreateChunks = 30,
  kGrant = 31,
  kPushDone = 32,
  kStats = 33,
  kBatch = 34,
  // server -> worker (no reply)
  kBatchAnswer = 35,
  // worker 0 -> server: write your chunks into a checkpoint (docs/fault-tolerance.md)
  kSaveChunks = 36,
  // server -> server: a push to a chunk, for its backup (a PushDone whose `worker` is the
  // pusher and whose bytes are the payload); the reply is a PushAck (docs/fault-tolerance.md)
  kReplicate = 37,
  // server -> server: become the backup of a chunk (InstallReplica; the reply is a status)
  kInstallReplica = 38,
  // ReplicaMembership (primary -> backup): a pusher of a chunk was removed or rejoined, at this
  // point of the chunk's stream of replicated pushes.
  kReplicaMembership = 39,
  // A server joins the running job (docs/fault-tolerance.md, "A server that joins"): the
  // coordinator tells every live node (ServerJoined, request id 0); each answers once it
  // reached the new server (ServerReached, request id 0), and only then is it given chunks.
  kServerJoined = 40,
  kServerReached = 41,
  // server -> server: a sync step of a chunk whose primary forwards steps rather than pushes
  // (ForwardedStep; the payload is the step's sum, numel floats); the reply is a PushAck
  // (docs/fault-tolerance.md, "A push").
  kReplicateStep = 42,
};

// The most servers a job has, those that joined it included.
inline constexpr uint32_t kMaxServers = 4096;

// No server: a chunk without a backup.
inline constexpr uint32_t kNoServer = UINT32_MAX;

enum class Role : uint8_t { kServer = 1, kWorker = 2 };
const char* RoleName(Role r);

struct ServerInfo {
  uint32_t node_id = 0;
  std::string address;  // where workers connect to for data
};

// What every node learns when the job is complete.
struct ClusterView {
  uint32_t num_servers = 0;
  uint32_t num_workers = 0;
  std::vector<ServerInfo> servers;  // indexed by server rank
  Mode mode = Mode::kSync;
  uint32_t staleness = 0;  // ssp:K
  Aggregate aggregate = Aggregate::kMean;
  uint32_t sync_quorum = 0;           // sync: pushes that publish a step (0: every worker)
  std::vector<float> worker_weights;  // empty, or one per worker (Decode refuses other counts)
  WeightRule weight_rule = WeightRule::kFixed;
  uint64_t chunk_bytes = 4 << 20;
  uint32_t heartbeat_ms = 500;
  uint32_t heartbeat_timeout_ms = 5000;
  std::string transport = "tcp";
  // Node-level reduction (docs/node-reduction.md): the node of each worker rank, numbered from
  // 0 in the order of their lowest worker rank; empty when every worker pushes on its own.
  std::vector<uint32_t> worker_nodes;
  // Names this run of the job (random, from the coordinator): the shared-memory segments of a
  // node's workers carry it.
  uint64_t job_id = 0;
  // Backups of every chunk (0 or 1; docs/fault-tolerance.md), and how long a silent server is
  // waited for before it is replaced (with replicas).
  uint32_t replicas = 0;
  uint32_t failover_timeout_ms = 2000;

  // Nodes of the job: the processes that push (each worker when there are none).
  uint32_t num_pushers() const;
  // The pusher a worker's pushes count for: its node, or itself.
  uint32_t PusherOf(uint32_t worker) const {
    return worker_nodes.empty() ? worker : worker_nodes[worker];
  }

  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

struct RegisterRequest {
  Role role = Role::kWorker;
  int32_t rank = -1;  // requested rank, -1: any
  std::string data_address;
  std::string host;
  uint32_t pid = 0;
  std::string transport = "tcp";  // data-plane transport; must match the job's
  // Workers: the node it reduces with (docs/node-reduction.md), its rank there and the node's
  // number of workers; local_size 1: none.
  std::string node;
  int32_t local_rank = -1;
  uint32_t local_size = 1;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

struct RegisterReply {
  uint32_t node_id = 0;
  uint32_t rank = 0;
  ClusterView view;
  // A worker that rejoins a running job in the place of one removed (docs/fault-tolerance.md):
  // the chunks exist, and each tells it at attach where its pushes go on.
  bool rejoined = false;
  // A server that joins a running job (`joined`): the shard map's epoch, the servers declared
  // dead (ranks in `view.servers` it must not reach), and the workers removed from the job (its
  // chunks' steps do not wait for them).
  bool joined = false;
  uint64_t epoch = 0;
  std::vector<uint32_t> dead_servers;
  std::vector<uint32_t> removed_workers;  // worker ranks removed from the job, not taken again
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// One chunk of a tensor as assigned by the coordinator.
struct ChunkPlacement {
  uint64_t chunk_id = 0;
  uint32_t server = 0;          // server rank of its primary
  uint32_t backup = kNoServer;  // server rank of its backup, if it has one
  uint64_t offset = 0;          // first element in the tensor
  uint64_t numel = 0;
};

struct DeclareItem {
  std::string name;
  uint64_t numel = 0;
};

struct TensorPlacement {
  std::vector<ChunkPlacement> chunks;
};

struct CreateChunkItem {
  uint64_t chunk_id = 0;
  std::string tensor;
  uint64_t offset = 0;
  uint64_t numel = 0;
  OptimizerConfig optimizer;
  // How pushes to the chunk are encoded (codec and block; docs/compression.md) and how its
  // parameters are published for pulls (kNone, kFp16, kBf16).
  Codec push_codec = Codec::kNone;
  uint32_t push_block = 256;
  Codec pull_codec = Codec::kNone;
  // Its primary and backup (kNoServer: none) when it was placed: a server that is its backup
  // forwards nothing and takes the primary's kReplicate until the primary is declared dead.
  uint32_t primary = 0;
  uint32_t backup = kNoServer;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kServerDown (coordinator -> every node, request id 0): server `rank` was declared dead and the
// shard map moved to `epoch`: each chunk it was primary of is now served by its backup, and each
// chunk it was the backup of has none.
struct ServerDown {
  uint64_t epoch = 0;
  uint32_t rank = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kServerJoined (coordinator -> every live node, request id 0): server `rank` joined the running
// job at `address` (its data address); it holds nothing yet. Each node connects to it and
// answers kServerReached.
struct ServerJoined {
  uint64_t epoch = 0;
  uint32_t rank = 0;
  uint32_t node_id = 0;
  std::string address;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kServerReached (node -> coordinator, request id 0): this node reached server `rank` that
// joined (an empty `error`), or cannot (why).
struct ServerReached {
  uint32_t rank = 0;
  std::string error;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kWorkerDown (coordinator -> every live server, request id 0): worker `rank` died and was
// removed from the job (--on-worker-loss continue): sync steps complete without it, and its
// pushes are refused from now on.
struct WorkerDown {
  uint32_t rank = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kWorkerUp (coordinator -> every live server, request id 0): removed worker `rank` rejoins
// the job (a restarted process). Each server's chunks wait for it again, and their next
// sequence numbers for it are set; then the server answers with kWorkerRestored (the same
// message, request id 0), and only once every live server did is the worker let in.
struct WorkerUp {
  uint32_t rank = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kReplicateStep (a chunk's primary -> its backup): step `seq` as the primary published it: the
// pushers whose pushes its sum (the payload) holds, the update's learning rate and its factor of
// the sum. The backup applies the same update to the same sum, so both hold the same bits.
struct ForwardedStep {
  uint64_t epoch = 0;
  uint64_t chunk_id = 0;
  uint64_t seq = 0;
  std::optional<float> lr;
  float scale = 1.0f;
  std::vector<uint32_t> pushers;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kReplicaMembership (a chunk's primary -> its backup): pusher `pusher` was removed from the job,
// rejoined it, or (kJoinAt) starts its pushes at sequence number `from`, at this point of the
// chunk's replicated pushes, so that the backup's engine changes where the primary's did.
enum class MembershipChange : uint8_t { kRemoved = 0, kRejoined = 1, kJoinAt = 2 };
struct ReplicaMembership {
  uint64_t epoch = 0;
  uint64_t chunk_id = 0;
  uint32_t pusher = 0;
  MembershipChange change = MembershipChange::kRemoved;
  uint64_t from = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kRebuildBackups (coordinator -> a chunk's primary) and kBackupsAdded (coordinator -> every
// live worker), request id 0 (docs/fault-tolerance.md, "New backups"): chunk `chunk_id` gets
// (or got) a new backup on server `backup`, at shard map epoch `epoch`.
struct BackupOrder {
  uint64_t chunk_id = 0;
  uint32_t backup = 0;
};
struct BackupOrders {
  uint64_t epoch = 0;
  std::vector<BackupOrder> items;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kBackupRebuilt (a chunk's primary -> coordinator, request id 0): the new backup `backup` of
// chunk `chunk_id` holds it whole (an empty `error`), or could not be made (why).
struct BackupRebuilt {
  uint64_t chunk_id = 0;
  uint32_t backup = 0;
  std::string error;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kInstallReplica (primary -> new backup): the chunk as `item` describes it (its primary and
// backup: the sender and the receiver), and its state at one moment between updates: published
// version, optimizer steps and per-pusher sequence table in the metadata; the payload is the
// fp32 parameters followed by the optimizer's state vectors (m, then v; `state_floats` each).
struct InstallReplica {
  uint64_t epoch = 0;
  CreateChunkItem item;
  uint64_t version = 0;
  uint64_t steps = 0;
  std::vector<uint64_t> last_seq;
  std::vector<uint32_t> removed;  // the pushers removed from the job, in the primary's engine
  // Per pusher, a rejoined worker's first sync step (ChunkEngine::JoinAt), or empty.
  std::vector<uint64_t> join_from;
  uint64_t m_floats = 0;
  uint64_t v_floats = 0;
  void Encode(Writer* w) const;
  // `pushers`: a sequence table longer than that is refused.
  [[nodiscard]] bool Decode(Reader* r, uint32_t pushers = 1u << 20);
};

// kBarrier: wait until every worker reached `name`, at most `timeout_ms`.
struct BarrierRequest {
  std::string name;
  uint64_t timeout_ms = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kDeclare: tensors by name and size; the reply places each in chunks.
struct DeclareRequest {
  std::vector<DeclareItem> items;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};
struct DeclareReply {
  std::vector<TensorPlacement> tensors;
  void Encode(Writer* w) const;
  // `servers`: chunks placed on a server rank at or past it are refused.
  [[nodiscard]] bool Decode(Reader* r, uint32_t servers = UINT32_MAX);
};

// kCreateChunks: the chunks to create (payload: their initial floats, concatenated) or, with
// an empty payload, to attach to.
struct CreateChunksRequest {
  std::vector<CreateChunkItem> items;
  // The sending worker's rank (-1: not said): the server closes the connection if that worker is
  // removed from the job, and tells a worker that rejoined where its pushes go on
  // (ChunkSlots::next_seq). With `rejoin_from` (one per item, or empty: a rejoined worker's
  // second attach), the chunks must exist: its pushes to each start there (ChunkEngine::JoinAt).
  int32_t worker = -1;
  std::vector<uint64_t> rejoin_from;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// Where the published parameters of a chunk live on its server: two slots, each numel floats
// followed by a trailer u64 tag = version + 1, 0 while the slot is being rewritten (the server
// zeroes it before changing any byte of the slot and sets it after the last). Version v lives
// in slot v % 2.
struct ChunkSlots {
  transport::RemoteKey key;
  uint64_t slot_stride = 0;  // bytes from slot 0 to slot 1
  uint64_t version = 0;      // latest published version when created
  // To a worker that rejoined (CreateChunksRequest::worker): the sequence number of its
  // next push to the chunk; 0 otherwise.
  uint64_t next_seq = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// The reply to kCreateChunks: where each chunk's slots are, in the request's order.
struct CreateChunksReply {
  std::vector<ChunkSlots> chunks;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// A landing buffer granted for one push: `u32 buffer, u64 offset, remote key` (the reply to
// kGrant, and what a push acknowledgement carries when it grants the next buffer ahead).
struct LandingGrant {
  uint32_t buffer = 0;
  uint64_t offset = 0;
  transport::RemoteKey key;
  // Encodes without copying the pool's key.
  static void Encode(Writer* w, uint32_t buffer, uint64_t offset, const transport::RemoteKey& key);
  [[nodiscard]] bool Decode(Reader* r);
};

// Data plane (worker -> server). Each carries the shard-map epoch the sender routes by (0 until
// failover exists); the metadata of each request starts with the request id, then these fields.

// kGrant: a landing buffer for the push of `seq` of `chunk_id` by `worker`, `bytes` long. The
// server grants it once that push is admissible (sync: at most max_steps_ahead versions ahead
// of the chunk's published version), so a worker that runs ahead waits for credits holding no
// buffer; the reply is a LandingGrant.
struct GrantRequest {
  uint64_t epoch = 0;
  uint64_t chunk_id = 0;
  uint64_t bytes = 0;
  uint32_t worker = 0;
  uint64_t seq = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kPushDone: the push of `seq` of `chunk_id` by `worker` was written into landing `buffer`:
// `bytes` bytes, the chunk's gradient in its push codec.
struct PushDone {
  uint64_t epoch = 0;
  uint64_t chunk_id = 0;
  uint32_t buffer = 0;
  uint32_t worker = 0;
  uint64_t seq = 0;
  uint64_t bytes = 0;
  // The newest version of the chunk this worker had pulled when it pushed: the gradient's
  // base, from which the server counts its staleness (WeightRule::kStaleness, statistics).
  uint64_t base_version = 0;
  // The learning rate of the update this push is part of (Worker::SetLearningRate); none: the
  // one the tensor was declared with. The server refuses a negative or non-finite one.
  std::optional<float> lr;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// The reply to kPushDone: the version the push is part of (sync: the version that holds it is
// published), and possibly a landing buffer granted ahead for the worker's next push. `late`
// (sync with a quorum): the push's step was published without it and it was dropped; `version`
// is then the published version, and the worker's next push is for the step after it.
struct PushAck {
  uint64_t epoch = 0;
  uint64_t version = 0;
  bool late = false;
  bool has_ahead = false;
  LandingGrant ahead;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kBatch: operations on small chunks fused into one request per server (docs/protocol.md,
// "Batches"). Only chunks of at most kMaxBatchedChunkBytes of fp32 parameters travel this way:
// their server applies them on its transport thread, so one message is one pass over them. A
// push's gradient travels in the request's payload (the entries' bytes one after the other,
// in entry order, each padded to a multiple of 8), with no landing buffer and no grant; a pull's
// parameters come back in a kBatchAnswer's payload, read on the thread that publishes them, so they
// are never torn. An entry both pushes and pulls for push_pull: its parameters are read once the
// push is acknowledged. The request id is the batch's name in its answers; kBatch gets no kReply.
inline constexpr uint64_t kMaxBatchedChunkBytes = 64 << 10;
// sync: the steps a server sums ahead of a chunk's published version (a push further ahead
// waits: its grant, or on the worker, a batched push).
inline constexpr uint64_t kSyncStepsAhead = 2;
// Each push's gradient starts 8-aligned in the payload: its bytes are followed by zeros up to a
// multiple of 8, so the server reads floats and words of every codec where they are aligned.
inline constexpr uint64_t BatchPadded(uint64_t bytes) { return (bytes + 7) / 8 * 8; }
inline constexpr uint32_t kMaxBatchEntries = 8192;
// The most parameter bytes one batch may ask to pull (the reply's payload).
inline constexpr uint64_t kMaxBatchPullBytes = 32ull << 20;

struct BatchEntry {
  uint64_t chunk_id = 0;
  bool push = false;
  bool pull = false;
  // Push: as in PushDone.
  uint64_t seq = 0;
  uint64_t bytes = 0;
  uint64_t base_version = 0;
  std::optional<float> lr;
};

struct BatchRequest {
  uint64_t epoch = 0;
  uint32_t worker = 0;
  std::vector<BatchEntry> entries;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// What entry `entry` of a batch came to: its status (a refused entry changes nothing), the
// version its push is part of (as PushAck; `late` likewise), and, for a pull, the version read
// and how many bytes of the answer's payload hold its parameters (its slot's bytes: fp32, or
// its pull codec's).
struct BatchResult {
  uint32_t entry = 0;
  Status status;
  uint64_t version = 0;
  bool late = false;
  uint64_t pulled_version = 0;
  uint64_t pulled_bytes = 0;
};

// kBatchAnswer (server -> worker, no reply): the entries of batch `batch` (its request id)
// answered since the last answer, their parameters in the payload one after the other in
// result order. Entries are answered as they complete (a sync push when its step is
// published), so an operation never waits for another one that shared its batch; what
// completes together travels together.
struct BatchAnswer {
  uint64_t epoch = 0;
  uint64_t batch = 0;
  std::vector<BatchResult> results;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// A Status on the wire: i32 code, string message.
void EncodeStatus(Writer* w, const Status& st);
[[nodiscard]] bool DecodeStatus(Reader* r, Status* st);

// Checkpoints of a running job (docs/fault-tolerance.md, "Checkpoints of a running job").
// kCheckpointGate / kCheckpointRelease (coordinator -> every live worker): checkpoint `id`
// begins (each worker holds its new pushes for at most `timeout_ms` and answers with
// kCheckpointCounts) or is over (`timeout_ms` 0: the held pushes go).
struct CheckpointGate {
  uint64_t id = 0;
  uint32_t timeout_ms = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kCheckpointCounts (worker -> coordinator): for each of its tensors that it pushed, the
// sequence number of the last push it issued.
struct CheckpointCounts {
  uint64_t id = 0;
  std::vector<std::pair<std::string, uint64_t>> tensors;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// One tensor's cut: the last sequence number each worker (by rank) had issued, and in sync mode
// the step the checkpoint holds the tensor at (at least the furthest worker's: a step is whole
// once every worker pushed it; one more when other tensors are a step further: the workers were
// in the middle of a step).
struct CheckpointCut {
  // In `issued`: a worker the checkpoint does not hold (finished, or not of the job's tensor):
  // it pushes no more of it, and nothing waits for it.
  static constexpr uint64_t kNotHeld = UINT64_MAX;
  std::string tensor;
  std::vector<uint64_t> issued;  // empty: `step` is the one worker's bound (its own cuts)
  uint64_t step = 0;
  // The last push of worker `w` the checkpoint holds: sync, `step` (or the furthest worker's);
  // ssp, the furthest worker's (the others catch up); async, its own.
  uint64_t Bound(Mode mode, uint32_t w) const;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kCheckpointCuts (coordinator -> every live worker): each worker may push up to its bound and
// holds the rest; worker 0 has every live server write the chunks into `dir` once each chunk
// holds the cut's pushes (kSaveChunks), writes the manifest and answers kCheckpointDone.
struct CheckpointCuts {
  uint64_t id = 0;
  Mode mode = Mode::kSync;  // the job's (CheckpointCut::Bound)
  std::string dir;
  uint32_t timeout_ms = 0;
  std::vector<CheckpointCut> cuts;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kCheckpointDone (worker 0 -> coordinator): how checkpoint `id` ended; `about` says what was
// written.
struct CheckpointDone {
  uint64_t id = 0;
  Status status;
  std::string about;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kTakeCheckpoint (a client -> coordinator): checkpoint the running job into `dir` within
// `timeout_ms`.
struct TakeCheckpoint {
  std::string dir;
  uint32_t timeout_ms = 0;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// kSaveChunks (worker 0 -> server): write this server's chunks into `dir`/`name`. With cuts (a
// checkpoint of a running job), each chunk is written once it holds every push of the cut,
// waiting at most `wait_ms`.
struct SaveChunksRequest {
  std::string dir;
  std::string name;
  uint32_t wait_ms = 0;
  std::vector<CheckpointCut> cuts;
  void Encode(Writer* w) const;
  [[nodiscard]] bool Decode(Reader* r);
};

// Byte layout of a chunk's two published slots: [parameters][pad to 64][u64 tag][pad to 64],
// the parameters as fp32, or encoded with the chunk's pull codec (fp16, bf16: 2 bytes each).
struct SlotLayout {
  uint64_t data_bytes = 0;
  uint64_t trailer_offset = 0;
  uint64_t stride = 0;
};
inline SlotLayout LayoutFor(uint64_t numel, Codec pull = Codec::kNone) {
  SlotLayout l;
  l.data_bytes = pull == Codec::kNone ? numel * 4 : numel * 2;
  l.trailer_offset = (l.data_bytes + 63) / 64 * 64;
  l.stride = l.trailer_offset + 64;
  return l;
}

void EncodeOptimizer(const OptimizerConfig& o, Writer* w);
[[nodiscard]] bool DecodeOptimizer(Reader* r, OptimizerConfig* o);

// Reply helpers.
Bytes ReplyMeta(uint64_t request_id, const Status& st, const Bytes& body = {});
// Parses [request id][status]; the reader is left at the body.
[[nodiscard]] bool ParseReplyHead(Reader* r, uint64_t* request_id, Status* st);

}  // namespace shardps::cluster
