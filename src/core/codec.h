// Bounds-checked little-endian encoding of message fields (docs/protocol.md).
//
// Writer appends to a byte vector. Reader never reads past its span: every Get* returns false
// once the input is exhausted or a length field points past the end, and the caller turns that
// into a ProtocolError; nothing here asserts or throws on bad input from the network.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace shardps {

using Bytes = std::vector<uint8_t>;

class Writer {
 public:
  explicit Writer(Bytes* out) : out_(out) {}
  template <typename T>
  requires std::is_arithmetic_v<T>
  void Put(T v) {
    static_assert(std::endian::native == std::endian::little, "ShardPS assumes little-endian");
    size_t at = out_->size();
    out_->resize(at + sizeof(T));
    std::memcpy(out_->data() + at, &v, sizeof(T));
  }
  void PutString(std::string_view s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    PutRaw(s.data(), s.size());
  }
  void PutBytes(const void* p, size_t n) {
    Put<uint64_t>(n);
    PutRaw(p, n);
  }
  template <typename T>
  requires std::is_arithmetic_v<T>
  void PutVector(std::span<const T> v) {
    Put<uint64_t>(v.size());
    PutRaw(v.data(), v.size_bytes());
  }
  void PutRaw(const void* p, size_t n) {
    if (n == 0) return;
    size_t at = out_->size();
    out_->resize(at + n);
    std::memcpy(out_->data() + at, p, n);
  }

 private:
  Bytes* out_;
};

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}
  explicit Reader(std::span<const uint8_t> s) : Reader(s.data(), s.size()) {}

  template <typename T>
  requires std::is_arithmetic_v<T>
  [[nodiscard]] bool Get(T* v) {
    if (remaining() < sizeof(T)) return Fail();
    std::memcpy(v, p_, sizeof(T));
    p_ += sizeof(T);
    return true;
  }
  [[nodiscard]] bool GetString(std::string* s, size_t max_len = 1 << 20) {
    uint32_t n = 0;
    if (!Get(&n) || n > max_len || n > remaining()) return Fail();
    s->assign(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return true;
  }
  [[nodiscard]] bool GetBytes(Bytes* b, size_t max_len) {
    uint64_t n = 0;
    if (!Get(&n) || n > max_len || n > remaining()) return Fail();
    b->assign(p_, p_ + n);
    p_ += n;
    return true;
  }
  template <typename T>
  requires std::is_arithmetic_v<T>
  [[nodiscard]] bool GetVector(std::vector<T>* v, size_t max_count) {
    uint64_t n = 0;
    if (!Get(&n) || n > max_count || n > remaining() / sizeof(T)) return Fail();
    v->resize(n);
    if (n > 0) std::memcpy(v->data(), p_, n * sizeof(T));  // an empty vector's data() may be null
    p_ += n * sizeof(T);
    return true;
  }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }
  // Whether `count` items of at least `min_bytes` each can still follow: checked before a
  // vector is sized from a count read off the wire, so it grows with what arrived.
  [[nodiscard]] bool Fits(uint64_t count, size_t min_bytes) {
    if (min_bytes == 0 || count <= remaining() / min_bytes) return true;
    return Fail();
  }
  // The bytes not read yet.
  std::span<const uint8_t> rest() const { return {p_, remaining()}; }
  bool failed() const { return failed_; }
  // True when everything was consumed and nothing failed: messages must not carry trailing junk.
  bool done() const { return !failed_ && p_ == end_; }
  // Marks the read failed (a value out of its range); returns false.
  bool Fail() {
    failed_ = true;
    return false;
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
  bool failed_ = false;
};

}  // namespace shardps
