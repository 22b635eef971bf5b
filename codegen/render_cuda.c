/* codegen/render_cuda.c — the kernel IR to CUDA C for NVRTC: one __global__
 * function per stage. Generic stages become grid-stride loops (a thread per
 * domain point with a serial reduction; for reductions of 64 or more, a warp
 * per point with shuffles, or a block per point with a tree reduction when the
 * reduction is long or the points few); GEMM stages become shared-memory tiled
 * kernels (register-tiled FMA, or tensor-core mma.sync for bf16/f16 operands).
 * Arithmetic follows ir/eval.c: bf16/f16 values live in float registers and are
 * rounded after every op; ints wrap; no fast-math intrinsics. */
#include "codegen.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- a growable string -------------------------------------------------- */

typedef struct sbuf {
  char *p;
  size_t n, cap;
  bool oom;
} sbuf;

__attribute__((format(printf, 2, 3))) static void sb_printf(sbuf *s, const char *fmt, ...) {
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
    "__device__ __forceinline__ float cm_h2f(cm_f16_t h) {\n"
    "  float f;\n"
    "  asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(f) : \"h\"(h));\n"
    "  return f;\n"
    "}\n"
    "__device__ __forceinline__ cm_f16_t cm_f2h(float f) {\n"
    "  if (isnan(f)) return signbit(f) ? 0xfe00u : 0x7e00u;\n"
    "  cm_f16_t h;\n"
    "  asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(h) : \"f\"(f));\n"
    "  return h;\n"
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

/* ---- dtypes ------------------------------------------------------------- */

static bool is_intdt(cm_dtype d) {
  return d == CM_I32 || d == CM_I64;
}
static bool is_fltdt(cm_dtype d) {
  return d == CM_F32 || d == CM_F64 || d == CM_BF16 || d == CM_F16;
}
/* the register type a value of dtype d is computed in */
static const char *ctype(cm_dtype d) {
  switch (d) {
  case CM_F64: return "double";
  case CM_I32: return "int";
  case CM_I64: return "long long";
  case CM_BOOL: return "bool";
  default: return "float";
  }
}
/* the element type in memory */
static const char *stype(cm_dtype d) {
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
static void cast_code(char *out, size_t size, cm_dtype from, cm_dtype to, const char *x) {
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
  case CM_F64: snprintf(out, size, "((%s)(%s))", ctype(to), x); return;
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

typedef struct rctx {
  const cm_kernel *k;
  int si;
  const cm_kstage *s;
  sbuf *o;
  cm_err *err;
  bool *done;   /* per expression: already declared in scope */
  bool *mark;   /* scratch: reachable set */
  bool *usered; /* depends on a reduction var */
  bool *useacc; /* depends on ACC */
  bool *narrow; /* an i64 expression whose every value fits in int32: computed as int */
  cm_status st;
  const int
      *local; /* fused attention span: per buffer, its shared-memory slot or -1 (NULL: none) */
  const char *const *subst; /* streaming attention: per buffer, NULL or the C expression a
                               load of it reads (the tile's value at the current point) */
} rctx;

static cm_status fail(rctx *c, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static cm_status fail(rctx *c, int e, const char *fmt, ...) {
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
    if (s->n_red == 0) return fail(c, e, "ACC in a stage without a reduction");
    return CM_OK;
  case CM_KX_VAR:
    if (x->var < 0 || x->var >= nv)
      return fail(c, e, "variable %d out of range [0, %d)", x->var, nv);
    return CM_OK;
  case CM_KX_LOAD:
    if (x->buf < 0 || x->buf >= c->k->n_buffers)
      return fail(c, e, "load from buffer %d of %d", x->buf, c->k->n_buffers);
    if (x->a < 0 || x->a >= e)
      return fail(c, e, "load index %d is not an earlier expression", x->a);
    return CM_OK;
  case CM_KX_MOD:
    if (x->a < 0 || x->a >= e || x->b < 0 || x->b >= e)
      return fail(c, e, "mod operands must be earlier expressions");
    return CM_OK;
  case CM_KX_OP: {
    bool elementwise = x->op >= CM_OP_NEG && x->op <= CM_OP_SELECT;
    if (!elementwise ||
        (x->op != CM_OP_CAST && x->op != CM_OP_STOP_GRADIENT && x->op != CM_OP_SELECT &&
         (x->op < CM_OP_LT || x->op > CM_OP_NE) && !op_fn(x->op)))
      return fail(c, e, "op %s is not elementwise", cm_op_name(x->op));
    int ar = op_arity(x->op), ops[3] = {x->a, x->b, x->c};
    for (int i = 0; i < ar; i++)
      if (ops[i] < 0 || ops[i] >= e)
        return fail(c, e, "operand %d of %s is not an earlier expression", i, cm_op_name(x->op));
    return CM_OK;
  }
  default: return fail(c, e, "unknown expression kind %d", (int)x->kind);
  }
}

static void mark_from(rctx *c, int root) {
  if (root < 0 || root >= c->s->n_exprs || c->mark[root]) return;
  c->mark[root] = true;
  const cm_kexpr *x = &c->s->exprs[root];
  if (x->kind == CM_KX_CONST || x->kind == CM_KX_VAR || x->kind == CM_KX_ACC) return;
  mark_from(c, x->a);
  mark_from(c, x->b);
  mark_from(c, x->c);
}

static void operand(const rctx *c, int id, cm_dtype to, char *out, size_t size) {
  char name[32];
  snprintf(name, sizeof name, "e%d", id);
  cast_code(out, size, c->s->exprs[id].dtype, to, name);
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
    cast_code(out, size, CM_I64, x->dtype, a);
    return;
  case CM_KX_ACC: cast_code(out, size, s->acc_dtype, x->dtype, accname); return;
  case CM_KX_LOAD: {
    cm_dtype bd = c->k->buffers[x->buf].dtype;
    char ld[160], el[96];
    elem_ref(c, x->buf, x->a, el, sizeof el);
    snprintf(ld, sizeof ld, "%s", el);
    if (bd == CM_BF16) snprintf(ld, sizeof ld, "cm_bf2f(%s)", el);
    if (bd == CM_F16) snprintf(ld, sizeof ld, "cm_h2f(%s)", el);
    if (bd == CM_BOOL) snprintf(ld, sizeof ld, "(%s != 0)", el);
    cast_code(out, size, bd, x->dtype, ld);
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
    cast_code(out, size, CM_I64, x->dtype, d);
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
      snprintf(a, sizeof a, "(%s)(e%d)", ctype(w), x->a);
      snprintf(b, sizeof b, "(%s)(e%d)", ctype(w), x->b);
    }
    snprintf(d, sizeof d, "(%s %s %s)", a, sym, b);
    cast_code(out, size, CM_BOOL, rt, d);
    return;
  }
  const char *fn = op_fn(op);
  bool binary = op_arity(op) == 2;
  bool int_path = is_intdt(rt) && is_intdt(ta) && (!binary || is_intdt(tb));
  if (int_path) {
    /* a narrow result with narrow operands cannot overflow int: 32-bit arithmetic is exact */
    bool n32 = c->narrow[e] && (c->narrow[x->a] || ta == CM_I32) &&
               (!binary || c->narrow[x->b] || tb == CM_I32);
    const char *ct = n32 ? "int" : ctype(rt);
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
    cast_code(out, size, CM_F64, rt, d);
    return;
  }
  /* floats: f32/bf16/f16 in float (bf16/f16 rounded after), f64 and the rest in double */
  cm_dtype w = (rt == CM_F32 || rt == CM_BF16 || rt == CM_F16) ? CM_F32 : CM_F64;
  if (binary)
    snprintf(d, sizeof d, "%s((%s)(e%d), (%s)(e%d))", fn, ctype(w), x->a, ctype(w), x->b);
  else
    snprintf(d, sizeof d, "%s((%s)(e%d))", fn, ctype(w), x->a);
  cast_code(out, size, w, rt, d);
}

/* Declares, in id order, the marked expressions not yet declared that pass
 * the filter (want_red / want_acc: -1 any, else must equal). */
static void emit_marked(rctx *c, const char *indent, const char *accname, int want_red,
                        int want_acc) {
  char code[2048];
  for (int e = 0; e < c->s->n_exprs; e++) {
    if (!c->mark[e] || c->done[e]) continue;
    if (want_red >= 0 && c->usered[e] != (want_red == 1)) continue;
    if (want_acc >= 0 && c->useacc[e] != (want_acc == 1)) continue;
    expr_code(c, e, accname, code, sizeof code);
    sb_printf(c->o, "%sconst %s e%d = %s;\n", indent,
              c->narrow[e] ? "int" : ctype(c->s->exprs[e].dtype), e, code);
    c->done[e] = true;
  }
}

static void clear_mark(rctx *c) {
  memset(c->mark, 0, (size_t)c->s->n_exprs * sizeof *c->mark);
}

/* Declares everything reachable from root (those not yet declared). */
static void emit_tree(rctx *c, int root, const char *indent, const char *accname) {
  clear_mark(c);
  mark_from(c, root);
  emit_marked(c, indent, accname, -1, -1);
}

/* Computes every store's index and value (converted for memory), then stores:
 * an update may read what it overwrites. */
static void emit_stores(rctx *c, const char *indent, const char *accname) {
  const cm_kstage *s = c->s;
  clear_mark(c);
  for (int i = 0; i < s->n_stores; i++) {
    mark_from(c, s->stores[i].index);
    mark_from(c, s->stores[i].value);
  }
  emit_marked(c, indent, accname, -1, -1);
  char v[256], cv[512];
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    snprintf(v, sizeof v, "e%d", st->value);
    cast_code(cv, sizeof cv, s->exprs[st->value].dtype, bd, v);
    if (s->accumulate)
      sb_printf(c->o, "%sconst %s sv%d = %s;\n", indent, ctype(bd), i, cv);
    else if (bd == CM_BF16)
      sb_printf(c->o, "%sconst cm_bf16_t sv%d = cm_f2bf(%s);\n", indent, i, cv);
    else if (bd == CM_F16)
      sb_printf(c->o, "%sconst cm_f16_t sv%d = cm_f2h(%s);\n", indent, i, cv);
    else if (bd == CM_BOOL)
      sb_printf(c->o, "%sconst unsigned char sv%d = (%s) ? 1 : 0;\n", indent, i, cv);
    else
      sb_printf(c->o, "%sconst %s sv%d = %s;\n", indent, stype(bd), i, cv);
  }
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    char el[96];
    elem_ref(c, st->buf, st->index, el, sizeof el);
    if (!s->accumulate)
      sb_printf(c->o, "%s%s = sv%d;\n", indent, el, i);
    else if (bd == CM_BF16 || bd == CM_F16)
      sb_printf(c->o, "%scm_atomic_add16(&b%d[e%d], sv%d, %s);\n", indent, st->buf, st->index, i,
                bd == CM_BF16 ? "true" : "false");
    else
      sb_printf(c->o, "%scm_atomic_add(&b%d[e%d], sv%d);\n", indent, st->buf, st->index, i);
  }
}

/* ---- stage checks and shared pieces ------------------------------------ */

static int64_t prod(const int64_t *d, int n) {
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
  if (!r) return fail(c, -1, "out of memory");
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
    return fail(c, -1, "%d domain + %d reduction vars (at most %d)", s->n_dom, s->n_red,
                CM_KMAX_VARS);
  for (int i = 0; i < s->n_dom; i++)
    if (s->dom[i] < 1) return fail(c, -1, "domain extent %d is %lld", i, (long long)s->dom[i]);
  for (int i = 0; i < s->n_red; i++)
    if (s->red[i] < 1) return fail(c, -1, "reduction extent %d is %lld", i, (long long)s->red[i]);
  if (s->n_stores < 0 || s->n_stores > CM_KMAX_STORES)
    return fail(c, -1, "%d stores (at most %d)", s->n_stores, CM_KMAX_STORES);
  for (int e = 0; e < s->n_exprs; e++)
    if (check_expr(c, e) != CM_OK) return c->st;
  if (s->n_red > 0 && (s->body < 0 || s->body >= s->n_exprs))
    return fail(c, -1, "reduction body %d is not an expression", s->body);
  if (s->n_red > 0 && !is_fltdt(s->acc_dtype) && !is_intdt(s->acc_dtype))
    return fail(c, -1, "accumulator dtype %s is not a number type", cm_dtype_name(s->acc_dtype));
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    if (st->buf < 0 || st->buf >= c->k->n_buffers)
      return fail(c, -1, "store %d writes buffer %d of %d", i, st->buf, c->k->n_buffers);
    if (st->index < 0 || st->index >= s->n_exprs || st->value < 0 || st->value >= s->n_exprs)
      return fail(c, -1, "store %d index/value are not expressions", i);
    if (cm_kx_vars_used(s, st->index) >> s->n_dom || cm_kx_vars_used(s, st->value) >> s->n_dom)
      return fail(c, -1, "store %d uses a reduction variable", i);
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    if (s->accumulate && bd == CM_BOOL)
      return fail(c, -1,
                  "accumulate store %d into bool buffer %d: atomic add is defined for numbers only",
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
  if (s->n_red > 0 && c->useacc[s->body]) return fail(c, s->body, "the reduction body uses ACC");
  return narrow_ints(c);
}

/* __launch_bounds__ with the blocks per SM that leave 128 registers a thread:
 * given only the block size, ptxas aims at 64 registers and spills GEMM tiles
 * that need a few more (and -maxrregcount does not stop it on sm_80). */
static void launch_bounds(int threads, char *out, size_t size) {
  int min_blocks = 65536 / (threads * 128);
  snprintf(out, size, "__launch_bounds__(%d, %d) ", threads, min_blocks < 1 ? 1 : min_blocks);
}

static void signature(rctx *c, const bool *written, const char *bounds) {
  sb_printf(c->o, "extern \"C\" __global__ void %s%s_s%d(", bounds, c->k->name, c->si);
  for (int b = 0; b < c->k->n_buffers; b++) {
    cm_dtype d = c->k->buffers[b].dtype;
    sb_printf(c->o, "%s%s%s *b%d", b ? ", " : "", written[b] ? "" : "const ", stype(d), b);
  }
  sb_printf(c->o, ") {\n");
}

/* The reduction counter's C type: int when the extent (plus a block of
 * threads' stride) fits, so the counter and its div/mod stay 32-bit. */
static const char *red_counter_type(int64_t extent) {
  return extent < INT32_MAX - 4096 ? "int" : "long long";
}

/* long long v<first>.. v<first+n-1> from the linear index lin (row-major);
 * 32-bit division where the extents allow (64-bit division is slow on GPUs) */
static void decompose(rctx *c, const char *indent, const char *lin, int first, const int64_t *ext,
                      int n) {
  if (n == 0) return;
  if (n == 1) {
    sb_printf(c->o, "%slong long v%d = %s;\n", indent, first, lin);
    return;
  }
  bool narrow = prod(ext, n) < INT64_C(2147483648);
  const char *ut = narrow ? "unsigned" : "long long", *sfx = narrow ? "u" : "LL";
  sb_printf(c->o, "%s%s r%d_ = (%s)%s;\n", indent, ut, first, ut, lin);
  for (int i = n - 1; i >= 0; i--) {
    if (i == 0)
      sb_printf(c->o, "%slong long v%d = (long long)r%d_;\n", indent, first, first);
    else if (ext[i] == 1)
      sb_printf(c->o, "%slong long v%d = 0;\n", indent, first + i);
    else
      sb_printf(c->o, "%slong long v%d = (long long)(r%d_ %% %lld%s);\n%sr%d_ /= %lld%s;\n", indent,
                first + i, first, (long long)ext[i], sfx, indent, first, (long long)ext[i], sfx);
  }
}

static void acc_init(const cm_kstage *s, char *out, size_t size) {
  cm_dtype a = s->acc_dtype;
  if (s->red_op == CM_KRED_SUM)
    snprintf(out, size, "(%s)0", ctype(a));
  else if (a == CM_I32)
    snprintf(out, size, "(-2147483647 - 1)");
  else if (a == CM_I64)
    snprintf(out, size, "(-9223372036854775807LL - 1)");
  else
    snprintf(out, size, "-%s", a == CM_F64 ? "CM_INFD" : "CM_INFF");
}

static void acc_combine(const cm_kstage *s, const char *acc, const char *v, char *out,
                        size_t size) {
  /* an int body may be narrowed to int where its range allows: widen it to the
   * accumulator, or cm_accmax(long long, int) is ambiguous */
  if (is_intdt(s->acc_dtype))
    snprintf(out, size, "%s(%s, (%s)(%s))", s->red_op == CM_KRED_MAX ? "cm_accmax" : "cm_add", acc,
             ctype(s->acc_dtype), v);
  else if (s->red_op == CM_KRED_MAX)
    snprintf(out, size, "cm_accmax(%s, %s)", acc, v);
  else
    snprintf(out, size, "(%s + %s)", acc, v);
}

/* ---- generic stages ----------------------------------------------------- */

#define PAR_RED_MIN 64 /* reductions at least this long are split across threads */
#define GENERIC_THREADS 256
#define WARPS_PER_BLOCK (GENERIC_THREADS / 32)
#define GRID_CAP 1048576u

/* Who computes one domain point: a thread (serial reduction), a warp (shuffle
 * reduction: rows of moderate length, many rows), or a block of 256 threads
 * (long reductions, or too few points to fill the GPU warp by warp). */
typedef enum red_strategy { RED_THREAD, RED_WARP, RED_BLOCK } red_strategy;

static red_strategy strategy(const cm_kstage *s) {
  if (s->n_red == 0) return RED_THREAD;
  int64_t rext = prod(s->red, s->n_red), points = prod(s->dom, s->n_dom);
  if (rext < PAR_RED_MIN) return RED_THREAD;
  if (rext >= 2048 || points < 512) return RED_BLOCK;
  return RED_WARP;
}

static void render_generic(rctx *c, const bool *written) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int64_t points = prod(s->dom, s->n_dom), rext = prod(s->red, s->n_red);
  red_strategy rs = strategy(s);
  const char *at = ctype(s->acc_dtype);
  char init[128], comb[256], body[256];
  char bounds[64] = "";
  if (rs != RED_THREAD) launch_bounds(GENERIC_THREADS, bounds, sizeof bounds);
  signature(c, written, bounds);
  if (rs == RED_BLOCK) {
    sb_printf(o, "  __shared__ %s cm_part[%d];\n", at, WARPS_PER_BLOCK);
    sb_printf(o, "  for (long long p = blockIdx.x; p < %lldLL; p += gridDim.x) {\n",
              (long long)points);
  } else if (rs == RED_WARP) {
    sb_printf(o,
              "  const int lane_ = threadIdx.x & 31;\n"
              "  for (long long p = (long long)blockIdx.x * %d + (threadIdx.x >> 5); p < %lldLL;\n"
              "       p += (long long)gridDim.x * %d) {\n",
              WARPS_PER_BLOCK, (long long)points, WARPS_PER_BLOCK);
  } else {
    sb_printf(o,
              "  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < %lldLL;\n"
              "       p += (long long)gridDim.x * blockDim.x) {\n",
              (long long)points);
  }
  decompose(c, "    ", "p", 0, s->dom, s->n_dom);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  /* hoisted: everything not depending on reduction vars or ACC */
  clear_mark(c);
  if (s->n_red > 0) mark_from(c, s->body);
  for (int i = 0; i < s->n_stores; i++) {
    mark_from(c, s->stores[i].index);
    mark_from(c, s->stores[i].value);
  }
  emit_marked(c, "    ", "acc", 0, 0);
  if (s->n_red == 0) {
    emit_stores(c, "    ", "acc");
    sb_printf(o, "  }\n}\n\n");
    return;
  }
  acc_init(s, init, sizeof init);
  sb_printf(o, "    %s acc = %s;\n", at, init);
  /* an int counter where the extent allows: NVRTC 13.0 crashes (SIGSEGV in
   * nvrtcCompileProgram) on a long long counter whose value is split by an
   * unsigned div/mod by a constant that is not a power of two */
  const char *qt = red_counter_type(rext);
  if (rs == RED_BLOCK)
    sb_printf(o, "    for (%s q = threadIdx.x; q < %lldLL; q += %d) {\n", qt, (long long)rext,
              GENERIC_THREADS);
  else if (rs == RED_WARP)
    sb_printf(o, "    for (%s q = lane_; q < %lldLL; q += 32) {\n", qt, (long long)rext);
  else
    sb_printf(o, "    for (%s q = 0; q < %lldLL; q++) {\n", qt, (long long)rext);
  decompose(c, "      ", "q", s->n_dom, s->red, s->n_red);
  clear_mark(c);
  mark_from(c, s->body);
  emit_marked(c, "      ", "acc", 1, -1);
  char bname[32];
  snprintf(bname, sizeof bname, "e%d", s->body);
  cast_code(body, sizeof body, s->exprs[s->body].dtype, s->acc_dtype, bname);
  acc_combine(s, "acc", body, comb, sizeof comb);
  sb_printf(o, "      acc = %s;\n    }\n", comb);
  /* loop-local declarations leave scope */
  for (int e = 0; e < s->n_exprs; e++)
    if (c->usered[e]) c->done[e] = false;
  if (rs == RED_THREAD) {
    emit_stores(c, "    ", "acc");
    sb_printf(o, "  }\n}\n\n");
    return;
  }
  acc_combine(s, "acc", "__shfl_down_sync(0xffffffffu, acc, o_)", comb, sizeof comb);
  sb_printf(o, "    for (int o_ = 16; o_ > 0; o_ >>= 1) acc = %s;\n", comb);
  if (rs == RED_WARP) {
    sb_printf(o, "    if (lane_ == 0) {\n");
    emit_stores(c, "      ", "acc");
    sb_printf(o, "    }\n  }\n}\n\n");
    return;
  }
  sb_printf(o,
            "    if ((threadIdx.x & 31) == 0) cm_part[threadIdx.x >> 5] = acc;\n"
            "    __syncthreads();\n"
            "    if (threadIdx.x < 32) {\n"
            "      acc = threadIdx.x < %d ? cm_part[threadIdx.x] : %s;\n"
            "      for (int o_ = 16; o_ > 0; o_ >>= 1) acc = %s;\n"
            "    }\n"
            "    if (threadIdx.x == 0) {\n",
            WARPS_PER_BLOCK, init, comb);
  emit_stores(c, "      ", "acc");
  /* cm_part is reused by the next point */
  sb_printf(o, "    }\n    __syncthreads();\n  }\n}\n\n");
}

/* ---- GEMM stages -------------------------------------------------------- */

typedef struct gemm_plan {
  bool ok;
  bool mma;
  bool bf16; /* mma operand type */
  int mc, nc, kc, mr, nr;
  int warps, threads;
  int lr, lc, tm, tn; /* FMA: lanes as lr x lc, each a tm x tn micro tile */
  cm_dtype t;         /* FMA operand/accumulator dtype (f32 or f64) */
  int64_t batch, M, N, K;
} gemm_plan;

static int arch_num(const cm_cuda_render_opts *o) {
  const char *a = o && o->arch ? o->arch : "sm_80";
  if (strncmp(a, "sm_", 3) == 0) return atoi(a + 3);
  return 80;
}

/* FMA lanes: lr x lc == 32 with mr % lr == 0 and nr % lc == 0, micro tile
 * closest to square; false when none fits a sane register budget. */
static bool fma_lanes(gemm_plan *p) {
  static const int opts[] = {4, 8, 2, 16, 1, 32};
  int best = -1, best_cost = 1 << 30;
  for (int i = 0; i < 6; i++) {
    int lr = opts[i], lc = 32 / lr;
    if (p->mr % lr || p->nr % lc) continue;
    int tm = p->mr / lr, tn = p->nr / lc;
    if (tm * tn > 64) continue;
    int cost = abs(tm - tn);
    if (cost < best_cost) {
      best_cost = cost;
      best = lr;
    }
  }
  if (best < 0) return false;
  p->lr = best;
  p->lc = 32 / best;
  p->tm = p->mr / p->lr;
  p->tn = p->nr / p->lc;
  return true;
}

static gemm_plan plan_gemm(const cm_kstage *s, const cm_cuda_render_opts *o) {
  gemm_plan p;
  memset(&p, 0, sizeof p);
  /* an attention span's first stage is its first GEMM (rendered alone when the span is not fused)
   */
  bool gemm_like =
      s->tmpl == CM_KT_GEMM || s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD;
  if (!gemm_like || (o && o->no_templates)) return p;
  if (s->n_dom < 2 || s->n_red != 1 || s->red_op != CM_KRED_SUM || s->accumulate) return p;
  if (s->gemm_a < 0 || s->gemm_a >= s->n_exprs || s->gemm_b < 0 || s->gemm_b >= s->n_exprs)
    return p;
  if (s->acc_dtype != CM_F32 && s->acc_dtype != CM_F64) return p;
  /* the template's meaning needs body = MUL(A, B); anything else keeps the loop nest */
  const cm_kexpr *body = s->body >= 0 && s->body < s->n_exprs ? &s->exprs[s->body] : NULL;
  if (!body || body->kind != CM_KX_OP || body->op != CM_OP_MUL ||
      !((body->a == s->gemm_a && body->b == s->gemm_b) ||
        (body->a == s->gemm_b && body->b == s->gemm_a)))
    return p;
  p.batch = prod(s->dom, s->n_dom - 2);
  p.M = s->dom[s->n_dom - 2];
  p.N = s->dom[s->n_dom - 1];
  p.K = s->red[0];
  cm_kgemm_tiles t = s->tiles;
  if (t.mc <= 0 || t.nc <= 0 || t.kc <= 0 || t.mr <= 0 || t.nr <= 0 || t.mc % t.mr || t.nc % t.nr ||
      (t.mc / t.mr) * (t.nc / t.nr) > 16 || t.kc > 64)
    t = (cm_kgemm_tiles){64, 64, 16, 32, 32};
  p.mc = t.mc;
  p.nc = t.nc;
  p.kc = t.kc;
  p.mr = t.mr;
  p.nr = t.nr;
  cm_dtype da = s->exprs[s->gemm_a].dtype, db = s->exprs[s->gemm_b].dtype;
  bool want_mma =
      da == db && (da == CM_BF16 || da == CM_F16) && s->acc_dtype == CM_F32 && arch_num(o) >= 80;
  /* tensor cores need warp tiles of whole 16x8 fragments, at most 16 of them per warp */
  if (want_mma && (p.mr % 16 || p.nr % 8 || (p.mr / 16) * (p.nr / 8) > 16)) {
    p.mc = p.nc = 64;
    p.kc = 32;
    p.mr = p.nr = 32;
  }
  p.mma = want_mma;
  p.bf16 = da == CM_BF16;
  if (p.mma) p.kc = (p.kc + 15) / 16 * 16;
  p.t = s->acc_dtype;
  if (!p.mma && !fma_lanes(&p)) {
    p.mc = p.nc = 64;
    p.kc = 16;
    p.mr = p.nr = 32;
    fma_lanes(&p);
  }
  /* static shared memory stays under 48 KiB */
  size_t esz = p.mma ? 2 : (p.t == CM_F64 ? 8 : 4);
  while (p.kc > 16 && (size_t)(p.kc + 8) * (size_t)(p.mc + p.nc) * esz > 48 * 1024) p.kc /= 2;
  if (p.mma) p.kc = p.kc < 16 ? 16 : p.kc / 16 * 16;
  if ((size_t)(p.kc + 8) * (size_t)(p.mc + p.nc) * esz > 48 * 1024) {
    p.mc = p.nc = 64;
    p.kc = p.mma ? 32 : 16;
    p.mr = p.nr = 32;
    if (!p.mma) fma_lanes(&p);
  }
  p.warps = (p.mc / p.mr) * (p.nc / p.nr);
  p.threads = p.warps * 32;
  p.ok = true;
  return p;
}

static cm_status check_gemm_operands(rctx *c) {
  const cm_kstage *s = c->s;
  int i = s->n_dom - 2, j = s->n_dom - 1, kv = s->n_dom;
  uint32_t batch = (1u << i) - 1u;
  uint32_t ua = cm_kx_vars_used(s, s->gemm_a), ub = cm_kx_vars_used(s, s->gemm_b);
  if (ua & ~(batch | 1u << i | 1u << kv))
    return fail(c, s->gemm_a, "GEMM operand A uses a variable other than batch, i and k");
  if (ub & ~(batch | 1u << j | 1u << kv))
    return fail(c, s->gemm_b, "GEMM operand B uses a variable other than batch, k and j");
  if (c->useacc[s->gemm_a] || c->useacc[s->gemm_b]) return fail(c, -1, "GEMM operand uses ACC");
  return CM_OK;
}

/* Emits operand X's evaluation for shared-memory element (row r_, col c_ of
 * the tile) into "val_" (tile dtype); vars i/j and k come from the tile origin. */
static void emit_operand_load(rctx *c, const gemm_plan *p, bool is_a, const char *store_fmt) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int root = is_a ? s->gemm_a : s->gemm_b;
  int iv = is_a ? s->n_dom - 2 : s->n_dom - 1, kv = s->n_dom;
  /* A: kk fastest (k contiguous in row-major A); B: jj fastest */
  int outer = is_a ? p->mc : p->kc, inner = is_a ? p->kc : p->nc;
  /* two elements in flight per thread: full unrolling keeps every element's index
   * arithmetic live at once, and ptxas then spills some GEMMs */
  sb_printf(o, "#pragma unroll 2\n      for (int t_ = threadIdx.x; t_ < %d; t_ += %d) {\n",
            outer * inner, p->threads);
  if (is_a)
    sb_printf(o, "        const int ii_ = t_ / %d, kk_ = t_ %% %d;\n", inner, inner);
  else
    sb_printf(o, "        const int kk_ = t_ / %d, ii_ = t_ %% %d;\n", inner, inner);
  sb_printf(o, "        const long long v%d = %s + ii_, v%d = k0_ + kk_;\n", iv,
            is_a ? "m0_" : "n0_", kv);
  const char *tt = p->mma ? "unsigned short" : ctype(p->t);
  sb_printf(o, "        %s val_ = 0;\n", tt);
  sb_printf(o, "        if (v%d < %lldLL && v%d < %lldLL) {\n", iv, (long long)(is_a ? p->M : p->N),
            kv, (long long)p->K);
  emit_tree(c, root, "          ", "acc");
  char v[32], cv[256];
  snprintf(v, sizeof v, "e%d", root);
  if (p->mma) {
    cast_code(cv, sizeof cv, s->exprs[root].dtype, p->bf16 ? CM_BF16 : CM_F16, v);
    sb_printf(o, "          val_ = %s(%s);\n", p->bf16 ? "cm_f2bf" : "cm_f2h", cv);
  } else {
    cast_code(cv, sizeof cv, s->exprs[root].dtype, p->t, v);
    sb_printf(o, "          val_ = %s;\n", cv);
  }
  sb_printf(o, "        }\n");
  sb_printf(o, store_fmt, "        ");
  sb_printf(o, "      }\n");
  /* those declared inside the loop are out of scope now */
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
}

static void render_gemm(rctx *c, const gemm_plan *p, const bool *written) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int nb = s->n_dom - 2, iv = s->n_dom - 2, jv = s->n_dom - 1;
  char bounds[64];
  launch_bounds(p->threads, bounds, sizeof bounds);
  signature(c, written, bounds);
  if (p->mma) {
    sb_printf(o, "  __shared__ __align__(16) unsigned short As_[%d][%d];\n", p->mc, p->kc + 8);
    sb_printf(o, "  __shared__ __align__(16) unsigned short Bs_[%d][%d];\n", p->nc, p->kc + 8);
  } else {
    sb_printf(o, "  __shared__ %s As_[%d][%d];\n", ctype(p->t), p->kc, p->mc + 4);
    sb_printf(o, "  __shared__ %s Bs_[%d][%d];\n", ctype(p->t), p->kc, p->nc + 4);
  }
  sb_printf(o,
            "  const int warp_ = threadIdx.x >> 5, lane_ = threadIdx.x & 31;\n"
            "  const int wm_ = warp_ / %d, wn_ = warp_ %% %d;\n",
            p->nc / p->nr, p->nc / p->nr);
  if (p->mma)
    sb_printf(o, "  const int g_ = lane_ >> 2, q_ = lane_ & 3;\n");
  else
    sb_printf(o, "  const int lr_ = lane_ / %d, lc_ = lane_ %% %d;\n", p->lc, p->lc);
  /* a block loop only where the grid cannot cover the dimension (launch caps) */
  int64_t gy = (p->M + p->mc - 1) / p->mc, gx = (p->N + p->nc - 1) / p->nc;
  if (nb == 0)
    sb_printf(o, "  {\n");
  else if (p->batch <= 65535)
    sb_printf(o, "  {\n    const long long bz_ = blockIdx.z;\n");
  else
    sb_printf(o, "  for (long long bz_ = blockIdx.z; bz_ < %lldLL; bz_ += gridDim.z) {\n",
              (long long)p->batch);
  decompose(c, "    ", "bz_", 0, s->dom, nb);
  if (gy <= 65535)
    sb_printf(o, "    {\n    const long long by_ = blockIdx.y;\n");
  else
    sb_printf(o, "    for (long long by_ = blockIdx.y; by_ < %lldLL; by_ += gridDim.y) {\n",
              (long long)gy);
  if (gx <= 2147483647)
    sb_printf(o, "    {\n    const long long bx_ = blockIdx.x;\n");
  else
    sb_printf(o, "    for (long long bx_ = blockIdx.x; bx_ < %lldLL; bx_ += gridDim.x) {\n",
              (long long)gx);
  sb_printf(o, "      const long long m0_ = by_ * %d, n0_ = bx_ * %d;\n", p->mc, p->nc);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  int fm = p->mr / 16, fn = p->nr / 8;
  if (p->mma)
    sb_printf(o, "      float acc_[%d][%d][4];\n", fm, fn);
  else
    sb_printf(o, "      %s acc_[%d][%d];\n", ctype(p->t), p->tm, p->tn);
  sb_printf(o,
            "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
            "#pragma unroll\n        for (int y_ = 0; y_ < %d; y_++)%s = 0;\n",
            p->mma ? fm : p->tm, p->mma ? fn : p->tn,
            p->mma ? " acc_[x_][y_][0] = acc_[x_][y_][1] = acc_[x_][y_][2] = acc_[x_][y_][3]"
                   : " acc_[x_][y_]");
  sb_printf(o, "#pragma unroll 1\n      for (long long k0_ = 0; k0_ < %lldLL; k0_ += %d) {\n",
            (long long)p->K, p->kc);
  sb_printf(o, "      __syncthreads();\n");
  emit_operand_load(c, p, true, p->mma ? "%sAs_[ii_][kk_] = val_;\n" : "%sAs_[kk_][ii_] = val_;\n");
  emit_operand_load(c, p, false,
                    p->mma ? "%sBs_[ii_][kk_] = val_;\n" : "%sBs_[kk_][ii_] = val_;\n");
  sb_printf(o, "      __syncthreads();\n");
  if (p->mma) {
    const char *ty = p->bf16 ? "bf16" : "f16";
    sb_printf(
        o,
        "#pragma unroll\n"
        "      for (int ks_ = 0; ks_ < %d; ks_ += 16) {\n"
        "        unsigned af_[%d][4], bf_[%d][2];\n"
        "#pragma unroll\n"
        "        for (int x_ = 0; x_ < %d; x_++) {\n"
        "          const int r_ = wm_ * %d + x_ * 16 + g_;\n"
        "          af_[x_][0] = *(const unsigned *)&As_[r_][ks_ + 2 * q_];\n"
        "          af_[x_][1] = *(const unsigned *)&As_[r_ + 8][ks_ + 2 * q_];\n"
        "          af_[x_][2] = *(const unsigned *)&As_[r_][ks_ + 2 * q_ + 8];\n"
        "          af_[x_][3] = *(const unsigned *)&As_[r_ + 8][ks_ + 2 * q_ + 8];\n"
        "        }\n"
        "#pragma unroll\n"
        "        for (int y_ = 0; y_ < %d; y_++) {\n"
        "          const int cidx_ = wn_ * %d + y_ * 8 + g_;\n"
        "          bf_[y_][0] = *(const unsigned *)&Bs_[cidx_][ks_ + 2 * q_];\n"
        "          bf_[y_][1] = *(const unsigned *)&Bs_[cidx_][ks_ + 2 * q_ + 8];\n"
        "        }\n"
        "#pragma unroll\n"
        "        for (int x_ = 0; x_ < %d; x_++)\n"
        "#pragma unroll\n"
        "          for (int y_ = 0; y_ < %d; y_++)\n"
        "            asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.%s.%s.f32 \"\n"
        "                         \"{%%0,%%1,%%2,%%3}, {%%4,%%5,%%6,%%7}, {%%8,%%9}, "
        "{%%0,%%1,%%2,%%3};\\n\"\n"
        "                         : \"+f\"(acc_[x_][y_][0]), \"+f\"(acc_[x_][y_][1]),\n"
        "                           \"+f\"(acc_[x_][y_][2]), \"+f\"(acc_[x_][y_][3])\n"
        "                         : \"r\"(af_[x_][0]), \"r\"(af_[x_][1]), \"r\"(af_[x_][2]),\n"
        "                           \"r\"(af_[x_][3]), \"r\"(bf_[y_][0]), \"r\"(bf_[y_][1]));\n"
        "      }\n",
        p->kc, fm, fn, fm, p->mr, fn, p->nr, fm, fn, ty, ty);
  } else {
    sb_printf(
        o,
        "#pragma unroll\n"
        "      for (int kk_ = 0; kk_ < %d; kk_++) {\n"
        "        %s a_[%d], b_[%d];\n"
        "#pragma unroll\n"
        "        for (int x_ = 0; x_ < %d; x_++) a_[x_] = As_[kk_][wm_ * %d + x_ * %d + lr_];\n"
        "#pragma unroll\n"
        "        for (int y_ = 0; y_ < %d; y_++) b_[y_] = Bs_[kk_][wn_ * %d + y_ * %d + lc_];\n"
        "#pragma unroll\n"
        "        for (int x_ = 0; x_ < %d; x_++)\n"
        "#pragma unroll\n"
        "          for (int y_ = 0; y_ < %d; y_++) acc_[x_][y_] = fma(a_[x_], b_[y_], "
        "acc_[x_][y_]);\n"
        "      }\n",
        p->kc, ctype(p->t), p->tm, p->tn, p->tm, p->mr, p->lr, p->tn, p->nr, p->lc, p->tm, p->tn);
  }
  sb_printf(o, "      }\n"); /* k loop */
  /* epilogue: element (x_, y_[, h_]) of the thread's tile is C[i][j] */
  if (p->mma)
    sb_printf(o,
              "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
              "#pragma unroll\n      for (int y_ = 0; y_ < %d; y_++)\n"
              "#pragma unroll\n      for (int h_ = 0; h_ < 4; h_++) {\n"
              "        const long long v%d = m0_ + wm_ * %d + x_ * 16 + g_ + (h_ >> 1) * 8;\n"
              "        const long long v%d = n0_ + wn_ * %d + y_ * 8 + 2 * q_ + (h_ & 1);\n"
              "        const float acc = acc_[x_][y_][h_];\n",
              fm, fn, iv, p->mr, jv, p->nr);
  else
    sb_printf(o,
              "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
              "#pragma unroll\n      for (int y_ = 0; y_ < %d; y_++) {\n"
              "        const long long v%d = m0_ + wm_ * %d + x_ * %d + lr_;\n"
              "        const long long v%d = n0_ + wn_ * %d + y_ * %d + lc_;\n"
              "        const %s acc = acc_[x_][y_];\n",
              p->tm, p->tn, iv, p->mr, p->lr, jv, p->nr, p->lc, ctype(p->t));
  sb_printf(o, "        if (v%d < %lldLL && v%d < %lldLL) {\n", iv, (long long)p->M, jv,
            (long long)p->N);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  emit_stores(c, "          ", "acc");
  sb_printf(o, "        }\n      }\n");
  sb_printf(o, "    }\n    }\n  }\n}\n\n");
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
static cm_status rctx_open(rctx *c, const cm_kernel *k, int si, sbuf *o, cm_err *err) {
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
    return fail(c, -1, "malformed expression array");
  return check_stage(c);
}

static void rctx_close(rctx *c) {
  free(c->done);
  free(c->mark);
  free(c->usered);
  free(c->useacc);
  free(c->narrow);
}

/* ---- fused attention spans ------------------------------------------------ */

#define ATTN_THREADS 256
#define ATTN_SMEM (48 * 1024) /* static shared memory of one block */
#define ATTN_MAX_ROWS 64

/* A fused rendering of an attention span: one block per (batch item, block of
 * br query rows) runs every stage of the span restricted to its rows, the
 * local buffers in shared memory (the per-row slices when the span is
 * row-local, else the whole batch item's), a barrier between stages. */
typedef struct attn_plan {
  bool ok;
  bool rowwise;
  int span, nb;
  int64_t rows, batch;
  int br, nrb;                            /* query rows per block, blocks per batch item */
  int64_t slot_elems[CM_KATTN_MAX_LOCAL]; /* shared elements of each local per block */
} attn_plan;

static size_t dt_size(cm_dtype d) {
  switch (d) {
  case CM_F64:
  case CM_I64: return 8;
  case CM_F32:
  case CM_I32: return 4;
  case CM_BF16:
  case CM_F16: return 2;
  default: return 1;
  }
}

static attn_plan plan_attention(const cm_kernel *k, int first, const cm_cuda_render_opts *o) {
  attn_plan p;
  memset(&p, 0, sizeof p);
  const cm_kstage *s0 = &k->stages[first];
  if ((s0->tmpl != CM_KT_ATTENTION_FWD && s0->tmpl != CM_KT_ATTENTION_BWD) ||
      (o && o->no_templates))
    return p;
  cm_err e = {0};
  if (cm_kattn_check(k, first, &e) != CM_OK) return p;
  const cm_kattn *a = &s0->attn;
  p.span = a->span;
  p.nb = a->nb;
  p.rows = a->rows;
  p.rowwise = a->br < a->rows;
  p.batch = prod(s0->dom, a->nb);
  /* bytes of shared memory per query row (16-byte aligned slices) */
  size_t per_row = 0;
  for (int i = 0; i < a->n_local; i++)
    per_row += (size_t)a->local_row[i] * dt_size(k->buffers[a->local[i]].dtype);
  per_row += 16 * (size_t)a->n_local;
  if (p.rowwise) {
    int64_t br = (int64_t)(ATTN_SMEM / (per_row ? per_row : 1));
    if (br > ATTN_MAX_ROWS) br = ATTN_MAX_ROWS;
    if (br > p.rows) br = p.rows;
    if (br < 1) return p;
    /* even blocks: no short last block when the rows split evenly enough */
    int64_t nrb = (p.rows + br - 1) / br;
    br = (p.rows + nrb - 1) / nrb;
    p.br = (int)br;
    p.nrb = (int)nrb;
  } else {
    if ((double)p.rows * (double)per_row > ATTN_SMEM) return p;
    p.br = (int)p.rows;
    p.nrb = 1;
  }
  /* the slices, 16-element aligned; fewer rows while they overflow the budget */
  for (;;) {
    double total = 0;
    for (int i = 0; i < a->n_local; i++) {
      p.slot_elems[i] = (int64_t)p.br * a->local_row[i];
      if (p.slot_elems[i] % 16) p.slot_elems[i] += 16 - p.slot_elems[i] % 16;
      total += (double)p.slot_elems[i] * (double)dt_size(k->buffers[a->local[i]].dtype);
    }
    if (total <= ATTN_SMEM) break;
    if (!p.rowwise || p.br == 1) return p;
    p.br--;
    p.nrb = (int)((p.rows + p.br - 1) / p.br);
  }
  if ((double)p.batch * p.nrb > 2147483647.0) return p;
  p.ok = true;
  return p;
}

/* One stage of the span inside the fused function: the block's points, a
 * thread per point with a serial reduction, then a barrier. */
static void render_span_stage(rctx *c, const attn_plan *p) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int nb = p->nb;
  int64_t inner = prod(s->dom + nb + (p->rowwise ? 1 : 0), s->n_dom - nb - (p->rowwise ? 1 : 0));
  sb_printf(o, "  { // stage %d \"%s\"\n", c->si, s->name);
  if (p->rowwise)
    sb_printf(o, "  const long long np_ = (long long)rb_ * %lldLL;\n", (long long)inner);
  else
    sb_printf(o, "  const long long np_ = %lldLL;\n", (long long)inner);
  sb_printf(o, "  for (long long p = threadIdx.x; p < np_; p += %d) {\n", ATTN_THREADS);
  for (int v = 0; v < nb; v++) sb_printf(o, "    const long long v%d = bv%d_;\n", v, v);
  if (p->rowwise) {
    sb_printf(o, "    const long long pr_ = p / %lldLL, pi_ = p %% %lldLL;\n", (long long)inner,
              (long long)inner);
    sb_printf(o, "    const long long v%d = row0_ + pr_;\n", nb);
    decompose(c, "    ", "pi_", nb + 1, s->dom + nb + 1, s->n_dom - nb - 1);
  } else {
    decompose(c, "    ", "p", nb, s->dom + nb, s->n_dom - nb);
  }
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  clear_mark(c);
  if (s->n_red > 0) mark_from(c, s->body);
  for (int i = 0; i < s->n_stores; i++) {
    mark_from(c, s->stores[i].index);
    mark_from(c, s->stores[i].value);
  }
  emit_marked(c, "    ", "acc", 0, 0);
  if (s->n_red > 0) {
    char init[128], comb[256], body[256], bname[32];
    acc_init(s, init, sizeof init);
    sb_printf(o, "    %s acc = %s;\n", ctype(s->acc_dtype), init);
    sb_printf(o, "    for (%s q = 0; q < %lldLL; q++) {\n",
              red_counter_type(prod(s->red, s->n_red)), (long long)prod(s->red, s->n_red));
    decompose(c, "      ", "q", s->n_dom, s->red, s->n_red);
    clear_mark(c);
    mark_from(c, s->body);
    emit_marked(c, "      ", "acc", 1, -1);
    snprintf(bname, sizeof bname, "e%d", s->body);
    cast_code(body, sizeof body, s->exprs[s->body].dtype, s->acc_dtype, bname);
    acc_combine(s, "acc", body, comb, sizeof comb);
    sb_printf(o, "      acc = %s;\n    }\n", comb);
    for (int e = 0; e < s->n_exprs; e++)
      if (c->usered[e]) c->done[e] = false;
  }
  emit_stores(c, "    ", "acc");
  sb_printf(o, "  }\n  __syncthreads();\n  }\n");
}

/* The span from stage `first` as one function (named after the first stage);
 * the span's other stages get empty functions. */
static cm_status render_attention(const cm_kernel *k, int first, const attn_plan *p, sbuf *o,
                                  const bool *written, cm_err *err) {
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  rctx c0;
  cm_status st = rctx_open(&c0, k, first, o, err);
  if (st == CM_OK) {
    sb_printf(o, "// stages %d..%d (attention %s, fused: %d query rows per block)\n", first,
              first + p->span - 1, s0->tmpl == CM_KT_ATTENTION_FWD ? "forward" : "backward", p->br);
    char bounds[64];
    launch_bounds(ATTN_THREADS, bounds, sizeof bounds);
    signature(&c0, written, bounds);
  }
  rctx_close(&c0);
  if (st != CM_OK) return st;
  for (int i = 0; i < a->n_local; i++)
    sb_printf(o, "  __shared__ __align__(16) %s sl%d_[%lld];\n",
              stype(k->buffers[a->local[i]].dtype), i, (long long)p->slot_elems[i]);
  sb_printf(o, "  const long long blk_ = blockIdx.x;\n");
  sb_printf(o, "  const long long bi_ = blk_ / %d, row0_ = (blk_ %% %d) * %d;\n", p->nrb, p->nrb,
            p->br);
  if (p->rowwise)
    sb_printf(o, "  const long long rb_ = %lldLL - row0_ < %d ? %lldLL - row0_ : %d;\n",
              (long long)p->rows, p->br, (long long)p->rows, p->br);
  for (int i = 0; i < a->n_local; i++)
    sb_printf(o, "  const long long lb%d_ = (bi_ * %lldLL + row0_) * %lldLL;\n", i,
              (long long)p->rows, (long long)a->local_row[i]);
  /* the batch vars, shared by every stage of the span */
  if (p->nb > 0) {
    sb_printf(o, "  {\n");
    rctx cb;
    st = rctx_open(&cb, k, first, o, err);
    if (st == CM_OK) decompose(&cb, "  ", "bi_", 0, s0->dom, p->nb);
    rctx_close(&cb);
    for (int v = 0; v < p->nb && st == CM_OK; v++)
      sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
  }
  int *local = malloc(sizeof(int) * (size_t)(k->n_buffers + 1));
  if (!local) return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  for (int b = 0; b < k->n_buffers; b++) local[b] = -1;
  for (int i = 0; i < a->n_local; i++) local[a->local[i]] = i;
  for (int si = first; si < first + p->span && st == CM_OK; si++) {
    rctx c;
    st = rctx_open(&c, k, si, o, err);
    c.local = local;
    if (st == CM_OK) render_span_stage(&c, p);
    if (st == CM_OK) st = c.st;
    rctx_close(&c);
  }
  free(local);
  if (p->nb > 0) sb_printf(o, "  }\n");
  sb_printf(o, "}\n\n");
  for (int si = first + 1; si < first + p->span && st == CM_OK; si++) {
    rctx c;
    st = rctx_open(&c, k, si, o, err);
    if (st == CM_OK) {
      sb_printf(o, "// stage %d \"%s\" (runs in stage %d)\n", si, k->stages[si].name, first);
      signature(&c, written, "");
      sb_printf(o, "}\n\n");
    }
    rctx_close(&c);
  }
  return st;
}

/* ---- streaming attention (online softmax over key blocks) ------------------
 *
 * A forward span the lowering matched for streaming (cm_kattn.stream): one
 * block of 256 threads per (batch item, block of BR query rows). The block's
 * Q rows go to shared memory once; per block of BC keys, K_j^T is staged in
 * shared memory, S_j = Q K_j^T (a thread per score, then the S stage's
 * epilogue), one thread per row keeps the running max m, the rescale factor
 * alpha = exp(m_old - m_new) and the running sum l, overwriting S_j with
 * E_j = the E stage's value at m_new; V_j is staged over K_j and O = alpha O +
 * E_j V_j (a thread per output). Finally O / l runs through the O stage's
 * epilogue; the roles the graph keeps are written from the final m and l (S,
 * E, P by a second pass over the key blocks). Shared memory: BR (D + BC + 1 +
 * DV + 3) + max(D BC, BC DV) floats, at most 48 KiB; rows of S_j are BC + 1
 * floats apart (the per-row phase reads a column per thread: no bank
 * conflicts). Backward spans marked for streaming: render_stream_bwd. */

#define FA_SMEM_FLOATS (48 * 1024 / 4)

typedef struct fa_cplan {
  bool ok;
  int nb, br, bc, nrb, nkb;
  int64_t rows, keys, d, dv, batch, kvn;
  const cm_kstage *sS, *sM, *sE, *sL, *sP, *sO;
  int iS, iM, iE, iL, iP, iO;
} fa_cplan;

/* The batch vars of a role stage (the lowering's rule: its row var follows). */
static int fa_cuda_stage_nb(const cm_kstage *s, bool stat) {
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) return s->n_dom - 1;
  return s->n_dom - 2;
}

static fa_cplan plan_stream(const cm_kernel *k, int first, const cm_cuda_render_opts *o) {
  fa_cplan p;
  memset(&p, 0, sizeof p);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (s0->tmpl != CM_KT_ATTENTION_FWD || !a->stream || (o && o->no_templates)) return p;
  cm_err e = {0};
  if (cm_kernel_verify(k, &e) != CM_OK || cm_kattn_stream_check(k, first, &e) != CM_OK) return p;
  int end = first + a->span, st[4] = {a->st_max, a->st_exp, a->st_sum, a->st_out};
  for (int i = 0; i < 4; i++)
    if (st[i] <= first || st[i] >= end) return p;
  if (a->st_p != -1 && (a->st_p <= first || a->st_p >= end)) return p;
  int bf[4] = {a->buf_s, a->buf_m, a->buf_e, a->buf_l};
  for (int i = 0; i < 4; i++)
    if (bf[i] < 0 || bf[i] >= k->n_buffers) return p;
  if ((a->st_p >= 0) != (a->buf_p >= 0) || a->buf_p >= k->n_buffers) return p;
  p.nb = a->nb;
  p.iS = first, p.iM = a->st_max, p.iE = a->st_exp, p.iL = a->st_sum, p.iO = a->st_out;
  p.iP = a->st_p;
  p.sS = s0, p.sM = &k->stages[p.iM], p.sE = &k->stages[p.iE], p.sL = &k->stages[p.iL];
  p.sO = &k->stages[p.iO], p.sP = p.iP >= 0 ? &k->stages[p.iP] : NULL;
  if (s0->n_dom != p.nb + 2 || s0->n_red != 1 || s0->n_stores != 1 || p.sO->n_dom < 2 ||
      p.sO->n_red != 1 || p.sM->n_red != 1 || p.sL->n_red != 1 || p.sE->n_stores != 1 ||
      (p.sP && p.sP->n_stores != 1) || s0->gemm_a < 0 || s0->gemm_b < 0 || p.sO->gemm_b < 0)
    return p;
  p.rows = a->rows, p.keys = s0->dom[p.nb + 1], p.d = s0->red[0];
  p.dv = p.sO->dom[p.sO->n_dom - 1];
  p.batch = prod(s0->dom, p.nb);
  int64_t bc = a->bc < 64 ? a->bc : 64, br = p.rows < 64 ? p.rows : 64;
  if (bc < 1 || p.keys < 2) return p;
  for (;;) {
    int64_t kvn = p.d * bc > bc * p.dv ? p.d * bc : bc * p.dv;
    double fl = (double)br * (double)(p.d + bc + 1 + p.dv + 3) + (double)kvn;
    if (fl <= FA_SMEM_FLOATS) {
      p.kvn = kvn;
      break;
    }
    if (br > 1)
      br = br / 2;
    else if (bc > 1)
      bc = bc / 2;
    else
      return p;
  }
  int64_t nrb = (p.rows + br - 1) / br;
  br = (p.rows + nrb - 1) / nrb;
  p.br = (int)br, p.bc = (int)bc, p.nrb = (int)nrb;
  p.nkb = (int)((p.keys + bc - 1) / bc);
  if ((double)p.batch * p.nrb > 2147483647.0) return p;
  p.ok = true;
  return p;
}

/* Opens a C scope for one point of stage c->s of a span with nb batch vars
 * (stat: the stage computes a row statistic): its vars (batch from bv<i>_
 * when the stage's batch axes are the span's, else 0; the row var = row, the
 * var after it = col, the reduction var = red; NULL or any other var: 0). */
static void fb_cuda_point(rctx *c, int nb, bool stat, const char *ind, const char *row,
                          const char *col, const char *red) {
  const cm_kstage *s = c->s;
  int nbs = fa_cuda_stage_nb(s, stat);
  sb_printf(c->o, "%s{\n", ind);
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    const char *val = "0";
    char bvn[24];
    if (v < nbs && nbs == nb) {
      snprintf(bvn, sizeof bvn, "bv%d_", v);
      val = bvn;
    }
    if (v == nbs && row) val = row;
    if (v == nbs + 1 && v < s->n_dom && col) val = col;
    if (v == s->n_dom && red) val = red;
    sb_printf(c->o, "%s  const long long v%d = (long long)(%s); (void)v%d;\n", ind, v, val, v);
  }
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
}

/* The same for a forward span: its row statistics are the max and sum stages. */
static void fa_cuda_point(rctx *c, const fa_cplan *p, const char *ind, const char *row,
                          const char *col, const char *red) {
  fb_cuda_point(c, p->nb, c->s == p->sM || c->s == p->sL, ind, row, col, red);
}

/* The K_j^T tile (fkv_[k * BC + j]) of the current key block, then a barrier. */
static void fa_cuda_ktile(rctx *cS, const fa_cplan *p) {
  sbuf *o = cS->o;
  sb_printf(o, "  for (int p_ = tid_; p_ < %lld * bc_; p_ += 256) {\n", (long long)p->d);
  sb_printf(o, "    const int k_ = p_ / bc_, j_ = p_ %% bc_;\n");
  fa_cuda_point(cS, p, "    ", "0", "j0_ + j_", "k_");
  emit_tree(cS, p->sS->gemm_b, "      ", "acc");
  sb_printf(o, "      fkv_[k_ * %d + j_] = (float)(e%d);\n    }\n  }\n  __syncthreads();\n", p->bc,
            p->sS->gemm_b);
}

/* The S value at (r_, j_) of the block: acc = Q K^T, then the S stage's
 * store value (stored too when kept), left in float sv_. */
static void fa_cuda_score(rctx *cS, const fa_cplan *p, const char *ind, bool keep) {
  sbuf *o = cS->o;
  sb_printf(o, "%sfloat acc = 0.f;\n", ind);
  sb_printf(
      o, "%sfor (int k_ = 0; k_ < %lld; k_++) acc += fq_[r_ * %lld + k_] * fkv_[k_ * %d + j_];\n",
      ind, (long long)p->d, (long long)p->d, p->bc);
  sb_printf(o, "%sfloat sv_;\n", ind);
  fa_cuda_point(cS, p, ind, "row0_ + r_", "j0_ + j_", NULL);
  char in2[32];
  snprintf(in2, sizeof in2, "%s  ", ind);
  int val = p->sS->stores[0].value;
  if (keep)
    emit_stores(cS, in2, "acc");
  else
    emit_tree(cS, val, in2, "acc");
  sb_printf(o, "%s  sv_ = (float)(e%d);\n%s}\n", ind, val, ind);
}

/* The span from stage `first` as one streaming function; the span's other
 * stages get empty functions. */
static cm_status render_stream(const cm_kernel *k, int first, const fa_cplan *p, sbuf *o,
                               const bool *written, cm_err *err) {
  const cm_kattn *a = &k->stages[first].attn;
  rctx cS, cM, cE, cL, cO, cP;
  memset(&cS, 0, sizeof cS), memset(&cM, 0, sizeof cM), memset(&cE, 0, sizeof cE);
  memset(&cL, 0, sizeof cL), memset(&cO, 0, sizeof cO), memset(&cP, 0, sizeof cP);
  cm_status st = rctx_open(&cS, k, p->iS, o, err);
  if (st == CM_OK) st = rctx_open(&cM, k, p->iM, o, err);
  if (st == CM_OK) st = rctx_open(&cE, k, p->iE, o, err);
  if (st == CM_OK) st = rctx_open(&cL, k, p->iL, o, err);
  if (st == CM_OK) st = rctx_open(&cO, k, p->iO, o, err);
  if (st == CM_OK && p->sP) st = rctx_open(&cP, k, p->iP, o, err);
  const char **sub = calloc((size_t)k->n_buffers + 1, sizeof *sub);
  if (st == CM_OK && !sub) st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  if (st == CM_OK) {
    int BR = p->br, BC = p->bc;
    long long D = (long long)p->d, DV = (long long)p->dv;
    char sidx[64];
    snprintf(sidx, sizeof sidx, "fs_[r_ * %d + j_]", BC + 1);
    sb_printf(o,
              "// stages %d..%d (attention forward, streaming: %d query rows x %d keys per "
              "step, %d key blocks)\n",
              first, first + a->span - 1, BR, BC, p->nkb);
    char bounds[64];
    launch_bounds(256, bounds, sizeof bounds);
    signature(&cS, written, bounds);
    sb_printf(o, "  __shared__ __align__(16) float fq_[%lld];\n", (long long)BR * D);
    sb_printf(o, "  __shared__ __align__(16) float fkv_[%lld];\n", (long long)p->kvn);
    sb_printf(o, "  __shared__ __align__(16) float fs_[%d];\n", BR * (BC + 1));
    sb_printf(o, "  __shared__ __align__(16) float fo_[%lld];\n", (long long)BR * DV);
    sb_printf(o, "  __shared__ float fm_[%d], fl_[%d], fa_[%d];\n", BR, BR, BR);
    sb_printf(o, "  const long long blk_ = blockIdx.x;\n");
    sb_printf(o, "  const long long bi_ = blk_ / %d, row0_ = (blk_ %% %d) * %d;\n", p->nrb, p->nrb,
              BR);
    sb_printf(o, "  const int rb_ = %lldLL - row0_ < %d ? (int)(%lldLL - row0_) : %d;\n",
              (long long)p->rows, BR, (long long)p->rows, BR);
    sb_printf(o, "  const int tid_ = threadIdx.x;\n  (void)bi_;\n  {\n");
    if (p->nb > 0) {
      decompose(&cS, "  ", "bi_", 0, p->sS->dom, p->nb);
      for (int v = 0; v < p->nb; v++) sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
    }
    /* Q rows of the block */
    sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * %lld; p_ += 256) {\n", D);
    sb_printf(o, "    const int r_ = p_ / %lld, k_ = p_ %% %lld;\n", D, D);
    fa_cuda_point(&cS, p, "    ", "row0_ + r_", NULL, "k_");
    emit_tree(&cS, p->sS->gemm_a, "      ", "acc");
    sb_printf(o, "      fq_[r_ * %lld + k_] = (float)(e%d);\n    }\n  }\n", D, p->sS->gemm_a);
    sb_printf(o,
              "  for (int p_ = tid_; p_ < %d; p_ += 256) { fm_[p_] = -CM_INFF; fl_[p_] = 0.f; "
              "fa_[p_] = 0.f; }\n",
              BR);
    sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += 256) fo_[p_] = 0.f;\n",
              (long long)BR * DV);
    sb_printf(o, "  __syncthreads();\n");
    /* pass 1: running max, sum and O */
    sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", p->nkb);
    sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", BC);
    sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
              (long long)p->keys, BC, (long long)p->keys, BC);
    fa_cuda_ktile(&cS, p);
    sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * bc_; p_ += 256) {\n");
    sb_printf(o, "    const int r_ = p_ / bc_, j_ = p_ %% bc_;\n");
    fa_cuda_score(&cS, p, "    ", false);
    sb_printf(o, "    %s = sv_;\n  }\n  __syncthreads();\n", sidx);
    /* one thread per row: max, rescale, E and its sum */
    sb_printf(o, "  for (int r_ = tid_; r_ < rb_; r_ += 256) {\n    float mx_ = -CM_INFF;\n");
    sb_printf(o, "    for (int j_ = 0; j_ < bc_; j_++) {\n");
    sub[a->buf_s] = sidx;
    cM.subst = sub;
    fa_cuda_point(&cM, p, "      ", "row0_ + r_", NULL, "j0_ + j_");
    emit_tree(&cM, p->sM->body, "        ", "acc");
    sb_printf(o, "        mx_ = cm_accmax(mx_, (float)(e%d));\n      }\n    }\n", p->sM->body);
    sb_printf(o, "    const float mo_ = fm_[r_], mn_ = cm_accmax(mo_, mx_);\n");
    sb_printf(o, "    const float al_ = mo_ == -CM_INFF ? 0.f : expf(mo_ - mn_);\n");
    sb_printf(o, "    float rs_ = 0.f;\n    for (int j_ = 0; j_ < bc_; j_++) {\n");
    sub[a->buf_m] = "mn_";
    cE.subst = sub;
    fa_cuda_point(&cE, p, "      ", "row0_ + r_", "j0_ + j_", NULL);
    int ev = p->sE->stores[0].value;
    emit_tree(&cE, ev, "        ", "acc");
    sb_printf(o, "        const float ev_ = (float)(e%d);\n        %s = ev_;\n", ev, sidx);
    sb_printf(o, "        rs_ += ev_;\n      }\n    }\n");
    sb_printf(o, "    fl_[r_] = al_ * fl_[r_] + rs_;\n    fm_[r_] = mn_;\n    fa_[r_] = al_;\n");
    sb_printf(o, "  }\n  __syncthreads();\n");
    sub[a->buf_s] = sub[a->buf_m] = NULL;
    /* V_j over K_j, then O = alpha O + E_j V_j */
    sb_printf(o, "  for (int p_ = tid_; p_ < bc_ * %lld; p_ += 256) {\n", DV);
    sb_printf(o, "    const int j_ = p_ / %lld, c_ = p_ %% %lld;\n", DV, DV);
    fa_cuda_point(&cO, p, "    ", "0", "c_", "j0_ + j_");
    emit_tree(&cO, p->sO->gemm_b, "      ", "acc");
    sb_printf(o, "      fkv_[p_] = (float)(e%d);\n    }\n  }\n  __syncthreads();\n", p->sO->gemm_b);
    sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * %lld; p_ += 256) {\n", DV);
    sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", DV, DV);
    sb_printf(o, "    float o_ = fa_[r_] * fo_[p_];\n");
    sb_printf(
        o, "    for (int j_ = 0; j_ < bc_; j_++) o_ += fs_[r_ * %d + j_] * fkv_[j_ * %lld + c_];\n",
        BC + 1, DV);
    sb_printf(o, "    fo_[p_] = o_;\n  }\n  __syncthreads();\n  }\n");
    /* O / l through the O stage's epilogue */
    sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * %lld; p_ += 256) {\n", DV);
    sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", DV, DV);
    sb_printf(o, "    const float acc = fo_[p_] / fl_[r_];\n");
    fa_cuda_point(&cO, p, "    ", "row0_ + r_", "c_", NULL);
    emit_stores(&cO, "      ", "acc");
    sb_printf(o, "    }\n  }\n");
    /* the row statistics the graph keeps */
    for (int r = 0; r < 2; r++) {
      if (!(a->keep & (r ? CM_KATTN_KEEP_L : CM_KATTN_KEEP_M))) continue;
      rctx *cr = r ? &cL : &cM;
      cr->subst = NULL;
      sb_printf(o, "  for (int r_ = tid_; r_ < rb_; r_ += 256) {\n");
      sb_printf(o, "    const float acc = %s[r_];\n", r ? "fl_" : "fm_");
      fa_cuda_point(cr, p, "    ", "row0_ + r_", NULL, NULL);
      emit_stores(cr, "      ", "acc");
      sb_printf(o, "    }\n  }\n");
    }
    /* pass 2: S, E, P from the final m and l */
    if (a->keep & (CM_KATTN_KEEP_S | CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
      sb_printf(o, "  __syncthreads();\n");
      sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", p->nkb);
      sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", BC);
      sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
                (long long)p->keys, BC, (long long)p->keys, BC);
      fa_cuda_ktile(&cS, p);
      sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * bc_; p_ += 256) {\n");
      sb_printf(o, "    const int r_ = p_ / bc_, j_ = p_ %% bc_;\n");
      fa_cuda_score(&cS, p, "    ", (a->keep & CM_KATTN_KEEP_S) != 0);
      if (a->keep & (CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
        sub[a->buf_s] = "sv_";
        sub[a->buf_m] = "fm_[r_]";
        cE.subst = sub;
        sb_printf(o, "    float ev_;\n");
        fa_cuda_point(&cE, p, "    ", "row0_ + r_", "j0_ + j_", NULL);
        if (a->keep & CM_KATTN_KEEP_E)
          emit_stores(&cE, "      ", "acc");
        else
          emit_tree(&cE, ev, "      ", "acc");
        sb_printf(o, "      ev_ = (float)(e%d);\n    }\n", ev);
        sub[a->buf_s] = sub[a->buf_m] = NULL;
        if (p->sP && (a->keep & CM_KATTN_KEEP_P)) {
          sub[a->buf_e] = "ev_";
          sub[a->buf_l] = "fl_[r_]";
          cP.subst = sub;
          fa_cuda_point(&cP, p, "    ", "row0_ + r_", "j0_ + j_", NULL);
          emit_stores(&cP, "      ", "acc");
          sb_printf(o, "    }\n");
          sub[a->buf_e] = sub[a->buf_l] = NULL;
        }
      }
      sb_printf(o, "  }\n  __syncthreads();\n  }\n");
    }
    sb_printf(o, "  }\n}\n\n");
    int stc[4] = {cS.st, cM.st, cE.st, cL.st};
    for (int i = 0; i < 4 && st == CM_OK; i++) st = stc[i];
    if (st == CM_OK) st = cO.st;
    if (st == CM_OK && p->sP) st = cP.st;
  }
  free(sub);
  rctx_close(&cS), rctx_close(&cM), rctx_close(&cE), rctx_close(&cL), rctx_close(&cO);
  if (p->sP) rctx_close(&cP);
  for (int si = first + 1; si < first + a->span && st == CM_OK; si++) {
    rctx c;
    st = rctx_open(&c, k, si, o, err);
    if (st == CM_OK) {
      sb_printf(o, "// stage %d \"%s\" (runs in stage %d)\n", si, k->stages[si].name, first);
      signature(&c, written, "");
      sb_printf(o, "}\n\n");
    }
    rctx_close(&c);
  }
  return st;
}

/* ---- streaming attention backward ------------------------------------------
 *
 * A backward span the lowering marked for streaming (cm_kattn.stream, roles
 * in attn.role), mirroring the CPU's: one block of 256 threads per batch item
 * (all query rows: dK_j and dV_j need every row, so no atomics across blocks
 * and no second accumulation buffer). Per key block of BC keys, pass 1
 * computes the tiles the row reductions need and accumulates those
 * reductions (rowsum(dP o P)); pass 2 recomputes every tile (dP_j, dS_j),
 * accumulates the GEMMs over query rows (dQ += dS_j K_j) and completes the
 * GEMMs over key rows (dK_j = dS_j^T Q, dV_j = P_j^T dO) through their
 * epilogues. Shared memory: the local tiles (rows x BC each), the row
 * statistics (rows each) and the dQ-like accumulators (rows x C each), at
 * most 48 KiB: BC shrinks to fit, and spans whose accumulators alone do not
 * fit keep the stage-by-stage path. Operands outside the span are read from
 * global memory per use. */

typedef struct fb_cplan {
  bool ok;
  int nb, bc, nkb, span;
  int64_t rows, keys, d, batch;
  int64_t acc_off[CM_KATTN_MAX_SPAN]; /* GEMM_ROWS accumulators: float offset in fbacc_ */
  int64_t acc_floats;
} fb_cplan;

static int fb_cuda_local(const cm_kattn *a, int b) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == b) return i;
  return -1;
}

static fb_cplan plan_stream_bwd(const cm_kernel *k, int first, const cm_cuda_render_opts *o) {
  fb_cplan p;
  memset(&p, 0, sizeof p);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (s0->tmpl != CM_KT_ATTENTION_BWD || !a->stream || (o && o->no_templates)) return p;
  cm_err e = {0};
  if (cm_kernel_verify(k, &e) != CM_OK || cm_kattn_stream_check(k, first, &e) != CM_OK) return p;
  if (a->span < 2 || a->span > CM_KATTN_MAX_SPAN || first + a->span > k->n_stages ||
      a->n_local < 1 || a->n_local > CM_KATTN_MAX_LOCAL || a->nb != s0->n_dom - 2 ||
      s0->n_red != 1 || s0->gemm_a < 0 || s0->gemm_b < 0 || a->role[0] != CM_KATTN_ROLE_TILE)
    return p;
  p.nb = a->nb, p.span = a->span, p.rows = a->rows, p.keys = s0->dom[p.nb + 1];
  p.d = s0->red[0], p.batch = prod(s0->dom, p.nb);
  int ntile = 0, nstat = 0;
  for (int i = 0; i < a->n_local; i++) {
    if (a->local[i] < 0 || a->local[i] >= k->n_buffers) return p;
    if (a->local_row[i] == 1)
      nstat++;
    else
      ntile++;
  }
  for (int r = 0; r < p.span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    int role = a->role[r];
    p.acc_off[r] = -1;
    if (role == CM_KATTN_ROLE_TILE || role == CM_KATTN_ROLE_ROWRED) {
      if (s->n_stores != 1 || fb_cuda_local(a, s->stores[0].buf) < 0) return p;
      if (role == CM_KATTN_ROLE_ROWRED && s->n_red != 1) return p;
    } else if (role == CM_KATTN_ROLE_GEMM_ROWS || role == CM_KATTN_ROLE_GEMM_KEYS) {
      if (s->n_dom < 2 || s->n_red != 1 || s->gemm_a < 0 || s->gemm_b < 0) return p;
      if (role == CM_KATTN_ROLE_GEMM_ROWS) {
        p.acc_off[r] = p.acc_floats;
        p.acc_floats += p.rows * s->dom[s->n_dom - 1];
      }
    } else {
      return p;
    }
  }
  int64_t bc = a->bc < 64 ? a->bc : 64;
  if (bc < 1 || p.keys < 2) return p;
  for (;;) {
    double fl = (double)p.acc_floats + (double)nstat * (double)p.rows +
                (double)ntile * (double)p.rows * (double)bc;
    if (fl <= FA_SMEM_FLOATS) break;
    if (bc == 1) return p;
    bc = bc / 2;
  }
  p.bc = (int)bc;
  p.nkb = (int)((p.keys + bc - 1) / bc);
  if ((double)p.batch > 2147483647.0) return p;
  p.ok = true;
  return p;
}

static void fb_cuda_block_head(sbuf *o, const fb_cplan *p) {
  sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", p->nkb);
  sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", p->bc);
  sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
            (long long)p->keys, p->bc, (long long)p->keys, p->bc);
}

static cm_status render_stream_bwd(const cm_kernel *k, int first, const fb_cplan *p, sbuf *o,
                                   const bool *written, cm_err *err) {
  const cm_kattn *a = &k->stages[first].attn;
  rctx cs[CM_KATTN_MAX_SPAN];
  memset(cs, 0, sizeof cs);
  cm_status st = CM_OK;
  int opened = 0;
  for (int r = 0; r < p->span && st == CM_OK; r++, opened++)
    st = rctx_open(&cs[r], k, first + r, o, err);
  char **sub = calloc((size_t)k->n_buffers + 1, sizeof *sub);
  if (st == CM_OK && !sub) st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  for (int i = 0; st == CM_OK && i < a->n_local; i++) {
    char t[64];
    if (a->local_row[i] == 1)
      snprintf(t, sizeof t, "fbl%d_[r_]", i);
    else
      snprintf(t, sizeof t, "fbl%d_[r_ * %d + j_]", i, p->bc);
    sub[a->local[i]] = malloc(strlen(t) + 1);
    if (!sub[a->local[i]]) {
      st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
      break;
    }
    memcpy(sub[a->local[i]], t, strlen(t) + 1);
  }
  if (st == CM_OK) {
    long long R = (long long)p->rows;
    int BC = p->bc;
    for (int r = 0; r < p->span; r++) cs[r].subst = (const char *const *)sub;
    sb_printf(o,
              "// stages %d..%d (attention backward, streaming: %lld query rows x %d keys per "
              "step, %d key blocks, two passes)\n",
              first, first + a->span - 1, R, BC, p->nkb);
    char bounds[64];
    launch_bounds(256, bounds, sizeof bounds);
    signature(&cs[0], written, bounds);
    for (int i = 0; i < a->n_local; i++)
      sb_printf(o, "  __shared__ __align__(16) float fbl%d_[%lld];\n", i,
                a->local_row[i] == 1 ? R : R * BC);
    if (p->acc_floats > 0)
      sb_printf(o, "  __shared__ __align__(16) float fbacc_[%lld];\n", (long long)p->acc_floats);
    sb_printf(o, "  const long long bi_ = blockIdx.x;\n  const int tid_ = threadIdx.x;\n");
    sb_printf(o, "  (void)bi_;\n  {\n");
    if (p->nb > 0) {
      decompose(&cs[0], "  ", "bi_", 0, k->stages[first].dom, p->nb);
      for (int v = 0; v < p->nb; v++) sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
    }
    /* reduction starts and zero accumulators */
    for (int r = 0; r < p->span; r++) {
      const cm_kstage *s = cs[r].s;
      if (a->role[r] == CM_KATTN_ROLE_ROWRED) {
        char init[96];
        acc_init(s, init, sizeof init);
        int li = fb_cuda_local(a, s->stores[0].buf);
        sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += 256) fbl%d_[p_] = (float)(%s);\n", R,
                  li, init);
      }
    }
    if (p->acc_floats > 0)
      sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += 256) fbacc_[p_] = 0.f;\n",
                (long long)p->acc_floats);
    sb_printf(o, "  __syncthreads();\n");
    /* tiles that depend on a row statistic (directly or through a tile) wait for pass 2 */
    bool dep[CM_KATTN_MAX_LOCAL] = {false};
    for (int r = 0; r < p->span; r++) {
      const cm_kstage *s = cs[r].s;
      if (a->role[r] != CM_KATTN_ROLE_TILE) continue;
      int li = fb_cuda_local(a, s->stores[0].buf);
      for (int x = 0; x < s->n_exprs; x++) {
        if (s->exprs[x].kind != CM_KX_LOAD) continue;
        int lj = fb_cuda_local(a, s->exprs[x].buf);
        if (lj >= 0 && (a->local_row[lj] == 1 || dep[lj])) dep[li] = true;
      }
    }
    for (int pass = 0; pass < 2; pass++) {
      sb_printf(o, "  // pass %d\n", pass + 1);
      fb_cuda_block_head(o, p);
      for (int r = 0; r < p->span; r++) {
        rctx *c = &cs[r];
        const cm_kstage *s = c->s;
        int role = a->role[r];
        if (role == CM_KATTN_ROLE_TILE) {
          int li = fb_cuda_local(a, s->stores[0].buf);
          if (pass == 0 && dep[li]) continue;
          int val = s->stores[0].value;
          sb_printf(o, "  for (int p_ = tid_; p_ < %lld * bc_; p_ += 256) {\n", R);
          sb_printf(o, "    const int r_ = p_ / bc_, j_ = p_ %% bc_;\n    float acc = 0.f;\n");
          if (r == 0) {
            sb_printf(o, "    for (int k_ = 0; k_ < %lld; k_++) {\n", (long long)p->d);
            fb_cuda_point(c, p->nb, false, "      ", "r_", "j0_ + j_", "k_");
            emit_tree(c, s->gemm_a, "        ", "acc");
            emit_tree(c, s->gemm_b, "        ", "acc");
            sb_printf(o, "        acc += (float)(e%d) * (float)(e%d);\n      }\n    }\n", s->gemm_a,
                      s->gemm_b);
          }
          fb_cuda_point(c, p->nb, false, "    ", "r_", "j0_ + j_", NULL);
          emit_tree(c, val, "      ", "acc");
          sb_printf(o, "      const float tv_ = (float)(e%d);\n", val);
          sb_printf(o, "      fbl%d_[r_ * %d + j_] = tv_;\n    }\n  }\n", li, BC);
          sb_printf(o, "  __syncthreads();\n");
        } else if (role == CM_KATTN_ROLE_ROWRED && pass == 0) {
          int li = fb_cuda_local(a, s->stores[0].buf);
          char comb[256];
          sb_printf(o, "  for (int r_ = tid_; r_ < %lld; r_ += 256) {\n", R);
          sb_printf(o, "    %s acc_ = (%s)fbl%d_[r_];\n", ctype(s->acc_dtype), ctype(s->acc_dtype),
                    li);
          sb_printf(o, "    for (int j_ = 0; j_ < bc_; j_++) {\n");
          fb_cuda_point(c, p->nb, true, "      ", "r_", NULL, "j0_ + j_");
          emit_tree(c, s->body, "        ", "acc_");
          char bv[96];
          snprintf(bv, sizeof bv, "(%s)(e%d)", ctype(s->acc_dtype), s->body);
          acc_combine(s, "acc_", bv, comb, sizeof comb);
          sb_printf(o, "        acc_ = %s;\n      }\n    }\n", comb);
          sb_printf(o, "    fbl%d_[r_] = (float)acc_;\n  }\n  __syncthreads();\n", li);
        } else if (role == CM_KATTN_ROLE_GEMM_ROWS && pass == 1) {
          long long C = (long long)s->dom[s->n_dom - 1];
          sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += 256) {\n", R * C);
          sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", C, C);
          sb_printf(o, "    float acc = fbacc_[%lld + p_];\n", (long long)p->acc_off[r]);
          sb_printf(o, "    for (int j_ = 0; j_ < bc_; j_++) {\n");
          fb_cuda_point(c, p->nb, false, "      ", "r_", "c_", "j0_ + j_");
          emit_tree(c, s->gemm_a, "        ", "acc");
          emit_tree(c, s->gemm_b, "        ", "acc");
          sb_printf(o, "        acc += (float)(e%d) * (float)(e%d);\n      }\n    }\n", s->gemm_a,
                    s->gemm_b);
          sb_printf(o, "    fbacc_[%lld + p_] = acc;\n  }\n", (long long)p->acc_off[r]);
        } else if (role == CM_KATTN_ROLE_GEMM_KEYS && pass == 1) {
          long long C = (long long)s->dom[s->n_dom - 1];
          sb_printf(o, "  for (int p_ = tid_; p_ < bc_ * %lld; p_ += 256) {\n", C);
          sb_printf(o, "    const int j_ = p_ / %lld, c_ = p_ %% %lld;\n    float acc = 0.f;\n", C,
                    C);
          sb_printf(o, "    for (int r_ = 0; r_ < %lld; r_++) {\n", R);
          fb_cuda_point(c, p->nb, false, "      ", "j0_ + j_", "c_", "r_");
          emit_tree(c, s->gemm_a, "        ", "acc");
          emit_tree(c, s->gemm_b, "        ", "acc");
          sb_printf(o, "        acc += (float)(e%d) * (float)(e%d);\n      }\n    }\n", s->gemm_a,
                    s->gemm_b);
          fb_cuda_point(c, p->nb, false, "    ", "j0_ + j_", "c_", NULL);
          emit_stores(c, "      ", "acc");
          sb_printf(o, "    }\n  }\n");
        }
      }
      sb_printf(o, "  __syncthreads();\n  }\n");
    }
    /* the epilogues of the GEMMs accumulated over the key blocks */
    for (int r = 0; r < p->span; r++) {
      if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS) continue;
      rctx *c = &cs[r];
      long long C = (long long)c->s->dom[c->s->n_dom - 1];
      sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += 256) {\n", R * C);
      sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", C, C);
      sb_printf(o, "    const float acc = fbacc_[%lld + p_];\n", (long long)p->acc_off[r]);
      fb_cuda_point(c, p->nb, false, "    ", "r_", "c_", NULL);
      emit_stores(c, "      ", "acc");
      sb_printf(o, "    }\n  }\n");
    }
    sb_printf(o, "  }\n}\n\n");
    for (int r = 0; r < p->span && st == CM_OK; r++) st = cs[r].st;
  }
  if (sub)
    for (int b = 0; b < k->n_buffers; b++) free(sub[b]);
  free(sub);
  for (int r = 0; r < opened; r++) rctx_close(&cs[r]);
  for (int si = first + 1; si < first + a->span && st == CM_OK; si++) {
    rctx c;
    st = rctx_open(&c, k, si, o, err);
    if (st == CM_OK) {
      sb_printf(o, "// stage %d \"%s\" (runs in stage %d)\n", si, k->stages[si].name, first);
      signature(&c, written, "");
      sb_printf(o, "}\n\n");
    }
    rctx_close(&c);
  }
  return st;
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
  if (with_prelude) sb_printf(&sb, "%s", PRELUDE);
  sb_printf(&sb, "// kernel %s: %d buffers, %d stages\n", k->name, k->n_buffers, k->n_stages);
  cm_status st = CM_OK;
  for (int i = 0; i < k->n_stages && st == CM_OK; i++) {
    fa_cplan fp = plan_stream(k, i, o);
    if (fp.ok) {
      st = render_stream(k, i, &fp, &sb, written, err);
      i += k->stages[i].attn.span - 1;
      continue;
    }
    fb_cplan bp = plan_stream_bwd(k, i, o);
    if (bp.ok) {
      st = render_stream_bwd(k, i, &bp, &sb, written, err);
      i += bp.span - 1;
      continue;
    }
    attn_plan ap = plan_attention(k, i, o);
    if (ap.ok) {
      st = render_attention(k, i, &ap, &sb, written, err);
      i += ap.span - 1;
      continue;
    }
    const cm_kstage *s = &k->stages[i];
    rctx c;
    st = rctx_open(&c, k, i, &sb, err);
    if (st == CM_OK) {
      gemm_plan p = plan_gemm(s, o);
      if (p.ok && check_gemm_operands(&c) != CM_OK) {
        st = c.st;
      } else {
        sb_printf(&sb, "// stage %d \"%s\"%s\n", i, s->name,
                  p.ok ? (p.mma ? " (GEMM, tensor cores)" : " (GEMM, FMA)") : "");
        if (p.ok)
          render_gemm(&c, &p, written);
        else
          render_generic(&c, written);
      }
    }
    if (st == CM_OK) st = c.st;
    rctx_close(&c);
  }
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
  const cm_kstage *s = &k->stages[stage];
  /* inside a fused attention span: the first stage runs it all, the others nothing */
  for (int f = 0; f <= stage; f++) {
    const cm_kstage *sf = &k->stages[f];
    if (sf->tmpl != CM_KT_ATTENTION_FWD && sf->tmpl != CM_KT_ATTENTION_BWD) continue;
    if (stage >= f + sf->attn.span) continue;
    fa_cplan fp = plan_stream(k, f, o);
    if (fp.ok) {
      if (stage == f) {
        l.grid[0] = (unsigned)(fp.batch * fp.nrb);
        l.block[0] = 256;
      }
      return l;
    }
    fb_cplan bp = plan_stream_bwd(k, f, o);
    if (bp.ok) {
      if (stage == f) {
        l.grid[0] = (unsigned)bp.batch;
        l.block[0] = 256;
      }
      return l;
    }
    attn_plan ap = plan_attention(k, f, o);
    if (!ap.ok) break;
    if (stage == f) {
      l.grid[0] = (unsigned)(ap.batch * ap.nrb);
      l.block[0] = ATTN_THREADS;
    }
    return l;
  }
  gemm_plan p = plan_gemm(s, o);
  if (p.ok) {
    int64_t gx = (p.N + p.nc - 1) / p.nc, gy = (p.M + p.mc - 1) / p.mc;
    l.grid[0] = (unsigned)(gx < 2147483647 ? gx : 2147483647);
    l.grid[1] = (unsigned)(gy < 65535 ? gy : 65535);
    l.grid[2] = (unsigned)(p.batch < 65535 ? p.batch : 65535);
    l.block[0] = (unsigned)p.threads;
    return l;
  }
  int64_t points = prod(s->dom, s->n_dom);
  red_strategy rs = strategy(s);
  int64_t per_block = rs == RED_BLOCK ? 1 : rs == RED_WARP ? WARPS_PER_BLOCK : GENERIC_THREADS;
  int64_t g = (points + per_block - 1) / per_block;
  if (g < 1) g = 1;
  l.grid[0] = (unsigned)(g < GRID_CAP ? g : GRID_CAP);
  l.block[0] = GENERIC_THREADS;
  return l;
}
