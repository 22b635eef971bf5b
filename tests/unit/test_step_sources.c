/* tests/unit/test_step_sources.c — cm_train_example_sources (runtime/step_sources.c), the batch
 * and state the autotuner times whole steps on: every mask row a valid sample (ids_keep distinct
 * patch indices, ids_restore a permutation that puts them first, the mask 1 exactly off them),
 * images in [-2, 2], params as their initializers make them, the same seed the same sources;
 * the step compiled for the CPU runs on them to a finite loss; an input no training step has is
 * refused by name. */
#include "../test.h"
#include "../model_step.h"
#include "runtime/runtime.h"
#include "runtime/training.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void check_masks(const cm_graph *g, const cm_tensor *t, int L) {
  int keep = cm_graph_find(g, "ids_keep"), restore = cm_graph_find(g, "ids_restore"),
      mask = cm_graph_find(g, "mask");
  CHECK(keep >= 0 && restore >= 0 && mask >= 0);
  if (keep < 0 || restore < 0 || mask < 0) return;
  int64_t rows = g->nodes[keep].type.dims[0], kept = g->nodes[keep].type.dims[1];
  for (int64_t b = 0; b < rows; b++) {
    char *seen = calloc((size_t)L, 1);
    for (int64_t k = 0; k < kept; k++) {
      int64_t id = cm_tensor_get_i64(&t[keep], b * kept + k);
      CHECK(id >= 0 && id < L);
      if (id < 0 || id >= L) break;
      CHECK_MSG(!seen[id], "row %lld keeps patch %lld twice", (long long)b, (long long)id);
      seen[id] = 1;
      CHECK(cm_tensor_get_f64(&t[mask], b * L + id) == 0);
      /* ids_restore maps each patch to its place in keep-first order */
      CHECK(cm_tensor_get_i64(&t[restore], b * L + id) == k);
    }
    int64_t masked = 0;
    for (int p = 0; p < L; p++) masked += cm_tensor_get_f64(&t[mask], b * L + p) == 1;
    CHECK_MSG(masked == L - kept, "row %lld masks %lld of %d patches, keeps %lld", (long long)b,
              (long long)masked, L, (long long)kept);
    free(seen);
  }
}

static void test_example_sources(void) {
  cm_model_config cfg;
  cm_model m;
  cm_graph *step = test_build_step("models/cmae_vit_tiny_fmnist.json", NULL, 0, 4, NULL, &cfg, &m);
  if (!step) return;
  cm_tensor *t = calloc((size_t)step->n_nodes, sizeof *t),
            *u = calloc((size_t)step->n_nodes, sizeof *u);
  cm_err err = {0};
  CHECK_MSG(cm_train_example_sources(&cfg, step, 3, t, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_train_example_sources(&cfg, step, 3, u, &err) == CM_OK, "%s", err.msg);
  int grid = cfg.data.image_size / cfg.encoder.patch;
  check_masks(step, t, grid * grid);
  int img = cm_graph_find(step, "img");
  CHECK(img >= 0);
  double lo = 1e9, hi = -1e9;
  for (int64_t e = 0; img >= 0 && e < cm_type_numel(&step->nodes[img].type); e++) {
    double v = cm_tensor_get_f64(&t[img], e);
    lo = v < lo ? v : lo, hi = v > hi ? v : hi;
  }
  CHECK_MSG(lo >= -2 && hi <= 2 && hi - lo > 3, "images in [%g, %g]", lo, hi);
  for (int i = 0; i < step->n_nodes; i++) {
    const cm_node *n = &step->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    CHECK_MSG(t[i].data && memcmp(t[i].data, u[i].data, cm_type_nbytes(&n->type)) == 0,
              "%s differs between two calls with one seed", n->name);
    if (n->op != CM_OP_PARAM) continue;
    cm_tensor want;
    CHECK(cm_tensor_alloc(&want, n->type, &err) == CM_OK);
    CHECK(cm_init_tensor(&want, &n->attrs.init, 3, n->name, &err) == CM_OK);
    CHECK_MSG(memcmp(want.data, t[i].data, cm_type_nbytes(&n->type)) == 0, "%s", n->name);
    cm_tensor_free(&want);
  }
  /* the step runs on them */
  cm_target target;
  CHECK(cm_target_cpu(NULL, NULL, &target, &err) == CM_OK);
  cm_compile_opts co = {.threads = 2, .tune = CM_TUNE_OFF};
  cm_program *pr = NULL;
  CHECK_MSG(cm_compile(step, &target, &co, &pr, &err) == CM_OK, "%s", err.msg);
  const cm_tensor **bound = calloc((size_t)step->n_nodes, sizeof *bound);
  for (int i = 0; i < step->n_nodes; i++) bound[i] = t[i].data ? &t[i] : NULL;
  cm_tensor *out = calloc((size_t)step->n_outputs, sizeof *out);
  if (pr) {
    CHECK_MSG(cm_program_run(pr, (cm_tensor *const *)bound, out, &err) == CM_OK, "%s", err.msg);
    double loss = cm_tensor_get_f64(&out[0], 0);
    CHECK_MSG(isfinite(loss) && loss > 0, "loss %g", loss);
  }
  for (int o = 0; o < step->n_outputs; o++) cm_tensor_free(&out[o]);
  free(out);
  free(bound);
  cm_program_free(pr);
  cm_train_example_sources_free(step, t);
  cm_train_example_sources_free(step, u);
  free(t);
  free(u);
  cm_graph_free(step);
}

/* A graph with an input no training step has: refused by name, nothing left allocated. */
static void test_unknown_input(void) {
  cm_model_config cfg;
  cm_model m;
  cm_graph *step = test_build_step("models/cmae_vit_tiny_fmnist.json", NULL, 0, 2, NULL, &cfg, &m);
  if (!step) return;
  cm_input(step, "temperature", CM_F32, 0, NULL);
  cm_tensor *t = calloc((size_t)step->n_nodes, sizeof *t);
  cm_err err = {0};
  CHECK(cm_train_example_sources(&cfg, step, 1, t, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"temperature\"");
  for (int i = 0; i < step->n_nodes; i++) CHECK(t[i].data == NULL);
  free(t);
  cm_graph_free(step);
}

TEST_MAIN({"test_example_sources", test_example_sources},
          {"test_unknown_input", test_unknown_input})
