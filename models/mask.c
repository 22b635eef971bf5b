/* models/mask.c — host-side token masks (CMAE.md §2).
 *
 * "block": the official CMAE masking (cmae_vit.py::random_masking): noise on a
 * coarse grid of block x block cells, the len_keep_c = int(Lc (1 - ratio))
 * smallest cells kept, the keep map upsampled to the token grid.
 * "random": MAE's per-token masking (len_keep = int(L (1 - ratio))).
 *
 * Orders: every argsort here is stable (ties broken by index), so a mask is a
 * function of its noise. For block masks the kept tokens come first in
 * ascending token index, then the masked ones in ascending index (PyTorch's
 * unstable argsort of the keep map leaves that order arbitrary; any order is
 * equivalent because the decoder unshuffles with ids_restore). Ratio 0 gives
 * the identity for both kinds, as the official code does for its target. */
#include "models.h"

#include <stdlib.h>
#include <string.h>

typedef struct mask_key {
  double u;
  int32_t index;
} mask_key;

static int mask_key_cmp(const void *pa, const void *pb) {
  const mask_key *a = pa, *b = pb;
  if (a->u < b->u) return -1;
  if (a->u > b->u) return 1;
  return (a->index > b->index) - (a->index < b->index);
}

/* Stable ascending argsort of u[0..n) into order[0..n); false when out of memory. */
static bool mask_argsort(const double *u, int n, int32_t *order) {
  mask_key *keys = malloc((size_t)n * sizeof *keys);
  if (!keys) return false;
  for (int i = 0; i < n; i++) keys[i] = (mask_key){u[i], i};
  qsort(keys, (size_t)n, sizeof *keys, mask_key_cmp);
  for (int i = 0; i < n; i++) order[i] = keys[i].index;
  free(keys);
  return true;
}

static bool mask_is_block(const char *kind) {
  return kind && strcmp(kind, "block") == 0;
}
static bool mask_is_random(const char *kind) {
  return kind && strcmp(kind, "random") == 0;
}

/* Tokens per side are capped so L and every index fit an int32 comfortably. */
#define MASK_MAX_GRID 4096

int cm_mask_noise_count(const char *kind, int block, int grid) {
  if (grid < 1 || grid > MASK_MAX_GRID) return -1;
  if (mask_is_random(kind)) return grid * grid;
  if (!mask_is_block(kind) || block < 1 || grid % block != 0) return -1;
  return (grid / block) * (grid / block);
}

int cm_mask_keep_count(const char *kind, double ratio, int block, int grid) {
  int n_noise = cm_mask_noise_count(kind, block, grid);
  if (n_noise < 0 || !(ratio >= 0.0 && ratio < 1.0)) return -1;
  /* Same double arithmetic as Python's int(L * (1 - ratio)). */
  int keep = (int)((double)n_noise * (1.0 - ratio));
  if (keep < 1) return -1;
  return mask_is_block(kind) ? keep * block * block : keep;
}

int cm_mask_sample(const char *kind, double ratio, int block, int grid, const double *u,
                   int32_t *ids_keep, int32_t *ids_restore, float *mask) {
  int n_keep = cm_mask_keep_count(kind, ratio, block, grid);
  if (n_keep < 0 || !ids_keep || !ids_restore || !mask || (ratio > 0 && !u)) return -1;
  int L = grid * grid;
  if (ratio == 0.0) {
    for (int t = 0; t < L; t++) {
      ids_keep[t] = t;
      ids_restore[t] = t;
      mask[t] = 0.0f;
    }
    return n_keep;
  }
  int n_noise = cm_mask_noise_count(kind, block, grid);
  int32_t *order = malloc((size_t)n_noise * sizeof *order);
  int32_t *shuffle = malloc((size_t)L * sizeof *shuffle);
  if (!order || !shuffle || !mask_argsort(u, n_noise, order)) {
    free(order);
    free(shuffle);
    return -1;
  }
  if (mask_is_random(kind)) {
    memcpy(shuffle, order, (size_t)L * sizeof *shuffle);
  } else {
    int cells = grid / block, keep_cells = n_keep / (block * block);
    /* mask doubles as the upsampled keep map here (0 = kept); it is rewritten below. */
    for (int t = 0; t < L; t++) mask[t] = 1.0f;
    for (int k = 0; k < keep_cells; k++) {
      int cell = order[k], cr = cell / cells, cc = cell % cells;
      for (int dy = 0; dy < block; dy++)
        for (int dx = 0; dx < block; dx++) mask[(cr * block + dy) * grid + cc * block + dx] = 0.0f;
    }
    int pos = 0;
    for (int t = 0; t < L; t++)
      if (mask[t] == 0.0f) shuffle[pos++] = t;
    for (int t = 0; t < L; t++)
      if (mask[t] != 0.0f) shuffle[pos++] = t;
  }
  for (int i = 0; i < L; i++) ids_restore[shuffle[i]] = i;
  for (int i = 0; i < n_keep; i++) ids_keep[i] = shuffle[i];
  for (int t = 0; t < L; t++) mask[t] = ids_restore[t] >= n_keep ? 1.0f : 0.0f;
  free(order);
  free(shuffle);
  return n_keep;
}
