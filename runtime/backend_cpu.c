/* runtime/backend_cpu.c — the CPU backend (cm_backend_cpu): a program's
 * kernels rendered with the LLVM renderer, JIT-compiled (one module per kernel,
 * so the object cache is shared across programs that contain the same kernel)
 * and run over one arena with OpenMP splitting each stage's work items.
 * Threads: opts->threads, else $CMAEC_THREADS, else omp_get_max_threads(). */
#include "runtime.h"

#if CMAEC_HAVE_LLVM
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
  int first_check, n_checks; /* its index checks in cpu_state.checks */
} cpu_kernel;

/* A gather/scatter_add index check of a kernel: its STATUS words (codegen.h). */
typedef struct cpu_check {
  int node; /* in rg */
  const int64_t *key, *val;
} cpu_check;

/* A collective stage's run-time facts: the kernel before which its asynchronous all_reduce
 * is waited for (the first later kernel reading its output or writing its input; n_kernels:
 * the end of the run), and its name for the watchdog's message. */
typedef struct cpu_collective {
  int wait_before;
  char what[160];
} cpu_collective;

/* An all_reduce in flight: started by stage `stage` of kernel `kernel`. */
typedef struct cpu_pending {
  cm_comm_request *req;
  int wait_before;
  int kernel, stage;
} cpu_pending;

/* The backend's state (cm_program_impl). */
typedef struct cpu_state {
  cm_comm *comm;         /* NULL: world size 1 (a program without collective stages) */
  cpu_collective *colls; /* per kernel: its collective stage's facts (kernels without one:
                            unused) */
  cpu_pending *pending;  /* per kernel at most one in flight */
  int n_pending;
  cm_jit *jit;
  cpu_kernel *ks;
  char *arena, *scratch, *ws;
  int64_t *status; /* the STATUS words of every kernel */
  cpu_check *checks;
  int n_checks;
  int64_t ws_max, ws_stride;
  void **consts;
  int n_consts;
  int threads, W; /* W: the f32 lanes the renderer is told to use (the target CPU's), so that
                     the work-item and workspace figures below match the rendered GEMM tiles */
  bool profile, gemm, no_templates;
  int opt_level;
  int64_t **items; /* per kernel, per stage: work items */
  cm_kernel_profile *prof;
  char (*keys)[65];        /* per kernel: the content key of its rendered module */
  int *first_of;           /* per kernel: the first kernel with the same key (whose code it runs) */
  cm_stage_profile *sprof; /* per stage, kernels in order */
  int *sprof_first;        /* per kernel: its first stage's entry in sprof */
  int n_sprof;
} cpu_state;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static cm_status resolve_threads(const cm_compile_opts *o, int *out, cm_err *err) {
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

static void cpu_free(cm_program *p) {
  cpu_state *pr = cm_program_impl(p);
  if (!pr) return;
  int nk = cm_program_kernels(p)->n_kernels;
  if (pr->ks) {
    for (int i = 0; i < nk; i++) {
      free(pr->ks[i].fns);
      free(pr->ks[i].bufs);
    }
    free(pr->ks);
  }
  if (pr->items)
    for (int i = 0; i < nk; i++) free(pr->items[i]);
  free(pr->items);
  for (int i = 0; i < pr->n_consts; i++) free(pr->consts[i]);
  free(pr->consts);
  if (pr->jit) cm_jit_destroy(pr->jit);
  free(pr->arena);
  free(pr->scratch);
  free(pr->status);
  free(pr->checks);
  free(pr->ws);
  free(pr->keys);
  free(pr->first_of);
  free(pr->prof);
  free(pr->sprof);
  free(pr->sprof_first);
  free(pr->colls);
  free(pr->pending);
  free(pr);
  cm_program_set_impl(p, NULL);
}

static void *aligned(int64_t bytes) {
  size_t n = (size_t)((bytes + 63) / 64 * 64);
  if (n == 0) n = 64;
  void *p = aligned_alloc(64, n);
  if (p) memset(p, 0, n);
  return p;
}

/* Where each collective stage's all_reduce is waited for, and its watchdog name. */
static cm_status plan_collectives(cpu_state *pr, const cm_kprogram *kp, const cm_graph *g,
                                  cm_err *err) {
  int nk = kp->n_kernels;
  pr->colls = calloc((size_t)nk + 1, sizeof *pr->colls);
  pr->pending = calloc((size_t)nk + 1, sizeof *pr->pending);
  if (!pr->colls || !pr->pending) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &kp->kernels[i];
    for (int s = 0; s < k->n_stages; s++) {
      const cm_kcollective *x = &k->stages[s].coll;
      if (x->op == CM_KCOLL_NONE) continue;
      pr->colls[i].wait_before = cm_kprogram_collective_wait(kp, i, s);
      cm_kcollective_name(k, s, g, pr->colls[i].what, sizeof pr->colls[i].what);
    }
  }
  return CM_OK;
}

static cm_status cpu_compile(cm_program *p, const cm_compile_opts *opts, cm_program_stats *stats,
                             cm_err *err) {
  cpu_state *pr = calloc(1, sizeof *pr);
  if (!pr) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_program_set_impl(p, pr);
  const cm_target *target = cm_program_target(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  pr->profile = opts->profile;
  pr->gemm = !opts->no_templates;
  cm_status st = resolve_threads(opts, &pr->threads, err);
  if (st != CM_OK) return st;
  if (target->kind != CM_TARGET_CPU)
    return cm_errorf(err, CM_EINVALID, "cpu backend: the target is not a CPU (%s)", target->arch);
  if (!target->cpu.runnable && !opts->compile_only)
    return cm_cpu_target_not_runnable(&target->cpu, "cpu backend", err);
  pr->W = target->vector_lanes;
  pr->no_templates = opts->no_templates;
  pr->opt_level = opts->opt_level > 0 ? opts->opt_level : 3;
  stats->threads = pr->threads;
  stats->vector_bits = target->cpu.vector_bits;
  if (opts->render_only && opts->compile_only) return CM_OK; /* cpu_emit renders on demand */
  char cbuf[4096];
  cm_jit_opts jo = {0};
  jo.cache_dir = cm_cache_dir(opts->cache_dir, cbuf, sizeof cbuf);
  jo.opt_level = opts->opt_level > 0 ? opts->opt_level : 3;
  jo.vector_width = pr->W == 16 ? 512 : 0;
  jo.cpu = target->cpu.forced ? target->cpu.cpu : NULL;
  jo.compile_only = opts->compile_only;
  st = cm_jit_create(&pr->jit, &jo, err);
  if (st != CM_OK) return st;
  cm_llvm_render_opts ro = {pr->W, opts->no_templates, target};
  int nk = kp->n_kernels;
  pr->ks = calloc((size_t)nk + 1, sizeof *pr->ks);
  pr->prof = calloc((size_t)nk + 1, sizeof *pr->prof);
  pr->items = calloc((size_t)nk + 1, sizeof *pr->items);
  pr->sprof_first = calloc((size_t)nk + 1, sizeof *pr->sprof_first);
  int n_stages_all = 0;
  for (int i = 0; i < nk; i++) {
    pr->sprof_first[i] = n_stages_all;
    n_stages_all += kp->kernels[i].n_stages;
  }
  pr->sprof = calloc((size_t)n_stages_all + 1, sizeof *pr->sprof);
  pr->n_sprof = n_stages_all;
  if (!pr->ks || !pr->prof || !pr->items || !pr->sprof || !pr->sprof_first) {
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  int64_t ws_max = 0;
  /* Kernels that differ only in their name (a repeated block) render to the same
   * code: each distinct one is compiled once, its functions named after its
   * content, and the repeats share them. */
  char(*keys)[65] = pr->keys = calloc((size_t)nk + 1, sizeof *keys);
  int *first_of = pr->first_of = calloc((size_t)nk + 1, sizeof *first_of);
  if (!keys || !first_of) {
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &kp->kernels[i];
    double t1 = now_ms();
    cm_kernel anon = *k;
    snprintf(anon.name, sizeof anon.name, "kernel");
    LLVMModuleRef m = LLVMModuleCreateWithNameInContext("kernel", cm_jit_context(pr->jit));
    st = cm_render_llvm(&anon, m, &ro, err);
    if (st == CM_OK) cm_jit_module_key(pr->jit, m, keys[i]);
    stats->render_ms += now_ms() - t1;
    if (st != CM_OK) {
      LLVMDisposeModule(m);
      cm_err_prefix(err, "%s: ", k->name);
      return st;
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
    if (st != CM_OK) return st;
    pr->ks[i].n_stages = k->n_stages;
    pr->ks[i].fns = calloc((size_t)k->n_stages + 1, sizeof(cm_cpu_stage_fn));
    pr->ks[i].bufs = calloc((size_t)k->n_buffers + 1, sizeof(char *));
    pr->items[i] = calloc((size_t)k->n_stages + 1, sizeof(int64_t));
    if (!pr->ks[i].fns || !pr->ks[i].bufs || !pr->items[i]) {
      return cm_errorf(err, CM_EINTERNAL, "out of memory");
    }
    double flops = 0;
    for (int s = 0; s < k->n_stages; s++) {
      char sym[96];
      snprintf(sym, sizeof sym, "k%.24s_s%d", keys[first_of[i]], s);
      void *addr = NULL;
      st = cm_jit_lookup(pr->jit, sym, &addr, err);
      if (st != CM_OK) return st;
      memcpy(&pr->ks[i].fns[s], &addr, sizeof addr);
      const cm_kstage *ks = &k->stages[s];
      /* the plan's sizes: the rendered function expects exactly these */
      pr->items[i][s] = cm_kstage_work_items(ks);
      int64_t w = cm_kstage_workspace_bytes(ks, CM_TARGET_CPU);
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
    stats->jit_ms += now_ms() - t1;
    pr->prof[i].name = k->name;
    pr->prof[i].kind = k->kind;
    pr->prof[i].flops = flops;
  }
  for (int i = 0; i < nk; i++) stats->n_distinct_kernels += first_of[i] == i;

  pr->ws_max = ws_max;
  pr->ws_stride = (ws_max + 63) / 64 * 64;
  cm_jit_stats js;
  cm_jit_get_stats(pr->jit, &js);
  stats->cache_hits = js.cache_hits;
  stats->cache_misses = js.cache_misses;
  stats->jit_modules = js.modules;
  stats->object_bytes = js.object_bytes;
  stats->vector_bits = target->cpu.vector_bits;
  stats->runnable = target->cpu.runnable && !opts->compile_only;
  stats->threads = pr->threads;
  pr->comm = opts->comm;
  return plan_collectives(pr, kp, cm_program_graph(p), err);
}

static cm_status cpu_alloc_arena(cm_program *p, cm_program_stats *stats, cm_err *err) {
  cpu_state *pr = cm_program_impl(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  const cm_graph *rg = cm_program_graph(p);
  int nk = kp->n_kernels;
  cm_status st = CM_OK;
  pr->arena = aligned(kp->arena_bytes);
  pr->scratch = aligned(kp->max_scratch_bytes);
  pr->ws = aligned(pr->ws_stride * pr->threads);
  if (!pr->arena || !pr->scratch || !pr->ws) {
    return cm_errorf(err, CM_EINTERNAL, "out of memory (arena %lld bytes)",
                     (long long)kp->arena_bytes);
  }
  int64_t n_status = 0;
  int n_checks = 0;
  for (int i = 0; i < nk; i++)
    for (int b = 0; b < kp->kernels[i].n_buffers; b++)
      if (kp->kernels[i].buffers[b].kind == CM_KBUF_STATUS) {
        n_status += kp->kernels[i].buffers[b].numel;
        n_checks += kp->kernels[i].buffers[b].offset == 0;
      }
  pr->status = calloc((size_t)n_status + 1, sizeof *pr->status);
  pr->checks = calloc((size_t)n_checks + 1, sizeof *pr->checks);
  if (!pr->status || !pr->checks) {
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  n_status = 0;
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &kp->kernels[i];
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
          return cm_errorf(err, CM_EINTERNAL, "out of memory");
        }
        pr->consts = nc;
        void *d = cm_kernel_const_data(rg, kb, err);
        if (!d) {
          st = CM_EINTERNAL;
          if (err && err->status == CM_OK)
            st = cm_errorf(err, CM_EINTERNAL, "kernel %s: const buffer %d has no data", k->name, b);
          else if (err)
            st = err->status;
          return st;
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
        return cm_errorf(err, CM_EINTERNAL, "kernel %s: an index check lacks a status buffer",
                         k->name);
      }
  }
  stats->arena_bytes = kp->arena_bytes;
  stats->scratch_bytes = kp->max_scratch_bytes;
  stats->workspace_bytes = pr->ws_stride * pr->threads;
  return st;
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

/* Waits for the all_reduces in flight that must finish before kernel `before` runs (every one
 * when before is past the last kernel); the first error is kept, the others still waited for. */
static cm_status wait_pending(cpu_state *pr, int before, cm_status st, cm_err *err) {
  int kept = 0;
  for (int q = 0; q < pr->n_pending; q++) {
    if (pr->pending[q].wait_before > before) {
      pr->pending[kept++] = pr->pending[q];
      continue;
    }
    cm_err dropped = {0};
    double t0 = pr->profile ? now_ms() : 0;
    cm_status w = cm_comm_wait(pr->pending[q].req, st == CM_OK ? err : &dropped);
    if (st == CM_OK) st = w;
    if (pr->profile) { /* the time the rank was held up: the part the kernels did not hide */
      double ms = now_ms() - t0;
      pr->sprof[pr->sprof_first[pr->pending[q].kernel] + pr->pending[q].stage].total_ms += ms;
      pr->prof[pr->pending[q].kernel].total_ms += ms;
    }
  }
  pr->n_pending = kept;
  return st;
}

/* Runs collective stage s of kernel i through the comm: an all_reduce is started and left in
 * flight (wait_pending), an all_gather blocks (it runs after the all_reduces in flight). */
static cm_status run_collective(cpu_state *pr, const cm_kernel *k, int i, int stage,
                                char *const *bufs, cm_err *err) {
  const cm_kstage *s = &k->stages[stage];
  const cm_kcollective *x = &s->coll;
  cm_dtype dt = k->buffers[x->in_buf].dtype;
  if (!pr->comm || cm_comm_size(pr->comm) != x->ranks)
    return cm_errorf(err, CM_EINVALID, "cpu backend: kernel %s: %s is built for %d ranks, but %s",
                     k->name, pr->colls[i].what, x->ranks,
                     pr->comm ? "the communicator has another size" : "no communicator was given");
  if (x->op == CM_KCOLL_ALL_GATHER)
    return cm_comm_all_gather(pr->comm, bufs[x->in_buf], bufs[x->out_buf], x->count, dt,
                              pr->colls[i].what, err);
  cpu_pending *q = &pr->pending[pr->n_pending];
  cm_status st = cm_comm_all_reduce_start(pr->comm, bufs[x->in_buf], bufs[x->out_buf], x->count, dt,
                                          x->mode, pr->colls[i].what, &q->req, err);
  if (st != CM_OK) return st;
  q->wait_before = pr->colls[i].wait_before;
  q->kernel = i, q->stage = stage;
  pr->n_pending++;
  return CM_OK;
}

static cm_status cpu_run(cm_program *p, int first, int last, cm_err *err) {
  cpu_state *pr = cm_program_impl(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  int bad = -1; /* the failed index check of the first node in graph order */
  cm_status st = CM_OK;
  for (int i = first; i < last && st == CM_OK; i++) {
    const cm_kernel *k = &kp->kernels[i];
    char **bufs = pr->ks[i].bufs;
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].kind == CM_KBUF_SOURCE) bufs[b] = cm_program_source(p, k->buffers[b].node);
    if (pr->n_pending && (st = wait_pending(pr, i, st, err)) != CM_OK) break;
    double t0 = pr->profile ? now_ms() : 0;
    for (int s = 0; s < k->n_stages && st == CM_OK; s++) {
      double ts = pr->profile ? now_ms() : 0;
      if (k->stages[s].coll.op != CM_KCOLL_NONE)
        st = run_collective(pr, k, i, s, bufs, err);
      else
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
  /* nothing stays in flight past a run (also after an error) */
  if (pr->n_pending) st = wait_pending(pr, INT32_MAX, st, err);
  if (st != CM_OK) return st;
  if (bad >= 0)
    return cm_program_index_error(p, pr->checks[bad].node, pr->checks[bad].val[0],
                                  pr->checks[bad].val[1], err);
  return CM_OK;
}

static const void *cpu_buffer(const cm_program *p, int k, int b) {
  const cpu_state *pr = cm_program_impl(p);
  return pr->ks[k].bufs[b];
}

static int cpu_profile(const cm_program *p, const cm_kernel_profile **out) {
  const cpu_state *pr = cm_program_impl(p);
  *out = pr->profile ? pr->prof : NULL;
  return pr->profile && pr->prof ? cm_program_kernels(p)->n_kernels : 0;
}

static int cpu_stage_profile(const cm_program *p, const cm_stage_profile **out) {
  const cpu_state *pr = cm_program_impl(p);
  *out = pr->profile ? pr->sprof : NULL;
  return pr->profile && pr->sprof ? pr->n_sprof : 0;
}

/* Renders kernel k (k < 0: all of them, in one module "cmaec_kernels") and
 * writes its LLVM IR, optimized IR or assembly (a JIT made for the purpose:
 * the program's own holds the compiled code, not the modules). */
static cm_status cpu_emit(const cm_program *p, int k, cm_emit what, FILE *out, cm_err *err) {
  const cpu_state *pr = cm_program_impl(p);
  const cm_target *target = cm_program_target(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  if (what != CM_EMIT_SOURCE && what != CM_EMIT_OPT_IR && what != CM_EMIT_ASM)
    return cm_errorf(err, CM_EINVALID, "cpu backend: nothing to emit of kind %d", (int)what);
  cm_jit_opts jo = {NULL, pr->opt_level, NULL, NULL, 512, true}; /* $CMAEC_CPU may name any CPU */
  jo.cpu = target->cpu.forced ? target->cpu.cpu : NULL;
  cm_jit *jit = NULL;
  cm_status st = cm_jit_create(&jit, &jo, err);
  if (st != CM_OK) return st;
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("cmaec_kernels", cm_jit_context(jit));
  cm_llvm_render_opts ro = {0, pr->no_templates, target};
  for (int i = k < 0 ? 0 : k; st == CM_OK && i < (k < 0 ? kp->n_kernels : k + 1); i++)
    st = cm_render_llvm(&kp->kernels[i], m, &ro, err);
  char *text = NULL;
  if (st == CM_OK && what == CM_EMIT_SOURCE) {
    char *ir = LLVMPrintModuleToString(m);
    if (fputs(ir, out) < 0) st = cm_errorf(err, CM_EINVALID, "cpu backend: cannot write the IR");
    LLVMDisposeMessage(ir);
  } else if (st == CM_OK) {
    st = cm_jit_render(jit, m, what == CM_EMIT_ASM ? CM_JIT_TEXT_ASM : CM_JIT_TEXT_IR, &text, err);
    if (st == CM_OK && fputs(text, out) < 0)
      st = cm_errorf(err, CM_EINVALID, "cpu backend: cannot write the text");
  }
  free(text);
  LLVMDisposeModule(m);
  cm_jit_destroy(jit);
  return st;
}

const cm_backend cm_backend_cpu = {
    .name = "cpu",
    .compile = cpu_compile,
    .alloc_arena = cpu_alloc_arena,
    .upload = NULL,
    .run = cpu_run,
    .download = NULL,
    .buffer = cpu_buffer,
    .profile = cpu_profile,
    .stage_profile = cpu_stage_profile,
    .emit = cpu_emit,
    .free = cpu_free,
};

bool cm_have_cpu_backend(void) {
  return true;
}

#else /* !CMAEC_HAVE_LLVM */

/* This build has no LLVM: the table exists so that every caller gets the same clean refusal,
 * at compile time, naming the build. */
static cm_status cpu_unavailable(cm_program *pr, const cm_compile_opts *opts,
                                 cm_program_stats *stats, cm_err *err) {
  return cm_errorf(err, CM_EINVALID, "%s", CM_NO_CPU_BACKEND_MESSAGE);
}
static const void *cpu_no_buffer(const cm_program *pr, int k, int b) {
  return NULL;
}
static void cpu_nothing_to_free(cm_program *pr) {}

const cm_backend cm_backend_cpu = {
    .name = "cpu",
    .compile = cpu_unavailable,
    .buffer = cpu_no_buffer,
    .free = cpu_nothing_to_free,
};

bool cm_have_cpu_backend(void) {
  return false;
}

#endif /* CMAEC_HAVE_LLVM */
