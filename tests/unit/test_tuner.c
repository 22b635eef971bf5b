/* tests/unit/test_tuner.c — the autotuner (runtime/tuner.c): cm_tune over a small graph of two
 * GEMM layers of one structure (one tunable stage, two kernels), on the CPU (measured) and on
 * the emulated CUDA device (times from cm_tune_model_cost, so the choice is known: the cheapest
 * candidate, ties to the lower point index); a second cm_tune searches nothing; cm_compile then
 * plans both kernels with the recorded point (tuned_stages) and computes the same values within
 * the oracle's bounds; CMAEC_TUNE=off and a record that no longer parses. */
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

/* tanh(tanh(x w1) w2): two kernels, one GEMM structure (w1, w2 both D x D). */
static cm_graph *two_layers(int64_t m, int64_t d) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {m, d}, wd[2] = {d, d};
  int x = cm_input(g, "x", CM_F32, 2, xd);
  int w1 = cm_input(g, "w1", CM_F32, 2, wd), w2 = cm_input(g, "w2", CM_F32, 2, wd);
  int h = cm_unary(g, CM_OP_TANH, cm_matmul(g, x, w1, false, false, "h0"), "h");
  int y = cm_unary(g, CM_OP_TANH, cm_matmul(g, h, w2, false, false, "y0"), "y");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
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
typedef struct expected {
  int distinct, occurrences;
  int kernel, stage; /* the first one */
  char hash[65];
  cm_tune_space space;
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
      if (e.distinct == 0) {
        e.distinct = 1, e.kernel = i, e.stage = s, e.space = sp;
        memcpy(e.hash, hash, sizeof hash);
      } else {
        /* this graph's tunable stages all share one structure */
        CHECK(strcmp(hash, e.hash) == 0 && s == e.stage);
      }
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

static cm_tune_key key_of(const expected *e, const cm_target *t, const cm_compile_opts *co) {
  cm_tune_key key = {.stage = e->stage, .version = CM_TUNE_SPACE_VERSION};
  memcpy(key.kernel, e->hash, sizeof key.kernel);
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

/* On the CPU: a few candidates measured (in forked children), the best checked and recorded; a
 * second tune finds it; the program compiled after plans both kernels so, and off does not. */
static void test_tune_cpu(void) {
  cm_graph *g = two_layers(70, 96);
  const char *dir = fresh_dir("cpu");
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK);
  cm_compile_opts co = {.cache_dir = dir, .threads = 2};
  expected e = expect_stages(g, &t, &co);
  CHECK(e.distinct == 1 && e.occurrences == 2);
  cm_tune_opts o = {.max_candidates = 4};
  cm_tune_stats st;
  CHECK_MSG(cm_tune(g, &t, &co, &o, &st, &err) == CM_OK, "%s", err.msg);
  int64_t want = e.space.n_points < 4 ? e.space.n_points : 4;
  CHECK(st.stages_tunable == 1 && st.searched == 1 && st.from_db == 0 && st.over_budget == 0);
  CHECK_MSG(st.candidates + st.pruned == want && st.failed == 0,
            "%d candidates, %d pruned, %d failed of %lld", st.candidates, st.pruned, st.failed,
            (long long)want);
  CHECK(st.default_ms > 0 && st.tuned_ms > 0 && st.tuned_ms <= st.default_ms);
  cm_tune_key key = key_of(&e, &t, &co);
  char point[256];
  bool found;
  best_recorded(dir, &key, point, sizeof point, &found);
  CHECK(found);
  cm_tune_point p;
  CHECK_MSG(!found || cm_tune_point_parse(&e.space, point, &p, &err) == CM_OK, "%s", err.msg);

  cm_tune_stats again;
  CHECK(cm_tune(g, &t, &co, &o, &again, &err) == CM_OK);
  CHECK(again.searched == 0 && again.from_db == 1 && again.candidates == 0);

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
  cm_graph_free(g);
}

/* A best point that no longer parses is ignored (and counted), the stage planned as lowered. */
static void test_stale_record(void) {
  cm_graph *g = two_layers(20, 40);
  const char *dir = fresh_dir("stale");
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK);
  cm_compile_opts co = {.cache_dir = dir};
  expected e = expect_stages(g, &t, &co);
  CHECK(e.distinct == 1);
  cm_tune_key key = key_of(&e, &t, &co);
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
  CHECK(ignored == e.occurrences);
  remove_dir(dir);
  cm_graph_free(g);
}

/* The emulated device's times are the cost model's: the choice is the cheapest valid candidate
 * of the first max_candidates points, ties to the lower index. */
static void test_tune_emulated(void) {
  cm_graph *g = two_layers(40, 64);
  const char *dir = fresh_dir("emu");
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
  cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_OFF, 1};
  cm_compile_opts co = {.cache_dir = dir, .backend_opts = &bo};
  expected e = expect_stages(g, &t, &co);
  CHECK(e.distinct == 1 && e.occurrences == 2);
  enum { LIMIT = 40 };
  int64_t n = e.space.n_points < LIMIT ? e.space.n_points : LIMIT;
  /* the expected choice, from the model over a fresh lowering */
  cm_compile_opts lo = co;
  lo.compile_only = lo.render_only = true;
  lo.tune = CM_TUNE_OFF;
  cm_program *pr = NULL;
  CHECK(cm_compile(g, &t, &lo, &pr, &err) == CM_OK);
  int64_t best = -1;
  double best_cost = 0;
  int valid = 0;
  for (int64_t i = 0; pr && i < n; i++) {
    cm_program *one = NULL;
    CHECK(cm_compile(g, &t, &lo, &one, &err) == CM_OK);
    if (!one) break;
    cm_kernel *k = &((cm_kprogram *)cm_program_kernels(one))->kernels[e.kernel];
    cm_tune_point p;
    cm_tune_point_at(&e.space, i, &p);
    cm_status st = cm_tune_apply(k, e.stage, &t, &p, &err);
    CHECK(st == CM_OK || st == CM_EINVALID);
    if (st == CM_OK) {
      double c = cm_tune_model_cost(k, e.stage, &t);
      valid++;
      if (best < 0 || c < best_cost) best = i, best_cost = c;
    }
    cm_program_free(one);
  }
  cm_program_free(pr);
  CHECK(best >= 0);
  cm_tune_opts o = {.max_candidates = LIMIT};
  cm_tune_stats st;
  CHECK_MSG(cm_tune(g, &t, &co, &o, &st, &err) == CM_OK, "%s", err.msg);
  CHECK(st.stages_tunable == 1 && st.searched == 1 && st.failed == 0);
  CHECK(st.candidates == valid && st.pruned == n - valid);
  CHECK_NEAR(st.tuned_ms, 2 * best_cost, 1e-12);
  cm_tune_key key = key_of(&e, &t, &co);
  CHECK_STR_CONTAINS(key.device, "emulated sm_80");
  char point[256], want[256];
  bool found;
  best_recorded(dir, &key, point, sizeof point, &found);
  cm_tune_point bp;
  cm_tune_point_at(&e.space, best, &bp);
  cm_tune_point_format(&e.space, &bp, want, sizeof want);
  CHECK_MSG(found && strcmp(point, want) == 0, "recorded %s, expected %s", found ? point : "none",
            want);
  cm_tune_stats again;
  CHECK(cm_tune(g, &t, &co, &o, &again, &err) == CM_OK);
  CHECK(again.searched == 0 && again.from_db == 1);
  int ignored = -1;
  CHECK(run_against_oracle(g, &t, &co, &ignored) == e.occurrences);
  remove_dir(dir);
  cm_graph_free(g);
}

/* the CPU test first: the children it forks need a process that has run no OpenMP */
TEST_MAIN({"test_tune_cpu", test_tune_cpu}, {"test_stale_record", test_stale_record},
          {"test_tune_emulated", test_tune_emulated})
