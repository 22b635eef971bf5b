/* tests/unit/test_kernel.c — the kernel IR (codegen/kernel.c): builders' folding, the reference
 * interpreter on hand-built kernels checked against plain C, the verifier's rules, and the
 * printer. */
#include "codegen/codegen.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>

static test_rng rng = {0x9E3779B97F4A7C15u};
static double urand(void) { /* in [-1, 1) */
  return test_uniform(&rng) * 2.0 - 1.0;
}

/* x[i*c + j] -> exp(x) * 2 + y[j] over a 7 x 13 domain */
static void test_elementwise(void) {
  enum { R = 7, C = 13 };
  float x[R * C], y[C], o[R * C];
  for (int i = 0; i < R * C; i++) x[i] = (float)urand();
  for (int i = 0; i < C; i++) y[i] = (float)urand();
  cm_kernel k;
  cm_kernel_init(&k, "k_ew");
  int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, R * C, 0, 0);
  int by = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, C, 1, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, R * C, 2, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "ew");
  s->n_dom = 2, s->dom[0] = R, s->dom[1] = C, s->n_parallel = 1;
  int i = cm_kx_var(s, 0), j = cm_kx_var(s, 1);
  int idx = cm_kx_iadd(s, cm_kx_imul(s, i, cm_kx_iconst(s, C)), j);
  int e = cm_kx_op(s, CM_OP_EXP, CM_F32, cm_kx_load(s, &k, bx, idx), -1, -1);
  e = cm_kx_op(s, CM_OP_MUL, CM_F32, e, cm_kx_const(s, CM_F32, 2), -1);
  e = cm_kx_op(s, CM_OP_ADD, CM_F32, e, cm_kx_load(s, &k, by, j), -1);
  s->stores[s->n_stores++] = (cm_kstore){bo, idx, e};
  cm_err err = {0};
  void *bufs[3] = {x, y, o};
  CHECK_MSG(cm_kernel_interpret(&k, bufs, &err) == CM_OK, "%s", err.msg);
  int bad = 0;
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      float want =
          (float)((double)(float)((double)(float)exp((double)x[r * C + c]) * 2.0) + (double)y[c]);
      if (o[r * C + c] != want) bad++;
    }
  CHECK(bad == 0);
  CHECK(cm_kstage_work_items(&k.stages[0]) == R);
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  cm_kernel_print(&k, f);
  fclose(f);
  CHECK_STR_CONTAINS(text, "= i64 var v1");
  CHECK_STR_CONTAINS(text, "= f32 load b0[%");
  CHECK_STR_CONTAINS(text, "store b2[%");
  CHECK_STR_CONTAINS(text, "= f32 add %");
  free(text);
  /* out-of-bounds load: shrink x's numel */
  k.buffers[bx].numel = R * C - 1;
  CHECK(cm_kernel_interpret(&k, bufs, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "out of bounds");
  CHECK_STR_CONTAINS(err.msg, "stage 0 (ew)");
  cm_kernel_free(&k);
}

/* sum and max over axes 0 and 2 of a 5 x 3 x 11 tensor */
static void test_reduce(void) {
  enum { A = 5, B = 3, C = 11 };
  float x[A * B * C], osum[B], omax[B];
  for (int i = 0; i < A * B * C; i++) x[i] = (float)urand();
  for (int op = 0; op < 2; op++) {
    cm_kernel k;
    cm_kernel_init(&k, "k_red");
    int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, A * B * C, 0, 0);
    int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, B, 1, 0);
    cm_kstage *s = cm_kernel_add_stage(&k, "red");
    s->n_dom = 1, s->dom[0] = B, s->n_red = 2, s->red[0] = A, s->red[1] = C;
    s->red_op = op ? CM_KRED_MAX : CM_KRED_SUM;
    int b = cm_kx_var(s, 0), a = cm_kx_var(s, 1), c = cm_kx_var(s, 2);
    int idx = cm_kx_iadd(
        s,
        cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, a, cm_kx_iconst(s, B)), b), cm_kx_iconst(s, C)),
        c);
    s->body = cm_kx_load(s, &k, bx, idx);
    s->stores[s->n_stores++] = (cm_kstore){bo, b, cm_kx_acc(s)};
    cm_err err = {0};
    void *bufs[2] = {x, op ? omax : osum};
    CHECK_MSG(cm_kernel_interpret(&k, bufs, &err) == CM_OK, "%s", err.msg);
    for (int bb = 0; bb < B; bb++) {
      float acc = op ? -INFINITY : 0.0f;
      for (int aa = 0; aa < A; aa++)
        for (int cc = 0; cc < C; cc++) {
          float v = x[(aa * B + bb) * C + cc];
          acc = op ? (v > acc ? v : acc) : acc + v;
        }
      CHECK(((float *)bufs[1])[bb] == acc);
    }
    cm_kernel_free(&k);
  }
}

/* C[i,j] = relu(sum_k A[i,k] * B^T[j,k] + bias[j]) as a GEMM stage */
static void test_gemm(void) {
  enum { M = 7, N = 5, K = 13 };
  float A[M * K], Bt[N * K], bias[N], Cm[M * N];
  for (int i = 0; i < M * K; i++) A[i] = (float)urand();
  for (int i = 0; i < N * K; i++) Bt[i] = (float)urand();
  for (int i = 0; i < N; i++) bias[i] = (float)urand();
  cm_kernel k;
  cm_kernel_init(&k, "k_mm");
  int ba = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, M * K, 0, 0);
  int bb = cm_kernel_add_buffer(&k, CM_KBUF_SOURCE, CM_F32, N * K, 1, 0);
  int bz = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, N, 2, 0);
  int bc = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, M * N, 3, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "mm");
  s->n_dom = 2, s->dom[0] = M, s->dom[1] = N, s->n_red = 1, s->red[0] = K;
  s->tmpl = CM_KT_GEMM;
  s->tiles = (cm_kgemm_tiles){4, 4, 8, 2, 4};
  int i = cm_kx_var(s, 0), j = cm_kx_var(s, 1), kk = cm_kx_var(s, 2);
  s->gemm_a = cm_kx_load(s, &k, ba, cm_kx_iadd(s, cm_kx_imul(s, i, cm_kx_iconst(s, K)), kk));
  s->gemm_b = cm_kx_load(s, &k, bb, cm_kx_iadd(s, cm_kx_imul(s, j, cm_kx_iconst(s, K)), kk));
  s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, s->gemm_a, s->gemm_b, -1);
  int v = cm_kx_op(s, CM_OP_ADD, CM_F32, cm_kx_acc(s), cm_kx_load(s, &k, bz, j), -1);
  v = cm_kx_op(s, CM_OP_RELU, CM_F32, v, -1, -1);
  s->stores[s->n_stores++] =
      (cm_kstore){bc, cm_kx_iadd(s, cm_kx_imul(s, i, cm_kx_iconst(s, N)), j), v};
  cm_err err = {0};
  CHECK_MSG(cm_kernel_verify(&k, &err) == CM_OK, "%s", err.msg);
  void *bufs[4] = {A, Bt, bias, Cm};
  CHECK_MSG(cm_kernel_interpret(&k, bufs, &err) == CM_OK, "%s", err.msg);
  int bad = 0;
  for (int r = 0; r < M; r++)
    for (int c = 0; c < N; c++) {
      float acc = 0;
      for (int q = 0; q < K; q++) acc += (float)((double)A[r * K + q] * Bt[c * K + q]);
      float want = acc + bias[c];
      want = want > 0 ? want : 0;
      if (Cm[r * N + c] != want) bad++;
    }
  CHECK(bad == 0);
  CHECK(cm_kstage_work_items(&k.stages[0]) == 2 * 2);
  /* packed A 4 x 8, packed B 8 x 4 for each of the 2 kc slices of K = 13, the C tile 4 x 4 */
  CHECK(cm_kstage_workspace_bytes(&k.stages[0], CM_TARGET_CPU) == 128 + 2 * 128 + 64 + 64);
  CHECK(cm_kstage_workspace_bytes(&k.stages[0], CM_TARGET_CUDA) == 0);
  /* GEMM rule: gemm_a must not use j */
  int save_a = s->gemm_a, save_body = s->body;
  s->gemm_a =
      cm_kx_op(s, CM_OP_ADD, CM_F32, save_a, cm_kx_op(s, CM_OP_CAST, CM_F32, j, -1, -1), -1);
  s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, s->gemm_a, s->gemm_b, -1);
  CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "gemm_a uses a var");
  s->gemm_a = save_a, s->body = save_body;
  CHECK_MSG(cm_kernel_verify(&k, &err) == CM_OK, "%s", err.msg);
  s->tiles.mc = 5;
  CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "mc % mr");
  s->tiles.mc = 4;
  s->exprs[s->body].b = s->gemm_a, s->exprs[s->body].a = s->gemm_b;
  CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "MUL(gemm_a, gemm_b)");
  cm_kernel_free(&k);
}

/* stage 0: scratch t[i] = x[i] * 3 (i32); stage 1: out[idx[i]] += t[i] (scatter add) */
static void test_scratch_accumulate(void) {
  enum { N = 17, O = 5 };
  int32_t x[N], idx[N], out[O] = {0}, want[O] = {0};
  int64_t scratch[N];
  for (int i = 0; i < N; i++) {
    x[i] = (int32_t)(urand() * 1000);
    idx[i] = (int32_t)((urand() + 1) * 2.5);
    want[idx[i]] += x[i] * 3;
  }
  cm_kernel k;
  cm_kernel_init(&k, "k_sc");
  k.scratch_bytes = N * 8;
  int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, N, 0, 0);
  int bi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, N, 1, 0);
  int bt = cm_kernel_add_buffer(&k, CM_KBUF_SCRATCH, CM_I64, N, -1, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, O, 2, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "mul");
  s->n_dom = 1, s->dom[0] = N, s->n_parallel = 1;
  int i = cm_kx_var(s, 0);
  int v = cm_kx_op(s, CM_OP_CAST, CM_I64, cm_kx_load(s, &k, bx, i), -1, -1);
  s->stores[s->n_stores++] = (cm_kstore){bt, i, cm_kx_imul(s, v, cm_kx_iconst(s, 3))};
  s = cm_kernel_add_stage(&k, "scatter");
  s->n_dom = 1, s->dom[0] = N, s->accumulate = true;
  i = cm_kx_var(s, 0);
  int t = cm_kx_op(s, CM_OP_CAST, CM_I64, cm_kx_load(s, &k, bi, i), -1, -1);
  s->stores[s->n_stores++] = (cm_kstore){bo, t, cm_kx_load(s, &k, bt, i)};
  cm_err err = {0};
  void *bufs[4] = {x, idx, scratch, out};
  CHECK_MSG(cm_kernel_interpret(&k, bufs, &err) == CM_OK, "%s", err.msg);
  for (int o = 0; o < O; o++) CHECK(out[o] == want[o]);
  s->n_parallel = 1;
  CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "accumulate");
  s->n_parallel = 0;
  k.scratch_bytes = N * 8 - 1;
  CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "scratch_bytes");
  cm_kernel_free(&k);
}

/* bf16 mul, f16 add, i32 wrap, bool compare + select */
static void test_dtypes(void) {
  enum { N = 23 };
  uint16_t a[N], h[N], ob[N], oh[N];
  int32_t ia[N], oi[N];
  uint8_t ol[N];
  for (int i = 0; i < N; i++) {
    a[i] = cm_f64_to_bf16(urand() * 4);
    h[i] = cm_f64_to_f16(urand() * 4);
    ia[i] = (int32_t)(urand() * 2147483647.0);
  }
  cm_kernel k;
  cm_kernel_init(&k, "k_dt");
  int ba = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BF16, N, 0, 0);
  int bh = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F16, N, 1, 0);
  int bia = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, N, 2, 0);
  int bob = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BF16, N, 3, 0);
  int boh = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F16, N, 4, 0);
  int boi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_I32, N, 5, 0);
  int bol = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BOOL, N, 6, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "dt");
  s->n_dom = 1, s->dom[0] = N;
  int i = cm_kx_var(s, 0);
  int la = cm_kx_load(s, &k, ba, i), lh = cm_kx_load(s, &k, bh, i), li = cm_kx_load(s, &k, bia, i);
  int vb = cm_kx_op(s, CM_OP_MUL, CM_BF16, la, cm_kx_const(s, CM_BF16, 3.0), -1);
  vb = cm_kx_op(s, CM_OP_ADD, CM_BF16, vb, la, -1);
  int vh = cm_kx_op(s, CM_OP_ADD, CM_F16, lh, cm_kx_const(s, CM_F16, 0.1), -1);
  int vi = cm_kx_op(s, CM_OP_MUL, CM_I32, li, cm_kx_const(s, CM_I32, 7), -1);
  int lt = cm_kx_op(s, CM_OP_LT, CM_BOOL, vh, cm_kx_op(s, CM_OP_CAST, CM_F16, vb, -1, -1), -1);
  int sel = cm_kx_op(s, CM_OP_SELECT, CM_I32, lt, vi, li);
  s->stores[s->n_stores++] = (cm_kstore){bob, i, vb};
  s->stores[s->n_stores++] = (cm_kstore){boh, i, vh};
  s->stores[s->n_stores++] = (cm_kstore){boi, i, sel};
  s->stores[s->n_stores++] = (cm_kstore){bol, i, lt};
  cm_err err = {0};
  void *bufs[7] = {a, h, ia, ob, oh, oi, ol};
  CHECK_MSG(cm_kernel_interpret(&k, bufs, &err) == CM_OK, "%s", err.msg);
  int bad = 0;
  for (int q = 0; q < N; q++) {
    double x = cm_bf16_to_f32(a[q]);
    double wb = cm_round_to_dtype(cm_round_to_dtype(x * 3, CM_BF16) + x, CM_BF16);
    double wh = cm_round_to_dtype(cm_f16_to_f32(h[q]) + cm_round_to_dtype(0.1, CM_F16), CM_F16);
    int32_t wi = (int32_t)(uint32_t)((uint64_t)(int64_t)ia[q] * 7u);
    bool l = wh < cm_round_to_dtype(wb, CM_F16);
    if (cm_bf16_to_f32(ob[q]) != wb || cm_f16_to_f32(oh[q]) != wh || ol[q] != l ||
        oi[q] != (l ? wi : ia[q]))
      bad++;
  }
  CHECK(bad == 0);
  /* dtype rules */
  s->exprs[vh].b = la; /* a bf16 operand in an f16 add */
  CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "dtype mismatch");
  cm_kernel_free(&k);
}

static void test_folding(void) {
  cm_kernel k;
  cm_kernel_init(&k, "k_f");
  cm_kstage *s = cm_kernel_add_stage(&k, "f");
  double v;
  CHECK(cm_kx_is_const(s, cm_kx_iadd(s, cm_kx_iconst(s, 5), cm_kx_iconst(s, 7)), &v) && v == 12);
  CHECK(cm_kx_is_const(s, cm_kx_imul(s, cm_kx_iconst(s, 5), cm_kx_iconst(s, -7)), &v) && v == -35);
  CHECK(cm_kx_is_const(s, cm_kx_idiv(s, cm_kx_iconst(s, -7), cm_kx_iconst(s, 2)), &v) && v == -3);
  CHECK(cm_kx_is_const(s, cm_kx_imod(s, cm_kx_iconst(s, -7), cm_kx_iconst(s, 2)), &v) && v == -1);
  int x = cm_kx_var(s, 0);
  CHECK(cm_kx_iadd(s, x, cm_kx_iconst(s, 0)) == x);
  CHECK(cm_kx_imul(s, cm_kx_iconst(s, 1), x) == x);
  CHECK(cm_kx_is_const(s, cm_kx_imul(s, x, cm_kx_iconst(s, 0)), &v) && v == 0);
  CHECK(cm_kx_idiv(s, x, cm_kx_iconst(s, 1)) == x);
  CHECK(cm_kx_is_const(s, cm_kx_imod(s, x, cm_kx_iconst(s, 1)), &v) && v == 0);
  cm_kernel_free(&k);
}

/* one small valid kernel, broken one rule at a time */
static void test_verify_rules(void) {
  cm_err err;
  struct {
    int which;
    const char *want;
  } cases[] = {{0, "out of range"},           {1, "SELECT cond must be bool"},
               {2, "var 5 out of range"},     {3, "reduction var used outside body"},
               {4, "ACC used only in store"}, {5, "nonexistent buffer"},
               {6, "CONST buffer"},           {7, "exceeds CM_KMAX_VARS"},
               {8, "must be >= 1"},           {9, "n_parallel"},
               {10, "index must be i64"},     {11, "ACC used in a stage without reduction"},
               {12, "GEMM needs SUM"}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    cm_kernel k;
    cm_kernel_init(&k, "k_v");
    int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 12, 0, 0);
    int bc = cm_kernel_add_buffer(&k, CM_KBUF_CONST, CM_F32, 3, 1, 0);
    int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 3, 2, 0);
    cm_kstage *s = cm_kernel_add_stage(&k, "v");
    s->n_dom = 1, s->dom[0] = 3, s->n_red = 1, s->red[0] = 4;
    int i = cm_kx_var(s, 0), r = cm_kx_var(s, 1);
    int ld = cm_kx_load(s, &k, bx, cm_kx_iadd(s, cm_kx_imul(s, i, cm_kx_iconst(s, 4)), r));
    s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, ld, cm_kx_load(s, &k, bc, i), -1);
    int acc = cm_kx_acc(s);
    s->stores[s->n_stores++] = (cm_kstore){bo, i, acc};
    CHECK_MSG(cm_kernel_verify(&k, &err) == CM_OK, "%s", err.msg);
    switch (cases[c].which) {
    case 0: s->exprs[s->body].b = s->body; break;
    case 1: s->stores[0].value = cm_kx_op(s, CM_OP_SELECT, CM_F32, acc, acc, acc); break;
    case 2: s->exprs[r].var = 5; break;
    case 3: s->stores[0].value = cm_kx_op(s, CM_OP_CAST, CM_F32, r, -1, -1); break;
    case 4: s->body = cm_kx_op(s, CM_OP_ADD, CM_F32, s->body, acc, -1); break;
    case 5: s->stores[0].buf = 9; break;
    case 6: s->stores[0].buf = bc; break;
    case 7: s->n_dom = 12; break;
    case 8: s->red[0] = 0; break;
    case 9: s->n_parallel = 2; break;
    case 10: s->stores[0].index = acc; break;
    case 11:
      s->n_red = 0;
      s->body = -1;
      s->n_dom = 2, s->dom[1] = 4;
      break;
    case 12:
      s->tmpl = CM_KT_GEMM;
      s->n_dom = 2, s->dom[1] = 1, s->red_op = CM_KRED_MAX;
      break;
    }
    CHECK(cm_kernel_verify(&k, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, cases[c].want);
    CHECK_STR_CONTAINS(err.msg, "kernel k_v stage 0 (v)");
    cm_kernel_free(&k);
  }
}

/* const data converted to the buffer's dtype (explicit data and a fill) */
static void test_const_data(void) {
  cm_graph *g = cm_graph_new();
  double d[5] = {1.5, -2.25, 3.0000001, 1e10, -0.7};
  int64_t dims[1] = {5};
  int n1 = cm_const_data(g, "c", CM_F64, 1, dims, d);
  int n2 = cm_const_fill(g, "f", CM_F64, 1, dims, 2.7);
  cm_kbuffer b = {CM_KBUF_CONST, CM_BF16, 5, n1, 0, true, false};
  cm_err err = {0};
  uint16_t *h = cm_kernel_const_data(g, &b, &err);
  CHECK_MSG(h != NULL, "%s", err.msg);
  for (int i = 0; h && i < 5; i++) CHECK(cm_bf16_to_f32(h[i]) == cm_round_to_dtype(d[i], CM_BF16));
  free(h);
  b.dtype = CM_I32, b.node = n2;
  int32_t *q = cm_kernel_const_data(g, &b, &err);
  CHECK_MSG(q != NULL, "%s", err.msg);
  for (int i = 0; q && i < 5; i++) CHECK(q[i] == 2);
  free(q);
  b.numel = 4, b.node = n1;
  CHECK(cm_kernel_const_data(g, &b, &err) == NULL && err.status == CM_EINVALID);
  cm_graph_free(g);
}

TEST_MAIN({"const_data", test_const_data}, {"elementwise", test_elementwise},
          {"reduce", test_reduce}, {"gemm", test_gemm},
          {"scratch_accumulate", test_scratch_accumulate}, {"dtypes", test_dtypes},
          {"folding", test_folding}, {"verify_rules", test_verify_rules})
