/* codegen/render_llvm_gemm.c — the GEMM template's LLVM rendering: a packed,
 * register-blocked GEMM per CM_KT_GEMM stage (plan: the stage's tiles, from
 * gemm.c), and the packing and FMA k-loop the attention spans reuse. */
#include "render_llvm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- GEMM template ------------------------------------------------------ */

LLVMValueRef rl_fptr(rctx *c, LLVMValueRef base, LLVMValueRef idx, const char *name) {
  return LLVMBuildInBoundsGEP2(c->B, c->f32, base, &idx, 1, name);
}

/* The coefficient of var kv in i64 expression e when e is affine in kv (terms
 * without kv may be anything); false when kv enters otherwise. */
bool rl_lin_coef(const cm_kstage *s, int e, int kv, int64_t *coef) {
  if (e < 0 || e >= s->n_exprs) return false;
  if (!(cm_kx_vars_used(s, e) & (1u << kv))) {
    *coef = 0;
    return true;
  }
  const cm_kexpr *x = &s->exprs[e];
  if (x->dtype != CM_I64) return false;
  if (x->kind == CM_KX_VAR) {
    *coef = 1;
    return true;
  }
  if (x->kind != CM_KX_OP || x->a < 0 || x->b < 0) return false;
  int64_t ca, cb;
  double v;
  switch (x->op) {
  case CM_OP_ADD:
  case CM_OP_SUB:
    if (!rl_lin_coef(s, x->a, kv, &ca) || !rl_lin_coef(s, x->b, kv, &cb)) return false;
    return x->op == CM_OP_ADD ? !__builtin_add_overflow(ca, cb, coef)
                              : !__builtin_sub_overflow(ca, cb, coef);
  case CM_OP_MUL:
    /* constants beyond 2^53 are not exact integers: not worth the analysis */
    if (cm_kx_is_const(s, x->b, &v) && fabs(v) < 9e15 && rl_lin_coef(s, x->a, kv, &ca))
      return !__builtin_mul_overflow(ca, (int64_t)v, coef);
    if (cm_kx_is_const(s, x->a, &v) && fabs(v) < 9e15 && rl_lin_coef(s, x->b, kv, &cb))
      return !__builtin_mul_overflow(cb, (int64_t)v, coef);
    return false;
  default: return false;
  }
}

/* Whether operand e is a plain f32 load contiguous along k: then W
 * consecutive k of a row are one vector load. */
bool rl_k_contiguous(rctx *c, int e) {
  const cm_kstage *s = c->s;
  const cm_kexpr *x = &s->exprs[e];
  int64_t coef;
  return x->kind == CM_KX_LOAD && x->dtype == CM_F32 && x->buf >= 0 && x->buf < c->k->n_buffers &&
         c->k->buffers[x->buf].dtype == CM_F32 && rl_lin_coef(s, x->a, s->n_dom, &coef) &&
         coef == 1;
}

/* Whether operand e is a plain f32 or bf16 load contiguous along k, or such
 * an f32 load cast to bf16 (autocast's prologue): the pack's vector path, W
 * consecutive k of a row in one vector load (bf16 widened, the cast rounded). */
static bool k_contiguous_load(rctx *c, int e) {
  const cm_kexpr *x = &c->s->exprs[e];
  if (x->kind == CM_KX_OP && x->op == CM_OP_CAST && x->dtype == CM_BF16 && x->a >= 0 &&
      c->s->exprs[x->a].dtype == CM_F32)
    return rl_k_contiguous(c, x->a);
  if (x->kind != CM_KX_LOAD || x->dtype != CM_BF16 || x->buf < 0 || x->buf >= c->k->n_buffers ||
      c->k->buffers[x->buf].dtype != CM_BF16)
    return rl_k_contiguous(c, e);
  int64_t coef;
  return rl_lin_coef(c->s, x->a, c->s->n_dom, &coef) && coef == 1;
}

/* A vector of i32 lanes, all v. */
static LLVMValueRef splat_i32(rctx *c, uint32_t v) {
  LLVMValueRef l[32];
  for (int i = 0; i < c->W; i++) l[i] = LLVMConstInt(c->i32, v, 0);
  return LLVMConstVector(l, (unsigned)c->W);
}

/* W consecutive k of operand e (k_contiguous_load) at the current vars as
 * floats: bf16 widened (exact); an f32 cast to bf16 rounded to nearest even,
 * NaN quieted, as rl_convert rounds one value. */
static LLVMValueRef load_krow(rctx *c, int e) {
  LLVMBuilderRef B = c->B;
  const cm_kexpr *x = &c->s->exprs[e];
  bool cast = x->kind == CM_KX_OP;
  if (cast) x = &c->s->exprs[x->a];
  LLVMValueRef idx = rl_convert(c, rl_emit(c, x->a), c->s->exprs[x->a].dtype, CM_I64);
  bool bf16 = x->dtype == CM_BF16;
  LLVMTypeRef lt = bf16 ? LLVMVectorType(c->i16, (unsigned)c->W) : c->vty;
  LLVMValueRef v = LLVMBuildLoad2(B, lt, rl_buf_gep(c, x->buf, idx), "krow");
  LLVMSetAlignment(v, bf16 ? 2 : 4);
  LLVMTypeRef wt = LLVMVectorType(c->i32, (unsigned)c->W);
  if (bf16) {
    v = LLVMBuildShl(B, LLVMBuildZExt(B, v, wt, ""), splat_i32(c, 16), "");
    return LLVMBuildBitCast(B, v, c->vty, "krow.f");
  }
  if (!cast) return v;
  LLVMValueRef bits = LLVMBuildBitCast(B, v, wt, "");
  LLVMValueRef lsb =
      LLVMBuildAnd(B, LLVMBuildLShr(B, bits, splat_i32(c, 16), ""), splat_i32(c, 1), "");
  LLVMValueRef rnd = LLVMBuildAdd(B, bits, LLVMBuildAdd(B, lsb, splat_i32(c, 0x7fff), ""), "");
  LLVMValueRef quiet = LLVMBuildOr(B, bits, splat_i32(c, 0x400000), "");
  LLVMValueRef r = LLVMBuildSelect(B, LLVMBuildFCmp(B, LLVMRealUNO, v, v, ""), quiet, rnd, "");
  return LLVMBuildBitCast(B, LLVMBuildAnd(B, r, splat_i32(c, 0xffff0000u), ""), c->vty, "krow.bf");
}

/* v[0..W) rows of a W x W block, transposed in place: log2(W) rounds of the
 * perfect shuffle (zip of row i with row i + W/2). */
void rl_transpose_block(rctx *c, LLVMValueRef *v) {
  int W = c->W;
  LLVMValueRef lo[32], hi[32], n[32];
  for (int i = 0; i < W / 2; i++) {
    lo[2 * i] = LLVMConstInt(c->i32, (unsigned)i, 0);
    lo[2 * i + 1] = LLVMConstInt(c->i32, (unsigned)(i + W), 0);
    hi[2 * i] = LLVMConstInt(c->i32, (unsigned)(i + W / 2), 0);
    hi[2 * i + 1] = LLVMConstInt(c->i32, (unsigned)(i + W / 2 + W), 0);
  }
  LLVMValueRef mlo = LLVMConstVector(lo, (unsigned)W), mhi = LLVMConstVector(hi, (unsigned)W);
  for (int round = 1; round < W; round *= 2) {
    for (int i = 0; i < W / 2; i++) {
      n[2 * i] = LLVMBuildShuffleVector(c->B, v[i], v[i + W / 2], mlo, "zlo");
      n[2 * i + 1] = LLVMBuildShuffleVector(c->B, v[i], v[i + W / 2], mhi, "zhi");
    }
    for (int i = 0; i < W; i++) v[i] = n[i];
  }
}

/* Output vector t of R rows x W k (v[l]: row l's W k) laid out k-major
 * (element g = t W + q is row g % R at k g / R), correct in the lanes whose
 * row is in [lo, hi) (the others undefined): a tree of two-source shuffles. */
static LLVMValueRef pick_rows(rctx *c, LLVMValueRef *v, int R, int t, int lo, int hi) {
  int W = c->W;
  LLVMValueRef mask[32], a, b;
  int mid = hi - lo <= 2 ? lo + 1 : (lo + hi) / 2;
  bool leaves = hi - lo <= 2;
  if (leaves) {
    a = v[lo];
    b = hi - lo == 2 ? v[lo + 1] : LLVMGetPoison(c->vty);
  } else {
    a = pick_rows(c, v, R, t, lo, mid);
    b = pick_rows(c, v, R, t, mid, hi);
  }
  for (int q = 0; q < W; q++) {
    int g = t * W + q, row = g % R, kk = g / R;
    int from = leaves ? kk : q;
    if (row >= lo && row < mid)
      mask[q] = LLVMConstInt(c->i32, (unsigned)from, 0);
    else if (row >= mid && row < hi)
      mask[q] = LLVMConstInt(c->i32, (unsigned)(W + from), 0);
    else
      mask[q] = LLVMGetUndef(c->i32);
  }
  return LLVMBuildShuffleVector(c->B, a, b, LLVMConstVector(mask, (unsigned)W), "rows");
}

/* Packs panels [0, npan) of R rows (r0 + p*R + l, vars: row var rv, k var kv)
 * x k [0, kcur) of operand e: dst[p*kc*R + kk*R + l], zero for rows at or
 * beyond lim. Whole panels skip the clamp; the lane loop is unrolled so that
 * rows contiguous in memory become vector loads and every panel row one
 * contiguous store. */
void rl_emit_pack(rctx *c, const char *name, int e, int rv, LLVMValueRef r0, int64_t lim,
                  LLVMValueRef npan, int64_t R, int64_t kc, LLVMValueRef k0, LLVMValueRef kcur,
                  LLVMValueRef dst) {
  LLVMBuilderRef B = c->B;
  char nm[48];
  snprintf(nm, sizeof nm, "%s.panel", name);
  loop Lp = rl_loop_begin(c, nm, rl_ci64(c, 0));
  LLVMValueRef pr0 = LLVMBuildAdd(B, r0, LLVMBuildMul(B, Lp.iv, rl_ci64(c, R), ""), "pr0");
  LLVMValueRef pdst = rl_fptr(c, dst, LLVMBuildMul(B, Lp.iv, rl_ci64(c, kc * R), ""), "pdst");
  LLVMValueRef whole = LLVMBuildICmp(B, LLVMIntSLE, LLVMBuildAdd(B, pr0, rl_ci64(c, R), ""),
                                     rl_ci64(c, lim), "whole");
  LLVMBasicBlockRef bfast = rl_new_block(c, "pack.whole"), bslow = rl_new_block(c, "pack.edge"),
                    bjoin = rl_new_block(c, "pack.next");
  LLVMBuildCondBr(B, whole, bfast, bslow);
  bool kvec = k_contiguous_load(c, e) && (R % c->W == 0 || R < c->W);
  for (int edge = 0; edge < 2; edge++) {
    LLVMPositionBuilderAtEnd(B, edge ? bslow : bfast);
    LLVMValueRef kstart = rl_ci64(c, 0);
    if (!edge && kvec) {
      /* W k at a time: W vector loads per W rows, transposed into W panel rows */
      LLVMValueRef nch = LLVMBuildSDiv(B, kcur, rl_ci64(c, c->W), "kchunks");
      kstart = LLVMBuildMul(B, nch, rl_ci64(c, c->W), "kstart");
      LLVMBasicBlockRef bvec = rl_new_block(c, "pack.vec"),
                        bafter = rl_new_block(c, "pack.vec.done");
      LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSGT, nch, rl_ci64(c, 0), ""), bvec, bafter);
      LLVMPositionBuilderAtEnd(B, bvec);
      snprintf(nm, sizeof nm, "%s.kv", name);
      loop Lc = rl_loop_begin(c, nm, rl_ci64(c, 0));
      LLVMValueRef kkb = LLVMBuildMul(B, Lc.iv, rl_ci64(c, c->W), "kkb");
      c->vars[c->s->n_dom] = LLVMBuildAdd(B, k0, kkb, "k");
      if (R < c->W) {
        /* R rows of W k: R vector loads, shuffled into the R vectors of W panel rows */
        LLVMValueRef v[32];
        for (int l = 0; l < R; l++) {
          c->vars[rv] = LLVMBuildAdd(B, pr0, rl_ci64(c, l), "row");
          rl_reset_memo(c);
          v[l] = load_krow(c, e);
        }
        for (int t = 0; t < R; t++) {
          LLVMValueRef off =
              LLVMBuildAdd(B, LLVMBuildMul(B, kkb, rl_ci64(c, R), ""), rl_ci64(c, t * c->W), "");
          LLVMValueRef st = LLVMBuildStore(B, pick_rows(c, v, (int)R, t, 0, (int)R),
                                           rl_fptr(c, pdst, off, "dst"));
          LLVMSetAlignment(st, 4);
        }
      }
      for (int64_t g = 0; g < R / c->W; g++) {
        LLVMValueRef v[32];
        for (int l = 0; l < c->W; l++) {
          c->vars[rv] = LLVMBuildAdd(B, pr0, rl_ci64(c, g * c->W + l), "row");
          rl_reset_memo(c);
          v[l] = load_krow(c, e);
        }
        rl_transpose_block(c, v);
        for (int t = 0; t < c->W; t++) {
          LLVMValueRef off = LLVMBuildAdd(
              B, LLVMBuildMul(B, LLVMBuildAdd(B, kkb, rl_ci64(c, t), ""), rl_ci64(c, R), ""),
              rl_ci64(c, g * c->W), "");
          LLVMValueRef st = LLVMBuildStore(B, v[t], rl_fptr(c, pdst, off, "dst"));
          LLVMSetAlignment(st, 4);
        }
      }
      snprintf(nm, sizeof nm, "%s.kv.exit", name);
      rl_loop_end(c, &Lc, nch, nm);
      LLVMBuildBr(B, bafter);
      LLVMPositionBuilderAtEnd(B, bafter);
      LLVMBasicBlockRef brest = rl_new_block(c, "pack.rest");
      LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSLT, kstart, kcur, ""), brest, bjoin);
      LLVMPositionBuilderAtEnd(B, brest);
    }
    snprintf(nm, sizeof nm, "%s.k", name);
    loop Lk = rl_loop_begin(c, nm, kstart);
    c->vars[c->s->n_dom] = LLVMBuildAdd(B, k0, Lk.iv, "k");
    LLVMValueRef rowdst = rl_fptr(c, pdst, LLVMBuildMul(B, Lk.iv, rl_ci64(c, R), ""), "rowdst");
    /* every lane's value before any store: the loads may then be merged */
    LLVMValueRef vals[64];
    for (int64_t l = 0; l < R; l++) {
      LLVMValueRef row = LLVMBuildAdd(B, pr0, rl_ci64(c, l), "row");
      LLVMValueRef inb = NULL;
      if (edge) {
        inb = LLVMBuildICmp(B, LLVMIntSLT, row, rl_ci64(c, lim), "inb");
        row = rl_smin(c, row, rl_ci64(c, lim - 1), "rowc");
      }
      c->vars[rv] = row;
      rl_reset_memo(c);
      LLVMValueRef v = rl_convert(c, rl_emit(c, e), c->s->exprs[e].dtype, CM_F32);
      if (edge) v = LLVMBuildSelect(B, inb, v, LLVMConstReal(c->f32, 0), "a");
      vals[l] = v;
    }
    for (int64_t l = 0; l < R; l++) {
      LLVMValueRef st = LLVMBuildStore(B, vals[l], rl_fptr(c, rowdst, rl_ci64(c, l), "dst"));
      LLVMSetAlignment(st, 4);
    }
    snprintf(nm, sizeof nm, "%s.k.exit", name);
    LLVMBasicBlockRef klatch = LLVMGetInsertBlock(B);
    rl_loop_end(c, &Lk, kcur, nm);
    /* one k per iteration, the lanes merged into vectors (SLP): vectorizing
       across k instead gathers and scatters */
    rl_no_vectorize_loop(c, klatch);
    LLVMBuildBr(B, bjoin);
  }
  LLVMPositionBuilderAtEnd(B, bjoin);
  snprintf(nm, sizeof nm, "%s.panel.exit", name);
  rl_loop_end(c, &Lp, npan, nm);
  c->vars[c->s->n_dom] = NULL;
}

/* The micro-kernel's k loop over packed panels (A: mr values per k, B: nr =
 * nv vectors per k): mr x nv vector accumulators start at init[] and take one
 * broadcast A value times each B vector per k; out[] holds their values after
 * the loop (the loop runs at least once). */
void rl_emit_fma_kloop(rctx *c, LLVMValueRef apan, LLVMValueRef bpan, int64_t mr, int64_t nv,
                       int64_t nr, LLVMValueRef kend, const char *name, LLVMValueRef *init,
                       LLVMValueRef *nacc) {
  LLVMBuilderRef B = c->B;
  int W = c->W;
  char exit_name[48];
  snprintf(exit_name, sizeof exit_name, "%s.exit", name);
  LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
  loop Kk = rl_loop_begin(c, name, rl_ci64(c, 0));
  LLVMValueRef phis[64], bv[8];
  for (int64_t i = 0; i < mr * nv; i++) {
    phis[i] = LLVMBuildPhi(B, c->vty, "acc");
    LLVMAddIncoming(phis[i], &init[i], &pre, 1);
  }
  for (int64_t v = 0; v < nv; v++) {
    LLVMValueRef off =
        LLVMBuildAdd(B, LLVMBuildMul(B, Kk.iv, rl_ci64(c, nr), ""), rl_ci64(c, v * W), "");
    bv[v] = LLVMBuildLoad2(B, c->vty, rl_fptr(c, bpan, off, "bp"), "bvec");
    LLVMSetAlignment(bv[v], 4);
  }
  for (int64_t r = 0; r < mr; r++) {
    LLVMValueRef off =
        LLVMBuildAdd(B, LLVMBuildMul(B, Kk.iv, rl_ci64(c, mr), ""), rl_ci64(c, r), "");
    LLVMValueRef a = LLVMBuildLoad2(B, c->f32, rl_fptr(c, apan, off, "ap"), "a");
    LLVMValueRef ins =
        LLVMBuildInsertElement(B, LLVMGetPoison(c->vty), a, LLVMConstInt(c->i32, 0, 0), "");
    LLVMValueRef splat =
        LLVMBuildShuffleVector(B, ins, LLVMGetPoison(c->vty),
                               LLVMConstNull(LLVMVectorType(c->i32, (unsigned)W)), "a.bcast");
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef args[3] = {splat, bv[v], phis[r * nv + v]};
      LLVMTypeRef vt = c->vty;
      nacc[r * nv + v] = rl_intrin(c, "llvm.fmuladd", &vt, 1, args, 3, "fma");
    }
  }
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  for (int64_t i = 0; i < mr * nv; i++) LLVMAddIncoming(phis[i], &nacc[i], &latch, 1);
  rl_loop_end(c, &Kk, kend, exit_name);
  if (c->unroll > 1) rl_unroll_last_loop(c, latch, (unsigned)c->unroll);
}

/* ---- bf16 pairs for vdpbf16ps (AVX-512 BF16) ------------------------------ */

/* Whether stage s runs the bf16 micro-kernel: both operands bf16 (bf16 loads,
 * or prologues ending in a cast to bf16) on a target with 512-bit vdpbf16ps. */
static bool gemm_dot_bf16(rctx *c) {
  const cm_kstage *s = c->s;
  return c->dot_bf16 && c->W == 16 && s->exprs[s->gemm_a].dtype == CM_BF16 &&
         s->exprs[s->gemm_b].dtype == CM_BF16;
}

/* Packs panels [0, npan) of R rows x k [0, kcur) of bf16 operand e as pairs
 * along k (the layout vdpbf16ps reads): 32-bit word dst[p*kcp*R + kp*R + l]
 * holds the values at k = 2 kp (low half) and 2 kp + 1 (high half) of row
 * r0 + p*R + l; zero for rows at or beyond lim and for k at or beyond kcur
 * (an odd kcur's last pair). A bf16 value is the upper half of the float that
 * carries it: the halves are exact. */
static void emit_pack_pairs(rctx *c, const char *name, int e, int rv, LLVMValueRef r0, int64_t lim,
                            LLVMValueRef npan, int64_t R, int64_t kcp, LLVMValueRef k0,
                            LLVMValueRef kcur, LLVMValueRef dst) {
  LLVMBuilderRef B = c->B;
  int kvar = c->s->n_dom;
  char nm[48];
  snprintf(nm, sizeof nm, "%s.panel", name);
  loop Lp = rl_loop_begin(c, nm, rl_ci64(c, 0));
  LLVMValueRef pr0 = LLVMBuildAdd(B, r0, LLVMBuildMul(B, Lp.iv, rl_ci64(c, R), ""), "pr0");
  LLVMValueRef pdst = rl_fptr(c, dst, LLVMBuildMul(B, Lp.iv, rl_ci64(c, kcp * R), ""), "pdst");
  LLVMValueRef npairs =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, kcur, rl_ci64(c, 1), ""), rl_ci64(c, 2), "npairs");
  snprintf(nm, sizeof nm, "%s.kp", name);
  loop Lk = rl_loop_begin(c, nm, rl_ci64(c, 0));
  LLVMValueRef zero = LLVMConstReal(c->f32, 0), hi_mask = LLVMConstInt(c->i32, 0xffff0000u, 0);
  LLVMValueRef words[64];
  for (int64_t l = 0; l < R; l++) {
    LLVMValueRef row = LLVMBuildAdd(B, pr0, rl_ci64(c, l), "row");
    LLVMValueRef inb = LLVMBuildICmp(B, LLVMIntSLT, row, rl_ci64(c, lim), "inb");
    LLVMValueRef bits[2];
    for (int h = 0; h < 2; h++) {
      LLVMValueRef kk =
          LLVMBuildAdd(B, LLVMBuildMul(B, Lk.iv, rl_ci64(c, 2), ""), rl_ci64(c, h), "kk");
      LLVMValueRef kin = LLVMBuildICmp(B, LLVMIntSLT, kk, kcur, "kin");
      c->vars[rv] = rl_smin(c, row, rl_ci64(c, lim - 1), "rowc");
      c->vars[kvar] =
          LLVMBuildAdd(B, k0, rl_smin(c, kk, LLVMBuildSub(B, kcur, rl_ci64(c, 1), ""), "kkc"), "k");
      rl_reset_memo(c);
      LLVMValueRef v = rl_convert(c, rl_emit(c, e), c->s->exprs[e].dtype, CM_F32);
      v = LLVMBuildSelect(B, LLVMBuildAnd(B, inb, kin, ""), v, zero, "bfv");
      bits[h] = LLVMBuildBitCast(B, v, c->i32, "bfbits");
    }
    words[l] = LLVMBuildOr(B, LLVMBuildLShr(B, bits[0], LLVMConstInt(c->i32, 16, 0), ""),
                           LLVMBuildAnd(B, bits[1], hi_mask, ""), "pair");
  }
  LLVMValueRef wdst = rl_fptr(c, pdst, LLVMBuildMul(B, Lk.iv, rl_ci64(c, R), ""), "wdst");
  for (int64_t l = 0; l < R; l++) {
    LLVMValueRef st = LLVMBuildStore(B, words[l], rl_fptr(c, wdst, rl_ci64(c, l), "dst"));
    LLVMSetAlignment(st, 4);
  }
  snprintf(nm, sizeof nm, "%s.kp.exit", name);
  LLVMBasicBlockRef klatch = LLVMGetInsertBlock(B);
  rl_loop_end(c, &Lk, npairs, nm);
  rl_no_vectorize_loop(c, klatch); /* the lanes merge into vectors (SLP), as rl_emit_pack's */
  snprintf(nm, sizeof nm, "%s.panel.exit", name);
  rl_loop_end(c, &Lp, npan, nm);
  c->vars[kvar] = NULL;
}

/* vdpbf16ps of 16 f32 accumulators and two vectors of 16 bf16 pairs (as i32):
 * acc[i] += a[2i+1] b[2i+1], then += a[2i] b[2i] (Intel's pseudo-code; the
 * products are exact). The intrinsic's operand type (i32 or bfloat vectors, by
 * LLVM version) is read from its declaration. Without the instruction
 * (dot_native false: a test's target on another host) the same two steps in
 * f32 FMAs. */
static LLVMValueRef emit_dpbf16(rctx *c, LLVMValueRef acc, LLVMValueRef a, LLVMValueRef b) {
  LLVMBuilderRef B = c->B;
  if (!c->dot_native) {
    LLVMValueRef c16[16], chi[16];
    for (int i = 0; i < 16; i++)
      c16[i] = LLVMConstInt(c->i32, 16, 0), chi[i] = LLVMConstInt(c->i32, 0xffff0000u, 0);
    LLVMValueRef sh = LLVMConstVector(c16, 16), hi = LLVMConstVector(chi, 16);
    LLVMValueRef even[2], odd[2], ops[2] = {a, b};
    for (int i = 0; i < 2; i++) {
      even[i] = LLVMBuildBitCast(B, LLVMBuildShl(B, ops[i], sh, ""), c->vty, "even");
      odd[i] = LLVMBuildBitCast(B, LLVMBuildAnd(B, ops[i], hi, ""), c->vty, "odd");
    }
    LLVMTypeRef vt = c->vty;
    LLVMValueRef s1[3] = {odd[0], odd[1], acc};
    LLVMValueRef r = rl_intrin(c, "llvm.fma", &vt, 1, s1, 3, "dot.odd");
    LLVMValueRef s2[3] = {even[0], even[1], r};
    return rl_intrin(c, "llvm.fma", &vt, 1, s2, 3, "dot");
  }
  static const char name[] = "llvm.x86.avx512bf16.dpbf16ps.512";
  unsigned id = LLVMLookupIntrinsicID(name, sizeof name - 1);
  LLVMTypeRef fty = LLVMIntrinsicGetType(c->C, id, NULL, 0);
  LLVMTypeRef params[3];
  LLVMGetParamTypes(fty, params);
  LLVMValueRef args[3] = {acc, LLVMBuildBitCast(B, a, params[1], ""),
                          LLVMBuildBitCast(B, b, params[2], "")};
  return LLVMBuildCall2(B, fty, LLVMGetIntrinsicDeclaration(c->M, id, NULL, 0), args, 3, "dot");
}

/* The bf16 micro-kernel's loop over kpend pairs of packed panels (A: mr words
 * per pair, B: nr words per pair, nv = nr / 16 vectors): as rl_emit_fma_kloop,
 * one vdpbf16ps (two products per lane) per accumulator and pair. */
static void emit_dot_kloop(rctx *c, LLVMValueRef apan, LLVMValueRef bpan, int64_t mr, int64_t nv,
                           int64_t nr, LLVMValueRef kpend, LLVMValueRef *init, LLVMValueRef *nacc) {
  LLVMBuilderRef B = c->B;
  LLVMTypeRef wv = LLVMVectorType(c->i32, 16);
  LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
  loop Kk = rl_loop_begin(c, "kp", rl_ci64(c, 0));
  LLVMValueRef phis[64], bv[8];
  for (int64_t i = 0; i < mr * nv; i++) {
    phis[i] = LLVMBuildPhi(B, c->vty, "acc");
    LLVMAddIncoming(phis[i], &init[i], &pre, 1);
  }
  for (int64_t v = 0; v < nv; v++) {
    LLVMValueRef off =
        LLVMBuildAdd(B, LLVMBuildMul(B, Kk.iv, rl_ci64(c, nr), ""), rl_ci64(c, v * 16), "");
    bv[v] = LLVMBuildLoad2(B, wv, rl_fptr(c, bpan, off, "bp"), "bpairs");
    LLVMSetAlignment(bv[v], 4);
  }
  for (int64_t r = 0; r < mr; r++) {
    LLVMValueRef off =
        LLVMBuildAdd(B, LLVMBuildMul(B, Kk.iv, rl_ci64(c, mr), ""), rl_ci64(c, r), "");
    LLVMValueRef a = LLVMBuildLoad2(B, c->i32, rl_fptr(c, apan, off, "ap"), "apair");
    LLVMValueRef ins =
        LLVMBuildInsertElement(B, LLVMGetPoison(wv), a, LLVMConstInt(c->i32, 0, 0), "");
    LLVMValueRef splat =
        LLVMBuildShuffleVector(B, ins, LLVMGetPoison(wv), LLVMConstNull(wv), "a.bcast");
    for (int64_t v = 0; v < nv; v++)
      nacc[r * nv + v] = emit_dpbf16(c, phis[r * nv + v], splat, bv[v]);
  }
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  for (int64_t i = 0; i < mr * nv; i++) LLVMAddIncoming(phis[i], &nacc[i], &latch, 1);
  rl_loop_end(c, &Kk, kpend, "kp.exit");
  if (c->unroll > 1) rl_unroll_last_loop(c, latch, (unsigned)c->unroll);
}

/* Packs an operand's panels for the micro-kernel: bf16 pairs (dot) or floats. */
static void pack_operand(rctx *c, bool dot, const char *name, int e, int rv, LLVMValueRef r0,
                         int64_t lim, LLVMValueRef npan, int64_t R, int64_t kc, LLVMValueRef k0,
                         LLVMValueRef kcur, LLVMValueRef dst) {
  if (dot)
    emit_pack_pairs(c, name, e, rv, r0, lim, npan, R, (kc + 1) / 2, k0, kcur, dst);
  else
    rl_emit_pack(c, name, e, rv, r0, lim, npan, R, kc, k0, kcur, dst);
}

/* Floats of packed B in the workspace: every kc slice of a column block (kept
 * for the following items with the same block) when they take at most 4 MiB,
 * else one slice. cm_kstage_workspace_bytes (gemm.c) sizes it the same way. */
static int64_t gemm_b_floats(int64_t K, int64_t kc, int64_t nc) {
  int64_t all = (K + kc - 1) / kc * kc * nc;
  return all * 4 <= ((int64_t)4 << 20) ? all : kc * nc;
}

/* The stage's stores for the rows x cols in-bounds elements of a tile of the C
 * tile (from element (ti0, tj0); its ACC at cbase, row stride nc). A row of nr
 * columns (the whole tile's width) has a constant trip count: vectorized
 * without a remainder. */
static void emit_micro_epilogue(rctx *c, LLVMValueRef Ct, LLVMValueRef cbase, LLVMValueRef ti0,
                                LLVMValueRef tj0, LLVMValueRef rows, LLVMValueRef cols, int64_t nc,
                                int64_t nr, const LLVMValueRef *ws_md) {
  LLVMBuilderRef B = c->B;
  const cm_kstage *s = c->s;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  loop Er = rl_loop_begin(c, "epi.r", rl_ci64(c, 0));
  c->vars[iv] = LLVMBuildAdd(B, ti0, Er.iv, "i");
  LLVMValueRef rbase = LLVMBuildAdd(B, cbase, LLVMBuildMul(B, Er.iv, rl_ci64(c, nc), ""), "crow");
  LLVMValueRef whole = LLVMBuildICmp(B, LLVMIntEQ, cols, rl_ci64(c, nr), "wholerow");
  LLVMBasicBlockRef bw = rl_new_block(c, "epi.whole"), be = rl_new_block(c, "epi.edge"),
                    bj = rl_new_block(c, "epi.rnext");
  LLVMBuildCondBr(B, whole, bw, be);
  for (int edge = 0; edge < 2; edge++) {
    LLVMPositionBuilderAtEnd(B, edge ? be : bw);
    loop Ej = rl_loop_begin(c, edge ? "epi.je" : "epi.j", rl_ci64(c, 0));
    c->vars[jv] = LLVMBuildAdd(B, tj0, Ej.iv, "j");
    c->acc =
        LLVMBuildLoad2(B, c->f32, rl_fptr(c, Ct, LLVMBuildAdd(B, rbase, Ej.iv, ""), "cp"), "c");
    if (ws_md[0]) {
      LLVMSetMetadata(c->acc, LLVMGetMDKindIDInContext(c->C, "alias.scope", 11), ws_md[0]);
      LLVMSetMetadata(c->acc, LLVMGetMDKindIDInContext(c->C, "noalias", 7), ws_md[1]);
    }
    rl_emit_stores(c);
    rl_loop_end(c, &Ej, edge ? cols : rl_ci64(c, nr), edge ? "epi.je.exit" : "epi.j.exit");
    LLVMBuildBr(B, bj);
  }
  LLVMPositionBuilderAtEnd(B, bj);
  rl_loop_end(c, &Er, rows, "epi.r.exit");
}

/* Per work item (a row block x column block, row blocks fastest) and kc slice:
 * pack B (kc x nc) and A (mc x kc), then for each B micro-panel, each A
 * micro-panel: the micro-kernel into the C tile. With one slice (K <= kc)
 * consecutive items of a call with the same column block reuse the packed B,
 * and each micro-tile's epilogue runs right after its k loop; with several,
 * one epilogue pass over the C tile follows the last slice. */
void rl_render_gemm(rctx *c, const char *fname, const gemm_shape *g) {
  const cm_kstage *s = c->s;
  LLVMBuilderRef B = c->B;
  int64_t mc = g->t.mc, nc = g->t.nc, kc = g->t.kc, mr = g->t.mr, nr = g->t.nr, W = c->W;
  int64_t nv = nr / W;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  /* bf16 pairs: a slice's panels take kcp words per row where floats took kc */
  bool dot = gemm_dot_bf16(c);
  int64_t kcp = dot ? (kc + 1) / 2 : kc;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  /* two alias scopes: the workspace never overlaps the kernel's buffers, so the
     epilogue's C tile loads and the output stores vectorize without checks */
  LLVMValueRef ws_md[2] = {NULL, NULL};
  LLVMValueRef *scope = calloc((size_t)c->k->n_buffers + 1, sizeof *scope);
  LLVMValueRef *noalias = calloc((size_t)c->k->n_buffers + 1, sizeof *noalias);
  if (scope && noalias) {
    LLVMMetadataRef dom = rl_self_md(c, NULL), sws = rl_self_md(c, dom), sbuf = rl_self_md(c, dom);
    ws_md[0] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sws, 1));
    ws_md[1] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sbuf, 1));
    for (int b = 0; b < c->k->n_buffers; b++) scope[b] = ws_md[1], noalias[b] = ws_md[0];
    c->md_scope = scope, c->md_noalias = noalias;
  }
  /* items run row blocks fastest: consecutive items of a call share their B
     panel (every kc slice of it, when they fit the workspace), packed once for
     all of them */
  bool one_slice = g->K <= kc;
  int64_t bfl = gemm_b_floats(g->K, kc, nc);
  bool cache_b = bfl > kc * nc || one_slice;
  LLVMValueRef Bp = ws;
  LLVMValueRef Ap = rl_fptr(c, ws, rl_ci64(c, bfl), "Ap");
  LLVMValueRef Ct = rl_fptr(c, ws, rl_ci64(c, bfl + mc * kc), "Ct");
  LLVMBasicBlockRef wpre = LLVMGetInsertBlock(B);
  loop Wl = rl_loop_begin(c, "w", begin);
  LLVMValueRef bkey_prev = LLVMBuildPhi(B, c->i64, "bkey.prev");
  LLVMValueRef minus1 = rl_ci64(c, -1);
  LLVMAddIncoming(bkey_prev, &minus1, &wpre, 1);
  LLVMValueRef mblk = LLVMBuildSRem(B, Wl.iv, rl_ci64(c, g->mblocks), "mblk");
  LLVMValueRef t = LLVMBuildSDiv(B, Wl.iv, rl_ci64(c, g->mblocks), "bkey");
  LLVMValueRef nblk = LLVMBuildSRem(B, t, rl_ci64(c, g->nblocks), "nblk");
  LLVMValueRef rest = LLVMBuildSDiv(B, t, rl_ci64(c, g->nblocks), "batch");
  for (int v = g->nb - 1; v >= 0; v--) {
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(B, rest, rl_ci64(c, s->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, rl_ci64(c, s->dom[v]), "");
    }
  }
  LLVMValueRef i0 = LLVMBuildMul(B, mblk, rl_ci64(c, mc), "i0");
  LLVMValueRef j0 = LLVMBuildMul(B, nblk, rl_ci64(c, nc), "j0");
  LLVMValueRef mrem =
      rl_smin(c, LLVMBuildSub(B, rl_ci64(c, g->M), i0, ""), rl_ci64(c, mc), "mrows");
  LLVMValueRef nrem =
      rl_smin(c, LLVMBuildSub(B, rl_ci64(c, g->N), j0, ""), rl_ci64(c, nc), "ncols");
  /* rows/cols rounded up to whole panels */
  LLVMValueRef mpan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, mrem, rl_ci64(c, mr - 1), ""), rl_ci64(c, mr), "mpanels");
  LLVMValueRef npan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, nrem, rl_ci64(c, nr - 1), ""), rl_ci64(c, nr), "npanels");

  loop Kl = rl_loop_begin(c, "kslice", rl_ci64(c, 0));
  LLVMValueRef k0 = LLVMBuildMul(B, Kl.iv, rl_ci64(c, kc), "k0");
  LLVMValueRef kcur = rl_smin(c, LLVMBuildSub(B, rl_ci64(c, g->K), k0, ""), rl_ci64(c, kc), "kcur");
  LLVMValueRef first = LLVMBuildICmp(B, LLVMIntEQ, Kl.iv, rl_ci64(c, 0), "first");
  LLVMValueRef Bs = Bp; /* this slice's packed B */
  LLVMBasicBlockRef bkeep = NULL;
  if (cache_b) {
    Bs = rl_fptr(c, Bp, LLVMBuildMul(B, Kl.iv, rl_ci64(c, kc * nc), ""), "Bslice");
    LLVMBasicBlockRef bpack = rl_new_block(c, "packB.new");
    bkeep = rl_new_block(c, "packB.keep");
    LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntNE, t, bkey_prev, "newB"), bpack, bkeep);
    LLVMPositionBuilderAtEnd(B, bpack);
  }
  pack_operand(c, dot, "packB", s->gemm_b, jv, j0, g->N, npan, nr, kc, k0, kcur, Bs);
  if (cache_b) {
    LLVMBuildBr(B, bkeep);
    LLVMPositionBuilderAtEnd(B, bkeep);
  }
  pack_operand(c, dot, "packA", s->gemm_a, iv, i0, g->M, mpan, mr, kc, k0, kcur, Ap);

  /* B micro-panel (kc x nr) stays in L1 while the A block streams from L2 */
  loop Jr = rl_loop_begin(c, "jr", rl_ci64(c, 0));
  loop Ir = rl_loop_begin(c, "ir", rl_ci64(c, 0));
  LLVMValueRef apan = rl_fptr(c, Ap, LLVMBuildMul(B, Ir.iv, rl_ci64(c, kcp * mr), ""), "apanel");
  LLVMValueRef bpan = rl_fptr(c, Bs, LLVMBuildMul(B, Jr.iv, rl_ci64(c, kcp * nr), ""), "bpanel");
  LLVMValueRef cbase = LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr * nc), ""),
                                    LLVMBuildMul(B, Jr.iv, rl_ci64(c, nr), ""), "cbase");
  /* the first kc slice starts from zero, later ones from the C tile */
  LLVMValueRef acc0[64], prev[64];
  LLVMBasicBlockRef bload = rl_new_block(c, "cload"), bjoin = rl_new_block(c, "cinit");
  LLVMBasicBlockRef bfirst = LLVMGetInsertBlock(B);
  LLVMBuildCondBr(B, first, bjoin, bload);
  LLVMPositionBuilderAtEnd(B, bload);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, rl_ci64(c, r * nc + v * W), "");
      prev[r * nv + v] = LLVMBuildLoad2(B, c->vty, rl_fptr(c, Ct, off, "cp"), "cprev");
      LLVMSetAlignment(prev[r * nv + v], 4);
    }
  LLVMBuildBr(B, bjoin);
  LLVMPositionBuilderAtEnd(B, bjoin);
  LLVMValueRef vzero = LLVMConstNull(c->vty);
  for (int64_t i = 0; i < mr * nv; i++) {
    acc0[i] = LLVMBuildPhi(B, c->vty, "cinit");
    LLVMValueRef in[2] = {vzero, prev[i]};
    LLVMBasicBlockRef from[2] = {bfirst, bload};
    LLVMAddIncoming(acc0[i], in, from, 2);
  }
  LLVMValueRef nacc[64];
  if (dot)
    emit_dot_kloop(c, apan, bpan, mr, nv, nr,
                   LLVMBuildSDiv(B, LLVMBuildAdd(B, kcur, rl_ci64(c, 1), ""), rl_ci64(c, 2), ""),
                   acc0, nacc);
  else
    rl_emit_fma_kloop(c, apan, bpan, mr, nv, nr, kcur, "kk", acc0, nacc);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, rl_ci64(c, r * nc + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, nacc[r * nv + v], rl_fptr(c, Ct, off, "cp"));
      LLVMSetAlignment(st, 4);
    }
  if (one_slice) /* the micro-tile's epilogue while its sums are in L1 */
    emit_micro_epilogue(
        c, Ct, cbase, LLVMBuildAdd(B, i0, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr), ""), "ti0"),
        LLVMBuildAdd(B, j0, LLVMBuildMul(B, Jr.iv, rl_ci64(c, nr), ""), "tj0"),
        rl_smin(c, LLVMBuildSub(B, mrem, LLVMBuildMul(B, Ir.iv, rl_ci64(c, mr), ""), ""),
                rl_ci64(c, mr), "trows"),
        rl_smin(c, LLVMBuildSub(B, nrem, LLVMBuildMul(B, Jr.iv, rl_ci64(c, nr), ""), ""),
                rl_ci64(c, nr), "tcols"),
        nc, nr, ws_md);
  rl_loop_end(c, &Ir, mpan, "ir.exit");
  rl_loop_end(c, &Jr, npan, "jr.exit");
  rl_loop_end(c, &Kl, rl_ci64(c, (g->K + kc - 1) / kc), "kslice.exit");
  /* several slices: one pass over the C tile (stores within a slice would
     evict the B micro-panel from L1) */
  if (!one_slice) emit_micro_epilogue(c, Ct, rl_ci64(c, 0), i0, j0, mrem, nrem, nc, nc, ws_md);
  LLVMBasicBlockRef wlatch = LLVMGetInsertBlock(B);
  LLVMAddIncoming(bkey_prev, &t, &wlatch, 1);
  rl_loop_end(c, &Wl, end, "w.exit");
  rl_end_function(c, done);
  c->md_scope = c->md_noalias = NULL;
  free(scope), free(noalias);
}
