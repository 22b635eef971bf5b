/* tests/testlib.h — what the tests share to make random data: ONE random
 * generator (test_rng) and ONE random-graph generator, used at two grains.
 *
 * test_rng is a 64-bit linear congruential generator (Knuth's MMIX constants,
 * as in PCG): state' = state * 6364136223846793005 + 1442695040888963407, and
 * a uniform double from the top 53 bits of the new state. It is the generator
 * most tests had each defined for themselves, so a test moved onto it draws
 * the same stream from the same seed. It is for test data only: fast, seeded,
 * reproducible, not cryptographic. Seed it by value (test_rng r = {seed}); the
 * stream of a seed never changes (tests depend on it).
 *
 * The random-graph generator:
 *  - by blocks (test_random_block, test_random_graph): independent small
 *    graphs of the kinds every backend must handle (elementwise, movement,
 *    reductions, batched/transposed matmul with bias, conv2d incl. depthwise,
 *    stride and padding, state updates), each with one output: the backend
 *    tests (test_cpu_exec, test_backend) compare them with the oracle;
 *  - op by op (test_random_op over a test_pool): one connected graph of 2-D
 *    values, for the pass tests (test_fuse, test_plan with collectives,
 *    test_passes with redundancy) and finite differences (test_autodiff). */
#ifndef CMAEC_TESTLIB_H
#define CMAEC_TESTLIB_H

#include "test.h"
#include "ir/ir.h"

#include <dirent.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* rm -rf dir (a test's scratch folder; symbolic links are removed, not followed). */
static inline void test_remove_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  char p[1024];
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    struct stat st;
    if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
      test_remove_tree(p);
    else
      unlink(p);
  }
  closedir(d);
  rmdir(dir);
}

typedef struct {
  uint64_t s;
} test_rng;

/* The next raw state (its low bits are weak: use the helpers below). */
static inline uint64_t test_rng_next(test_rng *r) {
  r->s = r->s * 6364136223846793005ull + 1442695040888963407ull;
  return r->s;
}
/* uniform in [0, 1), 53 bits */
static inline double test_uniform(test_rng *r) {
  return (double)(test_rng_next(r) >> 11) * 0x1p-53;
}
/* uniform in [lo, hi) */
static inline double test_uniform_in(test_rng *r, double lo, double hi) {
  return lo + (hi - lo) * test_uniform(r);
}
/* the top 32 bits of the next state */
static inline uint32_t test_u32(test_rng *r) {
  return (uint32_t)(test_rng_next(r) >> 32);
}
/* 64 random bits (two steps) */
static inline uint64_t test_u64(test_rng *r) {
  uint64_t hi = test_u32(r);
  return hi << 32 | test_u32(r);
}
/* an integer in [lo, hi], both included */
static inline int64_t test_int(test_rng *r, int64_t lo, int64_t hi) {
  return lo + (int64_t)(test_uniform(r) * (double)(hi - lo + 1));
}
/* standard normal (Box-Muller, two uniforms per draw) */
static inline double test_normal(test_rng *r) {
  double u = test_uniform(r), v = test_uniform(r);
  return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}
/* A value of dtype dt, never zero: floats uniform in +-[1/8, 1) (either
 * sign), integers in +-[1, 5], bool true or false. */
static inline double test_value(test_rng *r, cm_dtype dt) {
  if (dt == CM_BOOL) return test_uniform(r) < 0.5 ? 0.0 : 1.0;
  double sign = test_uniform(r) < 0.5 ? -1.0 : 1.0;
  if (cm_dtype_is_int(dt)) return sign * (double)test_int(r, 1, 5);
  return sign * test_uniform_in(r, 0.125, 1.0);
}
/* t (allocated) filled with test_value of its dtype */
static inline void test_fill(test_rng *r, cm_tensor *t) {
  for (int64_t e = 0; e < cm_type_numel(&t->type); e++)
    cm_tensor_set_f64(t, e, test_value(r, t->type.dtype));
}

/* Tensors for every source of g (input, param, state), uniform in [-1, 1):
 * t[i] holds node i's, src[i] points at it (NULL for other nodes). */
static inline void test_fill_sources(test_rng *r, const cm_graph *g, cm_tensor *t,
                                     const cm_tensor **src) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&t[i], n->type, NULL) == CM_OK);
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++)
      cm_tensor_set_f64(&t[i], e, test_uniform(r) * 2 - 1);
    src[i] = &t[i];
  }
}

/* ---- the random-graph generator ------------------------------------------ */

static inline int test_in3_(cm_graph *g, int64_t a, int64_t b, int64_t c) {
  int64_t d[3] = {a, b, c};
  return cm_input(g, NULL, CM_F32, 3, d);
}

/* Adds one block (f32) with one output to g, of the kind r in [0, 1) picks:
 * [0, .2) elementwise, [.2, .4) movement, [.4, .55) reductions, [.55, .8)
 * matmul, [.8, .93) conv2d, [.93, 1) a state update; its shapes from rg. */
static inline void test_block(test_rng *rg, cm_graph *g, double r) {
  int y = -1;
  if (r < 0.2) { /* elementwise */
    int64_t a = test_int(rg, 1, 7), b = test_int(rg, 1, 9), c = test_int(rg, 1, 33);
    int x = test_in3_(g, a, b, c), z = test_in3_(g, a, b, c);
    static const cm_op un[] = {CM_OP_TANH, CM_OP_ERF, CM_OP_NEG, CM_OP_EXP, CM_OP_ABS};
    static const cm_op bin[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_MAX, CM_OP_MIN};
    cm_op uo = un[test_int(rg, 0, 4)]; /* drawn before the binary op */
    y = cm_binary(g, bin[test_int(rg, 0, 4)], cm_unary(g, uo, x, NULL), z, NULL);
    y = cm_select(g, cm_binary(g, CM_OP_LT, x, z, NULL), y, x, NULL);
    int one = cm_const_fill(g, NULL, CM_F32, 3, g->nodes[x].type.dims, 0.5);
    y = cm_binary(g, CM_OP_MUL, y, one, NULL);
  } else if (r < 0.4) { /* movement */
    int64_t a = test_int(rg, 1, 6), b = test_int(rg, 2, 7), c = test_int(rg, 2, 11);
    int x = test_in3_(g, a, b, c);
    int perm[3] = {2, 0, 1};
    y = cm_permute(g, cm_unary(g, CM_OP_TANH, x, NULL), perm, NULL);
    int64_t s0[3] = {0, 0, 1}, s1[3] = {c, a, b}, stp[3] = {test_int(rg, 1, 2), 1, 1};
    y = cm_slice(g, y, s0, s1, stp, NULL);
    int64_t lo[3] = {test_int(rg, 0, 2), 0, 1};
    int64_t hi[3] = {0, test_int(rg, 0, 3), 0};
    y = cm_pad(g, y, lo, hi, 0.25, NULL);
    int two[2] = {y, y};
    y = cm_concat(g, 2, two, (int)test_int(rg, 0, 2), NULL);
    const cm_type *t = &g->nodes[y].type;
    int64_t flat[2] = {t->dims[0] * t->dims[1], t->dims[2]};
    y = cm_reshape(g, y, 2, flat, NULL);
  } else if (r < 0.55) { /* reductions, softmax-like */
    int64_t a = test_int(rg, 1, 5), b = test_int(rg, 1, 9), c = test_int(rg, 1, 40);
    int x = test_in3_(g, a, b, c);
    int ax = (int)test_int(rg, 0, 2);
    cm_op ro = test_uniform(rg) < 0.5 ? CM_OP_REDUCE_SUM : CM_OP_REDUCE_MAX;
    int m = cm_reduce(g, ro, x, 1, &ax, true, NULL);
    y = cm_binary(g, CM_OP_SUB, x, cm_broadcast(g, m, 3, g->nodes[x].type.dims, NULL), NULL);
    y = cm_unary(g, CM_OP_EXP, cm_unary(g, CM_OP_TANH, y, NULL), NULL);
    int axes[2] = {0, 2};
    y = cm_reduce(g, CM_OP_REDUCE_SUM, y, test_uniform(rg) < 0.5 ? 1 : 2, axes, false, NULL);
  } else if (r < 0.8) { /* batched / transposed matmul with bias and activation */
    int64_t bt = test_int(rg, 1, 3), m = test_int(rg, 1, 37), k = test_int(rg, 1, 41);
    int64_t n = test_int(rg, 1, 35);
    bool ta = test_uniform(rg) < 0.5;
    bool tb = test_uniform(rg) < 0.5;
    int a = ta ? test_in3_(g, bt, k, m) : test_in3_(g, bt, m, k);
    int b = tb ? test_in3_(g, bt, n, k) : test_in3_(g, bt, k, n);
    y = cm_matmul(g, a, b, ta, tb, NULL);
    int64_t bd[1] = {n};
    int bias = cm_input(g, NULL, CM_F32, 1, bd);
    y = cm_binary_bcast(g, CM_OP_ADD, y, bias, NULL);
    y = cm_unary(g, CM_OP_TANH, y, NULL);
  } else if (r < 0.93) { /* conv2d: plain, strided, padded, depthwise */
    int64_t nb = test_int(rg, 1, 2), c = test_int(rg, 1, 5), h = test_int(rg, 3, 11);
    int64_t w = test_int(rg, 3, 9);
    bool dw = test_uniform(rg) < 0.35;
    int64_t o = dw ? c : test_int(rg, 1, 6);
    int64_t kh = test_int(rg, 1, 3), kw = test_int(rg, 1, 3);
    int64_t xd[4] = {nb, c, h, w}, wd[4] = {o, dw ? 1 : c, kh, kw};
    int x = cm_input(g, NULL, CM_F32, 4, xd);
    int wt = cm_input(g, NULL, CM_F32, 4, wd);
    int stride[2] = {(int)test_int(rg, 1, 2), (int)test_int(rg, 1, 2)};
    int pad[2] = {(int)test_int(rg, 0, 1), (int)test_int(rg, 0, 1)};
    y = cm_conv2d(g, x, wt, stride, pad, NULL, dw ? (int)c : 1, NULL);
    y = cm_unary(g, CM_OP_TANH, y, NULL);
  } else { /* a state update */
    int64_t d[2];
    d[0] = test_int(rg, 1, 9);
    d[1] = test_int(rg, 1, 17);
    cm_init init = {CM_INIT_ZEROS, 0, 0};
    int s = cm_state(g, NULL, CM_F32, 2, d, init);
    int x = cm_input(g, NULL, CM_F32, 2, d);
    int nv = cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, s, x, NULL), x, NULL);
    cm_assign(g, s, nv, NULL);
    y = cm_unary(g, CM_OP_TANH, nv, NULL);
  }
  if (y >= 0) cm_graph_add_output(g, y, NULL);
}

/* Adds one random block to g. */
static inline void test_random_block(test_rng *rg, cm_graph *g) {
  test_block(rg, g, test_uniform(rg));
}

/* A random graph of 1..max_blocks blocks (a fresh graph; NULL when out of memory). */
static inline cm_graph *test_random_graph(test_rng *r, int max_blocks) {
  cm_graph *g = cm_graph_new();
  if (!g) return NULL;
  int blocks = (int)test_int(r, 1, max_blocks);
  for (int b = 0; b < blocks; b++) test_random_block(r, g);
  return g;
}

/* ---- growing a graph op by op over a pool of values ---------------------- */

/* The values a graph grows from: 2-D nodes of one float dtype (sources and
 * what test_random_op added). */
typedef struct test_pool {
  int ids[256];
  int n;
} test_pool;

enum {
  TEST_OPS_COLLECTIVES = 1, /* all_reduce / all_gather on one rank among the ops */
  TEST_OPS_REDUNDANT = 2,   /* half the ops add redundancy for simplify, CSE and DCE */
};

/* What TEST_OPS_REDUNDANT adds: a repeated expression, a reshape chain back
 * to the shape, a cast round trip (widening, or narrowing: that one must
 * stay), all-constant arithmetic, dead code, a select of equal values, a
 * double permute, a division. Returns the value added, or -1. */
static inline int test_redundant_op_(test_rng *rg, cm_graph *g, int a, int b) {
  const cm_type ta = g->nodes[a].type;
  bool same = cm_shape_equal(&ta, &g->nodes[b].type), two = ta.rank == 2;
  switch (test_int(rg, 0, 7)) {
  case 0:
    if (!same) return -1;
    return cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, a, b, NULL),
                     cm_binary(g, CM_OP_MUL, a, b, NULL), NULL);
  case 1: {
    int64_t flat[1] = {cm_type_numel(&ta)};
    return cm_reshape(g, cm_reshape(g, a, 1, flat, NULL), ta.rank, ta.dims, NULL);
  }
  case 2: {
    cm_dtype mid = test_uniform(rg) < 0.5 ? CM_F64 : CM_F16;
    return cm_cast(g, cm_cast(g, a, mid, NULL), ta.dtype, NULL);
  }
  case 3: {
    int k = cm_const_fill(g, NULL, ta.dtype, ta.rank, ta.dims, test_uniform(rg));
    return cm_binary(g, CM_OP_ADD, a, cm_unary(g, CM_OP_EXP, k, NULL), NULL);
  }
  case 4: cm_unary(g, CM_OP_EXP, a, NULL); return -1;
  case 5:
    if (!same) return -1;
    return cm_select(g, cm_binary(g, CM_OP_LT, a, b, NULL), a, a, NULL);
  case 6: {
    if (!two) return -1;
    int perm[2] = {1, 0};
    return cm_permute(g, cm_permute(g, a, perm, NULL), perm, NULL);
  }
  default: return same ? cm_binary(g, CM_OP_DIV, a, b, NULL) : -1;
  }
}

/* Adds one random op over two values of the pool, and its result to the pool
 * (or nothing, when the draw does not fit their shapes): binary, unary (exp
 * only of tanh-bounded values), a @ a^T scaled by 0.5/n and squashed (so
 * tanh stays away from saturation: tiny gradients drown in finite-difference
 * noise) then sliced and padded back to a's shape, a reduction broadcast
 * back, a select, a strided slice of a concat, or (flags) a collective or
 * a redundancy (test_redundant_op_). */
static inline void test_random_op(test_rng *rg, cm_graph *g, test_pool *p, unsigned flags) {
  if (p->n >= 250) return;
  int a = p->ids[(int)(test_uniform(rg) * p->n)], b = p->ids[(int)(test_uniform(rg) * p->n)];
  if ((flags & TEST_OPS_REDUNDANT) && test_uniform(rg) < 0.5) {
    int y = test_redundant_op_(rg, g, a, b);
    if (y >= 0) p->ids[p->n++] = y;
    return;
  }
  const cm_type ta = g->nodes[a].type; /* a copy: nodes may move */
  bool same = cm_shape_equal(&ta, &g->nodes[b].type), two = ta.rank == 2;
  int y = -1;
  double r = test_uniform(rg);
  if (r < 0.35) {
    static const cm_op bin[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_MAX, CM_OP_MIN};
    if (same) y = cm_binary(g, bin[(int)(test_uniform(rg) * 5)], a, b, NULL);
  } else if (r < 0.6) {
    static const cm_op un[] = {CM_OP_TANH, CM_OP_ERF, CM_OP_NEG, CM_OP_EXP, CM_OP_ABS};
    cm_op op = un[(int)(test_uniform(rg) * 5)];
    if (op == CM_OP_EXP) a = cm_unary(g, CM_OP_TANH, a, NULL);
    y = cm_unary(g, op, a, NULL);
  } else if (r < 0.7 && two) {
    int perm[2] = {1, 0};
    y = cm_matmul(g, a, cm_permute(g, a, perm, NULL), false, false, NULL); /* [m,n] x [n,m] */
    const cm_type ty = g->nodes[y].type;
    int k = cm_const_fill(g, NULL, ty.dtype, 2, ty.dims, 0.5 / (double)ta.dims[1]);
    y = cm_unary(g, CM_OP_TANH, cm_binary(g, CM_OP_MUL, y, k, NULL), NULL);
    int64_t s0[2] = {0, 0}, s1[2] = {ta.dims[0], ta.dims[0] < ta.dims[1] ? ta.dims[0] : ta.dims[1]};
    y = cm_slice(g, y, s0, s1, NULL, NULL);
    int64_t lo[2] = {0, 0}, hi[2] = {0, ta.dims[1] - s1[1]};
    y = cm_pad(g, y, lo, hi, 0.25, NULL);
  } else if (r < 0.8 && two) {
    int ax = test_uniform(rg) < 0.5 ? 0 : 1;
    cm_op ro = test_uniform(rg) < 0.5 ? CM_OP_REDUCE_SUM : CM_OP_REDUCE_MAX;
    y = cm_broadcast(g, cm_reduce(g, ro, a, 1, &ax, true, NULL), 2, ta.dims, NULL);
  } else if (r < 0.9) {
    if (same)
      y = cm_select(g, cm_binary(g, CM_OP_LT, a, b, NULL), a, cm_unary(g, CM_OP_TANH, b, NULL),
                    NULL);
  } else if ((flags & TEST_OPS_COLLECTIVES) && test_uniform(rg) < 0.5) {
    y = test_uniform(rg) < 0.5 ? cm_all_reduce(g, a, CM_MODE_SUM, 1, NULL)
                               : cm_all_gather(g, a, 0, 1, NULL);
  } else if (two) {
    int in[2] = {a, a};
    int c = cm_concat(g, 2, in, 1, NULL);
    int64_t s0[2] = {0, 1}, s1[2] = {ta.dims[0], 2 * ta.dims[1]}, st[2] = {1, 2};
    y = cm_slice(g, c, s0, s1, st, NULL);
  }
  if (y >= 0) p->ids[p->n++] = y;
}

#endif
