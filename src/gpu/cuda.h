// The CUDA runtime and NCCL, loaded when first needed (dlopen) rather than linked: one build of
// ShardPS runs on hosts with and without GPUs, and a program linked against libshardps needs no
// CUDA library to start. The build needs only the headers (SHARDPS_CUDA, SHARDPS_NCCL in
// CMakeLists.txt). docs/node-reduction.md, "GPU memory".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "shardps/status.h"

namespace shardps::gpu {

// Handles of the runtime's objects, opaque here.
using Stream = void*;
using Event = void*;
using Comm = void*;

class Cuda {
 public:
  // NotFound, saying why, when this build has no CUDA support, libcudart cannot be loaded, or no
  // GPU is visible (CUDA_VISIBLE_DEVICES, no driver).
  static Result<std::shared_ptr<Cuda>> Load();
  virtual ~Cuda() = default;

  virtual int device_count() const = 0;
  // Whether `p` points into memory of a GPU (device or managed memory). False for host memory,
  // pinned or not.
  virtual bool IsDevice(const void* p) const = 0;
  // The calling thread's current device.
  virtual Status SetDevice(int device) const = 0;
  virtual int CurrentDevice() const = 0;

  // Copies between any two pointers (unified addressing); complete when it returns. It runs on
  // a non-blocking stream of its own, on the GPU of the device pointer among them (the calling
  // thread's current device becomes that GPU), so it waits for no other stream's work: what
  // produced `src` on the GPU must be complete before the call (the caller synchronizes its
  // stream).
  virtual Status Copy(void* dst, const void* src, size_t bytes) const = 0;
  // The same, queued on `stream`.
  virtual Status CopyAsync(void* dst, const void* src, size_t bytes, Stream stream) const = 0;
  virtual Result<void*> HostAlloc(size_t bytes) const = 0;  // pinned
  virtual void HostFree(void* p) const = 0;
  virtual Result<void*> DeviceAlloc(size_t bytes) const = 0;
  virtual void DeviceFree(void* p) const = 0;
  virtual Result<Stream> CreateStream() const = 0;
  virtual void DestroyStream(Stream s) const = 0;
  virtual Result<Event> CreateEvent() const = 0;
  virtual void DestroyEvent(Event e) const = 0;
  virtual Status Record(Event e, Stream s) const = 0;
  // True once everything queued before the event's record completed; an error if it failed.
  virtual Result<bool> Done(Event e) const = 0;

  // The calling thread's current device: its free and total memory, in bytes.
  virtual Status MemoryInfo(uint64_t* free_bytes, uint64_t* total_bytes) const = 0;
  // "compute capability 9.0, 132 multiprocessors" for `device`; its multiprocessors.
  virtual std::string Describe(int device) const = 0;
  virtual int Multiprocessors(int device) const = 0;
  // Pins host memory that was not allocated by CUDA (a transport's registered region), so that
  // copies to and from it are asynchronous; Unpin before it is freed.
  virtual Status Pin(void* p, size_t bytes) const = 0;
  virtual void Unpin(void* p) const = 0;
  // Loads a fatbin (kernels for several architectures and PTX) into every device: a handle to
  // find its kernels by name with Kernel.
  virtual Result<void*> LoadKernels(const void* image) const = 0;
  virtual Result<void*> Kernel(void* kernels, const char* name) const = 0;
  // Launches `kernel` with one argument (`arg` points to it) on `stream`, on the calling
  // thread's current device.
  virtual Status Launch(void* kernel, unsigned grid, unsigned block, void* arg,
                        Stream stream) const = 0;
};

// NCCL over the GPUs of one host.
class Nccl {
 public:
  static constexpr size_t kIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES

  // NotFound, saying why, when this build has no NCCL support or libnccl cannot be loaded.
  static Result<std::unique_ptr<Nccl>> Load();
  virtual ~Nccl() = default;

  virtual std::string version() const = 0;
  virtual Status UniqueId(uint8_t out[kIdBytes]) const = 0;
  // Starts joining the communicator of `ranks` ranks (nonblocking: no call on it ever waits for
  // a peer); Ready says when it is set up.
  virtual Result<Comm> Join(int ranks, const uint8_t id[kIdBytes], int rank) const = 0;
  // Whether the last call on `c` (Join, GroupEnd) completed: true; still under way: false; an
  // error it ran into.
  virtual Result<bool> Ready(Comm c) const = 0;
  virtual void Destroy(Comm c) const = 0;
  // Ends every operation in flight on `c` (with an error): a peer died.
  virtual void Abort(Comm c) const = 0;
  // An error the communicator ran into asynchronously, or OK.
  virtual Status AsyncError(Comm c) const = 0;
  virtual Status GroupStart() const = 0;
  // Issues the group: true when its work is queued on the stream, false while NCCL is still
  // queueing it (poll Ready before anything else on the communicator).
  virtual Result<bool> GroupEnd() const = 0;
  // Sums `count` floats of every rank's `send` into `recv` on rank `root`.
  virtual Status ReduceSum(const float* send, float* recv, size_t count, int root, Comm c,
                           Stream s) const = 0;
  // Copies `count` floats of `buf` on rank `root` into every rank's `buf`.
  virtual Status Broadcast(float* buf, size_t count, int root, Comm c, Stream s) const = 0;
};

}  // namespace shardps::gpu
