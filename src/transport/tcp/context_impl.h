// The tcp backend: an epoll loop thread, non-blocking sockets, and one-sided operations that
// the target's loop thread serves against its registered regions (docs/transports.md).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <unordered_map>

#include "transport/context.h"
#include "transport/tcp/loop.h"

namespace shardps::transport::tcp {

class TcpConnection;
struct Handshake;

// Memory of one registered region. Freed when the region is deregistered and no operation
// that was already in flight still refers to it.
struct RegionMemory {
  explicit RegionMemory(size_t n);                // allocated (and freed) here
  RegionMemory(uint8_t* caller_owned, size_t n);  // registered: the caller frees it
  ~RegionMemory();
  uint8_t* data = nullptr;
  size_t size = 0;
  bool owned = true;
  uint64_t id = 0;
  uint64_t secret = 0;
};

// State shared by the context, its connections and its regions. Outlives the Context object
// while connections that users still hold refer to it.
struct Shared {
  ContextOptions options;
  Loop loop;

  std::mutex regions_mu;
  std::unordered_map<uint64_t, std::shared_ptr<RegionMemory>> regions;  // guarded by regions_mu
  uint64_t next_region_id = 1;                                          // guarded by regions_mu
  std::mt19937_64 rng{std::random_device{}()};                          // guarded by regions_mu

  // Loop thread only: open connections (kept alive until closed) and listening sockets.
  std::set<std::shared_ptr<TcpConnection>> connections;
  // Loop thread only: accepted connections still proving the secret, by socket.
  std::unordered_map<int, std::shared_ptr<Handshake>> handshakes;
  std::atomic<uint64_t> refused_peers{0};

  // Finds the region for a packed key whose bytes [offset, offset + len) a `what` ("write",
  // "read") may touch; InvalidArgument with the reason otherwise (unknown or stale key, a range
  // outside the region).
  Result<std::shared_ptr<RegionMemory>> Lookup(uint64_t id, uint64_t secret, uint64_t offset,
                                               uint64_t len, const char* what);
  void Deregister(uint64_t id);
};

class TcpContext final : public Context {
 public:
  static Result<std::unique_ptr<TcpContext>> Create(const ContextOptions& options);
  ~TcpContext() override;

  std::string backend() const override { return "tcp"; }
  Result<std::unique_ptr<Listener>> Listen(const std::string& address,
                                           AcceptHandler on_accept) override;
  Result<std::shared_ptr<Connection>> Connect(const std::string& address,
                                              ConnectionHandlers handlers,
                                              std::chrono::milliseconds timeout) override;
  Result<std::unique_ptr<MemoryRegion>> AllocateRegion(size_t size) override;
  // Host memory only: the loop thread copies the bytes of one-sided requests itself.
  Result<std::unique_ptr<MemoryRegion>> RegisterRegion(void* ptr, size_t size,
                                                       MemoryKind kind) override;
  bool CanRegister(MemoryKind kind) const override { return kind == MemoryKind::kHost; }
  bool OneSidedInOrder() const override { return true; }
  bool InLoopThread() const override { return shared_->loop.InLoop(); }
  bool RunInLoop(std::function<void()> fn) override { return shared_->loop.Defer(std::move(fn)); }
  uint64_t refused_peers() const override { return shared_->refused_peers.load(); }

 private:
  explicit TcpContext(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}
  Result<std::unique_ptr<MemoryRegion>> Register(std::shared_ptr<RegionMemory> mem);
  std::shared_ptr<Shared> shared_;
};

// Runs `fn` on the loop thread and waits for it (inline when already there).
Status RunOnLoop(Loop& loop, const std::function<Status()>& fn);
// Applies socket options (TCP_NODELAY, buffer sizes).
void TuneSocket(int fd, const ContextOptions& options);

}  // namespace shardps::transport::tcp
