/* tests/unit/test_flash_bwd_span.c — the recomputed attention backward (issue 16 item 3, the
 * flash-backward contract of docs/passes.md "Flash backward"): a backward that reads only Q, K,
 * V, dO and the row statistics m, z, D and recomputes S' = Q Kᵀ, E' = exp(S' c − m),
 * P' = E' / z from them. Built here as the graph the rewrite emits (f32, and bf16 through the
 * autocast pass) in ONE attention group, it must lower to one CM_KT_ATTENTION_BWD span over every
 * stage with the roles of cm_kattn (two GEMM tiles S' and dP, elementwise tiles, GEMM_KEYS dV and
 * dK, GEMM_ROWS dQ, no row reduction over the keys), stream over key blocks when asked (one pass)
 * and keep no N×N value in memory beyond a per-thread tile; it runs on the CPU (whole rows and
 * streaming) and on the emulated CUDA device (f32: the scalar streaming function) at odd shapes,
 * every output within the oracle's error bound (the group is the whole graph, so the end-to-end
 * bound is the kernel's). */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "passes/passes.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {0xf1a5b0d5u};

typedef struct bwd_shape {
  int64_t bh, tokens, dim;
  bool bf16;
} bwd_shape;

/* The backward of y = softmax(q kᵀ c) v for dO as the flash_backward pass writes it: the
 * forward's row max m and row sum z and D = rowsum(dO ∘ O) are inputs ([bh, N, 1]). */
static cm_graph *recomputed_bwd_graph(bwd_shape sh) {
  cm_graph *g = cm_graph_new();
  int64_t d[3] = {sh.bh, sh.tokens, sh.dim}, r[3] = {sh.bh, sh.tokens, 1};
  int q = cm_input(g, "q", CM_F32, 3, d), k = cm_input(g, "k", CM_F32, 3, d);
  int v = cm_input(g, "v", CM_F32, 3, d), dout = cm_input(g, "dO", CM_F32, 3, d);
  int m = cm_input(g, "m", CM_F32, 3, r), z = cm_input(g, "z", CM_F32, 3, r);
  int dd = cm_input(g, "D", CM_F32, 3, r);
  int c = cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)sh.dim));
  int s = cm_binary_bcast(g, CM_OP_MUL, cm_matmul(g, q, k, false, true, "s"), c, "sc");
  int e = cm_unary(g, CM_OP_EXP, cm_binary_bcast(g, CM_OP_SUB, s, m, NULL), "e");
  int p = cm_binary_bcast(g, CM_OP_DIV, e, z, "p");
  int dp = cm_matmul(g, dout, v, false, true, "dP");
  int ndz = cm_unary(g, CM_OP_NEG, cm_binary(g, CM_OP_DIV, dd, z, NULL), "ndz");
  int de = cm_binary_bcast(g, CM_OP_ADD, cm_binary_bcast(g, CM_OP_DIV, dp, z, NULL), ndz, "dE");
  int ds = cm_binary_bcast(g, CM_OP_MUL, cm_binary(g, CM_OP_MUL, de, e, NULL), c, "dS");
  int dv = cm_matmul(g, p, dout, true, false, "dV");
  int dq = cm_matmul(g, ds, k, false, false, "dQ");
  int dk = cm_matmul(g, ds, q, true, false, "dK");
  cm_err err = {0};
  CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
  CHECK(cm_graph_add_output(g, dq, &err) == CM_OK);
  CHECK(cm_graph_add_output(g, dk, &err) == CM_OK);
  CHECK(cm_graph_add_output(g, dv, &err) == CM_OK);
  if (sh.bf16) CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  return g;
}

/* The plan of the rewrite's fusion: every node in one attention group, then schedule and
 * memplan. */
static cm_plan *one_group_plan(cm_graph **g) {
  cm_err err = {0};
  cm_plan *p = NULL;
  CHECK_MSG(cm_plan_unfused(*g, &p, &err) == CM_OK, "%s", err.msg);
  if (!p) return NULL;
  cm_group *g0 = &p->groups[0];
  int n = 0;
  for (int v = 0; v < (*g)->n_nodes; v++)
    if (p->group_of[v] >= 0) p->group_of[v] = 0, n++;
  for (int gi = 1; gi < p->n_groups; gi++) {
    free(p->groups[gi].nodes), free(p->groups[gi].inputs), free(p->groups[gi].outputs);
    memset(&p->groups[gi], 0, sizeof p->groups[gi]);
  }
  free(g0->nodes), free(g0->inputs), free(g0->outputs);
  g0->kind = CM_GROUP_ATTENTION;
  g0->nodes = malloc(sizeof(int) * (size_t)n);
  g0->inputs = malloc(sizeof(int) * (size_t)(*g)->n_nodes);
  g0->outputs = malloc(sizeof(int) * (size_t)(*g)->n_outputs);
  g0->n_nodes = g0->n_inputs = 0;
  for (int v = 0; v < (*g)->n_nodes; v++)
    if (p->group_of[v] == 0)
      g0->nodes[g0->n_nodes++] = v;
    else if ((*g)->nodes[v].op == CM_OP_INPUT)
      g0->inputs[g0->n_inputs++] = v;
  g0->n_outputs = (*g)->n_outputs;
  memcpy(g0->outputs, (*g)->outputs, sizeof(int) * (size_t)(*g)->n_outputs);
  p->n_groups = 1;
  cm_pass_state s = {*g, p};
  CHECK_MSG(cm_pass_schedule(&s, NULL, &err) == CM_OK, "schedule: %s", err.msg);
  CHECK_MSG(cm_pass_memplan(&s, NULL, &err) == CM_OK, "memplan: %s", err.msg);
  CHECK_MSG(cm_plan_verify(s.g, s.plan, &err) == CM_OK, "%s", err.msg);
  *g = s.g;
  return s.plan;
}

/* The bwd span of kernel k: its first stage (-1: none), after checking the span and its roles:
 * one span over every stage (but an output copy), two GEMM tiles (S', dP), no row reduction, dV
 * and dK over the keys, dQ over the rows; stream_check when it streams. */
static int check_span(const cm_kernel *k, const char *what) {
  cm_err err = {0};
  int first = -1, spans = 0;
  for (int si = 0; si < k->n_stages; si++)
    if (k->stages[si].tmpl == CM_KT_ATTENTION_BWD) first = si, spans++;
  CHECK_MSG(spans == 1 && first == 0, "%s: %d backward spans, first at %d", what, spans, first);
  if (first != 0) return -1;
  const cm_kattn *a = &k->stages[0].attn;
  /* after the span at most the group's output copy (a training step's dQ, dK, dV reshaped into
   * the heads' layout: elementwise, reading no local) */
  bool copies = true;
  for (int si = a->span; si < k->n_stages; si++) copies &= k->stages[si].n_red == 0;
  CHECK_MSG(a->span >= 7 && a->span <= k->n_stages && k->n_stages - a->span <= 1 && copies,
            "%s: the span has %d of %d stages", what, a->span, k->n_stages);
  CHECK_MSG(cm_kattn_check(k, 0, &err) == CM_OK, "%s: %s", what, err.msg);
  if (!a->stream) return first;
  CHECK_MSG(cm_kattn_stream_check(k, 0, &err) == CM_OK, "%s: %s", what, err.msg);
  int n[6] = {0};
  for (int r = 0; r < a->span; r++)
    if (a->role[r] >= 0 && a->role[r] < 6) n[(int)a->role[r]]++;
  CHECK_MSG(a->role[0] == CM_KATTN_ROLE_TILE && n[CM_KATTN_ROLE_GEMM_TILE] == 1 &&
                n[CM_KATTN_ROLE_ROWRED] == 0 && n[CM_KATTN_ROLE_GEMM_KEYS] == 2 &&
                n[CM_KATTN_ROLE_GEMM_ROWS] == 1 && n[0] == 0,
            "%s: roles tile %d gemm_tile %d rowred %d keys %d rows %d none %d", what,
            n[CM_KATTN_ROLE_TILE], n[CM_KATTN_ROLE_GEMM_TILE], n[CM_KATTN_ROLE_ROWRED],
            n[CM_KATTN_ROLE_GEMM_KEYS], n[CM_KATTN_ROLE_GEMM_ROWS], n[0]);
  return first;
}

/* No N x N value (a graph node whose last two dims are tokens x tokens) is an arena buffer or
 * any buffer but a local of the span: the recomputed backward keeps every N x N value in
 * per-thread (per-block) tiles. Shapes here have head dims other than the tokens. */
static void check_no_nn_buffer(const cm_graph *g, const cm_kernel *k, int64_t tokens,
                               const char *what) {
  const cm_kattn *a = &k->stages[0].attn;
  for (int b = 0; b < k->n_buffers; b++) {
    int v = k->buffers[b].node;
    if (v < 0 || tokens < 2) continue;
    const cm_type *t = &g->nodes[v].type;
    if (t->rank < 2 || t->dims[t->rank - 1] != tokens || t->dims[t->rank - 2] != tokens) continue;
    bool local = false;
    for (int i = 0; i < a->n_local; i++) local |= a->local[i] == b;
    CHECK_MSG(k->buffers[b].kind != CM_KBUF_ARENA && local, "%s: buffer b%d (node %s, N x N) is %s",
              what, b, g->nodes[v].name, local ? "an arena buffer" : "not a span local");
  }
}

typedef struct run_result {
  double worst; /* |result - f64| / bound, the largest over the outputs */
  int streamed; /* kernels whose span streams */
} run_result;

/* Compiles g with plan p for target t (NULL: the CPU) and runs it on random inputs; every
 * output within the oracle's bound. */
static run_result run_checked(const cm_graph *g, const cm_plan *p, const cm_target *t, int bc,
                              const char *what) {
  run_result res = {-1, 0};
  int nn = g->n_nodes;
  cm_tensor *src = calloc((size_t)nn, sizeof *src), *v = calloc((size_t)nn, sizeof *v);
  cm_tensor *bnd = calloc((size_t)nn, sizeof *bnd),
            *got = calloc((size_t)g->n_outputs, sizeof *got);
  const cm_tensor **ptr = calloc((size_t)nn, sizeof *ptr);
  for (int i = 0; i < nn; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT) continue;
    CHECK(cm_tensor_alloc(&src[i], n->type, NULL) == CM_OK);
    /* q spread wider so the softmax is far from uniform; z a positive row sum */
    bool pos = !strcmp(n->name, "z");
    double w = !strcmp(n->name, "q") ? 3.0 : 1.0;
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++) {
      double u = test_uniform(&rng);
      cm_tensor_set_f64(&src[i], e, pos ? 1 + 4 * u : w * (2 * u - 1));
    }
    ptr[i] = &src[i];
  }
  cm_err err = {0};
  CHECK_MSG(cm_eval_bounded(g, ptr, v, bnd, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_compile_opts co = {.threads = 2, .cache_dir = "", .plan = p, .attn_bc = bc};
  cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_OFF, 0};
  if (t) co.backend_opts = &bo, co.cache_dir = test_module_cache("test_flash_bwd_span");
  cm_program *pr = NULL;
  cm_status st = cm_compile(g, t, &co, &pr, &err);
  if (st == CM_OK) st = cm_program_run(pr, (cm_tensor *const *)ptr, got, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  for (int j = 0; st == CM_OK && j < g->n_outputs; j++) {
    int node = g->outputs[j];
    test_bounded r = test_check_bounded(&got[j], &v[node], &bnd[node]);
    CHECK_MSG(r.ratio <= 1, "%s: output %s: |got - f64| = %g at [%lld] exceeds its bound %g", what,
              g->nodes[node].name, r.diff, (long long)r.at, r.bound);
    res.worst = r.ratio > res.worst ? r.ratio : res.worst;
  }
  for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&got[j]);
  for (int i = 0; i < nn; i++)
    cm_tensor_free(&src[i]), cm_tensor_free(&v[i]), cm_tensor_free(&bnd[i]);
  cm_program_free(pr);
  free(src), free(v), free(bnd), free(got), free(ptr);
  return res;
}

static const bwd_shape shapes[] = {
    {3, 1, 32, false}, {3, 17, 32, false}, {3, 65, 64, false}, {3, 197, 64, false},
    {3, 1, 32, true},  {3, 17, 64, true},  {3, 65, 32, true},  {3, 197, 64, true},
};

/* The test case of a shape: "small" (CI), "large" (the 197-token decoder's: long). */
static const char *shape_case(bwd_shape sh) {
  return sh.tokens > 100 ? "large" : "small";
}

/* Lowers the one-group plan for target t with key block bc; checks its span; returns whether it
 * streams. */
static bool lower_checked(const cm_graph *g, const cm_plan *p, const cm_target *t, int bc,
                          bwd_shape sh, const char *what) {
  cm_lower_opts lo = {t, false, bc};
  cm_kprogram kp;
  cm_err err = {0};
  bool stream = false;
  CHECK_MSG(cm_lower_plan(g, p, &lo, &kp, &err) == CM_OK, "%s: %s", what, err.msg);
  CHECK_MSG(kp.n_kernels == 1, "%s: %d kernels", what, kp.n_kernels);
  if (kp.n_kernels == 1 && check_span(&kp.kernels[0], what) == 0) {
    stream = kp.kernels[0].stages[0].attn.stream;
    check_no_nn_buffer(g, &kp.kernels[0], sh.tokens, what);
    const cm_kernel *k = &kp.kernels[0];
    if (t && stream) {
      /* f32: the scalar streaming function; bf16: a fused function of its own (the scalar one,
       * or the tensor-core flash backward where the renderer has it) */
      cm_kcuda_kind kind = k->stages[0].cuda.kind;
      if (sh.bf16)
        CHECK_MSG(kind != CM_KCUDA_NONE && kind != CM_KCUDA_GENERIC && kind != CM_KCUDA_GEMM &&
                      kind != CM_KCUDA_ATTN_FUSED,
                  "%s: CUDA plan kind %d", what, (int)kind);
      else
        CHECK_MSG(kind == CM_KCUDA_ATTN_STREAM_BWD, "%s: CUDA plan kind %d", what, (int)kind);
      for (int si = 1; si < k->n_stages; si++)
        CHECK_MSG(k->stages[si].cuda.kind == CM_KCUDA_IN_SPAN, "%s: stage %d not in the span", what,
                  si);
    }
    if (getenv("FB_DUMP") && t) {
      char *src = NULL;
      CHECK(cm_render_cuda(&kp.kernels[0], NULL, false, &src, &err) == CM_OK);
      for (int si = 0; si < kp.kernels[0].n_stages; si++)
        cm_kcuda_plan_print(&kp.kernels[0].stages[si].cuda, stderr);
      fprintf(stderr, "%s\n", src ? src : "");
      free(src);
    }
  }
  cm_kprogram_free(&kp);
  return stream;
}

/* The CPU: whole rows (the lowering's choice at these sizes) and streaming over key blocks of
 * 16 (one pass), every output within the oracle's bound. */
static void test_cpu(void) {
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    bwd_shape sh = shapes[i];
    if (!test_case_wanted(shape_case(sh))) continue;
    cm_graph *g = recomputed_bwd_graph(sh);
    cm_plan *p = one_group_plan(&g);
    /* whole rows (the lowering's choice up to 65 tokens) up to 17 tokens; streaming from 17
     * tokens: key blocks of 16, or the lowering's own choice at 197 tokens */
    int bcs[2], n_bc = 0;
    if (sh.tokens <= 17) bcs[n_bc++] = 0;
    if (sh.tokens >= 17) bcs[n_bc++] = sh.tokens > 100 ? 0 : 16;
    for (int b = 0; b < n_bc; b++) {
      int bc = bcs[b];
      char what[128];
      snprintf(what, sizeof what, "cpu bh=%lld N=%lld d=%lld %s bc=%d", (long long)sh.bh,
               (long long)sh.tokens, (long long)sh.dim, sh.bf16 ? "bf16" : "f32", bc);
      bool stream = lower_checked(g, p, NULL, bc, sh, what);
      if (sh.tokens >= 17 && (bc > 0 || sh.tokens > 100))
        CHECK_MSG(stream, "%s: not streaming", what);
      run_result r = run_checked(g, p, NULL, bc, what);
      printf("  %-48s %s err / bound %.2g\n", what, stream ? "streaming" : "whole rows", r.worst);
    }
    cm_plan_free(p);
    cm_graph_free(g);
  }
}

static cm_target device_target(void) {
  const cm_cuda_driver *d = emu_driver();
  cm_target t;
  memset(&t, 0, sizeof t);
  int dev = 0, major = 0, minor = 0;
  CHECK(d->init(0) == 0 && d->device_get(&dev, 0) == 0);
  CHECK(d->device_get_attribute(&major, CM_CU_ATTR_CC_MAJOR, dev) == 0);
  CHECK(d->device_get_attribute(&minor, CM_CU_ATTR_CC_MINOR, dev) == 0);
  char arch[16];
  cm_cuda_arch_for(major, minor, arch, sizeof arch);
  cm_err err = {0};
  CHECK_MSG(cm_target_cuda(arch, &t, &err) == CM_OK, "%s", err.msg);
  /* the opt-in shared memory the device reports (the emulated sm_80 grants 99 KiB, not 163) */
  int optin = 0;
  CHECK(d->device_get_attribute(&optin, CM_CU_ATTR_MAX_SHARED_PER_BLOCK_OPTIN, dev) == 0);
  if (optin > 0 && optin < t.shared_bytes_max) t.shared_bytes_max = optin;
  return t;
}

/* The emulated CUDA device: the span streams (key blocks of at most 64, one pass) and renders as
 * the scalar streaming function (f32 arithmetic; bf16 tiles kept in their dtype), every output
 * within the oracle's bound. */
static void test_emulated(void) {
  cm_target t = device_target();
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    bwd_shape sh = shapes[i];
    if (!test_case_wanted(shape_case(sh))) continue;
    char what[128];
    snprintf(what, sizeof what, "emulated bh=%lld N=%lld d=%lld %s", (long long)sh.bh,
             (long long)sh.tokens, (long long)sh.dim, sh.bf16 ? "bf16" : "f32");
    cm_graph *g = recomputed_bwd_graph(sh);
    cm_plan *p = one_group_plan(&g);
    bool stream = lower_checked(g, p, &t, 0, sh, what);
    if (sh.tokens > 1) CHECK_MSG(stream, "%s: not streaming", what);
    run_result r = run_checked(g, p, &t, 0, what);
    printf("  %-48s %s err / bound %.2g\n", what, stream ? "streaming" : "whole rows", r.worst);
    cm_plan_free(p);
    cm_graph_free(g);
  }
}

/* The 197-token span (head dim 64, f32 and bf16) for sm_80 and sm_90 through NVRTC: it compiles
 * (dynamic shared memory in f32), with no spills. */
static void test_nvrtc(void) {
  cm_nvrtc *nv = NULL;
  cm_err err = {0};
  if (cm_nvrtc_load(&nv, &err) != CM_OK) {
    fprintf(stderr, "NVRTC absent (%s): the span functions were not compiled\n", err.msg);
    exit(77);
  }
  static const char *const archs[] = {"sm_80", "sm_90"};
  int functions = 0;
  for (int ai = 0; ai < 2; ai++)
    for (int low = 0; low < 2; low++) {
      cm_target t;
      CHECK(cm_target_cuda(archs[ai], &t, &err) == CM_OK);
      bwd_shape sh = {3, 197, 64, low == 1};
      cm_graph *g = recomputed_bwd_graph(sh);
      cm_plan *p = one_group_plan(&g);
      cm_lower_opts lo = {&t, false, 0};
      cm_kprogram kp;
      CHECK_MSG(cm_lower_plan(g, p, &lo, &kp, &err) == CM_OK, "%s", err.msg);
      cm_cuda_render_opts ro = {&t, false};
      for (int i = 0; i < kp.n_kernels; i++) {
        const cm_kernel *k = &kp.kernels[i];
        char *src = NULL, fn[96];
        CHECK_MSG(cm_render_cuda(k, &ro, true, &src, &err) == CM_OK, "%s", err.msg);
        cm_cubin cb;
        memset(&cb, 0, sizeof cb);
        cm_status st =
            src ? cm_nvrtc_compile(nv, src, k->name, archs[ai], NULL, 0, &cb, &err) : CM_EINVALID;
        CHECK_MSG(st == CM_OK, "%s %s: %s", k->name, archs[ai], err.msg);
        snprintf(fn, sizeof fn, "%s_s0", k->name);
        const cm_cuda_kernel_info *ki = st == CM_OK ? cm_cubin_kernel(&cb, fn) : NULL;
        CHECK_MSG(ki && ki->spill_store_bytes == 0 && ki->spill_load_bytes == 0,
                  "%s %s %s: %d bytes spilled", fn, low ? "bf16" : "f32", archs[ai],
                  ki ? ki->spill_store_bytes : -1);
        if (ki)
          fprintf(stderr, "  %s %s %s: %d registers, shared %u+%u\n", fn, low ? "bf16" : "f32",
                  archs[ai], ki->registers, (unsigned)k->stages[0].cuda.shared_static,
                  k->stages[0].cuda.shared_dynamic);
        functions += ki != NULL;
        cm_cubin_free(&cb);
        free(src);
      }
      cm_kprogram_free(&kp);
      cm_plan_free(p);
      cm_graph_free(g);
    }
  CHECK(functions == 4);
  cm_nvrtc_unload(nv);
}

/* ---- autodiff's own form: two passes ------------------------------------------------------ */

/* y = softmax(q kᵀ c) v and its backward by autodiff (sum(y ∘ dO)), with the N x N values the
 * forward keeps and autodiff's row sum over the keys, as the pipeline leaves them without the
 * flash_backward pass. */
static cm_graph *autodiff_graph(bwd_shape sh) {
  cm_graph *g = cm_graph_new();
  int64_t d[3] = {sh.bh, sh.tokens, sh.dim};
  int q = cm_input(g, "q", CM_F32, 3, d), k = cm_input(g, "k", CM_F32, 3, d);
  int v = cm_input(g, "v", CM_F32, 3, d), dout = cm_input(g, "dO", CM_F32, 3, d);
  int s = cm_binary_bcast(g, CM_OP_MUL, cm_matmul(g, q, k, false, true, "s"),
                          cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)sh.dim)), "sc");
  int y = cm_matmul(g, cm_nn_softmax(g, s), v, false, false, "y");
  int axes[3] = {0, 1, 2}, wrt[3] = {q, k, v}, grads[3];
  int loss =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 3, axes, false, "l");
  cm_err err = {0};
  CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
  if (sh.bf16) CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  return g;
}

/* Without the flash_backward pass the backward span keeps autodiff's row sum over the keys: at
 * key blocks of 16 over 33 keys it streams in two passes (a ROWRED role), on the CPU (f32 and
 * bf16) and on the emulated device (f32), every output within the oracle's bound. */
static void test_two_pass(void) {
  cm_target t = device_target();
  for (int low = 0; low < 2; low++)
    for (int dev = 0; dev < 2; dev++) {
      if (low && dev) continue; /* bf16 on CUDA: the flash backward's, tested there */
      bwd_shape sh = {3, 33, 32, low == 1};
      char what[128];
      snprintf(what, sizeof what, "two passes %s %s", low ? "bf16" : "f32",
               dev ? "emulated" : "cpu");
      cm_graph *g = autodiff_graph(sh);
      cm_err err = {0};
      cm_pass_state ps = {g, NULL};
      CHECK_MSG(cm_pipeline_run(&ps, "simplify,cse,dce,fuse,schedule,memplan", NULL, NULL, 0, NULL,
                                &err) == CM_OK,
                "%s: %s", what, err.msg);
      cm_lower_opts lo = {dev ? &t : NULL, false, 16};
      cm_kprogram kp;
      CHECK_MSG(cm_lower_plan(ps.g, ps.plan, &lo, &kp, &err) == CM_OK, "%s: %s", what, err.msg);
      int two_pass = 0;
      for (int i = 0; i < kp.n_kernels; i++) {
        const cm_kstage *s0 = &kp.kernels[i].stages[0];
        if (s0->tmpl != CM_KT_ATTENTION_BWD || !s0->attn.stream) continue;
        CHECK_MSG(cm_kattn_stream_check(&kp.kernels[i], 0, &err) == CM_OK, "%s: %s", what, err.msg);
        bool rowred = false;
        for (int r = 0; r < s0->attn.span; r++) rowred |= s0->attn.role[r] == CM_KATTN_ROLE_ROWRED;
        two_pass += rowred;
        if (dev) CHECK(s0->cuda.kind == CM_KCUDA_ATTN_STREAM_BWD);
      }
      CHECK_MSG(two_pass == 1, "%s: %d two-pass streaming backward spans", what, two_pass);
      cm_kprogram_free(&kp);
      run_result r = run_checked(ps.g, ps.plan, dev ? &t : NULL, 16, what);
      printf("  %-48s err / bound %.2g\n", what, r.worst);
      cm_plan_free(ps.plan);
      cm_graph_free(ps.g);
    }
}

/* ---- every shipped variant's training step ---------------------------------------------- */

static const char *const variants[] = {
    "cmae_vit_tiny_fmnist", "cmae_convvit_tiny_fmnist", "cmae_vit_small", "cmae_vit_base",
    "mae_vit_base",         "cmae_convvit_base",        "cmae_vit_large"};

/* Whether group gi of plan p is an attention backward: an attention group without a row max
 * (the forward's softmax has one). */
static bool is_backward_attention(const cm_graph *g, const cm_plan *p, int gi) {
  const cm_group *gr = &p->groups[gi];
  if (gr->kind != CM_GROUP_ATTENTION) return false;
  for (int i = 0; i < gr->n_nodes; i++)
    if (g->nodes[gr->nodes[i]].op == CM_OP_REDUCE_MAX) return false;
  return true;
}

typedef struct variant_count {
  int groups, spans, streaming; /* backward attention groups; their one-span kernels; streaming */
} variant_count;

/* The step lowered for target t (NULL: the CPU): every backward attention group is one kernel
 * that is one CM_KT_ATTENTION_BWD span with the recomputed form's roles (check_span; CUDA: it
 * streams, as the scalar function in f32 or on tensor cores in bf16), and no attention kernel,
 * forward or backward, keeps an N x N value in memory beyond its span's locals. */
static variant_count check_variant(const cm_graph *g, const cm_plan *p, const cm_target *t,
                                   bool bf16, const char *what) {
  variant_count n = {0, 0, 0};
  cm_lower_opts lo = {t, false, 0};
  cm_kprogram kp;
  cm_err err = {0};
  CHECK_MSG(cm_lower_plan(g, p, &lo, &kp, &err) == CM_OK, "%s: %s", what, err.msg);
  for (int i = 0; i < kp.n_kernels; i++) {
    const cm_kernel *k = &kp.kernels[i];
    if (k->group < 0 || p->groups[k->group].kind != CM_GROUP_ATTENTION || k->n_stages == 0)
      continue;
    const cm_kstage *s0 = &k->stages[0];
    if (s0->tmpl == CM_KT_ATTENTION_FWD || s0->tmpl == CM_KT_ATTENTION_BWD)
      check_no_nn_buffer(g, k, s0->attn.rows, what);
    if (!is_backward_attention(g, p, k->group)) continue;
    n.groups++;
    char kw[160];
    snprintf(kw, sizeof kw, "%s %s", what, k->name);
    if (check_span(k, kw) != 0) continue;
    n.spans++;
    n.streaming += s0->attn.stream;
    if (!t) continue;
    cm_kcuda_kind kind = s0->cuda.kind;
    CHECK_MSG(s0->attn.stream &&
                  (bf16 ? kind == CM_KCUDA_ATTN_FLASH_BWD : kind == CM_KCUDA_ATTN_STREAM_BWD),
              "%s: stream %d, CUDA plan kind %d", kw, (int)s0->attn.stream, (int)kind);
  }
  cm_kprogram_free(&kp);
  return n;
}

/* Every shipped variant's training step (batch 2), f32 and after autocast (bf16), through the
 * default pipeline (flash_backward, fuse): lowered for the CPU and for sm_80, every backward
 * attention group one span with the new roles, counted per variant. */
static void test_variants(void) {
  for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
    if (!test_case_wanted(variants[v])) continue;
    char path[128];
    snprintf(path, sizeof path, "models/%s.json", variants[v]);
    cm_model_config cfg;
    cm_err err = {0};
    CHECK_MSG(cm_model_config_load(path, NULL, 0, &cfg, &err) == CM_OK, "%s", err.msg);
    cm_model_build_opts bo = {2, 1, CM_F32};
    cm_model m;
    CHECK_MSG(cm_model_build(&cfg, &bo, &m, &err) == CM_OK, "%s: %s", path, err.msg);
    if (!m.g) continue;
    cm_optim_config oc = test_model_optim();
    cm_graph *step0 = NULL;
    cm_train_step_info info;
    CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step0, &info, &err) == CM_OK, "%s: %s", path,
              err.msg);
    cm_model_free(&m);
    if (!step0) continue;
    for (int bf16 = 0; bf16 < 2; bf16++) {
      cm_graph *step = cm_graph_clone(step0);
      if (bf16) CHECK_MSG(cm_autocast(&step, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
      cm_pass_state ps = {step, NULL};
      cm_status st = cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
      CHECK_MSG(st == CM_OK && ps.plan, "%s: %s", path, err.msg);
      if (st == CM_OK && ps.plan) {
        cm_target t;
        CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
        char what[160];
        snprintf(what, sizeof what, "%s %s cpu", variants[v], bf16 ? "bf16" : "f32");
        variant_count c = check_variant(ps.g, ps.plan, NULL, bf16, what);
        snprintf(what, sizeof what, "%s %s sm_80", variants[v], bf16 ? "bf16" : "f32");
        variant_count u = check_variant(ps.g, ps.plan, &t, bf16, what);
        printf("  %-26s %s: %d backward attention groups; CPU %d spans (%d streaming), sm_80 %d "
               "spans (%d streaming)\n",
               variants[v], bf16 ? "bf16" : "f32 ", c.groups, c.spans, c.streaming, u.spans,
               u.streaming);
        CHECK_MSG(c.groups > 0 && c.spans == c.groups && u.spans == u.groups &&
                      u.streaming == u.groups,
                  "%s: %d groups, CPU %d spans, sm_80 %d spans (%d streaming)", what, c.groups,
                  c.spans, u.spans, u.streaming);
      }
      cm_plan_free(ps.plan);
      cm_graph_free(ps.g);
    }
    cm_graph_free(step0);
  }
}

TEST_MAIN({"test_cpu", test_cpu}, {"test_emulated", test_emulated}, {"test_nvrtc", test_nvrtc},
          {"test_two_pass", test_two_pass}, {"test_variants", test_variants})
