// A ShardPS server: owns the chunks the coordinator placed on it, with their parameters in
// memory registered with the transport, optimizer state, and a bounded pool of landing buffers
// that workers' pushes are written into.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "shardps/status.h"
#include "shardps/tunables.h"

namespace shardps {

struct ServerOptions {
  std::string coordinator;             // host:port of the coordinator
  std::string listen = "127.0.0.1:0";  // data-plane address to listen on
  // Host that workers should connect to; empty: the listen host, or this machine's host name
  // when listening on 0.0.0.0.
  std::string advertise;
  std::string transport = std::string(tunables::kTransport.default_value);  // must match the job's
  int32_t rank = -1;  // -1: the coordinator picks
  // Landing buffers (each one chunk large): the bound on in-flight pushes, whatever the
  // number of workers. A push waits for a free buffer (credit) when all are taken.
  uint32_t landing_buffers = static_cast<uint32_t>(tunables::kLandingBuffers.number);
  // Threads folding pushes and running the optimizer. Each chunk belongs to one of them, and an
  // update of a large chunk is split over those idle at the time (256 KiB ranges).
  uint32_t apply_threads = static_cast<uint32_t>(tunables::kApplyThreads.number);
  // How long the data transport's thread keeps polling after its last event before it sleeps
  // (ucx; see transport::ContextOptions::busy_poll). 0: never poll.
  std::chrono::microseconds busy_poll{tunables::kBusyPollUs.number};
  // Where the chunks live and updates run (docs/gpu.md): "cpu", "cuda" (GPU 0), "cuda:N", or
  // "twin" (the device code path on host threads). A GPU that is missing or too small for the
  // chunks is an error at start-up or when the chunks are declared.
  std::string device = std::string(tunables::kDevice.default_value);
  // A checkpoint directory (docs/fault-tolerance.md) to create the chunks from; empty: none. An
  // incomplete or corrupt checkpoint stops the server at start-up, naming what is wrong.
  std::string restore;
  // Bytes peers may make this server hold for what they sent and it has not handed on yet:
  // per connection and for all together; past either the connection is closed.
  uint64_t connection_inbound_bytes = static_cast<uint64_t>(tunables::kConnectionInbound.number);
  uint64_t process_inbound_bytes = static_cast<uint64_t>(tunables::kProcessInbound.number);
  // Settings of the transport backend, e.g. {"UCX_TLS", "rc,self"} for ucx.
  std::vector<std::pair<std::string, std::string>> transport_settings;
  std::chrono::milliseconds connect_timeout{30000};
  std::chrono::milliseconds register_timeout{120000};
  // The cluster secret's file (docs/security.md): proved on the connection to the coordinator
  // and by every worker that connects. Empty: none (a warning at start-up).
  std::string secret_file;
  // Serve Prometheus metrics (/metrics) and readiness (/healthz, once serving) on this
  // host:port (port 0: a free one); empty: off (docs/metrics.md).
  std::string metrics_listen;
  // TLS on tcp connections (docs/security.md): this node's PEM certificate and key, and the CA
  // that signs every node's. All three or none.
  std::string tls_cert, tls_key, tls_ca;
  // Write a Chrome trace of the pushes it folds in to this file when it ends; empty: off.
  std::string timeline;

  Status Validate() const;
};

// One worker's pushes to a server's chunks (summed over its chunks).
struct WorkerPushStats {
  uint32_t rank = 0;
  uint64_t pushes = 0;         // applied (sync: folded into its step)
  uint64_t late_pushes = 0;    // sync with a quorum: dropped, their step was published without them
  uint64_t waits = 0;          // grants or pushes held back by the consistency bound (sync, ssp:K)
  uint64_t max_staleness = 0;  // versions published between a push's base and its apply
  double mean_staleness = 0;
  // The most steps a push of this worker trailed the leading worker (async, ssp) or the
  // published step (sync).
  uint64_t max_steps_behind = 0;
};

struct ServerStats {
  std::string device;  // where the chunks live: "cpu", "cuda:0 (...)", "twin"
  uint64_t chunks = 0;
  uint64_t parameter_bytes = 0;
  uint64_t pushes_applied = 0;    // pushes folded in (duplicates excluded)
  uint64_t push_bytes = 0;        // bytes of the pushes that landed (as encoded)
  uint64_t duplicate_pushes = 0;  // resent pushes recognised and not applied again
  uint64_t late_pushes = 0;       // sync with a quorum: dropped as late
  uint64_t versions_published = 0;
  uint64_t grant_requests = 0;  // landing buffers asked for (kGrant)
  uint64_t grants_waited = 0;   // grant requests that had to wait for a free buffer
  uint64_t grants_ahead = 0;    // buffers granted ahead with an acknowledgement
  uint64_t grants_parked = 0;   // grant requests that waited for their chunk to catch up
  uint64_t batches = 0;         // batch requests (small chunks' operations fused)
  uint64_t batched_pushes = 0;  // pushes that travelled in a batch
  uint64_t batched_pulls = 0;   // pulls answered in a batch (push_pull's included)
  // Replication (docs/fault-tolerance.md): pushes forwarded to their chunk's backup, pushes taken
  // as a backup, chunks served since their primary was declared dead, connections to a backup
  // reopened, the shard map's epoch.
  uint64_t replicated_pushes = 0;
  uint64_t replicated_copied = 0;    // of them, copied first (not sent from the landing buffer)
  uint64_t replicated_steps = 0;     // sync steps forwarded whole (their sum), not push by push
  uint64_t step_sums_allocated = 0;  // accumulators allocated for sync steps (others reused)
  uint64_t replica_steps = 0;        // sync steps taken whole as a backup
  uint64_t replica_pushes = 0;
  uint64_t promoted_chunks = 0;
  uint64_t backups_rebuilt = 0;     // chunks of which this server made a new backup (a failover)
  uint64_t replicas_installed = 0;  // chunks this server became the new backup of
  // With replication: chunks served here that have no backup now (one copy left), and those
  // whose new backup is being made.
  uint64_t unbacked_chunks = 0;
  uint64_t replica_links_reopened = 0;  // connections to a live backup reopened after they closed
  uint64_t shard_map_epoch = 0;
  uint64_t pid = 0;  // the server's process and host (shardps bench/train --kill-server-at)
  std::string host;
  uint64_t inbound_bytes = 0;        // held now for what peers sent (the inbound budget)
  uint64_t inbound_peak_bytes = 0;   // the most held at once
  uint64_t inbound_limit_bytes = 0;  // the process's inbound budget
  uint64_t refused_peers = 0;        // connections that did not prove the cluster secret (--secret)
  uint64_t landing_buffers = 0;
  uint64_t apply_threads = 0;
  uint64_t ranges_helped = 0;  // ranges of a split update run by an apply thread that helped
  uint64_t rss_bytes = 0;
  uint64_t peak_rss_bytes = 0;
  // By worker rank; with node-level reduction (pushers_are_nodes) by node: a node's workers
  // push as one (docs/node-reduction.md), and `rank` is the node's number.
  std::vector<WorkerPushStats> workers;
  bool pushers_are_nodes = false;
  std::string ToJson() const;
};

class Server {
 public:
  // Listens, registers with the coordinator and waits until the job is complete. Then serves
  // on its own threads until the coordinator says the job ended, or the job fails.
  static Result<std::unique_ptr<Server>> Start(const ServerOptions& options);
  virtual ~Server() = default;

  virtual uint32_t rank() const = 0;
  virtual std::string address() const = 0;
  // Blocks until the job ended (OK) or failed (the reason), at most `timeout` (Timeout).
  virtual Status Wait(std::chrono::milliseconds timeout) = 0;
  virtual ServerStats stats() const = 0;
  // Where its Prometheus metrics are served ("127.0.0.1:9401"); empty when not asked for.
  virtual std::string metrics_address() const = 0;
};

}  // namespace shardps
