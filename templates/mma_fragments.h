// ---- gptc matrix-unit fragments ---------------------------------------------
// Pasted after the prelude into the launches that run on the matrix units
// (templates/matmul_mma.hip.j2, matmul_wgmma.hip.j2, attention_mma*.hip.j2), and only
// there: the other kernels never see it. The codegen picks the fragment kind from the
// Target (gptc/target.py; the templates check with #error that it is there); the arch macros below only guard each kind's
// instructions, so that no compiler ever sees an intrinsic its arch lacks (hiprtc
// aborts the process on one). One fragment op computes C (MxN, f32) += A (MxK) B (KxN)
// for a warp (NVIDIA) or a wavefront (AMD); gptc_acc_row/col(lane, r) give the
// position in the MxN fragment of a lane's accumulator r, the same on every kind.
#if GPTC_CUDA && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// In these launches float_to_bf16 is the prelude's one-instruction conversion (the same
// rounding): ~10 fewer instructions an element stored bf16, which the matmul epilogues and
// the flash kernels are bound by (gpt2 bf16: matmuls -0.7 ms a step, attention -0.7). Not
// for every kernel: the layernorm backward's row kernels measured slower with it (38 -> 52
// us): ptxas then fits them in 32 registers instead of 40 by issuing the third input's
// loads after the math on the first two, so fewer loads are in flight (their SASS;
// benchmarks/results/h200x2-2026-12-01-458dba0-tma).
#define float_to_bf16 gptc_float_to_bf16_cvt
#endif
// tanh as 1 - 2 / (e^2x + 1) from one fast exponential and one fast reciprocal (+-1 at
// the limits, NaN stays NaN): within ~5e-7 of tanh, far below the bf16 rounding of what
// these launches store, in 5 instructions instead of tanhf's ~17, which bound the GELU
// epilogues.
__device__ __forceinline__ float gptc_tanh_fast(float x) {
#if GPTC_CUDA
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(e) : "f"(x * 2.885390081777927f));  // 2 log2(e) x
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(e + 1.0f));
  return fmaf(-2.0f, r, 1.0f);
#else
  return 1.0f - __fdividef(2.0f, __expf(2.0f * x) + 1.0f);
#endif
}
#define tanhf gptc_tanh_fast
// Two accumulators of adjacent columns (mma.sync's r, r + 1) stored at once, p aligned to
// two elements: one 8-byte store of floats, one 4-byte store of bf16.
__device__ __forceinline__ void gptc_store_pair(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void gptc_store_pair(bf16* p, float a, float b) {
  *reinterpret_cast<unsigned int*>(p) = gptc_pack_bf16x2(a, b);
}
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
#if defined(GPTC_HAS_MMA_NV) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Hopper's warpgroup MMA (sm_90a; templates/matmul_wgmma.hip.j2 issues wgmma.mma_async
// itself, its operand count depends on the tile). A shared-memory matrix descriptor:
// bits 0-13 the start address >> 4, 16-29 the leading byte offset >> 4 (between atoms of
// 64 m or n; unused for k-contiguous operands), 32-45 the stride byte offset >> 4 (1024:
// between groups of 8 rows of 128 bytes), 62-63 the swizzle (1: 128 bytes).
#define GPTC_HAS_WGMMA 1
__device__ __forceinline__ uint64_t gptc_wgmma_desc(uint32_t addr, uint32_t leading_bytes) {
  return (uint64_t)((addr & 0x3FFFFu) >> 4) | ((uint64_t)((leading_bytes & 0x3FFFFu) >> 4) << 16) |
         ((uint64_t)(1024u >> 4) << 32) | (1ull << 62);
}
// Before the first wgmma of a group (its accumulators were written by other instructions).
__device__ __forceinline__ void gptc_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void gptc_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Until at most N committed groups of this warpgroup are still running.
template <int N> __device__ __forceinline__ void gptc_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Shared memory written through the generic proxy (cp.async, plain stores) made visible
// to the async proxy that wgmma reads it through: run by the reading threads, after the
// barrier (an mbarrier wait) that says the writes have landed.
__device__ __forceinline__ void gptc_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// mbarriers (8 bytes of shared memory each, by shared-window address): a phase completes
// when `count` arrivals (and the copies tracked by gptc_copy_arrive) are in; a wait
// names the parity of the phase it waits for.
__device__ __forceinline__ void gptc_mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void gptc_mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile("{\n.reg .pred done;\nretry:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra retry;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void gptc_mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// The barrier's current phase also waits for this thread's cp.async copies so far to land.
__device__ __forceinline__ void gptc_copy_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void gptc_copy_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// The barrier's current phase also waits for `bytes` more to land by TMA (complete_tx):
// with or without this thread's arrival.
__device__ __forceinline__ void gptc_mbarrier_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void gptc_mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
// A TMA tensor map (CUtensorMap: 128 opaque bytes the host encodes with
// cuTensorMapEncodeTiled, gptc/runtime/cuda.py), passed by value as a __grid_constant__
// kernel parameter; the copies name it by its generic address.
struct alignas(64) gptc_tensor_map { unsigned long long opaque[16]; };
// One box of a tensor map at element coordinates c (innermost first; those past the
// tensor's extent read as zeros) into shared memory at dst (1024-byte aligned: the
// 128-byte swizzle of the map is the one gptc_wgmma_desc names); the barrier's
// transaction count drops by the box's bytes when they land.
template <int R> __device__ __forceinline__ void gptc_tma_load(uint32_t dst, const gptc_tensor_map* map, uint32_t bar,
                                                             int c0, int c1, int c2 = 0, int c3 = 0, int c4 = 0) {
  const uint64_t m = reinterpret_cast<uint64_t>(map);
  if constexpr (R == 2)
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 :: "r"(dst), "l"(m), "r"(c0), "r"(c1), "r"(bar) : "memory");
  else if constexpr (R == 3)
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                 :: "r"(dst), "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
  else if constexpr (R == 4)
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 :: "r"(dst), "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
  else
    asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n"
                 :: "r"(dst), "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar) : "memory");
}
// 8 bf16 of a row aligned to V elements only (no 16-byte cp.async): 8/V loads of V
// elements, all in flight, then one 16-byte shared store; element by element (zeros
// past `valid`) at the matrix's edge. Plain stores: gptc_mbarrier_arrive covers them.
template <int V> struct gptc_piece;
template <> struct gptc_piece<1> { typedef unsigned short t; };
template <> struct gptc_piece<2> { typedef unsigned int t; };
template <> struct gptc_piece<4> { typedef uint2 t; };
template <int V> __device__ __forceinline__ void gptc_copy_chunk8(unsigned short* s, const unsigned short* g, int valid) {
  typedef typename gptc_piece<V>::t piece;
  union { uint4 all; piece p[8 / V]; unsigned short h[8]; } u;
  if (valid >= 8) {
#pragma unroll
    for (int i = 0; i < 8 / V; ++i) u.p[i] = reinterpret_cast<const piece*>(g)[i];
  } else {
#pragma unroll
    for (int v = 0; v < 8; ++v) u.h[v] = v < valid ? g[v] : (unsigned short)0;
  }
  *reinterpret_cast<uint4*>(s) = u.all;
}
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
// ---- end of the matrix-unit fragments
