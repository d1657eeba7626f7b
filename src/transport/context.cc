#include "transport/context.h"

#include <charconv>

#include "transport/tcp/context_impl.h"

namespace shardps::transport {

void RemoteKey::Encode(Writer* w) const {
  w->Put(base);
  w->Put(size);
  w->PutBytes(packed.data(), packed.size());
}

bool RemoteKey::Decode(Reader* r) {
  return r->Get(&base) && r->Get(&size) && r->GetBytes(&packed, 4096);
}

std::vector<std::string> BackendNames() { return {"tcp"}; }

Viability CheckViability(const std::string& backend) {
  if (backend == "tcp") return {true, "always available"};
  return {false, "unknown transport '" + backend + "' (known: tcp)"};
}

Result<std::unique_ptr<Context>> CreateContext(const std::string& backend,
                                               const ContextOptions& options) {
  if (backend == "tcp") {
    auto ctx = tcp::TcpContext::Create(options);
    if (!ctx.ok()) return ctx.status();
    return std::unique_ptr<Context>(std::move(ctx).value());
  }
  Viability v = CheckViability(backend);
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

}  // namespace shardps::transport
