/* codegen/render_cuda_attention.c — attention spans to CUDA C: fused (a block per batch item and
 * block of query rows, the span's local buffers in shared memory), streaming forward (online
 * softmax over key blocks) and streaming backward (render_cuda.h). */
#include "render_cuda.h"

#include <stdlib.h>
#include <string.h>

/* ---- fused attention spans ------------------------------------------------ */

#define ATTN_MAX_ROWS 64

size_t cu_dt_size(cm_dtype d) {
  switch (d) {
  case CM_F64:
  case CM_I64: return 8;
  case CM_F32:
  case CM_I32: return 4;
  case CM_BF16:
  case CM_F16: return 2;
  default: return 1;
  }
}

/* The fused plan within smem bytes of shared memory per block. */
static bool plan_fused(const cm_kernel *k, int first, const cm_target *t, int64_t smem_bytes,
                       cm_kcuda_attn *out) {
  cm_kcuda_attn p;
  const double smem = (double)smem_bytes;
  memset(&p, 0, sizeof p);
  const cm_kstage *s0 = &k->stages[first];
  if (s0->tmpl != CM_KT_ATTENTION_FWD && s0->tmpl != CM_KT_ATTENTION_BWD) return false;
  cm_err e = {0};
  if (cm_kattn_check(k, first, &e) != CM_OK) return false;
  const cm_kattn *a = &s0->attn;
  p.span = a->span;
  p.nb = a->nb;
  p.rows = a->rows;
  p.rowwise = a->br < a->rows;
  p.batch = cu_prod(s0->dom, a->nb);
  /* bytes of shared memory per query row (16-byte aligned slices) */
  size_t per_row = 0;
  for (int i = 0; i < a->n_local; i++)
    per_row += (size_t)a->local_row[i] * cu_dt_size(k->buffers[a->local[i]].dtype);
  per_row += 16 * (size_t)a->n_local;
  if (p.rowwise) {
    int64_t br = (int64_t)((size_t)smem_bytes / (per_row ? per_row : 1));
    if (br > ATTN_MAX_ROWS) br = ATTN_MAX_ROWS;
    if (br > p.rows) br = p.rows;
    if (br < 1) return false;
    /* even blocks: no short last block when the rows split evenly enough */
    int64_t nrb = (p.rows + br - 1) / br;
    br = (p.rows + nrb - 1) / nrb;
    p.br = (int)br;
    p.nrb = (int)nrb;
  } else {
    if ((double)p.rows * (double)per_row > smem) return false;
    p.br = (int)p.rows;
    p.nrb = 1;
  }
  /* the slices, 16-element aligned; fewer rows while they overflow the budget */
  for (;;) {
    double total = 0;
    for (int i = 0; i < a->n_local; i++) {
      p.slot_elems[i] = (int64_t)p.br * a->local_row[i];
      if (p.slot_elems[i] % 16) p.slot_elems[i] += 16 - p.slot_elems[i] % 16;
      total += (double)p.slot_elems[i] * (double)cu_dt_size(k->buffers[a->local[i]].dtype);
    }
    if (total <= smem) break;
    if (!p.rowwise || p.br == 1) return false;
    p.br--;
    p.nrb = (int)((p.rows + p.br - 1) / p.br);
  }
  if ((double)p.batch * p.nrb > 2147483647.0) return false;
  p.mma = t->mma_bf16;
  *out = p;
  return true;
}

bool cu_plan_attention(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out) {
  if (plan_fused(k, first, t, t->shared_bytes_static, out)) return true;
  /* a whole batch item whose tiles need more than the static 48 KiB (the 197-token backward
   * in bf16: dP and dS, 76 KiB each): dynamic shared memory up to the opt-in limit */
  const cm_kattn *a = &k->stages[first].attn;
  if (a->br < a->rows || t->shared_bytes_max <= t->shared_bytes_static ||
      !plan_fused(k, first, t, t->shared_bytes_max, out))
    return false;
  out->dyn_shared = true;
  return true;
}

/* The span's other stages: empty functions (the first stage's function runs them). */
cm_status cu_span_stubs(const cm_kernel *k, int first, int span, sbuf *o, const bool *written,
                        cm_err *err) {
  cm_status st = CM_OK;
  for (int si = first + 1; si < first + span && st == CM_OK; si++) {
    rctx c;
    st = cu_rctx_open(&c, k, si, o, err);
    if (st == CM_OK) {
      cu_sb_printf(o, "// stage %d \"%s\" (runs in stage %d)\n", si, k->stages[si].name, first);
      cu_signature(&c, written, "");
      cu_sb_printf(o, "}\n\n");
    }
    cu_rctx_close(&c);
  }
  return st;
}

/* Whether stage s of a fused span runs on tensor cores: a GEMM [batch, i, j] over one k whose
 * body is gemm_a * gemm_b, both bf16 (autocast; each may be widened to f32 first, exact),
 * accumulated in f32. */
static bool span_stage_mma(const cm_kstage *s, const cm_kcuda_attn *p) {
  if (!p->mma || s->n_red != 1 || s->red_op != CM_KRED_SUM || s->acc_dtype != CM_F32 ||
      s->n_dom != p->nb + 2 || s->gemm_a < 0 || s->gemm_b < 0 || s->accumulate ||
      s->gemm_a >= s->n_exprs || s->gemm_b >= s->n_exprs || s->body < 0 || s->body >= s->n_exprs)
    return false;
  const cm_kexpr *b = &s->exprs[s->body];
  return b->kind == CM_KX_OP && b->op == CM_OP_MUL && cm_kx_is_gemm_factor(s, b->a, s->gemm_a) &&
         cm_kx_is_gemm_factor(s, b->b, s->gemm_b) && s->exprs[s->gemm_a].dtype == CM_BF16 &&
         s->exprs[s->gemm_b].dtype == CM_BF16;
}

/* One mma operand register (two bf16): the operand expression e at k = kk_ and kk_ + 1 (0 where
 * cond fails, x_ the half). */
static void span_mma_operand(rctx *c, const cm_kcuda_attn *p, int e, const char *cond,
                             const char *row, const char *col, const char *dst) {
  sbuf *o = c->o;
  cu_sb_printf(o, "        {\n        unsigned short h_[2];\n");
  cu_sb_printf(o, "        for (int x_ = 0; x_ < 2; x_++) {\n          float val_ = 0.f;\n");
  cu_sb_printf(o, "          if (%s) {\n", cond);
  cu_attn_point(c, p->nb, false, "          ", row, col, "kk_ + x_");
  cu_emit_tree(c, e, "            ", "acc");
  cu_sb_printf(o, "            val_ = (float)(e%d);\n          }\n          }\n", e);
  cu_sb_printf(o, "          h_[x_] = cm_f2bf(val_);\n        }\n");
  cu_sb_printf(o, "        %s = cm_pack16(h_[0], h_[1]);\n        }\n", dst);
}

/* A GEMM stage of the span on tensor cores: the block's warps take the 16 x 8 tiles of the
 * block's M rows x N columns in turn; each lane evaluates its fragments' operand expressions
 * (bf16) at their points, mma.sync m16n8k16 accumulates in f32, the stores run per element. */
static void render_span_stage_mma(rctx *c, const cm_kcuda_attn *p) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int nb = p->nb;
  long long M = (long long)s->dom[nb], N = (long long)s->dom[nb + 1], K = (long long)s->red[0];
  cu_sb_printf(o, "  { // stage %d \"%s\" (tensor cores)\n", c->si, s->name);
  char rows[48];
  if (p->rowwise)
    snprintf(rows, sizeof rows, "(int)rb_");
  else
    snprintf(rows, sizeof rows, "%lld", M);
  cu_sb_printf(o,
               "  const int m_ = %s, w_ = threadIdx.x >> 5, g_ = (threadIdx.x & 31) >> 2, "
               "q_ = threadIdx.x & 3;\n",
               rows);
  const char *r0 = p->rowwise ? "row0_ + " : "";
  char rowa[64], rowe[64], cond[160];
  snprintf(rowa, sizeof rowa, "%s(mi_ * 16 + g_ + (r_ & 1) * 8)", r0);
  snprintf(rowe, sizeof rowe, "%s(mi_ * 16 + g_ + (h_ >> 1) * 8)", r0);
  long long nt = (N + 7) / 8;
  cu_sb_printf(o, "  const int nt_ = (m_ + 15) / 16 * %lld;\n", nt);
  cu_sb_printf(o, "  for (int tile_ = w_; tile_ < nt_; tile_ += %d) {\n", p->threads / 32);
  cu_sb_printf(o, "    const int mi_ = tile_ / %lld, ni_ = tile_ %% %lld;\n", nt, nt);
  cu_sb_printf(o, "    float acc_[4] = {0.f, 0.f, 0.f, 0.f};\n");
  cu_sb_printf(o, "    for (int k0_ = 0; k0_ < %lld; k0_ += 16) {\n", K);
  cu_sb_printf(o, "      unsigned a_[4], b_[2];\n");
  cu_sb_printf(o, "      for (int r_ = 0; r_ < 4; r_++) {\n");
  cu_sb_printf(o, "        const int kk_ = k0_ + 2 * q_ + (r_ >> 1) * 8;\n");
  snprintf(cond, sizeof cond, "mi_ * 16 + g_ + (r_ & 1) * 8 < m_ && kk_ + x_ < %lld", K);
  span_mma_operand(c, p, s->gemm_a, cond, rowa, "0", "a_[r_]");
  cu_sb_printf(o, "      }\n      for (int r_ = 0; r_ < 2; r_++) {\n");
  cu_sb_printf(o, "        const int kk_ = k0_ + 2 * q_ + r_ * 8;\n");
  snprintf(cond, sizeof cond, "ni_ * 8 + g_ < %lld && kk_ + x_ < %lld", N, K);
  span_mma_operand(c, p, s->gemm_b, cond, "0", "ni_ * 8 + g_", "b_[r_]");
  cu_sb_printf(o, "      }\n      cm_mma_16816<true>(acc_, a_, b_);\n    }\n");
  cu_sb_printf(o, "    for (int h_ = 0; h_ < 4; h_++) {\n");
  cu_sb_printf(o, "      const int i_ = mi_ * 16 + g_ + (h_ >> 1) * 8, j_ = ni_ * 8 + 2 * q_ + "
                  "(h_ & 1);\n");
  cu_sb_printf(o, "      if (i_ < m_ && j_ < %lld) {\n      const float acc = acc_[h_];\n", N);
  cu_attn_point(c, nb, false, "      ", rowe, "j_", NULL);
  cu_emit_stores(c, "        ", "acc");
  cu_sb_printf(o, "      }\n      }\n    }\n  }\n  __syncthreads();\n  }\n");
}

/* One stage of the span inside the fused function: the block's points, a
 * thread per point with a serial reduction, then a barrier (GEMM stages with bf16 operands:
 * render_span_stage_mma). */
static void render_span_stage(rctx *c, const cm_kcuda_attn *p) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int nb = p->nb;
  if (span_stage_mma(s, p)) {
    render_span_stage_mma(c, p);
    return;
  }
  int64_t inner = cu_prod(s->dom + nb + (p->rowwise ? 1 : 0), s->n_dom - nb - (p->rowwise ? 1 : 0));
  cu_sb_printf(o, "  { // stage %d \"%s\"\n", c->si, s->name);
  if (p->rowwise)
    cu_sb_printf(o, "  const long long np_ = (long long)rb_ * %lldLL;\n", (long long)inner);
  else
    cu_sb_printf(o, "  const long long np_ = %lldLL;\n", (long long)inner);
  cu_sb_printf(o, "  for (long long p = threadIdx.x; p < np_; p += %d) {\n", p->threads);
  for (int v = 0; v < nb; v++) cu_sb_printf(o, "    const long long v%d = bv%d_;\n", v, v);
  if (p->rowwise) {
    cu_sb_printf(o, "    const long long pr_ = p / %lldLL, pi_ = p %% %lldLL;\n", (long long)inner,
                 (long long)inner);
    cu_sb_printf(o, "    const long long v%d = row0_ + pr_;\n", nb);
    cu_decompose(c, "    ", "pi_", nb + 1, s->dom + nb + 1, s->n_dom - nb - 1);
  } else {
    cu_decompose(c, "    ", "p", nb, s->dom + nb, s->n_dom - nb);
  }
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  cu_clear_mark(c);
  if (s->n_red > 0) cu_mark_from(c, s->body);
  for (int i = 0; i < s->n_stores; i++) {
    cu_mark_from(c, s->stores[i].index);
    cu_mark_from(c, s->stores[i].value);
  }
  cu_emit_marked(c, "    ", "acc", 0, 0);
  if (s->n_red > 0) {
    char init[128], comb[256], body[256], bname[32];
    cu_acc_init(s, init, sizeof init);
    cu_sb_printf(o, "    %s acc = %s;\n", cu_ctype(s->acc_dtype), init);
    cu_sb_printf(o, "    for (%s q = 0; q < %lldLL; q++) {\n",
                 cu_red_counter_type(cu_prod(s->red, s->n_red)),
                 (long long)cu_prod(s->red, s->n_red));
    cu_decompose(c, "      ", "q", s->n_dom, s->red, s->n_red);
    cu_clear_mark(c);
    cu_mark_from(c, s->body);
    cu_emit_marked(c, "      ", "acc", 1, -1);
    snprintf(bname, sizeof bname, "e%d", s->body);
    cu_cast_code(body, sizeof body, s->exprs[s->body].dtype, s->acc_dtype, bname);
    cu_acc_combine(s, "acc", body, comb, sizeof comb);
    cu_sb_printf(o, "      acc = %s;\n    }\n", comb);
    for (int e = 0; e < s->n_exprs; e++)
      if (c->usered[e]) c->done[e] = false;
  }
  cu_emit_stores(c, "    ", "acc");
  cu_sb_printf(o, "  }\n  __syncthreads();\n  }\n");
}

/* The span from stage `first` as one function (named after the first stage);
 * the span's other stages get empty functions. */
cm_status cu_render_attention(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                              sbuf *o, const bool *written, cm_err *err) {
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  rctx c0;
  cm_status st = cu_rctx_open(&c0, k, first, o, err);
  if (st == CM_OK) {
    cu_sb_printf(o, "// stages %d..%d (attention %s, fused: %d query rows per block)\n", first,
                 first + p->span - 1, s0->tmpl == CM_KT_ATTENTION_FWD ? "forward" : "backward",
                 p->br);
    char bounds[64];
    cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
    cu_signature(&c0, written, bounds);
  }
  cu_rctx_close(&c0);
  if (st != CM_OK) return st;
  if (p->dyn_shared) { /* the slots one after another in dynamic shared memory */
    int64_t off = 0;
    cu_sb_printf(o, "  extern __shared__ __align__(16) unsigned char dsm_[];\n");
    for (int i = 0; i < a->n_local; i++) {
      const char *ty = cu_stype(k->buffers[a->local[i]].dtype);
      cu_sb_printf(o, "  %s *const sl%d_ = (%s *)(dsm_ + %lld);\n", ty, i, ty, (long long)off);
      off += p->slot_elems[i] * (int64_t)cu_dt_size(k->buffers[a->local[i]].dtype);
    }
  } else {
    for (int i = 0; i < a->n_local; i++)
      cu_sb_printf(o, "  __shared__ __align__(16) %s sl%d_[%lld];\n",
                   cu_stype(k->buffers[a->local[i]].dtype), i, (long long)p->slot_elems[i]);
  }
  cu_sb_printf(o, "  const long long blk_ = blockIdx.x;\n");
  cu_sb_printf(o, "  const long long bi_ = blk_ / %d, row0_ = (blk_ %% %d) * %d;\n", p->nrb, p->nrb,
               p->br);
  if (p->rowwise)
    cu_sb_printf(o, "  const long long rb_ = %lldLL - row0_ < %d ? %lldLL - row0_ : %d;\n",
                 (long long)p->rows, p->br, (long long)p->rows, p->br);
  for (int i = 0; i < a->n_local; i++)
    cu_sb_printf(o, "  const long long lb%d_ = (bi_ * %lldLL + row0_) * %lldLL;\n", i,
                 (long long)p->rows, (long long)a->local_row[i]);
  /* the batch vars, shared by every stage of the span */
  if (p->nb > 0) {
    cu_sb_printf(o, "  {\n");
    rctx cb;
    st = cu_rctx_open(&cb, k, first, o, err);
    if (st == CM_OK) cu_decompose(&cb, "  ", "bi_", 0, s0->dom, p->nb);
    cu_rctx_close(&cb);
    for (int v = 0; v < p->nb && st == CM_OK; v++)
      cu_sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
  }
  int *local = malloc(sizeof(int) * (size_t)(k->n_buffers + 1));
  if (!local) return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  for (int b = 0; b < k->n_buffers; b++) local[b] = -1;
  for (int i = 0; i < a->n_local; i++) local[a->local[i]] = i;
  for (int si = first; si < first + p->span && st == CM_OK; si++) {
    rctx c;
    st = cu_rctx_open(&c, k, si, o, err);
    c.local = local;
    if (st == CM_OK) render_span_stage(&c, p);
    if (st == CM_OK) st = c.st;
    cu_rctx_close(&c);
  }
  free(local);
  if (p->nb > 0) cu_sb_printf(o, "  }\n");
  cu_sb_printf(o, "}\n\n");
  if (st == CM_OK) st = cu_span_stubs(k, first, p->span, o, written, err);
  return st;
}

/* ---- streaming attention (online softmax over key blocks) ------------------
 *
 * A forward span the lowering matched for streaming (cm_kattn.stream): one
 * block of 256 threads per (batch item, block of BR query rows). The block's
 * Q rows go to shared memory once; per block of BC keys, K_j^T is staged in
 * shared memory, S_j = Q K_j^T (a thread per score, then the S stage's
 * epilogue), one thread per row keeps the running max m, the rescale factor
 * alpha = exp(m_old - m_new) and the running sum l, overwriting S_j with
 * E_j = the E stage's value at m_new; V_j is staged over K_j and O = alpha O +
 * E_j V_j (a thread per output). Finally O / l runs through the O stage's
 * epilogue; the roles the graph keeps are written from the final m and l (S,
 * E, P by a second pass over the key blocks). Shared memory: BR (D + BC + 1 +
 * DV + 3) + max(D BC, BC DV) floats, at most 48 KiB; rows of S_j are BC + 1
 * floats apart (the per-row phase reads a column per thread: no bank
 * conflicts). Backward spans marked for streaming: render_stream_bwd. */

/* The streaming forward plan with the span's role stages (from cm_kattn). */
typedef struct fa_cplan {
  int nb, br, bc, nrb, nkb, threads;
  int64_t rows, keys, d, dv, batch, kvn;
  const cm_kstage *sS, *sM, *sE, *sL, *sP, *sO;
  int iS, iM, iE, iL, iP, iO;
} fa_cplan;

/* The role stages of the forward span from stage first. */
static void fa_roles(const cm_kernel *k, int first, fa_cplan *p) {
  const cm_kattn *a = &k->stages[first].attn;
  p->nb = a->nb;
  p->iS = first, p->iM = a->st_max, p->iE = a->st_exp, p->iL = a->st_sum, p->iO = a->st_out;
  p->iP = a->st_p;
  p->sS = &k->stages[first], p->sM = &k->stages[p->iM], p->sE = &k->stages[p->iE];
  p->sL = &k->stages[p->iL], p->sO = &k->stages[p->iO];
  p->sP = p->iP >= 0 ? &k->stages[p->iP] : NULL;
}

/* The batch vars of a role stage (the lowering's rule: its row var follows). */
static int fa_cuda_stage_nb(const cm_kstage *s, bool stat) {
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) return s->n_dom - 1;
  return s->n_dom - 2;
}

/* Whether stage first of k opens a valid streaming span of template tmpl (the kernel verifies
 * and cm_kattn_stream_check accepts the span). */
static bool cu_stream_span(const cm_kernel *k, int first, cm_ktemplate tmpl) {
  const cm_kstage *s0 = &k->stages[first];
  if (s0->tmpl != tmpl || !s0->attn.stream) return false;
  cm_err e = {0};
  return cm_kernel_verify(k, &e) == CM_OK && cm_kattn_stream_check(k, first, &e) == CM_OK;
}

bool cu_stream_shape(const cm_kernel *k, int first, cm_kcuda_attn *out) {
  fa_cplan p;
  memset(&p, 0, sizeof p);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (!cu_stream_span(k, first, CM_KT_ATTENTION_FWD)) return false;
  int end = first + a->span, st[4] = {a->st_max, a->st_exp, a->st_sum, a->st_out};
  for (int i = 0; i < 4; i++)
    if (st[i] <= first || st[i] >= end) return false;
  if (a->st_p != -1 && (a->st_p <= first || a->st_p >= end)) return false;
  int bf[4] = {a->buf_s, a->buf_m, a->buf_e, a->buf_l};
  for (int i = 0; i < 4; i++)
    if (bf[i] < 0 || bf[i] >= k->n_buffers) return false;
  if ((a->st_p >= 0) != (a->buf_p >= 0) || a->buf_p >= k->n_buffers) return false;
  fa_roles(k, first, &p);
  if (s0->n_dom != p.nb + 2 || s0->n_red != 1 || s0->n_stores != 1 || p.sO->n_dom < 2 ||
      p.sO->n_red != 1 || p.sM->n_red != 1 || p.sL->n_red != 1 || p.sE->n_stores != 1 ||
      (p.sP && p.sP->n_stores != 1) || s0->gemm_a < 0 || s0->gemm_b < 0 || p.sO->gemm_b < 0)
    return false;
  p.rows = a->rows, p.keys = s0->dom[p.nb + 1], p.d = s0->red[0];
  p.dv = p.sO->dom[p.sO->n_dom - 1];
  p.batch = cu_prod(s0->dom, p.nb);
  if (a->bc < 1 || p.keys < 2) return false;
  memset(out, 0, sizeof *out);
  out->span = a->span, out->nb = p.nb, out->rows = p.rows, out->batch = p.batch;
  out->keys = p.keys, out->d = p.d, out->dv = p.dv, out->bc = a->bc;
  return true;
}

bool cu_plan_stream(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out) {
  fa_cplan p;
  const double smem_floats = (double)(t->shared_bytes_static / 4);
  memset(&p, 0, sizeof p);
  const cm_kattn *a = &k->stages[first].attn;
  cm_kcuda_attn sh;
  /* f32 scores only: the loads of a bf16 S (autocast) read the tile as bits (cu_plan_flash) */
  if (!cu_stream_shape(k, first, &sh) || k->buffers[a->buf_s].dtype != CM_F32) return false;
  p.nb = sh.nb, p.rows = sh.rows, p.batch = sh.batch, p.keys = sh.keys, p.d = sh.d, p.dv = sh.dv;
  int64_t bc = a->bc < 64 ? a->bc : 64, br = p.rows < 64 ? p.rows : 64;
  for (;;) {
    int64_t kvn = p.d * bc > bc * p.dv ? p.d * bc : bc * p.dv;
    double fl = (double)br * (double)(p.d + bc + 1 + p.dv + 3) + (double)kvn;
    if (fl <= smem_floats) {
      p.kvn = kvn;
      break;
    }
    if (br > 1)
      br = br / 2;
    else if (bc > 1)
      bc = bc / 2;
    else
      return false;
  }
  int64_t nrb = (p.rows + br - 1) / br;
  br = (p.rows + nrb - 1) / nrb;
  p.br = (int)br, p.bc = (int)bc, p.nrb = (int)nrb;
  p.nkb = (int)((p.keys + bc - 1) / bc);
  if ((double)p.batch * p.nrb > 2147483647.0) return false;
  memset(out, 0, sizeof *out);
  out->span = a->span, out->nb = p.nb, out->rows = p.rows, out->batch = p.batch;
  out->br = p.br, out->nrb = p.nrb, out->bc = p.bc, out->nkb = p.nkb;
  out->keys = p.keys, out->d = p.d, out->dv = p.dv, out->kvn = p.kvn;
  return true;
}

/* Opens a C scope for one point of stage c->s of a span with nb batch vars
 * (stat: the stage computes a row statistic): its vars (batch from bv<i>_
 * when the stage's batch axes are the span's, else 0; the row var = row, the
 * var after it = col, the reduction var = red; NULL or any other var: 0). */
void cu_attn_point(rctx *c, int nb, bool stat, const char *ind, const char *row, const char *col,
                   const char *red) {
  const cm_kstage *s = c->s;
  int nbs = fa_cuda_stage_nb(s, stat);
  cu_sb_printf(c->o, "%s{\n", ind);
  for (int v = 0; v < s->n_dom + s->n_red; v++) {
    const char *val = "0";
    char bvn[24];
    if (v < nbs && nbs == nb) {
      snprintf(bvn, sizeof bvn, "bv%d_", v);
      val = bvn;
    }
    if (v == nbs && row) val = row;
    if (v == nbs + 1 && v < s->n_dom && col) val = col;
    if (v == s->n_dom && red) val = red;
    cu_sb_printf(c->o, "%s  const long long v%d = (long long)(%s); (void)v%d;\n", ind, v, val, v);
  }
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
}

/* The same for a forward span: its row statistics are the max and sum stages. */
static void fa_cuda_point(rctx *c, const fa_cplan *p, const char *ind, const char *row,
                          const char *col, const char *red) {
  cu_attn_point(c, p->nb, c->s == p->sM || c->s == p->sL, ind, row, col, red);
}

/* The K_j^T tile (fkv_[k * BC + j]) of the current key block, then a barrier. */
static void fa_cuda_ktile(rctx *cS, const fa_cplan *p) {
  sbuf *o = cS->o;
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld * bc_; p_ += %d) {\n", (long long)p->d,
               p->threads);
  cu_sb_printf(o, "    const int k_ = p_ / bc_, j_ = p_ %% bc_;\n");
  fa_cuda_point(cS, p, "    ", "0", "j0_ + j_", "k_");
  cu_emit_tree(cS, p->sS->gemm_b, "      ", "acc");
  cu_sb_printf(o, "      fkv_[k_ * %d + j_] = (float)(e%d);\n    }\n  }\n  __syncthreads();\n",
               p->bc, p->sS->gemm_b);
}

/* The S value at (r_, j_) of the block: acc = Q K^T, then the S stage's
 * store value (stored too when kept), left in float sv_. */
static void fa_cuda_score(rctx *cS, const fa_cplan *p, const char *ind, bool keep) {
  sbuf *o = cS->o;
  cu_sb_printf(o, "%sfloat acc = 0.f;\n", ind);
  cu_sb_printf(
      o, "%sfor (int k_ = 0; k_ < %lld; k_++) acc += fq_[r_ * %lld + k_] * fkv_[k_ * %d + j_];\n",
      ind, (long long)p->d, (long long)p->d, p->bc);
  cu_sb_printf(o, "%sfloat sv_;\n", ind);
  fa_cuda_point(cS, p, ind, "row0_ + r_", "j0_ + j_", NULL);
  char in2[32];
  snprintf(in2, sizeof in2, "%s  ", ind);
  int val = p->sS->stores[0].value;
  if (keep)
    cu_emit_stores(cS, in2, "acc");
  else
    cu_emit_tree(cS, val, in2, "acc");
  cu_sb_printf(o, "%s  sv_ = (float)(e%d);\n%s}\n", ind, val, ind);
}

/* Pass 1 over the key blocks: S_j, the running max and sum, E_j and O. */
static void fa_pass1(rctx *cS, rctx *cM, rctx *cE, rctx *cO, const fa_cplan *p, const char **sub,
                     const char *sidx) {
  sbuf *o = cS->o;
  const cm_kattn *a = &p->sS->attn;
  int BC = p->bc;
  long long DV = (long long)p->dv;
  cu_sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", p->nkb);
  cu_sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", BC);
  cu_sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
               (long long)p->keys, BC, (long long)p->keys, BC);
  fa_cuda_ktile(cS, p);
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * bc_; p_ += %d) {\n", p->threads);
  cu_sb_printf(o, "    const int r_ = p_ / bc_, j_ = p_ %% bc_;\n");
  fa_cuda_score(cS, p, "    ", false);
  cu_sb_printf(o, "    %s = sv_;\n  }\n  __syncthreads();\n", sidx);
  /* one thread per row: max, rescale, E and its sum */
  cu_sb_printf(o, "  for (int r_ = tid_; r_ < rb_; r_ += %d) {\n    float mx_ = -CM_INFF;\n",
               p->threads);
  cu_sb_printf(o, "    for (int j_ = 0; j_ < bc_; j_++) {\n");
  sub[a->buf_s] = sidx;
  cM->subst = sub;
  fa_cuda_point(cM, p, "      ", "row0_ + r_", NULL, "j0_ + j_");
  cu_emit_tree(cM, p->sM->body, "        ", "acc");
  cu_sb_printf(o, "        mx_ = cm_accmax(mx_, (float)(e%d));\n      }\n    }\n", p->sM->body);
  cu_sb_printf(o, "    const float mo_ = fm_[r_], mn_ = cm_accmax(mo_, mx_);\n");
  cu_sb_printf(o, "    const float al_ = mo_ == -CM_INFF ? 0.f : expf(mo_ - mn_);\n");
  cu_sb_printf(o, "    float rs_ = 0.f;\n    for (int j_ = 0; j_ < bc_; j_++) {\n");
  sub[a->buf_m] = "mn_";
  cE->subst = sub;
  fa_cuda_point(cE, p, "      ", "row0_ + r_", "j0_ + j_", NULL);
  int ev = p->sE->stores[0].value;
  cu_emit_tree(cE, ev, "        ", "acc");
  cu_sb_printf(o, "        const float ev_ = (float)(e%d);\n        %s = ev_;\n", ev, sidx);
  cu_sb_printf(o, "        rs_ += ev_;\n      }\n    }\n");
  cu_sb_printf(o, "    fl_[r_] = al_ * fl_[r_] + rs_;\n    fm_[r_] = mn_;\n    fa_[r_] = al_;\n");
  cu_sb_printf(o, "  }\n  __syncthreads();\n");
  sub[a->buf_s] = sub[a->buf_m] = NULL;
  /* V_j over K_j, then O = alpha O + E_j V_j */
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < bc_ * %lld; p_ += %d) {\n", DV, p->threads);
  cu_sb_printf(o, "    const int j_ = p_ / %lld, c_ = p_ %% %lld;\n", DV, DV);
  fa_cuda_point(cO, p, "    ", "0", "c_", "j0_ + j_");
  cu_emit_tree(cO, p->sO->gemm_b, "      ", "acc");
  cu_sb_printf(o, "      fkv_[p_] = (float)(e%d);\n    }\n  }\n  __syncthreads();\n",
               p->sO->gemm_b);
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * %lld; p_ += %d) {\n", DV, p->threads);
  cu_sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", DV, DV);
  cu_sb_printf(o, "    float o_ = fa_[r_] * fo_[p_];\n");
  cu_sb_printf(
      o, "    for (int j_ = 0; j_ < bc_; j_++) o_ += fs_[r_ * %d + j_] * fkv_[j_ * %lld + c_];\n",
      BC + 1, DV);
  cu_sb_printf(o, "    fo_[p_] = o_;\n  }\n  __syncthreads();\n  }\n");
}

/* Pass 2 over the key blocks: the S, E and P the graph keeps, from the final m and l. */
static void fa_pass2(rctx *cS, rctx *cE, rctx *cP, const fa_cplan *p, const char **sub) {
  sbuf *o = cS->o;
  const cm_kattn *a = &p->sS->attn;
  int BC = p->bc, ev = p->sE->stores[0].value;
  cu_sb_printf(o, "  __syncthreads();\n");
  cu_sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", p->nkb);
  cu_sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", BC);
  cu_sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
               (long long)p->keys, BC, (long long)p->keys, BC);
  fa_cuda_ktile(cS, p);
  cu_sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * bc_; p_ += %d) {\n", p->threads);
  cu_sb_printf(o, "    const int r_ = p_ / bc_, j_ = p_ %% bc_;\n");
  fa_cuda_score(cS, p, "    ", (a->keep & CM_KATTN_KEEP_S) != 0);
  if (a->keep & (CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
    sub[a->buf_s] = "sv_";
    sub[a->buf_m] = "fm_[r_]";
    cE->subst = sub;
    cu_sb_printf(o, "    float ev_;\n");
    fa_cuda_point(cE, p, "    ", "row0_ + r_", "j0_ + j_", NULL);
    if (a->keep & CM_KATTN_KEEP_E)
      cu_emit_stores(cE, "      ", "acc");
    else
      cu_emit_tree(cE, ev, "      ", "acc");
    cu_sb_printf(o, "      ev_ = (float)(e%d);\n    }\n", ev);
    sub[a->buf_s] = sub[a->buf_m] = NULL;
    if (p->sP && (a->keep & CM_KATTN_KEEP_P)) {
      sub[a->buf_e] = "ev_";
      sub[a->buf_l] = "fl_[r_]";
      cP->subst = sub;
      fa_cuda_point(cP, p, "    ", "row0_ + r_", "j0_ + j_", NULL);
      cu_emit_stores(cP, "      ", "acc");
      cu_sb_printf(o, "    }\n");
      sub[a->buf_e] = sub[a->buf_l] = NULL;
    }
  }
  cu_sb_printf(o, "  }\n  __syncthreads();\n  }\n");
}

/* The span from stage `first` as one streaming function; the span's other
 * stages get empty functions. */
cm_status cu_render_stream(const cm_kernel *k, int first, const cm_kcuda_attn *pa, int min_blocks,
                           sbuf *o, const bool *written, cm_err *err) {
  fa_cplan fp;
  memset(&fp, 0, sizeof fp);
  fa_roles(k, first, &fp);
  fp.br = pa->br, fp.bc = pa->bc, fp.nrb = pa->nrb, fp.nkb = pa->nkb;
  fp.rows = pa->rows, fp.keys = pa->keys, fp.d = pa->d, fp.dv = pa->dv, fp.batch = pa->batch;
  fp.kvn = pa->kvn, fp.threads = pa->threads;
  const fa_cplan *p = &fp;
  const cm_kattn *a = &k->stages[first].attn;
  rctx cS, cM, cE, cL, cO, cP;
  memset(&cS, 0, sizeof cS), memset(&cM, 0, sizeof cM), memset(&cE, 0, sizeof cE);
  memset(&cL, 0, sizeof cL), memset(&cO, 0, sizeof cO), memset(&cP, 0, sizeof cP);
  cm_status st = cu_rctx_open(&cS, k, p->iS, o, err);
  if (st == CM_OK) st = cu_rctx_open(&cM, k, p->iM, o, err);
  if (st == CM_OK) st = cu_rctx_open(&cE, k, p->iE, o, err);
  if (st == CM_OK) st = cu_rctx_open(&cL, k, p->iL, o, err);
  if (st == CM_OK) st = cu_rctx_open(&cO, k, p->iO, o, err);
  if (st == CM_OK && p->sP) st = cu_rctx_open(&cP, k, p->iP, o, err);
  const char **sub = calloc((size_t)k->n_buffers + 1, sizeof *sub);
  if (st == CM_OK && !sub) st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  if (st == CM_OK) {
    int BR = p->br, BC = p->bc;
    long long D = (long long)p->d, DV = (long long)p->dv;
    char sidx[64];
    snprintf(sidx, sizeof sidx, "fs_[r_ * %d + j_]", BC + 1);
    cu_sb_printf(o,
                 "// stages %d..%d (attention forward, streaming: %d query rows x %d keys per "
                 "step, %d key blocks)\n",
                 first, first + a->span - 1, BR, BC, p->nkb);
    char bounds[64];
    cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
    cu_signature(&cS, written, bounds);
    cu_sb_printf(o, "  __shared__ __align__(16) float fq_[%lld];\n", (long long)BR * D);
    cu_sb_printf(o, "  __shared__ __align__(16) float fkv_[%lld];\n", (long long)p->kvn);
    cu_sb_printf(o, "  __shared__ __align__(16) float fs_[%d];\n", BR * (BC + 1));
    cu_sb_printf(o, "  __shared__ __align__(16) float fo_[%lld];\n", (long long)BR * DV);
    cu_sb_printf(o, "  __shared__ float fm_[%d], fl_[%d], fa_[%d];\n", BR, BR, BR);
    cu_sb_printf(o, "  const long long blk_ = blockIdx.x;\n");
    cu_sb_printf(o, "  const long long bi_ = blk_ / %d, row0_ = (blk_ %% %d) * %d;\n", p->nrb,
                 p->nrb, BR);
    cu_sb_printf(o, "  const int rb_ = %lldLL - row0_ < %d ? (int)(%lldLL - row0_) : %d;\n",
                 (long long)p->rows, BR, (long long)p->rows, BR);
    cu_sb_printf(o, "  const int tid_ = threadIdx.x;\n  (void)bi_;\n  {\n");
    if (p->nb > 0) {
      cu_decompose(&cS, "  ", "bi_", 0, p->sS->dom, p->nb);
      for (int v = 0; v < p->nb; v++) cu_sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
    }
    /* Q rows of the block */
    cu_sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * %lld; p_ += %d) {\n", D, p->threads);
    cu_sb_printf(o, "    const int r_ = p_ / %lld, k_ = p_ %% %lld;\n", D, D);
    fa_cuda_point(&cS, p, "    ", "row0_ + r_", NULL, "k_");
    cu_emit_tree(&cS, p->sS->gemm_a, "      ", "acc");
    cu_sb_printf(o, "      fq_[r_ * %lld + k_] = (float)(e%d);\n    }\n  }\n", D, p->sS->gemm_a);
    cu_sb_printf(o,
                 "  for (int p_ = tid_; p_ < %d; p_ += %d) { fm_[p_] = -CM_INFF; fl_[p_] = 0.f; "
                 "fa_[p_] = 0.f; }\n",
                 BR, p->threads);
    cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += %d) fo_[p_] = 0.f;\n",
                 (long long)BR * DV, p->threads);
    cu_sb_printf(o, "  __syncthreads();\n");
    fa_pass1(&cS, &cM, &cE, &cO, p, sub, sidx);
    /* O / l through the O stage's epilogue */
    cu_sb_printf(o, "  for (int p_ = tid_; p_ < rb_ * %lld; p_ += %d) {\n", DV, p->threads);
    cu_sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", DV, DV);
    cu_sb_printf(o, "    const float acc = fo_[p_] / fl_[r_];\n");
    fa_cuda_point(&cO, p, "    ", "row0_ + r_", "c_", NULL);
    cu_emit_stores(&cO, "      ", "acc");
    cu_sb_printf(o, "    }\n  }\n");
    /* the row statistics the graph keeps */
    for (int r = 0; r < 2; r++) {
      if (!(a->keep & (r ? CM_KATTN_KEEP_L : CM_KATTN_KEEP_M))) continue;
      rctx *cr = r ? &cL : &cM;
      cr->subst = NULL;
      cu_sb_printf(o, "  for (int r_ = tid_; r_ < rb_; r_ += %d) {\n", p->threads);
      cu_sb_printf(o, "    const float acc = %s[r_];\n", r ? "fl_" : "fm_");
      fa_cuda_point(cr, p, "    ", "row0_ + r_", NULL, NULL);
      cu_emit_stores(cr, "      ", "acc");
      cu_sb_printf(o, "    }\n  }\n");
    }
    if (a->keep & (CM_KATTN_KEEP_S | CM_KATTN_KEEP_E | CM_KATTN_KEEP_P))
      fa_pass2(&cS, &cE, &cP, p, sub);
    cu_sb_printf(o, "  }\n}\n\n");
    int stc[4] = {cS.st, cM.st, cE.st, cL.st};
    for (int i = 0; i < 4 && st == CM_OK; i++) st = stc[i];
    if (st == CM_OK) st = cO.st;
    if (st == CM_OK && p->sP) st = cP.st;
  }
  free(sub);
  cu_rctx_close(&cS), cu_rctx_close(&cM), cu_rctx_close(&cE), cu_rctx_close(&cL),
      cu_rctx_close(&cO);
  if (p->sP) cu_rctx_close(&cP);
  if (st == CM_OK) st = cu_span_stubs(k, first, a->span, o, written, err);
  return st;
}

/* ---- streaming attention backward ------------------------------------------
 *
 * A backward span the lowering marked for streaming (cm_kattn.stream, roles
 * in attn.role), mirroring the CPU's: one block of 256 threads per batch item
 * (all query rows: dK_j and dV_j need every row, so no atomics across blocks
 * and no second accumulation buffer). Per key block of BC keys, pass 1
 * computes the tiles the row reductions need and accumulates those
 * reductions (rowsum(dP o P)); pass 2 recomputes every tile (dP_j, dS_j),
 * accumulates the GEMMs over query rows (dQ += dS_j K_j) and completes the
 * GEMMs over key rows (dK_j = dS_j^T Q, dV_j = P_j^T dO) through their
 * epilogues. Shared memory: the local tiles (rows x BC each), the row
 * statistics (rows each) and the dQ-like accumulators (rows x C each), at
 * most 48 KiB: BC shrinks to fit, and spans whose accumulators alone do not
 * fit keep the stage-by-stage path. Operands outside the span are read from
 * global memory per use. */

static int fb_cuda_local(const cm_kattn *a, int b) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == b) return i;
  return -1;
}

/* The plan within smem_floats of shared memory per block (false: it does not fit). */
static bool plan_stream_bwd(const cm_kernel *k, int first, double smem_floats, bool dyn,
                            cm_kcuda_attn *out) {
  cm_kcuda_attn p;
  memset(&p, 0, sizeof p);
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  if (!cu_stream_span(k, first, CM_KT_ATTENTION_BWD)) return false;
  if (a->span < 2 || a->span > CM_KATTN_MAX_SPAN || first + a->span > k->n_stages ||
      a->n_local < 1 || a->n_local > CM_KATTN_MAX_LOCAL || a->nb != s0->n_dom - 2 ||
      s0->n_red != 1 || s0->gemm_a < 0 || s0->gemm_b < 0 || a->role[0] != CM_KATTN_ROLE_TILE)
    return false;
  p.nb = a->nb, p.span = a->span, p.rows = a->rows, p.keys = s0->dom[p.nb + 1];
  p.d = s0->red[0], p.batch = cu_prod(s0->dom, p.nb);
  int ntile = 0, nstat = 0;
  for (int i = 0; i < a->n_local; i++) {
    if (a->local[i] < 0 || a->local[i] >= k->n_buffers) return false;
    if (a->local_row[i] == 1)
      nstat++;
    else
      ntile++;
  }
  for (int r = 0; r < p.span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    int role = a->role[r];
    p.acc_off[r] = -1;
    if (role == CM_KATTN_ROLE_TILE || role == CM_KATTN_ROLE_ROWRED ||
        role == CM_KATTN_ROLE_GEMM_TILE) {
      if (s->n_stores != 1 || fb_cuda_local(a, s->stores[0].buf) < 0) return false;
      if (role != CM_KATTN_ROLE_TILE && s->n_red != 1) return false;
      if (role == CM_KATTN_ROLE_GEMM_TILE && (s->gemm_a < 0 || s->gemm_b < 0)) return false;
    } else if (role == CM_KATTN_ROLE_GEMM_ROWS || role == CM_KATTN_ROLE_GEMM_KEYS) {
      if (s->n_dom < 2 || s->n_red != 1 || s->gemm_a < 0 || s->gemm_b < 0) return false;
      if (role == CM_KATTN_ROLE_GEMM_ROWS) {
        p.acc_off[r] = p.acc_floats;
        p.acc_floats += p.rows * s->dom[s->n_dom - 1];
      }
    } else {
      return false;
    }
  }
  int64_t bc = a->bc < 64 ? a->bc : 64;
  if (bc < 1 || p.keys < 1) return false;
  for (;;) {
    /* in dynamic shared memory each local's region is rounded to 16 bytes (4 floats) */
    int64_t al = dyn ? 4 : 1;
    double fl = (double)p.acc_floats + (double)nstat * (double)((p.rows + al - 1) / al * al) +
                (double)ntile * (double)((p.rows * bc + al - 1) / al * al);
    if (fl <= smem_floats) break;
    if (bc == 1) return false;
    bc = bc / 2;
  }
  p.bc = (int)bc;
  p.nkb = (int)((p.keys + bc - 1) / bc);
  if ((double)p.batch > 2147483647.0) return false;
  *out = p;
  return true;
}

bool cu_plan_stream_bwd(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out) {
  if (plan_stream_bwd(k, first, (double)(t->shared_bytes_static / 4), false, out)) return true;
  /* accumulators or tiles beyond the static 48 KiB (the 197-token f32 backward at head dim 64:
   * dQ's accumulator alone is 49 KiB): dynamic shared memory up to the opt-in limit */
  if (t->shared_bytes_max <= t->shared_bytes_static ||
      !plan_stream_bwd(k, first, (double)(t->shared_bytes_max / 4), true, out))
    return false;
  out->dyn_shared = true;
  return true;
}

static void fb_cuda_block_head(sbuf *o, const cm_kcuda_attn *p) {
  cu_sb_printf(o, "  for (int kb_ = 0; kb_ < %d; kb_++) {\n", p->nkb);
  cu_sb_printf(o, "  const long long j0_ = (long long)kb_ * %d;\n", p->bc);
  cu_sb_printf(o, "  const int bc_ = %lldLL - j0_ < %d ? (int)(%lldLL - j0_) : %d;\n",
               (long long)p->keys, p->bc, (long long)p->keys, p->bc);
}

/* Role stage r of the backward span in pass 0 or 1 of a key block. */
static void fb_role(rctx *c, const cm_kcuda_attn *p, const cm_kattn *a, int r, int pass,
                    const bool *dep) {
  sbuf *o = c->o;
  long long R = (long long)p->rows;
  int BC = p->bc;
  const cm_kstage *s = c->s;
  int role = a->role[r];
  if (role == CM_KATTN_ROLE_TILE || role == CM_KATTN_ROLE_GEMM_TILE) {
    int li = fb_cuda_local(a, s->stores[0].buf);
    if (pass == 0 && dep[li]) return;
    int val = s->stores[0].value;
    cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld * bc_; p_ += %d) {\n", R, p->threads);
    cu_sb_printf(o, "    const int r_ = p_ / bc_, j_ = p_ %% bc_;\n    float acc = 0.f;\n");
    if (r == 0 || role == CM_KATTN_ROLE_GEMM_TILE) { /* S' = Q K^T, dP = dO V^T */
      cu_sb_printf(o, "    for (int k_ = 0; k_ < %lld; k_++) {\n", (long long)s->red[0]);
      cu_attn_point(c, p->nb, false, "      ", "r_", "j0_ + j_", "k_");
      cu_emit_tree(c, s->gemm_a, "        ", "acc");
      cu_emit_tree(c, s->gemm_b, "        ", "acc");
      cu_sb_printf(o, "        acc += (float)(e%d) * (float)(e%d);\n      }\n    }\n", s->gemm_a,
                   s->gemm_b);
    }
    cu_attn_point(c, p->nb, false, "    ", "r_", "j0_ + j_", NULL);
    cu_emit_tree(c, val, "      ", "acc");
    /* the store's rounding: the tile has its buffer's dtype (f32, or autocast's bf16) */
    cm_dtype td = c->k->buffers[s->stores[0].buf].dtype;
    char ev[32], cv[96];
    snprintf(ev, sizeof ev, "e%d", val);
    cu_cast_code(cv, sizeof cv, s->exprs[val].dtype, td, ev);
    const char *pack = td == CM_BF16 ? "cm_f2bf" : td == CM_F16 ? "cm_f2h" : "";
    cu_sb_printf(o, "      fbl%d_[r_ * %d + j_] = %s(%s);\n    }\n  }\n", li, BC, pack, cv);
    cu_sb_printf(o, "  __syncthreads();\n");
  } else if (role == CM_KATTN_ROLE_ROWRED && pass == 0) {
    int li = fb_cuda_local(a, s->stores[0].buf);
    char comb[256];
    cu_sb_printf(o, "  for (int r_ = tid_; r_ < %lld; r_ += %d) {\n", R, p->threads);
    cu_sb_printf(o, "    %s acc_ = (%s)fbl%d_[r_];\n", cu_ctype(s->acc_dtype),
                 cu_ctype(s->acc_dtype), li);
    cu_sb_printf(o, "    for (int j_ = 0; j_ < bc_; j_++) {\n");
    cu_attn_point(c, p->nb, true, "      ", "r_", NULL, "j0_ + j_");
    cu_emit_tree(c, s->body, "        ", "acc_");
    char bv[96];
    snprintf(bv, sizeof bv, "(%s)(e%d)", cu_ctype(s->acc_dtype), s->body);
    cu_acc_combine(s, "acc_", bv, comb, sizeof comb);
    cu_sb_printf(o, "        acc_ = %s;\n      }\n    }\n", comb);
    cu_sb_printf(o, "    fbl%d_[r_] = (float)acc_;\n  }\n  __syncthreads();\n", li);
  } else if (role == CM_KATTN_ROLE_GEMM_ROWS && pass == 1) {
    long long C = (long long)s->dom[s->n_dom - 1];
    cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += %d) {\n", R * C, p->threads);
    cu_sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", C, C);
    cu_sb_printf(o, "    float acc = fbacc_[%lld + p_];\n", (long long)p->acc_off[r]);
    cu_sb_printf(o, "    for (int j_ = 0; j_ < bc_; j_++) {\n");
    cu_attn_point(c, p->nb, false, "      ", "r_", "c_", "j0_ + j_");
    cu_emit_tree(c, s->gemm_a, "        ", "acc");
    cu_emit_tree(c, s->gemm_b, "        ", "acc");
    cu_sb_printf(o, "        acc += (float)(e%d) * (float)(e%d);\n      }\n    }\n", s->gemm_a,
                 s->gemm_b);
    cu_sb_printf(o, "    fbacc_[%lld + p_] = acc;\n  }\n", (long long)p->acc_off[r]);
  } else if (role == CM_KATTN_ROLE_GEMM_KEYS && pass == 1) {
    long long C = (long long)s->dom[s->n_dom - 1];
    cu_sb_printf(o, "  for (int p_ = tid_; p_ < bc_ * %lld; p_ += %d) {\n", C, p->threads);
    cu_sb_printf(o, "    const int j_ = p_ / %lld, c_ = p_ %% %lld;\n    float acc = 0.f;\n", C, C);
    cu_sb_printf(o, "    for (int r_ = 0; r_ < %lld; r_++) {\n", R);
    cu_attn_point(c, p->nb, false, "      ", "j0_ + j_", "c_", "r_");
    cu_emit_tree(c, s->gemm_a, "        ", "acc");
    cu_emit_tree(c, s->gemm_b, "        ", "acc");
    cu_sb_printf(o, "        acc += (float)(e%d) * (float)(e%d);\n      }\n    }\n", s->gemm_a,
                 s->gemm_b);
    cu_attn_point(c, p->nb, false, "    ", "j0_ + j_", "c_", NULL);
    cu_emit_stores(c, "      ", "acc");
    cu_sb_printf(o, "    }\n  }\n");
  }
}

cm_status cu_render_stream_bwd(const cm_kernel *k, int first, const cm_kcuda_attn *p,
                               int min_blocks, sbuf *o, const bool *written, cm_err *err) {
  const cm_kattn *a = &k->stages[first].attn;
  rctx cs[CM_KATTN_MAX_SPAN];
  memset(cs, 0, sizeof cs);
  cm_status st = CM_OK;
  int opened = 0;
  for (int r = 0; r < p->span && st == CM_OK; r++, opened++)
    st = cu_rctx_open(&cs[r], k, first + r, o, err);
  char **sub = calloc((size_t)k->n_buffers + 1, sizeof *sub);
  if (st == CM_OK && !sub) st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  for (int i = 0; st == CM_OK && i < a->n_local; i++) {
    char t[64];
    if (a->local_row[i] == 1)
      snprintf(t, sizeof t, "fbl%d_[r_]", i);
    else
      snprintf(t, sizeof t, "fbl%d_[r_ * %d + j_]", i, p->bc);
    sub[a->local[i]] = malloc(strlen(t) + 1);
    if (!sub[a->local[i]]) {
      st = cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
      break;
    }
    memcpy(sub[a->local[i]], t, strlen(t) + 1);
  }
  if (st == CM_OK) {
    long long R = (long long)p->rows;
    int BC = p->bc;
    for (int r = 0; r < p->span; r++) cs[r].subst = (const char *const *)sub;
    /* without row reductions over the keys (the recomputed backward) one pass */
    bool two_pass = false;
    for (int r = 0; r < p->span; r++) two_pass |= a->role[r] == CM_KATTN_ROLE_ROWRED;
    cu_sb_printf(o,
                 "// stages %d..%d (attention backward, streaming: %lld query rows x %d keys per "
                 "step, %d key blocks, %s)\n",
                 first, first + a->span - 1, R, BC, p->nkb, two_pass ? "two passes" : "one pass");
    char bounds[64];
    cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
    cu_signature(&cs[0], written, bounds);
    if (p->dyn_shared) { /* 4 bytes a slot whatever the tile's dtype, as the plan counts */
      int64_t off = 0;
      cu_sb_printf(o, "  extern __shared__ __align__(16) unsigned char dsm_[];\n");
      for (int i = 0; i < a->n_local; i++) {
        const char *ty = cu_stype(k->buffers[a->local[i]].dtype);
        cu_sb_printf(o, "  %s *const fbl%d_ = (%s *)(dsm_ + %lld);\n", ty, i, ty, (long long)off);
        off += 4 * (a->local_row[i] == 1 ? R : R * BC);
        off = (off + 15) / 16 * 16;
      }
      if (p->acc_floats > 0)
        cu_sb_printf(o, "  float *const fbacc_ = (float *)(dsm_ + %lld);\n", (long long)off);
    } else {
      for (int i = 0; i < a->n_local; i++)
        cu_sb_printf(o, "  __shared__ __align__(16) %s fbl%d_[%lld];\n",
                     cu_stype(k->buffers[a->local[i]].dtype), i, a->local_row[i] == 1 ? R : R * BC);
      if (p->acc_floats > 0)
        cu_sb_printf(o, "  __shared__ __align__(16) float fbacc_[%lld];\n",
                     (long long)p->acc_floats);
    }
    cu_sb_printf(o, "  const long long bi_ = blockIdx.x;\n  const int tid_ = threadIdx.x;\n");
    cu_sb_printf(o, "  (void)bi_;\n  {\n");
    if (p->nb > 0) {
      cu_decompose(&cs[0], "  ", "bi_", 0, k->stages[first].dom, p->nb);
      for (int v = 0; v < p->nb; v++) cu_sb_printf(o, "  const long long bv%d_ = v%d;\n", v, v);
    }
    /* reduction starts and zero accumulators */
    for (int r = 0; r < p->span; r++) {
      const cm_kstage *s = cs[r].s;
      if (a->role[r] == CM_KATTN_ROLE_ROWRED) {
        char init[96];
        cu_acc_init(s, init, sizeof init);
        int li = fb_cuda_local(a, s->stores[0].buf);
        cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += %d) fbl%d_[p_] = (float)(%s);\n", R,
                     p->threads, li, init);
      }
    }
    if (p->acc_floats > 0)
      cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += %d) fbacc_[p_] = 0.f;\n",
                   (long long)p->acc_floats, p->threads);
    cu_sb_printf(o, "  __syncthreads();\n");
    /* tiles that depend on a row statistic (directly or through a tile) wait for pass 2 */
    bool dep[CM_KATTN_MAX_LOCAL] = {false};
    for (int r = 0; r < p->span; r++) {
      const cm_kstage *s = cs[r].s;
      if (a->role[r] != CM_KATTN_ROLE_TILE) continue;
      int li = fb_cuda_local(a, s->stores[0].buf);
      for (int x = 0; x < s->n_exprs; x++) {
        if (s->exprs[x].kind != CM_KX_LOAD) continue;
        int lj = fb_cuda_local(a, s->exprs[x].buf);
        if (lj >= 0 && (a->local_row[lj] == 1 || dep[lj])) dep[li] = true;
      }
    }
    for (int pass = two_pass ? 0 : 1; pass < 2; pass++) {
      cu_sb_printf(o, "  // pass %d\n", pass + 1);
      fb_cuda_block_head(o, p);
      for (int r = 0; r < p->span; r++) {
        fb_role(&cs[r], p, a, r, pass, dep);
      }
      cu_sb_printf(o, "  __syncthreads();\n  }\n");
    }
    /* the epilogues of the GEMMs accumulated over the key blocks */
    for (int r = 0; r < p->span; r++) {
      if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS) continue;
      rctx *c = &cs[r];
      long long C = (long long)c->s->dom[c->s->n_dom - 1];
      cu_sb_printf(o, "  for (int p_ = tid_; p_ < %lld; p_ += %d) {\n", R * C, p->threads);
      cu_sb_printf(o, "    const int r_ = p_ / %lld, c_ = p_ %% %lld;\n", C, C);
      cu_sb_printf(o, "    const float acc = fbacc_[%lld + p_];\n", (long long)p->acc_off[r]);
      cu_attn_point(c, p->nb, false, "    ", "r_", "c_", NULL);
      cu_emit_stores(c, "      ", "acc");
      cu_sb_printf(o, "    }\n  }\n");
    }
    cu_sb_printf(o, "  }\n}\n\n");
    for (int r = 0; r < p->span && st == CM_OK; r++) st = cs[r].st;
  }
  if (sub)
    for (int b = 0; b < k->n_buffers; b++) free(sub[b]);
  free(sub);
  for (int r = 0; r < opened; r++) cu_rctx_close(&cs[r]);
  if (st == CM_OK) st = cu_span_stubs(k, first, a->span, o, written, err);
  return st;
}
