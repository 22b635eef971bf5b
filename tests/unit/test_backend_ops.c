/* Every op of ir/ops.def on every backend that runs here, against the oracle.
 *
 * For each op, each dtype (f32, bf16, f16, i32, i64, bool) and a few random
 * shapes, a small graph applying the op to random sources (never zeros) runs
 * through fuse, schedule and memplan, then on
 *   - the CPU backend (cm_compile and cm_program_run: one adapter, run_cpu), and
 *   - the kernel-IR interpreter (cm_lower_plan, then cm_kernel_interpret),
 * and every output and assigned state must lie within the forward error bound
 * of the oracle (cm_eval_bounded): exact for integers and bool.
 *
 * The table `cases` says how to build a graph around each op and which dtypes
 * it takes (the builder must succeed for exactly those, and fail for the
 * others: the table is the op's dtype spec). A new op in ops.def fails this
 * test until it is added to `cases` or to `not_standalone` with the reason. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "codegen/codegen.h"
#include "runtime/runtime.h"

#include <stdlib.h>
#include <string.h>

static test_rng rng = {0x0b5e55ed};

#define F_ (1u << CM_F32 | 1u << CM_BF16 | 1u << CM_F16) /* floats */
#define I_ (1u << CM_I32 | 1u << CM_I64)                 /* integers */
#define B_ (1u << CM_BOOL)
static const cm_dtype dtypes[] = {CM_F32, CM_BF16, CM_F16, CM_I32, CM_I64, CM_BOOL};
enum { N_DTYPES = 6, TRIES = 2 };

/* ---- building the graphs -------------------------------------------------- */

/* A random shape of rank lo..hi, dims 1..7. */
static int rand_shape(int lo, int hi, int64_t *d) {
  int rank = (int)test_int(&rng, lo, hi);
  for (int i = 0; i < rank; i++) d[i] = test_int(&rng, 1, 7);
  return rank;
}
static int input(cm_graph *g, cm_dtype dt, int rank, const int64_t *d) {
  return cm_input(g, NULL, dt, rank, d);
}

typedef int (*build_fn)(cm_graph *g, cm_op op, cm_dtype dt);

static int b_source(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 3, d), s;
  cm_init init = {CM_INIT_ZEROS, 0, 0};
  if (op == CM_OP_PARAM) {
    s = cm_param(g, "p", dt, rank, d, init);
  } else if (op == CM_OP_STATE) {
    s = cm_state(g, "s", dt, rank, d, init);
  } else if (op == CM_OP_IOTA) {
    s = cm_iota(g, NULL, dt, rank, d, (int)test_int(&rng, 0, rank - 1));
  } else if (op == CM_OP_CONST) {
    int64_t n = 1;
    for (int i = 0; i < rank; i++) n *= d[i];
    double *data = malloc((size_t)n * sizeof *data);
    for (int64_t i = 0; i < n; i++) data[i] = test_value(&rng, dt);
    s = cm_const_data(g, NULL, dt, rank, d, data);
    free(data);
  } else {
    s = input(g, dt, rank, d);
  }
  /* a source alone is no kernel: select between it and an input */
  return cm_select(g, input(g, CM_BOOL, rank, d), s, input(g, dt, rank, d), "y");
}

static int b_unary(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 4, d);
  return cm_unary(g, op, input(g, dt, rank, d), "y");
}

static int b_cast(cm_graph *g, cm_op op, cm_dtype dt) {
  (void)op;
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 4, d);
  cm_dtype to = dtypes[test_int(&rng, 0, N_DTYPES - 1)];
  if (to == dt) to = dt == CM_F32 ? CM_I32 : CM_F32;
  return cm_cast(g, input(g, dt, rank, d), to, "y");
}

static int b_binary(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 4, d);
  return cm_binary(g, op, input(g, dt, rank, d), input(g, dt, rank, d), "y");
}

static int b_select(cm_graph *g, cm_op op, cm_dtype dt) {
  (void)op;
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 4, d);
  return cm_select(g, input(g, CM_BOOL, rank, d), input(g, dt, rank, d), input(g, dt, rank, d),
                   "y");
}

static int b_reduce(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 4, d), axes[CM_MAX_RANK], n = 0;
  for (int i = 0; i < rank; i++)
    if (test_uniform(&rng) < 0.5) axes[n++] = i;
  if (!n) axes[n++] = (int)test_int(&rng, 0, rank - 1);
  return cm_reduce(g, op, input(g, dt, rank, d), n, axes, test_uniform(&rng) < 0.5, "y");
}

static int b_movement(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK], e[CM_MAX_RANK], f[CM_MAX_RANK], s[CM_MAX_RANK];
  int rank = rand_shape(1, 4, d);
  switch (op) {
  case CM_OP_RESHAPE: {
    int64_t n = 1;
    for (int i = 0; i < rank; i++) n *= d[i];
    int64_t flat[2] = {n, 1};
    int r2 = rank == 1 ? 2 : 1; /* a column, or flat */
    return cm_reshape(g, input(g, dt, rank, d), r2, flat, "y");
  }
  case CM_OP_PERMUTE: {
    int perm[CM_MAX_RANK];
    for (int i = 0; i < rank; i++) perm[i] = i;
    for (int i = rank - 1; i > 0; i--) { /* Fisher-Yates */
      int j = (int)test_int(&rng, 0, i), t = perm[i];
      perm[i] = perm[j], perm[j] = t;
    }
    return cm_permute(g, input(g, dt, rank, d), perm, "y");
  }
  case CM_OP_BROADCAST:
    for (int i = 0; i < rank; i++) e[i] = test_uniform(&rng) < 0.5 ? 1 : d[i];
    return cm_broadcast(g, input(g, dt, rank, e), rank, d, "y");
  case CM_OP_SLICE:
    for (int i = 0; i < rank; i++) {
      e[i] = test_int(&rng, 0, d[i] - 1);
      f[i] = test_int(&rng, e[i] + 1, d[i]);
      s[i] = test_int(&rng, 1, 2);
    }
    return cm_slice(g, input(g, dt, rank, d), e, f, s, "y");
  case CM_OP_CONCAT: {
    int axis = (int)test_int(&rng, 0, rank - 1), xs[3], n = (int)test_int(&rng, 2, 3);
    for (int k = 0; k < n; k++) {
      d[axis] = test_int(&rng, 1, 4);
      xs[k] = input(g, dt, rank, d);
    }
    return cm_concat(g, n, xs, axis, "y");
  }
  case CM_OP_PAD:
    for (int i = 0; i < rank; i++) e[i] = test_int(&rng, 0, 2), f[i] = test_int(&rng, 0, 2);
    return cm_pad(g, input(g, dt, rank, d), e, f,
                  dt == CM_BOOL         ? 1
                  : cm_dtype_is_int(dt) ? 3
                                        : 0.5,
                  "y");
  default: return -1;
  }
}

/* gather / scatter_add: the index input is filled in range by fill() */
static int b_index(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK], e[CM_MAX_RANK];
  int rank = rand_shape(1, 3, d), axis = (int)test_int(&rng, 0, rank - 1);
  memcpy(e, d, sizeof e);
  e[axis] = test_int(&rng, 1, 5);
  cm_dtype it = test_uniform(&rng) < 0.5 ? CM_I32 : CM_I64;
  int x = input(g, dt, rank, d), idx = cm_input(g, "index", it, rank, e);
  if (op == CM_OP_GATHER) return cm_gather(g, x, idx, axis, "y");
  return cm_scatter_add(g, x, idx, input(g, dt, rank, e), axis, "y");
}

static int b_matmul(cm_graph *g, cm_op op, cm_dtype dt) {
  (void)op;
  int64_t bt = test_int(&rng, 1, 2), m = test_int(&rng, 1, 19), k = test_int(&rng, 1, 21);
  int64_t n = test_int(&rng, 1, 17);
  bool batched = test_uniform(&rng) < 0.5;
  bool ta = test_uniform(&rng) < 0.5;
  bool tb = test_uniform(&rng) < 0.5;
  int64_t da[3] = {bt, ta ? k : m, ta ? m : k}, db[3] = {bt, tb ? n : k, tb ? k : n};
  int r = batched ? 3 : 2;
  return cm_matmul(g, input(g, dt, r, da + 3 - r), input(g, dt, r, db + 3 - r), ta, tb, "y");
}

/* conv2d, or one of its adjoints with conv2d's attributes */
static int b_conv(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t nb = test_int(&rng, 1, 2), c = test_int(&rng, 1, 4), h = test_int(&rng, 3, 9);
  int64_t w = test_int(&rng, 3, 8);
  bool dw = test_uniform(&rng) < 0.35;
  int64_t o = dw ? c : test_int(&rng, 1, 5), kh = test_int(&rng, 1, 3), kw = test_int(&rng, 1, 3);
  int stride[2] = {(int)test_int(&rng, 1, 2), 0}, pad[2] = {(int)test_int(&rng, 0, 1), 0};
  stride[1] = (int)test_int(&rng, 1, 2), pad[1] = (int)test_int(&rng, 0, 1);
  int64_t xd[4] = {nb, c, h, w}, wd[4] = {o, dw ? 1 : c, kh, kw};
  int groups = dw ? (int)c : 1;
  if (op == CM_OP_CONV2D)
    return cm_conv2d(g, input(g, dt, 4, xd), input(g, dt, 4, wd), stride, pad, NULL, groups, "y");
  /* the adjoints take conv2d's attributes and the shape of what they compute */
  cm_graph *fw = cm_graph_new();
  int y = fw ? cm_conv2d(fw, input(fw, dt, 4, xd), input(fw, dt, 4, wd), stride, pad, NULL, groups,
                         NULL)
             : -1;
  if (y < 0 || cm_graph_error(fw)) {
    cm_graph_free(fw);
    return cm_graph_fail(g, "conv2d %s", cm_dtype_name(dt));
  }
  cm_attrs a = fw->nodes[y].attrs;
  cm_type yt = fw->nodes[y].type;
  cm_graph_free(fw);
  int dy = input(g, dt, 4, yt.dims), in[2];
  if (op == CM_OP_CONV2D_GRAD_INPUT) {
    in[0] = dy, in[1] = input(g, dt, 4, wd);
    a.rank = 4, memcpy(a.shape, xd, sizeof xd);
  } else {
    in[0] = input(g, dt, 4, xd), in[1] = dy;
    a.rank = 4, memcpy(a.shape, wd, sizeof wd);
  }
  cm_err err;
  return cm_graph_add(g, op, "y", in, 2, &a, &err);
}

static int b_collective(cm_graph *g, cm_op op, cm_dtype dt) {
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 3, d), x = input(g, dt, rank, d);
  if (op == CM_OP_ALL_REDUCE) return cm_all_reduce(g, x, CM_MODE_SUM, 1, "y");
  return cm_all_gather(g, x, 0, 1, "y");
}

/* s <- s op x, and an output reading the new value */
static int b_assign(cm_graph *g, cm_op op, cm_dtype dt) {
  (void)op;
  int64_t d[CM_MAX_RANK];
  int rank = rand_shape(1, 3, d);
  cm_init init = {CM_INIT_ZEROS, 0, 0};
  int s = cm_state(g, "s", dt, rank, d, init), x = input(g, dt, rank, d);
  int nv = dt == CM_BOOL ? cm_binary(g, CM_OP_NE, s, x, NULL) : cm_binary(g, CM_OP_SUB, s, x, NULL);
  cm_assign(g, s, nv, NULL);
  return cm_select(g, input(g, CM_BOOL, rank, d), nv, x, "y");
}

typedef struct op_case {
  cm_op op;
  build_fn build;
  unsigned dtypes; /* the dtypes the op takes: the builder succeeds for exactly these */
  bool positive;   /* float sources drawn positive (log, sqrt, rsqrt, pow's base) */
} op_case;

#define ALL_ (F_ | I_ | B_)
static const op_case op_cases[] = {
    {CM_OP_INPUT, b_source, ALL_, false},
    {CM_OP_PARAM, b_source, F_, false},
    {CM_OP_STATE, b_source, ALL_, false},
    {CM_OP_CONST, b_source, ALL_, false},
    {CM_OP_IOTA, b_source, F_ | I_, false},
    {CM_OP_NEG, b_unary, F_ | I_, false},
    {CM_OP_ABS, b_unary, F_ | I_, false},
    {CM_OP_EXP, b_unary, F_, false},
    {CM_OP_LOG, b_unary, F_, true},
    {CM_OP_SQRT, b_unary, F_, true},
    {CM_OP_RSQRT, b_unary, F_, true},
    {CM_OP_RECIP, b_unary, F_, false},
    {CM_OP_TANH, b_unary, F_, false},
    {CM_OP_ERF, b_unary, F_, false},
    {CM_OP_RELU, b_unary, F_ | I_, false},
    {CM_OP_STOP_GRADIENT, b_unary, ALL_, false},
    {CM_OP_CAST, b_cast, ALL_, false},
    {CM_OP_ADD, b_binary, F_ | I_, false},
    {CM_OP_SUB, b_binary, F_ | I_, false},
    {CM_OP_MUL, b_binary, F_ | I_, false},
    {CM_OP_DIV, b_binary, F_ | I_, false},
    {CM_OP_MAX, b_binary, F_ | I_, false},
    {CM_OP_MIN, b_binary, F_ | I_, false},
    {CM_OP_POW, b_binary, F_, true},
    {CM_OP_LT, b_binary, F_ | I_, false},
    {CM_OP_LE, b_binary, F_ | I_, false},
    {CM_OP_EQ, b_binary, ALL_, false},
    {CM_OP_NE, b_binary, ALL_, false},
    {CM_OP_SELECT, b_select, ALL_, false},
    {CM_OP_REDUCE_SUM, b_reduce, F_ | I_, false},
    {CM_OP_REDUCE_MAX, b_reduce, F_ | I_, false},
    {CM_OP_RESHAPE, b_movement, ALL_, false},
    {CM_OP_PERMUTE, b_movement, ALL_, false},
    {CM_OP_BROADCAST, b_movement, ALL_, false},
    {CM_OP_SLICE, b_movement, ALL_, false},
    {CM_OP_CONCAT, b_movement, ALL_, false},
    {CM_OP_PAD, b_movement, ALL_, false},
    {CM_OP_GATHER, b_index, ALL_, false},
    {CM_OP_SCATTER_ADD, b_index, F_ | I_, false},
    {CM_OP_MATMUL, b_matmul, F_ | I_, false},
    {CM_OP_CONV2D, b_conv, F_, false},
    {CM_OP_CONV2D_GRAD_INPUT, b_conv, F_, false},
    {CM_OP_CONV2D_GRAD_WEIGHT, b_conv, F_, false},
    {CM_OP_ASSIGN, b_assign, ALL_, false},
    {CM_OP_ALL_REDUCE, b_collective, F_ | I_, false},
    {CM_OP_ALL_GATHER, b_collective, ALL_, false},
};

/* Ops no standalone graph can run here, and why (each must still be in ops.def;
 * none today: the collectives run on one rank). Ends with CM_OP_COUNT. */
static const struct {
  cm_op op;
  const char *why;
} not_standalone[] = {{CM_OP_COUNT, "(end)"}};

/* Known gaps: (op, dtypes, backend) whose results exceed the oracle's bound,
 * with the reason. They still run (a failure to run fails), and their worst
 * ratio is printed, not checked; fixing one means deleting its line. None
 * today (bf16/f16 contractions multiply in f32 since their products became
 * exact: codegen/lower.c, cm_lower_product). Ends with CM_OP_COUNT. */
static const struct {
  cm_op op;
  unsigned dtypes;
  const char *backend;
  const char *why;
} known_gaps[] = {{CM_OP_COUNT, 0, "", "(end)"}};

static const char *known_gap(cm_op op, cm_dtype dt, const char *backend) {
  for (size_t k = 0; k < sizeof known_gaps / sizeof known_gaps[0]; k++)
    if (known_gaps[k].op == op && (known_gaps[k].dtypes >> dt & 1) &&
        !strcmp(known_gaps[k].backend, backend))
      return known_gaps[k].why;
  return NULL;
}

/* ---- sources ---------------------------------------------------------------- */

/* Random sources for g: never zero; an index input in range of the axis it
 * indexes (the gather's or scatter_add's operand 0); positive floats where
 * the op needs them. */
static void fill(const cm_graph *g, cm_tensor *t, const cm_tensor **src, bool positive) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&t[i], n->type, NULL) == CM_OK);
    src[i] = &t[i];
    int64_t range = 0;
    for (int u = 0; u < g->n_nodes; u++) {
      const cm_node *m = &g->nodes[u];
      if ((m->op == CM_OP_GATHER || m->op == CM_OP_SCATTER_ADD) && m->inputs[1] == i)
        range = g->nodes[m->inputs[0]].type.dims[m->attrs.axis];
    }
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++) {
      double v = range ? (double)test_int(&rng, 0, range - 1) : test_value(&rng, n->type.dtype);
      if (positive && cm_dtype_is_float(n->type.dtype)) v = fabs(v);
      cm_tensor_set_f64(&t[i], e, v);
    }
  }
}

/* ---- the backends ------------------------------------------------------------ */

/* The results of one run: out[j] graph output j, st[v] source v after the run. */
typedef struct run_result {
  cm_tensor *out, *st;
} run_result;

/* The CPU backend: g with plan p on copies of src, through cm_compile. */
static cm_status run_cpu(const cm_graph *g, const cm_plan *p, const cm_tensor *const *src,
                         run_result *r, cm_err *err) {
  cm_compile_opts o = {.threads = 1, .cache_dir = "", .plan = p};
  cm_program *pr = NULL;
  cm_status s = cm_compile(g, NULL, &o, &pr, err);
  cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; s == CM_OK && i < g->n_nodes; i++)
    if (src[i]) {
      cm_tensor_copy(&r->st[i], src[i], NULL);
      ptr[i] = &r->st[i];
    }
  if (s == CM_OK) s = cm_program_run(pr, ptr, r->out, err);
  free(ptr);
  cm_program_free(pr);
  return s;
}

/* The kernel-IR interpreter: lowers p and runs every kernel serially over an
 * arena, sources in copies of src. */
static cm_status run_interp(const cm_graph *g, const cm_plan *p, const cm_tensor *const *src,
                            run_result *r, cm_err *err) {
  cm_lower_opts lo = {NULL, false, 0};
  cm_kprogram prog;
  memset(&prog, 0, sizeof prog);
  cm_status s = cm_lower_plan(g, p, &lo, &prog, err);
  if (s != CM_OK) return s;
  for (int i = 0; i < g->n_nodes; i++)
    if (src[i]) cm_tensor_copy(&r->st[i], src[i], NULL);
  char *arena = calloc((size_t)prog.arena_bytes + 64, 1);
  char *scratch = calloc((size_t)prog.max_scratch_bytes + 64, 1);
  for (int i = 0; i < prog.n_kernels && s == CM_OK; i++) {
    const cm_kernel *k = &prog.kernels[i];
    void **bufs = calloc((size_t)k->n_buffers + 1, sizeof *bufs);
    void **owned = calloc((size_t)k->n_buffers + 1, sizeof *owned);
    for (int b = 0; b < k->n_buffers && s == CM_OK; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      if (kb->kind == CM_KBUF_ARENA) bufs[b] = arena + kb->offset;
      if (kb->kind == CM_KBUF_SCRATCH) bufs[b] = scratch + kb->offset;
      if (kb->kind == CM_KBUF_SOURCE) bufs[b] = r->st[kb->node].data;
      if (kb->kind == CM_KBUF_STATUS) bufs[b] = owned[b] = calloc((size_t)kb->numel + 1, 8);
      if (kb->kind == CM_KBUF_CONST) {
        bufs[b] = owned[b] = cm_kernel_const_data(g, kb, err);
        if (!owned[b]) s = CM_EINTERNAL;
      }
    }
    if (s == CM_OK) s = cm_kernel_interpret(k, bufs, err);
    for (int b = 0; b < k->n_buffers; b++) free(owned[b]);
    free(bufs), free(owned);
  }
  for (int j = 0; s == CM_OK && j < g->n_outputs; j++) {
    int v = g->outputs[j];
    const cm_node *u = &g->nodes[v];
    if (u->op == CM_OP_ASSIGN || p->offset[v] < 0) {
      s = cm_tensor_copy(&r->out[j], &r->st[u->op == CM_OP_ASSIGN ? u->inputs[0] : v], err);
    } else {
      cm_tensor view = test_view(u->type, arena + p->offset[v]);
      s = cm_tensor_copy(&r->out[j], &view, err);
    }
  }
  free(arena), free(scratch);
  cm_kprogram_free(&prog);
  return s;
}

typedef cm_status (*backend_fn)(const cm_graph *, const cm_plan *, const cm_tensor *const *,
                                run_result *, cm_err *);
static const struct {
  const char *name;
  backend_fn run;
} backends[] = {{"cpu", run_cpu}, {"interpreter", run_interp}};
enum { N_BACKENDS = 2 };

/* ---- the test ---------------------------------------------------------------- */

static int ran[CM_OP_COUNT][N_BACKENDS]; /* graphs holding the op that ran and compared */

/* g (built; check frees it) on every backend against the oracle. */
static void check(cm_graph *g0, const op_case *c, cm_dtype dt, int try) {
  char what[96];
  snprintf(what, sizeof what, "%s %s #%d", cm_op_name(c->op), cm_dtype_name(dt), try);
  cm_err err = {0};
  cm_pass_state ps = {g0, NULL};
  cm_status s = cm_pipeline_run(&ps, "fuse,schedule,memplan", NULL, NULL, 0, NULL, &err);
  CHECK_MSG(s == CM_OK, "%s: pipeline: %s", what, err.msg);
  cm_graph *g = ps.g;
  if (s != CM_OK) {
    cm_plan_free(ps.plan);
    cm_graph_free(g);
    return;
  }
  int n = g->n_nodes;
  cm_tensor *t = calloc((size_t)n, sizeof *t), *v = calloc((size_t)n, sizeof *v);
  cm_tensor *bnd = calloc((size_t)n, sizeof *bnd);
  const cm_tensor **src = calloc((size_t)n, sizeof *src);
  fill(g, t, src, c->positive);
  s = cm_eval_bounded(g, src, v, bnd, &err);
  CHECK_MSG(s == CM_OK, "%s: oracle: %s", what, err.msg);
  for (int b = 0; s == CM_OK && b < N_BACKENDS; b++) {
    run_result r = {calloc((size_t)g->n_outputs + 1, sizeof(cm_tensor)),
                    calloc((size_t)n, sizeof(cm_tensor))};
    cm_status rs = backends[b].run(g, ps.plan, src, &r, &err);
    CHECK_MSG(rs == CM_OK, "%s on %s: %s", what, backends[b].name, err.msg);
    bool ok = rs == CM_OK;
    for (int j = 0; ok && j < g->n_outputs + n; j++) {
      int node;
      const cm_tensor *got;
      if (j < g->n_outputs) {
        node = g->outputs[j], got = &r.out[j];
      } else {
        node = j - g->n_outputs;
        if (g->nodes[node].op != CM_OP_ASSIGN) continue;
        got = &r.st[g->nodes[node].inputs[0]];
      }
      test_bounded q = test_check_node(got, &v[node], &bnd[node], g->nodes[node].type.dtype);
      const char *gap = known_gap(c->op, dt, backends[b].name);
      if (gap) {
        fprintf(stderr, "  known gap: %s on %s: worst |got - f64| / bound %.3g (%s)\n", what,
                backends[b].name, q.ratio, gap);
        continue;
      }
      CHECK_MSG(q.ratio <= 1, "%s on %s: %s: |got - f64| = %g at [%lld] exceeds its bound %g", what,
                backends[b].name, j < g->n_outputs ? "output" : "state", q.diff, (long long)q.at,
                q.bound);
      ok &= q.ratio <= 1;
    }
    for (int i = 0; ok && i < n; i++) ran[g->nodes[i].op][b]++;
    for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&r.out[j]);
    for (int i = 0; i < n; i++) cm_tensor_free(&r.st[i]);
    free(r.out), free(r.st);
  }
  for (int i = 0; i < n; i++) cm_tensor_free(&t[i]), cm_tensor_free(&v[i]), cm_tensor_free(&bnd[i]);
  free(t), free(v), free(bnd), free(src);
  cm_plan_free(ps.plan);
  cm_graph_free(g);
}

static void test_every_op(void) {
  static const char *const op_names[] = {
#define CM_OP(NAME, str, cat, arity, attrs) str,
#include "ir/ops.def"
#undef CM_OP
  };
  const int n_ops = (int)(sizeof op_names / sizeof op_names[0]);
  CHECK(n_ops == CM_OP_COUNT);
  for (size_t c = 0; c < sizeof op_cases / sizeof op_cases[0]; c++)
    for (int q = 0; q < N_DTYPES; q++) {
      cm_dtype dt = dtypes[q];
      bool takes = (op_cases[c].dtypes >> dt) & 1;
      for (int try = 0; try < TRIES; try++) {
        cm_graph *g = cm_graph_new();
        int y = op_cases[c].build(g, op_cases[c].op, dt);
        bool built = y >= 0 && !cm_graph_error(g);
        if (built) built = cm_graph_add_output(g, y, NULL) == CM_OK;
        CHECK_MSG(built == takes, "%s %s: %s (%s)", cm_op_name(op_cases[c].op), cm_dtype_name(dt),
                  built ? "builds, but the table says the op does not take this dtype"
                        : "does not build, but the table says the op takes this dtype",
                  cm_graph_error(g) ? cm_graph_error(g) : "");
        if (built)
          check(g, &op_cases[c], dt, try); /* frees g */
        else
          cm_graph_free(g);
        if (!built) break;
      }
    }
  /* every op of ops.def ran on every backend, or is listed with its reason */
  for (int op = 0; op < n_ops; op++) {
    bool listed = false;
    for (size_t k = 0; k < sizeof not_standalone / sizeof not_standalone[0]; k++)
      listed |= (int)not_standalone[k].op == op;
    for (int b = 0; b < N_BACKENDS; b++)
      CHECK_MSG(listed != (ran[op][b] > 0), "op %s: %s on %s (%d graphs)", op_names[op],
                listed ? "listed as not standalone, but it ran" : "neither run nor listed",
                backends[b].name, ran[op][b]);
  }
}

TEST_MAIN(TEST(test_every_op))
