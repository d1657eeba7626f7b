#include "transport/tcp/connection_impl.h"

#include "core/tsan.h"

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace shardps::transport::tcp {
namespace {

constexpr size_t kStagingBytes = 256 << 10;
constexpr size_t kDirectRecvThreshold = 64 << 10;
// A message's payload buffer is allocated as its bytes arrive, never as its header claims: it
// grows to at most this many times what came so far (a peer that stalls holds that much). A
// growth that cannot happen in place copies what came (realloc moves a large buffer's pages
// instead): a factor of 4 rather than 2 copies at most 1.3 MiB of a 4 MiB payload rather than
// 3.9 MiB, and allocates 5.3 MiB rather than 7.9 (a forwarded push: docs/perf.md).
constexpr uint64_t kPayloadGrowth = 4;
constexpr int kMaxIov = 64;

Bytes EncodeStatus(const Status& st) {
  Bytes b;
  Writer w(&b);
  w.Put<int32_t>(static_cast<int32_t>(st.code()));
  w.PutString(st.message());
  return b;
}

bool DecodeStatus(Reader* r, Status* out) {
  int32_t code = 0;
  std::string msg;
  if (!r->Get(&code) || !r->GetString(&msg)) return false;
  if (code == 0) {
    *out = Status::OK();
  } else {
    *out = Status::RemoteError(msg);
  }
  return true;
}

Status DecodeKey(const RemoteKey& key, uint64_t* id, uint64_t* secret) {
  Reader r(key.packed.data(), key.packed.size());
  if (!r.Get(id) || !r.Get(secret) || !r.done())
    return Status::InvalidArgument("remote key is not a tcp key");
  return Status::OK();
}

}  // namespace

TcpConnection::TcpConnection(std::shared_ptr<Shared> shared, int fd, std::string peer,
                             std::unique_ptr<TlsSession> tls)
    : shared_(std::move(shared)),
      fd_(fd),
      tls_(std::move(tls)),
      peer_(std::move(peer)),
      charge_(shared_->options.inbound_budget.get(), shared_->options.connection_inbound_bytes) {
  in_buf_.resize(kStagingBytes);
}

TcpConnection::~TcpConnection() {
  tls_.reset();
  if (fd_ >= 0) ::close(fd_);
}

ssize_t TcpConnection::SendV(iovec* iov, int count) {
  if (tls_) return tls_->Send(iov, count);
  msghdr mh{};
  mh.msg_iov = iov;
  mh.msg_iovlen = static_cast<size_t>(count);
  return ::sendmsg(fd_, &mh, MSG_NOSIGNAL);
}

ssize_t TcpConnection::RecvInto(void* buf, size_t len) {
  if (tls_) return tls_->Recv(buf, len);
  return ::recv(fd_, buf, len, 0);
}

void TcpConnection::Start(ConnectionHandlers handlers) {
  handlers_ = std::move(handlers);
  started_ = true;
  auto self = shared_from_this();
  shared_->connections.insert(self);
  std::weak_ptr<TcpConnection> weak = self;
  Status st = shared_->loop.Add(fd_, EPOLLIN | EPOLLRDHUP, [weak](uint32_t ev) {
    if (auto c = weak.lock()) c->OnEvents(ev);
  });
  if (!st.ok()) Fail(st);
  // Bytes TLS already decrypted: the socket will not signal them.
  if (st.ok() && tls_ && tls_->HasPending())
    shared_->loop.Defer([weak] {
      if (auto c = weak.lock()) c->OnEvents(EPOLLIN);
    });
}

void TcpConnection::Post(std::function<void()> fn, const DoneCallback& done) {
  if (!shared_->loop.Defer(std::move(fn))) {
    // The context is gone: nothing can run on its loop any more.
    if (done) done(Status::Aborted("transport context was destroyed"));
  }
}

void TcpConnection::Send(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) {
  auto self = shared_from_this();
  Post(
      [self, tag, meta = std::move(meta), payload = std::move(payload), done]() mutable {
        self->Enqueue(FrameType::kMessage, tag, 0, std::move(meta), std::move(payload),
                      std::move(done));
      },
      done);
}

void TcpConnection::Write(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
                          DoneCallback done) {
  StartOneSided(FrameType::kWriteReq, const_cast<void*>(local), len, key, offset, std::move(done));
}

void TcpConnection::WriteThenSend(const void* local, size_t len, const RemoteKey& key,
                                  uint64_t offset, uint32_t tag, Bytes meta, DoneCallback done) {
  auto self = shared_from_this();
  uint64_t id = 0, secret = 0;
  Status st = DecodeKey(key, &id, &secret);
  Post(
      [self, st, id, secret, offset, local, len, tag, meta = std::move(meta), done]() mutable {
        if (!st.ok()) return done(st);
        Bytes m;
        Writer w(&m);
        w.Put(id);
        w.Put(secret);
        w.Put(offset);
        w.PutRaw(meta.data(), meta.size());
        self->Enqueue(FrameType::kWriteMsg, tag, 0, std::move(m), Payload::View(local, len),
                      std::move(done));
      },
      done);
}

void TcpConnection::Read(void* local, size_t len, const RemoteKey& key, uint64_t offset,
                         DoneCallback done) {
  StartOneSided(FrameType::kReadReq, local, len, key, offset, std::move(done));
}

void TcpConnection::StartOneSided(FrameType type, void* local, size_t len, const RemoteKey& key,
                                  uint64_t offset, DoneCallback done) {
  auto self = shared_from_this();
  uint64_t id = 0, secret = 0;
  Status st = DecodeKey(key, &id, &secret);
  Post(
      [self, type, st, id, secret, offset, local, len, done]() mutable {
        if (!st.ok()) return done(st);
        bool read = type == FrameType::kReadReq;
        Bytes meta;
        Writer w(&meta);
        w.Put(id);
        w.Put(secret);
        w.Put(offset);
        if (read) w.Put<uint64_t>(len);
        self->StartRequest(type, std::move(meta), read ? Payload{} : Payload::View(local, len),
                           PendingOp{std::move(done), read ? local : nullptr, len, read});
      },
      done);
}

void TcpConnection::FailLater(DoneCallback done, Status why) {
  Post([done, why] { done(why); }, done);
}

void TcpConnection::Close() {
  auto self = shared_from_this();
  Post([self] { self->Shutdown(Status::OK(), true); }, nullptr);
}

void TcpConnection::StartRequest(FrameType type, Bytes meta, Payload payload, PendingOp op) {
  if (closed_) return op.done(Status::Aborted("connection to " + peer_ + " is closed"));
  uint64_t id = next_request_++;
  pending_.emplace(id, std::move(op));
  Enqueue(type, 0, id, std::move(meta), std::move(payload), nullptr);
}

void TcpConnection::Enqueue(FrameType type, uint32_t aux, uint64_t request_id, Bytes meta,
                            Payload payload, DoneCallback done, bool one_sided) {
  if (closed_) {
    if (done) done(Status::Aborted("connection to " + peer_ + " is closed"));
    return;
  }
  OutFrame f;
  FrameHeader h;
  h.type = type;
  h.aux = aux;
  h.meta_len = static_cast<uint32_t>(meta.size());
  h.payload_len = payload.size;
  h.request_id = request_id;
  f.head.resize(kFrameHeaderSize + meta.size());
  h.EncodeTo(f.head.data());
  if (!meta.empty()) std::copy(meta.begin(), meta.end(), f.head.begin() + kFrameHeaderSize);
  f.payload = std::move(payload);
  f.done = std::move(done);
  f.one_sided = one_sided;
  out_head_bytes_ += f.head.size();
  out_.push_back(std::move(f));
  if (out_head_bytes_ > shared_->options.max_send_queue_bytes) {
    // A peer that asks and does not read the answers cannot make the queue grow without bound.
    return Fail(Status::ProtocolError(
        fmt::format("{} bytes of frames queued to {}, which does not read them (limit {})",
                    out_head_bytes_, peer_, shared_->options.max_send_queue_bytes)));
  }
  if (started_ && !want_out_) FlushOut();
}

void TcpConnection::FlushOut() {
  while (!out_.empty() && !closed_) {
    iovec iov[kMaxIov];
    int cnt = 0;
    bool one_sided = false;
    for (auto it = out_.begin(); it != out_.end() && cnt + 2 <= kMaxIov; ++it) {
      one_sided = one_sided || it->one_sided;
      size_t off = it->sent;
      if (off < it->head.size()) {
        iov[cnt++] = {it->head.data() + off, it->head.size() - off};
        off = 0;
      } else {
        off -= it->head.size();
      }
      if (it->payload.size > off) {
        iov[cnt++] = {const_cast<uint8_t*>(static_cast<const uint8_t*>(it->payload.data)) + off,
                      it->payload.size - off};
      }
    }
    ssize_t n;
    if (one_sided) {
      // Registered memory is read as an RDMA NIC reads it: without synchronization with its
      // owner (the reader checks consistency itself; src/core/tsan.h).
      UnsynchronizedReads unsynchronized;
      n = SendV(iov, cnt);
    } else {
      n = SendV(iov, cnt);
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!want_out_) {
          want_out_ = true;
          shared_->loop.Modify(fd_, EPOLLIN | EPOLLOUT | EPOLLRDHUP);
        }
        return;
      }
      return Fail(Status::FromErrno("send to " + peer_, errno));
    }
    size_t left = static_cast<size_t>(n);
    while (!out_.empty()) {
      OutFrame& f = out_.front();
      size_t total = f.head.size() + f.payload.size;
      size_t take = std::min(left, total - f.sent);
      f.sent += take;
      left -= take;
      if (f.sent < total) break;
      DoneCallback done = std::move(f.done);
      out_head_bytes_ -= f.head.size();
      out_.pop_front();
      if (done) done(Status::OK());
    }
  }
  if (want_out_ && !closed_) {
    want_out_ = false;
    shared_->loop.Modify(fd_, EPOLLIN | EPOLLRDHUP);
  }
}

void TcpConnection::OnEvents(uint32_t events) {
  if (closed_) return;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
    if (!ReadSome()) return;
  }
  if (!closed_ && (events & EPOLLOUT)) FlushOut();
}

bool TcpConnection::ReadSome() {
  for (int rounds = 0; rounds < 64; ++rounds) {
    if (!ParseStaged()) return false;
    ssize_t n;
    uint64_t want = in_hdr_.payload_len - in_got_;
    if (in_state_ == InState::kPayload && in_start_ == in_end_ && in_dst_ != nullptr &&
        want >= kDirectRecvThreshold) {
      if (in_growable_) {
        // A message's buffer grows with what arrives: to at most kPayloadGrowth times what came
        // so far.
        uint64_t step = std::min<uint64_t>(
            want, std::max<uint64_t>((kPayloadGrowth - 1) * in_got_, kStagingBytes));
        if (!GrowPayload(in_got_ + step)) return false;
        want = std::min<uint64_t>(want, in_msg_.payload.size() - in_got_);
      }
      n = RecvInto(in_dst_ + in_got_, static_cast<size_t>(want));
      if (n > 0) {
        in_got_ += static_cast<uint64_t>(n);
        if (in_got_ == in_hdr_.payload_len && !OnPayloadComplete()) return false;
        continue;
      }
    } else {
      if (in_start_ == in_end_) in_start_ = in_end_ = 0;
      if (in_end_ == in_buf_.size()) {
        std::copy(in_buf_.begin() + static_cast<ptrdiff_t>(in_start_),
                  in_buf_.begin() + static_cast<ptrdiff_t>(in_end_), in_buf_.begin());
        in_end_ -= in_start_;
        in_start_ = 0;
      }
      n = RecvInto(in_buf_.data() + in_end_, in_buf_.size() - in_end_);
      if (n > 0) {
        in_end_ += static_cast<size_t>(n);
        continue;
      }
    }
    if (n == 0) {
      Fail(Status::Unavailable("connection closed by peer " + peer_));
      return false;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
    Fail(Status::FromErrno("recv from " + peer_, errno));
    return false;
  }
  // Fairness: let other connections run; epoll is level-triggered and calls again, but not for
  // bytes TLS already decrypted: those are read again from the loop's queue.
  if (tls_ && tls_->HasPending()) {
    std::weak_ptr<TcpConnection> weak = shared_from_this();
    shared_->loop.Defer([weak] {
      if (auto c = weak.lock()) c->OnEvents(EPOLLIN);
    });
  }
  return ParseStaged();
}

bool TcpConnection::ParseStaged() {
  for (;;) {
    if (closed_) return false;
    size_t avail = in_end_ - in_start_;
    switch (in_state_) {
      case InState::kHeader: {
        if (avail < kFrameHeaderSize) return true;
        Status st = in_hdr_.DecodeFrom(in_buf_.data() + in_start_, shared_->options.max_meta_bytes,
                                       shared_->options.max_payload_bytes);
        in_start_ += kFrameHeaderSize;
        if (!st.ok()) {
          Fail(st.WithContext("from " + peer_));
          return false;
        }
        in_got_ = 0;
        in_state_ = InState::kMeta;
        in_meta_ = Bytes();
        break;
      }
      case InState::kMeta: {
        // The metadata is gathered as it arrives: its buffer grows with the bytes received
        // (within the inbound budget), not with the length the header claims.
        size_t take = std::min<size_t>(avail, in_hdr_.meta_len - in_meta_.size());
        size_t need = in_meta_.size() + take;
        if (need > in_meta_.capacity()) {
          size_t cap = std::min<size_t>(in_hdr_.meta_len,
                                        std::max<size_t>({need, 2 * in_meta_.capacity(), 256}));
          if (!Charge(cap - in_meta_.capacity(), "frame metadata")) return false;
          in_meta_.reserve(cap);
        }
        in_meta_.insert(in_meta_.end(), in_buf_.begin() + static_cast<ptrdiff_t>(in_start_),
                        in_buf_.begin() + static_cast<ptrdiff_t>(in_start_ + take));
        in_start_ += take;
        if (in_meta_.size() < in_hdr_.meta_len) return true;
        if (!OnMetaComplete()) return false;
        in_state_ = InState::kPayload;
        if (in_hdr_.payload_len == 0 && !OnPayloadComplete()) return false;
        break;
      }
      case InState::kPayload: {
        uint64_t want = in_hdr_.payload_len - in_got_;
        size_t take = static_cast<size_t>(std::min<uint64_t>(avail, want));
        if (take == 0) return true;
        if (in_growable_ && !GrowPayload(in_got_ + take)) return false;
        if (in_dst_ != nullptr) std::memcpy(in_dst_ + in_got_, in_buf_.data() + in_start_, take);
        in_start_ += take;
        in_got_ += take;
        if (in_got_ < in_hdr_.payload_len) return true;
        if (!OnPayloadComplete()) return false;
        break;
      }
    }
  }
}

bool TcpConnection::OnMetaComplete() {
  in_dst_ = nullptr;
  in_region_.reset();
  in_refusal_ = Status::OK();
  Reader r(in_meta_.data(), in_meta_.size());
  switch (in_hdr_.type) {
    case FrameType::kMessage: {
      in_msg_ = Message{};
      in_msg_.tag = in_hdr_.aux;
      in_msg_.meta = std::move(in_meta_);
      in_meta_ = Bytes();
      // Allocated as the bytes arrive (GrowPayload), not as the header claims.
      in_msg_.payload = Buffer();
      in_growable_ = true;
      in_dst_ = nullptr;
      if (in_hdr_.payload_len > 0 && !GrowPayload(std::min<uint64_t>(in_hdr_.payload_len, 4096)))
        return false;
      return true;
    }
    case FrameType::kWriteReq: {
      uint64_t id = 0, secret = 0, offset = 0;
      if (!r.Get(&id) || !r.Get(&secret) || !r.Get(&offset) || !r.done()) {
        Fail(Status::ProtocolError("malformed write request from " + peer_));
        return false;
      }
      auto region = shared_->Lookup(id, secret, offset, in_hdr_.payload_len, "write");
      if (!region.ok()) {
        in_refusal_ = region.status();
      } else {
        in_region_ = *region;
        in_dst_ = in_region_->data + offset;
      }
      return true;  // a refused write's payload is drained, then the refusal is answered
    }
    case FrameType::kWriteMsg: {
      uint64_t id = 0, secret = 0, offset = 0;
      if (!r.Get(&id) || !r.Get(&secret) || !r.Get(&offset)) {
        Fail(Status::ProtocolError("malformed write-and-send from " + peer_));
        return false;
      }
      auto region = shared_->Lookup(id, secret, offset, in_hdr_.payload_len, "write");
      if (!region.ok()) {
        // No answer travels back: a peer that writes where it may not is closed.
        Fail(Status::ProtocolError(
            fmt::format("write-and-send from {} refused: {}", peer_, region.status().message())));
        return false;
      }
      in_region_ = *region;
      in_dst_ = in_region_->data + offset;
      auto rest = r.rest();
      in_msg_ = Message{};
      in_msg_.tag = in_hdr_.aux;
      in_msg_.meta.assign(rest.begin(), rest.end());
      in_meta_ = Bytes();
      return true;
    }
    case FrameType::kReadReq: {
      uint64_t id = 0, secret = 0, offset = 0, len = 0;
      if (!r.Get(&id) || !r.Get(&secret) || !r.Get(&offset) || !r.Get(&len) || !r.done() ||
          in_hdr_.payload_len != 0) {
        Fail(Status::ProtocolError("malformed read request from " + peer_));
        return false;
      }
      auto region = shared_->Lookup(id, secret, offset, len, "read");
      Status st = region.status();
      if (st.ok() && len > shared_->options.max_payload_bytes)
        st = Status::InvalidArgument("read larger than the transfer limit");
      Payload p;
      if (st.ok()) p = Payload{(*region)->data + offset, len, *region};
      Enqueue(FrameType::kReadResp, 0, in_hdr_.request_id, EncodeStatus(st), std::move(p), nullptr,
              /*one_sided=*/true);
      return true;
    }
    case FrameType::kWriteResp:
    case FrameType::kReadResp: {
      auto it = pending_.find(in_hdr_.request_id);
      bool is_read = in_hdr_.type == FrameType::kReadResp;
      Status st;
      if (it == pending_.end() || it->second.is_read != is_read || !DecodeStatus(&r, &st) ||
          !r.done()) {
        Fail(Status::ProtocolError("unexpected or malformed response from " + peer_));
        return false;
      }
      uint64_t expect = (is_read && st.ok()) ? it->second.len : 0;
      if (in_hdr_.payload_len != expect) {
        Fail(Status::ProtocolError("response payload of the wrong size from " + peer_));
        return false;
      }
      if (expect > 0) in_dst_ = static_cast<uint8_t*>(it->second.local);
      in_refusal_ = st;
      return true;
    }
  }
  return true;
}

bool TcpConnection::Charge(uint64_t n, const char* what) {
  if (charge_.TryCharge(n)) return true;
  const auto& o = shared_->options;
  Fail(Status::ProtocolError(fmt::format(
      "{} from {} would exceed the inbound budget ({} bytes held by this connection, limit {}; "
      "{} by all, limit {})",
      what, peer_, charge_.held(), charge_.limit(), o.inbound_budget->used(),
      o.inbound_budget->limit())));
  return false;
}

bool TcpConnection::GrowPayload(uint64_t need) {
  Buffer& b = in_msg_.payload;
  if (need <= b.size()) return true;
  uint64_t cap = std::min<uint64_t>(
      in_hdr_.payload_len,
      std::max<uint64_t>(need, kPayloadGrowth * static_cast<uint64_t>(b.size())));
  if (!Charge(cap - b.size(), "message payload")) return false;
  b.Grow(static_cast<size_t>(cap));
  in_dst_ = b.data();
  return true;
}

bool TcpConnection::OnPayloadComplete() {
  in_state_ = InState::kHeader;
  in_growable_ = false;
  // The frame is handed on: what it held is no longer this connection's.
  charge_.ReleaseAll();
  switch (in_hdr_.type) {
    case FrameType::kMessage: {
      Message m = std::move(in_msg_);
      in_msg_ = Message{};
      if (handlers_.on_message) handlers_.on_message(shared_from_this(), std::move(m));
      break;
    }
    case FrameType::kWriteMsg: {
      in_region_.reset();
      Message m = std::move(in_msg_);
      in_msg_ = Message{};
      if (handlers_.on_message) handlers_.on_message(shared_from_this(), std::move(m));
      break;
    }
    case FrameType::kWriteReq:
      in_region_.reset();
      Enqueue(FrameType::kWriteResp, 0, in_hdr_.request_id, EncodeStatus(in_refusal_), Payload{},
              nullptr);
      break;
    case FrameType::kReadReq:
      break;
    case FrameType::kWriteResp:
    case FrameType::kReadResp: {
      auto it = pending_.find(in_hdr_.request_id);
      if (it != pending_.end()) {
        DoneCallback done = std::move(it->second.done);
        pending_.erase(it);
        done(in_refusal_);
      }
      break;
    }
  }
  in_dst_ = nullptr;
  return !closed_;
}

void TcpConnection::Fail(Status why) {
  if (why.IsProtocolError())
    spdlog::error("[{}] closing connection: {}", shared_->options.name, why.ToString());
  Shutdown(std::move(why), false);
}

void TcpConnection::Shutdown(Status why, bool local) {
  if (closed_) return;
  closed_ = true;
  closed_flag_ = true;
  auto self = shared_from_this();  // keep alive through the callbacks below
  if (started_) shared_->loop.Remove(fd_);
  ::shutdown(fd_, SHUT_RDWR);
  ::close(fd_);
  fd_ = -1;
  Status op_status = local ? Status::Aborted("connection to " + peer_ + " was closed") : why;
  std::deque<OutFrame> out;
  out.swap(out_);
  for (auto& f : out)
    if (f.done) f.done(op_status);
  FailPending(pending_, op_status);
  in_region_.reset();
  auto on_close = std::move(handlers_.on_close);
  handlers_ = ConnectionHandlers{};
  if (on_close) on_close(self, local ? Status::OK() : why);
  shared_->connections.erase(self);
}

}  // namespace shardps::transport::tcp
