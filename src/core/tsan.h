// ThreadSanitizer and the one data race ShardPS has by design: a one-sided read of registered
// memory (a pull reading a published slot) may overlap the server rewriting it, and the reader
// detects that by the slot's tag and reads again (the seqlock, docs/architecture.md "Pull"). An
// RDMA NIC reads such memory without any synchronization; so does the tcp transport's loop
// thread when it answers a one-sided read, and only that read is hidden from TSan, by an
// UnsynchronizedReads scope around it. The server's writes, and everything else, stay checked.
// In builds without TSan the scope does nothing.
#pragma once

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
#endif

namespace shardps {

// While it lives, this thread's memory accesses are invisible to ThreadSanitizer (TSan's
// "ignore reads" covers writes too, so keep the scope to the read itself); its synchronization
// is still tracked.
class UnsynchronizedReads {
 public:
#if defined(__SANITIZE_THREAD__)
  UnsynchronizedReads() { AnnotateIgnoreReadsBegin(__FILE__, __LINE__); }
  ~UnsynchronizedReads() { AnnotateIgnoreReadsEnd(__FILE__, __LINE__); }
#else
  UnsynchronizedReads() {}  // user-provided, so that an unused scope draws no warning
  ~UnsynchronizedReads() {}
#endif
  UnsynchronizedReads(const UnsynchronizedReads&) = delete;
  UnsynchronizedReads& operator=(const UnsynchronizedReads&) = delete;
};

}  // namespace shardps
