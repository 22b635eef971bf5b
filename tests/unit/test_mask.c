/* Tests of the host-side masks (models/mask.c) against CMAE.md §2. */
#include "../../models/models.h"
#include "../test.h"
#include "../testlib.h"

#include <stdint.h>

static test_rng rng_state = {0x9e3779b97f4a7c15ull};
static double next_u(void) {
  return test_uniform(&rng_state);
}

/* Rank of element i among u[0..n) in a stable ascending order. */
static int stable_rank(const double *u, int n, int i) {
  int r = 0;
  for (int j = 0; j < n; j++)
    if (u[j] < u[i] || (u[j] == u[i] && j < i)) r++;
  return r;
}

/* ids_restore is the inverse of [ids_keep, masked tokens], and mask marks exactly the others. */
static void check_permutation(const int32_t *keep, const int32_t *restore, const float *mask, int L,
                              int n_keep) {
  int seen[4096] = {0};
  for (int t = 0; t < L; t++) {
    CHECK(restore[t] >= 0 && restore[t] < L);
    if (restore[t] >= 0 && restore[t] < L) seen[restore[t]]++;
  }
  for (int i = 0; i < L; i++) CHECK(seen[i] == 1);
  for (int i = 0; i < n_keep; i++) {
    CHECK(restore[keep[i]] == i);
    CHECK(mask[keep[i]] == 0.0f);
  }
  double sum = 0;
  for (int t = 0; t < L; t++) {
    CHECK(mask[t] == 0.0f || mask[t] == 1.0f);
    CHECK((mask[t] == 1.0f) == (restore[t] >= n_keep));
    sum += mask[t];
  }
  CHECK(sum == L - n_keep);
}

static void test_official_counts(void) {
  CHECK(cm_mask_noise_count("block", 2, 14) == 49);
  CHECK(cm_mask_keep_count("block", 0.65, 2, 14) == 68); /* int(49 * 0.35) = 17 cells */
  CHECK(cm_mask_noise_count("random", 2, 14) == 196);
  CHECK(cm_mask_keep_count("random", 0.75, 2, 14) == 49);
  CHECK(cm_mask_keep_count("block", 0.0, 2, 14) == 196);
  CHECK(cm_mask_keep_count("random", 0.0, 1, 14) == 196);
}

static void test_block_mask(void) {
  const int grid = 14, L = 196, cells = 7;
  for (int trial = 0; trial < 20; trial++) {
    double u[49];
    for (int i = 0; i < 49; i++) u[i] = next_u();
    if (trial == 0) u[5] = u[6] = u[7]; /* ties: the stable order decides */
    int32_t keep[196], restore[196];
    float mask[196];
    int n_keep = cm_mask_sample("block", 0.65, 2, grid, u, keep, restore, mask);
    CHECK(n_keep == 68);
    if (n_keep != 68) continue;
    check_permutation(keep, restore, mask, L, n_keep);
    for (int t = 0; t < L; t++) {
      int r = t / grid, c = t % grid, cell = (r / 2) * cells + c / 2;
      /* A token is visible iff its cell is among the 17 smallest noises. */
      bool visible = stable_rank(u, 49, cell) < 17;
      CHECK((mask[t] == 0.0f) == visible);
    }
    /* Each 2x2 block is all kept or all masked. */
    for (int cr = 0; cr < cells; cr++)
      for (int cc = 0; cc < cells; cc++) {
        float m0 = mask[(2 * cr) * grid + 2 * cc];
        CHECK(mask[(2 * cr) * grid + 2 * cc + 1] == m0);
        CHECK(mask[(2 * cr + 1) * grid + 2 * cc] == m0);
        CHECK(mask[(2 * cr + 1) * grid + 2 * cc + 1] == m0);
      }
    /* Kept tokens in ascending order, then masked ones ascending. */
    for (int i = 1; i < n_keep; i++) CHECK(keep[i] > keep[i - 1]);
    int prev = -1;
    for (int pos = n_keep; pos < L; pos++) {
      int t = -1;
      for (int s = 0; s < L; s++)
        if (restore[s] == pos) t = s;
      CHECK(t > prev);
      prev = t;
    }
  }
}

static void test_random_mask(void) {
  const int L = 196;
  for (int trial = 0; trial < 20; trial++) {
    double u[196];
    for (int i = 0; i < L; i++) u[i] = next_u();
    int32_t keep[196], restore[196];
    float mask[196];
    int n_keep = cm_mask_sample("random", 0.75, 1, 14, u, keep, restore, mask);
    CHECK(n_keep == 49);
    if (n_keep != 49) continue;
    check_permutation(keep, restore, mask, L, n_keep);
    /* ids_restore = argsort(argsort(noise)): each token's rank in the noise. */
    for (int t = 0; t < L; t++) CHECK(restore[t] == stable_rank(u, L, t));
    for (int i = 0; i < n_keep; i++) CHECK(stable_rank(u, L, keep[i]) == i);
  }
}

static void test_ratio_zero_is_identity(void) {
  const char *kinds[2] = {"block", "random"};
  for (int k = 0; k < 2; k++) {
    double u[64];
    for (int i = 0; i < 64; i++) u[i] = next_u();
    int32_t keep[64], restore[64];
    float mask[64];
    int n_keep = cm_mask_sample(kinds[k], 0.0, 2, 8, u, keep, restore, mask);
    CHECK(n_keep == 64);
    for (int t = 0; t < 64; t++) {
      CHECK(keep[t] == t);
      CHECK(restore[t] == t);
      CHECK(mask[t] == 0.0f);
    }
  }
}

static void test_other_shapes(void) {
  /* A 6x6 grid with 3x3 blocks: 4 cells, ratio 0.5 keeps 2 cells = 18 tokens. */
  double u[4] = {0.9, 0.1, 0.5, 0.3};
  int32_t keep[36], restore[36];
  float mask[36];
  int n_keep = cm_mask_sample("block", 0.5, 3, 6, u, keep, restore, mask);
  CHECK(n_keep == 18);
  if (n_keep == 18) {
    check_permutation(keep, restore, mask, 36, n_keep);
    /* Cells 1 (top right) and 3 (bottom right) are kept. */
    for (int t = 0; t < 36; t++) CHECK((mask[t] == 0.0f) == ((t % 6) >= 3));
  }
}

static void test_invalid_arguments(void) {
  double u[64] = {0.5};
  int32_t keep[64], restore[64];
  float mask[64];
  CHECK(cm_mask_sample("block", 0.65, 3, 8, u, keep, restore, mask) == -1); /* 8 % 3 */
  CHECK(cm_mask_sample("block", 1.0, 2, 8, u, keep, restore, mask) == -1);
  CHECK(cm_mask_sample("random", -0.1, 1, 8, u, keep, restore, mask) == -1);
  CHECK(cm_mask_sample("grid", 0.5, 2, 8, u, keep, restore, mask) == -1);
  CHECK(cm_mask_sample(NULL, 0.5, 2, 8, u, keep, restore, mask) == -1);
  CHECK(cm_mask_sample("random", 0.5, 1, 8, NULL, keep, restore, mask) == -1);
  CHECK(cm_mask_sample("random", 0.5, 1, 8, u, NULL, restore, mask) == -1);
  CHECK(cm_mask_sample("random", 0.99, 1, 8, u, keep, restore, mask) == -1); /* keeps 0 */
  CHECK(cm_mask_sample("random", 0.5, 1, 0, u, keep, restore, mask) == -1);
  CHECK(cm_mask_noise_count("block", 0, 8) == -1);
  CHECK(cm_mask_keep_count("block", 0.9, 2, 4) == -1); /* int(4 * 0.1) = 0 cells */
}

TEST_MAIN(TEST(test_official_counts), TEST(test_block_mask), TEST(test_random_mask),
          TEST(test_ratio_zero_is_identity), TEST(test_other_shapes), TEST(test_invalid_arguments))
