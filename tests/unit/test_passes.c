/* The clean-up passes and the pass manager: evaluate(before) == evaluate(after),
 * bit for bit, on hundreds of random graphs made to contain what each pass
 * rewrites (constants, identities, duplicates, movement chains, transposes,
 * casts, dead code), and on a training step. */
#include "../test.h"
#include "../testlib.h"
#include "passes/passes.h"

#include <stdint.h>

static test_rng rng_state;
static double uniform(void) {
  return test_uniform(&rng_state);
}
static int pick(int n) {
  return (int)(uniform() * n);
}

/* A random f32 graph over [m, k] values, with deliberate redundancy
 * (testlib.h's test_random_op with TEST_OPS_REDUNDANT). */
static cm_graph *random_graph(int n_ops) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {2 + pick(3), 2 + pick(3)};
  int pool[512], np = 0;
  for (int i = 0; i < 3; i++) pool[np++] = cm_input(g, NULL, CM_F32, 2, d);
  double data[64];
  for (int i = 0; i < 64; i++) data[i] = uniform() * 4 - 2;
  pool[np++] = cm_const_data(g, NULL, CM_F32, 2, d, data);
  pool[np++] = cm_const_fill(g, NULL, CM_F32, 2, d, 1.0);
  pool[np++] = cm_const_fill(g, NULL, CM_F32, 2, d, -0.0);
  test_pool p;
  p.n = np;
  memcpy(p.ids, pool, sizeof(int) * (size_t)np);
  for (int s = 0; s < n_ops; s++) test_random_op(&rng_state, g, &p, TEST_OPS_REDUNDANT);
  memcpy(pool, p.ids, sizeof(int) * (size_t)p.n);
  np = p.n;
  for (int k = 0; k < 3; k++) cm_graph_add_output(g, pool[np - 1 - k], NULL);
  return g;
}

/* Evaluates outputs on the given input values (by input order). */
static bool eval_outputs(const cm_graph *g, cm_tensor *inputs, int n_inputs, cm_tensor *out) {
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  cm_tensor *values = calloc((size_t)g->n_nodes, sizeof *values);
  int k = 0;
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_INPUT && k < n_inputs) src[i] = &inputs[k++];
  cm_eval_opts opts = {CM_PRECISION_NATIVE};
  cm_err err = {0};
  bool ok = cm_eval(g, src, values, &opts, &err) == CM_OK;
  CHECK_MSG(ok, "%s", err.msg);
  for (int o = 0; ok && o < g->n_outputs; o++)
    cm_tensor_copy(&out[o], &values[g->outputs[o]], NULL);
  if (ok)
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&values[i]);
  free(src);
  free(values);
  return ok;
}

static bool same_bits(const cm_tensor *a, const cm_tensor *b) {
  if (!cm_type_equal(&a->type, &b->type)) return false;
  int64_t n = cm_type_numel(&a->type);
  for (int64_t i = 0; i < n; i++) {
    double x = cm_tensor_get_f64(a, i), y = cm_tensor_get_f64(b, i);
    if (!(x == y || (isnan(x) && isnan(y))) || signbit(x) != signbit(y)) return false;
  }
  return true;
}

static void check_pipeline(const char *pipeline, int n_graphs) {
  int rewritten = 0, removed_nodes = 0;
  for (int t = 0; t < n_graphs; t++) {
    rng_state.s = 1000003ull * (uint64_t)t + 17;
    cm_graph *g = random_graph(6 + t % 20);
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    cm_tensor inputs[3], before[3] = {{{0}, 0}}, after[3] = {{{0}, 0}};
    for (int k = 0; k < 3; k++) {
      cm_tensor_alloc(&inputs[k], g->nodes[k].type, NULL);
      for (int64_t e = 0; e < cm_type_numel(&inputs[k].type); e++)
        cm_tensor_set_f64(&inputs[k], e, uniform() * 4 - 2);
    }
    bool ok = eval_outputs(g, inputs, 3, before);
    cm_pass_state s = {cm_graph_clone(g), NULL};
    cm_pipeline_opts opts = {true, false, NULL, NULL};
    cm_err err = {0};
    cm_status st = cm_pipeline_run(&s, pipeline, &opts, NULL, 0, NULL, &err);
    CHECK_MSG(st == CM_OK, "%s on graph %d: %s", pipeline, t, err.msg);
    if (!st && ok) {
      CHECK(s.g->n_outputs == g->n_outputs);
      removed_nodes += g->n_nodes - s.g->n_nodes;
      rewritten += s.g->n_nodes != g->n_nodes;
      if (eval_outputs(s.g, inputs, 3, after))
        for (int o = 0; o < g->n_outputs; o++)
          CHECK_MSG(same_bits(&before[o], &after[o]), "%s changed output %d of graph %d", pipeline,
                    o, t);
    }
    for (int k = 0; k < 3; k++) {
      cm_tensor_free(&inputs[k]);
      cm_tensor_free(&before[k]);
      cm_tensor_free(&after[k]);
    }
    cm_plan_free(s.plan);
    cm_graph_free(s.g);
    cm_graph_free(g);
  }
  /* The passes did something on most graphs: the test is not vacuous. */
  CHECK_MSG(rewritten > n_graphs / 2, "%s rewrote only %d of %d graphs", pipeline, rewritten,
            n_graphs);
  fprintf(stderr, "%-20s %d graphs, %d rewritten, %d nodes removed\n", pipeline, n_graphs,
          rewritten, removed_nodes);
}

static void test_simplify_equivalence(void) {
  check_pipeline("simplify", 300);
}
static void test_cse_equivalence(void) {
  check_pipeline("cse", 300);
}
static void test_dce_equivalence(void) {
  check_pipeline("dce", 300);
}
static void test_cleanup_pipeline(void) {
  check_pipeline("simplify,cse,dce", 300);
}

static void test_pipeline_errors(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {2};
  cm_graph_add_output(g, cm_unary(g, CM_OP_EXP, cm_input(g, "x", CM_F32, 1, d), "y"), NULL);
  cm_pass_state s = {g, NULL};
  cm_err err = {0};
  CHECK(cm_pipeline_run(&s, "simplify,frobnicate", NULL, NULL, 0, NULL, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "unknown pass \"frobnicate\"");
  CHECK(s.g->n_nodes == 2); /* nothing ran */
  /* statistics and print-after */
  cm_pass_stat stats[4];
  int n = 0;
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  cm_pipeline_opts opts = {true, false, "cse", f};
  CHECK(cm_pipeline_run(&s, "simplify,cse,dce", &opts, stats, 4, &n, &err) == CM_OK);
  fclose(f);
  CHECK(n == 3 && strcmp(stats[1].pass, "cse") == 0 && stats[0].ms >= 0);
  CHECK(text && strstr(text, "# ---- after cse ----") && !strstr(text, "after dce"));
  free(text);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
}

/* The MLP training step: a real graph full of scalar constants and broadcasts. */
static void test_training_step(void) {
  cm_graph *g = cm_graph_new();
  int64_t dx[2] = {4, 3}, dw[2] = {5, 3}, db[1] = {5};
  cm_init init = {CM_INIT_UNIFORM, -1, 1};
  int x = cm_input(g, "x", CM_F32, 2, dx);
  int w = cm_param(g, "fc.weight", CM_F32, 2, dw, init);
  int b = cm_param(g, "fc.bias", CM_F32, 1, db, init);
  int h = cm_binary_bcast(g, CM_OP_ADD, cm_matmul(g, x, w, false, true, NULL), b, NULL);
  int axes[2] = {0, 1};
  int loss =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_unary(g, CM_OP_TANH, h, NULL), 2, axes, false, "loss");
  cm_graph_add_output(g, loss, NULL);
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  cm_graph *step = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  CHECK(cm_build_train_step(g, loss, &cfg, &step, &info, &err) == CM_OK);
  if (!step) return;
  cm_pass_state s = {cm_graph_clone(step), NULL};
  CHECK(cm_pipeline_run(&s, "simplify,cse,dce", NULL, NULL, 0, NULL, &err) == CM_OK);
  CHECK(s.g->n_nodes < step->n_nodes);
  /* every assign survives, same targets */
  int assigns_before = 0, assigns_after = 0;
  for (int i = 0; i < step->n_nodes; i++) assigns_before += step->nodes[i].op == CM_OP_ASSIGN;
  for (int i = 0; i < s.g->n_nodes; i++) assigns_after += s.g->nodes[i].op == CM_OP_ASSIGN;
  CHECK(assigns_before == 6 && assigns_after == 6);
  /* evaluate both with the same sources: every assign's value and output agree */
  const cm_tensor **src1 = calloc((size_t)step->n_nodes, sizeof *src1);
  const cm_tensor **src2 = calloc((size_t)s.g->n_nodes, sizeof *src2);
  cm_tensor t[16];
  int nt = 0;
  rng_state.s = 99;
  for (int i = 0; i < step->n_nodes; i++) {
    const cm_node *n = &step->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    cm_tensor_alloc(&t[nt], n->type, NULL);
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++)
      cm_tensor_set_f64(&t[nt], e, strcmp(n->name, "step") == 0 ? 3 : uniform() * 0.9 + 0.05);
    src1[i] = &t[nt];
    src2[cm_graph_find(s.g, n->name)] = &t[nt];
    nt++;
  }
  cm_tensor *v1 = calloc((size_t)step->n_nodes, sizeof *v1);
  cm_tensor *v2 = calloc((size_t)s.g->n_nodes, sizeof *v2);
  cm_eval_opts opts = {CM_PRECISION_NATIVE};
  CHECK(cm_eval(step, src1, v1, &opts, &err) == CM_OK);
  CHECK(cm_eval(s.g, src2, v2, &opts, &err) == CM_OK);
  int compared = 0;
  for (int i = 0; i < step->n_nodes; i++) {
    if (step->nodes[i].op != CM_OP_ASSIGN) continue;
    int j = cm_graph_find(s.g, step->nodes[i].name);
    CHECK(j >= 0);
    if (j >= 0) {
      CHECK_MSG(same_bits(&v1[i], &v2[j]), "update %s differs", step->nodes[i].name);
      compared++;
    }
  }
  CHECK(compared == 6);
  for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&v1[i]);
  for (int i = 0; i < s.g->n_nodes; i++) cm_tensor_free(&v2[i]);
  for (int i = 0; i < nt; i++) cm_tensor_free(&t[i]);
  free(v1);
  free(v2);
  free(src1);
  free(src2);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  cm_graph_free(step);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_simplify_equivalence), TEST(test_cse_equivalence), TEST(test_dce_equivalence),
          TEST(test_cleanup_pipeline), TEST(test_pipeline_errors), TEST(test_training_step))
