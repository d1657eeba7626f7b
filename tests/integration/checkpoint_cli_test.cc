// `shardps checkpoint` (docs/fault-tolerance.md, "Checkpoints of a running job"): a user asks a
// running job's coordinator for a checkpoint from the command line.
#include <atomic>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "support/local_cluster.h"
#include "support/running_checkpoint.h"
#include "support/subprocess.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::CutSteps;
using testing::ExpectOneCut;
using testing::LocalCluster;
using testing::Opts;

// `shardps checkpoint`: a user asks a running job for a checkpoint; wrong input is refused.
TEST(Checkpoint, TheCheckpointCommandAsksARunningJob) {
  const std::string dir = ::testing::TempDir() + "shardps-command-" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum, 4096), 16, "tcp");
  ASSERT_TRUE(lc);
  const std::string addr = lc->coordinator->address();
  std::atomic<uint64_t> progress{0};
  std::atomic<bool> written{false};
  testing::CommandResult asked;
  std::thread asker([&] {
    const auto until = std::chrono::steady_clock::now() + 60s;
    while (progress.load() < 2 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    asked = testing::RunCommand({SHARDPS_BIN, "checkpoint", "--coordinator", addr, dir}, 120s);
    written.store(true);
  });
  lc->ForEachWorker([&](Worker& w) {
    CutSteps(
        w, 10, 12, [&] { return written.load(); }, &progress);
  });
  asker.join();
  EXPECT_EQ(asked.exit_code, 0) << asked.output;
  EXPECT_NE(asked.output.find("checkpoint written: generation 1 in " + dir), std::string::npos)
      << asked.output;
  // No directory, a coordinator that is not there: clear errors, exit code not 0.
  auto none = testing::RunCommand({SHARDPS_BIN, "checkpoint", "--coordinator", addr}, 60s);
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.output.find("dir is required"), std::string::npos) << none.output;
  auto away = testing::RunCommand({SHARDPS_BIN, "checkpoint", "--coordinator", "127.0.0.1:1",
                                   "--connect-timeout-ms", "300", dir},
                                  60s);
  EXPECT_EQ(away.exit_code, 1);
  EXPECT_NE(away.output.find("cannot reach the coordinator at 127.0.0.1:1"), std::string::npos)
      << away.output;
  lc->Finish();
  ExpectOneCut(dir, Mode::kSync, nullptr);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace shardps
