#include "bench.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sstream>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "core/subprocess.h"
#include "kill_server.h"
#include "launch.h"
#include "shardps/worker.h"
#include "transport/context.h"

namespace shardps::tools {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Integer-valued gradient: exact in float32 whether the servers sum or average.
float Grad(uint32_t w, uint64_t step, uint64_t i, uint32_t workers) {
  int64_t v = static_cast<int64_t>(((w + 1) * 3 + step * 7 + i % 13) % 17) - 8;
  return static_cast<float>(v * static_cast<int64_t>(workers));
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t idx = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(idx, v.size() - 1)];
}

// Fills out[0, n) with the 13-periodic pattern p[i % 13], doubling a filled prefix with memcpy:
// at memory speed, so the gap between timed operations stays short (a gap longer than the busy
// poll puts the servers' threads to sleep, and the next operation would pay their wake-up).
void FillPeriodic13(float* out, uint64_t n, const float (&p)[13]) {
  uint64_t filled = std::min<uint64_t>(n, 13);
  std::copy(p, p + filled, out);
  while (filled < n) {
    uint64_t len = std::min(filled, n - filled);
    std::memcpy(out + filled, out, len * sizeof(float));
    filled += len;
  }
}

// --kill-second-server-at: every worker meets before `iteration` (none has started it, so no
// sync step is open and every chunk can be copied to its new backup), waits until each chunk of
// its tensors has a backup it is attached to (the coordinator counted the new backup whole and
// told it; a server's own count comes before that), and they meet again; worker 0 SIGKILLs
// server 1; they meet once more.
Status KillSecondServer(Worker& w, uint32_t iteration, std::chrono::seconds wait) {
  SHARDPS_RETURN_IF_ERROR(w.Barrier("bench.second-kill", wait));
  const auto start = Clock::now();
  for (uint64_t unbacked; (unbacked = w.stats().unbacked_chunks) != 0;) {
    if (Clock::now() - start > wait)
      return Status::Timeout(
          fmt::format("{} chunks still have no backup {} s into iteration {}: no new backups",
                      unbacked, wait.count(), iteration));
    std::this_thread::sleep_for(10ms);
  }
  const double waited = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  SHARDPS_RETURN_IF_ERROR(w.Barrier("bench.backed-up", wait));
  if (w.rank() == 0) {
    auto pid = KillServerProcess(w, 1, SIGKILL);
    if (!pid.ok()) return pid.status();
    std::printf(
        "worker 0: every chunk had a backup again (waited %.0f ms at iteration %u); killed server "
        "1 (pid %d)\n",
        waited, iteration, *pid);
    std::fflush(stdout);
  }
  return w.Barrier("bench.second-killed", wait);
}

// A failed wait: the error, then what every server still reachable says of itself (its stats:
// open steps, epoch, unbacked chunks), so that a stall names where it is.
int WaitFailed(Worker& w, const Status& st) {
  std::fprintf(stderr, "shardps bench: worker %u: %s\n", w.rank(), st.ToString().c_str());
  if (st.IsTimeout())
    for (uint32_t s = 0; s < w.num_servers(); ++s) {
      auto js = w.ServerStats(s);
      std::fprintf(stderr, "shardps bench: worker %u: server %u says: %s\n", w.rank(), s,
                   js.ok() ? js->c_str() : js.status().ToString().c_str());
    }
  return 1;
}

}  // namespace

void AddBenchFlags(CLI::App* app, BenchFlags* b) {
  app->add_option("--op", b->op, "push, pull or pushpull")
      ->check(CLI::IsMember({"push", "pull", "pushpull"}));
  app->add_option("--size", b->size, "bytes per tensor (e.g. 4MiB)");
  app->add_option("--tensors", b->tensors, "tensors per iteration")->check(CLI::Range(1u, 100000u));
  app->add_option("--iters", b->iters, "timed iterations")->check(CLI::Range(1u, 1000000u));
  app->add_option("--warmup", b->warmup, "untimed iterations first")->check(CLI::Range(0u, 1000u));
  app->add_flag("--verify", b->verify, "check every pulled value exactly");
  app->add_option("--kill-server-at", b->kill_server_at,
                  "worker 0 kills server 0 (SIGKILL; it must run on this host) before this "
                  "iteration, counting the warm-up: with --replicas 1 the job goes on "
                  "(docs/fault-tolerance.md)");
  app->add_option(
      "--kill-second-server-at", b->kill_second_server_at,
      "after --kill-server-at: every worker meets before this iteration, worker 0 "
      "waits until every chunk has a backup again (at most --wait-timeout-s), then kills "
      "server 1 (needs --servers 3 or more, or --restart-servers 1)");
  app->add_option("--kill-server-how", b->kill_server_how,
                  "kill (SIGKILL), or stop (SIGSTOP, then SIGCONT once that iteration completed: "
                  "a server that comes back after it was replaced)")
      ->check(CLI::IsMember({"kill", "stop"}));
  app->add_option("--wait-timeout-s", b->wait_timeout_s,
                  "how long one operation, barrier or the wait for new backups may take before "
                  "the bench fails, printing what every server says of itself")
      ->check(CLI::Range(1u, 3600u));
  app->add_option("--kill-worker-at", b->kill_worker_at,
                  "the last worker kills itself (SIGKILL) before this iteration, counting the "
                  "warm-up: with --on-worker-loss continue the others go on without it");
  app->add_option("--compression", b->compression,
                  "gradient compression (none, fp16, bf16, int8, onebit, topk; see "
                  "docs/compression.md)");
  app->add_option("--pull-compression", b->pull_compression, "parameters: none, fp16 or bf16");
  app->add_option("--report", b->report, "write a JSON report here");
  app->add_flag("--no-baseline", b->no_baseline,
                "with --report: leave the same-run baseline out (the suite measures its own)");
  app->add_option("--suite", b->suite,
                  "run the benchmark suite (its scenarios and baselines: tools/bench_suite.cc): "
                  "quick (about 5 minutes on 2 cores) or full (about 30)")
      ->check(CLI::IsMember({"quick", "full"}));
  app->add_option("--plot-dir", b->plot_dir,
                  "with --suite: draw throughput.png, latency.png and scaling.png here (gnuplot)");
}

Result<int> ListenOnLoopback(sockaddr_in* a) {
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  *a = sockaddr_in{};
  a->sin_family = AF_INET;
  a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(*a);
  if (ls < 0 || bind(ls, reinterpret_cast<sockaddr*>(a), sizeof(*a)) != 0 || listen(ls, 1) != 0 ||
      getsockname(ls, reinterpret_cast<sockaddr*>(a), &len) != 0) {
    const int err = errno;
    if (ls >= 0) close(ls);
    return Status::FromErrno("baseline socket on 127.0.0.1", err);
  }
  return ls;
}

Result<double> MeasureTcpStreamGbps(uint64_t bytes) {
  sockaddr_in a{};
  SHARDPS_ASSIGN_OR_RETURN(int ls, ListenOnLoopback(&a));
  constexpr size_t kBuf = 4 << 20;
  pid_t pid = fork();
  if (pid < 0) return Status::FromErrno("fork", errno);
  if (pid == 0) {
    alarm(120);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int b = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &b, sizeof(b));
    if (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) _exit(1);
    std::vector<char> buf(kBuf, 1);
    uint64_t left = bytes;
    while (left > 0) {
      ssize_t n = send(s, buf.data(), std::min<uint64_t>(left, kBuf), 0);
      if (n <= 0) _exit(2);
      left -= static_cast<uint64_t>(n);
    }
    char ack;
    if (recv(s, &ack, 1, 0) != 1) _exit(3);
    _exit(0);
  }
  int c = accept(ls, nullptr, nullptr);
  close(ls);
  int b = 4 << 20;
  setsockopt(c, SOL_SOCKET, SO_RCVBUF, &b, sizeof(b));
  std::vector<char> buf(kBuf);
  auto t0 = Clock::now();
  uint64_t got = 0;
  while (got < bytes) {
    ssize_t n = recv(c, buf.data(), kBuf, 0);
    if (n <= 0) break;
    got += static_cast<uint64_t>(n);
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  char ack = 1;
  [[maybe_unused]] ssize_t w = send(c, &ack, 1, 0);
  close(c);
  int st = 0;
  waitpid(pid, &st, 0);
  if (got < bytes) return Status::IOError("baseline stream ended early");
  return static_cast<double>(bytes) * 8 / secs / 1e9;
}

Result<PerftestResult> RunUcxPerftest(const std::string& test, uint64_t size, uint32_t iters) {
  uint16_t free_port = transport::FreeLoopbackPort();
  if (free_port == 0) return Status::IOError("no free loopback port for ucx_perftest");
  std::string port = std::to_string(free_port);
  pid_t server = fork();
  if (server < 0) return Status::FromErrno("fork", errno);
  if (server == 0) {
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    alarm(120);
    execlp("ucx_perftest", "ucx_perftest", "-p", port.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  Result<std::string> out = Status::Internal("not run");
  // The server needs a moment to listen; retry the client a few times (bounded).
  for (int attempt = 0; attempt < 20; ++attempt) {
    usleep(100000);
    CommandResult run = RunCommand({"ucx_perftest", "127.0.0.1", "-p", port, "-t", test, "-s",
                                    std::to_string(size), "-n", std::to_string(iters), "-f"},
                                   std::chrono::seconds(120));
    if (run.exit_code == 0)
      out = run.output;
    else
      out = Status::IOError(fmt::format("ucx_perftest {}: {}",
                                        run.timed_out ? "ran past 120 s"
                                        : run.exit_code == 127
                                            ? "not found"
                                            : fmt::format("exited {}", run.exit_code),
                                        run.output.substr(0, 2000)));
    if (out.ok() || out.status().message().find("not found") != std::string::npos) break;
    if (waitpid(server, nullptr, WNOHANG) == server) break;
  }
  kill(server, SIGKILL);
  waitpid(server, nullptr, 0);
  if (!out.ok())
    return out.status().WithContext("ucx_perftest -t " + test +
                                    " (apt-get install ucx-utils if it is missing)");
  // The last line of numbers: iterations, latency 50%ile, average, overall (usec), bandwidth
  // average, overall (MB/s), message rate average, overall.
  PerftestResult r;
  bool found = false;
  std::istringstream lines(*out);
  std::string line;
  while (std::getline(lines, line)) {
    double v[8];
    if (std::sscanf(line.c_str(), "%lf %lf %lf %lf %lf %lf %lf %lf", &v[0], &v[1], &v[2], &v[3],
                    &v[4], &v[5], &v[6], &v[7]) == 8) {
      r.latency_us = v[2];
      r.gbps = v[5] * 1024 * 1024 * 8 / 1e9;
      found = true;
    }
  }
  if (!found)
    return Status::IOError("could not read ucx_perftest's output: " + out->substr(0, 500));
  return r;
}

int RunBench(const BenchFlags& b, const JobFlags& job, const std::vector<std::string>& args,
             const Environment& env) {
  if (!b.suite.empty()) {
    if (env.Has(tunables::kCoordinator.env)) {
      std::fprintf(stderr, "shardps bench: --suite starts its own jobs; run it standalone\n");
      return 2;
    }
    return RunBenchSuite(b.suite, b.report, b.plot_dir);
  }
  if (!b.plot_dir.empty()) {
    std::fprintf(stderr, "shardps bench: --plot-dir draws the suite's plots: add --suite\n");
    return 2;
  }
  auto size = ParseBytes(b.size);
  if (!size.ok() || *size < 4 || *size % 4 != 0) {
    std::fprintf(stderr, "shardps bench: --size %s: must be a positive multiple of 4 bytes\n",
                 b.size.c_str());
    return 2;
  }
  auto comp = Compression::Parse(b.compression);
  if (!comp.ok()) {
    std::fprintf(stderr, "shardps bench: --compression: %s\n", comp.status().ToString().c_str());
    return 2;
  }
  Codec pull_codec = b.pull_compression == "fp16"   ? Codec::kFp16
                     : b.pull_compression == "bf16" ? Codec::kBf16
                                                    : Codec::kNone;
  if (pull_codec == Codec::kNone && b.pull_compression != "none") {
    std::fprintf(stderr, "shardps bench: --pull-compression %s: expected none, fp16 or bf16\n",
                 b.pull_compression.c_str());
    return 2;
  }
  if (b.verify && comp->codec != Codec::kNone && comp->codec != Codec::kFp16 &&
      comp->codec != Codec::kBf16) {
    std::fprintf(stderr,
                 "shardps bench: --verify checks exact values, which --compression %s does not "
                 "keep (it is exact with none, fp16 and bf16)\n",
                 b.compression.c_str());
    return 2;
  }
  if (b.verify &&
      (job.sync_quorum != 0 || !job.worker_weights.empty() || job.weight_rule != "fixed")) {
    std::fprintf(stderr,
                 "shardps bench: --verify expects every push applied with weight 1, which "
                 "--sync-quorum, --worker-weights and --weight-rule change\n");
    return 2;
  }
  if (b.kill_server_at > 0 && (job.servers < 2 || job.replicas == 0)) {
    std::fprintf(stderr,
                 "shardps bench: --kill-server-at needs --servers 2 or more and --replicas 1 (a "
                 "job without backups ends when a server dies)\n");
    return 2;
  }
  if (b.kill_second_server_at > 0 &&
      ((job.servers < 3 && job.restart_servers == 0) || b.kill_server_at == 0 ||
       b.kill_second_server_at <= b.kill_server_at)) {
    std::fprintf(stderr,
                 "shardps bench: --kill-second-server-at needs --servers 3 or more (or a new "
                 "server in the dead one's place: --restart-servers 1) and --kill-server-at at an "
                 "earlier iteration (the second death is survived once the first one's chunks "
                 "have new backups)\n");
    return 2;
  }
  if (job.restart_workers > 0) {
    // Its workers run a fixed number of iterations from a shared start barrier and verify
    // each step's values, which a worker joining midway would not fit.
    std::fprintf(
        stderr,
        "shardps bench: --restart-workers is not for bench (its workers measure and verify "
        "a fixed run from a common start); shardps train --kill-worker-at N "
        "--restart-workers 1 shows a worker rejoining\n");
    return 2;
  }
  if (b.kill_worker_at > 0 && (job.workers < 2 || job.on_worker_loss != "continue")) {
    std::fprintf(stderr,
                 "shardps bench: --kill-worker-at needs --workers 2 or more and --on-worker-loss "
                 "continue (otherwise a worker's death ends the job)\n");
    return 2;
  }
  if (!env.Has(tunables::kCoordinator.env)) {
    // Standalone: launch a local cluster whose workers are this same benchmark.
    std::vector<std::string> program = {SelfExe(), "bench"};
    program.insert(program.end(), args.begin(), args.end());
    auto lo = LaunchFor(job, std::move(program), env);
    if (!lo.ok()) {
      std::fprintf(stderr, "shardps bench: %s\n", lo.status().ToString().c_str());
      return 2;
    }
    return RunLaunch(*lo);
  }
  auto envp = env.Envp();
  auto wo = WorkerOptions::FromEnvironment(envp.data());
  if (!wo.ok()) {
    std::fprintf(stderr, "shardps bench: %s\n", wo.status().ToString().c_str());
    return 2;
  }
  // The baseline is measured before this process starts any thread (it forks).
  double baseline_gbps = 0;
  bool rank0 = wo->rank <= 0;
  nlohmann::json ucx_baseline;
  if (rank0 && !b.report.empty() && !b.no_baseline && wo->transport == "ucx") {
    // ucx_perftest on the same machine and UCX_TLS: put and get bandwidth at this size, and
    // put and get latency at this size.
    uint32_t iters = *size >= (1 << 20) ? 200 : 10000;
    auto put_bw = RunUcxPerftest("ucp_put_bw", *size, iters);
    auto get_bw = RunUcxPerftest("ucp_get", *size, iters);
    auto put_lat = RunUcxPerftest("ucp_put_lat", *size, iters);
    for (auto* r : {&put_bw, &get_bw, &put_lat})
      if (!r->ok()) {
        std::fprintf(stderr, "shardps bench: baseline: %s\n", r->status().ToString().c_str());
        return 1;
      }
    ucx_baseline = {{"kind", "ucx_perftest"},
                    {"size_bytes", *size},
                    {"ucp_put_bw_gbps", put_bw->gbps},
                    {"ucp_get_bw_gbps", get_bw->gbps},
                    {"ucp_put_lat_us", put_lat->latency_us},
                    {"ucp_get_lat_us", get_bw->latency_us}};
  } else if (rank0 && !b.report.empty() && !b.no_baseline) {
    // The best of three runs: the raw transport's capability, not a run that happened to share
    // the cores with servers still starting up (which only makes the ratio harder to reach).
    for (int i = 0; i < 3; ++i) {
      auto g = MeasureTcpStreamGbps(std::max<uint64_t>(1ull << 30, *size * 8));
      if (!g.ok()) {
        std::fprintf(stderr, "shardps bench: baseline: %s\n", g.status().ToString().c_str());
        return 1;
      }
      baseline_gbps = std::max(baseline_gbps, *g);
    }
  }
  auto worker = Worker::Connect(*wo);
  if (!worker.ok()) {
    std::fprintf(stderr, "shardps bench: %s\n", worker.status().ToString().c_str());
    return 1;
  }
  Worker& w = **worker;
  const uint32_t W = w.num_workers();
  const uint64_t n = *size / 4;
  const bool sum = job.aggregate == "sum";
  const bool async = w.mode() != Mode::kSync;  // ssp:K applies each push on arrival too
  const float init = 1000.0f;
  std::vector<TensorSpec> specs;
  for (uint32_t k = 0; k < b.tensors; ++k) {
    TensorSpec t;
    t.name = fmt::format("bench.{}", k);
    t.shape = {static_cast<int64_t>(n)};
    t.init_value = init;
    t.optimizer.kind = OptimizerKind::kSgd;
    t.optimizer.lr = 1.0f;
    t.compression = *comp;
    t.pull_codec = pull_codec;
    specs.push_back(t);
  }
  auto ids = w.Declare(specs);
  if (!ids.ok()) {
    std::fprintf(stderr, "shardps bench: %s\n", ids.status().ToString().c_str());
    return 1;
  }
  bool push = b.op != "pull", pull = b.op != "push";
  std::vector<float> grad(n), out(static_cast<size_t>(n) * b.tensors);
  // --kill-worker-at: the last worker pushes the steps before it, then dies.
  const uint32_t dies = b.kill_worker_at > 0 ? W - 1 : W;
  auto pushed = [&](uint32_t ww, uint64_t s) { return ww != dies || s < b.kill_worker_at; };
  // Expected parameter after `steps` of everyone's pushes, element i (exact integers); a sync
  // mean is over each step's contributors.
  auto expected = [&](uint64_t steps, uint64_t i) {
    double v = init;
    for (uint64_t s = 1; s <= steps; ++s) {
      uint32_t contributors = 0;
      for (uint32_t ww = 0; ww < W; ++ww) contributors += pushed(ww, s) ? 1 : 0;
      for (uint32_t ww = 0; ww < W; ++ww)
        if (pushed(ww, s))
          v -= Grad(ww, s, i, W) / ((sum || async) ? 1.0 : static_cast<double>(contributors));
    }
    return static_cast<float>(v);
  };
  int mismatches = 0;
  std::vector<float> want(n);
  auto check = [&](uint64_t steps, const std::string& when) {
    // The expected value depends on i only through i % 13.
    float table[13];
    for (uint64_t r = 0; r < 13; ++r) table[r] = expected(steps, r);
    FillPeriodic13(want.data(), n, table);
    for (uint64_t k = 0; k < b.tensors; ++k) {
      const float* o = out.data() + k * n;
      if (std::memcmp(o, want.data(), n * sizeof(float)) == 0) continue;
      uint64_t i = 0;
      while (i + 1 < n && o[i] == want[i]) ++i;  // memcmp sees -0 != +0; == does not
      std::fprintf(stderr,
                   "shardps bench: verify failed %s: tensor bench.%lu element %lu: expected "
                   "%.1f, found %.9g\n",
                   when.c_str(), static_cast<unsigned long>(k), static_cast<unsigned long>(i),
                   want[i], o[i]);
      ++mismatches;
      return;
    }
  };
  const std::chrono::seconds wait(b.wait_timeout_s);
  std::vector<double> lat_us;
  uint64_t step = 0;
  const bool stop_server = b.kill_server_how == "stop";
  int stopped_pid = 0;
  WorkerStats before{};
  for (uint32_t it = 0; it < b.warmup + b.iters && mismatches == 0; ++it) {
    if (it == b.warmup) {
      before = w.stats();
      Status bs = w.Barrier("bench.start", wait);
      if (!bs.ok()) return WaitFailed(w, bs);
    }
    if (push) {
      // Filled outside the timed region; periodic in i (i % 13), so filled from a table.
      ++step;
      float g[13];
      for (uint64_t r = 0; r < 13; ++r) g[r] = Grad(w.rank(), step, r, W);
      FillPeriodic13(grad.data(), n, g);
    }
    if (w.rank() == dies && it + 1 == b.kill_worker_at) {
      std::printf("worker %u: killing itself (SIGKILL) before iteration %u\n", w.rank(), it + 1);
      std::fflush(stdout);
      raise(SIGKILL);
    }
    if (it + 1 == b.kill_second_server_at) {
      if (Status st = KillSecondServer(w, it + 1, wait); !st.ok()) return WaitFailed(w, st);
    }
    const bool kill_now = w.rank() == 0 && it + 1 == b.kill_server_at && w.num_servers() > 1;
    if (kill_now) {
      auto pid = KillServerProcess(w, 0, stop_server ? SIGSTOP : SIGKILL);
      if (!pid.ok()) {
        std::fprintf(stderr, "shardps bench: %s\n", pid.status().ToString().c_str());
        return 1;
      }
      stopped_pid = *pid;
      std::printf("worker 0: %s server 0 (pid %d) before iteration %u\n",
                  stop_server ? "stopped" : "killed", *pid, it + 1);
      std::fflush(stdout);
    }
    auto t0 = Clock::now();
    std::vector<Handle> hs;
    for (uint32_t k = 0; k < b.tensors; ++k) {
      float* o = out.data() + static_cast<size_t>(k) * n;
      if (push && pull)
        hs.push_back(w.PushPull((*ids)[k], grad.data(), o));
      else if (push)
        hs.push_back(w.Push((*ids)[k], grad.data()));
      else
        hs.push_back(w.Pull((*ids)[k], o));
    }
    for (auto& h : hs) {
      Status st = h.Wait(wait);
      if (!st.ok()) return WaitFailed(w, st);
    }
    if (kill_now) {
      std::printf("worker 0: iteration %u completed %.0f ms after server 0 was %s\n", it + 1,
                  std::chrono::duration<double, std::milli>(Clock::now() - t0).count(),
                  stop_server ? "stopped" : "killed");
      if (stop_server) {
        kill(stopped_pid, SIGCONT);  // it comes back, replaced: fenced
        std::printf("worker 0: server 0 resumed\n");
      }
      std::fflush(stdout);
    }
    if (it >= b.warmup)
      lat_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    if (b.verify && pull && !async) check(push ? step : 0, fmt::format("at step {}", step));
  }
  // Throughput over the time spent in the operations themselves.
  double secs = 0;
  for (double us : lat_us) secs += us / 1e6;
  const WorkerStats after = w.stats();
  const double pushed_per_iter =
      static_cast<double>(after.bytes_pushed - before.bytes_pushed) / b.iters;
  const double pulled_per_iter =
      static_cast<double>(after.bytes_pulled - before.bytes_pulled) / b.iters;
  Status bs = w.Barrier("bench.end", wait);
  if (!bs.ok()) return WaitFailed(w, bs);
  if (b.verify && mismatches == 0 && (async || !pull)) {
    // Final state after everyone's pushes.
    for (uint32_t k = 0; k < b.tensors; ++k) {
      Status st = w.Pull((*ids)[k], out.data() + static_cast<size_t>(k) * n).Wait(wait);
      if (!st.ok()) return WaitFailed(w, st);
    }
    check(step, "after the last step");
  }
  // What the servers received, from every worker (node-level reduction: from every node).
  uint64_t server_push_bytes = 0;
  if (rank0 && push)
    for (uint32_t s = 0; s < w.num_servers(); ++s)
      if (auto js = w.ServerStats(s); js.ok()) {
        auto j = nlohmann::json::parse(*js, nullptr, false);
        if (!j.is_discarded()) server_push_bytes += j.value("push_bytes", uint64_t{0});
      }
  const double server_bytes_per_step =
      static_cast<double>(server_push_bytes) / (b.iters + b.warmup);
  if (rank0 && push)
    std::printf(
        "bench: the servers received %.0f bytes of pushes per step (%u workers, %u per "
        "node)\n",
        server_bytes_per_step, W, wo->local_size);
  double bytes = static_cast<double>(*size) * b.tensors * b.iters * (push && pull ? 2 : 1);
  double gbps = bytes * 8 / secs / 1e9;
  double p50 = Percentile(lat_us, 0.5), p99 = Percentile(lat_us, 0.99);
  std::printf(
      "bench: worker %u op %s size %s x %u tensors, %u iters: %.2f Gbit/s, p50 %.0f us, "
      "p99 %.0f us%s\n",
      w.rank(), b.op.c_str(), b.size.c_str(), b.tensors, b.iters, gbps, p50, p99,
      b.verify ? (mismatches ? ", VERIFY FAILED" : ", verified") : "");
  if (comp->codec != Codec::kNone || pull_codec != Codec::kNone)
    std::printf(
        "bench: worker %u compression %s (pulls %s): %.0f bytes pushed and %.0f pulled per "
        "iteration for %.0f bytes of gradients; gradients at %.2f Gbit/s decoded\n",
        w.rank(), comp->ToString().c_str(), b.pull_compression.c_str(), pushed_per_iter,
        pulled_per_iter, static_cast<double>(*size) * b.tensors,
        push ? static_cast<double>(*size) * b.tensors * b.iters * 8 / secs / 1e9 : 0.0);
  if (rank0 && !b.report.empty()) {
    uint64_t peak_rss = 0;
    for (uint32_t s = 0; s < w.num_servers(); ++s) {
      auto js = w.ServerStats(s);
      if (js.ok()) {
        auto j = nlohmann::json::parse(*js, nullptr, false);
        if (!j.is_discarded())
          peak_rss = std::max(peak_rss, j.value("peak_rss_bytes", uint64_t{0}));
      }
    }
    nlohmann::json scenario = {
        {"op", b.op},
        {"size_bytes", *size},
        {"tensors", b.tensors},
        {"iters", b.iters},
        {"workers", W},
        {"servers", w.num_servers()},
        {"transport", wo->transport},
        {"mode", ModeName(w.mode())},
        {"gbps", gbps},
        {"p50_us", p50},
        {"p99_us", p99},
        {"latencies_us", lat_us},
        {"server_peak_rss_bytes", peak_rss},
        {"server_push_bytes_per_step", server_bytes_per_step},
        {"workers_per_node", wo->local_size},
        {"ratio_to_baseline", 0.0},
        {"verified", b.verify && mismatches == 0},
        {"compression", comp->ToString()},
        {"pull_compression", b.pull_compression},
        {"encoded_bytes_pushed_per_iter", pushed_per_iter},
        {"encoded_bytes_pulled_per_iter", pulled_per_iter},
        {"gradient_gbps",
         push ? static_cast<double>(*size) * b.tensors * b.iters * 8 / secs / 1e9 : 0.0}};
    nlohmann::json baseline;
    if (!ucx_baseline.is_null()) {
      // push vs put bandwidth, pull vs get bandwidth, push_pull (bytes both ways) vs the rate
      // of one put plus one get of the same size.
      double put = ucx_baseline["ucp_put_bw_gbps"], get = ucx_baseline["ucp_get_bw_gbps"];
      double ref = push && pull ? 2.0 / (1.0 / put + 1.0 / get) : (push ? put : get);
      scenario["ratio_to_baseline"] = ref > 0 ? gbps / ref : 0;
      double budget = 2 * (ucx_baseline["ucp_put_lat_us"].get<double>() +
                           ucx_baseline["ucp_get_lat_us"].get<double>());
      scenario["latency_budget_us"] = budget;
      scenario["p50_over_latency_budget"] = budget > 0 ? p50 / budget : 0;
      baseline = ucx_baseline;
      baseline_gbps = ref;
    } else {
      scenario["ratio_to_baseline"] = baseline_gbps > 0 ? gbps / baseline_gbps : 0;
      baseline = {{"kind", "tcp_stream_two_processes"},
                  {"gbps", baseline_gbps},
                  {"runs", 3},
                  {"statistic", "best"}};
    }
    nlohmann::json report = {{"scenarios", nlohmann::json::array({scenario})},
                             {"baseline", baseline}};
    std::ofstream f(b.report);
    f << report.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "shardps bench: cannot write %s\n", b.report.c_str());
      return 1;
    }
    std::printf("bench: baseline %s %.2f Gbit/s; ratio %.2f; report in %s\n",
                baseline["kind"].get<std::string>().c_str(), baseline_gbps,
                scenario["ratio_to_baseline"].get<double>(), b.report.c_str());
  }
  Status fin = w.Finish();
  if (!fin.ok()) std::fprintf(stderr, "shardps bench: %s\n", fin.ToString().c_str());
  return mismatches ? 1 : 0;
}

}  // namespace shardps::tools
