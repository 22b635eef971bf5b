/* codegen/render_cuda.h — private to the CUDA renderer (render_cuda.c: prelude, expressions,
 * generic stages, entry points; render_cuda_gemm.c: GEMM stages; render_cuda_attention.c: fused
 * and streaming attention spans): the output buffer, the per-stage renderer state, the template
 * plans and the pieces the template files share. */
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
void cu_launch_bounds(int threads, char *out, size_t size);
void cu_mark_from(rctx *c, int root);
int64_t cu_prod(const int64_t *d, int n);
void cu_rctx_close(rctx *c);
cm_status cu_rctx_open(rctx *c, const cm_kernel *k, int si, sbuf *o, cm_err *err);
const char *cu_red_counter_type(int64_t extent);
void cu_signature(rctx *c, const bool *written, const char *bounds);
const char *cu_stype(cm_dtype d);

/* ---- render_cuda_gemm.c ---------------------------------------------------- */

typedef struct gemm_plan {
  bool ok;
  bool mma;
  bool bf16; /* mma operand type */
  int mc, nc, kc, mr, nr;
  int warps, threads;
  int lr, lc, tm, tn; /* FMA: lanes as lr x lc, each a tm x tn micro tile */
  cm_dtype t;         /* FMA operand/accumulator dtype (f32 or f64) */
  int64_t batch, M, N, K;
} gemm_plan;

cm_status cu_check_gemm_operands(rctx *c);
gemm_plan cu_plan_gemm(const cm_kstage *s, const cm_cuda_render_opts *o);
void cu_render_gemm(rctx *c, const gemm_plan *p, const bool *written);

/* ---- render_cuda_attention.c ------------------------------------------------ */

#define ATTN_THREADS 256

/* A fused rendering of an attention span: one block per (batch item, block of
 * br query rows) runs every stage of the span restricted to its rows, the
 * local buffers in shared memory (the per-row slices when the span is
 * row-local, else the whole batch item's), a barrier between stages. */
typedef struct attn_plan {
  bool ok;
  bool rowwise;
  int span, nb;
  int64_t rows, batch;
  int br, nrb;                            /* query rows per block, blocks per batch item */
  int64_t slot_elems[CM_KATTN_MAX_LOCAL]; /* shared elements of each local per block */
} attn_plan;

typedef struct fa_cplan {
  bool ok;
  int nb, br, bc, nrb, nkb;
  int64_t rows, keys, d, dv, batch, kvn;
  const cm_kstage *sS, *sM, *sE, *sL, *sP, *sO;
  int iS, iM, iE, iL, iP, iO;
} fa_cplan;

typedef struct fb_cplan {
  bool ok;
  int nb, bc, nkb, span;
  int64_t rows, keys, d, batch;
  int64_t acc_off[CM_KATTN_MAX_SPAN]; /* GEMM_ROWS accumulators: float offset in fbacc_ */
  int64_t acc_floats;
} fb_cplan;

attn_plan cu_plan_attention(const cm_kernel *k, int first, const cm_cuda_render_opts *o);
fa_cplan cu_plan_stream(const cm_kernel *k, int first, const cm_cuda_render_opts *o);
fb_cplan cu_plan_stream_bwd(const cm_kernel *k, int first, const cm_cuda_render_opts *o);
cm_status cu_render_attention(const cm_kernel *k, int first, const attn_plan *p, sbuf *o,
                              const bool *written, cm_err *err);
cm_status cu_render_stream(const cm_kernel *k, int first, const fa_cplan *p, sbuf *o,
                           const bool *written, cm_err *err);
cm_status cu_render_stream_bwd(const cm_kernel *k, int first, const fb_cplan *p, sbuf *o,
                               const bool *written, cm_err *err);

#endif
