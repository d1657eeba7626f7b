// A connection between two transport contexts: messages in both directions, and one-sided
// writes and reads of the peer's registered memory.
//
// Contract (checked by tests/transport/conformance_test.cc for every backend):
// - every callback passed to Send/Write/Read fires exactly once, on the context's loop
//   thread, never inline inside the call that started the operation;
// - when the connection closes (Close(), peer gone, protocol error) every pending operation
//   completes with an error, then on_close fires once;
// - a Write or Read outside the remote region, or with a wrong or stale key, completes with an
//   error and touches no memory.
// All methods are thread-safe.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <string>

#include "core/codec.h"
#include "shardps/status.h"
#include "transport/memory.h"

namespace shardps::transport {

// Bytes owned by a received message (not zero-initialised on allocation).
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) : data_(n ? Allocate(nullptr, n) : nullptr), size_(n) {}
  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  // Keeps only the first n bytes (n <= size()); no reallocation.
  void Truncate(size_t n) { size_ = n < size_ ? n : size_; }
  // Grows to n bytes (n >= size()), keeping the bytes it held: in place where the allocator can,
  // and a large buffer's pages are moved rather than copied (realloc: mremap).
  void Grow(size_t n) {
    if (n <= size_) return;
    uint8_t* p = Allocate(data_.get(), n);
    (void)data_.release();  // realloc freed or kept it
    data_.reset(p);
    size_ = n;
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  static uint8_t* Allocate(uint8_t* old, size_t n) {
    void* p = std::realloc(old, n);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<uint8_t*>(p);
  }
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

// Bytes to send. Not copied: `data` must stay valid until the send's callback fires; `owner`
// (optional) keeps whatever owns it alive until then.
struct Payload {
  const void* data = nullptr;
  size_t size = 0;
  std::shared_ptr<const void> owner;

  static Payload Own(Bytes bytes) {
    auto p = std::make_shared<const Bytes>(std::move(bytes));
    return Payload{p->data(), p->size(), p};
  }
  static Payload View(const void* d, size_t n) { return Payload{d, n, nullptr}; }
};

struct Message {
  uint32_t tag = 0;  // meaning defined by the layer above (cluster/messages.h)
  Bytes meta;        // small encoded fields
  Buffer payload;    // bulk bytes
};

class Connection;
using DoneCallback = std::function<void(Status)>;

struct ConnectionHandlers {
  // Runs on the loop thread for each message received, in order. Must not block.
  std::function<void(const std::shared_ptr<Connection>&, Message)> on_message;
  // Runs once on the loop thread after the connection closed, with why (OK on local Close()).
  std::function<void(const std::shared_ptr<Connection>&, Status)> on_close;
};

class Connection {
 public:
  virtual ~Connection() = default;

  // Sends a message. The callback says the bytes left this side (or why not).
  virtual void Send(uint32_t tag, Bytes meta, Payload payload, DoneCallback done) = 0;

  // One-sided write of `len` bytes from `local` into the peer's region `key` at `offset`.
  // `local` must stay valid until `done`; `done` fires when the bytes are in the remote region.
  virtual void Write(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
                     DoneCallback done) = 0;

  // One-sided read of `len` bytes from the peer's region `key` at `offset` into `local`.
  virtual void Read(void* local, size_t len, const RemoteKey& key, uint64_t offset,
                    DoneCallback done) = 0;

  // The same from and into local registered memory (a LocalSpan of a region of this
  // connection's context). A span outside its region fails with InvalidArgument. The default
  // passes the span's address to the pointer versions; a backend that needs local
  // registration (verbs) uses the region's handle.
  virtual void Write(const LocalSpan& local, const RemoteKey& key, uint64_t offset,
                     DoneCallback done);
  virtual void Read(const LocalSpan& local, const RemoteKey& key, uint64_t offset,
                    DoneCallback done);

  // A one-sided write, then a message (`tag`, `meta`, no payload) that the peer receives only
  // once the written bytes are in place, like RDMA's write with immediate. `done` fires once
  // both left (the local bytes may be reused), or with why not. The default writes and sends
  // the message when the write completed (a write the peer refuses fails `done`); tcp carries
  // both in one frame and saves the write's round trip (a write the peer refuses closes the
  // connection there: it has no answer to give).
  virtual void WriteThenSend(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
                             uint32_t tag, Bytes meta, DoneCallback done);
  void WriteThenSend(const LocalSpan& local, const RemoteKey& key, uint64_t offset, uint32_t tag,
                     Bytes meta, DoneCallback done);

  // Closes the connection; pending operations fail with Aborted. Idempotent, non-blocking.
  virtual void Close() = 0;

  virtual bool closed() const = 0;
  // "127.0.0.1:40312" style description of the peer, for messages.
  virtual std::string peer() const = 0;

  // Fails `done` with `why` from the backend's loop thread (never inline in the caller).
  virtual void FailLater(DoneCallback done, Status why) = 0;

  // Opaque slot for the layer above (e.g. the node id this connection belongs to).
  std::shared_ptr<void> user_data;
};

}  // namespace shardps::transport
