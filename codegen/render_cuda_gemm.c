/* codegen/render_cuda_gemm.c — GEMM stages to CUDA C: which stages the templates take, and the
 * shared-memory tiled kernel with register-tiled FMA for f32/f64 (bf16/f16 operands on sm_80+:
 * the tensor-core template, render_cuda_mma.c). */
#include "render_cuda.h"

#include <stdlib.h>
#include <string.h>

/* ---- GEMM stages -------------------------------------------------------- */

/* FMA lanes: lr x lc == 32 with mr % lr == 0 and nr % lc == 0, micro tile
 * closest to square; false when none fits a sane register budget. */
static bool fma_lanes(cm_kcuda_gemm *p) {
  static const int opts[] = {4, 8, 2, 16, 1, 32};
  int best = -1, best_cost = 1 << 30;
  for (int i = 0; i < 6; i++) {
    int lr = opts[i], lc = 32 / lr;
    if (p->mr % lr || p->nr % lc) continue;
    int tm = p->mr / lr, tn = p->nr / lc;
    if (tm * tn > 64) continue;
    int cost = abs(tm - tn);
    if (cost < best_cost) {
      best_cost = cost;
      best = lr;
    }
  }
  if (best < 0) return false;
  p->lr = best;
  p->lc = 32 / best;
  p->tm = p->mr / p->lr;
  p->tn = p->nr / p->lc;
  return true;
}

bool cu_plan_gemm(const cm_kstage *s, const cm_target *tg, cm_kcuda_gemm *out) {
  cm_kcuda_gemm p;
  memset(&p, 0, sizeof p);
  /* an attention span's first stage is its first GEMM (rendered alone when the span is not fused)
   */
  bool gemm_like =
      s->tmpl == CM_KT_GEMM || s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD;
  if (!gemm_like) return false;
  if (s->n_dom < 2 || s->n_red != 1 || s->red_op != CM_KRED_SUM || s->accumulate) return false;
  if (s->gemm_a < 0 || s->gemm_a >= s->n_exprs || s->gemm_b < 0 || s->gemm_b >= s->n_exprs)
    return false;
  if (s->acc_dtype != CM_F32 && s->acc_dtype != CM_F64) return false;
  /* the template's meaning needs body = MUL(A, B) (either operand possibly widened to the
   * accumulator's dtype first: exact); anything else keeps the loop nest */
  const cm_kexpr *body = s->body >= 0 && s->body < s->n_exprs ? &s->exprs[s->body] : NULL;
  if (!body || body->kind != CM_KX_OP || body->op != CM_OP_MUL ||
      !((cm_kx_is_gemm_factor(s, body->a, s->gemm_a) &&
         cm_kx_is_gemm_factor(s, body->b, s->gemm_b)) ||
        (cm_kx_is_gemm_factor(s, body->a, s->gemm_b) &&
         cm_kx_is_gemm_factor(s, body->b, s->gemm_a))))
    return false;
  p.batch = cu_prod(s->dom, s->n_dom - 2);
  p.M = s->dom[s->n_dom - 2];
  p.N = s->dom[s->n_dom - 1];
  p.K = s->red[0];
  cm_kgemm_tiles t = s->tiles;
  if (t.mc <= 0 || t.nc <= 0 || t.kc <= 0 || t.mr <= 0 || t.nr <= 0 || t.mc % t.mr || t.nc % t.nr ||
      (t.mc / t.mr) * (t.nc / t.nr) > 16 || t.kc > 64)
    t = tg->gemm;
  p.mc = t.mc;
  p.nc = t.nc;
  p.kc = t.kc;
  p.mr = t.mr;
  p.nr = t.nr;
  cm_dtype da = s->exprs[s->gemm_a].dtype, db = s->exprs[s->gemm_b].dtype;
  bool want_mma =
      da == db && (da == CM_BF16 || da == CM_F16) && s->acc_dtype == CM_F32 && tg->mma_bf16;
  if (want_mma) {
    cm_kcuda_gemm q = p;
    q.mma = true;
    q.bf16 = da == CM_BF16;
    q.t = CM_F32;
    if (cu_plan_mma(s, tg, &q)) {
      *out = q;
      return true;
    }
  }
  p.t = s->acc_dtype;
  if (!fma_lanes(&p)) {
    p.mc = p.nc = 64;
    p.kc = 16;
    p.mr = p.nr = 32;
    fma_lanes(&p);
  }
  /* static shared memory stays within the target's limit */
  size_t smem = (size_t)tg->shared_bytes_static;
  size_t esz = p.t == CM_F64 ? 8 : 4;
  while (p.kc > 16 && (size_t)(p.kc + 8) * (size_t)(p.mc + p.nc) * esz > smem) p.kc /= 2;
  if ((size_t)(p.kc + 8) * (size_t)(p.mc + p.nc) * esz > smem) {
    p.mc = p.nc = 64;
    p.kc = 16;
    p.mr = p.nr = 32;
    fma_lanes(&p);
  }
  p.warps = (p.mc / p.mr) * (p.nc / p.nr);
  p.threads = p.warps * 32;
  *out = p;
  return true;
}

cm_status cu_check_gemm_operands(rctx *c) {
  const cm_kstage *s = c->s;
  int i = s->n_dom - 2, j = s->n_dom - 1, kv = s->n_dom;
  uint32_t batch = (1u << i) - 1u;
  uint32_t ua = cm_kx_vars_used(s, s->gemm_a), ub = cm_kx_vars_used(s, s->gemm_b);
  if (ua & ~(batch | 1u << i | 1u << kv))
    return cu_fail(c, s->gemm_a, "GEMM operand A uses a variable other than batch, i and k");
  if (ub & ~(batch | 1u << j | 1u << kv))
    return cu_fail(c, s->gemm_b, "GEMM operand B uses a variable other than batch, k and j");
  if (c->useacc[s->gemm_a] || c->useacc[s->gemm_b]) return cu_fail(c, -1, "GEMM operand uses ACC");
  return CM_OK;
}

/* Emits operand X's evaluation for shared-memory element (row r_, col c_ of
 * the tile) into "val_" (tile dtype); vars i/j and k come from the tile origin. */
static void emit_operand_load(rctx *c, const cm_kcuda_gemm *p, bool is_a, const char *store_fmt) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int root = is_a ? s->gemm_a : s->gemm_b;
  int iv = is_a ? s->n_dom - 2 : s->n_dom - 1, kv = s->n_dom;
  /* A: kk fastest (k contiguous in row-major A); B: jj fastest */
  int outer = is_a ? p->mc : p->kc, inner = is_a ? p->kc : p->nc;
  /* two elements in flight per thread: full unrolling keeps every element's index
   * arithmetic live at once, and ptxas then spills some GEMMs */
  cu_sb_printf(o, "#pragma unroll 2\n      for (int t_ = threadIdx.x; t_ < %d; t_ += %d) {\n",
               outer * inner, p->threads);
  if (is_a)
    cu_sb_printf(o, "        const int ii_ = t_ / %d, kk_ = t_ %% %d;\n", inner, inner);
  else
    cu_sb_printf(o, "        const int kk_ = t_ / %d, ii_ = t_ %% %d;\n", inner, inner);
  cu_sb_printf(o, "        const long long v%d = %s + ii_, v%d = k0_ + kk_;\n", iv,
               is_a ? "m0_" : "n0_", kv);
  cu_sb_printf(o, "        %s val_ = 0;\n", cu_ctype(p->t));
  cu_sb_printf(o, "        if (v%d < %lldLL && v%d < %lldLL) {\n", iv,
               (long long)(is_a ? p->M : p->N), kv, (long long)p->K);
  cu_emit_tree(c, root, "          ", "acc");
  char v[32], cv[256];
  snprintf(v, sizeof v, "e%d", root);
  cu_cast_code(cv, sizeof cv, s->exprs[root].dtype, p->t, v);
  cu_sb_printf(o, "          val_ = %s;\n", cv);
  cu_sb_printf(o, "        }\n");
  cu_sb_printf(o, store_fmt, "        ");
  cu_sb_printf(o, "      }\n");
  /* those declared inside the loop are out of scope now */
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
}

/* The block's loops over batch items and tiles of a GEMM stage (a loop only where the grid
 * cannot cover the dimension: launch caps), opening the scope where m0_, n0_ are defined. */
void cu_emit_gemm_block_loops(rctx *c, const cm_kcuda_gemm *p) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int nb = s->n_dom - 2;
  int64_t gy = (p->M + p->mc - 1) / p->mc, gx = (p->N + p->nc - 1) / p->nc;
  if (nb == 0)
    cu_sb_printf(o, "  {\n");
  else if (p->batch <= 65535)
    cu_sb_printf(o, "  {\n    const long long bz_ = blockIdx.z;\n");
  else
    cu_sb_printf(o, "  for (long long bz_ = blockIdx.z; bz_ < %lldLL; bz_ += gridDim.z) {\n",
                 (long long)p->batch);
  cu_decompose(c, "    ", "bz_", 0, s->dom, nb);
  if (gy <= 65535)
    cu_sb_printf(o, "    {\n    const long long by_ = blockIdx.y;\n");
  else
    cu_sb_printf(o, "    for (long long by_ = blockIdx.y; by_ < %lldLL; by_ += gridDim.y) {\n",
                 (long long)gy);
  if (gx <= 2147483647)
    cu_sb_printf(o, "    {\n    const long long bx_ = blockIdx.x;\n");
  else
    cu_sb_printf(o, "    for (long long bx_ = blockIdx.x; bx_ < %lldLL; bx_ += gridDim.x) {\n",
                 (long long)gx);
  cu_sb_printf(o, "      const long long m0_ = by_ * %d, n0_ = bx_ * %d;\n", p->mc, p->nc);
}

void cu_render_gemm(rctx *c, const cm_kcuda_gemm *p, int min_blocks, const bool *written) {
  if (p->mma) {
    cu_render_mma(c, p, min_blocks, written);
    return;
  }
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  char bounds[64];
  cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
  cu_signature(c, written, bounds);
  cu_sb_printf(o, "  __shared__ %s As_[%d][%d];\n", cu_ctype(p->t), p->kc, p->mc + 4);
  cu_sb_printf(o, "  __shared__ %s Bs_[%d][%d];\n", cu_ctype(p->t), p->kc, p->nc + 4);
  cu_sb_printf(o,
               "  const int warp_ = threadIdx.x >> 5, lane_ = threadIdx.x & 31;\n"
               "  const int wm_ = warp_ / %d, wn_ = warp_ %% %d;\n",
               p->nc / p->nr, p->nc / p->nr);
  cu_sb_printf(o, "  const int lr_ = lane_ / %d, lc_ = lane_ %% %d;\n", p->lc, p->lc);
  cu_emit_gemm_block_loops(c, p);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  cu_sb_printf(o, "      %s acc_[%d][%d];\n", cu_ctype(p->t), p->tm, p->tn);
  cu_sb_printf(o,
               "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n        for (int y_ = 0; y_ < %d; y_++) acc_[x_][y_] = 0;\n",
               p->tm, p->tn);
  cu_sb_printf(o, "#pragma unroll 1\n      for (long long k0_ = 0; k0_ < %lldLL; k0_ += %d) {\n",
               (long long)p->K, p->kc);
  cu_sb_printf(o, "      __syncthreads();\n");
  emit_operand_load(c, p, true, "%sAs_[kk_][ii_] = val_;\n");
  emit_operand_load(c, p, false, "%sBs_[kk_][ii_] = val_;\n");
  cu_sb_printf(o, "      __syncthreads();\n");
  cu_sb_printf(
      o,
      "#pragma unroll\n"
      "      for (int kk_ = 0; kk_ < %d; kk_++) {\n"
      "        %s a_[%d], b_[%d];\n"
      "#pragma unroll\n"
      "        for (int x_ = 0; x_ < %d; x_++) a_[x_] = As_[kk_][wm_ * %d + x_ * %d + lr_];\n"
      "#pragma unroll\n"
      "        for (int y_ = 0; y_ < %d; y_++) b_[y_] = Bs_[kk_][wn_ * %d + y_ * %d + lc_];\n"
      "#pragma unroll\n"
      "        for (int x_ = 0; x_ < %d; x_++)\n"
      "#pragma unroll\n"
      "          for (int y_ = 0; y_ < %d; y_++) acc_[x_][y_] = fma(a_[x_], b_[y_], "
      "acc_[x_][y_]);\n"
      "      }\n",
      p->kc, cu_ctype(p->t), p->tm, p->tn, p->tm, p->mr, p->lr, p->tn, p->nr, p->lc, p->tm, p->tn);
  cu_sb_printf(o, "      }\n"); /* k loop */
  /* epilogue: element (x_, y_) of the thread's tile is C[i][j] */
  cu_sb_printf(o,
               "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n      for (int y_ = 0; y_ < %d; y_++) {\n"
               "        const long long v%d = m0_ + wm_ * %d + x_ * %d + lr_;\n"
               "        const long long v%d = n0_ + wn_ * %d + y_ * %d + lc_;\n"
               "        const %s acc = acc_[x_][y_];\n",
               p->tm, p->tn, iv, p->mr, p->lr, jv, p->nr, p->lc, cu_ctype(p->t));
  cu_sb_printf(o, "        if (v%d < %lldLL && v%d < %lldLL) {\n", iv, (long long)p->M, jv,
               (long long)p->N);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  cu_emit_stores(c, "          ", "acc");
  cu_sb_printf(o, "        }\n      }\n");
  cu_sb_printf(o, "    }\n    }\n  }\n}\n\n");
}
