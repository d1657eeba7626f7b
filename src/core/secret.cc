#include "core/secret.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace shardps {

Result<std::string> LoadSecret(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return Status::InvalidArgument(
        fmt::format("cannot read the secret file '{}': {}", path, std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument(fmt::format("the secret file '{}' is not a regular file", path));
  }
  if (st.st_size < static_cast<off_t>(kMinSecretBytes) ||
      st.st_size > static_cast<off_t>(kMaxSecretBytes)) {
    ::close(fd);
    return Status::InvalidArgument(fmt::format(
        "the secret file '{}' holds {} bytes; a secret is {} to {} bytes (make one with "
        "`openssl rand -hex 32 > {}`)",
        path, st.st_size, kMinSecretBytes, kMaxSecretBytes, path));
  }
  std::string secret(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < secret.size()) {
    ssize_t r = ::read(fd, secret.data() + got, secret.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      int e = r < 0 ? errno : 0;
      ::close(fd);
      return Status::InvalidArgument(fmt::format("cannot read the secret file '{}': {}", path,
                                                 e ? std::strerror(e) : "it shrank"));
    }
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  if ((st.st_mode & 077) != 0)
    spdlog::warn(
        "the secret file '{}' can be read by others than its owner (mode {:o}); "
        "chmod 600 it",
        path, st.st_mode & 0777);
  return secret;
}

Result<std::string> SecretForRole(const std::string& path, const std::string& role) {
  if (path.empty()) {
    spdlog::warn(
        "{}: no cluster secret (--secret FILE): any process that reaches its ports can "
        "join the job",
        role);
    return std::string();
  }
  auto secret = LoadSecret(path);
  if (!secret.ok()) return secret.status().WithContext(role);
  spdlog::info("{}: connections prove the cluster secret of '{}'", role, path);
  return secret;
}

}  // namespace shardps
