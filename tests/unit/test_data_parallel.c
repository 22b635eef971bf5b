/* cm_data_parallel: the gradient buckets of a training step built for several
 * ranks. Bucket boundaries for a tiny bucket size (every gradient its own), a
 * huge one (one bucket) and the default 25 MB on cmae_vit_base's full-size
 * step; their placement (bucket i before bucket i + 1, the first before the
 * backward's last gradient); no change on one rank; a second application and a
 * graph without an optimizer refused; the pass by name through the pipeline.
 * What the reduction computes is test_eval_ranks' equivalence. */
#include "../test.h"
#include "../model_step.h"
#include "models/models.h"
#include "passes/passes.h"

#include <stdint.h>

typedef struct bucket {
  int node;           /* the all_reduce "grad_bucket_<i>" */
  int n_grads;        /* gradients packed in it */
  int64_t bytes;      /* its size */
  int64_t max_grad;   /* its largest gradient's bytes */
  int64_t first_grad; /* its first gradient's bytes */
  int first_node;     /* the node of its first (earliest) gradient */
} bucket;

/* The bucket's gradients: the leaves of the concats (a tree of them past 64 inputs) under the
 * all_reduce, each the gradient or, for a gradient of rank > 1, its flattening. */
static int bucket_leaves(const cm_graph *g, int v, int *leaves, int n) {
  const cm_node *c = &g->nodes[v];
  if (c->op != CM_OP_CONCAT) {
    leaves[n] = v;
    return n + 1;
  }
  for (int k = 0; k < c->n_inputs; k++) n = bucket_leaves(g, c->inputs[k], leaves, n);
  return n;
}

/* The graph's buckets in order: the all_reduce named grad_bucket_<i>. */
static int read_buckets(const cm_graph *g, bucket *b, int max) {
  int n = 0, *leaves = malloc(sizeof(int) * (size_t)g->n_nodes);
  for (; n < max; n++) {
    char name[32];
    snprintf(name, sizeof name, "grad_bucket_%d", n);
    int id = cm_graph_find(g, name);
    if (id < 0) break;
    const cm_node *ar = &g->nodes[id];
    CHECK(ar->op == CM_OP_ALL_REDUCE && ar->attrs.mode == CM_MODE_MEAN && ar->type.rank == 1);
    b[n] = (bucket){id, 0, cm_type_nbytes(&ar->type), 0, 0, -1};
    b[n].n_grads = bucket_leaves(g, ar->inputs[0], leaves, 0);
    for (int k = 0; k < b[n].n_grads; k++) {
      int64_t bytes = cm_type_nbytes(&g->nodes[leaves[k]].type);
      if (bytes > b[n].max_grad) b[n].max_grad = bytes;
      /* the pass flattens a gradient of rank > 1 */
      int grad = leaves[k];
      if (g->nodes[grad].op == CM_OP_RESHAPE && g->nodes[g->nodes[grad].inputs[0]].type.rank > 1)
        grad = g->nodes[grad].inputs[0];
      if (k == 0) b[n].first_grad = bytes, b[n].first_node = grad;
    }
  }
  free(leaves);
  return n;
}

/* The bytes of the gradients the updates read: one per trained param (each has a moment). */
static int64_t trained_bytes(const cm_graph *g, int *n_trained) {
  int64_t bytes = 0;
  *n_trained = 0;
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_STATE && !strncmp(g->nodes[i].name, "optimizer.exp_avg.", 18)) {
      bytes += cm_type_nbytes(&g->nodes[i].type);
      ++*n_trained;
    }
  return bytes;
}

static cm_graph *step_for(const char *path, const char *const *ov, int n_ov, int batch, int ranks) {
  cm_model_config c;
  cm_err err = {0};
  CHECK_MSG(cm_model_config_load(path, ov, n_ov, &c, &err) == CM_OK, "%s", err.msg);
  cm_model_build_opts bo = {batch, ranks, CM_F32};
  cm_model m;
  if (cm_model_build(&c, &bo, &m, &err) != CM_OK) {
    CHECK_MSG(false, "%s: %s", path, err.msg);
    return NULL;
  }
  cm_optim_config oc = test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err) == CM_OK, "%s", err.msg);
  cm_model_free(&m);
  return step;
}

/* The step with buckets of bucket_bytes; their count, or -1. */
static int bucketed(const cm_graph *step, int64_t bucket_bytes, bucket *b, int max,
                    cm_graph **out) {
  cm_graph *g = cm_graph_clone(step);
  cm_err err = {0};
  *out = NULL;
  if (cm_data_parallel(&g, 2, bucket_bytes, &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    cm_graph_free(g);
    return -1;
  }
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  *out = g;
  return read_buckets(g, b, max);
}

/* Buckets in production order, each placed after its gradients and before the next bucket;
 * together every trained gradient once. */
static void check_layout(const cm_graph *g, const bucket *b, int n, int64_t total, int n_grads) {
  int64_t sum = 0;
  int grads = 0;
  for (int i = 0; i < n; i++) {
    sum += b[i].bytes, grads += b[i].n_grads;
    if (i > 0) CHECK(b[i - 1].node < b[i].first_node && b[i - 1].node < b[i].node);
  }
  CHECK_MSG(sum == total && grads == n_grads,
            "buckets: %lld bytes, %d gradients; trained: %lld, %d", (long long)sum, grads,
            (long long)total, n_grads);
  /* overlap: the first bucket is reduced before the backward's last gradient exists */
  if (n > 1) CHECK(b[0].node < b[n - 1].first_node);
  (void)g;
}

static void test_bucket_sizes_tiny_step(void) {
  cm_graph *step = step_for("models/cmae_vit_tiny_fmnist.json", test_shrunk_vit + 3,
                            TEST_SHRUNK_VIT_N - 3, 2, 2);
  if (!step) return;
  int n_trained;
  int64_t total = trained_bytes(step, &n_trained);
  bucket b[512];
  cm_graph *g = NULL;
  /* 1 byte: every gradient its own bucket */
  int n = bucketed(step, 1, b, 512, &g);
  CHECK_MSG(n == n_trained, "%d buckets for %d gradients", n, n_trained);
  for (int i = 0; i < n; i++) CHECK(b[i].n_grads == 1);
  check_layout(g, b, n, total, n_trained);
  cm_graph_free(g);
  /* 1 TB: one bucket */
  n = bucketed(step, INT64_C(1) << 40, b, 512, &g);
  CHECK(n == 1 && b[0].n_grads == n_trained);
  check_layout(g, b, n, total, n_trained);
  cm_graph_free(g);
  /* a quarter of the total: each bucket full up to the next gradient */
  n = bucketed(step, total / 4, b, 512, &g);
  CHECK(n >= 4);
  check_layout(g, b, n, total, n_trained);
  for (int i = 0; i < n; i++) {
    CHECK(b[i].bytes <= total / 4 || b[i].n_grads == 1);
    if (i + 1 < n) CHECK(b[i].bytes + b[i + 1].first_grad > total / 4);
  }
  cm_graph_free(g);
  cm_graph_free(step);
}

/* ViT-B at full size (batch 1 a rank): 25 MB buckets, none past it (no ViT-B gradient is
 * larger: the MLP's 768 x 3072 f32 is 9.4 MB), each closed by the next gradient. */
static void test_bucket_sizes_vit_base(void) {
  cm_graph *step = step_for("models/cmae_vit_base.json", NULL, 0, 1, 2);
  if (!step) return;
  int n_trained;
  int64_t total = trained_bytes(step, &n_trained), cap = 25 * 1000 * 1000;
  bucket b[512];
  cm_graph *g = NULL;
  int n = bucketed(step, 0, b, 512, &g);
  check_layout(g, b, n, total, n_trained);
  CHECK(n * cap >= total);
  for (int i = 0; i < n; i++) {
    CHECK(b[i].bytes <= cap && b[i].max_grad < cap);
    if (i + 1 < n) CHECK(b[i].bytes + b[i + 1].first_grad > cap);
  }
  fprintf(stderr, "cmae_vit_base: %d gradients, %.1f MB in %d buckets of 25 MB\n", n_trained,
          (double)total / 1e6, n);
  cm_graph_free(g);
  cm_graph_free(step);
}

static void test_one_rank_and_refusals(void) {
  cm_graph *step = step_for("models/cmae_vit_tiny_fmnist.json", test_shrunk_vit + 3,
                            TEST_SHRUNK_VIT_N - 3, 2, 2);
  cm_graph *step1 = step_for("models/cmae_vit_tiny_fmnist.json", test_shrunk_vit + 3,
                             TEST_SHRUNK_VIT_N - 3, 4, 1);
  if (!step || !step1) {
    cm_graph_free(step), cm_graph_free(step1);
    return;
  }
  cm_err err = {0};
  /* one rank: the same graph object, untouched */
  cm_graph *same = step1;
  int nodes = step1->n_nodes;
  CHECK(cm_data_parallel(&same, 1, 0, &err) == CM_OK && same == step1 && step1->n_nodes == nodes &&
        cm_graph_find(step1, "grad_bucket_0") < 0);
  /* the pass by name: the graph's ranks (2), 25 MB buckets; a second run refused */
  cm_pass_state s = {step, NULL};
  cm_pass_stat stats[2];
  int n_stats = 0;
  CHECK_MSG(cm_pipeline_run(&s, "data_parallel", NULL, stats, 2, &n_stats, &err) == CM_OK, "%s",
            err.msg);
  step = s.g;
  CHECK(n_stats == 1 && cm_graph_find(step, "grad_bucket_0") >= 0);
  CHECK_STR_CONTAINS(stats[0].detail, "2 ranks: 1 gradient buckets");
  nodes = step->n_nodes;
  cm_graph *again = step;
  CHECK(cm_data_parallel(&again, 2, 0, &err) == CM_EINVALID && again == step &&
        step->n_nodes == nodes);
  CHECK_STR_CONTAINS(err.msg, "already has \"grad_bucket_0\"");
  /* a forward graph: no update to feed */
  cm_model_config c;
  CHECK(cm_model_config_load("models/cmae_vit_tiny_fmnist.json", test_shrunk_vit + 3,
                             TEST_SHRUNK_VIT_N - 3, &c, &err) == CM_OK);
  cm_model_build_opts bo = {2, 2, CM_F32};
  cm_model m;
  if (cm_model_build(&c, &bo, &m, &err) == CM_OK) {
    cm_graph *fwd = m.g;
    CHECK(cm_data_parallel(&fwd, 2, 0, &err) == CM_EINVALID && fwd == m.g);
    CHECK_STR_CONTAINS(err.msg, "no optimizer update");
    cm_model_free(&m);
  }
  cm_graph_free(step);
  cm_graph_free(step1);
}

TEST_MAIN(TEST(test_bucket_sizes_tiny_step), TEST(test_bucket_sizes_vit_base),
          TEST(test_one_rank_and_refusals))
