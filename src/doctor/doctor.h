// `shardps doctor`: what this machine offers for ShardPS's data path (RDMA devices and ports,
// locked-memory limit, UCX, CUDA, NCCL) and, for each problem found, what to do about it.
// Gathering facts (Gather) is separate from judging them (Advise), so the advice is unit
// tested on synthetic machines.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace shardps::doctor {

struct PortFacts {
  int number = 0;
  std::string state;                   // "ACTIVE", "DOWN", "INIT", ...
  std::string link_layer;              // "InfiniBand" or "Ethernet" (RoCE)
  int active_mtu = 0;                  // bytes
  std::vector<std::string> gids;       // non-zero GIDs
  std::vector<std::string> gid_types;  // each GID's type: "IB", "RoCE v1", "RoCE v2"
  std::string netdev;                  // RoCE: the network interface the port runs on
  std::string ipv4;  // RoCE v2: the IPv4 address of a GID (what rdma_cm and --listen use)
};

struct DeviceFacts {
  std::string name;
  std::vector<PortFacts> ports;
  bool software = false;  // a software device (rdma_rxe, siw): real verbs, not a NIC's speed
};

struct Facts {
  bool verbs_built = false;
  std::string verbs_error;       // why no device list could be read
  bool verbs_transport = false;  // this build has the verbs transport (--transport verbs)
  std::vector<DeviceFacts> devices;

  uint64_t memlock_soft = 0;  // bytes; UINT64_MAX = unlimited
  uint64_t memlock_hard = 0;
  uint64_t shard_bytes = 0;  // what one server would register (chunk-sized landing pool etc.)

  bool ucx_built = false;
  std::string ucx_version;
  std::string ucx_error;
  std::vector<std::string> ucx_resources;  // "md: transport/device" lines UCX reports
  bool ucx_cuda_memory = false;

  int cuda_devices = -1;  // -1: no CUDA driver
  std::string cuda_error;
  std::string nccl_version;  // empty: no NCCL library
  // The GPU architectures this build's kernels (server --device cuda) were built for, "80;90";
  // empty: built without CUDA.
  std::string gpu_kernels;
};

struct Finding {
  enum class Level { kOk, kInfo, kWarning, kError };
  Level level = Level::kInfo;
  std::string what;
  std::string advice;  // what to do; empty when nothing
};

struct Options {
  uint64_t shard_bytes = 64ull << 20;
  std::string ucx_tls;  // UCX_TLS to query with (empty: UCX's default)
};

// Reads the machine: libibverbs, getrlimit, UCX's own queries, dlopen of CUDA and NCCL.
Facts Gather(const Options& options);
// Judges the facts: one finding per fact worth telling, with advice for each problem.
std::vector<Finding> Advise(const Facts& facts);
// Which transport would carry the data, in words.
std::string DataPath(const Facts& facts);

std::string ToText(const Facts& facts, const std::vector<Finding>& findings);
nlohmann::json ToJson(const Facts& facts, const std::vector<Finding>& findings);
// The facts of a ToJson document (a saved `shardps doctor --json`, e.g. a test fixture);
// false when it is not one.
bool FactsFromJson(const nlohmann::json& doc, Facts* facts);
const char* LevelName(Finding::Level level);

}  // namespace shardps::doctor
