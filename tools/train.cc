#include "train.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kill_server.h"
#include "launch.h"
#include "server/optimizer.h"
#include "shardps/worker.h"
#include "train/idx.h"
#include "train/mlp.h"
#include "train/plot.h"
#include "train/progress.h"

namespace shardps::tools {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using train::ConstPtrs;
using train::Dataset;
using train::Ptrs;
using train::Tensors;

constexpr auto kOpTimeout = 120s;
// Workers may drift apart in async mode (rank 0 also evaluates), so barriers wait longer.
constexpr auto kBarrierTimeout = 600s;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One line on stdout, flushed (under `shardps launch` stdout is a pipe).
template <typename... A>
void Say(fmt::format_string<A...> f, A&&... a) {
  fmt::print(stdout, f, std::forward<A>(a)...);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

int Fail(const Status& st, int code = 1) {
  std::fprintf(stderr, "shardps train: %s\n", st.ToString().c_str());
  return code;
}

Status Impossible(const std::string& why) {
  return Status::InvalidArgument("impossible flag combination: " + why);
}

// "RANK:MS" -> (rank, ms); "" -> (-1, 0).
Result<std::pair<int, int>> ParseSlowWorker(const std::string& s) {
  if (s.empty()) return std::make_pair(-1, 0);
  int rank = -1, ms = -1;
  char extra = 0;
  if (std::sscanf(s.c_str(), "%d:%d%c", &rank, &ms, &extra) != 2 || rank < 0 || ms < 0 ||
      ms > 60000)
    return Status::InvalidArgument(
        fmt::format("'{}': expected RANK:MS, e.g. 3:50 (MS at most 60000)", s));
  return std::make_pair(rank, ms);
}

// The learning rate of global step `step` (1-based) of `total`: --lr-schedule.
double ScheduledLr(const TrainFlags& t, uint64_t step, uint64_t total) {
  if (t.lr_schedule != "cosine" || total <= 1) return t.lr;
  const double done = static_cast<double>(step - 1) / static_cast<double>(total);
  return t.lr * 0.5 * (1.0 + std::cos(M_PI * done));
}

// The checks that need neither the data nor the cluster.
Status CheckFlags(const TrainFlags& t, uint32_t workers) {
  if (t.dataset != "fashion-mnist")
    return Impossible(fmt::format("--dataset {}: only fashion-mnist is supported", t.dataset));
  if (!(t.lr > 0) || !std::isfinite(t.lr))
    return Impossible(fmt::format("--lr {} must be a positive number", t.lr));
  if (t.epochs <= 0) return Impossible(fmt::format("--epochs {} must be positive", t.epochs));
  if (t.lr_schedule != "constant" && t.lr_schedule != "cosine")
    return Impossible(fmt::format("--lr-schedule {}: expected constant or cosine", t.lr_schedule));
  if (t.batch <= 0) return Impossible(fmt::format("--batch {} must be positive", t.batch));
  if (static_cast<uint32_t>(t.batch) % workers != 0)
    return Impossible(fmt::format(
        "--batch {} is not divisible by --workers {} (--batch is the global batch; each worker "
        "uses batch / workers samples per step)",
        t.batch, workers));
  if (t.checkpoint_every > 0 && t.checkpoint_dir.empty())
    return Impossible("--checkpoint-every needs --checkpoint-dir: where the checkpoints go");
  auto k = ParseOptimizer(t.optimizer);
  if (!k.ok()) return k.status().WithContext("--optimizer");
  auto c = Compression::Parse(t.compression);
  if (!c.ok()) return c.status().WithContext("--compression");
  if (t.pull_compression != "none" && t.pull_compression != "fp16" && t.pull_compression != "bf16")
    return Impossible(
        fmt::format("--pull-compression {}: expected none, fp16 or bf16", t.pull_compression));
  auto slow = ParseSlowWorker(t.slow_worker);
  if (!slow.ok()) return slow.status().WithContext("--slow-worker");
  if (!(t.target_accuracy > 0 && t.target_accuracy <= 1))
    return Impossible(fmt::format("--target-accuracy {} must be in (0, 1]", t.target_accuracy));
  return Status::OK();
}

Codec PullCodec(const std::string& s) {
  return s == "fp16" ? Codec::kFp16 : s == "bf16" ? Codec::kBf16 : Codec::kNone;
}

// The number of training samples used; checks that every worker gets at least one step.
Result<size_t> TrainSize(const TrainFlags& t, uint32_t workers, size_t available) {
  const size_t n = t.limit > 0 ? std::min<size_t>(t.limit, available) : available;
  if (workers > n)
    return Impossible(fmt::format("{} workers but only {} training samples", workers, n));
  if (static_cast<size_t>(t.batch) > n)
    return Impossible(fmt::format("--batch {} is larger than the {} training samples", t.batch, n));
  return n;
}

std::string DataDir(const TrainFlags& t) {
  return t.data_dir.empty() ? train::kDefaultFashionMnistDir : t.data_dir;
}

uint64_t Mix(uint64_t x) {  // SplitMix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void Shuffle(std::vector<uint32_t>* v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = v->size(); i > 1; --i) std::swap((*v)[i - 1], (*v)[rng() % i]);
}

// The samples of worker `rank` in `epoch`, in order: its strided 1/W share (rank, rank+W, ...)
// of the first n samples shuffled with the seed, reshuffled every epoch. Every process computes
// the same, which is how the baseline replays the distributed run's global batches.
std::vector<uint32_t> EpochOrder(size_t n, uint32_t workers, uint32_t rank, int epoch,
                                 uint64_t seed) {
  std::vector<uint32_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0u);
  Shuffle(&perm, Mix(seed));
  std::vector<uint32_t> share;
  for (size_t i = rank; i < n; i += workers) share.push_back(perm[i]);
  Shuffle(&share, Mix(Mix(seed) ^ Mix((uint64_t{static_cast<uint32_t>(epoch)} << 32) | rank)));
  return share;
}

void Gather(const Dataset& d, const uint32_t* idx, size_t n, float* x, uint8_t* y) {
  const size_t f = static_cast<size_t>(d.rows) * static_cast<size_t>(d.cols);
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(x + i * f, d.images.data() + idx[i] * f, f * sizeof(float));
    y[i] = d.labels[idx[i]];
  }
}

double TestAccuracy(train::Mlp& mlp, const Tensors& params, const Dataset& test) {
  const int n = static_cast<int>(test.size());
  return static_cast<double>(
             mlp.CountCorrect(ConstPtrs(params), test.images.data(), test.labels.data(), n)) /
         n;
}

// What every process derives from the flags and the data.
struct Plan {
  size_t samples;  // training samples used
  uint32_t workers;
  int local_batch;      // per worker and step
  int steps;            // per epoch, the same on every worker
  OptimizerConfig opt;  // what the servers (and the baseline) apply
  train::MlpShape shape;
};

Result<Plan> MakePlan(const TrainFlags& t, uint32_t workers, size_t available) {
  SHARDPS_RETURN_IF_ERROR(CheckFlags(t, workers));
  Plan p;
  SHARDPS_ASSIGN_OR_RETURN(p.samples, TrainSize(t, workers, available));
  p.workers = workers;
  if (auto slow = ParseSlowWorker(t.slow_worker);
      slow.ok() && slow->first >= 0 && static_cast<uint32_t>(slow->first) >= workers)
    return Impossible(
        fmt::format("--slow-worker {}: there are {} workers", t.slow_worker, workers));
  p.local_batch = t.batch / static_cast<int>(workers);
  p.steps = static_cast<int>(p.samples / static_cast<size_t>(t.batch));
  SHARDPS_ASSIGN_OR_RETURN(p.opt.kind, ParseOptimizer(t.optimizer));
  p.opt.lr = static_cast<float>(t.lr);
  SHARDPS_RETURN_IF_ERROR(p.opt.Validate());
  return p;
}

struct EpochResult {
  int epoch;
  double train_loss, test_accuracy, seconds, samples_per_second;
  double elapsed = 0;  // training seconds from the start to the end of this epoch
};

struct RunResult {
  std::vector<EpochResult> epochs;
  double wall_seconds = 0;
  double first_loss = 0, last_loss = 0;  // mean loss over the first / last 10% of steps
  // Rank 0's data-plane bytes over the training steps (WorkerStats), and the model's bytes.
  uint64_t bytes_pushed = 0, bytes_pulled = 0, steps = 0, model_bytes = 0;
  uint32_t sync_quorum = 0;
  uint64_t late_steps = 0;  // rank 0's steps whose push was dropped as late (sync quorum)
  // Per worker, over every server: what the servers counted of its pushes (ServerStats).
  nlohmann::json worker_stats = nlohmann::json::array();
};

// The servers' per-worker statistics, summed (maxima: the largest) over the servers.
Result<nlohmann::json> WorkerPushStats(Worker& w) {
  nlohmann::json all = nlohmann::json::array();
  for (uint32_t srv = 0; srv < w.num_servers(); ++srv) {
    auto js = w.ServerStats(srv);
    if (js.status().IsUnavailable()) continue;  // declared dead: its backups counted anew
    if (!js.ok()) return js.status().WithContext(fmt::format("stats of server {}", srv));
    auto j = nlohmann::json::parse(*js, nullptr, false);
    if (j.is_discarded() || !j.contains("workers"))
      return Status::Internal(fmt::format("malformed stats from server {}", srv));
    for (const auto& x : j["workers"]) {
      const size_t r = x.value("rank", 0u);
      while (all.size() <= r)
        all.push_back({{"rank", all.size()},
                       {"pushes", 0},
                       {"late_pushes", 0},
                       {"waits", 0},
                       {"max_staleness", 0},
                       {"staleness_sum", 0.0},
                       {"max_steps_behind", 0}});
      auto& o = all[r];
      const uint64_t pushes = x.value("pushes", uint64_t{0});
      o["pushes"] = o["pushes"].get<uint64_t>() + pushes;
      o["late_pushes"] = o["late_pushes"].get<uint64_t>() + x.value("late_pushes", uint64_t{0});
      o["waits"] = o["waits"].get<uint64_t>() + x.value("waits", uint64_t{0});
      o["max_staleness"] =
          std::max(o["max_staleness"].get<uint64_t>(), x.value("max_staleness", uint64_t{0}));
      o["staleness_sum"] =
          o["staleness_sum"].get<double>() + x.value("mean_staleness", 0.0) * pushes;
      o["max_steps_behind"] =
          std::max(o["max_steps_behind"].get<uint64_t>(), x.value("max_steps_behind", uint64_t{0}));
    }
  }
  for (auto& o : all) {
    const double pushes = o["pushes"].get<double>();
    o["mean_staleness"] = pushes > 0 ? o["staleness_sum"].get<double>() / pushes : 0.0;
    o.erase("staleness_sum");
  }
  return all;
}

// The training time when rank 0's test accuracy first reached `target`; null when it never did.
nlohmann::json TimeToTarget(const RunResult& r, double target) {
  for (const auto& e : r.epochs)
    if (e.test_accuracy >= target) return e.elapsed;
  return nullptr;
}

// Means of the first and last 10% (at least one) of `losses`.
void FirstLast(const std::vector<float>& losses, RunResult* r) {
  const size_t k = std::max<size_t>(1, losses.size() / 10);
  r->first_loss = std::accumulate(losses.begin(), losses.begin() + k, 0.0) / k;
  r->last_loss = std::accumulate(losses.end() - k, losses.end(), 0.0) / k;
}

void SayEpoch(const char* who, const EpochResult& e, int epochs) {
  Say("{}epoch {}/{}: train loss {:.4f}, test accuracy {:.4f}, {:.0f} samples/s, {:.1f} s", who,
      e.epoch, epochs, e.train_loss, e.test_accuracy, e.samples_per_second, e.seconds);
}

// The same model, data order and global batches in this one process, without the parameter
// server: each step applies the optimizer to the mean gradient of the whole global batch.
RunResult RunBaseline(const TrainFlags& t, const Plan& p, const Dataset& train,
                      const Dataset& test) {
  const size_t f = static_cast<size_t>(train.rows) * static_cast<size_t>(train.cols);
  const size_t b = static_cast<size_t>(p.local_batch);
  train::Mlp mlp(p.shape);
  Tensors params = train::InitParams(p.shape, t.seed), grads;
  std::vector<server::OptimizerState> state(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    grads.emplace_back(params[k].size());
    server::InitOptimizerState(p.opt, params[k].size(), &state[k]);
  }
  std::vector<float> x(static_cast<size_t>(t.batch) * f), losses;
  std::vector<uint8_t> y(static_cast<size_t>(t.batch));
  RunResult r;
  const auto t0 = Clock::now();
  for (int e = 0; e < t.epochs; ++e) {
    const auto te = Clock::now();
    std::vector<std::vector<uint32_t>> orders;
    for (uint32_t w = 0; w < p.workers; ++w)
      orders.push_back(EpochOrder(p.samples, p.workers, w, e, t.seed));
    double sum = 0;
    for (int s = 0; s < p.steps; ++s) {
      for (uint32_t w = 0; w < p.workers; ++w)
        Gather(train, orders[w].data() + s * b, b, x.data() + w * b * f, y.data() + w * b);
      const float loss =
          mlp.ForwardBackward(ConstPtrs(params), x.data(), y.data(), t.batch, Ptrs(grads));
      OptimizerConfig opt = p.opt;
      opt.lr = static_cast<float>(ScheduledLr(t, static_cast<uint64_t>(e) * p.steps + s + 1,
                                              static_cast<uint64_t>(t.epochs) * p.steps));
      for (size_t k = 0; k < params.size(); ++k)
        server::ApplyOptimizer(opt, params[k].data(), params[k].data(), grads[k].data(), nullptr,
                               1.0f, params[k].size(), &state[k]);
      sum += loss;
      losses.push_back(loss);
    }
    const double secs = Since(te);
    r.epochs.push_back({e + 1, sum / p.steps, TestAccuracy(mlp, params, test), secs,
                        static_cast<double>(p.steps) * t.batch / secs, Since(t0)});
    SayEpoch("baseline ", r.epochs.back(), t.epochs);
  }
  r.wall_seconds = Since(t0);
  FirstLast(losses, &r);
  return r;
}

nlohmann::json EpochsJson(const RunResult& r) {
  auto a = nlohmann::json::array();
  for (const auto& e : r.epochs)
    a.push_back({{"epoch", e.epoch},
                 {"train_loss", e.train_loss},
                 {"test_accuracy", e.test_accuracy},
                 {"seconds", e.seconds},
                 {"elapsed_seconds", e.elapsed},
                 {"samples_per_second", e.samples_per_second}});
  return a;
}

std::vector<train::EpochPoint> Points(const RunResult& r) {
  std::vector<train::EpochPoint> pts;
  for (const auto& e : r.epochs) pts.push_back({e.epoch, e.train_loss, e.test_accuracy});
  return pts;
}

// Rank 0's epilogue: the baseline, the report and the plot.
int Conclude(const TrainFlags& t, const Plan& p, const RunResult& run, uint32_t servers,
             const std::string& mode, const Dataset& train, const Dataset& test) {
  const EpochResult& last = run.epochs.back();
  const double sps = static_cast<double>(p.steps) * t.batch * t.epochs / run.wall_seconds;
  Say("train: done in {:.1f} s: test accuracy {:.4f}, train loss {:.4f} (rank 0's mean "
      "mini-batch loss of the last epoch), {:.0f} samples/s; mean loss over the first 10% of "
      "steps {:.4f}, over the last 10% {:.4f}",
      run.wall_seconds, last.test_accuracy, last.train_loss, sps, run.first_loss, run.last_loss);
  if (auto tt = TimeToTarget(run, t.target_accuracy); !tt.is_null())
    Say("train: test accuracy {:.2f} reached after {:.1f} s of training", t.target_accuracy,
        tt.get<double>());
  const uint64_t per = std::max<uint64_t>(run.steps, 1);
  Say("train: compression {} (pulls {}): rank 0 pushed {} and pulled {} bytes per step; the "
      "model is {} bytes in fp32",
      t.compression, t.pull_compression, run.bytes_pushed / per, run.bytes_pulled / per,
      run.model_bytes);
  nlohmann::json report = {{"dataset", t.dataset},
                           {"test_accuracy", last.test_accuracy},
                           {"train_loss", last.train_loss},
                           {"epochs", t.epochs},
                           {"wall_seconds", run.wall_seconds},
                           {"samples_per_second", sps},
                           {"workers", p.workers},
                           {"servers", servers},
                           {"mode", mode},
                           {"sync_quorum", run.sync_quorum},
                           {"slow_worker", t.slow_worker},
                           {"late_steps", run.late_steps},
                           {"worker_push_stats", run.worker_stats},
                           {"target_accuracy", t.target_accuracy},
                           {"time_to_target_seconds", TimeToTarget(run, t.target_accuracy)},
                           {"optimizer", t.optimizer},
                           {"lr", t.lr},
                           {"lr_schedule", t.lr_schedule},
                           {"batch", t.batch},
                           {"train_samples", p.samples},
                           {"test_samples", test.size()},
                           {"steps_per_epoch", p.steps},
                           {"seed", t.seed},
                           {"first_loss", run.first_loss},
                           {"compression", t.compression},
                           {"pull_compression", t.pull_compression},
                           {"bytes_pushed", run.bytes_pushed / std::max<uint64_t>(run.steps, 1)},
                           {"bytes_pulled", run.bytes_pulled / std::max<uint64_t>(run.steps, 1)},
                           {"bytes_fp32", run.model_bytes},
                           {"last_loss", run.last_loss},
                           {"epochs_detail", EpochsJson(run)}};
  RunResult base;
  if (t.baseline) {
    Say("baseline: the same model, data order and global batch of {} in one process", t.batch);
    base = RunBaseline(t, p, train, test);
    const double acc = base.epochs.back().test_accuracy;
    Say("baseline: done in {:.1f} s: test accuracy {:.4f}; the parameter server's run is {:+.2f} "
        "points from it",
        base.wall_seconds, acc, (last.test_accuracy - acc) * 100);
    report["baseline_test_accuracy"] = acc;
    report["baseline_wall_seconds"] = base.wall_seconds;
    report["baseline_train_loss"] = base.epochs.back().train_loss;
    report["baseline_epochs_detail"] = EpochsJson(base);
  }
  int rc = 0;
  if (!t.report.empty()) {
    std::ofstream f(t.report);
    f << report.dump(2) << "\n";
    if (f.flush()) {
      Say("train: report in {}", t.report);
    } else {
      rc = Fail(Status::IOError(fmt::format("cannot write the report {}", t.report)));
    }
  }
  if (!t.plot.empty()) {
    Status st = train::WritePlot(
        t.plot, Points(run), Points(base),
        fmt::format("Fashion-MNIST MLP, {} workers, {} servers, {}", p.workers, servers, mode));
    if (st.ok()) {
      Say("train: plot in {}", t.plot);
    } else {
      rc = Fail(st.WithContext("--plot"));
    }
  }
  return rc;
}

// One worker of the job: trains on its share, exchanging gradients for parameters each step.
int RunWorker(const TrainFlags& t, const Environment& env) {
  auto envp = env.Envp();
  auto wo = WorkerOptions::FromEnvironment(envp.data());
  if (!wo.ok()) return Fail(wo.status(), 2);
  auto data = train::LoadFashionMnist(DataDir(t));
  if (!data.ok()) return Fail(data.status());
  const Dataset& train = data->first;
  const Dataset& test = data->second;
  if (Status st = CheckFlags(t, 1); !st.ok()) return Fail(st, 2);
  auto worker = Worker::Connect(*wo);
  if (!worker.ok()) return Fail(worker.status());
  Worker& w = **worker;
  auto plan = MakePlan(t, w.num_workers(), train.size());
  if (!plan.ok()) return Fail(plan.status(), 2);
  const Plan& p = *plan;
  const bool rank0 = w.rank() == 0;
  const std::string mode_name = ModeString(w.mode(), w.staleness());
  const auto slow = ParseSlowWorker(t.slow_worker).value();  // checked by CheckFlags
  const int slow_ms = slow.first == static_cast<int>(w.rank()) ? slow.second : 0;
  const auto tty_env = env.Get(tunables::kTrainTty.env);
  const bool tty = rank0 && (tty_env ? *tty_env == "1" : isatty(1) != 0);

  Tensors params = train::InitParams(p.shape, t.seed), grads;
  std::vector<TensorSpec> specs;
  const auto pspecs = train::ParamSpecs(p.shape);
  for (size_t k = 0; k < pspecs.size(); ++k) {
    TensorSpec s;
    s.name = pspecs[k].name;
    s.shape = {static_cast<int64_t>(pspecs[k].rows)};
    if (pspecs[k].cols > 1) s.shape.push_back(static_cast<int64_t>(pspecs[k].cols));
    s.init = params[k].data();
    s.optimizer = p.opt;
    s.compression = Compression::Parse(t.compression).value();  // checked by CheckFlags
    s.pull_codec = PullCodec(t.pull_compression);
    specs.push_back(s);
    grads.emplace_back(params[k].size());
  }
  auto ids = w.Declare(specs);
  if (!ids.ok()) return Fail(ids.status());
  auto wait_all = [&](const std::vector<Handle>& hs) {
    for (const auto& h : hs) {
      Status st = h.Wait(kOpTimeout);
      if (!st.ok()) return st.WithContext(fmt::format("worker {}", w.rank()));
    }
    return Status::OK();
  };
  if (rank0)
    Say("train: {} on {} training / {} test samples: {} workers x {} samples per step (global "
        "batch {}), {} steps per epoch, {} epochs, {} mode, {} servers, {} lr {} ({}){}",
        t.dataset, p.samples, test.size(), p.workers, p.local_batch, t.batch, p.steps, t.epochs,
        mode_name, w.num_servers(), t.optimizer, t.lr, t.lr_schedule,
        wo->local_size > 1
            ? fmt::format(", {} workers per node reduce before they push", wo->local_size)
            : std::string());
  // A worker that rejoined the run (a new process in the place of one that died) finds the
  // others past the start: it pulls the current parameters, and the loop below skips the steps
  // up to where its tensors go on.
  if (!w.rejoined())
    if (Status st = w.Barrier("train.start", kBarrierTimeout); !st.ok()) return Fail(st);
  // Servers restored from a checkpoint (--restore) hold its parameters (at version > 0): this
  // worker starts from them, and in sync mode the loop below skips the steps up to it.
  const std::string restored_from = env.Get(tunables::kRestore.env).value_or("");
  if (w.rejoined()) {
    std::vector<Handle> hs;
    for (size_t k = 0; k < params.size(); ++k) hs.push_back(w.Pull((*ids)[k], params[k].data()));
    if (Status st = wait_all(hs); !st.ok()) return Fail(st);
    Say("train: worker {} rejoined the run: parameters at version {}, training goes on from "
        "step {}",
        w.rank(), hs[0].version(), w.steps((*ids)[0]) + 1);
  } else if (!restored_from.empty()) {
    std::vector<Handle> hs;
    for (size_t k = 0; k < params.size(); ++k) hs.push_back(w.Pull((*ids)[k], params[k].data()));
    if (Status st = wait_all(hs); !st.ok()) return Fail(st);
    if (rank0)
      Say("train: restored from {} at version {}{}", restored_from, hs[0].version(),
          w.mode() == Mode::kSync
              ? fmt::format(": training goes on from step {}", w.steps((*ids)[0]) + 1)
              : std::string());
  }

  // The steps a restored sync job starts past: no checkpoint is taken again for them (the one
  // restored from may be the only one).
  const uint64_t restored_step = w.steps((*ids)[0]);
  // Every worker takes the checkpoint after the same global steps, computed or skipped.
  auto checkpoint = [&](uint64_t global) {
    if (t.checkpoint_every == 0 || global % t.checkpoint_every != 0 || global <= restored_step)
      return Status::OK();
    Status st = w.Checkpoint(t.checkpoint_dir, kBarrierTimeout);
    if (st.ok() && rank0) Say("train: checkpoint after step {} in {}", global, t.checkpoint_dir);
    return st;
  };
  const size_t f = static_cast<size_t>(train.rows) * static_cast<size_t>(train.cols);
  const size_t b = static_cast<size_t>(p.local_batch);
  train::Mlp mlp(p.shape);
  std::vector<float> x(b * f), losses;
  std::vector<uint8_t> y(b);
  RunResult run;
  run.sync_quorum = w.sync_quorum();
  const auto t0 = Clock::now();
  for (int e = 0; e < t.epochs; ++e) {
    const auto order = EpochOrder(p.samples, p.workers, w.rank(), e, t.seed);
    train::Progress bar(stdout, tty, fmt::format("epoch {}/{}", e + 1, t.epochs),
                        static_cast<size_t>(p.steps) * t.batch);
    const auto te = Clock::now();
    double sum = 0;
    int computed = 0;
    for (int s = 0; s < p.steps; ++s) {
      // Sync with a quorum (backup workers): a push that came after its step was published was
      // dropped, and the tensor moved on to the published version (Worker::steps); this worker
      // skips the steps that every tensor is past.
      const uint64_t global = static_cast<uint64_t>(e) * p.steps + s + 1;
      bool behind = false;
      for (size_t k = 0; k < params.size(); ++k) behind = behind || w.steps((*ids)[k]) < global;
      if (!behind) {
        if (Status st = checkpoint(global); !st.ok()) return Fail(st);
        continue;
      }
      if (slow_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms));
      if (global == t.kill_worker_at && w.rank() + 1 == w.num_workers() && !w.rejoined()) {
        Say("train: worker {} kills itself (SIGKILL) before step {}", w.rank(), global);
        raise(SIGKILL);
      }
      const bool kill_now = rank0 && global == t.kill_server_at && w.num_servers() > 1;
      const auto killed_at = Clock::now();
      if (kill_now) {
        auto pid = KillServerProcess(w, 0);
        if (!pid.ok()) return Fail(pid.status().WithContext("--kill-server-at"));
        Say("train: killed server 0 (pid {}) before step {}", *pid, global);
      }
      Gather(train, order.data() + s * b, b, x.data(), y.data());
      const float loss =
          mlp.ForwardBackward(ConstPtrs(params), x.data(), y.data(), p.local_batch, Ptrs(grads));
      if (t.lr_schedule != "constant") {
        const auto lr =
            static_cast<float>(ScheduledLr(t, global, static_cast<uint64_t>(t.epochs) * p.steps));
        for (size_t k = 0; k < params.size(); ++k)
          if (Status st = w.SetLearningRate((*ids)[k], lr); !st.ok()) return Fail(st);
      }
      std::vector<Handle> hs;
      for (size_t k = 0; k < params.size(); ++k)
        hs.push_back(w.steps((*ids)[k]) < global
                         ? w.PushPull((*ids)[k], grads[k].data(), params[k].data())
                         : w.Pull((*ids)[k], params[k].data()));  // already past this step
      if (Status st = wait_all(hs); !st.ok()) return Fail(st);
      if (kill_now) {
        Say("train: step {} completed {:.0f} ms after server 0 was killed: its chunks' backups "
            "took over",
            global, std::chrono::duration<double, std::milli>(Clock::now() - killed_at).count());
      }
      if (std::any_of(hs.begin(), hs.end(), [](const Handle& h) { return h.late(); }))
        run.late_steps++;
      if (Status st = checkpoint(global); !st.ok()) return Fail(st);
      sum += loss;
      computed++;
      if (rank0) {
        losses.push_back(loss);
        bar.Update(static_cast<size_t>(s + 1) * t.batch, sum / (s + 1));
      }
    }
    const double secs = Since(te);
    bar.Finish();
    if (e + 1 == t.epochs) {
      const WorkerStats ws = w.stats();
      run.bytes_pushed = ws.bytes_pushed;
      run.bytes_pulled = ws.bytes_pulled;
      run.steps = static_cast<uint64_t>(p.steps) * static_cast<uint64_t>(t.epochs);
      // The final parameters: in async mode, newer than what this worker pulled last.
      if (Status st = w.Barrier("train.end", kBarrierTimeout); !st.ok()) return Fail(st);
      if (rank0) {
        std::vector<Handle> hs;
        for (size_t k = 0; k < params.size(); ++k)
          hs.push_back(w.Pull((*ids)[k], params[k].data()));
        if (Status st = wait_all(hs); !st.ok()) return Fail(st);
        auto ws = WorkerPushStats(w);
        if (!ws.ok()) return Fail(ws.status());
        run.worker_stats = std::move(ws).value();
      }
    }
    if (rank0) {
      run.epochs.push_back({e + 1, sum / std::max(computed, 1), TestAccuracy(mlp, params, test),
                            secs, static_cast<double>(p.steps) * t.batch / secs, Since(t0)});
      SayEpoch("", run.epochs.back(), t.epochs);
    }
  }
  run.wall_seconds = Since(t0);
  for (const auto& v : params) run.model_bytes += v.size() * sizeof(float);
  const uint32_t servers = w.num_servers();
  if (Status st = w.Finish(); !st.ok()) return Fail(st);
  worker->reset();  // the servers can go; the baseline runs without them
  if (!rank0) return 0;
  FirstLast(losses, &run);
  return Conclude(t, p, run, servers, mode_name, train, test);
}

}  // namespace

void AddTrainFlags(CLI::App* app, TrainFlags* t) {
  app->add_option("--dataset", t->dataset, "dataset (fashion-mnist)");
  app->add_option(
      "--data-dir", t->data_dir,
      fmt::format("directory of the IDX files (default {})", train::kDefaultFashionMnistDir));
  app->add_option("--optimizer", t->optimizer, "sgd, momentum, adam or adagrad")
      ->check(CLI::IsMember({"sgd", "momentum", "adam", "adagrad"}));
  app->add_option("--lr", t->lr, "learning rate");
  app->add_option("--lr-schedule", t->lr_schedule,
                  "the learning rate over the run: constant, or cosine (from --lr to 0 over all "
                  "steps)");
  app->add_option("--batch", t->batch, "global batch (each worker uses batch / workers)");
  app->add_option("--epochs", t->epochs, "passes over the training set");
  app->add_option("--limit", t->limit, "use only the first N training samples (0: all)");
  app->add_option("--seed", t->seed, "seed of the initial parameters and the data order");
  app->add_option("--report", t->report, "write a JSON report here");
  app->add_option("--plot", t->plot, "write a PNG of loss and accuracy per epoch here");
  app->add_option("--compression", t->compression,
                  "gradient compression: none, fp16, bf16, int8[:block=N], onebit[:block=N] or "
                  "topk[:1%|:0.01|:k=N] (error feedback: ef=on|off; docs/compression.md)");
  app->add_option("--pull-compression", t->pull_compression,
                  "parameters on the wire: none, fp16 or bf16");
  app->add_option("--slow-worker", t->slow_worker,
                  "RANK:MS: worker RANK sleeps MS milliseconds every step (a straggler)");
  app->add_option("--target-accuracy", t->target_accuracy,
                  "the report's time_to_target_seconds is when the test accuracy reached this");
  app->add_option("--checkpoint-every", t->checkpoint_every,
                  "write a checkpoint every N global steps into --checkpoint-dir (0: never); "
                  "--restore DIR starts a run from one");
  app->add_option("--kill-server-at", t->kill_server_at,
                  "worker 0 kills server 0 (SIGKILL; on this host) before this global step: with "
                  "--replicas 1 the run goes on with its backups (docs/fault-tolerance.md)");
  app->add_option("--kill-worker-at", t->kill_worker_at,
                  "the last worker kills itself (SIGKILL) before this global step: with "
                  "--on-worker-loss continue the run goes on without it, and with "
                  "--restart-workers 1 its new process rejoins (docs/fault-tolerance.md)");
  app->add_flag("--baseline", t->baseline,
                "also train the same model in one process without the parameter server");
}

int RunTrain(const TrainFlags& t, const JobFlags& job, const std::vector<std::string>& args,
             const Environment& env) {
  if (env.Has(tunables::kCoordinator.env)) return RunWorker(t, env);
  // Standalone: check everything here, so that an error shows once and fast, then launch a
  // local cluster whose workers are this same command.
  if (Status st = CheckFlags(t, job.workers); !st.ok()) return Fail(st, 2);
  if (t.kill_worker_at > 0 && (job.workers < 2 || job.on_worker_loss != "continue"))
    return Fail(Impossible("--kill-worker-at needs --workers 2 or more and --on-worker-loss "
                           "continue (otherwise a worker's death ends the run)"),
                2);
  if (t.kill_server_at > 0 && (job.servers < 2 || job.replicas == 0))
    return Fail(Impossible("--kill-server-at needs --servers 2 or more and --replicas 1 (a run "
                           "without backups ends when a server dies)"),
                2);
  {
    auto data = train::LoadFashionMnist(DataDir(t));
    if (!data.ok()) return Fail(data.status());
    auto plan = MakePlan(t, job.workers, data->first.size());
    if (!plan.ok()) return Fail(plan.status(), 2);
  }
  std::vector<std::string> program = {SelfExe(), "train"};
  program.insert(program.end(), args.begin(), args.end());
  auto lo = LaunchFor(job, std::move(program), env);
  if (!lo.ok()) return Fail(lo.status(), 2);
  // The workers' stdout is the launcher's pipe: tell rank 0 whether a terminal is at the end.
  lo->env.push_back(fmt::format("{}={}", tunables::kTrainTty.env, isatty(1) ? 1 : 0));
  return RunLaunch(*lo);
}

}  // namespace shardps::tools
