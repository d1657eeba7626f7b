// Fault injection for the tests of worker loss (tests/integration/failover_test.cc): not part of
// the public API.
#pragma once

#include <memory>

#include "shardps/worker.h"

namespace shardps::worker {

// Destroys `w` as if its process had died: its connections close, and it says no goodbye to
// the coordinator (a worker destroyed normally says one).
void DieWithoutGoodbyeForTest(std::unique_ptr<Worker>& w);

}  // namespace shardps::worker
