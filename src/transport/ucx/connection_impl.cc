#include "transport/ucx/connection_impl.h"

#include <cstring>

namespace shardps::transport::ucx {

// Heap state of one UCX request chain (put -> flush, or get), freed by its last callback.
struct OpCtx {
  std::weak_ptr<UcxConnection> conn;
  uint64_t id = 0;
  bool is_write = false;
  bool flushed = false;
  std::function<void(Status)> then;  // FlushThen
};

namespace {

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

}  // namespace

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

}  // namespace shardps::transport::ucx
