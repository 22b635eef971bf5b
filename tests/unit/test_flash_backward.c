/* The flash_backward pass (passes/flash_backward.c) against the oracle.
 *
 * For a graph G (autodiff's attention backward, after simplify,cse,dce) and
 * F = flash_backward(G): G and F compute the same real function (F recomputes
 * E, P from Q, K, m, z with the same ops, and −D/z equals autodiff's row sum
 * in real arithmetic), so the oracle's f64 values of every output (loss,
 * gradients, updated params) differ only by f64 rounding. Each graph is
 * evaluated by cm_eval_bounded after its float dtypes are widened to f64 (the
 * oracle evaluates in f64 whatever the dtypes; widened, its bounds are those
 * of f64 rounding alone, not of bf16/f32 rounding that both graphs share):
 * both intervals contain the exact value of the same function, so they must
 * intersect, element by element. A wrong rewrite (the recomputed P without
 * its 1/z) must leave them. In the graphs' own dtypes (the oracle's native
 * evaluation) the recomputation is bit for bit the forward's: dV, which reads
 * only the recomputed P, is bit-identical.
 * Checked on random attentions (odd token counts 1, 17, 65; head dims 8, 32;
 * f32 and autocast bf16). On a whole training step these bounds, carried
 * through every layer, are infinite nearly everywhere (test_autocast reports
 * the same), so on every shipped variant's step (f32 and bf16) the test checks
 * what the values above rest on: no node outside an attention's forward reads
 * its E, P, P's cast or the broadcast of z; the recomputation reads the
 * forward's own Q, K, scale and m and divides by its z, and D reads its O and
 * the dO of its dP; after fuse each backward is one attention kernel reading
 * Q, K, V, dO, m, z, D and no kernel writes an N×N value (without the pass,
 * some do: the checks can fail). */
#include "../test.h"
#include "../testlib.h"
#include "../model_step.h"
#include "models/models.h"
#include "passes/passes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {20261208};
static double uniform(void) {
  return test_uniform(&rng);
}

/* g with every float dtype widened to f64 (sources, consts, iotas, casts). */
static cm_graph *widened(const cm_graph *g) {
  cm_graph *w = cm_graph_new();
  int *map = malloc(sizeof(int) * ((size_t)g->n_nodes + 1));
  cm_err err = {0};
  for (int i = 0; i < g->n_nodes && w->error.status == CM_OK; i++) {
    const cm_node *n = &g->nodes[i];
    cm_attrs a = n->attrs;
    if (cm_dtype_is_float(a.dtype) &&
        (n->op == CM_OP_INPUT || n->op == CM_OP_PARAM || n->op == CM_OP_STATE ||
         n->op == CM_OP_CONST || n->op == CM_OP_IOTA || n->op == CM_OP_CAST))
      a.dtype = CM_F64;
    int in[64];
    CHECK(n->n_inputs <= 64);
    for (int k = 0; k < n->n_inputs && k < 64; k++) in[k] = map[n->inputs[k]];
    map[i] = cm_graph_add(w, n->op, n->name[0] == '%' ? NULL : n->name, in, n->n_inputs, &a, &err);
    CHECK_MSG(map[i] >= 0, "widening %s: %s", n->name, err.msg);
    if (map[i] < 0) break;
  }
  for (int k = 0; k < g->n_outputs; k++)
    CHECK(cm_graph_add_output(w, map[g->outputs[k]], &err) == 0);
  free(map);
  return w;
}

/* Values (and bounds when asked) of g with sources matched by name from ref's. */
typedef struct evaluation {
  const cm_graph *g;
  cm_tensor *values, *bounds;
} evaluation;

static void evaluate(evaluation *e, const cm_graph *g, const cm_graph *ref,
                     const cm_tensor *const *ref_sources, bool bounded) {
  e->g = g;
  e->values = calloc((size_t)g->n_nodes, sizeof *e->values);
  e->bounds = bounded ? calloc((size_t)g->n_nodes, sizeof *e->bounds) : NULL;
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  for (int i = 0; i < g->n_nodes; i++) {
    cm_op op = g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    int j = cm_graph_find(ref, g->nodes[i].name);
    CHECK_MSG(j >= 0 && ref_sources[j], "source %s not found", g->nodes[i].name);
    src[i] = j >= 0 ? ref_sources[j] : NULL;
  }
  cm_err err = {0};
  cm_eval_opts native = {CM_PRECISION_NATIVE};
  cm_status st = bounded ? cm_eval_bounded(g, src, e->values, e->bounds, &err)
                         : cm_eval(g, src, e->values, &native, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  free(src);
}

static void evaluation_free(evaluation *e) {
  for (int i = 0; i < e->g->n_nodes; i++) {
    cm_tensor_free(&e->values[i]);
    if (e->bounds) cm_tensor_free(&e->bounds[i]);
  }
  free(e->values), free(e->bounds);
}

typedef struct tally {
  int64_t checked, apart, unbounded; /* elements; intervals that do not meet; infinite bounds */
  int values;                        /* outputs and assigns compared */
} tally;

/* The results of a graph: its outputs and its assigns (the updated state). */
static bool is_result(const cm_graph *g, int id) {
  if (g->nodes[id].op == CM_OP_ASSIGN) return true;
  for (int k = 0; k < g->n_outputs; k++)
    if (g->outputs[k] == id) return true;
  return false;
}

/* Every float result of a, found by name in b: do their intervals meet? */
static tally compare_bounded(const evaluation *a, const evaluation *b) {
  tally t = {0, 0, 0, 0};
  for (int i = 0; i < a->g->n_nodes; i++) {
    if (!is_result(a->g, i) || !cm_dtype_is_float(a->g->nodes[i].type.dtype)) continue;
    int j = cm_graph_find(b->g, a->g->nodes[i].name);
    CHECK_MSG(j >= 0, "result %s lost", a->g->nodes[i].name);
    if (j < 0) continue;
    t.values++;
    int64_t n = cm_type_numel(&a->g->nodes[i].type);
    for (int64_t e = 0; e < n; e++) {
      double va = cm_tensor_get_f64(&a->values[i], e), vb = cm_tensor_get_f64(&b->values[j], e);
      double ba = cm_tensor_get_f64(&a->bounds[i], e), bb = cm_tensor_get_f64(&b->bounds[j], e);
      if (!isfinite(ba) || !isfinite(bb)) {
        t.unbounded++;
        continue;
      }
      t.checked++;
      if (!(fabs(va - vb) <= ba + bb)) t.apart++;
    }
  }
  return t;
}

/* src: the sources of ref's nodes, found by name in g and f. */
static tally check_equivalent(const cm_graph *ref, const cm_graph *g, const cm_graph *f,
                              const cm_tensor *const *src) {
  cm_graph *wg = widened(g), *wf = widened(f);
  evaluation eg, ef;
  evaluate(&eg, wg, ref, src, true);
  evaluate(&ef, wf, ref, src, true);
  tally t = compare_bounded(&eg, &ef);
  evaluation_free(&eg), evaluation_free(&ef);
  cm_graph_free(wg), cm_graph_free(wf);
  return t;
}

static cm_graph *flash(const cm_graph *g, cm_flash_backward_stats *stats) {
  cm_graph *f = cm_graph_clone(g);
  cm_err err = {0};
  CHECK_MSG(cm_flash_backward(&f, stats, &err) == CM_OK, "%s", err.msg);
  return f;
}

static cm_graph *run_pipeline(cm_graph *g, const char *pipeline) {
  cm_pass_state s = {g, NULL};
  cm_err err = {0};
  CHECK_MSG(cm_pipeline_run(&s, pipeline, NULL, NULL, 0, NULL, &err) == CM_OK, "%s", err.msg);
  if (s.plan) cm_plan_free(s.plan);
  return s.g;
}

/* ---- reads of an attention's N×N forward values ---------------------------- */

/* Nodes that read an attention forward's E, P, P's casts or the broadcast of z
 * that P divides by, other than the forward itself (z, P, the casts, O);
 * *n_attn receives the attentions found (an exp with a row sum z and a
 * division by z's broadcast). Independent of the pass's own matching. */
static int nxn_reads(const cm_graph *g, int *n_attn) {
  int bad = 0;
  *n_attn = 0;
  for (int e = 0; e < g->n_nodes; e++) {
    if (g->nodes[e].op != CM_OP_EXP || g->nodes[e].type.rank < 2) continue;
    int z = -1, p = -1;
    for (int u = e + 1; u < g->n_nodes; u++) {
      const cm_node *n = &g->nodes[u];
      if (n->op == CM_OP_REDUCE_SUM && n->inputs[0] == e && n->attrs.keepdims) z = u;
      if (n->op == CM_OP_DIV && n->inputs[0] == e && z >= 0 &&
          (n->inputs[1] == z ||
           (g->nodes[n->inputs[1]].op == CM_OP_BROADCAST && g->nodes[n->inputs[1]].inputs[0] == z)))
        p = u;
    }
    if (z < 0 || p < 0) continue;
    ++*n_attn;
    int bz = g->nodes[p].inputs[1];
    for (int u = e + 1; u < g->n_nodes; u++) {
      const cm_node *n = &g->nodes[u];
      for (int k = 0; k < n->n_inputs; k++) {
        int x = n->inputs[k];
        bool p_cast = g->nodes[x].op == CM_OP_CAST && g->nodes[x].inputs[0] == p;
        bool nxn = x == e || x == p || (x == bz && bz != z) || p_cast;
        if (!nxn) continue;
        bool fwd = (u == z && x == e) || (u == p && (x == e || x == bz)) ||
                   (n->op == CM_OP_CAST && x == p) ||
                   (n->op == CM_OP_MATMUL && k == 0 && (x == p || p_cast) &&
                    !n->attrs.transpose_a && !n->attrs.transpose_b);
        bad += !fwd;
      }
    }
  }
  return bad;
}

/* F with each recomputed P (a division of an exp that has no row sum of its
 * own) replaced by its numerator: the 1/z dropped. */
static cm_graph *drop_recomputed_normalization(const cm_graph *f, int *dropped) {
  cm_rewriter r;
  cm_err err = {0};
  *dropped = 0;
  CHECK(cm_rewriter_begin(&r, f, &err) == CM_OK);
  for (int i = 0; i < f->n_nodes; i++) {
    const cm_node *n = &f->nodes[i];
    bool own_sum = false;
    if (n->op == CM_OP_DIV && f->nodes[n->inputs[0]].op == CM_OP_EXP) {
      for (int u = n->inputs[0] + 1; u < f->n_nodes; u++)
        own_sum |= f->nodes[u].op == CM_OP_REDUCE_SUM && f->nodes[u].inputs[0] == n->inputs[0];
      if (!own_sum) {
        r.map[i] = r.map[n->inputs[0]];
        ++*dropped;
        continue;
      }
    }
    cm_rewriter_copy(&r, i);
  }
  cm_graph *out = NULL;
  CHECK_MSG(cm_rewriter_finish(&r, &out, &err) == CM_OK, "%s", err.msg);
  return out;
}

/* ---- random attentions ----------------------------------------------------- */

/* loss = Σ O∘W, O = softmax(Q Kᵀ c) V, with the gradients of Q, K, V as outputs
 * "grad.q", "grad.k", "grad.v" (after autocast when low is bf16), simplified. */
static cm_graph *attention_graph(int64_t n_tokens, int64_t head_dim, bool bf16) {
  cm_graph *g = cm_graph_new();
  int64_t dims[4] = {1, 2, n_tokens, head_dim};
  cm_init init = {CM_INIT_NORMAL, 0.0, 1.0};
  int q = cm_param(g, "q", CM_F32, 4, dims, init), k = cm_param(g, "k", CM_F32, 4, dims, init),
      v = cm_param(g, "v", CM_F32, 4, dims, init), w = cm_input(g, "w", CM_F32, 4, dims);
  int c = cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)head_dim));
  int s = cm_binary_bcast(g, CM_OP_MUL, cm_matmul(g, q, k, false, true, NULL), c, NULL);
  int o = cm_matmul(g, cm_nn_softmax(g, s), v, false, false, NULL);
  int axes[4] = {0, 1, 2, 3};
  int loss =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, o, w, NULL), 4, axes, false, "loss");
  CHECK_MSG(!cm_graph_error(g), "%s", cm_graph_error(g));
  int wrt[3] = {q, k, v}, grads[3];
  cm_err err = {0};
  CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
  const char *names[3] = {"grad.q", "grad.k", "grad.v"};
  CHECK(cm_graph_add_output(g, loss, &err) == CM_OK);
  for (int j = 0; j < 3; j++) {
    CHECK_MSG(cm_graph_rename(g, grads[j], names[j], &err) == CM_OK, "%s", err.msg);
    CHECK(cm_graph_add_output(g, grads[j], &err) == CM_OK);
  }
  if (bf16) CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
  return run_pipeline(g, "simplify,cse,dce");
}

static bool same_bits(const cm_tensor *a, const cm_tensor *b) {
  return cm_type_equal(&a->type, &b->type) &&
         memcmp(a->data, b->data, cm_type_nbytes(&a->type)) == 0;
}

static void test_random_attentions(void) {
  static const int64_t tokens[] = {1, 17, 65}, head_dims[] = {8, 32};
  for (int ti = 0; ti < 3; ti++)
    for (int hi = 0; hi < 2; hi++)
      for (int low = 0; low < 2; low++) {
        int64_t n = tokens[ti], d = head_dims[hi];
        cm_graph *g = attention_graph(n, d, low);
        cm_flash_backward_stats st;
        cm_graph *f = flash(g, &st);
        CHECK_MSG(st.attentions == 1 && st.d_rewritten == 1 && st.d_kept == 0,
                  "N %lld d %lld %s: %d attentions, %d D, %d kept", (long long)n, (long long)d,
                  low ? "bf16" : "f32", st.attentions, st.d_rewritten, st.d_kept);
        int n_attn = 0;
        CHECK(nxn_reads(g, &n_attn) > 0 && n_attn == 1);
        CHECK(nxn_reads(f, &n_attn) == 0 && n_attn == 1);
        /* idempotent: a second run finds nothing and keeps the graph */
        cm_graph *again = f;
        cm_err err = {0};
        CHECK(cm_flash_backward(&again, &st, &err) == CM_OK && again == f && st.attentions == 0);
        cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
        const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
        test_fill_sources(&rng, g, t, src);
        tally eq = check_equivalent(g, g, f, src);
        CHECK_MSG(eq.apart == 0 && eq.unbounded == 0 && eq.values == 4,
                  "N %lld d %lld %s: %lld of %lld elements apart, %lld unbounded", (long long)n,
                  (long long)d, low ? "bf16" : "f32", (long long)eq.apart, (long long)eq.checked,
                  (long long)eq.unbounded);
        /* the recomputation rounds as the forward did: dV reads only it and dO */
        evaluation ng, nf;
        evaluate(&ng, g, g, src, false);
        evaluate(&nf, f, g, src, false);
        int vg = cm_graph_find(g, "grad.v"), vf = cm_graph_find(f, "grad.v");
        CHECK(vg >= 0 && vf >= 0 && same_bits(&ng.values[vg], &nf.values[vf]));
        evaluation_free(&ng), evaluation_free(&nf);
        if (n > 1) { /* with one key z = 1: dropping 1/z changes nothing */
          int dropped = 0;
          cm_graph *wrong = drop_recomputed_normalization(f, &dropped);
          tally bad = check_equivalent(g, g, wrong, src);
          CHECK_MSG(dropped == 1 && bad.apart > 0, "N %lld d %lld: the wrong rewrite passed",
                    (long long)n, (long long)d);
          cm_graph_free(wrong);
        }
        for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t[i]);
        free(t), free(src);
        cm_graph_free(g), cm_graph_free(f);
      }
}

/* ---- the shipped variants' training steps ---------------------------------- */

typedef struct variant {
  const char *name;
  const char *const *ov; /* shrunk for the oracle (tests/model_step.h) */
  int n_ov;
} variant;

static const variant variants[] = {
    {"cmae_vit_tiny_fmnist", test_shrunk_vit + 3, TEST_SHRUNK_VIT_N - 3},
    {"cmae_convvit_tiny_fmnist", test_shrunk_convvit + 3, TEST_SHRUNK_CONVVIT_N - 3},
    {"cmae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_N},
    {"cmae_vit_small", test_shrunk_vit, TEST_SHRUNK_VIT_N},
    {"cmae_vit_large", test_shrunk_vit, TEST_SHRUNK_VIT_N},
    {"mae_vit_base", test_shrunk_vit, TEST_SHRUNK_VIT_MAE},
    {"cmae_convvit_base", test_shrunk_convvit, TEST_SHRUNK_CONVVIT_N},
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

/* The variant's training step (f32), its sources bound when t and src are given. */
static cm_graph *variant_step(const variant *v, bool shrunk, cm_tensor **t,
                              const cm_tensor ***src) {
  char path[256];
  snprintf(path, sizeof path, "models/%s.json", v->name);
  cm_model_config cfg;
  cm_err err = {0};
  CHECK_MSG(cm_model_config_load(path, shrunk ? v->ov : NULL, shrunk ? v->n_ov : 0, &cfg, &err) ==
                CM_OK,
            "%s", err.msg);
  cm_model_build_opts bo = {2, 1, CM_F32};
  cm_model m;
  CHECK_MSG(cm_model_build(&cfg, &bo, &m, &err) == CM_OK, "%s: %s", path, err.msg);
  if (!m.g) return NULL;
  cm_optim_config oc = test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err) == CM_OK, "%s: %s", path,
            err.msg);
  if (step && t) {
    *t = calloc((size_t)step->n_nodes, sizeof **t);
    *src = calloc((size_t)step->n_nodes, sizeof **src);
    rng.s = 4242;
    test_bind_step(step, &cfg, &m, *t, *src, uniform);
  }
  cm_model_free(&m);
  return step;
}

/* Every variant (the tiny ones at their shipped size, the others shrunk), graph only: after
 * simplify,cse,dce no attention backward is in the flash form, after flash_backward all are. */
static void test_variants_read_no_nxn(void) {
  for (int i = 0; i < N_VARIANTS; i++) {
    if (!test_case_wanted(variants[i].name)) continue;
    for (int low = 0; low < 2; low++) {
      cm_graph *step = variant_step(&variants[i], !strstr(variants[i].name, "tiny"), NULL, NULL);
      if (!step) continue;
      cm_err err = {0};
      if (low) CHECK_MSG(cm_autocast(&step, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
      cm_graph *g = run_pipeline(step, "simplify,cse,dce");
      cm_flash_backward_stats st;
      cm_graph *f = flash(g, &st);
      int n_before = 0, n_after = 0;
      int bad_before = nxn_reads(g, &n_before), bad_after = nxn_reads(f, &n_after);
      fprintf(stderr,
              "%-26s %s: %d attentions, %d backwards rewritten (%d with D, %d kept); N×N reads "
              "outside the forward: %d before, %d after\n",
              variants[i].name, low ? "bf16" : "f32 ", n_after, st.attentions, st.d_rewritten,
              st.d_kept, bad_before, bad_after);
      CHECK_MSG(st.attentions > 0 && bad_before > 0 && n_before == n_after,
                "%s: no attention backward found", variants[i].name);
      CHECK_MSG(bad_after == 0 && st.d_kept == 0 && st.d_rewritten == st.attentions,
                "%s: %d N×N reads left, %d row sums kept", variants[i].name, bad_after, st.d_kept);
      cm_graph_free(g), cm_graph_free(f);
    }
  }
}

/* The wiring of F's recomputations, checked on its graph: for each attention
 * forward (as nxn_reads finds them) with a backward, an exp of
 * sub([cast] matmul(Q, K) [· c], m) on the forward's own Q, K, c and m (not the
 * forward's nodes: a copy), a division of it by the forward's z, and one
 * −D/z = neg(div(reduce_sum(mul(dO, O)), z)) with O the forward's output (or
 * its f32 cast) and dO the operand of a dP = matmul(dO, V) {transpose_b} on the
 * forward's V. Returns the attentions wired so; *n_attn those found. */
typedef struct wiring {
  int attentions, recomputed_e, recomputed_p, d_from_o;
} wiring;

static int strip_bcast(const cm_graph *g, int x) {
  return g->nodes[x].op == CM_OP_BROADCAST ? g->nodes[x].inputs[0] : x;
}

static int strip_cast(const cm_graph *g, int x) {
  return g->nodes[x].op == CM_OP_CAST ? g->nodes[x].inputs[0] : x;
}

static wiring check_wiring(const cm_graph *g) {
  wiring w = {0, 0, 0, 0};
  for (int e = 0; e < g->n_nodes; e++) {
    const cm_node *en = &g->nodes[e];
    if (en->op != CM_OP_EXP || g->nodes[en->inputs[0]].op != CM_OP_SUB) continue;
    int z = -1, p = -1, o = -1;
    for (int u = e + 1; u < g->n_nodes; u++) {
      const cm_node *n = &g->nodes[u];
      if (n->op == CM_OP_REDUCE_SUM && n->inputs[0] == e && n->attrs.keepdims) z = u;
      if (n->op == CM_OP_DIV && n->inputs[0] == e && z >= 0 && strip_bcast(g, n->inputs[1]) == z)
        p = u;
      if (n->op == CM_OP_MATMUL && p >= 0 && strip_cast(g, n->inputs[0]) == p &&
          !n->attrs.transpose_b)
        o = o < 0 ? u : o;
    }
    if (o < 0) continue;
    w.attentions++;
    const cm_node *sub = &g->nodes[en->inputs[0]];
    int m = strip_bcast(g, sub->inputs[1]), sc = sub->inputs[0];
    int s =
        g->nodes[sc].op == CM_OP_MUL ? strip_cast(g, g->nodes[sc].inputs[0]) : strip_cast(g, sc);
    int v = g->nodes[o].inputs[1];
    bool e_ok = false, p_ok = false, d_ok = false;
    for (int u = o + 1; u < g->n_nodes; u++) {
      const cm_node *n = &g->nodes[u];
      if (n->op == CM_OP_EXP && g->nodes[n->inputs[0]].op == CM_OP_SUB) {
        const cm_node *rs = &g->nodes[n->inputs[0]];
        int rsc = rs->inputs[0];
        int rm = rsc >= 0 && g->nodes[rsc].op == CM_OP_MUL ? strip_cast(g, g->nodes[rsc].inputs[0])
                                                           : strip_cast(g, rsc);
        const cm_node *rmm = &g->nodes[rm], *fmm = &g->nodes[s];
        bool same = strip_bcast(g, rs->inputs[1]) == m && rmm->op == CM_OP_MATMUL && rm != s &&
                    rmm->inputs[0] == fmm->inputs[0] && rmm->inputs[1] == fmm->inputs[1] &&
                    rmm->attrs.transpose_b;
        if (same && g->nodes[rsc].op == CM_OP_MUL)
          same = g->nodes[rsc].inputs[1] == g->nodes[sc].inputs[1];
        if (!same) continue;
        e_ok = true;
        for (int q = u + 1; q < g->n_nodes; q++)
          p_ok |= g->nodes[q].op == CM_OP_DIV && g->nodes[q].inputs[0] == u &&
                  strip_bcast(g, g->nodes[q].inputs[1]) == z;
      }
      if (n->op == CM_OP_NEG && g->nodes[n->inputs[0]].op == CM_OP_DIV) {
        const cm_node *dv = &g->nodes[n->inputs[0]];
        const cm_node *rd = &g->nodes[dv->inputs[0]];
        if (dv->inputs[1] != z || rd->op != CM_OP_REDUCE_SUM) continue;
        const cm_node *mul = &g->nodes[rd->inputs[0]];
        if (mul->op != CM_OP_MUL || strip_cast(g, mul->inputs[1]) != o) continue;
        int dout = mul->inputs[0];
        for (int q = 0; q < g->n_nodes; q++) {
          const cm_node *dp = &g->nodes[q];
          d_ok |= dp->op == CM_OP_MATMUL && dp->inputs[1] == v && dp->attrs.transpose_b &&
                  strip_cast(g, dp->inputs[0]) == dout;
        }
      }
    }
    w.recomputed_e += e_ok;
    w.recomputed_p += p_ok;
    w.d_from_o += d_ok;
  }
  return w;
}

/* Every variant (shrunk), f32 and bf16: each rewritten attention is wired as
 * check_wiring says; with the recomputed P's 1/z dropped, none is. */
static void test_variant_wiring(void) {
  for (int i = 0; i < N_VARIANTS; i++) {
    if (!test_case_wanted(variants[i].name)) continue;
    for (int low = 0; low < 2; low++) {
      cm_graph *g = variant_step(&variants[i], true, NULL, NULL);
      if (!g) continue;
      cm_err err = {0};
      if (low) CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
      g = run_pipeline(g, "simplify,cse,dce");
      cm_flash_backward_stats st;
      cm_graph *f = flash(g, &st);
      wiring before = check_wiring(g), after = check_wiring(f);
      int dropped = 0;
      cm_graph *wrong = drop_recomputed_normalization(f, &dropped);
      wiring bad = check_wiring(wrong);
      fprintf(stderr,
              "%-26s %s: %d attentions, %d rewritten: recomputed E %d, P %d, D from O %d; "
              "with the 1/z dropped: P %d\n",
              variants[i].name, low ? "bf16" : "f32 ", after.attentions, st.attentions,
              after.recomputed_e, after.recomputed_p, after.d_from_o, bad.recomputed_p);
      CHECK_MSG(before.recomputed_e == 0 && before.d_from_o == 0, "%s: found before the pass",
                variants[i].name);
      CHECK_MSG(st.attentions > 0 && after.recomputed_e == st.attentions &&
                    after.recomputed_p == st.attentions && after.d_from_o == st.attentions,
                "%s: miswired", variants[i].name);
      CHECK_MSG(dropped == st.attentions && bad.recomputed_p == 0, "%s: the wrong rewrite passed",
                variants[i].name);
      cm_graph_free(wrong), cm_graph_free(f), cm_graph_free(g);
    }
  }
}

/* Every variant (tiny ones as shipped, others shrunk), f32 and bf16, after simplify,cse,dce,
 * flash_backward,fuse: no kernel writes a value of an attention's rows shape
 * [batch…, N, N] (no N×N tensor in memory); each rewritten backward is one
 * attention kernel reading 4 values of [batch…, N, d] (Q, K, V, dO) and 3 row
 * statistics (m, z, D), and each forward attention kernel writes none of them. */
static void test_variant_groups(void) {
  for (int i = 0; i < N_VARIANTS; i++) {
    if (!test_case_wanted(variants[i].name)) continue;
    for (int run = 0; run < 4; run++) {
      bool low = run & 1, flashed = run < 2;
      cm_graph *g = variant_step(&variants[i], !strstr(variants[i].name, "tiny"), NULL, NULL);
      if (!g) continue;
      cm_err err = {0};
      if (low) CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
      cm_pass_state s = {g, NULL};
      cm_pass_stat stats[8];
      int n_stats = 0;
      CHECK_MSG(cm_pipeline_run(
                    &s, flashed ? "simplify,cse,dce,flash_backward,fuse" : "simplify,cse,dce,fuse",
                    NULL, stats, 8, &n_stats, &err) == CM_OK,
                "%s", err.msg);
      g = s.g;
      const cm_plan *p = s.plan;
      int n_rows = 0; /* rows shapes of the attentions: the exps of attention kernels */
      cm_type rows[64];
      for (int gi = 0; p && gi < p->n_groups; gi++) {
        const cm_group *gr = &p->groups[gi];
        for (int k = 0; k < gr->n_nodes && gr->kind == CM_GROUP_ATTENTION; k++) {
          const cm_node *n = &g->nodes[gr->nodes[k]];
          bool seen = n->op != CM_OP_EXP;
          for (int r = 0; r < n_rows && !seen; r++) seen = cm_shape_equal(&rows[r], &n->type);
          if (!seen && n_rows < 64) rows[n_rows++] = n->type;
        }
      }
      int fwd = 0, bwd = 0, nxn_out = 0, bad_bwd = 0;
      for (int gi = 0; p && gi < p->n_groups; gi++) {
        const cm_group *gr = &p->groups[gi];
        for (int k = 0; k < gr->n_outputs; k++)
          for (int r = 0; r < n_rows; r++)
            nxn_out += cm_shape_equal(&g->nodes[gr->outputs[k]].type, &rows[r]);
        if (gr->kind != CM_GROUP_ATTENTION) continue;
        int matmuls = 0, reduces = 0;
        for (int k = 0; k < gr->n_nodes; k++) {
          cm_op op = g->nodes[gr->nodes[k]].op;
          matmuls += op == CM_OP_MATMUL;
          reduces += cm_op_get_info(op)->category == CM_CAT_REDUCE;
        }
        if (reduces) {
          fwd++;
          continue;
        }
        bwd++;
        int wide = 0, stat = 0;
        for (int k = 0; k < gr->n_inputs; k++) {
          const cm_type *t = &g->nodes[gr->inputs[k]].type;
          stat += t->rank >= 3 && t->dims[t->rank - 1] == 1;
          wide += t->rank >= 3 && t->dims[t->rank - 1] > 1;
        }
        bad_bwd += matmuls != 5 || wide != 4 || stat != 3 || gr->n_inputs != 7;
      }
      if (!flashed) { /* the check can fail: autodiff's backward reads E, P, z's broadcasts */
        CHECK_MSG(nxn_out > 0, "%s: no N×N value written without flash_backward", variants[i].name);
        cm_plan_free(s.plan);
        cm_graph_free(g);
        continue;
      }
      fprintf(stderr,
              "%-26s %s: attention kernels %d forward, %d backward (%d not reading Q, K, V, "
              "dO, m, z, D alone); N×N values written: %d; %s\n",
              variants[i].name, low ? "bf16" : "f32 ", fwd, bwd, bad_bwd, nxn_out,
              stats[n_stats - 2].detail);
      CHECK_MSG(n_rows > 0 && bwd > 0 && bad_bwd == 0 && nxn_out == 0,
                "%s: an attention backward is not one flash kernel", variants[i].name);
      cm_plan_free(s.plan);
      cm_graph_free(g);
    }
  }
}

static void test_no_attention_backward(void) {
  /* the forward alone (an inference graph): nothing to do, the same graph */
  cm_graph *g = cm_graph_new();
  int64_t dims[4] = {1, 2, 17, 8};
  int q = cm_input(g, "q", CM_F32, 4, dims), k = cm_input(g, "k", CM_F32, 4, dims);
  int p = cm_nn_softmax(g, cm_matmul(g, q, k, false, true, NULL));
  int o = cm_matmul(g, p, cm_input(g, "v", CM_F32, 4, dims), false, false, "o");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, o, &err) == CM_OK);
  CHECK(cm_graph_add_output(g, p, &err) == CM_OK);
  cm_graph *same = g;
  cm_flash_backward_stats st;
  CHECK(cm_flash_backward(&same, &st, &err) == CM_OK && same == g && st.attentions == 0);
  CHECK(cm_flash_backward(NULL, &st, &err) == CM_EINVALID);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_random_attentions), TEST(test_no_attention_backward),
          TEST(test_variants_read_no_nxn), TEST(test_variant_wiring), TEST(test_variant_groups))
