/* tests/unit/test_vmath.c — the LLVM renderer's inline f32 exp, log, tanh and
 * erf (codegen/render_llvm.c) against the oracle's double-precision libm
 * rounded to f32: a sweep over every 512th float of both signs plus the edges
 * (zeros, denormals, FLT_MAX, infinities, NaN, the branch points), at most 2
 * ulp apart; the vectorized loop has no libm call left; and a column
 * reduction (sum over the leading axes) matches plain C at odd shapes. */
#include "codegen/codegen.h"
#include "tests/test.h"
#include "tests/testlib.h"
#include "tests/llvm_kernels.h"

#include <float.h>
#include <llvm-c/Core.h>
#include <stdint.h>

CM_NO_SANITIZE_FUNCTION static void run_split(cm_cpu_stage_fn f, char *const *bufs, int64_t n) {
  /* three ranges, like threads would get */
  f(bufs, 0, n / 3, NULL);
  f(bufs, n / 3, 2 * n / 3, NULL);
  f(bufs, 2 * n / 3, n, NULL);
}

static float bits_f(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}

/* ulp distance between two floats of the same sign region (NaN: 0 if both NaN) */
static int64_t ulps(float a, float b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b) ? 0 : INT64_MAX;
  if (a == b) return 0;
  int32_t ia, ib;
  memcpy(&ia, &a, 4);
  memcpy(&ib, &b, 4);
  int64_t oa = ia < 0 ? -(int64_t)(ia & 0x7fffffff) : ia,
          ob = ib < 0 ? -(int64_t)(ib & 0x7fffffff) : ib;
  return oa > ob ? oa - ob : ob - oa;
}

static const cm_op ops[4] = {CM_OP_EXP, CM_OP_LOG, CM_OP_TANH, CM_OP_ERF};

static double ref(cm_op op, double x) {
  switch (op) {
  case CM_OP_EXP: return exp(x);
  case CM_OP_LOG: return log(x);
  case CM_OP_TANH: return tanh(x);
  default: return erf(x);
  }
}

static void test_sweep(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  static const float edges[] = {
      0.0f,       -0.0f,     FLT_MIN,    -FLT_MIN,    1e-45f,      -1e-45f,  1e-40f,
      FLT_MAX,    -FLT_MAX,  INFINITY,   -INFINITY,   NAN,         88.7228f, 88.72284f,
      88.7229f,   -87.3365f, -103.972f,  -103.98f,    -104.5f,     0.55f,    -0.55f,
      0.5499999f, 1.0f,      -1.0f,      0.99999994f, 1.0000001f,  3.93f,    3.9299998f,
      -3.93f,     9.1f,      0.6931472f, 1.4142135f,  0.70710677f, 1e-30f,   1e30f};
  int64_t n_edges = (int64_t)(sizeof edges / sizeof *edges);
  int64_t n_sweep = 2 * (0x7f800000 / 512);
  int64_t n = n_edges + n_sweep;
  float *in = malloc(sizeof(float) * (size_t)n);
  float *out[4];
  for (int o = 0; o < 4; o++) out[o] = malloc(sizeof(float) * (size_t)n);
  memcpy(in, edges, sizeof edges);
  for (int64_t i = 0; i < n_sweep / 2; i++) {
    in[n_edges + 2 * i] = bits_f((uint32_t)(i * 512 + 37));
    in[n_edges + 2 * i + 1] = bits_f(0x80000000u | (uint32_t)(i * 512 + 101));
  }
  cm_kernel k;
  cm_kernel_init(&k, "kvmath");
  int bi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, n, -1, 0);
  int bo[4];
  for (int o = 0; o < 4; o++) bo[o] = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, n, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "math");
  s->n_dom = 1, s->dom[0] = n, s->n_parallel = 1, s->body = -1;
  int v = cm_kx_var(s, 0), x = cm_kx_load(s, &k, bi, v);
  for (int o = 0; o < 4; o++)
    s->stores[s->n_stores++] = (cm_kstore){bo[o], v, cm_kx_op(s, ops[o], CM_F32, x, -1, -1)};
  cm_cpu_stage_fn fn;
  if (test_jit_kernel(j, &k, NULL, &fn)) {
    char *bufs[5] = {(char *)in, (char *)out[0], (char *)out[1], (char *)out[2], (char *)out[3]};
    run_split(fn, bufs, n);
    for (int o = 0; o < 4; o++) {
      int64_t worst = 0, bad = 0;
      float worst_x = 0;
      for (int64_t i = 0; i < n; i++) {
        float want = (float)ref(ops[o], in[i]);
        int64_t d = ulps(out[o][i], want);
        if (d > worst) worst = d, worst_x = in[i];
        if (d > 2 && bad++ < 4)
          fprintf(stderr, "%s(%.9g): got %.9g want %.9g (%lld ulp)\n", cm_op_name(ops[o]),
                  (double)in[i], (double)out[o][i], (double)want, (long long)d);
      }
      printf("%-5s max %lld ulp (at %.9g) over %lld inputs\n", cm_op_name(ops[o]), (long long)worst,
             (double)worst_x, (long long)n);
      CHECK_MSG(bad == 0, "%s: %lld inputs beyond 2 ulp", cm_op_name(ops[o]), (long long)bad);
    }
    /* signed zeros kept where the oracle keeps them */
    CHECK(signbit(out[2][1]) && signbit(out[3][1]) && out[1][1] == -INFINITY);
  }
  cm_kernel_free(&k);
  free(in);
  for (int o = 0; o < 4; o++) free(out[o]);
  cm_jit_destroy(j);
}

/* GELU's shape: x * 0.5 * (1 + erf(x / sqrt 2)) and exp/tanh/log: no libm call left, and
 * vector fused multiply-adds in the loop. */
static void test_vectorized(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  cm_kernel k;
  cm_kernel_init(&k, "kgelu");
  int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 1000, -1, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 1000, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "gelu");
  s->n_dom = 1, s->dom[0] = 1000, s->n_parallel = 1, s->body = -1;
  int v = cm_kx_var(s, 0), x = cm_kx_load(s, &k, bx, v);
  int t = cm_kx_op(s, CM_OP_ERF, CM_F32, x, -1, -1);
  t = cm_kx_op(s, CM_OP_ADD, CM_F32, t, cm_kx_op(s, CM_OP_TANH, CM_F32, x, -1, -1), -1);
  t = cm_kx_op(s, CM_OP_ADD, CM_F32, t, cm_kx_op(s, CM_OP_EXP, CM_F32, x, -1, -1), -1);
  t = cm_kx_op(s, CM_OP_ADD, CM_F32, t, cm_kx_op(s, CM_OP_LOG, CM_F32, x, -1, -1), -1);
  s->stores[s->n_stores++] = (cm_kstore){bo, v, t};
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("asm", cm_jit_context(j));
  cm_err err = {0};
  cm_llvm_render_opts ro = {16, false, NULL};
  CHECK_MSG(cm_render_llvm(&k, m, &ro, &err) == CM_OK, "%s", err.msg);
  char *text = NULL;
  if (cm_jit_render(j, m, CM_JIT_TEXT_ASM, &text, &err) == CM_OK) {
    CHECK(test_count(text, "erff") == 0 && test_count(text, "tanhf") == 0 &&
          test_count(text, "expf") == 0 && test_count(text, "logf") == 0);
    CHECK_MSG(test_count(text, "zmm") > 20 || test_count(text, "ymm") > 20, "no vector code");
    free(text);
  } else {
    CHECK_MSG(false, "%s", err.msg);
  }
  LLVMDisposeModule(m);
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

/* out[j] = sum_{a,b} x[(a*B + b)*N + j] * y[...] + w[a*B + b] + x[j] for odd A, B, N
 * (a bias gradient's shape, with a per-row value as layernorm's gradient has), and max of
 * the same; runs of columns split across ranges. */
static void test_column_reduction(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  static const int64_t shapes[][3] = {
      {3, 5, 7}, {1, 1, 4}, {4, 13, 257}, {2, 65, 512}, {7, 3, 300}};
  test_rng rng = {12345};
  for (int sh = 0; sh < 5; sh++) {
    for (int mx = 0; mx < 2; mx++) {
      int64_t A = shapes[sh][0], Bn = shapes[sh][1], N = shapes[sh][2], tot = A * Bn * N;
      float *x = malloc(sizeof(float) * (size_t)tot), *y = malloc(sizeof(float) * (size_t)tot);
      float *out = malloc(sizeof(float) * (size_t)N);
      for (int64_t i = 0; i < tot; i++) {
        uint64_t bits = test_u64(&rng);
        x[i] = (float)((double)(bits >> 11) / 9007199254740992.0 * 4 - 2);
        y[i] = (float)((double)(bits & 0xffff) / 65536.0 - 0.5);
      }
      cm_kernel k;
      cm_kernel_init(&k, mx ? "kcolmax" : "kcolsum");
      char nm[32];
      snprintf(k.name, sizeof k.name, "kcol%d_%d", sh, mx);
      (void)nm;
      int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, tot, -1, 0);
      int by = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, tot, -1, 0);
      int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, N, -1, 0);
      cm_kstage *s = cm_kernel_add_stage(&k, "col");
      s->n_dom = 1, s->dom[0] = N, s->n_parallel = 1, s->n_red = 2, s->red[0] = A, s->red[1] = Bn;
      s->red_op = mx ? CM_KRED_MAX : CM_KRED_SUM;
      int jv = cm_kx_var(s, 0), a = cm_kx_var(s, 1), b = cm_kx_var(s, 2);
      int row = cm_kx_iadd(s, cm_kx_imul(s, a, cm_kx_iconst(s, Bn)), b);
      int idx = cm_kx_iadd(s, cm_kx_imul(s, row, cm_kx_iconst(s, N)), jv);
      s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, cm_kx_load(s, &k, bx, idx),
                         cm_kx_load(s, &k, by, idx), -1);
      s->body = cm_kx_op(s, CM_OP_ADD, CM_F32, s->body, cm_kx_load(s, &k, by, row), -1);
      s->stores[s->n_stores++] = (cm_kstore){
          bo, jv, cm_kx_op(s, CM_OP_ADD, CM_F32, cm_kx_acc(s), cm_kx_load(s, &k, bx, jv), -1)};
      cm_cpu_stage_fn fn;
      if (test_jit_kernel(j, &k, NULL, &fn)) {
        char *bufs[3] = {(char *)x, (char *)y, (char *)out};
        run_split(fn, bufs, N);
        int bad = 0;
        for (int64_t c = 0; c < N; c++) {
          double acc = mx ? -INFINITY : 0;
          for (int64_t r = 0; r < A * Bn; r++) {
            double p = (double)(x[r * N + c] * y[r * N + c] + y[r]);
            acc = mx ? (p > acc ? p : acc) : acc + p;
          }
          double want = acc + x[c];
          if (fabs(out[c] - want) > 1e-5 * (1 + fabs(want)) * (double)(A * Bn) && bad++ < 3)
            fprintf(stderr, "shape %d %s column %lld: got %.9g want %.9g\n", sh, mx ? "max" : "sum",
                    (long long)c, (double)out[c], want);
        }
        CHECK_MSG(bad == 0, "column reduction shape %d %s: %d wrong", sh, mx ? "max" : "sum", bad);
      }
      cm_kernel_free(&k);
      free(x), free(y), free(out);
    }
  }
  cm_jit_destroy(j);
}

TEST_MAIN({"sweep", test_sweep}, {"vectorized", test_vectorized},
          {"column_reduction", test_column_reduction})
