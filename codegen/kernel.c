/* codegen/kernel.c — the kernel IR: builders (with constant folding of index
 * arithmetic), the verifier, the printer and the reference interpreter. */
#include "codegen.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void *grow(void *p, int *cap, int need, size_t elem) {
  if (need <= *cap) return p;
  int c = *cap ? *cap : 16;
  while (c < need) c *= 2;
  void *q = realloc(p, (size_t)c * elem);
  if (!q) abort(); /* out of memory while building a kernel: nothing sensible to return */
  *cap = c;
  return q;
}

void cm_kernel_init(cm_kernel *k, const char *name) {
  memset(k, 0, sizeof *k);
  snprintf(k->name, sizeof k->name, "%s", name);
  k->group = -1;
}

void cm_kernel_free(cm_kernel *k) {
  if (!k) return;
  for (int i = 0; i < k->n_stages; i++) free(k->stages[i].exprs);
  free(k->stages);
  free(k->buffers);
  memset(k, 0, sizeof *k);
}

void cm_kprogram_free(cm_kprogram *p) {
  if (!p) return;
  for (int i = 0; i < p->n_kernels; i++) cm_kernel_free(&p->kernels[i]);
  free(p->kernels);
  memset(p, 0, sizeof *p);
}

int cm_kernel_add_buffer(cm_kernel *k, cm_kbuf_kind kind, cm_dtype dt, int64_t numel, int node,
                         int64_t offset) {
  k->buffers = grow(k->buffers, &k->cap_buffers, k->n_buffers + 1, sizeof *k->buffers);
  cm_kbuffer *b = &k->buffers[k->n_buffers];
  memset(b, 0, sizeof *b);
  b->kind = kind;
  b->dtype = dt;
  b->numel = numel;
  b->node = node;
  b->offset = offset;
  return k->n_buffers++;
}

cm_kstage *cm_kernel_add_stage(cm_kernel *k, const char *name) {
  k->stages = grow(k->stages, &k->cap_stages, k->n_stages + 1, sizeof *k->stages);
  cm_kstage *s = &k->stages[k->n_stages++];
  memset(s, 0, sizeof *s);
  snprintf(s->name, sizeof s->name, "%s", name);
  s->body = -1;
  s->gemm_a = s->gemm_b = -1;
  s->acc_dtype = CM_F32;
  return s;
}

static int push(cm_kstage *s, cm_kexpr e) {
  s->exprs = grow(s->exprs, &s->cap_exprs, s->n_exprs + 1, sizeof *s->exprs);
  s->exprs[s->n_exprs] = e;
  return s->n_exprs++;
}

static cm_kexpr blank(cm_kx_kind kind, cm_dtype dt) {
  cm_kexpr e;
  memset(&e, 0, sizeof e);
  e.kind = kind;
  e.dtype = dt;
  e.a = e.b = e.c = -1;
  e.var = e.buf = -1;
  return e;
}

int cm_kx_const(cm_kstage *s, cm_dtype dt, double v) {
  /* reuse an equal constant: expressions stay small */
  for (int i = 0; i < s->n_exprs; i++) {
    const cm_kexpr *e = &s->exprs[i];
    if (e->kind == CM_KX_CONST && e->dtype == dt && e->value == v &&
        (v != 0 || signbit(e->value) == signbit(v)))
      return i;
  }
  cm_kexpr e = blank(CM_KX_CONST, dt);
  e.value = v;
  return push(s, e);
}

int cm_kx_var(cm_kstage *s, int var) {
  for (int i = 0; i < s->n_exprs; i++)
    if (s->exprs[i].kind == CM_KX_VAR && s->exprs[i].var == var) return i;
  cm_kexpr e = blank(CM_KX_VAR, CM_I64);
  e.var = var;
  return push(s, e);
}

int cm_kx_acc(cm_kstage *s) {
  for (int i = 0; i < s->n_exprs; i++)
    if (s->exprs[i].kind == CM_KX_ACC) return i;
  return push(s, blank(CM_KX_ACC, s->acc_dtype));
}

int cm_kx_load(cm_kstage *s, const cm_kernel *k, int buf, int index) {
  cm_dtype dt = (buf >= 0 && buf < k->n_buffers) ? k->buffers[buf].dtype : CM_F32;
  for (int i = 0; i < s->n_exprs; i++) {
    const cm_kexpr *e = &s->exprs[i];
    if (e->kind == CM_KX_LOAD && e->buf == buf && e->a == index) return i;
  }
  cm_kexpr e = blank(CM_KX_LOAD, dt);
  e.buf = buf;
  e.a = index;
  return push(s, e);
}

bool cm_kx_is_const(const cm_kstage *s, int e, double *value) {
  if (e < 0 || e >= s->n_exprs || s->exprs[e].kind != CM_KX_CONST) return false;
  if (value) *value = s->exprs[e].value;
  return true;
}

int cm_kx_op(cm_kstage *s, cm_op op, cm_dtype dt, int a, int b, int c) {
  /* common subexpressions: identical op nodes are shared */
  for (int i = s->n_exprs - 1; i >= 0 && i >= s->n_exprs - 64; i--) {
    const cm_kexpr *e = &s->exprs[i];
    if (e->kind == CM_KX_OP && e->op == op && e->dtype == dt && e->a == a && e->b == b && e->c == c)
      return i;
  }
  cm_kexpr e = blank(CM_KX_OP, dt);
  e.op = op;
  e.a = a;
  e.b = b;
  e.c = c;
  return push(s, e);
}

int cm_kx_mod(cm_kstage *s, int a, int b) {
  cm_kexpr e = blank(CM_KX_MOD, CM_I64);
  e.a = a;
  e.b = b;
  return push(s, e);
}

int cm_kx_iconst(cm_kstage *s, int64_t v) {
  return cm_kx_const(s, CM_I64, (double)v);
}

int cm_kx_iadd(cm_kstage *s, int a, int b) {
  double x, y;
  bool ca = cm_kx_is_const(s, a, &x), cb = cm_kx_is_const(s, b, &y);
  if (ca && cb) return cm_kx_iconst(s, (int64_t)x + (int64_t)y);
  if (ca && x == 0) return b;
  if (cb && y == 0) return a;
  return cm_kx_op(s, CM_OP_ADD, CM_I64, a, b, -1);
}

int cm_kx_imul(cm_kstage *s, int a, int b) {
  double x, y;
  bool ca = cm_kx_is_const(s, a, &x), cb = cm_kx_is_const(s, b, &y);
  if (ca && cb) return cm_kx_iconst(s, (int64_t)x * (int64_t)y);
  if ((ca && x == 0) || (cb && y == 0)) return cm_kx_iconst(s, 0);
  if (ca && x == 1) return b;
  if (cb && y == 1) return a;
  return cm_kx_op(s, CM_OP_MUL, CM_I64, a, b, -1);
}

int cm_kx_idiv(cm_kstage *s, int a, int b) {
  double x, y;
  bool ca = cm_kx_is_const(s, a, &x), cb = cm_kx_is_const(s, b, &y);
  if (ca && cb && y != 0) return cm_kx_iconst(s, (int64_t)x / (int64_t)y);
  if (cb && y == 1) return a;
  if (ca && x == 0) return a;
  return cm_kx_op(s, CM_OP_DIV, CM_I64, a, b, -1);
}

int cm_kx_imod(cm_kstage *s, int a, int b) {
  double x, y;
  bool ca = cm_kx_is_const(s, a, &x), cb = cm_kx_is_const(s, b, &y);
  if (ca && cb && y != 0) return cm_kx_iconst(s, (int64_t)x % (int64_t)y);
  if (cb && y == 1) return cm_kx_iconst(s, 0);
  if (ca && x == 0) return a;
  return cm_kx_mod(s, a, b);
}

uint32_t cm_kx_vars_used(const cm_kstage *s, int e) {
  if (e < 0 || e >= s->n_exprs) return 0;
  const cm_kexpr *x = &s->exprs[e];
  switch (x->kind) {
  case CM_KX_VAR: return x->var >= 0 && x->var < 32 ? 1u << x->var : 0;
  case CM_KX_CONST:
  case CM_KX_ACC: return 0;
  default: break;
  }
  uint32_t m = 0;
  if (x->a >= 0 && x->a < e) m |= cm_kx_vars_used(s, x->a);
  if (x->b >= 0 && x->b < e) m |= cm_kx_vars_used(s, x->b);
  if (x->c >= 0 && x->c < e) m |= cm_kx_vars_used(s, x->c);
  return m;
}

/* ---- verifier ------------------------------------------------------------ */

static bool kis_int(cm_dtype dt) {
  return dt == CM_I32 || dt == CM_I64;
}

static bool is_compare(cm_op op) {
  return op == CM_OP_LT || op == CM_OP_LE || op == CM_OP_EQ || op == CM_OP_NE;
}

static int op_arity(cm_op op) {
  if (op >= CM_OP_NEG && op <= CM_OP_CAST) return 1;
  if (op >= CM_OP_ADD && op <= CM_OP_NE) return 2;
  if (op == CM_OP_SELECT) return 3;
  return -1;
}

#define KFAIL(...)                                                                                 \
  do {                                                                                             \
    char rule_[512];                                                                               \
    snprintf(rule_, sizeof rule_, __VA_ARGS__);                                                    \
    return cm_errorf(err, CM_EINVALID, "kernel %s stage %d (%s) expr %d: %s", k->name, si,         \
                     s->name, ei, rule_);                                                          \
  } while (0)

/* ---- attention spans ---------------------------------------------------------- */

/* An i64 expression as sum_v c[v] * v + c0 over the stage's vars, with the
 * ranges of the vars known (domain and reduction extents): div and mod by a
 * constant fold when the remainder part provably lies in [0, d). */
typedef struct kaff {
  int64_t c[CM_KMAX_VARS];
  int64_t c0;
} kaff;

static int64_t var_ext(const cm_kstage *s, int v) {
  return v < s->n_dom ? s->dom[v] : s->red[v - s->n_dom];
}

static void aff_range(const cm_kstage *s, const kaff *a, int64_t *lo, int64_t *hi) {
  *lo = *hi = a->c0;
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    int64_t t = a->c[v] * (var_ext(s, v) - 1);
    if (t < 0)
      *lo += t;
    else
      *hi += t;
  }
}

static bool aff_of(const cm_kstage *s, int e, kaff *out, int *budget) {
  if (e < 0 || e >= s->n_exprs || --*budget < 0) return false;
  const cm_kexpr *x = &s->exprs[e];
  memset(out, 0, sizeof *out);
  if (x->dtype != CM_I64) return false;
  if (x->kind == CM_KX_CONST) {
    out->c0 = (int64_t)x->value;
    return (double)out->c0 == x->value;
  }
  if (x->kind == CM_KX_VAR) {
    if (x->var < 0 || x->var >= s->n_dom + s->n_red) return false;
    out->c[x->var] = 1;
    return true;
  }
  bool is_mod = x->kind == CM_KX_MOD;
  if (!is_mod && x->kind != CM_KX_OP) return false;
  cm_op op = is_mod ? CM_OP_DIV : x->op; /* mod shares div's split */
  if (op != CM_OP_ADD && op != CM_OP_SUB && op != CM_OP_MUL && op != CM_OP_DIV) return false;
  kaff a, b;
  if (!aff_of(s, x->a, &a, budget) || !aff_of(s, x->b, &b, budget)) return false;
  int nv = s->n_dom + s->n_red;
  bool bconst = true, aconst = true;
  for (int v = 0; v < nv; v++) bconst &= b.c[v] == 0, aconst &= a.c[v] == 0;
  if (op == CM_OP_ADD || op == CM_OP_SUB) {
    int64_t sg = op == CM_OP_ADD ? 1 : -1;
    for (int v = 0; v < nv; v++) out->c[v] = a.c[v] + sg * b.c[v];
    out->c0 = a.c0 + sg * b.c0;
    return true;
  }
  if (op == CM_OP_MUL) {
    if (!aconst && !bconst) return false;
    const kaff *f = bconst ? &a : &b;
    int64_t m = bconst ? b.c0 : a.c0;
    for (int v = 0; v < nv; v++) out->c[v] = f->c[v] * m;
    out->c0 = f->c0 * m;
    return true;
  }
  /* div / mod by a positive constant of a non-negative value */
  int64_t d = b.c0, lo, hi;
  if (!bconst || d <= 0) return false;
  aff_range(s, &a, &lo, &hi);
  if (lo < 0) return false;
  kaff q, r;
  memset(&q, 0, sizeof q);
  memset(&r, 0, sizeof r);
  for (int v = 0; v < nv; v++) {
    if (a.c[v] % d == 0)
      q.c[v] = a.c[v] / d;
    else
      r.c[v] = a.c[v];
  }
  int64_t c0q = a.c0 >= 0 ? a.c0 / d : -((-a.c0 + d - 1) / d);
  q.c0 = c0q;
  r.c0 = a.c0 - c0q * d;
  aff_range(s, &r, &lo, &hi);
  if (lo < 0 || hi >= d) return false;
  *out = is_mod ? r : q;
  return true;
}

/* Whether index expression e of a stage in span `a` (batch extents bdom)
 * reads only one batch item's (and, when rowwise, one query row's) slice of a
 * buffer with X elements per (batch item, row). */
static bool attn_local_index(const cm_kstage *s, const cm_kattn *a, const int64_t *bdom, int e,
                             int64_t X, bool rowwise) {
  kaff f;
  int budget = 4096;
  if (!aff_of(s, e, &f, &budget)) return false;
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
  aff_range(s, &f, &lo, &hi);
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

static cm_status verify_stage(const cm_kernel *k, int si, cm_err *err) {
  const cm_kstage *s = &k->stages[si];
  int ei = -1;
  int nv = s->n_dom + s->n_red;
  if (s->n_dom < 0 || s->n_red < 0 || nv > CM_KMAX_VARS)
    KFAIL("n_dom + n_red = %d exceeds CM_KMAX_VARS (%d)", nv, CM_KMAX_VARS);
  for (int v = 0; v < nv; v++) {
    int64_t e = v < s->n_dom ? s->dom[v] : s->red[v - s->n_dom];
    if (e < 1) KFAIL("extent of var %d is %lld, must be >= 1", v, (long long)e);
  }
  if (s->n_parallel < 0 || s->n_parallel > s->n_dom)
    KFAIL("n_parallel %d out of range [0, n_dom=%d]", s->n_parallel, s->n_dom);
  if (s->accumulate && s->n_parallel != 0) KFAIL("accumulate stage needs n_parallel == 0");
  if (s->n_exprs < 0 || (s->n_exprs > 0 && !s->exprs)) KFAIL("no expression array");
  if (s->n_stores < 0 || s->n_stores > CM_KMAX_STORES) KFAIL("bad store count %d", s->n_stores);
  for (ei = 0; ei < s->n_exprs; ei++) {
    const cm_kexpr *e = &s->exprs[ei];
    int ops[3] = {e->a, e->b, e->c};
    int want = 0;
    switch (e->kind) {
    case CM_KX_CONST: break;
    case CM_KX_VAR:
      if (e->dtype != CM_I64) KFAIL("var must be i64");
      if (e->var < 0 || e->var >= nv) KFAIL("var %d out of range (n_dom + n_red = %d)", e->var, nv);
      break;
    case CM_KX_ACC:
      if (s->n_red == 0) KFAIL("ACC used in a stage without reduction");
      if (e->dtype != s->acc_dtype) KFAIL("ACC dtype differs from acc_dtype");
      break;
    case CM_KX_LOAD:
      want = 1;
      if (e->buf < 0 || e->buf >= k->n_buffers) KFAIL("load of nonexistent buffer %d", e->buf);
      if (e->dtype != k->buffers[e->buf].dtype) KFAIL("load dtype differs from buffer's");
      break;
    case CM_KX_MOD:
      want = 2;
      if (e->dtype != CM_I64) KFAIL("mod must be i64");
      break;
    case CM_KX_OP:
      want = op_arity(e->op);
      if (want < 0) KFAIL("op %s is not elementwise", cm_op_name(e->op));
      break;
    default: KFAIL("unknown expression kind %d", (int)e->kind);
    }
    for (int j = 0; j < 3; j++) {
      if (j < want) {
        if (ops[j] < 0 || ops[j] >= ei)
          KFAIL("operand %d = %d out of range (must be in [0, %d))", j, ops[j], ei);
      } else if (ops[j] != -1)
        KFAIL("operand %d set but unused", j);
    }
    if (e->kind == CM_KX_LOAD && s->exprs[e->a].dtype != CM_I64) KFAIL("index must be i64");
    if (e->kind == CM_KX_MOD && (s->exprs[e->a].dtype != CM_I64 || s->exprs[e->b].dtype != CM_I64))
      KFAIL("mod operands must be i64");
    if (e->kind == CM_KX_OP) {
      cm_dtype da = s->exprs[e->a].dtype;
      if (e->op == CM_OP_CAST || e->op == CM_OP_STOP_GRADIENT) {
        if (e->op == CM_OP_STOP_GRADIENT && da != e->dtype) KFAIL("operand dtype mismatch");
      } else if (e->op == CM_OP_SELECT) {
        if (da != CM_BOOL) KFAIL("SELECT cond must be bool");
        if (s->exprs[e->b].dtype != e->dtype || s->exprs[e->c].dtype != e->dtype)
          KFAIL("operand dtype mismatch");
      } else if (want == 2) {
        cm_dtype db = s->exprs[e->b].dtype;
        if (da != db)
          KFAIL("operand dtype mismatch (%s vs %s)", cm_dtype_name(da), cm_dtype_name(db));
        if (is_compare(e->op) ? e->dtype != CM_BOOL : e->dtype != da)
          KFAIL("result dtype %s inconsistent with operands", cm_dtype_name(e->dtype));
        if (da == CM_BOOL && !is_compare(e->op)) KFAIL("arithmetic on bool");
      } else {
        if (da != e->dtype) KFAIL("operand dtype mismatch");
        if (da == CM_BOOL) KFAIL("arithmetic on bool");
      }
    }
  }
  ei = -1;
  /* where reduction vars and ACC may appear */
  uint32_t redmask = 0;
  for (int v = s->n_dom; v < nv; v++) redmask |= 1u << v;
  bool *used_acc = calloc((size_t)s->n_exprs + 1, 1);
  uint32_t *vm = calloc((size_t)s->n_exprs + 1, sizeof *vm);
  if (!used_acc || !vm) {
    free(used_acc), free(vm);
    return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  }
  cm_status st = CM_OK;
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    used_acc[e] = x->kind == CM_KX_ACC;
    vm[e] = x->kind == CM_KX_VAR ? 1u << x->var : 0;
    if (x->kind == CM_KX_VAR || x->kind == CM_KX_CONST || x->kind == CM_KX_ACC) continue;
    int ops[3] = {x->a, x->b, x->c};
    for (int j = 0; j < 3; j++)
      if (ops[j] >= 0) {
        used_acc[e] = used_acc[e] || used_acc[ops[j]];
        vm[e] |= vm[ops[j]];
      }
  }
  if (s->n_red > 0) {
    ei = s->body;
    if (s->body < 0 || s->body >= s->n_exprs) {
      st = cm_errorf(err, CM_EINVALID, "kernel %s stage %d (%s) expr %d: body missing", k->name, si,
                     s->name, ei);
      goto done;
    }
    if (used_acc[s->body]) {
      st = cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d (%s) expr %d: ACC used only in store values", k->name, si,
                     s->name, ei);
      goto done;
    }
  } else if (s->body != -1) {
    st = cm_errorf(err, CM_EINVALID, "kernel %s stage %d (%s) expr %d: body set but n_red == 0",
                   k->name, si, s->name, s->body);
    goto done;
  }
  for (int j = 0; j < s->n_stores; j++) {
    const cm_kstore *t = &s->stores[j];
    ei = t->index;
    const char *why = NULL;
    if (t->buf < 0 || t->buf >= k->n_buffers)
      why = "store to nonexistent buffer";
    else if (k->buffers[t->buf].kind == CM_KBUF_CONST)
      why = "store to a CONST buffer";
    else if (t->index < 0 || t->index >= s->n_exprs || t->value < 0 || t->value >= s->n_exprs)
      why = "store expression out of range";
    else if (s->exprs[t->index].dtype != CM_I64)
      why = "index must be i64";
    else if (vm[t->index] & redmask)
      why = "reduction var used outside body and gemm operands";
    else if (used_acc[t->index])
      why = "ACC used only in store values";
    else if (vm[t->value] & redmask) {
      ei = t->value;
      why = "reduction var used outside body and gemm operands";
    }
    if (why) {
      st = cm_errorf(err, CM_EINVALID, "kernel %s stage %d (%s) expr %d: store %d: %s", k->name, si,
                     s->name, ei, j, why);
      goto done;
    }
  }
  /* an attention span's first stage is its first GEMM */
  if (s->tmpl == CM_KT_GEMM || s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD) {
    ei = s->body;
    const char *why = NULL;
    const cm_kgemm_tiles *t = &s->tiles;
    if (s->n_dom < 2)
      why = "GEMM needs n_dom >= 2";
    else if (s->n_red != 1)
      why = "GEMM needs n_red == 1";
    else if (s->red_op != CM_KRED_SUM)
      why = "GEMM needs SUM";
    else if (s->gemm_a < 0 || s->gemm_a >= s->n_exprs || s->gemm_b < 0 || s->gemm_b >= s->n_exprs)
      why = "GEMM operands out of range";
    else if (s->exprs[s->body].kind != CM_KX_OP || s->exprs[s->body].op != CM_OP_MUL ||
             s->exprs[s->body].a != s->gemm_a || s->exprs[s->body].b != s->gemm_b)
      why = "GEMM body must be MUL(gemm_a, gemm_b)";
    else {
      uint32_t batch = (1u << (s->n_dom - 2)) - 1;
      uint32_t ma = batch | 1u << (s->n_dom - 2) | 1u << s->n_dom;
      uint32_t mb = batch | 1u << (s->n_dom - 1) | 1u << s->n_dom;
      if (vm[s->gemm_a] & ~ma)
        why = "gemm_a uses a var other than batch, i, k";
      else if (vm[s->gemm_b] & ~mb)
        why = "gemm_b uses a var other than batch, k, j";
      else if (t->mc <= 0 || t->nc <= 0 || t->kc <= 0 || t->mr <= 0 || t->nr <= 0)
        why = "GEMM tiles must be positive";
      else if (t->mc % t->mr || t->nc % t->nr)
        why = "GEMM tiles: mc % mr and nc % nr must be 0";
    }
    if (why) {
      st = cm_errorf(err, CM_EINVALID, "kernel %s stage %d (%s) expr %d: %s", k->name, si, s->name,
                     ei, why);
      goto done;
    }
  }
  /* ACC elsewhere than store values: any expression only reachable from loads' indices etc.
     is caught above for body and indices; load indices using ACC are also wrong */
  for (int e = 0; e < s->n_exprs; e++) {
    if (s->exprs[e].kind == CM_KX_LOAD && used_acc[s->exprs[e].a]) {
      st = cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d (%s) expr %d: ACC used only in store values", k->name, si,
                     s->name, e);
      goto done;
    }
  }
done:
  free(used_acc), free(vm);
  return st;
}

cm_status cm_kernel_verify(const cm_kernel *k, cm_err *err) {
  if (!k) return cm_errorf(err, CM_EINVALID, "kernel: NULL");
  for (int b = 0; b < k->n_buffers; b++) {
    const cm_kbuffer *x = &k->buffers[b];
    if (x->numel < 0)
      return cm_errorf(err, CM_EINVALID, "kernel %s buffer %d: negative numel", k->name, b);
    if (x->kind == CM_KBUF_SCRATCH) {
      int64_t bytes = x->numel * (int64_t)cm_dtype_size(x->dtype);
      if (x->offset < 0 || x->offset + bytes > k->scratch_bytes)
        return cm_errorf(err, CM_EINVALID,
                         "kernel %s buffer %d: scratch [%lld, %lld) not within scratch_bytes %lld",
                         k->name, b, (long long)x->offset, (long long)(x->offset + bytes),
                         (long long)k->scratch_bytes);
    }
  }
  for (int si = 0; si < k->n_stages; si++) {
    cm_status st = verify_stage(k, si, err);
    if (st != CM_OK) return st;
  }
  for (int si = 0; si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    if (s->tmpl != CM_KT_ATTENTION_FWD && s->tmpl != CM_KT_ATTENTION_BWD) continue;
    cm_status st = cm_kattn_check(k, si, err);
    if (st != CM_OK) return st;
  }
  return CM_OK;
}

/* ---- printer --------------------------------------------------------------- */

static const char *kbuf_kind_name(cm_kbuf_kind k) {
  switch (k) {
  case CM_KBUF_ARENA: return "arena";
  case CM_KBUF_SOURCE: return "source";
  case CM_KBUF_CONST: return "const";
  case CM_KBUF_SCRATCH: return "scratch";
  case CM_KBUF_STATUS: return "status";
  }
  return "?";
}

void cm_kernel_print(const cm_kernel *k, FILE *out) {
  fprintf(out, "kernel %s (group %d) scratch %lld\n", k->name, k->group,
          (long long)k->scratch_bytes);
  for (int b = 0; b < k->n_buffers; b++) {
    const cm_kbuffer *x = &k->buffers[b];
    fprintf(out, "  b%d: %s %s[%lld] node %d offset %lld\n", b, kbuf_kind_name(x->kind),
            cm_dtype_name(x->dtype), (long long)x->numel, x->node, (long long)x->offset);
  }
  for (int si = 0; si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    fprintf(out, "stage %d %s\n  dom [", si, s->name);
    for (int v = 0; v < s->n_dom; v++) fprintf(out, "%s%lld", v ? ", " : "", (long long)s->dom[v]);
    fprintf(out, "]");
    if (s->n_red > 0) {
      fprintf(out, " red %s [", s->red_op == CM_KRED_SUM ? "sum" : "max");
      for (int v = 0; v < s->n_red; v++)
        fprintf(out, "%s%lld", v ? ", " : "", (long long)s->red[v]);
      fprintf(out, "] acc %s", cm_dtype_name(s->acc_dtype));
    }
    fprintf(out, " parallel %d\n", s->n_parallel);
    if (s->tmpl == CM_KT_GEMM)
      fprintf(out, "  gemm a=%%%d b=%%%d tiles mc=%d nc=%d kc=%d mr=%d nr=%d\n", s->gemm_a,
              s->gemm_b, s->tiles.mc, s->tiles.nc, s->tiles.kc, s->tiles.mr, s->tiles.nr);
    if (s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD) {
      const cm_kattn *a = &s->attn;
      fprintf(out,
              "  attention %s span %d batch vars %d rows %lld br %d bc %d scale %.9g ws %lld "
              "gemm a=%%%d b=%%%d mr=%d nr=%d\n  local",
              s->tmpl == CM_KT_ATTENTION_FWD ? "fwd" : "bwd", a->span, a->nb, (long long)a->rows,
              a->br, a->bc, a->scale, (long long)a->ws_bytes, s->gemm_a, s->gemm_b, s->tiles.mr,
              s->tiles.nr);
      for (int i = 0; i < a->n_local && i < CM_KATTN_MAX_LOCAL; i++)
        fprintf(out, " b%d(row %lld)", a->local[i], (long long)a->local_row[i]);
      fprintf(out, "\n");
    }
    for (int e = 0; e < s->n_exprs; e++) {
      const cm_kexpr *x = &s->exprs[e];
      const char *dt = cm_dtype_name(x->dtype);
      switch (x->kind) {
      case CM_KX_CONST: fprintf(out, "  %%%d = %s const %.17g\n", e, dt, x->value); break;
      case CM_KX_VAR: fprintf(out, "  %%%d = %s var v%d\n", e, dt, x->var); break;
      case CM_KX_ACC: fprintf(out, "  %%%d = %s acc\n", e, dt); break;
      case CM_KX_LOAD: fprintf(out, "  %%%d = %s load b%d[%%%d]\n", e, dt, x->buf, x->a); break;
      case CM_KX_MOD: fprintf(out, "  %%%d = %s mod %%%d, %%%d\n", e, dt, x->a, x->b); break;
      case CM_KX_OP:
        fprintf(out, "  %%%d = %s %s %%%d", e, dt, cm_op_name(x->op), x->a);
        if (x->b >= 0) fprintf(out, ", %%%d", x->b);
        if (x->c >= 0) fprintf(out, ", %%%d", x->c);
        fprintf(out, "\n");
        break;
      }
    }
    if (s->n_red > 0) fprintf(out, "  body %%%d\n", s->body);
    for (int j = 0; j < s->n_stores; j++)
      fprintf(out, "  store b%d[%%%d] %s %%%d\n", s->stores[j].buf, s->stores[j].index,
              s->accumulate ? "+=" : "=", s->stores[j].value);
    if (s->cuda.kind != CM_KCUDA_NONE) { /* planned for a CUDA target */
      fprintf(out, "  ");
      cm_kcuda_plan_print(&s->cuda, out);
    }
  }
}

/* ---- const data, work items ---------------------------------------------- */

/* Writes v (a real number) into element i of mem as dt, rounding like cm_tensor_set_f64. */
static void put_real_mem(void *mem, cm_dtype dt, int64_t i, double v) {
  double r = cm_round_to_dtype(v, dt);
  switch (dt) {
  case CM_F32: ((float *)mem)[i] = (float)r; break;
  case CM_F64: ((double *)mem)[i] = r; break;
  case CM_BF16: ((uint16_t *)mem)[i] = cm_f64_to_bf16(r); break;
  case CM_F16: ((uint16_t *)mem)[i] = cm_f64_to_f16(r); break;
  case CM_I32: ((int32_t *)mem)[i] = (int32_t)r; break;
  case CM_I64:
    ((int64_t *)mem)[i] = isnan(v)                      ? 0
                          : v >= 9223372036854775808.0  ? INT64_MAX
                          : v <= -9223372036854775808.0 ? INT64_MIN
                                                        : (int64_t)trunc(v);
    break;
  case CM_BOOL: ((uint8_t *)mem)[i] = v != 0; break;
  default: break;
  }
}

void *cm_kernel_const_data(const cm_graph *g, const cm_kbuffer *b, cm_err *err) {
  if (!g || !b || b->node < 0 || b->node >= g->n_nodes || g->nodes[b->node].op != CM_OP_CONST) {
    cm_errorf(err, CM_EINVALID, "const buffer: node %d is not a const node", b ? b->node : -1);
    return NULL;
  }
  const cm_attrs *a = &g->nodes[b->node].attrs;
  if (a->data && a->n_data != b->numel) {
    cm_errorf(err, CM_EINVALID, "const buffer: node %d has %lld data elements, buffer %lld",
              b->node, (long long)a->n_data, (long long)b->numel);
    return NULL;
  }
  void *mem = malloc((size_t)(b->numel > 0 ? b->numel : 1) * cm_dtype_size(b->dtype));
  if (!mem) {
    cm_errorf(err, CM_EINTERNAL, "const buffer: out of memory");
    return NULL;
  }
  for (int64_t i = 0; i < b->numel; i++)
    put_real_mem(mem, b->dtype, i, a->data ? a->data[i] : a->value);
  return mem;
}

int64_t cm_kstage_work_items(const cm_kstage *s) {
  int64_t n = 1;
  if (s->tmpl == CM_KT_GEMM && s->n_dom >= 2 && s->tiles.mc > 0 && s->tiles.nc > 0) {
    for (int v = 0; v < s->n_dom - 2; v++) n *= s->dom[v];
    int64_t m = s->dom[s->n_dom - 2], nn = s->dom[s->n_dom - 1];
    return n * ((m + s->tiles.mc - 1) / s->tiles.mc) * ((nn + s->tiles.nc - 1) / s->tiles.nc);
  }
  for (int v = 0; v < s->n_parallel; v++) n *= s->dom[v];
  return n;
}

int64_t cm_kstage_workspace_bytes(const cm_kstage *s, cm_target_kind t) {
  if (t == CM_TARGET_CPU && (s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD))
    return s->attn.ws_bytes > 0 ? s->attn.ws_bytes : 0;
  if (t != CM_TARGET_CPU || s->tmpl != CM_KT_GEMM) return 0;
  /* packed A block, packed B panel and the C tile (render_llvm.c's layout): B
     for every kc slice when they take at most 4 MiB (render_llvm.c, gemm_b_floats) */
  int64_t a = (int64_t)s->tiles.mc * s->tiles.kc * 4, b = (int64_t)s->tiles.kc * s->tiles.nc * 4;
  if (s->n_red == 1 && s->tiles.kc > 0) {
    int64_t all = (s->red[0] + s->tiles.kc - 1) / s->tiles.kc * b;
    if (all <= ((int64_t)4 << 20)) b = all;
  }
  int64_t c = (int64_t)s->tiles.mc * s->tiles.nc * 4;
  return (a + 63) / 64 * 64 + (b + 63) / 64 * 64 + (c + 63) / 64 * 64 + 64;
}

/* ---- interpreter ------------------------------------------------------------ */

typedef union kval {
  int64_t i; /* i32, i64 */
  double f;  /* floats, bool (0/1) */
} kval;

static int64_t wrap_to(uint64_t u, cm_dtype dt) {
  if (dt == CM_I32) {
    uint32_t w = (uint32_t)u;
    return w >= UINT32_C(0x80000000) ? (int64_t)w - INT64_C(0x100000000) : (int64_t)w;
  }
  if (u >= UINT64_C(1) << 63) return -(int64_t)(~u) - 1;
  return (int64_t)u;
}

static double int_to_real(int64_t v, cm_dtype dt) {
  int p = dt == CM_F32 ? 24 : dt == CM_BF16 ? 8 : dt == CM_F16 ? 11 : 53;
  uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
  int bits = 0;
  for (uint64_t m = mag; m; m >>= 1) bits++;
  if (bits <= p) return cm_round_to_dtype((double)v, dt);
  int sh = bits - p;
  uint64_t q = mag >> sh, rem = mag & ((UINT64_C(1) << sh) - 1), half = UINT64_C(1) << (sh - 1);
  if (rem > half || (rem == half && (q & 1))) q++;
  double r = cm_round_to_dtype(ldexp((double)q, sh), dt);
  return v < 0 ? -r : r;
}

static kval from_real(double x, cm_dtype dt) {
  kval r;
  if (kis_int(dt)) {
    if (isnan(x))
      r.i = 0;
    else if (dt == CM_I32)
      r.i = (int64_t)cm_round_to_dtype(x, CM_I32);
    else
      r.i = x >= 9223372036854775808.0    ? INT64_MAX
            : x <= -9223372036854775808.0 ? INT64_MIN
                                          : (int64_t)trunc(x);
  } else if (dt == CM_BOOL)
    r.f = x != 0 ? 1.0 : 0.0;
  else
    r.f = cm_round_to_dtype(x, dt);
  return r;
}

/* CAST's conversion of v (of dtype from) to dt. */
static kval convert(kval v, cm_dtype from, cm_dtype dt) {
  if (!kis_int(from)) return from_real(v.f, dt);
  kval r;
  if (kis_int(dt))
    r.i = wrap_to((uint64_t)v.i, dt);
  else if (dt == CM_BOOL)
    r.f = v.i != 0;
  else
    r.f = int_to_real(v.i, dt);
  return r;
}

static double as_real(kval v, cm_dtype dt) {
  return kis_int(dt) ? (double)v.i : v.f;
}

static kval eval_op(const cm_kexpr *e, const cm_kexpr *ex, const kval *val) {
  cm_dtype dt = e->dtype, da = ex[e->a].dtype;
  kval a = val[e->a], r;
  switch (e->op) {
  case CM_OP_CAST:
  case CM_OP_STOP_GRADIENT: return convert(a, da, dt);
  case CM_OP_SELECT: {
    bool c = a.f != 0;
    int o = c ? e->b : e->c;
    return convert(val[o], ex[o].dtype, dt);
  }
  default: break;
  }
  int ar = op_arity(e->op);
  if (ar == 1) {
    if (kis_int(dt) && kis_int(da)) {
      uint64_t neg = (uint64_t)0 - (uint64_t)a.i;
      switch (e->op) {
      case CM_OP_NEG: r.i = wrap_to(neg, da); return convert(r, da, dt);
      case CM_OP_ABS: r.i = a.i < 0 ? wrap_to(neg, da) : a.i; return convert(r, da, dt);
      case CM_OP_RELU: r.i = a.i > 0 ? a.i : 0; return convert(r, da, dt);
      default: return convert(a, da, dt);
      }
    }
    double x = as_real(a, da), y;
    switch (e->op) {
    case CM_OP_NEG: y = -x; break;
    case CM_OP_ABS: y = fabs(x); break;
    case CM_OP_EXP: y = exp(x); break;
    case CM_OP_LOG: y = log(x); break;
    case CM_OP_SQRT: y = sqrt(x); break;
    case CM_OP_RSQRT: y = 1.0 / sqrt(x); break;
    case CM_OP_RECIP: y = 1.0 / x; break;
    case CM_OP_TANH: y = tanh(x); break;
    case CM_OP_ERF: y = erf(x); break;
    case CM_OP_RELU: y = isnan(x) ? x : x > 0 ? x : 0.0; break;
    default: y = x; break;
    }
    return from_real(y, dt);
  }
  cm_dtype db = ex[e->b].dtype;
  kval b = val[e->b];
  if (is_compare(e->op)) {
    bool t;
    if (kis_int(da) && kis_int(db)) {
      int64_t x = a.i, y = b.i;
      t = e->op == CM_OP_LT   ? x < y
          : e->op == CM_OP_LE ? x <= y
          : e->op == CM_OP_EQ ? x == y
                              : x != y;
    } else {
      double x = as_real(a, da), y = as_real(b, db);
      t = e->op == CM_OP_LT   ? x < y
          : e->op == CM_OP_LE ? x <= y
          : e->op == CM_OP_EQ ? x == y
                              : x != y;
    }
    r.i = t;
    return convert(r, CM_I64, dt);
  }
  if (kis_int(da) && kis_int(db) && kis_int(dt)) {
    int64_t x = a.i, y = b.i;
    switch (e->op) {
    case CM_OP_ADD: r.i = wrap_to((uint64_t)x + (uint64_t)y, dt); return r;
    case CM_OP_SUB: r.i = wrap_to((uint64_t)x - (uint64_t)y, dt); return r;
    case CM_OP_MUL: r.i = wrap_to((uint64_t)x * (uint64_t)y, dt); return r;
    case CM_OP_DIV:
      r.i = y == 0 ? 0 : (x == INT64_MIN && y == -1) ? INT64_MIN : wrap_to((uint64_t)(x / y), dt);
      return r;
    case CM_OP_MAX: r.i = x > y ? x : y; return r;
    case CM_OP_MIN: r.i = x < y ? x : y; return r;
    default: return from_real(pow((double)x, (double)y), dt);
    }
  }
  double x = as_real(a, da), y = as_real(b, db), z;
  switch (e->op) {
  case CM_OP_ADD: z = x + y; break;
  case CM_OP_SUB: z = x - y; break;
  case CM_OP_MUL: z = x * y; break;
  case CM_OP_DIV: z = x / y; break;
  case CM_OP_MAX: z = isnan(x) || isnan(y) ? NAN : x > y ? x : y; break;
  case CM_OP_MIN: z = isnan(x) || isnan(y) ? NAN : x < y ? x : y; break;
  case CM_OP_POW: z = pow(x, y); break;
  default: z = NAN; break;
  }
  return from_real(z, dt);
}

static kval load_elem(const void *mem, cm_dtype dt, int64_t i) {
  kval r;
  switch (dt) {
  case CM_F32: r.f = ((const float *)mem)[i]; break;
  case CM_F64: r.f = ((const double *)mem)[i]; break;
  case CM_BF16: r.f = cm_bf16_to_f32(((const uint16_t *)mem)[i]); break;
  case CM_F16: r.f = cm_f16_to_f32(((const uint16_t *)mem)[i]); break;
  case CM_I32: r.i = ((const int32_t *)mem)[i]; break;
  case CM_I64: r.i = ((const int64_t *)mem)[i]; break;
  default: r.f = ((const uint8_t *)mem)[i] != 0; break;
  }
  return r;
}

static void store_elem(void *mem, cm_dtype dt, int64_t i, kval v) {
  switch (dt) {
  case CM_I32: ((int32_t *)mem)[i] = (int32_t)v.i; break;
  case CM_I64: ((int64_t *)mem)[i] = v.i; break;
  default: put_real_mem(mem, dt, i, v.f); break;
  }
}

typedef struct kctx {
  const cm_kernel *k;
  int si;
  void *const *bufs;
  kval *val;
  int64_t vars[CM_KMAX_VARS];
  cm_err *err;
} kctx;

static cm_status eval_list(kctx *c, const int *list, int n) {
  const cm_kstage *s = &c->k->stages[c->si];
  const cm_kexpr *ex = s->exprs;
  for (int j = 0; j < n; j++) {
    int id = list[j];
    const cm_kexpr *e = &ex[id];
    switch (e->kind) {
    case CM_KX_CONST: c->val[id] = from_real(e->value, e->dtype); break;
    case CM_KX_VAR: c->val[id].i = c->vars[e->var]; break;
    case CM_KX_ACC: break; /* set by the caller */
    case CM_KX_LOAD: {
      int64_t i = c->val[e->a].i;
      const cm_kbuffer *b = &c->k->buffers[e->buf];
      if (i < 0 || i >= b->numel)
        return cm_errorf(c->err, CM_EINVALID,
                         "kernel %s stage %d (%s) expr %d: load index %lld out of bounds of "
                         "b%d (numel %lld)",
                         c->k->name, c->si, s->name, id, (long long)i, e->buf, (long long)b->numel);
      c->val[id] = load_elem(c->bufs[e->buf], b->dtype, i);
      break;
    }
    case CM_KX_MOD: {
      int64_t x = c->val[e->a].i, y = c->val[e->b].i;
      c->val[id].i = y == 0 ? 0 : (y == -1 ? 0 : x % y);
      break;
    }
    case CM_KX_OP: c->val[id] = eval_op(e, ex, c->val); break;
    }
  }
  return CM_OK;
}

/* Marks the expressions reachable from root into mark (topological order = id order). */
static void reach(const cm_kstage *s, int root, bool *mark) {
  if (root < 0 || mark[root]) return;
  mark[root] = true;
  const cm_kexpr *e = &s->exprs[root];
  if (e->kind == CM_KX_CONST || e->kind == CM_KX_VAR || e->kind == CM_KX_ACC) return;
  reach(s, e->a, mark);
  reach(s, e->b, mark);
  reach(s, e->c, mark);
}

static cm_status run_stage(kctx *c) {
  const cm_kstage *s = &c->k->stages[c->si];
  int n = s->n_exprs;
  bool *mb = calloc((size_t)n + 1, 1), *ms = calloc((size_t)n + 1, 1);
  int *lb = malloc(sizeof(int) * ((size_t)n + 1)), *ls = malloc(sizeof(int) * ((size_t)n + 1));
  c->val = calloc((size_t)n + 1, sizeof(kval));
  cm_status st = CM_OK;
  if (!mb || !ms || !lb || !ls || !c->val) {
    st = cm_errorf(c->err, CM_EINTERNAL, "kernel %s: out of memory", c->k->name);
    goto out;
  }
  if (s->n_red > 0) reach(s, s->body, mb);
  for (int j = 0; j < s->n_stores; j++) {
    reach(s, s->stores[j].index, ms);
    reach(s, s->stores[j].value, ms);
  }
  int nb = 0, ns = 0, acc_id = -1;
  for (int i = 0; i < n; i++) {
    if (mb[i]) lb[nb++] = i;
    if (ms[i]) ls[ns++] = i;
    if (s->exprs[i].kind == CM_KX_ACC) acc_id = i;
  }
  int64_t total = 1, rtotal = 1;
  for (int v = 0; v < s->n_dom; v++) total *= s->dom[v];
  for (int v = 0; v < s->n_red; v++) rtotal *= s->red[v];
  cm_dtype adt = s->acc_dtype, bdt = s->n_red > 0 ? s->exprs[s->body].dtype : adt;
  kval sv[CM_KMAX_STORES];
  int64_t si_idx[CM_KMAX_STORES];
  for (int64_t it = 0; it < total; it++) {
    int64_t rem = it;
    for (int v = s->n_dom - 1; v >= 0; v--) {
      c->vars[v] = rem % s->dom[v];
      rem /= s->dom[v];
    }
    if (s->n_red > 0) {
      kval acc;
      bool fl = !kis_int(adt);
      if (s->red_op == CM_KRED_SUM) {
        if (fl)
          acc.f = 0;
        else
          acc.i = 0;
      } else {
        if (fl)
          acc.f = -INFINITY;
        else
          acc.i = adt == CM_I32 ? INT32_MIN : INT64_MIN;
      }
      for (int64_t r = 0; r < rtotal; r++) {
        int64_t rr = r;
        for (int v = s->n_red - 1; v >= 0; v--) {
          c->vars[s->n_dom + v] = rr % s->red[v];
          rr /= s->red[v];
        }
        if ((st = eval_list(c, lb, nb)) != CM_OK) goto out;
        kval x = convert(c->val[s->body], bdt, adt);
        if (s->red_op == CM_KRED_SUM) {
          if (fl)
            acc.f = cm_round_to_dtype(acc.f + x.f, adt);
          else
            acc.i = wrap_to((uint64_t)acc.i + (uint64_t)x.i, adt);
        } else {
          if (fl)
            acc.f = isnan(acc.f) || isnan(x.f) ? NAN : acc.f > x.f ? acc.f : x.f;
          else
            acc.i = acc.i > x.i ? acc.i : x.i;
        }
      }
      if (acc_id >= 0) c->val[acc_id] = acc;
    }
    if ((st = eval_list(c, ls, ns)) != CM_OK) goto out;
    for (int j = 0; j < s->n_stores; j++) {
      const cm_kstore *t = &s->stores[j];
      const cm_kbuffer *b = &c->k->buffers[t->buf];
      si_idx[j] = c->val[t->index].i;
      if (si_idx[j] < 0 || si_idx[j] >= b->numel) {
        st = cm_errorf(c->err, CM_EINVALID,
                       "kernel %s stage %d (%s) expr %d: store index %lld out of bounds of b%d "
                       "(numel %lld)",
                       c->k->name, c->si, s->name, t->index, (long long)si_idx[j], t->buf,
                       (long long)b->numel);
        goto out;
      }
      sv[j] = convert(c->val[t->value], s->exprs[t->value].dtype, b->dtype);
    }
    for (int j = 0; j < s->n_stores; j++) {
      const cm_kstore *t = &s->stores[j];
      cm_dtype dt = c->k->buffers[t->buf].dtype;
      kval v = sv[j];
      if (s->accumulate) {
        kval old = load_elem(c->bufs[t->buf], dt, si_idx[j]);
        if (kis_int(dt))
          v.i = wrap_to((uint64_t)old.i + (uint64_t)v.i, dt);
        else if (dt == CM_BOOL)
          v.f = (old.f + v.f) != 0;
        else
          v.f = cm_round_to_dtype(old.f + v.f, dt);
      }
      store_elem(c->bufs[t->buf], dt, si_idx[j], v);
    }
  }
out:
  free(mb), free(ms), free(lb), free(ls), free(c->val);
  c->val = NULL;
  return st;
}

cm_status cm_kernel_interpret(const cm_kernel *k, void *const *bufs, cm_err *err) {
  cm_status st = cm_kernel_verify(k, err);
  if (st != CM_OK) return st;
  kctx c;
  memset(&c, 0, sizeof c);
  c.k = k;
  c.bufs = bufs;
  c.err = err;
  for (c.si = 0; c.si < k->n_stages; c.si++)
    if ((st = run_stage(&c)) != CM_OK) return st;
  return CM_OK;
}

/* ---- index simplification -------------------------------------------------- */

/* i64 expressions as affine forms sum coef[i] * atom[i] + k over atoms (new
 * expressions: vars, or what does not decompose), with value ranges from the
 * loop extents; constants stay below 2^53 so that they are exact as doubles. */
#define SF_TERMS 12
#define SF_LIM (INT64_C(1) << 53)

typedef struct sform {
  int n;
  int atom[SF_TERMS];
  int64_t coef[SF_TERMS];
  int64_t k;
} sform;

typedef struct sctx {
  const cm_kstage *old;
  cm_kstage *ns;
  int *mat;  /* old id -> new id, -1 until built */
  sform *of; /* old id -> form (i64 expressions) */
  bool *has; /* old id -> of[] set */
  int cap;   /* of the per-new arrays below */
  int64_t *lo, *hi;
  bool *rng;    /* range computed */
  int *nform;   /* new id -> index in forms, -1 */
  sform *forms; /* forms materialized */
  int n_forms, cap_forms;
  int split_v; /* old domain var read as q*split_c + r (new vars split_v, split_v + 1), -1 */
  int64_t split_c;
  bool oom;
} sctx;

static bool sf_small(int64_t v) {
  return v > -SF_LIM && v < SF_LIM;
}

static bool sf_grow(sctx *c) {
  int need = c->ns->n_exprs + 1;
  if (need <= c->cap) return true;
  int cap = need * 2;
  int64_t *lo = realloc(c->lo, sizeof *lo * (size_t)cap), *hi;
  if (lo) c->lo = lo;
  hi = lo ? realloc(c->hi, sizeof *hi * (size_t)cap) : NULL;
  if (hi) c->hi = hi;
  bool *rng = hi ? realloc(c->rng, sizeof *rng * (size_t)cap) : NULL;
  if (rng) c->rng = rng;
  int *nf = rng ? realloc(c->nform, sizeof *nf * (size_t)cap) : NULL;
  if (!nf) {
    c->oom = true;
    return false;
  }
  c->nform = nf;
  for (int i = c->cap; i < cap; i++) c->rng[i] = false, c->nform[i] = -1;
  c->cap = cap;
  return true;
}

/* Pushes e into the new stage, reusing an identical i64 expression (so the
 * same form materializes to the same id, which the mod/div pairing needs). */
static int sx_mk(sctx *c, cm_kexpr e) {
  cm_kstage *s = c->ns;
  if (e.dtype == CM_I64 && e.kind != CM_KX_LOAD)
    for (int i = 0; i < s->n_exprs; i++) {
      const cm_kexpr *x = &s->exprs[i];
      if (x->kind == e.kind && x->op == e.op && x->dtype == e.dtype && x->a == e.a && x->b == e.b &&
          x->c == e.c && x->var == e.var && x->buf == e.buf && x->value == e.value)
        return i;
    }
  if (!sf_grow(c)) return 0;
  return push(s, e);
}

static int sx_const(sctx *c, int64_t v) {
  cm_kexpr e = blank(CM_KX_CONST, CM_I64);
  e.value = (double)v;
  return sx_mk(c, e);
}

static int sx_op(sctx *c, cm_kx_kind kind, cm_op op, int a, int b) {
  cm_kexpr e = blank(kind, CM_I64);
  e.op = kind == CM_KX_OP ? op : 0;
  e.a = a;
  e.b = b;
  return sx_mk(c, e);
}

static bool sx_is_const(sctx *c, int id, int64_t *v) {
  const cm_kexpr *x = &c->ns->exprs[id];
  if (x->kind != CM_KX_CONST || x->dtype != CM_I64) return false;
  *v = (int64_t)x->value;
  return true;
}

static void clamp128(__int128 l, __int128 h, int64_t *lo, int64_t *hi) {
  *lo = l < INT64_MIN ? INT64_MIN : l > INT64_MAX ? INT64_MAX : (int64_t)l;
  *hi = h > INT64_MAX ? INT64_MAX : h < INT64_MIN ? INT64_MIN : (int64_t)h;
  if (l < INT64_MIN || h > INT64_MAX) *lo = INT64_MIN, *hi = INT64_MAX;
}

/* The value range of new i64 expression id ([INT64_MIN, INT64_MAX] when unknown). */
static void sx_range(sctx *c, int id, int64_t *lo, int64_t *hi) {
  if (id < c->cap && c->rng[id]) {
    *lo = c->lo[id], *hi = c->hi[id];
    return;
  }
  const cm_kexpr *x = &c->ns->exprs[id];
  int64_t l = INT64_MIN, h = INT64_MAX, al, ah, bl, bh;
  if (x->dtype == CM_I64) {
    switch (x->kind) {
    case CM_KX_CONST: l = h = (int64_t)x->value; break;
    case CM_KX_VAR: {
      int v = x->var;
      int64_t ext = v < c->ns->n_dom ? c->ns->dom[v] : c->ns->red[v - c->ns->n_dom];
      l = 0, h = ext - 1;
      break;
    }
    case CM_KX_MOD:
      sx_range(c, x->a, &al, &ah);
      sx_range(c, x->b, &bl, &bh);
      if (al >= 0 && bl > 0 && bl == bh) l = 0, h = ah < bl - 1 ? ah : bl - 1;
      break;
    case CM_KX_OP:
      if (x->op == CM_OP_ADD || x->op == CM_OP_SUB || x->op == CM_OP_MUL || x->op == CM_OP_MIN ||
          x->op == CM_OP_MAX || x->op == CM_OP_DIV) {
        sx_range(c, x->a, &al, &ah);
        sx_range(c, x->b, &bl, &bh);
        bool full = al == INT64_MIN || ah == INT64_MAX || bl == INT64_MIN || bh == INT64_MAX;
        if (full) break;
        __int128 L, H;
        if (x->op == CM_OP_ADD)
          L = (__int128)al + bl, H = (__int128)ah + bh;
        else if (x->op == CM_OP_SUB)
          L = (__int128)al - bh, H = (__int128)ah - bl;
        else if (x->op == CM_OP_MUL) {
          __int128 p[4] = {(__int128)al * bl, (__int128)al * bh, (__int128)ah * bl,
                           (__int128)ah * bh};
          L = H = p[0];
          for (int i = 1; i < 4; i++) L = p[i] < L ? p[i] : L, H = p[i] > H ? p[i] : H;
        } else if (x->op == CM_OP_MIN)
          L = al < bl ? al : bl, H = ah < bh ? ah : bh;
        else if (x->op == CM_OP_MAX)
          L = al > bl ? al : bl, H = ah > bh ? ah : bh;
        else if (bl > 0 && bl == bh && al >= 0)
          L = al / bl, H = ah / bl;
        else
          break;
        clamp128(L, H, &l, &h);
      }
      break;
    default: break;
    }
  }
  if (sf_grow(c) && id < c->cap) c->lo[id] = l, c->hi[id] = h, c->rng[id] = true;
  *lo = l, *hi = h;
}

static void sf_range(sctx *c, const sform *f, int64_t *lo, int64_t *hi) {
  __int128 L = f->k, H = f->k;
  for (int i = 0; i < f->n; i++) {
    int64_t al, ah;
    sx_range(c, f->atom[i], &al, &ah);
    if (al == INT64_MIN || ah == INT64_MAX) {
      *lo = INT64_MIN, *hi = INT64_MAX;
      return;
    }
    __int128 p = (__int128)al * f->coef[i], q = (__int128)ah * f->coef[i];
    L += p < q ? p : q;
    H += p < q ? q : p;
  }
  clamp128(L, H, lo, hi);
}

static sform sf_atom(int id) {
  sform f = {1, {id}, {1}, 0};
  return f;
}

static int sf_materialize(sctx *c, const sform *f);

/* f += m * g; false when out of terms or range. */
static bool sf_add(sform *f, const sform *g, int64_t m) {
  int64_t t;
  if (__builtin_mul_overflow(g->k, m, &t) || __builtin_add_overflow(f->k, t, &f->k) ||
      !sf_small(f->k))
    return false;
  for (int i = 0; i < g->n; i++) {
    int64_t cf;
    if (__builtin_mul_overflow(g->coef[i], m, &cf)) return false;
    int j = 0;
    while (j < f->n && f->atom[j] != g->atom[i]) j++;
    if (j == f->n) {
      if (f->n == SF_TERMS) return false;
      f->atom[f->n] = g->atom[i], f->coef[f->n++] = 0;
    }
    if (__builtin_add_overflow(f->coef[j], cf, &f->coef[j]) || !sf_small(f->coef[j])) return false;
  }
  int n = 0;
  for (int i = 0; i < f->n; i++)
    if (f->coef[i] != 0) f->atom[n] = f->atom[i], f->coef[n++] = f->coef[i];
  f->n = n;
  return true;
}

/* m * (y mod C) + m*C * (y div C) is m * y: flattened-then-unflattened indices. */
static bool sf_pair(sctx *c, sform *f) {
  for (int rounds = 0; rounds < 8; rounds++) {
    bool changed = false;
    for (int i = 0; i < f->n && !changed; i++) {
      const cm_kexpr *m = &c->ns->exprs[f->atom[i]];
      int64_t C;
      if (m->kind != CM_KX_MOD || !sx_is_const(c, m->b, &C)) continue;
      for (int j = 0; j < f->n && !changed; j++) {
        const cm_kexpr *d = &c->ns->exprs[f->atom[j]];
        int64_t C2, want;
        if (d->kind != CM_KX_OP || d->op != CM_OP_DIV || !sx_is_const(c, d->b, &C2) ||
            __builtin_mul_overflow(f->coef[i], C, &want) || want != f->coef[j])
          continue;
        /* d is m's div: div(y, C), or div(w, C1*C) when y = div(w, C1) (div of div fused) */
        const cm_kexpr *y = &c->ns->exprs[m->a];
        int64_t C1, C1C;
        bool same = d->a == m->a && C2 == C;
        if (!same && y->kind == CM_KX_OP && y->op == CM_OP_DIV && y->a == d->a &&
            sx_is_const(c, y->b, &C1) && C1 > 0 && !__builtin_mul_overflow(C1, C, &C1C))
          same = C1C == C2;
        if (same && d->a != m->a) {
          int64_t wl, wh;
          sx_range(c, d->a, &wl, &wh);
          same = wl >= 0; /* the fusion holds for w >= 0 only */
        }
        if (!same) continue;
        sform yf = c->nform[m->a] >= 0 ? c->forms[c->nform[m->a]] : sf_atom(m->a);
        sform g = *f;
        int64_t cm = f->coef[i];
        g.coef[i] = 0, g.coef[j] = 0;
        sform zero = {0, {0}, {0}, 0};
        sf_add(&g, &zero, 1); /* drops the two terms */
        if (!sf_add(&g, &yf, cm)) continue;
        *f = g;
        changed = true;
      }
    }
    if (!changed) return true;
  }
  return true;
}

static int sf_materialize(sctx *c, const sform *f) {
  if (f->n == 0) return sx_const(c, f->k);
  if (f->n == 1 && f->coef[0] == 1 && f->k == 0) return f->atom[0];
  int acc = -1;
  for (int i = 0; i < f->n; i++) {
    int t = f->coef[i] == 1 ? f->atom[i]
                            : sx_op(c, CM_KX_OP, CM_OP_MUL, f->atom[i], sx_const(c, f->coef[i]));
    acc = acc < 0 ? t : sx_op(c, CM_KX_OP, CM_OP_ADD, acc, t);
  }
  if (f->k != 0) acc = sx_op(c, CM_KX_OP, CM_OP_ADD, acc, sx_const(c, f->k));
  if (c->oom || !sf_grow(c)) return acc;
  if (c->nform[acc] < 0) {
    sform *fs = grow(c->forms, &c->cap_forms, c->n_forms + 1, sizeof *fs);
    if (!fs) {
      c->oom = true;
      return acc;
    }
    c->forms = fs;
    fs[c->n_forms] = *f;
    c->nform[acc] = c->n_forms++;
  }
  return acc;
}

/* x div C (want_div) or x mod C for C > 0, x >= 0: the terms with coefficients
 * divisible by C pass through the div (and vanish in the mod); the rest R is
 * what remains, itself when 0 <= R < C. NULL result: no rule applies. */
static bool sf_divmod(sctx *c, const sform *x, int64_t C, bool want_div, sform *out) {
  int64_t xl, xh;
  sf_range(c, x, &xl, &xh);
  if (xl < 0 || xh == INT64_MAX) return false;
  sform H = {0, {0}, {0}, 0}, R = {0, {0}, {0}, 0};
  int64_t kq = x->k / C, kr = x->k % C;
  if (kr < 0) kr += C, kq -= 1;
  H.k = kq, R.k = kr;
  for (int i = 0; i < x->n; i++) {
    if (x->coef[i] % C == 0)
      H.atom[H.n] = x->atom[i], H.coef[H.n++] = x->coef[i] / C;
    else
      R.atom[R.n] = x->atom[i], R.coef[R.n++] = x->coef[i];
  }
  int64_t rl, rh;
  sf_range(c, &R, &rl, &rh);
  if (rl < 0 || rh == INT64_MAX) return false;
  sform part;
  bool have = false;
  if (rh < C) {
    part = want_div ? (sform){0, {0}, {0}, 0} : R;
    have = true;
  }
  /* R = d X + R0 with d | C, 0 <= R0 < d (one term and the constant): R div C =
     X div (C/d), R mod C = d (X mod (C/d)) + R0, as a split var's q*C + r reads */
  for (int j = 0; j < R.n && !have && R.n > 1; j++) {
    int64_t d = 0;
    for (int i = 0; i < R.n; i++)
      if (i != j) {
        int64_t a = R.coef[i] < 0 ? -R.coef[i] : R.coef[i], b = d;
        while (b) {
          int64_t t = a % b;
          a = b, b = t;
        }
        d = a;
      }
    if (d <= 1 || C % d != 0) continue;
    sform R0 = {1, {R.atom[j]}, {R.coef[j]}, R.k}, X = {0, {0}, {0}, 0};
    int64_t l0, h0, lx, hx;
    sf_range(c, &R0, &l0, &h0);
    if (l0 < 0 || h0 >= d) continue;
    for (int i = 0; i < R.n; i++)
      if (i != j) X.atom[X.n] = R.atom[i], X.coef[X.n++] = R.coef[i] / d;
    sf_range(c, &X, &lx, &hx);
    sform q;
    if (lx < 0 || hx == INT64_MAX || !sf_divmod(c, &X, C / d, want_div, &q)) continue;
    if (want_div) {
      part = q;
    } else {
      part = R0;
      if (!sf_add(&part, &q, d)) continue;
    }
    have = true;
  }
  if (!have) {
    int r = -1;
    int64_t C2;
    const cm_kexpr *y = NULL;
    if (R.n == 1 && R.coef[0] == 1 && R.k == 0) y = &c->ns->exprs[R.atom[0]];
    if (want_div && y && y->kind == CM_KX_OP && y->op == CM_OP_DIV && sx_is_const(c, y->b, &C2) &&
        C2 > 0 && !__builtin_mul_overflow(C2, C, &C2) && sf_small(C2)) {
      int64_t yl, yh;
      sx_range(c, y->a, &yl, &yh);
      if (yl >= 0) r = sx_op(c, CM_KX_OP, CM_OP_DIV, y->a, sx_const(c, C2));
    } else if (!want_div && y && y->kind == CM_KX_MOD && sx_is_const(c, y->b, &C2) && C2 > 0 &&
               C2 % C == 0) {
      r = sx_op(c, CM_KX_MOD, 0, y->a, sx_const(c, C));
    }
    if (r < 0) {
      int m = sf_materialize(c, &R);
      r = want_div ? sx_op(c, CM_KX_OP, CM_OP_DIV, m, sx_const(c, C))
                   : sx_op(c, CM_KX_MOD, 0, m, sx_const(c, C));
    }
    part = sf_atom(r);
  }
  if (!want_div) {
    *out = part;
    return true;
  }
  *out = H;
  return sf_add(out, &part, 1);
}

static int sx_mat(sctx *c, int e);

/* Builds old i64 expression e's form (every i64 expression gets one: what does
 * not decompose becomes an atom). */
static void sx_form(sctx *c, int e) {
  const cm_kexpr *x = &c->old->exprs[e];
  sform f;
  bool done = false;
  if (x->kind == CM_KX_CONST && sf_small((int64_t)x->value) && x->value == trunc(x->value)) {
    f = (sform){0, {0}, {0}, (int64_t)x->value};
    done = true;
  } else if (x->kind == CM_KX_VAR) {
    cm_kexpr v = blank(CM_KX_VAR, CM_I64);
    v.var = c->split_v >= 0 && x->var > c->split_v ? x->var + 1 : x->var;
    f = sf_atom(sx_mk(c, v));
    if (x->var == c->split_v) {
      v.var = x->var + 1;
      sform r = sf_atom(sx_mk(c, v));
      f.coef[0] = c->split_c;
      sf_add(&f, &r, 1);
    }
    done = true;
  } else if (x->kind == CM_KX_OP || x->kind == CM_KX_MOD) {
    int ops[2] = {x->a, x->b};
    for (int j = 0; j < 2; j++) {
      const cm_kexpr *o = ops[j] >= 0 ? &c->old->exprs[ops[j]] : NULL;
      if (o && o->dtype == CM_I64 && o->kind != CM_KX_LOAD && o->kind != CM_KX_ACC &&
          !c->has[ops[j]])
        sx_form(c, ops[j]);
    }
    const sform *a = x->a >= 0 && c->has[x->a] ? &c->of[x->a] : NULL;
    const sform *b = x->b >= 0 && c->has[x->b] ? &c->of[x->b] : NULL;
    cm_op op = x->kind == CM_KX_MOD ? CM_OP_CAST : x->op; /* CAST: stands for mod here */
    if (a && b && (op == CM_OP_ADD || op == CM_OP_SUB)) {
      f = *a;
      done = sf_add(&f, b, op == CM_OP_ADD ? 1 : -1);
    } else if (a && b && op == CM_OP_MUL && (a->n == 0 || b->n == 0)) {
      f = (sform){0, {0}, {0}, 0};
      done = sf_add(&f, a->n == 0 ? b : a, a->n == 0 ? a->k : b->k);
    } else if (a && x->kind == CM_KX_OP && op == CM_OP_NEG) {
      f = (sform){0, {0}, {0}, 0};
      done = sf_add(&f, a, -1);
    } else if (a && b && (x->kind == CM_KX_MOD || op == CM_OP_DIV) && b->n == 0 && b->k > 0) {
      done = sf_divmod(c, a, b->k, x->kind != CM_KX_MOD, &f);
    } else if (a && b && (op == CM_OP_MIN || op == CM_OP_MAX)) {
      int64_t al, ah, bl, bh;
      sf_range(c, a, &al, &ah);
      sf_range(c, b, &bl, &bh);
      bool a_le_b = ah != INT64_MAX && bl != INT64_MIN && ah <= bl;
      bool b_le_a = bh != INT64_MAX && al != INT64_MIN && bh <= al;
      if (a_le_b || b_le_a) {
        f = (op == CM_OP_MIN) == a_le_b ? *a : *b;
        done = true;
      }
    }
    if (done) done = sf_pair(c, &f);
  }
  if (!done) f = sf_atom(sx_mat(c, -1 - e)); /* the expression rebuilt as is */
  int64_t lo, hi;
  sf_range(c, &f, &lo, &hi);
  if (lo == hi && sf_small(lo)) f = (sform){0, {0}, {0}, lo};
  c->of[e] = f;
  c->has[e] = true;
}

/* The new id of old expression e; e < 0 means old expression -1-e rebuilt
 * with mapped operands (no form). */
static int sx_mat(sctx *c, int e) {
  bool raw = e < 0;
  if (raw) e = -1 - e;
  if (!raw && c->mat[e] >= 0) return c->mat[e];
  const cm_kexpr *x = &c->old->exprs[e];
  if (!raw && x->dtype == CM_I64 && x->kind != CM_KX_LOAD && x->kind != CM_KX_ACC) {
    if (!c->has[e]) sx_form(c, e);
    return c->mat[e] = sf_materialize(c, &c->of[e]);
  }
  cm_kexpr n = *x;
  int r = -1;
  if (x->kind == CM_KX_OP && x->op == CM_OP_SELECT) {
    int cond = sx_mat(c, x->a);
    const cm_kexpr *ce = &c->ns->exprs[cond];
    if (ce->kind == CM_KX_CONST) r = sx_mat(c, ce->value != 0 ? x->b : x->c);
  } else if (x->kind == CM_KX_OP &&
             (x->op == CM_OP_LT || x->op == CM_OP_LE || x->op == CM_OP_EQ || x->op == CM_OP_NE) &&
             c->old->exprs[x->a].dtype == CM_I64 && c->old->exprs[x->b].dtype == CM_I64) {
    int64_t al, ah, bl, bh;
    sx_range(c, sx_mat(c, x->a), &al, &ah);
    sx_range(c, sx_mat(c, x->b), &bl, &bh);
    bool known = al != INT64_MIN && ah != INT64_MAX && bl != INT64_MIN && bh != INT64_MAX;
    int t = -1;
    if (known && x->op == CM_OP_LT) t = ah < bl ? 1 : al >= bh ? 0 : -1;
    if (known && x->op == CM_OP_LE) t = ah <= bl ? 1 : al > bh ? 0 : -1;
    if (known && (x->op == CM_OP_EQ || x->op == CM_OP_NE)) {
      if (al == ah && bl == bh && al == bl) t = x->op == CM_OP_EQ;
      if (ah < bl || bh < al) t = x->op == CM_OP_NE;
    }
    if (t >= 0 && x->dtype == CM_BOOL) {
      cm_kexpr k = blank(CM_KX_CONST, CM_BOOL);
      k.value = t;
      if (sf_grow(c)) r = push(c->ns, k);
    }
  }
  if (r < 0) {
    if (x->kind != CM_KX_CONST && x->kind != CM_KX_VAR && x->kind != CM_KX_ACC) {
      if (x->a >= 0) n.a = sx_mat(c, x->a);
      if (x->b >= 0) n.b = sx_mat(c, x->b);
      if (x->c >= 0) n.c = sx_mat(c, x->c);
    }
    r = sx_mk(c, n);
  }
  if (!raw) c->mat[e] = r;
  return r;
}

/* Keeps only what the roots reach, renumbered in order. */
static void sx_compact(cm_kstage *s) {
  bool *live = calloc((size_t)s->n_exprs + 1, 1);
  int *to = malloc(sizeof(int) * ((size_t)s->n_exprs + 1));
  if (!live || !to) {
    free(live), free(to);
    return;
  }
  if (s->n_red > 0) reach(s, s->body, live);
  for (int j = 0; j < s->n_stores; j++) {
    reach(s, s->stores[j].index, live);
    reach(s, s->stores[j].value, live);
  }
  if (s->tmpl == CM_KT_GEMM) reach(s, s->gemm_a, live), reach(s, s->gemm_b, live);
  int n = 0;
  for (int i = 0; i < s->n_exprs; i++) {
    to[i] = live[i] ? n : -1;
    if (!live[i]) continue;
    cm_kexpr e = s->exprs[i];
    if (e.kind != CM_KX_CONST && e.kind != CM_KX_VAR && e.kind != CM_KX_ACC) {
      if (e.a >= 0) e.a = to[e.a];
      if (e.b >= 0) e.b = to[e.b];
      if (e.c >= 0) e.c = to[e.c];
    }
    s->exprs[n++] = e;
  }
  if (s->n_red > 0) s->body = to[s->body];
  for (int j = 0; j < s->n_stores; j++) {
    s->stores[j].index = to[s->stores[j].index];
    s->stores[j].value = to[s->stores[j].value];
  }
  if (s->tmpl == CM_KT_GEMM) s->gemm_a = to[s->gemm_a], s->gemm_b = to[s->gemm_b];
  s->n_exprs = n;
  free(live), free(to);
}

static cm_status simplify_pass(cm_kstage *s, int split_v, int64_t split_c, cm_err *err) {
  int n = s->n_exprs;
  if (n <= 0) return CM_OK;
  for (int e = 0; e < n; e++) {
    const cm_kexpr *x = &s->exprs[e];
    int ops[3] = {x->a, x->b, x->c};
    bool leaf = x->kind == CM_KX_CONST || x->kind == CM_KX_VAR || x->kind == CM_KX_ACC;
    for (int j = 0; j < 3 && !leaf; j++)
      if (ops[j] >= e || ops[j] < -1)
        return cm_errorf(err, CM_EINVALID,
                         "cm_kstage_simplify: stage %s expression %d: operand %d not smaller",
                         s->name, e, ops[j]);
  }
  cm_kstage ns = *s;
  ns.exprs = NULL;
  ns.n_exprs = ns.cap_exprs = 0;
  if (split_v >= 0) {
    for (int v = s->n_dom; v > split_v + 1; v--) ns.dom[v] = ns.dom[v - 1];
    ns.dom[split_v] = s->dom[split_v] / split_c;
    ns.dom[split_v + 1] = split_c;
    ns.n_dom++;
    if (split_v < s->n_parallel) ns.n_parallel++;
  }
  sctx c;
  memset(&c, 0, sizeof c);
  c.old = s;
  c.ns = &ns;
  c.split_v = split_v;
  c.split_c = split_c;
  c.mat = malloc(sizeof(int) * (size_t)n);
  c.of = malloc(sizeof(sform) * (size_t)n);
  c.has = calloc((size_t)n, 1);
  cm_status st = CM_OK;
  if (!c.mat || !c.of || !c.has) c.oom = true;
  if (!c.oom) {
    for (int e = 0; e < n; e++) c.mat[e] = -1;
    if (s->n_red > 0 && s->body >= 0 && s->body < n) ns.body = sx_mat(&c, s->body);
    if (s->tmpl == CM_KT_GEMM && s->gemm_a >= 0 && s->gemm_a < n && s->gemm_b >= 0 &&
        s->gemm_b < n) {
      ns.gemm_a = sx_mat(&c, s->gemm_a);
      ns.gemm_b = sx_mat(&c, s->gemm_b);
    }
    for (int j = 0; j < s->n_stores && !c.oom; j++) {
      if (s->stores[j].index < 0 || s->stores[j].index >= n || s->stores[j].value < 0 ||
          s->stores[j].value >= n) {
        st =
            cm_errorf(err, CM_EINVALID,
                      "cm_kstage_simplify: stage %s store %d: expression out of range", s->name, j);
        break;
      }
      ns.stores[j].index = sx_mat(&c, s->stores[j].index);
      ns.stores[j].value = sx_mat(&c, s->stores[j].value);
    }
  }
  if (c.oom && st == CM_OK)
    st = cm_errorf(err, CM_EINTERNAL, "cm_kstage_simplify: stage %s: out of memory", s->name);
  if (st == CM_OK) {
    sx_compact(&ns);
    free(s->exprs);
    *s = ns;
  } else {
    free(ns.exprs);
  }
  free(c.mat), free(c.of), free(c.has), free(c.lo), free(c.hi), free(c.rng), free(c.nform),
      free(c.forms);
  return st;
}

static int count_divmod(const cm_kstage *s) {
  int n = 0;
  for (int e = 0; e < s->n_exprs; e++)
    n += s->exprs[e].kind == CM_KX_MOD ||
         (s->exprs[e].kind == CM_KX_OP && s->exprs[e].op == CM_OP_DIV &&
          s->exprs[e].dtype == CM_I64);
  return n;
}

cm_status cm_kstage_simplify(cm_kstage *s, cm_err *err) {
  /* other templates keep expression ids of their own: left as they are */
  if (s->tmpl != CM_KT_NONE && s->tmpl != CM_KT_GEMM) return CM_OK;
  cm_status st = simplify_pass(s, -1, 0, err);
  if (st != CM_OK || s->tmpl != CM_KT_NONE || s->n_dom < 1 || s->n_dom + s->n_red >= CM_KMAX_VARS)
    return st;
  /* the innermost var still divided by C (a flattened axis pair, like heads x
     head dim): split into q*C + r so that r runs contiguously and vectorizes */
  int v = s->n_dom - 1;
  int64_t E = s->dom[v], best = 0;
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    bool dm =
        x->kind == CM_KX_MOD || (x->kind == CM_KX_OP && x->op == CM_OP_DIV && x->dtype == CM_I64);
    double cv;
    if (!dm || !cm_kx_is_const(s, x->b, &cv) || !(cm_kx_vars_used(s, x->a) & (1u << v))) continue;
    int64_t C = (int64_t)cv;
    if (C >= 16 && C < E && E % C == 0 && (best == 0 || C < best)) best = C;
  }
  if (best == 0) return CM_OK;
  cm_kstage t = *s;
  t.exprs = malloc(sizeof *t.exprs * (size_t)(s->n_exprs + 1));
  if (!t.exprs) return CM_OK;
  memcpy(t.exprs, s->exprs, sizeof *t.exprs * (size_t)s->n_exprs);
  t.cap_exprs = s->n_exprs + 1;
  cm_err ignored = {0}; /* the split is optional: a failure keeps the stage as it is */
  if (simplify_pass(&t, v, best, &ignored) == CM_OK && count_divmod(&t) < count_divmod(s)) {
    free(s->exprs);
    *s = t;
  } else {
    free(t.exprs);
  }
  return CM_OK;
}
