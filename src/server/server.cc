#include "shardps/server.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <shared_mutex>
#include <thread>

#include <sched.h>
#include <unistd.h>
#include <unordered_map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cluster/messages.h"
#include "cluster/node_client.h"
#include "cluster/rpc.h"
#include "compress/codec.h"
#include "gpu/device.h"
#include "metrics/metrics.h"
#include "metrics/timeline.h"
#include "server/applier.h"
#include "server/checkpoint.h"
#include "server/chunk_engine.h"
#include "server/landing_pool.h"
#include "server/update_rule.h"
#include "transport/context.h"

namespace shardps {

Status ServerOptions::Validate() const {
  if (coordinator.empty()) return Status::InvalidArgument("the server needs a coordinator address");
  if (landing_buffers < 1 || landing_buffers > 4096)
    return Status::InvalidArgument(
        fmt::format("landing buffers {} outside [1, 4096]", landing_buffers));
  if (apply_threads < 1 || apply_threads > 64)
    return Status::InvalidArgument(fmt::format("apply threads {} outside [1, 64]", apply_threads));
  if (busy_poll.count() < 0 || busy_poll.count() > 1000000)
    return Status::InvalidArgument(
        fmt::format("busy poll of {} us outside [0, 1000000]", busy_poll.count()));
  if (connection_inbound_bytes < (1u << 20) || process_inbound_bytes < connection_inbound_bytes)
    return Status::InvalidArgument(fmt::format(
        "inbound budgets of {} bytes per connection and {} per process: each must be at least "
        "1 MiB, and the process's at least a connection's",
        connection_inbound_bytes, process_inbound_bytes));
  auto v = transport::CheckViability(transport);
  if (!v.viable) return Status::InvalidArgument("transport " + transport + ": " + v.reason);
  gpu::DeviceSpec spec;
  return gpu::ParseDevice(device, &spec);
}

std::string ServerStats::ToJson() const {
  nlohmann::json j = {{"device", device},
                      {"chunks", chunks},
                      {"parameter_bytes", parameter_bytes},
                      {"pushes_applied", pushes_applied},
                      {"duplicate_pushes", duplicate_pushes},
                      {"push_bytes", push_bytes},
                      {"late_pushes", late_pushes},
                      {"versions_published", versions_published},
                      {"grant_requests", grant_requests},
                      {"grants_waited", grants_waited},
                      {"grants_ahead", grants_ahead},
                      {"grants_parked", grants_parked},
                      {"batches", batches},
                      {"batched_pushes", batched_pushes},
                      {"batched_pulls", batched_pulls},
                      {"replicated_pushes", replicated_pushes},
                      {"replicated_copied", replicated_copied},
                      {"replicated_steps", replicated_steps},
                      {"step_sums_allocated", step_sums_allocated},
                      {"replica_steps", replica_steps},
                      {"replica_pushes", replica_pushes},
                      {"promoted_chunks", promoted_chunks},
                      {"backups_rebuilt", backups_rebuilt},
                      {"replicas_installed", replicas_installed},
                      {"unbacked_chunks", unbacked_chunks},
                      {"replica_links_reopened", replica_links_reopened},
                      {"shard_map_epoch", shard_map_epoch},
                      {"pid", pid},
                      {"host", host},
                      {"inbound_bytes", inbound_bytes},
                      {"inbound_peak_bytes", inbound_peak_bytes},
                      {"inbound_limit_bytes", inbound_limit_bytes},
                      {"refused_peers", refused_peers},
                      {"landing_buffers", landing_buffers},
                      {"apply_threads", apply_threads},
                      {"ranges_helped", ranges_helped},
                      {"rss_bytes", rss_bytes},
                      {"peak_rss_bytes", peak_rss_bytes}};
  nlohmann::json ws = nlohmann::json::array();
  for (const auto& w : workers)
    ws.push_back({{"rank", w.rank},
                  {"pushes", w.pushes},
                  {"late_pushes", w.late_pushes},
                  {"waits", w.waits},
                  {"max_staleness", w.max_staleness},
                  {"mean_staleness", w.mean_staleness},
                  {"max_steps_behind", w.max_steps_behind}});
  j["workers"] = ws;
  j["pushers"] = pushers_are_nodes ? "nodes" : "workers";
  return j.dump();
}

namespace server {

// A batch request being answered, on the data loop thread (which owns every chunk a batch may
// name): entries are answered as they complete, and what completed during one event handled by
// that thread travels in one kBatchAnswer (cluster::BatchAnswer).
struct BatchInFlight {
  std::shared_ptr<transport::Connection> conn;
  std::vector<uint8_t> pulls;  // per entry: its parameters go back with its answer
  cluster::BatchAnswer part;   // answered since the last answer was sent
  Bytes payload;               // their parameters, in the same order
  bool queued = false;         // in the server's list of answers to send
};

namespace {
struct Chunk;
}  // namespace

// A new backup being made for a chunk after a failover (docs/fault-tolerance.md, "New
// backups"): the chunk's copy went to `backup`, and the pushes applied here since were sent
// after it. It becomes the chunk's backup once the copy was installed and every such push was
// answered; any refusal or lost connection fails it (the chunk then keeps one copy).
struct Rebuild {
  Chunk* chunk = nullptr;
  uint32_t backup = 0;
  std::mutex mu;
  bool installed = false;    // the new backup installed the copy
  Status failed;             // why it cannot be the backup
  uint64_t provisional = 0;  // pushes sent to it and not answered yet
  bool done = false;         // ended (and reported to the coordinator)
};

// A push forwarded to its chunk's backup: the worker is acknowledged once the chunk's engine
// here acknowledged it (`local`) and the backup did (`remote`), or the backup was declared dead.
struct ReplicaJoin {
  std::mutex mu;
  bool local = false;
  bool remote = false;
  EngineActions::Ack ack;  // this server's, once local
  Status remote_status;    // the backup's refusal, when it refused (a fenced primary)
  uint32_t backup = 0;     // the backup's server rank
  // Sends the acknowledgement (the server's AckNow for the chunk), once both are in.
  std::function<void(EngineActions::Ack)> deliver;
  // What was forwarded, sent again if the connection to the backup closes and is reopened; and
  // when that first failed (the bound on the wait for the backup: ReplicaLinkLoop).
  Bytes meta;
  transport::Payload payload;
  // kReplicate, or kReplicaMembership: a membership change (no worker waits for its answer),
  // kept and sent again in order with the pushes, like them.
  uint32_t tag = cluster::kReplicate;
  std::chrono::steady_clock::time_point orphaned_at{};
  // Sent to a new backup before it was whole (Rebuild): its answer counts for the rebuild, and
  // the worker is acknowledged on this server's word.
  std::shared_ptr<Rebuild> rebuild;
  // A forwarded step (kReplicateStep) carries the acknowledgements of all its pushes: this one
  // is the first's, these the others', which get the backup's answer when it does (RemoteDone).
  std::vector<std::shared_ptr<ReplicaJoin>> followers;  // guarded by mu
  bool answered = false;  // guarded by mu: the backup's answer (or its death) came

  // Makes `f` get this one's answer from the backup; false when it came already.
  bool AddFollower(std::shared_ptr<ReplicaJoin> f) {
    std::lock_guard<std::mutex> lock(mu);
    if (answered) return false;
    followers.push_back(std::move(f));
    return true;
  }

  // Records one side; the acknowledgement to send when it was the second, with the backup's
  // refusal (this server was replaced and is fenced) in place of this server's success.
  std::optional<EngineActions::Ack> Local(const EngineActions::Ack& a) {
    std::lock_guard<std::mutex> lock(mu);
    local = true;
    ack = a;
    ack.to.join.reset();
    if (!remote) return std::nullopt;
    return Merged();
  }
  std::optional<EngineActions::Ack> Remote(const Status& st) {
    std::lock_guard<std::mutex> lock(mu);
    remote = true;
    remote_status = st;
    if (!local) return std::nullopt;
    return Merged();
  }

 private:
  EngineActions::Ack Merged() {
    EngineActions::Ack a = std::move(ack);
    if (a.status.ok() && !remote_status.ok()) a.status = remote_status;
    return a;
  }
};

namespace {

using namespace cluster;
using transport::Connection;

constexpr size_t kMaxEarlyMessages = 4096;        // held before the server is ready
constexpr uint64_t kMaxEarlyBytes = 64ull << 20;  // and their bytes
// Chunks this small are applied on the transport thread that receives their pushes: such an
// apply takes about a microsecond, less than handing it to an apply thread and back. A chunk's
// size never changes, so each chunk still has exactly one owning thread.
// The same bound as a batch's (cluster::kMaxBatchedChunkBytes): a batch's chunks are all applied
// on the thread that receives it.
constexpr uint64_t kInlineApplyBytes = kMaxBatchedChunkBytes;
// An update of a chunk is split into ranges of this many elements (256 KiB) that idle apply
// threads run alongside the chunk's own (Applier::ParallelFor).
constexpr size_t kRangeElements = 64 << 10;

// --device: streams the chunks are spread over (a chunk's copies and kernels run in order on its
// stream; chunks on different streams overlap), and how long stopping waits for queued work.
constexpr int kDeviceStreams = 4;
constexpr std::chrono::milliseconds kDeviceDrainTimeout{10000};
// How long an order to make a new backup of a chunk not created here yet waits for the chunk (a
// worker's declare under way when the chunk's primary died: docs/fault-tolerance.md).
constexpr std::chrono::seconds kAwaitedRebuildWait{30};
// A checkpoint: how long the chunks' owners may take to hand over their state.
constexpr std::chrono::milliseconds kSnapshotTimeout{300000};

void ReadRss(uint64_t* rss, uint64_t* peak) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    unsigned long long kb = 0;
    if (std::sscanf(line.c_str(), "VmRSS: %llu kB", &kb) == 1) *rss = kb * 1024;
    if (std::sscanf(line.c_str(), "VmHWM: %llu kB", &kb) == 1) *peak = kb * 1024;
  }
}

// Forwarded steps' sums whose send ended (Chunk::spare_sums): at most kKept are kept, the rest
// freed.
struct SpareSums {
  static constexpr size_t kKept = 4;
  std::mutex mu;
  std::vector<std::unique_ptr<Accumulator>> sums;  // guarded by mu

  // A shared owner of `sum` for a send: the last owner to let it go gives it back to `to`, or
  // frees it once the chunk is gone.
  static std::shared_ptr<Accumulator> Lend(std::unique_ptr<Accumulator> sum,
                                           const std::shared_ptr<SpareSums>& to) {
    auto back = [to = std::weak_ptr<SpareSums>(to)](Accumulator* a) { GiveBack(to, a); };
    return std::shared_ptr<Accumulator>(sum.release(), std::move(back));
  }

  static void GiveBack(const std::weak_ptr<SpareSums>& to, Accumulator* a) {
    std::unique_ptr<Accumulator> own(a);
    auto s = to.lock();
    if (!s) return;
    std::lock_guard<std::mutex> lock(s->mu);
    if (s->sums.size() < kKept) s->sums.push_back(std::move(own));
  }

  std::unique_ptr<Accumulator> Pop() {
    std::lock_guard<std::mutex> lock(mu);
    if (sums.empty()) return nullptr;
    std::unique_ptr<Accumulator> s = std::move(sums.back());
    sums.pop_back();
    return s;
  }
};

struct Chunk {
  uint64_t id = 0;
  std::string tensor;
  uint64_t offset = 0;
  uint64_t numel = 0;
  SlotLayout layout;
  std::unique_ptr<transport::MemoryRegion> slots;
  Codec push_codec = Codec::kNone;
  uint32_t push_block = 256;
  Codec pull_codec = Codec::kNone;
  std::vector<float> master;  // fp32 parameters when the slots hold them encoded (pull codec)
  bool inline_apply = false;  // owned by the data loop thread rather than an apply thread
  OptimizerKind optimizer = OptimizerKind::kSgd;
  std::unique_ptr<ChunkEngine> engine;
  CreateChunkItem create;  // as it was created (a new backup is made from it)
  // Replication (docs/fault-tolerance.md): the server rank of its primary; the rank of its
  // backup while this server is its primary and the backup lives (kNoServer: none); whether this
  // server holds it as the backup (until the primary is declared dead: then it serves it).
  std::atomic<uint32_t> primary{0};
  std::atomic<uint32_t> backup{kNoServer};
  std::atomic<bool> is_backup{false};
  // A new backup being made (owner thread): the one in progress, whether its copy was taken
  // (pushes applied from then on go to it too), and an order that waits for it to end.
  std::shared_ptr<Rebuild> rebuild;
  bool rebuild_copied = false;
  uint32_t next_rebuild = kNoServer;
  // Once a new backup was begun for it: pushes go to its backup as its engine takes them (in
  // that order: ForwardTaken), no longer as they land (Forward), so that the new backup's engine
  // takes them in the same order from a copy taken in between.
  std::atomic<bool> forward_on_take{false};
  // sync with backups: the primary forwards each published step's sum (ForwardStep), not each
  // push (EngineConfig::forward_steps); until forward_on_take, which takes over.
  bool forward_steps = false;
  // Owner thread: the last step forwarded so (its first push's ReplicaJoin, which carries the
  // message), while it is in flight: acknowledgements given outside a step (a late push, a
  // resent one) wait for it too.
  std::weak_ptr<ReplicaJoin> last_step;
  // Sums of forwarded steps whose send ended (the backup answered, or the link let them go),
  // back from whichever thread released them; the engine takes them for later steps
  // (EngineConfig::spare_sum), so that a step's sum is not a fresh allocation each time.
  std::shared_ptr<SpareSums> spare_sums = std::make_shared<SpareSums>();
  // Per pusher that rejoined the job (docs/fault-tolerance.md, "A worker that rejoins"): the
  // sequence number its next push must have, which its attach is told.
  std::mutex rejoin_mu;
  std::map<uint32_t, uint64_t> rejoin_next;  // guarded by rejoin_mu
};

class ServerImpl final : public Server {
 public:
  explicit ServerImpl(ServerOptions o) : opt_(std::move(o)) {}

  ~ServerImpl() override {
    // Connections closed by the teardown below are not dropped chunk by chunk: the chunks and
    // the pool go with the server.
    {
      // A checkpoint being written finishes first (its waits are bounded); none starts after.
      std::unique_lock<std::mutex> lock(saver_mu_);
      saver_closed_ = true;
      std::thread saver = std::move(saver_);
      lock.unlock();
      if (saver.joinable()) saver.join();
    }
    // From here on messages are ignored and work handed to a chunk's owner is dropped (an
    // update completing on the device finishes nothing).
    stopping_ = true;
    // Forwards that end from here on (in a transport's queue, the teardown's) keep their landing
    // buffers: a waiter's grant would reach this server as it goes.
    pool_.CloseLeases();
    {
      std::lock_guard<std::mutex> lock(failover_mu_);  // ReplicaLinkLoop sees it, or waits
    }
    link_cv_.notify_all();
    if (link_thread_.joinable()) link_thread_.join();
    std::vector<std::thread> reaching;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      reaching = std::move(reaching_);
    }
    for (auto& t : reaching) t.join();  // each connect is bounded (ReachJoinedPeer)
    metrics_.Stop();
    applier_.Stop();
    if (device_)
      for (int s = 0; s < device_->streams(); ++s) (void)device_->Wait(s, kDeviceDrainTimeout);
    listener_.reset();
    node_.reset();
    // Its loop thread may be handling a message (reading data_ctx_) until the context joined it.
    transport::DestroyInPlace(data_ctx_);
    timeline_.reset();  // writes the file
    {
      // Each chunk's rule waits for its own device work as it goes.
      std::unique_lock<std::shared_mutex> lock(chunks_mu_);
      chunks_.clear();
    }
    if (pinned_pool_) device_->Unpin(pinned_pool_);
    control_ctx_.reset();
  }

  // Closes this server's replication connections as a reset link would (tests); with `reopen`
  // false they stay closed until called again with true.
  void CloseReplicationLinks(bool reopen) {
    std::vector<std::shared_ptr<RpcChannel>> peers;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      hold_links_ = !reopen;
      peers = peers_;
    }
    for (auto& p : peers)
      if (p) p->connection().Close();
    link_cv_.notify_all();
  }

  Status Init() {
    if (!opt_.restore.empty()) {
      auto cp = ReadCheckpoint(opt_.restore);
      if (!cp.ok()) return cp.status().WithContext("--restore " + opt_.restore);
      spdlog::info("server: restoring from {}: {} chunks of {} tensors", opt_.restore, cp->chunks,
                   cp->tensors.size());
      restore_ = std::move(cp).value();
    }
    gpu::DeviceSpec spec;
    SHARDPS_RETURN_IF_ERROR(gpu::ParseDevice(opt_.device, &spec));
    if (spec.twin) {
      device_ = gpu::MakeTwinDevice(kDeviceStreams, spec.twin_bytes);
    } else if (spec.gpu >= 0) {
      auto d = gpu::OpenCudaDevice(spec.gpu, kDeviceStreams);
      if (!d.ok()) return d.status().WithContext("--device " + opt_.device);
      device_ = std::move(d).value();
    }
    transport::ContextOptions co;
    SHARDPS_RETURN_IF_ERROR(transport::SecureRole(
        opt_.secret_file, {opt_.tls_cert, opt_.tls_key, opt_.tls_ca}, "server", &co));
    co.name = "server-data";
    co.busy_poll = opt_.busy_poll;
    co.backend_settings = opt_.transport_settings;
    // One inbound budget for the data and control planes of this server.
    co.connection_inbound_bytes = opt_.connection_inbound_bytes;
    inbound_ = std::make_shared<transport::InboundBudget>(opt_.process_inbound_bytes);
    co.inbound_budget = inbound_;
    auto dctx = transport::CreateContext(opt_.transport, co);
    if (!dctx.ok()) return dctx.status();
    data_ctx_ = std::move(dctx).value();
    auto l = data_ctx_->Listen(opt_.listen, [this](const std::shared_ptr<Connection>&) {
      transport::ConnectionHandlers h;
      h.on_message = [this](const std::shared_ptr<Connection>& c, transport::Message m) {
        OnMessage(c, m);
        SendAnswers();
      };
      h.on_close = [this](const std::shared_ptr<Connection>& c, Status) {
        if (ready_.load() && !stopping_.load()) OnConnectionClosed(c);
        SendAnswers();
      };
      return h;
    });
    if (!l.ok()) return l.status().WithContext("server listen");
    listener_ = std::move(l).value();

    co.name = "server-ctl";
    co.backend_settings.clear();
    auto cctx = transport::CreateContext("tcp", co);
    if (!cctx.ok()) return cctx.status();
    control_ctx_ = std::move(cctx).value();
    NodeClientOptions no;
    no.coordinator = opt_.coordinator;
    no.role = Role::kServer;
    no.rank = opt_.rank;
    no.data_address = AdvertisedAddress();
    no.transport = opt_.transport;
    no.connect_timeout = opt_.connect_timeout;
    no.register_timeout = opt_.register_timeout;
    no.on_server_down = [this](const ServerDown& d) { OnServerDown(d); };
    no.on_worker_down = [this](const WorkerDown& d) { OnWorkerDown(d); };
    no.on_worker_up = [this](const WorkerUp& u) { OnWorkerUp(u); };
    no.on_rebuild_backups = [this](const BackupOrders& o) { OnRebuildBackups(o); };
    no.on_server_joined = [this](const ServerJoined& j,
                                 std::function<void(const ServerReached&)> report) {
      OnServerJoined(j, std::move(report));
    };
    auto done = done_;
    auto node = NodeClient::Connect(control_ctx_.get(), no, [done](Status why, bool shutdown) {
      std::lock_guard<std::mutex> lock(done->mu);
      if (done->finished) return;
      done->finished = true;
      done->result = shutdown ? Status::OK() : why;
      done->cv.notify_all();
    });
    if (!node.ok()) {
      Finish(node.status());
      return node.status();
    }
    node_ = std::move(node).value();
    view_ = node_->info().view;
    rank_ = node_->info().rank;
    {
      // A server that joins a running job: the servers declared dead before it came.
      std::lock_guard<std::mutex> lock(failover_mu_);
      epoch_.store(std::max(epoch_.load(), node_->info().epoch));
      const size_t n = std::max(peer_addresses_.size(), view_.servers.size());
      peer_addresses_.resize(n);
      for (size_t s = 0; s < view_.servers.size(); ++s)
        peer_addresses_[s] = view_.servers[s].address;
      dead_.resize(std::max(dead_.size(), n), false);
      for (uint32_t s : node_->info().dead_servers) dead_[s] = true;
      // Workers removed before it joined: its chunks' steps do not wait for them.
      for (uint32_t w : node_->info().removed_workers) removed_workers_.insert(w);
    }
    // Per pusher: each worker, or each node (node-level reduction).
    counters_ = std::make_unique<WorkerCounters[]>(view_.num_pushers());
    num_counters_.store(view_.num_pushers());
    SHARDPS_RETURN_IF_ERROR(pool_.Init(data_ctx_.get(), opt_.landing_buffers, view_.chunk_bytes));
    if (device_ && device_->is_gpu()) {
      // Pushes are copied from the landing buffers to the GPU: pinned, asynchronously.
      if (Status st = device_->Pin(pool_.base(), pool_.total_bytes()); st.ok()) {
        pinned_pool_ = pool_.base();
      } else {
        spdlog::warn("server: landing buffers not pinned (copies to {} are slower): {}",
                     device_->name(), st.ToString());
      }
    }
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      dead_.resize(std::max<size_t>(dead_.size(), view_.num_servers), false);
    }
    if (view_.replicas > 0) SHARDPS_RETURN_IF_ERROR(ConnectPeers());
    // Apply threads poll for work as long as the transport polls for messages: where it
    // does not (tcp), a sleeping apply thread costs no more than the wake-up of the loop.
    applier_.Start(opt_.apply_threads, data_ctx_->busy_poll());
    // Ready, on the loop thread: the messages held until now are handled there, before any
    // that arrives later, in the order they came.
    if (!data_ctx_->RunInLoop([this] { BecomeReady(); }))
      return Status::Aborted("server stopping before it was ready");
    if (device_) {
      spdlog::info(
          "server {}: chunks on {}: parameters and optimizer state in its memory, updated by "
          "the fused kernels; pushes land in {}host memory and are copied over, versions are "
          "published to registered host memory ({})",
          rank_, device_->name(), pinned_pool_ ? "pinned " : "",
          data_ctx_->CanRegisterGpuMemory()
              ? "the transport could register GPU memory (GPUDirect RDMA), which this version "
                "does not use yet"
              : fmt::format("transport {} cannot register GPU memory", data_ctx_->backend()));
    } else {
      spdlog::info("server {}: data transport {}; chunks in host memory", rank_,
                   data_ctx_->backend());
    }
    spdlog::info("server {} serving on {} ({} mode, {} workers, {} landing buffers of {} bytes)",
                 rank_, listener_->address(), ModeString(view_.mode, view_.staleness),
                 view_.num_workers, opt_.landing_buffers, view_.chunk_bytes);
    if (!opt_.timeline.empty())
      timeline_ = std::make_unique<metrics::Timeline>(opt_.timeline,
                                                      fmt::format("server {}", rank_), rank_);
    auto m = metrics::RoleMetrics::Start(opt_.metrics_listen, "server", rank_,
                                         [this](metrics::Families& f) { Collect(f); });
    if (!m.ok()) return m.status();
    metrics_ = std::move(m).value();
    metrics_.MarkReady();
    return Status::OK();
  }

  // The metrics of a scrape (docs/metrics.md): the stats, the apply latencies, the pool.
  void Collect(metrics::Families& f) {
    ServerStats s = stats();
    auto d = [](uint64_t v) { return static_cast<double>(v); };
    f.Gauge("shardps_server_chunks", "chunks held", d(s.chunks));
    f.Gauge("shardps_server_parameter_bytes", "parameter bytes held", d(s.parameter_bytes));
    f.Counter("shardps_server_pushes_total", "pushes folded in (resends excluded)",
              d(s.pushes_applied));
    f.Counter("shardps_server_push_bytes_total", "bytes of the pushes that landed (as encoded)",
              d(push_bytes_.load(std::memory_order_relaxed)));
    f.Counter("shardps_server_duplicate_pushes_total", "resent pushes recognised, not applied",
              d(s.duplicate_pushes));
    f.Counter("shardps_server_late_pushes_total", "pushes dropped as late (backup workers)",
              d(s.late_pushes));
    f.Counter("shardps_server_versions_published_total", "versions published over all chunks",
              d(s.versions_published));
    f.Counter("shardps_server_grant_requests_total", "landing buffers asked for",
              d(s.grant_requests));
    f.Counter("shardps_server_grants_waited_total", "grant requests that waited for a buffer",
              d(s.grants_waited));
    f.Counter("shardps_server_grants_ahead_total", "buffers granted ahead with an ack",
              d(s.grants_ahead));
    f.Counter("shardps_server_batches_total", "batch requests: small chunks' operations fused",
              d(s.batches));
    f.Counter("shardps_server_batched_pushes_total", "pushes that travelled in a batch",
              d(s.batched_pushes));
    f.Counter("shardps_server_batched_pulls_total", "pulls answered in a batch",
              d(s.batched_pulls));
    f.Counter("shardps_server_replicated_pushes_total",
              "pushes forwarded to their chunk's backup (replication)", d(s.replicated_pushes));
    f.Counter("shardps_server_replicated_copied_total",
              "forwarded pushes whose bytes were copied first rather than sent from their landing "
              "buffer (batched pushes, pushes to a new backup, half the landing buffers held)",
              d(s.replicated_copied));
    f.Counter("shardps_server_replicated_steps_total",
              "sync steps forwarded whole to their chunk's backup (their sum, not each push)",
              d(s.replicated_steps));
    f.Counter("shardps_server_step_sums_allocated_total",
              "accumulators allocated for sync steps' sums (the others reuse one)",
              d(s.step_sums_allocated));
    f.Counter("shardps_server_replica_steps_total", "sync steps taken whole as a backup",
              d(s.replica_steps));
    f.Counter("shardps_server_replica_pushes_total", "pushes taken as a chunk's backup",
              d(s.replica_pushes));
    f.Counter("shardps_server_promoted_chunks_total",
              "chunks served since their primary was declared dead", d(s.promoted_chunks));
    f.Counter("shardps_server_backups_rebuilt_total",
              "chunks of which this server made a new backup after a failover",
              d(s.backups_rebuilt));
    f.Counter("shardps_server_replicas_installed_total",
              "chunks this server became the new backup of after a failover",
              d(s.replicas_installed));
    f.Gauge("shardps_server_unbacked_chunks",
            "chunks served here with no backup now (replication: one copy left)",
            d(s.unbacked_chunks));
    f.Counter("shardps_server_replica_links_reopened_total",
              "connections to a live backup that closed and were reopened (their waiting pushes "
              "sent again)",
              d(s.replica_links_reopened));
    f.Gauge("shardps_server_shard_map_epoch", "servers declared dead and replaced, as last heard",
            d(s.shard_map_epoch));
    f.Counter("shardps_server_grants_parked_total",
              "grant requests that waited for their chunk to catch up", d(s.grants_parked));
    f.Gauge("shardps_server_landing_buffers", "landing buffers in the pool", d(s.landing_buffers));
    f.Gauge("shardps_server_landing_buffers_in_use", "landing buffers granted or being applied",
            d(pool_.in_use()));
    f.Gauge("shardps_server_apply_queue_depth", "pushes queued for the apply threads",
            d(applier_.queued()));
    f.Gauge("shardps_server_inbound_bytes", "bytes held for what peers sent", d(s.inbound_bytes));
    f.Gauge("shardps_server_inbound_peak_bytes", "the most held at once", d(s.inbound_peak_bytes));
    f.Gauge("shardps_server_inbound_limit_bytes", "the inbound budget", d(s.inbound_limit_bytes));
    f.Counter("shardps_server_ranges_helped_total", "ranges of split updates run by helpers",
              d(s.ranges_helped));
    f.Gauge("shardps_server_apply_threads", "apply threads", d(s.apply_threads));
    f.Histogram("shardps_server_apply_seconds",
                "time to fold one push in (and run the optimizer when it completes a step)",
                apply_latency_);
    f.Gauge("shardps_server_rss_bytes", "resident memory", d(s.rss_bytes));
    f.Counter("shardps_refused_peers_total",
              "connections refused for not proving the cluster secret", d(s.refused_peers));
    if (node_)
      f.Counter("shardps_heartbeats_sent_total", "heartbeats sent to the coordinator",
                d(node_->heartbeats_sent()));
    for (const auto& w : s.workers) {
      metrics::Labels l = {{"worker", std::to_string(w.rank)}};
      f.Counter("shardps_server_worker_pushes_total", "pushes applied, by worker", d(w.pushes), l);
      f.Counter("shardps_server_worker_late_pushes_total", "pushes dropped as late, by worker",
                d(w.late_pushes), l);
      f.Counter("shardps_server_worker_waits_total",
                "grants or pushes held back by the consistency bound, by worker", d(w.waits), l);
      f.Gauge("shardps_server_worker_max_staleness",
              "most versions between a push's base and "
              "its apply, by worker",
              d(w.max_staleness), l);
    }
  }

  std::string AdvertisedAddress() const {
    std::string host;
    uint16_t port = 0;
    if (!transport::ParseHostPort(listener_->address(), &host, &port).ok())
      return listener_->address();
    if (!opt_.advertise.empty()) {
      host = opt_.advertise;
    } else if (host == "0.0.0.0" || host.empty()) {
      char name[256] = {0};
      gethostname(name, sizeof(name) - 1);
      host = name;
    }
    return host + ":" + std::to_string(port);
  }

  uint32_t rank() const override { return rank_; }
  std::string address() const override { return listener_->address(); }

  Status Wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(done_->mu);
    if (!done_->cv.wait_for(lock, timeout, [&] { return done_->finished; }))
      return Status::Timeout("the server is still serving");
    return done_->result;
  }

  std::string metrics_address() const override { return metrics_.address(); }
  ServerStats stats() const override {
    ServerStats s;
    {
      std::shared_lock<std::shared_mutex> lock(chunks_mu_);
      s.device = device_ ? device_->name() : "cpu";
      s.chunks = chunks_.size();
      for (auto& [id, c] : chunks_) {
        s.parameter_bytes += c->numel * 4;
        if (view_.replicas > 0 && !c->is_backup.load() && c->backup.load() == kNoServer)
          s.unbacked_chunks++;
      }
      s.grants_parked = grants_parked_.load();
    }
    s.pushes_applied = pushes_applied_.load();
    s.push_bytes = push_bytes_.load(std::memory_order_relaxed);
    s.duplicate_pushes = duplicates_.load();
    s.late_pushes = late_.load();
    const uint32_t nw = num_counters_.load();
    // view_ is set before num_counters_ (an atomic) is.
    s.pushers_are_nodes = nw > 0 && !view_.worker_nodes.empty();
    for (uint32_t w = 0; w < nw; ++w) {
      const WorkerCounters& c = counters_[w];
      WorkerPushStats& o = s.workers.emplace_back();
      o.rank = w;
      o.pushes = c.pushes.load(std::memory_order_relaxed);
      o.late_pushes = c.late.load(std::memory_order_relaxed);
      o.waits = c.waits.load(std::memory_order_relaxed);
      o.max_staleness = c.staleness_max.load(std::memory_order_relaxed);
      o.mean_staleness =
          o.pushes ? static_cast<double>(c.staleness_sum.load(std::memory_order_relaxed)) /
                         static_cast<double>(o.pushes)
                   : 0.0;
      o.max_steps_behind = c.behind_max.load(std::memory_order_relaxed);
    }
    s.versions_published = versions_.load();
    s.grant_requests = grant_requests_.load();
    if (inbound_) {
      s.inbound_bytes = inbound_->used();
      s.inbound_peak_bytes = inbound_->peak();
      s.inbound_limit_bytes = inbound_->limit();
    }
    if (data_ctx_) s.refused_peers += data_ctx_->refused_peers();
    if (control_ctx_) s.refused_peers += control_ctx_->refused_peers();
    s.grants_waited = grants_waited_.load();
    s.replicated_pushes = replicated_pushes_.load(std::memory_order_relaxed);
    s.replicated_copied = replicated_copied_.load(std::memory_order_relaxed);
    s.replicated_steps = replicated_steps_.load(std::memory_order_relaxed);
    s.step_sums_allocated = step_sums_allocated_.load(std::memory_order_relaxed);
    s.replica_steps = replica_steps_.load(std::memory_order_relaxed);
    s.replica_pushes = replica_pushes_.load(std::memory_order_relaxed);
    s.promoted_chunks = promoted_chunks_.load(std::memory_order_relaxed);
    s.backups_rebuilt = backups_rebuilt_.load(std::memory_order_relaxed);
    s.replicas_installed = replicas_installed_.load(std::memory_order_relaxed);
    s.replica_links_reopened = reopened_links_.load(std::memory_order_relaxed);
    s.shard_map_epoch = epoch_.load();
    s.pid = static_cast<uint64_t>(getpid());
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    s.host = host;
    s.grants_ahead = grants_ahead_.load();
    s.batches = batches_.load(std::memory_order_relaxed);
    s.batched_pushes = batched_pushes_.load(std::memory_order_relaxed);
    s.batched_pulls = batched_pulls_.load(std::memory_order_relaxed);
    s.landing_buffers = pool_.size();
    s.apply_threads = opt_.apply_threads;
    s.ranges_helped = applier_.ranges_helped();
    ReadRss(&s.rss_bytes, &s.peak_rss_bytes);
    return s;
  }

 private:
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    bool finished = false;
    Status result;
  };

  // Replication: a connection to every other server, over which this server forwards the pushes
  // of the chunks it is the primary of to their backups (kReplicate). Every server listens
  // before it registers, so all of them are reachable once the view is complete.
  Status ConnectPeers() {
    size_t n = 0;
    {
      // (A server that joined while this one was starting is in peer_addresses_ already.)
      std::lock_guard<std::mutex> lock(failover_mu_);
      n = peer_addresses_.size();
      peers_.resize(n);
      link_down_.resize(n, false);
      dead_.resize(std::max(dead_.size(), n), false);
    }
    for (uint32_t s = 0; s < n; ++s) {
      {
        std::lock_guard<std::mutex> lock(failover_mu_);
        if (s == rank_ || dead_[s] || peers_[s]) continue;
      }
      Status st = ConnectPeer(s, opt_.connect_timeout);
      const bool joined = TellReached(s, st);
      if (st.ok() || joined) continue;
      // A server that joins a running job may find a server dying (not declared dead yet): its
      // link is retried (ReplicaLinkLoop) until it is reached or declared dead.
      if (!node_->info().joined) return st;
      spdlog::warn("server {}: {}; retrying", rank_, st.ToString());
    }
    {
      // From now on ReplicaLinkLoop opens the links: to servers that joined meanwhile too.
      std::lock_guard<std::mutex> lock(failover_mu_);
      links_started_ = true;
      n = peer_addresses_.size();
      peers_.resize(n);
      link_down_.resize(n, false);
      dead_.resize(std::max(dead_.size(), n), false);
      for (uint32_t s = 0; s < n; ++s)
        if (s != rank_ && !dead_[s] && !peers_[s]) link_down_[s] = true;
    }
    link_thread_ = std::thread([this] { ReplicaLinkLoop(); });
    spdlog::info(
        "server {}: replication on: pushes to its chunks are acknowledged once their "
        "backups hold them too",
        rank_);
    return Status::OK();
  }

  // Opens the connection to server `s` over which pushes are forwarded to it, and makes it
  // the one Forward uses.
  Status ConnectPeer(uint32_t s, std::chrono::milliseconds timeout) {
    auto slot = std::make_shared<std::shared_ptr<RpcChannel>>();
    transport::ConnectionHandlers h;
    h.on_message = [this, slot, s](const std::shared_ptr<Connection>& c, transport::Message m) {
      if (stopping_.load()) return;
      if (m.tag != kReply || !*slot || !(*slot)->OnReply(m)) {
        spdlog::error("server {}: unexpected message from server {}; closing", rank_, s);
        c->Close();
      }
      SendAnswers();
    };
    h.on_close = [this, slot, s](const std::shared_ptr<Connection>&, Status st) {
      if (*slot)
        (*slot)->FailAll(Status::Unavailable(fmt::format("lost the connection to server {}{}", s,
                                                         st.ok() ? "" : ": " + st.message())));
      if (stopping_.load()) return;
      {
        // The link to a live backup is reopened (ReplicaLinkLoop); one to a dead server is not.
        std::lock_guard<std::mutex> lock(failover_mu_);
        if (*slot && peers_[s] == *slot && !dead_[s]) {
          link_down_[s] = true;
          spdlog::warn("server {}: the connection to server {} (replication) closed{}; reopening",
                       rank_, s, st.ok() ? "" : ": " + st.message());
        }
      }
      link_cv_.notify_all();
      SendAnswers();  // batch entries its failed calls completed
    };
    std::string address;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (s < peer_addresses_.size()) address = peer_addresses_[s];
    }
    auto conn = data_ctx_->Connect(address, h, timeout);
    if (!conn.ok())
      return conn.status().WithContext(fmt::format("connecting to server {} (replication)", s));
    *slot = std::make_shared<RpcChannel>(*conn);
    std::unique_lock<std::mutex> lock(failover_mu_);
    if (dead_[s]) {
      // Declared dead while this connected (a dying process may still accept): nothing is
      // forwarded to it any more, and a connection nobody closes could hold a push for ever.
      lock.unlock();
      (*conn)->Close();
      return Status::Unavailable(fmt::format("server {} was declared dead", s));
    }
    peers_[s] = *slot;
    return Status::OK();
  }

  // kServerJoined, on the control loop: server `j.rank` joined the running job. Its link is
  // opened by ReplicaLinkLoop (Connect blocks), which then says so (`report`).
  void OnServerJoined(const ServerJoined& j, std::function<void(const ServerReached&)> report) {
    if (stopping_.load()) return;
    // (This server may still be starting: its rank_ is not read here.)
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if ((j.rank < dead_.size() && dead_[j.rank]) ||
          (j.rank < peer_addresses_.size() && !peer_addresses_[j.rank].empty())) {
        spdlog::warn("server: told that server {} joined, which it knew of; ignored", j.rank);
        return;
      }
      const size_t n = std::max<size_t>(peer_addresses_.size(), j.rank + 1);
      peer_addresses_.resize(n);
      peer_addresses_[j.rank] = j.address;
      dead_.resize(std::max(dead_.size(), n), false);
      joined_reports_[j.rank] = std::move(report);
      // Before ConnectPeers ended (this server is starting), it connects to it there. After, a
      // thread of its own does (ReplicaLinkLoop may be busy reopening a link to a dying server,
      // as it is when a new server replaces a dead one).
      if (links_started_) {
        peers_.resize(std::max(peers_.size(), n));
        link_down_.resize(std::max(link_down_.size(), n), false);
        reaching_.emplace_back([this, r = j.rank] { ReachJoinedPeer(r); });
      }
    }
    spdlog::info("server: server {} joined the job at {}; connecting to it", j.rank, j.address);
  }

  // The replication link to server `s`, which joined; the coordinator hears how it went. If it
  // failed, ReplicaLinkLoop goes on trying (the coordinator declares the server dead meanwhile).
  void ReachJoinedPeer(uint32_t s) {
    if (stopping_.load()) return;
    Status st = ConnectPeer(s, std::min(opt_.connect_timeout, std::chrono::milliseconds(5000)));
    TellReached(s, st);
    if (st.ok()) {
      spdlog::info("server {}: connected to server {}, which joined (replication)", rank_, s);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (s < link_down_.size() && !dead_[s]) link_down_[s] = true;
    }
    link_cv_.notify_all();
  }

  // After connecting to server `s`: if it is one that joined the running job, the coordinator
  // hears how that went (kServerReached). True when it was.
  bool TellReached(uint32_t s, const Status& st) {
    std::function<void(const ServerReached&)> report;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      auto it = joined_reports_.find(s);
      if (it == joined_reports_.end()) return false;
      report = std::move(it->second);
      joined_reports_.erase(it);
    }
    if (!st.ok())
      spdlog::warn("server {}: cannot reach server {}, which joined: {}", rank_, s, st.ToString());
    report(ServerReached{s, st.ok() ? std::string() : st.ToString()});
    return true;
  }

  // How long a push waits for a backup whose connection closed: until the link is reopened (the
  // push is sent again), the backup is declared dead (it is acknowledged on this server's
  // word), or this bound passes (it fails, naming the backup). The coordinator declares a
  // silent server dead within the failover timeout of its last heartbeat.
  std::chrono::milliseconds ReplicaWaitBound() const {
    return std::chrono::milliseconds(2 * static_cast<int64_t>(view_.failover_timeout_ms) + 1000);
  }

  // The replication links' keeper (its own thread: Connect blocks): reopens a closed link to a
  // live backup and sends the pushes that were waiting on it again (the backup's sequence
  // tables apply each once); fails those that waited past ReplicaWaitBound.
  void ReplicaLinkLoop() {
    using Clock = std::chrono::steady_clock;
    std::unique_lock<std::mutex> lock(failover_mu_);
    while (!stopping_.load()) {
      link_cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stopping_.load()) break;
      const auto now = Clock::now();
      std::vector<std::pair<uint64_t, uint32_t>> never;  // awaited rebuilds whose chunk never came
      for (auto it = awaited_rebuilds_.begin(); it != awaited_rebuilds_.end();) {
        if (now < it->second.until) {
          ++it;
          continue;
        }
        never.emplace_back(it->first, it->second.backup);
        it = awaited_rebuilds_.erase(it);
      }
      if (!never.empty()) {
        lock.unlock();
        for (auto [chunk, b] : never)
          ReportRebuilt(chunk, b,
                        Status::InvalidArgument(fmt::format(
                            "this server does not hold it (it was not created here within {} s)",
                            kAwaitedRebuildWait.count())));
        lock.lock();
        if (stopping_.load()) break;
      }
      for (uint32_t s = 0; s < peers_.size(); ++s) {
        if (s == rank_ || dead_[s]) continue;
        if (link_down_[s] && !hold_links_) {
          lock.unlock();
          Status st =
              ConnectPeer(s, std::min(opt_.connect_timeout, std::chrono::milliseconds(1000)));
          const bool joined = TellReached(s, st);
          lock.lock();
          if (stopping_.load()) return;
          if (dead_[s]) continue;  // OnServerDown took its pushes
          if (st.ok()) {
            link_down_[s] = false;
            if (joined) {
              spdlog::info("server {}: connected to server {}, which joined (replication)", rank_,
                           s);
            } else {
              reopened_links_.fetch_add(1, std::memory_order_relaxed);
              spdlog::info("server {}: reopened the connection to server {} (replication)", rank_,
                           s);
            }
          }
        }
        auto it = orphans_.find(s);
        if (it == orphans_.end() || it->second.empty()) continue;
        std::vector<std::shared_ptr<ReplicaJoin>> resend, expired;
        if (!link_down_[s]) {
          resend = std::move(it->second);
        } else {
          auto& waiting = it->second;
          for (size_t i = 0; i < waiting.size();) {
            if (now - waiting[i]->orphaned_at > ReplicaWaitBound()) {
              expired.push_back(std::move(waiting[i]));
              waiting[i] = std::move(waiting.back());
              waiting.pop_back();
            } else {
              ++i;
            }
          }
        }
        if (it->second.empty()) orphans_.erase(it);
        if (resend.empty() && expired.empty()) continue;
        if (!expired.empty())
          spdlog::error(
              "server {}: {} pushes not acknowledged: their backup, server {}, was unreachable "
              "for {} ms and was not declared dead",
              rank_, expired.size(), s, ReplicaWaitBound().count());
        lock.unlock();
        data_ctx_->RunInLoop([this, s, resend = std::move(resend), expired = std::move(expired)] {
          for (auto& j : resend) SendToBackup(j);
          for (auto& j : expired)
            RemoteDone(j, Status::Timeout(fmt::format(
                              "server {} could not reach server {}, the backup, for {} ms: the "
                              "push is applied on the primary but not held by the backup",
                              rank_, s, ReplicaWaitBound().count())));
          SendAnswers();
        });
        lock.lock();
      }
    }
  }

  // kWorkerDown, on the control loop: worker `d.rank` died and was removed from the job. Its
  // connections are closed (a process that was only paused can push nothing more, nor can it
  // after a new one took its place), and each chunk's engine stops waiting for it; chunks created
  // later learn it as they are made.
  void OnWorkerDown(const WorkerDown& d) {
    if (stopping_.load()) return;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (d.rank >= view_.num_workers || !removed_workers_.insert(d.rank).second) return;
    }
    spdlog::warn("server {}: worker {} was removed from the job: steps complete without it", rank_,
                 d.rank);
    data_ctx_->RunInLoop([this, w = d.rank] {
      CloseWorkerConnections(w);
      ChangeMembership(w, false, nullptr);
      SendAnswers();  // batch entries the small chunks' steps completed
    });
  }

  // kWorkerUp, on the control loop: removed worker `u.rank` rejoins (a new process). Once every
  // chunk's engine waits for it again and knows where its pushes go on, the coordinator hears
  // it (kWorkerRestored), and lets the worker in.
  void OnWorkerUp(const WorkerUp& u) {
    if (stopping_.load()) return;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (u.rank >= view_.num_workers) return;
      removed_workers_.erase(u.rank);
    }
    spdlog::info("server {}: worker {} rejoins the job", rank_, u.rank);
    data_ctx_->RunInLoop([this, w = u.rank] {
      ChangeMembership(w, true, [this, w] {
        if (node_) node_->ReportWorkerRestored(w);
      });
      SendAnswers();
    });
  }

  // Data loop: the connection carries the data-plane messages of worker `w` (noted at the
  // first), so that they can be closed when it is removed.
  void NoteWorkerConnection(const std::shared_ptr<Connection>& c, uint32_t w) {
    if (c->user_data) return;
    c->user_data = std::make_shared<uint32_t>(w);
    auto& conns = worker_conns_[w];
    std::erase_if(conns, [](const std::weak_ptr<Connection>& k) { return k.expired(); });
    conns.push_back(c);
  }

  void CloseWorkerConnections(uint32_t w) {
    auto it = worker_conns_.find(w);
    if (it == worker_conns_.end()) return;
    for (auto& k : it->second)
      if (auto c = k.lock()) c->Close();
    worker_conns_.erase(it);
  }

  // Data loop: worker `w` was removed from the job, or rejoined it, in every chunk this server
  // is the primary of (or the only holder). A backup's engine changes where its primary's did,
  // in the stream of pushes the primary sends it (kReplicaMembership, sent here before any push
  // that lands after it, or for a chunk whose pushes go as they are taken, as it is taken), so
  // the two copies make the same decisions. `done` runs once every engine changed.
  void ChangeMembership(uint32_t w, bool rejoined, std::function<void()> done) {
    const MembershipChange change =
        rejoined ? MembershipChange::kRejoined : MembershipChange::kRemoved;
    std::vector<Chunk*> all;
    {
      std::shared_lock<std::shared_mutex> chunks(chunks_mu_);
      for (auto& [id, ch] : chunks_) all.push_back(ch.get());
    }
    auto left = std::make_shared<std::atomic<size_t>>(all.size() + 1);
    auto finish = [left, done = std::move(done)] {
      if (left->fetch_sub(1) == 1 && done) done();
    };
    for (Chunk* ch : all) {
      if (ch->is_backup.load()) {  // its primary says when (OnServerDown: if it cannot)
        finish();
        continue;
      }
      ChangeChunkMembership(*ch, w, change, 0, [finish](uint64_t) { finish(); });
    }
    finish();
  }

  // Data loop: one chunk's side of a membership change, its backup told first (or, for a chunk
  // whose pushes go to it as they are taken, as the change is made); `done` gets the sequence
  // number the worker's next push must have (RestoreWorker, JoinAt), on the owner thread.
  void ChangeChunkMembership(Chunk& ch, uint32_t w, MembershipChange change, uint64_t from,
                             std::function<void(uint64_t)> done) {
    const uint32_t pusher = view_.PusherOf(w);
    if (!ch.forward_on_take.load() && !ch.forward_steps)
      SendMembership(ch, ch.backup.load(), pusher, change, from);
    OnOwner(ch, [this, chp = &ch, pusher, change, from, done = std::move(done)] {
      Chunk& c = *chp;
      uint64_t next = 0;
      Execute(c, Membership(c, pusher, change, from, &next));
      if (c.forward_on_take.load(std::memory_order_relaxed) || c.forward_steps) {
        // After the pushes it took before (ForwardTaken), or the steps it published before
        // (ForwardStep, the change's own included), to its backup and to a new one being made
        // from a copy taken before.
        std::vector<uint32_t> to;
        if (c.backup.load() != kNoServer) to.push_back(c.backup.load());
        if (c.forward_on_take.load(std::memory_order_relaxed) && c.rebuild && c.rebuild_copied)
          to.push_back(c.rebuild->backup);
        data_ctx_->RunInLoop([this, chp, to, pusher, change, from] {
          for (uint32_t b : to) SendMembership(*chp, b, pusher, change, from);
        });
      }
      done(next);
    });
  }

  // Owner thread: the engine's side of a membership change (and of its record on a backup).
  EngineActions Membership(Chunk& ch, uint32_t pusher, MembershipChange change, uint64_t from,
                           uint64_t* next) {
    *next = 0;
    EngineActions a;
    switch (change) {
      case MembershipChange::kRemoved:
        a = ch.engine->RemoveWorker(pusher);
        break;
      case MembershipChange::kRejoined:
        a = ch.engine->RestoreWorker(pusher, next);
        break;
      case MembershipChange::kJoinAt:
        a = ch.engine->JoinAt(pusher, from, next);
        break;
    }
    // A restore or start that changed nothing (the chunk had it already) leaves what it said.
    std::lock_guard<std::mutex> lock(ch.rejoin_mu);
    if (change == MembershipChange::kRemoved) {
      ch.rejoin_next.erase(pusher);
    } else if (*next != 0) {
      ch.rejoin_next[pusher] = *next;
    }
    return a;
  }

  // Data loop: tells backup `b` of `ch` (if it has one) of a membership change.
  void SendMembership(Chunk& ch, uint32_t b, uint32_t pusher, MembershipChange change,
                      uint64_t from) {
    if (b == kNoServer) return;
    std::shared_ptr<RpcChannel> peer;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (b < peers_.size() && !dead_[b]) peer = peers_[b];
    }
    if (!peer) return;
    // Like a forwarded push (ReplicaJoin): sent again, in order with them, if the link to the
    // backup closes and is reopened.
    auto join = std::make_shared<ReplicaJoin>();
    join->backup = b;
    join->tag = kReplicaMembership;
    join->deliver = [](EngineActions::Ack) {};
    Writer w(&join->meta);
    ReplicaMembership{epoch_.load(), ch.id, pusher, change, from}.Encode(&w);
    SendReplica(*peer, join);
  }

  // kReplicaMembership: the primary of a chunk this server backs up removed a pusher, or let one
  // rejoin, at this point of the pushes it sent.
  void OnReplicaMembership(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r) {
    ReplicaMembership rm;
    if (!rm.Decode(&r) || !r.done()) return Drop(c, "malformed membership change");
    Chunk* ch = FindChunk(rm.chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", rm.chunk_id)));
    if (!ch->is_backup.load()) return Reply(*c, req, ServedHere(rm.chunk_id, rm.epoch));
    if (rm.pusher >= view_.num_pushers())
      return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown pusher {}", rm.pusher)));
    OnOwner(*ch, [this, ch, rm] {
      uint64_t next = 0;
      Execute(*ch, Membership(*ch, rm.pusher, rm.change, rm.from, &next));
    });
    Reply(*c, req, Status::OK());
  }

  // kServerDown, on the control loop: server `d.rank` was replaced. Chunks it was the primary of
  // whose backup is here are served from here now; those it backed up have no backup any more,
  // and their pushes waiting for its answer are acknowledged on this server's alone.
  void OnServerDown(const ServerDown& d) {
    if (stopping_.load()) return;  // the server is being destroyed
    std::vector<std::shared_ptr<ReplicaJoin>> orphans;
    std::shared_ptr<RpcChannel> peer;
    uint32_t promoted = 0, unbacked = 0;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (d.rank >= 4096) return;  // a coordinator's bound on servers
      if (d.rank >= dead_.size()) dead_.resize(d.rank + 1, false);
      dead_[d.rank] = true;
      epoch_.store(std::max(epoch_.load(), d.epoch));
      {
        std::shared_lock<std::shared_mutex> chunks(chunks_mu_);
        for (auto& [id, ch] : chunks_) {
          if (ch->is_backup.load() && ch->primary.load() == d.rank) {
            ch->primary.store(rank_);
            ch->is_backup.store(false);
            ++promoted;
            // Its engine followed the dead primary's membership changes; any it did not hear
            // of are made now, as the coordinator told this server.
            OnOwner(*ch, [this, raw = ch.get(), removed = removed_workers_] {
              for (uint32_t w = 0; w < view_.num_workers; ++w) {
                const uint32_t p = view_.PusherOf(w);
                uint64_t next = 0;
                if (removed.count(w) != raw->engine->removed(p))
                  Execute(*raw, Membership(*raw, p,
                                           removed.count(w) ? MembershipChange::kRemoved
                                                            : MembershipChange::kRejoined,
                                           0, &next));
              }
            });
          }
          if (ch->backup.load() == d.rank) {
            ch->backup.store(kNoServer);
            ++unbacked;
          }
        }
      }
      orphans = std::move(orphans_[d.rank]);
      orphans_.erase(d.rank);
      joined_reports_.erase(d.rank);
      if (d.rank < peers_.size()) peer = std::move(peers_[d.rank]);
      if (d.rank < link_down_.size()) link_down_[d.rank] = false;
    }
    promoted_chunks_ += promoted;
    spdlog::warn(
        "server {}: server {} was declared dead (shard map epoch {}): this server now serves the "
        "{} chunks it backed up for it; {} of its chunks have no backup now",
        rank_, d.rank, d.epoch, promoted, unbacked);
    // Its calls fail now (they are acknowledged on this server's word: the backup is gone).
    if (peer) peer->connection().Close();
    if (!orphans.empty())
      data_ctx_->RunInLoop([this, orphans = std::move(orphans)] {
        for (auto& j : orphans) RemoteDone(j, Status::OK());
        SendAnswers();
      });
  }

  // The data loop: forwards push `p` of `ch` to the chunk's backup, and makes its
  // acknowledgement wait for the backup's. The bytes go from the landing buffer, leased until
  // the forward is over (the buffer would go back to the pool once this server applied the
  // push, which may be before they left), or from a copy (Join).
  void Forward(Chunk& ch, LandedPush& p) {
    const uint32_t b = ch.backup.load();
    if (b == kNoServer || ch.forward_steps || ch.forward_on_take.load(std::memory_order_relaxed))
      return;
    std::shared_ptr<RpcChannel> peer;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (b < peers_.size()) peer = peers_[b];
    }
    if (!peer) return;
    SendReplica(*peer, Join(ch, p, b, nullptr, /*from_landing=*/true));
  }

  // Owner thread, as the chunk's engine takes push `p` (EngineConfig::on_take), for a chunk that
  // was given a new backup: it goes to the backup, or to the new one being made once its copy
  // was taken (provisional), after everything taken before it.
  void ForwardTaken(Chunk& ch, LandedPush& p) {
    if (!ch.forward_on_take.load(std::memory_order_relaxed)) return;
    uint32_t b = ch.backup.load();
    std::shared_ptr<Rebuild> r;
    if (b == kNoServer && ch.rebuild && ch.rebuild_copied) {
      if (Provisional(ch.rebuild)) {
        r = ch.rebuild;
        b = r->backup;
      } else {
        b = ch.backup.load();  // it ended meanwhile: whole (the chunk's backup now), or failed
      }
    }
    // (A push forwarded to the backup that died goes to this one too.)
    if (b == kNoServer || (p.reply.join && p.reply.join->backup == b && !r)) return;
    auto join = Join(ch, p, b, std::move(r));
    data_ctx_->RunInLoop([this, join] {
      SendToBackup(join);
      SendAnswers();
    });
  }

  // Counts a push sent to the new backup `r` before it is whole; false when `r` ended already.
  static bool Provisional(const std::shared_ptr<Rebuild>& r) {
    std::lock_guard<std::mutex> lock(r->mu);
    if (r->done) return false;
    r->provisional++;
    return true;
  }

  // Makes push `p` of `ch` wait for backup `b`'s answer too (`r`: a new backup being made, whose
  // answer counts for it instead): what to send it. With `from_landing`, a push that landed in
  // a landing buffer is sent from there, the buffer kept out of the pool until the forward is
  // over (LandingPool::Lease); otherwise, or when half the pool is held so, the bytes are copied.
  std::shared_ptr<ReplicaJoin> Join(Chunk& ch, LandedPush& p, uint32_t b,
                                    std::shared_ptr<Rebuild> r, bool from_landing = false) {
    auto join = std::make_shared<ReplicaJoin>();
    join->backup = b;
    join->rebuild = std::move(r);
    join->deliver = [this, chp = &ch](EngineActions::Ack a) { AckNow(*chp, a); };
    p.reply.join = join;
    Bytes meta;
    Writer w(&meta);
    PushDone{.epoch = epoch_.load(),
             .chunk_id = ch.id,
             .buffer = kNoLandingBuffer,
             .worker = p.worker,
             .seq = p.seq,
             .bytes = p.grad.bytes,
             .base_version = p.base_version,
             .lr = p.lr}
        .Encode(&w);
    const auto* g = static_cast<const uint8_t*>(p.grad.data);
    replicated_pushes_.fetch_add(1, std::memory_order_relaxed);
    join->meta = std::move(meta);
    std::shared_ptr<const void> lease;
    if (from_landing && p.buffer != kNoLandingBuffer) lease = pool_.Lease(p.buffer);
    if (lease) {
      join->payload = transport::Payload{g, p.grad.bytes, std::move(lease)};
    } else {
      replicated_copied_.fetch_add(1, std::memory_order_relaxed);
      join->payload = transport::Payload::Own(Bytes(g, g + p.grad.bytes));
    }
    return join;
  }

  // A forwarded push again, over the backup's connection as it is now.
  void SendToBackup(const std::shared_ptr<ReplicaJoin>& join) {
    std::shared_ptr<RpcChannel> peer;
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (join->backup < peers_.size() && !dead_[join->backup]) peer = peers_[join->backup];
    }
    if (!peer && join->rebuild)
      return RebuildPushAnswered(
          join, Status::Unavailable(fmt::format("server {} was declared dead", join->backup)));
    if (!peer) return RemoteDone(join, Status::OK());  // the backup was declared dead
    SendReplica(*peer, join);
  }

  void SendReplica(RpcChannel& peer, const std::shared_ptr<ReplicaJoin>& join) {
    peer.Call(join->tag, join->meta, join->payload,
              [this, join](Status st, Reader& r, transport::Message& m) {
                PushAck ack;
                if (st.ok() && join->tag != kReplicaMembership && (!ack.Decode(&r) || !r.done()))
                  st = Status::ProtocolError("malformed replica acknowledgement");
                if (join->tag == kReplicaMembership && m.tag == kReply && !st.ok())
                  spdlog::warn("server {}: backup {} refused a membership change: {}", rank_,
                               join->backup, st.ToString());
                OnReplicaAnswer(join, st, m.tag == kReply);
              });
  }

  // The backup answered (`answered`: its reply), or the transport failed the call.
  void OnReplicaAnswer(const std::shared_ptr<ReplicaJoin>& join, const Status& st, bool answered) {
    if (join->rebuild)
      return RebuildPushAnswered(
          join, answered || !st.ok() ? st : Status::Unavailable("no answer from the new backup"));
    // An answer (an acknowledgement, or a refusal: a fenced primary's) goes to the worker.
    if (answered) return RemoteDone(join, st);
    // The backup is gone: acknowledged on this server's word once the coordinator declared it
    // dead (OnServerDown), never before, so that nothing is acknowledged that a failover of
    // this server could lose.
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (!dead_[join->backup]) {
        if (join->orphaned_at == std::chrono::steady_clock::time_point{})
          join->orphaned_at = std::chrono::steady_clock::now();
        orphans_[join->backup].push_back(join);
        link_cv_.notify_all();
        return;
      }
    }
    RemoteDone(join, Status::OK());
  }

  void RemoteDone(const std::shared_ptr<ReplicaJoin>& join, const Status& st) {
    std::vector<std::shared_ptr<ReplicaJoin>> followers;
    {
      std::lock_guard<std::mutex> lock(join->mu);
      join->answered = true;
      followers.swap(join->followers);
    }
    if (auto a = join->Remote(st)) join->deliver(std::move(*a));
    for (auto& f : followers) RemoteDone(f, st);
  }

  // Owner thread, a chunk that forwards steps: an acknowledgement the engine gave outside a step
  // (a push dropped as late, or sent again, for a step published already) waits for the backup to
  // hold the last step forwarded, as that step's own pushes do: until then its version could be
  // lost with this server.
  void AfterLastStep(Chunk& ch, EngineActions::Ack& a) {
    if (!a.status.ok() || a.to.join || a.to.replica) return;
    auto lead = ch.last_step.lock();
    if (!lead) return;
    auto f = std::make_shared<ReplicaJoin>();
    f->backup = lead->backup;
    f->deliver = [this, chp = &ch](EngineActions::Ack x) { AckNow(*chp, x); };
    if (lead->AddFollower(f)) a.to.join = f;
  }

  // Owner thread: step `st` of `ch` was published (EngineConfig::forward_steps). Its sum goes to
  // the chunk's backup, and its pushes are acknowledged once the backup has it too (one
  // ReplicaJoin each, the first carrying the message); at once when the chunk has no backup,
  // or forwards pushes as it takes them (a new backup was begun: ForwardTaken sent them).
  // Sent from the data loop, in order with the membership changes made after it.
  void ForwardStep(Chunk& ch, EngineActions::Step st) {
    const uint32_t b = ch.backup.load();
    if (b == kNoServer || ch.forward_on_take.load(std::memory_order_relaxed)) {
      ch.engine->Recycle(std::move(st.sum));
      for (auto& a : st.acks) AckNow(ch, a);
      return;
    }
    std::vector<std::shared_ptr<ReplicaJoin>> joins;
    for (size_t i = 0; i < std::max<size_t>(1, st.acks.size()); ++i) {
      auto j = std::make_shared<ReplicaJoin>();
      j->backup = b;
      j->deliver = [this, chp = &ch](EngineActions::Ack a) { AckNow(*chp, a); };
      joins.push_back(std::move(j));
    }
    std::shared_ptr<ReplicaJoin> lead = joins[0];
    lead->followers.assign(joins.begin() + 1, joins.end());
    lead->tag = kReplicateStep;
    Writer w(&lead->meta);
    ForwardedStep{epoch_.load(), ch.id, st.seq, st.lr, st.scale, st.pushers}.Encode(&w);
    std::shared_ptr<Accumulator> sum = SpareSums::Lend(std::move(st.sum), ch.spare_sums);
    lead->payload = transport::Payload{sum->data(), ch.numel * sizeof(float), std::move(sum)};
    replicated_steps_.fetch_add(1, std::memory_order_relaxed);
    ch.last_step = lead;
    for (size_t i = 0; i < st.acks.size(); ++i) {
      st.acks[i].to.join = joins[i];
      AckNow(ch, st.acks[i]);
    }
    data_ctx_->RunInLoop([this, lead] {
      SendToBackup(lead);
      SendAnswers();
    });
  }

  // New backups (docs/fault-tolerance.md, "New backups").

  // kRebuildBackups, on the control loop: the coordinator asks this server, the primary of each
  // chunk named, to copy it to a new backup. Each is made on the chunk's owner thread.
  void OnRebuildBackups(const BackupOrders& o) {
    if (stopping_.load()) return;
    for (const auto& it : o.items) {
      Chunk* ch = FindChunk(it.chunk_id);
      if (!ch) {
        // Not created here yet: a worker's declare was creating it when its primary died, and
        // its create reaches this server after the order. Begun once it is (MakeChunk publishes
        // a chunk under failover_mu_), or refused after kAwaitedRebuildWait (ReplicaLinkLoop).
        std::lock_guard<std::mutex> lock(failover_mu_);
        ch = FindChunk(it.chunk_id);
        if (!ch) {
          awaited_rebuilds_[it.chunk_id] = {it.backup,
                                            std::chrono::steady_clock::now() + kAwaitedRebuildWait};
          continue;
        }
      }
      std::string why;
      {
        std::lock_guard<std::mutex> lock(failover_mu_);
        if (!ch) {
          why = "this server does not hold it";
        } else if (ch->is_backup.load()) {
          why = "this server is not its primary";
        } else if (it.backup == rank_ || it.backup >= peers_.size() || !peers_[it.backup] ||
                   dead_[it.backup]) {
          why = fmt::format("server {} cannot be reached from server {}", it.backup, rank_);
        }
      }
      if (!why.empty()) {
        ReportRebuilt(it.chunk_id, it.backup, Status::InvalidArgument(why));
        continue;
      }
      OnOwner(*ch, [this, ch, b = it.backup] { BeginRebuild(*ch, b); });
    }
  }

  void ReportRebuilt(uint64_t chunk, uint32_t backup, const Status& st) {
    if (st.ok()) {
      spdlog::info("server {}: chunk {} has a new backup on server {}", rank_, chunk, backup);
    } else {
      spdlog::warn("server {}: no new backup of chunk {} on server {}: {}", rank_, chunk, backup,
                   st.ToString());
    }
    if (node_)
      node_->ReportBackupRebuilt(BackupRebuilt{chunk, backup, st.ok() ? "" : st.ToString()});
  }

  // Owner thread. New sync steps wait while the open ones drain (their sums would not be in the
  // copy); the copy is taken once the chunk is quiet (TakeBackupCopy, also run after each of the
  // engine's actions).
  void BeginRebuild(Chunk& ch, uint32_t b) {
    if (ch.rebuild) {
      ch.next_rebuild = b;  // one in progress (to a server that died): this one goes after it
      return;
    }
    if (ch.backup.load() != kNoServer)
      return ReportRebuilt(ch.id, b,
                           Status::AlreadyExists(fmt::format("chunk {} has a backup", ch.id)));
    auto r = std::make_shared<Rebuild>();
    r->chunk = &ch;
    r->backup = b;
    ch.rebuild = r;
    ch.rebuild_copied = false;
    ch.forward_on_take.store(true);
    ch.engine->HoldNewSteps();
    TakeBackupCopy(ch);
  }

  // Owner thread: once the chunk is quiet, its state (parameters, optimizer state, version,
  // sequence tables) goes to the new backup, and the pushes waiting here after it; then every
  // push applied here is sent there too (Forward on landing, or ApplyPush).
  void TakeBackupCopy(Chunk& ch) {
    if (!ch.rebuild || ch.rebuild_copied || !ch.engine->Quiet()) return;
    std::shared_ptr<Rebuild> r = ch.rebuild;
    ch.rebuild_copied = true;
    ChunkState s;
    Status st = Snapshot(ch, &s);
    if (!st.ok()) {
      {
        std::lock_guard<std::mutex> lock(r->mu);
        r->failed = st;
      }
      Execute(ch, ch.engine->ReleaseHold());
      data_ctx_->RunInLoop([this, r] { FinishRebuild(r); });
      return;
    }
    InstallReplica in;
    in.epoch = epoch_.load();
    in.item = ch.create;
    in.item.primary = rank_;
    in.item.backup = r->backup;
    in.version = s.version;
    in.steps = s.steps;
    in.last_seq = s.last_seq;
    in.removed = ch.engine->removed_workers();
    in.join_from = ch.engine->join_froms();
    in.m_floats = s.m.size();
    in.v_floats = s.v.size();
    Bytes meta;
    Writer w(&meta);
    in.Encode(&w);
    Bytes payload((s.params.size() + s.m.size() + s.v.size()) * 4);
    uint8_t* at = payload.data();
    for (const auto* v : {&s.params, &s.m, &s.v}) {
      if (!v->empty()) std::memcpy(at, v->data(), v->size() * 4);
      at += v->size() * 4;
    }
    spdlog::info("server {}: copying chunk {} (version {}) to server {}, its new backup", rank_,
                 ch.id, s.version, r->backup);
    // On the loop, and so on the link before the pushes the engine takes from now on
    // (ForwardTaken posts each to the loop after this).
    data_ctx_->RunInLoop([this, r, meta = std::move(meta), payload = std::move(payload)]() mutable {
      std::shared_ptr<RpcChannel> peer;
      {
        std::lock_guard<std::mutex> lock(failover_mu_);
        if (r->backup < peers_.size() && !dead_[r->backup]) peer = peers_[r->backup];
      }
      if (!peer) {
        {
          std::lock_guard<std::mutex> lock(r->mu);
          if (r->failed.ok())
            r->failed = Status::Unavailable(fmt::format("server {} is gone", r->backup));
        }
        return FinishRebuild(r);
      }
      peer->Call(kInstallReplica, meta, transport::Payload::Own(std::move(payload)),
                 [this, r](Status st, Reader& rd, transport::Message&) {
                   if (st.ok() && !rd.done())
                     st = Status::ProtocolError("malformed answer to a replica install");
                   {
                     std::lock_guard<std::mutex> lock(r->mu);
                     if (st.ok()) r->installed = true;
                     if (!st.ok() && r->failed.ok()) r->failed = st;
                   }
                   FinishRebuild(r);
                 });
    });
    Execute(ch, ch.engine->ReleaseHold());
  }

  // A push sent to a new backup was answered (or could not be): a refusal or a lost connection
  // fails the rebuild. The worker is acknowledged on this server's word: the coordinator counts
  // the new backup only once it is whole.
  void RebuildPushAnswered(const std::shared_ptr<ReplicaJoin>& join, const Status& st) {
    const std::shared_ptr<Rebuild>& r = join->rebuild;
    {
      std::lock_guard<std::mutex> lock(r->mu);
      r->provisional--;
      if (!st.ok() && r->failed.ok())
        r->failed = st.WithContext("a push sent to the new backup after its copy");
    }
    RemoteDone(join, Status::OK());
    FinishRebuild(r);
  }

  // Ends rebuild `r` once it failed, or its copy is installed and every push sent after it was
  // answered: the new backup becomes the chunk's backup (or the chunk keeps one copy), and the
  // coordinator hears it.
  void FinishRebuild(const std::shared_ptr<Rebuild>& r) {
    Status failed;
    Chunk& ch = *r->chunk;
    {
      std::lock_guard<std::mutex> lock(r->mu);
      if (r->done || (r->failed.ok() && (!r->installed || r->provisional > 0))) return;
      failed = r->failed;
      {
        // The chunk's backup before `done`: a push taken meanwhile that finds the rebuild over
        // finds the backup (ForwardTaken).
        std::lock_guard<std::mutex> roles(failover_mu_);
        if (failed.ok() && dead_[r->backup])
          failed = Status::Unavailable(fmt::format("server {} was declared dead", r->backup));
        if (failed.ok()) ch.backup.store(r->backup);
      }
      r->done = true;
    }
    if (failed.ok()) backups_rebuilt_.fetch_add(1, std::memory_order_relaxed);
    ReportRebuilt(ch.id, r->backup, failed);
    OnOwner(ch, [this, chp = &ch, r] {
      if (chp->rebuild != r) return;
      chp->rebuild.reset();
      chp->rebuild_copied = false;
      if (chp->next_rebuild != kNoServer) {
        const uint32_t b = chp->next_rebuild;
        chp->next_rebuild = kNoServer;
        BeginRebuild(*chp, b);
      }
    });
  }

  // kInstallReplica: this server becomes the backup of a chunk, from its primary's copy of it
  // (the primary then sends the pushes it applies after the copy, as kReplicate).
  void OnInstallReplica(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r,
                        transport::Message& m) {
    InstallReplica in;
    if (!in.Decode(&r, view_.num_pushers()) || !r.done())
      return Drop(c, "malformed replica install");
    const CreateChunkItem& it = in.item;
    if (Status v = CheckItem(it); !v.ok()) return Reply(*c, req, v);
    if (in.m_floats > it.numel || in.v_floats > it.numel ||
        m.payload.size() != (it.numel + in.m_floats + in.v_floats) * 4 ||
        in.last_seq.size() != view_.num_pushers())
      return Reply(*c, req,
                   Status::InvalidArgument(fmt::format(
                       "the copy of chunk {} ({} elements, {} bytes, {} sequence numbers) does "
                       "not add up",
                       it.chunk_id, it.numel, m.payload.size(), in.last_seq.size())));
    {
      std::lock_guard<std::mutex> lock(failover_mu_);
      if (it.backup != rank_ || it.primary == rank_ || it.primary >= dead_.size() ||
          dead_[it.primary])
        return Reply(*c, req,
                     Status::Aborted(fmt::format("server {} does not take chunk {} as the backup "
                                                 "of server {} (shard map epoch {})",
                                                 rank_, it.chunk_id, it.primary, epoch_.load())));
    }
    if (FindChunk(it.chunk_id))
      return Reply(
          *c, req,
          Status::AlreadyExists(fmt::format("server {} holds chunk {}", rank_, it.chunk_id)));
    ChunkState s;
    s.tensor = it.tensor;
    s.chunk_id = it.chunk_id;
    s.offset = it.offset;
    s.numel = it.numel;
    s.version = in.version;
    s.optimizer = static_cast<uint8_t>(it.optimizer.kind);
    s.steps = in.steps;
    s.last_seq = std::move(in.last_seq);
    const auto* f = reinterpret_cast<const float*>(m.payload.data());
    s.params.assign(f, f + it.numel);
    s.m.assign(f + it.numel, f + it.numel + in.m_floats);
    s.v.assign(f + it.numel + in.m_floats, f + it.numel + in.m_floats + in.v_floats);
    for (uint32_t p : in.removed)
      if (p >= view_.num_pushers())
        return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown pusher {}", p)));
    if (!in.join_from.empty() && in.join_from.size() != view_.num_pushers())
      return Reply(*c, req, Status::InvalidArgument("the copy's start steps do not add up"));
    s.join_from = std::move(in.join_from);
    auto made = MakeChunk(it, s.params.data(), &s, &in.removed);
    if (!made.ok()) return Reply(*c, req, made.status());
    replicas_installed_.fetch_add(1, std::memory_order_relaxed);
    spdlog::info("server {}: now the backup of chunk {} of '{}' (version {}), for server {}", rank_,
                 it.chunk_id, it.tensor, s.version, it.primary);
    AnswerAttaches();  // workers attaching to the new backup
    Reply(*c, req, Status::OK());
  }

  // What a replaced primary hears from the server that serves its chunk since it was declared
  // dead (fencing), whatever it sends it for the chunk.
  Status ServedHere(uint64_t chunk, uint64_t sender_epoch) const {
    return Status::Aborted(fmt::format(
        "server {} serves chunk {} itself since its primary was declared dead (shard map epoch "
        "{}; the sender's {}): the sender was replaced",
        rank_, chunk, epoch_.load(), sender_epoch));
  }

  // kReplicate: a push to a chunk this server is the backup of, from the chunk's primary. It
  // goes through the chunk's engine like any push, so the copies hold the same versions and
  // sequence tables; the answer is the engine's acknowledgement.
  void OnReplicate(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r,
                   transport::Message& m) {
    PushDone d;
    if (!d.Decode(&r) || !r.done()) return Drop(c, "malformed replicated push");
    Chunk* ch = FindChunk(d.chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", d.chunk_id)));
    // Fencing: once this server serves the chunk (its primary was declared dead), a primary
    // that was only paused cannot make it apply anything more; it hears the refusal and
    // acknowledges nothing (the shard map's epoch is in the message for the log).
    if (!ch->is_backup.load()) return Reply(*c, req, ServedHere(d.chunk_id, d.epoch));
    if (d.worker >= view_.num_pushers())
      return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown pusher {}", d.worker)));
    if (d.bytes != m.payload.size())
      return Drop(
          c, fmt::format("replicated push of {} bytes that claims {}", m.payload.size(), d.bytes));
    if (Status st = CheckPushBytes(*ch, d.bytes); !st.ok()) return Reply(*c, req, st);
    if (Status st = d.lr ? CheckLearningRate(*d.lr) : Status::OK(); !st.ok())
      return Reply(*c, req, st);
    auto held = HoldPayload(c, m, "replicated push");
    if (!held) return;
    LandedPush p;
    p.worker = d.worker;
    p.seq = d.seq;
    p.base_version = d.base_version;
    p.lr = d.lr;
    p.buffer = kNoLandingBuffer;
    p.grad.data = held->bytes.data();
    p.hold = std::move(held);
    p.grad.numel = ch->numel;
    p.grad.bytes = d.bytes;
    p.grad.encoding = ch->push_codec;
    p.grad.block = ch->push_block;
    p.reply = ReplyTo{c, req};
    p.reply.replica = true;
    replica_pushes_.fetch_add(1, std::memory_order_relaxed);
    OnOwner(*ch, [this, ch, p = std::move(p)]() mutable { ApplyPush(*ch, std::move(p)); });
  }

  // kReplicateStep: a published step of a chunk this server is the backup of, whose primary
  // forwards steps (ForwardStep). Applied by the chunk's engine as the primary applied it; the
  // answer once it is published here.
  void OnReplicateStep(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r,
                       transport::Message& m) {
    ForwardedStep f;
    if (!f.Decode(&r) || !r.done()) return Drop(c, "malformed replicated step");
    Chunk* ch = FindChunk(f.chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", f.chunk_id)));
    if (!ch->is_backup.load()) return Reply(*c, req, ServedHere(f.chunk_id, f.epoch));
    if (m.payload.size() != ch->numel * sizeof(float))
      return Drop(c, fmt::format("replicated step of {} bytes for chunk {} of {} elements",
                                 m.payload.size(), f.chunk_id, ch->numel));
    for (uint32_t w : f.pushers)
      if (w >= view_.num_pushers())
        return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown pusher {}", w)));
    if (!std::isfinite(f.scale) || f.scale <= 0)
      return Reply(*c, req, Status::InvalidArgument(fmt::format("step factor {}", f.scale)));
    if (Status st = f.lr ? CheckLearningRate(*f.lr) : Status::OK(); !st.ok())
      return Reply(*c, req, st);
    auto held = HoldPayload(c, m, "replicated step");
    if (!held) return;
    replica_steps_.fetch_add(1, std::memory_order_relaxed);
    ReplyTo reply{c, req};
    reply.replica = true;
    OnOwner(*ch, [this, ch, f = std::move(f), held, reply = std::move(reply)]() mutable {
      const auto start = std::chrono::steady_clock::now();
      ChunkEngine::ForwardedStep in;
      in.seq = f.seq;
      in.pushers = std::move(f.pushers);
      in.lr = f.lr;
      in.scale = f.scale;
      in.sum = reinterpret_cast<const float*>(held->bytes.data());
      in.hold = held;
      in.reply = std::move(reply);
      EngineActions a = ch->engine->OnForwardedStep(std::move(in));
      const auto end = std::chrono::steady_clock::now();
      apply_latency_.Observe(end - start);
      if (timeline_)
        timeline_->Span(
            a.published ? "apply+publish" : "apply", "server", start, end, ch->id,
            {{"chunk", "step"}, {static_cast<int64_t>(ch->id), static_cast<int64_t>(f.seq)}});
      Execute(*ch, std::move(a));
    });
  }

  void Finish(Status st) {
    std::lock_guard<std::mutex> lock(done_->mu);
    if (done_->finished) return;
    done_->finished = true;
    done_->result = std::move(st);
    done_->cv.notify_all();
  }

  // Workers may reach the data port a moment before this server processed its own
  // registration reply. Their messages wait in `early_` until it has (the loop thread must not
  // block on it: allocating the landing pool needs that thread, over ucx); false when m was
  // held. At most kMaxEarlyMessages wait; beyond that the connection is closed.
  bool ReadyFor(const std::shared_ptr<Connection>& c, transport::Message& m) {
    if (ready_.load()) return true;
    std::lock_guard<std::mutex> lock(ready_mu_);
    if (ready_.load()) return true;
    if (early_.size() >= kMaxEarlyMessages) {
      // Messages of connections that closed meanwhile are skipped anyway: make room first.
      std::erase_if(early_, [this](const auto& e) {
        if (!e.first->closed()) return false;
        early_bytes_ -= e.second.meta.size() + e.second.payload.size();
        return true;
      });
    }
    uint64_t bytes = m.meta.size() + m.payload.size();
    if (early_.size() >= kMaxEarlyMessages || early_bytes_ + bytes > kMaxEarlyBytes) {
      // Not Drop(): rank_ is not known yet on this thread.
      spdlog::error(
          "server: closing connection from {}: more than {} messages or {} bytes before it was "
          "ready",
          c->peer(), kMaxEarlyMessages, kMaxEarlyBytes);
      c->Close();
      return false;
    }
    early_bytes_ += bytes;
    early_.emplace_back(c, std::move(m));
    return false;
  }

  // Loop thread, once.
  void BecomeReady() {
    std::vector<std::pair<std::shared_ptr<Connection>, transport::Message>> held;
    {
      std::lock_guard<std::mutex> lock(ready_mu_);
      ready_ = true;
      held.swap(early_);
      early_bytes_ = 0;
    }
    // A connection that closed meanwhile was not dropped from the pool (it was not ready):
    // its messages are skipped, so nothing is granted to it.
    for (auto& [c, m] : held) {
      if (!c->closed()) OnMessage(c, m);
      SendAnswers();
    }
  }

  void Drop(const std::shared_ptr<Connection>& c, const std::string& why) {
    spdlog::error("server {}: closing connection from {}: {}", rank_, c->peer(), why);
    c->Close();
  }

  // The checkpoint's state of the chunk `it` describes: null when the checkpoint does not hold
  // its tensor (a tensor new since), an error when it holds it otherwise chunked or optimized.
  Result<const ChunkState*> Saved(const CreateChunkItem& it, const std::string& name) const {
    auto t = restore_->tensors.find(it.tensor);
    if (t == restore_->tensors.end()) return static_cast<const ChunkState*>(nullptr);
    auto c = t->second.find(it.offset);
    if (c == t->second.end() || c->second.numel != it.numel)
      return Status::InvalidArgument(fmt::format(
          "{}: the checkpoint in {} holds tensor '{}' in other chunks (restore with the chunk "
          "size it was saved with)",
          name, restore_->dir, it.tensor));
    if (c->second.optimizer != static_cast<uint8_t>(it.optimizer.kind))
      return Status::InvalidArgument(
          fmt::format("{}: the checkpoint in {} was saved with optimizer {}, not {}", name,
                      restore_->dir, OptimizerName(static_cast<OptimizerKind>(c->second.optimizer)),
                      OptimizerName(it.optimizer.kind)));
    return &c->second;
  }

  // kSaveChunks (docs/fault-tolerance.md): the chunks are written by a thread of their own, which
  // reads each chunk's state on its owner thread, then answers.
  void OnSaveChunks(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r) {
    SaveChunksRequest rq;
    if (!rq.Decode(&r) || !r.done()) return Drop(c, "malformed save-chunks request");
    std::lock_guard<std::mutex> lock(saver_mu_);
    if (saver_closed_) return Reply(*c, req, Status::Aborted("the server is stopping"));
    if (saving_)
      return Reply(*c, req, Status::AlreadyExists("a checkpoint is being written already"));
    if (saver_.joinable()) saver_.join();  // the last one, done
    saving_ = true;
    saver_ = std::thread([this, c, req, rq = std::move(rq)] {
      const std::string& dir = rq.dir;
      uint64_t chunks = 0;
      auto file = SaveChunks(rq, &chunks);
      Bytes body;
      if (file.ok()) {
        Writer w(&body);
        w.PutString(file->name);
        w.Put<uint64_t>(file->bytes);
        w.Put<uint32_t>(file->crc32c);
        w.Put<uint64_t>(chunks);
        spdlog::info("server {}: checkpoint of {} chunks written to {}/{}", rank_, chunks, dir,
                     file->name);
      } else {
        spdlog::error("server {}: checkpoint into {} failed: {}", rank_, dir,
                      file.status().ToString());
      }
      Reply(*c, req, file.status(), body);
      std::lock_guard<std::mutex> l(saver_mu_);
      saving_ = false;
    });
  }

  // Each chunk's state, read on its owner thread once it holds its cut (a checkpoint of the
  // running job: every push of it that a worker had issued, rq.cuts), then the file.
  Result<CheckpointFile> SaveChunks(const SaveChunksRequest& rq, uint64_t* count) {
    std::vector<Chunk*> all;
    {
      std::shared_lock<std::shared_mutex> lock(chunks_mu_);
      // A backup's copy is its primary's: the primary writes it.
      for (auto& [id, ch] : chunks_)
        if (!ch->is_backup.load()) all.push_back(ch.get());
    }
    std::sort(all.begin(), all.end(), [](Chunk* a, Chunk* b) { return a->id < b->id; });
    struct Pending {
      std::mutex mu;
      std::condition_variable cv;
      size_t done = 0;
      Status failed;
      std::vector<ChunkState> states;
    };
    // Owned by the tasks too: one may still run after a timeout returned from here.
    auto cuts = std::make_shared<const std::vector<CheckpointCut>>(rq.cuts);
    std::unordered_map<std::string, size_t> cut_of;
    for (size_t k = 0; k < cuts->size(); ++k) cut_of[(*cuts)[k].tensor] = k;
    const auto deadline =
        std::chrono::steady_clock::now() + (rq.cuts.empty() || rq.wait_ms == 0
                                                ? kSnapshotTimeout
                                                : std::chrono::milliseconds(rq.wait_ms));
    auto p = std::make_shared<Pending>();
    p->states.resize(all.size());
    std::vector<size_t> left(all.size());
    for (size_t i = 0; i < all.size(); ++i) left[i] = i;
    std::vector<std::string> behind;  // of the last round: the chunks short of their cut
    while (!left.empty()) {
      auto waiting = std::make_shared<std::vector<std::string>>();
      {
        std::lock_guard<std::mutex> lock(p->mu);
        p->done = 0;
      }
      auto unmet = std::make_shared<std::vector<size_t>>();
      for (size_t i : left) {
        Chunk* ch = all[i];
        auto it = cut_of.find(ch->tensor);
        const size_t k = it == cut_of.end() ? SIZE_MAX : it->second;
        OnOwner(*ch, [this, p, ch, i, cuts, k, unmet, waiting] {
          std::string why;
          const CheckpointCut* cut = k == SIZE_MAX ? nullptr : &(*cuts)[k];
          Status st = HoldsCut(*ch, cut, &why);
          if (st.ok() && why.empty()) st = Snapshot(*ch, &p->states[i]);
          std::lock_guard<std::mutex> lock(p->mu);
          if (!why.empty()) {
            unmet->push_back(i);
            waiting->push_back(std::move(why));
          }
          if (!st.ok() && p->failed.ok()) p->failed = st;
          p->done++;
          p->cv.notify_all();
        });
      }
      std::unique_lock<std::mutex> lock(p->mu);
      if (!p->cv.wait_until(lock, deadline, [&] { return p->done == left.size(); }))
        return Status::Timeout("the chunks' owners did not answer in time");
      SHARDPS_RETURN_IF_ERROR(p->failed);
      left = *unmet;
      behind = *waiting;
      lock.unlock();
      if (left.empty()) break;
      if (std::chrono::steady_clock::now() >= deadline)
        return Status::Timeout(fmt::format(
            "{} chunk(s) did not receive the pushes issued before the checkpoint in time: {}",
            left.size(),
            fmt::join(behind.begin(), behind.begin() + std::min<size_t>(3, behind.size()), "; ")));
      {
        // A server being destroyed stops waiting for the cut (it joins this thread).
        std::lock_guard<std::mutex> closing(saver_mu_);
        if (saver_closed_) return Status::Aborted("the server is stopping");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    *count = all.size();
    return WriteServerFile(rq.dir, rq.name, p->states);
  }

  // Owner thread: whether `ch` holds exactly the pushes of `cut` (none: it is taken as it is)
  // with no update in flight (OK, `why` empty); `why` says what it waits for otherwise. Aborted
  // when it holds more: the workers' held pushes were let go (the checkpoint was given up), so
  // it can no longer be taken at the cut.
  Status HoldsCut(const Chunk& ch, const CheckpointCut* cut, std::string* why) const {
    if (cut == nullptr) return Status::OK();
    const ChunkEngine& e = *ch.engine;
    const Mode mode = view_.mode;
    auto past = [&](const std::string& what) {
      return Status::Aborted(fmt::format(
          "tensor '{}' chunk {} {}: the workers' pushes were let go before it was written (the "
          "checkpoint was given up)",
          ch.tensor, ch.id, what));
    };
    if (mode == Mode::kSync) {
      const uint64_t want = cut->Bound(mode, 0);
      if (e.version() > want) return past(fmt::format("went past the cut's step {}", want));
      if (e.version() < want || !e.Quiet()) {
        *why = fmt::format("tensor '{}' chunk {} is at version {}, the cut at {}", ch.tensor, ch.id,
                           e.version(), want);
      }
      return Status::OK();
    }
    const auto& last = e.last_seqs();
    for (uint32_t w = 0; w < cut->issued.size() && w < last.size(); ++w) {
      if (e.removed(w) || cut->issued[w] == CheckpointCut::kNotHeld) continue;
      const uint64_t want = cut->Bound(mode, w);
      if (last[w] > want)
        return past(fmt::format("holds worker {}'s push {}, past the cut at {}", w, last[w], want));
      if (last[w] < want) {
        *why = fmt::format("tensor '{}' chunk {} has worker {}'s pushes up to {}, the cut at {}",
                           ch.tensor, ch.id, w, last[w], want);
        return Status::OK();
      }
    }
    if (e.busy())
      *why = fmt::format("tensor '{}' chunk {} has an update in flight", ch.tensor, ch.id);
    return Status::OK();
  }

  // Owner thread: what a checkpoint keeps of `ch`.
  Status Snapshot(Chunk& ch, ChunkState* out) {
    ChunkEngine& e = *ch.engine;
    if (e.busy())
      return Status::Unavailable(fmt::format(
          "tensor '{}' chunk {} has an update in flight: a checkpoint is taken between steps, "
          "with no push in flight",
          ch.tensor, ch.id));
    out->tensor = ch.tensor;
    out->chunk_id = ch.id;
    out->offset = ch.offset;
    out->numel = ch.numel;
    out->version = e.version();
    out->optimizer = static_cast<uint8_t>(ch.optimizer);
    out->last_seq = e.last_seqs();
    RuleState rs;
    SHARDPS_RETURN_IF_ERROR(e.rule().SaveState(&rs));
    out->steps = rs.steps;
    out->m = std::move(rs.m);
    out->v = std::move(rs.v);
    if (e.rule().owns_parameters()) {
      out->params = std::move(rs.params);
    } else if (!ch.master.empty()) {
      out->params = ch.master;
    } else {
      const auto* f = reinterpret_cast<const float*>(static_cast<const uint8_t*>(ch.slots->data()) +
                                                     (out->version % 2) * ch.layout.stride);
      out->params.assign(f, f + ch.numel);
    }
    return Status::OK();
  }

  Chunk* FindChunk(uint64_t id) const {
    std::shared_lock<std::shared_mutex> lock(chunks_mu_);
    auto it = chunks_.find(id);
    return it == chunks_.end() ? nullptr : it->second.get();
  }

  void OnMessage(const std::shared_ptr<Connection>& c, transport::Message& m) {
    if (stopping_.load()) return;  // the server is being destroyed
    if (!ReadyFor(c, m)) return;
    Reader r(m.meta.data(), m.meta.size());
    uint64_t req = 0;
    if (!r.Get(&req)) return Drop(c, "message without a request id");
    switch (m.tag) {
      case kCreateChunks:
        return OnCreate(c, req, r, m);
      case kGrant:
        return OnGrant(c, req, r);
      case kPushDone:
        return OnPushDone(c, req, r);
      case kBatch:
        return OnBatch(c, req, r, m);
      case kSaveChunks:
        return OnSaveChunks(c, req, r);
      case kReplicate:
        return OnReplicate(c, req, r, m);
      case kReplicateStep:
        return OnReplicateStep(c, req, r, m);
      case kInstallReplica:
        return OnInstallReplica(c, req, r, m);
      case kReplicaMembership:
        return OnReplicaMembership(c, req, r);
      case kStats: {
        if (!r.done()) return Drop(c, "malformed stats request");
        std::string json = stats().ToJson();
        Bytes body;
        Writer w(&body);
        w.PutString(json);
        return Reply(*c, req, Status::OK(), body);
      }
      default:
        return Drop(c, fmt::format("unexpected message tag {}", m.tag));
    }
  }

  // Creates chunks from the initial values in the payload (worker 0), or, with an empty
  // payload, attaches to them (other workers): an attach for chunks that do not exist yet is
  // answered once they do. Only one copy of the initial values ever reaches the server.
  void OnCreate(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r,
                transport::Message& m) {
    CreateChunksRequest rq;
    if (!rq.Decode(&r) || !r.done()) return Drop(c, "malformed create request");
    std::vector<CreateChunkItem>& items = rq.items;
    uint64_t total = 0;
    for (const auto& it : items) {
      if (Status v = CheckItem(it); !v.ok()) return Reply(*c, req, v);
      total += it.numel * 4;
    }
    bool attach = m.payload.size() == 0;
    if (!attach && total != m.payload.size())
      return Drop(c, "create request whose payload does not match its chunks");
    if (!attach) {
      const uint8_t* init = m.payload.data();
      for (auto& it : items) {
        if (!FindChunk(it.chunk_id)) {
          auto made = MakeChunk(it, reinterpret_cast<const float*>(init));
          if (!made.ok()) return Reply(*c, req, made.status());
        }
        init += it.numel * 4;
      }
    }
    if (rq.worker >= static_cast<int64_t>(view_.num_workers))
      return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown worker {}", rq.worker)));
    if (rq.worker >= 0) NoteWorkerConnection(c, static_cast<uint32_t>(rq.worker));
    if (!rq.rejoin_from.empty()) return OnJoinAt(c, req, rq, attach);
    attaches_.push_back(Attach{c, req, std::move(items), rq.worker});
    AnswerAttaches();
  }

  // A rejoined worker's second attach: its pushes to each chunk start at the step of its tensor
  // (ChunkEngine::JoinAt, each chunk's backup told first); answered, with where each starts,
  // once every chunk's engine took it.
  void OnJoinAt(const std::shared_ptr<Connection>& c, uint64_t req, CreateChunksRequest& rq,
                bool attach) {
    if (!attach || rq.worker < 0 || rq.rejoin_from.size() != rq.items.size())
      return Reply(*c, req,
                   Status::InvalidArgument("a rejoined worker's start names one step per chunk"));
    const auto w = static_cast<uint32_t>(rq.worker);
    std::vector<Chunk*> chunks;
    for (const auto& it : rq.items) {
      Chunk* ch = FindChunk(it.chunk_id);
      if (!ch || ch->is_backup.load())
        return Reply(*c, req,
                     Status::NotFound(fmt::format("server {} is not the primary of chunk {}", rank_,
                                                  it.chunk_id)));
      chunks.push_back(ch);
    }
    struct Pending {
      std::mutex mu;
      CreateChunksReply reply;
      size_t left = 0;
    };
    auto p = std::make_shared<Pending>();
    p->left = chunks.size();
    p->reply.chunks.resize(chunks.size());
    for (size_t k = 0; k < chunks.size(); ++k) {
      Chunk* ch = chunks[k];
      ChunkSlots& slots = p->reply.chunks[k];
      slots.key = ch->slots->remote_key();
      slots.slot_stride = ch->layout.stride;
      std::weak_ptr<Connection> weak = c;
      ChangeChunkMembership(*ch, w, MembershipChange::kJoinAt, rq.rejoin_from[k],
                            [this, p, k, ch, weak, req](uint64_t next) {
                              std::unique_lock<std::mutex> lock(p->mu);
                              p->reply.chunks[k].next_seq = next;
                              p->reply.chunks[k].version = ch->engine->version();
                              if (--p->left != 0) return;
                              lock.unlock();
                              data_ctx_->RunInLoop([p, weak, req] {
                                auto conn = weak.lock();
                                if (!conn) return;
                                Bytes body;
                                Writer wr(&body);
                                p->reply.Encode(&wr);
                                Reply(*conn, req, Status::OK(), body);
                              });
                            });
    }
  }

  // A chunk's description as a worker or a primary sends it: its size within the job's chunk
  // size, its optimizer's settings, its compression block.
  Status CheckItem(const CreateChunkItem& it) const {
    if (it.numel == 0 || it.numel > view_.chunk_bytes / 4)
      return Status::InvalidArgument(
          fmt::format("chunk {} of '{}' has {} elements; the bound is {}", it.chunk_id, it.tensor,
                      it.numel, view_.chunk_bytes / 4));
    Status v = it.optimizer.Validate();
    if (v.ok() && (it.push_block == 0 || it.push_block > (1u << 20)))
      v = Status::InvalidArgument(
          fmt::format("compression block {} outside [1, 1048576]", it.push_block));
    return v.WithContext("tensor '" + it.tensor + "'");
  }

  // Loop thread: answers every create/attach whose chunks all exist.
  void AnswerAttaches() {
    for (auto it = attaches_.begin(); it != attaches_.end();) {
      if (it->conn->closed()) {
        it = attaches_.erase(it);
        continue;
      }
      CreateChunksReply reply;
      Status st;
      bool ready = true;
      for (auto& item : it->items) {
        Chunk* ch = FindChunk(item.chunk_id);
        if (!ch) {
          ready = false;
          break;
        }
        if (ch->numel != item.numel || ch->tensor != item.tensor || ch->offset != item.offset) {
          st = Status::InvalidArgument(fmt::format("chunk {} exists as {} elements of '{}'",
                                                   item.chunk_id, ch->numel, ch->tensor));
          break;
        }
        if (ch->push_codec != item.push_codec || ch->push_block != item.push_block ||
            ch->pull_codec != item.pull_codec) {
          st = Status::InvalidArgument(fmt::format(
              "tensor '{}' exists with push codec {} (block {}) and pull codec {}", ch->tensor,
              CodecName(ch->push_codec), ch->push_block, CodecName(ch->pull_codec)));
          break;
        }
        ChunkSlots& slots = reply.chunks.emplace_back();
        slots.key = ch->slots->remote_key();
        slots.slot_stride = ch->layout.stride;
        slots.version = ch->engine->version();
        if (it->worker >= 0) {
          std::lock_guard<std::mutex> lock(ch->rejoin_mu);
          auto n = ch->rejoin_next.find(view_.PusherOf(static_cast<uint32_t>(it->worker)));
          if (n != ch->rejoin_next.end()) slots.next_seq = n->second;
        }
      }
      Bytes body;
      Writer w(&body);
      reply.Encode(&w);
      if (!ready) {
        ++it;
        continue;
      }
      Reply(*it->conn, it->request, st, st.ok() ? body : Bytes{});
      it = attaches_.erase(it);
    }
  }

  // `copy`: a new backup's chunk, as its primary sent it (its state and sequence tables).
  // `removed`: the pushers a new backup's primary had removed (else the workers the coordinator
  // removed).
  Result<Chunk*> MakeChunk(const CreateChunkItem& it, const float* init,
                           const ChunkState* copy = nullptr,
                           const std::vector<uint32_t>* removed = nullptr) {
    auto ch = std::make_unique<Chunk>();
    ch->create = it;
    ch->id = it.chunk_id;
    ch->tensor = it.tensor;
    ch->offset = it.offset;
    ch->numel = it.numel;
    ch->push_codec = it.push_codec;
    ch->push_block = it.push_block;
    ch->pull_codec = it.pull_codec;
    ch->layout = LayoutFor(it.numel, it.pull_codec);
    ch->inline_apply = it.numel * 4 <= kInlineApplyBytes;
    const std::string name = fmt::format("tensor '{}' chunk {} (elements {}..{})", it.tensor,
                                         it.chunk_id, it.offset, it.offset + it.numel);
    // On a device: the largest push it takes (topk: at most every element), and whether the
    // chunk fits in the device's free memory, said before anything is allocated.
    uint64_t max_push = compress::EncodedBytes({it.push_codec, it.push_block, 0}, it.numel);
    if (it.push_codec == Codec::kTopK)
      max_push = std::min<uint64_t>(pool_.buffer_bytes(), compress::TopKBytes(it.numel));
    if (device_) {
      const uint64_t need = DeviceRuleBytes(it.optimizer, it.numel, max_push);
      auto free_bytes = device_->FreeBytes();
      if (!free_bytes.ok()) return free_bytes.status().WithContext(name);
      if (need > *free_bytes)
        return Status::ResourceExhausted(fmt::format(
            "{} needs {} bytes of memory on {}, which has {} free: use more servers or smaller "
            "chunks",
            name, need, device_->name(), *free_bytes));
    }
    // --restore: the chunk's saved state, when the checkpoint holds its tensor.
    const ChunkState* saved = copy;
    if (restore_ && !copy) {
      SHARDPS_ASSIGN_OR_RETURN(saved, Saved(it, name));
    }
    if (saved) init = saved->params.data();
    const uint64_t version = saved ? saved->version : 0;
    ch->optimizer = it.optimizer.kind;
    auto region = data_ctx_->AllocateRegion(ch->layout.stride * 2);
    if (!region.ok()) return region.status().WithContext("allocating chunk " + it.tensor);
    ch->slots = std::move(region).value();
    // The first version (0, or the restored one) in its slot.
    auto* slot = static_cast<uint8_t*>(ch->slots->data()) + (version % 2) * ch->layout.stride;
    if (it.pull_codec == Codec::kNone) {
      std::memcpy(slot, init, ch->layout.data_bytes);
    } else if (device_) {
      // The device keeps the fp32 parameters; the slots hold them encoded.
      compress::EncodeParams(it.pull_codec, init, 0, it.numel, slot);
    } else {
      ch->master.assign(init, init + it.numel);
      compress::EncodeParams(it.pull_codec, ch->master.data(), 0, it.numel, slot);
    }
    std::unique_ptr<UpdateRule> rule;
    if (device_) {
      auto r = MakeDeviceUpdateRule(device_, static_cast<int>(it.chunk_id % kDeviceStreams),
                                    it.optimizer, it.numel, init, max_push, ch->slots->data(),
                                    ch->slots->size(), name);
      if (!r.ok()) return r.status();
      rule = std::move(r).value();
    } else {
      rule = MakeCpuUpdateRule(it.optimizer, it.numel, &applier_, kRangeElements, name);
    }
    if (saved) {
      RuleState rs;
      rs.steps = saved->steps;
      rs.m = saved->m;
      rs.v = saved->v;
      SHARDPS_RETURN_IF_ERROR(rule->LoadState(rs).WithContext(
          copy ? std::string("installing the primary's copy") : "restoring from " + restore_->dir));
    }
    EngineConfig ec;
    ec.mode = view_.mode;
    ec.num_workers = view_.num_pushers();
    ec.mean_over = view_.worker_nodes.empty() ? 0 : view_.num_workers;
    ec.aggregate = view_.aggregate;
    ec.max_steps_ahead = kSyncStepsAhead;
    ec.staleness = view_.staleness;
    ec.quorum = view_.sync_quorum;
    ec.weights = view_.worker_weights;
    ec.weight_rule = view_.weight_rule;
    ec.counters = counters_.get();
    ec.initial_version = version;
    ec.on_take = [this, raw = ch.get()](LandedPush& p) { ForwardTaken(*raw, p); };
    // Steps rather than pushes go to the backup when that moves fewer bytes: two pushers or more
    // whose pushes together outweigh one sum of floats. Not on a device (its sums live there).
    ec.forward_steps = view_.replicas > 0 && view_.mode == Mode::kSync && !device_ &&
                       view_.num_pushers() >= 2 &&
                       view_.num_pushers() * max_push >= it.numel * sizeof(float);
    ch->forward_steps = ec.forward_steps;
    if (ec.forward_steps) ec.spare_sum = [sums = ch->spare_sums] { return sums->Pop(); };
    if (copy) ec.initial_last_seq = copy->last_seq;  // a checkpoint's workers start afresh
    if (copy) ec.initial_join_from = copy->join_from;
    // Its place in the shard map: a backup here takes the primary's forwarded pushes; a primary
    // here forwards to a backup that is alive. Decided and published under failover_mu_, so a
    // server declared dead meanwhile (OnServerDown) finds the chunk in its role.
    std::unique_lock<std::mutex> roles(failover_mu_);
    {
      const bool primary_dead = it.primary < dead_.size() && dead_[it.primary];
      ch->is_backup = it.backup == rank_ && it.primary != rank_ && !primary_dead;
      ch->primary = ch->is_backup ? it.primary : rank_;
      ch->backup = it.primary == rank_ && it.backup < dead_.size() && !dead_[it.backup] ? it.backup
                                                                                        : kNoServer;
    }
    Chunk* raw = ch.get();
    ch->engine = std::make_unique<ChunkEngine>(
        ec, std::move(rule),
        SlotMemory{static_cast<uint8_t*>(ch->slots->data()), ch->layout, ch->pull_codec,
                   ch->master.empty() ? nullptr : ch->master.data()},
        [this, raw](std::function<void()> fn) { OnOwner(*raw, std::move(fn)); },
        [this, raw](EngineActions a) { Execute(*raw, std::move(a)); });
    if (removed) {
      for (uint32_t p : *removed) (void)ch->engine->RemoveWorker(p);
    } else {
      for (uint32_t w : removed_workers_) (void)ch->engine->RemoveWorker(view_.PusherOf(w));
    }
    versions_++;  // version 0
    {
      std::unique_lock<std::shared_mutex> lock(chunks_mu_);
      chunks_.emplace(it.chunk_id, std::move(ch));
    }
    // An order to make it a new backup that came before it (OnRebuildBackups, which begins it
    // or reports why not).
    BackupOrders o;
    auto awaited = awaited_rebuilds_.find(it.chunk_id);
    if (awaited != awaited_rebuilds_.end()) {
      o.items.push_back({it.chunk_id, awaited->second.backup});
      awaited_rebuilds_.erase(awaited);
    }
    roles.unlock();
    if (!o.items.empty()) OnRebuildBackups(o);
    return raw;
  }

  // Runs fn on the thread that owns `ch`: the data loop for small chunks, else its apply
  // thread. The transport keeps polling until the apply thread hands back its answer.
  void OnOwner(Chunk& ch, std::function<void()> fn) {
    if (stopping_.load()) return;  // the server is being destroyed
    if (ch.inline_apply) {
      // On the loop thread, the event being handled sends the batch answers it completed.
      if (data_ctx_->InLoopThread()) return fn();
      data_ctx_->RunInLoop([this, fn = std::move(fn)] {
        fn();
        SendAnswers();
      });
      return;
    }
    applier_.Post(ch.id, [fn = std::move(fn), hold = data_ctx_->HoldPolling()] { fn(); });
  }

  void OnGrant(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r) {
    GrantRequest g;
    if (!g.Decode(&r) || !r.done()) return Drop(c, "malformed grant request");
    Chunk* ch = FindChunk(g.chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", g.chunk_id)));
    if (Status st = CheckPushBytes(*ch, g.bytes); !st.ok()) return Reply(*c, req, st);
    if (g.worker >= view_.num_workers)
      return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown worker {}", g.worker)));
    NoteWorkerConnection(c, g.worker);
    grant_requests_++;
    auto admitted =
        ch->engine->Admit(ParkedGrant{c, c.get(), req, view_.PusherOf(g.worker), g.seq});
    if (!admitted.ok())
      return Reply(*c, req, admitted.status().WithContext(fmt::format("chunk {}", g.chunk_id)));
    if (!*admitted) {
      grants_parked_++;  // granted once the chunk caught up (EngineActions::admit)
      return;
    }
    RequestBuffer(c, req, g.chunk_id, g.seq);
  }

  // The bytes a push to `ch` may have: its codec's length for the chunk (topk: its count of
  // elements, at most the chunk's), within a landing buffer.
  Status CheckPushBytes(const Chunk& ch, uint64_t bytes) const {
    uint64_t want = compress::EncodedBytes({ch.push_codec, ch.push_block, 0}, ch.numel);
    bool ok = bytes == want;
    if (ch.push_codec == Codec::kTopK)
      ok = bytes >= 4 && (bytes - 4) % 8 == 0 && (bytes - 4) / 8 <= ch.numel;
    if (ok && bytes <= pool_.buffer_bytes()) return Status::OK();
    return Status::InvalidArgument(
        fmt::format("push of {} bytes into chunk {} of tensor '{}' ({} elements, {}{})", bytes,
                    ch.id, ch.tensor, ch.numel, CodecName(ch.push_codec),
                    ch.push_codec == Codec::kTopK ? "" : fmt::format(": {} bytes", want)));
  }

  void RequestBuffer(const std::shared_ptr<Connection>& c, uint64_t req, uint64_t chunk_id,
                     uint64_t seq) {
    std::weak_ptr<Connection> weak = c;
    bool waited = pool_.Request(c.get(), chunk_id, seq, [this, weak, req](uint32_t buffer) {
      auto conn = weak.lock();
      if (!conn) return;
      Bytes body;
      Writer w(&body);
      EncodeGrant(&w, buffer);
      Reply(*conn, req, Status::OK(), body);
    });
    if (waited) grants_waited_++;
  }

  void EncodeGrant(Writer* w, uint32_t buffer) const {
    LandingGrant::Encode(w, buffer, static_cast<uint64_t>(buffer) * pool_.buffer_bytes(),
                         pool_.key());
  }

  void OnPushDone(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r) {
    PushDone d;
    if (!d.Decode(&r) || !r.done()) return Drop(c, "malformed push notification");
    Chunk* ch = FindChunk(d.chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", d.chunk_id)));
    if (d.worker >= view_.num_workers)
      return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown worker {}", d.worker)));
    NoteWorkerConnection(c, d.worker);
    if (!pool_.Claim(d.buffer, c.get(), d.chunk_id, d.seq))
      return Drop(c, fmt::format("push of step {} of chunk {} names landing buffer {} that it "
                                 "does not hold for it",
                                 d.seq, d.chunk_id, d.buffer));
    if (Status st = CheckPushBytes(*ch, d.bytes); !st.ok()) {
      pool_.Release(d.buffer);
      return Reply(*c, req, st);
    }
    if (Status st = d.lr ? CheckLearningRate(*d.lr) : Status::OK(); !st.ok()) {
      pool_.Release(d.buffer);
      return Reply(*c, req,
                   st.WithContext(fmt::format("push of step {} of chunk {}", d.seq, d.chunk_id)));
    }
    LandedPush p;
    p.worker = view_.PusherOf(d.worker);
    p.seq = d.seq;
    p.base_version = d.base_version;
    p.lr = d.lr;
    p.buffer = d.buffer;
    p.grad.data = pool_.data(d.buffer);
    p.grad.numel = ch->numel;
    p.grad.bytes = d.bytes;
    p.grad.encoding = ch->push_codec;
    p.grad.block = ch->push_block;
    p.reply = ReplyTo{c, req};
    push_bytes_.fetch_add(d.bytes, std::memory_order_relaxed);
    Forward(*ch, p);
    OnOwner(*ch, [this, ch, p = std::move(p)]() mutable { ApplyPush(*ch, std::move(p)); });
  }

  // The chunk's owner thread: hands a push to the engine and carries out what it decided.
  void ApplyPush(Chunk& ch, LandedPush p) {
    const auto start = std::chrono::steady_clock::now();
    const uint32_t worker = p.worker;
    const uint64_t seq = p.seq;
    EngineActions a = ch.engine->OnPush(std::move(p));
    const auto end = std::chrono::steady_clock::now();
    apply_latency_.Observe(end - start);
    if (timeline_)
      timeline_->Span(a.published ? "apply+publish" : "apply", "server", start, end, ch.id,
                      {{"chunk", "worker", "step"},
                       {static_cast<int64_t>(ch.id), worker, static_cast<int64_t>(seq)}});
    Execute(ch, std::move(a));
  }

  // What a batch's pushes are kept in while a push of it is parked: the request's payload,
  // charged to the server's inbound budget until the last push that travelled in it is gone.
  struct BatchBytes {
    transport::Buffer bytes;
    std::shared_ptr<transport::InboundBudget> budget;  // outlives `charge`, which returns to it
    transport::InboundCharge charge;
    explicit BatchBytes(std::shared_ptr<transport::InboundBudget> b)
        : budget(std::move(b)), charge(budget.get(), UINT64_MAX) {}
  };

  // A replicated message's payload, kept (and charged to the inbound budget) until its chunk's
  // engine is done with it; null when the budget would be passed: the connection is closed.
  std::shared_ptr<BatchBytes> HoldPayload(const std::shared_ptr<Connection>& c,
                                          transport::Message& m, const char* what) {
    auto held = std::make_shared<BatchBytes>(inbound_);
    if (!held->charge.TryCharge(m.payload.size())) {
      Drop(c, fmt::format("a {} of {} bytes would pass the server's inbound budget of {} bytes",
                          what, m.payload.size(), inbound_->limit()));
      return nullptr;
    }
    held->bytes = std::move(m.payload);
    return held;
  }

  // Loop thread. The operations of a batch, in entry order; every chunk it may name (at most
  // kMaxBatchedChunkBytes) is owned by this thread, so each push is applied here and now.
  void OnBatch(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r,
               transport::Message& m) {
    BatchRequest b;
    if (!b.Decode(&r) || !r.done()) return Drop(c, "malformed batch");
    const size_t n = b.entries.size();
    uint64_t pushed = 0;
    for (const auto& e : b.entries) {
      if (!e.push) continue;
      if (e.bytes > pool_.buffer_bytes() || BatchPadded(e.bytes) > m.payload.size() - pushed)
        return Drop(c, fmt::format("batch of {} entries whose pushes claim more than the {} "
                                   "bytes it carries",
                                   n, m.payload.size()));
      pushed += BatchPadded(e.bytes);
    }
    if (pushed != m.payload.size())
      return Drop(c, fmt::format("batch of {} entries whose pushes claim {} of the {} bytes it "
                                 "carries",
                                 n, pushed, m.payload.size()));
    auto answer = std::make_shared<BatchInFlight>();
    answer->conn = c;
    answer->part.batch = req;
    answer->pulls.assign(n, 0);
    std::vector<Chunk*> chunks(n);
    uint64_t pull_bytes = 0;
    for (size_t i = 0; i < n; ++i) {
      chunks[i] = FindChunk(b.entries[i].chunk_id);
      if (chunks[i] && chunks[i]->inline_apply && b.entries[i].pull) {
        answer->pulls[i] = 1;
        pull_bytes += chunks[i]->layout.data_bytes;
      }
    }
    // Well formed but wrong as a whole: every entry is refused with the reason.
    Status whole;
    if (b.worker >= view_.num_workers)
      whole = Status::InvalidArgument(fmt::format("unknown worker {}", b.worker));
    else if (pull_bytes > kMaxBatchPullBytes)
      whole = Status::InvalidArgument(
          fmt::format("batch pulls {} bytes; the bound is {}", pull_bytes, kMaxBatchPullBytes));
    if (!whole.ok()) {
      for (size_t i = 0; i < n; ++i) Answer(answer, i, whole, 0, false, nullptr);
      return;
    }
    NoteWorkerConnection(c, b.worker);
    std::shared_ptr<BatchBytes> held;
    if (pushed > 0) {
      held = std::make_shared<BatchBytes>(inbound_);
      if (!held->charge.TryCharge(pushed))
        return Drop(c, fmt::format("a batch of {} pushed bytes would pass the server's inbound "
                                   "budget of {} bytes",
                                   pushed, inbound_->limit()));
      held->bytes = std::move(m.payload);
    }
    const uint8_t* at = held ? held->bytes.data() : nullptr;
    for (size_t i = 0; i < n; ++i) {
      const BatchEntry& e = b.entries[i];
      const uint8_t* grad = at;
      if (e.push) at += BatchPadded(e.bytes);
      Chunk* ch = chunks[i];
      Status st;
      if (!ch) {
        st = Status::NotFound(fmt::format("unknown chunk {}", e.chunk_id));
      } else if (!ch->inline_apply) {
        st = Status::InvalidArgument(
            fmt::format("chunk {} of tensor '{}' has {} bytes: too large for a batch (at most {})",
                        ch->id, ch->tensor, ch->numel * 4, kMaxBatchedChunkBytes));
      } else if (e.push) {
        st = CheckPushBytes(*ch, e.bytes);
        if (st.ok() && e.lr) st = CheckLearningRate(*e.lr);
        if (!st.ok())
          st = st.WithContext(fmt::format("push of step {} of chunk {}", e.seq, e.chunk_id));
      }
      if (!st.ok()) {
        Answer(answer, i, st, 0, false, nullptr);
        continue;
      }
      if (!e.push) {
        Answer(answer, i, Status::OK(), ch->engine->version(), false, ch);
        continue;
      }
      LandedPush p;
      p.worker = view_.PusherOf(b.worker);
      p.seq = e.seq;
      p.base_version = e.base_version;
      p.lr = e.lr;
      p.buffer = kNoLandingBuffer;
      p.hold = held;
      p.grad.data = grad;
      p.grad.numel = ch->numel;
      p.grad.bytes = e.bytes;
      p.grad.encoding = ch->push_codec;
      p.grad.block = ch->push_block;
      p.reply = ReplyTo{c, req, answer, static_cast<uint32_t>(i)};
      push_bytes_.fetch_add(e.bytes, std::memory_order_relaxed);
      batched_pushes_.fetch_add(1, std::memory_order_relaxed);
      Forward(*ch, p);
      ApplyPush(*ch, std::move(p));
    }
    batches_.fetch_add(1, std::memory_order_relaxed);
  }

  // Loop thread: entry i of batch `b` came to this; with `pulled`, its newest published version
  // goes back with it (the loop thread publishes it, so the copy is never torn). Sent by
  // SendAnswers, once the event that completed it was handled.
  void Answer(const std::shared_ptr<BatchInFlight>& b, size_t i, Status st, uint64_t version,
              bool late, const Chunk* pulled) {
    BatchResult& x = b->part.results.emplace_back();
    x.entry = static_cast<uint32_t>(i);
    x.status = std::move(st);
    x.version = version;
    x.late = late;
    if (pulled && x.status.ok()) {
      const uint64_t v = pulled->engine->version();
      const auto* slot =
          static_cast<const uint8_t*>(pulled->slots->data()) + (v % 2) * pulled->layout.stride;
      b->payload.insert(b->payload.end(), slot, slot + pulled->layout.data_bytes);
      x.pulled_version = v;
      x.pulled_bytes = pulled->layout.data_bytes;
      batched_pulls_.fetch_add(1, std::memory_order_relaxed);
    }
    if (!b->queued) {
      b->queued = true;
      answers_.push_back(b);
    }
  }

  // Loop thread, after each event: one kBatchAnswer per batch with entries answered since.
  void SendAnswers() {
    for (auto& b : answers_) {
      Bytes meta;
      Writer w(&meta);
      b->part.Encode(&w);
      b->conn->Send(kBatchAnswer, std::move(meta), transport::Payload::Own(std::move(b->payload)),
                    nullptr);
      b->part.results.clear();
      b->payload = Bytes();
      b->queued = false;
    }
    answers_.clear();
  }

  // Carries out what the engine decided: buffers back to the pool first (an admitted grant or
  // a grant ahead may take them), then admitted grants, then acknowledgements.
  void Execute(Chunk& ch, EngineActions a) {
    pool_.AddParked(a.parked_buffers_delta);
    for (uint32_t b : a.release)
      if (b != kNoLandingBuffer) pool_.Release(b);
    for (auto& g : a.admit) {
      auto conn = g.conn.lock();
      if (conn && !conn->closed()) RequestBuffer(conn, g.request, ch.id, g.seq);
    }
    // Steps first: an acknowledgement given outside a step waits for the last one forwarded.
    for (auto& st : a.steps) ForwardStep(ch, std::move(st));
    for (auto& ack : a.acks) {
      if (ch.forward_steps) AfterLastStep(ch, ack);
      AckNow(ch, ack);
    }
    pushes_applied_ += a.applied;
    duplicates_ += a.duplicates;
    late_ += a.late;
    versions_ += a.published;
    step_sums_allocated_ += a.sums_allocated;
    if (ch.rebuild && !ch.rebuild_copied) TakeBackupCopy(ch);  // the chunk may be quiet now
  }

  // The acknowledgement carries a landing buffer granted ahead for the worker's next push
  // when the pool can spare one. An entry of a batch is answered in the batch's answer instead,
  // with the chunk's parameters when it pulls too.
  void AckNow(const Chunk& ch, const EngineActions::Ack& a) {
    if (a.to.join) {
      // The backup's answer too (ReplicaJoin), or sent when it comes.
      if (auto both = a.to.join->Local(a)) AckNow(ch, *both);
      return;
    }
    if (a.to.batch)
      return Answer(a.to.batch, a.to.entry, a.status, a.version, a.late,
                    a.to.batch->pulls[a.to.entry] ? &ch : nullptr);
    if (!a.to.conn) return;
    if (!a.status.ok()) return Reply(*a.to.conn, a.to.request, a.status);
    PushAck ack;
    ack.epoch = epoch_.load();
    ack.version = a.version;
    ack.late = a.late;
    std::optional<uint32_t> ahead;
    if (!a.to.replica) ahead = pool_.GrantAhead(a.to.conn.get());
    if (ahead) {
      ack.has_ahead = true;
      ack.ahead.buffer = *ahead;
      ack.ahead.offset = static_cast<uint64_t>(*ahead) * pool_.buffer_bytes();
      ack.ahead.key = pool_.key();
      grants_ahead_++;
    }
    Bytes body;
    Writer w(&body);
    ack.Encode(&w);
    Reply(*a.to.conn, a.to.request, Status::OK(), body);
  }

  // A closed connection's parked pushes and grant requests are forgotten on each chunk's
  // owner thread; its granted buffers come back to the pool.
  void OnConnectionClosed(const std::shared_ptr<Connection>& c) {
    pool_.DropOwner(c.get());
    std::vector<Chunk*> all;
    {
      std::shared_lock<std::shared_mutex> lock(chunks_mu_);
      for (auto& [id, ch] : chunks_) all.push_back(ch.get());
    }
    const Connection* owner = c.get();
    for (Chunk* ch : all)
      OnOwner(*ch,
              [this, ch, owner, keep = c] { Execute(*ch, ch->engine->OnConnectionClosed(owner)); });
  }

  ServerOptions opt_;
  std::shared_ptr<transport::InboundBudget> inbound_;  // shared by both contexts
  std::unique_ptr<transport::Context> data_ctx_;
  std::unique_ptr<transport::Context> control_ctx_;
  std::unique_ptr<transport::Listener> listener_;
  std::unique_ptr<NodeClient> node_;
  std::shared_ptr<Done> done_ = std::make_shared<Done>();
  ClusterView view_;
  uint32_t rank_ = 0;
  // --restore: the checkpoint read at start-up, whose chunks are created from it.
  std::optional<Checkpoint> restore_;
  // The thread writing a checkpoint of the chunks (kSaveChunks); one at a time.
  std::mutex saver_mu_;
  bool saving_ = false;        // guarded by saver_mu_
  bool saver_closed_ = false;  // guarded by saver_mu_: the server is being destroyed
  std::thread saver_;          // guarded by saver_mu_
  // Where chunks live (--device): null for cpu; shared with the device rules of the chunks.
  std::shared_ptr<gpu::Device> device_;
  LandingPool pool_;
  void* pinned_pool_ = nullptr;  // the pool's memory, pinned for the device's copies
  Applier applier_;

  std::mutex ready_mu_;
  std::atomic<bool> ready_{false};  // set on the loop thread
  std::atomic<bool> stopping_{false};
  std::vector<std::pair<std::shared_ptr<Connection>, transport::Message>> early_;  // ready_mu_
  uint64_t early_bytes_ = 0;                                                       // ready_mu_

  struct Attach {
    std::shared_ptr<Connection> conn;
    uint64_t request = 0;
    std::vector<CreateChunkItem> items;
    int32_t worker = -1;
  };
  // Per worker: the connections that carried its data-plane messages (NoteWorkerConnection).
  std::map<uint32_t, std::vector<std::weak_ptr<Connection>>> worker_conns_;  // loop thread only
  std::vector<Attach> attaches_;                                             // loop thread only
  std::vector<std::shared_ptr<BatchInFlight>> answers_;  // loop thread only: to send

  mutable std::shared_mutex chunks_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<Chunk>> chunks_;

  std::atomic<uint64_t> pushes_applied_{0};
  std::atomic<uint64_t> duplicates_{0};
  std::atomic<uint64_t> late_{0};
  // Per pusher (view_.num_pushers()), set once before the server is ready; 0 until then.
  std::unique_ptr<WorkerCounters[]> counters_;
  std::atomic<uint32_t> num_counters_{0};
  std::atomic<uint64_t> versions_{0};
  std::atomic<uint64_t> step_sums_allocated_{0};  // accumulators made for sync steps
  std::atomic<uint64_t> push_bytes_{0};
  metrics::LatencyHistogram apply_latency_;
  metrics::RoleMetrics metrics_;                 // stopped first: its scrapes read the rest
  std::unique_ptr<metrics::Timeline> timeline_;  // --timeline; set before serving
  std::atomic<uint64_t> grant_requests_{0};
  std::atomic<uint64_t> grants_waited_{0};
  std::atomic<uint64_t> grants_ahead_{0};
  std::atomic<uint64_t> grants_parked_{0};
  std::atomic<uint64_t> batches_{0};         // batch requests served
  std::atomic<uint64_t> batched_pushes_{0};  // pushes that travelled in them
  std::atomic<uint64_t> batched_pulls_{0};   // pulls answered in them

  // Replication (docs/fault-tolerance.md).
  std::mutex failover_mu_;
  std::vector<std::shared_ptr<RpcChannel>> peers_;  // failover_mu_: by server rank, to backups
  std::vector<bool> dead_;                          // failover_mu_: servers declared dead
  std::vector<std::string> peer_addresses_;  // failover_mu_: by rank (servers that joined too)
  bool links_started_ = false;               // failover_mu_: ReplicaLinkLoop opens the links
  std::vector<std::thread> reaching_;  // failover_mu_: ReachJoinedPeer, one per server that joined
  // failover_mu_: servers that joined the running job, to tell the coordinator once reached
  std::map<uint32_t, std::function<void(const ServerReached&)>> joined_reports_;
  // failover_mu_: pushes whose backup's connection failed before it was declared dead
  std::map<uint32_t, std::vector<std::shared_ptr<ReplicaJoin>>> orphans_;
  // Orders to make a new backup of a chunk not created here yet (OnRebuildBackups), until when
  // they wait for it; guarded by failover_mu_.
  struct AwaitedRebuild {
    uint32_t backup = 0;
    std::chrono::steady_clock::time_point until;
  };
  std::map<uint64_t, AwaitedRebuild> awaited_rebuilds_;
  std::set<uint32_t> removed_workers_;  // failover_mu_: removed from the job (kWorkerDown)
  std::vector<bool> link_down_;         // failover_mu_: by rank, a closed link to a live backup
  bool hold_links_ = false;             // failover_mu_: closed links stay closed (tests)
  std::condition_variable link_cv_;
  std::thread link_thread_;  // ReplicaLinkLoop, with replication
  std::atomic<uint64_t> reopened_links_{0};
  std::atomic<uint64_t> epoch_{0};               // the shard map's, as last heard
  std::atomic<uint64_t> replicated_pushes_{0};   // forwarded to a backup
  std::atomic<uint64_t> replicated_copied_{0};   // of them, copied first (Join)
  std::atomic<uint64_t> replicated_steps_{0};    // sync steps forwarded whole (ForwardStep)
  std::atomic<uint64_t> replica_steps_{0};       // sync steps taken as a backup
  std::atomic<uint64_t> replica_pushes_{0};      // taken as a backup
  std::atomic<uint64_t> promoted_chunks_{0};     // served since their primary was declared dead
  std::atomic<uint64_t> backups_rebuilt_{0};     // chunks of which a new backup was made
  std::atomic<uint64_t> replicas_installed_{0};  // chunks this server became a new backup of
};

}  // namespace
}  // namespace server

namespace server {
void CloseReplicationLinksForTest(Server& s, bool reopen) {
  dynamic_cast<ServerImpl&>(s).CloseReplicationLinks(reopen);
}
}  // namespace server

Result<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  SHARDPS_RETURN_IF_ERROR(options.Validate());
  auto s = std::make_unique<server::ServerImpl>(options);
  SHARDPS_RETURN_IF_ERROR(s->Init());
  return std::unique_ptr<Server>(std::move(s));
}

}  // namespace shardps
