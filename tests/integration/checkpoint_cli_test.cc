// `shardps checkpoint` (docs/fault-tolerance.md, "Checkpoints of a running job"): a user asks a
// running job's coordinator for a checkpoint from the command line.
#include <unistd.h>

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

// A job with a cluster secret (docs/security.md): the command proves it like any node. Without
// it, or with another, the coordinator refuses the connection and nothing is written.
TEST(Checkpoint, TheCheckpointCommandProvesTheClusterSecret) {
  const std::string dir =
      ::testing::TempDir() + "shardps-command-secret-" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  auto write_secret = [](const std::string& text) {
    char path[] = "/tmp/shardps-secret-XXXXXX";
    const int fd = mkstemp(path);  // 0600, as a secret file must be
    EXPECT_GE(fd, 0);
    EXPECT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
    close(fd);
    return std::string(path);
  };
  const std::string secret = write_secret("a cluster secret of 32 bytes....");
  const std::string other = write_secret("another secret, 32 bytes long...");
  auto co = Opts(1, 2, Mode::kSync, Aggregate::kSum, 4096);
  co.secret_file = secret;
  auto lc = LocalCluster::Start(co, 16, "tcp");
  ASSERT_TRUE(lc);
  const std::string addr = lc->coordinator->address();
  std::atomic<uint64_t> progress{0};
  std::atomic<bool> asked{false};
  testing::CommandResult without, wrong, with;
  std::thread asker([&] {
    const auto until = std::chrono::steady_clock::now() + 60s;
    while (progress.load() < 2 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    const std::vector<std::string> base = {SHARDPS_BIN, "checkpoint",           "--coordinator",
                                           addr,        "--connect-timeout-ms", "2000"};
    auto ask = [&](std::vector<std::string> extra) {
      std::vector<std::string> argv = base;
      argv.insert(argv.end(), extra.begin(), extra.end());
      argv.push_back(dir);
      return testing::RunCommand(argv, 120s);
    };
    without = ask({});
    wrong = ask({"--secret", other});
    with = ask({"--secret", secret});
    asked.store(true);
  });
  lc->ForEachWorker([&](Worker& w) {
    CutSteps(
        w, 10, 12, [&] { return asked.load(); }, &progress);
  });
  asker.join();
  EXPECT_EQ(without.exit_code, 1) << without.output;
  EXPECT_EQ(wrong.exit_code, 1) << wrong.output;
  EXPECT_NE(without.output.find("a job with a cluster secret refuses clients without it"),
            std::string::npos)
      << without.output;
  EXPECT_NE(wrong.output.find("it does not hold this cluster secret"), std::string::npos)
      << wrong.output;
  EXPECT_EQ(with.exit_code, 0) << with.output;
  EXPECT_NE(with.output.find("checkpoint written: generation 1 in " + dir), std::string::npos)
      << with.output;
  lc->Finish();
  ExpectOneCut(dir, Mode::kSync, nullptr);
  std::filesystem::remove_all(dir);
  std::filesystem::remove(secret);
  std::filesystem::remove(other);
}

}  // namespace
}  // namespace shardps
