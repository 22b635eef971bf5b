/* tests/unit/test_render_llvm.c — the LLVM renderer (codegen/render_llvm.c): hand-built
 * kernels rendered, JIT'd at O3 and run over work items split in ranges like threads
 * would: every elementwise op per dtype, all casts, reductions, the GEMM template at odd
 * shapes (batched, transposed, epilogue, transposed store), errors, vectorized asm (in
 * the vector registers the JIT's target has), and a GEMM GFLOP/s figure. Float results
 * lie within the forward error bound of the graph that computes the same
 * (cm_eval_bounded: any vector width, FMA contraction or summation order); casts,
 * integers, comparisons and stores are exact. */
#include "codegen/codegen.h"
#include "tests/test.h"
#include "tests/testlib.h"
#include "tests/llvm_kernels.h"
#include "tests/tensor_compare.h"

#include <llvm-c/Core.h>
#include <math.h>
#include <stdint.h>
#include <time.h>

/* ---- helpers ------------------------------------------------------------- */

static test_rng rng_state = {0x9e3779b97f4a7c15ull};
static double urand(double lo, double hi) {
  return test_uniform_in(&rng_state, lo, hi);
}

/* Runs every stage over its work items in 3 ranges (like 3 threads, serially). */
CM_NO_SANITIZE_FUNCTION static void run_stages(const cm_kernel *k, cm_cpu_stage_fn *fns,
                                               char *const *bufs, const int64_t *items, char *ws) {
  for (int i = 0; i < k->n_stages; i++) {
    int64_t n = items[i], a = n / 3, b = (2 * n) / 3;
    fns[i](bufs, 0, a, ws);
    fns[i](bufs, a, b, ws);
    fns[i](bufs, b, n, ws);
  }
}

static int64_t generic_items(const cm_kstage *s) {
  int64_t n = 1;
  for (int v = 0; v < s->n_parallel; v++) n *= s->dom[v];
  return n;
}

static void add_store(cm_kstage *s, int buf, int index, int value) {
  s->stores[s->n_stores++] = (cm_kstore){buf, index, value};
}

static float bf16_round(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if (isnan(x))
    u |= 0x400000;
  else
    u += 0x7fff + ((u >> 16) & 1);
  u &= 0xffff0000u;
  memcpy(&x, &u, 4);
  return x;
}
static uint16_t bf16_bits(float x) {
  uint32_t u;
  x = bf16_round(x);
  memcpy(&u, &x, 4);
  return (uint16_t)(u >> 16);
}
static float bf16_val(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float x;
  memcpy(&x, &u, 4);
  return x;
}
static double round_dt(double x, cm_dtype dt) {
  switch (dt) {
  case CM_F32: return (float)x;
  case CM_BF16:
    if (fabs(x) > 1e-30 && fabs(x) < 1e30) { /* once from double: 8 significant bits */
      int e;
      double m = frexp(x, &e);
      return ldexp(nearbyint(ldexp(m, 8)), e - 8);
    }
    return bf16_round((float)x);
  case CM_F16: return (float)(_Float16)x;
  default: return x;
  }
}

/* element i of a buffer of dtype dt as double / written from double */
static double get_elem(const void *p, cm_dtype dt, int64_t i) {
  switch (dt) {
  case CM_F32: return ((const float *)p)[i];
  case CM_F64: return ((const double *)p)[i];
  case CM_BF16: return bf16_val(((const uint16_t *)p)[i]);
  case CM_F16: return (float)((const _Float16 *)p)[i];
  case CM_I32: return ((const int32_t *)p)[i];
  case CM_I64: return (double)((const int64_t *)p)[i];
  default: return ((const uint8_t *)p)[i];
  }
}
static void set_elem(void *p, cm_dtype dt, int64_t i, double v) {
  switch (dt) {
  case CM_F32: ((float *)p)[i] = (float)v; break;
  case CM_F64: ((double *)p)[i] = v; break;
  case CM_BF16: ((uint16_t *)p)[i] = bf16_bits((float)v); break;
  case CM_F16: ((_Float16 *)p)[i] = (_Float16)(float)v; break;
  case CM_I32: ((int32_t *)p)[i] = (int32_t)v; break;
  case CM_I64: ((int64_t *)p)[i] = (int64_t)v; break;
  default: ((uint8_t *)p)[i] = v != 0; break;
  }
}

static bool same(double got, double want) {
  return isnan(want) ? isnan(got) : got == want;
}

/* Each got[i] (a kernel's buffer as a tensor) against node nodes[i] of g, the
 * graph that computes the same from sources src, within its error bound. */
static void check_bounded(cm_graph *g, const cm_tensor *const *src, int n, const int *nodes,
                          const cm_tensor *got, const char *what) {
  CHECK_MSG(cm_graph_error(g) == NULL, "%s: %s", what, cm_graph_error(g));
  if (cm_graph_error(g)) return;
  test_oracle o;
  cm_err err = {0};
  if (test_oracle_eval(&o, g, src, &err) == CM_OK) {
    for (int i = 0; i < n; i++) {
      test_bounded r = test_oracle_check(&o, nodes[i], &got[i], what);
      CHECK_MSG(
          r.ratio <= 1,
          "%s: %s: |got - f64| = %g at [%lld] (got %.9g, f64 %.9g) exceeds its error bound %g",
          what, g->nodes[nodes[i]].name, r.diff, (long long)r.at,
          r.at >= 0 ? cm_tensor_get_f64(&got[i], r.at) : NAN,
          r.at >= 0 ? cm_tensor_get_f64(&o.val[nodes[i]], r.at) : NAN, r.bound);
    }
  } else {
    CHECK_MSG(false, "%s: eval: %s", what, err.msg);
  }
  test_oracle_free(&o);
}

static cm_type type1(cm_dtype dt, int64_t n) {
  cm_type t = {dt, 1, {n}};
  return t;
}

/* ---- elementwise ops on floats ---------------------------------------------- */

static const cm_op unary_ops[] = {CM_OP_NEG,  CM_OP_ABS,   CM_OP_EXP,          CM_OP_LOG,
                                  CM_OP_SQRT, CM_OP_RSQRT, CM_OP_RECIP,        CM_OP_TANH,
                                  CM_OP_ERF,  CM_OP_RELU,  CM_OP_STOP_GRADIENT};
static const cm_op binary_ops[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_DIV,
                                   CM_OP_MAX, CM_OP_MIN, CM_OP_POW};
static const cm_op cmp_ops[] = {CM_OP_LT, CM_OP_LE, CM_OP_EQ, CM_OP_NE};

static void test_float_ops(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  const cm_dtype dts[] = {CM_F32, CM_F64, CM_BF16, CM_F16};
  const int64_t n = 37;
  for (int d = 0; d < 4; d++) {
    cm_dtype dt = dts[d];
    cm_kernel k;
    cm_kernel_init(&k, "kfloat");
    int ba = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, dt, n, -1, 0);
    int bb = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, dt, n, -1, 0);
    cm_kstage *s = cm_kernel_add_stage(&k, "ops");
    s->n_dom = 1;
    s->dom[0] = n;
    s->n_parallel = 1;
    int v = cm_kx_var(s, 0);
    int a = cm_kx_load(s, &k, ba, v), b = cm_kx_load(s, &k, bb, v);
    int nu = (int)(sizeof unary_ops / sizeof *unary_ops);
    int nbin = (int)(sizeof binary_ops / sizeof *binary_ops);
    int outs[32], nout = 0;
    cm_dtype out_dt[32];
    for (int i = 0; i < nu + nbin + 4 + 1; i++) {
      cm_dtype odt = i >= nu + nbin && i < nu + nbin + 4 ? CM_BOOL : dt;
      out_dt[nout] = odt;
      outs[nout++] = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, odt, n, -1, 0);
    }
    s = &k.stages[0];
    for (int i = 0; i < nu; i++) add_store(s, outs[i], v, cm_kx_op(s, unary_ops[i], dt, a, -1, -1));
    for (int i = 0; i < nbin; i++)
      add_store(s, outs[nu + i], v, cm_kx_op(s, binary_ops[i], dt, a, b, -1));
    for (int i = 0; i < 4; i++)
      add_store(s, outs[nu + nbin + i], v, cm_kx_op(s, cmp_ops[i], CM_BOOL, a, b, -1));
    int lt = cm_kx_op(s, CM_OP_LT, CM_BOOL, a, b, -1);
    add_store(s, outs[nu + nbin + 4], v, cm_kx_op(s, CM_OP_SELECT, dt, lt, a, b));

    void *data[40];
    char *bufs[40];
    for (int i = 0; i < k.n_buffers; i++) {
      data[i] = calloc((size_t)n, 8);
      bufs[i] = data[i];
    }
    for (int64_t i = 0; i < n; i++) {
      set_elem(data[ba], dt, i, i == 3 ? NAN : urand(0.25, 2.25));
      set_elem(data[bb], dt, i, i % 5 == 0 ? get_elem(data[ba], dt, i) : urand(-2, 2));
    }
    cm_cpu_stage_fn fns[1];
    cm_llvm_render_opts ro = {16, false, NULL};
    if (test_jit_kernel(j, &k, &ro, fns)) {
      int64_t items = generic_items(&k.stages[0]);
      run_stages(&k, fns, bufs, &items, NULL);
      /* the same ops as a graph */
      cm_graph *g = cm_graph_new();
      int ga = cm_input(g, "a", dt, 1, &n), gb = cm_input(g, "b", dt, 1, &n), nodes[32];
      for (int i = 0; i < nu; i++) nodes[i] = cm_unary(g, unary_ops[i], ga, NULL);
      for (int i = 0; i < nbin; i++) nodes[nu + i] = cm_binary(g, binary_ops[i], ga, gb, NULL);
      for (int i = 0; i < 4; i++) nodes[nu + nbin + i] = cm_binary(g, cmp_ops[i], ga, gb, NULL);
      nodes[nu + nbin + 4] = cm_select(g, cm_binary(g, CM_OP_LT, ga, gb, NULL), ga, gb, NULL);
      cm_tensor ta = test_view(type1(dt, n), data[ba]), tb = test_view(type1(dt, n), data[bb]);
      cm_tensor got[32];
      for (int o = 0; o < nout; o++) got[o] = test_view(type1(out_dt[o], n), data[outs[o]]);
      const cm_tensor **src = calloc((size_t)g->n_nodes + 1, sizeof *src);
      src[ga] = &ta, src[gb] = &tb;
      char what[32];
      snprintf(what, sizeof what, "float ops %s", cm_dtype_name(dt));
      check_bounded(g, src, nout, nodes, got, what);
      free(src);
      cm_graph_free(g);
    }
    for (int i = 0; i < k.n_buffers; i++) free(data[i]);
    cm_kernel_free(&k);
  }
  cm_jit_destroy(j);
}

/* ---- integer ops (exact, wrapping, x/0 = 0, MIN/-1 = MIN) ------------------------ */

static int64_t ref_int(cm_op op, int64_t a, int64_t b, cm_dtype dt) {
  uint64_t ua = (uint64_t)a, ub = (uint64_t)b, r;
  switch (op) {
  case CM_OP_NEG: r = 0 - ua; break;
  case CM_OP_ABS: r = a < 0 ? 0 - ua : ua; break;
  case CM_OP_RELU: r = a > 0 ? ua : 0; break;
  case CM_OP_ADD: r = ua + ub; break;
  case CM_OP_SUB: r = ua - ub; break;
  case CM_OP_MUL: r = ua * ub; break;
  case CM_OP_MAX: r = a > b ? ua : ub; break;
  case CM_OP_MIN: r = a < b ? ua : ub; break;
  case CM_OP_DIV:
    r = b == 0 ? 0 : (a == INT64_MIN && b == -1) ? ua : (uint64_t)(a / b);
    if (dt == CM_I32 && b == -1) r = 0 - ua;
    break;
  default: r = 0;
  }
  if (dt == CM_I32) return (int32_t)(uint32_t)r;
  return (int64_t)r;
}

static void test_int_ops(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  const cm_op ops[] = {CM_OP_NEG, CM_OP_ABS, CM_OP_RELU, CM_OP_ADD, CM_OP_SUB,
                       CM_OP_MUL, CM_OP_MAX, CM_OP_MIN,  CM_OP_DIV};
  const int nops = 9;
  const int64_t n = 41;
  for (int d = 0; d < 2; d++) {
    cm_dtype dt = d ? CM_I64 : CM_I32;
    cm_kernel k;
    cm_kernel_init(&k, "kint");
    int ba = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, dt, n, -1, 0);
    int bb = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, dt, n, -1, 0);
    int outs[16];
    for (int i = 0; i < nops; i++) outs[i] = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, dt, n, -1, 0);
    int bmod = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I64, n, -1, 0);
    int bcmp = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BOOL, n, -1, 0);
    int bsel = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, dt, n, -1, 0);
    cm_kstage *s = cm_kernel_add_stage(&k, "ints");
    s->n_dom = 1;
    s->dom[0] = n;
    s->n_parallel = 1;
    int v = cm_kx_var(s, 0);
    int a = cm_kx_load(s, &k, ba, v), b = cm_kx_load(s, &k, bb, v);
    for (int i = 0; i < nops; i++)
      add_store(s, outs[i], v, cm_kx_op(s, ops[i], dt, a, i < 3 ? -1 : b, -1));
    /* v % 7 via MOD; a <= b; select(a == b, a, b * 2) */
    add_store(s, bmod, v,
              cm_kx_mod(s, cm_kx_iadd(s, v, cm_kx_iconst(s, 1000)), cm_kx_iconst(s, 7)));
    add_store(s, bcmp, v, cm_kx_op(s, CM_OP_LE, CM_BOOL, a, b, -1));
    int eq = cm_kx_op(s, CM_OP_EQ, CM_BOOL, a, b, -1);
    int two = cm_kx_const(s, dt, 2);
    add_store(s, bsel, v,
              cm_kx_op(s, CM_OP_SELECT, dt, eq, a, cm_kx_op(s, CM_OP_MUL, dt, b, two, -1)));
    int64_t *A = calloc((size_t)n, 8), *Bv = calloc((size_t)n, 8);
    void *data[20];
    char *bufs[20];
    for (int i = 0; i < k.n_buffers; i++) bufs[i] = data[i] = calloc((size_t)n, 8);
    int64_t mn = dt == CM_I32 ? INT32_MIN : INT64_MIN, mx = dt == CM_I32 ? INT32_MAX : INT64_MAX;
    for (int64_t i = 0; i < n; i++) {
      A[i] = (int64_t)urand(-1000, 1000);
      Bv[i] = (int64_t)urand(-50, 50);
      if (i == 0) A[i] = mn, Bv[i] = -1;
      if (i == 1) Bv[i] = 0;
      if (i == 2) A[i] = mx, Bv[i] = mx;
      if (i == 3) A[i] = mn, Bv[i] = 1;
      if (i == 4) Bv[i] = A[i];
      if (dt == CM_I32)
        ((int32_t *)data[ba])[i] = (int32_t)A[i], ((int32_t *)data[bb])[i] = (int32_t)Bv[i];
      else
        ((int64_t *)data[ba])[i] = A[i], ((int64_t *)data[bb])[i] = Bv[i];
    }
    cm_cpu_stage_fn fns[1];
    if (test_jit_kernel(j, &k, NULL, fns)) {
      int64_t items = n;
      run_stages(&k, fns, bufs, &items, NULL);
      int bad = 0;
      for (int64_t i = 0; i < n; i++) {
        for (int o = 0; o < nops; o++) {
          int64_t got =
              dt == CM_I32 ? ((int32_t *)data[outs[o]])[i] : ((int64_t *)data[outs[o]])[i];
          int64_t want = ref_int(ops[o], A[i], Bv[i], dt);
          if (got != want && bad++ < 5)
            fprintf(stderr, "%s op %d elem %lld: %lld vs %lld\n", cm_dtype_name(dt), o,
                    (long long)i, (long long)got, (long long)want);
        }
        bad += ((int64_t *)data[bmod])[i] != (i + 1000) % 7;
        bad += ((uint8_t *)data[bcmp])[i] != (A[i] <= Bv[i]);
        int64_t sel = A[i] == Bv[i] ? A[i] : ref_int(CM_OP_MUL, Bv[i], 2, dt);
        int64_t gsel = dt == CM_I32 ? ((int32_t *)data[bsel])[i] : ((int64_t *)data[bsel])[i];
        bad += gsel != sel;
      }
      CHECK_MSG(bad == 0, "%s: %d mismatches", cm_dtype_name(dt), bad);
    }
    for (int i = 0; i < k.n_buffers; i++) free(data[i]);
    free(A);
    free(Bv);
    cm_kernel_free(&k);
  }
  cm_jit_destroy(j);
}

/* ---- casts: every pair ------------------------------------------------------------ */

static double ref_cast(double v, cm_dtype from, cm_dtype to) {
  if (to == CM_BOOL) return v != 0 || isnan(v);
  if (to == CM_I32 && from == CM_I64) return (int32_t)(uint32_t)(uint64_t)(int64_t)v; /* wraps */
  if (to == CM_I32 || to == CM_I64) {
    if (isnan(v)) return 0;
    double t = trunc(v), hi = to == CM_I32 ? 2147483647.0 : 9223372036854775807.0;
    if (t >= hi) return hi;
    if (t <= -hi - 1) return -hi - 1;
    return t;
  }
  return round_dt(v, to);
}

static void test_casts(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  /* the last two round differently when rounded twice (through f32) to bf16 / f16 */
  const double vals[] = {-2.5,
                         0.5,
                         1e10,
                         NAN,
                         -0.0,
                         3.75,
                         1e-3,
                         -1e12,
                         65519.0,
                         7,
                         -3,
                         1,
                         1.00390625 + 0x1p-30,
                         -(1.00048828125 + 0x1p-40)};
  const int64_t n = (int64_t)(sizeof vals / sizeof *vals);
  cm_kernel k;
  cm_kernel_init(&k, "kcast");
  int in[CM_DTYPE_COUNT], out[CM_DTYPE_COUNT][CM_DTYPE_COUNT];
  for (int d = 0; d < CM_DTYPE_COUNT; d++)
    in[d] = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, d, n, -1, 0);
  for (int d = 0; d < CM_DTYPE_COUNT; d++)
    for (int e = 0; e < CM_DTYPE_COUNT; e++)
      out[d][e] = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, e, n, -1, 0);
  for (int d = 0; d < CM_DTYPE_COUNT; d++) {
    char nm[16];
    snprintf(nm, sizeof nm, "from%d", d);
    cm_kstage *s = cm_kernel_add_stage(&k, nm);
    s->n_dom = 1;
    s->dom[0] = n;
    s->n_parallel = 1;
    int v = cm_kx_var(s, 0);
    int x = cm_kx_load(s, &k, in[d], v);
    for (int e = 0; e < CM_DTYPE_COUNT; e++)
      add_store(s, out[d][e], v, cm_kx_op(s, CM_OP_CAST, e, x, -1, -1));
  }
  void *data[64];
  char *bufs[64];
  for (int i = 0; i < k.n_buffers; i++) bufs[i] = data[i] = calloc((size_t)n, 8);
  /* each input holds vals as its dtype would (ints: cast rules; bool 0/1) */
  for (int d = 0; d < CM_DTYPE_COUNT; d++)
    for (int64_t i = 0; i < n; i++) set_elem(data[in[d]], d, i, ref_cast(vals[i], CM_F64, d));
  cm_cpu_stage_fn fns[CM_DTYPE_COUNT];
  if (test_jit_kernel(j, &k, NULL, fns)) {
    int64_t items[CM_DTYPE_COUNT];
    for (int d = 0; d < CM_DTYPE_COUNT; d++) items[d] = n;
    run_stages(&k, fns, bufs, items, NULL);
    int bad = 0;
    for (int d = 0; d < CM_DTYPE_COUNT; d++)
      for (int e = 0; e < CM_DTYPE_COUNT; e++)
        for (int64_t i = 0; i < n; i++) {
          double x = get_elem(data[in[d]], d, i);
          if (isnan(x) && (d == CM_I32 || d == CM_I64)) x = 0;
          double want = ref_cast(x, d, e), got = get_elem(data[out[d][e]], e, i);
          if (!same(got, want) && bad++ < 8) /* casts round exactly once */
            fprintf(stderr, "cast %s->%s of %.17g: got %.17g want %.17g\n", cm_dtype_name(d),
                    cm_dtype_name(e), x, got, want);
        }
    CHECK_MSG(bad == 0, "casts: %d mismatches", bad);
  }
  for (int i = 0; i < k.n_buffers; i++) free(data[i]);
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

/* ---- reductions --------------------------------------------------------------- */

/* A sum over every length 1..37, f32 and f64, in one kernel per length. */
static void reduce_every_length(cm_jit *j) {
  int bad = 0;
  for (int L = 1; L <= 37; L++) {
    cm_kernel kl;
    cm_kernel_init(&kl, "ksum");
    int in32 = cm_kernel_add_buffer(&kl, CM_KBUF_ARENA, CM_F32, 3 * L, -1, 0);
    int in64 = cm_kernel_add_buffer(&kl, CM_KBUF_ARENA, CM_F64, 3 * L, -1, 0);
    int o32 = cm_kernel_add_buffer(&kl, CM_KBUF_ARENA, CM_F32, 3, -1, 0);
    int o64 = cm_kernel_add_buffer(&kl, CM_KBUF_ARENA, CM_F64, 3, -1, 0);
    for (int t = 0; t < 2; t++) {
      cm_kstage *st = cm_kernel_add_stage(&kl, t ? "f64" : "f32");
      st->n_dom = 1, st->dom[0] = 3, st->n_parallel = 1;
      st->n_red = 1, st->red[0] = L, st->acc_dtype = t ? CM_F64 : CM_F32;
      int r = cm_kx_var(st, 0), q = cm_kx_var(st, 1);
      st->body = cm_kx_load(st, &kl, t ? in64 : in32,
                            cm_kx_iadd(st, cm_kx_imul(st, r, cm_kx_iconst(st, L)), q));
      add_store(st, t ? o64 : o32, r, cm_kx_acc(st));
    }
    float f[3 * 37], rf[3];
    double g[3 * 37], rg[3];
    for (int i = 0; i < 3 * L; i++) f[i] = (float)urand(-1, 1), g[i] = urand(-1, 1);
    char *bl[] = {(char *)f, (char *)g, (char *)rf, (char *)rg};
    cm_cpu_stage_fn fl[2];
    if (!test_jit_kernel(j, &kl, NULL, fl)) {
      bad++;
    } else {
      int64_t items[2] = {3, 3};
      run_stages(&kl, fl, bl, items, NULL);
      /* row sums of [3, L] in f32 and f64 */
      cm_graph *gr = cm_graph_new();
      int64_t d[2] = {3, L};
      int x32 = cm_input(gr, "x32", CM_F32, 2, d), x64 = cm_input(gr, "x64", CM_F64, 2, d), ax = 1;
      int nodes[2] = {cm_reduce(gr, CM_OP_REDUCE_SUM, x32, 1, &ax, false, "sum_f32"),
                      cm_reduce(gr, CM_OP_REDUCE_SUM, x64, 1, &ax, false, "sum_f64")};
      cm_tensor t32 = test_view(gr->nodes[x32].type, f), t64 = test_view(gr->nodes[x64].type, g);
      cm_tensor got[2] = {test_view(type1(CM_F32, 3), rf), test_view(type1(CM_F64, 3), rg)};
      const cm_tensor *src[8] = {0};
      src[x32] = &t32, src[x64] = &t64;
      char what[32];
      snprintf(what, sizeof what, "sums over %d", L);
      check_bounded(gr, src, 2, nodes, got, what);
      cm_graph_free(gr);
    }
    cm_kernel_free(&kl);
  }
  CHECK_MSG(bad == 0, "sums over 1..37: %d mismatches", bad);
}

static void test_reductions(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  /* x[5,7,37]: s1[a,c] = sum_b x; s2[a] = max_{b,c} x (row 2 has a NaN); bf16 sum of a
   * bf16 copy; i32 sum and max */
  enum { A = 5, Bn = 7, Cn = 37 };
  cm_kernel k;
  cm_kernel_init(&k, "kred");
  int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, A * Bn * Cn, -1, 0);
  int bxi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, A * Bn * Cn, -1, 0);
  int bs1 = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, A * Cn, -1, 0);
  int bs2 = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, A, -1, 0);
  int bs3 = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, A, -1, 0);
  int bs4 = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I64, A, -1, 0);
  int bs5 = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BF16, Cn, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "sum_b");
  s->n_dom = 2, s->dom[0] = A, s->dom[1] = Cn, s->n_parallel = 1;
  s->n_red = 1, s->red[0] = Bn, s->red_op = CM_KRED_SUM, s->acc_dtype = CM_F32;
  int va = cm_kx_var(s, 0), vc = cm_kx_var(s, 1), vb = cm_kx_var(s, 2);
  int idx = cm_kx_iadd(
      s,
      cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, va, cm_kx_iconst(s, Bn)), vb), cm_kx_iconst(s, Cn)),
      vc);
  s->body = cm_kx_load(s, &k, bx, idx);
  add_store(s, bs1, cm_kx_iadd(s, cm_kx_imul(s, va, cm_kx_iconst(s, Cn)), vc), cm_kx_acc(s));
  for (int st = 0; st < 3; st++) {
    s = cm_kernel_add_stage(&k, st == 0 ? "max_bc" : st == 1 ? "imax_bc" : "isum_bc");
    s->n_dom = 1, s->dom[0] = A, s->n_parallel = 1;
    s->n_red = 2, s->red[0] = Bn, s->red[1] = Cn;
    s->red_op = st == 2 ? CM_KRED_SUM : CM_KRED_MAX;
    s->acc_dtype = st == 0 ? CM_F32 : st == 1 ? CM_I32 : CM_I64;
    va = cm_kx_var(s, 0), vb = cm_kx_var(s, 1), vc = cm_kx_var(s, 2);
    idx = cm_kx_iadd(s,
                     cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, va, cm_kx_iconst(s, Bn)), vb),
                                cm_kx_iconst(s, Cn)),
                     vc);
    int x = cm_kx_load(s, &k, st == 0 ? bx : bxi, idx);
    s->body = st == 2 ? cm_kx_op(s, CM_OP_CAST, CM_I64, x, -1, -1) : x;
    add_store(s, st == 0 ? bs2 : st == 1 ? bs3 : bs4, va, cm_kx_acc(s));
  }
  /* bf16 result of a sum over (a, b) of bf16-rounded x times 2 */
  s = cm_kernel_add_stage(&k, "bf16_sum");
  s->n_dom = 1, s->dom[0] = Cn, s->n_parallel = 1;
  s->n_red = 2, s->red[0] = A, s->red[1] = Bn, s->red_op = CM_KRED_SUM, s->acc_dtype = CM_F32;
  vc = cm_kx_var(s, 0), va = cm_kx_var(s, 1), vb = cm_kx_var(s, 2);
  idx = cm_kx_iadd(
      s,
      cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, va, cm_kx_iconst(s, Bn)), vb), cm_kx_iconst(s, Cn)),
      vc);
  int xb = cm_kx_op(s, CM_OP_CAST, CM_BF16, cm_kx_load(s, &k, bx, idx), -1, -1);
  s->body = cm_kx_op(s, CM_OP_MUL, CM_BF16, xb, cm_kx_const(s, CM_BF16, 2), -1);
  add_store(s, bs5, vc, cm_kx_acc(s));

  float *x = calloc(A * Bn * Cn, 4);
  int32_t *xi = calloc(A * Bn * Cn, 4);
  for (int i = 0; i < A * Bn * Cn; i++)
    x[i] = (float)urand(-3, 3), xi[i] = (int32_t)urand(-1e6, 1e6);
  x[2 * Bn * Cn + 17] = NAN;
  float s1[A * Cn], s2[A];
  int32_t s3[A];
  int64_t s4[A];
  uint16_t s5b[Cn]; /* bf16 */
  char *bufs[] = {(char *)x,  (char *)xi, (char *)s1, (char *)s2,
                  (char *)s3, (char *)s4, (char *)s5b};
  cm_cpu_stage_fn fns[5];
  if (test_jit_kernel(j, &k, NULL, fns)) {
    int64_t items[5];
    for (int i = 0; i < 5; i++) items[i] = generic_items(&k.stages[i]);
    run_stages(&k, fns, bufs, items, NULL);
    int bad = 0;
    for (int a = 0; a < A; a++) { /* the max and the integer reductions: exact */
      double mx = -INFINITY;
      int32_t imx = INT32_MIN;
      int64_t isum = 0;
      bool nan = false;
      for (int c = 0; c < Cn; c++) {
        for (int b = 0; b < Bn; b++) {
          float v = x[(a * Bn + b) * Cn + c];
          nan |= isnan(v);
          if (v > mx) mx = v;
          if (xi[(a * Bn + b) * Cn + c] > imx) imx = xi[(a * Bn + b) * Cn + c];
          isum += xi[(a * Bn + b) * Cn + c];
        }
      }
      if (nan ? !isnan(s2[a]) : s2[a] != (float)mx) bad++;
      if (s3[a] != imx || s4[a] != isum) bad++;
    }
    CHECK_MSG(bad == 0, "reductions: %d mismatches", bad);
    /* the float sums as a graph: sum over b of x; sum over (a, b) of bf16(x) * 2 in bf16 */
    cm_graph *g = cm_graph_new();
    int64_t dx[3] = {A, Bn, Cn};
    int gx = cm_input(g, "x", CM_F32, 3, dx), ax1 = 1, ax01[2] = {0, 1};
    int two = cm_const_fill(g, NULL, CM_BF16, 3, dx, 2);
    int nodes[2] = {cm_reduce(g, CM_OP_REDUCE_SUM, gx, 1, &ax1, false, "sum_b"),
                    cm_reduce(g, CM_OP_REDUCE_SUM,
                              cm_binary(g, CM_OP_MUL, cm_cast(g, gx, CM_BF16, NULL), two, NULL), 2,
                              ax01, false, "bf16_sum")};
    cm_tensor tx = test_view(g->nodes[gx].type, x);
    cm_tensor got[2] = {test_view(g->nodes[nodes[0]].type, s1),
                        test_view(g->nodes[nodes[1]].type, s5b)};
    const cm_tensor **src = calloc((size_t)g->n_nodes + 1, sizeof *src);
    src[gx] = &tx;
    check_bounded(g, src, 2, nodes, got, "reductions");
    free(src);
    cm_graph_free(g);
  }
  cm_kernel_free(&k);
  free(x);
  free(xi);
  reduce_every_length(j);
  cm_jit_destroy(j);
}

/* ---- GEMM --------------------------------------------------------------------- */

typedef struct gemm_case {
  int64_t batch, M, N, K;
  bool bcast_b, trans_a, trans_b, epilogue, trans_store;
  cm_kgemm_tiles tiles;
  bool two_d; /* dom [M, N] without a batch var (batch must be 1) */
  int width;  /* vector width rendered with (0: 16) */
  int kstep;  /* B^T rows hold B(k, j) at k * kstep (0: 1); 2 is not contiguous along k */
} gemm_case;

/* C[b,i,j] (or C[b,j,i]) = relu(sum_k A(b,i,k) B(b,k,j) + bias[j]). dt CM_BF16:
 * the operands of an autocast GEMM, A a bf16 buffer and B an f32 one cast to
 * bf16 as a prologue, their products taken in f32 (the lowering's body). */
static void build_gemm(cm_kernel *k, const gemm_case *g, bool templ, cm_dtype dt) {
  cm_kernel_init(k, "kgemm");
  int ba = cm_kernel_add_buffer(k, CM_KBUF_ARENA, dt, g->batch * g->M * g->K, -1, 0);
  int64_t ks = g->kstep ? g->kstep : 1;
  int bb = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32,
                                (g->bcast_b ? 1 : g->batch) * g->K * g->N * ks, -1, 0);
  int bbias = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, g->N, -1, 0);
  int bc = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, g->batch * g->M * g->N, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(k, "gemm");
  int o = g->two_d ? 0 : 1;
  s->n_dom = 2 + o, s->dom[0] = g->batch, s->dom[o] = g->M, s->dom[o + 1] = g->N;
  s->n_red = 1, s->red[0] = g->K, s->acc_dtype = CM_F32;
  s->n_parallel = s->n_dom;
  int vb = g->two_d ? cm_kx_iconst(s, 0) : cm_kx_var(s, 0);
  int vi = cm_kx_var(s, o), vj = cm_kx_var(s, o + 1), vk = cm_kx_var(s, o + 2);
  int M = cm_kx_iconst(s, g->M), N = cm_kx_iconst(s, g->N), K = cm_kx_iconst(s, g->K);
  int ia = g->trans_a
               ? cm_kx_iadd(s, cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, K), vk), M), vi)
               : cm_kx_iadd(s, cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, M), vi), K), vk);
  int bbase = g->bcast_b ? cm_kx_iconst(s, 0) : vb;
  int Ks = cm_kx_iconst(s, g->K * ks), vks = cm_kx_imul(s, vk, cm_kx_iconst(s, ks));
  int ib = g->trans_b
               ? cm_kx_iadd(s, cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, bbase, N), vj), Ks), vks)
               : cm_kx_iadd(s, cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, bbase, K), vk), N), vj);
  s->gemm_a = cm_kx_load(s, k, ba, ia);
  if (g->two_d && dt == CM_F32) /* a prologue: A scaled by 0.5 and rounded through bf16 and back */
    s->gemm_a = cm_kx_op(s, CM_OP_CAST, CM_F32,
                         cm_kx_op(s, CM_OP_MUL, CM_BF16,
                                  cm_kx_op(s, CM_OP_CAST, CM_BF16, s->gemm_a, -1, -1),
                                  cm_kx_const(s, CM_BF16, 0.5), -1),
                         -1, -1);
  else if (g->two_d) /* bf16 A scaled by 0.5 in bf16 */
    s->gemm_a = cm_kx_op(s, CM_OP_MUL, CM_BF16, s->gemm_a, cm_kx_const(s, CM_BF16, 0.5), -1);
  s->gemm_b = cm_kx_load(s, k, bb, ib);
  if (dt == CM_BF16) s->gemm_b = cm_kx_op(s, CM_OP_CAST, CM_BF16, s->gemm_b, -1, -1);
  int fa = s->gemm_a, fb = s->gemm_b;
  if (dt == CM_BF16)
    fa = cm_kx_op(s, CM_OP_CAST, CM_F32, fa, -1, -1),
    fb = cm_kx_op(s, CM_OP_CAST, CM_F32, fb, -1, -1);
  s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, fa, fb, -1);
  int val = cm_kx_acc(s);
  if (g->epilogue)
    val = cm_kx_op(s, CM_OP_RELU, CM_F32,
                   cm_kx_op(s, CM_OP_ADD, CM_F32, val, cm_kx_load(s, k, bbias, vj), -1), -1, -1);
  int ic = g->trans_store
               ? cm_kx_iadd(s, cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, N), vj), M), vi)
               : cm_kx_iadd(s, cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, M), vi), N), vj);
  add_store(s, bc, ic, val);
  s->tmpl = templ ? CM_KT_GEMM : CM_KT_NONE;
  s->tiles = g->tiles;
}

static int64_t gemm_items(const gemm_case *g, const cm_kgemm_tiles *t) {
  return g->batch * ((g->M + t->mc - 1) / t->mc) * ((g->N + t->nc - 1) / t->nc);
}
/* the contract's size (cm_kstage_workspace_bytes: B packed for every kc slice of K
 * when small enough) */
static int64_t gemm_ws(const cm_kgemm_tiles *t, int64_t K) {
  cm_kstage s;
  memset(&s, 0, sizeof s);
  s.tmpl = CM_KT_GEMM, s.n_red = 1, s.red[0] = K, s.tiles = *t;
  return cm_kstage_workspace_bytes(&s, CM_TARGET_CPU);
}
/* the renderer's defaults (mc, nc, kc alike for every vector width) */
static const cm_kgemm_tiles default_tiles = {240, 512, 128, 6, 64};

/* C against the stage's graph: matmul of A (through the bf16 prologue for two_d)
 * and B (B^T rows read every kstep-th element; one B for every batch item with
 * bcast_b), the bias and relu epilogue, the transposed store. dt CM_BF16: A is
 * bf16, B is cast to bf16 and the bf16 matmul cast back to f32 (the kernel
 * keeps it in f32: a conforming evaluation may keep a result wider). */
static void gemm_check(const gemm_case *c, cm_dtype dt, const void *A, const float *Bm,
                       const float *bias, const float *C, const char *what) {
  cm_graph *g = cm_graph_new();
  int64_t ks = c->kstep ? c->kstep : 1, bb = c->bcast_b ? 1 : c->batch;
  int64_t da[3] = {c->batch, c->trans_a ? c->K : c->M, c->trans_a ? c->M : c->K};
  int64_t db[3] = {bb, c->trans_b ? c->N : c->K, c->trans_b ? c->K * ks : c->N};
  int ga = cm_input(g, "A", dt, 3, da), gb = cm_input(g, "B", CM_F32, 3, db);
  int gbias = cm_input(g, "bias", CM_F32, 1, &c->N);
  int a = ga, b = gb;
  if (c->two_d && dt == CM_F32)
    a = cm_cast(g,
                cm_binary(g, CM_OP_MUL, cm_cast(g, ga, CM_BF16, NULL),
                          cm_const_fill(g, NULL, CM_BF16, 3, da, 0.5), NULL),
                CM_F32, NULL);
  else if (c->two_d)
    a = cm_binary(g, CM_OP_MUL, ga, cm_const_fill(g, NULL, CM_BF16, 3, da, 0.5), NULL);
  if (ks > 1) {
    int64_t start[3] = {0, 0, 0}, stop[3] = {bb, c->N, c->K * ks}, step[3] = {1, 1, ks};
    b = cm_slice(g, gb, start, stop, step, NULL);
  }
  if (dt == CM_BF16) b = cm_cast(g, b, CM_BF16, NULL);
  int y = cm_matmul(g, a, b, c->trans_a, c->trans_b, "AB");
  if (dt == CM_BF16) y = cm_cast(g, y, CM_F32, "AB_f32");
  if (c->epilogue)
    y = cm_unary(g, CM_OP_RELU, cm_binary_bcast(g, CM_OP_ADD, y, gbias, NULL), "relu_AB_bias");
  int perm[3] = {0, 2, 1};
  if (c->trans_store) y = cm_permute(g, y, perm, "C_T");
  cm_tensor ta = test_view(g->nodes[ga].type, A), tb = test_view(g->nodes[gb].type, Bm);
  cm_tensor tbias = test_view(g->nodes[gbias].type, bias), got = test_view(g->nodes[y].type, C);
  const cm_tensor **src = calloc((size_t)g->n_nodes + 1, sizeof *src);
  src[ga] = &ta, src[gb] = &tb, src[gbias] = &tbias;
  check_bounded(g, src, 1, &y, &got, what);
  free(src);
  cm_graph_free(g);
}

/* g rendered for target tg (NULL: the host) in dtype dt (build_gemm), with the
 * template and (when small) without; run and checked against the oracle when
 * run, else only compiled and linked. */
static void check_gemm(cm_jit *j, const gemm_case *g, cm_dtype dt, const cm_target *tg, bool run) {
  for (int templ = 1; templ >= 0; templ--) {
    if (!templ && (g->M * g->N * g->K > 2000000 || !run)) continue;
    cm_kernel k;
    build_gemm(&k, g, true, dt); /* templ 0: the GEMM stage rendered with no_templates */
    int64_t na = g->batch * g->M * g->K,
            nb = (g->bcast_b ? 1 : g->batch) * g->K * g->N * (g->kstep ? g->kstep : 1);
    int64_t nc = g->batch * g->M * g->N;
    float *A = malloc((size_t)na * 4), *Bm = malloc((size_t)nb * 4),
          *bias = malloc((size_t)g->N * 4);
    uint16_t *Ah = dt == CM_BF16 ? (uint16_t *)A : NULL; /* bf16 A: half of A's floats */
    float *C = malloc((size_t)nc * 4);
    for (int64_t i = 0; i < na; i++) {
      if (Ah)
        Ah[i] = bf16_bits((float)urand(-1, 1));
      else
        A[i] = (float)urand(-1, 1);
    }
    for (int64_t i = 0; i < nb; i++) Bm[i] = (float)urand(-1, 1);
    for (int64_t i = 0; i < g->N; i++) bias[i] = (float)urand(-1, 1);
    for (int64_t i = 0; i < nc; i++) C[i] = NAN;
    const cm_kgemm_tiles *t = g->tiles.mr ? &g->tiles : &default_tiles;
    char *ws = aligned_alloc(64, (size_t)gemm_ws(t, g->K));
    char *bufs[] = {(char *)A, (char *)Bm, (char *)bias, (char *)C};
    cm_cpu_stage_fn fn[1];
    cm_llvm_render_opts ro = {g->width ? g->width : 16, !templ, tg};
    if (test_jit_kernel(j, &k, &ro, fn) && run) {
      int64_t items = templ ? gemm_items(g, t) : g->batch * g->M * g->N;
      run_stages(&k, fn, bufs, &items, ws);
      char what[96];
      snprintf(what, sizeof what, "gemm %s %lldx%lldx%lld batch %lld templ %d", cm_dtype_name(dt),
               (long long)g->M, (long long)g->N, (long long)g->K, (long long)g->batch, templ);
      gemm_check(g, dt, A, Bm, bias, C, what);
    }
    free(A), free(Bm), free(bias), free(C), free(ws);
    cm_kernel_free(&k);
  }
}

#define SMALL_TILES                                                                                \
  { 12, 64, 16, 6, 32 }
static const gemm_case gemm_cases[] = {
    {1, 1, 1, 1, false, false, false, false, false, {0}, false, 0, 0},
    {1, 7, 13, 5, false, false, false, true, false, SMALL_TILES, false, 0, 0},
    {1, 97, 31, 129, false, false, false, false, false, SMALL_TILES, false, 0, 0},
    {1, 97, 31, 129, false, false, false, false, false, {0}, false, 0, 0},
    {1, 130, 260, 300, false, false, false, true, false, {0}, false, 0, 0},
    {1, 130, 260, 300, false, true, true, false, false, {24, 96, 64, 6, 32}, false, 0, 0},
    {3, 17, 19, 23, true, false, false, true, true, SMALL_TILES, false, 0, 0},
    {2, 33, 65, 40, false, true, false, true, true, {12, 64, 16, 4, 64}, false, 0, 0},
    {2, 9, 70, 31, true, false, true, false, true, {0}, false, 0, 0},
    {1, 29, 47, 53, false, false, true, true, false, SMALL_TILES, true, 0, 0},
    {1, 1, 200, 70, false, false, false, true, true, {0}, true, 0, 0},
    /* mr, nr multiples of the width: A (row-major) and B^T are packed W k at a time
     * (kc slices of 2 whole chunks, then 0 chunks and a remainder of 13) */
    {1, 50, 37, 45, false, false, true, true, false, {32, 32, 32, 16, 16}, false, 0, 0},
    {2, 35, 21, 77, true, false, true, false, true, {16, 32, 48, 16, 32}, false, 0, 0},
    {1, 40, 45, 29, false, true, false, true, false, {16, 48, 16, 16, 48}, false, 0, 0},
    /* 8-wide vectors: 8 x 8 transposes, 3 accumulators per row */
    {1, 41, 50, 70, false, false, true, true, false, {24, 48, 32, 8, 24}, false, 8, 0},
    {1, 19, 33, 17, false, true, true, false, false, {0}, false, 8, 0},
    /* 6 rows of row-major A under the width: packed 8 k at a time through shuffles */
    {1, 43, 29, 37, false, false, false, true, false, {18, 32, 16, 6, 16}, false, 8, 0},
    /* B^T with a k stride of 2: packed element by element */
    {2, 21, 40, 37, false, false, true, true, false, {16, 32, 16, 16, 32}, false, 0, 2},
};
#undef SMALL_TILES

/* the bf16 cases: 1x1x1, 7x13x5, 97x31x129, 130x260x300 (B^T and A^T), batched, the
 * epilogues, the two_d prologue, W k at a time and 8 lanes */
static const int bf16_cases[] = {0, 1, 2, 4, 5, 6, 7, 9, 11, 16};

static void test_gemm(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  /* every case in f32, the bf16 ones in bf16 (on the host: the operands widened to f32 while
   * packing, or vdpbf16ps pairs where it has AVX-512 BF16) */
  for (size_t i = 0; i < sizeof gemm_cases / sizeof *gemm_cases; i++)
    check_gemm(j, &gemm_cases[i], CM_F32, NULL, true);
  for (size_t i = 0; i < sizeof bf16_cases / sizeof *bf16_cases; i++)
    check_gemm(j, &gemm_cases[bf16_cases[i]], CM_BF16, NULL, true);
  /* the vdpbf16ps layout (k pairs, odd K padded) run here: a host target told to use it
   * renders the instruction's two steps as f32 FMAs (render_llvm_gemm.c, emit_dpbf16) */
  cm_target pairs;
  cm_target_host(&pairs);
  pairs.cpu.dot_bf16 = true;
  for (size_t i = 0; i < sizeof bf16_cases / sizeof *bf16_cases; i++)
    if (!gemm_cases[bf16_cases[i]].width)
      check_gemm(j, &gemm_cases[bf16_cases[i]], CM_BF16, &pairs, true);
  cm_jit_destroy(j);
}

/* The bf16 micro-kernel (vdpbf16ps pairs) for a CPU with AVX-512 BF16 (znver4):
 * the bf16 cases compiled and linked for it, and its micro-kernel's assembly
 * holds vdpbf16ps on zmm registers and no f32 FMA. Run and checked against the
 * oracle only where the host has AVX-512 BF16; elsewhere nothing runs, and the
 * test says so. */
static void test_gemm_bf16_dot(void) {
  cm_target tg;
  cm_err err = {0};
  cm_status st = cm_target_cpu("znver4", NULL, &tg, &err);
  CHECK_MSG(st == CM_OK, "znver4: %s", err.msg);
  if (st != CM_OK) return;
  CHECK_MSG(tg.cpu.dot_bf16, "znver4 (%s) without 512-bit vdpbf16ps", tg.cpu.features);
  cm_jit_opts o = {NULL, 3, "znver4", NULL, 512, true};
  cm_jit *j = NULL;
  CHECK_MSG(cm_jit_create(&j, &o, &err) == CM_OK, "%s", err.msg);
  if (!j) return;
  bool run = cm_jit_target(j)->runnable;
  for (size_t i = 0; i < sizeof bf16_cases / sizeof *bf16_cases; i++)
    if (!gemm_cases[bf16_cases[i]].width) /* 16 lanes: the pairs' width */
      check_gemm(j, &gemm_cases[bf16_cases[i]], CM_BF16, &tg, run);
  cm_kernel k;
  gemm_case g = {1, 64, 64, 64, false, false, false, false, false, {0}, false, 0, 0};
  build_gemm(&k, &g, true, CM_BF16);
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("asm_gemm_bf16", cm_jit_context(j));
  cm_llvm_render_opts ro = {16, false, &tg};
  CHECK_MSG(cm_render_llvm(&k, m, &ro, &err) == CM_OK, "%s", err.msg);
  char *text = NULL;
  if (cm_jit_render(j, m, CM_JIT_TEXT_ASM, &text, &err) == CM_OK) {
    /* 6 x 4 accumulators, one vdpbf16ps each per k pair, the loop unrolled by 4 */
    int dots = test_count(text, "vdpbf16ps\t");
    CHECK_MSG(dots >= 6 * 4 * 4, "%d vdpbf16ps in the bf16 GEMM, want at least 96", dots);
    CHECK_MSG(test_count(text, "vdpbf16ps\t%zmm") == dots,
              "vdpbf16ps on registers narrower than zmm");
    CHECK_MSG(test_count(text, "vfmadd231ps\t%zmm") == 0, "an f32 FMA in the bf16 GEMM");
    if (getenv("CM_DUMP_ASM")) fputs(text, stderr);
  } else {
    CHECK_MSG(false, "%s", err.msg);
  }
  free(text);
  LLVMDisposeModule(m);
  cm_kernel_free(&k);
  if (!run)
    fprintf(stderr,
            "  bf16 GEMMs compiled and linked for znver4 (vdpbf16ps); NOT RUN, NOT COMPARED: "
            "this host (%s) lacks %s\n",
            cm_jit_target(j)->host_cpu, cm_jit_target(j)->missing);
  cm_jit_destroy(j);
}

/* ---- stage shapes, update semantics, accumulate ------------------------------------ */

CM_NO_SANITIZE_FUNCTION static void run_one(cm_cpu_stage_fn f, char *const *bufs, int64_t a,
                                            int64_t b) {
  f(bufs, a, b, NULL);
}

static void test_stage_shapes(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  enum { P = 3, Q = 5, R = 7, NI = 29 };
  cm_kernel k;
  cm_kernel_init(&k, "kshape");
  int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, P * Q * R, -1, 0);
  int by = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, P * Q * R, -1, 0);
  int bz = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F64, P * Q * R, -1, 0);
  int bh = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, R, -1, 0);
  int bidx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, NI, -1, 0);
  int bflag = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BOOL, P * Q * R, -1, 0);
  /* s0, n_parallel 0 over [P,Q,R]: y[i] = x[i] * 2 + (x[i] > 0) (transposed read of x: x[r,q,p]
   * layout is [P,Q,R] so read x at (p*Q+q)*R+r, write y at (r*Q+q)*P+p) */
  for (int np = 0; np <= 3; np++) {
    cm_kstage *s = cm_kernel_add_stage(&k, "shape");
    s->n_dom = 3, s->dom[0] = P, s->dom[1] = Q, s->dom[2] = R, s->n_parallel = np;
    int p = cm_kx_var(s, 0), q = cm_kx_var(s, 1), r = cm_kx_var(s, 2);
    int ix = cm_kx_iadd(
        s,
        cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, p, cm_kx_iconst(s, Q)), q), cm_kx_iconst(s, R)),
        r);
    int iy = cm_kx_iadd(
        s,
        cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, r, cm_kx_iconst(s, Q)), q), cm_kx_iconst(s, P)),
        p);
    int x = cm_kx_load(s, &k, bx, ix);
    int pos = cm_kx_op(s, CM_OP_LT, CM_BOOL, cm_kx_const(s, CM_F32, 0), x, -1);
    int v = cm_kx_op(s, CM_OP_ADD, CM_F32,
                     cm_kx_op(s, CM_OP_MUL, CM_F32, x, cm_kx_const(s, CM_F32, 2), -1),
                     cm_kx_op(s, CM_OP_CAST, CM_F32, pos, -1, -1), -1);
    if (np == 3) {
      /* update in place: x[i] = x[i] + 1 and z[i] = x[i] (the old value), flag = !(x > 0) */
      add_store(s, bx, ix, cm_kx_op(s, CM_OP_ADD, CM_F32, x, cm_kx_const(s, CM_F32, 1), -1));
      add_store(s, bz, ix, x);
      add_store(s, bflag, ix, cm_kx_op(s, CM_OP_EQ, CM_BOOL, pos, cm_kx_const(s, CM_BOOL, 0), -1));
    } else {
      add_store(s, by, iy, v);
    }
  }
  /* s4: accumulate (scatter_add): h[idx[i] % R] += 1.5 for i < NI, one work item */
  cm_kstage *s = cm_kernel_add_stage(&k, "hist");
  s->n_dom = 1, s->dom[0] = NI, s->n_parallel = 0, s->accumulate = true;
  int i = cm_kx_var(s, 0);
  int id = cm_kx_op(s, CM_OP_CAST, CM_I64, cm_kx_load(s, &k, bidx, i), -1, -1);
  add_store(s, bh, cm_kx_imod(s, id, cm_kx_iconst(s, R)), cm_kx_const(s, CM_F32, 1.5));

  float x[P * Q * R], x0[P * Q * R], y[P * Q * R], h[R] = {0};
  double z[P * Q * R];
  int32_t idx[NI];
  uint8_t flag[P * Q * R];
  for (int t = 0; t < P * Q * R; t++) x[t] = x0[t] = (float)urand(-2, 2);
  for (int t = 0; t < NI; t++) idx[t] = (int32_t)urand(0, 1000);
  char *bufs[] = {(char *)x, (char *)y, (char *)z, (char *)h, (char *)idx, (char *)flag};
  cm_cpu_stage_fn fns[5];
  if (test_jit_kernel(j, &k, NULL, fns)) {
    int bad = 0;
    for (int st = 0; st < 3; st++) {
      memset(y, 0, sizeof y);
      int64_t n = generic_items(&k.stages[st]);
      CHECK(n == (st == 0 ? 1 : st == 1 ? P : P * Q));
      run_one(fns[st], bufs, 0, n / 2);
      run_one(fns[st], bufs, n / 2, n);
      for (int p = 0; p < P; p++)
        for (int q = 0; q < Q; q++)
          for (int r = 0; r < R; r++) {
            float xv = x0[(p * Q + q) * R + r];
            bad += y[(r * Q + q) * P + p] != xv * 2 + (xv > 0);
          }
    }
    run_one(fns[3], bufs, 0, 40);
    run_one(fns[3], bufs, 40, P * Q * R);
    run_one(fns[4], bufs, 0, 1);
    float hw[R] = {0};
    for (int t = 0; t < NI; t++) hw[idx[t] % R] += 1.5f;
    for (int t = 0; t < P * Q * R; t++)
      bad += x[t] != x0[t] + 1 || z[t] != x0[t] || flag[t] != !(x0[t] > 0);
    for (int r = 0; r < R; r++) bad += h[r] != hw[r];
    CHECK_MSG(bad == 0, "stage shapes: %d mismatches", bad);
  }
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

/* ---- errors ------------------------------------------------------------------- */

static void test_errors(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("bad", cm_jit_context(j));
  cm_kernel k;
  cm_kernel_init(&k, "kbad");
  int b = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 8, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "oops");
  s->n_dom = 1, s->dom[0] = 8, s->n_parallel = 1;
  int v = cm_kx_var(s, 0);
  /* a reduction var in a stage without reductions */
  add_store(s, b, v, cm_kx_op(s, CM_OP_CAST, CM_F32, cm_kx_var(s, 3), -1, -1));
  cm_err err = {0};
  cm_status st = cm_render_llvm(&k, m, NULL, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "kbad");
  CHECK_STR_CONTAINS(err.msg, "oops");
  CHECK_STR_CONTAINS(err.msg, "variable");
  /* a store to a buffer that does not exist */
  k.stages[0].stores[0].buf = 5;
  st = cm_render_llvm(&k, m, NULL, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "store");
  /* GEMM template whose A operand reads j */
  k.stages[0].stores[0].buf = b;
  s = &k.stages[0];
  s->n_dom = 2, s->dom[1] = 4, s->n_red = 1, s->red[0] = 3, s->tmpl = CM_KT_GEMM;
  s->gemm_a = cm_kx_load(s, &k, b, cm_kx_var(s, 1));
  s->gemm_b = s->gemm_a;
  s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, s->gemm_a, s->gemm_b, -1);
  s->stores[0].value = cm_kx_acc(s);
  st = cm_render_llvm(&k, m, NULL, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "GEMM");
  cm_kernel_free(&k);
  LLVMDisposeModule(m);
  cm_jit_destroy(j);
}

/* ---- asm: vectorized elementwise stage and the micro-kernel ------------------------ */

/* The vector registers of the JIT's target and the width the renderer picks
 * for it (render_llvm.c, host_width): zmm and 16 floats with AVX-512F, ymm
 * and 8 with AVX2; NULL when the target's features are not listed (a CPU
 * named without them) or it has neither. */
static const char *target_vector_regs(cm_jit *j, int *width) {
  const char *d = cm_jit_target_description(j);
  *width = strstr(d, "+avx512f") ? 16 : 8;
  return strstr(d, "+avx512f") ? "zmm" : strstr(d, "+avx2") ? "ymm" : NULL;
}

static void test_asm(void) {
  /* The checks read AVX-512 assembly: the code is made for an AVX-512 CPU whatever the host
   * (only rendered, never run, so the host need not have AVX-512). */
  cm_jit_opts o = {NULL, 3, "x86-64-v4", NULL, 512, true};
  cm_jit *j = NULL;
  cm_err jerr = {0};
  CHECK_MSG(cm_jit_create(&j, &o, &jerr) == CM_OK, "%s", jerr.msg);
  if (!j) return;
  int W;
  const char *reg = target_vector_regs(j, &W);
  if (!reg) {
    fprintf(stderr, "  asm: the target (%s) lists neither AVX-512F nor AVX2: not checked\n",
            cm_jit_target_description(j));
    cm_jit_destroy(j);
    return;
  }
  char vadd[32], vfma[32];
  snprintf(vadd, sizeof vadd, "vaddps\t%%%s", reg);
  snprintf(vfma, sizeof vfma, "vfmadd231ps\t%%%s", reg);
  cm_kernel k;
  cm_kernel_init(&k, "kaxpy");
  int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 1000, -1, 0);
  int by = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 1000, -1, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 1000, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "axpy");
  s->n_dom = 1, s->dom[0] = 1000, s->n_parallel = 1;
  int v = cm_kx_var(s, 0);
  int ax = cm_kx_op(s, CM_OP_MUL, CM_F32, cm_kx_load(s, &k, bx, v), cm_kx_const(s, CM_F32, 3), -1);
  add_store(s, bo, v, cm_kx_op(s, CM_OP_ADD, CM_F32, ax, cm_kx_load(s, &k, by, v), -1));
  /* and a row sum of the same data (reassociated float reduction) */
  s = cm_kernel_add_stage(&k, "rowsum");
  s->n_dom = 1, s->dom[0] = 10, s->n_parallel = 1, s->n_red = 1, s->red[0] = 100;
  int r = cm_kx_var(s, 0), q = cm_kx_var(s, 1);
  s->body = cm_kx_load(s, &k, bx, cm_kx_iadd(s, cm_kx_imul(s, r, cm_kx_iconst(s, 100)), q));
  add_store(s, bo, r, cm_kx_acc(s));
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("asm", cm_jit_context(j));
  cm_err err = {0};
  cm_llvm_render_opts ro = {W, false, NULL};
  CHECK_MSG(cm_render_llvm(&k, m, &ro, &err) == CM_OK, "%s", err.msg);
  char *text = NULL;
  if (cm_jit_render(j, m, CM_JIT_TEXT_ASM, &text, &err) == CM_OK) {
    /* each stage's own text: the elementwise stage and the float sum are vectorized in the
     * target's widest registers */
    const char *s0 = strstr(text, "kaxpy_s0:"), *s1 = strstr(text, "kaxpy_s1:");
    CHECK(s0 && s1 && s1 > s0);
    if (s0 && s1 && s1 > s0) {
      size_t len = (size_t)(s1 - s0);
      char *t0 = malloc(len + 1);
      memcpy(t0, s0, len);
      t0[len] = 0;
      CHECK_MSG(strstr(t0, reg) != NULL, "elementwise stage not vectorized (no %s):\n%s", reg, t0);
      CHECK_MSG(test_count(t0, "vfmadd") + test_count(t0, vadd) + test_count(t0, "vaddps\t(") > 0,
                "no vector add/fma in the elementwise stage:\n%s", t0);
      free(t0);
      const char *e1 = strstr(s1, ".Lfunc_end");
      len = e1 ? (size_t)(e1 - s1) : strlen(s1);
      char *t1 = malloc(len + 1);
      memcpy(t1, s1, len);
      t1[len] = 0;
      CHECK_MSG(test_count(t1, vadd) + test_count(t1, "vaddps\t(") > 0,
                "float sum not vectorized (no %s):\n%s", vadd, t1);
      free(t1);
    }
  } else {
    CHECK_MSG(false, "%s", err.msg);
  }
  free(text);
  LLVMDisposeModule(m);
  cm_kernel_free(&k);

  gemm_case g = {1, 64, 64, 64, false, false, false, false, false, {0}, false, 0, 0};
  build_gemm(&k, &g, true, CM_F32);
  m = LLVMModuleCreateWithNameInContext("asm_gemm", cm_jit_context(j));
  CHECK_MSG(cm_render_llvm(&k, m, &ro, &err) == CM_OK, "%s", err.msg);
  text = NULL;
  if (cm_jit_render(j, m, CM_JIT_TEXT_ASM, &text, &err) == CM_OK) {
    /* 6 x 4 zmm accumulators with AVX-512, 6 x 2 ymm with AVX2 (the default tiles of the
     * width: nr = 4W or 2W): the micro-kernel's loop (from the label before the first
     * register FMA to its back edge), unrolled by 4, holds at least 6 x 4 x 4 or 6 x 2 x 4
     * register FMAs and no stack access */
    int want_fmas = 6 * (W >= 16 ? 4 : 2) * 4;
    const char *f = strstr(text, vfma);
    CHECK_MSG(f != NULL, "no %s in the GEMM", vfma);
    if (f) {
      const char *lab = f;
      while (lab > text && !(lab[-1] == '\n' && lab[0] == '.' && strncmp(lab, ".LBB", 4) == 0))
        lab--;
      const char *back = strstr(f, "\tjne\t");
      CHECK(back != NULL);
      if (back) {
        size_t len = (size_t)(back - lab);
        char *loop_text = malloc(len + 1);
        memcpy(loop_text, lab, len);
        loop_text[len] = 0;
        int fmas = test_count(loop_text, vfma);
        CHECK_MSG(fmas >= want_fmas, "%d register %s FMAs in the micro-kernel loop, want %d", fmas,
                  reg, want_fmas);
        CHECK_MSG(test_count(loop_text, "(%rsp)") == 0,
                  "stack access in the micro-kernel loop:\n%s", loop_text);
        free(loop_text);
      }
    }
    if (getenv("CM_DUMP_ASM")) fputs(text, stderr);
  } else {
    CHECK_MSG(false, "%s", err.msg);
  }
  free(text);
  LLVMDisposeModule(m);
  cm_kernel_free(&k);

  /* B^T (contiguous along k) is packed with vector loads and shuffles, not scatters
   * (the k remainder of a slice, under W, may gather) */
  gemm_case gt = {1, 64, 64, 100, false, false, true, false, false, {0}, false, 0, 0};
  build_gemm(&k, &gt, true, CM_F32);
  m = LLVMModuleCreateWithNameInContext("asm_gemm_bt", cm_jit_context(j));
  CHECK_MSG(cm_render_llvm(&k, m, &ro, &err) == CM_OK, "%s", err.msg);
  text = NULL;
  if (cm_jit_render(j, m, CM_JIT_TEXT_ASM, &text, &err) == CM_OK) {
    CHECK_MSG(test_count(text, "vscatter") == 0, "scatter in the B^T GEMM (%d)",
              test_count(text, "vscatter"));
    CHECK_MSG(test_count(text, "vunpck") + test_count(text, "vperm") + test_count(text, "vshuf") >=
                  16,
              "no in-register transpose in the B^T pack");
  } else {
    CHECK_MSG(false, "%s", err.msg);
  }
  free(text);
  LLVMDisposeModule(m);
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

/* ---- performance signal ------------------------------------------------------- */

CM_NO_SANITIZE_FUNCTION static double time_gemm(cm_cpu_stage_fn fn, char *const *bufs,
                                                int64_t items, char *ws) {
  struct timespec t0, t1;
  double best = 1e30;
  for (int rep = 0; rep < 3; rep++) {
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fn(bufs, 0, items, ws);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (s < best) best = s;
  }
  return best;
}

static void test_gemm_perf(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  gemm_case g = {1, 384, 384, 1536, false, false, false, false, false, {0}, false, 0, 0};
  cm_kernel k;
  build_gemm(&k, &g, true, CM_F32);
  float *A = malloc(384 * 1536 * 4), *Bm = malloc(1536 * 384 * 4), *bias = calloc(384, 4),
        *C = malloc(384 * 384 * 4);
  for (int i = 0; i < 384 * 1536; i++) A[i] = (float)urand(-1, 1), Bm[i] = (float)urand(-1, 1);
  char *ws = aligned_alloc(64, (size_t)gemm_ws(&default_tiles, g.K));
  char *bufs[] = {(char *)A, (char *)Bm, (char *)bias, (char *)C};
  cm_cpu_stage_fn fn[1];
  cm_llvm_render_opts ro = {16, false, NULL};
  if (test_jit_kernel(j, &k, &ro, fn)) {
    double s = time_gemm(fn[0], bufs, gemm_items(&g, &default_tiles), ws);
    double gf = 2.0 * 384 * 384 * 1536 / s * 1e-9;
    printf("gemm 384x384x1536 f32, one thread: %.3f ms, %.1f GFLOP/s\n", s * 1e3, gf);
    /* row 5 of C within its bounds */
    cm_graph *gr = cm_graph_new();
    int64_t da[2] = {1, 1536}, db[2] = {1536, 384};
    int ga = cm_input(gr, "A5", CM_F32, 2, da), gb = cm_input(gr, "B", CM_F32, 2, db);
    int y = cm_matmul(gr, ga, gb, false, false, "C5");
    cm_tensor ta = test_view(gr->nodes[ga].type, A + 5 * 1536);
    cm_tensor tb = test_view(gr->nodes[gb].type, Bm),
              got = test_view(gr->nodes[y].type, C + 5 * 384);
    const cm_tensor *src[3] = {&ta, &tb, NULL};
    check_bounded(gr, src, 1, &y, &got, "gemm 384x384x1536");
    cm_graph_free(gr);
  }
  free(A), free(Bm), free(bias), free(C), free(ws);
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

static void test_report(void) {
  test_tally_report("render_llvm");
}

TEST_MAIN({"float_ops", test_float_ops}, {"int_ops", test_int_ops}, {"casts", test_casts},
          {"reductions", test_reductions}, {"stage_shapes", test_stage_shapes}, {"gemm", test_gemm},
          {"gemm_bf16_dot", test_gemm_bf16_dot}, {"errors", test_errors}, {"asm", test_asm},
          {"gemm_perf", test_gemm_perf}, {"report", test_report})
