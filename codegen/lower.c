/* codegen/lower.c — plan groups to the kernel IR.
 *
 * Materialized nodes (reductions, matmul) get a stage each; the remaining group
 * outputs get one stage per element count (output_stage). Everything else is inlined into
 * the expressions of the stage that needs it (value()), memoized per stage on
 * (node, index expressions) because the graphs are DAGs. Not lowered yet:
 * conv2d as a generic reduction (no GEMM template yet); epilogues
 * (elementwise outputs of one contraction/reduction with no other use) are fused into its stage.
 * Attention groups: values over the score rows with several consumers get a
 * stage of their own (mark_shared), and the stages from the first GEMM on are
 * marked as a fused attention span where cm_kattn_check holds (mark_attention). */
#include "codegen.h"

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
           "needs a communicator (multi-rank runs come with the distributed executor)");
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

static void finish_stage(cm_kstage *s) {
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

static int round_up(int64_t v, int m) {
  return (int)((v + m - 1) / m * m);
}

static void gemm_tiles(cm_kstage *s, const cm_lower_opts *o) {
  cm_kgemm_tiles t = o->target->gemm;
  bool cuda = o->target->kind == CM_TARGET_CUDA;
  int64_t M = s->dom[s->n_dom - 2], Nn = s->dom[s->n_dom - 1], K = s->red[0];
  /* one kc slice (K <= 512, below): a B panel of up to 1 MiB (K x nc floats, nc
     at most 1024) is packed once for consecutive row blocks; wider panels pack A
     fewer times */
  if (!cuda && K <= 512) t.nc = (int)(K <= 256 ? 1024 : (262144 / K) / t.nr * t.nr);
  if (t.mc > round_up(M, t.mr)) t.mc = round_up(M, t.mr);
  if (t.nc > round_up(Nn, t.nr)) t.nc = round_up(Nn, t.nr);
  if (t.kc > K) t.kc = (int)K;
  /* K up to 512 in one slice: the C tile then never goes through memory
     between slices, and consecutive row blocks share one packed B panel;
     longer K in even slices of about 256 */
  if (!cuda) {
    int64_t slices = (K + 255) / 256;
    t.kc = K <= 512 ? (int)K : (int)((K + slices - 1) / slices);
  }
  /* a GEMM of few blocks (a weight gradient: small M x N, long K) would leave
     threads idle: smaller blocks until there are 4 (each block repacks its
     operands: not more), while a block keeps 2x2 register blocks; then the
     blocks are evened out so that no thread gets a larger share */
  if (!cuda) {
    int64_t batch = 1;
    for (int d = 0; d < s->n_dom - 2; d++) batch *= s->dom[d];
    for (int guard = 0; guard < 8; guard++) {
      int64_t blocks = batch * ((M + t.mc - 1) / t.mc) * ((Nn + t.nc - 1) / t.nc);
      if (blocks >= 4) break;
      if (t.nc >= 4 * t.nr && t.nc >= t.mc / t.mr * t.nr / 2)
        t.nc = round_up(t.nc / 2, t.nr);
      else if (t.mc >= 4 * t.mr)
        t.mc = round_up(t.mc / 2, t.mr);
      else
        break;
    }
    int64_t mb = (M + t.mc - 1) / t.mc, nb = (Nn + t.nc - 1) / t.nc;
    t.mc = round_up((M + mb - 1) / mb, t.mr);
    t.nc = round_up((Nn + nb - 1) / nb, t.nr);
  }
  s->tiles = t;
}

/* ---- K split of a long GEMM with few blocks (CPU) ----------------------------
 *
 * A weight gradient (X^T dY: small M x N, K = batch x tokens) has too few
 * blocks to occupy the threads with blocks large enough to amortize packing.
 * Its stage becomes two: a GEMM over [S, batch.., M, N] whose split var s takes
 * k in [s K/S, (s + 1) K/S) into partial sums P (scratch), then a reduction
 * over s of P with the original stores (the epilogue, ACC = the sum). */

/* Copies expression e of stage from into stage to: var v becomes expression
 * vmap[v], ACC becomes to's ACC. cmap (per expression of from: its copy) starts at -1. */
static int copy_expr(cm_kstage *to, const cm_kernel *k, const cm_kstage *from, int e,
                     const int *vmap, int *cmap) {
  if (e < 0) return -1;
  if (cmap[e] >= 0) return cmap[e];
  const cm_kexpr *x = &from->exprs[e];
  int r = -1;
  switch (x->kind) {
  case CM_KX_CONST: r = cm_kx_const(to, x->dtype, x->value); break;
  case CM_KX_VAR: r = vmap[x->var]; break;
  case CM_KX_ACC: r = cm_kx_acc(to); break;
  case CM_KX_LOAD: r = cm_kx_load(to, k, x->buf, copy_expr(to, k, from, x->a, vmap, cmap)); break;
  case CM_KX_MOD:
    r = cm_kx_mod(to, copy_expr(to, k, from, x->a, vmap, cmap),
                  copy_expr(to, k, from, x->b, vmap, cmap));
    break;
  case CM_KX_OP: {
    int a = copy_expr(to, k, from, x->a, vmap, cmap);
    int b = copy_expr(to, k, from, x->b, vmap, cmap);
    int c = copy_expr(to, k, from, x->c, vmap, cmap);
    r = cm_kx_op(to, x->op, x->dtype, a, b, c);
    break;
  }
  }
  cmap[e] = r;
  return r;
}

/* The split factor S for GEMM stage s (0: no split): only for long K that
 * divides evenly, when the stage would have fewer than 4 blocks of the usual
 * size; the smallest S giving at least 4 blocks of at most 528 x 512. */
static int k_split_of(const cm_kstage *s) {
  if (s->tmpl != CM_KT_GEMM || s->accumulate || s->acc_dtype != CM_F32 || s->n_red != 1 ||
      s->n_dom < 2 || s->n_dom + 1 + s->n_red > CM_KMAX_VARS)
    return 0;
  int64_t M = s->dom[s->n_dom - 2], Nn = s->dom[s->n_dom - 1], K = s->red[0], batch = 1;
  for (int d = 0; d < s->n_dom - 2; d++) batch *= s->dom[d];
  if (K < 1024 || batch * ((M + 239) / 240) * ((Nn + 511) / 512) >= 4) return 0;
  int64_t blocks = batch * ((M + 527) / 528) * ((Nn + 511) / 512);
  for (int S = 2; S <= 8; S++)
    if (K % S == 0 && K / S >= 256 && blocks * S >= 4) return S;
  return 0;
}

/* Splits stage si of k (k_split_of > 0); the new stages are si and si + 1. */
static void split_k_stage(cm_kernel *k, int si, int S, const cm_lower_opts *o) {
  cm_kstage old = k->stages[si];
  int nd = old.n_dom;
  int64_t K = old.red[0], Kp = K / S, mn = 1;
  for (int d = 0; d < nd; d++) mn *= old.dom[d];
  int P = cm_kernel_add_buffer(k, CM_KBUF_SCRATCH, CM_F32, S * mn, -1, k->scratch_bytes);
  k->buffers[P].read = k->buffers[P].written = true;
  k->scratch_bytes += (S * mn * 4 + 63) / 64 * 64;
  int *cmap = malloc(sizeof(int) * (size_t)(old.n_exprs > 0 ? old.n_exprs : 1));
  if (!cmap) abort();
  int vmap[CM_KMAX_VARS];
  char name[64];

  /* partial sums: dom [S, old dom..], red [K / S] */
  snprintf(name, sizeof name, "%.54s_kpart", old.name);
  cm_kstage *a = cm_kernel_add_stage(k, name);
  a->n_dom = nd + 1;
  a->dom[0] = S;
  for (int d = 0; d < nd; d++) a->dom[d + 1] = old.dom[d], vmap[d] = cm_kx_var(a, d + 1);
  a->n_red = 1;
  a->red[0] = Kp;
  a->red_op = CM_KRED_SUM;
  a->acc_dtype = CM_F32;
  vmap[nd] =
      cm_kx_iadd(a, cm_kx_imul(a, cm_kx_var(a, 0), cm_kx_iconst(a, Kp)), cm_kx_var(a, nd + 1));
  for (int e = 0; e < old.n_exprs; e++) cmap[e] = -1;
  a->gemm_a = copy_expr(a, k, &old, old.gemm_a, vmap, cmap);
  a->gemm_b = copy_expr(a, k, &old, old.gemm_b, vmap, cmap);
  a->body = cm_kx_op(a, CM_OP_MUL, CM_F32, a->gemm_a, a->gemm_b, -1);
  int lin = cm_kx_var(a, 0);
  for (int d = 0; d < nd; d++)
    lin = cm_kx_iadd(a, cm_kx_imul(a, lin, cm_kx_iconst(a, old.dom[d])), cm_kx_var(a, d + 1));
  a->stores[a->n_stores++] = (cm_kstore){P, lin, cm_kx_acc(a)};
  a->tmpl = CM_KT_GEMM;
  gemm_tiles(a, o);
  /* blocks as large as the caches allow: each packs its operands once per slice */
  int64_t M = old.dom[nd - 2], Nn = old.dom[nd - 1];
  int64_t mb = (M + 527) / 528, nb = (Nn + 511) / 512;
  a->tiles.mc = round_up((M + mb - 1) / mb, a->tiles.mr);
  a->tiles.nc = round_up((Nn + nb - 1) / nb, a->tiles.nr);
  finish_stage(a);

  /* the sum over s and the original stores */
  snprintf(name, sizeof name, "%.54s_ksum", old.name);
  cm_kstage *b = cm_kernel_add_stage(k, name);
  b->n_dom = nd;
  for (int d = 0; d < nd; d++) b->dom[d] = old.dom[d], vmap[d] = cm_kx_var(b, d);
  b->n_red = 1;
  b->red[0] = S;
  b->red_op = CM_KRED_SUM;
  b->acc_dtype = CM_F32;
  lin = cm_kx_var(b, nd);
  for (int d = 0; d < nd; d++)
    lin = cm_kx_iadd(b, cm_kx_imul(b, lin, cm_kx_iconst(b, old.dom[d])), cm_kx_var(b, d));
  b->body = cm_kx_load(b, k, P, lin);
  vmap[nd] = -1;
  for (int e = 0; e < old.n_exprs; e++) cmap[e] = -1;
  for (int i = 0; i < old.n_stores; i++)
    b->stores[b->n_stores++] =
        (cm_kstore){old.stores[i].buf, copy_expr(b, k, &old, old.stores[i].index, vmap, cmap),
                    copy_expr(b, k, &old, old.stores[i].value, vmap, cmap)};
  finish_stage(b);
  free(cmap);

  /* the two new stages take the old one's place */
  int n = k->n_stages;
  cm_kstage na = k->stages[n - 2], nbs = k->stages[n - 1];
  free(old.exprs);
  memmove(&k->stages[si + 2], &k->stages[si + 1], sizeof(cm_kstage) * (size_t)(n - 3 - si));
  k->stages[si] = na;
  k->stages[si + 1] = nbs;
  k->n_stages = n - 1;
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
  int m = cm_kx_op(s, CM_OP_MUL, n->type.dtype, a, b, -1);
  return ok < 0 ? m
                : cm_kx_op(s, CM_OP_SELECT, n->type.dtype, ok, m, cm_kx_const(s, n->type.dtype, 0));
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
  finish_stage(f);
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
  finish_stage(v);
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
    finish_stage(s);
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
  s->body = cm_kx_op(s, CM_OP_MUL, y->dtype, a, b, -1);
  if (!c->o || !c->o->no_templates) {
    s->tmpl = CM_KT_GEMM;
    s->gemm_a = a;
    s->gemm_b = b;
    gemm_tiles(s, c->o);
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
  s->body = cm_kx_op(s, CM_OP_MUL, w->dtype, a, b, -1);
  s->tmpl = CM_KT_GEMM;
  s->gemm_a = a;
  s->gemm_b = b;
  gemm_tiles(s, c->o);
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
    s->body = cm_kx_op(s, CM_OP_MUL, t->dtype, a, bb, -1);
    if (!c->o || !c->o->no_templates) {
      s->tmpl = CM_KT_GEMM;
      s->gemm_a = a;
      s->gemm_b = bb;
      gemm_tiles(s, c->o);
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
  finish_stage(s);
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

/* ---- attention spans ------------------------------------------------------- */

/* Whether stages [first, end) access buffer b, and whether any stage outside does. */
static void attn_uses(const cm_kernel *k, int b, int first, int end, bool *in, bool *out) {
  *in = *out = false;
  for (int si = 0; si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    bool hit = false;
    for (int e = 0; e < s->n_exprs && !hit; e++)
      hit = s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == b;
    for (int j = 0; j < s->n_stores && !hit; j++) hit = s->stores[j].buf == b;
    if (!hit) continue;
    if (si >= first && si < end)
      *in = true;
    else
      *out = true;
  }
}

/* The softmax scale: a constant factor of the first load of S in the stage after the first. */
static double attn_scale(const cm_kernel *k, int first) {
  if (first + 1 >= k->n_stages) return 0;
  const cm_kstage *s = &k->stages[first + 1];
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_OP || x->op != CM_OP_MUL || x->b < 0) continue;
    double v;
    if (s->exprs[x->a].kind == CM_KX_LOAD && cm_kx_is_const(s, x->b, &v)) return v;
  }
  return 0;
}

/* Query rows per block: about 48 rows (an S tile of 48 x N floats stays in L2
 * with N ~ 200), split evenly, a multiple of the register block's rows. */
static int attn_br(int64_t rows, int mr) {
  int64_t nblk = (rows + 47) / 48;
  int64_t br = (rows + nblk - 1) / nblk;
  br = (br + mr - 1) / mr * mr;
  return br >= rows ? (int)rows : (int)br;
}

/* ---- online-softmax streaming (forward spans) ---- */

/* The affine form of i64 expression e: coef[v] per variable plus *c0; false
 * when e is not affine (div, mod, select, ...), overflows, or the walk
 * exceeds *budget nodes (shared subexpressions are walked again). */
static bool attn_aff_walk(const cm_kstage *s, int e, int64_t *coef, int64_t *c0, int *budget) {
  if (e < 0 || e >= s->n_exprs || --*budget < 0) return false;
  const cm_kexpr *x = &s->exprs[e];
  memset(coef, 0, sizeof(int64_t) * CM_KMAX_VARS);
  *c0 = 0;
  if (x->dtype != CM_I64) return false;
  if (x->kind == CM_KX_CONST)
    return fabs(x->value) < 9e15 ? (*c0 = (int64_t)x->value, true) : false;
  if (x->kind == CM_KX_VAR) {
    if (x->var < 0 || x->var >= CM_KMAX_VARS) return false;
    coef[x->var] = 1;
    return true;
  }
  if (x->kind != CM_KX_OP || x->a < 0 || x->b < 0) return false;
  int64_t ca[CM_KMAX_VARS], cb[CM_KMAX_VARS], a0, b0;
  if (!attn_aff_walk(s, x->a, ca, &a0, budget) || !attn_aff_walk(s, x->b, cb, &b0, budget))
    return false;
  bool bad = false;
  switch (x->op) {
  case CM_OP_ADD:
  case CM_OP_SUB:
    for (int v = 0; v < CM_KMAX_VARS; v++)
      bad |= x->op == CM_OP_ADD ? __builtin_add_overflow(ca[v], cb[v], &coef[v])
                                : __builtin_sub_overflow(ca[v], cb[v], &coef[v]);
    bad |= x->op == CM_OP_ADD ? __builtin_add_overflow(a0, b0, c0)
                              : __builtin_sub_overflow(a0, b0, c0);
    return !bad;
  case CM_OP_MUL: {
    bool a_const = true, b_const = true;
    for (int v = 0; v < CM_KMAX_VARS; v++) a_const &= ca[v] == 0, b_const &= cb[v] == 0;
    if (!a_const && !b_const) return false;
    const int64_t *lin = b_const ? ca : cb;
    int64_t l0 = b_const ? a0 : b0, m = b_const ? b0 : a0;
    for (int v = 0; v < CM_KMAX_VARS; v++) bad |= __builtin_mul_overflow(lin[v], m, &coef[v]);
    bad |= __builtin_mul_overflow(l0, m, c0);
    return !bad;
  }
  default: return false;
  }
}

static bool attn_aff(const cm_kstage *s, int e, int64_t *coef, int64_t *c0) {
  int budget = 4096;
  return attn_aff_walk(s, e, coef, c0, &budget);
}

/* Whether index e of stage s is the canonical element of a value laid out
 * [batch..., rows, X]: (B * rows + v{rv}) * X + v{cv} (cv < 0 when X == 1),
 * B the linear batch index over dom0[0..nb). Variables of extent 1 are 0. */
static bool attn_canon(const cm_kstage *s, int e, const int64_t *dom0, int nb, int64_t rows, int rv,
                       int cv, int64_t X) {
  int64_t coef[CM_KMAX_VARS], c0;
  if (!attn_aff(s, e, coef, &c0) || c0 != 0) return false;
  int64_t want[CM_KMAX_VARS] = {0}, st = rows * X;
  for (int v = nb - 1; v >= 0; v--) want[v] = st, st *= dom0[v];
  want[rv] += X;
  if (cv >= 0) want[cv] += 1;
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    int64_t ext = v < s->n_dom ? s->dom[v] : s->red[v - s->n_dom];
    if (ext > 1 && coef[v] != want[v]) return false;
  }
  return true;
}

typedef struct fa_match {
  const cm_kernel *k;
  const int64_t *dom0; /* the first stage's batch extents */
  int nb;
  int64_t rows, keys;
} fa_match;

/* The batch vars of stage s (its row var follows them): n_dom - 2 for the
 * [batch, rows, keys or columns] stages, and for row statistics laid out
 * [batch, rows, 1]; n_dom - 1 for [batch, rows]. They must be the first
 * stage's batch, or all of extent 1 when that batch is one item (the
 * simplifier drops unit axes from some stages only). -1 when neither. */
static int fa_nbs(const cm_kstage *s, const int64_t *dom0, int nb, bool stat) {
  int n = s->n_dom - 2;
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) n = s->n_dom - 1;
  if (n < 0) return -1;
  int64_t bat = 1, sb = 1;
  for (int v = 0; v < nb; v++) bat *= dom0[v];
  for (int v = 0; v < n; v++) sb *= s->dom[v];
  if (n == nb && (nb == 0 || !memcmp(s->dom, dom0, sizeof(int64_t) * (size_t)nb))) return n;
  return bat == 1 && sb == 1 ? n : -1;
}

/* Every load in stage s (batch vars nbs) of one of bufs[0..n) reads f32 at
 * its canonical index (X = xs[i]; key or column var cv). */
static bool fa_loads_ok(const fa_match *m, const cm_kstage *s, int nbs, const int *bufs,
                        const int64_t *xs, int n, int cv) {
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_LOAD) continue;
    for (int i = 0; i < n; i++) {
      if (x->buf != bufs[i]) continue;
      if (x->dtype != CM_F32 || m->k->buffers[x->buf].dtype != CM_F32 ||
          !attn_canon(s, x->a, s->dom, nbs, m->rows, nbs, xs[i] > 1 ? cv : -1, xs[i]))
        return false;
    }
  }
  return true;
}

/* Whether stage s loads only buffers of bufs[0..n). */
static bool fa_loads_only(const cm_kstage *s, const int *bufs, int n) {
  for (int e = 0; e < s->n_exprs; e++) {
    if (s->exprs[e].kind != CM_KX_LOAD) continue;
    bool ok = false;
    for (int i = 0; i < n; i++) ok |= s->exprs[e].buf == bufs[i];
    if (!ok) return false;
  }
  return true;
}

/* Stage s is [batch, rows(, 1)] with one f32 store of ACC into a buffer at
 * its canonical row index, reducing over the keys; returns the buffer. */
static int fa_row_stat(const fa_match *m, const cm_kstage *s, cm_kreduce op, int *nbs) {
  *nbs = fa_nbs(s, m->dom0, m->nb, true);
  if (*nbs < 0 || s->n_red != 1 || s->red_op != op || s->red[0] != m->keys ||
      s->acc_dtype != CM_F32 || s->accumulate || s->n_stores != 1 || s->tmpl != CM_KT_NONE ||
      s->dom[*nbs] != m->rows)
    return -1;
  const cm_kstore *st = &s->stores[0];
  const cm_kexpr *v = &s->exprs[st->value];
  if (v->kind != CM_KX_ACC || v->dtype != CM_F32 || m->k->buffers[st->buf].dtype != CM_F32 ||
      !attn_canon(s, st->index, s->dom, *nbs, m->rows, *nbs, -1, 1))
    return -1;
  return st->buf;
}

/* Stage s is [batch, rows, keys] elementwise with one f32 store at the
 * canonical index; returns the buffer. */
static int fa_tile_store(const fa_match *m, const cm_kstage *s, int *nbs) {
  *nbs = fa_nbs(s, m->dom0, m->nb, false);
  if (*nbs < 0 || s->n_red != 0 || s->dom[*nbs] != m->rows || s->dom[*nbs + 1] != m->keys ||
      s->accumulate || s->n_stores != 1 || s->tmpl != CM_KT_NONE)
    return -1;
  const cm_kstore *st = &s->stores[0];
  if (s->exprs[st->value].dtype != CM_F32 || m->k->buffers[st->buf].dtype != CM_F32 ||
      !attn_canon(s, st->index, s->dom, *nbs, m->rows, *nbs, *nbs + 1, m->keys))
    return -1;
  return st->buf;
}

/* Expression e is E / l (or E * (1 / l), E * recip(l)) as loads of eb and lb. */
static bool fa_is_norm(const cm_kstage *s, int e, int eb, int lb) {
  const cm_kexpr *x = &s->exprs[e];
#define FA_LOAD(id, b) (s->exprs[id].kind == CM_KX_LOAD && s->exprs[id].buf == (b))
  if (x->kind != CM_KX_OP || x->dtype != CM_F32) return false;
  if (x->op == CM_OP_DIV) return FA_LOAD(x->a, eb) && FA_LOAD(x->b, lb);
  if (x->op != CM_OP_MUL) return false;
  for (int side = 0; side < 2; side++) {
    int ea = side ? x->b : x->a, rl = side ? x->a : x->b;
    const cm_kexpr *r = &s->exprs[rl];
    if (!FA_LOAD(ea, eb) || r->kind != CM_KX_OP || r->dtype != CM_F32) continue;
    double one;
    if (r->op == CM_OP_RECIP && FA_LOAD(r->a, lb)) return true;
    if (r->op == CM_OP_DIV && cm_kx_is_const(s, r->a, &one) && one == 1 && FA_LOAD(r->b, lb))
      return true;
  }
  return false;
#undef FA_LOAD
}

/* Whether the cone of expression e loads buffer b (operands have smaller ids:
 * one downward sweep). */
static bool fa_cone_loads(const cm_kstage *s, int e, int b) {
  if (e < 0 || e >= s->n_exprs) return false;
  bool *in = calloc((size_t)e + 1, sizeof *in), hit = false;
  if (!in) abort();
  in[e] = true;
  for (int i = e; i >= 0 && !hit; i--) {
    if (!in[i]) continue;
    const cm_kexpr *x = &s->exprs[i];
    hit = x->kind == CM_KX_LOAD && x->buf == b;
    int ops[3] = {x->a, x->b, x->c};
    for (int j = 0; j < 3; j++)
      if (ops[j] >= 0 && ops[j] < i && x->kind != CM_KX_VAR && x->kind != CM_KX_CONST)
        in[ops[j]] = true;
  }
  free(in);
  return hit;
}

/* Recognises the softmax structure of forward span a (first stage `first`):
 * S, max, exp, sum, then O and an optional P in either order; fills the
 * roles. False (a untouched) when the span is anything else. */
static bool fa_match_span(const cm_kernel *k, int first, cm_kattn *a) {
  const cm_kstage *s0 = &k->stages[first];
  int nb = a->nb;
  if (a->span != 5 && a->span != 6) return false;
  if (s0->n_dom != nb + 2 || s0->n_red != 1 || s0->acc_dtype != CM_F32 || s0->n_stores != 1 ||
      s0->dom[nb] != a->rows)
    return false;
  fa_match m = {k, s0->dom, nb, a->rows, s0->dom[nb + 1]};
  if (m.keys < 2) return false;
  /* S: one store of a function of ACC alone (a scale, a cast) at the canonical index */
  const cm_kstore *ss = &s0->stores[0];
  int sb = ss->buf;
  if (s0->exprs[ss->value].dtype != CM_F32 || k->buffers[sb].dtype != CM_F32 ||
      !attn_canon(s0, ss->index, s0->dom, nb, m.rows, nb, nb + 1, m.keys))
    return false;
  for (int e = 0; e < s0->n_exprs; e++)
    if (s0->exprs[e].kind == CM_KX_LOAD && fa_cone_loads(s0, ss->value, s0->exprs[e].buf))
      return false;
  int nbs;
  int64_t xs[2] = {m.keys, 1};
  /* m = rowmax(f(S)) */
  const cm_kstage *sm = &k->stages[first + 1];
  int mb = fa_row_stat(&m, sm, CM_KRED_MAX, &nbs);
  int bl[2] = {sb, -1};
  if (mb < 0 || !fa_loads_only(sm, bl, 1) || !fa_loads_ok(&m, sm, nbs, bl, xs, 1, sm->n_dom))
    return false;
  /* E = exp(g(S) - m) */
  const cm_kstage *se = &k->stages[first + 2];
  int eb = fa_tile_store(&m, se, &nbs);
  bl[1] = mb;
  if (eb < 0 || !fa_loads_only(se, bl, 2) || !fa_loads_ok(&m, se, nbs, bl, xs, 2, nbs + 1))
    return false;
  const cm_kexpr *ev = &se->exprs[se->stores[0].value];
  if (ev->kind != CM_KX_OP || ev->op != CM_OP_EXP) return false;
  const cm_kexpr *sub = &se->exprs[ev->a];
  if (sub->kind != CM_KX_OP || sub->op != CM_OP_SUB || sub->dtype != CM_F32 ||
      se->exprs[sub->b].kind != CM_KX_LOAD || se->exprs[sub->b].buf != mb ||
      fa_cone_loads(se, sub->a, mb))
    return false;
  /* l = rowsum(E) */
  const cm_kstage *sl = &k->stages[first + 3];
  int lb = fa_row_stat(&m, sl, CM_KRED_SUM, &nbs);
  const cm_kexpr *lbody = lb >= 0 ? &sl->exprs[sl->body] : NULL;
  if (!lbody || lbody->kind != CM_KX_LOAD || lbody->buf != eb || !fa_loads_only(sl, &eb, 1) ||
      !fa_loads_ok(&m, sl, nbs, &eb, xs, 1, sl->n_dom))
    return false;
  /* O = (E / l or P) V, and P = E / l before or after it */
  int so_i = -1, sp = -1, pb = -1;
  for (int si = first + 4; si < first + a->span; si++) {
    if (k->stages[si].tmpl == CM_KT_GEMM && so_i < 0)
      so_i = si;
    else if (sp < 0)
      sp = si;
    else
      return false;
  }
  if (so_i < 0) return false;
  int el[2] = {eb, lb};
  if (sp >= 0) {
    const cm_kstage *sq = &k->stages[sp];
    pb = fa_tile_store(&m, sq, &nbs);
    if (pb < 0 || !fa_is_norm(sq, sq->stores[0].value, eb, lb) || !fa_loads_only(sq, el, 2) ||
        !fa_loads_ok(&m, sq, nbs, el, xs, 2, nbs + 1))
      return false;
  }
  const cm_kstage *so = &k->stages[so_i];
  nbs = fa_nbs(so, s0->dom, nb, false);
  if (nbs < 0 || so->n_red != 1 || so->red_op != CM_KRED_SUM || so->acc_dtype != CM_F32 ||
      so->red[0] != m.keys || so->dom[nbs] != m.rows || so->accumulate || so->gemm_a < 0 ||
      so->gemm_b < 0)
    return false;
  int roles[5] = {sb, mb, eb, lb, pb};
  if (pb >= 0 && sp < so_i && so->exprs[so->gemm_a].kind == CM_KX_LOAD &&
      so->exprs[so->gemm_a].buf == pb) {
    if (!fa_loads_ok(&m, so, nbs, &pb, xs, 1, so->n_dom)) return false;
    for (int e = 0; e < so->n_exprs; e++) /* P read only as gemm_a */
      if (e != so->gemm_a && so->exprs[e].kind == CM_KX_LOAD && so->exprs[e].buf == pb)
        return false;
  } else if (!fa_is_norm(so, so->gemm_a, eb, lb) ||
             !fa_loads_ok(&m, so, nbs, el, xs, 2, so->n_dom)) {
    return false;
  }
  /* the operand V, the epilogue and the stores touch no role except through gemm_a */
  for (int r = 0; r < 5; r++) {
    if (roles[r] < 0) continue;
    for (int q = r + 1; q < 5; q++)
      if (roles[q] == roles[r]) return false;
    if (fa_cone_loads(so, so->gemm_b, roles[r])) return false;
    for (int j = 0; j < so->n_stores; j++)
      if (so->stores[j].buf == roles[r] || fa_cone_loads(so, so->stores[j].value, roles[r]) ||
          fa_cone_loads(so, so->stores[j].index, roles[r]))
        return false;
  }
  for (int j = 0; j < so->n_stores; j++)
    for (int si = first; si < first + a->span; si++)
      for (int e = 0; e < k->stages[si].n_exprs; e++)
        if (k->stages[si].exprs[e].kind == CM_KX_LOAD &&
            k->stages[si].exprs[e].buf == so->stores[j].buf)
          return false;
  a->st_max = first + 1, a->st_exp = first + 2, a->st_sum = first + 3;
  a->st_p = sp, a->st_out = so_i;
  a->buf_s = sb, a->buf_m = mb, a->buf_e = eb, a->buf_l = lb, a->buf_p = pb;
  a->keep = 0;
  for (int r = 0; r < 5; r++) {
    if (roles[r] < 0) continue;
    bool loc = false;
    for (int i = 0; i < a->n_local; i++) loc |= a->local[i] == roles[r];
    if (!loc) a->keep |= 1u << r;
  }
  return true;
}

static int64_t fa_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

/* ---- backward streaming ---- */

/* Which local buffer b is (index into a->local), or -1. */
static int fb_local(const cm_kattn *a, int b) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == b) return i;
  return -1;
}

/* Whether any stage of [first, end) stores into buffer b. */
static bool fb_span_writes(const cm_kernel *k, int first, int end, int b) {
  for (int si = first; si < end; si++)
    for (int j = 0; j < k->stages[si].n_stores; j++)
      if (k->stages[si].stores[j].buf == b) return true;
  return false;
}

/* Every load of stage s: a local tile at its canonical index with key var cv
 * (row var rv), a local row statistic at its canonical row, or a buffer the
 * span never writes. Row statistics refused when !stats. */
static bool fb_loads_ok(const cm_kernel *k, int first, int end, const cm_kattn *a,
                        const cm_kstage *s, int nbs, int rv, int cv, bool stats) {
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_LOAD) continue;
    int li = fb_local(a, x->buf);
    if (li < 0) {
      if (fb_span_writes(k, first, end, x->buf)) return false;
      continue;
    }
    if (x->dtype != CM_F32 || k->buffers[x->buf].dtype != CM_F32) return false;
    int64_t X = a->local_row[li];
    int64_t keys = k->stages[first].dom[a->nb + 1];
    if (X == 1) {
      if (!stats || !attn_canon(s, x->a, s->dom, nbs, a->rows, rv, -1, 1)) return false;
    } else if (X != keys || cv < 0 || !attn_canon(s, x->a, s->dom, nbs, a->rows, rv, cv, X)) {
      return false;
    }
  }
  return true;
}

/* Whether the cone of expression e of s loads a local buffer of a. */
static bool fb_cone_local(const cm_kstage *s, int e, const cm_kattn *a) {
  for (int i = 0; i < a->n_local; i++)
    if (fa_cone_loads(s, e, a->local[i])) return true;
  return false;
}

/* A GEMM of the backward span (not the first stage): its operand gemm_b and
 * its epilogue read no local buffer, its stores go to buffers the span never
 * reads, and gemm_a is a local tile at the canonical index with (row var,
 * key var) = (rv, cv), or reads no local buffer. */
static bool fb_gemm_ok(const cm_kernel *k, int first, int end, const cm_kattn *a,
                       const cm_kstage *s, int nbs, int rv, int cv) {
  if (fb_cone_local(s, s->gemm_b, a)) return false;
  const cm_kexpr *ga = &s->exprs[s->gemm_a];
  if (ga->kind == CM_KX_LOAD && fb_local(a, ga->buf) >= 0) {
    int li = fb_local(a, ga->buf);
    if (ga->dtype != CM_F32 || k->buffers[ga->buf].dtype != CM_F32 ||
        a->local_row[li] != k->stages[first].dom[a->nb + 1] ||
        !attn_canon(s, ga->a, s->dom, nbs, a->rows, rv, cv, a->local_row[li]))
      return false;
  } else if (fb_cone_local(s, s->gemm_a, a)) {
    return false;
  }
  for (int j = 0; j < s->n_stores; j++) {
    const cm_kstore *st = &s->stores[j];
    if (fb_local(a, st->buf) >= 0 || fb_cone_local(s, st->value, a) ||
        fb_cone_local(s, st->index, a))
      return false;
    for (int si = first; si < end; si++)
      for (int e = 0; e < k->stages[si].n_exprs; e++)
        if (k->stages[si].exprs[e].kind == CM_KX_LOAD && k->stages[si].exprs[e].buf == st->buf)
          return false;
  }
  return true;
}

/* Recognises a backward span that streams over key blocks and fills a->role. */
static bool fb_match_span(const cm_kernel *k, int first, cm_kattn *a) {
  const cm_kstage *s0 = &k->stages[first];
  int nb = a->nb, end = first + a->span;
  if (a->span > CM_KATTN_MAX_SPAN || a->br < a->rows || s0->n_dom != nb + 2 || s0->n_red != 1 ||
      s0->acc_dtype != CM_F32 || s0->n_stores != 1 || s0->dom[nb] != a->rows)
    return false;
  int64_t keys = s0->dom[nb + 1];
  if (keys < 2) return false;
  fa_match m = {k, s0->dom, nb, a->rows, keys};
  for (int i = 0; i < a->n_local; i++)
    if ((a->local_row[i] != keys && a->local_row[i] != 1) ||
        k->buffers[a->local[i]].dtype != CM_F32)
      return false;
  /* every local written by exactly one stage of the span, with one store */
  for (int i = 0; i < a->n_local; i++) {
    int writers = 0;
    for (int si = first; si < end; si++)
      for (int j = 0; j < k->stages[si].n_stores; j++)
        writers += k->stages[si].stores[j].buf == a->local[i];
    if (writers != 1) return false;
  }
  signed char role[CM_KATTN_MAX_SPAN];
  memset(role, 0, sizeof role);
  bool dep_stat[CM_KATTN_MAX_LOCAL] = {false};
  for (int si = first; si < end; si++) {
    const cm_kstage *s = &k->stages[si];
    int r = si - first, nbs, b;
    if (r == 0) {
      const cm_kstore *ss = &s->stores[0];
      if (fb_local(a, ss->buf) < 0 || a->local_row[fb_local(a, ss->buf)] != keys ||
          s->exprs[ss->value].dtype != CM_F32 || s->gemm_a < 0 || s->gemm_b < 0 ||
          !attn_canon(s, ss->index, s->dom, nb, a->rows, nb, nb + 1, keys) ||
          fb_cone_local(s, ss->value, a) || fb_cone_local(s, s->gemm_a, a) ||
          fb_cone_local(s, s->gemm_b, a))
        return false;
      for (int e = 0; e < s->n_exprs; e++)
        if (s->exprs[e].kind == CM_KX_LOAD && fa_cone_loads(s, ss->value, s->exprs[e].buf))
          return false;
      role[r] = CM_KATTN_ROLE_TILE;
    } else if (s->n_red == 0) {
      b = fa_tile_store(&m, s, &nbs);
      if (b < 0 || fb_local(a, b) < 0 || a->local_row[fb_local(a, b)] != keys ||
          !fb_loads_ok(k, first, end, a, s, nbs, nbs, nbs + 1, true))
        return false;
      int li = fb_local(a, b);
      for (int e = 0; e < s->n_exprs; e++) {
        if (s->exprs[e].kind != CM_KX_LOAD) continue;
        int lj = fb_local(a, s->exprs[e].buf);
        if (lj >= 0 && (a->local_row[lj] == 1 || dep_stat[lj])) dep_stat[li] = true;
      }
      role[r] = CM_KATTN_ROLE_TILE;
    } else if (s->tmpl != CM_KT_GEMM) {
      b = fa_row_stat(&m, s, s->red_op, &nbs);
      if (b < 0 || fb_local(a, b) < 0 || a->local_row[fb_local(a, b)] != 1 ||
          !fb_loads_ok(k, first, end, a, s, nbs, nbs, s->n_dom, false))
        return false;
      for (int e = 0; e < s->n_exprs; e++) {
        if (s->exprs[e].kind != CM_KX_LOAD) continue;
        int lj = fb_local(a, s->exprs[e].buf);
        if (lj >= 0 && dep_stat[lj]) return false;
      }
      role[r] = CM_KATTN_ROLE_ROWRED;
    } else {
      nbs = fa_nbs(s, s0->dom, nb, false);
      if (nbs < 0 || s->n_dom != nbs + 2 || s->n_red != 1 || s->red_op != CM_KRED_SUM ||
          s->acc_dtype != CM_F32 || s->accumulate || s->gemm_a < 0 || s->gemm_b < 0)
        return false;
      if (s->dom[nbs] == a->rows && s->red[0] == keys &&
          fb_gemm_ok(k, first, end, a, s, nbs, nbs, s->n_dom))
        role[r] = CM_KATTN_ROLE_GEMM_ROWS;
      else if (s->dom[nbs] == keys && s->red[0] == a->rows &&
               fb_gemm_ok(k, first, end, a, s, nbs, s->n_dom, nbs))
        role[r] = CM_KATTN_ROLE_GEMM_KEYS;
      else
        return false;
    }
  }
  memcpy(a->role, role, sizeof role);
  return true;
}

int64_t cm_kattn_bwd_stream_workspace(const cm_kernel *k, int first, int mr, int nr,
                                      int64_t fixed[4], int64_t *local_off, int64_t *stage_off) {
  if (!k || first < 0 || first >= k->n_stages || mr < 1 || nr < 1) return 0;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (s0->tmpl != CM_KT_ATTENTION_BWD || !a->stream || a->span < 2 || a->span > CM_KATTN_MAX_SPAN ||
      first + a->span > k->n_stages || s0->n_red != 1 || s0->n_dom < 2 || a->bc < 1 ||
      a->n_local < 0 || a->n_local > CM_KATTN_MAX_LOCAL)
    return 0;
  int64_t rows = a->rows, rp = fa_up(rows, mr), bc = a->bc, ldt = fa_up(bc, nr);
  int64_t bcm = fa_up(bc, mr), d = s0->red[0];
  int64_t am = 0, bm = d * ldt, cm = rp * ldt;
  int64_t o = 0;
  for (int r = 0; r < a->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    if (stage_off) stage_off[r] = 0;
    if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS && a->role[r] != CM_KATTN_ROLE_GEMM_KEYS) continue;
    if (s->n_dom < 2) return 0;
    int64_t cp = fa_up(s->dom[s->n_dom - 1], nr);
    if (a->role[r] == CM_KATTN_ROLE_GEMM_ROWS) {
      am = am > rp * bc ? am : rp * bc;
      bm = bm > bc * cp ? bm : bc * cp;
    } else {
      am = am > bcm * rows ? am : bcm * rows;
      cm = cm > bcm * cp ? cm : bcm * cp;
    }
  }
  int64_t sz[4] = {rp * d, am, bm, cm};
  for (int i = 0; i < 4; i++) {
    if (fixed) fixed[i] = o;
    o += fa_up(4 * (sz[i] > 0 ? sz[i] : 1), 64);
  }
  for (int i = 0; i < a->n_local; i++) {
    if (local_off) local_off[i] = o;
    o += fa_up(4 * (a->local_row[i] == 1 ? rp : rp * ldt), 64);
  }
  for (int r = 0; r < a->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS && a->role[r] != CM_KATTN_ROLE_GEMM_KEYS) continue;
    int64_t cp = fa_up(s->dom[s->n_dom - 1], nr);
    if (stage_off) stage_off[r] = o;
    o += fa_up(4 * (a->role[r] == CM_KATTN_ROLE_GEMM_ROWS ? rp * cp : rows * cp), 64);
  }
  return o + 64;
}

cm_status cm_kattn_stream_check(const cm_kernel *k, int first, cm_err *err) {
  if (!k || first < 0 || first >= k->n_stages)
    return cm_errorf(err, CM_EINVALID, "cm_kattn_stream_check: no kernel or stage %d out of range",
                     first);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (s0->tmpl == CM_KT_ATTENTION_BWD && a->stream) {
    cm_status st = cm_kattn_check(k, first, err);
    if (st != CM_OK) return st;
    int64_t keys = s0->n_dom >= 2 ? s0->dom[s0->n_dom - 1] : 0;
    if (a->bc < 1 || a->bc >= keys)
      return cm_errorf(err, CM_EINVALID, "kernel %s stage %d: key block bc %d not in [1, %lld)",
                       k->name, first, a->bc, (long long)keys);
    cm_kattn t = *a;
    if (!fb_match_span(k, first, &t))
      return cm_errorf(err, CM_EINVALID,
                       "kernel %s stage %d: the backward span is not key-block streamable (tiles, "
                       "row reductions, GEMMs over rows or keys at canonical indices)",
                       k->name, first);
    if (memcmp(t.role, a->role, sizeof t.role))
      return cm_errorf(err, CM_EINVALID,
                       "kernel %s stage %d: the recorded stage roles differ from the span's",
                       k->name, first);
    return CM_OK;
  }
  if (s0->tmpl != CM_KT_ATTENTION_FWD || !a->stream)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: not a streaming forward attention span (template %d, "
                     "stream %d)",
                     k->name, first, (int)s0->tmpl, (int)a->stream);
  cm_status st = cm_kattn_check(k, first, err);
  if (st != CM_OK) return st;
  int64_t keys = s0->n_dom >= 2 ? s0->dom[s0->n_dom - 1] : 0;
  if (a->bc < 1 || a->bc >= keys)
    return cm_errorf(err, CM_EINVALID, "kernel %s stage %d: key block bc %d not in [1, %lld)",
                     k->name, first, a->bc, (long long)keys);
  cm_kattn t = *a;
  if (!fa_match_span(k, first, &t))
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: the span is not S, max, exp, sum, [P], O of a softmax "
                     "with canonical role indices",
                     k->name, first);
  if (t.st_max != a->st_max || t.st_exp != a->st_exp || t.st_sum != a->st_sum ||
      t.st_p != a->st_p || t.st_out != a->st_out || t.buf_s != a->buf_s || t.buf_m != a->buf_m ||
      t.buf_e != a->buf_e || t.buf_l != a->buf_l || t.buf_p != a->buf_p || t.keep != a->keep)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: the recorded streaming roles (stages, buffers, keep) "
                     "differ from the span's",
                     k->name, first);
  return CM_OK;
}

int64_t cm_kattn_stream_workspace(const cm_kernel *k, int first, int mr, int nr, int64_t *off) {
  if (!k || first < 0 || first >= k->n_stages || mr < 1 || nr < 1) return 0;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (s0->tmpl != CM_KT_ATTENTION_FWD || !a->stream || a->st_out < first ||
      a->st_out >= k->n_stages || a->bc < 1 || s0->n_red != 1 || s0->n_dom < 2)
    return 0;
  const cm_kstage *so = &k->stages[a->st_out];
  if (so->n_dom < 2) return 0;
  int64_t br = a->br < a->rows ? a->br : a->rows, brp = fa_up(br, mr);
  int64_t d = s0->red[0], dv = so->dom[so->n_dom - 1], bc = a->bc;
  int64_t sz[8] = {brp * d,
                   d * fa_up(bc, nr) > bc * fa_up(dv, nr) ? d * fa_up(bc, nr) : bc * fa_up(dv, nr),
                   brp * fa_up(bc, nr),
                   brp * bc,
                   brp * fa_up(dv, nr),
                   brp,
                   brp,
                   brp};
  int64_t o = 0;
  for (int i = 0; i < 8; i++) {
    if (off) off[i] = o;
    o += fa_up(4 * sz[i], 64);
  }
  return o + 64;
}

/* The key block: forced by the options, else whole key rows while the span's
 * tiles of br x keys fit a per-thread budget (L2-sized), else 64 keys. */
static void fa_choose(cm_kernel *k, int first, const cm_lower_opts *o, int mr, int nr) {
  cm_kstage *s0 = &k->stages[first];
  cm_kattn *a = &s0->attn;
  a->stream = false;
  a->st_max = a->st_exp = a->st_sum = a->st_p = a->st_out = -1;
  a->buf_s = a->buf_m = a->buf_e = a->buf_l = a->buf_p = -1;
  a->keep = 0;
  memset(a->role, 0, sizeof a->role);
  int64_t keys = s0->n_dom >= 2 ? s0->dom[s0->n_dom - 1] : a->rows;
  a->bc = (int)keys;
  int64_t bc = keys;
  if (o && o->attn_bc > 0)
    bc = o->attn_bc < keys ? o->attn_bc : keys;
  else if (a->ws_bytes > ((int64_t)512 << 10))
    bc = 64 < keys ? 64 : keys;
  if (bc >= keys) return;
  cm_kattn t = *a;
  if (s0->tmpl == CM_KT_ATTENTION_BWD) {
    if (!fb_match_span(k, first, &t)) return;
    t.stream = true;
    t.bc = (int)bc;
    *a = t;
    a->ws_bytes = cm_kattn_bwd_stream_workspace(k, first, mr, nr, NULL, NULL, NULL);
    return;
  }
  if (!fa_match_span(k, first, &t)) return;
  t.stream = true;
  t.bc = (int)bc;
  *a = t;
  a->ws_bytes = cm_kattn_stream_workspace(k, first, mr, nr, NULL);
}

/* Marks the longest span of an attention group's stages, from its first GEMM
 * stage, that fuses (cm_kattn_check holds); row blocks when every stage is
 * local to the query row, else whole batch items. Leaves the kernel as is when
 * no span holds. */
static void mark_attention(cm_kernel *k, const cm_lower_opts *o) {
  if (o && o->no_templates) return;
  int first = -1;
  for (int si = 0; si < k->n_stages && first < 0; si++)
    if (k->stages[si].tmpl == CM_KT_GEMM) first = si;
  if (first < 0) return;
  cm_kstage *s0 = &k->stages[first];
  if (s0->n_dom < 2 || s0->red_op != CM_KRED_SUM) return;
  cm_kstage saved = *s0;
  int nb = s0->n_dom - 2;
  int64_t rows = s0->dom[nb];
  int mr = s0->tiles.mr > 0 ? s0->tiles.mr : 6, nr = s0->tiles.nr > 0 ? s0->tiles.nr : 16;
  int n_max = 0;
  for (int end = k->n_stages; end >= first + 2; end--) {
    cm_kattn a;
    memset(&a, 0, sizeof a);
    a.span = end - first;
    a.nb = nb;
    a.rows = rows;
    a.bc = (int)(rows < 64 ? rows : 64);
    a.scale = attn_scale(k, first);
    int64_t bat = 1;
    for (int v = 0; v < nb; v++) bat *= s0->dom[v];
    bool ok = true;
    for (int b = 0; b < k->n_buffers && ok; b++) {
      if (k->buffers[b].kind != CM_KBUF_SCRATCH) continue;
      bool in, out;
      attn_uses(k, b, first, end, &in, &out);
      if (!in || out) continue;
      if (a.n_local == CM_KATTN_MAX_LOCAL || k->buffers[b].numel % (bat * rows)) {
        ok = false;
        break;
      }
      a.local_row[a.n_local] = k->buffers[b].numel / (bat * rows);
      a.local[a.n_local++] = b;
    }
    if (!ok || a.n_local == 0) continue;
    n_max = 0;
    for (int si = first; si < end; si++) n_max += k->stages[si].red_op == CM_KRED_MAX;
    for (int pass = 0; pass < 2; pass++) {
      a.br = pass == 0 ? attn_br(rows, mr) : (int)rows;
      if (pass == 1 && a.br == attn_br(rows, mr)) break;
      s0->tmpl = n_max > 0 ? CM_KT_ATTENTION_FWD : CM_KT_ATTENTION_BWD;
      s0->attn = a;
      s0->n_parallel = nb;
      cm_err e;
      if (cm_kattn_check(k, first, &e) == CM_OK) {
        s0->attn.ws_bytes = cm_kattn_workspace(k, first, mr, nr, NULL, NULL);
        fa_choose(k, first, o, mr, nr);
        return;
      }
    }
    *s0 = saved;
  }
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
  finish_stage(s);
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
  finish_stage(s);
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
  for (int i = 0; i < gr->n_inputs && c.st == CM_OK; i++) {
    int id = gr->inputs[i];
    const cm_node *n = &g->nodes[id];
    int64_t numel = cm_type_numel(&n->type);
    if (n->op == CM_OP_INPUT || n->op == CM_OP_PARAM || n->op == CM_OP_STATE)
      c.buf_of[id] = source_buf(out, n->type.dtype, numel, id);
    else if (n->op == CM_OP_ASSIGN)
      c.buf_of[id] = source_buf(out, n->type.dtype, numel, n->inputs[0]);
    else if (n->op == CM_OP_CONST && n->attrs.data)
      c.buf_of[id] = cm_kernel_add_buffer(out, CM_KBUF_CONST, n->type.dtype, numel, id, 0);
    else if (p->offset[id] < 0)
      fail(&c, CM_EINTERNAL, id, "group input has no arena offset");
    else
      c.buf_of[id] =
          cm_kernel_add_buffer(out, CM_KBUF_ARENA, n->type.dtype, numel, id, p->offset[id]);
  }
  /* consts with data inside the group read their own buffer too */
  for (int i = 0; i < gr->n_nodes && c.st == CM_OK; i++) {
    int id = gr->nodes[i];
    const cm_node *n = &g->nodes[id];
    if (n->op == CM_OP_CONST && n->attrs.data && c.buf_of[id] < 0)
      c.buf_of[id] =
          cm_kernel_add_buffer(out, CM_KBUF_CONST, n->type.dtype, cm_type_numel(&n->type), id, 0);
  }
  int *out_buf = calloc((size_t)gr->n_outputs + 1, sizeof(int));
  if (!out_buf) abort();
  for (int i = 0; i < gr->n_outputs && c.st == CM_OK; i++) {
    int id = gr->outputs[i];
    const cm_node *n = &g->nodes[id];
    int64_t numel = cm_type_numel(&n->type);
    if (n->op == CM_OP_ASSIGN)
      out_buf[i] = source_buf(out, n->type.dtype, numel, n->inputs[0]);
    else if (p->offset[id] < 0)
      fail(&c, CM_EINTERNAL, id, "group output has no arena offset");
    else
      out_buf[i] =
          cm_kernel_add_buffer(out, CM_KBUF_ARENA, n->type.dtype, numel, id, p->offset[id]);
  }
  bool *done = calloc((size_t)gr->n_outputs + 1, sizeof(bool));
  if (!done) abort();
  if (c.st == CM_OK && gr->kind == CM_GROUP_ATTENTION && !(o && o->no_templates)) mark_shared(&c);
  /* materialized nodes, in topological order */
  for (int i = 0; i < gr->n_nodes && c.st == CM_OK; i++) {
    int id = gr->nodes[i];
    const cm_node *n = &g->nodes[id];
    if (!is_mat(&c, id)) continue;
    c.written = realloc(c.written, sizeof(bool) * (size_t)out->n_buffers);
    if (!c.written) abort();
    memset(c.written, 0, sizeof(bool) * (size_t)out->n_buffers);
    if (c.shared && c.shared[id]) {
      lower_shared(&c, id, out_buf);
      continue;
    }
    /* a reduction of a group output (a bias gradient of the stored input gradient):
       the output's stage first, and the reduction reads the one stored array instead
       of recomputing the value from all of its operands */
    if ((n->op == CM_OP_REDUCE_SUM || n->op == CM_OP_REDUCE_MAX) && !(o && o->no_templates) &&
        !is_mat(&c, n->inputs[0]) && c.buf_of[n->inputs[0]] < 0) {
      bool src = false;
      int jx = -1;
      for (int j = 0; j < gr->n_outputs; j++) {
        src |= out->buffers[out_buf[j]].kind == CM_KBUF_SOURCE;
        if (gr->outputs[j] == n->inputs[0] && !done[j]) jx = j;
      }
      char *seen = jx >= 0 && !src ? calloc((size_t)g->n_nodes, 1) : NULL;
      if (seen && cone_ready(&c, n->inputs[0], seen)) {
        output_stage(&c, jx, out_buf, done, true);
        if (done[jx]) c.buf_of[n->inputs[0]] = out_buf[jx];
      }
      free(seen);
      if (c.st != CM_OK) break;
    }
    int eo[CM_KMAX_STORES], eb[CM_KMAX_STORES];
    int ne = find_epilogue(&c, id, out_buf, done, eo, eb);
    if (ne > 0 && lower_materialized(&c, id, -1, eo, eb, ne) == CM_OK) {
      for (int e = 0; e < ne; e++) {
        c.buf_of[eo[e]] = eb[e];
        for (int j = 0; j < gr->n_outputs; j++)
          if (gr->outputs[j] == eo[e]) done[j] = true;
      }
      continue;
    }
    if (c.st != CM_OK) break;
    int b = -1;
    for (int j = 0; j < gr->n_outputs; j++)
      if (gr->outputs[j] == id) b = out_buf[j];
    if (b < 0) {
      int64_t bytes = cm_type_numel(&n->type) * (int64_t)cm_dtype_size(n->type.dtype);
      b = cm_kernel_add_buffer(out, CM_KBUF_SCRATCH, n->type.dtype, cm_type_numel(&n->type), id,
                               out->scratch_bytes);
      out->scratch_bytes += (bytes + 63) / 64 * 64;
    }
    c.written = realloc(c.written, sizeof(bool) * (size_t)out->n_buffers);
    if (!c.written) abort();
    memset(c.written, 0, sizeof(bool) * (size_t)out->n_buffers);
    lower_materialized(&c, id, b, NULL, NULL, 0);
    c.buf_of[id] = b;
  }
  /* remaining outputs: one stage per distinct shape */
  c.written = realloc(c.written, sizeof(bool) * (size_t)out->n_buffers + 1);
  if (!c.written) abort();
  memset(c.written, 0, sizeof(bool) * (size_t)out->n_buffers);
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
  if (c.st == CM_OK && gr->kind != CM_GROUP_ATTENTION && !o->no_templates &&
      o->target->kind != CM_TARGET_CUDA)
    for (int si = 0; si < out->n_stages; si++) {
      int S = k_split_of(&out->stages[si]);
      if (S > 0) split_k_stage(out, si++, S, o);
    }
  /* flattened-then-unflattened indices become affine: the renderers vectorize them */
  for (int i = 0; i < out->n_stages && c.st == CM_OK; i++)
    c.st = cm_kstage_simplify(&out->stages[i], err);
  if (c.st == CM_OK && gr->kind == CM_GROUP_ATTENTION) mark_attention(out, o);
  if (c.st == CM_OK && o->target->kind == CM_TARGET_CUDA)
    c.st = cm_cuda_plan_kernel(out, o->target, err);
  if (c.st == CM_OK) c.st = cm_kernel_verify(out, err);
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
