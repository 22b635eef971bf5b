/* passes/autocast.c — mixed precision as a graph rewrite, in the style of
 * torch.autocast: every f32 contraction reads its operands rounded to a low
 * precision float (bf16 or f16), accumulates in f32 and rounds its result to
 * the low precision once; all other ops stay f32 (docs/passes.md, "Mixed
 * precision"). */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

static bool is_contraction(cm_op op) {
  return op == CM_OP_MATMUL || op == CM_OP_CONV2D || op == CM_OP_CONV2D_GRAD_INPUT ||
         op == CM_OP_CONV2D_GRAD_WEIGHT;
}

/* A contraction whose operands and result are all f32 (one already in low
 * precision, or in f64, is the user's choice and stays). */
static bool rewritable(const cm_graph *g, int id) {
  const cm_node *n = &g->nodes[id];
  if (!is_contraction(n->op) || n->type.dtype != CM_F32) return false;
  for (int k = 0; k < n->n_inputs; k++)
    if (g->nodes[n->inputs[k]].type.dtype != CM_F32) return false;
  return true;
}

typedef struct autocast_ctx {
  const cm_graph *old;
  cm_graph *g;     /* the graph being built */
  cm_dtype low;    /* bf16 or f16 */
  int *low_of;     /* new id -> its value in low precision (-1: not made yet) */
  int low_of_cap;  /* entries of low_of */
  cm_status error; /* out of memory while growing low_of */
} autocast_ctx;

/* "<base>.<suffix>" when base is a user's name and the result names no node
 * of the old or the new graph (copied nodes keep their names, so a name the
 * old graph uses later must stay free); otherwise NULL, a builder name. */
static const char *derived_name(const autocast_ctx *c, const char *base, const char *suffix,
                                char *buf, size_t size) {
  if (base[0] == '%') return NULL;
  int len = snprintf(buf, size, "%s.%s", base, suffix);
  if (len < 0 || (size_t)len >= size) return NULL;
  if (cm_graph_find(c->old, buf) >= 0 || cm_graph_find(c->g, buf) >= 0) return NULL;
  return buf;
}

static bool grow_low_of(autocast_ctx *c, int need) {
  if (need <= c->low_of_cap) return true;
  int cap = c->low_of_cap ? c->low_of_cap : 64;
  while (cap < need) cap *= 2;
  int *grown = realloc(c->low_of, sizeof(int) * (size_t)cap);
  if (!grown) return false;
  for (int i = c->low_of_cap; i < cap; i++) grown[i] = -1;
  c->low_of = grown;
  c->low_of_cap = cap;
  return true;
}

/* The low-precision value of new node v: one cast per distinct value, made on
 * first use. A value that is itself cast(y, f32) of a low y (an earlier
 * contraction's result) is y: rounding it again changes nothing. */
static int low_value(autocast_ctx *c, int v) {
  if (!grow_low_of(c, c->g->n_nodes + 1)) {
    c->error = CM_EINTERNAL;
    return -1;
  }
  if (c->low_of[v] >= 0) return c->low_of[v];
  const cm_node *n = &c->g->nodes[v];
  int lv;
  if (n->op == CM_OP_CAST && c->g->nodes[n->inputs[0]].type.dtype == c->low) {
    lv = n->inputs[0];
  } else {
    char buf[256];
    const char *name = derived_name(c, n->name, cm_dtype_name(c->low), buf, sizeof buf);
    lv = cm_cast(c->g, v, c->low, name);
  }
  if (lv >= 0) c->low_of[v] = lv;
  return lv;
}

/* old node id -> cast(OP(low a, low b), f32) in the new graph; the original
 * name (a user's) goes on the f32 result, which stands for the old node. */
static int rewrite_contraction(autocast_ctx *c, const int *map, int id) {
  const cm_node *n = &c->old->nodes[id];
  int in[2];
  for (int k = 0; k < 2; k++)
    if ((in[k] = low_value(c, map[n->inputs[k]])) < 0) return -1;
  char buf[256];
  const char *name = derived_name(c, n->name, cm_dtype_name(c->low), buf, sizeof buf);
  cm_err e;
  int op = cm_graph_add(c->g, n->op, name, in, 2, &n->attrs, &e);
  if (op < 0) {
    if (c->g->error.status == CM_OK) c->g->error = e;
    return -1;
  }
  return cm_cast(c->g, op, CM_F32, n->name[0] == '%' ? NULL : n->name);
}

cm_status cm_autocast(cm_graph **g, cm_dtype low, int *n_rewritten, cm_err *err) {
  if (n_rewritten) *n_rewritten = 0;
  if (!g || !*g) return cm_errorf(err, CM_EINVALID, "autocast: no graph");
  if (low != CM_BF16 && low != CM_F16)
    return cm_errorf(err, CM_EINVALID, "autocast: the low precision must be bf16 or f16, not %s",
                     low >= 0 && low < CM_DTYPE_COUNT ? cm_dtype_name(low) : "an unknown dtype");
  const cm_graph *old = *g;
  int n_contractions = 0;
  for (int i = 0; i < old->n_nodes; i++) n_contractions += rewritable(old, i);
  if (n_contractions == 0) return CM_OK; /* nothing to do: the graph stays as it is */
  cm_rewriter r;
  cm_status st = cm_rewriter_begin(&r, old, err);
  if (st) return st;
  autocast_ctx c = {old, r.g, low, NULL, 0, CM_OK};
  for (int i = 0; i < old->n_nodes && c.error == CM_OK && r.g->error.status == CM_OK; i++) {
    if (rewritable(old, i))
      r.map[i] = rewrite_contraction(&c, r.map, i);
    else
      cm_rewriter_copy(&r, i);
  }
  free(c.low_of);
  if (c.error != CM_OK) {
    cm_rewriter_abort(&r);
    return cm_errorf(err, CM_EINTERNAL, "autocast: out of memory");
  }
  cm_graph *out = NULL;
  if ((st = cm_rewriter_finish(&r, &out, err))) return cm_err_prefix(err, "autocast: ");
  cm_graph_free(*g);
  *g = out;
  if (n_rewritten) *n_rewritten = n_contractions;
  return CM_OK;
}

cm_status cm_pass_autocast(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  int before = s->g->n_nodes, n = 0;
  cm_graph *g = s->g;
  cm_status st = cm_autocast(&g, CM_BF16, &n, err);
  if (st) return st;
  if (g != s->g) {
    s->g = g;      /* cm_autocast freed the old graph */
    if (s->plan) { /* made for the old graph */
      cm_plan_free(s->plan);
      s->plan = NULL;
    }
  }
  snprintf(stat->detail, sizeof stat->detail, "%d contractions to bf16, %d casts", n,
           s->g->n_nodes - before);
  return CM_OK;
}
