// The `shardps` command: coordinator, server, launch, run, bench, train, checkpoint, doctor.
#include <csignal>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "bench.h"
#include "checkpoint.h"
#include "cli.h"
#include "core/environment.h"
#include "doctor/doctor.h"
#include "launch.h"
#include "run.h"
#include "shardps/coordinator.h"
#include "shardps/server.h"
#include "shardps/tunables.h"
#include "train.h"
#include "transport/context.h"

namespace shardps::tools {
namespace {

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

int Main(int argc, char** argv, char** envp) {
  // The one snapshot of the environment everything below reads (CLI11 reads the SHARDPS_*
  // variables of the flags itself).
  const Environment env(envp);
  CLI::App app{"ShardPS: a parameter server for distributed training", "shardps"};
  app.require_subcommand(1);
  app.option_defaults()->always_capture_default();
  using namespace tunables;
  std::string config_file;
  AddTunable(&app, kConfig, &config_file);
  std::string log_level{kLogLevel.default_value};
  AddTunable(&app, kLogLevel, &log_level)
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));

  // coordinator
  auto* coord = app.add_subcommand("coordinator", "run the job's coordinator");
  JobFlags cjob;
  std::string listen{kCoordinatorListen.default_value};
  AddTunable(coord, kCoordinatorListen, &listen);
  cjob.Add(coord);

  // server
  auto* srv = app.add_subcommand("server", "run a server");
  ServerOptions so;
  std::string srv_listen{kServerListen.default_value};
  int32_t srv_rank = static_cast<int32_t>(kRank.number);
  int64_t srv_busy_poll_us = kBusyPollUs.number;
  std::string srv_conn_inbound{kConnectionInbound.default_value};
  std::string srv_proc_inbound{kProcessInbound.default_value};
  AddTunable(srv, kCoordinator, &so.coordinator)->required();
  AddTunable(srv, kServerListen, &srv_listen);
  AddTunable(srv, kAdvertise, &so.advertise);
  AddTunable(srv, kRank, &srv_rank);
  AddTunable(srv, kTransport, &so.transport);
  AddTunable(srv, kLandingBuffers, &so.landing_buffers)->check(CLI::Range(1u, 4096u));
  AddTunable(srv, kApplyThreads, &so.apply_threads)->check(CLI::Range(1u, 64u));
  AddTunable(srv, kDevice, &so.device);
  AddTunable(srv, kRestore, &so.restore);
  AddTunable(srv, kBusyPollUs, &srv_busy_poll_us)->check(CLI::Range(int64_t{0}, int64_t{1000000}));
  AddTunable(srv, kConnectionInbound, &srv_conn_inbound);
  AddTunable(srv, kProcessInbound, &srv_proc_inbound);
  AddTunable(srv, kSecretFile, &so.secret_file);
  AddTunable(srv, kMetricsListen, &so.metrics_listen);
  AddTunable(srv, kTimeline, &so.timeline);
  AddTunable(srv, kTlsCert, &so.tls_cert);
  AddTunable(srv, kTlsKey, &so.tls_key);
  AddTunable(srv, kTlsCa, &so.tls_ca);

  // launch
  auto* launch = app.add_subcommand("launch", "run a local job: coordinator, servers, workers");
  JobFlags ljob;
  ljob.Add(launch);
  std::vector<std::string> program;
  launch->add_option("program", program, "-- PROGRAM ARGS...")->required();
  launch->prefix_command();

  // run: one task of a job started by srun, mpirun, torchrun or a DMLC script
  auto* run = app.add_subcommand(
      "run", "one task of a cluster launch (srun, mpirun, torchrun, DMLC_*): its role by rank");
  JobFlags rjob;
  rjob.Add(run);
  RunFlags rflags;
  AddRunFlags(run, &rflags);
  std::vector<std::string> run_program;
  run->add_option("program", run_program, "-- PROGRAM ARGS... (what each worker runs)")->required();
  run->prefix_command();

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

  // checkpoint
  auto* ckpt = app.add_subcommand(
      "checkpoint", "checkpoint a running job into a directory: its coordinator takes it");
  CheckpointFlags ckflags;
  AddCheckpointFlags(ckpt, &ckflags);

  // doctor
  auto* doctor = app.add_subcommand("doctor", "check this machine's RDMA, UCX and GPU set-up");
  bool doctor_json = false;
  std::string doctor_shard{kShardSize.default_value};
  doctor->add_flag("--json", doctor_json, "print the findings as JSON");
  AddTunable(doctor, kShardSize, &doctor_shard);

  // tunables
  auto* tun = app.add_subcommand("tunables", "list every tunable: flag, variable, default");
  bool tun_markdown = false;
  tun->add_flag("--markdown", tun_markdown, "print docs/configuration.md");

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
    so.transport_settings = env.WithPrefix("UCX_");
    for (auto [flag, text, out] :
         {std::tuple{"--connection-inbound-bytes", &srv_conn_inbound, &so.connection_inbound_bytes},
          std::tuple{"--process-inbound-bytes", &srv_proc_inbound, &so.process_inbound_bytes}}) {
      auto b = ParseBytes(*text);
      if (!b.ok()) {
        std::fprintf(stderr, "shardps server: %s: %s\n", flag, b.status().ToString().c_str());
        return 2;
      }
      *out = *b;
    }
    auto s = Server::Start(so);
    if (!s.ok()) {
      std::fprintf(stderr, "shardps server: %s\n", s.status().ToString().c_str());
      return 1;
    }
    return ServeUntilDone([&](std::chrono::milliseconds t) { return (*s)->Wait(t); });
  }
  if (*launch) {
    LogEffectiveConfig(*launch);
    auto lo = LaunchFor(ljob, program, env);
    if (!lo.ok()) {
      std::fprintf(stderr, "shardps launch: %s\n", lo.status().ToString().c_str());
      return 2;
    }
    return RunLaunch(*lo);
  }
  if (*run) {
    LogEffectiveConfig(*run);
    return RunRun(rflags, rjob, run_program, env);
  }
  if (*bench) {
    if (!env.Has(kCoordinator.env)) LogEffectiveConfig(*bench);
    return RunBench(bflags, bjob, ArgsAfter(argc, argv, "bench"), env);
  }
  if (*ckpt) return RunCheckpoint(ckflags);
  if (*doctor) {
    auto bytes = ParseBytes(doctor_shard);
    if (!bytes.ok()) {
      std::fprintf(stderr, "shardps doctor: --shard-size: %s\n", bytes.status().ToString().c_str());
      return 2;
    }
    doctor::Options o;
    o.shard_bytes = *bytes;
    if (auto tls = env.Get("UCX_TLS")) o.ucx_tls = *tls;
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
    if (!env.Has(kCoordinator.env)) LogEffectiveConfig(*train);
    tflags.checkpoint_dir = tjob.checkpoint_dir;
    return RunTrain(tflags, tjob, ArgsAfter(argc, argv, "train"), env);
  }
  if (*tun) {
    if (tun_markdown) {
      std::printf("%s", TunablesMarkdown().c_str());
      return 0;
    }
    for (const Tunable* t : kAll)
      std::printf("--%-26s %-34s %-14s %s\n", std::string(t->name).c_str(),
                  std::string(t->env).c_str(),
                  t->default_value.empty() ? "-" : std::string(t->default_value).c_str(),
                  std::string(t->help).c_str());
    return 0;
  }
  return 2;
}

}  // namespace shardps::tools

int main(int argc, char** argv, char** envp) {
  // SIGINT/SIGTERM are taken synchronously (sigtimedwait / signalfd), never by handlers.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return shardps::tools::Main(argc, argv, envp);
}
