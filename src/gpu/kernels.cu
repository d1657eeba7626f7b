// The CUDA kernels of a GPU-resident chunk (docs/gpu.md): the fused update and the fold of a
// pushed gradient into a step's running sum, one kernel per optimizer and codec, over the element
// functions of fused_update.h that the host twin (twin.cc) and the CPU tests share. Built by nvcc
// into a fatbin (sm_80, sm_90 and PTX) that libshardps carries and loads at run time
// (cuda_device.cc): no CUDA library is linked.
#include "gpu/fused_update.h"

namespace shardps::gpu {

// Grid-stride passes: any grid covers any chunk. Topk decodes a tile of kTopKTile elements at a
// time into shared memory (the indices ascend, so a tile's values are one run of them).
template <typename Body, int kCodec>
__device__ void ForEachDecoded(const EncodedGrad& g, uint64_t numel, const Body& body) {
  if constexpr (kCodec == kCodecTopK) {
    __shared__ float tile[kTopKTile];
    const uint32_t* idx = TopKIndices(g);
    const uint32_t count = TopKCount(g);
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kTopKTile;
    for (uint64_t lo = static_cast<uint64_t>(blockIdx.x) * kTopKTile; lo < numel; lo += stride) {
      const uint64_t hi = lo + kTopKTile < numel ? lo + kTopKTile : numel;
      for (uint32_t t = threadIdx.x; t < kTopKTile; t += blockDim.x) tile[t] = 0.0f;
      __syncthreads();
      for (uint32_t j = TopKLowerBound(g, lo) + threadIdx.x; j < count && idx[j] < hi;
           j += blockDim.x)
        tile[idx[j] - lo] = TopKTileValue(g, j);
      __syncthreads();
      for (uint64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) body(i, tile[i - lo]);
      __syncthreads();  // the tile is reused
    }
  } else {
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
         i += stride)
      body(i, DecodeElement<kCodec>(g, i));
  }
}

template <int kOpt, int kCodec>
__device__ void UpdatePass(const UpdateArgs& a) {
  auto body = [&a](uint64_t i, float d) { UpdateElement<kOpt>(a, i, d); };
  ForEachDecoded<decltype(body), kCodec>(a.grad, a.numel, body);
}

template <int kCodec>
__device__ void FoldPass(const FoldArgs& a) {
  auto body = [&a](uint64_t i, float d) { FoldElement(a, i, d); };
  ForEachDecoded<decltype(body), kCodec>(a.grad, a.numel, body);
}

}  // namespace shardps::gpu

// Unmangled names, found by cudaLibraryGetKernel: shardps_update_<optimizer>_<codec> and
// shardps_fold_<codec>, with the values of OptimizerCode and CodecCode.
#define SHARDPS_UPDATE_KERNEL(o, c)                          \
  extern "C" __global__ void __launch_bounds__(256)          \
      shardps_update_##o##_##c(shardps::gpu::UpdateArgs a) { \
    shardps::gpu::UpdatePass<o, c>(a);                       \
  }
#define SHARDPS_UPDATE_KERNELS(o) \
  SHARDPS_UPDATE_KERNEL(o, 0)     \
  SHARDPS_UPDATE_KERNEL(o, 1)     \
  SHARDPS_UPDATE_KERNEL(o, 2)     \
  SHARDPS_UPDATE_KERNEL(o, 3)     \
  SHARDPS_UPDATE_KERNEL(o, 4)     \
  SHARDPS_UPDATE_KERNEL(o, 5)
SHARDPS_UPDATE_KERNELS(0)
SHARDPS_UPDATE_KERNELS(1)
SHARDPS_UPDATE_KERNELS(2)
SHARDPS_UPDATE_KERNELS(3)

#define SHARDPS_FOLD_KERNEL(c)                                                                   \
  extern "C" __global__ void __launch_bounds__(256) shardps_fold_##c(shardps::gpu::FoldArgs a) { \
    shardps::gpu::FoldPass<c>(a);                                                                \
  }
SHARDPS_FOLD_KERNEL(0)
SHARDPS_FOLD_KERNEL(1)
SHARDPS_FOLD_KERNEL(2)
SHARDPS_FOLD_KERNEL(3)
SHARDPS_FOLD_KERNEL(4)
SHARDPS_FOLD_KERNEL(5)
