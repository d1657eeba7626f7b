// A worker program for the bounded-staleness proof (launch_test,
// SspBoundHoldsWhileAWorkerIsPaused). The job runs in ssp:K mode; the tensor has one element per
// worker, worker r pushes 1 at element r (sgd, lr 1, initial 0), so the parameters a PushPull
// returns are minus every worker's clock (pushes applied). After each step s it checks, exactly:
//   its own clock is s; every worker's clock is at least s - K - 1 (the pull includes every
//   update older than its clock minus K: it started step s at most K steps ahead of the
//   slowest); the version returned equals the sum of the clocks.
// Worker --pause-rank stops itself (SIGSTOP) after step --pause-step, having written
// DIR/paused (its pid and clock); the test resumes it. A worker whose push waits longer than
// 500 ms records its clock in DIR/waiting-RANK until DIR/resumed exists.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "shardps/worker.h"

extern char** environ;

int main(int argc, char** argv) {
  int steps = 40, k = 0, pause_rank = -1, pause_step = -1;
  std::string dir = ".";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i], v = argv[i + 1];
    if (key == "--steps") steps = std::atoi(v.c_str());
    if (key == "--k") k = std::atoi(v.c_str());
    if (key == "--pause-rank") pause_rank = std::atoi(v.c_str());
    if (key == "--pause-step") pause_step = std::atoi(v.c_str());
    if (key == "--dir") dir = v;
  }
  auto opts = shardps::WorkerOptions::FromEnvironment(environ);
  if (!opts.ok()) {
    std::fprintf(stderr, "%s\n", opts.status().ToString().c_str());
    return 2;
  }
  auto w = shardps::Worker::Connect(*opts);
  if (!w.ok()) {
    std::fprintf(stderr, "connect: %s\n", w.status().ToString().c_str());
    return 1;
  }
  const uint32_t rank = (*w)->rank(), n = (*w)->num_workers();
  shardps::TensorSpec t;
  t.name = "clocks";
  t.shape = {static_cast<int64_t>(n)};
  t.optimizer.lr = 1.0f;
  auto id = (*w)->Declare(t);
  if (!id.ok()) return 1;
  std::vector<float> g(n, 0.0f), out(n);
  g[rank] = 1.0f;
  int64_t max_lead = 0;
  for (int s = 1; s <= steps; ++s) {
    shardps::Handle h = (*w)->PushPull(*id, g.data(), out.data());
    shardps::Status st;
    for (int waited = 0; waited < 120; ++waited) {
      st = h.Wait(std::chrono::milliseconds(500));
      if (!st.IsTimeout()) break;
      if (!std::filesystem::exists(dir + "/resumed"))
        std::ofstream(dir + "/waiting-" + std::to_string(rank)) << s - 1 << "\n";
    }
    if (!st.ok()) {
      std::fprintf(stderr, "worker %u step %d: %s\n", rank, s, st.ToString().c_str());
      return 1;
    }
    int64_t sum = 0, slowest = s;
    for (uint32_t j = 0; j < n; ++j) {
      const auto c = static_cast<int64_t>(-out[j]);
      sum += c;
      slowest = std::min(slowest, c);
      if (c < s - k - 1) {
        std::fprintf(stderr, "worker %u step %d: worker %u's clock is %lld, below %d - %d - 1\n",
                     rank, s, j, static_cast<long long>(c), s, k);
        return 1;
      }
    }
    if (static_cast<int64_t>(-out[rank]) != s || static_cast<int64_t>(h.version()) != sum) {
      std::fprintf(stderr, "worker %u step %d: own clock %g, version %llu, clocks sum %lld\n", rank,
                   s, -out[rank], static_cast<unsigned long long>(h.version()),
                   static_cast<long long>(sum));
      return 1;
    }
    // Its lead when it started step s: the steps it had completed (s - 1) beyond the slowest.
    max_lead = std::max(max_lead, s - 1 - slowest);
    if (static_cast<int>(rank) == pause_rank && s == pause_step) {
      std::ofstream(dir + "/paused") << getpid() << " " << s << "\n";
      std::printf("worker %u: paused at clock %d\n", rank, s);
      std::fflush(stdout);
      raise(SIGSTOP);
    }
  }
  std::printf("worker %u: done, max lead %lld\n", rank, static_cast<long long>(max_lead));
  return (*w)->Finish().ok() ? 0 : 1;
}
