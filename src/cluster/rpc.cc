#include "cluster/rpc.h"

#include <condition_variable>

#include <fmt/format.h>

namespace shardps::cluster {

void RpcChannel::Start(uint32_t tag, const Bytes& body, ReplyCallback cb,
                       const std::function<void(Bytes meta, transport::DoneCallback sent)>& send,
                       transport::DoneCallback on_sent) {
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_) {
      // Deliver the failure through the transport's thread, never inline.
      Status why = failure_;
      conn_->Send(tag, {}, {}, [cb, why, on_sent](Status) {
        if (on_sent) on_sent(why);
        Reader empty(nullptr, 0);
        transport::Message m;
        cb(why, empty, m);
      });
      return;
    }
    id = next_id_++;
    pending_.emplace(id, std::move(cb));
  }
  Bytes meta;
  Writer w(&meta);
  w.Put(id);
  w.PutRaw(body.data(), body.size());
  std::weak_ptr<RpcChannel> weak = weak_from_this();
  send(std::move(meta), [weak, id, on_sent](Status st) {
    if (on_sent) on_sent(st);
    if (st.ok()) return;
    auto self = weak.lock();
    if (!self) return;
    ReplyCallback cb;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      auto it = self->pending_.find(id);
      if (it == self->pending_.end()) return;
      cb = std::move(it->second);
      self->pending_.erase(it);
    }
    Reader empty(nullptr, 0);
    transport::Message m;
    cb(st, empty, m);
  });
}

void RpcChannel::Call(uint32_t tag, const Bytes& body, transport::Payload payload,
                      ReplyCallback cb) {
  Start(tag, body, std::move(cb), [&](Bytes meta, transport::DoneCallback sent) {
    conn_->Send(tag, std::move(meta), std::move(payload), std::move(sent));
  });
}

void RpcChannel::CallAfterWrite(const transport::LocalSpan& local, const transport::RemoteKey& key,
                                uint64_t offset, uint32_t tag, const Bytes& body, ReplyCallback cb,
                                transport::DoneCallback sent) {
  Start(
      tag, body, std::move(cb),
      [&](Bytes meta, transport::DoneCallback done) {
        conn_->WriteThenSend(local, key, offset, tag, std::move(meta), std::move(done));
      },
      std::move(sent));
}

void RpcChannel::CallAfterWrite(const void* local, size_t len, const transport::RemoteKey& key,
                                uint64_t offset, uint32_t tag, const Bytes& body, ReplyCallback cb,
                                transport::DoneCallback sent) {
  Start(
      tag, body, std::move(cb),
      [&](Bytes meta, transport::DoneCallback done) {
        conn_->WriteThenSend(local, len, key, offset, tag, std::move(meta), std::move(done));
      },
      std::move(sent));
}

bool RpcChannel::OnReply(transport::Message& msg) {
  Reader r(msg.meta.data(), msg.meta.size());
  uint64_t id = 0;
  Status st;
  if (!ParseReplyHead(&r, &id, &st)) return false;
  ReplyCallback cb;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return false;
    cb = std::move(it->second);
    pending_.erase(it);
  }
  cb(st, r, msg);
  return true;
}

void RpcChannel::FailAll(const Status& why) {
  std::unordered_map<uint64_t, ReplyCallback> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ = true;
    failure_ = why;
    pending.swap(pending_);
  }
  for (auto& [id, cb] : pending) {
    Reader empty(nullptr, 0);
    transport::Message m;
    cb(why, empty, m);
  }
}

Result<Bytes> CallSync(RpcChannel& ch, uint32_t tag, const Bytes& body,
                       std::chrono::milliseconds timeout, const std::string& what,
                       transport::Buffer* payload) {
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status st;
    Bytes body;
    transport::Buffer payload;
  };
  auto state = std::make_shared<State>();
  ch.Call(tag, body, {}, [state](Status st, Reader& r, transport::Message& m) {
    std::lock_guard<std::mutex> lock(state->mu);
    state->st = st;
    if (st.ok()) {
      auto rest = r.rest();
      state->body.assign(rest.begin(), rest.end());
      state->payload = std::move(m.payload);
    }
    state->done = true;
    state->cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(state->mu);
  if (!state->cv.wait_for(lock, timeout, [&] { return state->done; }))
    return Status::Timeout(fmt::format("{}: no reply within {} ms", what, timeout.count()));
  if (!state->st.ok()) return state->st.WithContext(what);
  if (payload) *payload = std::move(state->payload);
  return std::move(state->body);
}

void Reply(transport::Connection& conn, uint64_t request_id, const Status& st, const Bytes& body,
           transport::Payload payload) {
  conn.Send(kReply, ReplyMeta(request_id, st, body), std::move(payload), nullptr);
}

}  // namespace shardps::cluster
