// `shardps train` through the real binary: each run launches a local cluster of processes and is
// bounded in time.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "support/subprocess.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::CommandResult;
using testing::CountOccurrences;
using testing::RunCommand;

const std::string kShardps = SHARDPS_BIN;
const std::string kFashionMnist = "/usr/share/datasets/fashion-mnist";

class TrainCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("train-cli-" + std::to_string(getpid()) + "-" + std::to_string(rand()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  static nlohmann::json ReadJson(const std::string& path) {
    std::ifstream f(path);
    return nlohmann::json::parse(f, nullptr, false);
  }

  // shardps train on the synthetic dataset in dir_ with 2 servers and 2 workers, whose sums do
  // not depend on arrival order, and a constant rate: a run restored from a checkpoint ends as
  // the run without a break.
  CommandResult RunRestorable(std::vector<std::string> extra, const std::string& report) const {
    std::vector<std::string> argv = {kShardps,        "train",    "--data-dir", dir_.string(),
                                     "--servers",     "2",        "--workers",  "2",
                                     "--batch",       "40",       "--lr",       "0.01",
                                     "--lr-schedule", "constant", "--report",   report};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, 120s);
  }

  std::filesystem::path dir_;
};

void PutU32(std::vector<uint8_t>* b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b->push_back(static_cast<uint8_t>(v >> s));
}

// An uncompressed IDX file: magic, dimensions, payload.
void WriteIdx(const std::string& path, uint32_t magic, const std::vector<uint32_t>& dims,
              const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> b;
  PutU32(&b, magic);
  for (uint32_t d : dims) PutU32(&b, d);
  b.insert(b.end(), payload.begin(), payload.end());
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), b.size());
}

// A small Fashion-MNIST-shaped dataset in `dir`: image i is bright in the rows of its class.
void WriteSyntheticDataset(const std::string& dir, uint32_t train, uint32_t test) {
  for (auto [prefix, n] : {std::pair<std::string, uint32_t>{"train", train}, {"t10k", test}}) {
    std::vector<uint8_t> images, labels;
    for (uint32_t i = 0; i < n; ++i) {
      const uint8_t label = static_cast<uint8_t>(i * 7 % 10);
      labels.push_back(label);
      for (int r = 0; r < 28; ++r)
        for (int c = 0; c < 28; ++c)
          images.push_back(r / 3 == label ? static_cast<uint8_t>(200 + (i + c) % 50)
                                          : static_cast<uint8_t>((i * 31 + r * 7 + c) % 40));
    }
    WriteIdx(dir + "/" + prefix + "-images-idx3-ubyte", 0x803, {n, 28, 28}, images);
    WriteIdx(dir + "/" + prefix + "-labels-idx1-ubyte", 0x801, {n}, labels);
  }
}

TEST_F(TrainCli, ShortFashionMnistRunLearns) {
  if (!std::filesystem::exists(kFashionMnist + "/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << kFashionMnist << " is missing (Debian package dataset-fashion-mnist)";
  const std::string report = Path("report.json");
  auto r = RunCommand({kShardps, "train", "--limit", "6000", "--epochs", "1", "--servers", "1",
                       "--workers", "2", "--report", report},
                      180s);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = ReadJson(report);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_EQ(j["workers"], 2);
  EXPECT_EQ(j["servers"], 1);
  EXPECT_EQ(j["mode"], "sync");
  EXPECT_EQ(j["epochs"], 1);
  EXPECT_EQ(j["train_samples"], 6000);
  EXPECT_GT(j["test_accuracy"].get<double>(), 0.6) << r.output;  // chance is 0.1
  EXPECT_LT(j["last_loss"].get<double>(), 0.7 * j["first_loss"].get<double>()) << r.output;
  EXPECT_GT(j["samples_per_second"].get<double>(), 0);
  ASSERT_EQ(j["epochs_detail"].size(), 1u);
  EXPECT_EQ(j["epochs_detail"][0]["test_accuracy"], j["test_accuracy"]);
  // Rank 0 alone reports; stdout is not a terminal, so plain lines and no progress bar.
  EXPECT_EQ(CountOccurrences(r.output, "] epoch 1/1: train loss"), 1u) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, "[worker 1] epoch"), 0u) << r.output;
  EXPECT_EQ(CountOccurrences(r.output, "\r"), 0u) << r.output;
}

// Runs everywhere (no real dataset needed): the whole path with both modes and the baseline.
TEST_F(TrainCli, SyntheticDatasetEndToEndWithBaseline) {
  WriteSyntheticDataset(dir_.string(), 240, 60);
  for (std::string mode : {"sync", "async"}) {
    const std::string report = Path(mode + ".json");
    std::vector<std::string> argv = {
        kShardps, "train",   "--data-dir", dir_.string(), "--servers", "2",      "--workers",
        "3",      "--batch", "30",         "--epochs",    "3",         "--mode", mode,
        "--lr",   "0.01",    "--baseline", "--report",    report};
    const bool gnuplot = std::system("command -v gnuplot >/dev/null 2>&1") == 0;
    if (gnuplot) {
      argv.push_back("--plot");
      argv.push_back(Path(mode + ".png"));
    }
    auto r = RunCommand(argv, 120s);
    ASSERT_FALSE(r.timed_out) << r.output;
    ASSERT_EQ(r.exit_code, 0) << r.output;
    auto j = ReadJson(report);
    ASSERT_FALSE(j.is_discarded()) << r.output;
    EXPECT_EQ(j["mode"], mode);
    EXPECT_EQ(j["lr_schedule"], "cosine");  // the default: both runs decay the rate alike
    EXPECT_EQ(j["workers"], 3);
    EXPECT_EQ(j["steps_per_epoch"], 8);
    EXPECT_EQ(j["epochs_detail"].size(), 3u);
    EXPECT_EQ(j["baseline_epochs_detail"].size(), 3u);
    for (const char* key : {"test_accuracy", "train_loss", "wall_seconds", "samples_per_second",
                            "baseline_test_accuracy", "baseline_wall_seconds"})
      EXPECT_TRUE(j.contains(key)) << key << " missing in " << j.dump();
    // An easy problem: both learn it.
    EXPECT_GT(j["test_accuracy"].get<double>(), 0.9) << r.output;
    EXPECT_GT(j["baseline_test_accuracy"].get<double>(), 0.9) << r.output;
    if (gnuplot) {
      EXPECT_GT(std::filesystem::file_size(Path(mode + ".png")), 0u);
    }
  }
}

// Node-level reduction: 2 nodes of 2 workers sum through shared memory before they push; sync
// mean keeps the global batch's mean, so the run follows the one-process baseline (60 test
// samples: at most one answered differently).
TEST_F(TrainCli, NodeReducedRunMatchesTheBaseline) {
  WriteSyntheticDataset(dir_.string(), 240, 60);
  const std::string report = Path("nodes.json");
  auto r = RunCommand({kShardps, "train", "--data-dir", dir_.string(), "--servers", "2",
                       "--workers", "4", "--workers-per-node", "2", "--batch", "40", "--epochs",
                       "3", "--lr", "0.01", "--baseline", "--report", report},
                      120s);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("2 workers per node reduce before they push"), std::string::npos)
      << r.output;
  auto j = ReadJson(report);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_GT(j["test_accuracy"].get<double>(), 0.9) << r.output;
  EXPECT_LE(std::abs(j["test_accuracy"].get<double>() - j["baseline_test_accuracy"].get<double>()),
            0.02)
      << r.output;
}

// A run checkpointed every 6 steps and stopped after 2 epochs, then restored (--restore) for a
// third, ends exactly as the same 3 epochs run without a break: the restored servers hold the
// parameters, optimizer state and versions of step 12, and training goes on with step 13 (2
// workers, whose sums do not depend on arrival order, and a constant rate).
TEST_F(TrainCli, ARunRestoredFromItsCheckpointEndsAsTheRunWithoutABreak) {
  WriteSyntheticDataset(dir_.string(), 240, 60);
  const std::string ckpt = Path("ckpt");
  auto a = RunRestorable({"--epochs", "3"}, Path("a.json"));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b = RunRestorable({"--epochs", "2", "--checkpoint-every", "6", "--checkpoint-dir", ckpt},
                         Path("b.json"));
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("checkpoint after step 12 in " + ckpt), std::string::npos) << b.output;
  auto c = RunRestorable({"--epochs", "3", "--restore", ckpt}, Path("c.json"));
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("restoring from " + ckpt), std::string::npos) << c.output;
  auto ja = ReadJson(Path("a.json")), jc = ReadJson(Path("c.json"));
  ASSERT_FALSE(ja.is_discarded() || jc.is_discarded());
  EXPECT_EQ(ja["test_accuracy"].get<double>(), jc["test_accuracy"].get<double>());
  EXPECT_EQ(ja["train_loss"].get<double>(), jc["train_loss"].get<double>());
  // A checkpoint that is not there stops the job before it trains.
  auto d = RunRestorable({"--epochs", "1", "--restore", Path("nowhere")}, Path("d.json"));
  EXPECT_NE(d.exit_code, 0) << d.output;
  EXPECT_NE(d.output.find("MANIFEST is missing"), std::string::npos) << d.output;
}

// The coordinator checkpoints a run on its own every second (--checkpoint-interval), at a step
// the run does not choose; a run restored from the last one (--restore) goes on from that step
// and ends exactly as the same 3 epochs run without a break. Worker 1 sleeps 300 ms a step, so
// that the 12 steps of the checkpointed run take at least 3.6 s: several checkpoints fall inside.
TEST_F(TrainCli, ARunRestoredFromAPeriodicCheckpointEndsAsTheRunWithoutABreak) {
  WriteSyntheticDataset(dir_.string(), 240, 60);
  const std::string ckpt = Path("periodic");
  auto a = RunRestorable({"--epochs", "3"}, Path("a.json"));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b = RunRestorable({"--epochs", "2", "--checkpoint-interval", "1", "--checkpoint-dir", ckpt,
                          "--slow-worker", "1:300"},
                         Path("b.json"));
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_GE(CountOccurrences(b.output, " written: generation "), 2u) << b.output;
  auto c = RunRestorable({"--epochs", "3", "--restore", ckpt}, Path("c.json"));
  ASSERT_EQ(c.exit_code, 0) << c.output;
  const std::string restored = "train: restored from " + ckpt + " at version ";
  const size_t at = c.output.find(restored);
  ASSERT_NE(at, std::string::npos) << c.output;
  const uint64_t version = std::stoull(c.output.substr(at + restored.size()));
  EXPECT_GE(version, 1u);
  EXPECT_LE(version, 12u);
  EXPECT_NE(c.output.find("training goes on from step " + std::to_string(version + 1)),
            std::string::npos)
      << c.output;
  auto ja = ReadJson(Path("a.json")), jc = ReadJson(Path("c.json"));
  ASSERT_FALSE(ja.is_discarded() || jc.is_discarded());
  EXPECT_EQ(ja["test_accuracy"].get<double>(), jc["test_accuracy"].get<double>());
  EXPECT_EQ(ja["train_loss"].get<double>(), jc["train_loss"].get<double>());
}

// A worker killed mid-run (SIGKILL) is started again by the launcher (--restart-workers 1) and
// rejoins: it pulls the current parameters and trains from where the run is; the run ends
// normally and learns the problem, in sync and async mode.
TEST_F(TrainCli, AKilledWorkerIsRestartedAndRejoinsTheRun) {
  WriteSyntheticDataset(dir_.string(), 240, 60);
  for (std::string mode : {"sync", "async"}) {
    SCOPED_TRACE(mode);
    const std::string report = Path(mode + "-rejoin.json");
    auto r = RunCommand({kShardps,
                         "train",
                         "--data-dir",
                         dir_.string(),
                         "--servers",
                         "2",
                         "--workers",
                         "3",
                         "--batch",
                         "30",
                         "--epochs",
                         "3",
                         "--mode",
                         mode,
                         "--lr",
                         "0.01",
                         "--on-worker-loss",
                         "continue",
                         "--restart-workers",
                         "1",
                         "--kill-worker-at",
                         "10",
                         "--report",
                         report},
                        120s);
    ASSERT_FALSE(r.timed_out) << r.output;
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("worker 2 kills itself (SIGKILL) before step 10"), std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find("starting it again"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("worker 2 rejoined the run"), std::string::npos) << r.output;
    auto j = ReadJson(report);
    ASSERT_FALSE(j.is_discarded()) << r.output;
    EXPECT_GT(j["test_accuracy"].get<double>(), 0.9) << r.output;
  }
  // Without --on-worker-loss continue a restart could not rejoin: refused before launching.
  auto r = RunCommand({kShardps, "train", "--data-dir", dir_.string(), "--workers", "2", "--batch",
                       "30", "--restart-workers", "1"},
                      30s);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--restart-workers needs --on-worker-loss continue"), std::string::npos)
      << r.output;
}

TEST_F(TrainCli, TruncatedOrWrongMagicDatasetIsAClearError) {
  WriteSyntheticDataset(dir_.string(), 100, 20);
  const std::string images = Path("train-images-idx3-ubyte");
  std::filesystem::resize_file(images, 16 + 50 * 28 * 28);
  auto r = RunCommand({kShardps, "train", "--data-dir", dir_.string()}, 30s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("truncated"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("train-images-idx3-ubyte"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("[worker"), std::string::npos) << "checked before launching\n"
                                                         << r.output;

  WriteSyntheticDataset(dir_.string(), 100, 20);
  WriteIdx(Path("t10k-labels-idx1-ubyte"), 0x803, {20}, std::vector<uint8_t>(20, 1));
  r = RunCommand({kShardps, "train", "--data-dir", dir_.string()}, 30s);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("wrong magic number 0x00000803"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("t10k-labels-idx1-ubyte"), std::string::npos) << r.output;

  r = RunCommand({kShardps, "train", "--data-dir", Path("nonexistent")}, 30s);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("dataset-fashion-mnist"), std::string::npos) << r.output;
}

// Compressed gradients and parameters end to end: int8 pushes and bf16 pulls learn the easy
// problem, and the report's bytes per step are exactly the encodings' (the MLP 784-256-128-10:
// int8 is n bytes plus one 4-byte scale per 256 elements of each tensor; bf16 is 2 bytes each).
TEST_F(TrainCli, CompressedRunReportsExactlyTheEncodedBytesPerStep) {
  WriteSyntheticDataset(dir_.string(), 240, 60);
  const std::string report = Path("compressed.json");
  auto r = RunCommand(
      {kShardps,    "train", "--data-dir",    dir_.string(), "--servers",          "2",
       "--workers", "3",     "--batch",       "30",          "--epochs",           "3",
       "--lr",      "0.01",  "--compression", "int8",        "--pull-compression", "bf16",
       "--report",  report},
      120s);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = ReadJson(report);
  ASSERT_FALSE(j.is_discarded()) << r.output;
  EXPECT_EQ(j["compression"], "int8");
  EXPECT_EQ(j["pull_compression"], "bf16");
  const uint64_t sizes[] = {784 * 256, 256, 256 * 128, 128, 128 * 10, 10};
  uint64_t fp32 = 0, int8 = 0;
  for (uint64_t n : sizes) {
    fp32 += 4 * n;
    int8 += n + 4 * ((n + 255) / 256);
  }
  EXPECT_EQ(j["bytes_fp32"].get<uint64_t>(), fp32);
  EXPECT_EQ(j["bytes_pushed"].get<uint64_t>(), int8);
  EXPECT_EQ(j["bytes_pulled"].get<uint64_t>(), fp32 / 2);
  EXPECT_GT(j["test_accuracy"].get<double>(), 0.9) << r.output;
  // A codec typo is refused before anything is launched, naming the flag.
  r = RunCommand({kShardps, "train", "--data-dir", dir_.string(), "--compression", "int9"}, 30s);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--compression"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("unknown compression 'int9'"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("[worker"), std::string::npos) << r.output;
}

TEST_F(TrainCli, ImpossibleFlagCombinationsAreRefusedBeforeLaunching) {
  WriteSyntheticDataset(dir_.string(), 100, 20);
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--batch", "10", "--workers", "4"}, "not divisible by --workers 4"},
      {{"--dataset", "mnist"}, "--dataset mnist"},
      {{"--lr", "0"}, "--lr 0"},
      {{"--lr", "-0.1"}, "--lr -0.1"},
      {{"--epochs", "0"}, "--epochs 0"},
      {{"--lr-schedule", "linear"}, "--lr-schedule linear"},
      {{"--batch", "0"}, "--batch 0"},
      {{"--batch", "120"}, "larger than the 100 training samples"},
      {{"--limit", "40", "--batch", "48"}, "larger than the 40 training samples"},
  };
  for (const auto& [flags, message] : cases) {
    std::vector<std::string> argv = {kShardps, "train", "--data-dir", dir_.string()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    auto r = RunCommand(argv, 30s);
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_NE(r.exit_code, 0) << message << "\n" << r.output;
    EXPECT_NE(r.output.find("impossible flag combination"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << message << "\n" << r.output;
    EXPECT_EQ(r.output.find("[worker"), std::string::npos) << r.output;
  }
}

}  // namespace
}  // namespace shardps
