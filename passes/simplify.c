/* passes/simplify.c — algebraic simplification as a table of rewrite rules.
 *
 * The graph is rebuilt node by node; for each node (inputs already rewritten)
 * the rules are tried in table order, and the first that applies gives the
 * replacement. The pass repeats until nothing changes (at most 4 rounds).
 * Rules never touch pinned nodes (outputs, assigns, sources). Identities that
 * are wrong under IEEE (x * 0 = 0, x - x = 0) are deliberately absent. */
#include "passes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Folding evaluates nodes with at most this many elements. */
#define FOLD_MAX_ELEMENTS 4096

typedef struct {
  cm_graph *g;        /* the new graph */
  const cm_node *old; /* the node being rewritten (in the old graph) */
  const int *in;      /* its inputs, mapped into the new graph */
} rule_ctx;

/* A rule returns the new-graph id replacing the node, or -1 when it does not apply. */
typedef int (*rule_fn)(rule_ctx *c);

/* The value of a constant that is the same everywhere (a fill, or data all
 * equal), looking through reshapes and broadcasts. */
static bool uniform_value(const cm_graph *g, int id, double *v) {
  const cm_node *n = &g->nodes[id];
  while (n->op == CM_OP_RESHAPE || n->op == CM_OP_BROADCAST) n = &g->nodes[n->inputs[0]];
  if (n->op != CM_OP_CONST) return false;
  if (!n->attrs.data) {
    *v = n->attrs.value;
    return true;
  }
  for (int64_t i = 1; i < n->attrs.n_data; i++)
    if (n->attrs.data[i] != n->attrs.data[0]) return false;
  *v = n->attrs.data[0];
  return true;
}

/* Bitwise: +0 and -0 differ here, which is what IEEE identities need. */
static bool is_value(const cm_graph *g, int id, double want) {
  double v;
  return id >= 0 && uniform_value(g, id, &v) && memcmp(&v, &want, sizeof v) == 0;
}

/* x + (-0) -> x, x - (+0) -> x, x * 1 -> x, x / 1 -> x (and 1 * x, -0 + x).
 * x + (+0) is not x when x is -0, so for floats only -0 is the additive
 * identity; for integers any zero is. */
static int rule_identity_operand(rule_ctx *c) {
  cm_op op = c->old->op;
  if (c->old->n_inputs != 2) return -1;
  int a = c->in[0], b = c->in[1];
  bool is_int = !cm_dtype_is_float(c->old->type.dtype);
  double add_zero = is_int ? 0.0 : -0.0;
  if (op == CM_OP_ADD && (is_value(c->g, a, add_zero) || (is_int && is_value(c->g, a, 0))))
    return b;
  if (op == CM_OP_ADD && is_value(c->g, b, add_zero)) return a;
  if (op == CM_OP_SUB && is_value(c->g, b, 0.0)) return a;
  if (op == CM_OP_MUL && is_value(c->g, a, 1)) return b;
  if ((op == CM_OP_MUL || op == CM_OP_DIV) && is_value(c->g, b, 1)) return a;
  return -1;
}

/* neg(neg(x)) -> x; stop_gradient is kept (autodiff ran already or not: it matters). */
static int rule_double_negation(rule_ctx *c) {
  if (c->old->op != CM_OP_NEG) return -1;
  const cm_node *x = &c->g->nodes[c->in[0]];
  return x->op == CM_OP_NEG ? x->inputs[0] : -1;
}

/* select(c, x, x) -> x */
static int rule_select_same(rule_ctx *c) {
  return c->old->op == CM_OP_SELECT && c->in[1] == c->in[2] ? c->in[1] : -1;
}

static bool is_identity_perm(const int *perm, int rank) {
  for (int i = 0; i < rank; i++)
    if (perm[i] != i) return false;
  return true;
}

/* Movement that does nothing: reshape/broadcast/cast to the same type, the
 * identity permutation, a slice of everything, padding by nothing, a concat
 * of one input. */
static int rule_identity_movement(rule_ctx *c) {
  cm_op op = c->old->op;
  if (op != CM_OP_RESHAPE && op != CM_OP_BROADCAST && op != CM_OP_PERMUTE && op != CM_OP_SLICE &&
      op != CM_OP_PAD && op != CM_OP_CAST && op != CM_OP_CONCAT)
    return -1;
  if (op == CM_OP_CONCAT && c->old->n_inputs != 1) return -1;
  cm_type tx = c->g->nodes[c->in[0]].type;
  if (!cm_type_equal(&tx, &c->old->type)) return -1;
  if (op == CM_OP_PERMUTE && !is_identity_perm(c->old->attrs.perm, tx.rank)) return -1;
  if (op == CM_OP_SLICE)
    for (int i = 0; i < tx.rank; i++)
      if (c->old->attrs.start[i] != 0 || c->old->attrs.step[i] != 1) return -1;
  return c->in[0];
}

/* reshape(reshape(x)) -> reshape(x); broadcast(broadcast(x)) -> broadcast(x);
 * permute(permute(x)) -> permute(x) composed. */
static int rule_fold_movement_chain(rule_ctx *c) {
  cm_op op = c->old->op;
  if (op != CM_OP_RESHAPE && op != CM_OP_BROADCAST && op != CM_OP_PERMUTE) return -1;
  const cm_node x = c->g->nodes[c->in[0]];
  if (x.op != op) return -1;
  cm_attrs a = c->old->attrs;
  if (op == CM_OP_PERMUTE)
    for (int i = 0; i < c->old->type.rank; i++) a.perm[i] = x.attrs.perm[c->old->attrs.perm[i]];
  cm_err e;
  int id = cm_graph_add(c->g, op, NULL, &x.inputs[0], 1, &a, &e);
  return id; /* broadcast chains compose under numpy rules, so this cannot fail */
}

/* A reshape or broadcast of a constant fill is a fill of the new shape. */
static int rule_fill_through_movement(rule_ctx *c) {
  cm_op op = c->old->op;
  if (op != CM_OP_RESHAPE && op != CM_OP_BROADCAST) return -1;
  const cm_node *x = &c->g->nodes[c->in[0]];
  if (x->op != CM_OP_CONST || x->attrs.data) return -1;
  cm_type t = c->old->type;
  return cm_const_fill(c->g, NULL, t.dtype, t.rank, t.dims, x->attrs.value);
}

/* matmul(permute(a) swapping the two innermost axes, b) -> matmul(a, b) with
 * the transpose flag flipped (and likewise for b). */
static bool swaps_inner(const cm_node *n) {
  if (n->op != CM_OP_PERMUTE) return false;
  int r = n->type.rank;
  for (int i = 0; i < r - 2; i++)
    if (n->attrs.perm[i] != i) return false;
  return n->attrs.perm[r - 2] == r - 1 && n->attrs.perm[r - 1] == r - 2;
}

static int rule_permute_into_matmul(rule_ctx *c) {
  if (c->old->op != CM_OP_MATMUL) return -1;
  const cm_node a = c->g->nodes[c->in[0]], b = c->g->nodes[c->in[1]];
  bool fold_a = swaps_inner(&a), fold_b = swaps_inner(&b);
  if (!fold_a && !fold_b) return -1;
  cm_attrs at = c->old->attrs;
  int in[2] = {c->in[0], c->in[1]};
  if (fold_a) in[0] = a.inputs[0], at.transpose_a = !at.transpose_a;
  if (fold_b) in[1] = b.inputs[0], at.transpose_b = !at.transpose_b;
  cm_err e;
  return cm_graph_add(c->g, CM_OP_MATMUL, NULL, in, 2, &at, &e);
}

/* Does dtype `wide` hold every value of `narrow` exactly? */
static bool holds_exactly(cm_dtype narrow, cm_dtype wide) {
  if (narrow == wide || narrow == CM_BOOL) return true;
  switch (wide) {
  case CM_F64: return narrow != CM_I64;
  case CM_F32: return narrow == CM_BF16 || narrow == CM_F16;
  case CM_I64: return narrow == CM_I32;
  default: return false;
  }
}

/* cast(cast(x, B), C) -> cast(x, C) when B holds every value of x's dtype;
 * and -> x when C is x's dtype. */
static int rule_cast_of_cast(rule_ctx *c) {
  if (c->old->op != CM_OP_CAST) return -1;
  const cm_node inner = c->g->nodes[c->in[0]];
  if (inner.op != CM_OP_CAST) return -1;
  cm_dtype a = c->g->nodes[inner.inputs[0]].type.dtype, b = inner.type.dtype;
  if (!holds_exactly(a, b)) return -1;
  if (c->old->type.dtype == a) return inner.inputs[0];
  return cm_cast(c->g, inner.inputs[0], c->old->type.dtype, NULL);
}

/* Constant folding: a small node whose inputs are all constants is evaluated
 * by the oracle (in its own dtype) and becomes a constant. */
static int rule_fold_constants(rule_ctx *c) {
  const cm_op_info *info = cm_op_get_info(c->old->op);
  if (info->category == CM_CAT_SOURCE || info->category == CM_CAT_COLLECTIVE ||
      info->category == CM_CAT_UPDATE || cm_type_numel(&c->old->type) > FOLD_MAX_ELEMENTS)
    return -1;
  for (int k = 0; k < c->old->n_inputs; k++) {
    const cm_node *x = &c->g->nodes[c->in[k]];
    if (x->op != CM_OP_CONST && x->op != CM_OP_IOTA) return -1;
    if (cm_type_numel(&x->type) > FOLD_MAX_ELEMENTS) return -1;
  }
  /* A tiny graph: the constant inputs, then the node. */
  cm_graph *sub = cm_graph_new();
  if (!sub) return -1;
  int ids[64];
  if (c->old->n_inputs > 64) {
    cm_graph_free(sub);
    return -1;
  }
  for (int k = 0; k < c->old->n_inputs; k++) {
    const cm_node *x = &c->g->nodes[c->in[k]];
    ids[k] = cm_graph_add(sub, x->op, NULL, NULL, 0, &x->attrs, NULL);
  }
  int node = cm_graph_add(sub, c->old->op, NULL, ids, c->old->n_inputs, &c->old->attrs, NULL);
  int result = -1;
  cm_tensor *values = node >= 0 ? calloc((size_t)sub->n_nodes, sizeof *values) : NULL;
  const cm_tensor **no_sources = calloc((size_t)sub->n_nodes, sizeof *no_sources);
  cm_eval_opts opts = {CM_PRECISION_NATIVE};
  if (values && no_sources && cm_eval(sub, no_sources, values, &opts, NULL) == CM_OK) {
    const cm_tensor *v = &values[node];
    int64_t n = cm_type_numel(&v->type);
    double *data = malloc(sizeof(double) * (size_t)(n ? n : 1));
    if (data) {
      bool uniform = true;
      for (int64_t i = 0; i < n; i++) {
        data[i] = cm_dtype_is_int(v->type.dtype) ? (double)cm_tensor_get_i64(v, i)
                                                 : cm_tensor_get_f64(v, i);
        uniform &= memcmp(&data[i], &data[0], sizeof(double)) == 0;
      }
      /* Integers beyond 2^53 do not survive a double: leave such nodes alone. */
      bool exact = true;
      for (int64_t i = 0; i < n && cm_dtype_is_int(v->type.dtype); i++)
        exact &= fabs(data[i]) <= 9007199254740992.0;
      cm_type t = c->old->type;
      if (exact)
        result = uniform ? cm_const_fill(c->g, NULL, t.dtype, t.rank, t.dims, data[0])
                         : cm_const_data(c->g, NULL, t.dtype, t.rank, t.dims, data);
      free(data);
    }
    for (int i = 0; i < sub->n_nodes; i++) cm_tensor_free(&values[i]);
  }
  free(values);
  free(no_sources);
  cm_graph_free(sub);
  return result;
}

static const struct {
  const char *name;
  rule_fn apply;
} rules[] = {
    {"constant folding", rule_fold_constants},
    {"identity operand", rule_identity_operand},
    {"double negation", rule_double_negation},
    {"select of equal values", rule_select_same},
    {"identity movement", rule_identity_movement},
    {"movement chain", rule_fold_movement_chain},
    {"fill through movement", rule_fill_through_movement},
    {"permute into matmul", rule_permute_into_matmul},
    {"cast of cast", rule_cast_of_cast},
};
enum { N_RULES = sizeof rules / sizeof rules[0] };

/* One round; counts[r] gets the applications of rule r. */
static cm_status simplify_round(const cm_graph *g, cm_graph **out, int *counts, int *changed,
                                cm_err *err) {
  bool *is_output = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof *is_output);
  if (!is_output) return cm_errorf(err, CM_EINTERNAL, "simplify: out of memory");
  for (int k = 0; k < g->n_outputs; k++) is_output[g->outputs[k]] = true;
  cm_rewriter r;
  cm_status st = cm_rewriter_begin(&r, g, err);
  *changed = 0;
  int in_stack[64];
  for (int i = 0; i < g->n_nodes && !st; i++) {
    const cm_node *n = &g->nodes[i];
    int replacement = -1;
    cm_op op = n->op;
    bool rewritable = op != CM_OP_ASSIGN && op != CM_OP_INPUT && op != CM_OP_PARAM &&
                      op != CM_OP_STATE && n->n_inputs <= 64;
    if (rewritable && r.g->error.status == CM_OK) {
      for (int k = 0; k < n->n_inputs; k++) in_stack[k] = r.map[n->inputs[k]];
      rule_ctx c = {r.g, n, in_stack};
      int fresh = r.g->n_nodes; /* ids from here on are nodes a rule made */
      for (int k = 0; k < N_RULES && replacement < 0; k++) {
        replacement = rules[k].apply(&c);
        /* An output keeps a node of its own: it may be replaced by a new node
         * (which takes its name), never merged into an existing one. */
        if (replacement >= 0 && replacement < fresh && is_output[i]) replacement = -1;
        if (replacement >= 0) {
          counts[k]++;
          (*changed)++;
        }
      }
      /* A rule's node must have the node's type, or the rewrite is wrong. */
      if (replacement >= 0 && !cm_type_equal(&r.g->nodes[replacement].type, &n->type)) {
        st = cm_errorf(err, CM_EINTERNAL, "simplify: a rule changed the type of \"%s\"", n->name);
        break;
      }
      /* Keep the user's name on the node that now computes the value. */
      if (replacement >= fresh && n->name[0] != '%' && cm_graph_find(r.g, n->name) < 0)
        cm_graph_rename(r.g, replacement, n->name, NULL);
    }
    if (replacement >= 0)
      r.map[i] = replacement;
    else
      cm_rewriter_copy(&r, i);
  }
  free(is_output);
  if (st) {
    cm_rewriter_abort(&r);
    return st;
  }
  return cm_rewriter_finish(&r, out, err);
}

cm_status cm_pass_simplify(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  int counts[N_RULES] = {0};
  for (int round = 0; round < 4; round++) {
    cm_graph *out = NULL;
    int changed = 0;
    cm_status st = simplify_round(s->g, &out, counts, &changed, err);
    if (st) return st;
    cm_graph_free(s->g);
    s->g = out;
    if (s->plan) { /* made for the old graph */
      cm_plan_free(s->plan);
      s->plan = NULL;
    }
    if (!changed) break;
  }
  /* Rewrites leave the replaced nodes' producers behind: drop them. */
  cm_pass_stat dce_stat = {0};
  cm_status st = cm_pass_dce(s, &dce_stat, err);
  if (st) return st;
  size_t len = 0;
  stat->detail[0] = 0;
  for (int k = 0; k < N_RULES; k++)
    if (counts[k] && len < sizeof stat->detail)
      len += (size_t)snprintf(stat->detail + len, sizeof stat->detail - len, "%s%s %d",
                              len ? ", " : "", rules[k].name, counts[k]);
  if (!len) snprintf(stat->detail, sizeof stat->detail, "no rewrites");
  return CM_OK;
}
