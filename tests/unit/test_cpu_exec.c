/* The CPU executor against the oracle (cm_eval) on the same random sources:
 * random graphs (elementwise, movement, reductions, batched/transposed matmul,
 * conv incl. depthwise, stride and padding, state updates), 1 vs 2 threads,
 * every shipped model's training step, argument errors and the object cache. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../model_step.h"
#include "models/models.h"
#include "runtime/runtime.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

static test_rng rng = {12345};
static double uniform(void) {
  return test_uniform(&rng);
}

static double rel_err(const cm_tensor *x, const cm_tensor *y) {
  return test_rel_err(x, y, true);
}

static char cache_dir[256];
/* the model steps' object cache: each step is built twice (two memory plans) */
static char models_cache[256];

/* Runs g on the executor (threads) with copies of src; out[j] receives the
 * outputs, st[i] the sources after the run (states updated). */
static cm_status exec_graph(const cm_graph *g, const cm_tensor *const *src, int threads,
                            const char *cache, cm_tensor *out, cm_tensor *st,
                            cm_program_stats *stats, cm_err *err) {
  cm_compile_opts o = {.threads = threads, .cache_dir = cache, .profile = true};
  cm_program *pr = NULL;
  cm_status s = cm_compile(g, NULL, &o, &pr, err);
  if (s != CM_OK) return s;
  cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++)
    if (src[i]) {
      cm_tensor_copy(&st[i], src[i], NULL);
      ptr[i] = &st[i];
    }
  s = cm_program_run(pr, ptr, out, err);
  if (stats) cm_program_stats_get(pr, stats);
  const cm_kernel_profile *prof;
  int np = cm_program_profile(pr, &prof);
  for (int i = 0; i < np && s == CM_OK; i++) CHECK(prof[i].runs == 1);
  free(ptr);
  cm_program_free(pr);
  return s;
}

/* Compares every output and every assigned state with the oracle: each must
 * lie within its forward error bound (cm_eval_bounded). Returns the worst
 * |cpu - f64| / bound, or -1 when the executor fails (a graph whose lowering
 * is missing, lower.c's "not lowered yet", fails too: it is not skipped). */
static double check_graph(const cm_graph *g, const cm_tensor *const *src, int threads,
                          const char *what) {
  cm_err err = {0};
  cm_tensor *v = calloc((size_t)g->n_nodes, sizeof *v);
  cm_tensor *bnd = calloc((size_t)g->n_nodes, sizeof *bnd);
  CHECK_MSG(cm_eval_bounded(g, src, v, bnd, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_tensor *out = calloc((size_t)g->n_outputs + 1, sizeof *out);
  cm_tensor *st = calloc((size_t)g->n_nodes, sizeof *st);
  double worst = 0;
  cm_status s = exec_graph(g, src, threads, "", out, st, NULL, &err);
  CHECK_MSG(s == CM_OK, "%s: %s", what, err.msg);
  if (s != CM_OK) worst = -1;
  for (int j = 0; s == CM_OK && j < g->n_outputs + g->n_nodes; j++) {
    const cm_tensor *got;
    int node;
    if (j < g->n_outputs) {
      node = g->outputs[j], got = &out[j];
    } else {
      node = j - g->n_outputs;
      if (g->nodes[node].op != CM_OP_ASSIGN) continue;
      got = &st[g->nodes[node].inputs[0]];
    }
    test_bounded r = test_check_bounded(got, &v[node], &bnd[node]);
    CHECK_MSG(r.ratio <= 1, "%s: %s \"%s\": |cpu - f64| = %g at [%lld] exceeds its bound %g", what,
              j < g->n_outputs ? "output" : "state", g->nodes[node].name, r.diff, (long long)r.at,
              r.bound);
    worst = fmax(worst, r.ratio);
  }
  for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&out[j]);
  for (int i = 0; i < g->n_nodes; i++)
    cm_tensor_free(&v[i]), cm_tensor_free(&bnd[i]), cm_tensor_free(&st[i]);
  free(v), free(bnd), free(st), free(out);
  return worst;
}

/* A copy of n bytes of a program's buffer as a tensor of type t. */
static void tensor_from(cm_tensor *out, cm_type t, const void *data) {
  memset(out, 0, sizeof *out);
  if (!data || cm_tensor_alloc(out, t, NULL) != CM_OK) return;
  memcpy(out->data, data, cm_type_nbytes(&t));
}

/* A training step against the oracle, kernel by kernel. The step runs through
 * the default pipeline into a plan whose memory plan reuses no buffer, so
 * every kernel's outputs are still there after the run; each kernel (plan
 * group) is then evaluated alone by the oracle on the inputs the backend gave
 * it, with forward error bounds that start from those exact inputs
 * (cm_plan_eval_group_bounded), and every output it wrote must lie within its
 * bound: what any f32 evaluation of that kernel may differ from the exact
 * value by, whatever the host's vector width, FMA contraction or summation
 * order. Checking kernels on their own inputs keeps the bounds local: carried
 * through a whole step, worst-case bounds grow by sqrt(K) per matmul and say
 * nothing. The same step run with the default (reusing) memory plan must give
 * the same bits. Returns the worst |cpu - f64| / bound. */
static double check_step(const cm_graph *g, const cm_tensor *const *src, const char *what,
                         const char *cache) {
  cm_err err = {0};
  cm_pass_state ps = {cm_graph_clone(g), NULL};
  cm_status s =
      ps.g ? cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err) : CM_EINTERNAL;
  CHECK_MSG(s == CM_OK && ps.plan && ps.plan->offset, "%s: pipeline: %s", what, err.msg);
  if (s != CM_OK || !ps.plan || !ps.plan->offset) {
    cm_graph_free(ps.g);
    cm_plan_free(ps.plan);
    return INFINITY;
  }
  const cm_graph *rg = ps.g;
  cm_plan *p = ps.plan;
  int n = rg->n_nodes;
  int64_t end = 0;
  for (int v = 0; v < n; v++)
    if (p->offset[v] >= 0) {
      p->offset[v] = end;
      end += (cm_type_nbytes(&rg->nodes[v].type) + 63) / 64 * 64;
    }
  p->arena_bytes = end;
  CHECK_MSG(cm_plan_verify(rg, p, &err) == CM_OK, "%s: the plan without reuse: %s", what, err.msg);
  /* the optimized graph's sources are g's, by name; states are updated in
     place, so the program gets copies */
  const cm_tensor **rsrc = calloc((size_t)n, sizeof *rsrc);
  cm_tensor *state = calloc((size_t)n, sizeof *state), **ptr = calloc((size_t)n, sizeof *ptr);
  for (int v = 0; v < n; v++) {
    const cm_node *u = &rg->nodes[v];
    if (u->op != CM_OP_INPUT && u->op != CM_OP_PARAM && u->op != CM_OP_STATE) continue;
    int o = cm_graph_find(g, u->name);
    CHECK_MSG(o >= 0 && src[o], "%s: source \"%s\" of the optimized graph", what, u->name);
    if (o < 0 || !src[o]) continue;
    rsrc[v] = src[o];
    cm_tensor_copy(&state[v], src[o], NULL);
    ptr[v] = &state[v];
  }
  cm_compile_opts o = {.cache_dir = cache, .plan = p};
  cm_program *pr = NULL;
  s = cm_compile(rg, NULL, &o, &pr, &err);
  CHECK_MSG(s == CM_OK, "%s: build: %s", what, err.msg);
  if (s == CM_OK) s = cm_program_run(pr, ptr, NULL, &err);
  CHECK_MSG(s == CM_OK, "%s: run: %s", what, err.msg);
  cm_program_stats stats = {0};
  if (pr) cm_program_stats_get(pr, &stats);
  /* every variant repeats blocks: their kernels are compiled once */
  CHECK_MSG(stats.n_distinct_kernels > 0 && stats.n_distinct_kernels < stats.n_kernels,
            "%s: %d distinct of %d kernels", what, stats.n_distinct_kernels, stats.n_kernels);
  /* what the backend wrote: every group output */
  cm_tensor *got = calloc((size_t)n, sizeof *got);
  for (int gi = 0; s == CM_OK && gi < p->n_groups; gi++)
    for (int k = 0; k < p->groups[gi].n_outputs; k++) {
      int v = p->groups[gi].outputs[k];
      tensor_from(&got[v], rg->nodes[v].type, cm_program_value(pr, v));
    }
  /* each kernel alone on the backend's inputs */
  cm_tensor *val = calloc((size_t)n, sizeof *val), *bnd = calloc((size_t)n, sizeof *bnd);
  double worst = 0, loosest = 0;
  int compared = 0, loose = 0;
  const char *worst_name = "", *loosest_name = "";
  for (int k = 0; s == CM_OK && k < p->n_order; k++) {
    const cm_group *gr = &p->groups[p->order[k]];
    for (int j = 0; j < gr->n_inputs; j++) val[gr->inputs[j]] = got[gr->inputs[j]]; /* shared */
    for (int j = 0; j < gr->n_outputs; j++) memset(&val[gr->outputs[j]], 0, sizeof *val);
    cm_status es = cm_plan_eval_group_bounded(rg, p, p->order[k], rsrc, val, bnd, &err);
    CHECK_MSG(es == CM_OK, "%s: group %d: %s", what, p->order[k], err.msg);
    for (int j = 0; es == CM_OK && j < gr->n_outputs; j++) {
      int v = gr->outputs[j];
      const char *name = rg->nodes[v].name;
      test_bounded r = test_check_bounded(&got[v], &val[v], &bnd[v]);
      compared++;
      CHECK_MSG(r.ratio <= 1,
                "%s: kernel %d (%s), output %s: |cpu - f64| = %g at [%lld] exceeds its error "
                "bound %g (tensor scale %g)",
                what, k, cm_group_kind_name(gr->kind), name, r.diff, (long long)r.at, r.bound,
                r.scale);
      if (r.ratio > worst) worst = r.ratio, worst_name = name;
      if (r.spread > loosest) loosest = r.spread, loosest_name = name;
      loose += r.spread > 1e-3;
    }
    for (int j = 0; j < gr->n_outputs; j++) {
      cm_tensor_free(&val[gr->outputs[j]]);
      cm_tensor_free(&bnd[gr->outputs[j]]);
    }
  }
  fprintf(stderr,
          "  %s: %d kernels, %d outputs within their bounds; worst |cpu - f64| / bound %.3g "
          "(%s); largest bound / scale %.2g (%s), %d above 1e-3\n",
          what, p->n_order, compared, worst, worst_name, loosest, loosest_name, loose);
  /* the same step with the default memory plan: the same bits */
  cm_tensor *out = calloc((size_t)g->n_outputs + 1, sizeof *out);
  cm_tensor *st2 = calloc((size_t)g->n_nodes, sizeof *st2);
  if (s == CM_OK) {
    cm_status s2 = exec_graph(g, src, 0, cache, out, st2, NULL, &err);
    CHECK_MSG(s2 == CM_OK, "%s: with the default plan: %s", what, err.msg);
    for (int j = 0; s2 == CM_OK && j < g->n_outputs; j++) {
      int v = cm_graph_find(rg, g->nodes[g->outputs[j]].name);
      const void *mine = v >= 0 ? cm_program_value(pr, v) : NULL;
      CHECK_MSG(mine && !memcmp(mine, out[j].data, cm_type_nbytes(&out[j].type)),
                "%s: output %s differs with the default memory plan", what,
                g->nodes[g->outputs[j]].name);
    }
    for (int i = 0; s2 == CM_OK && i < g->n_nodes; i++) {
      if (g->nodes[i].op != CM_OP_STATE && g->nodes[i].op != CM_OP_PARAM) continue;
      int v = cm_graph_find(rg, g->nodes[i].name);
      CHECK_MSG(v >= 0 && st2[i].data &&
                    !memcmp(state[v].data, st2[i].data, cm_type_nbytes(&st2[i].type)),
                "%s: state %s differs with the default memory plan", what, g->nodes[i].name);
    }
  }
  for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&out[j]);
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&st2[i]);
  for (int v = 0; v < n; v++) cm_tensor_free(&got[v]), cm_tensor_free(&state[v]);
  free(out), free(st2), free(got), free(val), free(bnd), free(state), free(ptr), free(rsrc);
  cm_program_free(pr);
  cm_graph_free(ps.g);
  cm_plan_free(ps.plan);
  return worst;
}

/* The graphs of seeds 0..1999 in four cases of 500 (ctest: seeds_0_499 and seeds_500_999 in CI,
 * the others with scripts/test.sh --long); CMAEC_TEST_QUICK (the sanitizer build): the first 50
 * of each. */
static void test_random_graphs(void) {
  double worst = 0;
  int n = 0, tried = 0;
  bool quick = getenv("CMAEC_TEST_QUICK") != NULL;
  static const char *const parts[4] = {"seeds_0_499", "seeds_500_999", "seeds_1000_1499",
                                       "seeds_1500_1999"};
  for (int part = 0; part < 4; part++) {
    if (!test_case_wanted(parts[part])) continue;
    for (int i = 500 * part; i < 500 * part + (quick ? 50 : 500); i++) {
      rng.s = 777 + (uint64_t)i * 31;
      tried++;
      cm_graph *g = cm_graph_new();
      int blocks = (int)test_int(&rng, 1, 3);
      for (int b = 0; b < blocks; b++) test_random_block(&rng, g);
      CHECK_MSG(cm_graph_error(g) == NULL, "graph %d: %s", i, cm_graph_error(g));
      if (!cm_graph_error(g) && g->n_outputs > 0) {
        cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
        const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
        test_fill_sources(&rng, g, t, src);
        char what[64];
        snprintf(what, sizeof what, "random graph %d", i);
        double e = check_graph(g, src, 1 + i % 2, what);
        worst = fmax(worst, e);
        n += e >= 0;
        for (int k = 0; k < g->n_nodes; k++) cm_tensor_free(&t[k]);
        free(t);
        free(src);
      }
      cm_graph_free(g);
    }
  }
  /* every graph has outputs, and every one runs (one not lowered yet is a failure) */
  CHECK_MSG(tried > 0 && n == tried, "%d graphs, %d run", tried, n);
  fprintf(stderr, "random graphs: %d run, worst |cpu - f64| / bound %.3g\n", n, worst);
}

/* Contractions in other dtypes than f32 carry the GEMM template too, but the
 * CPU renders them as loop nests: the executor must split them as such (it
 * once split them into GEMM blocks, leaving most of the output unwritten). */
static void test_gemm_dtypes(void) {
  const cm_dtype dts[] = {CM_F64, CM_BF16, CM_F32};
  for (int q = 0; q < 3; q++)
    for (int threads = 1; threads <= 2; threads++) {
      cm_graph *g = cm_graph_new();
      int64_t da[3] = {3, 67, 33}, db[2] = {33, 45};
      int a = cm_input(g, "a", dts[q], 3, da), b = cm_input(g, "b", dts[q], 2, db);
      cm_graph_add_output(g, cm_matmul(g, a, b, false, false, "y"), NULL);
      cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
      const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
      test_fill_sources(&rng, g, t, src);
      char what[64];
      snprintf(what, sizeof what, "matmul %s, %d threads", cm_dtype_name(dts[q]), threads);
      CHECK_MSG(check_graph(g, src, threads, what) >= 0, "%s: not lowered", what);
      for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t[i]);
      free(t), free(src);
      cm_graph_free(g);
    }
}

/* Splitting work items across threads changes nothing, to the bit: the work items of a stage
 * are fixed when the program is built, and threads only share them out. */
static void test_threads_agree(void) {
  for (int i = 0; i < 20; i++) {
    rng.s = 99 + (uint64_t)i;
    cm_graph *g = cm_graph_new();
    for (int b = 0; b < 3; b++) test_random_block(&rng, g);
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    test_fill_sources(&rng, g, t, src);
    cm_tensor *o1 = calloc((size_t)g->n_outputs + 1, sizeof *o1);
    cm_tensor *o2 = calloc((size_t)g->n_outputs + 1, sizeof *o2);
    cm_tensor *s1 = calloc((size_t)g->n_nodes, sizeof *s1);
    cm_tensor *s2 = calloc((size_t)g->n_nodes, sizeof *s2);
    cm_err err = {0};
    cm_status r1 = exec_graph(g, src, 1, "", o1, s1, NULL, &err);
    bool skip = r1 != CM_OK; /* a failure (not lowered yet included), not a skip */
    CHECK_MSG(r1 == CM_OK, "graph %d: %s", i, err.msg);
    if (!skip) CHECK_MSG(exec_graph(g, src, 2, "", o2, s2, NULL, &err) == CM_OK, "%s", err.msg);
    for (int j = 0; j < g->n_outputs && !skip; j++) {
      CHECK_MSG(rel_err(&o2[j], &o1[j]) == 0, "graph %d output %d: 1 vs 2 threads", i, j);
      cm_tensor_free(&o1[j]);
      cm_tensor_free(&o2[j]);
    }
    for (int k = 0; k < g->n_nodes; k++) {
      if (g->nodes[k].op == CM_OP_STATE && !skip)
        CHECK_MSG(rel_err(&s2[k], &s1[k]) == 0, "graph %d state: 1 vs 2 threads", i);
      cm_tensor_free(&t[k]), cm_tensor_free(&s1[k]), cm_tensor_free(&s2[k]);
    }
    free(t), free(src), free(o1), free(o2), free(s1), free(s2);
    cm_graph_free(g);
  }
}

/* An autocast (bf16) step's program built for a CPU with vdpbf16ps (AVX-512
 * BF16): it has bf16 GEMM stages, and the first kernel holding one (outside
 * attention spans, which keep their own packing) assembles to vdpbf16ps on
 * zmm. */
static void check_bf16_asm(const cm_program *pr, const char *what) {
  const cm_kprogram *kp = cm_program_kernels(pr);
  cm_cpu_target target;
  cm_err err = {0};
  CHECK_MSG(cm_cpu_target_resolve(NULL, NULL, &target, &err) == CM_OK, "%s", err.msg);
  if (!target.dot_bf16) return; /* the f32 micro-kernel: nothing of its own to check */
  int found = -1;
  for (int i = 0; i < kp->n_kernels && found < 0; i++) {
    const cm_kernel *k = &kp->kernels[i];
    bool attn = false, bf16 = false;
    for (int j = 0; j < k->n_stages; j++) {
      const cm_kstage *s = &k->stages[j];
      attn |= s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD;
      bf16 |= s->tmpl == CM_KT_GEMM && s->exprs[s->gemm_a].dtype == CM_BF16 &&
              s->exprs[s->gemm_b].dtype == CM_BF16;
    }
    if (bf16 && !attn) found = i;
  }
  CHECK_MSG(found >= 0, "%s: no kernel with a bf16 GEMM stage outside attention spans", what);
  if (found < 0) return;
  FILE *f = tmpfile();
  CHECK(f != NULL);
  if (!f) return;
  CHECK_MSG(cm_program_emit(pr, found, CM_EMIT_ASM, f, &err) == CM_OK, "%s: emit: %s", what,
            err.msg);
  long len = ftell(f);
  char *text = calloc((size_t)(len > 0 ? len : 0) + 1, 1);
  rewind(f);
  size_t got = fread(text, 1, (size_t)(len > 0 ? len : 0), f);
  text[got] = 0;
  fclose(f);
  int dots = 0;
  for (const char *q = strstr(text, "vdpbf16ps\t%zmm"); q; q = strstr(q + 1, "vdpbf16ps\t%zmm"))
    dots++;
  CHECK_MSG(dots > 0, "%s: kernel %s (bf16 GEMMs) has no vdpbf16ps on zmm", what,
            kp->kernels[found].name);
  fprintf(stderr, "  %s: kernel %s's bf16 GEMMs: %d vdpbf16ps (AVX-512 BF16)\n", what,
          kp->kernels[found].name, dots);
  free(text);
}

/* Where $CMAEC_CPU names a CPU this host cannot run (AVX-512 code on an AVX2
 * host), a step's kernels are compiled for it and linked, not run: every
 * distinct kernel must compile to an object and every stage's symbol resolve,
 * and running must be refused with an error naming CMAEC_CPU. Nothing is
 * compared with the oracle, and the test says so. */
static void compile_step(const cm_graph *g, const char *what, bool bf16) {
  cm_compile_opts o = {.threads = 1, .cache_dir = ""};
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_EINVALID && !pr,
            "%s: build for a CPU the host cannot run: %s", what, err.msg);
  CHECK_MSG(strstr(err.msg, "CMAEC_CPU") != NULL, "%s: %s", what, err.msg);
  o.compile_only = true;
  cm_status s = cm_compile(g, NULL, &o, &pr, &err);
  CHECK_MSG(s == CM_OK, "%s: compile: %s", what, err.msg);
  if (s != CM_OK) return;
  cm_program_stats st;
  cm_program_stats_get(pr, &st);
  CHECK_MSG(!st.runnable && st.n_distinct_kernels > 0 && st.n_distinct_kernels < st.n_kernels,
            "%s: runnable %d, %d distinct of %d kernels", what, st.runnable, st.n_distinct_kernels,
            st.n_kernels);
  CHECK_MSG(st.jit_modules == st.n_distinct_kernels && st.cache_hits == 0,
            "%s: %d objects for %d distinct kernels (%d from a cache)", what, st.jit_modules,
            st.n_distinct_kernels, st.cache_hits);
  CHECK_MSG(st.object_bytes >= 64 * (int64_t)st.jit_modules, "%s: %lld bytes of objects", what,
            (long long)st.object_bytes);
  if (bf16) check_bf16_asm(pr, what);
  memset(&err, 0, sizeof err);
  CHECK(cm_program_run(pr, NULL, NULL, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "CMAEC_CPU") && strstr(err.msg, "lacks"), "run: %s", err.msg);
  fprintf(stderr,
          "  %s: %d kernels (%d distinct) compiled for CMAEC_CPU=%s (%d-bit vectors), %lld bytes "
          "of code; NOT RUN, NOT COMPARED: %s\n",
          what, st.n_kernels, st.n_distinct_kernels, getenv("CMAEC_CPU"), st.vector_bits,
          (long long)st.object_bytes, err.msg);
  cm_program_free(pr);
}

/* low: CM_BF16 autocasts the step (cm_autocast: every contraction's operands bf16). */
static void check_variant(const char *path, const char *const *ov, int n_ov, cm_dtype low) {
  cm_optim_config oc = test_model_optim();
  /* AdamW's first step is lr * sign(g) with eps 1e-8: a gradient at rounding
   * level flips the update. eps 1 keeps the update a smooth function of g. */
  oc.eps = 1;
  cm_model_config cfg;
  cm_model m;
  cm_err err = {0};
  cm_graph *step = test_build_step(path, ov, n_ov, 2, &oc, &cfg, &m);
  if (step && low != CM_F32) {
    int rewritten = 0;
    CHECK_MSG(cm_autocast(&step, low, &rewritten, &err) == CM_OK && rewritten > 0,
              "%s: autocast: %d contractions: %s", path, rewritten, err.msg);
  }
  cm_cpu_target target;
  CHECK_MSG(cm_cpu_target_resolve(NULL, NULL, &target, &err) == CM_OK, "%s", err.msg);
  if (step && !target.runnable) {
    compile_step(step, path, low == CM_BF16);
    cm_graph_free(step);
  } else if (step) {
    cm_tensor *t = calloc((size_t)step->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)step->n_nodes, sizeof *src);
    rng.s = 4242;
    test_bind_step(step, &cfg, &m, t, src, uniform);
    double e = check_step(step, src, path, models_cache);
    fprintf(stderr, "%-36s %6d nodes, worst |cpu - f64| / bound %.3g\n", path, step->n_nodes, e);
    for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&t[i]);
    free(t), free(src);
    cm_graph_free(step);
  }
}

/* Every shipped variant's step (the ImageNet-size ones shrunk), a case each:
 * `test_cpu_exec test_models:cmae_vit_base` runs one. Under $CMAEC_CPU the
 * kernels are built for that CPU; where the host cannot run it, compiled only. */
static void test_models(void) {
  snprintf(models_cache, sizeof models_cache, "/tmp/cmaec_test_cpu_exec_models_XXXXXX");
  CHECK(mkdtemp(models_cache) != NULL);
  static const struct {
    const char *name;
    const char *model; /* models/<model>.json */
    const char *const *ov;
    int n_ov;
    bool quick;   /* also in CMAEC_TEST_QUICK (the sanitizer build, ~10x slower) */
    cm_dtype low; /* CM_BF16: the step autocast (bf16 GEMM operands) */
  } variants[] = {
      {"cmae_vit_tiny_fmnist", "cmae_vit_tiny_fmnist", NULL, 0, false, CM_F32},
      {"cmae_convvit_tiny_fmnist", "cmae_convvit_tiny_fmnist", NULL, 0, false, CM_F32},
      {"cmae_vit_base", "cmae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_N, true, CM_F32},
      {"cmae_vit_small", "cmae_vit_small", test_shrunk_vit, TEST_SHRUNK_VIT_N, false, CM_F32},
      {"cmae_vit_large", "cmae_vit_large", test_shrunk_vit, TEST_SHRUNK_VIT_N, false, CM_F32},
      {"mae_vit_base", "mae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_MAE, false, CM_F32},
      {"cmae_convvit_base", "cmae_convvit_base", test_shrunk_convvit, TEST_SHRUNK_CONVVIT_N, true,
       CM_F32},
      {"cmae_vit_base_bf16", "cmae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_N, false, CM_BF16},
  };
  /* a variant named in the selection runs in quick mode too */
  bool quick = getenv("CMAEC_TEST_QUICK") != NULL && !test_cases_selected();
  cm_cpu_target target;
  cm_err err = {0};
  CHECK_MSG(cm_cpu_target_resolve(NULL, NULL, &target, &err) == CM_OK, "%s", err.msg);
  if (target.forced)
    fprintf(stderr, "  CPU target %s (%d-bit vectors)%s%s\n", target.source, target.vector_bits,
            target.runnable ? "" : ": this host lacks ", target.missing);
  for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
    if (!test_case_wanted(variants[i].name) || (quick && !variants[i].quick)) continue;
    char path[128];
    snprintf(path, sizeof path, "models/%s.json", variants[i].model);
    check_variant(path, variants[i].ov, variants[i].n_ov, variants[i].low);
  }
  /* a model file that does not load fails its case once and ends it (it once went on and
     built from an uninitialized config) */
  if (test_case_wanted("bad_model_file")) {
    int before = test_failures;
    fprintf(stderr, "  (bad_model_file: one CHECK failure expected next)\n");
    check_variant("models/no_such_variant.json", NULL, 0, CM_F32);
    CHECK_MSG(test_failures == before + 1, "a missing model file: %d failures, expected 1",
              test_failures - before);
    if (test_failures == before + 1) test_failures = before; /* the expected one */
  }
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", models_cache);
  CHECK(system(cmd) == 0);
}

/* ---- errors and the cache ------------------------------------------------ */

static cm_graph *small_graph(int *x, int *s) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {3, 5};
  cm_init init = {CM_INIT_ZEROS, 0, 0};
  *x = cm_input(g, "x", CM_F32, 2, d);
  *s = cm_state(g, "s", CM_F32, 2, d, init);
  int nv = cm_binary(g, CM_OP_ADD, *s, cm_unary(g, CM_OP_TANH, *x, NULL), NULL);
  cm_assign(g, *s, nv, "upd");
  int axes[2] = {0, 1};
  cm_graph_add_output(g, cm_reduce(g, CM_OP_REDUCE_SUM, nv, 2, axes, false, "total"), NULL);
  return g;
}

static void test_errors(void) {
  int x, s;
  cm_graph *g = small_graph(&x, &s);
  cm_err err = {0};
  cm_compile_opts o = {.threads = 1, .cache_dir = ""};
  cm_program *pr = NULL;
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_OK, "%s", err.msg);
  if (!pr) {
    cm_graph_free(g);
    return;
  }
  cm_tensor tx = {0}, ts = {0}, bad = {0}, out[1];
  int64_t d[2] = {3, 5}, d2[2] = {5, 3};
  cm_tensor_alloc(&tx, cm_type_make(CM_F32, 2, d), NULL);
  cm_tensor_alloc(&ts, cm_type_make(CM_F32, 2, d), NULL);
  cm_tensor_alloc(&bad, cm_type_make(CM_F32, 2, d2), NULL);
  for (int i = 0; i < 15; i++) cm_tensor_set_f64(&tx, i, 0.1 * i - 0.5);
  cm_tensor *srcs[8] = {0};
  srcs[x] = &tx;
  CHECK(cm_program_run(pr, srcs, out, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "\"s\""), "missing source: %s", err.msg);
  srcs[s] = &bad;
  CHECK(cm_program_run(pr, srcs, out, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "\"s\"") && strstr(err.msg, "f32[3,5]"), "wrong type: %s", err.msg);
  srcs[s] = &ts;
  for (int run = 1; run <= 2; run++) { /* the state accumulates in place */
    CHECK_MSG(cm_program_run(pr, srcs, out, &err) == CM_OK, "%s", err.msg);
    double want = 0;
    for (int i = 0; i < 15; i++) want += run * tanh(0.1 * i - 0.5);
    CHECK_MSG(fabs(cm_tensor_get_f64(&out[0], 0) - want) < 1e-4, "run %d: %g vs %g", run,
              cm_tensor_get_f64(&out[0], 0), want);
    cm_tensor_free(&out[0]);
  }
  /* outputs NULL: nothing copied; the output is read where the program keeps it */
  CHECK_MSG(cm_program_run(pr, srcs, NULL, &err) == CM_OK, "%s", err.msg);
  const float *kept = cm_program_output(pr, 0);
  double want3 = 0;
  for (int i = 0; i < 15; i++) want3 += 3 * tanh(0.1 * i - 0.5);
  CHECK_MSG(kept && fabs(kept[0] - want3) < 1e-4, "run 3 kept output: %g vs %g",
            kept ? kept[0] : -1.0, want3);
  CHECK(cm_program_output(pr, 1) == NULL && cm_program_output(pr, -1) == NULL);
  cm_program_free(pr);
  setenv("CMAEC_THREADS", "abc", 1);
  cm_compile_opts o0 = {.cache_dir = ""};
  pr = NULL;
  CHECK(cm_compile(g, NULL, &o0, &pr, &err) == CM_EINVALID && !pr);
  CHECK_MSG(strstr(err.msg, "CMAEC_THREADS"), "%s", err.msg);
  setenv("CMAEC_THREADS", "0", 1);
  CHECK(cm_compile(g, NULL, &o0, &pr, &err) == CM_EINVALID && !pr);
  setenv("CMAEC_THREADS", "2", 1);
  CHECK(cm_compile(g, NULL, &o0, &pr, &err) == CM_OK && pr);
  if (pr) {
    cm_program_stats st;
    cm_program_stats_get(pr, &st);
    CHECK(st.threads == 2 && st.n_kernels >= 1);
  }
  cm_program_free(pr);
  unsetenv("CMAEC_THREADS");
  cm_tensor_free(&tx), cm_tensor_free(&ts), cm_tensor_free(&bad);
  cm_graph_free(g);
}

static void test_cache(void) {
  snprintf(cache_dir, sizeof cache_dir, "/tmp/cmaec_test_cpu_exec_XXXXXX");
  CHECK(mkdtemp(cache_dir) != NULL);
  cm_graph *g = cm_graph_new();
  rng.s = 5; /* elementwise, reduction, matmul, state update: all lowered today */
  test_block(&rng, g, 0.1);
  test_block(&rng, g, 0.5);
  test_block(&rng, g, 0.6);
  test_block(&rng, g, 0.95);
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  test_fill_sources(&rng, g, t, src);
  cm_program_stats s1, s2;
  cm_err err = {0};
  for (int pass = 0; pass < 2; pass++) {
    cm_tensor *o = calloc((size_t)g->n_outputs + 1, sizeof *o);
    cm_tensor *st = calloc((size_t)g->n_nodes, sizeof *st);
    CHECK_MSG(exec_graph(g, src, 1, cache_dir, o, st, pass ? &s2 : &s1, &err) == CM_OK, "%s",
              err.msg);
    for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&o[j]);
    for (int k = 0; k < g->n_nodes; k++) cm_tensor_free(&st[k]);
    free(o), free(st);
  }
  CHECK_MSG(s1.cache_misses > 0 && s1.cache_hits == 0, "first: %d hits %d misses", s1.cache_hits,
            s1.cache_misses);
  CHECK_MSG(s2.cache_hits > 0 && s2.cache_misses == 0, "second: %d hits %d misses", s2.cache_hits,
            s2.cache_misses);
  /* one module (and one cache entry) per distinct kernel */
  CHECK(s1.cache_misses == s1.n_distinct_kernels && s2.cache_hits == s2.n_distinct_kernels);
  CHECK(s1.n_distinct_kernels >= 1 && s1.n_distinct_kernels <= s1.n_kernels);
  for (int k = 0; k < g->n_nodes; k++) cm_tensor_free(&t[k]);
  free(t), free(src);
  cm_graph_free(g);
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", cache_dir);
  CHECK(system(cmd) == 0);
}

TEST_MAIN(TEST(test_errors), TEST(test_gemm_dtypes), TEST(test_cache), TEST(test_threads_agree),
          TEST(test_random_graphs), TEST(test_models))
