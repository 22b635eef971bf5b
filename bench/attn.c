/* Attention alone on the CPU executor: forward + backward of
 * y = softmax(q k^T / sqrt(d)) v with loss = sum(y * dO), inputs [n, heads,
 * tokens, dim] (the default: the Fashion-MNIST ViT's 64 x 4 heads x 65 tokens x
 * 32). Prints ms per step, the attention kernels' ms and GFLOP/s, and the
 * stages that took more than 2 % of a step (a fused span's time is its first
 * stage's), the fastest step and the CPU time per step. --threads 1 keeps
 * OpenMP's barriers out of the figures on a busy machine.
 * --backend cuda (auto: when there is a GPU) runs it there: the kernel and stage
 * figures come from the CPU backend's profile only; the inputs stay on the device
 * (cm_program_prefetch) and the gradients in its arena, as in a training step.
 * --dtype bf16: q, k, v and dO arrive in bf16 (as a bf16 producer leaves them) and the
 * graph goes through the autocast pass: QK^T and PV (and the backward's contractions)
 * on bf16 operands with f32 accumulation, the softmax in f32 (the training step's
 * attention under train.precision=bf16).
 * --bc B forces the key block of the spans (cm_compile_opts.attn_bc: streaming when below the
 * keys). attn [--n N] [--heads H] [--tokens T] [--dim D] [--steps S] [--threads T] [--bc B]
 *        [--dtype f32|bf16] [--backend auto|cpu|cuda] [--device N] [--cuda-graphs on|off] */
#include "ir/ir.h"
#include "models/models.h"
#include "passes/passes.h"
#include "runtime/runtime.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

/* The process's CPU time: on a busy machine, with --threads 1, it leaves out the time other
 * processes took the core (wall time does not). */
static double cpu_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
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

/* Forward and backward of one attention, the loss sum(y * dO), q, k, v and dO [n, heads,
 * tokens, dim]; in bf16 (see the top) through the autocast pass. NULL (said in *err) on error. */
static cm_graph *attention_graph(int64_t n, int64_t heads, int64_t tokens, int64_t dim, bool bf16,
                                 cm_err *err) {
  cm_graph *g = cm_graph_new();
  int64_t d[4] = {n, heads, tokens, dim};
  cm_dtype in = bf16 ? CM_BF16 : CM_F32;
  int x[4]; /* q, k, v, dO in f32 */
  const char *names[4] = {"q", "k", "v", "dO"};
  for (int i = 0; i < 4; i++) {
    x[i] = cm_input(g, names[i], in, 4, d);
    if (bf16) x[i] = cm_cast(g, x[i], CM_F32, NULL);
  }
  int s = cm_matmul(g, x[0], x[1], false, true, "scores");
  s = cm_binary_bcast(g, CM_OP_MUL, s, cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)dim)),
                      "scaled");
  int y = cm_matmul(g, cm_nn_softmax(g, s), x[2], false, false, "y");
  cm_graph_add_output(g, y, err);
  int axes[4] = {0, 1, 2, 3};
  int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, x[3], NULL), 4, axes, false,
                       "loss");
  int grads[3];
  if (g->error.status) {
    cm_errorf(err, g->error.status, "%s", g->error.msg);
  } else if (cm_autodiff(g, loss, 3, x, grads, err) == CM_OK) {
    for (int i = 0; i < 3; i++) cm_graph_add_output(g, grads[i], err);
    if (cm_graph_verify(g, err) == CM_OK && (!bf16 || cm_autocast(&g, CM_BF16, NULL, err) == CM_OK))
      return g;
  }
  cm_graph_free(g);
  return NULL;
}

int main(int argc, char **argv) {
  int64_t n = 64, heads = 4, tokens = 65, dim = 32;
  int steps = 20, threads = 0, bc = 0;
  cm_backend_request req = {0};
  bool bad = false, bf16 = false;
  for (int i = 1; i + 1 < argc && !bad; i += 2) {
    int at = i;
    if (backend_arg(argc, argv, &at, &req, &bad))
      continue;
    else if (!strcmp(argv[i], "--n"))
      n = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--heads"))
      heads = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--tokens"))
      tokens = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--dim"))
      dim = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--steps"))
      steps = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--threads"))
      threads = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--bc"))
      bc = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--dtype") &&
             (!strcmp(argv[i + 1], "bf16") || !strcmp(argv[i + 1], "f32")))
      bf16 = !strcmp(argv[i + 1], "bf16");
    else {
      fprintf(stderr,
              "usage: attn [--n N] [--heads H] [--tokens T] [--dim D] [--steps S] [--threads T] "
              "[--bc B] [--dtype f32|bf16] [--backend auto|cpu|cuda] [--device N] [--cuda-graphs "
              "on|off]\n");
      return 2;
    }
  }
  cm_backend_choice choice;
  cm_err berr = {0};
  if (bad) return 2;
  if (cm_backend_resolve(&req, &choice, &berr)) return fprintf(stderr, "attn: %s\n", berr.msg), 2;
  cm_err err = {0};
  cm_graph *g = attention_graph(n, heads, tokens, dim, bf16, &err);
  if (!g) return fprintf(stderr, "attn: %s\n", err.msg), 1;
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  cm_tensor **sp = calloc((size_t)g->n_nodes, sizeof *sp);
  uint64_t r = 42;
  for (int i = 0; i < g->n_nodes; i++) {
    if (g->nodes[i].op != CM_OP_INPUT) continue;
    cm_tensor_alloc(&src[i], g->nodes[i].type, NULL);
    for (int64_t e = 0; e < cm_type_numel(&g->nodes[i].type); e++) {
      r = r * 6364136223846793005ull + 1442695040888963407ull;
      cm_tensor_set_f64(&src[i], e, ((double)(r >> 11) * 0x1p-53) * 2 - 1);
    }
    sp[i] = &src[i];
  }
  cm_compile_opts o = {
      .threads = threads, .cache_dir = "", .profile = choice.kind == CM_BACKEND_CPU, .attn_bc = bc};
  const cm_target *target = cm_backend_compile_opts(&choice, &o);
  cm_program *pr = NULL;
  if (cm_compile(g, target, &o, &pr, &err) != CM_OK) return fprintf(stderr, "%s\n", err.msg), 1;
  cm_tensor *out = calloc((size_t)g->n_outputs, sizeof *out);
  /* a device keeps the inputs (prefetched once) and leaves the gradients in its arena */
  bool device = choice.kind != CM_BACKEND_CPU;
  if (cm_program_start(pr, sp, &err) || (device && cm_program_prefetch(pr, sp, &err)) ||
      cm_program_finish(pr, out, &err)) /* warm-up */
    return fprintf(stderr, "%s\n", err.msg), 1;
  for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&out[j]);
  const cm_kernel_profile *prof;
  int np = cm_program_profile(pr, &prof);
  double *base = calloc((size_t)np + 1, sizeof *base);
  for (int i = 0; i < np; i++) base[i] = prof[i].total_ms;
  double t0 = now_ms(), c0 = cpu_ms(), fastest = 0, fastest_cpu = 0;
  for (int st = 0; st < steps; st++) {
    double s0 = now_ms(), sc = cpu_ms();
    if (cm_program_run(pr, sp, device ? NULL : out, &err) != CM_OK)
      return fprintf(stderr, "%s\n", err.msg), 1;
    for (int j = 0; j < g->n_outputs && !device; j++) cm_tensor_free(&out[j]);
    double one = now_ms() - s0, one_cpu = cpu_ms() - sc;
    if (st == 0 || one < fastest) fastest = one;
    if (st == 0 || one_cpu < fastest_cpu) fastest_cpu = one_cpu;
  }
  double wall = (now_ms() - t0) / steps, cpu = (cpu_ms() - c0) / steps;
  np = cm_program_profile(pr, &prof);
  printf("n %lld heads %lld tokens %lld dim %lld %s: %.3f ms/step on %s\n", (long long)n,
         (long long)heads, (long long)tokens, (long long)dim, bf16 ? "bf16" : "f32", wall,
         choice.description);
  printf("fastest step %.3f ms, CPU time %.3f ms/step, fastest %.3f ms (all threads)\n", fastest,
         cpu, fastest_cpu);
  for (int i = 0; i < np; i++) {
    double ms = (prof[i].total_ms - base[i]) / steps;
    if (prof[i].kind == CM_GROUP_ATTENTION || ms > 0.05 * wall)
      printf("  %-60.60s %8.3f ms %7.1f GFLOP/s%s\n", prof[i].name, ms, prof[i].flops / ms * 1e-6,
             prof[i].kind == CM_GROUP_ATTENTION ? "  [attn]" : "");
  }
  const cm_stage_profile *sp0;
  int ns = cm_program_stage_profile(pr, &sp0);
  for (int i = 0; i < ns; i++)
    if (sp0[i].total_ms / (sp0[i].runs ? sp0[i].runs : 1) > 0.02 * wall)
      printf("    %s s%d %-20.20s n_dom %d tmpl %d: %8.3f ms/run (runs %d)\n", sp0[i].kernel,
             sp0[i].stage_index, sp0[i].stage->name, sp0[i].stage->n_dom, (int)sp0[i].stage->tmpl,
             sp0[i].total_ms / (sp0[i].runs ? sp0[i].runs : 1), sp0[i].runs);
  cm_program_free(pr);
  return 0;
}
