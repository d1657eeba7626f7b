#include "transport/verbs/context_impl.h"

#include <fcntl.h>
#include <netdb.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sched.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/keys.h"
#include "transport/verbs/connection_impl.h"

namespace shardps::transport::verbs {

std::string MemlockLimit() {
  rlimit r{};
  if (getrlimit(RLIMIT_MEMLOCK, &r) != 0) return "unknown";
  if (r.rlim_cur == RLIM_INFINITY) return "unlimited";
  return fmt::format("{} KiB", r.rlim_cur / 1024);
}

Registration::~Registration() {
  if (mr) ibv_dereg_mr(mr);
  if (mapped) munmap(mapped, mapped_size);
}

Shared::~Shared() {
  if (srq) ibv_destroy_srq(srq);
  recv_block.reset();
  if (cq) ibv_destroy_cq(cq);
  if (channel) ibv_destroy_comp_channel(channel);
  if (pd) ibv_dealloc_pd(pd);
  if (events) rdma_destroy_event_channel(events);
  if (devices) rdma_free_devices(devices);
  if (wake >= 0) close(wake);
  if (epfd >= 0) close(epfd);
}

bool Shared::Post(std::function<void()> fn) {
  bool first = false;
  if (!tasks.Push(std::move(fn), &first)) return false;
  if (first && !InThread()) Wake();
  return true;
}

void Shared::Wake() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wake, &one, sizeof(one));
}

bool Shared::PostReceive(int slot) {
  ibv_sge sge{};
  sge.addr =
      reinterpret_cast<uint64_t>(recv_buffers) + static_cast<uint64_t>(slot) * kRecvSlotBytes;
  sge.length = kRecvSlotBytes;
  sge.lkey = recv_block->mr->lkey;
  ibv_recv_wr wr{};
  wr.wr_id = kReceiveBit | static_cast<uint64_t>(slot);
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  return ibv_post_srq_recv(srq, &wr, &bad) == 0;
}

bool Shared::PollCompletions() {
  ibv_wc wc[32];
  int n = ibv_poll_cq(cq, 32, wc);
  if (n <= 0) return false;
  for (int i = 0; i < n; ++i) {
    if (wc[i].wr_id & kReceiveBit) {
      // A message in the shared receive queue: handed to its connection, the buffer reposted.
      int slot = static_cast<int>(wc[i].wr_id & ~kReceiveBit);
      auto it = by_qp.find(wc[i].qp_num);
      std::shared_ptr<VerbsConnection> c;
      if (it != by_qp.end()) c = it->second.lock();
      if (c && wc[i].status == IBV_WC_SUCCESS)
        c->OnReceive(recv_buffers + static_cast<size_t>(slot) * kRecvSlotBytes, wc[i].byte_len);
      // A failed receive (an oversized SEND, its queue pair gone to the error state) gives its
      // buffer back too: the shared queue must not drain.
      if (!PostReceive(slot))
        spdlog::error("[{}] cannot repost receive buffer {}: {}", options.name, slot,
                      std::strerror(errno));
      continue;
    }
    outstanding--;
    auto it = by_qp.find(wc[i].qp_num);
    if (it == by_qp.end()) continue;
    if (auto c = it->second.lock()) c->OnCompletion(wc[i]);
  }
  return true;
}

bool Shared::HandleCmEvents() {
  bool any = false;
  rdma_cm_event* ev = nullptr;
  while (rdma_get_cm_event(events, &ev) == 0) {
    any = true;
    rdma_cm_event_type type = ev->event;
    int status = ev->status;
    rdma_cm_id* id = ev->id;
    uint64_t token = 0;
    bool has_token = false;
    uint8_t their_initiator = 0, their_responder = 0;
    if (type == RDMA_CM_EVENT_CONNECT_REQUEST && ev->param.conn.private_data_len >= sizeof(token)) {
      std::memcpy(&token, ev->param.conn.private_data, sizeof(token));
      has_token = true;
      their_initiator = ev->param.conn.initiator_depth;
      their_responder = ev->param.conn.responder_resources;
    }
    rdma_ack_cm_event(ev);
    if (type == RDMA_CM_EVENT_CONNECT_REQUEST) {
      // A queue pair for a tcp connection this context accepted: its private data is the token
      // that connection's hello gave (over the authenticated tcp connection).
      std::shared_ptr<VerbsConnection> c;
      if (has_token) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = by_token.find(token);
        if (it != by_token.end()) c = it->second.lock();
      }
      if (!c) {
        spdlog::warn("[{}] RDMA connect request with an unknown token; rejected", options.name);
        rdma_reject(id, nullptr, 0);
        rdma_destroy_id(id);
        continue;
      }
      c->Accept(id, their_initiator, their_responder);
      continue;
    }
    auto it = by_cm_id.find(id);
    if (it == by_cm_id.end()) continue;
    if (auto c = it->second.lock()) c->OnCmEvent(type, status, id);
  }
  return any;
}

void Shared::Pump() {
  auto list = std::move(backlogged);
  backlogged.clear();
  for (auto& w : list)
    if (auto c = w.lock()) {
      c->Unlist();
      c->PostBacklog();
    }
}

void Shared::Run() {
  auto last = std::chrono::steady_clock::now();
  auto finish_closed = [this](bool force) {
    std::erase_if(closing, [force](const std::shared_ptr<VerbsConnection>& c) {
      return c->FinishClosing(force);
    });
  };
  while (!stop) {
    bool any = PollCompletions();
    any = HandleCmEvents() || any;
    any = tasks.Drain() || any;
    if (!backlogged.empty()) Pump();
    if (!closing.empty()) finish_closed(false);
    auto now = std::chrono::steady_clock::now();
    if (any) last = now;
    if (now - last < options.busy_poll) {
      sched_yield();
      continue;
    }
    if (!tasks.empty()) continue;
    ibv_req_notify_cq(cq, 0);
    if (PollCompletions()) continue;  // a completion came before the queue was armed
    epoll_event evs[4];
    int n = epoll_wait(epfd, evs, 4, closing.empty() ? 100 : 5);
    for (int i = 0; i < n; ++i) {
      if (evs[i].data.fd == wake) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = read(wake, &v, sizeof(v));
      } else if (evs[i].data.fd == channel->fd) {
        ibv_cq* ecq = nullptr;
        void* ectx = nullptr;
        while (ibv_get_cq_event(channel, &ecq, &ectx) == 0) ibv_ack_cq_events(ecq, 1);
      }
    }
  }
  // Tasks queued before the stop still run (their callbacks fire exactly once); closing
  // connections get a bounded time to flush, then are finished regardless.
  tasks.Drain();
  auto deadline = std::chrono::steady_clock::now() + kFlushWait;
  while (!closing.empty() && std::chrono::steady_clock::now() < deadline) {
    PollCompletions();
    HandleCmEvents();
    tasks.Drain();
    finish_closed(false);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  finish_closed(true);
  tasks.Drain();
}

void Shared::Revoke(uint64_t region) {
  std::vector<std::shared_ptr<VerbsConnection>> live;
  {
    std::lock_guard<std::mutex> lock(mu);
    live = LiveConnections(&conns);
  }
  revocations.Revoke(live, kRevoke, region, kRevokeWait);
}

std::shared_ptr<Registration> Shared::FindLocal(const void* p, size_t n) {
  auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(mu);
  auto it = locals.upper_bound(a);
  if (it == locals.begin()) return nullptr;
  --it;
  if (a + n > it->first + it->second.size) return nullptr;
  return it->second.reg;
}

VerbsRegion::~VerbsRegion() {
  // Peers learn first that the key is dead (and finish what they have in flight with it),
  // then the registration goes (after this side's own operations that use it ended).
  shared_->Revoke(id_);
  std::lock_guard<std::mutex> lock(shared_->mu);
  shared_->locals.erase(reinterpret_cast<uintptr_t>(data_));
}

namespace {

Status Errno(const std::string& what) {
  return Status::IOError(fmt::format("{}: {}", what, std::strerror(errno)));
}

// The addresses `host` (numeric or a name) and `port` stand for.
Result<addrinfo*> Resolve(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* ai = nullptr;
  std::string p = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), p.c_str(), &hints, &ai);
  if (rc != 0)
    return Status::InvalidArgument(fmt::format("cannot resolve {}: {}", host, gai_strerror(rc)));
  return ai;
}

bool AnyPortActive(ibv_context* ctx) {
  ibv_device_attr attr{};
  if (ibv_query_device(ctx, &attr) != 0) return false;
  for (int p = 1; p <= attr.phys_port_cnt; ++p) {
    ibv_port_attr pa{};
    if (ibv_query_port(ctx, static_cast<uint8_t>(p), &pa) == 0 && pa.state == IBV_PORT_ACTIVE)
      return true;
  }
  return false;
}

// The device name the settings ask for (VERBS_DEVICE), or empty; InvalidArgument for a
// setting this backend does not know (UCX_* settings are the ucx backend's and ignored).
Result<std::string> DeviceSetting(const ContextOptions& options) {
  std::string name;
  for (const auto& [k, v] : options.backend_settings) {
    if (k == "VERBS_DEVICE")
      name = v;
    else if (k.rfind("UCX_", 0) != 0)
      return Status::InvalidArgument("unknown verbs setting " + k + " (known: VERBS_DEVICE)");
  }
  return name;
}

class VerbsListener final : public Listener {
 public:
  VerbsListener(std::shared_ptr<Shared> s, rdma_cm_id* id, std::unique_ptr<Listener> tcp)
      : shared_(std::move(s)), id_(id), tcp_(std::move(tcp)) {}
  ~VerbsListener() override {
    tcp_.reset();
    rdma_cm_id* id = id_;
    // rdma_destroy_id waits for the id's events to be acknowledged, which the loop does.
    if (!CallOnLoop<bool>(
            shared_->thread_id,
            [this](std::function<void()> f) { return shared_->Post(std::move(f)); },
            [id] {
              rdma_destroy_id(id);
              return true;
            },
            false))
      rdma_destroy_id(id);
  }
  std::string address() const override { return tcp_->address(); }

 private:
  std::shared_ptr<Shared> shared_;
  rdma_cm_id* id_;
  std::unique_ptr<Listener> tcp_;
};

class VerbsContext final : public Context {
 public:
  explicit VerbsContext(std::shared_ptr<Shared> s) : shared_(std::move(s)) {}
  ~VerbsContext() override {
    // The tcp side closes every connection; their shutdowns run on the loop, which then stops.
    shared_->tcp.Reset();
    shared_->tasks.Close();
    shared_->stop = true;
    shared_->Wake();
    if (shared_->thread.joinable()) shared_->thread.join();
  }

  std::string backend() const override { return "verbs"; }

  Result<std::unique_ptr<Listener>> Listen(const std::string& address,
                                           AcceptHandler on_accept) override {
    std::string host;
    uint16_t port = 0;
    SHARDPS_RETURN_IF_ERROR(ParseHostPort(address, &host, &port));
    auto s = shared_;
    using R = Result<std::pair<rdma_cm_id*, uint16_t>>;
    R bound = CallOnLoop<R>(
        s->thread_id, [s](std::function<void()> f) { return s->Post(std::move(f)); },
        [s, host]() -> R {
          auto ai = Resolve(host, 0);
          if (!ai.ok()) return ai.status();
          rdma_cm_id* id = nullptr;
          if (rdma_create_id(s->events, &id, nullptr, RDMA_PS_TCP) != 0) {
            freeaddrinfo(*ai);
            return Errno("rdma_create_id");
          }
          int rc = rdma_bind_addr(id, (*ai)->ai_addr);
          int err = errno;
          freeaddrinfo(*ai);
          if (rc != 0) {
            rdma_destroy_id(id);
            return Status::InvalidArgument(fmt::format(
                "the verbs backend listens on the address of an RDMA interface (RoCE or IPoIB): "
                "rdma_cm cannot bind {} ({}); use such an interface's address (`rdma link` "
                "names the interfaces)",
                host, std::strerror(err)));
          }
          if (id->verbs && id->verbs != s->device) {
            std::string other = ibv_get_device_name(id->verbs->device);
            rdma_destroy_id(id);
            return Status::InvalidArgument(
                fmt::format("{} belongs to RDMA device {}, but this context uses {} (set "
                            "VERBS_DEVICE={})",
                            host, other, s->device_name, other));
          }
          if (rdma_listen(id, 128) != 0) {
            Status st = Errno("rdma_listen");
            rdma_destroy_id(id);
            return st;
          }
          return std::make_pair(id, ntohs(rdma_get_src_port(id)));
        },
        R(Status::Aborted("transport context is shutting down")));
    if (!bound.ok()) return bound.status();
    auto [id, rdma_port] = *bound;
    auto tcp = s->tcp->Listen(address, [s, on_accept, rdma_port = rdma_port](
                                           const std::shared_ptr<Connection>& tcp_conn) {
      auto c = std::make_shared<VerbsConnection>(s);
      c->Register();
      c->SetTcp(tcp_conn);
      ConnectionHandlers user = on_accept(c);
      c->Attach(std::move(user), rdma_port, "");
      return c->TcpHandlers();
    });
    if (!tcp.ok()) {
      auto listener = std::make_unique<VerbsListener>(s, id, nullptr);
      return tcp.status();
    }
    return std::unique_ptr<Listener>(new VerbsListener(s, id, std::move(tcp).value()));
  }

  Result<std::shared_ptr<Connection>> Connect(const std::string& address,
                                              ConnectionHandlers handlers,
                                              std::chrono::milliseconds timeout) override {
    std::string host;
    uint16_t port = 0;
    SHARDPS_RETURN_IF_ERROR(ParseHostPort(address, &host, &port));
    auto start = std::chrono::steady_clock::now();
    auto c = std::make_shared<VerbsConnection>(shared_);
    c->Register();
    auto tcp = shared_->tcp->Connect(address, c->TcpHandlers(), timeout);
    if (!tcp.ok()) {
      c->Unregister();
      return tcp.status();
    }
    c->SetTcp(*tcp);
    c->Attach(std::move(handlers), 0, host);
    auto left = timeout - std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::steady_clock::now() - start);
    Status st = c->WaitConnected(std::max(left, std::chrono::milliseconds(1)));
    if (!st.ok()) {
      c->Close();
      return st;
    }
    return std::shared_ptr<Connection>(c);
  }

  Result<std::unique_ptr<MemoryRegion>> AllocateRegion(size_t size) override {
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size_t mapped = std::max<size_t>(page, (size + page - 1) / page * page);
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      return Status::ResourceExhausted(
          fmt::format("mmap of {} bytes: {}", mapped, std::strerror(errno)));
    return Register(p, size, p, mapped);
  }

  Result<std::unique_ptr<MemoryRegion>> RegisterRegion(void* ptr, size_t size,
                                                       MemoryKind kind) override {
    if (!CanRegister(kind))
      return Status::InvalidArgument(fmt::format(
          "the verbs backend cannot register {} memory (no GPUDirect RDMA here); stage it "
          "through host memory",
          MemoryKindName(kind)));
    if (ptr == nullptr) return Status::InvalidArgument("registering a null pointer");
    return Register(ptr, size, nullptr, 0);
  }

  bool InLoopThread() const override { return shared_->InThread(); }
  bool RunInLoop(std::function<void()> fn) override { return shared_->Post(std::move(fn)); }
  std::chrono::microseconds busy_poll() const override { return shared_->options.busy_poll; }
  uint64_t refused_peers() const override { return shared_->tcp.refused_peers(); }

 private:
  Result<std::unique_ptr<MemoryRegion>> Register(void* ptr, size_t size, void* mapped,
                                                 size_t mapped_size) {
    auto reg = std::make_shared<Registration>();
    reg->mapped = mapped;
    reg->mapped_size = mapped_size;
    int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
    reg->mr = ibv_reg_mr(shared_->pd, ptr, std::max<size_t>(size, 1), access);
    if (reg->mr == nullptr) {
      int err = errno;
      return Status::ResourceExhausted(fmt::format(
          "ibv_reg_mr of {} bytes failed: {} (locked-memory limit {}: registered memory is "
          "pinned; raise it with `ulimit -l unlimited` or systemd's LimitMEMLOCK=infinity)",
          size, std::strerror(err), MemlockLimit()));
    }
    uint64_t id;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      id = shared_->next_region++;
      shared_->locals[reinterpret_cast<uintptr_t>(ptr)] = Shared::Local{size, reg};
    }
    uint32_t rkey = reg->mr->rkey;
    RemoteKey key = PackKey(id, reinterpret_cast<uint64_t>(ptr), size, &rkey, sizeof(rkey));
    return std::unique_ptr<MemoryRegion>(
        new VerbsRegion(shared_, id, ptr, size, std::move(reg), std::move(key)));
  }

  std::shared_ptr<Shared> shared_;
};

// Opens rdma_cm's device list and picks the device: `name`, or the first with an active port.
Status OpenDevice(Shared* s, const std::string& name) {
  int n = 0;
  s->devices = rdma_get_devices(&n);
  if (s->devices == nullptr || n == 0)
    return Status::Unavailable(fmt::format("rdma_get_devices found no RDMA device{}",
                                           errno ? std::string(": ") + std::strerror(errno) : ""));
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    std::string d = ibv_get_device_name(s->devices[i]->device);
    names.push_back(d);
    if (name.empty() ? AnyPortActive(s->devices[i]) : d == name) {
      s->device = s->devices[i];
      s->device_name = d;
      break;
    }
  }
  if (!s->device)
    return Status::Unavailable(
        fmt::format("{} (devices: {})",
                    name.empty() ? "no RDMA device has an active port" : "no RDMA device " + name,
                    fmt::join(names, ", ")));
  return Status::OK();
}

}  // namespace

Viability Check(const ContextOptions& options) {
  auto name = DeviceSetting(options);
  if (!name.ok()) return {false, name.status().message()};
  int n = 0;
  errno = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) return {false, fmt::format("ibv_get_device_list: {}", std::strerror(errno))};
  ibv_free_device_list(list);
  if (n == 0) return {false, "ibv_get_device_list found no RDMA device"};
  rdma_event_channel* ch = rdma_create_event_channel();
  if (ch == nullptr)
    return {false, fmt::format("rdma_cm: cannot open /dev/infiniband/rdma_cm ({}); load rdma_ucm",
                               std::strerror(errno))};
  rdma_destroy_event_channel(ch);
  Shared s;
  Status st = OpenDevice(&s, *name);
  if (!st.ok()) return {false, st.message()};
  return {true, "verbs on " + s.device_name};
}

Result<std::unique_ptr<Context>> CreateVerbsContext(const ContextOptions& options) {
  auto name = DeviceSetting(options);
  if (!name.ok()) return name.status();
  auto s = std::make_shared<Shared>();
  s->options = options;
  if (!s->options.inbound_budget)
    s->options.inbound_budget = std::make_shared<InboundBudget>(options.process_inbound_bytes);
  SHARDPS_RETURN_IF_ERROR(OpenDevice(s.get(), *name));
  // Registration pins memory: a low locked-memory limit fails it later, so say so now.
  rlimit lim{};
  if (getrlimit(RLIMIT_MEMLOCK, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
      lim.rlim_cur < (64ull << 20))
    spdlog::warn(
        "[{}] the locked-memory limit is {}: registering more than that with {} will fail; raise "
        "it (`ulimit -l unlimited`, systemd LimitMEMLOCK=infinity; `shardps doctor` checks it)",
        options.name, MemlockLimit(), s->device_name);
  if (ibv_query_device(s->device, &s->device_attr) != 0) return Errno("ibv_query_device");
  s->rd_atom = static_cast<uint8_t>(std::clamp(
      std::min(s->device_attr.max_qp_rd_atom, s->device_attr.max_qp_init_rd_atom), 1, 16));
  ibv_port_attr pa{};
  if (ibv_query_port(s->device, 1, &pa) == 0 && pa.max_msg_sz > 0)
    s->max_piece = std::min<uint32_t>(pa.max_msg_sz, 1u << 30);
  s->pd = ibv_alloc_pd(s->device);
  if (!s->pd) return Errno("ibv_alloc_pd");
  s->channel = ibv_create_comp_channel(s->device);
  if (!s->channel) return Errno("ibv_create_comp_channel");
  s->cq_size = std::min(s->device_attr.max_cqe, 16384);
  s->cq = ibv_create_cq(s->device, s->cq_size, nullptr, s->channel, 0);
  if (!s->cq) return Errno("ibv_create_cq");
  // The shared receive queue for messages sent on queue pairs (WriteThenSend); without one
  // (a device without SRQ) every message goes on the tcp connection.
  s->srq_slots = std::min({1024, s->device_attr.max_srq_wr, s->cq_size / 2});
  if (s->device_attr.max_srq > 0 && s->srq_slots > 0) {
    size_t bytes = static_cast<size_t>(s->srq_slots) * kRecvSlotBytes;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Errno("mmap of the receive buffers");
    s->recv_block = std::make_shared<Registration>();
    s->recv_block->mapped = p;
    s->recv_block->mapped_size = bytes;
    int access = IBV_ACCESS_LOCAL_WRITE;  // a variable: clang warns on the macro's enum mix
    s->recv_block->mr = ibv_reg_mr(s->pd, p, bytes, access);
    if (!s->recv_block->mr)
      return Status::ResourceExhausted(
          fmt::format("ibv_reg_mr of {} bytes of receive buffers: {} (locked-memory limit {})",
                      bytes, std::strerror(errno), MemlockLimit()));
    s->recv_buffers = static_cast<uint8_t*>(p);
    ibv_srq_init_attr sa{};
    sa.attr.max_wr = static_cast<uint32_t>(s->srq_slots);
    sa.attr.max_sge = 1;
    s->srq = ibv_create_srq(s->pd, &sa);
    if (!s->srq) return Errno("ibv_create_srq");
    for (int i = 0; i < s->srq_slots; ++i)
      if (!s->PostReceive(i)) return Errno("ibv_post_srq_recv");
    s->max_inline = 256;
  } else {
    s->srq_slots = 0;
  }
  s->events = rdma_create_event_channel();
  if (!s->events)
    return Status::Unavailable(fmt::format(
        "rdma_cm: cannot open /dev/infiniband/rdma_cm ({}); load rdma_ucm", std::strerror(errno)));
  for (int fd : {s->channel->fd, s->events->fd})
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  s->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  s->epfd = epoll_create1(EPOLL_CLOEXEC);
  for (int fd : {s->wake, s->channel->fd}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev);
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = s->events->fd;
  epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->events->fd, &ev);
  ContextOptions tcp_opts = s->options;
  tcp_opts.name = options.name + "-ctl";
  tcp_opts.backend_settings.clear();
  auto tcp = CreateContext("tcp", tcp_opts);
  if (!tcp.ok()) return tcp.status();
  s->tcp.Set(std::move(tcp).value());
  Shared* raw = s.get();
  s->thread = std::thread([raw, name = options.name] {
    raw->thread_id.MarkCurrent();
    pthread_setname_np(pthread_self(), (name + "-verbs").substr(0, 15).c_str());
    raw->Run();
  });
  return std::unique_ptr<Context>(new VerbsContext(std::move(s)));
}

}  // namespace shardps::transport::verbs
