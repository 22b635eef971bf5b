/* codegen/render_cuda.c — the kernel IR to CUDA C for NVRTC: one __global__
 * function per stage, rendered as its plan says (stage->cuda, made by
 * render_cuda_plan.c). This file: the prelude, expressions and stores, stage
 * checks, generic stages and the entry points (cm_render_cuda,
 * cm_cuda_stage_launch). Generic stages become grid-stride loops (a thread per
 * domain point with a serial reduction, a warp per point with shuffles, or a
 * block per point with a tree reduction); GEMM stages (render_cuda_gemm.c)
 * become shared-memory tiled kernels (register-tiled FMA, or tensor-core
 * mma.sync for bf16/f16 operands); attention spans (render_cuda_attention.c)
 * one fused or streaming function. Arithmetic follows ir/eval.c: bf16/f16
 * values live in float registers and are rounded after every op; ints wrap; no
 * fast-math intrinsics. */
#include "render_cuda.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

void cu_sb_printf(sbuf *s, const char *fmt, ...) {
  if (s->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = s->cap - s->n;
    int w = vsnprintf(s->p ? s->p + s->n : NULL, s->p ? room : 0, fmt, ap);
    va_end(ap);
    if (w < 0) {
      s->oom = true;
      return;
    }
    if (s->p && (size_t)w < room) {
      s->n += (size_t)w;
      return;
    }
    size_t c = s->cap ? s->cap : 4096;
    while (c < s->n + (size_t)w + 1) c *= 2;
    char *q = realloc(s->p, c);
    if (!q) {
      s->oom = true;
      return;
    }
    s->p = q;
    s->cap = c;
  }
}

/* ---- the prelude -------------------------------------------------------- */

/* Self-contained (NVRTC's include path is not relied on): bf16/f16 are
 * unsigned short bit patterns; values live in float registers. */
static const char *const PRELUDE =
    "// cmaec CUDA prelude: dtype helpers matching ir/eval.c\n"
    "typedef unsigned short cm_bf16_t;\n"
    "typedef unsigned short cm_f16_t;\n"
    "#define CM_INFF __int_as_float(0x7f800000)\n"
    "#define CM_NANF __int_as_float(0x7fc00000)\n"
    "#define CM_INFD __longlong_as_double(0x7ff0000000000000LL)\n"
    "#define CM_NAND __longlong_as_double(0x7ff8000000000000LL)\n"
    "__device__ __forceinline__ float cm_bf2f(cm_bf16_t h) {\n"
    "  return __int_as_float((int)((unsigned)h << 16));\n"
    "}\n"
    "__device__ __forceinline__ cm_bf16_t cm_f2bf(float f) {\n"
    "  unsigned b = (unsigned)__float_as_int(f);\n"
    "  if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 31) ? 0xffc0u : 0x7fc0u;\n"
    "  return (cm_bf16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);\n"
    "}\n"
    "__device__ __forceinline__ float cm_rbf(float f) { return cm_bf2f(cm_f2bf(f)); }\n"
    /* CMAEC_EMULATED (tests/emu): the host C++ compiler builds the module, so
     * what PTX computes is written out in C++ with the same results */
    "__device__ __forceinline__ float cm_h2f(cm_f16_t h) {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  unsigned s = (unsigned)(h >> 15) << 31, e = (h >> 10) & 31u, m = h & 1023u;\n"
    "  if (e == 0) return s ? -ldexpf((float)m, -24) : ldexpf((float)m, -24);\n"
    "  if (e == 31) return __int_as_float((int)(s | 0x7f800000u | (m << 13) | (m ? 0x400000u : "
    "0u)));\n"
    "  return __int_as_float((int)(s | ((e + 112u) << 23) | (m << 13)));\n"
    "#else\n"
    "  float f;\n"
    "  asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(f) : \"h\"(h));\n"
    "  return f;\n"
    "#endif\n"
    "}\n"
    "__device__ __forceinline__ cm_f16_t cm_f2h(float f) {\n"
    "  if (isnan(f)) return signbit(f) ? 0xfe00u : 0x7e00u;\n"
    "#ifdef CMAEC_EMULATED\n"
    "  unsigned x = (unsigned)__float_as_int(f), s = (x >> 16) & 0x8000u;\n"
    "  x &= 0x7fffffffu;\n"
    "  if (x >= 0x477ff000u) return (cm_f16_t)(s | 0x7c00u); /* from 65520 up: inf */\n"
    "  unsigned h, rem, half;\n"
    "  if (x < 0x38800000u) { /* a subnormal half: units of 2^-24 */\n"
    "    if (x <= 0x33000000u) return (cm_f16_t)s;\n"
    "    unsigned m = (x & 0x7fffffu) | 0x800000u, sh = 126u - (x >> 23);\n"
    "    h = m >> sh;\n"
    "    rem = m & ((1u << sh) - 1u);\n"
    "    half = 1u << (sh - 1u);\n"
    "  } else {\n"
    "    h = (x - 0x38000000u) >> 13;\n"
    "    rem = x & 0x1fffu;\n"
    "    half = 0x1000u;\n"
    "  }\n"
    "  if (rem > half || (rem == half && (h & 1u))) h++;\n"
    "  return (cm_f16_t)(s | h);\n"
    "#else\n"
    "  cm_f16_t h;\n"
    "  asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(h) : \"f\"(f));\n"
    "  return h;\n"
    "#endif\n"
    "}\n"
    "__device__ __forceinline__ float cm_rh(float f) {\n"
    "  return isnan(f) ? f : cm_h2f(cm_f2h(f));\n"
    "}\n"
    "// a double rounded once to a format of p significand bits (ties to even)\n"
    "__device__ double cm_rfmt(double x, int p, int emin, double maxf) {\n"
    "  if (isnan(x) || isinf(x) || x == 0.0) return x;\n"
    "  double ax = fabs(x);\n"
    "  int e;\n"
    "  frexp(ax, &e);\n"
    "  int lead = e - 1 < emin ? emin : e - 1;\n"
    "  double q = ldexp(1.0, lead - (p - 1));\n"
    "  double r = rint(ax / q) * q;\n"
    "  double ulp = ldexp(1.0, ilogb(maxf) - (p - 1));\n"
    "  if (ax >= maxf + ulp / 2) r = CM_INFD;\n"
    "  else if (r > maxf) r = maxf;\n"
    "  return copysign(r, x);\n"
    "}\n"
    "__device__ __forceinline__ float cm_rbfd(double x) {\n"
    "  return isnan(x) ? (float)x : (float)cm_rfmt(x, 8, -126, "
    "3.38953138925153547590470800371487866880e+38);\n"
    "}\n"
    "__device__ __forceinline__ float cm_rhd(double x) {\n"
    "  return isnan(x) ? (float)x : (float)cm_rfmt(x, 11, -14, 65504.0);\n"
    "}\n"
    "// an integer rounded once to p significand bits (exact in double)\n"
    "__device__ double cm_i2fp(long long v, int p) {\n"
    "  unsigned long long mag = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;\n"
    "  int bits = 64 - __clzll((long long)mag);\n"
    "  if (bits <= p) return (double)v;\n"
    "  int sh = bits - p;\n"
    "  unsigned long long q = mag >> sh, rem = mag & ((1ull << sh) - 1), half = 1ull << (sh - 1);\n"
    "  if (rem > half || (rem == half && (q & 1))) q++;\n"
    "  double r = ldexp((double)q, sh);\n"
    "  return v < 0 ? -r : r;\n"
    "}\n"
    "__device__ __forceinline__ float cm_i2bf(long long v) { return cm_rbfd(cm_i2fp(v, 8)); "
    "}\n"
    "__device__ __forceinline__ float cm_i2h(long long v) { return cm_rhd(cm_i2fp(v, 11)); "
    "}\n"
    "// float -> int: truncate, NaN -> 0, saturate\n"
    "__device__ __forceinline__ int cm_d2i32(double x) {\n"
    "  if (isnan(x)) return 0;\n"
    "  double t = trunc(x);\n"
    "  return t >= 2147483647.0 ? 2147483647 : t <= -2147483648.0 ? (-2147483647 - 1) : (int)t;\n"
    "}\n"
    "__device__ __forceinline__ long long cm_d2i64(double x) {\n"
    "  if (isnan(x)) return 0;\n"
    "  double t = trunc(x);\n"
    "  return t >= 9223372036854775808.0 ? 9223372036854775807LL\n"
    "       : t <= -9223372036854775808.0 ? (-9223372036854775807LL - 1) : (long long)t;\n"
    "}\n"
    "__device__ __forceinline__ int cm_wrap32(long long v) {\n"
    "  return (int)(unsigned)(unsigned long long)v;\n"
    "}\n"
    "// floats (f32 in float, f64 in double; bf16/f16 callers round the result)\n"
    "#define CM_FLOAT_OPS(T, SFX, ONE)                                              \\\n"
    "  __device__ __forceinline__ T cm_neg(T x) { return -x; }               \\\n"
    "  __device__ __forceinline__ T cm_abs(T x) { return fabs##SFX(x); }     \\\n"
    "  __device__ __forceinline__ T cm_exp(T x) { return exp##SFX(x); }      \\\n"
    "  __device__ __forceinline__ T cm_log(T x) { return log##SFX(x); }      \\\n"
    "  __device__ __forceinline__ T cm_sqrt(T x) { return sqrt##SFX(x); }    \\\n"
    "  __device__ __forceinline__ T cm_rsqrt(T x) { return ONE / sqrt##SFX(x); } \\\n"
    "  __device__ __forceinline__ T cm_recip(T x) { return ONE / x; }        \\\n"
    "  __device__ __forceinline__ T cm_tanh(T x) { return tanh##SFX(x); }    \\\n"
    "  __device__ __forceinline__ T cm_erf(T x) { return erf##SFX(x); }      \\\n"
    "  __device__ __forceinline__ T cm_relu(T x) { return isnan(x) ? x : x > 0 ? x : (T)0; "
    "} \\\n"
    "  __device__ __forceinline__ T cm_add(T a, T b) { return a + b; }       \\\n"
    "  __device__ __forceinline__ T cm_sub(T a, T b) { return a - b; }       \\\n"
    "  __device__ __forceinline__ T cm_mul(T a, T b) { return a * b; }       \\\n"
    "  __device__ __forceinline__ T cm_div(T a, T b) { return a / b; }       \\\n"
    "  __device__ __forceinline__ T cm_max(T a, T b) {                       \\\n"
    "    return isnan(a) || isnan(b) ? a + b : a > b ? a : b;                       \\\n"
    "  }                                                                            \\\n"
    "  __device__ __forceinline__ T cm_min(T a, T b) {                       \\\n"
    "    return isnan(a) || isnan(b) ? a + b : a < b ? a : b;                       \\\n"
    "  }                                                                            \\\n"
    "  __device__ __forceinline__ T cm_pow(T a, T b) { return pow##SFX(a, b); } \\\n"
    "  __device__ __forceinline__ T cm_accmax(T acc, T v) {                  \\\n"
    "    return isnan(acc) ? acc : (isnan(v) || v > acc) ? v : acc;                 \\\n"
    "  }\n"
    "CM_FLOAT_OPS(float, f, 1.0f)\n"
    "CM_FLOAT_OPS(double, , 1.0)\n"
    "// ints wrap (two's complement through unsigned); x / 0 = 0\n"
    "#define CM_INT_OPS(T, U)                                                       \\\n"
    "  __device__ __forceinline__ T cm_neg(T x) { return (T)(U)(0 - (U)x); } \\\n"
    "  __device__ __forceinline__ T cm_abs(T x) { return x < 0 ? cm_neg(x) : x; } \\\n"
    "  __device__ __forceinline__ T cm_relu(T x) { return x > 0 ? x : 0; }  \\\n"
    "  __device__ __forceinline__ T cm_add(T a, T b) { return (T)((U)a + (U)b); } \\\n"
    "  __device__ __forceinline__ T cm_sub(T a, T b) { return (T)((U)a - (U)b); } \\\n"
    "  __device__ __forceinline__ T cm_mul(T a, T b) { return (T)((U)a * (U)b); } \\\n"
    "  __device__ __forceinline__ T cm_div(T a, T b) {                       \\\n"
    "    return b == 0 ? (T)0 : b == -1 ? cm_neg(a) : a / b;                        \\\n"
    "  }                                                                            \\\n"
    "  __device__ __forceinline__ T cm_max(T a, T b) { return a > b ? a : b; } \\\n"
    "  __device__ __forceinline__ T cm_min(T a, T b) { return a < b ? a : b; } \\\n"
    "  __device__ __forceinline__ T cm_accmax(T acc, T v) { return v > acc ? v : acc; }\n"
    "CM_INT_OPS(int, unsigned)\n"
    "CM_INT_OPS(long long, unsigned long long)\n"
    "// accumulate stores\n"
    "__device__ __forceinline__ void cm_atomic_add(float *p, float v) { atomicAdd(p, v); }\n"
    "__device__ __forceinline__ void cm_atomic_add(double *p, double v) { atomicAdd(p, v); "
    "}\n"
    "__device__ __forceinline__ void cm_atomic_add(int *p, int v) { atomicAdd(p, v); }\n"
    "__device__ __forceinline__ void cm_atomic_add(long long *p, long long v) {\n"
    "  atomicAdd((unsigned long long *)p, (unsigned long long)v);\n"
    "}\n"
    "// 16-bit floats: compare-and-swap on the containing 32-bit word, rounded per add\n"
    "__device__ void cm_atomic_add16(unsigned short *p, float v, bool is_bf16) {\n"
    "  unsigned *w = (unsigned *)((unsigned long long)p & ~3ull);\n"
    "  unsigned shift = ((unsigned long long)p & 2ull) ? 16u : 0u;\n"
    "  unsigned old = *w, assumed;\n"
    "  do {\n"
    "    assumed = old;\n"
    "    unsigned short h = (unsigned short)(assumed >> shift);\n"
    "    float s = (is_bf16 ? cm_bf2f(h) : cm_h2f(h)) + v;\n"
    "    unsigned short r = is_bf16 ? cm_f2bf(s) : cm_f2h(s);\n"
    "    unsigned nw = (assumed & ~(0xffffu << shift)) | ((unsigned)r << shift);\n"
    "    old = atomicCAS(w, assumed, nw);\n"
    "  } while (old != assumed);\n"
    "}\n"
    "__device__ __forceinline__ unsigned cm_pack16(unsigned short lo, unsigned short hi) {\n"
    "  return (unsigned)lo | ((unsigned)hi << 16);\n"
    "}\n\n";

/* The tensor-core helper, in the prelude of targets that have mma.sync (sm_80+). */
static const char *const PRELUDE_MMA =
    "// d += A B over one m16n8k16 tile (A row-major, B column-major, bf16 or f16, f32\n"
    "// accumulators), each lane holding its fragments in PTX's layout (g = lane / 4,\n"
    "// q = lane % 4): a {A[g][2q..], A[g+8][2q..], A[g][2q+8..], A[g+8][2q+8..]},\n"
    "// b {B[2q..][g], B[2q+8..][g]}, d {D[g][2q], D[g][2q+1], D[g+8][2q], D[g+8][2q+1]}\n"
    "#ifdef CMAEC_EMULATED\n"
    "// the warp's tile computed once (cm_emu_warp_compute): lane l posted {a, b, d};\n"
    "// each sum runs over k in order, one fma a term\n"
    "template <bool BF16>\n"
    "static void cm_mma_16816_warp(const unsigned (*in)[10], unsigned (*out)[4]) {\n"
    "  float A[16][16], B[16][8];\n"
    "  for (unsigned l = 0; l < 32; l++) {\n"
    "    const unsigned g = l >> 2, q = l & 3u;\n"
    "    for (unsigned r = 0; r < 6; r++) {\n"
    "      const unsigned short lo = (unsigned short)in[l][r], hi = (unsigned short)(in[l][r] >> "
    "16);\n"
    "      const float flo = BF16 ? cm_bf2f(lo) : cm_h2f(lo), fhi = BF16 ? cm_bf2f(hi) : "
    "cm_h2f(hi);\n"
    "      if (r < 4) {\n"
    "        const unsigned row = g + (r & 1u) * 8u, col = 2u * q + (r >> 1) * 8u;\n"
    "        A[row][col] = flo;\n"
    "        A[row][col + 1] = fhi;\n"
    "      } else {\n"
    "        const unsigned k = 2u * q + (r - 4u) * 8u;\n"
    "        B[k][g] = flo;\n"
    "        B[k + 1][g] = fhi;\n"
    "      }\n"
    "    }\n"
    "  }\n"
    "  for (unsigned l = 0; l < 32; l++)\n"
    "    for (unsigned h = 0; h < 4; h++) {\n"
    "      const unsigned row = (l >> 2) + (h >> 1) * 8u, col = 2u * (l & 3u) + (h & 1u);\n"
    "      float acc = __uint_as_float(in[l][6 + h]);\n"
    "      for (unsigned k = 0; k < 16; k++) acc = fmaf(A[row][k], B[k][col], acc);\n"
    "      out[l][h] = __float_as_uint(acc);\n"
    "    }\n"
    "}\n"
    "#endif\n"
    "template <bool BF16>\n"
    "__device__ __forceinline__ void cm_mma_16816(float *d, const unsigned *a, const unsigned *b) "
    "{\n"
    "#ifdef CMAEC_EMULATED\n"
    "  const unsigned mine[10] = {a[0], a[1], a[2], a[3], b[0], b[1], __float_as_uint(d[0]),\n"
    "                             __float_as_uint(d[1]), __float_as_uint(d[2]), "
    "__float_as_uint(d[3])};\n"
    "  unsigned res[4];\n"
    "  cm_emu_warp_compute<10, 4>(mine, res, cm_mma_16816_warp<BF16>);\n"
    "  for (unsigned h = 0; h < 4; h++) d[h] = __uint_as_float(res[h]);\n"
    "#else\n"
    "  if constexpr (BF16)\n"
    "    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \"\n"
    "                 \"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n\"\n"
    "                 : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n"
    "                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), "
    "\"r\"(b[1]));\n"
    "  else\n"
    "    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 \"\n"
    "                 \"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n\"\n"
    "                 : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n"
    "                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), "
    "\"r\"(b[1]));\n"
    "#endif\n"
    "}\n\n";

/* The tensor-core GEMM pipeline's PTX (sm_80+), each under CMAEC_EMULATED the shim's exact
 * version (tests/emu/cuda_shim.hpp): ldmatrix, cp.async with its groups, bf16x2/f16x2 packing. */
static const char *const PRELUDE_TILES =
    "// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lane 8i + r passes row r of 8x8\n"
    "// matrix i (16 bytes, 16-byte aligned, shared memory); r[i] of lane l holds matrix i's\n"
    "// (l/4, 2(l%4)..+1), or with TRANS its (2(l%4)..+1, l/4): an mma A/B fragment\n"
    "template <int N, bool TRANS>\n"
    "__device__ __forceinline__ void cm_ldmatrix(unsigned *r, const void *row) {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  cm_emu_ldmatrix<N, TRANS>(r, row);\n"
    "#else\n"
    "  const unsigned a = (unsigned)__cvta_generic_to_shared(row);\n"
    "  if constexpr (N == 4 && TRANS)\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\\n\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3]) : \"r\"(a));\n"
    "  else if constexpr (N == 4)\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\\n\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3]) : \"r\"(a));\n"
    "  else if constexpr (N == 2 && TRANS)\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\\n\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]) : \"r\"(a));\n"
    "  else if constexpr (N == 2)\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\\n\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]) : \"r\"(a));\n"
    "  else if constexpr (TRANS)\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\\n\"\n"
    "                 : \"=r\"(r[0]) : \"r\"(a));\n"
    "  else\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\\n\"\n"
    "                 : \"=r\"(r[0]) : \"r\"(a));\n"
    "#endif\n"
    "}\n"
    "// cp.async.cg 16 bytes global -> shared (both 16-byte aligned): src_bytes (0 or 16; 0\n"
    "// reads nothing) copied, the rest zero-filled; visible after the wait_group covering it\n"
    "__device__ __forceinline__ void cm_cp_async16(void *dst, const void *src, int src_bytes) {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  cm_emu_cp_async16(dst, src, (unsigned)src_bytes);\n"
    "#else\n"
    "  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);\n"
    "  asm volatile(\"cp.async.cg.shared.global [%0], [%1], 16, %2;\\n\" ::\"r\"(d), \"l\"(src),\n"
    "               \"r\"(src_bytes) : \"memory\");\n"
    "#endif\n"
    "}\n"
    "// closes the group of this thread's cp.async issued since the last commit\n"
    "__device__ __forceinline__ void cm_cp_async_commit() {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  cm_emu_cp_async_commit();\n"
    "#else\n"
    "  asm volatile(\"cp.async.commit_group;\\n\" ::: \"memory\");\n"
    "#endif\n"
    "}\n"
    "// waits until at most PENDING of this thread's newest groups are in flight\n"
    "template <int PENDING> __device__ __forceinline__ void cm_cp_async_wait() {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  cm_emu_cp_async_wait(PENDING);\n"
    "#else\n"
    "  asm volatile(\"cp.async.wait_group %0;\\n\" ::\"n\"(PENDING) : \"memory\");\n"
    "#endif\n"
    "}\n"
    "// two floats rounded (to nearest even) into one register: lo in bits 0-15, hi in 16-31;\n"
    "// a NaN becomes the canonical 0x7fff (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32)\n"
    "__device__ __forceinline__ unsigned cm_pack_bf16x2(float lo, float hi) {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  const unsigned l = isnan(lo) ? 0x7fffu : cm_f2bf(lo), h = isnan(hi) ? 0x7fffu : "
    "cm_f2bf(hi);\n"
    "  return l | h << 16;\n"
    "#else\n"
    "  unsigned r;\n"
    "  asm(\"cvt.rn.bf16x2.f32 %0, %1, %2;\" : \"=r\"(r) : \"f\"(hi), \"f\"(lo));\n"
    "  return r;\n"
    "#endif\n"
    "}\n"
    "__device__ __forceinline__ unsigned cm_pack_f16x2(float lo, float hi) {\n"
    "#ifdef CMAEC_EMULATED\n"
    "  const unsigned l = isnan(lo) ? 0x7fffu : cm_f2h(lo), h = isnan(hi) ? 0x7fffu : "
    "cm_f2h(hi);\n"
    "  return l | h << 16;\n"
    "#else\n"
    "  unsigned r;\n"
    "  asm(\"cvt.rn.f16x2.f32 %0, %1, %2;\" : \"=r\"(r) : \"f\"(hi), \"f\"(lo));\n"
    "  return r;\n"
    "#endif\n"
    "}\n\n";

/* ---- dtypes ------------------------------------------------------------- */

static bool is_intdt(cm_dtype d) {
  return d == CM_I32 || d == CM_I64;
}
static bool is_fltdt(cm_dtype d) {
  return d == CM_F32 || d == CM_F64 || d == CM_BF16 || d == CM_F16;
}
/* the register type a value of dtype d is computed in */
const char *cu_ctype(cm_dtype d) {
  switch (d) {
  case CM_F64: return "double";
  case CM_I32: return "int";
  case CM_I64: return "long long";
  case CM_BOOL: return "bool";
  default: return "float";
  }
}
/* the element type in memory */
const char *cu_stype(cm_dtype d) {
  switch (d) {
  case CM_F32: return "float";
  case CM_F64: return "double";
  case CM_BF16: return "cm_bf16_t";
  case CM_F16: return "cm_f16_t";
  case CM_I32: return "int";
  case CM_I64: return "long long";
  default: return "unsigned char";
  }
}

/* Writes into out the C expression converting x (dtype from) to dtype to, with
 * the cast rules of ir/eval.c (copy_elem). */
void cu_cast_code(char *out, size_t size, cm_dtype from, cm_dtype to, const char *x) {
  if (from == to) {
    snprintf(out, size, "%s", x);
    return;
  }
  switch (to) {
  case CM_BOOL: snprintf(out, size, "((%s) != 0)", x); return;
  case CM_I32:
    if (from == CM_I64)
      snprintf(out, size, "cm_wrap32(%s)", x);
    else if (from == CM_BOOL)
      snprintf(out, size, "((%s) ? 1 : 0)", x);
    else
      snprintf(out, size, "cm_d2i32((double)(%s))", x);
    return;
  case CM_I64:
    if (from == CM_I32 || from == CM_BOOL)
      snprintf(out, size, "((long long)(%s))", x);
    else
      snprintf(out, size, "cm_d2i64((double)(%s))", x);
    return;
  case CM_F32:
  case CM_F64: snprintf(out, size, "((%s)(%s))", cu_ctype(to), x); return;
  case CM_BF16:
  case CM_F16: {
    bool bf = to == CM_BF16;
    if (from == CM_BOOL)
      snprintf(out, size, "((%s) ? 1.0f : 0.0f)", x);
    else if (is_intdt(from))
      snprintf(out, size, "%s((long long)(%s))", bf ? "cm_i2bf" : "cm_i2h", x);
    else if (from == CM_F64)
      snprintf(out, size, "%s(%s)", bf ? "cm_rbfd" : "cm_rhd", x);
    else if (from == CM_F32 || (from == CM_F16 && bf))
      snprintf(out, size, "%s(%s)", bf ? "cm_rbf" : "cm_rh", x);
    else /* bf16 -> f16: through double is exact, rounds once */
      snprintf(out, size, "cm_rhd((double)(%s))", x);
    return;
  }
  default: snprintf(out, size, "%s", x); return;
  }
}

/* a constant of dtype d (value rounded to d first) */
static void const_code(char *out, size_t size, cm_dtype d, double v) {
  if (is_intdt(d) || d == CM_BOOL) {
    double r = cm_round_to_dtype(v, d);
    if (d == CM_BOOL) {
      snprintf(out, size, "%s", r != 0 ? "true" : "false");
      return;
    }
    long long iv = r >= 9223372036854775807.0 ? INT64_MAX : (long long)r;
    if (iv == INT64_MIN)
      snprintf(out, size, "(-9223372036854775807LL - 1)");
    else if (d == CM_I32)
      snprintf(out, size, "((int)%lldLL)", iv);
    else
      snprintf(out, size, "%lldLL", iv);
    return;
  }
  double r = cm_round_to_dtype(v, d);
  bool dbl = d == CM_F64;
  if (isnan(r))
    snprintf(out, size, "%s", dbl ? "CM_NAND" : "CM_NANF");
  else if (isinf(r))
    snprintf(out, size, "%s%s", r < 0 ? "-" : "", dbl ? "CM_INFD" : "CM_INFF");
  else
    snprintf(out, size, dbl ? "%a" : "((float)%a)", r);
}

/* ---- expressions -------------------------------------------------------- */

cm_status cu_fail(rctx *c, int e, const char *fmt, ...) {
  char rule[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(rule, sizeof rule, fmt, ap);
  va_end(ap);
  if (c->st != CM_OK) return c->st;
  if (e >= 0)
    c->st = cm_errorf(c->err, CM_EINVALID, "kernel %s stage %d \"%s\" expression %d: %s",
                      c->k->name, c->si, c->s->name, e, rule);
  else
    c->st = cm_errorf(c->err, CM_EINVALID, "kernel %s stage %d \"%s\": %s", c->k->name, c->si,
                      c->s->name, rule);
  return c->st;
}

static const char *op_fn(cm_op op) {
  switch (op) {
  case CM_OP_NEG: return "cm_neg";
  case CM_OP_ABS: return "cm_abs";
  case CM_OP_EXP: return "cm_exp";
  case CM_OP_LOG: return "cm_log";
  case CM_OP_SQRT: return "cm_sqrt";
  case CM_OP_RSQRT: return "cm_rsqrt";
  case CM_OP_RECIP: return "cm_recip";
  case CM_OP_TANH: return "cm_tanh";
  case CM_OP_ERF: return "cm_erf";
  case CM_OP_RELU: return "cm_relu";
  case CM_OP_ADD: return "cm_add";
  case CM_OP_SUB: return "cm_sub";
  case CM_OP_MUL: return "cm_mul";
  case CM_OP_DIV: return "cm_div";
  case CM_OP_MAX: return "cm_max";
  case CM_OP_MIN: return "cm_min";
  case CM_OP_POW: return "cm_pow";
  default: return NULL;
  }
}

static int op_arity(cm_op op) {
  if (op == CM_OP_SELECT) return 3;
  if (op >= CM_OP_ADD && op <= CM_OP_NE) return 2;
  return 1;
}

/* Checks expression e's structure (ids, operands, buffers, vars). */
static cm_status check_expr(rctx *c, int e) {
  const cm_kstage *s = c->s;
  const cm_kexpr *x = &s->exprs[e];
  int nv = s->n_dom + s->n_red;
  switch (x->kind) {
  case CM_KX_CONST: return CM_OK;
  case CM_KX_ACC:
    if (s->n_red == 0) return cu_fail(c, e, "ACC in a stage without a reduction");
    return CM_OK;
  case CM_KX_VAR:
    if (x->var < 0 || x->var >= nv)
      return cu_fail(c, e, "variable %d out of range [0, %d)", x->var, nv);
    return CM_OK;
  case CM_KX_LOAD:
    if (x->buf < 0 || x->buf >= c->k->n_buffers)
      return cu_fail(c, e, "load from buffer %d of %d", x->buf, c->k->n_buffers);
    if (x->a < 0 || x->a >= e)
      return cu_fail(c, e, "load index %d is not an earlier expression", x->a);
    return CM_OK;
  case CM_KX_MOD:
    if (x->a < 0 || x->a >= e || x->b < 0 || x->b >= e)
      return cu_fail(c, e, "mod operands must be earlier expressions");
    return CM_OK;
  case CM_KX_OP: {
    bool elementwise = x->op >= CM_OP_NEG && x->op <= CM_OP_SELECT;
    if (!elementwise ||
        (x->op != CM_OP_CAST && x->op != CM_OP_STOP_GRADIENT && x->op != CM_OP_SELECT &&
         (x->op < CM_OP_LT || x->op > CM_OP_NE) && !op_fn(x->op)))
      return cu_fail(c, e, "op %s is not elementwise", cm_op_name(x->op));
    int ar = op_arity(x->op), ops[3] = {x->a, x->b, x->c};
    for (int i = 0; i < ar; i++)
      if (ops[i] < 0 || ops[i] >= e)
        return cu_fail(c, e, "operand %d of %s is not an earlier expression", i, cm_op_name(x->op));
    return CM_OK;
  }
  default: return cu_fail(c, e, "unknown expression kind %d", (int)x->kind);
  }
}

void cu_mark_from(rctx *c, int root) {
  if (root < 0 || root >= c->s->n_exprs || c->mark[root]) return;
  c->mark[root] = true;
  const cm_kexpr *x = &c->s->exprs[root];
  if (x->kind == CM_KX_CONST || x->kind == CM_KX_VAR || x->kind == CM_KX_ACC) return;
  cu_mark_from(c, x->a);
  cu_mark_from(c, x->b);
  cu_mark_from(c, x->c);
}

static void operand(const rctx *c, int id, cm_dtype to, char *out, size_t size) {
  char name[32];
  snprintf(name, sizeof name, "e%d", id);
  cu_cast_code(out, size, c->s->exprs[id].dtype, to, name);
}

/* Element `index` (an expression id) of buffer b: global memory, or the
 * block's shared-memory slice of a local buffer of a fused attention span. */
static void elem_ref(const rctx *c, int b, int index, char *out, size_t size) {
  if (c->subst && c->subst[b])
    snprintf(out, size, "%s", c->subst[b]);
  else if (c->local && c->local[b] >= 0)
    snprintf(out, size, "sl%d_[(e%d) - lb%d_]", c->local[b], index, c->local[b]);
  else
    snprintf(out, size, "b%d[e%d]", b, index);
}

/* The right-hand side of expression e (operands are e<id> locals). */
static void expr_code(const rctx *c, int e, const char *accname, char *out, size_t size) {
  const cm_kstage *s = c->s;
  const cm_kexpr *x = &s->exprs[e];
  char a[256], b[256], d[256];
  switch (x->kind) {
  case CM_KX_CONST: const_code(out, size, x->dtype, x->value); return;
  case CM_KX_VAR:
    snprintf(a, sizeof a, "v%d", x->var);
    cu_cast_code(out, size, CM_I64, x->dtype, a);
    return;
  case CM_KX_ACC: cu_cast_code(out, size, s->acc_dtype, x->dtype, accname); return;
  case CM_KX_LOAD: {
    cm_dtype bd = c->k->buffers[x->buf].dtype;
    char ld[160], el[96];
    elem_ref(c, x->buf, x->a, el, sizeof el);
    snprintf(ld, sizeof ld, "%s", el);
    if (bd == CM_BF16) snprintf(ld, sizeof ld, "cm_bf2f(%s)", el);
    if (bd == CM_F16) snprintf(ld, sizeof ld, "cm_h2f(%s)", el);
    if (bd == CM_BOOL) snprintf(ld, sizeof ld, "(%s != 0)", el);
    cu_cast_code(out, size, bd, x->dtype, ld);
    return;
  }
  case CM_KX_MOD:
    if (c->narrow[e] && c->narrow[x->a] && c->narrow[x->b]) { /* 32-bit: operands exact */
      snprintf(out, size, "((int)(e%d) %% (int)(e%d))", x->a, x->b);
      return;
    }
    operand(c, x->a, CM_I64, a, sizeof a);
    operand(c, x->b, CM_I64, b, sizeof b);
    snprintf(d, sizeof d, "((%s) %% (%s))", a, b);
    cu_cast_code(out, size, CM_I64, x->dtype, d);
    return;
  case CM_KX_OP: break;
  }
  cm_op op = x->op;
  cm_dtype rt = x->dtype;
  if (op == CM_OP_CAST || op == CM_OP_STOP_GRADIENT) {
    operand(c, x->a, rt, out, size);
    return;
  }
  if (op == CM_OP_SELECT) {
    char cc[256];
    operand(c, x->a, CM_BOOL, cc, sizeof cc);
    operand(c, x->b, rt, a, sizeof a);
    operand(c, x->c, rt, b, sizeof b);
    snprintf(out, size, "(%s ? %s : %s)", cc, a, b);
    return;
  }
  cm_dtype ta = s->exprs[x->a].dtype, tb = op_arity(op) > 1 ? s->exprs[x->b].dtype : ta;
  if (op >= CM_OP_LT && op <= CM_OP_NE) {
    const char *sym = op == CM_OP_LT ? "<" : op == CM_OP_LE ? "<=" : op == CM_OP_EQ ? "==" : "!=";
    cm_dtype w;
    if (!is_fltdt(ta) && !is_fltdt(tb))
      w = CM_I64;
    else if (ta != CM_F64 && tb != CM_F64 && is_fltdt(ta) && is_fltdt(tb))
      w = CM_F32; /* f32/bf16/f16 values are exact in float */
    else
      w = CM_F64;
    if (w == CM_I64) {
      snprintf(a, sizeof a, "(long long)(e%d)", x->a);
      snprintf(b, sizeof b, "(long long)(e%d)", x->b);
    } else {
      snprintf(a, sizeof a, "(%s)(e%d)", cu_ctype(w), x->a);
      snprintf(b, sizeof b, "(%s)(e%d)", cu_ctype(w), x->b);
    }
    snprintf(d, sizeof d, "(%s %s %s)", a, sym, b);
    cu_cast_code(out, size, CM_BOOL, rt, d);
    return;
  }
  const char *fn = op_fn(op);
  bool binary = op_arity(op) == 2;
  bool int_path = is_intdt(rt) && is_intdt(ta) && (!binary || is_intdt(tb));
  if (int_path) {
    /* a narrow result with narrow operands cannot overflow int: 32-bit arithmetic is exact */
    bool n32 = c->narrow[e] && (c->narrow[x->a] || ta == CM_I32) &&
               (!binary || c->narrow[x->b] || tb == CM_I32);
    const char *ct = n32 ? "int" : cu_ctype(rt);
    bool int_op = op == CM_OP_NEG || op == CM_OP_ABS || op == CM_OP_RELU || op == CM_OP_ADD ||
                  op == CM_OP_SUB || op == CM_OP_MUL || op == CM_OP_DIV || op == CM_OP_MAX ||
                  op == CM_OP_MIN;
    if (!binary && !int_op) { /* the oracle leaves ints unchanged by float-only unary ops */
      operand(c, x->a, rt, out, size);
      return;
    }
    if (int_op) {
      if (binary)
        snprintf(out, size, "%s((%s)(e%d), (%s)(e%d))", fn, ct, x->a, ct, x->b);
      else
        snprintf(out, size, "%s((%s)(e%d))", fn, ct, x->a);
      return;
    }
    /* POW on ints: through double, truncated and saturated */
    snprintf(d, sizeof d, "%s((double)(e%d), (double)(e%d))", fn, x->a, x->b);
    cu_cast_code(out, size, CM_F64, rt, d);
    return;
  }
  /* floats: f32/bf16/f16 in float (bf16/f16 rounded after), f64 and the rest in double */
  cm_dtype w = (rt == CM_F32 || rt == CM_BF16 || rt == CM_F16) ? CM_F32 : CM_F64;
  if (binary)
    snprintf(d, sizeof d, "%s((%s)(e%d), (%s)(e%d))", fn, cu_ctype(w), x->a, cu_ctype(w), x->b);
  else
    snprintf(d, sizeof d, "%s((%s)(e%d))", fn, cu_ctype(w), x->a);
  cu_cast_code(out, size, w, rt, d);
}

/* Declares, in id order, the marked expressions not yet declared that pass
 * the filter (want_red / want_acc: -1 any, else must equal). */
void cu_emit_marked(rctx *c, const char *indent, const char *accname, int want_red, int want_acc) {
  char code[2048];
  for (int e = 0; e < c->s->n_exprs; e++) {
    if (!c->mark[e] || c->done[e]) continue;
    if (want_red >= 0 && c->usered[e] != (want_red == 1)) continue;
    if (want_acc >= 0 && c->useacc[e] != (want_acc == 1)) continue;
    expr_code(c, e, accname, code, sizeof code);
    cu_sb_printf(c->o, "%sconst %s e%d = %s;\n", indent,
                 c->narrow[e] ? "int" : cu_ctype(c->s->exprs[e].dtype), e, code);
    c->done[e] = true;
  }
}

void cu_clear_mark(rctx *c) {
  memset(c->mark, 0, (size_t)c->s->n_exprs * sizeof *c->mark);
}

/* Declares everything reachable from root (those not yet declared). */
void cu_emit_tree(rctx *c, int root, const char *indent, const char *accname) {
  cu_clear_mark(c);
  cu_mark_from(c, root);
  cu_emit_marked(c, indent, accname, -1, -1);
}

/* Computes every store's index and value (converted for memory), then stores:
 * an update may read what it overwrites. */
void cu_emit_stores(rctx *c, const char *indent, const char *accname) {
  const cm_kstage *s = c->s;
  cu_clear_mark(c);
  for (int i = 0; i < s->n_stores; i++) {
    cu_mark_from(c, s->stores[i].index);
    cu_mark_from(c, s->stores[i].value);
  }
  cu_emit_marked(c, indent, accname, -1, -1);
  char v[256], cv[512];
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    snprintf(v, sizeof v, "e%d", st->value);
    cu_cast_code(cv, sizeof cv, s->exprs[st->value].dtype, bd, v);
    if (s->accumulate)
      cu_sb_printf(c->o, "%sconst %s sv%d = %s;\n", indent, cu_ctype(bd), i, cv);
    else if (bd == CM_BF16)
      cu_sb_printf(c->o, "%sconst cm_bf16_t sv%d = cm_f2bf(%s);\n", indent, i, cv);
    else if (bd == CM_F16)
      cu_sb_printf(c->o, "%sconst cm_f16_t sv%d = cm_f2h(%s);\n", indent, i, cv);
    else if (bd == CM_BOOL)
      cu_sb_printf(c->o, "%sconst unsigned char sv%d = (%s) ? 1 : 0;\n", indent, i, cv);
    else
      cu_sb_printf(c->o, "%sconst %s sv%d = %s;\n", indent, cu_stype(bd), i, cv);
  }
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    char el[96];
    elem_ref(c, st->buf, st->index, el, sizeof el);
    if (!s->accumulate)
      cu_sb_printf(c->o, "%s%s = sv%d;\n", indent, el, i);
    else if (bd == CM_BF16 || bd == CM_F16)
      cu_sb_printf(c->o, "%scm_atomic_add16(&b%d[e%d], sv%d, %s);\n", indent, st->buf, st->index, i,
                   bd == CM_BF16 ? "true" : "false");
    else
      cu_sb_printf(c->o, "%scm_atomic_add(&b%d[e%d], sv%d);\n", indent, st->buf, st->index, i);
  }
}

/* ---- stage checks and shared pieces ------------------------------------ */

int64_t cu_prod(const int64_t *d, int n) {
  int64_t p = 1;
  for (int i = 0; i < n; i++) p *= d[i];
  return p;
}

/* Value ranges of the integer expressions, from the loop extents (every use of
 * a variable is inside its loop's bounds: templates guard their tile edges).
 * An i64 expression whose range fits in int32 is computed in 32 bits: index
 * arithmetic in 64 bits takes twice the registers, and 64-bit div/mod by a
 * constant is a long multiply sequence (it made an im2col GEMM spill). */
typedef struct irange {
  bool known;
  int64_t lo, hi;
} irange;

static irange ir_make(bool ok, int64_t lo, int64_t hi) {
  irange r = {ok && lo <= hi, lo, hi};
  return r;
}

static irange ir_mul(irange a, irange b) {
  if (!a.known || !b.known) return ir_make(false, 0, 0);
  int64_t p[4];
  if (__builtin_mul_overflow(a.lo, b.lo, &p[0]) || __builtin_mul_overflow(a.lo, b.hi, &p[1]) ||
      __builtin_mul_overflow(a.hi, b.lo, &p[2]) || __builtin_mul_overflow(a.hi, b.hi, &p[3]))
    return ir_make(false, 0, 0);
  int64_t lo = p[0], hi = p[0];
  for (int i = 1; i < 4; i++) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  return ir_make(true, lo, hi);
}

static irange ir_expr(const cm_kstage *s, const irange *r, int e) {
  const cm_kexpr *x = &s->exprs[e];
  irange none = ir_make(false, 0, 0);
  if (x->dtype == CM_I32) return ir_make(true, INT32_MIN, INT32_MAX);
  if (x->dtype == CM_BOOL) return ir_make(true, 0, 1);
  if (x->dtype != CM_I64) return none;
  switch (x->kind) {
  case CM_KX_CONST: {
    double v = cm_round_to_dtype(x->value, CM_I64);
    if (!(v > -9.2e18 && v < 9.2e18)) return none;
    return ir_make(true, (int64_t)v, (int64_t)v);
  }
  case CM_KX_VAR: {
    int64_t ext = x->var < s->n_dom ? s->dom[x->var] : s->red[x->var - s->n_dom];
    return ir_make(true, 0, ext - 1);
  }
  case CM_KX_MOD: {
    irange a = r[x->a], b = r[x->b];
    if (!a.known || !b.known || a.lo < 0 || b.lo < 1) return none;
    return ir_make(true, 0, a.hi < b.hi - 1 ? a.hi : b.hi - 1);
  }
  case CM_KX_OP: break;
  default: return none;
  }
  irange a = x->a >= 0 ? r[x->a] : none, b = x->b >= 0 ? r[x->b] : none;
  int64_t lo, hi;
  switch (x->op) {
  case CM_OP_CAST:
  case CM_OP_STOP_GRADIENT: return a; /* from bool/i32/i64 exactly; floats: unknown */
  case CM_OP_NEG:
    if (!a.known || a.lo == INT64_MIN) return none;
    return ir_make(true, -a.hi, -a.lo);
  case CM_OP_ADD:
    if (!a.known || !b.known || __builtin_add_overflow(a.lo, b.lo, &lo) ||
        __builtin_add_overflow(a.hi, b.hi, &hi))
      return none;
    return ir_make(true, lo, hi);
  case CM_OP_SUB:
    if (!a.known || !b.known || __builtin_sub_overflow(a.lo, b.hi, &lo) ||
        __builtin_sub_overflow(a.hi, b.lo, &hi))
      return none;
    return ir_make(true, lo, hi);
  case CM_OP_MUL: return ir_mul(a, b);
  case CM_OP_DIV: /* truncating; only a non-negative dividend over a positive divisor */
    if (!a.known || !b.known || a.lo < 0 || b.lo < 1) return none;
    return ir_make(true, a.lo / b.hi, a.hi / b.lo);
  case CM_OP_MIN:
    if (!a.known || !b.known) return none;
    return ir_make(true, a.lo < b.lo ? a.lo : b.lo, a.hi < b.hi ? a.hi : b.hi);
  case CM_OP_MAX:
    if (!a.known || !b.known) return none;
    return ir_make(true, a.lo > b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi);
  case CM_OP_SELECT: {
    irange t = b, f = x->c >= 0 ? r[x->c] : none;
    if (!t.known || !f.known) return none;
    return ir_make(true, t.lo < f.lo ? t.lo : f.lo, t.hi > f.hi ? t.hi : f.hi);
  }
  default: return none;
  }
}

static cm_status narrow_ints(rctx *c) {
  const cm_kstage *s = c->s;
  irange *r = calloc((size_t)(s->n_exprs > 0 ? s->n_exprs : 1), sizeof *r);
  if (!r) return cu_fail(c, -1, "out of memory");
  for (int e = 0; e < s->n_exprs; e++) {
    r[e] = ir_expr(s, r, e);
    c->narrow[e] =
        s->exprs[e].dtype == CM_I64 && r[e].known && r[e].lo >= INT32_MIN && r[e].hi <= INT32_MAX;
  }
  free(r);
  return CM_OK;
}

static cm_status check_stage(rctx *c) {
  const cm_kstage *s = c->s;
  if (s->n_dom < 0 || s->n_red < 0 || s->n_dom + s->n_red > CM_KMAX_VARS)
    return cu_fail(c, -1, "%d domain + %d reduction vars (at most %d)", s->n_dom, s->n_red,
                   CM_KMAX_VARS);
  for (int i = 0; i < s->n_dom; i++)
    if (s->dom[i] < 1) return cu_fail(c, -1, "domain extent %d is %lld", i, (long long)s->dom[i]);
  for (int i = 0; i < s->n_red; i++)
    if (s->red[i] < 1)
      return cu_fail(c, -1, "reduction extent %d is %lld", i, (long long)s->red[i]);
  if (s->n_stores < 0 || s->n_stores > CM_KMAX_STORES)
    return cu_fail(c, -1, "%d stores (at most %d)", s->n_stores, CM_KMAX_STORES);
  for (int e = 0; e < s->n_exprs; e++)
    if (check_expr(c, e) != CM_OK) return c->st;
  if (s->n_red > 0 && (s->body < 0 || s->body >= s->n_exprs))
    return cu_fail(c, -1, "reduction body %d is not an expression", s->body);
  if (s->n_red > 0 && !is_fltdt(s->acc_dtype) && !is_intdt(s->acc_dtype))
    return cu_fail(c, -1, "accumulator dtype %s is not a number type", cm_dtype_name(s->acc_dtype));
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    if (st->buf < 0 || st->buf >= c->k->n_buffers)
      return cu_fail(c, -1, "store %d writes buffer %d of %d", i, st->buf, c->k->n_buffers);
    if (st->index < 0 || st->index >= s->n_exprs || st->value < 0 || st->value >= s->n_exprs)
      return cu_fail(c, -1, "store %d index/value are not expressions", i);
    if (cm_kx_vars_used(s, st->index) >> s->n_dom || cm_kx_vars_used(s, st->value) >> s->n_dom)
      return cu_fail(c, -1, "store %d uses a reduction variable", i);
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    if (s->accumulate && bd == CM_BOOL)
      return cu_fail(
          c, -1, "accumulate store %d into bool buffer %d: atomic add is defined for numbers only",
          i, st->buf);
  }
  /* which expressions depend on reduction vars / ACC */
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    c->usered[e] = x->kind == CM_KX_VAR && x->var >= s->n_dom;
    c->useacc[e] = x->kind == CM_KX_ACC;
    if (x->kind == CM_KX_CONST || x->kind == CM_KX_VAR || x->kind == CM_KX_ACC) continue;
    int ops[3] = {x->a, x->b, x->c};
    for (int i = 0; i < 3; i++)
      if (ops[i] >= 0 && ops[i] < e) {
        c->usered[e] |= c->usered[ops[i]];
        c->useacc[e] |= c->useacc[ops[i]];
      }
  }
  if (s->n_red > 0 && c->useacc[s->body]) return cu_fail(c, s->body, "the reduction body uses ACC");
  return narrow_ints(c);
}

/* __launch_bounds__ with the plan's blocks per SM (cm_kcuda_plan.min_blocks). */
void cu_launch_bounds(int threads, int min_blocks, char *out, size_t size) {
  snprintf(out, size, "__launch_bounds__(%d, %d) ", threads, min_blocks);
}

void cu_signature(rctx *c, const bool *written, const char *bounds) {
  cu_sb_printf(c->o, "extern \"C\" __global__ void %s%s_s%d(", bounds, c->k->name, c->si);
  for (int b = 0; b < c->k->n_buffers; b++) {
    cm_dtype d = c->k->buffers[b].dtype;
    cu_sb_printf(c->o, "%s%s%s *b%d", b ? ", " : "", written[b] ? "" : "const ", cu_stype(d), b);
  }
  cu_sb_printf(c->o, ") {\n");
}

/* The reduction counter's C type: int when the extent (plus a block of
 * threads' stride) fits, so the counter and its div/mod stay 32-bit. */
const char *cu_red_counter_type(int64_t extent) {
  return extent < INT32_MAX - 4096 ? "int" : "long long";
}

/* long long v<first>.. v<first+n-1> from the linear index lin (row-major);
 * 32-bit division where the extents allow (64-bit division is slow on GPUs) */
void cu_decompose(rctx *c, const char *indent, const char *lin, int first, const int64_t *ext,
                  int n) {
  if (n == 0) return;
  if (n == 1) {
    cu_sb_printf(c->o, "%slong long v%d = %s;\n", indent, first, lin);
    return;
  }
  bool narrow = cu_prod(ext, n) < INT64_C(2147483648);
  const char *ut = narrow ? "unsigned" : "long long", *sfx = narrow ? "u" : "LL";
  cu_sb_printf(c->o, "%s%s r%d_ = (%s)%s;\n", indent, ut, first, ut, lin);
  for (int i = n - 1; i >= 0; i--) {
    if (i == 0)
      cu_sb_printf(c->o, "%slong long v%d = (long long)r%d_;\n", indent, first, first);
    else if (ext[i] == 1)
      cu_sb_printf(c->o, "%slong long v%d = 0;\n", indent, first + i);
    else
      cu_sb_printf(c->o, "%slong long v%d = (long long)(r%d_ %% %lld%s);\n%sr%d_ /= %lld%s;\n",
                   indent, first + i, first, (long long)ext[i], sfx, indent, first,
                   (long long)ext[i], sfx);
  }
}

void cu_acc_init(const cm_kstage *s, char *out, size_t size) {
  cm_dtype a = s->acc_dtype;
  if (s->red_op == CM_KRED_SUM)
    snprintf(out, size, "(%s)0", cu_ctype(a));
  else if (a == CM_I32)
    snprintf(out, size, "(-2147483647 - 1)");
  else if (a == CM_I64)
    snprintf(out, size, "(-9223372036854775807LL - 1)");
  else
    snprintf(out, size, "-%s", a == CM_F64 ? "CM_INFD" : "CM_INFF");
}

void cu_acc_combine(const cm_kstage *s, const char *acc, const char *v, char *out, size_t size) {
  /* an int body may be narrowed to int where its range allows: widen it to the
   * accumulator, or cm_accmax(long long, int) is ambiguous */
  if (is_intdt(s->acc_dtype))
    snprintf(out, size, "%s(%s, (%s)(%s))", s->red_op == CM_KRED_MAX ? "cm_accmax" : "cm_add", acc,
             cu_ctype(s->acc_dtype), v);
  else if (s->red_op == CM_KRED_MAX)
    snprintf(out, size, "cm_accmax(%s, %s)", acc, v);
  else
    snprintf(out, size, "(%s + %s)", acc, v);
}

/* ---- generic stages ----------------------------------------------------- */

/* A thread, a warp or a block per domain point, as the plan says (render_cuda_plan.c). */
static void render_generic(rctx *c, const cm_kcuda_plan *pl, const bool *written) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int64_t points = cu_prod(s->dom, s->n_dom), rext = cu_prod(s->red, s->n_red);
  cm_kcuda_red rs = pl->red;
  const int threads = (int)pl->block[0], warps = threads / 32;
  const char *at = cu_ctype(s->acc_dtype);
  char init[128], comb[256], body[256];
  char bounds[64] = "";
  if (rs != CM_KCUDA_RED_THREAD) cu_launch_bounds(threads, pl->min_blocks, bounds, sizeof bounds);
  cu_signature(c, written, bounds);
  if (rs == CM_KCUDA_RED_BLOCK) {
    cu_sb_printf(o, "  __shared__ %s cm_part[%d];\n", at, warps);
    cu_sb_printf(o, "  for (long long p = blockIdx.x; p < %lldLL; p += gridDim.x) {\n",
                 (long long)points);
  } else if (rs == CM_KCUDA_RED_WARP) {
    cu_sb_printf(
        o,
        "  const int lane_ = threadIdx.x & 31;\n"
        "  for (long long p = (long long)blockIdx.x * %d + (threadIdx.x >> 5); p < %lldLL;\n"
        "       p += (long long)gridDim.x * %d) {\n",
        warps, (long long)points, warps);
  } else {
    cu_sb_printf(
        o,
        "  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < %lldLL;\n"
        "       p += (long long)gridDim.x * blockDim.x) {\n",
        (long long)points);
  }
  cu_decompose(c, "    ", "p", 0, s->dom, s->n_dom);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  /* hoisted: everything not depending on reduction vars or ACC */
  cu_clear_mark(c);
  if (s->n_red > 0) cu_mark_from(c, s->body);
  for (int i = 0; i < s->n_stores; i++) {
    cu_mark_from(c, s->stores[i].index);
    cu_mark_from(c, s->stores[i].value);
  }
  cu_emit_marked(c, "    ", "acc", 0, 0);
  if (s->n_red == 0) {
    cu_emit_stores(c, "    ", "acc");
    cu_sb_printf(o, "  }\n}\n\n");
    return;
  }
  cu_acc_init(s, init, sizeof init);
  cu_sb_printf(o, "    %s acc = %s;\n", at, init);
  /* an int counter where the extent allows: NVRTC 13.0 crashes (SIGSEGV in
   * nvrtcCompileProgram) on a long long counter whose value is split by an
   * unsigned div/mod by a constant that is not a power of two */
  const char *qt = cu_red_counter_type(rext);
  if (rs == CM_KCUDA_RED_BLOCK)
    cu_sb_printf(o, "    for (%s q = threadIdx.x; q < %lldLL; q += %d) {\n", qt, (long long)rext,
                 threads);
  else if (rs == CM_KCUDA_RED_WARP)
    cu_sb_printf(o, "    for (%s q = lane_; q < %lldLL; q += 32) {\n", qt, (long long)rext);
  else
    cu_sb_printf(o, "    for (%s q = 0; q < %lldLL; q++) {\n", qt, (long long)rext);
  cu_decompose(c, "      ", "q", s->n_dom, s->red, s->n_red);
  cu_clear_mark(c);
  cu_mark_from(c, s->body);
  cu_emit_marked(c, "      ", "acc", 1, -1);
  char bname[32];
  snprintf(bname, sizeof bname, "e%d", s->body);
  cu_cast_code(body, sizeof body, s->exprs[s->body].dtype, s->acc_dtype, bname);
  cu_acc_combine(s, "acc", body, comb, sizeof comb);
  cu_sb_printf(o, "      acc = %s;\n    }\n", comb);
  /* loop-local declarations leave scope */
  for (int e = 0; e < s->n_exprs; e++)
    if (c->usered[e]) c->done[e] = false;
  if (rs == CM_KCUDA_RED_THREAD) {
    cu_emit_stores(c, "    ", "acc");
    cu_sb_printf(o, "  }\n}\n\n");
    return;
  }
  cu_acc_combine(s, "acc", "__shfl_down_sync(0xffffffffu, acc, o_)", comb, sizeof comb);
  cu_sb_printf(o, "    for (int o_ = 16; o_ > 0; o_ >>= 1) acc = %s;\n", comb);
  if (rs == CM_KCUDA_RED_WARP) {
    cu_sb_printf(o, "    if (lane_ == 0) {\n");
    cu_emit_stores(c, "      ", "acc");
    cu_sb_printf(o, "    }\n  }\n}\n\n");
    return;
  }
  cu_sb_printf(o,
               "    if ((threadIdx.x & 31) == 0) cm_part[threadIdx.x >> 5] = acc;\n"
               "    __syncthreads();\n"
               "    if (threadIdx.x < 32) {\n"
               "      acc = threadIdx.x < %d ? cm_part[threadIdx.x] : %s;\n"
               "      for (int o_ = 16; o_ > 0; o_ >>= 1) acc = %s;\n"
               "    }\n"
               "    if (threadIdx.x == 0) {\n",
               warps, init, comb);
  cu_emit_stores(c, "      ", "acc");
  /* cm_part is reused by the next point */
  cu_sb_printf(o, "    }\n    __syncthreads();\n  }\n}\n\n");
}

/* ---- entry points ------------------------------------------------------- */

static void buffers_written(const cm_kernel *k, bool *written) {
  for (int b = 0; b < k->n_buffers; b++) written[b] = k->buffers[b].written;
  for (int i = 0; i < k->n_stages; i++)
    for (int j = 0; j < k->stages[i].n_stores && j < CM_KMAX_STORES; j++) {
      int b = k->stages[i].stores[j].buf;
      if (b >= 0 && b < k->n_buffers) written[b] = true;
    }
}

/* Per-stage renderer state (freed by rctx_close). */
cm_status cu_rctx_open(rctx *c, const cm_kernel *k, int si, sbuf *o, cm_err *err) {
  memset(c, 0, sizeof *c);
  c->k = k;
  c->si = si;
  c->s = &k->stages[si];
  c->o = o;
  c->err = err;
  size_t ne = (size_t)(c->s->n_exprs > 0 ? c->s->n_exprs : 1);
  c->done = calloc(ne, 1);
  c->mark = calloc(ne, 1);
  c->usered = calloc(ne, 1);
  c->useacc = calloc(ne, 1);
  c->narrow = calloc(ne, 1);
  if (!c->done || !c->mark || !c->usered || !c->useacc || !c->narrow)
    return c->st = cm_errorf(err, CM_EINTERNAL, "kernel %s stage %d: out of memory", k->name, si);
  if (c->s->n_exprs < 0 || (c->s->n_exprs && !c->s->exprs))
    return cu_fail(c, -1, "malformed expression array");
  return check_stage(c);
}

void cu_rctx_close(rctx *c) {
  free(c->done);
  free(c->mark);
  free(c->usered);
  free(c->useacc);
  free(c->narrow);
}

cm_status cm_render_cuda(const cm_kernel *k, const cm_cuda_render_opts *o, bool with_prelude,
                         char **source, cm_err *err) {
  if (!k || !source) return cm_errorf(err, CM_EINVALID, "cm_render_cuda: no kernel or no output");
  if (k->n_buffers < 0 || k->n_stages < 0 || (k->n_buffers && !k->buffers))
    return cm_errorf(err, CM_EINVALID, "kernel %s: malformed buffer/stage arrays", k->name);
  for (int b = 0; b < k->n_buffers; b++)
    if ((unsigned)k->buffers[b].dtype >= CM_DTYPE_COUNT)
      return cm_errorf(err, CM_EINVALID, "kernel %s buffer %d: bad dtype %d", k->name, b,
                       (int)k->buffers[b].dtype);
  sbuf sb = {0};
  bool *written = calloc((size_t)k->n_buffers + 1, sizeof *written);
  if (!written) return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  buffers_written(k, written);
  if (with_prelude) {
    cu_sb_printf(&sb, "%s", PRELUDE);
    if (!o || !o->target || o->target->mma_bf16) {
      cu_sb_printf(&sb, "%s", PRELUDE_MMA);
      cu_sb_printf(&sb, "%s", PRELUDE_TILES);
    }
  }
  cu_sb_printf(&sb, "// kernel %s: %d buffers, %d stages\n", k->name, k->n_buffers, k->n_stages);
  cm_kcuda_plan *plans = NULL;
  cm_status st = cu_plans_for(k, o, &plans, err);
  for (int i = 0; i < k->n_stages && st == CM_OK; i++) {
    const cm_kcuda_plan *pl = &plans[i];
    if (pl->kind == CM_KCUDA_ATTN_STREAM || pl->kind == CM_KCUDA_ATTN_STREAM_BWD ||
        pl->kind == CM_KCUDA_ATTN_FUSED || pl->kind == CM_KCUDA_ATTN_FLASH ||
        pl->kind == CM_KCUDA_ATTN_FLASH_BWD) {
      if (pl->kind == CM_KCUDA_ATTN_FLASH)
        st = cu_render_flash(k, i, &pl->attn, pl->min_blocks, &sb, written, err);
      else if (pl->kind == CM_KCUDA_ATTN_FLASH_BWD)
        st = cu_render_flash_bwd(k, i, &pl->attn, pl->min_blocks, &sb, written, err);
      else if (pl->kind == CM_KCUDA_ATTN_STREAM)
        st = cu_render_stream(k, i, &pl->attn, pl->min_blocks, &sb, written, err);
      else if (pl->kind == CM_KCUDA_ATTN_STREAM_BWD)
        st = cu_render_stream_bwd(k, i, &pl->attn, pl->min_blocks, &sb, written, err);
      else
        st = cu_render_attention(k, i, &pl->attn, pl->min_blocks, &sb, written, err);
      i += pl->attn.span - 1;
      continue;
    }
    if (pl->kind == CM_KCUDA_ROWS || pl->kind == CM_KCUDA_IN_SPAN) { /* row spans */
      st = pl->kind == CM_KCUDA_ROWS
               ? cu_render_rows(k, i, &pl->rows, pl->min_blocks, &sb, written, err)
               : cu_render_span_stub(k, i, pl->first, &sb, written, err);
      continue;
    }
    const cm_kstage *s = &k->stages[i];
    rctx c;
    st = cu_rctx_open(&c, k, i, &sb, err);
    if (st == CM_OK) {
      bool gemm = pl->kind == CM_KCUDA_GEMM;
      if (gemm && cu_check_gemm_operands(&c) != CM_OK) {
        st = c.st;
      } else {
        cu_sb_printf(&sb, "// stage %d \"%s\"%s\n", i, s->name,
                     gemm ? (pl->gemm.mma ? " (GEMM, tensor cores)" : " (GEMM, FMA)") : "");
        if (gemm)
          cu_render_gemm(&c, &pl->gemm, pl->min_blocks, written);
        else
          render_generic(&c, pl, written);
      }
    }
    if (st == CM_OK) st = c.st;
    cu_rctx_close(&c);
  }
  free(plans);
  free(written);
  if (st == CM_OK && sb.oom) st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  if (st != CM_OK) {
    free(sb.p);
    return st;
  }
  size_t old = *source ? strlen(*source) : 0;
  char *q = realloc(*source, old + sb.n + 1);
  if (!q) {
    free(sb.p);
    return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  }
  memcpy(q + old, sb.p, sb.n);
  q[old + sb.n] = '\0';
  *source = q;
  free(sb.p);
  return CM_OK;
}

cm_cuda_launch cm_cuda_stage_launch(const cm_kernel *k, int stage, const cm_cuda_render_opts *o) {
  cm_cuda_launch l = {{1, 1, 1}, {1, 1, 1}, 0};
  if (!k || stage < 0 || stage >= k->n_stages) return l;
  cm_kcuda_plan *plans = NULL;
  cm_err err = {0};
  if (cu_plans_for(k, o, &plans, &err) != CM_OK) return l;
  const cm_kcuda_plan *p = &plans[stage];
  memcpy(l.grid, p->grid, sizeof l.grid);
  memcpy(l.block, p->block, sizeof l.block);
  l.shared_bytes = p->shared_dynamic;
  free(plans);
  return l;
}
