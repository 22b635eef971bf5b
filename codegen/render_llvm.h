/* codegen/render_llvm.h — what the LLVM renderer's files share (private to
 * codegen/): the rendering context, loops, and the helpers of render_llvm.c
 * (expressions, loops, function skeleton, reductions) that the GEMM
 * (render_llvm_gemm.c) and attention (render_llvm_attention.c) templates use. */
#ifndef CM_RENDER_LLVM_H
#define CM_RENDER_LLVM_H

#include "codegen.h"

#include <llvm-c/Core.h>
#include <llvm-c/DebugInfo.h>

typedef struct rctx {
  LLVMContextRef C;
  LLVMModuleRef M;
  LLVMBuilderRef B;
  LLVMValueRef fn;
  const cm_kernel *k;
  const cm_kstage *s;
  int stage;
  LLVMTypeRef f32, f64, f16, i1, i8, i16, i32, i64, ptr, vty;
  int W;
  int unroll;      /* GEMM k-loop unroll count */
  bool dot_bf16;   /* bf16 GEMMs in vdpbf16ps pairs (cm_cpu_target.dot_bf16, 16 lanes) */
  bool dot_native; /* ... with the instruction (else the same sums in generic IR) */
  LLVMValueRef *bases;
  LLVMValueRef *ioff; /* per buffer, NULL or an element offset subtracted from every index
                         (local buffers of a fused attention span) */
  LLVMValueRef *md_scope, *md_noalias; /* per buffer, NULL or alias.scope / noalias lists */
  LLVMValueRef vars[CM_KMAX_VARS];
  LLVMValueRef acc;     /* CM_KX_ACC in store values */
  LLVMValueRef *memo;   /* per evaluation point */
  bool select_branches; /* a SELECT of loads on a condition not varying along inner_var
                           branches (render_generic) */
  int inner_var;
  cm_err *err;
  cm_status fail_status;
  bool failed;
} rctx;

typedef struct loop {
  LLVMBasicBlockRef header;
  LLVMValueRef iv;
} loop;

typedef struct gemm_shape {
  int nb; /* batch vars */
  int64_t M, N, K, batch, mblocks, nblocks;
  cm_kgemm_tiles t;
} gemm_shape;

/* ---- render_llvm.c ---- */
LLVMValueRef rl_ci64(rctx *c, int64_t v);
LLVMTypeRef rl_val_type(rctx *c, cm_dtype dt);
LLVMValueRef rl_intrin(rctx *c, const char *name, LLVMTypeRef *tys, int ntys, LLVMValueRef *args,
                       int nargs, const char *vname);
LLVMValueRef rl_convert(rctx *c, LLVMValueRef v, cm_dtype from, cm_dtype to);
void rl_set_scopes(rctx *c, int buf, LLVMValueRef inst);
LLVMValueRef rl_buf_gep(rctx *c, int buf, LLVMValueRef idx);
void rl_store_buf(rctx *c, int buf, LLVMValueRef idx, LLVMValueRef v, cm_dtype vdt,
                  bool accumulate);
LLVMValueRef rl_operand(rctx *c, int e, int x, cm_dtype want);
LLVMValueRef rl_vexp(rctx *c, LLVMValueRef x);
LLVMValueRef rl_emit(rctx *c, int e);
void rl_reset_memo(rctx *c);
LLVMBasicBlockRef rl_new_block(rctx *c, const char *name);
loop rl_loop_begin(rctx *c, const char *name, LLVMValueRef lo);
void rl_loop_end(rctx *c, loop *L, LLVMValueRef hi, const char *exit_name);
void rl_unroll_last_loop(rctx *c, LLVMBasicBlockRef latch, unsigned count);
void rl_no_vectorize_loop(rctx *c, LLVMBasicBlockRef latch);
LLVMValueRef rl_smin(rctx *c, LLVMValueRef a, LLVMValueRef b, const char *name);
LLVMValueRef rl_begin_function(rctx *c, const char *name, LLVMValueRef *begin, LLVMValueRef *end,
                               LLVMValueRef *ws, LLVMBasicBlockRef *done);
void rl_end_function(rctx *c, LLVMBasicBlockRef done);
LLVMValueRef *rl_span_memo(rctx *c, int first, int span);
void rl_emit_stores(rctx *c);
void rl_set_fast(LLVMValueRef v);
LLVMValueRef rl_emit_reduction(rctx *c);
LLVMValueRef rl_reduce_step(rctx *c, LLVMValueRef cur, LLVMValueRef v);
LLVMValueRef rl_reduce_init(rctx *c);
LLVMMetadataRef rl_self_md(rctx *c, LLVMMetadataRef extra);

/* ---- render_llvm_gemm.c ---- */
LLVMValueRef rl_fptr(rctx *c, LLVMValueRef base, LLVMValueRef idx, const char *name);
bool rl_lin_coef(const cm_kstage *s, int e, int kv, int64_t *coef);
bool rl_k_contiguous(rctx *c, int e);
void rl_transpose_block(rctx *c, LLVMValueRef *v);
void rl_emit_pack(rctx *c, const char *name, int e, int rv, LLVMValueRef r0, int64_t lim,
                  LLVMValueRef npan, int64_t R, int64_t kc, LLVMValueRef k0, LLVMValueRef kcur,
                  LLVMValueRef dst);
void rl_emit_fma_kloop(rctx *c, LLVMValueRef apan, LLVMValueRef bpan, int64_t mr, int64_t nv,
                       int64_t nr, LLVMValueRef kend, const char *name, LLVMValueRef *init,
                       LLVMValueRef *nacc);
void rl_render_gemm(rctx *c, const char *fname, const gemm_shape *g);

/* ---- render_llvm_attention.c ---- */
int rl_render_attention_span(rctx *c, int si, const char *fname);

#endif
