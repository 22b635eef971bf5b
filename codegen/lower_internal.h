/* codegen/lower_internal.h — what lower.c shares with the kernel templates
 * it calls (gemm.c, attention.c). Private to codegen/. */
#ifndef CM_LOWER_INTERNAL_H
#define CM_LOWER_INTERNAL_H

#include "codegen.h"

/* Sets the stage's n_parallel: the leading domain axes giving >= 1024 work
 * items (0 for an accumulating stage). */
void cm_lower_finish_stage(cm_kstage *s);

/* A contraction's body a * b in the stage's accumulator dtype: bf16 and f16
 * operands are widened to it first (a CAST each), so every product is exact
 * in f32 (8 + 8 and 11 + 11 significant bits) and only the sum rounds
 * (docs/ops.md, "Error bounds"). Operands of the accumulator's dtype are
 * multiplied as they are. */
int cm_lower_product(cm_kstage *s, int a, int b);

/* gemm.c: marks stage s as a GEMM (operands a over (batch, i, k), b over
 * (batch, k, j)) with the default plan; splits the K of long GEMMs with few
 * blocks (CPU). */
void cm_gemm_mark(cm_kstage *s, int a, int b, const cm_lower_opts *o);
void cm_gemm_split_k(cm_kernel *k, const cm_lower_opts *o);
/* gemm.c, the K split as a tuning knob: S when stage si is a split's partial GEMM (_kpart)
 * followed by its sum, else 0; the splits stage si may take (1: none; 2, 4, 8 dividing K into
 * slices of >= 256; the current one), their count (0: not a CPU GEMM that may split); and
 * stage si re-split into S (merged back first; S 1: one GEMM), the new stages at si. */
int cm_gemm_k_split_at(const cm_kernel *k, int si);
int cm_gemm_k_split_options(const cm_kernel *k, int si, int *out);
cm_status cm_gemm_resplit(cm_kernel *k, int si, int S, const cm_target *t, cm_err *err);

/* attention.c: marks the fused attention span of an attention group's kernel
 * and computes its plan; leaves the kernel as is when no span holds. */
void cm_attn_mark(cm_kernel *k, const cm_lower_opts *o);
/* attention.c: after a tuner changed the span's br, bc or its first stage's register block
 * (tiles.mr, tiles.nr): re-derives its workspace size, the per-stage register blocks for vectors
 * of `lanes` f32 and the workspace layout, as cm_attn_mark does (tune_space.c). */
void cm_kattn_replan(cm_kernel *k, int first, int lanes);

#endif
