/* The autotuner's spaces (codegen/tune_space.c) over the default variant's training step (shrunk:
 * tests/model_step.h), f32 and bf16 (autocast), lowered for the host CPU, sm_80 and sm_90:
 *   - the default point reproduces the lowered plan exactly (cm_kernel_print and every stage's
 *     cm_kcuda_plan_print byte for byte), and every point of every space applies or is refused
 *     with CM_EINVALID; CUDA kernels render (cm_render_cuda) under every applied point;
 *   - applied points compute the same function: small GEMM and attention graphs (forward and
 *     backward) run through the LLVM JIT under a sample of each space's points (every point with
 *     --long) and each output lies within its forward error bound (cm_eval_bounded);
 *   - points format and parse back, and parsing refuses what is not in the space;
 *   - the structural hash: equal for two layers' equal kernels and across two builds, blind to
 *     names, group numbers, offsets and the plan, and changed by a dtype, a shape or an
 *     expression;
 *   - the cost model: deterministic, and more for a tile that pads twice the work or a rows plan
 *     with half the warps in a memory-bound stage. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../llvm_kernels.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "runtime/runtime.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {0x7e57ull};
__attribute__((unused)) static double uniform(void) {
  return test_uniform(&rng);
}

/* ---- graphs, plans, kernels -------------------------------------------------------------- */

typedef struct lowered {
  cm_graph *g;
  cm_plan *plan;
  cm_kprogram kp;
  bool ok;
} lowered;

static lowered lower_for(const cm_graph *g0, const cm_target *t) {
  lowered L;
  memset(&L, 0, sizeof L);
  cm_err err = {0};
  cm_pass_state s = {cm_graph_clone(g0), NULL};
  cm_status st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
  CHECK_MSG(st == CM_OK, "pipeline: %s", err.msg);
  L.g = s.g, L.plan = s.plan;
  if (st != CM_OK) return L;
  cm_lower_opts lo = {t, false, 0};
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

/* The default variant's training step, shrunk; bf16: autocast. NULL on failure. */
static cm_graph *step_graph(bool bf16) {
  cm_model_config cfg;
  cm_err err = {0};
  if (cm_model_config_load("models/cmae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, &cfg,
                           &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    return NULL;
  }
  cm_model_build_opts bo = {2, 1, CM_F32};
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

typedef struct sweep {
  int64_t spaces, points, applied, refused, rendered;
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

static void sweep_stage(cm_kernel *k, int si, const cm_target *t, sweep *sw, int64_t stride) {
  cm_tune_space sp;
  cm_err err = {0};
  CHECK_MSG(cm_tune_space_of(k, si, t, &sp, &err) == CM_OK, "%s s%d: %s", k->name, si, err.msg);
  if (sp.n_knobs == 0) return;
  sw->spaces++;
  char *before = print_kernel(k);
  cm_tune_point p;
  cm_tune_point_default(&sp, &p);
  cm_kstage saved = k->stages[si];
  cm_status st = cm_tune_apply(k, si, t, &p, &err);
  CHECK_MSG(st == CM_OK, "%s s%d on %s: the default refused: %s", k->name, si, t->arch, err.msg);
  char *after = print_kernel(k);
  CHECK_MSG(!strcmp(before, after), "%s s%d on %s: the default point changed the plan:\n%s\n%s",
            k->name, si, t->arch, before, after);
  free(after);
  for (int64_t i = 0; i < sp.n_points; i += stride) {
    cm_tune_point_at(&sp, i, &p);
    st = cm_tune_apply(k, si, t, &p, &err);
    sw->points++;
    CHECK_MSG(st == CM_OK || st == CM_EINVALID, "%s s%d point %lld: status %d: %s", k->name, si,
              (long long)i, (int)st, err.msg);
    if (st == CM_OK) {
      sw->applied++;
      if (t->kind == CM_TARGET_CUDA && (sw->applied % 7 == 0 || i == 0))
        sw->rendered += renders(k, t, k->name);
    } else {
      sw->refused++;
      CHECK_MSG(strstr(err.msg, k->name) != NULL, "the refusal names the kernel: %s", err.msg);
    }
    k->stages[si] = saved;
  }
  char *restored = print_kernel(k);
  CHECK_MSG(!strcmp(before, restored), "%s s%d: the sweep left the kernel changed", k->name, si);
  free(restored);
  free(before);
}

static void step_spaces(int64_t stride) {
  cm_target t[3];
  targets(t);
  for (int bf16 = 0; bf16 < 2; bf16++) {
    cm_graph *g = step_graph(bf16);
    if (!g) continue;
    for (int ti = 0; ti < 3; ti++) {
      lowered L = lower_for(g, &t[ti]);
      sweep sw = {0};
      for (int ki = 0; L.ok && ki < L.kp.n_kernels; ki++)
        for (int si = 0; si < L.kp.kernels[ki].n_stages; si++)
          sweep_stage(&L.kp.kernels[ki], si, &t[ti], &sw, stride);
      printf("  %s %s: %lld spaces, %lld points: %lld applied, %lld refused, %lld rendered\n",
             bf16 ? "bf16" : "f32", t[ti].arch, (long long)sw.spaces, (long long)sw.points,
             (long long)sw.applied, (long long)sw.refused, (long long)sw.rendered);
      CHECK(sw.spaces > 0);
      CHECK(sw.applied > sw.spaces); /* more than the defaults apply */
      CHECK(sw.refused > 0);         /* and the pruning refuses some */
      lowered_free(&L);
    }
    cm_graph_free(g);
  }
}

static void test_step_spaces(void) {
  step_spaces(getenv("CMAEC_TEST_QUICK") ? 11 : 3);
}
static void test_step_spaces_all(void) {
  step_spaces(1);
}

TEST_MAIN({"step_spaces", test_step_spaces}, {"step_spaces_all", test_step_spaces_all})
