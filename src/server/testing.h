// Fault injection for the tests of replication (tests/integration/failover_test.cc): not part of
// the public API.
#pragma once

#include "shardps/server.h"

namespace shardps::server {

// Closes the connections over which server `s` forwards pushes to its chunks' backups, as a
// reset link would. With `reopen`, the server reopens them (as it does after any such close);
// without, they stay closed until this is called again with `reopen`, so that the pushes waiting
// on them run into their bound.
void CloseReplicationLinksForTest(Server& s, bool reopen);

}  // namespace shardps::server
