// A verbs connection: a reliable-connected queue pair for one-sided operations, and the tcp
// connection beside it for its life (hello, messages, key revocation). State marked "loop" is
// touched on the context's loop thread only.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>

#include "transport/budget.h"
#include "transport/connection.h"
#include "transport/keys.h"
#include "transport/verbs/context_impl.h"

namespace shardps::transport::verbs {

// Tags of the backend's own messages on the tcp connection (never shown to the user).
// u64 token, u16 rdma_cm port (0: none), u8 whether SENDs may be sent to this side (it has a
// shared receive queue)
inline constexpr uint32_t kHello = 0xFFFF0101;
inline constexpr uint32_t kRevoke = 0xFFFF0102;     // u64 region id, u64 token
inline constexpr uint32_t kRevokeAck = 0xFFFF0103;  // u64 token
inline constexpr uint32_t kSkip = 0xFFFF0104;       // u64 sequence number never sent
// Every user message carries a per-connection sequence number and is delivered in its order,
// whichever way it came: on the tcp connection (the number prefixes its metadata) or, for a
// WriteThenSend whose metadata fits inline, as a SEND on the queue pair right behind its
// write: [u64 seq][u32 tag][u32 meta length][meta]. A message may arrive at most this many
// numbers ahead of the next one delivered.
inline constexpr uint64_t kMaxReorderWindow = 1 << 16;
inline constexpr size_t kSendHeader = 16;
inline constexpr auto kRevokeWait = std::chrono::milliseconds(2000);
// Send-queue depth of a queue pair, and the largest piece one work request moves (larger
// operations are split).
inline constexpr int kSendDepth = 256;
// How long a closing connection waits for its queue pair's flushed completions.
inline constexpr auto kFlushWait = std::chrono::milliseconds(2000);
// rdma_cm address and route resolution time limit.
inline constexpr int kResolveMs = 5000;

class VerbsConnection final : public Connection,
                              public std::enable_shared_from_this<VerbsConnection> {
 public:
  explicit VerbsConnection(std::shared_ptr<Shared> s)
      : shared_(std::move(s)),
        charge_(shared_->options.inbound_budget.get(), shared_->options.connection_inbound_bytes) {}
  ~VerbsConnection() override;

  // The tcp side's handlers; they hold this connection while the tcp connection is open.
  ConnectionHandlers TcpHandlers();
  // Lists the connection and gives it the token its peer names when connecting its queue pair.
  void Register();
  // The tcp connection (before the user's handlers exist: an accept handler may send).
  void SetTcp(std::shared_ptr<Connection> tcp);
  // Binds the user's handlers, and sends the hello (the rdma_cm port
  // this side listens on, 0 on the connecting side; `connect_host`: where the connecting side
  // resolves the peer's rdma_cm port).
  void Attach(ConnectionHandlers user, uint16_t rdma_port, std::string connect_host);
  // Waits until the queue pair is connected (or failed).
  Status WaitConnected(std::chrono::milliseconds timeout);

  void Send(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) override;
  void Write(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
             DoneCallback done) override {
    StartOp(true, const_cast<void*>(local), len, key, offset, std::move(done));
  }
  void Read(void* local, size_t len, const RemoteKey& key, uint64_t offset,
            DoneCallback done) override {
    StartOp(false, local, len, key, offset, std::move(done));
  }
  // The write, then the message as a SEND on the same queue pair (RC delivers it after the
  // written bytes are placed): no wait for the write's completion. Where the metadata does not
  // fit inline, or the queue pair is not up yet, the write completes first and the message
  // follows on the tcp connection.
  void WriteThenSend(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
                     uint32_t tag, Bytes meta, DoneCallback done) override;
  void FailLater(DoneCallback done, Status why) override {
    Post([done, why] { done(why); }, done);
  }
  // Operations issued after this fail; the connection finishes closing on the loop.
  void Close() override {
    closed_flag_ = true;
    if (tcp_) tcp_->Close();
  }
  bool closed() const override { return closed_flag_.load(); }
  std::string peer() const override { return peer_; }

  // Loop: rdma_cm events for this connection's id; a completion of its queue pair.
  void OnCmEvent(rdma_cm_event_type type, int status, rdma_cm_id* id);
  void OnCompletion(const ibv_wc& wc);
  // Loop: a message that arrived as a SEND (in the context's shared receive queue).
  void OnReceive(const uint8_t* data, size_t len);
  // Loop: the passive side's queue pair for the connect request on `id`.
  // `their_initiator` and `their_responder`: the READ depths the connect request asked for.
  void Accept(rdma_cm_id* id, uint8_t their_initiator, uint8_t their_responder);
  // Forgets a connection whose tcp side never came up.
  void Unregister();
  // Loop: posts backlogged work while the queue pair and the completion queue have room.
  void PostBacklog();
  // Loop: true once the closing queue pair has flushed (or the wait ran out); then finishes.
  bool FinishClosing(bool force);
  void Unlist() { listed_backlogged_ = false; }
  void SendRaw(uint32_t tag, Bytes meta) {
    if (tcp_) tcp_->Send(tag, std::move(meta), {}, nullptr);
  }

 private:
  struct Op {
    DoneCallback done;
    Status st;
    uint32_t pieces_left = 0;
    uint64_t region = 0;                  // the remote region
    std::shared_ptr<Registration> local;  // keeps the local memory registered
    bool is_write = false;
    std::shared_ptr<Bytes> message;  // a WriteThenSend's SEND, until it completed
  };
  enum class Kind : uint8_t { kWrite, kRead, kSend };
  struct Piece {
    uint64_t op;
    Kind kind;
    uint64_t local;  // kSend: the message's bytes (sent inline)
    uint32_t length;
    uint32_t lkey;
    uint64_t remote;
    uint32_t rkey;
  };

  bool Post(std::function<void()> fn, const DoneCallback& done);
  void StartOp(bool is_write, void* local, size_t len, const RemoteKey& key, uint64_t offset,
               DoneCallback done);
  // Checks a key and bounds; the parsed key or why not.
  Status CheckKey(bool is_write, size_t len, const RemoteKey& key, uint64_t offset,
                  KeyParts* parts) const;
  // Loop: queues the pieces of an operation (and, with `message`, the SEND behind them); false
  // (and `done` failed) when it cannot start.
  bool Issue(bool is_write, void* local, size_t len, KeyParts parts, uint64_t remote,
             DoneCallback done, std::shared_ptr<Bytes> message = nullptr);
  // Sends a message with its sequence number on the tcp connection; its callback on the loop.
  void SendOnTcp(uint64_t seq, uint32_t tag, const Bytes& meta, Payload payload, DoneCallback done);
  // Loop: a message with its number arrived (from either path); delivers what is in order.
  void Arrived(uint64_t seq, std::optional<Message> m);
  void Deliver();
  void PieceDone(uint64_t op, Status st);
  void OnTcpMessage(Message m);
  void OnRevoke(uint64_t region, uint64_t token);
  void CreateQp(rdma_cm_id* id);
  rdma_conn_param ConnParam(const uint64_t* token, uint8_t initiator, uint8_t responder) const;
  void OnTcpClosed(Status st);
  void Fail(Status why);
  void SetConnected(Status st);
  void StartConnect();
  void Shutdown(Status st);
  void AckRevoke(uint64_t token);

  std::shared_ptr<Shared> shared_;
  std::shared_ptr<Connection> tcp_;
  std::string peer_;
  std::atomic<bool> closed_flag_{false};
  uint64_t token_ = 0;                 // set by Register()
  std::atomic<uint64_t> next_seq_{0};  // the next message's number
  // Messages handed to the tcp connection whose callbacks have not run yet: the connection
  // finishes closing only after they did (every callback before on_close).
  std::atomic<int> tcp_pending_{0};

  std::mutex mu_;
  std::condition_variable cv_;
  bool attached_ = false;   // guarded by mu_
  bool connected_ = false;  // guarded by mu_
  Status connect_status_;   // guarded by mu_: why the queue pair could not be connected
  Status close_reason_;     // guarded by mu_: why Fail() closed the connection

  // Loop state.
  ConnectionHandlers user_;
  uint16_t rdma_port_ = 0;
  uint64_t peer_token_ = 0;
  uint16_t peer_port_ = 0;
  bool peer_takes_sends_ = false;  // the peer has a shared receive queue (its hello says)
  std::string connect_host_;
  rdma_cm_id* id_ = nullptr;
  ibv_qp* qp_ = nullptr;
  uint32_t max_inline_ = 0;  // what this queue pair's SENDs may carry inline
  bool ready_ = false;       // the queue pair is connected
  bool closing_ = false;     // Shutdown ran; the queue pair is flushing
  bool finished_ = false;
  Status close_status_;
  Status op_close_status_;  // what operations cut short by the close fail with
  std::chrono::steady_clock::time_point flush_deadline_;
  std::unordered_map<uint64_t, Op> ops_;
  uint64_t next_op_ = 1;
  std::deque<Piece> backlog_;
  bool listed_backlogged_ = false;
  int posted_ = 0;  // work requests on the queue pair
  std::set<uint64_t> revoked_;
  uint64_t next_deliver_ = 0;
  std::map<uint64_t, std::optional<Message>> inbox_;  // by number; nullopt: skipped
  InboundCharge charge_;                              // the bytes held in inbox_
  std::unordered_map<uint64_t, int> in_flight_by_region_;
  std::unordered_map<uint64_t, std::vector<uint64_t>> acks_waiting_;  // region -> tokens
};

}  // namespace shardps::transport::verbs
