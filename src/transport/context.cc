#include "transport/context.h"

#include "core/secret.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <charconv>

#include <fmt/format.h>

#include "transport/tcp/context_impl.h"
#ifdef SHARDPS_HAVE_UCX
#include "transport/ucx/context_impl.h"
#endif
#ifdef SHARDPS_HAVE_VERBS_TRANSPORT
#include "transport/verbs/context_impl.h"
#endif

namespace shardps::transport {

Status SecureRole(const std::string& secret_file, const TlsFiles& tls, const std::string& role,
                  ContextOptions* options) {
  auto secret = SecretForRole(secret_file, role);
  if (!secret.ok()) return secret.status();
  options->secret = std::move(secret).value();
  auto config = TlsForRole(tls, role);
  if (!config.ok()) return config.status();
  options->tls = std::move(config).value();
  return Status::OK();
}

uint16_t FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  uint16_t port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

namespace {
// Checks a local span and resolves it to its address; false (and `done` failed) when it is not
// within its region.
bool SpanAddress(Connection& c, const LocalSpan& s, DoneCallback& done, uint8_t** out) {
  if (s.region == nullptr || s.offset > s.region->size() ||
      s.length > s.region->size() - s.offset) {
    c.FailLater(std::move(done),
                Status::InvalidArgument(fmt::format(
                    "local span of {} bytes at offset {} is outside its region of {} bytes",
                    s.length, s.offset, s.region ? s.region->size() : 0)));
    return false;
  }
  *out = static_cast<uint8_t*>(s.region->data()) + s.offset;
  return true;
}
}  // namespace

void Connection::Write(const LocalSpan& local, const RemoteKey& key, uint64_t offset,
                       DoneCallback done) {
  uint8_t* p = nullptr;
  if (!SpanAddress(*this, local, done, &p)) return;
  Write(p, local.length, key, offset, std::move(done));
}

void Connection::Read(const LocalSpan& local, const RemoteKey& key, uint64_t offset,
                      DoneCallback done) {
  uint8_t* p = nullptr;
  if (!SpanAddress(*this, local, done, &p)) return;
  Read(p, local.length, key, offset, std::move(done));
}

void Connection::WriteThenSend(const void* local, size_t len, const RemoteKey& key, uint64_t offset,
                               uint32_t tag, Bytes meta, DoneCallback done) {
  // Completion callbacks run while the connection exists (it fails them before it goes).
  Write(local, len, key, offset,
        [this, tag, meta = std::move(meta), done = std::move(done)](Status st) mutable {
          if (!st.ok()) return done(st);
          Send(tag, std::move(meta), {}, std::move(done));
        });
}

void Connection::WriteThenSend(const LocalSpan& local, const RemoteKey& key, uint64_t offset,
                               uint32_t tag, Bytes meta, DoneCallback done) {
  uint8_t* p = nullptr;
  if (!SpanAddress(*this, local, done, &p)) return;
  WriteThenSend(p, local.length, key, offset, tag, std::move(meta), std::move(done));
}

const char* MemoryKindName(MemoryKind k) {
  switch (k) {
    case MemoryKind::kHost:
      return "host";
    case MemoryKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

void RemoteKey::Encode(Writer* w) const {
  w->Put(base);
  w->Put(size);
  w->PutBytes(packed.data(), packed.size());
}

bool RemoteKey::Decode(Reader* r) {
  return r->Get(&base) && r->Get(&size) && r->GetBytes(&packed, 4096);
}

std::vector<std::string> BackendNames() {
  std::vector<std::string> names = {"tcp"};
#ifdef SHARDPS_HAVE_UCX
  names.push_back("ucx");
#endif
#ifdef SHARDPS_HAVE_VERBS_TRANSPORT
  names.push_back("verbs");
#endif
  return names;
}

Viability CheckViability(const std::string& backend, const ContextOptions& options) {
  if (backend == "tcp") return {true, "always available"};
  if (backend == "ucx") {
#ifdef SHARDPS_HAVE_UCX
    return ucx::Check(options);
#else
    (void)options;
    return {false, "this build has no ucx transport (UCX was not found at configure time)"};
#endif
  }
  if (backend == "verbs") {
#ifdef SHARDPS_HAVE_VERBS_TRANSPORT
    return verbs::Check(options);
#else
    return {false,
            "this build has no verbs transport (rdma-core's libibverbs-dev and librdmacm-dev were "
            "not found at configure time)"};
#endif
  }
  return {false, "unknown transport '" + backend + "' (known: tcp, ucx, verbs)"};
}

Viability CheckViability(const std::string& backend) {
  return CheckViability(backend, ContextOptions{});
}

Result<std::unique_ptr<Context>> CreateContext(const std::string& backend,
                                               const ContextOptions& options) {
  if (backend == "tcp") {
    auto ctx = tcp::TcpContext::Create(options);
    if (!ctx.ok()) return ctx.status();
    return std::unique_ptr<Context>(std::move(ctx).value());
  }
#ifdef SHARDPS_HAVE_UCX
  if (backend == "ucx") return ucx::CreateUcxContext(options);
#endif
#ifdef SHARDPS_HAVE_VERBS_TRANSPORT
  if (backend == "verbs") return verbs::CreateVerbsContext(options);
#endif
  Viability v = CheckViability(backend, options);
  if (backend == "ucx" || backend == "verbs") return Status::Unavailable(v.reason);
  return Status::InvalidArgument(v.reason);
}

Status ParseHostPort(const std::string& address, std::string* host, uint16_t* port) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos)
    return Status::InvalidArgument("address '" + address + "' is not host:port");
  *host = address.substr(0, colon);
  std::string p = address.substr(colon + 1);
  unsigned v = 0;
  auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
  if (ec != std::errc() || ptr != p.data() + p.size() || p.empty() || v > 65535)
    return Status::InvalidArgument("address '" + address + "' has a bad port");
  *port = static_cast<uint16_t>(v);
  return Status::OK();
}

void DestroyInPlace(std::unique_ptr<Context>& ctx) {
  if (!ctx) return;
  std::default_delete<Context>()(ctx.get());
  (void)ctx.release();  // already destroyed
}

}  // namespace shardps::transport
