/* tests/unit/test_eval.c — the oracle (ir/eval.c) against hand-computed values
 * and independent formulas: every op, dtype paths, rounding, errors. */
#include "ir/ir.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>

#define MAXN 64

/* ---- helpers ----------------------------------------------------------- */

static test_rng lcg_state = {0x2545F4914F6CDD1DULL};

/* Uniform in [-1, 1), never 0. */
static double rnd(void) {
  double v = 2.0 * test_uniform(&lcg_state) - 1.0;
  return v == 0 ? 0.5 : v;
}

static cm_tensor tensor_from(cm_dtype dt, int rank, const int64_t *dims, const double *v) {
  cm_tensor t;
  cm_err err;
  cm_status st = cm_tensor_alloc(&t, cm_type_make(dt, rank, dims), &err);
  CHECK(st == CM_OK);
  int64_t n = cm_type_numel(&t.type);
  for (int64_t i = 0; i < n; i++) cm_tensor_set_f64(&t, i, v ? v[i] : rnd());
  return t;
}

static cm_tensor tensor_rand(cm_dtype dt, int rank, const int64_t *dims) {
  return tensor_from(dt, rank, dims, NULL);
}

static cm_tensor tensor_i64(cm_dtype dt, int rank, const int64_t *dims, const int64_t *v) {
  cm_tensor t;
  cm_err err;
  CHECK(cm_tensor_alloc(&t, cm_type_make(dt, rank, dims), &err) == CM_OK);
  for (int64_t i = 0; i < cm_type_numel(&t.type); i++) cm_tensor_set_i64(&t, i, v[i]);
  return t;
}

static cm_status run(const cm_graph *g, const cm_tensor *const *src, cm_tensor *val, cm_precision p,
                     cm_err *err) {
  cm_eval_opts o = {p};
  CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
  return cm_eval(g, src, val, &o, err);
}

/* Evaluates and reports the message on failure. */
static bool run_ok(const cm_graph *g, const cm_tensor *const *src, cm_tensor *val, cm_precision p) {
  cm_err err = {0};
  cm_status st = run(g, src, val, p, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  return st == CM_OK;
}

static void free_values(cm_tensor *v, int n) {
  for (int i = 0; i < n; i++) cm_tensor_free(&v[i]);
}

static bool all_values_freed(const cm_tensor *v, int n) {
  for (int i = 0; i < n; i++)
    if (v[i].data) return false;
  return true;
}

static double get(const cm_tensor *t, int64_t i) {
  return cm_tensor_get_f64(t, i);
}
static int64_t geti(const cm_tensor *t, int64_t i) {
  return cm_tensor_get_i64(t, i);
}

/* ---- elementwise, floats ----------------------------------------------- */

static void test_unary_float(void) {
  cm_graph *g = cm_graph_new();
  int64_t dims[3] = {3, 1, 5};
  int x = cm_input(g, "x", CM_F64, 3, dims);
  int ax = cm_unary(g, CM_OP_ABS, x, "ax");
  int ops[] = {CM_OP_NEG, CM_OP_EXP, CM_OP_TANH, CM_OP_ERF, CM_OP_RELU, CM_OP_RECIP};
  int ids[6];
  for (int k = 0; k < 6; k++) ids[k] = cm_unary(g, (cm_op)ops[k], x, NULL);
  int lg = cm_unary(g, CM_OP_LOG, ax, NULL), sq = cm_unary(g, CM_OP_SQRT, ax, NULL);
  int rs = cm_unary(g, CM_OP_RSQRT, ax, NULL);
  cm_tensor tx = tensor_rand(CM_F64, 3, dims);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    for (int64_t i = 0; i < 15; i++) {
      double v = get(&tx, i);
      CHECK(get(&val[ax], i) == fabs(v));
      CHECK(get(&val[ids[0]], i) == -v);
      CHECK(get(&val[ids[1]], i) == exp(v));
      CHECK(get(&val[ids[2]], i) == tanh(v));
      CHECK(get(&val[ids[3]], i) == erf(v));
      CHECK(get(&val[ids[4]], i) == (v > 0 ? v : 0));
      CHECK(get(&val[ids[5]], i) == 1 / v);
      CHECK(get(&val[lg], i) == log(fabs(v)));
      CHECK(get(&val[sq], i) == sqrt(fabs(v)));
      CHECK_NEAR(get(&val[rs], i), 1 / sqrt(fabs(v)), 1e-15);
    }
    CHECK(val[x].type.dtype == CM_F64 && val[x].type.rank == 3 && val[x].type.dims[1] == 1);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

static void test_unary_special_values(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 4;
  int x = cm_input(g, "x", CM_F32, 1, &d);
  int r = cm_unary(g, CM_OP_RELU, x, "r");
  int l = cm_unary(g, CM_OP_LOG, x, "l");
  int s = cm_unary(g, CM_OP_SQRT, x, "s");
  int e = cm_unary(g, CM_OP_EXP, x, "e");
  double xs[4] = {NAN, 0.0, -1.0, 100.0};
  cm_tensor tx = tensor_from(CM_F32, 1, &d, xs);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(isnan(get(&val[r], 0)));
    CHECK(get(&val[r], 1) == 0 && get(&val[r], 2) == 0 && get(&val[r], 3) == 100);
    CHECK(isnan(get(&val[l], 0)));
    CHECK(isinf(get(&val[l], 1)) && get(&val[l], 1) < 0);
    CHECK(isnan(get(&val[l], 2)));
    CHECK(isnan(get(&val[s], 2)));
    /* exp(100) overflows f32 but not f64: the f32 node holds +inf. */
    CHECK(isinf(get(&val[e], 3)));
    CHECK(get(&val[e], 1) == 1);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

static void test_binary_float(void) {
  cm_graph *g = cm_graph_new();
  int64_t dims[3] = {3, 1, 5};
  int a = cm_input(g, "a", CM_F32, 3, dims), b = cm_input(g, "b", CM_F32, 3, dims);
  cm_op ops[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_DIV, CM_OP_MAX, CM_OP_MIN};
  int ids[6];
  for (int k = 0; k < 6; k++) ids[k] = cm_binary(g, ops[k], a, b, NULL);
  int aa = cm_unary(g, CM_OP_ABS, a, NULL);
  int pw = cm_binary(g, CM_OP_POW, aa, b, "pw");
  cm_tensor ta = tensor_rand(CM_F32, 3, dims), tb = tensor_rand(CM_F32, 3, dims);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    for (int64_t i = 0; i < 15; i++) {
      double x = get(&ta, i), y = get(&tb, i);
      CHECK(val[ids[0]].type.dtype == CM_F32);
      CHECK(get(&val[ids[0]], i) == (float)(x + y));
      CHECK(get(&val[ids[1]], i) == (float)(x - y));
      CHECK(get(&val[ids[2]], i) == (float)(x * y));
      CHECK(get(&val[ids[3]], i) == (float)(x / y));
      CHECK(get(&val[ids[4]], i) == (x > y ? x : y));
      CHECK(get(&val[ids[5]], i) == (x < y ? x : y));
      CHECK(get(&val[pw], i) == (float)pow(fabs(x), y));
    }
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

static void test_max_min_nan(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 3;
  int a = cm_input(g, "a", CM_F64, 1, &d), b = cm_input(g, "b", CM_F64, 1, &d);
  int mx = cm_binary(g, CM_OP_MAX, a, b, "mx"), mn = cm_binary(g, CM_OP_MIN, a, b, "mn");
  double av[3] = {NAN, 1, -2}, bv[3] = {5, NAN, -3};
  cm_tensor ta = tensor_from(CM_F64, 1, &d, av), tb = tensor_from(CM_F64, 1, &d, bv);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(isnan(get(&val[mx], 0)) && isnan(get(&val[mx], 1)));
    CHECK(isnan(get(&val[mn], 0)) && isnan(get(&val[mn], 1)));
    CHECK(get(&val[mx], 2) == -2 && get(&val[mn], 2) == -3);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

/* f32 rounding after each op in native precision; exact in F64 precision. */
static void test_precision_f32(void) {
  cm_graph *g = cm_graph_new();
  int x = cm_input(g, "x", CM_F32, 0, NULL);
  int c = cm_const_scalar(g, "c", CM_F32, ldexp(1, -30));
  int s = cm_binary(g, CM_OP_ADD, x, c, "s");
  int d = cm_binary(g, CM_OP_SUB, s, x, "d"); /* (1 + 2^-30) - 1 */
  double one = 1;
  cm_tensor tx = tensor_from(CM_F32, 0, NULL, &one);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(val[s].type.dtype == CM_F32);
    CHECK(get(&val[s], 0) == 1.0);
    CHECK(get(&val[d], 0) == 0.0);
    free_values(val, g->n_nodes);
  }
  if (run_ok(g, src, val, CM_PRECISION_F64)) {
    CHECK(val[s].type.dtype == CM_F64 && val[x].type.dtype == CM_F64);
    CHECK(get(&val[s], 0) == 1.0 + ldexp(1, -30));
    CHECK(get(&val[d], 0) == ldexp(1, -30));
    free_values(val, g->n_nodes);
  }
  /* F64 precision takes a source of another float dtype with the node's shape. */
  cm_tensor tb = tensor_from(CM_BF16, 0, NULL, &one);
  src[x] = &tb;
  if (run_ok(g, src, val, CM_PRECISION_F64)) {
    CHECK(get(&val[s], 0) == 1.0 + ldexp(1, -30));
    free_values(val, g->n_nodes);
  }
  cm_tensor_free(&tx);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

static void test_precision_16bit(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 2;
  int a = cm_input(g, "a", CM_BF16, 1, &d), b = cm_input(g, "b", CM_BF16, 1, &d);
  int s = cm_binary(g, CM_OP_ADD, a, b, "s");
  int h = cm_input(g, "h", CM_F16, 1, &d), k = cm_input(g, "k", CM_F16, 1, &d);
  int t = cm_binary(g, CM_OP_ADD, h, k, "t");
  /* bf16 has 8 significand bits: 1 + (2^-8 + 2^-10) is past the midpoint of
   * [1, 1 + 2^-7], so it rounds up; 1 + 2^-8 is a tie and rounds to even (1). */
  double av[2] = {1, 1}, bv[2] = {ldexp(1, -8) + ldexp(1, -10), ldexp(1, -8)};
  /* f16 spacing at 2048 is 2: 2048 + 3 ties to 2052 (even), 2048 + 1 ties to 2048. */
  double hv[2] = {2048, 2048}, kv[2] = {3, 1};
  cm_tensor ta = tensor_from(CM_BF16, 1, &d, av), tb = tensor_from(CM_BF16, 1, &d, bv);
  cm_tensor th = tensor_from(CM_F16, 1, &d, hv), tk = tensor_from(CM_F16, 1, &d, kv);
  CHECK(get(&tb, 0) == ldexp(1, -8) + ldexp(1, -10)); /* representable */
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb, src[h] = &th, src[k] = &tk;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(val[s].type.dtype == CM_BF16 && val[t].type.dtype == CM_F16);
    CHECK(get(&val[s], 0) == 1 + ldexp(1, -7));
    CHECK(get(&val[s], 1) == 1);
    CHECK(get(&val[t], 0) == 2052);
    CHECK(get(&val[t], 1) == 2048);
    free_values(val, g->n_nodes);
  }
  if (run_ok(g, src, val, CM_PRECISION_F64)) {
    CHECK(get(&val[s], 0) == 1 + ldexp(1, -8) + ldexp(1, -10));
    CHECK(get(&val[t], 0) == 2051 && get(&val[t], 1) == 2049);
    free_values(val, g->n_nodes);
  }
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_tensor_free(&th);
  cm_tensor_free(&tk);
  cm_graph_free(g);
}

/* ---- elementwise, ints ------------------------------------------------- */

static void test_int32_arith(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 7;
  int a = cm_input(g, "a", CM_I32, 1, &d), b = cm_input(g, "b", CM_I32, 1, &d);
  int add = cm_binary(g, CM_OP_ADD, a, b, "add"), sub = cm_binary(g, CM_OP_SUB, a, b, "sub");
  int mul = cm_binary(g, CM_OP_MUL, a, b, "mul"), dv = cm_binary(g, CM_OP_DIV, a, b, "div");
  int mx = cm_binary(g, CM_OP_MAX, a, b, "mx"), mn = cm_binary(g, CM_OP_MIN, a, b, "mn");
  int ng = cm_unary(g, CM_OP_NEG, a, "ng"), ab = cm_unary(g, CM_OP_ABS, a, "ab");
  int rl = cm_unary(g, CM_OP_RELU, a, "rl");
  int64_t av[7] = {INT32_MAX, INT32_MIN, -7, 7, 100000, INT32_MIN, 5};
  int64_t bv[7] = {1, -1, 2, -2, 100000, 1, 0};
  cm_tensor ta = tensor_i64(CM_I32, 1, &d, av), tb = tensor_i64(CM_I32, 1, &d, bv);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    int64_t e_add[7] = {INT32_MIN, INT32_MAX, -5, 5, 200000, INT32_MIN + 1, 5};
    int64_t e_sub[7] = {INT32_MAX - 1, INT32_MIN + 1, -9, 9, 0, INT32_MAX, 5};
    /* 10^10 mod 2^32 = 1410065408 */
    int64_t e_mul[7] = {INT32_MAX, INT32_MIN, -14, -14, 1410065408, INT32_MIN, 0};
    int64_t e_div[7] = {INT32_MAX, INT32_MIN, -3, -3, 1, INT32_MIN, 0};
    int64_t e_max[7] = {INT32_MAX, -1, 2, 7, 100000, 1, 5};
    int64_t e_min[7] = {1, INT32_MIN, -7, -2, 100000, INT32_MIN, 0};
    int64_t e_neg[7] = {-INT32_MAX, INT32_MIN, 7, -7, -100000, INT32_MIN, -5};
    int64_t e_abs[7] = {INT32_MAX, INT32_MIN, 7, 7, 100000, INT32_MIN, 5};
    int64_t e_relu[7] = {INT32_MAX, 0, 0, 7, 100000, 0, 5};
    CHECK(val[add].type.dtype == CM_I32);
    for (int i = 0; i < 7; i++) {
      CHECK_MSG(geti(&val[add], i) == e_add[i], "add[%d]", i);
      CHECK_MSG(geti(&val[sub], i) == e_sub[i], "sub[%d]", i);
      CHECK_MSG(geti(&val[mul], i) == e_mul[i], "mul[%d]", i);
      CHECK_MSG(geti(&val[dv], i) == e_div[i], "div[%d]", i);
      CHECK_MSG(geti(&val[mx], i) == e_max[i], "max[%d]", i);
      CHECK_MSG(geti(&val[mn], i) == e_min[i], "min[%d]", i);
      CHECK_MSG(geti(&val[ng], i) == e_neg[i], "neg[%d]", i);
      CHECK_MSG(geti(&val[ab], i) == e_abs[i], "abs[%d]", i);
      CHECK_MSG(geti(&val[rl], i) == e_relu[i], "relu[%d]", i);
    }
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

static void test_int64_arith(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 5;
  int a = cm_input(g, "a", CM_I64, 1, &d), b = cm_input(g, "b", CM_I64, 1, &d);
  int add = cm_binary(g, CM_OP_ADD, a, b, "add"), sub = cm_binary(g, CM_OP_SUB, a, b, "sub");
  int mul = cm_binary(g, CM_OP_MUL, a, b, "mul"), dv = cm_binary(g, CM_OP_DIV, a, b, "div");
  int lt = cm_binary(g, CM_OP_LT, b, a, "lt"), eq = cm_binary(g, CM_OP_EQ, a, b, "eq");
  int ng = cm_unary(g, CM_OP_NEG, a, "ng");
  const int64_t p62 = INT64_C(1) << 62, p53 = INT64_C(1) << 53;
  int64_t av[5] = {p62 + 1, INT64_MIN, INT64_MAX, -9, p53 + 1};
  int64_t bv[5] = {1, -1, 1, 4, p53};
  cm_tensor ta = tensor_i64(CM_I64, 1, &d, av), tb = tensor_i64(CM_I64, 1, &d, bv);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    int64_t e_add[5] = {p62 + 2, INT64_MAX, INT64_MIN, -5, 2 * p53 + 1};
    int64_t e_sub[5] = {p62, INT64_MIN + 1, INT64_MAX - 1, -13, 1};
    int64_t e_mul[5] = {p62 + 1, INT64_MIN, INT64_MAX, -36, 0};
    int64_t e_div[5] = {p62 + 1, INT64_MIN, INT64_MAX, -2, 1};
    int64_t e_neg[5] = {-(p62 + 1), INT64_MIN, -INT64_MAX, 9, -(p53 + 1)};
    /* (2^53+1) * 2^53 = 2^106 + 2^53 wraps to 2^53 */
    e_mul[4] = p53;
    for (int i = 0; i < 5; i++) {
      CHECK_MSG(geti(&val[add], i) == e_add[i], "add[%d]", i);
      CHECK_MSG(geti(&val[sub], i) == e_sub[i], "sub[%d]", i);
      CHECK_MSG(geti(&val[mul], i) == e_mul[i], "mul[%d]", i);
      CHECK_MSG(geti(&val[dv], i) == e_div[i], "div[%d]", i);
      CHECK_MSG(geti(&val[ng], i) == e_neg[i], "neg[%d]", i);
    }
    /* 2^53 vs 2^53 + 1 differ as ints (equal after a trip through double). */
    CHECK(geti(&val[lt], 4) == 1 && geti(&val[eq], 4) == 0);
    CHECK(geti(&val[lt], 0) == 1 && geti(&val[lt], 1) == 0);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

/* ---- cast -------------------------------------------------------------- */

static void test_cast_float_to_int(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 9;
  int x = cm_input(g, "x", CM_F64, 1, &d);
  int i32 = cm_cast(g, x, CM_I32, "i32"), i64 = cm_cast(g, x, CM_I64, "i64");
  int bl = cm_cast(g, x, CM_BOOL, "bl"), bf = cm_cast(g, x, CM_BF16, "bf");
  int back = cm_cast(g, bl, CM_F32, "back");
  double xs[9] = {2.7, -2.7, NAN, 1e10, -1e10, INFINITY, 1e19, -0.0, 1 + ldexp(1, -8)};
  cm_tensor tx = tensor_from(CM_F64, 1, &d, xs);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    int64_t e32[9] = {2, -2, 0, INT32_MAX, INT32_MIN, INT32_MAX, INT32_MAX, 0, 1};
    int64_t e64[9] = {2, -2, 0, 10000000000, -10000000000, INT64_MAX, INT64_MAX, 0, 1};
    int64_t ebool[9] = {1, 1, 1, 1, 1, 1, 1, 0, 1};
    for (int i = 0; i < 9; i++) {
      CHECK_MSG(geti(&val[i32], i) == e32[i], "i32[%d] = %lld", i, (long long)geti(&val[i32], i));
      CHECK_MSG(geti(&val[i64], i) == e64[i], "i64[%d]", i);
      CHECK_MSG(geti(&val[bl], i) == ebool[i], "bool[%d]", i);
      CHECK(get(&val[back], i) == (double)ebool[i]);
    }
    CHECK(val[bl].type.dtype == CM_BOOL && val[back].type.dtype == CM_F32);
    /* bf16: 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even is 1. */
    CHECK(get(&val[bf], 8) == 1.0);
    CHECK(get(&val[bf], 0) == 2.703125); /* 2.7 to 8 bits: 173/64 */
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

static void test_cast_int_to_float(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 5;
  int x = cm_input(g, "x", CM_I64, 1, &d);
  int f32 = cm_cast(g, x, CM_F32, "f32"), f64 = cm_cast(g, x, CM_F64, "f64");
  int i32 = cm_cast(g, x, CM_I32, "i32"), bl = cm_cast(g, x, CM_BOOL, "bl");
  int f16 = cm_cast(g, x, CM_F16, "f16");
  const int64_t p62 = INT64_C(1) << 62, p38 = INT64_C(1) << 38;
  /* 2^62 + 2^38 + 1 to f32 (24 bits, spacing 2^39): just above the midpoint, so
   * up to 2^62 + 2^39. Through double it would first lose the +1, tie, and go
   * down to 2^62: the oracle must round once. */
  int64_t xs[5] = {(INT64_C(1) << 24) + 1, (INT64_C(1) << 24) + 3, p62 + p38 + 1,
                   (INT64_C(1) << 32) + 5, 0};
  cm_tensor tx = tensor_i64(CM_I64, 1, &d, xs);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(get(&val[f32], 0) == 16777216.0);
    CHECK(get(&val[f32], 1) == 16777220.0);
    CHECK(get(&val[f32], 2) == ldexp(1, 62) + ldexp(1, 39));
    CHECK(get(&val[f64], 0) == 16777217.0);
    CHECK(geti(&val[i32], 3) == 5); /* i64 -> i32 keeps the low 32 bits */
    CHECK(geti(&val[bl], 3) == 1 && geti(&val[bl], 4) == 0);
    CHECK(isinf(get(&val[f16], 0)) && get(&val[f16], 4) == 0); /* f16 max is 65504 */
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

/* ---- comparisons and select -------------------------------------------- */

static void test_compare_select(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 4;
  int a = cm_input(g, "a", CM_F32, 1, &d), b = cm_input(g, "b", CM_F32, 1, &d);
  int lt = cm_binary(g, CM_OP_LT, a, b, "lt"), le = cm_binary(g, CM_OP_LE, a, b, "le");
  int eq = cm_binary(g, CM_OP_EQ, a, b, "eq"), ne = cm_binary(g, CM_OP_NE, a, b, "ne");
  int ba = cm_cast(g, a, CM_BOOL, "ba"), bb = cm_cast(g, b, CM_BOOL, "bb");
  int beq = cm_binary(g, CM_OP_EQ, ba, bb, "beq"), bne = cm_binary(g, CM_OP_NE, ba, bb, "bne");
  int sel = cm_select(g, lt, a, b, "sel");
  double av[4] = {1, 2, NAN, 0}, bv[4] = {2, 2, 1, NAN};
  cm_tensor ta = tensor_from(CM_F32, 1, &d, av), tb = tensor_from(CM_F32, 1, &d, bv);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    int64_t e_lt[4] = {1, 0, 0, 0}, e_le[4] = {1, 1, 0, 0}, e_eq[4] = {0, 1, 0, 0};
    int64_t e_ne[4] = {1, 0, 1, 1};
    /* bools: a = {T,T,T,F}, b = {T,T,T,T} */
    int64_t e_beq[4] = {1, 1, 1, 0};
    CHECK(val[lt].type.dtype == CM_BOOL);
    for (int i = 0; i < 4; i++) {
      CHECK_MSG(geti(&val[lt], i) == e_lt[i], "lt[%d]", i);
      CHECK_MSG(geti(&val[le], i) == e_le[i], "le[%d]", i);
      CHECK_MSG(geti(&val[eq], i) == e_eq[i], "eq[%d]", i);
      CHECK_MSG(geti(&val[ne], i) == e_ne[i], "ne[%d]", i);
      CHECK_MSG(geti(&val[beq], i) == e_beq[i], "beq[%d]", i);
      CHECK_MSG(geti(&val[bne], i) == 1 - e_beq[i], "bne[%d]", i);
    }
    CHECK(get(&val[sel], 0) == 1 && get(&val[sel], 1) == 2 && get(&val[sel], 2) == 1);
    CHECK(isnan(get(&val[sel], 3)));
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

/* ---- reductions -------------------------------------------------------- */

static void test_reduce_float(void) {
  cm_graph *g = cm_graph_new();
  int64_t dims[3] = {2, 3, 4};
  int x = cm_input(g, "x", CM_F64, 3, dims);
  int ax02[2] = {2, 0}, axm1[1] = {-1}, ax1[1] = {1}, all[3] = {0, 1, 2};
  int s02 = cm_reduce(g, CM_OP_REDUCE_SUM, x, 2, ax02, false, "s02");
  int s02k = cm_reduce(g, CM_OP_REDUCE_SUM, x, 2, ax02, true, "s02k");
  int slast = cm_reduce(g, CM_OP_REDUCE_SUM, x, 1, axm1, false, "slast");
  int m1 = cm_reduce(g, CM_OP_REDUCE_MAX, x, 1, ax1, false, "m1");
  int sall = cm_reduce(g, CM_OP_REDUCE_SUM, x, 3, all, false, "sall");
  int none = cm_reduce(g, CM_OP_REDUCE_SUM, x, 0, NULL, false, "none");
  /* The builder normalizes negative axes and sorts them. */
  CHECK(g->nodes[slast].attrs.axes[0] == 2);
  CHECK(g->nodes[s02].attrs.axes[0] == 0 && g->nodes[s02].attrs.axes[1] == 2);
  cm_tensor tx = tensor_rand(CM_F64, 3, dims);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(val[s02].type.rank == 1 && val[s02].type.dims[0] == 3);
    CHECK(val[s02k].type.rank == 3 && val[s02k].type.dims[0] == 1 && val[s02k].type.dims[1] == 3 &&
          val[s02k].type.dims[2] == 1);
    CHECK(val[sall].type.rank == 0);
    double total = 0;
    for (int j = 0; j < 3; j++) {
      double s = 0;
      for (int i = 0; i < 2; i++)
        for (int k = 0; k < 4; k++) s += get(&tx, (i * 3 + j) * 4 + k);
      CHECK_NEAR(get(&val[s02], j), s, 1e-14);
      CHECK_NEAR(get(&val[s02k], j), s, 1e-14);
      total += s;
    }
    CHECK_NEAR(get(&val[sall], 0), total, 1e-14);
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 3; j++) {
        double s = 0;
        for (int k = 0; k < 4; k++) s += get(&tx, (i * 3 + j) * 4 + k);
        CHECK_NEAR(get(&val[slast], i * 3 + j), s, 1e-14);
      }
    for (int i = 0; i < 2; i++)
      for (int k = 0; k < 4; k++) {
        double m = -INFINITY;
        for (int j = 0; j < 3; j++) m = fmax(m, get(&tx, (i * 3 + j) * 4 + k));
        CHECK(get(&val[m1], i * 4 + k) == m);
      }
    for (int i = 0; i < 24; i++) CHECK(get(&val[none], i) == get(&tx, i));
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

static void test_reduce_special(void) {
  cm_graph *g = cm_graph_new();
  int64_t d5 = 5, d2 = 2;
  int ax0[1] = {0};
  int f = cm_input(g, "f", CM_F32, 1, &d5);
  int fs = cm_reduce(g, CM_OP_REDUCE_SUM, f, 1, ax0, false, "fs");
  int fm = cm_reduce(g, CM_OP_REDUCE_MAX, f, 1, ax0, false, "fm");
  int i = cm_input(g, "i", CM_I32, 1, &d2);
  int is = cm_reduce(g, CM_OP_REDUCE_SUM, i, 1, ax0, false, "is");
  int l = cm_input(g, "l", CM_I64, 1, &d2);
  int lm = cm_reduce(g, CM_OP_REDUCE_MAX, l, 1, ax0, false, "lm");
  int ls = cm_reduce(g, CM_OP_REDUCE_SUM, l, 1, ax0, false, "ls");
  /* Summed one by one in f32, each 2^-25 would vanish against 1; in f64 the
   * four add up to 2^-23, which f32 holds. */
  double fv[5] = {1, ldexp(1, -25), ldexp(1, -25), ldexp(1, -25), ldexp(1, -25)};
  int64_t iv[2] = {INT32_MAX, 1};
  const int64_t p62 = INT64_C(1) << 62;
  int64_t lv[2] = {p62, p62 + 1};
  cm_tensor tf = tensor_from(CM_F32, 1, &d5, fv), ti = tensor_i64(CM_I32, 1, &d2, iv);
  cm_tensor tl = tensor_i64(CM_I64, 1, &d2, lv);
  const cm_tensor *src[MAXN] = {0};
  src[f] = &tf, src[i] = &ti, src[l] = &tl;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(get(&val[fs], 0) == 1 + ldexp(1, -23));
    CHECK(get(&val[fm], 0) == 1);
    CHECK(geti(&val[is], 0) == INT32_MIN);
    CHECK(geti(&val[lm], 0) == p62 + 1);
    CHECK(geti(&val[ls], 0) == INT64_MIN + 1); /* 2^63 + 1 wraps */
    free_values(val, g->n_nodes);
  }
  cm_tensor_set_f64(&tf, 2, NAN);
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(isnan(get(&val[fm], 0)));
    CHECK(isnan(get(&val[fs], 0)));
    free_values(val, g->n_nodes);
  }
  cm_tensor_free(&tf);
  cm_tensor_free(&ti);
  cm_tensor_free(&tl);
  cm_graph_free(g);
}

/* ---- movement ---------------------------------------------------------- */

static void test_broadcast_reshape(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {3, 1, 5}, bd[4] = {2, 3, 4, 5}, one = 1, seven = 7, sq[2] = {2, 2};
  int64_t rd[2] = {5, 3};
  int x = cm_input(g, "x", CM_F32, 3, xd);
  int bx = cm_broadcast(g, x, 4, bd, "bx");
  int s = cm_input(g, "s", CM_F32, 1, &one);
  int bs = cm_broadcast(g, s, 1, &seven, "bs");
  int sc = cm_input(g, "sc", CM_I32, 0, NULL);
  int bsc = cm_broadcast(g, sc, 2, sq, "bsc");
  int rx = cm_reshape(g, x, 2, rd, "rx");
  cm_tensor tx = tensor_rand(CM_F32, 3, xd), ts = tensor_rand(CM_F32, 1, &one);
  int64_t scv = -42;
  cm_tensor tsc = tensor_i64(CM_I32, 0, NULL, &scv);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx, src[s] = &ts, src[sc] = &tsc;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    for (int a = 0; a < 2; a++)
      for (int b = 0; b < 3; b++)
        for (int c = 0; c < 4; c++)
          for (int e = 0; e < 5; e++)
            CHECK(get(&val[bx], ((a * 3 + b) * 4 + c) * 5 + e) == get(&tx, b * 5 + e));
    for (int k = 0; k < 7; k++) CHECK(get(&val[bs], k) == get(&ts, 0));
    for (int k = 0; k < 4; k++) CHECK(geti(&val[bsc], k) == -42);
    CHECK(val[rx].type.dims[0] == 5 && val[rx].type.dims[1] == 3);
    for (int k = 0; k < 15; k++) CHECK(get(&val[rx], k) == get(&tx, k));
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_tensor_free(&ts);
  cm_tensor_free(&tsc);
  cm_graph_free(g);
}

static void test_permute(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[4] = {2, 3, 4, 5};
  int perm[4] = {2, 0, 3, 1};
  int x = cm_input(g, "x", CM_F64, 4, xd);
  int p = cm_permute(g, x, perm, "p");
  cm_tensor tx = tensor_rand(CM_F64, 4, xd);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    const cm_type *t = &val[p].type;
    CHECK(t->dims[0] == 4 && t->dims[1] == 2 && t->dims[2] == 5 && t->dims[3] == 3);
    /* y[i0,i1,i2,i3] = x[i1, i3, i0, i2] */
    for (int i0 = 0; i0 < 4; i0++)
      for (int i1 = 0; i1 < 2; i1++)
        for (int i2 = 0; i2 < 5; i2++)
          for (int i3 = 0; i3 < 3; i3++)
            CHECK(get(&val[p], ((i0 * 2 + i1) * 5 + i2) * 3 + i3) ==
                  get(&tx, ((i1 * 3 + i3) * 4 + i0) * 5 + i2));
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

static void test_slice_step(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {7, 5}, start[2] = {1, 0}, stop[2] = {7, 5}, step[2] = {2, 3};
  int64_t start2[2] = {2, 1}, stop2[2] = {3, 4};
  int x = cm_input(g, "x", CM_F32, 2, xd);
  int s = cm_slice(g, x, start, stop, step, "s");
  int s2 = cm_slice(g, x, start2, stop2, NULL, "s2");
  cm_tensor tx = tensor_rand(CM_F32, 2, xd);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(val[s].type.dims[0] == 3 && val[s].type.dims[1] == 2);
    for (int i = 0; i < 3; i++)
      for (int j = 0; j < 2; j++)
        CHECK(get(&val[s], i * 2 + j) == get(&tx, (1 + 2 * i) * 5 + 3 * j));
    CHECK(val[s2].type.dims[0] == 1 && val[s2].type.dims[1] == 3);
    for (int j = 0; j < 3; j++) CHECK(get(&val[s2], j) == get(&tx, 2 * 5 + 1 + j));
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

static void test_concat3(void) {
  cm_graph *g = cm_graph_new();
  int64_t d0[3] = {2, 1, 3}, d1[3] = {2, 2, 3}, d2[3] = {2, 3, 3};
  int xs[3] = {cm_input(g, "x0", CM_F32, 3, d0), cm_input(g, "x1", CM_F32, 3, d1),
               cm_input(g, "x2", CM_F32, 3, d2)};
  int c = cm_concat(g, 3, xs, 1, "c");
  cm_tensor t0 = tensor_rand(CM_F32, 3, d0), t1 = tensor_rand(CM_F32, 3, d1);
  cm_tensor t2 = tensor_rand(CM_F32, 3, d2);
  const cm_tensor *src[MAXN] = {0};
  src[xs[0]] = &t0, src[xs[1]] = &t1, src[xs[2]] = &t2;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(val[c].type.dims[1] == 6);
    for (int a = 0; a < 2; a++)
      for (int b = 0; b < 6; b++)
        for (int e = 0; e < 3; e++) {
          double want = b < 1   ? get(&t0, (a * 1 + b) * 3 + e)
                        : b < 3 ? get(&t1, (a * 2 + b - 1) * 3 + e)
                                : get(&t2, (a * 3 + b - 3) * 3 + e);
          CHECK(get(&val[c], (a * 6 + b) * 3 + e) == want);
        }
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&t0);
  cm_tensor_free(&t1);
  cm_tensor_free(&t2);
  cm_graph_free(g);
}

static void test_pad(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {2, 3}, lo[2] = {1, 0}, hi[2] = {0, 2};
  int x = cm_input(g, "x", CM_F32, 2, xd);
  int p = cm_pad(g, x, lo, hi, 7.5, "p");
  int xi = cm_input(g, "xi", CM_I32, 2, xd);
  int pi = cm_pad(g, xi, hi, lo, -3, "pi");
  double xv[6] = {1, 2, 3, 4, 5, 6};
  int64_t iv[6] = {1, 2, 3, 4, 5, 6};
  cm_tensor tx = tensor_from(CM_F32, 2, xd, xv), ti = tensor_i64(CM_I32, 2, xd, iv);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx, src[xi] = &ti;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    double want[15] = {7.5, 7.5, 7.5, 7.5, 7.5, 1, 2, 3, 7.5, 7.5, 4, 5, 6, 7.5, 7.5};
    CHECK(val[p].type.dims[0] == 3 && val[p].type.dims[1] == 5);
    for (int k = 0; k < 15; k++) CHECK_MSG(get(&val[p], k) == want[k], "pad[%d]", k);
    /* lo {0,2}, hi {1,0}: [3, 5] */
    int64_t wi[15] = {-3, -3, 1, 2, 3, -3, -3, 4, 5, 6, -3, -3, -3, -3, -3};
    for (int k = 0; k < 15; k++) CHECK_MSG(geti(&val[pi], k) == wi[k], "pad_i[%d]", k);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tx);
  cm_tensor_free(&ti);
  cm_graph_free(g);
}

static void test_gather_scatter(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {2, 5, 3}, id[3] = {2, 4, 3};
  int x = cm_input(g, "x", CM_F64, 3, xd);
  int idx = cm_input(g, "idx", CM_I32, 3, id);
  int upd = cm_input(g, "upd", CM_F64, 3, id);
  int ga = cm_gather(g, x, idx, 1, "ga");
  int sa = cm_scatter_add(g, x, idx, upd, 1, "sa");
  cm_tensor tx = tensor_rand(CM_F64, 3, xd), tu = tensor_rand(CM_F64, 3, id);
  int64_t iv[24];
  for (int k = 0; k < 24; k++) iv[k] = (int64_t)((rnd() + 1) * 2.5) % 5;
  iv[0] = iv[3] = 4; /* a repeated index along axis 1 accumulates */
  cm_tensor ti = tensor_i64(CM_I32, 3, id, iv);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx, src[idx] = &ti, src[upd] = &tu;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    double want[30];
    for (int k = 0; k < 30; k++) want[k] = get(&tx, k);
    for (int a = 0; a < 2; a++)
      for (int i = 0; i < 4; i++)
        for (int c = 0; c < 3; c++) {
          int k = (a * 4 + i) * 3 + c;
          CHECK(get(&val[ga], k) == get(&tx, (a * 5 + iv[k]) * 3 + c));
          want[(a * 5 + iv[k]) * 3 + c] += get(&tu, k);
        }
    for (int k = 0; k < 30; k++) CHECK_NEAR(get(&val[sa], k), want[k], 1e-15);
    free_values(val, g->n_nodes);
  }
  /* Out of range: an error naming the node and the index position. */
  cm_tensor_set_i64(&ti, (1 * 4 + 2) * 3 + 0, 7);
  cm_err err = {0};
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[3] \"ga\" (gather): index 7 at [1,2,0] outside [0, 5)");
  CHECK(all_values_freed(val, g->n_nodes));
  cm_tensor_set_i64(&ti, (1 * 4 + 2) * 3 + 0, 0);
  cm_tensor_set_i64(&ti, 1, -1);
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "index -1 at [0,0,1] outside [0, 5)");
  CHECK(all_values_freed(val, g->n_nodes));
  cm_tensor_free(&tx);
  cm_tensor_free(&tu);
  cm_tensor_free(&ti);
  cm_graph_free(g);

  /* scatter_add alone hits its own check. */
  g = cm_graph_new();
  int64_t bd = 3, kd = 2;
  int base = cm_input(g, "base", CM_I64, 1, &bd), ix = cm_input(g, "ix", CM_I64, 1, &kd);
  int up = cm_input(g, "up", CM_I64, 1, &kd);
  int sc = cm_scatter_add(g, base, ix, up, 0, "sc");
  int64_t bv[3] = {10, 20, 30}, xv[2] = {2, 2}, uv[2] = {INT64_MAX, 3};
  cm_tensor tb = tensor_i64(CM_I64, 1, &bd, bv), tix = tensor_i64(CM_I64, 1, &kd, xv);
  cm_tensor tup = tensor_i64(CM_I64, 1, &kd, uv);
  const cm_tensor *src2[MAXN] = {0};
  src2[base] = &tb, src2[ix] = &tix, src2[up] = &tup;
  if (run_ok(g, src2, val, CM_PRECISION_NATIVE)) {
    CHECK(geti(&val[sc], 0) == 10 && geti(&val[sc], 1) == 20);
    CHECK(geti(&val[sc], 2) == INT64_MIN + 32); /* 30 + (2^63 - 1) + 3 wraps */
    free_values(val, g->n_nodes);
  }
  cm_tensor_set_i64(&tix, 1, 3);
  CHECK(run(g, src2, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[3] \"sc\" (scatter_add): index 3 at [1] outside [0, 3)");
  CHECK(all_values_freed(val, g->n_nodes));
  cm_tensor_free(&tb);
  cm_tensor_free(&tix);
  cm_tensor_free(&tup);
  cm_graph_free(g);
}

/* ---- contractions ------------------------------------------------------ */

static void test_matmul_transposes(void) {
  const int M = 3, K = 4, N = 5;
  for (int combo = 0; combo < 4; combo++) {
    bool ta = combo & 1, tb = combo & 2;
    cm_graph *g = cm_graph_new();
    int64_t ad[2] = {ta ? K : M, ta ? M : K}, bd[2] = {tb ? N : K, tb ? K : N};
    int a = cm_input(g, "a", CM_F64, 2, ad), b = cm_input(g, "b", CM_F64, 2, bd);
    int c = cm_matmul(g, a, b, ta, tb, "c");
    cm_tensor at = tensor_rand(CM_F64, 2, ad), bt = tensor_rand(CM_F64, 2, bd);
    const cm_tensor *src[MAXN] = {0};
    src[a] = &at, src[b] = &bt;
    cm_tensor val[MAXN];
    if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
      CHECK(val[c].type.dims[0] == M && val[c].type.dims[1] == N);
      for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
          double s = 0;
          for (int k = 0; k < K; k++)
            s += get(&at, ta ? k * M + m : m * K + k) * get(&bt, tb ? n * K + k : k * N + n);
          CHECK_NEAR(get(&val[c], m * N + n), s, 1e-14);
        }
      free_values(val, g->n_nodes);
    }
    cm_tensor_free(&at);
    cm_tensor_free(&bt);
    cm_graph_free(g);
  }
}

static void test_matmul_batch_broadcast(void) {
  cm_graph *g = cm_graph_new();
  /* rank 2 against rank 4: a [3,4] @ b [2,3,4,5] -> [2,3,3,5] */
  int64_t ad[2] = {3, 4}, bd[4] = {2, 3, 4, 5};
  /* size-1 batch axes: p [2,1,3,4] @ q^T with q [5,6,4] -> [2,5,3,6] */
  int64_t pd[4] = {2, 1, 3, 4}, qd[3] = {5, 6, 4};
  int a = cm_input(g, "a", CM_F64, 2, ad), b = cm_input(g, "b", CM_F64, 4, bd);
  int p = cm_input(g, "p", CM_F64, 4, pd), q = cm_input(g, "q", CM_F64, 3, qd);
  int ab = cm_matmul(g, a, b, false, false, "ab");
  int pq = cm_matmul(g, p, q, false, true, "pq");
  cm_tensor at = tensor_rand(CM_F64, 2, ad), bt = tensor_rand(CM_F64, 4, bd);
  cm_tensor pt = tensor_rand(CM_F64, 4, pd), qt = tensor_rand(CM_F64, 3, qd);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &at, src[b] = &bt, src[p] = &pt, src[q] = &qt;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    const cm_type *t = &val[ab].type;
    CHECK(t->rank == 4 && t->dims[0] == 2 && t->dims[1] == 3 && t->dims[2] == 3 && t->dims[3] == 5);
    for (int z0 = 0; z0 < 2; z0++)
      for (int z1 = 0; z1 < 3; z1++)
        for (int m = 0; m < 3; m++)
          for (int n = 0; n < 5; n++) {
            double s = 0;
            for (int k = 0; k < 4; k++)
              s += get(&at, m * 4 + k) * get(&bt, ((z0 * 3 + z1) * 4 + k) * 5 + n);
            CHECK_NEAR(get(&val[ab], ((z0 * 3 + z1) * 3 + m) * 5 + n), s, 1e-14);
          }
    t = &val[pq].type;
    CHECK(t->rank == 4 && t->dims[0] == 2 && t->dims[1] == 5 && t->dims[2] == 3 && t->dims[3] == 6);
    for (int z0 = 0; z0 < 2; z0++)
      for (int z1 = 0; z1 < 5; z1++)
        for (int m = 0; m < 3; m++)
          for (int n = 0; n < 6; n++) {
            double s = 0;
            for (int k = 0; k < 4; k++)
              s += get(&pt, (z0 * 3 + m) * 4 + k) * get(&qt, (z1 * 6 + n) * 4 + k);
            CHECK_NEAR(get(&val[pq], ((z0 * 5 + z1) * 3 + m) * 6 + n), s, 1e-14);
          }
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&at);
  cm_tensor_free(&bt);
  cm_tensor_free(&pt);
  cm_tensor_free(&qt);
  cm_graph_free(g);
}

static void test_matmul_int(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {2, 2};
  int a = cm_input(g, "a", CM_I64, 2, d), b = cm_input(g, "b", CM_I64, 2, d);
  int c = cm_matmul(g, a, b, false, false, "c");
  int64_t av[4] = {1, 2, 3, 4}, bv[4] = {5, 6, 7, INT64_C(1) << 60};
  cm_tensor at = tensor_i64(CM_I64, 2, d, av), bt = tensor_i64(CM_I64, 2, d, bv);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &at, src[b] = &bt;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    CHECK(geti(&val[c], 0) == 19 && geti(&val[c], 2) == 43);
    CHECK(geti(&val[c], 1) == 6 + (INT64_C(1) << 61));
    CHECK(geti(&val[c], 3) == 18 + (INT64_C(1) << 62));
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&at);
  cm_tensor_free(&bt);
  cm_graph_free(g);
}

/* Direct formula of docs/ops.md for conv2d, over f64 arrays. */
static double conv_ref(const cm_tensor *x, const cm_tensor *w, int n, int o, int i, int j,
                       const int s[2], const int p[2], const int dl[2], int groups) {
  int64_t C = x->type.dims[1], H = x->type.dims[2], W = x->type.dims[3];
  int64_t O = w->type.dims[0], Cg = w->type.dims[1], KH = w->type.dims[2], KW = w->type.dims[3];
  int64_t grp = o / (O / groups);
  double sum = 0;
  for (int c = 0; c < Cg; c++)
    for (int u = 0; u < KH; u++)
      for (int v = 0; v < KW; v++) {
        int64_t h = i * s[0] - p[0] + u * dl[0], ww = j * s[1] - p[1] + v * dl[1];
        if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
        sum += get(x, ((n * C + grp * Cg + c) * H + h) * W + ww) *
               get(w, ((o * Cg + c) * KH + u) * KW + v);
      }
  return sum;
}

static void check_conv(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t KH,
                       int64_t KW, const int s[2], const int p[2], const int dl[2], int groups,
                       int64_t OH, int64_t OW) {
  cm_graph *g = cm_graph_new();
  int64_t xd[4] = {N, C, H, W}, wd[4] = {O, C / groups, KH, KW};
  int x = cm_input(g, "x", CM_F64, 4, xd), w = cm_input(g, "w", CM_F64, 4, wd);
  int y = cm_conv2d(g, x, w, s, p, dl, groups, "y");
  cm_tensor xt = tensor_rand(CM_F64, 4, xd), wt = tensor_rand(CM_F64, 4, wd);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &xt, src[w] = &wt;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    const cm_type *t = &val[y].type;
    CHECK(t->dims[0] == N && t->dims[1] == O && t->dims[2] == OH && t->dims[3] == OW);
    for (int n = 0; n < N; n++)
      for (int o = 0; o < O; o++)
        for (int i = 0; i < OH; i++)
          for (int j = 0; j < OW; j++)
            CHECK_NEAR(get(&val[y], ((n * O + o) * OH + i) * OW + j),
                       conv_ref(&xt, &wt, n, o, i, j, s, p, dl, groups), 1e-14);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&xt);
  cm_tensor_free(&wt);
  cm_graph_free(g);
}

static void test_conv2d(void) {
  int s[2] = {2, 1}, p[2] = {1, 2}, dl[2] = {2, 1};
  /* OH = (7 + 2 - 2*2 - 1)/2 + 1 = 3, OW = (6 + 4 - 1 - 1)/1 + 1 = 9 */
  check_conv(2, 4, 7, 6, 6, 3, 2, s, p, dl, 2, 3, 9);
  int s1[2] = {1, 1}, p1[2] = {1, 1}, d1[2] = {1, 1};
  check_conv(1, 3, 5, 5, 3, 3, 3, s1, p1, d1, 3, 5, 5); /* depthwise */
  check_conv(1, 3, 5, 5, 6, 3, 3, s1, p1, d1, 3, 5, 5); /* depthwise, multiplier 2 */
  int p0[2] = {0, 0};
  check_conv(3, 2, 5, 3, 1, 2, 1, s1, p0, d1, 1, 4, 3); /* plain, odd shapes */
}

/* The same hand-checkable case for depthwise conv: one channel of 3x3 ones on
 * a 3x3 ramp with padding 1 gives the 3x3 neighbourhood sums. */
static void test_conv2d_by_hand(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[4] = {1, 2, 3, 3}, wd[4] = {2, 1, 3, 3};
  int x = cm_input(g, "x", CM_F32, 4, xd);
  int w = cm_const_fill(g, "w", CM_F32, 4, wd, 1.0);
  int p[2] = {1, 1};
  int y = cm_conv2d(g, x, w, NULL, p, NULL, 2, "y");
  double xv[18];
  for (int k = 0; k < 18; k++) xv[k] = k < 9 ? k + 1 : -(k - 8);
  cm_tensor xt = tensor_from(CM_F32, 4, xd, xv);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &xt;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    /* ramp 1..9: corner sums 12, 16, 24, 28, edge sums 21, 27, 33, 39, centre 45 */
    double want[9] = {12, 21, 16, 27, 45, 33, 24, 39, 28};
    for (int k = 0; k < 9; k++) {
      CHECK_MSG(get(&val[y], k) == want[k], "y[%d] = %g", k, get(&val[y], k));
      CHECK(get(&val[y], 9 + k) == -want[k]);
    }
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&xt);
  cm_graph_free(g);
}

static int conv_grad_node(cm_graph *g, cm_op op, int a, int b, int rank, const int64_t *shape,
                          const int s[2], const int p[2], const int dl[2], int groups,
                          const char *name) {
  cm_attrs at;
  cm_attrs_default(&at);
  at.rank = rank;
  for (int k = 0; k < rank; k++) at.shape[k] = shape[k];
  for (int k = 0; k < 2; k++) at.stride[k] = s[k], at.padding[k] = p[k], at.dilation[k] = dl[k];
  at.groups = groups;
  int in[2] = {a, b};
  cm_err err = {0};
  int id = cm_graph_add(g, op, name, in, 2, &at, &err);
  CHECK_MSG(id >= 0, "%s", err.msg);
  return id;
}

static double dot(const cm_tensor *a, const cm_tensor *b) {
  double s = 0;
  for (int64_t i = 0; i < cm_type_numel(&a->type); i++) s += get(a, i) * get(b, i);
  return s;
}

/* <conv2d(x, w), dy> == <x, grad_input(dy, w)> == <w, grad_weight(x, dy)> */
static void test_conv_adjoint(void) {
  int s[2] = {2, 2}, p[2] = {1, 2}, dl[2] = {2, 1}, groups = 2;
  cm_graph *g = cm_graph_new();
  int64_t xd[4] = {2, 4, 7, 8}, wd[4] = {6, 2, 3, 3};
  int x = cm_input(g, "x", CM_F32, 4, xd), w = cm_input(g, "w", CM_F32, 4, wd);
  int y = cm_conv2d(g, x, w, s, p, dl, groups, "y");
  const cm_type yt = g->nodes[y].type;
  int dy = cm_input(g, "dy", CM_F32, 4, yt.dims);
  int gi = conv_grad_node(g, CM_OP_CONV2D_GRAD_INPUT, dy, w, 4, xd, s, p, dl, groups, "gi");
  int gw = conv_grad_node(g, CM_OP_CONV2D_GRAD_WEIGHT, x, dy, 4, wd, s, p, dl, groups, "gw");
  /* OH = (7 + 2 - 4 - 1)/2 + 1 = 3, OW = (8 + 4 - 2 - 1)/2 + 1 = 5 */
  CHECK(yt.dims[0] == 2 && yt.dims[1] == 6 && yt.dims[2] == 3 && yt.dims[3] == 5);
  cm_tensor xt = tensor_rand(CM_F32, 4, xd), wt = tensor_rand(CM_F32, 4, wd);
  cm_tensor dyt = tensor_rand(CM_F32, 4, yt.dims);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &xt, src[w] = &wt, src[dy] = &dyt;
  cm_tensor val[MAXN];
  if (gi >= 0 && gw >= 0 && run_ok(g, src, val, CM_PRECISION_F64)) {
    double a = dot(&val[y], &dyt), b = dot(&xt, &val[gi]), c = dot(&wt, &val[gw]);
    CHECK(fabs(a) > 1e-3); /* not trivially zero */
    CHECK_NEAR(b, a, 1e-12);
    CHECK_NEAR(c, a, 1e-12);
    CHECK(val[gi].type.dtype == CM_F64 && val[gi].type.dims[3] == 8);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&xt);
  cm_tensor_free(&wt);
  cm_tensor_free(&dyt);
  cm_graph_free(g);
}

/* ---- sources, const, iota, assign, collectives ------------------------- */

static void test_sources_errors(void) {
  cm_graph *g = cm_graph_new();
  int64_t d4 = 4, d3 = 3;
  int x = cm_input(g, "x", CM_F32, 1, &d4);
  int pp = cm_state(g, "p", CM_I32, 1, &d4, (cm_init){CM_INIT_ZEROS, 0, 0});
  int s = cm_cast(g, pp, CM_F32, "s");
  cm_binary(g, CM_OP_ADD, x, s, "y");
  cm_tensor val[MAXN];
  cm_err err = {0};
  const cm_tensor *src[MAXN] = {0};
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[0] \"x\" (input): no value given");
  CHECK(all_values_freed(val, g->n_nodes));
  CHECK(run(g, NULL, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  cm_tensor t3 = tensor_rand(CM_F32, 1, &d3), t4 = tensor_rand(CM_F32, 1, &d4);
  cm_tensor t4d = tensor_rand(CM_F64, 1, &d4), t4b = tensor_rand(CM_BF16, 1, &d4);
  int64_t pv[4] = {1, 2, 3, 4};
  cm_tensor pi = tensor_i64(CM_I32, 1, &d4, pv), pl = tensor_i64(CM_I64, 1, &d4, pv);
  src[x] = &t3;
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[0] \"x\" (input): given f32[3] but the node is f32[4]");
  src[x] = &t4;
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[1] \"p\" (state): no value given");
  CHECK(all_values_freed(val, g->n_nodes));
  src[pp] = &pl; /* wrong int dtype: never accepted */
  CHECK(run(g, src, val, CM_PRECISION_F64, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[1] \"p\" (state): given i64[4] but the node is i32[4]");
  src[pp] = &pi;
  src[x] = &t4d; /* f64 for an f32 node: only in F64 precision */
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "given f64[4] but the node is f32[4]");
  if (run_ok(g, src, val, CM_PRECISION_F64)) {
    for (int i = 0; i < 4; i++) CHECK(get(&val[3], i) == get(&t4d, i) + (i + 1));
    free_values(val, g->n_nodes);
  }
  src[x] = &t4b;
  if (run_ok(g, src, val, CM_PRECISION_F64)) {
    CHECK(val[0].type.dtype == CM_F64 && val[1].type.dtype == CM_I32);
    for (int i = 0; i < 4; i++) CHECK(get(&val[0], i) == get(&t4b, i));
    free_values(val, g->n_nodes);
  }
  cm_tensor_free(&t3);
  cm_tensor_free(&t4);
  cm_tensor_free(&t4d);
  cm_tensor_free(&t4b);
  cm_tensor_free(&pi);
  cm_tensor_free(&pl);
  cm_graph_free(g);
}

static void test_const_iota(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {2, 3};
  double data[6] = {1.5, -2, 0.1, 4, 1e-3, 6};
  int cd = cm_const_data(g, "cd", CM_F32, 2, d, data);
  int cf = cm_const_fill(g, "cf", CM_I32, 2, d, -3);
  int cs = cm_const_scalar(g, "cs", CM_BF16, 0.1);
  int i1 = cm_iota(g, "i1", CM_I32, 2, d, 1);
  int i0 = cm_iota(g, "i0", CM_F32, 2, d, 0);
  double bits[6] = {1, 0, 1, 1, 0, 0};
  int cb = cm_const_data(g, "cb", CM_BOOL, 2, d, bits);
  cm_tensor val[MAXN];
  const cm_tensor *src[MAXN] = {0};
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    for (int k = 0; k < 6; k++) {
      CHECK(get(&val[cd], k) == (float)data[k]);
      CHECK(geti(&val[cf], k) == -3);
      CHECK(geti(&val[i1], k) == k % 3);
      CHECK(get(&val[i0], k) == k / 3);
      CHECK(geti(&val[cb], k) == (int64_t)bits[k]);
    }
    CHECK(get(&val[cs], 0) == 0.10009765625); /* 0.1 in bf16 */
    free_values(val, g->n_nodes);
  }
  if (run_ok(g, src, val, CM_PRECISION_F64)) {
    CHECK(get(&val[cd], 2) == 0.1 && get(&val[cs], 0) == 0.1);
    free_values(val, g->n_nodes);
  }
  cm_graph_free(g);
}

static void test_assign_stop_gradient(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 3;
  int p = cm_param(g, "p", CM_F32, 1, &d, (cm_init){CM_INIT_ZEROS, 0, 0});
  int one = cm_const_fill(g, "one", CM_F32, 1, &d, 1);
  int np = cm_binary(g, CM_OP_ADD, p, one, "np");
  int as = cm_assign(g, p, np, "as");
  int after = cm_binary(g, CM_OP_MUL, p, p, "after"); /* reads the old value */
  int sg = cm_unary(g, CM_OP_STOP_GRADIENT, np, "sg");
  double pv[3] = {1, 2, 3};
  cm_tensor tp = tensor_from(CM_F32, 1, &d, pv);
  const cm_tensor *src[MAXN] = {0};
  src[p] = &tp;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    for (int i = 0; i < 3; i++) {
      CHECK(get(&val[as], i) == pv[i] + 1);
      CHECK(get(&val[sg], i) == pv[i] + 1);
      CHECK(get(&val[after], i) == pv[i] * pv[i]);
      CHECK(get(&tp, i) == pv[i]); /* nothing written into sources */
    }
    CHECK(val[as].data != val[np].data);
  }
  free_values(val, g->n_nodes);
  cm_tensor_free(&tp);
  cm_graph_free(g);
}

static void test_collectives(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {2, 3};
  int x = cm_input(g, "x", CM_F32, 2, d);
  int s = cm_all_reduce(g, x, CM_MODE_SUM, 1, "s");
  int m = cm_all_reduce(g, x, CM_MODE_MEAN, 1, "m");
  int ag = cm_all_gather(g, x, 1, 1, "ag");
  cm_tensor tx = tensor_rand(CM_F32, 2, d);
  const cm_tensor *src[MAXN] = {0};
  src[x] = &tx;
  cm_tensor val[MAXN];
  if (run_ok(g, src, val, CM_PRECISION_NATIVE)) {
    for (int i = 0; i < 6; i++) {
      CHECK(get(&val[s], i) == get(&tx, i));
      CHECK(get(&val[m], i) == get(&tx, i));
      CHECK(get(&val[ag], i) == get(&tx, i));
    }
    free_values(val, g->n_nodes);
  }
  int r2 = cm_all_gather(g, x, 0, 2, "r2");
  CHECK(r2 >= 0);
  cm_err err = {0};
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[4] \"r2\" (all_gather)");
  CHECK_STR_CONTAINS(err.msg, "cm_eval evaluates one rank (cm_eval_ranks evaluates a group");
  CHECK(all_values_freed(val, g->n_nodes));
  cm_tensor_free(&tx);
  cm_graph_free(g);

  g = cm_graph_new();
  x = cm_input(g, "x", CM_F32, 2, d);
  cm_all_reduce(g, x, CM_MODE_MEAN, 8, "ar");
  tx = tensor_rand(CM_F32, 2, d);
  src[x] = &tx;
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[1] \"ar\" (all_reduce)");
  CHECK_STR_CONTAINS(err.msg, "ranks is 8: cm_eval evaluates one rank");
  cm_tensor_free(&tx);
  cm_graph_free(g);
}

/* An unverified graph with a wrong input count or type must not be read out
 * of bounds: the oracle refuses it with CM_EINTERNAL. */
static void test_malformed_graph(void) {
  cm_graph *g = cm_graph_new();
  int64_t d = 3, d4 = 4;
  int a = cm_input(g, "a", CM_F32, 1, &d), b = cm_input(g, "b", CM_F32, 1, &d);
  int c = cm_binary(g, CM_OP_ADD, a, b, "c");
  cm_tensor ta = tensor_rand(CM_F32, 1, &d), tb = tensor_rand(CM_F32, 1, &d);
  const cm_tensor *src[MAXN] = {0};
  src[a] = &ta, src[b] = &tb;
  cm_tensor val[MAXN];
  cm_err err = {0};
  g->nodes[c].n_inputs = 1;
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINTERNAL);
  CHECK_STR_CONTAINS(err.msg, "nodes[2] \"c\" (add)");
  CHECK(all_values_freed(val, g->n_nodes));
  g->nodes[c].n_inputs = 2;
  g->nodes[c].inputs[1] = 2; /* itself: not an earlier node */
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINTERNAL);
  g->nodes[c].inputs[1] = b;
  g->nodes[c].type.dims[0] = 4; /* a stored type that inference disagrees with */
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINTERNAL);
  g->nodes[c].type.dims[0] = 3;
  g->nodes[b].type = cm_type_make(CM_F32, 1, &d4);
  CHECK(run(g, src, val, CM_PRECISION_NATIVE, &err) == CM_EINTERNAL); /* b's attrs say [3] */
  CHECK_STR_CONTAINS(err.msg, "nodes[1] \"b\" (input)");
  CHECK(all_values_freed(val, g->n_nodes));
  cm_tensor_free(&ta);
  cm_tensor_free(&tb);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_unary_float), TEST(test_unary_special_values), TEST(test_binary_float),
          TEST(test_max_min_nan), TEST(test_precision_f32), TEST(test_precision_16bit),
          TEST(test_int32_arith), TEST(test_int64_arith), TEST(test_cast_float_to_int),
          TEST(test_cast_int_to_float), TEST(test_compare_select), TEST(test_reduce_float),
          TEST(test_reduce_special), TEST(test_broadcast_reshape), TEST(test_permute),
          TEST(test_slice_step), TEST(test_concat3), TEST(test_pad), TEST(test_gather_scatter),
          TEST(test_matmul_transposes), TEST(test_matmul_batch_broadcast), TEST(test_matmul_int),
          TEST(test_conv2d), TEST(test_conv2d_by_hand), TEST(test_conv_adjoint),
          TEST(test_sources_errors), TEST(test_const_iota), TEST(test_assign_stop_gradient),
          TEST(test_collectives), TEST(test_malformed_graph))
