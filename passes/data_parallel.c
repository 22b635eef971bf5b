/* passes/data_parallel.c — the gradient reduction of data-parallel training:
 * on a training step built by cm_build_train_step for several ranks, every
 * parameter gradient that the update reads is replaced by its mean over the
 * ranks, reduced in buckets (one all_reduce each) placed right after their
 * last gradient, so the scheduler can start them while the backward goes on.
 *
 * The gradients are found on the built step: the moment update
 * "update/optimizer.exp_avg.<p>" reads b1 m + (1 - b1) g with g the gradient
 * autodiff produced, after unscaling (loss scaling, "scaled_loss") and
 * clipping ("clip_coef") when the step has them. Only the update's side of a
 * gradient is rewired: a backward node that reads the same node (a gradient
 * that is also another value's adjoint) keeps the rank's own value. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_BUCKET_BYTES (25LL * 1000 * 1000)
#define CONCAT_MAX 64 /* inputs of one concat (ir/infer.c) */

typedef struct dp_ctx {
  const cm_graph *g;
  int ranks;
  int64_t bucket_bytes;
  int n_grads, *grads; /* distinct gradient nodes, ascending ids (production order) */
  int *bucket_of;      /* per gradient: its bucket */
  int *last_of_bucket; /* per bucket: the node after which it is reduced */
  int n_buckets;
  bool *is_grad;        /* per node: one of grads */
  bool *reads_gradient; /* per node: an update-side node reading a gradient */
  cm_err *err;
} dp_ctx;

/* A value as the optimizer passes a scalar along: broadcast and cast of it. */
static int strip_broadcast(const cm_graph *g, int v) {
  while (g->nodes[v].op == CM_OP_BROADCAST || g->nodes[v].op == CM_OP_CAST ||
         g->nodes[v].op == CM_OP_RESHAPE)
    v = g->nodes[v].inputs[0];
  return v;
}

/* mul(x, broadcast(factor)) -> x, when the factor is `factor` (a node) or, for factor < 0,
 * a reciprocal (the unscaling); -1 otherwise. */
static int strip_factor(const cm_graph *g, int v, int factor) {
  const cm_node *n = &g->nodes[v];
  if (n->op != CM_OP_MUL) return -1;
  int f = strip_broadcast(g, n->inputs[1]);
  bool match = factor >= 0 ? f == factor : g->nodes[f].op == CM_OP_RECIP;
  return match ? n->inputs[0] : -1;
}

/* The gradient node that the first-moment update `value` of a param reads. */
static int gradient_of_update(const cm_graph *g, int value, int clip_coef, bool unscaled) {
  const cm_node *n = &g->nodes[value];
  if (n->op == CM_OP_SELECT) n = &g->nodes[n->inputs[1]]; /* a skipped step keeps m */
  if (n->op != CM_OP_ADD || g->nodes[n->inputs[1]].op != CM_OP_MUL) return -1;
  int gr = g->nodes[n->inputs[1]].inputs[0];
  if (clip_coef >= 0 && gr >= 0) gr = strip_factor(g, gr, clip_coef);
  if (unscaled && gr >= 0) gr = strip_factor(g, gr, -1);
  return gr;
}

static int compare_ints(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

/* The distinct float gradients the updates read (a constant, e.g. the zero gradient of a
 * param the loss does not reach, is the same on every rank and needs no reduction). */
static cm_status find_gradients(dp_ctx *c) {
  const cm_graph *g = c->g;
  static const char prefix[] = "update/optimizer.exp_avg.";
  int clip_coef = cm_graph_find(g, "clip_coef");
  bool unscaled = cm_graph_find(g, "scaled_loss") >= 0;
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_ASSIGN || strncmp(n->name, prefix, sizeof prefix - 1) != 0) continue;
    int gr = gradient_of_update(g, n->inputs[1], clip_coef, unscaled);
    const char *param = n->name + sizeof prefix - 1;
    int p = cm_graph_find(g, param);
    if (gr < 0 || p < 0 || !cm_type_equal(&g->nodes[gr].type, &g->nodes[p].type))
      return cm_errorf(c->err, CM_EINVALID,
                       "data_parallel: \"%s\" does not read the gradient of \"%s\" as "
                       "cm_build_train_step builds it (b1 m + (1 - b1) g)",
                       n->name, param);
    if (g->nodes[gr].op != CM_OP_CONST && cm_dtype_is_float(g->nodes[gr].type.dtype))
      c->grads[c->n_grads++] = gr;
  }
  if (c->n_grads == 0 && cm_graph_find(g, "grad_norm") < 0)
    return cm_errorf(c->err, CM_EINVALID,
                     "data_parallel: no optimizer update (\"update/optimizer.exp_avg.*\"): the "
                     "pass applies to a training step");
  qsort(c->grads, (size_t)c->n_grads, sizeof *c->grads, compare_ints);
  int distinct = 0;
  for (int k = 0; k < c->n_grads; k++)
    if (distinct == 0 || c->grads[distinct - 1] != c->grads[k]) c->grads[distinct++] = c->grads[k];
  c->n_grads = distinct;
  return CM_OK;
}

/* Buckets in production order: a bucket closes before a gradient that would take it past
 * bucket_bytes (so a larger gradient is a bucket of its own) or that has another dtype. */
static void assign_buckets(dp_ctx *c) {
  int64_t filled = 0;
  for (int k = 0; k < c->n_grads; k++) {
    const cm_type *t = &c->g->nodes[c->grads[k]].type;
    int64_t bytes = cm_type_nbytes(t);
    bool other_dtype = k > 0 && c->g->nodes[c->grads[k - 1]].type.dtype != t->dtype;
    if (k == 0 || (filled > 0 && filled + bytes > c->bucket_bytes) || other_dtype) {
      c->n_buckets++;
      filled = 0;
    }
    filled += bytes;
    c->bucket_of[k] = c->n_buckets - 1;
    c->last_of_bucket[c->n_buckets - 1] = c->grads[k];
  }
}

/* The update side: nodes reading a gradient that are no ancestor of any gradient (the
 * backward's nodes all are, or are dead). */
static cm_status mark_gradient_readers(dp_ctx *c) {
  const cm_graph *g = c->g;
  bool *backward = calloc((size_t)g->n_nodes, sizeof *backward);
  if (!backward) return cm_errorf(c->err, CM_EINTERNAL, "data_parallel: out of memory");
  for (int k = 0; k < c->n_grads; k++) backward[c->grads[k]] = true, c->is_grad[c->grads[k]] = true;
  for (int i = g->n_nodes - 1; i >= 0; i--)
    for (int j = 0; backward[i] && j < g->nodes[i].n_inputs; j++)
      backward[g->nodes[i].inputs[j]] = true;
  for (int i = 0; i < g->n_nodes; i++)
    for (int j = 0; !backward[i] && j < g->nodes[i].n_inputs; j++)
      c->reads_gradient[i] |= c->is_grad[g->nodes[i].inputs[j]];
  free(backward);
  return CM_OK;
}

/* concat along axis 0 of n values, in a tree of concats of at most CONCAT_MAX inputs. */
static int concat_all(cm_graph *g, int n, int *xs) {
  if (n == 1) return xs[0];
  if (n <= CONCAT_MAX) return cm_concat(g, n, xs, 0, NULL);
  int parts = 0;
  for (int k = 0; k < n; k += CONCAT_MAX, parts++)
    xs[parts] = cm_concat(g, n - k < CONCAT_MAX ? n - k : CONCAT_MAX, xs + k, 0, NULL);
  return concat_all(g, parts, xs);
}

/* Bucket b in the new graph: flatten, concatenate, all_reduce(MEAN) "grad_bucket_<b>", then
 * each gradient's slice in its shape; reduced[old gradient] receives it. */
static void emit_bucket(dp_ctx *c, cm_rewriter *r, int b, int *reduced) {
  cm_graph *g = r->g;
  int first = 0, n = 0;
  while (c->bucket_of[first] != b) first++;
  while (first + n < c->n_grads && c->bucket_of[first + n] == b) n++;
  int *flat = malloc(sizeof(int) * (size_t)n);
  if (!flat) {
    cm_graph_fail(g, "data_parallel: out of memory");
    return;
  }
  for (int k = 0; k < n; k++) {
    const cm_type *t = &c->g->nodes[c->grads[first + k]].type;
    int64_t numel = cm_type_numel(t);
    int v = r->map[c->grads[first + k]];
    flat[k] = t->rank == 1 ? v : cm_reshape(g, v, 1, &numel, NULL);
  }
  char name[32];
  snprintf(name, sizeof name, "grad_bucket_%d", b);
  int all = concat_all(g, n, flat);
  int mean = cm_all_reduce(g, all, CM_MODE_MEAN, c->ranks, name);
  int64_t at = 0;
  for (int k = 0; k < n; k++) {
    const cm_type *t = &c->g->nodes[c->grads[first + k]].type;
    int64_t numel = cm_type_numel(t), stop = at + numel;
    int v = n == 1 ? mean : cm_slice(g, mean, &at, &stop, NULL, NULL);
    reduced[c->grads[first + k]] = t->rank == 1 ? v : cm_reshape(g, v, t->rank, t->dims, NULL);
    at = stop;
  }
  free(flat);
}

/* Copies the graph with the buckets after their last gradients and the update side reading
 * the reduced gradients. */
static cm_status rewrite(dp_ctx *c, cm_graph **out) {
  const cm_graph *old = c->g;
  cm_rewriter r;
  cm_status st = cm_rewriter_begin(&r, old, c->err);
  if (st) return st;
  int *reduced = malloc(sizeof(int) * (size_t)(old->n_nodes ? old->n_nodes : 1));
  if (!reduced) {
    cm_rewriter_abort(&r);
    return cm_errorf(c->err, CM_EINTERNAL, "data_parallel: out of memory");
  }
  for (int i = 0; i < old->n_nodes; i++) reduced[i] = -1;
  int b = 0;
  for (int id = 0; id < old->n_nodes && !r.g->error.status; id++) {
    const cm_node *n = &old->nodes[id];
    int saved[4];
    if (c->reads_gradient[id] && n->n_inputs > 4)
      cm_graph_fail(r.g, "data_parallel: \"%s\" (%s) reads a gradient among %d inputs", n->name,
                    cm_op_name(n->op), n->n_inputs);
    bool swap = c->reads_gradient[id] && n->n_inputs <= 4;
    for (int k = 0; swap && k < n->n_inputs; k++) {
      int in = n->inputs[k];
      saved[k] = r.map[in];
      if (c->is_grad[in] && reduced[in] < 0)
        cm_graph_fail(r.g, "data_parallel: \"%s\" reads a gradient before its bucket", n->name);
      if (c->is_grad[in]) r.map[in] = reduced[in];
    }
    cm_rewriter_copy(&r, id);
    for (int k = 0; swap && k < n->n_inputs; k++) r.map[n->inputs[k]] = saved[k];
    while (b < c->n_buckets && c->last_of_bucket[b] == id) emit_bucket(c, &r, b++, reduced);
  }
  free(reduced);
  return cm_rewriter_finish(&r, out, c->err);
}

cm_status cm_data_parallel(cm_graph **g, int ranks, int64_t bucket_bytes, cm_err *err) {
  if (!g || !*g) return cm_errorf(err, CM_EINTERNAL, "data_parallel: no graph");
  if (ranks < 1 || bucket_bytes < 0)
    return cm_errorf(err, CM_EINVALID,
                     "data_parallel: ranks %d must be >= 1, bucket bytes %lld >= 0", ranks,
                     (long long)bucket_bytes);
  if (ranks == 1) return CM_OK;
  if (cm_graph_find(*g, "grad_bucket_0") >= 0)
    return cm_errorf(err, CM_EINVALID,
                     "data_parallel: the step already has \"grad_bucket_0\": its gradients are "
                     "reduced (the pass applies once)");
  const cm_graph *old = *g;
  size_t n = (size_t)(old->n_nodes ? old->n_nodes : 1);
  dp_ctx c;
  memset(&c, 0, sizeof c);
  c.g = old, c.ranks = ranks, c.err = err;
  c.bucket_bytes = bucket_bytes ? bucket_bytes : DEFAULT_BUCKET_BYTES;
  c.grads = malloc(sizeof(int) * n);
  c.bucket_of = malloc(sizeof(int) * n);
  c.last_of_bucket = malloc(sizeof(int) * n);
  c.is_grad = calloc(n, sizeof *c.is_grad);
  c.reads_gradient = calloc(n, sizeof *c.reads_gradient);
  cm_status st = CM_OK;
  if (!c.grads || !c.bucket_of || !c.last_of_bucket || !c.is_grad || !c.reads_gradient)
    st = cm_errorf(err, CM_EINTERNAL, "data_parallel: out of memory");
  if (!st) st = find_gradients(&c);
  if (!st) assign_buckets(&c);
  if (!st) st = mark_gradient_readers(&c);
  cm_graph *out = NULL;
  if (!st) st = rewrite(&c, &out);
  free(c.grads), free(c.bucket_of), free(c.last_of_bucket), free(c.is_grad);
  free(c.reads_gradient);
  if (st) return st;
  cm_graph_free(*g);
  *g = out;
  return CM_OK;
}

/* The world size a graph was built for: its collectives' ranks (1 without any). */
static int graph_ranks(const cm_graph *g) {
  int ranks = 1;
  for (int i = 0; i < g->n_nodes; i++)
    if (cm_op_get_info(g->nodes[i].op)->category == CM_CAT_COLLECTIVE &&
        g->nodes[i].attrs.ranks > ranks)
      ranks = g->nodes[i].attrs.ranks;
  return ranks;
}

cm_status cm_pass_data_parallel(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  cm_graph *g = s->g;
  int ranks = graph_ranks(g);
  cm_status st = cm_data_parallel(&g, ranks, 0, err);
  if (st) return st;
  int buckets = 0;
  char name[32];
  for (;; buckets++) {
    snprintf(name, sizeof name, "grad_bucket_%d", buckets);
    if (cm_graph_find(g, name) < 0) break;
  }
  if (g != s->g) {
    s->g = g;
    if (s->plan) { /* made for the old graph */
      cm_plan_free(s->plan);
      s->plan = NULL;
    }
  }
  snprintf(stat->detail, sizeof stat->detail, "%d ranks: %d gradient buckets", ranks, buckets);
  return CM_OK;
}
