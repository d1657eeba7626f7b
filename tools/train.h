// `shardps train`: data-parallel training of an MLP (784-256-128-10) on Fashion-MNIST through
// ShardPS. Every worker trains on its own 1/W share of the training set and exchanges gradients
// and parameters with the servers only. Standalone it launches a local cluster of itself (after
// checking the flags and the dataset, so that errors show once); under `shardps launch` it
// joins that job. Rank 0 reports: a progress bar (on a terminal) or log lines per epoch, the
// summary, and optionally a JSON report, a PNG plot and a one-process baseline. The train loss
// of an epoch is the mean of rank 0's own mini-batch losses (batch / W samples each); the test
// accuracy is rank 0's, on the whole test set, with the parameters it pulled last (after the
// last epoch: the final parameters, pulled after every worker finished).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cli.h"
#include "core/environment.h"

namespace shardps::tools {

// The defaults are the demo's settings, chosen for test accuracy ~0.89 in under a minute on
// two cores: Adam, lr 5e-4, global batch 256, 20 epochs.
struct TrainFlags {
  std::string dataset = "fashion-mnist";
  std::string data_dir;  // empty: train::kDefaultFashionMnistDir
  std::string optimizer = "adam";
  double lr = 0.0005;
  // The learning rate over the run (Worker::SetLearningRate): constant, or cosine (decayed from
  // lr to 0 over all steps, per step).
  std::string lr_schedule = "cosine";
  int batch = 256;  // global: each of W workers uses batch / W samples per step
  int epochs = 20;
  uint64_t limit = 0;  // use only the first `limit` training samples (0: all)
  uint64_t seed = 1;
  std::string report;  // JSON
  std::string plot;    // PNG
  bool baseline = false;
  std::string compression = "none";       // Compression::Parse
  std::string pull_compression = "none";  // none, fp16, bf16
  // "RANK:MS": worker RANK sleeps MS milliseconds every step (a straggler, for the consistency
  // benchmarks); empty: none.
  std::string slow_worker;
  // The report's time_to_target_seconds: the training time when rank 0's test accuracy first
  // reached this (measured after each epoch).
  double target_accuracy = 0.87;
  // Every this many global steps, the job writes a checkpoint into checkpoint_dir
  // (Worker::Checkpoint, docs/fault-tolerance.md); 0: never. --restore (a job flag) starts from
  // one: training goes on from the step after it.
  uint64_t checkpoint_every = 0;
  // Worker 0 SIGKILLs server 0 before this global step (replication: docs/fault-tolerance.md);
  // 0: no.
  uint64_t kill_server_at = 0;
  // The last worker kills itself (SIGKILL) before this global step; with --restart-workers its
  // new process rejoins the run (docs/fault-tolerance.md).
  uint64_t kill_worker_at = 0;
  std::string checkpoint_dir;  // the job flag --checkpoint-dir (JobFlags::checkpoint_dir)
};

void AddTrainFlags(CLI::App* app, TrainFlags* t);
// `args` are the train subcommand's own arguments, to re-run them under launch.
int RunTrain(const TrainFlags& t, const JobFlags& job, const std::vector<std::string>& args,
             const Environment& env);

}  // namespace shardps::tools
