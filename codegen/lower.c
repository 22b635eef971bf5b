/* codegen/lower.c — plan groups to the kernel IR.
 *
 * Materialized nodes (reductions, matmul, conv2d and its gradients) get a stage
 * each; the remaining group outputs get one stage per element count
 * (output_stage). Everything else is inlined into the expressions of the stage
 * that needs it (value()), memoized per stage on (node, index expressions)
 * because the graphs are DAGs. Contractions (matmul; conv2d and
 * conv2d_grad_weight with groups == 1 through im2col) become GEMM stages
 * (gemm.c: cm_gemm_mark, and the K split of long ones); grouped convolutions
 * and conv2d_grad_input are generic reductions. Epilogues (elementwise outputs
 * of one contraction/reduction with no other use) are fused into its stage.
 * Attention groups: values over the score rows with several consumers get a
 * stage of their own (mark_shared), and the stages from the first GEMM on are
 * marked as a fused attention span where cm_kattn_check holds (attention.c:
 * cm_attn_mark). */
#include "lower_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct memo {
  int node, n, idx[CM_MAX_RANK], result;
} memo;

typedef struct lctx {
  const cm_graph *g;
  const cm_plan *p;
  const cm_group *gr;
  const cm_lower_opts *o;
  cm_kernel *k;
  int *buf_of;   /* node -> buffer holding it (-1: inline) */
  bool *written; /* per buffer: written by an earlier stage (SOURCE hazard) */
  memo *memo;
  int n_memo, cap_memo;
  int acc_node; /* epilogue: this node's value is the stage's ACC */
  int acc_dv[CM_MAX_RANK];
  bool acc_fail;           /* an epilogue read acc_node at another index */
  bool *shared;            /* per node: an attention value materialized once (mark_shared) */
  struct index_check *chk; /* gather/scatter_add index checks, in the order found */
  int n_chk, cap_chk;
  cm_err *err;
  cm_status st;
} lctx;

/* The check of one gather or scatter_add index (checked once per kernel): two
 * stages built when the node is first lowered, inserted at the end before
 * `stage`, the first stage that reads the index. find: a MAX reduction over the
 * index (one compare per element) into status buffer key: numel - the position
 * of the first index outside [0, dim) in row-major order, 0 when none. value:
 * that index and its position in the node's index tensor into status buffer val
 * ([0] index, [1] position). The executor reads key after the kernel and
 * reports like the oracle (cm_index_error); the stage reading the index clamps
 * it, so a bad index never reads or writes out of bounds. */
typedef struct index_check {
  int node, stage;
  cm_kstage find, value;
} index_check;

static const cm_node *N(const lctx *c, int id) {
  return &c->g->nodes[id];
}

static cm_status fail(lctx *c, cm_status code, int node, const char *rule) {
  if (c->st != CM_OK) return c->st;
  const cm_node *n = N(c, node);
  c->st = cm_errorf(c->err, code, "lower group %d (%s): node \"%s\" (%s, rank %d): %s",
                    (int)(c->gr - c->p->groups), cm_group_kind_name(c->gr->kind), n->name,
                    cm_op_name(n->op), n->type.rank, rule);
  return c->st;
}

/* One SOURCE buffer per state: an assign writes the buffer its readers load, so
 * the in-place hazard check sees both. */
static int source_buf(cm_kernel *k, cm_dtype dt, int64_t numel, int node) {
  for (int i = 0; i < k->n_buffers; i++)
    if (k->buffers[i].kind == CM_KBUF_SOURCE && k->buffers[i].node == node) return i;
  return cm_kernel_add_buffer(k, CM_KBUF_SOURCE, dt, numel, node, 0);
}

static bool is_materialized_op(cm_op op) {
  return op == CM_OP_REDUCE_SUM || op == CM_OP_REDUCE_MAX || op == CM_OP_MATMUL ||
         op == CM_OP_CONV2D || op == CM_OP_CONV2D_GRAD_INPUT || op == CM_OP_CONV2D_GRAD_WEIGHT ||
         op == CM_OP_SCATTER_ADD;
}

static bool is_mat(const lctx *c, int id) {
  return is_materialized_op(c->g->nodes[id].op) || (c->shared && c->shared[id]);
}

static int linear(cm_kstage *s, const cm_type *t, const int *idx) {
  int e = cm_kx_iconst(s, 0);
  for (int i = 0; i < t->rank; i++)
    e = cm_kx_iadd(s, cm_kx_imul(s, e, cm_kx_iconst(s, t->dims[i])), idx[i]);
  return e;
}

static void delinear(cm_kstage *s, const cm_type *t, int lin, int *idx) {
  for (int i = t->rank - 1; i >= 0; i--) {
    int d = cm_kx_iconst(s, t->dims[i]);
    idx[i] = i == 0 ? lin : cm_kx_imod(s, lin, d);
    lin = cm_kx_idiv(s, lin, d);
  }
}

static int value(lctx *c, cm_kstage *s, int id, const int *idx);
static void index_check_of(lctx *c, int id);
static void drop_index_checks(lctx *c, int si);

static int value_in(lctx *c, cm_kstage *s, int id, const int *idx) {
  const cm_node *n = N(c, id);
  const cm_type *t = &n->type;
  int in[CM_MAX_RANK] = {0};
  if (id == c->acc_node) {
    if (memcmp(idx, c->acc_dv, sizeof(int) * (size_t)t->rank)) {
      c->acc_fail = true;
      return -1;
    }
    int acc = cm_kx_acc(s);
    return s->acc_dtype == t->dtype ? acc : cm_kx_op(s, CM_OP_CAST, t->dtype, acc, -1, -1);
  }
  if (c->buf_of[id] >= 0) {
    int b = c->buf_of[id];
    c->k->buffers[b].read = true;
    if (c->k->buffers[b].kind == CM_KBUF_SOURCE && c->written[b]) {
      fail(c, CM_EINTERNAL, id, "source buffer read by a stage after the stage that assigns it");
      return -1;
    }
    return cm_kx_load(s, c->k, b, linear(s, t, idx));
  }
  switch (n->op) {
  case CM_OP_CONST: return cm_kx_const(s, t->dtype, n->attrs.value);
  case CM_OP_IOTA: {
    int axis = n->attrs.axis < 0 ? n->attrs.axis + t->rank : n->attrs.axis;
    int v = t->rank ? idx[axis] : cm_kx_iconst(s, 0);
    return t->dtype == CM_I64 ? v : cm_kx_op(s, CM_OP_CAST, t->dtype, v, -1, -1);
  }
  case CM_OP_STOP_GRADIENT:
  case CM_OP_ALL_REDUCE:
  case CM_OP_ALL_GATHER:
    if (n->op != CM_OP_STOP_GRADIENT && n->attrs.ranks > 1) {
      fail(c, CM_EINVALID, id,
           "a collective over several ranks is lowered only as a collective group of its own");
      return -1;
    }
    return value(c, s, n->inputs[0], idx);
  case CM_OP_ASSIGN: return value(c, s, n->inputs[1], idx);
  case CM_OP_RESHAPE: {
    const cm_type *it = &N(c, n->inputs[0])->type;
    delinear(s, it, linear(s, t, idx), in);
    return value(c, s, n->inputs[0], in);
  }
  case CM_OP_PERMUTE:
    for (int i = 0; i < t->rank; i++) in[n->attrs.perm[i]] = idx[i];
    return value(c, s, n->inputs[0], in);
  case CM_OP_BROADCAST: {
    const cm_type *it = &N(c, n->inputs[0])->type;
    int off = t->rank - it->rank;
    for (int i = 0; i < it->rank; i++) in[i] = it->dims[i] == 1 ? cm_kx_iconst(s, 0) : idx[i + off];
    return value(c, s, n->inputs[0], in);
  }
  case CM_OP_SLICE:
    for (int i = 0; i < t->rank; i++)
      in[i] = cm_kx_iadd(s, cm_kx_iconst(s, n->attrs.start[i]),
                         cm_kx_imul(s, idx[i], cm_kx_iconst(s, n->attrs.step[i])));
    return value(c, s, n->inputs[0], in);
  case CM_OP_CONCAT: {
    /* both SELECT branches are evaluated: every branch's index is clamped */
    int axis = n->attrs.axis < 0 ? n->attrs.axis + t->rank : n->attrs.axis;
    int64_t start[64];
    int64_t off = 0;
    if (n->n_inputs > 64) break;
    for (int i = 0; i < n->n_inputs; i++) {
      start[i] = off;
      off += N(c, n->inputs[i])->type.dims[axis];
    }
    int r = -1;
    for (int i = n->n_inputs - 1; i >= 0; i--) {
      int64_t len = N(c, n->inputs[i])->type.dims[axis];
      memcpy(in, idx, sizeof(int) * (size_t)t->rank);
      int j = cm_kx_iadd(s, idx[axis], cm_kx_iconst(s, -start[i]));
      j = cm_kx_op(s, CM_OP_MAX, CM_I64, j, cm_kx_iconst(s, 0), -1);
      in[axis] = cm_kx_op(s, CM_OP_MIN, CM_I64, j, cm_kx_iconst(s, len - 1), -1);
      int v = value(c, s, n->inputs[i], in);
      if (v < 0) return -1;
      if (r < 0) {
        r = v;
      } else {
        int lt = cm_kx_op(s, CM_OP_LT, CM_BOOL, idx[axis], cm_kx_iconst(s, start[i] + len), -1);
        r = cm_kx_op(s, CM_OP_SELECT, t->dtype, lt, v, r);
      }
    }
    return r;
  }
  case CM_OP_PAD: {
    const cm_type *it = &N(c, n->inputs[0])->type;
    int ok = -1;
    for (int i = 0; i < t->rank; i++) {
      int j = cm_kx_iadd(s, idx[i], cm_kx_iconst(s, -n->attrs.lo[i]));
      if (n->attrs.lo[i] == 0 && n->attrs.hi[i] == 0) {
        in[i] = j;
        continue;
      }
      int ge = cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), j, -1);
      int lt = cm_kx_op(s, CM_OP_LT, CM_BOOL, j, cm_kx_iconst(s, it->dims[i]), -1);
      int both = cm_kx_op(s, CM_OP_SELECT, CM_BOOL, ge, lt, ge);
      ok = ok < 0 ? both : cm_kx_op(s, CM_OP_SELECT, CM_BOOL, ok, both, ok);
      j = cm_kx_op(s, CM_OP_MAX, CM_I64, j, cm_kx_iconst(s, 0), -1);
      in[i] = cm_kx_op(s, CM_OP_MIN, CM_I64, j, cm_kx_iconst(s, it->dims[i] - 1), -1);
    }
    int v = value(c, s, n->inputs[0], in);
    if (v < 0 || ok < 0) return v;
    return cm_kx_op(s, CM_OP_SELECT, t->dtype, ok, v, cm_kx_const(s, t->dtype, n->attrs.value));
  }
  case CM_OP_GATHER: {
    const cm_type *it = &N(c, n->inputs[0])->type;
    int axis = n->attrs.axis < 0 ? n->attrs.axis + it->rank : n->attrs.axis;
    index_check_of(c, id);
    int j = value(c, s, n->inputs[1], idx);
    if (j < 0) return -1;
    if (N(c, n->inputs[1])->type.dtype != CM_I64) j = cm_kx_op(s, CM_OP_CAST, CM_I64, j, -1, -1);
    j = cm_kx_op(s, CM_OP_MAX, CM_I64, j, cm_kx_iconst(s, 0), -1);
    memcpy(in, idx, sizeof(int) * (size_t)t->rank);
    in[axis] = cm_kx_op(s, CM_OP_MIN, CM_I64, j, cm_kx_iconst(s, it->dims[axis] - 1), -1);
    return value(c, s, n->inputs[0], in);
  }
  default: break;
  }
  if (cm_op_get_info(n->op)->category == CM_CAT_ELEMENTWISE) {
    int a[3] = {-1, -1, -1};
    for (int i = 0; i < n->n_inputs && i < 3; i++) {
      const cm_type *it = &N(c, n->inputs[i])->type;
      int off = t->rank - it->rank; /* operands of elementwise ops share the shape */
      for (int j = 0; j < it->rank; j++) in[j] = idx[j + off];
      a[i] = value(c, s, n->inputs[i], in);
      if (a[i] < 0) return -1;
    }
    return cm_kx_op(s, n->op, t->dtype, a[0], a[1], a[2]);
  }
  fail(c, CM_EINVALID, id, "this op is not lowered yet");
  return -1;
}

static int value(lctx *c, cm_kstage *s, int id, const int *idx) {
  if (c->st != CM_OK) return -1;
  int r = N(c, id)->type.rank;
  for (int i = 0; i < c->n_memo; i++) {
    memo *m = &c->memo[i];
    if (m->node == id && !memcmp(m->idx, idx, sizeof(int) * (size_t)r)) return m->result;
  }
  int v = value_in(c, s, id, idx);
  if (v < 0) return -1;
  if (c->n_memo == c->cap_memo) {
    c->cap_memo = c->cap_memo ? 2 * c->cap_memo : 64;
    memo *m = realloc(c->memo, sizeof *m * (size_t)c->cap_memo);
    if (!m) abort();
    c->memo = m;
  }
  memo *m = &c->memo[c->n_memo++];
  m->node = id;
  m->n = r;
  memcpy(m->idx, idx, sizeof(int) * (size_t)r);
  m->result = v;
  return v;
}

static cm_dtype acc_of(cm_dtype dt) {
  if (dt == CM_F64) return CM_F64;
  if (cm_dtype_is_int(dt)) return dt;
  return CM_F32;
}

int cm_lower_product(cm_kstage *s, int a, int b) {
  cm_dtype acc = s->acc_dtype, dt = s->exprs[a].dtype;
  if (dt != acc && (dt == CM_BF16 || dt == CM_F16)) {
    a = cm_kx_op(s, CM_OP_CAST, acc, a, -1, -1);
    b = cm_kx_op(s, CM_OP_CAST, acc, b, -1, -1);
    dt = acc;
  }
  return cm_kx_op(s, CM_OP_MUL, dt, a, b, -1);
}

void cm_lower_finish_stage(cm_kstage *s) {
  s->n_parallel = s->n_dom;
  int64_t prod = 1;
  for (int i = 0; i < s->n_dom; i++) {
    prod *= s->dom[i];
    if (prod >= 1024) {
      s->n_parallel = i + 1;
      break;
    }
  }
  if (s->accumulate) s->n_parallel = 0;
}

static int band(cm_kstage *s, int a, int b) {
  return a < 0 ? b : cm_kx_op(s, CM_OP_SELECT, CM_BOOL, a, b, a);
}
static int in_range(cm_kstage *s, int e, int64_t hi) { /* 0 <= e < hi */
  int ge = cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), e, -1);
  return band(s, ge, cm_kx_op(s, CM_OP_LT, CM_BOOL, e, cm_kx_iconst(s, hi), -1));
}
static int clamp(cm_kstage *s, int e, int64_t hi) {
  e = cm_kx_op(s, CM_OP_MAX, CM_I64, e, cm_kx_iconst(s, 0), -1);
  return cm_kx_op(s, CM_OP_MIN, CM_I64, e, cm_kx_iconst(s, hi - 1), -1);
}

/* The input coordinate along spatial axis `axis` (0: h, 1: w) that output
 * position out reads through kernel tap: out * stride - padding + tap * dilation. */
static int conv_tap(cm_kstage *s, const cm_attrs *at, int axis, int out, int tap) {
  int pos = cm_kx_imul(s, out, cm_kx_iconst(s, at->stride[axis]));
  pos = cm_kx_iadd(s, pos, cm_kx_iconst(s, -at->padding[axis]));
  return cm_kx_iadd(s, pos, cm_kx_imul(s, tap, cm_kx_iconst(s, at->dilation[axis])));
}

/* conv2d and its adjoints as a reduction (ir/eval.c's bilinear form): the
 * output's own index is the domain, the other three of (n|o|c,u,v|i,j) reduced. */
static int conv_body(lctx *c, cm_kstage *s, int id, const int *dv) {
  const cm_node *n = N(c, id);
  const cm_type *x, *w, *y;
  const cm_type *t0 = &N(c, n->inputs[0])->type, *t1 = &N(c, n->inputs[1])->type;
  if (n->op == CM_OP_CONV2D)
    x = t0, w = t1, y = &n->type;
  else if (n->op == CM_OP_CONV2D_GRAD_INPUT)
    x = &n->type, w = t1, y = t0;
  else
    x = t0, w = &n->type, y = t1;
  const cm_attrs *at = &n->attrs;
  int64_t C = x->dims[1], H = x->dims[2], W = x->dims[3], O = w->dims[0], Cg = w->dims[1];
  int64_t KH = w->dims[2], KW = w->dims[3], OH = y->dims[2], OW = y->dims[3];
  int64_t Og = at->groups > 0 ? O / at->groups : O;
  int nd = s->n_dom;
  int vn, vo, vc, vu, vv, vi, vj, vh = -1, vw = -1, ok = -1;
  (void)C;
  if (n->op == CM_OP_CONV2D) {
    s->red[0] = Cg, s->red[1] = KH, s->red[2] = KW;
    vn = dv[0], vo = dv[1], vi = dv[2], vj = dv[3];
    vc = cm_kx_var(s, nd), vu = cm_kx_var(s, nd + 1), vv = cm_kx_var(s, nd + 2);
  } else if (n->op == CM_OP_CONV2D_GRAD_WEIGHT) {
    s->red[0] = y->dims[0], s->red[1] = OH, s->red[2] = OW;
    vo = dv[0], vc = dv[1], vu = dv[2], vv = dv[3];
    vn = cm_kx_var(s, nd), vi = cm_kx_var(s, nd + 1), vj = cm_kx_var(s, nd + 2);
  } else {
    s->red[0] = Og, s->red[1] = KH, s->red[2] = KW;
    vn = dv[0], vh = dv[2], vw = dv[3];
    int ch = dv[1];
    vc = cm_kx_imod(s, ch, cm_kx_iconst(s, Cg));
    vo = cm_kx_iadd(s, cm_kx_imul(s, cm_kx_idiv(s, ch, cm_kx_iconst(s, Cg)), cm_kx_iconst(s, Og)),
                    cm_kx_var(s, nd));
    vu = cm_kx_var(s, nd + 1), vv = cm_kx_var(s, nd + 2);
    /* i = (h + ph - u*dh) / sh when divisible and in range */
    int ti = cm_kx_iadd(s, cm_kx_iadd(s, vh, cm_kx_iconst(s, at->padding[0])),
                        cm_kx_imul(s, vu, cm_kx_iconst(s, -at->dilation[0])));
    int tj = cm_kx_iadd(s, cm_kx_iadd(s, vw, cm_kx_iconst(s, at->padding[1])),
                        cm_kx_imul(s, vv, cm_kx_iconst(s, -at->dilation[1])));
    ok = band(s, ok, cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), ti, -1));
    ok = band(s, ok, cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), tj, -1));
    int ci = cm_kx_op(s, CM_OP_MAX, CM_I64, ti, cm_kx_iconst(s, 0), -1);
    int cj = cm_kx_op(s, CM_OP_MAX, CM_I64, tj, cm_kx_iconst(s, 0), -1);
    if (at->stride[0] > 1)
      ok = band(s, ok,
                cm_kx_op(s, CM_OP_EQ, CM_BOOL, cm_kx_imod(s, ci, cm_kx_iconst(s, at->stride[0])),
                         cm_kx_iconst(s, 0), -1));
    if (at->stride[1] > 1)
      ok = band(s, ok,
                cm_kx_op(s, CM_OP_EQ, CM_BOOL, cm_kx_imod(s, cj, cm_kx_iconst(s, at->stride[1])),
                         cm_kx_iconst(s, 0), -1));
    vi = cm_kx_idiv(s, ci, cm_kx_iconst(s, at->stride[0]));
    vj = cm_kx_idiv(s, cj, cm_kx_iconst(s, at->stride[1]));
    ok = band(s, ok, cm_kx_op(s, CM_OP_LT, CM_BOOL, vi, cm_kx_iconst(s, OH), -1));
    ok = band(s, ok, cm_kx_op(s, CM_OP_LT, CM_BOOL, vj, cm_kx_iconst(s, OW), -1));
    vi = clamp(s, vi, OH), vj = clamp(s, vj, OW);
  }
  s->n_red = 3;
  if (vh < 0) {
    vh = conv_tap(s, at, 0, vi, vu);
    vw = conv_tap(s, at, 1, vj, vv);
    ok = band(s, in_range(s, vh, H), in_range(s, vw, W));
    vh = clamp(s, vh, H), vw = clamp(s, vw, W);
  }
  int vch =
      cm_kx_iadd(s, cm_kx_imul(s, cm_kx_idiv(s, vo, cm_kx_iconst(s, Og)), cm_kx_iconst(s, Cg)), vc);
  int xi[4] = {vn, vch, vh, vw}, wi[4] = {vo, vc, vu, vv}, yi[4] = {vn, vo, vi, vj};
  int a, b;
  if (n->op == CM_OP_CONV2D)
    a = value(c, s, n->inputs[0], xi), b = value(c, s, n->inputs[1], wi);
  else if (n->op == CM_OP_CONV2D_GRAD_INPUT)
    a = value(c, s, n->inputs[0], yi), b = value(c, s, n->inputs[1], wi);
  else
    a = value(c, s, n->inputs[0], xi), b = value(c, s, n->inputs[1], yi);
  if (a < 0 || b < 0) return -1;
  int m = cm_lower_product(s, a, b);
  cm_dtype pt = s->exprs[m].dtype;
  return ok < 0 ? m : cm_kx_op(s, CM_OP_SELECT, pt, ok, m, cm_kx_const(s, pt, 0));
}

static void init_stage(cm_kstage *s, const char *name) {
  memset(s, 0, sizeof *s);
  snprintf(s->name, sizeof s->name, "%s", name);
  s->body = -1;
  s->gemm_a = s->gemm_b = -1;
  s->acc_dtype = CM_F32;
}

/* i64 value of index node id at idx, or -1. */
static int index_value(lctx *c, cm_kstage *s, int id, const int *idx) {
  int j = value(c, s, id, idx);
  if (j >= 0 && N(c, id)->type.dtype != CM_I64) j = cm_kx_op(s, CM_OP_CAST, CM_I64, j, -1, -1);
  return j;
}

/* Builds the check of node id's index (see index_check) unless the kernel has it. */
static void index_check_of(lctx *c, int id) {
  for (int i = 0; i < c->n_chk; i++)
    if (c->chk[i].node == id) return;
  const cm_node *n = N(c, id);
  const cm_type *data = &N(c, n->inputs[0])->type; /* x of gather, base of scatter_add */
  int64_t dim = data->dims[n->attrs.axis < 0 ? n->attrs.axis + data->rank : n->attrs.axis];
  /* The index through the broadcasts and reshapes computed here: the first bad
   * element of a broadcast is its input's first, at coordinate 0 on the new
   * axes, so [n, K] ids broadcast to [n, K, D] are checked once per id. */
  int chain[16], n_chain = 0, inner = n->inputs[1];
  chain[n_chain++] = inner;
  while (n_chain < 16 && c->buf_of[inner] < 0 && !is_mat(c, inner) &&
         (N(c, inner)->op == CM_OP_BROADCAST || N(c, inner)->op == CM_OP_RESHAPE)) {
    inner = N(c, inner)->inputs[0];
    chain[n_chain++] = inner;
  }
  const cm_type *ti = &N(c, inner)->type, *to = &N(c, n->inputs[1])->type;
  int64_t numel = cm_type_numel(ti);
  int key = cm_kernel_add_buffer(c->k, CM_KBUF_STATUS, CM_I64, 1, id, 0);
  int val = cm_kernel_add_buffer(c->k, CM_KBUF_STATUS, CM_I64, 2, id, 1);
  c->k->buffers[key].written = c->k->buffers[key].read = true;
  c->k->buffers[val].written = true;
  index_check ck;
  memset(&ck, 0, sizeof ck);
  ck.node = id;
  ck.stage = c->k->n_stages - 1;
  /* the stage being built keeps its memo and epilogue state (an index may
   * hold a gather: its check is built, and listed, first) */
  memo *saved = c->memo;
  int saved_n = c->n_memo, saved_cap = c->cap_memo, saved_acc = c->acc_node;
  c->memo = NULL, c->n_memo = c->cap_memo = 0, c->acc_node = -1;
  char name[64];
  /* find: max over the index of (numel - position) where it is out of range */
  cm_kstage *f = &ck.find;
  snprintf(name, sizeof name, "check_%.40s", n->name);
  init_stage(f, name);
  int iv[CM_MAX_RANK];
  f->n_red = ti->rank;
  for (int a = 0; a < ti->rank; a++) f->red[a] = ti->dims[a], iv[a] = cm_kx_var(f, a);
  int j = index_value(c, f, inner, iv);
  if (j >= 0) {
    int lt = cm_kx_op(f, CM_OP_LT, CM_BOOL, j, cm_kx_iconst(f, 0), -1);
    int ge = cm_kx_op(f, CM_OP_LE, CM_BOOL, cm_kx_iconst(f, dim), j, -1);
    int bad = cm_kx_op(f, CM_OP_SELECT, CM_BOOL, lt, lt, ge);
    int k = cm_kx_op(f, CM_OP_SUB, CM_I64, cm_kx_iconst(f, numel), linear(f, ti, iv), -1);
    int body = cm_kx_op(f, CM_OP_SELECT, CM_I64, bad, k, cm_kx_iconst(f, 0));
    if (ti->rank > 0) {
      f->red_op = CM_KRED_MAX;
      f->acc_dtype = CM_I64;
      f->body = body;
      body = cm_kx_acc(f);
    }
    f->stores[f->n_stores++] = (cm_kstore){key, cm_kx_iconst(f, 0), body};
  }
  cm_lower_finish_stage(f);
  /* value: the index at that position (the last one when none) and the position
   * in the node's index tensor */
  c->n_memo = 0;
  cm_kstage *v = &ck.value;
  snprintf(name, sizeof name, "check_%.40s_at", n->name);
  init_stage(v, name);
  int pos = cm_kx_op(v, CM_OP_SUB, CM_I64, cm_kx_iconst(v, numel),
                     cm_kx_load(v, c->k, key, cm_kx_iconst(v, 0)), -1);
  pos = cm_kx_op(v, CM_OP_MIN, CM_I64, pos, cm_kx_iconst(v, numel - 1), -1);
  int at[CM_MAX_RANK], up[CM_MAX_RANK];
  delinear(v, ti, pos, at);
  j = index_value(c, v, inner, at);
  for (int q = n_chain - 2; q >= 0; q--) { /* coordinates back up the chain */
    const cm_node *m = N(c, chain[q]);
    const cm_type *tc = &N(c, chain[q + 1])->type;
    if (m->op == CM_OP_RESHAPE) {
      delinear(v, &m->type, linear(v, tc, at), up);
    } else {
      int off = m->type.rank - tc->rank;
      for (int a = 0; a < m->type.rank; a++) up[a] = a < off ? cm_kx_iconst(v, 0) : at[a - off];
    }
    memcpy(at, up, sizeof at);
  }
  if (j >= 0) {
    v->stores[v->n_stores++] = (cm_kstore){val, cm_kx_iconst(v, 0), j};
    v->stores[v->n_stores++] = (cm_kstore){val, cm_kx_iconst(v, 1), linear(v, to, at)};
  }
  cm_lower_finish_stage(v);
  free(c->memo);
  c->memo = saved, c->n_memo = saved_n, c->cap_memo = saved_cap, c->acc_node = saved_acc;
  if (c->st == CM_OK && (f->n_stores != 1 || v->n_stores != 2))
    fail(c, CM_EINTERNAL, id, "no index value for its range check");
  if (c->n_chk == c->cap_chk) {
    c->cap_chk = c->cap_chk ? 2 * c->cap_chk : 4;
    index_check *grown = realloc(c->chk, sizeof *grown * (size_t)c->cap_chk);
    if (!grown) abort();
    c->chk = grown;
  }
  c->chk[c->n_chk++] = ck;
}

/* Drops the checks found while building stage si (a stage given up). */
static void drop_index_checks(lctx *c, int si) {
  int w = 0;
  for (int i = 0; i < c->n_chk; i++) {
    if (c->chk[i].stage == si) {
      free(c->chk[i].find.exprs);
      free(c->chk[i].value.exprs);
    } else {
      c->chk[w++] = c->chk[i];
    }
  }
  c->n_chk = w;
}

/* Moves every check's two stages in front of its stage (the kernel owns them then). */
static void insert_index_checks(lctx *c) {
  cm_kernel *k = c->k;
  for (int i = c->n_chk - 1; i >= 0; i--) {
    index_check *ck = &c->chk[i];
    int at = ck->stage < 0 ? 0 : ck->stage > k->n_stages ? k->n_stages : ck->stage;
    cm_kernel_add_stage(k, "");
    cm_kernel_add_stage(k, "");
    memmove(&k->stages[at + 2], &k->stages[at], sizeof(cm_kstage) * (size_t)(k->n_stages - 2 - at));
    k->stages[at] = ck->find;
    k->stages[at + 1] = ck->value;
    /* checks found earlier sit at or before this one's place: they move with it */
    for (int e = 0; e < i; e++)
      if (c->chk[e].stage >= at) c->chk[e].stage += 2;
  }
  c->n_chk = 0;
}

/* scatter_add: a stage copying the base into b, then an accumulate stage over
 * the updates (index clamped into range). */
static cm_status lower_scatter(lctx *c, int id, int b) {
  const cm_node *n = N(c, id);
  const cm_type *t = &n->type, *ut = &N(c, n->inputs[2])->type;
  int axis = n->attrs.axis < 0 ? n->attrs.axis + t->rank : n->attrs.axis;
  int dv[CM_MAX_RANK];
  for (int pass = 0; pass < 2 && c->st == CM_OK; pass++) {
    const cm_type *dt = pass ? ut : t;
    char name[64];
    snprintf(name, sizeof name, "s%d_scatter_%s", c->k->n_stages, pass ? "add" : "base");
    cm_kstage *s = cm_kernel_add_stage(c->k, name);
    c->n_memo = 0;
    s->n_dom = dt->rank;
    for (int i = 0; i < dt->rank; i++) s->dom[i] = dt->dims[i], dv[i] = cm_kx_var(s, i);
    int v = value(c, s, n->inputs[pass ? 2 : 0], dv), at;
    if (v < 0) return fail(c, CM_EINTERNAL, id, "no value");
    if (pass) {
      index_check_of(c, id);
      int j = value(c, s, n->inputs[1], dv);
      if (j < 0) return fail(c, CM_EINTERNAL, id, "no index");
      if (N(c, n->inputs[1])->type.dtype != CM_I64) j = cm_kx_op(s, CM_OP_CAST, CM_I64, j, -1, -1);
      int oi[CM_MAX_RANK];
      memcpy(oi, dv, sizeof oi);
      oi[axis] = clamp(s, j, t->dims[axis]);
      at = linear(s, t, oi);
      s->accumulate = true;
    } else {
      at = linear(s, t, dv);
    }
    s->stores[s->n_stores++] = (cm_kstore){b, at, v};
    cm_lower_finish_stage(s);
  }
  c->k->buffers[b].written = true;
  return c->st;
}

/* The input patch value both GEMM lowerings of conv2d contract over: node
 * n's input 0 (x, N C H W) at image vn, output pixel (oh, ow) and the patch
 * element flattened in tap = (c * KH + u) * KW + v, zero outside by SELECT;
 * cuv receives (c, u, v). -1 when x has no value here. */
static int conv_patch(lctx *c, cm_kstage *s, const cm_node *n, int64_t KH, int64_t KW, int vn,
                      int oh, int ow, int tap, int cuv[3]) {
  const cm_type *x = &N(c, n->inputs[0])->type;
  int64_t H = x->dims[2], W = x->dims[3];
  int vc = cm_kx_idiv(s, tap, cm_kx_iconst(s, KH * KW));
  int r = cm_kx_imod(s, tap, cm_kx_iconst(s, KH * KW));
  int vu = cm_kx_idiv(s, r, cm_kx_iconst(s, KW)), vv = cm_kx_imod(s, r, cm_kx_iconst(s, KW));
  int vh = conv_tap(s, &n->attrs, 0, oh, vu);
  int vw = conv_tap(s, &n->attrs, 1, ow, vv);
  int ok = band(s, in_range(s, vh, H), in_range(s, vw, W));
  int xi[4] = {vn, vc, clamp(s, vh, H), clamp(s, vw, W)};
  cuv[0] = vc, cuv[1] = vu, cuv[2] = vv;
  int a = value(c, s, n->inputs[0], xi);
  if (a < 0) return -1;
  return cm_kx_op(s, CM_OP_SELECT, x->dtype, ok, a, cm_kx_const(s, x->dtype, 0));
}

/* conv2d with groups == 1 as an implicit GEMM: dom = [N, OH*OW, O], red =
 * [C*KH*KW]; A = the input patch (zero outside by SELECT), B = the weight.
 * ix receives the output's NCHW index expressions. */
static void conv_gemm(lctx *c, cm_kstage *s, int id, int *ix) {
  const cm_node *n = N(c, id);
  const cm_type *x = &N(c, n->inputs[0])->type, *w = &N(c, n->inputs[1])->type, *y = &n->type;
  int64_t C = x->dims[1], KH = w->dims[2], KW = w->dims[3];
  int64_t OW = y->dims[3];
  s->n_dom = 3;
  s->dom[0] = y->dims[0], s->dom[1] = y->dims[2] * OW, s->dom[2] = y->dims[1];
  s->n_red = 1;
  s->red[0] = C * KH * KW;
  int vn = cm_kx_var(s, 0), vp = cm_kx_var(s, 1), vo = cm_kx_var(s, 2), vk = cm_kx_var(s, 3);
  int oh = cm_kx_idiv(s, vp, cm_kx_iconst(s, OW)), ow = cm_kx_imod(s, vp, cm_kx_iconst(s, OW));
  int cuv[3];
  int a = conv_patch(c, s, n, KH, KW, vn, oh, ow, vk, cuv);
  int wi[4] = {vo, cuv[0], cuv[1], cuv[2]};
  int b = value(c, s, n->inputs[1], wi);
  if (a < 0 || b < 0) return;
  s->body = cm_lower_product(s, a, b);
  if (!c->o || !c->o->no_templates) {
    cm_gemm_mark(s, a, b, c->o);
  }
  ix[0] = vn, ix[1] = vo, ix[2] = oh, ix[3] = ow;
}

/* conv2d_grad_weight with groups == 1 as a GEMM: dom = [O, C*KH*KW], red =
 * [N*OH*OW]; A = dY[n, o, oh, ow] (k-contiguous within an image), B = the
 * input patch im2col(X)[(n, oh, ow), (c, u, v)] (zero outside by SELECT). The
 * generic reduction walks X with a stride per (u, v) and runs one output
 * element per work item: a few GFLOP/s. ix receives the weight's OIHW index
 * expressions. */
static void conv_grad_weight_gemm(lctx *c, cm_kstage *s, int id, int *ix) {
  const cm_node *n = N(c, id);
  const cm_type *x = &N(c, n->inputs[0])->type, *y = &N(c, n->inputs[1])->type, *w = &n->type;
  int64_t C = x->dims[1], KH = w->dims[2], KW = w->dims[3];
  int64_t OH = y->dims[2], OW = y->dims[3], P = OH * OW;
  s->n_dom = 2;
  s->dom[0] = w->dims[0], s->dom[1] = C * KH * KW;
  s->n_red = 1;
  s->red[0] = y->dims[0] * P;
  int vo = cm_kx_var(s, 0), vj = cm_kx_var(s, 1), vk = cm_kx_var(s, 2);
  int vn = cm_kx_idiv(s, vk, cm_kx_iconst(s, P)), vp = cm_kx_imod(s, vk, cm_kx_iconst(s, P));
  int oh = cm_kx_idiv(s, vp, cm_kx_iconst(s, OW)), ow = cm_kx_imod(s, vp, cm_kx_iconst(s, OW));
  int yi[4] = {vn, vo, oh, ow}, cuv[3];
  int a = value(c, s, n->inputs[1], yi);
  int b = conv_patch(c, s, n, KH, KW, vn, oh, ow, vj, cuv);
  if (a < 0 || b < 0) return;
  s->body = cm_lower_product(s, a, b);
  cm_gemm_mark(s, a, b, c->o);
  ix[0] = vo, ix[1] = cuv[0], ix[2] = cuv[1], ix[3] = cuv[2];
}

/* A stage computing materialized node id into buffer b. */
static cm_status lower_materialized(lctx *c, int id, int b, const int *eo, const int *eb,
                                    int n_eo) {
  if (N(c, id)->op == CM_OP_SCATTER_ADD) return n_eo ? CM_EINTERNAL : lower_scatter(c, id, b);
  const cm_node *n = N(c, id);
  const cm_type *t = &n->type;
  char name[64];
  snprintf(name, sizeof name, "s%d_%s", c->k->n_stages, cm_op_name(n->op));
  cm_kstage *s = cm_kernel_add_stage(c->k, name);
  c->n_memo = 0;
  int dv[CM_MAX_RANK], in[CM_MAX_RANK];
  s->n_dom = t->rank;
  for (int i = 0; i < t->rank; i++) s->dom[i] = t->dims[i];
  s->acc_dtype = acc_of(t->dtype);
  /* A matmul by a weight shared across the batch ([..., M, K] x [K, N]) is one
   * GEMM over the folded rows: M' = batch * M, so the weight panel is packed
   * once per block of rows instead of once per batch item. */
  bool fold = false;
  if (n->op == CM_OP_MATMUL && (!c->o || !c->o->no_templates) && t->rank > 2 &&
      !n->attrs.transpose_a) {
    const cm_type *fa = &N(c, n->inputs[0])->type, *fb = &N(c, n->inputs[1])->type;
    fold = fa->rank == t->rank;
    for (int x = 0; fold && x < t->rank - 2; x++) fold = fa->dims[x] == t->dims[x];
    for (int x = 0; fold && x < fb->rank - 2; x++) fold = fb->dims[x] == 1;
  }
  if (fold) {
    int64_t rows = 1;
    for (int i = 0; i < t->rank - 1; i++) rows *= t->dims[i];
    s->n_dom = 2, s->dom[0] = rows, s->dom[1] = t->dims[t->rank - 1];
    int vi = cm_kx_var(s, 0);
    for (int a = t->rank - 2; a > 0; a--) {
      dv[a] = cm_kx_imod(s, vi, cm_kx_iconst(s, t->dims[a]));
      vi = cm_kx_idiv(s, vi, cm_kx_iconst(s, t->dims[a]));
    }
    dv[0] = vi;
    dv[t->rank - 1] = cm_kx_var(s, 1);
  } else {
    for (int i = 0; i < t->rank; i++) dv[i] = cm_kx_var(s, i);
  }
  if (n->op == CM_OP_REDUCE_SUM || n->op == CM_OP_REDUCE_MAX) {
    const cm_type *it = &N(c, n->inputs[0])->type;
    s->red_op = n->op == CM_OP_REDUCE_MAX ? CM_KRED_MAX : CM_KRED_SUM;
    int o = 0;
    for (int a = 0; a < it->rank; a++) {
      bool red = false;
      for (int j = 0; j < n->attrs.n_axes; j++)
        red |= (n->attrs.axes[j] < 0 ? n->attrs.axes[j] + it->rank : n->attrs.axes[j]) == a;
      if (red) {
        s->red[s->n_red] = it->dims[a];
        in[a] = cm_kx_var(s, s->n_dom + s->n_red);
        s->n_red++;
        if (n->attrs.keepdims) o++;
      } else {
        in[a] = dv[o++];
      }
    }
    s->body = value(c, s, n->inputs[0], in);
  } else if (n->op == CM_OP_CONV2D && n->attrs.groups <= 1) {
    conv_gemm(c, s, id, dv);
  } else if (n->op == CM_OP_CONV2D_GRAD_WEIGHT && n->attrs.groups <= 1 &&
             (!c->o || !c->o->no_templates) && s->acc_dtype == CM_F32) {
    /* (f64: the CPU renders a GEMM stage generic, but cpu_exec counts its work items as
       GEMM blocks; the generic reduction keeps the two in agreement) */
    conv_grad_weight_gemm(c, s, id, dv);
  } else if (n->op != CM_OP_MATMUL) {
    s->body = conv_body(c, s, id, dv);
  } else {
    const cm_type *at = &N(c, n->inputs[0])->type, *bt = &N(c, n->inputs[1])->type;
    if (at->rank < 2 || bt->rank < 2)
      return fail(c, CM_EINVALID, id, "matmul operands of rank < 2");
    int64_t K = n->attrs.transpose_a ? at->dims[at->rank - 2] : at->dims[at->rank - 1];
    s->n_red = 1;
    s->red[0] = K;
    int kv = cm_kx_var(s, s->n_dom), iv = dv[t->rank - 2], jv = dv[t->rank - 1];
    int ai[CM_MAX_RANK], bi[CM_MAX_RANK];
    int nb = t->rank - 2;
    for (int x = 0; x < at->rank - 2; x++) {
      int ox = x + nb - (at->rank - 2);
      ai[x] = at->dims[x] == 1 ? cm_kx_iconst(s, 0) : dv[ox];
    }
    for (int x = 0; x < bt->rank - 2; x++) {
      int ox = x + nb - (bt->rank - 2);
      bi[x] = bt->dims[x] == 1 ? cm_kx_iconst(s, 0) : dv[ox];
    }
    ai[at->rank - 2] = n->attrs.transpose_a ? kv : iv;
    ai[at->rank - 1] = n->attrs.transpose_a ? iv : kv;
    bi[bt->rank - 2] = n->attrs.transpose_b ? jv : kv;
    bi[bt->rank - 1] = n->attrs.transpose_b ? kv : jv;
    int a = value(c, s, n->inputs[0], ai);
    int bb = value(c, s, n->inputs[1], bi);
    if (c->st != CM_OK) return c->st;
    s->body = cm_lower_product(s, a, bb);
    if (!c->o || !c->o->no_templates) {
      cm_gemm_mark(s, a, bb, c->o);
    }
  }
  if (c->st != CM_OK || s->body < 0) return fail(c, CM_EINTERNAL, id, "no body");
  if (b >= 0) {
    s->stores[s->n_stores++] = (cm_kstore){b, linear(s, t, dv), cm_kx_acc(s)};
    c->k->buffers[b].written = true;
  }
  if (n_eo > 0) {
    c->acc_node = id;
    memcpy(c->acc_dv, dv, sizeof dv);
    for (int i = 0; i < n_eo && !c->acc_fail && c->st == CM_OK; i++) {
      const cm_type *ot = &N(c, eo[i])->type;
      int v = value(c, s, eo[i], dv);
      if (v < 0) break;
      s->stores[s->n_stores++] = (cm_kstore){eb[i], linear(s, ot, dv), v};
    }
    c->acc_node = -1;
    if (c->acc_fail || s->n_stores != n_eo) {
      /* not an epilogue after all: the caller lowers it unfused */
      c->acc_fail = false;
      c->n_memo = 0;
      free(s->exprs);
      c->k->n_stages--;
      drop_index_checks(c, c->k->n_stages);
      return CM_EINTERNAL;
    }
    for (int i = 0; i < n_eo; i++) c->k->buffers[eb[i]].written = true;
  }
  cm_lower_finish_stage(s);
  return CM_OK;
}

/* Group outputs that are an elementwise function of materialized node h and
 * of nothing else materialized, h having no other use: their stores go into
 * h's stage with h's value as ACC. Returns how many (into eo/eb). */
static int find_epilogue(lctx *c, int h, const int *out_buf, const bool *done, int *eo, int *eb) {
  const cm_graph *g = c->g;
  const cm_group *gr = c->gr;
  const cm_type *ht = &N(c, h)->type;
  if (N(c, h)->op == CM_OP_SCATTER_ADD) return 0;
  for (int j = 0; j < gr->n_outputs; j++)
    if (gr->outputs[j] == h) return 0;
  int n = g->n_nodes, ne = 0;
  char *ing = calloc((size_t)n, 1), *dep = calloc((size_t)n, 1), *in_u = calloc((size_t)n, 1);
  int *stack = malloc(sizeof(int) * (size_t)(n + 1));
  if (!ing || !dep || !in_u || !stack) abort();
  for (int i = 0; i < gr->n_nodes; i++) ing[gr->nodes[i]] = 1;
  for (int j = 0; j < gr->n_inputs; j++) ing[gr->inputs[j]] = 0;
  dep[h] = 1;
  for (int i = 0; i < gr->n_nodes; i++) {
    int x = gr->nodes[i];
    if (x == h || !ing[x] || is_mat(c, x)) continue;
    for (int k = 0; k < N(c, x)->n_inputs; k++) dep[x] |= dep[N(c, x)->inputs[k]];
  }
  for (int j = 0; j < gr->n_outputs && ne < CM_KMAX_STORES - 1; j++) {
    int o = gr->outputs[j];
    const cm_type *ot = &N(c, o)->type;
    if (done[j] || !dep[o] || is_mat(c, o) || ot->rank != ht->rank ||
        memcmp(ot->dims, ht->dims, sizeof(int64_t) * (size_t)ht->rank))
      continue;
    /* the cone of o within the group must reach no materialized node but h */
    char *seen = calloc((size_t)n, 1);
    if (!seen) abort();
    int sp = 0;
    bool ok = true;
    stack[sp++] = o;
    seen[o] = 1;
    while (sp > 0 && ok) {
      int x = stack[--sp];
      if (x == h) continue;
      if (is_mat(c, x)) ok = false;
      for (int k = 0; k < N(c, x)->n_inputs && ok; k++) {
        int y = N(c, x)->inputs[k];
        if (ing[y] && !seen[y]) seen[y] = 1, stack[sp++] = y;
      }
    }
    if (ok) {
      for (int x = 0; x < n; x++)
        if (seen[x]) in_u[x] = 1;
      eo[ne] = o;
      eb[ne++] = out_buf[j];
    }
    free(seen);
  }
  /* every value depending on h must be consumed only inside the fused cones */
  for (int x = 0; x < n && ne > 0; x++) {
    if (!dep[x] || !ing[x]) continue;
    bool is_eo = false;
    for (int i = 0; i < ne; i++) is_eo |= eo[i] == x;
    if (!in_u[x] && x != h) {
      ne = 0;
      break;
    }
    for (int y = x + 1; y < n && !is_eo && ne > 0; y++)
      for (int k = 0; k < g->nodes[y].n_inputs; k++)
        if (g->nodes[y].inputs[k] == x && !in_u[y]) ne = 0;
  }
  free(ing), free(dep), free(in_u), free(stack);
  return ne;
}

/* Values of an attention group over the score rows (N x N per batch item)
 * that several consumers would recompute: exp(s - max) (row sum, P, the
 * stored copies) and an operand of two matmuls (dS for dQ and dK). Each gets
 * a stage of its own, so a fused rendering computes it once into a local tile. */
static void mark_shared(lctx *c) {
  const cm_graph *g = c->g;
  const cm_group *gr = c->gr;
  int64_t rows = -1;
  for (int i = 0; i < gr->n_nodes && rows < 0; i++)
    if (g->nodes[gr->nodes[i]].op == CM_OP_MATMUL)
      rows = cm_type_numel(&g->nodes[gr->nodes[i]].type);
  if (rows < 0) return;
  char *ing = calloc((size_t)g->n_nodes, 1);
  c->shared = calloc((size_t)g->n_nodes, sizeof(bool));
  if (!ing || !c->shared) abort();
  for (int i = 0; i < gr->n_nodes; i++) ing[gr->nodes[i]] = 1;
  for (int j = 0; j < gr->n_inputs; j++) ing[gr->inputs[j]] = 0;
  for (int i = 0; i < gr->n_nodes; i++) {
    int x = gr->nodes[i];
    const cm_node *n = &g->nodes[x];
    if (!ing[x] || cm_op_get_info(n->op)->category != CM_CAT_ELEMENTWISE ||
        !cm_dtype_is_float(n->type.dtype) || n->type.rank < 2 || cm_type_numel(&n->type) != rows)
      continue;
    int users = 0, matmuls = 0;
    for (int u = x + 1; u < g->n_nodes; u++) {
      if (!ing[u]) continue;
      bool uses = false;
      for (int k = 0; k < g->nodes[u].n_inputs; k++) uses |= g->nodes[u].inputs[k] == x;
      if (!uses) continue;
      users++;
      /* through views to a matmul */
      int v = u;
      while (v >= 0 && (g->nodes[v].op == CM_OP_RESHAPE || g->nodes[v].op == CM_OP_PERMUTE)) {
        int next = -1, cnt = 0;
        for (int w = v + 1; w < g->n_nodes; w++)
          for (int k = 0; ing[w] && k < g->nodes[w].n_inputs; k++)
            if (g->nodes[w].inputs[k] == v) next = w, cnt++;
        v = cnt == 1 ? next : -1;
      }
      if (v >= 0 && g->nodes[v].op == CM_OP_MATMUL) matmuls++;
    }
    c->shared[x] = (n->op == CM_OP_EXP && users >= 2) || matmuls >= 2;
  }
  free(ing);
}

/* A stage writing shared value id (mark_shared) into its output or scratch buffer. */
static void lower_shared(lctx *c, int id, const int *out_buf) {
  const cm_node *n = N(c, id);
  const cm_type *t = &n->type;
  int b = -1;
  for (int j = 0; j < c->gr->n_outputs; j++)
    if (c->gr->outputs[j] == id) b = out_buf[j];
  if (b < 0) {
    int64_t bytes = cm_type_numel(t) * (int64_t)cm_dtype_size(t->dtype);
    b = cm_kernel_add_buffer(c->k, CM_KBUF_SCRATCH, t->dtype, cm_type_numel(t), id,
                             c->k->scratch_bytes);
    c->k->scratch_bytes += (bytes + 63) / 64 * 64;
  }
  char name[64];
  snprintf(name, sizeof name, "s%d_%s", c->k->n_stages, cm_op_name(n->op));
  cm_kstage *s = cm_kernel_add_stage(c->k, name);
  c->n_memo = 0;
  int dv[CM_MAX_RANK];
  s->n_dom = t->rank;
  for (int i = 0; i < t->rank; i++) s->dom[i] = t->dims[i], dv[i] = cm_kx_var(s, i);
  int v = value(c, s, id, dv);
  if (v < 0) {
    fail(c, CM_EINTERNAL, id, "no value for a shared attention value");
    return;
  }
  s->stores[s->n_stores++] = (cm_kstore){b, linear(s, t, dv), v};
  c->k->buffers[b].written = true;
  cm_lower_finish_stage(s);
  c->buf_of[id] = b;
}

/* Whether every materialized node that output value id depends on within the
 * group has its stage already (its buffer set). */
static bool cone_ready(lctx *c, int id, char *seen) {
  if (seen[id] || c->buf_of[id] >= 0) return true;
  seen[id] = 1;
  if (is_mat(c, id)) return false;
  const cm_node *n = N(c, id);
  for (int k = 0; k < n->n_inputs; k++)
    if (!cone_ready(c, n->inputs[k], seen)) return false;
  return true;
}

/* One stage storing group output i and every later output not done of the same
 * elements; early: before the group's other materialized nodes, so only outputs
 * whose cone is ready. */
static void output_stage(lctx *c, int i, const int *out_buf, bool *done, bool early) {
  const cm_graph *g = c->g;
  const cm_group *gr = c->gr;
  cm_kernel *out = c->k;
  int id = gr->outputs[i];
  const cm_type *t = &g->nodes[id].type;
  char name[64];
  snprintf(name, sizeof name, "s%d_out", out->n_stages);
  cm_kstage *s = cm_kernel_add_stage(out, name);
  c->n_memo = 0;
  s->n_dom = t->rank;
  int dv[CM_MAX_RANK];
  for (int d = 0; d < t->rank; d++) {
    s->dom[d] = t->dims[d];
    dv[d] = cm_kx_var(s, d);
  }
  int stage_written[CM_KMAX_STORES], n_sw = 0;
  /* outputs of another shape but as many elements (a [B*T, D] and a [B, T, D] view
     of one value, as GELU's forward and its saved copy are) join the stage, indexed
     by the same linear position: the data is read once and LLVM merges the equal
     loads and math. Not when the group assigns a state (a source buffer read at
     another position in the stage that writes it). */
  bool any_source = false;
  for (int j = 0; j < gr->n_outputs; j++)
    any_source |= out->buffers[out_buf[j]].kind == CM_KBUF_SOURCE;
  char *seen = early ? calloc((size_t)g->n_nodes, 1) : NULL;
  if (early && !seen) abort();
  for (int j = i; j < gr->n_outputs && c->st == CM_OK; j++) {
    int oj = gr->outputs[j];
    const cm_type *tj = &g->nodes[oj].type;
    bool same =
        tj->rank == t->rank && !memcmp(tj->dims, t->dims, sizeof(int64_t) * (size_t)t->rank);
    if (done[j] || (!same && (any_source || tj->rank < 1 || cm_type_numel(tj) != cm_type_numel(t))))
      continue;
    if (is_mat(c, oj) && c->buf_of[oj] == out_buf[j]) continue;
    if (early) {
      memset(seen, 0, (size_t)g->n_nodes);
      if (is_mat(c, oj) || !cone_ready(c, oj, seen)) continue;
    }
    if (s->n_stores == CM_KMAX_STORES) break;
    int dvj[CM_MAX_RANK];
    if (same)
      memcpy(dvj, dv, sizeof dvj);
    else
      delinear(s, tj, linear(s, t, dv), dvj);
    int v = value(c, s, oj, dvj);
    if (v < 0) break;
    s->stores[s->n_stores++] = (cm_kstore){out_buf[j], linear(s, tj, dvj), v};
    out->buffers[out_buf[j]].written = true;
    if (out->buffers[out_buf[j]].kind == CM_KBUF_SOURCE) stage_written[n_sw++] = out_buf[j];
    done[j] = true;
  }
  free(seen);
  for (int w = 0; w < n_sw; w++) c->written[stage_written[w]] = true;
  cm_lower_finish_stage(s);
}

/* Clears the per-buffer "written" marks, sized for the kernel's buffers (+ extra bytes). */
static void reset_written(lctx *c, size_t extra) {
  c->written = realloc(c->written, sizeof(bool) * (size_t)c->k->n_buffers + extra);
  if (!c->written) abort();
  memset(c->written, 0, sizeof(bool) * (size_t)c->k->n_buffers);
}

/* The group's inputs (and consts with data inside it) get their buffers. */
static void bind_inputs(lctx *c) {
  const cm_graph *g = c->g;
  const cm_group *gr = c->gr;
  cm_kernel *out = c->k;
  for (int i = 0; i < gr->n_inputs && c->st == CM_OK; i++) {
    int id = gr->inputs[i];
    const cm_node *n = &g->nodes[id];
    int64_t numel = cm_type_numel(&n->type);
    if (n->op == CM_OP_INPUT || n->op == CM_OP_PARAM || n->op == CM_OP_STATE)
      c->buf_of[id] = source_buf(out, n->type.dtype, numel, id);
    else if (n->op == CM_OP_ASSIGN)
      c->buf_of[id] = source_buf(out, n->type.dtype, numel, n->inputs[0]);
    else if (n->op == CM_OP_CONST && n->attrs.data)
      c->buf_of[id] = cm_kernel_add_buffer(out, CM_KBUF_CONST, n->type.dtype, numel, id, 0);
    else if (c->p->offset[id] < 0)
      fail(c, CM_EINTERNAL, id, "group input has no arena offset");
    else
      c->buf_of[id] =
          cm_kernel_add_buffer(out, CM_KBUF_ARENA, n->type.dtype, numel, id, c->p->offset[id]);
  }
  /* consts with data inside the group read their own buffer too */
  for (int i = 0; i < gr->n_nodes && c->st == CM_OK; i++) {
    int id = gr->nodes[i];
    const cm_node *n = &g->nodes[id];
    if (n->op == CM_OP_CONST && n->attrs.data && c->buf_of[id] < 0)
      c->buf_of[id] =
          cm_kernel_add_buffer(out, CM_KBUF_CONST, n->type.dtype, cm_type_numel(&n->type), id, 0);
  }
}

/* The group's outputs get their buffers (out_buf[i] for output i). */
static void bind_outputs(lctx *c, int *out_buf) {
  const cm_group *gr = c->gr;
  for (int i = 0; i < gr->n_outputs && c->st == CM_OK; i++) {
    int id = gr->outputs[i];
    const cm_node *n = &c->g->nodes[id];
    int64_t numel = cm_type_numel(&n->type);
    if (n->op == CM_OP_ASSIGN)
      out_buf[i] = source_buf(c->k, n->type.dtype, numel, n->inputs[0]);
    else if (c->p->offset[id] < 0)
      fail(c, CM_EINTERNAL, id, "group output has no arena offset");
    else
      out_buf[i] =
          cm_kernel_add_buffer(c->k, CM_KBUF_ARENA, n->type.dtype, numel, id, c->p->offset[id]);
  }
}

/* A reduction of a group output (a bias gradient of the stored input gradient):
 * the output's stage first, and the reduction reads the one stored array instead
 * of recomputing the value from all of its operands. */
static void output_before_reduction(lctx *c, const cm_node *n, int *out_buf, bool *done) {
  const cm_group *gr = c->gr;
  bool src = false;
  int jx = -1;
  for (int j = 0; j < gr->n_outputs; j++) {
    src |= c->k->buffers[out_buf[j]].kind == CM_KBUF_SOURCE;
    if (gr->outputs[j] == n->inputs[0] && !done[j]) jx = j;
  }
  char *seen = jx >= 0 && !src ? calloc((size_t)c->g->n_nodes, 1) : NULL;
  if (seen && cone_ready(c, n->inputs[0], seen)) {
    output_stage(c, jx, out_buf, done, true);
    if (done[jx]) c->buf_of[n->inputs[0]] = out_buf[jx];
  }
  free(seen);
}

/* Lowers materialized node id: with the group outputs it computes as epilogue
 * stores when it has some, else into its output or a new scratch buffer. */
static void lower_node(lctx *c, int id, int *out_buf, bool *done) {
  const cm_group *gr = c->gr;
  cm_kernel *out = c->k;
  const cm_node *n = &c->g->nodes[id];
  reset_written(c, 0);
  if (c->shared && c->shared[id]) {
    lower_shared(c, id, out_buf);
    return;
  }
  if ((n->op == CM_OP_REDUCE_SUM || n->op == CM_OP_REDUCE_MAX) && !(c->o && c->o->no_templates) &&
      !is_mat(c, n->inputs[0]) && c->buf_of[n->inputs[0]] < 0) {
    output_before_reduction(c, n, out_buf, done);
    if (c->st != CM_OK) return;
  }
  int eo[CM_KMAX_STORES], eb[CM_KMAX_STORES];
  int ne = find_epilogue(c, id, out_buf, done, eo, eb);
  if (ne > 0 && lower_materialized(c, id, -1, eo, eb, ne) == CM_OK) {
    for (int e = 0; e < ne; e++) {
      c->buf_of[eo[e]] = eb[e];
      for (int j = 0; j < gr->n_outputs; j++)
        if (gr->outputs[j] == eo[e]) done[j] = true;
    }
    return;
  }
  if (c->st != CM_OK) return;
  int b = -1;
  for (int j = 0; j < gr->n_outputs; j++)
    if (gr->outputs[j] == id) b = out_buf[j];
  if (b < 0) {
    int64_t bytes = cm_type_numel(&n->type) * (int64_t)cm_dtype_size(n->type.dtype);
    b = cm_kernel_add_buffer(out, CM_KBUF_SCRATCH, n->type.dtype, cm_type_numel(&n->type), id,
                             out->scratch_bytes);
    out->scratch_bytes += (bytes + 63) / 64 * 64;
  }
  reset_written(c, 0);
  lower_materialized(c, id, b, NULL, NULL, 0);
  c->buf_of[id] = b;
}

/* A collective over ranks > 1 (the one node of a collective group): a collective stage, then
 * for an all_gather whose axis has non-unit dims before it, a stage moving the gathered
 * [rank, input...] scratch into the output's layout. */
static void lower_collective(lctx *c, int id, const int *out_buf) {
  const cm_node *n = N(c, id);
  const cm_type *it = &N(c, n->inputs[0])->type, *t = &n->type;
  cm_kernel *k = c->k;
  int in = c->buf_of[n->inputs[0]], out = -1;
  for (int j = 0; j < c->gr->n_outputs; j++)
    if (c->gr->outputs[j] == id) out = out_buf[j];
  if (in < 0) {
    fail(c, CM_EINVALID, id, "a collective's input must be in memory (not a folded constant)");
    return;
  }
  if (out < 0 || k->buffers[out].kind != CM_KBUF_ARENA) {
    fail(c, CM_EINTERNAL, id, "a collective's value must be an arena output of its group");
    return;
  }
  k->buffers[in].read = true;
  k->buffers[out].written = true;
  int64_t count = cm_type_numel(it), outer = 1;
  int axis = n->attrs.axis < 0 ? n->attrs.axis + t->rank : n->attrs.axis;
  bool gather = n->op == CM_OP_ALL_GATHER;
  if (gather)
    for (int d = 0; d < axis; d++) outer *= it->dims[d];
  int target = out;
  if (outer > 1) { /* rank-major scratch, permuted below */
    int64_t bytes = count * n->attrs.ranks * (int64_t)cm_dtype_size(t->dtype);
    target = cm_kernel_add_buffer(k, CM_KBUF_SCRATCH, t->dtype, count * n->attrs.ranks, id,
                                  k->scratch_bytes);
    k->scratch_bytes += (bytes + 63) / 64 * 64;
    k->buffers[target].written = k->buffers[target].read = true;
  }
  cm_kstage *s = cm_kernel_add_stage(k, gather ? "all_gather" : "all_reduce");
  s->coll = (cm_kcollective){gather ? CM_KCOLL_ALL_GATHER : CM_KCOLL_ALL_REDUCE,
                             n->attrs.mode,
                             gather ? axis : 0,
                             n->attrs.ranks,
                             id,
                             in,
                             target,
                             count};
  if (target == out) return;
  /* out[.., r * d + j, ..] = scratch[r][.., j, ..] with d the input's extent on axis */
  s = cm_kernel_add_stage(k, "all_gather_permute");
  s->n_dom = t->rank;
  int dv[CM_MAX_RANK], src[CM_MAX_RANK];
  for (int d = 0; d < t->rank; d++) {
    s->dom[d] = t->dims[d];
    dv[d] = src[d] = cm_kx_var(s, d);
  }
  int extent = cm_kx_iconst(s, it->dims[axis]);
  int rank = cm_kx_idiv(s, dv[axis], extent);
  src[axis] = cm_kx_imod(s, dv[axis], extent);
  int at = cm_kx_iadd(s, cm_kx_imul(s, rank, cm_kx_iconst(s, count)), linear(s, it, src));
  int v = cm_kx_load(s, k, target, at);
  s->stores[s->n_stores++] = (cm_kstore){out, linear(s, t, dv), v};
  cm_lower_finish_stage(s);
}

/* The kernel's stages once lowered: split-K GEMMs, simplified indices, the
 * attention span and the CUDA plans, then the verifier. */
static cm_status finish_kernel(cm_kernel *out, const cm_group *gr, const cm_lower_opts *o,
                               cm_err *err) {
  cm_status st = CM_OK;
  if (gr->kind != CM_GROUP_ATTENTION && !o->no_templates) cm_gemm_split_k(out, o);
  /* flattened-then-unflattened indices become affine: the renderers vectorize them */
  for (int i = 0; i < out->n_stages && st == CM_OK; i++)
    st = cm_kstage_simplify(&out->stages[i], err);
  if (st == CM_OK && gr->kind == CM_GROUP_ATTENTION) cm_attn_mark(out, o);
  if (st == CM_OK && o->target->kind == CM_TARGET_CUDA)
    st = cm_cuda_plan_kernel(out, o->target, err);
  if (st == CM_OK) st = cm_kernel_verify(out, err);
  return st;
}

cm_status cm_lower_group(const cm_graph *g, const cm_plan *p, int group, const cm_lower_opts *o,
                         cm_kernel *out, cm_err *err) {
  if (!g || !p || !out || group < 0 || group >= p->n_groups || !p->offset)
    return cm_errorf(err, CM_EINTERNAL, "cm_lower_group: bad arguments (group %d)", group);
  cm_target host;
  cm_lower_opts resolved = o ? *o : (cm_lower_opts){0};
  if (!resolved.target) {
    cm_target_host(&host);
    resolved.target = &host;
  }
  o = &resolved;
  const cm_group *gr = &p->groups[group];
  char kname[64];
  snprintf(kname, sizeof kname, "k%d_%s", group, cm_group_kind_name(gr->kind));
  cm_kernel_init(out, kname);
  out->group = group;
  out->kind = gr->kind;
  lctx c;
  memset(&c, 0, sizeof c);
  c.g = g, c.p = p, c.gr = gr, c.o = o, c.k = out, c.err = err, c.acc_node = -1;
  c.buf_of = calloc((size_t)g->n_nodes, sizeof(int));
  if (!c.buf_of) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < g->n_nodes; i++) c.buf_of[i] = -1;
  bind_inputs(&c);
  int *out_buf = calloc((size_t)gr->n_outputs + 1, sizeof(int));
  if (!out_buf) abort();
  bind_outputs(&c, out_buf);
  bool *done = calloc((size_t)gr->n_outputs + 1, sizeof(bool));
  if (!done) abort();
  if (c.st == CM_OK && gr->kind == CM_GROUP_ATTENTION && !(o && o->no_templates)) mark_shared(&c);
  for (int i = 0; i < gr->n_nodes && c.st == CM_OK; i++) {
    const cm_node *n = &g->nodes[gr->nodes[i]];
    if ((n->op == CM_OP_ALL_REDUCE || n->op == CM_OP_ALL_GATHER) && n->attrs.ranks > 1) {
      lower_collective(&c, gr->nodes[i], out_buf);
      for (int j = 0; j < gr->n_outputs; j++) done[j] |= gr->outputs[j] == gr->nodes[i];
    }
  }
  /* materialized nodes, in topological order */
  for (int i = 0; i < gr->n_nodes && c.st == CM_OK; i++)
    if (is_mat(&c, gr->nodes[i])) lower_node(&c, gr->nodes[i], out_buf, done);
  /* remaining outputs: one stage per distinct shape */
  reset_written(&c, 1);
  for (int i = 0; i < gr->n_outputs && c.st == CM_OK; i++) {
    int id = gr->outputs[i];
    if (done[i] || (is_mat(&c, id) && c.buf_of[id] == out_buf[i])) continue;
    output_stage(&c, i, out_buf, done, false);
  }
  if (c.st == CM_OK) insert_index_checks(&c);
  for (int i = 0; i < c.n_chk; i++) free(c.chk[i].find.exprs), free(c.chk[i].value.exprs);
  free(c.chk);
  free(done);
  free(out_buf);
  free(c.shared);
  free(c.buf_of);
  free(c.written);
  free(c.memo);
  if (c.st == CM_OK) c.st = finish_kernel(out, gr, o, err);
  if (c.st != CM_OK) cm_kernel_free(out);
  return c.st;
}

cm_status cm_lower_plan(const cm_graph *g, const cm_plan *p, const cm_lower_opts *o,
                        cm_kprogram *out, cm_err *err) {
  if (!g || !p || !out) return cm_errorf(err, CM_EINTERNAL, "cm_lower_plan: bad arguments");
  cm_target host;
  cm_lower_opts resolved = o ? *o : (cm_lower_opts){0};
  if (!resolved.target) {
    cm_target_host(&host);
    resolved.target = &host;
  }
  o = &resolved;
  memset(out, 0, sizeof *out);
  out->arena_bytes = p->arena_bytes;
  out->kernels = calloc((size_t)p->n_order + 1, sizeof *out->kernels);
  if (!out->kernels) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < p->n_order; i++) {
    cm_status st = cm_lower_group(g, p, p->order[i], o, &out->kernels[i], err);
    if (st != CM_OK) {
      cm_kprogram_free(out);
      return st;
    }
    out->n_kernels++;
    if (out->kernels[i].scratch_bytes > out->max_scratch_bytes)
      out->max_scratch_bytes = out->kernels[i].scratch_bytes;
  }
  return CM_OK;
}
