/* codegen/render_cuda_plan.c — the CUDA plan of every stage of a kernel (codegen.h,
 * cm_kcuda_plan): which skeleton renders it (an attention span's streaming or fused function, a
 * tiled GEMM, a generic grid-stride loop), its tiles, threads, grid and shared memory, from the
 * cm_target's limits. The templates compute their own parts (cu_plan_gemm in render_cuda_gemm.c,
 * cu_plan_attention/_stream/_stream_bwd in render_cuda_attention.c, cu_plan_rows in
 * render_cuda_rows.c: spans of row stages in one function); the renderer and
 * cm_cuda_stage_launch read the result and derive nothing themselves. */
#include "render_cuda.h"

#include <stdlib.h>
#include <string.h>

/* ---- generic stages: the cost model ------------------------------------------ */

#define PAR_RED_MIN 64       /* reductions at least this long are split across threads */
#define BLOCK_RED_MIN 2048   /* ... across a block from this length */
#define BLOCK_POINTS_MAX 512 /* ... or when fewer points than this leave warps idle */
#define GRID_CAP 1048576u

/* __launch_bounds__: the blocks per SM that leave this many registers a thread. Given only the
 * block size, ptxas aims at 64 registers and spills GEMM tiles that need a few more (and
 * -maxrregcount does not stop it on sm_80). */
#define LAUNCH_REGS_PER_THREAD 128

static int launch_min_blocks(const cm_target *t, unsigned threads) {
  int64_t b = (int64_t)t->regs_per_sm / ((int64_t)threads * LAUNCH_REGS_PER_THREAD);
  return b < 1 ? 1 : (int)b;
}

/* Who computes one domain point: a thread (serial reduction), a warp (shuffle
 * reduction: rows of moderate length, many rows), or a block of 256 threads
 * (long reductions, or too few points to fill the GPU warp by warp). */
static cm_kcuda_red generic_red(const cm_kstage *s) {
  if (s->n_red == 0) return CM_KCUDA_RED_THREAD;
  int64_t rext = cu_prod(s->red, s->n_red), points = cu_prod(s->dom, s->n_dom);
  if (rext < PAR_RED_MIN) return CM_KCUDA_RED_THREAD;
  if (rext >= BLOCK_RED_MIN || points < BLOCK_POINTS_MAX) return CM_KCUDA_RED_BLOCK;
  return CM_KCUDA_RED_WARP;
}

/* The grid and shared memory of a generic plan for its red and threads (block[0]). */
static void generic_launch(const cm_kstage *s, const cm_target *t, cm_kcuda_plan *p) {
  int threads = (int)p->block[0], warps = threads / t->warp_size;
  int64_t points = cu_prod(s->dom, s->n_dom);
  int64_t per_block = p->red == CM_KCUDA_RED_BLOCK  ? 1
                      : p->red == CM_KCUDA_RED_WARP ? warps
                                                    : threads;
  int64_t g = (points + per_block - 1) / per_block;
  if (g < 1) g = 1;
  p->grid[0] = (unsigned)(g < GRID_CAP ? g : GRID_CAP);
  p->block[0] = (unsigned)threads;
  /* cm_part[warps] of the accumulator's register type (cu_ctype) */
  cm_dtype a = s->acc_dtype;
  int64_t acc_bytes = a == CM_F64 || a == CM_I64 ? 8 : a == CM_BOOL ? 1 : 4;
  p->shared_static = p->red == CM_KCUDA_RED_BLOCK ? (int64_t)warps * acc_bytes : 0;
}

static void plan_generic(const cm_kstage *s, const cm_target *t, cm_kcuda_plan *p) {
  p->kind = CM_KCUDA_GENERIC;
  p->red = generic_red(s);
  p->block[0] = CU_GENERIC_THREADS;
  generic_launch(s, t, p);
}

/* ---- templates ------------------------------------------------------------------ */

static void plan_gemm_launch(cm_kcuda_plan *p) {
  const cm_kcuda_gemm *g = &p->gemm;
  int64_t gx = (g->N + g->nc - 1) / g->nc, gy = (g->M + g->mc - 1) / g->mc;
  p->grid[0] = (unsigned)(gx < 2147483647 ? gx : 2147483647);
  p->grid[1] = (unsigned)(gy < 65535 ? gy : 65535);
  p->grid[2] = (unsigned)(g->batch < 65535 ? g->batch : 65535);
  p->block[0] = (unsigned)g->threads;
  size_t esz = g->t == CM_F64 ? 8 : 4;
  /* mma: the ring in dynamic shared memory (opted in beyond 48 KiB) */
  p->shared_static = g->mma ? 0 : (int64_t)esz * g->kc * (g->mc + 4 + g->nc + 4);
  p->shared_dynamic = g->mma ? (unsigned)cu_mma_shared_bytes(g) : 0;
}

static int64_t attn_shared_bytes(const cm_kernel *k, int first, const cm_kcuda_plan *p) {
  const cm_kattn *a = &k->stages[first].attn;
  const cm_kcuda_attn *q = &p->attn;
  int64_t b = 0;
  if (p->kind == CM_KCUDA_ATTN_FUSED) {
    for (int i = 0; i < a->n_local; i++)
      b += q->slot_elems[i] * (int64_t)cu_dt_size(k->buffers[a->local[i]].dtype);
  } else if (p->kind == CM_KCUDA_ATTN_FLASH || p->kind == CM_KCUDA_ATTN_FLASH_BWD) {
    b = q->kvn; /* cu_plan_flash, cu_plan_flash_bwd: the tiles' bytes */
  } else if (p->kind == CM_KCUDA_ATTN_STREAM) {
    b = 4 * (q->br * q->d + q->kvn + (int64_t)q->br * (q->bc + 1) + q->br * q->dv + 3 * q->br);
  } else {
    for (int i = 0; i < a->n_local; i++) {
      int64_t bytes = 4 * (a->local_row[i] == 1 ? q->rows : q->rows * q->bc);
      /* dynamic shared memory: the renderer carves the regions 16-byte aligned */
      b += q->dyn_shared ? (bytes + 15) / 16 * 16 : bytes;
    }
    b += 4 * q->acc_floats;
  }
  return b;
}

/* The span from stage i, when one of the attention skeletons takes it (tried in this order:
 * flash forward and backward on tensor cores, streaming forward and backward, fused). */
static bool plan_span(const cm_kernel *k, int i, const cm_target *t, cm_kcuda_plan *p) {
  int threads = CU_ATTN_THREADS;
  if (cu_plan_flash(k, i, t, &p->attn)) {
    p->kind = CM_KCUDA_ATTN_FLASH;
    p->grid[0] = (unsigned)(p->attn.batch * p->attn.nrb);
    threads = p->attn.threads;
  } else if (cu_plan_flash_bwd(k, i, t, &p->attn)) {
    p->kind = CM_KCUDA_ATTN_FLASH_BWD;
    p->grid[0] = (unsigned)p->attn.batch;
    threads = p->attn.threads;
  } else if (cu_plan_stream(k, i, t, &p->attn)) {
    p->kind = CM_KCUDA_ATTN_STREAM;
    p->grid[0] = (unsigned)(p->attn.batch * p->attn.nrb);
  } else if (cu_plan_stream_bwd(k, i, t, &p->attn)) {
    p->kind = CM_KCUDA_ATTN_STREAM_BWD;
    p->grid[0] = (unsigned)p->attn.batch;
  } else if (cu_plan_attention(k, i, t, &p->attn)) {
    p->kind = CM_KCUDA_ATTN_FUSED;
    p->grid[0] = (unsigned)(p->attn.batch * p->attn.nrb);
  } else {
    memset(&p->attn, 0, sizeof p->attn);
    return false;
  }
  p->attn.threads = threads;
  p->block[0] = (unsigned)p->attn.threads;
  p->shared_static = attn_shared_bytes(k, i, p);
  if ((p->kind == CM_KCUDA_ATTN_FUSED || p->kind == CM_KCUDA_ATTN_STREAM_BWD ||
       p->kind == CM_KCUDA_ATTN_FLASH_BWD) &&
      p->attn.dyn_shared) {
    p->shared_dynamic = (unsigned)p->shared_static;
    p->shared_static = 0;
  }
  return true;
}

/* A span of row stages from stage i (render_cuda_rows.c), of stages no earlier span has. */
static bool plan_rows(const cm_kernel *k, int i, const cm_target *t, const cm_kcuda_plan *plans,
                      cm_kcuda_plan *p) {
  bool *claimed = calloc((size_t)k->n_stages + 1, sizeof *claimed);
  bool ok = claimed != NULL;
  for (int j = 0; ok && j < k->n_stages; j++) claimed[j] = plans[j].kind == CM_KCUDA_IN_SPAN;
  ok = ok && cu_plan_rows(k, i, t, claimed, &p->rows);
  free(claimed);
  if (!ok) {
    memset(&p->rows, 0, sizeof p->rows);
    return false;
  }
  p->kind = CM_KCUDA_ROWS;
  cu_rows_launch(k, &p->rows, p->grid, p->block, &p->shared_static);
  p->min_blocks = launch_min_blocks(t, p->block[0]);
  return true;
}

/* The span's other members run in the function of its first stage. */
static void mark_in_span(cm_kcuda_plan *plans, int first, const cm_kcuda_rows *r,
                         const cm_target *t) {
  for (int m = 1; m < r->span; m++) {
    cm_kcuda_plan *q = &plans[r->stage[m]];
    q->kind = CM_KCUDA_IN_SPAN;
    q->sm = t->sm;
    q->first = first;
    for (int d = 0; d < 3; d++) q->grid[d] = q->block[d] = 1;
  }
}

static bool stage_malformed(const cm_kstage *s) {
  return s->n_dom < 0 || s->n_dom > CM_KMAX_VARS || s->n_red < 0 || s->n_red > CM_KMAX_VARS ||
         s->n_exprs < 0 || (s->n_exprs && !s->exprs);
}

/* plans[i] for every stage of k (a malformed stage gets a generic plan: the renderer reports
 * it). */
static void plan_stages(const cm_kernel *k, const cm_target *t, bool no_templates,
                        cm_kcuda_plan *plans) {
  memset(plans, 0, sizeof *plans * (size_t)k->n_stages);
  for (int i = 0; i < k->n_stages; i++) {
    const cm_kstage *s = &k->stages[i];
    cm_kcuda_plan *p = &plans[i];
    if (p->kind == CM_KCUDA_IN_SPAN) continue; /* a member of an earlier row span */
    p->sm = t->sm;
    for (int d = 0; d < 3; d++) p->grid[d] = p->block[d] = 1;
    if (stage_malformed(s)) {
      p->kind = CM_KCUDA_GENERIC;
      p->min_blocks = 1;
      continue;
    }
    if (!no_templates && plan_span(k, i, t, p)) {
      p->min_blocks = launch_min_blocks(t, p->block[0]);
      /* flash: the S and O fragments (64 floats at head dim 64) and the operand fragments need
       * more than 128 registers a thread; 2 blocks of 4 warps per SM leave 255 */
      if (p->kind == CM_KCUDA_ATTN_FLASH && p->min_blocks > 2) p->min_blocks = 2;
      /* flash backward: the tile, dQ and dK/dV fragments of up to 8 warps: all 255 */
      if (p->kind == CM_KCUDA_ATTN_FLASH_BWD) p->min_blocks = 1;
      for (int j = i + 1; j < i + p->attn.span && j < k->n_stages; j++) {
        plans[j].kind = CM_KCUDA_IN_SPAN;
        plans[j].sm = t->sm;
        plans[j].first = i;
        for (int d = 0; d < 3; d++) plans[j].grid[d] = plans[j].block[d] = 1;
      }
      i += p->attn.span - 1;
      continue;
    }
    if (!no_templates && plan_rows(k, i, t, plans, p)) {
      mark_in_span(plans, i, &p->rows, t);
      continue;
    }
    if (!no_templates && cu_plan_gemm(s, t, &p->gemm)) {
      p->kind = CM_KCUDA_GEMM;
      plan_gemm_launch(p);
    } else {
      memset(&p->gemm, 0, sizeof p->gemm);
      plan_generic(s, t, p);
    }
    p->min_blocks = launch_min_blocks(t, p->block[0]);
  }
}

static cm_status check_target(const cm_kernel *k, const cm_target *t, cm_err *err) {
  if (t->kind != CM_TARGET_CUDA || t->sm <= 0 || t->warp_size != 32 || t->shared_bytes_static <= 0)
    return cm_errorf(err, CM_EINVALID, "kernel %s: the CUDA renderer needs a CUDA target, not %s",
                     k->name, t->arch);
  return CM_OK;
}

cm_status cm_cuda_plan_kernel(cm_kernel *k, const cm_target *t, cm_err *err) {
  if (!k || !t) return cm_errorf(err, CM_EINVALID, "cm_cuda_plan_kernel: no kernel or no target");
  if (k->n_stages < 0 || (k->n_stages && !k->stages))
    return cm_errorf(err, CM_EINVALID, "kernel %s: malformed stage array", k->name);
  cm_status st = check_target(k, t, err);
  if (st != CM_OK) return st;
  cm_kcuda_plan *plans = malloc(sizeof *plans * (size_t)(k->n_stages + 1));
  if (!plans) return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  plan_stages(k, t, false, plans);
  for (int i = 0; i < k->n_stages; i++) k->stages[i].cuda = plans[i];
  free(plans);
  return CM_OK;
}

/* A generic plan with the tuner's red and threads (block[0]): its grid and shared memory. */
static cm_status refit_generic(cm_kernel *k, int stage, const cm_target *t, cm_err *err) {
  const cm_kstage *s = &k->stages[stage];
  cm_kcuda_plan *p = &k->stages[stage].cuda;
  unsigned threads = p->block[0];
  if (threads < (unsigned)t->warp_size || threads > (unsigned)t->max_threads_per_block ||
      threads % (unsigned)t->warp_size || (unsigned)p->red > CM_KCUDA_RED_BLOCK ||
      ((s->n_red == 0 || s->accumulate) && p->red != CM_KCUDA_RED_THREAD))
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: generic plan with %u threads, reduction mode %d: whole "
                     "warps, at most %d; a warp or block per point only for a reduction that "
                     "does not accumulate",
                     k->name, stage, threads, (int)p->red, t->max_threads_per_block);
  generic_launch(s, t, p);
  p->min_blocks = launch_min_blocks(t, p->block[0]);
  return CM_OK;
}

/* A rows plan with the tuner's warp and threads: the rest re-derived (cu_rows_refit). */
static cm_status refit_rows(cm_kernel *k, int stage, const cm_target *t, cm_err *err) {
  cm_kcuda_plan *p = &k->stages[stage].cuda;
  cm_kcuda_rows *r = &p->rows;
  if (r->threads < t->warp_size || r->threads > t->max_threads_per_block ||
      r->threads % t->warp_size)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: rows plan with %d threads: whole warps, at most %d",
                     k->name, stage, r->threads, t->max_threads_per_block);
  cu_rows_refit(k, r, t);
  cu_rows_launch(k, r, p->grid, p->block, &p->shared_static);
  p->min_blocks = launch_min_blocks(t, p->block[0]);
  return CM_OK;
}

/* An FMA GEMM plan from the stage's tiles (mc, nc, kc, mr, nr), which the tuner set: refused when
 * the template would not take them as they are. */
static cm_status refit_fma(cm_kernel *k, int stage, const cm_target *t, cm_err *err) {
  cm_kstage *s = &k->stages[stage];
  cm_kcuda_plan *p = &s->cuda;
  cm_kcuda_gemm g;
  const cm_kgemm_tiles *w = &s->tiles;
  if (!cu_plan_gemm(s, t, &g) || g.mma || g.mc != w->mc || g.nc != w->nc || g.kc != w->kc ||
      g.mr != w->mr || g.nr != w->nr)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: FMA GEMM tiles %dx%d k %d warp %dx%d: no template (mc a "
                     "multiple of mr, nc of nr, at most 16 warps, kc <= 64, a warp's lanes split "
                     "over the warp tile, %lld B of static shared memory)",
                     k->name, stage, w->mc, w->nc, w->kc, w->mr, w->nr,
                     (long long)t->shared_bytes_static);
  p->gemm = g;
  plan_gemm_launch(p);
  p->min_blocks = launch_min_blocks(t, p->block[0]);
  return CM_OK;
}

cm_status cm_cuda_plan_refit(cm_kernel *k, int stage, const cm_target *t, cm_err *err) {
  if (!k || !t || stage < 0 || stage >= k->n_stages)
    return cm_errorf(err, CM_EINVALID, "cm_cuda_plan_refit: no kernel, target or stage");
  cm_status st = check_target(k, t, err);
  if (st != CM_OK) return st;
  cm_kcuda_plan *p = &k->stages[stage].cuda;
  if (p->sm == t->sm && p->kind == CM_KCUDA_ROWS) return refit_rows(k, stage, t, err);
  if (p->sm == t->sm && p->kind == CM_KCUDA_GENERIC) return refit_generic(k, stage, t, err);
  if (p->sm == t->sm && p->kind == CM_KCUDA_GEMM && !p->gemm.mma)
    return refit_fma(k, stage, t, err);
  if (p->kind != CM_KCUDA_GEMM || !p->gemm.mma || p->sm != t->sm)
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: not a GEMM, rows or generic plan for sm_%d (plan it "
                     "first)",
                     k->name, stage, t->sm);
  if (!cu_mma_plan_valid(&p->gemm, t))
    return cm_errorf(err, CM_EINVALID,
                     "kernel %s stage %d: tensor-core GEMM plan warps %dx%d of %dx%d, k %d, split "
                     "%d, %d stages: no template (powers of two, warp tiles >= 16, 16 <= k <= 64, "
                     "k / 16 a multiple of the split, 2..8 stages, within %d threads and %lld B of "
                     "shared memory)",
                     k->name, stage, p->gemm.warps_m, p->gemm.warps_n, p->gemm.mr, p->gemm.nr,
                     p->gemm.kc, p->gemm.split_k, p->gemm.stages, t->max_threads_per_block,
                     (long long)t->shared_bytes_max);
  plan_gemm_launch(p);
  p->min_blocks = launch_min_blocks(t, p->block[0]);
  return CM_OK;
}

cm_status cu_plans_for(const cm_kernel *k, const cm_cuda_render_opts *o, cm_kcuda_plan **out,
                       cm_err *err) {
  *out = NULL;
  cm_target def;
  const cm_target *t = o ? o->target : NULL;
  if (!t) {
    cm_status st = cm_target_cuda("sm_80", &def, err);
    if (st != CM_OK) return st;
    t = &def;
  }
  cm_status st = check_target(k, t, err);
  if (st != CM_OK) return st;
  cm_kcuda_plan *plans = malloc(sizeof *plans * (size_t)(k->n_stages + 1));
  if (!plans) return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  bool nt = o && o->no_templates, stored = !nt;
  for (int i = 0; i < k->n_stages && stored; i++)
    stored = k->stages[i].cuda.kind != CM_KCUDA_NONE && k->stages[i].cuda.sm == t->sm;
  if (stored)
    for (int i = 0; i < k->n_stages; i++) plans[i] = k->stages[i].cuda;
  else
    plan_stages(k, t, nt, plans);
  *out = plans;
  return CM_OK;
}

/* ---- printing --------------------------------------------------------------------- */

void cm_kcuda_plan_print(const cm_kcuda_plan *p, FILE *out) {
  static const char *const red[] = {"thread", "warp", "block"};
  const cm_kcuda_gemm *g = &p->gemm;
  const cm_kcuda_attn *a = &p->attn;
  fprintf(out, "cuda sm_%d ", p->sm);
  switch (p->kind) {
  case CM_KCUDA_NONE: fprintf(out, "unplanned\n"); return;
  case CM_KCUDA_IN_SPAN: fprintf(out, "in the span of stage %d\n", p->first); return;
  case CM_KCUDA_GENERIC: fprintf(out, "generic: a %s per point", red[p->red]); break;
  case CM_KCUDA_GEMM:
    if (g->mma)
      fprintf(out, "gemm mma %s", g->bf16 ? "bf16" : "f16");
    else
      fprintf(out, "gemm fma %s lanes %dx%d micro %dx%d", cm_dtype_name(g->t), g->lr, g->lc, g->tm,
              g->tn);
    fprintf(out, ": block %dx%d k %d warp %dx%d (%d warps), batch %lld M %lld N %lld K %lld", g->mc,
            g->nc, g->kc, g->mr, g->nr, g->warps, (long long)g->batch, (long long)g->M,
            (long long)g->N, (long long)g->K);
    if (g->mma)
      fprintf(out, ", warps %dx%d split_k %d stages %d %s, A %s %s, B %s %s", g->warps_m,
              g->warps_n, g->split_k, g->stages, g->swizzle ? "swizzled" : "padded",
              g->a_outer_k ? "[k][m]" : "[m][k]", g->a_async ? "cp.async" : "prologue",
              g->b_outer_k ? "[k][n]" : "[n][k]", g->b_async ? "cp.async" : "prologue");
    break;
  case CM_KCUDA_ATTN_FUSED:
    fprintf(out, "attention fused: %d stages, %d query rows per block%s, %d row blocks", a->span,
            a->br, a->rowwise ? "" : " (whole batch item)", a->nrb);
    break;
  case CM_KCUDA_ATTN_FLASH:
    fprintf(
        out,
        "attention flash mma bf16: %d stages, br %d bc %d, %d row blocks, %d key blocks, d %lld "
        "dv %lld",
        a->span, a->br, a->bc, a->nrb, a->nkb, (long long)a->d, (long long)a->dv);
    break;
  case CM_KCUDA_ATTN_STREAM:
    fprintf(out,
            "attention stream: %d stages, br %d bc %d, %d row blocks, %d key blocks, d %lld dv "
            "%lld",
            a->span, a->br, a->bc, a->nrb, a->nkb, (long long)a->d, (long long)a->dv);
    break;
  case CM_KCUDA_ROWS: {
    const cm_kcuda_rows *r = &p->rows;
    int syncs = 0;
    for (int j = 0; j < r->span; j++) syncs += r->sync_before[j];
    fprintf(out,
            "rows: %d stages, %lld rows, a %s per row, %lld work per row, %d statistics and %d "
            "row slices in registers, %d barriers",
            r->span, (long long)r->rows, r->warp ? "warp" : "block", (long long)r->row_work,
            r->n_stats, r->n_cached, syncs);
    break;
  }
  case CM_KCUDA_ATTN_FLASH_BWD:
    fprintf(
        out, "attention flash backward mma bf16: %d stages, %lld rows, bc %d, %d key blocks, %s",
        a->span, (long long)a->rows, a->bc, a->nkb, a->bwd_two_pass ? "two passes" : "one pass");
    break;
  case CM_KCUDA_ATTN_STREAM_BWD:
    fprintf(out,
            "attention stream backward: %d stages, %lld rows, bc %d, %d key blocks, %lld "
            "accumulator floats",
            a->span, (long long)a->rows, a->bc, a->nkb, (long long)a->acc_floats);
    break;
  }
  fprintf(out, "; grid %ux%ux%u block %ux%ux%u shared %lld+%u\n", p->grid[0], p->grid[1],
          p->grid[2], p->block[0], p->block[1], p->block[2], (long long)p->shared_static,
          p->shared_dynamic);
}
