#include "cluster/node_client.h"

#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace shardps::cluster {

namespace {
// A notice (request id 0, no reply) to the coordinator.
template <typename Msg>
void SendNotice(const std::shared_ptr<transport::Connection>& c, uint32_t tag, const Msg& msg) {
  Bytes meta;
  Writer w(&meta);
  w.Put<uint64_t>(0);
  msg.Encode(&w);
  c->Send(tag, std::move(meta), {}, nullptr);
}
}  // namespace
namespace {

int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<std::unique_ptr<NodeClient>> NodeClient::Connect(transport::Context* ctx,
                                                        const NodeClientOptions& options,
                                                        EventHandler on_event) {
  std::unique_ptr<NodeClient> nc(new NodeClient());
  nc->opt_ = options;
  nc->events_->handler = std::move(on_event);
  NodeClient* self = nc.get();
  auto events = nc->events_;
  auto rpc_slot = std::make_shared<std::shared_ptr<RpcChannel>>();
  transport::ConnectionHandlers h;
  h.on_message = [events, rpc_slot, down = options.on_server_down,
                  worker_down = options.on_worker_down, worker_up = options.on_worker_up,
                  rebuild = options.on_rebuild_backups, added = options.on_backups_added,
                  gate = options.on_checkpoint_gate, cuts = options.on_checkpoint_cuts,
                  release = options.on_checkpoint_release, joined = options.on_server_joined](
                     const std::shared_ptr<transport::Connection>& c, transport::Message m) {
    auto rpc = *rpc_slot;
    if (m.tag == kReply) {
      if (rpc && !rpc->OnReply(m)) {
        spdlog::error("unexpected reply from the coordinator; closing");
        c->Close();
      }
      return;
    }
    if (m.tag == kHeartbeat) {  // the coordinator's echo: it is alive
      events->last_heard.store(SteadyNanos(), std::memory_order_relaxed);
      return;
    }
    Reader r(m.meta.data(), m.meta.size());
    uint64_t req = 0;
    std::string why;
    // A notice (request id 0) decoded and handed to its handler, or the connection closed.
    auto notice = [&](auto msg, const char* what, const auto& fn) {
      if (!r.Get(&req) || !msg.Decode(&r) || !r.done()) {
        spdlog::error("malformed {} from the coordinator; closing", what);
        c->Close();
        return;
      }
      if (fn) fn(msg);
    };
    switch (m.tag) {
      case kServerDown:
        return notice(ServerDown{}, "server-down notice", down);
      case kWorkerDown:
        return notice(WorkerDown{}, "worker-down notice", worker_down);
      case kWorkerUp:
        return notice(WorkerUp{}, "worker-up notice", worker_up);
      case kRebuildBackups:
        return notice(BackupOrders{}, "backup orders", rebuild);
      case kBackupsAdded:
        return notice(BackupOrders{}, "backup orders", added);
      case kCheckpointGate: {
        std::function<void(const CheckpointGate&)> answer;
        if (gate)
          answer = [&](const CheckpointGate& g) { SendNotice(c, kCheckpointCounts, gate(g)); };
        return notice(CheckpointGate{}, "checkpoint notice", answer);
      }
      case kCheckpointCuts: {
        std::function<void(const CheckpointCuts&)> take;
        if (cuts)
          take = [&](const CheckpointCuts& k) {
            cuts(k, [conn = c](const CheckpointDone& d) { SendNotice(conn, kCheckpointDone, d); });
          };
        return notice(CheckpointCuts{}, "checkpoint cuts", take);
      }
      case kCheckpointRelease:
        return notice(CheckpointGate{}, "checkpoint release", release);
      case kServerJoined: {
        std::function<void(const ServerJoined&)> reach;
        if (joined)
          reach = [&](const ServerJoined& j) {
            joined(j, [conn = c](const ServerReached& s) { SendNotice(conn, kServerReached, s); });
          };
        return notice(ServerJoined{}, "server-joined notice", reach);
      }
      default:
        break;
    }
    if (!r.Get(&req) || !r.GetString(&why, 65536)) {
      c->Close();
      return;
    }
    if (m.tag == kNodeFailed) {
      Status st = Status::Aborted("job failed: " + why);
      if (rpc) rpc->FailAll(st);  // e.g. a registration still waiting for missing nodes
      events->Fire(st, false);
    }
    if (m.tag == kShutdown) events->Fire(Status::OK(), true);
  };
  h.on_close = [events, rpc_slot](const std::shared_ptr<transport::Connection>&, Status st) {
    Status why = Status::Unavailable("lost the connection to the coordinator" +
                                     (st.ok() ? std::string() : ": " + st.message()));
    if (auto rpc = *rpc_slot) rpc->FailAll(why);
    events->Fire(why, false);
  };
  auto conn = ctx->Connect(options.coordinator, h, options.connect_timeout);
  if (!conn.ok()) return conn.status().WithContext("cannot reach the coordinator");
  nc->rpc_ = std::make_shared<RpcChannel>(*conn);
  *rpc_slot = nc->rpc_;

  nc->heartbeat_ = std::thread([self] { self->HeartbeatLoop(); });

  RegisterRequest rq;
  rq.role = options.role;
  rq.rank = options.rank;
  rq.data_address = options.data_address;
  rq.transport = options.transport;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  rq.host = host;
  rq.pid = static_cast<uint32_t>(getpid());
  rq.node = options.node;
  rq.local_rank = options.local_rank;
  rq.local_size = options.local_size;
  Bytes body;
  Writer w(&body);
  rq.Encode(&w);
  auto rep = CallSync(*nc->rpc_, kRegister, body, options.register_timeout,
                      fmt::format("registering {} with the coordinator at {}",
                                  RoleName(options.role), options.coordinator));
  if (!rep.ok()) return rep.status();
  Reader r(rep->data(), rep->size());
  RegisterReply info;
  if (!info.Decode(&r)) return Status::ProtocolError("malformed register reply");
  {
    std::lock_guard<std::mutex> lock(nc->mu_);  // the heartbeat thread reads it
    nc->info_ = std::move(info);
    nc->registered_ = true;
    nc->events_->last_heard.store(SteadyNanos(), std::memory_order_relaxed);
  }
  return nc;
}

NodeClient::~NodeClient() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (heartbeat_.joinable()) heartbeat_.join();
  {
    std::lock_guard<std::mutex> lock(events_->mu);
    events_->handler = nullptr;  // nothing fires into a destroyed owner
  }
  if (rpc_) rpc_->connection().Close();
}

void NodeClient::HeartbeatLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  int64_t woke = SteadyNanos();
  while (!stop_) {
    uint32_t ms = info_.view.heartbeat_ms ? info_.view.heartbeat_ms : 500;
    cv_.wait_for(lock, std::chrono::milliseconds(ms / 2 + 1));
    if (stop_) continue;
    // How long this thread itself did not run: a process that was paused (SIGSTOP) longer than
    // the heartbeat timeout was the silent one, not the coordinator.
    const int64_t now = SteadyNanos();
    const int64_t paused_ms = (now - woke) / 1000000;
    woke = now;
    Bytes meta;
    Writer w(&meta);
    w.Put<uint64_t>(0);
    rpc_->connection().Send(kHeartbeat, std::move(meta), {}, nullptr);
    heartbeats_sent_.fetch_add(1, std::memory_order_relaxed);
    // The coordinator echoes every heartbeat: one silent for the heartbeat timeout is stopped,
    // hung or cut off, and this node ends naming it rather than waiting on it for ever.
    if (!registered_ || info_.view.heartbeat_timeout_ms == 0) continue;
    const int64_t silent_ms =
        (SteadyNanos() - events_->last_heard.load(std::memory_order_relaxed)) / 1000000;
    if (silent_ms <= static_cast<int64_t>(info_.view.heartbeat_timeout_ms)) continue;
    Status why =
        paused_ms > static_cast<int64_t>(info_.view.heartbeat_timeout_ms)
            ? Status::Unavailable(fmt::format(
                  "this process did not run for {} ms (stopped or starved; heartbeat timeout {} "
                  "ms): the coordinator at {} has declared it dead, and the job went on without "
                  "it or ended",
                  paused_ms, info_.view.heartbeat_timeout_ms, opt_.coordinator))
            : Status::Unavailable(fmt::format(
                  "the coordinator at {} has not answered heartbeats for {} ms (heartbeat timeout "
                  "{} ms): it is stopped, hung or unreachable",
                  opt_.coordinator, silent_ms, info_.view.heartbeat_timeout_ms));
    lock.unlock();
    rpc_->FailAll(why);
    events_->Fire(why, false);
    lock.lock();
    return;
  }
}

void NodeClient::Events::Fire(Status why, bool shutdown) {
  EventHandler cb;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (fired) return;
    if (said_goodbye && !shutdown && why.IsUnavailable()) return;  // normal end of the job
    fired = true;
    if (!shutdown) failure = why;
    cb = handler;
  }
  if (!shutdown) spdlog::error("{}", why.ToString());
  if (cb) cb(why, shutdown);
}

Status NodeClient::failure() const {
  std::lock_guard<std::mutex> lock(events_->mu);
  return events_->failure;
}

Status NodeClient::Barrier(const std::string& name, std::chrono::milliseconds timeout) {
  Bytes body;
  Writer w(&body);
  BarrierRequest{name, static_cast<uint64_t>(timeout.count())}.Encode(&w);
  auto rep = CallSync(*rpc_, kBarrier, body, timeout + std::chrono::milliseconds(2000),
                      "barrier '" + name + "'");
  return rep.status();
}

Result<std::vector<TensorPlacement>> NodeClient::Declare(const std::vector<DeclareItem>& items) {
  Bytes body;
  Writer w(&body);
  DeclareRequest{items}.Encode(&w);
  auto rep = CallSync(*rpc_, kDeclare, body, opt_.rpc_timeout, "declaring tensors");
  if (!rep.ok()) return rep.status();
  Reader r(rep->data(), rep->size());
  DeclareReply reply;
  // (Servers that joined the running job have ranks past the view this node registered with:
  // the worker checks each placement against the servers it reached.)
  if (!reply.Decode(&r, kMaxServers) || !r.done() || reply.tensors.size() != items.size())
    return Status::ProtocolError("malformed declare reply");
  return std::move(reply.tensors);
}

Status NodeClient::Goodbye() {
  {
    std::lock_guard<std::mutex> lock(events_->mu);
    events_->said_goodbye = true;
  }
  return CallSync(*rpc_, kGoodbye, {}, opt_.rpc_timeout, "saying goodbye").status();
}

void NodeClient::ReportFailure(const std::string& why) {
  Bytes meta;
  Writer w(&meta);
  w.Put<uint64_t>(0);
  w.PutString(why);
  rpc_->connection().Send(kReportFailure, std::move(meta), {}, nullptr);
}

void NodeClient::ReportBackupRebuilt(const BackupRebuilt& b) {
  SendNotice(rpc_->shared_connection(), kBackupRebuilt, b);
}

void NodeClient::ReportWorkerRestored(uint32_t rank) {
  SendNotice(rpc_->shared_connection(), kWorkerRestored, WorkerUp{rank});
}

}  // namespace shardps::cluster
