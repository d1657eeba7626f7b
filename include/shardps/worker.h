// The worker client: what a training program links to push gradients and pull parameters.
//
// Shape (kept from ps-lite): declare tensors once, then asynchronous Push / Pull / PushPull on
// the caller's own buffers, each returning a Handle to Wait on with a timeout. Buffers are not
// copied: they must stay valid and unmodified until the handle completes (or, after a Wait
// that timed out, until the worker is destroyed).
//
// Version semantics: every chunk of a tensor has a version, the number of updates applied.
// - sync: version t holds the parameters after step t (the t-th push of every worker, mean or
//   sum). A Push completes once the version containing it is published, so a Pull issued after
//   Push(step t) completed returns exactly the parameters after step t (PushPull does both).
// - async: each push is applied on arrival; a Pull returns the version that the last completed
//   push of this worker produced, or a newer one, and never a half-applied update.
// - ssp:K: as async, and the s-th push of a chunk completes only once every live worker's
//   (s-K-1)-th push of it was applied, so a pull after it includes all of those.
// - sync with a quorum N (backup workers): version t is published once N pushes of step t
//   arrived; a push that came later completes with late() and is not applied.
// Operations on one tensor must be issued from one thread at a time, in order; different
// tensors may be used from different threads. All methods are thread-safe otherwise.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "shardps/status.h"
#include "shardps/tunables.h"
#include "shardps/types.h"

namespace shardps {

struct WorkerOptions {
  std::string coordinator;  // host:port
  std::string transport = std::string(tunables::kTransport.default_value);
  int32_t rank = static_cast<int32_t>(tunables::kRank.number);  // -1: the coordinator picks
  std::chrono::milliseconds connect_timeout{30000};
  std::chrono::milliseconds register_timeout{120000};
  std::chrono::milliseconds rpc_timeout{tunables::kRpcTimeoutMs.number};
  // How long the data transport's thread (ucx) and Handle::Wait keep polling before they
  // sleep: a wake-up costs tens of microseconds. 0: never poll.
  std::chrono::microseconds busy_poll{tunables::kBusyPollUs.number};
  // Operations on chunks of at most 64 KiB travel to their server in batches (docs/protocol.md,
  // "Batches"): a batch goes once its pushed and pulled bytes reach `fuse_bytes` (0: no
  // batches; at most 16 MiB), or when the data transport's thread is free and the oldest
  // operation in it waited `fuse_delay`.
  uint64_t fuse_bytes = static_cast<uint64_t>(tunables::kFuseBytes.number);
  std::chrono::microseconds fuse_delay{tunables::kFuseUs.number};
  // Node-level reduction (docs/node-reduction.md): with local_size K above 1, the K workers of
  // a node (those that give the same `node` name; empty: the host name) sum their gradients
  // through shared memory and each pushes its share of the chunks, so that the servers see one
  // push per node. local_rank is this worker's rank among them (0..K-1). Every worker of the
  // node then issues the same Push / PushPull of each tensor in the same order (Pull stays
  // this worker's own).
  uint32_t local_size = static_cast<uint32_t>(tunables::kWorkersPerNode.number);
  // How the node reduces: "shm" (shared memory), "nccl" (the node's GPUs), "auto" (nccl where it
  // loads and a GPU is visible). The node's workers must choose alike.
  std::string node_reducer = std::string(tunables::kNodeReducer.default_value);
  int32_t local_rank = static_cast<int32_t>(tunables::kLocalRank.number);
  std::string node;
  // Bytes servers may make this worker hold for what they sent and it has not handed on yet.
  uint64_t connection_inbound_bytes = static_cast<uint64_t>(tunables::kConnectionInbound.number);
  uint64_t process_inbound_bytes = static_cast<uint64_t>(tunables::kProcessInbound.number);
  // Settings of the transport backend, e.g. {"UCX_TLS", "rc,self"} for ucx.
  std::vector<std::pair<std::string, std::string>> transport_settings;
  // The cluster secret's file (docs/security.md), proved to the coordinator and every server.
  // Empty: none (a warning at start-up).
  std::string secret_file;
  // Serve Prometheus metrics (/metrics) and readiness (/healthz, once connected) on this
  // host:port (port 0: a free one); empty: off (docs/metrics.md).
  std::string metrics_listen;
  // TLS on tcp connections (docs/security.md): this node's PEM certificate and key, and the CA
  // that signs every node's. All three or none.
  std::string tls_cert, tls_key, tls_ca;
  // Write a Chrome trace of its push, pull, push_pull and wait spans to this file when it ends
  // (docs/metrics.md); empty: off.
  std::string timeline;

  // Fills the options from the variables of the tunables this worker reads (coordinator,
  // transport, rank, timeout-ms, busy-poll-us, fuse-bytes, fuse-us, workers-per-node,
  // local-rank (else the launcher's local rank), node, the inbound budgets, the
  // secret file, the metrics
  // address, the timeline;
  // include/shardps/tunables.h)
  // and the UCX_* transport settings in `environ`, as `shardps launch` sets them for its
  // workers. A malformed value is an error naming the variable.
  static Result<WorkerOptions> FromEnvironment(char** environ);
  Status Validate() const;
};

using TensorId = uint32_t;

// What this worker moved on the data plane since it connected, as the wire carries it
// (compressed bytes for compressed tensors).
struct WorkerStats {
  uint64_t bytes_pushed = 0;  // gradient bytes written into the servers' landing buffers
  uint64_t bytes_pulled = 0;  // parameter bytes read from the published slots (every attempt)
  uint64_t late_pushes = 0;   // pushes (of a chunk) dropped as late: sync with a quorum
  // With backups (--replicas 1): chunks of this worker's tensors with no live backup it is
  // attached to. A death of their server now would lose them; after a failover, new backups
  // (docs/fault-tolerance.md) bring this back to 0.
  uint64_t unbacked_chunks = 0;
};

namespace worker {
struct OpState;
}

// The completion of one Push / Pull / PushPull. Copyable; cheap.
class Handle {
 public:
  Handle() = default;
  explicit Handle(std::shared_ptr<worker::OpState> s) : s_(std::move(s)) {}
  // Blocks until the operation completed or `timeout` passed (Timeout; the operation goes on).
  Status Wait(std::chrono::milliseconds timeout) const;
  bool done() const;
  // After completion: the lowest version over the tensor's chunks that this operation saw.
  uint64_t version() const;
  // After completion of a push (sync with a quorum, --sync-quorum): true when the push of a
  // chunk was dropped because its step was published without it. The tensor's next push is
  // then for the step after the version published on all its chunks (Worker::steps).
  bool late() const;

 private:
  std::shared_ptr<worker::OpState> s_;
};

class Worker {
 public:
  // Connects to the coordinator, registers, waits for the job to be complete, and connects to
  // every server. Blocks (bounded by the options' timeouts).
  static Result<std::unique_ptr<Worker>> Connect(const WorkerOptions& options);
  virtual ~Worker() = default;  // closes connections; pending operations fail

  virtual uint32_t rank() const = 0;
  // Whether this worker joined a running job in the place of one that was removed (it died:
  // --on-worker-loss continue; docs/fault-tolerance.md, "A worker that rejoins"). Its tensors'
  // pushes go on from where the job is: it pulls the current parameters and carries on; the
  // others are past the barriers the job began with.
  virtual bool rejoined() const = 0;
  virtual uint32_t num_workers() const = 0;
  virtual uint32_t num_servers() const = 0;
  virtual Mode mode() const = 0;
  // The job's consistency settings (CoordinatorOptions): ssp's K, and the sync quorum (0: all).
  virtual uint32_t staleness() const = 0;
  virtual uint32_t sync_quorum() const = 0;

  // Declares tensors: every worker declares the same ones, with the same shapes. Worker 0's
  // initial values and optimizer settings are the ones used; the other workers' Declare waits
  // (at most the RPC timeout) until worker 0 has declared them. Blocks.
  virtual Result<std::vector<TensorId>> Declare(const std::vector<TensorSpec>& specs) = 0;
  Result<TensorId> Declare(const TensorSpec& spec);
  virtual uint64_t numel(TensorId id) const = 0;
  // The steps of tensor `id` this worker has pushed, or skipped: with a sync quorum a push found
  // late moves it to the version published on every chunk of the tensor (a training loop that
  // runs T steps pushes while steps(id) < T, and skips its own steps up to steps(id)).
  virtual uint64_t steps(TensorId id) const = 0;

  // Sets the learning rate of the updates this worker's later pushes of `id` contribute to (a
  // learning-rate schedule; docs/consistency.md): each push carries the rate it was issued
  // with, so the change takes effect exactly at the next push, in every mode. In sync mode the
  // workers set the same rate before the same step; if they differ, a step uses the
  // lowest-ranked worker's. Until it is called the rate is the one the tensor was declared
  // with (worker 0's). A negative or non-finite rate is InvalidArgument, an unknown tensor
  // NotFound. Called from the thread that issues the tensor's operations, between them.
  virtual Status SetLearningRate(TensorId id, float lr) = 0;

  virtual Handle Push(TensorId id, const float* grad) = 0;
  virtual Handle Pull(TensorId id, float* out) = 0;
  virtual Handle PushPull(TensorId id, const float* grad, float* out) = 0;

  // Waits until every worker reached barrier `name`. Timeout names the missing workers.
  virtual Status Barrier(const std::string& name, std::chrono::milliseconds timeout) = 0;

  // Collective (every worker calls it, between steps, with none of its operations in flight):
  // every server writes its chunks' parameters, optimizer state, versions and sequence tables
  // into `dir`, then worker 0 writes the manifest, so the checkpoint is one consistent cut of
  // the job (docs/fault-tolerance.md). `dir` must be the same place for the servers and worker 0
  // (a shared file system across hosts). A server started with --restore DIR starts from it.
  // The outcome is worker 0's to report; the others return once it is done or failed.
  virtual Status Checkpoint(const std::string& dir, std::chrono::milliseconds timeout) = 0;
  // A server's statistics as JSON (see ServerStats).
  // Unavailable for a server declared dead (replication: docs/fault-tolerance.md).
  virtual Result<std::string> ServerStats(uint32_t server) = 0;
  // Tells the coordinator this worker is done. Call once, after the last operation completed.
  virtual Status Finish() = 0;
  // Why the job failed (a node died, the coordinator is gone); OK while healthy.
  virtual Status failure() const = 0;
  virtual WorkerStats stats() const = 0;
  // Where its Prometheus metrics are served ("127.0.0.1:9403"); empty when not asked for.
  virtual std::string metrics_address() const = 0;
};

}  // namespace shardps
