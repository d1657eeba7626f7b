#include "transport/ucx/context_impl.h"

#include <cstdio>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/keys.h"
#include "transport/ucx/connection_impl.h"

namespace shardps::transport::ucx {

UcxRegion::~UcxRegion() {
  // Peers learn first that the key is dead (and stop using it), then the memory goes.
  shared_->Revoke(id_);
  auto s = shared_;
  ucp_mem_h mh = entry_.mh;
  bool ran = s->progress.Call<bool>(
      [s, mh] {
        ucp_mem_unmap(s->ctx, mh);
        return true;
      },
      false);
  if (!ran) ucp_mem_unmap(s->ctx, mh);  // the progress thread is gone already
}

void Shared::Revoke(uint64_t region) {
  std::vector<std::shared_ptr<UcxConnection>> live;
  {
    std::lock_guard<std::mutex> lock(mu);
    live = LiveConnections(&conns);
  }
  revocations.Revoke(live, kRevoke, region, kRevokeWait);
}

namespace {

class UcxContext final : public Context {
 public:
  explicit UcxContext(std::shared_ptr<Shared> s) : shared_(std::move(s)) {}
  ~UcxContext() override {
    // The tcp side closes every connection; their shutdowns run on the progress thread.
    shared_->tcp.Reset();
    shared_->progress.Stop();
    std::vector<std::weak_ptr<UcxConnection>> conns;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      conns.swap(shared_->conns);
    }
    shared_->progress.Destroy();
  }

  std::string backend() const override { return "ucx"; }

  Result<std::unique_ptr<Listener>> Listen(const std::string& address,
                                           AcceptHandler on_accept) override {
    auto shared = shared_;
    return shared_->tcp->Listen(address,
                                [shared, on_accept](const std::shared_ptr<Connection>& tcp_conn) {
                                  auto c = std::make_shared<UcxConnection>(shared);
                                  c->Register();
                                  ConnectionHandlers user = on_accept(c);
                                  c->Attach(tcp_conn, std::move(user));
                                  return c->TcpHandlers();
                                });
  }

  Result<std::shared_ptr<Connection>> Connect(const std::string& address,
                                              ConnectionHandlers handlers,
                                              std::chrono::milliseconds timeout) override {
    auto c = std::make_shared<UcxConnection>(shared_);
    c->Register();
    auto tcp_conn = shared_->tcp->Connect(address, c->TcpHandlers(), timeout);
    if (!tcp_conn.ok()) return tcp_conn.status();
    c->Attach(*tcp_conn, std::move(handlers));
    Status wired = c->WaitWiredUp(timeout);
    if (!wired.ok()) {
      c->Close();
      return wired;
    }
    return std::shared_ptr<Connection>(c);
  }

  Result<std::unique_ptr<MemoryRegion>> AllocateRegion(size_t size) override {
    return Map(nullptr, size, MemoryKind::kHost);
  }

  // Over shared memory, memory UCX did not allocate is reached through its slower paths (cma,
  // or emulation that needs the owner's progress); AllocateRegion is the truly one-sided kind.
  Result<std::unique_ptr<MemoryRegion>> RegisterRegion(void* ptr, size_t size,
                                                       MemoryKind kind) override {
    if (!CanRegister(kind))
      return Status::InvalidArgument(fmt::format(
          "this UCX cannot register {} memory (built without its support); stage it through "
          "host memory",
          MemoryKindName(kind)));
    if (ptr == nullptr) return Status::InvalidArgument("registering a null pointer");
    return Map(ptr, size, kind);
  }

  bool InLoopThread() const override { return shared_->progress.InThread(); }
  bool RunInLoop(std::function<void()> fn) override {
    return shared_->progress.Post(std::move(fn));
  }
  std::shared_ptr<void> HoldPolling() override { return shared_->progress.HoldPolling(); }
  std::chrono::microseconds busy_poll() const override { return shared_->options.busy_poll; }
  // The control connections are tcp and carry the handshake (transport/auth.h).
  uint64_t refused_peers() const override { return shared_->tcp.refused_peers(); }

  bool CanRegisterGpuMemory() const override {
    ucp_context_attr_t a{};
    a.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(shared_->ctx, &a) != UCS_OK) return false;
    return (a.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
  }

 private:
  // Maps `size` bytes: allocated by UCX (ptr null, zero-filled) or the caller's at `ptr`.
  Result<std::unique_ptr<MemoryRegion>> Map(void* ptr, size_t size, MemoryKind kind) {
    auto s = shared_;
    using R = Result<std::unique_ptr<MemoryRegion>>;
    return s->progress.Call<R>(
        [s, ptr, size, kind]() -> R {
          ucp_mem_map_params_t mp{};
          mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                          UCP_MEM_MAP_PARAM_FIELD_FLAGS;
          mp.address = ptr;
          mp.length = size == 0 ? 1 : size;
          mp.flags = ptr == nullptr ? UCP_MEM_MAP_ALLOCATE : 0;  // UCX allocates: one-sided
          if (kind == MemoryKind::kCuda) {
            mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
            mp.memory_type = UCS_MEMORY_TYPE_CUDA;
          }
          ucp_mem_h mh = nullptr;
          ucs_status_t st = ucp_mem_map(s->ctx, &mp, &mh);
          if (st != UCS_OK) return FromUcs(fmt::format("ucp_mem_map of {} bytes", size), st);
          ucp_mem_attr_t ma{};
          ma.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
          ucp_mem_query(mh, &ma);
          void* rk = nullptr;
          size_t rkl = 0;
          st = ucp_rkey_pack(s->ctx, mh, &rk, &rkl);
          if (st != UCS_OK) {
            ucp_mem_unmap(s->ctx, mh);
            return FromUcs("ucp_rkey_pack", st);
          }
          if (ptr == nullptr) std::memset(ma.address, 0, size);
          uint64_t id;
          {
            std::lock_guard<std::mutex> lock(s->mu);
            id = s->next_region++;
          }
          RemoteKey key = PackKey(id, reinterpret_cast<uint64_t>(ma.address), size, rk, rkl);
          ucp_rkey_buffer_release(rk);
          return std::unique_ptr<MemoryRegion>(
              new UcxRegion(s, id, RegionEntry{mh, ma.address, size, kind}, std::move(key)));
        },
        R(Status::Aborted("transport context is shutting down")));
  }

  std::shared_ptr<Shared> shared_;
};

}  // namespace

Viability Check(const ContextOptions& options) {
  auto ctx = MakeUcpContext(options);
  if (!ctx.ok()) return {false, ctx.status().message()};
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h w = nullptr;
  ucs_status_t st = ucp_worker_create(*ctx, &wp, &w);
  if (st == UCS_OK) ucp_worker_destroy(w);
  ucp_cleanup(*ctx);
  if (st != UCS_OK) return {false, std::string("ucp_worker_create: ") + ucs_status_string(st)};
  return {true, std::string("UCX ") + ucp_get_version_string()};
}

Result<std::unique_ptr<Context>> CreateUcxContext(const ContextOptions& options) {
  auto s = std::make_shared<Shared>();
  s->options = options;
  if (!s->options.inbound_budget)
    s->options.inbound_budget = std::make_shared<InboundBudget>(options.process_inbound_bytes);
  auto ctx = MakeUcpContext(options);
  if (!ctx.ok()) return ctx.status();
  s->ctx = *ctx;
  SHARDPS_RETURN_IF_ERROR(s->progress.Start(s->ctx, options.name + "-ucx", options.busy_poll));
  Shared* raw = s.get();
  Status am = s->progress.Call<Status>(
      [raw] {
        ucp_am_handler_param_t hp{};
        hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                        UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
        hp.id = kAmId;
        hp.flags = UCP_AM_FLAG_WHOLE_MSG;
        hp.cb = OnAmMessage;
        hp.arg = raw;
        ucs_status_t st = ucp_worker_set_am_recv_handler(raw->progress.worker(), &hp);
        return st == UCS_OK ? Status::OK() : FromUcs("ucp_worker_set_am_recv_handler", st);
      },
      Status::Aborted("progress thread stopped"));
  if (!am.ok()) {
    s->progress.Stop();
    s->progress.Destroy();
    return am;
  }
  ContextOptions tcp_opts = options;
  tcp_opts.name = options.name + "-ctl";
  auto tcp = CreateContext("tcp", tcp_opts);
  if (!tcp.ok()) return tcp.status();
  s->tcp.Set(std::move(tcp).value());
  return std::unique_ptr<Context>(new UcxContext(std::move(s)));
}

UcxInfo QueryUcx(const ContextOptions& options) {
  UcxInfo info;
  info.version = ucp_get_version_string();
  auto ctx = MakeUcpContext(options);
  if (!ctx.ok()) {
    info.error = ctx.status().message();
    return info;
  }
  ucp_context_attr_t a{};
  a.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(*ctx, &a) == UCS_OK)
    info.cuda_memory = (a.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
  char* buf = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&buf, &len);
  if (f) {
    ucp_context_print_info(*ctx, f);
    std::fclose(f);
    info.transports.assign(buf, len);
    std::free(buf);
  }
  ucp_cleanup(*ctx);
  return info;
}

}  // namespace shardps::transport::ucx
