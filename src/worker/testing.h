// Fault injection for the tests of worker loss (tests/integration/failover_test.cc): not part of
// the public API.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "shardps/worker.h"

namespace shardps::worker {

// Destroys `w` as if its process had died: its connections close, and it says no goodbye to
// the coordinator (a worker destroyed normally says one).
void DieWithoutGoodbyeForTest(std::unique_ptr<Worker>& w);

// Runs `hook` in `w`'s Declare before each message that creates (or attaches to) chunks on a
// server, with that server's rank: a test can kill the server there. Set before `w` declares.
void BeforeCreateForTest(Worker& w, std::function<void(uint32_t server)> hook);

}  // namespace shardps::worker
