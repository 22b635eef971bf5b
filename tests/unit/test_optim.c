/* The training step: AdamW and EMA against trajectories worked out here from
 * the published update rules (torch.optim.AdamW, the momentum update),
 * weight-decay groups, frozen params, clipping and dynamic loss scaling. */
#include "../test.h"
#include "passes/passes.h"

#include <stdint.h>

/* Runs a step graph: binds sources (params/state from `state`, which it
 * updates through the assign nodes), the batch and the scalars. */
typedef struct {
  cm_graph *g;
  cm_tensor *state; /* per node: params and state tensors */
  const cm_tensor **bound;
  cm_tensor scalars[5];
  cm_tensor *values;
} runner;

static const char *const scalar_names[5] = {"lr", "beta1", "beta2", "step", "momentum"};

static void runner_init(runner *r, cm_graph *g, const double *param_values[], int n_params,
                        const char *const *param_names, cm_precision precision) {
  memset(r, 0, sizeof *r);
  r->g = g;
  r->state = calloc((size_t)g->n_nodes, sizeof *r->state);
  r->bound = calloc((size_t)g->n_nodes, sizeof *r->bound);
  r->values = calloc((size_t)g->n_nodes, sizeof *r->values);
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op == CM_OP_PARAM || n->op == CM_OP_STATE) {
      cm_tensor_alloc(&r->state[i], n->type, NULL);
      bool given = false;
      for (int k = 0; k < n_params; k++)
        if (strcmp(n->name, param_names[k]) == 0) {
          for (int64_t e = 0; e < cm_type_numel(&n->type); e++)
            cm_tensor_set_f64(&r->state[i], e, param_values[k][e]);
          given = true;
        }
      if (!given) CHECK(cm_init_tensor(&r->state[i], &n->attrs.init, 0, n->name, NULL) == CM_OK);
      r->bound[i] = &r->state[i];
    }
  }
  for (int k = 0; k < 5; k++) {
    int id = cm_graph_find(g, scalar_names[k]);
    if (id < 0) continue;
    /* In f64 precision the f32 scalars may be fed exactly, as f64. */
    cm_type t = g->nodes[id].type;
    if (precision == CM_PRECISION_F64) t.dtype = CM_F64;
    cm_tensor_alloc(&r->scalars[k], t, NULL);
    r->bound[id] = &r->scalars[k];
  }
}

static void runner_set(runner *r, int k, double v) {
  if (r->scalars[k].data) cm_tensor_set_f64(&r->scalars[k], 0, v);
}

/* One step; returns the value of output `name` (a scalar). */
static double runner_step(runner *r, cm_precision precision, const char *metric) {
  cm_eval_opts opts = {precision};
  cm_err err = {0};
  cm_status st = cm_eval(r->g, r->bound, r->values, &opts, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st) return NAN;
  double m = metric ? cm_tensor_get_f64(&r->values[cm_graph_find(r->g, metric)], 0) : 0;
  for (int i = 0; i < r->g->n_nodes; i++)
    if (r->g->nodes[i].op == CM_OP_ASSIGN) {
      cm_tensor *t = &r->state[r->g->nodes[i].inputs[0]];
      for (int64_t e = 0; e < cm_type_numel(&t->type); e++)
        cm_tensor_set_f64(t, e, cm_tensor_get_f64(&r->values[i], e));
    }
  for (int i = 0; i < r->g->n_nodes; i++) cm_tensor_free(&r->values[i]);
  return m;
}

static const cm_tensor *runner_state(runner *r, const char *name) {
  int id = cm_graph_find(r->g, name);
  CHECK_MSG(id >= 0, "no node %s", name);
  return id >= 0 ? &r->state[id] : NULL;
}

static void runner_free(runner *r) {
  for (int i = 0; i < r->g->n_nodes; i++) cm_tensor_free(&r->state[i]);
  for (int k = 0; k < 5; k++) cm_tensor_free(&r->scalars[k]);
  free(r->state);
  free(r->bound);
  free(r->values);
}

/* loss = 0.5 sum((w - t)^2) + 0.5 sum((b.bias - u)^2): gradients w - t, b - u. */
static cm_graph *quadratic(cm_dtype dt, double scale_loss) {
  cm_graph *g = cm_graph_new();
  int64_t dw[2] = {3, 2}, db[1] = {2};
  cm_init none = {CM_INIT_NONE, 0, 0};
  int w = cm_param(g, "w", dt, 2, dw, none);
  int b = cm_param(g, "b.bias", dt, 1, db, none);
  double tw[6] = {0.5, -1, 2, 0.25, -0.75, 1.5}, ub[2] = {-0.5, 3};
  int t = cm_const_data(g, NULL, dt, 2, dw, tw), u = cm_const_data(g, NULL, dt, 1, db, ub);
  int ew = cm_binary(g, CM_OP_SUB, w, t, NULL), eb = cm_binary(g, CM_OP_SUB, b, u, NULL);
  int axes[2] = {0, 1};
  int lw =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, ew, ew, NULL), 2, axes, false, NULL);
  int lb =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, eb, eb, NULL), 1, axes, false, NULL);
  int l = cm_binary(g, CM_OP_ADD, lw, lb, NULL);
  l = cm_binary(g, CM_OP_MUL, l, cm_const_scalar(g, NULL, dt, 0.5 * scale_loss), "loss");
  cm_graph_add_output(g, l, NULL);
  CHECK(cm_graph_error(g) == NULL);
  return g;
}

/* torch.optim.AdamW, one tensor, written from the published algorithm. */
static void adamw_reference(double *p, double *m, double *v, const double *grad, int n, double lr,
                            double b1, double b2, double eps, double wd, int t) {
  for (int i = 0; i < n; i++) {
    p[i] *= 1 - lr * wd;
    m[i] = b1 * m[i] + (1 - b1) * grad[i];
    v[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i];
    double mhat = m[i] / (1 - pow(b1, t)), vhat = v[i] / (1 - pow(b2, t));
    p[i] -= lr * mhat / (sqrt(vhat) + eps);
  }
}

static void test_adamw_trajectory(void) {
  cm_graph *fwd = quadratic(CM_F64, 1);
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  cfg.weight_decay = 0.1;
  cm_graph *sg = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  CHECK_MSG(cm_build_train_step(fwd, cm_graph_find(fwd, "loss"), &cfg, &sg, &info, &err) == CM_OK,
            "%s", err.msg);
  if (!sg) return;
  CHECK(info.n_trainable == 2 && info.n_decay == 1); /* b.bias has no decay */
  double w0[6] = {1, 2, -1, 0.5, 0, -2}, b0[2] = {0.3, -0.2};
  const double *init[2] = {w0, b0};
  const char *names[2] = {"w", "b.bias"};
  runner r;
  runner_init(&r, sg, init, 2, names, CM_PRECISION_F64);
  double pw[6], mw[6] = {0}, vw[6] = {0}, pb[2], mb[2] = {0}, vb[2] = {0};
  memcpy(pw, w0, sizeof pw);
  memcpy(pb, b0, sizeof pb);
  double tw[6] = {0.5, -1, 2, 0.25, -0.75, 1.5}, ub[2] = {-0.5, 3};
  double lrs[6] = {0.1, 0.05, 0.2, 0.01, 0.3, 0.07};
  runner_set(&r, 1, 0.9);
  runner_set(&r, 2, 0.95);
  for (int t = 1; t <= 6; t++) {
    runner_set(&r, 0, lrs[t - 1]);
    runner_set(&r, 3, t);
    double gw[6], gb[2];
    for (int i = 0; i < 6; i++) gw[i] = pw[i] - tw[i];
    for (int i = 0; i < 2; i++) gb[i] = pb[i] - ub[i];
    double norm = 0;
    for (int i = 0; i < 6; i++) norm += gw[i] * gw[i];
    for (int i = 0; i < 2; i++) norm += gb[i] * gb[i];
    double reported = runner_step(&r, CM_PRECISION_F64, "grad_norm");
    CHECK_NEAR(reported, sqrt(norm), 1e-12);
    adamw_reference(pw, mw, vw, gw, 6, lrs[t - 1], 0.9, 0.95, 1e-8, 0.1, t);
    adamw_reference(pb, mb, vb, gb, 2, lrs[t - 1], 0.9, 0.95, 1e-8, 0.0, t);
  }
  const cm_tensor *w = runner_state(&r, "w"), *b = runner_state(&r, "b.bias");
  const cm_tensor *m = runner_state(&r, "optimizer.exp_avg.w");
  const cm_tensor *v = runner_state(&r, "optimizer.exp_avg_sq.b.bias");
  for (int i = 0; i < 6; i++) {
    CHECK_NEAR(cm_tensor_get_f64(w, i), pw[i], 1e-12);
    CHECK_NEAR(cm_tensor_get_f64(m, i), mw[i], 1e-12);
  }
  for (int i = 0; i < 2; i++) {
    CHECK_NEAR(cm_tensor_get_f64(b, i), pb[i], 1e-12);
    CHECK_NEAR(cm_tensor_get_f64(v, i), vb[i], 1e-12);
  }
  /* the params moved: the test is not vacuous */
  CHECK(fabs(pw[0] - w0[0]) > 0.1);
  runner_free(&r);
  cm_graph_free(sg);
  cm_graph_free(fwd);
}

static void test_ema_and_frozen(void) {
  /* online backbone.w trains; target_backbone.w follows by EMA; pos_embed is frozen */
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {4};
  cm_init none = {CM_INIT_NONE, 0, 0};
  int w = cm_param(g, "backbone.w", CM_F64, 1, d, none);
  int tw = cm_param(g, "target_backbone.w", CM_F64, 1, d, none);
  int pe = cm_param(g, "backbone.pos_embed", CM_F64, 1, d, none);
  int x = cm_binary(g, CM_OP_ADD, w, pe, NULL);
  int y = cm_binary(g, CM_OP_MUL, x, cm_unary(g, CM_OP_STOP_GRADIENT, tw, NULL), NULL);
  int axes[1] = {0};
  int loss =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, y, NULL), 1, axes, false, "loss");
  cm_graph_add_output(g, loss, NULL);
  static const char *const frozen[] = {"pos_embed", NULL};
  cm_ema_pair pair = {"backbone.", "target_backbone."};
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  cfg.frozen = frozen;
  cfg.n_ema = 1;
  cfg.ema = &pair;
  cm_graph *sg = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  CHECK_MSG(cm_build_train_step(g, loss, &cfg, &sg, &info, &err) == CM_OK, "%s", err.msg);
  if (!sg) return;
  CHECK(info.n_trainable == 1 && info.n_frozen == 1 && info.n_ema == 1);
  CHECK(cm_graph_find(sg, "optimizer.exp_avg.backbone.pos_embed") < 0);
  CHECK(cm_graph_find(sg, "optimizer.exp_avg.target_backbone.w") < 0);
  CHECK(cm_graph_find(sg, "momentum") >= 0);
  double w0[4] = {1, -2, 0.5, 3}, t0[4] = {0.2, 0.4, -0.6, 0.8}, p0[4] = {0.1, 0.2, 0.3, 0.4};
  const double *init[3] = {w0, t0, p0};
  const char *names[3] = {"backbone.w", "target_backbone.w", "backbone.pos_embed"};
  runner r;
  runner_init(&r, sg, init, 3, names, CM_PRECISION_F64);
  double pw[4], mw[4] = {0}, vw[4] = {0}, pt[4];
  memcpy(pw, w0, sizeof pw);
  memcpy(pt, t0, sizeof pt);
  runner_set(&r, 0, 0.05);
  runner_set(&r, 1, 0.9);
  runner_set(&r, 2, 0.999);
  const double moms[3] = {0.99, 0.996, 0.5};
  for (int t = 1; t <= 3; t++) {
    runner_set(&r, 3, t);
    runner_set(&r, 4, moms[t - 1]);
    double grad[4];
    for (int i = 0; i < 4; i++) { /* d/dw sum(((w + p) t)^2) = 2 (w + p) t^2 */
      grad[i] = 2 * (pw[i] + p0[i]) * pt[i] * pt[i];
    }
    runner_step(&r, CM_PRECISION_F64, NULL);
    adamw_reference(pw, mw, vw, grad, 4, 0.05, 0.9, 0.999, 1e-8, 0.05, t);
    for (int i = 0; i < 4; i++) pt[i] = moms[t - 1] * pt[i] + (1 - moms[t - 1]) * pw[i];
  }
  const cm_tensor *ws = runner_state(&r, "backbone.w"), *ts = runner_state(&r, "target_backbone.w");
  const cm_tensor *ps = runner_state(&r, "backbone.pos_embed");
  for (int i = 0; i < 4; i++) {
    CHECK_NEAR(cm_tensor_get_f64(ws, i), pw[i], 1e-12);
    CHECK_NEAR(cm_tensor_get_f64(ts, i), pt[i], 1e-12);
    CHECK(cm_tensor_get_f64(ps, i) == p0[i]); /* frozen: bit-identical */
  }
  runner_free(&r);
  cm_graph_free(sg);

  /* An EMA target without an online twin is an error naming it. */
  static const cm_ema_pair bad = {"online.", "target_backbone."};
  cfg.ema = &bad;
  CHECK(cm_build_train_step(g, loss, &cfg, &sg, &info, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "EMA target \"target_backbone.w\" has no online param \"online.w\"");
  cm_graph_free(g);
}

static void test_clipping(void) {
  cm_graph *fwd = quadratic(CM_F64, 1);
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  cfg.clip_norm = 0.5;
  cfg.weight_decay = 0;
  cm_graph *sg = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  CHECK(cm_build_train_step(fwd, cm_graph_find(fwd, "loss"), &cfg, &sg, &info, &err) == CM_OK);
  if (!sg) return;
  double w0[6] = {1, 2, -1, 0.5, 0, -2}, b0[2] = {0.3, -0.2};
  double tw[6] = {0.5, -1, 2, 0.25, -0.75, 1.5}, ub[2] = {-0.5, 3};
  const double *init[2] = {w0, b0};
  const char *names[2] = {"w", "b.bias"};
  runner r;
  runner_init(&r, sg, init, 2, names, CM_PRECISION_F64);
  runner_set(&r, 0, 0.1);
  runner_set(&r, 1, 0.9);
  runner_set(&r, 2, 0.95);
  runner_set(&r, 3, 1);
  double norm = 0, g[8];
  for (int i = 0; i < 6; i++) g[i] = w0[i] - tw[i];
  for (int i = 0; i < 2; i++) g[6 + i] = b0[i] - ub[i];
  for (int i = 0; i < 8; i++) norm += g[i] * g[i];
  norm = sqrt(norm);
  CHECK(norm > 0.5); /* so clipping acts */
  double reported = runner_step(&r, CM_PRECISION_F64, "grad_norm");
  CHECK_NEAR(reported, norm, 1e-12); /* reported before clipping */
  double coef = 0.5 / (norm + 1e-6);
  const cm_tensor *m = runner_state(&r, "optimizer.exp_avg.w");
  for (int i = 0; i < 6; i++) CHECK_NEAR(cm_tensor_get_f64(m, i), 0.1 * g[i] * coef, 1e-12);
  runner_free(&r);
  cm_graph_free(sg);
  cm_graph_free(fwd);
}

static void test_loss_scaling(void) {
  /* f32: a loss scaled by 1e34 overflows the scaled gradients, so the step is skipped */
  for (int overflow = 0; overflow < 2; overflow++) {
    cm_graph *fwd = quadratic(CM_F32, overflow ? 1e36 : 1);
    cm_optim_config cfg;
    cm_optim_config_default(&cfg);
    cfg.loss_scaling = true;
    cfg.init_loss_scale = 1024;
    cfg.growth_interval = 2;
    cm_graph *sg = NULL;
    cm_train_step_info info;
    cm_err err = {0};
    CHECK(cm_build_train_step(fwd, cm_graph_find(fwd, "loss"), &cfg, &sg, &info, &err) == CM_OK);
    if (!sg) continue;
    double w0[6] = {1, 2, -1, 0.5, 0, -2}, b0[2] = {0.3, -0.2};
    const double *init[2] = {w0, b0};
    const char *names[2] = {"w", "b.bias"};
    runner r;
    runner_init(&r, sg, init, 2, names, CM_PRECISION_NATIVE);
    runner_set(&r, 0, 0.1);
    runner_set(&r, 1, 0.9);
    runner_set(&r, 2, 0.95);
    double scales[3], skipped[3];
    for (int t = 1; t <= 3; t++) {
      runner_set(&r, 3, t);
      skipped[t - 1] = runner_step(&r, CM_PRECISION_NATIVE, "skipped");
      scales[t - 1] = cm_tensor_get_f64(runner_state(&r, "loss_scale"), 0);
    }
    const cm_tensor *w = runner_state(&r, "w");
    if (overflow) {
      for (int t = 0; t < 3; t++) CHECK(skipped[t] == 1);
      CHECK(scales[0] == 512 && scales[1] == 256 && scales[2] == 128);
      for (int i = 0; i < 6; i++) CHECK(cm_tensor_get_f64(w, i) == (double)(float)w0[i]);
    } else {
      for (int t = 0; t < 3; t++) CHECK(skipped[t] == 0);
      /* doubles after growth_interval = 2 good steps */
      CHECK(scales[0] == 1024 && scales[1] == 2048 && scales[2] == 2048);
      /* Unscaled, the trajectory is plain AdamW's (up to f32 rounding). */
      double pw[6], mw[6] = {0}, vw[6] = {0}, tw[6] = {0.5, -1, 2, 0.25, -0.75, 1.5};
      memcpy(pw, w0, sizeof pw);
      for (int t = 1; t <= 3; t++) {
        double gw[6];
        for (int i = 0; i < 6; i++) gw[i] = pw[i] - tw[i];
        adamw_reference(pw, mw, vw, gw, 6, 0.1, 0.9, 0.95, 1e-8, 0.05, t);
      }
      for (int i = 0; i < 6; i++) CHECK_NEAR(cm_tensor_get_f64(w, i), pw[i], 1e-5);
      CHECK(fabs(pw[0] - w0[0]) > 0.2);
    }
    runner_free(&r);
    cm_graph_free(sg);
    cm_graph_free(fwd);
  }
}

TEST_MAIN(TEST(test_adamw_trajectory), TEST(test_ema_and_frozen), TEST(test_clipping),
          TEST(test_loss_scaling))
