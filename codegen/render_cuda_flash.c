/* codegen/render_cuda_flash.c — flash attention forward and backward on tensor cores
 * (render_cuda.h; the backward below, after the forward).
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

/* The defaults of the plan's tunables (cm_kcuda_attn: br = 16 rows a warp, bc, threads) */
#define FL_WARPS 4   /* query rows per block: 4 warps x 16 */
#define FL_BC 64     /* keys per step */
#define FL_MAX_D 128 /* the S and O fragments stay in registers */
#define FL_REGS 255  /* a thread's registers at the launch bounds' blocks (cu_flash_min_blocks) */

static int64_t up_to(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

static bool expr_is_bf16(const cm_kstage *s, int e) {
  return e >= 0 && e < s->n_exprs && s->exprs[e].dtype == CM_BF16;
}

static int64_t flash_bytes(const cm_kcuda_attn *p) {
  return 2 * ((int64_t)(p->br + p->bc) * (p->dp + 8) + (int64_t)p->dvp * (p->bc + 8));
}

/* The registers a thread's fragments take: S (bc / 8 tiles of 4), O (dvp / 8 of 4), the
 * running m, l and the operand fragments, with 40 for addresses and loop state. */
static int flash_regs(const cm_kcuda_attn *p) {
  return p->bc / 2 + p->dvp / 2 + 40;
}

int cu_flash_min_blocks(const cm_target *t, int threads) {
  int b = t->regs_per_sm / (threads * (FL_REGS + 1));
  return b < 1 ? 1 : b;
}

/* p's tiles of `warps` x 16 query rows and bc keys: the derived fields, or why they make no
 * flash function for t (NULL: they do). */
static const char *flash_fit(cm_kcuda_attn *p, const cm_target *t, int warps, int bc) {
  if (warps < 1 || warps > 16 || bc < 16 || bc % 16 || bc > 256)
    return "1..16 warps and a key block of 16..256 keys, a multiple of 16";
  p->br = 16 * warps, p->bc = bc, p->threads = 32 * warps;
  if (p->threads > t->max_threads_per_block) return "more threads than a block takes";
  p->nrb = (int)((p->rows + p->br - 1) / p->br);
  p->nkb = (int)((p->keys + p->bc - 1) / p->bc);
  p->kvn = flash_bytes(p); /* flash: the bytes of shared memory */
  if (p->kvn > t->shared_bytes_static) return "over the static shared memory of a block";
  if (flash_regs(p) > FL_REGS) return "fragments over a thread's 255 registers (spills)";
  if ((double)p->batch * p->nrb > 2147483647.0) return "more blocks than a grid takes";
  return NULL;
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
  if (flash_fit(&p, t, FL_WARPS, FL_BC)) return false;
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
  cu_sb_printf(o, "    for (int p_ = tid_; p_ < %d; p_ += %d) {\n", p->bc * p->dp / 2, p->threads);
  cu_sb_printf(o, "      const int j_ = p_ / %d, k_ = 2 * (p_ %% %d);\n", p->dp / 2, p->dp / 2);
  cu_sb_printf(o, "      float x0_ = 0.f, x1_ = 0.f;\n");
  int gb = f->cS.s->gemm_b;
  flash_value(f, &f->cS, false, gb, "j_ < bc_ && k_ < D_", "0", "j0_ + j_", "k_", "x0_");
  flash_value(f, &f->cS, false, gb, "j_ < bc_ && k_ + 1 < D_", "0", "j0_ + j_", "k_ + 1", "x1_");
  cu_sb_printf(o, "      fk_[j_ * %d + k_ / 2] = cm_pack16(cm_f2bf(x0_), cm_f2bf(x1_));\n    }\n",
               f->qw);
  if (with_v) {
    int vb = f->cO.s->gemm_b;
    cu_sb_printf(o, "    for (int p_ = tid_; p_ < %d; p_ += %d) {\n", p->dvp * p->bc / 2,
                 p->threads);
    cu_sb_printf(o, "      const int c_ = p_ / %d, j_ = 2 * (p_ %% %d);\n", p->bc / 2, p->bc / 2);
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
  cu_sb_printf(o, "    float s_[%d][4];\n", f->p->bc / 8);
  cu_sb_printf(o,
               "#pragma unroll\n    for (int t_ = 0; t_ < %d; t_++) s_[t_][0] = s_[t_][1] = "
               "s_[t_][2] = s_[t_][3] = 0.f;\n",
               f->p->bc / 8);
  cu_sb_printf(o, "#pragma unroll\n    for (int kk_ = 0; kk_ < %d; kk_++) {\n", f->p->dp / 16);
  cu_sb_printf(o, "      const int qa_ = (w_ * 16 + g_) * %d + kk_ * 8 + qd_;\n", f->qw);
  cu_sb_printf(
      o, "      const unsigned a_[4] = {fq_[qa_], fq_[qa_ + %d], fq_[qa_ + 4], fq_[qa_ + %d]};\n",
      8 * f->qw, 8 * f->qw + 4);
  cu_sb_printf(o, "#pragma unroll\n      for (int t_ = 0; t_ < %d; t_++) {\n", f->p->bc / 8);
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
  int bc = f->p->bc;
  cu_sb_printf(f->o, "    const long long j0_ = (long long)kb_ * %d;\n", bc);
  cu_sb_printf(f->o, "    const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
               (long long)f->p->keys, bc, (long long)f->p->keys, bc);
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
  flash_frag_loop(o, f->p->bc / 8);
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
  flash_frag_loop(o, f->p->bc / 8);
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
  cu_sb_printf(o, "#pragma unroll\n    for (int kk_ = 0; kk_ < %d; kk_++) {\n", f->p->bc / 16);
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
  flash_frag_loop(o, f->p->bc / 8);
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
  cu_sb_printf(o, "  __shared__ __align__(16) unsigned fq_[%d], fk_[%d], fv_[%d];\n", p->br * f->qw,
               p->bc * f->qw, p->dvp * f->vw);
  cu_sb_printf(o, "  const long long blk_ = blockIdx.x;\n");
  cu_sb_printf(o, "  const long long bi_ = blk_ / %d, row0_ = (blk_ %% %d) * %d;\n", p->nrb, p->nrb,
               p->br);
  cu_sb_printf(o, "  const int rb_ = %lldLL - row0_ < %d ? (int)(%lldLL - row0_) : %d;\n",
               (long long)p->rows, p->br, (long long)p->rows, p->br);
  cu_sb_printf(o, "  const int tid_ = threadIdx.x, w_ = tid_ >> 5, g_ = (tid_ & 31) >> 2, qd_ = "
                  "tid_ & 3;\n");
  cu_sb_printf(o, "  const int D_ = %lld, DV_ = %lld;\n  (void)bi_;\n  {\n", (long long)p->d,
               (long long)p->dv);
  if (p->nb > 0) {
    cu_decompose(&f->cS, "  ", "bi_", 0, f->cS.s->dom, p->nb);
    for (int v = 0; v < p->nb; v++) cu_sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
  }
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < %d; p_ += %d) {\n", p->br * p->dp / 2, p->threads);
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
  f.qw = p->dp / 2 + 4, f.vw = p->bc / 2 + 4;
  f.s_load = k->buffers[f.a->buf_s].dtype == CM_BF16 ? "cm_f2bf(sv_)" : "sv_";
  cm_status st = flash_open(&f, k, first, o, err);
  if (st == CM_OK) {
    cu_sb_printf(o,
                 "// stages %d..%d (attention forward, flash: mma.sync bf16, %d query rows x %d "
                 "keys per step, %d key blocks)\n",
                 first, first + f.a->span - 1, p->br, p->bc, p->nkb);
    char bounds[64];
    cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
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

/* ---- flash attention backward on tensor cores ------------------------------------------
 *
 * A backward span (CM_KT_ATTENTION_BWD) whose stages are, over the query row i, the key j and
 * the batch item: tiles (i, j) that are GEMMs on bf16 operands (S' = Q K^T, dP = dO V^T) or
 * elementwise (E', P', dS, casts), row reductions over j (autodiff's rowsum(dP o P) when the
 * rewrite kept it: then two passes), GEMMs over query rows reducing over j (dQ = dS K) and
 * GEMMs over keys reducing over i (dK = dS^T Q, dV = P^T dO), all of them on bf16 operands.
 * The classification below is this file's own (fb_layout_of): it proves every access to a
 * local buffer canonical (cm_kaff_of), so it needs no lowering roles. One block per batch
 * item, fb_warps warps, warp w owning the 16-row m-tiles w, w + warps, ... of all the query
 * rows. Once per block the row-side operands (Q, dO: each distinct expression once) go to
 * shared memory as bf16; per key block of 64: the key-side operands (K, V), the tile GEMMs on
 * mma.sync m16n8k16 into f32 fragments, the elementwise stages on the fragments, the GEMM over
 * rows accumulated in registers with the tile as the A fragment, the tiles of the GEMMs over
 * keys written to shared memory (bf16) and, after a barrier, those GEMMs on mma.sync over all
 * rows (ldmatrix.trans) through their epilogues. No atomics, no N x N value in global memory. */

#define FB_BC 64        /* the default key block (fb_layout.bc) */
#define FB_MAX_ROWS 256 /* 16 m-tiles: at most 2 per warp of 8 */
#define FB_MAX_W 128    /* head dims: the fragments stay in registers */
#define FB_PAD 8        /* bf16 elements of padding per shared row: ldmatrix without conflicts */

enum { FB_NONE = 0, FB_TILE_EW, FB_TILE_GEMM, FB_ROWRED, FB_ROWS, FB_KEYS };

/* An operand staged in shared memory: its (stage, expression), the stage vars that index its
 * outer axis (query row or key) and its width axis, and its widths. */
typedef struct fb_slot {
  int stage, expr, outer_var, x_var;
  int64_t w; /* the real width */
  int wp;    /* padded to 16 (32 beyond 32) */
  int64_t off;
} fb_slot;

typedef struct fb_layout {
  int nb, span, n_tiles_local;
  int64_t rows, keys, batch;
  int rp, mtiles, warps, mt; /* rows padded to 16, m-tiles, warps, m-tiles per warp */
  int bc, nkb;               /* keys per block (a multiple of 16), key blocks */
  int kind[CM_KATTN_MAX_SPAN];
  int tile_op[CM_KATTN_MAX_SPAN], side_op[CM_KATTN_MAX_SPAN]; /* ROWS/KEYS operands */
  int rslot[CM_KATTN_MAX_SPAN], kslot[CM_KATTN_MAX_SPAN];     /* TILE_GEMM: A, B; KEYS: B;
                                                                 ROWS: B */
  int64_t tile_off[CM_KATTN_MAX_SPAN];                        /* KEYS: its tile [rp][64] */
  int cw[CM_KATTN_MAX_SPAN];                                  /* ROWS/KEYS: padded output width */
  bool dep[CM_KATTN_MAX_SPAN]; /* a tile stage reading a row reduction (pass 2 only) */
  bool two_pass;
  bool stat_local[CM_KATTN_MAX_LOCAL]; /* written by a row reduction (else a tile) */
  fb_slot rs[2 * CM_KATTN_MAX_SPAN], ks[2 * CM_KATTN_MAX_SPAN];
  int n_rs, n_ks;
  int64_t bytes;
} fb_layout;

static int fb_local(const cm_kattn *a, int buf) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == buf) return i;
  return -1;
}

/* The batch vars of a span stage (a row statistic may be [batch, rows] or [batch, rows, 1]). */
static int fb_stage_nb(const cm_kstage *s, bool stat) {
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) return s->n_dom - 1;
  return s->n_dom - 2;
}

/* Whether index e of stage s is (B * rows + v{rv}) * X + v{cv} (cv < 0: X == 1), B the linear
 * batch index over the stage's first nb vars; vars of extent 1 are 0. */
static bool fb_canon(const cm_kstage *s, int e, int nb, int64_t rows, int rv, int cv, int64_t X) {
  cm_kaff af;
  int budget = 4096;
  if (!cm_kaff_of(s, e, &af, &budget) || af.c0 != 0) return false;
  int64_t want[CM_KMAX_VARS] = {0}, st = rows * X;
  for (int v = nb - 1; v >= 0; v--) want[v] = st, st *= s->dom[v];
  want[rv] += X;
  if (cv >= 0) want[cv] += 1;
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    int64_t ext = v < s->n_dom ? s->dom[v] : s->red[v - s->n_dom];
    if (ext > 1 && af.c[v] != want[v]) return false;
  }
  return true;
}

/* Marks in reach[] the cone of expression root. */
static void fb_cone(const cm_kstage *s, int root, bool *reach) {
  memset(reach, 0, (size_t)s->n_exprs * sizeof *reach);
  if (root < 0 || root >= s->n_exprs) return;
  reach[root] = true;
  for (int e = root; e >= 0; e--) {
    if (!reach[e]) continue;
    const cm_kexpr *x = &s->exprs[e];
    int ops[3] = {x->a, x->b, x->c};
    for (int i = 0; i < 3; i++)
      if (ops[i] >= 0 && ops[i] < e) reach[ops[i]] = true;
  }
}

/* Whether the cone of root loads a local buffer. */
static bool fb_cone_local(const cm_kattn *a, const cm_kstage *s, int root, bool *reach) {
  if (root < 0) return false;
  fb_cone(s, root, reach);
  for (int e = 0; e <= root && e < s->n_exprs; e++)
    if (reach[e] && s->exprs[e].kind == CM_KX_LOAD && fb_local(a, s->exprs[e].buf) >= 0)
      return true;
  return false;
}

/* Every load of a local buffer in the cone of root (root < 0: the whole stage) reads its own
 * dtype at the canonical index with row var rv and key var cv (a row statistic: rv only); row
 * statistics only where stats. */
static bool fb_loads_ok(const cm_kernel *k, const cm_kattn *a, const cm_kstage *s, int root, int rv,
                        int cv, bool stats, bool *reach) {
  if (root >= 0) fb_cone(s, root, reach);
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    int li = x->kind == CM_KX_LOAD ? fb_local(a, x->buf) : -1;
    if (li < 0 || (root >= 0 && (e > root || !reach[e]))) continue;
    int64_t X = a->local_row[li];
    if (x->dtype != k->buffers[x->buf].dtype || (X == 1 && !stats) ||
        !fb_canon(s, x->a, a->nb, a->rows, rv, X == 1 ? -1 : cv, X))
      return false;
  }
  return true;
}

/* A GEMM on tensor cores: sum over one k of gemm_a * gemm_b (each bf16, perhaps widened to
 * f32: exact), accumulated in f32. */
static bool fb_mma_ok(const cm_kstage *s) {
  if ((s->tmpl != CM_KT_GEMM && s->tmpl != CM_KT_ATTENTION_BWD) || s->n_red != 1 ||
      s->red_op != CM_KRED_SUM || s->acc_dtype != CM_F32 || s->accumulate || s->gemm_a < 0 ||
      s->gemm_b < 0 || s->gemm_a >= s->n_exprs || s->gemm_b >= s->n_exprs || s->body < 0 ||
      s->body >= s->n_exprs)
    return false;
  const cm_kexpr *b = &s->exprs[s->body];
  return b->kind == CM_KX_OP && b->op == CM_OP_MUL && cm_kx_is_gemm_factor(s, b->a, s->gemm_a) &&
         cm_kx_is_gemm_factor(s, b->b, s->gemm_b) && expr_is_bf16(s, s->gemm_a) &&
         expr_is_bf16(s, s->gemm_b);
}

/* The one store of s is into a local buffer of X elements per row (f32 or bf16, from an f32
 * or bf16 value) at the canonical index (key var cv); returns the local or -1. */
static int fb_local_store(const cm_kernel *k, const cm_kattn *a, const cm_kstage *s, int cv,
                          int64_t X) {
  if (s->n_stores != 1 || s->accumulate) return -1;
  const cm_kstore *st = &s->stores[0];
  int li = fb_local(a, st->buf);
  cm_dtype bd = li >= 0 ? k->buffers[st->buf].dtype : CM_F64;
  cm_dtype vd = st->value >= 0 && st->value < s->n_exprs ? s->exprs[st->value].dtype : CM_F64;
  if (li < 0 || a->local_row[li] != X || (bd != CM_F32 && bd != CM_BF16) ||
      (vd != CM_F32 && vd != CM_BF16) || !fb_canon(s, st->index, a->nb, a->rows, a->nb, cv, X))
    return -1;
  return li;
}

static bool fb_vars_within(const cm_kstage *s, int e, int nb, int va, int vb) {
  uint32_t allowed = (nb > 0 ? (1u << nb) - 1u : 0u) | (1u << va) | (1u << vb);
  return (cm_kx_vars_used(s, e) & ~allowed) == 0;
}

/* The canonical name of var v of an operand slot: batch vars themselves, outer 100, x 101. */
static int fb_slot_var(int v, const fb_slot *sl, int nb) {
  return v < nb ? v : v == sl->outer_var ? 100 : v == sl->x_var ? 101 : -1;
}

/* Whether two operand expressions compute the same value at every (batch, outer, x). */
static bool fb_same(const cm_kstage *s1, int e1, const fb_slot *m1, const cm_kstage *s2, int e2,
                    const fb_slot *m2, int nb, int *budget) {
  if (--*budget < 0 || e1 < 0 || e2 < 0 || e1 >= s1->n_exprs || e2 >= s2->n_exprs) return false;
  const cm_kexpr *x = &s1->exprs[e1], *y = &s2->exprs[e2];
  if (x->kind != y->kind || x->dtype != y->dtype) return false;
  switch (x->kind) {
  case CM_KX_CONST: return x->value == y->value;
  case CM_KX_VAR: {
    int a = fb_slot_var(x->var, m1, nb);
    return a >= 0 && a == fb_slot_var(y->var, m2, nb);
  }
  case CM_KX_LOAD: return x->buf == y->buf && fb_same(s1, x->a, m1, s2, y->a, m2, nb, budget);
  case CM_KX_OP:
  case CM_KX_MOD: {
    if (x->kind == CM_KX_OP && x->op != y->op) return false;
    int xa[3] = {x->a, x->b, x->c}, ya[3] = {y->a, y->b, y->c};
    for (int i = 0; i < 3; i++) {
      if ((xa[i] < 0) != (ya[i] < 0)) return false;
      if (xa[i] >= 0 && !fb_same(s1, xa[i], m1, s2, ya[i], m2, nb, budget)) return false;
    }
    return true;
  }
  default: return false;
  }
}

/* The slot holding operand (stage, expr) over (outer_var, x_var) of width w in slots[], added
 * when no slot holds the same values; -1 when full. */
static int fb_add_slot(const cm_kernel *k, fb_slot *slots, int *n, int nb, int stage, int expr,
                       int outer_var, int x_var, int64_t w) {
  fb_slot sl = {stage, expr, outer_var, x_var, w, w <= 16 ? 16 : (int)up_to(w, 32), 0};
  for (int i = 0; i < *n; i++) {
    int budget = 4096;
    if (slots[i].w == w && fb_same(&k->stages[stage], expr, &sl, &k->stages[slots[i].stage],
                                   slots[i].expr, &slots[i], nb, &budget))
      return i;
  }
  if (*n >= 2 * CM_KATTN_MAX_SPAN) return -1;
  slots[*n] = sl;
  return (*n)++;
}

/* Stage r of the span as a GEMM over query rows (ROWS: [batch, i, c] reducing over the keys) or
 * over keys (KEYS: [batch, j, c] reducing over the rows): which operand is the tile (read at
 * (i, j) in the fragment loop) and which the side operand (staged in shared memory). */
static int fb_gemm_role(const cm_kernel *k, const cm_kattn *a, const cm_kstage *s, int64_t keys,
                        fb_layout *L, int r, bool *reach) {
  int nb = a->nb, nd = s->n_dom;
  if (!fb_mma_ok(s) || nd != nb + 2 || s->dom[nb + 1] > FB_MAX_W) return FB_NONE;
  for (int i = 0; i < s->n_stores; i++)
    if (fb_local(a, s->stores[i].buf) >= 0 || fb_cone_local(a, s, s->stores[i].value, reach) ||
        fb_cone_local(a, s, s->stores[i].index, reach))
      return FB_NONE;
  for (int role = FB_ROWS; role <= FB_KEYS; role++) {
    int64_t out = role == FB_ROWS ? a->rows : keys, red = role == FB_ROWS ? keys : a->rows;
    if (s->dom[nb] != out || s->red[0] != red) continue;
    for (int pick = 0; pick < 2; pick++) {
      int tile = pick ? s->gemm_b : s->gemm_a, side = pick ? s->gemm_a : s->gemm_b;
      /* the tile at (i, j) reads no c; the side operand no i (ROWS) or j (KEYS) */
      if (!fb_vars_within(s, tile, nb, nb, nd) || !fb_vars_within(s, side, nb, nd, nb + 1) ||
          fb_cone_local(a, s, side, reach))
        continue;
      int rv = role == FB_ROWS ? nb : nd, cv = role == FB_ROWS ? nd : nb;
      if (!fb_loads_ok(k, a, s, tile, rv, cv, true, reach)) continue;
      L->tile_op[r] = tile, L->side_op[r] = side;
      return role;
    }
  }
  return FB_NONE;
}

/* The kind of stage r (FB_NONE: the span is not one this template renders). */
static int fb_stage_kind(const cm_kernel *k, const cm_kattn *a, int first, int64_t keys,
                         fb_layout *L, int r, bool *reach) {
  const cm_kstage *s = &k->stages[first + r];
  int nb = a->nb, nd = s->n_dom;
  bool tile_dom = nd == nb + 2 && s->dom[nb] == a->rows && s->dom[nb + 1] == keys;
  if (s->n_red == 1 && s->tmpl == CM_KT_NONE && s->red[0] == keys && fb_stage_nb(s, true) == nb &&
      s->dom[nb] == a->rows) {
    /* a row reduction over the keys into a local row statistic */
    if (s->acc_dtype != CM_F32 || fb_local_store(k, a, s, -1, 1) < 0 ||
        fb_cone_local(a, s, s->stores[0].value, reach) ||
        !fb_loads_ok(k, a, s, s->body, nb, nd, false, reach))
      return FB_NONE;
    return FB_ROWRED;
  }
  if (s->n_red == 0 && tile_dom) {
    if (fb_local_store(k, a, s, nb + 1, keys) < 0 ||
        !fb_loads_ok(k, a, s, -1, nb, nb + 1, true, reach))
      return FB_NONE;
    return FB_TILE_EW;
  }
  if (s->n_red == 1 && tile_dom && s->n_stores == 1 && fb_local(a, s->stores[0].buf) >= 0) {
    if (!fb_mma_ok(s) || s->red[0] > FB_MAX_W || fb_local_store(k, a, s, nb + 1, keys) < 0 ||
        !fb_vars_within(s, s->gemm_a, nb, nb, nd) ||
        !fb_vars_within(s, s->gemm_b, nb, nb + 1, nd) || fb_cone_local(a, s, s->gemm_a, reach) ||
        fb_cone_local(a, s, s->gemm_b, reach) || fb_cone_local(a, s, s->stores[0].index, reach) ||
        !fb_loads_ok(k, a, s, s->stores[0].value, nb, nb + 1, true, reach))
      return FB_NONE;
    return FB_TILE_GEMM;
  }
  if (s->n_red == 1) return fb_gemm_role(k, a, s, keys, L, r, reach);
  return FB_NONE;
}

/* Tiles that read a row reduction's result (directly or through another tile) wait for the
 * second pass; a row reduction reading one is no span of this template. */
static bool fb_deps(const cm_kernel *k, const cm_kattn *a, int first, fb_layout *L) {
  bool dep_local[CM_KATTN_MAX_LOCAL] = {false};
  for (int r = 0; r < L->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    bool dep = false;
    for (int e = 0; e < s->n_exprs; e++) {
      int li = s->exprs[e].kind == CM_KX_LOAD ? fb_local(a, s->exprs[e].buf) : -1;
      if (li >= 0 && (L->stat_local[li] || dep_local[li])) dep = true;
    }
    if (L->kind[r] == FB_ROWRED && dep) return false;
    if (L->kind[r] == FB_TILE_EW || L->kind[r] == FB_TILE_GEMM) {
      L->dep[r] = dep;
      if (dep) dep_local[fb_local(a, s->stores[0].buf)] = true;
    }
  }
  return true;
}

/* No stage of the span reads a buffer that is not local and that the span writes. */
static bool fb_no_readback(const cm_kernel *k, const cm_kattn *a, int first) {
  for (int r = 0; r < a->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    for (int e = 0; e < s->n_exprs; e++) {
      if (s->exprs[e].kind != CM_KX_LOAD || fb_local(a, s->exprs[e].buf) >= 0) continue;
      for (int w = 0; w < a->span; w++) {
        const cm_kstage *t = &k->stages[first + w];
        for (int i = 0; i < t->n_stores; i++)
          if (t->stores[i].buf == s->exprs[e].buf) return false;
      }
    }
  }
  return true;
}

/* The slots every GEMM stage reads and the bytes of shared memory: the row-side operands
 * [rp][wp + pad], the key-side operands [64][wp + pad], the KEYS stages' tiles [rp][64 + pad]. */
static bool fb_slots(const cm_kernel *k, int first, fb_layout *L) {
  int nb = L->nb;
  for (int r = 0; r < L->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    int nd = s->n_dom, si = first + r;
    L->rslot[r] = L->kslot[r] = -1;
    if (L->kind[r] == FB_TILE_GEMM) {
      L->rslot[r] = fb_add_slot(k, L->rs, &L->n_rs, nb, si, s->gemm_a, nb, nd, s->red[0]);
      L->kslot[r] = fb_add_slot(k, L->ks, &L->n_ks, nb, si, s->gemm_b, nb + 1, nd, s->red[0]);
      if (L->rslot[r] < 0 || L->kslot[r] < 0) return false;
    } else if (L->kind[r] == FB_ROWS || L->kind[r] == FB_KEYS) {
      bool rows = L->kind[r] == FB_ROWS;
      fb_slot *sl = rows ? L->ks : L->rs;
      int *n = rows ? &L->n_ks : &L->n_rs;
      int x = fb_add_slot(k, sl, n, nb, si, L->side_op[r], nd, nb + 1, s->dom[nb + 1]);
      if (x < 0) return false;
      if (rows)
        L->kslot[r] = x;
      else
        L->rslot[r] = x;
      L->cw[r] = sl[x].wp;
    }
  }
  int64_t off = 0;
  for (int i = 0; i < L->n_rs; i++) L->rs[i].off = off, off += 2LL * L->rp * (L->rs[i].wp + FB_PAD);
  for (int i = 0; i < L->n_ks; i++) L->ks[i].off = off, off += 2LL * L->bc * (L->ks[i].wp + FB_PAD);
  for (int r = 0; r < L->span; r++)
    if (L->kind[r] == FB_KEYS) L->tile_off[r] = off, off += 2LL * L->rp * (L->bc + FB_PAD);
  L->bytes = off;
  return true;
}

/* The flash backward layout of the span at first in blocks of `warps` warps (0: 4 up to 4
 * m-tiles, else 8) and key blocks of bc keys (0: FB_BC), or false when it is none. */
static bool fb_layout_of(const cm_kernel *k, int first, const cm_target *t, int warps, int bc,
                         fb_layout *L) {
  memset(L, 0, sizeof *L);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (!t->mma_bf16 || s0->tmpl != CM_KT_ATTENTION_BWD) return false;
  cm_err e = {0};
  if (cm_kattn_check(k, first, &e) != CM_OK || a->br < a->rows || a->span < 2 ||
      a->span > CM_KATTN_MAX_SPAN || a->nb < 0 || s0->n_dom != a->nb + 2 ||
      s0->dom[a->nb] != a->rows || a->rows < 1 || a->rows > FB_MAX_ROWS)
    return false;
  L->nb = a->nb, L->span = a->span, L->rows = a->rows, L->keys = s0->dom[a->nb + 1];
  L->batch = cu_prod(s0->dom, a->nb);
  if (L->keys < 1 || (double)L->batch > 2147483647.0) return false;
  for (int i = 0; i < a->n_local; i++)
    if (a->local_row[i] != L->keys && a->local_row[i] != 1) return false;
  int max_exprs = 1;
  for (int r = 0; r < a->span; r++)
    if (k->stages[first + r].n_exprs > max_exprs) max_exprs = k->stages[first + r].n_exprs;
  bool *reach = calloc((size_t)max_exprs, sizeof *reach);
  bool ok = reach != NULL, gemms = false;
  for (int r = 0; ok && r < a->span; r++) {
    L->kind[r] = fb_stage_kind(k, a, first, L->keys, L, r, reach);
    ok = L->kind[r] != FB_NONE;
    L->two_pass |= L->kind[r] == FB_ROWRED;
    gemms |= L->kind[r] == FB_ROWS || L->kind[r] == FB_KEYS;
  }
  free(reach);
  for (int r = 0; ok && r < a->span; r++)
    if (L->kind[r] == FB_ROWRED)
      L->stat_local[fb_local(a, k->stages[first + r].stores[0].buf)] = true;
  if (!ok || !gemms || !fb_deps(k, a, first, L) || !fb_no_readback(k, a, first)) return false;
  L->rp = (int)up_to(L->rows, 16);
  L->mtiles = L->rp / 16;
  L->warps = warps > 0 ? warps : L->mtiles <= 4 ? 4 : 8;
  L->mt = (L->mtiles + L->warps - 1) / L->warps;
  L->bc = bc > 0 ? bc : FB_BC;
  if (L->bc % 16 || L->warps > 32) return false;
  L->nkb = (int)((L->keys + L->bc - 1) / L->bc);
  return fb_slots(k, first, L) && L->bytes <= t->shared_bytes_max;
}

bool cu_plan_flash_bwd(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out) {
  fb_layout L;
  if (!fb_layout_of(k, first, t, 0, 0, &L)) return false;
  memset(out, 0, sizeof *out);
  out->span = L.span, out->nb = L.nb, out->rows = L.rows, out->batch = L.batch;
  out->keys = L.keys, out->bc = L.bc, out->nkb = L.nkb;
  out->br = L.rp, out->nrb = 1;
  out->threads = 32 * L.warps;
  out->kvn = L.bytes; /* flash: the bytes of shared memory (dynamic) */
  out->dyn_shared = true;
  out->mma = true;
  out->bwd_two_pass = L.two_pass;
  return true;
}

/* The registers a thread of the backward takes, estimated from its fragments: the tile GEMMs'
 * (bc / 8 tiles of 4), per owned m-tile the GEMMs over rows' sums and the row reductions'
 * values, the tile packed as A fragments, with 40 for addresses and loop state. */
static int fb_regs(const fb_layout *L) {
  int regs = 40;
  for (int r = 0; r < L->span; r++) {
    if (L->kind[r] == FB_TILE_GEMM) regs += L->bc / 2;
    if (L->kind[r] == FB_ROWS) regs += L->mt * L->cw[r] / 2 + L->bc / 4;
    if (L->kind[r] == FB_ROWRED) regs += 4 * L->mt;
  }
  return regs;
}

static cm_status flash_bwd_refit(cm_kernel *k, int first, const cm_target *t, int warps, int bc,
                                 cm_err *err) {
  cm_kcuda_plan *p = &k->stages[first].cuda;
  cm_target roomy = *t;
  roomy.shared_bytes_max = INT64_MAX;
  fb_layout L;
  if (warps < 1 || warps > 32 || !fb_layout_of(k, first, &roomy, warps, bc, &L))
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: flash backward warps=%d bc=%d: no layout (1..32 warps, "
                     "bc a multiple of 16)",
                     k->name, first, warps, bc);
  if (32 * warps > t->max_threads_per_block)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: flash backward warps=%d: over %d "
                     "threads a block",
                     k->name, first, warps, t->max_threads_per_block);
  if (L.bytes > t->shared_bytes_max)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: flash backward warps=%d bc=%d: %lld B of shared memory "
                     "over the device's opt-in %lld B",
                     k->name, first, warps, bc, (long long)L.bytes, (long long)t->shared_bytes_max);
  if (fb_regs(&L) > FL_REGS)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: flash backward warps=%d bc=%d: about %d registers a "
                     "thread (%d m-tiles a warp) over %d (spills)",
                     k->name, first, warps, bc, fb_regs(&L), L.mt, FL_REGS);
  p->attn.bc = L.bc, p->attn.nkb = L.nkb, p->attn.threads = 32 * L.warps, p->attn.kvn = L.bytes;
  p->block[0] = (unsigned)p->attn.threads;
  p->shared_static = 0, p->shared_dynamic = (unsigned)L.bytes;
  p->min_blocks = 1;
  return CM_OK;
}

cm_status cu_flash_refit(cm_kernel *k, int first, const cm_target *t, int warps, int bc,
                         cm_err *err) {
  cm_kcuda_plan *p = &k->stages[first].cuda;
  if (p->attn.threads == 32 * warps && p->attn.bc == bc) return CM_OK; /* the plan as it is */
  if (p->kind == CM_KCUDA_ATTN_FLASH_BWD) return flash_bwd_refit(k, first, t, warps, bc, err);
  if (p->kind != CM_KCUDA_ATTN_FLASH)
    return cm_errorf(err, CM_EINVALID, "kernel %s stage %d: not a flash attention plan", k->name,
                     first);
  cm_kcuda_attn a = p->attn;
  const char *why = flash_fit(&a, t, warps, bc);
  if (why)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: flash attention warps=%d bc=%d (%lld B of shared "
                     "memory, about %d registers a thread): %s",
                     k->name, first, warps, bc, (long long)flash_bytes(&a), flash_regs(&a), why);
  p->attn = a;
  p->grid[0] = (unsigned)(a.batch * a.nrb);
  p->block[0] = (unsigned)a.threads;
  p->shared_static = a.kvn, p->shared_dynamic = 0;
  p->min_blocks = cu_flash_min_blocks(t, a.threads);
  return CM_OK;
}

/* ---- the flash backward's rendering ---- */

typedef struct fbw_r {
  const cm_kernel *k;
  const cm_kattn *a;
  const fb_layout *L;
  int first;
  sbuf *o;
  rctx c[CM_KATTN_MAX_SPAN];
  const char **sub;
  char names[CM_KATTN_MAX_LOCAL][48];
} fbw_r;

/* A point of stage c->s with var va = xa and vb = xb (each the row, col or reduction var of
 * cu_attn_point; the others 0). */
static void fb_point(rctx *c, int nb, const char *ind, int va, const char *xa, int vb,
                     const char *xb) {
  const char *v3[3] = {"0", "0", "0"};
  int n = c->s->n_dom, vs[2] = {va, vb};
  const char *xs[2] = {xa, xb};
  for (int i = 0; i < 2; i++) {
    int at = vs[i] == nb ? 0 : vs[i] == nb + 1 ? 1 : vs[i] == n ? 2 : -1;
    if (at >= 0) v3[at] = xs[i];
  }
  cu_attn_point(c, nb, false, ind, v3[0], v3[1], v3[2]);
}

/* dst = expression e of stage c->s converted to dtype bd's memory form (f32 or bf16 bits). */
static void fb_assign(sbuf *o, const cm_kstage *s, int e, cm_dtype bd, const char *ind,
                      const char *dst) {
  char v[32], cv[256];
  snprintf(v, sizeof v, "e%d", e);
  cu_cast_code(cv, sizeof cv, s->exprs[e].dtype, bd, v);
  if (bd == CM_BF16)
    cu_sb_printf(o, "%s%s = cm_f2bf(%s);\n", ind, dst, cv);
  else
    cu_sb_printf(o, "%s%s = %s;\n", ind, dst, cv);
}

/* Stages slot sl (rows: once per block; else the key block's) as bf16 pairs along its width,
 * zero beyond the rows or keys and the width. */
static void fb_stage_slot(fbw_r *f, const fb_slot *sl, int idx, bool rows) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  rctx *c = &f->c[sl->stage - f->first];
  int half = sl->wp / 2, pitch = (sl->wp + FB_PAD) / 2, outer = rows ? L->rp : L->bc;
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < %d; p_ += %d) {\n", outer * half, 32 * L->warps);
  cu_sb_printf(o, "    const int o_ = p_ / %d, x_ = 2 * (p_ %% %d);\n", half, half);
  cu_sb_printf(o, "    float x0_ = 0.f, x1_ = 0.f;\n");
  for (int h = 0; h < 2; h++) {
    cu_sb_printf(o, "    if (o_ < %s && x_ + %d < %lld) {\n", rows ? "ROWS_" : "bc_", h,
                 (long long)sl->w);
    char xv[16];
    snprintf(xv, sizeof xv, "x_ + %d", h);
    fb_point(c, L->nb, "    ", sl->outer_var, rows ? "o_" : "j0_ + o_", sl->x_var, xv);
    cu_emit_tree(c, sl->expr, "      ", "acc");
    cu_sb_printf(o, "      x%d_ = (float)(e%d);\n    }\n    }\n", h, sl->expr);
  }
  cu_sb_printf(o,
               "    ((unsigned *)%s%d_)[o_ * %d + x_ / 2] = cm_pack16(cm_f2bf(x0_), "
               "cm_f2bf(x1_));\n  }\n",
               rows ? "sr" : "sk", idx, pitch);
}

/* The tile GEMM of stage r for the warp's m-tile mt_: fg<r>_ = A(rows) B(keys)^T. */
static void fb_tile_gemm(fbw_r *f, int r) {
  sbuf *o = f->o;
  const fb_slot *A = &f->L->rs[f->L->rslot[r]], *B = &f->L->ks[f->L->kslot[r]];
  int pa = A->wp + FB_PAD, pb = B->wp + FB_PAD;
  int tiles = f->L->bc / 8;
  cu_sb_printf(o, "      float fg%d_[%d][4];\n", r, tiles);
  cu_sb_printf(o,
               "#pragma unroll\n      for (int t_ = 0; t_ < %d; t_++) fg%d_[t_][0] = fg%d_[t_][1] "
               "= fg%d_[t_][2] = fg%d_[t_][3] = 0.f;\n",
               tiles, r, r, r, r);
  cu_sb_printf(o, "#pragma unroll\n      for (int kk_ = 0; kk_ < %d; kk_ += 16) {\n", A->wp);
  cu_sb_printf(o, "        unsigned af_[4];\n");
  cu_sb_printf(o,
               "        cm_ldmatrix<4, false>(af_, sr%d_ + (mt_ * 16 + (lane_ & 15)) * %d + kk_ + "
               "(lane_ >> 4) * 8);\n",
               f->L->rslot[r], pa);
  cu_sb_printf(o, "#pragma unroll\n        for (int y_ = 0; y_ < %d; y_ += 2) {\n", tiles);
  cu_sb_printf(o, "          unsigned t_[4];\n");
  cu_sb_printf(o,
               "          cm_ldmatrix<4, false>(t_, sk%d_ + (y_ * 8 + (lane_ & 7) + ((lane_ >> 4) "
               "<< 3)) * %d + kk_ + ((lane_ >> 3) & 1) * 8);\n",
               f->L->kslot[r], pb);
  cu_sb_printf(o, "          const unsigned b0_[2] = {t_[0], t_[1]}, b1_[2] = {t_[2], t_[3]};\n");
  cu_sb_printf(o, "          cm_mma_16816<true>(fg%d_[y_], af_, b0_);\n", r);
  cu_sb_printf(o, "          cm_mma_16816<true>(fg%d_[y_ + 1], af_, b1_);\n        }\n      }\n",
               r);
}

/* dq<r>_[mi_] += tile(i, j) K-side(j, c): the tile's A fragments packed from qa<r>_. */
static void fb_rows_mma(fbw_r *f, int r) {
  sbuf *o = f->o;
  const fb_slot *B = &f->L->ks[f->L->kslot[r]];
  cu_sb_printf(o, "#pragma unroll\n      for (int kk_ = 0; kk_ < %d; kk_++) {\n", f->L->bc / 16);
  cu_sb_printf(
      o,
      "        const unsigned a_[4] = {qa%d_[2 * kk_][0], qa%d_[2 * kk_][1], qa%d_[2 * kk_ "
      "+ 1][0], qa%d_[2 * kk_ + 1][1]};\n",
      r, r, r, r);
  cu_sb_printf(o, "#pragma unroll\n        for (int y_ = 0; y_ < %d; y_ += 2) {\n", B->wp / 8);
  cu_sb_printf(o, "          unsigned t_[4];\n");
  cu_sb_printf(o,
               "          cm_ldmatrix<4, true>(t_, sk%d_ + (kk_ * 16 + (lane_ & 7) + (((lane_ >> "
               "3) & 1) << 3)) * %d + y_ * 8 + (lane_ >> 4) * 8);\n",
               f->L->kslot[r], B->wp + FB_PAD);
  cu_sb_printf(o, "          const unsigned b0_[2] = {t_[0], t_[1]}, b1_[2] = {t_[2], t_[3]};\n");
  cu_sb_printf(o, "          cm_mma_16816<true>(dq%d_[mi_][y_], a_, b0_);\n", r);
  cu_sb_printf(
      o, "          cm_mma_16816<true>(dq%d_[mi_][y_ + 1], a_, b1_);\n        }\n      }\n", r);
}

/* A ROWS or KEYS stage's tile operand at the fragment element (r_, j0_ + j_) into v_. */
static void fb_tile_operand(fbw_r *f, int r) {
  sbuf *o = f->o;
  rctx *c = &f->c[r];
  int nb = f->L->nb, nd = c->s->n_dom;
  cu_sb_printf(o, "        {\n        float v_ = 0.f;\n        if (in_) {\n");
  if (f->L->kind[r] == FB_ROWS)
    fb_point(c, nb, "        ", nb, "r_", nd, "j0_ + j_");
  else
    fb_point(c, nb, "        ", nb, "j0_ + j_", nd, "r_");
  cu_emit_tree(c, f->L->tile_op[r], "          ", "acc");
  cu_sb_printf(o, "          v_ = (float)(e%d);\n        }\n        }\n", f->L->tile_op[r]);
  if (f->L->kind[r] == FB_ROWS)
    cu_sb_printf(o, "        qv%d_[h_] = v_;\n        }\n", r);
  else
    cu_sb_printf(o, "        tk%d_[r_ * %d + j_] = cm_f2bf(v_);\n        }\n", r,
                 f->L->bc + FB_PAD);
}

/* The span's tile stages at one fragment element (r_, j_) of the key block, in order: pass 1
 * the tiles the row reductions need and those reductions, pass 2 every tile and the GEMM
 * stages' tile operands. */
static void fb_element(fbw_r *f, int pass) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  const cm_kattn *a = f->a;
  cu_sb_printf(o, "        const int r_ = mt_ * 16 + g_ + (h_ >> 1) * 8, j_ = t_ * 8 + qd_ * 2 + "
                  "(h_ & 1);\n");
  cu_sb_printf(o, "        const bool in_ = r_ < ROWS_ && j_ < bc_;\n");
  for (int i = 0; i < a->n_local; i++)
    if (!L->stat_local[i])
      cu_sb_printf(o, "        %s tl%d_ = 0;\n        (void)tl%d_;\n",
                   cu_stype(f->k->buffers[a->local[i]].dtype), i, i);
  for (int r = 0; r < L->span; r++) {
    rctx *c = &f->c[r];
    const cm_kstage *s = c->s;
    int kind = L->kind[r];
    if ((kind == FB_TILE_EW || kind == FB_TILE_GEMM) && !(pass == 1 && L->dep[r])) {
      int li = fb_local(a, s->stores[0].buf);
      char dst[16];
      snprintf(dst, sizeof dst, "tl%d_", li);
      cu_sb_printf(o, "        if (in_) {\n");
      if (kind == FB_TILE_GEMM) cu_sb_printf(o, "        const float acc = fg%d_[t_][h_];\n", r);
      cu_attn_point(c, L->nb, false, "        ", "r_", "j0_ + j_", NULL);
      cu_emit_tree(c, s->stores[0].value, "          ", "acc");
      fb_assign(o, s, s->stores[0].value, f->k->buffers[s->stores[0].buf].dtype, "          ", dst);
      cu_sb_printf(o, "        }\n        }\n");
    } else if (kind == FB_ROWRED && pass == 1) {
      char comb[256], bv[48];
      snprintf(bv, sizeof bv, "(float)(e%d)", s->body);
      cu_acc_combine(s, "rp_[h_ >> 1]", bv, comb, sizeof comb);
      cu_sb_printf(o, "        if (in_) {\n        float *const rp_ = rp%d_;\n", r);
      cu_attn_point(c, L->nb, true, "        ", "r_", NULL, "j0_ + j_");
      cu_emit_tree(c, s->body, "          ", "acc");
      cu_sb_printf(o, "          rp_[h_ >> 1] = %s;\n        }\n        }\n", comb);
    } else if ((kind == FB_ROWS || kind == FB_KEYS) && pass == 2) {
      fb_tile_operand(f, r);
    }
  }
}

/* The fragment loop of the warp's m-tile mt_ (fb_element per element); pass 2 packs the ROWS
 * stages' tiles as A fragments (qa<r>_). */
static void fb_elements(fbw_r *f, int pass) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  for (int r = 0; r < L->span; r++) {
    if (L->kind[r] == FB_ROWS && pass == 2)
      cu_sb_printf(o, "      unsigned qa%d_[%d][2];\n", r, L->bc / 8);
    if (L->kind[r] == FB_ROWRED && pass == 1) {
      char init[96];
      cu_acc_init(f->c[r].s, init, sizeof init);
      cu_sb_printf(o, "      float rp%d_[2] = {(float)(%s), (float)(%s)};\n", r, init, init);
    }
  }
  cu_sb_printf(o, "#pragma unroll\n      for (int t_ = 0; t_ < %d; t_++) {\n", L->bc / 8);
  for (int r = 0; r < L->span; r++)
    if (L->kind[r] == FB_ROWS && pass == 2) cu_sb_printf(o, "        float qv%d_[4];\n", r);
  cu_sb_printf(o, "#pragma unroll\n        for (int h_ = 0; h_ < 4; h_++) {\n");
  fb_element(f, pass);
  cu_sb_printf(o, "        }\n");
  for (int r = 0; r < L->span; r++)
    if (L->kind[r] == FB_ROWS && pass == 2)
      cu_sb_printf(o,
                   "        qa%d_[t_][0] = cm_pack16(cm_f2bf(qv%d_[0]), cm_f2bf(qv%d_[1]));\n"
                   "        qa%d_[t_][1] = cm_pack16(cm_f2bf(qv%d_[2]), cm_f2bf(qv%d_[3]));\n",
                   r, r, r, r, r, r);
  cu_sb_printf(o, "      }\n");
  /* pass 1: the row reductions over the lane quad, into the running values */
  for (int r = 0; r < L->span && pass == 1; r++) {
    if (L->kind[r] != FB_ROWRED) continue;
    const cm_kstage *s = f->c[r].s;
    char c1[256], c2[256], c3[256], run[32];
    snprintf(run, sizeof run, "rr%d_[mi_][x_]", r);
    cu_acc_combine(s, "rp_[x_]", "__shfl_xor_sync(0xffffffffu, rp_[x_], 1)", c1, sizeof c1);
    cu_acc_combine(s, "rp_[x_]", "__shfl_xor_sync(0xffffffffu, rp_[x_], 2)", c2, sizeof c2);
    cu_acc_combine(s, run, "rp_[x_]", c3, sizeof c3);
    cu_sb_printf(o, "      {\n      float *const rp_ = rp%d_;\n", r);
    cu_sb_printf(o, "#pragma unroll\n      for (int x_ = 0; x_ < 2; x_++) {\n");
    cu_sb_printf(o, "        rp_[x_] = %s;\n        rp_[x_] = %s;\n", c1, c2);
    cu_sb_printf(o, "        %s = %s;\n      }\n      }\n", run, c3);
  }
}

/* A KEYS stage for the key block: out(j, c) = sum_i tile(i, j) side(i, c) on tensor cores (A
 * from the tile [i][j] and B from the row slot [i][c], both by ldmatrix.trans), each warp a
 * 16-key x 32-column (or 16-column) part, then the stage's stores. */
static void fb_keys(fbw_r *f, int r) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  const fb_slot *B = &L->rs[L->rslot[r]];
  /* 32-column parts, 16 where that leaves warps idle (head dim 32 with 8 warps) */
  int cg = B->wp < 32 ? B->wp : 32;
  int kts = L->bc / 16; /* 16-key parts */
  if (cg == 32 && kts * (B->wp / cg) < L->warps) cg = 16;
  int ng = B->wp / cg;
  cu_sb_printf(o, "  for (int u_ = w_; u_ < %d; u_ += %d) {\n", kts * ng, L->warps);
  cu_sb_printf(o, "    const int kt_ = u_ %% %d, cg_ = u_ / %d;\n    float ka_[%d][4];\n", kts, kts,
               cg / 8);
  cu_sb_printf(o,
               "#pragma unroll\n    for (int y_ = 0; y_ < %d; y_++) ka_[y_][0] = ka_[y_][1] = "
               "ka_[y_][2] = ka_[y_][3] = 0.f;\n",
               cg / 8);
  cu_sb_printf(o, "    for (int kk_ = 0; kk_ < %d; kk_ += 16) {\n      unsigned af_[4];\n", L->rp);
  cu_sb_printf(o,
               "      cm_ldmatrix<4, true>(af_, tk%d_ + (kk_ + (lane_ & 7) + ((lane_ >> 4) << 3)) "
               "* %d + kt_ * 16 + ((lane_ >> 3) & 1) * 8);\n",
               r, L->bc + FB_PAD);
  cu_sb_printf(o, "#pragma unroll\n      for (int y_ = 0; y_ < %d; y_ += 2) {\n", cg / 8);
  cu_sb_printf(o,
               "        unsigned t_[4];\n        cm_ldmatrix<4, true>(t_, sr%d_ + (kk_ + (lane_ & "
               "7) + (((lane_ >> 3) & 1) << 3)) * %d + cg_ * %d + y_ * 8 + (lane_ >> 4) * 8);\n",
               L->rslot[r], B->wp + FB_PAD, cg);
  cu_sb_printf(o, "        const unsigned b0_[2] = {t_[0], t_[1]}, b1_[2] = {t_[2], t_[3]};\n");
  cu_sb_printf(o, "        cm_mma_16816<true>(ka_[y_], af_, b0_);\n");
  cu_sb_printf(o, "        cm_mma_16816<true>(ka_[y_ + 1], af_, b1_);\n      }\n    }\n");
  cu_sb_printf(o, "#pragma unroll\n    for (int y_ = 0; y_ < %d; y_++)\n", cg / 8);
  cu_sb_printf(o, "#pragma unroll\n    for (int h_ = 0; h_ < 4; h_++) {\n");
  cu_sb_printf(o,
               "      const int j_ = kt_ * 16 + g_ + (h_ >> 1) * 8, c_ = cg_ * %d + y_ * 8 + 2 * "
               "qd_ + (h_ & 1);\n",
               cg);
  cu_sb_printf(o, "      if (j_ < bc_ && c_ < %lld) {\n      const float acc = ka_[y_][h_];\n",
               (long long)B->w);
  cu_attn_point(&f->c[r], L->nb, false, "      ", "j0_ + j_", "c_", NULL);
  cu_emit_stores(&f->c[r], "        ", "acc");
  cu_sb_printf(o, "      }\n      }\n    }\n  }\n");
}

/* One pass over the key blocks (1: the tiles the row reductions need and the reductions; 2:
 * everything else). */
static void fb_pass(fbw_r *f, int pass) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  cu_sb_printf(o, "  // pass %d over the key blocks\n", pass);
  cu_sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", L->nkb);
  cu_sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", L->bc);
  cu_sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
               (long long)L->keys, L->bc, (long long)L->keys, L->bc);
  cu_sb_printf(o, "  __syncthreads();\n");
  for (int i = 0; i < L->n_ks; i++) fb_stage_slot(f, &L->ks[i], i, false);
  cu_sb_printf(o, "  __syncthreads();\n");
  cu_sb_printf(o, "#pragma unroll\n  for (int mi_ = 0; mi_ < %d; mi_++) {\n", L->mt);
  cu_sb_printf(o, "    const int mt_ = w_ + mi_ * %d;\n    if (mt_ < %d) {\n", L->warps, L->mtiles);
  for (int r = 0; r < L->span; r++)
    if (L->kind[r] == FB_TILE_GEMM && !(pass == 1 && L->dep[r])) fb_tile_gemm(f, r);
  fb_elements(f, pass);
  for (int r = 0; r < L->span && pass == 2; r++)
    if (L->kind[r] == FB_ROWS) fb_rows_mma(f, r);
  cu_sb_printf(o, "    }\n  }\n");
  bool keys = false;
  for (int r = 0; r < L->span; r++) keys |= L->kind[r] == FB_KEYS;
  if (pass == 2 && keys) {
    cu_sb_printf(o, "  __syncthreads();\n");
    for (int r = 0; r < L->span; r++)
      if (L->kind[r] == FB_KEYS) fb_keys(f, r);
  }
  cu_sb_printf(o, "  }\n");
}

/* After pass 1: each row reduction's stored value per owned row (st<li>_). */
static void fb_row_stats(fbw_r *f) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  for (int r = 0; r < L->span; r++) {
    if (L->kind[r] != FB_ROWRED) continue;
    rctx *c = &f->c[r];
    const cm_kstage *s = c->s;
    int li = fb_local(f->a, s->stores[0].buf);
    char dst[32];
    snprintf(dst, sizeof dst, "st%d_[mi_][x_]", li);
    cu_sb_printf(o, "#pragma unroll\n  for (int mi_ = 0; mi_ < %d; mi_++)\n", L->mt);
    cu_sb_printf(o, "#pragma unroll\n  for (int x_ = 0; x_ < 2; x_++) {\n");
    cu_sb_printf(o, "    const int r_ = (w_ + mi_ * %d) * 16 + g_ + x_ * 8;\n", L->warps);
    cu_sb_printf(o, "    %s = 0;\n", dst);
    cu_sb_printf(o, "    if (r_ < ROWS_) {\n    const float acc = rr%d_[mi_][x_];\n", r);
    cu_attn_point(c, L->nb, true, "    ", "r_", NULL, NULL);
    cu_emit_tree(c, s->stores[0].value, "      ", "acc");
    fb_assign(o, s, s->stores[0].value, f->k->buffers[s->stores[0].buf].dtype, "      ", dst);
    cu_sb_printf(o, "    }\n    }\n  }\n");
  }
}

/* After the last key block: each ROWS stage's sums through its stores. */
static void fb_rows_epilogue(fbw_r *f) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  for (int r = 0; r < L->span; r++) {
    if (L->kind[r] != FB_ROWS) continue;
    const fb_slot *B = &L->ks[L->kslot[r]];
    cu_sb_printf(o, "#pragma unroll\n  for (int mi_ = 0; mi_ < %d; mi_++)\n", L->mt);
    cu_sb_printf(o, "#pragma unroll\n  for (int y_ = 0; y_ < %d; y_++)\n", B->wp / 8);
    cu_sb_printf(o, "#pragma unroll\n  for (int h_ = 0; h_ < 4; h_++) {\n");
    cu_sb_printf(o,
                 "    const int r_ = (w_ + mi_ * %d) * 16 + g_ + (h_ >> 1) * 8, c_ = y_ * 8 + 2 * "
                 "qd_ + (h_ & 1);\n",
                 L->warps);
    cu_sb_printf(o,
                 "    if (r_ < ROWS_ && c_ < %lld) {\n    const float acc = dq%d_[mi_][y_][h_];\n",
                 (long long)B->w, r);
    cu_attn_point(&f->c[r], L->nb, false, "    ", "r_", "c_", NULL);
    cu_emit_stores(&f->c[r], "      ", "acc");
    cu_sb_printf(o, "    }\n    }\n  }\n");
  }
}

/* The block's head: shared slots, indices, the batch vars, the row slots and the registers. */
static void fb_head(fbw_r *f) {
  sbuf *o = f->o;
  const fb_layout *L = f->L;
  const cm_kattn *a = f->a;
  cu_sb_printf(o, "  extern __shared__ __align__(16) unsigned char fsm_[];\n");
  for (int i = 0; i < L->n_rs; i++)
    cu_sb_printf(o, "  unsigned short *const sr%d_ = (unsigned short *)(fsm_ + %lld);\n", i,
                 (long long)L->rs[i].off);
  for (int i = 0; i < L->n_ks; i++)
    cu_sb_printf(o, "  unsigned short *const sk%d_ = (unsigned short *)(fsm_ + %lld);\n", i,
                 (long long)L->ks[i].off);
  for (int r = 0; r < L->span; r++)
    if (L->kind[r] == FB_KEYS)
      cu_sb_printf(o, "  unsigned short *const tk%d_ = (unsigned short *)(fsm_ + %lld);\n", r,
                   (long long)L->tile_off[r]);
  cu_sb_printf(o, "  const long long bi_ = blockIdx.x;\n");
  cu_sb_printf(o,
               "  const int tid_ = threadIdx.x, w_ = tid_ >> 5, lane_ = tid_ & 31, g_ = lane_ >> "
               "2, qd_ = tid_ & 3;\n");
  cu_sb_printf(o, "  const int ROWS_ = %lld;\n", (long long)L->rows);
  cu_sb_printf(o, "  (void)bi_, (void)lane_, (void)g_, (void)qd_, (void)ROWS_;\n  {\n");
  if (L->nb > 0) {
    cu_decompose(&f->c[0], "  ", "bi_", 0, f->c[0].s->dom, L->nb);
    for (int v = 0; v < L->nb; v++) cu_sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
  }
  for (int i = 0; i < L->n_rs; i++) fb_stage_slot(f, &L->rs[i], i, true);
  for (int r = 0; r < L->span; r++) {
    const cm_kstage *s = f->c[r].s;
    if (L->kind[r] == FB_ROWRED) {
      char init[96];
      cu_acc_init(s, init, sizeof init);
      int li = fb_local(a, s->stores[0].buf);
      cu_sb_printf(o, "  float rr%d_[%d][2];\n  %s st%d_[%d][2];\n", r, L->mt,
                   cu_stype(f->k->buffers[a->local[li]].dtype), li, L->mt);
      cu_sb_printf(o,
                   "#pragma unroll\n  for (int mi_ = 0; mi_ < %d; mi_++) rr%d_[mi_][0] = "
                   "rr%d_[mi_][1] = (float)(%s);\n",
                   L->mt, r, r, init);
    } else if (L->kind[r] == FB_ROWS) {
      int n8 = L->ks[L->kslot[r]].wp / 8;
      cu_sb_printf(o, "  float dq%d_[%d][%d][4];\n", r, L->mt, n8);
      cu_sb_printf(o,
                   "#pragma unroll\n  for (int mi_ = 0; mi_ < %d; mi_++)\n#pragma unroll\n  for "
                   "(int y_ = 0; y_ < %d; y_++) dq%d_[mi_][y_][0] = dq%d_[mi_][y_][1] = "
                   "dq%d_[mi_][y_][2] = dq%d_[mi_][y_][3] = 0.f;\n",
                   L->mt, n8, r, r, r, r);
    }
  }
}

static cm_status fb_open(fbw_r *f, cm_err *err) {
  const cm_kattn *a = f->a;
  cm_status st = CM_OK;
  int opened = 0;
  for (int r = 0; r < a->span && st == CM_OK; r++, opened++)
    st = cu_rctx_open(&f->c[r], f->k, f->first + r, f->o, err);
  for (int r = opened; r < CM_KATTN_MAX_SPAN; r++) f->c[r].s = NULL;
  f->sub = calloc((size_t)f->k->n_buffers + 1, sizeof *f->sub);
  if (st == CM_OK && !f->sub)
    st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", f->k->name);
  for (int i = 0; st == CM_OK && i < a->n_local; i++) {
    if (f->L->stat_local[i])
      snprintf(f->names[i], sizeof f->names[i], "st%d_[mi_][h_ >> 1]", i);
    else
      snprintf(f->names[i], sizeof f->names[i], "tl%d_", i);
    f->sub[a->local[i]] = f->names[i];
  }
  for (int r = 0; r < opened && st == CM_OK; r++) f->c[r].subst = f->sub;
  return st;
}

static void fb_close(fbw_r *f) {
  free(f->sub);
  for (int r = 0; r < CM_KATTN_MAX_SPAN; r++)
    if (f->c[r].s) cu_rctx_close(&f->c[r]);
}

cm_status cu_render_flash_bwd(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                              sbuf *o, const bool *written, cm_err *err) {
  /* the layout again, as the plan derived it (its checks passed for the plan's target) */
  cm_target any;
  memset(&any, 0, sizeof any);
  any.mma_bf16 = true, any.shared_bytes_max = INT64_MAX;
  fb_layout L;
  if (!fb_layout_of(k, first, &any, p->threads / 32, p->bc, &L) || L.bytes != p->kvn ||
      32 * L.warps != p->threads)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: the flash backward plan does not match the span (plan "
                     "it again)",
                     k->name, first);
  fbw_r f;
  memset(&f, 0, sizeof f);
  f.k = k, f.a = &k->stages[first].attn, f.L = &L, f.first = first, f.o = o;
  cm_status st = fb_open(&f, err);
  if (st == CM_OK) {
    cu_sb_printf(o,
                 "// stages %d..%d (attention backward, flash: mma.sync bf16, %lld query rows in "
                 "%d warps, %d key blocks of %d, %s, %lld bytes of shared memory)\n",
                 first, first + f.a->span - 1, (long long)L.rows, L.warps, L.nkb, L.bc,
                 L.two_pass ? "two passes" : "one pass", (long long)L.bytes);
    char bounds[64];
    cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
    cu_signature(&f.c[0], written, bounds);
    fb_head(&f);
    if (L.two_pass) {
      fb_pass(&f, 1);
      fb_row_stats(&f);
    }
    fb_pass(&f, 2);
    fb_rows_epilogue(&f);
    cu_sb_printf(o, "  }\n}\n\n");
    for (int r = 0; r < f.a->span && st == CM_OK; r++) st = f.c[r].st;
  }
  fb_close(&f);
  if (st == CM_OK) st = cu_span_stubs(k, first, f.a->span, o, written, err);
  return st;
}
