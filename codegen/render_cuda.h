/* codegen/render_cuda.h — private to the CUDA renderer (render_cuda.c: prelude, expressions,
 * generic stages, entry points; render_cuda_plan.c: the stage plans; render_cuda_gemm.c: GEMM
 * stages and their plan; render_cuda_attention.c: fused and streaming attention spans and their
 * plans): the output buffer, the per-stage renderer state, the planners and the pieces the
 * files share. */
#ifndef CMAEC_RENDER_CUDA_H
#define CMAEC_RENDER_CUDA_H

#include "codegen.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* a growable string */
typedef struct sbuf {
  char *p;
  size_t n, cap;
  bool oom;
} sbuf;
__attribute__((format(printf, 2, 3))) void cu_sb_printf(sbuf *s, const char *fmt, ...);

/* ---- render_cuda.c: expressions and shared pieces ------------------------ */

typedef struct rctx {
  const cm_kernel *k;
  int si;
  const cm_kstage *s;
  sbuf *o;
  cm_err *err;
  bool *done;   /* per expression: already declared in scope */
  bool *mark;   /* scratch: reachable set */
  bool *usered; /* depends on a reduction var */
  bool *useacc; /* depends on ACC */
  bool *narrow; /* an i64 expression whose every value fits in int32: computed as int */
  cm_status st;
  const int
      *local; /* fused attention span: per buffer, its shared-memory slot or -1 (NULL: none) */
  const char *const *subst; /* streaming attention: per buffer, NULL or the C expression a
                               load of it reads (the tile's value at the current point) */
} rctx;

void cu_acc_combine(const cm_kstage *s, const char *acc, const char *v, char *out, size_t size);
void cu_acc_init(const cm_kstage *s, char *out, size_t size);
void cu_cast_code(char *out, size_t size, cm_dtype from, cm_dtype to, const char *x);
void cu_clear_mark(rctx *c);
const char *cu_ctype(cm_dtype d);
void cu_decompose(rctx *c, const char *indent, const char *lin, int first, const int64_t *ext,
                  int n);
void cu_emit_marked(rctx *c, const char *indent, const char *accname, int want_red, int want_acc);
void cu_emit_stores(rctx *c, const char *indent, const char *accname);
void cu_emit_tree(rctx *c, int root, const char *indent, const char *accname);
cm_status cu_fail(rctx *c, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void cu_launch_bounds(int threads, int min_blocks, char *out, size_t size);
void cu_mark_from(rctx *c, int root);
int64_t cu_prod(const int64_t *d, int n);
void cu_rctx_close(rctx *c);
cm_status cu_rctx_open(rctx *c, const cm_kernel *k, int si, sbuf *o, cm_err *err);
const char *cu_red_counter_type(int64_t extent);
void cu_signature(rctx *c, const bool *written, const char *bounds);
const char *cu_stype(cm_dtype d);

/* ---- render_cuda_plan.c: the stage plans ---------------------------------- */

#define CU_GENERIC_THREADS 256 /* generic stages: threads per block */
#define CU_ATTN_THREADS 256    /* attention spans: threads per block */

/* The plans of k's stages for o's target, one per stage in *out (the caller frees it): k's own
 * when every stage has one for this target (and o asks for templates), else computed here. */
cm_status cu_plans_for(const cm_kernel *k, const cm_cuda_render_opts *o, cm_kcuda_plan **out,
                       cm_err *err);

/* ---- render_cuda_gemm.c ---------------------------------------------------- */

/* The tiled GEMM plan of stage s for target t; false when the stage is no GEMM the template
 * renders. */
bool cu_plan_gemm(const cm_kstage *s, const cm_target *t, cm_kcuda_gemm *out);
cm_status cu_check_gemm_operands(rctx *c);
void cu_render_gemm(rctx *c, const cm_kcuda_gemm *p, int min_blocks, const bool *written);
/* The block loops over batch items and tiles of a GEMM stage (opens the scope of m0_, n0_). */
void cu_emit_gemm_block_loops(rctx *c, const cm_kcuda_gemm *p);
/* ---- render_cuda_mma.c: the tensor-core template ------------------------------------ */
/* Fills the mma fields of p (batch, M, N, K, bf16 set) from the cost model; false when no
 * configuration fits t. */
bool cu_plan_mma(const cm_kstage *s, const cm_target *t, cm_kcuda_gemm *p);
/* Whether p's tunable mma fields make a template (derives mc, nc, warps, threads). */
bool cu_mma_plan_valid(cm_kcuda_gemm *p, const cm_target *t);
/* The dynamic shared memory of the mma template: the ring, or the split-K sums. */
int64_t cu_mma_shared_bytes(const cm_kcuda_gemm *p);
void cu_render_mma(rctx *c, const cm_kcuda_gemm *p, int min_blocks, const bool *written);

/* ---- render_cuda_attention.c ------------------------------------------------ */

/* The span from stage `first`, for target t: fused (cu_plan_attention), streaming forward and
 * backward; false when that skeleton does not apply or does not fit. */
bool cu_plan_attention(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out);
bool cu_plan_stream(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out);
bool cu_plan_stream_bwd(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out);
size_t cu_dt_size(cm_dtype d);
/* The shape of a streaming forward span (cm_kattn.stream, roles checked): span, nb, rows, batch,
 * keys, d, dv and the lowering's bc; false when stage first opens none. */
bool cu_stream_shape(const cm_kernel *k, int first, cm_kcuda_attn *out);
/* Opens a C scope for one point of stage c->s of an attention span with nb batch vars (stat: a
 * row statistic): its batch vars from bv<i>_, the row var = row, the next var = col, the
 * reduction var = red (NULL: 0). */
void cu_attn_point(rctx *c, int nb, bool stat, const char *ind, const char *row, const char *col,
                   const char *red);
/* Empty functions for the span's stages after the first (its function runs them). */
cm_status cu_span_stubs(const cm_kernel *k, int first, int span, sbuf *o, const bool *written,
                        cm_err *err);
/* ---- render_cuda_flash.c ------------------------------------------------------- */
/* Flash attention forward on tensor cores: a streaming forward span whose GEMM operands are bf16
 * (autocast), on a target with mma.sync; false otherwise (render_cuda_flash.c). */
bool cu_plan_flash(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out);
cm_status cu_render_flash(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                          sbuf *o, const bool *written, cm_err *err);
/* Flash attention backward on tensor cores: a backward span whose GEMMs have bf16 operands and
 * whose stages are tiles, row reductions and GEMMs over rows or keys at canonical indices
 * (render_cuda_flash.c); false otherwise. */
bool cu_plan_flash_bwd(const cm_kernel *k, int first, const cm_target *t, cm_kcuda_attn *out);
/* After a tuner chose `warps` warps a block and key blocks of bc keys for the flash plan (forward
 * or backward) of stage first: checks them (shared memory against the block's limit: static for
 * the forward, the device's opt-in for the backward; an estimate of the registers a thread
 * needs) and derives the rest of the plan; CM_EINVALID naming the rule otherwise. */
cm_status cu_flash_refit(cm_kernel *k, int first, const cm_target *t, int warps, int bc,
                         cm_err *err);
/* __launch_bounds__'s blocks for a flash forward of `threads`: 255 registers a thread. */
int cu_flash_min_blocks(const cm_target *t, int threads);
cm_status cu_render_flash_bwd(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                              sbuf *o, const bool *written, cm_err *err);
cm_status cu_render_attention(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                              sbuf *o, const bool *written, cm_err *err);
cm_status cu_render_stream(const cm_kernel *k, int first, const cm_kcuda_attn *p, int min_blocks,
                           sbuf *o, const bool *written, cm_err *err);
cm_status cu_render_stream_bwd(const cm_kernel *k, int first, const cm_kcuda_attn *p,
                               int min_blocks, sbuf *o, const bool *written, cm_err *err);

/* ---- render_cuda_rows.c ------------------------------------------------------ */

/* The span of row stages from stage `first` for target t (cm_kcuda_rows), leaving out the
 * stages claimed[] by earlier spans; false when fewer than two stages, or none with a
 * reduction, form one. */
bool cu_plan_rows(const cm_kernel *k, int first, const cm_target *t, const bool *claimed,
                  cm_kcuda_rows *out);
/* Its grid, block and static shared memory. */
void cu_rows_launch(const cm_kernel *k, const cm_kcuda_rows *r, unsigned grid[3], unsigned block[3],
                    int64_t *shared);
/* After a tuner set r->warp and r->threads: rows per block, the row slices kept in registers and
 * the barriers re-derived (cm_cuda_plan_refit). */
void cu_rows_refit(const cm_kernel *k, cm_kcuda_rows *r, const cm_target *t);
/* The empty function of stage si, which runs in stage first's. */
cm_status cu_render_span_stub(const cm_kernel *k, int si, int first, sbuf *o, const bool *written,
                              cm_err *err);
cm_status cu_render_rows(const cm_kernel *k, int first, const cm_kcuda_rows *p, int min_blocks,
                         sbuf *o, const bool *written, cm_err *err);

#endif
