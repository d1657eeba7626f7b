// A worker program for the multi-process tests: sync push_pull steps with exact checks, and
// on request a death (SIGKILL) or a hang (SIGSTOP) of one rank at one step. Writes its pid to
// DIR/worker-RANK.pid so that tests can check that nothing is left behind.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "shardps/worker.h"

extern char** environ;

int main(int argc, char** argv) {
  int steps = 20, die_rank = -1, die_step = -1;
  std::string how = "kill", piddir, readydir;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--steps") steps = std::atoi(v.c_str());
    if (k == "--die-rank") die_rank = std::atoi(v.c_str());
    if (k == "--die-step") die_step = std::atoi(v.c_str());
    if (k == "--how") how = v;
    if (k == "--pid-dir") piddir = v;
    if (k == "--ready-dir") readydir = v;  // worker-<rank>.ready once the tensor is declared
  }
  auto opts = shardps::WorkerOptions::FromEnvironment(environ);
  if (!opts.ok()) {
    std::fprintf(stderr, "%s\n", opts.status().ToString().c_str());
    return 2;
  }
  if (!piddir.empty()) {
    std::ofstream(piddir + "/worker-" + std::to_string(opts->rank) + ".pid") << getpid() << "\n";
  }
  auto w = shardps::Worker::Connect(*opts);
  if (!w.ok()) {
    std::fprintf(stderr, "connect: %s\n", w.status().ToString().c_str());
    return 1;
  }
  shardps::TensorSpec t;
  t.name = "w";
  t.shape = {1000};
  t.optimizer.lr = 1.0f;
  auto id = (*w)->Declare(t);
  if (!id.ok()) return 1;
  if (!readydir.empty())
    std::ofstream(readydir + "/worker-" + std::to_string((*w)->rank()) + ".ready") << "\n";
  std::vector<float> g(1000, 1.0f), out(1000);
  for (int s = 1; s <= steps; ++s) {
    if (static_cast<int>((*w)->rank()) == die_rank && s == die_step) {
      std::printf("worker %u: %s at step %d\n", (*w)->rank(), how.c_str(), s);
      std::fflush(stdout);
      raise(how == "stop" ? SIGSTOP : SIGKILL);
    }
    shardps::Status st = (*w)->PushPull(*id, g.data(), out.data()).Wait(std::chrono::seconds(60));
    if (!st.ok()) {
      std::fprintf(stderr, "worker %u step %d: %s\n", (*w)->rank(), s, st.ToString().c_str());
      return 1;
    }
    float expect = -static_cast<float>(s);  // mean of 1s, lr 1
    for (float v : out)
      if (v != expect) {
        std::fprintf(stderr, "worker %u step %d: expected %g found %g\n", (*w)->rank(), s, expect,
                     v);
        return 1;
      }
  }
  std::printf("worker %u: done\n", (*w)->rank());
  return (*w)->Finish().ok() ? 0 : 1;
}
