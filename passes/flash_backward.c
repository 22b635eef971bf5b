/* passes/flash_backward.c — the attention backward without N×N tensors in
 * memory (FlashAttention-2's backward as a graph rewrite, docs/passes.md
 * "Flash backward").
 *
 * Autodiff's backward of an attention (models/nn.c: S = Q Kᵀ, scaled,
 * softmax with a stop-gradient max, O = P V) reads the forward's N×N values:
 * E = exp(S·c − m), P = E / z, P's low-precision cast and broadcasts of z.
 * This pass gives the backward its own copies, recomputed from Q, K and the
 * two row statistics m and z, so the forward keeps only O, m and z; and it
 * replaces the row sum autodiff takes over the keys,
 * Σ_j −(dP ∘ P)_ij / z_i, by the equal −D_i / z_i with D = rowsum(dO ∘ O)
 * over the head dim (Σ_j dP_ij P_ij = Σ_c dO_ic O_ic since dP = dO Vᵀ and
 * O = P V), so the backward needs one pass over the keys. Run it after cse:
 * cse would merge the recomputation back into the forward. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

/* One attention's forward chain (old node ids; -1 where absent). */
typedef struct attn_chain {
  int s;      /* matmul(Q, K) {transpose_b} */
  int s32;    /* cast(s, f32), or s when s is f32 */
  int scaled; /* mul(s32, c), or s32 when unscaled */
  int scale;  /* c: a const or a broadcast of one; -1 when unscaled */
  bool scale_first;
  int bm, m;  /* broadcast(m); m = stop_gradient(reduce_max(scaled)) */
  int e, z;   /* exp(sub(scaled, bm)); z = reduce_sum(e) {keepdims} */
  int bz, p;  /* broadcast(z); p = div(e, bz) */
  int pb;     /* cast(p, low) read by o, or -1 */
  int o, o32; /* matmul(p or pb, V); its f32 value (-1: o is low and never cast) */
  int n_dp;   /* dP = matmul(dO, V) {transpose_b} nodes: the backward exists */
  int rec[4]; /* new ids of the recomputed S·c, E, P, P.low (-1: not yet) */
  int rec_bz; /* new id of the recomputed broadcast of z */
} attn_chain;

enum { REC_SCALED, REC_E, REC_P, REC_PB };
/* What a backward read of an old node stands for (per old node). */
enum { USE_NONE, USE_E, USE_P, USE_PB, USE_BZ };

typedef struct fb_ctx {
  const cm_graph *old;
  int *cstart, *clist; /* consumers of each old node */
  int n_attn;
  attn_chain *attn;
  int *attn_of;          /* old node -> attention whose N×N value it is (-1) */
  unsigned char *use_of; /* old node -> USE_* */
  bool *in_chain;        /* old node is part of a forward chain */
  int *d_attn;           /* old reduce_sum node replaced by -D/z -> its attention (-1) */
  int *d_dout;           /* ... and the dO its dP reads (old id; D takes its f32 value) */
} fb_ctx;

static const cm_node *node(const fb_ctx *c, int id) {
  return &c->old->nodes[id];
}

static bool last_axis_rows(const cm_node *r, const cm_type *in, bool keepdims) {
  return r->attrs.n_axes == 1 && r->attrs.axes[0] == in->rank - 1 && r->attrs.keepdims == keepdims;
}

/* A const, or a broadcast of one: a scale. */
static bool is_const_value(const fb_ctx *c, int id) {
  const cm_node *n = node(c, id);
  if (n->op == CM_OP_BROADCAST) n = node(c, n->inputs[0]);
  return n->op == CM_OP_CONST;
}

/* The consumer of x with op `op` whose input k is x (and whose other input,
 * when `other` >= 0, is `other`); -1 when none. */
static int consumer(const fb_ctx *c, int x, cm_op op, int k, int other) {
  for (int e = c->cstart[x]; e < c->cstart[x + 1]; e++) {
    const cm_node *u = node(c, c->clist[e]);
    if (u->op != op || u->n_inputs <= k || u->inputs[k] != x) continue;
    if (other >= 0 && (u->n_inputs != 2 || u->inputs[1 - k] != other)) continue;
    return c->clist[e];
  }
  return -1;
}

static bool is_broadcast_of(const fb_ctx *c, int id, int x, const cm_type *to) {
  const cm_node *n = node(c, id);
  return n->op == CM_OP_BROADCAST && n->inputs[0] == x && cm_shape_equal(&n->type, to);
}

/* Matches the chain around exp node `e`; false when it is not an attention. */
static bool match_forward(const fb_ctx *c, int e, attn_chain *a) {
  memset(a, -1, sizeof *a);
  a->scale_first = false;
  a->n_dp = 0;
  const cm_node *en = node(c, e);
  if (en->op != CM_OP_EXP || en->type.dtype != CM_F32 || en->type.rank < 2) return false;
  const cm_node *sub = node(c, en->inputs[0]);
  if (sub->op != CM_OP_SUB) return false;
  a->e = e;
  a->scaled = sub->inputs[0];
  a->bm = sub->inputs[1];
  const cm_node *bm = node(c, a->bm);
  a->m = bm->inputs[0];
  if (bm->op == CM_OP_STOP_GRADIENT) { /* one key: nothing to broadcast */
    a->m = a->bm;
    a->bm = -1;
  } else if (bm->op != CM_OP_BROADCAST) {
    return false;
  }
  const cm_node *m = node(c, a->m);
  if (m->op != CM_OP_STOP_GRADIENT) return false;
  const cm_node *rm = node(c, m->inputs[0]);
  if (rm->op != CM_OP_REDUCE_MAX || rm->inputs[0] != a->scaled ||
      !last_axis_rows(rm, &en->type, true))
    return false;
  const cm_node *sc = node(c, a->scaled);
  a->s32 = a->scaled;
  if (sc->op == CM_OP_MUL) {
    for (int k = 0; k < 2; k++)
      if (is_const_value(c, sc->inputs[k]) &&
          cm_shape_equal(&node(c, sc->inputs[k])->type, &en->type)) {
        a->scale = sc->inputs[k];
        a->s32 = sc->inputs[1 - k];
        a->scale_first = k == 0;
        break;
      }
    if (a->scale < 0) return false;
  }
  const cm_node *s32 = node(c, a->s32);
  a->s = a->s32;
  if (s32->op == CM_OP_CAST) a->s = s32->inputs[0];
  const cm_node *s = node(c, a->s);
  if (s->op != CM_OP_MATMUL || !s->attrs.transpose_b || s->attrs.transpose_a ||
      s32->type.dtype != CM_F32)
    return false;
  /* z = reduce_sum(e) {keepdims}, p = div(e, broadcast(z)) */
  for (int k = c->cstart[e]; k < c->cstart[e + 1] && a->z < 0; k++) {
    const cm_node *u = node(c, c->clist[k]);
    if (u->op == CM_OP_REDUCE_SUM && last_axis_rows(u, &en->type, true)) a->z = c->clist[k];
  }
  if (a->z < 0) return false;
  for (int k = c->cstart[e]; k < c->cstart[e + 1] && a->p < 0; k++) {
    const cm_node *u = node(c, c->clist[k]);
    if (u->op == CM_OP_DIV && u->inputs[0] == e &&
        (u->inputs[1] == a->z || is_broadcast_of(c, u->inputs[1], a->z, &en->type)))
      a->p = c->clist[k], a->bz = u->inputs[1] == a->z ? -1 : u->inputs[1];
  }
  if (a->p < 0) return false;
  /* o = matmul(p or cast(p, low), V) */
  int via[2] = {a->p, -1};
  for (int k = c->cstart[a->p]; k < c->cstart[a->p + 1] && via[1] < 0; k++) {
    const cm_node *u = node(c, c->clist[k]);
    if (u->op == CM_OP_CAST && (u->type.dtype == CM_BF16 || u->type.dtype == CM_F16))
      via[1] = c->clist[k];
  }
  for (int w = 0; w < 2 && a->o < 0; w++) {
    if (via[w] < 0) continue;
    for (int k = c->cstart[via[w]]; k < c->cstart[via[w] + 1]; k++) {
      const cm_node *u = node(c, c->clist[k]);
      if (u->op == CM_OP_MATMUL && u->inputs[0] == via[w] && !u->attrs.transpose_a &&
          !u->attrs.transpose_b) {
        a->o = c->clist[k];
        a->pb = w == 1 ? via[1] : -1;
        break;
      }
    }
  }
  if (a->o < 0) return false;
  const cm_node *o = node(c, a->o);
  a->o32 = o->type.dtype == CM_F32 ? a->o : -1;
  for (int k = c->cstart[a->o]; k < c->cstart[a->o + 1] && a->o32 < 0; k++)
    if (node(c, c->clist[k])->op == CM_OP_CAST && node(c, c->clist[k])->type.dtype == CM_F32)
      a->o32 = c->clist[k];
  /* the backward's dP = matmul(dO, V) {transpose_b}, V the very operand o reads */
  int v = o->inputs[1];
  for (int k = c->cstart[v]; k < c->cstart[v + 1]; k++) {
    const cm_node *u = node(c, c->clist[k]);
    if (u->op == CM_OP_MATMUL && u->inputs[1] == v && u->attrs.transpose_b &&
        !u->attrs.transpose_a && cm_shape_equal(&u->type, &en->type)) {
      a->n_dp++;
    }
  }
  for (int k = 0; k < 4; k++) a->rec[k] = -1;
  a->rec_bz = -1;
  return true;
}

/* ---- the backward's reads ------------------------------------------------- */

static void mark_chain(fb_ctx *c, const attn_chain *a) {
  int ids[] = {a->s,
               a->s32,
               a->scaled,
               node(c, a->m)->inputs[0],
               a->m,
               a->bm,
               node(c, a->e)->inputs[0],
               a->e,
               a->z,
               a->bz,
               a->p,
               a->pb,
               a->o};
  for (size_t k = 0; k < sizeof ids / sizeof ids[0]; k++)
    if (ids[k] >= 0) c->in_chain[ids[k]] = true;
}

/* Whether a node outside the forward chains reads x. */
static bool read_outside(const fb_ctx *c, int x) {
  for (int e = c->cstart[x]; e < c->cstart[x + 1]; e++)
    if (!c->in_chain[c->clist[e]]) return true;
  return false;
}

/* Marks what the backward of attention ai reads; false when it reads none of
 * E, P, P.low (no backward: nothing to do, which keeps the pass idempotent). */
static bool mark_uses(fb_ctx *c, int ai) {
  const attn_chain *a = &c->attn[ai];
  if (a->n_dp == 0) return false;
  if (!read_outside(c, a->e) && !read_outside(c, a->p) && !(a->pb >= 0 && read_outside(c, a->pb)))
    return false;
  int vals[3] = {a->e, a->p, a->pb};
  unsigned char uses[3] = {USE_E, USE_P, USE_PB};
  for (int k = 0; k < 3; k++)
    if (vals[k] >= 0) c->use_of[vals[k]] = uses[k], c->attn_of[vals[k]] = ai;
  const cm_type *rows = &node(c, a->e)->type;
  for (int e = c->cstart[a->z]; e < c->cstart[a->z + 1]; e++)
    if (is_broadcast_of(c, c->clist[e], a->z, rows))
      c->use_of[c->clist[e]] = USE_BZ, c->attn_of[c->clist[e]] = ai;
  return true;
}

/* dP's f32 value read by a backward node: a dP matmul of attention a (f32), or
 * its cast to f32; returns the dP matmul, or -1. */
static int dp_of(const fb_ctx *c, const attn_chain *a, int x) {
  const cm_node *n = node(c, x);
  if (n->type.dtype != CM_F32) return -1;
  if (n->op == CM_OP_CAST) x = n->inputs[0], n = node(c, x);
  int v = node(c, a->o)->inputs[1];
  if (n->op != CM_OP_MATMUL || n->inputs[1] != v || !n->attrs.transpose_b || n->attrs.transpose_a)
    return -1;
  return x;
}

/* Finds autodiff's reduce_sum(neg(div(mul(dP, P), broadcast z))) over the keys
 * of attention ai and marks it for -D/z; returns how many were found. */
static int mark_d(fb_ctx *c, int ai) {
  const attn_chain *a = &c->attn[ai];
  const cm_type *rows = &node(c, a->e)->type;
  int found = 0;
  for (int e = c->cstart[a->p]; e < c->cstart[a->p + 1]; e++) {
    int mul = c->clist[e];
    const cm_node *mn = node(c, mul);
    if (mn->op != CM_OP_MUL || c->in_chain[mul]) continue;
    int dp = dp_of(c, a, mn->inputs[mn->inputs[0] == a->p ? 1 : 0]);
    if (dp < 0) continue;
    for (int e2 = c->cstart[mul]; e2 < c->cstart[mul + 1]; e2++) {
      const cm_node *dv = node(c, c->clist[e2]);
      if (dv->op != CM_OP_DIV || dv->inputs[0] != mul ||
          (dv->inputs[1] != a->z && !is_broadcast_of(c, dv->inputs[1], a->z, rows)))
        continue;
      int neg = consumer(c, c->clist[e2], CM_OP_NEG, 0, -1);
      if (neg < 0) continue;
      if (rows->dims[rows->rank - 1] == 1) { /* one key: simplify dropped the row sum */
        c->d_attn[neg] = ai;
        c->d_dout[neg] = node(c, dp)->inputs[0];
        found++;
        continue;
      }
      for (int e3 = c->cstart[neg]; e3 < c->cstart[neg + 1]; e3++) {
        const cm_node *r = node(c, c->clist[e3]);
        if (r->op != CM_OP_REDUCE_SUM || r->attrs.n_axes != 1 || r->attrs.axes[0] != rows->rank - 1)
          continue;
        c->d_attn[c->clist[e3]] = ai;
        c->d_dout[c->clist[e3]] = node(c, dp)->inputs[0];
        found++;
      }
    }
  }
  return found;
}

/* ---- the rewrite ---------------------------------------------------------- */

/* A fresh node like old node `like` (same op and attrs) on new inputs. */
static int add_like(cm_rewriter *r, const cm_node *like, const int *in, int n_in) {
  if (r->g->error.status != CM_OK) return -1;
  for (int k = 0; k < n_in; k++)
    if (in[k] < 0) return -1;
  cm_err e = {0};
  int id = cm_graph_add(r->g, like->op, NULL, in, n_in, &like->attrs, &e);
  if (id < 0) r->g->error = e;
  return id;
}

/* The recomputed value `kind` of attention a in the new graph (made on first use). */
static int recompute(fb_ctx *c, cm_rewriter *r, attn_chain *a, int kind) {
  if (a->rec[kind] >= 0) return a->rec[kind];
  int id = -1;
  const cm_node *s = node(c, a->s);
  switch (kind) {
  case REC_SCALED: {
    int qk[2] = {r->map[s->inputs[0]], r->map[s->inputs[1]]};
    id = add_like(r, s, qk, 2);
    if (a->s32 != a->s) id = add_like(r, node(c, a->s32), &id, 1);
    if (a->scale >= 0) {
      int in[2] = {id, r->map[a->scale]};
      if (a->scale_first) in[0] = r->map[a->scale], in[1] = id;
      id = add_like(r, node(c, a->scaled), in, 2);
    }
    break;
  }
  case REC_E: {
    int in[2] = {recompute(c, r, a, REC_SCALED), r->map[a->m]};
    if (a->bm >= 0) in[1] = add_like(r, node(c, a->bm), &in[1], 1);
    id = add_like(r, node(c, node(c, a->e)->inputs[0]), in, 2);
    id = add_like(r, node(c, a->e), &id, 1);
    break;
  }
  case REC_P: {
    if (a->rec_bz < 0)
      a->rec_bz = a->bz < 0 ? r->map[a->z] : add_like(r, node(c, a->bz), &r->map[a->z], 1);
    int in[2] = {recompute(c, r, a, REC_E), a->rec_bz};
    id = add_like(r, node(c, a->p), in, 2);
    break;
  }
  case REC_PB: {
    int p = recompute(c, r, a, REC_P);
    id = add_like(r, node(c, a->pb), &p, 1);
    break;
  }
  }
  a->rec[kind] = id;
  return id;
}

/* What a backward node reads for old node x: its recomputation, or x's copy. */
static int backward_read(fb_ctx *c, cm_rewriter *r, int x) {
  attn_chain *a = c->attn_of[x] >= 0 ? &c->attn[c->attn_of[x]] : NULL;
  switch (a ? c->use_of[x] : USE_NONE) {
  case USE_E: return recompute(c, r, a, REC_E);
  case USE_P: return recompute(c, r, a, REC_P);
  case USE_PB: return recompute(c, r, a, REC_PB);
  case USE_BZ: /* a broadcast of z (x itself) */
    if (a->rec_bz < 0) a->rec_bz = add_like(r, node(c, x), &r->map[a->z], 1);
    return a->rec_bz;
  default: return r->map[x];
  }
}

/* A node outside the chains copied with its reads of N×N forward values replaced. */
static int copy_backward(fb_ctx *c, cm_rewriter *r, int id) {
  const cm_node *n = node(c, id);
  int in[CM_MAX_RANK + 8];
  if (n->n_inputs > (int)(sizeof in / sizeof in[0])) return cm_rewriter_copy(r, id);
  for (int k = 0; k < n->n_inputs; k++) in[k] = backward_read(c, r, n->inputs[k]);
  for (int k = 0; k < n->n_inputs; k++)
    if (in[k] < 0) return -1;
  if (r->g->error.status != CM_OK) return -1;
  cm_err e = {0};
  int nid =
      cm_graph_add(r->g, n->op, n->name[0] == '%' ? NULL : n->name, in, n->n_inputs, &n->attrs, &e);
  if (nid < 0) r->g->error = e;
  return nid;
}

/* -D/z in z's shape, D = rowsum(dO ∘ O) over the head dim, for the marked
 * reduce_sum `id` (then reshaped to its shape). *keepdims receives -D/z. */
static int minus_d_over_z(fb_ctx *c, cm_rewriter *r, int id, int *keepdims) {
  const attn_chain *a = &c->attn[c->d_attn[id]];
  int dout = c->d_dout[id];
  const cm_node *dn = node(c, dout);
  int d_new;
  if (dn->type.dtype == CM_F32)
    d_new = r->map[dout];
  else if (dn->op == CM_OP_CAST && node(c, dn->inputs[0])->type.dtype == CM_F32)
    d_new = r->map[dn->inputs[0]];
  else
    d_new = cm_cast(r->g, r->map[dout], CM_F32, NULL);
  int o = a->o32 >= 0 ? r->map[a->o32] : cm_cast(r->g, r->map[a->o], CM_F32, NULL);
  const cm_node *o_node = node(c, a->o);
  int axis = o_node->type.rank - 1;
  int prod = cm_binary(r->g, CM_OP_MUL, d_new, o, NULL);
  int d = cm_reduce(r->g, CM_OP_REDUCE_SUM, prod, 1, &axis, true, NULL);
  *keepdims = cm_unary(r->g, CM_OP_NEG, cm_binary(r->g, CM_OP_DIV, d, r->map[a->z], NULL), NULL);
  const cm_node *n = node(c, id);
  if (*keepdims < 0 || cm_shape_equal(&r->g->nodes[*keepdims].type, &n->type)) return *keepdims;
  return cm_reshape(r->g, *keepdims, n->type.rank, n->type.dims, NULL);
}

static void ctx_free(fb_ctx *c) {
  free(c->cstart), free(c->clist), free(c->attn), free(c->attn_of), free(c->use_of);
  free(c->in_chain), free(c->d_attn), free(c->d_dout);
}

static cm_status ctx_init(fb_ctx *c, const cm_graph *g, cm_err *err) {
  memset(c, 0, sizeof *c);
  c->old = g;
  size_t n = (size_t)g->n_nodes + 1;
  int edges = 0;
  for (int v = 0; v < g->n_nodes; v++) edges += g->nodes[v].n_inputs;
  c->cstart = calloc(n + 1, sizeof *c->cstart);
  c->clist = malloc(sizeof(int) * ((size_t)edges + 1));
  c->attn_of = malloc(sizeof(int) * n);
  c->use_of = calloc(n, 1);
  c->in_chain = calloc(n, sizeof *c->in_chain);
  c->d_attn = malloc(sizeof(int) * n);
  c->d_dout = malloc(sizeof(int) * n);
  int *fill = malloc(sizeof(int) * n);
  if (!c->cstart || !c->clist || !c->attn_of || !c->use_of || !c->in_chain || !c->d_attn ||
      !c->d_dout || !fill) {
    free(fill);
    ctx_free(c);
    return cm_errorf(err, CM_EINTERNAL, "flash_backward: out of memory");
  }
  for (int v = 0; v < g->n_nodes; v++)
    for (int k = 0; k < g->nodes[v].n_inputs; k++) c->cstart[g->nodes[v].inputs[k] + 1]++;
  for (int v = 0; v < g->n_nodes; v++) c->cstart[v + 1] += c->cstart[v];
  for (int v = 0; v < g->n_nodes; v++) fill[v] = c->cstart[v];
  for (int v = 0; v < g->n_nodes; v++)
    for (int k = 0; k < g->nodes[v].n_inputs; k++) c->clist[fill[g->nodes[v].inputs[k]]++] = v;
  for (int v = 0; v < g->n_nodes; v++) c->attn_of[v] = c->d_attn[v] = c->d_dout[v] = -1;
  free(fill);
  return CM_OK;
}

/* Matches every attention, marks the backward reads; returns how many attentions are rewritten. */
static int find_attentions(fb_ctx *c, int *n_d, int *n_d_kept, cm_err *err) {
  const cm_graph *g = c->old;
  int n_exp = 0;
  for (int v = 0; v < g->n_nodes; v++) n_exp += g->nodes[v].op == CM_OP_EXP;
  c->attn = malloc(sizeof *c->attn * ((size_t)n_exp + 1));
  if (!c->attn) {
    cm_errorf(err, CM_EINTERNAL, "flash_backward: out of memory");
    return -1;
  }
  for (int v = 0; v < g->n_nodes; v++)
    if (g->nodes[v].op == CM_OP_EXP && match_forward(c, v, &c->attn[c->n_attn]))
      mark_chain(c, &c->attn[c->n_attn++]);
  int rewritten = 0;
  for (int ai = 0; ai < c->n_attn; ai++) {
    if (!mark_uses(c, ai)) continue;
    rewritten++;
    if (mark_d(c, ai))
      ++*n_d;
    else
      ++*n_d_kept;
  }
  return rewritten;
}

static cm_status rebuild(fb_ctx *c, cm_graph **out, cm_err *err) {
  const cm_graph *g = c->old;
  cm_rewriter r;
  cm_status st = cm_rewriter_begin(&r, g, err);
  if (st) return st;
  int *keep_of = malloc(sizeof(int) * ((size_t)g->n_nodes + 1)); /* R -> its -D/z {keepdims} */
  if (!keep_of) {
    cm_rewriter_abort(&r);
    return cm_errorf(err, CM_EINTERNAL, "flash_backward: out of memory");
  }
  for (int i = 0; i < g->n_nodes && r.g->error.status == CM_OK; i++) {
    const cm_node *n = &g->nodes[i];
    keep_of[i] = -1;
    if (c->d_attn[i] >= 0) {
      r.map[i] = minus_d_over_z(c, &r, i, &keep_of[i]);
      if (r.map[i] >= 0 && n->name[0] != '%') cm_graph_rename(r.g, r.map[i], n->name, &r.g->error);
      continue;
    }
    int x = n->n_inputs == 1 ? n->inputs[0] : -1;
    if (n->op == CM_OP_RESHAPE && n->name[0] == '%' && x >= 0 && keep_of[x] >= 0 &&
        cm_shape_equal(&n->type, &r.g->nodes[keep_of[x]].type)) {
      r.map[i] = keep_of[x]; /* R's reshape back to [.., 1]: the -D/z itself */
      continue;
    }
    bool reads = false;
    for (int k = 0; k < n->n_inputs && !c->in_chain[i]; k++)
      reads |= c->use_of[n->inputs[k]] != USE_NONE;
    r.map[i] = reads ? copy_backward(c, &r, i) : cm_rewriter_copy(&r, i);
  }
  free(keep_of);
  return cm_rewriter_finish(&r, out, err);
}

cm_status cm_flash_backward(cm_graph **g, cm_flash_backward_stats *stats, cm_err *err) {
  cm_flash_backward_stats none;
  if (!stats) stats = &none;
  memset(stats, 0, sizeof *stats);
  if (!g || !*g) return cm_errorf(err, CM_EINVALID, "flash_backward: no graph");
  fb_ctx c;
  cm_status st = ctx_init(&c, *g, err);
  if (st) return st;
  int rewritten = find_attentions(&c, &stats->d_rewritten, &stats->d_kept, err);
  if (rewritten <= 0) {
    ctx_free(&c);
    memset(stats, 0, sizeof *stats);
    return rewritten < 0 ? CM_EINTERNAL : CM_OK; /* nothing to do: *g stays as it is */
  }
  stats->attentions = rewritten;
  cm_graph *built = NULL;
  st = rebuild(&c, &built, err);
  ctx_free(&c);
  if (st) return cm_err_prefix(err, "flash_backward: ");
  /* autodiff's row sums replaced by -D/z are dead now */
  cm_pass_state dead = {built, NULL};
  cm_pass_stat dce_stat = {"dce", 0, 0, 0, ""};
  if ((st = cm_pass_dce(&dead, &dce_stat, err))) {
    cm_graph_free(dead.g);
    return cm_err_prefix(err, "flash_backward: ");
  }
  cm_graph_free(*g);
  *g = dead.g;
  return CM_OK;
}

cm_status cm_pass_flash_backward(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  cm_flash_backward_stats fs;
  cm_graph *g = s->g;
  cm_status st = cm_flash_backward(&g, &fs, err);
  if (st) return st;
  if (g != s->g) {
    s->g = g; /* cm_flash_backward freed the old graph */
    if (s->plan) {
      cm_plan_free(s->plan);
      s->plan = NULL;
    }
  }
  snprintf(stat->detail, sizeof stat->detail,
           "%d attention backwards recompute S, E, P; %d with D = rowsum(dO*O), %d keep "
           "autodiff's row sum",
           fs.attentions, fs.d_rewritten, fs.d_kept);
  return CM_OK;
}
