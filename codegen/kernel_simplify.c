/* codegen/kernel_simplify.c — cm_kstage_simplify: index arithmetic of a
 * stage (flattened-then-unflattened indices) rewritten to affine forms that
 * the renderers vectorize. */
#include "kernel_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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
  return cm_kstage_push(s, e);
}

static int sx_const(sctx *c, int64_t v) {
  cm_kexpr e = cm_kexpr_blank(CM_KX_CONST, CM_I64);
  e.value = (double)v;
  return sx_mk(c, e);
}

static int sx_op(sctx *c, cm_kx_kind kind, cm_op op, int a, int b) {
  cm_kexpr e = cm_kexpr_blank(kind, CM_I64);
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
    sform *fs = cm_kgrow(c->forms, &c->cap_forms, c->n_forms + 1, sizeof *fs);
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
    cm_kexpr v = cm_kexpr_blank(CM_KX_VAR, CM_I64);
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
      cm_kexpr k = cm_kexpr_blank(CM_KX_CONST, CM_BOOL);
      k.value = t;
      if (sf_grow(c)) r = cm_kstage_push(c->ns, k);
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
  if (s->n_red > 0) cm_kexpr_reach(s, s->body, live);
  for (int j = 0; j < s->n_stores; j++) {
    cm_kexpr_reach(s, s->stores[j].index, live);
    cm_kexpr_reach(s, s->stores[j].value, live);
  }
  if (s->tmpl == CM_KT_GEMM) cm_kexpr_reach(s, s->gemm_a, live), cm_kexpr_reach(s, s->gemm_b, live);
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
