#include "gpu/cuda.h"

#include <dlfcn.h>

#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include <fmt/format.h>

#if SHARDPS_HAVE_CUDA_HEADERS
#include <cuda_runtime_api.h>
#endif
#if SHARDPS_HAVE_NCCL_HEADERS
#include <nccl.h>
#endif

namespace shardps::gpu {
namespace {

// dlopen of the first of `names` that loads; the reasons of all that did not, otherwise.
[[maybe_unused]] Result<void*> Open(const std::vector<std::string>& names) {
  std::string why;
  for (const auto& n : names) {
    if (n.empty()) continue;
    if (void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    const char* e = dlerror();
    why += fmt::format("{}{}", why.empty() ? "" : "; ", e ? e : n);
  }
  return Status::NotFound(why);
}

template <typename Fn>
Status Resolve(void* lib, const char* name, Fn* out) {
  *out = reinterpret_cast<Fn>(dlsym(lib, name));
  if (*out == nullptr) return Status::NotFound(fmt::format("{} lacks {}", "the library", name));
  return Status::OK();
}

#ifdef SHARDPS_CUDA_LIB_DIR
constexpr const char* kLibDir = SHARDPS_CUDA_LIB_DIR;
#else
constexpr const char* kLibDir = "";
#endif
#ifdef SHARDPS_NCCL_LIB_DIR
constexpr const char* kNcclLibDir = SHARDPS_NCCL_LIB_DIR;
#else
constexpr const char* kNcclLibDir = "";
#endif

[[maybe_unused]] std::string InDir(const char* dir, const std::string& name) {
  return *dir ? std::string(dir) + "/" + name : std::string();
}

#if SHARDPS_HAVE_CUDA_HEADERS

class CudaImpl final : public Cuda {
 public:
  ~CudaImpl() override {
    // The library stays loaded: the process may still run callbacks that use it.
    for (auto& [device, streams] : streams_)
      for (cudaStream_t s : streams) cudaStreamDestroy_(s);
  }

  Status Init() {
    const std::string so = fmt::format("libcudart.so.{}", CUDART_VERSION / 1000);
    SHARDPS_ASSIGN_OR_RETURN(lib_, Open({so, InDir(kLibDir, so), "libcudart.so"}));
#define SHARDPS_RESOLVE(f) SHARDPS_RETURN_IF_ERROR(Resolve(lib_, #f, &f##_))
    SHARDPS_RESOLVE(cudaGetDeviceCount);
    SHARDPS_RESOLVE(cudaGetErrorString);
    SHARDPS_RESOLVE(cudaPointerGetAttributes);
    SHARDPS_RESOLVE(cudaGetLastError);
    SHARDPS_RESOLVE(cudaSetDevice);
    SHARDPS_RESOLVE(cudaGetDevice);
    SHARDPS_RESOLVE(cudaStreamSynchronize);
    SHARDPS_RESOLVE(cudaMemcpyAsync);
    SHARDPS_RESOLVE(cudaHostAlloc);
    SHARDPS_RESOLVE(cudaFreeHost);
    SHARDPS_RESOLVE(cudaMalloc);
    SHARDPS_RESOLVE(cudaFree);
    SHARDPS_RESOLVE(cudaStreamCreateWithFlags);
    SHARDPS_RESOLVE(cudaStreamDestroy);
    SHARDPS_RESOLVE(cudaEventCreateWithFlags);
    SHARDPS_RESOLVE(cudaEventDestroy);
    SHARDPS_RESOLVE(cudaEventRecord);
    SHARDPS_RESOLVE(cudaEventQuery);
    SHARDPS_RESOLVE(cudaMemGetInfo);
    SHARDPS_RESOLVE(cudaDeviceGetAttribute);
    SHARDPS_RESOLVE(cudaHostRegister);
    SHARDPS_RESOLVE(cudaHostUnregister);
    SHARDPS_RESOLVE(cudaLibraryLoadData);
    SHARDPS_RESOLVE(cudaLibraryGetKernel);
    SHARDPS_RESOLVE(cudaLaunchKernel);
#undef SHARDPS_RESOLVE
    int n = 0;
    cudaError_t e = cudaGetDeviceCount_(&n);
    if (e != cudaSuccess || n == 0)
      return Status::NotFound(e != cudaSuccess ? fmt::format("no GPU: {}", cudaGetErrorString_(e))
                                               : std::string("no GPU is visible"));
    devices_ = n;
    return Status::OK();
  }

  int device_count() const override { return devices_; }

  bool IsDevice(const void* p) const override { return DeviceOf(p) >= 0; }

  // The GPU `p` points into, or -1 (host memory).
  int DeviceOf(const void* p) const {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes_(&a, p) != cudaSuccess) {
      cudaGetLastError_();  // a host pointer the runtime never saw: not an error to keep
      return -1;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged ? a.device : -1;
  }

  Status SetDevice(int device) const override { return Check(cudaSetDevice_(device), "set"); }
  int CurrentDevice() const override {
    int d = 0;
    return cudaGetDevice_(&d) == cudaSuccess ? d : 0;
  }
  Status Copy(void* dst, const void* src, size_t bytes) const override {
    // On a non-blocking stream of the GPU involved, waited for: complete when it returns
    // whatever the direction (cudaMemcpy returns before a device-to-device copy is done), and
    // never waiting for work on other streams (a collective that waits for a peer, the
    // program's next kernels on the legacy default stream).
    int device = DeviceOf(dst);
    if (device < 0) device = DeviceOf(src);
    if (device < 0) device = CurrentDevice();
    if (device != CurrentDevice()) SHARDPS_RETURN_IF_ERROR(SetDevice(device));
    SHARDPS_ASSIGN_OR_RETURN(cudaStream_t s, TakeStream(device));
    Status st = Check(cudaMemcpyAsync_(dst, src, bytes, cudaMemcpyDefault, s), "copy");
    if (st.ok()) st = Check(cudaStreamSynchronize_(s), "copy");
    GiveStream(device, s);
    return st;
  }
  Status CopyAsync(void* dst, const void* src, size_t bytes, Stream s) const override {
    return Check(cudaMemcpyAsync_(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(s)),
                 "copy");
  }
  Result<void*> HostAlloc(size_t bytes) const override {
    void* p = nullptr;
    SHARDPS_RETURN_IF_ERROR(Check(cudaHostAlloc_(&p, bytes, cudaHostAllocPortable), "pin"));
    return p;
  }
  void HostFree(void* p) const override {
    if (p) cudaFreeHost_(p);
  }
  Result<void*> DeviceAlloc(size_t bytes) const override {
    void* p = nullptr;
    SHARDPS_RETURN_IF_ERROR(Check(cudaMalloc_(&p, bytes), "allocate"));
    return p;
  }
  void DeviceFree(void* p) const override {
    if (p) cudaFree_(p);
  }
  Result<Stream> CreateStream() const override {
    cudaStream_t s = nullptr;
    SHARDPS_RETURN_IF_ERROR(
        Check(cudaStreamCreateWithFlags_(&s, cudaStreamNonBlocking), "create a stream"));
    return static_cast<Stream>(s);
  }
  void DestroyStream(Stream s) const override {
    if (s) cudaStreamDestroy_(static_cast<cudaStream_t>(s));
  }
  Result<Event> CreateEvent() const override {
    cudaEvent_t e = nullptr;
    SHARDPS_RETURN_IF_ERROR(
        Check(cudaEventCreateWithFlags_(&e, cudaEventDisableTiming), "create an event"));
    return static_cast<Event>(e);
  }
  void DestroyEvent(Event e) const override {
    if (e) cudaEventDestroy_(static_cast<cudaEvent_t>(e));
  }
  Status Record(Event e, Stream s) const override {
    return Check(cudaEventRecord_(static_cast<cudaEvent_t>(e), static_cast<cudaStream_t>(s)),
                 "record an event");
  }
  Result<bool> Done(Event e) const override {
    cudaError_t r = cudaEventQuery_(static_cast<cudaEvent_t>(e));
    if (r == cudaSuccess) return true;
    if (r == cudaErrorNotReady) return false;
    return Status::Internal(fmt::format("CUDA: {}", cudaGetErrorString_(r)));
  }

  Status MemoryInfo(uint64_t* free_bytes, uint64_t* total_bytes) const override {
    size_t f = 0, t = 0;
    SHARDPS_RETURN_IF_ERROR(Check(cudaMemGetInfo_(&f, &t), "say how much memory is free"));
    *free_bytes = f;
    *total_bytes = t;
    return Status::OK();
  }
  std::string Describe(int device) const override {
    return fmt::format("compute capability {}.{}, {} multiprocessors",
                       Attribute(cudaDevAttrComputeCapabilityMajor, device),
                       Attribute(cudaDevAttrComputeCapabilityMinor, device),
                       Multiprocessors(device));
  }
  int Multiprocessors(int device) const override {
    return Attribute(cudaDevAttrMultiProcessorCount, device);
  }
  Status Pin(void* p, size_t bytes) const override {
    return Check(cudaHostRegister_(p, bytes, cudaHostRegisterPortable), "pin host memory");
  }
  void Unpin(void* p) const override {
    if (p) cudaHostUnregister_(p);
  }
  Result<void*> LoadKernels(const void* image) const override {
    cudaLibrary_t lib = nullptr;
    SHARDPS_RETURN_IF_ERROR(
        Check(cudaLibraryLoadData_(&lib, image, nullptr, nullptr, 0, nullptr, nullptr, 0),
              "load kernels"));
    return static_cast<void*>(lib);
  }
  Result<void*> Kernel(void* kernels, const char* name) const override {
    cudaKernel_t k = nullptr;
    SHARDPS_RETURN_IF_ERROR(
        Check(cudaLibraryGetKernel_(&k, static_cast<cudaLibrary_t>(kernels), name),
              fmt::format("find kernel {}", name).c_str()));
    return static_cast<void*>(k);
  }
  Status Launch(void* kernel, unsigned grid, unsigned block, void* arg,
                Stream stream) const override {
    void* args[] = {arg};
    return Check(cudaLaunchKernel_(kernel, dim3(grid), dim3(block), args, 0,
                                   static_cast<cudaStream_t>(stream)),
                 "launch a kernel");
  }

 private:
  int Attribute(cudaDeviceAttr a, int device) const {
    int v = 0;
    return cudaDeviceGetAttribute_(&v, a, device) == cudaSuccess ? v : 0;
  }
  Status Check(cudaError_t e, const char* what) const {
    if (e == cudaSuccess) return Status::OK();
    return Status::Internal(fmt::format("CUDA cannot {}: {}", what, cudaGetErrorString_(e)));
  }

  // Copies' streams, per GPU, reused (the calling thread's device is `device`).
  Result<cudaStream_t> TakeStream(int device) const {
    {
      std::lock_guard<std::mutex> lock(streams_mu_);
      auto& free = streams_[device];
      if (!free.empty()) {
        cudaStream_t s = free.back();
        free.pop_back();
        return s;
      }
    }
    cudaStream_t s = nullptr;
    SHARDPS_RETURN_IF_ERROR(
        Check(cudaStreamCreateWithFlags_(&s, cudaStreamNonBlocking), "create a stream"));
    return s;
  }
  void GiveStream(int device, cudaStream_t s) const {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_[device].push_back(s);
  }

  void* lib_ = nullptr;
  int devices_ = 0;
  mutable std::mutex streams_mu_;
  mutable std::map<int, std::vector<cudaStream_t>> streams_;  // guarded by streams_mu_
  decltype(&::cudaGetDeviceCount) cudaGetDeviceCount_ = nullptr;
  decltype(&::cudaGetErrorString) cudaGetErrorString_ = nullptr;
  decltype(&::cudaPointerGetAttributes) cudaPointerGetAttributes_ = nullptr;
  decltype(&::cudaGetLastError) cudaGetLastError_ = nullptr;
  decltype(&::cudaSetDevice) cudaSetDevice_ = nullptr;
  decltype(&::cudaGetDevice) cudaGetDevice_ = nullptr;
  decltype(&::cudaStreamSynchronize) cudaStreamSynchronize_ = nullptr;
  decltype(&::cudaMemcpyAsync) cudaMemcpyAsync_ = nullptr;
  cudaError_t (*cudaHostAlloc_)(void**, size_t, unsigned int) = nullptr;
  decltype(&::cudaFreeHost) cudaFreeHost_ = nullptr;
  cudaError_t (*cudaMalloc_)(void**, size_t) = nullptr;
  decltype(&::cudaFree) cudaFree_ = nullptr;
  decltype(&::cudaStreamCreateWithFlags) cudaStreamCreateWithFlags_ = nullptr;
  decltype(&::cudaStreamDestroy) cudaStreamDestroy_ = nullptr;
  decltype(&::cudaEventCreateWithFlags) cudaEventCreateWithFlags_ = nullptr;
  decltype(&::cudaEventDestroy) cudaEventDestroy_ = nullptr;
  decltype(&::cudaEventRecord) cudaEventRecord_ = nullptr;
  decltype(&::cudaEventQuery) cudaEventQuery_ = nullptr;
  decltype(&::cudaMemGetInfo) cudaMemGetInfo_ = nullptr;
  decltype(&::cudaDeviceGetAttribute) cudaDeviceGetAttribute_ = nullptr;
  decltype(&::cudaHostRegister) cudaHostRegister_ = nullptr;
  decltype(&::cudaHostUnregister) cudaHostUnregister_ = nullptr;
  decltype(&::cudaLibraryLoadData) cudaLibraryLoadData_ = nullptr;
  decltype(&::cudaLibraryGetKernel) cudaLibraryGetKernel_ = nullptr;
  cudaError_t (*cudaLaunchKernel_)(const void*, dim3, dim3, void**, size_t, cudaStream_t) = nullptr;
};

#endif  // SHARDPS_HAVE_CUDA_HEADERS

#if SHARDPS_HAVE_NCCL_HEADERS && SHARDPS_HAVE_CUDA_HEADERS

static_assert(sizeof(ncclUniqueId) == Nccl::kIdBytes);

class NcclImpl final : public Nccl {
 public:
  Status Init() {
    SHARDPS_ASSIGN_OR_RETURN(lib_, Open({"libnccl.so.2", InDir(kNcclLibDir, "libnccl.so.2"),
                                         InDir(kLibDir, "libnccl.so.2")}));
#define SHARDPS_RESOLVE(f) SHARDPS_RETURN_IF_ERROR(Resolve(lib_, #f, &f##_))
    SHARDPS_RESOLVE(ncclGetVersion);
    SHARDPS_RESOLVE(ncclGetErrorString);
    SHARDPS_RESOLVE(ncclGetUniqueId);
    SHARDPS_RESOLVE(ncclCommInitRankConfig);
    SHARDPS_RESOLVE(ncclCommDestroy);
    SHARDPS_RESOLVE(ncclCommAbort);
    SHARDPS_RESOLVE(ncclCommGetAsyncError);
    SHARDPS_RESOLVE(ncclGroupStart);
    SHARDPS_RESOLVE(ncclGroupEnd);
    SHARDPS_RESOLVE(ncclReduce);
    SHARDPS_RESOLVE(ncclBroadcast);
#undef SHARDPS_RESOLVE
    return Status::OK();
  }

  std::string version() const override {
    int v = 0;
    ncclGetVersion_(&v);
    return fmt::format("{}.{}.{}", v / 10000, v / 100 % 100, v % 100);
  }
  Status UniqueId(uint8_t out[kIdBytes]) const override {
    ncclUniqueId id{};
    SHARDPS_RETURN_IF_ERROR(Check(ncclGetUniqueId_(&id), "make an id"));
    std::memcpy(out, &id, kIdBytes);
    return Status::OK();
  }
  Result<Comm> Join(int ranks, const uint8_t id[kIdBytes], int rank) const override {
    ncclUniqueId u{};
    std::memcpy(&u, id, kIdBytes);
    ncclComm_t c = nullptr;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // no call on it waits for a peer: Ready says when one completed
    const ncclResult_t r = ncclCommInitRankConfig_(&c, ranks, u, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      if (c) ncclCommAbort_(c);
      return Check(r, "join");
    }
    return static_cast<Comm>(c);
  }
  Result<bool> Ready(Comm c) const override {
    ncclResult_t r = ncclSuccess;
    SHARDPS_RETURN_IF_ERROR(
        Check(ncclCommGetAsyncError_(static_cast<ncclComm_t>(c), &r), "say how it is"));
    if (r == ncclInProgress) return false;
    SHARDPS_RETURN_IF_ERROR(Check(r, "go on"));
    return true;
  }
  void Destroy(Comm c) const override {
    if (c) ncclCommDestroy_(static_cast<ncclComm_t>(c));
  }
  void Abort(Comm c) const override {
    if (c) ncclCommAbort_(static_cast<ncclComm_t>(c));
  }
  Status AsyncError(Comm c) const override {
    ncclResult_t r = ncclSuccess;
    if (ncclCommGetAsyncError_(static_cast<ncclComm_t>(c), &r) != ncclSuccess ||
        r == ncclInProgress)
      return Status::OK();
    return Check(r, "go on");
  }
  Status GroupStart() const override { return Check(ncclGroupStart_(), "start a group"); }
  Result<bool> GroupEnd() const override {
    const ncclResult_t r = ncclGroupEnd_();
    if (r == ncclInProgress) return false;
    SHARDPS_RETURN_IF_ERROR(Check(r, "end a group"));
    return true;
  }
  Status ReduceSum(const float* send, float* recv, size_t count, int root, Comm c,
                   Stream s) const override {
    return Quiet(ncclReduce_(send, recv, count, ncclFloat32, ncclSum, root,
                             static_cast<ncclComm_t>(c), static_cast<cudaStream_t>(s)),
                 "reduce");
  }
  Status Broadcast(float* buf, size_t count, int root, Comm c, Stream s) const override {
    return Quiet(ncclBroadcast_(buf, buf, count, ncclFloat32, root, static_cast<ncclComm_t>(c),
                                static_cast<cudaStream_t>(s)),
                 "broadcast");
  }

 private:
  // A call inside a group of a nonblocking communicator may answer "in progress": its outcome
  // comes with the group's end.
  Status Quiet(ncclResult_t r, const char* what) const {
    return r == ncclInProgress ? Status::OK() : Check(r, what);
  }
  Status Check(ncclResult_t r, const char* what) const {
    if (r == ncclSuccess) return Status::OK();
    return Status::Internal(fmt::format("NCCL cannot {}: {}", what, ncclGetErrorString_(r)));
  }

  void* lib_ = nullptr;
  decltype(&::ncclGetVersion) ncclGetVersion_ = nullptr;
  decltype(&::ncclGetErrorString) ncclGetErrorString_ = nullptr;
  decltype(&::ncclGetUniqueId) ncclGetUniqueId_ = nullptr;
  decltype(&::ncclCommInitRankConfig) ncclCommInitRankConfig_ = nullptr;
  decltype(&::ncclCommDestroy) ncclCommDestroy_ = nullptr;
  decltype(&::ncclCommAbort) ncclCommAbort_ = nullptr;
  decltype(&::ncclCommGetAsyncError) ncclCommGetAsyncError_ = nullptr;
  decltype(&::ncclGroupStart) ncclGroupStart_ = nullptr;
  decltype(&::ncclGroupEnd) ncclGroupEnd_ = nullptr;
  decltype(&::ncclReduce) ncclReduce_ = nullptr;
  decltype(&::ncclBroadcast) ncclBroadcast_ = nullptr;
};

#endif

}  // namespace

Result<std::shared_ptr<Cuda>> Cuda::Load() {
#if SHARDPS_HAVE_CUDA_HEADERS
  auto c = std::make_shared<CudaImpl>();
  SHARDPS_RETURN_IF_ERROR(c->Init().WithContext("CUDA runtime"));
  return std::shared_ptr<Cuda>(std::move(c));
#else
  return Status::NotFound("this build of ShardPS has no CUDA support (SHARDPS_CUDA=OFF)");
#endif
}

Result<std::unique_ptr<Nccl>> Nccl::Load() {
#if SHARDPS_HAVE_NCCL_HEADERS && SHARDPS_HAVE_CUDA_HEADERS
  auto n = std::make_unique<NcclImpl>();
  SHARDPS_RETURN_IF_ERROR(n->Init().WithContext("NCCL"));
  return std::unique_ptr<Nccl>(std::move(n));
#else
  return Status::NotFound("this build of ShardPS has no NCCL support (SHARDPS_NCCL=OFF)");
#endif
}

}  // namespace shardps::gpu
