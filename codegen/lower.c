/* codegen/lower.c — fusion groups to the kernel IR.
 *
 * Elementwise and movement nodes are inlined into the expressions of their
 * consumers (value(): a node's value at a per-axis index). Reductions,
 * contractions and scatter-adds are materialized: each gets a stage writing a
 * group output or a scratch buffer, read back by later stages. Matmuls and
 * one-group convolutions (and their adjoints) become CM_KT_GEMM stages. A
 * group output that is an elementwise function of one materialized node read
 * at that node's own index is stored by the node's stage itself (the
 * epilogue), so a GEMM + bias + GELU or a reduction + scaling is one pass. */
#include "codegen.h"

#include <stdlib.h>
#include <string.h>

typedef struct memo_entry {
  int node, rank, expr;
  int idx[CM_MAX_RANK];
} memo_entry;

typedef struct lw {
  const cm_graph *g;
  const cm_plan *p;
  const cm_group *grp;
  int gid;
  cm_kernel *k;
  const cm_lower_opts *o;
  cm_err *err;
  bool failed;
  int *buf_of;     /* node -> kernel buffer holding its value (-1: none yet) */
  bool *in_group;  /* node -> member of this group */
  bool *is_output; /* node -> output of this group */
  int *out_buf;    /* node -> buffer its group output is stored into */
  /* the stage being built */
  cm_kstage *s;
  int s_index;
  memo_entry *memo;
  int n_memo, cap_memo;
  int acc_node;             /* node whose value at acc_idx is ACC (epilogue), -1 none */
  int acc_idx[CM_MAX_RANK]; /* its natural index in the stage */
  bool acc_miss;            /* the epilogue needed acc_node at another index */
  int *written_at;          /* buffer -> first stage that wrote it (-1) */
} lw;

static bool fail(lw *w, cm_status st, int node, const char *fmt, const char *detail) {
  if (w->failed) return false;
  w->failed = true;
  const cm_node *n = node >= 0 ? &w->g->nodes[node] : NULL;
  char shape[96] = "";
  if (n) cm_type_str(&n->type, shape, sizeof shape);
  cm_errorf(w->err, st, "group %d (%s) node \"%s\" (%s %s): %s%s", w->gid,
            cm_group_kind_name(w->grp->kind), n ? n->name : "-",
            n ? cm_op_get_info(n->op)->name : "-", shape, fmt, detail ? detail : "");
  return false;
}

static bool is_source(cm_op op) {
  return op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE;
}

static bool is_heavy(cm_op op) {
  return op == CM_OP_REDUCE_SUM || op == CM_OP_REDUCE_MAX || op == CM_OP_MATMUL ||
         op == CM_OP_CONV2D || op == CM_OP_CONV2D_GRAD_INPUT || op == CM_OP_CONV2D_GRAD_WEIGHT ||
         op == CM_OP_SCATTER_ADD;
}

/* The state an assign writes (through chains of assigns, which schedule forbids anyway). */
static int assign_target(const cm_graph *g, int node) {
  while (g->nodes[node].op == CM_OP_ASSIGN) node = g->nodes[node].inputs[0];
  return node;
}

/* The buffer holding a value read from memory: sources and assigns have their
 * own (the state's), everything else lives in the arena. */
static int input_buffer(lw *w, int node) {
  if (w->buf_of[node] >= 0) return w->buf_of[node];
  const cm_node *n = &w->g->nodes[node];
  int b;
  if (is_source(n->op) || n->op == CM_OP_ASSIGN) {
    int st = assign_target(w->g, node);
    /* one buffer per state even when read both as the state and as its assign */
    if (w->buf_of[st] >= 0 && w->k->buffers[w->buf_of[st]].kind == CM_KBUF_SOURCE) {
      b = w->buf_of[st];
    } else {
      b = cm_kernel_add_buffer(w->k, CM_KBUF_SOURCE, w->g->nodes[st].type.dtype,
                               cm_type_numel(&w->g->nodes[st].type), st, 0);
      if (!w->in_group[st]) w->buf_of[st] = b;
    }
  } else if (n->op == CM_OP_CONST && n->attrs.data) {
    b = cm_kernel_add_buffer(w->k, CM_KBUF_CONST, n->type.dtype, cm_type_numel(&n->type), node, 0);
  } else {
    int64_t off = w->p->offset ? w->p->offset[node] : -1;
    if (off < 0) {
      fail(w, CM_EINTERNAL, node, "a group input without an arena offset (run memplan first)",
           NULL);
      return -1;
    }
    b = cm_kernel_add_buffer(w->k, CM_KBUF_ARENA, n->type.dtype, cm_type_numel(&n->type), node,
                             off);
  }
  w->k->buffers[b].read = true;
  w->buf_of[node] = b;
  return b;
}

/* ---- index arithmetic ------------------------------------------------------ */

static int linearize(cm_kstage *s, const cm_type *t, const int *idx) {
  int lin = cm_kx_iconst(s, 0);
  for (int a = 0; a < t->rank; a++)
    lin = cm_kx_iadd(s, cm_kx_imul(s, lin, cm_kx_iconst(s, t->dims[a])), idx[a]);
  return lin;
}

static void delinearize(cm_kstage *s, const cm_type *t, int lin, int *idx) {
  for (int a = t->rank - 1; a >= 0; a--) {
    if (a == 0) {
      idx[a] = lin;
    } else {
      int d = cm_kx_iconst(s, t->dims[a]);
      idx[a] = cm_kx_imod(s, lin, d);
      lin = cm_kx_idiv(s, lin, d);
    }
  }
}

static int imin(cm_kstage *s, int a, int b) {
  return cm_kx_op(s, CM_OP_MIN, CM_I64, a, b, -1);
}
static int imax(cm_kstage *s, int a, int b) {
  return cm_kx_op(s, CM_OP_MAX, CM_I64, a, b, -1);
}
static int clamp(cm_kstage *s, int x, int64_t hi) {
  return imin(s, imax(s, x, cm_kx_iconst(s, 0)), cm_kx_iconst(s, hi - 1));
}
static int ilt(cm_kstage *s, int a, int b) {
  return cm_kx_op(s, CM_OP_LT, CM_BOOL, a, b, -1);
}
static int land(cm_kstage *s, int a, int b) {
  return cm_kx_op(s, CM_OP_SELECT, CM_BOOL, a, b, cm_kx_const(s, CM_BOOL, 0));
}
/* 0 <= x < hi */
static int in_range(cm_kstage *s, int x, int64_t hi) {
  return land(s, cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), x, -1),
              ilt(s, x, cm_kx_iconst(s, hi)));
}

/* ---- values ---------------------------------------------------------------- */

static int value(lw *w, int node, const int *idx);

static int load_node(lw *w, int node, const int *idx) {
  int b = input_buffer(w, node);
  if (b < 0) return -1;
  const cm_type *t = &w->g->nodes[node].type;
  if (w->k->buffers[b].numel != cm_type_numel(t))
    return fail(w, CM_EINTERNAL, node, "buffer size differs from the value's", NULL), -1;
  return cm_kx_load(w->s, w->k, b, linearize(w->s, t, idx));
}

static int memo_find(lw *w, int node, const int *idx, int rank) {
  for (int i = w->n_memo - 1; i >= 0; i--) {
    const memo_entry *m = &w->memo[i];
    if (m->node == node && m->rank == rank && !memcmp(m->idx, idx, sizeof(int) * (size_t)rank))
      return m->expr;
  }
  return -1;
}

static void memo_add(lw *w, int node, const int *idx, int rank, int expr) {
  if (w->n_memo == w->cap_memo) {
    int cap = w->cap_memo ? 2 * w->cap_memo : 256;
    memo_entry *m = realloc(w->memo, sizeof *m * (size_t)cap);
    if (!m) return; /* the memo is only a cache */
    w->memo = m;
    w->cap_memo = cap;
  }
  memo_entry *m = &w->memo[w->n_memo++];
  m->node = node;
  m->rank = rank;
  m->expr = expr;
  memcpy(m->idx, idx, sizeof(int) * (size_t)rank);
}

static int value_uncached(lw *w, int node, const int *idx) {
  const cm_graph *g = w->g;
  const cm_node *n = &g->nodes[node];
  cm_kstage *s = w->s;
  int r = n->type.rank;
  if (node == w->acc_node) {
    if (!memcmp(idx, w->acc_idx, sizeof(int) * (size_t)r)) return cm_kx_acc(s);
    w->acc_miss = true;
    return cm_kx_const(s, n->type.dtype, 0);
  }
  if (w->buf_of[node] >= 0 || !w->in_group[node] || is_source(n->op) ||
      (n->op == CM_OP_CONST && n->attrs.data))
    return load_node(w, node, idx);
  if (is_heavy(n->op))
    return fail(w, CM_EINTERNAL, node, "read before it was materialized", NULL), -1;
  const int *in = n->inputs;
  int sub[CM_MAX_RANK] = {0};
  switch (n->op) {
  case CM_OP_CONST: return cm_kx_const(s, n->type.dtype, n->attrs.value);
  case CM_OP_IOTA: {
    int ax = n->attrs.axis < 0 ? n->attrs.axis + r : n->attrs.axis;
    return cm_kx_op(s, CM_OP_CAST, n->type.dtype, idx[ax], -1, -1);
  }
  case CM_OP_STOP_GRADIENT: return value(w, in[0], idx);
  case CM_OP_ASSIGN: return value(w, in[1], idx);
  case CM_OP_ALL_REDUCE:
  case CM_OP_ALL_GATHER:
    if (n->attrs.ranks != 1)
      return fail(w, CM_EINVALID, node,
                  "needs a communicator (multi-rank runs come with the distributed executor)",
                  NULL),
             -1;
    return value(w, in[0], idx);
  case CM_OP_RESHAPE: {
    const cm_type *it = &g->nodes[in[0]].type;
    delinearize(s, it, linearize(s, &n->type, idx), sub);
    return value(w, in[0], sub);
  }
  case CM_OP_PERMUTE:
    for (int a = 0; a < r; a++) sub[n->attrs.perm[a]] = idx[a];
    return value(w, in[0], sub);
  case CM_OP_BROADCAST: {
    const cm_type *it = &g->nodes[in[0]].type;
    int lead = r - it->rank;
    for (int a = 0; a < it->rank; a++)
      sub[a] = it->dims[a] == 1 ? cm_kx_iconst(s, 0) : idx[a + lead];
    return value(w, in[0], sub);
  }
  case CM_OP_SLICE:
    for (int a = 0; a < r; a++)
      sub[a] = cm_kx_iadd(s, cm_kx_iconst(s, n->attrs.start[a]),
                          cm_kx_imul(s, idx[a], cm_kx_iconst(s, n->attrs.step[a])));
    return value(w, in[0], sub);
  case CM_OP_PAD: {
    const cm_type *it = &g->nodes[in[0]].type;
    int cond = -1;
    for (int a = 0; a < r; a++) {
      int x = cm_kx_iadd(s, idx[a], cm_kx_iconst(s, -n->attrs.lo[a]));
      if (n->attrs.lo[a] == 0 && n->attrs.hi[a] == 0) {
        sub[a] = x;
        continue;
      }
      int ok = in_range(s, x, it->dims[a]);
      cond = cond < 0 ? ok : land(s, cond, ok);
      sub[a] = clamp(s, x, it->dims[a]);
    }
    int v = value(w, in[0], sub);
    if (cond < 0 || v < 0) return v;
    return cm_kx_op(s, CM_OP_SELECT, n->type.dtype, cond, v,
                    cm_kx_const(s, n->type.dtype, n->attrs.value));
  }
  case CM_OP_CONCAT: {
    int ax = n->attrs.axis < 0 ? n->attrs.axis + r : n->attrs.axis;
    int64_t *offs = malloc(sizeof(int64_t) * (size_t)(n->n_inputs + 1));
    if (!offs) return fail(w, CM_EINTERNAL, node, "out of memory", NULL), -1;
    offs[0] = 0;
    for (int j = 0; j < n->n_inputs; j++) offs[j + 1] = offs[j] + g->nodes[in[j]].type.dims[ax];
    int result = -1;
    for (int j = n->n_inputs - 1; j >= 0 && !w->failed; j--) {
      memcpy(sub, idx, sizeof(int) * (size_t)r);
      int64_t len = g->nodes[in[j]].type.dims[ax];
      sub[ax] = clamp(s, cm_kx_iadd(s, idx[ax], cm_kx_iconst(s, -offs[j])), len);
      int v = value(w, in[j], sub);
      if (result < 0)
        result = v;
      else
        result = cm_kx_op(s, CM_OP_SELECT, n->type.dtype,
                          ilt(s, idx[ax], cm_kx_iconst(s, offs[j + 1])), v, result);
    }
    free(offs);
    return result;
  }
  case CM_OP_GATHER: {
    int ax = n->attrs.axis < 0 ? n->attrs.axis + r : n->attrs.axis;
    int iv = value(w, in[1], idx);
    if (iv < 0) return -1;
    memcpy(sub, idx, sizeof(int) * (size_t)r);
    int j = g->nodes[in[1]].type.dtype == CM_I64 ? iv : cm_kx_op(s, CM_OP_CAST, CM_I64, iv, -1, -1);
    /* the oracle refuses an index out of range; a kernel clamps it */
    sub[ax] = clamp(s, j, g->nodes[in[0]].type.dims[ax]);
    return value(w, in[0], sub);
  }
  default: break;
  }
  const cm_op_info *info = cm_op_get_info(n->op);
  if (info->category != CM_CAT_ELEMENTWISE)
    return fail(w, CM_EINTERNAL, node, "no lowering for this op inside a group", NULL), -1;
  int ops[3] = {-1, -1, -1};
  for (int i = 0; i < n->n_inputs && i < 3; i++) {
    ops[i] = value(w, in[i], idx);
    if (ops[i] < 0) return -1;
  }
  return cm_kx_op(s, n->op, n->type.dtype, ops[0], ops[1], ops[2]);
}

static int value(lw *w, int node, const int *idx) {
  if (w->failed) return -1;
  int r = w->g->nodes[node].type.rank;
  int e = memo_find(w, node, idx, r);
  if (e >= 0) return e;
  e = value_uncached(w, node, idx);
  if (e >= 0) memo_add(w, node, idx, r, e);
  return e;
}

/* ---- stages ---------------------------------------------------------------- */

static cm_kstage *begin_stage(lw *w, const char *what, int node) {
  char name[64];
  snprintf(name, sizeof name, "%s_%d", what, node);
  w->s = cm_kernel_add_stage(w->k, name);
  w->s_index = w->k->n_stages - 1;
  w->n_memo = 0;
  w->acc_node = -1;
  w->acc_miss = false;
  return w->s;
}

static int acc_dtype_for(cm_dtype dt) {
  if (dt == CM_F64) return CM_F64;
  if (cm_dtype_is_int(dt)) return CM_I64;
  if (dt == CM_BOOL) return CM_I64;
  return CM_F32;
}

static void set_parallel(cm_kstage *s) {
  if (s->accumulate || s->n_dom == 0) {
    s->n_parallel = 0;
    return;
  }
  int64_t prod = 1;
  int p = 0;
  while (p < s->n_dom && prod < 1024) prod *= s->dom[p++];
  s->n_parallel = p;
}

static int64_t roundup(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

static void set_tiles(lw *w, cm_kstage *s) {
  int64_t M = s->dom[s->n_dom - 2], N = s->dom[s->n_dom - 1], K = s->red[0];
  cm_kgemm_tiles t;
  if (w->o->target == CM_TARGET_CUDA) {
    t.mr = 32, t.nr = 32, t.mc = 64, t.nc = 64, t.kc = 16;
    t.mc = (int)(roundup(M, t.mr) < t.mc ? roundup(M, t.mr) : t.mc);
    t.nc = (int)(roundup(N, t.nr) < t.nc ? roundup(N, t.nr) : t.nc);
  } else {
    /* measured best on an AVX-512 host (bench/gemm): a 6 x 64 register block */
#if defined(__x86_64__)
    bool avx512 = __builtin_cpu_supports("avx512f");
#else
    bool avx512 = false;
#endif
    t.mr = 6, t.nr = avx512 ? 64 : 16, t.kc = 128, t.mc = 240, t.nc = avx512 ? 512 : 256;
    t.mc = (int)(roundup(M, t.mr) < t.mc ? roundup(M, t.mr) : t.mc);
    t.nc = (int)(roundup(N, t.nr) < t.nc ? roundup(N, t.nr) : t.nc);
  }
  t.kc = (int)(K < t.kc ? K : t.kc);
  s->tiles = t;
}

/* Where a materialized node is stored: its group-output buffer or new scratch. */
static int result_buffer(lw *w, int node) {
  if (w->is_output[node]) return w->out_buf[node];
  const cm_type *t = &w->g->nodes[node].type;
  int64_t bytes = (int64_t)cm_type_nbytes(t);
  int b = cm_kernel_add_buffer(w->k, CM_KBUF_SCRATCH, t->dtype, cm_type_numel(t), node,
                               w->k->scratch_bytes);
  w->k->scratch_bytes += (bytes + 63) / 64 * 64;
  return b;
}

static void add_store(lw *w, int buf, int index, int val) {
  cm_kstage *s = w->s;
  if (s->n_stores >= CM_KMAX_STORES) {
    fail(w, CM_EINTERNAL, -1, "too many stores in one stage", NULL);
    return;
  }
  s->stores[s->n_stores++] = (cm_kstore){buf, index, val};
  w->k->buffers[buf].written = true;
  if (w->written_at[buf] < 0) w->written_at[buf] = w->s_index;
}

/* Tries to store every group output downstream of heavy node h (all with h's
 * shape, reading h only at its natural index) in h's stage. */
static bool try_epilogue(lw *w, int h, const int *nat, bool *fused) {
  const cm_graph *g = w->g;
  const cm_group *grp = w->grp;
  /* downstream members of h within the group */
  bool *down = calloc((size_t)g->n_nodes, sizeof *down);
  if (!down) return false;
  down[h] = true;
  bool ok = !w->is_output[h];
  int n_outs = 0;
  for (int i = 0; i < grp->n_nodes && ok; i++) {
    int v = grp->nodes[i];
    if (v == h) continue;
    const cm_node *n = &g->nodes[v];
    bool reads = false;
    for (int k = 0; k < n->n_inputs; k++) reads |= down[n->inputs[k]];
    if (!reads) continue;
    down[v] = true;
    for (int k = 0; k < n->n_inputs; k++) { /* another heavy node not in memory yet */
      int u = n->inputs[k];
      if (u != h && w->in_group[u] && is_heavy(g->nodes[u].op) && w->buf_of[u] < 0) ok = false;
    }
    if (is_heavy(n->op)) ok = false; /* a later heavy node needs h in memory */
    if (w->is_output[v]) {
      if (!cm_shape_equal(&n->type, &g->nodes[h].type) || n->op == CM_OP_ASSIGN) ok = false;
      n_outs++;
    }
  }
  if (!ok || n_outs == 0 || n_outs > CM_KMAX_STORES - w->s->n_stores) {
    free(down);
    return false;
  }
  int saved_exprs = w->s->n_exprs, saved_stores = w->s->n_stores;
  w->acc_node = h;
  memcpy(w->acc_idx, nat, sizeof(int) * CM_MAX_RANK);
  w->n_memo = 0;
  for (int i = 0; i < grp->n_nodes && !w->acc_miss && !w->failed; i++) {
    int v = grp->nodes[i];
    if (v == h || !down[v] || !w->is_output[v]) continue;
    int val = value(w, v, nat);
    if (val < 0) break;
    int b = w->out_buf[v];
    add_store(w, b, linearize(w->s, &g->nodes[v].type, nat), val);
  }
  bool done = !w->acc_miss && !w->failed;
  if (!done && !w->failed) { /* roll back: h gets materialized instead */
    w->s->n_exprs = saved_exprs;
    w->s->n_stores = saved_stores;
  } else if (done) {
    for (int i = 0; i < grp->n_nodes; i++)
      if (down[grp->nodes[i]] && w->is_output[grp->nodes[i]]) fused[grp->nodes[i]] = true;
  }
  w->acc_node = -1;
  w->acc_miss = false;
  w->n_memo = 0;
  free(down);
  return done;
}

/* A stage computing heavy node h; its natural index in the stage goes to nat. */
static bool heavy_stage(lw *w, int h, int *nat) {
  const cm_graph *g = w->g;
  const cm_node *n = &g->nodes[h];
  const cm_attrs *at = &n->attrs;
  cm_kstage *s = begin_stage(w, cm_op_get_info(n->op)->name, h);
  int r = n->type.rank;
  s->acc_dtype = (cm_dtype)acc_dtype_for(n->type.dtype);
  s->red_op = n->op == CM_OP_REDUCE_MAX ? CM_KRED_MAX : CM_KRED_SUM;
  int in_idx[CM_MAX_RANK];
  switch (n->op) {
  case CM_OP_REDUCE_SUM:
  case CM_OP_REDUCE_MAX: {
    const cm_type *it = &g->nodes[n->inputs[0]].type;
    bool red[CM_MAX_RANK] = {false};
    for (int i = 0; i < at->n_axes; i++)
      red[at->axes[i] < 0 ? at->axes[i] + it->rank : at->axes[i]] = true;
    s->n_dom = r;
    for (int a = 0; a < r; a++) s->dom[a] = n->type.dims[a];
    int oa = 0;
    for (int a = 0; a < it->rank; a++) {
      if (red[a]) {
        s->red[s->n_red] = it->dims[a];
        in_idx[a] = cm_kx_var(s, r + s->n_red);
        s->n_red++;
        if (at->keepdims) oa++;
      } else {
        in_idx[a] = cm_kx_var(s, oa++);
      }
    }
    for (int a = 0; a < r; a++) nat[a] = cm_kx_var(s, a);
    int b = value(w, n->inputs[0], in_idx);
    if (b < 0) return false;
    if (cm_kx_is_const(s, b, NULL) || s->exprs[b].dtype != s->acc_dtype)
      b = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, b, -1, -1);
    s->body = b;
    if (s->n_red == 0) { /* reducing no axis: a copy */
      s->red[0] = 1;
      s->n_red = 1;
    }
    return true;
  }
  case CM_OP_MATMUL: {
    const cm_type *ta = &g->nodes[n->inputs[0]].type, *tb = &g->nodes[n->inputs[1]].type;
    int64_t K = at->transpose_a ? ta->dims[ta->rank - 2] : ta->dims[ta->rank - 1];
    s->n_dom = r;
    for (int a = 0; a < r; a++) s->dom[a] = n->type.dims[a];
    s->n_red = 1;
    s->red[0] = K;
    for (int a = 0; a < r; a++) nat[a] = cm_kx_var(s, a);
    int vi = nat[r - 2], vj = nat[r - 1], vk = cm_kx_var(s, r);
    int ia[CM_MAX_RANK], ib[CM_MAX_RANK];
    for (int a = 0; a < ta->rank - 2; a++) {
      int oa = a + (r - ta->rank);
      ia[a] = ta->dims[a] == 1 ? cm_kx_iconst(s, 0) : nat[oa];
    }
    for (int a = 0; a < tb->rank - 2; a++) {
      int oa = a + (r - tb->rank);
      ib[a] = tb->dims[a] == 1 ? cm_kx_iconst(s, 0) : nat[oa];
    }
    ia[ta->rank - 2] = at->transpose_a ? vk : vi;
    ia[ta->rank - 1] = at->transpose_a ? vi : vk;
    ib[tb->rank - 2] = at->transpose_b ? vj : vk;
    ib[tb->rank - 1] = at->transpose_b ? vk : vj;
    int ea = value(w, n->inputs[0], ia), eb = value(w, n->inputs[1], ib);
    if (ea < 0 || eb < 0) return false;
    if (s->exprs[ea].dtype != s->acc_dtype) ea = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, ea, -1, -1);
    if (s->exprs[eb].dtype != s->acc_dtype) eb = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, eb, -1, -1);
    /* not through cm_kx_op's sharing: the body must be its own MUL node */
    s->body = cm_kx_op(s, CM_OP_MUL, s->acc_dtype, ea, eb, -1);
    if (!w->o->no_templates && s->acc_dtype == CM_F32) {
      s->tmpl = CM_KT_GEMM;
      s->gemm_a = ea;
      s->gemm_b = eb;
      set_tiles(w, s);
    }
    return true;
  }
  case CM_OP_CONV2D:
  case CM_OP_CONV2D_GRAD_INPUT:
  case CM_OP_CONV2D_GRAD_WEIGHT: {
    const cm_type *xt, *wt, *yt;
    if (n->op == CM_OP_CONV2D)
      xt = &g->nodes[n->inputs[0]].type, wt = &g->nodes[n->inputs[1]].type, yt = &n->type;
    else if (n->op == CM_OP_CONV2D_GRAD_INPUT)
      xt = &n->type, wt = &g->nodes[n->inputs[1]].type, yt = &g->nodes[n->inputs[0]].type;
    else
      xt = &g->nodes[n->inputs[0]].type, wt = &n->type, yt = &g->nodes[n->inputs[1]].type;
    int64_t N = xt->dims[0], C = xt->dims[1], H = xt->dims[2], W = xt->dims[3];
    int64_t O = wt->dims[0], Cg = wt->dims[1], KH = wt->dims[2], KW = wt->dims[3];
    int64_t OH = yt->dims[2], OW = yt->dims[3];
    int groups = at->groups > 0 ? at->groups : 1;
    int64_t Og = O / groups;
    int64_t sh = at->stride[0], sw = at->stride[1], ph = at->padding[0], pw = at->padding[1];
    int64_t dh = at->dilation[0], dw = at->dilation[1];
    bool gemm = groups == 1 && !w->o->no_templates && s->acc_dtype == CM_F32;
    /* index pieces: n, o, oh, ow, c (within the group), kh, kw; then x's h, w */
    int vn, vo, voh, vow, vc, vkh, vkw;
    if (n->op == CM_OP_CONV2D) {
      if (gemm) { /* [N, OH*OW, O] x red [Cg*KH*KW] */
        s->n_dom = 3, s->dom[0] = N, s->dom[1] = OH * OW, s->dom[2] = O;
        s->n_red = 1, s->red[0] = Cg * KH * KW;
        vn = cm_kx_var(s, 0), vo = cm_kx_var(s, 2);
        voh = cm_kx_idiv(s, cm_kx_var(s, 1), cm_kx_iconst(s, OW));
        vow = cm_kx_imod(s, cm_kx_var(s, 1), cm_kx_iconst(s, OW));
        int rk = cm_kx_var(s, 3);
        vc = cm_kx_idiv(s, rk, cm_kx_iconst(s, KH * KW));
        vkh = cm_kx_imod(s, cm_kx_idiv(s, rk, cm_kx_iconst(s, KW)), cm_kx_iconst(s, KH));
        vkw = cm_kx_imod(s, rk, cm_kx_iconst(s, KW));
      } else {
        s->n_dom = 4, s->dom[0] = N, s->dom[1] = O, s->dom[2] = OH, s->dom[3] = OW;
        s->n_red = 3, s->red[0] = Cg, s->red[1] = KH, s->red[2] = KW;
        vn = cm_kx_var(s, 0), vo = cm_kx_var(s, 1), voh = cm_kx_var(s, 2), vow = cm_kx_var(s, 3);
        vc = cm_kx_var(s, 4), vkh = cm_kx_var(s, 5), vkw = cm_kx_var(s, 6);
      }
      nat[0] = vn, nat[1] = vo, nat[2] = voh, nat[3] = vow;
    } else if (n->op == CM_OP_CONV2D_GRAD_WEIGHT) {
      if (gemm) { /* [O, Cg*KH*KW] x red [N*OH*OW] */
        s->n_dom = 2, s->dom[0] = O, s->dom[1] = Cg * KH * KW;
        s->n_red = 1, s->red[0] = N * OH * OW;
        vo = cm_kx_var(s, 0);
        int j = cm_kx_var(s, 1), rk = cm_kx_var(s, 2);
        vc = cm_kx_idiv(s, j, cm_kx_iconst(s, KH * KW));
        vkh = cm_kx_imod(s, cm_kx_idiv(s, j, cm_kx_iconst(s, KW)), cm_kx_iconst(s, KH));
        vkw = cm_kx_imod(s, j, cm_kx_iconst(s, KW));
        vn = cm_kx_idiv(s, rk, cm_kx_iconst(s, OH * OW));
        voh = cm_kx_imod(s, cm_kx_idiv(s, rk, cm_kx_iconst(s, OW)), cm_kx_iconst(s, OH));
        vow = cm_kx_imod(s, rk, cm_kx_iconst(s, OW));
      } else {
        s->n_dom = 4, s->dom[0] = O, s->dom[1] = Cg, s->dom[2] = KH, s->dom[3] = KW;
        s->n_red = 3, s->red[0] = N, s->red[1] = OH, s->red[2] = OW;
        vo = cm_kx_var(s, 0), vc = cm_kx_var(s, 1), vkh = cm_kx_var(s, 2), vkw = cm_kx_var(s, 3);
        vn = cm_kx_var(s, 4), voh = cm_kx_var(s, 5), vow = cm_kx_var(s, 6);
      }
      nat[0] = vo, nat[1] = vc, nat[2] = vkh, nat[3] = vkw;
    } else { /* grad input: dx[n, ch, h, w] */
      int vh, vw, vch;
      int64_t Cgi = C / groups; /* channels per group of x */
      if (gemm) {               /* [N, H*W, C] x red [O*KH*KW] */
        s->n_dom = 3, s->dom[0] = N, s->dom[1] = H * W, s->dom[2] = C;
        s->n_red = 1, s->red[0] = O * KH * KW;
        vn = cm_kx_var(s, 0), vch = cm_kx_var(s, 2);
        vh = cm_kx_idiv(s, cm_kx_var(s, 1), cm_kx_iconst(s, W));
        vw = cm_kx_imod(s, cm_kx_var(s, 1), cm_kx_iconst(s, W));
        int rk = cm_kx_var(s, 3);
        vo = cm_kx_idiv(s, rk, cm_kx_iconst(s, KH * KW));
        vkh = cm_kx_imod(s, cm_kx_idiv(s, rk, cm_kx_iconst(s, KW)), cm_kx_iconst(s, KH));
        vkw = cm_kx_imod(s, rk, cm_kx_iconst(s, KW));
        vc = vch;
      } else { /* [N, C, H, W] x red [Og, KH, KW] */
        s->n_dom = 4, s->dom[0] = N, s->dom[1] = C, s->dom[2] = H, s->dom[3] = W;
        s->n_red = 3, s->red[0] = Og, s->red[1] = KH, s->red[2] = KW;
        vn = cm_kx_var(s, 0), vch = cm_kx_var(s, 1), vh = cm_kx_var(s, 2), vw = cm_kx_var(s, 3);
        int grp_i = cm_kx_idiv(s, vch, cm_kx_iconst(s, Cgi));
        vo = cm_kx_iadd(s, cm_kx_imul(s, grp_i, cm_kx_iconst(s, Og)), cm_kx_var(s, 4));
        vc = cm_kx_imod(s, vch, cm_kx_iconst(s, Cgi));
        vkh = cm_kx_var(s, 5), vkw = cm_kx_var(s, 6);
      }
      nat[0] = vn, nat[1] = vch, nat[2] = vh, nat[3] = vw;
      /* oh = (h + ph - kh*dh) / sh when divisible and in range */
      int th = cm_kx_iadd(s, vh, cm_kx_iconst(s, ph));
      th = cm_kx_iadd(s, th, cm_kx_imul(s, vkh, cm_kx_iconst(s, -dh)));
      int tw = cm_kx_iadd(s, vw, cm_kx_iconst(s, pw));
      tw = cm_kx_iadd(s, tw, cm_kx_imul(s, vkw, cm_kx_iconst(s, -dw)));
      int thc = imax(s, th, cm_kx_iconst(s, 0)), twc = imax(s, tw, cm_kx_iconst(s, 0));
      int ohv = cm_kx_idiv(s, thc, cm_kx_iconst(s, sh)),
          owv = cm_kx_idiv(s, twc, cm_kx_iconst(s, sw));
      int ok = land(s, cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), th, -1),
                    cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), tw, -1));
      if (sh > 1)
        ok = land(s, ok,
                  cm_kx_op(s, CM_OP_EQ, CM_BOOL, cm_kx_imod(s, thc, cm_kx_iconst(s, sh)),
                           cm_kx_iconst(s, 0), -1));
      if (sw > 1)
        ok = land(s, ok,
                  cm_kx_op(s, CM_OP_EQ, CM_BOOL, cm_kx_imod(s, twc, cm_kx_iconst(s, sw)),
                           cm_kx_iconst(s, 0), -1));
      ok = land(s, ok, land(s, ilt(s, ohv, cm_kx_iconst(s, OH)), ilt(s, owv, cm_kx_iconst(s, OW))));
      int dy_idx[4] = {vn, vo, clamp(s, ohv, OH), clamp(s, owv, OW)};
      int w_idx[4] = {vo, vc, vkh, vkw};
      int ea = value(w, n->inputs[0], dy_idx), eb = value(w, n->inputs[1], w_idx);
      if (ea < 0 || eb < 0) return false;
      if (s->exprs[ea].dtype != s->acc_dtype)
        ea = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, ea, -1, -1);
      if (s->exprs[eb].dtype != s->acc_dtype)
        eb = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, eb, -1, -1);
      ea = cm_kx_op(s, CM_OP_SELECT, s->acc_dtype, ok, ea, cm_kx_const(s, s->acc_dtype, 0));
      s->body = cm_kx_op(s, CM_OP_MUL, s->acc_dtype, ea, eb, -1);
      if (gemm) {
        s->tmpl = CM_KT_GEMM, s->gemm_a = ea, s->gemm_b = eb;
        set_tiles(w, s);
      }
      return true;
    }
    /* conv2d and grad_weight read x at (n, ch, h, w) */
    int vch =
        groups == 1
            ? vc
            : cm_kx_iadd(s,
                         cm_kx_imul(s, cm_kx_idiv(s, vo, cm_kx_iconst(s, Og)), cm_kx_iconst(s, Cg)),
                         vc);
    int hh = cm_kx_iadd(s, cm_kx_imul(s, voh, cm_kx_iconst(s, sh)), cm_kx_iconst(s, -ph));
    hh = cm_kx_iadd(s, hh, cm_kx_imul(s, vkh, cm_kx_iconst(s, dh)));
    int ww = cm_kx_iadd(s, cm_kx_imul(s, vow, cm_kx_iconst(s, sw)), cm_kx_iconst(s, -pw));
    ww = cm_kx_iadd(s, ww, cm_kx_imul(s, vkw, cm_kx_iconst(s, dw)));
    bool padded = ph > 0 || pw > 0 || (OH - 1) * sh + (KH - 1) * dh - ph >= H ||
                  (OW - 1) * sw + (KW - 1) * dw - pw >= W;
    int x_idx[4] = {vn, vch, padded ? clamp(s, hh, H) : hh, padded ? clamp(s, ww, W) : ww};
    int y_idx[4] = {vn, vo, voh, vow};
    int w_idx[4] = {vo, vc, vkh, vkw};
    int xin = n->inputs[0];
    int ex = value(w, xin, x_idx);
    int eo = n->op == CM_OP_CONV2D ? value(w, n->inputs[1], w_idx) : value(w, n->inputs[1], y_idx);
    if (ex < 0 || eo < 0) return false;
    if (s->exprs[ex].dtype != s->acc_dtype) ex = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, ex, -1, -1);
    if (s->exprs[eo].dtype != s->acc_dtype) eo = cm_kx_op(s, CM_OP_CAST, s->acc_dtype, eo, -1, -1);
    if (padded)
      ex = cm_kx_op(s, CM_OP_SELECT, s->acc_dtype, land(s, in_range(s, hh, H), in_range(s, ww, W)),
                    ex, cm_kx_const(s, s->acc_dtype, 0));
    /* GEMM operand order: conv2d A = x (n, pixel, k), B = w (k, o); grad_weight A = dy, B = x */
    int ea = n->op == CM_OP_CONV2D ? ex : eo, eb = n->op == CM_OP_CONV2D ? eo : ex;
    s->body = cm_kx_op(s, CM_OP_MUL, s->acc_dtype, ea, eb, -1);
    if (gemm) {
      s->tmpl = CM_KT_GEMM, s->gemm_a = ea, s->gemm_b = eb;
      set_tiles(w, s);
    }
    return true;
  }
  case CM_OP_SCATTER_ADD: return true; /* handled by scatter_stages */
  default: return fail(w, CM_EINTERNAL, h, "not a materialized op", NULL);
  }
}

static bool scatter_stages(lw *w, int h, int out) {
  const cm_graph *g = w->g;
  const cm_node *n = &g->nodes[h];
  int r = n->type.rank;
  int ax = n->attrs.axis < 0 ? n->attrs.axis + r : n->attrs.axis;
  int idx[CM_MAX_RANK];
  /* y = base */
  cm_kstage *s = begin_stage(w, "scatter_base", h);
  s->n_dom = r;
  for (int a = 0; a < r; a++) s->dom[a] = n->type.dims[a], idx[a] = cm_kx_var(s, a);
  int v = value(w, n->inputs[0], idx);
  if (v < 0) return false;
  add_store(w, out, linearize(s, &n->type, idx), v);
  set_parallel(s);
  /* y[..., index[i], ...] += updates[i] */
  const cm_type *ut = &g->nodes[n->inputs[2]].type;
  s = begin_stage(w, "scatter_add", h);
  s->n_dom = ut->rank;
  s->accumulate = true;
  for (int a = 0; a < ut->rank; a++) s->dom[a] = ut->dims[a], idx[a] = cm_kx_var(s, a);
  int iv = value(w, n->inputs[1], idx), uv = value(w, n->inputs[2], idx);
  if (iv < 0 || uv < 0) return false;
  int j = g->nodes[n->inputs[1]].type.dtype == CM_I64 ? iv
                                                      : cm_kx_op(s, CM_OP_CAST, CM_I64, iv, -1, -1);
  int oi[CM_MAX_RANK];
  memcpy(oi, idx, sizeof oi);
  oi[ax] = clamp(s, j, n->type.dims[ax]);
  add_store(w, out, linearize(s, &n->type, oi), uv);
  set_parallel(s);
  return !w->failed;
}

/* ---- the group ------------------------------------------------------------- */

static cm_status lower_group(lw *w) {
  const cm_graph *g = w->g;
  const cm_group *grp = w->grp;
  cm_kernel *k = w->k;
  for (int i = 0; i < grp->n_nodes; i++) w->in_group[grp->nodes[i]] = true;
  /* output buffers */
  for (int i = 0; i < grp->n_outputs; i++) {
    int v = grp->outputs[i];
    const cm_node *n = &g->nodes[v];
    w->is_output[v] = true;
    if (n->op == CM_OP_ASSIGN) {
      int st = assign_target(g, v);
      int b = w->buf_of[st];
      if (b < 0) {
        b = cm_kernel_add_buffer(k, CM_KBUF_SOURCE, g->nodes[st].type.dtype,
                                 cm_type_numel(&g->nodes[st].type), st, 0);
        w->buf_of[st] = b;
      }
      w->out_buf[v] = b;
    } else {
      int64_t off = w->p->offset ? w->p->offset[v] : -1;
      if (off < 0)
        return fail(w, CM_EINTERNAL, v, "a group output without an arena offset", NULL),
               w->err->status;
      w->out_buf[v] =
          cm_kernel_add_buffer(k, CM_KBUF_ARENA, n->type.dtype, cm_type_numel(&n->type), v, off);
    }
  }
  int cap_written = 2 * g->n_nodes + 64; /* every buffer holds a node's value */
  w->written_at = malloc(sizeof(int) * (size_t)cap_written);
  if (!w->written_at) return cm_errorf(w->err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < cap_written; i++) w->written_at[i] = -1;
  bool *fused = calloc((size_t)g->n_nodes, sizeof *fused);
  if (!fused) return cm_errorf(w->err, CM_EINTERNAL, "out of memory");
  /* heavy nodes in topological order */
  for (int i = 0; i < grp->n_nodes && !w->failed; i++) {
    int h = grp->nodes[i];
    cm_op op = g->nodes[h].op;
    if (!is_heavy(op)) continue;
    if (k->n_buffers + 64 > cap_written) break; /* checked below */
    int nat[CM_MAX_RANK] = {0};
    if (op == CM_OP_SCATTER_ADD) {
      int out = result_buffer(w, h);
      if (!scatter_stages(w, h, out)) break;
      w->buf_of[h] = out;
      continue;
    }
    if (!heavy_stage(w, h, nat)) break;
    if (try_epilogue(w, h, nat, fused)) {
      set_parallel(w->s);
      continue; /* h itself never reaches memory */
    }
    if (w->failed) break;
    int out = result_buffer(w, h);
    add_store(w, out, linearize(w->s, &g->nodes[h].type, nat), cm_kx_acc(w->s));
    set_parallel(w->s);
    w->buf_of[h] = out;
    fused[h] = true;
  }
  /* remaining outputs: one stage per distinct shape (assigns last within it) */
  bool *done = calloc((size_t)g->n_nodes, sizeof *done);
  if (!done) {
    free(fused);
    return cm_errorf(w->err, CM_EINTERNAL, "out of memory");
  }
  for (int i = 0; i < grp->n_outputs && !w->failed; i++) {
    int v = grp->outputs[i];
    if (fused[v] || done[v] || is_heavy(g->nodes[v].op)) continue;
    const cm_type *t = &g->nodes[v].type;
    cm_kstage *s = begin_stage(w, "out", v);
    s->n_dom = t->rank;
    int idx[CM_MAX_RANK];
    for (int a = 0; a < t->rank; a++) s->dom[a] = t->dims[a], idx[a] = cm_kx_var(s, a);
    for (int j = i; j < grp->n_outputs && !w->failed && s->n_stores < CM_KMAX_STORES; j++) {
      int u = grp->outputs[j];
      if (fused[u] || done[u] || is_heavy(g->nodes[u].op)) continue;
      if (!cm_shape_equal(&g->nodes[u].type, t)) continue;
      int val = value(w, u, idx);
      if (val < 0) break;
      add_store(w, w->out_buf[u], linearize(s, t, idx), val);
      done[u] = true;
    }
    set_parallel(s);
  }
  free(done);
  free(fused);
  if (w->failed) return w->err->status;
  if (k->n_buffers > cap_written)
    return fail(w, CM_EINTERNAL, -1, "too many buffers in one kernel", NULL), w->err->status;
  /* in-place hazard: a state written by a stage must not be read by a later one */
  for (int si = 0; si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    for (int e = 0; e < s->n_exprs; e++) {
      const cm_kexpr *x = &s->exprs[e];
      if (x->kind != CM_KX_LOAD) continue;
      int wa = w->written_at[x->buf];
      if (wa >= 0 && wa < si && k->buffers[x->buf].kind == CM_KBUF_SOURCE) {
        char d[128];
        snprintf(d, sizeof d, ": stage %d reads a state that stage %d already updated", si, wa);
        return fail(w, CM_EINTERNAL, k->buffers[x->buf].node, "in-place hazard", d), w->err->status;
      }
    }
  }
  return CM_OK;
}

cm_status cm_lower_group(const cm_graph *g, const cm_plan *p, int group, const cm_lower_opts *o,
                         cm_kernel *out, cm_err *err) {
  cm_lower_opts defaults = {CM_TARGET_CPU, false};
  if (!o) o = &defaults;
  if (!g || !p || !out || group < 0 || group >= p->n_groups)
    return cm_errorf(err, CM_EINVALID, "cm_lower_group: no group %d", group);
  const cm_group *grp = &p->groups[group];
  char name[64];
  snprintf(name, sizeof name, "k%d_%s", group, cm_group_kind_name(grp->kind));
  for (char *c = name; *c; c++)
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9')))
      *c = '_';
  cm_kernel_init(out, name);
  out->group = group;
  out->kind = grp->kind;
  lw w;
  memset(&w, 0, sizeof w);
  w.g = g, w.p = p, w.grp = grp, w.gid = group, w.k = out, w.o = o, w.err = err;
  w.acc_node = -1;
  size_t n = (size_t)g->n_nodes;
  w.buf_of = malloc(sizeof(int) * n);
  w.out_buf = malloc(sizeof(int) * n);
  w.in_group = calloc(n, sizeof(bool));
  w.is_output = calloc(n, sizeof(bool));
  cm_status st = CM_OK;
  if (!w.buf_of || !w.out_buf || !w.in_group || !w.is_output) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
  } else {
    for (size_t i = 0; i < n; i++) w.buf_of[i] = w.out_buf[i] = -1;
    st = lower_group(&w);
    if (!st && w.failed) st = err ? err->status : CM_EINTERNAL;
  }
  free(w.buf_of);
  free(w.out_buf);
  free(w.in_group);
  free(w.is_output);
  free(w.memo);
  free(w.written_at);
  if (!st) st = cm_kernel_verify(out, err);
  if (st) cm_kernel_free(out);
  return st;
}

cm_status cm_lower_plan(const cm_graph *g, const cm_plan *p, const cm_lower_opts *o,
                        cm_kprogram *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  if (!p) return cm_errorf(err, CM_EINVALID, "cm_lower_plan: no plan");
  int n = p->n_order > 0 ? p->n_order : p->n_groups;
  out->kernels = calloc((size_t)(n > 0 ? n : 1), sizeof *out->kernels);
  if (!out->kernels) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  out->arena_bytes = p->arena_bytes;
  for (int i = 0; i < n; i++) {
    int gid = p->n_order > 0 ? p->order[i] : i;
    cm_status st = cm_lower_group(g, p, gid, o, &out->kernels[i], err);
    if (st) {
      cm_kprogram_free(out);
      return st;
    }
    out->n_kernels = i + 1;
    if (out->kernels[i].scratch_bytes > out->max_scratch_bytes)
      out->max_scratch_bytes = out->kernels[i].scratch_bytes;
  }
  return CM_OK;
}
