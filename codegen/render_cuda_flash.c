/* codegen/render_cuda_flash.c — flash attention forward on tensor cores (render_cuda.h).
 *
 * A streaming forward span (cm_kattn.stream: S = Q K^T, m = rowmax f(S), E = exp(g(S) - m),
 * l = rowsum E, [P = E / l], O = P V) whose GEMM operands are bf16 (autocast's casts: Q, K, V
 * and P rounded to bf16, f32 accumulation) renders as one function: a block of 4 warps per
 * (batch item, block of 64 query rows), each warp owning 16 rows. The block's Q rows go to
 * shared memory once (bf16 pairs, rows padded by 4 words: the fragment loads of a warp hit 32
 * distinct banks); per block of 64 keys, K_j (row-major) and V_j (transposed, so the B fragments
 * of P V are word loads) are staged in shared memory by the operands' own prologue
 * expressions; S_j = Q K_j^T runs on mma.sync m16n8k16 into f32 fragments; the S stage's
 * epilogue, f and the E stage's expression are evaluated on the fragment (the role loads read
 * the fragment's value), the row max and sum are combined across the lane quad by shuffles,
 * O = alpha O + E_j V_j runs on mma.sync with E_j repacked from the S fragments as the A
 * operand (bf16). O / l goes through the O stage's epilogue; the kept m and l are written from
 * the final values and the kept S, E, P by a second pass that recomputes S_j on tensor cores.
 * Shared memory: 2 (64 (dp + 8) + 64 (dp + 8) + dvp (64 + 8)) bytes. f32 spans keep the
 * scalar streaming function (render_cuda_attention.c). */
#include "render_cuda.h"

#include <stdlib.h>
#include <string.h>

#define FL_BR 64 /* query rows per block: 4 warps x 16 */
#define FL_BC 64 /* keys per step */
#define FL_THREADS 128
#define FL_MAX_D 128 /* the S and O fragments stay in registers */

static int64_t up_to(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

static bool expr_is_bf16(const cm_kstage *s, int e) {
  return e >= 0 && e < s->n_exprs && s->exprs[e].dtype == CM_BF16;
}

bool cu_plan_flash(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out) {
  cm_kcuda_attn p;
  if (!t->mma_bf16 || !cu_stream_shape(k, first, &p)) return false;
  const cm_kattn *a = &k->stages[first].attn;
  const cm_kstage *sS = &k->stages[first], *sO = &k->stages[a->st_out];
  if (!expr_is_bf16(sS, sS->gemm_a) || !expr_is_bf16(sS, sS->gemm_b) ||
      !expr_is_bf16(sO, sO->gemm_a) || !expr_is_bf16(sO, sO->gemm_b))
    return false;
  if (p.d > FL_MAX_D || p.dv > FL_MAX_D) return false;
  p.dp = (int)up_to(p.d, 16), p.dvp = (int)up_to(p.dv, 16);
  p.br = FL_BR, p.bc = FL_BC, p.threads = FL_THREADS;
  p.nrb = (int)((p.rows + FL_BR - 1) / FL_BR);
  p.nkb = (int)((p.keys + FL_BC - 1) / FL_BC);
  int64_t bytes = 2 * ((int64_t)(FL_BR + FL_BC) * (p.dp + 8) + (int64_t)p.dvp * (FL_BC + 8));
  if (bytes > t->shared_bytes_static || (double)p.batch * p.nrb > 2147483647.0) return false;
  p.kvn = bytes; /* flash: the bytes of shared memory */
  *out = p;
  return true;
}

/* The renderer's state: the role stages' contexts and the load substitutions. */
typedef struct flash_r {
  const cm_kernel *k;
  const cm_kattn *a;
  const cm_kcuda_attn *p;
  sbuf *o;
  rctx cS, cM, cE, cL, cO, cP;
  bool has_p;
  const char **sub;
  const char *s_load; /* what a load of S reads: the fragment's value (as bf16 bits for bf16 S) */
  int qw, vw;         /* words per row of the Q/K tiles and of the V^T tile */
} flash_r;

/* dst = the value of expression e of stage c at a point of the span, 0 when cond fails. */
static void flash_value(flash_r *f, rctx *c, bool stat, int e, const char *cond, const char *row,
                        const char *col, const char *red, const char *dst) {
  cu_sb_printf(f->o, "      if (%s) {\n", cond);
  cu_attn_point(c, f->p->nb, stat, "      ", row, col, red);
  cu_emit_tree(c, e, "        ", "acc");
  cu_sb_printf(f->o, "        %s = (float)(e%d);\n      }\n      }\n", dst, e);
}

/* K_j (row-major, bf16 pairs along d) and, when with_v, V_j^T (pairs along the keys) in shared
 * memory, zero beyond the keys and the widths; barriers before and after. */
static void flash_tiles(flash_r *f, bool with_v) {
  sbuf *o = f->o;
  const cm_kcuda_attn *p = f->p;
  cu_sb_printf(o, "    __syncthreads();\n");
  cu_sb_printf(o, "    for (int p_ = tid_; p_ < %d; p_ += %d) {\n", FL_BC * p->dp / 2, FL_THREADS);
  cu_sb_printf(o, "      const int j_ = p_ / %d, k_ = 2 * (p_ %% %d);\n", p->dp / 2, p->dp / 2);
  cu_sb_printf(o, "      float x0_ = 0.f, x1_ = 0.f;\n");
  int gb = f->cS.s->gemm_b;
  flash_value(f, &f->cS, false, gb, "j_ < bc_ && k_ < D_", "0", "j0_ + j_", "k_", "x0_");
  flash_value(f, &f->cS, false, gb, "j_ < bc_ && k_ + 1 < D_", "0", "j0_ + j_", "k_ + 1", "x1_");
  cu_sb_printf(o, "      fk_[j_ * %d + k_ / 2] = cm_pack16(cm_f2bf(x0_), cm_f2bf(x1_));\n    }\n",
               f->qw);
  if (with_v) {
    int vb = f->cO.s->gemm_b;
    cu_sb_printf(o, "    for (int p_ = tid_; p_ < %d; p_ += %d) {\n", p->dvp * FL_BC / 2,
                 FL_THREADS);
    cu_sb_printf(o, "      const int c_ = p_ / %d, j_ = 2 * (p_ %% %d);\n", FL_BC / 2, FL_BC / 2);
    cu_sb_printf(o, "      float x0_ = 0.f, x1_ = 0.f;\n");
    flash_value(f, &f->cO, false, vb, "j_ < bc_ && c_ < DV_", "0", "c_", "j0_ + j_", "x0_");
    flash_value(f, &f->cO, false, vb, "j_ + 1 < bc_ && c_ < DV_", "0", "c_", "j0_ + j_ + 1", "x1_");
    cu_sb_printf(o, "      fv_[c_ * %d + j_ / 2] = cm_pack16(cm_f2bf(x0_), cm_f2bf(x1_));\n    }\n",
                 f->vw);
  }
  cu_sb_printf(o, "    __syncthreads();\n");
}

/* s_ = Q K_j^T of the warp's 16 rows (8 fragments of 16 x 8 keys). */
static void flash_scores(flash_r *f) {
  sbuf *o = f->o;
  cu_sb_printf(o, "    float s_[%d][4];\n", FL_BC / 8);
  cu_sb_printf(o,
               "#pragma unroll\n    for (int t_ = 0; t_ < %d; t_++) s_[t_][0] = s_[t_][1] = "
               "s_[t_][2] = s_[t_][3] = 0.f;\n",
               FL_BC / 8);
  cu_sb_printf(o, "#pragma unroll\n    for (int kk_ = 0; kk_ < %d; kk_++) {\n", f->p->dp / 16);
  cu_sb_printf(o, "      const int qa_ = (w_ * 16 + g_) * %d + kk_ * 8 + qd_;\n", f->qw);
  cu_sb_printf(
      o, "      const unsigned a_[4] = {fq_[qa_], fq_[qa_ + %d], fq_[qa_ + 4], fq_[qa_ + %d]};\n",
      8 * f->qw, 8 * f->qw + 4);
  cu_sb_printf(o, "#pragma unroll\n      for (int t_ = 0; t_ < %d; t_++) {\n", FL_BC / 8);
  cu_sb_printf(o, "        const int kb0_ = (t_ * 8 + g_) * %d + kk_ * 8 + qd_;\n", f->qw);
  cu_sb_printf(o, "        const unsigned b_[2] = {fk_[kb0_], fk_[kb0_ + 4]};\n");
  cu_sb_printf(o, "        cm_mma_16816<true>(s_[t_], a_, b_);\n      }\n    }\n");
}

/* Opens the loop over the fragment elements of s_ (row r_ of the block, key j_ of the block). */
static void flash_frag_loop(sbuf *o, int tiles) {
  cu_sb_printf(o, "#pragma unroll\n    for (int t_ = 0; t_ < %d; t_++)\n", tiles);
  cu_sb_printf(o, "#pragma unroll\n    for (int h_ = 0; h_ < 4; h_++) {\n");
  cu_sb_printf(o, "      const int r_ = w_ * 16 + g_ + (h_ >> 1) * 8, j_ = t_ * 8 + qd_ * 2 + "
                  "(h_ & 1);\n      (void)r_;\n");
}

/* The key-block loop's head: j0_ and the block's keys bc_. */
static void flash_kb_head(flash_r *f) {
  cu_sb_printf(f->o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", f->p->nkb);
  cu_sb_printf(f->o, "    const long long j0_ = (long long)kb_ * %d;\n", FL_BC);
  cu_sb_printf(f->o, "    const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
               (long long)f->p->keys, FL_BC, (long long)f->p->keys, FL_BC);
}

/* Pass 1: per key block S_j, the running max and sum, E_j, and O on tensor cores. */
static void flash_pass1(flash_r *f) {
  sbuf *o = f->o;
  const cm_kattn *a = f->a;
  int sv = f->cS.s->stores[0].value;
  flash_kb_head(f);
  flash_tiles(f, true);
  flash_scores(f);
  /* the S stage's value and f(S) on the fragment, the row max */
  cu_sb_printf(o, "    float mx_[2] = {-CM_INFF, -CM_INFF};\n");
  flash_frag_loop(o, FL_BC / 8);
  cu_sb_printf(o, "      float sv_ = -CM_INFF;\n      if (j_ < bc_) {\n");
  cu_sb_printf(o, "      const float acc = s_[t_][h_];\n");
  cu_attn_point(&f->cS, f->p->nb, false, "      ", "row0_ + r_", "j0_ + j_", NULL);
  cu_emit_tree(&f->cS, sv, "        ", "acc");
  cu_sb_printf(o, "        sv_ = (float)(e%d);\n      }\n", sv);
  f->sub[a->buf_s] = f->s_load;
  f->cM.subst = f->sub;
  cu_attn_point(&f->cM, f->p->nb, true, "      ", "row0_ + r_", NULL, "j0_ + j_");
  cu_emit_tree(&f->cM, f->cM.s->body, "        ", "acc");
  cu_sb_printf(o,
               "        mx_[h_ >> 1] = cm_accmax(mx_[h_ >> 1], (float)(e%d));\n      }\n      }\n",
               f->cM.s->body);
  cu_sb_printf(o, "      s_[t_][h_] = sv_;\n    }\n");
  /* the quad's max, the rescale factor */
  cu_sb_printf(o, "    float mn_[2], al_[2], rs_[2] = {0.f, 0.f};\n");
  cu_sb_printf(o, "#pragma unroll\n    for (int r2_ = 0; r2_ < 2; r2_++) {\n");
  cu_sb_printf(
      o, "      mx_[r2_] = cm_accmax(mx_[r2_], __shfl_xor_sync(0xffffffffu, mx_[r2_], 1));\n");
  cu_sb_printf(
      o, "      mx_[r2_] = cm_accmax(mx_[r2_], __shfl_xor_sync(0xffffffffu, mx_[r2_], 2));\n");
  cu_sb_printf(o, "      mn_[r2_] = cm_accmax(m_[r2_], mx_[r2_]);\n");
  cu_sb_printf(o, "      al_[r2_] = m_[r2_] == -CM_INFF ? 0.f : expf(m_[r2_] - mn_[r2_]);\n");
  cu_sb_printf(o, "      m_[r2_] = mn_[r2_];\n    }\n");
  /* E_j on the fragment (the E stage's value at the new max) */
  int ev = f->cE.s->stores[0].value;
  flash_frag_loop(o, FL_BC / 8);
  cu_sb_printf(
      o, "      float ev_ = 0.f;\n      if (j_ < bc_) {\n      const float sv_ = s_[t_][h_];\n");
  f->sub[a->buf_m] = "mn_[h_ >> 1]";
  f->cE.subst = f->sub;
  cu_attn_point(&f->cE, f->p->nb, false, "      ", "row0_ + r_", "j0_ + j_", NULL);
  cu_emit_tree(&f->cE, ev, "        ", "acc");
  cu_sb_printf(o, "        ev_ = (float)(e%d);\n      }\n      }\n", ev);
  cu_sb_printf(o, "      s_[t_][h_] = ev_;\n      rs_[h_ >> 1] += ev_;\n    }\n");
  f->sub[a->buf_s] = f->sub[a->buf_m] = NULL;
  cu_sb_printf(o, "    l_[0] = al_[0] * l_[0] + rs_[0];\n    l_[1] = al_[1] * l_[1] + rs_[1];\n");
  /* O = alpha O + E_j V_j: E_j's fragments are the A operand (bf16) */
  cu_sb_printf(o, "#pragma unroll\n    for (int t_ = 0; t_ < %d; t_++)\n", f->p->dvp / 8);
  cu_sb_printf(
      o, "#pragma unroll\n      for (int h_ = 0; h_ < 4; h_++) o_[t_][h_] *= al_[h_ >> 1];\n");
  cu_sb_printf(o, "#pragma unroll\n    for (int kk_ = 0; kk_ < %d; kk_++) {\n", FL_BC / 16);
  cu_sb_printf(o, "      const unsigned a_[4] = {cm_pack16(cm_f2bf(s_[2 * kk_][0]), "
                  "cm_f2bf(s_[2 * kk_][1])),\n");
  cu_sb_printf(o, "                              cm_pack16(cm_f2bf(s_[2 * kk_][2]), "
                  "cm_f2bf(s_[2 * kk_][3])),\n");
  cu_sb_printf(o, "                              cm_pack16(cm_f2bf(s_[2 * kk_ + 1][0]), "
                  "cm_f2bf(s_[2 * kk_ + 1][1])),\n");
  cu_sb_printf(o, "                              cm_pack16(cm_f2bf(s_[2 * kk_ + 1][2]), "
                  "cm_f2bf(s_[2 * kk_ + 1][3]))};\n");
  cu_sb_printf(o, "#pragma unroll\n      for (int t_ = 0; t_ < %d; t_++) {\n", f->p->dvp / 8);
  cu_sb_printf(o, "        const int vb_ = (t_ * 8 + g_) * %d + kk_ * 8 + qd_;\n", f->vw);
  cu_sb_printf(o, "        const unsigned b_[2] = {fv_[vb_], fv_[vb_ + 4]};\n");
  cu_sb_printf(o, "        cm_mma_16816<true>(o_[t_], a_, b_);\n      }\n    }\n  }\n");
}

/* Pass 2 (the graph keeps S, E or P): S_j again on tensor cores, then the kept stages' stores
 * from the final m and l. */
static void flash_pass2(flash_r *f) {
  sbuf *o = f->o;
  const cm_kattn *a = f->a;
  int sv = f->cS.s->stores[0].value, ev = f->cE.s->stores[0].value;
  flash_kb_head(f);
  flash_tiles(f, false);
  flash_scores(f);
  flash_frag_loop(o, FL_BC / 8);
  cu_sb_printf(o, "      if (j_ < bc_ && r_ < rb_) {\n      const float acc = s_[t_][h_];\n");
  cu_sb_printf(o, "      float sv_, ev_;\n      (void)sv_, (void)ev_;\n");
  f->cS.subst = NULL;
  cu_attn_point(&f->cS, f->p->nb, false, "      ", "row0_ + r_", "j0_ + j_", NULL);
  if (a->keep & CM_KATTN_KEEP_S)
    cu_emit_stores(&f->cS, "        ", "acc");
  else
    cu_emit_tree(&f->cS, sv, "        ", "acc");
  cu_sb_printf(o, "        sv_ = (float)(e%d);\n      }\n", sv);
  if (a->keep & (CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
    f->sub[a->buf_s] = f->s_load;
    f->sub[a->buf_m] = "m_[h_ >> 1]";
    f->cE.subst = f->sub;
    cu_attn_point(&f->cE, f->p->nb, false, "      ", "row0_ + r_", "j0_ + j_", NULL);
    if (a->keep & CM_KATTN_KEEP_E)
      cu_emit_stores(&f->cE, "        ", "acc");
    else
      cu_emit_tree(&f->cE, ev, "        ", "acc");
    cu_sb_printf(o, "        ev_ = (float)(e%d);\n      }\n", ev);
    f->sub[a->buf_s] = f->sub[a->buf_m] = NULL;
    if (f->has_p && (a->keep & CM_KATTN_KEEP_P)) {
      f->sub[a->buf_e] = "ev_";
      f->sub[a->buf_l] = "l_[h_ >> 1]";
      f->cP.subst = f->sub;
      cu_attn_point(&f->cP, f->p->nb, false, "      ", "row0_ + r_", "j0_ + j_", NULL);
      cu_emit_stores(&f->cP, "        ", "acc");
      cu_sb_printf(o, "      }\n");
      f->sub[a->buf_e] = f->sub[a->buf_l] = NULL;
    }
  }
  cu_sb_printf(o, "      }\n    }\n  }\n");
}

/* The block's head: shared tiles, indices, the batch vars, the Q tile and the running state. */
static void flash_head(flash_r *f) {
  sbuf *o = f->o;
  const cm_kcuda_attn *p = f->p;
  cu_sb_printf(o, "  __shared__ __align__(16) unsigned fq_[%d], fk_[%d], fv_[%d];\n", FL_BR * f->qw,
               FL_BC * f->qw, p->dvp * f->vw);
  cu_sb_printf(o, "  const long long blk_ = blockIdx.x;\n");
  cu_sb_printf(o, "  const long long bi_ = blk_ / %d, row0_ = (blk_ %% %d) * %d;\n", p->nrb, p->nrb,
               FL_BR);
  cu_sb_printf(o, "  const int rb_ = %lldLL - row0_ < %d ? (int)(%lldLL - row0_) : %d;\n",
               (long long)p->rows, FL_BR, (long long)p->rows, FL_BR);
  cu_sb_printf(o, "  const int tid_ = threadIdx.x, w_ = tid_ >> 5, g_ = (tid_ & 31) >> 2, qd_ = "
                  "tid_ & 3;\n");
  cu_sb_printf(o, "  const int D_ = %lld, DV_ = %lld;\n  (void)bi_;\n  {\n", (long long)p->d,
               (long long)p->dv);
  if (p->nb > 0) {
    cu_decompose(&f->cS, "  ", "bi_", 0, f->cS.s->dom, p->nb);
    for (int v = 0; v < p->nb; v++) cu_sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
  }
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < %d; p_ += %d) {\n", FL_BR * p->dp / 2, FL_THREADS);
  cu_sb_printf(o, "      const int r_ = p_ / %d, k_ = 2 * (p_ %% %d);\n", p->dp / 2, p->dp / 2);
  cu_sb_printf(o, "      float x0_ = 0.f, x1_ = 0.f;\n");
  int ga = f->cS.s->gemm_a;
  flash_value(f, &f->cS, false, ga, "r_ < rb_ && k_ < D_", "row0_ + r_", NULL, "k_", "x0_");
  flash_value(f, &f->cS, false, ga, "r_ < rb_ && k_ + 1 < D_", "row0_ + r_", NULL, "k_ + 1", "x1_");
  cu_sb_printf(o, "      fq_[r_ * %d + k_ / 2] = cm_pack16(cm_f2bf(x0_), cm_f2bf(x1_));\n  }\n",
               f->qw);
  cu_sb_printf(o, "  float m_[2] = {-CM_INFF, -CM_INFF}, l_[2] = {0.f, 0.f}, o_[%d][4];\n",
               p->dvp / 8);
  cu_sb_printf(o,
               "#pragma unroll\n  for (int t_ = 0; t_ < %d; t_++) o_[t_][0] = o_[t_][1] = "
               "o_[t_][2] = o_[t_][3] = 0.f;\n",
               p->dvp / 8);
}

/* The tail: l over the quad, O / l through the O stage's epilogue, the kept m and l. */
static void flash_tail(flash_r *f) {
  sbuf *o = f->o;
  const cm_kattn *a = f->a;
  cu_sb_printf(o, "#pragma unroll\n  for (int r2_ = 0; r2_ < 2; r2_++) {\n");
  cu_sb_printf(o, "    l_[r2_] += __shfl_xor_sync(0xffffffffu, l_[r2_], 1);\n");
  cu_sb_printf(o, "    l_[r2_] += __shfl_xor_sync(0xffffffffu, l_[r2_], 2);\n  }\n");
  flash_frag_loop(o, f->p->dvp / 8);
  cu_sb_printf(o, "      const int c_ = j_;\n");
  cu_sb_printf(o, "      if (r_ < rb_ && c_ < DV_) {\n      const float acc = o_[t_][h_] / "
                  "l_[h_ >> 1];\n");
  cu_attn_point(&f->cO, f->p->nb, false, "      ", "row0_ + r_", "c_", NULL);
  cu_emit_stores(&f->cO, "        ", "acc");
  cu_sb_printf(o, "      }\n      }\n    }\n");
  for (int r = 0; r < 2; r++) {
    if (!(a->keep & (r ? CM_KATTN_KEEP_L : CM_KATTN_KEEP_M))) continue;
    rctx *cr = r ? &f->cL : &f->cM;
    cr->subst = NULL;
    cu_sb_printf(o, "  for (int h2_ = 0; h2_ < 2; h2_++) {\n");
    cu_sb_printf(o, "    const int r_ = w_ * 16 + g_ + h2_ * 8;\n");
    cu_sb_printf(o, "    if (qd_ == 0 && r_ < rb_) {\n    const float acc = %s[h2_];\n",
                 r ? "l_" : "m_");
    cu_attn_point(cr, f->p->nb, true, "    ", "row0_ + r_", NULL, NULL);
    cu_emit_stores(cr, "      ", "acc");
    cu_sb_printf(o, "    }\n    }\n  }\n");
  }
}

static cm_status flash_open(flash_r *f, const cm_kernel *k, int first, sbuf *o, cm_err *err) {
  const cm_kattn *a = f->a;
  cm_status st = cu_rctx_open(&f->cS, k, first, o, err);
  if (st == CM_OK) st = cu_rctx_open(&f->cM, k, a->st_max, o, err);
  if (st == CM_OK) st = cu_rctx_open(&f->cE, k, a->st_exp, o, err);
  if (st == CM_OK) st = cu_rctx_open(&f->cL, k, a->st_sum, o, err);
  if (st == CM_OK) st = cu_rctx_open(&f->cO, k, a->st_out, o, err);
  if (st == CM_OK && f->has_p) st = cu_rctx_open(&f->cP, k, a->st_p, o, err);
  f->sub = calloc((size_t)k->n_buffers + 1, sizeof *f->sub);
  if (st == CM_OK && !f->sub)
    st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  return st;
}

static void flash_close(flash_r *f) {
  free(f->sub);
  cu_rctx_close(&f->cS), cu_rctx_close(&f->cM), cu_rctx_close(&f->cE), cu_rctx_close(&f->cL),
      cu_rctx_close(&f->cO);
  if (f->has_p) cu_rctx_close(&f->cP);
}

cm_status cu_render_flash(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                          sbuf *o, const bool *written, cm_err *err) {
  flash_r f;
  memset(&f, 0, sizeof f);
  f.k = k, f.a = &k->stages[first].attn, f.p = p, f.o = o;
  f.has_p = f.a->st_p >= 0;
  f.qw = p->dp / 2 + 4, f.vw = FL_BC / 2 + 4;
  f.s_load = k->buffers[f.a->buf_s].dtype == CM_BF16 ? "cm_f2bf(sv_)" : "sv_";
  cm_status st = flash_open(&f, k, first, o, err);
  if (st == CM_OK) {
    cu_sb_printf(o,
                 "// stages %d..%d (attention forward, flash: mma.sync bf16, %d query rows x %d "
                 "keys per step, %d key blocks)\n",
                 first, first + f.a->span - 1, FL_BR, FL_BC, p->nkb);
    char bounds[64];
    cu_launch_bounds(FL_THREADS, min_blocks, bounds, sizeof bounds);
    cu_signature(&f.cS, written, bounds);
    flash_head(&f);
    flash_pass1(&f);
    flash_tail(&f);
    if (f.a->keep & (CM_KATTN_KEEP_S | CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) flash_pass2(&f);
    cu_sb_printf(o, "  }\n}\n\n");
    rctx *cs[6] = {&f.cS, &f.cM, &f.cE, &f.cL, &f.cO, &f.cP};
    for (int i = 0; i < (f.has_p ? 6 : 5) && st == CM_OK; i++) st = cs[i]->st;
  }
  flash_close(&f);
  if (st == CM_OK) st = cu_span_stubs(k, first, f.a->span, o, written, err);
  return st;
}
