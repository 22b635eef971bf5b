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
 * at 0. Over several ranks the loss is the sum of the ranks' losses: the
 * adjoint of all_reduce is an all_reduce, that of all_gather this rank's slice
 * of all_reduce(sum) of the adjoint, read with the i32[] input "rank" (added
 * when missing). Errors: a non-float wrt, a wrt that reaches the loss only
 * through non-differentiable ops (named). */
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
  bool fixed_loss_scale;  /* loss_scaling at init_loss_scale always (still skipping non-finite) */
} cm_optim_config;

void cm_optim_config_default(cm_optim_config *c);

typedef struct cm_train_step_info {
  int n_trainable, n_decay, n_frozen, n_ema;
} cm_train_step_info;

/* Builds the training step (state, batch, scalars) -> (state', metrics) from a
 * forward graph and its scalar loss:
 * - runtime scalar inputs (f32[]): "lr", "beta1", "beta2", "step" (t >= 1, for
 *   bias correction; with loss scaling the state "optimizer.step" counts the
 *   applied steps instead) and, when there are EMA targets, "momentum";
 * - state per trained param p: "optimizer.exp_avg.<p>", "optimizer.exp_avg_sq.<p>"
 *   (zeros); with dynamic loss scaling "loss_scale" and "loss_scale_good_steps";
 * - with loss scaling, a step whose unscaled gradients are not all finite keeps
 *   every param, moment, EMA target and the step count as they were;
 * - updates as assign nodes named "update/<state name>": AdamW exactly as
 *   torch.optim.AdamW (p <- p(1 - lr wd); m, v moments; p <- p - lr/(1-b1^t) *
 *   m / (sqrt(v)/sqrt(1-b2^t) + eps)), then EMA t <- m t + (1-m) o_new of
 *   every target from its updated online twin;
 * - outputs: the forward graph's outputs (and the loss), "grad_norm" (global L2
 *   norm of the unscaled gradients, before clipping), and with loss scaling
 *   "new_loss_scale" (the scale after the step, as GradScaler.get_scale() after
 *   update()) and "skipped" (1 when a non-finite gradient skipped the step). */
cm_status cm_build_train_step(const cm_graph *fwd, int loss, const cm_optim_config *cfg,
                              cm_graph **out, cm_train_step_info *info, cm_err *err);

/* ---- graph rewriting (what the clean-up passes are made of) --------------- */

/* Builds a new graph from an old one, node by node in order: copy a node
 * (inputs mapped) or map it to a replacement in the new graph. User names are
 * kept; builder names ("%<id>") are given afresh, so the result reads cleanly. */
typedef struct cm_rewriter {
  const cm_graph *old;
  cm_graph *g; /* the new graph */
  int *map;    /* old id -> new id (-1: not yet / dropped) */
} cm_rewriter;

cm_status cm_rewriter_begin(cm_rewriter *r, const cm_graph *old, cm_err *err);
/* Copies old node `id` with its inputs mapped (all must be mapped); returns the
 * new id or -1 (g->error set). */
int cm_rewriter_copy(cm_rewriter *r, int id);
/* Maps outputs, verifies, and hands over the new graph (the old one is kept). */
cm_status cm_rewriter_finish(cm_rewriter *r, cm_graph **out, cm_err *err);
void cm_rewriter_abort(cm_rewriter *r);
/* Nodes a pass must not remove or replace: graph outputs (their names are the
 * interface), assigns (side effects) and sources. */
bool cm_node_is_pinned(const cm_graph *g, int id, const bool *is_output);

/* ---- fusion groups, schedule and memory plan ----------------------------- */

typedef enum cm_group_kind {
  CM_GROUP_ELEMENTWISE, /* elementwise and movement chains */
  CM_GROUP_ROW,    /* a reduction over the innermost axis plus the consumers broadcasting it back */
  CM_GROUP_REDUCE, /* other reductions with their elementwise producers */
  CM_GROUP_GEMM,   /* matmul with prologue and epilogue */
  CM_GROUP_ATTENTION,  /* matmul -> scale -> softmax -> matmul (forward or backward) */
  CM_GROUP_CONV,       /* conv2d and its adjoints with epilogue */
  CM_GROUP_COLLECTIVE, /* all_reduce / all_gather */
  CM_GROUP_UPDATE,     /* optimizer or EMA updates: assigns with their elementwise math */
  CM_GROUP_KIND_COUNT
} cm_group_kind;

const char *cm_group_kind_name(cm_group_kind k);

/* One kernel-to-be: nodes computed together, reading only its inputs from
 * memory and writing only its outputs. */
typedef struct cm_group {
  cm_group_kind kind;
  int n_nodes, *nodes;     /* topological order */
  int n_inputs, *inputs;   /* node ids read from memory: sources or other groups' outputs */
  int n_outputs, *outputs; /* node ids written to memory: used by other groups, graph
                              outputs, or assign values (written into their state) */
} cm_group;

/* The result of fuse, schedule and memplan over a graph. Sources (input,
 * param, state) belong to no group; const and iota nodes are folded into the
 * groups that use them (duplicated: they are free). */
typedef struct cm_plan {
  int n_nodes; /* of the graph it was made for */
  int n_groups;
  cm_group *groups;
  int *group_of;       /* per node: its group, -1 for sources */
  int n_order, *order; /* schedule: group ids in execution order (empty until schedule) */
  /* memory plan (memplan): per node, the byte offset of its buffer in the
   * arena, or -1 when it has none there (sources and state live in their own
   * buffers; group-internal values are never in memory; an assign's value is
   * written straight into its state) */
  int64_t *offset;
  int64_t arena_bytes;     /* the arena's size: the peak of the packing */
  int64_t unplanned_bytes; /* the sum of all arena buffers, as if none were reused */
} cm_plan;

/* A plan with every non-source node in a group of its own (what schedule and
 * memplan use when the pipeline has no fuse). */
cm_status cm_plan_unfused(const cm_graph *g, cm_plan **out, cm_err *err);
void cm_plan_free(cm_plan *p);
/* Checks a plan against its graph: every non-source node in exactly one group,
 * group inputs/outputs exact (a group reads no other group's internal value),
 * the order a topological order of groups (when present), and, when there is a
 * memory plan, that no two buffers live at the same time overlap in the arena
 * and that every buffer fits in it. Errors name the groups/nodes. */
cm_status cm_plan_verify(const cm_graph *g, const cm_plan *p, cm_err *err);
/* Evaluates the graph group by group in plan order (fusion order when there is
 * no schedule), passing only group outputs between groups; values as cm_eval
 * (only group outputs and graph outputs are kept; other entries left empty). */
cm_status cm_plan_eval(const cm_graph *g, const cm_plan *p, const cm_tensor *const *sources,
                       cm_tensor *values, const cm_eval_opts *opts, cm_err *err);
/* Evaluates group gi alone in F64 with forward error bounds (cm_eval_bounded)
 * that start from exact inputs: its fed sources from sources[v], its other
 * inputs from values[v] (node ids of g: what another evaluator, e.g. a
 * backend, computed). On success values[v] and bounds[v] hold every output v
 * of the group (replacing what was there). How a backend's kernel is checked
 * on its own inputs, with no error carried in from the kernels before it. */
cm_status cm_plan_eval_group_bounded(const cm_graph *g, const cm_plan *p, int gi,
                                     const cm_tensor *const *sources, cm_tensor *values,
                                     cm_tensor *bounds, cm_err *err);
/* Prints the plan: one line per group in order (kind, nodes, inputs, outputs,
 * and offsets when planned), then the arena figures. */
void cm_plan_print(const cm_graph *g, const cm_plan *p, FILE *out);

/* ---- the pass manager ----------------------------------------------------- */

typedef struct cm_pass_state {
  cm_graph *g;   /* any pass may replace it (the old one is freed): the clean-up passes
                    rebuild it, fuse does when it duplicates broadcasts; read it again after
                    each pass */
  cm_plan *plan; /* made by fuse (or by schedule when there is no fuse) for the current g;
                    a pass that rebuilds g drops it. An assign node's value is the new
                    value of its state (the assign is its group's output) */
} cm_pass_state;

typedef struct cm_pass_stat {
  const char *pass;
  double ms;
  int nodes_before, nodes_after;
  char detail[256]; /* pass-specific, e.g. "folded 12 constants, 3 permutes into matmul" */
} cm_pass_stat;

typedef cm_status (*cm_pass_fn)(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);

typedef struct cm_pass_info {
  const char *name;
  const char *doc;
  cm_pass_fn run;
} cm_pass_info;

/* All passes, in the default pipeline's order; NULL-terminated. */
const cm_pass_info *cm_passes(void);
/* "simplify,cse,dce,flash_backward,fuse,schedule,memplan" */
extern const char cm_default_pipeline[];

typedef struct cm_pipeline_opts {
  bool verify_each; /* cm_graph_verify (and cm_plan_verify) after every pass */
  bool print_after_all;
  const char *print_after; /* comma-separated pass names */
  FILE *print_out;         /* where --print-after goes (stderr when NULL) */
} cm_pipeline_opts;

/* Runs the comma-separated pipeline on s. stats (may be NULL) receives one
 * entry per pass run (at most max_stats). Errors name the pass. */
cm_status cm_pipeline_run(cm_pass_state *s, const char *pipeline, const cm_pipeline_opts *opts,
                          cm_pass_stat *stats, int max_stats, int *n_stats, cm_err *err);

/* The passes themselves (each also reachable by name through cm_passes()). */
cm_status cm_pass_simplify(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);
cm_status cm_pass_cse(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);
cm_status cm_pass_dce(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);
cm_status cm_pass_fuse(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);
cm_status cm_pass_schedule(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);
cm_status cm_pass_memplan(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);

/* ---- mixed precision (passes/autocast.c) ------------------------------------
 * Autocast in the style of torch.autocast, target-independent, on any graph (the training
 * step after autodiff and the optimizer included). Every contraction (matmul, conv2d,
 * conv2d_grad_input, conv2d_grad_weight) whose operands are f32 becomes
 *   cast(OP(cast(a, low), cast(b, low)), f32)
 * so its operands are rounded to `low` (bf16 or f16), it accumulates in f32 or wider and its
 * result is rounded to `low` once, as torch's are. Everything else (LayerNorm/BatchNorm
 * statistics, softmax, losses, the InfoNCE logits, reductions, the optimizer, params and
 * states) stays f32. The same f32 value cast for several contractions is cast once (the
 * forward's activation and the backward's weight gradient share it). A graph whose
 * contractions are already low precision is left as is. n_rewritten (may be NULL) receives
 * the contractions rewritten. On success *g is the rewritten graph (the old one freed; the same
 * object when nothing was rewritten); names: "<operand>.bf16" for an operand's cast,
 * "<contraction>.bf16" for the low contraction, and the contraction's own name on its f32 result,
 * so outputs keep their names. Errors: low not bf16 or f16 (CM_EINVALID), *g unchanged. */
cm_status cm_autocast(cm_graph **g, cm_dtype low, int *n_rewritten, cm_err *err);
/* The pass "autocast": cm_autocast with bf16. */
cm_status cm_pass_autocast(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);

/* ---- data parallelism (passes/data_parallel.c) --------------------------------
 * On a training step built (cm_build_train_step) for `ranks` ranks, every parameter gradient
 * that feeds the optimizer update is averaged over the ranks before the update: gradients are
 * packed in production order (ascending node id: the backward produces the last layers' first)
 * into buckets of about bucket_bytes (0: 25 MB; a bucket closes before a gradient that would
 * take it past that, so a larger gradient is its own bucket; a dtype change closes it too),
 * each bucket is one all_reduce(MEAN) named "grad_bucket_<i>" of the concatenation of its
 * flattened gradients, placed right after the bucket's last gradient, and its slices replace
 * the gradients where the update side reads them (the backward keeps reading its own values).
 * Gradient clipping's global norm and the loss-scaling finiteness check then see the reduced
 * gradients, as DDP + clip_grad_norm_ do. The gradients are found on the built step through
 * "update/optimizer.exp_avg.<p>" (b1 m + (1 - b1) g, g after the unscaling and clipping when
 * the step has "scaled_loss" / "clip_coef"); a constant gradient (a param the loss does not
 * reach) is the same on every rank and is left out. ranks == 1: no change (*g untouched).
 * Errors (CM_EINVALID, *g unchanged): a graph with no optimizer update, an update that does
 * not read its gradient as cm_build_train_step builds it, a second application ("grad_bucket_0"
 * exists). On success *g is the rewritten graph (the old one freed; builder names renewed). */
cm_status cm_data_parallel(cm_graph **g, int ranks, int64_t bucket_bytes, cm_err *err);
/* The pass "data_parallel": cm_data_parallel with the graph's ranks (its collectives' attrs.ranks;
 * 1 without any) and 25 MB buckets. */
cm_status cm_pass_data_parallel(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);

/* ---- the attention backward without N×N tensors (passes/flash_backward.c) --
 * For every attention (S = matmul(Q, K) {transpose_b} [cast f32] [· const c], softmax over the
 * keys with a stop-gradient max m and row sum z, O = matmul(P [cast low], V)) whose backward
 * reads its N×N values E = exp(S·c - m), P = E / z, P's low cast or broadcasts of z, the
 * backward's reads become a recomputation from Q, K, m and z with the forward's own ops and
 * dtypes (so the same values, the same rounding), and autodiff's row sum over the keys
 * reduce_sum(neg(div(mul(dP, P), broadcast z))) becomes the equal -D/z with
 * D = reduce_sum(mul(dO, O)) {keepdims} over the head dim (dO and O in f32). A graph with no
 * attention backward is left as is (the same object), so the pass is idempotent. Names of
 * sources, outputs and user-named nodes are kept; dead nodes are removed afterwards. Run after
 * cse (which would merge the recomputation back into the forward). */
typedef struct cm_flash_backward_stats {
  int attentions;  /* attention backwards rewritten */
  int d_rewritten; /* ... whose row sum over the keys became -D/z */
  int d_kept;      /* ... whose row sum did not match and stays autodiff's (two key passes) */
} cm_flash_backward_stats;
cm_status cm_flash_backward(cm_graph **g, cm_flash_backward_stats *stats, cm_err *err);
/* The pass "flash_backward". */
cm_status cm_pass_flash_backward(cm_pass_state *s, cm_pass_stat *stat, cm_err *err);

#endif
