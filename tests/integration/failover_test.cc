// Replication and failover (docs/fault-tolerance.md): every chunk has a backup on another
// server, a push is acknowledged once both hold it, and a server that goes away mid-job is
// replaced by its chunks' backups while the workers go on. Integer-valued pushes: the final
// parameters equal exactly the initial ones minus every push, so nothing acknowledged was lost
// and nothing was applied twice.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/testing.h"
#include "support/exact_values.h"
#include "support/http_get.h"
#include "support/local_cluster.h"
#include "transport/context.h"
#include "worker/testing.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::Grad;
using testing::LocalCluster;
using testing::Opts;
using testing::Sgd1;

// One small tensor (one chunk: it travels in batches unless they are off) and one of five
// chunks of 1024 floats (landing buffers).
const std::vector<int64_t> kSizes = {1000, 5000};
constexpr uint64_t kChunkBytes = 4096;
constexpr size_t kChunks = 6;

struct Param {
  std::string transport;
  Mode mode;
  std::string device = "cpu";  // the servers' --device: "twin" runs the device update rule
  uint32_t per_node = 1;       // workers per node: 2 reduce on their node, which pushes
};

// Every worker stops before a step (none has pushed it: no sync step is open, nothing is in
// flight); worker 0 runs `act` once all are there, the others wait until it is done. Bounded.
class Meeting {
 public:
  explicit Meeting(size_t workers) : workers_(static_cast<int>(workers)) {}
  void At(uint32_t rank, const std::function<void(std::chrono::steady_clock::time_point)>& act) {
    arrived_++;
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    if (rank != 0) {
      while (!done_.load() && std::chrono::steady_clock::now() < deadline + 60s)
        std::this_thread::sleep_for(5ms);
      EXPECT_TRUE(done_.load());
      return;
    }
    while (arrived_.load() < workers_ && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(5ms);
    act(deadline);
    done_ = true;
  }

 private:
  const int workers_;
  std::atomic<int> arrived_{0};
  std::atomic<bool> done_{false};
};

// The coordinator's metrics without the nodes' (whose HTTP servers take seconds to stop).
std::function<void(ServerOptions&)> NoNodeMetrics() {
  return [](ServerOptions& so) { so.metrics_listen.clear(); };
}
std::function<void(WorkerOptions&)> NoNodeMetricsW() {
  return [](WorkerOptions& wo) { wo.metrics_listen.clear(); };
}

class Failover : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    const std::string& t = GetParam().transport;
    auto v = transport::CheckViability(t.substr(0, t.find('+')));
    if (!v.viable) GTEST_SKIP() << t << ": " << v.reason;
  }

  static CoordinatorOptions Job(uint32_t servers, uint32_t workers) {
    CoordinatorOptions co = Opts(servers, workers, GetParam().mode, Aggregate::kSum, kChunkBytes);
    co.replicas = 1;
    co.heartbeat_timeout = 2s;
    if (co.mode == Mode::kSsp) co.staleness = 2;
    return co;
  }

  // Every worker pushes `steps` integer-valued gradients into each tensor (push_pull in sync
  // mode, checking each step's version; push in async mode), calling `at(worker, step)` before
  // each step. Then, once every worker is done, each pulls and checks the exact sum.
  static void Run(LocalCluster& lc, uint64_t steps,
                  const std::function<void(uint32_t, uint64_t)>& at = nullptr) {
    const auto workers = static_cast<uint32_t>(lc.workers.size());
    const float init = 100.0f;
    lc.ForEachWorker([&](Worker& w) {
      std::vector<TensorSpec> specs;
      for (size_t k = 0; k < kSizes.size(); ++k)
        specs.push_back(Sgd1("t" + std::to_string(k), kSizes[k], init));
      auto ids = w.Declare(specs);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      std::vector<std::vector<float>> grad(kSizes.size()), out(kSizes.size());
      for (size_t k = 0; k < kSizes.size(); ++k) {
        grad[k].resize(kSizes[k]);
        out[k].resize(kSizes[k]);
      }
      const bool sync = w.mode() == Mode::kSync;
      for (uint64_t s = 1; s <= steps; ++s) {
        if (at) at(w.rank(), s);
        std::vector<Handle> hs;
        for (size_t k = 0; k < kSizes.size(); ++k) {
          for (int64_t i = 0; i < kSizes[k]; ++i) grad[k][i] = Grad(w.rank(), s, i);
          hs.push_back(sync ? w.PushPull((*ids)[k], grad[k].data(), out[k].data())
                            : w.Push((*ids)[k], grad[k].data()));
        }
        for (auto& h : hs) {
          Status st = h.Wait(60s);
          ASSERT_TRUE(st.ok()) << "worker " << w.rank() << " step " << s << ": " << st.ToString();
          if (sync) {
            ASSERT_EQ(h.version(), s) << "worker " << w.rank();
          }
        }
      }
      ASSERT_TRUE(w.Barrier("pushed", 60s).ok());
      for (size_t k = 0; k < kSizes.size(); ++k) {
        auto h = w.Pull((*ids)[k], out[k].data());
        ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
        for (int64_t i = 0; i < kSizes[k]; ++i) {
          double expect = init;
          for (uint64_t t = 1; t <= steps; ++t)
            for (uint32_t ww = 0; ww < workers; ++ww) expect -= Grad(ww, t, i);
          ASSERT_EQ(out[k][i], static_cast<float>(expect))
              << "tensor " << k << " element " << i << " (worker " << w.rank() << ")";
        }
      }
    });
  }

  // Node-level reduction (docs/node-reduction.md): workers 2n and 2n+1 are node n, which pushes.
  static std::function<void(WorkerOptions&)> Nodes() {
    const uint32_t k = GetParam().per_node;
    if (k == 1) return nullptr;
    return [k](WorkerOptions& o) {
      o.local_size = k;
      o.local_rank = o.rank % static_cast<int32_t>(k);
      o.node = "node" + std::to_string(o.rank / static_cast<int32_t>(k));
    };
  }
  // Pushes per chunk and step: one per worker, or per node.
  static uint64_t Pushers(uint32_t workers) { return workers / GetParam().per_node; }
  // Whether the job's primaries forward each sync step's sum rather than each push (two pushers
  // or more, on the CPU: docs/fault-tolerance.md, "A push").
  static bool ByStep() {
    return GetParam().mode == Mode::kSync && GetParam().device == "cpu" && GetParam().per_node == 1;
  }

  // The servers' device (docs/gpu.md): the chunks' owner is then the device rule.
  static std::function<void(ServerOptions&)> Device() {
    const std::string d = GetParam().device;
    return [d](ServerOptions& so) { so.device = d; };
  }

  // Whether every chunk on `servers` has a backup again, as they count it and as every worker
  // does (the coordinator counted it and the worker attached to it).
  static bool Backed(LocalCluster& lc, const std::vector<uint32_t>& servers) {
    for (uint32_t s : servers) {
      auto j = lc.workers[0]->ServerStats(s);
      if (!j.ok() || nlohmann::json::parse(*j)["unbacked_chunks"] != 0) return false;
    }
    for (auto& w : lc.workers)
      if (w->stats().unbacked_chunks != 0) return false;
    return true;
  }

  static nlohmann::json Stats(Worker& w, uint32_t server) {
    auto j = w.ServerStats(server);
    EXPECT_TRUE(j.ok()) << j.status().ToString();
    return j.ok() ? nlohmann::json::parse(*j) : nlohmann::json::object();
  }
};

// No failure: every push is forwarded once and applied by both copies; every server holds its
// share of primaries and backups.
TEST_P(Failover, EveryPushIsHeldByBothCopies) {
  auto lc = LocalCluster::Start(Job(3, 2), 16, GetParam().transport, 1, Device(), Nodes());
  ASSERT_TRUE(lc);
  constexpr uint64_t kSteps = 20;
  Run(*lc, kSteps);
  uint64_t forwarded = 0, copied = 0, taken = 0, applied = 0, chunks = 0, steps = 0,
           steps_taken = 0, sums = 0;
  for (uint32_t s = 0; s < 3; ++s) {
    auto j = Stats(*lc->workers[0], s);
    forwarded += j["replicated_pushes"].get<uint64_t>();
    copied += j["replicated_copied"].get<uint64_t>();
    steps += j["replicated_steps"].get<uint64_t>();
    steps_taken += j["replica_steps"].get<uint64_t>();
    sums += j["step_sums_allocated"].get<uint64_t>();
    taken += j["replica_pushes"].get<uint64_t>();
    applied += j["pushes_applied"].get<uint64_t>();
    chunks += j["chunks"].get<uint64_t>();
    EXPECT_EQ(j["shard_map_epoch"], 0);
  }
  const uint64_t pushes = Pushers(2) * kSteps * kChunks;
  EXPECT_EQ(chunks, 2 * kChunks);  // a primary and a backup each
  // sync with two pushers on the CPU: each step's sum goes to the backup, not each push.
  EXPECT_EQ(steps, ByStep() ? kSteps * kChunks : 0);
  EXPECT_EQ(steps_taken, steps);
  if (ByStep()) {
    EXPECT_EQ(forwarded, 0u);
    EXPECT_EQ(taken, 0u);
    EXPECT_EQ(applied, 2 * pushes);  // a backup counts a step's pushes as applied
    // A step's sum comes back once the backup has it and serves a later step: printed, and
    // fewer than one per step (a sum per step was allocated before they came back).
    std::printf("step sums allocated: %llu for %llu steps\n", static_cast<unsigned long long>(sums),
                static_cast<unsigned long long>(steps));
    EXPECT_LT(sums, steps);
    lc->Finish();
    return;
  }
  EXPECT_EQ(forwarded, pushes);
  // Without batches every push landed in a landing buffer and went on from there: a server's
  // share of them in flight (at most 2 chunks x 2 pushers) is far below half its 16 buffers.
  if (GetParam().transport.find("+nobatch") != std::string::npos) {
    EXPECT_EQ(copied, 0u);
  } else {
    EXPECT_LE(copied, forwarded);
  }
  EXPECT_EQ(taken, pushes);
  EXPECT_EQ(applied, 2 * pushes);
  lc->Finish();
}

// The connections over which server 0 forwards pushes to its chunks' backups close twice in the
// job while every server lives (a reset link). Server 0 reopens them and sends the pushes that
// were waiting on them again: every push is acknowledged, the parameters are exact, and each
// copy applied each push once (a resend the backup had already applied is recognised).
TEST_P(Failover, AClosedLinkToTheBackupIsReopenedAndNothingIsLost) {
  auto lc = LocalCluster::Start(Job(3, 2), 16, GetParam().transport, 1, Device(), Nodes());
  ASSERT_TRUE(lc);
  constexpr uint64_t kSteps = 20;
  Run(*lc, kSteps, [&](uint32_t worker, uint64_t step) {
    if (worker == 0 && (step == 7 || step == 14))
      server::CloseReplicationLinksForTest(*lc->servers[0], true);
  });
  uint64_t applied = 0, taken = 0, steps_taken = 0;
  for (uint32_t s = 0; s < 3; ++s) {
    auto j = Stats(*lc->workers[0], s);
    applied += j["pushes_applied"].get<uint64_t>();
    taken += j["replica_pushes"].get<uint64_t>();
    steps_taken += j["replica_steps"].get<uint64_t>();
    EXPECT_EQ(j["shard_map_epoch"], 0);
    EXPECT_EQ(j["promoted_chunks"], 0);
  }
  const uint64_t pushes = Pushers(2) * kSteps * kChunks;
  EXPECT_EQ(applied, 2 * pushes);  // once on each copy
  if (ByStep()) {
    EXPECT_GE(steps_taken, kSteps * kChunks);  // resends included
  } else {
    EXPECT_GE(taken, pushes);
  }
  EXPECT_GE(Stats(*lc->workers[0], 0)["replica_links_reopened"].get<uint64_t>(), 1u);
  lc->Finish();
}

// A server goes away in the middle of the job (its process ends: every connection of it
// closes). The coordinator declares it dead, its chunks' backups take over, the workers send
// what was not acknowledged again, and the job ends with the exact sum of every push.
TEST_P(Failover, AServerGoesAwayAndTheJobGoesOn) {
  auto lc = LocalCluster::Start(Job(3, 2), 16, GetParam().transport, 1, Device(), Nodes());
  ASSERT_TRUE(lc);
  constexpr uint64_t kSteps = 40;
  std::atomic<bool> killed{false};
  std::thread killer;
  Run(*lc, kSteps, [&](uint32_t rank, uint64_t step) {
    if (rank == 0 && step == 15 && !killed.exchange(true))
      killer = std::thread([&] { lc->servers[1].reset(); });
  });
  if (killer.joinable()) killer.join();
  for (uint32_t s : {0u, 2u}) {
    auto j = Stats(*lc->workers[0], s);
    EXPECT_EQ(j["shard_map_epoch"], 1) << "server " << s;
  }
  uint64_t promoted = 0;
  for (uint32_t s : {0u, 2u})
    promoted += Stats(*lc->workers[1], s)["promoted_chunks"].get<uint64_t>();
  EXPECT_GT(promoted, 0u);
  lc->Finish();
}

// A server dies while the workers declare their tensors (docs/fault-tolerance.md, "A declare
// under way"): worker 0 is about to create its chunks on server 1 when server 1 is killed. The
// declare goes on with each chunk's other copy (a backup created before the death was promoted,
// one created after it serves the chunk from the start), every chunk that lost a copy gets a new
// backup (an order that reached its primary before the chunk did waits for it), and the job ends
// with the exact sum of every push.
TEST_P(Failover, AServerDiesWhileTheChunksAreCreated) {
  auto lc = LocalCluster::Start(Job(3, 2), 16, GetParam().transport, 1, Device(), Nodes());
  ASSERT_TRUE(lc);
  std::atomic<bool> killed{false};
  worker::BeforeCreateForTest(*lc->workers[0], [&](uint32_t server) {
    if (server == 1 && !killed.exchange(true)) lc->servers[1].reset();
  });
  Run(*lc, 10);
  EXPECT_TRUE(killed.load());
  auto backed = [&] { return Backed(*lc, {0, 2}); };
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!backed() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(backed()) << "the chunks that lost a copy have no new backup 60 s after the death";
  uint64_t chunks = 0;
  for (uint32_t s : {0u, 2u}) {
    auto j = Stats(*lc->workers[0], s);
    EXPECT_EQ(j["shard_map_epoch"], 1) << "server " << s;
    chunks += j["chunks"].get<uint64_t>();
  }
  EXPECT_EQ(chunks, 2 * kChunks);  // two copies of each again
  lc->Finish();
}

// Two servers go away one after the other (docs/fault-tolerance.md, "New backups"). After the
// first death, every chunk left with one copy gets a new backup on a survivor (its primary copies
// it there while the workers go on); the workers then meet at step 20, and the second server is
// killed: every chunk still has a copy, and the job ends with the exact sum of every push.
TEST_P(Failover, TwoServersDieOneAfterTheOtherWithNewBackupsMadeInBetween) {
  auto lc = LocalCluster::Start(Job(3, 2), 16, GetParam().transport, 1, Device(), Nodes());
  ASSERT_TRUE(lc);
  constexpr uint64_t kSteps = 30;
  std::atomic<bool> first{false};
  Meeting meeting(lc->workers.size());
  std::thread killer;
  auto backed = [&] { return Backed(*lc, {0, 2}); };
  Run(*lc, kSteps, [&](uint32_t rank, uint64_t step) {
    if (rank == 0 && step == 8 && !first.exchange(true))
      killer = std::thread([&] { lc->servers[1].reset(); });
    if (step != 20) return;
    meeting.At(rank, [&](auto deadline) {
      if (killer.joinable()) killer.join();
      while (!backed() && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(20ms);
      EXPECT_TRUE(backed()) << "the chunks have no new backups 60 s after the failover";
      lc->servers[2].reset();
    });
  });
  if (killer.joinable()) killer.join();
  auto j = Stats(*lc->workers[0], 0);
  EXPECT_EQ(j["shard_map_epoch"], 2);
  EXPECT_EQ(j["unbacked_chunks"], kChunks);  // one server left: nowhere to put a backup
  EXPECT_EQ(lc->workers[0]->stats().unbacked_chunks, kChunks);
  lc->Finish();
}

// A server that joins the running job (docs/fault-tolerance.md, "A server that joins"): of 2
// servers, server 1 dies and server 0 is left with the only copy of every chunk; a new server
// process joins, is given rank 2 and becomes the backup of every chunk; then server 0 dies too,
// and the job ends on the new server alone. Exact sums: nothing acknowledged lost, nothing
// applied twice.
TEST_P(Failover, ANewServerTakesADeadOnesPlaceAndTheNextDeathIsSurvived) {
  auto lc = LocalCluster::Start(Job(2, 2), 16, GetParam().transport, 1, Device(), Nodes());
  ASSERT_TRUE(lc);
  constexpr uint64_t kSteps = 24;
  std::atomic<bool> first{false};
  Meeting meeting(lc->workers.size());
  std::thread killer;
  std::unique_ptr<Server> joined;
  auto stat = [&](uint32_t server, const char* key) -> int64_t {
    auto j = lc->workers[0]->ServerStats(server);
    if (!j.ok()) return -1;
    auto js = nlohmann::json::parse(*j);
    return js.contains(key) ? js[key].get<int64_t>() : -1;
  };
  // Server 1 dies once every worker declared its tensors (in async mode worker 0 may be at step
  // 6 before worker 1 has: a declare is not sent again after a failover).
  std::atomic<size_t> declared{0};
  Run(*lc, kSteps, [&](uint32_t rank, uint64_t step) {
    if (step == 1) declared++;
    if (rank == 0 && step == 6 && !first.exchange(true)) {
      const auto until = std::chrono::steady_clock::now() + 60s;
      while (declared.load() < lc->workers.size() && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(5ms);
      killer = std::thread([&] { lc->servers[1].reset(); });
    }
    if (step != 12) return;
    meeting.At(rank, [&](auto deadline) {
      if (killer.joinable()) killer.join();
      while (stat(0, "shard_map_epoch") != 1 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(5ms);
      EXPECT_EQ(stat(0, "unbacked_chunks"), static_cast<int64_t>(kChunks));
      auto s = lc->start_server(-1);
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      if (s.ok()) joined = std::move(s).value();
      // Every live node reached it before it was given chunks: worker 0 knows it.
      auto workers_unbacked = [&] {
        uint64_t n = 0;
        for (auto& w : lc->workers) n += w->stats().unbacked_chunks;
        return n;
      };
      while ((lc->workers[0]->num_servers() < 3 || stat(0, "unbacked_chunks") != 0 ||
              stat(2, "replicas_installed") != static_cast<int64_t>(kChunks) ||
              workers_unbacked() != 0) &&
             std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(10ms);
      EXPECT_EQ(stat(0, "unbacked_chunks"), 0) << "no new backups 60 s after the server joined";
      EXPECT_EQ(stat(2, "replicas_installed"), static_cast<int64_t>(kChunks));
      EXPECT_EQ(workers_unbacked(), 0u) << "the workers did not attach to the new backups";
      lc->servers[0].reset();
    });
  });
  if (killer.joinable()) killer.join();
  EXPECT_EQ(lc->workers[0]->num_servers(), 3u);
  EXPECT_EQ(stat(2, "shard_map_epoch"), 2);
  EXPECT_EQ(stat(2, "promoted_chunks"), static_cast<int64_t>(kChunks));
  EXPECT_EQ(stat(2, "unbacked_chunks"), static_cast<int64_t>(kChunks));  // the last server
  EXPECT_EQ(lc->workers[0]->stats().unbacked_chunks, kChunks);
  lc->servers.push_back(std::move(joined));
  lc->Finish();
}

// With two servers, the survivor of one death has nowhere to put new backups: a second death
// leaves chunks with no copy, and the job fails with an error naming one.
TEST(FailoverLimits, ASecondDeathThatLeavesAChunkWithoutACopyFailsTheJobNamingIt) {
  CoordinatorOptions co = Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  auto lc = LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  Worker& w = *lc->workers[0];
  auto id = w.Declare(Sgd1("t", 20000, 0.0f));  // 20 chunks on both servers
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::vector<float> g(20000, 1.0f);
  ASSERT_TRUE(w.Push(*id, g.data()).Wait(60s).ok());
  lc->servers[1].reset();
  ASSERT_TRUE(w.Push(*id, g.data()).Wait(60s).ok());  // after the failover: served by backups
  lc->servers[0].reset();
  Status job = lc->coordinator->Wait(20s);
  EXPECT_FALSE(job.ok());
  EXPECT_NE(job.message().find("has no live copy left"), std::string::npos) << job.ToString();
  EXPECT_NE(job.message().find("server 0"), std::string::npos) << job.ToString();
  EXPECT_FALSE(w.Push(*id, g.data()).Wait(60s).ok());
}

// A server joins a running job only where it can: one without backups, or asking for a rank
// the job has, is refused with the reason.
TEST(FailoverLimits, AServerJoinIsRefusedWhereItCannotBe) {
  {
    auto lc = LocalCluster::Start(Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes));
    ASSERT_TRUE(lc);
    auto s = lc->start_server(-1);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.status().message().find("only when it keeps backups"), std::string::npos)
        << s.status().ToString();
    lc->Finish();
  }
  CoordinatorOptions co = Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  auto lc = LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  auto s = lc->start_server(1);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("server rank 1 is taken"), std::string::npos)
      << s.status().ToString();
  lc->Finish();
}

// A server that joins but that the others cannot reach (it gives an address nobody listens on)
// is declared dead without having been given anything: the job goes on as it was, and the
// chunks of a tensor declared later are placed on the servers it had.
TEST(FailoverLimits, AServerThatCannotBeReachedDoesNotJoin) {
  CoordinatorOptions co = Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  auto lc = LocalCluster::Start(co, 16, "tcp", 1, [](ServerOptions& so) {
    if (so.rank < 0) so.advertise = "127.0.0.2";  // loopback, where it does not listen
  });
  ASSERT_TRUE(lc);
  Worker& w = *lc->workers[0];
  auto a = w.Declare(Sgd1("a", 8000, 0.0f));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  std::vector<float> g(8000, 1.0f), out(8000);
  ASSERT_TRUE(w.Push(*a, g.data()).Wait(60s).ok());
  auto s = lc->start_server(-1);  // it registers and starts; the others cannot reach it
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  Status st = (*s)->Wait(30s);
  EXPECT_FALSE(st.ok());  // its coordinator closed its connection: declared dead
  EXPECT_EQ(w.num_servers(), 2u);
  auto b = w.Declare(Sgd1("b", 8000, 0.0f));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  for (TensorId id : {*a, *b}) ASSERT_TRUE(w.Push(id, g.data()).Wait(60s).ok());
  ASSERT_TRUE(w.Pull(*a, out.data()).Wait(60s).ok());
  EXPECT_EQ(out[0], -2.0f);
  ASSERT_TRUE(w.Pull(*b, out.data()).Wait(60s).ok());
  EXPECT_EQ(out[7999], -1.0f);
  lc->Finish();
}

// A server that joins a job from which a worker was removed (--on-worker-loss continue) takes
// the tensors declared after it (its chunks' sync steps do not wait for the removed worker: the
// register reply names it), and the workers declare them with placements on a rank past the view
// they registered with.
TEST(FailoverLimits, AServerThatJoinsAfterAWorkerWasRemovedTakesTheNewTensors) {
  CoordinatorOptions co = Opts(2, 3, Mode::kSync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  co.continue_on_worker_loss = true;
  co.metrics_listen = "127.0.0.1:0";  // the coordinator's only (the nodes' take seconds to stop)
  auto lc = LocalCluster::Start(co, 16, "tcp", 1, NoNodeMetrics(), NoNodeMetricsW());
  ASSERT_TRUE(lc);
  worker::DieWithoutGoodbyeForTest(lc->workers[2]);
  auto joined = lc->start_server(-1);
  ASSERT_TRUE(joined.ok()) << joined.status().ToString();
  // In service once every live node reached it: the coordinator counts it.
  ASSERT_EQ(testing::WaitForSample(lc->coordinator->metrics_address(),
                                   "shardps_coordinator_servers_joined_total", 1.0, 30s),
            1.0);
  EXPECT_EQ(lc->workers[0]->num_servers(), 3u);
  EXPECT_EQ(lc->workers[1]->num_servers(), 3u);
  constexpr int64_t kN = 3072;  // 3 chunks
  constexpr uint64_t kSteps = 4;
  std::vector<std::thread> ts;
  for (uint32_t r = 0; r < 2; ++r)
    ts.emplace_back([&, r] {
      Worker& w = *lc->workers[r];
      auto id = w.Declare(Sgd1("late", kN, 0.0f));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      std::vector<float> g(kN), out(kN);
      for (uint64_t s = 1; s <= kSteps; ++s) {
        for (int64_t i = 0; i < kN; ++i) g[i] = Grad(r, s, i);
        Handle h = w.PushPull(*id, g.data(), out.data());
        ASSERT_TRUE(h.Wait(30s).ok())
            << "worker " << r << " step " << s << ": " << h.Wait(0ms).ToString();
        ASSERT_EQ(h.version(), s);
      }
      for (int64_t i = 0; i < kN; ++i) {
        double expect = 0;
        for (uint64_t t = 1; t <= kSteps; ++t)
          for (uint32_t ww = 0; ww < 2; ++ww) expect -= Grad(ww, t, i);
        ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i;
      }
    });
  for (auto& t : ts) t.join();
  // The new server holds some of the new chunks (it was the least loaded).
  auto js = lc->workers[0]->ServerStats(2);
  ASSERT_TRUE(js.ok()) << js.status().ToString();
  EXPECT_GT(nlohmann::json::parse(*js)["chunks"].get<int64_t>(), 0) << *js;
  for (uint32_t r = 0; r < 2; ++r) EXPECT_TRUE(lc->workers[r]->Finish().ok());
  EXPECT_TRUE(lc->coordinator->Wait(10s).ok());
  EXPECT_TRUE((*joined)->Wait(10s).ok());
}

// Two servers that register to join at once join one after the other: ranks 2 and 3, each
// reached by every live node before the next one is let in.
TEST(FailoverLimits, ServersThatJoinAtOnceJoinInTurn) {
  CoordinatorOptions co = Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  co.metrics_listen = "127.0.0.1:0";  // the coordinator's only (the nodes' take seconds to stop)
  auto lc = LocalCluster::Start(co, 16, "tcp", 1, NoNodeMetrics(), NoNodeMetricsW());
  ASSERT_TRUE(lc);
  auto a = std::async(std::launch::async, [&] { return lc->start_server(-1); });
  auto b = std::async(std::launch::async, [&] { return lc->start_server(-1); });
  auto sa = a.get();
  auto sb = b.get();
  ASSERT_TRUE(sa.ok()) << sa.status().ToString();
  ASSERT_TRUE(sb.ok()) << sb.status().ToString();
  EXPECT_EQ(std::min((*sa)->rank(), (*sb)->rank()), 2u);
  EXPECT_EQ(std::max((*sa)->rank(), (*sb)->rank()), 3u);
  EXPECT_EQ(testing::WaitForSample(lc->coordinator->metrics_address(),
                                   "shardps_coordinator_servers_joined_total", 2.0, 30s),
            2.0);
  EXPECT_EQ(lc->workers[0]->num_servers(), 4u);
  // A tensor declared now is spread over the four (each the least loaded in turn).
  Worker& w = *lc->workers[0];
  auto id = w.Declare(Sgd1("t", 4096, 0.0f));  // 4 chunks, each with a backup
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::vector<float> g(4096, 1.0f), out(4096);
  ASSERT_TRUE(w.Push(*id, g.data()).Wait(30s).ok());
  ASSERT_TRUE(w.Pull(*id, out.data()).Wait(30s).ok());
  for (float v : out) ASSERT_EQ(v, -1.0f);
  for (uint32_t s = 0; s < 4; ++s) {
    auto js = w.ServerStats(s);
    ASSERT_TRUE(js.ok()) << js.status().ToString();
    EXPECT_EQ(nlohmann::json::parse(*js)["chunks"].get<int64_t>(), 2) << "server " << s;
  }
  lc->servers.push_back(std::move(*sa));
  lc->servers.push_back(std::move(*sb));
  lc->Finish();
}

// A backup that lives but cannot be reached (the link closed and stays closed) and is not
// declared dead: a push waiting for it fails within 2 * the failover timeout + 1 s, naming it,
// rather than waiting for ever.
TEST(FailoverLimits, APushWhoseLiveBackupCannotBeReachedFailsInBoundedTime) {
  CoordinatorOptions co = Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  co.failover_timeout = 1s;
  auto lc = LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  Worker& w = *lc->workers[0];
  auto id = w.Declare(Sgd1("t", 8000, 0.0f));  // 2 chunks: one primary on each server
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  std::vector<float> g(8000, 1.0f);
  ASSERT_TRUE(w.Push(*id, g.data()).Wait(60s).ok());
  server::CloseReplicationLinksForTest(*lc->servers[0], false);
  const auto t0 = std::chrono::steady_clock::now();
  Status st = w.Push(*id, g.data()).Wait(60s);
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("could not reach server 1, the backup"), std::string::npos)
      << st.ToString();
  EXPECT_LT(waited, 15s);  // the bound is 3 s; waiting for a failover would take 21 s
  server::CloseReplicationLinksForTest(*lc->servers[0], true);
}

// Forwarded pushes are sent from their landing buffers, which stay out of the pool until the
// backup answered: in sync mode that is once the step is complete on both copies, which needs
// the other workers' pushes to land. With 2 landing buffers per server (one may be leased) and
// 3 workers pushing 8 chunks at once, every step still completes with the exact sum. The
// servers run the device rule (its host twin): there sync pushes, not steps, are forwarded.
TEST(FailoverLimits, TwoLandingBuffersCarryEverySyncStepWithBackups) {
  CoordinatorOptions co = Opts(2, 3, Mode::kSync, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  auto lc =
      LocalCluster::Start(co, 2, "tcp+nobatch", 1, [](ServerOptions& so) { so.device = "twin"; });
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 8 * 1024;  // 8 chunks: 4 primaries on each server
  constexpr uint64_t kSteps = 10;
  const float init = 100.0f;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("t", kN, init));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    std::vector<float> g(kN), out(kN);
    for (uint64_t s = 1; s <= kSteps; ++s) {
      for (int64_t i = 0; i < kN; ++i) g[i] = Grad(w.rank(), s, i);
      auto h = w.PushPull(*id, g.data(), out.data());
      Status st = h.Wait(60s);
      ASSERT_TRUE(st.ok()) << "worker " << w.rank() << " step " << s << ": " << st.ToString();
      ASSERT_EQ(h.version(), s);
      for (int64_t i = 0; i < kN; ++i) {
        double expect = init;
        for (uint64_t t = 1; t <= s; ++t)
          for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
        ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i << " step " << s;
      }
    }
  });
  uint64_t forwarded = 0;
  for (uint32_t s = 0; s < 2; ++s) {
    auto j = lc->workers[0]->ServerStats(s);
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    auto stats = nlohmann::json::parse(*j);
    forwarded += stats["replicated_pushes"].get<uint64_t>();
    EXPECT_EQ(stats["landing_buffers"], 2);
  }
  EXPECT_EQ(forwarded, 3 * kSteps * 8);
  lc->Finish();
}

// ssp with replicas: a worker that leaves early (says goodbye; its connections close) holds
// back neither the primaries (they see its connection close) nor the backups (they hear of its
// pushes only through the primaries): the other worker runs far past its clock, every push
// acknowledged, and the sum is exact.
TEST(FailoverLimits, InSspAWorkerThatLeavesEarlyHoldsNoCopyBack) {
  CoordinatorOptions co = Opts(2, 2, Mode::kSsp, Aggregate::kSum, kChunkBytes);
  co.replicas = 1;
  co.staleness = 1;
  auto lc = LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 8000;  // 2 chunks: a primary on each server, its backup on the other
  constexpr uint64_t kLeaverSteps = 2, kSteps = 20;
  std::vector<float> out(kN);
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("t", kN, 0.0f));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    const bool leaver = w.rank() == 1;
    std::vector<float> g(kN, leaver ? 2.0f : 1.0f);
    for (uint64_t s = 1; s <= (leaver ? kLeaverSteps : kSteps); ++s) {
      Status st = w.Push(*id, g.data()).Wait(30s);
      ASSERT_TRUE(st.ok()) << "worker " << w.rank() << " step " << s << ": " << st.ToString();
    }
    if (leaver) {
      ASSERT_TRUE(w.Finish().ok());
      lc->workers[1].reset();  // its connections close (nothing touches `w` after this)
      return;
    }
    ASSERT_TRUE(w.Pull(*id, out.data()).Wait(30s).ok());
  });
  const float want = -(2.0f * kLeaverSteps + 1.0f * kSteps);
  for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(out[i], want) << "element " << i;
  EXPECT_TRUE(lc->workers[0]->Finish().ok());
  EXPECT_TRUE(lc->coordinator->Wait(10s).ok());
}

// Without replicas (--replicas 0) a server's death ends the job, naming it.
TEST(FailoverLimits, WithoutReplicasAServerDeathEndsTheJob) {
  auto lc = LocalCluster::Start(Opts(2, 1, Mode::kAsync, Aggregate::kSum, kChunkBytes));
  ASSERT_TRUE(lc);
  Worker& w = *lc->workers[0];
  auto id = w.Declare(Sgd1("t", 8000, 0.0f));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  lc->servers[1].reset();
  Status job = lc->coordinator->Wait(20s);
  EXPECT_FALSE(job.ok());
  EXPECT_NE(job.message().find("server 1"), std::string::npos) << job.ToString();
  EXPECT_EQ(job.message().find("declared dead"), std::string::npos) << job.ToString();
}

// --on-worker-loss continue: worker 2 of 3 dies between steps (it ends without saying goodbye:
// its connections close). The coordinator removes it; every later step completes with the two
// others, a barrier and the end of the job count only them, and the sums are exact: every push
// of the two, and worker 2's until it died.
class WorkerLoss : public ::testing::TestWithParam<Mode> {};

TEST_P(WorkerLoss, ADeadWorkerIsRemovedAndTheOthersGoOn) {
  CoordinatorOptions co = Opts(2, 3, GetParam(), Aggregate::kSum, kChunkBytes);
  co.continue_on_worker_loss = true;
  if (co.mode == Mode::kSsp) co.staleness = 1;
  auto lc = LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  constexpr int64_t kN = 8000;  // 2 chunks
  constexpr uint64_t kDiesAfter = 4, kSteps = 12;
  const float init = 100.0f;
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("t", kN, init));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    const bool dies = w.rank() == 2;
    const bool sync = w.mode() == Mode::kSync;
    std::vector<float> g(kN), out(kN);
    for (uint64_t s = 1; s <= (dies ? kDiesAfter : kSteps); ++s) {
      for (int64_t i = 0; i < kN; ++i) g[i] = Grad(w.rank(), s, i);
      Handle h = sync ? w.PushPull(*id, g.data(), out.data()) : w.Push(*id, g.data());
      Status st = h.Wait(30s);
      ASSERT_TRUE(st.ok()) << "worker " << w.rank() << " step " << s << ": " << st.ToString();
      if (sync) {
        ASSERT_EQ(h.version(), s) << "worker " << w.rank();
      }
    }
    if (dies) {
      worker::DieWithoutGoodbyeForTest(lc->workers[2]);  // nothing touches `w` after this
      return;
    }
    ASSERT_TRUE(w.Barrier("pushed", 30s).ok());
    ASSERT_TRUE(w.Pull(*id, out.data()).Wait(30s).ok());
    for (int64_t i = 0; i < kN; ++i) {
      double expect = init;
      for (uint64_t t = 1; t <= kSteps; ++t)
        for (uint32_t ww = 0; ww < 3; ++ww)
          if (ww < 2 || t <= kDiesAfter) expect -= Grad(ww, t, i);
      ASSERT_EQ(out[i], static_cast<float>(expect)) << "element " << i << " worker " << w.rank();
    }
  });
  for (uint32_t r = 0; r < 2; ++r) EXPECT_TRUE(lc->workers[r]->Finish().ok());
  EXPECT_TRUE(lc->coordinator->Wait(10s).ok());
  for (auto& s : lc->servers) EXPECT_TRUE(s->Wait(10s).ok());
}

INSTANTIATE_TEST_SUITE_P(Modes, WorkerLoss,
                         ::testing::Values(Mode::kSync, Mode::kAsync, Mode::kSsp),
                         [](const auto& info) { return std::string(ModeName(info.param)); });

// Worker 0 is never removed (it creates the chunks and reports checkpoints): its death still
// ends the job, naming it and why.
TEST(WorkerLossLimits, WorkerZerosDeathStillEndsTheJob) {
  CoordinatorOptions co = Opts(1, 2, Mode::kSync, Aggregate::kSum, kChunkBytes);
  co.continue_on_worker_loss = true;
  auto lc = LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  worker::DieWithoutGoodbyeForTest(lc->workers[0]);
  Status job = lc->coordinator->Wait(20s);
  EXPECT_FALSE(job.ok());
  EXPECT_NE(job.message().find("worker 0 is never removed"), std::string::npos) << job.ToString();
}

// A worker that died rejoins: a new process of its rank registers once it was removed, pulls the
// current parameters and pushes from where the job is (sync: the next step, which the others'
// steps wait for again; ssp: the slowest clock; async: after its last push). Worker 2 pushes 4
// steps and dies; the others push 8 and wait until the new worker 2 is in, then go on to 16; the
// new worker 2 pushes until its step 16. Integer-valued: the final parameters equal exactly the
// initial ones minus every acknowledged push (its old process's and its new one's), with and
// without replicas, both push paths (batches; landing buffers with tcp+nobatch).
struct RejoinParam {
  std::string transport;
  Mode mode;
  uint32_t replicas = 0;
  bool lose_server = false;  // 3 servers; server 1 dies before worker 2 does
};

class WorkerRejoin : public ::testing::TestWithParam<RejoinParam> {
 protected:
  void SetUp() override {
    const std::string& t = GetParam().transport;
    auto v = transport::CheckViability(t.substr(0, t.find('+')));
    if (!v.viable) GTEST_SKIP() << t << ": " << v.reason;
  }
};

// With lose_server, server 1 goes away (and is declared dead) before worker 2 dies: the new
// worker 2 rejoins a job that lost a server, reaching only the live ones.
TEST_P(WorkerRejoin, ARestartedWorkerRejoinsAndEveryAcknowledgedPushCounts) {
  const bool lose_server = GetParam().lose_server;
  CoordinatorOptions co =
      Opts(lose_server ? 3 : 2, 3, GetParam().mode, Aggregate::kSum, kChunkBytes);
  co.continue_on_worker_loss = true;
  co.replicas = GetParam().replicas;
  co.heartbeat_timeout = 2s;
  if (co.mode == Mode::kSsp) co.staleness = 1;
  auto lc = LocalCluster::Start(co, 16, GetParam().transport);
  ASSERT_TRUE(lc);
  constexpr uint64_t kDiesAfter = 4, kWaitAt = 8, kSteps = 16;
  const float init = 100.0f;
  std::atomic<bool> back{false};
  std::unique_ptr<Worker> again;
  // Per tensor, the steps the new worker 2 pushed, acknowledged (each tensor goes on from its
  // own step: its chunks' versions were where they were when it rejoined).
  std::vector<std::vector<uint64_t>> again_steps(kSizes.size());
  auto declare = [&](Worker& w) {
    std::vector<TensorSpec> specs;
    for (size_t k = 0; k < kSizes.size(); ++k)
      specs.push_back(Sgd1("t" + std::to_string(k), kSizes[k], init));
    return w.Declare(specs);
  };
  // Pushes step s of every tensor not past it (push_pull in sync mode); false after a failure.
  // `again_pushes`: the new worker 2's (recorded for the expected values).
  auto push = [&](Worker& w, const std::vector<TensorId>& ids, uint64_t s, bool again_pushes) {
    const bool sync = w.mode() == Mode::kSync;
    std::vector<Handle> hs;
    std::vector<std::vector<float>> g(ids.size()), out(ids.size());
    for (size_t k = 0; k < ids.size(); ++k) {
      if (w.steps(ids[k]) >= s) continue;
      if (again_pushes) again_steps[k].push_back(s);
      g[k].resize(kSizes[k]);
      out[k].resize(kSizes[k]);
      for (int64_t i = 0; i < kSizes[k]; ++i) g[k][i] = Grad(w.rank(), s, i + 7 * k);
      hs.push_back(sync ? w.PushPull(ids[k], g[k].data(), out[k].data())
                        : w.Push(ids[k], g[k].data()));
    }
    for (auto& h : hs) {
      Status st = h.Wait(30s);
      EXPECT_TRUE(st.ok()) << "worker " << w.rank() << " step " << s << ": " << st.ToString();
      EXPECT_FALSE(h.late());
      if (!st.ok()) return false;
    }
    return true;
  };
  auto check = [&](Worker& w, const std::vector<TensorId>& ids) {
    for (size_t k = 0; k < ids.size(); ++k) {
      std::vector<float> out(kSizes[k]);
      ASSERT_TRUE(w.Pull(ids[k], out.data()).Wait(30s).ok());
      for (int64_t i = 0; i < kSizes[k]; ++i) {
        double expect = init;
        for (uint64_t t = 1; t <= kSteps; ++t)
          for (uint32_t ww = 0; ww < 2; ++ww) expect -= Grad(ww, t, i + 7 * k);
        for (uint64_t t = 1; t <= kDiesAfter; ++t) expect -= Grad(2, t, i + 7 * k);
        for (uint64_t t : again_steps[k]) expect -= Grad(2, t, i + 7 * k);
        ASSERT_EQ(out[i], static_cast<float>(expect))
            << "tensor " << k << " element " << i << " worker " << w.rank();
      }
    }
  };
  lc->ForEachWorker([&](Worker& w) {
    auto ids = declare(w);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    if (w.rank() == 2) {
      for (uint64_t s = 1; s <= kDiesAfter; ++s)
        if (!push(w, *ids, s, false)) return;
      if (lose_server) {
        std::thread([&] { lc->servers[1].reset(); }).join();
        const auto until = std::chrono::steady_clock::now() + 20s;
        auto epoch = [&] {
          auto j = w.ServerStats(0);
          return j.ok() ? nlohmann::json::parse(*j)["shard_map_epoch"].get<int64_t>() : -1;
        };
        while (epoch() != 1 && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(10ms);
        ASSERT_EQ(epoch(), 1) << "server 1 was not declared dead";
      }
      worker::DieWithoutGoodbyeForTest(lc->workers[2]);  // nothing touches `w` after this
      // A new process of rank 2: refused while the coordinator has not removed the old one.
      const auto deadline = std::chrono::steady_clock::now() + 20s;
      for (;;) {
        auto r = lc->connect_worker(2);
        if (r.ok()) {
          again = std::move(r).value();
          break;
        }
        ASSERT_LT(std::chrono::steady_clock::now(), deadline) << r.status().ToString();
        std::this_thread::sleep_for(100ms);
      }
      ASSERT_TRUE(again->rejoined());
      auto ids2 = declare(*again);
      ASSERT_TRUE(ids2.ok()) << ids2.status().ToString();
      back = true;
      // It pulls the current parameters and pushes from where the job is.
      std::vector<float> cur(kSizes[0]);
      ASSERT_TRUE(again->Pull((*ids2)[0], cur.data()).Wait(30s).ok());
      uint64_t first = kSteps;
      for (TensorId id : *ids2) first = std::min(first, again->steps(id) + 1);
      EXPECT_GT(first, kDiesAfter);
      for (uint64_t s = first; s <= kSteps; ++s)
        if (!push(*again, *ids2, s, true)) return;
      for (TensorId id : *ids2) EXPECT_EQ(again->steps(id), kSteps);
      ASSERT_TRUE(again->Barrier("pushed", 30s).ok());
      check(*again, *ids2);
      return;
    }
    for (uint64_t s = 1; s <= kSteps; ++s) {
      if (s == kWaitAt + 1) {
        const auto deadline = std::chrono::steady_clock::now() + 30s;
        while (!back && std::chrono::steady_clock::now() < deadline)
          std::this_thread::sleep_for(10ms);
        ASSERT_TRUE(back) << "worker 2 did not rejoin";
      }
      if (!push(w, *ids, s, false)) return;
    }
    ASSERT_TRUE(w.Barrier("pushed", 30s).ok());
    check(w, *ids);
  });
  ASSERT_TRUE(again);
  EXPECT_FALSE(again_steps[0].empty());
  for (uint32_t r = 0; r < 2; ++r) EXPECT_TRUE(lc->workers[r]->Finish().ok());
  EXPECT_TRUE(again->Finish().ok());
  EXPECT_TRUE(lc->coordinator->Wait(10s).ok());
  for (auto& s : lc->servers)
    if (s) {
      EXPECT_TRUE(s->Wait(10s).ok());
    }
}

// A rejoin is refused, saying why, where it cannot be: a job that ends when a worker dies (no
// --on-worker-loss continue), and a rank whose worker is alive (waited for twice the heartbeat
// timeout, in case it was about to be found dead). The job goes on unharmed.
TEST(WorkerRejoinLimits, ARejoinIsRefusedWhereItCannotBe) {
  {
    CoordinatorOptions co = Opts(1, 2, Mode::kSync, Aggregate::kSum, kChunkBytes);
    auto lc = LocalCluster::Start(co);
    ASSERT_TRUE(lc);
    auto r = lc->connect_worker(1);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("--on-worker-loss continue"), std::string::npos)
        << r.status().ToString();
    lc->Finish();
  }
  {
    CoordinatorOptions co = Opts(1, 2, Mode::kSync, Aggregate::kSum, kChunkBytes);
    co.continue_on_worker_loss = true;
    co.heartbeat_interval = 200ms;
    co.heartbeat_timeout = 500ms;
    auto lc = LocalCluster::Start(co);
    ASSERT_TRUE(lc);
    const auto t0 = std::chrono::steady_clock::now();
    auto r = lc->connect_worker(1);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("worker rank 1 is alive"), std::string::npos)
        << r.status().ToString();
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 900ms);
    // The job is unharmed: a step of both workers, then a clean end.
    lc->ForEachWorker([&](Worker& w) {
      auto id = w.Declare(Sgd1("t", 100, 0.0f));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      std::vector<float> g(100, 1.0f), out(100);
      Handle h = w.PushPull(*id, g.data(), out.data());
      ASSERT_TRUE(h.Wait(30s).ok());
      EXPECT_EQ(out[0], -2.0f);
    });
    lc->Finish();
  }
}

std::vector<RejoinParam> RejoinParams() {
  std::vector<RejoinParam> p;
  std::vector<std::string> ts = {"tcp", "tcp+nobatch"};
  for (const auto& b : transport::BackendNames())
    if (b == "ucx") ts.push_back(b);
  for (const auto& t : ts)
    for (Mode m : {Mode::kSync, Mode::kAsync, Mode::kSsp})
      for (uint32_t r : {0u, 1u}) p.push_back({t, m, r});
  // A rejoin into a job that lost a server.
  for (const auto& t : ts)
    for (Mode m : {Mode::kSync, Mode::kAsync, Mode::kSsp}) p.push_back({t, m, 1, true});
  return p;
}

INSTANTIATE_TEST_SUITE_P(Jobs, WorkerRejoin, ::testing::ValuesIn(RejoinParams()),
                         [](const auto& info) {
                           std::string name = info.param.transport + "_" +
                                              ModeName(info.param.mode) +
                                              (info.param.replicas ? "_replicas" : "") +
                                              (info.param.lose_server ? "_lost_server" : "");
                           std::replace(name.begin(), name.end(), '+', '_');
                           return name;
                         });

std::vector<Param> Params() {
  std::vector<Param> p;
  std::vector<std::string> ts = {"tcp", "tcp+nobatch"};
  for (const auto& b : transport::BackendNames())
    if (b == "ucx") ts.push_back(b);
  for (const auto& t : ts)
    for (Mode m : {Mode::kSync, Mode::kAsync, Mode::kSsp}) p.push_back({t, m});
  // GPU servers' code path (the device rule, on the host twin): parameters it owns.
  for (Mode m : {Mode::kSync, Mode::kAsync}) p.push_back({"tcp", m, "twin"});
  // Node-level reduction: the pusher is a node.
  for (Mode m : {Mode::kSync, Mode::kAsync}) p.push_back({"tcp", m, "cpu", 2});
  return p;
}

INSTANTIATE_TEST_SUITE_P(Jobs, Failover, ::testing::ValuesIn(Params()), [](const auto& info) {
  std::string name = info.param.transport + "_" + ModeName(info.param.mode) +
                     (info.param.device == "cpu" ? "" : "_" + info.param.device) +
                     (info.param.per_node == 1 ? "" : "_nodes");
  std::replace(name.begin(), name.end(), '+', '_');
  return name;
});

}  // namespace
}  // namespace shardps
