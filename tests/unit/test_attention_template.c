/* The attention templates (CM_KT_ATTENTION_FWD/_BWD): attention graphs built
 * the way models/nn.c builds them (q k^T scaled, max-subtracted softmax, P v),
 * alone and with their backward (autodiff of sum(y * dO)), fused by the
 * default pipeline; the lowering must mark the spans (counted), the fused
 * forward must need less scratch, and the CPU executor (fused LLVM rendering)
 * must agree with the oracle, every output within its forward error bound
 * (cm_eval_bounded, end to end: the graphs are a few ops), over odd shapes (N = 1, 2, 7, 50, 65,
 * 197; head dim 1, 5, 32, 64; heads 1, 3, 4; query blocks not dividing N). Also the verifier's span
 * rules and the printer. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "runtime/runtime.h"

#include <llvm-c/Core.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {20261127};
static double uniform(void) {
  return test_uniform(&rng);
}

typedef struct shape {
  int64_t n, heads, tokens, dim;
} shape;

/* y = softmax(q k^T / sqrt(dim)) v over inputs q, k, v [n, heads, tokens, dim];
 * with backward: loss = sum(y * dO) and the gradients of q, k, v as outputs. */
static cm_graph *attention_graph_ex(shape sh, bool backward, bool keep_p) {
  cm_graph *g = cm_graph_new();
  int64_t d[4] = {sh.n, sh.heads, sh.tokens, sh.dim};
  int q = cm_input(g, "q", CM_F32, 4, d), k = cm_input(g, "k", CM_F32, 4, d);
  int v = cm_input(g, "v", CM_F32, 4, d);
  int s = cm_matmul(g, q, k, false, true, "scores");
  s = cm_binary_bcast(g, CM_OP_MUL, s, cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)sh.dim)),
                      "scaled");
  int p = cm_nn_softmax(g, s);
  int y = cm_matmul(g, p, v, false, false, "y");
  cm_err err = {0};
  CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  if (keep_p) CHECK(cm_graph_add_output(g, p, &err) == CM_OK);
  if (backward) {
    int dout = cm_input(g, "dO", CM_F32, 4, d);
    int axes[4] = {0, 1, 2, 3};
    int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 4, axes,
                         false, "loss");
    int wrt[3] = {q, k, v}, grads[3];
    CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
    for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
  }
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  return g;
}

static cm_graph *attention_graph(shape sh, bool backward) {
  return attention_graph_ex(sh, backward, false);
}

typedef struct span_count {
  int fwd, bwd;
  int64_t scratch_fwd, fused_fwd;  /* over kernels with a forward span */
  int max_blocks;                  /* query blocks per batch item, the most seen */
  int stream;                      /* forward spans marked for streaming */
  bool stream_ir;                  /* their rendering has the key-block loop */
  int64_t stream_ws, whole_row_ws; /* the streaming workspace; the whole-row path's */
  unsigned keep;                   /* roles kept by the streaming spans */
  int stream_bwd;                  /* backward spans marked for streaming */
  bool stream_bwd_ir;              /* their rendering has the two key-block passes */
  int64_t bwd_ws, bwd_whole_ws;    /* the streaming backward workspace; the whole-row path's */
} span_count;

/* Renders k and looks for what in the IR. */
static bool renders_with(const cm_kernel *k, const char *what) {
  LLVMContextRef ctx = LLVMContextCreate();
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("attn", ctx);
  cm_err err = {0};
  cm_llvm_render_opts ro = {0, false, NULL};
  bool found = false;
  if (cm_render_llvm(k, m, &ro, &err) == CM_OK) {
    char *ir = LLVMPrintModuleToString(m);
    found = strstr(ir, what) != NULL;
    LLVMDisposeMessage(ir);
  } else {
    CHECK_MSG(false, "render: %s", err.msg);
  }
  LLVMDisposeModule(m);
  LLVMContextDispose(ctx);
  return found;
}

/* The streaming forward rendering's key-block loop. */
static bool renders_streaming(const cm_kernel *k) {
  return renders_with(k, "fa.kblk");
}

static span_count count_spans_bc(const cm_graph *g, const char *what, int bc);
static span_count count_spans(const cm_graph *g, const char *what) {
  return count_spans_bc(g, what, 0);
}

static span_count count_spans_bc(const cm_graph *g, const char *what, int bc) {
  span_count r = {0};
  cm_err err = {0};
  cm_pass_state s = {cm_graph_clone(g), NULL};
  CHECK_MSG(cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK, "%s: %s",
            what, err.msg);
  cm_lower_opts lo = {NULL, false, bc};
  cm_kprogram kp;
  CHECK_MSG(cm_lower_plan(s.g, s.plan, &lo, &kp, &err) == CM_OK, "%s: %s", what, err.msg);
  for (int i = 0; i < kp.n_kernels; i++) {
    const cm_kernel *k = &kp.kernels[i];
    if (getenv("ATTN_DUMP") && (bc > 0 || !strcmp(getenv("ATTN_DUMP"), "all")) &&
        k->kind == CM_GROUP_ATTENTION)
      cm_kernel_print(k, stderr);
    for (int si = 0; si < k->n_stages; si++) {
      const cm_kstage *st = &k->stages[si];
      if (st->tmpl != CM_KT_ATTENTION_FWD && st->tmpl != CM_KT_ATTENTION_BWD) continue;
      CHECK_MSG(cm_kattn_check(k, si, &err) == CM_OK, "%s: %s", what, err.msg);
      if (st->attn.stream && st->tmpl == CM_KT_ATTENTION_BWD) {
        CHECK(st->attn.bc >= 1 && st->attn.bc < st->dom[st->attn.nb + 1]);
        CHECK(st->attn.ws_bytes ==
              cm_kattn_bwd_stream_workspace(k, si, st->tiles.mr, st->tiles.nr, NULL, NULL, NULL));
        CHECK_MSG(cm_kattn_stream_check(k, si, &err) == CM_OK, "%s: %s", what, err.msg);
        int64_t fixed[4];
        cm_kattn_bwd_stream_workspace(k, si, st->tiles.mr, st->tiles.nr, fixed, NULL, NULL);
        CHECK(!memcmp(fixed, st->attn.bwd_fixed, sizeof fixed));
        r.stream_bwd++;
        r.bwd_ws = st->attn.ws_bytes;
        r.bwd_whole_ws = cm_kattn_workspace(k, si, st->tiles.mr, st->tiles.nr, NULL, NULL);
        r.stream_bwd_ir = renders_with(k, "fb.kblk2");
      } else if (st->attn.stream) {
        CHECK(st->tmpl == CM_KT_ATTENTION_FWD);
        CHECK(st->attn.bc >= 1 && st->attn.bc < st->dom[st->attn.nb + 1]);
        CHECK(st->attn.ws_bytes ==
              cm_kattn_stream_workspace(k, si, st->tiles.mr, st->tiles.nr, NULL));
        int64_t off[8];
        cm_kattn_stream_workspace(k, si, st->tiles.mr, st->tiles.nr, off);
        CHECK(!memcmp(off, st->attn.stream_off, sizeof off));
        r.stream++;
        r.keep |= st->attn.keep;
        r.stream_ws = st->attn.ws_bytes;
        r.whole_row_ws = cm_kattn_workspace(k, si, st->tiles.mr, st->tiles.nr, NULL, NULL);
        r.stream_ir = renders_streaming(k);
      } else {
        CHECK(st->attn.ws_bytes >=
              cm_kattn_workspace(k, si, st->tiles.mr, st->tiles.nr, NULL, NULL));
      }
      CHECK(cm_kstage_workspace_bytes(st, CM_TARGET_CPU) == st->attn.ws_bytes);
      int blocks = (int)((st->attn.rows + st->attn.br - 1) / st->attn.br);
      if (blocks > r.max_blocks) r.max_blocks = blocks;
      if (st->tmpl == CM_KT_ATTENTION_FWD) {
        r.fwd++;
        r.scratch_fwd += k->scratch_bytes;
        r.fused_fwd += cm_kernel_fused_scratch_bytes(k);
      } else {
        r.bwd++;
        CHECK(cm_kernel_fused_scratch_bytes(k) < k->scratch_bytes);
      }
    }
  }
  cm_kprogram_free(&kp);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  return r;
}

/* The executor against the bounded oracle; returns the worst |cpu - f64| / bound. */
static double run_check_bc(const cm_graph *g, const char *what, bool no_templates, int bc);
static double run_check(const cm_graph *g, const char *what, bool no_templates) {
  return run_check_bc(g, what, no_templates, 0);
}

static double run_check_bc(const cm_graph *g, const char *what, bool no_templates, int bc) {
  cm_err err = {0};
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof *src);
  const cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) {
    if (g->nodes[i].op != CM_OP_INPUT) continue;
    CHECK(cm_tensor_alloc(&src[i], g->nodes[i].type, NULL) == CM_OK);
    /* q spread wider so the softmax is far from uniform */
    double w = !strcmp(g->nodes[i].name, "q") ? 3.0 : 1.0;
    for (int64_t e = 0; e < cm_type_numel(&g->nodes[i].type); e++)
      cm_tensor_set_f64(&src[i], e, w * (uniform() * 2 - 1));
    ptr[i] = &src[i];
  }
  test_oracle v;
  CHECK_MSG(test_oracle_eval(&v, g, ptr, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_compile_opts o = {.threads = 2, .cache_dir = "", .no_templates = no_templates, .attn_bc = bc};
  cm_program *pr = NULL;
  double worst = INFINITY;
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_OK, "%s: %s", what, err.msg);
  if (pr) {
    cm_tensor *out = calloc((size_t)g->n_outputs, sizeof *out);
    cm_tensor **sp = calloc((size_t)g->n_nodes, sizeof *sp);
    for (int i = 0; i < g->n_nodes; i++) sp[i] = ptr[i] ? &src[i] : NULL;
    CHECK_MSG(cm_program_run(pr, sp, out, &err) == CM_OK, "%s: %s", what, err.msg);
    worst = 0;
    for (int j = 0; j < g->n_outputs; j++) {
      test_bounded e = test_oracle_check(&v, g->outputs[j], &out[j], what);
      CHECK_MSG(e.ratio <= 1,
                "%s: output %d (%s): |cpu - f64| = %g at [%lld] exceeds its error bound %g", what,
                j, g->nodes[g->outputs[j]].name, e.diff, (long long)e.at, e.bound);
      worst = fmax(worst, e.ratio);
      cm_tensor_free(&out[j]);
    }
    free(out);
    free(sp);
    cm_program_free(pr);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  test_oracle_free(&v);
  free(src);
  free(ptr);
  return worst;
}

static void test_shapes(void) {
  const shape shapes[] = {
      {1, 1, 1, 1},   {2, 3, 2, 5},    {1, 4, 7, 32}, {3, 1, 50, 5},
      {2, 4, 65, 32}, {1, 3, 197, 64}, {2, 1, 13, 1}, {1, 3, 97, 32},
  };
  int n = (int)(sizeof shapes / sizeof shapes[0]);
  int fired_fwd = 0, fired_bwd = 0, multi_block = 0;
  for (int i = 0; i < n; i++) {
    shape sh = shapes[i];
    for (int bw = 0; bw < 2; bw++) {
      char what[96];
      snprintf(what, sizeof what, "%s n=%lld heads=%lld N=%lld d=%lld", bw ? "fwd+bwd" : "fwd",
               (long long)sh.n, (long long)sh.heads, (long long)sh.tokens, (long long)sh.dim);
      cm_graph *g = attention_graph(sh, bw);
      span_count c = count_spans(g, what);
      if (sh.tokens >= 2) {
        CHECK_MSG(c.fwd >= 1, "%s: no forward attention span", what);
        CHECK_MSG(c.fused_fwd < c.scratch_fwd, "%s: fused scratch %lld not below %lld", what,
                  (long long)c.fused_fwd, (long long)c.scratch_fwd);
        if (bw) CHECK_MSG(c.bwd >= 1, "%s: no backward attention span", what);
      }
      fired_fwd += c.fwd, fired_bwd += c.bwd;
      multi_block += c.max_blocks > 1;
      double e = run_check(g, what, false);
      printf("  %-40s spans fwd %d bwd %d, scratch %lld -> %lld, blocks %d, err / bound %.2g\n",
             what, c.fwd, c.bwd, (long long)c.scratch_fwd, (long long)c.fused_fwd, c.max_blocks, e);
      cm_graph_free(g);
    }
  }
  CHECK(fired_fwd >= 2 * (n - 1));
  CHECK(fired_bwd >= n - 1);
  CHECK(multi_block >= 4); /* query blocks that do not divide N were exercised */
}

/* Without templates the same graphs still agree (the generic reading). */
static void test_generic_reading(void) {
  shape sh = {2, 3, 19, 8};
  cm_graph *g = attention_graph(sh, true);
  span_count c = count_spans(g, "generic");
  CHECK(c.fwd == 1 && c.bwd == 1);
  double e = run_check(g, "generic (no templates)", true);
  CHECK(e <= 1);
  cm_graph_free(g);
}

/* Whether stage si of k loads a local buffer of span a. */
static bool stage_reads_local(const cm_kernel *k, int si, const cm_kattn *a) {
  const cm_kstage *s = &k->stages[si];
  for (int e = 0; e < s->n_exprs; e++)
    for (int i = 0; i < a->n_local; i++)
      if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == a->local[i]) return true;
  return false;
}

/* The verifier names the kernel, the stage and the rule; the printer shows the span. */
static void test_verify_and_print(void) {
  shape sh = {2, 3, 20, 8};
  cm_graph *g = attention_graph(sh, true);
  cm_err err = {0};
  cm_pass_state s = {cm_graph_clone(g), NULL};
  CHECK(cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK);
  cm_lower_opts lo = {NULL, false, 0};
  cm_kprogram kp;
  CHECK_MSG(cm_lower_plan(s.g, s.plan, &lo, &kp, &err) == CM_OK, "%s", err.msg);
  int checked = 0;
  for (int i = 0; i < kp.n_kernels; i++) {
    cm_kernel *k = &kp.kernels[i];
    int si = -1;
    for (int j = 0; j < k->n_stages && si < 0; j++)
      if (k->stages[j].tmpl == CM_KT_ATTENTION_FWD || k->stages[j].tmpl == CM_KT_ATTENTION_BWD)
        si = j;
    if (si < 0) continue;
    cm_kstage *st = &k->stages[si];
    CHECK(cm_kernel_verify(k, &err) == CM_OK);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    cm_kernel_print(k, f);
    fclose(f);
    CHECK_STR_CONTAINS(text, st->tmpl == CM_KT_ATTENTION_FWD ? "attention fwd span"
                                                             : "attention bwd span");
    CHECK_STR_CONTAINS(text, "local b");
    CHECK_STR_CONTAINS(text, "whole-row workspace");
    free(text);
    cm_kattn saved = st->attn;
    st->attn.span = k->n_stages + 1;
    CHECK(cm_kernel_verify(k, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, k->name);
    CHECK_STR_CONTAINS(err.msg, "does not fit");
    st->attn = saved;
    /* a local that is not scratch */
    int arena = -1;
    for (int b = 0; b < k->n_buffers && arena < 0; b++)
      if (k->buffers[b].kind == CM_KBUF_ARENA) arena = b;
    st->attn.local[0] = arena;
    CHECK(cm_kernel_verify(k, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "is not a scratch buffer");
    st->attn = saved;
    /* wrong per-row size: the locality proof must fail */
    st->attn.local_row[0] += 1;
    CHECK(cm_kernel_verify(k, &err) == CM_EINVALID);
    st->attn = saved;
    /* a span cut short before its last stage that reads a local buffer (the recomputed
       form's forward ends with stages of the kept row statistics, which read none) */
    int cut = saved.span - 1;
    while (cut > 2 && !stage_reads_local(k, si + cut, &saved)) cut--;
    CHECK(stage_reads_local(k, si + cut, &saved));
    st->attn.span = cut;
    CHECK(cm_kernel_verify(k, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "outside the span");
    st->attn = saved;
    /* a local buffer dropped stays valid (the value then lives in the scratch
       area, accessed per batch item), only the fused scratch grows */
    int64_t fused = cm_kernel_fused_scratch_bytes(k);
    st->attn.n_local--;
    CHECK_MSG(cm_kernel_verify(k, &err) == CM_OK, "%s", err.msg);
    CHECK(cm_kernel_fused_scratch_bytes(k) > fused);
    st->attn = saved;
    /* the first stage must split only the batch across threads */
    st->n_parallel = st->attn.nb + 1;
    CHECK(cm_kernel_verify(k, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "n_parallel");
    st->n_parallel = st->attn.nb;
    CHECK(cm_kernel_verify(k, &err) == CM_OK);
    checked++;
  }
  CHECK(checked == 2);
  cm_kprogram_free(&kp);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  cm_graph_free(g);
}

/* Online-softmax streaming: forced key blocks (1, 7, 16, 64; not dividing N)
 * on the forward graph alone (inference: only O leaves the group) and with P
 * kept as an output (training), vs the oracle; the spans must be marked for
 * streaming, render the key-block loop and need a workspace below one
 * br x keys tile. The forward+backward graph fuses dV into the forward span
 * (a contraction over the query rows): it must stay on the whole-row path. */
static void test_streaming(void) {
  typedef struct scase {
    shape sh;
    int bc;
  } scase;
  const scase cases[] = {
      {{1, 1, 2, 1}, 1},    {{2, 3, 65, 5}, 7}, {{1, 4, 197, 64}, 64}, {{2, 1, 197, 16}, 16},
      {{1, 3, 65, 32}, 64}, {{3, 1, 13, 3}, 1}, {{1, 4, 50, 64}, 7},   {{2, 3, 97, 1}, 16},
      {{1, 1, 197, 8}, 7},  {{1, 3, 2, 64}, 1},
  };
  int n = (int)(sizeof cases / sizeof cases[0]);
  unsigned keep_seen = 0;
  for (int i = 0; i < n; i++) {
    shape sh = cases[i].sh;
    for (int mode = 0; mode < 2; mode++) {
      char what[128];
      snprintf(what, sizeof what, "stream %s n=%lld heads=%lld N=%lld d=%lld bc=%d",
               mode ? "fwd keep P" : "fwd", (long long)sh.n, (long long)sh.heads,
               (long long)sh.tokens, (long long)sh.dim, cases[i].bc);
      cm_graph *g = attention_graph_ex(sh, false, mode == 1);
      span_count c = count_spans_bc(g, what, cases[i].bc);
      CHECK_MSG(c.fwd == 1 && c.stream == 1, "%s: %d forward spans, %d streaming", what, c.fwd,
                c.stream);
      CHECK_MSG(c.stream_ir, "%s: the rendering has no key-block loop", what);
      if (mode == 1) CHECK_MSG(c.keep & CM_KATTN_KEEP_P, "%s: P not kept", what);
      keep_seen |= c.keep;
      double e = run_check_bc(g, what, false, cases[i].bc);
      printf("  %-58s ws %lld (whole rows %lld) keep %#x, err / bound %.2g\n", what,
             (long long)c.stream_ws, (long long)c.whole_row_ws, c.keep, e);
      cm_graph_free(g);
    }
  }
  CHECK(keep_seen & CM_KATTN_KEEP_P);
  /* the streaming workspace does not grow with the keys (same query block) */
  int64_t ws[2];
  for (int i = 0; i < 2; i++) {
    shape sl = {2, 1, i ? 800 : 400, 16};
    cm_graph *gl = attention_graph_ex(sl, false, true);
    span_count cl = count_spans_bc(gl, i ? "N=800 bc=64" : "N=400 bc=64", 64);
    CHECK(cl.stream == 1 && cl.stream_ir);
    ws[i] = cl.stream_ws;
    printf("  N=%d bc=64: streaming workspace %lld, whole rows %lld\n", i ? 800 : 400,
           (long long)cl.stream_ws, (long long)cl.whole_row_ws);
    fflush(stdout);
    CHECK_MSG(cl.stream_ws * 4 < cl.whole_row_ws, "N=%d: workspace %lld vs %lld", i ? 800 : 400,
              (long long)cl.stream_ws, (long long)cl.whole_row_ws);
    cm_graph_free(gl);
  }
  CHECK(ws[0] == ws[1]);
  /* forward+backward: the forward span holds dV = P^T dO (a contraction over the
     query rows): not a softmax-only span, whole rows; the backward span streams */
  const scase bcases[] = {
      {{2, 3, 65, 8}, 7},  {{1, 1, 2, 1}, 1},   {{2, 4, 197, 64}, 64}, {{1, 3, 50, 5}, 16},
      {{3, 1, 13, 32}, 1}, {{1, 2, 97, 16}, 7}, {{1, 1, 197, 3}, 16},
  };
  int nbw = (int)(sizeof bcases / sizeof bcases[0]);
  for (int i = 0; i < nbw; i++) {
    shape sb = bcases[i].sh;
    char what[128];
    snprintf(what, sizeof what, "stream fwd+bwd n=%lld heads=%lld N=%lld d=%lld bc=%d",
             (long long)sb.n, (long long)sb.heads, (long long)sb.tokens, (long long)sb.dim,
             bcases[i].bc);
    cm_graph *gb = attention_graph(sb, true);
    span_count cb = count_spans_bc(gb, what, bcases[i].bc);
    CHECK_MSG(cb.fwd == 1 && cb.bwd == 1 && cb.stream == 0 && cb.stream_bwd == 1,
              "%s: spans fwd %d bwd %d, streaming fwd %d bwd %d", what, cb.fwd, cb.bwd, cb.stream,
              cb.stream_bwd);
    CHECK_MSG(cb.stream_bwd_ir, "%s: the backward rendering has no key-block passes", what);
    double e = run_check_bc(gb, what, false, bcases[i].bc);
    printf("  %-58s bwd ws %lld (whole rows %lld), err / bound %.2g\n", what, (long long)cb.bwd_ws,
           (long long)cb.bwd_whole_ws, e);
    fflush(stdout);
    cm_graph_free(gb);
  }
  /* the streaming backward workspace grows with the rows only (all query rows are
     one block), the whole-row one with rows x keys */
  for (int i = 0; i < 2; i++) {
    shape sl = {1, 1, i ? 800 : 400, 16};
    cm_graph *gl = attention_graph(sl, true);
    span_count cl = count_spans_bc(gl, "bwd N=400/800 bc=64", 64);
    CHECK(cl.stream_bwd == 1 && cl.stream_bwd_ir);
    ws[i] = cl.bwd_ws;
    printf("  N=%d bc=64: streaming backward workspace %lld, whole rows %lld\n", i ? 800 : 400,
           (long long)cl.bwd_ws, (long long)cl.bwd_whole_ws);
    fflush(stdout);
    CHECK(cl.bwd_ws * (i ? 4 : 2) < cl.bwd_whole_ws);
    cm_graph_free(gl);
  }
  CHECK(ws[1] < ws[0] * 2 + 4096);
  /* without a forced block, ViT-sized rows keep whole key rows (bc = keys) */
  shape sv = {1, 3, 197, 64};
  cm_graph *g = attention_graph(sv, false);
  span_count c = count_spans(g, "default bc");
  CHECK(c.fwd == 1 && c.stream == 0);
  cm_graph_free(g);
}

/* The streaming roles are re-checked before a renderer streams: wrong roles,
 * keep bits or a key block outside [1, keys) are errors naming the kernel and
 * stage, and such a span renders on the whole-row path. */
static void test_stream_check(void) {
  shape sh = {2, 3, 23, 8};
  cm_graph *g = attention_graph_ex(sh, false, true);
  cm_err err = {0};
  cm_pass_state s = {cm_graph_clone(g), NULL};
  CHECK(cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK);
  cm_lower_opts lo = {NULL, false, 5};
  cm_kprogram kp;
  CHECK_MSG(cm_lower_plan(s.g, s.plan, &lo, &kp, &err) == CM_OK, "%s", err.msg);
  int checked = 0;
  for (int i = 0; i < kp.n_kernels; i++) {
    cm_kernel *k = &kp.kernels[i];
    if (k->n_stages == 0 || !k->stages[0].attn.stream) continue;
    cm_kattn *a = &k->stages[0].attn, saved = *a;
    CHECK_MSG(cm_kattn_stream_check(k, 0, &err) == CM_OK, "%s", err.msg);
    CHECK(a->bc == 5 && a->st_p >= 0 && a->buf_p >= 0 && (a->keep & CM_KATTN_KEEP_P));
    CHECK(renders_streaming(k));
    a->buf_m = saved.buf_l;
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, k->name);
    CHECK_STR_CONTAINS(err.msg, "roles");
    CHECK(!renders_streaming(k));
    *a = saved;
    a->keep = 0;
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_EINVALID);
    *a = saved;
    a->bc = (int)sh.tokens + 1; /* a forward span may take all keys in one block, no more */
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "key block");
    *a = saved;
    a->st_p = -1;
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_EINVALID);
    CHECK(!renders_streaming(k));
    *a = saved;
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_OK);
    checked++;
  }
  CHECK(checked == 1);
  cm_kprogram_free(&kp);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  cm_graph_free(g);
  /* a backward span: its stage roles are re-derived */
  g = attention_graph(sh, true);
  s.g = cm_graph_clone(g);
  s.plan = NULL;
  CHECK(cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK);
  CHECK_MSG(cm_lower_plan(s.g, s.plan, &lo, &kp, &err) == CM_OK, "%s", err.msg);
  checked = 0;
  for (int i = 0; i < kp.n_kernels; i++) {
    cm_kernel *k = &kp.kernels[i];
    if (k->n_stages == 0 || !k->stages[0].attn.stream || k->stages[0].tmpl != CM_KT_ATTENTION_BWD)
      continue;
    cm_kattn *a = &k->stages[0].attn, saved = *a;
    CHECK_MSG(cm_kattn_stream_check(k, 0, &err) == CM_OK, "%s", err.msg);
    CHECK(renders_with(k, "fb.kblk2"));
    int last = a->span - 1;
    a->role[last] = a->role[last] == CM_KATTN_ROLE_GEMM_KEYS ? CM_KATTN_ROLE_GEMM_ROWS
                                                             : CM_KATTN_ROLE_GEMM_KEYS;
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "roles");
    CHECK(!renders_with(k, "fb.kblk2"));
    *a = saved;
    a->bc = 0;
    CHECK(cm_kattn_stream_check(k, 0, &err) == CM_EINVALID);
    *a = saved;
    checked++;
  }
  CHECK(checked == 1);
  cm_kprogram_free(&kp);
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  cm_graph_free(g);
}

static void test_report(void) {
  test_tally_report("attention_template");
}

TEST_MAIN({"shapes", test_shapes}, {"streaming", test_streaming},
          {"stream_check", test_stream_check}, {"generic_reading", test_generic_reading},
          {"verify_and_print", test_verify_and_print}, {"report", test_report})
