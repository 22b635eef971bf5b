/* tests/unit/test_cuda_rows.c — row kernels in one launch (codegen/render_cuda_rows.c,
 * cm_kcuda_rows): LayerNorm, softmax, log-softmax and BatchNorm, forward and backward, at odd
 * row lengths and row counts, with f32 and with bf16 outputs (the casts in the row function's
 * stores), run on the emulated device: every output within the oracle's bound, and each
 * kernel's row statistics and the stages that read them in one launch. The training steps of
 * cmae_vit_base and cmae_vit_tiny_fmnist (batch 2, f32 and after autocast) lowered for CUDA:
 * launches with and without the row spans, every LayerNorm/softmax kernel's statistics and
 * their readers in one launch.
 * The row functions through NVRTC for sm_80 and sm_90: no spills. A plan the renderer cannot
 * follow is an error. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "passes/passes.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {0x70775eedu};

/* ---- the graphs ---------------------------------------------------------------- */

typedef enum { OP_LN, OP_SOFTMAX, OP_LOG_SOFTMAX, OP_BN, N_OPS } row_op;
static const char *const op_name[N_OPS] = {"layer_norm", "softmax", "log_softmax", "batch_norm"};

static int log_softmax(cm_graph *g, int x) {
  int axis = 1;
  int m = cm_unary(g, CM_OP_STOP_GRADIENT, cm_reduce(g, CM_OP_REDUCE_MAX, x, 1, &axis, true, "m"),
                   "m_const");
  int z = cm_binary_bcast(g, CM_OP_SUB, x, m, "z");
  int se = cm_reduce(g, CM_OP_REDUCE_SUM, cm_unary(g, CM_OP_EXP, z, "ez"), 1, &axis, true, "se");
  return cm_binary_bcast(g, CM_OP_SUB, z, cm_unary(g, CM_OP_LOG, se, "lse"), "y");
}

/* y = op(x) over x [n, len] (BatchNorm normalizes each of the len columns over the n rows),
 * the loss sum(y w) and its gradients with respect to x and the op's params; outputs y and
 * the gradients, cast to out (bf16: the casts autocast leaves after a row kernel). */
static cm_graph *row_graph(row_op op, int64_t n, int64_t len, cm_dtype out) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {n, len};
  int x = cm_input(g, "x", CM_F32, 2, d), w = cm_input(g, "w", CM_F32, 2, d), y = -1;
  int residual = -1;
  switch (op) {
  case OP_LN: /* of a residual sum kept as an output, as a transformer block's: the row
                  function writes it, then reads it back from registers */
    residual = cm_binary(g, CM_OP_ADD, x, w, "residual");
    y = cm_nn_layer_norm(g, residual, 1e-5, "ln");
    break;
  case OP_SOFTMAX: y = cm_nn_softmax(g, x); break;
  case OP_LOG_SOFTMAX: y = log_softmax(g, x); break;
  default: y = cm_nn_batch_norm(g, x, 1e-5, 1, "bn"); break;
  }
  int axes[2] = {0, 1};
  int loss =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, w, "yw"), 2, axes, false, "loss");
  int wrt[3] = {x, -1, -1}, grads[3], n_wrt = 1;
  const char *prefix = op == OP_LN ? "ln" : op == OP_BN ? "bn" : NULL;
  for (int i = 0; prefix && i < 2; i++) {
    char name[32];
    snprintf(name, sizeof name, "%s.%s", prefix, i ? "bias" : "weight");
    wrt[n_wrt++] = cm_graph_find(g, name);
  }
  cm_err err = {0};
  CHECK_MSG(cm_graph_error(g) == NULL, "%s: %s", op_name[op], cm_graph_error(g));
  CHECK_MSG(cm_autodiff(g, loss, n_wrt, wrt, grads, &err) == CM_OK, "%s: %s", op_name[op], err.msg);
  int outs[5] = {y, grads[0], grads[1], grads[2], residual};
  if (residual >= 0) outs[1 + n_wrt] = residual;
  for (int i = 0; i < 1 + n_wrt + (residual >= 0); i++) {
    int o = out == CM_F32 || outs[i] == residual ? outs[i] : cm_cast(g, outs[i], out, NULL);
    CHECK(cm_graph_add_output(g, o, &err) == CM_OK);
  }
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s: %s", op_name[op], err.msg);
  return g;
}

/* ---- what the plans say -------------------------------------------------------- */

static int64_t prod(const int64_t *d, int n) {
  int64_t p = 1;
  for (int i = 0; i < n; i++) p *= d[i];
  return p;
}

static bool reads_buffer(const cm_kstage *s, int b) {
  for (int e = 0; e < s->n_exprs; e++)
    if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == b) return true;
  return false;
}

/* The stage whose function runs stage s (itself unless it runs in a span). */
static int runner(const cm_kernel *k, int s) {
  return k->stages[s].cuda.kind == CM_KCUDA_IN_SPAN ? k->stages[s].cuda.first : s;
}

static int launches(const cm_kernel *k) {
  int n = 0;
  for (int s = 0; s < k->n_stages; s++) n += k->stages[s].cuda.kind != CM_KCUDA_IN_SPAN;
  return n;
}

static bool in_rows_span(const cm_kernel *k, int s) {
  return k->stages[runner(k, s)].cuda.kind == CM_KCUDA_ROWS;
}

/* The stage's domain extents other than 1. */
static int squeezed(const cm_kstage *s, int64_t *out) {
  int n = 0;
  for (int v = 0; v < s->n_dom; v++)
    if (s->dom[v] != 1) out[n++] = s->dom[v];
  return n;
}

/* Row statistics: reductions of a kernel outside attention spans whose domain is the leading
 * axes of the kernel's widest stage (a reduction along its innermost axis: LayerNorm's and
 * softmax's). */
static bool row_statistic(const cm_kernel *k, int s) {
  const cm_kstage *st = &k->stages[s];
  cm_kcuda_kind rk = k->stages[runner(k, s)].cuda.kind;
  if (st->n_red == 0 || st->tmpl != CM_KT_NONE || (rk != CM_KCUDA_ROWS && rk != CM_KCUDA_GENERIC))
    return false;
  int wide = 0;
  for (int i = 1; i < k->n_stages; i++)
    if (prod(k->stages[i].dom, k->stages[i].n_dom) >
        prod(k->stages[wide].dom, k->stages[wide].n_dom))
      wide = i;
  int64_t a[CM_KMAX_VARS], b[CM_KMAX_VARS];
  int na = squeezed(st, a), nb = squeezed(&k->stages[wide], b);
  return na >= 1 && na == nb - 1 && !memcmp(a, b, sizeof *a * (size_t)na);
}

typedef bool (*statistic_fn)(const cm_kernel *k, int s, const int64_t *shape);

/* A reduction of n_rows x len rows per point, outside attention spans (shape: {points,
 * reduction extent}). */
static bool reduces_as(const cm_kernel *k, int s, const int64_t *shape) {
  const cm_kstage *st = &k->stages[s];
  cm_kcuda_kind rk = k->stages[runner(k, s)].cuda.kind;
  return st->n_red > 0 && st->tmpl == CM_KT_NONE && rk != CM_KCUDA_ATTN_FUSED &&
         rk != CM_KCUDA_ATTN_STREAM && rk != CM_KCUDA_ATTN_STREAM_BWD &&
         prod(st->dom, st->n_dom) == shape[0] && prod(st->red, st->n_red) == shape[1];
}

static bool row_statistic_fn(const cm_kernel *k, int s, const int64_t *shape) {
  (void)shape;
  return row_statistic(k, s);
}

/* The stages without a reduction after statistic s that read what it writes. */
static int readers(const cm_kernel *k, int s) {
  int n = 0;
  for (int t = s + 1; t < k->n_stages; t++) {
    bool reads = false;
    for (int i = 0; i < k->stages[s].n_stores; i++)
      reads |= reads_buffer(&k->stages[t], k->stages[s].stores[i].buf);
    n += reads && k->stages[t].n_red == 0;
  }
  return n;
}

/* Every statistic of kernel k (is_stat) and every stage without a reduction that reads a
 * buffer one writes run in one function, a row span's unless that function runs nothing else
 * (reductions across the rows, such as LayerNorm's parameter gradients, need every row: they
 * are launches of their own). Returns that function (-1: k has no statistic); *n counts the
 * statistics that other stages read. */
static int check_one_launch(const cm_kernel *k, statistic_fn is_stat, const int64_t *shape,
                            const char *what, int *n) {
  int fn = -1, read = 0, stats = 0;
  for (int s = 0; s < k->n_stages; s++)
    if (is_stat(k, s, shape)) stats++, read += readers(k, s);
  for (int s = 0; s < k->n_stages; s++) {
    if (!is_stat(k, s, shape)) continue;
    *n += readers(k, s) > 0;
    CHECK_MSG(in_rows_span(k, s) || (stats == 1 && read == 0) || launches(k) == 1,
              "%s: kernel %s stage %d \"%s\" is no row span's", what, k->name, s,
              k->stages[s].name);
    if (fn < 0) fn = runner(k, s);
    CHECK_MSG(runner(k, s) == fn, "%s: kernel %s: statistics in functions %d and %d", what, k->name,
              fn, runner(k, s));
    for (int i = 0; i < k->stages[s].n_stores; i++)
      for (int t = s + 1; t < k->n_stages; t++)
        if (k->stages[t].n_red == 0 && reads_buffer(&k->stages[t], k->stages[s].stores[i].buf))
          CHECK_MSG(runner(k, t) == fn, "%s: kernel %s stage %d reads stage %d in another launch",
                    what, k->name, t, s);
  }
  return fn;
}

/* ---- on the emulated device ------------------------------------------------------ */

static void free_tensors(cm_tensor *t, int n) {
  for (int i = 0; t && i < n; i++) cm_tensor_free(&t[i]);
  free(t);
}

/* The plans of pr's kernels: row spans, the op's statistics in one launch each, bf16 stores
 * inside a row function when out is bf16. */
static void check_plans(const cm_program *pr, row_op op, int64_t n, int64_t len, cm_dtype out,
                        const char *what) {
  const cm_kprogram *kp = cm_program_kernels(pr);
  int spans = 0, stats = 0, bf16_stores = 0, multi = 0, cached = 0;
  int64_t shape[2] = {op == OP_BN ? len : n, op == OP_BN ? n : len};
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    int before = test_failures, n_stats = 0;
    int fn = check_one_launch(k, reduces_as, shape, what, &n_stats);
    for (int s = 0; s < k->n_stages; s++) stats += reduces_as(k, s, shape);
    multi += fn >= 0 && k->n_stages > 1;
    for (int s = 0; s < k->n_stages; s++) {
      spans += k->stages[s].cuda.kind == CM_KCUDA_ROWS;
      cached += k->stages[s].cuda.kind == CM_KCUDA_ROWS ? k->stages[s].cuda.rows.n_cached : 0;
      for (int j = 0; j < k->stages[s].n_stores && fn >= 0 && runner(k, s) == fn; j++)
        bf16_stores += k->buffers[k->stages[s].stores[j].buf].dtype == CM_BF16;
    }
    if (test_failures > before && getenv("CMAEC_TEST_VERBOSE")) cm_kernel_print(k, stderr);
  }
  /* a kernel of more than one stage holding statistics is a row span */
  CHECK_MSG(stats > 0 && spans >= (multi > 0), "%s: %d row spans, %d statistics", what, spans,
            stats);
  CHECK_MSG(out != CM_BF16 || bf16_stores > 0, "%s: no bf16 store with the statistics", what);
  /* the residual sum a LayerNorm's row function writes is read back from registers while a
   * thread's share of the row fits 32 of them (rows up to 1024 a warp, 8192 a block) */
  if (op == OP_LN && len > 1 && len <= 8192)
    CHECK_MSG(cached > 0, "%s: the residual sum is not kept in registers", what);
  if (getenv("CMAEC_TEST_VERBOSE"))
    for (int i = 0; i < kp->n_kernels; i++) cm_kernel_print(&kp->kernels[i], stderr);
}

/* op at n x len on the emulated device: every output within its bound; the plans checked.
 * Returns the worst |gpu - f64| / bound (-1: it did not run). */
static double run_rows(row_op op, int64_t n, int64_t len, cm_dtype out) {
  char what[96];
  snprintf(what, sizeof what, "%s %lld x %lld %s", op_name[op], (long long)n, (long long)len,
           cm_dtype_name(out));
  cm_graph *g = row_graph(op, n, len, out);
  int nn = g->n_nodes;
  cm_tensor *t = calloc((size_t)nn, sizeof *t), *v = calloc((size_t)nn, sizeof *v);
  cm_tensor *bnd = calloc((size_t)nn, sizeof *bnd),
            *got = calloc((size_t)g->n_outputs, sizeof *got);
  const cm_tensor **src = calloc((size_t)nn, sizeof *src);
  test_fill_sources(&rng, g, t, src);
  cm_err err = {0};
  CHECK_MSG(cm_eval_bounded(g, src, v, bnd, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_target target = {0};
  CHECK_MSG(emu_device_target(&target, &err) == CM_OK, "%s", err.msg);
  cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_OFF, 0};
  cm_compile_opts co = {.cache_dir = test_module_cache("test_cuda_rows"), .backend_opts = &bo};
  cm_program *pr = NULL;
  cm_status st = cm_compile(g, &target, &co, &pr, &err);
  if (st == CM_OK) st = cm_program_run(pr, (cm_tensor *const *)src, got, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  double worst = st == CM_OK ? 0 : -1;
  for (int j = 0; st == CM_OK && j < g->n_outputs; j++) {
    int node = g->outputs[j];
    test_bounded r = test_check_bounded(&got[j], &v[node], &bnd[node]);
    CHECK_MSG(r.ratio <= 1, "%s: output %d: |gpu - f64| = %g at [%lld] exceeds its bound %g", what,
              j, r.diff, (long long)r.at, r.bound);
    worst = r.ratio > worst ? r.ratio : worst;
  }
  if (pr) check_plans(pr, op, n, len, out, what);
  cm_program_free(pr);
  free_tensors(got, g->n_outputs);
  free_tensors(t, nn);
  free_tensors(v, nn);
  free_tensors(bnd, nn);
  free(src);
  cm_graph_free(g);
  return worst;
}

static void run_lengths(const int64_t *lens, int n_lens) {
  static const int64_t rows[] = {3, 13};
  for (int op = 0; op < N_OPS; op++) {
    if (!test_case_wanted(op_name[op])) continue;
    double worst = 0;
    int ran = 0;
    for (int i = 0; i < n_lens; i++)
      for (int o = 0; o < 2; o++) {
        double w = run_rows((row_op)op, rows[(i + o) % 2], lens[i], o ? CM_BF16 : CM_F32);
        ran += w >= 0;
        worst = w > worst ? w : worst;
      }
    CHECK_MSG(ran == 2 * n_lens, "%s: %d of %d ran", op_name[op], ran, 2 * n_lens);
    fprintf(stderr, "  %s: %d graphs, worst |gpu - f64| / bound %.3g\n", op_name[op], ran, worst);
  }
}

/* CI: one graph per op, rows a warp or a block takes, f32 and bf16 outputs. */
static void test_rows_emulated(void) {
  static const struct {
    row_op op;
    int64_t n, len;
    cm_dtype out;
  } cases[] = {{OP_LN, 13, 197, CM_BF16},
               {OP_SOFTMAX, 3, 1000, CM_F32},
               {OP_LOG_SOFTMAX, 5, 3000, CM_BF16},
               {OP_BN, 7, 65, CM_F32}};
  for (int i = 0; i < 4; i++)
    if (test_case_wanted(op_name[cases[i].op])) {
      double w = run_rows(cases[i].op, cases[i].n, cases[i].len, cases[i].out);
      CHECK(w >= 0);
      fprintf(stderr, "  %s %lld x %lld %s: worst |gpu - f64| / bound %.3g\n", op_name[cases[i].op],
              (long long)cases[i].n, (long long)cases[i].len, cm_dtype_name(cases[i].out), w);
    }
}

/* Every length of the issue (long). */
static void test_rows_emulated_all(void) {
  static const int64_t lens[] = {1, 7, 65, 192, 197, 768, 1000, 3000};
  run_lengths(lens, 8);
}

/* ---- the training steps' launches ---------------------------------------------------- */

/* A variant's training step (batch 2; bf16: after autocast) lowered and rendered for sm_90. */
static cm_program *step_program(const char *path, bool bf16) {
  cm_err err = {0};
  cm_graph *step = test_build_step(path, NULL, 0, 2, NULL, NULL, NULL);
  int rewritten = 0;
  if (step && bf16)
    CHECK_MSG(cm_autocast(&step, CM_BF16, &rewritten, &err) == CM_OK && rewritten > 0, "%s: %s",
              path, err.msg);
  cm_target t;
  CHECK(cm_target_cuda("sm_90", &t, &err) == CM_OK);
  cm_compile_opts co = {.compile_only = true, .render_only = true};
  cm_program *pr = NULL;
  if (step) CHECK_MSG(cm_compile(step, &t, &co, &pr, &err) == CM_OK, "%s: %s", path, err.msg);
  cm_graph_free(step);
  return pr;
}

/* Launches per step with and without row spans (a span of S stages was S launches), and every
 * LayerNorm/softmax kernel's statistics and their readers in one launch. */
static void test_step_launches(void) {
  static const char *const variants[] = {"models/cmae_vit_base.json",
                                         "models/cmae_vit_tiny_fmnist.json"};
  static const char *const cases[] = {"cmae_vit_base", "cmae_vit_tiny_fmnist"};
  for (int c = 0; c < 4; c++) {
    int v = c / 2;
    bool bf16 = c % 2;
    if (!test_case_wanted(cases[v])) continue;
    cm_program *pr = step_program(variants[v], bf16);
    if (!pr) continue;
    const cm_kprogram *kp = cm_program_kernels(pr);
    int after = 0, before = 0, spans = 0, row_kernels = 0;
    for (int i = 0; i < kp->n_kernels; i++) {
      const cm_kernel *k = &kp->kernels[i];
      after += launches(k);
      before += launches(k);
      for (int s = 0; s < k->n_stages; s++)
        if (k->stages[s].cuda.kind == CM_KCUDA_ROWS) {
          spans++;
          before += k->stages[s].cuda.rows.span - 1;
        }
      int read_stats = 0;
      check_one_launch(k, row_statistic_fn, NULL, variants[v], &read_stats);
      row_kernels += read_stats > 0;
    }
    CHECK_MSG(spans > 0 && after < before && row_kernels > 0,
              "%s: %d row spans, launches %d -> %d, %d LayerNorm/softmax kernels", variants[v],
              spans, before, after, row_kernels);
    fprintf(stderr,
            "  %s (batch 2, %s): %d launches per step without row spans, %d with (%d spans); %d "
            "LayerNorm/softmax kernels, each one launch\n",
            variants[v], bf16 ? "bf16 autocast" : "f32", before, after, spans, row_kernels);
    cm_program_free(pr);
  }
}

/* ---- NVRTC ---------------------------------------------------------------------------- */

/* The row functions of op's programs at len 768 (a warp per row, f32; a LayerNorm row slice of 24
 * registers) and 3000 (a block per row, bf16 outputs) compiled for sm_80 and sm_90: none spills. */
static void test_rows_through_nvrtc(void) {
  cm_nvrtc *nv = NULL;
  cm_err err = {0};
  if (cm_nvrtc_load(&nv, &err) != CM_OK) {
    fprintf(stderr, "NVRTC absent (%s): the row functions were not compiled\n", err.msg);
    exit(77);
  }
  static const char *const archs[] = {"sm_80", "sm_90"};
  int functions = 0;
  for (int a = 0; a < 2; a++) {
    cm_target t;
    CHECK(cm_target_cuda(archs[a], &t, &err) == CM_OK);
    for (int op = 0; op < N_OPS; op++)
      for (int big = 0; big < 2; big++) {
        cm_graph *g = row_graph((row_op)op, big ? 5 : 13, big ? 3000 : 768, big ? CM_BF16 : CM_F32);
        cm_compile_opts co = {.compile_only = true, .render_only = true};
        cm_program *pr = NULL;
        CHECK_MSG(cm_compile(g, &t, &co, &pr, &err) == CM_OK, "%s", err.msg);
        const cm_kprogram *kp = pr ? cm_program_kernels(pr) : &(cm_kprogram){0};
        cm_cuda_render_opts ro = {&t, false};
        for (int i = 0; i < kp->n_kernels; i++) {
          const cm_kernel *k = &kp->kernels[i];
          int first = -1;
          for (int s = 0; s < k->n_stages && first < 0; s++)
            if (k->stages[s].cuda.kind == CM_KCUDA_ROWS) first = s;
          if (first < 0) continue;
          char *src = NULL, fn[96];
          CHECK_MSG(cm_render_cuda(k, &ro, true, &src, &err) == CM_OK, "%s", err.msg);
          cm_cubin cb;
          memset(&cb, 0, sizeof cb);
          cm_status st =
              src ? cm_nvrtc_compile(nv, src, k->name, archs[a], NULL, 0, &cb, &err) : CM_EINVALID;
          CHECK_MSG(st == CM_OK, "%s %s %s: %s", op_name[op], k->name, archs[a], err.msg);
          for (int s = 0; s < k->n_stages && st == CM_OK; s++) {
            if (k->stages[s].cuda.kind != CM_KCUDA_ROWS) continue;
            snprintf(fn, sizeof fn, "%s_s%d", k->name, s);
            const cm_cuda_kernel_info *ki = cm_cubin_kernel(&cb, fn);
            CHECK_MSG(ki && ki->spill_store_bytes == 0 && ki->spill_load_bytes == 0,
                      "%s %s for %s: %d bytes spilled", op_name[op], fn, archs[a],
                      ki ? ki->spill_store_bytes : -1);
            functions++;
          }
          cm_cubin_free(&cb);
          free(src);
        }
        cm_program_free(pr);
        cm_graph_free(g);
      }
  }
  CHECK(functions >= 2 * 2 * N_OPS);
  fprintf(stderr, "  %d row functions through NVRTC %s, none spills\n", functions,
          cm_nvrtc_version(nv));
  cm_nvrtc_unload(nv);
}

/* ---- a plan the renderer refuses --------------------------------------------------- */

/* A row span's plan changed into one the renderer cannot follow: an error naming the kernel,
 * the stage and the rule, never a rendering. */
static void test_plan_errors(void) {
  cm_graph *g = row_graph(OP_LN, 13, 197, CM_F32);
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
  cm_compile_opts co = {.compile_only = true, .render_only = true};
  cm_program *pr = NULL;
  CHECK_MSG(cm_compile(g, &t, &co, &pr, &err) == CM_OK, "%s", err.msg);
  const cm_kprogram *kp = pr ? cm_program_kernels(pr) : &(cm_kprogram){0};
  int tried = 0;
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    for (int s = 0; s < k->n_stages; s++) {
      if (k->stages[s].cuda.kind != CM_KCUDA_ROWS) continue;
      cm_kernel bad = *k;
      bad.stages = malloc(sizeof *bad.stages * (size_t)k->n_stages);
      cm_kcuda_rows *r = &bad.stages[s].cuda.rows;
      for (int c = 0; c < 3; c++) {
        memcpy(bad.stages, k->stages, sizeof *bad.stages * (size_t)k->n_stages);
        if (c == 0) r->threads = 48;
        if (c == 1) r->stage[1] = (short)k->n_stages;
        if (c == 2) r->n_row_vars[0] = (signed char)(k->stages[s].n_dom + 1);
        cm_cuda_render_opts ro = {&t, false};
        char *src = NULL;
        cm_err e = {0};
        CHECK_MSG(cm_render_cuda(&bad, &ro, false, &src, &e) == CM_EINVALID &&
                      strstr(e.msg, "row span's plan") && strstr(e.msg, k->name),
                  "case %d: %s", c, e.msg);
        free(src);
        tried++;
      }
      free(bad.stages);
    }
  }
  CHECK(tried >= 3);
  cm_program_free(pr);
  cm_graph_free(g);
}

TEST_MAIN({"test_plan_errors", test_plan_errors}, {"test_rows_emulated", test_rows_emulated},
          {"test_rows_emulated_all", test_rows_emulated_all},
          {"test_step_launches", test_step_launches},
          {"test_rows_through_nvrtc", test_rows_through_nvrtc})
