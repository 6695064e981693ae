// ---- gptc prelude ------------------------------------------------------------
// Pasted (textually, by the codegen) at the top of every generated kernel source.
// Kernels are written in HIP C++ and compiled, from the same text, by hiprtc (AMD)
// and NVRTC (NVIDIA). No system header is included: both compilers predefine the
// device built-ins (threadIdx, __syncthreads, expf, atomicAdd, ...), and this file
// adds the few names that differ. Kernel code uses only:
//   - HIP warp shuffles  __shfl, __shfl_xor, __shfl_up, __shfl_down  (all lanes of
//     the warp must be active: under NVRTC they become the *_sync forms, full mask);
//   - __syncwarp()       (a wave barrier on AMD, where ROCm 5.2 lacks it);
//   - WARP_SIZE          (compile-time; given by the codegen as -DWARP_SIZE=N, the
//     target's wavefront: 64 on CDNA, 32 on RDNA and NVIDIA; `warpSize` is not a
//     constant expression under NVRTC);
//   - GPTC_LAUNCH_BOUNDS(threads)  (one-argument __launch_bounds__: the second
//     argument means different things on HIP and CUDA, so it is not used);
//   - bf16 with bf16_to_float / float_to_bf16 (round to nearest even), our own
//     16-bit struct, identical on both compilers;
//   - int8_t ... uint64_t, INFINITY, NAN;
//   - float math built-ins with the same names on both (expf, __expf, logf, tanhf,
//     rsqrtf, sqrtf, fmaxf, erff, __fdividef, __int_as_float, __float_as_uint ...).
// GPTC_HIP / GPTC_CUDA tell which compiler reads the file, when a template must know.

#if defined(__HIPCC_RTC__) || defined(__HIP__)
#define GPTC_HIP 1
#define GPTC_CUDA 0
#elif defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define GPTC_HIP 0
#define GPTC_CUDA 1
#else
#error "gptc kernels are compiled by hiprtc or NVRTC"
#endif

#ifndef WARP_SIZE
#error "WARP_SIZE must be defined by the codegen (-DWARP_SIZE=64 on CDNA, 32 on RDNA and NVIDIA)"
#endif
#if GPTC_HIP && defined(__AMDGCN_WAVEFRONT_SIZE) && __AMDGCN_WAVEFRONT_SIZE != WARP_SIZE
#error "WARP_SIZE does not match the wavefront size of the arch being compiled"
#endif
#if GPTC_CUDA && WARP_SIZE != 32
#error "WARP_SIZE must be 32 on NVIDIA"
#endif

#define GPTC_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
// ... and with a minimum of resident blocks per multiprocessor (a register bound) on
// NVIDIA only: on AMD the second argument is something else, so it is dropped there.
#if GPTC_CUDA
#define GPTC_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads, blocks)
#else
#define GPTC_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads)
#endif

// Fixed-width integers. hiprtc predefines them (64-bit ones as long long); NVRTC
// does not. Both targets are LP64, so long long is 64 bits on both.
#if GPTC_CUDA
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#endif

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

// Warp-level primitives: HIP names, mapped to CUDA's *_sync forms with a full mask.
#if GPTC_CUDA
#define GPTC_FULL_MASK 0xffffffffu
template <typename T> __device__ __forceinline__ T gptc_shfl(T v, int src, int width = WARP_SIZE) { return __shfl_sync(GPTC_FULL_MASK, v, src, width); }
template <typename T> __device__ __forceinline__ T gptc_shfl_xor(T v, int mask, int width = WARP_SIZE) { return __shfl_xor_sync(GPTC_FULL_MASK, v, mask, width); }
template <typename T> __device__ __forceinline__ T gptc_shfl_up(T v, unsigned int d, int width = WARP_SIZE) { return __shfl_up_sync(GPTC_FULL_MASK, v, d, width); }
template <typename T> __device__ __forceinline__ T gptc_shfl_down(T v, unsigned int d, int width = WARP_SIZE) { return __shfl_down_sync(GPTC_FULL_MASK, v, d, width); }
#define __shfl gptc_shfl
#define __shfl_xor gptc_shfl_xor
#define __shfl_up gptc_shfl_up
#define __shfl_down gptc_shfl_down
#else
// A wavefront executes in lock step; the barrier only orders memory within it.
#define __syncwarp(...) __builtin_amdgcn_wave_barrier()
#endif

// bfloat16: the high half of an IEEE float. Conversion by bit operations only, so
// no vendor header is needed and both compilers produce the same bits.
struct bf16 {
  unsigned short bits;
};
__device__ __forceinline__ float bf16_to_float(bf16 x) {
  return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ bf16 float_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = (unsigned short)((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  } else {
    r.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
  }
  return r;
}
#if GPTC_CUDA && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// The same rounding in one instruction (a NaN stays a NaN, its payload aside); the
// matrix-unit launches convert with it (templates/mma_fragments.h says why only they).
__device__ __forceinline__ bf16 gptc_float_to_bf16_cvt(float f) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r.bits) : "f"(f));
  return r;
}
#endif
// a and b rounded to bf16 (as float_to_bf16), a in the low half: one instruction on sm_80+.
__device__ __forceinline__ unsigned int gptc_pack_bf16x2(float a, float b) {
#if GPTC_CUDA && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned int r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(b), "f"(a));
  return r;
#else
  return (unsigned int)float_to_bf16(a).bits | ((unsigned int)float_to_bf16(b).bits << 16);
#endif
}
// 4 or 8 consecutive elements read or written at once, p aligned to 16 bytes: the chunks
// of a row or of the wgmma epilogue's columns (gptc/compiler/codegen/emit.py set_lanes). A
// chunk of 4: one 16-byte access of floats, one 8-byte access of bf16; of 8: two, one.
struct gptc_lanes4 {
  float v[4];
};
struct gptc_lanes8 {
  float v[8];
};
__device__ __forceinline__ float gptc_bf16_low(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float gptc_bf16_high(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ gptc_lanes4 gptc_load4(const float* p) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  return {{a.x, a.y, a.z, a.w}};
}
__device__ __forceinline__ gptc_lanes4 gptc_load4(const bf16* p) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  return {{gptc_bf16_low(w.x), gptc_bf16_high(w.x), gptc_bf16_low(w.y), gptc_bf16_high(w.y)}};
}
__device__ __forceinline__ gptc_lanes8 gptc_load8(const float* p) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  return {{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w}};
}
__device__ __forceinline__ gptc_lanes8 gptc_load8(const bf16* p) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  return {{gptc_bf16_low(w.x), gptc_bf16_high(w.x), gptc_bf16_low(w.y), gptc_bf16_high(w.y),
           gptc_bf16_low(w.z), gptc_bf16_high(w.z), gptc_bf16_low(w.w), gptc_bf16_high(w.w)}};
}
__device__ __forceinline__ void gptc_store4(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void gptc_store4(bf16* p, const float* v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(gptc_pack_bf16x2(v[0], v[1]), gptc_pack_bf16x2(v[2], v[3]));
}
__device__ __forceinline__ void gptc_store8(float* p, const float* v) {
  gptc_store4(p, v);
  gptc_store4(p + 4, v + 4);
}
__device__ __forceinline__ void gptc_store8(bf16* p, const float* v) {
  *reinterpret_cast<uint4*>(p) = make_uint4(gptc_pack_bf16x2(v[0], v[1]), gptc_pack_bf16x2(v[2], v[3]),
                                            gptc_pack_bf16x2(v[4], v[5]), gptc_pack_bf16x2(v[6], v[7]));
}
// ---- Philox4x32-10 (counter-based RNG; twin of gptc/compiler/ops/random.py) ----
// A pure function of (counter, key): every kernel that reads a random_uniform node
// recomputes the same bits for an element (a backward kernel recomputes the forward
// mask) with no state. Plain C, so the host compiler can test it too.
struct philox4 {
  uint32_t w[4];
};
__device__ __forceinline__ philox4 philox4x32_10(philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c.w[0], p1 = (uint64_t)0xCD9E8D57u * c.w[2];
    const philox4 next = {{(uint32_t)(p1 >> 32) ^ c.w[1] ^ k0, (uint32_t)p1,
                            (uint32_t)(p0 >> 32) ^ c.w[3] ^ k1, (uint32_t)p0}};
    c = next;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}
// Element `index` of a random_uniform tensor: counter (index lo, index hi, step,
// stream), key (seed lo, seed hi); the first word's top 24 bits scaled to [0, 1).
__device__ __forceinline__ float philox_uniform(uint32_t seed_lo, uint32_t seed_hi, uint32_t stream,
                                                uint32_t step, uint64_t index) {
  const philox4 counter = {{(uint32_t)index, (uint32_t)(index >> 32), step, stream}};
  return (float)(philox4x32_10(counter, seed_lo, seed_hi).w[0] >> 8) * 5.9604644775390625e-08f;  // 2^-24
}
// ---- end of Philox ----
// ---- end of gptc prelude -----------------------------------------------------
