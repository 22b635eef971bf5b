/* tests/unit/test_shards.c — data-parallel sharding (runtime/data.c, docs/data.md): the
 * global batches assembled from the shards of 2 and 3 ranks (per-rank batch B / N) equal
 * those of one process at batch B, bit for bit: samples, labels, both views and the masks,
 * across an epoch boundary. */
#include "frontend/frontend.h"
#include "runtime/training.h"
#include "tests/test.h"

#include <unistd.h>

enum { GLOBAL_BATCH = 12, SUBSET = 30, EPOCHS = 2, MAX_STEPS = 8 };

static bool have_fmnist(void) {
  return access("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", R_OK) == 0 ||
         getenv("CMAEC_FMNIST_DIR");
}

/* One step's global batch, every per-sample array concatenated per sample. */
typedef struct global_batch {
  int n;
  int64_t epoch;
  size_t sample_bytes;
  unsigned char *data; /* [GLOBAL_BATCH][sample_bytes] */
} global_batch;

static size_t sample_bytes(const cm_batch *b) {
  size_t plane = (size_t)b->chans * b->size * b->size;
  return 2 * sizeof(float) * plane + sizeof(int32_t) * (size_t)(b->n_keep + b->n_tokens) +
         sizeof(float) * (size_t)b->n_tokens + sizeof(int32_t) + sizeof(int64_t);
}

/* Sample j of b into dst. */
static void pack_sample(const cm_batch *b, int j, unsigned char *dst) {
  size_t plane = (size_t)b->chans * b->size * b->size;
  const struct {
    const void *base;
    size_t bytes;
  } parts[] = {
      {b->img, sizeof(float) * plane},
      {b->img_t, sizeof(float) * plane},
      {b->ids_keep, sizeof(int32_t) * (size_t)b->n_keep},
      {b->ids_restore, sizeof(int32_t) * (size_t)b->n_tokens},
      {b->mask, sizeof(float) * (size_t)b->n_tokens},
      {b->labels, sizeof(int32_t)},
      {b->indices, sizeof(int64_t)},
  };
  for (size_t k = 0; k < sizeof parts / sizeof parts[0]; k++) {
    memcpy(dst, (const unsigned char *)parts[k].base + (size_t)j * parts[k].bytes, parts[k].bytes);
    dst += parts[k].bytes;
  }
}

/* Runs the loader of rank `rank` of `world` (per-rank batch GLOBAL_BATCH / world) and writes
 * its samples into their places of the global batches; returns the steps seen. */
static int run_rank(const cm_dataset *d, const cm_views_opts *views, int rank, int world,
                    global_batch *steps) {
  cm_loader_opts lo = {0};
  lo.batch = GLOBAL_BATCH / world;
  lo.workers = 2;
  lo.shuffle = true;
  lo.drop_last = true;
  lo.rank = rank;
  lo.world = world;
  lo.seed = 1234;
  lo.epochs = EPOCHS;
  lo.views = *views;
  cm_loader *l = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_loader_create(d, &lo, &l, &err) == CM_OK, "%s", err.msg);
  if (!l) return 0;
  CHECK(cm_loader_steps_per_epoch(l) == SUBSET / GLOBAL_BATCH);
  int n_steps = 0;
  cm_batch b;
  while (cm_loader_next(l, &b, &err) == CM_OK && b.n > 0 && n_steps < MAX_STEPS) {
    global_batch *gb = &steps[n_steps++];
    CHECK_MSG(b.n == lo.batch, "rank %d of %d: %d samples, not %d", rank, world, b.n, lo.batch);
    if (!gb->data) {
      gb->sample_bytes = sample_bytes(&b);
      gb->data = calloc(GLOBAL_BATCH, gb->sample_bytes);
      gb->epoch = b.epoch;
    }
    CHECK(gb->sample_bytes == sample_bytes(&b) && gb->epoch == b.epoch);
    for (int j = 0; j < b.n; j++)
      pack_sample(&b, j, gb->data + (size_t)(rank * lo.batch + j) * gb->sample_bytes);
    gb->n += b.n;
  }
  CHECK_MSG(err.status == CM_OK, "%s", err.msg);
  cm_loader_free(l);
  return n_steps;
}

static void test_shards_equal_one_process(void) {
  CHECK_MSG(have_fmnist(), "dataset-fashion-mnist is not installed (scripts/install-deps.sh)");
  if (!have_fmnist()) return;
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_dataset_open_fmnist(NULL, false, &d, &err) == CM_OK, "%s", err.msg);
  if (!d) return;
  CHECK(cm_dataset_subset(d, SUBSET, &err) == CM_OK);
  cm_model_config c;
  CHECK_MSG(cm_model_config_load("models/cmae_vit_tiny_fmnist.json", NULL, 0, &c, &err) == CM_OK,
            "%s", err.msg);
  cm_views_opts views;
  cm_views_opts_from_config(&c, &views); /* SHIFT views with masks */
  global_batch one[MAX_STEPS] = {0};
  int n_one = run_rank(d, &views, 0, 1, one);
  CHECK(n_one == EPOCHS * (SUBSET / GLOBAL_BATCH));
  CHECK(n_one > 0 && one[n_one - 1].epoch == EPOCHS - 1);
  for (int world = 2; world <= 3; world++) {
    global_batch shards[MAX_STEPS] = {0};
    int n = 0;
    for (int r = 0; r < world; r++) {
      int got = run_rank(d, &views, r, world, shards);
      CHECK_MSG(r == 0 || got == n, "rank %d of %d ran %d steps, rank 0 %d", r, world, got, n);
      n = got;
    }
    CHECK(n == n_one);
    for (int s = 0; s < n && s < n_one; s++) {
      CHECK(shards[s].n == GLOBAL_BATCH && shards[s].epoch == one[s].epoch);
      CHECK_MSG(shards[s].data && one[s].data &&
                    memcmp(shards[s].data, one[s].data, GLOBAL_BATCH * one[s].sample_bytes) == 0,
                "world %d, step %d: the assembled global batch differs from one process's", world,
                s);
      free(shards[s].data);
    }
  }
  for (int s = 0; s < n_one; s++) free(one[s].data);
  cm_dataset_free(d);
}

TEST_MAIN({"shards_equal_one_process", test_shards_equal_one_process})
