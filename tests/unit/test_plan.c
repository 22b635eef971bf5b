/* Plans: the unfused plan, the schedule (collectives early, in-place updates
 * after every reader), the memory plan (hand-computed packings, no overlap of
 * live buffers), the checker catching broken plans, and group-by-group
 * evaluation equal to the oracle bit for bit on an MLP training step and on
 * hundreds of random graphs with state updates, unfused and fused. */
#include "../test.h"
#include "../testlib.h"
#include "frontend/frontend.h"
#include "models/models.h"
#include "passes/passes.h"

#include <stdint.h>

/* ---- helpers ------------------------------------------------------------- */

static test_rng rng_state;
static double next_uniform(void) {
  return test_uniform(&rng_state);
}

static bool is_fed(cm_op op) {
  return op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE;
}

/* Random values in [0.5, 1.5) for every fed source (ints: 0..2, bools: 0/1);
 * the optimizer's scalars get sensible values. */
static cm_tensor *random_sources(const cm_graph *g, const cm_tensor ***bound) {
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  *bound = calloc((size_t)g->n_nodes, sizeof **bound);
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (!is_fed(n->op)) continue;
    cm_tensor_alloc(&t[i], n->type, NULL);
    double fixed = strcmp(n->name, "lr") == 0      ? 1e-3
                   : strcmp(n->name, "beta1") == 0 ? 0.9
                   : strcmp(n->name, "beta2") == 0 ? 0.999
                   : strcmp(n->name, "step") == 0  ? 3
                                                   : -1;
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++) {
      double v = fixed >= 0 ? fixed : 0.5 + next_uniform();
      if (cm_dtype_is_int(n->type.dtype)) v = (double)(int)(next_uniform() * 3);
      if (n->type.dtype == CM_BOOL) v = next_uniform() < 0.5;
      cm_tensor_set_f64(&t[i], e, v);
    }
    (*bound)[i] = &t[i];
  }
  return t;
}

static void free_values(cm_tensor *v, int n) {
  for (int i = 0; i < n; i++) cm_tensor_free(&v[i]);
  free(v);
}

static bool is_graph_output(const cm_graph *g, int v) {
  for (int k = 0; k < g->n_outputs; k++)
    if (g->outputs[k] == v) return true;
  return false;
}

static bool is_group_output(const cm_plan *p, int v) {
  if (p->group_of[v] < 0) return false;
  const cm_group *gr = &p->groups[p->group_of[v]];
  for (int k = 0; k < gr->n_outputs; k++)
    if (gr->outputs[k] == v) return true;
  return false;
}

/* cm_plan_eval against cm_eval: every group output and graph output present
 * and bitwise equal, nothing else kept. Returns the number of mismatches. */
static int compare_plan_eval(const cm_graph *g, const cm_plan *p, cm_precision precision,
                             const char *what) {
  const cm_tensor **bound;
  cm_tensor *src = random_sources(g, &bound);
  cm_tensor *want = calloc((size_t)g->n_nodes, sizeof *want);
  cm_tensor *got = calloc((size_t)g->n_nodes, sizeof *got);
  cm_eval_opts opts = {precision};
  cm_err err = {0};
  int bad = 0;
  cm_status st = cm_eval(g, bound, want, &opts, &err);
  CHECK_MSG(st == CM_OK, "%s: cm_eval: %s", what, err.msg);
  cm_status st2 = cm_plan_eval(g, p, bound, got, &opts, &err);
  CHECK_MSG(st2 == CM_OK, "%s: cm_plan_eval: %s", what, err.msg);
  for (int v = 0; v < g->n_nodes && !st && !st2; v++) {
    bool kept = is_graph_output(g, v) || is_group_output(p, v);
    if (!kept) {
      if (got[v].data) bad++;
      continue;
    }
    size_t nbytes = cm_type_nbytes(&want[v].type);
    if (!got[v].data || !cm_type_equal(&got[v].type, &want[v].type) ||
        memcmp(got[v].data, want[v].data, nbytes) != 0) {
      if (!bad)
        fprintf(stderr, "%s: \"%s\" differs (%s)\n", what, g->nodes[v].name,
                got[v].data ? "values" : "missing");
      bad++;
    }
  }
  free_values(want, g->n_nodes);
  free_values(got, g->n_nodes);
  free_values(src, g->n_nodes);
  free(bound);
  return bad + (st ? 1 : 0) + (st2 ? 1 : 0);
}

static int position_of(const cm_plan *p, int node) {
  for (int k = 0; k < p->n_order; k++)
    if (p->order[k] == p->group_of[node]) return k;
  return -1;
}

static char *plan_text(const cm_graph *g, const cm_plan *p) {
  char *buf = NULL;
  size_t size = 0;
  FILE *f = open_memstream(&buf, &size);
  cm_plan_print(g, p, f);
  fclose(f);
  return buf;
}

/* unfused -> schedule -> memplan, each verified; the state owns the plan. */
static bool plan_all(cm_pass_state *s, const char *what) {
  cm_err err = {0};
  cm_pass_stat stat = {0};
  cm_status st = cm_pass_schedule(s, &stat, &err);
  CHECK_MSG(st == CM_OK, "%s: schedule: %s", what, err.msg);
  if (st) return false;
  st = cm_plan_verify(s->g, s->plan, &err);
  CHECK_MSG(st == CM_OK, "%s: after schedule: %s", what, err.msg);
  st = cm_pass_memplan(s, &stat, &err);
  CHECK_MSG(st == CM_OK, "%s: memplan: %s", what, err.msg);
  if (st) return false;
  st = cm_plan_verify(s->g, s->plan, &err);
  CHECK_MSG(st == CM_OK, "%s: after memplan: %s", what, err.msg);
  CHECK(s->plan->arena_bytes <= s->plan->unplanned_bytes);
  return st == CM_OK;
}

/* ---- the MLP training step ------------------------------------------------- */

static cm_graph *mlp_step(void) {
  cm_graph *f = cm_graph_new();
  int64_t dx[2] = {4, 6}, dt[2] = {4, 3}, dw1[2] = {6, 8}, db1[1] = {8}, dw2[2] = {8, 3},
          db2[1] = {3};
  cm_init normal = {CM_INIT_NORMAL, 0, 0.5}, zeros = {CM_INIT_ZEROS, 0, 0};
  int x = cm_input(f, "x", CM_F32, 2, dx), t = cm_input(f, "target", CM_F32, 2, dt);
  int w1 = cm_param(f, "fc1.weight", CM_F32, 2, dw1, normal);
  int b1 = cm_param(f, "fc1.bias", CM_F32, 1, db1, zeros);
  int w2 = cm_param(f, "fc2.weight", CM_F32, 2, dw2, normal);
  int b2 = cm_param(f, "fc2.bias", CM_F32, 1, db2, zeros);
  int h = cm_unary(f, CM_OP_RELU,
                   cm_binary_bcast(f, CM_OP_ADD, cm_matmul(f, x, w1, 0, 0, NULL), b1, NULL), "h");
  int y = cm_binary_bcast(f, CM_OP_ADD, cm_matmul(f, h, w2, 0, 0, NULL), b2, "y");
  int d = cm_binary(f, CM_OP_SUB, y, t, NULL);
  int axes[2] = {0, 1};
  int sq =
      cm_reduce(f, CM_OP_REDUCE_SUM, cm_binary(f, CM_OP_MUL, d, d, NULL), 2, axes, false, NULL);
  int loss = cm_binary(f, CM_OP_MUL, sq, cm_const_scalar(f, NULL, CM_F32, 1.0 / 12), "loss");
  cm_graph_add_output(f, loss, NULL);
  CHECK_MSG(cm_graph_error(f) == NULL, "%s", cm_graph_error(f));
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  cfg.clip_norm = 1.0;
  cm_graph *g = NULL;
  cm_err err = {0};
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(f, loss, &cfg, &g, &info, &err) == CM_OK, "%s", err.msg);
  cm_graph_free(f);
  return g;
}

static void test_mlp_step(void) {
  cm_graph *g = mlp_step();
  if (!g) return;
  cm_pass_state s = {g, NULL};
  cm_err err = {0};
  CHECK_MSG(cm_plan_unfused(g, &s.plan, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_plan_verify(g, s.plan, &err) == CM_OK, "unfused: %s", err.msg);
  int n_fed = 0, n_assign = 0, n_update_groups = 0, n_gemm = 0, n_matmul = 0;
  for (int v = 0; v < g->n_nodes; v++) {
    n_fed += is_fed(g->nodes[v].op);
    n_assign += g->nodes[v].op == CM_OP_ASSIGN;
    n_matmul += g->nodes[v].op == CM_OP_MATMUL;
  }
  CHECK(s.plan->n_groups == g->n_nodes - n_fed);
  for (int gi = 0; gi < s.plan->n_groups; gi++) {
    n_update_groups += s.plan->groups[gi].kind == CM_GROUP_UPDATE;
    n_gemm += s.plan->groups[gi].kind == CM_GROUP_GEMM;
  }
  CHECK(n_assign == 12); /* p, m, v for 4 params */
  CHECK(n_update_groups == n_assign);
  CHECK(n_gemm == n_matmul && n_matmul == 5); /* 2 forward, 3 backward (x has no gradient) */
  /* evaluation in node order, before any schedule */
  CHECK(compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, "mlp unfused") == 0);
  if (plan_all(&s, "mlp")) {
    /* every update runs after every reader of the param it overwrites */
    for (int v = 0; v < g->n_nodes; v++) {
      if (g->nodes[v].op != CM_OP_ASSIGN) continue;
      int target = g->nodes[v].inputs[0], pa = position_of(s.plan, v);
      for (int u = 0; u < g->n_nodes; u++) {
        if (u == v || is_fed(g->nodes[u].op)) continue;
        for (int j = 0; j < g->nodes[u].n_inputs; j++)
          if (g->nodes[u].inputs[j] == target)
            CHECK_MSG(position_of(s.plan, u) < pa, "\"%s\" reads \"%s\" after \"%s\"",
                      g->nodes[u].name, g->nodes[target].name, g->nodes[v].name);
      }
    }
    CHECK(compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, "mlp") == 0);
    CHECK(compare_plan_eval(g, s.plan, CM_PRECISION_F64, "mlp f64") == 0);
    CHECK(s.plan->arena_bytes < s.plan->unplanned_bytes);
    char *text = plan_text(g, s.plan);
    CHECK_STR_CONTAINS(text, "update: nodes update/fc1.weight <- inputs ");
    CHECK_STR_CONTAINS(text, " -> outputs update/fc1.weight [into fc1.weight]\n");
    CHECK_STR_CONTAINS(text, "gemm: nodes ");
    CHECK_STR_CONTAINS(text, "\narena: ");
    fprintf(stderr, "mlp step: %d nodes, %d groups, arena %lld B of %lld B unplanned\n", g->n_nodes,
            s.plan->n_groups, (long long)s.plan->arena_bytes, (long long)s.plan->unplanned_bytes);
    free(text);
  }
  cm_plan_free(s.plan);
  cm_graph_free(g);
}

/* A tiny CMAE training step (ViT, EMA target, contrastive branch): every
 * plan stage verifies and evaluates like the oracle. */
static void test_cmae_step(void) {
  cm_model_config cfg;
  cm_model_config_default(&cfg);
  cfg.data.image_size = 8;
  cfg.mask.ratio = 0.5;
  cfg.encoder.patch = 2, cfg.encoder.width = 16, cfg.encoder.depth = 1, cfg.encoder.heads = 2;
  cfg.pixel_decoder.width = 8, cfg.pixel_decoder.depth = 1, cfg.pixel_decoder.heads = 2;
  cfg.feature_decoder.width = 8, cfg.feature_decoder.depth = 1, cfg.feature_decoder.heads = 2;
  cfg.projector.hidden = 16, cfg.projector.out = 8;
  cfg.predictor.hidden = 16, cfg.predictor.out = 8;
  cm_model_build_opts opts = {2, 1, CM_F32};
  cm_model m;
  cm_err err = {0};
  cm_status st = cm_model_build(&cfg, &opts, &m, &err);
  CHECK_MSG(st == CM_OK, "model: %s", err.msg);
  if (st) return;
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  cm_ema_pair pairs[8];
  while (cm_model_ema_online_prefixes[oc.n_ema] && oc.n_ema < 8) {
    pairs[oc.n_ema].online_prefix = cm_model_ema_online_prefixes[oc.n_ema];
    pairs[oc.n_ema].target_prefix = cm_model_ema_target_prefixes[oc.n_ema];
    oc.n_ema++;
  }
  oc.ema = pairs;
  oc.frozen = cm_model_frozen_substrings;
  cm_graph *g = NULL;
  cm_train_step_info info;
  st = cm_build_train_step(m.g, m.loss, &oc, &g, &info, &err);
  CHECK_MSG(st == CM_OK, "step: %s", err.msg);
  cm_model_free(&m);
  if (st) return;
  CHECK(info.n_ema > 0);
  cm_pass_state s = {g, NULL};
  if (plan_all(&s, "cmae step")) {
    CHECK(compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, "cmae step") == 0);
    fprintf(stderr, "cmae step: %d nodes, %d groups, arena %lld B of %lld B unplanned (%.1f %%)\n",
            g->n_nodes, s.plan->n_groups, (long long)s.plan->arena_bytes,
            (long long)s.plan->unplanned_bytes,
            100.0 * (double)s.plan->arena_bytes / (double)s.plan->unplanned_bytes);
  }
  cm_plan_free(s.plan);
  cm_graph_free(g);
}

/* ---- the schedule ------------------------------------------------------------ */

static void test_collective_early(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {4, 4};
  int x = cm_input(g, "x", CM_F32, 2, d), y = cm_input(g, "y", CM_F32, 2, d);
  int grad = cm_unary(g, CM_OP_TANH, x, "grad");
  int chain = y;
  char name[16];
  for (int k = 0; k < 5; k++) {
    snprintf(name, sizeof name, "work%d", k);
    chain = cm_unary(g, CM_OP_EXP, cm_unary(g, CM_OP_TANH, chain, NULL), name);
  }
  int reduced = cm_all_reduce(g, grad, CM_MODE_MEAN, 1, "reduced");
  int out = cm_binary(g, CM_OP_ADD, reduced, chain, "out");
  cm_graph_add_output(g, out, NULL);
  CHECK(cm_graph_error(g) == NULL);
  cm_pass_state s = {g, NULL};
  cm_pass_stat stat = {0};
  cm_err err = {0};
  CHECK_MSG(cm_pass_schedule(&s, &stat, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_plan_verify(g, s.plan, &err) == CM_OK, "%s", err.msg);
  /* issued right after its input, ahead of the unrelated chain before it in node order */
  CHECK(position_of(s.plan, reduced) == position_of(s.plan, grad) + 1);
  CHECK(position_of(s.plan, reduced) < position_of(s.plan, cm_graph_find(g, "work0")));
  CHECK(position_of(s.plan, grad) == 0);
  CHECK_STR_CONTAINS(stat.detail, "collectives moved earlier 1");
  /* otherwise node order is kept */
  for (int k = 3; k < s.plan->n_order; k++) {
    int a = s.plan->groups[s.plan->order[k - 1]].nodes[0];
    int b = s.plan->groups[s.plan->order[k]].nodes[0];
    CHECK(a < b);
  }
  CHECK(compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, "collective") == 0);
  cm_plan_free(s.plan);
  cm_graph_free(g);
}

static void test_in_place_rule(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {8};
  cm_init ones = {CM_INIT_ONES, 0, 0};
  int st = cm_state(g, "s", CM_F32, 1, d, ones);
  int x = cm_input(g, "x", CM_F32, 1, d);
  int nv = cm_binary(g, CM_OP_MUL, st, x, "new_s");
  int upd = cm_assign(g, st, nv, "update/s");
  /* a reader of the old value, after the assign in node order */
  int late = cm_unary(g, CM_OP_TANH, st, "late_reader");
  int out = cm_binary(g, CM_OP_ADD, late, x, "out");
  cm_graph_add_output(g, out, NULL);
  CHECK(cm_graph_error(g) == NULL);
  cm_pass_state s = {g, NULL};
  cm_err err = {0};
  CHECK_MSG(cm_pass_memplan(&s, NULL, &err) == CM_OK, "%s", err.msg); /* schedules first */
  CHECK(s.plan->n_order == s.plan->n_groups);
  CHECK_MSG(cm_plan_verify(g, s.plan, &err) == CM_OK, "%s", err.msg);
  CHECK(position_of(s.plan, late) < position_of(s.plan, upd));
  CHECK(position_of(s.plan, nv) < position_of(s.plan, upd));
  CHECK(s.plan->offset[upd] == -1); /* written into the state, not the arena */
  CHECK(s.plan->offset[st] == -1 && s.plan->offset[x] == -1);
  CHECK(s.plan->offset[nv] >= 0);
  CHECK(compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, "in place") == 0);
  /* the checker rejects the order that updates before the late read */
  int pl = position_of(s.plan, late), pu = position_of(s.plan, upd);
  int t = s.plan->order[pl];
  s.plan->order[pl] = s.plan->order[pu], s.plan->order[pu] = t;
  free(s.plan->offset);
  s.plan->offset = NULL;
  CHECK(cm_plan_verify(g, s.plan, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "reads the state \"s\" after group");
  CHECK_STR_CONTAINS(err.msg, "updated it in place (\"update/s\")");
  cm_plan_free(s.plan);
  cm_graph_free(g);

  /* reading both the old and the updated state leaves no valid in-place order */
  g = cm_graph_new();
  st = cm_state(g, "s", CM_F32, 1, d, ones);
  upd = cm_assign(g, st, cm_unary(g, CM_OP_NEG, st, NULL), "update/s");
  out = cm_binary(g, CM_OP_ADD, st, upd, "both");
  cm_graph_add_output(g, out, NULL);
  CHECK(cm_graph_error(g) == NULL);
  cm_pass_state s2 = {g, NULL};
  CHECK(cm_pass_schedule(&s2, NULL, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "schedule: no valid order");
  cm_plan_free(s2.plan);
  cm_graph_free(g);
}

/* ---- the memory plan ----------------------------------------------------------- */

/* x -> n1 [2,64] -> n2 [64] -> n3 [4,64] -> n4 [4,64] -> n5 [64] (output), f32. */
static cm_graph *chain_graph(void) {
  cm_graph *g = cm_graph_new();
  int64_t dx[1] = {64}, d2[2] = {2, 64}, d4[2] = {4, 64};
  int axis0 = 0;
  int x = cm_input(g, "x", CM_F32, 1, dx);
  int n1 = cm_broadcast(g, x, 2, d2, "n1");
  int n2 = cm_reduce(g, CM_OP_REDUCE_SUM, n1, 1, &axis0, false, "n2");
  int n3 = cm_broadcast(g, n2, 2, d4, "n3");
  int n4 = cm_unary(g, CM_OP_TANH, n3, "n4");
  int n5 = cm_reduce(g, CM_OP_REDUCE_MAX, n4, 1, &axis0, false, "n5");
  cm_graph_add_output(g, n5, NULL);
  CHECK(cm_graph_error(g) == NULL);
  return g;
}

static void test_chain_packing(void) {
  cm_graph *g = chain_graph();
  cm_pass_state s = {g, NULL};
  cm_pass_stat stat = {0};
  cm_err err = {0};
  CHECK_MSG(cm_pass_schedule(&s, NULL, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_pass_memplan(&s, &stat, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_plan_verify(g, s.plan, &err) == CM_OK, "%s", err.msg);
  cm_plan *p = s.plan;
  /* lifetimes n1 0..1, n2 1..2, n3 2..3, n4 3..4, n5 4..4: only neighbours meet, so
   * the arena is the largest neighbouring pair, n3 + n4 = 2048 B */
  CHECK(p->arena_bytes == 2048);
  CHECK(p->unplanned_bytes == 512 + 256 + 1024 + 1024 + 256);
  int n1 = cm_graph_find(g, "n1"), n2 = n1 + 1, n3 = n1 + 2, n4 = n1 + 3, n5 = n1 + 4;
  /* largest first: n3 at 0, n4 above it, n1 at 0, n2 above n3, n5 in n3's old place */
  CHECK(p->offset[n3] == 0);
  CHECK(p->offset[n4] == 1024);
  CHECK(p->offset[n1] == 0);
  CHECK(p->offset[n2] == 1024);
  CHECK(p->offset[n5] == 0);
  CHECK(p->offset[0] == -1);
  CHECK_STR_CONTAINS(stat.detail, "buffers 5, arena 2048 B, unplanned 3072 B, 66.7 %");
  char *text = plan_text(g, p);
  CHECK_STR_CONTAINS(text,
                     "group 0 elementwise: nodes n1 <- inputs x -> outputs n1 [offset 0, 512 B]\n");
  CHECK_STR_CONTAINS(text,
                     "group 1 reduce: nodes n2 <- inputs n1 -> outputs n2 [offset 1024, 256 B]\n");
  CHECK_STR_CONTAINS(text,
                     "group 4 reduce: nodes n5 <- inputs n4 -> outputs n5 [offset 0, 256 B]\n");
  CHECK_STR_CONTAINS(text, "arena: 2048 B (unplanned 3072 B, 66.7 %)\n");
  free(text);
  CHECK(compare_plan_eval(g, p, CM_PRECISION_NATIVE, "chain") == 0);

  /* the checker: overlapping live buffers, a buffer past the arena, a misaligned one */
  p->offset[n4] = 512;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "memplan: buffers \"n3\" [0, 1024) and \"n4\" [512, 1536) overlap "
                              "while both live (groups 2..3 and 3..4)");
  p->offset[n4] = 1536;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"n4\" [1536, 2560) ends past the arena (2048 B)");
  p->offset[n4] = 1056;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "not 64-byte aligned");
  p->offset[n4] = 1024;
  p->offset[0] = 0;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"x\" has offset 0 but is no arena buffer");
  p->offset[0] = -1;
  CHECK(cm_plan_verify(g, p, &err) == CM_OK);
  /* n2 may not reuse n1's memory: the group writing n2 reads n1 (lifetimes 1..2 and 0..1) */
  p->offset[n2] = 0;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  p->offset[n2] = 1024;
  /* a bad order: n2's group before n1's */
  int t = p->order[0];
  p->order[0] = p->order[1], p->order[1] = t;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(
      err.msg,
      "schedule: group 1 (position 0) reads \"n1\" before group 0 (position 1) computes it");
  p->order[1] = p->order[0];
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "ordered twice");
  p->order[0] = 0, p->order[1] = 1;
  CHECK(cm_plan_verify(g, p, &err) == CM_OK);
  cm_plan_free(s.plan);
  cm_graph_free(g);
}

/* ---- the checker on group lists ------------------------------------------------ */

static void test_checker_groups(void) {
  cm_graph *g = chain_graph();
  cm_plan *p = NULL;
  cm_err err = {0};
  CHECK(cm_plan_unfused(g, &p, &err) == CM_OK);
  CHECK(cm_plan_verify(g, p, &err) == CM_OK);
  /* a missing output */
  p->groups[1].n_outputs = 0;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "group 1 does not list \"n2\" as output, but group 2 reads it");
  p->groups[1].n_outputs = 1;
  /* an input the group does not read */
  p->groups[2].inputs[0] = 0;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "input \"x\" is not read from outside the group");
  p->groups[2].inputs[0] = 2;
  CHECK(cm_plan_verify(g, p, &err) == CM_OK);
  /* a node in two groups */
  p->groups[0].nodes[0] = 2;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"n2\" is in group 0 but group_of says 1");
  p->groups[0].nodes[0] = 1;
  /* a source in a group */
  p->group_of[0] = 0;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "the source \"x\" has group 0");
  p->group_of[0] = -1;
  CHECK(cm_plan_verify(g, p, &err) == CM_OK);
  cm_plan_free(p);
  cm_graph_free(g);
}

/* ---- random graphs ------------------------------------------------------------- */

/* A random graph of float ops over params, states and an input (dtype dt),
 * with collectives, several outputs and assigns to some states and params. */
/* Adds one random op over the pool's values (testlib.h's test_random_op, with
 * collectives; nothing when the draw does not fit). */
static void random_op(cm_graph *g, int *pool, int *n_pool) {
  test_pool p;
  p.n = *n_pool;
  memcpy(p.ids, pool, sizeof(int) * (size_t)p.n);
  test_random_op(&rng_state, g, &p, TEST_OPS_COLLECTIVES);
  if (p.n > *n_pool) pool[(*n_pool)++] = p.ids[p.n - 1];
}

static cm_graph *random_graph(int n_ops, cm_dtype dt) {
  cm_graph *g = cm_graph_new();
  int pool[256], np = 0, states[4], n_states = 0;
  int64_t d[2] = {1 + (int64_t)(next_uniform() * 4), 1 + (int64_t)(next_uniform() * 4)};
  cm_init ones = {CM_INIT_ONES, 0, 0};
  char name[32];
  for (int i = 0; i < 2; i++) {
    snprintf(name, sizeof name, "p%d", i);
    pool[np++] = states[n_states++] = cm_param(g, name, dt, 2, d, ones);
    snprintf(name, sizeof name, "s%d", i);
    pool[np++] = states[n_states++] = cm_state(g, name, dt, 2, d, ones);
  }
  pool[np++] = cm_input(g, "x", dt, 2, d);
  for (int s = 0; s < n_ops; s++) random_op(g, pool, &np);
  /* updates: some states and params get a computed value of their shape */
  for (int k = 0; k < n_states; k++) {
    if (next_uniform() < 0.3) continue;
    int value = -1;
    for (int tries = 0; tries < 8 && value < 0; tries++) {
      /* a computed value: assigning one state straight to another could ask for a swap,
       * which no in-place order performs */
      int c = pool[(int)(next_uniform() * np)];
      if (cm_type_equal(&g->nodes[c].type, &g->nodes[states[k]].type) && !is_fed(g->nodes[c].op))
        value = c;
    }
    if (value < 0) continue;
    snprintf(name, sizeof name, "update/%s", g->nodes[states[k]].name);
    int a = cm_assign(g, states[k], value, name);
    if (next_uniform() < 0.3) cm_graph_add_output(g, a, NULL);
  }
  /* more work after the updates in node order, reading the old states */
  for (int k = 0; k < n_states; k++)
    if (next_uniform() < 0.5) pool[np++] = cm_unary(g, CM_OP_TANH, states[k], NULL);
  for (int s = 0; s < 4; s++) random_op(g, pool, &np);
  /* outputs: the last values, a random one, sometimes a source */
  cm_graph_add_output(g, pool[np - 1], NULL);
  for (int k = 0; k < 2; k++) {
    int c = pool[(int)(next_uniform() * np)];
    if (!is_graph_output(g, c)) cm_graph_add_output(g, c, NULL);
  }
  return g;
}

/* A fused plan for tests: consecutive non-source nodes in runs of 1..4 per
 * group; const nodes duplicated into every group reading them (owned by no
 * group unless they are graph outputs). Inputs and outputs by the rule. */
static cm_plan *fused_plan(const cm_graph *g) {
  int n = g->n_nodes;
  cm_plan *p = calloc(1, sizeof *p);
  p->n_nodes = n;
  p->group_of = malloc(sizeof(int) * (size_t)n);
  p->groups = calloc((size_t)n, sizeof *p->groups);
  int run = 0;
  for (int v = 0; v < n; v++) {
    cm_op op = g->nodes[v].op;
    p->group_of[v] = -1;
    if (is_fed(op) || (op == CM_OP_CONST && !is_graph_output(g, v))) continue;
    /* assigns in groups of their own kind: a group mixing them with other work
     * could both feed a reader of a state and have to follow it */
    bool kind_changes = p->n_groups > 0 && (op == CM_OP_ASSIGN) !=
                                               (p->groups[p->n_groups - 1].kind == CM_GROUP_UPDATE);
    if (run == 0 || kind_changes) {
      run = 1 + (int)(next_uniform() * 4);
      p->groups[p->n_groups].nodes = malloc(sizeof(int) * (size_t)n);
      p->groups[p->n_groups].kind = op == CM_OP_ASSIGN ? CM_GROUP_UPDATE : CM_GROUP_ELEMENTWISE;
      p->n_groups++;
    }
    int gi = p->n_groups - 1;
    cm_group *gr = &p->groups[gi];
    const cm_node *u = &g->nodes[v];
    for (int j = 0; j < u->n_inputs; j++) { /* duplicate unowned consts in, before their user */
      int c = u->inputs[j];
      bool present = false;
      for (int k = 0; k < gr->n_nodes; k++) present |= gr->nodes[k] == c;
      if (g->nodes[c].op == CM_OP_CONST && p->group_of[c] < 0 && !present)
        gr->nodes[gr->n_nodes++] = c;
    }
    gr->nodes[gr->n_nodes++] = v;
    p->group_of[v] = gi;
    run--;
  }
  /* inputs and outputs by the definition */
  int *mark = malloc(sizeof(int) * (size_t)n);
  bool *needed = calloc((size_t)n, sizeof *needed);
  for (int v = 0; v < n; v++) {
    mark[v] = -1;
    needed[v] = is_graph_output(g, v) || g->nodes[v].op == CM_OP_ASSIGN;
  }
  for (int gi = 0; gi < p->n_groups; gi++) {
    cm_group *gr = &p->groups[gi];
    gr->inputs = malloc(sizeof(int) * (size_t)n);
    gr->outputs = malloc(sizeof(int) * (size_t)n);
    for (int k = 0; k < gr->n_nodes; k++) mark[gr->nodes[k]] = gi;
    for (int k = 0; k < gr->n_nodes; k++) {
      const cm_node *u = &g->nodes[gr->nodes[k]];
      for (int j = 0; j < u->n_inputs; j++) {
        int w = u->inputs[j];
        bool listed = false;
        for (int i = 0; i < gr->n_inputs; i++) listed |= gr->inputs[i] == w;
        if (mark[w] != gi && !listed) {
          gr->inputs[gr->n_inputs++] = w;
          needed[w] = true;
        }
      }
    }
  }
  for (int gi = 0; gi < p->n_groups; gi++) {
    cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_nodes; k++) {
      int v = gr->nodes[k];
      if (p->group_of[v] == gi && needed[v]) gr->outputs[gr->n_outputs++] = v;
    }
  }
  free(mark);
  free(needed);
  return p;
}

static void test_random_graphs(void) {
  int n_graphs = 300, bad_graphs = 0, n_fused_groups = 0, n_fused_nodes = 0;
  int64_t arena = 0, unplanned = 0;
  for (int i = 0; i < n_graphs; i++) {
    rng_state.s = 7000 + (uint64_t)i * 7919;
    cm_dtype dt = i % 2 ? CM_F32 : CM_F64;
    cm_graph *g = random_graph(4 + i % 20, dt);
    char what[64];
    snprintf(what, sizeof what, "random graph %d", i);
    cm_err err = {0};
    CHECK_MSG(cm_graph_error(g) == NULL && cm_graph_verify(g, &err) == CM_OK, "%s: %s %s", what,
              cm_graph_error(g) ? cm_graph_error(g) : "", err.msg);
    cm_pass_state s = {g, NULL};
    CHECK_MSG(cm_plan_unfused(g, &s.plan, &err) == CM_OK, "%s: %s", what, err.msg);
    CHECK_MSG(cm_plan_verify(g, s.plan, &err) == CM_OK, "%s: unfused: %s", what, err.msg);
    int bad = 0;
    if (plan_all(&s, what)) {
      bad += compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, what);
      bad += compare_plan_eval(g, s.plan, CM_PRECISION_F64, what);
      arena += s.plan->arena_bytes, unplanned += s.plan->unplanned_bytes;
    } else
      bad++;
    cm_plan_free(s.plan);

    /* the same graph under a fused plan with duplicated constants */
    s.plan = fused_plan(g);
    n_fused_groups += s.plan->n_groups;
    n_fused_nodes += g->n_nodes;
    CHECK_MSG(cm_plan_verify(g, s.plan, &err) == CM_OK, "%s: fused: %s", what, err.msg);
    bad += compare_plan_eval(g, s.plan, CM_PRECISION_NATIVE, what);
    if (plan_all(&s, what))
      bad += compare_plan_eval(g, s.plan, CM_PRECISION_F64, what);
    else
      bad++;
    CHECK_MSG(bad == 0, "%s: %d mismatches", what, bad);
    if (bad && getenv("DEBUG_GRAPH")) {
      cm_graph_print(g, stderr, NULL);
      cm_plan_print(g, s.plan, stderr);
    }
    bad_graphs += bad != 0;
    cm_plan_free(s.plan);
    cm_graph_free(g);
  }
  fprintf(stderr,
          "random graphs: %d checked, %d bad; fused plans %.1f nodes per group; arena %.1f %% of "
          "unplanned\n",
          n_graphs, bad_graphs, (double)n_fused_nodes / n_fused_groups,
          100.0 * (double)arena / (double)unplanned);
}

/* A group reading a value it does not declare: the checker names it, and
 * group-by-group evaluation fails rather than reading it. */
static void test_undeclared_read(void) {
  cm_graph *g = chain_graph();
  cm_plan *p = NULL;
  cm_err err = {0};
  CHECK(cm_plan_unfused(g, &p, &err) == CM_OK);
  p->groups[2].n_inputs = 0; /* n3 reads n2 */
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "plan: group 2 reads \"n2\" but does not list it as input");
  const cm_tensor **bound;
  cm_tensor *src = random_sources(g, &bound);
  cm_tensor *values = calloc((size_t)g->n_nodes, sizeof *values);
  CHECK(cm_plan_eval(g, p, bound, values, NULL, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"n3\" reads \"n2\", neither in the group nor among its inputs");
  for (int v = 0; v < g->n_nodes; v++) CHECK(values[v].data == NULL);
  p->groups[2].n_inputs = 1;
  /* an empty group */
  p->groups[1].n_nodes = 0;
  CHECK(cm_plan_verify(g, p, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "group 1 has no nodes");
  p->groups[1].n_nodes = 1;
  CHECK(cm_plan_verify(g, p, &err) == CM_OK);
  free_values(values, g->n_nodes);
  free_values(src, g->n_nodes);
  free(bound);
  cm_plan_free(p);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_mlp_step), TEST(test_cmae_step), TEST(test_collective_early),
          TEST(test_in_place_rule), TEST(test_chain_packing), TEST(test_checker_groups),
          TEST(test_random_graphs), TEST(test_undeclared_read))
