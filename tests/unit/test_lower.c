/* Lowering plan groups to the kernel IR: MLP and transformer-block training
 * steps through the default pipeline, lowered (with and without templates) and
 * run kernel by kernel by a small serial interpreter in this test (the
 * library's cm_kernel_interpret has not landed yet) over a real arena, source
 * buffers and scratch. Each kernel is checked on its own inputs: every output
 * within its forward error bound (cm_plan_eval_group_bounded on the inputs
 * the kernel read), and every input exactly what the kernel that wrote it
 * left there (sources: not yet updated), so the arena's reuse is checked too.
 * Structure: a GEMM stage with the template and a reduction stage exist. */
#include "../test.h"
#include "../testlib.h"
#include "../model_step.h"
#include "../tensor_compare.h"
#include "codegen/codegen.h"
#include "frontend/frontend.h"
#include "models/models.h"
#include "passes/passes.h"

#include <math.h>
#include <stdint.h>

static test_rng rng_state = {777};
static double next_uniform(void) {
  return test_uniform(&rng_state);
}

static int bcast_to(cm_graph *g, int x, int like) {
  const cm_type *t = &g->nodes[like].type;
  return cm_broadcast(g, x, t->rank, t->dims, NULL);
}
static int scalar(cm_graph *g, int like, double v) {
  const cm_type *t = &g->nodes[like].type;
  return cm_const_fill(g, NULL, t->dtype, t->rank, t->dims, v);
}
static int mean_last(cm_graph *g, int x) {
  const cm_type *t = &g->nodes[x].type;
  int ax = t->rank - 1;
  int s = cm_reduce(g, CM_OP_REDUCE_SUM, x, 1, &ax, true, NULL);
  return cm_binary(g, CM_OP_MUL, s, scalar(g, s, 1.0 / (double)t->dims[ax]), NULL);
}
static int layer_norm(cm_graph *g, int x, int w, int b) {
  int xc = cm_binary(g, CM_OP_SUB, x, bcast_to(g, mean_last(g, x), x), NULL);
  int var = mean_last(g, cm_binary(g, CM_OP_MUL, xc, xc, NULL));
  int inv =
      cm_unary(g, CM_OP_RSQRT, cm_binary(g, CM_OP_ADD, var, scalar(g, var, 1e-6), NULL), NULL);
  int y = cm_binary(g, CM_OP_MUL, xc, bcast_to(g, inv, x), NULL);
  return cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, y, bcast_to(g, w, x), NULL),
                   bcast_to(g, b, x), NULL);
}
static int gelu(cm_graph *g, int x) {
  int e =
      cm_unary(g, CM_OP_ERF, cm_binary(g, CM_OP_MUL, x, scalar(g, x, 1 / sqrt(2.0)), NULL), NULL);
  return cm_binary(g, CM_OP_MUL, cm_binary(g, CM_OP_MUL, x, scalar(g, x, 0.5), NULL),
                   cm_binary(g, CM_OP_ADD, e, scalar(g, e, 1), NULL), NULL);
}
static int param(cm_graph *g, const char *name, int rank, const int64_t *dims) {
  cm_init init = {CM_INIT_UNIFORM, -1, 1};
  return cm_param(g, name, CM_F64, rank, dims, init);
}
static int linear(cm_graph *g, int x, int64_t in, int64_t out, const char *name) {
  char nb[64];
  int64_t dw[2] = {in, out}, db[1] = {out};
  snprintf(nb, sizeof nb, "%s.weight", name);
  int w = param(g, nb, 2, dw);
  snprintf(nb, sizeof nb, "%s.bias", name);
  int b = param(g, nb, 1, db);
  int y = cm_matmul(g, x, w, false, false, NULL);
  return cm_binary(g, CM_OP_ADD, y, bcast_to(g, b, y), NULL);
}
static int weighted_sum(cm_graph *g, int y) {
  const cm_type t = g->nodes[y].type;
  int64_t n = cm_type_numel(&t);
  double *data = malloc(sizeof(double) * (size_t)n);
  for (int64_t i = 0; i < n; i++) data[i] = next_uniform() * 2 - 1;
  int r = cm_const_data(g, NULL, t.dtype, t.rank, t.dims, data);
  free(data);
  int axes[CM_MAX_RANK];
  for (int i = 0; i < t.rank; i++) axes[i] = i;
  return cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, r, NULL), t.rank, axes, false,
                   NULL);
}

static void fill_source(const cm_node *n, cm_tensor *t) {
  cm_tensor_alloc(t, n->type, NULL);
  double lo = -1, hi = 1;
  if (!strcmp(n->name, "beta1"))
    lo = hi = 0.9;
  else if (!strcmp(n->name, "beta2"))
    lo = hi = 0.999;
  else if (!strcmp(n->name, "step"))
    lo = hi = 3;
  else if (!strcmp(n->name, "lr"))
    lo = hi = 0.01;
  else if (!strcmp(n->name, "momentum"))
    lo = hi = 0.99;
  else if (strstr(n->name, "exp_avg_sq"))
    lo = 0.1, hi = 1;
  for (int64_t e = 0; e < cm_type_numel(&n->type); e++) {
    if (!cm_dtype_is_float(n->type.dtype))
      cm_tensor_set_i64(t, e, (int64_t)lo);
    else
      cm_tensor_set_f64(t, e, lo + (hi - lo) * next_uniform());
  }
}

/* ---- a serial reference interpreter of the kernel IR (doubles) ----------- */

static cm_tensor view(const cm_kbuffer *b, void *data) {
  cm_tensor t;
  memset(&t, 0, sizeof t);
  t.type.dtype = b->dtype;
  t.type.rank = 1;
  t.type.dims[0] = b->numel;
  t.data = data;
  return t;
}

static double round_to(cm_dtype dt, double v) {
  if (dt == CM_F32) return (double)(float)v;
  if (cm_dtype_is_int(dt)) return trunc(v);
  if (dt == CM_BOOL) return v != 0;
  return v;
}

static double op_value(cm_op op, cm_dtype dt, double a, double b, double c) {
  bool in = cm_dtype_is_int(dt);
  switch (op) {
  case CM_OP_NEG: return -a;
  case CM_OP_ABS: return fabs(a);
  case CM_OP_EXP: return exp(a);
  case CM_OP_LOG: return log(a);
  case CM_OP_SQRT: return sqrt(a);
  case CM_OP_RSQRT: return 1 / sqrt(a);
  case CM_OP_RECIP: return 1 / a;
  case CM_OP_TANH: return tanh(a);
  case CM_OP_ERF: return erf(a);
  case CM_OP_RELU: return a > 0 ? a : 0;
  case CM_OP_STOP_GRADIENT:
  case CM_OP_CAST: return a;
  case CM_OP_ADD: return a + b;
  case CM_OP_SUB: return a - b;
  case CM_OP_MUL: return a * b;
  case CM_OP_DIV: return in ? trunc(a / b) : a / b;
  case CM_OP_MAX: return a > b ? a : b;
  case CM_OP_MIN: return a < b ? a : b;
  case CM_OP_POW: return pow(a, b);
  case CM_OP_LT: return a < b;
  case CM_OP_LE: return a <= b;
  case CM_OP_EQ: return a == b;
  case CM_OP_NE: return a != b;
  case CM_OP_SELECT: return a != 0 ? b : c;
  default: return NAN;
  }
}

static void eval_exprs(const cm_kstage *s, const cm_kernel *k, cm_tensor *views,
                       const int64_t *vars, double acc, double *v) {
  for (int i = 0; i < s->n_exprs; i++) {
    const cm_kexpr *e = &s->exprs[i];
    switch (e->kind) {
    case CM_KX_CONST: v[i] = e->value; break;
    case CM_KX_VAR: v[i] = (double)vars[e->var]; break;
    case CM_KX_ACC: v[i] = acc; break;
    case CM_KX_LOAD: {
      int64_t at = (int64_t)v[e->a];
      v[i] = at >= 0 && at < k->buffers[e->buf].numel ? cm_tensor_get_f64(&views[e->buf], at) : NAN;
      break;
    }
    case CM_KX_MOD: v[i] = (double)((int64_t)v[e->a] % (int64_t)v[e->b]); break;
    case CM_KX_OP:
      v[i] = round_to(e->dtype, op_value(e->op, e->dtype, v[e->a], e->b >= 0 ? v[e->b] : 0,
                                         e->c >= 0 ? v[e->c] : 0));
      break;
    }
  }
}

static bool next_point(int64_t *vars, const int64_t *ext, int from, int n) {
  for (int i = from + n - 1; i >= from; i--) {
    if (++vars[i] < ext[i - from]) return true;
    vars[i] = 0;
  }
  return false;
}

static void interpret(const cm_kernel *k, void **bufs) {
  cm_tensor *views = calloc((size_t)k->n_buffers, sizeof *views);
  for (int b = 0; b < k->n_buffers; b++) views[b] = view(&k->buffers[b], bufs[b]);
  for (int si = 0; si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    double *v = malloc(sizeof(double) * (size_t)(s->n_exprs + 1));
    double stv[CM_KMAX_STORES];
    int64_t vars[CM_KMAX_VARS] = {0};
    bool more = true;
    while (more) {
      double acc = s->red_op == CM_KRED_MAX ? -INFINITY : 0;
      if (s->n_red > 0) {
        for (int r = 0; r < s->n_red; r++) vars[s->n_dom + r] = 0;
        bool rm = true;
        while (rm) {
          eval_exprs(s, k, views, vars, 0, v);
          double x = v[s->body];
          acc = s->red_op == CM_KRED_MAX ? (x > acc ? x : acc) : acc + x;
          rm = next_point(vars, s->red, s->n_dom, s->n_red);
        }
        acc = round_to(s->acc_dtype, acc);
      }
      eval_exprs(s, k, views, vars, acc, v);
      for (int t = 0; t < s->n_stores; t++) stv[t] = v[s->stores[t].value];
      for (int t = 0; t < s->n_stores; t++) {
        const cm_kstore *st = &s->stores[t];
        int64_t at = (int64_t)v[st->index];
        CHECK_MSG(at >= 0 && at < k->buffers[st->buf].numel, "%s %s: store index %lld of %lld",
                  k->name, s->name, (long long)at, (long long)k->buffers[st->buf].numel);
        if (at < 0 || at >= k->buffers[st->buf].numel) continue;
        double old = s->accumulate ? cm_tensor_get_f64(&views[st->buf], at) : 0;
        cm_tensor_set_f64(&views[st->buf], at, old + stv[t]);
      }
      more = next_point(vars, s->dom, 0, s->n_dom);
    }
    free(v);
  }
  free(views);
}

/* ---- lowering and running a whole plan ---------------------------------- */

typedef struct lower_stats {
  int gemm_stages, reduce_stages, stages, fused_epilogues, update_kernels, update_stages;
} lower_stats;

/* Sources by name from a bound reference graph (model variants), else random. */
static const cm_graph *bound_graph;
static const cm_tensor **bound_src;

static double run_case(const cm_graph *g0, const char *what, bool no_templates, lower_stats *ls) {
  cm_pass_state s = {cm_graph_clone(g0), NULL};
  cm_err err = {0};
  cm_status st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
  CHECK_MSG(st == CM_OK, "%s: pipeline: %s", what, err.msg);
  double worst = -1;
  if (st) goto out;
  const cm_graph *g = s.g;
  cm_lower_opts lo = {NULL, no_templates, 0};
  cm_kprogram prog;
  st = cm_lower_plan(g, s.plan, &lo, &prog, &err);
  CHECK_MSG(st == CM_OK, "%s: lower: %s", what, err.msg);
  if (st) goto out;
  CHECK(prog.n_kernels == s.plan->n_order);
  int n = g->n_nodes;
  cm_tensor *src = calloc((size_t)n, sizeof *src), *live = calloc((size_t)n, sizeof *live);
  const cm_tensor **sources = calloc((size_t)n, sizeof *sources);
  for (int v = 0; v < n; v++) {
    cm_op op = g->nodes[v].op;
    if (op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE) {
      int r = bound_graph ? cm_graph_find(bound_graph, g->nodes[v].name) : -1;
      if (r >= 0 && bound_src[r])
        cm_tensor_copy(&src[v], bound_src[r], NULL);
      else
        fill_source(&g->nodes[v], &src[v]);
      sources[v] = &src[v];
      cm_tensor_copy(&live[v], &src[v], NULL);
    }
  }
  char *arena = calloc((size_t)prog.arena_bytes + 64, 1);
  char *scratch = calloc((size_t)prog.max_scratch_bytes + 64, 1);
  /* per node: each group output as its kernel left it; a kernel's inputs as it read them */
  cm_tensor *written = calloc((size_t)n, sizeof *written), *in = calloc((size_t)n, sizeof *in);
  cm_tensor *vals = calloc((size_t)n, sizeof *vals), *got = calloc((size_t)n, sizeof *got);
  const cm_tensor **in_src = calloc((size_t)n, sizeof *in_src);
  worst = 0;
  for (int i = 0; i < prog.n_kernels && !st; i++) {
    const cm_kernel *k = &prog.kernels[i];
    const cm_group *gr = &s.plan->groups[k->group];
    void **bufs = calloc((size_t)k->n_buffers + 1, sizeof *bufs);
    void **consts = calloc((size_t)k->n_buffers + 1, sizeof *consts);
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      CHECK(kb->kind != CM_KBUF_SCRATCH || kb->offset % 64 == 0);
      if (kb->kind == CM_KBUF_ARENA) bufs[b] = arena + kb->offset;
      if (kb->kind == CM_KBUF_SCRATCH) bufs[b] = scratch + kb->offset;
      if (kb->kind == CM_KBUF_SOURCE) bufs[b] = live[kb->node].data;
      if (kb->kind == CM_KBUF_STATUS) bufs[b] = consts[b] = calloc((size_t)kb->numel, 8);
      if (kb->kind == CM_KBUF_CONST) {
        const cm_node *cn = &g->nodes[kb->node];
        consts[b] = malloc(cm_dtype_size(kb->dtype) * (size_t)kb->numel + 8);
        cm_tensor t = view(kb, consts[b]);
        for (int64_t e = 0; e < kb->numel; e++) cm_tensor_set_f64(&t, e, cn->attrs.data[e]);
        bufs[b] = consts[b];
      }
    }
    for (int si = 0; si < k->n_stages; si++) {
      const cm_kstage *ks = &k->stages[si];
      ls->stages++;
      ls->gemm_stages += ks->tmpl == CM_KT_GEMM;
      for (int t = 0; t < ks->n_stores && ks->n_red > 0; t++)
        ls->fused_epilogues += ks->exprs[ks->stores[t].value].kind != CM_KX_ACC;
      ls->reduce_stages += ks->n_red > 0 && ks->tmpl != CM_KT_GEMM;
      if (ks->tmpl == CM_KT_GEMM)
        CHECK(ks->tiles.mc % ks->tiles.mr == 0 && ks->tiles.nc % ks->tiles.nr == 0 &&
              ks->tiles.kc >= 1 && ks->tiles.kc <= ks->red[0]);
    }
    if (k->kind == CM_GROUP_UPDATE) { /* one stage per distinct output shape */
      int shapes = 0, reds = 0;
      for (int o = 0; o < gr->n_outputs; o++) {
        bool seen = false;
        for (int q = 0; q < o; q++)
          seen |= cm_type_equal(&g->nodes[gr->outputs[q]].type, &g->nodes[gr->outputs[o]].type);
        shapes += !seen;
      }
      for (int si = 0; si < k->n_stages; si++) reds += k->stages[si].n_red > 0;
      if (!reds)
        CHECK_MSG(k->n_stages == shapes, "%s: %d stages for %d shapes", k->name, k->n_stages,
                  shapes);
      ls->update_kernels++;
      ls->update_stages += k->n_stages;
    }
    /* the inputs: what their producers wrote (sources: as bound), kept for the oracle */
    for (int j = 0; j < gr->n_inputs; j++) {
      int v = gr->inputs[j];
      const cm_node *u = &g->nodes[v];
      bool fed = u->op == CM_OP_INPUT || u->op == CM_OP_PARAM || u->op == CM_OP_STATE;
      if (!fed && s.plan->offset[v] < 0) {
        CHECK_MSG(false, "%s: kernel %s reads \"%s\", which has no place in the arena", what,
                  k->name, u->name);
        continue;
      }
      cm_tensor cur = fed ? live[v] : test_view(u->type, arena + s.plan->offset[v]);
      const cm_tensor *was = fed ? &src[v] : &written[v];
      CHECK_MSG(was->data && !memcmp(cur.data, was->data, cm_type_nbytes(&u->type)),
                "%s: kernel %s reads \"%s\", changed since it was %s", what, k->name, u->name,
                fed ? "bound" : "written");
      cm_tensor_copy(&in[v], &cur, NULL);
      if (fed)
        in_src[v] = &in[v];
      else
        vals[v] = in[v];
    }
    interpret(k, bufs);
    for (int j = 0; j < gr->n_outputs; j++) {
      int v = gr->outputs[j];
      const cm_node *u = &g->nodes[v];
      got[v] = u->op == CM_OP_ASSIGN ? live[u->inputs[0]]
                                     : test_view(u->type, arena + s.plan->offset[v]);
      cm_tensor_copy(&written[v], &got[v], NULL);
    }
    int at = -1;
    char label[96];
    snprintf(label, sizeof label, "%s (%s)", what, no_templates ? "no templates" : "templates");
    test_bounded r = test_check_group(g, s.plan, k->group, in_src, vals, got, label, &at, &err);
    CHECK_MSG(r.ratio <= 1,
              "%s: kernel %s, output %s: |kernel - f64| = %g at [%lld] exceeds its error bound %g "
              "(%s)",
              label, k->name, at >= 0 ? g->nodes[at].name : "?", r.diff, (long long)r.at, r.bound,
              isinf(r.ratio) && r.at < 0 ? err.msg : "");
    worst = fmax(worst, r.ratio);
    for (int j = 0; j < gr->n_inputs; j++) {
      int v = gr->inputs[j];
      cm_tensor_free(&in[v]);
      memset(&vals[v], 0, sizeof vals[v]);
      in_src[v] = NULL;
    }
    for (int b = 0; b < k->n_buffers; b++) free(consts[b]);
    free(consts);
    free(bufs);
  }
  free(arena), free(scratch);
  for (int v = 0; v < n; v++)
    cm_tensor_free(&src[v]), cm_tensor_free(&live[v]), cm_tensor_free(&written[v]);
  free(src), free(live), free(sources), free(written), free(in), free(vals), free(got),
      free(in_src);
  cm_kprogram_free(&prog);
out:
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  return worst;
}

static cm_graph *train_step(const cm_graph *fwd, int loss) {
  cm_optim_config cfg;
  cm_optim_config_default(&cfg);
  cm_graph *step = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  cm_status st = cm_build_train_step(fwd, loss, &cfg, &step, &info, &err);
  CHECK_MSG(st == CM_OK, "build step: %s", err.msg);
  return step;
}

static int check_graph(cm_graph *g, const char *what, bool expect_gemm, bool expect_epilogue) {
  int gemm = 0;
  for (int nt = 0; nt < 2; nt++) {
    lower_stats ls = {0};
    double worst = run_case(g, what, nt, &ls);
    CHECK_MSG(worst >= 0 && worst <= 1, "%s (%s): worst |kernel - f64| / bound %.3g", what,
              nt ? "no templates" : "templates", worst);
    CHECK(ls.stages > 0);
    if (!nt) gemm = ls.gemm_stages;
    if (ls.update_kernels > 0) CHECK(ls.update_stages >= 2); /* params of several shapes */
    if (expect_epilogue) CHECK_MSG(ls.fused_epilogues > 0, "%s: no epilogue fused", what);
    if (expect_gemm) {
      CHECK_MSG(nt ? ls.gemm_stages == 0 : ls.gemm_stages > 0, "%s: %d GEMM stages", what,
                ls.gemm_stages);
      CHECK(ls.reduce_stages > 0);
    }
  }
  return gemm;
}

static void test_mlp_forward(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {5, 7};
  int x = cm_input(g, "x", CM_F64, 2, d);
  int64_t dd[1] = {7};
  int h = layer_norm(g, x, param(g, "ln.w", 1, dd), param(g, "ln.b", 1, dd));
  h = gelu(g, linear(g, h, 7, 13, "fc1"));
  int y = linear(g, h, 13, 3, "fc2");
  cm_graph_add_output(g, y, NULL);
  CHECK(cm_graph_error(g) == NULL);
  check_graph(g, "mlp forward", true, true);
  cm_graph_free(g);
}

static void test_mlp_train_step(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {3, 5};
  int x = cm_input(g, "x", CM_F64, 2, d);
  int h = gelu(g, linear(g, x, 5, 11, "fc1"));
  int loss = weighted_sum(g, linear(g, h, 11, 2, "fc2"));
  CHECK(cm_graph_error(g) == NULL);
  cm_graph *step = train_step(g, loss);
  if (step) check_graph(step, "mlp train step", true, false);
  cm_graph_free(step);
  cm_graph_free(g);
}

static void test_batched_matmul(void) {
  cm_graph *g = cm_graph_new();
  int64_t da[3] = {2, 3, 5}, db[3] = {1, 4, 5};
  int a = cm_input(g, "a", CM_F64, 3, da), b = cm_input(g, "b", CM_F64, 3, db);
  int c = cm_matmul(g, a, b, false, true, NULL); /* [2,3,4], b broadcast over the batch */
  int perm[3] = {0, 2, 1};
  int y = cm_permute(g, cm_unary(g, CM_OP_TANH, c, NULL), perm, NULL);
  cm_graph_add_output(g, y, NULL);
  cm_graph_add_output(g, c, NULL);
  CHECK(cm_graph_error(g) == NULL);
  check_graph(g, "batched matmul", false, false);
  cm_graph_free(g);
}

/* attention (batched transposed matmul, softmax) and its backward */
static void test_attention_train_step(void) {
  cm_graph *g = cm_graph_new();
  int64_t B = 2, L = 3, D = 6, H = 2;
  int64_t d[3] = {B, L, D}, flat[2] = {B * L, D}, heads[4] = {B, L, H, D / H};
  int perm[4] = {0, 2, 1, 3};
  int x = cm_input(g, "x", CM_F64, 3, d);
  int h = cm_reshape(g, x, 2, flat, NULL);
  int qkv[3];
  for (int i = 0; i < 3; i++) {
    char nb[16];
    snprintf(nb, sizeof nb, "attn.%c", "qkv"[i]);
    qkv[i] = cm_permute(g, cm_reshape(g, linear(g, h, D, D, nb), 4, heads, NULL), perm, NULL);
  }
  int s = cm_matmul(g, qkv[0], qkv[1], false, true, NULL);
  int ax = 3;
  int m =
      cm_unary(g, CM_OP_STOP_GRADIENT, cm_reduce(g, CM_OP_REDUCE_MAX, s, 1, &ax, true, NULL), NULL);
  int e = cm_unary(g, CM_OP_EXP, cm_binary(g, CM_OP_SUB, s, bcast_to(g, m, s), NULL), NULL);
  int p = cm_binary(g, CM_OP_DIV, e,
                    bcast_to(g, cm_reduce(g, CM_OP_REDUCE_SUM, e, 1, &ax, true, NULL), e), NULL);
  int o = cm_reshape(g, cm_permute(g, cm_matmul(g, p, qkv[2], false, false, NULL), perm, NULL), 2,
                     flat, NULL);
  int loss = weighted_sum(g, linear(g, o, D, D, "proj"));
  CHECK(cm_graph_error(g) == NULL);
  cm_graph *step = train_step(g, loss);
  if (step) check_graph(step, "attention train step", true, false);
  cm_graph_free(step);
  cm_graph_free(g);
}

/* movement: slice with a step, concat of three, pad, gather by a computed index */
static void test_movement(void) {
  cm_graph *g = cm_graph_new();
  int64_t da[2] = {5, 7}, db[2] = {5, 2};
  int a = cm_input(g, "a", CM_F64, 2, da), b = cm_input(g, "b", CM_F64, 2, db);
  int64_t st[2] = {1, 0}, sp[2] = {5, 7}, step[2] = {2, 3};
  int sl = cm_slice(g, a, st, sp, step, NULL); /* [2, 3] */
  int64_t lo[2] = {1, 2}, hi[2] = {2, 0};
  int pd = cm_pad(g, sl, lo, hi, 0.5, NULL); /* [5, 5] */
  int xs[3] = {b, cm_unary(g, CM_OP_EXP, pd, NULL), a};
  int cat = cm_concat(g, 3, xs, 1, NULL); /* [5, 14] */
  int64_t di[2] = {5, 14};
  int io = cm_iota(g, NULL, CM_I64, 2, di, 1);
  int64_t ring[2] = {5, 14};
  int idx = cm_binary(g, CM_OP_SUB, cm_const_fill(g, NULL, CM_I64, 2, ring, 13), io, NULL);
  int ga = cm_gather(g, cat, idx, 1, NULL); /* reversed along axis 1 */
  cm_graph_add_output(g, cm_binary(g, CM_OP_MUL, ga, cat, NULL), NULL);
  cm_graph_add_output(g, pd, NULL);
  /* scatter_add with colliding indices: iota % 3 along axis 1 of a [5, 7] */
  int64_t du[2] = {5, 7};
  int sidx = cm_binary(g, CM_OP_SUB, cm_iota(g, NULL, CM_I64, 2, du, 1),
                       cm_binary(g, CM_OP_MUL, cm_const_fill(g, NULL, CM_I64, 2, du, 3),
                                 cm_binary(g, CM_OP_DIV, cm_iota(g, NULL, CM_I64, 2, du, 1),
                                           cm_const_fill(g, NULL, CM_I64, 2, du, 3), NULL),
                                 NULL),
                       NULL);
  int sc = cm_scatter_add(g, cm_unary(g, CM_OP_NEG, pd, NULL), sidx,
                          cm_unary(g, CM_OP_TANH, a, NULL), 1, NULL);
  cm_graph_add_output(g, sc, NULL);
  CHECK(cm_graph_error(g) == NULL);
  check_graph(g, "movement", false, false);
  cm_graph_free(g);
}

/* conv2d (dense and depthwise; stride 2, padding, dilation, odd sizes) and its
 * two adjoints through a training step */
static void test_conv_train_step(void) {
  const int cfg[3][4] = {{1, 1, 1, 1}, {2, 1, 1, 3}, {1, 2, 2, 1}}; /* stride, pad, dil, groups */
  for (int k = 0; k < 3; k++) {
    cm_graph *g = cm_graph_new();
    int64_t C = 3, dx[4] = {2, C, 7, 5}, dw[4] = {cfg[k][3] == 1 ? 4 : C, C / cfg[k][3], 3, 2};
    int x = param(g, "x", 4, dx); /* a param: its adjoint needs conv2d_grad_input */
    int w = param(g, "conv.weight", 4, dw);
    int st[2] = {cfg[k][0], cfg[k][0]}, pd[2] = {cfg[k][1], 0}, dl[2] = {cfg[k][2], 1};
    int y = cm_conv2d(g, x, w, st, pd, dl, cfg[k][3], NULL);
    int loss = weighted_sum(g, cm_unary(g, CM_OP_TANH, y, NULL));
    CHECK_MSG(cm_graph_error(g) == NULL, "conv %d: %s", k, cm_graph_error(g));
    cm_graph *step = cm_graph_error(g) ? NULL : train_step(g, loss);
    /* dense conv2d becomes an implicit GEMM; depthwise stays a generic reduction */
    if (step) {
      int gemm = check_graph(step, "conv train step", false, false);
      CHECK_MSG(cfg[k][3] == 1 ? gemm == 1 : gemm == 0, "conv %d: %d GEMM stages", k, gemm);
    }
    cm_graph_free(step);
    cm_graph_free(g);
  }
}

/* Every group of each shipped variant's training step (shrunk) lowers, with
 * and without templates; every group output is stored by some stage. (Not yet
 * interpreted against the oracle: needs the model's source binding.) */
static void lower_variant(const char *path, const char *const *ov, int n_ov, bool evaluate) {
  cm_model_config cfg;
  cm_err err = {0};
  CHECK_MSG(cm_model_config_load(path, ov, n_ov, &cfg, &err) == CM_OK, "%s", err.msg);
  cm_model_build_opts bo = {2, 1, CM_F32};
  cm_model m;
  CHECK_MSG(cm_model_build(&cfg, &bo, &m, &err) == CM_OK, "%s: %s", path, err.msg);
  if (!m.g) return;
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m.g, m.loss, &oc, &step, &info, &err) == CM_OK, "%s: %s", path,
            err.msg);
  if (step && evaluate) { /* lowered kernels against the oracle on bound sources */
    cm_tensor *t = calloc((size_t)step->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)step->n_nodes, sizeof *src);
    test_bind_step(step, &cfg, &m, t, src, next_uniform);
    bound_graph = step, bound_src = src;
    check_graph(step, path, true, false);
    bound_graph = NULL, bound_src = NULL;
    for (int i = 0; i < step->n_nodes; i++) cm_tensor_free(&t[i]);
    free(t), free(src);
  }
  cm_pass_state s = {step ? cm_graph_clone(step) : NULL, NULL};
  if (step && cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK) {
    for (int nt = 0; nt < 2; nt++) {
      cm_lower_opts lo = {NULL, nt, 0};
      cm_kprogram prog;
      cm_status st = cm_lower_plan(s.g, s.plan, &lo, &prog, &err);
      CHECK_MSG(st == CM_OK, "%s: lower: %s", path, err.msg);
      if (st) continue;
      CHECK(prog.n_kernels == s.plan->n_order && prog.arena_bytes == s.plan->arena_bytes);
      for (int i = 0; i < prog.n_kernels; i++) {
        const cm_kernel *k = &prog.kernels[i];
        const cm_group *gr = &s.plan->groups[k->group];
        for (int o = 0; o < gr->n_outputs; o++) {
          const cm_node *on = &s.g->nodes[gr->outputs[o]];
          int want = on->op == CM_OP_ASSIGN ? on->inputs[0] : gr->outputs[o];
          bool stored = false;
          for (int si = 0; si < k->n_stages; si++)
            for (int t = 0; t < k->stages[si].n_stores; t++)
              stored |= k->buffers[k->stages[si].stores[t].buf].node == want;
          CHECK_MSG(stored, "%s: %s: output %s never stored", path, k->name, on->name);
        }
      }
      cm_kprogram_free(&prog);
    }
  } else {
    CHECK_MSG(!step, "%s: pipeline: %s", path, err.msg);
  }
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  cm_graph_free(step);
  cm_model_free(&m);
}

static void test_model_variants_lower(void) {
  /* Opt-in: this serial interpreter needs minutes per tiny variant. The
   * gradients and new states of the f32 variants differ from the f64 oracle
   * by up to 1e-3 relative (0.3 for parameters whose true gradient is ~0,
   * where AdamW's normalization amplifies rounding): rounding only, checked
   * kernel by kernel, every output within its error bound (worst ratio 0.9997,
   * a single correctly rounded add just above a power of two). Known gap: the
   * update kernels have more stages than distinct output shapes here
   * (k250_update: 25 stages for 12 shapes). */
  bool eval_models = getenv("CMAEC_LOWER_EVAL_MODELS") != NULL;
  lower_variant("models/cmae_vit_tiny_fmnist.json", NULL, 0, eval_models);
  lower_variant("models/cmae_convvit_tiny_fmnist.json", NULL, 0, eval_models);
  lower_variant("models/cmae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_N, false);
  lower_variant("models/mae_vit_base.json", test_shrunk_vit, TEST_SHRUNK_VIT_MAE, false);
  lower_variant("models/cmae_convvit_base.json", test_shrunk_convvit, TEST_SHRUNK_CONVVIT_N, false);
}

static void test_report(void) {
  test_tally_report("lower");
}

TEST_MAIN(TEST(test_model_variants_lower), TEST(test_conv_train_step), TEST(test_movement),
          TEST(test_mlp_forward), TEST(test_mlp_train_step), TEST(test_batched_matmul),
          TEST(test_attention_train_step), TEST(test_report))
