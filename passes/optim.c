/* passes/optim.c — the training step as one graph: loss -> gradients ->
 * (unscale, clip) -> AdamW -> EMA, every update an assign on a state tensor. */
#include "passes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const cm_cmae_no_decay[] = {"ln", "bias", "pos_embed", "mask_token", "cls_token", NULL};

void cm_optim_config_default(cm_optim_config *c) {
  memset(c, 0, sizeof *c);
  c->eps = 1e-8;
  c->weight_decay = 0.05;
  c->no_decay = cm_cmae_no_decay;
  c->init_loss_scale = 65536.0;
  c->growth_interval = 2000;
}

static bool name_matches(const char *name, const char *const *substrings) {
  for (int i = 0; substrings && substrings[i]; i++)
    if (strstr(name, substrings[i])) return true;
  return false;
}

/* "online.x" for the target "target.x" under the pair (online, target). */
static bool ema_online_name(const cm_optim_config *c, const char *target, char *out, size_t size) {
  for (int i = 0; i < c->n_ema; i++) {
    size_t n = strlen(c->ema[i].target_prefix);
    if (strncmp(target, c->ema[i].target_prefix, n) == 0) {
      snprintf(out, size, "%s%s", c->ema[i].online_prefix, target + n);
      return true;
    }
  }
  return false;
}

static int scalar_like(cm_graph *g, int like, double v) {
  cm_type t = g->nodes[like].type;
  return cm_const_fill(g, NULL, t.dtype, t.rank, t.dims, v);
}

static int bcast_scalar(cm_graph *g, int s, int like) {
  cm_type t = g->nodes[like].type;
  if (t.rank == 0) return s;
  return cm_broadcast(g, s, t.rank, t.dims, NULL);
}

/* A runtime scalar input cast to dt (the scalars are f32). */
static int scalar_as(cm_graph *g, int s, cm_dtype dt) {
  return g->nodes[s].type.dtype == dt ? s : cm_cast(g, s, dt, NULL);
}

static int sum_all(cm_graph *g, int x) {
  int rank = g->nodes[x].type.rank;
  int axes[CM_MAX_RANK];
  for (int i = 0; i < rank; i++) axes[i] = i;
  return rank ? cm_reduce(g, CM_OP_REDUCE_SUM, x, rank, axes, false, NULL) : x;
}

static char *name_join(char *buf, size_t size, const char *a, const char *b) {
  snprintf(buf, size, "%s%s", a, b);
  return buf;
}

/* One AdamW step of param p with gradient gr (torch.optim.AdamW: decoupled
 * decay, bias-corrected moments): assigns p and its two moments and returns
 * p's new value. ok >= 0: the update applies only where ok (a finite step). */
static int adamw_update(cm_graph *g, const cm_optim_config *cfg, int p, int gr, int lr, int beta1,
                        int beta2, int step, int ok, cm_train_step_info *info) {
  char nb[600];
  cm_init zero_init = {CM_INIT_ZEROS, 0, 0};
  const char *pname = g->nodes[p].name; /* names do not move */
  cm_type pt = g->nodes[p].type;
  cm_dtype dt = pt.dtype;
  bool decay = cfg->weight_decay != 0 && !name_matches(pname, cfg->no_decay);
  if (decay) info->n_decay++;
  int m = cm_state(g, name_join(nb, sizeof nb, "optimizer.exp_avg.", pname), dt, pt.rank, pt.dims,
                   zero_init);
  int v = cm_state(g, name_join(nb, sizeof nb, "optimizer.exp_avg_sq.", pname), dt, pt.rank,
                   pt.dims, zero_init);
  int b1 = scalar_as(g, beta1, dt), b2 = scalar_as(g, beta2, dt),
      one = cm_const_scalar(g, NULL, dt, 1);
  int lr_t = scalar_as(g, lr, dt), t = scalar_as(g, step, dt);
  /* m' = b1 m + (1 - b1) g ; v' = b2 v + (1 - b2) g^2 */
  int m_new =
      cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, m, bcast_scalar(g, b1, m), NULL),
                cm_binary(g, CM_OP_MUL, gr,
                          bcast_scalar(g, cm_binary(g, CM_OP_SUB, one, b1, NULL), gr), NULL),
                NULL);
  int g2 = cm_binary(g, CM_OP_MUL, gr, gr, NULL);
  int v_new =
      cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, v, bcast_scalar(g, b2, v), NULL),
                cm_binary(g, CM_OP_MUL, g2,
                          bcast_scalar(g, cm_binary(g, CM_OP_SUB, one, b2, NULL), g2), NULL),
                NULL);
  /* step_size = lr / (1 - b1^t); denom = sqrt(v') / sqrt(1 - b2^t) + eps */
  int bc1 = cm_binary(g, CM_OP_SUB, one, cm_binary(g, CM_OP_POW, b1, t, NULL), NULL);
  int bc2 = cm_binary(g, CM_OP_SUB, one, cm_binary(g, CM_OP_POW, b2, t, NULL), NULL);
  int step_size = cm_binary(g, CM_OP_DIV, lr_t, bc1, NULL);
  int denom = cm_binary(g, CM_OP_DIV, cm_unary(g, CM_OP_SQRT, v_new, NULL),
                        bcast_scalar(g, cm_unary(g, CM_OP_SQRT, bc2, NULL), v_new), NULL);
  denom = cm_binary(g, CM_OP_ADD, denom, scalar_like(g, denom, cfg->eps), NULL);
  int p_dec = p;
  if (decay) { /* p <- p (1 - lr wd), before the Adam step as PyTorch */
    int f = cm_binary(
        g, CM_OP_SUB, one,
        cm_binary(g, CM_OP_MUL, lr_t, cm_const_scalar(g, NULL, dt, cfg->weight_decay), NULL), NULL);
    p_dec = cm_binary(g, CM_OP_MUL, p, bcast_scalar(g, f, p), NULL);
  }
  int upd = cm_binary(g, CM_OP_MUL, cm_binary(g, CM_OP_DIV, m_new, denom, NULL),
                      bcast_scalar(g, step_size, m_new), NULL);
  int p_new = cm_binary(g, CM_OP_SUB, p_dec, upd, NULL);
  if (ok >= 0) { /* skip the whole update on a non-finite gradient */
    int okp = bcast_scalar(g, ok, p);
    p_new = cm_select(g, okp, p_new, p, NULL);
    m_new = cm_select(g, okp, m_new, m, NULL);
    v_new = cm_select(g, okp, v_new, v, NULL);
  }
  cm_assign(g, p, p_new, name_join(nb, sizeof nb, "update/", pname));
  cm_assign(g, m, m_new, name_join(nb, sizeof nb, "update/optimizer.exp_avg.", pname));
  cm_assign(g, v, v_new, name_join(nb, sizeof nb, "update/optimizer.exp_avg_sq.", pname));
  return p_new;
}

/* The EMA update of param i when it is a target: t <- m t + (1 - m) o, o the
 * online param's updated value (new_value[o], or o itself when it is frozen). */
static cm_status ema_update(cm_graph *g, const cm_optim_config *cfg, int i, int n0,
                            const int *new_value, int momentum, int ok, cm_err *err) {
  char online[512], nb[600];
  const cm_node node = g->nodes[i]; /* a copy: adding nodes may move g->nodes */
  const cm_node *n = &node;
  if (n->op != CM_OP_PARAM || !ema_online_name(cfg, n->name, online, sizeof online)) return CM_OK;
  int o = cm_graph_find(g, online);
  if (o < 0 || o >= n0 || g->nodes[o].op != CM_OP_PARAM) {
    return cm_errorf(err, CM_EINVALID, "build-step: EMA target \"%s\" has no online param \"%s\"",
                     n->name, online);
  }
  if (!cm_type_equal(&g->nodes[o].type, &n->type)) {
    char a[128], b[128];
    return cm_errorf(
        err, CM_EINVALID, "build-step: EMA target \"%s\" is %s but online \"%s\" is %s", n->name,
        cm_type_str(&n->type, a, sizeof a), online, cm_type_str(&g->nodes[o].type, b, sizeof b));
  }
  int ov = new_value[o] >= 0 ? new_value[o] : o;
  cm_dtype dt = n->type.dtype;
  int mm = scalar_as(g, momentum, dt);
  int one_m = cm_binary(g, CM_OP_SUB, cm_const_scalar(g, NULL, dt, 1), mm, NULL);
  int t_new = cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, i, bcast_scalar(g, mm, i), NULL),
                        cm_binary(g, CM_OP_MUL, ov, bcast_scalar(g, one_m, ov), NULL), NULL);
  if (ok >= 0) t_new = cm_select(g, bcast_scalar(g, ok, i), t_new, i, NULL); /* a skipped step */
  cm_assign(g, i, t_new, name_join(nb, sizeof nb, "update/", n->name));
  return CM_OK;
}

/* Loss-scale bookkeeping (GradScaler: x2 after growth_interval good steps, /2
 * on overflow; a fixed scale, good < 0, stays) and the count of applied steps
 * (steps_done <- step when ok); returns the "skipped" output (1 when the step was skipped). */
static int loss_scale_update(cm_graph *g, const cm_optim_config *cfg, int scale, int good, int ok,
                             int steps_done, int step) {
  int one = cm_const_scalar(g, NULL, CM_F32, 1), zero = cm_const_scalar(g, NULL, CM_F32, 0);
  cm_assign(g, steps_done, cm_select(g, ok, step, steps_done, NULL), "update/optimizer.step");
  if (good < 0) return cm_select(g, ok, zero, one, "skipped");
  int good1 = cm_binary(g, CM_OP_ADD, good, one, NULL);
  int grow =
      cm_binary(g, CM_OP_LE, cm_const_scalar(g, NULL, CM_F32, cfg->growth_interval), good1, NULL);
  int scale_ok =
      cm_select(g, grow, cm_binary(g, CM_OP_MUL, scale, cm_const_scalar(g, NULL, CM_F32, 2), NULL),
                scale, NULL);
  int scale_bad = cm_binary(g, CM_OP_MUL, scale, cm_const_scalar(g, NULL, CM_F32, 0.5), NULL);
  cm_assign(g, scale, cm_select(g, ok, scale_ok, scale_bad, NULL), "update/loss_scale");
  int good_ok = cm_select(g, grow, zero, good1, NULL);
  cm_assign(g, good, cm_select(g, ok, good_ok, zero, NULL), "update/loss_scale_good_steps");
  return cm_select(g, ok, zero, one, "skipped");
}

cm_status cm_build_train_step(const cm_graph *fwd, int loss, const cm_optim_config *cfg,
                              cm_graph **out, cm_train_step_info *info, cm_err *err) {
  *out = NULL;
  cm_status st = cm_graph_verify(fwd, err);
  if (st) return st;
  if (loss < 0 || loss >= fwd->n_nodes)
    return cm_errorf(err, CM_EINVALID, "build-step: loss node %d does not exist", loss);
  cm_graph *g = cm_graph_clone(fwd);
  if (!g) return cm_errorf(err, CM_EINTERNAL, "build-step: out of memory");
  int n0 = g->n_nodes;
  int *trainable = malloc(sizeof(int) * (size_t)n0), *grads = malloc(sizeof(int) * (size_t)n0);
  int *new_value = malloc(sizeof(int) * (size_t)n0);
  int n_train = 0;
  if (!trainable || !grads || !new_value) {
    st = cm_errorf(err, CM_EINTERNAL, "build-step: out of memory");
    goto done;
  }
  memset(info, 0, sizeof *info);
  char online[512];
  /* Which params train: not frozen, not an EMA target, not already assigned. */
  for (int i = 0; i < n0; i++) {
    new_value[i] = -1;
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_PARAM) continue;
    bool is_target = ema_online_name(cfg, n->name, online, sizeof online);
    if (is_target) {
      info->n_ema++;
      continue;
    }
    if (name_matches(n->name, cfg->frozen)) {
      info->n_frozen++;
      continue;
    }
    trainable[n_train++] = i;
  }
  info->n_trainable = n_train;

  /* Runtime scalars. */
  int lr = cm_input(g, "lr", CM_F32, 0, NULL);
  int beta1 = cm_input(g, "beta1", CM_F32, 0, NULL);
  int beta2 = cm_input(g, "beta2", CM_F32, 0, NULL);
  /* With loss scaling the step count is a state that skipped steps leave alone, as
   * torch.optim.AdamW's under GradScaler (no host round trip decides a skip). */
  cm_init zero_init = {CM_INIT_ZEROS, 0, 0};
  int steps_done =
      cfg->loss_scaling ? cm_state(g, "optimizer.step", CM_F32, 0, NULL, zero_init) : -1;
  int step = steps_done >= 0
                 ? cm_binary(g, CM_OP_ADD, steps_done, cm_const_scalar(g, NULL, CM_F32, 1), NULL)
                 : cm_input(g, "step", CM_F32, 0, NULL);
  int momentum = info->n_ema ? cm_input(g, "momentum", CM_F32, 0, NULL) : -1;
  cm_dtype loss_dt = g->nodes[loss].type.dtype;

  /* Dynamic loss scaling: gradients of loss * scale, unscaled before use. */
  int scale = -1, good = -1, target_loss = loss;
  cm_init scale_init = {CM_INIT_CONSTANT, cfg->init_loss_scale, 0};
  if (cfg->loss_scaling && cfg->fixed_loss_scale) {
    scale = cm_const_scalar(g, "loss_scale", CM_F32, cfg->init_loss_scale);
  } else if (cfg->loss_scaling) {
    scale = cm_state(g, "loss_scale", CM_F32, 0, NULL, scale_init);
    good = cm_state(g, "loss_scale_good_steps", CM_F32, 0, NULL, zero_init);
  }
  if (cfg->loss_scaling) {
    int l = cm_reshape(g, loss, 0, NULL, NULL);
    target_loss = cm_binary(g, CM_OP_MUL, l, scalar_as(g, scale, loss_dt), "scaled_loss");
  }
  if (cm_graph_error(g)) goto builder_failed;
  if ((st = cm_autodiff(g, target_loss, n_train, trainable, grads, err))) goto done;

  /* Unscale, then the global norm (always reported), then clip. */
  int norm_sq = -1, finite = -1;
  for (int j = 0; j < n_train; j++) {
    int p = trainable[j], gr = grads[j];
    cm_dtype dt = g->nodes[p].type.dtype;
    if (cfg->loss_scaling) {
      int inv = cm_unary(g, CM_OP_RECIP, scalar_as(g, scale, dt), NULL);
      gr = cm_binary(g, CM_OP_MUL, gr, bcast_scalar(g, inv, gr), NULL);
      /* sum(g * 0) is 0 exactly when every element is finite */
      int z = sum_all(g, cm_binary(g, CM_OP_MUL, gr, scalar_like(g, gr, 0), NULL));
      z = scalar_as(g, z, CM_F32);
      finite = finite < 0 ? z : cm_binary(g, CM_OP_ADD, finite, z, NULL);
    }
    int sq = scalar_as(g, sum_all(g, cm_binary(g, CM_OP_MUL, gr, gr, NULL)), CM_F32);
    norm_sq = norm_sq < 0 ? sq : cm_binary(g, CM_OP_ADD, norm_sq, sq, NULL);
    grads[j] = gr;
  }
  int grad_norm = norm_sq >= 0 ? cm_unary(g, CM_OP_SQRT, norm_sq, "grad_norm")
                               : cm_const_scalar(g, "grad_norm", CM_F32, 0);
  int ok = -1; /* bool: apply the update */
  if (cfg->loss_scaling) {
    int zero = cm_const_scalar(g, NULL, CM_F32, 0);
    ok = finite >= 0 ? cm_binary(g, CM_OP_EQ, finite, zero, "grads_finite")
                     : cm_binary(g, CM_OP_EQ, zero, zero, "grads_finite");
  }
  if (cfg->clip_norm > 0) {
    /* PyTorch clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1 */
    int denom = cm_binary(g, CM_OP_ADD, grad_norm, cm_const_scalar(g, NULL, CM_F32, 1e-6), NULL);
    int coef =
        cm_binary(g, CM_OP_DIV, cm_const_scalar(g, NULL, CM_F32, cfg->clip_norm), denom, NULL);
    coef = cm_binary(g, CM_OP_MIN, coef, cm_const_scalar(g, NULL, CM_F32, 1), "clip_coef");
    for (int j = 0; j < n_train; j++) {
      cm_dtype dt = g->nodes[trainable[j]].type.dtype;
      grads[j] = cm_binary(g, CM_OP_MUL, grads[j],
                           bcast_scalar(g, scalar_as(g, coef, dt), grads[j]), NULL);
    }
  }
  if (cm_graph_error(g)) goto builder_failed;

  /* AdamW, as torch.optim.AdamW (decoupled decay, bias-corrected moments). */
  for (int j = 0; j < n_train; j++) {
    int p = trainable[j];
    new_value[p] = adamw_update(g, cfg, p, grads[j], lr, beta1, beta2, step, ok, info);
    if (cm_graph_error(g)) goto builder_failed;
  }

  /* EMA of the targets from the updated online params: t <- m t + (1 - m) o. */
  for (int i = 0; i < n0 && info->n_ema; i++) {
    if ((st = ema_update(g, cfg, i, n0, new_value, momentum, ok, err))) goto done;
    if (cm_graph_error(g)) goto builder_failed;
  }

  /* Loss-scale bookkeeping (GradScaler: x2 after growth_interval good steps, /2 on overflow). */
  int skipped =
      cfg->loss_scaling ? loss_scale_update(g, cfg, scale, good, ok, steps_done, step) : -1;

  /* Metrics: the forward graph's outputs, then grad_norm (and loss_scale, skipped). */
  g->n_outputs = 0;
  for (int k = 0; k < fwd->n_outputs; k++) cm_graph_add_output(g, fwd->outputs[k], NULL);
  bool loss_is_output = false;
  for (int k = 0; k < fwd->n_outputs; k++) loss_is_output |= fwd->outputs[k] == loss;
  if (!loss_is_output) cm_graph_add_output(g, loss, NULL);
  cm_graph_add_output(g, grad_norm, NULL);
  if (cfg->loss_scaling) {
    cm_graph_add_output(g, scale, NULL);
    cm_graph_add_output(g, skipped, NULL);
  }
  if (cm_graph_error(g)) goto builder_failed;
  if ((st = cm_graph_verify(g, err))) goto done;
  *out = g;
  g = NULL;
  goto done;
builder_failed:
  st = cm_errorf(err, g->error.status ? g->error.status : CM_EINTERNAL, "build-step: %s",
                 g->error.msg);
done:
  free(trainable);
  free(grads);
  free(new_value);
  cm_graph_free(g);
  return st;
}
