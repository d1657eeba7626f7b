#include "core/job_environment.h"

#include <charconv>

#include <fmt/format.h>

namespace shardps {
namespace {

Status Bad(std::string_view name, const std::string& value, std::string_view want) {
  return Status::InvalidArgument(fmt::format("{}='{}' is not {}", name, value, want));
}

// The integer value of `name`: absent -> `fallback`; malformed or out of [lo, hi] -> error.
Result<int32_t> Int(const Environment& env, std::string_view name, int32_t fallback, int32_t lo,
                    int32_t hi) {
  auto v = env.Get(name);
  if (!v) return fallback;
  int32_t x = 0;
  auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), x);
  if (ec != std::errc() || p != v->data() + v->size() || v->empty() || x < lo || x > hi)
    return Bad(name, *v, fmt::format("an integer in [{}, {}]", lo, hi));
  return x;
}

Status CheckRank(const JobPlacement& p, std::string_view rank_var) {
  if (p.rank >= p.size)
    return Status::InvalidArgument(
        fmt::format("{} {} is not below the job's {} tasks", rank_var, p.rank, p.size));
  return Status::OK();
}

}  // namespace

std::string JobPlacement::Describe() const {
  std::string s = launcher + ": ";
  if (launcher == "dmlc") {
    s += fmt::format("role {}, {} servers, {} workers", dmlc_role, dmlc_servers, dmlc_workers);
  } else {
    s += fmt::format("rank {} of {}", rank, size);
  }
  if (local_rank >= 0) s += fmt::format(" (local {})", local_rank);
  if (!coordinator_host.empty()) s += ", coordinator host " + coordinator_host;
  if (coordinator_port > 0) s += fmt::format(" port {}", coordinator_port);
  return s;
}

Result<std::vector<std::string>> ExpandSlurmHostList(const std::string& list, size_t limit) {
  std::vector<std::string> out;
  size_t i = 0;
  auto bad = [&](const char* why) {
    return Status::InvalidArgument(fmt::format("Slurm host list '{}': {}", list, why));
  };
  while (i < list.size()) {
    // One item: a prefix, then optionally [ranges], then a suffix up to the next top-level ','.
    size_t open = list.find_first_of("[,", i);
    std::string prefix = list.substr(i, open == std::string::npos ? std::string::npos : open - i);
    if (open == std::string::npos || list[open] == ',') {
      if (prefix.empty()) return bad("an empty host name");
      out.push_back(prefix);
      if (out.size() >= limit) return out;
      i = open == std::string::npos ? list.size() : open + 1;
      continue;
    }
    size_t close = list.find(']', open);
    if (close == std::string::npos) return bad("a '[' without ']'");
    size_t end = list.find(',', close);
    std::string suffix =
        list.substr(close + 1, end == std::string::npos ? std::string::npos : end - close - 1);
    std::string ranges = list.substr(open + 1, close - open - 1);
    size_t r = 0;
    while (r <= ranges.size()) {
      size_t comma = ranges.find(',', r);
      std::string item =
          ranges.substr(r, comma == std::string::npos ? std::string::npos : comma - r);
      size_t dash = item.find('-');
      std::string a = item.substr(0, dash),
                  b = dash == std::string::npos ? a : item.substr(dash + 1);
      uint64_t lo = 0, hi = 0;
      auto [pa, ea] = std::from_chars(a.data(), a.data() + a.size(), lo);
      auto [pb, eb] = std::from_chars(b.data(), b.data() + b.size(), hi);
      if (a.empty() || b.empty() || ea != std::errc() || eb != std::errc() ||
          pa != a.data() + a.size() || pb != b.data() + b.size() || hi < lo)
        return bad("a range that is not N or N-M");
      for (uint64_t n = lo; n <= hi; ++n) {
        std::string num = std::to_string(n);
        if (num.size() < a.size()) num = std::string(a.size() - num.size(), '0') + num;  // node01
        out.push_back(prefix + num + suffix);
        if (out.size() >= limit) return out;
      }
      if (comma == std::string::npos) break;
      r = comma + 1;
    }
    i = end == std::string::npos ? list.size() : end + 1;
  }
  if (out.empty()) return bad("no host");
  return out;
}

Result<JobPlacement> DetectJobPlacement(const Environment& env) {
  JobPlacement p;
  if (auto role = env.Get("DMLC_ROLE")) {
    p.launcher = "dmlc";
    if (*role != "scheduler" && *role != "server" && *role != "worker")
      return Bad("DMLC_ROLE", *role, "scheduler, server or worker");
    p.dmlc_role = *role;
    SHARDPS_ASSIGN_OR_RETURN(p.dmlc_servers, Int(env, "DMLC_NUM_SERVER", 0, 1, 4096));
    SHARDPS_ASSIGN_OR_RETURN(p.dmlc_workers, Int(env, "DMLC_NUM_WORKER", 0, 1, 65536));
    if (p.dmlc_servers == 0 || p.dmlc_workers == 0)
      return Status::InvalidArgument(
          "DMLC_ROLE is set but DMLC_NUM_SERVER or DMLC_NUM_WORKER is not");
    auto uri = env.Get("DMLC_PS_ROOT_URI");
    if (!uri || uri->empty())
      return Status::InvalidArgument("DMLC_ROLE is set but DMLC_PS_ROOT_URI is not");
    p.coordinator_host = *uri;
    SHARDPS_ASSIGN_OR_RETURN(p.coordinator_port, Int(env, "DMLC_PS_ROOT_PORT", 0, 1, 65535));
    if (p.coordinator_port == 0)
      return Status::InvalidArgument("DMLC_ROLE is set but DMLC_PS_ROOT_PORT is not");
    SHARDPS_ASSIGN_OR_RETURN(p.rank, Int(env, "DMLC_WORKER_ID", -1, 0, p.dmlc_workers - 1));
    return p;
  }
  if (env.Has("RANK") && env.Has("WORLD_SIZE")) {
    p.launcher = "torchrun";
    SHARDPS_ASSIGN_OR_RETURN(p.size, Int(env, "WORLD_SIZE", 0, 1, 1 << 20));
    SHARDPS_ASSIGN_OR_RETURN(p.rank, Int(env, "RANK", 0, 0, 1 << 20));
    SHARDPS_ASSIGN_OR_RETURN(p.local_rank, Int(env, "LOCAL_RANK", -1, 0, 1 << 20));
    SHARDPS_ASSIGN_OR_RETURN(p.local_size, Int(env, "LOCAL_WORLD_SIZE", 0, 1, 1 << 20));
    p.coordinator_host = env.Get("MASTER_ADDR").value_or("");
    SHARDPS_RETURN_IF_ERROR(CheckRank(p, "RANK"));
    return p;
  }
  if (env.Has("OMPI_COMM_WORLD_RANK")) {
    p.launcher = "openmpi";
    SHARDPS_ASSIGN_OR_RETURN(p.size, Int(env, "OMPI_COMM_WORLD_SIZE", 0, 1, 1 << 20));
    if (p.size == 0) return Status::InvalidArgument("OMPI_COMM_WORLD_SIZE is not set");
    SHARDPS_ASSIGN_OR_RETURN(p.rank, Int(env, "OMPI_COMM_WORLD_RANK", 0, 0, 1 << 20));
    SHARDPS_ASSIGN_OR_RETURN(p.local_rank, Int(env, "OMPI_COMM_WORLD_LOCAL_RANK", -1, 0, 1 << 20));
    SHARDPS_ASSIGN_OR_RETURN(p.local_size, Int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 0, 1, 1 << 20));
    SHARDPS_RETURN_IF_ERROR(CheckRank(p, "OMPI_COMM_WORLD_RANK"));
    return p;
  }
  if (env.Has("SLURM_PROCID")) {
    p.launcher = "slurm";
    SHARDPS_ASSIGN_OR_RETURN(p.size, Int(env, "SLURM_NTASKS", 0, 1, 1 << 20));
    if (p.size == 0) return Status::InvalidArgument("SLURM_PROCID is set but SLURM_NTASKS is not");
    SHARDPS_ASSIGN_OR_RETURN(p.rank, Int(env, "SLURM_PROCID", 0, 0, 1 << 20));
    SHARDPS_ASSIGN_OR_RETURN(p.local_rank, Int(env, "SLURM_LOCALID", -1, 0, 1 << 20));
    SHARDPS_RETURN_IF_ERROR(CheckRank(p, "SLURM_PROCID"));
    auto nodes = env.Get("SLURM_STEP_NODELIST");
    if (!nodes) nodes = env.Get("SLURM_JOB_NODELIST");
    if (nodes) {
      auto hosts = ExpandSlurmHostList(*nodes, 1);
      if (!hosts.ok()) return hosts.status();
      p.coordinator_host = hosts->front();
    }
    return p;
  }
  return Status::NotFound(
      "no cluster launcher found in the environment (Slurm SLURM_PROCID, Open MPI "
      "OMPI_COMM_WORLD_RANK, torchrun RANK and WORLD_SIZE, or DMLC_ROLE)");
}

}  // namespace shardps
