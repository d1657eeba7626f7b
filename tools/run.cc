#include "run.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "core/job_environment.h"
#include "shardps/coordinator.h"
#include "shardps/server.h"
#include "transport/context.h"

namespace shardps::tools {
namespace {

int Fail(const Status& st, int code) {
  std::fprintf(stderr, "shardps run: %s\n", st.ToString().c_str());
  return code;
}

// The coordinator's host:port: --coordinator, else the launcher's host and port.
Result<std::string> CoordinatorAddress(const RunFlags& r, const JobPlacement& p) {
  std::string host = p.coordinator_host;
  int port = p.coordinator_port > 0 ? p.coordinator_port : r.port;
  if (!r.coordinator.empty()) {
    std::string h;
    uint16_t pt = 0;
    if (r.coordinator.find(':') != std::string::npos) {
      SHARDPS_RETURN_IF_ERROR(
          transport::ParseHostPort(r.coordinator, &h, &pt).WithContext("--coordinator"));
      host = h;
      port = pt;
    } else {
      host = r.coordinator;
    }
  }
  if (host.empty())
    return Status::InvalidArgument(fmt::format(
        "{} does not say where the coordinator runs: pass --coordinator HOST[:PORT] (the host "
        "of task 0)",
        p.launcher));
  if (port <= 0 || port > 65535)
    return Status::InvalidArgument(fmt::format("coordinator port {} outside [1, 65535]", port));
  return fmt::format("{}:{}", host, port);
}

Result<ServerOptions> ServerFor(const RunFlags& r, const JobFlags& job, const std::string& coord,
                                int32_t rank, const Environment& env) {
  ServerOptions so;
  so.coordinator = coord;
  so.rank = rank;
  so.listen = r.server_listen;
  so.advertise = r.advertise;
  so.transport = job.transport;
  so.landing_buffers = job.landing_buffers;
  so.apply_threads = job.apply_threads;
  so.device = job.device;
  so.restore = job.restore;
  so.busy_poll = std::chrono::microseconds(job.busy_poll_us);
  so.transport_settings = env.WithPrefix("UCX_");
  so.secret_file = job.secret_file;
  so.tls_cert = job.tls_cert;
  so.tls_key = job.tls_key;
  so.tls_ca = job.tls_ca;
  SHARDPS_RETURN_IF_ERROR(
      job.InboundBytes(&so.connection_inbound_bytes, &so.process_inbound_bytes));
  return so;
}

// Serves the coordinator and/or a server of this task until the job ends; the server goes
// before the coordinator.
int Serve(std::unique_ptr<Coordinator> coord, std::unique_ptr<Server> server) {
  const int rc = ServeUntilDone([&](std::chrono::milliseconds t) {
    if (coord) {
      if (server) {
        Status s = server->Wait(std::chrono::milliseconds(0));
        if (!s.ok() && !s.IsTimeout()) return s;
      }
      return coord->Wait(t);
    }
    return server->Wait(t);
  });
  server.reset();
  coord.reset();
  return rc;
}

}  // namespace

void AddRunFlags(CLI::App* app, RunFlags* r) {
  app->add_option("--coordinator", r->coordinator,
                  "HOST[:PORT] of the coordinator (task 0's host), when the launcher does not "
                  "say (Open MPI) or to override it");
  app->add_option("--port", r->port, "the coordinator's port (DMLC_PS_ROOT_PORT wins)")
      ->check(CLI::Range(1, 65535));
  AddTunable(app, tunables::kServerListen, &r->server_listen);
  AddTunable(app, tunables::kAdvertise, &r->advertise);
}

int RunRun(const RunFlags& r, const JobFlags& job, const std::vector<std::string>& program,
           const Environment& env) {
  if (program.empty())
    return Fail(Status::InvalidArgument("no program (usage: shardps run [flags] -- PROGRAM ARGS)"),
                2);
  auto placement = DetectJobPlacement(env);
  if (!placement.ok()) return Fail(placement.status(), 2);
  const JobPlacement& p = *placement;
  auto coord_addr = CoordinatorAddress(r, p);
  if (!coord_addr.ok()) return Fail(coord_addr.status(), 2);
  JobFlags jf = job;
  std::string role;
  int32_t role_rank = -1;
  bool with_coordinator = false;
  if (p.launcher == "dmlc") {
    jf.servers = static_cast<uint32_t>(p.dmlc_servers);
    jf.workers = static_cast<uint32_t>(p.dmlc_workers);
    role = p.dmlc_role == "scheduler" ? "coordinator" : p.dmlc_role;
    with_coordinator = p.dmlc_role == "scheduler";
    role_rank = p.dmlc_role == "worker" ? p.rank : -1;
  } else {
    if (static_cast<uint32_t>(p.size) < job.servers + 1)
      return Fail(
          Status::InvalidArgument(fmt::format(
              "{} tasks cannot hold {} servers and at least one worker", p.size, job.servers)),
          2);
    jf.workers = static_cast<uint32_t>(p.size) - job.servers;
    const auto rank = static_cast<uint32_t>(p.rank);
    with_coordinator = rank == 0;
    role = rank < job.servers ? "server" : "worker";
    role_rank = static_cast<int32_t>(rank < job.servers ? rank : rank - job.servers);
  }
  // Node-level reduction under a launcher: the nodes are the launcher's hosts, and a worker's
  // local rank and its node's number of workers count the worker tasks of its host only (tasks
  // of one host hold consecutive ranks; the first S tasks are the servers).
  const uint32_t per_node = jf.workers_per_node;
  jf.workers_per_node = 1;
  int32_t local_rank = -1, local_size = 0;
  if (per_node > 1 && role == "worker") {
    if (p.launcher == "dmlc" || p.local_rank < 0 || p.local_size <= 0)
      return Fail(Status::InvalidArgument(fmt::format(
                      "--workers-per-node under {}: the launcher does not say where this task "
                      "sits on its host (no local rank and size)",
                      p.launcher)),
                  2);
    const int32_t first = p.rank - p.local_rank;
    const int32_t first_worker = std::max(first, static_cast<int32_t>(job.servers));
    local_rank = p.rank - first_worker;
    local_size = first + p.local_size - first_worker;
  }
  auto lo = LaunchFor(jf, program, env);
  if (!lo.ok()) return Fail(lo.status(), 2);
  spdlog::info(
      "shardps run: {}; this task is {}{}{} ({} servers, {} workers, coordinator {})", p.Describe(),
      with_coordinator && role != "coordinator" ? "the coordinator and " : "", role,
      role_rank >= 0 ? fmt::format(" {}", role_rank) : "", jf.servers, jf.workers, *coord_addr);

  if (role == "worker") {
    // This task becomes the program, with what a worker reads (WorkerOptions::FromEnvironment).
    std::vector<std::string> extra = ChildEnvironment(*lo, *coord_addr);
    extra.push_back("SHARDPS_ROLE=worker");
    extra.push_back(fmt::format("{}={}", tunables::kRank.env, role_rank));
    if (local_size > 1) {
      extra.push_back(fmt::format("{}={}", tunables::kWorkersPerNode.env, local_size));
      extra.push_back(fmt::format("{}={}", tunables::kLocalRank.env, local_rank));
    }
    if (!jf.metrics_listen.empty())
      extra.push_back(fmt::format(
          "{}={}", tunables::kMetricsListen.env,
          MetricsListenFor(jf.metrics_listen, role_rank < 0 ? -1 : jf.servers + role_rank)));
    std::vector<std::string> entries = MergeEnvironment(env.entries(), extra);
    std::vector<char*> envp, argv;
    for (auto& e : entries) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = program;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::fflush(nullptr);
    execvpe(argv[0], argv.data(), envp.data());
    return Fail(Status::IOError(fmt::format("cannot run {}: {}", program[0], strerror(errno))),
                127);
  }

  std::unique_ptr<Coordinator> coord;
  if (with_coordinator) {
    CoordinatorOptions co = lo->coordinator;
    std::string host;
    uint16_t port = 0;
    if (Status st = transport::ParseHostPort(*coord_addr, &host, &port); !st.ok())
      return Fail(st, 2);
    co.listen = fmt::format("0.0.0.0:{}", port);
    auto c = Coordinator::Start(co);
    if (!c.ok()) return Fail(c.status(), 1);
    coord = std::move(c).value();
  }
  std::unique_ptr<Server> server;
  if (role == "server") {
    auto so = ServerFor(r, jf, *coord_addr, role_rank, env);
    if (!so.ok()) return Fail(so.status(), 2);
    so->metrics_listen = MetricsListenFor(jf.metrics_listen, role_rank);
    auto s = Server::Start(*so);
    if (!s.ok()) return Fail(s.status(), 1);
    server = std::move(s).value();
  }
  return Serve(std::move(coord), std::move(server));
}

}  // namespace shardps::tools
