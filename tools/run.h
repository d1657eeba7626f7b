// `shardps run`: one command for every task of a job started by a cluster launcher (srun,
// mpirun, torchrun, or a ps-lite/BytePS script's DMLC_* variables). Each task reads where it
// sits (core/job_environment.h) and takes its role from it: with ranks, task 0 runs the
// coordinator and server 0, tasks 1..S-1 the other servers, and the rest become workers by
// executing the program with the SHARDPS_* variables set; with DMLC_ROLE, the role it names
// (docs/deploy.md).
#pragma once

#include <string>
#include <vector>

#include "cli.h"
#include "core/environment.h"
#include "launch.h"

namespace shardps::tools {

struct RunFlags {
  // HOST or HOST:PORT of the coordinator, when the launcher does not tell (Open MPI), or to
  // override what it tells.
  std::string coordinator;
  int port = 7070;  // the coordinator's port, unless --coordinator or DMLC_PS_ROOT_PORT gives one
  std::string server_listen{tunables::kServerListen.default_value};
  std::string advertise;
};

void AddRunFlags(CLI::App* app, RunFlags* r);
// Runs this task's role; a worker's task becomes the program (exec) and does not return.
int RunRun(const RunFlags& r, const JobFlags& job, const std::vector<std::string>& program,
           const Environment& env);

}  // namespace shardps::tools
