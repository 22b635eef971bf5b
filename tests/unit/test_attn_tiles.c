/* The whole-row attention span's GEMM stages on the CPU (render_llvm.c,
 * render_attention): each GEMM stage picks its own register block (the
 * micro-kernel's k loop is named at.kk.m<mr>n<nr>[.direct]) and stages whose
 * only store is the accumulator store straight from the micro-kernel
 * (".direct", masked at the last row and column panels). Over odd shapes
 * (N = 1, 2, 7, 13, 21, 50, 65, 97; head dim 1, 3, 5, 16, 32, 64; one or more
 * query blocks) the rendering must take those paths, the S = Q K^T stage of a
 * 65-token span must pad its columns no more than the span's block does, and
 * every output of the executor must lie within its forward error bound
 * (cm_eval_bounded, end to end: the graphs are a few ops). A operands
 * contiguous along k packed into panels of rows that are not whole vectors go
 * through transposed W x W blocks (at.packA.kt): taken at least once. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "runtime/runtime.h"

#include <llvm-c/Core.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {0x5eed2026};
static double uniform(void) {
  return test_uniform(&rng);
}

typedef struct shape {
  int64_t n, heads, tokens, dim;
  bool backward;
} shape;

/* y = softmax(q k^T / sqrt(dim)) v; with backward: the gradients of
 * loss = sum(y * dO) with respect to q, k, v are outputs too. */
static cm_graph *attention_graph(shape sh) {
  cm_graph *g = cm_graph_new();
  int64_t d[4] = {sh.n, sh.heads, sh.tokens, sh.dim};
  int q = cm_input(g, "q", CM_F32, 4, d), k = cm_input(g, "k", CM_F32, 4, d);
  int v = cm_input(g, "v", CM_F32, 4, d);
  int s = cm_matmul(g, q, k, false, true, "scores");
  s = cm_binary_bcast(g, CM_OP_MUL, s, cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)sh.dim)),
                      "scaled");
  int y = cm_matmul(g, cm_nn_softmax(g, s), v, false, false, "y");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  if (sh.backward) {
    int dout = cm_input(g, "dO", CM_F32, 4, d);
    int axes[4] = {0, 1, 2, 3};
    int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 4, axes,
                         false, "loss");
    int wrt[3] = {q, k, v}, grads[3];
    CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
    for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
  }
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  return g;
}

typedef struct found {
  int spans;        /* whole-row spans rendered */
  int packs_kt;     /* spans packing an operand contiguous along k by transposed blocks */
  int direct, tile; /* micro-kernel loops storing straight / into the C tile */
  int first_mr, first_nr, span_nr;
  int64_t first_cols; /* the first stage's columns (keys) */
} found;

/* The register blocks named in the IR of k, in order. */
static void scan_ir(const cm_kernel *k, found *f) {
  LLVMContextRef ctx = LLVMContextCreate();
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("attn", ctx);
  cm_err err = {0};
  cm_llvm_render_opts ro = {0, false, NULL};
  CHECK_MSG(cm_render_llvm(k, m, &ro, &err) == CM_OK, "render: %s", err.msg);
  char *ir = LLVMPrintModuleToString(m);
  f->packs_kt += strstr(ir, "at.packA.kt.kv") != NULL;
  bool first = true;
  for (const char *p = strstr(ir, "at.kk.m"); p; p = strstr(p + 1, "at.kk.m")) {
    /* the loop's header block, once per stage */
    if (p == ir || p[-1] != '\n') continue;
    int mr = 0, nr = 0;
    CHECK(sscanf(p, "at.kk.m%dn%d", &mr, &nr) == 2);
    CHECK_MSG(mr >= 1 && nr >= 1, "bad block name %.24s", p);
    size_t len = strcspn(p, ": \n");
    bool direct = false;
    for (size_t j = 0; j + 7 <= len && !direct; j++) direct = !strncmp(p + j, ".direct", 7);
    f->direct += direct, f->tile += !direct;
    if (first) f->first_mr = mr, f->first_nr = nr;
    first = false;
  }
  LLVMDisposeMessage(ir);
  LLVMDisposeModule(m);
  LLVMContextDispose(ctx);
}

static found scan(const cm_graph *g, const char *what) {
  found f = {0};
  cm_err err = {0};
  cm_pass_state s = {cm_graph_clone(g), NULL};
  CHECK_MSG(cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK, "%s: %s",
            what, err.msg);
  cm_lower_opts lo = {NULL, false, 0};
  cm_kprogram kp;
  CHECK_MSG(cm_lower_plan(s.g, s.plan, &lo, &kp, &err) == CM_OK, "%s: %s", what, err.msg);
  for (int i = 0; i < kp.n_kernels; i++) {
    const cm_kernel *k = &kp.kernels[i];
    for (int si = 0; si < k->n_stages; si++) {
      const cm_kstage *st = &k->stages[si];
      if ((st->tmpl != CM_KT_ATTENTION_FWD && st->tmpl != CM_KT_ATTENTION_BWD) || st->attn.stream)
        continue;
      found one = {0};
      scan_ir(k, &one);
      f.spans++;
      f.direct += one.direct, f.tile += one.tile, f.packs_kt += one.packs_kt;
      if (st->tmpl == CM_KT_ATTENTION_FWD && !f.first_nr) {
        f.first_mr = one.first_mr, f.first_nr = one.first_nr;
        f.span_nr = st->tiles.nr;
        f.first_cols = st->dom[st->attn.nb + 1];
      }
    }
  }
  cm_kprogram_free(&kp);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  return f;
}

/* The executor (fused rendering) against the bounded oracle; the worst
 * |cpu - f64| / bound. */
static double run_check(const cm_graph *g, const char *what) {
  cm_err err = {0};
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  cm_tensor **sp = calloc((size_t)g->n_nodes, sizeof *sp);
  const cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) {
    if (g->nodes[i].op != CM_OP_INPUT) continue;
    CHECK(cm_tensor_alloc(&src[i], g->nodes[i].type, NULL) == CM_OK);
    /* q wider: a softmax far from uniform */
    double w = !strcmp(g->nodes[i].name, "q") ? 3.0 : 1.0;
    for (int64_t e = 0; e < cm_type_numel(&g->nodes[i].type); e++)
      cm_tensor_set_f64(&src[i], e, w * (uniform() * 2 - 1));
    ptr[i] = &src[i], sp[i] = &src[i];
  }
  test_oracle v;
  CHECK_MSG(test_oracle_eval(&v, g, ptr, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_compile_opts o = {.threads = 2, .cache_dir = ""};
  cm_program *pr = NULL;
  double worst = INFINITY;
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_OK, "%s: %s", what, err.msg);
  if (pr) {
    cm_tensor *out = calloc((size_t)g->n_outputs, sizeof *out);
    CHECK_MSG(cm_program_run(pr, sp, out, &err) == CM_OK, "%s: %s", what, err.msg);
    worst = 0;
    for (int j = 0; j < g->n_outputs; j++) {
      test_bounded e = test_oracle_check(&v, g->outputs[j], &out[j], what);
      CHECK_MSG(e.ratio <= 1,
                "%s: output %d (%s): |cpu - f64| = %g at [%lld] exceeds its error bound %g", what,
                j, g->nodes[g->outputs[j]].name, e.diff, (long long)e.at, e.bound);
      worst = fmax(worst, e.ratio);
      cm_tensor_free(&out[j]);
    }
    free(out);
    cm_program_free(pr);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  test_oracle_free(&v);
  free(src), free(sp), free(ptr);
  return worst;
}

static void test_tiles_and_direct_stores(void) {
  const shape shapes[] = {
      {2, 4, 65, 32, true}, {2, 4, 65, 32, false}, {1, 3, 7, 5, true},   {3, 1, 13, 1, true},
      {2, 2, 21, 32, true}, {1, 2, 50, 3, false},  {1, 3, 97, 16, true}, {1, 2, 97, 64, false},
      {2, 1, 2, 5, true},   {1, 1, 1, 3, true},
  };
  int n = (int)(sizeof shapes / sizeof shapes[0]);
  int spans = 0, direct = 0, narrowed = 0, packs_kt = 0;
  for (int i = 0; i < n; i++) {
    shape sh = shapes[i];
    char what[96];
    snprintf(what, sizeof what, "%s n=%lld heads=%lld N=%lld d=%lld",
             sh.backward ? "fwd+bwd" : "fwd", (long long)sh.n, (long long)sh.heads,
             (long long)sh.tokens, (long long)sh.dim);
    cm_graph *g = attention_graph(sh);
    found f = scan(g, what);
    if (sh.tokens >= 2) {
      CHECK_MSG(f.spans >= 1, "%s: no whole-row span", what);
      /* y = P V (and the backward's GEMMs) store only their accumulator */
      CHECK_MSG(f.direct >= 1, "%s: no micro-kernel storing straight to the output", what);
    }
    if (f.first_nr > 0) {
      int64_t cols = f.first_cols;
      int64_t pad = (cols + f.first_nr - 1) / f.first_nr * f.first_nr;
      int64_t span_pad = (cols + f.span_nr - 1) / f.span_nr * f.span_nr;
      CHECK_MSG(pad <= span_pad, "%s: S pads %lld columns to %lld, the span's block to %lld", what,
                (long long)cols, (long long)pad, (long long)span_pad);
      narrowed += pad < span_pad;
    }
    spans += f.spans, direct += f.direct, packs_kt += f.packs_kt;
    double e = run_check(g, what);
    printf("  %-36s spans %d, k loops direct %d tile %d, S block %dx%d (span nr %d), err / bound "
           "%.2g\n",
           what, f.spans, f.direct, f.tile, f.first_mr, f.first_nr, f.span_nr, e);
    cm_graph_free(g);
  }
  CHECK(spans >= n - 1);
  CHECK(direct >= n - 1);
  /* 65 keys with the span's 64-wide block pad to 128: a narrower one was taken */
  CHECK(narrowed >= 1);
  /* Q (rows of head-dim floats) packed into row panels that are not whole vectors */
  CHECK(packs_kt >= 1);
  test_tally_report("attn_tiles");
}

TEST_MAIN({"tiles_and_direct_stores", test_tiles_and_direct_stores})
