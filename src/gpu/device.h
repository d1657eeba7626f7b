// A device that holds GPU-resident chunks and runs their fused passes (docs/gpu.md): a GPU
// (OpenCudaDevice: the kernels of kernels.cu on CUDA streams) or its host twin (MakeTwinDevice:
// the same element functions on host threads, one per stream, with the same ordering rules), so
// that the device update rule and a server that uses it are tested where no GPU exists.
//
// Streams: work queued on one stream runs in order; work on different streams may overlap. Every
// method is thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "gpu/fused_update.h"
#include "shardps/status.h"

namespace shardps::gpu {

class Device {
 public:
  virtual ~Device() = default;

  // "cuda:0 (compute capability 9.0, 132 multiprocessors)", or "twin".
  virtual std::string name() const = 0;
  virtual bool is_gpu() const = 0;
  virtual int streams() const = 0;
  // Device memory free now, in bytes.
  virtual Result<uint64_t> FreeBytes() const = 0;

  // Device memory, freed with Free (which waits for nothing: free only what no queued work uses).
  virtual Result<void*> Alloc(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  // Makes host memory that ShardPS did not allocate (a transport's region) fast to copy to and
  // from; Unpin it before it is freed.
  virtual Status Pin(void* p, size_t bytes) = 0;
  virtual void Unpin(void* p) = 0;

  // Queued on `stream`: a copy between host and device memory (either way, or device to device).
  virtual Status Copy(void* dst, const void* src, size_t bytes, int stream) = 0;
  // Queued on `stream`: the fused update (optimizer: OptimizerCode, codec: CodecCode).
  virtual Status Update(int optimizer, int codec, const UpdateArgs& a, int stream) = 0;
  virtual Status Fold(int codec, const FoldArgs& a, int stream) = 0;
  // fn(status) once everything queued on `stream` before it completed (or failed), called exactly
  // once, on a thread of the device's; fn must not queue work on the device.
  virtual void Then(int stream, std::function<void(Status)> fn) = 0;
  // Waits until everything queued on `stream` completed: Timeout after `timeout`.
  virtual Status Wait(int stream, std::chrono::milliseconds timeout) = 0;
};

// GPU `index` with `streams` streams. NotFound saying why when this build has no CUDA, no GPU is
// visible or the index is out of range.
Result<std::shared_ptr<Device>> OpenCudaDevice(int index, int streams);
// The host twin; with `capacity` (bytes, 0: unlimited) it says it is full as a GPU of that size
// would.
std::shared_ptr<Device> MakeTwinDevice(int streams, uint64_t capacity = 0);

// A server's --device: "cpu" (none), "cuda" (GPU 0), "cuda:N", "twin" or "twin:SIZE" (a twin
// of SIZE bytes, with an optional KiB, MiB or GiB). InvalidArgument for anything else; *gpu = -1
// for cpu and twin.
struct DeviceSpec {
  int gpu = -1;
  bool twin = false;
  uint64_t twin_bytes = 0;
};
Status ParseDevice(const std::string& spec, DeviceSpec* out);

}  // namespace shardps::gpu
