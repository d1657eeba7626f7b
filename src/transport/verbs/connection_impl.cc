#include "transport/verbs/connection_impl.h"

#include <netdb.h>
#include <sys/socket.h>

#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/auth.h"

namespace shardps::transport::verbs {
namespace {

// What an address that rdma_cm cannot reach usually means.
constexpr const char* kNotRdmaHint =
    " (the verbs backend needs the address of an RDMA interface, RoCE or IPoIB, and loopback "
    "is none: a server listening on 0.0.0.0 must advertise that address, --advertise or "
    "SHARDPS_ADVERTISE, or listen on it, SHARDPS_SERVER_LISTEN)";

}  // namespace

VerbsConnection::~VerbsConnection() = default;

ConnectionHandlers VerbsConnection::TcpHandlers() {
  auto self = shared_from_this();
  ConnectionHandlers h;
  h.on_message = [self](const std::shared_ptr<Connection>&, Message m) {
    self->OnTcpMessage(std::move(m));
  };
  h.on_close = [self](const std::shared_ptr<Connection>&, Status st) { self->OnTcpClosed(st); };
  return h;
}

void VerbsConnection::Register() {
  std::lock_guard<std::mutex> lock(shared_->mu);
  do {
    token_ = auth::RandomId();
    if (token_ == 0) token_ = shared_->next_token++;  // no randomness: still unique
  } while (shared_->by_token.count(token_) != 0);
  shared_->by_token[token_] = weak_from_this();
}

void VerbsConnection::Unregister() {
  std::lock_guard<std::mutex> lock(shared_->mu);
  shared_->by_token.erase(token_);
}

void VerbsConnection::SetTcp(std::shared_ptr<Connection> tcp) {
  std::lock_guard<std::mutex> lock(mu_);
  tcp_ = std::move(tcp);
  peer_ = tcp_->peer();
}

void VerbsConnection::Attach(ConnectionHandlers user, uint16_t rdma_port,
                             std::string connect_host) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    user_ = std::move(user);
    rdma_port_ = rdma_port;
    connect_host_ = std::move(connect_host);
    attached_ = true;
  }
  cv_.notify_all();
  {
    // Listed for key revocation once its tcp side can carry the revocation.
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->conns.push_back(weak_from_this());
  }
  Bytes meta;
  Writer w(&meta);
  w.Put(token_);
  w.Put(rdma_port);
  w.Put(static_cast<uint8_t>(shared_->srq != nullptr));
  SendRaw(kHello, std::move(meta));
}

Status VerbsConnection::WaitConnected(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return connected_ || !connect_status_.ok(); }))
    return Status::Timeout("the RDMA queue pair to " + peer_ + " was not connected in time");
  return connect_status_;
}

void VerbsConnection::SetConnected(Status st) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (connected_ || !connect_status_.ok()) return;
    if (st.ok())
      connected_ = true;
    else
      connect_status_ = st;
  }
  cv_.notify_all();
}

bool VerbsConnection::Post(std::function<void()> fn, const DoneCallback& done) {
  if (shared_->Post(std::move(fn))) return true;
  if (done) done(Status::Aborted("transport context was destroyed"));
  return false;
}

void VerbsConnection::Send(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) {
  if (!done) done = [](Status) {};
  if (tag >= 0xFFFF0000u)
    return FailLater(std::move(done),
                     Status::InvalidArgument("message tags from 0xFFFF0000 are reserved"));
  SendOnTcp(next_seq_++, tag, meta, std::move(payload), std::move(done));
}

void VerbsConnection::SendOnTcp(uint64_t seq, uint32_t tag, const Bytes& meta, Payload payload,
                                DoneCallback done) {
  Bytes numbered;
  numbered.reserve(sizeof(seq) + meta.size());
  Writer w(&numbered);
  w.Put(seq);
  w.PutRaw(meta.data(), meta.size());
  // The tcp side completes on its own thread; the callback runs on this context's loop.
  auto self = shared_from_this();
  tcp_pending_++;
  tcp_->Send(tag, std::move(numbered), std::move(payload), [self, done](Status st) {
    auto fire = [self, done, st] {
      self->tcp_pending_--;
      done(st);
    };
    if (!self->shared_->Post(fire)) fire();
  });
}

Status VerbsConnection::CheckKey(bool is_write, size_t len, const RemoteKey& key, uint64_t offset,
                                 KeyParts* parts) const {
  Status st = ParseKey(key, parts);
  if (st.ok() && parts->rkey.size() != sizeof(uint32_t))
    st = Status::InvalidArgument("remote key is not a verbs key");
  if (st.ok() && (offset > key.size || len > key.size - offset))
    st = Status::InvalidArgument(
        fmt::format("{} of {} bytes at offset {} is outside the region of {} bytes",
                    is_write ? "write" : "read", len, offset, key.size));
  return st;
}

void VerbsConnection::WriteThenSend(const void* local, size_t len, const RemoteKey& key,
                                    uint64_t offset, uint32_t tag, Bytes meta, DoneCallback done) {
  if (!done) done = [](Status) {};
  if (tag >= 0xFFFF0000u)
    return FailLater(std::move(done),
                     Status::InvalidArgument("message tags from 0xFFFF0000 are reserved"));
  KeyParts parts;
  Status st = CheckKey(true, len, key, offset, &parts);
  if (!st.ok()) return FailLater(std::move(done), st);
  uint64_t seq = next_seq_++;
  uint64_t remote = key.base + offset;
  auto self = shared_from_this();
  // A number taken and then not sent (the write failed) is skipped explicitly, so that the
  // messages after it are not held back.
  DoneCallback finish = [self, seq, done](Status st) {
    if (!st.ok())
      self->SendRaw(kSkip, [seq] {
        Bytes b;
        Writer w(&b);
        w.Put(seq);
        return b;
      }());
    done(st);
  };
  Post(
      [self, local, len, parts = std::move(parts), remote, seq, tag, meta = std::move(meta),
       finish]() mutable {
        if (self->closing_ || self->closed_flag_)
          return finish(Status::Aborted("connection to " + self->peer_ + " is closed"));
        size_t bytes = kSendHeader + meta.size();
        if (self->ready_ && self->peer_takes_sends_ && bytes <= self->max_inline_ &&
            bytes <= kRecvSlotBytes) {
          auto message = std::make_shared<Bytes>();
          Writer w(message.get());
          w.Put(seq);
          w.Put(tag);
          w.Put(static_cast<uint32_t>(meta.size()));
          w.PutRaw(meta.data(), meta.size());
          self->Issue(true, const_cast<void*>(local), len, std::move(parts), remote,
                      std::move(finish), std::move(message));
          return;
        }
        self->Issue(true, const_cast<void*>(local), len, std::move(parts), remote,
                    [self, seq, tag, meta = std::move(meta), finish](Status st) {
                      if (!st.ok()) return finish(st);
                      self->SendOnTcp(seq, tag, meta, {}, finish);
                    });
      },
      finish);
}

void VerbsConnection::StartOp(bool is_write, void* local, size_t len, const RemoteKey& key,
                              uint64_t offset, DoneCallback done) {
  if (!done) done = [](Status) {};
  KeyParts parts;
  Status st = CheckKey(is_write, len, key, offset, &parts);
  uint64_t remote = key.base + offset;
  auto self = shared_from_this();
  Post(
      [self, is_write, local, len, parts = std::move(parts), remote, st, done]() mutable {
        if (!st.ok()) return done(st);
        self->Issue(is_write, local, len, std::move(parts), remote, std::move(done));
      },
      done);
}

bool VerbsConnection::Issue(bool is_write, void* local, size_t len, KeyParts parts, uint64_t remote,
                            DoneCallback done, std::shared_ptr<Bytes> message) {
  if (closing_ || closed_flag_) {
    done(Status::Aborted("connection to " + peer_ + " is closed"));
    return false;
  }
  if (revoked_.count(parts.region)) {
    done(Status::InvalidArgument(fmt::format(
        "remote key names region {}, which was deregistered (stale key)", parts.region)));
    return false;
  }
  if (len == 0 && !message) {
    done(Status::OK());
    return true;
  }
  uint32_t rkey = 0;
  std::memcpy(&rkey, parts.rkey.data(), sizeof(rkey));
  // The local memory needs a local key: a region of this context holds it, or it is
  // registered for this operation (and deregistered when it ends).
  std::shared_ptr<Registration> reg;
  if (len > 0) {
    reg = shared_->FindLocal(local, len);
    if (!reg) {
      int access = is_write ? 0 : IBV_ACCESS_LOCAL_WRITE;
      ibv_mr* mr = ibv_reg_mr(shared_->pd, local, len, access);
      if (mr == nullptr) {
        int err = errno;
        done(Status::ResourceExhausted(fmt::format(
            "ibv_reg_mr of {} bytes of local memory for an RDMA {} failed: {} (locked-memory "
            "limit {}; raise it with `ulimit -l` or systemd's LimitMEMLOCK, or use registered "
            "regions)",
            len, is_write ? "write" : "read", std::strerror(err), MemlockLimit())));
        return false;
      }
      reg = std::make_shared<Registration>();
      reg->mr = mr;
    }
  }
  uint64_t id = next_op_++;
  uint32_t pieces = static_cast<uint32_t>((len + shared_->max_piece - 1) / shared_->max_piece);
  ops_.emplace(id, Op{std::move(done), Status::OK(), pieces + (message ? 1u : 0u), parts.region,
                      reg, is_write, message});
  in_flight_by_region_[parts.region]++;
  auto base = reinterpret_cast<uint64_t>(local);
  Kind kind = is_write ? Kind::kWrite : Kind::kRead;
  for (uint64_t off = 0; off < len; off += shared_->max_piece) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(shared_->max_piece, len - off));
    backlog_.push_back(Piece{id, kind, base + off, n, reg->mr->lkey, remote + off, rkey});
  }
  // The message goes right behind the write on the same queue pair: RC delivers it only once
  // the written bytes are placed.
  if (message)
    backlog_.push_back(Piece{id, Kind::kSend, reinterpret_cast<uint64_t>(message->data()),
                             static_cast<uint32_t>(message->size()), 0, 0, 0});
  PostBacklog();
  return true;
}

void VerbsConnection::PostBacklog() {
  if (!ready_ || closing_) return;
  while (!backlog_.empty() && posted_ < kSendDepth &&
         shared_->outstanding < shared_->cq_size - shared_->srq_slots) {
    const Piece& p = backlog_.front();
    ibv_sge sge{};
    sge.addr = p.local;
    sge.length = p.length;
    sge.lkey = p.lkey;
    ibv_send_wr wr{};
    wr.wr_id = p.op;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.send_flags = IBV_SEND_SIGNALED;
    if (p.kind == Kind::kSend) {
      wr.opcode = IBV_WR_SEND;
      wr.send_flags |= IBV_SEND_INLINE;  // copied at posting: no local key needed
    } else {
      wr.opcode = p.kind == Kind::kWrite ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
      wr.wr.rdma.remote_addr = p.remote;
      wr.wr.rdma.rkey = p.rkey;
    }
    ibv_send_wr* bad = nullptr;
    int rc = ibv_post_send(qp_, &wr, &bad);
    if (rc != 0) {
      uint64_t op = p.op;
      backlog_.pop_front();
      Status st =
          Status::IOError(fmt::format("ibv_post_send to {} failed: {}", peer_, std::strerror(rc)));
      PieceDone(op, st);
      return Fail(st);
    }
    backlog_.pop_front();
    posted_++;
    shared_->outstanding++;
  }
  if (!backlog_.empty() && !listed_backlogged_) {
    listed_backlogged_ = true;
    shared_->backlogged.push_back(weak_from_this());
  }
}

void VerbsConnection::OnCompletion(const ibv_wc& wc) {
  posted_--;
  Status st;
  if (wc.status != IBV_WC_SUCCESS) {
    if (closing_ && wc.status == IBV_WC_WR_FLUSH_ERR) {
      st = op_close_status_;
    } else {
      auto it = ops_.find(wc.wr_id);
      bool is_write = it != ops_.end() && it->second.is_write;
      st = Status::IOError(fmt::format("RDMA {} with {} failed: {}",
                                       it != ops_.end() && it->second.message ? "write and send"
                                       : is_write                             ? "write"
                                                                              : "read",
                                       peer_, ibv_wc_status_str(wc.status)));
    }
  }
  PieceDone(wc.wr_id, st);
  // Any error but a flush leaves the queue pair in the error state: the connection is over.
  if (wc.status != IBV_WC_SUCCESS && wc.status != IBV_WC_WR_FLUSH_ERR)
    Fail(st.WithContext("the queue pair is in error"));
}

void VerbsConnection::OnReceive(const uint8_t* data, size_t len) {
  if (closing_) return;
  Reader r(data, len);
  uint64_t seq = 0;
  uint32_t tag = 0, meta_len = 0;
  if (!r.Get(&seq) || !r.Get(&tag) || !r.Get(&meta_len) || meta_len != r.remaining() ||
      tag >= 0xFFFF0000u)
    return Fail(Status::ProtocolError(
        fmt::format("malformed message on the queue pair from {} ({} bytes)", peer_, len)));
  Message m;
  m.tag = tag;
  m.meta.assign(data + kSendHeader, data + len);
  Arrived(seq, std::move(m));
}

void VerbsConnection::Arrived(uint64_t seq, std::optional<Message> m) {
  if (closing_) return;
  if (seq < next_deliver_ || seq - next_deliver_ >= kMaxReorderWindow || inbox_.count(seq))
    return Fail(Status::ProtocolError(fmt::format(
        "message number {} from {} is out of its window (next {})", seq, peer_, next_deliver_)));
  uint64_t bytes = m ? m->meta.size() + m->payload.size() : 0;
  if (!charge_.TryCharge(bytes))
    return Fail(Status::ProtocolError(fmt::format(
        "messages from {} waiting for an earlier one would exceed the inbound budget ({} bytes "
        "held, limit {})",
        peer_, charge_.held(), charge_.limit())));
  inbox_.emplace(seq, std::move(m));
  Deliver();
}

void VerbsConnection::Deliver() {
  while (!closing_ && !inbox_.empty() && inbox_.begin()->first == next_deliver_) {
    auto m = std::move(inbox_.begin()->second);
    inbox_.erase(inbox_.begin());
    next_deliver_++;
    if (!m) continue;  // a number the peer skipped
    charge_.Release(m->meta.size() + m->payload.size());
    if (user_.on_message) user_.on_message(shared_from_this(), std::move(*m));
  }
}

void VerbsConnection::PieceDone(uint64_t op, Status st) {
  auto it = ops_.find(op);
  if (it == ops_.end()) return;
  if (!st.ok() && it->second.st.ok()) it->second.st = st;
  if (--it->second.pieces_left > 0) return;
  Op o = std::move(it->second);
  ops_.erase(it);
  o.local.reset();  // a registration made for this operation ends here
  auto r = in_flight_by_region_.find(o.region);
  if (r != in_flight_by_region_.end() && --r->second <= 0) {
    in_flight_by_region_.erase(r);
    auto w = acks_waiting_.find(o.region);
    if (w != acks_waiting_.end()) {
      auto tokens = std::move(w->second);
      acks_waiting_.erase(w);
      for (uint64_t t : tokens) AckRevoke(t);
    }
  }
  o.done(o.st);
}

void VerbsConnection::OnRevoke(uint64_t region, uint64_t token) {
  revoked_.insert(region);
  // The owner deregisters once every peer acknowledged: after the operations in flight
  // against the region finished, so none of them meets a dead key.
  if (in_flight_by_region_.count(region))
    acks_waiting_[region].push_back(token);
  else
    AckRevoke(token);
}

void VerbsConnection::AckRevoke(uint64_t token) {
  Bytes ack;
  Writer w(&ack);
  w.Put(token);
  SendRaw(kRevokeAck, std::move(ack));
}

void VerbsConnection::OnTcpMessage(Message m) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, std::chrono::seconds(10), [&] { return attached_; })) return;
  }
  auto self = shared_from_this();
  if (m.tag == kHello) {
    Reader r(m.meta.data(), m.meta.size());
    uint64_t token = 0;
    uint16_t port = 0;
    uint8_t takes_sends = 0;
    if (!r.Get(&token) || !r.Get(&port) || !r.Get(&takes_sends) || r.remaining() != 0)
      return Fail(Status::ProtocolError("malformed verbs hello from " + peer_));
    shared_->Post([self, token, port, takes_sends] {
      self->peer_token_ = token;
      self->peer_port_ = port;
      self->peer_takes_sends_ = takes_sends != 0;
      // The side that made the tcp connection connects the queue pair to the other's rdma_cm
      // port; the other accepts it (Shared::HandleCmEvents).
      if (self->rdma_port_ == 0) {
        if (port == 0)
          return self->Fail(Status::ProtocolError("verbs hello from " + self->peer_ +
                                                  " names no rdma_cm port to connect to"));
        self->StartConnect();
      }
    });
    return;
  }
  if (m.tag == kRevoke) {
    Reader r(m.meta.data(), m.meta.size());
    uint64_t region = 0, token = 0;
    if (!r.Get(&region) || !r.Get(&token))
      return Fail(Status::ProtocolError("malformed key revocation from " + peer_));
    shared_->Post([self, region, token] { self->OnRevoke(region, token); });
    return;
  }
  if (m.tag == kRevokeAck) {
    Reader r(m.meta.data(), m.meta.size());
    uint64_t token = 0;
    if (!r.Get(&token))
      return Fail(Status::ProtocolError("malformed revocation ack from " + peer_));
    shared_->revocations.Answered(token);
    return;
  }
  if (m.tag == kSkip) {
    Reader r(m.meta.data(), m.meta.size());
    uint64_t seq = 0;
    if (!r.Get(&seq)) return Fail(Status::ProtocolError("malformed skip from " + peer_));
    shared_->Post([self, seq] { self->Arrived(seq, std::nullopt); });
    return;
  }
  if (m.tag >= 0xFFFF0000u)
    return Fail(Status::ProtocolError(
        fmt::format("unexpected control message (tag {:#x}) from {}", m.tag, peer_)));
  // User messages run on this context's loop, in their numbers' order.
  uint64_t seq = 0;
  if (m.meta.size() < sizeof(seq))
    return Fail(Status::ProtocolError("message without its number from " + peer_));
  std::memcpy(&seq, m.meta.data(), sizeof(seq));
  m.meta.erase(m.meta.begin(), m.meta.begin() + sizeof(seq));
  auto held = std::make_shared<Message>(std::move(m));
  shared_->Post([self, seq, held] { self->Arrived(seq, std::move(*held)); });
}

void VerbsConnection::Fail(Status why) {
  spdlog::error("[{}] {}; closing", shared_->options.name, why.ToString());
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (close_reason_.ok()) close_reason_ = why;
  }
  if (tcp_) tcp_->Close();
}

void VerbsConnection::OnTcpClosed(Status st) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(10), [&] { return attached_; });
    if (st.ok() && !close_reason_.ok()) st = close_reason_;  // closed by Fail()
  }
  closed_flag_ = true;
  SetConnected(st.ok() ? Status::Unavailable("connection to " + peer_ + " closed during set-up")
                       : st);
  auto self = shared_from_this();
  if (!shared_->Post([self, st] { self->Shutdown(st); })) {
    // The loop is gone (the context is being destroyed): nothing runs concurrently any more.
    Shutdown(st);
    FinishClosing(true);
  }
}

void VerbsConnection::StartConnect() {
  if (closing_ || id_) return;
  if (rdma_create_id(shared_->events, &id_, nullptr, RDMA_PS_TCP) != 0) {
    id_ = nullptr;
    return Fail(Status::IOError(fmt::format("rdma_create_id: {}", std::strerror(errno))));
  }
  shared_->by_cm_id[id_] = weak_from_this();
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* ai = nullptr;
  std::string port = std::to_string(peer_port_);
  int rc = getaddrinfo(connect_host_.c_str(), port.c_str(), &hints, &ai);
  if (rc != 0)
    return Fail(
        Status::Unavailable(fmt::format("cannot resolve {}: {}", connect_host_, gai_strerror(rc))));
  rc = rdma_resolve_addr(id_, nullptr, ai->ai_addr, kResolveMs);
  int err = errno;
  freeaddrinfo(ai);
  if (rc != 0)
    return Fail(Status::Unavailable(
        fmt::format("rdma_resolve_addr {}: {}", connect_host_, std::strerror(err))));
}

rdma_conn_param VerbsConnection::ConnParam(const uint64_t* token, uint8_t initiator,
                                           uint8_t responder) const {
  rdma_conn_param p{};
  if (token) {
    p.private_data = token;
    p.private_data_len = sizeof(*token);
  }
  p.responder_resources = responder;
  p.initiator_depth = initiator;
  p.retry_count = 7;
  p.rnr_retry_count = 7;
  return p;
}

void VerbsConnection::CreateQp(rdma_cm_id* id) {
  if (id->verbs != shared_->device)
    return Fail(Status::Unavailable(fmt::format(
        "{} is reached through RDMA device {}, but this context uses {} (set VERBS_DEVICE)",
        connect_host_.empty() ? peer_ : connect_host_,
        id->verbs ? ibv_get_device_name(id->verbs->device) : "(none)", shared_->device_name)));
  ibv_qp_init_attr qa{};
  qa.send_cq = shared_->cq;
  qa.recv_cq = shared_->cq;
  qa.qp_type = IBV_QPT_RC;
  qa.cap.max_send_wr = kSendDepth;
  qa.cap.max_send_sge = 1;
  qa.cap.max_inline_data = shared_->max_inline;
  qa.srq = shared_->srq;  // messages land in the context's shared receive queue
  if (!qa.srq) {
    qa.cap.max_recv_wr = 1;
    qa.cap.max_recv_sge = 1;
  }
  int rc = rdma_create_qp(id, shared_->pd, &qa);
  if (rc != 0 && qa.cap.max_inline_data > 0) {
    qa.cap.max_inline_data = 0;  // a device without inline data: messages go on tcp
    rc = rdma_create_qp(id, shared_->pd, &qa);
  }
  if (rc != 0)
    return Fail(Status::IOError(fmt::format("rdma_create_qp: {}", std::strerror(errno))));
  qp_ = id->qp;
  max_inline_ = qa.cap.max_inline_data;
  shared_->by_qp[qp_->qp_num] = weak_from_this();
}

void VerbsConnection::Accept(rdma_cm_id* id, uint8_t their_initiator, uint8_t their_responder) {
  if (closing_ || id_) {
    rdma_reject(id, nullptr, 0);
    rdma_destroy_id(id);
    return;
  }
  id_ = id;
  shared_->by_cm_id[id_] = weak_from_this();
  CreateQp(id);
  if (!qp_) return;
  // READs in flight: no more than the connecting side can take, nor than this side can.
  rdma_conn_param p = ConnParam(nullptr, std::min(shared_->rd_atom, their_responder),
                                std::min(shared_->rd_atom, their_initiator));
  if (rdma_accept(id, &p) != 0)
    Fail(Status::IOError(fmt::format("rdma_accept: {}", std::strerror(errno))));
}

void VerbsConnection::OnCmEvent(rdma_cm_event_type type, int status, rdma_cm_id* id) {
  if (closing_ || id != id_) return;
  switch (type) {
    case RDMA_CM_EVENT_ADDR_RESOLVED:
      if (rdma_resolve_route(id, kResolveMs) != 0)
        Fail(Status::Unavailable(fmt::format("rdma_resolve_route to {}: {}{}", connect_host_,
                                             std::strerror(errno), kNotRdmaHint)));
      return;
    case RDMA_CM_EVENT_ROUTE_RESOLVED: {
      CreateQp(id);
      if (!qp_) return;
      rdma_conn_param p = ConnParam(&peer_token_, shared_->rd_atom, shared_->rd_atom);
      if (rdma_connect(id, &p) != 0)
        Fail(Status::Unavailable(fmt::format("rdma_connect: {}", std::strerror(errno))));
      return;
    }
    case RDMA_CM_EVENT_ESTABLISHED:
      ready_ = true;
      SetConnected(Status::OK());
      PostBacklog();
      return;
    case RDMA_CM_EVENT_ADDR_ERROR:
    case RDMA_CM_EVENT_ROUTE_ERROR:
    case RDMA_CM_EVENT_CONNECT_ERROR:
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_REJECTED: {
      std::string what = rdma_event_str(type);
      std::string hint;
      if (type == RDMA_CM_EVENT_ADDR_ERROR || type == RDMA_CM_EVENT_ROUTE_ERROR)
        hint = kNotRdmaHint;
      Fail(Status::Unavailable(fmt::format("RDMA connection to {} failed: {} (status {}){}",
                                           connect_host_.empty() ? peer_ : connect_host_, what,
                                           status, hint)));
      return;
    }
    case RDMA_CM_EVENT_DISCONNECTED: {
      // The peer closed its side (its tcp connection closes too): no error worth a log line.
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (close_reason_.ok())
          close_reason_ = Status::Unavailable("the peer " + peer_ + " disconnected");
      }
      if (tcp_) tcp_->Close();
      return;
    }
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
      Fail(Status::Unavailable(
          fmt::format("the RDMA connection to {} ended: {}", peer_, rdma_event_str(type))));
      return;
    default:
      return;
  }
}

void VerbsConnection::Shutdown(Status st) {
  if (closing_) return;
  closing_ = true;
  closed_flag_ = true;
  close_status_ = st;
  op_close_status_ = st.ok() ? Status::Aborted("connection to " + peer_ + " was closed") : st;
  {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->by_token.erase(token_);
  }
  SetConnected(Status::Unavailable("connection to " + peer_ + " closed during set-up"));
  inbox_.clear();
  charge_.ReleaseAll();
  auto backlog = std::move(backlog_);
  backlog_.clear();
  for (auto& p : backlog) PieceDone(p.op, op_close_status_);
  // The queue pair's posted work flushes with errors; the connection finishes once it has.
  if (qp_) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_ERR;
    ibv_modify_qp(qp_, &a, IBV_QP_STATE);
  }
  if (id_ && ready_) rdma_disconnect(id_);
  flush_deadline_ = std::chrono::steady_clock::now() + kFlushWait;
  if (!FinishClosing(false)) shared_->closing.push_back(shared_from_this());
}

bool VerbsConnection::FinishClosing(bool force) {
  if (finished_) return true;
  if ((posted_ > 0 || tcp_pending_.load() > 0) && !force &&
      std::chrono::steady_clock::now() < flush_deadline_)
    return false;
  finished_ = true;
  // What the queue pair left in the completion queue is taken first (it counts in posted_).
  if (qp_ && posted_ > 0) shared_->PollCompletions();
  if (posted_ > 0) {
    spdlog::warn("[{}] {} RDMA operations to {} did not flush in time; abandoning them",
                 shared_->options.name, posted_, peer_);
    shared_->outstanding -= posted_;
    posted_ = 0;
  }
  auto ops = std::move(ops_);
  ops_.clear();
  for (auto& [id, op] : ops) op.done(op.st.ok() ? op_close_status_ : op.st);
  in_flight_by_region_.clear();
  acks_waiting_.clear();
  if (qp_) {
    shared_->by_qp.erase(qp_->qp_num);
    rdma_destroy_qp(id_);
    qp_ = nullptr;
  }
  if (id_) {
    shared_->by_cm_id.erase(id_);
    rdma_destroy_id(id_);
    id_ = nullptr;
  }
  auto on_close = std::move(user_.on_close);
  user_ = ConnectionHandlers{};
  if (on_close) on_close(shared_from_this(), close_status_);
  return true;
}

}  // namespace shardps::transport::verbs
