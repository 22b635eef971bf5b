/* bench/gemm.c — GEMM throughput of the CPU backend at ViT sizes.
 *
 * Each row is one graph `out = matmul(x, w)` (or a transposed operand, as the
 * backward's dX = dY W^T and dW = X^T dY) compiled by the whole CPU backend
 * (fuse, lower to the GEMM template, LLVM JIT, OpenMP executor) and timed over
 * repeated runs. GFLOP/s = 2 M N K / time; `of peak` divides by --peak GFLOP/s
 * (bench/gemm.sh passes the FP32 FMA peak that build/bench/peak measured in
 * the same run). The timed runs leave the output in the program's arena
 * (cm_program_run with outputs NULL, as a caller reading it through
 * cm_program_output would): copying M N floats into a fresh tensor per
 * run costs 2-3 ms at K = 384, on one thread, for page faults and the copy.
 * `kernel` is the kernels' own time from the executor's profile (CPU only).
 * --backend cuda (auto: when there is a GPU) times them on the GPU, the operands
 * uploaded once (cm_program_prefetch), as the trainer's batches are.
 * --dtype bf16 times each shape three ways in one run: f32, bf16 operands in
 * memory (`y = cast(matmul(x, w), f32)` with x, w bf16) and f32 operands cast
 * to bf16 (what the autocast pass makes of an f32 GEMM), with the ratios to f32.
 *
 * --tune S first tunes every graph's kernels (cm_tune, S seconds for them all: bench/tune.sh),
 * so that the timed compiles use the tuned plans.
 *
 * usage: build/bench/gemm [--peak GFLOPS] [--threads N] [--seconds S] [--json]
 *                         [--dtype f32|bf16] [--backend auto|cpu|cuda] [--device N]
 *                         [--cuda-graphs on|off] [--tune S] */
#include "runtime/runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct shape {
  const char *what;
  int64_t m, n, k;
  bool ta, tb; /* transposed operands */
} shape;

/* ViT-S (width 384, MLP 1536) at 64 images x 50 tokens (49 visible + cls), and the
 * decoder-free backward shapes of the same layers. */
static const shape shapes[] = {
    {"qkv   fwd  X W", 3200, 1152, 384, false, false},
    {"proj  fwd  X W", 3200, 384, 384, false, false},
    {"fc1   fwd  X W", 3200, 1536, 384, false, false},
    {"fc2   fwd  X W", 3200, 384, 1536, false, false},
    {"fc1   dX   dY W^T", 3200, 384, 1536, false, true},
    {"fc1   dW   X^T dY", 384, 1536, 3200, true, false},
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 88172645463325252ull;
static double uniform(void) {
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return (double)(rng >> 11) * (1.0 / 9007199254740992.0);
}

/* --backend auto|cpu|cuda, --device N, --cuda-graphs on|off at argv[*i] into req: true
 * when argv[*i] was one of them (*i moved past its value; *bad when the value is wrong). */
static bool backend_arg(int argc, char **argv, int *i, cm_backend_request *req, bool *bad) {
  const char *a = argv[*i];
  bool ours = !strcmp(a, "--backend") || !strcmp(a, "--device") || !strcmp(a, "--cuda-graphs");
  if (!ours || *i + 1 >= argc) return false;
  const char *v = argv[++*i];
  cm_err err = {0};
  cm_status st = !strcmp(a, "--backend")  ? cm_backend_parse(v, false, &req->kind, &err)
                 : !strcmp(a, "--device") ? cm_backend_parse_device(v, &req->device, &err)
                                          : cm_backend_parse_graphs(v, &req->graphs, &err);
  if (st) fprintf(stderr, "%s\n", err.msg), *bad = true;
  return true;
}

/* How a row's operands are typed. */
typedef enum operands { OPS_F32, OPS_BF16, OPS_BF16_CAST } operands;
static const char *const operands_name[] = {"f32", "bf16", "bf16 cast"};

/* The graph of one row: y = x w (f32), or cast(matmul(x, w), f32) with bf16
 * operands stored as bf16 (OPS_BF16) or cast from f32 inputs (OPS_BF16_CAST). */
static cm_graph *shape_graph(const shape *sh, operands ops, int *x, int *w) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {sh->ta ? sh->k : sh->m, sh->ta ? sh->m : sh->k};
  int64_t wd[2] = {sh->tb ? sh->n : sh->k, sh->tb ? sh->k : sh->n};
  cm_dtype in = ops == OPS_BF16 ? CM_BF16 : CM_F32;
  *x = cm_input(g, "x", in, 2, xd);
  *w = cm_input(g, "w", in, 2, wd);
  int a = ops == OPS_BF16_CAST ? cm_cast(g, *x, CM_BF16, NULL) : *x;
  int b = ops == OPS_BF16_CAST ? cm_cast(g, *w, CM_BF16, NULL) : *w;
  int y = cm_matmul(g, a, b, sh->ta, sh->tb, ops == OPS_F32 ? "y" : "y_bf16");
  if (ops != OPS_F32) y = cm_cast(g, y, CM_F32, "y");
  cm_err err = {0};
  if (g->error.status || cm_graph_add_output(g, y, &err)) {
    fprintf(stderr, "gemm: cannot build the graph: %s\n", g->error.msg);
    cm_graph_free(g);
    return NULL;
  }
  return g;
}

typedef struct timing {
  double gflops, kernel_gflops; /* wall clock; the kernels alone (CPU profile) */
  int threads;
} timing;

/* Times one row for about `seconds`; false (and a message) on an error. */
static bool time_shape(const shape *sh, operands ops, cm_backend_choice *choice, int threads,
                       double seconds, timing *out) {
  int x, w;
  cm_graph *g = shape_graph(sh, ops, &x, &w);
  if (!g) return false;
  cm_err err = {0};
  cm_tensor src[2];
  memset(src, 0, sizeof src);
  cm_tensor *bound[3] = {NULL, NULL, NULL};
  cm_tensor_alloc(&src[0], g->nodes[x].type, NULL);
  cm_tensor_alloc(&src[1], g->nodes[w].type, NULL);
  for (int t = 0; t < 2; t++)
    for (int64_t e = 0; e < cm_type_numel(&src[t].type); e++)
      cm_tensor_set_f64(&src[t], e, uniform() - 0.5);
  bound[x] = &src[0];
  bound[w] = &src[1];
  cm_compile_opts o = {0};
  o.threads = threads;
  o.profile = choice->kind == CM_BACKEND_CPU;
  const cm_target *target = cm_backend_compile_opts(choice, &o);
  cm_program *pr = NULL;
  bool ok = cm_compile(g, target, &o, &pr, &err) == CM_OK;
  cm_tensor y;
  memset(&y, 0, sizeof y);
  /* warm-up; the prefetch keeps the operands on a device for the timed runs */
  ok = ok && !cm_program_start(pr, bound, &err) && !cm_program_prefetch(pr, bound, &err) &&
       !cm_program_finish(pr, &y, &err);
  cm_tensor_free(&y);
  int runs = 0;
  double t0 = now(), t = 0;
  while (ok && t < seconds) {
    ok = cm_program_run(pr, bound, NULL, &err) == CM_OK;
    runs++;
    t = now() - t0;
  }
  if (ok) {
    double flop = 2.0 * (double)sh->m * (double)sh->n * (double)sh->k;
    out->gflops = flop * runs / t * 1e-9;
    /* the kernels alone (without the output's copy out of the arena); the warm-up is a run */
    const cm_kernel_profile *kp = NULL;
    int nk = cm_program_profile(pr, &kp);
    double kms = 0;
    int kruns = 0;
    for (int q = 0; q < nk; q++) kms += kp[q].total_ms, kruns = kp[q].runs;
    out->kernel_gflops = kms > 0 ? flop * kruns / (kms * 1e-3) * 1e-9 : 0;
    cm_program_stats st;
    cm_program_stats_get(pr, &st);
    out->threads = st.threads;
  } else {
    fprintf(stderr, "gemm (%s): %s\n", operands_name[ops], err.msg);
  }
  cm_program_free(pr);
  cm_tensor_free(&src[0]);
  cm_tensor_free(&src[1]);
  cm_graph_free(g);
  return ok;
}

/* --tune: every shape's graph (with each operand kind the table times) tuned before anything
 * runs, budget seconds shared evenly. */
static bool tune_shapes(cm_backend_choice *choice, int threads, double budget, bool bf16) {
  int n_ops = bf16 ? 3 : 1, n = (int)(sizeof shapes / sizeof shapes[0]) * n_ops;
  for (int i = 0; i < n; i++) {
    int x, w;
    cm_graph *g = shape_graph(&shapes[i / n_ops], (operands)(i % n_ops), &x, &w);
    if (!g) return false;
    cm_compile_opts o = {0};
    o.threads = threads;
    const cm_target *target = cm_backend_compile_opts(choice, &o);
    cm_tune_opts to = {.budget_s = budget / n};
    cm_tune_stats ts;
    cm_err err = {0};
    cm_status st = cm_tune(g, target, &o, &to, &ts, &err);
    cm_graph_free(g);
    if (st) return fprintf(stderr, "gemm --tune: %s\n", err.msg), false;
    fprintf(stderr, "tuned %s (%s): %d searched, %d from the database, %d candidates, %.1f s\n",
            shapes[i / n_ops].what, operands_name[i % n_ops], ts.searched, ts.from_db,
            ts.candidates, ts.seconds);
  }
  return true;
}

/* The f32 table (--dtype f32): one row per shape. */
static bool table_f32(cm_backend_choice *choice, int threads, double seconds, double peak,
                      bool json) {
  if (!json)
    printf("%-20s %6s %6s %6s %10s %8s %10s %8s\n", "gemm", "M", "N", "K", "GFLOP/s", "of peak",
           "kernel", "of peak");
  if (json) printf("{\"peak_gflops\": %.1f, \"dtype\": \"f32\", \"rows\": [", peak);
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    const shape *sh = &shapes[s];
    timing t;
    if (!time_shape(sh, OPS_F32, choice, threads, seconds, &t)) return false;
    if (json)
      printf("%s{\"gemm\": \"%s\", \"m\": %lld, \"n\": %lld, \"k\": %lld, \"gflops\": %.1f, "
             "\"of_peak\": %.3f, \"kernel_gflops\": %.1f, \"threads\": %d, \"backend\": \"%s\"}",
             s ? ", " : "", sh->what, (long long)sh->m, (long long)sh->n, (long long)sh->k,
             t.gflops, peak > 0 ? t.gflops / peak : 0, t.kernel_gflops, t.threads,
             cm_backend_kind_name(choice->kind));
    else
      printf("%-20s %6lld %6lld %6lld %10.1f %7.1f%% %10.1f %7.1f%%\n", sh->what, (long long)sh->m,
             (long long)sh->n, (long long)sh->k, t.gflops, peak > 0 ? 100 * t.gflops / peak : 0,
             t.kernel_gflops, peak > 0 ? 100 * t.kernel_gflops / peak : 0);
  }
  if (json) printf("]}\n");
  return true;
}

/* The bf16 table (--dtype bf16): per shape f32, bf16 and bf16-cast GFLOP/s
 * (wall clock) and their ratios to f32. */
static bool table_bf16(cm_backend_choice *choice, int threads, double seconds, bool json) {
  cm_target host;
  cm_target_host(&host);
  const char *how = choice->kind != CM_BACKEND_CPU ? "the device's GEMM template"
                    : host.cpu.dot_bf16
                        ? "vdpbf16ps (AVX-512 BF16)"
                        : "operands widened to f32, the f32 micro-kernel (no AVX-512 BF16)";
  if (!json)
    printf("bf16 GEMMs: %s\n%-20s %6s %6s %6s %9s %9s %6s %9s %6s\n", how, "gemm", "M", "N", "K",
           "f32", "bf16", "ratio", "bf16cast", "ratio");
  if (json) printf("{\"dtype\": \"bf16\", \"bf16_path\": \"%s\", \"rows\": [", how);
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    const shape *sh = &shapes[s];
    timing t[3];
    for (int q = 0; q < 3; q++)
      if (!time_shape(sh, (operands)q, choice, threads, seconds, &t[q])) return false;
    double r = t[1].gflops / t[0].gflops, rc = t[2].gflops / t[0].gflops;
    if (json)
      printf("%s{\"gemm\": \"%s\", \"m\": %lld, \"n\": %lld, \"k\": %lld, \"f32_gflops\": %.1f, "
             "\"bf16_gflops\": %.1f, \"bf16_cast_gflops\": %.1f, \"bf16_ratio\": %.3f, "
             "\"bf16_cast_ratio\": %.3f, \"threads\": %d, \"backend\": \"%s\"}",
             s ? ", " : "", sh->what, (long long)sh->m, (long long)sh->n, (long long)sh->k,
             t[0].gflops, t[1].gflops, t[2].gflops, r, rc, t[0].threads,
             cm_backend_kind_name(choice->kind));
    else
      printf("%-20s %6lld %6lld %6lld %9.1f %9.1f %5.2fx %9.1f %5.2fx\n", sh->what,
             (long long)sh->m, (long long)sh->n, (long long)sh->k, t[0].gflops, t[1].gflops, r,
             t[2].gflops, rc);
  }
  if (json) printf("]}\n");
  return true;
}

int main(int argc, char **argv) {
  double peak = 0, seconds = 1.0, tune = -1;
  int threads = 0;
  bool json = false, bad = false, bf16 = false;
  cm_backend_request req = {0};
  for (int i = 1; i < argc && !bad; i++) {
    if (backend_arg(argc, argv, &i, &req, &bad))
      continue;
    else if (!strcmp(argv[i], "--peak") && i + 1 < argc)
      peak = atof(argv[++i]);
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
      seconds = atof(argv[++i]);
    else if (!strcmp(argv[i], "--json"))
      json = true;
    else if (!strcmp(argv[i], "--tune") && i + 1 < argc)
      tune = atof(argv[++i]);
    else if (!strcmp(argv[i], "--dtype") && i + 1 < argc &&
             (!strcmp(argv[i + 1], "f32") || !strcmp(argv[i + 1], "bf16")))
      bf16 = !strcmp(argv[++i], "bf16");
    else {
      fprintf(stderr, "usage: gemm [--peak GFLOPS] [--threads N] [--seconds S] [--json] "
                      "[--dtype f32|bf16] [--backend auto|cpu|cuda] [--device N] "
                      "[--cuda-graphs on|off] [--tune S]\n");
      return 2;
    }
  }
  cm_backend_choice choice;
  cm_err berr = {0};
  if (bad) return 2;
  if (cm_backend_resolve(&req, &choice, &berr)) return fprintf(stderr, "gemm: %s\n", berr.msg), 2;
  if (!json) printf("backend %s\n", choice.description);
  if (tune >= 0 && !tune_shapes(&choice, threads, tune, bf16)) return 1;
  bool ok = bf16 ? table_bf16(&choice, threads, seconds, json)
                 : table_f32(&choice, threads, seconds, peak, json);
  return ok ? 0 : 1;
}
