/* codegen/attention.c — the fused attention template. fuse.c groups an
 * attention's nodes; lowering gives them stages; cm_attn_mark then finds the
 * longest span of stages, from the group's first GEMM, that runs fused per row
 * block (forward: S = Q K^T, row max, exp, row sum, P V; backward: the span of
 * dP, dS, dQ, dK, dV), and stores its plan in the first stage's cm_kattn:
 * batch vars, query rows per block (br), key block (bc), the scratch buffers
 * kept per thread (local tiles), the streaming roles (attn_fwd_match_span,
 * attn_bwd_match_span) and the workspace. cm_kattn_check verifies a span;
 * cm_kattn_*workspace give its per-thread workspace layout.
 *
 * Tunable fields (the autotuner searches exactly these; defaults below):
 *   cm_kattn.br   query rows per block (attn_br: ~48 rows, more on the CPU while
 *                 a block's scores fit 32 KiB; a multiple of mr)
 *   cm_kattn.bc   key block when streaming (attn_choose_key_block: whole key rows
 *                 while the tiles fit 512 KiB, else 64; cm_lower_opts.attn_bc)
 *   cm_kattn.mr[i], .nr[i]  the register block of each GEMM stage of a whole-row
 *                 span (attn_plan_tiles: the cheapest by attn_tile_cost among
 *                 the blocks that run from registers, attn_block_fits, within
 *                 ws_bytes, for cm_kattn.lanes); streaming spans use the first
 *                 stage's tiles (cm_kstage.tiles.mr, .nr) */
#include "lower_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- span check and workspace layout ----------------------------------------- */

/* Whether index expression e of a stage in span `a` (batch extents bdom)
 * reads only one batch item's (and, when rowwise, one query row's) slice of a
 * buffer with X elements per (batch item, row). */
static bool attn_local_index(const cm_kstage *s, const cm_kattn *a, const int64_t *bdom, int e,
                             int64_t X, bool rowwise) {
  cm_kaff f;
  int budget = 4096;
  if (!cm_kaff_of(s, e, &f, &budget)) return false;
  int64_t stride = a->rows * X;
  for (int v = a->nb - 1; v >= 0; v--) {
    /* a batch axis of extent 1 is often indexed by the constant 0 */
    if (f.c[v] != stride && bdom[v] != 1) return false;
    f.c[v] = 0;
    stride *= bdom[v];
  }
  int64_t lim = a->rows * X;
  if (rowwise) {
    if (s->n_dom <= a->nb || f.c[a->nb] != X) return false;
    f.c[a->nb] = 0;
    lim = X;
  }
  int64_t lo, hi;
  cm_kaff_range(s, &f, &lo, &hi);
  return lo >= 0 && hi < lim;
}

static bool is_local(const cm_kattn *a, int b, int *which) {
  for (int i = 0; i < a->n_local && i < CM_KATTN_MAX_LOCAL; i++)
    if (a->local[i] == b) {
      if (which) *which = i;
      return true;
    }
  return false;
}

cm_status cm_kattn_check(const cm_kernel *k, int first, cm_err *err) {
  if (!k || first < 0 || first >= k->n_stages)
    return cm_errorf(err, CM_EINVALID, "attention span: no stage %d", first);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
#define AFAIL(si, ...)                                                                             \
  do {                                                                                             \
    char why_[256];                                                                                \
    snprintf(why_, sizeof why_, __VA_ARGS__);                                                      \
    return cm_errorf(err, CM_EINVALID,                                                             \
                     "kernel %s stage %d (%s): attention span from stage %d: %s", k->name, (si),   \
                     k->stages[(si)].name, first, why_);                                           \
  } while (0)
  if (s0->tmpl != CM_KT_ATTENTION_FWD && s0->tmpl != CM_KT_ATTENTION_BWD)
    AFAIL(first, "not an attention template");
  if (a->span < 2 || first + a->span > k->n_stages)
    AFAIL(first, "span %d does not fit the kernel's %d stages", a->span, k->n_stages);
  if (a->nb < 0 || a->nb > s0->n_dom || a->rows < 1 || a->br < 1 || a->br > a->rows || a->bc < 1)
    AFAIL(first, "nb %d, rows %lld, br %d, bc %d out of range", a->nb, (long long)a->rows, a->br,
          a->bc);
  if (s0->n_parallel != a->nb)
    AFAIL(first, "n_parallel %d must equal nb %d", s0->n_parallel, a->nb);
  if (a->n_local < 0 || a->n_local > CM_KATTN_MAX_LOCAL)
    AFAIL(first, "n_local %d out of range", a->n_local);
  bool rowwise = a->br < a->rows;
  for (int i = 0; i < a->n_local; i++) {
    int b = a->local[i];
    if (b < 0 || b >= k->n_buffers || k->buffers[b].kind != CM_KBUF_SCRATCH)
      AFAIL(first, "local %d (b%d) is not a scratch buffer", i, b);
    for (int j = 0; j < i; j++)
      if (a->local[j] == b) AFAIL(first, "b%d listed twice as local", b);
    int64_t bat = 1;
    for (int v = 0; v < a->nb; v++) bat *= s0->dom[v];
    if (a->local_row[i] < 1 || bat * a->rows * a->local_row[i] != k->buffers[b].numel)
      AFAIL(first, "local b%d: %lld elements is not batch x rows x local_row %lld", b,
            (long long)k->buffers[b].numel, (long long)a->local_row[i]);
  }
  int last = first + a->span;
  bool *wr = calloc((size_t)k->n_buffers + 1, 1), *rd = calloc((size_t)k->n_buffers + 1, 1);
  int64_t *shx = calloc((size_t)k->n_buffers + 1, sizeof *shx);
  if (!wr || !rd || !shx) {
    free(wr), free(rd), free(shx);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  /* buffers both written and read by the span (not local) are shared in
     memory: every access of the span must stay within the work item's slice */
  int64_t bat0 = 1;
  for (int v = 0; v < a->nb; v++) bat0 *= s0->dom[v];
  for (int si = first; si < last; si++) {
    const cm_kstage *s = &k->stages[si];
    for (int e = 0; e < s->n_exprs; e++)
      if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf >= 0 && s->exprs[e].buf < k->n_buffers)
        rd[s->exprs[e].buf] = true;
    for (int j = 0; j < s->n_stores; j++)
      if (s->stores[j].buf >= 0 && s->stores[j].buf < k->n_buffers) wr[s->stores[j].buf] = true;
  }
  for (int b = 0; b < k->n_buffers; b++) {
    if (!wr[b] || !rd[b] || is_local(a, b, NULL)) continue;
    int64_t per = bat0 * a->rows;
    shx[b] = k->buffers[b].numel % per ? -1 : k->buffers[b].numel / per;
  }
  cm_status st = CM_OK;
  char why[256] = "";
  int bad_stage = first;
  for (int si = 0; si < k->n_stages && !why[0]; si++) {
    const cm_kstage *s = &k->stages[si];
    bool in = si >= first && si < last;
    bad_stage = si;
    if (in) {
      if (si > first && (s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD))
        snprintf(why, sizeof why, "a stage of the span carries another attention template");
      else if (s->accumulate)
        snprintf(why, sizeof why, "an accumulating stage inside the span");
      else if (s->n_dom < a->nb + (rowwise ? 1 : 0))
        snprintf(why, sizeof why, "n_dom %d below the batch vars (+ row)", s->n_dom);
      for (int v = 0; v < a->nb && !why[0]; v++)
        if (s->dom[v] != s0->dom[v])
          snprintf(why, sizeof why, "batch extent dom[%d] = %lld differs from the first stage's", v,
                   (long long)s->dom[v]);
      if (!why[0] && rowwise && s->dom[a->nb] != a->rows)
        snprintf(why, sizeof why, "dom[%d] = %lld is not the query rows %lld (br < rows)", a->nb,
                 (long long)s->dom[a->nb], (long long)a->rows);
    }
    for (int e = 0; e < s->n_exprs && !why[0]; e++) {
      const cm_kexpr *x = &s->exprs[e];
      if (x->kind != CM_KX_LOAD) continue;
      int li;
      bool loc = is_local(a, x->buf, &li);
      if (loc && !in)
        snprintf(why, sizeof why, "local b%d read outside the span", x->buf);
      else if (loc && !attn_local_index(s, a, s0->dom, x->a, a->local_row[li], rowwise))
        snprintf(why, sizeof why, "expr %d: load of local b%d not provably per batch item%s", e,
                 x->buf, rowwise ? " and query row" : "");
      else if (in && !loc && x->buf >= 0 && x->buf < k->n_buffers && shx[x->buf] &&
               (shx[x->buf] < 0 || !attn_local_index(s, a, s0->dom, x->a, shx[x->buf], rowwise)))
        snprintf(why, sizeof why,
                 "expr %d: b%d is written and read by the span but this load is not provably "
                 "per batch item%s",
                 e, x->buf, rowwise ? " and query row" : "");
    }
    for (int j = 0; j < s->n_stores && !why[0]; j++) {
      const cm_kstore *t = &s->stores[j];
      int li;
      bool loc = is_local(a, t->buf, &li);
      if (loc && !in)
        snprintf(why, sizeof why, "local b%d written outside the span", t->buf);
      else if (loc && !attn_local_index(s, a, s0->dom, t->index, a->local_row[li], rowwise))
        snprintf(why, sizeof why, "store %d to local b%d not provably per batch item%s", j, t->buf,
                 rowwise ? " and query row" : "");
      else if (in && !loc && t->buf >= 0 && t->buf < k->n_buffers && shx[t->buf] &&
               (shx[t->buf] < 0 ||
                !attn_local_index(s, a, s0->dom, t->index, shx[t->buf], rowwise)))
        snprintf(why, sizeof why,
                 "store %d: b%d is written and read by the span but this store is not provably "
                 "per batch item%s",
                 j, t->buf, rowwise ? " and query row" : "");
    }
  }
  free(wr), free(rd), free(shx);
  if (why[0]) AFAIL(bad_stage, "%s", why);
#undef AFAIL
  return st;
}

static int64_t up64(int64_t v) {
  return (v + 63) / 64 * 64;
}

int64_t cm_kattn_workspace(const cm_kernel *k, int first, int mr, int nr, int64_t *local_off,
                           int64_t *pack_off) {
  if (!k || first < 0 || first >= k->n_stages || mr < 1 || nr < 1) return 0;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if ((s0->tmpl != CM_KT_ATTENTION_FWD && s0->tmpl != CM_KT_ATTENTION_BWD) || a->span < 2 ||
      first + a->span > k->n_stages || a->n_local < 0 || a->n_local > CM_KATTN_MAX_LOCAL)
    return 0;
  int64_t rows = a->br < a->rows ? a->br : a->rows, off = 0;
  for (int i = 0; i < a->n_local; i++) {
    int b = a->local[i];
    if (b < 0 || b >= k->n_buffers) return 0;
    if (local_off) local_off[i] = off;
    off += up64(rows * a->local_row[i] * (int64_t)cm_dtype_size(k->buffers[b].dtype));
  }
  int64_t am = 0, bm = 0, cmx = 0;
  for (int si = first; si < first + a->span; si++) {
    const cm_kstage *s = &k->stages[si];
    if (s->tmpl != CM_KT_GEMM && si != first) continue;
    if (s->n_dom < 2 || s->n_red != 1) continue;
    int64_t m = a->br < a->rows ? a->br : s->dom[s->n_dom - 2];
    int64_t mp = (m + mr - 1) / mr * mr, np = (s->dom[s->n_dom - 1] + nr - 1) / nr * nr;
    int64_t K = s->red[0];
    if (mp * K > am) am = mp * K;
    if (K * np > bm) bm = K * np;
    if (mp * np > cmx) cmx = mp * np;
  }
  if (pack_off) *pack_off = off;
  off += up64(4 * am) + up64(4 * bm) + up64(4 * cmx);
  return off + 64;
}

int64_t cm_kernel_fused_scratch_bytes(const cm_kernel *k) {
  if (!k) return 0;
  int64_t end = 0;
  for (int b = 0; b < k->n_buffers; b++) {
    const cm_kbuffer *x = &k->buffers[b];
    if (x->kind != CM_KBUF_SCRATCH) continue;
    bool loc = false;
    for (int si = 0; si < k->n_stages && !loc; si++) {
      const cm_kstage *s = &k->stages[si];
      if (s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD)
        loc = is_local(&s->attn, b, NULL);
    }
    /* scratch offsets are packed in buffer order; what the fused spans keep
       per thread needs no room */
    if (!loc) end += up64(x->numel * (int64_t)cm_dtype_size(x->dtype));
  }
  return end < k->scratch_bytes ? end : k->scratch_bytes;
}

/* ---- matching a span and its plan (at lowering) ------------------------------ */

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

/* The softmax scale: a constant factor of the first load of S (or of its widening cast) in the
 * stage after the first. */
static double attn_scale(const cm_kernel *k, int first) {
  if (first + 1 >= k->n_stages) return 0;
  const cm_kstage *s = &k->stages[first + 1];
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_OP || x->op != CM_OP_MUL || x->b < 0) continue;
    double v;
    /* the load, or its widening (autocast's bf16 scores read as f32) */
    const cm_kexpr *f = &s->exprs[x->a];
    if (f->kind == CM_KX_OP && f->op == CM_OP_CAST && f->a >= 0) f = &s->exprs[f->a];
    if (f->kind == CM_KX_LOAD && cm_kx_is_const(s, x->b, &v)) return v;
  }
  return 0;
}

/* Query rows per block: about 48 rows (an S tile of 48 x N floats stays in L2
 * with N ~ 200), split evenly, a multiple of the register block's rows. On the
 * CPU more rows while a block's score tile stays within L1 (32 KiB of rows x
 * keys floats): whole rows up to 126 at 65 keys, where the forward ran ~10 %
 * faster than in blocks of 36 rows (K and V packed once, no short last block). */
static int attn_br(int64_t rows, int64_t keys, int mr, bool cpu) {
  int64_t want = 48;
  if (cpu && keys > 0 && ((int64_t)32 << 10) / (4 * keys) > want)
    want = ((int64_t)32 << 10) / (4 * keys);
  int64_t nblk = (rows + want - 1) / want;
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

typedef struct attn_fwd_match {
  const cm_kernel *k;
  const int64_t *dom0; /* the first stage's batch extents */
  int nb;
  int64_t rows, keys;
  int s_buf; /* the scores: f32, or bf16 after autocast (a matmul's bf16 result) */
} attn_fwd_match;

/* Expression e without autocast's rounding of a GEMM operand: the f32 operand
 * of a cast to bf16, else e. */
static int attn_uncast(const cm_kstage *s, int e) {
  const cm_kexpr *x = &s->exprs[e];
  if (x->kind == CM_KX_OP && x->op == CM_OP_CAST && x->dtype == CM_BF16 && x->a >= 0 &&
      s->exprs[x->a].dtype == CM_F32)
    return x->a;
  return e;
}

/* The batch vars of stage s (its row var follows them): n_dom - 2 for the
 * [batch, rows, keys or columns] stages, and for row statistics laid out
 * [batch, rows, 1]; n_dom - 1 for [batch, rows]. They must be the first
 * stage's batch, or all of extent 1 when that batch is one item (the
 * simplifier drops unit axes from some stages only). -1 when neither. */
static int attn_fwd_nbs(const cm_kstage *s, const int64_t *dom0, int nb, bool stat) {
  int n = s->n_dom - 2;
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) n = s->n_dom - 1;
  if (n < 0) return -1;
  int64_t bat = 1, sb = 1;
  for (int v = 0; v < nb; v++) bat *= dom0[v];
  for (int v = 0; v < n; v++) sb *= s->dom[v];
  if (n == nb && (nb == 0 || !memcmp(s->dom, dom0, sizeof(int64_t) * (size_t)nb))) return n;
  return bat == 1 && sb == 1 ? n : -1;
}

/* Every load in stage s (batch vars nbs) of one of bufs[0..n) reads f32 (the
 * scores: f32 or bf16) at its canonical index (X = xs[i]; key or column var cv). */
static bool attn_fwd_loads_ok(const attn_fwd_match *m, const cm_kstage *s, int nbs, const int *bufs,
                              const int64_t *xs, int n, int cv) {
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_LOAD) continue;
    for (int i = 0; i < n; i++) {
      if (x->buf != bufs[i]) continue;
      cm_dtype bd = m->k->buffers[x->buf].dtype;
      bool dt_ok = bd == CM_F32 || (bd == CM_BF16 && x->buf == m->s_buf);
      if (x->dtype != bd || !dt_ok ||
          !attn_canon(s, x->a, s->dom, nbs, m->rows, nbs, xs[i] > 1 ? cv : -1, xs[i]))
        return false;
    }
  }
  return true;
}

/* Whether stage s loads only buffers of bufs[0..n). */
static bool attn_fwd_loads_only(const cm_kstage *s, const int *bufs, int n) {
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
static int attn_fwd_row_stat(const attn_fwd_match *m, const cm_kstage *s, cm_kreduce op, int *nbs) {
  *nbs = attn_fwd_nbs(s, m->dom0, m->nb, true);
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
static int attn_fwd_tile_store(const attn_fwd_match *m, const cm_kstage *s, int *nbs) {
  *nbs = attn_fwd_nbs(s, m->dom0, m->nb, false);
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
static bool attn_fwd_is_norm(const cm_kstage *s, int e, int eb, int lb) {
  const cm_kexpr *x = &s->exprs[e];
#define ATTN_IS_LOAD(id, b) (s->exprs[id].kind == CM_KX_LOAD && s->exprs[id].buf == (b))
  if (x->kind != CM_KX_OP || x->dtype != CM_F32) return false;
  if (x->op == CM_OP_DIV) return ATTN_IS_LOAD(x->a, eb) && ATTN_IS_LOAD(x->b, lb);
  if (x->op != CM_OP_MUL) return false;
  for (int side = 0; side < 2; side++) {
    int ea = side ? x->b : x->a, rl = side ? x->a : x->b;
    const cm_kexpr *r = &s->exprs[rl];
    if (!ATTN_IS_LOAD(ea, eb) || r->kind != CM_KX_OP || r->dtype != CM_F32) continue;
    double one;
    if (r->op == CM_OP_RECIP && ATTN_IS_LOAD(r->a, lb)) return true;
    if (r->op == CM_OP_DIV && cm_kx_is_const(s, r->a, &one) && one == 1 && ATTN_IS_LOAD(r->b, lb))
      return true;
  }
  return false;
#undef ATTN_IS_LOAD
}

/* Whether the cone of expression e loads buffer b (operands have smaller ids:
 * one downward sweep). */
static bool attn_fwd_cone_loads(const cm_kstage *s, int e, int b) {
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
static bool attn_fwd_match_span(const cm_kernel *k, int first, cm_kattn *a) {
  const cm_kstage *s0 = &k->stages[first];
  int nb = a->nb;
  if (a->span != 5 && a->span != 6) return false;
  if (s0->n_dom != nb + 2 || s0->n_red != 1 || s0->acc_dtype != CM_F32 || s0->n_stores != 1 ||
      s0->dom[nb] != a->rows)
    return false;
  const cm_kstore *ss = &s0->stores[0];
  int sb = ss->buf;
  attn_fwd_match m = {k, s0->dom, nb, a->rows, s0->dom[nb + 1], sb};
  if (m.keys < 2) return false;
  /* S: one store of a function of ACC alone (a scale, a cast) at the canonical index, into
   * f32 or (autocast) bf16 */
  cm_dtype sbd = k->buffers[sb].dtype;
  if (s0->exprs[ss->value].dtype != CM_F32 || (sbd != CM_F32 && sbd != CM_BF16) ||
      !attn_canon(s0, ss->index, s0->dom, nb, m.rows, nb, nb + 1, m.keys))
    return false;
  for (int e = 0; e < s0->n_exprs; e++)
    if (s0->exprs[e].kind == CM_KX_LOAD && attn_fwd_cone_loads(s0, ss->value, s0->exprs[e].buf))
      return false;
  int nbs;
  int64_t xs[2] = {m.keys, 1};
  /* m = rowmax(f(S)) */
  const cm_kstage *sm = &k->stages[first + 1];
  int mb = attn_fwd_row_stat(&m, sm, CM_KRED_MAX, &nbs);
  int bl[2] = {sb, -1};
  if (mb < 0 || !attn_fwd_loads_only(sm, bl, 1) ||
      !attn_fwd_loads_ok(&m, sm, nbs, bl, xs, 1, sm->n_dom))
    return false;
  /* E = exp(g(S) - m) */
  const cm_kstage *se = &k->stages[first + 2];
  int eb = attn_fwd_tile_store(&m, se, &nbs);
  bl[1] = mb;
  if (eb < 0 || !attn_fwd_loads_only(se, bl, 2) ||
      !attn_fwd_loads_ok(&m, se, nbs, bl, xs, 2, nbs + 1))
    return false;
  const cm_kexpr *ev = &se->exprs[se->stores[0].value];
  if (ev->kind != CM_KX_OP || ev->op != CM_OP_EXP) return false;
  const cm_kexpr *sub = &se->exprs[ev->a];
  if (sub->kind != CM_KX_OP || sub->op != CM_OP_SUB || sub->dtype != CM_F32 ||
      se->exprs[sub->b].kind != CM_KX_LOAD || se->exprs[sub->b].buf != mb ||
      attn_fwd_cone_loads(se, sub->a, mb))
    return false;
  /* l = rowsum(E) */
  const cm_kstage *sl = &k->stages[first + 3];
  int lb = attn_fwd_row_stat(&m, sl, CM_KRED_SUM, &nbs);
  const cm_kexpr *lbody = lb >= 0 ? &sl->exprs[sl->body] : NULL;
  if (!lbody || lbody->kind != CM_KX_LOAD || lbody->buf != eb || !attn_fwd_loads_only(sl, &eb, 1) ||
      !attn_fwd_loads_ok(&m, sl, nbs, &eb, xs, 1, sl->n_dom))
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
    pb = attn_fwd_tile_store(&m, sq, &nbs);
    if (pb < 0 || !attn_fwd_is_norm(sq, sq->stores[0].value, eb, lb) ||
        !attn_fwd_loads_only(sq, el, 2) || !attn_fwd_loads_ok(&m, sq, nbs, el, xs, 2, nbs + 1))
      return false;
  }
  const cm_kstage *so = &k->stages[so_i];
  nbs = attn_fwd_nbs(so, s0->dom, nb, false);
  if (nbs < 0 || so->n_red != 1 || so->red_op != CM_KRED_SUM || so->acc_dtype != CM_F32 ||
      so->red[0] != m.keys || so->dom[nbs] != m.rows || so->accumulate || so->gemm_a < 0 ||
      so->gemm_b < 0)
    return false;
  int roles[5] = {sb, mb, eb, lb, pb};
  int ga = attn_uncast(so, so->gemm_a); /* P, or its bf16 rounding (autocast) */
  if (pb >= 0 && sp < so_i && so->exprs[ga].kind == CM_KX_LOAD && so->exprs[ga].buf == pb) {
    if (!attn_fwd_loads_ok(&m, so, nbs, &pb, xs, 1, so->n_dom)) return false;
    for (int e = 0; e < so->n_exprs; e++) /* P read only as gemm_a */
      if (e != ga && so->exprs[e].kind == CM_KX_LOAD && so->exprs[e].buf == pb) return false;
  } else if (!attn_fwd_is_norm(so, ga, eb, lb) ||
             !attn_fwd_loads_ok(&m, so, nbs, el, xs, 2, so->n_dom)) {
    return false;
  }
  /* the operand V, the epilogue and the stores touch no role except through gemm_a */
  for (int r = 0; r < 5; r++) {
    if (roles[r] < 0) continue;
    for (int q = r + 1; q < 5; q++)
      if (roles[q] == roles[r]) return false;
    if (attn_fwd_cone_loads(so, so->gemm_b, roles[r])) return false;
    for (int j = 0; j < so->n_stores; j++)
      if (so->stores[j].buf == roles[r] || attn_fwd_cone_loads(so, so->stores[j].value, roles[r]) ||
          attn_fwd_cone_loads(so, so->stores[j].index, roles[r]))
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

static int64_t attn_fwd_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

/* ---- backward streaming ---- */

/* Which local buffer b is (index into a->local), or -1. */
static int attn_bwd_local(const cm_kattn *a, int b) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == b) return i;
  return -1;
}

/* Whether any stage of [first, end) stores into buffer b. */
static bool attn_bwd_span_writes(const cm_kernel *k, int first, int end, int b) {
  for (int si = first; si < end; si++)
    for (int j = 0; j < k->stages[si].n_stores; j++)
      if (k->stages[si].stores[j].buf == b) return true;
  return false;
}

/* The dtypes a local tile of a backward span may have: f32, or autocast's bf16 or f16 (S', dP,
 * dS rounded for their GEMMs); renderers keep every tile as f32 (the widening is exact). */
static bool attn_bwd_tile_dtype(cm_dtype t) {
  return t == CM_F32 || t == CM_BF16 || t == CM_F16;
}

/* Every load of stage s: a local tile at its canonical index with key var cv
 * (row var rv), a local row statistic at its canonical row, or a buffer the
 * span never writes. Row statistics refused when !stats. */
static bool attn_bwd_loads_ok(const cm_kernel *k, int first, int end, const cm_kattn *a,
                              const cm_kstage *s, int nbs, int rv, int cv, bool stats) {
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_LOAD) continue;
    int li = attn_bwd_local(a, x->buf);
    if (li < 0) {
      if (attn_bwd_span_writes(k, first, end, x->buf)) return false;
      continue;
    }
    if (x->dtype != k->buffers[x->buf].dtype || !attn_bwd_tile_dtype(x->dtype)) return false;
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
static bool attn_bwd_cone_local(const cm_kstage *s, int e, const cm_kattn *a) {
  for (int i = 0; i < a->n_local; i++)
    if (attn_fwd_cone_loads(s, e, a->local[i])) return true;
  return false;
}

/* A GEMM of the backward span over rows or keys (not a tile): its operand gemm_b and its
 * epilogue read no local buffer, its stores go to buffers the span never reads, and every local
 * buffer gemm_a's cone loads is a tile at the canonical index with (row var, key var) = (rv, cv)
 * (gemm_a may be any expression of tiles and of buffers the span never writes: P' = E' / z,
 * cast(P', bf16), dS). */
static bool attn_bwd_gemm_ok(const cm_kernel *k, int first, int end, const cm_kattn *a,
                             const cm_kstage *s, int nbs, int rv, int cv) {
  if (attn_bwd_cone_local(s, s->gemm_b, a)) return false;
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (x->kind != CM_KX_LOAD || !attn_fwd_cone_loads(s, s->gemm_a, x->buf)) continue;
    int li = attn_bwd_local(a, x->buf);
    if (li < 0) {
      if (attn_bwd_span_writes(k, first, end, x->buf)) return false;
      continue;
    }
    if (x->dtype != k->buffers[x->buf].dtype || !attn_bwd_tile_dtype(x->dtype) ||
        a->local_row[li] != k->stages[first].dom[a->nb + 1] ||
        !attn_canon(s, x->a, s->dom, nbs, a->rows, rv, cv, a->local_row[li]))
      return false;
  }
  for (int j = 0; j < s->n_stores; j++) {
    const cm_kstore *st = &s->stores[j];
    if (attn_bwd_local(a, st->buf) >= 0 || attn_bwd_cone_local(s, st->value, a) ||
        attn_bwd_cone_local(s, st->index, a))
      return false;
    for (int si = first; si < end; si++)
      for (int e = 0; e < k->stages[si].n_exprs; e++)
        if (k->stages[si].exprs[e].kind == CM_KX_LOAD && k->stages[si].exprs[e].buf == st->buf)
          return false;
  }
  return true;
}

/* Stage s is a GEMM tile of the backward span: [batch, rows, keys] over its own reduction
 * (S' = Q K^T, dP = dO V^T), the first stage's batch, one store of an epilogue of its
 * accumulator alone (a scale, autocast's rounding) into a local tile at the canonical index, its
 * operands reading no local buffer. */
static bool attn_bwd_gemm_tile(const cm_kernel *k, int first, const cm_kattn *a, const cm_kstage *s,
                               int64_t keys) {
  int nb = a->nb;
  if (s->n_dom != nb + 2 || s->n_red != 1 || s->red_op != CM_KRED_SUM || s->acc_dtype != CM_F32 ||
      s->accumulate || s->n_stores != 1 || s->gemm_a < 0 || s->gemm_b < 0 ||
      s->dom[nb] != a->rows || s->dom[nb + 1] != keys ||
      memcmp(s->dom, k->stages[first].dom, sizeof(int64_t) * (size_t)nb))
    return false;
  const cm_kstore *ss = &s->stores[0];
  int li = attn_bwd_local(a, ss->buf);
  if (li < 0 || a->local_row[li] != keys || !attn_bwd_tile_dtype(s->exprs[ss->value].dtype) ||
      !attn_bwd_tile_dtype(k->buffers[ss->buf].dtype) ||
      !attn_canon(s, ss->index, s->dom, nb, a->rows, nb, nb + 1, keys) ||
      attn_bwd_cone_local(s, ss->value, a) || attn_bwd_cone_local(s, s->gemm_a, a) ||
      attn_bwd_cone_local(s, s->gemm_b, a))
    return false;
  for (int e = 0; e < s->n_exprs; e++)
    if (s->exprs[e].kind == CM_KX_LOAD && attn_fwd_cone_loads(s, ss->value, s->exprs[e].buf))
      return false;
  return true;
}

/* Stage s is [batch, rows, keys] elementwise with one store at the canonical index into a
 * buffer of a tile dtype (attn_bwd_tile_dtype; the store rounds a wider value to it); returns
 * the buffer. */
static int attn_bwd_tile_store(const attn_fwd_match *m, const cm_kstage *s, int *nbs) {
  *nbs = attn_fwd_nbs(s, m->dom0, m->nb, false);
  if (*nbs < 0 || s->n_red != 0 || s->dom[*nbs] != m->rows || s->dom[*nbs + 1] != m->keys ||
      s->accumulate || s->n_stores != 1 || s->tmpl != CM_KT_NONE)
    return -1;
  const cm_kstore *st = &s->stores[0];
  cm_dtype t = m->k->buffers[st->buf].dtype;
  if (!attn_bwd_tile_dtype(s->exprs[st->value].dtype) || !attn_bwd_tile_dtype(t) ||
      !attn_canon(s, st->index, s->dom, *nbs, m->rows, *nbs, *nbs + 1, m->keys))
    return -1;
  return st->buf;
}

/* Recognises a backward span that streams over key blocks and fills a->role. */
static bool attn_bwd_match_span(const cm_kernel *k, int first, cm_kattn *a) {
  const cm_kstage *s0 = &k->stages[first];
  int nb = a->nb, end = first + a->span;
  if (a->span > CM_KATTN_MAX_SPAN || a->br < a->rows || s0->n_dom != nb + 2 || s0->n_red != 1 ||
      s0->acc_dtype != CM_F32 || s0->n_stores != 1 || s0->dom[nb] != a->rows)
    return false;
  int64_t keys = s0->dom[nb + 1];
  if (keys < 2) return false;
  attn_fwd_match m = {k, s0->dom, nb, a->rows, keys, -1};
  for (int i = 0; i < a->n_local; i++) {
    cm_dtype t = k->buffers[a->local[i]].dtype;
    if (a->local_row[i] == keys ? !attn_bwd_tile_dtype(t) : a->local_row[i] != 1 || t != CM_F32)
      return false;
  }
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
    if (r == 0 || attn_bwd_gemm_tile(k, first, a, s, keys)) {
      if (!attn_bwd_gemm_tile(k, first, a, s, keys)) return false;
      role[r] = r == 0 ? CM_KATTN_ROLE_TILE : CM_KATTN_ROLE_GEMM_TILE;
    } else if (s->n_red == 0) {
      b = attn_bwd_tile_store(&m, s, &nbs);
      if (b < 0 || attn_bwd_local(a, b) < 0 || a->local_row[attn_bwd_local(a, b)] != keys ||
          !attn_bwd_loads_ok(k, first, end, a, s, nbs, nbs, nbs + 1, true))
        return false;
      int li = attn_bwd_local(a, b);
      for (int e = 0; e < s->n_exprs; e++) {
        if (s->exprs[e].kind != CM_KX_LOAD) continue;
        int lj = attn_bwd_local(a, s->exprs[e].buf);
        if (lj >= 0 && (a->local_row[lj] == 1 || dep_stat[lj])) dep_stat[li] = true;
      }
      role[r] = CM_KATTN_ROLE_TILE;
    } else if (s->tmpl != CM_KT_GEMM) {
      b = attn_fwd_row_stat(&m, s, s->red_op, &nbs);
      if (b < 0 || attn_bwd_local(a, b) < 0 || a->local_row[attn_bwd_local(a, b)] != 1 ||
          !attn_bwd_loads_ok(k, first, end, a, s, nbs, nbs, s->n_dom, false))
        return false;
      for (int e = 0; e < s->n_exprs; e++) {
        if (s->exprs[e].kind != CM_KX_LOAD) continue;
        int lj = attn_bwd_local(a, s->exprs[e].buf);
        if (lj >= 0 && dep_stat[lj]) return false;
      }
      role[r] = CM_KATTN_ROLE_ROWRED;
    } else {
      nbs = attn_fwd_nbs(s, s0->dom, nb, false);
      if (nbs < 0 || s->n_dom != nbs + 2 || s->n_red != 1 || s->red_op != CM_KRED_SUM ||
          s->acc_dtype != CM_F32 || s->accumulate || s->gemm_a < 0 || s->gemm_b < 0)
        return false;
      if (s->dom[nbs] == a->rows && s->red[0] == keys &&
          attn_bwd_gemm_ok(k, first, end, a, s, nbs, nbs, s->n_dom))
        role[r] = CM_KATTN_ROLE_GEMM_ROWS;
      else if (s->dom[nbs] == keys && s->red[0] == a->rows &&
               attn_bwd_gemm_ok(k, first, end, a, s, nbs, s->n_dom, nbs))
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
  int64_t rows = a->rows, rp = attn_fwd_up(rows, mr), bc = a->bc, ldt = attn_fwd_up(bc, nr);
  int64_t bcm = attn_fwd_up(bc, mr), d = s0->red[0];
  int64_t am = 0, bm = d * ldt, cm = rp * ldt;
  int64_t o = 0;
  for (int r = 0; r < a->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    if (stage_off) stage_off[r] = 0;
    if (a->role[r] == CM_KATTN_ROLE_GEMM_TILE && s->n_red == 1) {
      bm = bm > s->red[0] * ldt ? bm : s->red[0] * ldt;
      continue;
    }
    if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS && a->role[r] != CM_KATTN_ROLE_GEMM_KEYS) continue;
    if (s->n_dom < 2) return 0;
    int64_t cp = attn_fwd_up(s->dom[s->n_dom - 1], nr);
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
    o += attn_fwd_up(4 * (sz[i] > 0 ? sz[i] : 1), 64);
  }
  for (int i = 0; i < a->n_local; i++) {
    if (local_off) local_off[i] = o;
    o += attn_fwd_up(4 * (a->local_row[i] == 1 ? rp : rp * ldt), 64);
  }
  for (int r = 0; r < a->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    if (a->role[r] == CM_KATTN_ROLE_GEMM_TILE && s->n_red == 1) {
      if (stage_off) stage_off[r] = o;
      o += attn_fwd_up(4 * rp * s->red[0], 64);
      continue;
    }
    if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS && a->role[r] != CM_KATTN_ROLE_GEMM_KEYS) continue;
    int64_t cp = attn_fwd_up(s->dom[s->n_dom - 1], nr);
    if (stage_off) stage_off[r] = o;
    o += attn_fwd_up(4 * (a->role[r] == CM_KATTN_ROLE_GEMM_ROWS ? rp * cp : rows * cp), 64);
  }
  return o + 64;
}

/* What every streaming span needs (forward or backward): cm_kattn_check's span and a key
 * block bc in [1, keys). */
static cm_status attn_stream_check_span(const cm_kernel *k, int first, cm_err *err) {
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_status st = cm_kattn_check(k, first, err);
  if (st != CM_OK) return st;
  int64_t keys = s0->n_dom >= 2 ? s0->dom[s0->n_dom - 1] : 0;
  /* one key block (bc == keys) only forward and in a backward without row reductions: the
   * backward's two passes need bc < keys */
  bool two_pass = false;
  for (int r = 0; s0->tmpl == CM_KT_ATTENTION_BWD && r < a->span && r < CM_KATTN_MAX_SPAN; r++)
    two_pass |= a->role[r] == CM_KATTN_ROLE_ROWRED;
  int64_t top = two_pass ? keys : keys + 1;
  if (a->bc < 1 || a->bc >= top)
    return cm_errorf(err, CM_EINVALID, "kernel %s stage %d: key block bc %d not in [1, %lld)",
                     k->name, first, a->bc, (long long)top);
  return CM_OK;
}

cm_status cm_kattn_stream_check(const cm_kernel *k, int first, cm_err *err) {
  if (!k || first < 0 || first >= k->n_stages)
    return cm_errorf(err, CM_EINVALID, "cm_kattn_stream_check: no kernel or stage %d out of range",
                     first);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (s0->tmpl == CM_KT_ATTENTION_BWD && a->stream) {
    cm_status st = attn_stream_check_span(k, first, err);
    if (st != CM_OK) return st;
    cm_kattn t = *a;
    if (!attn_bwd_match_span(k, first, &t))
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
  cm_status st = attn_stream_check_span(k, first, err);
  if (st != CM_OK) return st;
  cm_kattn t = *a;
  if (!attn_fwd_match_span(k, first, &t))
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
  int64_t br = a->br < a->rows ? a->br : a->rows, brp = attn_fwd_up(br, mr);
  int64_t d = s0->red[0], dv = so->dom[so->n_dom - 1], bc = a->bc;
  int64_t sz[8] = {brp * d,
                   d * attn_fwd_up(bc, nr) > bc * attn_fwd_up(dv, nr) ? d * attn_fwd_up(bc, nr)
                                                                      : bc * attn_fwd_up(dv, nr),
                   brp * attn_fwd_up(bc, nr),
                   brp * bc,
                   brp * attn_fwd_up(dv, nr),
                   brp,
                   brp,
                   brp};
  int64_t o = 0;
  for (int i = 0; i < 8; i++) {
    if (off) off[i] = o;
    o += attn_fwd_up(4 * sz[i], 64);
  }
  return o + 64;
}

void cm_kattn_layout(cm_kernel *k, int first, int mr, int nr) {
  if (!k || first < 0 || first >= k->n_stages) return;
  cm_kattn *a = &k->stages[first].attn;
  a->whole_bytes = a->pack_off = 0;
  memset(a->local_off, 0, sizeof a->local_off);
  memset(a->stream_off, 0, sizeof a->stream_off);
  memset(a->bwd_fixed, 0, sizeof a->bwd_fixed);
  memset(a->bwd_local_off, 0, sizeof a->bwd_local_off);
  memset(a->stage_off, 0, sizeof a->stage_off);
  a->whole_bytes = cm_kattn_workspace(k, first, mr, nr, a->local_off, &a->pack_off);
  if (!a->stream) return;
  if (k->stages[first].tmpl == CM_KT_ATTENTION_BWD)
    cm_kattn_bwd_stream_workspace(k, first, mr, nr, a->bwd_fixed, a->bwd_local_off, a->stage_off);
  else
    cm_kattn_stream_workspace(k, first, mr, nr, a->stream_off);
}

/* Estimated cycles of an m x n x K GEMM stage of the span with an mr x nr
 * register block: per k step the FMAs (two a cycle), the loads of the
 * broadcasts and B vectors, and the FMA latency when there are few
 * accumulators; per block its C tile stores; per element its epilogue. The
 * padding of the last row and column panels is paid in full (a 65-column S
 * with nr = 64 does twice the work of nr = 16 x 5). */
static double attn_tile_cost(int64_t m, int64_t n, int64_t K, int mr, int nr, int W) {
  double nv = nr / W, acc = mr * nv;
  double per_k = fmax(fmax(acc / 2, (mr + nv) / 2), 4) + 0.5;
  double blocks = (double)((m + mr - 1) / mr) * (double)((n + nr - 1) / nr);
  return blocks * (K * per_k + acc + 8);
}

/* Whether an mr x nv-vector block runs from registers on a target with W f32
 * lanes (32 vector registers with AVX-512, else 16): its accumulators, B
 * vectors and a broadcast fit, and the accumulators leave 4 registers for the
 * loads LLVM hoists from the next (unrolled) k step. Beyond that the k loop
 * spills, which attn_tile_cost does not see: on AVX2 (Zen 3), 9 x 24 (31 live
 * vectors) spilled 120 vectors per 48 FMAs, 13 x 8 (15) 18 per 52, while 6 x 16
 * and 4 x 24 (12 accumulators) spilled none. */
static bool attn_block_fits(int mr, int nv, int W) {
  int regs = W >= 16 ? 32 : 16;
  return mr * nv + nv + 1 <= regs && mr * nv <= regs - 4;
}

/* Whether stage s (the span's first when first) is one of the span's GEMM stages. */
static bool attn_is_gemm_stage(const cm_kattn *a, const cm_kstage *s, bool first) {
  return (first || s->tmpl == CM_KT_GEMM) && s->n_red == 1 && s->n_dom == a->nb + 2 &&
         s->red_op == CM_KRED_SUM && s->acc_dtype == CM_F32 && s->gemm_a >= 0 && s->gemm_b >= 0;
}

int64_t cm_kattn_pack_need(const cm_kernel *k, int first, const int *mr, const int *nr, int64_t *am,
                           int64_t *bm) {
  const cm_kattn *a = &k->stages[first].attn;
  int64_t pack_off = 0;
  cm_kattn_workspace(k, first, 1, 1, NULL, &pack_off);
  bool rowwise = a->br < a->rows;
  int64_t br = rowwise ? a->br : a->rows;
  int64_t fa = 0, fb = 0, fc = 0;
  for (int si = first; si < first + a->span; si++) {
    const cm_kstage *s = &k->stages[si];
    int i = si - first;
    if (!attn_is_gemm_stage(a, s, si == first)) continue;
    int64_t m = rowwise ? br : s->dom[a->nb], n = s->dom[a->nb + 1], K = s->red[0];
    int64_t mp = (m + mr[i] - 1) / mr[i] * mr[i], np = (n + nr[i] - 1) / nr[i] * nr[i];
    if (mp * K > fa) fa = mp * K;
    if (K * np > fb) fb = K * np;
    if (mp * np > fc) fc = mp * np;
  }
  *am = fa, *bm = fb;
  /* 16 floats after packed A take the whole vector stores past its last panel (render_llvm_
   * attention.c, attn_pack_kt); the workspace's 64 spare bytes hold them at the span's tiles */
  return pack_off + 4 * ((fa + 15) / 16 * 16 + 16 + (fb + 15) / 16 * 16 + fc);
}

/* The register block of each GEMM stage of a whole-row span (a->mr, a->nr):
 * the one that suits its own shape (S is rows x keys over the head dim; P V is
 * rows x head dim over the keys), stage by stage as long as the packing and C
 * tiles still fit the workspace sized for the span's tiles (ws_bytes). Left 0
 * (the first stage's tiles everywhere) when those tiles do not suit W lanes. */
static void attn_plan_tiles(cm_kernel *k, int first, int W) {
  cm_kstage *s0 = &k->stages[first];
  cm_kattn *a = &s0->attn;
  a->lanes = 0;
  memset(a->mr, 0, sizeof a->mr);
  memset(a->nr, 0, sizeof a->nr);
  int mr0 = s0->tiles.mr, nr0 = s0->tiles.nr;
  if (W < 1 || a->span > CM_KATTN_MAX_SPAN || mr0 < 1 || nr0 < W || nr0 % W || nr0 / W > 8 ||
      mr0 * (nr0 / W) > 32)
    return;
  bool rowwise = a->br < a->rows;
  int64_t br = rowwise ? a->br : a->rows;
  if (rowwise && br % mr0) return;
  int smr[CM_KATTN_MAX_SPAN], snr[CM_KATTN_MAX_SPAN];
  for (int i = 0; i < a->span; i++) smr[i] = mr0, snr[i] = nr0;
  int64_t am, bm;
  for (int si = first; si < first + a->span; si++) {
    const cm_kstage *s = &k->stages[si];
    int i = si - first;
    if (!attn_is_gemm_stage(a, s, si == first)) continue;
    int64_t m = rowwise ? br : s->dom[a->nb], n = s->dom[a->nb + 1], K = s->red[0];
    double best = attn_tile_cost(m, n, K, mr0, nr0, W);
    int keep_mr = smr[i], keep_nr = snr[i];
    for (int nv = 1; nv <= 4; nv++)
      for (int mr = 1; mr <= 16 && attn_block_fits(mr, nv, W); mr++) {
        /* rows of a block other than the last stay whole panels */
        if (rowwise && br % mr) continue;
        double cost = attn_tile_cost(m, n, K, mr, nv * W, W);
        if (cost >= best * 0.98) continue;
        smr[i] = mr, snr[i] = nv * W;
        if (cm_kattn_pack_need(k, first, smr, snr, &am, &bm) <= a->ws_bytes)
          best = cost, keep_mr = mr, keep_nr = nv * W;
        smr[i] = keep_mr, snr[i] = keep_nr;
      }
    a->mr[i] = (short)smr[i], a->nr[i] = (short)snr[i];
  }
  a->lanes = W;
}

/* The key block: forced by the options, else whole key rows while the span's
 * tiles of br x keys fit a per-thread budget (L2-sized), else 64 keys. */
static void attn_choose_key_block(cm_kernel *k, int first, const cm_lower_opts *o, int mr, int nr) {
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
  /* CUDA: a forward span always streams (flash attention: key blocks of at most 64, one block
   * when the keys fit it), so no block keeps whole score rows on chip; so does a backward span
   * without row reductions over the keys (the recomputed backward: one pass) */
  bool cuda = o && o->target && o->target->kind == CM_TARGET_CUDA;
  cm_kattn tb = *a;
  bool one_pass_bwd = s0->tmpl == CM_KT_ATTENTION_BWD && attn_bwd_match_span(k, first, &tb);
  for (int r = 0; one_pass_bwd && r < tb.span; r++)
    one_pass_bwd = tb.role[r] != CM_KATTN_ROLE_ROWRED;
  bool cuda_fwd = cuda && (s0->tmpl == CM_KT_ATTENTION_FWD || one_pass_bwd) && !(o->attn_bc > 0);
  if (o && o->attn_bc > 0)
    bc = o->attn_bc < keys ? o->attn_bc : keys;
  else if (a->ws_bytes > ((int64_t)512 << 10) || cuda_fwd)
    bc = 64 < keys ? 64 : keys;
  if (bc >= keys && !cuda_fwd) return;
  cm_kattn t = *a;
  if (s0->tmpl == CM_KT_ATTENTION_BWD) {
    if (!attn_bwd_match_span(k, first, &t)) return;
    t.stream = true;
    t.bc = (int)bc;
    *a = t;
    a->ws_bytes = cm_kattn_bwd_stream_workspace(k, first, mr, nr, NULL, NULL, NULL);
    return;
  }
  if (!attn_fwd_match_span(k, first, &t)) return;
  /* the CPU's streaming rendering takes f32 spans only (autocast's bf16 scores and GEMM
   * operands keep the whole-row rendering there) */
  const cm_kstage *so = &k->stages[t.st_out];
  if (!cuda && (k->buffers[t.buf_s].dtype != CM_F32 || attn_uncast(so, so->gemm_a) != so->gemm_a))
    return;
  t.stream = true;
  t.bc = (int)bc;
  *a = t;
  a->ws_bytes = cm_kattn_stream_workspace(k, first, mr, nr, NULL);
}

void cm_kattn_replan(cm_kernel *k, int first, int lanes) {
  cm_kstage *s0 = &k->stages[first];
  cm_kattn *a = &s0->attn;
  int mr = s0->tiles.mr, nr = s0->tiles.nr;
  a->ws_bytes = cm_kattn_workspace(k, first, mr, nr, NULL, NULL);
  if (a->stream)
    a->ws_bytes = s0->tmpl == CM_KT_ATTENTION_BWD
                      ? cm_kattn_bwd_stream_workspace(k, first, mr, nr, NULL, NULL, NULL)
                      : cm_kattn_stream_workspace(k, first, mr, nr, NULL);
  attn_plan_tiles(k, first, lanes);
  cm_kattn_layout(k, first, mr, nr);
}

/* Marks the span of stages [first, end) when cm_kattn_check holds for it (row blocks when every
 * stage is local to the query row, else whole batch items) and, with want_stream, the span
 * streams; else leaves the kernel as it was. */
static bool attn_try_span(cm_kernel *k, const cm_lower_opts *o, int first, int end, int mr, int nr,
                          bool want_stream) {
  cm_kstage *s0 = &k->stages[first];
  cm_kstage saved = *s0;
  int nb = s0->n_dom - 2;
  int64_t rows = s0->dom[nb];
  cm_kattn a;
  memset(&a, 0, sizeof a);
  a.span = end - first;
  a.nb = nb;
  a.rows = rows;
  a.bc = (int)(rows < 64 ? rows : 64);
  a.scale = attn_scale(k, first);
  int64_t bat = 1;
  for (int v = 0; v < nb; v++) bat *= s0->dom[v];
  for (int b = 0; b < k->n_buffers; b++) {
    if (k->buffers[b].kind != CM_KBUF_SCRATCH) continue;
    bool in, out;
    attn_uses(k, b, first, end, &in, &out);
    if (!in || out) continue;
    if (a.n_local == CM_KATTN_MAX_LOCAL || k->buffers[b].numel % (bat * rows)) return false;
    a.local_row[a.n_local] = k->buffers[b].numel / (bat * rows);
    a.local[a.n_local++] = b;
  }
  if (a.n_local == 0) return false;
  int n_max = 0;
  for (int si = first; si < end; si++) n_max += k->stages[si].red_op == CM_KRED_MAX;
  bool cpu = !(o && o->target && o->target->kind == CM_TARGET_CUDA);
  int br0 = attn_br(rows, s0->dom[nb + 1], mr, cpu);
  for (int pass = 0; pass < 2; pass++) {
    a.br = pass == 0 ? br0 : (int)rows;
    if (pass == 1 && a.br == br0) break;
    s0->tmpl = n_max > 0 ? CM_KT_ATTENTION_FWD : CM_KT_ATTENTION_BWD;
    s0->attn = a;
    s0->n_parallel = nb;
    cm_err e;
    if (cm_kattn_check(k, first, &e) == CM_OK) {
      s0->attn.ws_bytes = cm_kattn_workspace(k, first, mr, nr, NULL, NULL);
      attn_choose_key_block(k, first, o, mr, nr);
      if (want_stream && !s0->attn.stream) break;
      attn_plan_tiles(k, first, o && o->target ? o->target->vector_lanes : 0);
      cm_kattn_layout(k, first, mr, nr);
      return true;
    }
  }
  *s0 = saved;
  return false;
}

/* Marks the longest span of an attention group's stages, from its first GEMM
 * stage, that fuses (cm_kattn_check holds). For CUDA, a forward span that
 * streams comes first: the softmax's 5 or 6 stages (S, max, exp, sum, [P], O)
 * alone when the longest span holds more (a training step's forward group also
 * computes a GEMM with P and copies of the row sum for the backward; they run
 * as stages of their own). Leaves the kernel as is when no span holds. */
void cm_attn_mark(cm_kernel *k, const cm_lower_opts *o) {
  if (o && o->no_templates) return;
  int first = -1;
  for (int si = 0; si < k->n_stages && first < 0; si++)
    if (k->stages[si].tmpl == CM_KT_GEMM) first = si;
  if (first < 0) return;
  cm_kstage *s0 = &k->stages[first];
  if (s0->n_dom < 2 || s0->red_op != CM_KRED_SUM) return;
  int mr = s0->tiles.mr > 0 ? s0->tiles.mr : 6, nr = s0->tiles.nr > 0 ? s0->tiles.nr : 16;
  bool cuda = o && o->target && o->target->kind == CM_TARGET_CUDA;
  for (int len = 6; cuda && len >= 5; len--)
    if (first + len <= k->n_stages && attn_try_span(k, o, first, first + len, mr, nr, true)) return;
  for (int end = k->n_stages; end >= first + 2; end--)
    if (attn_try_span(k, o, first, end, mr, nr, false)) return;
}
