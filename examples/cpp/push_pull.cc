// A worker program that uses ShardPS as a library: run it under `shardps launch` (which sets
// the variables WorkerOptions::FromEnvironment reads). Every worker pushes a gradient of 1s for
// 10 sync steps (sgd, lr 1, mean) and checks that it pulls back exactly -step each time.
//
//   shardps launch --servers 1 --workers 2 -- ./push_pull
#include <cstdio>
#include <vector>

#include "shardps/worker.h"

extern char** environ;

int main() {
  auto options = shardps::WorkerOptions::FromEnvironment(environ);
  if (!options.ok()) {
    std::fprintf(stderr, "push_pull: %s (run it under shardps launch)\n",
                 options.status().ToString().c_str());
    return 2;
  }
  auto worker = shardps::Worker::Connect(*options);
  if (!worker.ok()) {
    std::fprintf(stderr, "push_pull: %s\n", worker.status().ToString().c_str());
    return 1;
  }
  shardps::TensorSpec spec{.name = "w", .shape = {1000}};
  spec.optimizer = {.kind = shardps::OptimizerKind::kSgd, .lr = 1.0f};
  auto id = (*worker)->Declare(spec);
  if (!id.ok()) {
    std::fprintf(stderr, "push_pull: %s\n", id.status().ToString().c_str());
    return 1;
  }
  std::vector<float> grad(1000, 1.0f), params(1000);
  for (int step = 1; step <= 10; ++step) {
    shardps::Status st =
        (*worker)->PushPull(*id, grad.data(), params.data()).Wait(std::chrono::seconds(60));
    if (!st.ok()) {
      std::fprintf(stderr, "push_pull: step %d: %s\n", step, st.ToString().c_str());
      return 1;
    }
    for (float p : params) {
      if (p != -static_cast<float>(step)) {
        std::fprintf(stderr, "push_pull: step %d: expected %d, pulled %g\n", step, -step, p);
        return 1;
      }
    }
  }
  std::printf("push_pull: worker %u: 10 steps, every value exact\n", (*worker)->rank());
  return (*worker)->Finish().ok() ? 0 : 1;
}
