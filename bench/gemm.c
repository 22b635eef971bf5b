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
 *
 * usage: build/bench/gemm [--peak GFLOPS] [--threads N] [--seconds S] [--json]
 *                         [--backend auto|cpu|cuda] [--device N] [--cuda-graphs on|off] */
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

int main(int argc, char **argv) {
  double peak = 0, seconds = 1.0;
  int threads = 0;
  bool json = false, bad = false;
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
    else {
      fprintf(stderr, "usage: gemm [--peak GFLOPS] [--threads N] [--seconds S] [--json] "
                      "[--backend auto|cpu|cuda] [--device N] [--cuda-graphs on|off]\n");
      return 2;
    }
  }
  cm_backend_choice choice;
  cm_err berr = {0};
  if (bad) return 2;
  if (cm_backend_resolve(&req, &choice, &berr)) return fprintf(stderr, "gemm: %s\n", berr.msg), 2;
  if (!json) printf("backend %s\n", choice.description);
  if (!json)
    printf("%-20s %6s %6s %6s %10s %8s %10s %8s\n", "gemm", "M", "N", "K", "GFLOP/s", "of peak",
           "kernel", "of peak");
  if (json) printf("{\"peak_gflops\": %.1f, \"rows\": [", peak);
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    const shape *sh = &shapes[s];
    cm_graph *g = cm_graph_new();
    int64_t xd[2] = {sh->ta ? sh->k : sh->m, sh->ta ? sh->m : sh->k};
    int64_t wd[2] = {sh->tb ? sh->n : sh->k, sh->tb ? sh->k : sh->n};
    int x = cm_input(g, "x", CM_F32, 2, xd);
    int w = cm_input(g, "w", CM_F32, 2, wd);
    int y = cm_matmul(g, x, w, sh->ta, sh->tb, "y");
    cm_err err = {0};
    if (g->error.status || cm_graph_add_output(g, y, &err)) {
      fprintf(stderr, "gemm: cannot build the graph: %s\n", g->error.msg);
      return 1;
    }
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
    o.profile = choice.kind == CM_BACKEND_CPU;
    const cm_target *target = cm_backend_compile_opts(&choice, &o);
    cm_program *pr = NULL;
    if (cm_compile(g, target, &o, &pr, &err)) {
      fprintf(stderr, "gemm: %s\n", err.msg);
      return 1;
    }
    cm_tensor out;
    memset(&out, 0, sizeof out);
    /* warm-up; the prefetch keeps the operands on a device for the timed runs */
    if (cm_program_start(pr, bound, &err) || cm_program_prefetch(pr, bound, &err) ||
        cm_program_finish(pr, &out, &err)) {
      fprintf(stderr, "gemm: %s\n", err.msg);
      return 1;
    }
    cm_tensor_free(&out);
    int runs = 0;
    double t0 = now(), t;
    do {
      if (cm_program_run(pr, bound, NULL, &err)) {
        fprintf(stderr, "gemm: %s\n", err.msg);
        return 1;
      }
      runs++;
      t = now() - t0;
    } while (t < seconds);
    double flop = 2.0 * (double)sh->m * (double)sh->n * (double)sh->k;
    double gflops = flop * runs / t * 1e-9;
    /* the kernels alone (without the output's copy out of the arena); the warm-up is a run */
    const cm_kernel_profile *kp = NULL;
    int nk = cm_program_profile(pr, &kp);
    double kms = 0;
    int kruns = 0;
    for (int q = 0; q < nk; q++) kms += kp[q].total_ms, kruns = kp[q].runs;
    double kgflops = kms > 0 ? flop * kruns / (kms * 1e-3) * 1e-9 : 0;
    cm_program_stats st;
    cm_program_stats_get(pr, &st);
    if (json)
      printf("%s{\"gemm\": \"%s\", \"m\": %lld, \"n\": %lld, \"k\": %lld, \"gflops\": %.1f, "
             "\"of_peak\": %.3f, \"kernel_gflops\": %.1f, \"threads\": %d, \"backend\": \"%s\"}",
             s ? ", " : "", sh->what, (long long)sh->m, (long long)sh->n, (long long)sh->k, gflops,
             peak > 0 ? gflops / peak : 0, kgflops, st.threads, cm_backend_kind_name(choice.kind));
    else
      printf("%-20s %6lld %6lld %6lld %10.1f %7.1f%% %10.1f %7.1f%%\n", sh->what, (long long)sh->m,
             (long long)sh->n, (long long)sh->k, gflops, peak > 0 ? 100 * gflops / peak : 0,
             kgflops, peak > 0 ? 100 * kgflops / peak : 0);
    cm_program_free(pr);
    cm_tensor_free(&src[0]);
    cm_tensor_free(&src[1]);
    cm_graph_free(g);
  }
  if (json) printf("]}\n");
  return 0;
}
