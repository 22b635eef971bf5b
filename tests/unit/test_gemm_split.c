/* The CPU GEMM paths of the lowering and the LLVM renderer against the oracle
 * through the whole executor, each output within its forward error bound
 * (cm_eval_bounded: any f32 summation order, with or without FMA): the K split of long GEMMs with
 * few blocks (a partial-sum GEMM over [S, .., M, N] and a sum over S), K in one kc slice (one
 * packed B panel shared by consecutive row blocks, the epilogue per micro-tile), several slices,
 * and the shuffled pack of row-major A (6 rows of 16 k). Odd shapes: 1, primes, K not a multiple of
 * anything. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "runtime/runtime.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static test_rng rng = {0x9e3779b97f4a7c15ull};
static double uniform(void) { /* [-1, 1) */
  return test_uniform(&rng) * 2.0 - 1.0;
}

typedef struct gcase {
  int64_t batch, M, N, K; /* batch 0: 2-D operands */
  bool ta, tb, epilogue;  /* epilogue: relu(C + bias[j]) */
  bool split;             /* the K split is expected */
} gcase;

CM_NO_SANITIZE_FUNCTION static void run_case(const gcase *c) {
  cm_graph *g = cm_graph_new();
  int r = c->batch ? 3 : 2;
  int64_t xd[3], wd[3];
  int o = 0;
  if (c->batch) xd[0] = wd[0] = c->batch, o = 1;
  xd[o] = c->ta ? c->K : c->M, xd[o + 1] = c->ta ? c->M : c->K;
  wd[o] = c->tb ? c->N : c->K, wd[o + 1] = c->tb ? c->K : c->N;
  int x = cm_input(g, "x", CM_F32, r, xd);
  int w = cm_input(g, "w", CM_F32, r, wd);
  int y = cm_matmul(g, x, w, c->ta, c->tb, "y");
  int bias = -1;
  if (c->epilogue) {
    int64_t bd[1] = {c->N};
    bias = cm_input(g, "bias", CM_F32, 1, bd);
    y = cm_unary(g, CM_OP_RELU, cm_binary_bcast(g, CM_OP_ADD, y, bias, "yb"), "yr");
  }
  cm_err err = {0};
  CHECK_MSG(!cm_graph_error(g), "%s", cm_graph_error(g) ? cm_graph_error(g) : "");
  if (cm_graph_error(g) || cm_graph_add_output(g, y, &err) != CM_OK) {
    cm_graph_free(g);
    return;
  }
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  const cm_tensor **srcp = calloc((size_t)g->n_nodes, sizeof *srcp);
  cm_tensor **bound = calloc((size_t)g->n_nodes, sizeof *bound);
  int ins[3] = {x, w, bias};
  for (int i = 0; i < 3; i++) {
    if (ins[i] < 0) continue;
    cm_tensor_alloc(&src[ins[i]], g->nodes[ins[i]].type, NULL);
    for (int64_t e = 0; e < cm_type_numel(&src[ins[i]].type); e++)
      cm_tensor_set_f64(&src[ins[i]], e, uniform());
    srcp[ins[i]] = bound[ins[i]] = &src[ins[i]];
  }
  test_oracle want;
  CHECK_MSG(test_oracle_eval(&want, g, srcp, &err) == CM_OK, "eval: %s", err.msg);
  for (int threads = 1; threads <= 2; threads++) {
    cm_compile_opts opts = {.threads = threads, .cache_dir = "", .profile = true};
    cm_program *pr = NULL;
    cm_status st = cm_compile(g, NULL, &opts, &pr, &err);
    CHECK_MSG(st == CM_OK, "build: %s", err.msg);
    if (st != CM_OK) break;
    cm_tensor out;
    st = cm_program_run(pr, bound, &out, &err);
    CHECK_MSG(st == CM_OK, "run: %s", err.msg);
    if (st == CM_OK) {
      char what[96];
      snprintf(what, sizeof what, "%lldx[%lldx%lld|%lld] ta %d tb %d epi %d, %d threads",
               (long long)c->batch, (long long)c->M, (long long)c->N, (long long)c->K, c->ta, c->tb,
               c->epilogue, threads);
      test_bounded e = test_oracle_check(&want, g->outputs[0], &out, what);
      CHECK_MSG(e.ratio <= 1, "%s: |cpu - f64| = %g at [%lld] exceeds its error bound %g", what,
                e.diff, (long long)e.at, e.bound);
      cm_tensor_free(&out);
    }
    /* the split shows as a partial-sum GEMM stage and its sum */
    const cm_stage_profile *sp = NULL;
    int n = cm_program_stage_profile(pr, &sp), parts = 0, sums = 0, gemms = 0;
    for (int i = 0; i < n; i++) {
      parts += strstr(sp[i].stage->name, "_kpart") != NULL;
      sums += strstr(sp[i].stage->name, "_ksum") != NULL;
      if (sp[i].stage->tmpl != CM_KT_GEMM) continue;
      gemms++;
      /* K up to 512 runs in one kc slice (the shared-B, per-micro-tile epilogue path) */
      int64_t k = sp[i].stage->red[0];
      CHECK_MSG((sp[i].stage->tiles.kc == k) == (k <= 512), "K %lld in slices of %d", (long long)k,
                sp[i].stage->tiles.kc);
    }
    CHECK_MSG(gemms == 1, "%d GEMM stages", gemms);
    CHECK_MSG(parts == (c->split ? 1 : 0) && sums == parts,
              "[%lldx%lld|%lld]: %d partial-sum stages, %d sums (split expected: %d)",
              (long long)c->M, (long long)c->N, (long long)c->K, parts, sums, c->split);
    cm_program_free(pr);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  test_oracle_free(&want);
  free(src), free(srcp), free(bound);
  cm_graph_free(g);
}

static void test_k_split(void) {
  const gcase cases[] = {
      /* weight-gradient shapes: X^T dY with K = tokens x batch */
      {0, 128, 96, 4160, true, false, false, true},
      {0, 37, 131, 2048, true, false, true, true},
      {0, 1, 1, 1024, false, false, false, true},
      {0, 7, 13, 1536, false, true, true, true},
      {0, 300, 70, 3072, true, true, false, true},
      {2, 19, 23, 1024, false, false, true, true},
      /* no split: K prime, K without a divisor giving >= 256 per part, enough blocks */
      {0, 5, 3, 1031, true, false, false, false},
      {0, 11, 17, 1287, false, false, true, false},
      {0, 961, 20, 1024, false, false, false, false},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_case(&cases[i]);
  test_tally_report("k_split");
}

static void test_slices(void) {
  const gcase cases[] = {
      {0, 1, 1, 1, false, false, false, false},
      {0, 1, 200, 509, false, false, true, false},
      /* several row blocks x several column blocks: the shared B panel changes within a
       * thread's range */
      {0, 487, 1100, 97, false, false, true, false},
      {0, 601, 131, 384, false, true, false, false},
      {0, 263, 67, 384, true, false, true, false},
      /* several kc slices (K = 513: three of 171), the epilogue after the last */
      {0, 250, 70, 513, false, false, true, false},
      {0, 61, 129, 1000, false, true, true, false},
      {3, 17, 19, 23, false, false, true, false},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_case(&cases[i]);
  test_tally_report("slices");
}

TEST_MAIN({"k_split", test_k_split}, {"slices", test_slices})
