// Whole jobs in one process: exact-value sync and async runs, chunking, many small tensors,
// resent pushes, backpressure, failures.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "cluster/messages.h"
#include "compress/codec.h"
#include "support/auth_peers.h"
#include "support/exact_values.h"
#include "support/http_get.h"
#include "support/local_cluster.h"
#include "support/subprocess.h"
#include "support/tls_certs.h"
#include "transport/context.h"
#include "transport/frame.h"
#include "transport/tls.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::LocalCluster;

using testing::Grad;
using testing::Opts;
using testing::Sgd1;

// Every worker of `lc` runs `steps` sync push_pulls of Grad() on tensor `name` (n floats, SGD
// with lr 1 from `init`, sum aggregate), each acknowledged with its step's version, and checks
// that it ends with init minus every worker's gradients, exactly.
void RunExactSumSteps(LocalCluster& lc, const std::string& name, int64_t n, uint64_t steps,
                      float init) {
  const auto workers = static_cast<uint32_t>(lc.workers.size());
  lc.ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1(name, n, init));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    std::vector<float> g(n), out(n);
    for (uint64_t s = 1; s <= steps; ++s) {
      for (int64_t i = 0; i < n; ++i) g[i] = Grad(w.rank(), s, i);
      auto h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
      ASSERT_EQ(h.version(), s);
    }
    for (int64_t i = 0; i < n; ++i) {
      double expect = init;
      for (uint64_t t = 1; t <= steps; ++t)
        for (uint32_t ww = 0; ww < workers; ++ww) expect -= Grad(ww, t, i);
      ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i;
    }
  });
}

// The exact-value runs go over every transport built here.
class ClusterOver : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string backend = GetParam().substr(0, GetParam().find('+'));
    auto v = transport::CheckViability(backend);
    if (!v.viable) GTEST_SKIP() << GetParam() << ": " << v.reason;
    if (backend == "verbs" && !std::getenv("SHARDPS_RDMA_ADDRESS"))
      GTEST_SKIP() << "set SHARDPS_RDMA_ADDRESS to the address of an RDMA interface "
                      "(scripts/test-rdma.sh runs this in a virtual machine with soft-RoCE)";
  }
};

// Every backend, and tcp once more with the workers' batches off (small chunks then take the
// landing-buffer path, as large ones always do).
std::vector<std::string> Transports() {
  std::vector<std::string> t = {"tcp", "tcp+nobatch"};
  for (const auto& b : transport::BackendNames())
    if (b != "tcp") t.push_back(b);
  return t;
}

// 3 workers, 2 servers, 50 sync steps: every pull equals the exact expected parameters, and
// tensor sizes are not multiples of the chunk size.
TEST_P(ClusterOver, SyncFiftyStepsExactValues) {
  auto lc = LocalCluster::Start(Opts(2, 3, Mode::kSync, Aggregate::kSum, 4096), 16, GetParam());
  ASSERT_TRUE(lc);
  const std::vector<int64_t> sizes = {1, 1000, 1024, 1025, 3333};  // chunk = 1024 floats
  lc->ForEachWorker([&](Worker& w) {
    std::vector<TensorSpec> specs;
    for (size_t k = 0; k < sizes.size(); ++k)
      specs.push_back(Sgd1("t" + std::to_string(k), sizes[k], 100.0f));
    auto ids = w.Declare(specs);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    std::vector<std::vector<float>> grad(sizes.size()), out(sizes.size());
    for (size_t k = 0; k < sizes.size(); ++k) {
      grad[k].resize(sizes[k]);
      out[k].resize(sizes[k]);
    }
    for (uint64_t s = 1; s <= 50; ++s) {
      std::vector<Handle> hs;
      for (size_t k = 0; k < sizes.size(); ++k) {
        for (int64_t i = 0; i < sizes[k]; ++i) grad[k][i] = Grad(w.rank(), s, i);
        hs.push_back(w.PushPull((*ids)[k], grad[k].data(), out[k].data()));
      }
      for (auto& h : hs) ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      for (size_t k = 0; k < sizes.size(); ++k) {
        EXPECT_GE(hs[k].version(), s);
        for (int64_t i = 0; i < sizes[k]; ++i) {
          double expect = 100.0;
          for (uint64_t t = 1; t <= s; ++t)
            for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
          ASSERT_EQ(out[k][i], static_cast<float>(expect))
              << "tensor " << k << " element " << i << " step " << s << " worker " << w.rank();
        }
      }
    }
  });
  auto stats = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
  auto stats1 = nlohmann::json::parse(*lc->workers[0]->ServerStats(1));
  // Chunks per tensor: 1,1,1,2,4 = 9, spread over two servers; 50 steps x 3 workers each.
  EXPECT_EQ(stats["chunks"].get<int>() + stats1["chunks"].get<int>(), 9);
  EXPECT_EQ(stats["pushes_applied"].get<int>() + stats1["pushes_applied"].get<int>(), 9 * 50 * 3);
  EXPECT_EQ(stats["duplicate_pushes"].get<int>(), 0);
  lc->Finish();
}

TEST(ClusterSync, MeanAggregationAndPullAfterPush) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kMean));
  ASSERT_TRUE(lc);
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("p", 10, 0.0f));
    ASSERT_TRUE(id.ok());
    std::vector<float> g(10, w.rank() == 0 ? 2.0f : 4.0f), out(10);
    ASSERT_TRUE(w.Push(*id, g.data()).Wait(10s).ok());
    auto h = w.Pull(*id, out.data());
    ASSERT_TRUE(h.Wait(10s).ok()) << h.Wait(0ms).ToString();
    EXPECT_EQ(h.version(), 1u);
    for (float v : out) EXPECT_EQ(v, -3.0f);  // mean of 2 and 4, lr 1
  });
  lc->Finish();
}

TEST_P(ClusterOver, AsyncEndsWithExactlyTheSumOfAllPushes) {
  auto lc = LocalCluster::Start(Opts(2, 3, Mode::kAsync, Aggregate::kSum, 4096), 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int kSteps = 40;
  constexpr int64_t kN = 2500;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("a", kN, 0.0f));
    ASSERT_TRUE(id.ok());
    std::vector<float> g(kN), out(kN);
    uint64_t last_version = 0;
    for (int s = 1; s <= kSteps; ++s) {
      for (int64_t i = 0; i < kN; ++i) g[i] = Grad(w.rank(), s, i);
      auto h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      EXPECT_GE(h.version(), last_version);  // versions seen never go back
      last_version = h.version();
    }
    ASSERT_TRUE(w.Barrier("pushed", 30s).ok());
    auto h = w.Pull(*id, out.data());
    ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
    EXPECT_EQ(h.version(), 3u * kSteps);
    for (int64_t i = 0; i < kN; ++i) {
      double expect = 0;
      for (int s = 1; s <= kSteps; ++s)
        for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, s, i);
      ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i;
    }
  });
  lc->Finish();
}

// Pulls racing with updates never return a torn version: worker 1 pulls a 1 MiB chunk over and
// over while worker 0 keeps pushing (async, sgd lr 1, gradient 1 everywhere), so version v is
// exactly `-v` in every element; each pull must be one version throughout and match the
// version it reports. Both rewrite the same slots for the whole run.
TEST_P(ClusterOver, PullsRacingWithUpdatesAreNeverTorn) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kAsync, Aggregate::kSum), 4, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 1 << 18;
  constexpr int kPushes = 300;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("racy", kN, 0.0f));
    ASSERT_TRUE(id.ok());
    ASSERT_TRUE(w.Barrier("declared", 30s).ok());
    if (w.rank() == 0) {
      std::vector<float> g(kN, 1.0f);
      for (int s = 0; s < kPushes; ++s) ASSERT_TRUE(w.Push(*id, g.data()).Wait(30s).ok());
    } else {
      // Regression (a test asserting scheduling): this once also required that the pulls saw
      // more than 10 distinct versions, which a loaded machine can fail without any bug. It
      // asserts what the code guarantees only: every pull is one whole version, versions never
      // go back, and the last pull sees the last push; the loop is bounded in time.
      std::vector<float> out(kN);
      uint64_t last = 0;
      auto deadline = std::chrono::steady_clock::now() + 120s;
      while (last < kPushes) {
        ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "stuck at version " << last;
        auto h = w.Pull(*id, out.data());
        ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
        uint64_t v = h.version();
        ASSERT_GE(v, last);  // never goes back
        last = v;
        const float want = -static_cast<float>(v);
        for (int64_t i = 0; i < kN; ++i)
          ASSERT_EQ(out[i], want) << "pull of version " << v << " torn at element " << i;
      }
      EXPECT_EQ(last, static_cast<uint64_t>(kPushes));
    }
    ASSERT_TRUE(w.Barrier("done", 30s).ok());
  });
  lc->Finish();
}

// Updates of a large chunk split over idle apply threads (Applier::ParallelFor) stay exact: a
// chunk of 700,001 floats (11 ranges) on a server with 3 apply threads, 3 workers; sync steps
// with every pull checked, then async pushes whose end state is checked.
TEST_P(ClusterOver, UpdatesSplitOverApplyThreadsStayExact) {
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    SCOPED_TRACE(ModeName(mode));
    auto lc = LocalCluster::Start(Opts(1, 3, mode, Aggregate::kSum), 16, GetParam(), 3);
    ASSERT_TRUE(lc);
    constexpr int64_t kN = 700001;
    constexpr uint64_t kSteps = 8;
    lc->ForEachWorker([&](Worker& w) {
      auto id = w.Declare(Sgd1("split", kN, 50.0f));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      std::vector<float> g(kN), out(kN);
      for (uint64_t s = 1; s <= kSteps; ++s) {
        for (int64_t i = 0; i < kN; ++i) g[i] = Grad(w.rank(), s, i);
        auto h = w.PushPull(*id, g.data(), out.data());
        ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
        if (mode != Mode::kSync) continue;
        ASSERT_EQ(h.version(), s);
        for (int64_t i = 0; i < kN; ++i) {
          double expect = 50.0;
          for (uint64_t t = 1; t <= s; ++t)
            for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
          ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i << " step " << s;
        }
      }
      ASSERT_TRUE(w.Barrier("pushed", 60s).ok());
      auto h = w.Pull(*id, out.data());
      ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
      EXPECT_EQ(h.version(), mode == Mode::kSync ? kSteps : 3 * kSteps);
      for (int64_t i = 0; i < kN; ++i) {
        double expect = 50.0;
        for (uint64_t t = 1; t <= kSteps; ++t)
          for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
        ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i;
      }
    });
    auto stats = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
    EXPECT_EQ(stats["pushes_applied"].get<int>(), 3 * static_cast<int>(kSteps));
    EXPECT_EQ(stats["apply_threads"].get<int>(), 3);
    lc->Finish();
  }
}

// Regression (sync mode deadlocks when a worker runs ahead): 2 workers, 1 server, a 12 MiB
// tensor (3 chunks of 4 MiB), 16 landing buffers. Worker 0 issues 40 pushes without waiting;
// worker 1 starts 1 s later and pushes one step at a time. The pushes parked ahead of the step
// used to hold every landing buffer that the step everyone waits on needed, and the job hung
// until every wait timed out. Now the grants of pushes beyond the step wait (holding no
// buffer) and every step completes with exact values.
TEST_P(ClusterOver, SyncDeadlockWhenAWorkerRunsAhead) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum), 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 3 << 20;  // 12 MiB of float32: 3 chunks
  constexpr uint64_t kSteps = 40;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("ahead", kN, 0.0f));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ASSERT_TRUE(w.Barrier("declared", 30s).ok());
    if (w.rank() == 0) {
      std::vector<float> g(kN, 1.0f);  // the same gradient, 1, at every step
      std::vector<Handle> hs;
      for (uint64_t s = 1; s <= kSteps; ++s) hs.push_back(w.Push(*id, g.data()));
      for (uint64_t s = 1; s <= kSteps; ++s) {
        Status st = hs[s - 1].Wait(60s);
        ASSERT_TRUE(st.ok()) << "step " << s << ": " << st.ToString();
        EXPECT_EQ(hs[s - 1].version(), s);
      }
    } else {
      std::this_thread::sleep_for(1s);
      std::vector<float> g(kN), out(kN);
      double expect = 0;
      for (uint64_t s = 1; s <= kSteps; ++s) {
        std::fill(g.begin(), g.end(), static_cast<float>(s));
        auto h = w.PushPull(*id, g.data(), out.data());
        Status st = h.Wait(60s);
        ASSERT_TRUE(st.ok()) << "step " << s << ": " << st.ToString();
        ASSERT_EQ(h.version(), s);
        expect -= 1.0 + static_cast<double>(s);
        for (int64_t i = 0; i < kN; i += 4099)
          ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i << " step " << s;
        ASSERT_EQ(out[kN - 1], static_cast<float>(expect));
      }
    }
    ASSERT_TRUE(w.Barrier("done", 60s).ok());
  });
  auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
  EXPECT_EQ(st["pushes_applied"].get<int>(), 2 * 3 * static_cast<int>(kSteps));
  EXPECT_EQ(st["duplicate_pushes"].get<int>(), 0);
  EXPECT_GT(st["grants_parked"].get<int>(), 0);  // worker 0 was held back by credits
  lc->Finish();
}

// Async exactness under deep pipelining (the defect "async pushes of one chunk applied out of
// order or dropped" is pinned deterministically by ServerProtocol.AsyncPushesOfOneChunkApplied-
// OutOfOrderOrDropped): 3 workers, 2 servers, 10 chunks, 4 landing buffers per server, a window
// of pushes in flight per worker: the end state is exactly the initial value minus every push,
// every push was applied once, none taken for a resend.
TEST_P(ClusterOver, AsyncDeepPipeliningManyChunksWorkersServersStaysExact) {
  auto lc = LocalCluster::Start(Opts(2, 3, Mode::kAsync, Aggregate::kSum, 4096), 4, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 5000;  // 5 chunks of at most 1024 floats per tensor
  constexpr int kSteps = 25;
  lc->ForEachWorker([&](Worker& w) {
    auto ids = w.Declare({Sgd1("a", kN, 1000.0f), Sgd1("b", kN, -1000.0f)});
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    std::vector<std::vector<float>> g(kSteps, std::vector<float>(kN));
    for (int s = 0; s < kSteps; ++s)
      for (int64_t i = 0; i < kN; ++i) g[s][i] = Grad(w.rank(), s + 1, i);
    // A window of pushes in flight: new pushes are issued while earlier ones wait for their
    // grants and acknowledgements hand out credits, so later pushes can overtake earlier ones.
    std::deque<Handle> inflight;
    for (int s = 0; s < kSteps; ++s) {
      for (TensorId id : *ids) {
        inflight.push_back(w.Push(id, g[s].data()));
        while (inflight.size() > 6) {
          Status st = inflight.front().Wait(60s);
          ASSERT_TRUE(st.ok()) << st.ToString();
          inflight.pop_front();
        }
      }
    }
    for (auto& h : inflight) ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
    ASSERT_TRUE(w.Barrier("pushed", 60s).ok());
    std::vector<float> out(kN);
    for (size_t k = 0; k < ids->size(); ++k) {
      ASSERT_TRUE(w.Pull((*ids)[k], out.data()).Wait(30s).ok());
      for (int64_t i = 0; i < kN; ++i) {
        double expect = k == 0 ? 1000.0 : -1000.0;
        for (int s = 1; s <= kSteps; ++s)
          for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, s, i);
        ASSERT_EQ(out[i], static_cast<float>(expect)) << "tensor " << k << " element " << i;
      }
    }
  });
  int applied = 0, duplicates = 0;
  for (uint32_t s = 0; s < 2; ++s) {
    auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(s));
    applied += st["pushes_applied"].get<int>();
    duplicates += st["duplicate_pushes"].get<int>();
  }
  EXPECT_EQ(applied, 3 * kSteps * 10);
  EXPECT_EQ(duplicates, 0);
  lc->Finish();
}

// Hostile peers while a real job runs: connections to every listening port (the coordinator,
// each server's data port) send random bytes, truncated frames, frames that claim huge sizes
// and well-framed messages with junk in them, again and again, while 3 workers train 30 sync
// steps. The job finishes with exact values, each attacked connection is closed or refused
// without harm, and the servers' inbound memory stayed within their budgets.
TEST_P(ClusterOver, HostilePeersOnEveryPortWhileAJobRuns) {
  constexpr uint64_t kConnBudget = 4 << 20, kProcBudget = 16 << 20;
  auto lc = LocalCluster::Start(Opts(2, 3, Mode::kSync, Aggregate::kSum, 64 << 10), 16, GetParam(),
                                1, [&](ServerOptions& so) {
                                  so.connection_inbound_bytes = kConnBudget;
                                  so.process_inbound_bytes = kProcBudget;
                                });
  ASSERT_TRUE(lc);
  std::vector<std::string> ports = {lc->coordinator->address()};
  for (auto& s : lc->servers) ports.push_back(s->address());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> attacks{0};
  auto attacker = [&](uint32_t seed) {
    std::mt19937 rng(seed);
    while (!stop.load()) {
      const std::string& target = ports[rng() % ports.size()];
      int fd = shardps::testing::RawConnect(target);
      if (fd < 0) continue;
      std::vector<uint8_t> out;
      transport::FrameHeader h;
      uint8_t hdr[transport::kFrameHeaderSize];
      switch (rng() % 5) {
        case 0:  // random bytes
          out.resize(1 + rng() % 65536);
          for (auto& b : out) b = static_cast<uint8_t>(rng());
          break;
        case 1:  // a truncated frame
          h.meta_len = 100;
          h.payload_len = 1000;
          h.aux = cluster::kGrant;
          h.EncodeTo(hdr);
          out.assign(hdr, hdr + sizeof(hdr));
          out.resize(sizeof(hdr) + 1100, 0x22);        // the whole frame,
          out.resize(1 + rng() % (sizeof(hdr) + 50));  // cut short
          break;
        case 2:  // a frame claiming huge sizes, then a little of it
          h.meta_len = 60u << 20;
          h.payload_len = 2ull << 30;
          h.aux = cluster::kCreateChunks;
          h.EncodeTo(hdr);
          out.assign(hdr, hdr + sizeof(hdr));
          out.resize(out.size() + 4096, 0x11);
          break;
        default: {  // well framed, junk inside, known tags
          const uint32_t tags[] = {
              cluster::kGrant,          cluster::kPushDone,         cluster::kCreateChunks,
              cluster::kRegister,       cluster::kDeclare,          cluster::kBarrier,
              cluster::kTakeCheckpoint, cluster::kCheckpointCounts, cluster::kCheckpointDone,
              cluster::kSaveChunks,     cluster::kServerReached,    cluster::kInstallReplica};
          std::vector<uint8_t> meta(rng() % 200);
          for (auto& b : meta) b = static_cast<uint8_t>(rng());
          h.meta_len = static_cast<uint32_t>(meta.size());
          h.aux = tags[rng() % std::size(tags)];
          h.EncodeTo(hdr);
          out.assign(hdr, hdr + sizeof(hdr));
          out.insert(out.end(), meta.begin(), meta.end());
        }
      }
      (void)send(fd, out.data(), out.size(), MSG_NOSIGNAL);
      shutdown(fd, SHUT_WR);
      char sink[4096];
      for (;;) {  // until the peer closes or a short while passed
        pollfd p{fd, POLLIN, 0};
        if (poll(&p, 1, 300) <= 0 || recv(fd, sink, sizeof(sink), 0) <= 0) break;
      }
      close(fd);
      attacks++;
    }
  };
  std::vector<std::thread> attackers;
  for (uint32_t i = 0; i < 4; ++i) attackers.emplace_back(attacker, 1234 + i);
  constexpr int64_t kN = 50000;  // 4 chunks of 64 KiB on 2 servers
  constexpr uint64_t kSteps = 30;
  RunExactSumSteps(*lc, "hostile", kN, kSteps, 7.0f);
  // A last round of attacks after the steps, so that the job also outlives some at rest.
  for (auto deadline = std::chrono::steady_clock::now() + 2s;
       attacks.load() < 40 && std::chrono::steady_clock::now() < deadline;)
    std::this_thread::sleep_for(20ms);
  stop = true;
  for (auto& t : attackers) t.join();
  EXPECT_GT(attacks.load(), 0u);
  for (uint32_t s = 0; s < 2; ++s) {
    auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(s));
    EXPECT_LE(st["inbound_peak_bytes"].get<uint64_t>(), kProcBudget) << "server " << s;
    EXPECT_EQ(st["inbound_limit_bytes"].get<uint64_t>(), kProcBudget);
    EXPECT_EQ(st["pushes_applied"].get<uint64_t>(), 3 * kSteps * 2);  // 2 chunks per server
  }
  lc->Finish();
}

// A job with a cluster secret (docs/security.md) while peers that do not belong knock on every
// port: raw frames without a hello, a context holding another secret, and a handshake recorded
// through a relay and replayed. Each is refused before a message of theirs is read; the job
// ends with exact values, and the servers count the refusals.
TEST_P(ClusterOver, PeersWithoutTheSecretAreRefusedWhileAJobRuns) {
  char path[] = "/tmp/shardps-secret-XXXXXX";
  int sfd = mkstemp(path);
  ASSERT_GE(sfd, 0);
  const std::string secret = "a cluster secret of 32 bytes....";
  ASSERT_EQ(write(sfd, secret.data(), secret.size()), static_cast<ssize_t>(secret.size()));
  close(sfd);
  auto co = Opts(2, 2, Mode::kSync, Aggregate::kSum, 64 << 10);
  co.secret_file = path;
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  std::vector<std::string> ports = {lc->coordinator->address()};
  for (auto& s : lc->servers) ports.push_back(s->address());
  // One genuine handshake per port, relayed and recorded (the servers count it as accepted).
  std::vector<std::vector<uint8_t>> recorded;
  for (auto& p : ports) {
    recorded.push_back(shardps::testing::RecordHandshake(p, secret));
    ASSERT_EQ(recorded.back().size(), transport::auth::kHelloBytes + transport::auth::kProofBytes);
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> refused{0}, let_in{0};
  auto attacker = [&](uint32_t seed) {
    std::mt19937 rng(seed);
    transport::ContextOptions o;
    o.name = "intruder";
    o.secret = "another secret, 32 bytes long...";
    auto wrong = transport::CreateContext("tcp", o);
    ASSERT_TRUE(wrong.ok());
    while (!stop.load()) {
      size_t target = rng() % ports.size();
      switch (rng() % 3) {
        case 0: {  // a well-formed frame, no hello
          int fd = shardps::testing::RawConnect(ports[target]);
          if (fd < 0) continue;
          transport::FrameHeader h;
          uint8_t hdr[transport::kFrameHeaderSize];
          h.aux = cluster::kRegister;
          h.EncodeTo(hdr);
          (void)shardps::testing::SendAll(fd, hdr, sizeof(hdr));
          // Only the server's hello comes back before the close.
          if (shardps::testing::BytesUntilClosed(fd) == transport::auth::kHelloBytes)
            refused++;
          else
            let_in++;
          close(fd);
          break;
        }
        case 1: {  // another secret
          auto c = (*wrong)->Connect(ports[target], {}, 5s);
          if (!c.ok() && c.status().code() == Status::Code::kUnauthenticated)
            refused++;
          else
            let_in++;
          break;
        }
        default:  // a replayed handshake
          if (shardps::testing::ReplayIsRefused(ports[target], recorded[target]))
            refused++;
          else
            let_in++;
      }
    }
  };
  std::vector<std::thread> attackers;
  for (uint32_t i = 0; i < 2; ++i) attackers.emplace_back(attacker, 99 + i);
  constexpr int64_t kN = 50000;
  constexpr uint64_t kSteps = 20;
  RunExactSumSteps(*lc, "secret", kN, kSteps, 3.0f);
  for (auto deadline = std::chrono::steady_clock::now() + 5s;
       refused.load() < 12 && std::chrono::steady_clock::now() < deadline;)
    std::this_thread::sleep_for(20ms);
  stop = true;
  for (auto& t : attackers) t.join();
  EXPECT_GE(refused.load(), 3u);
  EXPECT_EQ(let_in.load(), 0u);
  uint64_t refused_by_servers = 0;
  for (uint32_t s = 0; s < 2; ++s) {
    auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(s));
    refused_by_servers += st["refused_peers"].get<uint64_t>();
    EXPECT_EQ(st["pushes_applied"].get<uint64_t>(), 2 * kSteps * 2);
  }
  EXPECT_GT(refused_by_servers, 0u);
  lc->Finish();
  unlink(path);
}

// A whole job with TLS on its tcp connections (and the cluster secret inside it): exact values,
// and a stranger's certificate is refused by the coordinator and every server meanwhile.
TEST_P(ClusterOver, AJobOverTlsHasExactValues) {
  auto certs = shardps::testing::TestCerts::Make();
  ASSERT_TRUE(certs.ok) << certs.error;
  char path[] = "/tmp/shardps-secret-XXXXXX";
  int sfd = mkstemp(path);
  ASSERT_GE(sfd, 0);
  const std::string secret = "a cluster secret of 32 bytes....";
  ASSERT_EQ(write(sfd, secret.data(), secret.size()), static_cast<ssize_t>(secret.size()));
  close(sfd);
  auto co = Opts(2, 3, Mode::kSync, Aggregate::kSum, 64 << 10);
  co.tls_cert = certs.cert;
  co.tls_key = certs.key;
  co.tls_ca = certs.ca;
  co.secret_file = path;
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 50000;
  constexpr uint64_t kSteps = 15;
  RunExactSumSteps(*lc, "over-tls", kN, kSteps, 5.0f);
  transport::ContextOptions o;
  o.name = "stranger";
  o.secret = secret;  // even with the secret, another CA's certificate is not enough
  o.tls = *transport::TlsConfig::Load({certs.other_cert, certs.other_key, certs.other_ca});
  auto stranger = transport::CreateContext("tcp", o);
  ASSERT_TRUE(stranger.ok());
  std::vector<std::string> ports = {lc->coordinator->address()};
  for (auto& s : lc->servers) ports.push_back(s->address());
  for (auto& p : ports) {
    auto c = (*stranger)->Connect(p, {}, 5s);
    EXPECT_FALSE(c.ok()) << p;
    if (!c.ok()) {
      EXPECT_EQ(c.status().code(), Status::Code::kUnauthenticated) << c.status().ToString();
    }
  }
  lc->Finish();
  unlink(path);
  certs.Remove();
}

// Every role serves Prometheus metrics (docs/metrics.md) that count exactly what the job did,
// readiness on /healthz, and text that promtool accepts.
TEST_P(ClusterOver, MetricsOfEveryRoleCountWhatTheJobDid) {
  auto co = Opts(2, 2, Mode::kSync, Aggregate::kSum, 64 << 10);
  co.metrics_listen = "127.0.0.1:0";
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 50000;  // 4 chunks of at most 64 KiB: 2 on each server
  constexpr uint64_t kSteps = 10;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("metered", kN, 1.0f));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    std::vector<float> g(kN, 1.0f), out(kN);
    for (uint64_t s = 1; s <= kSteps; ++s) {
      auto h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
    }
    auto h = w.Pull(*id, out.data());
    ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
    EXPECT_EQ(out[0], 1.0f - 2.0f * kSteps);
  });
  using shardps::testing::HttpGet;
  using shardps::testing::Sample;
  std::vector<std::string> scrapes;
  auto scrape = [&](const std::string& addr) {
    EXPECT_FALSE(addr.empty());
    EXPECT_EQ(HttpGet(addr, "/healthz").status, 200) << addr;
    auto r = HttpGet(addr, "/metrics");
    EXPECT_EQ(r.status, 200) << addr;
    scrapes.push_back(r.body);
    return r.body;
  };
  auto c = scrape(lc->coordinator->metrics_address());
  EXPECT_EQ(Sample(c, "shardps_coordinator_nodes", {"node_role=\"server\""}), 2.0) << c;
  EXPECT_EQ(Sample(c, "shardps_coordinator_nodes", {"node_role=\"worker\""}), 2.0);
  EXPECT_EQ(Sample(c, "shardps_coordinator_tensors"), 1.0);
  EXPECT_EQ(Sample(c, "shardps_coordinator_parameter_bytes"), kN * 4.0);
  EXPECT_EQ(Sample(c, "shardps_coordinator_job_state"), 1.0);  // running
  double pushes = 0;
  for (auto& s : lc->servers) {
    auto m = scrape(s->metrics_address());
    auto chunks = Sample(m, "shardps_server_chunks");
    ASSERT_TRUE(chunks) << m;
    const std::string rank = "rank=\"" + std::to_string(s->rank()) + "\"";
    EXPECT_EQ(Sample(m, "shardps_server_pushes_total", {rank}), 2 * kSteps * *chunks) << m;
    EXPECT_EQ(Sample(m, "shardps_server_apply_seconds_count"), 2 * kSteps * *chunks);
    // Version 0 of each chunk, then one per step.
    EXPECT_EQ(Sample(m, "shardps_server_versions_published_total"), (kSteps + 1) * *chunks);
    EXPECT_EQ(Sample(m, "shardps_server_worker_pushes_total", {"worker=\"1\""}), kSteps * *chunks);
    EXPECT_EQ(Sample(m, "shardps_server_landing_buffers"), 16.0);
    EXPECT_EQ(Sample(m, "shardps_refused_peers_total"), 0.0);
    pushes += *Sample(m, "shardps_server_pushes_total");
  }
  EXPECT_EQ(pushes, 2.0 * kSteps * 4);
  for (auto& w : lc->workers) {
    auto m = scrape(w->metrics_address());
    EXPECT_EQ(Sample(m, "shardps_worker_tensor_operations_total",
                     {"tensor=\"metered\"", "op=\"push_pull\""}),
              static_cast<double>(kSteps))
        << m;
    EXPECT_EQ(
        Sample(m, "shardps_worker_tensor_operations_total", {"tensor=\"metered\"", "op=\"pull\""}),
        1.0);
    EXPECT_EQ(Sample(m, "shardps_worker_operation_seconds_count", {"op=\"push_pull\""}),
              static_cast<double>(kSteps));
    EXPECT_EQ(Sample(m, "shardps_worker_push_bytes_total"), kSteps * kN * 4.0);
    EXPECT_EQ(Sample(m, "shardps_worker_operations_in_flight"), 0.0);
  }
  // promtool (Debian's prometheus, from setup.sh) accepts every scrape.
  for (size_t i = 0; i < scrapes.size(); ++i) {
    std::string file = "/tmp/shardps-scrape-" + std::to_string(getpid()) + "-" + std::to_string(i);
    {
      std::ofstream f(file);
      f << scrapes[i];
    }
    auto r = shardps::testing::RunCommand({"sh", "-c", "promtool check metrics < " + file}, 60s);
    EXPECT_EQ(r.exit_code, 0) << r.output << scrapes[i];
    std::remove(file.c_str());
  }
  lc->Finish();
}

// A gradient that each codec carries exactly (integers; int8: each 64-block's first element is
// 127, so its scale is 1; onebit: +-(w + 1) everywhere, so its scale is w + 1).
float CodecGrad(Codec c, uint32_t w, uint64_t s, uint64_t i) {
  float g = Grad(w, s, i);
  if (c == Codec::kInt8 && i % 64 == 0) return 127.0f;
  if (c == Codec::kOneBit) return g >= 0 ? static_cast<float>(w + 1) : -static_cast<float>(w + 1);
  return g;
}

// Compressed pushes from 3 workers to 2 servers, sync and async: the parameters equal the
// initial values minus the sum of every push's decoded values, exactly (decoded here with the
// same codec, chunk by chunk), pulled as fp32, fp16 or bf16; the bytes pushed are exactly the
// encodings' bytes.
TEST_P(ClusterOver, CompressedPushesAggregateAsTheirDecodedValues) {
  const std::vector<std::pair<std::string, Codec>> cases = {
      {"fp16", Codec::kFp16},
      {"bf16", Codec::kBf16},
      {"int8:block=64", Codec::kNone},
      {"onebit:block=64,ef=off,min=0", Codec::kNone},
      {"topk:k=150,ef=off,min=0", Codec::kNone},
      {"topk:k=150,ef=off,min=0,warmup=3", Codec::kNone}};  // 25%, 8.7%, 3%, then k=150
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    auto lc = LocalCluster::Start(Opts(2, 3, mode, Aggregate::kSum, 4096), 16, GetParam());
    ASSERT_TRUE(lc);
    const std::vector<int64_t> sizes = {1000, 3333};  // chunk = 1024 floats
    const uint64_t steps = 4;
    lc->ForEachWorker([&](Worker& w) {
      std::vector<TensorSpec> specs;
      std::vector<Compression> comps;
      for (size_t c = 0; c < cases.size(); ++c)
        for (size_t k = 0; k < sizes.size(); ++k) {
          TensorSpec t = Sgd1(std::to_string(c) + "-" + std::to_string(k), sizes[k], 100.0f);
          t.compression = Compression::Parse(cases[c].first).value();
          t.pull_codec = cases[c].second;
          comps.push_back(t.compression);
          specs.push_back(t);
        }
      auto ids = w.Declare(specs);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      uint64_t pushed_expect = 0;
      for (uint64_t s = 1; s <= steps; ++s) {
        std::vector<Handle> hs;
        std::vector<std::vector<float>> grads(specs.size());
        for (size_t t = 0; t < specs.size(); ++t) {
          const int64_t n = specs[t].shape[0];
          grads[t].resize(n);
          for (int64_t i = 0; i < n; ++i)
            grads[t][i] = CodecGrad(comps[t].codec, w.rank(), s, static_cast<uint64_t>(i % 1024));
          hs.push_back(w.Push((*ids)[t], grads[t].data()));
          for (int64_t off = 0; off < n; off += 1024) {
            uint64_t len = std::min<int64_t>(1024, n - off);
            pushed_expect += compress::EncodedBytes(
                compress::ForChunk(comps[t].AtPush(n, s - 1), n, off, len), len);
          }
        }
        for (auto& h : hs) ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      }
      EXPECT_EQ(w.stats().bytes_pushed, pushed_expect);
      ASSERT_TRUE(w.Barrier("pushed", 30s).ok());
      for (size_t t = 0; t < specs.size(); ++t) {
        const int64_t n = specs[t].shape[0];
        std::vector<double> expect(n, 100.0);
        for (uint64_t s = 1; s <= steps; ++s)
          for (uint32_t ww = 0; ww < 3; ++ww)
            for (int64_t off = 0; off < n; off += 1024) {
              uint64_t len = std::min<int64_t>(1024, n - off);
              auto cc = compress::ForChunk(comps[t].AtPush(n, s - 1), n, off, len);
              std::vector<float> x(len), y(len);
              for (uint64_t i = 0; i < len; ++i)
                x[i] = CodecGrad(comps[t].codec, ww, s, (off + i) % 1024);
              std::vector<uint8_t> enc(compress::EncodedBytes(cc, len));
              compress::Encode(cc, x.data(), len, enc.data(), nullptr);
              compress::DecodeRange(cc.codec, cc.block, enc.data(), len, 0, len, y.data(), false);
              for (uint64_t i = 0; i < len; ++i) expect[off + i] -= y[i];
            }
        std::vector<float> out(n);
        auto h = w.Pull((*ids)[t], out.data());
        ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
        EXPECT_EQ(h.version(), steps * (mode == Mode::kSync ? 1 : 3));
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(out[i], static_cast<float>(expect[i]))
              << specs[t].name << " (" << comps[t].ToString() << ", " << ModeName(mode)
              << ") element " << i;
      }
    });
    lc->Finish();
  }
}

// ---- Consistency beyond sync and async (docs/consistency.md) ----

// A one-shot event between worker threads, waited on with a deadline.
class Event {
 public:
  void Set() {
    std::lock_guard<std::mutex> lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  bool Wait(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return set_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// sync with a quorum of 2 of 3 workers: workers 0 and 1 run 20 steps while worker 2 has not
// pushed at all (the step rate follows the fast workers, whatever the slow one does). Worker 2's
// first push is then late: acknowledged, dropped, told version 20; its next push is step 21,
// which it completes with worker 0; worker 1's push of step 21 is late in turn. Every value is
// exact, and the servers count each late push.
TEST_P(ClusterOver, SyncQuorumPublishesWithoutTheSlowestWorker) {
  CoordinatorOptions co = Opts(2, 3, Mode::kSync, Aggregate::kSum, 4096);
  co.sync_quorum = 2;
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 3333;  // 4 chunks over 2 servers
  constexpr uint64_t kSteps = 20;
  auto expect_after = [](uint64_t steps, int64_t i) {
    double e = 100.0;
    for (uint64_t t = 1; t <= steps; ++t) e -= Grad(0, t, i) + Grad(1, t, i);
    return e;
  };
  Event fast_done, slow_waits, step21_done;
  std::atomic<int> fast_left{2};
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("q", kN, 100.0f));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    std::vector<float> g(kN), out(kN);
    auto fill = [&](uint32_t rank, uint64_t step) {
      for (int64_t i = 0; i < kN; ++i) g[i] = Grad(rank, step, i);
    };
    if (w.rank() < 2) {
      for (uint64_t s = 1; s <= kSteps; ++s) {
        fill(w.rank(), s);
        auto h = w.PushPull(*id, g.data(), out.data());
        ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
        ASSERT_FALSE(h.late());
        for (int64_t i = 0; i < kN; ++i)
          ASSERT_EQ(out[i], static_cast<float>(expect_after(s, i))) << "step " << s;
      }
      if (--fast_left == 0) fast_done.Set();
    }
    if (w.rank() == 2) {
      ASSERT_TRUE(fast_done.Wait(60s));
      fill(2, 1);
      auto h = w.PushPull(*id, g.data(), out.data());
      Status st = h.Wait(30s);
      if (!st.ok()) {
        for (uint32_t srv = 0; srv < 2; ++srv) {  // what the servers saw (a hang over verbs)
          auto stats = lc->workers[0]->ServerStats(srv);
          ADD_FAILURE() << "server " << srv << ": "
                        << (stats.ok() ? *stats : stats.status().ToString());
        }
      }
      ASSERT_TRUE(st.ok()) << st.ToString();
      EXPECT_TRUE(h.late());
      EXPECT_EQ(h.version(), kSteps);
      EXPECT_EQ(w.steps(*id), kSteps);  // its next push is step 21
      for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(out[i], static_cast<float>(expect_after(20, i)));
      fill(2, 21);
      h = w.PushPull(*id, g.data(), out.data());  // step 21: completes once worker 0 pushed it
      slow_waits.Set();
      ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      EXPECT_FALSE(h.late());
      EXPECT_EQ(h.version(), kSteps + 1);
      for (int64_t i = 0; i < kN; ++i)
        ASSERT_EQ(out[i],
                  static_cast<float>(expect_after(20, i) - Grad(2, 21, i) - Grad(0, 21, i)));
      EXPECT_EQ(w.stats().late_pushes, 4u);  // one per chunk
    }
    if (w.rank() == 0) {
      ASSERT_TRUE(slow_waits.Wait(60s));
      fill(0, 21);
      auto h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      EXPECT_FALSE(h.late());
      step21_done.Set();
    }
    if (w.rank() == 1) {
      ASSERT_TRUE(step21_done.Wait(60s));
      fill(1, 21);
      auto h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      EXPECT_TRUE(h.late());
      EXPECT_EQ(h.version(), kSteps + 1);
      for (int64_t i = 0; i < kN; ++i)
        ASSERT_EQ(out[i],
                  static_cast<float>(expect_after(20, i) - Grad(2, 21, i) - Grad(0, 21, i)));
    }
  });
  uint64_t late = 0, late2 = 0, late1 = 0, applied = 0;
  for (uint32_t srv = 0; srv < 2; ++srv) {
    auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(srv));
    late += st["late_pushes"].get<uint64_t>();
    applied += st["pushes_applied"].get<uint64_t>();
    late1 += st["workers"][1]["late_pushes"].get<uint64_t>();
    late2 += st["workers"][2]["late_pushes"].get<uint64_t>();
  }
  EXPECT_EQ(late, 8u);  // 4 chunks: worker 2's step 1 and worker 1's step 21
  EXPECT_EQ(late1, 4u);
  EXPECT_EQ(late2, 4u);
  EXPECT_EQ(applied, 4u * 2 * 21);  // two contributions per chunk and step
  lc->Finish();
}

// sync with a quorum of 2 of 3, mean, worker 2 slowed by 50 ms per step: every published step
// has exactly 2 contributors, each push is either folded or acknowledged late, and the end
// state is exactly the mean over the contributors of each step (single-chunk tensor).
TEST_P(ClusterOver, SyncQuorumWithASlowWorkerIsExactOverTheContributors) {
  CoordinatorOptions co = Opts(1, 3, Mode::kSync, Aggregate::kMean);
  co.sync_quorum = 2;
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 500;
  constexpr uint64_t kSteps = 12;
  std::mutex mu;
  std::vector<std::pair<uint32_t, uint64_t>> contributed;  // (rank, step)
  uint64_t late_total = 0;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("m", kN, 100.0f));
    ASSERT_TRUE(id.ok());
    std::vector<float> g(kN), out(kN);
    for (uint64_t s = 1; s <= kSteps;) {
      if (w.rank() == 2) std::this_thread::sleep_for(50ms);
      for (int64_t i = 0; i < kN; ++i) g[i] = 2.0f * Grad(w.rank(), s, i);
      auto h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      std::lock_guard<std::mutex> lock(mu);
      if (h.late()) {
        late_total++;
        EXPECT_GE(h.version(), s);
        EXPECT_GE(w.steps(0), s);
        s = w.steps(0) + 1;  // carries on from the published version
      } else {
        contributed.emplace_back(w.rank(), s);
        s++;
      }
    }
    ASSERT_TRUE(w.Barrier("done", 30s).ok());
  });
  ASSERT_EQ(contributed.size(), 2 * kSteps);
  std::vector<float> out(kN);
  auto h = lc->workers[0]->Pull(0, out.data());
  ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
  EXPECT_EQ(h.version(), kSteps);
  for (int64_t i = 0; i < kN; ++i) {
    double e = 100.0;
    for (auto [r, s] : contributed) e -= Grad(r, s, i);  // (2g + 2g') / 2
    ASSERT_EQ(out[i], static_cast<float>(e)) << "element " << i;
  }
  auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
  EXPECT_EQ(st["late_pushes"].get<uint64_t>(), late_total);
  EXPECT_EQ(st["pushes_applied"].get<uint64_t>(), 2 * kSteps);
  lc->Finish();
}

// Regression (a hang found by perf/staleness.sh): with a quorum, a late push may be late on
// one chunk of a tensor and counted on another. When each chunk skipped ahead on its own, a
// slow worker ended up pushing, on a chunk already at the last step, a step nobody else would
// push, and waited for its quorum forever. The tensor now moves as one (Worker::steps): 4
// workers, quorum 3, worker 3 slowed, tensors of 4 chunks over 2 servers; every step of every
// chunk is published with exactly 3 pushes and nobody waits.
TEST_P(ClusterOver, SyncQuorumMultiChunkTensorsNeverWaitForAStepNobodyPushes) {
  CoordinatorOptions co = Opts(2, 4, Mode::kSync, Aggregate::kMean, 4096);
  co.sync_quorum = 3;
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 3333;  // 4 chunks
  constexpr uint64_t kSteps = 30;
  lc->ForEachWorker([&](Worker& w) {
    auto ids = w.Declare({Sgd1("a", kN, 1.0f), Sgd1("b", kN, 1.0f)});
    ASSERT_TRUE(ids.ok());
    std::vector<float> g(kN, 1.0f), out(kN);
    for (uint64_t s = 1; s <= kSteps; ++s) {
      if (w.rank() == 3) std::this_thread::sleep_for(std::chrono::milliseconds(2 + s % 3));
      std::vector<Handle> hs;
      for (TensorId id : *ids)
        if (w.steps(id) < s) hs.push_back(w.PushPull(id, g.data(), out.data()));
      for (auto& h : hs) ASSERT_TRUE(h.Wait(30s).ok()) << "worker " << w.rank() << " step " << s;
      for (TensorId id : *ids) ASSERT_LE(w.steps(id), kSteps);
    }
    ASSERT_TRUE(w.Barrier("done", 30s).ok());
  });
  uint64_t applied = 0, late = 0;
  for (uint32_t srv = 0; srv < 2; ++srv) {
    auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(srv));
    applied += st["pushes_applied"].get<uint64_t>();
    late += st["late_pushes"].get<uint64_t>();
  }
  EXPECT_EQ(applied, 2u * 4 * kSteps * 3);
  EXPECT_LE(late, 2u * 4 * kSteps);
  std::vector<float> out(kN);
  auto h = lc->workers[0]->Pull(0, out.data());
  ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
  EXPECT_EQ(h.version(), kSteps);
  for (float v : out) ASSERT_EQ(v, 1.0f - kSteps);  // the mean of 1s, each step
  lc->Finish();
}

// Fixed per-worker weights (1, 0.5, 2) in sync and async, on fp32, fp16 and int8 pushes: the
// parameters are exactly the initial values minus the weighted sum of the decoded pushes.
TEST_P(ClusterOver, WorkerWeightsGiveTheExactWeightedSum) {
  const std::vector<float> eta = {1.0f, 0.5f, 2.0f};
  const std::vector<std::string> codecs = {"none", "fp16", "int8:block=64"};
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    SCOPED_TRACE(ModeName(mode));
    CoordinatorOptions co = Opts(2, 3, mode, Aggregate::kSum, 4096);
    co.worker_weights = eta;
    auto lc = LocalCluster::Start(co, 16, GetParam());
    ASSERT_TRUE(lc);
    constexpr int64_t kN = 3333;
    constexpr uint64_t kSteps = 5;
    lc->ForEachWorker([&](Worker& w) {
      std::vector<TensorSpec> specs;
      std::vector<Codec> kinds;
      for (const auto& c : codecs) {
        TensorSpec t = Sgd1("w-" + c, kN, 100.0f);
        t.compression = Compression::Parse(c).value();
        kinds.push_back(t.compression.codec);
        specs.push_back(t);
      }
      auto ids = w.Declare(specs);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      std::vector<std::vector<float>> g(specs.size(), std::vector<float>(kN));
      for (uint64_t s = 1; s <= kSteps; ++s) {
        std::vector<Handle> hs;
        for (size_t t = 0; t < specs.size(); ++t) {
          for (int64_t i = 0; i < kN; ++i) g[t][i] = CodecGrad(kinds[t], w.rank(), s, i % 1024);
          hs.push_back(w.Push((*ids)[t], g[t].data()));
        }
        for (auto& h : hs) ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      }
      ASSERT_TRUE(w.Barrier("pushed", 30s).ok());
      for (size_t t = 0; t < specs.size(); ++t) {
        std::vector<float> out(kN);
        ASSERT_TRUE(w.Pull((*ids)[t], out.data()).Wait(30s).ok());
        for (int64_t i = 0; i < kN; ++i) {
          double e = 100.0;
          for (uint64_t s = 1; s <= kSteps; ++s)
            for (uint32_t r = 0; r < 3; ++r) e -= eta[r] * CodecGrad(kinds[t], r, s, i % 1024);
          ASSERT_EQ(out[i], static_cast<float>(e)) << codecs[t] << " element " << i;
        }
      }
    });
    lc->Finish();
  }
}

// ssp:1 with 3 workers, worker 2 slowed by 5 ms per step: a one-hot tensor reveals every
// worker's clock in each pull, and no pull ever misses an update older than the worker's clock
// minus K; a second tensor over 2 servers ends at exactly the sum of every push.
TEST_P(ClusterOver, SspStaysWithinItsBoundAndEndsExact) {
  CoordinatorOptions co = Opts(2, 3, Mode::kSsp, Aggregate::kSum, 4096);
  co.staleness = 1;
  auto lc = LocalCluster::Start(co, 16, GetParam());
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 3333;
  constexpr int64_t kSteps = 30, kK = 1;
  lc->ForEachWorker([&](Worker& w) {
    auto ids = w.Declare({Sgd1("clocks", 3, 0.0f), Sgd1("big", kN, 100.0f)});
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    std::vector<float> one_hot(3, 0.0f), clocks(3), g(kN), out(kN);
    one_hot[w.rank()] = 1.0f;
    for (int64_t s = 1; s <= kSteps; ++s) {
      if (w.rank() == 2) std::this_thread::sleep_for(5ms);
      for (int64_t i = 0; i < kN; ++i) g[i] = Grad(w.rank(), s, i);
      auto hb = w.Push((*ids)[1], g.data());
      auto h = w.PushPull((*ids)[0], one_hot.data(), clocks.data());
      ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      ASSERT_TRUE(hb.Wait(30s).ok());
      int64_t sum = 0;
      for (int j = 0; j < 3; ++j) {
        const auto c = static_cast<int64_t>(-clocks[j]);
        ASSERT_GE(c, s - kK - 1) << "worker " << w.rank() << " step " << s << " sees worker " << j;
        sum += c;
      }
      ASSERT_EQ(-clocks[w.rank()], static_cast<float>(s));
      ASSERT_EQ(h.version(), static_cast<uint64_t>(sum));
    }
    ASSERT_TRUE(w.Barrier("done", 30s).ok());
    ASSERT_TRUE(w.Pull((*ids)[1], out.data()).Wait(30s).ok());
    for (int64_t i = 0; i < kN; ++i) {
      double e = 100.0;
      for (int64_t s = 1; s <= kSteps; ++s)
        for (uint32_t r = 0; r < 3; ++r) e -= Grad(r, s, i);
      ASSERT_EQ(out[i], static_cast<float>(e)) << "element " << i;
    }
  });
  lc->Finish();
}

// A learning-rate schedule (Worker::SetLearningRate): every update uses the rate its pushes
// were issued with, from the next push on, in sync (the step's rate) and async (each push's
// own); rates that are powers of two keep the integer-valued sums exact. Bad rates are refused.
TEST_P(ClusterOver, LearningRateScheduleIsExact) {
  // The rate of step s; async: worker w's rate for its push s.
  auto rate = [](uint32_t w, uint64_t s, Mode mode) {
    const uint64_t k = mode == Mode::kSync ? s : s + w;
    return k % 3 == 0 ? 1.0f : k % 3 == 1 ? 0.5f : 0.25f;
  };
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    SCOPED_TRACE(ModeName(mode));
    auto lc = LocalCluster::Start(Opts(2, 3, mode, Aggregate::kSum, 4096), 16, GetParam());
    ASSERT_TRUE(lc);
    constexpr int64_t kN = 2500;  // 3 chunks over 2 servers
    constexpr uint64_t kSteps = 12;
    lc->ForEachWorker([&](Worker& w) {
      auto id = w.Declare(Sgd1("scheduled", kN, 100.0f));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      EXPECT_EQ(w.SetLearningRate(*id, -0.5f).code(), Status::Code::kInvalidArgument);
      EXPECT_EQ(w.SetLearningRate(*id, std::nanf("")).code(), Status::Code::kInvalidArgument);
      EXPECT_EQ(w.SetLearningRate(*id + 7, 0.5f).code(), Status::Code::kNotFound);
      std::vector<float> g(kN), out(kN);
      for (uint64_t s = 1; s <= kSteps; ++s) {
        ASSERT_TRUE(w.SetLearningRate(*id, rate(w.rank(), s, mode)).ok());
        for (int64_t i = 0; i < kN; ++i) g[i] = Grad(w.rank(), s, i);
        auto h = w.PushPull(*id, g.data(), out.data());
        ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
      }
      ASSERT_TRUE(w.Barrier("pushed", 30s).ok());
      ASSERT_TRUE(w.Pull(*id, out.data()).Wait(30s).ok());
      for (int64_t i = 0; i < kN; ++i) {
        double expect = 100.0;
        for (uint64_t s = 1; s <= kSteps; ++s)
          for (uint32_t r = 0; r < 3; ++r) expect -= rate(r, s, mode) * Grad(r, s, i);
        ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i;
      }
    });
    lc->Finish();
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, ClusterOver, ::testing::ValuesIn(Transports()),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '+', '_');
                           return name;
                         });

TEST(ClusterSync, ThousandSmallTensors) {
  auto lc = LocalCluster::Start(Opts(2, 2, Mode::kSync, Aggregate::kSum));
  ASSERT_TRUE(lc);
  lc->ForEachWorker([&](Worker& w) {
    std::vector<TensorSpec> specs;
    for (int k = 0; k < 1000; ++k) specs.push_back(Sgd1("s" + std::to_string(k), 1 + k % 100, k));
    auto ids = w.Declare(specs);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    std::vector<std::vector<float>> g(1000), out(1000);
    for (int step = 1; step <= 3; ++step) {
      std::vector<Handle> hs;
      for (int k = 0; k < 1000; ++k) {
        g[k].assign(1 + k % 100, static_cast<float>(w.rank() + step));
        out[k].assign(1 + k % 100, -1.0f);
        hs.push_back(w.PushPull((*ids)[k], g[k].data(), out[k].data()));
      }
      for (auto& h : hs) ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
      for (int k = 0; k < 1000; ++k) {
        // init k, minus per step (rank0 + step) + (rank1 + step) = 1 + 2 step
        float expect = static_cast<float>(k);
        for (int t = 1; t <= step; ++t) expect -= static_cast<float>(1 + 2 * t);
        for (float v : out[k]) ASSERT_EQ(v, expect) << "tensor " << k;
      }
    }
  });
  auto s0 = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
  auto s1 = nlohmann::json::parse(*lc->workers[0]->ServerStats(1));
  // Balanced by bytes: neither server holds much more than half.
  double b0 = s0["parameter_bytes"].get<double>(), b1 = s1["parameter_bytes"].get<double>();
  EXPECT_LT(std::abs(b0 - b1) / (b0 + b1), 0.05);
  lc->Finish();
}

// Operations on small tensors travel in batches (one request per server for what is issued
// close together, with or without a fuse delay): every push and pull of them went that way and
// none asked for a landing buffer; a worker that issues six steps without waiting runs ahead of
// the other (its pushes beyond the steps the servers sum ahead wait on the worker until the
// versions they follow are published); the values are exact.
TEST(ClusterSync, SmallTensorsTravelInBatchesExactly) {
  for (int delay_us : {0, 500}) {
    SCOPED_TRACE(delay_us);
    auto lc = LocalCluster::Start(
        Opts(2, 2, Mode::kSync, Aggregate::kSum), 16, "tcp", 1, nullptr,
        [&](WorkerOptions& o) { o.fuse_delay = std::chrono::microseconds(delay_us); });
    ASSERT_TRUE(lc);
    constexpr int kTensors = 300, kSteps = 6;
    lc->ForEachWorker([&](Worker& w) {
      std::vector<TensorSpec> specs;
      for (int k = 0; k < kTensors; ++k)
        specs.push_back(Sgd1("b" + std::to_string(k), 1 + k % 50, static_cast<float>(k)));
      auto ids = w.Declare(specs);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      std::vector<std::vector<std::vector<float>>> g(kSteps);
      for (int s = 0; s < kSteps; ++s)
        for (int k = 0; k < kTensors; ++k)
          g[s].emplace_back(1 + k % 50, static_cast<float>(w.rank() + s + 1));
      std::vector<Handle> hs;
      for (int s = 0; s < kSteps; ++s) {
        for (int k = 0; k < kTensors; ++k) hs.push_back(w.Push((*ids)[k], g[s][k].data()));
        if (w.rank() == 1) {  // step by step; worker 0 issues all six steps at once
          for (auto& h : hs) ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
          hs.clear();
        }
      }
      for (auto& h : hs) ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
      // Step t subtracts t + (1 + t) from every element.
      for (int k = 0; k < kTensors; ++k) {
        std::vector<float> out(1 + k % 50, -1.0f);
        auto h = w.Pull((*ids)[k], out.data());
        ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
        EXPECT_EQ(h.version(), static_cast<uint64_t>(kSteps));
        float expect = static_cast<float>(k);
        for (int t = 1; t <= kSteps; ++t) expect -= static_cast<float>(1 + 2 * t);
        for (float v : out) ASSERT_EQ(v, expect) << "tensor " << k;
      }
    });
    int64_t pushes = 0, pulls = 0, grants = 0, applied = 0, waits = 0;
    for (uint32_t s = 0; s < 2; ++s) {
      auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(s));
      pushes += st["batched_pushes"].get<int64_t>();
      pulls += st["batched_pulls"].get<int64_t>();
      grants += st["grant_requests"].get<int64_t>();
      applied += st["pushes_applied"].get<int64_t>();
      for (const auto& w : st["workers"]) waits += w["waits"].get<int64_t>();
    }
    // Worker 0's steps beyond the two the servers sum ahead waited on the worker, not parked on
    // a server with their batch's bytes.
    EXPECT_EQ(waits, 0);
    EXPECT_EQ(pushes, 2 * kTensors * kSteps);
    EXPECT_EQ(applied, 2 * kTensors * kSteps);
    EXPECT_EQ(pulls, 2 * kTensors);
    EXPECT_EQ(grants, 0);
    lc->Finish();
  }
}

// Operations that share a batch complete each on its own: worker 0's pushes of X and Y travel
// together (a 200 ms fuse delay holds them), and its X completes although worker 1 pushes Y
// only after seeing that.
TEST(ClusterSync, AnOperationInABatchDoesNotWaitForItsBatchMates) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum), 16, "tcp", 1, nullptr,
                                [](WorkerOptions& o) {
                                  if (o.rank == 0) o.fuse_delay = std::chrono::milliseconds(200);
                                });
  ASSERT_TRUE(lc);
  std::mutex mu;
  std::condition_variable cv;
  bool x_done = false;
  lc->ForEachWorker([&](Worker& w) {
    auto ids = w.Declare({Sgd1("x", 8, 0.0f), Sgd1("y", 8, 0.0f)});
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    std::vector<float> g(8, 1.0f);
    if (w.rank() == 0) {
      Handle hx = w.Push((*ids)[0], g.data());
      Handle hy = w.Push((*ids)[1], g.data());
      ASSERT_TRUE(hx.Wait(20s).ok());
      {
        std::lock_guard<std::mutex> lock(mu);
        x_done = true;
      }
      cv.notify_all();
      ASSERT_TRUE(hy.Wait(20s).ok());
    } else {
      ASSERT_TRUE(w.Push((*ids)[0], g.data()).Wait(20s).ok());
      {
        std::unique_lock<std::mutex> lock(mu);
        ASSERT_TRUE(cv.wait_for(lock, 20s, [&] { return x_done; }));
      }
      ASSERT_TRUE(w.Push((*ids)[1], g.data()).Wait(20s).ok());
    }
    std::vector<float> out(8);
    ASSERT_TRUE(w.Pull((*ids)[1], out.data()).Wait(20s).ok());
    for (float v : out) EXPECT_EQ(v, -2.0f);
  });
  lc->Finish();
}

// A worker that pushes several steps without waiting: steps ahead of the published version
// accumulate in their own buffers and are applied in order, exactly.
TEST(ClusterSync, PipelinedPushesAheadOfTheStepStayExact) {
  auto lc = LocalCluster::Start(Opts(1, 3, Mode::kSync, Aggregate::kSum, 4096));
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 3000;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("pipe", kN, 0.0f));
    ASSERT_TRUE(id.ok());
    std::vector<std::vector<float>> g(4, std::vector<float>(kN));
    for (int s = 0; s < 4; ++s)
      for (int64_t i = 0; i < kN; ++i) g[s][i] = Grad(w.rank(), s + 1, i);
    if (w.rank() == 0) {
      std::vector<Handle> hs;  // four steps in flight at once
      for (int s = 0; s < 4; ++s) hs.push_back(w.Push(*id, g[s].data()));
      for (auto& h : hs) ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
    } else {
      for (int s = 0; s < 4; ++s) ASSERT_TRUE(w.Push(*id, g[s].data()).Wait(30s).ok());
    }
    std::vector<float> out(kN);
    auto h = w.Pull(*id, out.data());
    ASSERT_TRUE(h.Wait(30s).ok()) << h.Wait(0ms).ToString();
    EXPECT_EQ(h.version(), 4u);
    for (int64_t i = 0; i < kN; ++i) {
      double expect = 0;
      for (uint64_t t = 1; t <= 4; ++t)
        for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
      ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i;
    }
  });
  lc->Finish();
}

// Pushes one after another need one grant round trip in all: every acknowledgement carries the
// landing buffer for the next push (each worker holds at most one; at most a quarter of the
// pool stands granted ahead), and the values stay exact.
TEST(ClusterSync, AcknowledgementsGrantTheNextLandingBuffer) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum), 8, "tcp+nobatch");
  ASSERT_TRUE(lc);
  constexpr int kSteps = 20;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("credit", 1000, 0.0f));
    ASSERT_TRUE(id.ok());
    std::vector<float> g(1000, 1.0f), out(1000);
    for (int s = 1; s <= kSteps; ++s)
      ASSERT_TRUE(w.PushPull(*id, g.data(), out.data()).Wait(30s).ok());
    for (float v : out) ASSERT_EQ(v, -2.0f * kSteps);
  });
  auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
  EXPECT_EQ(st["pushes_applied"].get<int>(), 2 * kSteps);
  EXPECT_EQ(st["grant_requests"].get<int>(), 2);  // each worker's first push only
  EXPECT_EQ(st["grants_ahead"].get<int>(), 2 * kSteps);
  lc->Finish();
}

// A landing pool of one buffer: pushes queue for the credit and all still land exactly.
TEST(ClusterSync, SingleLandingBufferBackpressure) {
  auto lc = LocalCluster::Start(Opts(1, 3, Mode::kSync, Aggregate::kSum, 1024), 1, "tcp+nobatch");
  ASSERT_TRUE(lc);
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("big", 5000, 0.0f));  // 20 chunks through one buffer
    ASSERT_TRUE(id.ok());
    std::vector<float> g(5000, 1.0f), out(5000);
    for (int s = 1; s <= 5; ++s) ASSERT_TRUE(w.PushPull(*id, g.data(), out.data()).Wait(30s).ok());
    for (float v : out) ASSERT_EQ(v, -15.0f);
  });
  auto st = nlohmann::json::parse(*lc->workers[0]->ServerStats(0));
  EXPECT_GT(st["grants_waited"].get<int>(), 0);
  EXPECT_EQ(st["grants_ahead"].get<int>(), 0);  // a pool this small grants nothing ahead
  EXPECT_EQ(st["landing_buffers"].get<int>(), 1);
  lc->Finish();
}

TEST(ClusterErrors, BadDeclarationsAreRefusedClearly) {
  auto lc = LocalCluster::Start(Opts(1, 1, Mode::kSync, Aggregate::kSum));
  ASSERT_TRUE(lc);
  Worker& w = *lc->workers[0];
  TensorSpec bad = Sgd1("x", 10, 0);
  bad.shape = {0};
  EXPECT_TRUE(w.Declare(bad).status().IsInvalidArgument());
  bad = Sgd1("", 10, 0);
  EXPECT_TRUE(w.Declare(bad).status().IsInvalidArgument());
  bad = Sgd1("y", 10, 0);
  bad.optimizer.lr = -1;
  EXPECT_TRUE(w.Declare(bad).status().IsInvalidArgument());
  // Compression: a pull codec that is not fp16/bf16, and a block so small that a full chunk's
  // encoding would not fit a landing buffer (4 MiB chunks: 5 bytes per element with block 1).
  bad = Sgd1("c1", 10, 0);
  bad.pull_codec = Codec::kInt8;
  auto st = w.Declare(bad).status();
  EXPECT_TRUE(st.IsInvalidArgument());
  EXPECT_NE(st.message().find("tensor 'c1'"), std::string::npos) << st.ToString();
  bad = Sgd1("c2", 2 << 20, 0);
  bad.compression = Compression::Parse("int8:block=1").value();
  st = w.Declare(bad).status();
  EXPECT_TRUE(st.IsInvalidArgument());
  EXPECT_NE(st.message().find("landing buffer"), std::string::npos) << st.ToString();
  bad.compression = Compression::Parse("int8:block=2").value();  // 3 bytes per element: fits
  EXPECT_TRUE(w.Declare(bad).ok());
  ASSERT_TRUE(w.Declare(Sgd1("z", 10, 0)).ok());
  EXPECT_FALSE(w.Declare(Sgd1("z", 10, 0)).ok());
  EXPECT_TRUE(w.Push(12345, nullptr).Wait(1s).IsNotFound());
  lc->Finish();
}

TEST(ClusterErrors, ShapeMismatchAcrossWorkersIsRefused) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum));
  ASSERT_TRUE(lc);
  ASSERT_TRUE(lc->workers[0]->Declare(Sgd1("m", 10, 0)).ok());
  auto r = lc->workers[1]->Declare(Sgd1("m", 11, 0));
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("10 elements"), std::string::npos) << r.status().ToString();
  lc->Finish();
}

TEST(ClusterErrors, MissingNodeFailsRegistrationNamingIt) {
  CoordinatorOptions co = Opts(1, 2, Mode::kSync, Aggregate::kSum);
  co.register_timeout = 1500ms;
  auto c = Coordinator::Start(co);
  ASSERT_TRUE(c.ok());
  WorkerOptions wo;
  wo.coordinator = (*c)->address();
  wo.register_timeout = 10s;
  auto t0 = std::chrono::steady_clock::now();
  auto w = Worker::Connect(wo);  // server 0 and worker 1 never come
  EXPECT_FALSE(w.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 8s);
  Status st = (*c)->Wait(1s);
  EXPECT_TRUE(st.IsTimeout()) << st.ToString();
  EXPECT_NE(st.message().find("server 0"), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find("worker 1"), std::string::npos) << st.ToString();
}

TEST(ClusterErrors, BarrierTimeoutNamesTheAbsentWorker) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum));
  ASSERT_TRUE(lc);
  Status st = lc->workers[0]->Barrier("lonely", 500ms);
  EXPECT_TRUE(st.IsTimeout()) << st.ToString();
  EXPECT_NE(st.message().find("worker(s) 1"), std::string::npos) << st.ToString();
  lc->Finish();
}

}  // namespace
}  // namespace shardps
