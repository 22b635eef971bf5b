/* codegen/kernel.c — the kernel IR: builders (with constant folding of index
 * arithmetic), the verifier, the printer and the reference interpreter. */
#include "kernel_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void *cm_kgrow(void *p, int *cap, int need, size_t elem) {
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
  k->buffers = cm_kgrow(k->buffers, &k->cap_buffers, k->n_buffers + 1, sizeof *k->buffers);
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
  k->stages = cm_kgrow(k->stages, &k->cap_stages, k->n_stages + 1, sizeof *k->stages);
  cm_kstage *s = &k->stages[k->n_stages++];
  memset(s, 0, sizeof *s);
  snprintf(s->name, sizeof s->name, "%s", name);
  s->body = -1;
  s->gemm_a = s->gemm_b = -1;
  s->acc_dtype = CM_F32;
  return s;
}

int cm_kstage_push(cm_kstage *s, cm_kexpr e) {
  s->exprs = cm_kgrow(s->exprs, &s->cap_exprs, s->n_exprs + 1, sizeof *s->exprs);
  s->exprs[s->n_exprs] = e;
  return s->n_exprs++;
}

cm_kexpr cm_kexpr_blank(cm_kx_kind kind, cm_dtype dt) {
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
  cm_kexpr e = cm_kexpr_blank(CM_KX_CONST, dt);
  e.value = v;
  return cm_kstage_push(s, e);
}

int cm_kx_var(cm_kstage *s, int var) {
  for (int i = 0; i < s->n_exprs; i++)
    if (s->exprs[i].kind == CM_KX_VAR && s->exprs[i].var == var) return i;
  cm_kexpr e = cm_kexpr_blank(CM_KX_VAR, CM_I64);
  e.var = var;
  return cm_kstage_push(s, e);
}

int cm_kx_acc(cm_kstage *s) {
  for (int i = 0; i < s->n_exprs; i++)
    if (s->exprs[i].kind == CM_KX_ACC) return i;
  return cm_kstage_push(s, cm_kexpr_blank(CM_KX_ACC, s->acc_dtype));
}

int cm_kx_load(cm_kstage *s, const cm_kernel *k, int buf, int index) {
  cm_dtype dt = (buf >= 0 && buf < k->n_buffers) ? k->buffers[buf].dtype : CM_F32;
  for (int i = 0; i < s->n_exprs; i++) {
    const cm_kexpr *e = &s->exprs[i];
    if (e->kind == CM_KX_LOAD && e->buf == buf && e->a == index) return i;
  }
  cm_kexpr e = cm_kexpr_blank(CM_KX_LOAD, dt);
  e.buf = buf;
  e.a = index;
  return cm_kstage_push(s, e);
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
  cm_kexpr e = cm_kexpr_blank(CM_KX_OP, dt);
  e.op = op;
  e.a = a;
  e.b = b;
  e.c = c;
  return cm_kstage_push(s, e);
}

int cm_kx_mod(cm_kstage *s, int a, int b) {
  cm_kexpr e = cm_kexpr_blank(CM_KX_MOD, CM_I64);
  e.a = a;
  e.b = b;
  return cm_kstage_push(s, e);
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

bool cm_kx_is_gemm_factor(const cm_kstage *s, int e, int operand) {
  if (e == operand) return true;
  if (e < 0 || e >= s->n_exprs) return false;
  const cm_kexpr *x = &s->exprs[e];
  return x->kind == CM_KX_OP && x->op == CM_OP_CAST && x->a == operand && x->dtype == s->acc_dtype;
}

static int64_t kaff_var_extent(const cm_kstage *s, int v) {
  return v < s->n_dom ? s->dom[v] : s->red[v - s->n_dom];
}

void cm_kaff_range(const cm_kstage *s, const cm_kaff *a, int64_t *lo, int64_t *hi) {
  *lo = *hi = a->c0;
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    int64_t t = a->c[v] * (kaff_var_extent(s, v) - 1);
    *(t < 0 ? lo : hi) += t;
  }
}

/* div (or mod) of a by the constant d > 0 */
static bool kaff_divide(const cm_kstage *s, const cm_kaff *a, int64_t d, bool mod, cm_kaff *out) {
  int64_t lo, hi;
  cm_kaff_range(s, a, &lo, &hi);
  if (lo < 0) return false; /* truncating division of a negative value is not affine */
  cm_kaff q, r;
  memset(&q, 0, sizeof q);
  memset(&r, 0, sizeof r);
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    if (a->c[v] % d == 0)
      q.c[v] = a->c[v] / d;
    else
      r.c[v] = a->c[v];
  }
  q.c0 = a->c0 >= 0 ? a->c0 / d : -((-a->c0 + d - 1) / d);
  r.c0 = a->c0 - q.c0 * d;
  cm_kaff_range(s, &r, &lo, &hi);
  if (lo < 0 || hi >= d) return false;
  *out = mod ? r : q;
  return true;
}

bool cm_kaff_of(const cm_kstage *s, int e, cm_kaff *out, int *budget) {
  memset(out, 0, sizeof *out);
  if (e < 0 || e >= s->n_exprs || --*budget < 0) return false;
  const cm_kexpr *x = &s->exprs[e];
  int nv = s->n_dom + s->n_red;
  if (x->dtype != CM_I64) return false;
  if (x->kind == CM_KX_CONST) {
    if (!(x->value < 4e18 && x->value > -4e18)) return false;
    out->c0 = (int64_t)x->value;
    return (double)out->c0 == x->value;
  }
  if (x->kind == CM_KX_VAR) {
    if (x->var < 0 || x->var >= nv) return false;
    out->c[x->var] = 1;
    return true;
  }
  bool mod = x->kind == CM_KX_MOD;
  cm_op op = mod ? CM_OP_DIV : x->op; /* mod shares div's split */
  if ((!mod && x->kind != CM_KX_OP) ||
      (op != CM_OP_ADD && op != CM_OP_SUB && op != CM_OP_MUL && op != CM_OP_DIV))
    return false;
  cm_kaff a, b;
  if (!cm_kaff_of(s, x->a, &a, budget) || !cm_kaff_of(s, x->b, &b, budget)) return false;
  bool aconst = true, bconst = true;
  for (int v = 0; v < nv; v++) aconst &= a.c[v] == 0, bconst &= b.c[v] == 0;
  if (op == CM_OP_ADD || op == CM_OP_SUB) {
    int64_t sg = op == CM_OP_ADD ? 1 : -1;
    for (int v = 0; v < nv; v++) out->c[v] = a.c[v] + sg * b.c[v];
    out->c0 = a.c0 + sg * b.c0;
    return true;
  }
  if (op == CM_OP_MUL) {
    if (!aconst && !bconst) return false;
    const cm_kaff *f = bconst ? &a : &b;
    int64_t m = bconst ? b.c0 : a.c0;
    for (int v = 0; v < nv; v++)
      if (__builtin_mul_overflow(f->c[v], m, &out->c[v])) return false;
    return !__builtin_mul_overflow(f->c0, m, &out->c0);
  }
  if (!bconst || b.c0 <= 0) return false;
  return kaff_divide(s, &a, b.c0, mod, out);
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

/* The expressions of stage si: kinds, operands in range and before their
 * use, dtypes. */
static cm_status verify_exprs(const cm_kernel *k, int si, cm_err *err) {
  const cm_kstage *s = &k->stages[si];
  int ei = -1, nv = s->n_dom + s->n_red;
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
  return CM_OK;
}

/* Why GEMM stage s breaks the template's rules (NULL: it does not); vm: the
 * vars each expression uses. */
static const char *gemm_rule(const cm_kstage *s, const uint32_t *vm) {
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
           !cm_kx_is_gemm_factor(s, s->exprs[s->body].a, s->gemm_a) ||
           !cm_kx_is_gemm_factor(s, s->exprs[s->body].b, s->gemm_b))
    why = "GEMM body must be MUL(gemm_a, gemm_b), each possibly widened to acc_dtype";
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
  return why;
}

/* A collective stage: no loop nest, its buffers of the right kinds, dtypes and sizes. */
static cm_status verify_collective(const cm_kernel *k, int si, cm_err *err) {
  const cm_kstage *s = &k->stages[si];
  const cm_kcollective *x = &s->coll;
  int ei = -1;
  if (x->op != CM_KCOLL_ALL_REDUCE && x->op != CM_KCOLL_ALL_GATHER)
    KFAIL("collective op %d unknown", (int)x->op);
  if (s->n_dom || s->n_red || s->n_exprs || s->n_stores || s->tmpl != CM_KT_NONE)
    KFAIL("a collective stage has no loop nest, expressions, stores or template");
  if (x->ranks < 2) KFAIL("a collective stage needs ranks >= 2 (has %d)", x->ranks);
  if (x->in_buf < 0 || x->in_buf >= k->n_buffers || x->out_buf < 0 || x->out_buf >= k->n_buffers)
    KFAIL("collective buffers b%d -> b%d out of range", x->in_buf, x->out_buf);
  const cm_kbuffer *in = &k->buffers[x->in_buf], *out = &k->buffers[x->out_buf];
  int64_t want = x->op == CM_KCOLL_ALL_GATHER ? x->count * x->ranks : x->count;
  if (x->count < 1 || in->numel != x->count || out->numel != want)
    KFAIL("collective of %lld elements over %d ranks: input b%d has %lld, output b%d %lld",
          (long long)x->count, x->ranks, x->in_buf, (long long)in->numel, x->out_buf,
          (long long)out->numel);
  if (in->dtype != out->dtype) KFAIL("collective input and output dtypes differ");
  if ((out->kind != CM_KBUF_ARENA && out->kind != CM_KBUF_SCRATCH) || !out->written)
    KFAIL("collective output b%d must be a written arena or scratch buffer", x->out_buf);
  return CM_OK;
}

static cm_status verify_stage(const cm_kernel *k, int si, cm_err *err) {
  const cm_kstage *s = &k->stages[si];
  if (s->coll.op != CM_KCOLL_NONE) return verify_collective(k, si, err);
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
  cm_status vs = verify_exprs(k, si, err);
  if (vs != CM_OK) return vs;
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
    const char *why = gemm_rule(s, vm);
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

/* Whether kernel k reads arena value read_node or writes source written_source. */
static bool kernel_touches(const cm_kernel *k, int read_node, int written_source) {
  for (int b = 0; b < k->n_buffers; b++) {
    const cm_kbuffer *x = &k->buffers[b];
    if ((x->kind == CM_KBUF_ARENA && x->read && x->node == read_node) ||
        (x->kind == CM_KBUF_SOURCE && x->written && x->node == written_source))
      return true;
  }
  return false;
}

int cm_kprogram_collective_wait(const cm_kprogram *kp, int kernel, int stage) {
  const cm_kernel *k = &kp->kernels[kernel];
  const cm_kcollective *x = &k->stages[stage].coll;
  const cm_kbuffer *in = &k->buffers[x->in_buf];
  int out_node = k->buffers[x->out_buf].node;
  int src = in->kind == CM_KBUF_SOURCE ? in->node : -2; /* -2: no source (node -1 is no node) */
  int j = kernel + 1;
  while (j < kp->n_kernels && !kernel_touches(&kp->kernels[j], out_node, src)) j++;
  return j;
}

void cm_kcollective_name(const cm_kernel *k, int stage, const cm_graph *g, char *out, size_t size) {
  int v = k->stages[stage].coll.node;
  snprintf(out, size, "\"%.96s\" (node %d, kernel %s)",
           g && v >= 0 && v < g->n_nodes ? g->nodes[v].name : "?", v, k->name);
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

/* The rest of an attention span's plan: per-stage register blocks (whole-row
 * rendering), the workspace layouts (byte offsets), and when streaming the key
 * block's roles. */
static void print_attn_plan(bool bwd, const cm_kattn *a, FILE *out) {
  int span = a->span < CM_KATTN_MAX_SPAN ? a->span : CM_KATTN_MAX_SPAN;
  if (a->lanes > 0) {
    fprintf(out, "  stage tiles (%d lanes)", a->lanes);
    for (int i = 0; i < span; i++)
      if (a->mr[i] > 0) fprintf(out, " +%d:%dx%d", i, a->mr[i], a->nr[i]);
    fprintf(out, "\n");
  }
  int nl = a->n_local < 0 ? 0 : a->n_local < CM_KATTN_MAX_LOCAL ? a->n_local : CM_KATTN_MAX_LOCAL;
  fprintf(out, "  whole-row workspace %lld local", (long long)a->whole_bytes);
  for (int i = 0; i < nl; i++) fprintf(out, " @%lld", (long long)a->local_off[i]);
  fprintf(out, " pack @%lld\n", (long long)a->pack_off);
  if (!a->stream) return;
  if (bwd) {
    fprintf(out, "  stream workspace fixed @%lld @%lld @%lld @%lld local",
            (long long)a->bwd_fixed[0], (long long)a->bwd_fixed[1], (long long)a->bwd_fixed[2],
            (long long)a->bwd_fixed[3]);
    for (int i = 0; i < nl; i++) fprintf(out, " @%lld", (long long)a->bwd_local_off[i]);
    fprintf(out, " stages");
    for (int i = 0; i < span; i++)
      if (a->stage_off[i] > 0) fprintf(out, " +%d@%lld", i, (long long)a->stage_off[i]);
    fprintf(out, "\n");

    static const char *const names[] = {"-",         "tile",      "rowred",
                                        "gemm_rows", "gemm_keys", "gemm_tile"};
    fprintf(out, "  stream bc %d roles", a->bc);
    for (int i = 0; i < span; i++)
      fprintf(out, " %s", a->role[i] >= 0 && a->role[i] <= 5 ? names[(int)a->role[i]] : "?");
    fprintf(out, "\n");
    return;
  }
  fprintf(
      out,
      "  stream workspace q @%lld kv @%lld s @%lld e @%lld o @%lld m @%lld l @%lld alpha @%lld\n",
      (long long)a->stream_off[0], (long long)a->stream_off[1], (long long)a->stream_off[2],
      (long long)a->stream_off[3], (long long)a->stream_off[4], (long long)a->stream_off[5],
      (long long)a->stream_off[6], (long long)a->stream_off[7]);
  fprintf(out,
          "  stream bc %d stages max %d exp %d sum %d p %d out %d buffers s b%d m b%d e b%d l b%d "
          "p b%d keep%s%s%s%s%s\n",
          a->bc, a->st_max, a->st_exp, a->st_sum, a->st_p, a->st_out, a->buf_s, a->buf_m, a->buf_e,
          a->buf_l, a->buf_p, a->keep & CM_KATTN_KEEP_S ? " s" : "",
          a->keep & CM_KATTN_KEEP_M ? " m" : "", a->keep & CM_KATTN_KEEP_E ? " e" : "",
          a->keep & CM_KATTN_KEEP_L ? " l" : "", a->keep & CM_KATTN_KEEP_P ? " p" : "");
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
    if (s->coll.op != CM_KCOLL_NONE) {
      const cm_kcollective *x = &s->coll;
      fprintf(out, "  collective %s", x->op == CM_KCOLL_ALL_GATHER ? "all_gather" : "all_reduce");
      if (x->op == CM_KCOLL_ALL_GATHER)
        fprintf(out, " axis %d", x->axis);
      else
        fprintf(out, " %s", x->mode == CM_MODE_MEAN ? "mean" : "sum");
      fprintf(out, " ranks %d count %lld b%d -> b%d node %d\n", x->ranks, (long long)x->count,
              x->in_buf, x->out_buf, x->node);
    }
    if (s->tmpl == CM_KT_GEMM) {
      fprintf(out, "  gemm a=%%%d b=%%%d tiles mc=%d nc=%d kc=%d mr=%d nr=%d", s->gemm_a, s->gemm_b,
              s->tiles.mc, s->tiles.nc, s->tiles.kc, s->tiles.mr, s->tiles.nr);
      size_t nl = strlen(s->name);
      if (nl > 6 && !strcmp(s->name + nl - 6, "_kpart"))
        fprintf(out, " ksplit %lld", (long long)s->dom[0]);
      fprintf(out, "\n");
    }
    if (s->tmpl != CM_KT_NONE)
      fprintf(out, "  cpu work items %lld workspace %lld\n", (long long)cm_kstage_work_items(s),
              (long long)cm_kstage_workspace_bytes(s, CM_TARGET_CPU));
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
      print_attn_plan(s->tmpl == CM_KT_ATTENTION_BWD, a, out);
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

/* ---- const data ---------------------------------------------------------- */

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
void cm_kexpr_reach(const cm_kstage *s, int root, bool *mark) {
  if (root < 0 || mark[root]) return;
  mark[root] = true;
  const cm_kexpr *e = &s->exprs[root];
  if (e->kind == CM_KX_CONST || e->kind == CM_KX_VAR || e->kind == CM_KX_ACC) return;
  cm_kexpr_reach(s, e->a, mark);
  cm_kexpr_reach(s, e->b, mark);
  cm_kexpr_reach(s, e->c, mark);
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
  if (s->n_red > 0) cm_kexpr_reach(s, s->body, mb);
  for (int j = 0; j < s->n_stores; j++) {
    cm_kexpr_reach(s, s->stores[j].index, ms);
    cm_kexpr_reach(s, s->stores[j].value, ms);
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
  for (c.si = 0; c.si < k->n_stages; c.si++) {
    if (k->stages[c.si].coll.op != CM_KCOLL_NONE)
      return cm_errorf(err, CM_EINVALID,
                       "kernel %s stage %d (%s): a collective stage needs a communicator: the "
                       "backends run it (cm_compile_opts.comm)",
                       k->name, c.si, k->stages[c.si].name);
    if ((st = run_stage(&c)) != CM_OK) return st;
  }
  return CM_OK;
}
