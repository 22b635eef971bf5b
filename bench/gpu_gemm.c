/* bench/gpu_gemm.c — the GEMM shapes of a variant's training step, timed one by one.
 *
 * The shapes come from the step itself: the variant built at --batch (default 128) with
 * its AdamW/EMA training step (as `cmaec build --train`), every matmul node of it, the
 * batch axes of an operand against a 2-D one folded into M, batched ones (attention's
 * per-head products, timed by bench/attn) left out. A shape is `fwd` (before the loss),
 * `wgrad` (after it, with a parameter's shape) or `dgrad`; `count` is how often the step
 * runs it. --list prints them (the table bench/gpu/torch_peer.py reads) and stops.
 * Otherwise each distinct shape is compiled alone, `y = matmul(a, b)` with a and b in
 * --dtype (bf16 by default: the result bf16, as torch.matmul on bf16 tensors) on
 * --backend (cuda on a GPU machine), the operands prefetched, the result left in the
 * arena, and timed for --seconds after a warm-up run: ms per GEMM, the kernel's own time
 * from the profile (CUDA events around it on a GPU, as PyTorch's side times its calls),
 * TFLOP/s (2 M N K per GEMM), and the wall time per run with the runtime's launch and
 * synchronization.
 *
 * usage: build/bench/gpu_gemm [MODEL.json] [--batch N] [--list] [--dtype bf16|f32]
 *                             [--seconds S] [--only I] [--backend auto|cpu|cuda] [--device N]
 *                             [--cuda-graphs on|off] */
#include "models/models.h"
#include "passes/passes.h"
#include "runtime/runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct gemm_shape {
  char role[8]; /* fwd, dgrad, wgrad */
  int64_t m, n, k;
  bool ta, tb;
  int count;
} gemm_shape;

typedef struct gemm_opts {
  const char *path;
  int batch, only;
  bool list, bf16;
  double seconds;
  cm_backend_request backend;
} gemm_opts;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static bool parse_args(int argc, char **argv, gemm_opts *o) {
  *o = (gemm_opts){
      .path = "models/cmae_vit_base.json", .batch = 128, .only = -1, .bf16 = true, .seconds = 0.3};
  cm_err err = {0};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--list"))
      o->list = true;
    else if (!v && a[0] == '-')
      break;
    else if (!strcmp(a, "--batch"))
      o->batch = atoi(argv[++i]);
    else if (!strcmp(a, "--seconds"))
      o->seconds = atof(argv[++i]);
    else if (!strcmp(a, "--only"))
      o->only = atoi(argv[++i]);
    else if (!strcmp(a, "--dtype") && (!strcmp(v, "bf16") || !strcmp(v, "f32")))
      o->bf16 = !strcmp(argv[++i], "bf16");
    else if (!strcmp(a, "--backend") && !cm_backend_parse(v, false, &o->backend.kind, &err))
      i++;
    else if (!strcmp(a, "--device") && !cm_backend_parse_device(v, &o->backend.device, &err))
      i++;
    else if (!strcmp(a, "--cuda-graphs") && !cm_backend_parse_graphs(v, &o->backend.graphs, &err))
      i++;
    else if (a[0] != '-')
      o->path = a;
    else {
      if (err.msg[0]) fprintf(stderr, "gpu_gemm: %s\n", err.msg);
      fprintf(stderr, "usage: gpu_gemm [MODEL.json] [--batch N] [--list] [--dtype bf16|f32] "
                      "[--seconds S] [--only I] [--backend auto|cpu|cuda] [--device N] "
                      "[--cuda-graphs on|off]\n");
      return false;
    }
  }
  if (o->batch < 1) return fprintf(stderr, "gpu_gemm: --batch must be >= 1\n"), false;
  return true;
}

/* Is there a parameter of exactly this 2-D shape (a weight gradient's)? */
static bool param_shaped(const cm_graph *g, const cm_type *t) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_type *p = &g->nodes[i].type;
    if (g->nodes[i].op == CM_OP_PARAM && p->rank == t->rank &&
        !memcmp(p->dims, t->dims, sizeof(int64_t) * (size_t)t->rank))
      return true;
  }
  return false;
}

/* The step's matmul shapes, distinct, in order of first appearance; returns how many. */
static int step_shapes(const cm_graph *step, int loss, gemm_shape *out, int cap) {
  int n = 0;
  for (int i = 0; i < step->n_nodes; i++) {
    const cm_node *nd = &step->nodes[i];
    if (nd->op != CM_OP_MATMUL) continue;
    const cm_type *a = &step->nodes[nd->inputs[0]].type, *b = &step->nodes[nd->inputs[1]].type;
    bool ta = nd->attrs.transpose_a, tb = nd->attrs.transpose_b;
    if (b->rank != 2 && a->rank != 2) continue; /* batched: attention's */
    gemm_shape s = {"", 0, 0, 0, ta, tb, 1};
    s.k = ta ? a->dims[a->rank - 2] : a->dims[a->rank - 1];
    s.n = tb ? b->dims[b->rank - 2] : b->dims[b->rank - 1];
    s.m = cm_type_numel(&nd->type) / s.n;      /* a's batch axes folded into M */
    if (a->rank == 2 && b->rank > 2) continue; /* no such product in a ViT step */
    snprintf(s.role, sizeof s.role, "%s",
             i < loss                        ? "fwd"
             : param_shaped(step, &nd->type) ? "wgrad"
                                             : "dgrad");
    int j = 0;
    while (j < n && !(out[j].m == s.m && out[j].n == s.n && out[j].k == s.k && out[j].ta == ta &&
                      out[j].tb == tb && !strcmp(out[j].role, s.role)))
      j++;
    if (j < n)
      out[j].count++;
    else if (n < cap)
      out[n++] = s;
  }
  return n;
}

/* The kernels' ms of the runs so far (the profile's events; 0 without a profile). */
static double kernel_ms(const cm_program *pr) {
  const cm_kernel_profile *kp = NULL;
  double ms = 0;
  for (int q = 0, n = cm_program_profile(pr, &kp); q < n; q++) ms += kp[q].total_ms;
  return ms;
}

/* Times one GEMM shape on the chosen backend: *ms the kernels' time per GEMM from the
 * profile (on a GPU, CUDA events around the kernels: no launch or synchronization), *wall_ms
 * per run with the runtime's overhead; false (said) on failure. */
static bool time_shape(const gemm_opts *o, cm_backend_choice *choice, const gemm_shape *sh,
                       double *ms, double *wall_ms) {
  cm_graph *g = cm_graph_new();
  cm_dtype dt = o->bf16 ? CM_BF16 : CM_F32;
  int64_t ad[2] = {sh->ta ? sh->k : sh->m, sh->ta ? sh->m : sh->k};
  int64_t bd[2] = {sh->tb ? sh->n : sh->k, sh->tb ? sh->k : sh->n};
  int a = cm_input(g, "a", dt, 2, ad), b = cm_input(g, "b", dt, 2, bd);
  int y = cm_matmul(g, a, b, sh->ta, sh->tb, "y");
  cm_err err = {0};
  if (g->error.status || cm_graph_add_output(g, y, &err)) {
    fprintf(stderr, "gpu_gemm: %s%s\n", g->error.msg, err.msg);
    cm_graph_free(g);
    return false;
  }
  cm_tensor src[2], out;
  memset(src, 0, sizeof src), memset(&out, 0, sizeof out);
  cm_tensor *bound[3] = {NULL, NULL, NULL};
  uint64_t r = 88172645463325252ull;
  for (int t = 0; t < 2; t++) {
    cm_tensor_alloc(&src[t], g->nodes[t == 0 ? a : b].type, NULL);
    for (int64_t e = 0; e < cm_type_numel(&src[t].type); e++) {
      r ^= r << 13, r ^= r >> 7, r ^= r << 17;
      cm_tensor_set_f64(&src[t], e, (double)(r >> 11) * 0x1p-53 - 0.5);
    }
  }
  bound[a] = &src[0], bound[b] = &src[1];
  cm_compile_opts co = {.profile = true};
  const cm_target *target = cm_backend_compile_opts(choice, &co);
  cm_program *pr = NULL;
  bool ok = cm_compile(g, target, &co, &pr, &err) == CM_OK &&
            cm_program_start(pr, bound, &err) == CM_OK &&
            cm_program_prefetch(pr, bound, &err) == CM_OK &&
            cm_program_finish(pr, &out, &err) == CM_OK; /* warm-up; operands stay */
  int runs = 0;
  double t0 = now(), t = 0, k0 = ok ? kernel_ms(pr) : 0;
  while (ok && (t < o->seconds || runs < 3)) {
    ok = cm_program_run(pr, bound, NULL, &err) == CM_OK;
    runs++;
    t = now() - t0;
  }
  if (!ok) fprintf(stderr, "gpu_gemm: %s\n", err.msg);
  *wall_ms = runs ? 1e3 * t / runs : 0;
  double k = ok ? kernel_ms(pr) - k0 : 0;
  *ms = k > 0 ? k / runs : *wall_ms;
  cm_tensor_free(&out), cm_tensor_free(&src[0]), cm_tensor_free(&src[1]);
  cm_program_free(pr);
  cm_graph_free(g);
  return ok;
}

int main(int argc, char **argv) {
  gemm_opts o;
  if (!parse_args(argc, argv, &o)) return 2;
  cm_model_config cfg;
  cm_model m;
  cm_err err = {0};
  if (cm_model_config_load(o.path, NULL, 0, &cfg, &err))
    return fprintf(stderr, "gpu_gemm: %s\n", err.msg), 2;
  cm_model_build_opts bo = {o.batch, 1, CM_F32};
  if (cm_model_build(&cfg, &bo, &m, &err)) return fprintf(stderr, "%s: %s\n", o.path, err.msg), 1;
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  oc.frozen = cm_model_frozen_substrings;
  cm_ema_pair pairs[8];
  int n_pairs = 0;
  for (; n_pairs < 8 && cm_model_ema_online_prefixes[n_pairs]; n_pairs++)
    pairs[n_pairs] =
        (cm_ema_pair){cm_model_ema_online_prefixes[n_pairs], cm_model_ema_target_prefixes[n_pairs]};
  oc.ema = pairs, oc.n_ema = n_pairs;
  cm_graph *step = NULL;
  cm_train_step_info info;
  if (cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err))
    return fprintf(stderr, "%s: %s\n", o.path, err.msg), 1;
  gemm_shape shapes[256];
  int n = step_shapes(step, m.loss, shapes, 256);
  cm_graph_free(step);
  cm_model_free(&m);
  cm_backend_choice choice;
  if (!o.list && cm_backend_resolve(&o.backend, &choice, &err))
    return fprintf(stderr, "gpu_gemm: %s\n", err.msg), 2;
  printf("# %s batch %d: %d GEMM shapes%s%s\n", o.path, o.batch, n, o.list ? "" : " on ",
         o.list ? "" : choice.description);
  printf("%-3s %-5s %6s %6s %6s %2s %2s %5s %10s %8s %10s\n", "#", "role", "M", "N", "K", "ta",
         "tb", "count", o.list ? "" : "ms", o.list ? "" : "TFLOP/s", o.list ? "" : "wall ms");
  int failed = 0;
  for (int i = 0; i < n; i++) {
    const gemm_shape *s = &shapes[i];
    if (o.only >= 0 && i != o.only) continue;
    printf("%-3d %-5s %6lld %6lld %6lld %2d %2d %5d", i, s->role, (long long)s->m, (long long)s->n,
           (long long)s->k, s->ta, s->tb, s->count);
    double ms = 0, wall = 0;
    if (!o.list && time_shape(&o, &choice, s, &ms, &wall))
      printf(" %10.5f %8.2f %10.5f", ms, 2e-9 * (double)s->m * (double)s->n * (double)s->k / ms,
             wall);
    else if (!o.list)
      printf(" %10s %8s", "FAILED", "-"), failed++;
    putchar('\n');
    fflush(stdout);
  }
  return failed ? 1 : 0;
}
