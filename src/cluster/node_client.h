// A node's link to the coordinator: registration, heartbeats, barriers, tensor placement,
// goodbye, and the job-failure notice. Used by servers and workers alike.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cluster/messages.h"
#include "cluster/rpc.h"
#include "transport/context.h"

namespace shardps::cluster {

struct NodeClientOptions {
  std::string coordinator;  // host:port
  Role role = Role::kWorker;
  int32_t rank = -1;
  std::string data_address;  // servers: where workers reach them
  std::string transport = "tcp";
  // Workers: node-level reduction (RegisterRequest).
  std::string node;
  int32_t local_rank = -1;
  uint32_t local_size = 1;
  std::chrono::milliseconds connect_timeout{30000};
  std::chrono::milliseconds register_timeout{120000};
  std::chrono::milliseconds rpc_timeout{60000};
  // Called on a transport thread, in order, for each server the coordinator declared dead and
  // replaced by its chunks' backups (kServerDown; docs/fault-tolerance.md). May be called before
  // Connect returns.
  std::function<void(const ServerDown&)> on_server_down;
  // Servers: worker `rank` was removed from the job (kWorkerDown; docs/fault-tolerance.md).
  std::function<void(const WorkerDown&)> on_worker_down;
  // Servers: removed worker `rank` rejoins the job (kWorkerUp); the server answers with
  // ReportWorkerRestored once its chunks wait for it. In order with on_worker_down.
  std::function<void(const WorkerUp&)> on_worker_up;
  // Servers: copy these chunks, of which this server is the primary, to new backups
  // (kRebuildBackups). Workers: these chunks have a new backup (kBackupsAdded). Both in order,
  // on the same transport thread as on_server_down.
  std::function<void(const BackupOrders&)> on_rebuild_backups;
  std::function<void(const BackupOrders&)> on_backups_added;
  // Workers: a checkpoint of the running job begins (kCheckpointGate: the answer is sent back as
  // kCheckpointCounts), its cuts are known (kCheckpointCuts; worker 0 reports how it ended with
  // `report`, from any thread), it is over (kCheckpointRelease). In order, on the same thread.
  std::function<CheckpointCounts(const CheckpointGate&)> on_checkpoint_gate;
  std::function<void(const CheckpointCuts&, std::function<void(const CheckpointDone&)> report)>
      on_checkpoint_cuts;
  std::function<void(const CheckpointGate&)> on_checkpoint_release;
  // Servers and workers: a server joined the running job (kServerJoined). The node connects to
  // it and says so with `report` (kServerReached; from any thread, once). On the same thread,
  // in order with on_server_down.
  std::function<void(const ServerJoined&, std::function<void(const ServerReached&)> report)>
      on_server_joined;
};

class NodeClient {
 public:
  // Called once, on a transport thread, when the job failed (a node died, the coordinator
  // went away) or the coordinator asked this node to shut down (`shutdown` true, OK status).
  using EventHandler = std::function<void(Status why, bool shutdown)>;

  // Connects and registers; blocks until every node of the job registered (the view is
  // complete) or the registration timeout passed.
  static Result<std::unique_ptr<NodeClient>> Connect(transport::Context* ctx,
                                                     const NodeClientOptions& options,
                                                     EventHandler on_event);
  ~NodeClient();  // stops heartbeats and closes the connection

  const RegisterReply& info() const { return info_; }
  // Waits until every worker entered barrier `name`, at most `timeout`.
  Status Barrier(const std::string& name, std::chrono::milliseconds timeout);
  // Asks the coordinator where each tensor's chunks live.
  Result<std::vector<TensorPlacement>> Declare(const std::vector<DeclareItem>& items);
  // Tells the coordinator this node finished cleanly.
  Status Goodbye();
  // Tells the coordinator this node failed (the job then fails, naming it).
  void ReportFailure(const std::string& why);
  // Servers: tells the coordinator how rebuilding a chunk's backup ended (kBackupRebuilt).
  void ReportBackupRebuilt(const BackupRebuilt& b);
  // Servers: this server's chunks wait for rejoined worker `rank` again (kWorkerRestored).
  void ReportWorkerRestored(uint32_t rank);

  // The failure seen so far (OK while the job is healthy).
  Status failure() const;
  // Heartbeats sent so far.
  uint64_t heartbeats_sent() const { return heartbeats_sent_.load(std::memory_order_relaxed); }

 private:
  // Shared with the connection's handlers, which may run after this object is gone.
  struct Events {
    std::mutex mu;
    EventHandler handler;
    bool fired = false;         // guarded by mu
    bool said_goodbye = false;  // guarded by mu
    Status failure;             // guarded by mu
    // When the coordinator's last heartbeat echo arrived (steady clock, ns).
    std::atomic<int64_t> last_heard{0};
    void Fire(Status why, bool shutdown);
  };

  NodeClient() = default;
  void HeartbeatLoop();

  NodeClientOptions opt_;
  std::shared_ptr<RpcChannel> rpc_;
  std::shared_ptr<Events> events_ = std::make_shared<Events>();
  RegisterReply info_;
  bool registered_ = false;  // guarded by mu_: info_ holds the view (and its heartbeat timeout)
  std::thread heartbeat_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
  std::atomic<uint64_t> heartbeats_sent_{0};
};

}  // namespace shardps::cluster
