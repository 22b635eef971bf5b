/* tests/model_step.h — what the tests that run a model variant's training
 * step share: the CMAE optimizer config, the sources of a step graph, and the
 * overrides that shrink the ImageNet-size variants to oracle size (same
 * modules and wiring). test_bind_step needs tests/test.h included first. */
#ifndef CMAEC_TEST_MODEL_STEP_H
#define CMAEC_TEST_MODEL_STEP_H

#include "models/models.h"
#include "passes/passes.h"

#include <stdlib.h>
#include <string.h>

/* The step's optimizer as `cmaec build --train` configures it: CMAE's
 * no-decay rule, the model's frozen params and its EMA pairs. */
static inline cm_optim_config test_model_optim(void) {
  static cm_ema_pair pairs[8];
  cm_optim_config c;
  cm_optim_config_default(&c);
  c.frozen = cm_model_frozen_substrings;
  int n = 0;
  for (; cm_model_ema_online_prefixes[n] && n < 8; n++) {
    pairs[n].online_prefix = cm_model_ema_online_prefixes[n];
    pairs[n].target_prefix = cm_model_ema_target_prefixes[n];
  }
  c.n_ema = n;
  c.ema = pairs;
  return c;
}

/* The step's masks (ids_keep, ids_restore, mask, those it has), one cm_mask_sample per row, its
 * noise from uniform(); t holds the step's sources by node id. Returns the number of rows whose
 * sample keeps other than m->n_keep tokens (0: all as the model was built for). */
static inline int test_sample_masks(const cm_graph *g, const cm_model_config *cfg,
                                    const cm_model *m, cm_tensor *t, double (*uniform)(void)) {
  int grid = cfg->data.image_size / cfg->encoder.patch, L = grid * grid;
  int batch = (int)g->nodes[m->img].type.dims[0], wrong = 0;
  int n_noise = cm_mask_noise_count(cfg->mask.kind, cfg->mask.block, grid);
  double *u = malloc(sizeof(double) * (size_t)n_noise);
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)L),
          *restore = malloc(sizeof(int32_t) * (size_t)L);
  float *mask = malloc(sizeof(float) * (size_t)L);
  for (int b = 0; b < batch; b++) {
    for (int k = 0; k < n_noise; k++) u[k] = uniform();
    int kept = cm_mask_sample(cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid, u, keep,
                              restore, mask);
    wrong += kept != m->n_keep;
    for (int k = 0; k < kept && m->ids_keep >= 0; k++)
      cm_tensor_set_i64(&t[m->ids_keep], (int64_t)b * kept + k, keep[k]);
    for (int k = 0; k < L; k++) {
      if (m->ids_restore >= 0)
        cm_tensor_set_i64(&t[m->ids_restore], (int64_t)b * L + k, restore[k]);
      if (m->mask >= 0) cm_tensor_set_f64(&t[m->mask], (int64_t)b * L + k, mask[k]);
    }
  }
  free(u);
  free(keep);
  free(restore);
  free(mask);
  return wrong;
}

#ifdef CHECK /* with tests/test.h */
/* A variant's f32 training step as `cmaec build --train` builds it: the config at path with
 * n_ov overrides ov, batch `batch`, optimizer *optim (NULL: test_model_optim()). NULL, after a
 * failed CHECK, when a part fails. cfg and model, when not NULL, receive the config and the
 * model's node ids (model->g freed: the step keeps the forward graph's node ids). */
static inline cm_graph *test_build_step(const char *path, const char *const *ov, int n_ov,
                                        int batch, const cm_optim_config *optim,
                                        cm_model_config *cfg, cm_model *model) {
  if (cfg) memset(cfg, 0, sizeof *cfg);
  if (model) memset(model, 0, sizeof *model);
  cm_model_config c;
  cm_err err = {0};
  if (cm_model_config_load(path, ov, n_ov, &c, &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    return NULL;
  }
  cm_model_build_opts bo = {batch, 1, CM_F32};
  cm_model m;
  if (cm_model_build(&c, &bo, &m, &err) != CM_OK || !m.g) {
    CHECK_MSG(false, "%s: %s", path, err.msg);
    return NULL;
  }
  cm_optim_config oc = optim ? *optim : test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err) == CM_OK, "%s: %s", path,
            err.msg);
  cm_model_free(&m);
  if (cfg) *cfg = c;
  if (model) *model = m;
  return step;
}

/* Sources for a step graph: images uniform in [-2, 2], masks sampled per
 * sample, params from their initializers, state as initialized, scalars
 * plausible. Random draws come from the caller's uniform() so each test keeps
 * its own stream. */
static inline void test_bind_step(const cm_graph *g, const cm_model_config *cfg, const cm_model *m,
                                  cm_tensor *t, const cm_tensor **src, double (*uniform)(void)) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    cm_tensor_alloc(&t[i], n->type, NULL);
    src[i] = &t[i];
    int64_t cnt = cm_type_numel(&n->type);
    if (n->op != CM_OP_INPUT) {
      CHECK(cm_init_tensor(&t[i], &n->attrs.init, 7, n->name, NULL) == CM_OK);
    } else if (!strcmp(n->name, "img") || !strcmp(n->name, "img_t")) {
      for (int64_t e = 0; e < cnt; e++) cm_tensor_set_f64(&t[i], e, uniform() * 4 - 2);
    } else if (!strcmp(n->name, "lr")) {
      cm_tensor_set_f64(&t[i], 0, 1e-3);
    } else if (!strcmp(n->name, "beta1") || !strcmp(n->name, "momentum")) {
      cm_tensor_set_f64(&t[i], 0, !strcmp(n->name, "beta1") ? 0.9 : 0.996);
    } else if (!strcmp(n->name, "beta2")) {
      cm_tensor_set_f64(&t[i], 0, 0.95);
    } else if (!strcmp(n->name, "step")) {
      cm_tensor_set_f64(&t[i], 0, 1);
    }
  }
  CHECK_MSG(test_sample_masks(g, cfg, m, t, uniform) == 0,
            "a mask sample keeps other than %d tokens", m->n_keep);
}

/* The default pipeline's graph (*g replaced) and plan, without buffer reuse: every kernel's
 * outputs are still there after a run, for kernel-by-kernel checks. */
static inline cm_plan *test_plan_without_reuse(cm_graph **g) {
  cm_pass_state ps = {*g, NULL};
  cm_err err = {0};
  CHECK_MSG(cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK &&
                ps.plan && ps.plan->offset,
            "pipeline: %s", err.msg);
  cm_graph *rg = *g = ps.g;
  cm_plan *p = ps.plan;
  if (!p || !p->offset) return p;
  int64_t end = 0;
  for (int v = 0; v < rg->n_nodes; v++)
    if (p->offset[v] >= 0) {
      p->offset[v] = end;
      end += (cm_type_nbytes(&rg->nodes[v].type) + 63) / 64 * 64;
    }
  p->arena_bytes = end;
  CHECK_MSG(cm_plan_verify(rg, p, &err) == CM_OK, "the plan without reuse: %s", err.msg);
  return p;
}

static inline char *test_cache_dir_(void) {
  static char dir[256];
  return dir;
}

static inline void test_remove_cache_(void) {
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", test_cache_dir_());
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", test_cache_dir_());
}

/* A fresh module cache for this process (/tmp/cmaec_NAME_XXXXXX), removed at exit. */
static inline const char *test_module_cache(const char *name) {
  char *dir = test_cache_dir_();
  if (!dir[0]) {
    snprintf(dir, 256, "/tmp/cmaec_%s_XXXXXX", name);
    CHECK(mkdtemp(dir) != NULL);
    atexit(test_remove_cache_);
  }
  return dir;
}
#endif

/* The ImageNet-size ViT variants shrunk; the MAE variant takes the first
 * TEST_SHRUNK_VIT_MAE of them (it has no contrastive heads). */
static const char *const test_shrunk_vit[] = {
    "data.image_size=64",       "data.master_size=72",     "data.shift=7",
    "encoder.width=32",         "encoder.heads=2",         "encoder.depth=2",
    "pixel_decoder.width=16",   "pixel_decoder.heads=2",   "pixel_decoder.depth=1",
    "feature_decoder.width=16", "feature_decoder.heads=2", "projector.hidden=16",
    "projector.out=8",          "predictor.hidden=16",     "predictor.out=8"};
#define TEST_SHRUNK_VIT_N ((int)(sizeof test_shrunk_vit / sizeof test_shrunk_vit[0]))
#define TEST_SHRUNK_VIT_MAE (TEST_SHRUNK_VIT_N - 6)
static const char *const test_shrunk_convvit[] = {"data.image_size=64",
                                                  "data.master_size=72",
                                                  "data.shift=7",
                                                  "encoder.stage_widths=[8,12,16]",
                                                  "encoder.stage_depths=[1,1,2]",
                                                  "encoder.width=16",
                                                  "encoder.depth=2",
                                                  "encoder.heads=2",
                                                  "pixel_decoder.width=16",
                                                  "pixel_decoder.heads=2",
                                                  "pixel_decoder.depth=1",
                                                  "feature_decoder.width=16",
                                                  "feature_decoder.heads=2",
                                                  "projector.hidden=16",
                                                  "projector.out=8",
                                                  "predictor.hidden=16",
                                                  "predictor.out=8"};
#define TEST_SHRUNK_CONVVIT_N ((int)(sizeof test_shrunk_convvit / sizeof test_shrunk_convvit[0]))

#endif
