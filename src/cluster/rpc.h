// Request/reply over a transport connection: request ids, reply dispatch, and failing every
// outstanding call when the connection closes. Thread-safe.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "cluster/messages.h"
#include "transport/connection.h"

namespace shardps::cluster {

// Called once with the reply's status (or the transport's error); `body` reads the reply's
// fields after the status; `msg` carries its payload. Runs on the transport loop thread.
using ReplyCallback = std::function<void(Status, Reader& body, transport::Message& msg)>;

class RpcChannel : public std::enable_shared_from_this<RpcChannel> {
 public:
  explicit RpcChannel(std::shared_ptr<transport::Connection> conn) : conn_(std::move(conn)) {}

  // Sends a request: metadata is [request id][body].
  void Call(uint32_t tag, const Bytes& body, transport::Payload payload, ReplyCallback cb);
  // Writes `local` into the peer's region (key, offset), then sends the request, which the peer
  // receives once the bytes are in place (Connection::WriteThenSend): a push's gradient and
  // its notification in one go. `sent` fires once the local bytes are no longer used (sent, or
  // never to be), which may be after the reply callback (a call failed by FailAll while its
  // frame waits to leave): the caller's bytes must stay valid until then.
  void CallAfterWrite(const transport::LocalSpan& local, const transport::RemoteKey& key,
                      uint64_t offset, uint32_t tag, const Bytes& body, ReplyCallback cb,
                      transport::DoneCallback sent);
  void CallAfterWrite(const void* local, size_t len, const transport::RemoteKey& key,
                      uint64_t offset, uint32_t tag, const Bytes& body, ReplyCallback cb,
                      transport::DoneCallback sent);
  // Handles a kReply message. Returns false (protocol error) when it answers nothing.
  bool OnReply(transport::Message& msg);
  // Fails every outstanding call with `why` (after the connection closed).
  void FailAll(const Status& why);

  transport::Connection& connection() { return *conn_; }
  const std::shared_ptr<transport::Connection>& shared_connection() { return conn_; }

 private:
  // Registers `cb` under a new request id and hands [id][body] to `send` with the completion
  // that fails the call when the bytes could not leave, then calls `on_sent` (optional).
  void Start(uint32_t tag, const Bytes& body, ReplyCallback cb,
             const std::function<void(Bytes meta, transport::DoneCallback sent)>& send,
             transport::DoneCallback on_sent = nullptr);

  std::shared_ptr<transport::Connection> conn_;
  std::mutex mu_;
  uint64_t next_id_ = 1;                                 // guarded by mu_
  std::unordered_map<uint64_t, ReplyCallback> pending_;  // guarded by mu_
  bool failed_ = false;                                  // guarded by mu_
  Status failure_;                                       // guarded by mu_
};

// Calls and waits at most `timeout` for the reply; returns the reply's body bytes (and the
// payload in *payload when given). Must not be called on a transport loop thread.
Result<Bytes> CallSync(RpcChannel& ch, uint32_t tag, const Bytes& body,
                       std::chrono::milliseconds timeout, const std::string& what,
                       transport::Buffer* payload = nullptr);

// Sends a reply to request `request_id` on `conn`.
void Reply(transport::Connection& conn, uint64_t request_id, const Status& st,
           const Bytes& body = {}, transport::Payload payload = {});

}  // namespace shardps::cluster
