/* Autodiff against central finite differences in f64 (max relative error < 1e-6):
 * every differentiable op over random shapes with broadcasting and size-1 axes,
 * composite layers built from primitives, and hundreds of random graphs. */
#include "../test.h"
#include "../testlib.h"
#include "frontend/frontend.h"
#include "passes/passes.h"

#include <stdint.h>

/* ---- a small harness: params with random values, loss = sum(y * r) ----- */

typedef struct {
  cm_graph *g;
  double lo[4096], hi[4096]; /* value range per source node */
  bool is_int[4096];
  int64_t int_bound[4096];
  test_rng rng;
  bool allow_zero_gradient; /* e.g. max of tiny shapes: one side may never win */
} harness;

static double next_uniform(harness *h) {
  return test_uniform(&h->rng);
}

static void harness_init(harness *h, uint64_t seed) {
  memset(h, 0, sizeof *h);
  h->g = cm_graph_new();
  h->rng.s = seed * 2654435761ull + 12345;
}

/* A float param with values uniform in [lo, hi) (kept away from 0 when lo > 0);
 * the initializer says the same, so a dumped graph runs under `cmaec grad`. */
static int param(harness *h, int rank, const int64_t *dims, double lo, double hi) {
  cm_init init = {CM_INIT_UNIFORM, lo, hi};
  int id = cm_param(h->g, NULL, CM_F64, rank, dims, init);
  if (id >= 0) {
    h->lo[id] = lo;
    h->hi[id] = hi;
  }
  return id;
}

/* An integer input with values in [0, bound). */
static int index_input(harness *h, int rank, const int64_t *dims, int64_t bound) {
  int id = cm_input(h->g, NULL, CM_I64, rank, dims);
  if (id >= 0) {
    h->is_int[id] = true;
    h->int_bound[id] = bound;
  }
  return id;
}

static int random_const(harness *h, int y) {
  const cm_type *t = &h->g->nodes[y].type;
  int64_t n = cm_type_numel(t);
  double *data = malloc(sizeof(double) * (size_t)n);
  for (int64_t i = 0; i < n; i++) data[i] = next_uniform(h) * 2 - 1;
  int c = cm_const_data(h->g, NULL, t->dtype, t->rank, t->dims, data);
  free(data);
  return c;
}

/* loss = sum(y * r) with r random, so every element of y matters differently. */
static int weighted_loss(harness *h, int y) {
  if (y < 0) return -1;
  int r = random_const(h, y);
  int p = cm_binary(h->g, CM_OP_MUL, y, r, NULL);
  int axes[CM_MAX_RANK];
  int rank = h->g->nodes[y].type.rank;
  for (int i = 0; i < rank; i++) axes[i] = i;
  return cm_reduce(h->g, CM_OP_REDUCE_SUM, p, rank, axes, false, NULL);
}

/* With CMAEC_GRAD_DUMP=DIR, writes each checked graph (JSON), its source values
 * (safetensors) and a line "file<TAB>loss<TAB>what" to DIR/index.tsv, so that
 * tests/cli/grad_ops.sh can check every op and composite with `cmaec grad`. */
static void dump_case(const cm_graph *g, int loss, const cm_tensor *const *sources,
                      const char *what) {
  const char *dir = getenv("CMAEC_GRAD_DUMP");
  if (!dir) return;
  static int counter = -1;
  char path[512];
  if (counter < 0) { /* continue after the cases of earlier runs into the same DIR */
    counter = 0;
    snprintf(path, sizeof path, "%s/index.tsv", dir);
    FILE *idx = fopen(path, "r");
    for (int c; idx && (c = fgetc(idx)) != EOF;) counter += c == '\n';
    if (idx) fclose(idx);
  }
  snprintf(path, sizeof path, "%s/case%03d.json", dir, counter);
  cm_err err;
  CHECK(cm_graph_save_json(g, path, &err) == CM_OK);
  cm_tensor_set set;
  cm_tensor_set_init(&set);
  for (int i = 0; i < g->n_nodes; i++)
    if (sources[i]) CHECK(cm_tensor_set_add(&set, g->nodes[i].name, sources[i], &err) == CM_OK);
  snprintf(path, sizeof path, "%s/case%03d.safetensors", dir, counter);
  CHECK(cm_safetensors_save(path, &set, &err) == CM_OK);
  cm_tensor_set_free(&set);
  snprintf(path, sizeof path, "%s/index.tsv", dir);
  FILE *f = fopen(path, "a");
  if (f) {
    fprintf(f, "case%03d\t%s\t%s\n", counter, g->nodes[loss].name, what);
    fclose(f);
  }
  counter++;
}

/* Checks every param's gradient; returns the worst relative error (or 1e9). */
static double check_grads(harness *h, int loss, const char *what) {
  cm_graph *g = h->g;
  if (loss < 0 || cm_graph_error(g)) {
    CHECK_MSG(0, "%s: building failed: %s", what, cm_graph_error(g) ? cm_graph_error(g) : "?");
    return 1e9;
  }
  /* A named loss, so a dumped graph can name it (builder names change on reload). */
  if (strcmp(g->nodes[loss].name, "loss") != 0 && cm_graph_find(g, "loss") < 0) {
    cm_type lt = g->nodes[loss].type;
    loss = cm_reshape(g, loss, lt.rank, lt.dims, "loss");
  }
  int wrt[256], n_wrt = 0;
  cm_tensor *tensors = calloc((size_t)g->n_nodes, sizeof *tensors);
  const cm_tensor **sources = calloc((size_t)g->n_nodes, sizeof *sources);
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_PARAM && n->op != CM_OP_INPUT) continue;
    cm_tensor_alloc(&tensors[i], n->type, NULL);
    int64_t cnt = cm_type_numel(&n->type);
    for (int64_t e = 0; e < cnt; e++) {
      if (h->is_int[i]) {
        cm_tensor_set_i64(&tensors[i], e, (int64_t)(next_uniform(h) * (double)h->int_bound[i]));
      } else {
        cm_tensor_set_f64(&tensors[i], e, h->lo[i] + (h->hi[i] - h->lo[i]) * next_uniform(h));
      }
    }
    sources[i] = &tensors[i];
    if (n->op == CM_OP_PARAM && n_wrt < 256) wrt[n_wrt++] = i;
  }
  dump_case(g, loss, sources, what);
  cm_gradcheck_result res[256];
  cm_err err = {0};
  double worst = 0;
  cm_status st = cm_gradcheck(g, loss, n_wrt, wrt, sources, 1e-6, res, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  if (st) worst = 1e9;
  for (int j = 0; j < n_wrt && !st; j++) {
    CHECK_MSG(res[j].max_rel_error < 1e-6, "%s: gradient of %s: max relative error %.3g (abs %.3g)",
              what, g->nodes[wrt[j]].name, res[j].max_rel_error, res[j].max_abs_error);
    /* A gradient that is identically zero would pass vacuously. */
    CHECK_MSG(h->allow_zero_gradient || res[j].max_abs_gradient > 1e-9,
              "%s: gradient of %s is zero", what, g->nodes[wrt[j]].name);
    if (res[j].max_rel_error > worst) worst = res[j].max_rel_error;
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&tensors[i]);
  free(tensors);
  free(sources);
  return worst;
}

static void harness_done(harness *h) {
  cm_graph_free(h->g);
}

/* A random shape of the given rank, dims in 1..4, with size-1 axes often. */
static void random_dims(harness *h, int rank, int64_t *dims) {
  for (int i = 0; i < rank; i++)
    dims[i] = next_uniform(h) < 0.25 ? 1 : 1 + (int64_t)(next_uniform(h) * 4);
}

/* ---- per-op checks ----------------------------------------------------- */

static void test_unary_ops(void) {
  static const struct {
    cm_op op;
    double lo, hi;
  } cases[] = {{CM_OP_NEG, -2, 2},    {CM_OP_ABS, -2, 2},   {CM_OP_EXP, -2, 2},
               {CM_OP_LOG, 0.2, 3},   {CM_OP_SQRT, 0.2, 3}, {CM_OP_RSQRT, 0.2, 3},
               {CM_OP_RECIP, 0.3, 3}, {CM_OP_TANH, -2, 2},  {CM_OP_ERF, -2, 2},
               {CM_OP_RELU, -2, 2}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int trial = 0; trial < 3; trial++) {
      harness h;
      harness_init(&h, 100 * c + trial);
      int64_t dims[CM_MAX_RANK];
      int rank = 1 + trial;
      random_dims(&h, rank, dims);
      int x = param(&h, rank, dims, cases[c].lo, cases[c].hi);
      int y = cm_unary(h.g, cases[c].op, x, NULL);
      check_grads(&h, weighted_loss(&h, y), cm_op_name(cases[c].op));
      harness_done(&h);
    }
  /* cast between float dtypes passes the gradient through */
  harness h;
  harness_init(&h, 7);
  int64_t d[2] = {3, 2};
  int x = param(&h, 2, d, -1, 1);
  int y = cm_cast(h.g, cm_cast(h.g, x, CM_F32, NULL), CM_F64, NULL);
  check_grads(&h, weighted_loss(&h, y), "cast");
  harness_done(&h);
}

static void test_binary_ops_broadcasting(void) {
  static const struct {
    cm_op op;
    double lo, hi;
  } cases[] = {{CM_OP_ADD, -2, 2}, {CM_OP_SUB, -2, 2}, {CM_OP_MUL, -2, 2}, {CM_OP_DIV, 0.5, 2},
               {CM_OP_MAX, -2, 2}, {CM_OP_MIN, -2, 2}, {CM_OP_POW, 0.5, 2}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int trial = 0; trial < 4; trial++) {
      harness h;
      harness_init(&h, 1000 + 10 * c + trial);
      /* b's shape is a broadcastable suffix of a's, with size-1 axes */
      int64_t da[3], db[3];
      random_dims(&h, 3, da);
      int rb = 1 + trial % 3;
      for (int i = 0; i < rb; i++) db[i] = next_uniform(&h) < 0.4 ? 1 : da[3 - rb + i];
      int a = param(&h, 3, da, cases[c].lo, cases[c].hi);
      int b = param(&h, rb, db, cases[c].lo, cases[c].hi);
      h.allow_zero_gradient = cases[c].op == CM_OP_MAX || cases[c].op == CM_OP_MIN;
      int y = trial % 2 ? cm_binary_bcast(h.g, cases[c].op, a, b, NULL)
                        : cm_binary_bcast(h.g, cases[c].op, b, a, NULL);
      check_grads(&h, weighted_loss(&h, y), cm_op_name(cases[c].op));
      harness_done(&h);
    }
  /* x * x: two adjoints meet on one node */
  harness h;
  harness_init(&h, 5);
  int64_t d[1] = {5};
  int x = param(&h, 1, d, -2, 2);
  check_grads(&h, weighted_loss(&h, cm_binary(h.g, CM_OP_MUL, x, x, NULL)), "x*x");
  harness_done(&h);
}

static void test_select_and_ties(void) {
  harness h;
  harness_init(&h, 11);
  int64_t d[2] = {4, 3};
  int a = param(&h, 2, d, -1, 1), b = param(&h, 2, d, -1, 1), c = param(&h, 2, d, -1, 1);
  /* c matters only through the condition: no gradient, and an error if asked for alone */
  int cond = cm_binary(h.g, CM_OP_LT, a, b, NULL);
  a = cm_binary(h.g, CM_OP_MUL, a, c, NULL);
  check_grads(&h, weighted_loss(&h, cm_select(h.g, cond, a, b, NULL)), "select");
  harness_done(&h);

  /* max(x, x): a tie everywhere; each side gets half, so d/dx = 1 as for x. */
  harness_init(&h, 12);
  int x = param(&h, 2, d, -1, 1);
  check_grads(&h, weighted_loss(&h, cm_binary(h.g, CM_OP_MAX, x, x, NULL)), "max tie");
  harness_done(&h);
}

static void test_reductions(void) {
  for (int trial = 0; trial < 12; trial++) {
    harness h;
    harness_init(&h, 2000 + trial);
    int64_t d[4];
    random_dims(&h, 4, d);
    int x = param(&h, 4, d, -2, 2);
    int axes[4], n = 0;
    for (int i = 0; i < 4; i++)
      if (next_uniform(&h) < 0.5) axes[n++] = i;
    if (!n) axes[n++] = trial % 4;
    cm_op op = trial % 2 ? CM_OP_REDUCE_MAX : CM_OP_REDUCE_SUM;
    int y = cm_reduce(h.g, op, x, n, axes, trial % 3 == 0, NULL);
    check_grads(&h, weighted_loss(&h, y), cm_op_name(op));
    harness_done(&h);
  }
}

static void test_movement(void) {
  for (int trial = 0; trial < 4; trial++) {
    harness h;
    harness_init(&h, 3000 + trial);
    int64_t d[3] = {2 + trial, 3, 4};
    int x = param(&h, 3, d, -1, 1);
    int64_t r[2] = {d[0] * 3, 4};
    int perm[3] = {2, 0, 1};
    int64_t bd[4] = {2, d[0], 3, 4};
    int64_t s0[3] = {0, 1, 1}, s1[3] = {d[0], 3, 4}, st[3] = {1 + trial % 2, 2, 2};
    int64_t lo[3] = {1, 0, 2}, hi[3] = {0, 2, 1};
    int cat_in[3] = {x, cm_unary(h.g, CM_OP_EXP, x, NULL), x};
    int ys[6];
    ys[0] = cm_reshape(h.g, x, 2, r, NULL);
    ys[1] = cm_permute(h.g, x, perm, NULL);
    ys[2] = cm_broadcast(h.g, x, 4, bd, NULL);
    ys[3] = cm_slice(h.g, x, s0, s1, st, NULL);
    ys[4] = cm_concat(h.g, 3, cat_in, trial % 3, NULL);
    ys[5] = cm_pad(h.g, x, lo, hi, 0.5, NULL);
    /* one loss over all six, and each alone */
    int total = -1;
    for (int k = 0; k < 6; k++) {
      int l = weighted_loss(&h, ys[k]);
      total = total < 0 ? l : cm_binary(h.g, CM_OP_ADD, total, l, NULL);
    }
    check_grads(&h, total, "movement");
    harness_done(&h);
  }
  for (int k = 0; k < 6; k++) {
    harness h;
    harness_init(&h, 3100 + k);
    int64_t d[2] = {5, 7};
    int x = param(&h, 2, d, -1, 1);
    int64_t s0[2] = {k % 2, 1}, s1[2] = {5, 7 - k % 3}, st[2] = {1 + k % 3, 1 + k / 3};
    check_grads(&h, weighted_loss(&h, cm_slice(h.g, x, s0, s1, st, NULL)), "slice with steps");
    harness_done(&h);
  }
}

static void test_gather_scatter(void) {
  for (int axis = 0; axis < 3; axis++) {
    harness h;
    harness_init(&h, 4000 + axis);
    int64_t d[3] = {3, 4, 5}, di[3] = {3, 4, 5};
    di[axis] = 6; /* more indices than rows: repeats accumulate */
    int x = param(&h, 3, d, -1, 1);
    int idx = index_input(&h, 3, di, d[axis]);
    int ga = cm_gather(h.g, x, idx, axis, NULL);
    check_grads(&h, weighted_loss(&h, ga), "gather");
    harness_done(&h);

    harness_init(&h, 4100 + axis);
    int base = param(&h, 3, d, -1, 1);
    idx = index_input(&h, 3, di, d[axis]);
    int upd = param(&h, 3, di, -1, 1);
    check_grads(&h, weighted_loss(&h, cm_scatter_add(h.g, base, idx, upd, axis, NULL)),
                "scatter_add");
    harness_done(&h);
  }
}

static void test_matmul(void) {
  for (int t = 0; t < 4; t++)
    for (int bc = 0; bc < 3; bc++) {
      harness h;
      harness_init(&h, 5000 + 10 * t + bc);
      bool ta = t & 1, tb = t & 2;
      int64_t m = 3, k = 4, n = 2;
      int64_t da[4], db[4];
      int ra, rb;
      if (bc == 0) { /* plain 2-D */
        ra = rb = 2;
      } else if (bc == 1) { /* [2,3,...] x [...]: rank-2 b broadcasts */
        ra = 4, rb = 2;
        da[0] = 2, da[1] = 3;
      } else { /* size-1 batch axes on both sides */
        ra = rb = 4;
        da[0] = 2, da[1] = 1;
        db[0] = 1, db[1] = 3;
      }
      da[ra - 2] = ta ? k : m, da[ra - 1] = ta ? m : k;
      db[rb - 2] = tb ? n : k, db[rb - 1] = tb ? k : n;
      int a = param(&h, ra, da, -1, 1), b = param(&h, rb, db, -1, 1);
      check_grads(&h, weighted_loss(&h, cm_matmul(h.g, a, b, ta, tb, NULL)), "matmul");
      harness_done(&h);
    }
}

static void test_conv(void) {
  static const struct {
    int c, o, k, stride, pad, dil, groups, hw;
  } cases[] = {{3, 4, 3, 1, 1, 1, 1, 6},
               {4, 6, 3, 2, 1, 1, 2, 7},
               {4, 4, 5, 1, 2, 1, 4, 6},
               {2, 3, 2, 2, 0, 1, 1, 6},
               {3, 2, 3, 1, 2, 2, 1, 5}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    harness h;
    harness_init(&h, 6000 + c);
    int64_t dx[4] = {2, cases[c].c, cases[c].hw, cases[c].hw - 1};
    int64_t dw[4] = {cases[c].o, cases[c].c / cases[c].groups, cases[c].k, cases[c].k};
    int x = param(&h, 4, dx, -1, 1), w = param(&h, 4, dw, -1, 1);
    int s[2] = {cases[c].stride, cases[c].stride}, p[2] = {cases[c].pad, cases[c].pad};
    int dl[2] = {cases[c].dil, cases[c].dil};
    int y = cm_conv2d(h.g, x, w, s, p, dl, cases[c].groups, NULL);
    check_grads(&h, weighted_loss(&h, y), "conv2d");
    /* the two adjoint ops are differentiable too */
    int dy = param(&h, 4, h.g->nodes[y].type.dims, -1, 1);
    cm_attrs a;
    cm_attrs_default(&a);
    a.stride[0] = a.stride[1] = cases[c].stride;
    a.padding[0] = a.padding[1] = cases[c].pad;
    a.dilation[0] = a.dilation[1] = cases[c].dil;
    a.groups = cases[c].groups;
    a.rank = 4;
    memcpy(a.shape, dx, sizeof dx);
    int in[2] = {dy, w};
    int gi = cm_graph_add(h.g, CM_OP_CONV2D_GRAD_INPUT, NULL, in, 2, &a, NULL);
    memcpy(a.shape, dw, sizeof dw);
    in[0] = x, in[1] = dy;
    int gw = cm_graph_add(h.g, CM_OP_CONV2D_GRAD_WEIGHT, NULL, in, 2, &a, NULL);
    int l = cm_binary(h.g, CM_OP_ADD, weighted_loss(&h, gi), weighted_loss(&h, gw), NULL);
    check_grads(&h, l, "conv2d adjoints");
    harness_done(&h);
  }
}

static void test_collectives_one_rank(void) {
  harness h;
  harness_init(&h, 7000);
  int64_t d[2] = {3, 4};
  int x = param(&h, 2, d, -1, 1);
  int y = cm_all_gather(h.g, cm_all_reduce(h.g, x, CM_MODE_MEAN, 1, NULL), 0, 1, NULL);
  check_grads(&h, weighted_loss(&h, y), "collectives");
  harness_done(&h);
}

/* ---- composites built from primitives ----------------------------------- */

static int bcast_to(cm_graph *g, int x, int like) {
  const cm_type *t = &g->nodes[like].type;
  return cm_broadcast(g, x, t->rank, t->dims, NULL);
}
static int scalar(cm_graph *g, int like, double v) {
  const cm_type *t = &g->nodes[like].type;
  return cm_const_fill(g, NULL, t->dtype, t->rank, t->dims, v);
}

/* Mean over the last axis, keepdims. */
static int mean_last(cm_graph *g, int x) {
  const cm_type *t = &g->nodes[x].type;
  int ax = t->rank - 1;
  int64_t n = t->dims[ax];
  int s = cm_reduce(g, CM_OP_REDUCE_SUM, x, 1, &ax, true, NULL);
  return cm_binary(g, CM_OP_MUL, s, scalar(g, s, 1.0 / (double)n), NULL);
}

static int layer_norm(cm_graph *g, int x, int w, int b, double eps) {
  int mu = bcast_to(g, mean_last(g, x), x);
  int xc = cm_binary(g, CM_OP_SUB, x, mu, NULL);
  int var = mean_last(g, cm_binary(g, CM_OP_MUL, xc, xc, NULL));
  int inv = cm_unary(g, CM_OP_RSQRT, cm_binary(g, CM_OP_ADD, var, scalar(g, var, eps), NULL), NULL);
  int y = cm_binary(g, CM_OP_MUL, xc, bcast_to(g, inv, x), NULL);
  return cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, y, bcast_to(g, w, x), NULL),
                   bcast_to(g, b, x), NULL);
}

static int softmax_last(cm_graph *g, int x) {
  int ax = g->nodes[x].type.rank - 1;
  int m =
      cm_unary(g, CM_OP_STOP_GRADIENT, cm_reduce(g, CM_OP_REDUCE_MAX, x, 1, &ax, true, NULL), NULL);
  int e = cm_unary(g, CM_OP_EXP, cm_binary(g, CM_OP_SUB, x, bcast_to(g, m, x), NULL), NULL);
  int s = cm_reduce(g, CM_OP_REDUCE_SUM, e, 1, &ax, true, NULL);
  return cm_binary(g, CM_OP_DIV, e, bcast_to(g, s, e), NULL);
}

static int log_softmax_last(cm_graph *g, int x) {
  int ax = g->nodes[x].type.rank - 1;
  int m = cm_reduce(g, CM_OP_REDUCE_MAX, x, 1, &ax, true, NULL);
  int xm = cm_binary(g, CM_OP_SUB, x, bcast_to(g, m, x), NULL);
  int lse = cm_unary(
      g, CM_OP_LOG,
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_unary(g, CM_OP_EXP, xm, NULL), 1, &ax, true, NULL), NULL);
  return cm_binary(g, CM_OP_SUB, xm, bcast_to(g, lse, xm), NULL);
}

static int gelu(cm_graph *g, int x) {
  int e =
      cm_unary(g, CM_OP_ERF, cm_binary(g, CM_OP_MUL, x, scalar(g, x, 1 / sqrt(2.0)), NULL), NULL);
  int one_plus = cm_binary(g, CM_OP_ADD, e, scalar(g, e, 1), NULL);
  return cm_binary(g, CM_OP_MUL, cm_binary(g, CM_OP_MUL, x, scalar(g, x, 0.5), NULL), one_plus,
                   NULL);
}

static void test_composites(void) {
  int64_t d[3] = {2, 3, 6}, dc[1] = {6};
  harness h;

  harness_init(&h, 8000);
  int x = param(&h, 3, d, -2, 2), w = param(&h, 1, dc, 0.5, 1.5), b = param(&h, 1, dc, -1, 1);
  check_grads(&h, weighted_loss(&h, layer_norm(h.g, x, w, b, 1e-6)), "layer_norm");
  harness_done(&h);

  harness_init(&h, 8001);
  x = param(&h, 3, d, -2, 2);
  check_grads(&h, weighted_loss(&h, softmax_last(h.g, x)), "softmax");
  harness_done(&h);

  /* log-softmax + cross-entropy with integer labels, as one-hot by iota == label */
  harness_init(&h, 8002);
  int64_t dl[2] = {5, 7}, dlab[2] = {5, 1};
  x = param(&h, 2, dl, -3, 3);
  int lab = index_input(&h, 2, dlab, 7);
  int io = cm_iota(h.g, NULL, CM_I64, 2, dl, 1);
  int onehot = cm_binary(h.g, CM_OP_EQ, io, cm_broadcast(h.g, lab, 2, dl, NULL), NULL);
  int ls = log_softmax_last(h.g, x);
  int picked = cm_select(h.g, onehot, ls, scalar(h.g, ls, 0), NULL);
  int axes[2] = {0, 1};
  int ce = cm_binary(h.g, CM_OP_MUL, cm_reduce(h.g, CM_OP_REDUCE_SUM, picked, 2, axes, false, NULL),
                     cm_const_scalar(h.g, NULL, CM_F64, -1.0 / 5), "ce");
  check_grads(&h, ce, "log_softmax + cross-entropy");
  harness_done(&h);

  harness_init(&h, 8003);
  x = param(&h, 3, d, -3, 3);
  check_grads(&h, weighted_loss(&h, gelu(h.g, x)), "gelu (erf)");
  harness_done(&h);

  /* BatchNorm in training mode over axis 0 of [N, C] (biased variance, as PyTorch normalizes). */
  harness_init(&h, 8004);
  int64_t dn[2] = {6, 4}, dcn[2] = {1, 4}, dcc[1] = {4};
  x = param(&h, 2, dn, -2, 2);
  w = param(&h, 1, dcc, 0.5, 1.5), b = param(&h, 1, dcc, -1, 1);
  int ax0 = 0;
  int mu = cm_binary(h.g, CM_OP_MUL, cm_reduce(h.g, CM_OP_REDUCE_SUM, x, 1, &ax0, true, NULL),
                     cm_const_fill(h.g, NULL, CM_F64, 2, dcn, 1.0 / 6), NULL);
  int xc = cm_binary(h.g, CM_OP_SUB, x, bcast_to(h.g, mu, x), NULL);
  int var = cm_binary(h.g, CM_OP_MUL,
                      cm_reduce(h.g, CM_OP_REDUCE_SUM, cm_binary(h.g, CM_OP_MUL, xc, xc, NULL), 1,
                                &ax0, true, NULL),
                      cm_const_fill(h.g, NULL, CM_F64, 2, dcn, 1.0 / 6), NULL);
  int inv = cm_unary(h.g, CM_OP_RSQRT, cm_binary(h.g, CM_OP_ADD, var, scalar(h.g, var, 1e-6), NULL),
                     NULL);
  int bn = cm_binary(h.g, CM_OP_MUL, xc, bcast_to(h.g, inv, x), NULL);
  bn = cm_binary(h.g, CM_OP_ADD, cm_binary(h.g, CM_OP_MUL, bn, bcast_to(h.g, w, x), NULL),
                 bcast_to(h.g, b, x), NULL);
  check_grads(&h, weighted_loss(&h, bn), "batch_norm (training)");
  harness_done(&h);

  /* L2 normalize rows */
  harness_init(&h, 8005);
  x = param(&h, 2, dn, -2, 2);
  int ax1 = 1;
  int nrm = cm_unary(
      h.g, CM_OP_SQRT,
      cm_reduce(h.g, CM_OP_REDUCE_SUM, cm_binary(h.g, CM_OP_MUL, x, x, NULL), 1, &ax1, true, NULL),
      NULL);
  nrm = cm_binary(h.g, CM_OP_MAX, nrm, scalar(h.g, nrm, 1e-12), NULL);
  check_grads(&h, weighted_loss(&h, cm_binary(h.g, CM_OP_DIV, x, bcast_to(h.g, nrm, x), NULL)),
              "l2_normalize");
  harness_done(&h);

  /* masked mean: sum(l * m) / sum(m) with a 0/1 mask input */
  harness_init(&h, 8006);
  x = param(&h, 2, dn, -2, 2);
  int mask_i = index_input(&h, 2, dn, 2);
  int mask = cm_cast(h.g, mask_i, CM_F64, NULL);
  int both[2] = {0, 1};
  int num = cm_reduce(h.g, CM_OP_REDUCE_SUM,
                      cm_binary(h.g, CM_OP_MUL, cm_binary(h.g, CM_OP_MUL, x, x, NULL), mask, NULL),
                      2, both, false, NULL);
  int den = cm_reduce(h.g, CM_OP_REDUCE_SUM, mask, 2, both, false, NULL);
  den = cm_binary(h.g, CM_OP_MAX, den, cm_const_scalar(h.g, NULL, CM_F64, 1), NULL);
  check_grads(&h, cm_binary(h.g, CM_OP_DIV, num, den, "masked_mean"), "masked mean");
  harness_done(&h);
}

/* ---- random graphs ------------------------------------------------------ */

/* Grows a random well-typed graph of float ops from a few params
 * (testlib.h's test_random_op); the loss reads several late values. */
static int random_graph(harness *h, int n_ops) {
  cm_graph *g = h->g;
  test_pool pool = {{0}, 0};
  int64_t d[2];
  random_dims(h, 2, d);
  d[0]++, d[1]++;
  for (int i = 0; i < 3; i++) pool.ids[pool.n++] = param(h, 2, d, 0.5, 1.5);
  for (int s = 0; s < n_ops; s++) test_random_op(&h->rng, g, &pool, 0);
  const int *ids = pool.ids, np = pool.n;
  /* the loss sums several late values so most of the graph matters */
  int loss = -1;
  for (int k = np - 1; k >= np - 3 && k >= 0; k--) {
    int l = weighted_loss(h, ids[k]);
    loss = loss < 0 ? l : cm_binary(g, CM_OP_ADD, loss, l, NULL);
  }
  return loss;
}

static void test_random_graphs(void) {
  int n_graphs = 300, worst_graph = -1;
  double worst = 0;
  for (int i = 0; i < n_graphs; i++) {
    harness h;
    harness_init(&h, 90000 + i);
    int loss = random_graph(&h, 4 + i % 12);
    char what[64];
    snprintf(what, sizeof what, "random graph %d", i);
    /* In a random graph a param may legitimately not reach the loss: check
     * errors only on params with a non-zero gradient. */
    cm_graph *g = h.g;
    CHECK_MSG(cm_graph_error(g) == NULL, "%s: %s", what, cm_graph_error(g));
    if (cm_graph_error(g)) {
      harness_done(&h);
      continue;
    }
    int wrt[8], n_wrt = 0;
    cm_tensor tensors[8];
    const cm_tensor **sources = calloc((size_t)g->n_nodes, sizeof *sources);
    for (int k = 0; k < g->n_nodes && n_wrt < 8; k++)
      if (g->nodes[k].op == CM_OP_PARAM) {
        cm_tensor_alloc(&tensors[n_wrt], g->nodes[k].type, NULL);
        for (int64_t e = 0; e < cm_type_numel(&g->nodes[k].type); e++)
          cm_tensor_set_f64(&tensors[n_wrt], e, 0.5 + next_uniform(&h));
        sources[k] = &tensors[n_wrt];
        wrt[n_wrt++] = k;
      }
    cm_gradcheck_result res[8];
    cm_err err = {0};
    cm_status st = cm_gradcheck(g, loss, n_wrt, wrt, sources, 1e-6, res, &err);
    CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
    if (getenv("DEBUG_GRAPH") && atoi(getenv("DEBUG_GRAPH")) == i) {
      cm_graph_print(g, stderr, NULL);
      for (int j = 0; j < n_wrt; j++)
        fprintf(stderr, "param %d abs %.3g grad %.3g\n", j, res[j].max_abs_error,
                res[j].max_abs_gradient);
    }
    for (int j = 0; j < n_wrt && !st; j++) {
      /* kinks (abs, max, relu, select at a tie) are measure-zero with random values */
      CHECK_MSG(res[j].max_rel_error < 1e-6, "%s: param %d: max relative error %.3g", what, j,
                res[j].max_rel_error);
      if (res[j].max_rel_error > worst) worst = res[j].max_rel_error, worst_graph = i;
    }
    for (int k = 0; k < n_wrt; k++) cm_tensor_free(&tensors[k]);
    free(sources);
    harness_done(&h);
  }
  fprintf(stderr, "random graphs: %d checked, worst relative error %.3g (graph %d)\n", n_graphs,
          worst, worst_graph);
}

/* Over 4 ranks: the adjoint of all_gather reads this rank's slice of the
 * all-reduced adjoint through the "rank" input. The oracle runs one rank, so
 * this checks the construction: types, the rank input, the ops used. */
static void test_collectives_many_ranks(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {3, 4};
  cm_init init = {CM_INIT_UNIFORM, -1, 1};
  int x = cm_param(g, "x", CM_F32, 2, d, init);
  int y = cm_all_gather(g, x, 0, 4, "y");
  int axes[2] = {0, 1};
  int loss =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, y, NULL), 2, axes, false, "loss");
  int m = cm_all_reduce(g, x, CM_MODE_MEAN, 4, "m");
  int loss2 = cm_binary(g, CM_OP_ADD, loss, cm_reduce(g, CM_OP_REDUCE_SUM, m, 2, axes, false, NULL),
                        "total");
  int grads[1];
  cm_err err = {0};
  CHECK_MSG(cm_autodiff(g, loss2, 1, &x, grads, &err) == CM_OK, "%s", err.msg);
  CHECK(cm_graph_verify(g, NULL) == CM_OK);
  int rank = cm_graph_find(g, "rank");
  CHECK(rank >= 0 && g->nodes[rank].op == CM_OP_INPUT && g->nodes[rank].type.dtype == CM_I32);
  CHECK(cm_type_equal(&g->nodes[grads[0]].type, &g->nodes[x].type));
  int gathers = 0, sums = 0, means = 0;
  for (int i = loss2 + 1; i < g->n_nodes; i++) {
    gathers += g->nodes[i].op == CM_OP_GATHER;
    sums += g->nodes[i].op == CM_OP_ALL_REDUCE && g->nodes[i].attrs.mode == CM_MODE_SUM;
    means += g->nodes[i].op == CM_OP_ALL_REDUCE && g->nodes[i].attrs.mode == CM_MODE_MEAN;
  }
  CHECK(gathers == 1 && sums == 1 && means == 1);
  cm_graph_free(g);
}

/* ---- errors -------------------------------------------------------------- */

static void test_errors(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {3};
  int i = cm_input(g, "i", CM_I32, 1, d);
  int f = cm_cast(g, i, CM_F32, "f");
  int axes[1] = {0};
  int loss = cm_reduce(g, CM_OP_REDUCE_SUM, f, 1, axes, false, "loss");
  int grads[1];
  cm_err err = {0};
  CHECK(cm_autodiff(g, loss, 1, &i, grads, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"i\" (input) is i32[3]: cannot differentiate");

  /* w reaches the loss only through a cast to an integer */
  cm_init zeros = {CM_INIT_ZEROS, 0, 0};
  int w = cm_param(g, "w", CM_F32, 1, d, zeros);
  int wi = cm_cast(g, w, CM_I32, "w_int");
  int wf = cm_cast(g, wi, CM_F32, "w_back");
  int l2 = cm_reduce(g, CM_OP_REDUCE_SUM, wf, 1, axes, false, "loss2");
  CHECK(cm_autodiff(g, l2, 1, &w, grads, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"w\" reaches the loss \"loss2\" only through non-differentiable "
                              "ops, first \"w_int\" (cast)");

  /* the loss must be a float scalar */
  CHECK(cm_autodiff(g, f, 1, &w, grads, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "not a float scalar");

  /* stop_gradient: no gradient and no error; the gradient is a zero constant */
  int sg = cm_unary(g, CM_OP_STOP_GRADIENT, w, "sg");
  int l3 = cm_reduce(g, CM_OP_REDUCE_SUM, sg, 1, axes, false, "loss3");
  CHECK(cm_autodiff(g, l3, 1, &w, grads, &err) == CM_OK);
  CHECK(g->nodes[grads[0]].op == CM_OP_CONST && g->nodes[grads[0]].attrs.value == 0);
  CHECK(cm_graph_verify(g, NULL) == CM_OK);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_unary_ops), TEST(test_binary_ops_broadcasting), TEST(test_select_and_ties),
          TEST(test_reductions), TEST(test_movement), TEST(test_gather_scatter), TEST(test_matmul),
          TEST(test_conv), TEST(test_collectives_one_rank), TEST(test_collectives_many_ranks),
          TEST(test_composites), TEST(test_random_graphs), TEST(test_errors))
