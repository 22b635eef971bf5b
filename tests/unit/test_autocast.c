/* The autocast pass (passes/autocast.c) against the oracle's derived error
 * bounds. For a graph G and A = autocast(G, bf16):
 *  - G's exact (f64) results lie within the bounds cm_eval_bounded gives for
 *    A: computing in f32 is a conforming evaluation of A (a down-cast may keep
 *    its value wider, docs/ops.md "Error bounds"), so the rewrite changed
 *    nothing but precision (the oracle keeps a cast's f64 value unrounded and
 *    bounds it by u|x|: a rewrite that rewired an operand or dropped a
 *    transpose moves the value itself and fails here);
 *  - A evaluated with every value rounded to its dtype (the oracle's native
 *    precision: operands and contraction results really rounded to bf16) lies
 *    within them too;
 * and the check can fail:
 *  - that bf16 evaluation leaves G's own (f32) bounds: the rewrite is real;
 *  - it leaves the bounds of autocast(G, f16): rounding to a coarser dtype
 *    than the graph says is caught;
 *  - a wrong rewrite that also rounds every f32 elementwise result to bf16
 *    (as if a cast back to f32 were dropped) leaves A's bounds.
 * On random graphs (testlib.h's blocks: batched/transposed matmuls, convs;
 * op by op: a @ a^T) and on every shipped variant's training step, shrunk
 * (tests/model_step.h), at every node of G (found in A by name: every node
 * is given one first). Bounds carried end to end through a whole step grow
 * with depth and become infinite at a pole (the first softmax's exp or
 * division, a LayerNorm's rsqrt; AdamW's division inherits it): elements with
 * an infinite bound are counted, not checked, each step reports where its
 * bounds first became infinite, and asserts that it checked some. */
#include "../test.h"
#include "../testlib.h"
#include "../model_step.h"
#include "models/models.h"
#include "passes/passes.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static test_rng rng = {20261207};
static double uniform(void) {
  return test_uniform(&rng);
}

static cm_graph *autocast_copy(const cm_graph *g, cm_dtype low, int *n_rewritten) {
  cm_graph *a = cm_graph_clone(g);
  cm_err err = {0};
  CHECK_MSG(cm_autocast(&a, low, n_rewritten, &err) == CM_OK, "%s", err.msg);
  return a;
}

/* A deliberately wrong autocast: A with every f32 elementwise result (casts
 * aside) also rounded to bf16 and back. */
static cm_graph *round_elementwise_too(const cm_graph *a) {
  cm_rewriter r;
  cm_err err = {0};
  CHECK(cm_rewriter_begin(&r, a, &err) == CM_OK);
  for (int i = 0; i < a->n_nodes; i++) {
    int id = cm_rewriter_copy(&r, i);
    const cm_node *n = &a->nodes[i];
    if (id >= 0 && n->type.dtype == CM_F32 && n->op != CM_OP_CAST &&
        cm_op_get_info(n->op)->category == CM_CAT_ELEMENTWISE)
      r.map[i] = cm_cast(r.g, cm_cast(r.g, id, CM_BF16, NULL), CM_F32, NULL);
  }
  cm_graph *out = NULL;
  CHECK_MSG(cm_rewriter_finish(&r, &out, &err) == CM_OK, "%s", err.msg);
  return out;
}

/* Gives every builder-named node of g a name of its own ("v.<id>"), so that
 * the rewrites, which keep user names (a contraction's on its f32 result),
 * keep them: a node of G is found in a rewrite of it by name. */
static void name_every_node(cm_graph *g) {
  for (int i = 0; i < g->n_nodes; i++) {
    if (g->nodes[i].name[0] != '%') continue;
    char name[64];
    snprintf(name, sizeof name, "v.%d", i);
    for (int k = 0; cm_graph_find(g, name) >= 0; k++) snprintf(name, sizeof name, "v.%d.%d", i, k);
    cm_err err = {0};
    CHECK_MSG(cm_graph_rename(g, i, name, &err) == CM_OK, "%s", err.msg);
  }
}

/* One evaluation of a graph whose sources are G's, matched by order. */
typedef struct evaluation {
  const cm_graph *g;
  cm_tensor *values, *bounds; /* bounds NULL unless bounded */
} evaluation;

enum { NATIVE, EXACT, BOUNDED }; /* rounded to each dtype; in f64; in f64 with bounds */

static bool evaluate(evaluation *e, const cm_graph *g, const cm_tensor *const *ordered_sources,
                     int mode) {
  memset(e, 0, sizeof *e);
  e->g = g;
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  e->values = calloc((size_t)g->n_nodes, sizeof *e->values);
  if (mode == BOUNDED) e->bounds = calloc((size_t)g->n_nodes, sizeof *e->bounds);
  for (int i = 0, k = 0; i < g->n_nodes; i++) {
    cm_op op = g->nodes[i].op;
    if (op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE) src[i] = ordered_sources[k++];
  }
  cm_err err = {0};
  cm_eval_opts opts = {mode == NATIVE ? CM_PRECISION_NATIVE : CM_PRECISION_F64};
  cm_status st = mode == BOUNDED ? cm_eval_bounded(g, src, e->values, e->bounds, &err)
                                 : cm_eval(g, src, e->values, &opts, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  free(src);
  return st == CM_OK;
}

static void evaluation_free(evaluation *e) {
  for (int i = 0; e->values && i < e->g->n_nodes; i++) cm_tensor_free(&e->values[i]);
  for (int i = 0; e->bounds && i < e->g->n_nodes; i++) cm_tensor_free(&e->bounds[i]);
  free(e->values), free(e->bounds);
}

typedef struct tally {
  int64_t checked;   /* elements with a finite bound */
  int64_t unbounded; /* elements whose bound is infinite (docs/ops.md: a pole, an overflow) */
  int64_t outside;   /* checked elements outside their bound */
  double worst;      /* max |x - center| / bound */
} tally;

/* Compares x with center's bounds on every float node of `names` (a graph
 * both were made from) found by name in both. */
static tally compare(const evaluation *x, const evaluation *center, const cm_graph *names) {
  tally t = {0, 0, 0, 0};
  for (int id = 0; id < names->n_nodes; id++) {
    if (!cm_dtype_is_float(names->nodes[id].type.dtype)) continue;
    int xi = cm_graph_find(x->g, names->nodes[id].name);
    int ci = cm_graph_find(center->g, names->nodes[id].name);
    if (xi < 0 || ci < 0) continue;
    const cm_tensor *xv = &x->values[xi], *cv = &center->values[ci], *b = &center->bounds[ci];
    int64_t n = cm_type_numel(&cv->type);
    CHECK(cm_type_numel(&xv->type) == n);
    for (int64_t i = 0; i < n; i++) {
      double bound = cm_tensor_get_f64(b, i), xe = cm_tensor_get_f64(xv, i),
             ce = cm_tensor_get_f64(cv, i);
      if (!isfinite(bound)) {
        t.unbounded++;
        continue;
      }
      t.checked++;
      double d = xe == ce ? 0 : fabs(xe - ce);
      if (!(d <= bound)) t.outside++;
      if (d > 0) t.worst = fmax(t.worst, bound > 0 ? d / bound : INFINITY);
    }
  }
  return t;
}

/* Where bounds stop: the ops of the nodes with an infinite bound whose
 * inputs all have finite ones, counted ("div 12, sqrt 3"). */
static void unbounded_origins(const evaluation *e, char *out, size_t size) {
  const cm_graph *g = e->g;
  bool *infinite = calloc((size_t)g->n_nodes, sizeof *infinite);
  int counts[CM_OP_COUNT] = {0};
  for (int id = 0; id < g->n_nodes; id++) {
    const cm_tensor *b = &e->bounds[id];
    for (int64_t i = 0; i < cm_type_numel(&b->type) && !infinite[id]; i++)
      infinite[id] = !isfinite(cm_tensor_get_f64(b, i));
    bool inherited = false;
    for (int k = 0; k < g->nodes[id].n_inputs; k++) inherited |= infinite[g->nodes[id].inputs[k]];
    if (infinite[id] && !inherited) counts[g->nodes[id].op]++;
  }
  free(infinite);
  size_t len = 0;
  out[0] = 0;
  for (int op = 0; op < CM_OP_COUNT; op++)
    if (counts[op] && len < size)
      len += (size_t)snprintf(out + len, size - len, "%s%s %d", len ? ", " : "",
                              cm_op_name((cm_op)op), counts[op]);
  if (!len) snprintf(out, size, "none");
}

typedef struct verdict {
  char unbounded_from[256]; /* unbounded_origins of the autocast graph */
  int rewritten;
  tally exact_in_autocast, native_in_autocast, native_in_f32, native_in_f16, wrong_in_autocast;
} verdict;

/* The checks of the header on one graph (its nodes named); sources are G's,
 * in node order. with_negatives: also the f16 bounds and the wrong rewrite.
 * At most three evaluations of a whole training step live at a time. */
static verdict check_graph(const cm_graph *g, const cm_tensor *const *ordered_sources,
                           bool with_negatives) {
  verdict v;
  memset(&v, 0, sizeof v);
  cm_graph *a = autocast_copy(g, CM_BF16, &v.rewritten);
  evaluation native_a = {0}, bounded = {0}, other = {0};
  bool ok = evaluate(&native_a, a, ordered_sources, NATIVE);
  if (ok && evaluate(&bounded, a, ordered_sources, BOUNDED)) {
    v.native_in_autocast = compare(&native_a, &bounded, a);
    unbounded_origins(&bounded, v.unbounded_from, sizeof v.unbounded_from);
    if (evaluate(&other, g, ordered_sources, EXACT))
      v.exact_in_autocast = compare(&other, &bounded, g);
    evaluation_free(&other);
    if (with_negatives) {
      cm_graph *wrong = round_elementwise_too(a);
      if (evaluate(&other, wrong, ordered_sources, NATIVE))
        v.wrong_in_autocast = compare(&other, &bounded, a);
      evaluation_free(&other);
      cm_graph_free(wrong);
    }
  }
  evaluation_free(&bounded);
  if (ok && evaluate(&bounded, g, ordered_sources, BOUNDED))
    v.native_in_f32 = compare(&native_a, &bounded, g);
  evaluation_free(&bounded);
  if (ok && with_negatives) {
    int n16 = 0;
    cm_graph *a16 = autocast_copy(g, CM_F16, &n16);
    CHECK(n16 == v.rewritten);
    if (evaluate(&bounded, a16, ordered_sources, BOUNDED))
      v.native_in_f16 = compare(&native_a, &bounded, g);
    evaluation_free(&bounded);
    cm_graph_free(a16);
  }
  evaluation_free(&native_a);
  cm_graph_free(a);
  return v;
}

/* Sources of g in node order, uniform in [-1, 1) (testlib.h); *n gets their count. */
static const cm_tensor **random_sources(const cm_graph *g, cm_tensor **owned) {
  *owned = calloc((size_t)g->n_nodes, sizeof **owned);
  const cm_tensor **by_node = calloc((size_t)g->n_nodes, sizeof *by_node);
  const cm_tensor **ordered = calloc((size_t)g->n_nodes, sizeof *ordered);
  test_fill_sources(&rng, g, *owned, by_node);
  for (int i = 0, k = 0; i < g->n_nodes; i++)
    if (by_node[i]) ordered[k++] = by_node[i];
  free(by_node);
  return ordered;
}

static void free_sources(const cm_graph *g, cm_tensor *owned, const cm_tensor **ordered) {
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&owned[i]);
  free(owned);
  free(ordered);
}

/* A connected graph of 2-D values grown op by op (testlib.h), with a @ a^T
 * among its ops. */
static cm_graph *random_op_graph(int n_ops) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {test_int(&rng, 2, 6), test_int(&rng, 2, 9)};
  test_pool p = {{0}, 0};
  for (int i = 0; i < 3; i++) p.ids[p.n++] = cm_input(g, NULL, CM_F32, 2, d);
  for (int s = 0; s < n_ops; s++) test_random_op(&rng, g, &p, 0);
  for (int k = 0; k < 3; k++) cm_graph_add_output(g, p.ids[p.n - 1 - k], NULL);
  return g;
}

static void report(const char *what, int graphs, const verdict *sum, int with_contraction,
                   int caught_f32, int caught_f16, int caught_wrong, double seconds) {
  fprintf(stderr,
          "%-28s %4d graphs (%d with contractions, %d rewritten): %lld elements checked, %lld "
          "unbounded; worst |f32 exact - oracle| / bound %.3g, |bf16 - oracle| / bound %.3g; "
          "caught: bf16 outside f32 bounds on %d, outside f16 bounds on %d, wrong rewrite on "
          "%d; %.2f s\n",
          what, graphs, with_contraction, sum->rewritten, (long long)sum->exact_in_autocast.checked,
          (long long)sum->exact_in_autocast.unbounded, sum->exact_in_autocast.worst,
          sum->native_in_autocast.worst, caught_f32, caught_f16, caught_wrong, seconds);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void check_random(const char *what, int n_graphs, bool op_by_op) {
  double t0 = now_s();
  verdict sum;
  memset(&sum, 0, sizeof sum);
  int with_contraction = 0, caught_f32 = 0, caught_f16 = 0, caught_wrong = 0;
  for (int t = 0; t < n_graphs; t++) {
    rng.s = 7919ull * (uint64_t)t + (op_by_op ? 1 : 2);
    cm_graph *g = op_by_op ? random_op_graph(6 + t % 20) : test_random_graph(&rng, 4);
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    name_every_node(g);
    cm_tensor *owned;
    const cm_tensor **sources = random_sources(g, &owned);
    verdict v = check_graph(g, sources, true);
    CHECK_MSG(v.exact_in_autocast.outside == 0,
              "%s graph %d: %lld f32 results outside the autocast graph's bounds", what, t,
              (long long)v.exact_in_autocast.outside);
    CHECK_MSG(v.native_in_autocast.outside == 0,
              "%s graph %d: %lld bf16 results outside the autocast graph's bounds", what, t,
              (long long)v.native_in_autocast.outside);
    if (v.rewritten) {
      with_contraction++;
      caught_f32 += v.native_in_f32.outside > 0;
      caught_f16 += v.native_in_f16.outside > 0;
      caught_wrong += v.wrong_in_autocast.outside > 0;
    }
    sum.rewritten += v.rewritten;
    sum.exact_in_autocast.checked += v.exact_in_autocast.checked;
    sum.exact_in_autocast.unbounded += v.exact_in_autocast.unbounded;
    sum.exact_in_autocast.worst = fmax(sum.exact_in_autocast.worst, v.exact_in_autocast.worst);
    sum.native_in_autocast.worst = fmax(sum.native_in_autocast.worst, v.native_in_autocast.worst);
    free_sources(g, owned, sources);
    cm_graph_free(g);
  }
  report(what, n_graphs, &sum, with_contraction, caught_f32, caught_f16, caught_wrong,
         now_s() - t0);
  /* The checks can fail, and do on most graphs; not on all: a contraction
   * reading values exact in bf16 (a pad's 0.25) or feeding only a saturated
   * tanh or a max it loses changes nothing a bound can see. */
  CHECK_MSG(2 * with_contraction > n_graphs, "%s: %d graphs with contractions", what,
            with_contraction);
  CHECK_MSG(4 * caught_f32 > 3 * with_contraction, "%s: bf16 left the f32 bounds on %d of %d", what,
            caught_f32, with_contraction);
  CHECK_MSG(4 * caught_f16 > 3 * with_contraction, "%s: bf16 left the f16 bounds on %d of %d", what,
            caught_f16, with_contraction);
  CHECK_MSG(4 * caught_wrong > 3 * with_contraction,
            "%s: the wrong rewrite left the bounds on %d of %d", what, caught_wrong,
            with_contraction);
}

/* 200 graphs of each kind; 50 in the sanitizer build (CMAEC_TEST_QUICK, ~5x slower) */
static int n_random_graphs(void) {
  return getenv("CMAEC_TEST_QUICK") ? 50 : 200;
}
static void test_random_block_graphs(void) {
  check_random("random block graphs", n_random_graphs(), false);
}
static void test_random_op_graphs(void) {
  check_random("random op-by-op graphs", n_random_graphs(), true);
}

/* A shipped variant's training step, shrunk, as `cmaec
 * build --train` makes it with test_cpu_exec's sources; NULL on failure. */
static cm_graph *variant_step(const char *name, const char *const *ov, int n_ov, cm_tensor **owned,
                              const cm_tensor ***ordered) {
  char path[128];
  snprintf(path, sizeof path, "models/%s.json", name);
  cm_model_config cfg;
  cm_model m;
  cm_graph *step = test_build_step(path, ov, n_ov, 2, NULL, &cfg, &m);
  if (step) {
    *owned = calloc((size_t)step->n_nodes, sizeof **owned);
    const cm_tensor **by_node = calloc((size_t)step->n_nodes, sizeof *by_node);
    *ordered = calloc((size_t)step->n_nodes, sizeof **ordered);
    rng.s = 4242;
    test_bind_step(step, &cfg, &m, *owned, by_node, uniform);
    for (int i = 0, k = 0; i < step->n_nodes; i++)
      if (by_node[i]) (*ordered)[k++] = by_node[i];
    free(by_node);
  }
  return step;
}

/* Every shipped variant's step, a case each (`test_autocast test_model_steps:cmae_vit_base`). */
static void test_model_steps(void) {
  static const struct {
    const char *name;
    const char *const *ov;
    int n_ov;
    bool ci; /* run when no case is selected (the others are ctest entries labelled long) */
  } variants[] = {
      /* the tiny ones keep their images, patches and masks; widths and depths shrunk */
      {"cmae_vit_tiny_fmnist", test_shrunk_vit + 3, TEST_SHRUNK_VIT_N - 3, false},
      {"cmae_convvit_tiny_fmnist", test_shrunk_convvit + 3, TEST_SHRUNK_CONVVIT_N - 3, false},
      {"cmae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_N, true},
      {"cmae_vit_small", test_shrunk_vit, TEST_SHRUNK_VIT_N, false},
      {"cmae_vit_large", test_shrunk_vit, TEST_SHRUNK_VIT_N, false},
      {"mae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_MAE, false},
      {"cmae_convvit_base", test_shrunk_convvit, TEST_SHRUNK_CONVVIT_N, false},
  };
  for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
    if (!test_case_wanted(variants[i].name) || (!variants[i].ci && !test_cases_selected()))
      continue;
    double t0 = now_s();
    cm_tensor *owned = NULL;
    const cm_tensor **sources = NULL;
    cm_graph *step =
        variant_step(variants[i].name, variants[i].ov, variants[i].n_ov, &owned, &sources);
    if (!step) continue;
    name_every_node(step);
    verdict v = check_graph(step, sources, true);
    const char *name = variants[i].name;
    CHECK_MSG(v.rewritten > 0, "%s: no contraction rewritten", name);
    CHECK_MSG(v.exact_in_autocast.outside == 0, "%s: %lld f32 results outside the bounds", name,
              (long long)v.exact_in_autocast.outside);
    CHECK_MSG(v.native_in_autocast.outside == 0, "%s: %lld bf16 results outside the bounds", name,
              (long long)v.native_in_autocast.outside);
    /* bounds grow with depth and stop (infinite) at a pole: what stays finite is checked */
    CHECK_MSG(v.exact_in_autocast.checked > 0, "%s: no finite bound", name);
    CHECK_MSG(v.native_in_f32.outside > 0, "%s: bf16 within the f32 bounds", name);
    CHECK_MSG(v.native_in_f16.outside > 0, "%s: bf16 within the f16 bounds", name);
    CHECK_MSG(v.wrong_in_autocast.outside > 0, "%s: the wrong rewrite within the bounds", name);
    fprintf(stderr,
            "%-26s %5d nodes, %3d contractions to bf16: %lld elements checked, %lld unbounded "
            "(bounds first infinite at: %s); worst / bound: f32 exact %.3g, bf16 %.3g; outside: "
            "f32 bounds %lld, f16 bounds %lld, wrong rewrite %lld; %.2f s\n",
            name, step->n_nodes, v.rewritten, (long long)v.exact_in_autocast.checked,
            (long long)v.exact_in_autocast.unbounded, v.unbounded_from, v.exact_in_autocast.worst,
            v.native_in_autocast.worst, (long long)v.native_in_f32.outside,
            (long long)v.native_in_f16.outside, (long long)v.wrong_in_autocast.outside,
            now_s() - t0);
    free_sources(step, owned, sources);
    cm_graph_free(step);
  }
}

static int count_nodes(const cm_graph *g, cm_op op, cm_dtype dt) {
  int n = 0;
  for (int i = 0; i < g->n_nodes; i++) n += g->nodes[i].op == op && g->nodes[i].type.dtype == dt;
  return n;
}

/* `-p autocast,simplify,cse,dce`: the statistics line; simplify keeps every
 * rounding (cast(cast(x, bf16), f32) is no identity), cse merges the casts of
 * a duplicated contraction. Then on random graphs: the clean-up after
 * autocast changes no bit of what the autocast graph computes. */
static void test_pass_in_pipeline(void) {
  cm_graph *g = cm_graph_new();
  int64_t dx[2] = {4, 3}, dw[2] = {3, 5}, ddy[2] = {4, 5};
  int x = cm_input(g, "x", CM_F32, 2, dx), w = cm_input(g, "w", CM_F32, 2, dw);
  int dy = cm_input(g, "dy", CM_F32, 2, ddy);
  int m1 = cm_matmul(g, x, w, false, false, "m1"), m2 = cm_matmul(g, x, w, false, false, "m2");
  int y = cm_binary(g, CM_OP_ADD, m1, m2, "y");
  int gw = cm_matmul(g, x, dy, true, false, "gw");
  int back = cm_cast(g, cm_cast(g, y, CM_BF16, "y.round"), CM_F32, "y.back");
  cm_graph_add_output(g, back, NULL);
  cm_graph_add_output(g, gw, NULL);
  CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
  cm_pass_state s = {g, NULL};
  cm_pipeline_opts opts = {true, false, NULL, NULL};
  cm_pass_stat stats[4];
  int n_stats = 0;
  cm_err err = {0};
  CHECK_MSG(cm_pipeline_run(&s, "autocast,simplify,cse,dce", &opts, stats, 4, &n_stats, &err) ==
                CM_OK,
            "%s", err.msg);
  CHECK(n_stats == 4);
  /* operand casts x, w, dy and three results */
  CHECK_STR_CONTAINS(stats[0].detail, "3 contractions to bf16, 6 casts");
  CHECK(strstr(stats[1].detail, "cast of cast") == NULL);
  CHECK(count_nodes(s.g, CM_OP_MATMUL, CM_BF16) == 2); /* m2 merged into m1 */
  CHECK(count_nodes(s.g, CM_OP_MATMUL, CM_F32) == 0);
  CHECK(count_nodes(s.g, CM_OP_CAST, CM_BF16) == 4); /* x, w, dy, y.round */
  CHECK(count_nodes(s.g, CM_OP_CAST, CM_F32) == 3);  /* m1, gw, y.back */
  CHECK(cm_graph_find(s.g, "x.bf16") >= 0 && cm_graph_find(s.g, "m1.bf16") >= 0);
  CHECK(cm_graph_find(s.g, "gw") == s.g->outputs[1]);
  CHECK(strstr(cm_default_pipeline, "autocast") == NULL);
  cm_graph_free(s.g);

  int compared = 0;
  for (int t = 0; t < 100; t++) {
    rng.s = 104729ull * (uint64_t)t + 3;
    cm_graph *r = random_op_graph(6 + t % 20);
    cm_graph *a = autocast_copy(r, CM_BF16, NULL);
    cm_pass_state c = {cm_graph_clone(a), NULL};
    CHECK_MSG(cm_pipeline_run(&c, "simplify,cse,dce", &opts, NULL, 0, NULL, &err) == CM_OK, "%s",
              err.msg);
    CHECK(count_nodes(c.g, CM_OP_MATMUL, CM_F32) == 0); /* none turned back (dce may drop some) */
    cm_tensor *owned;
    const cm_tensor **sources = random_sources(r, &owned);
    evaluation before, after;
    bool before_ok = evaluate(&before, a, sources, NATIVE); /* both run: both are freed below */
    bool after_ok = evaluate(&after, c.g, sources, NATIVE);
    if (before_ok && after_ok) {
      for (int o = 0; o < a->n_outputs; o++) {
        const cm_tensor *u = &before.values[a->outputs[o]], *v = &after.values[c.g->outputs[o]];
        for (int64_t i = 0; i < cm_type_numel(&u->type); i++) {
          double p = cm_tensor_get_f64(u, i), q = cm_tensor_get_f64(v, i);
          CHECK_MSG(memcmp(&p, &q, sizeof p) == 0 || (isnan(p) && isnan(q)),
                    "graph %d output %d [%lld]: %.9g after the clean-up, %.9g before", t, o,
                    (long long)i, q, p);
        }
        compared++;
      }
    }
    evaluation_free(&before), evaluation_free(&after);
    free_sources(r, owned, sources);
    cm_graph_free(c.g), cm_graph_free(a), cm_graph_free(r);
  }
  CHECK(compared == 300);
}

/* Bad arguments are errors, not crashes; a graph with nothing to rewrite is
 * handed back untouched. */
static void test_errors_and_no_op(void) {
  cm_err err = {0};
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {2, 2};
  int x = cm_input(g, "x", CM_BF16, 2, d);
  cm_graph_add_output(g, cm_matmul(g, x, x, false, false, "m"), NULL);
  cm_graph *same = g;
  int n = -1;
  CHECK(cm_autocast(&g, CM_F32, &n, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "autocast: the low precision must be bf16 or f16, not f32");
  CHECK(g == same && n == 0);
  CHECK(cm_autocast(&g, CM_I32, NULL, &err) == CM_EINVALID);
  CHECK(cm_autocast(NULL, CM_BF16, NULL, &err) == CM_EINVALID);
  CHECK(cm_autocast(&g, CM_BF16, &n, &err) == CM_OK);
  CHECK(g == same && n == 0 && g->n_nodes == 2);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_random_block_graphs), TEST(test_random_op_graphs), TEST(test_model_steps),
          TEST(test_pass_in_pipeline), TEST(test_errors_and_no_op))
