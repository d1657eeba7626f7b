// The cluster secret: the bytes of a file that every process of a job reads (--secret FILE,
// SHARDPS_SECRET_FILE). Connections prove it to each other (transport/auth.h,
// docs/security.md).
#pragma once

#include <string>

#include "shardps/status.h"

namespace shardps {

// Fewest and most bytes a secret file may hold.
inline constexpr size_t kMinSecretBytes = 16;
inline constexpr size_t kMaxSecretBytes = 4096;

// The whole file, byte for byte (a trailing newline included: every process reads the same
// file). InvalidArgument naming the file when it cannot be read, is not a regular file, or
// holds fewer than kMinSecretBytes or more than kMaxSecretBytes. A file that others than its
// owner may read gets a warning (the secret is only as good as the file's mode).
Result<std::string> LoadSecret(const std::string& path);

// What a role logs once at start-up: which secret it uses, or the warning that it has none.
// Returns the secret (empty without a file).
Result<std::string> SecretForRole(const std::string& path, const std::string& role);

}  // namespace shardps
