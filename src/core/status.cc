#include "shardps/status.h"

#include <cstring>

#include <fmt/format.h>

namespace shardps {

Status Status::FromErrno(std::string_view what, int err) {
  std::string msg = fmt::format("{}: {} (errno {})", what, std::strerror(err), err);
  if (err == ETIMEDOUT) return Timeout(msg);
  if (err == ECONNREFUSED || err == ECONNRESET || err == EPIPE || err == ENOTCONN)
    return Unavailable(msg);
  if (err == ENOMEM) return ResourceExhausted(msg);
  return IOError(msg);
}

const std::string& Status::message() const {
  static const std::string kEmpty;  // immutable, not state
  return state_ ? state_->message : kEmpty;
}

const char* Status::CodeName(Code code) {
  switch (code) {
    case Code::kOk:
      return "OK";
    case Code::kInvalidArgument:
      return "InvalidArgument";
    case Code::kNotFound:
      return "NotFound";
    case Code::kAlreadyExists:
      return "AlreadyExists";
    case Code::kTimeout:
      return "Timeout";
    case Code::kUnavailable:
      return "Unavailable";
    case Code::kProtocolError:
      return "ProtocolError";
    case Code::kRemoteError:
      return "RemoteError";
    case Code::kIOError:
      return "IOError";
    case Code::kAborted:
      return "Aborted";
    case Code::kInternal:
      return "Internal";
    case Code::kResourceExhausted:
      return "ResourceExhausted";
    case Code::kUnauthenticated:
      return "Unauthenticated";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return fmt::format("{}: {}", CodeName(code()), message());
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  return Status(code(), fmt::format("{}: {}", context, message()));
}

}  // namespace shardps
