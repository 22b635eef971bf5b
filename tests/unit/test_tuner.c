/* tests/unit/test_tuner.c — the autotuner (runtime/tuner.c): cm_tune over a graph of three
 * GEMM layers, the last two of one structure (two tunable items for three stages), on the CPU
 * (measured in forked children) and on the emulated CUDA device (times from cm_tune_model_cost,
 * so the choice is known: the cheapest candidate, ties to the lower point index); a second
 * cm_tune searches nothing; cm_compile then plans every stage with the recorded point
 * (tuned_stages) and computes values within the oracle's bounds; a budget spent at once;
 * CMAEC_TUNE=off, a bad CMAEC_TUNE, and a record that no longer parses. */
#define _GNU_SOURCE
#include "../test.h"
#include "../tensor_compare.h"
#include "../testlib.h"
#include "codegen/codegen.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* tanh(tanh(tanh(x w1) w2) w3): three GEMM kernels, the last two of one structure (both read
 * the layer before from the arena), so two distinct tunable stages for three. */
static cm_graph *three_layers(int64_t m, int64_t d) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {m, d}, wd[2] = {d, d};
  int h = cm_input(g, "x", CM_F32, 2, xd);
  for (int l = 0; l < 3; l++) {
    char name[8];
    snprintf(name, sizeof name, "w%d", l);
    int w = cm_input(g, name, CM_F32, 2, wd);
    h = cm_unary(g, CM_OP_TANH, cm_matmul(g, h, w, false, false, NULL), NULL);
  }
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, h, &err) == CM_OK);
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  return g;
}

static char *fresh_dir(const char *name) {
  static char dirs[4][64];
  static int used;
  char *d = dirs[used++ % 4];
  snprintf(d, 64, "/tmp/cmaec_tuner_%s_XXXXXX", name);
  CHECK(mkdtemp(d) != NULL);
  return d;
}

static void remove_dir(const char *d) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
  CHECK(system(cmd) == 0);
}

/* The distinct tunable stages of g's program for t (what cm_tune should search), and how many
 * stages of the program they stand for. */
enum { MAX_ITEMS = 4 };
typedef struct expected {
  int distinct, occurrences;
  int kernel[MAX_ITEMS], stage[MAX_ITEMS], count[MAX_ITEMS]; /* the first of each */
  char hash[MAX_ITEMS][65];
  cm_tune_space space[MAX_ITEMS];
} expected;

static expected expect_stages(const cm_graph *g, const cm_target *t, const cm_compile_opts *co) {
  expected e = {0};
  cm_compile_opts lo = *co;
  lo.compile_only = lo.render_only = true;
  lo.tune = CM_TUNE_OFF;
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_compile(g, t, &lo, &pr, &err) == CM_OK, "%s", err.msg);
  if (!pr) return e;
  const cm_kprogram *kp = cm_program_kernels(pr);
  for (int i = 0; i < kp->n_kernels; i++)
    for (int s = 0; s < kp->kernels[i].n_stages; s++) {
      cm_tune_space sp;
      if (cm_tune_space_of(&kp->kernels[i], s, t, &sp, &err) != CM_OK || sp.n_knobs == 0) continue;
      char hash[65];
      cm_kernel_structural_hash(&kp->kernels[i], hash);
      e.occurrences++;
      int q = 0;
      while (q < e.distinct && !(strcmp(hash, e.hash[q]) == 0 && s == e.stage[q])) q++;
      if (q < e.distinct) {
        e.count[q]++;
        continue;
      }
      CHECK(e.distinct < MAX_ITEMS);
      if (e.distinct == MAX_ITEMS) break;
      e.kernel[q] = i, e.stage[q] = s, e.space[q] = sp, e.count[q] = 1;
      memcpy(e.hash[q], hash, sizeof hash);
      e.distinct++;
    }
  cm_program_free(pr);
  return e;
}

/* Runs g compiled with co (tune cached) on random inputs; every output within the oracle's
 * bounds; returns the program's tuned_stages. */
static int run_against_oracle(const cm_graph *g, const cm_target *t, const cm_compile_opts *co,
                              int *ignored) {
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_compile(g, t, co, &pr, &err) == CM_OK, "%s", err.msg);
  if (!pr) return -1;
  cm_program_stats ps;
  cm_program_stats_get(pr, &ps);
  *ignored = ps.tune_ignored;
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  const cm_tensor **bound = calloc((size_t)g->n_nodes, sizeof *bound);
  test_rng rng = {42};
  test_fill_sources(&rng, g, src, bound);
  cm_tensor out = {0};
  CHECK_MSG(cm_program_run(pr, (cm_tensor *const *)bound, &out, &err) == CM_OK, "%s", err.msg);
  test_oracle o;
  CHECK(test_oracle_eval(&o, g, bound, &err) == CM_OK);
  test_bounded b = test_oracle_check(&o, g->outputs[0], &out, "tuned");
  CHECK_MSG(b.ratio <= 1, "the tuned program is off the oracle's bound (ratio %g)", b.ratio);
  test_oracle_free(&o);
  cm_tensor_free(&out);
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  free(src);
  free(bound);
  cm_program_free(pr);
  return ps.tuned_stages;
}

static cm_tune_key key_of(const expected *e, int q, const cm_target *t, const cm_compile_opts *co) {
  cm_tune_key key = {.stage = e->stage[q], .version = CM_TUNE_SPACE_VERSION};
  memcpy(key.kernel, e->hash[q], sizeof key.kernel);
  cm_tune_device_for(t, co, key.device, sizeof key.device);
  return key;
}

static void best_recorded(const char *dir, const cm_tune_key *key, char *point, size_t size,
                          bool *found) {
  char path[256];
  snprintf(path, sizeof path, "%s/tuning.db", dir);
  cm_tune_db *db = NULL;
  cm_err err = {0};
  double ms;
  *found = false;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  if (!db) return;
  CHECK_MSG(cm_tune_db_get_best(db, key, point, size, &ms, found, &err) == CM_OK, "%s", err.msg);
  cm_tune_db_close(db);
}

static int64_t at_most(int64_t a, int64_t b) {
  return a < b ? a : b;
}

/* On the CPU: a few candidates measured (in forked children: each kernel alone, or in_step,
 * inside whole runs of the program on step sources, in rounds), the best checked and recorded;
 * a second tune finds it; the program compiled after plans every kernel so, and off does not. */
static void tune_cpu(bool in_step) {
  unsetenv("CMAEC_TUNE"); /* ctest sets it off for every other test */
  cm_graph *g = three_layers(70, 96);
  const char *dir = fresh_dir(in_step ? "step" : "cpu");
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK);
  cm_compile_opts co = {.cache_dir = dir, .threads = 2};
  expected e = expect_stages(g, &t, &co);
  CHECK(e.distinct == 2 && e.occurrences == 3);
  enum { LIMIT = 4 };
  cm_tune_opts o = {.max_candidates = LIMIT};
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  const cm_tensor **bound = calloc((size_t)g->n_nodes, sizeof *bound);
  test_rng rng = {7};
  test_fill_sources(&rng, g, src, bound);
  if (in_step) o.step_sources = (cm_tensor *const *)bound;
  cm_tune_stats st;
  CHECK_MSG(cm_tune(g, &t, &co, &o, &st, &err) == CM_OK, "%s", err.msg);
  int64_t want = 0;
  for (int q = 0; q < e.distinct; q++) want += at_most(e.space[q].n_points, LIMIT);
  CHECK(st.stages_tunable == e.distinct && st.searched == e.distinct && st.from_db == 0);
  CHECK(st.over_budget == 0);
  CHECK_MSG(st.candidates + st.pruned == want && st.failed == 0,
            "%d candidates, %d pruned, %d failed of %lld", st.candidates, st.pruned, st.failed,
            (long long)want);
  CHECK(st.default_ms > 0 && st.tuned_ms > 0 && st.tuned_ms <= st.default_ms);
  for (int q = 0; q < e.distinct; q++) {
    cm_tune_key key = key_of(&e, q, &t, &co);
    char point[256];
    bool found;
    best_recorded(dir, &key, point, sizeof point, &found);
    CHECK(found);
    cm_tune_point p;
    CHECK_MSG(!found || cm_tune_point_parse(&e.space[q], point, &p, &err) == CM_OK, "%s", err.msg);
  }

  cm_tune_stats again;
  CHECK(cm_tune(g, &t, &co, &o, &again, &err) == CM_OK);
  CHECK(again.searched == 0 && again.from_db == e.distinct && again.candidates == 0);

  int ignored = -1;
  CHECK(run_against_oracle(g, &t, &co, &ignored) == e.occurrences);
  CHECK(ignored == 0);
  co.tune = CM_TUNE_OFF;
  CHECK(run_against_oracle(g, &t, &co, &ignored) == 0);
  /* $CMAEC_TUNE decides when the options leave it to it */
  co.tune = CM_TUNE_FROM_ENV;
  setenv("CMAEC_TUNE", "off", 1);
  CHECK(run_against_oracle(g, &t, &co, &ignored) == 0);
  setenv("CMAEC_TUNE", "sometimes", 1);
  cm_program *pr = NULL;
  CHECK(cm_compile(g, &t, &co, &pr, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "CMAEC_TUNE");
  unsetenv("CMAEC_TUNE");
  remove_dir(dir);
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  free(src);
  free(bound);
  cm_graph_free(g);
}
static void test_tune_cpu(void) {
  tune_cpu(false);
}
static void test_tune_cpu_in_step(void) {
  tune_cpu(true);
}

/* A best point that no longer parses is ignored (and counted), the stage planned as lowered. */
static void test_stale_record(void) {
  unsetenv("CMAEC_TUNE");
  cm_graph *g = three_layers(20, 40);
  const char *dir = fresh_dir("stale");
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK);
  cm_compile_opts co = {.cache_dir = dir};
  expected e = expect_stages(g, &t, &co);
  CHECK(e.distinct >= 1);
  cm_tune_key key = key_of(&e, 0, &t, &co);
  char path[256];
  snprintf(path, sizeof path, "%s/tuning.db", dir);
  cm_tune_db *db = NULL;
  CHECK(cm_tune_db_open(path, &db, &err) == CM_OK && db);
  if (db) {
    CHECK(cm_tune_db_put_best(db, &key, "nosuchknob=3", 1, 2, "stale", &err) == CM_OK);
    cm_tune_db_close(db);
  }
  int ignored = -1;
  CHECK(run_against_oracle(g, &t, &co, &ignored) == 0);
  CHECK(ignored == e.count[0]);
  remove_dir(dir);
  cm_graph_free(g);
}

/* The cheapest valid candidate of item q's first n points under the cost model (ties: the lower
 * index), each applied to a fresh lowering; *valid counts those that apply. */
static int64_t cheapest(const cm_graph *g, const cm_target *t, const cm_compile_opts *lo,
                        const expected *e, int q, int64_t n, double *cost, int *valid) {
  int64_t best = -1;
  cm_err err = {0};
  for (int64_t i = 0; i < n; i++) {
    cm_program *one = NULL;
    CHECK(cm_compile(g, t, lo, &one, &err) == CM_OK);
    if (!one) break;
    cm_kernel *k = &((cm_kprogram *)cm_program_kernels(one))->kernels[e->kernel[q]];
    cm_tune_point p;
    cm_tune_point_at(&e->space[q], i, &p);
    cm_status st = cm_tune_apply(k, e->stage[q], t, &p, &err);
    CHECK(st == CM_OK || st == CM_EINVALID);
    if (st == CM_OK) {
      double c = cm_tune_model_cost(k, e->stage[q], t);
      (*valid)++;
      if (best < 0 || c < *cost) best = i, *cost = c;
    }
    cm_program_free(one);
  }
  return best;
}

/* The emulated device's times are the cost model's: the choice is the cheapest valid candidate
 * of the first max_candidates points, ties to the lower index. */
static void test_tune_emulated(void) {
  unsetenv("CMAEC_TUNE");
  cm_graph *g = three_layers(40, 64);
  const char *dir = fresh_dir("emu");
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
  cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_OFF, 1};
  cm_compile_opts co = {.cache_dir = dir, .backend_opts = &bo};
  expected e = expect_stages(g, &t, &co);
  CHECK(e.distinct >= 1 && e.occurrences == 3);
  enum { LIMIT = 24 };
  cm_compile_opts lo = co;
  lo.compile_only = lo.render_only = true;
  lo.tune = CM_TUNE_OFF;
  int64_t best[MAX_ITEMS];
  double cost[MAX_ITEMS], tuned = 0;
  int valid = 0, tried = 0;
  for (int q = 0; q < e.distinct; q++) {
    int64_t n = at_most(e.space[q].n_points, LIMIT);
    tried += (int)n;
    best[q] = cheapest(g, &t, &lo, &e, q, n, &cost[q], &valid);
    CHECK(best[q] >= 0);
    tuned += cost[q] * e.count[q];
  }
  /* a budget spent before the first item: every item over budget, nothing recorded */
  cm_tune_opts spent = {.budget_s = 1e-9, .max_candidates = LIMIT};
  cm_tune_stats st;
  CHECK_MSG(cm_tune(g, &t, &co, &spent, &st, &err) == CM_OK, "%s", err.msg);
  CHECK(st.over_budget == e.distinct && st.searched == 0 && st.candidates == 0);
  cm_tune_opts o = {.max_candidates = LIMIT};
  CHECK_MSG(cm_tune(g, &t, &co, &o, &st, &err) == CM_OK, "%s", err.msg);
  CHECK(st.stages_tunable == e.distinct && st.searched == e.distinct && st.failed == 0);
  CHECK(st.from_db == 0 && st.over_budget == 0);
  CHECK(st.candidates == valid && st.pruned == tried - valid);
  CHECK_NEAR(st.tuned_ms, tuned, 1e-12);
  for (int q = 0; q < e.distinct; q++) {
    cm_tune_key key = key_of(&e, q, &t, &co);
    CHECK_STR_CONTAINS(key.device, "emulated sm_80");
    char point[256], want[256];
    bool found;
    best_recorded(dir, &key, point, sizeof point, &found);
    cm_tune_point bp;
    cm_tune_point_at(&e.space[q], best[q], &bp);
    cm_tune_point_format(&e.space[q], &bp, want, sizeof want);
    CHECK_MSG(found && strcmp(point, want) == 0, "recorded %s, expected %s", found ? point : "none",
              want);
  }
  cm_tune_stats again;
  CHECK(cm_tune(g, &t, &co, &o, &again, &err) == CM_OK);
  CHECK(again.searched == 0 && again.from_db == e.distinct);
  int ignored = -1;
  CHECK(run_against_oracle(g, &t, &co, &ignored) == e.occurrences);
  remove_dir(dir);
  cm_graph_free(g);
}

/* the CPU test first: the children it forks need a process that has run no OpenMP */
TEST_MAIN({"test_tune_cpu", test_tune_cpu}, {"test_tune_cpu_in_step", test_tune_cpu_in_step},
          {"test_stale_record", test_stale_record}, {"test_tune_emulated", test_tune_emulated})
