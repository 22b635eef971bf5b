/* runtime/cpu_exec.c — the CPU executor: a plan's kernels lowered, rendered
 * with the LLVM renderer, JIT-compiled (one module per kernel, so the object
 * cache is shared across programs that contain the same kernel) and run over
 * one arena with OpenMP splitting each stage's work items. */
#include "runtime.h"

#include <llvm-c/Core.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct cpu_kernel {
  int n_stages;
  cm_cpu_stage_fn *fns;
  char **bufs;               /* per buffer; SOURCE entries bound at run time */
  int first_check, n_checks; /* its index checks in cm_cpu_program.checks */
} cpu_kernel;

/* A gather/scatter_add index check of a kernel: its STATUS words (codegen.h). */
typedef struct cpu_check {
  int node; /* in rg */
  const int64_t *key, *val;
} cpu_check;

struct cm_cpu_program {
  const cm_graph *g; /* as passed to build */
  cm_graph *own_g;   /* the optimized copy (NULL when built from a plan) */
  const cm_graph *rg;
  cm_plan *own_plan;
  cm_kprogram kp;
  cm_jit *jit;
  cpu_kernel *ks;
  char *arena, *scratch, *ws;
  int64_t *status; /* the STATUS words of every kernel */
  cpu_check *checks;
  int n_checks;
  int64_t ws_stride;
  void **consts;
  int n_consts;
  int *out_id;    /* per output of g: its node in rg */
  int *orig_of;   /* per node of rg: the node of g with the same name (sources), or -1 */
  char **src_ptr; /* per node of rg: bound source data during a run */
  int threads, W; /* W: the f32 lanes the renderer is told to use (the target CPU's), so that
                     the work-item and workspace figures below match the rendered GEMM tiles */
  bool profile, gemm;
  cm_target target; /* the host, or $CMAEC_CPU's CPU; run refuses one the host cannot run */
  int64_t **items;  /* per kernel, per stage: work items */
  cm_cpu_stats stats;
  cm_kernel_profile *prof;
  char (*keys)[65];        /* per kernel: the content key of its rendered module */
  int *first_of;           /* per kernel: the first kernel with the same key (whose code it runs) */
  cm_stage_profile *sprof; /* per stage, kernels in order */
  int *sprof_first;        /* per kernel: its first stage's entry in sprof */
  int n_sprof;
};

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static cm_kgemm_tiles tiles_of(const cm_kstage *s, int W) {
  cm_kgemm_tiles t = s->tiles;
  if (t.mr <= 0 || t.nr <= 0 || t.mc <= 0 || t.nc <= 0 || t.kc <= 0) t = cm_cpu_gemm_defaults(W);
  return t;
}

/* Work items per the renderer's contract (codegen.h): computed here because
 * cm_kstage_work_items may still be a stub in kernel.c. */
static int64_t work_items(const cm_kstage *s, bool gemm, int W) {
  if (gemm && cm_llvm_stage_is_gemm(s) && s->n_dom >= 2) {
    cm_kgemm_tiles t = tiles_of(s, W);
    int64_t n = 1;
    for (int d = 0; d < s->n_dom - 2; d++) n *= s->dom[d];
    return n * ((s->dom[s->n_dom - 2] + t.mc - 1) / t.mc) *
           ((s->dom[s->n_dom - 1] + t.nc - 1) / t.nc);
  }
  int64_t n = 1;
  for (int d = 0; d < s->n_parallel && d < s->n_dom; d++) n *= s->dom[d];
  return n;
}

static int64_t ws_bytes(const cm_kstage *s, bool gemm, int W) {
  int64_t b = cm_kstage_workspace_bytes(s, CM_TARGET_CPU);
  if (gemm && cm_llvm_stage_is_gemm(s)) {
    cm_kgemm_tiles t = tiles_of(s, W);
    int64_t mine = 4 * ((int64_t)t.kc * t.nc + (int64_t)t.mc * t.kc + (int64_t)t.mc * t.nc);
    if (mine > b) b = mine;
  }
  return b;
}

static bool is_source(const cm_node *n) {
  return n->op == CM_OP_INPUT || n->op == CM_OP_PARAM || n->op == CM_OP_STATE;
}

static cm_status resolve_threads(const cm_cpu_opts *o, int *out, cm_err *err) {
  if (o && o->threads > 0) {
    *out = o->threads;
    return CM_OK;
  }
  const char *e = getenv("CMAEC_THREADS");
  if (e && *e) {
    char *end;
    long v = strtol(e, &end, 10);
    if (*end || v < 1 || v > 4096)
      return cm_errorf(err, CM_EINVALID, "CMAEC_THREADS=\"%s\": expected a positive integer", e);
    *out = (int)v;
    return CM_OK;
  }
#ifdef _OPENMP
  *out = omp_get_max_threads();
#else
  *out = 1;
#endif
  return CM_OK;
}

static const char *cache_dir_of(const cm_cpu_opts *o, char *buf, size_t size) {
  if (o && o->cache_dir) return *o->cache_dir ? o->cache_dir : NULL;
  const char *e = getenv("CMAEC_CACHE_DIR");
  if (e) return *e ? e : NULL;
  const char *x = getenv("XDG_CACHE_HOME");
  if (x && *x) {
    snprintf(buf, size, "%s/cmaec", x);
    return buf;
  }
  const char *h = getenv("HOME");
  if (!h || !*h) return NULL;
  snprintf(buf, size, "%s/.cache/cmaec", h);
  return buf;
}

void cm_cpu_program_free(cm_cpu_program *pr) {
  if (!pr) return;
  if (pr->ks) {
    for (int i = 0; i < pr->kp.n_kernels; i++) {
      free(pr->ks[i].fns);
      free(pr->ks[i].bufs);
    }
    free(pr->ks);
  }
  if (pr->items)
    for (int i = 0; i < pr->kp.n_kernels; i++) free(pr->items[i]);
  free(pr->items);
  for (int i = 0; i < pr->n_consts; i++) free(pr->consts[i]);
  free(pr->consts);
  cm_kprogram_free(&pr->kp);
  if (pr->jit) cm_jit_destroy(pr->jit);
  free(pr->arena);
  free(pr->scratch);
  free(pr->status);
  free(pr->checks);
  free(pr->ws);
  free(pr->orig_of);
  free(pr->out_id);
  free(pr->keys);
  free(pr->first_of);
  free(pr->src_ptr);
  free(pr->prof);
  free(pr->sprof);
  free(pr->sprof_first);
  cm_plan_free(pr->own_plan);
  cm_graph_free(pr->own_g);
  free(pr);
}

static void *aligned(int64_t bytes) {
  size_t n = (size_t)((bytes + 63) / 64 * 64);
  if (n == 0) n = 64;
  void *p = aligned_alloc(64, n);
  if (p) memset(p, 0, n);
  return p;
}

static cm_status build(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                       bool compile_only, cm_cpu_program **out, cm_err *err) {
  *out = NULL;
  cm_cpu_opts defaults = {0};
  if (!opts) opts = &defaults;
  cm_cpu_program *pr = calloc(1, sizeof *pr);
  if (!pr) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  pr->g = g;
  pr->profile = opts->profile;
  pr->gemm = !opts->no_templates;
  cm_status st = resolve_threads(opts, &pr->threads, err);
  if (st != CM_OK) goto fail;
  if ((st = cm_target_cpu(NULL, NULL, &pr->target, err)) != CM_OK) goto fail;
  if (!pr->target.cpu.runnable && !compile_only) {
    st = cm_cpu_target_not_runnable(&pr->target.cpu, "cpu backend", err);
    goto fail;
  }
  pr->W = pr->target.vector_lanes;
  const cm_plan *p = plan;
  if (!plan) {
    cm_pass_state s = {cm_graph_clone(g), NULL};
    if (!s.g) {
      st = cm_errorf(err, CM_EINTERNAL, "out of memory");
      goto fail;
    }
    st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, err);
    pr->own_g = s.g;
    pr->own_plan = s.plan;
    if (st != CM_OK) goto fail;
    if (!s.plan) {
      st = cm_errorf(err, CM_EINTERNAL, "cm_cpu_program_build: the pipeline made no plan");
      goto fail;
    }
    p = s.plan;
    pr->rg = s.g;
  } else {
    pr->rg = g;
  }
  const cm_graph *rg = pr->rg;
  pr->orig_of = malloc(sizeof(int) * (size_t)(rg->n_nodes + 1));
  pr->src_ptr = calloc((size_t)rg->n_nodes + 1, sizeof(char *));
  if (!pr->orig_of || !pr->src_ptr) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto fail;
  }
  /* sources by name; builder-named ones ("%6") may be renumbered by the passes,
   * then the k-th source of rg is the k-th source of g (when none was dropped) */
  int n_src_g = 0, n_src_rg = 0, k_src = 0;
  for (int i = 0; i < g->n_nodes; i++) n_src_g += is_source(&g->nodes[i]);
  bool by_position = false;
  for (int i = 0; i < rg->n_nodes; i++)
    if (is_source(&rg->nodes[i])) {
      n_src_rg++;
      by_position |= rg->nodes[i].name[0] == '%';
    }
  by_position = by_position && rg != g && n_src_g == n_src_rg;
  for (int i = 0; i < rg->n_nodes; i++) {
    pr->orig_of[i] = -1;
    if (!is_source(&rg->nodes[i])) continue;
    int o = rg == g ? i : by_position ? -1 : cm_graph_find(g, rg->nodes[i].name);
    if (o >= 0 && (g->nodes[o].op != rg->nodes[i].op ||
                   !cm_type_equal(&g->nodes[o].type, &rg->nodes[i].type)))
      o = -1;
    if (o < 0 && n_src_g == n_src_rg) {
      for (int q = 0, seen = 0; q < g->n_nodes; q++)
        if (is_source(&g->nodes[q]) && seen++ == k_src) o = q;
    }
    k_src++;
    if (o < 0) {
      st = cm_errorf(err, CM_EINTERNAL, "source \"%s\" of the optimized graph not in the graph",
                     rg->nodes[i].name);
      goto fail;
    }
    pr->orig_of[i] = o;
  }
  pr->out_id = calloc((size_t)g->n_outputs + 1, sizeof(int));
  if (!pr->out_id) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto fail;
  }
  for (int j = 0; j < g->n_outputs; j++) {
    /* builder-named outputs ("%12") may be renamed by the passes: match by position then */
    const char *name = g->nodes[g->outputs[j]].name;
    int id = rg == g ? g->outputs[j] : cm_graph_find(rg, name);
    if (rg != g && (id < 0 || name[0] == '%') && rg->n_outputs == g->n_outputs) id = rg->outputs[j];
    if (id < 0) {
      st = cm_errorf(err, CM_EINTERNAL, "output \"%s\" lost by the pipeline",
                     g->nodes[g->outputs[j]].name);
      goto fail;
    }
    pr->out_id[j] = id;
  }

  double t0 = now_ms();
  cm_lower_opts lo = {&pr->target, opts->no_templates, opts->attn_bc};
  st = cm_lower_plan(rg, p, &lo, &pr->kp, err);
  if (st != CM_OK) goto fail;
  pr->stats.lower_ms = now_ms() - t0;

  char cbuf[4096];
  cm_jit_opts jo = {0};
  jo.cache_dir = cache_dir_of(opts, cbuf, sizeof cbuf);
  jo.opt_level = opts->opt_level > 0 ? opts->opt_level : 3;
  jo.vector_width = pr->W == 16 ? 512 : 0;
  jo.cpu = pr->target.cpu.forced ? pr->target.cpu.cpu : NULL;
  jo.compile_only = compile_only;
  st = cm_jit_create(&pr->jit, &jo, err);
  if (st != CM_OK) goto fail;
  cm_llvm_render_opts ro = {pr->W, opts->no_templates, &pr->target};
  int nk = pr->kp.n_kernels;
  pr->ks = calloc((size_t)nk + 1, sizeof *pr->ks);
  pr->prof = calloc((size_t)nk + 1, sizeof *pr->prof);
  pr->items = calloc((size_t)nk + 1, sizeof *pr->items);
  pr->sprof_first = calloc((size_t)nk + 1, sizeof *pr->sprof_first);
  int n_stages_all = 0;
  for (int i = 0; i < nk; i++) {
    pr->sprof_first[i] = n_stages_all;
    n_stages_all += pr->kp.kernels[i].n_stages;
  }
  pr->sprof = calloc((size_t)n_stages_all + 1, sizeof *pr->sprof);
  pr->n_sprof = n_stages_all;
  if (!pr->ks || !pr->prof || !pr->items || !pr->sprof || !pr->sprof_first) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto fail;
  }
  int64_t ws_max = 0;
  /* Kernels that differ only in their name (a repeated block) render to the same
   * code: each distinct one is compiled once, its functions named after its
   * content, and the repeats share them. */
  char(*keys)[65] = pr->keys = calloc((size_t)nk + 1, sizeof *keys);
  int *first_of = pr->first_of = calloc((size_t)nk + 1, sizeof *first_of);
  if (!keys || !first_of) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto fail;
  }
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    double t1 = now_ms();
    cm_kernel anon = *k;
    snprintf(anon.name, sizeof anon.name, "kernel");
    LLVMModuleRef m = LLVMModuleCreateWithNameInContext("kernel", cm_jit_context(pr->jit));
    st = cm_render_llvm(&anon, m, &ro, err);
    if (st == CM_OK) cm_jit_module_key(pr->jit, m, keys[i]);
    pr->stats.render_ms += now_ms() - t1;
    if (st != CM_OK) {
      LLVMDisposeModule(m);
      cm_err_prefix(err, "%s: ", k->name);
      goto fail;
    }
    first_of[i] = i;
    for (int q = 0; q < i; q++)
      if (first_of[q] == q && strcmp(keys[q], keys[i]) == 0) {
        first_of[i] = q;
        break;
      }
    t1 = now_ms();
    if (first_of[i] == i) {
      for (int s = 0; s < k->n_stages; s++) {
        char from[32], to[48];
        snprintf(from, sizeof from, "kernel_s%d", s);
        snprintf(to, sizeof to, "k%.24s_s%d", keys[i], s);
        LLVMValueRef fn = LLVMGetNamedFunction(m, from);
        if (fn) LLVMSetValueName2(fn, to, strlen(to));
      }
      char mid[32];
      snprintf(mid, sizeof mid, "k%.24s", keys[i]);
      LLVMSetModuleIdentifier(m, mid, strlen(mid));
      st = cm_jit_add_module(pr->jit, m, err);
    } else {
      LLVMDisposeModule(m);
    }
    if (st != CM_OK) goto fail;
    pr->ks[i].n_stages = k->n_stages;
    pr->ks[i].fns = calloc((size_t)k->n_stages + 1, sizeof(cm_cpu_stage_fn));
    pr->ks[i].bufs = calloc((size_t)k->n_buffers + 1, sizeof(char *));
    pr->items[i] = calloc((size_t)k->n_stages + 1, sizeof(int64_t));
    if (!pr->ks[i].fns || !pr->ks[i].bufs || !pr->items[i]) {
      st = cm_errorf(err, CM_EINTERNAL, "out of memory");
      goto fail;
    }
    double flops = 0;
    for (int s = 0; s < k->n_stages; s++) {
      char sym[96];
      snprintf(sym, sizeof sym, "k%.24s_s%d", keys[first_of[i]], s);
      void *addr = NULL;
      st = cm_jit_lookup(pr->jit, sym, &addr, err);
      if (st != CM_OK) goto fail;
      memcpy(&pr->ks[i].fns[s], &addr, sizeof addr);
      const cm_kstage *ks = &k->stages[s];
      pr->items[i][s] = work_items(ks, pr->gemm, pr->W);
      int64_t w = ws_bytes(ks, pr->gemm, pr->W);
      if (w > ws_max) ws_max = w;
      cm_stage_profile *sp = &pr->sprof[pr->sprof_first[i] + s];
      sp->kernel = k->name;
      sp->stage = ks;
      sp->kernel_index = i;
      sp->stage_index = s;
      sp->work_items = pr->items[i][s];
      /* flops: 2 per multiply-add of a reduction whose body is a product (matmul, conv,
       * and their fused prologues); elementwise work is not counted */
      if (ks->n_red > 0 && ks->body >= 0 && ks->exprs[ks->body].kind == CM_KX_OP &&
          ks->exprs[ks->body].op == CM_OP_MUL) {
        double f = 2;
        for (int d = 0; d < ks->n_dom; d++) f *= (double)ks->dom[d];
        for (int d = 0; d < ks->n_red; d++) f *= (double)ks->red[d];
        flops += f;
        sp->flops = f;
      }
    }
    pr->stats.jit_ms += now_ms() - t1;
    pr->prof[i].name = k->name;
    pr->prof[i].kind = k->kind;
    pr->prof[i].flops = flops;
    pr->stats.n_stages += k->n_stages;
  }
  pr->stats.n_kernels = nk;
  for (int i = 0; i < nk; i++) pr->stats.n_distinct_kernels += first_of[i] == i;

  pr->arena = aligned(pr->kp.arena_bytes);
  pr->scratch = aligned(pr->kp.max_scratch_bytes);
  pr->ws_stride = (ws_max + 63) / 64 * 64;
  pr->ws = aligned(pr->ws_stride * pr->threads);
  if (!pr->arena || !pr->scratch || !pr->ws) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory (arena %lld bytes)",
                   (long long)pr->kp.arena_bytes);
    goto fail;
  }
  int64_t n_status = 0;
  int n_checks = 0;
  for (int i = 0; i < nk; i++)
    for (int b = 0; b < pr->kp.kernels[i].n_buffers; b++)
      if (pr->kp.kernels[i].buffers[b].kind == CM_KBUF_STATUS) {
        n_status += pr->kp.kernels[i].buffers[b].numel;
        n_checks += pr->kp.kernels[i].buffers[b].offset == 0;
      }
  pr->status = calloc((size_t)n_status + 1, sizeof *pr->status);
  pr->checks = calloc((size_t)n_checks + 1, sizeof *pr->checks);
  if (!pr->status || !pr->checks) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto fail;
  }
  n_status = 0;
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    pr->ks[i].first_check = pr->n_checks;
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      switch (kb->kind) {
      case CM_KBUF_STATUS: {
        int64_t *w = pr->status + n_status;
        n_status += kb->numel;
        pr->ks[i].bufs[b] = (char *)w;
        int c = pr->ks[i].first_check;
        while (c < pr->n_checks && pr->checks[c].node != kb->node) c++;
        if (c == pr->n_checks) pr->checks[pr->n_checks++].node = kb->node;
        if (kb->offset == 0)
          pr->checks[c].key = w;
        else
          pr->checks[c].val = w;
        break;
      }
      case CM_KBUF_ARENA: pr->ks[i].bufs[b] = pr->arena + kb->offset; break;
      case CM_KBUF_SCRATCH: pr->ks[i].bufs[b] = pr->scratch + kb->offset; break;
      case CM_KBUF_SOURCE: break;
      case CM_KBUF_CONST: {
        void **nc = realloc(pr->consts, sizeof(void *) * (size_t)(pr->n_consts + 1));
        if (!nc) {
          st = cm_errorf(err, CM_EINTERNAL, "out of memory");
          goto fail;
        }
        pr->consts = nc;
        void *d = cm_kernel_const_data(rg, kb, err);
        if (!d) {
          st = CM_EINTERNAL;
          if (err && err->status == CM_OK)
            st = cm_errorf(err, CM_EINTERNAL, "kernel %s: const buffer %d has no data", k->name, b);
          else if (err)
            st = err->status;
          goto fail;
        }
        pr->consts[pr->n_consts++] = d;
        pr->ks[i].bufs[b] = d;
        break;
      }
      }
    }
    pr->ks[i].n_checks = pr->n_checks - pr->ks[i].first_check;
    for (int c = pr->ks[i].first_check; c < pr->n_checks; c++)
      if (!pr->checks[c].key || !pr->checks[c].val) {
        st = cm_errorf(err, CM_EINTERNAL, "kernel %s: an index check lacks a status buffer",
                       k->name);
        goto fail;
      }
  }
  cm_jit_stats js;
  cm_jit_get_stats(pr->jit, &js);
  pr->stats.cache_hits = js.cache_hits;
  pr->stats.cache_misses = js.cache_misses;
  pr->stats.jit_modules = js.modules;
  pr->stats.object_bytes = js.object_bytes;
  pr->stats.vector_bits = pr->target.cpu.vector_bits;
  pr->stats.runnable = pr->target.cpu.runnable;
  pr->stats.arena_bytes = pr->kp.arena_bytes;
  pr->stats.scratch_bytes = pr->kp.max_scratch_bytes;
  pr->stats.workspace_bytes = pr->ws_stride * pr->threads;
  pr->stats.threads = pr->threads;
  *out = pr;
  return CM_OK;
fail:
  cm_cpu_program_free(pr);
  return st;
}

cm_status cm_cpu_program_build(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                               cm_cpu_program **out, cm_err *err) {
  return build(g, plan, opts, false, out, err);
}

cm_status cm_cpu_program_compile(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                                 cm_cpu_program **out, cm_err *err) {
  return build(g, plan, opts, true, out, err);
}

const cm_graph *cm_cpu_program_graph(const cm_cpu_program *pr) {
  return pr->rg;
}

/* The OpenMP-outlined loop body does not inherit run_stage's attributes, so the
 * call into JIT'd code (which carries no -fsanitize=function signature word: the
 * check reads the 8 bytes before the entry, possibly an unmapped page) goes
 * through this function. */
CM_NO_SANITIZE_FUNCTION __attribute__((noinline)) static void
call_stage(cm_cpu_stage_fn fn, char *const *bufs, int64_t b, int64_t e, char *ws) {
  fn(bufs, b, e, ws);
}

CM_NO_SANITIZE_FUNCTION static void run_stage(cm_cpu_stage_fn fn, char *const *bufs,
                                              const cm_kstage *s, int64_t n, char *ws,
                                              int64_t ws_stride, int threads) {
  if (n < 2 || s->accumulate || threads < 2) {
    fn(bufs, 0, n, ws);
    return;
  }
  int chunks = n < threads ? (int)n : threads;
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int c = 0; c < chunks; c++) {
    int64_t b = n * c / chunks, e = n * (c + 1) / chunks;
    call_stage(fn, bufs, b, e, ws + ws_stride * c);
  }
}

const void *cm_cpu_program_output(const cm_cpu_program *pr, int j) {
  if (j < 0 || j >= pr->g->n_outputs) return NULL;
  return cm_cpu_program_value(pr, pr->out_id[j]);
}

const void *cm_cpu_program_value(const cm_cpu_program *pr, int id) {
  if (id < 0 || id >= pr->rg->n_nodes) return NULL;
  const cm_node *n = &pr->rg->nodes[id];
  if (is_source(n)) return pr->src_ptr[id];
  if (n->op == CM_OP_ASSIGN) return pr->src_ptr[n->inputs[0]];
  /* the arena buffer of the kernel that writes it */
  for (int i = 0; i < pr->kp.n_kernels; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].node == id && k->buffers[b].kind == CM_KBUF_ARENA && k->buffers[b].written)
        return pr->arena + k->buffers[b].offset;
  }
  return NULL;
}

/* The oracle's error (cm_index_error) for a failed check, naming the node of
 * the graph given to build when the optimized graph kept it (by name). */
static cm_status index_error(const cm_cpu_program *pr, const cpu_check *c, cm_err *err) {
  const cm_graph *rg = pr->rg, *g = pr->g;
  const cm_node *n = &rg->nodes[c->node];
  const cm_type *data = &rg->nodes[n->inputs[0]].type;
  int axis = n->attrs.axis < 0 ? n->attrs.axis + data->rank : n->attrs.axis;
  int id = cm_graph_find(g, n->name);
  if (id >= 0 &&
      (g->nodes[id].op != n->op || g->nodes[id].n_inputs != n->n_inputs ||
       !cm_type_equal(&g->nodes[g->nodes[id].inputs[1]].type, &rg->nodes[n->inputs[1]].type)))
    id = -1;
  return cm_index_error(err, id >= 0 ? g : rg, id >= 0 ? id : c->node, c->val[0], c->val[1],
                        data->dims[axis]);
}

/* Points the program at every source it reads, checking each is given with its node's type. */
static cm_status bind_sources(cm_cpu_program *pr, cm_tensor *const *sources, cm_err *err) {
  const cm_graph *rg = pr->rg, *g = pr->g;
  for (int i = 0; i < rg->n_nodes; i++) {
    int o = pr->orig_of[i];
    if (o < 0) continue;
    const cm_node *n = &g->nodes[o];
    const cm_tensor *t = sources ? sources[o] : NULL;
    if (!t || !t->data)
      return cm_errorf(err, CM_EINVALID, "source \"%s\" (%s): not given", n->name,
                       cm_op_get_info(n->op)->name);
    if (!cm_type_equal(&t->type, &n->type)) {
      char a[96], b[96];
      return cm_errorf(err, CM_EINVALID, "source \"%s\": given %s, expected %s", n->name,
                       cm_type_str(&t->type, a, sizeof a), cm_type_str(&n->type, b, sizeof b));
    }
    pr->src_ptr[i] = t->data;
  }
  return CM_OK;
}

cm_status cm_cpu_program_run(cm_cpu_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                             cm_err *err) {
  if (!pr->target.cpu.runnable)
    return cm_cpu_target_not_runnable(&pr->target.cpu, "cpu backend", err);
  const cm_graph *rg = pr->rg, *g = pr->g;
  cm_status bound = bind_sources(pr, sources, err);
  if (bound != CM_OK) return bound;
  int bad = -1; /* the failed index check of the first node in graph order */
  for (int i = 0; i < pr->kp.n_kernels; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    char **bufs = pr->ks[i].bufs;
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].kind == CM_KBUF_SOURCE) bufs[b] = pr->src_ptr[k->buffers[b].node];
    double t0 = pr->profile ? now_ms() : 0;
    for (int s = 0; s < k->n_stages; s++) {
      double ts = pr->profile ? now_ms() : 0;
      run_stage(pr->ks[i].fns[s], bufs, &k->stages[s], pr->items[i][s], pr->ws, pr->ws_stride,
                pr->threads);
      if (pr->profile) {
        cm_stage_profile *sp = &pr->sprof[pr->sprof_first[i] + s];
        sp->total_ms += now_ms() - ts;
        sp->runs++;
      }
    }
    if (pr->profile) {
      pr->prof[i].total_ms += now_ms() - t0;
      pr->prof[i].runs++;
    }
    /* indices were clamped where used: the run goes on, memory safe, so that the
     * error names the first node in graph order, as the oracle's does */
    for (int c = pr->ks[i].first_check; c < pr->ks[i].first_check + pr->ks[i].n_checks; c++)
      if (*pr->checks[c].key != 0 && (bad < 0 || pr->checks[c].node < pr->checks[bad].node))
        bad = c;
  }
  if (bad >= 0) return index_error(pr, &pr->checks[bad], err);
  if (!outputs) return CM_OK;
  for (int j = 0; j < g->n_outputs; j++) memset(&outputs[j], 0, sizeof outputs[j]);
  for (int j = 0; j < g->n_outputs; j++) {
    const cm_node *on = &g->nodes[g->outputs[j]];
    const cm_node *n = &rg->nodes[pr->out_id[j]];
    const char *src = cm_cpu_program_output(pr, j);
    void *tmp = NULL;
    if (!src && n->op == CM_OP_CONST && n->attrs.data) {
      cm_kbuffer kb = {
          CM_KBUF_CONST, n->type.dtype, cm_type_numel(&n->type), pr->out_id[j], 0, 1, 0};
      tmp = cm_kernel_const_data(rg, &kb, err);
      src = tmp;
    }
    cm_status st = cm_tensor_alloc(&outputs[j], on->type, err);
    if (st == CM_OK && !src && n->op == CM_OP_CONST && !n->attrs.data) {
      for (int64_t e = 0; e < cm_type_numel(&on->type); e++)
        cm_tensor_set_f64(&outputs[j], e, n->attrs.value);
    } else if (st == CM_OK && !src) {
      st = cm_errorf(err, CM_EINTERNAL, "output \"%s\": no buffer holds its value", on->name);
    } else if (st == CM_OK) {
      memcpy(outputs[j].data, src, cm_type_nbytes(&on->type));
    }
    free(tmp);
    if (st != CM_OK) {
      for (int q = 0; q <= j; q++) cm_tensor_free(&outputs[q]);
      return st;
    }
  }
  return CM_OK;
}

void cm_cpu_program_stats(const cm_cpu_program *pr, cm_cpu_stats *out) {
  *out = pr->stats;
}

int cm_cpu_program_profile(const cm_cpu_program *pr, const cm_kernel_profile **out) {
  *out = pr->profile ? pr->prof : NULL;
  return pr->profile ? pr->kp.n_kernels : 0;
}

int cm_cpu_program_stage_profile(const cm_cpu_program *pr, const cm_stage_profile **out) {
  *out = pr->profile ? pr->sprof : NULL;
  return pr->profile ? pr->n_sprof : 0;
}

/* ---- diagnosis: the first non-finite value of a run ------------------------ */

/* The first non-finite element of n values of dtype at p, or -1 (-1 too for a
 * non-float dtype). */
static int64_t first_nonfinite_elem(cm_dtype dtype, const void *p, int64_t n, double *value) {
  if (!p || !cm_dtype_is_float(dtype)) return -1;
  cm_tensor view = {{dtype, 1, {n}}, (void *)p};
  for (int64_t e = 0; e < n; e++) {
    double v = cm_tensor_get_f64(&view, e);
    if (!isfinite(v)) {
      *value = v;
      return e;
    }
  }
  return -1;
}

static void describe(const cm_graph *g, int id, const char *kernel, int64_t index, double value,
                     cm_nonfinite *out) {
  const cm_node *n = &g->nodes[id];
  out->found = true;
  snprintf(out->tensor, sizeof out->tensor, "%s", n->name);
  out->op = cm_op_get_info(n->op)->name;
  snprintf(out->kernel, sizeof out->kernel, "%s", kernel);
  size_t used = 0;
  out->inputs[0] = '\0';
  for (int k = 0; k < n->n_inputs && used + 8 < sizeof out->inputs; k++)
    used += (size_t)snprintf(out->inputs + used, sizeof out->inputs - used, "%s%s", k ? ", " : "",
                             g->nodes[n->inputs[k]].name);
  out->index = index;
  out->value = value;
}

cm_status cm_cpu_program_first_nonfinite(cm_cpu_program *pr, cm_tensor *const *sources,
                                         cm_nonfinite *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  out->index = -1;
  const cm_graph *rg = pr->rg, *g = pr->g;
  /* the sources, in graph order */
  cm_status bound = bind_sources(pr, sources, err);
  if (bound != CM_OK) return bound;
  for (int i = 0; i < rg->n_nodes; i++) {
    if (pr->orig_of[i] < 0) continue;
    double v;
    int64_t e = first_nonfinite_elem(rg->nodes[i].type.dtype, pr->src_ptr[i],
                                     cm_type_numel(&rg->nodes[i].type), &v);
    if (e >= 0) {
      describe(g, pr->orig_of[i], "", e, v, out);
      return CM_OK;
    }
  }
  /* then each kernel's outputs as it runs: within a kernel, the earliest node wins */
  for (int i = 0; i < pr->kp.n_kernels; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    char **bufs = pr->ks[i].bufs;
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].kind == CM_KBUF_SOURCE) bufs[b] = pr->src_ptr[k->buffers[b].node];
    for (int s = 0; s < k->n_stages; s++)
      run_stage(pr->ks[i].fns[s], bufs, &k->stages[s], pr->items[i][s], pr->ws, pr->ws_stride,
                pr->threads);
    int best = -1;
    int64_t best_e = -1;
    double best_v = 0;
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      if (!kb->written || (kb->kind != CM_KBUF_ARENA && kb->kind != CM_KBUF_SOURCE)) continue;
      /* a written source is a state's new value: named by the assign that writes it */
      int producer = kb->node;
      for (int q = 0; kb->kind == CM_KBUF_SOURCE && q < rg->n_nodes; q++)
        if (rg->nodes[q].op == CM_OP_ASSIGN && rg->nodes[q].inputs[0] == kb->node) producer = q;
      if (producer < 0 || (best >= 0 && producer >= best)) continue;
      double v;
      int64_t e = first_nonfinite_elem(kb->dtype, bufs[b], kb->numel, &v);
      if (e >= 0) {
        best = producer;
        best_e = e;
        best_v = v;
      }
    }
    if (best >= 0) {
      describe(rg, best, k->name, best_e, best_v, out);
      return CM_OK;
    }
  }
  return CM_OK;
}
