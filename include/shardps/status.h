// Status and Result<T>: the error model of every ShardPS API.
//
// Nothing in ShardPS throws across its public API. An operation that can fail returns a
// Status (cheap to copy when OK: no allocation) or a Result<T> that holds either a value or a
// non-OK Status. Codes separate the causes a caller reacts to differently, in the spirit of
// NCCL's net plugin result codes: invalid usage, a missing thing, a timeout, a failed or
// misbehaving peer, a local system error.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace shardps {

class Status {
 public:
  enum class Code : int {
    kOk = 0,
    kInvalidArgument = 1,  // the caller's input is wrong (bad flag, wrong size, unknown key)
    kNotFound = 2,         // a named thing does not exist
    kAlreadyExists = 3,    // a named thing exists and conflicts
    kTimeout = 4,          // a bounded wait ran out
    kUnavailable = 5,      // a peer is gone or unreachable (closed connection, dead node)
    kProtocolError = 6,    // a peer sent something malformed
    kRemoteError = 7,      // a peer refused an operation and said why
    kIOError = 8,          // a local system call failed
    kAborted = 9,          // the operation was cancelled (shutdown, close with pending ops)
    kInternal = 10,        // a bug in ShardPS
    kResourceExhausted = 11,
    kUnauthenticated = 12,  // a peer did not prove the cluster secret (--secret)
  };

  Status() noexcept = default;  // OK

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string_view m) { return Status(Code::kInvalidArgument, m); }
  static Status NotFound(std::string_view m) { return Status(Code::kNotFound, m); }
  static Status AlreadyExists(std::string_view m) { return Status(Code::kAlreadyExists, m); }
  static Status Timeout(std::string_view m) { return Status(Code::kTimeout, m); }
  static Status Unavailable(std::string_view m) { return Status(Code::kUnavailable, m); }
  static Status ProtocolError(std::string_view m) { return Status(Code::kProtocolError, m); }
  static Status RemoteError(std::string_view m) { return Status(Code::kRemoteError, m); }
  static Status IOError(std::string_view m) { return Status(Code::kIOError, m); }
  static Status Aborted(std::string_view m) { return Status(Code::kAborted, m); }
  static Status Internal(std::string_view m) { return Status(Code::kInternal, m); }
  static Status Unauthenticated(std::string_view m) { return Status(Code::kUnauthenticated, m); }
  static Status ResourceExhausted(std::string_view m) {
    return Status(Code::kResourceExhausted, m);
  }
  // A Status from errno-style error number, e.g. Status::FromErrno("connect 127.0.0.1:80", e).
  static Status FromErrno(std::string_view what, int err);

  bool ok() const { return state_ == nullptr; }
  Code code() const { return state_ ? state_->code : Code::kOk; }
  const std::string& message() const;

  bool IsInvalidArgument() const { return code() == Code::kInvalidArgument; }
  bool IsNotFound() const { return code() == Code::kNotFound; }
  bool IsTimeout() const { return code() == Code::kTimeout; }
  bool IsUnavailable() const { return code() == Code::kUnavailable; }
  bool IsProtocolError() const { return code() == Code::kProtocolError; }
  bool IsRemoteError() const { return code() == Code::kRemoteError; }
  bool IsAborted() const { return code() == Code::kAborted; }

  // "Timeout: barrier 'init' ..." or "OK".
  std::string ToString() const;
  static const char* CodeName(Code code);

  // Returns a copy whose message is prefixed with `context: `.
  Status WithContext(std::string_view context) const;

 private:
  Status(Code code, std::string_view msg)
      : state_(std::make_shared<const State>(State{code, std::string(msg)})) {}
  struct State {
    Code code;
    std::string message;
  };
  std::shared_ptr<const State> state_;
};

// Either a T or a non-OK Status.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status::Internal("Result constructed from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const { return ok() ? ok_status_ : std::get<Status>(v_); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &std::get<T>(v_); }
  const T* operator->() const { return &std::get<T>(v_); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
  Status ok_status_;
};

}  // namespace shardps

#define SHARDPS_CONCAT_INNER(a, b) a##b
#define SHARDPS_CONCAT(a, b) SHARDPS_CONCAT_INNER(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define SHARDPS_RETURN_IF_ERROR(expr) \
  do {                                \
    ::shardps::Status _st = (expr);   \
    if (!_st.ok()) return _st;        \
  } while (0)

// `SHARDPS_ASSIGN_OR_RETURN(auto x, MakeX());`
#define SHARDPS_ASSIGN_OR_RETURN(lhs, expr)                                                   \
  auto SHARDPS_CONCAT(_res_, __LINE__) = (expr);                                              \
  if (!SHARDPS_CONCAT(_res_, __LINE__).ok()) return SHARDPS_CONCAT(_res_, __LINE__).status(); \
  lhs = std::move(SHARDPS_CONCAT(_res_, __LINE__)).value()
