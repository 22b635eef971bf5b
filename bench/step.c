/* bench/step.c — one training step of a model variant on the CPU or a GPU.
 *
 * Builds the variant's training step (AdamW, EMA, as `cmaec build --train`),
 * compiles it with the CPU backend (default pipeline, kernel IR, LLVM JIT,
 * OpenMP), binds random images, sampled masks and initialized params
 * (cm_train_example_sources, what `cmaec tune` times whole steps on), and
 * times --steps steps after one warm-up step. Prints ms per step, images/s,
 * the contraction FLOPs per step (counted from the kernels' GEMM and
 * reduction stages whose body is a product), GFLOP/s and its fraction of
 * --peak, then the kernels that took the most time (--top), and with
 * --stages N the N stages that took the most time, each with its loop shape
 * and what in its expressions may keep it from vectorizing. --backend cuda
 * (auto: when there is a GPU) runs it as the trainer does: params and optimizer
 * state resident on the device, the batch prefetched, the step replayed as one
 * CUDA graph unless --cuda-graphs off; the kernel table needs a profile, which
 * only the CPU backend gives. --precision bf16 puts the step through the autocast
 * pass (every contraction on bf16 operands with f32 accumulation; docs/passes.md).
 *
 * usage: build/bench/step [MODEL.json] [--batch N] [--steps N] [--threads N]
 *                         [--peak GFLOPS] [--top N] [--stages N] [--set KEY=VALUE ...]
 *                         [--precision f32|bf16]
 *                         [--backend auto|cpu|cuda] [--device N] [--cuda-graphs on|off] */
#include "models/models.h"
#include "passes/passes.h"
#include "runtime/runtime.h"
#include "runtime/training.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int by_time(const void *a, const void *b) {
  const cm_kernel_profile *x = a, *y = b;
  return (x->total_ms < y->total_ms) - (x->total_ms > y->total_ms);
}

static int by_stage_time(const void *a, const void *b) {
  const cm_stage_profile *x = a, *y = b;
  return (x->total_ms < y->total_ms) - (x->total_ms > y->total_ms);
}

/* "[64x65|192] p1 gemm mod div erf" : domain | reduction extents, parallel
 * vars, and the index/math ops the stage's expressions hold. */
static void describe_stage(const cm_kstage *s, char *buf, size_t size) {
  size_t n = 0;
  n += (size_t)snprintf(buf + n, size - n, "[");
  for (int d = 0; d < s->n_dom && n < size; d++)
    n += (size_t)snprintf(buf + n, size - n, "%s%lld", d ? "x" : "", (long long)s->dom[d]);
  for (int d = 0; d < s->n_red && n < size; d++)
    n += (size_t)snprintf(buf + n, size - n, "%s%lld", d ? "x" : "|", (long long)s->red[d]);
  if (n < size) n += (size_t)snprintf(buf + n, size - n, "] p%d", s->n_parallel);
  bool mod = false, idiv = false, erf = false, ex = false, lg = false, th = false, pw = false;
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *x = &s->exprs[e];
    mod |= x->kind == CM_KX_MOD;
    if (x->kind != CM_KX_OP) continue;
    idiv |= x->op == CM_OP_DIV && (x->dtype == CM_I64 || x->dtype == CM_I32);
    erf |= x->op == CM_OP_ERF;
    ex |= x->op == CM_OP_EXP;
    lg |= x->op == CM_OP_LOG;
    th |= x->op == CM_OP_TANH;
    pw |= x->op == CM_OP_POW;
  }
  const char *tags[] = {s->tmpl == CM_KT_GEMM ? " gemm" : "",
                        s->n_red ? (s->red_op == CM_KRED_MAX ? " max" : " sum") : "",
                        s->accumulate ? " accum" : "",
                        mod ? " mod" : "",
                        idiv ? " div" : "",
                        ex ? " exp" : "",
                        lg ? " log" : "",
                        erf ? " erf" : "",
                        th ? " tanh" : "",
                        pw ? " pow" : ""};
  for (size_t i = 0; i < sizeof tags / sizeof *tags && n < size; i++)
    n += (size_t)snprintf(buf + n, size - n, "%s", tags[i]);
}

typedef struct bench_opts {
  const char *path;
  int batch, steps, threads, top, top_stages;
  double peak;
  const char *sets[64];
  int n_sets;
  bool bf16; /* --precision bf16 */
  cm_backend_request backend;
  cm_backend_choice choice;
} bench_opts;

/* The command line into *o; false (after the usage) on a bad argument. */
static bool parse_args(int argc, char **argv, bench_opts *o) {
  *o = (bench_opts){.path = "models/cmae_vit_tiny_fmnist.json", .steps = 10, .top = 12};
  cm_err err = {0};
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      if (cm_backend_parse(argv[++i], false, &o->backend.kind, &err))
        return fprintf(stderr, "step: %s\n", err.msg), false;
    } else if (!strcmp(argv[i], "--device") && i + 1 < argc) {
      if (cm_backend_parse_device(argv[++i], &o->backend.device, &err))
        return fprintf(stderr, "step: %s\n", err.msg), false;
    } else if (!strcmp(argv[i], "--cuda-graphs") && i + 1 < argc) {
      if (cm_backend_parse_graphs(argv[++i], &o->backend.graphs, &err))
        return fprintf(stderr, "step: %s\n", err.msg), false;
    } else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
      o->batch = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
      o->steps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      o->threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--peak") && i + 1 < argc)
      o->peak = atof(argv[++i]);
    else if (!strcmp(argv[i], "--top") && i + 1 < argc)
      o->top = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--stages") && i + 1 < argc)
      o->top_stages = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--precision") && i + 1 < argc &&
             (!strcmp(argv[i + 1], "bf16") || !strcmp(argv[i + 1], "f32")))
      o->bf16 = !strcmp(argv[++i], "bf16");
    else if (!strcmp(argv[i], "--set") && i + 1 < argc && o->n_sets < 64)
      o->sets[o->n_sets++] = argv[++i];
    else if (argv[i][0] != '-')
      o->path = argv[i];
    else {
      fprintf(stderr, "usage: step [MODEL.json] [--batch N] [--steps N] [--threads N] "
                      "[--peak GFLOPS] [--top N] [--stages N] [--set KEY=VALUE ...] "
                      "[--precision f32|bf16] [--backend auto|cpu|cuda] [--device N] "
                      "[--cuda-graphs on|off]\n");
      return false;
    }
  }
  if (cm_backend_resolve(&o->backend, &o->choice, &err))
    return fprintf(stderr, "step: %s\n", err.msg), false;
  return true;
}

/* The variant's training step (AdamW, EMA) compiled with profiling; o->batch defaults to the
 * config's. Returns the exit status: 0, 2 for a bad config, 1 for a failed build. */
static int build_program(bench_opts *o, cm_model_config *cfg, cm_model *m, cm_graph **step,
                         cm_program **pr, double *t_build) {
  cm_err err = {0};
  if (cm_model_config_load(o->path, o->sets, o->n_sets, cfg, &err)) {
    fprintf(stderr, "%s\n", err.msg);
    return 2;
  }
  if (o->batch <= 0) o->batch = cfg->optimizer.batch;
  cm_model_build_opts bo = {o->batch, 1, CM_F32};
  if (cm_model_build(cfg, &bo, m, &err)) {
    fprintf(stderr, "%s: %s\n", o->path, err.msg);
    return 1;
  }
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  oc.frozen = cm_model_frozen_substrings;
  cm_ema_pair pairs[8];
  int n_pairs = 0;
  for (; n_pairs < 8 && cm_model_ema_online_prefixes[n_pairs]; n_pairs++) {
    pairs[n_pairs].online_prefix = cm_model_ema_online_prefixes[n_pairs];
    pairs[n_pairs].target_prefix = cm_model_ema_target_prefixes[n_pairs];
  }
  oc.ema = pairs;
  oc.n_ema = n_pairs;
  cm_train_step_info info;
  if (cm_build_train_step(m->g, m->loss, &oc, step, &info, &err) ||
      (o->bf16 && cm_autocast(step, CM_BF16, NULL, &err))) {
    fprintf(stderr, "%s: %s\n", o->path, err.msg);
    return 1;
  }
  cm_compile_opts co = {0};
  co.threads = o->threads;
  co.profile = o->choice.kind == CM_BACKEND_CPU; /* a GPU step runs unprofiled, as in training */
  co.resident_states = true;
  const cm_target *target = cm_backend_compile_opts(&o->choice, &co);
  *t_build = now();
  if (cm_compile(*step, target, &co, pr, &err)) {
    fprintf(stderr, "%s: %s\n", o->path, err.msg);
    return 1;
  }
  *t_build = now() - *t_build;
  return 0;
}

/* One warm-up step, the profiles after it (*base, *sbase), then o->steps timed steps: *dt the
 * seconds per step. Returns false (said) when a step fails. */
static bool time_steps(const bench_opts *o, cm_program *pr, cm_tensor **bound, int n_outputs,
                       cm_kernel_profile **base, cm_stage_profile **sbase, double *dt) {
  cm_err err = {0};
  cm_tensor outs[16];
  int n_out = n_outputs < 16 ? n_outputs : 16;
  if (cm_program_run(pr, bound, outs, &err)) { /* warm-up */
    fprintf(stderr, "%s: %s\n", o->path, err.msg);
    return false;
  }
  for (int j = 0; j < n_out; j++) cm_tensor_free(&outs[j]);
  const cm_kernel_profile *prof;
  int n_prof = cm_program_profile(pr, &prof);
  *base = malloc(sizeof **base * (size_t)(n_prof ? n_prof : 1));
  memcpy(*base, prof, sizeof **base * (size_t)n_prof);
  const cm_stage_profile *sprof;
  int n_sprof = cm_program_stage_profile(pr, &sprof);
  *sbase = malloc(sizeof **sbase * (size_t)(n_sprof ? n_sprof : 1));
  memcpy(*sbase, sprof, sizeof **sbase * (size_t)n_sprof);
  double t0 = now();
  for (int s = 0; s < o->steps; s++) {
    /* as the trainer: the next batch (here the same tensors) uploaded while the step runs */
    if (cm_program_start(pr, bound, &err) || cm_program_prefetch(pr, bound, &err) ||
        cm_program_finish(pr, outs, &err)) {
      fprintf(stderr, "%s: step %d: %s\n", o->path, s, err.msg);
      return false;
    }
    for (int j = 0; j < n_out; j++) cm_tensor_free(&outs[j]);
  }
  *dt = (now() - t0) / o->steps;
  return true;
}

/* The step's figures and the --top kernels by time per step; returns the kernels' ms per
 * step. */
static double print_kernels(const bench_opts *o, const char *name, const cm_program *pr,
                            const cm_kernel_profile *base, double dt, double t_build) {
  const cm_kernel_profile *prof;
  int n_prof = cm_program_profile(pr, &prof);
  double flops = 0, kernel_ms = 0;
  cm_kernel_profile *rows = malloc(sizeof *rows * (size_t)(n_prof ? n_prof : 1));
  for (int i = 0; i < n_prof; i++) {
    rows[i] = prof[i];
    rows[i].total_ms = (prof[i].total_ms - base[i].total_ms) / o->steps;
    flops += prof[i].flops;
    kernel_ms += rows[i].total_ms;
  }
  cm_program_stats st;
  cm_program_stats_get(pr, &st);
  char where[300];
  if (o->choice.kind == CM_BACKEND_CPU)
    snprintf(where, sizeof where, "%s, %d threads", o->choice.description, st.threads);
  else
    snprintf(where, sizeof where, "%s", o->choice.description);
  printf("%s: batch %d, %s, %d steps on %s; build %.2f s (%d kernels, %d distinct, %d "
         "stages, %d tuned, cache %d hits %d misses)\n",
         name, o->batch, o->bf16 ? "bf16" : "f32", o->steps, where, t_build, st.n_kernels,
         st.n_distinct_kernels, st.n_stages, st.tuned_stages, st.cache_hits, st.cache_misses);
  printf("step %.2f ms, %.1f images/s, %.3f GFLOP per step, %.1f GFLOP/s", 1e3 * dt, o->batch / dt,
         flops * 1e-9, flops * 1e-9 / dt);
  if (o->peak > 0)
    printf(", %.1f%% of peak %.1f GFLOP/s", 100 * flops * 1e-9 / dt / o->peak, o->peak);
  printf("\n");
  if (n_prof == 0) { /* no profile (a GPU backend): the step time is all there is */
    free(rows);
    return 0;
  }
  printf("kernels: %.2f ms of the step (the rest: binding, output copies)\n", kernel_ms);
  qsort(rows, (size_t)n_prof, sizeof *rows, by_time);
  printf("%-28s %-12s %9s %6s %9s\n", "kernel", "kind", "ms/step", "share", "GFLOP/s");
  for (int i = 0; i < n_prof && i < o->top; i++)
    printf("%-28s %-12s %9.3f %5.1f%% %9.1f\n", rows[i].name, cm_group_kind_name(rows[i].kind),
           rows[i].total_ms, 100 * rows[i].total_ms / (kernel_ms > 0 ? kernel_ms : 1),
           rows[i].total_ms > 0 ? rows[i].flops * 1e-6 / rows[i].total_ms : 0);
  free(rows);
  return kernel_ms;
}

/* --stages N: the N stages that took the most time per step, with their shapes. */
static void print_stages(const bench_opts *o, const cm_program *pr, const cm_stage_profile *sbase,
                         double kernel_ms) {
  const cm_stage_profile *sprof;
  int n_sprof = cm_program_stage_profile(pr, &sprof);
  cm_stage_profile *srows = malloc(sizeof *srows * (size_t)(n_sprof ? n_sprof : 1));
  for (int i = 0; i < n_sprof; i++) {
    srows[i] = sprof[i];
    srows[i].total_ms = (sprof[i].total_ms - sbase[i].total_ms) / o->steps;
  }
  qsort(srows, (size_t)n_sprof, sizeof *srows, by_stage_time);
  printf("\n%-22s %-24s %9s %6s %8s %6s  %s\n", "stage", "name", "ms/step", "share", "GFLOP/s",
         "items", "shape");
  for (int i = 0; i < n_sprof && i < o->top_stages; i++) {
    char id[48], shape[160];
    snprintf(id, sizeof id, "%s_s%d", srows[i].kernel, srows[i].stage_index);
    describe_stage(srows[i].stage, shape, sizeof shape);
    printf("%-22s %-24.24s %9.3f %5.1f%% %8.1f %6lld  %s\n", id, srows[i].stage->name,
           srows[i].total_ms, 100 * srows[i].total_ms / (kernel_ms > 0 ? kernel_ms : 1),
           srows[i].total_ms > 0 ? srows[i].flops * 1e-6 / srows[i].total_ms : 0,
           (long long)srows[i].work_items, shape);
  }
  free(srows);
}

int main(int argc, char **argv) {
  bench_opts o;
  if (!parse_args(argc, argv, &o)) return 2;
  cm_model_config cfg;
  cm_model m;
  cm_graph *step = NULL;
  cm_program *pr = NULL;
  double t_build = 0;
  int rc = build_program(&o, &cfg, &m, &step, &pr, &t_build);
  if (rc) return rc;
  cm_tensor *t = calloc((size_t)step->n_nodes, sizeof *t);
  cm_tensor **bound = calloc((size_t)step->n_nodes, sizeof *bound);
  cm_err err = {0}; /* images uniform in [-2, 2], masks sampled per row, params initialized */
  if (cm_train_example_sources(&cfg, step, 7, t, &err)) {
    fprintf(stderr, "%s: %s\n", o.path, err.msg);
    return 1;
  }
  for (int i = 0; i < step->n_nodes; i++) bound[i] = t[i].data ? &t[i] : NULL;
  cm_kernel_profile *base = NULL;
  cm_stage_profile *sbase = NULL;
  double dt = 0;
  if (!time_steps(&o, pr, bound, step->n_outputs, &base, &sbase, &dt)) return 1;
  double kernel_ms = print_kernels(&o, cfg.name, pr, base, dt, t_build);
  free(base);
  if (o.top_stages > 0) print_stages(&o, pr, sbase, kernel_ms);
  free(sbase);
  for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&t[i]);
  free(t);
  free(bound);
  cm_program_free(pr);
  cm_graph_free(step);
  cm_model_free(&m);
  return 0;
}
