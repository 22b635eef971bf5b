/* The default pipeline on every shipped variant's training step: the result
 * verifies (graph and plan), and where the oracle can afford it, evaluating
 * the optimized plan group by group gives bit for bit what the unoptimized
 * step gives once flash_backward has rewritten it (its -D/z rounds otherwise
 * than autodiff's row sum; test_flash_backward checks it against the oracle).
 * The tiny Fashion-MNIST variants are evaluated as shipped; the ImageNet-size
 * variants are evaluated with their widths and image shrunk by --set (same
 * modules, same wiring) and verified at full size. */
#include "../test.h"
#include "../testlib.h"
#include "../model_step.h"
#include "models/models.h"
#include "passes/passes.h"

#include <stdint.h>

static test_rng rng = {12345};
static double uniform(void) {
  return test_uniform(&rng);
}

static bool same_bits(const cm_tensor *a, const cm_tensor *b) {
  if (!a->data || !b->data || !cm_type_equal(&a->type, &b->type)) return false;
  return memcmp(a->data, b->data, cm_type_nbytes(&a->type)) == 0;
}

/* Builds the variant's step, runs the default pipeline; evaluates both when asked. */
static void check_variant(const char *path, const char *const *overrides, int n_overrides,
                          bool evaluate) {
  cm_model_config cfg;
  cm_err err = {0};
  CHECK_MSG(cm_model_config_load(path, overrides, n_overrides, &cfg, &err) == CM_OK, "%s", err.msg);
  cm_model_build_opts bo = {2, 1, CM_F32};
  cm_model m;
  CHECK_MSG(cm_model_build(&cfg, &bo, &m, &err) == CM_OK, "%s: %s", path, err.msg);
  if (!m.g) return;
  cm_optim_config oc = test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err) == CM_OK, "%s: %s", path,
            err.msg);
  if (!step) {
    cm_model_free(&m);
    return;
  }
  cm_pass_state s = {cm_graph_clone(step), NULL};
  cm_pipeline_opts po = {true, false, NULL, NULL};
  /* CMAEC_TEST_PIPELINE narrows the pipeline when hunting a difference. */
  const char *pipeline =
      getenv("CMAEC_TEST_PIPELINE") ? getenv("CMAEC_TEST_PIPELINE") : cm_default_pipeline;
  cm_status st = cm_pipeline_run(&s, pipeline, &po, NULL, 0, NULL, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", path, err.msg);
  if (!st && !s.plan) CHECK(cm_plan_unfused(s.g, &s.plan, &err) == CM_OK);
  CHECK(!st && s.plan);
  if (!st && s.plan && s.plan->unplanned_bytes) {
    CHECK_MSG(s.plan->arena_bytes <= s.plan->unplanned_bytes, "%s: arena above the unplanned sum",
              path);
    fprintf(stderr, "%-40s %6d nodes -> %6d, %5d kernels, arena %.1f MB of %.1f MB\n", path,
            step->n_nodes, s.g->n_nodes, s.plan->n_groups, (double)s.plan->arena_bytes / 1e6,
            (double)s.plan->unplanned_bytes / 1e6);
  }
  if (!st && evaluate) {
    /* the reference: the step with the attention backward in its flash form (its row sum
     * -D/z rounds differently from autodiff's; test_flash_backward checks it against the
     * oracle), every other pass exact */
    CHECK_MSG(cm_flash_backward(&step, NULL, &err) == CM_OK, "%s: %s", path, err.msg);
    cm_tensor *t1 = calloc((size_t)step->n_nodes, sizeof *t1);
    const cm_tensor **src1 = calloc((size_t)step->n_nodes, sizeof *src1);
    const cm_tensor **src2 = calloc((size_t)s.g->n_nodes, sizeof *src2);
    rng.s = 4242;
    test_bind_step(step, &cfg, &m, t1, src1, uniform);
    for (int i = 0; i < step->n_nodes; i++)
      if (src1[i]) {
        int j = cm_graph_find(s.g, step->nodes[i].name);
        CHECK_MSG(j >= 0, "source %s lost", step->nodes[i].name);
        if (j >= 0) src2[j] = src1[i];
      }
    cm_tensor *v1 = calloc((size_t)step->n_nodes, sizeof *v1);
    cm_tensor *v2 = calloc((size_t)s.g->n_nodes, sizeof *v2);
    cm_eval_opts eo = {CM_PRECISION_NATIVE};
    CHECK_MSG(cm_eval(step, src1, v1, &eo, &err) == CM_OK, "%s", err.msg);
    CHECK_MSG(cm_plan_eval(s.g, s.plan, src2, v2, &eo, &err) == CM_OK, "%s", err.msg);
    int compared = 0;
    for (int i = 0; i < step->n_nodes; i++) {
      bool is_out = false;
      for (int k = 0; k < step->n_outputs; k++) is_out |= step->outputs[k] == i;
      if (step->nodes[i].op != CM_OP_ASSIGN && !is_out) continue;
      int j = cm_graph_find(s.g, step->nodes[i].name);
      if (j < 0 && is_out) { /* a renamed builder-named output: match by position */
        for (int k = 0; k < step->n_outputs; k++)
          if (step->outputs[k] == i) j = s.g->outputs[k];
      }
      /* an assign node holds the new value of its state */
      CHECK_MSG(j >= 0 && same_bits(&v1[i], &v2[j]), "%s: %s differs after the pipeline", path,
                step->nodes[i].name);
      compared++;
    }
    CHECK(compared > 10);
    fprintf(stderr, "  evaluated: %d updates and outputs bit-identical\n", compared);
    for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&v1[i]), cm_tensor_free(&t1[i]);
    for (int i = 0; i < s.g->n_nodes; i++) cm_tensor_free(&v2[i]);
    free(v1);
    free(v2);
    free(t1);
    free(src1);
    free(src2);
  }
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  cm_graph_free(step);
  cm_model_free(&m);
}

/* A case each (test_tiny_variants_evaluated:cmae_vit_tiny_fmnist): ctest runs them apart. */
static void test_tiny_variants_evaluated(void) {
  if (test_case_wanted("cmae_vit_tiny_fmnist"))
    check_variant("models/cmae_vit_tiny_fmnist.json", NULL, 0, true);
  if (test_case_wanted("cmae_convvit_tiny_fmnist"))
    check_variant("models/cmae_convvit_tiny_fmnist.json", NULL, 0, true);
}

/* The ImageNet-size variants with their dims shrunk: the same modules and
 * wiring, small enough for the oracle. */
static void test_shrunk_variants_evaluated(void) {
  check_variant("models/cmae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, true);
  check_variant("models/cmae_vit_small.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, true);
  check_variant("models/cmae_vit_large.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, true);
  check_variant("models/mae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_MAE, true);
  check_variant("models/cmae_convvit_base.json", test_shrunk_convvit, TEST_SHRUNK_CONVVIT_N, true);
}

/* Full size: built, optimized and verified (graph and plan), not evaluated. */
static void test_full_size_variants_verified(void) {
  check_variant("models/cmae_vit_base.json", NULL, 0, false);
  check_variant("models/cmae_convvit_base.json", NULL, 0, false);
}

TEST_MAIN(TEST(test_tiny_variants_evaluated), TEST(test_shrunk_variants_evaluated),
          TEST(test_full_size_variants_verified))
