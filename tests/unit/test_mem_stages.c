/* tests/unit/test_mem_stages.c — the memory-bound stages of a training step
 * on the CPU: conv2d_grad_weight lowered as a GEMM (odd shapes, strides
 * 1/2/3/4, padding, dilation, kernels 1..5, channels 1/3/prime; against the
 * oracle, with and without templates), column reductions (row counts 1 and
 * primes, more than 256 columns, sum and max; rendered on their own path and
 * run over odd work-item ranges), elementwise stages whose every var is
 * parallel (rendered as vectorized runs), a concat and padding along an outer
 * axis (SELECTs rendered as branches), and an AdamW-like update with pow
 * (edge cases of pow included) against the oracle. Every float result must
 * lie within its forward error bound (cm_eval_bounded; hand-built stages
 * through the graph that computes the same), whatever the host's vector width,
 * FMA contraction or summation order. */
#include "codegen/codegen.h"
#include "runtime/runtime.h"
#include "tests/test.h"
#include "tests/testlib.h"
#include "tests/tensor_compare.h"
#include "tests/llvm_kernels.h"

#include <llvm-c/Core.h>
#include <math.h>
#include <stdint.h>

static test_rng rng_state = {0x2545f4914f6cdd1dull};
static double urand(double lo, double hi) {
  return test_uniform_in(&rng_state, lo, hi);
}

/* got within node v's bound (a failure names the element and the figures). */
static void expect_bounded(const test_oracle *o, int v, const cm_tensor *got, const char *what) {
  test_bounded r = test_oracle_check(o, v, got, what);
  CHECK_MSG(r.ratio <= 1, "%s: %s: |cpu - f64| = %g at [%lld] exceeds its error bound %g", what,
            o->g->nodes[v].name, r.diff, (long long)r.at, r.bound);
}

/* Runs g on 2 threads (profiled) and checks outputs and assigned states
 * against the bounded oracle. Returns the template of the first stage whose
 * name ends with stage_suffix (-1 if none). */
static int n_matching; /* stages whose name ends with the suffix, in the last check */
static int check_vs_oracle(const cm_graph *g, const cm_tensor *const *src, bool no_templates,
                           const char *stage_suffix, const char *what) {
  n_matching = 0;
  cm_err err = {0};
  test_oracle v;
  CHECK_MSG(test_oracle_eval(&v, g, src, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_compile_opts o = {
      .threads = 2, .cache_dir = "", .no_templates = no_templates, .profile = true};
  cm_program *pr = NULL;
  int tmpl = -1;
  cm_status st = cm_compile(g, NULL, &o, &pr, &err);
  CHECK_MSG(st == CM_OK, "%s: build: %s", what, err.msg);
  if (st == CM_OK) {
    cm_tensor *out = calloc((size_t)g->n_outputs + 1, sizeof *out);
    cm_tensor *copy = calloc((size_t)g->n_nodes, sizeof *copy);
    cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
    for (int i = 0; i < g->n_nodes; i++)
      if (src[i]) {
        cm_tensor_copy(&copy[i], src[i], NULL);
        ptr[i] = &copy[i];
      }
    st = cm_program_run(pr, ptr, out, &err);
    CHECK_MSG(st == CM_OK, "%s: run: %s", what, err.msg);
    for (int j = 0; j < g->n_outputs && st == CM_OK; j++)
      expect_bounded(&v, g->outputs[j], &out[j], what);
    for (int i = 0; i < g->n_nodes && st == CM_OK; i++)
      if (g->nodes[i].op == CM_OP_ASSIGN) expect_bounded(&v, i, &copy[g->nodes[i].inputs[0]], what);
    const cm_stage_profile *sp;
    int n = cm_program_stage_profile(pr, &sp);
    size_t ls = strlen(stage_suffix);
    for (int i = 0; i < n; i++) {
      size_t ln = strlen(sp[i].stage->name);
      if (ln < ls || strcmp(sp[i].stage->name + ln - ls, stage_suffix)) continue;
      if (tmpl < 0) tmpl = (int)sp[i].stage->tmpl;
      n_matching++;
    }
    for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&out[j]);
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&copy[i]);
    free(out), free(copy), free(ptr);
    cm_program_free(pr);
  }
  test_oracle_free(&v);
  return tmpl;
}

/* Random sources in [-1, 1] (never all zeros); t[i] / src[i] per source node. */
static void fill_sources(const cm_graph *g, cm_tensor *t, const cm_tensor **src) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&t[i], n->type, NULL) == CM_OK);
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++) cm_tensor_set_f64(&t[i], e, urand(-1, 1));
    src[i] = &t[i];
  }
}

static void free_sources(const cm_graph *g, cm_tensor *t, const cm_tensor **src) {
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t[i]);
  free(t), free(src);
}

/* ---- conv2d_grad_weight as a GEMM ---------------------------------------- */

static void test_conv_grad_weight(void) {
  /* N, C, H, W, O, KH, KW, stride, pad, dilation, f64 */
  static const int cfg[][11] = {
      {2, 1, 8, 8, 5, 4, 4, 4, 0, 1, 0},   /* the patch embedding: stride = kernel */
      {1, 3, 7, 5, 4, 3, 3, 1, 1, 1, 0},   /* padded 3x3 */
      {3, 7, 9, 11, 2, 5, 5, 2, 2, 1, 0},  /* prime channels, 5x5, stride 2 */
      {2, 3, 6, 6, 13, 1, 1, 1, 0, 1, 0},  /* 1x1 */
      {1, 1, 5, 5, 3, 3, 2, 2, 1, 2, 0},   /* dilation 2, non-square kernel */
      {2, 5, 13, 7, 3, 4, 3, 3, 0, 1, 0},  /* stride 3, odd sizes */
      {1, 3, 9, 9, 7, 3, 3, 2, 1, 1, 1},   /* f64: stays a generic reduction */
      {4, 2, 17, 17, 11, 4, 4, 4, 3, 1, 0} /* heavy padding */
  };
  for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
    const int *c = cfg[ci];
    int64_t N = c[0], C = c[1], H = c[2], W = c[3], O = c[4], KH = c[5], KW = c[6];
    int s = c[7], p = c[8], d = c[9];
    cm_dtype dt = c[10] ? CM_F64 : CM_F32;
    int64_t OH = (H + 2 * p - d * (KH - 1) - 1) / s + 1,
            OW = (W + 2 * p - d * (KW - 1) - 1) / s + 1;
    cm_graph *g = cm_graph_new();
    int64_t dx[4] = {N, C, H, W}, dy[4] = {N, O, OH, OW};
    int x = cm_input(g, "x", dt, 4, dx), y = cm_input(g, "dy", dt, 4, dy);
    cm_attrs a;
    cm_attrs_default(&a);
    a.stride[0] = a.stride[1] = s;
    a.padding[0] = a.padding[1] = p;
    a.dilation[0] = a.dilation[1] = d;
    a.groups = 1;
    a.rank = 4;
    a.shape[0] = O, a.shape[1] = C, a.shape[2] = KH, a.shape[3] = KW;
    cm_err err = {0};
    int in[2] = {x, y};
    int gw = cm_graph_add(g, CM_OP_CONV2D_GRAD_WEIGHT, "gw", in, 2, &a, &err);
    CHECK_MSG(gw >= 0, "config %zu: %s", ci, err.msg);
    if (gw < 0) {
      cm_graph_free(g);
      continue;
    }
    /* odd configs: an epilogue fused into the GEMM stage instead of a plain store */
    int out = ci % 2 ? cm_unary(g, CM_OP_TANH, gw, NULL) : gw;
    cm_graph_add_output(g, out, NULL);
    CHECK_MSG(cm_graph_error(g) == NULL, "config %zu: %s", ci, cm_graph_error(g));
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    fill_sources(g, t, src);
    char what[64];
    snprintf(what, sizeof what, "conv2d_grad_weight config %zu", ci);
    int tm = check_vs_oracle(g, src, false, "conv2d_grad_weight", what);
    CHECK_MSG(tm == (dt == CM_F32 ? CM_KT_GEMM : CM_KT_NONE), "%s: stage template %d", what, tm);
    tm = check_vs_oracle(g, src, true, "conv2d_grad_weight", what);
    CHECK_MSG(tm == CM_KT_NONE, "%s (no templates): stage template %d", what, tm);
    free_sources(g, t, src);
    cm_graph_free(g);
  }
}

/* ---- hand-built stages: column reductions and all-parallel elementwise ---- */

/* Runs stage fn over [0, n) in the given cut points (like threads would). */
CM_NO_SANITIZE_FUNCTION static void run_cuts(cm_cpu_stage_fn fn, char *const *bufs, int64_t n,
                                             const int64_t *cuts, int n_cuts) {
  int64_t lo = 0;
  for (int i = 0; i <= n_cuts; i++) {
    int64_t hi = i < n_cuts ? (cuts[i] < n ? cuts[i] : n) : n;
    if (hi > lo) fn(bufs, lo, hi, NULL);
    if (hi > lo) lo = hi;
  }
}

/* The unoptimized IR of k's stages (malloc'ed). */
static char *render_text(cm_jit *j, const cm_kernel *k) {
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("text", cm_jit_context(j));
  cm_err err = {0};
  cm_status st = cm_render_llvm(k, m, NULL, &err);
  CHECK_MSG(st == CM_OK, "render %s: %s", k->name, err.msg);
  char *ir = LLVMPrintModuleToString(m);
  char *copy = strdup(ir);
  LLVMDisposeMessage(ir);
  LLVMDisposeModule(m);
  return copy;
}

/* The optimized IR of k's stages (malloc'ed). */
static char *optimized_text(cm_jit *j, const cm_kernel *k) {
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("opt", cm_jit_context(j));
  cm_err err = {0};
  char *text = NULL;
  if (cm_render_llvm(k, m, NULL, &err) == CM_OK)
    CHECK_MSG(cm_jit_render(j, m, CM_JIT_TEXT_IR, &text, &err) == CM_OK, "%s", err.msg);
  LLVMDisposeModule(m);
  return text;
}

/* out[d] = red over (r1, r2) of f(x[r1, r2, d], y[r1, r2, d], z[d]) for shapes
 * with 1 and prime row counts and more columns than one run of accumulators. */
static void test_column_reductions(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  static const int64_t shapes[][3] = {{1, 1, 300},   {3, 7, 515}, {64, 13, 4},
                                      {1, 131, 257}, {5, 1, 97},  {2, 67, 1031}};
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
    int64_t R1 = shapes[si][0], R2 = shapes[si][1], D = shapes[si][2], n = R1 * R2 * D;
    for (int mx = 0; mx < 2; mx++) {
      cm_kernel k;
      cm_kernel_init(&k, "kcol");
      int bx = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, n, -1, 0);
      int by = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, n, -1, 0);
      int bz = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, D, -1, 0);
      int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, D, -1, 0);
      int bo2 = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F64, D, -1, 0);
      cm_kstage *s = cm_kernel_add_stage(&k, "col");
      s->n_dom = 1, s->dom[0] = D, s->n_parallel = 1;
      s->n_red = 2, s->red[0] = R1, s->red[1] = R2;
      s->red_op = mx ? CM_KRED_MAX : CM_KRED_SUM, s->acc_dtype = CM_F32;
      int vd = cm_kx_var(s, 0), r1 = cm_kx_var(s, 1), r2 = cm_kx_var(s, 2);
      int idx = cm_kx_iadd(s,
                           cm_kx_iadd(s, cm_kx_imul(s, r1, cm_kx_iconst(s, R2 * D)),
                                      cm_kx_imul(s, r2, cm_kx_iconst(s, D))),
                           vd);
      int x = cm_kx_load(s, &k, bx, idx), y = cm_kx_load(s, &k, by, idx);
      int z = cm_kx_load(s, &k, bz, vd);
      s->body = cm_kx_op(s, CM_OP_ADD, CM_F32, cm_kx_op(s, CM_OP_MUL, CM_F32, x, y, -1), z, -1);
      int acc = cm_kx_acc(s);
      s->stores[s->n_stores++] = (cm_kstore){bo, vd, acc};
      s->stores[s->n_stores++] =
          (cm_kstore){bo2, vd,
                      cm_kx_op(s, CM_OP_MUL, CM_F64, cm_kx_op(s, CM_OP_CAST, CM_F64, acc, -1, -1),
                               cm_kx_const(s, CM_F64, 0.5), -1)};
      char *ir = render_text(j, &k);
      CHECK_MSG(ir && strstr(ir, "colacc"), "shape %zu: not rendered as a column reduction", si);
      free(ir);
      float *xv = malloc(sizeof(float) * (size_t)n), *yv = malloc(sizeof(float) * (size_t)n);
      float *zv = malloc(sizeof(float) * (size_t)D), *ov = malloc(sizeof(float) * (size_t)D);
      double *o2 = malloc(sizeof(double) * (size_t)D);
      for (int64_t i = 0; i < n; i++) xv[i] = (float)urand(-2, 2), yv[i] = (float)urand(-2, 2);
      for (int64_t i = 0; i < D; i++) zv[i] = (float)urand(-1, 1), ov[i] = NAN, o2[i] = NAN;
      char *bufs[] = {(char *)xv, (char *)yv, (char *)zv, (char *)ov, (char *)o2};
      cm_cpu_stage_fn fn[1];
      if (test_jit_kernel(j, &k, NULL, fn)) {
        int64_t cuts[3] = {1, D / 3 + 1, D - 1};
        run_cuts(fn[0], bufs, D, cuts, 3);
        /* the stage's graph: red over axes 0, 1 of x * y + z */
        cm_graph *g = cm_graph_new();
        int64_t dims[3] = {R1, R2, D};
        int gx = cm_input(g, "x", CM_F32, 3, dims), gy = cm_input(g, "y", CM_F32, 3, dims);
        int gz = cm_input(g, "z", CM_F32, 1, &D), ax[2] = {0, 1};
        int body = cm_binary_bcast(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, gx, gy, NULL), gz, NULL);
        int red = cm_reduce(g, mx ? CM_OP_REDUCE_MAX : CM_OP_REDUCE_SUM, body, 2, ax, false, "col");
        CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
        cm_tensor tx = test_view(g->nodes[gx].type, xv), ty = test_view(g->nodes[gy].type, yv);
        cm_tensor tz = test_view(g->nodes[gz].type, zv), to = test_view(g->nodes[red].type, ov);
        const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
        src[gx] = &tx, src[gy] = &ty, src[gz] = &tz;
        test_oracle o;
        cm_err err = {0};
        char what[64];
        snprintf(what, sizeof what, "column %s [%lld|%lldx%lld]", mx ? "max" : "sum", (long long)D,
                 (long long)R1, (long long)R2);
        if (test_oracle_eval(&o, g, src, &err) == CM_OK)
          expect_bounded(&o, red, &to, what);
        else
          CHECK_MSG(false, "%s: eval: %s", what, err.msg);
        test_oracle_free(&o);
        free(src);
        cm_graph_free(g);
        /* the f64 store: the f32 accumulator times 0.5, exactly */
        int bad = 0;
        for (int64_t dd = 0; dd < D; dd++) bad += o2[dd] != 0.5 * (double)ov[dd];
        CHECK_MSG(bad == 0, "%s: %d f64 stores are not 0.5 x the f32 sum", what, bad);
      }
      free(xv), free(yv), free(zv), free(ov), free(o2);
      cm_kernel_free(&k);
    }
  }
  cm_jit_destroy(j);
}

/* An all-parallel [P, Q] update (every var a work item) with loop-invariant
 * scalars: rendered as runs of the innermost var, vectorized, the pow of two
 * scalars out of the loop; run over cuts that split rows. */
static void test_elementwise_runs(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  enum { P = 7, Q = 131 };
  cm_kernel k;
  cm_kernel_init(&k, "kupd");
  int bp = cm_kernel_add_buffer(&k, CM_KBUF_SOURCE, CM_F32, P * Q, -1, 0);
  int bg = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, P * Q, -1, 0);
  int bb = cm_kernel_add_buffer(&k, CM_KBUF_SOURCE, CM_F32, 1, -1, 0);
  int bt = cm_kernel_add_buffer(&k, CM_KBUF_SOURCE, CM_F32, 1, -1, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, P * Q, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "upd");
  s->n_dom = 2, s->dom[0] = P, s->dom[1] = Q, s->n_parallel = 2;
  int i = cm_kx_iadd(s, cm_kx_imul(s, cm_kx_var(s, 0), cm_kx_iconst(s, Q)), cm_kx_var(s, 1));
  int zero = cm_kx_iconst(s, 0);
  int beta = cm_kx_load(s, &k, bb, zero), t = cm_kx_load(s, &k, bt, zero);
  int corr = cm_kx_op(s, CM_OP_SUB, CM_F32, cm_kx_const(s, CM_F32, 1),
                      cm_kx_op(s, CM_OP_POW, CM_F32, beta, t, -1), -1);
  int pv = cm_kx_load(s, &k, bp, i), gv = cm_kx_load(s, &k, bg, i);
  int np = cm_kx_op(s, CM_OP_SUB, CM_F32, pv, cm_kx_op(s, CM_OP_DIV, CM_F32, gv, corr, -1), -1);
  s->stores[s->n_stores++] = (cm_kstore){bp, i, np}; /* in place, like an assign */
  s->stores[s->n_stores++] = (cm_kstore){bo, i, cm_kx_op(s, CM_OP_MUL, CM_F32, pv, gv, -1)};
  char *ir = render_text(j, &k);
  CHECK_MSG(ir && strstr(ir, "run:") && strstr(ir, "!alias.scope"),
            "all-parallel stage: no runs or no alias scopes in the IR");
  free(ir);
  char *opt = optimized_text(j, &k);
  if (opt) {
    /* the runs vectorize, and the pow of the two scalars is computed once, before them */
    CHECK_MSG(strstr(opt, " x float>") != NULL, "all-parallel stage not vectorized");
    int pows = 0;
    for (size_t at = 0; opt[at]; at++) pows += !strncmp(opt + at, "@llvm.pow.f32(", 14);
    CHECK_MSG(pows <= 2, "pow not hoisted: %d calls", pows); /* the declaration and one call */
  }
  free(opt);
  float pvv[P * Q], p0[P * Q], gvv[P * Q], ov[P * Q], b = 0.9f, tt = 7;
  for (int e = 0; e < P * Q; e++)
    p0[e] = pvv[e] = (float)urand(-1, 1), gvv[e] = (float)urand(-1, 1);
  char *bufs[] = {(char *)pvv, (char *)gvv, (char *)&b, (char *)&tt, (char *)ov};
  cm_cpu_stage_fn fn[1];
  if (test_jit_kernel(j, &k, NULL, fn)) {
    int64_t cuts[4] = {1, 130, 132, 500}; /* inside rows, at the end of one, across two */
    run_cuts(fn[0], bufs, P * Q, cuts, 4);
    /* the stage's graph: p - g / (1 - beta^t) */
    cm_graph *g = cm_graph_new();
    int64_t dims[2] = {P, Q}, one[1] = {1};
    int gp = cm_input(g, "p", CM_F32, 2, dims), gg = cm_input(g, "g", CM_F32, 2, dims);
    int gb = cm_input(g, "beta", CM_F32, 1, one), gt = cm_input(g, "t", CM_F32, 1, one);
    int gc = cm_binary(g, CM_OP_SUB, cm_const_fill(g, NULL, CM_F32, 1, one, 1),
                       cm_binary(g, CM_OP_POW, gb, gt, NULL), NULL);
    int gn = cm_binary(g, CM_OP_SUB, gp, cm_binary_bcast(g, CM_OP_DIV, gg, gc, NULL), "p_new");
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    cm_tensor tp = test_view(g->nodes[gp].type, p0), tg = test_view(g->nodes[gg].type, gvv);
    cm_tensor tb = test_view(g->nodes[gb].type, &b), tt2 = test_view(g->nodes[gt].type, &tt);
    cm_tensor tn = test_view(g->nodes[gn].type, pvv);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    src[gp] = &tp, src[gg] = &tg, src[gb] = &tb, src[gt] = &tt2;
    test_oracle o;
    cm_err err = {0};
    if (test_oracle_eval(&o, g, src, &err) == CM_OK)
      expect_bounded(&o, gn, &tn, "all-parallel update");
    else
      CHECK_MSG(false, "all-parallel update: eval: %s", err.msg);
    test_oracle_free(&o);
    free(src);
    cm_graph_free(g);
    /* the product is one rounding: exact */
    int bad = 0;
    for (int e = 0; e < P * Q; e++) bad += ov[e] != p0[e] * gvv[e];
    CHECK_MSG(bad == 0, "all-parallel update: %d products differ", bad);
  }
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

/* A concat along an outer axis (three [P, 4, R] inputs into [P, 12, R]) and a
 * padded outer axis: the SELECTs branch (their condition is the same along the
 * inner loop), the halves vectorize, every element is right. */
static void test_select_branches(void) {
  cm_jit *j = test_new_jit();
  if (!j) return;
  enum { P = 5, H = 4, R = 37 };
  cm_kernel k;
  cm_kernel_init(&k, "kcat");
  int bin[3];
  for (int i = 0; i < 3; i++)
    bin[i] = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, P * H * R, -1, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, P * (3 * H + 2) * R, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "cat");
  /* out[p, h, r] for h < 3H + 2: 0 for h = 0 and h = 3H + 1 (padding), else the concat at h - 1 */
  s->n_dom = 3, s->dom[0] = P, s->dom[1] = 3 * H + 2, s->dom[2] = R, s->n_parallel = 1;
  int vp = cm_kx_var(s, 0), vh = cm_kx_var(s, 1), vr = cm_kx_var(s, 2);
  int hc = cm_kx_iadd(s, vh, cm_kx_iconst(s, -1));
  int v = -1;
  for (int i = 2; i >= 0; i--) {
    int hi = cm_kx_iadd(s, hc, cm_kx_iconst(s, -i * H));
    hi = cm_kx_op(s, CM_OP_MIN, CM_I64, cm_kx_op(s, CM_OP_MAX, CM_I64, hi, cm_kx_iconst(s, 0), -1),
                  cm_kx_iconst(s, H - 1), -1);
    int idx = cm_kx_iadd(
        s,
        cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vp, cm_kx_iconst(s, H)), hi), cm_kx_iconst(s, R)),
        vr);
    int x = cm_kx_load(s, &k, bin[i], idx);
    v = v < 0
            ? x
            : cm_kx_op(s, CM_OP_SELECT, CM_F32,
                       cm_kx_op(s, CM_OP_LT, CM_BOOL, hc, cm_kx_iconst(s, (i + 1) * H), -1), x, v);
  }
  int inside =
      cm_kx_op(s, CM_OP_SELECT, CM_BOOL, cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), hc, -1),
               cm_kx_op(s, CM_OP_LT, CM_BOOL, hc, cm_kx_iconst(s, 3 * H), -1),
               cm_kx_op(s, CM_OP_LE, CM_BOOL, cm_kx_iconst(s, 0), hc, -1));
  v = cm_kx_op(s, CM_OP_SELECT, CM_F32, inside, v, cm_kx_const(s, CM_F32, 0));
  int oi =
      cm_kx_iadd(s,
                 cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, vp, cm_kx_iconst(s, 3 * H + 2)), vh),
                            cm_kx_iconst(s, R)),
                 vr);
  s->stores[s->n_stores++] = (cm_kstore){bo, oi, cm_kx_op(s, CM_OP_MUL, CM_F32, v, v, -1)};
  char *ir = render_text(j, &k);
  CHECK_MSG(ir && strstr(ir, "sel.t"), "concat: the SELECTs do not branch");
  free(ir);
  char *opt = optimized_text(j, &k);
  CHECK_MSG(opt && strstr(opt, " x float>"), "concat: not vectorized");
  free(opt);
  static float in[3][P * H * R], out[P * (3 * H + 2) * R];
  for (int i = 0; i < 3; i++)
    for (int e = 0; e < P * H * R; e++) in[i][e] = (float)urand(-2, 2);
  char *bufs[] = {(char *)in[0], (char *)in[1], (char *)in[2], (char *)out};
  cm_cpu_stage_fn fn[1];
  if (test_jit_kernel(j, &k, NULL, fn)) {
    int64_t cuts[2] = {2, 3};
    run_cuts(fn[0], bufs, P, cuts, 2);
    int bad = 0;
    for (int p = 0; p < P; p++)
      for (int h = 0; h < 3 * H + 2; h++)
        for (int r = 0; r < R; r++) {
          int c = h - 1;
          float x = c < 0 || c >= 3 * H ? 0 : in[c / H][(p * H + c % H) * R + r];
          bad += out[(p * (3 * H + 2) + h) * R + r] != x * x;
        }
    CHECK_MSG(bad == 0, "concat: %d wrong elements", bad);
  }
  cm_kernel_free(&k);
  cm_jit_destroy(j);
}

/* ---- graphs against the oracle -------------------------------------------- */

/* Bias-gradient-like column sums (and a max) of elementwise expressions over
 * leading axes, plus AdamW's update of a [P, Q] param with pow(beta, t). */
static void test_graphs(void) {
  static const int64_t shapes[][3] = {{1, 1, 300}, {3, 7, 515}, {64, 13, 4}, {2, 67, 263}};
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
    cm_graph *g = cm_graph_new();
    int x = cm_input(g, "x", CM_F32, 3, shapes[si]), y = cm_input(g, "y", CM_F32, 3, shapes[si]);
    int e = cm_unary(g, CM_OP_ERF, cm_binary(g, CM_OP_MUL, x, y, NULL), NULL);
    int ax[2] = {0, 1};
    int r = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_ADD, e, x, NULL), 2, ax, false, NULL);
    int m = cm_reduce(g, CM_OP_REDUCE_MAX, cm_binary(g, CM_OP_SUB, x, y, NULL), 2, ax, false, NULL);
    cm_graph_add_output(g, r, NULL);
    cm_graph_add_output(g, m, NULL);
    cm_graph_add_output(g, e, NULL);
    /* the same elements in another shape: one output stage stores both */
    int64_t flat[2] = {shapes[si][0] * shapes[si][1], shapes[si][2]};
    int e2 = cm_reshape(g, cm_binary(g, CM_OP_MUL, e, y, NULL), 2, flat, NULL);
    cm_graph_add_output(g, cm_unary(g, CM_OP_EXP, e2, NULL), NULL);
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    fill_sources(g, t, src);
    char what[64];
    snprintf(what, sizeof what, "column sums shape %zu", si);
    int tm = check_vs_oracle(g, src, false, "reduce_sum", what);
    CHECK_MSG(tm == CM_KT_NONE, "%s: no reduce_sum stage", what);
    check_vs_oracle(g, src, false, "_out", what);
    CHECK_MSG(n_matching == 1, "%s: %d output stages, want 1", what, n_matching);
    free_sources(g, t, src);
    cm_graph_free(g);
  }
  /* the reduction of a group output reads the stored output: its stage comes first */
  {
    int64_t d[3] = {5, 13, 263};
    cm_graph *g = cm_graph_new();
    int x = cm_input(g, "x", CM_F32, 3, d), y = cm_input(g, "y", CM_F32, 3, d);
    int e = cm_unary(g, CM_OP_ERF, cm_binary(g, CM_OP_MUL, x, y, NULL), NULL);
    int ax[2] = {0, 1};
    cm_graph_add_output(g, e, NULL);
    cm_graph_add_output(g, cm_reduce(g, CM_OP_REDUCE_SUM, e, 2, ax, false, NULL), NULL);
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    fill_sources(g, t, src);
    check_vs_oracle(g, src, false, "s1_reduce_sum", "reduction of an output");
    CHECK_MSG(n_matching == 1, "reduction of an output: not after the output's stage");
    free_sources(g, t, src);
    cm_graph_free(g);
  }
  /* pow per element at its edges (negative bases with integer and fractional
     exponents, zeros, infinities, NaN) against the oracle, element by element */
  {
    static const float pa[][2] = {{-2, 3},        {-2, 2},        {-2, 0.5f},     {0, 0},
                                  {0, -1},        {-0.0f, -3},    {0, 2.5f},      {1, NAN},
                                  {NAN, 0},       {INFINITY, -2}, {-INFINITY, 3}, {0.5f, INFINITY},
                                  {2, -INFINITY}, {-1, INFINITY}, {1e-30f, 2},    {3.7f, 1.3f},
                                  {1e10f, 4}};
    enum { NP = sizeof pa / sizeof pa[0] };
    int64_t d[1] = {NP};
    cm_graph *g = cm_graph_new();
    int a = cm_input(g, "a", CM_F32, 1, d), b = cm_input(g, "b", CM_F32, 1, d);
    cm_graph_add_output(g, cm_binary(g, CM_OP_POW, a, b, NULL), NULL);
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    fill_sources(g, t, src);
    for (int i = 0; i < NP; i++)
      cm_tensor_set_f64(&t[a], i, pa[i][0]), cm_tensor_set_f64(&t[b], i, pa[i][1]);
    cm_err err = {0};
    test_oracle v;
    CHECK_MSG(test_oracle_eval(&v, g, src, &err) == CM_OK, "pow: eval: %s", err.msg);
    cm_compile_opts o = {.threads = 2, .cache_dir = ""};
    cm_program *pr = NULL;
    cm_tensor out = {0};
    if (cm_compile(g, NULL, &o, &pr, &err) == CM_OK &&
        cm_program_run(pr, (cm_tensor *const *)src, &out, &err) == CM_OK) {
      /* finite results within their bounds, NaN and infinities exact, an f64
         value beyond f32's range the infinity it rounds to; and the sign */
      int y = g->outputs[0];
      expect_bounded(&v, y, &out, "pow edge cases");
      for (int i = 0; i < NP; i++) {
        double got = cm_tensor_get_f64(&out, i), want = cm_tensor_get_f64(&v.val[y], i);
        double want32 = cm_round_to_dtype(want, CM_F32);
        CHECK_MSG((isnan(want) || signbit(got) == signbit(want)) &&
                      (!isinf(want32) || got == want32),
                  "pow(%g, %g) = %g, oracle %g", (double)pa[i][0], (double)pa[i][1], got, want);
      }
    } else {
      CHECK_MSG(false, "pow: %s", err.msg);
    }
    cm_tensor_free(&out);
    cm_program_free(pr);
    test_oracle_free(&v);
    free_sources(g, t, src);
    cm_graph_free(g);
  }
  /* AdamW-like: p -= lr * m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps); t a state */
  for (int shape = 0; shape < 2; shape++) {
    int64_t d[2] = {shape ? 1 : 7, shape ? 263 : 131}, one[1] = {1};
    cm_graph *g = cm_graph_new();
    cm_init init = {CM_INIT_UNIFORM, -1, 1};
    int p = cm_param(g, "p", CM_F32, 2, d, init);
    int gr = cm_input(g, "g", CM_F32, 2, d);
    int v = cm_state(g, "v", CM_F32, 2, d, init);
    int ts = cm_state(g, "t", CM_F32, 1, one, init);
    int t1 = cm_binary(g, CM_OP_ADD, ts, cm_const_fill(g, NULL, CM_F32, 1, one, 3), NULL);
    int b2 = cm_const_fill(g, NULL, CM_F32, 1, one, 0.999);
    int c2 = cm_binary(g, CM_OP_SUB, cm_const_fill(g, NULL, CM_F32, 1, one, 1),
                       cm_binary(g, CM_OP_POW, b2, t1, NULL), NULL);
    int nv = cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, v, v, NULL),
                       cm_binary(g, CM_OP_MUL, gr, gr, NULL), NULL);
    int den = cm_binary_bcast(g, CM_OP_DIV, nv, c2, NULL);
    den = cm_binary(g, CM_OP_ADD, cm_unary(g, CM_OP_SQRT, den, NULL),
                    cm_const_fill(g, NULL, CM_F32, 2, d, 1e-3), NULL);
    int np = cm_binary(g, CM_OP_SUB, p, cm_binary(g, CM_OP_DIV, gr, den, NULL), NULL);
    cm_assign(g, p, np, NULL);
    cm_assign(g, v, nv, NULL);
    cm_assign(g, ts, t1, NULL);
    cm_graph_add_output(g, cm_reduce(g, CM_OP_REDUCE_SUM, np, 1, (int[]){1}, false, NULL), NULL);
    CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    fill_sources(g, t, src);
    check_vs_oracle(g, src, false, "", shape ? "update [1x263]" : "update [7x131]");
    free_sources(g, t, src);
    cm_graph_free(g);
  }
}

static void test_report(void) {
  test_tally_report("mem_stages");
}

TEST_MAIN(TEST(test_conv_grad_weight), TEST(test_column_reductions), TEST(test_elementwise_runs),
          TEST(test_select_branches), TEST(test_graphs), TEST(test_report))
