// Where this process sits in a job started by a cluster launcher, read from the environment in
// one place (docs/deploy.md): Slurm (srun), Open MPI (mpirun), torchrun, and ps-lite/BytePS's
// DMLC_* variables. `shardps run` turns it into a role (coordinator, server or worker).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/environment.h"
#include "shardps/status.h"

namespace shardps {

struct JobPlacement {
  std::string launcher;  // "slurm", "openmpi", "torchrun" or "dmlc"
  // Rank among the job's tasks and their number (slurm, openmpi, torchrun); -1 for dmlc.
  int32_t rank = -1;
  int32_t size = 0;
  int32_t local_rank = -1;  // on this host, where the launcher says
  int32_t local_size = 0;
  // Where the coordinator is: the first host of the allocation (slurm), MASTER_ADDR
  // (torchrun), DMLC_PS_ROOT_URI (dmlc); empty when the launcher does not say (openmpi).
  std::string coordinator_host;
  int32_t coordinator_port = 0;  // DMLC_PS_ROOT_PORT; 0: not given
  // dmlc only: the role it names ("scheduler", "server", "worker"), the counts it gives, and
  // DMLC_WORKER_ID (BytePS) as the worker's rank when set.
  std::string dmlc_role;
  int32_t dmlc_servers = 0;
  int32_t dmlc_workers = 0;

  // One line for the start-up log: "torchrun: rank 2 of 4 (local 0), coordinator 10.0.0.1".
  std::string Describe() const;
};

// The first launcher whose variables are set, in the order dmlc (explicit roles), torchrun,
// openmpi, slurm (srun inside an MPI job sets both: Open MPI's are the task's own). NotFound
// when none is; InvalidArgument naming the variable when one is malformed.
Result<JobPlacement> DetectJobPlacement(const Environment& env);

// The hosts of a Slurm host list ("node[01-03,07],login1" -> node01, node02, node03, node07,
// login1), the first `limit` of them. InvalidArgument when it cannot be read.
Result<std::vector<std::string>> ExpandSlurmHostList(const std::string& list, size_t limit = 65536);

}  // namespace shardps
