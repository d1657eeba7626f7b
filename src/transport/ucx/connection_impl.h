// A ucx connection: UCP endpoint for one-sided operations and active messages, tcp
// connection beside it for its life (hello, ready, key revocation). Progress thread state is
// touched on the progress thread only.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/auth.h"
#include "transport/budget.h"
#include "transport/connection.h"
#include "transport/keys.h"
#include "transport/ucx/context_impl.h"
#include "transport/ucx/loop.h"

namespace shardps::transport::ucx {

// Tags of the backend's own control messages on the tcp channel (never shown to the user).
inline constexpr uint32_t kHello = 0xFFFF0001;      // meta: this side's UCP worker address
inline constexpr uint32_t kRevoke = 0xFFFF0002;     // meta: u64 region id, u64 token
inline constexpr uint32_t kRevokeAck = 0xFFFF0003;  // meta: u64 token
inline constexpr uint32_t kReady = 0xFFFF0004;      // the sender's endpoint to us is wired up
inline constexpr auto kRevokeWait = std::chrono::milliseconds(2000);

// User messages travel as UCP active messages on the connection's endpoint (the tcp channel
// only bootstraps: hello, ready, key revocation, and the connection's life). Header: the
// receiving connection's id, a per-connection sequence number (delivery is in that order),
// the tag and the metadata length; data: payload then metadata.
inline constexpr unsigned kAmId = 1;
// A message may arrive at most this many sequence numbers ahead of the next one delivered.
inline constexpr uint64_t kMaxReorderWindow = 1 << 16;
struct AmHeader {
  uint64_t conn = 0;
  uint64_t seq = 0;
  uint32_t tag = 0;
  uint32_t meta_len = 0;
};

// A message being received: payload then metadata, split on delivery.
struct Incoming {
  uint32_t tag = 0;
  uint32_t meta_len = 0;
  Buffer bytes;
  bool ready = false;
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
  // Gives the connection its id (named in the messages its peer sends it) and lists it. The id
  // is random (OpenSSL's generator), so a UCX message can only name a connection whose id was
  // handed over the authenticated control connection (transport/auth.h).
  void Register() {
    std::lock_guard<std::mutex> lock(shared_->mu);
    do {
      id_ = auth::RandomId();
      if (id_ == 0) id_ = shared_->next_conn++;  // no randomness: still unique
    } while (shared_->by_id.count(id_) != 0);
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
  void FailLater(DoneCallback done, Status why) override {
    Post([done, why] { done(why); }, done);
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
      shared_->revocations.Answered(token);
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
    FailPending(ops_, op_st);
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

// The active-message handler of a context (arg: its Shared): hands each message to the
// connection its header names; messages that name none are dropped.
ucs_status_t OnAmMessage(void* arg, const void* header, size_t header_length, void* data,
                         size_t length, const ucp_am_recv_param_t* param);

}  // namespace shardps::transport::ucx
