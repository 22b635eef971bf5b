/* codegen/render_llvm.c — kernel IR to LLVM IR through the C API: one function
 * per stage running work items [begin, end), generic loop nests shaped for the
 * loop vectorizer, and a packed register-blocked GEMM for CM_KT_GEMM stages
 * (render_llvm_gemm.c) and fused attention spans (render_llvm_attention.c),
 * which share this file's helpers through render_llvm.h.
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
#include "render_llvm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- small helpers ---------------------------------------------------- */

LLVMValueRef rl_ci64(rctx *c, int64_t v) {
  return LLVMConstInt(c->i64, (unsigned long long)v, 1);
}

LLVMTypeRef rl_val_type(rctx *c, cm_dtype dt) {
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

LLVMValueRef rl_intrin(rctx *c, const char *name, LLVMTypeRef *tys, int ntys, LLVMValueRef *args,
                       int nargs, const char *vname) {
  unsigned id = LLVMLookupIntrinsicID(name, strlen(name));
  LLVMValueRef f = LLVMGetIntrinsicDeclaration(c->M, id, tys, (size_t)ntys);
  LLVMTypeRef fty = LLVMIntrinsicGetType(c->C, id, tys, (size_t)ntys);
  return LLVMBuildCall2(c->B, fty, f, args, (unsigned)nargs, vname);
}

static LLVMValueRef intrin1(rctx *c, const char *name, LLVMValueRef x, const char *vname) {
  LLVMTypeRef t = LLVMTypeOf(x);
  return rl_intrin(c, name, &t, 1, &x, 1, vname);
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
LLVMValueRef rl_convert(rctx *c, LLVMValueRef v, cm_dtype from, cm_dtype to) {
  LLVMBuilderRef B = c->B;
  if (from == to) return v;
  LLVMTypeRef tt = rl_val_type(c, to);
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
    return rl_intrin(c, "llvm.fptosi.sat", ts, 2, &v, 1, "fi");
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
void rl_set_scopes(rctx *c, int buf, LLVMValueRef inst) {
  if (!c->md_scope || !c->md_scope[buf]) return;
  LLVMSetMetadata(inst, LLVMGetMDKindIDInContext(c->C, "alias.scope", 11), c->md_scope[buf]);
  LLVMSetMetadata(inst, LLVMGetMDKindIDInContext(c->C, "noalias", 7), c->md_noalias[buf]);
}

LLVMValueRef rl_buf_gep(rctx *c, int buf, LLVMValueRef idx) {
  LLVMTypeRef t = mem_type(c, c->k->buffers[buf].dtype);
  if (c->ioff && c->ioff[buf]) idx = LLVMBuildSub(c->B, idx, c->ioff[buf], "at.idx");
  return LLVMBuildInBoundsGEP2(c->B, t, c->bases[buf], &idx, 1, "p");
}

static LLVMValueRef load_buf(rctx *c, int buf, LLVMValueRef idx) {
  cm_dtype dt = c->k->buffers[buf].dtype;
  LLVMValueRef p = rl_buf_gep(c, buf, idx);
  LLVMValueRef v = LLVMBuildLoad2(c->B, mem_type(c, dt), p, "ld");
  rl_set_scopes(c, buf, v);
  switch (dt) {
  case CM_BF16: return bf16_to_float(c, v);
  case CM_F16: return LLVMBuildFPExt(c->B, v, c->f32, "");
  case CM_BOOL: return LLVMBuildICmp(c->B, LLVMIntNE, v, LLVMConstInt(c->i8, 0, 0), "");
  default: return v;
  }
}

/* v: an expression value of dtype vdt; stored converted to the buffer's dtype. */
void rl_store_buf(rctx *c, int buf, LLVMValueRef idx, LLVMValueRef v, cm_dtype vdt,
                  bool accumulate) {
  cm_dtype dt = c->k->buffers[buf].dtype;
  LLVMValueRef x = rl_convert(c, v, vdt, dt);
  LLVMValueRef p = rl_buf_gep(c, buf, idx);
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
  rl_set_scopes(c, buf, LLVMBuildStore(c->B, x, p));
}

/* ---- expressions ------------------------------------------------------ */

static LLVMValueRef fail_expr(rctx *c, int e, const char *rule) {
  if (!c->failed)
    c->fail_status =
        cm_errorf(c->err, CM_EINVALID, "cm_render_llvm: kernel %s stage %d (%s) expression %d: %s",
                  c->k->name, c->stage, c->s->name, e, rule);
  c->failed = true;
  return LLVMGetUndef(c->i64);
}

LLVMValueRef rl_operand(rctx *c, int e, int x, cm_dtype want) {
  if (x < 0 || x >= e) return fail_expr(c, e, "operand missing or not smaller than the expression");
  LLVMValueRef v = rl_emit(c, x);
  if (c->failed) return LLVMGetUndef(rl_val_type(c, want));
  return rl_convert(c, v, c->s->exprs[x].dtype, want);
}

static LLVMValueRef emit_int_op(rctx *c, int e, const cm_kexpr *x) {
  LLVMBuilderRef B = c->B;
  cm_dtype dt = x->dtype;
  LLVMTypeRef t = rl_val_type(c, dt);
  LLVMValueRef a = rl_operand(c, e, x->a, dt);
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
  LLVMValueRef b = rl_operand(c, e, x->b, dt);
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
    return rl_convert(c, r, CM_F64, dt);
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
  return rl_intrin(c, "llvm.fma", &t, 1, args, 3, "fma");
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
LLVMValueRef rl_vexp(rctx *c, LLVMValueRef x) {
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
  small = rl_intrin(c, "llvm.copysign", &st, 1, sargs, 2, ""); /* tanh(-0) = -0 */
  LLVMValueRef e = rl_vexp(c, LLVMBuildFMul(B, ax, fk(c, 2), ""));
  LLVMValueRef big = LLVMBuildFSub(
      B, fk(c, 1), LLVMBuildFDiv(B, fk(c, 2), LLVMBuildFAdd(B, e, fk(c, 1), ""), ""), "");
  LLVMValueRef args[2] = {big, x};
  LLVMTypeRef t = c->f32;
  big = rl_intrin(c, "llvm.copysign", &t, 1, args, 2, "");
  return fsel(c, LLVMRealOLT, ax, fk(c, 0.55), small, big);
}

/* erf: x P(x^2) below 1; on [1, 3.93] one degree-14 polynomial in |x| - 2.465
 * (Chebyshev interpolation of erf, coefficients rounded to f32: within 1 ulp
 * of erf at every float there), 15 FMAs where 1 - e^{-x^2} Q(1/x) took a
 * division and an exp (the GELU epilogue of a GEMM paid ~40 % more); 1 from
 * 3.93 on, where erfc < half an ulp of 1. */
static LLVMValueRef verf(rctx *c, LLVMValueRef x) {
  LLVMBuilderRef B = c->B;
  static const double ks[7] = {1.12837923,    -0.376126289,    0.112836123,   -0.0268548094,
                               0.00519005349, -0.000802435388, 7.89820988e-05};
  static const double kb[15] = {0.999509752,     0.00259161857,   -0.0063885306,  0.00963596534,
                                -0.00974516664,  0.00671129487,   -0.00292124995, 0.00047394482,
                                0.000343086576,  -0.000296324288, 7.67203528e-05, 2.38765297e-05,
                                -1.71616957e-05, 1.39659079e-07,  1.07106371e-06};
  LLVMValueRef ax = intrin1(c, "llvm.fabs", x, "ax");
  LLVMValueRef x2 = LLVMBuildFMul(B, x, x, "");
  LLVMValueRef small = LLVMBuildFMul(B, x, horner(c, x2, ks, 7), "");
  LLVMValueRef big = horner(c, LLVMBuildFSub(B, ax, fk(c, 2.465), "t"), kb, 15);
  big = fsel(c, LLVMRealOGE, ax, fk(c, 3.93), fk(c, 1), big);
  LLVMValueRef args[2] = {big, x};
  LLVMTypeRef ft = c->f32;
  big = rl_intrin(c, "llvm.copysign", &ft, 1, args, 2, "");
  return fsel(c, LLVMRealOLT, ax, fk(c, 1), small, big);
}

static LLVMValueRef emit_float_unary(rctx *c, int e, cm_op op, LLVMValueRef a, bool dbl) {
  LLVMBuilderRef B = c->B;
  LLVMTypeRef t = LLVMTypeOf(a);
  LLVMValueRef one = LLVMConstReal(t, 1.0), zero = LLVMConstReal(t, 0.0);
  switch (op) {
  case CM_OP_NEG: return LLVMBuildFNeg(B, a, "neg");
  case CM_OP_ABS: return intrin1(c, "llvm.fabs", a, "abs");
  case CM_OP_EXP: return dbl ? intrin1(c, "llvm.exp", a, "exp") : rl_vexp(c, a);
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
  LLVMValueRef cond = rl_operand(c, e, x->a, CM_BOOL);
  memcpy(saved, c->memo, sz);
  LLVMBasicBlockRef tb = rl_new_block(c, "sel.t"), fb = rl_new_block(c, "sel.f"),
                    mb = rl_new_block(c, "sel.m");
  LLVMBuildCondBr(B, cond, tb, fb);
  LLVMPositionBuilderAtEnd(B, tb);
  LLVMValueRef a = rl_operand(c, e, x->b, x->dtype);
  LLVMBasicBlockRef tend = LLVMGetInsertBlock(B);
  LLVMBuildBr(B, mb);
  memcpy(c->memo, saved, sz);
  LLVMPositionBuilderAtEnd(B, fb);
  LLVMValueRef b = rl_operand(c, e, x->c, x->dtype);
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
    return rl_convert(c, rl_emit(c, x->a), c->s->exprs[x->a].dtype, dt);
  }
  if (op == CM_OP_SELECT) {
    if (select_branches(c, x)) return emit_select_branch(c, e, x);
    LLVMValueRef cond = rl_operand(c, e, x->a, CM_BOOL);
    LLVMValueRef a = rl_operand(c, e, x->b, dt), b = rl_operand(c, e, x->c, dt);
    return LLVMBuildSelect(B, cond, a, b, "sel");
  }
  if (op == CM_OP_LT || op == CM_OP_LE || op == CM_OP_EQ || op == CM_OP_NE) {
    if (x->a < 0 || x->a >= e || x->b < 0 || x->b >= e)
      return fail_expr(c, e, "comparison operands missing");
    cm_dtype da = c->s->exprs[x->a].dtype, db = c->s->exprs[x->b].dtype;
    if ((is_intdt(da) || da == CM_BOOL) && (is_intdt(db) || db == CM_BOOL)) {
      LLVMValueRef a = rl_operand(c, e, x->a, CM_I64), b = rl_operand(c, e, x->b, CM_I64);
      LLVMIntPredicate p = op == CM_OP_LT   ? LLVMIntSLT
                           : op == CM_OP_LE ? LLVMIntSLE
                           : op == CM_OP_EQ ? LLVMIntEQ
                                            : LLVMIntNE;
      return rl_convert(c, LLVMBuildICmp(B, p, a, b, "cmp"), CM_BOOL, dt);
    }
    cm_dtype ct = (da == CM_F64 || db == CM_F64 || is_intdt(da) || is_intdt(db)) ? CM_F64 : CM_F32;
    LLVMValueRef a = rl_operand(c, e, x->a, ct), b = rl_operand(c, e, x->b, ct);
    LLVMRealPredicate p = op == CM_OP_LT   ? LLVMRealOLT
                          : op == CM_OP_LE ? LLVMRealOLE
                          : op == CM_OP_EQ ? LLVMRealOEQ
                                           : LLVMRealUNE;
    return rl_convert(c, LLVMBuildFCmp(B, p, a, b, "cmp"), CM_BOOL, dt);
  }
  if (is_intdt(dt)) return emit_int_op(c, e, x);
  if (dt == CM_BOOL) {
    return fail_expr(c, e,
                     "arithmetic op with a bool result (only comparisons, SELECT and "
                     "CAST give bool)");
  }
  bool dbl = dt == CM_F64;
  cm_dtype ct = dbl ? CM_F64 : CM_F32;
  LLVMValueRef a = rl_operand(c, e, x->a, ct), r;
  int arity = (op == CM_OP_ADD || op == CM_OP_SUB || op == CM_OP_MUL || op == CM_OP_DIV ||
               op == CM_OP_MAX || op == CM_OP_MIN || op == CM_OP_POW)
                  ? 2
                  : 1;
  if (arity == 1) {
    r = emit_float_unary(c, e, op, a, dbl);
  } else {
    LLVMValueRef b = rl_operand(c, e, x->b, ct);
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
      r = rl_intrin(c, "llvm.pow", &pt, 1, args, 2, "pow");
      break;
    }
    default: r = fail_expr(c, e, "unknown op");
    }
  }
  return round_to(c, r, dt);
}

LLVMValueRef rl_emit(rctx *c, int e) {
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
      v = rl_convert(c, f, CM_F64, x->dtype);
    } else if (x->dtype == CM_BOOL)
      v = LLVMConstInt(c->i1, x->value != 0, 0);
    else
      v = LLVMConstInt(rl_val_type(c, x->dtype), (unsigned long long)(int64_t)x->value, 1);
    break;
  case CM_KX_VAR:
    if (x->var < 0 || x->var >= s->n_dom + s->n_red || !c->vars[x->var])
      return fail_expr(c, e, "variable not in scope");
    v = c->vars[x->var];
    break;
  case CM_KX_ACC:
    if (!c->acc) return fail_expr(c, e, "ACC outside a store value of a reduction");
    v = rl_convert(c, c->acc, s->acc_dtype, x->dtype);
    break;
  case CM_KX_LOAD: {
    if (x->buf < 0 || x->buf >= c->k->n_buffers) return fail_expr(c, e, "buffer out of range");
    LLVMValueRef idx = rl_operand(c, e, x->a, CM_I64);
    if (c->failed) return idx;
    v = rl_convert(c, load_buf(c, x->buf, idx), c->k->buffers[x->buf].dtype, x->dtype);
    break;
  }
  case CM_KX_MOD: {
    LLVMValueRef a = rl_operand(c, e, x->b >= 0 ? x->a : -1, CM_I64);
    LLVMValueRef b = rl_operand(c, e, x->b, CM_I64);
    if (c->failed) return a;
    LLVMValueRef bad = LLVMBuildICmp(c->B, LLVMIntSLE, b, rl_ci64(c, 0), "");
    LLVMValueRef safe = LLVMBuildSelect(c->B, bad, rl_ci64(c, 1), b, "");
    LLVMValueRef r = LLVMBuildSRem(c->B, a, safe, "mod");
    v = LLVMBuildSelect(c->B, bad, rl_ci64(c, 0), r, "");
    break;
  }
  case CM_KX_OP: v = emit_op(c, e, x); break;
  default: return fail_expr(c, e, "unknown expression kind");
  }
  if (c->failed) return LLVMGetUndef(rl_val_type(c, x->dtype));
  c->memo[e] = v;
  return v;
}

void rl_reset_memo(rctx *c) {
  memset(c->memo, 0, sizeof(LLVMValueRef) * (size_t)(c->s->n_exprs ? c->s->n_exprs : 1));
}

/* A distinct self-referencing node !{!self, extra} (scope domains and scopes). */
LLVMMetadataRef rl_self_md(rctx *c, LLVMMetadataRef extra) {
  LLVMMetadataRef tmp = LLVMTemporaryMDNode(c->C, NULL, 0);
  LLVMMetadataRef ops[2] = {tmp, extra};
  LLVMMetadataRef n = LLVMMDNodeInContext2(c->C, ops, extra ? 2 : 1);
  LLVMMetadataReplaceAllUsesWith(tmp, n);
  return n;
}

/* ---- loops ------------------------------------------------------------ */

LLVMBasicBlockRef rl_new_block(rctx *c, const char *name) {
  return LLVMAppendBasicBlockInContext(c->C, c->fn, name);
}

/* A do-while counted loop from lo (the caller guarantees lo < hi). */
loop rl_loop_begin(rctx *c, const char *name, LLVMValueRef lo) {
  loop L;
  LLVMBasicBlockRef pre = LLVMGetInsertBlock(c->B);
  L.header = rl_new_block(c, name);
  LLVMBuildBr(c->B, L.header);
  LLVMPositionBuilderAtEnd(c->B, L.header);
  L.iv = LLVMBuildPhi(c->B, c->i64, name);
  LLVMAddIncoming(L.iv, &lo, &pre, 1);
  return L;
}

void rl_loop_end(rctx *c, loop *L, LLVMValueRef hi, const char *exit_name) {
  LLVMValueRef next = LLVMBuildNSWAdd(c->B, L->iv, rl_ci64(c, 1), "next");
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(c->B);
  LLVMBasicBlockRef exit = rl_new_block(c, exit_name);
  LLVMBuildCondBr(c->B, LLVMBuildICmp(c->B, LLVMIntSLT, next, hi, "more"), L->header, exit);
  LLVMAddIncoming(L->iv, &next, &latch, 1);
  LLVMPositionBuilderAtEnd(c->B, exit);
}

/* Asks the optimizer to unroll the loop just closed (its back edge is the
 * terminator of the block before the insertion block) count times. */
void rl_unroll_last_loop(rctx *c, LLVMBasicBlockRef latch, unsigned count) {
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
void rl_no_vectorize_loop(rctx *c, LLVMBasicBlockRef latch) {
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

LLVMValueRef rl_smin(rctx *c, LLVMValueRef a, LLVMValueRef b, const char *name) {
  return LLVMBuildSelect(c->B, LLVMBuildICmp(c->B, LLVMIntSLT, a, b, ""), a, b, name);
}

/* ---- function skeleton -------------------------------------------------- */

LLVMValueRef rl_begin_function(rctx *c, const char *name, LLVMValueRef *begin, LLVMValueRef *end,
                               LLVMValueRef *ws, LLVMBasicBlockRef *done) {
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
  LLVMBasicBlockRef entry = rl_new_block(c, "entry");
  LLVMPositionBuilderAtEnd(c->B, entry);
  unsigned md_inv = LLVMGetMDKindIDInContext(c->C, "invariant.load", 14);
  unsigned md_nonnull = LLVMGetMDKindIDInContext(c->C, "nonnull", 7);
  LLVMValueRef empty = LLVMMetadataAsValue(c->C, LLVMMDNodeInContext2(c->C, NULL, 0));
  for (int i = 0; i < c->k->n_buffers; i++) {
    char nm[32];
    snprintf(nm, sizeof nm, "buf%d", i);
    LLVMValueRef idx = rl_ci64(c, i);
    LLVMValueRef p = LLVMBuildInBoundsGEP2(c->B, c->ptr, bufs, &idx, 1, "");
    LLVMValueRef b = LLVMBuildLoad2(c->B, c->ptr, p, nm);
    LLVMSetMetadata(b, md_inv, empty);
    LLVMSetMetadata(b, md_nonnull, empty);
    c->bases[i] = b;
  }
  LLVMBasicBlockRef body = rl_new_block(c, "work");
  *done = rl_new_block(c, "done");
  LLVMBuildCondBr(c->B, LLVMBuildICmp(c->B, LLVMIntSLT, *begin, *end, "any"), body, *done);
  LLVMPositionBuilderAtEnd(c->B, body);
  return fn;
}

/* Ends the function begin_function opened: the body falls through to done. */
void rl_end_function(rctx *c, LLVMBasicBlockRef done) {
  LLVMBuildBr(c->B, done);
  LLVMPositionBuilderAtEnd(c->B, done);
  LLVMBuildRetVoid(c->B);
}

/* An expression memo for every stage of a span (NULL when out of memory: the
 * error is recorded in c). */
LLVMValueRef *rl_span_memo(rctx *c, int first, int span) {
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
void rl_emit_stores(rctx *c) {
  const cm_kstage *s = c->s;
  LLVMValueRef vals[CM_KMAX_STORES], idxs[CM_KMAX_STORES];
  rl_reset_memo(c);
  for (int i = 0; i < s->n_stores && !c->failed; i++) {
    vals[i] = rl_emit(c, s->stores[i].value);
    idxs[i] =
        rl_convert(c, rl_emit(c, s->stores[i].index), s->exprs[s->stores[i].index].dtype, CM_I64);
  }
  for (int i = 0; i < s->n_stores && !c->failed; i++)
    rl_store_buf(c, s->stores[i].buf, idxs[i], vals[i], s->exprs[s->stores[i].value].dtype,
                 s->accumulate);
}

void rl_set_fast(LLVMValueRef v) {
  LLVMSetFastMathFlags(v, LLVMFastMathAllowReassoc | LLVMFastMathNoSignedZeros);
}

/* The reduction nest over vars n_dom.. ; returns the accumulated value (acc_dtype). */
LLVMValueRef rl_emit_reduction(rctx *c) {
  const cm_kstage *s = c->s;
  cm_dtype at = s->acc_dtype;
  LLVMTypeRef t = rl_val_type(c, at);
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
    L[r] = rl_loop_begin(c, nm, rl_ci64(c, 0));
    phis[r] = LLVMBuildPhi(c->B, t, "acc");
    LLVMAddIncoming(phis[r], &cur, &pre, 1);
    cur = phis[r];
    c->vars[s->n_dom + r] = L[r].iv;
  }
  rl_reset_memo(c);
  LLVMValueRef v = rl_convert(c, rl_emit(c, s->body), s->exprs[s->body].dtype, at);
  LLVMValueRef nv;
  if (!mx) {
    nv = fp ? LLVMBuildFAdd(c->B, cur, v, "sum") : LLVMBuildAdd(c->B, cur, v, "sum");
    if (fp) rl_set_fast(nv);
  } else if (fp) {
    LLVMValueRef args[2] = {cur, v};
    LLVMTypeRef tt = t;
    nv = rl_intrin(c, "llvm.maximum", &tt, 1, args, 2, "max");
  } else {
    nv = LLVMBuildSelect(c->B, LLVMBuildICmp(c->B, LLVMIntSGT, v, cur, ""), v, cur, "max");
  }
  for (int r = s->n_red - 1; r >= 0; r--) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d.exit", r);
    LLVMBasicBlockRef latch = LLVMGetInsertBlock(c->B);
    LLVMAddIncoming(phis[r], &nv, &latch, 1);
    rl_loop_end(c, &L[r], rl_ci64(c, s->red[r]), nm);
    c->vars[s->n_dom + r] = NULL;
  }
  return nv;
}

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
    if (!rl_lin_coef(s, x->a, dv, &cd) || cd != 1 || (rl_lin_coef(s, x->a, rv, &cr) && cr == 1))
      other = true;
    else
      along_d = true;
  }
  free(seen);
  return along_d && !other;
}

/* acc op v for the stage's reduction (acc_dtype values). */
LLVMValueRef rl_reduce_step(rctx *c, LLVMValueRef cur, LLVMValueRef v) {
  cm_dtype at = c->s->acc_dtype;
  bool fp = is_fp(at);
  if (c->s->red_op != CM_KRED_MAX) {
    LLVMValueRef nv = fp ? LLVMBuildFAdd(c->B, cur, v, "sum") : LLVMBuildAdd(c->B, cur, v, "sum");
    if (fp) rl_set_fast(nv);
    return nv;
  }
  if (fp) {
    LLVMValueRef args[2] = {cur, v};
    LLVMTypeRef tt = LLVMTypeOf(cur);
    return rl_intrin(c, "llvm.maximum", &tt, 1, args, 2, "max");
  }
  return LLVMBuildSelect(c->B, LLVMBuildICmp(c->B, LLVMIntSGT, v, cur, ""), v, cur, "max");
}

LLVMValueRef rl_reduce_init(rctx *c) {
  cm_dtype at = c->s->acc_dtype;
  LLVMTypeRef t = rl_val_type(c, at);
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
  LLVMValueRef fn = rl_begin_function(c, fname, &begin, &end, &ws, &done);
  stage_scopes(c);
  int nd = s->n_dom, dv = nd - 1;
  int64_t D = s->dom[dv];
  /* f32 sums accumulate in double here: a column sums one row at a time (no
     vector of partial sums as a row reduction has), over thousands of rows */
  bool wide = s->red_op == CM_KRED_SUM && is_fp(s->acc_dtype) && s->acc_dtype != CM_F64;
  LLVMTypeRef at = wide ? c->f64 : rl_val_type(c, s->acc_dtype);
  LLVMTypeRef arr_t = LLVMArrayType2(at, (uint64_t)CR_TILE);
  LLVMBasicBlockRef here = LLVMGetInsertBlock(B);
  LLVMBasicBlockRef entry = LLVMGetEntryBasicBlock(fn);
  LLVMPositionBuilderBefore(B, LLVMGetBasicBlockTerminator(entry));
  LLVMValueRef arr = LLVMBuildAlloca(B, arr_t, "colacc");
  LLVMSetAlignment(arr, 64);
  LLVMPositionBuilderAtEnd(B, here);

  loop Wl = rl_loop_begin(c, "cw", begin);
  LLVMValueRef rest = Wl.iv;
  for (int v = nd - 1; v >= 0; v--) {
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(B, rest, rl_ci64(c, s->dom[v]), "cv");
      rest = LLVMBuildSDiv(B, rest, rl_ci64(c, s->dom[v]), "");
    }
  }
  LLVMValueRef d0 = c->vars[dv];
  LLVMValueRef len = rl_smin(c, LLVMBuildSub(B, end, Wl.iv, ""), rl_ci64(c, CR_TILE), "");
  len = rl_smin(c, len, LLVMBuildSub(B, rl_ci64(c, D), d0, ""), "runlen");
#define ACC_PTR(j) LLVMBuildInBoundsGEP2(B, at, arr, &(j), 1, "accp")
  loop Li = rl_loop_begin(c, "cinit", rl_ci64(c, 0));
  LLVMBuildStore(B, wide ? LLVMConstReal(c->f64, 0) : rl_reduce_init(c), ACC_PTR(Li.iv));
  rl_loop_end(c, &Li, len, "cinit.exit");

  loop L[CM_KMAX_VARS];
  for (int r = 0; r < s->n_red; r++) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d", r);
    L[r] = rl_loop_begin(c, nm, rl_ci64(c, 0));
    c->vars[nd + r] = L[r].iv;
  }
  loop Lj = rl_loop_begin(c, "col", rl_ci64(c, 0));
  c->vars[dv] = LLVMBuildAdd(B, d0, Lj.iv, "vcol");
  rl_reset_memo(c);
  LLVMValueRef v = rl_convert(c, rl_emit(c, s->body), s->exprs[s->body].dtype, s->acc_dtype);
  if (wide) v = LLVMBuildFPExt(B, v, c->f64, "");
  LLVMValueRef p = ACC_PTR(Lj.iv);
  LLVMValueRef cur = LLVMBuildLoad2(B, at, p, "acc");
  LLVMBuildStore(B, rl_reduce_step(c, cur, v), p);
  rl_loop_end(c, &Lj, len, "col.exit");
  for (int r = s->n_red - 1; r >= 0; r--) {
    char nm[32];
    snprintf(nm, sizeof nm, "r%d.exit", r);
    rl_loop_end(c, &L[r], rl_ci64(c, s->red[r]), nm);
    c->vars[nd + r] = NULL;
  }

  loop Ls = rl_loop_begin(c, "cstore", rl_ci64(c, 0));
  c->vars[dv] = LLVMBuildAdd(B, d0, Ls.iv, "vcol");
  c->acc = LLVMBuildLoad2(B, at, ACC_PTR(Ls.iv), "acc");
  if (wide) c->acc = LLVMBuildFPTrunc(B, c->acc, c->f32, "");
  rl_emit_stores(c);
  rl_loop_end(c, &Ls, len, "cstore.exit");
#undef ACC_PTR
  /* the next run starts after this one */
  LLVMValueRef next = LLVMBuildAdd(B, Wl.iv, len, "cnext");
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  LLVMBasicBlockRef wexit = rl_new_block(c, "cw.exit");
  LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSLT, next, end, ""), Wl.header, wexit);
  LLVMAddIncoming(Wl.iv, &next, &latch, 1);
  LLVMPositionBuilderAtEnd(B, wexit);
  rl_end_function(c, done);
  free_scopes(c);
}

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
  LLVMMetadataRef dom = rl_self_md(c, NULL);
  for (int i = 0; i < used; i++) sc[i] = rl_self_md(c, dom);
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
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  stage_scopes(c);
  int nd = s->n_dom, dv = nd - 1;
  loop W = rl_loop_begin(c, "w", begin);
  LLVMValueRef rest = W.iv;
  for (int v = nd - 1; v >= 0; v--) {
    char nm[16];
    snprintf(nm, sizeof nm, "v%d", v);
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(B, rest, rl_ci64(c, s->dom[v]), nm);
      rest = LLVMBuildSDiv(B, rest, rl_ci64(c, s->dom[v]), "");
    }
  }
  LLVMValueRef d0 = c->vars[dv];
  LLVMValueRef len = rl_smin(c, LLVMBuildSub(B, end, W.iv, ""),
                             LLVMBuildSub(B, rl_ci64(c, s->dom[dv]), d0, ""), "runlen");
  loop R = rl_loop_begin(c, "run", rl_ci64(c, 0));
  c->vars[dv] = LLVMBuildAdd(B, d0, R.iv, "vrun");
  c->acc = NULL;
  rl_emit_stores(c);
  rl_loop_end(c, &R, len, "run.exit");
  LLVMValueRef next = LLVMBuildAdd(B, W.iv, len, "wnext");
  LLVMBasicBlockRef latch = LLVMGetInsertBlock(B);
  LLVMBasicBlockRef wexit = rl_new_block(c, "w.exit");
  LLVMBuildCondBr(B, LLVMBuildICmp(B, LLVMIntSLT, next, end, ""), W.header, wexit);
  LLVMAddIncoming(W.iv, &next, &latch, 1);
  LLVMPositionBuilderAtEnd(B, wexit);
  rl_end_function(c, done);
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
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  /* not for reductions: their loops have no stores, and the scopes only move LLVM's
     choice of how to sum (the order of an f32 sum, which a step's tiny, cancelling
     gradients amplify past the f32 oracle's rounding) */
  if (s->n_red == 0) stage_scopes(c);
  c->select_branches = s->n_red == 0 && np < s->n_dom && !s->accumulate;
  c->inner_var = s->n_dom - 1;
  loop W = rl_loop_begin(c, "w", begin);
  /* work item -> parallel vars, row-major */
  LLVMValueRef rest = W.iv;
  for (int v = np - 1; v >= 0; v--) {
    char nm[16];
    snprintf(nm, sizeof nm, "v%d", v);
    if (v == 0) {
      c->vars[v] = rest;
    } else {
      c->vars[v] = LLVMBuildSRem(c->B, rest, rl_ci64(c, s->dom[v]), nm);
      rest = LLVMBuildSDiv(c->B, rest, rl_ci64(c, s->dom[v]), "");
    }
  }
  loop L[CM_KMAX_VARS];
  for (int v = np; v < s->n_dom; v++) {
    char nm[16];
    snprintf(nm, sizeof nm, "v%d", v);
    L[v] = rl_loop_begin(c, nm, rl_ci64(c, 0));
    c->vars[v] = L[v].iv;
  }
  c->acc = s->n_red > 0 ? rl_emit_reduction(c) : NULL;
  rl_emit_stores(c);
  for (int v = s->n_dom - 1; v >= np; v--) {
    char nm[24];
    snprintf(nm, sizeof nm, "v%d.exit", v);
    rl_loop_end(c, &L[v], rl_ci64(c, s->dom[v]), nm);
  }
  rl_loop_end(c, &W, end, "w.exit");
  rl_end_function(c, done);
  free_scopes(c);
  c->select_branches = false;
}

static void render_nothing(rctx *c, const char *fname) {
  LLVMValueRef begin, end, ws;
  LLVMBasicBlockRef done;
  rl_begin_function(c, fname, &begin, &end, &ws, &done);
  rl_end_function(c, done);
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
  c.dot_bf16 = target->kind == CM_TARGET_CPU && target->cpu.dot_bf16 && c.W == 16;
  const char *bf = strstr(target->cpu.features, "+avx512bf16");
  c.dot_native = c.dot_bf16 && bf && (bf[11] == ',' || bf[11] == 0);
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
    int span = tmpl_on && (fwd || bwd) ? rl_render_attention_span(&c, si, fname) : 0;
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
      rl_render_gemm(&c, fname, &g);
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
