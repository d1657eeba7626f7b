// What the tests of checkpoints of a running job share (docs/fault-tolerance.md, "Checkpoints
// of a running job"): a model whose parameters say exactly which pushes they hold, training
// steps that wait for a checkpoint mid-way, and the check that a checkpoint is one cut.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "server/checkpoint.h"
#include "shardps/worker.h"
#include "support/exact_values.h"

namespace shardps::testing {

using namespace std::chrono_literals;

// Checkpoints of the running job (docs/fault-tolerance.md, "Checkpoints of a running job"): the
// workers' code takes no part. Three SGD tensors with rate 1 and summed integer-valued pushes,
// so that every parameter says exactly which pushes it holds.
inline std::vector<TensorSpec> CutModel() {
  return {Sgd1("a", 3000, 0.0f), Sgd1("b", 500, 1.0f), Sgd1("c", 7, -1.0f)};
}

// init - the sum of worker w's pushes 1..upto[w] of element i.
inline float Expected(float init, const std::vector<uint64_t>& upto, uint64_t i) {
  float v = init;
  for (uint32_t w = 0; w < upto.size(); ++w)
    for (uint64_t s = 1; s <= upto[w]; ++s) v -= Grad(w, s, i);
  return v;
}

// Steps 1..`last` of push_pull of every tensor at once (each waited for), the job's two workers;
// before step `pause` each worker waits (at most 60 s) until `ready()`: a checkpoint was
// written while the steps before it ran.
inline void CutSteps(Worker& w, uint64_t pause, uint64_t last, const std::function<bool()>& ready,
                     std::atomic<uint64_t>* progress, std::vector<TensorId>* declared = nullptr) {
  auto ids = w.Declare(CutModel());
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  if (declared) *declared = *ids;
  const auto model = CutModel();
  for (uint64_t s = 1; s <= last; ++s) {
    if (s == pause) {
      const auto until = std::chrono::steady_clock::now() + 60s;
      while (!ready() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
      ASSERT_TRUE(ready()) << "no checkpoint within 60 s";
    }
    std::vector<std::vector<float>> g(model.size()), out(model.size());
    std::vector<Handle> hs;
    for (size_t k = 0; k < model.size(); ++k) {
      const int64_t n = model[k].shape[0];
      g[k].resize(n);
      out[k].resize(n);
      for (int64_t i = 0; i < n; ++i) g[k][i] = Grad(w.rank(), s, i);
      hs.push_back(w.PushPull((*ids)[k], g[k].data(), out[k].data()));
    }
    for (auto& h : hs) ASSERT_TRUE(h.Wait(60s).ok());
    if (w.rank() == 0) progress->store(s);
  }
}

// Every chunk of the checkpoint in `dir` holds exactly the pushes its sequence table says, and
// every chunk of a tensor the same ones (one cut): sync, every tensor at one version `*at`.
inline void ExpectOneCut(const std::string& dir, Mode mode, uint64_t* at) {
  auto cp = server::ReadCheckpoint(dir);
  ASSERT_TRUE(cp.ok()) << cp.status().ToString();
  const auto model = CutModel();
  ASSERT_EQ(cp->tensors.size(), model.size());
  std::optional<uint64_t> version;
  for (const auto& spec : model) {
    SCOPED_TRACE(spec.name);
    const auto& chunks = cp->tensors.at(spec.name);
    std::optional<std::vector<uint64_t>> upto;
    uint64_t covered = 0;
    for (const auto& [offset, st] : chunks) {
      std::vector<uint64_t> applied(2, st.version);  // sync: every worker's pushes of each step
      if (mode != Mode::kSync) {
        ASSERT_EQ(st.last_seq.size(), 2u);
        applied = st.last_seq;
        EXPECT_EQ(st.version, applied[0] + applied[1]);  // async: one version per push
      }
      if (!upto) upto = applied;
      EXPECT_EQ(applied, *upto) << "chunk at " << offset << " holds another cut";
      if (mode == Mode::kSync) {
        if (!version) version = st.version;
        EXPECT_EQ(st.version, *version) << "chunk at " << offset;
      }
      ASSERT_EQ(st.params.size(), st.numel);
      for (uint64_t i = 0; i < st.numel; ++i)
        ASSERT_EQ(st.params[i], Expected(spec.init_value, applied, offset + i))
            << "element " << offset + i;
      covered += st.numel;
    }
    EXPECT_EQ(covered, static_cast<uint64_t>(spec.shape[0]));
    if (at && upto) *at = std::max((*upto)[0], (*upto)[1]);
  }
}

}  // namespace shardps::testing
