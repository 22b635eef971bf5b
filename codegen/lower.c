/* codegen/lower.c — plan groups to the kernel IR.
 *
 * Materialized nodes (reductions, matmul) get a stage each; the remaining group
 * outputs get one stage per distinct shape. Everything else is inlined into
 * the expressions of the stage that needs it (value()), memoized per stage on
 * (node, index expressions) because the graphs are DAGs. Not lowered yet:
 * conv2d family, gather, scatter_add, concat, pad (CM_EINVALID). */
#include "codegen.h"

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
  cm_err *err;
  cm_status st;
} lctx;

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
  return op == CM_OP_REDUCE_SUM || op == CM_OP_REDUCE_MAX || op == CM_OP_MATMUL;
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

static int value_in(lctx *c, cm_kstage *s, int id, const int *idx) {
  const cm_node *n = N(c, id);
  const cm_type *t = &n->type;
  int in[CM_MAX_RANK];
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
  cm_kgemm_tiles t;
  if (o && o->target == CM_TARGET_CUDA) {
    t = (cm_kgemm_tiles){64, 64, 16, 32, 32};
  } else {
    int nr = 16;
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx512f")) nr = 32;
#endif
    t = (cm_kgemm_tiles){120, 512, 256, 6, nr};
  }
  int64_t M = s->dom[s->n_dom - 2], Nn = s->dom[s->n_dom - 1], K = s->red[0];
  if (t.mc > round_up(M, t.mr)) t.mc = round_up(M, t.mr);
  if (t.nc > round_up(Nn, t.nr)) t.nc = round_up(Nn, t.nr);
  if (t.kc > K) t.kc = (int)K;
  s->tiles = t;
}

/* A stage computing materialized node id into buffer b. */
static cm_status lower_materialized(lctx *c, int id, int b) {
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
  for (int i = 0; i < t->rank; i++) dv[i] = cm_kx_var(s, i);
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
  } else { /* matmul */
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
  int acc = cm_kx_acc(s);
  s->stores[s->n_stores++] = (cm_kstore){b, linear(s, t, dv), acc};
  c->k->buffers[b].written = true;
  finish_stage(s);
  return CM_OK;
}

cm_status cm_lower_group(const cm_graph *g, const cm_plan *p, int group, const cm_lower_opts *o,
                         cm_kernel *out, cm_err *err) {
  if (!g || !p || !out || group < 0 || group >= p->n_groups || !p->offset)
    return cm_errorf(err, CM_EINTERNAL, "cm_lower_group: bad arguments (group %d)", group);
  const cm_group *gr = &p->groups[group];
  char kname[64];
  snprintf(kname, sizeof kname, "k%d_%s", group, cm_group_kind_name(gr->kind));
  cm_kernel_init(out, kname);
  out->group = group;
  out->kind = gr->kind;
  lctx c = {g,    p,    gr, o, out, calloc((size_t)g->n_nodes, sizeof(int)),
            NULL, NULL, 0,  0, err, CM_OK};
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
  /* materialized nodes, in topological order */
  for (int i = 0; i < gr->n_nodes && c.st == CM_OK; i++) {
    int id = gr->nodes[i];
    const cm_node *n = &g->nodes[id];
    if (!is_materialized_op(n->op)) continue;
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
    lower_materialized(&c, id, b);
    c.buf_of[id] = b;
  }
  /* remaining outputs: one stage per distinct shape */
  bool *done = calloc((size_t)gr->n_outputs + 1, sizeof(bool));
  if (!done) abort();
  c.written = realloc(c.written, sizeof(bool) * (size_t)out->n_buffers + 1);
  if (!c.written) abort();
  memset(c.written, 0, sizeof(bool) * (size_t)out->n_buffers);
  for (int i = 0; i < gr->n_outputs && c.st == CM_OK; i++) {
    int id = gr->outputs[i];
    if (done[i] || (is_materialized_op(g->nodes[id].op) && c.buf_of[id] == out_buf[i])) continue;
    const cm_type *t = &g->nodes[id].type;
    char name[64];
    snprintf(name, sizeof name, "s%d_out", out->n_stages);
    cm_kstage *s = cm_kernel_add_stage(out, name);
    c.n_memo = 0;
    s->n_dom = t->rank;
    int dv[CM_MAX_RANK];
    for (int d = 0; d < t->rank; d++) {
      s->dom[d] = t->dims[d];
      dv[d] = cm_kx_var(s, d);
    }
    int stage_written[CM_KMAX_STORES], n_sw = 0;
    for (int j = i; j < gr->n_outputs && c.st == CM_OK; j++) {
      int oj = gr->outputs[j];
      const cm_type *tj = &g->nodes[oj].type;
      if (done[j] || tj->rank != t->rank ||
          memcmp(tj->dims, t->dims, sizeof(int64_t) * (size_t)t->rank))
        continue;
      if (is_materialized_op(g->nodes[oj].op) && c.buf_of[oj] == out_buf[j]) continue;
      if (s->n_stores == CM_KMAX_STORES) break;
      int v = value(&c, s, oj, dv);
      if (v < 0) break;
      s->stores[s->n_stores++] = (cm_kstore){out_buf[j], linear(s, t, dv), v};
      out->buffers[out_buf[j]].written = true;
      if (out->buffers[out_buf[j]].kind == CM_KBUF_SOURCE) stage_written[n_sw++] = out_buf[j];
      done[j] = true;
    }
    for (int w = 0; w < n_sw; w++) c.written[stage_written[w]] = true;
    finish_stage(s);
  }
  free(done);
  free(out_buf);
  free(c.buf_of);
  free(c.written);
  free(c.memo);
  if (c.st != CM_OK) cm_kernel_free(out);
  return c.st;
}

cm_status cm_lower_plan(const cm_graph *g, const cm_plan *p, const cm_lower_opts *o,
                        cm_kprogram *out, cm_err *err) {
  if (!g || !p || !out) return cm_errorf(err, CM_EINTERNAL, "cm_lower_plan: bad arguments");
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
