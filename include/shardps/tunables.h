// Every tunable of ShardPS, declared once: its name (the flag `--name` and the config-file key
// `name`), its environment variable, its default and its help. The Options structs take their
// defaults from here, the `shardps` flags their names, variables and help, `shardps launch`
// the variables it passes to its children, and docs/configuration.md is this table
// (`shardps tunables --markdown` prints it; a test keeps the page equal to it).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace shardps {

struct Tunable {
  std::string_view name;           // flag --name, config key name
  std::string_view env;            // SHARDPS_* variable
  std::string_view default_value;  // as a user writes it
  int64_t number = 0;              // the default of numeric tunables
  std::string_view help;
  std::string_view used_by;  // the subcommands (and Options structs) that read it
};

namespace tunables {

inline constexpr Tunable kServers{
    "servers", "SHARDPS_NUM_SERVERS",          "1",
    1,         "number of servers in the job", "coordinator, launch, bench, train"};
inline constexpr Tunable kWorkers{
    "workers", "SHARDPS_NUM_WORKERS",          "1",
    1,         "number of workers in the job", "coordinator, launch, bench, train"};
inline constexpr Tunable kMode{"mode",
                               "SHARDPS_MODE",
                               "sync",
                               0,
                               "consistency: sync (bulk synchronous), async, or ssp:K (a worker "
                               "runs at most K steps ahead of the slowest)",
                               "coordinator, launch, bench, train"};
inline constexpr Tunable kAggregate{"aggregate",
                                    "SHARDPS_AGGREGATE",
                                    "mean",
                                    0,
                                    "sync aggregation of the workers' gradients: mean or sum",
                                    "coordinator, launch, bench, train"};
inline constexpr Tunable kSyncQuorum{
    "sync-quorum",
    "SHARDPS_SYNC_QUORUM",
    "0",
    0,
    "sync: publish a step once this many workers pushed it (backup workers; late pushes are "
    "dropped); 0: all",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kReplicas{
    "replicas",
    "SHARDPS_REPLICAS",
    "1",
    1,
    "backups of every chunk on other servers (0 or 1; a job of one server has none): a push is "
    "acknowledged once every live copy holds it, and a server that dies is replaced by its "
    "chunks' backups; 0: none, a server's death ends the job (docs/fault-tolerance.md)",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kOnWorkerLoss{
    "on-worker-loss",
    "SHARDPS_ON_WORKER_LOSS",
    "fail",
    0,
    "what a worker's death (silent past the heartbeat timeout, or disconnected) does: fail (the "
    "job ends, naming it) or continue (it is removed: sync steps complete with the others, the "
    "mean over each step's contributors; worker 0 and node-level reduction still fail)",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kRestartWorkers{
    "restart-workers",
    "SHARDPS_RESTART_WORKERS",
    "0",
    0,
    "launch: a worker process that dies (not worker 0) is started again with its rank, up to N "
    "times in all; with --on-worker-loss continue it rejoins the job in its place "
    "(docs/fault-tolerance.md)",
    "launch, train"};
inline constexpr Tunable kRestartServers{
    "restart-servers",
    "SHARDPS_RESTART_SERVERS",
    "0",
    0,
    "launch: with --replicas 1, a server process that dies is replaced by a new one, which joins "
    "the running job and becomes the backup of the chunks left with one copy, up to N times in "
    "all (docs/fault-tolerance.md)",
    "launch, bench, train"};
inline constexpr Tunable kWorkerWeights{
    "worker-weights",
    "SHARDPS_WORKER_WEIGHTS",
    "",
    0,
    "weight of each worker's pushes, one per worker (e.g. 1,1,0.5); empty: 1 each",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kWeightRule{
    "weight-rule",
    "SHARDPS_WEIGHT_RULE",
    "fixed",
    0,
    "fixed (the worker weights), or staleness (each push's weight divided by 1 + the versions "
    "published since the one it read)",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kTransport{"transport",
                                    "SHARDPS_TRANSPORT",
                                    "tcp",
                                    0,
                                    "data transport: tcp, or ucx or verbs where built",
                                    "coordinator, server, launch, bench, train; worker"};
inline constexpr Tunable kChunkSize{"chunk-size",
                                    "SHARDPS_CHUNK_SIZE",
                                    "4MiB",
                                    4 << 20,
                                    "upper bound of a chunk (64 B to 128 MiB)",
                                    "coordinator, launch, bench, train"};
inline constexpr Tunable kLandingBuffers{
    "landing-buffers",
    "SHARDPS_LANDING_BUFFERS",
    "16",
    16,
    "landing buffers (credits) per server, each one chunk large: the bound on pushes in flight",
    "server, launch, bench, train"};
inline constexpr Tunable kApplyThreads{
    "apply-threads",
    "SHARDPS_APPLY_THREADS",
    "1",
    1,
    "optimizer threads per server; an update of a large chunk is split over the idle ones",
    "server, launch, bench, train"};
inline constexpr Tunable kDevice{
    "device",
    "SHARDPS_DEVICE",
    "cpu",
    0,
    "where a server keeps its chunks and applies updates: cpu, cuda (GPU 0), cuda:N, or twin "
    "(the GPU code path run by host threads, for tests without a GPU)",
    "server, launch, bench, train"};
inline constexpr Tunable kRestore{
    "restore",
    "SHARDPS_RESTORE",
    "",
    0,
    "start the servers' chunks from the checkpoint in this directory (docs/fault-tolerance.md): "
    "parameters, optimizer state and versions, checked against its manifest",
    "server, launch, bench, train"};
inline constexpr Tunable kCheckpointIntervalS{
    "checkpoint-interval",
    "SHARDPS_CHECKPOINT_INTERVAL",
    "0",
    0,
    "the coordinator checkpoints the running job into --checkpoint-dir every N seconds, with no "
    "part taken by the workers' code (docs/fault-tolerance.md); 0: never",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kCheckpointDir{
    "checkpoint-dir",
    "SHARDPS_CHECKPOINT_DIR",
    "",
    0,
    "where checkpoints are written (--checkpoint-interval; train's --checkpoint-every): a "
    "directory the servers and the coordinator (or worker 0) share",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kBusyPollUs{
    "busy-poll-us",
    "SHARDPS_BUSY_POLL_US",
    "200",
    200,
    "ucx: microseconds transport threads and waits keep polling after an event before they "
    "sleep (0: never)",
    "server, launch, bench, train; worker"};
inline constexpr Tunable kRegisterTimeoutMs{
    "register-timeout-ms",
    "SHARDPS_REGISTER_TIMEOUT_MS",
    "60000",
    60000,
    "a node not registered by then fails the job, naming what is missing",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kHeartbeatIntervalMs{
    "heartbeat-interval-ms", "SHARDPS_HEARTBEAT_INTERVAL_MS",    "500", 500,
    "heartbeat period",      "coordinator, launch, bench, train"};
inline constexpr Tunable kHeartbeatTimeoutMs{"heartbeat-timeout-ms",
                                             "SHARDPS_HEARTBEAT_TIMEOUT_MS",
                                             "5000",
                                             5000,
                                             "a node silent this long fails the job",
                                             "coordinator, launch, bench, train"};
inline constexpr Tunable kFailoverTimeoutMs{
    "failover-timeout-ms",
    "SHARDPS_FAILOVER_TIMEOUT_MS",
    "2000",
    2000,
    "with --replicas 1: a server silent this long is declared dead and replaced by its chunks' "
    "backups (without replicas the heartbeat timeout applies)",
    "coordinator, launch, bench, train"};
inline constexpr Tunable kConnectionInbound{
    "connection-inbound-bytes",
    "SHARDPS_CONNECTION_INBOUND_BYTES",
    "256MiB",
    256ll << 20,
    "most bytes one peer's connection may make a process hold for what it sent and the process "
    "has not handed on yet; past it the connection is closed",
    "server, launch, bench, train; worker"};
inline constexpr Tunable kProcessInbound{
    "process-inbound-bytes",
    "SHARDPS_PROCESS_INBOUND_BYTES",
    "1GiB",
    1ll << 30,
    "the same bound for all connections of a server or worker together",
    "server, launch, bench, train; worker"};
inline constexpr Tunable kFuseBytes{
    "fuse-bytes",
    "SHARDPS_FUSE_BYTES",
    "64KiB",
    64ll << 10,
    "worker: operations on tensor chunks of at most 64 KiB travel to their server in batches; a "
    "batch is sent once its pushed and pulled bytes reach this (0: no batches)",
    "launch, bench, train; worker"};
inline constexpr Tunable kFuseUs{
    "fuse-us",
    "SHARDPS_FUSE_US",
    "0",
    0,
    "worker: the longest a batch waits for more operations before it is sent (0: sent as soon "
    "as the worker's transport thread is free; more: a thread of the worker sends it then)",
    "launch, bench, train; worker"};
inline constexpr Tunable kWorkersPerNode{
    "workers-per-node",
    "SHARDPS_WORKERS_PER_NODE",
    "1",
    1,
    "node-level reduction: the workers of a node (launch: each run of this many workers) sum "
    "their gradients through shared memory and push once per node (1: every worker pushes)",
    "launch, bench, train; worker"};
inline constexpr Tunable kNodeReducer{
    "node-reducer",
    "SHARDPS_NODE_REDUCER",
    "auto",
    0,
    "node-level reduction through: shm (shared memory; gradients in GPU memory are staged "
    "through the host), nccl (the node's GPUs, one per worker), or auto (nccl where CUDA and "
    "NCCL load and each worker of the node has a GPU)",
    "launch, bench, train; worker"};
inline constexpr Tunable kLocalRank{
    "local-rank",
    "SHARDPS_LOCAL_RANK",
    "-1",
    -1,
    "worker: its rank among its node's workers (set by shardps launch; -1: LOCAL_RANK, "
    "OMPI_COMM_WORLD_LOCAL_RANK or SLURM_LOCALID)",
    "worker"};
inline constexpr Tunable kNode{"node",
                               "SHARDPS_NODE",
                               "",
                               0,
                               "worker: the name of its node, shared by the workers that reduce "
                               "together (set by shardps launch; empty: the host name)",
                               "worker"};
inline constexpr Tunable kRpcTimeoutMs{"timeout-ms",
                                       "SHARDPS_TIMEOUT_MS",
                                       "60000",
                                       60000,
                                       "worker: deadline of a request to a server or the "
                                       "coordinator",
                                       "worker"};
inline constexpr Tunable kCoordinator{"coordinator",
                                      "SHARDPS_COORDINATOR",
                                      "",
                                      0,
                                      "host:port of the coordinator (set by shardps launch)",
                                      "server; worker"};
inline constexpr Tunable kRank{
    "rank",          "SHARDPS_RANK", "-1", -1, "this node's rank (-1: the coordinator picks)",
    "server; worker"};
inline constexpr Tunable kCoordinatorListen{
    "listen",     "SHARDPS_LISTEN", "0.0.0.0:7070", 0, "host:port the coordinator listens on",
    "coordinator"};
inline constexpr Tunable kServerListen{
    "listen", "SHARDPS_SERVER_LISTEN", "0.0.0.0:0", 0, "host:port a server's data plane listens on",
    "server"};
inline constexpr Tunable kAdvertise{"advertise",
                                    "SHARDPS_ADVERTISE",
                                    "",
                                    0,
                                    "host workers reach this server at (empty: the listen host, "
                                    "or the host name on 0.0.0.0)",
                                    "server"};
inline constexpr Tunable kSecretFile{
    "secret",
    "SHARDPS_SECRET_FILE",
    "",
    0,
    "file holding the cluster secret (16 to 4096 bytes, e.g. `openssl rand -hex 32`): every "
    "connection proves it before any message (docs/security.md); empty: none, with a warning",
    "coordinator, server, launch, run, bench, train; worker"};
inline constexpr Tunable kTlsCert{
    "tls-cert",
    "SHARDPS_TLS_CERT",
    "",
    0,
    "PEM certificate of this node: with --tls-key and --tls-ca, every tcp connection runs TLS 1.3 "
    "with certificates both ways (docs/security.md); empty: no TLS",
    "coordinator, server, launch, run, bench, train; worker"};
inline constexpr Tunable kTlsKey{"tls-key",
                                 "SHARDPS_TLS_KEY",
                                 "",
                                 0,
                                 "PEM private key of --tls-cert",
                                 "coordinator, server, launch, run, bench, train; worker"};
inline constexpr Tunable kTlsCa{"tls-ca",
                                "SHARDPS_TLS_CA",
                                "",
                                0,
                                "PEM certificate of the CA that signs every node's certificate",
                                "coordinator, server, launch, run, bench, train; worker"};
inline constexpr Tunable kMetricsListen{
    "metrics-listen",
    "SHARDPS_METRICS_LISTEN",
    "",
    0,
    "serve Prometheus metrics (/metrics) and readiness (/healthz) on host:port (port 0: a free "
    "one); launch and run: the coordinator on port P, task t on P+1+t; empty: off",
    "coordinator, server, launch, run, bench, train; worker"};
inline constexpr Tunable kTimeline{
    "timeline",
    "SHARDPS_TIMELINE",
    "",
    0,
    "write a Chrome trace (Perfetto) of the workers' push, pull and wait spans and the servers' "
    "apply spans to FILE (launch merges its processes' into FILE); empty: off",
    "server, launch, bench, train; worker"};
inline constexpr Tunable kConfig{"config",
                                 "SHARDPS_CONFIG",
                                 "",
                                 0,
                                 "TOML/INI file of flags ([subcommand] sections); flags > "
                                 "SHARDPS_* > file",
                                 "every subcommand"};
inline constexpr Tunable kLogLevel{
    "log-level",       "SHARDPS_LOG_LEVEL", "info", 0, "trace, debug, info, warn, error",
    "every subcommand"};
inline constexpr Tunable kShardSize{"shard-size",
                                    "SHARDPS_SHARD_SIZE",
                                    "64MiB",
                                    64ll << 20,
                                    "bytes one server registers (doctor's memlock check)",
                                    "doctor"};
inline constexpr Tunable kTrainTty{"train-tty",
                                   "SHARDPS_TRAIN_TTY",
                                   "",
                                   0,
                                   "1: worker 0 of shardps train draws a progress bar (set by "
                                   "shardps train from its own terminal)",
                                   "train"};

inline constexpr const Tunable* kAll[] = {
    &kServers,
    &kWorkers,
    &kMode,
    &kAggregate,
    &kSyncQuorum,
    &kReplicas,
    &kOnWorkerLoss,
    &kRestartWorkers,
    &kRestartServers,
    &kWorkerWeights,
    &kWeightRule,
    &kTransport,
    &kChunkSize,
    &kLandingBuffers,
    &kApplyThreads,
    &kDevice,
    &kRestore,
    &kCheckpointIntervalS,
    &kCheckpointDir,
    &kBusyPollUs,
    &kRegisterTimeoutMs,
    &kHeartbeatIntervalMs,
    &kHeartbeatTimeoutMs,
    &kFailoverTimeoutMs,
    &kConnectionInbound,
    &kProcessInbound,
    &kFuseBytes,
    &kFuseUs,
    &kWorkersPerNode,
    &kNodeReducer,
    &kLocalRank,
    &kNode,
    &kRpcTimeoutMs,
    &kCoordinator,
    &kRank,
    &kCoordinatorListen,
    &kServerListen,
    &kAdvertise,
    &kSecretFile,
    &kTlsCert,
    &kTlsKey,
    &kTlsCa,
    &kMetricsListen,
    &kTimeline,
    &kConfig,
    &kLogLevel,
    &kShardSize,
    &kTrainTty,
};

}  // namespace tunables

// The table as a Markdown page (docs/configuration.md).
std::string TunablesMarkdown();

}  // namespace shardps
