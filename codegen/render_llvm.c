/* codegen/render_llvm.c — kernel IR to LLVM IR through the C API: one function
 * per stage running work items [begin, end), generic loop nests shaped for the
 * loop vectorizer, and a packed register-blocked GEMM for CM_KT_GEMM stages.
 *
 * Values in expressions: f32/bf16/f16 as float (bf16/f16 rounded after each
 * op), f64 as double, i32/i64 as i32/i64, bool as i1 (i8 0/1 in memory).
 *
 * GEMM workspace (floats, from ws): packed B [nc/nr panels][kc][nr] per kc
 * slice (all ceil(K/kc) slices when they take at most 4 MiB, else one), then
 * packed A [mc/mr panels][kc][mr], then the C tile [mc][nc] that carries the
 * sums across kc slices: 4 * (B + mc*kc + mc*nc) bytes. Tiles left 0 by the
 * lowering default to mr 6, nr 4W (2W when W < 16), mc 240, nc 512, kc 128 (W:
 * vector width).
 *
 * Deviations from the oracle (ir/eval.c), all within rounding: f32 math runs
 * in float (the oracle rounds double results once); bf16/f16 values converted
 * from i32/i64 beyond 2^24 may be rounded twice (through f32); reduce_max of floats uses
 * llvm.maximum (NaN propagates like the oracle, but +0 is taken over -0 where
 * the oracle keeps the first). */
#include "codegen.h"

#include <llvm-c/Core.h>
#include <llvm-c/DebugInfo.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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
  int unroll; /* GEMM k-loop unroll count */
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

/* ---- small helpers ---------------------------------------------------- */

static LLVMValueRef ci64(rctx *c, int64_t v) {
  return LLVMConstInt(c->i64, (unsigned long long)v, 1);
}

static LLVMTypeRef val_type(rctx *c, cm_dtype dt) {
  switch (dt) {
  case CM_F64: return c->f64;
  case CM_I32: return c->i32;
  case CM_I64: return c->i64;
  case CM_BOOL: return c->i1;
  default: return c->f32;
  }
}

static LLVMTypeRef mem_type(rctx *c, cm_dtype dt) {
  switch (dt) {
  case CM_F64: return c->f64;
  case CM_BF16: return c->i16;
  case CM_F16: return c->f16;
  case CM_I32: return c->i32;
  case CM_I64: return c->i64;
  case CM_BOOL: return c->i8;
  default: return c->f32;
  }
}

static bool is_fp(cm_dtype dt) {
  return dt == CM_F32 || dt == CM_F64 || dt == CM_BF16 || dt == CM_F16;
}
static bool is_intdt(cm_dtype dt) {
  return dt == CM_I32 || dt == CM_I64;
}

static LLVMValueRef intrin(rctx *c, const char *name, LLVMTypeRef *tys, int ntys,
                           LLVMValueRef *args, int nargs, const char *vname) {
  unsigned id = LLVMLookupIntrinsicID(name, strlen(name));
  LLVMValueRef f = LLVMGetIntrinsicDeclaration(c->M, id, tys, (size_t)ntys);
  LLVMTypeRef fty = LLVMIntrinsicGetType(c->C, id, tys, (size_t)ntys);
  return LLVMBuildCall2(c->B, fty, f, args, (unsigned)nargs, vname);
}

static LLVMValueRef intrin1(rctx *c, const char *name, LLVMValueRef x, const char *vname) {
  LLVMTypeRef t = LLVMTypeOf(x);
  return intrin(c, name, &t, 1, &x, 1, vname);
}

static LLVMValueRef libcall(rctx *c, const char *name, LLVMTypeRef t, LLVMValueRef *args, int n,
                            const char *vname) {
  LLVMTypeRef ps[2] = {t, t};
  LLVMTypeRef fty = LLVMFunctionType(t, ps, (unsigned)n, 0);
  LLVMValueRef f = LLVMGetNamedFunction(c->M, name);
  if (!f) {
    f = LLVMAddFunction(c->M, name, fty);
    LLVMSetLinkage(f, LLVMExternalLinkage);
  }
  LLVMValueRef call = LLVMBuildCall2(c->B, fty, f, args, (unsigned)n, vname);
  return call;
}

/* bf16 round-to-nearest-even of a float, NaN kept (quieted). */
static LLVMValueRef round_bf16_bits(rctx *c, LLVMValueRef x) {
  LLVMBuilderRef B = c->B;
  LLVMValueRef bits = LLVMBuildBitCast(B, x, c->i32, "bf.bits");
  LLVMValueRef lsb = LLVMBuildAnd(B, LLVMBuildLShr(B, bits, LLVMConstInt(c->i32, 16, 0), ""),
                                  LLVMConstInt(c->i32, 1, 0), "bf.lsb");
  LLVMValueRef rnd =
      LLVMBuildAdd(B, bits, LLVMBuildAdd(B, lsb, LLVMConstInt(c->i32, 0x7fff, 0), ""), "bf.rnd");
  LLVMValueRef quiet = LLVMBuildOr(B, bits, LLVMConstInt(c->i32, 0x400000, 0), "bf.quiet");
  LLVMValueRef nan = LLVMBuildFCmp(B, LLVMRealUNO, x, x, "bf.isnan");
  LLVMValueRef r = LLVMBuildSelect(B, nan, quiet, rnd, "");
  return LLVMBuildTrunc(B, LLVMBuildLShr(B, r, LLVMConstInt(c->i32, 16, 0), ""), c->i16, "bf16");
}

static LLVMValueRef bf16_to_float(rctx *c, LLVMValueRef h) {
  LLVMValueRef w =
      LLVMBuildShl(c->B, LLVMBuildZExt(c->B, h, c->i32, ""), LLVMConstInt(c->i32, 16, 0), "");
  return LLVMBuildBitCast(c->B, w, c->f32, "bf.f");
}

/* Rounds a float holding a bf16/f16 value to that dtype (still a float). */
static LLVMValueRef round_to(rctx *c, LLVMValueRef x, cm_dtype dt) {
  if (dt == CM_BF16) return bf16_to_float(c, round_bf16_bits(c, x));
  if (dt == CM_F16)
    return LLVMBuildFPExt(c->B, LLVMBuildFPTrunc(c->B, x, c->f16, "h"), c->f32, "h.f");
  return x;
}

/* double -> float rounding to odd: a later RNE to bf16 then rounds once, like
 * the oracle (plain RNE through float could round twice). */
static LLVMValueRef trunc_odd(rctx *c, LLVMValueRef v) {
  LLVMBuilderRef B = c->B;
  LLVMValueRef t = LLVMBuildFPTrunc(B, v, c->f32, "t");
  LLVMValueRef back = LLVMBuildFPExt(B, t, c->f64, "");
  LLVMValueRef inexact = LLVMBuildFCmp(B, LLVMRealONE, back, v, "inexact");
  LLVMValueRef away = LLVMBuildFCmp(B, LLVMRealOGT, intrin1(c, "llvm.fabs", back, ""),
                                    intrin1(c, "llvm.fabs", v, ""), "away");
  LLVMValueRef bits = LLVMBuildBitCast(B, t, c->i32, "");
  LLVMValueRef toward =
      LLVMBuildSelect(B, away, LLVMBuildSub(B, bits, LLVMConstInt(c->i32, 1, 0), ""), bits, "");
  LLVMValueRef odd = LLVMBuildOr(B, toward, LLVMConstInt(c->i32, 1, 0), "");
  return LLVMBuildBitCast(B, LLVMBuildSelect(B, inexact, odd, bits, ""), c->f32, "odd");
}

/* Converts value v of dtype from to dtype to (the CAST rules of the oracle). */
static LLVMValueRef convert(rctx *c, LLVMValueRef v, cm_dtype from, cm_dtype to) {
  LLVMBuilderRef B = c->B;
  if (from == to) return v;
  LLVMTypeRef tt = val_type(c, to);
  if (to == CM_BOOL) {
    if (from == CM_BOOL) return v;
    if (is_intdt(from)) return LLVMBuildICmp(B, LLVMIntNE, v, LLVMConstNull(LLVMTypeOf(v)), "b");
    return LLVMBuildFCmp(B, LLVMRealUNE, v, LLVMConstNull(LLVMTypeOf(v)), "b");
  }
  if (from == CM_BOOL) {
    if (is_intdt(to)) return LLVMBuildZExt(B, v, tt, "");
    return LLVMBuildUIToFP(B, v, tt, "");
  }
  if (is_intdt(from) && is_intdt(to)) {
    if (to == CM_I32) return LLVMBuildTrunc(B, v, tt, "");
    return LLVMBuildSExt(B, v, tt, "");
  }
  if (is_intdt(from)) return round_to(c, LLVMBuildSIToFP(B, v, tt, ""), to);
  if (is_intdt(to)) {
    LLVMTypeRef ts[2] = {tt, LLVMTypeOf(v)};
    return intrin(c, "llvm.fptosi.sat", ts, 2, &v, 1, "fi");
  }
  /* float to float */
  if (to == CM_F64) return LLVMBuildFPExt(B, v, c->f64, "");
  if (from == CM_F64 && to == CM_F16)
    return LLVMBuildFPExt(B, LLVMBuildFPTrunc(B, v, c->f16, "h"), c->f32, "h.f");
  if (from == CM_F64 && to == CM_BF16) return round_to(c, trunc_odd(c, v), to);
  if (from == CM_F64) v = LLVMBuildFPTrunc(B, v, c->f32, "");
  return round_to(c, v, to);
}

/* Alias scopes of a fused attention span: its local tiles share the workspace
 * but never overlap each other or the kernel's buffers. */
static void set_scopes(rctx *c, int buf, LLVMValueRef inst) {
  if (!c->md_scope || !c->md_scope[buf]) return;
  LLVMSetMetadata(inst, LLVMGetMDKindIDInContext(c->C, "alias.scope", 11), c->md_scope[buf]);
  LLVMSetMetadata(inst, LLVMGetMDKindIDInContext(c->C, "noalias", 7), c->md_noalias[buf]);
}

static LLVMValueRef buf_gep(rctx *c, int buf, LLVMValueRef idx) {
  LLVMTypeRef t = mem_type(c, c->k->buffers[buf].dtype);
  if (c->ioff && c->ioff[buf]) idx = LLVMBuildSub(c->B, idx, c->ioff[buf], "at.idx");
  return LLVMBuildInBoundsGEP2(c->B, t, c->bases[buf], &idx, 1, "p");
}

static LLVMValueRef load_buf(rctx *c, int buf, LLVMValueRef idx) {
  cm_dtype dt = c->k->buffers[buf].dtype;
  LLVMValueRef p = buf_gep(c, buf, idx);
  LLVMValueRef v = LLVMBuildLoad2(c->B, mem_type(c, dt), p, "ld");
  set_scopes(c, buf, v);
  switch (dt) {
  case CM_BF16: return bf16_to_float(c, v);
  case CM_F16: return LLVMBuildFPExt(c->B, v, c->f32, "");
  case CM_BOOL: return LLVMBuildICmp(c->B, LLVMIntNE, v, LLVMConstInt(c->i8, 0, 0), "");
  default: return v;
  }
}

/* v: an expression value of dtype vdt; stored converted to the buffer's dtype. */
static void store_buf(rctx *c, int buf, LLVMValueRef idx, LLVMValueRef v, cm_dtype vdt,
                      bool accumulate) {
  cm_dtype dt = c->k->buffers[buf].dtype;
  LLVMValueRef x = convert(c, v, vdt, dt);
  LLVMValueRef p = buf_gep(c, buf, idx);
  if (accumulate) {
    LLVMValueRef old = load_buf(c, buf, idx);
    if (is_fp(dt))
      x = round_to(c, LLVMBuildFAdd(c->B, old, x, "acc.add"), dt);
    else if (dt == CM_BOOL)
      x = LLVMBuildOr(c->B, old, x, "");
    else
      x = LLVMBuildAdd(c->B, old, x, "acc.add");
  }
  switch (dt) {
  case CM_BF16: x = round_bf16_bits(c, x); break;
  case CM_F16: x = LLVMBuildFPTrunc(c->B, x, c->f16, ""); break;
  case CM_BOOL: x = LLVMBuildZExt(c->B, x, c->i8, ""); break;
  default: break;
  }
  set_scopes(c, buf, LLVMBuildStore(c->B, x, p));
}

/* ---- expressions ------------------------------------------------------ */

static LLVMValueRef emit(rctx *c, int e);

static LLVMValueRef fail_expr(rctx *c, int e, const char *rule) {
  if (!c->failed)
    c->fail_status =
        cm_errorf(c->err, CM_EINVALID, "cm_render_llvm: kernel %s stage %d (%s) expression %d: %s",
                  c->k->name, c->stage, c->s->name, e, rule);
  c->failed = true;
  return LLVMGetUndef(c->i64);
}

static LLVMValueRef operand(rctx *c, int e, int x, cm_dtype want) {
  if (x < 0 || x >= e) return fail_expr(c, e, "operand missing or not smaller than the expression");
  LLVMValueRef v = emit(c, x);
  if (c->failed) return LLVMGetUndef(val_type(c, want));
  return convert(c, v, c->s->exprs[x].dtype, want);
}

static LLVMValueRef emit_int_op(rctx *c, int e, const cm_kexpr *x) {
  LLVMBuilderRef B = c->B;
  cm_dtype dt = x->dtype;
  LLVMTypeRef t = val_type(c, dt);
  LLVMValueRef a = operand(c, e, x->a, dt);
  LLVMValueRef zero = LLVMConstNull(t);
  switch (x->op) {
  case CM_OP_NEG: return LLVMBuildSub(B, zero, a, "neg");
  case CM_OP_ABS: {
    LLVMValueRef n = LLVMBuildSub(B, zero, a, "");
    return LLVMBuildSelect(B, LLVMBuildICmp(B, LLVMIntSLT, a, zero, ""), n, a, "abs");
  }
  case CM_OP_RELU:
    return LLVMBuildSelect(B, LLVMBuildICmp(B, LLVMIntSGT, a, zero, ""), a, zero, "relu");
  case CM_OP_STOP_GRADIENT: return a;
  default: break;
  }
  LLVMValueRef b = operand(c, e, x->b, dt);
  switch (x->op) {
  case CM_OP_ADD: return LLVMBuildAdd(B, a, b, "add");
  case CM_OP_SUB: return LLVMBuildSub(B, a, b, "sub");
  case CM_OP_MUL: return LLVMBuildMul(B, a, b, "mul");
  case CM_OP_MAX: return LLVMBuildSelect(B, LLVMBuildICmp(B, LLVMIntSGT, a, b, ""), a, b, "max");
  case CM_OP_MIN: return LLVMBuildSelect(B, LLVMBuildICmp(B, LLVMIntSLT, a, b, ""), a, b, "min");
  case CM_OP_DIV: {
    /* x/0 is 0 and MIN/-1 is MIN (the oracle); neither may reach sdiv */
    LLVMValueRef bz = LLVMBuildICmp(B, LLVMIntEQ, b, zero, "bz");
    LLVMValueRef bm1 = LLVMBuildICmp(B, LLVMIntEQ, b, LLVMConstAllOnes(t), "bm1");
    LLVMValueRef safe =
        LLVMBuildSelect(B, LLVMBuildOr(B, bz, bm1, ""), LLVMConstInt(t, 1, 0), b, "");
    LLVMValueRef q = LLVMBuildSDiv(B, a, safe, "");
    q = LLVMBuildSelect(B, bm1, LLVMBuildSub(B, zero, a, ""), q, "");
    return LLVMBuildSelect(B, bz, zero, q, "div");
  }
  default: {
    /* pow and the other float ops on ints: through double like the oracle */
    LLVMValueRef fa = LLVMBuildSIToFP(B, a, c->f64, ""), fb = LLVMBuildSIToFP(B, b, c->f64, "");
    LLVMValueRef args[2] = {fa, fb};
    LLVMValueRef r;
    if (x->op == CM_OP_POW)
      r = libcall(c, "pow", c->f64, args, 2, "pow");
    else if (x->op == CM_OP_DIV)
      r = LLVMBuildFDiv(B, fa, fb, "");
    else
      return fail_expr(c, e, "op not defined on integers");
    return convert(c, r, CM_F64, dt);
  }
  }
}

/* ---- f32 math inline: exp, log, tanh, erf ---------------------------------
 * Built from plain arithmetic, so that the loop vectorizer widens them (LLVM's
 * vector library tables have no erf or tanh, and libm calls stay scalar).
 * Measured against the double-precision oracle over dense sweeps, extremes,
 * denormals, infinities and NaN (tests/unit/test_vmath.c): within 2 ulp. */

static LLVMValueRef fk(rctx *c, double v) {
  return LLVMConstReal(c->f32, v);
}

static LLVMValueRef fma3(rctx *c, LLVMValueRef a, LLVMValueRef b, LLVMValueRef d) {
  LLVMValueRef args[3] = {a, b, d};
  LLVMTypeRef t = LLVMTypeOf(a);
  return intrin(c, "llvm.fma", &t, 1, args, 3, "fma");
}

/* k[0] + t*(k[1] + t*(... k[n-1])) */
static LLVMValueRef horner(rctx *c, LLVMValueRef t, const double *k, int n) {
  LLVMValueRef r = fk(c, k[n - 1]);
  for (int i = n - 2; i >= 0; i--) r = fma3(c, r, t, fk(c, k[i]));
  return r;
}

static LLVMValueRef fsel(rctx *c, LLVMRealPredicate p, LLVMValueRef a, LLVMValueRef b,
                         LLVMValueRef yes, LLVMValueRef no) {
  return LLVMBuildSelect(c->B, LLVMBuildFCmp(c->B, p, a, b, ""), yes, no, "");
}

/* 2^n for i32 n in [-126, 127] */
static LLVMValueRef pow2i(rctx *c, LLVMValueRef n) {
  LLVMValueRef b = LLVMBuildShl(c->B, LLVMBuildAdd(c->B, n, LLVMConstInt(c->i32, 127, 0), ""),
                                LLVMConstInt(c->i32, 23, 0), "");
  return LLVMBuildBitCast(c->B, b, c->f32, "pow2");
}

/* exp: x = n ln2 + r (Cody-Waite), e^r by its degree-7 Taylor polynomial
 * (|r| <= ln2/2: truncation 6e-9), times 2^n in two halves so that results in
 * the denormal range and 2^128 overflow round once. */
static LLVMValueRef vexp(rctx *c, LLVMValueRef x) {
  LLVMBuilderRef B = c->B;
  LLVMValueRef nan = LLVMBuildFCmp(B, LLVMRealUNO, x, x, "isnan");
  LLVMValueRef xc = LLVMBuildSelect(B, nan, fk(c, 0), x, "");
  xc = fsel(c, LLVMRealOGT, xc, fk(c, 89), fk(c, 89), xc);
  xc = fsel(c, LLVMRealOLT, xc, fk(c, -104), fk(c, -104), xc);
  LLVMValueRef n =
      intrin1(c, "llvm.roundeven", LLVMBuildFMul(B, xc, fk(c, 1.44269504088896341), ""), "n");
  LLVMValueRef r = fma3(c, n, fk(c, -0.693145751953125), xc);
  r = fma3(c, n, fk(c, -1.42860682030941723212e-6), r);
  static const double k[8] = {1, 1, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040};
  LLVMValueRef p = horner(c, r, k, 8);
  LLVMValueRef ni = LLVMBuildFPToSI(B, n, c->i32, "ni");
  LLVMValueRef n1 = LLVMBuildAShr(B, ni, LLVMConstInt(c->i32, 1, 0), "");
  LLVMValueRef n2 = LLVMBuildSub(B, ni, n1, "");
  LLVMValueRef res = LLVMBuildFMul(B, LLVMBuildFMul(B, p, pow2i(c, n1), ""), pow2i(c, n2), "");
  return LLVMBuildSelect(B, nan, x, res, "exp");
}

/* log: x = 2^k (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)), log(1 + f) from
 * s = f / (2 + f) and a polynomial in s^2 (fdlibm's split into f - f^2/2 +
 * s (f^2/2 + R)); denormals scaled by 2^23 first. */
static LLVMValueRef vlog(rctx *c, LLVMValueRef x) {
  LLVMBuilderRef B = c->B;
  LLVMValueRef tiny = LLVMBuildAnd(B, LLVMBuildFCmp(B, LLVMRealOLT, x, fk(c, 1.17549435e-38), ""),
                                   LLVMBuildFCmp(B, LLVMRealOGT, x, fk(c, 0), ""), "tiny");
  LLVMValueRef xs = LLVMBuildSelect(B, tiny, LLVMBuildFMul(B, x, fk(c, 8388608.0), ""), x, "");
  LLVMValueRef kadj = LLVMBuildSelect(B, tiny, LLVMConstInt(c->i32, (unsigned long long)-23, 1),
                                      LLVMConstInt(c->i32, 0, 0), "");
  LLVMValueRef ix = LLVMBuildBitCast(B, xs, c->i32, "");
  ix = LLVMBuildAdd(B, ix, LLVMConstInt(c->i32, 0x3f800000 - 0x3f3504f3, 0), "");
  LLVMValueRef k = LLVMBuildSub(B, LLVMBuildAShr(B, ix, LLVMConstInt(c->i32, 23, 0), ""),
                                LLVMConstInt(c->i32, 0x7f, 0), "");
  k = LLVMBuildAdd(B, k, kadj, "k");
  LLVMValueRef im = LLVMBuildAdd(B, LLVMBuildAnd(B, ix, LLVMConstInt(c->i32, 0x007fffff, 0), ""),
                                 LLVMConstInt(c->i32, 0x3f3504f3, 0), "");
  LLVMValueRef f = LLVMBuildFSub(B, LLVMBuildBitCast(B, im, c->f32, ""), fk(c, 1), "f");
  LLVMValueRef s = LLVMBuildFDiv(B, f, LLVMBuildFAdd(B, f, fk(c, 2), ""), "s");
  LLVMValueRef z = LLVMBuildFMul(B, s, s, ""), w = LLVMBuildFMul(B, z, z, "");
  static const double odd[2] = {0.66666662693, 0.28498786688},
                      even[2] = {0.40000972152, 0.24279078841};
  LLVMValueRef R = LLVMBuildFAdd(B, LLVMBuildFMul(B, z, horner(c, w, odd, 2), ""),
                                 LLVMBuildFMul(B, w, horner(c, w, even, 2), ""), "R");
  LLVMValueRef hfsq = LLVMBuildFMul(B, fk(c, 0.5), LLVMBuildFMul(B, f, f, ""), "hfsq");
  LLVMValueRef dk = LLVMBuildSIToFP(B, k, c->f32, "dk");
  LLVMValueRef r =
      fma3(c, s, LLVMBuildFAdd(B, hfsq, R, ""), LLVMBuildFMul(B, dk, fk(c, 9.0580006145e-06), ""));
  r = LLVMBuildFAdd(B, LLVMBuildFAdd(B, LLVMBuildFSub(B, r, hfsq, ""), f, ""),
                    LLVMBuildFMul(B, dk, fk(c, 6.9313812256e-01), ""), "");
  r = fsel(c, LLVMRealOEQ, x, fk(c, INFINITY), fk(c, INFINITY), r);
  r = fsel(c, LLVMRealOEQ, x, fk(c, 0), fk(c, -INFINITY), r);
  return fsel(c, LLVMRealULT, x, fk(c, 0), fk(c, NAN), r); /* x < 0 or NaN */
}

/* tanh: an odd polynomial below 0.55, else 1 - 2 / (e^{2|x|} + 1) (which
 * reaches 1 by itself once e^{2|x|} overflows). */
static LLVMValueRef vtanh(rctx *c, LLVMValueRef x) {
  LLVMBuilderRef B = c->B;
  static const double k[6] = {-0.333333343, 0.133333266,    -0.0539650992,
                              0.0218216702, -0.00853742938, 0.00254011271};
  LLVMValueRef ax = intrin1(c, "llvm.fabs", x, "ax");
  LLVMValueRef x2 = LLVMBuildFMul(B, x, x, "");
  LLVMValueRef small = fma3(c, LLVMBuildFMul(B, x, x2, ""), horner(c, x2, k, 6), x);
  LLVMValueRef sargs[2] = {small, x};
  LLVMTypeRef st = c->f32;
  small = intrin(c, "llvm.copysign", &st, 1, sargs, 2, ""); /* tanh(-0) = -0 */
  LLVMValueRef e = vexp(c, LLVMBuildFMul(B, ax, fk(c, 2), ""));
  LLVMValueRef big = LLVMBuildFSub(
      B, fk(c, 1), LLVMBuildFDiv(B, fk(c, 2), LLVMBuildFAdd(B, e, fk(c, 1), ""), ""), "");
  LLVMValueRef args[2] = {big, x};
  LLVMTypeRef t = c->f32;
  big = intrin(c, "llvm.copysign", &t, 1, args, 2, "");
  return fsel(c, LLVMRealOLT, ax, fk(c, 0.55), small, big);
}

/* erf: x P(x^2) below 1; above, 1 - e^{-x^2} Q(1/x) (erfc e^{x^2} is smooth
 * in 1/x); 1 from 3.93 on, where erfc < half an ulp of 1. */
static LLVMValueRef verf(rctx *c, LLVMValueRef x) {
  LLVMBuilderRef B = c->B;
  static const double ks[7] = {1.12837923,    -0.376126289,    0.112836123,   -0.0268548094,
                               0.00519005349, -0.000802435388, 7.89820988e-05};
  static const double kc[9] = {0.000257560838, 0.559250534,  0.0405625403,
                               -0.466041684,   0.483780742,  -0.222720757,
                               0.00688249897,  0.0367545895, -0.0111424867};
  LLVMValueRef ax = intrin1(c, "llvm.fabs", x, "ax");
  LLVMValueRef x2 = LLVMBuildFMul(B, x, x, "");
  LLVMValueRef small = LLVMBuildFMul(B, x, horner(c, x2, ks, 7), "");
  LLVMValueRef axc = fsel(c, LLVMRealOLT, ax, fk(c, 1), fk(c, 1), ax); /* no 1/0 in lanes unused */
  LLVMValueRef t = LLVMBuildFDiv(B, fk(c, 1), axc, "t");
  LLVMValueRef ec = LLVMBuildFMul(B, vexp(c, LLVMBuildFNeg(B, x2, "")), horner(c, t, kc, 9), "");
  LLVMValueRef big = LLVMBuildFSub(B, fk(c, 1), ec, "");
  big = fsel(c, LLVMRealOGE, ax, fk(c, 3.93), fk(c, 1), big);
  LLVMValueRef args[2] = {big, x};
  LLVMTypeRef ft = c->f32;
  big = intrin(c, "llvm.copysign", &ft, 1, args, 2, "");
  return fsel(c, LLVMRealOLT, ax, fk(c, 1), small, big);
}

static LLVMValueRef emit_float_unary(rctx *c, int e, cm_op op, LLVMValueRef a, bool dbl) {
  LLVMBuilderRef B = c->B;
  LLVMTypeRef t = LLVMTypeOf(a);
  LLVMValueRef one = LLVMConstReal(t, 1.0), zero = LLVMConstReal(t, 0.0);
  switch (op) {
  case CM_OP_NEG: return LLVMBuildFNeg(B, a, "neg");
  case CM_OP_ABS: return intrin1(c, "llvm.fabs", a, "abs");
  case CM_OP_EXP: return dbl ? intrin1(c, "llvm.exp", a, "exp") : vexp(c, a);
  case CM_OP_LOG: return dbl ? intrin1(c, "llvm.log", a, "log") : vlog(c, a);
  case CM_OP_SQRT: return intrin1(c, "llvm.sqrt", a, "sqrt");
  case CM_OP_RSQRT: return LLVMBuildFDiv(B, one, intrin1(c, "llvm.sqrt", a, ""), "rsqrt");
  case CM_OP_RECIP: return LLVMBuildFDiv(B, one, a, "recip");
  case CM_OP_TANH: return dbl ? libcall(c, "tanh", t, &a, 1, "tanh") : vtanh(c, a);
  case CM_OP_ERF: return dbl ? libcall(c, "erf", t, &a, 1, "erf") : verf(c, a);
  case CM_OP_RELU: /* NaN stays NaN, -0 becomes +0 */
    return LLVMBuildSelect(B, LLVMBuildFCmp(B, LLVMRealUGT, a, zero, ""), a, zero, "relu");
  case CM_OP_STOP_GRADIENT: return a;
  default: return fail_expr(c, e, "not a unary float op");
  }
}

static void mark_deps(const cm_kstage *s, int e, bool *seen);
static LLVMBasicBlockRef new_block(rctx *c, const char *name);

/* Whether SELECT e should branch: its condition is the same along the inner
 * loop (a concat along an outer axis, padding of an outer axis) and an operand
 * loads memory. The loop is then unswitched and each half loads only its own
 * input (a SELECT reads every input of a concat). */
static bool select_branches(rctx *c, const cm_kexpr *x) {
  const cm_kstage *s = c->s;
  if (!c->select_branches || x->a < 0 || x->b < 0 || x->c < 0 ||
      (cm_kx_vars_used(s, x->a) & (1u << c->inner_var)))
    return false;
  bool *seen = calloc((size_t)s->n_exprs + 1, sizeof *seen);
  if (!seen) return false;
  mark_deps(s, x->b, seen);
  mark_deps(s, x->c, seen);
  bool load = false;
  for (int i = 0; i < s->n_exprs && !load; i++) load = seen[i] && s->exprs[i].kind == CM_KX_LOAD;
  free(seen);
  return load;
}

/* cond ? a : b as two blocks and a phi; values first computed inside one block
 * do not dominate the rest, so the memo is restored after each. */
static LLVMValueRef emit_select_branch(rctx *c, int e, const cm_kexpr *x) {
  LLVMBuilderRef B = c->B;
  size_t sz = sizeof(LLVMValueRef) * (size_t)c->s->n_exprs;
  LLVMValueRef *saved = malloc(sz ? sz : 1);
  if (!saved) return fail_expr(c, e, "out of memory");
  LLVMValueRef cond = operand(c, e, x->a, CM_BOOL);
  memcpy(saved, c->memo, sz);
  LLVMBasicBlockRef tb = new_block(c, "sel.t"), fb = new_block(c, "sel.f"),
                    mb = new_block(c, "sel.m");
  LLVMBuildCondBr(B, cond, tb, fb);
  LLVMPositionBuilderAtEnd(B, tb);
  LLVMValueRef a = operand(c, e, x->b, x->dtype);
  LLVMBasicBlockRef tend = LLVMGetInsertBlock(B);
  LLVMBuildBr(B, mb);
  memcpy(c->memo, saved, sz);
  LLVMPositionBuilderAtEnd(B, fb);
  LLVMValueRef b = operand(c, e, x->c, x->dtype);
  LLVMBasicBlockRef fend = LLVMGetInsertBlock(B);
  LLVMBuildBr(B, mb);
  memcpy(c->memo, saved, sz);
  free(saved);
  LLVMPositionBuilderAtEnd(B, mb);
  LLVMValueRef phi = LLVMBuildPhi(B, LLVMTypeOf(a), "sel");
  LLVMAddIncoming(phi, &a, &tend, 1);
  LLVMAddIncoming(phi, &b, &fend, 1);
  return phi;
}

static LLVMValueRef emit_op(rctx *c, int e, const cm_kexpr *x) {
  LLVMBuilderRef B = c->B;
  cm_dtype dt = x->dtype;
  cm_op op = x->op;
  if (op == CM_OP_CAST) {
    if (x->a < 0 || x->a >= e) return fail_expr(c, e, "cast without an operand");
    return convert(c, emit(c, x->a), c->s->exprs[x->a].dtype, dt);
  }
  if (op == CM_OP_SELECT) {
    if (select_branches(c, x)) return emit_select_branch(c, e, x);
    LLVMValueRef cond = operand(c, e, x->a, CM_BOOL);
    LLVMValueRef a = operand(c, e, x->b, dt), b = operand(c, e, x->c, dt);
    return LLVMBuildSelect(B, cond, a, b, "sel");
  }
  if (op == CM_OP_LT || op == CM_OP_LE || op == CM_OP_EQ || op == CM_OP_NE) {
    if (x->a < 0 || x->a >= e || x->b < 0 || x->b >= e)
      return fail_expr(c, e, "comparison operands missing");
    cm_dtype da = c->s->exprs[x->a].dtype, db = c->s->exprs[x->b].dtype;
    if ((is_intdt(da) || da == CM_BOOL) && (is_intdt(db) || db == CM_BOOL)) {
      LLVMValueRef a = operand(c, e, x->a, CM_I64), b = operand(c, e, x->b, CM_I64);
      LLVMIntPredicate p = op == CM_OP_LT   ? LLVMIntSLT
                           : op == CM_OP_LE ? LLVMIntSLE
                           : op == CM_OP_EQ ? LLVMIntEQ
                                            : LLVMIntNE;
      return convert(c, LLVMBuildICmp(B, p, a, b, "cmp"), CM_BOOL, dt);
    }
    cm_dtype ct = (da == CM_F64 || db == CM_F64 || is_intdt(da) || is_intdt(db)) ? CM_F64 : CM_F32;
    LLVMValueRef a = operand(c, e, x->a, ct), b = operand(c, e, x->b, ct);
    LLVMRealPredicate p = op == CM_OP_LT   ? LLVMRealOLT
                          : op == CM_OP_LE ? LLVMRealOLE
                          : op == CM_OP_EQ ? LLVMRealOEQ
                                           : LLVMRealUNE;
    return convert(c, LLVMBuildFCmp(B, p, a, b, "cmp"), CM_BOOL, dt);
  }
  if (is_intdt(dt)) return emit_int_op(c, e, x);
  if (dt == CM_BOOL) {
    return fail_expr(c, e,
                     "arithmetic op with a bool result (only comparisons, SELECT and "
                     "CAST give bool)");
  }
  bool dbl = dt == CM_F64;
  cm_dtype ct = dbl ? CM_F64 : CM_F32;
  LLVMValueRef a = operand(c, e, x->a, ct), r;
  int arity = (op == CM_OP_ADD || op == CM_OP_SUB || op == CM_OP_MUL || op == CM_OP_DIV ||
               op == CM_OP_MAX || op == CM_OP_MIN || op == CM_OP_POW)
                  ? 2
                  : 1;
  if (arity == 1) {
    r = emit_float_unary(c, e, op, a, dbl);
  } else {
    LLVMValueRef b = operand(c, e, x->b, ct);
    switch (op) {
    case CM_OP_ADD: r = LLVMBuildFAdd(B, a, b, "add"); break;
    case CM_OP_SUB: r = LLVMBuildFSub(B, a, b, "sub"); break;
    case CM_OP_MUL: r = LLVMBuildFMul(B, a, b, "mul"); break;
    case CM_OP_DIV: r = LLVMBuildFDiv(B, a, b, "div"); break;
    case CM_OP_MAX:
    case CM_OP_MIN: {
      /* the oracle: NaN if either is NaN, else a > b ? a : b (b on ties) */
      LLVMValueRef gt = LLVMBuildFCmp(B, op == CM_OP_MAX ? LLVMRealOGT : LLVMRealOLT, a, b, "");
      LLVMValueRef m = LLVMBuildSelect(B, gt, a, b, "");
      LLVMValueRef uno = LLVMBuildFCmp(B, LLVMRealUNO, a, b, "");
      r = LLVMBuildSelect(B, uno, LLVMBuildFAdd(B, a, b, ""), m, op == CM_OP_MAX ? "max" : "min");
      break;
    }
    case CM_OP_POW: {
      /* the intrinsic (powf/pow underneath) does not touch memory: a loop-invariant pow, as
         Adam's bias correction has, is hoisted out of the loop */
      LLVMValueRef args[2] = {a, b};
      LLVMTypeRef pt = LLVMTypeOf(a);
      r = intrin(c, "llvm.pow", &pt, 1, args, 2, "pow");
      break;
    }
    default: r = fail_expr(c, e, "unknown op");
    }
  }
  return round_to(c, r, dt);
}

static LLVMValueRef emit(rctx *c, int e) {
  const cm_kstage *s = c->s;
  if (e < 0 || e >= s->n_exprs) return fail_expr(c, e, "expression id out of range");
  if (c->memo[e]) return c->memo[e];
  const cm_kexpr *x = &s->exprs[e];
  LLVMValueRef v = NULL;
  switch (x->kind) {
  case CM_KX_CONST:
    if (x->dtype == CM_F64)
      v = LLVMConstReal(c->f64, x->value);
    else if (is_fp(x->dtype)) {
      LLVMValueRef f = LLVMConstReal(c->f64, x->value);
      v = convert(c, f, CM_F64, x->dtype);
    } else if (x->dtype == CM_BOOL)
      v = LLVMConstInt(c->i1, x->value != 0, 0);
    else
      v = LLVMConstInt(val_type(c, x->dtype), (unsigned long long)(int64_t)x->value, 1);
    break;
  case CM_KX_VAR:
    if (x->var < 0 || x->var >= s->n_dom + s->n_red || !c->vars[x->var])
      return fail_expr(c, e, "variable not in scope");
    v = c->vars[x->var];
    break;
  case CM_KX_ACC:
    if (!c->acc) return fail_expr(c, e, "ACC outside a store value of a reduction");
    v = convert(c, c->acc, s->acc_dtype, x->dtype);
    break;
  case CM_KX_LOAD: {
    if (x->buf < 0 || x->buf >= c->k->n_buffers) return fail_expr(c, e, "buffer out of range");
    LLVMValueRef idx = operand(c, e, x->a, CM_I64);
    if (c->failed) return idx;
    v = convert(c, load_buf(c, x->buf, idx), c->k->buffers[x->buf].dtype, x->dtype);
    break;
  }
  case CM_KX_MOD: {
    LLVMValueRef a = operand(c, e, x->b >= 0 ? x->a : -1, CM_I64);
    LLVMValueRef b = operand(c, e, x->b, CM_I64);
    if (c->failed) return a;
    LLVMValueRef bad = LLVMBuildICmp(c->B, LLVMIntSLE, b, ci64(c, 0), "");
    LLVMValueRef safe = LLVMBuildSelect(c->B, bad, ci64(c, 1), b, "");
    LLVMValueRef r = LLVMBuildSRem(c->B, a, safe, "mod");
    v = LLVMBuildSelect(c->B, bad, ci64(c, 0), r, "");
    break;
  }
  case CM_KX_OP: v = emit_op(c, e, x); break;
  default: return fail_expr(c, e, "unknown expression kind");
  }
  if (c->failed) return LLVMGetUndef(val_type(c, x->dtype));
  c->memo[e] = v;
  return v;
}

static void reset_memo(rctx *c) {
  memset(c->memo, 0, sizeof(LLVMValueRef) * (size_t)(c->s->n_exprs ? c->s->n_exprs : 1));
}

/* ---- loops ------------------------------------------------------------ */

typedef struct loop {
  LLVMBasicBlockRef header;
  LLVMValueRef iv;
} loop;

static LLVMBasicBlockRef new_block(rctx *c, const char *name) {
  return LLVMAppendBasicBlockInContext(c->C, c->fn, name);
}

/* A do-while counted loop from lo (the caller guarantees lo < hi). */
static loop loop_begin(rctx *c, const char *name, LLVMValueRef lo) {
  loop L;
  LLVMBasicBlockRef pre = LLVMGetInsertBlock(c->B);
  L.header = new_block(c, name);
  LLVMBuildBr(c->B, L.header);
  LLVMPositionBuilderAtEnd(c->B, L.header);
  L.iv = LLVMBuildPhi(c->B, c->i64, name);
  LLVMAddIncoming(L.iv, &lo, &pre, 1);
  return L;
}

static void loop_end(rctx *c, loop *L, LLVMValueRef hi, const char *exit_name) {
  LLVMValueRef next = LLVMBuildNSWAdd(c->B, L->iv, ci64(c, 1), "next");
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(c->B);
  LLVMBasicBlockRef exit = new_block(c, exit_name);
  LLVMBuildCondBr(c->B, LLVMBuildICmp(c->B, LLVMIntSLT, next, hi, "more"), L->header, exit);
  LLVMAddIncoming(L->iv, &next, &latch, 1);
  LLVMPositionBuilderAtEnd(c->B, exit);
}

/* Asks the optimizer to unroll the loop just closed (its back edge is the
 * terminator of the block before the insertion block) count times. */
static void unroll_last_loop(rctx *c, LLVMBasicBlockRef latch, unsigned count) {
  LLVMValueRef br = LLVMGetBasicBlockTerminator(latch);
  if (!br) return;
  LLVMMetadataRef tmp = LLVMTemporaryMDNode(c->C, NULL, 0);
  LLVMMetadataRef ops[2] = {
      LLVMMDStringInContext2(c->C, "llvm.loop.unroll.count", 22),
      LLVMValueAsMetadata(LLVMConstInt(c->i32, count, 0)),
  };
  LLVMMetadataRef cnt = LLVMMDNodeInContext2(c->C, ops, 2);
  LLVMMetadataRef id_ops[2] = {tmp, cnt};
  LLVMMetadataRef id = LLVMMDNodeInContext2(c->C, id_ops, 2);
  LLVMMetadataReplaceAllUsesWith(tmp, id); /* also deletes tmp */
  LLVMSetMetadata(br, LLVMGetMDKindIDInContext(c->C, "llvm.loop", 9),
                  LLVMMetadataAsValue(c->C, id));
}

/* Keeps the loop vectorizer off the loop just closed (latch: its back edge's block). */
static void no_vectorize_loop(rctx *c, LLVMBasicBlockRef latch) {
  LLVMValueRef br = LLVMGetBasicBlockTerminator(latch);
  if (!br) return;
  LLVMMetadataRef tmp = LLVMTemporaryMDNode(c->C, NULL, 0);
  LLVMMetadataRef ops[2] = {
      LLVMMDStringInContext2(c->C, "llvm.loop.vectorize.enable", 26),
      LLVMValueAsMetadata(LLVMConstInt(c->i1, 0, 0)),
  };
  LLVMMetadataRef off = LLVMMDNodeInContext2(c->C, ops, 2);
  LLVMMetadataRef id_ops[2] = {tmp, off};
  LLVMMetadataRef id = LLVMMDNodeInContext2(c->C, id_ops, 2);
  LLVMMetadataReplaceAllUsesWith(tmp, id);
  LLVMSetMetadata(br, LLVMGetMDKindIDInContext(c->C, "llvm.loop", 9),
                  LLVMMetadataAsValue(c->C, id));
}

static LLVMValueRef smin(rctx *c, LLVMValueRef a, LLVMValueRef b, const char *name) {
  return LLVMBuildSelect(c->B, LLVMBuildICmp(c->B, LLVMIntSLT, a, b, ""), a, b, name);
}

/* ---- function skeleton -------------------------------------------------- */

static LLVMValueRef begin_function(rctx *c, const char *name, LLVMValueRef *begin,
                                   LLVMValueRef *end, LLVMValueRef *ws, LLVMBasicBlockRef *done) {
  LLVMTypeRef ps[4] = {c->ptr, c->i64, c->i64, c->ptr};
  LLVMTypeRef fty = LLVMFunctionType(LLVMVoidTypeInContext(c->C), ps, 4, 0);
  LLVMValueRef fn = LLVMAddFunction(c->M, name, fty);
  c->fn = fn;
  LLVMValueRef bufs = LLVMGetParam(fn, 0);
  *begin = LLVMGetParam(fn, 1);
  *end = LLVMGetParam(fn, 2);
  *ws = LLVMGetParam(fn, 3);
  LLVMSetValueName2(bufs, "bufs", 4);
  LLVMSetValueName2(*begin, "begin", 5);
  LLVMSetValueName2(*end, "end", 3);
  LLVMSetValueName2(*ws, "ws", 2);
  unsigned kind_nonnull = LLVMGetEnumAttributeKindForName("nonnull", 7);
  unsigned kind_align = LLVMGetEnumAttributeKindForName("align", 5);
  unsigned kind_nounwind = LLVMGetEnumAttributeKindForName("nounwind", 8);
  LLVMAddAttributeAtIndex(fn, 1, LLVMCreateEnumAttribute(c->C, kind_nonnull, 0));
  LLVMAddAttributeAtIndex(fn, 4, LLVMCreateEnumAttribute(c->C, kind_align, 64));
  LLVMAddAttributeAtIndex(fn, LLVMAttributeFunctionIndex,
                          LLVMCreateEnumAttribute(c->C, kind_nounwind, 0));
  LLVMBasicBlockRef entry = new_block(c, "entry");
  LLVMPositionBuilderAtEnd(c->B, entry);
  unsigned md_inv = LLVMGetMDKindIDInContext(c->C, "invariant.load", 14);
  unsigned md_nonnull = LLVMGetMDKindIDInContext(c->C, "nonnull", 7);
  LLVMValueRef empty = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, NULL, 0));
  for (int i = 0; i < c->k->n_buffers; i++) {
    char nm[32];
    snprintf(nm, sizeof nm, "buf%d", i);
    LLVMValueRef idx = ci64(c, i);
    LLVMValueRef p = LLVMBuildInBoundsGEP2(c->B, c->ptr, bufs, &idx, 1, "");
    LLVMValueRef b = LLVMBuildLoad2(c->B, c->ptr, p, nm);
    LLVMSetMetadata(b, md_inv, empty);
    LLVMSetMetadata(b, md_nonnull, empty);
    c->bases[i] = b;
  }
  LLVMBasicBlockRef body = new_block(c, "work");
  *done = new_block(c, "done");
  LLVMBuildCondBr(c->B, LLVMBuildICmp(c->B, LLVMIntSLT, *begin, *end, "any"), body, *done);
  LLVMPositionBuilderAtEnd(c->B, body);
  return fn;
}

/* Ends the function begin_function opened: the body falls through to done. */
static void end_function(rctx *c, LLVMBasicBlockRef done) {
  LLVMBuildBr(c->B, done);
  LLVMPositionBuilderAtEnd(c->B, done);
  LLVMBuildRetVoid(c->B);
}

/* An expression memo for every stage of a span (NULL when out of memory: the
 * error is recorded in c). */
static LLVMValueRef *span_memo(rctx *c, int first, int span) {
  int max_exprs = 1;
  for (int si = first; si < first + span; si++)
    if (c->k->stages[si].n_exprs > max_exprs) max_exprs = c->k->stages[si].n_exprs;
  LLVMValueRef *memo = calloc((size_t)max_exprs, sizeof *memo);
  if (!memo) {
    c->failed = true;
    c->fail_status = cm_errorf(c->err, CM_EINTERNAL, "cm_render_llvm: out of memory");
  }
  return memo;
}

/* Stores of one iteration: every value first, then every store. */
static void emit_stores(rctx *c) {
  const cm_kstage *s = c->s;
  LLVMValueRef vals[CM_KMAX_STORES], idxs[CM_KMAX_STORES];
  reset_memo(c);
  for (int i = 0; i < s->n_stores && !c->failed; i++) {
    vals[i] = emit(c, s->stores[i].value);
    idxs[i] = convert(c, emit(c, s->stores[i].index), s->exprs[s->stores[i].index].dtype, CM_I64);
  }
  for (int i = 0; i < s->n_stores && !c->failed; i++)
    store_buf(c, s->stores[i].buf, idxs[i], vals[i], s->exprs[s->stores[i].value].dtype,
              s->accumulate);
}

static void set_fast(LLVMValueRef v) {
  LLVMSetFastMathFlags(v, LLVMFastMathAllowReassoc | LLVMFastMathNoSignedZeros);
}

/* The reduction nest over vars n_dom.. ; returns the accumulated value (acc_dtype). */
static LLVMValueRef emit_reduction(rctx *c) {
  const cm_kstage *s = c->s;
  cm_dtype at = s->acc_dtype;
  LLVMTypeRef t = val_type(c, at);
  bool fp = is_fp(at), mx = s->red_op == CM_KRED_MAX;
  LLVMValueRef init;
  if (!mx)
    init = LLVMConstNull(t);
  else if (fp)
    init = LLVMConstReal(t, -INFINITY);
  else
    init = LLVMConstInt(
        t, at == CM_I32 ? (unsigned long long)(int64_t)INT32_MIN : (unsigned long long)INT64_MIN,
        1);
  loop L[CM_KMAX_VARS];
  LLVMValueRef phis[CM_KMAX_VARS];
  LLVMValueRef cur = init;
  for (int r = 0; r < s->n_red; r++) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d", r);
    LLVMBasicBlockRef pre = LLVMGetInsertBlock(c->B);
    L[r] = loop_begin(c, nm, ci64(c, 0));
    phis[r] = LLVMBuildPhi(c->B, t, "acc");
    LLVMAddIncoming(phis[r], &cur, &pre, 1);
    cur = phis[r];
    c->vars[s->n_dom + r] = L[r].iv;
  }
  reset_memo(c);
  LLVMValueRef v = convert(c, emit(c, s->body), s->exprs[s->body].dtype, at);
  LLVMValueRef nv;
  if (!mx) {
    nv = fp ? LLVMBuildFAdd(c->B, cur, v, "sum") : LLVMBuildAdd(c->B, cur, v, "sum");
    if (fp) set_fast(nv);
  } else if (fp) {
    LLVMValueRef args[2] = {cur, v};
    LLVMTypeRef tt = t;
    nv = intrin(c, "llvm.maximum", &tt, 1, args, 2, "max");
  } else {
    nv = LLVMBuildSelect(c->B, LLVMBuildICmp(c->B, LLVMIntSGT, v, cur, ""), v, cur, "max");
  }
  for (int r = s->n_red - 1; r >= 0; r--) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d.exit", r);
    LLVMBasicBlockRef latch = LLVMGetInsertBlock(c->B);
    LLVMAddIncoming(phis[r], &nv, &latch, 1);
    loop_end(c, &L[r], ci64(c, s->red[r]), nm);
    c->vars[s->n_dom + r] = NULL;
  }
  return nv;
}

static bool lin_coef(const cm_kstage *s, int e, int kv, int64_t *coef);

/* Marks in seen[] the expressions e depends on (e included). */
static void mark_deps(const cm_kstage *s, int e, bool *seen) {
  if (e < 0 || e >= s->n_exprs || seen[e]) return;
  seen[e] = true;
  const cm_kexpr *x = &s->exprs[e];
  if (x->kind == CM_KX_OP || x->kind == CM_KX_MOD || x->kind == CM_KX_LOAD) {
    if (x->a < e) mark_deps(s, x->a, seen);
    if (x->b < e) mark_deps(s, x->b, seen);
    if (x->c < e) mark_deps(s, x->c, seen);
  }
}

/* A reduction whose loads run contiguously along the innermost domain var and
 * not along the innermost reduction var (a sum over leading axes, like a bias
 * gradient): the generic nest would walk each column with a stride. */
static bool is_column_reduction(const cm_kstage *s) {
  if (s->n_red < 1 || s->accumulate || s->n_dom < 1 || s->n_parallel != s->n_dom ||
      s->dom[s->n_dom - 1] < 4 || s->body < 0 || s->body >= s->n_exprs)
    return false;
  bool *seen = calloc((size_t)s->n_exprs, sizeof *seen);
  if (!seen) return false;
  mark_deps(s, s->body, seen);
  int dv = s->n_dom - 1, rv = s->n_dom + s->n_red - 1;
  bool along_d = false, other = false;
  /* loads not reading along dv are one value per run of columns: they do not count */
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    if (!seen[e] || x->kind != CM_KX_LOAD || !(cm_kx_vars_used(s, x->a) & (1u << dv))) continue;
    int64_t cd, cr;
    if (!lin_coef(s, x->a, dv, &cd) || cd != 1 || (lin_coef(s, x->a, rv, &cr) && cr == 1))
      other = true;
    else
      along_d = true;
  }
  free(seen);
  return along_d && !other;
}

/* acc op v for the stage's reduction (acc_dtype values). */
static LLVMValueRef reduce_step(rctx *c, LLVMValueRef cur, LLVMValueRef v) {
  cm_dtype at = c->s->acc_dtype;
  bool fp = is_fp(at);
  if (c->s->red_op != CM_KRED_MAX) {
    LLVMValueRef nv = fp ? LLVMBuildFAdd(c->B, cur, v, "sum") : LLVMBuildAdd(c->B, cur, v, "sum");
    if (fp) set_fast(nv);
    return nv;
  }
  if (fp) {
    LLVMValueRef args[2] = {cur, v};
    LLVMTypeRef tt = LLVMTypeOf(cur);
    return intrin(c, "llvm.maximum", &tt, 1, args, 2, "max");
  }
  return LLVMBuildSelect(c->B, LLVMBuildICmp(c->B, LLVMIntSGT, v, cur, ""), v, cur, "max");
}

static LLVMValueRef reduce_init(rctx *c) {
  cm_dtype at = c->s->acc_dtype;
  LLVMTypeRef t = val_type(c, at);
  if (c->s->red_op != CM_KRED_MAX) return LLVMConstNull(t);
  if (is_fp(at)) return LLVMConstReal(t, -INFINITY);
  return LLVMConstInt(
      t, at == CM_I32 ? (unsigned long long)(int64_t)INT32_MIN : (unsigned long long)INT64_MIN, 1);
}

static void stage_scopes(rctx *c);
static void free_scopes(rctx *c);

/* Column reductions: work items in runs of up to CR_TILE consecutive columns
 * (innermost domain var); the run's accumulators live in a stack array and the
 * column loop is innermost inside the reduction nest, so the loads are
 * contiguous vectors. */
#define CR_TILE 256
static void render_column_reduction(rctx *c, const char *fname) {
  const cm_kstage *s = c->s;
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  LLVMValueRef fn = begin_function(c, fname, &begin, &end, &ws, &done);
  stage_scopes(c);
  int nd = s->n_dom, dv = nd - 1;
  int64_t D = s->dom[dv];
  /* f32 sums accumulate in double here: a column sums one row at a time (no
     vector of partial sums as a row reduction has), over thousands of rows */
  bool wide = s->red_op == CM_KRED_SUM && is_fp(s->acc_dtype) && s->acc_dtype != CM_F64;
  LLVMTypeRef at = wide ? c->f64 : val_type(c, s->acc_dtype);
  LLVMTypeRef arr_t = LLVMArrayType2(at, (uint64_t)CR_TILE);
  LLVMBasicBlockRef here = LLVMGetInsertBlock(B);
  LLVMBasicBlockRef entry = LLVMGetEntryBasicBlock(fn);
  LLVMPositionBuilderBefore(B, LLVMGetBasicBlockTerminator(entry));
  LLVMValueRef arr = LLVMBuildAlloca(B, arr_t, "colacc");
  LLVMSetAlignment(arr, 64);
  LLVMPositionBuilderAtEnd(B, here);

  loop Wl = loop_begin(c, "cw", begin);
  LLVMValueRef rest = Wl.iv;
  for (int v = nd - 1; v >= 0; v--) {
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(B, rest, ci64(c, s->dom[v]), "cv");
      rest = LLVMBuildSDiv(B, rest, ci64(c, s->dom[v]), "");
    }
  }
  LLVMValueRef d0 = c->vars[dv];
  LLVMValueRef len = smin(c, LLVMBuildSub(B, end, Wl.iv, ""), ci64(c, CR_TILE), "");
  len = smin(c, len, LLVMBuildSub(B, ci64(c, D), d0, ""), "runlen");
#define ACC_PTR(j) LLVMBuildInBoundsGEP2(B, at, arr, &(j), 1, "accp")
  loop Li = loop_begin(c, "cinit", ci64(c, 0));
  LLVMBuildStore(B, wide ? LLVMConstReal(c->f64, 0) : reduce_init(c), ACC_PTR(Li.iv));
  loop_end(c, &Li, len, "cinit.exit");

  loop L[CM_KMAX_VARS];
  for (int r = 0; r < s->n_red; r++) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d", r);
    L[r] = loop_begin(c, nm, ci64(c, 0));
    c->vars[nd + r] = L[r].iv;
  }
  loop Lj = loop_begin(c, "col", ci64(c, 0));
  c->vars[dv] = LLVMBuildAdd(B, d0, Lj.iv, "vcol");
  reset_memo(c);
  LLVMValueRef v = convert(c, emit(c, s->body), s->exprs[s->body].dtype, s->acc_dtype);
  if (wide) v = LLVMBuildFPExt(B, v, c->f64, "");
  LLVMValueRef p = ACC_PTR(Lj.iv);
  LLVMValueRef cur = LLVMBuildLoad2(B, at, p, "acc");
  LLVMBuildStore(B, reduce_step(c, cur, v), p);
  loop_end(c, &Lj, len, "col.exit");
  for (int r = s->n_red - 1; r >= 0; r--) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d.exit", r);
    loop_end(c, &L[r], ci64(c, s->red[r]), nm);
    c->vars[nd + r] = NULL;
  }

  loop Ls = loop_begin(c, "cstore", ci64(c, 0));
  c->vars[dv] = LLVMBuildAdd(B, d0, Ls.iv, "vcol");
  c->acc = LLVMBuildLoad2(B, at, ACC_PTR(Ls.iv), "acc");
  if (wide) c->acc = LLVMBuildFPTrunc(B, c->acc, c->f32, "");
  emit_stores(c);
  loop_end(c, &Ls, len, "cstore.exit");
#undef ACC_PTR
  /* the next run starts after this one */
  LLVMValueRef next = LLVMBuildAdd(B, Wl.iv, len, "cnext");
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  LLVMBasicBlockRef wexit = new_block(c, "cw.exit");
  LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSLT, next, end, ""), Wl.header, wexit);
  LLVMAddIncoming(Wl.iv, &next, &latch, 1);
  LLVMPositionBuilderAtEnd(B, wexit);
  end_function(c, done);
  free_scopes(c);
}

static LLVMMetadataRef self_md(rctx *c, LLVMMetadataRef extra);

/* One alias scope per buffer the stage touches. Distinct kernel buffers never
 * share memory (memplan keeps every buffer of a group apart; sources, consts
 * and scratch have their own), so the vectorizer needs no runtime overlap
 * checks (it gives up past a few pairs, and a short inner loop is then fully
 * unrolled scalar) and loads of loop-invariant scalars hoist out of the loop. */
static void stage_scopes(rctx *c) {
  const cm_kstage *s = c->s;
  int nb = c->k->n_buffers;
  c->md_scope = c->md_noalias = NULL;
  int *slot = malloc(sizeof(int) * ((size_t)nb + 1));
  LLVMMetadataRef *sc = malloc(sizeof *sc * ((size_t)nb + 1));
  LLVMMetadataRef *others = malloc(sizeof *others * ((size_t)nb + 1));
  LLVMValueRef *scope = calloc((size_t)nb + 1, sizeof *scope);
  LLVMValueRef *noalias = calloc((size_t)nb + 1, sizeof *noalias);
  if (!slot || !sc || !others || !scope || !noalias) goto out;
  for (int b = 0; b < nb; b++) slot[b] = -1;
  int used = 0;
  for (int e = 0; e < s->n_exprs; e++)
    if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf >= 0 && s->exprs[e].buf < nb &&
        slot[s->exprs[e].buf] < 0)
      slot[s->exprs[e].buf] = used++;
  for (int i = 0; i < s->n_stores; i++)
    if (slot[s->stores[i].buf] < 0) slot[s->stores[i].buf] = used++;
  if (used < 2) goto out;
  LLVMMetadataRef dom = self_md(c, NULL);
  for (int i = 0; i < used; i++) sc[i] = self_md(c, dom);
  for (int b = 0; b < nb; b++) {
    if (slot[b] < 0) continue;
    int n = 0;
    for (int i = 0; i < used; i++)
      if (i != slot[b]) others[n++] = sc[i];
    scope[b] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sc[slot[b]], 1));
    noalias[b] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, others, (size_t)n));
  }
  c->md_scope = scope, c->md_noalias = noalias;
  scope = noalias = NULL;
out:
  free(slot), free(sc), free(others), free(scope), free(noalias);
}

static void free_scopes(rctx *c) {
  free(c->md_scope), free(c->md_noalias);
  c->md_scope = c->md_noalias = NULL;
}

/* Every domain var parallel and no reduction (an update over a small
 * tensor): a work item is one element, so the items of [begin, end) run as
 * rows of the innermost var, a counted loop the vectorizer widens, instead of
 * a div/mod per element. */
static void render_elementwise_runs(rctx *c, const char *fname) {
  const cm_kstage *s = c->s;
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  stage_scopes(c);
  int nd = s->n_dom, dv = nd - 1;
  loop W = loop_begin(c, "w", begin);
  LLVMValueRef rest = W.iv;
  for (int v = nd - 1; v >= 0; v--) {
    char nm[16];
    snprintf(nm, sizeof nm, "v%d", v);
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(B, rest, ci64(c, s->dom[v]), nm);
      rest = LLVMBuildSDiv(B, rest, ci64(c, s->dom[v]), "");
    }
  }
  LLVMValueRef d0 = c->vars[dv];
  LLVMValueRef len = smin(c, LLVMBuildSub(B, end, W.iv, ""),
                          LLVMBuildSub(B, ci64(c, s->dom[dv]), d0, ""), "runlen");
  loop R = loop_begin(c, "run", ci64(c, 0));
  c->vars[dv] = LLVMBuildAdd(B, d0, R.iv, "vrun");
  c->acc = NULL;
  emit_stores(c);
  loop_end(c, &R, len, "run.exit");
  LLVMValueRef next = LLVMBuildAdd(B, W.iv, len, "wnext");
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  LLVMBasicBlockRef wexit = new_block(c, "w.exit");
  LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSLT, next, end, ""), W.header, wexit);
  LLVMAddIncoming(W.iv, &next, &latch, 1);
  LLVMPositionBuilderAtEnd(B, wexit);
  end_function(c, done);
  free_scopes(c);
}

static void render_generic(rctx *c, const char *fname) {
  const cm_kstage *s = c->s;
  if (is_column_reduction(s)) {
    render_column_reduction(c, fname);
    return;
  }
  int np = s->n_parallel < 0 ? 0 : s->n_parallel;
  if (s->n_red == 0 && np == s->n_dom && np >= 1 && s->dom[np - 1] > 1 && !s->accumulate) {
    render_elementwise_runs(c, fname);
    return;
  }
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  /* not for reductions: their loops have no stores, and the scopes only move LLVM's
     choice of how to sum (the order of an f32 sum, which a step's tiny, cancelling
     gradients amplify past the f32 oracle's rounding) */
  if (s->n_red == 0) stage_scopes(c);
  c->select_branches = s->n_red == 0 && np < s->n_dom && !s->accumulate;
  c->inner_var = s->n_dom - 1;
  loop W = loop_begin(c, "w", begin);
  /* work item -> parallel vars, row-major */
  LLVMValueRef rest = W.iv;
  for (int v = np - 1; v >= 0; v--) {
    char nm[16];
    snprintf(nm, sizeof nm, "v%d", v);
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(c->B, rest, ci64(c, s->dom[v]), nm);
      rest = LLVMBuildSDiv(c->B, rest, ci64(c, s->dom[v]), "");
    }
  }
  loop L[CM_KMAX_VARS];
  for (int v = np; v < s->n_dom; v++) {
    char nm[16];
    snprintf(nm, sizeof nm, "v%d", v);
    L[v] = loop_begin(c, nm, ci64(c, 0));
    c->vars[v] = L[v].iv;
  }
  c->acc = s->n_red > 0 ? emit_reduction(c) : NULL;
  emit_stores(c);
  for (int v = s->n_dom - 1; v >= np; v--) {
    char nm[24];
    snprintf(nm, sizeof nm, "v%d.exit", v);
    loop_end(c, &L[v], ci64(c, s->dom[v]), nm);
  }
  loop_end(c, &W, end, "w.exit");
  end_function(c, done);
  free_scopes(c);
  c->select_branches = false;
}

/* ---- GEMM template ------------------------------------------------------ */

typedef struct gemm_shape {
  int nb; /* batch vars */
  int64_t M, N, K, batch, mblocks, nblocks;
  cm_kgemm_tiles t;
} gemm_shape;

static LLVMValueRef fptr(rctx *c, LLVMValueRef base, LLVMValueRef idx, const char *name) {
  return LLVMBuildInBoundsGEP2(c->B, c->f32, base, &idx, 1, name);
}

/* The coefficient of var kv in i64 expression e when e is affine in kv (terms
 * without kv may be anything); false when kv enters otherwise. */
static bool lin_coef(const cm_kstage *s, int e, int kv, int64_t *coef) {
  if (e < 0 || e >= s->n_exprs) return false;
  if (!(cm_kx_vars_used(s, e) & (1u << kv))) {
    *coef = 0;
    return true;
  }
  const cm_kexpr *x = &s->exprs[e];
  if (x->dtype != CM_I64) return false;
  if (x->kind == CM_KX_VAR) {
    *coef = 1;
    return true;
  }
  if (x->kind != CM_KX_OP || x->a < 0 || x->b < 0) return false;
  int64_t ca, cb;
  double v;
  switch (x->op) {
  case CM_OP_ADD:
  case CM_OP_SUB:
    if (!lin_coef(s, x->a, kv, &ca) || !lin_coef(s, x->b, kv, &cb)) return false;
    return x->op == CM_OP_ADD ? !__builtin_add_overflow(ca, cb, coef)
                              : !__builtin_sub_overflow(ca, cb, coef);
  case CM_OP_MUL:
    /* constants beyond 2^53 are not exact integers: not worth the analysis */
    if (cm_kx_is_const(s, x->b, &v) && fabs(v) < 9e15 && lin_coef(s, x->a, kv, &ca))
      return !__builtin_mul_overflow(ca, (int64_t)v, coef);
    if (cm_kx_is_const(s, x->a, &v) && fabs(v) < 9e15 && lin_coef(s, x->b, kv, &cb))
      return !__builtin_mul_overflow(cb, (int64_t)v, coef);
    return false;
  default: return false;
  }
}

/* Whether operand e is a plain f32 load contiguous along k: then W
 * consecutive k of a row are one vector load. */
static bool k_contiguous(rctx *c, int e) {
  const cm_kstage *s = c->s;
  const cm_kexpr *x = &s->exprs[e];
  int64_t coef;
  return x->kind == CM_KX_LOAD && x->dtype == CM_F32 && x->buf >= 0 && x->buf < c->k->n_buffers &&
         c->k->buffers[x->buf].dtype == CM_F32 && lin_coef(s, x->a, s->n_dom, &coef) && coef == 1;
}

/* v[0..W) rows of a W x W block, transposed in place: log2(W) rounds of the
 * perfect shuffle (zip of row i with row i + W/2). */
static void transpose_block(rctx *c, LLVMValueRef *v) {
  int W = c->W;
  LLVMValueRef lo[32], hi[32], n[32];
  for (int i = 0; i < W / 2; i++) {
    lo[2 * i] = LLVMConstInt(c->i32, (unsigned)i, 0);
    lo[2 * i + 1] = LLVMConstInt(c->i32, (unsigned)(i + W), 0);
    hi[2 * i] = LLVMConstInt(c->i32, (unsigned)(i + W / 2), 0);
    hi[2 * i + 1] = LLVMConstInt(c->i32, (unsigned)(i + W / 2 + W), 0);
  }
  LLVMValueRef mlo = LLVMConstVector(lo, (unsigned)W), mhi = LLVMConstVector(hi, (unsigned)W);
  for (int round = 1; round < W; round *= 2) {
    for (int i = 0; i < W / 2; i++) {
      n[2 * i] = LLVMBuildShuffleVector(c->B, v[i], v[i + W / 2], mlo, "zlo");
      n[2 * i + 1] = LLVMBuildShuffleVector(c->B, v[i], v[i + W / 2], mhi, "zhi");
    }
    for (int i = 0; i < W; i++) v[i] = n[i];
  }
}

/* Output vector t of R rows x W k (v[l]: row l's W k) laid out k-major
 * (element g = t W + q is row g % R at k g / R), correct in the lanes whose
 * row is in [lo, hi) (the others undefined): a tree of two-source shuffles. */
static LLVMValueRef pick_rows(rctx *c, LLVMValueRef *v, int R, int t, int lo, int hi) {
  int W = c->W;
  LLVMValueRef mask[32], a, b;
  int mid = hi - lo <= 2 ? lo + 1 : (lo + hi) / 2;
  bool leaves = hi - lo <= 2;
  if (leaves) {
    a = v[lo];
    b = hi - lo == 2 ? v[lo + 1] : LLVMGetPoison(c->vty);
  } else {
    a = pick_rows(c, v, R, t, lo, mid);
    b = pick_rows(c, v, R, t, mid, hi);
  }
  for (int q = 0; q < W; q++) {
    int g = t * W + q, row = g % R, kk = g / R;
    int from = leaves ? kk : q;
    if (row >= lo && row < mid)
      mask[q] = LLVMConstInt(c->i32, (unsigned)from, 0);
    else if (row >= mid && row < hi)
      mask[q] = LLVMConstInt(c->i32, (unsigned)(W + from), 0);
    else
      mask[q] = LLVMGetUndef(c->i32);
  }
  return LLVMBuildShuffleVector(c->B, a, b, LLVMConstVector(mask, (unsigned)W), "rows");
}

/* Packs panels [0, npan) of R rows (r0 + p*R + l, vars: row var rv, k var kv)
 * x k [0, kcur) of operand e: dst[p*kc*R + kk*R + l], zero for rows at or
 * beyond lim. Whole panels skip the clamp; the lane loop is unrolled so that
 * rows contiguous in memory become vector loads and every panel row one
 * contiguous store. */
static void emit_pack(rctx *c, const char *name, int e, int rv, LLVMValueRef r0, int64_t lim,
                      LLVMValueRef npan, int64_t R, int64_t kc, LLVMValueRef k0, LLVMValueRef kcur,
                      LLVMValueRef dst) {
  LLVMBuilderRef B = c->B;
  char nm[48];
  snprintf(nm, sizeof nm, "%s.panel", name);
  loop Lp = loop_begin(c, nm, ci64(c, 0));
  LLVMValueRef pr0 = LLVMBuildAdd(B, r0, LLVMBuildMul(B, Lp.iv, ci64(c, R), ""), "pr0");
  LLVMValueRef pdst = fptr(c, dst, LLVMBuildMul(B, Lp.iv, ci64(c, kc * R), ""), "pdst");
  LLVMValueRef whole =
      LLVMBuildICmp(B, LLVMIntSLE, LLVMBuildAdd(B, pr0, ci64(c, R), ""), ci64(c, lim), "whole");
  LLVMBasicBlockRef bfast = new_block(c, "pack.whole"), bslow = new_block(c, "pack.edge"),
                    bjoin = new_block(c, "pack.next");
  LLVMBuildCondBr(B, whole, bfast, bslow);
  bool kvec = k_contiguous(c, e) && (R % c->W == 0 || R < c->W);
  for (int edge = 0; edge < 2; edge++) {
    LLVMPositionBuilderAtEnd(B, edge ? bslow : bfast);
    LLVMValueRef kstart = ci64(c, 0);
    if (!edge && kvec) {
      /* W k at a time: W vector loads per W rows, transposed into W panel rows */
      LLVMValueRef nch = LLVMBuildSDiv(B, kcur, ci64(c, c->W), "kchunks");
      kstart = LLVMBuildMul(B, nch, ci64(c, c->W), "kstart");
      LLVMBasicBlockRef bvec = new_block(c, "pack.vec"), bafter = new_block(c, "pack.vec.done");
      LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSGT, nch, ci64(c, 0), ""), bvec, bafter);
      LLVMPositionBuilderAtEnd(B, bvec);
      snprintf(nm, sizeof nm, "%s.kv", name);
      loop Lc = loop_begin(c, nm, ci64(c, 0));
      LLVMValueRef kkb = LLVMBuildMul(B, Lc.iv, ci64(c, c->W), "kkb");
      c->vars[c->s->n_dom] = LLVMBuildAdd(B, k0, kkb, "k");
      if (R < c->W) {
        /* R rows of W k: R vector loads, shuffled into the R vectors of W panel rows */
        LLVMValueRef v[32];
        for (int l = 0; l < R; l++) {
          c->vars[rv] = LLVMBuildAdd(B, pr0, ci64(c, l), "row");
          reset_memo(c);
          const cm_kexpr *x = &c->s->exprs[e];
          LLVMValueRef idx = convert(c, emit(c, x->a), c->s->exprs[x->a].dtype, CM_I64);
          v[l] = LLVMBuildLoad2(B, c->vty, buf_gep(c, x->buf, idx), "krow");
          LLVMSetAlignment(v[l], 4);
        }
        for (int t = 0; t < R; t++) {
          LLVMValueRef off =
              LLVMBuildAdd(B, LLVMBuildMul(B, kkb, ci64(c, R), ""), ci64(c, t * c->W), "");
          LLVMValueRef st =
              LLVMBuildStore(B, pick_rows(c, v, (int)R, t, 0, (int)R), fptr(c, pdst, off, "dst"));
          LLVMSetAlignment(st, 4);
        }
      }
      for (int64_t g = 0; g < R / c->W; g++) {
        LLVMValueRef v[32];
        for (int l = 0; l < c->W; l++) {
          c->vars[rv] = LLVMBuildAdd(B, pr0, ci64(c, g * c->W + l), "row");
          reset_memo(c);
          const cm_kexpr *x = &c->s->exprs[e];
          LLVMValueRef idx = convert(c, emit(c, x->a), c->s->exprs[x->a].dtype, CM_I64);
          v[l] = LLVMBuildLoad2(B, c->vty, buf_gep(c, x->buf, idx), "krow");
          LLVMSetAlignment(v[l], 4);
        }
        transpose_block(c, v);
        for (int t = 0; t < c->W; t++) {
          LLVMValueRef off =
              LLVMBuildAdd(B, LLVMBuildMul(B, LLVMBuildAdd(B, kkb, ci64(c, t), ""), ci64(c, R), ""),
                           ci64(c, g * c->W), "");
          LLVMValueRef st = LLVMBuildStore(B, v[t], fptr(c, pdst, off, "dst"));
          LLVMSetAlignment(st, 4);
        }
      }
      snprintf(nm, sizeof nm, "%s.kv.exit", name);
      loop_end(c, &Lc, nch, nm);
      LLVMBuildBr(B, bafter);
      LLVMPositionBuilderAtEnd(B, bafter);
      LLVMBasicBlockRef brest = new_block(c, "pack.rest");
      LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSLT, kstart, kcur, ""), brest, bjoin);
      LLVMPositionBuilderAtEnd(B, brest);
    }
    snprintf(nm, sizeof nm, "%s.k", name);
    loop Lk = loop_begin(c, nm, kstart);
    c->vars[c->s->n_dom] = LLVMBuildAdd(B, k0, Lk.iv, "k");
    LLVMValueRef rowdst = fptr(c, pdst, LLVMBuildMul(B, Lk.iv, ci64(c, R), ""), "rowdst");
    /* every lane's value before any store: the loads may then be merged */
    LLVMValueRef vals[64];
    for (int64_t l = 0; l < R; l++) {
      LLVMValueRef row = LLVMBuildAdd(B, pr0, ci64(c, l), "row");
      LLVMValueRef inb = NULL;
      if (edge) {
        inb = LLVMBuildICmp(B, LLVMIntSLT, row, ci64(c, lim), "inb");
        row = smin(c, row, ci64(c, lim - 1), "rowc");
      }
      c->vars[rv] = row;
      reset_memo(c);
      LLVMValueRef v = convert(c, emit(c, e), c->s->exprs[e].dtype, CM_F32);
      if (edge) v = LLVMBuildSelect(B, inb, v, LLVMConstReal(c->f32, 0), "a");
      vals[l] = v;
    }
    for (int64_t l = 0; l < R; l++) {
      LLVMValueRef st = LLVMBuildStore(B, vals[l], fptr(c, rowdst, ci64(c, l), "dst"));
      LLVMSetAlignment(st, 4);
    }
    snprintf(nm, sizeof nm, "%s.k.exit", name);
    LLVMBasicBlockRef klatch = LLVMGetInsertBlock(B);
    loop_end(c, &Lk, kcur, nm);
    /* one k per iteration, the lanes merged into vectors (SLP): vectorizing
       across k instead gathers and scatters */
    no_vectorize_loop(c, klatch);
    LLVMBuildBr(B, bjoin);
  }
  LLVMPositionBuilderAtEnd(B, bjoin);
  snprintf(nm, sizeof nm, "%s.panel.exit", name);
  loop_end(c, &Lp, npan, nm);
  c->vars[c->s->n_dom] = NULL;
}

/* The micro-kernel's k loop over packed panels (A: mr values per k, B: nr =
 * nv vectors per k): mr x nv vector accumulators start at init[] and take one
 * broadcast A value times each B vector per k; out[] holds their values after
 * the loop (the loop runs at least once). */
static void emit_fma_kloop(rctx *c, LLVMValueRef apan, LLVMValueRef bpan, int64_t mr, int64_t nv,
                           int64_t nr, LLVMValueRef kend, const char *name, LLVMValueRef *init,
                           LLVMValueRef *nacc) {
  LLVMBuilderRef B = c->B;
  int W = c->W;
  char exit_name[48];
  snprintf(exit_name, sizeof exit_name, "%s.exit", name);
  LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
  loop Kk = loop_begin(c, name, ci64(c, 0));
  LLVMValueRef phis[64], bv[8];
  for (int64_t i = 0; i < mr * nv; i++) {
    phis[i] = LLVMBuildPhi(B, c->vty, "acc");
    LLVMAddIncoming(phis[i], &init[i], &pre, 1);
  }
  for (int64_t v = 0; v < nv; v++) {
    LLVMValueRef off = LLVMBuildAdd(B, LLVMBuildMul(B, Kk.iv, ci64(c, nr), ""), ci64(c, v * W), "");
    bv[v] = LLVMBuildLoad2(B, c->vty, fptr(c, bpan, off, "bp"), "bvec");
    LLVMSetAlignment(bv[v], 4);
  }
  for (int64_t r = 0; r < mr; r++) {
    LLVMValueRef off = LLVMBuildAdd(B, LLVMBuildMul(B, Kk.iv, ci64(c, mr), ""), ci64(c, r), "");
    LLVMValueRef a = LLVMBuildLoad2(B, c->f32, fptr(c, apan, off, "ap"), "a");
    LLVMValueRef ins =
        LLVMBuildInsertElement(B, LLVMGetPoison(c->vty), a, LLVMConstInt(c->i32, 0, 0), "");
    LLVMValueRef splat =
        LLVMBuildShuffleVector(B, ins, LLVMGetPoison(c->vty),
                               LLVMConstNull(LLVMVectorType(c->i32, (unsigned)W)), "a.bcast");
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef args[3] = {splat, bv[v], phis[r * nv + v]};
      LLVMTypeRef vt = c->vty;
      nacc[r * nv + v] = intrin(c, "llvm.fmuladd", &vt, 1, args, 3, "fma");
    }
  }
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  for (int64_t i = 0; i < mr * nv; i++) LLVMAddIncoming(phis[i], &nacc[i], &latch, 1);
  loop_end(c, &Kk, kend, exit_name);
  if (c->unroll > 1) unroll_last_loop(c, latch, (unsigned)c->unroll);
}

static LLVMMetadataRef self_md(rctx *c, LLVMMetadataRef extra);

/* Floats of packed B in the workspace: every kc slice of a column block (kept
 * for the following items with the same block) when they take at most 4 MiB,
 * else one slice. cm_kstage_workspace_bytes (kernel.c) sizes it the same way. */
static int64_t gemm_b_floats(int64_t K, int64_t kc, int64_t nc) {
  int64_t all = (K + kc - 1) / kc * kc * nc;
  return all * 4 <= ((int64_t)4 << 20) ? all : kc * nc;
}

/* The stage's stores for the rows x cols in-bounds elements of a tile of the C
 * tile (from element (ti0, tj0); its ACC at cbase, row stride nc). A row of nr
 * columns (the whole tile's width) has a constant trip count: vectorized
 * without a remainder. */
static void emit_micro_epilogue(rctx *c, LLVMValueRef Ct, LLVMValueRef cbase, LLVMValueRef ti0,
                                LLVMValueRef tj0, LLVMValueRef rows, LLVMValueRef cols, int64_t nc,
                                int64_t nr, const LLVMValueRef *ws_md) {
  LLVMBuilderRef B = c->B;
  const cm_kstage *s = c->s;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  loop Er = loop_begin(c, "epi.r", ci64(c, 0));
  c->vars[iv] = LLVMBuildAdd(B, ti0, Er.iv, "i");
  LLVMValueRef rbase = LLVMBuildAdd(B, cbase, LLVMBuildMul(B, Er.iv, ci64(c, nc), ""), "crow");
  LLVMValueRef whole = LLVMBuildICmp(B, LLVMIntEQ, cols, ci64(c, nr), "wholerow");
  LLVMBasicBlockRef bw = new_block(c, "epi.whole"), be = new_block(c, "epi.edge"),
                    bj = new_block(c, "epi.rnext");
  LLVMBuildCondBr(B, whole, bw, be);
  for (int edge = 0; edge < 2; edge++) {
    LLVMPositionBuilderAtEnd(B, edge ? be : bw);
    loop Ej = loop_begin(c, edge ? "epi.je" : "epi.j", ci64(c, 0));
    c->vars[jv] = LLVMBuildAdd(B, tj0, Ej.iv, "j");
    c->acc = LLVMBuildLoad2(B, c->f32, fptr(c, Ct, LLVMBuildAdd(B, rbase, Ej.iv, ""), "cp"), "c");
    if (ws_md[0]) {
      LLVMSetMetadata(c->acc, LLVMGetMDKindIDInContext(c->C, "alias.scope", 11), ws_md[0]);
      LLVMSetMetadata(c->acc, LLVMGetMDKindIDInContext(c->C, "noalias", 7), ws_md[1]);
    }
    emit_stores(c);
    loop_end(c, &Ej, edge ? cols : ci64(c, nr), edge ? "epi.je.exit" : "epi.j.exit");
    LLVMBuildBr(B, bj);
  }
  LLVMPositionBuilderAtEnd(B, bj);
  loop_end(c, &Er, rows, "epi.r.exit");
}

/* Per work item (a row block x column block, row blocks fastest) and kc slice:
 * pack B (kc x nc) and A (mc x kc), then for each B micro-panel, each A
 * micro-panel: the micro-kernel into the C tile. With one slice (K <= kc)
 * consecutive items of a call with the same column block reuse the packed B,
 * and each micro-tile's epilogue runs right after its k loop; with several,
 * one epilogue pass over the C tile follows the last slice. */
static void render_gemm(rctx *c, const char *fname, const gemm_shape *g) {
  const cm_kstage *s = c->s;
  LLVMBuilderRef B = c->B;
  int64_t mc = g->t.mc, nc = g->t.nc, kc = g->t.kc, mr = g->t.mr, nr = g->t.nr, W = c->W;
  int64_t nv = nr / W;
  int iv = s->n_dom - 2, jv = s->n_dom - 1;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  /* two alias scopes: the workspace never overlaps the kernel's buffers, so the
     epilogue's C tile loads and the output stores vectorize without checks */
  LLVMValueRef ws_md[2] = {NULL, NULL};
  LLVMValueRef *scope = calloc((size_t)c->k->n_buffers + 1, sizeof *scope);
  LLVMValueRef *noalias = calloc((size_t)c->k->n_buffers + 1, sizeof *noalias);
  if (scope && noalias) {
    LLVMMetadataRef dom = self_md(c, NULL), sws = self_md(c, dom), sbuf = self_md(c, dom);
    ws_md[0] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sws, 1));
    ws_md[1] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sbuf, 1));
    for (int b = 0; b < c->k->n_buffers; b++) scope[b] = ws_md[1], noalias[b] = ws_md[0];
    c->md_scope = scope, c->md_noalias = noalias;
  }
  /* items run row blocks fastest: consecutive items of a call share their B
     panel (every kc slice of it, when they fit the workspace), packed once for
     all of them */
  bool one_slice = g->K <= kc;
  int64_t bfl = gemm_b_floats(g->K, kc, nc);
  bool cache_b = bfl > kc * nc || one_slice;
  LLVMValueRef Bp = ws;
  LLVMValueRef Ap = fptr(c, ws, ci64(c, bfl), "Ap");
  LLVMValueRef Ct = fptr(c, ws, ci64(c, bfl + mc * kc), "Ct");
  LLVMBasicBlockRef wpre = LLVMGetInsertBlock(B);
  loop Wl = loop_begin(c, "w", begin);
  LLVMValueRef bkey_prev = LLVMBuildPhi(B, c->i64, "bkey.prev");
  LLVMValueRef minus1 = ci64(c, -1);
  LLVMAddIncoming(bkey_prev, &minus1, &wpre, 1);
  LLVMValueRef mblk = LLVMBuildSRem(B, Wl.iv, ci64(c, g->mblocks), "mblk");
  LLVMValueRef t = LLVMBuildSDiv(B, Wl.iv, ci64(c, g->mblocks), "bkey");
  LLVMValueRef nblk = LLVMBuildSRem(B, t, ci64(c, g->nblocks), "nblk");
  LLVMValueRef rest = LLVMBuildSDiv(B, t, ci64(c, g->nblocks), "batch");
  for (int v = g->nb - 1; v >= 0; v--) {
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(B, rest, ci64(c, s->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, ci64(c, s->dom[v]), "");
    }
  }
  LLVMValueRef i0 = LLVMBuildMul(B, mblk, ci64(c, mc), "i0");
  LLVMValueRef j0 = LLVMBuildMul(B, nblk, ci64(c, nc), "j0");
  LLVMValueRef mrem = smin(c, LLVMBuildSub(B, ci64(c, g->M), i0, ""), ci64(c, mc), "mrows");
  LLVMValueRef nrem = smin(c, LLVMBuildSub(B, ci64(c, g->N), j0, ""), ci64(c, nc), "ncols");
  /* rows/cols rounded up to whole panels */
  LLVMValueRef mpan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, mrem, ci64(c, mr - 1), ""), ci64(c, mr), "mpanels");
  LLVMValueRef npan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, nrem, ci64(c, nr - 1), ""), ci64(c, nr), "npanels");

  loop Kl = loop_begin(c, "kslice", ci64(c, 0));
  LLVMValueRef k0 = LLVMBuildMul(B, Kl.iv, ci64(c, kc), "k0");
  LLVMValueRef kcur = smin(c, LLVMBuildSub(B, ci64(c, g->K), k0, ""), ci64(c, kc), "kcur");
  LLVMValueRef first = LLVMBuildICmp(B, LLVMIntEQ, Kl.iv, ci64(c, 0), "first");
  LLVMValueRef Bs = Bp; /* this slice's packed B */
  if (cache_b) {
    Bs = fptr(c, Bp, LLVMBuildMul(B, Kl.iv, ci64(c, kc * nc), ""), "Bslice");
    LLVMBasicBlockRef bpack = new_block(c, "packB.new"), bkeep = new_block(c, "packB.keep");
    LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntNE, t, bkey_prev, "newB"), bpack, bkeep);
    LLVMPositionBuilderAtEnd(B, bpack);
    emit_pack(c, "packB", s->gemm_b, jv, j0, g->N, npan, nr, kc, k0, kcur, Bs);
    LLVMBuildBr(B, bkeep);
    LLVMPositionBuilderAtEnd(B, bkeep);
  } else {
    emit_pack(c, "packB", s->gemm_b, jv, j0, g->N, npan, nr, kc, k0, kcur, Bp);
  }
  emit_pack(c, "packA", s->gemm_a, iv, i0, g->M, mpan, mr, kc, k0, kcur, Ap);

  /* B micro-panel (kc x nr) stays in L1 while the A block streams from L2 */
  loop Jr = loop_begin(c, "jr", ci64(c, 0));
  loop Ir = loop_begin(c, "ir", ci64(c, 0));
  LLVMValueRef apan = fptr(c, Ap, LLVMBuildMul(B, Ir.iv, ci64(c, kc * mr), ""), "apanel");
  LLVMValueRef bpan = fptr(c, Bs, LLVMBuildMul(B, Jr.iv, ci64(c, kc * nr), ""), "bpanel");
  LLVMValueRef cbase = LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, ci64(c, mr * nc), ""),
                                    LLVMBuildMul(B, Jr.iv, ci64(c, nr), ""), "cbase");
  /* the first kc slice starts from zero, later ones from the C tile */
  LLVMValueRef acc0[64], prev[64];
  LLVMBasicBlockRef bload = new_block(c, "cload"), bjoin = new_block(c, "cinit");
  LLVMBasicBlockRef bfirst = LLVMGetInsertBlock(B);
  LLVMBuildCondBr(B, first, bjoin, bload);
  LLVMPositionBuilderAtEnd(B, bload);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, ci64(c, r * nc + v * W), "");
      prev[r * nv + v] = LLVMBuildLoad2(B, c->vty, fptr(c, Ct, off, "cp"), "cprev");
      LLVMSetAlignment(prev[r * nv + v], 4);
    }
  LLVMBuildBr(B, bjoin);
  LLVMPositionBuilderAtEnd(B, bjoin);
  LLVMValueRef vzero = LLVMConstNull(c->vty);
  for (int64_t i = 0; i < mr * nv; i++) {
    acc0[i] = LLVMBuildPhi(B, c->vty, "cinit");
    LLVMValueRef in[2] = {vzero, prev[i]};
    LLVMBasicBlockRef from[2] = {bfirst, bload};
    LLVMAddIncoming(acc0[i], in, from, 2);
  }
  LLVMValueRef nacc[64];
  emit_fma_kloop(c, apan, bpan, mr, nv, nr, kcur, "kk", acc0, nacc);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, ci64(c, r * nc + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, nacc[r * nv + v], fptr(c, Ct, off, "cp"));
      LLVMSetAlignment(st, 4);
    }
  if (one_slice) /* the micro-tile's epilogue while its sums are in L1 */
    emit_micro_epilogue(c, Ct, cbase,
                        LLVMBuildAdd(B, i0, LLVMBuildMul(B, Ir.iv, ci64(c, mr), ""), "ti0"),
                        LLVMBuildAdd(B, j0, LLVMBuildMul(B, Jr.iv, ci64(c, nr), ""), "tj0"),
                        smin(c, LLVMBuildSub(B, mrem, LLVMBuildMul(B, Ir.iv, ci64(c, mr), ""), ""),
                             ci64(c, mr), "trows"),
                        smin(c, LLVMBuildSub(B, nrem, LLVMBuildMul(B, Jr.iv, ci64(c, nr), ""), ""),
                             ci64(c, nr), "tcols"),
                        nc, nr, ws_md);
  loop_end(c, &Ir, mpan, "ir.exit");
  loop_end(c, &Jr, npan, "jr.exit");
  loop_end(c, &Kl, ci64(c, (g->K + kc - 1) / kc), "kslice.exit");
  /* several slices: one pass over the C tile (stores within a slice would
     evict the B micro-panel from L1) */
  if (!one_slice) emit_micro_epilogue(c, Ct, ci64(c, 0), i0, j0, mrem, nrem, nc, nc, ws_md);
  LLVMBasicBlockRef wlatch = LLVMGetInsertBlock(B);
  LLVMAddIncoming(bkey_prev, &t, &wlatch, 1);
  loop_end(c, &Wl, end, "w.exit");
  end_function(c, done);
  c->md_scope = c->md_noalias = NULL;
  free(scope), free(noalias);
}

/* ---- attention span (fused) ------------------------------------------------
 *
 * The first stage's function runs the whole span (codegen.h, cm_kattn): per
 * work item (one batch item) and block of br query rows, every stage of the
 * span restricted to those rows. Local buffers live in the workspace: their
 * base is ws + local_off and their index is shifted by the block's first
 * element (ioff), so the stages' own index expressions stay as they are. GEMM
 * stages pack A (the block's rows) and B (whole) over the full K and run an
 * mr x nr micro-kernel into a C tile; their stores are the epilogue. */

typedef struct attn_plan {
  int first, span, nb, mr, nr;
  int64_t rows, br, nblk;
  bool rowwise;
  int64_t local_off[CM_KATTN_MAX_LOCAL], pack_off;
  int64_t am, bm; /* floats of packed A, packed B */
  /* per stage of the span (GEMM stages): its micro-kernel's register block */
  int smr[CM_KATTN_MAX_SPAN], snr[CM_KATTN_MAX_SPAN];
} attn_plan;

static bool attn_is_gemm(const attn_plan *p, const cm_kstage *s, int si) {
  return (si == p->first || s->tmpl == CM_KT_GEMM) && s->n_red == 1 && s->n_dom == p->nb + 2 &&
         s->red_op == CM_KRED_SUM && s->acc_dtype == CM_F32 && s->gemm_a >= 0 && s->gemm_b >= 0;
}

/* Estimated cycles of an m x n x K GEMM stage of the span with an mr x nr
 * register block: per k step the FMAs (two a cycle), the loads of the
 * broadcasts and B vectors, and the FMA latency when there are few
 * accumulators; per block its C tile stores; per element its epilogue. The
 * padding of the last row and column panels is paid in full (a 65-column S
 * with nr = 64 does twice the work of nr = 16 x 5). */
static double attn_tile_cost(int64_t m, int64_t n, int64_t K, int mr, int nr, int W) {
  double nv = nr / W, acc = mr * nv;
  double per_k = fmax(fmax(acc / 2, (mr + nv) / 2), 4) + 0.5;
  double blocks = (double)((m + mr - 1) / mr) * (double)((n + nr - 1) / nr);
  return blocks * (K * per_k + acc + 8);
}

/* Floats of packed A, packed B and C tile the span's GEMM stages need with
 * register blocks mr[], nr[] (per stage of the span); returns the bytes of
 * workspace the rendering then uses. */
static int64_t attn_pack_need(rctx *c, const attn_plan *p, const int *mr, const int *nr,
                              int64_t *am, int64_t *bm) {
  int64_t a = 0, b = 0, cm = 0;
  for (int si = p->first; si < p->first + p->span; si++) {
    const cm_kstage *s = &c->k->stages[si];
    int i = si - p->first;
    if (!attn_is_gemm(p, s, si)) continue;
    int64_t m = p->rowwise ? p->br : s->dom[p->nb], n = s->dom[p->nb + 1], K = s->red[0];
    int64_t mp = (m + mr[i] - 1) / mr[i] * mr[i], np = (n + nr[i] - 1) / nr[i] * nr[i];
    if (mp * K > a) a = mp * K;
    if (K * np > b) b = K * np;
    if (mp * np > cm) cm = mp * np;
  }
  *am = a, *bm = b;
  return p->pack_off + 4 * ((a + 15) / 16 * 16 + (b + 15) / 16 * 16 + cm);
}

/* Every GEMM stage of the span gets the register block that suits its own
 * shape (S is rows x keys over the head dim; P V is rows x head dim over the
 * keys), stage by stage as long as the packing and C tiles still fit the
 * workspace the lowering sized (ws_bytes, for the span's tiles). */
static void attn_stage_tiles(rctx *c, attn_plan *p, int64_t ws_bytes) {
  const cm_kernel *k = c->k;
  int W = c->W;
  int64_t am, bm;
  for (int si = p->first; si < p->first + p->span; si++) {
    const cm_kstage *s = &k->stages[si];
    int i = si - p->first;
    if (!attn_is_gemm(p, s, si)) continue;
    int64_t m = p->rowwise ? p->br : s->dom[p->nb], n = s->dom[p->nb + 1], K = s->red[0];
    double best = attn_tile_cost(m, n, K, p->mr, p->nr, W);
    int keep_mr = p->smr[i], keep_nr = p->snr[i];
    for (int nv = 1; nv <= 4; nv++)
      for (int mr = 1; mr <= 16 && mr * nv + nv <= 31; mr++) {
        /* rows of a block other than the last stay whole panels */
        if (p->rowwise && p->br % mr) continue;
        double cost = attn_tile_cost(m, n, K, mr, nv * W, W);
        if (cost >= best * 0.98) continue;
        p->smr[i] = mr, p->snr[i] = nv * W;
        if (attn_pack_need(c, p, p->smr, p->snr, &am, &bm) <= ws_bytes)
          best = cost, keep_mr = mr, keep_nr = nv * W;
        p->smr[i] = keep_mr, p->snr[i] = keep_nr;
      }
  }
  attn_pack_need(c, p, p->smr, p->snr, &p->am, &p->bm);
}

/* Whether the span from stage first fuses with this renderer (else: generic). */
static bool attn_plan_of(rctx *c, int first, attn_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_err e;
  if (cm_kernel_verify(k, &e) != CM_OK || cm_kattn_check(k, first, &e) != CM_OK) return false;
  memset(p, 0, sizeof *p);
  p->first = first, p->span = a->span, p->nb = a->nb, p->rows = a->rows;
  p->mr = s0->tiles.mr, p->nr = s0->tiles.nr;
  p->rowwise = a->br < a->rows;
  p->br = p->rowwise ? a->br : a->rows;
  p->nblk = (p->rows + p->br - 1) / p->br;
  int W = c->W;
  if (p->mr < 1 || p->nr < W || p->nr % W || p->nr / W > 8 || p->mr * (p->nr / W) > 32)
    return false;
  /* rows of a block other than the last are whole panels: packing never reads
     a row of the next block */
  if (p->rowwise && p->br % p->mr) return false;
  int64_t ws = cm_kattn_workspace(k, first, p->mr, p->nr, p->local_off, &p->pack_off);
  if (ws <= 0 || ws > a->ws_bytes) return false;
  if (p->span > CM_KATTN_MAX_SPAN) return false;
  for (int si = first; si < first + p->span; si++) {
    const cm_kstage *s = &k->stages[si];
    if ((si == first || s->tmpl == CM_KT_GEMM) && !attn_is_gemm(p, s, si)) return false;
    if (s->n_dom + s->n_red > CM_KMAX_VARS || s->n_stores > CM_KMAX_STORES) return false;
    p->smr[si - first] = p->mr, p->snr[si - first] = p->nr;
    if (attn_is_gemm(p, s, si)) {
      int64_t m = p->rowwise ? p->br : s->dom[p->nb];
      int64_t mp = (m + p->mr - 1) / p->mr * p->mr;
      int64_t np = (s->dom[p->nb + 1] + p->nr - 1) / p->nr * p->nr;
      if (mp * s->red[0] > p->am) p->am = mp * s->red[0];
      if (s->red[0] * np > p->bm) p->bm = s->red[0] * np;
    }
  }
  attn_stage_tiles(c, p, a->ws_bytes);
  return true;
}

/* A GEMM stage of the span whose only store is its accumulator, f32, at an
 * index contiguous along the column var: the micro-kernel stores its
 * registers there (masked at the last row and column panels) instead of
 * going through the C tile and a scalar epilogue. */
typedef struct attn_direct {
  int buf, index; /* the store's buffer and index expression */
  int64_t ci, n;  /* index step per row; columns */
  LLVMValueRef i0, mrows;
} attn_direct;

static bool attn_direct_of(rctx *c, const attn_plan *p, attn_direct *d) {
  const cm_kstage *s = c->s;
  if (s->n_stores != 1 || s->accumulate) return false;
  const cm_kstore *st = &s->stores[0];
  if (st->value < 0 || st->value >= s->n_exprs || st->buf < 0 || st->buf >= c->k->n_buffers)
    return false;
  const cm_kexpr *v = &s->exprs[st->value];
  int64_t cj;
  if (v->kind != CM_KX_ACC || v->dtype != CM_F32 || c->k->buffers[st->buf].dtype != CM_F32 ||
      !lin_coef(s, st->index, p->nb + 1, &cj) || cj != 1 ||
      !lin_coef(s, st->index, p->nb, &d->ci) || (cm_kx_vars_used(s, st->index) >> s->n_dom) != 0)
    return false;
  d->buf = st->buf, d->index = st->index, d->n = s->dom[p->nb + 1];
  return true;
}

/* The micro-kernel's registers of block (row rb, column cb) straight to the
 * stage's store (attn_direct): lanes past the columns or rows masked off. */
static void attn_store_direct(rctx *c, const attn_plan *p, const attn_direct *d, LLVMValueRef rb,
                              LLVMValueRef cb, int64_t mr, int64_t nv, LLVMValueRef *acc) {
  LLVMBuilderRef B = c->B;
  int W = c->W;
  c->vars[p->nb] = LLVMBuildAdd(B, d->i0, rb, "at.drow");
  c->vars[p->nb + 1] = cb;
  reset_memo(c);
  LLVMValueRef idx = convert(c, emit(c, d->index), c->s->exprs[d->index].dtype, CM_I64);
  if (c->failed) return;
  if (c->ioff && c->ioff[d->buf]) idx = LLVMBuildSub(B, idx, c->ioff[d->buf], "at.idx");
  LLVMTypeRef mty = LLVMVectorType(c->i1, (unsigned)W);
  LLVMValueRef lanes[32];
  for (int l = 0; l < W; l++) lanes[l] = ci64(c, l);
  LLVMValueRef lane = LLVMConstVector(lanes, (unsigned)W);
  LLVMTypeRef vi64 = LLVMVectorType(c->i64, (unsigned)W);
  for (int64_t v = 0; v < nv; v++) {
    LLVMValueRef col = LLVMBuildAdd(B, cb, ci64(c, v * W), "");
    LLVMValueRef ins =
        LLVMBuildInsertElement(B, LLVMGetPoison(vi64), col, LLVMConstInt(c->i32, 0, 0), "");
    LLVMValueRef cs = LLVMBuildShuffleVector(
        B, ins, LLVMGetPoison(vi64), LLVMConstNull(LLVMVectorType(c->i32, (unsigned)W)), "");
    LLVMValueRef ins2 = LLVMBuildInsertElement(B, LLVMGetPoison(vi64), ci64(c, d->n),
                                               LLVMConstInt(c->i32, 0, 0), "");
    LLVMValueRef ns = LLVMBuildShuffleVector(
        B, ins2, LLVMGetPoison(vi64), LLVMConstNull(LLVMVectorType(c->i32, (unsigned)W)), "");
    LLVMValueRef cmask =
        LLVMBuildICmp(B, LLVMIntSLT, LLVMBuildAdd(B, cs, lane, ""), ns, "at.cmask");
    for (int64_t r = 0; r < mr; r++) {
      LLVMValueRef rin =
          LLVMBuildICmp(B, LLVMIntSLT, LLVMBuildAdd(B, rb, ci64(c, r), ""), d->mrows, "");
      LLVMValueRef m = LLVMBuildSelect(B, rin, cmask, LLVMConstNull(mty), "at.mask");
      LLVMValueRef off = LLVMBuildAdd(B, idx, ci64(c, r * d->ci + v * W), "");
      /* not inbounds: masked-off lanes of the last panels may point past the buffer */
      LLVMValueRef ptr = LLVMBuildGEP2(B, c->f32, c->bases[d->buf], &off, 1, "at.dp");
      LLVMTypeRef tys[2] = {c->vty, c->ptr};
      LLVMValueRef args[4] = {acc[r * nv + v], ptr, LLVMConstInt(c->i32, 4, 0), m};
      set_scopes(c, d->buf, intrin(c, "llvm.masked.store", tys, 2, args, 4, ""));
    }
  }
}

/* C tile (ldc floats per row) = packed A panels [0, mpan) x packed B panels
 * [0, npan) over K; with d, the stage's store instead (attn_store_direct). */
static void attn_microkernel(rctx *c, const attn_plan *p, const attn_direct *d, int64_t mr,
                             int64_t nr, LLVMValueRef Ap, LLVMValueRef Bp, LLVMValueRef Ct,
                             LLVMValueRef mpan, int64_t npan, int64_t K, int64_t ldc) {
  LLVMBuilderRef B = c->B;
  int64_t W = c->W, nv = nr / W;
  loop Jr = loop_begin(c, "at.jr", ci64(c, 0));
  loop Ir = loop_begin(c, "at.ir", ci64(c, 0));
  LLVMValueRef apan = fptr(c, Ap, LLVMBuildMul(B, Ir.iv, ci64(c, K * mr), ""), "apanel");
  LLVMValueRef bpan = fptr(c, Bp, LLVMBuildMul(B, Jr.iv, ci64(c, K * nr), ""), "bpanel");
  LLVMValueRef cbase = LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, ci64(c, mr * ldc), ""),
                                    LLVMBuildMul(B, Jr.iv, ci64(c, nr), ""), "cbase");
  LLVMValueRef zeros[64], nacc[64];
  for (int64_t i = 0; i < mr * nv; i++) zeros[i] = LLVMConstNull(c->vty);
  char kname[48]; /* the register block in the loop's name (tests read it) */
  snprintf(kname, sizeof kname, "at.kk.m%lldn%lld%s", (long long)mr, (long long)nr,
           d ? ".direct" : "");
  emit_fma_kloop(c, apan, bpan, mr, nv, nr, ci64(c, K), kname, zeros, nacc);
  if (d)
    attn_store_direct(c, p, d, LLVMBuildMul(B, Ir.iv, ci64(c, mr), ""),
                      LLVMBuildMul(B, Jr.iv, ci64(c, nr), ""), mr, nv, nacc);
  for (int64_t r = 0; r < mr && !d; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, ci64(c, r * ldc + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, nacc[r * nv + v], fptr(c, Ct, off, "cp"));
      LLVMSetAlignment(st, 4);
    }
  loop_end(c, &Ir, mpan, "at.ir.exit");
  loop_end(c, &Jr, ci64(c, npan), "at.jr.exit");
}

/* emit_pack's layout (panels of R rows x K, zero rows at or beyond lim) for
 * an operand contiguous along k with R not a multiple of W: per group of up
 * to W rows of a panel and W consecutive k, one vector load per row (rows
 * past lim clamped, then zeroed), a W x W transpose, and per k one store of
 * the group's lanes (masked when the group is short); the K % W last k
 * element by element. */
static void attn_pack_kt(rctx *c, const char *name, int e, int rv, LLVMValueRef r0, int64_t lim,
                         LLVMValueRef npan, int64_t R, int64_t K, LLVMValueRef dst) {
  LLVMBuilderRef B = c->B;
  const cm_kexpr *x = &c->s->exprs[e];
  int W = c->W, kv = c->s->n_dom;
  int64_t ngr = (R + W - 1) / W, nch = K / W;
  char nm[48];
  snprintf(nm, sizeof nm, "%s.kt.panel", name);
  loop Lp = loop_begin(c, nm, ci64(c, 0));
  LLVMValueRef pr0 = LLVMBuildAdd(B, r0, LLVMBuildMul(B, Lp.iv, ci64(c, R), ""), "pr0");
  LLVMValueRef pdst = fptr(c, dst, LLVMBuildMul(B, Lp.iv, ci64(c, K * R), ""), "pdst");
  LLVMValueRef rows[64], inb[64];
  for (int64_t l = 0; l < R; l++) {
    LLVMValueRef row = LLVMBuildAdd(B, pr0, ci64(c, l), "row");
    inb[l] = LLVMBuildICmp(B, LLVMIntSLT, row, ci64(c, lim), "inb");
    rows[l] = smin(c, row, ci64(c, lim - 1), "rowc");
  }
  if (nch > 0) {
    snprintf(nm, sizeof nm, "%s.kt.kv", name);
    loop Lc = loop_begin(c, nm, ci64(c, 0));
    LLVMValueRef kkb = LLVMBuildMul(B, Lc.iv, ci64(c, W), "kkb");
    c->vars[kv] = kkb;
    for (int64_t g = 0; g < ngr; g++) {
      int64_t cnt = R - g * W < W ? R - g * W : W;
      LLVMValueRef v[32];
      for (int l = 0; l < W; l++) {
        if (l >= cnt) {
          v[l] = LLVMConstNull(c->vty);
          continue;
        }
        c->vars[rv] = rows[g * W + l];
        reset_memo(c);
        LLVMValueRef idx = convert(c, emit(c, x->a), c->s->exprs[x->a].dtype, CM_I64);
        LLVMValueRef ld = LLVMBuildLoad2(B, c->vty, buf_gep(c, x->buf, idx), "krow");
        LLVMSetAlignment(ld, 4);
        set_scopes(c, x->buf, ld);
        v[l] = LLVMBuildSelect(B, inb[g * W + l], ld, LLVMConstNull(c->vty), "krow.z");
      }
      transpose_block(c, v);
      LLVMValueRef mk[32];
      for (int l = 0; l < W; l++) mk[l] = LLVMConstInt(c->i1, l < cnt, 0);
      LLVMValueRef mask = LLVMConstVector(mk, (unsigned)W);
      for (int t = 0; t < W; t++) {
        LLVMValueRef off =
            LLVMBuildAdd(B, LLVMBuildMul(B, LLVMBuildAdd(B, kkb, ci64(c, t), ""), ci64(c, R), ""),
                         ci64(c, g * W), "");
        LLVMValueRef ptr = fptr(c, pdst, off, "dst");
        if (cnt == W) {
          LLVMSetAlignment(LLVMBuildStore(B, v[t], ptr), 4);
        } else {
          LLVMTypeRef tys[2] = {c->vty, c->ptr};
          LLVMValueRef args[4] = {v[t], ptr, LLVMConstInt(c->i32, 4, 0), mask};
          intrin(c, "llvm.masked.store", tys, 2, args, 4, "");
        }
      }
    }
    snprintf(nm, sizeof nm, "%s.kt.kv.exit", name);
    loop_end(c, &Lc, ci64(c, nch), nm);
  }
  for (int64_t k = nch * W; k < K; k++) {
    c->vars[kv] = ci64(c, k);
    for (int64_t l = 0; l < R; l++) {
      c->vars[rv] = rows[l];
      reset_memo(c);
      LLVMValueRef val = convert(c, emit(c, e), c->s->exprs[e].dtype, CM_F32);
      val = LLVMBuildSelect(B, inb[l], val, LLVMConstReal(c->f32, 0), "a");
      LLVMSetAlignment(LLVMBuildStore(B, val, fptr(c, pdst, ci64(c, k * R + l), "dst")), 4);
    }
  }
  snprintf(nm, sizeof nm, "%s.kt.panel.exit", name);
  loop_end(c, &Lp, npan, nm);
  c->vars[kv] = NULL;
}

/* One GEMM stage of the span for query rows [i0, i0 + mrows). */
static void attn_gemm_block(rctx *c, const attn_plan *p, LLVMValueRef wsp, LLVMValueRef i0,
                            LLVMValueRef mrows) {
  const cm_kstage *s = c->s;
  LLVMBuilderRef B = c->B;
  int iv = p->nb, jv = p->nb + 1;
  int64_t mr = p->smr[c->stage - p->first], nr = p->snr[c->stage - p->first];
  int64_t M = s->dom[iv], N = s->dom[jv], K = s->red[0];
  int64_t npan = (N + nr - 1) / nr, ldc = npan * nr;
  LLVMValueRef Ap = fptr(c, wsp, ci64(c, 0), "at.Ap");
  LLVMValueRef Bp = fptr(c, wsp, ci64(c, (p->am + 15) / 16 * 16), "at.Bp");
  LLVMValueRef Ct = fptr(c, wsp, ci64(c, (p->am + 15) / 16 * 16 + (p->bm + 15) / 16 * 16), "at.Ct");
  LLVMValueRef mpan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, mrows, ci64(c, mr - 1), ""), ci64(c, mr), "at.mpan");
  emit_pack(c, "at.packB", s->gemm_b, jv, ci64(c, 0), N, ci64(c, npan), nr, K, ci64(c, 0),
            ci64(c, K), Bp);
  if (k_contiguous(c, s->gemm_a) && mr % c->W && mr <= 64)
    attn_pack_kt(c, "at.packA", s->gemm_a, iv, i0, M, mpan, mr, K, Ap);
  else
    emit_pack(c, "at.packA", s->gemm_a, iv, i0, M, mpan, mr, K, ci64(c, 0), ci64(c, K), Ap);
  attn_direct d;
  if (attn_direct_of(c, p, &d)) {
    d.i0 = i0, d.mrows = mrows;
    attn_microkernel(c, p, &d, mr, nr, Ap, Bp, Ct, mpan, npan, K, ldc);
    return;
  }
  attn_microkernel(c, p, NULL, mr, nr, Ap, Bp, Ct, mpan, npan, K, ldc);
  loop Ei = loop_begin(c, "at.epi.i", ci64(c, 0));
  loop Ej = loop_begin(c, "at.epi.j", ci64(c, 0));
  c->vars[iv] = LLVMBuildAdd(B, i0, Ei.iv, "i");
  c->vars[jv] = Ej.iv;
  LLVMValueRef coff = LLVMBuildAdd(B, LLVMBuildMul(B, Ei.iv, ci64(c, ldc), ""), Ej.iv, "");
  c->acc = LLVMBuildLoad2(B, c->f32, fptr(c, Ct, coff, "cp"), "c");
  emit_stores(c);
  loop_end(c, &Ej, ci64(c, N), "at.epi.j.exit");
  loop_end(c, &Ei, mrows, "at.epi.i.exit");
  c->acc = NULL;
}

/* A generic stage of the span: var nb over [lo, hi) (rowwise) or whole. */
static void attn_generic_block(rctx *c, const attn_plan *p, LLVMValueRef lo, LLVMValueRef hi) {
  const cm_kstage *s = c->s;
  loop L[CM_KMAX_VARS];
  for (int v = p->nb; v < s->n_dom; v++) {
    char nm[24];
    snprintf(nm, sizeof nm, "at.v%d", v);
    bool row = p->rowwise && v == p->nb;
    L[v] = loop_begin(c, nm, row ? lo : ci64(c, 0));
    c->vars[v] = L[v].iv;
  }
  c->acc = s->n_red > 0 ? emit_reduction(c) : NULL;
  emit_stores(c);
  for (int v = s->n_dom - 1; v >= p->nb; v--) {
    char nm[24];
    snprintf(nm, sizeof nm, "at.v%d.exit", v);
    bool row = p->rowwise && v == p->nb;
    loop_end(c, &L[v], row ? hi : ci64(c, s->dom[v]), nm);
  }
  c->acc = NULL;
}

/* A distinct self-referencing node !{!self, extra} (scope domains and scopes). */
static LLVMMetadataRef self_md(rctx *c, LLVMMetadataRef extra) {
  LLVMMetadataRef tmp = LLVMTemporaryMDNode(c->C, NULL, 0);
  LLVMMetadataRef ops[2] = {tmp, extra};
  LLVMMetadataRef n = LLVMMDNodeInContext2(c->C, ops, extra ? 2 : 1);
  LLVMMetadataReplaceAllUsesWith(tmp, n);
  return n;
}

static void render_attention(rctx *c, const char *fname, const attn_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[p->first];
  const cm_kattn *a = &s0->attn;
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  LLVMValueRef *ioff = calloc((size_t)k->n_buffers + 1, sizeof *ioff);
  LLVMValueRef *saved = malloc(sizeof *saved * ((size_t)k->n_buffers + 1));
  LLVMValueRef *memo = span_memo(c, p->first, p->span);
  if (!ioff || !saved || !memo) {
    free(ioff), free(saved), free(memo);
    if (!c->failed) {
      c->failed = true;
      c->fail_status = cm_errorf(c->err, CM_EINTERNAL, "cm_render_llvm: out of memory");
    }
    end_function(c, done);
    return;
  }
  memcpy(saved, c->bases, sizeof *saved * (size_t)k->n_buffers);
  LLVMValueRef *saved_memo = c->memo;
  LLVMValueRef *scope = calloc((size_t)k->n_buffers + 1, sizeof *scope);
  LLVMValueRef *noalias = calloc((size_t)k->n_buffers + 1, sizeof *noalias);
  if (scope && noalias) {
    /* one scope per local tile, one for all memory buffers */
    LLVMMetadataRef dom = self_md(c, NULL), sc[CM_KATTN_MAX_LOCAL + 1];
    for (int i = 0; i <= a->n_local; i++) sc[i] = self_md(c, dom);
    for (int b = 0; b < k->n_buffers; b++) {
      int li = a->n_local;
      for (int i = 0; i < a->n_local; i++)
        if (a->local[i] == b) li = i;
      LLVMMetadataRef others[CM_KATTN_MAX_LOCAL + 1];
      int n = 0;
      for (int i = 0; i <= a->n_local; i++)
        if (i != li) others[n++] = sc[i];
      scope[b] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, &sc[li], 1));
      noalias[b] = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, others, (size_t)n));
    }
    c->md_scope = scope, c->md_noalias = noalias;
  }
  c->memo = memo;
  for (int i = 0; i < a->n_local; i++) {
    LLVMValueRef off = ci64(c, p->local_off[i]);
    c->bases[a->local[i]] = LLVMBuildInBoundsGEP2(B, c->i8, ws, &off, 1, "local");
  }
  LLVMValueRef poff = ci64(c, p->pack_off);
  LLVMValueRef wsp = LLVMBuildInBoundsGEP2(B, c->i8, ws, &poff, 1, "at.pack");
  loop Wl = loop_begin(c, "at.w", begin);
  LLVMValueRef bvals[CM_KMAX_VARS];
  LLVMValueRef rest = Wl.iv;
  for (int v = p->nb - 1; v >= 0; v--) {
    if (v == 0) {
      bvals[v] = rest;
    } else {
      bvals[v] = LLVMBuildSRem(B, rest, ci64(c, s0->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, ci64(c, s0->dom[v]), "");
    }
  }
  loop Qb = loop_begin(c, "at.qblk", ci64(c, 0));
  LLVMValueRef i0 = LLVMBuildMul(B, Qb.iv, ci64(c, p->br), "at.i0");
  LLVMValueRef mrows = smin(c, LLVMBuildSub(B, ci64(c, p->rows), i0, ""), ci64(c, p->br), "at.m");
  LLVMValueRef iend = LLVMBuildAdd(B, i0, mrows, "at.iend");
  /* first element of this block in each local buffer */
  LLVMValueRef row0 = LLVMBuildAdd(B, LLVMBuildMul(B, Wl.iv, ci64(c, p->rows), ""),
                                   p->rowwise ? i0 : ci64(c, 0), "at.row0");
  for (int i = 0; i < a->n_local; i++)
    ioff[a->local[i]] = LLVMBuildMul(B, row0, ci64(c, a->local_row[i]), "at.ioff");
  c->ioff = ioff;
  for (int si = p->first; si < p->first + p->span && !c->failed; si++) {
    const cm_kstage *s = &k->stages[si];
    c->s = s;
    c->stage = si;
    memset(c->vars, 0, sizeof c->vars);
    for (int v = 0; v < p->nb; v++) c->vars[v] = bvals[v];
    if (attn_is_gemm(p, s, si)) {
      if (p->rowwise)
        attn_gemm_block(c, p, wsp, i0, mrows);
      else
        attn_gemm_block(c, p, wsp, ci64(c, 0), ci64(c, s->dom[p->nb]));
    } else {
      attn_generic_block(c, p, i0, iend);
    }
  }
  c->ioff = NULL;
  c->s = s0;
  c->stage = p->first;
  loop_end(c, &Qb, ci64(c, p->nblk), "at.qblk.exit");
  loop_end(c, &Wl, end, "at.w.exit");
  end_function(c, done);
  memcpy(c->bases, saved, sizeof *saved * (size_t)k->n_buffers);
  c->memo = saved_memo;
  c->md_scope = c->md_noalias = NULL;
  free(scope), free(noalias);
  free(ioff), free(saved), free(memo);
}

/* ---- attention span, streaming (online softmax over key blocks) -----------
 *
 * A forward span the lowering matched (cm_kattn.stream: S, m, E, l, [P], O)
 * with bc < keys. Per work item (batch item) and block of br query rows: Q
 * packed once; for each block of bc keys, S_j = Q K_j^T (packed micro-kernel,
 * then the S stage's epilogue), m_new = max(m, rowmax(f(S_j))), alpha =
 * exp(m - m_new), E_j = the E stage's value at m_new (packed as the A operand
 * of P V), l = alpha l + rowsum(E_j), O = alpha O + E_j V_j (the rescale in the
 * micro-kernel's accumulator init); finally O / l goes through the O stage's
 * epilogue. Roles the graph keeps (cm_kattn.keep) are written from the final
 * m and l: m and l per row, S, E and P by a second pass over the key blocks
 * recomputing S_j. The role loads of each stage are not evaluated: they take
 * the tile's values (the lowering proved every such load canonical). Workspace:
 * cm_kattn_stream_workspace, O(br (bc + d)), independent of the keys. */

typedef struct fa_plan {
  int first, nb, mr, nr;
  int64_t rows, keys, br, nblk, bc, nkb, d, dv, brp, ldc, ldo;
  int64_t off[8];
  const cm_kattn *a;
  const cm_kstage *sS, *sM, *sE, *sL, *sP, *sO;
} fa_plan;

static bool fa_plan_of(rctx *c, int first, fa_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_err e;
  if (s0->tmpl != CM_KT_ATTENTION_FWD || !a->stream || cm_kernel_verify(k, &e) != CM_OK ||
      cm_kattn_stream_check(k, first, &e) != CM_OK)
    return false;
  int end = first + a->span;
  int st[5] = {a->st_max, a->st_exp, a->st_sum, a->st_out, a->st_p};
  for (int i = 0; i < 5; i++)
    if ((st[i] <= first || st[i] >= end) && !(i == 4 && st[i] == -1)) return false;
  int bf[5] = {a->buf_s, a->buf_m, a->buf_e, a->buf_l, a->buf_p};
  for (int i = 0; i < 5; i++)
    if ((bf[i] < 0 || bf[i] >= k->n_buffers) && !(i == 4 && bf[i] == -1 && a->st_p == -1))
      return false;
  memset(p, 0, sizeof *p);
  p->first = first, p->nb = a->nb, p->a = a;
  p->mr = s0->tiles.mr, p->nr = s0->tiles.nr;
  int W = c->W;
  if (p->mr < 1 || p->nr < W || p->nr % W || p->nr / W > 8 || p->mr * (p->nr / W) > 32)
    return false;
  p->sS = s0, p->sM = &k->stages[a->st_max], p->sE = &k->stages[a->st_exp];
  p->sL = &k->stages[a->st_sum], p->sO = &k->stages[a->st_out];
  p->sP = a->st_p >= 0 ? &k->stages[a->st_p] : NULL;
  if (s0->n_dom != p->nb + 2 || s0->n_red != 1 || p->sO->n_dom < 2 || p->sO->n_red != 1 ||
      p->sO->gemm_a < 0 || p->sO->gemm_b < 0 || s0->gemm_a < 0 || s0->gemm_b < 0 ||
      p->sM->n_red != 1 || p->sL->n_red != 1 || p->sE->n_stores != 1 ||
      (p->sP && p->sP->n_stores != 1) || s0->n_stores != 1)
    return false;
  p->rows = a->rows, p->keys = s0->dom[p->nb + 1];
  p->br = a->br < a->rows ? a->br : a->rows;
  p->nblk = (p->rows + p->br - 1) / p->br;
  p->bc = a->bc;
  if (p->bc < 1 || p->bc >= p->keys) return false;
  p->nkb = (p->keys + p->bc - 1) / p->bc;
  p->d = s0->red[0], p->dv = p->sO->dom[p->sO->n_dom - 1];
  p->brp = (p->br + p->mr - 1) / p->mr * p->mr;
  p->ldc = (p->bc + p->nr - 1) / p->nr * p->nr;
  p->ldo = (p->dv + p->nr - 1) / p->nr * p->nr;
  /* rows of a block other than the last are whole panels */
  if (p->br < p->rows && p->br % p->mr) return false;
  int64_t ws = cm_kattn_stream_workspace(k, first, p->mr, p->nr, p->off);
  return ws > 0 && ws <= a->ws_bytes;
}

static LLVMValueRef fa_f32p(rctx *c, LLVMValueRef ws, int64_t byte_off, const char *name) {
  LLVMValueRef off = ci64(c, byte_off);
  return LLVMBuildInBoundsGEP2(c->B, c->i8, ws, &off, 1, name);
}

static LLVMValueRef fa_ld(rctx *c, LLVMValueRef base, LLVMValueRef idx, const char *name) {
  LLVMValueRef v = LLVMBuildLoad2(c->B, c->f32, fptr(c, base, idx, "fa.p"), name);
  LLVMSetAlignment(v, 4);
  return v;
}

static void fa_st(rctx *c, LLVMValueRef base, LLVMValueRef idx, LLVMValueRef v) {
  LLVMSetAlignment(LLVMBuildStore(c->B, v, fptr(c, base, idx, "fa.p")), 4);
}

static LLVMValueRef fa_splat(rctx *c, LLVMValueRef x) {
  LLVMValueRef ins =
      LLVMBuildInsertElement(c->B, LLVMGetPoison(c->vty), x, LLVMConstInt(c->i32, 0, 0), "");
  return LLVMBuildShuffleVector(c->B, ins, LLVMGetPoison(c->vty),
                                LLVMConstNull(LLVMVectorType(c->i32, (unsigned)c->W)), "splat");
}

/* The batch vars of a role stage (the lowering's rule, fa_nbs in lower.c):
 * its row var follows them. Stages other than the first may have unit batch
 * axes of their own when the batch is one item. */
static int fa_stage_nb(const cm_kstage *s, bool stat) {
  if (stat && !(s->n_dom >= 2 && s->dom[s->n_dom - 1] == 1)) return s->n_dom - 1;
  return s->n_dom - 2;
}

enum { FA_NONE = -1, FA_COL = -2, FA_RED = -3 };

/* Stage s at query row `row` and, for cv FA_COL (the var after the row) or
 * FA_RED (the reduction var), col: batch vars from bv (all 0 when the stage's
 * batch axes are not the span's), every other var 0; memo cleared, loads of
 * bufs[i] take vals[i]. Returns the stage's row var. */
static int fa_point(rctx *c, const fa_plan *p, const cm_kstage *s, const LLVMValueRef *bv,
                    LLVMValueRef row, int cv, LLVMValueRef col, const int *bufs,
                    const LLVMValueRef *vals, int n) {
  c->s = s;
  c->stage = (int)(s - c->k->stages);
  int nbs = fa_stage_nb(s, s == p->sM || s == p->sL);
  for (int v = 0; v < CM_KMAX_VARS; v++) c->vars[v] = v < s->n_dom + s->n_red ? ci64(c, 0) : NULL;
  if (nbs == p->nb)
    for (int v = 0; v < p->nb; v++) c->vars[v] = bv[v];
  if (row) c->vars[nbs] = row;
  if (cv == FA_COL) c->vars[nbs + 1] = col;
  if (cv == FA_RED) c->vars[s->n_dom] = col;
  reset_memo(c);
  for (int e = 0; e < s->n_exprs; e++)
    for (int i = 0; i < n; i++)
      if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == bufs[i]) c->memo[e] = vals[i];
  return nbs;
}

/* Store j of the current stage with value v (its index evaluated at the current point). */
static void fa_store(rctx *c, int j, LLVMValueRef v) {
  const cm_kstore *x = &c->s->stores[j];
  LLVMValueRef idx = convert(c, emit(c, x->index), c->s->exprs[x->index].dtype, CM_I64);
  if (!c->failed) store_buf(c, x->buf, idx, v, c->s->exprs[x->value].dtype, false);
}

/* C (ldc floats a row) = [alpha[row] * C +] packed A panels [0, mpan) x packed
 * B panels [0, npan) over k < kend (panel strides kstr). */
static void fa_microkernel(rctx *c, int64_t mr, int64_t nr, LLVMValueRef Ap, LLVMValueRef Bp,
                           LLVMValueRef Ct, LLVMValueRef mpan, LLVMValueRef npan, int64_t kstr,
                           LLVMValueRef kend, int64_t ldc, LLVMValueRef alpha, bool accum) {
  LLVMBuilderRef B = c->B;
  int64_t W = c->W, nv = nr / W;
  loop Jr = loop_begin(c, "fa.jr", ci64(c, 0));
  loop Ir = loop_begin(c, "fa.ir", ci64(c, 0));
  LLVMValueRef apan = fptr(c, Ap, LLVMBuildMul(B, Ir.iv, ci64(c, kstr * mr), ""), "apanel");
  LLVMValueRef bpan = fptr(c, Bp, LLVMBuildMul(B, Jr.iv, ci64(c, kstr * nr), ""), "bpanel");
  LLVMValueRef cbase = LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, ci64(c, mr * ldc), ""),
                                    LLVMBuildMul(B, Jr.iv, ci64(c, nr), ""), "cbase");
  LLVMValueRef init[64], nacc[64];
  for (int64_t r = 0; r < mr; r++) {
    LLVMValueRef sa = NULL;
    if (alpha)
      sa = fa_splat(c,
                    fa_ld(c, alpha,
                          LLVMBuildAdd(B, LLVMBuildMul(B, Ir.iv, ci64(c, mr), ""), ci64(c, r), ""),
                          "alpha"));
    for (int64_t v = 0; v < nv; v++) {
      if (!alpha && !accum) {
        init[r * nv + v] = LLVMConstNull(c->vty);
        continue;
      }
      LLVMValueRef off = LLVMBuildAdd(B, cbase, ci64(c, r * ldc + v * W), "");
      LLVMValueRef old = LLVMBuildLoad2(B, c->vty, fptr(c, Ct, off, "cp"), "cold");
      LLVMSetAlignment(old, 4);
      init[r * nv + v] = alpha ? LLVMBuildFMul(B, sa, old, "cscaled") : old;
    }
  }
  emit_fma_kloop(c, apan, bpan, mr, nv, nr, kend, "fa.kk", init, nacc);
  for (int64_t r = 0; r < mr; r++)
    for (int64_t v = 0; v < nv; v++) {
      LLVMValueRef off = LLVMBuildAdd(B, cbase, ci64(c, r * ldc + v * W), "");
      LLVMValueRef st = LLVMBuildStore(B, nacc[r * nv + v], fptr(c, Ct, off, "cp"));
      LLVMSetAlignment(st, 4);
    }
  loop_end(c, &Ir, mpan, "fa.ir.exit");
  loop_end(c, &Jr, npan, "fa.jr.exit");
}

/* The S tile of query rows [i0, i0 + mrows) x keys [j0, j0 + bcur) into St
 * (the S stage's store values; also stored to its buffer when kept). */
static void fa_scores(rctx *c, const fa_plan *p, const LLVMValueRef *bv, LLVMValueRef i0,
                      LLVMValueRef mrows, LLVMValueRef mpan, LLVMValueRef j0, LLVMValueRef bcur,
                      LLVMValueRef Qp, LLVMValueRef Kp, LLVMValueRef St, bool keep_s) {
  LLVMBuilderRef B = c->B;
  fa_point(c, p, p->sS, bv, NULL, FA_NONE, NULL, NULL, NULL, 0);
  LLVMValueRef npan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, bcur, ci64(c, p->nr - 1), ""), ci64(c, p->nr), "fa.kpan");
  emit_pack(c, "fa.packK", p->sS->gemm_b, p->nb + 1, j0, p->keys, npan, p->nr, p->d, ci64(c, 0),
            ci64(c, p->d), Kp);
  fa_microkernel(c, p->mr, p->nr, Qp, Kp, St, mpan, npan, p->d, ci64(c, p->d), p->ldc, NULL, false);
  loop Li = loop_begin(c, "fa.s.i", ci64(c, 0));
  loop Lj = loop_begin(c, "fa.s.j", ci64(c, 0));
  LLVMValueRef off = LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, ci64(c, p->ldc), ""), Lj.iv, "");
  fa_point(c, p, p->sS, bv, LLVMBuildAdd(B, i0, Li.iv, "i"), FA_COL,
           LLVMBuildAdd(B, j0, Lj.iv, "j"), NULL, NULL, 0);
  c->acc = fa_ld(c, St, off, "c");
  LLVMValueRef v = emit(c, p->sS->stores[0].value);
  if (keep_s) fa_store(c, 0, v);
  fa_st(c, St, off, convert(c, v, p->sS->exprs[p->sS->stores[0].value].dtype, CM_F32));
  c->acc = NULL;
  loop_end(c, &Lj, bcur, "fa.s.j.exit");
  loop_end(c, &Li, mrows, "fa.s.i.exit");
}

static void render_attention_stream(rctx *c, const char *fname, const fa_plan *p) {
  const cm_kattn *a = p->a;
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  LLVMValueRef *memo = span_memo(c, p->first, a->span), *saved_memo = c->memo;
  if (!memo) {
    end_function(c, done);
    return;
  }
  c->memo = memo;
  LLVMValueRef Qp = fa_f32p(c, ws, p->off[0], "fa.Q"), KVp = fa_f32p(c, ws, p->off[1], "fa.KV");
  LLVMValueRef St = fa_f32p(c, ws, p->off[2], "fa.S"), Ep = fa_f32p(c, ws, p->off[3], "fa.E");
  LLVMValueRef Oa = fa_f32p(c, ws, p->off[4], "fa.O"), Mv = fa_f32p(c, ws, p->off[5], "fa.m");
  LLVMValueRef Lv = fa_f32p(c, ws, p->off[6], "fa.l"), Av = fa_f32p(c, ws, p->off[7], "fa.alpha");
  LLVMValueRef zero = LLVMConstReal(c->f32, 0), ninf = LLVMConstReal(c->f32, -INFINITY);
  int64_t npv = p->ldo / p->nr;
  /* rows of packed E past the last block's rows feed only discarded O rows:
     keep them finite */
  loop Z = loop_begin(c, "fa.zero", ci64(c, 0));
  fa_st(c, Ep, Z.iv, zero);
  loop_end(c, &Z, ci64(c, p->brp * p->bc), "fa.zero.exit");
  loop Z2 = loop_begin(c, "fa.zero2", ci64(c, 0));
  fa_st(c, Av, Z2.iv, zero);
  loop_end(c, &Z2, ci64(c, p->brp), "fa.zero2.exit");

  loop Wl = loop_begin(c, "fa.w", begin);
  LLVMValueRef bv[CM_KMAX_VARS], rest = Wl.iv;
  for (int v = p->nb - 1; v >= 0; v--) {
    if (v == 0) {
      bv[v] = rest;
    } else {
      bv[v] = LLVMBuildSRem(B, rest, ci64(c, p->sS->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, ci64(c, p->sS->dom[v]), "");
    }
  }
  loop Qb = loop_begin(c, "fa.qblk", ci64(c, 0));
  LLVMValueRef i0 = LLVMBuildMul(B, Qb.iv, ci64(c, p->br), "fa.i0");
  LLVMValueRef mrows = smin(c, LLVMBuildSub(B, ci64(c, p->rows), i0, ""), ci64(c, p->br), "fa.m");
  LLVMValueRef mpan =
      LLVMBuildSDiv(B, LLVMBuildAdd(B, mrows, ci64(c, p->mr - 1), ""), ci64(c, p->mr), "fa.mpan");
  fa_point(c, p, p->sS, bv, NULL, FA_NONE, NULL, NULL, NULL, 0);
  emit_pack(c, "fa.packQ", p->sS->gemm_a, p->nb, i0, p->rows, mpan, p->mr, p->d, ci64(c, 0),
            ci64(c, p->d), Qp);
  loop R0 = loop_begin(c, "fa.init", ci64(c, 0));
  fa_st(c, Mv, R0.iv, ninf);
  fa_st(c, Lv, R0.iv, zero);
  loop_end(c, &R0, ci64(c, p->brp), "fa.init.exit");
  loop O0 = loop_begin(c, "fa.init.o", ci64(c, 0));
  fa_st(c, Oa, O0.iv, zero);
  loop_end(c, &O0, ci64(c, p->brp * p->ldo), "fa.init.o.exit");

  /* pass 1: running max, sum and O over the key blocks */
  loop Kb = loop_begin(c, "fa.kblk", ci64(c, 0));
  LLVMValueRef j0 = LLVMBuildMul(B, Kb.iv, ci64(c, p->bc), "fa.j0");
  LLVMValueRef bcur = smin(c, LLVMBuildSub(B, ci64(c, p->keys), j0, ""), ci64(c, p->bc), "fa.bc");
  fa_scores(c, p, bv, i0, mrows, mpan, j0, bcur, Qp, KVp, St, false);
  {
    loop Li = loop_begin(c, "fa.r", ci64(c, 0));
    LLVMValueRef row = LLVMBuildAdd(B, i0, Li.iv, "i");
    LLVMValueRef sbase = LLVMBuildMul(B, Li.iv, ci64(c, p->ldc), "");
    /* row max of f(S) over the block */
    LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
    loop Lj = loop_begin(c, "fa.max", ci64(c, 0));
    LLVMValueRef mx = LLVMBuildPhi(B, c->f32, "mx");
    LLVMAddIncoming(mx, &ninf, &pre, 1);
    LLVMValueRef sv = fa_ld(c, St, LLVMBuildAdd(B, sbase, Lj.iv, ""), "s");
    fa_point(c, p, p->sM, bv, row, FA_RED, LLVMBuildAdd(B, j0, Lj.iv, "j"), &a->buf_s, &sv, 1);
    LLVMValueRef bval = convert(c, emit(c, p->sM->body), p->sM->exprs[p->sM->body].dtype, CM_F32);
    LLVMValueRef args[2] = {mx, bval};
    LLVMValueRef nmx = intrin(c, "llvm.maximum", &c->f32, 1, args, 2, "max");
    LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
    LLVMAddIncoming(mx, &nmx, &latch, 1);
    loop_end(c, &Lj, bcur, "fa.max.exit");
    LLVMValueRef m_old = fa_ld(c, Mv, Li.iv, "m.old");
    LLVMValueRef a2[2] = {m_old, nmx};
    LLVMValueRef m_new = intrin(c, "llvm.maximum", &c->f32, 1, a2, 2, "m.new");
    LLVMValueRef first = LLVMBuildFCmp(B, LLVMRealOEQ, m_old, ninf, "fa.first");
    LLVMValueRef alpha =
        LLVMBuildSelect(B, first, zero, vexp(c, LLVMBuildFSub(B, m_old, m_new, "")), "alpha");
    fa_st(c, Mv, Li.iv, m_new);
    fa_st(c, Av, Li.iv, alpha);
    /* E at m_new, packed as the A operand of E V; its row sum */
    LLVMValueRef ebase = LLVMBuildAdd(
        B, LLVMBuildMul(B, LLVMBuildSDiv(B, Li.iv, ci64(c, p->mr), ""), ci64(c, p->bc * p->mr), ""),
        LLVMBuildSRem(B, Li.iv, ci64(c, p->mr), ""), "ebase");
    pre = LLVMGetInsertBlock(B);
    loop Le = loop_begin(c, "fa.exp", ci64(c, 0));
    LLVMValueRef rs = LLVMBuildPhi(B, c->f32, "rs");
    LLVMAddIncoming(rs, &zero, &pre, 1);
    LLVMValueRef sv2 = fa_ld(c, St, LLVMBuildAdd(B, sbase, Le.iv, ""), "s");
    int eb2[2] = {a->buf_s, a->buf_m};
    LLVMValueRef ev2[2] = {sv2, m_new};
    fa_point(c, p, p->sE, bv, row, FA_COL, LLVMBuildAdd(B, j0, Le.iv, "j"), eb2, ev2, 2);
    int ve = p->sE->stores[0].value;
    LLVMValueRef ev = convert(c, emit(c, ve), p->sE->exprs[ve].dtype, CM_F32);
    LLVMValueRef nrs = LLVMBuildFAdd(B, rs, ev, "rs.next");
    set_fast(nrs);
    /* in place (contiguous: the loop vectorizes), packed below */
    fa_st(c, St, LLVMBuildAdd(B, sbase, Le.iv, ""), ev);
    latch = LLVMGetInsertBlock(B);
    LLVMAddIncoming(rs, &nrs, &latch, 1);
    loop_end(c, &Le, bcur, "fa.exp.exit");
    loop Lp = loop_begin(c, "fa.packE", ci64(c, 0));
    fa_st(c, Ep, LLVMBuildAdd(B, ebase, LLVMBuildMul(B, Lp.iv, ci64(c, p->mr), ""), ""),
          fa_ld(c, St, LLVMBuildAdd(B, sbase, Lp.iv, ""), "e"));
    loop_end(c, &Lp, bcur, "fa.packE.exit");
    LLVMValueRef l_old = fa_ld(c, Lv, Li.iv, "l.old");
    fa_st(c, Lv, Li.iv, LLVMBuildFAdd(B, LLVMBuildFMul(B, alpha, l_old, ""), nrs, "l.new"));
    loop_end(c, &Li, mrows, "fa.r.exit");
  }
  int onb = fa_point(c, p, p->sO, bv, NULL, FA_NONE, NULL, NULL, NULL, 0);
  emit_pack(c, "fa.packV", p->sO->gemm_b, onb + 1, ci64(c, 0), p->dv, ci64(c, npv), p->nr, p->bc,
            j0, bcur, KVp);
  fa_microkernel(c, p->mr, p->nr, Ep, KVp, Oa, mpan, ci64(c, npv), p->bc, bcur, p->ldo, Av, false);
  loop_end(c, &Kb, ci64(c, p->nkb), "fa.kblk.exit");

  /* O / l through the O stage's epilogue */
  {
    loop Li = loop_begin(c, "fa.o.i", ci64(c, 0));
    loop Lc = loop_begin(c, "fa.o.c", ci64(c, 0));
    fa_point(c, p, p->sO, bv, LLVMBuildAdd(B, i0, Li.iv, "i"), FA_COL, Lc.iv, NULL, NULL, 0);
    LLVMValueRef o =
        fa_ld(c, Oa, LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, ci64(c, p->ldo), ""), Lc.iv, ""), "o");
    c->acc = LLVMBuildFDiv(B, o, fa_ld(c, Lv, Li.iv, "l"), "o.l");
    emit_stores(c);
    c->acc = NULL;
    loop_end(c, &Lc, ci64(c, p->dv), "fa.o.c.exit");
    loop_end(c, &Li, mrows, "fa.o.i.exit");
  }
  /* the row statistics the graph keeps */
  for (int r = 0; r < 2; r++) {
    if (!(a->keep & (r ? CM_KATTN_KEEP_L : CM_KATTN_KEEP_M))) continue;
    const cm_kstage *s = r ? p->sL : p->sM;
    loop Li = loop_begin(c, r ? "fa.keep.l" : "fa.keep.m", ci64(c, 0));
    fa_point(c, p, s, bv, LLVMBuildAdd(B, i0, Li.iv, "i"), FA_NONE, NULL, NULL, NULL, 0);
    c->acc = fa_ld(c, r ? Lv : Mv, Li.iv, "stat");
    emit_stores(c);
    c->acc = NULL;
    loop_end(c, &Li, mrows, r ? "fa.keep.l.exit" : "fa.keep.m.exit");
  }
  /* pass 2: S, E, P from the final m and l, recomputing S per key block */
  if (a->keep & (CM_KATTN_KEEP_S | CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
    loop K2 = loop_begin(c, "fa.kblk2", ci64(c, 0));
    LLVMValueRef j2 = LLVMBuildMul(B, K2.iv, ci64(c, p->bc), "fa.j0");
    LLVMValueRef bc2 = smin(c, LLVMBuildSub(B, ci64(c, p->keys), j2, ""), ci64(c, p->bc), "fa.bc");
    fa_scores(c, p, bv, i0, mrows, mpan, j2, bc2, Qp, KVp, St, a->keep & CM_KATTN_KEEP_S);
    if (a->keep & (CM_KATTN_KEEP_E | CM_KATTN_KEEP_P)) {
      loop Li = loop_begin(c, "fa.k2.i", ci64(c, 0));
      LLVMValueRef row = LLVMBuildAdd(B, i0, Li.iv, "i");
      LLVMValueRef mfin = fa_ld(c, Mv, Li.iv, "m"), lfin = fa_ld(c, Lv, Li.iv, "l");
      loop Lj = loop_begin(c, "fa.k2.j", ci64(c, 0));
      LLVMValueRef col = LLVMBuildAdd(B, j2, Lj.iv, "j");
      LLVMValueRef sv = fa_ld(
          c, St, LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, ci64(c, p->ldc), ""), Lj.iv, ""), "s");
      int eb2[2] = {a->buf_s, a->buf_m};
      LLVMValueRef ev2[2] = {sv, mfin};
      fa_point(c, p, p->sE, bv, row, FA_COL, col, eb2, ev2, 2);
      int ve = p->sE->stores[0].value;
      LLVMValueRef ev = emit(c, ve);
      if (a->keep & CM_KATTN_KEEP_E) fa_store(c, 0, ev);
      ev = convert(c, ev, p->sE->exprs[ve].dtype, CM_F32);
      if (p->sP && (a->keep & CM_KATTN_KEEP_P)) {
        int pb2[2] = {a->buf_e, a->buf_l};
        LLVMValueRef pv2[2] = {ev, lfin};
        fa_point(c, p, p->sP, bv, row, FA_COL, col, pb2, pv2, 2);
        fa_store(c, 0, emit(c, p->sP->stores[0].value));
      }
      loop_end(c, &Lj, bc2, "fa.k2.j.exit");
      loop_end(c, &Li, mrows, "fa.k2.i.exit");
    }
    loop_end(c, &K2, ci64(c, p->nkb), "fa.kblk2.exit");
  }
  c->s = p->sS;
  c->stage = p->first;
  loop_end(c, &Qb, ci64(c, p->nblk), "fa.qblk.exit");
  loop_end(c, &Wl, end, "fa.w.exit");
  end_function(c, done);
  c->memo = saved_memo;
  free(memo);
}

/* ---- attention backward span, streaming over key blocks ------------------
 *
 * A backward span the lowering marked (cm_kattn.stream, roles in attn.role):
 * per work item (batch item, all query rows), the first stage's A operand
 * (dO) packed once, and the B operand of every GEMM over key rows (Q for dK,
 * dO for dV) packed once. Pass 1 over the key blocks computes the tiles the
 * row reductions need and accumulates the reductions (rowsum(dP o P));
 * pass 2 recomputes every tile for the block (dP_j, dS_j), accumulates the
 * GEMMs over query rows (dQ += dS_j K_j) and completes the GEMMs over key rows
 * for the block (dK_j = dS_j^T Q, dV_j = P_j^T dO) through their epilogues;
 * the accumulated GEMMs' epilogues run at the end. Local tiles hold
 * rows x bc, so the workspace is O(rows (bc + d)). Loads of local buffers
 * are not evaluated: their slots take the tile's values. */

typedef struct fb_plan {
  int first, span, nb, mr, nr;
  int64_t rows, keys, bc, nkb, d, rp, ldt;
  int64_t fixed[4], local_off[CM_KATTN_MAX_LOCAL], stage_off[CM_KATTN_MAX_SPAN];
  bool dep_stat[CM_KATTN_MAX_LOCAL];
  const cm_kattn *a;
} fb_plan;

static int fb_local_of(const cm_kattn *a, int b) {
  for (int i = 0; i < a->n_local; i++)
    if (a->local[i] == b) return i;
  return -1;
}

static bool fb_plan_of(rctx *c, int first, fb_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  cm_err e;
  if (s0->tmpl != CM_KT_ATTENTION_BWD || !a->stream || cm_kernel_verify(k, &e) != CM_OK ||
      cm_kattn_stream_check(k, first, &e) != CM_OK)
    return false;
  memset(p, 0, sizeof *p);
  p->first = first, p->span = a->span, p->nb = a->nb, p->a = a;
  p->mr = s0->tiles.mr, p->nr = s0->tiles.nr;
  int W = c->W;
  if (p->mr < 1 || p->nr < W || p->nr % W || p->nr / W > 8 || p->mr * (p->nr / W) > 32)
    return false;
  p->rows = a->rows, p->keys = s0->dom[p->nb + 1], p->bc = a->bc, p->d = s0->red[0];
  p->nkb = (p->keys + p->bc - 1) / p->bc;
  p->rp = (p->rows + p->mr - 1) / p->mr * p->mr;
  p->ldt = (p->bc + p->nr - 1) / p->nr * p->nr;
  /* tiles that depend on a row statistic (directly or through a tile) wait for pass 2 */
  for (int r = 0; r < p->span; r++) {
    const cm_kstage *s = &k->stages[first + r];
    if (a->role[r] != CM_KATTN_ROLE_TILE || s->n_stores != 1) continue;
    int li = fb_local_of(a, s->stores[0].buf);
    if (li < 0) return false;
    for (int x = 0; x < s->n_exprs; x++) {
      if (s->exprs[x].kind != CM_KX_LOAD) continue;
      int lj = fb_local_of(a, s->exprs[x].buf);
      if (lj >= 0 && (a->local_row[lj] == 1 || p->dep_stat[lj])) p->dep_stat[li] = true;
    }
  }
  int64_t ws =
      cm_kattn_bwd_stream_workspace(k, first, p->mr, p->nr, p->fixed, p->local_off, p->stage_off);
  return ws > 0 && ws <= a->ws_bytes;
}

/* Stage s at query row `row` (var nbs) and key or column var (nbs + 1) col and
 * reduction var red; batch vars from bv when the stage's batch axes are the
 * span's; memo cleared; loads of local tiles take tile[ii * ldt + jj], of row
 * statistics stat[ii]. Returns nbs. */
static int fb_point(rctx *c, const fb_plan *p, const cm_kstage *s, bool stat,
                    const LLVMValueRef *bv, LLVMValueRef row, LLVMValueRef col, LLVMValueRef red,
                    LLVMValueRef *lbase, LLVMValueRef ii, LLVMValueRef jj) {
  c->s = s;
  c->stage = (int)(s - c->k->stages);
  int nbs = fa_stage_nb(s, stat);
  for (int v = 0; v < CM_KMAX_VARS; v++) c->vars[v] = v < s->n_dom + s->n_red ? ci64(c, 0) : NULL;
  if (nbs == p->nb)
    for (int v = 0; v < p->nb; v++) c->vars[v] = bv[v];
  if (row) c->vars[nbs] = row;
  if (col && nbs + 1 < s->n_dom) c->vars[nbs + 1] = col;
  if (red && s->n_red > 0) c->vars[s->n_dom] = red;
  reset_memo(c);
  if (!lbase) return nbs;
  const cm_kattn *a = p->a;
  LLVMValueRef tix = NULL;
  for (int e = 0; e < s->n_exprs; e++) {
    if (s->exprs[e].kind != CM_KX_LOAD) continue;
    int li = fb_local_of(a, s->exprs[e].buf);
    if (li < 0) continue;
    if (a->local_row[li] == 1) {
      c->memo[e] = fa_ld(c, lbase[li], ii, "stat");
    } else {
      if (!tix) tix = LLVMBuildAdd(c->B, LLVMBuildMul(c->B, ii, ci64(c, p->ldt), ""), jj, "tix");
      c->memo[e] = fa_ld(c, lbase[li], tix, "tile");
    }
  }
  return nbs;
}

/* Tile stage r for the key block [j0, j0 + bcur): every query row. */
static void fb_tile(rctx *c, const fb_plan *p, int r, const LLVMValueRef *bv, LLVMValueRef *lbase,
                    LLVMValueRef A0, LLVMValueRef Bp, LLVMValueRef Ct, LLVMValueRef j0,
                    LLVMValueRef bcur) {
  LLVMBuilderRef B = c->B;
  const cm_kstage *s = &c->k->stages[p->first + r];
  int li = fb_local_of(p->a, s->stores[0].buf);
  int val = s->stores[0].value;
  if (r == 0) {
    fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
    LLVMValueRef npan =
        LLVMBuildSDiv(B, LLVMBuildAdd(B, bcur, ci64(c, p->nr - 1), ""), ci64(c, p->nr), "fb.kpan");
    emit_pack(c, "fb.packB0", s->gemm_b, p->nb + 1, j0, p->keys, npan, p->nr, p->d, ci64(c, 0),
              ci64(c, p->d), Bp);
    fa_microkernel(c, p->mr, p->nr, A0, Bp, Ct, ci64(c, p->rp / p->mr), npan, p->d, ci64(c, p->d),
                   p->ldt, NULL, false);
  }
  loop Li = loop_begin(c, "fb.t.i", ci64(c, 0));
  loop Lj = loop_begin(c, "fb.t.j", ci64(c, 0));
  LLVMValueRef row = Li.iv, col = LLVMBuildAdd(B, j0, Lj.iv, "j");
  LLVMValueRef tix = LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, ci64(c, p->ldt), ""), Lj.iv, "");
  if (r == 0) {
    fb_point(c, p, s, false, bv, row, col, NULL, NULL, NULL, NULL);
    c->acc = fa_ld(c, Ct, tix, "c");
  } else {
    fb_point(c, p, s, false, bv, row, col, NULL, lbase, Li.iv, Lj.iv);
  }
  LLVMValueRef v = convert(c, emit(c, val), s->exprs[val].dtype, CM_F32);
  c->acc = NULL;
  fa_st(c, lbase[li], tix, v);
  loop_end(c, &Lj, bcur, "fb.t.j.exit");
  loop_end(c, &Li, ci64(c, p->rows), "fb.t.i.exit");
}

static void render_attention_bwd_stream(rctx *c, const char *fname, const fb_plan *p) {
  const cm_kernel *k = c->k;
  const cm_kattn *a = p->a;
  const cm_kstage *s0 = &k->stages[p->first];
  LLVMBuilderRef B = c->B;
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  LLVMValueRef *memo = span_memo(c, p->first, p->span), *saved_memo = c->memo;
  if (!memo) {
    end_function(c, done);
    return;
  }
  c->memo = memo;
  LLVMValueRef A0 = fa_f32p(c, ws, p->fixed[0], "fb.A0"), Ap = fa_f32p(c, ws, p->fixed[1], "fb.A");
  LLVMValueRef Bp = fa_f32p(c, ws, p->fixed[2], "fb.B"), Ct = fa_f32p(c, ws, p->fixed[3], "fb.C");
  LLVMValueRef lbase[CM_KATTN_MAX_LOCAL], sbase[CM_KATTN_MAX_SPAN];
  for (int i = 0; i < a->n_local; i++) lbase[i] = fa_f32p(c, ws, p->local_off[i], "fb.local");
  for (int r = 0; r < p->span; r++)
    sbase[r] = p->stage_off[r] > 0 ? fa_f32p(c, ws, p->stage_off[r], "fb.stage") : NULL;

  loop Wl = loop_begin(c, "fb.w", begin);
  LLVMValueRef bv[CM_KMAX_VARS], rest = Wl.iv;
  for (int v = p->nb - 1; v >= 0; v--) {
    if (v == 0) {
      bv[v] = rest;
    } else {
      bv[v] = LLVMBuildSRem(B, rest, ci64(c, s0->dom[v]), "b");
      rest = LLVMBuildSDiv(B, rest, ci64(c, s0->dom[v]), "");
    }
  }
  /* once per batch item: A of the first stage, B of the key GEMMs, zero accumulators and
     reduction starts */
  fb_point(c, p, s0, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
  emit_pack(c, "fb.packA0", s0->gemm_a, p->nb, ci64(c, 0), p->rows, ci64(c, p->rp / p->mr), p->mr,
            p->d, ci64(c, 0), ci64(c, p->d), A0);
  for (int r = 0; r < p->span; r++) {
    const cm_kstage *s = &k->stages[p->first + r];
    if (a->role[r] == CM_KATTN_ROLE_GEMM_KEYS) {
      int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
      int nbs = fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
      emit_pack(c, "fb.packBk", s->gemm_b, nbs + 1, ci64(c, 0), C, ci64(c, cp / p->nr), p->nr,
                p->rows, ci64(c, 0), ci64(c, p->rows), sbase[r]);
    } else if (a->role[r] == CM_KATTN_ROLE_GEMM_ROWS) {
      int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
      loop Z = loop_begin(c, "fb.zero", ci64(c, 0));
      fa_st(c, sbase[r], Z.iv, LLVMConstReal(c->f32, 0));
      loop_end(c, &Z, ci64(c, p->rp * cp), "fb.zero.exit");
    } else if (a->role[r] == CM_KATTN_ROLE_ROWRED) {
      c->s = s;
      int li = fb_local_of(a, s->stores[0].buf);
      loop Z = loop_begin(c, "fb.init", ci64(c, 0));
      fa_st(c, lbase[li], Z.iv, convert(c, reduce_init(c), s->acc_dtype, CM_F32));
      loop_end(c, &Z, ci64(c, p->rp), "fb.init.exit");
    }
  }
  for (int pass = 0; pass < 2 && !c->failed; pass++) {
    loop Kb = loop_begin(c, pass ? "fb.kblk2" : "fb.kblk", ci64(c, 0));
    LLVMValueRef j0 = LLVMBuildMul(B, Kb.iv, ci64(c, p->bc), "fb.j0");
    LLVMValueRef bcur = smin(c, LLVMBuildSub(B, ci64(c, p->keys), j0, ""), ci64(c, p->bc), "fb.bc");
    for (int r = 0; r < p->span && !c->failed; r++) {
      const cm_kstage *s = &k->stages[p->first + r];
      int role = a->role[r];
      if (role == CM_KATTN_ROLE_TILE) {
        int li = fb_local_of(a, s->stores[0].buf);
        if (pass == 0 && p->dep_stat[li]) continue;
        fb_tile(c, p, r, bv, lbase, A0, Bp, Ct, j0, bcur);
      } else if (role == CM_KATTN_ROLE_ROWRED && pass == 0) {
        int li = fb_local_of(a, s->stores[0].buf);
        loop Li = loop_begin(c, "fb.r.i", ci64(c, 0));
        c->s = s;
        LLVMValueRef acc0 = convert(c, fa_ld(c, lbase[li], Li.iv, "acc0"), CM_F32, s->acc_dtype);
        LLVMBasicBlockRef pre = LLVMGetInsertBlock(B);
        loop Lj = loop_begin(c, "fb.r.j", ci64(c, 0));
        LLVMValueRef acc = LLVMBuildPhi(B, val_type(c, s->acc_dtype), "acc");
        LLVMAddIncoming(acc, &acc0, &pre, 1);
        fb_point(c, p, s, true, bv, Li.iv, NULL, LLVMBuildAdd(B, j0, Lj.iv, "j"), lbase, Li.iv,
                 Lj.iv);
        LLVMValueRef bval = convert(c, emit(c, s->body), s->exprs[s->body].dtype, s->acc_dtype);
        LLVMValueRef nacc = reduce_step(c, acc, bval);
        LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
        LLVMAddIncoming(acc, &nacc, &latch, 1);
        loop_end(c, &Lj, bcur, "fb.r.j.exit");
        fa_st(c, lbase[li], Li.iv, convert(c, nacc, s->acc_dtype, CM_F32));
        loop_end(c, &Li, ci64(c, p->rows), "fb.r.i.exit");
      } else if (role == CM_KATTN_ROLE_GEMM_ROWS && pass == 1) {
        int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
        int nbs = fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
        const cm_kexpr *ga = &s->exprs[s->gemm_a];
        int li = ga->kind == CM_KX_LOAD ? fb_local_of(a, ga->buf) : -1;
        if (li >= 0) {
          loop Li = loop_begin(c, "fb.pa.i", ci64(c, 0));
          LLVMValueRef abase =
              LLVMBuildAdd(B,
                           LLVMBuildMul(B, LLVMBuildSDiv(B, Li.iv, ci64(c, p->mr), ""),
                                        ci64(c, p->bc * p->mr), ""),
                           LLVMBuildSRem(B, Li.iv, ci64(c, p->mr), ""), "abase");
          LLVMValueRef tb = LLVMBuildMul(B, Li.iv, ci64(c, p->ldt), "");
          loop Lj = loop_begin(c, "fb.pa.j", ci64(c, 0));
          fa_st(c, Ap, LLVMBuildAdd(B, abase, LLVMBuildMul(B, Lj.iv, ci64(c, p->mr), ""), ""),
                fa_ld(c, lbase[li], LLVMBuildAdd(B, tb, Lj.iv, ""), "t"));
          loop_end(c, &Lj, bcur, "fb.pa.j.exit");
          loop_end(c, &Li, ci64(c, p->rows), "fb.pa.i.exit");
        } else {
          emit_pack(c, "fb.packAr", s->gemm_a, nbs, ci64(c, 0), p->rows, ci64(c, p->rp / p->mr),
                    p->mr, p->bc, j0, bcur, Ap);
        }
        fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
        emit_pack(c, "fb.packBr", s->gemm_b, nbs + 1, ci64(c, 0), C, ci64(c, cp / p->nr), p->nr,
                  p->bc, j0, bcur, Bp);
        fa_microkernel(c, p->mr, p->nr, Ap, Bp, sbase[r], ci64(c, p->rp / p->mr),
                       ci64(c, cp / p->nr), p->bc, bcur, cp, NULL, true);
      } else if (role == CM_KATTN_ROLE_GEMM_KEYS && pass == 1) {
        int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
        int nbs = fb_point(c, p, s, false, bv, NULL, NULL, NULL, NULL, NULL, NULL);
        LLVMValueRef mpan = LLVMBuildSDiv(B, LLVMBuildAdd(B, bcur, ci64(c, p->mr - 1), ""),
                                          ci64(c, p->mr), "fb.mpan");
        const cm_kexpr *ga = &s->exprs[s->gemm_a];
        int li = ga->kind == CM_KX_LOAD ? fb_local_of(a, ga->buf) : -1;
        if (li >= 0) {
          loop Lj = loop_begin(c, "fb.pk.j", ci64(c, 0));
          LLVMValueRef abase =
              LLVMBuildAdd(B,
                           LLVMBuildMul(B, LLVMBuildSDiv(B, Lj.iv, ci64(c, p->mr), ""),
                                        ci64(c, p->rows * p->mr), ""),
                           LLVMBuildSRem(B, Lj.iv, ci64(c, p->mr), ""), "abase");
          loop Li = loop_begin(c, "fb.pk.i", ci64(c, 0));
          fa_st(c, Ap, LLVMBuildAdd(B, abase, LLVMBuildMul(B, Li.iv, ci64(c, p->mr), ""), ""),
                fa_ld(c, lbase[li],
                      LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, ci64(c, p->ldt), ""), Lj.iv, ""),
                      "t"));
          loop_end(c, &Li, ci64(c, p->rows), "fb.pk.i.exit");
          loop_end(c, &Lj, bcur, "fb.pk.j.exit");
        } else {
          emit_pack(c, "fb.packAk", s->gemm_a, nbs, j0, p->keys, mpan, p->mr, p->rows, ci64(c, 0),
                    ci64(c, p->rows), Ap);
        }
        fa_microkernel(c, p->mr, p->nr, Ap, sbase[r], Ct, mpan, ci64(c, cp / p->nr), p->rows,
                       ci64(c, p->rows), cp, NULL, false);
        loop Lj = loop_begin(c, "fb.ek.j", ci64(c, 0));
        loop Lc = loop_begin(c, "fb.ek.c", ci64(c, 0));
        fb_point(c, p, s, false, bv, LLVMBuildAdd(B, j0, Lj.iv, "j"), Lc.iv, NULL, NULL, NULL,
                 NULL);
        c->acc =
            fa_ld(c, Ct, LLVMBuildAdd(B, LLVMBuildMul(B, Lj.iv, ci64(c, cp), ""), Lc.iv, ""), "c");
        emit_stores(c);
        c->acc = NULL;
        loop_end(c, &Lc, ci64(c, C), "fb.ek.c.exit");
        loop_end(c, &Lj, bcur, "fb.ek.j.exit");
      }
    }
    loop_end(c, &Kb, ci64(c, p->nkb), pass ? "fb.kblk2.exit" : "fb.kblk.exit");
  }
  /* the epilogues of the GEMMs accumulated over the key blocks */
  for (int r = 0; r < p->span && !c->failed; r++) {
    const cm_kstage *s = &k->stages[p->first + r];
    if (a->role[r] != CM_KATTN_ROLE_GEMM_ROWS) continue;
    int64_t C = s->dom[s->n_dom - 1], cp = (C + p->nr - 1) / p->nr * p->nr;
    loop Li = loop_begin(c, "fb.er.i", ci64(c, 0));
    loop Lc = loop_begin(c, "fb.er.c", ci64(c, 0));
    fb_point(c, p, s, false, bv, Li.iv, Lc.iv, NULL, NULL, NULL, NULL);
    c->acc = fa_ld(c, sbase[r], LLVMBuildAdd(B, LLVMBuildMul(B, Li.iv, ci64(c, cp), ""), Lc.iv, ""),
                   "c");
    emit_stores(c);
    c->acc = NULL;
    loop_end(c, &Lc, ci64(c, C), "fb.er.c.exit");
    loop_end(c, &Li, ci64(c, p->rows), "fb.er.i.exit");
  }
  c->s = s0;
  c->stage = p->first;
  loop_end(c, &Wl, end, "fb.w.exit");
  end_function(c, done);
  c->memo = saved_memo;
  free(memo);
}

/* A stage inside a fused span: its work ran in the span's first stage. */
static void render_nothing(rctx *c, const char *fname) {
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  begin_function(c, fname, &begin, &end, &ws, &done);
  end_function(c, done);
}

/* The tiles a GEMM stage renders with: the stage's when set (the lowering's
 * plan), else the target's defaults for W lanes (hand-built kernels). */
static cm_kgemm_tiles gemm_tiles(const cm_kstage *s, int W) {
  cm_kgemm_tiles t = s->tiles;
  if (t.mr <= 0 || t.nr <= 0 || t.mc <= 0 || t.nc <= 0 || t.kc <= 0) t = cm_cpu_gemm_defaults(W);
  return t;
}

static cm_status stage_fail(rctx *c, const char *rule) {
  return cm_errorf(c->err, CM_EINVALID, "cm_render_llvm: kernel %s stage %d (%s): %s", c->k->name,
                   c->stage, c->s->name, rule);
}

static bool check_vars(const cm_kstage *s, int e, uint32_t allowed) {
  return (cm_kx_vars_used(s, e) & ~allowed) == 0;
}

bool cm_llvm_stage_is_gemm(const cm_kstage *s) {
  return s->tmpl == CM_KT_GEMM && s->acc_dtype == CM_F32;
}

cm_status cm_render_llvm(const cm_kernel *k, LLVMModuleRef m, const cm_llvm_render_opts *o,
                         cm_err *err) {
  rctx c;
  memset(&c, 0, sizeof c);
  c.C = LLVMGetModuleContext(m);
  c.M = m;
  c.k = k;
  c.err = err;
  c.f32 = LLVMFloatTypeInContext(c.C);
  c.f64 = LLVMDoubleTypeInContext(c.C);
  c.f16 = LLVMHalfTypeInContext(c.C);
  c.i1 = LLVMInt1TypeInContext(c.C);
  c.i8 = LLVMInt8TypeInContext(c.C);
  c.i16 = LLVMInt16TypeInContext(c.C);
  c.i32 = LLVMInt32TypeInContext(c.C);
  c.i64 = LLVMInt64TypeInContext(c.C);
  c.ptr = LLVMPointerTypeInContext(c.C, 0);
  cm_target host;
  const cm_target *target = o ? o->target : NULL;
  if (!target) {
    cm_target_host(&host);
    target = &host;
  }
  c.W = o && o->vector_width > 0 ? o->vector_width : target->vector_lanes;
  if (c.W != 4 && c.W != 8 && c.W != 16 && c.W != 32)
    return cm_errorf(err, CM_EINVALID, "cm_render_llvm: kernel %s: vector_width %d is not 4..32",
                     k->name, c.W);
  c.vty = LLVMVectorType(c.f32, (unsigned)c.W);
  c.unroll = 4;
  c.bases = calloc((size_t)(k->n_buffers > 0 ? k->n_buffers : 1), sizeof *c.bases);
  if (!c.bases) return cm_errorf(err, CM_EINTERNAL, "cm_render_llvm: out of memory");
  c.B = LLVMCreateBuilderInContext(c.C);
  cm_status st = CM_OK;
  int attn_end = 0; /* stages before it belong to a fused attention span */
  for (int si = 0; si < k->n_stages && st == CM_OK; si++) {
    const cm_kstage *s = &k->stages[si];
    c.s = s;
    c.stage = si;
    c.acc = NULL;
    c.failed = false;
    memset(c.vars, 0, sizeof c.vars);
    if (s->n_dom < 0 || s->n_red < 0 || s->n_dom + s->n_red > CM_KMAX_VARS ||
        s->n_parallel > s->n_dom || s->n_stores < 0 || s->n_stores > CM_KMAX_STORES) {
      st = stage_fail(&c, "variable counts out of range");
      break;
    }
    bool bad = false;
    for (int v = 0; v < s->n_dom; v++) bad |= s->dom[v] < 1;
    for (int v = 0; v < s->n_red; v++) bad |= s->red[v] < 1;
    if (bad) {
      st = stage_fail(&c, "a loop extent is below 1");
      break;
    }
    if (s->n_red > 0 && (s->body < 0 || s->body >= s->n_exprs)) {
      st = stage_fail(&c, "reduction without a body expression");
      break;
    }
    for (int i = 0; i < s->n_stores && !bad; i++) {
      const cm_kstore *x = &s->stores[i];
      bad = x->buf < 0 || x->buf >= k->n_buffers || x->index < 0 || x->index >= s->n_exprs ||
            x->value < 0 || x->value >= s->n_exprs;
    }
    if (bad) {
      st = stage_fail(&c, "a store names a buffer or expression out of range");
      break;
    }
    c.memo = calloc((size_t)(s->n_exprs > 0 ? s->n_exprs : 1), sizeof *c.memo);
    if (!c.memo) {
      st = cm_errorf(err, CM_EINTERNAL, "cm_render_llvm: out of memory");
      break;
    }
    char fname[96];
    snprintf(fname, sizeof fname, "%s_s%d", k->name, si);
    if (si < attn_end) {
      render_nothing(&c, fname);
      free(c.memo);
      c.memo = NULL;
      continue;
    }
    /* an attention span renders whole into its first stage's function */
    bool tmpl_on = !(o && o->no_templates);
    bool fwd = s->tmpl == CM_KT_ATTENTION_FWD, bwd = s->tmpl == CM_KT_ATTENTION_BWD;
    int span = 0;
    fb_plan bp;
    fa_plan fp;
    attn_plan ap;
    if (tmpl_on && bwd && s->attn.stream && fb_plan_of(&c, si, &bp)) {
      render_attention_bwd_stream(&c, fname, &bp);
      span = s->attn.span;
    } else if (tmpl_on && fwd && s->attn.stream && fa_plan_of(&c, si, &fp)) {
      render_attention_stream(&c, fname, &fp);
      span = s->attn.span;
    } else if (tmpl_on && (fwd || bwd) && attn_plan_of(&c, si, &ap)) {
      render_attention(&c, fname, &ap);
      span = ap.span;
    }
    if (span > 0) {
      attn_end = si + span;
      free(c.memo);
      c.memo = NULL;
      if (c.failed) st = c.fail_status;
      continue;
    }
    bool templ = !(o && o->no_templates) && cm_llvm_stage_is_gemm(s);
    if (s->tmpl == CM_KT_GEMM && !(o && o->no_templates)) {
      int nd = s->n_dom;
      uint32_t batch = nd >= 2 ? (1u << (nd - 2)) - 1 : 0;
      uint32_t ibit = 1u << (nd - 2), jbit = 1u << (nd - 1), kbit = 1u << nd;
      if (nd < 2 || s->n_red != 1 || s->red_op != CM_KRED_SUM || s->gemm_a < 0 ||
          s->gemm_a >= s->n_exprs || s->gemm_b < 0 || s->gemm_b >= s->n_exprs ||
          !check_vars(s, s->gemm_a, batch | ibit | kbit) ||
          !check_vars(s, s->gemm_b, batch | jbit | kbit)) {
        st = stage_fail(&c, "GEMM template invariants broken (dom [batch.., M, N], one SUM "
                            "reduction, gemm_a over (batch, i, k), gemm_b over (batch, k, j))");
        free(c.memo);
        break;
      }
    }
    if (templ) {
      gemm_shape g;
      memset(&g, 0, sizeof g);
      g.nb = s->n_dom - 2;
      g.M = s->dom[s->n_dom - 2];
      g.N = s->dom[s->n_dom - 1];
      g.K = s->red[0];
      g.batch = 1;
      for (int v = 0; v < g.nb; v++) g.batch *= s->dom[v];
      g.t = gemm_tiles(s, c.W);
      if (g.t.mc % g.t.mr || g.t.nc % g.t.nr || g.t.nr % c.W || g.t.mr * (g.t.nr / c.W) > 64 ||
          g.t.nr / c.W > 8) {
        st = stage_fail(&c, "GEMM tiles: mc must be a multiple of mr, nc of nr, nr of the "
                            "vector width, and mr x nr at most 64 vectors");
        free(c.memo);
        break;
      }
      g.mblocks = (g.M + g.t.mc - 1) / g.t.mc;
      g.nblocks = (g.N + g.t.nc - 1) / g.t.nc;
      render_gemm(&c, fname, &g);
    } else {
      render_generic(&c, fname);
    }
    free(c.memo);
    c.memo = NULL;
    if (c.failed) st = c.fail_status;
  }
  LLVMDisposeBuilder(c.B);
  free(c.bases);
  return st;
}
