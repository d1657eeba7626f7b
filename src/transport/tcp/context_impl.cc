#include "transport/tcp/context_impl.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <future>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/auth.h"
#include "transport/tcp/connection_impl.h"
#include "transport/wait_fd.h"

namespace shardps::transport::tcp {

// An accepted connection proving the cluster secret (the acceptor's side of transport/auth.h):
// its socket and a timer on the loop, until the peer proved the secret (it then becomes a
// TcpConnection handed to the accept handler) or is refused.
struct Handshake {
  int fd = -1;
  int timer = -1;
  int listen_fd = -1;
  std::string peer;
  auth::Nonce nonce{};
  uint8_t got[auth::kHelloBytes + auth::kProofBytes] = {};
  size_t n = 0;
  std::shared_ptr<AcceptHandler> on_accept;
  std::unique_ptr<TlsSession> tls;  // with --tls: its handshake comes first
  bool tls_done = false;
  bool hello_sent = false;  // the secret's hello (after TLS, when both are on)
};

namespace {

// Accepted connections that may be proving the secret at once; more are refused at once, so
// that a flood of silent sockets costs bounded memory and descriptors.
constexpr size_t kMaxHandshakes = 256;

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

Status SendAll(int fd, const uint8_t* data, size_t n,
               std::chrono::steady_clock::time_point deadline, const std::string& address) {
  size_t off = 0;
  while (off < n) {
    ssize_t w = ::send(fd, data + off, n - off, MSG_NOSIGNAL);
    if (w > 0) {
      off += static_cast<size_t>(w);
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      SHARDPS_RETURN_IF_ERROR(
          WaitFd(fd, POLLOUT, deadline, "authenticating to " + address + ": send timed out"));
    } else if (w < 0 && errno != EINTR) {
      return Status::FromErrno("authenticating to " + address + ": send", errno);
    }
  }
  return Status::OK();
}

// Receives exactly n bytes (never more: what follows belongs to the frames).
Status RecvExactly(int fd, uint8_t* data, size_t n, std::chrono::steady_clock::time_point deadline,
                   const std::string& address) {
  size_t off = 0;
  while (off < n) {
    ssize_t r = ::recv(fd, data + off, n - off, 0);
    if (r > 0) {
      off += static_cast<size_t>(r);
    } else if (r == 0) {
      return Status::Unauthenticated(fmt::format(
          "{} closed the connection during authentication: it does not hold this cluster "
          "secret, or runs without --secret",
          address));
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      SHARDPS_RETURN_IF_ERROR(WaitFd(
          fd, POLLIN, deadline,
          fmt::format("{} did not authenticate in time (does it run with the same --secret?)",
                      address)));
    } else if (errno != EINTR) {
      return Status::FromErrno("authenticating to " + address + ": receive", errno);
    }
  }
  return Status::OK();
}

// The connector's side of transport/auth.h, blocking until the deadline.
Status ProveToAcceptor(int fd, const std::string& secret, const std::string& address,
                       std::chrono::steady_clock::time_point deadline, TlsSession* tls) {
  auto send_all = [&](const uint8_t* data, size_t n) {
    return tls ? tls->SendAll(data, n, deadline).WithContext(address)
               : SendAll(fd, data, n, deadline, address);
  };
  auto recv_exactly = [&](uint8_t* data, size_t n) {
    return tls ? tls->RecvExactly(data, n, deadline).WithContext(address)
               : RecvExactly(fd, data, n, deadline, address);
  };
  auth::Nonce mine{}, theirs{};
  SHARDPS_RETURN_IF_ERROR(auth::NewNonce(&mine));
  auth::Hello hello = auth::MakeHello(mine);
  SHARDPS_RETURN_IF_ERROR(send_all(hello.data(), hello.size()));
  auth::Hello got{};
  SHARDPS_RETURN_IF_ERROR(recv_exactly(got.data(), got.size()));
  Status st = auth::ParseHello(got.data(), &theirs);
  if (!st.ok()) return Status::Unauthenticated(fmt::format("{}: {}", address, st.message()));
  auth::Proof proof = auth::MakeProof(secret, auth::Side::kConnector, theirs, mine);
  SHARDPS_RETURN_IF_ERROR(send_all(proof.data(), proof.size()));
  auth::Proof answer{};
  SHARDPS_RETURN_IF_ERROR(recv_exactly(answer.data(), answer.size()));
  if (!auth::ProofMatches(auth::MakeProof(secret, auth::Side::kAcceptor, theirs, mine),
                          answer.data()))
    return Status::Unauthenticated(fmt::format(
        "{} did not prove the cluster secret: it holds another one (or is not this job's)",
        address));
  return Status::OK();
}

// Loop thread: takes the handshake off the loop (its socket stays open).
void EndHandshake(Shared& shared, Handshake& h) {
  shared.loop.Remove(h.fd);
  if (h.timer >= 0) {
    shared.loop.Remove(h.timer);
    ::close(h.timer);
    h.timer = -1;
  }
  shared.handshakes.erase(h.fd);
}

void Refuse(Shared& shared, const std::shared_ptr<Handshake>& h, std::string_view why) {
  spdlog::warn("[{}] refused the connection from {}: {}", shared.options.name, h->peer, why);
  shared.refused_peers++;
  EndHandshake(shared, *h);
  ::close(h->fd);
}

// Loop thread: the connection proved what it had to; it becomes a TcpConnection.
void AcceptProven(const std::shared_ptr<Shared>& shared, const std::shared_ptr<Handshake>& h) {
  EndHandshake(*shared, *h);
  auto conn = std::make_shared<TcpConnection>(shared, h->fd, h->peer, std::move(h->tls));
  ConnectionHandlers handlers = (*h->on_accept)(conn);
  conn->Start(std::move(handlers));
}

// Sends the few bytes of the secret's handshake (the hello, the proof) whole: the socket's send
// buffer is empty but for the handshake's own bytes, so they fit.
bool SendSmall(Handshake& h, const uint8_t* data, size_t n) {
  if (h.tls) {
    iovec v{const_cast<uint8_t*>(data), n};
    return h.tls->Send(&v, 1) == static_cast<ssize_t>(n);
  }
  return ::send(h.fd, data, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
}

void SendHello(const std::shared_ptr<Shared>& shared, const std::shared_ptr<Handshake>& h) {
  Status st = auth::NewNonce(&h->nonce);
  if (!st.ok()) return Refuse(*shared, h, st.message());
  auth::Hello hello = auth::MakeHello(h->nonce);
  if (!SendSmall(*h, hello.data(), hello.size()))
    return Refuse(*shared, h, "could not send the authentication hello");
  h->hello_sent = true;
}

void OnHandshakeEvent(const std::shared_ptr<Shared>& shared, const std::shared_ptr<Handshake>& h) {
  if (h->tls && !h->tls_done) {
    auto step = h->tls->Handshake();
    if (!step.ok()) return Refuse(*shared, h, step.status().message());
    if (*step != TlsSession::Step::kDone) {
      shared->loop.Modify(h->fd,
                          *step == TlsSession::Step::kWantWrite ? EPOLLIN | EPOLLOUT : EPOLLIN);
      return;
    }
    h->tls_done = true;
    shared->loop.Modify(h->fd, EPOLLIN);
    if (shared->options.secret.empty()) return AcceptProven(shared, h);
    SendHello(shared, h);
    if (!h->hello_sent) return;
  }
  constexpr size_t kWant = sizeof(h->got);
  while (h->n < kWant) {
    ssize_t r = h->tls ? h->tls->Recv(h->got + h->n, kWant - h->n)
                       : ::recv(h->fd, h->got + h->n, kWant - h->n, 0);
    if (r == 0)
      return Refuse(*shared, h, "it closed the connection before proving the cluster secret");
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EINTR) continue;
      return Refuse(*shared, h, fmt::format("receive failed: {}", std::strerror(errno)));
    }
    h->n += static_cast<size_t>(r);
    if (!auth::CouldBeHello(h->got, std::min(h->n, auth::kHelloBytes)))
      return Refuse(*shared, h,
                    "it sent no authentication hello (a peer without --secret, or not ShardPS)");
  }
  auth::Nonce theirs{};
  (void)auth::ParseHello(h->got, &theirs);  // CouldBeHello checked the magic
  const std::string& secret = shared->options.secret;
  if (!auth::ProofMatches(auth::MakeProof(secret, auth::Side::kConnector, h->nonce, theirs),
                          h->got + auth::kHelloBytes))
    return Refuse(*shared, h,
                  "wrong proof of the cluster secret (another secret, or a replayed handshake)");
  auth::Proof answer = auth::MakeProof(secret, auth::Side::kAcceptor, h->nonce, theirs);
  if (!SendSmall(*h, answer.data(), answer.size()))
    return Refuse(*shared, h, "could not send the proof of the cluster secret");
  AcceptProven(shared, h);
}

// Loop thread: an accepted socket starts its handshakes (TLS, then the secret's).
void StartHandshake(const std::shared_ptr<Shared>& shared, int fd, int listen_fd,
                    const std::shared_ptr<AcceptHandler>& on_accept) {
  auto h = std::make_shared<Handshake>();
  h->fd = fd;
  h->listen_fd = listen_fd;
  h->peer = SockName(fd, true);
  h->on_accept = on_accept;
  if (shared->handshakes.size() >= kMaxHandshakes) {
    spdlog::warn(
        "[{}] refused the connection from {}: {} connections are already in their handshake",
        shared->options.name, h->peer, kMaxHandshakes);
    shared->refused_peers++;
    ::close(fd);
    return;
  }
  shared->handshakes[fd] = h;
  if (shared->options.tls) {
    auto tls = TlsSession::Create(*shared->options.tls, fd, /*client=*/false);
    if (!tls.ok()) return Refuse(*shared, h, tls.status().message());
    h->tls = std::move(tls).value();
  } else {
    SendHello(shared, h);  // the secret's handshake starts at once
    if (!h->hello_sent) return;
  }
  h->timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (h->timer < 0) return Refuse(*shared, h, "no timer for the handshake");
  auto ms = std::max<int64_t>(shared->options.auth_timeout.count(), 1);
  itimerspec its{};
  its.it_value.tv_sec = ms / 1000;
  its.it_value.tv_nsec = (ms % 1000) * 1000000;
  timerfd_settime(h->timer, 0, &its, nullptr);
  Status st = shared->loop.Add(h->timer, EPOLLIN, [shared, h](uint32_t) {
    Refuse(*shared, h,
           fmt::format("it did not complete the handshake within {} ms",
                       shared->options.auth_timeout.count()));
  });
  if (st.ok())
    st = shared->loop.Add(fd, EPOLLIN, [shared, h](uint32_t) { OnHandshakeEvent(shared, h); });
  if (!st.ok()) Refuse(*shared, h, st.message());
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
      // Connections it accepted that are still proving the secret go with it.
      std::vector<std::shared_ptr<Handshake>> mine;
      for (auto& [sock, h] : shared->handshakes)
        if (h->listen_fd == fd) mine.push_back(h);
      for (auto& h : mine) {
        EndHandshake(*shared, *h);
        ::close(h->fd);
      }
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

Result<std::shared_ptr<RegionMemory>> Shared::Lookup(uint64_t id, uint64_t secret, uint64_t offset,
                                                     uint64_t len, const char* what) {
  std::lock_guard<std::mutex> lock(regions_mu);
  auto it = regions.find(id);
  if (it == regions.end() || it->second->secret != secret)
    return Status::InvalidArgument(
        fmt::format("remote key names no registered region (region {}: unknown or stale key)", id));
  const uint64_t size = it->second->size;
  if (offset > size || len > size - offset)
    return Status::InvalidArgument(fmt::format(
        "{} of {} bytes at offset {} is outside the region of {} bytes", what, len, offset, size));
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
    auto handshakes = shared->handshakes;
    for (auto& [fd, h] : handshakes) {
      EndHandshake(*shared, *h);
      ::close(h->fd);
    }
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
        if (!shared->options.secret.empty() || shared->options.tls) {
          StartHandshake(shared, c, fd, handler);
          continue;
        }
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
    std::unique_ptr<TlsSession> tls;
    if (err == 0 && (shared_->options.tls || !shared_->options.secret.empty())) {
      auto auth_deadline =
          std::min(deadline, std::chrono::steady_clock::now() + shared_->options.auth_timeout);
      Status st;
      if (shared_->options.tls) {
        auto s = TlsSession::Create(*shared_->options.tls, fd, /*client=*/true);
        st = s.ok() ? (*s)->HandshakeUntil(auth_deadline).WithContext(address) : s.status();
        if (s.ok()) tls = std::move(s).value();
      }
      if (st.ok() && !shared_->options.secret.empty())
        st = ProveToAcceptor(fd, shared_->options.secret, address, auth_deadline, tls.get());
      if (!st.ok()) {
        tls.reset();
        ::close(fd);
        return st;
      }
    }
    if (err == 0) {
      auto conn = std::make_shared<TcpConnection>(shared_, fd, address, std::move(tls));
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
