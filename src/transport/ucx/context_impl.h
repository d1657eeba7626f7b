// The ucx backend: one-sided RMA through UCP (ucp_put_nbx / ucp_get_nbx on memory that UCX
// allocates with ucp_mem_map), messages as UCP active messages, with a tcp channel beside it
// for connection set-up and control (worker addresses, key revocation). Files as in tcp/:
// loop (the progress thread), context_impl (the context, its shared state and regions),
// connection_impl (a connection), keys (remote keys). See docs/transports.md.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport/context.h"
#include "transport/revocation.h"
#include "transport/tcp_side.h"
#include "transport/ucx/loop.h"

namespace shardps::transport::ucx {

// Whether UCX can run here (a context and a worker can be created), and why not.
Viability Check(const ContextOptions& options);

Result<std::unique_ptr<Context>> CreateUcxContext(const ContextOptions& options);

// UCX facts for `shardps doctor`: version, transports a context would use, memory types.
struct UcxInfo {
  std::string version;
  bool cuda_memory = false;  // the context can register CUDA memory (GPUDirect RDMA)
  std::string transports;    // what UCX reports for this configuration
  std::string error;         // why no context could be made (empty when fine)
};
UcxInfo QueryUcx(const ContextOptions& options);

class UcxConnection;

struct RegionEntry {
  ucp_mem_h mh = nullptr;
  void* address = nullptr;
  size_t size = 0;
  MemoryKind kind = MemoryKind::kHost;
};

struct Shared {
  ContextOptions options;
  ucp_context_h ctx = nullptr;
  Progress progress;
  TcpSide tcp;

  std::mutex mu;
  uint64_t next_region = 1;                                          // guarded by mu
  std::vector<std::weak_ptr<UcxConnection>> conns;                   // guarded by mu
  uint64_t next_conn = 1;                                            // guarded by mu
  std::unordered_map<uint64_t, std::weak_ptr<UcxConnection>> by_id;  // guarded by mu
  Revocations revocations;

  ~Shared() {
    if (ctx) ucp_cleanup(ctx);
  }
  void Revoke(uint64_t region);
};

class UcxRegion final : public MemoryRegion {
 public:
  UcxRegion(std::shared_ptr<Shared> s, uint64_t id, RegionEntry e, RemoteKey key)
      : shared_(std::move(s)), id_(id), entry_(e), key_(std::move(key)) {}
  ~UcxRegion() override;
  void* data() const override { return entry_.address; }
  size_t size() const override { return entry_.size; }
  const RemoteKey& remote_key() const override { return key_; }
  MemoryKind kind() const override { return entry_.kind; }

 private:
  std::shared_ptr<Shared> shared_;
  uint64_t id_;
  RegionEntry entry_;
  RemoteKey key_;
};

}  // namespace shardps::transport::ucx
