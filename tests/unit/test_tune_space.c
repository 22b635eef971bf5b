/* The autotuner's spaces (codegen/tune_space.c) over the default variant's training step
 * (cmae_vit_tiny_fmnist at batch 64), f32 and bf16 (autocast), lowered for the host CPU, znver4
 * (AVX-512 and vdpbf16ps: applied, not run), sm_80 and sm_90:
 *   - the default point reproduces the lowered plan exactly (cm_kernel_print and every stage's
 *     cm_kcuda_plan_print byte for byte), and every point of every space (every 9th in CI)
 *     applies or is refused with CM_EINVALID naming the kernel; CUDA kernels render
 *     (cm_render_cuda) under a sample of the applied points;
 *   - applied points compute the same function: small GEMM and attention graphs (forward and
 *     backward, whole-row and streaming) run through the LLVM JIT under a sample of each space's
 *     points (2 in CI, 60 with --long) and each output lies within its forward error bound
 *     (cm_eval_bounded);
 *   - points format and parse back, and parsing refuses what is not in the space;
 *   - the structural hash: equal for two layers' equal kernels and across two builds, blind to
 *     names, group numbers, offsets and the plan, and changed by a dtype, a shape or an
 *     expression;
 *   - on the emulated CUDA device: an FMA GEMM, a softmax's rows plan and a row sum's generic plan
 *     under other tiles, threads and reduction modes, within their bounds;
 *   - the cost model: deterministic, and more for a tile that pads twice the work, a rows plan
 *     with half the warps in a memory-bound stage, or a thread per point over a long reduction. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../llvm_kernels.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static test_rng rng = {0x7e57ull};

/* ---- graphs, plans, kernels -------------------------------------------------------------- */

typedef struct lowered {
  cm_graph *g;
  cm_plan *plan;
  cm_kprogram kp;
  bool ok;
} lowered;

static lowered lower_for(const cm_graph *g0, const cm_target *t, int attn_bc) {
  lowered L;
  memset(&L, 0, sizeof L);
  cm_err err = {0};
  cm_pass_state s = {cm_graph_clone(g0), NULL};
  cm_status st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
  CHECK_MSG(st == CM_OK, "pipeline: %s", err.msg);
  L.g = s.g, L.plan = s.plan;
  if (st != CM_OK) return L;
  cm_lower_opts lo = {t, false, attn_bc};
  st = cm_lower_plan(L.g, L.plan, &lo, &L.kp, &err);
  CHECK_MSG(st == CM_OK, "lower for %s: %s", t->arch, err.msg);
  L.ok = st == CM_OK;
  return L;
}

static void lowered_free(lowered *L) {
  if (L->ok) cm_kprogram_free(&L->kp);
  cm_plan_free(L->plan);
  cm_graph_free(L->g);
  memset(L, 0, sizeof *L);
}

/* The default variant's training step (cmae_vit_tiny_fmnist) at batch `batch`; bf16: autocast.
 * NULL on failure. */
static cm_graph *step_graph(bool bf16, int batch) {
  cm_model_config cfg;
  cm_err err = {0};
  if (cm_model_config_load("models/cmae_vit_tiny_fmnist.json", NULL, 0, &cfg, &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    return NULL;
  }
  cm_model_build_opts bo = {batch, 1, CM_F32};
  cm_model m;
  CHECK_MSG(cm_model_build(&cfg, &bo, &m, &err) == CM_OK, "%s", err.msg);
  if (!m.g) return NULL;
  cm_optim_config oc = test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err) == CM_OK, "%s", err.msg);
  cm_model_free(&m);
  if (step && bf16) CHECK_MSG(cm_autocast(&step, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
  return step;
}

/* The kernel's IR and every stage's CUDA plan as text (malloc'ed). */
static char *print_kernel(const cm_kernel *k) {
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  cm_kernel_print(k, f);
  for (int i = 0; i < k->n_stages; i++) cm_kcuda_plan_print(&k->stages[i].cuda, f);
  fclose(f);
  return text;
}

static void targets(cm_target t[3]) {
  cm_err err = {0};
  cm_target_host(&t[0]);
  CHECK(cm_target_cuda("sm_80", &t[1], &err) == CM_OK);
  CHECK(cm_target_cuda("sm_90", &t[2], &err) == CM_OK);
}

/* ---- every point of every space of the step ------------------------------------------------- */

/* A deep copy of src (a K split point adds or removes stages: a stage copy cannot undo it). */
static void kernel_dup(const cm_kernel *src, cm_kernel *dst) {
  *dst = *src;
  dst->buffers = malloc(sizeof *dst->buffers * (size_t)(src->n_buffers + 1));
  dst->stages = calloc((size_t)src->n_stages + 1, sizeof *dst->stages);
  CHECK(dst->buffers && dst->stages);
  dst->cap_buffers = src->n_buffers + 1, dst->cap_stages = src->n_stages + 1;
  memcpy(dst->buffers, src->buffers, sizeof *dst->buffers * (size_t)src->n_buffers);
  for (int i = 0; i < src->n_stages; i++) {
    cm_kstage *d = &dst->stages[i];
    *d = src->stages[i];
    d->exprs = malloc(sizeof *d->exprs * (size_t)(d->n_exprs + 1));
    CHECK(d->exprs != NULL);
    d->cap_exprs = d->n_exprs + 1;
    memcpy(d->exprs, src->stages[i].exprs, sizeof *d->exprs * (size_t)d->n_exprs);
  }
}

/* k back to saved (a deep copy of it, kept). */
static void kernel_restore(cm_kernel *k, const cm_kernel *saved) {
  cm_kernel_free(k);
  kernel_dup(saved, k);
}

typedef struct sweep {
  int64_t spaces, points, applied, refused, rendered, resplit;
  int knobs_seen[8]; /* by knob count, for the summary */
} sweep;

/* Renders k for CUDA target t: the applied plan must be one the renderer takes. */
static bool renders(const cm_kernel *k, const cm_target *t, const char *what) {
  cm_cuda_render_opts ro = {t, false};
  char *src = NULL;
  cm_err err = {0};
  cm_status st = cm_render_cuda(k, &ro, false, &src, &err);
  CHECK_MSG(st == CM_OK, "%s: render: %s", what, err.msg);
  free(src);
  return st == CM_OK;
}

/* The default point of every tunable stage of k applied: the kernel prints as before. */
static void check_defaults(cm_kernel *k, const cm_target *t) {
  char *before = print_kernel(k);
  for (int si = 0; si < k->n_stages; si++) {
    cm_tune_space sp;
    cm_tune_point p;
    cm_err err = {0};
    if (cm_tune_space_of(k, si, t, &sp, &err) != CM_OK || sp.n_knobs == 0) continue;
    cm_tune_point_default(&sp, &p);
    cm_status st = cm_tune_apply(k, si, t, &p, &err);
    CHECK_MSG(st == CM_OK, "%s s%d on %s: the default refused: %s", k->name, si, t->arch, err.msg);
  }
  char *after = print_kernel(k);
  CHECK_MSG(!strcmp(before, after), "%s on %s: the default points changed the plan:\n%s\n%s",
            k->name, t->arch, before, after);
  free(after);
  free(before);
}

static void sweep_stage(cm_kernel *k, int si, const cm_target *t, sweep *sw, int64_t stride) {
  cm_tune_space sp;
  cm_err err = {0};
  CHECK_MSG(cm_tune_space_of(k, si, t, &sp, &err) == CM_OK, "%s s%d: %s", k->name, si, err.msg);
  if (sp.n_knobs == 0) return;
  sw->spaces++;
  cm_kstage *others = malloc(sizeof *others * (size_t)k->n_stages);
  memcpy(others, k->stages, sizeof *others * (size_t)k->n_stages);
  cm_tune_point p;
  cm_kstage saved = k->stages[si];
  cm_kernel whole; /* for the K split's points, which add or remove a stage */
  kernel_dup(k, &whole);
  int n_stages = k->n_stages, splits = 0;
  cm_status st;
  for (int64_t i = 0; i < sp.n_points; i += stride) {
    cm_tune_point_at(&sp, i, &p);
    st = cm_tune_apply(k, si, t, &p, &err);
    sw->points++;
    CHECK_MSG(st == CM_OK || st == CM_EINVALID, "%s s%d point %lld: status %d: %s", k->name, si,
              (long long)i, (int)st, err.msg);
    if (st == CM_OK) {
      sw->applied++;
      if (t->kind == CM_TARGET_CUDA && (sw->applied % 23 == 0 || i == 0))
        sw->rendered += renders(k, t, k->name);
    } else {
      sw->refused++;
      CHECK_MSG(strstr(err.msg, k->name) != NULL, "the refusal names the kernel: %s", err.msg);
    }
    /* a K split point rebuilds the stage (merged, split again: maybe as many stages) */
    if (k->n_stages != n_stages || k->stages[si].exprs != saved.exprs) {
      splits++;
      kernel_restore(k, &whole);
      free(others);
      others = malloc(sizeof *others * (size_t)k->n_stages);
      memcpy(others, k->stages, sizeof *others * (size_t)k->n_stages);
      saved = k->stages[si];
      continue;
    }
    k->stages[si] = saved;
  }
  sw->resplit += splits;
  cm_kernel_free(&whole);
  /* applying touched no other stage */
  CHECK_MSG(!memcmp(k->stages, others, sizeof *others * (size_t)si) &&
                !memcmp(k->stages + si + 1, others + si + 1,
                        sizeof *others * (size_t)(k->n_stages - si - 1)),
            "%s s%d: applying changed another stage", k->name, si);
  free(others);
}

static void step_spaces(int64_t stride) {
  cm_target t[4];
  targets(t);
  /* and AVX-512 with vdpbf16ps (compiled for, not run: its 16-lane blocks and 32 registers) */
  cm_err err = {0};
  CHECK_MSG(cm_target_cpu("znver4", NULL, &t[3], &err) == CM_OK, "%s", err.msg);
  CHECK(t[3].vector_lanes == 16 && t[3].cpu.dot_bf16);
  for (int bf16 = 0; bf16 < 2; bf16++) {
    cm_graph *g = step_graph(bf16, 64);
    if (!g) continue;
    for (int ti = 0; ti < 4; ti++) {
      lowered L = lower_for(g, &t[ti], 0);
      sweep sw = {0};
      for (int ki = 0; L.ok && ki < L.kp.n_kernels; ki++) {
        check_defaults(&L.kp.kernels[ki], &t[ti]);
        for (int si = 0; si < L.kp.kernels[ki].n_stages; si++)
          sweep_stage(&L.kp.kernels[ki], si, &t[ti], &sw, stride);
      }
      printf("  %s %s: %lld spaces, %lld points: %lld applied, %lld refused, %lld rendered, %lld "
             "K splits changed\n",
             bf16 ? "bf16" : "f32", t[ti].arch, (long long)sw.spaces, (long long)sw.points,
             (long long)sw.applied, (long long)sw.refused, (long long)sw.rendered,
             (long long)sw.resplit);
      if (t[ti].kind == CM_TARGET_CPU) CHECK(sw.resplit > 0); /* the weight gradients' K */
      CHECK(sw.spaces > 0);
      CHECK(sw.applied > sw.spaces); /* more than the defaults apply */
      CHECK(sw.refused > 0);         /* and the pruning refuses some */
      lowered_free(&L);
    }
    cm_graph_free(g);
  }
}

/* ---- applied points compute the same function (CPU JIT) ------------------------------------ */

typedef struct jit_prog {
  cm_jit *jit;
  lowered L;
  cm_cpu_stage_fn **fns; /* per kernel, per stage */
  cm_tensor *src;        /* by node: the sources */
  const cm_tensor **srcp;
  test_oracle want;
  const cm_target *emu; /* non-NULL: kernels run on the emulated CUDA device for this target */
} jit_prog;

static bool emu_run_kernel(const cm_kernel *k, const cm_target *t, char **bufs, const char *what);

static bool jit_kernel(jit_prog *P, int ki) {
  cm_kernel *k = &P->L.kp.kernels[ki];
  free(P->fns[ki]);
  P->fns[ki] = calloc((size_t)k->n_stages + 1, sizeof **P->fns);
  cm_llvm_render_opts ro = {0, false, NULL};
  return test_jit_kernel(P->jit, k, &ro, P->fns[ki]);
}

/* Every kernel of the program, serially, on copies of the sources; every output against its
 * forward error bound. Returns the worst |got - f64| / bound. */
CM_NO_SANITIZE_FUNCTION static double run_prog(jit_prog *P, const char *what) {
  const cm_graph *g = P->L.g;
  const cm_kprogram *kp = &P->L.kp;
  cm_err err = {0};
  cm_tensor *st = calloc((size_t)g->n_nodes, sizeof *st);
  for (int i = 0; i < g->n_nodes; i++)
    if (P->srcp[i]) cm_tensor_copy(&st[i], P->srcp[i], NULL);
  char *arena = aligned_alloc(64, (size_t)(kp->arena_bytes + 127) / 64 * 64);
  char *scratch = aligned_alloc(64, (size_t)(kp->max_scratch_bytes + 127) / 64 * 64);
  memset(arena, 0, (size_t)(kp->arena_bytes + 127) / 64 * 64);
  for (int ki = 0; ki < kp->n_kernels; ki++) {
    const cm_kernel *k = &kp->kernels[ki];
    char **bufs = calloc((size_t)k->n_buffers + 1, sizeof *bufs);
    void **owned = calloc((size_t)k->n_buffers + 1, sizeof *owned);
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      if (kb->kind == CM_KBUF_ARENA) bufs[b] = arena + kb->offset;
      if (kb->kind == CM_KBUF_SCRATCH) bufs[b] = scratch + kb->offset;
      if (kb->kind == CM_KBUF_SOURCE) bufs[b] = st[kb->node].data;
      if (kb->kind == CM_KBUF_STATUS) bufs[b] = owned[b] = calloc((size_t)kb->numel + 1, 8);
      if (kb->kind == CM_KBUF_CONST) bufs[b] = owned[b] = cm_kernel_const_data(g, kb, &err);
    }
    if (P->emu) CHECK(emu_run_kernel(k, P->emu, bufs, what));
    for (int si = 0; !P->emu && si < k->n_stages; si++) {
      int64_t ws_bytes = cm_kstage_workspace_bytes(&k->stages[si], CM_TARGET_CPU);
      char *ws = aligned_alloc(64, (size_t)(ws_bytes + 127) / 64 * 64);
      P->fns[ki][si](bufs, 0, cm_kstage_work_items(&k->stages[si]), ws);
      free(ws);
    }
    for (int b = 0; b < k->n_buffers; b++) free(owned[b]);
    free(bufs), free(owned);
  }
  double worst = 0;
  for (int j = 0; j < g->n_outputs; j++) {
    int v = g->outputs[j];
    const cm_node *u = &g->nodes[v];
    cm_tensor got = u->op == CM_OP_ASSIGN || P->L.plan->offset[v] < 0
                        ? st[u->op == CM_OP_ASSIGN ? u->inputs[0] : v]
                        : test_view(u->type, arena + P->L.plan->offset[v]);
    test_bounded e = test_oracle_check(&P->want, v, &got, what);
    CHECK_MSG(e.ratio <= 1, "%s: %s: |got - f64| = %g at [%lld] exceeds its error bound %g", what,
              u->name, e.diff, (long long)e.at, e.bound);
    worst = fmax(worst, e.ratio);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&st[i]);
  free(st), free(arena), free(scratch);
  return worst;
}

static bool jit_prog_open(jit_prog *P, const cm_graph *g0, const cm_target *t, int attn_bc) {
  memset(P, 0, sizeof *P);
  P->L = lower_for(g0, t, attn_bc);
  if (t->kind == CM_TARGET_CUDA) P->emu = t;
  if (!P->L.ok) return false;
  const cm_graph *g = P->L.g;
  P->src = calloc((size_t)g->n_nodes, sizeof *P->src);
  P->srcp = calloc((size_t)g->n_nodes, sizeof *P->srcp);
  test_fill_sources(&rng, g, P->src, P->srcp);
  cm_err err = {0};
  CHECK_MSG(test_oracle_eval(&P->want, g, P->srcp, &err) == CM_OK, "oracle: %s", err.msg);
  /* O1: the function, not its speed, is under test (and O3's compile time adds up) */
  cm_jit_opts jo = {NULL, 1, NULL, NULL, 512, false};
  CHECK_MSG(cm_jit_create(&P->jit, &jo, &err) == CM_OK, "%s", err.msg);
  P->fns = calloc((size_t)P->L.kp.n_kernels, sizeof *P->fns);
  if (P->emu) return true;
  bool ok = P->jit != NULL;
  for (int ki = 0; ok && ki < P->L.kp.n_kernels; ki++) ok = jit_kernel(P, ki);
  return ok;
}

static void jit_prog_close(jit_prog *P) {
  for (int ki = 0; ki < P->L.kp.n_kernels; ki++) free(P->fns[ki]);
  free(P->fns);
  if (P->jit) cm_jit_destroy(P->jit);
  test_oracle_free(&P->want);
  for (int i = 0; P->src && i < P->L.g->n_nodes; i++) cm_tensor_free(&P->src[i]);
  free(P->src), free(P->srcp);
  lowered_free(&P->L);
}

/* y = relu(x w + bias) */
static cm_graph *gemm_graph(int64_t batch, int64_t M, int64_t N, int64_t K) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {batch, M, K}, wd[3] = {batch, K, N}, bd[1] = {N};
  int r = batch > 1 ? 3 : 2, o = batch > 1 ? 0 : 1;
  int x = cm_input(g, "x", CM_F32, r, xd + o), w = cm_input(g, "w", CM_F32, r, wd + o);
  int bias = cm_input(g, "bias", CM_F32, 1, bd);
  int y = cm_matmul(g, x, w, false, false, "y");
  y = cm_unary(g, CM_OP_RELU, cm_binary_bcast(g, CM_OP_ADD, y, bias, "yb"), "yr");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  return g;
}

/* y = softmax(q k^T / sqrt(dim)) v and the gradients of sum(y * dO) for q, k, v. */
static cm_graph *attention_graph(int64_t heads, int64_t tokens, int64_t dim) {
  cm_graph *g = cm_graph_new();
  int64_t d[4] = {1, heads, tokens, dim};
  int q = cm_input(g, "q", CM_F32, 4, d), k = cm_input(g, "k", CM_F32, 4, d);
  int v = cm_input(g, "v", CM_F32, 4, d), dout = cm_input(g, "dO", CM_F32, 4, d);
  int s = cm_matmul(g, q, k, false, true, "scores");
  s = cm_binary_bcast(g, CM_OP_MUL, s, cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)dim)),
                      "scaled");
  int y = cm_matmul(g, cm_nn_softmax(g, s), v, false, false, "y");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  int axes[4] = {0, 1, 2, 3};
  int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 4, axes, false,
                       "loss");
  int wrt[3] = {q, k, v}, grads[3];
  CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
  for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
  return g;
}

/* After autocast (bf16 operands, so sm_80 and sm_90 plan flash spans): attention_graph
 * (backward), or its forward alone (the training graph keeps P for the backward, which no
 * flash forward does). */
static cm_graph *flash_graph(int64_t tokens, int64_t dim, bool backward) {
  cm_graph *g = backward ? attention_graph(2, tokens, dim) : cm_graph_new();
  cm_err err = {0};
  if (!backward) {
    int64_t d[4] = {1, 2, tokens, dim};
    int q = cm_input(g, "q", CM_F32, 4, d), k = cm_input(g, "k", CM_F32, 4, d);
    int v = cm_input(g, "v", CM_F32, 4, d);
    int s = cm_matmul(g, q, k, false, true, "scores");
    s = cm_binary_bcast(g, CM_OP_MUL, s, cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)dim)),
                        "scaled");
    CHECK(cm_graph_add_output(g, cm_matmul(g, cm_nn_softmax(g, s), v, false, false, "y"), &err) ==
          CM_OK);
  }
  CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
  return g;
}

typedef struct jit_tally {
  int spaces, runs, attn_spaces, gemm_spaces, resplit;
  double worst;
} jit_tally;

/* Stage si of kernel ki under `want` applied points of its space (all: want <= 0), spread over
 * the space, each JIT'd and run against the oracle. */
static void jit_points(jit_prog *P, int ki, int si, const cm_target *t, int want, const char *name,
                       jit_tally *tally) {
  cm_kernel *k = &P->L.kp.kernels[ki];
  cm_tune_space sp;
  cm_err err = {0};
  if (cm_tune_space_of(k, si, t, &sp, &err) != CM_OK || sp.n_knobs == 0) return;
  tally->spaces++;
  tally->attn_spaces += k->stages[si].tmpl != CM_KT_GEMM;
  tally->gemm_spaces += k->stages[si].tmpl == CM_KT_GEMM;
  cm_kernel saved;
  kernel_dup(k, &saved);
  cm_cpu_stage_fn *defaults = P->fns[ki]; /* the default plan's functions, kept for the others */
  P->fns[ki] = NULL;
  int ran = 0;
  /* a sample: the points in a scrambled order (7919 is prime), the first `want` that apply */
  for (int64_t i = 1; i < sp.n_points && (want <= 0 || ran < want); i++) {
    cm_tune_point p;
    cm_tune_point_at(&sp, want <= 0 ? i : (i * 7919) % sp.n_points, &p);
    if (cm_tune_apply(k, si, t, &p, &err) != CM_OK) continue;
    /* a K split point may add a scratch buffer */
    if (k->scratch_bytes > P->L.kp.max_scratch_bytes) P->L.kp.max_scratch_bytes = k->scratch_bytes;
    tally->resplit +=
        k->n_stages != saved.n_stages || k->stages[si].red[0] != saved.stages[si].red[0];
    char what[160], pt[96];
    cm_tune_point_format(&sp, &p, pt, sizeof pt);
    snprintf(what, sizeof what, "%s %s s%d %s", name, k->name, si, pt);
    if (jit_kernel(P, ki)) tally->worst = fmax(tally->worst, run_prog(P, what));
    kernel_restore(k, &saved);
    ran++, tally->runs++;
  }
  CHECK_MSG(ran > 0, "%s %s s%d: no point besides the default applies", name, k->name, si);
  free(P->fns[ki]);
  P->fns[ki] = defaults;
  cm_kernel_free(&saved);
}

static void same_function(int want) {
  cm_target t;
  cm_target_host(&t);
  static const struct {
    int64_t batch, M, N, K, heads, tokens, dim;
    int attn_bc;
  } cases[] = {
      {1, 37, 45, 70, 0, 0, 0, 0}, {3, 13, 29, 300, 0, 0, 0, 0}, {1, 24, 40, 1536, 0, 0, 0, 0},
      {0, 0, 0, 0, 2, 50, 16, 0},  {0, 0, 0, 0, 1, 61, 8, 16},
  };
  jit_tally tally = {0};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    char name[64];
    cm_graph *g;
    if (cases[c].heads) {
      g = attention_graph(cases[c].heads, cases[c].tokens, cases[c].dim);
      snprintf(name, sizeof name, "attention %lldx%lldx%lld bc %d", (long long)cases[c].heads,
               (long long)cases[c].tokens, (long long)cases[c].dim, cases[c].attn_bc);
    } else {
      g = gemm_graph(cases[c].batch, cases[c].M, cases[c].N, cases[c].K);
      snprintf(name, sizeof name, "gemm %lldx[%lldx%lldx%lld]", (long long)cases[c].batch,
               (long long)cases[c].M, (long long)cases[c].N, (long long)cases[c].K);
    }
    jit_prog P;
    if (jit_prog_open(&P, g, &t, cases[c].attn_bc)) {
      tally.worst = fmax(tally.worst, run_prog(&P, name));
      for (int ki = 0; ki < P.L.kp.n_kernels; ki++)
        for (int si = 0; si < P.L.kp.kernels[ki].n_stages; si++)
          jit_points(&P, ki, si, &t, want, name, &tally);
    }
    jit_prog_close(&P);
    cm_graph_free(g);
  }
  printf("  %d spaces (%d GEMM, %d attention), %d tuned runs (%d with another K split), worst "
         "error / bound %.3g\n",
         tally.spaces, tally.gemm_spaces, tally.attn_spaces, tally.runs, tally.resplit,
         tally.worst);
  CHECK(tally.gemm_spaces >= 3);
  CHECK(tally.attn_spaces >= 2);
  test_tally_report("tune_space");
}

static void test_same_function(void) {
  same_function(getenv("CMAEC_TEST_QUICK") ? 1 : 2);
}
static void test_same_function_all(void) {
  same_function(60);
}

static void test_step_spaces(void) {
  step_spaces(getenv("CMAEC_TEST_QUICK") ? 29 : 9);
}
static void test_step_spaces_all(void) {
  step_spaces(1);
}

/* ---- format and parse ---------------------------------------------------------------------- */

static bool same_point(const cm_tune_space *sp, const cm_tune_point *a, const cm_tune_point *b) {
  for (int k = 0; k < sp->n_knobs; k++)
    if (a->value[k] != b->value[k]) return false;
  return true;
}

static void check_format_parse(const cm_tune_space *sp, const char *what, int *spaces) {
  if (sp->n_knobs == 0) return;
  (*spaces)++;
  cm_tune_point p, q, d;
  cm_err err = {0};
  char text[256], bad[300];
  cm_tune_point_default(sp, &d);
  cm_tune_point_at(sp, 0, &p);
  CHECK_MSG(same_point(sp, &p, &d), "%s: point 0 is not the default", what);
  /* every point (up to 200) formats, parses back to itself, and differs from the others */
  int64_t n = sp->n_points < 200 ? sp->n_points : 200;
  cm_tune_point *seen = calloc((size_t)n, sizeof *seen);
  for (int64_t i = 0; i < n; i++) {
    cm_tune_point_at(sp, i, &p);
    int len = cm_tune_point_format(sp, &p, text, sizeof text);
    CHECK(len > 0 && (size_t)len < sizeof text);
    CHECK_MSG(cm_tune_point_parse(sp, text, &q, &err) == CM_OK && same_point(sp, &p, &q),
              "%s: \"%s\" does not parse back: %s", what, text, err.msg);
    for (int64_t j = 0; j < i; j++)
      CHECK_MSG(!same_point(sp, &seen[j], &p), "%s: points %lld and %lld are both %s", what,
                (long long)j, (long long)i, text);
    seen[i] = p;
  }
  free(seen);
  /* a short buffer: the length it needs, the text cut */
  cm_tune_point_format(sp, &d, text, sizeof text);
  char small[4];
  CHECK(cm_tune_point_format(sp, &d, small, sizeof small) == (int)strlen(text));
  CHECK(strlen(small) == 3);
  /* refused: a value that is no candidate, an unknown knob, a missing one, a repeated one */
  const cm_tune_knob *k0 = &sp->knobs[0];
  snprintf(bad, sizeof bad, "%s=%d", k0->name, k0->values[k0->n_values - 1] + 1);
  CHECK(cm_tune_point_parse(sp, bad, &q, &err) == CM_EINVALID && strstr(err.msg, k0->name));
  snprintf(bad, sizeof bad, "%s,nosuchknob=1", text);
  CHECK(cm_tune_point_parse(sp, bad, &q, &err) == CM_EINVALID && strstr(err.msg, "nosuchknob"));
  snprintf(bad, sizeof bad, "%s,%s=%d", text, k0->name, d.value[0]);
  CHECK(cm_tune_point_parse(sp, bad, &q, &err) == CM_EINVALID && strstr(err.msg, "second"));
  if (sp->n_knobs > 1) {
    snprintf(bad, sizeof bad, "%s=%d", k0->name, d.value[0]);
    CHECK(cm_tune_point_parse(sp, bad, &q, &err) == CM_EINVALID && strstr(err.msg, "missing"));
  }
  snprintf(bad, sizeof bad, "%s=", k0->name);
  CHECK(cm_tune_point_parse(sp, bad, &q, &err) == CM_EINVALID);
  CHECK(cm_tune_point_parse(sp, "garbage", &q, &err) == CM_EINVALID);
  /* a point that is no candidate is refused by apply too, naming the knob (below) */
}

static void test_format_parse(void) {
  cm_target t[3];
  targets(t);
  cm_graph *g = step_graph(true, 8);
  int spaces = 0;
  for (int ti = 0; g && ti < 3; ti++) {
    lowered L = lower_for(g, &t[ti], 0);
    for (int ki = 0; L.ok && ki < L.kp.n_kernels; ki++) {
      cm_kernel *k = &L.kp.kernels[ki];
      for (int si = 0; si < k->n_stages; si++) {
        cm_tune_space sp;
        cm_err err = {0};
        CHECK(cm_tune_space_of(k, si, &t[ti], &sp, &err) == CM_OK);
        char what[96];
        snprintf(what, sizeof what, "%s %s s%d", t[ti].arch, k->name, si);
        check_format_parse(&sp, what, &spaces);
        if (sp.n_knobs == 0) continue;
        cm_tune_point p;
        cm_tune_point_default(&sp, &p);
        p.value[0] = sp.knobs[0].values[sp.knobs[0].n_values - 1] + 1;
        CHECK(cm_tune_apply(k, si, &t[ti], &p, &err) == CM_EINVALID &&
              strstr(err.msg, sp.knobs[0].name) && strstr(err.msg, "candidates"));
      }
    }
    lowered_free(&L);
  }
  CHECK(spaces > 10);
  cm_graph_free(g);
  /* bad arguments are errors, not crashes */
  cm_tune_space sp;
  cm_err err = {0};
  CHECK(cm_tune_space_of(NULL, 0, &t[0], &sp, &err) == CM_EINVALID && sp.n_knobs == 0);
}

/* ---- the structural hash -----------------------------------------------------------------------
 */

static void hash_of(const cm_kernel *k, char out[65]) {
  cm_kernel_structural_hash(k, out);
  CHECK(strlen(out) == 64 && strspn(out, "0123456789abcdef") == 64);
}

static void test_structural_hash(void) {
  cm_target t[3];
  targets(t);
  cm_graph *g1 = step_graph(false, 4), *g2 = step_graph(false, 4);
  if (!g1 || !g2) return;
  lowered A = lower_for(g1, &t[0], 0), B = lower_for(g2, &t[0], 0), C = lower_for(g1, &t[1], 0);
  CHECK(A.ok && B.ok && C.ok && A.kp.n_kernels == B.kp.n_kernels);
  int twins = 0, distinct = 0;
  char h[65], h2[65];
  for (int i = 0; A.ok && B.ok && i < A.kp.n_kernels && i < B.kp.n_kernels; i++) {
    hash_of(&A.kp.kernels[i], h);
    hash_of(&B.kp.kernels[i], h2);
    CHECK_MSG(!strcmp(h, h2), "%s: two builds hash differently", A.kp.kernels[i].name);
    bool twin = false;
    for (int j = 0; j < i; j++) {
      hash_of(&A.kp.kernels[j], h2);
      twin |= !strcmp(h, h2);
    }
    twins += twin, distinct += !twin;
  }
  /* the encoder's blocks give equal kernels of several groups */
  printf("  %d kernels: %d distinct, %d equal to an earlier one\n", A.kp.n_kernels, distinct,
         twins);
  CHECK(twins >= 3);
  CHECK(distinct >= 3);
  /* names, the group, offsets and the plan are left out; dtypes, shapes and expressions are not */
  for (int i = 0; A.ok && i < A.kp.n_kernels; i++) {
    cm_kernel *k = &A.kp.kernels[i];
    hash_of(k, h);
    cm_kernel saved = *k;
    snprintf(k->name, sizeof k->name, "renamed");
    k->group += 17;
    for (int b = 0; b < k->n_buffers; b++) k->buffers[b].offset += 4096, k->buffers[b].node += 3;
    hash_of(k, h2);
    CHECK_MSG(!strcmp(h, h2), "%s: a name, group or offset changed the hash", saved.name);
    for (int b = 0; b < k->n_buffers; b++) k->buffers[b].offset -= 4096, k->buffers[b].node -= 3;
    *k = saved;
    for (int si = 0; si < k->n_stages; si++) {
      cm_tune_space sp;
      cm_err err = {0};
      cm_kstage st = k->stages[si];
      if (cm_tune_space_of(k, si, &t[0], &sp, &err) != CM_OK || sp.n_knobs == 0) continue;
      for (int64_t p = 1; p < sp.n_points; p++) {
        cm_tune_point pt;
        cm_tune_point_at(&sp, p, &pt);
        if (cm_tune_apply(k, si, &t[0], &pt, &err) != CM_OK) continue;
        hash_of(k, h2);
        CHECK_MSG(!strcmp(h, h2), "%s s%d: a tuning point changed the hash", k->name, si);
        break;
      }
      k->stages[si] = st;
    }
    cm_kbuffer b0 = k->buffers[0];
    k->buffers[0].dtype = b0.dtype == CM_F64 ? CM_F32 : CM_F64;
    hash_of(k, h2);
    CHECK_MSG(strcmp(h, h2), "%s: a buffer's dtype did not change the hash", k->name);
    k->buffers[0] = b0;
    cm_kstage *s = &k->stages[0];
    for (int si = 1; si < k->n_stages && s->n_dom == 0; si++) s = &k->stages[si];
    if (s->n_dom == 0) continue;
    s->dom[0]++;
    hash_of(k, h2);
    CHECK_MSG(strcmp(h, h2), "%s: a stage's shape did not change the hash", k->name);
    s->dom[0]--;
    int e = s->stores[0].value;
    cm_kexpr x = s->exprs[e];
    s->exprs[e].dtype = x.dtype == CM_F64 ? CM_F32 : CM_F64;
    hash_of(k, h2);
    CHECK_MSG(strcmp(h, h2), "%s: an expression's dtype did not change the hash", k->name);
    s->exprs[e] = x;
    hash_of(k, h2);
    CHECK(!strcmp(h, h2));
  }
  /* the CUDA lowering of the same step: its CUDA plans are left out, its kernels kept */
  int same = 0;
  for (int i = 0; A.ok && C.ok && i < A.kp.n_kernels && i < C.kp.n_kernels; i++) {
    hash_of(&A.kp.kernels[i], h);
    hash_of(&C.kp.kernels[i], h2);
    same += !strcmp(h, h2);
  }
  CHECK(same > 0);
  lowered_free(&A), lowered_free(&B), lowered_free(&C);
  cm_graph_free(g1), cm_graph_free(g2);
}

/* ---- the cost model ------------------------------------------------------------------------- */

/* Applies to stage si of k the default point with the knobs named in `knobs` ("mr=8,mc=24")
 * changed; false (checked) when refused. */
static bool apply_knobs(cm_kernel *k, int si, const cm_target *t, const char *knobs) {
  cm_tune_space sp;
  cm_err err = {0};
  if (cm_tune_space_of(k, si, t, &sp, &err) != CM_OK) return false;
  cm_tune_point p;
  cm_tune_point_default(&sp, &p);
  for (const char *c = knobs; c && *c; c += strcspn(c, ",") + (c[strcspn(c, ",")] == ',')) {
    size_t len = strcspn(c, "=");
    for (int i = 0; i < sp.n_knobs; i++)
      if (strlen(sp.knobs[i].name) == len && !strncmp(sp.knobs[i].name, c, len))
        p.value[i] = atoi(c + len + 1);
  }
  cm_status st = cm_tune_apply(k, si, t, &p, &err);
  CHECK_MSG(st == CM_OK, "%s s%d: %s: %s", k->name, si, knobs, err.msg);
  return st == CM_OK;
}

/* The cost of stage si of k under apply_knobs' point; -1 when refused. */
static double cost_at(cm_kernel *k, int si, const cm_target *t, const char *knobs) {
  cm_kstage saved = k->stages[si];
  double cost = apply_knobs(k, si, t, knobs) ? cm_tune_model_cost(k, si, t) : -1;
  k->stages[si] = saved;
  return cost;
}

/* The first stage of L with a plan of kind `kind` (CUDA) or a GEMM template (CPU). */
static bool find_stage(lowered *L, const cm_target *t, cm_kcuda_kind kind, int *ki, int *si) {
  for (*ki = 0; L->ok && *ki < L->kp.n_kernels; (*ki)++)
    for (*si = 0; *si < L->kp.kernels[*ki].n_stages; (*si)++) {
      const cm_kstage *s = &L->kp.kernels[*ki].stages[*si];
      if (t->kind == CM_TARGET_CUDA ? s->cuda.kind == kind : s->tmpl == CM_KT_GEMM) return true;
    }
  return false;
}

static void test_model_cost(void) {
  cm_target t[3];
  targets(t);
  /* deterministic: twice the same, the same for a second build, finite */
  cm_graph *g = step_graph(true, 8);
  for (int ti = 0; g && ti < 3; ti++) {
    lowered A = lower_for(g, &t[ti], 0), B = lower_for(g, &t[ti], 0);
    double total = 0;
    for (int ki = 0; A.ok && B.ok && ki < A.kp.n_kernels; ki++)
      for (int si = 0; si < A.kp.kernels[ki].n_stages; si++) {
        double c = cm_tune_model_cost(&A.kp.kernels[ki], si, &t[ti]);
        CHECK(isfinite(c) && c >= 0);
        CHECK(c == cm_tune_model_cost(&A.kp.kernels[ki], si, &t[ti]));
        CHECK(c == cm_tune_model_cost(&B.kp.kernels[ki], si, &t[ti]));
        total += c;
      }
    CHECK(total > 0);
    lowered_free(&A), lowered_free(&B);
  }
  cm_graph_free(g);
  int ki, si;
  /* 512 GEMMs of 33 rows: 128-row blocks pad them to 4x the work, 64-row ones to 2x */
  cm_graph *gb = gemm_graph(512, 33, 64, 64);
  cm_err err = {0};
  CHECK(cm_autocast(&gb, CM_BF16, NULL, &err) == CM_OK);
  lowered L = lower_for(gb, &t[1], 0);
  if (find_stage(&L, &t[1], CM_KCUDA_GEMM, &ki, &si)) {
    cm_kernel *k = &L.kp.kernels[ki];
    CHECK(k->stages[si].cuda.gemm.mma);
    double c64 = cost_at(k, si, &t[1], "warps_m=2,mr=32");
    double c128 = cost_at(k, si, &t[1], "warps_m=4,mr=32");
    printf("  mma GEMM 512x[33x64x64]: cost with 64-row blocks %.4g, with 128-row blocks %.4g\n",
           c64, c128);
    CHECK(c64 > 0 && c128 > c64);
  } else {
    CHECK_MSG(false, "no tensor-core GEMM stage for sm_80");
  }
  lowered_free(&L);
  cm_graph_free(gb);
  /* the CPU: 8-row register blocks on 17 rows (padded to 24) cost more than on 16 */
  double cpu[2] = {0, 0};
  char knobs[64];
  snprintf(knobs, sizeof knobs, "mr=8,nr=%d,mc=24", t[0].vector_lanes);
  for (int m = 0; m < 2; m++) {
    cm_graph *gc = gemm_graph(1, 16 + m, 64, 64);
    lowered Lc = lower_for(gc, &t[0], 0);
    if (find_stage(&Lc, &t[0], CM_KCUDA_NONE, &ki, &si))
      cpu[m] = cost_at(&Lc.kp.kernels[ki], si, &t[0], knobs);
    lowered_free(&Lc);
    cm_graph_free(gc);
  }
  CHECK(cpu[0] > 0 && cpu[1] > cpu[0]);
  /* a memory-bound softmax of 216 rows of 4096 (2 rows an SM): a block of 128 threads a row has
   * half the warps of one of 256 in flight, and is not cheaper */
  cm_graph *gs = cm_graph_new();
  int64_t d[2] = {216, 4096};
  CHECK(cm_graph_add_output(gs, cm_nn_softmax(gs, cm_input(gs, "x", CM_F32, 2, d)), &err) == CM_OK);
  for (int ti = 1; ti < 3; ti++) {
    lowered Ls = lower_for(gs, &t[ti], 0);
    if (find_stage(&Ls, &t[ti], CM_KCUDA_ROWS, &ki, &si)) {
      cm_kernel *k = &Ls.kp.kernels[ki];
      double c128 = cost_at(k, si, &t[ti], "warp=0,threads=128");
      double c256 = cost_at(k, si, &t[ti], "warp=0,threads=256");
      printf("  rows 216x4096 on %s: 128 threads a row %.4g, 256 %.4g\n", t[ti].arch, c128, c256);
      CHECK(c256 > 0 && c128 >= c256);
    } else {
      CHECK_MSG(false, "no rows plan for the softmax on %s", t[ti].arch);
    }
    lowered_free(&Ls);
  }
  cm_graph_free(gs);
  /* a row sum of 5 rows of 300: a thread per row is not cheaper than a warp per row */
  cm_graph *gr = cm_graph_new();
  int64_t dr[2] = {5, 300};
  int axes[1] = {1};
  CHECK(cm_graph_add_output(gr,
                            cm_reduce(gr, CM_OP_REDUCE_SUM, cm_input(gr, "x", CM_F32, 2, dr), 1,
                                      axes, false, "sum"),
                            &err) == CM_OK);
  lowered Lr = lower_for(gr, &t[1], 0);
  if (find_stage(&Lr, &t[1], CM_KCUDA_GENERIC, &ki, &si)) {
    double thread = cost_at(&Lr.kp.kernels[ki], si, &t[1], "red=0,threads=128");
    double warp = cost_at(&Lr.kp.kernels[ki], si, &t[1], "red=1,threads=128");
    printf("  row sum 5x300: a thread per row %.4g, a warp %.4g\n", thread, warp);
    CHECK(warp > 0 && thread > warp);
  } else {
    CHECK_MSG(false, "no generic plan for the row sum");
  }
  lowered_free(&Lr);
  cm_graph_free(gr);
}

/* The K split of stage si as its name and domain show it: S for a split's partial GEMM
 * ("_kpart", dom [S, ...]), else 1. */
static int kpart_split(const cm_kernel *k, int si) {
  const char *name = k->stages[si].name;
  size_t n = strlen(name);
  return n > 6 && !strcmp(name + n - 6, "_kpart") ? (int)k->stages[si].dom[0] : 1;
}

/* The CPU K split as a knob, every candidate through the JIT against the oracle: a GEMM of one
 * block over K 1536 (split 4 as lowered: 1 merges the _kpart and _ksum stages back into one
 * GEMM, 2 re-splits) and one of 4 blocks over K 1024 (not split as lowered: 2 and 4 add the
 * _ksum stage). */
static void test_k_split(void) {
  cm_target t;
  cm_target_host(&t);
  static const int64_t cases[2][4] = {{1, 24, 40, 1536}, {4, 24, 40, 1024}};
  static const int want[2][4] = {{1, 2, 4, 0}, {1, 2, 4, 0}}, as_lowered[2] = {4, 1};
  for (int c = 0; c < 2; c++) {
    cm_graph *g = gemm_graph(cases[c][0], cases[c][1], cases[c][2], cases[c][3]);
    jit_prog P;
    int ki = 0, si = 0;
    if (!jit_prog_open(&P, g, &t, 0) || !find_stage(&P.L, &t, CM_KCUDA_NONE, &ki, &si)) {
      CHECK_MSG(false, "gemm case %d: no GEMM stage", c);
      jit_prog_close(&P);
      cm_graph_free(g);
      continue;
    }
    cm_kernel *k = &P.L.kp.kernels[ki];
    cm_tune_space sp;
    cm_err err = {0};
    CHECK(cm_tune_space_of(k, si, &t, &sp, &err) == CM_OK);
    int kn = -1;
    for (int i = 0; i < sp.n_knobs; i++)
      if (!strcmp(sp.knobs[i].name, "k_split")) kn = i;
    CHECK_MSG(kn >= 0, "gemm case %d: no k_split knob", c);
    if (kn < 0) {
      jit_prog_close(&P);
      cm_graph_free(g);
      continue;
    }
    const cm_tune_knob *knob = &sp.knobs[kn];
    CHECK(knob->values[knob->default_index] == as_lowered[c]);
    CHECK(kpart_split(k, si) == as_lowered[c]);
    CHECK(knob->n_values == 3);
    cm_kernel saved;
    kernel_dup(k, &saved);
    for (int v = 0; v < knob->n_values; v++) {
      CHECK(knob->values[v] == want[c][v]);
      char knobs[32], what[96];
      snprintf(knobs, sizeof knobs, "k_split=%d", knob->values[v]);
      snprintf(what, sizeof what, "gemm case %d %s", c, knobs);
      if (!apply_knobs(k, si, &t, knobs)) continue;
      int split = knob->values[v];
      CHECK(kpart_split(k, si) == split);
      CHECK(k->n_stages == saved.n_stages + (split > 1) - (as_lowered[c] > 1));
      CHECK(k->stages[si].red[0] * split == cases[c][3]);
      if (k->scratch_bytes > P.L.kp.max_scratch_bytes) P.L.kp.max_scratch_bytes = k->scratch_bytes;
      if (jit_kernel(&P, ki)) run_prog(&P, what);
      kernel_restore(k, &saved);
    }
    /* a split the GEMM's K does not allow is refused */
    cm_tune_point p;
    cm_tune_point_default(&sp, &p);
    p.value[kn] = 8;
    CHECK(cm_tune_apply(k, si, &t, &p, &err) == CM_EINVALID);
    CHECK(k->n_stages == saved.n_stages);
    cm_kernel_free(&saved);
    jit_prog_close(&P);
    cm_graph_free(g);
  }
  test_tally_report("tune_space k_split");
}

/* ---- the emulated CUDA device ------------------------------------------------------------- */

/* Kernel k rendered for t, built by the emulated device's compiler (host C++ under the CUDA shim)
 * and each stage launched on bufs. */
static bool emu_run_kernel(const cm_kernel *k, const cm_target *t, char **bufs, const char *what) {
  cm_err err = {0};
  char *src = NULL;
  cm_cubin image;
  memset(&image, 0, sizeof image);
  const cm_cuda_compiler *cc = emu_compiler();
  bool ok = cm_cuda_module_source(k, t, false, &src, &err) == CM_OK &&
            cc->compile(cc->self, src, "tune_space", t->arch, &image, &err) == CM_OK;
  CHECK_MSG(ok, "%s: %s: %s", what, k->name, err.msg);
  free(src);
  emu_image_header h;
  ok = ok && image.size > sizeof h;
  if (ok) memcpy(&h, image.data, sizeof h);
  char path[] = "/tmp/cmaec_tune_space_XXXXXX";
  int fd = ok ? mkstemp(path) : -1;
  ok = fd >= 0 && write(fd, (char *)image.data + sizeof h, h.so_bytes) == (ssize_t)h.so_bytes;
  if (fd >= 0) close(fd);
  void *handle = ok ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  if (fd >= 0) unlink(path);
  void *sym = handle ? dlsym(handle, EMU_MODULE_LAUNCH_SYMBOL) : NULL;
  emu_module_launch_fn launch = NULL;
  if (sym) memcpy(&launch, &sym, sizeof sym);
  CHECK_MSG(launch != NULL, "%s: %s: the module does not load", what, k->name);
  void **args = calloc((size_t)k->n_buffers + 1, sizeof *args);
  for (int b = 0; b < k->n_buffers; b++) args[b] = &bufs[b];
  cm_cuda_render_opts ro = {t, false};
  for (int si = 0; launch && si < k->n_stages; si++) {
    cm_cuda_launch l = cm_cuda_stage_launch(k, si, &ro);
    char fn[32];
    snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, si);
    CHECK_MSG(launch(fn, l.grid, l.block, l.shared_bytes, args) == 0, "%s: %s", what, fn);
  }
  free(args);
  if (handle) dlclose(handle);
  cm_cubin_free(&image);
  return launch != NULL;
}

/* A graph lowered for sm_80 with stage `kind`'s plan changed to `knobs`, run on the emulated
 * device: every output within its bound; the same with the default plan when run_default (the
 * flash spans' defaults run in test_nvrtc_variants). */
static void emu_case(cm_graph *g, cm_kcuda_kind kind, const char *knobs, const char *plan,
                     const char *what, bool run_default) {
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
  jit_prog P;
  int ki, si;
  if (jit_prog_open(&P, g, &t, 0) && find_stage(&P.L, &t, kind, &ki, &si)) {
    char name[160];
    snprintf(name, sizeof name, "%s (default)", what);
    if (run_default) run_prog(&P, name);
    if (apply_knobs(&P.L.kp.kernels[ki], si, &t, knobs)) {
      char *text = print_kernel(&P.L.kp.kernels[ki]);
      CHECK_MSG(strstr(text, plan) != NULL, "%s: the plan is not \"%s\":\n%s", what, plan, text);
      free(text);
      snprintf(name, sizeof name, "%s (%s)", what, knobs);
      run_prog(&P, name);
    }
  } else {
    CHECK_MSG(false, "%s: no stage of the plan kind wanted", what);
  }
  jit_prog_close(&P);
  cm_graph_free(g);
}

static void test_emulated(void) {
  /* an f32 GEMM with an epilogue: the FMA template with other tiles */
  emu_case(gemm_graph(1, 37, 45, 70), CM_KCUDA_GEMM, "mc=32,nc=64,kc=8,mr=16,nr=32",
           "block 32x64 k 8 warp 16x32", "FMA GEMM", true);
  /* softmax rows of 300: a warp per row by default, a block of 128 threads tuned */
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {5, 300};
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, cm_nn_softmax(g, cm_input(g, "x", CM_F32, 2, d)), &err) == CM_OK);
  emu_case(g, CM_KCUDA_ROWS, "warp=0,threads=128", "a block per row", "softmax rows", true);
  /* a row sum of 300 over 5 rows: a block per point by default, a warp per point tuned */
  g = cm_graph_new();
  int axes[1] = {1};
  int sum = cm_reduce(g, CM_OP_REDUCE_SUM, cm_input(g, "x", CM_F32, 2, d), 1, axes, false, "sum");
  CHECK(cm_graph_add_output(g, sum, &err) == CM_OK);
  emu_case(g, CM_KCUDA_GENERIC, "red=1,threads=128",
           "generic: a warp per point; grid 2x1x1 block 128", "row sum", true);
  /* flash attention (70 tokens, head dim 24): forward in blocks of 2 warps and 32 keys, the
   * backward in 8 warps and 32 keys */
  emu_case(flash_graph(70, 24, false), CM_KCUDA_ATTN_FLASH, "warps=2,bc=32", "br 32 bc 32",
           "flash forward", false);
  emu_case(flash_graph(70, 24, true), CM_KCUDA_ATTN_FLASH_BWD, "warps=8,bc=32", "bc 32",
           "flash backward", false);
  test_tally_report("tune_space emulated");
}

/* ---- flash attention's knobs ------------------------------------------------------------- */

/* The NVRTC build of kernel k for t: false (checked) when it fails or a function spills. */
static bool nvrtc_builds(cm_nvrtc *nv, const cm_kernel *k, const cm_target *t, const char *what) {
  cm_cuda_render_opts ro = {t, false};
  char *src = NULL;
  cm_err err = {0};
  cm_cubin cb;
  memset(&cb, 0, sizeof cb);
  cm_status st = cm_render_cuda(k, &ro, true, &src, &err);
  if (st == CM_OK) st = cm_nvrtc_compile(nv, src, k->name, t->arch, NULL, 0, &cb, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  bool ok = st == CM_OK;
  for (int i = 0; ok && i < cb.n_kernels; i++) {
    const cm_cuda_kernel_info *ki = &cb.kernels[i];
    CHECK_MSG(ki->spill_store_bytes == 0 && ki->spill_load_bytes == 0,
              "%s: %s spills %d bytes (%d registers)", what, ki->name, ki->spill_store_bytes,
              ki->registers);
    ok = ki->spill_store_bytes == 0 && ki->spill_load_bytes == 0;
  }
  cm_cubin_free(&cb);
  free(src);
  return ok;
}

/* Every point of the flash spans' spaces at ViT-B's attention (197 tokens, head dim 64) for sm_80
 * and sm_90: the knobs warps and bc, the default among the candidates and reproducing the plan;
 * every other point applies or is refused naming the kernel and a rule; what applies renders
 * and, with nvrtc (the long entry: ~10 s a build) where NVRTC loads, builds without spills. */
static void flash_spaces(bool nvrtc) {
  cm_target t[3];
  targets(t);
  cm_nvrtc *nv = NULL;
  cm_err err = {0};
  if (nvrtc && cm_nvrtc_load(&nv, &err) != CM_OK)
    fprintf(stderr, "  NVRTC absent: rendered only\n");
  cm_graph *gs[2] = {flash_graph(197, 64, false), flash_graph(197, 64, true)};
  for (int ti = 1; ti < 3; ti++) {
    int seen[2] = {0, 0}, applied = 0, refused = 0, built = 0;
    for (int gi = 0; gi < 2; gi++) {
      lowered L = lower_for(gs[gi], &t[ti], 0);
      for (int ki = 0; L.ok && ki < L.kp.n_kernels; ki++) {
        cm_kernel *k = &L.kp.kernels[ki];
        for (int si = 0; si < k->n_stages; si++) {
          cm_kcuda_kind kind = k->stages[si].cuda.kind;
          if (kind != CM_KCUDA_ATTN_FLASH && kind != CM_KCUDA_ATTN_FLASH_BWD) continue;
          bool bwd = kind == CM_KCUDA_ATTN_FLASH_BWD;
          seen[bwd]++;
          cm_tune_space sp;
          CHECK(cm_tune_space_of(k, si, &t[ti], &sp, &err) == CM_OK && sp.n_knobs == 2);
          CHECK(!strcmp(sp.knobs[0].name, "warps") && !strcmp(sp.knobs[1].name, "bc"));
          const cm_kcuda_attn *a = &k->stages[si].cuda.attn;
          CHECK(sp.knobs[0].values[sp.knobs[0].default_index] == a->threads / 32);
          CHECK(sp.knobs[1].values[sp.knobs[1].default_index] == a->bc);
          cm_kstage saved = k->stages[si];
          for (int64_t i = 0; i < sp.n_points; i++) {
            cm_tune_point p;
            char text[64], what[160];
            cm_tune_point_at(&sp, i, &p);
            cm_tune_point_format(&sp, &p, text, sizeof text);
            snprintf(what, sizeof what, "%s s%d %s %s", k->name, si, t[ti].arch, text);
            cm_status st = cm_tune_apply(k, si, &t[ti], &p, &err);
            CHECK_MSG(st == CM_OK || st == CM_EINVALID, "%s: %s", what, err.msg);
            if (st == CM_OK) {
              applied++;
              CHECK(k->stages[si].cuda.attn.threads == 32 * p.value[0]);
              CHECK(k->stages[si].cuda.attn.bc == p.value[1]);
              if (nv)
                built += nvrtc_builds(nv, k, &t[ti], what);
              else
                CHECK(renders(k, &t[ti], what));
            } else {
              refused++;
              CHECK_STR_CONTAINS(err.msg, k->name);
              printf("  %s: refused: %s\n", what, err.msg);
            }
            /* point 0 is the default: the plan as lowered */
            if (i == 0)
              CHECK_MSG(!memcmp(&k->stages[si].cuda, &saved.cuda, sizeof saved.cuda),
                        "%s: the default point changed the plan", what);
            k->stages[si] = saved;
          }
        }
      }
      lowered_free(&L);
    }
    printf("  flash %s: %d forward and %d backward spans, %d points applied (%d built), %d "
           "refused\n",
           t[ti].arch, seen[0], seen[1], applied, built, refused);
    CHECK(seen[0] > 0 && seen[1] > 0);
    CHECK(applied > seen[0] + seen[1] && refused > 0);
    CHECK(!nv || built == applied);
  }
  cm_graph_free(gs[0]);
  cm_graph_free(gs[1]);
  if (nv) cm_nvrtc_unload(nv);
}

static void test_flash_spaces(void) {
  flash_spaces(false);
}

static void test_flash_nvrtc(void) {
  flash_spaces(true);
}

TEST_MAIN({"step_spaces", test_step_spaces}, {"step_spaces_all", test_step_spaces_all},
          {"same_function", test_same_function}, {"same_function_all", test_same_function_all},
          {"format_parse", test_format_parse}, {"structural_hash", test_structural_hash},
          {"model_cost", test_model_cost}, {"emulated", test_emulated},
          {"flash_spaces", test_flash_spaces}, {"flash_nvrtc", test_flash_nvrtc},
          {"k_split", test_k_split})
