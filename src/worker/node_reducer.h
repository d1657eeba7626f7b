// Node-level reduction (docs/node-reduction.md): the workers of one node sum their gradients
// before they push, so that the servers see one push per node instead of one per worker. The
// chunks of every tensor are split among the node's workers (each chunk has one owner); an
// operation runs in phases that each worker drives on its own thread, polling:
//
//   1. Free:       every worker of the node finished the tensor's previous operation.
//   2. Contribute: this worker's gradient goes in.
//   3. Reduce:     once every worker's is in, the owner sums its chunks (reduce-scatter),
//                  in local-rank order, so the sum is the same whoever computes it.
//   4. the owner pushes its chunks' sums (and pulls them, for push_pull, into Gather()).
//   5. ShareDone:  the owner says its share is done (or failed).
//   6. Shares:     once every share is done, each worker copies the gathered parameters out
//                  (all-gather) and Finishes, which frees the buffers for the next operation.
//
// Two implementations behind one interface: the CPU one (a POSIX shared-memory segment per node
// holds every worker's gradient), and NCCL's (gradients in GPU memory: a reduce to each chunk's
// owner and a broadcast from it, in an order local rank 0 sets, so that every GPU of the node
// issues the same collectives in the same order). Both coordinate through the same lanes in
// shared memory.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "shardps/status.h"

namespace shardps::gpu {
class Cuda;
}

namespace shardps::worker {

enum class NodeOpKind : uint32_t { kPush = 1, kPushPull = 2 };

// Every worker's share of one operation, once all are done.
struct NodeShares {
  uint64_t version = UINT64_MAX;  // the lowest version the shares' chunks saw (none: max)
  std::vector<uint32_t> failed;   // the local ranks whose share failed
};

// A declared tensor as the node splits it: each chunk and the local rank that owns it.
struct NodeChunk {
  uint64_t offset = 0;
  uint64_t numel = 0;
  uint32_t owner = 0;
};
struct NodeTensor {
  uint64_t numel = 0;
  std::vector<NodeChunk> chunks;
};

// The phase a worker is waited for in (for the message naming those that did not get there).
enum class NodePhase { kFree, kContributed, kShareDone, kFinished };

class NodeReducer {
 public:
  virtual ~NodeReducer() = default;
  virtual uint32_t local_rank() const = 0;
  virtual uint32_t local_size() const = 0;

  // Adds tensors first, first+1, ... of `numels` elements: one Declare call, made with the same
  // tensors in the same order by every worker of the node. `key` names what was declared (a
  // checksum of the names and chunks): workers of the node whose keys differ get an error.
  // Blocks until every worker of the node has them, at most `timeout`.
  virtual Status AddTensors(uint32_t first, const std::vector<NodeTensor>& tensors, uint64_t key,
                            std::chrono::milliseconds timeout) = 0;
  // Whether gradients and parameters may be in GPU memory (NCCL's); otherwise the worker stages
  // them through host memory.
  virtual bool TakesDevicePointers() const { return false; }
  virtual const char* name() const = 0;
  // Called on the thread that drives the operations, once before the first and then on every
  // wake-up: a reducer that queues work of its own moves it on here.
  virtual void OnThread() {}
  virtual void Progress() {}
  // The job failed: what may wait on the other workers is ended.
  virtual void Abort() {}

  // Operation `seq` (1, 2, ...) of tensor `t`, on this worker; each phase as described above.
  virtual bool Free(uint32_t t, uint64_t seq) = 0;
  virtual Status Contribute(uint32_t t, uint64_t seq, NodeOpKind kind, const float* grad) = 0;
  // Null while some worker's gradient is missing; InvalidArgument when the workers started
  // different operations (push and push_pull) as the same one. `mine`: [begin, end) element
  // ranges of the chunks this worker owns; the sums land in the buffer returned, element i at
  // [i].
  virtual Result<const float*> Reduce(uint32_t t, uint64_t seq,
                                      std::span<const std::pair<uint64_t, uint64_t>> mine) = 0;
  // Where the owners pull their chunks to (element i at [i]); read by every worker in Finish.
  virtual float* Gather(uint32_t t) = 0;
  virtual void ShareDone(uint32_t t, uint64_t seq, bool ok, uint64_t version) = 0;
  virtual std::optional<NodeShares> Shares(uint32_t t, uint64_t seq) = 0;
  // `out`: where the gathered parameters go (push_pull), or null. False while the gathered
  // parameters are not there yet (call again); an error ends the operation (it is finished).
  virtual Result<bool> Finish(uint32_t t, uint64_t seq, float* out) = 0;
  // This worker gives operation `seq` up (a deadline passed, or it closes): its lane says the
  // operation failed and finished, so the others' waits for it end with an error and the
  // tensor's next operation starts clean.
  virtual void Abandon(uint32_t t, uint64_t seq) = 0;
  // The local ranks that have not reached `phase` of operation `seq`.
  virtual std::vector<uint32_t> Missing(uint32_t t, uint64_t seq, NodePhase phase) = 0;

  // Wake-ups: every phase change rings the node's bell; a poller reads it, looks at its
  // operations, and sleeps until it changes (at most `timeout`).
  virtual uint32_t Bell() const = 0;
  virtual void Ring() = 0;
  virtual void WaitBell(uint32_t seen, std::chrono::microseconds timeout) = 0;
};

// The CPU reducer: one POSIX shared-memory segment per node for its bell, and one per
// AddTensors call holding, per tensor, each worker's gradient and the gathered parameters.
// Local rank 0 creates each segment and removes its name once every worker mapped it; the
// others wait (at most `timeout`) for it to appear. `job`: the job's id (ClusterView::job_id),
// so that no two jobs share a segment.
Result<std::unique_ptr<NodeReducer>> CreateShmNodeReducer(uint64_t job, uint32_t node,
                                                          uint32_t local_rank, uint32_t local_size,
                                                          std::chrono::milliseconds timeout);

// The NCCL reducer: as the CPU one for the lanes and the bell, with the gradients and the
// gathered parameters in GPU memory of device local_rank % devices; NCCL's communicator is set up
// with an id local rank 0 makes and hands over in shared memory. `cuda`: the worker's CUDA
// runtime (null: none loaded). NotFound, before anything is shared with the node, where CUDA or
// NCCL is missing or the node's workers do not have a GPU each; other errors after.
Result<std::unique_ptr<NodeReducer>> CreateNcclNodeReducer(uint64_t job, uint32_t node,
                                                           uint32_t local_rank, uint32_t local_size,
                                                           std::shared_ptr<gpu::Cuda> cuda,
                                                           std::chrono::milliseconds timeout);

// Which local rank owns each chunk: chunks go, in order, to the worker owning the fewest bytes
// so far (ties: the lowest rank), counting from `load` (per local rank; updated), so that every
// worker of a node computes the same split of the same declarations.
std::vector<uint32_t> SplitChunks(const std::vector<uint64_t>& chunk_numels,
                                  std::vector<uint64_t>* load);

}  // namespace shardps::worker
