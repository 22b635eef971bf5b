/* codegen/render_cuda_mma.c — the tensor-core GEMM template for sm_80+ (bf16/f16 operands, f32
 * accumulation): its plan (cu_plan_mma: warp grid, warp tile, k tile, pipeline depth, in-block
 * split-K, swizzle, operand paths, from a cost model) and its rendering (cu_render_mma).
 *
 * A block computes an mc x nc tile of C with warps_m x warps_n warps of mr x nr each (times
 * split_k warp groups that share the k tile's 16-deep steps and are summed through shared memory
 * at the end). Operand tiles (kc deep) go through a `stages`-deep ring in dynamic shared memory:
 * a plain bf16/f16 load whose 8-element chunks are contiguous and 16-byte aligned is copied by
 * cp.async (zero-filled past the bounds); any other operand (a prologue: a cast of an f32 load, a
 * scale, an im2col) is evaluated 8 elements a thread into registers, packed and stored 16 bytes
 * at once. One __syncthreads per k tile; fragments come from ldmatrix (.trans for the operand
 * layouts stored k-outer), rows XOR-swizzled so that ldmatrix and the 16-byte stores are free of
 * bank conflicts. The epilogue (the stage's store expressions) runs per accumulator element from
 * registers. */
#include "render_cuda.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MMA_TARGET_BLOCKS 120 /* blocks that keep an sm_80/sm_90 part's SMs busy (108-132) */

/* ---- operand analysis --------------------------------------------------------------- */

/* i64 expression e as c0 + sum coef[v] * v over variables; false when it is not affine. */
static bool lin_form(const cm_kstage *s, int e, int64_t *coef, int64_t *c0) {
  if (e < 0 || e >= s->n_exprs) return false;
  const cm_kexpr *x = &s->exprs[e];
  if (x->kind == CM_KX_VAR) {
    memset(coef, 0, sizeof(int64_t) * CM_KMAX_VARS);
    if (x->var < 0 || x->var >= CM_KMAX_VARS) return false;
    coef[x->var] = 1;
    *c0 = 0;
    return true;
  }
  double v;
  if (x->kind == CM_KX_CONST) {
    if (!cm_kx_is_const(s, e, &v) || v != (double)(int64_t)v) return false;
    memset(coef, 0, sizeof(int64_t) * CM_KMAX_VARS);
    *c0 = (int64_t)v;
    return true;
  }
  if (x->kind != CM_KX_OP || x->dtype != CM_I64) return false;
  int64_t ca[CM_KMAX_VARS], cb[CM_KMAX_VARS], a0, b0;
  if (x->op == CM_OP_ADD || x->op == CM_OP_SUB) {
    if (!lin_form(s, x->a, ca, &a0) || !lin_form(s, x->b, cb, &b0)) return false;
    int64_t sg = x->op == CM_OP_ADD ? 1 : -1;
    for (int i = 0; i < CM_KMAX_VARS; i++) coef[i] = ca[i] + sg * cb[i];
    *c0 = a0 + sg * b0;
    return true;
  }
  if (x->op == CM_OP_MUL) {
    int other = -1;
    if (cm_kx_is_const(s, x->b, &v))
      other = x->a;
    else if (cm_kx_is_const(s, x->a, &v))
      other = x->b;
    if (other < 0 || fabs(v) > 1e12 || v != (double)(int64_t)v || !lin_form(s, other, ca, &a0))
      return false;
    for (int i = 0; i < CM_KMAX_VARS; i++) coef[i] = ca[i] * (int64_t)v;
    *c0 = a0 * (int64_t)v;
    return true;
  }
  return false;
}

/* The first load found depth-first under e, or -1. */
static int first_load(const cm_kstage *s, int e, int depth) {
  if (e < 0 || e >= s->n_exprs || depth > 16) return -1;
  const cm_kexpr *x = &s->exprs[e];
  if (x->kind == CM_KX_LOAD) return e;
  if (x->kind != CM_KX_OP) return -1;
  int r = first_load(s, x->a, depth + 1);
  if (r < 0) r = first_load(s, x->b, depth + 1);
  if (r < 0) r = first_load(s, x->c, depth + 1);
  return r;
}

/* Operand root (A: rv = i, B: rv = j) read by cp.async: a plain load of the mma dtype, 8
 * consecutive elements of its contiguous var (k, or rv) contiguous and 16-byte aligned apart
 * from the buffer's base (checked at run time). *outer_k: k is the tile's outer (row) var. */
static bool async_operand(const cm_kstage *s, int root, int rv, cm_dtype dt, bool *outer_k) {
  const cm_kexpr *x = &s->exprs[root];
  int64_t coef[CM_KMAX_VARS], c0;
  if (x->kind != CM_KX_LOAD || x->dtype != dt || !lin_form(s, x->a, coef, &c0)) return false;
  int kv = s->n_dom;
  bool k_inner = coef[kv] == 1, r_inner = coef[rv] == 1 && !k_inner;
  if (!k_inner && !r_inner) return false;
  if (c0 % 8) return false;
  for (int v = 0; v < CM_KMAX_VARS; v++)
    if (coef[v] % 8 && v != (k_inner ? kv : rv)) return false;
  *outer_k = r_inner;
  return true;
}

/* The shared layout of a prologue operand: k outer when its first load is contiguous along rv. */
static bool prologue_outer_k(const cm_kstage *s, int root, int rv) {
  int l = first_load(s, root, 0);
  int64_t coef[CM_KMAX_VARS], c0;
  if (l < 0 || !lin_form(s, s->exprs[l].a, coef, &c0)) return false;
  return coef[rv] == 1 && coef[s->n_dom] != 1;
}

/* ---- shared-memory tiles ------------------------------------------------------------- */

/* One operand's tile in a pipeline stage: rows x (cpr 16-byte chunks) of b16. */
typedef struct mma_tile {
  int rows, cpr;
  int stride;   /* elements per row: cpr * 8, + 8 when not swizzled */
  int sh, mask; /* swizzle: chunk ^ ((row >> sh) & mask) */
  int elems;    /* rows * stride */
} mma_tile;

static int ilog2(int v) {
  int l = 0;
  while ((1 << (l + 1)) <= v) l++;
  return l;
}

static mma_tile tile_of(const cm_kcuda_gemm *p, bool is_a) {
  mma_tile t;
  int mn = is_a ? p->mc : p->nc;
  bool outer_k = is_a ? p->a_outer_k : p->b_outer_k;
  t.rows = outer_k ? p->kc : mn;
  t.cpr = (outer_k ? mn : p->kc) / 8;
  t.stride = t.cpr * 8 + (p->swizzle ? 0 : 8);
  /* 8 consecutive rows' chunk c land in 8 distinct 16-byte bank groups */
  t.sh = t.cpr >= 8 ? 0 : ilog2(8 / t.cpr);
  t.mask = (t.cpr < 8 ? t.cpr : 8) - 1;
  if (!p->swizzle) t.mask = 0;
  t.elems = t.rows * t.stride;
  return t;
}

int64_t cu_mma_shared_bytes(const cm_kcuda_gemm *p) {
  mma_tile a = tile_of(p, true), b = tile_of(p, false);
  int64_t pipe = (int64_t)p->stages * (a.elems + b.elems) * 2;
  int64_t red = (int64_t)(p->split_k - 1) * p->mc * p->nc * 4;
  return pipe > red ? pipe : red;
}

/* "element offset of chunk c of row r" as C */
static void tile_off(char *out, size_t n, const mma_tile *t, const char *r, const char *c) {
  if (t->mask)
    snprintf(out, n, "((%s) * %d + ((((%s) ^ (((%s) >> %d) & %d))) << 3))", r, t->stride, c, r,
             t->sh, t->mask);
  else
    snprintf(out, n, "((%s) * %d + ((%s) << 3))", r, t->stride, c);
}

/* ---- the plan ------------------------------------------------------------------------ */

typedef struct mma_shape {
  int warps_m, warps_n, mr, nr;
  double efficiency; /* the cost model's relative throughput of the block tile */
} mma_shape;

static const mma_shape SHAPES[] = {
    {2, 4, 64, 32, 1.0}, /* 128 x 128, 8 warps */
    {2, 2, 64, 32, 0.9}, /* 128 x 64 */
    {2, 2, 32, 32, 0.8}, /* 64 x 64 */
    {2, 2, 16, 16, 0.5}, /* 32 x 32 */
};

/* Whether p's tunable fields make a template this file renders (and derives the rest). */
bool cu_mma_plan_valid(cm_kcuda_gemm *p, const cm_target *t) {
  bool pow2 = true;
  int v[] = {p->warps_m, p->warps_n, p->mr, p->nr, p->kc, p->split_k};
  for (int i = 0; i < 6; i++) pow2 = pow2 && v[i] > 0 && (v[i] & (v[i] - 1)) == 0;
  if (!pow2 || p->mr < 16 || p->nr < 16 || p->kc < 16 || p->kc > 64 || p->stages < 2 ||
      p->stages > 8 || (p->kc / 16) % p->split_k)
    return false;
  p->mc = p->warps_m * p->mr;
  p->nc = p->warps_n * p->nr;
  p->warps = p->warps_m * p->warps_n * p->split_k;
  p->threads = p->warps * 32;
  if (p->threads > t->max_threads_per_block || (p->mr / 16) * (p->nr / 8) > 32) return false;
  return cu_mma_shared_bytes(p) <= t->shared_bytes_max;
}

/* The cost model: the shape with the least padded work per unit of throughput, blocks that
 * leave SMs idle counted as lost throughput. */
static const mma_shape *pick_shape(const cm_kcuda_gemm *p) {
  const mma_shape *best = &SHAPES[0];
  double best_cost = 0;
  for (size_t i = 0; i < sizeof SHAPES / sizeof *SHAPES; i++) {
    const mma_shape *sh = &SHAPES[i];
    int64_t mc = sh->warps_m * sh->mr, nc = sh->warps_n * sh->nr;
    int64_t bm = (p->M + mc - 1) / mc, bn = (p->N + nc - 1) / nc;
    double blocks = (double)bm * (double)bn * (double)p->batch;
    double fill = blocks >= MMA_TARGET_BLOCKS ? 1.0 : blocks / MMA_TARGET_BLOCKS;
    double cost = blocks * (double)(mc * nc) / (sh->efficiency * fill);
    if (i == 0 || cost < best_cost) {
      best = sh;
      best_cost = cost;
    }
  }
  return best;
}

int cm_cuda_gemm_k_split(const cm_kstage *s, const cm_target *t) {
  if (!t || t->kind != CM_TARGET_CUDA || !t->mma_bf16 || s->gemm_a < 0 || s->gemm_a >= s->n_exprs ||
      s->gemm_b < 0 || s->gemm_b >= s->n_exprs)
    return 0;
  cm_dtype da = s->exprs[s->gemm_a].dtype, db = s->exprs[s->gemm_b].dtype;
  if (da != db || (da != CM_BF16 && da != CM_F16)) return 0;
  int64_t M = s->dom[s->n_dom - 2], N = s->dom[s->n_dom - 1], K = s->red[0];
  int64_t blocks = cu_prod(s->dom, s->n_dom - 2) * ((M + 127) / 128) * ((N + 127) / 128);
  if (blocks >= MMA_TARGET_BLOCKS || K < 2048) return 0;
  /* the fewest parts that fill the SMs with the largest tiles, each part K >= 512 long */
  int best = 0;
  for (int S = 2; S <= 16; S++) {
    if (K % S || K / S < 512) continue;
    best = S;
    if (blocks * S >= MMA_TARGET_BLOCKS) break;
  }
  return best;
}

bool cu_plan_mma(const cm_kstage *s, const cm_target *t, cm_kcuda_gemm *p) {
  cm_dtype dt = p->bf16 ? CM_BF16 : CM_F16;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  p->a_async = async_operand(s, s->gemm_a, iv, dt, &p->a_outer_k);
  if (!p->a_async) p->a_outer_k = prologue_outer_k(s, s->gemm_a, iv);
  p->b_async = async_operand(s, s->gemm_b, jv, dt, &p->b_outer_k);
  if (!p->b_async) p->b_outer_k = prologue_outer_k(s, s->gemm_b, jv);
  const mma_shape *sh = pick_shape(p);
  p->warps_m = sh->warps_m;
  p->warps_n = sh->warps_n;
  p->mr = sh->mr;
  p->nr = sh->nr;
  p->kc = 32;
  p->swizzle = true;
  p->split_k = 1;
  /* few blocks over a long K: a second warp group per block takes every other k step */
  int64_t blocks = ((p->M + p->warps_m * p->mr - 1) / (p->warps_m * p->mr)) *
                   ((p->N + p->warps_n * p->nr - 1) / (p->warps_n * p->nr)) * p->batch;
  if (blocks < 2 * MMA_TARGET_BLOCKS && p->K >= 1024 && sh->warps_m * sh->warps_n <= 4)
    p->split_k = 2;
  /* 3 k tiles in flight hide a global load's latency; a short K needs no more than it has */
  int64_t nk = (p->K + p->kc - 1) / p->kc;
  for (p->stages = nk + 1 < 4 ? (int)nk + 1 < 2 ? 2 : (int)nk + 1 : 4; p->stages >= 2; p->stages--)
    if (cu_mma_plan_valid(p, t)) return true;
  return false;
}

/* ---- rendering ----------------------------------------------------------------------- */

typedef struct operand_view {
  bool is_a, async, outer_k;
  int root, rv;       /* expression; its row/column var (i or j) */
  const char *origin; /* m0_ or n0_ */
  int64_t ext;        /* M or N */
  mma_tile t;
  bool f32_vec; /* a prologue that is a cast of an f32 load, 4-element aligned along the rows:
                   whole chunks read as two float4 */
  int64_t coef[CM_KMAX_VARS], c0; /* async, f32_vec: the load's affine index */
  int buf;
} operand_view;

/* Whether root is CAST(LOAD of f32) to dt whose index is affine, contiguous along inner_var and
 * 4-element aligned otherwise (v gets the load's form). */
static bool f32_cast_operand(const cm_kstage *s, int root, cm_dtype dt, int inner_var,
                             operand_view *v) {
  const cm_kexpr *x = &s->exprs[root];
  if (x->kind != CM_KX_OP || x->op != CM_OP_CAST || x->dtype != dt || x->a < 0) return false;
  const cm_kexpr *l = &s->exprs[x->a];
  if (l->kind != CM_KX_LOAD || l->dtype != CM_F32 || !lin_form(s, l->a, v->coef, &v->c0))
    return false;
  if (v->coef[inner_var] != 1 || v->c0 % 4) return false;
  for (int i = 0; i < CM_KMAX_VARS; i++)
    if (i != inner_var && v->coef[i] % 4) return false;
  v->buf = l->buf;
  return true;
}

static void emit_batch_base(rctx *c, const operand_view *v, const char *name) {
  cu_sb_printf(c->o, "      const long long %s = %lldLL", name, (long long)v->c0);
  for (int b = 0; b < c->s->n_dom - 2; b++)
    if (v->coef[b]) cu_sb_printf(c->o, " + %lldLL * v%d", (long long)v->coef[b], b);
  cu_sb_printf(c->o, ";\n");
}

/* The tile-loading code of one operand into stage slot `slot_`, k tile at `k0_`: per chunk
 * (row r_, chunk c_) of the tile a cp.async, or 8 prologue evaluations packed into one 16-byte
 * store. */
static void emit_load_tile(rctx *c, const cm_kcuda_gemm *p, const operand_view *v) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int kv = s->n_dom, total = v->t.rows * v->t.cpr;
  const char *T = v->is_a ? "As_" : "Bs_";
  char off[256];
  tile_off(off, sizeof off, &v->t, "r_", "c_");
  /* rows are the outer var, chunks run along the inner one */
  int row_var = v->outer_k ? kv : v->rv, col_var = v->outer_k ? v->rv : kv;
  const char *row0 = v->outer_k ? "k0_" : v->origin, *col0 = v->outer_k ? v->origin : "k0_";
  long long row_ext = v->outer_k ? (long long)p->K : (long long)v->ext;
  long long col_ext = v->outer_k ? (long long)v->ext : (long long)p->K;
  cu_sb_printf(o,
               "#pragma unroll\n"
               "        for (int t_ = threadIdx.x; t_ < %d; t_ += %d) {\n"
               "          const int r_ = t_ / %d, c_ = t_ %% %d;\n"
               "          unsigned short *dst_ = %s + slot_ * %d + %s;\n"
               "          const long long row_ = %s + r_, col_ = %s + c_ * 8;\n",
               total, p->threads, v->t.cpr, v->t.cpr, T, v->t.elems, off, row0, col0);
  if (v->async) {
    const char *base = v->is_a ? "abase_" : "bbase_", *al = v->is_a ? "aal_" : "bal_";
    cu_sb_printf(o,
                 "          const long long left_ = row_ < %lldLL ? %lldLL - col_ : 0;\n"
                 "          const int n_ = left_ < 0 ? 0 : left_ > 8 ? 8 : (int)left_;\n"
                 "          const unsigned short *src_ = b%d + (n_ ? %s + %lldLL * row_ + "
                 "%lldLL * col_ : 0);\n"
                 "          if (%s) {\n"
                 "            cm_cp_async16(dst_, src_, 2 * n_);\n"
                 "          } else { /* a buffer not 16-byte aligned: element by element */\n"
                 "            unsigned short h_[8];\n"
                 "#pragma unroll\n"
                 "            for (int e_ = 0; e_ < 8; e_++) h_[e_] = e_ < n_ ? src_[e_] : 0;\n"
                 "            *(uint4 *)dst_ = make_uint4(cm_pack16(h_[0], h_[1]), "
                 "cm_pack16(h_[2], h_[3]), cm_pack16(h_[4], h_[5]), cm_pack16(h_[6], h_[7]));\n"
                 "          }\n",
                 row_ext, col_ext, v->buf, base, (long long)v->coef[row_var],
                 (long long)v->coef[col_var], al);
  } else {
    if (v->f32_vec) {
      const char *base = v->is_a ? "abase_" : "bbase_", *al = v->is_a ? "aal_" : "bal_";
      cu_sb_printf(o,
                   "          const long long left_ = row_ < %lldLL ? %lldLL - col_ : 0;\n"
                   "          if (%s && left_ >= 8) { /* a whole chunk: two 16-byte loads */\n"
                   "            const float4 *p_ = (const float4 *)(b%d + %s + %lldLL * row_ + "
                   "col_);\n"
                   "            const float4 u_ = p_[0], w_ = p_[1];\n"
                   "            *(uint4 *)dst_ = make_uint4(%s(u_.x, u_.y), %s(u_.z, u_.w), "
                   "%s(w_.x, w_.y), %s(w_.z, w_.w));\n"
                   "          } else {\n",
                   row_ext, col_ext, al, v->buf, base, (long long)v->coef[row_var],
                   p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2",
                   p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2",
                   p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2",
                   p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2");
    }
    cu_sb_printf(o,
                 "          float x_[8];\n"
                 "#pragma unroll\n"
                 "          for (int e_ = 0; e_ < 8; e_++) {\n"
                 "            const long long v%d = row_, v%d = col_ + e_;\n"
                 "            float val_ = 0.0f;\n"
                 "            if (v%d < %lldLL && v%d < %lldLL) {\n",
                 row_var, col_var, row_var, row_ext, col_var, col_ext);
    memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
    cu_emit_tree(c, v->root, "              ", "acc");
    cu_sb_printf(o,
                 "              val_ = (float)e%d;\n"
                 "            }\n"
                 "            x_[e_] = val_;\n"
                 "          }\n"
                 "          *(uint4 *)dst_ = make_uint4(%s(x_[0], x_[1]), %s(x_[2], x_[3]), "
                 "%s(x_[4], x_[5]), %s(x_[6], x_[7]));\n",
                 v->root, p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2",
                 p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2",
                 p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2",
                 p->bf16 ? "cm_pack_bf16x2" : "cm_pack_f16x2");
    memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
    if (v->f32_vec) cu_sb_printf(o, "          }\n");
  }
  cu_sb_printf(o, "        }\n");
}

/* Fragments of one 16-deep k step at kk_ from stage tile At_/Bt_: A by ldmatrix.x4 per 16 rows,
 * B by ldmatrix.x4 per 16 columns (two n8 fragments). */
static void emit_fragments(rctx *c, const cm_kcuda_gemm *p, const mma_tile *ta,
                           const mma_tile *tb) {
  sbuf *o = c->o;
  int fm = p->mr / 16, fn = p->nr / 8;
  char off[256];
  cu_sb_printf(o, "          unsigned af_[%d][4], bf_[%d][2];\n", fm, fn);
  /* lane l addresses row (l & 7) of matrix l >> 3 */
  cu_sb_printf(o, "#pragma unroll\n          for (int x_ = 0; x_ < %d; x_++) {\n", fm);
  if (!p->a_outer_k) { /* A[m][k]: (m 0-7, k 0-7) (m 8-15, k 0-7) (m 0-7, k 8-15) ... */
    cu_sb_printf(o,
                 "            const int r_ = wm_ * %d + x_ * 16 + (lane_ & 15), c_ = (kk_ >> "
                 "3) + (lane_ >> 4);\n",
                 p->mr);
    tile_off(off, sizeof off, ta, "r_", "c_");
    cu_sb_printf(o, "            cm_ldmatrix<4, false>(af_[x_], At_ + %s);\n", off);
  } else { /* A[k][m], transposed: (k 0-7, m 0-7) (k 0-7, m 8-15) (k 8-15, m 0-7) ... */
    cu_sb_printf(o,
                 "            const int r_ = kk_ + (lane_ & 7) + ((lane_ >> 4) << 3), c_ = "
                 "((wm_ * %d + x_ * 16) >> 3) + ((lane_ >> 3) & 1);\n",
                 p->mr);
    tile_off(off, sizeof off, ta, "r_", "c_");
    cu_sb_printf(o, "            cm_ldmatrix<4, true>(af_[x_], At_ + %s);\n", off);
  }
  cu_sb_printf(o, "          }\n");
  cu_sb_printf(o, "#pragma unroll\n          for (int y_ = 0; y_ < %d; y_ += 2) {\n", fn);
  cu_sb_printf(o, "            unsigned t_[4];\n");
  if (!p->b_outer_k) { /* B[n][k]: (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) ... */
    cu_sb_printf(o,
                 "            const int r_ = wn_ * %d + y_ * 8 + (lane_ & 7) + ((lane_ >> 4) << "
                 "3), c_ = (kk_ >> 3) + ((lane_ >> 3) & 1);\n",
                 p->nr);
    tile_off(off, sizeof off, tb, "r_", "c_");
    cu_sb_printf(o, "            cm_ldmatrix<4, false>(t_, Bt_ + %s);\n", off);
  } else { /* B[k][n], transposed: (k 0-7, n 0-7) (k 8-15, n 0-7) (k 0-7, n 8-15) ... */
    cu_sb_printf(o,
                 "            const int r_ = kk_ + (lane_ & 7) + (((lane_ >> 3) & 1) << 3), c_ "
                 "= ((wn_ * %d + y_ * 8) >> 3) + (lane_ >> 4);\n",
                 p->nr);
    tile_off(off, sizeof off, tb, "r_", "c_");
    cu_sb_printf(o, "            cm_ldmatrix<4, true>(t_, Bt_ + %s);\n", off);
  }
  cu_sb_printf(o, "            bf_[y_][0] = t_[0];\n            bf_[y_][1] = t_[1];\n"
                  "            bf_[y_ + 1][0] = t_[2];\n            bf_[y_ + 1][1] = t_[3];\n"
                  "          }\n");
  cu_sb_printf(o,
               "#pragma unroll\n          for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n            for (int y_ = 0; y_ < %d; y_++)\n"
               "              cm_mma_16816<%s>(acc_[x_][y_], af_[x_], bf_[y_]);\n",
               fm, fn, p->bf16 ? "true" : "false");
}

/* Split-K: warp groups 1.. add their accumulators into group 0's through shared memory (the
 * pipeline's, free once every copy has landed and every warp left the k loop). */
static void emit_split_reduce(rctx *c, const cm_kcuda_gemm *p) {
  int fm = p->mr / 16, fn = p->nr / 8, per = fm * fn * 4;
  int wmn = p->warps_m * p->warps_n;
  cu_sb_printf(c->o,
               "      cm_cp_async_wait<0>();\n"
               "      __syncthreads();\n"
               "      float *red_ = (float *)smem_;\n"
               "      if (ks_ > 0) {\n"
               "        float *mine_ = red_ + ((ks_ - 1) * %d + wr_) * %d * 32 + lane_;\n"
               "#pragma unroll\n"
               "        for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n"
               "          for (int y_ = 0; y_ < %d; y_++)\n"
               "#pragma unroll\n"
               "            for (int h_ = 0; h_ < 4; h_++) mine_[((x_ * %d + y_) * 4 + h_) * 32] = "
               "acc_[x_][y_][h_];\n"
               "      }\n"
               "      __syncthreads();\n"
               "      if (ks_ == 0) {\n"
               "#pragma unroll 1\n"
               "        for (int s_ = 1; s_ < %d; s_++) {\n"
               "          const float *theirs_ = red_ + ((s_ - 1) * %d + wr_) * %d * 32 + lane_;\n"
               "#pragma unroll\n"
               "          for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n"
               "            for (int y_ = 0; y_ < %d; y_++)\n"
               "#pragma unroll\n"
               "              for (int h_ = 0; h_ < 4; h_++) acc_[x_][y_][h_] += theirs_[((x_ * "
               "%d + y_) * 4 + h_) * 32];\n"
               "        }\n"
               "      }\n",
               wmn, per, fm, fn, fn, p->split_k, wmn, per, fm, fn, fn);
}

static bool operand_view_of(rctx *c, const cm_kcuda_gemm *p, bool is_a, operand_view *v) {
  const cm_kstage *s = c->s;
  memset(v, 0, sizeof *v);
  v->is_a = is_a;
  v->root = is_a ? s->gemm_a : s->gemm_b;
  v->rv = is_a ? s->n_dom - 2 : s->n_dom - 1;
  v->origin = is_a ? "m0_" : "n0_";
  v->ext = is_a ? p->M : p->N;
  v->async = is_a ? p->a_async : p->b_async;
  v->outer_k = is_a ? p->a_outer_k : p->b_outer_k;
  v->t = tile_of(p, is_a);
  if (!v->async) {
    v->f32_vec =
        f32_cast_operand(s, v->root, p->bf16 ? CM_BF16 : CM_F16, v->outer_k ? v->rv : s->n_dom, v);
    return true;
  }
  bool outer_k;
  if (!async_operand(s, v->root, v->rv, p->bf16 ? CM_BF16 : CM_F16, &outer_k) ||
      outer_k != v->outer_k)
    return false;
  const cm_kexpr *x = &s->exprs[v->root];
  v->buf = x->buf;
  return lin_form(s, x->a, v->coef, &v->c0);
}

/* The paired store of a stage with one store, to a 2- or 4-byte float buffer at an affine index
 * with j's coefficient 1 and every other even: a thread's accumulators (h, h + 1) are columns j,
 * j + 1 (j even), one 4- or 8-byte store. false: the stage is not of that form. */
static bool emit_epilogue_pairs(rctx *c, const cm_kcuda_gemm *p) {
  const cm_kstage *s = c->s;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  if (s->n_stores != 1 || s->accumulate) return false;
  const cm_kstore *st = &s->stores[0];
  cm_dtype bd = c->k->buffers[st->buf].dtype;
  int64_t coef[CM_KMAX_VARS], c0;
  if ((bd != CM_BF16 && bd != CM_F16 && bd != CM_F32) || !lin_form(s, st->index, coef, &c0) ||
      coef[jv] != 1 || c0 % 2)
    return false;
  for (int v = 0; v < CM_KMAX_VARS; v++)
    if (v != jv && coef[v] % 2) return false;
  sbuf *o = c->o;
  cu_sb_printf(o,
               "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n      for (int y_ = 0; y_ < %d; y_++)\n"
               "#pragma unroll\n      for (int hp_ = 0; hp_ < 2; hp_++) {\n"
               "        const long long v%d = m0_ + wm_ * %d + x_ * 16 + g_ + hp_ * 8;\n"
               "        const long long j0_ = n0_ + wn_ * %d + y_ * 8 + 2 * q_;\n"
               "        if (%sv%d < %lldLL && j0_ < %lldLL) {\n"
               "          float r_[2];\n"
               "#pragma unroll\n"
               "          for (int e_ = 0; e_ < 2; e_++) {\n"
               "            const long long v%d = j0_ + e_;\n"
               "            const float acc = acc_[x_][y_][hp_ * 2 + e_];\n",
               p->mr / 16, p->nr / 8, iv, p->mr, p->nr, p->split_k > 1 ? "ks_ == 0 && " : "", iv,
               (long long)p->M, (long long)p->N, jv);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  cu_emit_tree(c, st->value, "            ", "acc");
  char v[32], cv[256];
  snprintf(v, sizeof v, "e%d", st->value);
  cu_cast_code(cv, sizeof cv, s->exprs[st->value].dtype, bd, v);
  cu_sb_printf(o, "            r_[e_] = %s;\n          }\n", cv);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  cu_sb_printf(o, "          const long long at_ = %lldLL + %lldLL * v%d", (long long)c0,
               (long long)coef[iv], iv);
  for (int b = 0; b < s->n_dom - 2; b++)
    if (coef[b]) cu_sb_printf(o, " + %lldLL * v%d", (long long)coef[b], b);
  cu_sb_printf(o, " + j0_;\n");
  const char *conv = bd == CM_BF16 ? "cm_f2bf" : "cm_f2h";
  if (bd == CM_F32)
    cu_sb_printf(o,
                 "          if (j0_ + 1 < %lldLL) *(float2 *)(b%d + at_) = make_float2(r_[0], "
                 "r_[1]);\n"
                 "          else b%d[at_] = r_[0];\n",
                 (long long)p->N, st->buf, st->buf);
  else
    cu_sb_printf(o,
                 "          if (j0_ + 1 < %lldLL) *(unsigned *)(b%d + at_) = cm_pack16(%s(r_[0]), "
                 "%s(r_[1]));\n"
                 "          else b%d[at_] = %s(r_[0]);\n",
                 (long long)p->N, st->buf, conv, conv, st->buf, conv);
  cu_sb_printf(o, "        }\n      }\n");
  return true;
}

static void emit_epilogue(rctx *c, const cm_kcuda_gemm *p) {
  if (emit_epilogue_pairs(c, p)) return;
  const cm_kstage *s = c->s;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  cu_sb_printf(c->o,
               "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n      for (int y_ = 0; y_ < %d; y_++)\n"
               "#pragma unroll\n      for (int h_ = 0; h_ < 4; h_++) {\n"
               "        const long long v%d = m0_ + wm_ * %d + x_ * 16 + g_ + (h_ >> 1) * 8;\n"
               "        const long long v%d = n0_ + wn_ * %d + y_ * 8 + 2 * q_ + (h_ & 1);\n"
               "        const float acc = acc_[x_][y_][h_];\n"
               "        if (%sv%d < %lldLL && v%d < %lldLL) {\n",
               p->mr / 16, p->nr / 8, iv, p->mr, jv, p->nr, p->split_k > 1 ? "ks_ == 0 && " : "",
               iv, (long long)p->M, jv, (long long)p->N);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  cu_emit_stores(c, "          ", "acc");
  cu_sb_printf(c->o, "        }\n      }\n");
}

void cu_render_mma(rctx *c, const cm_kcuda_gemm *p, int min_blocks, const bool *written) {
  sbuf *o = c->o;
  operand_view va, vb;
  cm_kcuda_gemm q = *p;
  if (!cu_mma_plan_valid(
          &q, &(cm_target){.max_threads_per_block = 1024, .shared_bytes_max = INT64_MAX}) ||
      q.mc != p->mc || q.nc != p->nc || q.threads != p->threads) {
    cu_fail(c, -1,
            "tensor-core GEMM plan: tiles %dx%d k %d warp %dx%d split %d stages %d are not "
            "a template (powers of two, warp tiles >= 16, 16 <= kc <= 64)",
            p->mc, p->nc, p->kc, p->mr, p->nr, p->split_k, p->stages);
    return;
  }
  if (!operand_view_of(c, p, true, &va) || !operand_view_of(c, p, false, &vb)) {
    cu_fail(c, -1,
            "tensor-core GEMM plan: cp.async for an operand that is not a plain %s load "
            "with 16-byte chunks along its shared layout's rows",
            p->bf16 ? "bf16" : "f16");
    return;
  }
  char bounds[64];
  cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
  cu_signature(c, written, bounds);
  int wmn = p->warps_m * p->warps_n;
  cu_sb_printf(o,
               "  extern __shared__ __align__(16) unsigned char smem_[];\n"
               "  unsigned short *const As_ = (unsigned short *)smem_;\n"
               "  unsigned short *const Bs_ = As_ + %d * %d;\n"
               "  const int warp_ = threadIdx.x >> 5, lane_ = threadIdx.x & 31;\n",
               p->stages, va.t.elems);
  if (p->split_k > 1)
    cu_sb_printf(o, "  const int ks_ = warp_ / %d, wr_ = warp_ %% %d;\n", wmn, wmn);
  else
    cu_sb_printf(o, "  const int ks_ = 0, wr_ = warp_;\n");
  cu_sb_printf(o,
               "  const int wm_ = wr_ / %d, wn_ = wr_ %% %d;\n"
               "  const int g_ = lane_ >> 2, q_ = lane_ & 3;\n",
               p->warps_n, p->warps_n);
  cu_emit_gemm_block_loops(c, p);
  /* a block that loops reuses the ring: slow warps may still read the last tile's slots */
  cu_sb_printf(c->o, "      __syncthreads();\n");
  memset(c->done, 0, (size_t)c->s->n_exprs * sizeof *c->done);
  if (va.async || va.f32_vec) {
    emit_batch_base(c, &va, "abase_");
    cu_sb_printf(o, "      const bool aal_ = ((unsigned long long)b%d & 15ull) == 0;\n", va.buf);
  }
  if (vb.async || vb.f32_vec) {
    emit_batch_base(c, &vb, "bbase_");
    cu_sb_printf(o, "      const bool bal_ = ((unsigned long long)b%d & 15ull) == 0;\n", vb.buf);
  }
  int fm = p->mr / 16, fn = p->nr / 8;
  long long nk = (p->K + p->kc - 1) / p->kc;
  cu_sb_printf(o,
               "      float acc_[%d][%d][4];\n"
               "#pragma unroll\n      for (int x_ = 0; x_ < %d; x_++)\n"
               "#pragma unroll\n        for (int y_ = 0; y_ < %d; y_++)\n"
               "          acc_[x_][y_][0] = acc_[x_][y_][1] = acc_[x_][y_][2] = acc_[x_][y_][3] = "
               "0;\n",
               fm, fn, fm, fn);
  /* the ring: tiles kt_ + 1 .. kt_ + stages - 1 in flight while tile kt_ is multiplied */
  cu_sb_printf(o, "      auto load_ = [&](const int slot_, const long long k0_) {\n");
  emit_load_tile(c, p, &va);
  emit_load_tile(c, p, &vb);
  cu_sb_printf(o, "      };\n");
  cu_sb_printf(o,
               "#pragma unroll 1\n"
               "      for (int s_ = 0; s_ < %d; s_++) {\n"
               "        if (s_ < %lldLL) load_(s_, (long long)s_ * %d);\n"
               "        cm_cp_async_commit();\n"
               "      }\n"
               "#pragma unroll 1\n"
               "      for (int kt_ = 0; kt_ < %lld; kt_++) {\n"
               "        cm_cp_async_wait<%d>();\n"
               "        __syncthreads();\n"
               "        {\n"
               "          const int nt_ = kt_ + %d;\n"
               "          if (nt_ < %lld) load_(nt_ %% %d, (long long)nt_ * %d);\n"
               "          cm_cp_async_commit();\n"
               "        }\n"
               "        const unsigned short *At_ = As_ + (kt_ %% %d) * %d;\n"
               "        const unsigned short *Bt_ = Bs_ + (kt_ %% %d) * %d;\n"
               "#pragma unroll\n"
               "        for (int kq_ = 0; kq_ < %d; kq_++) {\n"
               "          const int kk_ = (kq_ * %d + ks_) * 16;\n",
               p->stages - 1, nk, p->kc, nk, p->stages - 2, p->stages - 1, nk, p->stages, p->kc,
               p->stages, va.t.elems, p->stages, vb.t.elems, p->kc / (16 * p->split_k), p->split_k);
  emit_fragments(c, p, &va.t, &vb.t);
  cu_sb_printf(o, "        }\n      }\n"); /* k steps, k tiles */
  if (p->split_k > 1) emit_split_reduce(c, p);
  emit_epilogue(c, p);
  cu_sb_printf(o, "    }\n    }\n  }\n}\n\n");
}
