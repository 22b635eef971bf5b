/* tests/gpu/gpu_diff.c — the GPU differential test: every shipped variant's
 * training step (the ImageNet-size ones shrunk, as tests/unit/test_pipeline_models.c
 * does) and a few odd-shaped graphs are compiled by the CUDA backend
 * (cm_compile for the device's arch: NVRTC, the driver loaded by
 * cm_cuda_driver_load), run kernel by kernel (cm_program_run_stepwise) and
 * checked kernel by kernel: each kernel's outputs within their forward error
 * bounds, the oracle run on the inputs the kernel read
 * (cm_plan_eval_group_bounded: any summation order, FMA or not, tensor cores
 * accumulating in f32), and each input exactly what the kernel that wrote it
 * left (sources: as uploaded). Then each variant's step is timed on the GPU
 * (the CUDA graph replayed).
 *
 * --emulated: one small graph on the emulated device (tests/emu: emu_driver,
 * emu_compiler), so that the test itself can be tried without a GPU.
 *
 * Exit 0: all agree; 1: a mismatch or failure; 77: no GPU or driver (skipped,
 * said on stderr). Run by tests/gpu/run.sh; not part of ctest (no GPU there). */
#include "models/models.h"
#include "runtime/runtime.h"
#include "tests/model_step.h"
#include "tests/tensor_compare.h"
#include "tests/emu/emu.h"
#include "tests/testlib.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures;
static const cm_cuda_driver *drv;        /* the runtime's loader, or the emulated device */
static const cm_cuda_compiler *compiler; /* NULL: NVRTC */

/* The driver and the arch of device 0; false (said on stderr) when there is none. */
static bool open_device(bool emulated, char *arch, size_t arch_size) {
  cm_err err = {0};
  if (emulated) {
    drv = emu_driver();
    compiler = emu_compiler();
    if (drv->init(0) != 0) return fprintf(stderr, "gpu_diff: the emulated driver failed\n"), false;
  } else if (cm_cuda_driver_load(&drv, &err) != CM_OK) {
    fprintf(stderr, "gpu_diff: %s\n", err.msg);
    return false;
  }
  cm_cuda_device dev;
  if (cm_cuda_devices(drv, &dev, 1, &err) < 1) {
    fprintf(stderr, "gpu_diff: no device: %s\n", err.msg[0] ? err.msg : "the driver sees none");
    return false;
  }
  snprintf(arch, arch_size, "%s", dev.arch);
  printf("device 0: %s (%s, %s, %d SMs, %.1f GiB)\n", dev.name, drv->name, dev.arch, dev.sms,
         (double)dev.total_bytes / (1 << 30));
  return true;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static test_rng rng = {88172645463325252ull};
static double uniform(void) {
  return test_uniform(&rng);
}

/* A program on the device, compiled by the CUDA backend for the device's arch. */
typedef struct gpu_prog {
  cm_program *prog;
  cm_target target;  /* the CUDA target it was compiled for (the device's arch) */
  const cm_graph *g; /* optimized copy */
  const cm_plan *plan;
  const cm_kprogram *kp;
  double compile_ms;
  int fused_spans; /* attention spans rendered as one fused kernel */
} gpu_prog;

static bool prog_build(const cm_graph *g0, const char *arch, gpu_prog *p) {
  memset(p, 0, sizeof *p);
  cm_err err = {0};
  if (cm_target_cuda(arch, &p->target, &err)) return fprintf(stderr, "%s\n", err.msg), false;
  cm_cuda_backend_opts bo = {drv, compiler, 0, CM_CUDA_GRAPHS_ON, 0};
  cm_compile_opts co = {.backend_opts = &bo};
  if (cm_compile(g0, &p->target, &co, &p->prog, &err)) {
    fprintf(stderr, "compile: %s\n", err.msg);
    return false;
  }
  p->g = cm_program_graph(p->prog);
  p->plan = cm_program_plan(p->prog);
  p->kp = cm_program_kernels(p->prog);
  char *src = NULL;
  size_t src_size = 0;
  FILE *mem = open_memstream(&src, &src_size);
  if (!mem || cm_program_emit(p->prog, -1, CM_EMIT_SOURCE, mem, &err)) {
    if (mem) fclose(mem);
    free(src);
    return fprintf(stderr, "emit: %s\n", err.msg), false;
  }
  fclose(mem);
  const cm_cuda_build *build = cm_program_cuda_build(p->prog);
  if (!build) return fprintf(stderr, "compile: no modules\n"), false;
  p->compile_ms = build->compile_ms;
  for (const char *q = src ? strstr(src, ", fused: ") : NULL; q; q = strstr(q + 1, ", fused: "))
    p->fused_spans++;
  free(src);
  return true;
}

/* What a checked run keeps, per node of the optimized graph. */
typedef struct run_check {
  const cm_tensor *const *uploaded; /* the sources as uploaded */
  cm_tensor *written;               /* each group output as its kernel left it */
  cm_tensor *in;                    /* the inputs of the kernel being checked */
  cm_tensor *vals, *got;            /* views for test_check_group */
  const cm_tensor **src;
  const char *what;
  bool ok;
  double worst;
  char worst_at[96];
  gpu_prog *p;
} run_check;

static bool is_fed(const cm_node *u) {
  return u->op == CM_OP_INPUT || u->op == CM_OP_PARAM || u->op == CM_OP_STATE;
}

/* Downloads node v (of type t; an assign: its state) as the kernels run so far left it. */
static bool download(const gpu_prog *p, int v, cm_tensor *out) {
  const cm_node *n = &p->g->nodes[v];
  cm_type t = n->op == CM_OP_ASSIGN ? p->g->nodes[n->inputs[0]].type : n->type;
  const void *at = cm_program_value(p->prog, v);
  if (!at || cm_tensor_alloc(out, t, NULL) != CM_OK) return false;
  memcpy(out->data, at, cm_type_nbytes(&t));
  return true;
}

/* Before kernel ki: its inputs, each what its producer wrote. */
static bool check_before(gpu_prog *p, int ki, run_check *rc) {
  const cm_group *gr = &p->plan->groups[p->kp->kernels[ki].group];
  for (int j = 0; j < gr->n_inputs; j++) {
    int v = gr->inputs[j];
    const cm_node *u = &p->g->nodes[v];
    if (!download(p, v, &rc->in[v]))
      return fprintf(stderr, "%s: input %s not on the device\n", rc->what, u->name), false;
    const cm_tensor *was = is_fed(u) ? rc->uploaded[v] : &rc->written[v];
    if (!was || !was->data ||
        memcmp(was->data, rc->in[v].data, cm_type_nbytes(&rc->in[v].type)) != 0) {
      fprintf(stderr, "%s: kernel %s reads %s, changed since it was %s\n", rc->what,
              p->kp->kernels[ki].name, u->name, is_fed(u) ? "uploaded" : "written");
      rc->ok = false;
    }
    if (is_fed(u))
      rc->src[v] = &rc->in[v];
    else
      rc->vals[v] = rc->in[v];
  }
  return true;
}

/* After kernel ki: its outputs within their bounds on the inputs it read. */
static bool check_after(gpu_prog *p, int ki, run_check *rc) {
  const cm_kernel *k = &p->kp->kernels[ki];
  const cm_group *gr = &p->plan->groups[k->group];
  for (int j = 0; j < gr->n_outputs; j++) {
    int v = gr->outputs[j];
    cm_tensor_free(&rc->written[v]);
    if (!download(p, v, &rc->written[v]))
      return fprintf(stderr, "%s: output %s not on the device\n", rc->what, p->g->nodes[v].name),
             false;
    rc->got[v] = rc->written[v];
  }
  cm_err err = {0};
  int at = -1;
  test_bounded r =
      test_check_group(p->g, p->plan, k->group, rc->src, rc->vals, rc->got, k->name, &at, &err);
  if (!(r.ratio <= 1)) {
    fprintf(stderr,
            "%s: kernel %s, output %s: |gpu - f64| = %g at [%lld] exceeds its bound %g %s\n",
            rc->what, k->name, at >= 0 ? p->g->nodes[at].name : "?", r.diff, (long long)r.at,
            r.bound, err.msg);
    rc->ok = false;
  }
  if (r.ratio > rc->worst || rc->worst_at[0] == 0) {
    rc->worst = r.ratio;
    snprintf(rc->worst_at, sizeof rc->worst_at, "%s %s", k->name,
             at >= 0 ? p->g->nodes[at].name : "?");
  }
  for (int j = 0; j < gr->n_inputs; j++) {
    int v = gr->inputs[j];
    cm_tensor_free(&rc->in[v]);
    memset(&rc->vals[v], 0, sizeof rc->vals[v]);
    rc->src[v] = NULL;
  }
  return true;
}

/* Between kernels of a stepwise run: kernel k-1 checked, kernel k's inputs checked. */
static cm_status visit(cm_program *pr, int k, void *ctx, cm_err *err) {
  run_check *rc = ctx;
  (void)pr;
  if (k > 0 && !check_after(rc->p, k - 1, rc))
    return cm_errorf(err, CM_EINVALID, "kernel %s: its outputs could not be read",
                     rc->p->kp->kernels[k - 1].name);
  if (k < rc->p->kp->n_kernels && !check_before(rc->p, k, rc))
    return cm_errorf(err, CM_EINVALID, "kernel %s: its inputs could not be read",
                     rc->p->kp->kernels[k].name);
  return CM_OK;
}

/* Runs g (sources bound by node id) on the GPU, kernel by kernel against the
 * bounded oracle, then times it. */
static bool check_graph(const char *what, const cm_graph *g, cm_tensor *src, const char *arch,
                        int time_steps) {
  gpu_prog p;
  if (!prog_build(g, arch, &p)) return fprintf(stderr, "%s: build failed\n", what), false;
  int n = p.g->n_nodes;
  run_check rc = {0};
  const cm_tensor **uploaded = calloc((size_t)n, sizeof *uploaded);
  rc.uploaded = uploaded;
  rc.written = calloc((size_t)n, sizeof *rc.written);
  rc.in = calloc((size_t)n, sizeof *rc.in);
  rc.vals = calloc((size_t)n, sizeof *rc.vals);
  rc.got = calloc((size_t)n, sizeof *rc.got);
  rc.src = calloc((size_t)n, sizeof *rc.src);
  rc.what = what;
  rc.ok = true;
  rc.p = &p;
  /* the sources by node of g; uploaded[] by node of the optimized graph (same names) */
  cm_tensor **ptr = calloc((size_t)g->n_nodes + 1, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) ptr[i] = src[i].data ? &src[i] : NULL;
  for (int i = 0; i < n; i++) {
    cm_op op = p.g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    int o = cm_graph_find(g, p.g->nodes[i].name);
    if (o < 0 || !src[o].data)
      return fprintf(stderr, "%s: source %s unbound\n", what, p.g->nodes[i].name), false;
    uploaded[i] = &src[o];
  }
  /* the uploaded copies: the run writes the states back into src */
  cm_tensor *kept = calloc((size_t)n + 1, sizeof *kept);
  for (int i = 0; i < n; i++)
    if (uploaded[i]) {
      cm_tensor_copy(&kept[i], uploaded[i], NULL);
      uploaded[i] = &kept[i];
    }
  cm_err err = {0};
  bool ok = cm_program_run_stepwise(p.prog, ptr, visit, &rc, &err) == CM_OK;
  if (!ok) fprintf(stderr, "%s: %s\n", what, err.msg);
  ok = ok && rc.ok;
  double ms = 0;
  if (ok && time_steps > 0) {
    if (cm_program_run(p.prog, ptr, NULL, &err) != CM_OK) /* captures the graph */
      return fprintf(stderr, "%s: %s\n", what, err.msg), false;
    double t0 = now();
    for (int s = 0; s < time_steps; s++)
      if (cm_program_run(p.prog, ptr, NULL, &err) != CM_OK)
        return fprintf(stderr, "%s: %s\n", what, err.msg), false;
    ms = 1e3 * (now() - t0) / time_steps;
  }
  printf("%-36s %5d kernels (%d fused attention)  worst |gpu - f64| / bound %.3g (%s)  %s  %s "
         "%.0f ms",
         what, p.kp->n_kernels, p.fused_spans, rc.worst, rc.worst_at, ok ? "ok" : "MISMATCH",
         cm_program_cuda_compiler(p.prog)->name, p.compile_ms);
  if (ms > 0) printf("  %.3f ms/run (CUDA graph)", ms);
  printf("\n");
  test_tally_report(what);
  for (int i = 0; i < n; i++)
    cm_tensor_free(&rc.written[i]), cm_tensor_free(&rc.in[i]), cm_tensor_free(&kept[i]);
  free(uploaded), free(rc.written), free(rc.in), free(rc.vals), free(rc.got), free(rc.src);
  free(kept), free(ptr);
  cm_program_free(p.prog);
  return ok;
}

static void bind_sources(const cm_graph *g, const cm_model_config *cfg, const cm_model *m,
                         cm_tensor *t) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    cm_tensor_alloc(&t[i], n->type, NULL);
    int64_t cnt = cm_type_numel(&n->type);
    if (n->op != CM_OP_INPUT)
      cm_init_tensor(&t[i], &n->attrs.init, 7, n->name, NULL);
    else if (!strcmp(n->name, "lr"))
      cm_tensor_set_f64(&t[i], 0, 1e-3);
    else if (!strcmp(n->name, "beta1") || !strcmp(n->name, "momentum"))
      cm_tensor_set_f64(&t[i], 0, !strcmp(n->name, "beta1") ? 0.9 : 0.996);
    else if (!strcmp(n->name, "beta2"))
      cm_tensor_set_f64(&t[i], 0, 0.95);
    else if (!strcmp(n->name, "step"))
      cm_tensor_set_f64(&t[i], 0, 1);
    else if (cm_dtype_is_float(n->type.dtype))
      for (int64_t e = 0; e < cnt; e++) cm_tensor_set_f64(&t[i], e, uniform() * 4 - 2);
  }
  if (m && test_sample_masks(g, cfg, m, t, uniform) != 0)
    fprintf(stderr, "a mask sample keeps other than %d tokens\n", m->n_keep);
}

static bool check_variant(const char *path, const char *const *sets, int n_sets, int batch,
                          const char *arch) {
  cm_err err = {0};
  cm_model_config cfg;
  if (cm_model_config_load(path, sets, n_sets, &cfg, &err))
    return fprintf(stderr, "%s\n", err.msg), false;
  cm_model_build_opts bo = {batch, 1, CM_F32};
  cm_model m;
  if (cm_model_build(&cfg, &bo, &m, &err)) return fprintf(stderr, "%s: %s\n", path, err.msg), false;
  cm_optim_config oc = test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  if (cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err))
    return fprintf(stderr, "%s: %s\n", path, err.msg), false;
  cm_tensor *t = calloc((size_t)step->n_nodes, sizeof *t);
  bind_sources(step, &cfg, &m, t);
  char what[128];
  snprintf(what, sizeof what, "%s%s b%d", strrchr(path, '/') + 1, n_sets ? " (shrunk)" : "", batch);
  bool ok = check_graph(what, step, t, arch, 20);
  for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&t[i]);
  free(t);
  cm_graph_free(step);
  cm_model_free(&m);
  return ok;
}

/* y = gelu-ish(x W + b) and a row softmax at odd shapes */
static bool check_small(const char *arch, int64_t M, int64_t N, int64_t K) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {M, K}, wd[2] = {K, N}, bd[1] = {N};
  int x = cm_input(g, "x", CM_F32, 2, xd), w = cm_input(g, "w", CM_F32, 2, wd);
  int b = cm_input(g, "b", CM_F32, 1, bd);
  int y = cm_matmul(g, x, w, false, false, "y");
  int64_t yd[2] = {M, N};
  int yb = cm_binary(g, CM_OP_ADD, y, cm_broadcast(g, b, 2, yd, NULL), "yb");
  int r = cm_unary(g, CM_OP_RELU, yb, "r");
  cm_err err = {0};
  if (g->error.status || cm_graph_add_output(g, r, &err))
    return fprintf(stderr, "graph: %s\n", g->error.msg), false;
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  bind_sources(g, NULL, NULL, t);
  char what[96];
  snprintf(what, sizeof what, "gemm+bias+relu %lldx%lldx%lld", (long long)M, (long long)N,
           (long long)K);
  bool ok = check_graph(what, g, t, arch, 0);
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t[i]);
  free(t);
  cm_graph_free(g);
  return ok;
}

/* Multi-head self-attention at odd shapes, forward and backward (the gradient
 * of sum(y*y) with respect to x and the weights): the fused attention spans of
 * the CUDA renderer (a block per batch item and query rows, locals in shared
 * memory), with row counts that leave a short last block of rows. */
static bool check_attention(const char *arch, int64_t n, int64_t T, int64_t D, int heads) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {n, T, D};
  int x = cm_input(g, "x", CM_F32, 3, xd);
  int y = cm_nn_attention(g, x, heads, true, "attn");
  int sq = cm_binary(g, CM_OP_MUL, y, y, "sq");
  int axes[3] = {0, 1, 2};
  int loss = cm_reduce(g, CM_OP_REDUCE_SUM, sq, 3, axes, false, "loss");
  cm_err err = {0};
  int wrt[2] = {x, cm_graph_find(g, "attn.qkv.weight")}, grads[2] = {-1, -1};
  int n_wrt = wrt[1] >= 0 ? 2 : 1;
  if (g->error.status || cm_autodiff(g, loss, n_wrt, wrt, grads, &err) ||
      cm_graph_add_output(g, y, &err) || cm_graph_add_output(g, grads[0], &err) ||
      (n_wrt == 2 && cm_graph_add_output(g, grads[1], &err)))
    return fprintf(stderr, "attention graph: %s %s\n", g->error.msg, err.msg), false;
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  bind_sources(g, NULL, NULL, t);
  char what[96];
  snprintf(what, sizeof what, "attention n%lld T%lld D%lld h%d fwd+bwd", (long long)n, (long long)T,
           (long long)D, heads);
  bool ok = check_graph(what, g, t, arch, 0);
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t[i]);
  free(t);
  cm_graph_free(g);
  return ok;
}

int main(int argc, char **argv) {
  bool emulated = argc == 2 && !strcmp(argv[1], "--emulated");
  if (argc > 1 && !emulated) {
    fprintf(stderr, "usage: gpu_diff [--emulated]\n");
    return 2;
  }
  char arch[16];
  if (!open_device(emulated, arch, sizeof arch)) {
    fprintf(stderr, "gpu_diff: no CUDA driver or GPU here: skipped\n");
    return 77;
  }
  if (emulated) { /* one small graph: the emulated device runs its kernels on this CPU */
    if (!check_small(arch, 7, 13, 5)) failures++;
    printf("gpu_diff --emulated: %s\n", failures ? "FAILED" : "agrees with the oracle");
    return failures ? 1 : 0;
  }
  static const int64_t shapes[][3] = {
      {1, 1, 1}, {7, 13, 5}, {97, 31, 129}, {130, 260, 300}, {512, 384, 1536}};
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
    if (!check_small(arch, shapes[i][0], shapes[i][1], shapes[i][2])) failures++;
  static const int64_t attn_shapes[][4] = {
      {1, 1, 8, 1}, {2, 65, 32, 2}, {3, 197, 48, 3}, {1, 50, 64, 4}};
  for (size_t i = 0; i < sizeof attn_shapes / sizeof attn_shapes[0]; i++)
    if (!check_attention(arch, attn_shapes[i][0], attn_shapes[i][1], attn_shapes[i][2],
                         (int)attn_shapes[i][3]))
      failures++;
  if (!check_variant("models/cmae_vit_tiny_fmnist.json", NULL, 0, 8, arch)) failures++;
  if (!check_variant("models/cmae_convvit_tiny_fmnist.json", NULL, 0, 8, arch)) failures++;
  if (!check_variant("models/cmae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, 2, arch))
    failures++;
  if (!check_variant("models/cmae_vit_small.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, 2, arch))
    failures++;
  if (!check_variant("models/cmae_vit_large.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, 2, arch))
    failures++;
  if (!check_variant("models/mae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_MAE, 2, arch))
    failures++;
  if (!check_variant("models/cmae_convvit_base.json", test_shrunk_convvit, TEST_SHRUNK_CONVVIT_N, 2,
                     arch))
    failures++;
  printf("gpu_diff: %s (%d failures)\n", failures ? "FAILED" : "all agree with the oracle",
         failures);
  return failures ? 1 : 0;
}
