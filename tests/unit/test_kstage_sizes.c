/* cm_kstage_work_items and cm_kstage_workspace_bytes are exactly what the CPU
 * executor sizes its launches and per-thread workspaces by: on every stage of
 * the lowered training step of the fmnist variants (ViT and ConvViT; GEMMs,
 * K-split GEMMs, attention spans, generic stages), with templates and without,
 * they equal the formulas the executor used before it called them
 * (runtime/cpu_exec.c's work_items and ws_bytes, frozen here as the
 * expectation: the rendered functions' contract has not changed). */
#include "../test.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "passes/passes.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* runtime/cpu_exec.c (tiles_of, work_items, ws_bytes), verbatim but for names */
static cm_kgemm_tiles exec_tiles(const cm_kstage *s, int W) {
  cm_kgemm_tiles t = s->tiles;
  if (t.mr <= 0 || t.nr <= 0 || t.mc <= 0 || t.nc <= 0 || t.kc <= 0) t = cm_cpu_gemm_defaults(W);
  return t;
}
static int64_t exec_work_items(const cm_kstage *s, bool gemm, int W) {
  if (gemm && cm_llvm_stage_is_gemm(s) && s->n_dom >= 2) {
    cm_kgemm_tiles t = exec_tiles(s, W);
    int64_t n = 1;
    for (int d = 0; d < s->n_dom - 2; d++) n *= s->dom[d];
    return n * ((s->dom[s->n_dom - 2] + t.mc - 1) / t.mc) *
           ((s->dom[s->n_dom - 1] + t.nc - 1) / t.nc);
  }
  int64_t n = 1;
  for (int d = 0; d < s->n_parallel && d < s->n_dom; d++) n *= s->dom[d];
  return n;
}
static int64_t exec_ws_bytes(const cm_kstage *s, bool gemm, int W) {
  int64_t b = cm_kstage_workspace_bytes(s, CM_TARGET_CPU);
  if (gemm && cm_llvm_stage_is_gemm(s)) {
    cm_kgemm_tiles t = exec_tiles(s, W);
    int64_t mine = 4 * ((int64_t)t.kc * t.nc + (int64_t)t.mc * t.kc + (int64_t)t.mc * t.nc);
    if (mine > b) b = mine;
  }
  return b;
}

typedef struct counts {
  int stages, gemm, ksplit, attn;
} counts;

static void check_variant(const char *path, bool templates, counts *n) {
  cm_err err = {0};
  cm_graph *step = test_build_step(path, NULL, 0, 2, NULL, NULL, NULL);
  if (!step) return;
  cm_pass_state s = {cm_graph_clone(step), NULL};
  cm_graph_free(step);
  CHECK_MSG(cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK, "%s: %s",
            path, err.msg);
  cm_target tgt;
  cm_target_host(&tgt);
  cm_lower_opts lo = {&tgt, !templates, 0};
  cm_kprogram kp;
  CHECK_MSG(cm_lower_plan(s.g, s.plan, &lo, &kp, &err) == CM_OK, "%s: %s", path, err.msg);
  for (int i = 0; i < kp.n_kernels; i++)
    for (int j = 0; j < kp.kernels[i].n_stages; j++) {
      const cm_kstage *st = &kp.kernels[i].stages[j];
      int64_t items = exec_work_items(st, templates, tgt.vector_lanes);
      int64_t ws = exec_ws_bytes(st, templates, tgt.vector_lanes);
      CHECK_MSG(cm_kstage_work_items(st) == items,
                "%s kernel %s stage %s: work items %lld, want %lld", path, kp.kernels[i].name,
                st->name, (long long)cm_kstage_work_items(st), (long long)items);
      CHECK_MSG(cm_kstage_workspace_bytes(st, CM_TARGET_CPU) == ws,
                "%s kernel %s stage %s: workspace %lld, want %lld", path, kp.kernels[i].name,
                st->name, (long long)cm_kstage_workspace_bytes(st, CM_TARGET_CPU), (long long)ws);
      /* the printer shows the plan */
      if (st->tmpl != CM_KT_NONE && templates) {
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);
        cm_kernel_print(&kp.kernels[i], f);
        fclose(f);
        char want[96];
        snprintf(want, sizeof want, "  cpu work items %lld workspace %lld\n", (long long)items,
                 (long long)ws);
        CHECK_STR_CONTAINS(text, want);
        if (strstr(st->name, "_kpart")) CHECK_STR_CONTAINS(text, " ksplit ");
        if (st->tmpl == CM_KT_ATTENTION_FWD && !st->attn.stream)
          CHECK_STR_CONTAINS(text, "stage tiles (");
        free(text);
      }
      n->stages++;
      n->gemm += cm_llvm_stage_is_gemm(st);
      n->ksplit += strstr(st->name, "_kpart") != NULL;
      n->attn += st->tmpl == CM_KT_ATTENTION_FWD || st->tmpl == CM_KT_ATTENTION_BWD;
    }
  cm_kprogram_free(&kp);
  cm_graph_free(s.g);
  cm_plan_free(s.plan);
}

static void test_templates(void) {
  counts n = {0};
  check_variant("models/cmae_vit_tiny_fmnist.json", true, &n);
  check_variant("models/cmae_convvit_tiny_fmnist.json", true, &n);
  /* the comparison covered every kind of stage */
  CHECK(n.stages > 100 && n.gemm > 10 && n.attn > 0);
  fprintf(stderr, "%d stages, %d GEMM, %d K-split, %d attention spans\n", n.stages, n.gemm,
          n.ksplit, n.attn);
}

static void test_no_templates(void) {
  counts n = {0};
  check_variant("models/cmae_vit_tiny_fmnist.json", false, &n);
  CHECK(n.stages > 100 && n.attn == 0);
}

TEST_MAIN({"templates", test_templates}, {"no_templates", test_no_templates})
