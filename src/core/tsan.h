// ThreadSanitizer and ShardPS's one intended data race: the published-slot seqlock
// (docs/architecture.md, "Pull"). A one-sided read of a slot may overlap the server rewriting
// it; the reader detects that by the slot's tag and reads again. The server's writes into slot
// memory run inside a SlotWritesUnseenByTsan scope, which in ThreadSanitizer builds hides that
// thread's memory accesses from the race detector (its synchronization is still tracked), and
// does nothing in other builds. Function-name suppressions cannot do this: TSan often cannot
// restore the stack of a write made many accesses earlier, and then no suppression matches.
#pragma once

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

namespace shardps {

class SlotWritesUnseenByTsan {
 public:
#if defined(__SANITIZE_THREAD__)
  SlotWritesUnseenByTsan() { AnnotateIgnoreWritesBegin(__FILE__, __LINE__); }
  ~SlotWritesUnseenByTsan() { AnnotateIgnoreWritesEnd(__FILE__, __LINE__); }
#else
  SlotWritesUnseenByTsan() {}  // user-provided, so that an unused scope draws no warning
  ~SlotWritesUnseenByTsan() {}
#endif
  SlotWritesUnseenByTsan(const SlotWritesUnseenByTsan&) = delete;
  SlotWritesUnseenByTsan& operator=(const SlotWritesUnseenByTsan&) = delete;
};

}  // namespace shardps
