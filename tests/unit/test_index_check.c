/* tests/unit/test_index_check.c — gather and scatter_add indices outside their
 * axis are an error on every backend, with the same message: the oracle
 * (cm_eval) and the CPU executor (which clamped them and returned garbage)
 * both give CM_EINVALID naming the node, the index, its position and the bound.
 * In-range indices give the oracle's values. */
#include "../test.h"
#include "runtime/runtime.h"

#include <stdint.h>

/* Sources of g: every input from vals (by node id; NULL: zeros), params zero. */
typedef struct run_result {
  cm_status st;
  cm_err err;
  cm_tensor out; /* output 0 */
} run_result;

static void set_all(cm_tensor *t, const double *v) {
  for (int64_t i = 0; v && i < cm_type_numel(&t->type); i++) cm_tensor_set_f64(t, i, v[i]);
}

static cm_tensor *make_sources(const cm_graph *g, const double *const *vals) {
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  for (int i = 0; i < g->n_nodes; i++) {
    cm_op op = g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&src[i], g->nodes[i].type, NULL) == CM_OK);
    set_all(&src[i], vals[i]);
  }
  return src;
}

static void free_sources(const cm_graph *g, cm_tensor *src) {
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  free(src);
}

static run_result run_oracle(const cm_graph *g, const double *const *vals) {
  run_result r;
  memset(&r, 0, sizeof r);
  cm_tensor *src = make_sources(g, vals);
  const cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) ptr[i] = src[i].data ? &src[i] : NULL;
  cm_tensor *v = calloc((size_t)g->n_nodes, sizeof *v);
  cm_eval_opts o = {CM_PRECISION_NATIVE};
  r.st = cm_eval(g, ptr, v, &o, &r.err);
  if (r.st == CM_OK) {
    cm_tensor_copy(&r.out, &v[g->outputs[0]], NULL);
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&v[i]);
  }
  free(v);
  free(ptr);
  free_sources(g, src);
  return r;
}

/* The CPU executor, built once and run `runs` times on the same sources. */
static run_result run_cpu(const cm_graph *g, const double *const *vals, int threads, int runs) {
  run_result r;
  memset(&r, 0, sizeof r);
  cm_compile_opts o = {.threads = threads, .cache_dir = ""};
  cm_program *pr = NULL;
  r.st = cm_compile(g, NULL, &o, &pr, &r.err);
  CHECK_MSG(r.st == CM_OK, "build: %s", r.err.msg);
  if (r.st) return r;
  cm_tensor *src = make_sources(g, vals);
  cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) ptr[i] = src[i].data ? &src[i] : NULL;
  cm_tensor *outs = calloc((size_t)g->n_outputs + 1, sizeof *outs);
  for (int k = 0; k < runs; k++) {
    r.st = cm_program_run(pr, ptr, outs, &r.err);
    if (r.st == CM_OK && k + 1 < runs)
      for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&outs[j]);
  }
  if (r.st == CM_OK) {
    r.out = outs[0];
    for (int j = 1; j < g->n_outputs; j++) cm_tensor_free(&outs[j]);
  }
  free(outs);
  free(ptr);
  free_sources(g, src);
  cm_program_free(pr);
  return r;
}

/* Both backends: CM_EINVALID with expect in the message (the oracle's and the
 * CPU's messages equal), or CM_OK with equal outputs. */
static void check_both(const cm_graph *g, const double *const *vals, const char *expect,
                       const char *what) {
  run_result ref = run_oracle(g, vals);
  for (int threads = 1; threads <= 2; threads++) {
    run_result cpu = run_cpu(g, vals, threads, 1);
    if (expect) {
      CHECK_MSG(ref.st == CM_EINVALID, "%s: oracle status %d", what, (int)ref.st);
      CHECK_MSG(cpu.st == CM_EINVALID, "%s: cpu status %d (%d threads)", what, (int)cpu.st,
                threads);
      CHECK_MSG(strstr(ref.err.msg, expect) != NULL, "%s: oracle: \"%s\" lacks \"%s\"", what,
                ref.err.msg, expect);
      CHECK_MSG(strcmp(cpu.err.msg, ref.err.msg) == 0, "%s: cpu \"%s\" vs oracle \"%s\"", what,
                cpu.err.msg, ref.err.msg);
    } else {
      CHECK_MSG(ref.st == CM_OK, "%s: oracle: %s", what, ref.err.msg);
      CHECK_MSG(cpu.st == CM_OK, "%s: cpu: %s", what, cpu.err.msg);
      if (ref.st == CM_OK && cpu.st == CM_OK) {
        int64_t n = cm_type_numel(&ref.out.type);
        for (int64_t i = 0; i < n; i++)
          CHECK_MSG(cm_tensor_get_f64(&cpu.out, i) == cm_tensor_get_f64(&ref.out, i),
                    "%s: element %lld: cpu %g, oracle %g", what, (long long)i,
                    cm_tensor_get_f64(&cpu.out, i), cm_tensor_get_f64(&ref.out, i));
      }
    }
    cm_tensor_free(&cpu.out);
  }
  cm_tensor_free(&ref.out);
}

static const double x23[6] = {1, 2, 3, 4, 5, 6};

/* gather along axis 1 of x [2,3] with an index [2,2] of dtype dt from the caller */
static void test_gather(void) {
  for (int d = 0; d < 2; d++) {
    cm_dtype dt = d ? CM_I64 : CM_I32;
    cm_graph *g = cm_graph_new();
    int64_t dx[2] = {2, 3}, di[2] = {2, 2};
    int x = cm_input(g, "x", CM_F32, 2, dx);
    int i = cm_input(g, "i", dt, 2, di);
    int y = cm_gather(g, x, i, 1, "g");
    cm_graph_add_output(g, y, NULL);
    CHECK(cm_graph_error(g) == NULL);
    double ok[4] = {0, 2, 1, 0}, past[4] = {0, 2, 1, 7}, neg[4] = {-1, 2, 1, 0};
    double two_bad[4] = {0, 3, -5, 0}; /* the first in row-major order is reported */
    double huge[4] = {0, 0, 0, 4294967296.0 * 4};
    const double *v_ok[2] = {x23, ok}, *v_past[2] = {x23, past}, *v_neg[2] = {x23, neg};
    const double *v_two[2] = {x23, two_bad}, *v_huge[2] = {x23, huge};
    check_both(g, v_ok, NULL, "gather in range");
    check_both(g, v_past, "nodes[2] \"g\" (gather): index 7 at [1,1] outside [0, 3)", "past");
    check_both(g, v_neg, "nodes[2] \"g\" (gather): index -1 at [0,0] outside [0, 3)", "negative");
    check_both(g, v_two, "index 3 at [0,1] outside [0, 3)", "two bad");
    if (dt == CM_I64) check_both(g, v_huge, "index 17179869184 at [1,1] outside [0, 3)", "2^34");
    /* a program that failed runs again: the next run with good indices is fine */
    cm_compile_opts o = {.threads = 1, .cache_dir = ""};
    cm_program *pr = NULL;
    cm_err err = {0};
    CHECK(cm_compile(g, NULL, &o, &pr, &err) == CM_OK);
    if (pr) {
      cm_tensor *bad = make_sources(g, v_past), *good = make_sources(g, v_ok);
      cm_tensor *pb[2] = {&bad[0], &bad[1]}, *pg[2] = {&good[0], &good[1]};
      cm_tensor out[1];
      CHECK(cm_program_run(pr, pb, out, &err) == CM_EINVALID);
      cm_status again = cm_program_run(pr, pg, out, &err);
      CHECK(again == CM_OK);
      if (again == CM_OK) { /* err still holds the first run's error */
        CHECK(cm_tensor_get_f64(&out[0], 1) == 3 && cm_tensor_get_f64(&out[0], 2) == 5);
        cm_tensor_free(&out[0]);
      }
      free_sources(g, bad);
      free_sources(g, good);
      cm_program_free(pr);
    }
    cm_graph_free(g);
  }
}

/* An index computed in the kernel (cast, arithmetic) and one broadcast from
 * [n, K] ids to [n, K, D], as the models' token gathers are: the position is
 * the index tensor's own. */
static void test_computed_and_broadcast_index(void) {
  cm_graph *g = cm_graph_new();
  int64_t dx[2] = {2, 3}, di[2] = {2, 2};
  int x = cm_input(g, "x", CM_F32, 2, dx);
  int f = cm_input(g, "f", CM_F32, 2, di);
  int i = cm_cast(g, f, CM_I32, "i");
  int one = cm_broadcast(g, cm_const_scalar(g, "one", CM_I32, 1), 2, di, NULL);
  int j = cm_binary(g, CM_OP_ADD, i, one, "j");
  int y = cm_gather(g, x, j, 1, "g");
  cm_graph_add_output(g, y, NULL);
  CHECK(cm_graph_error(g) == NULL);
  double ok[4] = {0, 1, 1, -1}, bad[4] = {0, 1, 2, 1};
  const double *v_ok[2] = {x23, ok}, *v_bad[2] = {x23, bad};
  check_both(g, v_ok, NULL, "computed in range");
  check_both(g, v_bad, "(gather): index 3 at [1,0] outside [0, 3)", "computed");
  cm_graph_free(g);

  g = cm_graph_new();
  int64_t dt3[3] = {2, 3, 4}, dids[2] = {2, 2}, col[3] = {2, 2, 1}, full[3] = {2, 2, 4};
  x = cm_input(g, "x", CM_F32, 3, dt3);
  int ids = cm_input(g, "ids", CM_I32, 2, dids);
  int idx = cm_broadcast(g, cm_reshape(g, ids, 3, col, NULL), 3, full, "idx");
  y = cm_gather(g, x, idx, 1, "tokens");
  int s = cm_unary(g, CM_OP_EXP, y, "e");
  cm_graph_add_output(g, s, NULL);
  CHECK(cm_graph_error(g) == NULL);
  double xs[24];
  for (int k = 0; k < 24; k++) xs[k] = 0.125 * k;
  double ids_ok[4] = {2, 0, 1, 1}, ids_bad[4] = {2, 0, 5, 1};
  const double *b_ok[2] = {xs, ids_ok}, *b_bad[2] = {xs, ids_bad};
  check_both(g, b_ok, NULL, "broadcast in range");
  check_both(g, b_bad, "\"tokens\" (gather): index 5 at [1,0,0] outside [0, 3)", "broadcast");
  cm_graph_free(g);
}

/* scatter_add, and its gather adjoint in one training-like graph. */
static void test_scatter_add(void) {
  cm_graph *g = cm_graph_new();
  int64_t db[2] = {2, 3}, di[2] = {2, 2};
  int base = cm_input(g, "base", CM_F32, 2, db);
  int i = cm_input(g, "i", CM_I32, 2, di);
  int u = cm_input(g, "u", CM_F32, 2, di);
  int y = cm_scatter_add(g, base, i, u, 1, "sc");
  cm_graph_add_output(g, y, NULL);
  CHECK(cm_graph_error(g) == NULL);
  double ok[4] = {2, 2, 0, 1}, bad[4] = {2, 2, 0, 3}, upd[4] = {10, 20, 30, 40};
  const double *v_ok[3] = {x23, ok, upd}, *v_bad[3] = {x23, bad, upd};
  check_both(g, v_ok, NULL, "scatter in range");
  check_both(g, v_bad, "nodes[3] \"sc\" (scatter_add): index 3 at [1,1] outside [0, 3)", "scatter");
  cm_graph_free(g);
}

/* The CUDA renderer renders the check stages (an i64 MAX reduction whose body
 * it narrows to int) into code NVRTC compiles (skipped without NVRTC). */
static void test_cuda_source(void) {
  cm_graph *g = cm_graph_new();
  int64_t dt3[3] = {2, 3, 4}, dids[2] = {2, 2}, col[3] = {2, 2, 1}, full[3] = {2, 2, 4};
  int x = cm_input(g, "x", CM_F32, 3, dt3);
  int ids = cm_input(g, "ids", CM_I32, 2, dids);
  int idx = cm_broadcast(g, cm_reshape(g, ids, 3, col, NULL), 3, full, "idx");
  int y = cm_gather(g, x, idx, 1, "tokens");
  int u = cm_unary(g, CM_OP_EXP, y, "e");
  int sc = cm_scatter_add(g, x, idx, u, 1, "sc");
  cm_graph_add_output(g, u, NULL);
  cm_graph_add_output(g, sc, NULL);
  CHECK(cm_graph_error(g) == NULL);
  cm_pass_state ps = {cm_graph_clone(g), NULL};
  cm_err err = {0};
  CHECK_MSG(cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK, "%s",
            err.msg);
  cm_kprogram kp;
  cm_target cuda_target;
  cm_target_cuda("sm_80", &cuda_target, NULL);
  cm_lower_opts lo = {&cuda_target, false, 0};
  CHECK_MSG(ps.plan && cm_lower_plan(ps.g, ps.plan, &lo, &kp, &err) == CM_OK, "%s", err.msg);
  char *src = NULL;
  int checks = 0;
  cm_cuda_render_opts ro = {NULL, false}; /* sm_80 */
  for (int i = 0; ps.plan && i < kp.n_kernels; i++) {
    for (int b = 0; b < kp.kernels[i].n_buffers; b++)
      checks +=
          kp.kernels[i].buffers[b].kind == CM_KBUF_STATUS && kp.kernels[i].buffers[b].offset == 0;
    CHECK_MSG(cm_render_cuda(&kp.kernels[i], &ro, i == 0, &src, &err) == CM_OK, "%s", err.msg);
  }
  CHECK(checks >= 2); /* the gather's and the scatter_add's */
  cm_nvrtc *nv = NULL;
  if (src && cm_nvrtc_load(&nv, &err) == CM_OK) {
    cm_cubin cb;
    cm_status st = cm_nvrtc_compile(nv, src, "index_check.cu", "sm_80", NULL, 0, &cb, &err);
    CHECK_MSG(st == CM_OK, "%s", err.msg);
    cm_cubin_free(&cb);
    cm_nvrtc_unload(nv);
  } else if (src) {
    fprintf(stderr, "  NOTICE: NVRTC cannot be loaded (%s): compile check skipped\n", err.msg);
  }
  free(src);
  if (ps.plan) cm_kprogram_free(&kp);
  cm_plan_free(ps.plan);
  cm_graph_free(ps.g);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_gather), TEST(test_computed_and_broadcast_index), TEST(test_scatter_add),
          TEST(test_cuda_source))
