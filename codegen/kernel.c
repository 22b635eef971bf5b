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

/* ---- to be written: verifier, printer, interpreter, const data --------- */

cm_status cm_kernel_verify(const cm_kernel *k, cm_err *err) {
  (void)k;
  return CM_OK; /* the full verifier lands with the interpreter */
}
void cm_kernel_print(const cm_kernel *k, FILE *out) {
  fprintf(out, "kernel %s\n", k->name);
}
void *cm_kernel_const_data(const cm_graph *g, const cm_kbuffer *b, cm_err *err) {
  cm_errorf(err, CM_EINTERNAL, "cm_kernel_const_data: not implemented yet");
  return NULL;
}
cm_status cm_kernel_interpret(const cm_kernel *k, void *const *bufs, cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_kernel_interpret: not implemented yet");
}
int64_t cm_kstage_work_items(const cm_kstage *s) {
  if (s->tmpl == CM_KT_GEMM && s->n_dom >= 2 && s->tiles.mc > 0 && s->tiles.nc > 0) {
    int64_t batch = 1;
    for (int i = 0; i < s->n_dom - 2; i++) batch *= s->dom[i];
    int64_t m = s->dom[s->n_dom - 2], n = s->dom[s->n_dom - 1];
    return batch * ((m + s->tiles.mc - 1) / s->tiles.mc) * ((n + s->tiles.nc - 1) / s->tiles.nc);
  }
  int64_t w = 1;
  for (int i = 0; i < s->n_parallel && i < s->n_dom; i++) w *= s->dom[i];
  return w;
}

static int64_t round64(int64_t b) {
  return (b + 63) / 64 * 64;
}

/* The CPU GEMM template's per-thread workspace: packed B panel (kc x nc), packed
 * A block (mc x kc) and the C tile (mc x nc), f32, each 64-byte aligned. */
int64_t cm_kstage_workspace_bytes(const cm_kstage *s, cm_target t) {
  if (t != CM_TARGET_CPU || s->tmpl != CM_KT_GEMM) return 0;
  int64_t mc = s->tiles.mc, nc = s->tiles.nc, kc = s->tiles.kc;
  return round64(4 * kc * nc) + round64(4 * mc * kc) + round64(4 * mc * nc) + 64;
}
