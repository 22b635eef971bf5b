/* passes/passes.h — graph passes: the contract of the passes layer.
 *
 * Defines: reverse-mode autodiff (cm_autodiff), gradient checking against
 * finite differences (cm_gradcheck), and the training step builder
 * (cm_build_train_step: AdamW, weight-decay groups, frozen params, EMA,
 * clipping, dynamic loss scaling). Simplification, fusion, scheduling and
 * memory planning come with their issues. Uses ir/ only. */
#ifndef CMAEC_PASSES_H
#define CMAEC_PASSES_H

#include "../ir/ir.h"

/* Appends to g the adjoint graph of the float scalar `loss` (numel 1) with
 * respect to the float nodes wrt[0..n_wrt): grads[j] is the node holding
 * d loss / d wrt[j] (a zero constant when the loss does not depend on it).
 * stop_gradient blocks; integer and bool values carry no gradient; ties of
 * max/min split the gradient in half and reduce_max shares it evenly among the
 * maxima (PyTorch's torch.maximum and torch.amax); abs and relu have gradient 0
 * at 0. Errors: a non-float wrt, a wrt that reaches the loss only through
 * non-differentiable ops (named), all_gather over several ranks. */
cm_status cm_autodiff(cm_graph *g, int loss, int n_wrt, const int *wrt, int *grads, cm_err *err);

typedef struct cm_gradcheck_result {
  int node; /* the wrt node */
  int64_t elements;
  double max_abs_error;    /* max |autodiff - finite difference| over elements */
  double max_abs_gradient; /* max |gradient| over elements (either estimate) */
  double max_rel_error;    /* max_abs_error / max(max_abs_gradient, 1e-8) */
} cm_gradcheck_result;

/* Compares cm_autodiff's gradients with central finite differences, both
 * evaluated by the oracle in f64: each element x of each wrt source is moved
 * by h = step * max(1, |x|) both ways. sources as for cm_eval (every wrt must
 * be a source with a value). Two evaluations per element: for small graphs. */
cm_status cm_gradcheck(const cm_graph *g, int loss, int n_wrt, const int *wrt,
                       const cm_tensor *const *sources, double step, cm_gradcheck_result *results,
                       cm_err *err);

/* ---- the training step -------------------------------------------------- */

/* CMAE's no-decay rule: a param whose name contains any of these substrings
 * (LayerNorms, biases, pos_embed, mask_token, cls_token; BatchNorm weights keep decay). */
extern const char *const cm_cmae_no_decay[];

typedef struct cm_ema_pair {
  const char *online_prefix; /* "backbone." */
  const char *target_prefix; /* "target_backbone." */
} cm_ema_pair;

typedef struct cm_optim_config {
  double eps;                  /* AdamW eps (1e-8) */
  double weight_decay;         /* for params not matching no_decay (0.05) */
  const char *const *no_decay; /* NULL-terminated substrings (cm_cmae_no_decay) */
  const char *const *frozen;   /* NULL-terminated substrings: params that do not train */
  int n_ema;
  const cm_ema_pair *ema; /* target params: EMA of their online twins, never trained */
  double clip_norm;       /* global-norm clipping; 0 = off */
  bool loss_scaling;      /* dynamic loss scaling, skipping non-finite steps */
  double init_loss_scale; /* 65536 */
  int growth_interval;    /* good steps before the scale doubles (2000) */
} cm_optim_config;

void cm_optim_config_default(cm_optim_config *c);

typedef struct cm_train_step_info {
  int n_trainable, n_decay, n_frozen, n_ema;
} cm_train_step_info;

/* Builds the training step (state, batch, scalars) -> (state', metrics) from a
 * forward graph and its scalar loss:
 * - runtime scalar inputs (f32[]): "lr", "beta1", "beta2", "step" (t >= 1, for
 *   bias correction) and, when there are EMA targets, "momentum";
 * - state per trained param p: "optimizer.exp_avg.<p>", "optimizer.exp_avg_sq.<p>"
 *   (zeros); with loss scaling "loss_scale" and "loss_scale_good_steps";
 * - updates as assign nodes named "update/<state name>": AdamW exactly as
 *   torch.optim.AdamW (p <- p(1 - lr wd); m, v moments; p <- p - lr/(1-b1^t) *
 *   m / (sqrt(v)/sqrt(1-b2^t) + eps)), then EMA t <- m t + (1-m) o_new of
 *   every target from its updated online twin;
 * - outputs: the forward graph's outputs (and the loss), "grad_norm" (global L2
 *   norm of the unscaled gradients, before clipping), and with loss scaling
 *   "loss_scale" and "skipped" (1 when a non-finite gradient skipped the step). */
cm_status cm_build_train_step(const cm_graph *fwd, int loss, const cm_optim_config *cfg,
                              cm_graph **out, cm_train_step_info *info, cm_err *err);

#endif
