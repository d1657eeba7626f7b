// The `shardps` command: coordinator, server, launch, bench, train, doctor.
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "bench.h"
#include "cli.h"
#include "doctor/doctor.h"
#include "launch.h"
#include "shardps/coordinator.h"
#include "shardps/server.h"
#include "train.h"
#include "transport/context.h"

namespace shardps::tools {
namespace {

// Waits for a long-running role to end, also on SIGINT/SIGTERM (checked through sigwait).
template <typename WaitFn>
int ServeUntilDone(WaitFn wait) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  for (;;) {
    Status st = wait(std::chrono::milliseconds(200));
    if (st.ok()) return 0;
    if (!st.IsTimeout()) {
      spdlog::error("{}", st.ToString());
      return 1;
    }
    timespec zero{0, 0};
    if (sigtimedwait(&set, nullptr, &zero) > 0) {
      spdlog::warn("interrupted; stopping");
      return 130;
    }
  }
}

std::vector<std::string> ArgsAfter(int argc, char** argv, const std::string& sub) {
  std::vector<std::string> out;
  bool seen = false;
  for (int i = 1; i < argc; ++i) {
    if (seen) out.emplace_back(argv[i]);
    if (!seen && sub == argv[i]) seen = true;
  }
  return out;
}

}  // namespace

int Main(int argc, char** argv) {
  CLI::App app{"ShardPS: a parameter server for distributed training", "shardps"};
  app.require_subcommand(1);
  app.option_defaults()->always_capture_default();
  std::string config_file;
  app.add_option("--config", config_file,
                 "TOML/INI file of flags ([subcommand] sections); flags > SHARDPS_* > file")
      ->envname("SHARDPS_CONFIG");
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->envname("SHARDPS_LOG_LEVEL")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));

  // coordinator
  auto* coord = app.add_subcommand("coordinator", "run the job's coordinator");
  JobFlags cjob;
  std::string listen = "0.0.0.0:7070";
  coord->add_option("--listen", listen, "host:port to listen on")->envname("SHARDPS_LISTEN");
  cjob.Add(coord);

  // server
  auto* srv = app.add_subcommand("server", "run a server");
  ServerOptions so;
  std::string srv_listen = "0.0.0.0:0";
  int32_t srv_rank = -1;
  int64_t srv_busy_poll_us = 200;
  srv->add_option("--coordinator", so.coordinator, "coordinator host:port")
      ->envname("SHARDPS_COORDINATOR")
      ->required();
  srv->add_option("--listen", srv_listen, "data address host:port")
      ->envname("SHARDPS_SERVER_LISTEN");
  srv->add_option("--advertise", so.advertise, "host workers reach this server at")
      ->envname("SHARDPS_ADVERTISE");
  srv->add_option("--rank", srv_rank, "server rank (-1: any)")->envname("SHARDPS_RANK");
  srv->add_option("--transport", so.transport, "data transport")->envname("SHARDPS_TRANSPORT");
  srv->add_option("--landing-buffers", so.landing_buffers, "landing buffers (credits)")
      ->envname("SHARDPS_LANDING_BUFFERS");
  srv->add_option("--apply-threads", so.apply_threads, "optimizer threads")
      ->envname("SHARDPS_APPLY_THREADS");
  srv->add_option("--busy-poll-us", srv_busy_poll_us,
                  "ucx: microseconds the transport thread keeps polling after an event (0: never)")
      ->envname("SHARDPS_BUSY_POLL_US")
      ->check(CLI::Range(int64_t{0}, int64_t{1000000}));

  // launch
  auto* launch = app.add_subcommand("launch", "run a local job: coordinator, servers, workers");
  JobFlags ljob;
  ljob.Add(launch);
  std::vector<std::string> program;
  launch->add_option("program", program, "-- PROGRAM ARGS...")->required();
  launch->prefix_command();

  // bench
  auto* bench = app.add_subcommand("bench", "measure push/pull throughput and latency");
  JobFlags bjob;
  bjob.Add(bench);
  BenchFlags bflags;
  AddBenchFlags(bench, &bflags);

  // train: every default is the demo's (2 servers, 4 workers, sync, mean, tcp)
  auto* train = app.add_subcommand("train", "train an MLP on Fashion-MNIST through ShardPS");
  JobFlags tjob;
  tjob.servers = 2;
  tjob.workers = 4;
  tjob.Add(train);
  TrainFlags tflags;
  AddTrainFlags(train, &tflags);

  // doctor
  auto* doctor = app.add_subcommand("doctor", "check this machine's RDMA, UCX and GPU set-up");
  bool doctor_json = false;
  std::string doctor_shard = "64MiB";
  doctor->add_flag("--json", doctor_json, "print the findings as JSON");
  doctor->add_option("--shard-size", doctor_shard, "bytes one server registers (memlock check)")
      ->envname("SHARDPS_SHARD_SIZE");

  try {
    ParseLayered(app, argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");

  if (*coord) {
    LogEffectiveConfig(*coord);
    auto co = cjob.ToCoordinator();
    if (!co.ok()) {
      std::fprintf(stderr, "shardps coordinator: %s\n", co.status().ToString().c_str());
      return 2;
    }
    co->listen = listen;
    auto c = Coordinator::Start(*co);
    if (!c.ok()) {
      std::fprintf(stderr, "shardps coordinator: %s\n", c.status().ToString().c_str());
      return 1;
    }
    return ServeUntilDone([&](std::chrono::milliseconds t) { return (*c)->Wait(t); });
  }
  if (*srv) {
    LogEffectiveConfig(*srv);
    so.listen = srv_listen;
    so.rank = srv_rank;
    so.busy_poll = std::chrono::microseconds(srv_busy_poll_us);
    auto s = Server::Start(so);
    if (!s.ok()) {
      std::fprintf(stderr, "shardps server: %s\n", s.status().ToString().c_str());
      return 1;
    }
    return ServeUntilDone([&](std::chrono::milliseconds t) { return (*s)->Wait(t); });
  }
  if (*launch) {
    LogEffectiveConfig(*launch);
    auto lo = LaunchFor(ljob, program);
    if (!lo.ok()) {
      std::fprintf(stderr, "shardps launch: %s\n", lo.status().ToString().c_str());
      return 2;
    }
    return RunLaunch(*lo);
  }
  if (*bench) {
    if (!std::getenv("SHARDPS_COORDINATOR")) LogEffectiveConfig(*bench);
    return RunBench(bflags, bjob, ArgsAfter(argc, argv, "bench"));
  }
  if (*doctor) {
    auto bytes = ParseBytes(doctor_shard);
    if (!bytes.ok()) {
      std::fprintf(stderr, "shardps doctor: --shard-size: %s\n", bytes.status().ToString().c_str());
      return 2;
    }
    doctor::Options o;
    o.shard_bytes = *bytes;
    if (const char* tls = std::getenv("UCX_TLS")) o.ucx_tls = tls;
    doctor::Facts facts = doctor::Gather(o);
    auto findings = doctor::Advise(facts);
    if (doctor_json) {
      std::printf("%s\n", doctor::ToJson(facts, findings).dump(2).c_str());
    } else {
      std::printf("%s", doctor::ToText(facts, findings).c_str());
    }
    return 0;  // it reports; problems are findings, not failures
  }
  if (*train) {
    if (!std::getenv("SHARDPS_COORDINATOR")) LogEffectiveConfig(*train);
    return RunTrain(tflags, tjob, ArgsAfter(argc, argv, "train"));
  }
  return 2;
}

}  // namespace shardps::tools

int main(int argc, char** argv) {
  // SIGINT/SIGTERM are taken synchronously (sigtimedwait / signalfd), never by handlers.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return shardps::tools::Main(argc, argv);
}
