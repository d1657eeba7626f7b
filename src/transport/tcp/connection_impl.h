#pragma once

#include <deque>
#include <memory>
#include <string>
#include <unordered_map>

#include "transport/connection.h"
#include "transport/frame.h"
#include "transport/tcp/context_impl.h"

namespace shardps::transport::tcp {

class TcpConnection final : public Connection, public std::enable_shared_from_this<TcpConnection> {
 public:
  // `tls`: the connection's TLS session, its handshake done (null: plain tcp).
  TcpConnection(std::shared_ptr<Shared> shared, int fd, std::string peer,
                std::unique_ptr<TlsSession> tls = nullptr);
  ~TcpConnection() override;

  void Send(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) override;
  void WriteThenSend(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
                     uint32_t tag, Bytes meta, DoneCallback done) override;
  using Connection::WriteThenSend;
  void Write(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
             DoneCallback done) override;
  void Read(void* local, size_t len, const RemoteKey& key, uint64_t offset,
            DoneCallback done) override;
  void FailLater(DoneCallback done, Status why) override;
  void Close() override;
  bool closed() const override { return closed_flag_.load(); }
  std::string peer() const override { return peer_; }

  // Loop thread only: registers the socket and starts receiving.
  void Start(ConnectionHandlers handlers);

 private:
  struct OutFrame {
    Bytes head;  // frame header followed by metadata
    Payload payload;
    size_t sent = 0;
    DoneCallback done;       // fires when the frame left (messages only)
    bool one_sided = false;  // answers a one-sided read: its payload is registered memory
  };
  struct PendingOp {
    DoneCallback done;
    void* local = nullptr;  // reads: where the bytes go
    size_t len = 0;
    bool is_read = false;
  };
  enum class InState { kHeader, kMeta, kPayload };

  // Defers `fn` to the loop thread; if the context is gone, fails `done` right away.
  void Post(std::function<void()> fn, const DoneCallback& done);
  // one_sided: the payload is registered memory read for a one-sided read (src/core/tsan.h).
  void Enqueue(FrameType type, uint32_t aux, uint64_t request_id, Bytes meta, Payload payload,
               DoneCallback done, bool one_sided = false);
  void StartRequest(FrameType type, Bytes meta, Payload payload, PendingOp op);
  void StartOneSided(FrameType type, void* local, size_t len, const RemoteKey& key, uint64_t offset,
                     DoneCallback done);
  void OnEvents(uint32_t events);
  void FlushOut();
  bool ReadSome();
  bool ParseStaged();
  bool OnMetaComplete();
  bool OnPayloadComplete();
  // Charges n inbound bytes to this connection and the process; on refusal closes the
  // connection (logged) and returns false.
  bool Charge(uint64_t n, const char* what);
  // Grows the message payload being received to hold `need` bytes (at most doubling).
  bool GrowPayload(uint64_t need);
  void Fail(Status why);
  // The socket's sendmsg and recv, through TLS when the connection has it.
  ssize_t SendV(iovec* iov, int count);
  ssize_t RecvInto(void* buf, size_t len);
  void Shutdown(Status why, bool local);

  std::shared_ptr<Shared> shared_;
  int fd_;
  std::unique_ptr<TlsSession> tls_;
  const std::string peer_;
  std::atomic<bool> closed_flag_{false};

  // Loop thread state.
  bool started_ = false;
  bool closed_ = false;
  bool want_out_ = false;
  ConnectionHandlers handlers_;
  std::deque<OutFrame> out_;
  std::unordered_map<uint64_t, PendingOp> pending_;
  uint64_t next_request_ = 1;

  Bytes in_buf_;
  size_t in_start_ = 0;
  size_t in_end_ = 0;
  InState in_state_ = InState::kHeader;
  FrameHeader in_hdr_;
  Bytes in_meta_;
  uint8_t* in_dst_ = nullptr;  // payload destination (nullptr: discard)
  uint64_t in_got_ = 0;
  Message in_msg_;
  std::shared_ptr<RegionMemory> in_region_;  // region a write lands in
  Status in_refusal_;                        // why an incoming write is refused
  bool in_growable_ = false;                 // in_dst_ is a message payload that grows
  InboundCharge charge_;                     // what the frame being received holds
  uint64_t out_head_bytes_ = 0;              // headers and metadata queued in out_
};

}  // namespace shardps::transport::tcp
