// The ucx backend: one-sided RMA through UCP (ucp_put_nbx / ucp_get_nbx on memory that UCX
// allocates with ucp_mem_map), with a tcp channel beside it for connection set-up, messages
// and control (worker addresses, key revocation). See docs/transports.md.
#pragma once

#include <memory>
#include <string>

#include "transport/context.h"

namespace shardps::transport::ucx {

// Whether UCX can run here (a context and a worker can be created), and why not.
Viability Check(const ContextOptions& options);

Result<std::unique_ptr<Context>> CreateUcxContext(const ContextOptions& options);

// UCX facts for `shardps doctor`: version, transports a context would use, memory types.
struct UcxInfo {
  std::string version;
  bool cuda_memory = false;  // the context can register CUDA memory (GPUDirect RDMA)
  std::string transports;    // what UCX reports for this configuration
  std::string error;         // why no context could be made (empty when fine)
};
UcxInfo QueryUcx(const ContextOptions& options);

}  // namespace shardps::transport::ucx
