#include "transport/ucx/context_impl.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "core/checksum.h"

namespace shardps::transport::ucx {
namespace {

// Tags of the backend's own control messages on the tcp channel (never shown to the user).
constexpr uint32_t kHello = 0xFFFF0001;      // meta: this side's UCP worker address
constexpr uint32_t kRevoke = 0xFFFF0002;     // meta: u64 region id, u64 token
constexpr uint32_t kRevokeAck = 0xFFFF0003;  // meta: u64 token
constexpr uint32_t kReady = 0xFFFF0004;      // the sender's endpoint to us is wired up
constexpr auto kRevokeWait = std::chrono::milliseconds(2000);

// User messages travel as UCP active messages on the connection's endpoint (the tcp channel
// only bootstraps: hello, ready, key revocation, and the connection's life). Header: the
// receiving connection's id, a per-connection sequence number (delivery is in that order),
// the tag and the metadata length; data: payload then metadata.
constexpr unsigned kAmId = 1;
// A message may arrive at most this many sequence numbers ahead of the next one delivered.
constexpr uint64_t kMaxReorderWindow = 1 << 16;
struct AmHeader {
  uint64_t conn = 0;
  uint64_t seq = 0;
  uint32_t tag = 0;
  uint32_t meta_len = 0;
};

Status FromUcs(const std::string& what, ucs_status_t st) {
  std::string msg = fmt::format("{}: {}", what, ucs_status_string(st));
  if (st == UCS_ERR_CONNECTION_RESET || st == UCS_ERR_ENDPOINT_TIMEOUT || st == UCS_ERR_UNREACHABLE)
    return Status::Unavailable(msg);
  if (st == UCS_ERR_CANCELED) return Status::Aborted(msg);
  if (st == UCS_ERR_NO_MEMORY) return Status::ResourceExhausted(msg);
  return Status::IOError(msg);
}

bool UsesSharedMemory(const std::string& tls) {
  if (tls.empty() || tls == "all") return true;
  for (const char* t : {"shm", "sm", "posix", "sysv", "xpmem", "cma", "knem"})
    if (tls.find(t) != std::string::npos) return true;
  return false;
}

// Creates a UCP context from the options' UCX_* settings (prefix optional).
Result<ucp_context_h> MakeUcpContext(const ContextOptions& options) {
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
  if (st != UCS_OK) return FromUcs("ucp_config_read", st);
  std::string tls;
  bool mm_set = false;
  for (const auto& [k, v] : options.backend_settings) {
    std::string name = k.rfind("UCX_", 0) == 0 ? k.substr(4) : k;
    if (name == "TLS") tls = v;
    if (name == "MM_ERROR_HANDLING") mm_set = true;
    st = ucp_config_modify(cfg, name.c_str(), v.c_str());
    if (st != UCS_OK) {
      ucp_config_release(cfg);
      return Status::InvalidArgument(
          fmt::format("UCX setting {}={}: {}", k, v, ucs_status_string(st)));
    }
  }
  // UCX reads its own UCX_* variables in ucp_config_read; this backend reads none: what it must
  // know of them comes in the settings (the configuration layer passes the process's UCX_*
  // variables there). Peer failure detection over shared memory needs this in UCX 1.13.
  if (!mm_set && UsesSharedMemory(tls)) ucp_config_modify(cfg, "MM_ERROR_HANDLING", "y");
  ucp_params_t p{};
  p.field_mask = UCP_PARAM_FIELD_FEATURES;
  // wakeup: the progress thread sleeps on its fd
  p.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucp_context_h ctx = nullptr;
  st = ucp_init(&p, cfg, &ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) return FromUcs("ucp_init", st);
  return ctx;
}

// How much longer than busy_poll the loop keeps polling after its last event while a
// HoldPolling() token lives: long enough for an apply of a 4 MiB chunk, and still bounded.
constexpr int kHeldPollFactor = 10;

// The UCP worker and the one thread that progresses it. Every UCP call of a context runs on
// this thread (UCS_THREAD_MODE_SINGLE); other threads hand work over with Post().
class Progress {
 public:
  Status Start(ucp_context_h ctx, const std::string& name, std::chrono::microseconds busy_poll) {
    busy_poll_ = busy_poll;
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    ucs_status_t st = ucp_worker_create(ctx, &wp, &worker_);
    if (st != UCS_OK) return FromUcs("ucp_worker_create", st);
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    st = ucp_worker_get_address(worker_, &addr, &len);
    if (st != UCS_OK) return FromUcs("ucp_worker_get_address", st);
    address_.assign(reinterpret_cast<uint8_t*>(addr), reinterpret_cast<uint8_t*>(addr) + len);
    ucp_worker_release_address(worker_, addr);
    int ufd = -1;
    if (ucp_worker_get_efd(worker_, &ufd) != UCS_OK) ufd = -1;
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = wake_;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_, &ev);
    if (ufd >= 0) {
      ev.data.fd = ufd;
      epoll_ctl(epfd_, EPOLL_CTL_ADD, ufd, &ev);
    }
    thread_ = std::thread([this, name] {
      tid_ = std::this_thread::get_id();
      pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
      Run();
    });
    return Status::OK();
  }

  // Runs the queued tasks, then stops; the worker is destroyed by Destroy() afterwards.
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!accepting_) return;
      accepting_ = false;
    }
    stop_ = true;
    Wake();
    if (thread_.joinable()) thread_.join();
  }
  void Destroy() {
    if (worker_) ucp_worker_destroy(worker_);
    worker_ = nullptr;
    if (wake_ >= 0) close(wake_);
    if (epfd_ >= 0) close(epfd_);
    wake_ = epfd_ = -1;
  }

  bool Post(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!accepting_) return false;
      tasks_.push_back(std::move(fn));
    }
    Wake();
    return true;
  }
  // From the progress thread: runs fn once the current progress call returned (no wake-up
  // needed: the loop drains its tasks before it sleeps). From elsewhere: Post.
  void Defer(std::function<void()> fn) {
    if (!InThread()) {
      Post(std::move(fn));
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(fn));
  }
  // Runs fn on the progress thread and waits for its result.
  template <typename T>
  T Call(std::function<T()> fn, T if_stopped) {
    if (InThread()) return fn();
    auto pr = std::make_shared<std::promise<T>>();
    auto fut = pr->get_future();
    if (!Post([pr, fn] { pr->set_value(fn()); })) return if_stopped;
    return fut.get();
  }
  // A token that keeps the loop polling while it lives (see Context::HoldPolling).
  std::shared_ptr<void> HoldPolling() {
    if (busy_poll_.count() == 0) return nullptr;
    struct Hold {
      explicit Hold(std::shared_ptr<std::atomic<int>> n) : holds(std::move(n)) {
        holds->fetch_add(1);
      }
      ~Hold() { holds->fetch_sub(1); }
      std::shared_ptr<std::atomic<int>> holds;
    };
    return std::make_shared<Hold>(holds_);
  }
  bool InThread() const { return std::this_thread::get_id() == tid_.load(); }
  ucp_worker_h worker() const { return worker_; }
  const Bytes& address() const { return address_; }

 private:
  void Wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_, &one, sizeof(one));
  }
  // Runs the queued tasks; true if there were any.
  bool Drain() {
    bool ran = false;
    for (;; ran = true) {
      std::deque<std::function<void()>> batch;
      {
        std::lock_guard<std::mutex> lock(mu_);
        batch.swap(tasks_);
      }
      if (batch.empty()) return ran;
      for (auto& fn : batch) {
        fn();
        while (ucp_worker_progress(worker_)) {
        }
      }
    }
  }
  void Run() {
    auto last = std::chrono::steady_clock::now();
    while (!stop_) {
      bool any = false;
      while (ucp_worker_progress(worker_)) any = true;
      any = Drain() || any;
      auto now = std::chrono::steady_clock::now();
      if (any) last = now;
      // While someone holds the polling (an apply owes an acknowledgement), the window is
      // kHeldPollFactor times longer.
      auto window = holds_->load() > 0 ? busy_poll_ * kHeldPollFactor : busy_poll_;
      if (now - last < window) {
        // Busy-poll a while after the last event (a sleep and wake-up costs tens of
        // microseconds), yielding the core to anything else runnable.
        sched_yield();
        continue;
      }
      bool idle;
      {
        std::lock_guard<std::mutex> lock(mu_);
        idle = tasks_.empty();
      }
      if (!idle) continue;
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      epoll_event evs[4];
      int n = epoll_wait(epfd_, evs, 4, 20);
      for (int i = 0; i < n; ++i)
        if (evs[i].data.fd == wake_) {
          uint64_t v;
          [[maybe_unused]] ssize_t r = read(wake_, &v, sizeof(v));
        }
    }
    Drain();  // tasks queued before Stop() still run: their callbacks fire exactly once
    while (ucp_worker_progress(worker_)) {
    }
  }

  ucp_worker_h worker_ = nullptr;
  Bytes address_;
  std::chrono::microseconds busy_poll_{0};
  // Live HoldPolling() tokens; shared with them, so a token may outlive this object.
  std::shared_ptr<std::atomic<int>> holds_ = std::make_shared<std::atomic<int>>(0);
  std::thread thread_;
  std::atomic<std::thread::id> tid_{};
  std::atomic<bool> stop_{false};
  int wake_ = -1, epfd_ = -1;
  std::mutex mu_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool accepting_ = true;                    // guarded by mu_
};

class UcxConnection;

// A message being received: payload then metadata, split on delivery.
struct Incoming {
  uint32_t tag = 0;
  uint32_t meta_len = 0;
  Buffer bytes;
  bool ready = false;
};

struct RegionEntry {
  ucp_mem_h mh = nullptr;
  void* address = nullptr;
  size_t size = 0;
};

struct Shared {
  ContextOptions options;
  ucp_context_h ctx = nullptr;
  Progress progress;
  std::unique_ptr<Context> tcp;

  std::mutex mu;
  uint64_t next_region = 1;                                          // guarded by mu
  std::vector<std::weak_ptr<UcxConnection>> conns;                   // guarded by mu
  uint64_t next_conn = 1;                                            // guarded by mu
  std::unordered_map<uint64_t, std::weak_ptr<UcxConnection>> by_id;  // guarded by mu
  uint64_t next_token = 1;                                           // guarded by mu
  std::map<uint64_t, int> revoke_waits;  // token -> acks missing; guarded by mu
  std::condition_variable revoke_cv;

  ~Shared() {
    if (ctx) ucp_cleanup(ctx);
  }
  void Revoke(uint64_t region);
};

// Packed key: [u64 region id][u64 checksum of id, base, size and rkey][rkey bytes].
struct KeyParts {
  uint64_t region = 0;
  Bytes rkey;
};

uint64_t KeySum(uint64_t region, uint64_t base, uint64_t size, const uint8_t* rkey, size_t n) {
  Bytes b;
  Writer w(&b);
  w.Put(region);
  w.Put(base);
  w.Put(size);
  w.PutRaw(rkey, n);
  return Checksum(b.data(), b.size());
}

Status ParseKey(const RemoteKey& key, KeyParts* out) {
  Reader r(key.packed.data(), key.packed.size());
  uint64_t sum = 0;
  if (!r.Get(&out->region) || !r.Get(&sum) || r.remaining() == 0)
    return Status::InvalidArgument("remote key is not a ucx key");
  auto rest = r.rest();
  if (KeySum(out->region, key.base, key.size, rest.data(), rest.size()) != sum)
    return Status::InvalidArgument("remote key is corrupt (checksum mismatch)");
  out->rkey.assign(rest.begin(), rest.end());
  return Status::OK();
}

class UcxRegion final : public MemoryRegion {
 public:
  UcxRegion(std::shared_ptr<Shared> s, uint64_t id, RegionEntry e, RemoteKey key)
      : shared_(std::move(s)), id_(id), entry_(e), key_(std::move(key)) {}
  ~UcxRegion() override {
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
  void* data() const override { return entry_.address; }
  size_t size() const override { return entry_.size; }
  const RemoteKey& remote_key() const override { return key_; }

 private:
  std::shared_ptr<Shared> shared_;
  uint64_t id_;
  RegionEntry entry_;
  RemoteKey key_;
};

struct OpCtx;

class UcxConnection final : public Connection, public std::enable_shared_from_this<UcxConnection> {
 public:
  UcxConnection(std::shared_ptr<Shared> s)
      : shared_(std::move(s)),
        charge_(shared_->options.inbound_budget.get(), shared_->options.connection_inbound_bytes) {}

  // The tcp side's handlers: user messages pass through, the backend's own are handled here.
  // They hold this connection alive while the tcp connection is open (the tcp side drops its
  // handlers when it closes, which ends the cycle).
  ConnectionHandlers TcpHandlers() {
    auto self = shared_from_this();
    ConnectionHandlers h;
    h.on_message = [self](const std::shared_ptr<Connection>&, Message m) {
      self->OnTcpMessage(std::move(m));
    };
    h.on_close = [self](const std::shared_ptr<Connection>&, Status st) { self->OnTcpClosed(st); };
    return h;
  }
  // Gives the connection its id (named in the messages its peer sends it) and lists it.
  void Register() {
    std::lock_guard<std::mutex> lock(shared_->mu);
    id_ = shared_->next_conn++;
    shared_->by_id[id_] = weak_from_this();
    shared_->conns.push_back(weak_from_this());
  }
  void Attach(std::shared_ptr<Connection> tcp, ConnectionHandlers user) {
    {
      std::lock_guard<std::mutex> lock(wire_mu_);
      tcp_ = std::move(tcp);
      user_ = std::move(user);
      peer_ = tcp_->peer();
      attached_ = true;
    }
    wire_cv_.notify_all();
    Bytes meta;
    Writer w(&meta);
    w.Put(id_);
    const Bytes& addr = shared_->progress.address();
    w.PutRaw(addr.data(), addr.size());
    tcp_->Send(kHello, std::move(meta), {}, nullptr);
  }

  // A connect's tcp side receives before Attach() ran on the connecting thread; its first
  // events wait for it here (microseconds; bounded).
  bool WaitAttached() {
    std::unique_lock<std::mutex> lock(wire_mu_);
    return wire_cv_.wait_for(lock, std::chrono::seconds(10), [&] { return attached_; });
  }

  void Send(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) override {
    if (tag >= 0xFFFF0000u) {
      Post([done] { done(Status::InvalidArgument("message tags from 0xFFFF0000 are reserved")); },
           done);
      return;
    }
    if (!done) done = [](Status) {};
    auto self = shared_from_this();
    Post(
        [self, tag, meta = std::move(meta), payload = std::move(payload), done]() mutable {
          self->IssueSend(tag, std::move(meta), std::move(payload), std::move(done));
        },
        done);
  }
  void Write(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
             DoneCallback done) override {
    StartOp(true, const_cast<void*>(local), len, key, offset, std::move(done));
  }
  void Read(void* local, size_t len, const RemoteKey& key, uint64_t offset,
            DoneCallback done) override {
    StartOp(false, local, len, key, offset, std::move(done));
  }
  void Close() override { tcp_->Close(); }
  bool closed() const override { return closed_flag_.load(); }
  std::string peer() const override { return peer_; }

  // Progress thread: a UCX request finished (or failed).
  void OpDone(uint64_t id, Status st, bool is_write, bool flushed);
  void OnRevoke(uint64_t region) {  // progress thread
    revoked_.insert(region);
    for (auto it = rkeys_.begin(); it != rkeys_.end();) {
      if (it->second.region == region) {
        ucp_rkey_destroy(it->second.rkey);
        it = rkeys_.erase(it);
      } else {
        ++it;
      }
    }
  }
  void SendRaw(uint32_t tag, Bytes meta) { tcp_->Send(tag, std::move(meta), {}, nullptr); }

  // Progress thread: an active message for this connection arrived.
  void OnAm(const AmHeader& h, void* data, size_t len, const ucp_am_recv_param_t* param);
  // Progress thread: the data of a rendezvous message landed (or failed to).
  void Received(const std::shared_ptr<Incoming>& in, ucs_status_t st);

  // Waits until both endpoints (ours to the peer, the peer's to us) are wired up, so that no
  // wire-up traffic is left in flight when either side goes away. (UCX 1.13 can abort on a
  // wire-up reply pending to a vanished peer over uct-tcp; openucx/ucx PR #8175.)
  Status WaitWiredUp(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(wire_mu_);
    if (!wire_cv_.wait_for(lock, timeout,
                           [&] { return (local_ready_ && peer_ready_) || wire_failed_; }))
      return Status::Timeout("ucx wire-up with " + peer_ + " did not complete");
    if (wire_failed_)
      return Status::Unavailable("connection to " + peer_ + " closed during wire-up");
    return Status::OK();
  }

 private:
  void SetWire(bool* flag) {
    std::lock_guard<std::mutex> lock(wire_mu_);
    *flag = true;
    wire_cv_.notify_all();
  }

  struct Op {
    DoneCallback done;
    std::shared_ptr<void> keep;  // what a send needs until it completes
  };
  struct CachedKey {
    uint64_t region;
    ucp_rkey_h rkey;
  };

  void Post(std::function<void()> fn, const DoneCallback& done) {
    if (!shared_->progress.Post(std::move(fn)) && done)
      done(Status::Aborted("transport context was destroyed"));
  }

  void StartOp(bool is_write, void* local, size_t len, const RemoteKey& key, uint64_t offset,
               DoneCallback done) {
    auto self = shared_from_this();
    KeyParts parts;
    Status st = ParseKey(key, &parts);
    if (st.ok() && (offset > key.size || len > key.size - offset))
      st = Status::InvalidArgument(
          fmt::format("{} of {} bytes at offset {} is outside the region of {} bytes",
                      is_write ? "write" : "read", len, offset, key.size));
    uint64_t remote = key.base + offset;
    Post(
        [self, is_write, local, len, parts = std::move(parts), remote, st, done]() mutable {
          if (!st.ok()) return done(st);
          self->Issue(is_write, local, len, std::move(parts), remote, std::move(done));
        },
        done);
  }

  // Progress thread.
  void IssueSend(uint32_t tag, Bytes meta, Payload payload, DoneCallback done);
  void ScheduleDelivery();
  void Deliver();

  // Progress thread.
  void Issue(bool is_write, void* local, size_t len, KeyParts parts, uint64_t remote,
             DoneCallback done);

  void OnTcpMessage(Message m) {
    if (!WaitAttached()) return;
    if (m.tag == kHello) {
      Reader r(m.meta.data(), m.meta.size());
      uint64_t peer_id = 0;
      if (!r.Get(&peer_id) || r.remaining() == 0)
        return Fail(Status::ProtocolError("malformed ucx hello from " + peer_));
      auto rest = r.rest();
      Bytes addr(rest.begin(), rest.end());
      auto self = shared_from_this();
      Post(
          [self, peer_id, addr = std::move(addr)]() mutable {
            self->peer_id_ = peer_id;
            self->CreateEndpoint(std::move(addr));
          },
          nullptr);
      return;
    }
    if (m.tag == kRevoke) {
      Reader r(m.meta.data(), m.meta.size());
      uint64_t region = 0, token = 0;
      if (!r.Get(&region) || !r.Get(&token))
        return Fail(Status::ProtocolError("malformed key revocation from " + peer_));
      auto self = shared_from_this();
      Post(
          [self, region, token] {
            self->OnRevoke(region);
            Bytes ack;
            Writer w(&ack);
            w.Put(token);
            self->SendRaw(kRevokeAck, std::move(ack));
          },
          nullptr);
      return;
    }
    if (m.tag == kReady) return SetWire(&peer_ready_);
    if (m.tag == kRevokeAck) {
      Reader r(m.meta.data(), m.meta.size());
      uint64_t token = 0;
      if (!r.Get(&token))
        return Fail(Status::ProtocolError("malformed revocation ack from " + peer_));
      std::lock_guard<std::mutex> lock(shared_->mu);
      auto it = shared_->revoke_waits.find(token);
      if (it != shared_->revoke_waits.end() && --it->second <= 0) shared_->revoke_cv.notify_all();
      return;
    }
    Fail(Status::ProtocolError(fmt::format(
        "unexpected message (tag {}) on the ucx control channel from {}", m.tag, peer_)));
  }

  // Closes the connection because of `why` (logged; on_close reports it).
  void Fail(Status why) {
    spdlog::error("[{}] {}; closing", shared_->options.name, why.ToString());
    {
      std::lock_guard<std::mutex> lock(wire_mu_);
      if (close_reason_.ok()) close_reason_ = why;
    }
    tcp_->Close();
  }

  void OnTcpClosed(Status st) {
    WaitAttached();
    {
      std::lock_guard<std::mutex> lock(wire_mu_);
      if (st.ok() && !close_reason_.ok()) st = close_reason_;  // closed by Fail()
    }
    closed_flag_ = true;
    SetWire(&wire_failed_);
    auto self = shared_from_this();
    if (!shared_->progress.Post([self, st] { self->Shutdown(st); })) Shutdown(st);
  }

  // Progress thread.
  void CreateEndpoint(Bytes addr) {
    if (closed_ || ep_) return;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(addr.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t st) {
      auto* weak = static_cast<std::weak_ptr<UcxConnection>*>(arg);
      if (auto self = weak->lock()) {
        // The connection as a whole is gone.
        self->Fail(FromUcs("ucx endpoint to " + self->peer_ + " failed", st));
      }
    };
    err_arg_ = std::make_unique<std::weak_ptr<UcxConnection>>(weak_from_this());
    ep.err_handler.arg = err_arg_.get();
    ucs_status_t st = ucp_ep_create(shared_->progress.worker(), &ep, &ep_);
    if (st != UCS_OK) {
      ep_ = nullptr;
      return Fail(FromUcs("ucp_ep_create to " + peer_, st));
    }
    // Wire-up completes before any remote key is unpacked (unpacking earlier can pin the
    // endpoint to UCX's emulated RMA path).
    FlushThen([self = shared_from_this()](Status fst) {
      if (!fst.ok()) return self->Fail(fst.WithContext("ucx wire-up with " + self->peer_));
      self->ready_ = true;
      self->SetWire(&self->local_ready_);
      self->SendRaw(kReady, {});
      auto waiting = std::move(self->waiting_);
      self->waiting_.clear();
      for (auto& fn : waiting) fn();
    });
  }

  void FlushThen(std::function<void(Status)> then);

  // Progress thread: fails everything pending, closes the endpoint, then tells the user.
  void Shutdown(Status st) {
    if (closed_) return;
    if (!st.ok()) Deliver();  // what arrived whole before the peer went away
    closed_ = true;
    closed_flag_ = true;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->by_id.erase(id_);
    }
    inbox_.clear();
    charge_.ReleaseAll();
    Status op_st = st.ok() ? Status::Aborted("connection to " + peer_ + " was closed") : st;
    auto waiting = std::move(waiting_);
    waiting_.clear();
    for (auto& fn : waiting) fn();  // they see closed_ and fail
    if (ep_) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t r = ucp_ep_close_nbx(ep_, &p);
      if (UCS_PTR_IS_PTR(r)) {
        while (ucp_request_check_status(r) == UCS_INPROGRESS)
          ucp_worker_progress(shared_->progress.worker());
        ucp_request_free(r);
      }
      ep_ = nullptr;
    }
    for (auto& [k, c] : rkeys_) ucp_rkey_destroy(c.rkey);
    rkeys_.clear();
    auto ops = std::move(ops_);
    ops_.clear();
    for (auto& [id, op] : ops) op.done(op_st);
    auto on_close = std::move(user_.on_close);
    user_ = ConnectionHandlers{};
    if (on_close) on_close(shared_from_this(), st);
  }

  std::shared_ptr<Shared> shared_;
  std::shared_ptr<Connection> tcp_;
  ConnectionHandlers user_;
  std::string peer_;
  std::atomic<bool> closed_flag_{false};

  std::mutex wire_mu_;
  std::condition_variable wire_cv_;
  bool local_ready_ = false;  // guarded by wire_mu_
  bool peer_ready_ = false;   // guarded by wire_mu_
  bool wire_failed_ = false;  // guarded by wire_mu_
  bool attached_ = false;     // guarded by wire_mu_
  Status close_reason_;       // why Fail() closed it; guarded by wire_mu_

  uint64_t id_ = 0;  // set by Register() before use

  // Progress thread state.
  uint64_t peer_id_ = 0;  // the peer connection's id, from its hello
  uint64_t next_out_ = 0;
  uint64_t next_deliver_ = 0;
  std::map<uint64_t, std::shared_ptr<Incoming>> inbox_;  // by sequence, until delivered in order
  InboundCharge charge_;                                 // the bytes of the messages in inbox_
  bool delivery_scheduled_ = false;
  ucp_ep_h ep_ = nullptr;
  bool ready_ = false;
  bool closed_ = false;
  std::unique_ptr<std::weak_ptr<UcxConnection>> err_arg_;
  std::vector<std::function<void()>> waiting_;        // ops queued until wire-up completed
  std::unordered_map<std::string, CachedKey> rkeys_;  // unpacked keys, by packed bytes
  std::set<uint64_t> revoked_;
  std::unordered_map<uint64_t, Op> ops_;
  uint64_t next_op_ = 1;
};

// Heap state of one UCX request chain (put -> flush, or get), freed by its last callback.
struct OpCtx {
  std::weak_ptr<UcxConnection> conn;
  uint64_t id = 0;
  bool is_write = false;
  bool flushed = false;
  std::function<void(Status)> then;  // FlushThen
};

void RequestCallback(void* request, ucs_status_t status, void* user) {
  auto* ctx = static_cast<OpCtx*>(user);
  if (request) ucp_request_free(request);
  Status st = status == UCS_OK ? Status::OK() : FromUcs("ucx operation", status);
  if (ctx->then) {
    auto then = std::move(ctx->then);
    delete ctx;
    then(st);
    return;
  }
  auto conn = ctx->conn.lock();
  uint64_t id = ctx->id;
  bool is_write = ctx->is_write, flushed = ctx->flushed;
  delete ctx;
  if (conn) conn->OpDone(id, st, is_write, flushed);
}

// Issues a request with RequestCallback; an immediate completion calls it right away (this
// already runs on the progress thread, never inside the user's call).
void Launch(ucs_status_ptr_t r, OpCtx* ctx) {
  if (UCS_PTR_IS_PTR(r)) return;  // the callback comes later
  RequestCallback(nullptr, UCS_PTR_STATUS(r), ctx);
}

ucp_request_param_t ParamFor(OpCtx* ctx) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = RequestCallback;
  p.user_data = ctx;
  return p;
}

void UcxConnection::FlushThen(std::function<void(Status)> then) {
  auto* ctx = new OpCtx;
  ctx->then = std::move(then);
  ucp_request_param_t p = ParamFor(ctx);
  Launch(ucp_ep_flush_nbx(ep_, &p), ctx);
}

void UcxConnection::Issue(bool is_write, void* local, size_t len, KeyParts parts, uint64_t remote,
                          DoneCallback done) {
  if (closed_) return done(Status::Aborted("connection to " + peer_ + " is closed"));
  if (revoked_.count(parts.region))
    return done(Status::InvalidArgument(fmt::format(
        "remote key names region {}, which was deregistered (stale key)", parts.region)));
  if (!ready_) {
    auto self = shared_from_this();
    waiting_.push_back([self, is_write, local, len, parts = std::move(parts), remote,
                        done = std::move(done)]() mutable {
      self->Issue(is_write, local, len, std::move(parts), remote, std::move(done));
    });
    return;
  }
  if (len == 0) return done(Status::OK());
  std::string packed(parts.rkey.begin(), parts.rkey.end());
  auto it = rkeys_.find(packed);
  if (it == rkeys_.end()) {
    ucp_rkey_h rk = nullptr;
    ucs_status_t st = ucp_ep_rkey_unpack(ep_, parts.rkey.data(), &rk);
    if (st != UCS_OK) return done(FromUcs("ucp_ep_rkey_unpack", st));
    it = rkeys_.emplace(std::move(packed), CachedKey{parts.region, rk}).first;
  }
  uint64_t id = next_op_++;
  ops_.emplace(id, Op{std::move(done)});
  auto* ctx = new OpCtx{weak_from_this(), id, is_write, false, nullptr};
  ucp_request_param_t p = ParamFor(ctx);
  ucs_status_ptr_t r = is_write ? ucp_put_nbx(ep_, local, len, remote, it->second.rkey, &p)
                                : ucp_get_nbx(ep_, local, len, remote, it->second.rkey, &p);
  Launch(r, ctx);
}

void UcxConnection::OpDone(uint64_t id, Status st, bool is_write, bool flushed) {
  auto it = ops_.find(id);
  if (it == ops_.end()) return;  // already failed by Shutdown
  if (st.ok() && is_write && !flushed && ep_) {
    // Remote completion: the bytes are in the target's memory before `done` says so.
    auto* ctx = new OpCtx{weak_from_this(), id, true, true, nullptr};
    ucp_request_param_t p = ParamFor(ctx);
    Launch(ucp_ep_flush_nbx(ep_, &p), ctx);
    return;
  }
  DoneCallback done = std::move(it->second.done);
  ops_.erase(it);
  done(st);
}

void UcxConnection::IssueSend(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) {
  if (closed_) return done(Status::Aborted("connection to " + peer_ + " is closed"));
  if (!ready_) {
    auto self = shared_from_this();
    waiting_.push_back([self, tag, meta = std::move(meta), payload = std::move(payload),
                        done = std::move(done)]() mutable {
      self->IssueSend(tag, std::move(meta), std::move(payload), std::move(done));
    });
    return;
  }
  struct Outgoing {
    AmHeader header;
    Bytes meta;
    Payload payload;
    ucp_dt_iov_t iov[2];
  };
  auto out = std::make_shared<Outgoing>();
  out->header = AmHeader{peer_id_, next_out_++, tag, static_cast<uint32_t>(meta.size())};
  out->meta = std::move(meta);
  out->payload = std::move(payload);
  size_t n = 0;
  if (out->payload.size > 0)
    out->iov[n++] = ucp_dt_iov_t{const_cast<void*>(out->payload.data), out->payload.size};
  if (!out->meta.empty()) out->iov[n++] = ucp_dt_iov_t{out->meta.data(), out->meta.size()};
  uint64_t id = next_op_++;
  ops_.emplace(id, Op{std::move(done), out});
  auto* ctx = new OpCtx{weak_from_this(), id, false, false, nullptr};
  ucp_request_param_t p = ParamFor(ctx);
  const void* buffer = n == 1 ? out->iov[0].buffer : out->iov;
  size_t count = n == 1 ? out->iov[0].length : n;
  if (n == 2) {
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = ucp_dt_make_iov();
  }
  Launch(ucp_am_send_nbx(ep_, kAmId, &out->header, sizeof(AmHeader), n ? buffer : nullptr,
                         n ? count : 0, &p),
         ctx);
}

struct RecvCtx {
  std::weak_ptr<UcxConnection> conn;
  std::shared_ptr<Incoming> in;
};

void RecvDone(void* request, ucs_status_t status, size_t, void* user) {
  auto* ctx = static_cast<RecvCtx*>(user);
  if (request) ucp_request_free(request);
  auto conn = ctx->conn.lock();
  auto in = std::move(ctx->in);
  delete ctx;
  if (conn) conn->Received(in, status);
}

void UcxConnection::OnAm(const AmHeader& h, void* data, size_t len,
                         const ucp_am_recv_param_t* param) {
  if (closed_) return;
  const ContextOptions& o = shared_->options;
  if (h.meta_len > len || h.meta_len > o.max_meta_bytes || len - h.meta_len > o.max_payload_bytes ||
      h.seq < next_deliver_ || h.seq - next_deliver_ >= kMaxReorderWindow || inbox_.count(h.seq) ||
      h.tag >= 0xFFFF0000u) {
    return Fail(Status::ProtocolError(
        fmt::format("malformed message from {} (tag {}, {} bytes, {} of metadata, seq {})", peer_,
                    h.tag, len, h.meta_len, h.seq)));
  }
  // A rendezvous message's buffer must hold all it claims before its bytes are fetched: the
  // budget bounds what peers can make this process hold (messages waiting to be delivered).
  if (!charge_.TryCharge(len)) {
    return Fail(Status::ProtocolError(fmt::format(
        "message of {} bytes from {} would exceed the inbound budget ({} bytes held by this "
        "connection, limit {}; {} by all, limit {})",
        len, peer_, charge_.held(), charge_.limit(), o.inbound_budget->used(),
        o.inbound_budget->limit())));
  }
  auto in = std::make_shared<Incoming>();
  in->tag = h.tag;
  in->meta_len = h.meta_len;
  in->bytes = Buffer(len);
  inbox_[h.seq] = in;
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
    auto* ctx = new RecvCtx{weak_from_this(), in};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.recv_am = RecvDone;
    p.user_data = ctx;
    ucs_status_ptr_t r =
        ucp_am_recv_data_nbx(shared_->progress.worker(), data, in->bytes.data(), len, &p);
    if (!UCS_PTR_IS_PTR(r)) RecvDone(nullptr, UCS_PTR_STATUS(r), len, ctx);
    return;
  }
  if (len > 0) std::memcpy(in->bytes.data(), data, len);
  in->ready = true;
  ScheduleDelivery();
}

void UcxConnection::Received(const std::shared_ptr<Incoming>& in, ucs_status_t st) {
  if (closed_) return;
  if (st != UCS_OK) {
    return Fail(FromUcs("receiving a message from " + peer_, st));
  }
  in->ready = true;
  ScheduleDelivery();
}

// Deliveries run after the progress call that received them (user handlers never run inside
// a UCP callback), in sequence order.
void UcxConnection::ScheduleDelivery() {
  if (delivery_scheduled_) return;
  delivery_scheduled_ = true;
  shared_->progress.Defer([self = shared_from_this()] {
    self->delivery_scheduled_ = false;
    self->Deliver();
  });
}

void UcxConnection::Deliver() {
  while (!closed_) {
    auto it = inbox_.begin();
    if (it == inbox_.end() || it->first != next_deliver_ || !it->second->ready) return;
    std::shared_ptr<Incoming> in = std::move(it->second);
    inbox_.erase(it);
    next_deliver_++;
    charge_.Release(in->bytes.size());
    Message m;
    m.tag = in->tag;
    size_t payload = in->bytes.size() - in->meta_len;
    m.meta.assign(in->bytes.data() + payload, in->bytes.data() + in->bytes.size());
    in->bytes.Truncate(payload);
    m.payload = std::move(in->bytes);
    if (user_.on_message) user_.on_message(shared_from_this(), std::move(m));
  }
}

ucs_status_t OnAmMessage(void* arg, const void* header, size_t header_length, void* data,
                         size_t length, const ucp_am_recv_param_t* param) {
  auto* s = static_cast<Shared*>(arg);
  if (header_length != sizeof(AmHeader)) {
    spdlog::error("[{}] ucx message with a {}-byte header (not ours); dropped", s->options.name,
                  header_length);
    return UCS_OK;
  }
  AmHeader h;
  std::memcpy(&h, header, sizeof(h));
  std::shared_ptr<UcxConnection> c;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    auto it = s->by_id.find(h.conn);
    if (it != s->by_id.end()) c = it->second.lock();
  }
  if (!c) {
    spdlog::warn("[{}] ucx message for unknown connection {}; dropped", s->options.name, h.conn);
    return UCS_OK;
  }
  c->OnAm(h, data, length, param);
  return UCS_OK;
}

void Shared::Revoke(uint64_t region) {
  std::vector<std::shared_ptr<UcxConnection>> live;
  uint64_t token;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = conns.begin(); it != conns.end();) {
      auto c = it->lock();
      if (!c || c->closed()) {
        it = conns.erase(it);
        continue;
      }
      live.push_back(std::move(c));
      ++it;
    }
    if (live.empty()) return;
    token = next_token++;
    revoke_waits[token] = static_cast<int>(live.size());
  }
  Bytes meta;
  Writer w(&meta);
  w.Put(region);
  w.Put(token);
  for (auto& c : live) c->SendRaw(kRevoke, meta);
  std::unique_lock<std::mutex> lock(mu);
  // Bounded: a peer that does not answer (dead, hung) does not hold the owner up for long.
  revoke_cv.wait_for(lock, kRevokeWait, [&] { return revoke_waits[token] <= 0; });
  revoke_waits.erase(token);
}

class UcxContext final : public Context {
 public:
  explicit UcxContext(std::shared_ptr<Shared> s) : shared_(std::move(s)) {}
  ~UcxContext() override {
    // The tcp side closes every connection; their shutdowns run on the progress thread.
    shared_->tcp.reset();
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
    auto s = shared_;
    using R = Result<std::unique_ptr<MemoryRegion>>;
    return s->progress.Call<R>(
        [s, size]() -> R {
          ucp_mem_map_params_t mp{};
          mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                          UCP_MEM_MAP_PARAM_FIELD_FLAGS;
          mp.address = nullptr;
          mp.length = size == 0 ? 1 : size;
          mp.flags = UCP_MEM_MAP_ALLOCATE;  // UCX allocates: truly one-sided over shm
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
          std::memset(ma.address, 0, size);
          uint64_t id;
          {
            std::lock_guard<std::mutex> lock(s->mu);
            id = s->next_region++;
          }
          RemoteKey key;
          key.base = reinterpret_cast<uint64_t>(ma.address);
          key.size = size;
          Writer w(&key.packed);
          w.Put(id);
          w.Put(KeySum(id, key.base, key.size, static_cast<uint8_t*>(rk), rkl));
          w.PutRaw(rk, rkl);
          ucp_rkey_buffer_release(rk);
          return std::unique_ptr<MemoryRegion>(
              new UcxRegion(s, id, RegionEntry{mh, ma.address, size}, std::move(key)));
        },
        R(Status::Aborted("transport context is shutting down")));
  }

  bool InLoopThread() const override { return shared_->progress.InThread(); }
  bool RunInLoop(std::function<void()> fn) override {
    return shared_->progress.Post(std::move(fn));
  }
  std::shared_ptr<void> HoldPolling() override { return shared_->progress.HoldPolling(); }
  std::chrono::microseconds busy_poll() const override { return shared_->options.busy_poll; }

  bool CanRegisterGpuMemory() const override {
    ucp_context_attr_t a{};
    a.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(shared_->ctx, &a) != UCS_OK) return false;
    return (a.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
  }

 private:
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
  s->tcp = std::move(tcp).value();
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
