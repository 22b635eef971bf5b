/* passes/autodiff.c — reverse-mode autodiff as a graph-to-graph pass.
 *
 * Walks the graph backwards from the loss, asking each node's vector-Jacobian
 * rule (one per differentiable op, below, in op-table order) for the adjoint
 * of each input that depends on a wrt node; adjoints that meet are summed. */
#include "passes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  cm_graph *g;
  int node; /* the node whose rule runs */
  int dy;   /* its adjoint */
  cm_err *err;
} vjp_ctx;

/* Types by value: adding a node may move g->nodes, so no pointer into it is kept. */
static cm_type type_of(const cm_graph *g, int id) {
  return g->nodes[id].type;
}

static int fill_like(cm_graph *g, cm_type t, double v) {
  return cm_const_fill(g, NULL, t.dtype, t.rank, t.dims, v);
}

/* Sums dy (shape `from`) down to the shape of `to` where `to` was broadcast by
 * numpy rules (leading axes added, size-1 axes expanded). */
static int sum_to(cm_graph *g, int dy, cm_type to) {
  if (dy < 0) return dy;
  cm_type from = type_of(g, dy);
  if (cm_shape_equal(&from, &to)) return dy;
  int axes[CM_MAX_RANK], n = 0, lead = from.rank - to.rank;
  for (int i = 0; i < from.rank; i++)
    if (i < lead || (to.dims[i - lead] == 1 && from.dims[i] != 1)) axes[n++] = i;
  int s = n ? cm_reduce(g, CM_OP_REDUCE_SUM, dy, n, axes, false, NULL) : dy;
  return cm_reshape(g, s, to.rank, to.dims, NULL);
}

/* Reshapes a reduction's adjoint to keepdims form and broadcasts it over x. */
static int unreduce(cm_graph *g, int dy, const cm_node *n, const cm_type *x) { /* n, x: copies */
  int64_t kept[CM_MAX_RANK];
  for (int i = 0; i < x->rank; i++) kept[i] = x->dims[i];
  for (int k = 0; k < n->attrs.n_axes; k++) kept[n->attrs.axes[k]] = 1;
  int r = cm_reshape(g, dy, x->rank, kept, NULL);
  return cm_broadcast(g, r, x->rank, x->dims, NULL);
}

static int mul(cm_graph *g, int a, int b) {
  return cm_binary(g, CM_OP_MUL, a, b, NULL);
}
static int scale(cm_graph *g, int a, double s) {
  return a < 0 ? -1 : mul(g, a, fill_like(g, type_of(g, a), s));
}

/* The adjoint of slice: dy spread back to the input's shape (zeros between the
 * steps and around the window). */
static int vjp_slice(vjp_ctx *c, const cm_node *n, int dy, const cm_type *tx) {
  cm_graph *g = c->g;
  /* Spread each axis back: interleave step-1 zeros (reshape + pad), then pad the ends. */
  int cur = dy;
  for (int a = 0; a < tx->rank && cur >= 0; a++) {
    int64_t start = n->attrs.start[a], step = n->attrs.step[a];
    const cm_type tc_value = type_of(g, cur), *tc = &tc_value;
    int64_t len = tc->dims[a];
    if (step > 1 && len > 1) {
      int r = tc->rank;
      if (r + 1 > CM_MAX_RANK) { /* no room for the helper axis */
        cm_errorf(c->err, CM_EINVALID, "slice with step on a rank-6 tensor is not differentiable");
        return -1;
      }
      int64_t dims[CM_MAX_RANK];
      for (int i = 0, j = 0; i < r; i++) {
        dims[j++] = tc->dims[i];
        if (i == a) dims[j++] = 1;
      }
      int spread = cm_reshape(g, cur, r + 1, dims, NULL);
      int64_t lo[CM_MAX_RANK] = {0}, hi[CM_MAX_RANK] = {0};
      hi[a + 1] = step - 1;
      spread = cm_pad(g, spread, lo, hi, 0, NULL);
      int64_t flat[CM_MAX_RANK];
      for (int i = 0; i < r; i++) flat[i] = i == a ? len * step : tc->dims[i];
      cur = cm_reshape(g, spread, r, flat, NULL);
      int64_t s0[CM_MAX_RANK] = {0}, s1[CM_MAX_RANK];
      for (int i = 0; i < r; i++) s1[i] = i == a ? (len - 1) * step + 1 : tc->dims[i];
      cur = cm_slice(g, cur, s0, s1, NULL, NULL);
      len = (len - 1) * step + 1;
    }
    int64_t lo[CM_MAX_RANK] = {0}, hi[CM_MAX_RANK] = {0};
    lo[a] = start;
    hi[a] = tx->dims[a] - start - len;
    if (lo[a] || hi[a]) cur = cm_pad(g, cur, lo, hi, 0, NULL);
  }
  return cur;
}

/* The adjoint of matmul for input k. */
static int vjp_matmul(cm_graph *g, const cm_node *n, int k, int dy, int x, int b, int y,
                      const cm_type *tx) {
  bool ta = n->attrs.transpose_a, tb = n->attrs.transpose_b;
  int d;
  cm_type tb_type = type_of(g, b), ty = type_of(g, y);
  if (k == 1 && tb_type.rank == 2 && tx->rank > 2 && !ta) {
    /* A weight shared across the batch (x @ W): fold the batch into rows and
     * take one [K, N] matmul, instead of a per-batch product summed later. */
    int64_t rows = cm_type_numel(tx) / tx->dims[tx->rank - 1];
    int64_t a2[2] = {rows, tx->dims[tx->rank - 1]}, d2[2] = {rows, ty.dims[ty.rank - 1]};
    int x2 = cm_reshape(g, x, 2, a2, NULL), dy2 = cm_reshape(g, dy, 2, d2, NULL);
    return tb ? cm_matmul(g, dy2, x2, true, false, NULL) : cm_matmul(g, x2, dy2, true, false, NULL);
  }
  if (k == 0)
    d = ta ? cm_matmul(g, b, dy, tb, true, NULL) : cm_matmul(g, dy, b, false, !tb, NULL);
  else
    d = tb ? cm_matmul(g, dy, x, true, ta, NULL) : cm_matmul(g, x, dy, !ta, false, NULL);
  return sum_to(g, d, type_of(g, n->inputs[k]));
}

/* The adjoint of the conv2d family for input k: another member of the family. */
static int vjp_conv(cm_graph *g, const cm_node *n, int k, int dy, int x, int b) {
  /* conv2d(x, w) is bilinear; its two adjoint ops are the partial transposes,
   * so the family is closed under differentiation. */
  cm_attrs a = n->attrs;
  cm_op op;
  int in[2];
  const cm_type target_value = type_of(g, n->inputs[k]), *target = &target_value;
  if (n->op == CM_OP_CONV2D) {
    op = k == 0 ? CM_OP_CONV2D_GRAD_INPUT : CM_OP_CONV2D_GRAD_WEIGHT;
    in[0] = k == 0 ? dy : x;
    in[1] = k == 0 ? b : dy;
  } else if (n->op == CM_OP_CONV2D_GRAD_INPUT) { /* inputs (dy', w) */
    op = k == 0 ? CM_OP_CONV2D : CM_OP_CONV2D_GRAD_WEIGHT;
    in[0] = dy;
    in[1] = k == 0 ? b : x;
  } else { /* conv2d_grad_weight(x, dy'): inputs (x, dy') */
    op = k == 0 ? CM_OP_CONV2D_GRAD_INPUT : CM_OP_CONV2D;
    in[0] = k == 0 ? b : x;
    in[1] = dy;
  }
  a.rank = target->rank;
  memcpy(a.shape, target->dims, sizeof a.shape);
  if (g->error.status) return -1;
  cm_err e;
  int id = cm_graph_add(g, op, NULL, in, 2, &a, &e);
  if (id < 0) g->error = e;
  return id;
}

/* The adjoint of all_gather: this rank's slice of the summed dy. */
static int vjp_all_gather(vjp_ctx *c, const cm_node *n, int dy, const cm_type *tx) {
  cm_graph *g = c->g;
  if (n->attrs.ranks == 1) return dy;
  /* Every rank's loss reads every rank's x: dx = this rank's slice of the
   * sum over ranks of dy, i.e. gather(all_reduce(dy), iota + rank * len). The
   * rank comes from the graph input "rank" (i32[], bound by the runtime). */
  int rank = cm_graph_find(g, "rank");
  if (rank < 0) rank = cm_input(g, "rank", CM_I32, 0, NULL);
  cm_type tr = type_of(g, rank);
  if (g->nodes[rank].op != CM_OP_INPUT || tr.dtype != CM_I32 || tr.rank != 0) {
    cm_errorf(c->err, CM_EINVALID,
              "the gradient of all_gather needs \"rank\" to be an i32[] input");
    return -1;
  }
  int axis = n->attrs.axis;
  int64_t len = tx->dims[axis];
  int sum = cm_all_reduce(g, dy, CM_MODE_SUM, n->attrs.ranks, NULL);
  int idx = cm_iota(g, NULL, CM_I32, tx->rank, tx->dims, axis);
  int offset = cm_binary(g, CM_OP_MUL, rank, cm_const_scalar(g, NULL, CM_I32, (double)len), NULL);
  idx = cm_binary(g, CM_OP_ADD, idx, cm_broadcast(g, offset, tx->rank, tx->dims, NULL), NULL);
  return cm_gather(g, sum, idx, axis, NULL);
}

/* The adjoint of input k of node ctx->node, -2 when the op passes no gradient
 * to that input (an error if that input needs one), -1 on a builder failure. */
static int vjp(vjp_ctx *c, int k) {
  cm_graph *g = c->g;
  const cm_node node = g->nodes[c->node]; /* a copy: the rules add nodes */
  const cm_node *n = &node;
  int dy = c->dy, y = c->node;
  int x = n->inputs[0], b = n->n_inputs > 1 ? n->inputs[1] : -1;
  const cm_type tx_value = type_of(g, x), *tx = &tx_value;
  switch (n->op) {
  case CM_OP_NEG: return cm_unary(g, CM_OP_NEG, dy, NULL);
  case CM_OP_ABS: {
    /* sign(x), with sign(0) = 0 as PyTorch */
    int zero = fill_like(g, *tx, 0);
    int pos = cm_binary(g, CM_OP_LT, zero, x, NULL), neg = cm_binary(g, CM_OP_LT, x, zero, NULL);
    int minus = cm_unary(g, CM_OP_NEG, dy, NULL);
    return cm_select(g, pos, dy, cm_select(g, neg, minus, fill_like(g, *tx, 0), NULL), NULL);
  }
  case CM_OP_EXP: return mul(g, dy, y);
  case CM_OP_LOG: return cm_binary(g, CM_OP_DIV, dy, x, NULL);
  case CM_OP_SQRT: return cm_binary(g, CM_OP_DIV, scale(g, dy, 0.5), y, NULL);
  case CM_OP_RSQRT: /* d x^-1/2 = -1/2 x^-3/2 = -1/2 y^3 */
    return mul(g, scale(g, dy, -0.5), mul(g, y, mul(g, y, y)));
  case CM_OP_RECIP: return cm_unary(g, CM_OP_NEG, mul(g, dy, mul(g, y, y)), NULL);
  case CM_OP_TANH: {
    int one = fill_like(g, *tx, 1);
    return mul(g, dy, cm_binary(g, CM_OP_SUB, one, mul(g, y, y), NULL));
  }
  case CM_OP_ERF: { /* 2/sqrt(pi) exp(-x^2) */
    int e = cm_unary(g, CM_OP_EXP, cm_unary(g, CM_OP_NEG, mul(g, x, x), NULL), NULL);
    return mul(g, dy, scale(g, e, 2.0 / sqrt(M_PI)));
  }
  case CM_OP_RELU: { /* gradient 0 at 0, as PyTorch */
    int pos = cm_binary(g, CM_OP_LT, fill_like(g, *tx, 0), x, NULL);
    return cm_select(g, pos, dy, fill_like(g, *tx, 0), NULL);
  }
  case CM_OP_STOP_GRADIENT: return -2;
  case CM_OP_CAST:
    if (!cm_dtype_is_float(tx->dtype)) return -2;
    return cm_cast(g, dy, tx->dtype, NULL);
  case CM_OP_ADD: return dy;
  case CM_OP_SUB: return k == 0 ? dy : cm_unary(g, CM_OP_NEG, dy, NULL);
  case CM_OP_MUL: return mul(g, dy, k == 0 ? b : x);
  case CM_OP_DIV:
    if (k == 0) return cm_binary(g, CM_OP_DIV, dy, b, NULL);
    return cm_unary(g, CM_OP_NEG, cm_binary(g, CM_OP_DIV, mul(g, dy, y), b, NULL), NULL);
  case CM_OP_MAX:
  case CM_OP_MIN: {
    /* The winner takes dy; ties split it in half (torch.maximum / torch.minimum). */
    int self = k == 0 ? x : b, other = k == 0 ? b : x;
    int wins = n->op == CM_OP_MAX ? cm_binary(g, CM_OP_LT, other, self, NULL)
                                  : cm_binary(g, CM_OP_LT, self, other, NULL);
    int tie = cm_binary(g, CM_OP_EQ, self, other, NULL);
    int zero = fill_like(g, *tx, 0);
    return cm_select(g, wins, dy, cm_select(g, tie, scale(g, dy, 0.5), zero, NULL), NULL);
  }
  case CM_OP_POW: {
    int zero = fill_like(g, *tx, 0);
    if (k == 0) { /* b x^(b-1), and 0 where b == 0 (PyTorch) */
      int bm1 = cm_binary(g, CM_OP_SUB, b, fill_like(g, *tx, 1), NULL);
      int d = mul(g, dy, mul(g, b, cm_binary(g, CM_OP_POW, x, bm1, NULL)));
      return cm_select(g, cm_binary(g, CM_OP_EQ, b, zero, NULL), zero, d, NULL);
    }
    /* y log x, and 0 where x == 0 and b >= 0 (PyTorch) */
    int d = mul(g, dy, mul(g, y, cm_unary(g, CM_OP_LOG, x, NULL)));
    int x0 = cm_binary(g, CM_OP_EQ, x, zero, NULL);
    int bnn = cm_binary(g, CM_OP_LE, zero, b, NULL);
    int both = cm_select(g, x0, bnn, x0, NULL);
    return cm_select(g, both, zero, d, NULL);
  }
  case CM_OP_SELECT: {
    if (k == 0) return -2;
    int zero = fill_like(g, type_of(g, n->inputs[1]), 0);
    return k == 1 ? cm_select(g, x, dy, zero, NULL) : cm_select(g, x, zero, dy, NULL);
  }
  case CM_OP_REDUCE_SUM: return unreduce(g, dy, n, tx);
  case CM_OP_REDUCE_MAX: {
    /* Ties share the gradient evenly (torch.amax). */
    int ymax = unreduce(g, y, n, tx);
    int hit = cm_binary(g, CM_OP_EQ, x, ymax, NULL);
    int ones = cm_select(g, hit, fill_like(g, *tx, 1), fill_like(g, *tx, 0), NULL);
    int count = cm_reduce(g, CM_OP_REDUCE_SUM, ones, n->attrs.n_axes, n->attrs.axes,
                          n->attrs.keepdims, NULL);
    int share = unreduce(g, cm_binary(g, CM_OP_DIV, dy, count, NULL), n, tx);
    return cm_select(g, hit, share, fill_like(g, *tx, 0), NULL);
  }
  case CM_OP_RESHAPE: return cm_reshape(g, dy, tx->rank, tx->dims, NULL);
  case CM_OP_PERMUTE: {
    int inverse[CM_MAX_RANK];
    for (int i = 0; i < tx->rank; i++) inverse[n->attrs.perm[i]] = i;
    return cm_permute(g, dy, inverse, NULL);
  }
  case CM_OP_BROADCAST: return sum_to(g, dy, *tx);
  case CM_OP_SLICE: return vjp_slice(c, n, dy, tx);
  case CM_OP_CONCAT: {
    int64_t s0[CM_MAX_RANK] = {0}, s1[CM_MAX_RANK];
    const cm_type ty_value = type_of(g, y), *ty = &ty_value;
    for (int i = 0; i < ty->rank; i++) s1[i] = ty->dims[i];
    int axis = n->attrs.axis;
    for (int i = 0; i < k; i++) s0[axis] += type_of(g, n->inputs[i]).dims[axis];
    s1[axis] = s0[axis] + type_of(g, n->inputs[k]).dims[axis];
    return cm_slice(g, dy, s0, s1, NULL, NULL);
  }
  case CM_OP_PAD: {
    int64_t s0[CM_MAX_RANK], s1[CM_MAX_RANK];
    for (int i = 0; i < tx->rank; i++) {
      s0[i] = n->attrs.lo[i];
      s1[i] = n->attrs.lo[i] + tx->dims[i];
    }
    return cm_slice(g, dy, s0, s1, NULL, NULL);
  }
  case CM_OP_GATHER:
    if (k == 1) return -2;
    return cm_scatter_add(g, fill_like(g, *tx, 0), b, dy, n->attrs.axis, NULL);
  case CM_OP_SCATTER_ADD:
    if (k == 0) return dy;
    if (k == 1) return -2;
    return cm_gather(g, dy, b, n->attrs.axis, NULL);
  case CM_OP_MATMUL: return vjp_matmul(g, n, k, dy, x, b, y, tx);
  case CM_OP_CONV2D:
  case CM_OP_CONV2D_GRAD_INPUT:
  case CM_OP_CONV2D_GRAD_WEIGHT: return vjp_conv(g, n, k, dy, x, b);
  case CM_OP_ALL_REDUCE:
    /* The global loss sums the ranks' losses, so each rank's x feeds every rank's y. */
    if (n->attrs.ranks == 1) return dy;
    return cm_all_reduce(g, dy, n->attrs.mode, n->attrs.ranks, NULL);
  case CM_OP_ALL_GATHER: return vjp_all_gather(c, n, dy, tx);
  case CM_OP_ASSIGN: return k == 1 ? dy : -2;
  default: return -2;
  }
}

/* When `from` reaches `loss` by edges that are not stop_gradient, returns the
 * first node on the way that turns a float into a non-float value (the
 * non-differentiable step); -1 when the loss does not depend on `from`. */
static int nondiff_path(const cm_graph *g, int from, int loss) {
  bool *reach = calloc((size_t)loss + 1, sizeof *reach);
  if (!reach || from > loss) {
    free(reach);
    return -1;
  }
  reach[from] = true;
  int blocker = -1;
  for (int i = from + 1; i <= loss; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op == CM_OP_STOP_GRADIENT) continue;
    for (int k = 0; k < n->n_inputs && !reach[i]; k++) reach[i] = reach[n->inputs[k]];
    if (reach[i] && blocker < 0 && !cm_dtype_is_float(n->type.dtype)) blocker = i;
  }
  int result = reach[loss] ? blocker : -1;
  free(reach);
  return result;
}

cm_status cm_autodiff(cm_graph *g, int loss, int n_wrt, const int *wrt, int *grads, cm_err *err) {
  if (loss < 0 || loss >= g->n_nodes)
    return cm_errorf(err, CM_EINVALID, "autodiff: loss node %d does not exist", loss);
  const cm_type ln_type = g->nodes[loss].type;
  const char *ln_name = g->nodes[loss].name; /* names do not move */
  char ts[128];
  if (!cm_dtype_is_float(ln_type.dtype) || cm_type_numel(&ln_type) != 1)
    return cm_errorf(err, CM_EINVALID, "autodiff: loss \"%s\" is %s, not a float scalar", ln_name,
                     cm_type_str(&ln_type, ts, sizeof ts));
  int n0 = g->n_nodes;
  bool *depends = calloc((size_t)n0, sizeof *depends);
  int *adj = malloc(sizeof(int) * (size_t)n0);
  if (!depends || !adj) {
    free(depends);
    free(adj);
    return cm_errorf(err, CM_EINTERNAL, "autodiff: out of memory");
  }
  cm_status st = CM_OK;
  for (int j = 0; j < n_wrt && !st; j++) {
    if (wrt[j] < 0 || wrt[j] >= n0) {
      st = cm_errorf(err, CM_EINVALID, "autodiff: wrt node %d does not exist", wrt[j]);
      break;
    }
    const cm_node *w = &g->nodes[wrt[j]];
    if (!cm_dtype_is_float(w->type.dtype))
      st = cm_errorf(err, CM_EINVALID,
                     "autodiff: \"%s\" (%s) is %s: cannot differentiate with respect to a "
                     "non-float value",
                     w->name, cm_op_name(w->op), cm_type_str(&w->type, ts, sizeof ts));
    depends[wrt[j]] = true;
  }
  for (int i = 0; i < n0; i++) {
    adj[i] = -1;
    const cm_node *n = &g->nodes[i];
    if (n->op == CM_OP_STOP_GRADIENT) continue;
    for (int k = 0; k < n->n_inputs && !depends[i]; k++) depends[i] = depends[n->inputs[k]];
  }
  if (!st && depends[loss]) adj[loss] = fill_like(g, ln_type, 1.0);
  for (int i = loss; i >= 0 && !st; i--) {
    if (adj[i] < 0 || !depends[i]) continue;
    int n_inputs = g->nodes[i].n_inputs;
    for (int k = 0; k < n_inputs && !st; k++) {
      int in = g->nodes[i].inputs[k];
      if (!depends[in]) continue;
      /* An input reached twice (x * x) gets both contributions. */
      vjp_ctx c = {g, i, adj[i], err};
      bool input_is_float = cm_dtype_is_float(g->nodes[in].type.dtype);
      /* Integer and bool values carry no gradient (comparisons and casts to
       * them are piecewise constant); a wrt reached only that way is caught below. */
      int d = input_is_float ? vjp(&c, k) : -2;
      if (d == -2) continue;
      if (d < 0) {
        if (g->error.status) *err = g->error;
        st = err && err->status ? err->status : CM_EINTERNAL;
        if (!err || !err->status) cm_errorf(err, CM_EINTERNAL, "autodiff: rule failed");
        break;
      }
      adj[in] = adj[in] < 0 ? d : cm_binary(g, CM_OP_ADD, adj[in], d, NULL);
    }
  }
  for (int j = 0; j < n_wrt && !st; j++) {
    if (adj[wrt[j]] < 0) {
      int blocker = nondiff_path(g, wrt[j], loss);
      if (blocker >= 0) {
        const cm_node *b = &g->nodes[blocker];
        st = cm_errorf(err, CM_EINVALID,
                       "autodiff: \"%s\" reaches the loss \"%s\" only through non-differentiable "
                       "ops, first \"%s\" (%s) giving %s",
                       g->nodes[wrt[j]].name, ln_name, b->name, cm_op_name(b->op),
                       cm_type_str(&b->type, ts, sizeof ts));
        break;
      }
    }
    grads[j] = adj[wrt[j]] >= 0 ? adj[wrt[j]] : fill_like(g, type_of(g, wrt[j]), 0);
  }
  if (!st && g->error.status) {
    st = g->error.status;
    if (err) {
      *err = g->error;
      cm_err_prefix(err, "autodiff: ");
    }
  }
  free(depends);
  free(adj);
  return st;
}
