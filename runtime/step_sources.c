/* runtime/step_sources.c — a valid batch and initial state for a variant's training step, with no
 * data set: what the autotuner times whole steps on (and benchmarks run). */
#include "training.h"

#include "../models/models.h"

#include <stdlib.h>
#include <string.h>

static uint64_t next_bits(uint64_t *s) { /* xorshift64*: reproducible, and good enough for pixels */
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * 0x2545F4914F6CDD1DULL;
}
static double next_uniform(uint64_t *s) {
  return (double)(next_bits(s) >> 11) * 0x1p-53;
}

static int find_input(const cm_graph *g, const char *name) {
  int id = cm_graph_find(g, name);
  return id >= 0 && g->nodes[id].op == CM_OP_INPUT ? id : -1;
}

/* One mask per row of the batch, drawn as the data loader draws them. */
static cm_status sample_masks(const cm_graph *g, const cm_model_config *cfg, cm_tensor *t,
                              uint64_t *rng, cm_err *err) {
  int keep_id = find_input(g, "ids_keep"), restore_id = find_input(g, "ids_restore"),
      mask_id = find_input(g, "mask");
  int any = keep_id >= 0 ? keep_id : restore_id >= 0 ? restore_id : mask_id;
  if (any < 0) return CM_OK;
  int grid = cfg->data.image_size / cfg->encoder.patch, L = grid * grid;
  int64_t rows = g->nodes[any].type.rank > 0 ? g->nodes[any].type.dims[0] : 1;
  int n_noise = cm_mask_noise_count(cfg->mask.kind, cfg->mask.block, grid);
  double *u = malloc(sizeof(double) * (size_t)(n_noise > 0 ? n_noise : 1));
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)L),
          *restore = malloc(sizeof(int32_t) * (size_t)L);
  float *mask = malloc(sizeof(float) * (size_t)L);
  cm_status st = CM_OK;
  if (!u || !keep || !restore || !mask) st = cm_errorf(err, CM_EINTERNAL, "out of memory");
  int64_t kept_per_row = keep_id >= 0 ? cm_type_numel(&g->nodes[keep_id].type) / rows : 0;
  for (int64_t b = 0; b < rows && st == CM_OK; b++) {
    for (int k = 0; k < n_noise; k++) u[k] = next_uniform(rng);
    int kept = cm_mask_sample(cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid, u, keep,
                              restore, mask);
    if (keep_id >= 0 && kept != kept_per_row) {
      st = cm_errorf(err, CM_EINVALID,
                     "step sources: input \"ids_keep\" keeps %lld tokens per row, the mask "
                     "(%s, ratio %g) keeps %d",
                     (long long)kept_per_row, cfg->mask.kind, cfg->mask.ratio, kept);
      break;
    }
    for (int k = 0; k < kept && keep_id >= 0; k++)
      cm_tensor_set_i64(&t[keep_id], b * kept + k, keep[k]);
    for (int k = 0; k < L; k++) {
      if (restore_id >= 0) cm_tensor_set_i64(&t[restore_id], b * L + k, restore[k]);
      if (mask_id >= 0) cm_tensor_set_f64(&t[mask_id], b * L + k, mask[k]);
    }
  }
  free(u);
  free(keep);
  free(restore);
  free(mask);
  return st;
}

/* An input's value: images uniform in [-2, 2] (the normalized pixels' range), the optimizer's
 * scalars at typical values, masks from sample_masks. */
static cm_status fill_input(const cm_node *n, cm_tensor *t, uint64_t *rng, cm_err *err) {
  static const struct {
    const char *name;
    double value;
  } scalars[] = {{"lr", 1e-4},        {"beta1", 0.9}, {"beta2", 0.95},
                 {"momentum", 0.996}, {"step", 1},    {"rank", 0}};
  int64_t count = cm_type_numel(&n->type);
  if (!strcmp(n->name, "img") || !strcmp(n->name, "img_t")) {
    for (int64_t e = 0; e < count; e++) cm_tensor_set_f64(t, e, next_uniform(rng) * 4 - 2);
    return CM_OK;
  }
  if (!strcmp(n->name, "ids_keep") || !strcmp(n->name, "ids_restore") || !strcmp(n->name, "mask"))
    return CM_OK;
  for (size_t k = 0; k < sizeof scalars / sizeof scalars[0]; k++)
    if (!strcmp(n->name, scalars[k].name)) {
      for (int64_t e = 0; e < count; e++) cm_tensor_set_f64(t, e, scalars[k].value);
      return CM_OK;
    }
  return cm_errorf(err, CM_EINVALID,
                   "step sources: input \"%s\" is not one a training step has (img, img_t, "
                   "ids_keep, ids_restore, mask, lr, beta1, beta2, step, momentum, rank)",
                   n->name);
}

cm_status cm_train_example_sources(const cm_model_config *cfg, const cm_graph *step, uint64_t seed,
                                   cm_tensor *t, cm_err *err) {
  memset(t, 0, sizeof *t * (size_t)step->n_nodes);
  uint64_t rng = seed * 0x9E3779B97F4A7C15ULL + 1;
  cm_status st = CM_OK;
  for (int i = 0; i < step->n_nodes && st == CM_OK; i++) {
    const cm_node *n = &step->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    if ((st = cm_tensor_alloc(&t[i], n->type, err)) != CM_OK) break;
    if (n->op == CM_OP_INPUT)
      st = fill_input(n, &t[i], &rng, err);
    else
      st = cm_init_tensor(&t[i], &n->attrs.init, seed, n->name, err);
  }
  if (st == CM_OK) st = sample_masks(step, cfg, t, &rng, err);
  if (st != CM_OK) cm_train_example_sources_free(step, t);
  return st;
}

void cm_train_example_sources_free(const cm_graph *step, cm_tensor *t) {
  for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&t[i]);
}
