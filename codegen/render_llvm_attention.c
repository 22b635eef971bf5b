/* codegen/render_llvm_attention.c — fused attention spans rendered to LLVM IR
 * (plan: the first stage's cm_kattn, from attention.c): whole rows per block,
 * or streaming over key blocks (online softmax forward, and backward). */
#include "render_llvm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- attention span (fused) ------------------------------------------------
 *
 * The first stage's function runs the whole span (codegen.h, cm_kattn): per
 * work item (one batch item) and block of br query rows, every stage of the
 * span restricted to those rows. Local buffers live in the workspace: their
 * base is ws + local_off and their index is shifted by the block's first
 * element (ioff), so the stages' own index expressions stay as they are. GEMM
 * stages pack A (the block's rows) and B (whole) over the full K and run an
 * mr x nr micro-kernel into a C tile; their stores are the epilogue. */

typedef struct attn_plan {
  int first, span, nb, mr, nr;
  int64_t rows, br, nblk;
  bool rowwise;
  int64_t local_off[CM_KATTN_MAX_LOCAL], pack_off;
  int64_t am, bm; /* floats of packed A, packed B */
  /* per stage of the span (GEMM stages): its micro-kernel's register block */
  int smr[CM_KATTN_MAX_SPAN], snr[CM_KATTN_MAX_SPAN];
} attn_plan;

static bool attn_is_gemm(const attn_plan *p, const cm_kstage *s, int si) {
  return (si == p->first || s->tmpl == CM_KT_GEMM) && s->n_red == 1 && s->n_dom == p->nb + 2 &&
         s->red_op == CM_KRED_SUM && s->acc_dtype == CM_F32 && s->gemm_a >= 0 && s->gemm_b >= 0;
}

/* Whether the span from stage first fuses with this renderer (else: generic). */
static bool attn_plan_of(rctx *c, int first, attn_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_err e;
  if (cm_kernel_verify(k, &e) != CM_OK || cm_kattn_check(k, first, &e) != CM_OK) return false;
  memset(p, 0, sizeof *p);
  p->first = first, p->span = a->span, p->nb = a->nb, p->rows = a->rows;
  p->mr = s0->tiles.mr, p->nr = s0->tiles.nr;
  p->rowwise = a->br < a->rows;
  p->br = p->rowwise ? a->br : a->rows;
  p->nblk = (p->rows + p->br - 1) / p->br;
  int W = c->W;
  if (p->mr < 1 || p->nr < W || p->nr % W || p->nr / W > 8 || p->mr * (p->nr / W) > 32)
    return false;
  /* rows of a block other than the last are whole panels: packing never reads
     a row of the next block */
  if (p->rowwise && p->br % p->mr) return false;
  /* the workspace layout: the plan's (cm_kattn_layout, for tiles.mr x tiles.nr) */
  if (a->whole_bytes <= 0 || a->whole_bytes > a->ws_bytes) return false;
  memcpy(p->local_off, a->local_off, sizeof p->local_off);
  p->pack_off = a->pack_off;
  if (p->span > CM_KATTN_MAX_SPAN) return false;
  for (int si = first; si < first + p->span; si++) {
    const cm_kstage *s = &k->stages[si];
    if ((si == first || s->tmpl == CM_KT_GEMM) && !attn_is_gemm(p, s, si)) return false;
    if (s->n_dom + s->n_red > CM_KMAX_VARS || s->n_stores > CM_KMAX_STORES) return false;
    p->smr[si - first] = p->mr, p->snr[si - first] = p->nr;
    if (attn_is_gemm(p, s, si)) {
      int64_t m = p->rowwise ? p->br : s->dom[p->nb];
      int64_t mp = (m + p->mr - 1) / p->mr * p->mr;
      int64_t np = (s->dom[p->nb + 1] + p->nr - 1) / p->nr * p->nr;
      if (mp * s->red[0] > p->am) p->am = mp * s->red[0];
      if (s->red[0] * np > p->bm) p->bm = s->red[0] * np;
    }
  }
  /* the register blocks of the span's GEMM stages: the plan's (attention.c) */
  if (a->lanes == W)
    for (int i = 0; i < p->span; i++)
      if (a->mr[i] > 0 && a->nr[i] > 0) p->smr[i] = a->mr[i], p->snr[i] = a->nr[i];
  cm_kattn_pack_need(k, first, p->smr, p->snr, &p->am, &p->bm);
  return true;
}

/* A GEMM stage of the span whose only store is its accumulator, f32, at an
 * index contiguous along the column var: the micro-kernel stores its
 * registers there (masked at the last row and column panels) instead of
 * going through the C tile and a scalar epilogue. */
typedef struct attn_direct {
  int buf, index; /* the store's buffer and index expression */
  int64_t ci, n;  /* index step per row; columns */
  LLVMValueRef i0, mrows;
} attn_direct;

static bool attn_direct_of(rctx *c, const attn_plan *p, attn_direct *d) {
  const cm_kstage *s = c->s;
  if (s->n_stores != 1 || s->accumulate) return false;
  const cm_kstore *st = &s->stores[0];
  if (st->value < 0 || st->value >= s->n_exprs || st->buf < 0 || st->buf >= c->k->n_buffers)
    return false;
  const cm_kexpr *v = &s->exprs[st->value];
  int64_t cj;
  if (v->kind != CM_KX_ACC || v->dtype != CM_F32 || c->k->buffers[st->buf].dtype != CM_F32 ||
      !rl_lin_coef(s, st->index, p->nb + 1, &cj) || cj != 1 ||
      !rl_lin_coef(s, st->index, p->nb, &d->ci) || (cm_kx_vars_used(s, st->index) >> s->n_dom) != 0)
    return false;
  d->buf = st->buf, d->index = st->index, d->n = s->dom[p->nb + 1];
  return true;
}

/* The micro-kernel's registers of block (row rb, column cb) straight to the
 * stage's store (attn_direct): a block inside the rows and columns with plain
 * vector stores; a block at the last row or column panel with lanes past them
 * masked off (i32 lane masks: the i64 ones with their per-row selects took ~14 %
 * of the forward span on AVX2 when every block paid them). */
static void attn_store_direct(rctx *c, const attn_plan *p, const attn_direct *d, LLVMValueRef rb,
                              LLVMValueRef cb, int64_t mr, int64_t nv, LLVMValueRef *acc) {
  LLVMBuilderRef B = c->B;
  int W = c->W;
  c->vars[p->nb] = LLVMBuildAdd(B, d->i0, rb, "at.drow");
  c->vars[p->nb + 1] = cb;
  rl_reset_memo(c);
  LLVMValueRef idx = rl_convert(c, rl_emit(c, d->index), c->s->exprs[d->index].dtype, CM_I64);
  if (c->failed) return;
  if (c->ioff && c->ioff[d->buf]) idx = LLVMBuildSub(B, idx, c->ioff[d->buf], "at.idx");
  LLVMValueRef inside = LLVMBuildAnd(
      B, LLVMBuildICmp(B, LLVMIntSLE, LLVMBuildAdd(B, rb, rl_ci64(c, mr), ""), d->mrows, ""),
      LLVMBuildICmp(B, LLVMIntSLE, LLVMBuildAdd(B, cb, rl_ci64(c, nv * W), ""), rl_ci64(c, d->n),
                    ""),
      "at.inside");
  LLVMBasicBlockRef bin = rl_new_block(c, "at.dstore"), bedge = rl_new_block(c, "at.dstore.edge"),
                    bjoin = rl_new_block(c, "at.dstore.done");
  LLVMBuildCondBr(B, inside, bin, bedge);
  LLVMPositionBuilderAtEnd(B, bin);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, idx, rl_ci64(c, r * d->ci + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, acc[r * nv + v],
                                       LLVMBuildGEP2(B, c->f32, c->bases[d->buf], &off, 1, ""));
      LLVMSetAlignment(st, 4);
      rl_set_scopes(c, d->buf, st);
    }
  LLVMBuildBr(B, bjoin);
  LLVMPositionBuilderAtEnd(B, bedge);
  LLVMTypeRef mty = LLVMVectorType(c->i1, (unsigned)W), vi32 = LLVMVectorType(c->i32, (unsigned)W);
  /* columns left from cb (at most the block's, so i32 holds them) */
  LLVMValueRef left = LLVMBuildTrunc(
      B, rl_smin(c, LLVMBuildSub(B, rl_ci64(c, d->n), cb, ""), rl_ci64(c, nv * W), ""), c->i32,
      "at.left");
  LLVMValueRef lsplat = LLVMBuildShuffleVector(
      B, LLVMBuildInsertElement(B, LLVMGetPoison(vi32), left, LLVMConstInt(c->i32, 0, 0), ""),
      LLVMGetPoison(vi32), LLVMConstNull(vi32), "");
  for (int64_t v = 0; v < nv; v++) {
    LLVMValueRef cols[32]; /* the lanes' columns from cb */
    for (int l = 0; l < W; l++) cols[l] = LLVMConstInt(c->i32, (unsigned long long)(v * W + l), 0);
    LLVMValueRef cmask =
        LLVMBuildICmp(B, LLVMIntSLT, LLVMConstVector(cols, (unsigned)W), lsplat, "at.cmask");
    for (int64_t r = 0; r < mr; r++) {
      LLVMValueRef rin =
          LLVMBuildICmp(B, LLVMIntSLT, LLVMBuildAdd(B, rb, rl_ci64(c, r), ""), d->mrows, "");
      LLVMValueRef m = LLVMBuildSelect(B, rin, cmask, LLVMConstNull(mty), "at.mask");
      LLVMValueRef off = LLVMBuildAdd(B, idx, rl_ci64(c, r * d->ci + v * W), "");
      /* not inbounds: masked-off lanes of the last panels may point past the buffer */
      LLVMValueRef ptr = LLVMBuildGEP2(B, c->f32, c->bases[d->buf], &off, 1, "at.dp");
      LLVMTypeRef tys[2] = {c->vty, c->ptr};
      LLVMValueRef args[4] = {acc[r * nv + v], ptr, LLVMConstInt(c->i32, 4, 0), m};
      rl_set_scopes(c, d->buf, rl_intrin(c, "llvm.masked.store", tys, 2, args, 4, ""));
    }
  }
  LLVMBuildBr(B, bjoin);
  LLVMPositionBuilderAtEnd(B, bjoin);
}

/* C tile (ldc floats per row) = packed A panels [0, mpan) x packed B panels
 * [0, npan) over K; with d, the stage's store instead (attn_store_direct). */
static void attn_microkernel(rctx *c, const attn_plan *p, const attn_direct *d, int64_t mr,
                             int64_t nr, LLVMValueRef Ap, LLVMValueRef Bp, LLVMValueRef Ct,
                             LLVMValueRef mpan, int64_t npan, int64_t K, int64_t ldc) {
  LLVMBuilderRef B = c->B;
  int64_t W = c->W, nv = nr / W;
  loop Jr = rl_loop_begin(c, "at.jr", rl_ci64(c, 0));
  loop Ir = rl_loop_begin(c, "at.ir", rl_ci64(c, 0));
  LLVMValueRef apan = rl_fptr(c, Ap, LLVMBuildMul(B, Ir.iv, rl_ci64(c, K * mr), ""), "apanel");
  LLVMValueRef bpan = rl_fptr(c, Bp, LLVMBuildMul(B, Jr.iv, rl_ci64(c, K * nr), ""), "bpanel");
  LLVMValueRef cbase = LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr * ldc), ""),
                                    LLVMBuildMul(B, Jr.iv, rl_ci64(c, nr), ""), "cbase");
  LLVMValueRef zeros[64], nacc[64];
  for (int64_t i = 0; i < mr * nv; i++) zeros[i] = LLVMConstNull(c->vty);
  char kname[48]; /* the register block in the loop's name (tests read it) */
  snprintf(kname, sizeof kname, "at.kk.m%lldn%lld%s", (long long)mr, (long long)nr,
           d ? ".direct" : "");
  rl_emit_fma_kloop(c, apan, bpan, mr, nv, nr, rl_ci64(c, K), kname, zeros, nacc);
  if (d)
    attn_store_direct(c, p, d, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr), ""),
                      LLVMBuildMul(B, Jr.iv, rl_ci64(c, nr), ""), mr, nv, nacc);
  for (int64_t r = 0; r < mr && !d; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, rl_ci64(c, r * ldc + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, nacc[r * nv + v], rl_fptr(c, Ct, off, "cp"));
      LLVMSetAlignment(st, 4);
    }
  rl_loop_end(c, &Ir, mpan, "at.ir.exit");
  rl_loop_end(c, &Jr, rl_ci64(c, npan), "at.jr.exit");
}

/* emit_pack's layout (panels of R rows x K, zero rows at or beyond lim) for
 * an operand contiguous along k with R not a multiple of W: per group of up
 * to W rows of a panel and W consecutive k, one vector load per row (rows
 * past lim clamped, then zeroed), a W x W transpose, and per k one store of
 * the group's lanes (masked when the group is short); the K % W last k
 * element by element. */
static void attn_pack_kt(rctx *c, const char *name, int e, int rv, LLVMValueRef r0, int64_t lim,
                         LLVMValueRef npan, int64_t R, int64_t K, LLVMValueRef dst) {
  LLVMBuilderRef B = c->B;
  const cm_kexpr *x = &c->s->exprs[e];
  int W = c->W, kv = c->s->n_dom;
  int64_t ngr = (R + W - 1) / W, nch = K / W;
  char nm[48];
  snprintf(nm, sizeof nm, "%s.kt.panel", name);
  loop Lp = rl_loop_begin(c, nm, rl_ci64(c, 0));
  LLVMValueRef pr0 = LLVMBuildAdd(B, r0, LLVMBuildMul(B, Lp.iv, rl_ci64(c, R), ""), "pr0");
  LLVMValueRef pdst = rl_fptr(c, dst, LLVMBuildMul(B, Lp.iv, rl_ci64(c, K * R), ""), "pdst");
  LLVMValueRef rows[64], inb[64];
  for (int64_t l = 0; l < R; l++) {
    LLVMValueRef row = LLVMBuildAdd(B, pr0, rl_ci64(c, l), "row");
    inb[l] = LLVMBuildICmp(B, LLVMIntSLT, row, rl_ci64(c, lim), "inb");
    rows[l] = rl_smin(c, row, rl_ci64(c, lim - 1), "rowc");
  }
  if (nch > 0) {
    snprintf(nm, sizeof nm, "%s.kt.kv", name);
    loop Lc = rl_loop_begin(c, nm, rl_ci64(c, 0));
    LLVMValueRef kkb = LLVMBuildMul(B, Lc.iv, rl_ci64(c, W), "kkb");
    c->vars[kv] = kkb;
    for (int64_t g = 0; g < ngr; g++) {
      int64_t cnt = R - g * W < W ? R - g * W : W;
      LLVMValueRef v[32];
      for (int l = 0; l < W; l++) {
        if (l >= cnt) {
          v[l] = LLVMConstNull(c->vty);
          continue;
        }
        c->vars[rv] = rows[g * W + l];
        rl_reset_memo(c);
        LLVMValueRef idx = rl_convert(c, rl_emit(c, x->a), c->s->exprs[x->a].dtype, CM_I64);
        LLVMValueRef ld = LLVMBuildLoad2(B, c->vty, rl_buf_gep(c, x->buf, idx), "krow");
        LLVMSetAlignment(ld, 4);
        rl_set_scopes(c, x->buf, ld);
        v[l] = LLVMBuildSelect(B, inb[g * W + l], ld, LLVMConstNull(c->vty), "krow.z");
      }
      rl_transpose_block(c, v);
      LLVMValueRef mk[32];
      for (int l = 0; l < W; l++) mk[l] = LLVMConstInt(c->i1, l < cnt, 0);
      LLVMValueRef mask = LLVMConstVector(mk, (unsigned)W);
      for (int t = 0; t < W; t++) {
        LLVMValueRef off = LLVMBuildAdd(
            B, LLVMBuildMul(B, LLVMBuildAdd(B, kkb, rl_ci64(c, t), ""), rl_ci64(c, R), ""),
            rl_ci64(c, g * W), "");
        LLVMValueRef ptr = rl_fptr(c, pdst, off, "dst");
        /* a panel narrower than a vector: whole stores in increasing k, each one's lanes past
           the rows overwritten by the next k's (the last panel's spill into the 16 floats
           cm_kattn_pack_need leaves after packed A); masked stores are slow (Zen 3: the pack
           took ~15 % of a span) */
        if (cnt == W || ngr == 1) {
          LLVMSetAlignment(LLVMBuildStore(B, v[t], ptr), 4);
        } else {
          LLVMTypeRef tys[2] = {c->vty, c->ptr};
          LLVMValueRef args[4] = {v[t], ptr, LLVMConstInt(c->i32, 4, 0), mask};
          rl_intrin(c, "llvm.masked.store", tys, 2, args, 4, "");
        }
      }
    }
    snprintf(nm, sizeof nm, "%s.kt.kv.exit", name);
    rl_loop_end(c, &Lc, rl_ci64(c, nch), nm);
  }
  for (int64_t k = nch * W; k < K; k++) {
    c->vars[kv] = rl_ci64(c, k);
    for (int64_t l = 0; l < R; l++) {
      c->vars[rv] = rows[l];
      rl_reset_memo(c);
      LLVMValueRef val = rl_convert(c, rl_emit(c, e), c->s->exprs[e].dtype, CM_F32);
      val = LLVMBuildSelect(B, inb[l], val, LLVMConstReal(c->f32, 0), "a");
      LLVMSetAlignment(LLVMBuildStore(B, val, rl_fptr(c, pdst, rl_ci64(c, k * R + l), "dst")), 4);
    }
  }
  snprintf(nm, sizeof nm, "%s.kt.panel.exit", name);
  rl_loop_end(c, &Lp, npan, nm);
  c->vars[kv] = NULL;
}

/* One GEMM stage of the span for query rows [i0, i0 + mrows). */
static void attn_gemm_block(rctx *c, const attn_plan *p, LLVMValueRef wsp, LLVMValueRef i0,
                            LLVMValueRef mrows) {
  const cm_kstage *s = c->s;
  LLVMBuilderRef B = c->B;
  int iv = p->nb, jv = p->nb + 1;
  int64_t mr = p->smr[c->stage - p->first], nr = p->snr[c->stage - p->first];
  int64_t M = s->dom[iv], N = s->dom[jv], K = s->red[0];
  int64_t npan = (N + nr - 1) / nr, ldc = npan * nr;
  LLVMValueRef Ap = rl_fptr(c, wsp, rl_ci64(c, 0), "at.Ap");
  /* 16 floats between packed A and B: attn_pack_kt's whole stores past A's last panel */
  LLVMValueRef Bp = rl_fptr(c, wsp, rl_ci64(c, (p->am + 15) / 16 * 16 + 16), "at.Bp");
  LLVMValueRef Ct =
      rl_fptr(c, wsp, rl_ci64(c, (p->am + 15) / 16 * 16 + 16 + (p->bm + 15) / 16 * 16), "at.Ct");
  LLVMValueRef mpan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, mrows, rl_ci64(c, mr - 1), ""), rl_ci64(c, mr), "at.mpan");
  rl_emit_pack(c, "at.packB", s->gemm_b, jv, rl_ci64(c, 0), N, rl_ci64(c, npan), nr, K,
               rl_ci64(c, 0), rl_ci64(c, K), Bp);
  if (rl_k_contiguous(c, s->gemm_a) && mr % c->W && mr <= 64)
    attn_pack_kt(c, "at.packA", s->gemm_a, iv, i0, M, mpan, mr, K, Ap);
  else
    rl_emit_pack(c, "at.packA", s->gemm_a, iv, i0, M, mpan, mr, K, rl_ci64(c, 0), rl_ci64(c, K),
                 Ap);
  attn_direct d;
  if (attn_direct_of(c, p, &d)) {
    d.i0 = i0, d.mrows = mrows;
    attn_microkernel(c, p, &d, mr, nr, Ap, Bp, Ct, mpan, npan, K, ldc);
    return;
  }
  attn_microkernel(c, p, NULL, mr, nr, Ap, Bp, Ct, mpan, npan, K, ldc);
  loop Ei = rl_loop_begin(c, "at.epi.i", rl_ci64(c, 0));
  loop Ej = rl_loop_begin(c, "at.epi.j", rl_ci64(c, 0));
  c->vars[iv] = LLVMBuildAdd(B, i0, Ei.iv, "i");
  c->vars[jv] = Ej.iv;
  LLVMValueRef coff = LLVMBuildAdd(B, LLVMBuildMul(B, Ei.iv, rl_ci64(c, ldc), ""), Ej.iv, "");
  c->acc = LLVMBuildLoad2(B, c->f32, rl_fptr(c, Ct, coff, "cp"), "c");
  rl_emit_stores(c);
  rl_loop_end(c, &Ej, rl_ci64(c, N), "at.epi.j.exit");
  rl_loop_end(c, &Ei, mrows, "at.epi.i.exit");
  c->acc = NULL;
}

/* A generic stage of the span: var nb over [lo, hi) (rowwise) or whole. */
static void attn_generic_block(rctx *c, const attn_plan *p, LLVMValueRef lo, LLVMValueRef hi) {
  const cm_kstage *s = c->s;
  loop L[CM_KMAX_VARS];
  for (int v = p->nb; v < s->n_dom; v++) {
    char nm[24];
    snprintf(nm, sizeof nm, "at.v%d", v);
    bool row = p->rowwise && v == p->nb;
    L[v] = rl_loop_begin(c, nm, row ? lo : rl_ci64(c, 0));
    c->vars[v] = L[v].iv;
  }
  c->acc = s->n_red > 0 ? rl_emit_reduction(c) : NULL;
  rl_emit_stores(c);
  for (int v = s->n_dom - 1; v >= p->nb; v--) {
    char nm[24];
    snprintf(nm, sizeof nm, "at.v%d.exit", v);
    bool row = p->rowwise && v == p->nb;
    rl_loop_end(c, &L[v], row ? hi : rl_ci64(c, s->dom[v]), nm);
  }
  c->acc = NULL;
}

static void render_attention(rctx *c, const char *fname, const attn_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[p->first];
  const cm_kattn *a = &s0->attn;
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  LLVMValueRef *ioff = calloc((size_t)k->n_buffers + 1, sizeof *ioff);
  LLVMValueRef *saved = malloc(sizeof *saved * ((size_t)k->n_buffers + 1));
  LLVMValueRef *memo = rl_span_memo(c, p->first, p->span);
  if (!ioff || !saved || !memo) {
    free(ioff), free(saved), free(memo);
    if (!c->failed) {
      c->failed = true;
      c->fail_status = cm_errorf(c->err, CM_EINTERNAL, "cm_render_llvm: out of memory");
    }
    rl_end_function(c, done);
    return;
  }
  memcpy(saved, c->bases, sizeof *saved * (size_t)k->n_buffers);
  LLVMValueRef *saved_memo = c->memo;
  LLVMValueRef *scope = calloc((size_t)k->n_buffers + 1, sizeof *scope);
  LLVMValueRef *noalias = calloc((size_t)k->n_buffers + 1, sizeof *noalias);
  if (scope && noalias) {
    /* one scope per local tile, one for all memory buffers */
    LLVMMetadataRef dom = rl_self_md(c, NULL), sc[CM_KATTN_MAX_LOCAL + 1];
    for (int i = 0; i <= a->n_local; i++) sc[i] = rl_self_md(c, dom);
    for (int b = 0; b < k->n_buffers; b++) {
      int li = a->n_local;
      for (int i = 0; i < a->n_local; i++)
        if (a->local[i] == b) li = i;
      LLVMMetadataRef others[CM_KATTN_MAX_LOCAL + 1];
      int n = 0;
      for (int i = 0; i <= a->n_local; i++)
        if (i != li) others[n++] = sc[i];
      scope[b] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sc[li], 1));
      noalias[b] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, others, (size_t)n));
    }
    c->md_scope = scope, c->md_noalias = noalias;
  }
  c->memo = memo;
  for (int i = 0; i < a->n_local; i++) {
    LLVMValueRef off = rl_ci64(c, p->local_off[i]);
    c->bases[a->local[i]] = LLVMBuildInBoundsGEP2(B, c->i8, ws, &off, 1, "local");
  }
  LLVMValueRef poff = rl_ci64(c, p->pack_off);
  LLVMValueRef wsp = LLVMBuildInBoundsGEP2(B, c->i8, ws, &poff, 1, "at.pack");
  loop Wl = rl_loop_begin(c, "at.w", begin);
  LLVMValueRef bvals[CM_KMAX_VARS];
  LLVMValueRef rest = Wl.iv;
  for (int v = p->nb - 1; v >= 0; v--) {
    if (v == 0) {
      bvals[v] = rest;
    } else {
      bvals[v] = LLVMBuildSRem(B, rest, rl_ci64(c, s0->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, rl_ci64(c, s0->dom[v]), "");
    }
  }
  loop Qb = rl_loop_begin(c, "at.qblk", rl_ci64(c, 0));
  LLVMValueRef i0 = LLVMBuildMul(B, Qb.iv, rl_ci64(c, p->br), "at.i0");
  LLVMValueRef mrows =
      rl_smin(c, LLVMBuildSub(B, rl_ci64(c, p->rows), i0, ""), rl_ci64(c, p->br), "at.m");
  LLVMValueRef iend = LLVMBuildAdd(B, i0, mrows, "at.iend");
  /* first element of this block in each local buffer */
  LLVMValueRef row0 = LLVMBuildAdd(B, LLVMBuildMul(B, Wl.iv, rl_ci64(c, p->rows), ""),
                                   p->rowwise ? i0 : rl_ci64(c, 0), "at.row0");
  for (int i = 0; i < a->n_local; i++)
    ioff[a->local[i]] = LLVMBuildMul(B, row0, rl_ci64(c, a->local_row[i]), "at.ioff");
  c->ioff = ioff;
  for (int si = p->first; si < p->first + p->span && !c->failed; si++) {
    const cm_kstage *s = &k->stages[si];
    c->s = s;
    c->stage = si;
    memset(c->vars, 0, sizeof c->vars);
    for (int v = 0; v < p->nb; v++) c->vars[v] = bvals[v];
    if (attn_is_gemm(p, s, si)) {
      if (p->rowwise)
        attn_gemm_block(c, p, wsp, i0, mrows);
      else
        attn_gemm_block(c, p, wsp, rl_ci64(c, 0), rl_ci64(c, s->dom[p->nb]));
    } else {
      attn_generic_block(c, p, i0, iend);
    }
  }
  c->ioff = NULL;
  c->s = s0;
  c->stage = p->first;
  rl_loop_end(c, &Qb, rl_ci64(c, p->nblk), "at.qblk.exit");
  rl_loop_end(c, &Wl, end, "at.w.exit");
  rl_end_function(c, done);
  memcpy(c->bases, saved, sizeof *saved * (size_t)k->n_buffers);
  c->memo = saved_memo;
  c->md_scope = c->md_noalias = NULL;
  free(scope), free(noalias);
  free(ioff), free(saved), free(memo);
}

/* ---- attention span, streaming (online softmax over key blocks) -----------
 *
 * A forward span the lowering matched (cm_kattn.stream: S, m, E, l, [P], O)
 * with bc < keys. Per work item (batch item) and block of br query rows: Q
 * packed once; for each block of bc keys, S_j = Q K_j^T (packed micro-kernel,
 * then the S stage's epilogue), m_new = max(m, rowmax(f(S_j))), alpha =
 * exp(m - m_new), E_j = the E stage's value at m_new (packed as the A operand
 * of P V), l = alpha l + rowsum(E_j), O = alpha O + E_j V_j (the rescale in the
 * micro-kernel's accumulator init); finally O / l goes through the O stage's
 * epilogue. Roles the graph keeps (cm_kattn.keep) are written from the final
 * m and l: m and l per row, S, E and P by a second pass over the key blocks
 * recomputing S_j. The role loads of each stage are not evaluated: they take
 * the tile's values (the lowering proved every such load canonical). Workspace:
 * cm_kattn_stream_workspace (the plan's stream_off), O(br (bc + d)), independent of the keys. */

typedef struct fa_plan {
  int first, nb, mr, nr;
  int64_t rows, keys, br, nblk, bc, nkb, d, dv, brp, ldc, ldo;
  int64_t off[8];
  const cm_kattn *a;
  const cm_kstage *sS, *sM, *sE, *sL, *sP, *sO;
} fa_plan;

static bool fa_plan_of(rctx *c, int first, fa_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_err e;
  if (s0->tmpl != CM_KT_ATTENTION_FWD || !a->stream || cm_kernel_verify(k, &e) != CM_OK ||
      cm_kattn_stream_check(k, first, &e) != CM_OK)
    return false;
  int end = first + a->span;
  int st[5] = {a->st_max, a->st_exp, a->st_sum, a->st_out, a->st_p};
  for (int i = 0; i < 5; i++)
    if ((st[i] <= first || st[i] >= end) && !(i == 4 && st[i] == -1)) return false;
  int bf[5] = {a->buf_s, a->buf_m, a->buf_e, a->buf_l, a->buf_p};
  for (int i = 0; i < 5; i++)
    if ((bf[i] < 0 || bf[i] >= k->n_buffers) && !(i == 4 && bf[i] == -1 && a->st_p == -1))
      return false;
  memset(p, 0, sizeof *p);
  p->first = first, p->nb = a->nb, p->a = a;
  p->mr = s0->tiles.mr, p->nr = s0->tiles.nr;
  int W = c->W;
  if (p->mr < 1 || p->nr < W || p->nr % W || p->nr / W > 8 || p->mr * (p->nr / W) > 32)
    return false;
  p->sS = s0, p->sM = &k->stages[a->st_max], p->sE = &k->stages[a->st_exp];
  p->sL = &k->stages[a->st_sum], p->sO = &k->stages[a->st_out];
  p->sP = a->st_p >= 0 ? &k->stages[a->st_p] : NULL;
  if (s0->n_dom != p->nb + 2 || s0->n_red != 1 || p->sO->n_dom < 2 || p->sO->n_red != 1 ||
      p->sO->gemm_a < 0 || p->sO->gemm_b < 0 || s0->gemm_a < 0 || s0->gemm_b < 0 ||
      p->sM->n_red != 1 || p->sL->n_red != 1 || p->sE->n_stores != 1 ||
      (p->sP && p->sP->n_stores != 1) || s0->n_stores != 1)
    return false;
  p->rows = a->rows, p->keys = s0->dom[p->nb + 1];
  p->br = a->br < a->rows ? a->br : a->rows;
  p->nblk = (p->rows + p->br - 1) / p->br;
  p->bc = a->bc;
  if (p->bc < 1 || p->bc >= p->keys) return false;
  p->nkb = (p->keys + p->bc - 1) / p->bc;
  p->d = s0->red[0], p->dv = p->sO->dom[p->sO->n_dom - 1];
  p->brp = (p->br + p->mr - 1) / p->mr * p->mr;
  p->ldc = (p->bc + p->nr - 1) / p->nr * p->nr;
  p->ldo = (p->dv + p->nr - 1) / p->nr * p->nr;
  /* rows of a block other than the last are whole panels */
  if (p->br < p->rows && p->br % p->mr) return false;
  /* the workspace layout: the plan's (cm_kattn_layout; its total is ws_bytes) */
  memcpy(p->off, a->stream_off, sizeof p->off);
  return a->ws_bytes > 0;
}

static LLVMValueRef fa_f32p(rctx *c, LLVMValueRef ws, int64_t byte_off, const char *name) {
  LLVMValueRef off = rl_ci64(c, byte_off);
  return LLVMBuildInBoundsGEP2(c->B, c->i8, ws, &off, 1, name);
}

static LLVMValueRef fa_ld(rctx *c, LLVMValueRef base, LLVMValueRef idx, const char *name) {
  LLVMValueRef v = LLVMBuildLoad2(c->B, c->f32, rl_fptr(c, base, idx, "fa.p"), name);
  LLVMSetAlignment(v, 4);
  return v;
}

static void fa_st(rctx *c, LLVMValueRef base, LLVMValueRef idx, LLVMValueRef v) {
  LLVMSetAlignment(LLVMBuildStore(c->B, v, rl_fptr(c, base, idx, "fa.p")), 4);
}

static LLVMValueRef fa_splat(rctx *c, LLVMValueRef x) {
  LLVMValueRef ins =
      LLVMBuildInsertElement(c->B, LLVMGetPoison(c->vty), x, LLVMConstInt(c->i32, 0, 0), "");
  return LLVMBuildShuffleVector(c->B, ins, LLVMGetPoison(c->vty),
                                LLVMConstNull(LLVMVectorType(c->i32, (unsigned)c->W)), "splat");
}

/* The batch vars of a role stage (the lowering's rule, attn_fwd_nbs in attention.c):
 * its row var follows them. Stages other than the first may have unit batch
 * axes of their own when the batch is one item. */
static int fa_stage_nb(const cm_kstage *s, bool stat) {
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) return s->n_dom - 1;
  return s->n_dom - 2;
}

enum { FA_NONE = -1, FA_COL = -2, FA_RED = -3 };

/* Stage s at query row `row` and, for cv FA_COL (the var after the row) or
 * FA_RED (the reduction var), col: batch vars from bv (all 0 when the stage's
 * batch axes are not the span's), every other var 0; memo cleared, loads of
 * bufs[i] take vals[i]. Returns the stage's row var. */
static int fa_point(rctx *c, const fa_plan *p, const cm_kstage *s, const LLVMValueRef *bv,
                    LLVMValueRef row, int cv, LLVMValueRef col, const int *bufs,
                    const LLVMValueRef *vals, int n) {
  c->s = s;
  c->stage = (int)(s - c->k->stages);
  int nbs = fa_stage_nb(s, s == p->sM || s == p->sL);
  for (int v = 0; v < CM_KMAX_VARS; v++)
    c->vars[v] = v < s->n_dom + s->n_red ? rl_ci64(c, 0) : NULL;
  if (nbs == p->nb)
    for (int v = 0; v < p->nb; v++) c->vars[v] = bv[v];
  if (row) c->vars[nbs] = row;
  if (cv == FA_COL) c->vars[nbs + 1] = col;
  if (cv == FA_RED) c->vars[s->n_dom] = col;
  rl_reset_memo(c);
  for (int e = 0; e < s->n_exprs; e++)
    for (int i = 0; i < n; i++)
      if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == bufs[i]) c->memo[e] = vals[i];
  return nbs;
}

/* Store j of the current stage with value v (its index evaluated at the current point). */
static void fa_store(rctx *c, int j, LLVMValueRef v) {
  const cm_kstore *x = &c->s->stores[j];
  LLVMValueRef idx = rl_convert(c, rl_emit(c, x->index), c->s->exprs[x->index].dtype, CM_I64);
  if (!c->failed) rl_store_buf(c, x->buf, idx, v, c->s->exprs[x->value].dtype, false);
}

/* C (ldc floats a row) = [alpha[row] * C +] packed A panels [0, mpan) x packed
 * B panels [0, npan) over k < kend (panel strides kstr). */
static void fa_microkernel(rctx *c, int64_t mr, int64_t nr, LLVMValueRef Ap, LLVMValueRef Bp,
                           LLVMValueRef Ct, LLVMValueRef mpan, LLVMValueRef npan, int64_t kstr,
                           LLVMValueRef kend, int64_t ldc, LLVMValueRef alpha, bool accum) {
  LLVMBuilderRef B = c->B;
  int64_t W = c->W, nv = nr / W;
  loop Jr = rl_loop_begin(c, "fa.jr", rl_ci64(c, 0));
  loop Ir = rl_loop_begin(c, "fa.ir", rl_ci64(c, 0));
  LLVMValueRef apan = rl_fptr(c, Ap, LLVMBuildMul(B, Ir.iv, rl_ci64(c, kstr * mr), ""), "apanel");
  LLVMValueRef bpan = rl_fptr(c, Bp, LLVMBuildMul(B, Jr.iv, rl_ci64(c, kstr * nr), ""), "bpanel");
  LLVMValueRef cbase = LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr * ldc), ""),
                                    LLVMBuildMul(B, Jr.iv, rl_ci64(c, nr), ""), "cbase");
  LLVMValueRef init[64], nacc[64];
  for (int64_t r = 0; r < mr; r++) {
    LLVMValueRef sa = NULL;
    if (alpha)
      sa = fa_splat(
          c, fa_ld(c, alpha,
                   LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr), ""), rl_ci64(c, r), ""),
                   "alpha"));
    for (int64_t v = 0; v < nv; v++) {
      if (!alpha && !accum) {
        init[r * nv + v] = LLVMConstNull(c->vty);
        continue;
      }
      LLVMValueRef off = LLVMBuildAdd(B, cbase, rl_ci64(c, r * ldc + v * W), "");
      LLVMValueRef old = LLVMBuildLoad2(B, c->vty, rl_fptr(c, Ct, off, "cp"), "cold");
      LLVMSetAlignment(old, 4);
      init[r * nv + v] = alpha ? LLVMBuildFMul(B, sa, old, "cscaled") : old;
    }
  }
  rl_emit_fma_kloop(c, apan, bpan, mr, nv, nr, kend, "fa.kk", init, nacc);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, rl_ci64(c, r * ldc + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, nacc[r * nv + v], rl_fptr(c, Ct, off, "cp"));
      LLVMSetAlignment(st, 4);
    }
  rl_loop_end(c, &Ir, mpan, "fa.ir.exit");
  rl_loop_end(c, &Jr, npan, "fa.jr.exit");
}

/* The S tile of query rows [i0, i0 + mrows) x keys [j0, j0 + bcur) into St
 * (the S stage's store values; also stored to its buffer when kept). */
static void fa_scores(rctx *c, const fa_plan *p, const LLVMValueRef *bv, LLVMValueRef i0,
                      LLVMValueRef mrows, LLVMValueRef mpan, LLVMValueRef j0, LLVMValueRef bcur,
                      LLVMValueRef Qp, LLVMValueRef Kp, LLVMValueRef St, bool keep_s) {
  LLVMBuilderRef B = c->B;
  fa_point(c, p, p->sS, bv, NULL, FA_NONE, NULL, NULL, NULL, 0);
  LLVMValueRef npan = LLVMBuildSDiv(B, LLVMBuildAdd(B, bcur, rl_ci64(c, p->nr - 1), ""),
                                    rl_ci64(c, p->nr), "fa.kpan");
  rl_emit_pack(c, "fa.packK", p->sS->gemm_b, p->nb + 1, j0, p->keys, npan, p->nr, p->d,
               rl_ci64(c, 0), rl_ci64(c, p->d), Kp);
  fa_microkernel(c, p->mr, p->nr, Qp, Kp, St, mpan, npan, p->d, rl_ci64(c, p->d), p->ldc, NULL,
                 false);
  loop Li = rl_loop_begin(c, "fa.s.i", rl_ci64(c, 0));
  loop Lj = rl_loop_begin(c, "fa.s.j", rl_ci64(c, 0));
  LLVMValueRef off = LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, rl_ci64(c, p->ldc), ""), Lj.iv, "");
  fa_point(c, p, p->sS, bv, LLVMBuildAdd(B, i0, Li.iv, "i"), FA_COL,
           LLVMBuildAdd(B, j0, Lj.iv, "j"), NULL, NULL, 0);
  c->acc = fa_ld(c, St, off, "c");
  LLVMValueRef v = rl_emit(c, p->sS->stores[0].value);
  if (keep_s) fa_store(c, 0, v);
  fa_st(c, St, off, rl_convert(c, v, p->sS->exprs[p->sS->stores[0].value].dtype, CM_F32));
  c->acc = NULL;
  rl_loop_end(c, &Lj, bcur, "fa.s.j.exit");
  rl_loop_end(c, &Li, mrows, "fa.s.i.exit");
}

/* The workspace regions of a streaming forward span (cm_kattn_stream_workspace). */
typedef struct fa_ws {
  LLVMValueRef Q, KV, S, E, O, m, l, alpha;
} fa_ws;

/* Pass 1 for key block [j0, j0 + bcur) of query block i0 (mrows rows): per row
 * the block's max of f(S), the new running max and the rescale factor alpha,
 * E at the new max (packed as the A operand of E V) and the running sum. */
static void fa_block_softmax(rctx *c, const fa_plan *p, const fa_ws *w, const LLVMValueRef *bv,
                             LLVMValueRef i0, LLVMValueRef mrows, LLVMValueRef j0,
                             LLVMValueRef bcur) {
  const cm_kattn *a = p->a;
  LLVMBuilderRef B = c->B;
  LLVMValueRef St = w->S, Ep = w->E, Mv = w->m, Lv = w->l, Av = w->alpha;
  LLVMValueRef zero = LLVMConstReal(c->f32, 0), ninf = LLVMConstReal(c->f32, -INFINITY);
  {
    loop Li = rl_loop_begin(c, "fa.r", rl_ci64(c, 0));
    LLVMValueRef row = LLVMBuildAdd(B, i0, Li.iv, "i");
    LLVMValueRef sbase = LLVMBuildMul(B, Li.iv, rl_ci64(c, p->ldc), "");
    /* row max of f(S) over the block */
    LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
    loop Lj = rl_loop_begin(c, "fa.max", rl_ci64(c, 0));
    LLVMValueRef mx = LLVMBuildPhi(B, c->f32, "mx");
    LLVMAddIncoming(mx, &ninf, &pre, 1);
    LLVMValueRef sv = fa_ld(c, St, LLVMBuildAdd(B, sbase, Lj.iv, ""), "s");
    fa_point(c, p, p->sM, bv, row, FA_RED, LLVMBuildAdd(B, j0, Lj.iv, "j"), &a->buf_s, &sv, 1);
    LLVMValueRef bval =
        rl_convert(c, rl_emit(c, p->sM->body), p->sM->exprs[p->sM->body].dtype, CM_F32);
    LLVMValueRef args[2] = {mx, bval};
    LLVMValueRef nmx = rl_intrin(c, "llvm.maximum", &c->f32, 1, args, 2, "max");
    LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
    LLVMAddIncoming(mx, &nmx, &latch, 1);
    rl_loop_end(c, &Lj, bcur, "fa.max.exit");
    LLVMValueRef m_old = fa_ld(c, Mv, Li.iv, "m.old");
    LLVMValueRef a2[2] = {m_old, nmx};
    LLVMValueRef m_new = rl_intrin(c, "llvm.maximum", &c->f32, 1, a2, 2, "m.new");
    LLVMValueRef first = LLVMBuildFCmp(B, LLVMRealOEQ, m_old, ninf, "fa.first");
    LLVMValueRef alpha =
        LLVMBuildSelect(B, first, zero, rl_vexp(c, LLVMBuildFSub(B, m_old, m_new, "")), "alpha");
    fa_st(c, Mv, Li.iv, m_new);
    fa_st(c, Av, Li.iv, alpha);
    /* E at m_new, packed as the A operand of E V; its row sum */
    LLVMValueRef ebase =
        LLVMBuildAdd(B,
                     LLVMBuildMul(B, LLVMBuildSDiv(B, Li.iv, rl_ci64(c, p->mr), ""),
                                  rl_ci64(c, p->bc * p->mr), ""),
                     LLVMBuildSRem(B, Li.iv, rl_ci64(c, p->mr), ""), "ebase");
    pre = LLVMGetInsertBlock(B);
    loop Le = rl_loop_begin(c, "fa.exp", rl_ci64(c, 0));
    LLVMValueRef rs = LLVMBuildPhi(B, c->f32, "rs");
    LLVMAddIncoming(rs, &zero, &pre, 1);
    LLVMValueRef sv2 = fa_ld(c, St, LLVMBuildAdd(B, sbase, Le.iv, ""), "s");
    int eb2[2] = {a->buf_s, a->buf_m};
    LLVMValueRef ev2[2] = {sv2, m_new};
    fa_point(c, p, p->sE, bv, row, FA_COL, LLVMBuildAdd(B, j0, Le.iv, "j"), eb2, ev2, 2);
    int ve = p->sE->stores[0].value;
    LLVMValueRef ev = rl_convert(c, rl_emit(c, ve), p->sE->exprs[ve].dtype, CM_F32);
    LLVMValueRef nrs = LLVMBuildFAdd(B, rs, ev, "rs.next");
    rl_set_fast(nrs);
    /* in place (contiguous: the loop vectorizes), packed below */
    fa_st(c, St, LLVMBuildAdd(B, sbase, Le.iv, ""), ev);
    latch = LLVMGetInsertBlock(B);
    LLVMAddIncoming(rs, &nrs, &latch, 1);
    rl_loop_end(c, &Le, bcur, "fa.exp.exit");
    loop Lp = rl_loop_begin(c, "fa.packE", rl_ci64(c, 0));
    fa_st(c, Ep, LLVMBuildAdd(B, ebase, LLVMBuildMul(B, Lp.iv, rl_ci64(c, p->mr), ""), ""),
          fa_ld(c, St, LLVMBuildAdd(B, sbase, Lp.iv, ""), "e"));
    rl_loop_end(c, &Lp, bcur, "fa.packE.exit");
    LLVMValueRef l_old = fa_ld(c, Lv, Li.iv, "l.old");
    fa_st(c, Lv, Li.iv, LLVMBuildFAdd(B, LLVMBuildFMul(B, alpha, l_old, ""), nrs, "l.new"));
    rl_loop_end(c, &Li, mrows, "fa.r.exit");
  }
}

/* After the key blocks of query block i0: O / l through the O stage's
 * epilogue, the row statistics the graph keeps, and pass 2 (S, E, P from the
 * final m and l) when the graph keeps them. */
static void fa_block_outputs(rctx *c, const fa_plan *p, const fa_ws *w, const LLVMValueRef *bv,
                             LLVMValueRef i0, LLVMValueRef mrows, LLVMValueRef mpan) {
  const cm_kattn *a = p->a;
  LLVMBuilderRef B = c->B;
  LLVMValueRef Qp = w->Q, KVp = w->KV, St = w->S, Oa = w->O, Mv = w->m, Lv = w->l;
  /* O / l through the O stage's epilogue */
  {
    loop Li = rl_loop_begin(c, "fa.o.i", rl_ci64(c, 0));
    loop Lc = rl_loop_begin(c, "fa.o.c", rl_ci64(c, 0));
    fa_point(c, p, p->sO, bv, LLVMBuildAdd(B, i0, Li.iv, "i"), FA_COL, Lc.iv, NULL, NULL, 0);
    LLVMValueRef o = fa_ld(
        c, Oa, LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, rl_ci64(c, p->ldo), ""), Lc.iv, ""), "o");
    c->acc = LLVMBuildFDiv(B, o, fa_ld(c, Lv, Li.iv, "l"), "o.l");
    rl_emit_stores(c);
    c->acc = NULL;
    rl_loop_end(c, &Lc, rl_ci64(c, p->dv), "fa.o.c.exit");
    rl_loop_end(c, &Li, mrows, "fa.o.i.exit");
  }
  /* the row statistics the graph keeps */
  for (int r = 0; r < 2; r++) {
    if (!(a->keep & (r ? CM_KATTN_KEEP_L : CM_KATTN_KEEP_M))) continue;
    const cm_kstage *s = r ? p->sL : p->sM;
    loop Li = rl_loop_begin(c, r ? "fa.keep.l" : "fa.keep.m", rl_ci64(c, 0));
    fa_point(c, p, s, bv, LLVMBuildAdd(B, i0, Li.iv, "i"), FA_NONE, NULL, NULL, NULL, 0);
    c->acc = fa_ld(c, r ? Lv : Mv, Li.iv, "stat");
    rl_emit_stores(c);
    c->acc = NULL;
    rl_loop_end(c, &Li, mrows, r ? "fa.keep.l.exit" : "fa.keep.m.exit");
  }
  /* pass 2: S, E, P from the final m and l, recomputing S per key block */
  if (a->keep & (CM_KATTN_KEEP_S | CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
    loop K2 = rl_loop_begin(c, "fa.kblk2", rl_ci64(c, 0));
    LLVMValueRef j2 = LLVMBuildMul(B, K2.iv, rl_ci64(c, p->bc), "fa.j0");
    LLVMValueRef bc2 =
        rl_smin(c, LLVMBuildSub(B, rl_ci64(c, p->keys), j2, ""), rl_ci64(c, p->bc), "fa.bc");
    fa_scores(c, p, bv, i0, mrows, mpan, j2, bc2, Qp, KVp, St, a->keep & CM_KATTN_KEEP_S);
    if (a->keep & (CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
      loop Li = rl_loop_begin(c, "fa.k2.i", rl_ci64(c, 0));
      LLVMValueRef row = LLVMBuildAdd(B, i0, Li.iv, "i");
      LLVMValueRef mfin = fa_ld(c, Mv, Li.iv, "m"), lfin = fa_ld(c, Lv, Li.iv, "l");
      loop Lj = rl_loop_begin(c, "fa.k2.j", rl_ci64(c, 0));
      LLVMValueRef col = LLVMBuildAdd(B, j2, Lj.iv, "j");
      LLVMValueRef sv = fa_ld(
          c, St, LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, rl_ci64(c, p->ldc), ""), Lj.iv, ""), "s");
      int eb2[2] = {a->buf_s, a->buf_m};
      LLVMValueRef ev2[2] = {sv, mfin};
      fa_point(c, p, p->sE, bv, row, FA_COL, col, eb2, ev2, 2);
      int ve = p->sE->stores[0].value;
      LLVMValueRef ev = rl_emit(c, ve);
      if (a->keep & CM_KATTN_KEEP_E) fa_store(c, 0, ev);
      ev = rl_convert(c, ev, p->sE->exprs[ve].dtype, CM_F32);
      if (p->sP && (a->keep & CM_KATTN_KEEP_P)) {
        int pb2[2] = {a->buf_e, a->buf_l};
        LLVMValueRef pv2[2] = {ev, lfin};
        fa_point(c, p, p->sP, bv, row, FA_COL, col, pb2, pv2, 2);
        fa_store(c, 0, rl_emit(c, p->sP->stores[0].value));
      }
      rl_loop_end(c, &Lj, bc2, "fa.k2.j.exit");
      rl_loop_end(c, &Li, mrows, "fa.k2.i.exit");
    }
    rl_loop_end(c, &K2, rl_ci64(c, p->nkb), "fa.kblk2.exit");
  }
}

static void render_attention_stream(rctx *c, const char *fname, const fa_plan *p) {
  const cm_kattn *a = p->a;
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  LLVMValueRef *memo = rl_span_memo(c, p->first, a->span), *saved_memo = c->memo;
  if (!memo) {
    rl_end_function(c, done);
    return;
  }
  c->memo = memo;
  LLVMValueRef Qp = fa_f32p(c, ws, p->off[0], "fa.Q"), KVp = fa_f32p(c, ws, p->off[1], "fa.KV");
  LLVMValueRef St = fa_f32p(c, ws, p->off[2], "fa.S"), Ep = fa_f32p(c, ws, p->off[3], "fa.E");
  LLVMValueRef Oa = fa_f32p(c, ws, p->off[4], "fa.O"), Mv = fa_f32p(c, ws, p->off[5], "fa.m");
  LLVMValueRef Lv = fa_f32p(c, ws, p->off[6], "fa.l"), Av = fa_f32p(c, ws, p->off[7], "fa.alpha");
  fa_ws w = {Qp, KVp, St, Ep, Oa, Mv, Lv, Av};
  LLVMValueRef zero = LLVMConstReal(c->f32, 0), ninf = LLVMConstReal(c->f32, -INFINITY);
  int64_t npv = p->ldo / p->nr;
  /* rows of packed E past the last block's rows feed only discarded O rows:
     keep them finite */
  loop Z = rl_loop_begin(c, "fa.zero", rl_ci64(c, 0));
  fa_st(c, Ep, Z.iv, zero);
  rl_loop_end(c, &Z, rl_ci64(c, p->brp * p->bc), "fa.zero.exit");
  loop Z2 = rl_loop_begin(c, "fa.zero2", rl_ci64(c, 0));
  fa_st(c, Av, Z2.iv, zero);
  rl_loop_end(c, &Z2, rl_ci64(c, p->brp), "fa.zero2.exit");

  loop Wl = rl_loop_begin(c, "fa.w", begin);
  LLVMValueRef bv[CM_KMAX_VARS], rest = Wl.iv;
  for (int v = p->nb - 1; v >= 0; v--) {
    if (v == 0) {
      bv[v] = rest;
    } else {
      bv[v] = LLVMBuildSRem(B, rest, rl_ci64(c, p->sS->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, rl_ci64(c, p->sS->dom[v]), "");
    }
  }
  loop Qb = rl_loop_begin(c, "fa.qblk", rl_ci64(c, 0));
  LLVMValueRef i0 = LLVMBuildMul(B, Qb.iv, rl_ci64(c, p->br), "fa.i0");
  LLVMValueRef mrows =
      rl_smin(c, LLVMBuildSub(B, rl_ci64(c, p->rows), i0, ""), rl_ci64(c, p->br), "fa.m");
  LLVMValueRef mpan = LLVMBuildSDiv(B, LLVMBuildAdd(B, mrows, rl_ci64(c, p->mr - 1), ""),
                                    rl_ci64(c, p->mr), "fa.mpan");
  fa_point(c, p, p->sS, bv, NULL, FA_NONE, NULL, NULL, NULL, 0);
  rl_emit_pack(c, "fa.packQ", p->sS->gemm_a, p->nb, i0, p->rows, mpan, p->mr, p->d, rl_ci64(c, 0),
               rl_ci64(c, p->d), Qp);
  loop R0 = rl_loop_begin(c, "fa.init", rl_ci64(c, 0));
  fa_st(c, Mv, R0.iv, ninf);
  fa_st(c, Lv, R0.iv, zero);
  rl_loop_end(c, &R0, rl_ci64(c, p->brp), "fa.init.exit");
  loop O0 = rl_loop_begin(c, "fa.init.o", rl_ci64(c, 0));
  fa_st(c, Oa, O0.iv, zero);
  rl_loop_end(c, &O0, rl_ci64(c, p->brp * p->ldo), "fa.init.o.exit");

  /* pass 1: running max, sum and O over the key blocks */
  loop Kb = rl_loop_begin(c, "fa.kblk", rl_ci64(c, 0));
  LLVMValueRef j0 = LLVMBuildMul(B, Kb.iv, rl_ci64(c, p->bc), "fa.j0");
  LLVMValueRef bcur =
      rl_smin(c, LLVMBuildSub(B, rl_ci64(c, p->keys), j0, ""), rl_ci64(c, p->bc), "fa.bc");
  fa_scores(c, p, bv, i0, mrows, mpan, j0, bcur, Qp, KVp, St, false);
  fa_block_softmax(c, p, &w, bv, i0, mrows, j0, bcur);
  int onb = fa_point(c, p, p->sO, bv, NULL, FA_NONE, NULL, NULL, NULL, 0);
  rl_emit_pack(c, "fa.packV", p->sO->gemm_b, onb + 1, rl_ci64(c, 0), p->dv, rl_ci64(c, npv), p->nr,
               p->bc, j0, bcur, KVp);
  fa_microkernel(c, p->mr, p->nr, Ep, KVp, Oa, mpan, rl_ci64(c, npv), p->bc, bcur, p->ldo, Av,
                 false);
  rl_loop_end(c, &Kb, rl_ci64(c, p->nkb), "fa.kblk.exit");

  fa_block_outputs(c, p, &w, bv, i0, mrows, mpan);
  c->s = p->sS;
  c->stage = p->first;
  rl_loop_end(c, &Qb, rl_ci64(c, p->nblk), "fa.qblk.exit");
  rl_loop_end(c, &Wl, end, "fa.w.exit");
  rl_end_function(c, done);
  c->memo = saved_memo;
  free(memo);
}

/* ---- attention backward span, streaming over key blocks ------------------
 *
 * A backward span the lowering marked (cm_kattn.stream, roles in attn.role):
 * per work item (batch item, all query rows), the first stage's A operand
 * (dO) packed once, and the B operand of every GEMM over key rows (Q for dK,
 * dO for dV) packed once. Pass 1 over the key blocks computes the tiles the
 * row reductions need and accumulates the reductions (rowsum(dP o P));
 * pass 2 recomputes every tile for the block (dP_j, dS_j), accumulates the
 * GEMMs over query rows (dQ += dS_j K_j) and completes the GEMMs over key rows
 * for the block (dK_j = dS_j^T Q, dV_j = P_j^T dO) through their epilogues;
 * the accumulated GEMMs' epilogues run at the end. Local tiles hold
 * rows x bc, so the workspace is O(rows (bc + d)). Loads of local buffers
 * are not evaluated: their slots take the tile's values. */

typedef struct fb_plan {
  int first, span, nb, mr, nr;
  int64_t rows, keys, bc, nkb, d, rp, ldt;
  int64_t fixed[4], local_off[CM_KATTN_MAX_LOCAL], stage_off[CM_KATTN_MAX_SPAN];
  bool dep_stat[CM_KATTN_MAX_LOCAL];
  const cm_kattn *a;
} fb_plan;

static int fb_local_of(const cm_kattn *a, int b) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == b) return i;
  return -1;
}

static bool fb_plan_of(rctx *c, int first, fb_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_err e;
  if (s0->tmpl != CM_KT_ATTENTION_BWD || !a->stream || cm_kernel_verify(k, &e) != CM_OK ||
      cm_kattn_stream_check(k, first, &e) != CM_OK)
    return false;
  memset(p, 0, sizeof *p);
  p->first = first, p->span = a->span, p->nb = a->nb, p->a = a;
  p->mr = s0->tiles.mr, p->nr = s0->tiles.nr;
  int W = c->W;
  if (p->mr < 1 || p->nr < W || p->nr % W || p->nr / W > 8 || p->mr * (p->nr / W) > 32)
    return false;
  p->rows = a->rows, p->keys = s0->dom[p->nb + 1], p->bc = a->bc, p->d = s0->red[0];
  p->nkb = (p->keys + p->bc - 1) / p->bc;
  p->rp = (p->rows + p->mr - 1) / p->mr * p->mr;
  p->ldt = (p->bc + p->nr - 1) / p->nr * p->nr;
  /* tiles that depend on a row statistic (directly or through a tile) wait for pass 2 */
  for (int r = 0; r < p->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    if (a->role[r] != CM_KATTN_ROLE_TILE || s->n_stores != 1) continue;
    int li = fb_local_of(a, s->stores[0].buf);
    if (li < 0) return false;
    for (int x = 0; x < s->n_exprs; x++) {
      if (s->exprs[x].kind != CM_KX_LOAD) continue;
      int lj = fb_local_of(a, s->exprs[x].buf);
      if (lj >= 0 && (a->local_row[lj] == 1 || p->dep_stat[lj])) p->dep_stat[li] = true;
    }
  }
  /* the workspace layout: the plan's (cm_kattn_layout; its total is ws_bytes) */
  memcpy(p->fixed, a->bwd_fixed, sizeof p->fixed);
  memcpy(p->local_off, a->bwd_local_off, sizeof p->local_off);
  memcpy(p->stage_off, a->stage_off, sizeof p->stage_off);
  return a->ws_bytes > 0;
}

/* Stage s at query row `row` (var nbs) and key or column var (nbs + 1) col and
 * reduction var red; batch vars from bv when the stage's batch axes are the
 * span's; memo cleared; loads of local tiles take tile[ii * ldt + jj], of row
 * statistics stat[ii]. Returns nbs. */
static int fb_point(rctx *c, const fb_plan *p, const cm_kstage *s, bool stat,
                    const LLVMValueRef *bv, LLVMValueRef row, LLVMValueRef col, LLVMValueRef red,
                    LLVMValueRef *lbase, LLVMValueRef ii, LLVMValueRef jj) {
  c->s = s;
  c->stage = (int)(s - c->k->stages);
  int nbs = fa_stage_nb(s, stat);
  for (int v = 0; v < CM_KMAX_VARS; v++)
    c->vars[v] = v < s->n_dom + s->n_red ? rl_ci64(c, 0) : NULL;
  if (nbs == p->nb)
    for (int v = 0; v < p->nb; v++) c->vars[v] = bv[v];
  if (row) c->vars[nbs] = row;
  if (col && nbs + 1 < s->n_dom) c->vars[nbs + 1] = col;
  if (red && s->n_red > 0) c->vars[s->n_dom] = red;
  rl_reset_memo(c);
  if (!lbase) return nbs;
  const cm_kattn *a = p->a;
  LLVMValueRef tix = NULL;
  for (int e = 0; e < s->n_exprs; e++) {
    if (s->exprs[e].kind != CM_KX_LOAD) continue;
    int li = fb_local_of(a, s->exprs[e].buf);
    if (li < 0) continue;
    /* tiles are kept as f32: a bf16 or f16 tile's value narrows back exactly */
    if (a->local_row[li] == 1) {
      c->memo[e] = rl_convert(c, fa_ld(c, lbase[li], ii, "stat"), CM_F32, s->exprs[e].dtype);
    } else {
      if (!tix) tix = LLVMBuildAdd(c->B, LLVMBuildMul(c->B, ii, rl_ci64(c, p->ldt), ""), jj, "tix");
      c->memo[e] = rl_convert(c, fa_ld(c, lbase[li], tix, "tile"), CM_F32, s->exprs[e].dtype);
    }
  }
  return nbs;
}

/* Whether role stage r is a GEMM tile (the first stage, or a later GEMM tile: S', dP). */
static bool fb_is_gemm_tile(const fb_plan *p, int r) {
  return r == 0 || p->a->role[r] == CM_KATTN_ROLE_GEMM_TILE;
}

/* Tile stage r for the key block [j0, j0 + bcur): every query row. A GEMM tile multiplies its
 * A packed once per batch item (A0 for the first stage, its stage region for a later one) by
 * its B block. */
static void fb_tile(rctx *c, const fb_plan *p, int r, const LLVMValueRef *bv, LLVMValueRef *lbase,
                    LLVMValueRef A0, LLVMValueRef Bp, LLVMValueRef Ct, LLVMValueRef j0,
                    LLVMValueRef bcur) {
  LLVMBuilderRef B = c->B;
  const cm_kstage *s = &c->k->stages[p->first + r];
  int li = fb_local_of(p->a, s->stores[0].buf);
  int val = s->stores[0].value;
  bool gemm = fb_is_gemm_tile(p, r);
  if (gemm) {
    int64_t K = s->red[0];
    fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
    LLVMValueRef npan = LLVMBuildSDiv(B, LLVMBuildAdd(B, bcur, rl_ci64(c, p->nr - 1), ""),
                                      rl_ci64(c, p->nr), "fb.kpan");
    rl_emit_pack(c, "fb.packB0", s->gemm_b, p->nb + 1, j0, p->keys, npan, p->nr, K, rl_ci64(c, 0),
                 rl_ci64(c, K), Bp);
    fa_microkernel(c, p->mr, p->nr, A0, Bp, Ct, rl_ci64(c, p->rp / p->mr), npan, K, rl_ci64(c, K),
                   p->ldt, NULL, false);
  }
  loop Li = rl_loop_begin(c, "fb.t.i", rl_ci64(c, 0));
  loop Lj = rl_loop_begin(c, "fb.t.j", rl_ci64(c, 0));
  LLVMValueRef row = Li.iv, col = LLVMBuildAdd(B, j0, Lj.iv, "j");
  LLVMValueRef tix = LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, rl_ci64(c, p->ldt), ""), Lj.iv, "");
  if (gemm) {
    fb_point(c, p, s, false, bv, row, col, NULL, NULL, NULL, NULL);
    c->acc = fa_ld(c, Ct, tix, "c");
  } else {
    fb_point(c, p, s, false, bv, row, col, NULL, lbase, Li.iv, Lj.iv);
  }
  /* the store's rounding to the tile's dtype, kept as f32 */
  cm_dtype td = c->k->buffers[s->stores[0].buf].dtype;
  LLVMValueRef v = rl_convert(c, rl_emit(c, val), s->exprs[val].dtype, td);
  v = rl_convert(c, v, td, CM_F32);
  c->acc = NULL;
  fa_st(c, lbase[li], tix, v);
  rl_loop_end(c, &Lj, bcur, "fb.t.j.exit");
  rl_loop_end(c, &Li, rl_ci64(c, p->rows), "fb.t.i.exit");
}

/* Whether the cone of expression e of stage s loads a local buffer of a. */
static bool fb_cone_local(const cm_kattn *a, const cm_kstage *s, int e) {
  if (e < 0 || e >= s->n_exprs) return false;
  /* out of memory: the per-point evaluation, which is right for any operand */
  bool *in = calloc((size_t)e + 1, sizeof *in), hit = in == NULL;
  if (in) in[e] = true;
  for (int i = e; in && i >= 0 && !hit; i--) {
    if (!in[i]) continue;
    const cm_kexpr *x = &s->exprs[i];
    hit = x->kind == CM_KX_LOAD && fb_local_of(a, x->buf) >= 0;
    if (x->kind == CM_KX_CONST || x->kind == CM_KX_VAR || x->kind == CM_KX_ACC) continue;
    int ops[3] = {x->a, x->b, x->c};
    for (int j = 0; j < 3; j++)
      if (ops[j] >= 0 && ops[j] < i) in[ops[j]] = true;
  }
  free(in);
  return hit;
}

/* The A operand (gemm_a) of a row or key GEMM stage s at domain var `dv` (its row var: the query
 * row of a row GEMM, the key of a key GEMM) and reduction var `rv`, as f32, its local tiles read
 * at tile row ii and key jj (P' = E' / z, cast(P', bf16), dS). */
static LLVMValueRef fb_operand_a(rctx *c, const fb_plan *p, const cm_kstage *s,
                                 const LLVMValueRef *bv, LLVMValueRef dv, LLVMValueRef rv,
                                 LLVMValueRef *lbase, LLVMValueRef ii, LLVMValueRef jj) {
  fb_point(c, p, s, false, bv, dv, NULL, rv, lbase, ii, jj);
  return rl_convert(c, rl_emit(c, s->gemm_a), s->exprs[s->gemm_a].dtype, CM_F32);
}

/* The workspace regions of a streaming backward span
 * (cm_kattn_bwd_stream_workspace): the first stage's packed A, packed A and B
 * of the GEMMs, the C tile, each local's and each stage's base. */
typedef struct fb_ws {
  LLVMValueRef A0, A, B, C;
  LLVMValueRef *lbase, *sbase;
} fb_ws;

/* Stage r (a row reduction over the key var) for key block [j0, j0 + bcur). */
static void fb_rowred(rctx *c, const fb_plan *p, int r, const LLVMValueRef *bv, const fb_ws *w,
                      LLVMValueRef j0, LLVMValueRef bcur) {
  const cm_kattn *a = p->a;
  const cm_kstage *s = &c->k->stages[p->first + r];
  LLVMBuilderRef B = c->B;
  LLVMValueRef *lbase = w->lbase;
  int li = fb_local_of(a, s->stores[0].buf);
  loop Li = rl_loop_begin(c, "fb.r.i", rl_ci64(c, 0));
  c->s = s;
  LLVMValueRef acc0 = rl_convert(c, fa_ld(c, lbase[li], Li.iv, "acc0"), CM_F32, s->acc_dtype);
  LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
  loop Lj = rl_loop_begin(c, "fb.r.j", rl_ci64(c, 0));
  LLVMValueRef acc = LLVMBuildPhi(B, rl_val_type(c, s->acc_dtype), "acc");
  LLVMAddIncoming(acc, &acc0, &pre, 1);
  fb_point(c, p, s, true, bv, Li.iv, NULL, LLVMBuildAdd(B, j0, Lj.iv, "j"), lbase, Li.iv, Lj.iv);
  LLVMValueRef bval = rl_convert(c, rl_emit(c, s->body), s->exprs[s->body].dtype, s->acc_dtype);
  LLVMValueRef nacc = rl_reduce_step(c, acc, bval);
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  LLVMAddIncoming(acc, &nacc, &latch, 1);
  rl_loop_end(c, &Lj, bcur, "fb.r.j.exit");
  fa_st(c, lbase[li], Li.iv, rl_convert(c, nacc, s->acc_dtype, CM_F32));
  rl_loop_end(c, &Li, rl_ci64(c, p->rows), "fb.r.i.exit");
}

/* Stage r (a GEMM over rows i reducing over keys j: accumulated over the key
 * blocks into its stage buffer) for key block [j0, j0 + bcur). */
static void fb_gemm_rows(rctx *c, const fb_plan *p, int r, const LLVMValueRef *bv, const fb_ws *w,
                         LLVMValueRef j0, LLVMValueRef bcur) {
  const cm_kattn *a = p->a;
  const cm_kstage *s = &c->k->stages[p->first + r];
  LLVMBuilderRef B = c->B;
  LLVMValueRef *lbase = w->lbase, *sbase = w->sbase;
  LLVMValueRef Ap = w->A, Bp = w->B;
  int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
  int nbs = fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
  if (fb_cone_local(a, s, s->gemm_a)) {
    loop Li = rl_loop_begin(c, "fb.pa.i", rl_ci64(c, 0));
    LLVMValueRef abase =
        LLVMBuildAdd(B,
                     LLVMBuildMul(B, LLVMBuildSDiv(B, Li.iv, rl_ci64(c, p->mr), ""),
                                  rl_ci64(c, p->bc * p->mr), ""),
                     LLVMBuildSRem(B, Li.iv, rl_ci64(c, p->mr), ""), "abase");
    loop Lj = rl_loop_begin(c, "fb.pa.j", rl_ci64(c, 0));
    fa_st(c, Ap, LLVMBuildAdd(B, abase, LLVMBuildMul(B, Lj.iv, rl_ci64(c, p->mr), ""), ""),
          fb_operand_a(c, p, s, bv, Li.iv, LLVMBuildAdd(B, j0, Lj.iv, "j"), lbase, Li.iv, Lj.iv));
    rl_loop_end(c, &Lj, bcur, "fb.pa.j.exit");
    rl_loop_end(c, &Li, rl_ci64(c, p->rows), "fb.pa.i.exit");
  } else {
    rl_emit_pack(c, "fb.packAr", s->gemm_a, nbs, rl_ci64(c, 0), p->rows, rl_ci64(c, p->rp / p->mr),
                 p->mr, p->bc, j0, bcur, Ap);
  }
  fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
  rl_emit_pack(c, "fb.packBr", s->gemm_b, nbs + 1, rl_ci64(c, 0), C, rl_ci64(c, cp / p->nr), p->nr,
               p->bc, j0, bcur, Bp);
  fa_microkernel(c, p->mr, p->nr, Ap, Bp, sbase[r], rl_ci64(c, p->rp / p->mr),
                 rl_ci64(c, cp / p->nr), p->bc, bcur, cp, NULL, true);
}

/* Stage r (a GEMM over keys j reducing over rows i: complete per key block,
 * through its epilogue) for key block [j0, j0 + bcur). */
static void fb_gemm_keys(rctx *c, const fb_plan *p, int r, const LLVMValueRef *bv, const fb_ws *w,
                         LLVMValueRef j0, LLVMValueRef bcur) {
  const cm_kattn *a = p->a;
  const cm_kstage *s = &c->k->stages[p->first + r];
  LLVMBuilderRef B = c->B;
  LLVMValueRef *lbase = w->lbase, *sbase = w->sbase;
  LLVMValueRef Ap = w->A, Ct = w->C;
  int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
  int nbs = fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
  LLVMValueRef mpan = LLVMBuildSDiv(B, LLVMBuildAdd(B, bcur, rl_ci64(c, p->mr - 1), ""),
                                    rl_ci64(c, p->mr), "fb.mpan");
  if (fb_cone_local(a, s, s->gemm_a)) {
    loop Lj = rl_loop_begin(c, "fb.pk.j", rl_ci64(c, 0));
    LLVMValueRef abase =
        LLVMBuildAdd(B,
                     LLVMBuildMul(B, LLVMBuildSDiv(B, Lj.iv, rl_ci64(c, p->mr), ""),
                                  rl_ci64(c, p->rows * p->mr), ""),
                     LLVMBuildSRem(B, Lj.iv, rl_ci64(c, p->mr), ""), "abase");
    LLVMValueRef key = LLVMBuildAdd(B, j0, Lj.iv, "j");
    loop Li = rl_loop_begin(c, "fb.pk.i", rl_ci64(c, 0));
    fa_st(c, Ap, LLVMBuildAdd(B, abase, LLVMBuildMul(B, Li.iv, rl_ci64(c, p->mr), ""), ""),
          fb_operand_a(c, p, s, bv, key, Li.iv, lbase, Li.iv, Lj.iv));
    rl_loop_end(c, &Li, rl_ci64(c, p->rows), "fb.pk.i.exit");
    rl_loop_end(c, &Lj, bcur, "fb.pk.j.exit");
  } else {
    rl_emit_pack(c, "fb.packAk", s->gemm_a, nbs, j0, p->keys, mpan, p->mr, p->rows, rl_ci64(c, 0),
                 rl_ci64(c, p->rows), Ap);
  }
  fa_microkernel(c, p->mr, p->nr, Ap, sbase[r], Ct, mpan, rl_ci64(c, cp / p->nr), p->rows,
                 rl_ci64(c, p->rows), cp, NULL, false);
  loop Lj = rl_loop_begin(c, "fb.ek.j", rl_ci64(c, 0));
  loop Lc = rl_loop_begin(c, "fb.ek.c", rl_ci64(c, 0));
  fb_point(c, p, s, false, bv, LLVMBuildAdd(B, j0, Lj.iv, "j"), Lc.iv, NULL, NULL, NULL, NULL);
  c->acc =
      fa_ld(c, Ct, LLVMBuildAdd(B, LLVMBuildMul(B, Lj.iv, rl_ci64(c, cp), ""), Lc.iv, ""), "c");
  rl_emit_stores(c);
  c->acc = NULL;
  rl_loop_end(c, &Lc, rl_ci64(c, C), "fb.ek.c.exit");
  rl_loop_end(c, &Lj, bcur, "fb.ek.j.exit");
}

static void render_attention_bwd_stream(rctx *c, const char *fname, const fb_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kattn *a = p->a;
  const cm_kstage *s0 = &k->stages[p->first];
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  LLVMValueRef *memo = rl_span_memo(c, p->first, p->span), *saved_memo = c->memo;
  if (!memo) {
    rl_end_function(c, done);
    return;
  }
  c->memo = memo;
  LLVMValueRef A0 = fa_f32p(c, ws, p->fixed[0], "fb.A0"), Ap = fa_f32p(c, ws, p->fixed[1], "fb.A");
  LLVMValueRef Bp = fa_f32p(c, ws, p->fixed[2], "fb.B"), Ct = fa_f32p(c, ws, p->fixed[3], "fb.C");
  LLVMValueRef lbase[CM_KATTN_MAX_LOCAL], sbase[CM_KATTN_MAX_SPAN];
  for (int i = 0; i < a->n_local; i++) lbase[i] = fa_f32p(c, ws, p->local_off[i], "fb.local");
  for (int r = 0; r < p->span; r++)
    sbase[r] = p->stage_off[r] > 0 ? fa_f32p(c, ws, p->stage_off[r], "fb.stage") : NULL;
  fb_ws w = {A0, Ap, Bp, Ct, lbase, sbase};

  loop Wl = rl_loop_begin(c, "fb.w", begin);
  LLVMValueRef bv[CM_KMAX_VARS], rest = Wl.iv;
  for (int v = p->nb - 1; v >= 0; v--) {
    if (v == 0) {
      bv[v] = rest;
    } else {
      bv[v] = LLVMBuildSRem(B, rest, rl_ci64(c, s0->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, rl_ci64(c, s0->dom[v]), "");
    }
  }
  /* once per batch item: A of the first stage, B of the key GEMMs, zero accumulators and
     reduction starts */
  fb_point(c, p, s0, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
  rl_emit_pack(c, "fb.packA0", s0->gemm_a, p->nb, rl_ci64(c, 0), p->rows, rl_ci64(c, p->rp / p->mr),
               p->mr, p->d, rl_ci64(c, 0), rl_ci64(c, p->d), A0);
  bool two_pass = false;
  for (int r = 0; r < p->span; r++) {
    const cm_kstage *s = &k->stages[p->first + r];
    two_pass |= a->role[r] == CM_KATTN_ROLE_ROWRED;
    if (a->role[r] == CM_KATTN_ROLE_GEMM_TILE) {
      fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
      rl_emit_pack(c, "fb.packAt", s->gemm_a, p->nb, rl_ci64(c, 0), p->rows,
                   rl_ci64(c, p->rp / p->mr), p->mr, s->red[0], rl_ci64(c, 0),
                   rl_ci64(c, s->red[0]), sbase[r]);
    } else if (a->role[r] == CM_KATTN_ROLE_GEMM_KEYS) {
      int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
      int nbs = fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
      rl_emit_pack(c, "fb.packBk", s->gemm_b, nbs + 1, rl_ci64(c, 0), C, rl_ci64(c, cp / p->nr),
                   p->nr, p->rows, rl_ci64(c, 0), rl_ci64(c, p->rows), sbase[r]);
    } else if (a->role[r] == CM_KATTN_ROLE_GEMM_ROWS) {
      int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
      loop Z = rl_loop_begin(c, "fb.zero", rl_ci64(c, 0));
      fa_st(c, sbase[r], Z.iv, LLVMConstReal(c->f32, 0));
      rl_loop_end(c, &Z, rl_ci64(c, p->rp * cp), "fb.zero.exit");
    } else if (a->role[r] == CM_KATTN_ROLE_ROWRED) {
      c->s = s;
      int li = fb_local_of(a, s->stores[0].buf);
      loop Z = rl_loop_begin(c, "fb.init", rl_ci64(c, 0));
      fa_st(c, lbase[li], Z.iv, rl_convert(c, rl_reduce_init(c), s->acc_dtype, CM_F32));
      rl_loop_end(c, &Z, rl_ci64(c, p->rp), "fb.init.exit");
    }
  }
  /* without row reductions over the keys (the recomputed backward) one pass */
  for (int pass = two_pass ? 0 : 1; pass < 2 && !c->failed; pass++) {
    loop Kb = rl_loop_begin(c, pass ? "fb.kblk2" : "fb.kblk", rl_ci64(c, 0));
    LLVMValueRef j0 = LLVMBuildMul(B, Kb.iv, rl_ci64(c, p->bc), "fb.j0");
    LLVMValueRef bcur =
        rl_smin(c, LLVMBuildSub(B, rl_ci64(c, p->keys), j0, ""), rl_ci64(c, p->bc), "fb.bc");
    for (int r = 0; r < p->span && !c->failed; r++) {
      const cm_kstage *s = &k->stages[p->first + r];
      int role = a->role[r];
      if (role == CM_KATTN_ROLE_TILE || role == CM_KATTN_ROLE_GEMM_TILE) {
        int li = fb_local_of(a, s->stores[0].buf);
        if (pass == 0 && p->dep_stat[li]) continue;
        fb_tile(c, p, r, bv, lbase, r == 0 ? A0 : sbase[r], Bp, Ct, j0, bcur);
      } else if (role == CM_KATTN_ROLE_ROWRED && pass == 0) {
        fb_rowred(c, p, r, bv, &w, j0, bcur);
      } else if (role == CM_KATTN_ROLE_GEMM_ROWS && pass == 1) {
        fb_gemm_rows(c, p, r, bv, &w, j0, bcur);
      } else if (role == CM_KATTN_ROLE_GEMM_KEYS && pass == 1) {
        fb_gemm_keys(c, p, r, bv, &w, j0, bcur);
      }
    }
    rl_loop_end(c, &Kb, rl_ci64(c, p->nkb), pass ? "fb.kblk2.exit" : "fb.kblk.exit");
  }
  /* the epilogues of the GEMMs accumulated over the key blocks */
  for (int r = 0; r < p->span && !c->failed; r++) {
    const cm_kstage *s = &k->stages[p->first + r];
    if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS) continue;
    int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
    loop Li = rl_loop_begin(c, "fb.er.i", rl_ci64(c, 0));
    loop Lc = rl_loop_begin(c, "fb.er.c", rl_ci64(c, 0));
    fb_point(c, p, s, false, bv, Li.iv, Lc.iv, NULL, NULL, NULL, NULL);
    c->acc = fa_ld(c, sbase[r],
                   LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, rl_ci64(c, cp), ""), Lc.iv, ""), "c");
    rl_emit_stores(c);
    c->acc = NULL;
    rl_loop_end(c, &Lc, rl_ci64(c, C), "fb.er.c.exit");
    rl_loop_end(c, &Li, rl_ci64(c, p->rows), "fb.er.i.exit");
  }
  c->s = s0;
  c->stage = p->first;
  rl_loop_end(c, &Wl, end, "fb.w.exit");
  rl_end_function(c, done);
  c->memo = saved_memo;
  free(memo);
}

/* A stage inside a fused span: its work ran in the span's first stage. */

/* Renders the attention span whose first stage is si into function fname:
 * streaming over key blocks when the plan says so, else whole rows. Returns
 * the number of stages rendered (0: the span does not fit the templates and
 * its stages render one by one). */
int rl_render_attention_span(rctx *c, int si, const char *fname) {
  const cm_kstage *s = &c->k->stages[si];
  bool fwd = s->tmpl == CM_KT_ATTENTION_FWD, bwd = s->tmpl == CM_KT_ATTENTION_BWD;
  fb_plan bp;
  fa_plan fp;
  attn_plan ap;
  if (bwd && s->attn.stream && fb_plan_of(c, si, &bp)) {
    render_attention_bwd_stream(c, fname, &bp);
    return s->attn.span;
  }
  if (fwd && s->attn.stream && fa_plan_of(c, si, &fp)) {
    render_attention_stream(c, fname, &fp);
    return s->attn.span;
  }
  if ((fwd || bwd) && attn_plan_of(c, si, &ap)) {
    render_attention(c, fname, &ap);
    return ap.span;
  }
  return 0;
}
