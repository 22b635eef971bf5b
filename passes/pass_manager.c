/* passes/pass_manager.c — named passes run as a pipeline, with printing,
 * verification and per-pass statistics between them (as LLVM's -print-after,
 * -verify-each). */
#include "passes.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

const char cm_default_pipeline[] = "simplify,cse,dce,flash_backward,fuse,schedule,memplan";

static const cm_pass_info pass_table[] = {
    /* not in the default pipeline: `-p autocast,simplify,...` asks for it */
    {"autocast", "f32 contractions to bf16 operands, f32 accumulation (mixed precision)",
     cm_pass_autocast},
    {"data_parallel", "average the gradients over the ranks in all_reduce buckets (training step)",
     cm_pass_data_parallel},
    {"simplify", "algebraic identities, constant folding, movement folding, casts of casts",
     cm_pass_simplify},
    {"cse", "merge nodes computing the same value", cm_pass_cse},
    {"dce", "remove nodes that reach no output, assign or interface", cm_pass_dce},
    {"flash_backward", "attention backward recomputes S, E, P from Q, K, m, z; D = rowsum(dO*O)",
     cm_pass_flash_backward},
    {"fuse", "group nodes into kernels by op category", cm_pass_fuse},
    {"schedule", "order the kernels; collectives as early as possible", cm_pass_schedule},
    {"memplan", "pack intermediate buffers into one arena", cm_pass_memplan},
    {NULL, NULL, NULL},
};

const cm_pass_info *cm_passes(void) {
  return pass_table;
}

static const cm_pass_info *find_pass(const char *name, size_t len) {
  for (const cm_pass_info *p = pass_table; p->name; p++)
    if (strlen(p->name) == len && strncmp(p->name, name, len) == 0) return p;
  return NULL;
}

static bool listed(const char *list, const char *name) {
  if (!list) return false;
  size_t n = strlen(name);
  for (const char *p = list; *p;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    if (len == n && strncmp(p, name, n) == 0) return true;
    if (!comma) break;
    p = comma + 1;
  }
  return false;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

cm_status cm_pipeline_run(cm_pass_state *s, const char *pipeline, const cm_pipeline_opts *opts,
                          cm_pass_stat *stats, int max_stats, int *n_stats, cm_err *err) {
  cm_pipeline_opts none = {0};
  if (!opts) opts = &none;
  if (n_stats) *n_stats = 0;
  /* Check every name before running anything. */
  for (const char *p = pipeline; *p;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    if (!find_pass(p, len)) {
      char names[256] = "";
      for (const cm_pass_info *q = pass_table; q->name; q++)
        snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", names[0] ? ", " : "",
                 q->name);
      return cm_errorf(err, CM_EINVALID, "pipeline: unknown pass \"%.*s\" (passes: %s)", (int)len,
                       p, names);
    }
    if (!comma) break;
    p = comma + 1;
  }
  for (const char *p = pipeline; *p;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    const cm_pass_info *pass = find_pass(p, len);
    cm_pass_stat stat = {pass->name, 0, s->g->n_nodes, 0, ""};
    double t0 = now_ms();
    cm_status st = pass->run(s, &stat, err);
    stat.ms = now_ms() - t0;
    stat.nodes_after = s->g->n_nodes;
    if (st) return cm_err_prefix(err, "%s: ", pass->name);
    if (opts->verify_each) {
      st = cm_graph_verify(s->g, err);
      if (!st && s->plan) st = cm_plan_verify(s->g, s->plan, err);
      if (st) return cm_err_prefix(err, "after %s: ", pass->name);
    }
    if (opts->print_after_all || listed(opts->print_after, pass->name)) {
      FILE *out = opts->print_out ? opts->print_out : stderr;
      fprintf(out, "# ---- after %s ----\n", pass->name);
      if ((st = cm_graph_print(s->g, out, err))) return st;
      if (s->plan) cm_plan_print(s->g, s->plan, out);
    }
    if (stats && n_stats && *n_stats < max_stats) stats[(*n_stats)++] = stat;
    if (!comma) break;
    p = comma + 1;
  }
  return CM_OK;
}
