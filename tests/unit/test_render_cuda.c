/* tests/unit/test_render_cuda.c — the CUDA C renderer (codegen/render_cuda*.c): hand-built
 * kernels covering every elementwise op on every dtype, short and long reductions (both
 * strategies), accumulate stages, and GEMM stages (f32 FMA at odd shapes, bf16/f16 tensor
 * cores) all compiled by NVRTC for sm_80 and sm_90 in one source per arch; kernel names,
 * spills and registers from ptxas; launch shapes; determinism; errors; the stage plans
 * (cm_kcuda_plan: stored, printed, read by the renderer and the launch) of GEMM and attention
 * stages. No GPU: compile only. */
#include "codegen/codegen.h"
#include "models/models.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <math.h>
#include <stdio.h>

#include <stdint.h>

static const cm_dtype ALL[] = {CM_F32, CM_F64, CM_BF16, CM_F16, CM_I32, CM_I64, CM_BOOL};
#define N_ALL 7
#define EW_N 37

static test_rng rng = {0x9e3779b97f4a7c15ull};
static double rnd(void) { /* uniform in [-1, 1) */
  return test_uniform(&rng) * 2.0 - 1.0;
}

static bool is_flt(cm_dtype d) {
  return d == CM_F32 || d == CM_F64 || d == CM_BF16 || d == CM_F16;
}

/* Every elementwise op on every dtype it applies to: a stage per dtype (ops), a stage per
 * dtype (casts to every dtype, stored into a sink buffer of the target dtype). */
static void build_elementwise(cm_kernel *k) {
  cm_kernel_init(k, "t_ew");
  int in_a[N_ALL], in_b[N_ALL], out[N_ALL], sink[N_ALL];
  for (int d = 0; d < N_ALL; d++) {
    in_a[d] = cm_kernel_add_buffer(k, CM_KBUF_ARENA, ALL[d], EW_N, -1, 0);
    in_b[d] = cm_kernel_add_buffer(k, CM_KBUF_ARENA, ALL[d], EW_N, -1, 0);
    out[d] = cm_kernel_add_buffer(k, CM_KBUF_ARENA, ALL[d], EW_N * 32, -1, 0);
    sink[d] = cm_kernel_add_buffer(k, CM_KBUF_ARENA, ALL[d], EW_N * N_ALL, -1, 0);
  }
  int cond = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_BOOL, EW_N, -1, 0);
  for (int d = 0; d < N_ALL; d++) {
    cm_dtype dt = ALL[d];
    char name[32];
    snprintf(name, sizeof name, "ops_%s", cm_dtype_name(dt));
    cm_kstage *s = cm_kernel_add_stage(k, name);
    s->n_dom = 1;
    s->dom[0] = EW_N;
    s->n_parallel = 1;
    int v = cm_kx_var(s, 0);
    int a = cm_kx_load(s, k, in_a[d], v);
    /* b at a permuted index (v * 5 % 37) exercises MOD */
    int bi = cm_kx_imod(s, cm_kx_imul(s, v, cm_kx_iconst(s, 5)), cm_kx_iconst(s, EW_N));
    int b = cm_kx_load(s, k, in_b[d], bi);
    int c = cm_kx_load(s, k, cond, v);
    int vals[32], n = 0;
    if (dt != CM_BOOL) {
      static const cm_op unary[] = {CM_OP_NEG,  CM_OP_ABS,   CM_OP_EXP,          CM_OP_LOG,
                                    CM_OP_SQRT, CM_OP_RSQRT, CM_OP_RECIP,        CM_OP_TANH,
                                    CM_OP_ERF,  CM_OP_RELU,  CM_OP_STOP_GRADIENT};
      static const cm_op binary[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_DIV,
                                     CM_OP_MAX, CM_OP_MIN, CM_OP_POW};
      for (size_t i = 0; i < sizeof unary / sizeof unary[0]; i++)
        vals[n++] = cm_kx_op(s, unary[i], dt, a, -1, -1);
      for (size_t i = 0; i < sizeof binary / sizeof binary[0]; i++)
        vals[n++] = cm_kx_op(s, binary[i], dt, a, b, -1);
      /* a constant operand, rounded to the dtype by the renderer */
      vals[n++] = cm_kx_op(s, CM_OP_MUL, dt, a, cm_kx_const(s, dt, 1.0 + rnd()), -1);
      if (is_flt(dt)) {
        vals[n++] = cm_kx_op(s, CM_OP_ADD, dt, a, cm_kx_const(s, dt, INFINITY), -1);
        vals[n++] = cm_kx_op(s, CM_OP_MAX, dt, a, cm_kx_const(s, dt, NAN), -1);
      } else {
        vals[n++] =
            cm_kx_op(s, CM_OP_ADD, dt, a,
                     cm_kx_const(s, dt, dt == CM_I32 ? 2147483647.0 : -9223372036854775808.0), -1);
      }
    }
    static const cm_op cmp[] = {CM_OP_LT, CM_OP_LE, CM_OP_EQ, CM_OP_NE};
    for (int i = 0; i < 4; i++) vals[n++] = cm_kx_op(s, cmp[i], CM_BOOL, a, b, -1);
    vals[n++] = cm_kx_op(s, CM_OP_SELECT, dt, c, a, b);
    /* index arithmetic on i64 vars: the var itself as a value */
    vals[n++] = cm_kx_op(s, CM_OP_CAST, dt, cm_kx_iadd(s, v, cm_kx_iconst(s, -3)), -1, -1);
    CHECK(n <= 32);
    for (int i = 0; i < n; i++) {
      cm_kstore *st = &s->stores[s->n_stores++];
      st->buf = out[d];
      st->index = cm_kx_iadd(s, cm_kx_imul(s, v, cm_kx_iconst(s, 32)), cm_kx_iconst(s, i));
      st->value = vals[i];
    }
  }
  for (int d = 0; d < N_ALL; d++) {
    char name[32];
    snprintf(name, sizeof name, "casts_%s", cm_dtype_name(ALL[d]));
    cm_kstage *s = cm_kernel_add_stage(k, name);
    s->n_dom = 1;
    s->dom[0] = EW_N;
    s->n_parallel = 1;
    int v = cm_kx_var(s, 0);
    int a = cm_kx_load(s, k, in_a[d], v);
    for (int t = 0; t < N_ALL; t++) {
      cm_kstore *st = &s->stores[s->n_stores++];
      st->buf = sink[t];
      st->index = cm_kx_iadd(s, cm_kx_imul(s, v, cm_kx_iconst(s, N_ALL)), cm_kx_iconst(s, d));
      st->value = cm_kx_op(s, CM_OP_CAST, ALL[t], a, -1, -1);
    }
  }
}

/* out[i, j] = reduce_{r...} f(x[i, j, r...]) for a few dtypes / ops / extents. */
static void add_reduce(cm_kernel *k, const char *name, cm_dtype in_dt, cm_dtype acc, cm_kreduce op,
                       int64_t d0, int64_t d1, int n_red, const int64_t *red) {
  int64_t rn = 1;
  for (int i = 0; i < n_red; i++) rn *= red[i];
  int x = cm_kernel_add_buffer(k, CM_KBUF_ARENA, in_dt, d0 * d1 * rn, -1, 0);
  int y = cm_kernel_add_buffer(k, CM_KBUF_ARENA, in_dt, d0 * d1, -1, 0);
  int y2 = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, d0 * d1, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(k, name);
  s->n_dom = 2;
  s->dom[0] = d0;
  s->dom[1] = d1;
  s->n_parallel = 2;
  s->n_red = n_red;
  for (int i = 0; i < n_red; i++) s->red[i] = red[i];
  s->red_op = op;
  s->acc_dtype = acc;
  int lin = cm_kx_iadd(s, cm_kx_imul(s, cm_kx_var(s, 0), cm_kx_iconst(s, d1)), cm_kx_var(s, 1));
  int idx = lin;
  for (int i = 0; i < n_red; i++)
    idx = cm_kx_iadd(s, cm_kx_imul(s, idx, cm_kx_iconst(s, red[i])), cm_kx_var(s, 2 + i));
  int ld = cm_kx_load(s, k, x, idx);
  /* body: x * 2 (rounded in its dtype), plus the domain var: hoisting and loop scope */
  s->body =
      cm_kx_op(s, CM_OP_ADD, in_dt, cm_kx_op(s, CM_OP_MUL, in_dt, ld, cm_kx_const(s, in_dt, 2), -1),
               cm_kx_op(s, CM_OP_CAST, in_dt, cm_kx_var(s, 1), -1, -1), -1);
  int accx = cm_kx_acc(s);
  s->stores[0] = (cm_kstore){y, lin, cm_kx_op(s, CM_OP_CAST, in_dt, accx, -1, -1)};
  /* a second store mixing ACC with a load of the output itself (an update) */
  int old = cm_kx_load(s, k, y2, lin);
  s->stores[1] = (cm_kstore){
      y2, lin,
      cm_kx_op(s, CM_OP_ADD, CM_F32, old, cm_kx_op(s, CM_OP_CAST, CM_F32, accx, -1, -1), -1)};
  s->n_stores = 2;
}

static void build_reductions(cm_kernel *k) {
  cm_kernel_init(k, "t_red");
  int64_t small[1] = {7}, large[2] = {4, 50}, huge[1] = {1000}, one[1] = {1};
  add_reduce(k, "sum_f32_small", CM_F32, CM_F32, CM_KRED_SUM, 5, 3, 1, small);
  add_reduce(k, "max_f32_small", CM_F32, CM_F32, CM_KRED_MAX, 1, 1, 1, one);
  add_reduce(k, "sum_i64_small", CM_I64, CM_I64, CM_KRED_SUM, 3, 11, 1, small);
  add_reduce(k, "max_i32_small", CM_I32, CM_I32, CM_KRED_MAX, 2, 13, 1, small);
  add_reduce(k, "sum_bf16_large", CM_BF16, CM_F32, CM_KRED_SUM, 3, 1, 2, large);
  add_reduce(k, "max_f32_large", CM_F32, CM_F32, CM_KRED_MAX, 1, 7, 1, huge);
  add_reduce(k, "sum_f64_large", CM_F64, CM_F64, CM_KRED_SUM, 2, 3, 2, large);
  add_reduce(k, "sum_i32_large", CM_I32, CM_I32, CM_KRED_SUM, 2, 2, 1, huge);
  add_reduce(k, "max_f16_large", CM_F16, CM_F32, CM_KRED_MAX, 1, 3, 2, large);
  /* many rows of moderate length: a warp per row */
  int64_t row[1] = {129}, row2[2] = {8, 8};
  add_reduce(k, "sum_f32_rows", CM_F32, CM_F32, CM_KRED_SUM, 37, 17, 1, row);
  add_reduce(k, "max_i64_rows", CM_I64, CM_I64, CM_KRED_MAX, 24, 25, 2, row2);
  add_reduce(k, "sum_f16_rows", CM_F16, CM_F32, CM_KRED_SUM, 600, 1, 1, row);
}

/* scatter-add: out[(v * 7) % 11] += x[v] for every number dtype */
static void build_accumulate(cm_kernel *k) {
  cm_kernel_init(k, "t_acc");
  for (int d = 0; d < N_ALL - 1; d++) {
    int x = cm_kernel_add_buffer(k, CM_KBUF_ARENA, ALL[d], 29, -1, 0);
    int y = cm_kernel_add_buffer(k, CM_KBUF_ARENA, ALL[d], 11, -1, 0);
    char name[32];
    snprintf(name, sizeof name, "scatter_%s", cm_dtype_name(ALL[d]));
    cm_kstage *s = cm_kernel_add_stage(k, name);
    s->n_dom = 1;
    s->dom[0] = 29;
    s->n_parallel = 1;
    s->accumulate = true;
    int v = cm_kx_var(s, 0);
    s->stores[0] =
        (cm_kstore){y, cm_kx_imod(s, cm_kx_imul(s, v, cm_kx_iconst(s, 7)), cm_kx_iconst(s, 11)),
                    cm_kx_load(s, k, x, v)};
    s->n_stores = 1;
  }
}

typedef struct gemm_spec {
  const char *name;
  int64_t batch, M, N, K;
  cm_dtype op_dt;    /* operand dtype after the prologue cast */
  bool b_transposed; /* B stored as [N, K] */
  cm_kgemm_tiles tiles;
  bool plain;        /* operands are loads of op_dt buffers (no prologue) */
  bool a_transposed; /* A stored as [K, M] */
  bool widened;      /* body = MUL(CAST(A, f32), CAST(B, f32)): the product in the accumulator */
} gemm_spec;

/* C[b,i,j] = relu(sum_k (0.75 A(b,i,k)) B(b,k,j) + bias[j]) + R[b,i,j], operands cast to op_dt
 * (a prologue), B optionally stored transposed. */
static void add_gemm(cm_kernel *k, const gemm_spec *g) {
  int64_t B = g->batch;
  cm_dtype in_dt = g->plain ? g->op_dt : CM_F32;
  int a = cm_kernel_add_buffer(k, CM_KBUF_ARENA, in_dt, B * g->M * g->K, -1, 0);
  int b = cm_kernel_add_buffer(k, CM_KBUF_ARENA, in_dt, B * g->K * g->N, -1, 0);
  int bias = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, g->N, -1, 0);
  int res = cm_kernel_add_buffer(k, CM_KBUF_ARENA, g->op_dt, B * g->M * g->N, -1, 0);
  int c = cm_kernel_add_buffer(k, CM_KBUF_ARENA, g->op_dt, B * g->M * g->N, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(k, g->name);
  bool batched = B > 1;
  int nb = batched ? 1 : 0;
  s->n_dom = nb + 2;
  if (batched) s->dom[0] = B;
  s->dom[nb] = g->M;
  s->dom[nb + 1] = g->N;
  s->n_parallel = s->n_dom;
  s->n_red = 1;
  s->red[0] = g->K;
  s->red_op = CM_KRED_SUM;
  s->acc_dtype = g->op_dt == CM_F64 ? CM_F64 : CM_F32;
  s->tmpl = CM_KT_GEMM;
  s->tiles = g->tiles;
  int vb = batched ? cm_kx_var(s, 0) : cm_kx_iconst(s, 0);
  int vi = cm_kx_var(s, nb), vj = cm_kx_var(s, nb + 1), vk = cm_kx_var(s, nb + 2);
  int ai =
      g->a_transposed
          ? cm_kx_iadd(s,
                       cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, cm_kx_iconst(s, g->K)), vk),
                                  cm_kx_iconst(s, g->M)),
                       vi)
          : cm_kx_iadd(s,
                       cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, cm_kx_iconst(s, g->M)), vi),
                                  cm_kx_iconst(s, g->K)),
                       vk);
  int bi =
      g->b_transposed
          ? cm_kx_iadd(s,
                       cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, cm_kx_iconst(s, g->N)), vj),
                                  cm_kx_iconst(s, g->K)),
                       vk)
          : cm_kx_iadd(s,
                       cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, cm_kx_iconst(s, g->K)), vk),
                                  cm_kx_iconst(s, g->N)),
                       vj);
  int la = cm_kx_load(s, k, a, ai), lb = cm_kx_load(s, k, b, bi);
  /* prologue: A scaled, both cast to the operand dtype */
  if (g->plain) {
    s->gemm_a = la;
    s->gemm_b = lb;
  } else {
    int pa = cm_kx_op(s, CM_OP_MUL, CM_F32, la, cm_kx_const(s, CM_F32, 0.75), -1);
    s->gemm_a = g->op_dt == CM_F32 ? pa : cm_kx_op(s, CM_OP_CAST, g->op_dt, pa, -1, -1);
    s->gemm_b = g->op_dt == CM_F32 ? lb : cm_kx_op(s, CM_OP_CAST, g->op_dt, lb, -1, -1);
  }
  if (g->widened)
    s->body = cm_kx_op(s, CM_OP_MUL, CM_F32, cm_kx_op(s, CM_OP_CAST, CM_F32, s->gemm_a, -1, -1),
                       cm_kx_op(s, CM_OP_CAST, CM_F32, s->gemm_b, -1, -1), -1);
  else
    s->body = cm_kx_op(s, CM_OP_MUL, g->op_dt, s->gemm_a, s->gemm_b, -1);
  int ci = cm_kx_iadd(s,
                      cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vb, cm_kx_iconst(s, g->M)), vi),
                                 cm_kx_iconst(s, g->N)),
                      vj);
  int acc = cm_kx_acc(s);
  if (s->acc_dtype != CM_F32) acc = cm_kx_op(s, CM_OP_CAST, CM_F32, acc, -1, -1);
  int biased = cm_kx_op(s, CM_OP_ADD, CM_F32, acc, cm_kx_load(s, k, bias, vj), -1);
  int act = cm_kx_op(s, CM_OP_RELU, CM_F32, biased, -1, -1);
  int r = cm_kx_op(s, CM_OP_CAST, CM_F32, cm_kx_load(s, k, res, ci), -1, -1);
  s->stores[0] = (cm_kstore){c, ci, cm_kx_op(s, CM_OP_ADD, CM_F32, act, r, -1)};
  s->n_stores = 1;
}

static const gemm_spec GEMMS[] = {
    {"gemm_f32_tiny", 1, 7, 13, 5, CM_F32, false, {64, 64, 16, 32, 32}, false, false, false},
    {"gemm_f32_odd", 2, 130, 260, 300, CM_F32, false, {64, 64, 16, 32, 32}, false, false, false},
    {"gemm_f32_bt", 1, 33, 17, 129, CM_F32, true, {128, 64, 16, 64, 32}, false, false, false},
    {"gemm_bf16", 3, 130, 260, 300, CM_BF16, false, {64, 64, 16, 32, 32}, false, false, false},
    {"gemm_f16_bt", 1, 7, 13, 5, CM_F16, true, {64, 128, 32, 32, 64}, false, false, false},
    {"gemm_bad_tiles", 1, 19, 23, 31, CM_F32, false, {48, 0, 7, 5, 3}, false, false, false},
    {"gemm_f64", 2, 31, 47, 65, CM_F64, true, {32, 32, 16, 16, 16}, false, false, false},
    /* ViT-B/16 at batch 128 (25216 tokens), bf16 operands read by cp.async: X Wq^T, dY W
     * (fc2's input gradient), X^T dY (fc1's weight gradient), and attention's Q K^T per head */
    {"gemm_vitb_qkv", 1, 25216, 2304, 768, CM_BF16, true, {0}, true, false, false},
    {"gemm_vitb_dgrad", 1, 25216, 768, 3072, CM_BF16, false, {0}, true, false, false},
    {"gemm_vitb_wgrad", 1, 768, 3072, 25216, CM_BF16, false, {0}, true, true, false},
    {"gemm_vitb_qk", 1536, 197, 197, 64, CM_BF16, true, {0}, true, false, false},
    /* operands through registers at full size: A scaled and cast, B cast from f32 (float4) */
    {"gemm_vitb_fc1_prologue", 1, 25216, 3072, 768, CM_BF16, true, {0}, false, false, false},
    /* a long K over few blocks: split-K */
    {"gemm_bf16_split", 1, 64, 64, 4096, CM_BF16, true, {0}, true, false, false},
    /* the product written in f32 over widened operands (the CPU bf16 lowering's form) */
    {"gemm_bf16_widened", 2, 97, 40, 136, CM_BF16, true, {0}, true, false, true},
};
#define N_GEMMS (int)(sizeof GEMMS / sizeof GEMMS[0])

static void build_gemms(cm_kernel *k, const char *name) {
  cm_kernel_init(k, name);
  for (int i = 0; i < N_GEMMS; i++) add_gemm(k, &GEMMS[i]);
}

static cm_nvrtc *nvrtc;
static bool nvrtc_tried;
static cm_nvrtc *need_nvrtc(void) {
  if (!nvrtc_tried) {
    nvrtc_tried = true;
    cm_err err = {0};
    if (cm_nvrtc_load(&nvrtc, &err) != CM_OK) {
      fprintf(stderr, "  NOTICE: NVRTC cannot be loaded (%s): compile checks skipped\n", err.msg);
      nvrtc = NULL;
    }
  }
  return nvrtc;
}

/* The CUDA target of one of the archs these tests use. */
static const cm_target *cuda_target(const char *arch) {
  static cm_target ts[3];
  static const char *const names[3] = {"sm_75", "sm_80", "sm_90"};
  for (int i = 0; i < 3; i++)
    if (strcmp(arch, names[i]) == 0) {
      cm_err err = {0};
      CHECK_MSG(cm_target_cuda(arch, &ts[i], &err) == CM_OK, "%s", err.msg);
      return &ts[i];
    }
  CHECK_MSG(false, "no target for %s", arch);
  return NULL;
}

static char *render_all(cm_kernel *ks, int n, const cm_cuda_render_opts *o) {
  char *src = NULL;
  for (int i = 0; i < n; i++) {
    cm_err err = {0};
    cm_status st = cm_render_cuda(&ks[i], o, i == 0, &src, &err);
    CHECK_MSG(st == CM_OK, "%s: %s", ks[i].name, err.msg);
  }
  return src;
}

static void test_compile_all(void) {
  cm_kernel ks[5];
  build_elementwise(&ks[0]);
  build_reductions(&ks[1]);
  build_accumulate(&ks[2]);
  build_gemms(&ks[3], "t_gemm");
  build_gemms(&ks[4], "t_gemm_generic");
  static const char *const archs[] = {"sm_80", "sm_90"};
  for (int a = 0; a < 2; a++) {
    cm_cuda_render_opts o = {cuda_target(archs[a]), false};
    char *src = NULL;
    for (int i = 0; i < 5; i++) {
      cm_cuda_render_opts oi = o;
      oi.no_templates = i == 4;
      cm_err err = {0};
      /* stored plans for this arch (the generic reading plans for itself) */
      if (i < 4) CHECK(cm_cuda_plan_kernel(&ks[i], o.target, &err) == CM_OK);
      cm_status st = cm_render_cuda(&ks[i], &oi, i == 0, &src, &err);
      CHECK_MSG(st == CM_OK, "%s: %s", ks[i].name, err.msg);
    }
    if (!src) continue;
    CHECK_STR_CONTAINS(src, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
    CHECK_STR_CONTAINS(src, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
    CHECK_STR_CONTAINS(src, "cm_mma_16816<true>(acc_[x_][y_], af_[x_], bf_[y_]);");
    CHECK_STR_CONTAINS(src, "cm_mma_16816<false>(acc_[x_][y_], af_[x_], bf_[y_]);");
    CHECK_STR_CONTAINS(src, "__shfl_down_sync");
    CHECK_STR_CONTAINS(src, "if (lane_ == 0) {");       /* a warp per row */
    CHECK_STR_CONTAINS(src, "if (threadIdx.x == 0) {"); /* a block per row */
    CHECK_STR_CONTAINS(src, "atomicCAS");
    CHECK(strstr(src, "__expf") == NULL && strstr(src, "#include") == NULL);
    /* one prelude only */
    const char *p1 = strstr(src, "cmaec CUDA prelude");
    CHECK(p1 && strstr(p1 + 1, "cmaec CUDA prelude") == NULL);
    if (!need_nvrtc()) {
      free(src);
      continue;
    }
    cm_cubin cb;
    cm_err err = {0};
    cm_status st =
        cm_nvrtc_compile(nvrtc, src, "render_cuda_test.cu", archs[a], NULL, 0, &cb, &err);
    CHECK_MSG(st == CM_OK, "%s: %s", archs[a], err.msg);
    const char *dump = getenv("CMAEC_DUMP_CUDA"); /* debugging: where to write the source */
    if (st != CM_OK || dump) {
      FILE *f = fopen(dump ? dump : "render_cuda_failed.cu", "w");
      if (f) {
        fputs(src, f);
        fclose(f);
        fprintf(stderr, "  source written to %s\n", dump ? dump : "render_cuda_failed.cu");
      }
    }
    int expected = 0, gemm_mma = 0;
    for (int i = 0; i < 5; i++) {
      for (int s = 0; s < ks[i].n_stages; s++) {
        char name[160];
        snprintf(name, sizeof name, "%s_s%d", ks[i].name, s);
        expected++;
        const cm_cuda_kernel_info *ki = st == CM_OK ? cm_cubin_kernel(&cb, name) : NULL;
        CHECK_MSG(ki != NULL || st != CM_OK, "%s: kernel %s not in the CUBIN", archs[a], name);
        if (!ki) continue;
        CHECK_MSG(ki->registers > 0 && ki->registers <= 255, "%s %s: %d registers", archs[a], name,
                  ki->registers);
        /* the plan's static shared memory is what ptxas allocates */
        if (i < 4)
          CHECK_MSG(ki->shared_bytes == ks[i].stages[s].cuda.shared_static,
                    "%s %s: %d B of shared memory, planned %lld", archs[a], name, ki->shared_bytes,
                    (long long)ks[i].stages[s].cuda.shared_static);
        bool templated = i == 3;
        if (templated) {
          CHECK_MSG(ki->spill_store_bytes == 0 && ki->spill_load_bytes == 0, "%s %s: spills %d/%d",
                    archs[a], name, ki->spill_store_bytes, ki->spill_load_bytes);
          cm_cuda_launch l = cm_cuda_stage_launch(&ks[i], s, &o);
          const cm_kcuda_plan *pl = &ks[i].stages[s].cuda;
          /* FMA: static tiles; tensor cores: the ring in dynamic shared memory (opted in) */
          if (pl->gemm.mma) {
            CHECK_MSG(ki->shared_bytes == 0 && l.shared_bytes > 0 &&
                          l.shared_bytes == pl->shared_dynamic &&
                          l.shared_bytes <= o.target->shared_bytes_max,
                      "%s %s: %d B static, %u B dynamic shared memory", archs[a], name,
                      ki->shared_bytes, l.shared_bytes);
            gemm_mma++;
          } else {
            CHECK_MSG(ki->shared_bytes > 0, "%s %s: no shared memory", archs[a], name);
            CHECK(l.shared_bytes == 0);
          }
          CHECK(ki->shared_bytes <= 48 * 1024);
          CHECK(l.block[0] % 32 == 0 && l.block[0] <= 1024);
        }
        fprintf(stderr, "  %s %-28s %3d regs %6d B smem %4d B stack spills %d/%d (%s)\n", archs[a],
                name, ki->registers, ki->shared_bytes, ki->stack_bytes, ki->spill_store_bytes,
                ki->spill_load_bytes, ks[i].stages[s].name);
      }
    }
    if (st == CM_OK) {
      int warnings = 0;
      for (const char *w = cb.log; w && (w = strstr(w, "warning")) != NULL; w++) warnings++;
      const char *w1 = cb.log ? strstr(cb.log, "warning") : NULL;
      fprintf(stderr, "  %s: %d NVRTC/ptxas warnings%s%.*s\n", archs[a], warnings,
              w1 ? ", first: " : "", w1 ? (int)strcspn(w1, "\n") : 0, w1 ? w1 : "");
      CHECK(warnings == 0); /* unused helpers or variables would show up here */
      CHECK_MSG(cb.n_kernels == expected, "%d kernels, expected %d", cb.n_kernels, expected);
      /* the bf16/f16 GEMMs (all but the f32 and f64 ones) on tensor cores */
      CHECK_MSG(gemm_mma == N_GEMMS - 5, "%s: %d GEMMs on tensor cores", archs[a], gemm_mma);
      fprintf(stderr, "  %s: %d kernels, %zu-byte source, compiled in %.0f ms\n", archs[a],
              cb.n_kernels, strlen(src), cb.compile_ms);
    }
    cm_cubin_free(&cb);
    free(src);
  }
  for (int i = 0; i < 5; i++) cm_kernel_free(&ks[i]);
}

static void test_deterministic_and_append(void) {
  cm_kernel k;
  build_gemms(&k, "t_det");
  cm_cuda_render_opts o = {cuda_target("sm_90"), false};
  char *s1 = render_all(&k, 1, &o), *s2 = render_all(&k, 1, &o);
  CHECK(s1 && s2 && strcmp(s1, s2) == 0);
  /* appending without a prelude keeps the first text as a prefix */
  char *s3 = strdup("// head\n");
  cm_err err = {0};
  CHECK(cm_render_cuda(&k, &o, false, &s3, &err) == CM_OK);
  CHECK(s3 && strncmp(s3, "// head\n", 8) == 0);
  CHECK(s3 && strstr(s3, "cmaec CUDA prelude") == NULL);
  CHECK(s3 &&
        strstr(s3, "extern \"C\" __global__ void __launch_bounds__(128, 4) t_det_s1(") != NULL);
  /* arch below sm_80: no tensor cores, FMA instead */
  cm_cuda_render_opts old = {cuda_target("sm_75"), false};
  char *s4 = render_all(&k, 1, &old);
  CHECK(s4 && strstr(s4, "mma.sync") == NULL);
  CHECK(s4 && strstr(s4, "(GEMM, FMA)") != NULL);
  free(s1);
  free(s2);
  free(s3);
  free(s4);
  cm_kernel_free(&k);
}

static void test_launch(void) {
  cm_kernel k;
  build_gemms(&k, "t_launch");
  cm_cuda_render_opts o = {cuda_target("sm_80"), false};
  /* gemm_f32_odd: batch 2, M 130, N 260, 64x64 blocks of 4 warps */
  cm_cuda_launch l = cm_cuda_stage_launch(&k, 1, &o);
  CHECK(l.grid[0] == 5 && l.grid[1] == 3 && l.grid[2] == 2);
  CHECK(l.block[0] == 128 && l.block[1] == 1 && l.block[2] == 1);
  /* gemm_f32_bt: 128x64 block of 64x32 warp tiles = 4 warps */
  l = cm_cuda_stage_launch(&k, 2, &o);
  CHECK(l.grid[0] == 1 && l.grid[1] == 1 && l.grid[2] == 1 && l.block[0] == 128);
  /* gemm_f16_bt: 64x128 block of 32x64 warp tiles = 4 warps */
  l = cm_cuda_stage_launch(&k, 4, &o);
  CHECK(l.block[0] == 128 && l.grid[0] == 1);
  /* gemm_f64: 32x32 blocks of 16x16 warp tiles */
  l = cm_cuda_stage_launch(&k, 6, &o);
  CHECK(l.grid[0] == 2 && l.grid[1] == 1 && l.grid[2] == 2 && l.block[0] == 128);
  /* generic reading of the same stage: 67600 rows of K = 300, a warp per row */
  cm_cuda_render_opts gen = {cuda_target("sm_80"), true};
  l = cm_cuda_stage_launch(&k, 1, &gen);
  CHECK(l.grid[0] == (2 * 130 * 260 + 7) / 8 && l.block[0] == 256);
  /* gemm_f32_bt: 561 rows of K = 129: warps; with K = 3000, a block per row */
  l = cm_cuda_stage_launch(&k, 2, &gen);
  CHECK(l.grid[0] == (33 * 17 + 7) / 8 && l.block[0] == 256);
  k.stages[2].red[0] = 3000;
  l = cm_cuda_stage_launch(&k, 2, &gen);
  CHECK(l.grid[0] == 33 * 17 && l.block[0] == 256);
  /* gemm_f16_bt without templates: 91 rows of K = 5, a thread per row */
  l = cm_cuda_stage_launch(&k, 4, &gen);
  CHECK(l.grid[0] == 1 && l.block[0] == 256);
  l = cm_cuda_stage_launch(&k, 0, &gen); /* K = 5: a thread per point */
  CHECK(l.grid[0] == 1 && l.block[0] == 256);
  CHECK(cm_cuda_stage_launch(&k, 99, &o).grid[0] == 1);
  /* bf16 operands: tensor cores whatever the (CPU-style) tile hints, launched as planned
   * (warps x 32 threads, a block per mc x nc tile, the ring in dynamic shared memory); f32: a
   * huge block tile is clamped to fit static shared memory */
  cm_kernel big;
  cm_kernel_init(&big, "t_big_tiles");
  gemm_spec g1 = {.name = "bf16_big", 1, 300, 200, 100, CM_BF16, false, {128, 128, 64, 64, 64}};
  gemm_spec g2 = {.name = "bf16_tall", 1, 300, 200, 100, CM_BF16, false, {2048, 8, 48, 128, 8}};
  gemm_spec g3 = {.name = "f32_wide", 1, 300, 200, 100, CM_F32, false, {32, 2048, 64, 32, 128}};
  add_gemm(&big, &g1);
  add_gemm(&big, &g2);
  add_gemm(&big, &g3);
  char *src = render_all(&big, 1, &o);
  CHECK(src && strstr(src, "// stage 0 \"bf16_big\" (GEMM, tensor cores)") != NULL);
  CHECK(src && strstr(src, "// stage 1 \"bf16_tall\" (GEMM, tensor cores)") != NULL);
  for (int i = 0; i < 2; i++) {
    cm_kcuda_plan p;
    cm_err perr = {0};
    CHECK(cm_cuda_plan_kernel(&big, o.target, &perr) == CM_OK);
    p = big.stages[i].cuda;
    l = cm_cuda_stage_launch(&big, i, &o);
    CHECK(p.kind == CM_KCUDA_GEMM && p.gemm.mma);
    CHECK(l.block[0] == (unsigned)p.gemm.threads && p.gemm.threads == 32 * p.gemm.warps);
    CHECK(l.grid[0] == (unsigned)((200 + p.gemm.nc - 1) / p.gemm.nc) &&
          l.grid[1] == (unsigned)((300 + p.gemm.mc - 1) / p.gemm.mc));
    CHECK(l.shared_bytes == p.shared_dynamic && l.shared_bytes > 0);
  }
  l = cm_cuda_stage_launch(&big, 2, &o);
  CHECK(l.block[0] >= 32 && l.block[0] <= 1024 && l.shared_bytes == 0);
  if (src && need_nvrtc()) {
    cm_cubin cb;
    cm_err err = {0};
    cm_status st = cm_nvrtc_compile(nvrtc, src, "big_tiles.cu", "sm_80", NULL, 0, &cb, &err);
    CHECK_MSG(st == CM_OK, "%s", err.msg);
    for (int i = 0; i < 3 && st == CM_OK; i++) {
      char name[64];
      snprintf(name, sizeof name, "t_big_tiles_s%d", i);
      const cm_cuda_kernel_info *ki = cm_cubin_kernel(&cb, name);
      CHECK(ki && ki->shared_bytes <= 48 * 1024 && ki->spill_store_bytes == 0 &&
            ki->spill_load_bytes == 0);
      if (ki)
        fprintf(stderr, "  sm_80 %s: %d regs, %d B smem, spills %d/%d\n", name, ki->registers,
                ki->shared_bytes, ki->spill_store_bytes, ki->spill_load_bytes);
    }
    cm_cubin_free(&cb);
  }
  free(src);
  cm_kernel_free(&big);
  cm_kernel_free(&k);
  cm_kernel e;
  build_elementwise(&e);
  l = cm_cuda_stage_launch(&e, 0, &o);
  CHECK(l.grid[0] == 1 && l.block[0] == 256 && l.shared_bytes == 0);
  e.stages[0].dom[0] = 1000000000;
  l = cm_cuda_stage_launch(&e, 0, &o);
  CHECK(l.grid[0] >= 65535 && l.grid[0] <= 1048576); /* capped: the loop is grid-stride */
  cm_kernel_free(&e);
}

static void test_errors(void) {
  cm_cuda_render_opts o = {cuda_target("sm_90"), false};
  cm_err err = {0};
  char *src = NULL;
  /* accumulate into a bool buffer */
  cm_kernel k;
  cm_kernel_init(&k, "t_bad_acc");
  int x = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BOOL, 4, -1, 0);
  int y = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_BOOL, 4, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "scatter_bool");
  s->n_dom = 1;
  s->dom[0] = 4;
  s->accumulate = true;
  int v = cm_kx_var(s, 0);
  s->stores[0] = (cm_kstore){y, v, cm_kx_load(s, &k, x, v)};
  s->n_stores = 1;
  CHECK(cm_render_cuda(&k, &o, true, &src, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "t_bad_acc");
  CHECK_STR_CONTAINS(err.msg, "scatter_bool");
  CHECK_STR_CONTAINS(err.msg, "bool");
  CHECK(src == NULL);
  /* a load from a buffer that does not exist */
  s->accumulate = false;
  s->exprs[s->stores[0].value].buf = 7;
  CHECK(cm_render_cuda(&k, &o, true, &src, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "buffer 7");
  CHECK_STR_CONTAINS(err.msg, "expression");
  CHECK(strchr(err.msg, '\n') == NULL);
  cm_kernel_free(&k);
  /* a GEMM operand A that reads j */
  cm_kernel g;
  build_gemms(&g, "t_bad_gemm");
  cm_kstage *gs = &g.stages[0];
  int vj = cm_kx_var(gs, 1);
  gs->gemm_a =
      cm_kx_op(gs, CM_OP_ADD, CM_F32, gs->gemm_a, cm_kx_op(gs, CM_OP_CAST, CM_F32, vj, -1, -1), -1);
  int old_body = gs->body;
  /* a body that is not MUL(A, B) is no GEMM: the stage stays a loop nest */
  CHECK(cm_render_cuda(&g, &o, true, &src, &err) == CM_OK);
  CHECK(src && strstr(src, "// stage 0 \"gemm_f32_tiny\"\n") != NULL);
  CHECK(src && strstr(src, "// stage 1 \"gemm_f32_odd\" (GEMM, FMA)\n") != NULL);
  free(src);
  src = NULL;
  gs->body = cm_kx_op(gs, CM_OP_MUL, CM_F32, gs->gemm_a, gs->gemm_b, -1);
  CHECK(gs->body != old_body);
  CHECK(cm_render_cuda(&g, &o, true, &src, &err) == CM_EINVALID);
  CHECK(src == NULL);
  CHECK_STR_CONTAINS(err.msg, "GEMM operand A");
  CHECK_STR_CONTAINS(err.msg, "gemm_f32_tiny");
  /* without templates the same stage is a plain loop nest: fine */
  cm_cuda_render_opts nt = {cuda_target("sm_90"), true};
  CHECK(cm_render_cuda(&g, &nt, true, &src, &err) == CM_OK);
  CHECK(src && strstr(src, "GEMM") == NULL);
  free(src);
  cm_kernel_free(&g);
}

/* The text cm_kcuda_plan_print writes for p. */
static char *plan_text(const cm_kcuda_plan *p) {
  char *text = NULL;
  size_t size = 0;
  FILE *f = open_memstream(&text, &size);
  CHECK(f != NULL);
  if (!f) return NULL;
  cm_kcuda_plan_print(p, f);
  fclose(f);
  return text;
}

/* The plan of every stage, stored by cm_cuda_plan_kernel: printed; read by the renderer and the
 * launch (a changed plan changes both); a kernel planned for another arch is planned afresh. */
static void test_plan_gemm(void) {
  cm_kernel k;
  build_gemms(&k, "t_plan");
  cm_err err = {0};
  cm_cuda_render_opts o = {cuda_target("sm_80"), false};
  char *unplanned = render_all(&k, 1, &o);
  CHECK(cm_cuda_plan_kernel(&k, cuda_target("sm_80"), &err) == CM_OK);
  char *planned = render_all(&k, 1, &o);
  CHECK(unplanned && planned && strcmp(unplanned, planned) == 0);
  /* gemm_f32_odd: batch 2, M 130, N 260, K 300; 64x64 blocks of 32x32 warp tiles */
  char *t1 = plan_text(&k.stages[1].cuda);
  CHECK_STR_CONTAINS(t1, "cuda sm_80 gemm fma f32 lanes 4x8 micro 8x4: block 64x64 k 16 warp "
                         "32x32 (4 warps), batch 2 M 130 N 260 K 300; grid 5x3x2 block 128x1x1");
  /* As_[16][68] + Bs_[16][68] floats */
  CHECK_STR_CONTAINS(t1, "shared 8704+0");
  /* gemm_f16_bt: f16 operands on tensor cores */
  char *t4 = plan_text(&k.stages[4].cuda);
  /* (M 7, N 13, K 5: the smallest block tile, one k tile: a ring of 2; each A and B tile 32 rows
   * of 32 f16 = 2 KiB) */
  CHECK_STR_CONTAINS(t4, "cuda sm_80 gemm mma f16: block 32x32 k 32 warp 16x16 (4 warps), batch 1 "
                         "M 7 N 13 K 5, warps 2x2 split_k 1 stages 2 swizzled, A [m][k] prologue, "
                         "B [n][k] prologue; grid 1x1x1 block 128x1x1 shared 0+8192");
  /* the kernel IR's text carries the plans */
  char *kir = NULL;
  size_t size = 0;
  FILE *f = open_memstream(&kir, &size);
  cm_kernel_print(&k, f);
  fclose(f);
  CHECK(kir && t1 && strstr(kir, t1) != NULL);
  /* the launch reads the plan: a plan with another grid launches that grid */
  k.stages[1].cuda.grid[0] = 7;
  CHECK(cm_cuda_stage_launch(&k, 1, &o).grid[0] == 7);
  /* planned for sm_80: sm_75 (no tensor cores) plans afresh, FMA */
  cm_cuda_render_opts old = {cuda_target("sm_75"), false};
  CHECK(cm_cuda_stage_launch(&k, 1, &old).grid[0] == 5);
  char *s75 = render_all(&k, 1, &old);
  CHECK(s75 && strstr(s75, "mma.sync") == NULL);
  /* a CPU target is refused, naming the kernel */
  cm_target cpu;
  cm_target_host(&cpu);
  cm_err e2 = {0};
  CHECK(cm_cuda_plan_kernel(&k, &cpu, &e2) == CM_EINVALID);
  CHECK_STR_CONTAINS(e2.msg, "t_plan");
  cm_cuda_render_opts bad = {&cpu, false};
  char *src = NULL;
  CHECK(cm_render_cuda(&k, &bad, true, &src, &e2) == CM_EINVALID && src == NULL);
  free(unplanned), free(planned), free(t1), free(t4), free(kir), free(s75);
  cm_kernel_free(&k);
}

/* y = softmax(q k^T / sqrt(16)) v over q, k, v [1, 2, 50, 16] (with its backward when
 * backward), lowered for sm_80 with key blocks of bc (0: the lowering's choice): the spans'
 * plans print as want[0..n_want) in order, their other stages run in the span's function. */
static void check_attention_plans(bool backward, int bc, const char *const *want, int n_want) {
  cm_graph *g = cm_graph_new();
  int64_t d[4] = {1, 2, 50, 16};
  int q = cm_input(g, "q", CM_F32, 4, d), kk = cm_input(g, "k", CM_F32, 4, d);
  int v = cm_input(g, "v", CM_F32, 4, d);
  int s = cm_matmul(g, q, kk, false, true, "scores");
  s = cm_binary_bcast(g, CM_OP_MUL, s, cm_const_scalar(g, NULL, CM_F32, 0.25), "scaled");
  int y = cm_matmul(g, cm_nn_softmax(g, s), v, false, false, "y");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  if (backward) {
    int dout = cm_input(g, "dO", CM_F32, 4, d), axes[4] = {0, 1, 2, 3};
    int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 4, axes,
                         false, "loss");
    int wrt[3] = {q, kk, v}, grads[3];
    CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
    for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
  }
  cm_pass_state ps = {g, NULL};
  CHECK_MSG(cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK, "%s",
            err.msg);
  cm_lower_opts lo = {cuda_target("sm_80"), false, bc};
  cm_kprogram kp;
  CHECK_MSG(cm_lower_plan(ps.g, ps.plan, &lo, &kp, &err) == CM_OK, "%s", err.msg);
  int spans = 0;
  cm_cuda_render_opts o = {cuda_target("sm_80"), false};
  for (int i = 0; i < kp.n_kernels; i++) {
    const cm_kernel *k = &kp.kernels[i];
    for (int si = 0; si < k->n_stages; si++) {
      const cm_kstage *st = &k->stages[si];
      CHECK(st->cuda.kind != CM_KCUDA_NONE && st->cuda.sm == 80);
      if (st->tmpl != CM_KT_ATTENTION_FWD && st->tmpl != CM_KT_ATTENTION_BWD) continue;
      char *text = plan_text(&st->cuda);
      if (getenv("PLAN_PRINT")) fprintf(stderr, "%s", text);
      CHECK_MSG(spans < n_want && text && strstr(text, want[spans]), "span %d: %s", spans, text);
      CHECK(st->cuda.shared_static > 0 && st->cuda.shared_static <= 48 * 1024);
      cm_cuda_launch l = cm_cuda_stage_launch(k, si, &o);
      CHECK(l.grid[0] == st->cuda.grid[0] && l.block[0] == 256);
      for (int j = si + 1; j < si + st->cuda.attn.span; j++) {
        char *in = plan_text(&k->stages[j].cuda);
        char span_of[64];
        snprintf(span_of, sizeof span_of, "in the span of stage %d", si);
        CHECK_STR_CONTAINS(in, span_of);
        CHECK(cm_cuda_stage_launch(k, j, &o).grid[0] == 1);
        free(in);
      }
      free(text);
      spans++;
      si += st->cuda.attn.span - 1;
    }
  }
  CHECK(spans == n_want);
  cm_kprogram_free(&kp);
  cm_plan_free(ps.plan);
  cm_graph_free(ps.g);
}

static void test_plan_attention(void) {
  /* a block per (batch item, head), all 50 rows: the forward streams on CUDA (S, max, exp, sum,
   * O; one block of all 50 keys: br (d + bc + 1 + dv + 3) + max(d bc, bc dv) floats) and keeps
   * only O, m and z (flash_backward); the recomputed backward (S', E', dP, dS, dV, dQ, dK) streams
   * too, one pass over one block of 50 keys: four 50 x 50 tiles and dQ's accumulator (50 x 16),
   * 10800 floats */
  const char *const fused[] = {
      "cuda sm_80 attention stream: 5 stages, br 50 bc 50, 1 row blocks, 1 key blocks, d 16 dv 16; "
      "grid 2x1x1 block 256x1x1 shared 20400+0",
      "cuda sm_80 attention stream backward: 7 stages, 50 rows, bc 50, 1 key blocks, 800 "
      "accumulator floats; grid 2x1x1 block 256x1x1 shared 43200+0"};
  check_attention_plans(true, 0, fused, 2);
  /* key blocks of 16 over 50 keys: 4; the forward streams with all 50 rows in one block, in
   * br (d + bc + 1 + dv + 3) + max(d bc, bc dv) = 50 * 52 + 256 floats */
  const char *const stream[] = {
      "cuda sm_80 attention stream: 5 stages, br 50 bc 16, 1 row blocks, 4 key blocks, d 16 dv 16; "
      "grid 2x1x1 block 256x1x1 shared 11424+0"};
  check_attention_plans(false, 16, stream, 1);
  /* with the backward: the forward streams as above; the backward over 4 key blocks: dQ's
   * accumulator (50 x 16 floats) and four 50 x 16 tiles: 4000 floats */
  const char *const stream_bwd[] = {
      "cuda sm_80 attention stream: 5 stages, br 50 bc 16, 1 row blocks, 4 key blocks, d 16 dv 16; "
      "grid 2x1x1 block 256x1x1 shared 11424+0",
      "cuda sm_80 attention stream backward: 7 stages, 50 rows, bc 16, 4 key blocks, 800 "
      "accumulator floats; grid 2x1x1 block 256x1x1 shared 16000+0"};
  check_attention_plans(true, 16, stream_bwd, 2);
}

TEST_MAIN(TEST(test_compile_all), TEST(test_deterministic_and_append), TEST(test_launch),
          TEST(test_errors), TEST(test_plan_gemm), TEST(test_plan_attention))
