#include "shardps/coordinator.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "cluster/messages.h"
#include "cluster/rpc.h"
#include "metrics/metrics.h"
#include "transport/context.h"

namespace shardps {

Status CoordinatorOptions::Validate() const {
  if (num_servers < 1) return Status::InvalidArgument("a job needs at least one server");
  if (num_workers < 1) return Status::InvalidArgument("a job needs at least one worker");
  if (num_servers > 4096 || num_workers > 65536)
    return Status::InvalidArgument("too many servers or workers");
  if (chunk_bytes < 64 || chunk_bytes % 4 != 0 || chunk_bytes > (128ull << 20))
    return Status::InvalidArgument(
        fmt::format("chunk size {} must be a multiple of 4 between 64 B and 128 MiB (a chunk "
                    "travels in one message, within the inbound budget of 256 MiB per connection)",
                    chunk_bytes));
  if (heartbeat_interval.count() <= 0 || heartbeat_timeout <= heartbeat_interval)
    return Status::InvalidArgument("heartbeat timeout must exceed the heartbeat interval");
  if (replicas > 0 && num_servers > 1 && failover_timeout <= heartbeat_interval)
    return Status::InvalidArgument(fmt::format(
        "the failover timeout ({} ms, --failover-timeout-ms) must exceed the heartbeat interval "
        "({} ms): with backups (--replicas 1, the default with 2 servers or more) a server "
        "silent that long is replaced; raise it, or run without backups (--replicas 0)",
        failover_timeout.count(), heartbeat_interval.count()));
  if (checkpoint_interval.count() < 0 || checkpoint_timeout.count() <= 0)
    return Status::InvalidArgument("the checkpoint interval and timeout must be positive");
  if (checkpoint_interval.count() > 0 && checkpoint_dir.empty())
    return Status::InvalidArgument(
        "--checkpoint-interval needs --checkpoint-dir: where the checkpoints go");
  if (mode != Mode::kSsp && staleness != 0)
    return Status::InvalidArgument("a staleness bound is for ssp:K mode only");
  if (sync_quorum != 0 && mode != Mode::kSync)
    return Status::InvalidArgument(fmt::format(
        "a sync quorum is for sync mode only (the mode is {})", ModeString(mode, staleness)));
  if (replicas > 1)
    return Status::InvalidArgument(fmt::format(
        "{} replicas asked for: this version keeps at most one backup of each chunk", replicas));
  if (sync_quorum > num_workers)
    return Status::InvalidArgument(
        fmt::format("sync quorum {} exceeds the {} workers", sync_quorum, num_workers));
  if (!worker_weights.empty() && worker_weights.size() != num_workers)
    return Status::InvalidArgument(fmt::format("{} worker weights for {} workers: give one each",
                                               worker_weights.size(), num_workers));
  for (float w : worker_weights)
    if (!std::isfinite(w) || w < 0 || w > 1000)
      return Status::InvalidArgument(fmt::format("worker weight {} outside [0, 1000]", w));
  auto v = transport::CheckViability(transport);
  if (!v.viable) return Status::InvalidArgument("transport " + transport + ": " + v.reason);
  return Status::OK();
}

namespace {

using namespace cluster;
using Clock = std::chrono::steady_clock;

struct Node {
  uint32_t id = 0;
  Role role = Role::kWorker;
  uint32_t rank = 0;
  uint32_t pid = 0;
  std::string host;
  std::string data_address;
  // Workers: their node (docs/node-reduction.md), rank on it and its number of workers.
  std::string node;
  int32_t local_rank = -1;
  uint32_t local_size = 1;
  std::shared_ptr<transport::Connection> conn;
  uint64_t register_request = 0;
  Clock::time_point last_seen;
  bool goodbye = false;
  bool dead = false;  // a server declared dead and replaced by its chunks' backups
  // A worker rejoining the job (docs/fault-tolerance.md, "A worker that rejoins"): registered,
  // waiting until every live server in `awaiting` (ranks) has its chunks wait for it again;
  // until `rejoin_deadline`.
  bool rejoining = false;
  bool rejoin_told = false;  // the servers were told (kWorkerUp): the rank's old node is removed
  std::set<uint32_t> awaiting;
  Clock::time_point rejoin_deadline;
  uint64_t rejoin_epoch = 0;  // the shard map's epoch when it registered: a death since fails it
  // A server joining the running job (docs/fault-tolerance.md, "A server that joins"): the
  // live nodes (ids) yet to say they reached it, until `join_deadline`; given chunks after.
  bool joining = false;
  std::set<uint32_t> unreached;
  Clock::time_point join_deadline;
  std::string Name() const {
    return fmt::format("{} {} (node {}, pid {})", RoleName(role), rank, id, pid);
  }
};

struct Barrier {
  std::set<uint32_t> arrived;  // worker ranks
  std::vector<std::pair<std::shared_ptr<transport::Connection>, uint64_t>> waiters;
  Clock::time_point deadline;
};

// A checkpoint of the running job being taken (CoordinatorImpl::Checkpoint).
struct CheckpointRun {
  uint64_t id = 0;
  std::string dir;
  Clock::time_point deadline;
  std::set<uint32_t> awaiting;                          // worker ranks yet to say what they issued
  std::map<std::string, std::vector<uint64_t>> issued;  // tensor -> by worker rank
  bool cutting = false;                                 // the cuts went out
  bool done = false;
  Status result;
  std::string about;
};

struct TensorRecord {
  uint64_t numel = 0;
  TensorPlacement placement;
};

class CoordinatorImpl final : public Coordinator {
 public:
  explicit CoordinatorImpl(CoordinatorOptions o) : opt_(std::move(o)) {}
  ~CoordinatorImpl() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (ticker_.joinable()) ticker_.join();
    if (periodic_.joinable()) periodic_.join();
    if (requested_.joinable()) requested_.join();
    metrics_.Stop();
    listener_.reset();
    ctx_.reset();
  }

  Status Init() {
    transport::ContextOptions co;
    SHARDPS_RETURN_IF_ERROR(transport::SecureRole(
        opt_.secret_file, {opt_.tls_cert, opt_.tls_key, opt_.tls_ca}, "coordinator", &co));
    co.name = "coordinator";
    co.max_payload_bytes = 64 << 20;
    auto ctx = transport::CreateContext("tcp", co);
    if (!ctx.ok()) return ctx.status();
    ctx_ = std::move(ctx).value();
    auto l = ctx_->Listen(opt_.listen, [this](const std::shared_ptr<transport::Connection>&) {
      transport::ConnectionHandlers h;
      h.on_message = [this](const std::shared_ptr<transport::Connection>& c, transport::Message m) {
        OnMessage(c, m);
      };
      h.on_close = [this](const std::shared_ptr<transport::Connection>& c, Status st) {
        OnClose(c, st);
      };
      return h;
    });
    if (!l.ok()) return l.status().WithContext("coordinator listen");
    listener_ = std::move(l).value();
    server_bytes_.assign(opt_.num_servers, 0);
    primary_bytes_placed_.assign(opt_.num_servers, 0);
    server_dead_.assign(opt_.num_servers, false);
    started_ = Clock::now();
    ticker_ = std::thread([this] { Tick(); });
    if (opt_.checkpoint_interval.count() > 0) periodic_ = std::thread([this] { Periodic(); });
    auto m = metrics::RoleMetrics::Start(opt_.metrics_listen, "coordinator", -1,
                                         [this](metrics::Families& f) { Collect(f); });
    if (!m.ok()) return m.status();
    metrics_ = std::move(m).value();
    metrics_.MarkReady();
    spdlog::info("coordinator listening on {}: {} servers, {} workers, mode {}, transport {}",
                 listener_->address(), opt_.num_servers, opt_.num_workers,
                 ModeString(opt_.mode, opt_.staleness), opt_.transport);
    return Status::OK();
  }

  std::string address() const override { return listener_->address(); }
  std::string metrics_address() const override { return metrics_.address(); }

  Status Wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return finished_; }))
      return Status::Timeout("the job is still running");
    return result_;
  }

  // A checkpoint of the running job (docs/fault-tolerance.md, "Checkpoints of a running job"):
  // the workers hold their new pushes and say what they issued (kCheckpointGate,
  // kCheckpointCounts); the cuts go out (kCheckpointCuts): each worker pushes up to its bound,
  // worker 0 has the servers write each chunk once it holds its cut, then the manifest
  // (kCheckpointDone); the workers go on (kCheckpointRelease), whatever the outcome.
  Result<std::string> Checkpoint(const std::string& dir,
                                 std::chrono::milliseconds timeout) override {
    if (dir.empty() || dir.front() != '/')
      return Status::InvalidArgument(fmt::format(
          "checkpoint directory '{}' is not an absolute path (the servers and worker 0 write "
          "into it, from working directories of their own)",
          dir));
    if (timeout.count() <= 0 || timeout > std::chrono::hours(24))
      return Status::InvalidArgument("a checkpoint's timeout must be between 1 ms and 24 h");
    std::unique_lock<std::mutex> lock(mu_);
    if (!complete_) return Status::Unavailable("the job has not started: nodes are missing");
    if (finished_) return Status::Unavailable("the job has ended");
    if (grouped_)
      return Status::InvalidArgument(
          "the coordinator does not checkpoint a job with node-level reduction: the workers take "
          "its checkpoints (Worker::Checkpoint, shardps train --checkpoint-every)");
    if (ckpt_) return Status::AlreadyExists("a checkpoint is being taken already");
    if (tensors_.empty())
      return Status::Unavailable("no tensor was declared yet: there is nothing to checkpoint");
    bool lead = false;
    for (const auto& n : nodes_) {
      if (n.role != Role::kWorker || n.dead) continue;
      if (n.rejoining)
        return Status::Unavailable(
            fmt::format("worker {} is rejoining the job: try again once it is in", n.rank));
      if (n.rank == 0 && !n.goodbye) lead = true;
    }
    if (!lead) return Status::Unavailable("worker 0 finished: the job is ending");
    ckpt_.emplace();
    CheckpointRun& run = *ckpt_;
    run.id = ++checkpoints_started_;
    run.dir = dir;
    run.deadline = Clock::now() + timeout;
    for (const auto& n : nodes_)
      if (Gated(n)) run.awaiting.insert(n.rank);
    const uint64_t id = run.id;
    spdlog::info("coordinator: checkpoint {} into {} begins: {} workers hold their new pushes", id,
                 dir, run.awaiting.size());
    Notify(kCheckpointGate, CheckpointGate{id, static_cast<uint32_t>(timeout.count())},
           [](const Node& n) { return Gated(n); });
    auto over = [&] { return run.done || finished_ || stopping_; };
    cv_.wait_until(lock, run.deadline, over);
    // Once the cuts went out, worker 0 writes within the same deadline and its report decides:
    // a checkpoint said to have failed never leaves a manifest. Bounded all the same.
    if (!over() && run.cutting)
      cv_.wait_until(lock, run.deadline + timeout + std::chrono::seconds(30), over);
    Status st = run.result;
    if (!run.done) {
      if (finished_ || stopping_) {
        st = Status::Aborted("the job ended during the checkpoint");
      } else if (!run.awaiting.empty()) {
        st = Status::Timeout(fmt::format("worker(s) {} did not say what they pushed within {} ms",
                                         fmt::join(run.awaiting, ", "), timeout.count()));
      } else {
        st = Status::Timeout(
            fmt::format("the chunks were not written within {} ms (worker 0 and the servers)",
                        timeout.count()));
      }
    }
    std::string about = std::move(run.about);
    ckpt_.reset();
    // The held pushes go, whatever the outcome.
    Notify(kCheckpointRelease, CheckpointGate{id, 0}, [](const Node& n) { return Gated(n); });
    if (!st.ok()) {
      ++checkpoints_failed_;
      st = st.WithContext(fmt::format("checkpoint into {}", dir));
      spdlog::error("coordinator: {}", st.ToString());
      return st;
    }
    ++checkpoints_written_;
    spdlog::info("coordinator: checkpoint {} written: {}", id, about);
    return about;
  }

 private:
  void OnMessage(const std::shared_ptr<transport::Connection>& c, transport::Message& m) {
    Reader r(m.meta.data(), m.meta.size());
    uint64_t req = 0;
    if (!r.Get(&req)) return Drop(c, "message without a request id");
    std::unique_lock<std::mutex> lock(mu_);
    Node* node = FindNode(c);
    if (node && node->dead) return;  // fenced: it was replaced (its connection is closing)
    if (node) node->last_seen = Clock::now();
    switch (m.tag) {
      case kRegister: {
        RegisterRequest rq;
        if (!rq.Decode(&r) || !r.done()) return Drop(c, "malformed register request");
        return HandleRegister(c, req, rq);
      }
      case kHeartbeat: {
        if (!node) return Drop(c, "heartbeat from an unregistered connection");
        heartbeats_++;
        // Echoed, so that nodes notice a coordinator that stopped answering.
        Bytes meta;
        Writer w(&meta);
        w.Put<uint64_t>(0);
        c->Send(kHeartbeat, std::move(meta), {}, nullptr);
        return;
      }
      case kBarrier: {
        BarrierRequest b;
        if (!b.Decode(&r) || !r.done()) return Drop(c, "malformed barrier request");
        if (!node || node->role != Role::kWorker)
          return Reply(*c, req, Status::InvalidArgument("only registered workers take barriers"));
        return HandleBarrier(c, req, *node, b.name, b.timeout_ms);
      }
      case kDeclare: {
        DeclareRequest d;
        if (!d.Decode(&r) || !r.done()) return Drop(c, "malformed declare request");
        if (!node) return Reply(*c, req, Status::InvalidArgument("declare before register"));
        return HandleDeclare(c, req, d.items);
      }
      case kGoodbye: {
        if (!node) return Drop(c, "goodbye from an unregistered connection");
        node->goodbye = true;
        Reply(*c, req, Status::OK());
        spdlog::info("coordinator: {} finished", node->Name());
        return MaybeFinish();
      }
      case kWorkerRestored: {
        WorkerUp u;
        if (!u.Decode(&r) || !r.done() || !node || node->role != Role::kServer)
          return Drop(c, "malformed worker-restored report");
        for (auto& n : nodes_)
          if (n.rejoining && n.rank == u.rank) n.awaiting.erase(node->rank);
        return AdvanceRejoins();
      }
      case kBackupRebuilt: {
        BackupRebuilt b;
        if (!b.Decode(&r) || !r.done() || !node || node->role != Role::kServer)
          return Drop(c, "malformed backup report");
        return OnBackupRebuilt(*node, b);
      }
      case kServerReached: {
        ServerReached sr;
        if (!sr.Decode(&r) || !r.done() || !node) return Drop(c, "malformed server-reached report");
        return OnServerReached(*node, sr);
      }
      case kCheckpointCounts: {
        CheckpointCounts cc;
        if (!cc.Decode(&r) || !r.done() || !node || node->role != Role::kWorker)
          return Drop(c, "malformed checkpoint counts");
        return OnCheckpointCounts(*node, cc);
      }
      case kCheckpointDone: {
        CheckpointDone d;
        if (!d.Decode(&r) || !r.done() || !node || node->role != Role::kWorker || node->rank != 0)
          return Drop(c, "malformed checkpoint report");
        if (ckpt_ && ckpt_->id == d.id && ckpt_->cutting) EndCheckpoint(d.status, d.about);
        return;
      }
      case kTakeCheckpoint: {
        TakeCheckpoint t;
        if (!t.Decode(&r) || !r.done()) return Drop(c, "malformed checkpoint request");
        return HandleTakeCheckpoint(c, req, t);
      }
      case kReportFailure: {
        std::string why;
        if (!r.GetString(&why, 4096) || !node) return Drop(c, "malformed failure report");
        return Fail(Status::Aborted(fmt::format("{} failed: {}", node->Name(), why)));
      }
      default:
        return Drop(c, fmt::format("unexpected message tag {}", m.tag));
    }
  }

  // The workers a checkpoint of the running job holds: live, in the job, still pushing.
  static bool Gated(const Node& n) {
    return n.role == Role::kWorker && !n.dead && !n.rejoining && !n.goodbye;
  }

  // A worker said what it issued: once every held worker did, the cuts go out.
  void OnCheckpointCounts(const Node& n, const CheckpointCounts& cc) {
    if (!ckpt_ || ckpt_->id != cc.id || ckpt_->cutting) return;  // a late answer
    CheckpointRun& run = *ckpt_;
    for (const auto& [tensor, seq] : cc.tensors) {
      if (!tensors_.count(tensor)) continue;  // not of this job: nothing of it to hold
      auto& issued = run.issued[tensor];
      issued.resize(opt_.num_workers, CheckpointCut::kNotHeld);
      if (n.rank < issued.size()) issued[n.rank] = seq;
    }
    run.awaiting.erase(n.rank);
    if (!run.awaiting.empty()) return;
    run.cutting = true;
    CheckpointCuts cuts;
    cuts.id = run.id;
    cuts.mode = opt_.mode;
    cuts.dir = run.dir;
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(run.deadline - Clock::now());
    cuts.timeout_ms = static_cast<uint32_t>(std::max<int64_t>(1, left.count()));
    // sync: the step any worker began is completed, of every tensor a step behind the furthest
    // too (a step the workers were in the middle of). Tensors further behind are pushed less
    // often: they are taken as they are.
    uint64_t furthest = 0;
    for (const auto& [tensor, issued] : run.issued)
      for (uint64_t s : issued) furthest = std::max(furthest, s);
    for (auto& [tensor, issued] : run.issued) {
      CheckpointCut cut{tensor, issued, 0};
      const uint64_t most = cut.Bound(Mode::kSsp, 0);
      if (opt_.mode == Mode::kSync) cut.step = most + 1 == furthest ? furthest : most;
      cuts.cuts.push_back(std::move(cut));
    }
    // Worker 0 gets every worker's counts (the servers' part); the others only their bounds.
    for (auto& n : nodes_) {
      if (!Gated(n)) continue;
      CheckpointCuts own = cuts;
      if (n.rank != 0)
        for (auto& c : own.cuts) c = {c.tensor, {}, c.Bound(opt_.mode, n.rank)};
      Bytes meta;
      Writer w(&meta);
      w.Put<uint64_t>(0);
      own.Encode(&w);
      n.conn->Send(kCheckpointCuts, std::move(meta), {}, nullptr);
    }
  }

  void EndCheckpoint(const Status& st, const std::string& about = {}) {
    if (!ckpt_ || ckpt_->done) return;
    ckpt_->done = true;
    ckpt_->result = st;
    ckpt_->about = about;
    cv_.notify_all();
  }

  // `shardps checkpoint`: taken on a thread of its own (one at a time), which answers.
  void HandleTakeCheckpoint(const std::shared_ptr<transport::Connection>& c, uint64_t req,
                            const TakeCheckpoint& t) {
    if (stopping_) return Reply(*c, req, Status::Unavailable("the coordinator is stopping"));
    if (requesting_ || ckpt_)
      return Reply(*c, req, Status::AlreadyExists("a checkpoint is being taken already"));
    if (requested_.joinable()) requested_.join();  // the last one, done
    requesting_ = true;
    requested_ = std::thread([this, c, req, t] {
      auto r = Checkpoint(t.dir, std::chrono::milliseconds(t.timeout_ms));
      Bytes body;
      Writer w(&body);
      w.PutString(r.ok() ? *r : std::string());
      Reply(*c, req, r.status(), body);
      std::lock_guard<std::mutex> lock(mu_);
      requesting_ = false;
    });
  }

  // --checkpoint-interval: a checkpoint every interval while the job runs.
  void Periodic() {
    std::unique_lock<std::mutex> lock(mu_);
    auto next = Clock::now() + opt_.checkpoint_interval;
    while (!stopping_ && !finished_) {
      cv_.wait_until(lock, next, [&] { return stopping_ || finished_; });
      if (stopping_ || finished_) break;
      next = Clock::now() + opt_.checkpoint_interval;
      if (!complete_ || ckpt_ || tensors_.empty()) continue;
      lock.unlock();
      auto r = Checkpoint(opt_.checkpoint_dir, opt_.checkpoint_timeout);
      if (!r.ok()) spdlog::warn("coordinator: periodic checkpoint failed; the job goes on");
      lock.lock();
      if (grouped_) {
        spdlog::error(
            "coordinator: --checkpoint-interval stops: a job with node-level reduction is "
            "checkpointed by its workers");
        break;
      }
    }
  }

  // Bad input from the network: log, close that connection, go on serving everyone else.
  void Drop(const std::shared_ptr<transport::Connection>& c, const std::string& why) {
    spdlog::error("coordinator: closing connection from {}: {}", c->peer(), why);
    c->Close();
  }

  Node* FindNode(const std::shared_ptr<transport::Connection>& c) {
    for (auto& n : nodes_)
      if (n.conn == c) return &n;
    return nullptr;
  }

  void HandleRegister(const std::shared_ptr<transport::Connection>& c, uint64_t req,
                      const RegisterRequest& rq) {
    if (FindNode(c)) return Reply(*c, req, Status::AlreadyExists("already registered"));
    if (finished_) return Reply(*c, req, Status::Unavailable("the job has ended"));
    if (complete_ && rq.role == Role::kWorker) return HandleRejoin(c, req, rq);
    if (complete_) return HandleServerJoin(c, req, rq);
    uint32_t limit = rq.role == Role::kServer ? opt_.num_servers : opt_.num_workers;
    std::set<uint32_t> taken;
    for (auto& n : nodes_)
      if (n.role == rq.role) taken.insert(n.rank);
    if (taken.size() >= limit)
      return Reply(*c, req,
                   Status::InvalidArgument(fmt::format("the job already has all its {} {}s", limit,
                                                       RoleName(rq.role))));
    uint32_t rank = 0;
    if (rq.rank >= 0) {
      rank = static_cast<uint32_t>(rq.rank);
      if (rank >= limit || taken.count(rank))
        return Reply(*c, req,
                     Status::InvalidArgument(fmt::format("{} rank {} is out of range or taken",
                                                         RoleName(rq.role), rank)));
    } else {
      while (taken.count(rank)) ++rank;
    }
    if (rq.transport != opt_.transport)
      return Reply(
          *c, req,
          Status::InvalidArgument(fmt::format("this job uses transport '{}', the {} asked for '{}'",
                                              opt_.transport, RoleName(rq.role), rq.transport)));
    if (rq.role == Role::kServer && rq.data_address.empty())
      return Reply(*c, req, Status::InvalidArgument("a server must give its data address"));
    Node n = NewNode(c, req, rq, rank);
    spdlog::info("coordinator: {} registered from {}", n.Name(), c->peer());
    nodes_.push_back(std::move(n));
    if (nodes_.size() == opt_.num_servers + opt_.num_workers) Complete();
  }

  // The node that registered on `c` (request `req`) as `rq` says, with rank `rank` and a new id.
  Node NewNode(const std::shared_ptr<transport::Connection>& c, uint64_t req,
               const RegisterRequest& rq, uint32_t rank) {
    Node n;
    n.id = next_node_id_++;
    n.role = rq.role;
    n.rank = rank;
    n.pid = rq.pid;
    n.host = rq.host;
    n.data_address = rq.data_address;
    n.node = rq.node.empty() ? rq.host : rq.node;
    n.local_rank = rq.local_rank;
    n.local_size = rq.local_size;
    n.conn = c;
    n.register_request = req;
    n.last_seen = Clock::now();
    return n;
  }

  // A worker that registers once the job runs: a restarted worker in the place of one that was
  // removed (--on-worker-loss continue). Every live server is told (kWorkerUp); once each
  // answered that its chunks wait for the worker again (kWorkerRestored), it is let in with the
  // job's view (AdvanceRejoins).
  void HandleRejoin(const std::shared_ptr<transport::Connection>& c, uint64_t req,
                    const RegisterRequest& rq) {
    auto refuse = [&](const std::string& why) { Reply(*c, req, Status::InvalidArgument(why)); };
    if (!opt_.continue_on_worker_loss || grouped_)
      return refuse(fmt::format(
          "the job already has all its {} workers (a worker that was removed may rejoin only a "
          "job run with --on-worker-loss continue, without node-level reduction)",
          opt_.num_workers));
    std::set<uint32_t> live, coming;
    for (const auto& n : nodes_)
      if (n.role == Role::kWorker && !n.dead) (n.rejoining ? coming : live).insert(n.rank);
    uint32_t rank = 0;
    if (rq.rank >= 0) {
      // A rank still held waits for its worker to be removed (a restarted process may register
      // before its old one was found dead), until the deadline (AdvanceRejoins).
      rank = static_cast<uint32_t>(rq.rank);
      if (rank >= opt_.num_workers || coming.count(rank))
        return refuse(
            fmt::format("worker rank {} is out of range or being taken by another process", rank));
    } else {
      for (uint32_t r : coming) live.insert(r);
      while (rank < opt_.num_workers && live.count(rank)) ++rank;
      if (rank == opt_.num_workers)
        return refuse(fmt::format("the job already has all its {} workers", opt_.num_workers));
    }
    if (rq.transport != opt_.transport)
      return refuse(fmt::format("this job uses transport '{}', the worker asked for '{}'",
                                opt_.transport, rq.transport));
    if (rq.local_size > 1) return refuse("a worker rejoins alone (workers per node 1)");
    EndCheckpoint(Status::Aborted(fmt::format("worker {} rejoined the job during it", rank)));
    Node n = NewNode(c, req, rq, rank);
    n.local_size = 1;
    n.rejoining = true;
    n.rejoin_deadline = n.last_seen + RejoinWait();
    n.rejoin_epoch = epoch_;
    spdlog::info("coordinator: {} registered from {}: it rejoins the job{}", n.Name(), c->peer(),
                 live.count(rank) ? " once the worker of that rank is removed" : "");
    nodes_.push_back(std::move(n));
    AdvanceRejoins();
  }

  // A server that registers once the job runs joins it (docs/fault-tolerance.md, "A server
  // that joins"): it gets the next rank and the job's view, every live node is told
  // (kServerJoined) and connects to it; once all said so (kServerReached) it takes chunks:
  // new backups of those left with one copy, and its share of the tensors declared later.
  void HandleServerJoin(const std::shared_ptr<transport::Connection>& c, uint64_t req,
                        const RegisterRequest& rq) {
    auto refuse = [&](const std::string& why) { Reply(*c, req, Status::InvalidArgument(why)); };
    if (!Replicated())
      return refuse(fmt::format(
          "the job already has all its {} servers (a server joins a running job only when it "
          "keeps backups: --replicas 1 with 2 servers or more)",
          opt_.num_servers));
    const auto rank = static_cast<uint32_t>(server_bytes_.size());
    if (rank >= kMaxServers)
      return refuse(fmt::format("the job has {} servers, the most it can have", rank));
    if (rq.rank >= 0 && static_cast<uint32_t>(rq.rank) != rank)
      return refuse(fmt::format(
          "server rank {} is taken: a server joining the running job is given rank {} (leave "
          "--rank out)",
          rq.rank, rank));
    if (rq.transport != opt_.transport)
      return refuse(fmt::format("this job uses transport '{}', the server asked for '{}'",
                                opt_.transport, rq.transport));
    if (rq.data_address.empty()) return refuse("a server must give its data address");
    // One server joins at a time, and not while a worker rejoins (each would miss what the other
    // changes): the others wait, answered in turn (AdvanceJoins).
    if (joining_rank_ != kNoServer || RejoinInProgress()) {
      spdlog::info("coordinator: a server from {} waits to join: {}", c->peer(),
                   joining_rank_ != kNoServer ? "another server is joining" : "a worker rejoins");
      waiting_joins_.push_back({c, req, rq});
      return;
    }
    EndCheckpoint(Status::Aborted(fmt::format("server {} joined the job during it", rank)));
    Node n = NewNode(c, req, rq, rank);
    n.joining = true;
    n.join_deadline = n.last_seen + JoinWait();
    for (const auto& o : nodes_)
      if (!o.dead && !o.rejoining && !o.goodbye) n.unreached.insert(o.id);
    server_bytes_.push_back(0);
    primary_bytes_placed_.push_back(0);
    server_dead_.push_back(false);
    view_.servers.push_back(ServerInfo{n.id, n.data_address});
    view_.num_servers = static_cast<uint32_t>(view_.servers.size());
    RegisterReply rep;
    rep.node_id = n.id;
    rep.rank = rank;
    rep.view = view_;
    rep.joined = true;
    rep.epoch = epoch_;
    for (uint32_t s = 0; s < server_dead_.size(); ++s)
      if (server_dead_[s]) rep.dead_servers.push_back(s);
    // Workers removed (--on-worker-loss continue) whose rank no live worker holds: the chunks
    // made on it do not wait for them (the other servers were told: kWorkerDown).
    for (uint32_t w = 0; w < opt_.num_workers; ++w) {
      const bool held = std::any_of(nodes_.begin(), nodes_.end(), [&](const Node& o) {
        return o.role == Role::kWorker && o.rank == w && !o.dead && !o.rejoining;
      });
      if (!held) rep.removed_workers.push_back(w);
    }
    Bytes body;
    Writer w(&body);
    rep.Encode(&w);
    Reply(*c, req, Status::OK(), body);
    spdlog::info(
        "coordinator: {} registered from {}: it joins the running job ({} live nodes "
        "connect to it first)",
        n.Name(), c->peer(), n.unreached.size());
    Notify(kServerJoined, ServerJoined{epoch_, rank, n.id, n.data_address},
           [&](const Node& o) { return n.unreached.count(o.id) > 0; });
    joining_rank_ = rank;
    nodes_.push_back(std::move(n));
    AdvanceJoins();
  }

  std::chrono::milliseconds JoinWait() const {
    return std::max(opt_.heartbeat_timeout * 4, std::chrono::milliseconds(10000));
  }

  // A joining server every live node reached is given chunks; one that some could not reach,
  // or not within JoinWait, is declared dead (it held nothing).
  void AdvanceJoins() {
    const auto now = Clock::now();
    if (joining_rank_ != kNoServer && !Joining(joining_rank_)) joining_rank_ = kNoServer;
    while (joining_rank_ == kNoServer && !RejoinInProgress() && !waiting_joins_.empty() &&
           !finished_) {
      WaitingJoin next = std::move(waiting_joins_.front());
      waiting_joins_.pop_front();
      if (!next.conn->closed()) HandleServerJoin(next.conn, next.req, next.rq);
    }
    for (auto& n : nodes_) {
      if (!n.joining || n.dead) continue;
      for (auto it = n.unreached.begin(); it != n.unreached.end();) {
        const Node* o = FindNodeById(*it);
        it = !o || o->dead || o->goodbye ? n.unreached.erase(it) : std::next(it);
      }
      if (!n.unreached.empty() && now < n.join_deadline) continue;
      if (!n.unreached.empty()) {
        std::vector<std::string> names;
        for (uint32_t id : n.unreached)
          if (const Node* o = FindNodeById(id)) names.push_back(o->Name());
        n.joining = false;
        joining_rank_ = kNoServer;
        return Lost(n, fmt::format("{} could not join: not reached by {} within {} ms", n.Name(),
                                   fmt::join(names, ", "), JoinWait().count()));
      }
      n.joining = false;
      joining_rank_ = kNoServer;
      ++servers_joined_;
      spdlog::info("coordinator: {} joined the job; {} live servers now", n.Name(), LiveServers());
      RebuildBackups();
    }
  }

  // kServerReached: node `from` reached joining server `r.rank`, or cannot (the join fails).
  void OnServerReached(const Node& from, const ServerReached& r) {
    for (auto& n : nodes_) {
      if (!n.joining || n.dead || n.role != Role::kServer || n.rank != r.rank) continue;
      if (!r.error.empty()) {
        n.joining = false;
        joining_rank_ = kNoServer;
        return Lost(n, fmt::format("{} could not join: {} cannot reach it: {}", n.Name(),
                                   from.Name(), r.error));
      }
      n.unreached.erase(from.id);
    }
    AdvanceJoins();
  }

  const Node* FindNodeById(uint32_t id) const {
    for (const auto& n : nodes_)
      if (n.id == id) return &n;
    return nullptr;
  }

  uint32_t LiveServers() const {
    uint32_t live = 0;
    for (const auto& n : nodes_)
      if (n.role == Role::kServer && !n.dead) ++live;
    return live;
  }

  // Lets in each rejoining worker that every live server answered for; one that waited past its
  // deadline is refused and removed again.
  void AdvanceRejoins() {
    const auto now = Clock::now();
    for (auto& n : nodes_) {
      if (!n.rejoining || n.dead) continue;
      if (!n.rejoin_told) {
        if (joining_rank_ != kNoServer) continue;  // after the server joining now (or its end)
        const bool held = std::any_of(nodes_.begin(), nodes_.end(), [&](const Node& o) {
          return o.role == Role::kWorker && !o.dead && !o.rejoining && o.rank == n.rank;
        });
        if (held && now < n.rejoin_deadline) continue;
        if (held) {
          Reply(*n.conn, n.register_request,
                Status::InvalidArgument(fmt::format(
                    "worker rank {} is alive: only the rank of a removed worker can be taken "
                    "again (waited {} ms for it to be removed)",
                    n.rank, RejoinWait().count())));
          n.dead = true;
          n.rejoining = false;
          n.conn->Close();
          MaybeFinish();
          if (finished_) return;
          continue;
        }
        n.rejoin_told = true;
        for (const auto& other : nodes_)
          if (other.role == Role::kServer && !other.dead) n.awaiting.insert(other.rank);
        Notify(kWorkerUp, WorkerUp{n.rank},
               [](const Node& other) { return other.role == Role::kServer; });
      }
      // A server that died while it was let in: its chunks moved, and the servers that answered
      // may not be those that serve them now.
      const bool lost_server = epoch_ != n.rejoin_epoch;
      if (!lost_server && !n.awaiting.empty() && now < n.rejoin_deadline) continue;
      n.rejoining = false;
      n.last_seen = now;
      if (lost_server || !n.awaiting.empty()) {
        const std::string why =
            lost_server ? fmt::format(
                              "{} could not rejoin: a server died while it was let in (it may "
                              "register again)",
                              n.Name())
                        : fmt::format(
                              "{} could not rejoin: server(s) {} did not make their chunks wait "
                              "for it within {} ms",
                              n.Name(), fmt::join(n.awaiting, ", "), RejoinWait().count());
        Reply(*n.conn, n.register_request, Status::Unavailable(why));
        RemoveWorker(n, why);
        return;  // nodes_ may have changed
      }
      RegisterReply rep;
      rep.node_id = n.id;
      rep.rank = n.rank;
      rep.view = view_;
      rep.rejoined = true;
      // The servers declared dead before (ranks of the view it must not reach): their chunks are
      // on their backups, where its declares find them.
      rep.epoch = epoch_;
      for (uint32_t s = 0; s < server_dead_.size(); ++s)
        if (server_dead_[s]) rep.dead_servers.push_back(s);
      Bytes body;
      Writer w(&body);
      rep.Encode(&w);
      Reply(*n.conn, n.register_request, Status::OK(), body);
      ++workers_rejoined_;
      spdlog::info("coordinator: {} rejoined the job; {} workers now", n.Name(), LiveWorkers());
    }
  }

  std::chrono::milliseconds RejoinWait() const {
    return std::max(opt_.heartbeat_timeout * 2, std::chrono::milliseconds(1000));
  }

  // Node-level reduction: the workers that said they share a node (local_size above 1) are
  // grouped by node name into `worker_nodes` (per worker rank), numbered in the order of their
  // lowest rank. Every worker must then be on a node whose workers number its local size and
  // hold local ranks 0..local_size-1; InvalidArgument naming what does not add up otherwise.
  Result<uint32_t> GroupNodes(std::vector<uint32_t>* worker_nodes) const {
    std::vector<const Node*> workers(opt_.num_workers, nullptr);
    bool any = false;
    for (auto& n : nodes_)
      if (n.role == Role::kWorker) {
        workers[n.rank] = &n;
        any = any || n.local_size > 1;
      }
    worker_nodes->clear();
    if (!any) return opt_.num_workers;
    if (opt_.sync_quorum != 0 || !opt_.worker_weights.empty())
      return Status::InvalidArgument(
          "node-level reduction (workers per node above 1) cannot be combined with a sync quorum "
          "or worker weights: a node pushes its workers' sum as one push");
    std::map<std::string, uint32_t> index;
    std::vector<std::vector<const Node*>> members;
    for (const Node* w : workers) {
      // A worker alone on its node (local size 1) is a node of its own whatever its name.
      const std::string key = w->local_size > 1 ? "n:" + w->node : fmt::format("w:{}", w->rank);
      auto [it, fresh] = index.emplace(key, static_cast<uint32_t>(members.size()));
      if (fresh) members.emplace_back();
      members[it->second].push_back(w);
      worker_nodes->push_back(it->second);
    }
    for (const auto& m : members) {
      const uint32_t k = m.front()->local_size;
      std::set<int32_t> ranks;
      for (const Node* w : m) {
        if (w->local_size != k)
          return Status::InvalidArgument(fmt::format(
              "the workers of node '{}' disagree on its number of workers: {} says {}, {} says "
              "{}",
              w->node, m.front()->Name(), k, w->Name(), w->local_size));
        if (k == 1) continue;
        if (w->local_rank < 0 || static_cast<uint32_t>(w->local_rank) >= k ||
            !ranks.insert(w->local_rank).second)
          return Status::InvalidArgument(
              fmt::format("{} on node '{}' has local rank {}, taken or outside 0..{}", w->Name(),
                          w->node, w->local_rank, k - 1));
      }
      if (m.size() != k)
        return Status::InvalidArgument(fmt::format(
            "node '{}' has {} workers registered but its workers say it has {} (workers per "
            "node must divide the workers, and a node's workers must share its name)",
            m.front()->node, m.size(), k));
    }
    spdlog::info("coordinator: {} workers reduce on {} nodes before they push", opt_.num_workers,
                 members.size());
    return static_cast<uint32_t>(members.size());
  }

  // Everyone is here: send each node the view.
  void Complete() {
    ClusterView view;
    view.num_servers = opt_.num_servers;
    view.num_workers = opt_.num_workers;
    view.servers.resize(opt_.num_servers);
    for (auto& n : nodes_)
      if (n.role == Role::kServer) view.servers[n.rank] = ServerInfo{n.id, n.data_address};
    view.mode = opt_.mode;
    view.staleness = opt_.staleness;
    view.sync_quorum = opt_.sync_quorum;
    view.worker_weights = opt_.worker_weights;
    view.weight_rule = opt_.weight_rule;
    view.aggregate = opt_.aggregate;
    view.chunk_bytes = opt_.chunk_bytes;
    view.heartbeat_ms = static_cast<uint32_t>(opt_.heartbeat_interval.count());
    view.heartbeat_timeout_ms = static_cast<uint32_t>(opt_.heartbeat_timeout.count());
    view.transport = opt_.transport;
    view.job_id = job_id_;
    view.replicas = Replicated() ? 1 : 0;
    view.failover_timeout_ms = static_cast<uint32_t>(opt_.failover_timeout.count());
    auto nodes = GroupNodes(&view.worker_nodes);
    if (!nodes.ok()) {
      // Every registration fails with the reason; so does the job.
      for (auto& n : nodes_) Reply(*n.conn, n.register_request, nodes.status());
      Fail(nodes.status());
      return;
    }
    complete_ = true;
    view_ = view;
    grouped_ = !view.worker_nodes.empty();
    for (auto& n : nodes_) {
      RegisterReply rep;
      rep.node_id = n.id;
      rep.rank = n.rank;
      rep.view = view;
      Bytes body;
      Writer w(&body);
      rep.Encode(&w);
      n.last_seen = Clock::now();
      Reply(*n.conn, n.register_request, Status::OK(), body);
    }
    spdlog::info("coordinator: all {} servers and {} workers registered", opt_.num_servers,
                 opt_.num_workers);
  }

  void HandleBarrier(const std::shared_ptr<transport::Connection>& c, uint64_t req, Node& node,
                     const std::string& name, uint64_t timeout_ms) {
    Barrier& b = barriers_[name];
    if (b.arrived.empty()) b.deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    b.arrived.insert(node.rank);
    b.waiters.emplace_back(c, req);
    if (Release(b)) barriers_.erase(name);
  }

  void HandleDeclare(const std::shared_ptr<transport::Connection>& c, uint64_t req,
                     const std::vector<DeclareItem>& items) {
    DeclareReply reply;
    uint64_t elems_per_chunk = opt_.chunk_bytes / 4;
    for (const auto& it : items) {
      if (it.name.empty() || it.numel == 0 || it.numel > (1ull << 40))
        return Reply(*c, req,
                     Status::InvalidArgument(fmt::format(
                         "tensor '{}' has an invalid size of {} elements", it.name, it.numel)));
      auto found = tensors_.find(it.name);
      if (found != tensors_.end() && found->second.numel != it.numel)
        return Reply(*c, req,
                     Status::InvalidArgument(
                         fmt::format("tensor '{}' was declared with {} elements, now with {}",
                                     it.name, found->second.numel, it.numel)));
      if (found == tensors_.end()) {
        TensorRecord rec;
        rec.numel = it.numel;
        for (uint64_t off = 0; off < it.numel; off += elems_per_chunk) {
          ChunkPlacement p;
          p.chunk_id = next_chunk_id_++;
          p.offset = off;
          p.numel = std::min(elems_per_chunk, it.numel - off);
          // Balance by bytes: the least loaded live server takes the chunk, the next one its
          // backup (a backup costs its server the same memory and apply work). Between servers
          // holding as many bytes, the one that was given fewer primaries takes it, so that the
          // workers' traffic is spread too (else with 2 servers every primary is server 0's).
          p.server = LeastLoaded(kNoServer, /*primary=*/true);
          if (p.server == kNoServer)
            return Reply(*c, req, Status::Unavailable("no live server is left to place chunks on"));
          server_bytes_[p.server] += p.numel * 4;
          primary_bytes_placed_[p.server] += p.numel * 4;
          if (Replicated()) {
            p.backup = LeastLoaded(p.server);
            if (p.backup != kNoServer) server_bytes_[p.backup] += p.numel * 4;
          }
          rec.placement.chunks.push_back(p);
        }
        found = tensors_.emplace(it.name, std::move(rec)).first;
      }
      reply.tensors.push_back(found->second.placement);
    }
    Bytes body;
    Writer w(&body);
    reply.Encode(&w);
    Reply(*c, req, Status::OK(), body);
  }

  void OnClose(const std::shared_ptr<transport::Connection>& c, const Status& st) {
    std::lock_guard<std::mutex> lock(mu_);
    Node* n = FindNode(c);
    if (!n || finished_ || n->dead) return;
    if (n->role == Role::kWorker && n->goodbye) return;
    Lost(*n, fmt::format("{} disconnected before the job ended ({})", n->Name(),
                         st.ok() ? "closed" : st.message()));
  }

  bool Replicated() const { return opt_.replicas > 0 && opt_.num_servers > 1; }

  // The live server holding the fewest bytes, other than `besides`; kNoServer when none is.
  // With `primary`, of those holding as few, the one given the fewest primary bytes.
  uint32_t LeastLoaded(uint32_t besides, bool primary = false) const {
    uint32_t best = kNoServer;
    for (uint32_t s = 0; s < server_bytes_.size(); ++s) {
      if (s == besides || server_dead_[s] || Joining(s)) continue;
      if (best == kNoServer || server_bytes_[s] < server_bytes_[best] ||
          (primary && server_bytes_[s] == server_bytes_[best] &&
           primary_bytes_placed_[s] < primary_bytes_placed_[best]))
        best = s;
    }
    return best;
  }

  // Server `s` is joining: no node was told to use it yet.
  bool Joining(uint32_t s) const {
    if (s != joining_rank_) return false;
    return std::any_of(nodes_.begin(), nodes_.end(), [&](const Node& n) {
      return n.joining && !n.dead && n.role == Role::kServer && n.rank == s;
    });
  }

  // A rejoining worker the servers were told of (kWorkerUp) is not in yet.
  bool RejoinInProgress() const {
    return std::any_of(nodes_.begin(), nodes_.end(),
                       [](const Node& o) { return o.rejoining && !o.dead && o.rejoin_told; });
  }

  // Node `n` died or went silent: the job fails, unless it is a server whose every chunk has a
  // live backup (docs/fault-tolerance.md). Then each of its chunks is served by its backup from
  // now on, the shard map's epoch goes up, and every live node hears it (kServerDown); the dead
  // server's connection is closed, so one that was only paused finds itself fenced.
  void Lost(Node& n, const std::string& why) {
    if (n.rejoining && !n.rejoin_told) {
      // A worker waiting to take a rank still held: the job never counted it.
      spdlog::warn("coordinator: {} (waiting to rejoin) left: {}", n.Name(), why);
      n.dead = true;
      n.rejoining = false;
      n.conn->Close();
      MaybeFinish();
      return;
    }
    if (n.role == Role::kWorker && opt_.continue_on_worker_loss && complete_) {
      if (n.rank == 0)
        return Fail(Status::Unavailable(
            why + " (worker 0 is never removed: it creates the chunks and reports checkpoints)"));
      if (grouped_)
        return Fail(Status::Unavailable(
            why + " (workers are not removed from a job with node-level reduction)"));
      return RemoveWorker(n, why);
    }
    if (n.role != Role::kServer || !Replicated() || !complete_)
      return Fail(Status::Unavailable(why));
    for (auto& [name, rec] : tensors_)
      for (const auto& p : rec.placement.chunks)
        if (p.server == n.rank && p.backup == kNoServer)
          return Fail(Status::Unavailable(fmt::format(
              "{}; chunk {} of tensor '{}' has no live copy left (its backup was lost before{})",
              why, p.chunk_id, name,
              rebuilding_.count(p.chunk_id) ? ", and its new one was not whole yet"
                                            : ", and no other live server could take a new one")));
    EndCheckpoint(Status::Aborted(fmt::format("server {} died during it", n.rank)));
    // New backups being built on it are lost with it (their chunks get others below).
    for (auto it = rebuilding_.begin(); it != rebuilding_.end();) {
      if (it->second != n.rank) {
        ++it;
        continue;
      }
      if (const ChunkPlacement* p = FindChunk(it->first)) server_bytes_[n.rank] -= p->numel * 4;
      it = rebuilding_.erase(it);
    }
    uint32_t moved = 0, orphaned = 0;
    for (auto& [name, rec] : tensors_)
      for (auto& p : rec.placement.chunks) {
        if (p.server == n.rank) {
          server_bytes_[p.server] -= p.numel * 4;
          p.server = p.backup;
          p.backup = kNoServer;
          ++moved;
        } else if (p.backup == n.rank) {
          server_bytes_[p.backup] -= p.numel * 4;
          p.backup = kNoServer;
          ++orphaned;
        }
      }
    n.dead = true;
    server_dead_[n.rank] = true;
    ++epoch_;
    spdlog::warn(
        "coordinator: {}: declared dead; shard map epoch {}: its {} chunks are served by their "
        "backups, {} chunks it backed up have none now",
        why, epoch_, moved, orphaned);
    Notify(kServerDown, ServerDown{epoch_, n.rank}, [](const Node&) { return true; });
    n.conn->Close();
    RebuildBackups();
  }

  ChunkPlacement* FindChunk(uint64_t id) {
    for (auto& [name, rec] : tensors_)
      for (auto& p : rec.placement.chunks)
        if (p.chunk_id == id) return &p;
    return nullptr;
  }

  // After a failover (docs/fault-tolerance.md, "New backups"): every chunk left with one copy
  // gets a new backup on the least loaded other live server. Its primary copies it there
  // (kRebuildBackups) and says when the copy is whole (kBackupRebuilt); until then a death of
  // the primary still ends the job.
  void RebuildBackups() {
    std::map<uint32_t, BackupOrders> orders;  // by primary
    for (auto& [name, rec] : tensors_)
      for (auto& p : rec.placement.chunks) {
        if (p.backup != kNoServer || rebuilding_.count(p.chunk_id)) continue;
        const uint32_t b = LeastLoaded(p.server);
        if (b == kNoServer) continue;  // one live server: nowhere to put a copy
        server_bytes_[b] += p.numel * 4;
        rebuilding_[p.chunk_id] = b;
        orders[p.server].items.push_back({p.chunk_id, b});
      }
    for (auto& [primary, o] : orders) {
      o.epoch = epoch_;
      spdlog::info("coordinator: server {} copies {} chunks to new backups", primary,
                   o.items.size());
      Notify(kRebuildBackups, o,
             [s = primary](const Node& n) { return n.role == Role::kServer && n.rank == s; });
    }
  }

  // Server `n`, a chunk's primary, reports how building its new backup ended. A whole copy
  // becomes the chunk's backup (the workers hear it: kBackupsAdded); a failed one is dropped,
  // and the chunk stays with one copy.
  void OnBackupRebuilt(const Node& n, const BackupRebuilt& b) {
    auto it = rebuilding_.find(b.chunk_id);
    ChunkPlacement* p = FindChunk(b.chunk_id);
    // A report about a copy the coordinator no longer waits for is stale: its server died
    // meanwhile (Lost dropped the entry; the chunk may have been given another).
    if (it == rebuilding_.end() || it->second != b.backup || !p || p->server != n.rank) return;
    rebuilding_.erase(it);
    if (!b.error.empty()) {
      server_bytes_[b.backup] -= p->numel * 4;
      spdlog::warn("coordinator: chunk {} has no new backup on server {}: {}", b.chunk_id, b.backup,
                   b.error);
      return;
    }
    p->backup = b.backup;
    ++backups_rebuilt_;
    BackupOrders added;
    added.epoch = epoch_;
    added.items.push_back({b.chunk_id, b.backup});
    Notify(kBackupsAdded, added, [](const Node& w) { return w.role == Role::kWorker; });
    if (rebuilding_.empty())
      spdlog::info("coordinator: every chunk has a backup again (epoch {})", epoch_);
  }

  // --on-worker-loss continue: worker `n` died; the others go on without it. Every live server
  // hears it (kWorkerDown: its sync steps complete without it, its pushes are refused from now
  // on); barriers and the end of the job count the live workers only; its connection is closed.
  void RemoveWorker(Node& n, const std::string& why) {
    n.dead = true;
    EndCheckpoint(Status::Aborted(fmt::format("worker {} left the job during it", n.rank)));
    ++workers_removed_;
    spdlog::warn(
        "coordinator: {}: removed from the job (--on-worker-loss continue); {} workers go on", why,
        LiveWorkers());
    Notify(kWorkerDown, WorkerDown{n.rank},
           [](const Node& other) { return other.role == Role::kServer; });
    n.conn->Close();
    for (auto it = barriers_.begin(); it != barriers_.end();) {
      it->second.arrived.erase(n.rank);
      it = Release(it->second) ? barriers_.erase(it) : std::next(it);
    }
    MaybeFinish();
  }

  // Sends `msg` as a notice (request id 0, no reply) to every live node that `to` picks.
  template <typename Msg>
  void Notify(uint32_t tag, const Msg& msg, const std::function<bool(const Node&)>& to) {
    for (auto& other : nodes_) {
      if (other.dead || !to(other)) continue;
      Bytes meta;
      Writer w(&meta);
      w.Put<uint64_t>(0);
      msg.Encode(&w);
      other.conn->Send(tag, std::move(meta), {}, nullptr);
    }
  }

  uint32_t LiveWorkers() const {
    uint32_t live = 0;
    for (const auto& n : nodes_)
      if (n.role == Role::kWorker && !n.dead && !n.rejoining) ++live;
    return live;
  }

  // When every live worker reached barrier `b` (and at least one did), answers its waiters and
  // returns true: the caller erases it.
  bool Release(Barrier& b) {
    if (b.arrived.empty() || b.arrived.size() < LiveWorkers()) return false;
    for (auto& [conn, id] : b.waiters) Reply(*conn, id, Status::OK());
    barriers_done_++;
    return true;
  }

  void Tick() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stopping_ || finished_) continue;
      auto now = Clock::now();
      if (!complete_ && now - started_ > opt_.register_timeout) {
        std::vector<std::string> missing;
        for (Role role : {Role::kServer, Role::kWorker}) {
          uint32_t limit = role == Role::kServer ? opt_.num_servers : opt_.num_workers;
          for (uint32_t r = 0; r < limit; ++r) {
            bool here = std::any_of(nodes_.begin(), nodes_.end(),
                                    [&](const Node& n) { return n.role == role && n.rank == r; });
            if (!here) missing.push_back(fmt::format("{} {}", RoleName(role), r));
          }
        }
        Fail(Status::Timeout(fmt::format("only {} of {} nodes registered within {} ms; missing: {}",
                                         nodes_.size(), opt_.num_servers + opt_.num_workers,
                                         opt_.register_timeout.count(), fmt::join(missing, ", "))));
        continue;
      }
      AdvanceRejoins();
      AdvanceJoins();
      if (finished_) continue;
      for (auto& n : nodes_) {
        if (n.goodbye || n.dead || n.rejoining) continue;
        // With replicas a silent server is replaced after the failover timeout.
        const auto limit = n.role == Role::kServer && Replicated() ? opt_.failover_timeout
                                                                   : opt_.heartbeat_timeout;
        if (now - n.last_seen > limit) {
          Lost(n,
               fmt::format("{} sent no heartbeat for {} ms", n.Name(),
                           std::chrono::duration_cast<std::chrono::milliseconds>(now - n.last_seen)
                               .count()));
          break;
        }
      }
      if (finished_) continue;
      for (auto it = barriers_.begin(); it != barriers_.end();) {
        if (now < it->second.deadline) {
          ++it;
          continue;
        }
        std::vector<uint32_t> absent;
        for (const auto& n : nodes_)
          if (n.role == Role::kWorker && !n.dead && !it->second.arrived.count(n.rank))
            absent.push_back(n.rank);
        Status st = Status::Timeout(fmt::format("barrier '{}' timed out waiting for worker(s) {}",
                                                it->first, fmt::join(absent, ", ")));
        for (auto& [conn, id] : it->second.waiters) Reply(*conn, id, st);
        it = barriers_.erase(it);
      }
    }
  }

  void MaybeFinish() {
    if (finished_) return;
    // Every worker rank is done: said goodbye, or was removed and not taken again (a rank's
    // earlier nodes are dead when a rejoined worker holds it).
    for (const auto& n : nodes_)
      if (n.role == Role::kWorker && !n.goodbye && !n.dead) return;
    uint32_t ranks = 0;
    std::set<uint32_t> seen;
    for (const auto& n : nodes_)
      if (n.role == Role::kWorker && seen.insert(n.rank).second) ++ranks;
    if (ranks < opt_.num_workers) return;
    for (auto& n : nodes_)
      if (n.role == Role::kServer && !n.dead) {
        Bytes meta;
        Writer w(&meta);
        w.Put<uint64_t>(0);
        w.PutString("all workers finished");
        n.conn->Send(kShutdown, meta, {}, nullptr);
      }
    spdlog::info("coordinator: all workers finished; job done");
    RefuseWaitingJoins("the job has ended");
    finished_ = true;
    result_ = Status::OK();
    cv_.notify_all();
  }

  // The metrics of a scrape (docs/metrics.md), under the coordinator's mutex.
  void Collect(metrics::Families& f) {
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t servers = 0, workers = 0, finished = 0;
    for (auto& n : nodes_) {
      (n.role == Role::kServer ? servers : workers)++;
      if (n.goodbye) ++finished;
    }
    f.Gauge("shardps_coordinator_nodes", "nodes registered", servers, {{"node_role", "server"}});
    f.Gauge("shardps_coordinator_nodes", "nodes registered", workers, {{"node_role", "worker"}});
    f.Gauge("shardps_coordinator_nodes_expected", "nodes the job waits for", opt_.num_servers,
            {{"node_role", "server"}});
    f.Gauge("shardps_coordinator_nodes_expected", "nodes the job waits for", opt_.num_workers,
            {{"node_role", "worker"}});
    f.Gauge("shardps_coordinator_workers_finished", "workers that said goodbye", finished);
    f.Counter("shardps_coordinator_heartbeats_total", "heartbeats received from nodes",
              static_cast<double>(heartbeats_));
    f.Counter("shardps_coordinator_barriers_total", "barriers completed",
              static_cast<double>(barriers_done_));
    f.Counter("shardps_coordinator_workers_removed_total",
              "workers that died and were removed from the job (--on-worker-loss continue)",
              static_cast<double>(workers_removed_));
    f.Counter("shardps_coordinator_workers_rejoined_total",
              "removed workers whose place a new worker process took (it rejoined the job)",
              static_cast<double>(workers_rejoined_));
    f.Counter("shardps_coordinator_servers_joined_total",
              "servers that joined the running job and were given chunks",
              static_cast<double>(servers_joined_));
    f.Counter("shardps_coordinator_checkpoints_total",
              "checkpoints of the running job written (shardps checkpoint, --checkpoint-interval)",
              static_cast<double>(checkpoints_written_), {{"result", "written"}});
    f.Counter("shardps_coordinator_checkpoints_total",
              "checkpoints of the running job written (shardps checkpoint, --checkpoint-interval)",
              static_cast<double>(checkpoints_failed_), {{"result", "failed"}});
    f.Gauge("shardps_coordinator_checkpoint_phase",
            "a checkpoint of the running job: 0 none, 1 the workers hold their pushes and say what "
            "they issued, 2 the cuts went out: the chunks are written",
            ckpt_ ? (ckpt_->cutting ? 2.0 : 1.0) : 0.0);
    f.Gauge("shardps_coordinator_shard_map_epoch",
            "the shard map's epoch: servers replaced by their chunks' backups so far",
            static_cast<double>(epoch_));
    f.Counter("shardps_coordinator_backups_rebuilt_total",
              "chunks given a new backup after a failover", static_cast<double>(backups_rebuilt_));
    f.Gauge("shardps_coordinator_backups_rebuilding", "chunks whose new backup is being copied",
            static_cast<double>(rebuilding_.size()));
    f.Gauge("shardps_coordinator_tensors", "tensors declared",
            static_cast<double>(tensors_.size()));
    uint64_t placed = 0;
    for (size_t s = 0; s < server_bytes_.size(); ++s) {
      f.Gauge("shardps_coordinator_server_parameter_bytes", "parameter bytes placed on a server",
              static_cast<double>(server_bytes_[s]), {{"server", std::to_string(s)}});
      placed += server_bytes_[s];
    }
    f.Gauge("shardps_coordinator_parameter_bytes", "parameter bytes placed in all",
            static_cast<double>(placed));
    // 0 registering, 1 running, 2 done, 3 failed
    double state = !finished_ ? (complete_ ? 1 : 0) : (result_.ok() ? 2 : 3);
    f.Gauge("shardps_coordinator_job_state", "0 registering, 1 running, 2 done, 3 failed", state);
    f.Counter("shardps_refused_peers_total",
              "connections refused for not proving the cluster secret",
              static_cast<double>(ctx_ ? ctx_->refused_peers() : 0));
  }

  // Servers waiting to join a job that ended are told so.
  void RefuseWaitingJoins(const std::string& why) {
    for (auto& j : waiting_joins_) Reply(*j.conn, j.req, Status::Unavailable(why));
    waiting_joins_.clear();
  }

  void Fail(Status why) {
    if (finished_) return;
    RefuseWaitingJoins("the job failed: " + why.message());
    spdlog::error("coordinator: job failed: {}", why.ToString());
    finished_ = true;
    result_ = why;
    for (auto& n : nodes_) {
      if (n.dead) continue;
      Bytes meta;
      Writer w(&meta);
      w.Put<uint64_t>(0);
      w.PutString(why.message());
      n.conn->Send(kNodeFailed, meta, {}, nullptr);
    }
    cv_.notify_all();
  }

  CoordinatorOptions opt_;
  std::unique_ptr<transport::Context> ctx_;
  std::unique_ptr<transport::Listener> listener_;
  std::thread ticker_;

  std::mutex mu_;
  std::condition_variable cv_;
  const uint64_t job_id_ = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  bool stopping_ = false;
  bool complete_ = false;
  bool finished_ = false;
  Status result_;
  Clock::time_point started_;
  uint32_t next_node_id_ = 1;
  std::vector<Node> nodes_;
  std::map<std::string, Barrier> barriers_;
  std::map<std::string, TensorRecord> tensors_;
  std::vector<uint64_t> server_bytes_;
  // Per server: the bytes of the chunks placed on it as their primary when declared (a tie-break
  // of placement: LeastLoaded).
  std::vector<uint64_t> primary_bytes_placed_;
  std::vector<bool> server_dead_;  // by server rank: declared dead (Lost)
  uint64_t epoch_ = 0;             // the shard map's: one more per server declared dead
  uint64_t next_chunk_id_ = 1;
  uint64_t heartbeats_ = 0;        // guarded by mu_
  uint64_t barriers_done_ = 0;     // guarded by mu_
  bool grouped_ = false;           // guarded by mu_: node-level reduction (workers push as nodes)
  uint64_t workers_removed_ = 0;   // guarded by mu_: --on-worker-loss continue
  uint64_t workers_rejoined_ = 0;  // guarded by mu_
  uint64_t servers_joined_ = 0;    // guarded by mu_
  uint32_t joining_rank_ = kNoServer;  // guarded by mu_: the server joining now, if one is
  // guarded by mu_: servers that registered to join while another joined or a worker rejoined
  struct WaitingJoin {
    std::shared_ptr<transport::Connection> conn;
    uint64_t req = 0;
    RegisterRequest rq;
  };
  std::deque<WaitingJoin> waiting_joins_;
  ClusterView view_;  // guarded by mu_: the job's, once complete (rejoining workers)
  // guarded by mu_: chunks whose new backup is being copied, and on which server
  std::map<uint64_t, uint32_t> rebuilding_;
  uint64_t backups_rebuilt_ = 0;  // guarded by mu_
  // Checkpoints of the running job (Checkpoint), guarded by mu_: the one being taken, and counts.
  std::optional<CheckpointRun> ckpt_;
  uint64_t checkpoints_started_ = 0;
  uint64_t checkpoints_written_ = 0;
  uint64_t checkpoints_failed_ = 0;
  std::thread periodic_;   // --checkpoint-interval
  std::thread requested_;  // answering a kTakeCheckpoint
  bool requesting_ = false;
  metrics::RoleMetrics metrics_;
};

}  // namespace

Result<std::unique_ptr<Coordinator>> Coordinator::Start(const CoordinatorOptions& options) {
  SHARDPS_RETURN_IF_ERROR(options.Validate());
  auto c = std::make_unique<CoordinatorImpl>(options);
  SHARDPS_RETURN_IF_ERROR(c->Init());
  return std::unique_ptr<Coordinator>(std::move(c));
}

}  // namespace shardps
