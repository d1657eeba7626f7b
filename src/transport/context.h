// A transport context: one backend instance with its own loop thread, its connections,
// listeners and registered memory. No global state: a process may hold several contexts.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "shardps/status.h"
#include "transport/budget.h"
#include "transport/connection.h"
#include "transport/memory.h"
#include "transport/tls.h"

namespace shardps::transport {

struct ContextOptions {
  // Largest message payload or one-sided transfer accepted from a peer; larger frames close
  // the connection with a protocol error.
  uint64_t max_payload_bytes = 1ull << 31;
  // Largest metadata section of a frame.
  uint32_t max_meta_bytes = 64u << 20;
  // Inbound buffers (frames being received, messages waiting for delivery) grow with the bytes
  // that arrived, within these budgets: per connection, and for all connections of the
  // context (or of every context given the same `inbound_budget`). Past either, the connection
  // is closed with a logged error.
  uint64_t connection_inbound_bytes = 256ull << 20;
  uint64_t process_inbound_bytes = 1ull << 30;
  std::shared_ptr<InboundBudget> inbound_budget;  // null: the context makes its own
  // Bytes of frame headers and metadata queued to a peer that does not read them (answers to
  // its one-sided requests, messages); past it the connection is closed.
  uint64_t max_send_queue_bytes = 64ull << 20;
  // Socket buffer sizes for tcp (0 = kernel default).
  int socket_buffer_bytes = 4 << 20;
  // Name for logs ("server 1", "worker 0").
  std::string name = "transport";
  // ucx: how long the progress thread keeps polling after its last event before it sleeps on
  // the worker's event fd (yielding the core meanwhile). A wake-up costs tens of microseconds;
  // polling keeps a small request's round trip near the wire's latency. 0: never poll.
  std::chrono::microseconds busy_poll{200};
  // Backend-specific settings, e.g. {"UCX_TLS", "shm"} for ucx.
  std::vector<std::pair<std::string, std::string>> backend_settings;
  // The cluster secret (the bytes of the --secret file). When set, every connection, accepted
  // or made, proves it both ways before any frame is read (transport/auth.h); a peer that
  // does not is closed with a logged reason. Empty: no authentication.
  std::string secret;
  // How long an accepted connection has to complete the handshake.
  std::chrono::milliseconds auth_timeout{10000};
  // TLS on tcp connections (transport/tls.h): null, none. With it, every connection runs a
  // TLS 1.3 handshake with certificates both ways first; then everything it carries is
  // encrypted. (ucx: its control connections only.)
  std::shared_ptr<const TlsConfig> tls;
};

// A role's connection security (docs/security.md), loaded, checked and logged once at its
// start into the options of its contexts: the cluster secret from `secret_file`
// (core/secret.h; a warning when there is none) and TLS from `tls` (TlsForRole). Errors name the
// role and the file.
Status SecureRole(const std::string& secret_file, const TlsFiles& tls, const std::string& role,
                  ContextOptions* options);

// Whether a backend can run on this machine, and if not, why.
struct Viability {
  bool viable = false;
  std::string reason;
};

class Listener {
 public:
  virtual ~Listener() = default;  // stops accepting
  // The bound address, "127.0.0.1:41234" (the real port when 0 was asked for).
  virtual std::string address() const = 0;
};

class Context;
// Destroys the context `ctx` holds while `ctx` still points to it, then empties it: an owner
// whose handlers read `ctx` on the context's loop thread needs the pointer valid until the
// destructor joined that thread (std::unique_ptr::reset clears the pointer first).
void DestroyInPlace(std::unique_ptr<Context>& ctx);

// Called on the loop thread for each accepted connection; returns its handlers. The
// connection starts receiving only after this returns.
using AcceptHandler = std::function<ConnectionHandlers(const std::shared_ptr<Connection>&)>;

class Context {
 public:
  virtual ~Context() = default;  // closes every connection (pending ops fail), joins the loop

  virtual std::string backend() const = 0;

  // Listens on "host:port" (port 0 picks a free one).
  virtual Result<std::unique_ptr<Listener>> Listen(const std::string& address,
                                                   AcceptHandler on_accept) = 0;

  // Connects to "host:port", waiting at most `timeout`. Blocks: do not call on a loop thread.
  virtual Result<std::shared_ptr<Connection>> Connect(const std::string& address,
                                                      ConnectionHandlers handlers,
                                                      std::chrono::milliseconds timeout) = 0;

  // Allocates and registers `size` bytes of host memory for remote access (zero-filled). Over
  // ucx this is memory UCX allocates, which shared memory reaches truly one-sidedly.
  virtual Result<std::unique_ptr<MemoryRegion>> AllocateRegion(size_t size) = 0;

  // Registers `size` bytes at `ptr`, owned by the caller, of memory kind `kind`, for remote
  // access. The memory must stay allocated until the region is destroyed (which deregisters
  // it; the memory is the caller's to free then). InvalidArgument naming the kind when this
  // backend cannot register it (CanRegister).
  virtual Result<std::unique_ptr<MemoryRegion>> RegisterRegion(void* ptr, size_t size,
                                                               MemoryKind kind) = 0;

  // Whether RegisterRegion takes memory of `kind` here (host: every backend; CUDA device
  // memory: where the backend can register it directly, CanRegisterGpuMemory).
  virtual bool CanRegister(MemoryKind kind) const {
    return kind == MemoryKind::kHost || (kind == MemoryKind::kCuda && CanRegisterGpuMemory());
  }

  // True when the calling thread is this context's loop thread.
  virtual bool InLoopThread() const = 0;

  // Queues fn to run on the loop thread, after what is already queued there; false (fn
  // dropped) when the context is shutting down.
  virtual bool RunInLoop(std::function<void()> fn) = 0;

  // How long the loop polls after its last event (ContextOptions::busy_poll where the backend
  // polls at all, ucx; zero elsewhere).
  virtual std::chrono::microseconds busy_poll() const { return std::chrono::microseconds(0); }

  // Announces a message that the caller will send once a computation of bounded length ends
  // (a server applying a push, then acknowledging it): while the returned token lives, the
  // loop keeps polling for up to ten times busy_poll after its last event instead of
  // busy_poll, so the send does not pay the loop's wake-up. Only where the loop polls at all
  // (ucx with busy_poll > 0); null elsewhere.
  virtual std::shared_ptr<void> HoldPolling() { return nullptr; }

  // Whether the one-sided operations of a connection are carried out at the target in the order
  // they were issued (tcp: its loop thread serves them one after another and sends the bytes
  // read in that order, copying them as they are sent), so that a read issued after another
  // reads memory no earlier than it did. False where they may overtake each other (ucx).
  virtual bool OneSidedInOrder() const { return false; }

  // Whether memory on a GPU can be registered directly (GPUDirect RDMA); when not, GPU
  // shards are staged through registered host memory.
  virtual bool CanRegisterGpuMemory() const { return false; }

  // Connections this context refused because the peer did not prove the cluster secret
  // (ContextOptions::secret): no hello, a wrong proof, too slow, or too many at once.
  virtual uint64_t refused_peers() const { return 0; }
};

// Names of the backends built into this binary ("tcp", and "ucx" where built).
std::vector<std::string> BackendNames();
// Whether `backend` can run here (with these settings), with the reason when not.
Viability CheckViability(const std::string& backend);
Viability CheckViability(const std::string& backend, const ContextOptions& options);
// Creates a context of `backend` ("tcp", "ucx"). InvalidArgument for an unknown name,
// Unavailable when the backend is not viable here.
Result<std::unique_ptr<Context>> CreateContext(const std::string& backend,
                                               const ContextOptions& options);

// A 127.0.0.1 TCP port that nothing is bound to at this moment (the kernel's pick), for a
// program started next that must be told its port up front (ucx_perftest, a test's server);
// 0 when none could be had. Racy by nature: another process may take it first.
uint16_t FreeLoopbackPort();

// Splits "host:port". InvalidArgument when malformed.
Status ParseHostPort(const std::string& address, std::string* host, uint16_t* port);

}  // namespace shardps::transport
