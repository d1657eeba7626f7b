// Real processes on 127.0.0.1 through `shardps launch` and `shardps bench`, bounded in time.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "support/subprocess.h"
#include "support/tls_certs.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::CountOccurrences;
using testing::LastLines;
using testing::RunCommand;

const std::string kShardps = SHARDPS_BIN;
const std::string kTestWorker = TEST_WORKER_BIN;
const std::string kSspWorker = SSP_WORKER_BIN;

std::string TempDir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() /
           (name + "-" + std::to_string(getpid()) + "-" + std::to_string(rand()));
  std::filesystem::create_directories(d);
  return d.string();
}

TEST(Launch, SyncBenchThreeWorkersTwoServersExactFiftySteps) {
  // 5001 floats per tensor with 4 KiB chunks: sizes that are not multiples of the chunk size.
  auto r = RunCommand(
      {kShardps,      "bench", "--servers",    "2",    "--workers", "3",     "--mode",    "sync",
       "--aggregate", "sum",   "--chunk-size", "4KiB", "--size",    "20004", "--tensors", "3",
       "--iters",     "50",    "--warmup",     "0",    "--verify"},
      120s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ", verified"), 3u) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, "[worker 0] "), CountOccurrences(r.output, "[worker 0] "));
  EXPECT_GE(CountOccurrences(r.output, "[server 1] "), 1u) << r.output;
}

TEST(Launch, AsyncBenchEndsWithExactSumOfAllPushes) {
  auto r = RunCommand(
      {kShardps, "bench", "--servers", "2", "--workers", "3", "--mode", "async", "--chunk-size",
       "4KiB", "--size", "40000", "--tensors", "2", "--iters", "30", "--warmup", "0", "--verify"},
      120s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ", verified"), 3u) << r.output;
}

// Node-level reduction between real processes (docs/node-reduction.md): 2 nodes of 2 workers
// sum through shared memory; exact values in both modes, and the servers receive one push per
// node: 2 x 3 tensors x 20004 bytes per step.
// Servers on a device (docs/gpu.md) as real processes: on the twin (the GPU code path on host
// threads) the bench's pushes verify exactly, in sync and async;
// a GPU that is not there is refused at start-up with the reason.
TEST(Launch, BenchOnDeviceServersIsExact) {
  for (std::string mode : {"sync", "async"}) {
    SCOPED_TRACE(mode);
    auto r = RunCommand(
        {kShardps,      "bench", "--servers",    "2",    "--workers", "2",     "--mode",    mode,
         "--aggregate", "sum",   "--chunk-size", "4KiB", "--size",    "20004", "--tensors", "3",
         "--iters",     "20",    "--warmup",     "0",    "--device",  "twin",  "--verify"},
        120s);
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, ", verified"), 2u) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "chunks on twin"), 2u) << r.output;
  }
  auto r = RunCommand(
      {kShardps, "bench", "--servers", "1", "--workers", "1", "--iters", "2", "--device", "cuda:7"},
      60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--device cuda:7"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "server", "--coordinator", "127.0.0.1:1", "--device", "gpu"}, 30s);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("device 'gpu': expected cpu, cuda, cuda:N"), std::string::npos)
      << r.output;
}

TEST(Launch, NodeReducedBenchIsExactAndHalvesWhatTheServersReceive) {
  for (std::string mode : {"sync", "async"}) {
    SCOPED_TRACE(mode);
    auto r = RunCommand({kShardps,
                         "bench",
                         "--servers",
                         "2",
                         "--workers",
                         "4",
                         "--workers-per-node",
                         "2",
                         "--mode",
                         mode,
                         "--aggregate",
                         "sum",
                         "--chunk-size",
                         "4KiB",
                         "--size",
                         "20004",
                         "--tensors",
                         "3",
                         "--iters",
                         "30",
                         "--warmup",
                         "0",
                         "--verify"},
                        120s);
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, ", verified"), 4u) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "the servers received 120024 bytes of pushes per step"),
              1u)
        << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "4 workers reduce on 2 nodes"), 1u) << r.output;
  }
  // Workers that do not fill their nodes are refused before anything runs.
  auto r = RunCommand({kShardps, "bench", "--workers", "3", "--workers-per-node", "2"}, 30s);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--workers-per-node 2 does not divide --workers 3"), std::string::npos)
      << r.output;
}

// A worker killed while its node reduces: the job ends promptly, naming it.
TEST(Launch, WorkerKilledMidReductionFailsTheJobNamingIt) {
  auto r = RunCommand({kShardps,
                       "launch",
                       "--servers",
                       "1",
                       "--workers",
                       "4",
                       "--workers-per-node",
                       "2",
                       "--heartbeat-timeout-ms",
                       "3000",
                       "--",
                       kTestWorker,
                       "--steps",
                       "200",
                       "--die-rank",
                       "1",
                       "--die-step",
                       "5",
                       "--how",
                       "kill"},
                      60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("worker 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("signal 9"), std::string::npos) << r.output;
  EXPECT_LT(r.seconds, 30) << r.output;
}

// The same exact runs as real processes over ucx (shared memory between the processes).
TEST(LaunchUcx, SyncAndAsyncBenchVerifyOverUcx) {
  auto probe = RunCommand(
      {kShardps, "bench", "--transport", "ucx", "--size", "4KiB", "--iters", "1", "--warmup", "0"},
      60s);
  if (probe.output.find("no ucx transport") != std::string::npos)
    GTEST_SKIP() << "this build has no ucx transport";
  // Sync with the transport threads polling (the default), async with polling off.
  for (auto [mode, poll] : {std::pair<std::string, std::string>{"sync", "200"}, {"async", "0"}}) {
    auto r = RunCommand({kShardps,
                         "bench",
                         "--transport",
                         "ucx",
                         "--servers",
                         "2",
                         "--workers",
                         "3",
                         "--mode",
                         mode,
                         "--aggregate",
                         "sum",
                         "--chunk-size",
                         "4KiB",
                         "--size",
                         "20004",
                         "--tensors",
                         "2",
                         "--iters",
                         "30",
                         "--warmup",
                         "0",
                         "--verify",
                         "--busy-poll-us",
                         poll},
                        120s, {"UCX_TLS=shm,self"});
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 0) << mode << "\n" << r.output;
    EXPECT_EQ(CountOccurrences(r.output, ", verified"), 3u) << r.output;
  }
}

// `shardps bench --tensors 2 --warmup 0 --verify` with `args` (its job and what it kills): the
// two workers left at the end must have verified every value.
CommandResult RunVerifiedBench(const std::vector<std::string>& args,
                               const std::vector<std::string>& env = {}) {
  std::vector<std::string> cmd = {kShardps, "bench", "--tensors", "2", "--warmup", "0", "--verify"};
  cmd.insert(cmd.end(), args.begin(), args.end());
  auto r = RunCommand(cmd, 120s, env);
  if (r.timed_out || r.exit_code != 0)
    ADD_FAILURE() << (r.timed_out ? "timed out" : "exit status " + std::to_string(r.exit_code))
                  << "; the last lines:\n"
                  << LastLines(r.output, 60) << "\nthe whole output:\n"
                  << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ", verified"), 2u) << r.output;
  return r;
}

// A verified bench of 3 servers with replicas and 2 workers over `transport` in `mode`, `chunk`
// chunks (4 KiB ones travel in batches, 64 KiB ones through landing buffers), `iters`
// iterations, with `kills` (its --kill-... flags). ucx runs over its tcp transport: over shared
// memory a process SIGKILLed in the middle of a send leaves the receiver's queue (UCX's mm FIFO)
// with an entry that is never completed, and that process receives nothing more
// (docs/transports.md, "Peer failure").
CommandResult RunKillBench(const std::string& transport, const std::string& mode,
                           const std::string& chunk, const std::string& iters,
                           const std::vector<std::string>& kills,
                           const std::string& servers = "3") {
  std::vector<std::string> args = {"--transport",  transport, "--servers",        servers,
                                   "--workers",    "2",       "--replicas",       "1",
                                   "--mode",       mode,      "--aggregate",      "sum",
                                   "--chunk-size", chunk,     "--size",           "200000",
                                   "--iters",      iters,     "--wait-timeout-s", "40"};
  args.insert(args.end(), kills.begin(), kills.end());
  // (A request to a server is bounded by 10 s: what a failed bench asks every server, too.)
  return RunVerifiedBench(args, {"UCX_TLS=tcp,self", "SHARDPS_TIMEOUT_MS=10000"});
}

// tcp, and ucx where it is built.
std::vector<std::string> BenchTransports() {
  auto probe = RunCommand(
      {kShardps, "bench", "--transport", "ucx", "--size", "4KiB", "--iters", "1", "--warmup", "0"},
      60s);
  std::vector<std::string> transports = {"tcp"};
  if (probe.output.find("no ucx transport") == std::string::npos) transports.push_back("ucx");
  return transports;
}

// Replication (docs/fault-tolerance.md) with real processes: worker 0 SIGKILLs server 0 in the
// middle of a verified bench, in sync and async mode, over tcp and ucx (where built): the job
// goes on with the chunks' backups and ends with exact values.
TEST(Launch, KilledServerWithReplicasLosesNoPush) {
  for (const std::string& transport : BenchTransports())
    for (const std::string mode : {"sync", "async"})
      for (const std::string chunk : {"4KiB", "64KiB"}) {
        SCOPED_TRACE(transport + " " + mode + " " + chunk);
        auto r = RunKillBench(transport, mode, chunk, "30", {"--kill-server-at", "10"});
        EXPECT_NE(r.output.find("killed server 0"), std::string::npos) << r.output;
        EXPECT_NE(r.output.find("declared dead; shard map epoch 1"), std::string::npos) << r.output;
        EXPECT_NE(r.output.find("the job goes on with its chunks' backups"), std::string::npos)
            << r.output;
        EXPECT_NE(r.output.find("completed"), std::string::npos) << r.output;
      }
}

// Two servers SIGKILLed one after the other (docs/fault-tolerance.md, "New backups"): after the
// first death the survivors make new backups of the chunks left with one copy; the workers meet,
// wait until each of their chunks has a backup they are attached to, and worker 0 kills server 1.
// Both
// workers verify every value; the last server serves every chunk.
TEST(Launch, TwoServersKilledOneAfterTheOtherLoseNoPush) {
  for (const std::string& transport : BenchTransports())
    for (const std::string mode : {"sync", "async"})
      for (const std::string chunk : {"4KiB", "64KiB"}) {
        SCOPED_TRACE(transport + " " + mode + " " + chunk);
        auto r = RunKillBench(transport, mode, chunk, "24",
                              {"--kill-server-at", "5", "--kill-second-server-at", "14"});
        EXPECT_NE(r.output.find("declared dead; shard map epoch 1"), std::string::npos) << r.output;
        EXPECT_NE(r.output.find("every chunk has a backup again (epoch 1)"), std::string::npos)
            << r.output;
        EXPECT_NE(r.output.find("killed server 1"), std::string::npos) << r.output;
        EXPECT_NE(r.output.find("declared dead; shard map epoch 2"), std::string::npos) << r.output;
      }
}

// A new server in a dead one's place (docs/fault-tolerance.md, "A server that joins"): of 2
// servers, worker 0 SIGKILLs server 0; the launcher starts a new server process
// (--restart-servers 1), which joins the running job and becomes the backup of every chunk left
// with one copy; then server 1 is killed too, and the job ends on the new server alone. Both
// workers verify every value.
TEST(Launch, ANewServerTakesADeadOnesPlaceAndTheNextDeathIsSurvived) {
  for (const std::string& transport : BenchTransports())
    for (const std::string mode : {"sync", "async"}) {
      SCOPED_TRACE(transport + " " + mode);
      auto r = RunKillBench(
          transport, mode, "64KiB", "24",
          {"--restart-servers", "1", "--kill-server-at", "5", "--kill-second-server-at", "14"},
          "2");
      EXPECT_NE(r.output.find("a new server joins it in its place"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("server 2 (node"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("joined the job; 2 live servers now"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("killed server 1"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("declared dead; shard map epoch 2"), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("server 2: server 1 was declared dead"), std::string::npos)
          << r.output;
    }
}

// --restart-servers is refused where a new server could not join.
TEST(Launch, RestartServersNeedsBackups) {
  auto r = RunCommand({kShardps, "bench", "--servers", "2", "--replicas", "0", "--restart-servers",
                       "1", "--iters", "1", "--size", "4KiB"},
                      60s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--restart-servers needs --replicas 1"), std::string::npos) << r.output;
}

// A server paused (SIGSTOP, a hung host) past the heartbeat timeout is replaced; resumed after
// the job went on without it, it is fenced (its chunks' backups serve them and refuse what it
// forwards) and ends; the parameters stay single-valued: exact.
TEST(Launch, AServerPausedPastTheTimeoutIsReplacedAndFenced) {
  for (const std::string mode : {"sync", "async"}) {
    SCOPED_TRACE(mode);
    auto r = RunVerifiedBench({"--servers",
                               "3",
                               "--workers",
                               "2",
                               "--replicas",
                               "1",
                               "--mode",
                               mode,
                               "--aggregate",
                               "sum",
                               "--chunk-size",
                               "4KiB",
                               "--size",
                               "40000",
                               "--iters",
                               "30",
                               "--kill-server-at",
                               "10",
                               "--kill-server-how",
                               "stop",
                               "--heartbeat-interval-ms",
                               "200",
                               "--failover-timeout-ms",
                               "1000"});
    EXPECT_NE(r.output.find("sent no heartbeat"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("server 0 resumed"), std::string::npos) << r.output;
  }
}

// --on-worker-loss continue with real processes: the last of 3 workers SIGKILLs itself before
// iteration 8; the coordinator removes it and the two others go on. Every value they pull is
// exact: its pushes until it died, and in sync mode each step's mean over its contributors
// (3, then 2). ssp:1 as well.
TEST(Launch, AKilledWorkerIsRemovedAndTheOthersVerify) {
  for (const std::string mode : {"sync", "async", "ssp:1"}) {
    SCOPED_TRACE(mode);
    auto r = RunVerifiedBench({"--servers", "2", "--workers", "3", "--mode", mode, "--aggregate",
                               mode == "sync" ? "mean" : "sum", "--chunk-size", "4KiB", "--size",
                               "40000", "--iters", "20", "--on-worker-loss", "continue",
                               "--kill-worker-at", "8"});
    EXPECT_NE(r.output.find("worker 2: killing itself"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("removed from the job"), std::string::npos) << r.output;
  }
}

// bench refuses --restart-workers, pointing at train.
TEST(Launch, BenchRefusesRestartWorkers) {
  auto r = RunCommand({kShardps, "bench", "--workers", "2", "--on-worker-loss", "continue",
                       "--restart-workers", "1", "--size", "4KiB"},
                      60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--restart-workers is not for bench"), std::string::npos) << r.output;
}

// --kill-worker-at says what it needs.
TEST(Launch, KillWorkerAtNeedsOnWorkerLossContinue) {
  auto r = RunCommand(
      {kShardps, "bench", "--workers", "2", "--kill-worker-at", "3", "--size", "4KiB"}, 60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--kill-worker-at needs --workers 2 or more and --on-worker-loss"),
            std::string::npos)
      << r.output;
}

// Without replicas a killed server still ends the job, naming it; --kill-server-at says what it
// needs.
TEST(Launch, KillServerAtNeedsReplicas) {
  auto r = RunCommand({kShardps, "bench", "--servers", "2", "--replicas", "0", "--workers", "1",
                       "--kill-server-at", "3", "--size", "4KiB"},
                      60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--kill-server-at needs --servers 2 or more and --replicas 1"),
            std::string::npos)
      << r.output;
}

TEST(Launch, PushOnlyAndPullOnlyVerify) {
  for (std::string op : {"push", "pull"}) {
    auto r = RunCommand({kShardps, "bench", "--servers", "1", "--workers", "2", "--op", op,
                         "--size", "64KiB", "--iters", "5", "--verify", "--aggregate", "sum"},
                        60s);
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 0) << op << "\n" << r.output;
    EXPECT_EQ(CountOccurrences(r.output, ", verified"), 2u) << r.output;
  }
}

TEST(Launch, BenchReportHasTheDocumentedFields) {
  std::string dir = TempDir("report");
  auto r = RunCommand(
      {kShardps, "bench", "--size", "1MiB", "--iters", "3", "--report", dir + "/r.json"}, 60s);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream f(dir + "/r.json");
  std::string json((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  for (const char* key :
       {"\"op\"", "\"size_bytes\"", "\"workers\"", "\"servers\"", "\"transport\"", "\"gbps\"",
        "\"p50_us\"", "\"p99_us\"", "\"baseline\"", "\"ratio_to_baseline\""})
    EXPECT_NE(json.find(key), std::string::npos) << key << " missing in " << json;
  std::filesystem::remove_all(dir);
}

// The quick suite as a user runs it: every scenario of its list ran its repeats and carries a
// positive median, spread and ratio to a same-run baseline; the report names every baseline;
// the three plots are PNG files. The figures themselves are a benchmark's, not checked here.
TEST(Bench, QuickSuiteReportsEveryScenarioAgainstABaselineAndDrawsThePlots) {
  std::string dir = TempDir("suite");
  auto r = RunCommand({kShardps, "--log-level", "warn", "bench", "--suite", "quick", "--report",
                       dir + "/suite.json", "--plot-dir", dir + "/plots"},
                      540s);  // about 90 s alone; ctest's limit for launch_test is 600 s
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream f(dir + "/suite.json");
  auto j = nlohmann::json::parse(f, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_EQ(j["suite"], "quick");
  std::set<std::string> groups;
  for (const auto& s : j["scenarios"]) {
    SCOPED_TRACE(s["label"].get<std::string>());
    groups.insert(s["group"].get<std::string>());
    EXPECT_EQ(s["values"].size(), 5u);
    EXPECT_GT(s["median"].get<double>(), 0);
    EXPECT_GE(s["spread"].get<double>(), 0);
    EXPECT_GT(s["baseline_value"].get<double>(), 0);
    EXPECT_GT(s["ratio_to_baseline"].get<double>(), 0);
    EXPECT_EQ(s["too_noisy"].get<bool>(), s["spread"].get<double>() > 0.25);
    EXPECT_NE(r.output.find(s["label"].get<std::string>()), std::string::npos);
  }
  for (const char* g : {"single", "scaling", "codecs", "small"}) EXPECT_TRUE(groups.count(g)) << g;
  EXPECT_GE(j["scenarios"].size(), 17u);
  EXPECT_FALSE(j["baselines"].empty());
  for (const char* png : {"throughput.png", "latency.png", "scaling.png"}) {
    std::ifstream p(dir + "/plots/" + png, std::ios::binary);
    char magic[4] = {};
    p.read(magic, 4);
    EXPECT_EQ(std::string(magic + 1, 3), "PNG") << png;
  }
  std::filesystem::remove_all(dir);
}

TEST(Bench, SuiteFlagsAreCheckedBeforeAnythingRuns) {
  auto r = RunCommand({kShardps, "bench", "--suite", "quik"}, 30s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("quik"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "bench", "--plot-dir", "/tmp/x"}, 30s);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("--suite"), std::string::npos) << r.output;
}

TEST(Launch, WorkerKilledMidJobFailsTheJobNamingIt) {
  auto r = RunCommand(
      {kShardps, "launch", "--servers", "1", "--workers", "3", "--heartbeat-timeout-ms", "3000",
       "--", kTestWorker, "--steps", "200", "--die-rank", "1", "--die-step", "5", "--how", "kill"},
      60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("worker 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("signal 9"), std::string::npos) << r.output;
  EXPECT_LT(r.seconds, 30) << r.output;
}

// A worker that hangs (stopped, its sockets open) is found by the heartbeat timeout.
TEST(Launch, SilentWorkerIsDetectedByHeartbeatTimeout) {
  auto r = RunCommand({kShardps,
                       "launch",
                       "--servers",
                       "1",
                       "--workers",
                       "2",
                       "--heartbeat-interval-ms",
                       "200",
                       "--heartbeat-timeout-ms",
                       "2000",
                       "--",
                       kTestWorker,
                       "--steps",
                       "500",
                       "--die-rank",
                       "0",
                       "--die-step",
                       "3",
                       "--how",
                       "stop"},
                      60s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("worker 0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("sent no heartbeat"), std::string::npos) << r.output;
  EXPECT_LT(r.seconds, 30) << r.output;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ssp:2 with 3 workers: worker 2 stops itself (SIGSTOP) after step 5. The others run ahead
// and must stop at exactly clock 5 + 2 + 1 = 8 (their step 9 waits for worker 2's step 6);
// every worker checks on every step, exactly, that no clock it sees is below its own - K - 1
// and that the version is the sum of the clocks (tests/integration/ssp_worker.cc). Resumed,
// worker 2 lets the others go on and the job completes.
TEST(Launch, SspBoundHoldsWhileAWorkerIsPaused) {
  std::string dir = TempDir("ssp");
  CommandResult r;
  std::thread job([&] {
    r = RunCommand({kShardps,
                    "launch",
                    "--servers",
                    "1",
                    "--workers",
                    "3",
                    "--mode",
                    "ssp:2",
                    "--heartbeat-timeout-ms",
                    "60000",
                    "--",
                    kSspWorker,
                    "--k",
                    "2",
                    "--steps",
                    "30",
                    "--pause-rank",
                    "2",
                    "--pause-step",
                    "5",
                    "--dir",
                    dir},
                   120s);
  });
  // Paused, and both others waiting with the same clock for 1.5 s: they are held by the bound.
  auto deadline = std::chrono::steady_clock::now() + 90s;
  std::string paused, w0, w1;
  auto stable_since = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(100ms);
    std::string p = ReadFile(dir + "/paused"), a = ReadFile(dir + "/waiting-0"),
                b = ReadFile(dir + "/waiting-1");
    if (p.empty() || a.empty() || b.empty() || a != w0 || b != w1) {
      paused = p;
      w0 = a;
      w1 = b;
      stable_since = std::chrono::steady_clock::now();
      continue;
    }
    if (std::chrono::steady_clock::now() - stable_since > 1500ms) break;
  }
  pid_t pid = 0;
  int clock = 0;
  std::istringstream(paused) >> pid >> clock;
  std::ofstream(dir + "/resumed") << "1\n";
  if (pid > 0) kill(pid, SIGCONT);
  job.join();
  ASSERT_GT(pid, 0) << "worker 2 never paused: " << r.output;
  EXPECT_EQ(clock, 5);
  EXPECT_EQ(w0, "8\n") << r.output;
  EXPECT_EQ(w1, "8\n") << r.output;
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("worker 2: paused at clock 5"), std::string::npos) << r.output;
  // The fast workers led by exactly K when they were held; nobody ever by more.
  EXPECT_NE(r.output.find("worker 0: done, max lead 2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("worker 1: done, max lead 2"), std::string::npos) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": done, max lead"), 3u) << r.output;
  std::filesystem::remove_all(dir);
}

TEST(Launch, InterruptLeavesNoProcessBehind) {
  std::string dir = TempDir("pids");
  pid_t launcher = -1;
  std::thread interrupter;
  auto r = RunCommand({kShardps, "launch", "--servers", "2", "--workers", "2", "--", kTestWorker,
                       "--steps", "100000", "--pid-dir", dir},
                      60s, {}, [&](pid_t pid) {
                        launcher = pid;
                        interrupter = std::thread([pid, dir] {
                          // Wait until both workers run, then Ctrl-C the launcher.
                          for (int i = 0; i < 200; ++i) {
                            if (std::filesystem::exists(dir + "/worker-0.pid") &&
                                std::filesystem::exists(dir + "/worker-1.pid"))
                              break;
                            std::this_thread::sleep_for(50ms);
                          }
                          std::this_thread::sleep_for(300ms);
                          kill(pid, SIGINT);
                        });
                      });
  interrupter.join();
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 128 + SIGINT) << r.output;
  std::this_thread::sleep_for(200ms);
  for (int rank = 0; rank < 2; ++rank) {
    std::ifstream f(dir + "/worker-" + std::to_string(rank) + ".pid");
    pid_t pid = 0;
    ASSERT_TRUE(f >> pid) << "worker " << rank << " never started\n" << r.output;
    EXPECT_NE(kill(pid, 0), 0) << "worker " << rank << " (pid " << pid << ") is still running";
  }
  std::filesystem::remove_all(dir);
}

// What this machine has, in text and JSON; it exits 0 whatever it finds.
TEST(Doctor, ReportsThisMachineInTextAndJson) {
  auto r = RunCommand({kShardps, "doctor"}, 60s);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("RDMA devices:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("Locked memory:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("data path:"), std::string::npos) << r.output;
  auto j = RunCommand({kShardps, "doctor", "--json", "--shard-size", "1GiB"}, 60s);
  EXPECT_EQ(j.exit_code, 0) << j.output;
  auto parsed = nlohmann::json::parse(j.output, nullptr, false);
  ASSERT_FALSE(parsed.is_discarded()) << j.output;
  EXPECT_EQ(parsed["shard_bytes"], 1ull << 30);
  EXPECT_TRUE(parsed["findings"].is_array());
}

// A job whose processes share a cluster secret (--secret, or SHARDPS_SECRET_FILE): every
// role says it uses it, none warns that it has none, and the values are exact. A secret file
// that is too short or missing stops the job before it starts, naming the file.
TEST(Launch, ASecretFileGuardsEveryConnectionOfTheJob) {
  auto dir = TempDir("secret");
  const std::string file = dir + "/job.secret";
  {
    std::ofstream f(file);
    f << "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n";
  }
  std::filesystem::permissions(
      file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  for (bool by_variable : {false, true}) {
    std::vector<std::string> argv = {kShardps,   "bench",  "--servers", "2",       "--workers",
                                     "2",        "--size", "20000",     "--iters", "10",
                                     "--warmup", "0",      "--verify"};
    std::vector<std::string> env;
    if (by_variable)
      env.push_back("SHARDPS_SECRET_FILE=" + file);
    else
      argv.insert(argv.end(), {"--secret", file});
    auto r = RunCommand(argv, 120s, env);
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, ", verified"), 2u) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "coordinator: connections prove the cluster secret"), 1u)
        << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "server: connections prove the cluster secret"), 2u)
        << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "worker: connections prove the cluster secret"), 2u)
        << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "no cluster secret"), 0u) << r.output;
    EXPECT_EQ(CountOccurrences(r.output, "refused the connection"), 0u) << r.output;
  }
  {
    std::ofstream f(dir + "/short.secret");
    f << "hunter2";
  }
  auto r = RunCommand({kShardps, "launch", "--secret", dir + "/short.secret", "--", "true"}, 30s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("short.secret' holds 7 bytes"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "launch", "--secret", dir + "/missing", "--", "true"}, 30s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("cannot read the secret file"), std::string::npos) << r.output;
  // Metrics on free ports: every role says where.
  r = RunCommand(
      {kShardps, "bench", "--servers", "2", "--workers", "2", "--size", "1000", "--iters", "2",
       "--warmup", "0", "--verify", "--metrics-listen", "127.0.0.1:0", "--secret", file},
      60s);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": Prometheus metrics on http://127.0.0.1:"), 5u)
      << r.output;
  // Without a secret, each role warns once at start-up.
  r = RunCommand({kShardps, "bench", "--servers", "1", "--workers", "1", "--size", "1000",
                  "--iters", "2", "--warmup", "0", "--verify"},
                 60s);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, "no cluster secret (--secret FILE)"), 3u) << r.output;
  std::filesystem::remove_all(dir);
}

// --timeline: every worker's operations and waits and every server's applies, in one Chrome
// trace merged by the launcher; exact numbers of spans.
TEST(Launch, TimelineHoldsEverySpanOfTheJobInOneTrace) {
  auto dir = TempDir("timeline");
  const std::string file = dir + "/job.json";
  // 300,000 floats in 64 KiB chunks: 19 chunks over 2 servers, each chunk on both (a primary
  // and its backup: --replicas 1, the default).
  auto r = RunCommand({kShardps, "bench", "--servers", "2", "--workers", "2", "--replicas", "1",
                       "--size", "1200000", "--chunk-size", "64KiB", "--iters", "20", "--warmup",
                       "0", "--verify", "--timeline", file},
                      120s);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ", verified"), 2u) << r.output;
  std::ifstream in(file);
  ASSERT_TRUE(in) << r.output;
  auto j = nlohmann::json::parse(in);
  std::map<std::string, int> spans;
  std::set<int> pids;
  for (auto& e : j["traceEvents"])
    if (e["ph"] == "X") {
      spans[e["cat"].get<std::string>() + "/" + e["name"].get<std::string>()]++;
      pids.insert(e["pid"].get<int>());
    }
  EXPECT_EQ(spans["worker/push_pull"], 2 * 20);
  EXPECT_EQ(spans["worker/wait"], 2 * 20);
  // Every chunk push of every worker is applied once by the chunk's primary, each step's last
  // completing the update; its backup applies each step's sum once (sync with two workers: the
  // primary forwards steps, not pushes).
  EXPECT_EQ(spans["server/apply"] + spans["server/apply+publish"], 2 * 20 * 19 + 20 * 19);
  EXPECT_EQ(spans["server/apply+publish"], 2 * 20 * 19);
  EXPECT_EQ(pids.size(), 4u);  // 2 servers, 2 workers
  EXPECT_EQ(j["otherData"]["dropped_spans"], 0);
  // The parts are gone.
  size_t files = 0;
  for (auto& f : std::filesystem::directory_iterator(dir)) files += f.is_regular_file();
  EXPECT_EQ(files, 1u);
  std::filesystem::remove_all(dir);
}

// --tls-cert/--tls-key/--tls-ca on real processes: every role says it uses TLS, the values are
// exact; a key that is not the certificate's stops the job at start-up, naming the file.
TEST(Launch, AJobOverTlsOfRealProcesses) {
  auto certs = testing::TestCerts::Make();
  ASSERT_TRUE(certs.ok) << certs.error;
  auto r = RunCommand(
      {kShardps,   "bench",        "--servers", "2",         "--workers", "2",        "--size",
       "300000",   "--chunk-size", "256KiB",    "--iters",   "20",        "--warmup", "0",
       "--verify", "--tls-cert",   certs.cert,  "--tls-key", certs.key,   "--tls-ca", certs.ca},
      120s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ", verified"), 2u) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": tcp connections use TLS 1.3"), 5u) << r.output;
  r = RunCommand({kShardps, "launch", "--tls-cert", certs.cert, "--tls-key", certs.other_key,
                  "--tls-ca", certs.ca, "--", "true"},
                 30s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("other.key"), std::string::npos) << r.output;
  certs.Remove();
}

TEST(Launch, BadFlagsGetAClearErrorAndNonZeroExit) {
  auto r = RunCommand({kShardps, "launch", "--mode", "bogus", "--", "true"}, 20s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--mode"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "bench", "--size", "12XB"}, 20s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("12XB"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "launch", "--chunk-size", "3", "--", "true"}, 20s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("chunk size"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "launch", "--busy-poll-us", "-5", "--", "true"}, 20s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--busy-poll-us"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "nonsense"}, 20s);
  EXPECT_NE(r.exit_code, 0);
}

TEST(Launch, ConfigFileTypoIsAnErrorAndFlagsOverrideEnvOverrideFile) {
  std::string dir = TempDir("cfg");
  std::ofstream(dir + "/bad.toml") << "[launch]\nworkrs = 3\n";
  auto r = RunCommand({kShardps, "--config", dir + "/bad.toml", "launch", "--", "true"}, 20s);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("workrs"), std::string::npos) << r.output;
  // File says 3 workers, the environment says 2: the environment wins over the file.
  std::ofstream(dir + "/good.toml") << "[launch]\nworkers = 3\n";
  // (`true` never joins the job, so the launch itself ends with an error; the printed
  // configuration is what is checked here.)
  r = RunCommand({kShardps, "--config", dir + "/good.toml", "launch", "--", "true"}, 30s,
                 {"SHARDPS_NUM_WORKERS=2"});
  EXPECT_NE(r.output.find("did each worker connect"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("workers=2"), std::string::npos) << r.output;
  // ... and the flag wins over both.
  r = RunCommand(
      {kShardps, "--config", dir + "/good.toml", "launch", "--workers", "1", "--", "true"}, 30s,
      {"SHARDPS_NUM_WORKERS=2"});
  EXPECT_NE(r.output.find("workers=1"), std::string::npos) << r.output;
  std::filesystem::remove_all(dir);
}

// A free TCP port on 127.0.0.1 (bound and released: another process may take it meanwhile,
// which the job would then report as a failure to listen, not hang on).
int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// Runs `tasks` copies of `shardps run ARGS -- test_worker --steps 20` at once, task i with the
// launcher variables env(i) (as srun, mpirun, torchrun or a DMLC script would set them), and
// returns their results in task order.
std::vector<CommandResult> RunTasks(int tasks, const std::vector<std::string>& args,
                                    const std::function<std::vector<std::string>(int)>& env) {
  std::vector<CommandResult> out(tasks);
  std::vector<std::thread> ts;
  for (int i = 0; i < tasks; ++i) {
    ts.emplace_back([&, i] {
      std::vector<std::string> argv = {kShardps, "run"};
      argv.insert(argv.end(), args.begin(), args.end());
      for (const char* a : {"--", "", "--steps", "20"}) argv.emplace_back(a);
      argv[argv.size() - 3] = kTestWorker;
      std::vector<std::string> e = env(i);
      e.push_back("SHARDPS_SERVER_LISTEN=127.0.0.1:0");
      out[i] = RunCommand(argv, 90s, e);
    });
  }
  for (auto& t : ts) t.join();
  return out;
}

void ExpectJobDone(const std::vector<CommandResult>& r, int workers) {
  std::string all;
  for (const auto& x : r) {
    EXPECT_FALSE(x.timed_out) << x.output;
    EXPECT_EQ(x.exit_code, 0) << x.output;
    all += x.output;
  }
  EXPECT_EQ(CountOccurrences(all, ": done"), static_cast<size_t>(workers)) << all;
}

// torchrun's variables: 4 tasks, 1 server (task 0 also runs the coordinator), 3 workers with
// exact values (test_worker checks every pulled value).
TEST(Run, TorchrunTasksTakeTheirRolesFromTheirRanks) {
  const int port = FreePort();
  auto r = RunTasks(4, {"--servers", "1", "--port", std::to_string(port)}, [](int i) {
    return std::vector<std::string>{"RANK=" + std::to_string(i), "WORLD_SIZE=4",
                                    "LOCAL_RANK=" + std::to_string(i), "MASTER_ADDR=127.0.0.1"};
  });
  ExpectJobDone(r, 3);
  EXPECT_NE(r[0].output.find("torchrun: rank 0 of 4"), std::string::npos) << r[0].output;
  EXPECT_NE(r[0].output.find("the coordinator and server 0"), std::string::npos) << r[0].output;
}

// Slurm's variables (the coordinator on the first host of the node list) with 2 servers, and
// Open MPI's, which do not name a host: --coordinator does.
TEST(Run, SlurmAndOpenMpiTasksFormAJob) {
  int port = FreePort();
  auto s = RunTasks(5, {"--servers", "2", "--port", std::to_string(port)}, [](int i) {
    return std::vector<std::string>{"SLURM_PROCID=" + std::to_string(i), "SLURM_NTASKS=5",
                                    "SLURM_LOCALID=" + std::to_string(i),
                                    "SLURM_JOB_NODELIST=127.0.0.1"};
  });
  ExpectJobDone(s, 3);
  port = FreePort();
  auto m = RunTasks(3, {"--servers", "1", "--coordinator", "127.0.0.1:" + std::to_string(port)},
                    [](int i) {
                      return std::vector<std::string>{"OMPI_COMM_WORLD_RANK=" + std::to_string(i),
                                                      "OMPI_COMM_WORLD_SIZE=3"};
                    });
  ExpectJobDone(m, 2);
}

// A ps-lite/BytePS launch: DMLC_ROLE names each task's role (scheduler, server, worker) and
// the coordinator picks the ranks.
TEST(Run, DmlcVariablesOfABytepsLaunchStartAJob) {
  const int port = FreePort();
  const char* roles[] = {"scheduler", "server", "worker", "worker"};
  auto r = RunTasks(4, {}, [&](int i) {
    return std::vector<std::string>{std::string("DMLC_ROLE=") + roles[i], "DMLC_NUM_SERVER=1",
                                    "DMLC_NUM_WORKER=2", "DMLC_PS_ROOT_URI=127.0.0.1",
                                    "DMLC_PS_ROOT_PORT=" + std::to_string(port)};
  });
  ExpectJobDone(r, 2);
}

// The coordinator stopped (SIGSTOP, as a hung host would be) in the middle of a job: the server
// and both workers notice within the heartbeat timeout and end, each naming the coordinator,
// instead of waiting on it (issue 12). The coordinator runs as its own task (DMLC's scheduler).
TEST(Run, ASilentCoordinatorIsNamedByEveryNode) {
  const int port = FreePort();
  const std::string ready = ::testing::TempDir() + "silent-coordinator-" + std::to_string(getpid());
  std::filesystem::create_directories(ready);
  const char* roles[] = {"scheduler", "server", "worker", "worker"};
  std::atomic<pid_t> scheduler{0};
  std::vector<CommandResult> out(4);
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i)
    ts.emplace_back([&, i] {
      std::vector<std::string> argv = {kShardps,
                                       "run",
                                       "--heartbeat-interval-ms",
                                       "200",
                                       "--heartbeat-timeout-ms",
                                       "2000",
                                       "--",
                                       kTestWorker,
                                       "--steps",
                                       "100000000",
                                       "--ready-dir",
                                       ready};
      std::vector<std::string> env = {std::string("DMLC_ROLE=") + roles[i],
                                      "DMLC_NUM_SERVER=1",
                                      "DMLC_NUM_WORKER=2",
                                      "DMLC_PS_ROOT_URI=127.0.0.1",
                                      "DMLC_PS_ROOT_PORT=" + std::to_string(port),
                                      "SHARDPS_SERVER_LISTEN=127.0.0.1:0"};
      out[i] = RunCommand(argv, 90s, env, [&, i](pid_t p) {
        if (i == 0) scheduler = p;
      });
    });
  // Both workers declared their tensor (the job runs), then the coordinator stops.
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!(std::filesystem::exists(ready + "/worker-0.ready") &&
           std::filesystem::exists(ready + "/worker-1.ready")) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  ASSERT_NE(scheduler.load(), 0);
  kill(scheduler.load(), SIGSTOP);
  const auto stopped = std::chrono::steady_clock::now();
  for (int i = 1; i < 4; ++i) ts[i].join();
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - stopped).count();
  kill(scheduler.load(), SIGKILL);
  ts[0].join();
  std::filesystem::remove_all(ready);
  const std::string named =
      "the coordinator at 127.0.0.1:" + std::to_string(port) + " has not answered heartbeats";
  for (int i = 1; i < 4; ++i) {
    SCOPED_TRACE(roles[i]);
    EXPECT_FALSE(out[i].timed_out) << out[i].output;
    EXPECT_NE(out[i].exit_code, 0) << out[i].output;
    EXPECT_NE(out[i].output.find(named), std::string::npos) << out[i].output;
  }
  // Noticed after the 2 s timeout, not after the 90 s bound of the commands.
  EXPECT_LT(took, 30) << "the nodes took " << took << " s to end";
}

// The real Open MPI launcher (Debian's openmpi-bin, installed by scripts/setup.sh): mpirun
// starts 4 tasks of `shardps run` on this machine, which form a job of 1 server and 3 workers
// with exact values.
TEST(Run, RealMpirunStartsAJob) {
  if (RunCommand({"sh", "-c", "command -v mpirun"}, 10s).exit_code != 0)
    GTEST_SKIP() << "mpirun is not installed (apt-get install openmpi-bin)";
  const int port = FreePort();
  auto r = RunCommand({"mpirun",
                       "--oversubscribe",
                       "-n",
                       "4",
                       "--mca",
                       "oob_tcp_if_include",
                       "lo",
                       "--mca",
                       "btl",
                       "self,tcp",
                       "--mca",
                       "btl_tcp_if_include",
                       "lo",
                       "-x",
                       "SHARDPS_SERVER_LISTEN",
                       kShardps,
                       "--log-level",
                       "warn",
                       "run",
                       "--servers",
                       "1",
                       "--coordinator",
                       "127.0.0.1:" + std::to_string(port),
                       "--",
                       kTestWorker,
                       "--steps",
                       "20"},
                      120s,
                      {"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
                       "SHARDPS_SERVER_LISTEN=127.0.0.1:0"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": done"), 3u) << r.output;
}

// The real torchrun (Debian's python3-torch, from setup.sh) starting 4 tasks of `shardps run
// --servers 1 [run_flags]` (--no_python), whose workers run test_worker for 20 steps. torchrun
// 1.13 under Python 3.11 cannot parse its default --redirects/--tee of 0 (Std.NONE is not
// iterated), so this passes 1 for both with a log folder: what a user of this torchrun has to
// do too.
bool HaveTorchrun() { return RunCommand({"sh", "-c", "command -v torchrun"}, 10s).exit_code == 0; }

testing::CommandResult RunUnderTorchrun(const std::vector<std::string>& run_flags) {
  auto logs = TempDir("torchrun");
  const int rdzv = FreePort(), port = FreePort();
  std::vector<std::string> argv = {"torchrun",
                                   "--nnodes",
                                   "1",
                                   "--nproc_per_node",
                                   "4",
                                   "--rdzv_backend",
                                   "c10d",
                                   "--rdzv_endpoint",
                                   "127.0.0.1:" + std::to_string(rdzv),
                                   "--redirects",
                                   "1",
                                   "--tee",
                                   "1",
                                   "--log_dir",
                                   logs,
                                   "--no_python",
                                   kShardps,
                                   "--log-level",
                                   "info",
                                   "run",
                                   "--servers",
                                   "1",
                                   "--coordinator",
                                   "127.0.0.1:" + std::to_string(port)};
  argv.insert(argv.end(), run_flags.begin(), run_flags.end());
  for (const char* a : {"--", kTestWorker.c_str(), "--steps", "20"}) argv.push_back(a);
  auto r = RunCommand(argv, 120s, {"SHARDPS_SERVER_LISTEN=127.0.0.1:0"});
  std::filesystem::remove_all(logs);
  return r;
}

// 1 server and 3 workers whose values are exact.
TEST(Run, RealTorchrunStartsAJob) {
  if (!HaveTorchrun()) GTEST_SKIP() << "torchrun is not installed (apt-get install python3-torch)";
  auto r = RunUnderTorchrun({});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": done"), 3u) << r.output;
}

// Node-level reduction under torchrun: task 0 is the server, so the 3 worker tasks of the host
// are local ranks 0..2 of its node (not torchrun's 1..3), and they reduce before they push.
TEST(Run, TorchrunWorkersReduceOnTheirNode) {
  if (!HaveTorchrun()) GTEST_SKIP() << "torchrun is not installed (apt-get install python3-torch)";
  auto r = RunUnderTorchrun({"--workers-per-node", "3"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": done"), 3u) << r.output;
  EXPECT_GE(CountOccurrences(r.output, "3 workers reduce on 1 nodes"), 1u) << r.output;
  for (int k = 0; k < 3; ++k)
    EXPECT_GE(CountOccurrences(r.output, "local rank " + std::to_string(k) + " of the 3 workers"),
              1u)
        << r.output;
}

// A single-node Slurm cluster of this machine's own (Debian's slurmctld, slurmd and munge,
// installed by scripts/setup.sh), started for this test on free loopback ports with its state
// in a temporary folder, and stopped at the end whatever happens.
class SlurmCluster {
 public:
  static std::string Missing() {
    for (const char* tool : {"munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo"})
      if (RunCommand({"sh", "-c", std::string("command -v ") + tool}, 10s).exit_code != 0)
        return tool;
    return "";
  }

  SlurmCluster() : dir_(TempDir("slurm")) {
    for (const char* d : {"/state", "/spool", "/munge"})
      std::filesystem::create_directories(dir_ + d);
    conf_ = dir_ + "/slurm.conf";
    std::ofstream(conf_) << "ClusterName=shardps\nSlurmctldHost=localhost(127.0.0.1)\n"
                         << "SlurmctldPort=" << FreePort() << "\nSlurmdPort=" << FreePort()
                         << "\nAuthType=auth/munge\nCredType=cred/munge\n"
                         << "AuthInfo=socket=" << dir_ << "/munge/socket\n"
                         << "SlurmUser=root\nSlurmdUser=root\nProctrackType=proctrack/linuxproc\n"
                         << "TaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
                         << "MpiDefault=none\nSchedulerType=sched/builtin\n"
                         << "SelectType=select/linear\nSlurmdParameters=config_overrides\n"
                         << "ReturnToService=2\nStateSaveLocation=" << dir_ << "/state\n"
                         << "SlurmdSpoolDir=" << dir_ << "/spool\n"
                         << "SlurmctldPidFile=" << dir_ << "/slurmctld.pid\n"
                         << "SlurmdPidFile=" << dir_ << "/slurmd.pid\n"
                         << "SlurmctldLogFile=" << dir_ << "/slurmctld.log\n"
                         << "SlurmdLogFile=" << dir_ << "/slurmd.log\n"
                         << "NodeName=localhost NodeAddr=127.0.0.1 CPUs=16 State=UNKNOWN\n"
                         << "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE "
                            "State=UP OverSubscribe=YES\n";
    env_ = {"SLURM_CONF=" + conf_};
    Start({"munged", "--force", "--socket=" + dir_ + "/munge/socket",
           "--pid-file=" + dir_ + "/munged.pid", "--log-file=" + dir_ + "/munged.log",
           "--seed-file=" + dir_ + "/munge/seed"});
    Start({"slurmctld", "-f", conf_});
    Start({"slurmd", "-f", conf_});
    auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline) {
      auto r = RunCommand({"sinfo", "-h", "-o", "%t"}, 10s, env_);
      if (r.exit_code == 0 && r.output.find("idle") != std::string::npos) {
        ready_ = true;
        break;
      }
      std::this_thread::sleep_for(200ms);
    }
  }
  ~SlurmCluster() {
    for (const char* d : {"slurmd", "slurmctld", "munged"}) {
      pid_t pid = 0;
      std::ifstream(dir_ + "/" + d + ".pid") >> pid;
      if (pid > 0) kill(pid, SIGTERM);
    }
    std::this_thread::sleep_for(500ms);
    std::filesystem::remove_all(dir_);
  }
  bool ready() const { return ready_; }
  std::string Logs() const {
    return ReadFile(dir_ + "/slurmctld.log") + ReadFile(dir_ + "/slurmd.log") +
           ReadFile(dir_ + "/munged.log");
  }
  CommandResult Run(std::vector<std::string> argv) const {
    auto env = env_;
    env.push_back("SHARDPS_SERVER_LISTEN=127.0.0.1:0");
    return RunCommand(argv, 120s, env);
  }
  const std::string& dir() const { return dir_; }

 private:
  // Each daemonizes; its output goes to its log file, not to the pipe RunCommand reads to
  // its end.
  void Start(const std::vector<std::string>& daemon) {
    std::vector<std::string> argv = {"sh", "-c", "exec \"$0\" \"$@\" </dev/null >/dev/null 2>&1"};
    argv.insert(argv.end(), daemon.begin(), daemon.end());
    auto r = RunCommand(argv, 30s, env_);
    EXPECT_EQ(r.exit_code, 0) << daemon[0] << ": " << r.output;
  }
  std::string dir_, conf_;
  std::vector<std::string> env_;
  bool ready_ = false;
};

// srun and an sbatch script (examples/slurm/shardps.sbatch) on a real Slurm cluster: 4 tasks
// of `shardps run`, 1 server and 3 workers with exact values, each way.
TEST(Run, RealSlurmRunsAJobWithSrunAndSbatch) {
  if (std::string m = SlurmCluster::Missing(); !m.empty())
    GTEST_SKIP() << m << " is not installed (apt-get install slurmctld slurmd slurm-client munge)";
  SlurmCluster slurm;
  ASSERT_TRUE(slurm.ready()) << "the Slurm cluster did not come up: " << slurm.Logs();
  const std::string port = std::to_string(FreePort());
  auto r = slurm.Run({"srun", "-n", "4", "--overcommit", kShardps, "--log-level", "warn", "run",
                      "--servers", "1", "--port", port, "--", kTestWorker, "--steps", "20"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output << slurm.Logs();
  EXPECT_EQ(CountOccurrences(r.output, ": done"), 3u) << r.output;
  const std::string out = slurm.dir() + "/sbatch.out";
  r = slurm.Run({"sbatch", "--wait", "--ntasks", "4", "-o", out, "--export=ALL,SHARDPS=" + kShardps,
                 std::string(SHARDPS_SOURCE_DIR) + "/examples/slurm/shardps.sbatch", kTestWorker,
                 "--steps", "20"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output << ReadFile(out) << slurm.Logs();
  EXPECT_EQ(CountOccurrences(ReadFile(out), ": done"), 3u) << ReadFile(out);
}

// Regression: the children's variables were appended to the parent's environment, and a
// lookup takes the first match, so a SHARDPS_RANK or SHARDPS_COORDINATOR exported in the user's
// shell won over what the launcher gave each child. What the launcher sets now replaces it.
TEST(Launch, VariablesInTheParentEnvironmentDoNotOverrideWhatTheLauncherSets) {
  auto r = RunCommand(
      {kShardps, "launch", "--servers", "1", "--workers", "2", "--", kTestWorker, "--steps", "5"},
      60s, {"SHARDPS_RANK=5", "SHARDPS_COORDINATOR=127.0.0.1:1"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, ": done"), 2u) << r.output;
}

TEST(Run, WithoutALauncherOrWithTooFewTasksItSaysWhy) {
  auto r = RunCommand({kShardps, "run", "--", kTestWorker}, 20s);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no cluster launcher"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "run", "--servers", "2", "--", kTestWorker}, 20s,
                 {"RANK=0", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("2 tasks cannot hold 2 servers"), std::string::npos) << r.output;
  r = RunCommand({kShardps, "run", "--", kTestWorker}, 20s,
                 {"OMPI_COMM_WORLD_RANK=0", "OMPI_COMM_WORLD_SIZE=2"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--coordinator"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace shardps
