#include "transport/tcp/context_impl.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <future>
#include <thread>

#include <fmt/format.h>

#include "transport/tcp/connection_impl.h"

namespace shardps::transport::tcp {
namespace {

std::string SockName(int fd, bool peer) {
  sockaddr_in a{};
  socklen_t len = sizeof(a);
  int rc = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len)
                : getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  if (rc != 0) return "?";
  char buf[INET_ADDRSTRLEN] = {0};
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof(buf));
  return fmt::format("{}:{}", buf, ntohs(a.sin_port));
}

Status Resolve(const std::string& address, sockaddr_in* out) {
  std::string host;
  uint16_t port = 0;
  SHARDPS_RETURN_IF_ERROR(ParseHostPort(address, &host, &port));
  std::memset(out, 0, sizeof(*out));
  out->sin_family = AF_INET;
  out->sin_port = htons(port);
  if (host.empty() || host == "*" || host == "0.0.0.0") {
    out->sin_addr.s_addr = htonl(INADDR_ANY);
    return Status::OK();
  }
  if (inet_pton(AF_INET, host.c_str(), &out->sin_addr) == 1) return Status::OK();
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr)
    return Status::InvalidArgument(
        fmt::format("cannot resolve host '{}': {}", host, gai_strerror(rc)));
  out->sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return Status::OK();
}

class TcpRegion final : public MemoryRegion {
 public:
  TcpRegion(std::shared_ptr<Shared> shared, std::shared_ptr<RegionMemory> mem)
      : shared_(std::move(shared)), mem_(std::move(mem)) {
    key_.base = reinterpret_cast<uint64_t>(mem_->data);
    key_.size = mem_->size;
    Writer w(&key_.packed);
    w.Put(mem_->id);
    w.Put(mem_->secret);
  }
  ~TcpRegion() override { shared_->Deregister(mem_->id); }
  void* data() const override { return mem_->data; }
  size_t size() const override { return mem_->size; }
  const RemoteKey& remote_key() const override { return key_; }

 private:
  std::shared_ptr<Shared> shared_;
  std::shared_ptr<RegionMemory> mem_;
  RemoteKey key_;
};

class TcpListener final : public Listener {
 public:
  TcpListener(std::shared_ptr<Shared> shared, int fd, std::string address)
      : shared_(std::move(shared)), fd_(fd), address_(std::move(address)) {}
  ~TcpListener() override {
    int fd = fd_;
    auto shared = shared_;
    RunOnLoop(shared_->loop, [shared, fd] {
      shared->loop.Remove(fd);
      return Status::OK();
    });
    ::close(fd_);
  }
  std::string address() const override { return address_; }

 private:
  std::shared_ptr<Shared> shared_;
  int fd_;
  std::string address_;
};

}  // namespace

RegionMemory::RegionMemory(size_t n) : size(n) {
  size_t rounded = ((n == 0 ? 1 : n) + 4095) / 4096 * 4096;
  data = static_cast<uint8_t*>(std::aligned_alloc(4096, rounded));
  if (data) std::memset(data, 0, rounded);
}

RegionMemory::RegionMemory(uint8_t* caller_owned, size_t n)
    : data(caller_owned), size(n), owned(false) {}

RegionMemory::~RegionMemory() {
  if (owned) std::free(data);
}

Result<std::shared_ptr<RegionMemory>> Shared::Lookup(uint64_t id, uint64_t secret) {
  std::lock_guard<std::mutex> lock(regions_mu);
  auto it = regions.find(id);
  if (it == regions.end() || it->second->secret != secret)
    return Status::InvalidArgument(
        fmt::format("remote key names no registered region (region {}: unknown or stale key)", id));
  return it->second;
}

void Shared::Deregister(uint64_t id) {
  std::lock_guard<std::mutex> lock(regions_mu);
  regions.erase(id);
}

Status RunOnLoop(Loop& loop, const std::function<Status()>& fn) {
  if (loop.InLoop()) return fn();
  auto promise = std::make_shared<std::promise<Status>>();
  auto fut = promise->get_future();
  if (!loop.Defer([promise, fn] { promise->set_value(fn()); }))
    return Status::Aborted("transport loop is stopped");
  return fut.get();
}

void TuneSocket(int fd, const ContextOptions& options) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (options.socket_buffer_bytes > 0) {
    int b = options.socket_buffer_bytes;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &b, sizeof(b));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &b, sizeof(b));
  }
}

Result<std::unique_ptr<TcpContext>> TcpContext::Create(const ContextOptions& options) {
  auto shared = std::make_shared<Shared>();
  shared->options = options;
  if (!shared->options.inbound_budget)
    shared->options.inbound_budget = std::make_shared<InboundBudget>(options.process_inbound_bytes);
  SHARDPS_RETURN_IF_ERROR(shared->loop.Start(options.name));
  return std::unique_ptr<TcpContext>(new TcpContext(std::move(shared)));
}

TcpContext::~TcpContext() {
  auto shared = shared_;
  RunOnLoop(shared_->loop, [shared] {
    auto conns = shared->connections;
    for (auto& c : conns) c->Close();
    return Status::OK();
  });
  shared_->loop.Stop();  // runs the queued closes, then joins
  shared_->connections.clear();
}

Result<std::unique_ptr<Listener>> TcpContext::Listen(const std::string& address,
                                                     AcceptHandler on_accept) {
  sockaddr_in addr{};
  SHARDPS_RETURN_IF_ERROR(Resolve(address, &addr));
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno("socket", errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    ::close(fd);
    return Status::FromErrno("bind " + address, e);
  }
  if (listen(fd, 1024) != 0) {
    int e = errno;
    ::close(fd);
    return Status::FromErrno("listen " + address, e);
  }
  std::string bound = SockName(fd, false);
  auto shared = shared_;
  auto handler = std::make_shared<AcceptHandler>(std::move(on_accept));
  Status st = RunOnLoop(shared_->loop, [shared, fd, handler] {
    return shared->loop.Add(fd, EPOLLIN, [shared, fd, handler](uint32_t) {
      for (int i = 0; i < 64; ++i) {
        int c = accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) return;  // EAGAIN, or a transient error: level-triggered epoll retries
        TuneSocket(c, shared->options);
        auto conn = std::make_shared<TcpConnection>(shared, c, SockName(c, true));
        ConnectionHandlers handlers = (*handler)(conn);
        conn->Start(std::move(handlers));
      }
    });
  });
  if (!st.ok()) {
    ::close(fd);
    return st;
  }
  return std::unique_ptr<Listener>(new TcpListener(shared_, fd, bound));
}

Result<std::shared_ptr<Connection>> TcpContext::Connect(const std::string& address,
                                                        ConnectionHandlers handlers,
                                                        std::chrono::milliseconds timeout) {
  sockaddr_in addr{};
  SHARDPS_RETURN_IF_ERROR(Resolve(address, &addr));
  auto deadline = std::chrono::steady_clock::now() + timeout;
  Status last;
  for (;;) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno("socket", errno);
    TuneSocket(fd, shared_->options);
    int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      pollfd p{fd, POLLOUT, 0};
      int pr = poll(&p, 1, static_cast<int>(std::max<int64_t>(left.count(), 0)));
      if (pr == 0) {
        err = ETIMEDOUT;
      } else {
        socklen_t len = sizeof(err);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      }
    }
    if (err == 0) {
      auto conn = std::make_shared<TcpConnection>(shared_, fd, address);
      auto shared = shared_;
      auto h = std::make_shared<ConnectionHandlers>(std::move(handlers));
      if (!shared_->loop.Defer([conn, h] { conn->Start(std::move(*h)); })) {
        return Status::Aborted("transport context is shutting down");
      }
      return std::shared_ptr<Connection>(conn);
    }
    ::close(fd);
    last = Status::FromErrno("connect to " + address, err);
    // A peer that is not listening yet may be starting up: retry until the deadline.
    if ((err != ECONNREFUSED && err != ETIMEDOUT && err != EAGAIN) ||
        std::chrono::steady_clock::now() + std::chrono::milliseconds(20) >= deadline) {
      if (err == ECONNREFUSED || err == ETIMEDOUT)
        return Status::Unavailable(fmt::format("could not connect to {} within {} ms: {}", address,
                                               timeout.count(), last.message()));
      return last;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Result<std::unique_ptr<MemoryRegion>> TcpContext::AllocateRegion(size_t size) {
  auto mem = std::make_shared<RegionMemory>(size);
  if (mem->data == nullptr)
    return Status::ResourceExhausted(fmt::format("cannot allocate a region of {} bytes", size));
  return Register(std::move(mem));
}

Result<std::unique_ptr<MemoryRegion>> TcpContext::RegisterRegion(void* ptr, size_t size,
                                                                 MemoryKind kind) {
  if (kind != MemoryKind::kHost)
    return Status::InvalidArgument(fmt::format(
        "the tcp transport registers host memory only, not {} memory (stage it through host "
        "memory)",
        MemoryKindName(kind)));
  if (ptr == nullptr && size > 0) return Status::InvalidArgument("registering a null pointer");
  return Register(std::make_shared<RegionMemory>(static_cast<uint8_t*>(ptr), size));
}

Result<std::unique_ptr<MemoryRegion>> TcpContext::Register(std::shared_ptr<RegionMemory> mem) {
  {
    std::lock_guard<std::mutex> lock(shared_->regions_mu);
    mem->id = shared_->next_region_id++;
    mem->secret = shared_->rng();
    shared_->regions[mem->id] = mem;
  }
  return std::unique_ptr<MemoryRegion>(new TcpRegion(shared_, std::move(mem)));
}

}  // namespace shardps::transport::tcp
