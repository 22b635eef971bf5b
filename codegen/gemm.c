/* codegen/gemm.c — the GEMM template: which kernel-IR stages are GEMMs
 * (cm_gemm_mark: a contraction stage with dom [batch.., M, N], one SUM
 * reduction over K, body gemm_a * gemm_b), their plan (cm_kgemm_tiles: register
 * block mr x nr, cache blocks mc x nc x kc, from cm_target.gemm through the
 * cost-model rules of gemm_tiles), the K split of long GEMMs with few blocks
 * (cm_gemm_split_k), and what the rendered CPU function expects: its work items
 * and its per-thread workspace.
 *
 * Tunable fields (the autotuner searches exactly these; defaults below):
 *   cm_kstage.tiles.mr, .nr   register block (rows x columns of C)
 *   cm_kstage.tiles.mc, .nc   cache block of C per work item
 *   cm_kstage.tiles.kc        K slice packed at once
 *   the K split S             (k_split_of: 0 = none; stages _kpart and _ksum; a tuner changes
 *                             it with cm_gemm_resplit: 1, 2, 4 or 8, the default among them) */
#include "lower_internal.h"

#include <stdlib.h>
#include <string.h>

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
static int k_split_of(const cm_kstage *s, const cm_target *t) {
  if (s->tmpl != CM_KT_GEMM || s->accumulate || s->acc_dtype != CM_F32 || s->n_red != 1 ||
      s->n_dom < 2 || s->n_dom + 1 + s->n_red > CM_KMAX_VARS)
    return 0;
  if (t && t->kind == CM_TARGET_CUDA) return cm_cuda_gemm_k_split(s, t);
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
  /* the product as the unsplit stage's: in f32, bf16/f16 operands widened (exact) */
  a->body = cm_lower_product(a, a->gemm_a, a->gemm_b);
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
  cm_lower_finish_stage(a);

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
  cm_lower_finish_stage(b);
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

/* Marks stage s as a GEMM with operands a (over batch, i, k) and b (over
 * batch, k, j) and gives it the default plan. */
void cm_gemm_mark(cm_kstage *s, int a, int b, const cm_lower_opts *o) {
  s->tmpl = CM_KT_GEMM;
  s->gemm_a = a;
  s->gemm_b = b;
  gemm_tiles(s, o);
}

void cm_gemm_split_k(cm_kernel *k, const cm_lower_opts *o) {
  for (int si = 0; si < k->n_stages; si++) {
    int S = k_split_of(&k->stages[si], o ? o->target : NULL);
    if (S > 0) split_k_stage(k, si++, S, o);
  }
}

/* ---- the K split as a tuning knob (tune_space.c) ---------------------------------------- */

static bool k_split_legal(int64_t K, int S) {
  return S >= 2 && S <= 8 && K % S == 0 && K / S >= 256;
}

int cm_gemm_k_split_at(const cm_kernel *k, int si) {
  if (!k || si < 0 || si + 1 >= k->n_stages) return 0;
  const cm_kstage *a = &k->stages[si], *b = &k->stages[si + 1];
  size_t n = strlen(a->name);
  if (a->tmpl != CM_KT_GEMM || n < 6 || strcmp(a->name + n - 6, "_kpart") != 0 ||
      a->n_stores != 1 || a->n_dom < 3 || a->n_red != 1 || b->n_red != 1 ||
      b->n_dom != a->n_dom - 1 || b->red[0] != a->dom[0] || b->body < 0 || b->body >= b->n_exprs)
    return 0;
  int P = a->stores[0].buf;
  const cm_kexpr *load = &b->exprs[b->body];
  if (P < 0 || P >= k->n_buffers || k->buffers[P].kind != CM_KBUF_SCRATCH ||
      load->kind != CM_KX_LOAD || load->buf != P ||
      !k_split_legal(a->dom[0] * a->red[0], (int)a->dom[0]))
    return 0;
  return (int)a->dom[0];
}

int cm_gemm_k_split_options(const cm_kernel *k, int si, int *out) {
  const cm_kstage *s = &k->stages[si];
  int cur = cm_gemm_k_split_at(k, si), n = 0;
  bool unsplit_ok = !s->accumulate && s->acc_dtype == CM_F32 && s->n_red == 1 && s->n_dom >= 2 &&
                    s->n_dom + 1 + s->n_red <= CM_KMAX_VARS;
  if (s->tmpl != CM_KT_GEMM || (cur == 0 && !unsplit_ok)) return 0;
  int64_t K = cur > 0 ? cur * s->red[0] : s->red[0];
  out[n++] = 1;
  for (int S = 2; S <= 8; S *= 2)
    if (k_split_legal(K, S)) out[n++] = S;
  if (cur > 0 && cur != 2 && cur != 4 && cur != 8) out[n++] = cur;
  return n;
}

/* Stages si (_kpart) and si + 1 (_ksum) of k back into the GEMM they were split from (its
 * scratch buffer stays, unused); it takes stage si's place. */
static void merge_k_split(cm_kernel *k, int si, const cm_lower_opts *o) {
  cm_kstage a = k->stages[si], b = k->stages[si + 1];
  int nd = b.n_dom, S = (int)a.dom[0], most = a.n_exprs > b.n_exprs ? a.n_exprs : b.n_exprs;
  int *cmap = malloc(sizeof(int) * (size_t)(most > 0 ? most : 1));
  if (!cmap) abort();
  char name[64];
  snprintf(name, sizeof name, "%.*s", (int)strlen(a.name) - 6, a.name);
  cm_kstage *m = cm_kernel_add_stage(k, name);
  m->n_dom = nd;
  int vmap[CM_KMAX_VARS + 1];
  vmap[0] = cm_kx_iconst(m, 0); /* the split var: the whole K from 0 */
  for (int d = 0; d < nd; d++) m->dom[d] = b.dom[d], vmap[d + 1] = cm_kx_var(m, d);
  m->n_red = 1;
  m->red[0] = (int64_t)S * a.red[0];
  m->red_op = CM_KRED_SUM;
  m->acc_dtype = CM_F32;
  vmap[nd + 1] = cm_kx_var(m, nd);
  for (int e = 0; e < a.n_exprs; e++) cmap[e] = -1;
  m->gemm_a = copy_expr(m, k, &a, a.gemm_a, vmap, cmap);
  m->gemm_b = copy_expr(m, k, &a, a.gemm_b, vmap, cmap);
  m->body = cm_lower_product(m, m->gemm_a, m->gemm_b);
  /* the sum's stores, its vars the GEMM's (its reduction var unused there) */
  for (int d = 0; d < nd; d++) vmap[d] = cm_kx_var(m, d);
  vmap[nd] = -1;
  for (int e = 0; e < b.n_exprs; e++) cmap[e] = -1;
  for (int i = 0; i < b.n_stores; i++)
    m->stores[m->n_stores++] =
        (cm_kstore){b.stores[i].buf, copy_expr(m, k, &b, b.stores[i].index, vmap, cmap),
                    copy_expr(m, k, &b, b.stores[i].value, vmap, cmap)};
  m->tmpl = CM_KT_GEMM;
  gemm_tiles(m, o);
  cm_lower_finish_stage(m);
  free(cmap);
  int n = k->n_stages;
  cm_kstage merged = k->stages[n - 1];
  free(a.exprs);
  free(b.exprs);
  memmove(&k->stages[si + 1], &k->stages[si + 2], sizeof(cm_kstage) * (size_t)(n - 3 - si));
  k->stages[si] = merged;
  k->n_stages = n - 2;
}

cm_status cm_gemm_resplit(cm_kernel *k, int si, int S, const cm_target *t, cm_err *err) {
  int opts[8], n = cm_gemm_k_split_options(k, si, opts), cur = cm_gemm_k_split_at(k, si);
  bool known = false;
  for (int i = 0; i < n; i++) known |= opts[i] == S;
  if (!known)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: K split %d: not a split of this GEMM's K (2, 4 or 8 "
                     "dividing it into slices of at least 256)",
                     k->name, si, S);
  if (S == (cur > 0 ? cur : 1)) return CM_OK;
  cm_lower_opts o = {t, false, 0};
  if (cur > 0) merge_k_split(k, si, &o);
  if (S > 1) split_k_stage(k, si, S, &o);
  cm_status st = cm_kstage_simplify(&k->stages[si], err);
  if (st == CM_OK && S > 1) st = cm_kstage_simplify(&k->stages[si + 1], err);
  return st;
}

/* ---- what the rendered CPU function expects ---------------------------------- */

/* Exact for the CPU rendering of a lowered stage with templates on: a GEMM
 * stage renders as the packed GEMM when its accumulator is f32
 * (cm_llvm_stage_is_gemm), else as a generic loop nest. */
int64_t cm_kstage_work_items(const cm_kstage *s) {
  int64_t n = 1;
  if (s->tmpl == CM_KT_GEMM && s->acc_dtype == CM_F32 && s->n_dom >= 2 && s->tiles.mc > 0 &&
      s->tiles.nc > 0) {
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
  if (t != CM_TARGET_CPU || s->tmpl != CM_KT_GEMM || s->acc_dtype != CM_F32) return 0;
  /* packed A block, packed B panel and the C tile (render_llvm_gemm.c's layout): B
     for every kc slice when they take at most 4 MiB (render_llvm_gemm.c, gemm_b_floats) */
  int64_t a = (int64_t)s->tiles.mc * s->tiles.kc * 4, b = (int64_t)s->tiles.kc * s->tiles.nc * 4;
  if (s->n_red == 1 && s->tiles.kc > 0) {
    int64_t all = (s->red[0] + s->tiles.kc - 1) / s->tiles.kc * b;
    if (all <= ((int64_t)4 << 20)) b = all;
  }
  int64_t c = (int64_t)s->tiles.mc * s->tiles.nc * 4;
  return (a + 63) / 64 * 64 + (b + 63) / 64 * 64 + (c + 63) / 64 * 64 + 64;
}
