// The coordinator: rendezvous and membership for one job. It assigns node ranks, hands every
// node the cluster view (servers and their addresses, mode, chunk size), places tensor chunks
// on servers, runs barriers, and watches heartbeats. It holds no parameters.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "shardps/status.h"
#include "shardps/tunables.h"
#include "shardps/types.h"

namespace shardps {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:0";  // control-plane address (always tcp)
  uint32_t num_servers = static_cast<uint32_t>(tunables::kServers.number);
  uint32_t num_workers = static_cast<uint32_t>(tunables::kWorkers.number);
  Mode mode = Mode::kSync;
  uint32_t staleness = 0;  // ssp: K, how many steps a worker may run ahead of the slowest
  Aggregate aggregate = Aggregate::kMean;
  // sync: a step is published once this many workers' pushes arrived (backup workers); later
  // pushes of a published step are acknowledged and dropped. 0: every worker.
  uint32_t sync_quorum = 0;
  // Backups of every chunk, each on another server (0 or 1; at most servers - 1 are kept: a job
  // of one server has none). With one (the default), a push is acknowledged once its chunk's
  // backup holds it too, and a server that dies or goes silent is replaced by the backups of its
  // chunks: the job goes on (docs/fault-tolerance.md). 0: a server's death ends the job.
  uint32_t replicas = static_cast<uint32_t>(tunables::kReplicas.number);
  // The weight eta_i of each worker's push (theta += sum_i eta_i * delta_i): one per worker, or
  // empty for 1 each. `weight_rule` kStaleness lowers it by the push's staleness.
  std::vector<float> worker_weights;
  WeightRule weight_rule = WeightRule::kFixed;
  // data-plane transport the nodes use between them
  std::string transport = std::string(tunables::kTransport.default_value);
  uint64_t chunk_bytes = static_cast<uint64_t>(tunables::kChunkSize.number);  // bound of a chunk
  // A node that has not registered by then fails the job with an error naming what is missing.
  std::chrono::milliseconds register_timeout{tunables::kRegisterTimeoutMs.number};
  std::chrono::milliseconds heartbeat_interval{tunables::kHeartbeatIntervalMs.number};
  // A node silent for this long is declared dead and the job fails, naming it.
  std::chrono::milliseconds heartbeat_timeout{tunables::kHeartbeatTimeoutMs.number};
  // With replicas: a server silent this long is declared dead and replaced by its chunks'
  // backups (the heartbeat timeout still applies to workers, and to servers without replicas).
  std::chrono::milliseconds failover_timeout{tunables::kFailoverTimeoutMs.number};
  // A worker that dies (--on-worker-loss continue): removed from the job rather than failing
  // it (docs/fault-tolerance.md). Worker 0, and workers of a job with node-level reduction,
  // still fail it.
  bool continue_on_worker_loss = false;
  // The cluster secret's file (docs/security.md): every node proves it before the coordinator
  // reads a message of theirs. Empty: none (a warning at start-up).
  std::string secret_file;
  // Serve Prometheus metrics (/metrics) and readiness (/healthz) on this host:port (port 0: a
  // free one); empty: off (docs/metrics.md).
  std::string metrics_listen;
  // TLS on tcp connections (docs/security.md): this node's PEM certificate and key, and the CA
  // that signs every node's. All three or none.
  std::string tls_cert, tls_key, tls_ca;
  // Checkpoints of the running job taken by the coordinator (docs/fault-tolerance.md,
  // "Checkpoints of a running job"): one into `checkpoint_dir` every `checkpoint_interval`
  // (0: none), each within `checkpoint_timeout`.
  std::chrono::milliseconds checkpoint_interval{tunables::kCheckpointIntervalS.number * 1000};
  std::string checkpoint_dir;
  std::chrono::milliseconds checkpoint_timeout{120000};

  Status Validate() const;
};

class Coordinator {
 public:
  // Starts listening and serving on its own threads. Non-blocking.
  static Result<std::unique_ptr<Coordinator>> Start(const CoordinatorOptions& options);
  virtual ~Coordinator() = default;  // stops serving; connected nodes see the connection close

  // The address nodes connect to, "127.0.0.1:40123".
  virtual std::string address() const = 0;

  // Waits until the job ended: OK once every worker said goodbye (servers are then told to
  // shut down); an error naming the node when one failed, went silent or never showed up.
  // Timeout when `timeout` passed first (the job goes on). Thread-safe.
  virtual Status Wait(std::chrono::milliseconds timeout) = 0;
  // Checkpoints the running job into `dir` (docs/fault-tolerance.md, "Checkpoints of a running
  // job"): every worker holds its new pushes, each chunk is written once it holds every push
  // issued before, at one cut across all servers; then the workers go on. Blocks until written
  // (a line saying what was) or failed, within `timeout`. The workers' code takes no part.
  // Thread-safe; one at a time (AlreadyExists while another is taken).
  virtual Result<std::string> Checkpoint(const std::string& dir,
                                         std::chrono::milliseconds timeout) = 0;
  // Where its Prometheus metrics are served ("127.0.0.1:9400"); empty when not asked for.
  virtual std::string metrics_address() const = 0;
};

}  // namespace shardps
