/* The backend table is the whole interface between cm_compile and a backend:
 * a backend written here, in the test, from the kernel-IR interpreter
 * (cm_kernel_interpret) and nothing else, is plugged into cm_compile through
 * cm_compile_opts.backend and runs random small graphs within the oracle's
 * error bounds (cm_eval_bounded). And the CUDA backend (compile only): CUBIN
 * for sm_80 and sm_90 with ptxas's report per kernel; without compile_only it
 * needs the CUDA driver (absent here: the error names it). */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "runtime/runtime.h"

#include <stdint.h>
#include <stdlib.h>

/* ---- a backend in one table: the kernel-IR interpreter ------------------- */

typedef struct interp {
  char *arena, *scratch;
  void ***bufs; /* per kernel, per buffer (SOURCE entries bound at run time) */
  void **owned; /* constants and status words */
  int n_owned;
} interp;

static int interp_calls[4]; /* compile, alloc_arena, run, free */

static cm_status interp_compile(cm_program *pr, const cm_compile_opts *opts,
                                cm_program_stats *stats, cm_err *err) {
  (void)opts;
  interp_calls[0]++;
  const cm_kprogram *kp = cm_program_kernels(pr);
  interp *s = calloc(1, sizeof *s);
  if (!s) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_program_set_impl(pr, s);
  s->bufs = calloc((size_t)kp->n_kernels + 1, sizeof *s->bufs);
  if (!s->bufs) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  stats->n_distinct_kernels = kp->n_kernels; /* "compiled": nothing to do */
  stats->threads = 1;
  stats->runnable = true;
  return CM_OK;
}

static void *own(interp *s, void *p) {
  void **o = realloc(s->owned, sizeof *o * (size_t)(s->n_owned + 1));
  if (!o || !p) return free(p), NULL;
  s->owned = o;
  return s->owned[s->n_owned++] = p;
}

static cm_status interp_alloc_arena(cm_program *pr, cm_program_stats *stats, cm_err *err) {
  interp_calls[1]++;
  interp *s = cm_program_impl(pr);
  const cm_kprogram *kp = cm_program_kernels(pr);
  s->arena = calloc(1, (size_t)kp->arena_bytes + 64);
  s->scratch = calloc(1, (size_t)kp->max_scratch_bytes + 64);
  if (!s->arena || !s->scratch) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    if (!(s->bufs[i] = calloc((size_t)k->n_buffers + 1, sizeof(void *))))
      return cm_errorf(err, CM_EINTERNAL, "out of memory");
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      void *p = NULL;
      switch (kb->kind) {
      case CM_KBUF_ARENA: p = s->arena + kb->offset; break;
      case CM_KBUF_SCRATCH: p = s->scratch + kb->offset; break;
      case CM_KBUF_SOURCE: continue;
      case CM_KBUF_STATUS: p = own(s, calloc((size_t)kb->numel + 1, sizeof(int64_t))); break;
      case CM_KBUF_CONST: p = own(s, cm_kernel_const_data(cm_program_graph(pr), kb, err)); break;
      }
      if (!p) return cm_errorf(err, CM_EINTERNAL, "kernel %s buffer %d: no memory", k->name, b);
      s->bufs[i][b] = p;
    }
  }
  stats->arena_bytes = kp->arena_bytes;
  stats->scratch_bytes = kp->max_scratch_bytes;
  return CM_OK;
}

static cm_status interp_run(cm_program *pr, int first, int last, cm_err *err) {
  interp_calls[2]++;
  interp *s = cm_program_impl(pr);
  const cm_kprogram *kp = cm_program_kernels(pr);
  for (int i = first; i < last; i++) {
    const cm_kernel *k = &kp->kernels[i];
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].kind == CM_KBUF_SOURCE)
        s->bufs[i][b] = cm_program_source(pr, k->buffers[b].node);
    cm_status st = cm_kernel_interpret(k, s->bufs[i], err);
    if (st != CM_OK) return st;
  }
  return CM_OK;
}

static const void *interp_buffer(const cm_program *pr, int k, int b) {
  const interp *s = cm_program_impl(pr);
  return s->bufs[k][b];
}

static void interp_free(cm_program *pr) {
  interp_calls[3]++;
  interp *s = cm_program_impl(pr);
  if (!s) return;
  int nk = cm_program_kernels(pr)->n_kernels;
  for (int i = 0; s->bufs && i < nk; i++) free(s->bufs[i]);
  for (int i = 0; i < s->n_owned; i++) free(s->owned[i]);
  free(s->owned), free(s->bufs), free(s->arena), free(s->scratch), free(s);
}

static const cm_backend interp_backend = {
    .name = "interp",
    .compile = interp_compile,
    .alloc_arena = interp_alloc_arena,
    .run = interp_run,
    .buffer = interp_buffer,
    .free = interp_free,
};

/* ---- random small graphs ------------------------------------------------- */

static test_rng rng = {7};
static double uniform(void) {
  return test_uniform(&rng);
}
static int64_t pick(int64_t lo, int64_t hi) {
  return test_int(&rng, lo, hi);
}

static cm_graph *random_graph(uint64_t seed, cm_tensor *t, const cm_tensor **src, int max_nodes) {
  rng.s = seed;
  cm_graph *g = cm_graph_new();
  int blocks = (int)pick(1, 3);
  for (int b = 0; b < blocks; b++) test_random_block(&rng, g); /* testlib.h's blocks */
  CHECK_MSG(!cm_graph_error(g) && g->n_nodes <= max_nodes, "seed %llu: %s",
            (unsigned long long)seed, cm_graph_error(g) ? cm_graph_error(g) : "too many nodes");
  for (int i = 0; i < g->n_nodes && i < max_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&t[i], n->type, NULL) == CM_OK);
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++)
      cm_tensor_set_f64(&t[i], e, uniform() * 2 - 1);
    src[i] = &t[i];
  }
  return g;
}

enum { MAX_NODES = 64 };

/* Every output and every assigned state of 200 random graphs, run by the
 * interpreter backend, lies within its bound of the f64 oracle; each graph's
 * program went through the table: compile, alloc_arena, run and free once. */
static void test_table_backend_agrees_with_oracle(void) {
  int graphs = 0, values = 0;
  double worst = 0;
  for (uint64_t seed = 1; seed <= 200; seed++) {
    cm_tensor t[MAX_NODES] = {0}, st[MAX_NODES] = {0};
    const cm_tensor *src[MAX_NODES] = {0};
    cm_tensor *bound[MAX_NODES] = {0};
    cm_graph *g = random_graph(seed, t, src, MAX_NODES);
    cm_err err = {0};
    cm_tensor v[MAX_NODES] = {0}, bnd[MAX_NODES] = {0};
    CHECK_MSG(cm_eval_bounded(g, src, v, bnd, &err) == CM_OK, "seed %llu: %s",
              (unsigned long long)seed, err.msg);
    for (int i = 0; i < g->n_nodes; i++)
      if (src[i]) {
        cm_tensor_copy(&st[i], src[i], NULL);
        bound[i] = &st[i];
      }
    int before[4];
    memcpy(before, interp_calls, sizeof before);
    cm_compile_opts o = {.backend = &interp_backend};
    cm_program *pr = NULL;
    cm_tensor out[MAX_NODES] = {0};
    cm_status s = cm_compile(g, NULL, &o, &pr, &err);
    CHECK_MSG(s == CM_OK, "seed %llu: compile: %s", (unsigned long long)seed, err.msg);
    if (s == CM_OK) {
      CHECK(cm_program_backend(pr) == &interp_backend);
      s = cm_program_run(pr, bound, out, &err);
      CHECK_MSG(s == CM_OK, "seed %llu: run: %s", (unsigned long long)seed, err.msg);
    }
    for (int j = 0; s == CM_OK && j < g->n_outputs + g->n_nodes; j++) {
      int node;
      const cm_tensor *got;
      if (j < g->n_outputs) {
        node = g->outputs[j], got = &out[j];
      } else {
        node = j - g->n_outputs;
        if (g->nodes[node].op != CM_OP_ASSIGN) continue;
        got = &st[g->nodes[node].inputs[0]];
      }
      test_bounded r = test_check_bounded(got, &v[node], &bnd[node]);
      CHECK_MSG(r.ratio <= 1, "seed %llu: \"%s\": |interp - f64| = %g at [%lld] exceeds %g",
                (unsigned long long)seed, g->nodes[node].name, r.diff, (long long)r.at, r.bound);
      worst = r.ratio > worst ? r.ratio : worst;
      values++;
    }
    cm_program_free(pr);
    CHECK_MSG(interp_calls[0] == before[0] + 1 && interp_calls[1] == before[1] + 1 &&
                  interp_calls[2] == before[2] + 1 && interp_calls[3] == before[3] + 1,
              "seed %llu: the table was not called once per entry", (unsigned long long)seed);
    graphs += s == CM_OK;
    for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&out[j]);
    for (int i = 0; i < g->n_nodes; i++)
      cm_tensor_free(&t[i]), cm_tensor_free(&st[i]), cm_tensor_free(&v[i]), cm_tensor_free(&bnd[i]);
    cm_graph_free(g);
  }
  fprintf(stderr,
          "  interpreter backend: %d graphs, %d values, worst |interp - f64| / bound %.3g\n",
          graphs, values, worst);
  CHECK(graphs == 200 && values >= 200);
}

/* A non-finite value is found through the table too (run one kernel at a
 * time, buffers read back through buffer). */
static void test_table_backend_nonfinite(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {4};
  int x = cm_input(g, "x", CM_F32, 1, d);
  int y = cm_unary(g, CM_OP_LOG, x, "y");
  cm_graph_add_output(g, y, NULL);
  cm_graph_add_output(g, cm_unary(g, CM_OP_TANH, y, "z"), NULL);
  cm_tensor t = {0};
  CHECK(cm_tensor_alloc(&t, g->nodes[x].type, NULL) == CM_OK);
  for (int e = 0; e < 4; e++) cm_tensor_set_f64(&t, e, e == 2 ? -1.0 : 1.0 + e);
  cm_tensor *src[MAX_NODES] = {0};
  src[x] = &t;
  cm_compile_opts o = {.backend = &interp_backend};
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_OK, "%s", err.msg);
  cm_nonfinite nf;
  if (pr) CHECK_MSG(cm_program_first_nonfinite(pr, src, &nf, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(pr && nf.found && nf.index == 2 && !strcmp(nf.op, "log"), "found %d at %lld (%s)",
            pr && nf.found, pr ? (long long)nf.index : -1LL, pr && nf.op ? nf.op : "-");
  cm_program_free(pr);
  cm_tensor_free(&t);
  cm_graph_free(g);
}

/* ---- the CUDA backend: compile only -------------------------------------- */

static void test_cuda_compile_only(void) {
  cm_tensor t[MAX_NODES] = {0};
  const cm_tensor *src[MAX_NODES] = {0};
  cm_graph *g = random_graph(8, t, src, MAX_NODES); /* 4 kernels */
  cm_nvrtc *nv = NULL;
  cm_err err = {0};
  bool have_nvrtc = cm_nvrtc_load(&nv, &err) == CM_OK;
  cm_nvrtc_unload(nv);
  static const char *const archs[] = {"sm_80", "sm_90"};
  for (int a = 0; a < 2; a++) {
    cm_target tgt;
    CHECK(cm_target_cuda(archs[a], &tgt, &err) == CM_OK);
    /* without compile_only the program needs the CUDA driver, which this machine lacks
     * (where one is installed the run goes on: the check says which) */
    cm_program *pr = NULL;
    const cm_cuda_driver *drv = NULL;
    cm_err derr = {0};
    memset(&err, 0, sizeof err);
    if (cm_cuda_driver_load(&drv, &derr) != CM_OK) {
      CHECK(cm_compile(g, &tgt, NULL, &pr, &err) == CM_EINVALID && !pr);
      CHECK_MSG(strstr(err.msg, "cuda backend") && strstr(err.msg, "CUDA driver"), "%s", err.msg);
      CHECK_STR_CONTAINS(err.msg, derr.msg);
    } else {
      fprintf(stderr, "  %s: a CUDA driver is installed: the missing-driver error not checked\n",
              archs[a]);
    }
    cm_compile_opts o = {.compile_only = true};
    memset(&err, 0, sizeof err);
    cm_status s = cm_compile(g, &tgt, &o, &pr, &err);
    if (!have_nvrtc) { /* the CUBIN needs NVRTC: its absence is the error */
      CHECK_MSG(s == CM_EINVALID && strstr(err.msg, "NVRTC"), "%s", err.msg);
      fprintf(stderr, "  %s: NVRTC absent: %s\n", archs[a], err.msg);
      o.render_only = true;
      s = cm_compile(g, &tgt, &o, &pr, &err);
    }
    CHECK_MSG(s == CM_OK && pr, "%s: %s", archs[a], err.msg);
    if (!pr) continue;
    CHECK(cm_program_backend(pr) == &cm_backend_cuda);
    const cm_kprogram *kp = cm_program_kernels(pr);
    char *text = NULL;
    size_t size = 0;
    FILE *mem = open_memstream(&text, &size);
    CHECK(mem && cm_program_emit(pr, -1, CM_EMIT_SOURCE, mem, &err) == CM_OK);
    if (mem) fclose(mem);
    int entries = 0, stages = 0;
    for (const char *q = text; q && (q = strstr(q, "extern \"C\" __global__")); q++) entries++;
    for (int i = 0; i < kp->n_kernels; i++) stages += kp->kernels[i].n_stages;
    CHECK_MSG(kp->n_kernels >= 2 && entries == stages, "%s: %d entries for %d stages", archs[a],
              entries, stages);
    free(text);
    const cm_cuda_build *cb = cm_program_cuda_build(pr);
    if (have_nvrtc) {
      int functions = 0;
      int64_t bytes = 0;
      for (int m = 0; cb && m < cb->n_modules; m++) {
        const cm_cubin *img = &cb->modules[m].image;
        CHECK_MSG(img->size > 64 && !memcmp(img->data, "\177ELF", 4), "%s: module %d: %zu bytes",
                  archs[a], m, img->size);
        functions += img->n_kernels;
        bytes += (int64_t)img->size;
      }
      for (int i = 0; cb && i < kp->n_kernels; i++) {
        const cm_cubin *img = &cb->modules[cb->module_of[i]].image;
        CHECK_MSG(img->n_kernels == kp->kernels[i].n_stages,
                  "%s: kernel %s: %d functions for %d stages", archs[a], kp->kernels[i].name,
                  img->n_kernels, kp->kernels[i].n_stages);
        char fn[160];
        snprintf(fn, sizeof fn, "%s_s0", CM_CUDA_MODULE_KERNEL);
        const cm_cuda_kernel_info *ki = cm_cubin_kernel(img, fn);
        CHECK_MSG(ki && ki->registers > 0, "%s: no ptxas report for %s", archs[a],
                  kp->kernels[i].name);
      }
      CHECK_MSG(cb && cb->n_modules >= 1 && cb->n_modules <= kp->n_kernels,
                "%s: %d modules for %d kernels", archs[a], cb ? cb->n_modules : -1, kp->n_kernels);
      cm_program_stats ps;
      cm_program_stats_get(pr, &ps);
      CHECK(cb && ps.object_bytes == bytes && !ps.runnable);
      fprintf(stderr, "  %s: %d kernels, %d modules, %d functions, %lld bytes of CUBIN\n", archs[a],
              kp->n_kernels, cb ? cb->n_modules : 0, functions, (long long)bytes);
    } else {
      CHECK(cb == NULL);
    }
    /* running: the program says it was compiled only; the table says why */
    cm_tensor *bound[MAX_NODES] = {0};
    for (int i = 0; i < g->n_nodes; i++) bound[i] = (cm_tensor *)src[i];
    memset(&err, 0, sizeof err);
    CHECK(cm_program_run(pr, bound, NULL, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "compile_only");
    memset(&err, 0, sizeof err);
    CHECK(cm_backend_cuda.run(pr, 0, kp->n_kernels, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "no device memory (compiled only");
    cm_program_free(pr);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t[i]);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_table_backend_agrees_with_oracle), TEST(test_table_backend_nonfinite),
          TEST(test_cuda_compile_only))
