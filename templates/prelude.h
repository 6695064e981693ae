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
// ---- Matrix units: bf16 fragments for templates/matmul_mma.hip.j2 --------------
// The codegen picks the fragment kind from the Target (gptc/target.py) and the
// template names it (GPTC_MMA_KIND_*); the arch macros below only guard each kind's
// instructions so that no compiler ever sees an intrinsic its arch lacks (hiprtc
// aborts the process on one). One fragment op computes C (MxN, f32) += A (MxK) B (KxN)
// for a warp (NVIDIA) or a wavefront (AMD); gptc_acc_row/col(lane, r) give the
// position in the MxN fragment of a lane's accumulator r, the same on every kind.
#if GPTC_CUDA && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// mma.sync m16n8k16 (sm_80+): A 16x16 row-major in 4 registers of 2 bf16, B 16x8
// "col" (k-pairs) in 2, C 16x8 in 4 floats: lane l holds rows l/4 and l/4+8,
// columns 2*(l%4) and 2*(l%4)+1.
#define GPTC_HAS_MMA_NV 1
#define GPTC_MMA_M 16
#define GPTC_MMA_N 8
#define GPTC_MMA_K 16
#define GPTC_MMA_ACC 4
struct gptc_acc_t {
  float v[4];
  __device__ __forceinline__ float& operator[](int r) { return v[r]; }
};
__device__ __forceinline__ int gptc_acc_row(int lane, int r) { return lane / 4 + (r / 2) * 8; }
__device__ __forceinline__ int gptc_acc_col(int lane, int r) { return (lane % 4) * 2 + r % 2; }
__device__ __forceinline__ void gptc_mma(gptc_acc_t& c, const uint32_t a[4], const uint32_t b[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t gptc_smem_addr(const void* p) {
  uint32_t r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n" : "=r"(r) : "l"(p));
  return r;
}
// ldmatrix: 8x8 bf16 matrices from shared memory, each lane giving one 16-byte row;
// .trans hands out the transpose (an operand stored with the other dimension contiguous).
__device__ __forceinline__ void gptc_ldmatrix_x4(uint32_t r[4], uint32_t addr, bool trans) {
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// cp.async: global -> shared without registers; `valid` of the V bf16 are read, the
// rest zero-filled (edges). 16 bytes bypass L1 (.cg); 8 and 4 (narrower alignment)
// go through it (.ca, the only form for them). One bf16 has no cp.async: plain copy.
template <int V> __device__ __forceinline__ void gptc_copy_async(unsigned short* s, const unsigned short* g, int valid) {
  if constexpr (V == 1) {
    *s = valid > 0 ? *g : (unsigned short)0;
  } else {
    const uint32_t sa = gptc_smem_addr(s);
    const int bytes = 2 * (valid < 0 ? 0 : (valid > V ? V : valid));
    if constexpr (V == 8)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(sa), "l"(g), "r"(bytes));
    else
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" :: "r"(sa), "l"(g), "n"(2 * V), "r"(bytes));
  }
}
__device__ __forceinline__ void gptc_copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void gptc_copy_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
#elif GPTC_HIP && (defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__) || defined(__gfx908__))
// MFMA 32x32 (CDNA): one wavefront of 64 computes a 32x32 f32 tile; lane l holds A row
// l%32 and B column l%32 at k = KPL*(l/32) .. +KPL-1 (KPL bf16 per lane: 4 with the
// gfx90a/gfx94x "_1k" instruction, k step 8; 2 on gfx908, k step 4), and 16
// accumulators: column l%32, rows 8*(r/4) + 4*(l/32) + r%4.
#define GPTC_HAS_MFMA 1
#define GPTC_MMA_M 32
#define GPTC_MMA_N 32
#define GPTC_MMA_ACC 16
#if defined(__gfx908__)
#define GPTC_MMA_K 4
#define GPTC_MMA_KPL 2
typedef short gptc_frag_t __attribute__((ext_vector_type(2)));
#define GPTC_MFMA_OP __builtin_amdgcn_mfma_f32_32x32x4bf16
#else
#define GPTC_MMA_K 8
#define GPTC_MMA_KPL 4
typedef short gptc_frag_t __attribute__((ext_vector_type(4)));
#define GPTC_MFMA_OP __builtin_amdgcn_mfma_f32_32x32x8bf16_1k
#endif
typedef float gptc_acc_t __attribute__((ext_vector_type(16)));
__device__ __forceinline__ int gptc_acc_row(int lane, int r) { return 8 * (r / 4) + 4 * (lane / 32) + r % 4; }
__device__ __forceinline__ int gptc_acc_col(int lane, int r) { return lane % 32; }
__device__ __forceinline__ void gptc_mma(gptc_acc_t& c, gptc_frag_t a, gptc_frag_t b) { c = GPTC_MFMA_OP(a, b, c, 0, 0, 0); }
#endif
#if !defined(GPTC_HAS_MMA_NV)
// Global -> shared copies where there is no cp.async: the same interface, synchronous
// (the pipeline's barriers then only order them). Whole chunks in one V*2-byte load.
template <int V> struct gptc_chunk;
template <> struct gptc_chunk<1> { typedef unsigned short t; };
template <> struct gptc_chunk<2> { typedef unsigned int t; };
template <> struct gptc_chunk<4> { struct alignas(8) t { unsigned int x, y; }; };
template <> struct gptc_chunk<8> { struct alignas(16) t { unsigned int x, y, z, w; }; };
template <int V> __device__ __forceinline__ void gptc_copy_async(unsigned short* s, const unsigned short* g, int valid) {
  typedef typename gptc_chunk<V>::t chunk;
  if (valid >= V) {
    *reinterpret_cast<chunk*>(s) = *reinterpret_cast<const chunk*>(g);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) s[v] = v < valid ? g[v] : (unsigned short)0;
  }
}
__device__ __forceinline__ void gptc_copy_commit() {}
template <int N> __device__ __forceinline__ void gptc_copy_wait() {}
#endif
// ---- end of gptc prelude -----------------------------------------------------
