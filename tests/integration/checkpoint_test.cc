// Checkpoints (docs/fault-tolerance.md): a job checkpointed mid-way and restored into a new job
// goes on bit for bit as the original did; an incomplete or corrupt checkpoint is refused with
// an error naming what is wrong.
#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "core/crc32c.h"
#include "server/checkpoint.h"
#include "support/exact_values.h"
#include "support/http_get.h"
#include "support/local_cluster.h"
#include "support/running_checkpoint.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::Grad;
using testing::LocalCluster;
using testing::Opts;
using testing::Sgd1;

std::string TempDir(const std::string& name) {
  std::string d = ::testing::TempDir() + "shardps-" + name + "-" + std::to_string(getpid());
  std::filesystem::remove_all(d);
  return d;
}

TEST(Crc32c, KnownValues) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xe3069283u);
  EXPECT_EQ(Crc32c("", 0), 0u);
  std::string a(1000, 'x');
  // In pieces as in one go.
  EXPECT_EQ(Crc32c(a.data() + 3, 997, Crc32c(a.data(), 3)), Crc32c(a.data(), a.size()));
}

std::vector<TensorSpec> Model() {
  TensorSpec adam = Sgd1("adam", 3000, 0.25f);  // several 4 KiB chunks
  adam.optimizer.kind = OptimizerKind::kAdam;
  adam.optimizer.lr = 0.01f;
  TensorSpec mom = Sgd1("momentum", 7, -1.0f);
  mom.optimizer.kind = OptimizerKind::kMomentum;
  mom.optimizer.lr = 0.1f;
  return {adam, mom, Sgd1("sgd", 500, 3.0f)};
}

// Steps [from, to] of 2 workers, push_pull of every tensor; worker 0's pulls of the last step.
void Steps(Worker& w, const std::vector<TensorId>& ids, uint64_t from, uint64_t to,
           std::vector<std::vector<float>>* last) {
  const auto model = Model();
  for (uint64_t s = from; s <= to; ++s) {
    std::vector<std::vector<float>> g(ids.size()), out(ids.size());
    std::vector<Handle> hs;
    for (size_t k = 0; k < ids.size(); ++k) {
      const int64_t n = model[k].shape[0];
      g[k].resize(n);
      out[k].assign(n, 0.0f);
      for (int64_t i = 0; i < n; ++i) g[k][i] = 0.01f * Grad(w.rank(), s, i);
      hs.push_back(w.PushPull(ids[k], g[k].data(), out[k].data()));
    }
    std::vector<Status> done;
    for (auto& h : hs) done.push_back(h.Wait(60s));
    for (size_t k = 0; k < ids.size(); ++k) {
      ASSERT_TRUE(done[k].ok()) << done[k].ToString();
      ASSERT_EQ(hs[k].version(), s);
    }
    if (s == to && w.rank() == 0) *last = out;
  }
}

// Saved on one kind of server and restored on another (the CPU rule and the device rule on the
// twin keep the same state): the restored job pulls the checkpointed parameters at the
// checkpoint's version, and three more steps give what the original job's three more steps gave.
TEST(Checkpoint, RestoredJobGoesOnBitForBit) {
  for (auto [save_on, restore_on] :
       {std::pair<std::string, std::string>{"cpu", "cpu"}, {"twin", "cpu"}, {"cpu", "twin"}}) {
    SCOPED_TRACE(save_on + " -> " + restore_on);
    const std::string dir = TempDir("ckpt");
    std::vector<std::vector<float>> at_checkpoint, original, restored, pulled;
    {
      auto lc = LocalCluster::Start(Opts(2, 2, Mode::kSync, Aggregate::kMean, 4096), 16, "tcp", 1,
                                    [&](ServerOptions& so) { so.device = save_on; });
      ASSERT_TRUE(lc);
      lc->ForEachWorker([&](Worker& w) {
        auto ids = w.Declare(Model());
        ASSERT_TRUE(ids.ok()) << ids.status().ToString();
        Steps(w, *ids, 1, 3, &at_checkpoint);
        ASSERT_TRUE(w.Checkpoint(dir, 60s).ok());
        Steps(w, *ids, 4, 6, &original);
      });
    }
    ASSERT_TRUE(std::filesystem::exists(dir + "/MANIFEST"));
    {
      auto lc = LocalCluster::Start(Opts(2, 2, Mode::kSync, Aggregate::kMean, 4096), 16, "tcp", 1,
                                    [&](ServerOptions& so) {
                                      so.device = restore_on;
                                      so.restore = dir;
                                    });
      ASSERT_TRUE(lc);
      lc->ForEachWorker([&](Worker& w) {
        auto ids = w.Declare(Model());
        ASSERT_TRUE(ids.ok()) << ids.status().ToString();
        if (w.rank() == 0) {
          for (size_t k = 0; k < ids->size(); ++k) {
            std::vector<float> out(Model()[k].shape[0]);
            auto h = w.Pull((*ids)[k], out.data());
            ASSERT_TRUE(h.Wait(60s).ok());
            EXPECT_EQ(h.version(), 3u);
            pulled.push_back(out);
          }
        }
        ASSERT_TRUE(w.Barrier("pulled", 60s).ok());
        Steps(w, *ids, 4, 6, &restored);
      });
    }
    ASSERT_EQ(pulled.size(), 3u);
    for (size_t k = 0; k < 3; ++k) {
      EXPECT_EQ(pulled[k], at_checkpoint[k]) << "tensor " << k;
      EXPECT_EQ(restored[k], original[k]) << "tensor " << k;
      EXPECT_NE(original[k], at_checkpoint[k]);  // the steps after it changed something
    }
    std::filesystem::remove_all(dir);
  }
}

// A server started from a checkpoint that is incomplete or damaged refuses to start, naming the
// file and what is wrong; nothing of it is loaded.
TEST(Checkpoint, IncompleteOrCorruptCheckpointsAreRefused) {
  // A long path too (over the 256 bytes of a barrier's name).
  const std::string top = TempDir("ckpt-bad");
  const std::string dir = top + "/" + std::string(200, 'd') + "/" + std::string(100, 'e');
  {
    auto lc = LocalCluster::Start(Opts(2, 1, Mode::kSync, Aggregate::kSum, 4096));
    ASSERT_TRUE(lc);
    Worker& w = *lc->workers[0];
    auto ids = w.Declare(Model());
    ASSERT_TRUE(ids.ok());
    std::vector<std::vector<float>> last;
    Steps(w, *ids, 1, 2, &last);
    ASSERT_TRUE(w.Checkpoint(dir, 60s).ok());
    // A second checkpoint into the same directory is generation 2; generation 1's files go.
    Steps(w, *ids, 3, 3, &last);
    ASSERT_TRUE(w.Checkpoint(dir, 60s).ok());
  }
  EXPECT_EQ(server::CurrentGeneration(dir), 2u);
  EXPECT_FALSE(std::filesystem::exists(dir + "/" + server::ServerFileName(1, 0)));
  EXPECT_TRUE(std::filesystem::exists(dir + "/" + server::ServerFileName(2, 0)));
  auto start = [&]() {
    ServerOptions so;
    so.coordinator = "127.0.0.1:1";
    so.restore = dir;
    auto s = Server::Start(so);
    return s.ok() ? Status::OK() : s.status();
  };
  ASSERT_TRUE(server::ReadCheckpoint(dir).ok());
  const std::string name = server::ServerFileName(2, 1);
  const std::string file = dir + "/" + name;
  std::string bytes;
  {
    std::ifstream f(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  ASSERT_GT(bytes.size(), 100u);
  auto rewrite = [&](const std::string& b) {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << b;
  };
  // One flipped bit in the middle of the parameters.
  std::string flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x10;
  rewrite(flipped);
  Status st = start();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find(name + " is corrupt: its CRC32C is"), std::string::npos)
      << st.ToString();
  // Cut short.
  rewrite(bytes.substr(0, bytes.size() - 8));
  st = start();
  EXPECT_NE(st.message().find(name + " has"), std::string::npos) << st.ToString();
  rewrite(bytes);
  auto whole = server::ReadCheckpoint(dir);
  ASSERT_TRUE(whole.ok());
  // A third checkpoint interrupted midway (one server wrote its file of generation 3, nobody
  // the manifest): the directory still holds generation 2, whole.
  ASSERT_TRUE(server::WriteServerFile(dir, server::ServerFileName(3, 0), {}).ok());
  auto after = server::ReadCheckpoint(dir);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_EQ(after->chunks, whole->chunks);
  EXPECT_GT(after->chunks, 0u);
  // No manifest at all: nothing is loaded.
  std::filesystem::remove(dir + "/MANIFEST");
  st = start();
  EXPECT_TRUE(st.IsNotFound()) << st.ToString();
  EXPECT_NE(st.message().find("MANIFEST is missing"), std::string::npos) << st.ToString();
  std::filesystem::remove_all(top);
}

}  // namespace
}  // namespace shardps

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::CutModel;
using testing::CutSteps;
using testing::Expected;
using testing::ExpectOneCut;
using testing::Grad;
using testing::LocalCluster;
using testing::Opts;
using testing::Sgd1;

// The coordinator checkpoints a job while its workers push (Coordinator::Checkpoint): the
// checkpoint is one cut, the job goes on to exactly the sum of all its pushes, and a job
// restored from it starts at the cut.
TEST(Checkpoint, TheCoordinatorCheckpointsARunningJobAtOneCut) {
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    for (std::string transport : {"tcp", "ucx"}) {
      SCOPED_TRACE(ModeName(mode) + std::string(" over ") + transport);
      const std::string dir = TempDir("cut");
      constexpr uint64_t kPause = 12, kLast = 16;
      uint64_t at = 0;
      {
        auto lc = LocalCluster::Start(Opts(2, 2, mode, Aggregate::kSum, 4096), 16, transport);
        ASSERT_TRUE(lc);
        std::atomic<uint64_t> progress{0};
        std::atomic<bool> written{false};
        std::thread taker([&] {
          const auto until = std::chrono::steady_clock::now() + 60s;
          while (progress.load() < 3 && std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(1ms);
          auto r = lc->coordinator->Checkpoint(dir, 60s);
          EXPECT_TRUE(r.ok()) << r.status().ToString();
          if (r.ok()) {
            EXPECT_NE(r->find("generation 1"), std::string::npos) << *r;
          }
          written.store(true);
        });
        std::vector<TensorId> ids;
        lc->ForEachWorker([&](Worker& w) {
          CutSteps(
              w, kPause, kLast, [&] { return written.load(); }, &progress,
              w.rank() == 0 ? &ids : nullptr);
        });
        taker.join();
        // Nothing held was lost or applied twice: the job ends at the sum of every push.
        const auto model = CutModel();
        ASSERT_EQ(ids.size(), model.size());
        for (size_t k = 0; k < model.size(); ++k) {
          std::vector<float> out(model[k].shape[0]);
          auto h = lc->workers[0]->Pull(ids[k], out.data());
          ASSERT_TRUE(h.Wait(60s).ok());
          for (size_t i = 0; i < out.size(); ++i)
            ASSERT_EQ(out[i], Expected(model[k].init_value, {kLast, kLast}, i)) << model[k].name;
        }
        lc->Finish();
      }
      ExpectOneCut(dir, mode, &at);
      EXPECT_GE(at, 3u);
      EXPECT_LT(at, kPause);
      if (mode == Mode::kSync && transport == "tcp") {
        // Restored: the new job's parameters are the cut's, at its version.
        auto lc = LocalCluster::Start(Opts(2, 2, mode, Aggregate::kSum, 4096), 16, "tcp", 1,
                                      [&](ServerOptions& so) { so.restore = dir; });
        ASSERT_TRUE(lc);
        const auto model = CutModel();
        auto ids = lc->workers[0]->Declare(model);
        ASSERT_TRUE(ids.ok()) << ids.status().ToString();
        for (size_t k = 0; k < model.size(); ++k) {
          std::vector<float> out(model[k].shape[0]);
          auto h = lc->workers[0]->Pull((*ids)[k], out.data());
          ASSERT_TRUE(h.Wait(60s).ok());
          EXPECT_EQ(h.version(), at);
          for (size_t i = 0; i < out.size(); ++i)
            ASSERT_EQ(out[i], Expected(model[k].init_value, {at, at}, i)) << model[k].name;
        }
      }
      std::filesystem::remove_all(dir);
    }
  }
}

// Checkpoints given up (a 1 ms timeout: the workers' pushes are let go while they are taken)
// never leave a manifest: the directory's last complete checkpoint is one whose taking
// succeeded, and it is one cut.
TEST(Checkpoint, AGivenUpCheckpointIsNeverLoaded) {
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    SCOPED_TRACE(ModeName(mode));
    const std::string dir = TempDir("given-up");
    uint64_t succeeded = 0;
    {
      auto lc = LocalCluster::Start(Opts(2, 2, mode, Aggregate::kSum, 4096), 16, "tcp");
      ASSERT_TRUE(lc);
      std::atomic<uint64_t> progress{0};
      std::atomic<bool> done{false};
      std::thread taker([&] {
        const auto until = std::chrono::steady_clock::now() + 60s;
        while (progress.load() < 2 && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(1ms);
        auto first = lc->coordinator->Checkpoint(dir, 60s);
        EXPECT_TRUE(first.ok()) << first.status().ToString();
        succeeded += first.ok() ? 1 : 0;
        for (int i = 0; i < 8; ++i) {
          auto r = lc->coordinator->Checkpoint(dir, 1ms);
          if (r.ok()) {
            ++succeeded;
          } else {
            EXPECT_NE(r.status().message().find("checkpoint into " + dir), std::string::npos)
                << r.status().ToString();
          }
          std::this_thread::sleep_for(3ms);
        }
        done.store(true);
      });
      lc->ForEachWorker([&](Worker& w) {
        CutSteps(
            w, 40, 44, [&] { return done.load(); }, &progress);
      });
      taker.join();
      lc->Finish();
    }
    EXPECT_EQ(server::CurrentGeneration(dir), succeeded);
    ExpectOneCut(dir, mode, nullptr);
    std::filesystem::remove_all(dir);
  }
}

// A sync checkpoint that cannot complete (a tensor pushed at step 1 only is one step behind the
// others at step 2, so its cut waits for a step 2 that never comes: a documented limit) holds
// the workers' new pushes. When its one server then stops, the server stops waiting for the cut,
// the checkpoint fails, nothing is written, and the held pushes go on (and fail with the job)
// at once, rather than waiting out the checkpoint's 100 s.
TEST(Checkpoint, HeldPushesGoOnWhenTheJobFails) {
  const std::string dir = TempDir("held");
  auto co = Opts(1, 2, Mode::kSync, Aggregate::kSum, 4096);
  co.metrics_listen = "127.0.0.1:0";
  auto lc = LocalCluster::Start(co, 16, "tcp");
  ASSERT_TRUE(lc);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<Status> held(2);
  std::vector<double> held_seconds(2, 0);
  std::thread workers([&] {
    lc->ForEachWorker([&](Worker& w) {
      auto ids = w.Declare(CutModel());
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      const auto model = CutModel();
      auto step = [&](uint64_t s, size_t tensors) {
        std::vector<Handle> hs;
        std::vector<std::vector<float>> g(tensors);
        for (size_t k = 0; k < tensors; ++k) {
          g[k].assign(model[k].shape[0], Grad(w.rank(), s, k));
          hs.push_back(w.Push((*ids)[k], g[k].data()));
        }
        for (auto& h : hs) ASSERT_TRUE(h.Wait(60s).ok());
      };
      step(1, 3);  // a, b, c
      step(2, 2);  // a, b
      ready.fetch_add(1);
      for (auto until = std::chrono::steady_clock::now() + 60s;
           !go.load() && std::chrono::steady_clock::now() < until;)
        std::this_thread::sleep_for(1ms);
      std::vector<float> g(model[0].shape[0], 1.0f);
      const auto t0 = std::chrono::steady_clock::now();
      auto h = w.Push((*ids)[0], g.data());  // step 3 of a: past its cut, held
      held[w.rank()] = h.Wait(120s);
      held_seconds[w.rank()] =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    });
  });
  for (auto until = std::chrono::steady_clock::now() + 60s;
       ready.load() < 2 && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(1ms);
  ASSERT_EQ(ready.load(), 2);
  Result<std::string> taken = Status::OK();
  std::thread taker([&] { taken = lc->coordinator->Checkpoint(dir, 100s); });
  // Phase 2: every worker answered, so every worker holds its pushes past its cut.
  ASSERT_EQ(testing::WaitForSample(lc->coordinator->metrics_address(),
                                   "shardps_coordinator_checkpoint_phase", 2.0, 60s),
            2.0);
  go.store(true);
  std::this_thread::sleep_for(200ms);  // the pushes reach the gate (or not: see below)
  lc->servers[0].reset();              // the job fails
  workers.join();
  taker.join();
  EXPECT_FALSE(taken.ok());
  for (uint32_t w = 0; w < 2; ++w) {
    EXPECT_FALSE(held[w].ok()) << "worker " << w;
    EXPECT_LT(held_seconds[w], 60.0) << "worker " << w << ": held past the job's failure";
  }
  EXPECT_EQ(server::CurrentGeneration(dir), 0u);  // nothing written
  std::filesystem::remove_all(dir);
}

// --checkpoint-interval: the coordinator checkpoints the job on its own while it runs; ssp too.
TEST(Checkpoint, PeriodicCheckpointsOfARunningJob) {
  for (Mode mode : {Mode::kSync, Mode::kSsp}) {
    SCOPED_TRACE(ModeName(mode));
    const std::string dir = TempDir("periodic");
    auto co = Opts(2, 2, mode, Aggregate::kSum, 4096);
    if (mode == Mode::kSsp) co.staleness = 1;
    co.checkpoint_interval = 100ms;
    co.checkpoint_dir = dir;
    {
      auto lc = LocalCluster::Start(co, 16, "tcp");
      ASSERT_TRUE(lc);
      std::atomic<uint64_t> progress{0};
      lc->ForEachWorker([&](Worker& w) {
        CutSteps(
            w, 6, 8, [&] { return std::filesystem::exists(dir + "/MANIFEST"); }, &progress);
      });
      lc->Finish();
    }
    ExpectOneCut(dir, mode == Mode::kSync ? Mode::kSync : Mode::kAsync, nullptr);
    std::filesystem::remove_all(dir);
  }
}

}  // namespace
}  // namespace shardps
