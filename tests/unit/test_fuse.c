/* The fusion pass: the expected groups for LayerNorm, softmax, linear + GELU,
 * attention and the AdamW update; and on random graphs, an MLP training step
 * and a transformer block's training step, a verified plan whose group-by-group
 * evaluation equals the oracle. */
#include "../test.h"
#include "../testlib.h"
#include "frontend/frontend.h"
#include "models/models.h"
#include "passes/passes.h"

#include <stdint.h>

static test_rng rng_state = {12345};
static double next_uniform(void) {
  return test_uniform(&rng_state);
}

static int bcast_to(cm_graph *g, int x, int like) {
  const cm_type *t = &g->nodes[like].type;
  return cm_broadcast(g, x, t->rank, t->dims, NULL);
}
static int scalar(cm_graph *g, int like, double v) {
  const cm_type *t = &g->nodes[like].type;
  return cm_const_fill(g, NULL, t->dtype, t->rank, t->dims, v);
}
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
static int gelu(cm_graph *g, int x) {
  int e =
      cm_unary(g, CM_OP_ERF, cm_binary(g, CM_OP_MUL, x, scalar(g, x, 1 / sqrt(2.0)), NULL), NULL);
  int one_plus = cm_binary(g, CM_OP_ADD, e, scalar(g, e, 1), NULL);
  return cm_binary(g, CM_OP_MUL, cm_binary(g, CM_OP_MUL, x, scalar(g, x, 0.5), NULL), one_plus,
                   NULL);
}
static int param(cm_graph *g, const char *name, int rank, const int64_t *dims) {
  cm_init init = {CM_INIT_UNIFORM, -1, 1};
  return cm_param(g, name, CM_F64, rank, dims, init);
}
/* x [..., in] @ w [in, out] + b */
static int linear(cm_graph *g, int x, int64_t in, int64_t out, const char *name) {
  char nb[64];
  int64_t dw[2] = {in, out}, db[1] = {out};
  snprintf(nb, sizeof nb, "%s.weight", name);
  int w = param(g, nb, 2, dw);
  snprintf(nb, sizeof nb, "%s.bias", name);
  int b = param(g, nb, 1, db);
  int y = cm_matmul(g, x, w, false, false, NULL);
  return cm_binary(g, CM_OP_ADD, y, bcast_to(g, b, y), NULL);
}
static int weighted_sum(cm_graph *g, int y, const char *name) {
  const cm_type t = g->nodes[y].type;
  int64_t n = cm_type_numel(&t);
  double *data = malloc(sizeof(double) * (size_t)n);
  for (int64_t i = 0; i < n; i++) data[i] = next_uniform() * 2 - 1;
  int r = cm_const_data(g, NULL, t.dtype, t.rank, t.dims, data);
  free(data);
  int axes[CM_MAX_RANK];
  for (int i = 0; i < t.rank; i++) axes[i] = i;
  return cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, r, NULL), t.rank, axes, false,
                   name);
}

/* ---- the harness: fuse, verify, evaluate both ways ----------------------- */

typedef struct {
  int by_kind[CM_GROUP_KIND_COUNT];
  int n_groups;
  int update_nodes_max; /* nodes of the largest update group */
  int n_assigns_in_largest_update;
} fuse_result;

static void fill_source(const cm_node *n, cm_tensor *t) {
  cm_tensor_alloc(t, n->type, NULL);
  int64_t cnt = cm_type_numel(&n->type);
  double lo = -1, hi = 1;
  if (!strcmp(n->name, "beta1"))
    lo = hi = 0.9;
  else if (!strcmp(n->name, "beta2"))
    lo = hi = 0.999;
  else if (!strcmp(n->name, "step"))
    lo = hi = 3;
  else if (!strcmp(n->name, "lr"))
    lo = hi = 0.01;
  else if (!strcmp(n->name, "momentum"))
    lo = hi = 0.99;
  else if (strstr(n->name, "exp_avg_sq"))
    lo = 0.1, hi = 1;
  for (int64_t e = 0; e < cnt; e++) {
    if (!cm_dtype_is_float(n->type.dtype))
      cm_tensor_set_i64(t, e, 0);
    else
      cm_tensor_set_f64(t, e, lo + (hi - lo) * next_uniform());
  }
}

/* Fuses a copy of g (checks the plan and its evaluation) and counts groups. */
static fuse_result fuse_and_check(const cm_graph *g0, const char *what, bool print) {
  fuse_result r;
  memset(&r, 0, sizeof r);
  cm_pass_state s = {cm_graph_clone(g0), NULL};
  cm_pass_stat stat;
  memset(&stat, 0, sizeof stat);
  cm_err err = {0};
  cm_status st = cm_pass_fuse(&s, &stat, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  if (st) {
    cm_graph_free(s.g);
    return r;
  }
  const cm_graph *g = s.g;
  st = cm_plan_verify(g, s.plan, &err);
  CHECK_MSG(st == CM_OK, "%s: verify: %s", what, err.msg);
  if (print || (st && getenv("FUSE_PRINT"))) {
    fprintf(stderr, "%s: %s (%.1f ms, %d nodes)\n", what, stat.detail, stat.ms, g->n_nodes);
    if (getenv("FUSE_PRINT")) cm_plan_print(g, s.plan, stderr);
  }
  r.n_groups = s.plan->n_groups;
  for (int i = 0; i < s.plan->n_groups; i++) {
    const cm_group *gr = &s.plan->groups[i];
    r.by_kind[gr->kind]++;
    if (gr->kind == CM_GROUP_UPDATE && gr->n_nodes > r.update_nodes_max) {
      r.update_nodes_max = gr->n_nodes;
      r.n_assigns_in_largest_update = 0;
      for (int k = 0; k < gr->n_nodes; k++)
        r.n_assigns_in_largest_update += g->nodes[gr->nodes[k]].op == CM_OP_ASSIGN;
    }
  }
  if (!st) {
    int n = g->n_nodes;
    cm_tensor *src = calloc((size_t)n, sizeof *src), *want = calloc((size_t)n, sizeof *want),
              *got = calloc((size_t)n, sizeof *got);
    const cm_tensor **sources = calloc((size_t)n, sizeof *sources);
    for (int v = 0; v < n; v++) {
      cm_op op = g->nodes[v].op;
      if (op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE) {
        fill_source(&g->nodes[v], &src[v]);
        sources[v] = &src[v];
      }
    }
    cm_eval_opts opts = {CM_PRECISION_F64};
    st = cm_eval(g, sources, want, &opts, &err);
    CHECK_MSG(st == CM_OK, "%s: eval: %s", what, err.msg);
    cm_status st2 = cm_plan_eval(g, s.plan, sources, got, &opts, &err);
    CHECK_MSG(st2 == CM_OK, "%s: plan eval: %s", what, err.msg);
    if (!st && !st2) { /* the same oracle op by op: the same bits */
      int checked = 0;
      for (int v = 0; v < n; v++) {
        bool is_out = g->nodes[v].op == CM_OP_ASSIGN;
        for (int k = 0; k < g->n_outputs; k++) is_out |= g->outputs[k] == v;
        if (!is_out) continue;
        checked++;
        CHECK_MSG(got[v].data != NULL, "%s: no value for %s", what, g->nodes[v].name);
        if (!got[v].data) continue;
        CHECK_MSG(cm_type_equal(&got[v].type, &want[v].type) &&
                      !memcmp(got[v].data, want[v].data, cm_type_nbytes(&want[v].type)),
                  "%s: plan eval of %s differs from cm_eval", what, g->nodes[v].name);
      }
      CHECK(checked > 0);
    }
    for (int v = 0; v < n; v++)
      cm_tensor_free(&src[v]), cm_tensor_free(&want[v]), cm_tensor_free(&got[v]);
    free(src), free(want), free(got), free(sources);
  }
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  return r;
}

static int count_kind(const fuse_result *r, cm_group_kind k) {
  return r->by_kind[k];
}

/* ---- the expected groups ------------------------------------------------- */

static void test_layer_norm_one_row_group(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[3] = {2, 3, 16}, dc[1] = {16};
  int x = cm_input(g, "x", CM_F64, 3, d);
  int y = layer_norm(g, x, param(g, "w", 1, dc), param(g, "b", 1, dc), 1e-6);
  cm_graph_add_output(g, y, NULL);
  fuse_result r = fuse_and_check(g, "layer_norm", true);
  CHECK_MSG(r.n_groups == 1 && count_kind(&r, CM_GROUP_ROW) == 1, "%d groups, %d row", r.n_groups,
            count_kind(&r, CM_GROUP_ROW));
  cm_graph_free(g);

  /* softmax, and BatchNorm over axis 0 of [N, C] */
  g = cm_graph_new();
  x = cm_input(g, "x", CM_F64, 3, d);
  cm_graph_add_output(g, softmax_last(g, x), NULL);
  r = fuse_and_check(g, "softmax", true);
  CHECK_MSG(r.n_groups == 1 && count_kind(&r, CM_GROUP_ROW) == 1, "%d groups", r.n_groups);
  cm_graph_free(g);

  g = cm_graph_new();
  int64_t dn[2] = {6, 4}, dcn[2] = {1, 4};
  x = cm_input(g, "x", CM_F64, 2, dn);
  int ax0 = 0;
  int mu = cm_binary(g, CM_OP_MUL, cm_reduce(g, CM_OP_REDUCE_SUM, x, 1, &ax0, true, NULL),
                     cm_const_fill(g, NULL, CM_F64, 2, dcn, 1.0 / 6), NULL);
  int xc = cm_binary(g, CM_OP_SUB, x, bcast_to(g, mu, x), NULL);
  int var = cm_binary(
      g, CM_OP_MUL,
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, xc, xc, NULL), 1, &ax0, true, NULL),
      cm_const_fill(g, NULL, CM_F64, 2, dcn, 1.0 / 6), NULL);
  int inv =
      cm_unary(g, CM_OP_RSQRT, cm_binary(g, CM_OP_ADD, var, scalar(g, var, 1e-6), NULL), NULL);
  cm_graph_add_output(g, cm_binary(g, CM_OP_MUL, xc, bcast_to(g, inv, x), NULL), NULL);
  r = fuse_and_check(g, "batch_norm", true);
  CHECK_MSG(r.n_groups == 1 && count_kind(&r, CM_GROUP_ROW) == 1, "%d groups", r.n_groups);
  cm_graph_free(g);
}

static void test_linear_gelu_one_gemm(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {8, 16};
  int x = cm_input(g, "x", CM_F64, 2, d);
  int y = gelu(g, linear(g, x, 16, 32, "fc"));
  cm_graph_add_output(g, y, NULL);
  fuse_result r = fuse_and_check(g, "linear+gelu", true);
  CHECK_MSG(r.n_groups == 1 && count_kind(&r, CM_GROUP_GEMM) == 1, "%d groups", r.n_groups);
  cm_graph_free(g);
}

static void test_attention_one_group(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[4] = {2, 3, 5, 4};
  int q = cm_input(g, "q", CM_F64, 4, d), k = cm_input(g, "k", CM_F64, 4, d),
      v = cm_input(g, "v", CM_F64, 4, d);
  int s = cm_matmul(g, q, k, false, true, NULL);
  s = cm_binary(g, CM_OP_MUL, s, scalar(g, s, 0.5), NULL);
  int o = cm_matmul(g, softmax_last(g, s), v, false, false, "o");
  cm_graph_add_output(g, o, NULL);
  fuse_result r = fuse_and_check(g, "attention", true);
  CHECK_MSG(r.n_groups == 1 && count_kind(&r, CM_GROUP_ATTENTION) == 1, "%d groups", r.n_groups);
  cm_graph_free(g);
}

/* ---- training steps ------------------------------------------------------ */

static cm_graph *train_step(const cm_graph *fwd, int loss, bool clip) {
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  if (clip) cfg.clip_norm = 1.0;
  cm_graph *step = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  cm_status st = cm_build_train_step(fwd, loss, &cfg, &step, &info, &err);
  CHECK_MSG(st == CM_OK, "build step: %s", err.msg);
  return step;
}

static void test_mlp_train_step(void) {
  for (int clip = 0; clip < 2; clip++) {
    cm_graph *g = cm_graph_new();
    int64_t d[2] = {4, 6};
    int x = cm_input(g, "x", CM_F64, 2, d);
    int h = gelu(g, linear(g, x, 6, 12, "fc1"));
    int y = linear(g, h, 12, 3, "fc2");
    int loss = weighted_sum(g, y, "loss");
    CHECK(cm_graph_error(g) == NULL);
    cm_graph *step = train_step(g, loss, clip);
    if (step) {
      fuse_result r = fuse_and_check(step, clip ? "mlp step (clip)" : "mlp step", true);
      /* 4 params x 3 assigns, all in one update group */
      CHECK_MSG(count_kind(&r, CM_GROUP_UPDATE) == 1, "%d update groups",
                count_kind(&r, CM_GROUP_UPDATE));
      CHECK_MSG(r.n_assigns_in_largest_update == 12, "%d assigns in the update group",
                r.n_assigns_in_largest_update);
    }
    cm_graph_free(step);
    cm_graph_free(g);
  }
}

/* LN -> attention -> residual -> LN -> MLP(GELU) -> residual on x [B, L, D]. */
static int transformer_block(cm_graph *g, int x, int64_t B, int64_t L, int64_t D, int64_t H,
                             const char *name) {
  char nb[64];
  int64_t dd[1] = {D}, flat[2] = {B * L, D}, heads[4] = {B, L, H, D / H};
  int perm[4] = {0, 2, 1, 3};
  snprintf(nb, sizeof nb, "%s.ln1.weight", name);
  int w1 = param(g, nb, 1, dd);
  snprintf(nb, sizeof nb, "%s.ln1.bias", name);
  int h = layer_norm(g, x, w1, param(g, nb, 1, dd), 1e-6);
  h = cm_reshape(g, h, 2, flat, NULL);
  int qkv[3];
  for (int i = 0; i < 3; i++) {
    snprintf(nb, sizeof nb, "%s.attn.%c", name, "qkv"[i]);
    int t = cm_reshape(g, linear(g, h, D, D, nb), 4, heads, NULL);
    qkv[i] = cm_permute(g, t, perm, NULL);
  }
  int s = cm_matmul(g, qkv[0], qkv[1], false, true, NULL);
  s = cm_binary(g, CM_OP_MUL, s, scalar(g, s, 1 / sqrt((double)(D / H))), NULL);
  int o = cm_matmul(g, softmax_last(g, s), qkv[2], false, false, NULL);
  o = cm_reshape(g, cm_permute(g, o, perm, NULL), 2, flat, NULL);
  snprintf(nb, sizeof nb, "%s.attn.proj", name);
  o = cm_reshape(g, linear(g, o, D, D, nb), 3, (int64_t[]){B, L, D}, NULL);
  x = cm_binary(g, CM_OP_ADD, x, o, NULL);
  snprintf(nb, sizeof nb, "%s.ln2.weight", name);
  int w2 = param(g, nb, 1, dd);
  snprintf(nb, sizeof nb, "%s.ln2.bias", name);
  h = cm_reshape(g, layer_norm(g, x, w2, param(g, nb, 1, dd), 1e-6), 2, flat, NULL);
  snprintf(nb, sizeof nb, "%s.mlp.fc1", name);
  h = gelu(g, linear(g, h, D, 4 * D, nb));
  snprintf(nb, sizeof nb, "%s.mlp.fc2", name);
  h = cm_reshape(g, linear(g, h, 4 * D, D, nb), 3, (int64_t[]){B, L, D}, NULL);
  return cm_binary(g, CM_OP_ADD, x, h, NULL);
}

static void test_transformer_block(void) {
  for (int n_blocks = 1; n_blocks <= 2; n_blocks++) {
    cm_graph *g = cm_graph_new();
    int64_t d[3] = {2, 4, 8};
    int x = cm_input(g, "x", CM_F64, 3, d);
    for (int b = 0; b < n_blocks; b++) {
      char nb[16];
      snprintf(nb, sizeof nb, "blocks.%d", b);
      x = transformer_block(g, x, 2, 4, 8, 2, nb);
    }
    int loss = weighted_sum(g, x, "loss");
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    /* forward + backward alone: autodiff with respect to every param */
    cm_graph *fb = cm_graph_clone(g);
    int wrt[64], grads[64], n_wrt = 0;
    for (int v = 0; v < fb->n_nodes; v++)
      if (fb->nodes[v].op == CM_OP_PARAM) wrt[n_wrt++] = v;
    cm_err err = {0};
    CHECK(cm_autodiff(fb, loss, n_wrt, wrt, grads, &err) == CM_OK);
    for (int j = 0; j < n_wrt; j++) cm_graph_add_output(fb, grads[j], NULL);
    char what[64];
    snprintf(what, sizeof what, "%d block(s) forward+backward", n_blocks);
    fuse_result r = fuse_and_check(fb, what, true);
    CHECK_MSG(count_kind(&r, CM_GROUP_ATTENTION) >= n_blocks, "%d attention groups",
              count_kind(&r, CM_GROUP_ATTENTION));
    static int groups_one_block = 0;
    if (n_blocks == 1)
      groups_one_block = r.n_groups;
    else {
      int per_block = r.n_groups - groups_one_block;
      fprintf(stderr, "kernels per transformer block (forward + backward): %d\n", per_block);
      CHECK_MSG(per_block <= 27, "%d kernels per block", per_block);
    }
    cm_graph_free(fb);
    cm_graph *step = train_step(g, loss, true);
    if (step) {
      snprintf(what, sizeof what, "%d block(s) training step", n_blocks);
      fuse_result rs = fuse_and_check(step, what, true);
      CHECK(count_kind(&rs, CM_GROUP_UPDATE) == 1);
    }
    cm_graph_free(step);
    cm_graph_free(g);
  }
}

/* ---- random graphs (testlib.h's, as test_autodiff and test_plan grow them) -- */

static int random_graph(cm_graph *g, int n_ops) {
  test_pool pool = {{0}, 0};
  int64_t d[2] = {2 + (int64_t)(next_uniform() * 3), 2 + (int64_t)(next_uniform() * 3)};
  for (int i = 0; i < 3; i++) pool.ids[pool.n++] = param(g, NULL, 2, d);
  for (int s = 0; s < n_ops; s++) test_random_op(&rng_state, g, &pool, 0);
  const int *ids = pool.ids, np = pool.n;
  int loss = -1;
  for (int k = np - 1; k >= np - 3 && k >= 0; k--) {
    int l = weighted_sum(g, ids[k], NULL);
    loss = loss < 0 ? l : cm_binary(g, CM_OP_ADD, loss, l, NULL);
  }
  /* a few intermediate values are outputs too */
  for (int k = 3; k < np; k += 5) cm_graph_add_output(g, ids[k], NULL);
  cm_graph_add_output(g, loss, NULL);
  return loss;
}

static void test_random_graphs(void) {
  int fused_total = 0, nodes_total = 0;
  for (int i = 0; i < 300; i++) {
    rng_state.s = 1000 + (uint64_t)i;
    cm_graph *g = cm_graph_new();
    int loss = random_graph(g, 4 + i % 16);
    CHECK_MSG(cm_graph_error(g) == NULL, "graph %d: %s", i, cm_graph_error(g));
    char what[64];
    snprintf(what, sizeof what, "random graph %d", i);
    if (i % 3 == 0 && !cm_graph_error(g)) { /* with its backward */
      int wrt[8], grads[8], n_wrt = 0;
      for (int v = 0; v < g->n_nodes && n_wrt < 3; v++)
        if (g->nodes[v].op == CM_OP_PARAM) wrt[n_wrt++] = v;
      cm_err err = {0};
      if (cm_autodiff(g, loss, n_wrt, wrt, grads, &err) == CM_OK)
        for (int j = 0; j < n_wrt; j++) cm_graph_add_output(g, grads[j], NULL);
    }
    if (!cm_graph_error(g)) {
      fuse_result r = fuse_and_check(g, what, false);
      fused_total += r.n_groups;
      nodes_total += g->n_nodes;
    }
    cm_graph_free(g);
  }
  fprintf(stderr, "random graphs: %d nodes in %d groups\n", nodes_total, fused_total);
}

/* ---- model graphs: group counts (built and fused, not evaluated) ---------- */

static void model_counts(const char *config, int batch, const char *what) {
  cm_model_config cfg;
  cm_err err = {0};
  char path[512];
  snprintf(path, sizeof path, "models/%s", config); /* tests run in the source tree */
  cm_status loaded = cm_model_config_load(path, NULL, 0, &cfg, &err);
  CHECK_MSG(loaded == CM_OK, "%s: %s", what, err.msg); /* a shipped config: a failure, not a skip */
  if (loaded != CM_OK) return;
  cm_model_build_opts opts = {batch, 1, CM_F32};
  cm_model m;
  memset(&m, 0, sizeof m);
  cm_status st = cm_model_build(&cfg, &opts, &m, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  if (st) return;
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  cm_ema_pair pairs[8];
  int n_pairs = 0;
  for (; cm_model_ema_online_prefixes[n_pairs] && n_pairs < 8; n_pairs++)
    pairs[n_pairs] =
        (cm_ema_pair){cm_model_ema_online_prefixes[n_pairs], cm_model_ema_target_prefixes[n_pairs]};
  oc.ema = pairs;
  oc.n_ema = n_pairs;
  oc.frozen = cm_model_frozen_substrings;
  oc.clip_norm = 3.0;
  cm_graph *step = NULL;
  cm_train_step_info info;
  st = cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err);
  CHECK_MSG(st == CM_OK, "%s: build step: %s", what, err.msg);
  if (!st) {
    cm_pass_state s = {step, NULL};
    cm_pass_stat stat;
    memset(&stat, 0, sizeof stat);
    st = cm_pass_fuse(&s, &stat, &err);
    CHECK_MSG(st == CM_OK, "%s: fuse: %s", what, err.msg);
    if (!st) {
      CHECK_MSG(cm_plan_verify(s.g, s.plan, &err) == CM_OK, "%s: %s", what, err.msg);
      int update_groups = 0, update_assigns = 0, assigns = 0;
      for (int v = 0; v < s.g->n_nodes; v++) assigns += s.g->nodes[v].op == CM_OP_ASSIGN;
      for (int i = 0; i < s.plan->n_groups; i++)
        if (s.plan->groups[i].kind == CM_GROUP_UPDATE) {
          update_groups++;
          for (int k = 0; k < s.plan->groups[i].n_nodes; k++)
            update_assigns += s.g->nodes[s.plan->groups[i].nodes[k]].op == CM_OP_ASSIGN;
        }
      fprintf(stderr, "%s training step: %s (%.0f ms, %d nodes, %d trainable, %d EMA)\n", what,
              stat.detail, stat.ms, s.g->n_nodes, info.n_trainable, info.n_ema);
      fprintf(stderr, "%s: %d update groups holding %d of %d assigns\n", what, update_groups,
              update_assigns, assigns);
      CHECK(update_groups <= 3 && update_assigns == assigns);
    }
    cm_plan_free(s.plan);
    cm_graph_free(s.g);
  }
  cm_model_free(&m);
}

static void test_model_counts(void) {
  model_counts("cmae_vit_tiny_fmnist.json", 2, "tiny CMAE (fmnist)");
  if (getenv("FUSE_VIT_BASE")) model_counts("cmae_vit_base.json", 2, "cmae_vit_base batch 2");
}

TEST_MAIN(TEST(test_layer_norm_one_row_group), TEST(test_linear_gelu_one_gemm),
          TEST(test_attention_one_group), TEST(test_mlp_train_step), TEST(test_transformer_block),
          TEST(test_random_graphs), TEST(test_model_counts))
