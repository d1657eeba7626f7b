#include "transport/ucx/loop.h"

#include <fmt/format.h>

namespace shardps::transport::ucx {
namespace {

bool UsesSharedMemory(const std::string& tls) {
  if (tls.empty() || tls == "all") return true;
  for (const char* t : {"shm", "sm", "posix", "sysv", "xpmem", "cma", "knem"})
    if (tls.find(t) != std::string::npos) return true;
  return false;
}

}  // namespace

Status FromUcs(const std::string& what, ucs_status_t st) {
  std::string msg = fmt::format("{}: {}", what, ucs_status_string(st));
  if (st == UCS_ERR_CONNECTION_RESET || st == UCS_ERR_ENDPOINT_TIMEOUT || st == UCS_ERR_UNREACHABLE)
    return Status::Unavailable(msg);
  if (st == UCS_ERR_CANCELED) return Status::Aborted(msg);
  if (st == UCS_ERR_NO_MEMORY) return Status::ResourceExhausted(msg);
  return Status::IOError(msg);
}

// Creates a UCP context from the options' UCX_* settings (prefix optional).
Result<ucp_context_h> MakeUcpContext(const ContextOptions& options) {
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
  if (st != UCS_OK) return FromUcs("ucp_config_read", st);
  std::string tls;
  bool mm_set = false;
  for (const auto& [k, v] : options.backend_settings) {
    std::string name = k.rfind("UCX_", 0) == 0 ? k.substr(4) : k;
    if (name == "TLS") tls = v;
    if (name == "MM_ERROR_HANDLING") mm_set = true;
    st = ucp_config_modify(cfg, name.c_str(), v.c_str());
    if (st != UCS_OK) {
      ucp_config_release(cfg);
      return Status::InvalidArgument(
          fmt::format("UCX setting {}={}: {}", k, v, ucs_status_string(st)));
    }
  }
  // UCX reads its own UCX_* variables in ucp_config_read; this backend reads none: what it must
  // know of them comes in the settings (the configuration layer passes the process's UCX_*
  // variables there). Peer failure detection over shared memory needs this in UCX 1.13.
  if (!mm_set && UsesSharedMemory(tls)) ucp_config_modify(cfg, "MM_ERROR_HANDLING", "y");
  ucp_params_t p{};
  p.field_mask = UCP_PARAM_FIELD_FEATURES;
  // wakeup: the progress thread sleeps on its fd
  p.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucp_context_h ctx = nullptr;
  st = ucp_init(&p, cfg, &ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) return FromUcs("ucp_init", st);
  return ctx;
}

}  // namespace shardps::transport::ucx
