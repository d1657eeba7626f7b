// The verbs backend (rdma-core): one-sided RDMA WRITE and READ on reliable-connected queue
// pairs, memory regions registered with ibv_reg_mr, completions polled from one completion
// queue per context, queue pairs connected through rdma_cm. Beside each queue pair runs a tcp
// connection (transport/tcp) that authenticates the peer, carries the messages and the
// backend's control (hello, key revocation) and notices a peer's death. See
// docs/transports.md, "verbs".
//
// Files: context_impl (this: the context, its loop thread, its regions), connection_impl (a
// connection). Every verbs and rdma_cm call that touches a connection runs on the loop thread.
#pragma once

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "transport/context.h"
#include "transport/revocation.h"
#include "transport/task_queue.h"
#include "transport/tcp_side.h"

namespace shardps::transport::verbs {

// The size of a receive buffer: the largest message that travels as a SEND, with its header.
inline constexpr uint32_t kRecvSlotBytes = 1024;
// Receive work requests carry this bit in their id (send work requests carry operation ids).
inline constexpr uint64_t kReceiveBit = 1ull << 63;

// Whether the verbs backend can run here: an RDMA device (the one VERBS_DEVICE names, or the
// first with an active port) and rdma_cm; the reason ibv_get_device_list or rdma_cm gives when
// not.
Viability Check(const ContextOptions& options);
Result<std::unique_ptr<Context>> CreateVerbsContext(const ContextOptions& options);

// The process's locked-memory limit (RLIMIT_MEMLOCK), "unlimited" or "64 KiB", for errors.
std::string MemlockLimit();

class VerbsConnection;

// A registered memory region's registration; shared by the region and by the operations in
// flight that use it as their local memory, so it is deregistered only after they finished.
struct Registration {
  ibv_mr* mr = nullptr;
  void* mapped = nullptr;  // memory this backend mmap'd for the region (AllocateRegion)
  size_t mapped_size = 0;
  ~Registration();
};

// The loop thread: runs queued tasks, polls the completion queue (busy-polling busy_poll after
// the last event, then sleeping on the completion channel) and handles rdma_cm events.
struct Shared {
  ContextOptions options;
  ibv_context* device = nullptr;  // from rdma_get_devices: the one rdma_cm ids resolve to
  std::string device_name;
  ibv_device_attr device_attr{};
  uint8_t rd_atom = 1;              // RDMA READs in flight per queue pair, each way
  uint32_t max_piece = 1u << 30;    // bytes one work request moves (the port's max_msg_sz)
  ibv_context** devices = nullptr;  // rdma_get_devices' list (freed at the end)
  ibv_pd* pd = nullptr;
  ibv_comp_channel* channel = nullptr;
  ibv_cq* cq = nullptr;
  int cq_size = 0;
  rdma_event_channel* events = nullptr;
  // Messages sent on queue pairs land in one shared receive queue of the context: srq_slots
  // buffers of kRecvSlotBytes in one registered block, reposted as soon as each is read.
  ibv_srq* srq = nullptr;
  int srq_slots = 0;
  std::shared_ptr<Registration> recv_block;
  uint8_t* recv_buffers = nullptr;
  uint32_t max_inline = 0;  // inline bytes a SEND may carry (the queue pairs' max_inline_data)
  TcpSide tcp;

  // Loop thread.
  std::thread thread;
  LoopThread thread_id;
  TaskQueue tasks;
  std::atomic<bool> stop{false};
  int wake = -1, epfd = -1;
  // Send work requests posted and not completed, all queue pairs (at most cq_size minus the
  // receive queue's slots, whose completions share the completion queue).
  int outstanding = 0;
  std::unordered_map<uint32_t, std::weak_ptr<VerbsConnection>> by_qp;        // qp_num
  std::unordered_map<rdma_cm_id*, std::weak_ptr<VerbsConnection>> by_cm_id;  // connecting ids
  std::vector<std::weak_ptr<VerbsConnection>> backlogged;  // have work waiting for room
  std::vector<std::shared_ptr<VerbsConnection>> closing;   // flushing their queue pairs

  std::mutex mu;
  uint64_t next_region = 1;                                               // guarded by mu
  std::vector<std::weak_ptr<VerbsConnection>> conns;                      // guarded by mu
  std::unordered_map<uint64_t, std::weak_ptr<VerbsConnection>> by_token;  // guarded by mu
  // Registered regions by address, for the local key of an operation's local memory.
  struct Local {
    size_t size;
    std::shared_ptr<Registration> reg;
  };
  std::map<uintptr_t, Local> locals;  // guarded by mu
  uint64_t next_token = 1;            // guarded by mu: connection tokens
  Revocations revocations;

  ~Shared();
  bool Post(std::function<void()> fn);
  bool InThread() const { return thread_id.IsCurrent(); }
  void Run();
  void Wake();
  // Loop thread: polls the completion queue once; true if anything completed.
  bool PollCompletions();
  // Loop thread: handles the rdma_cm events waiting; true if there were any.
  bool HandleCmEvents();
  // Posts receive buffer `slot` to the shared receive queue; false when that fails.
  bool PostReceive(int slot);
  // Loop thread: lets backlogged connections post what now fits.
  void Pump();
  void Revoke(uint64_t region);
  // The registration whose region holds [p, p + n), or null.
  std::shared_ptr<Registration> FindLocal(const void* p, size_t n);
};

class VerbsRegion final : public MemoryRegion {
 public:
  VerbsRegion(std::shared_ptr<Shared> s, uint64_t id, void* data, size_t size,
              std::shared_ptr<Registration> reg, RemoteKey key)
      : shared_(std::move(s)),
        id_(id),
        data_(data),
        size_(size),
        reg_(std::move(reg)),
        key_(std::move(key)) {}
  ~VerbsRegion() override;
  void* data() const override { return data_; }
  size_t size() const override { return size_; }
  const RemoteKey& remote_key() const override { return key_; }

 private:
  std::shared_ptr<Shared> shared_;
  uint64_t id_;
  void* data_;
  size_t size_;
  std::shared_ptr<Registration> reg_;
  RemoteKey key_;
};

}  // namespace shardps::transport::verbs
