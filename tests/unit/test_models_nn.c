/* Tests of the building blocks (models/nn.c): each block evaluated by the
 * oracle against an independent formula on random inputs, and gradient checks
 * of a transformer block and of the BatchNorm neck. */
#include "../../models/models.h"
#include "../../passes/passes.h"
#include "../test.h"
#include "../testlib.h"

#include <stdint.h>

static test_rng rng_state = {0x2545f4914f6cdd1dull};
static double next_u(void) {
  return test_uniform(&rng_state);
}
static double next_sym(void) {
  return 2.0 * next_u() - 1.0;
}

/* Random values for every source of g (uniform in [-1, 1], shifted by offset
 * for params whose name contains "weight" of a norm, so scales stay away from 0). */
typedef struct sources {
  int n;
  cm_tensor *tensors;
  const cm_tensor **ptrs;
} sources;

static void sources_random(sources *s, const cm_graph *g) {
  s->n = g->n_nodes;
  s->tensors = calloc((size_t)g->n_nodes, sizeof *s->tensors);
  s->ptrs = calloc((size_t)g->n_nodes, sizeof *s->ptrs);
  for (int i = 0; i < g->n_nodes; i++) {
    cm_op op = g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    cm_tensor_alloc(&s->tensors[i], g->nodes[i].type, NULL);
    for (int64_t e = 0; e < cm_type_numel(&g->nodes[i].type); e++)
      cm_tensor_set_f64(&s->tensors[i], e, next_sym());
    s->ptrs[i] = &s->tensors[i];
  }
}

static void sources_free(sources *s) {
  for (int i = 0; i < s->n; i++) cm_tensor_free(&s->tensors[i]);
  free(s->tensors);
  free(s->ptrs);
}

static double *src(sources *s, const cm_graph *g, const char *name) {
  int id = cm_graph_find(g, name);
  CHECK_MSG(id >= 0, "no node %s", name);
  return id >= 0 ? (double *)s->tensors[id].data : NULL;
}

/* Evaluates g in f64 and copies node y's value into out (numel doubles). */
static bool eval_node(const cm_graph *g, sources *s, int y, double *out) {
  CHECK_MSG(cm_graph_error(g) == NULL, "build: %s", cm_graph_error(g));
  if (cm_graph_error(g) || y < 0) return false;
  cm_tensor *vals = calloc((size_t)g->n_nodes, sizeof *vals);
  cm_eval_opts opts = {CM_PRECISION_F64};
  cm_err err = {0};
  cm_status st = cm_eval(g, s->ptrs, vals, &opts, &err);
  CHECK_MSG(st == CM_OK, "eval: %s", err.msg);
  if (st == CM_OK) {
    for (int64_t e = 0; e < cm_type_numel(&vals[y].type); e++)
      out[e] = cm_tensor_get_f64(&vals[y], e);
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&vals[i]);
  }
  free(vals);
  return st == CM_OK;
}

static int input(cm_graph *g, const char *name, int rank, const int64_t *dims) {
  return cm_input(g, name, CM_F64, rank, dims);
}

static void test_linear(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {2, 3, 4};
  int x = input(g, "x", 3, xd);
  int y = cm_nn_linear(g, x, 5, true, "fc", cm_nn_init_xavier(), cm_nn_init_zeros());
  int y2 = cm_nn_linear(g, x, 5, false, "fc_nobias", cm_nn_init_xavier(), cm_nn_init_zeros());
  CHECK(cm_graph_find(g, "fc.weight") >= 0 && cm_graph_find(g, "fc.bias") >= 0);
  CHECK(cm_graph_find(g, "fc_nobias.bias") < 0);
  int wid = cm_graph_find(g, "fc.weight");
  CHECK(g->nodes[wid].type.dims[0] == 5 && g->nodes[wid].type.dims[1] == 4);
  CHECK(g->nodes[y2].type.rank == 3 && g->nodes[y2].type.dims[2] == 5);
  sources s;
  sources_random(&s, g);
  double out[30];
  if (eval_node(g, &s, y, out)) {
    double *xv = src(&s, g, "x"), *w = src(&s, g, "fc.weight"), *b = src(&s, g, "fc.bias");
    for (int r = 0; r < 6; r++)
      for (int o = 0; o < 5; o++) {
        double ref = b[o];
        for (int i = 0; i < 4; i++) ref += xv[r * 4 + i] * w[o * 4 + i];
        CHECK_NEAR(out[r * 5 + o], ref, 1e-12);
      }
  }
  sources_free(&s);
  cm_graph_free(g);
}

static void test_layer_norm(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {3, 7};
  int x = input(g, "x", 2, xd);
  int y = cm_nn_layer_norm(g, x, 1e-6, "ln");
  sources s;
  sources_random(&s, g);
  double *xv = src(&s, g, "x");
  for (int i = 0; i < 21; i++) xv[i] = 3.0 + 2.0 * xv[i]; /* a non-zero mean */
  double out[21];
  if (eval_node(g, &s, y, out)) {
    double *w = src(&s, g, "ln.weight"), *b = src(&s, g, "ln.bias");
    for (int r = 0; r < 3; r++) {
      double mean = 0, var = 0;
      for (int j = 0; j < 7; j++) mean += xv[r * 7 + j] / 7;
      for (int j = 0; j < 7; j++) var += (xv[r * 7 + j] - mean) * (xv[r * 7 + j] - mean) / 7;
      for (int j = 0; j < 7; j++)
        CHECK_NEAR(out[r * 7 + j], (xv[r * 7 + j] - mean) / sqrt(var + 1e-6) * w[j] + b[j], 1e-12);
    }
  }
  sources_free(&s);
  cm_graph_free(g);
}

static void test_gelu_softmax_mean(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {4, 6};
  int x = input(g, "x", 2, xd);
  int ge = cm_nn_gelu(g, x);
  int sm = cm_nn_softmax(g, x);
  int axis0 = 0;
  int mean0 = cm_nn_mean(g, x, 1, &axis0, false);
  sources s;
  sources_random(&s, g);
  double *xv = src(&s, g, "x");
  for (int i = 0; i < 24; i++) xv[i] *= 4.0;
  for (int j = 0; j < 6; j++) xv[18 + j] += 800.0; /* exp would overflow without the max shift */
  double out[24], m[6];
  if (eval_node(g, &s, ge, out))
    for (int i = 0; i < 24; i++) CHECK_NEAR(out[i], 0.5 * xv[i] * erfc(-xv[i] / sqrt(2.0)), 1e-12);
  if (eval_node(g, &s, sm, out)) {
    for (int r = 0; r < 4; r++) {
      double den = 0, total = 0;
      for (int j = 0; j < 6; j++) den += exp(xv[r * 6 + j] - xv[r * 6]);
      for (int j = 0; j < 6; j++) {
        CHECK_NEAR(out[r * 6 + j], exp(xv[r * 6 + j] - xv[r * 6]) / den, 1e-12);
        total += out[r * 6 + j];
      }
      CHECK_NEAR(total, 1.0, 1e-12);
    }
  }
  if (eval_node(g, &s, mean0, m))
    for (int j = 0; j < 6; j++)
      CHECK_NEAR(m[j], (xv[j] + xv[6 + j] + xv[12 + j] + xv[18 + j]) / 4, 1e-12);
  sources_free(&s);
  cm_graph_free(g);
  /* Known values of the exact (erf) GELU, not the tanh approximation. */
  g = cm_graph_new();
  double pts[3] = {1.0, -0.5, 2.0};
  int64_t d[1] = {3};
  int c = cm_const_data(g, "c", CM_F64, 1, d, pts);
  int y = cm_nn_gelu(g, c);
  sources_random(&s, g);
  double v[3];
  if (eval_node(g, &s, y, v)) {
    CHECK_NEAR(v[0], 0.8413447460685429, 1e-14);
    CHECK_NEAR(v[1], -0.15426876936299347, 1e-14);
    CHECK_NEAR(v[2], 1.9544997361036416, 1e-14);
  }
  sources_free(&s);
  cm_graph_free(g);
}

static void test_batch_norm(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {5, 3};
  int x = input(g, "x", 2, xd);
  int y = cm_nn_batch_norm(g, x, 1e-6, 1, "bn");
  sources s;
  sources_random(&s, g);
  double *xv = src(&s, g, "x");
  for (int i = 0; i < 15; i++) xv[i] = 1.5 + 3.0 * xv[i];
  double out[15];
  if (eval_node(g, &s, y, out)) {
    double *w = src(&s, g, "bn.weight"), *b = src(&s, g, "bn.bias");
    for (int c = 0; c < 3; c++) {
      double mean = 0, var = 0;
      for (int r = 0; r < 5; r++) mean += xv[r * 3 + c] / 5;
      for (int r = 0; r < 5; r++) var += (xv[r * 3 + c] - mean) * (xv[r * 3 + c] - mean) / 5;
      for (int r = 0; r < 5; r++)
        CHECK_NEAR(out[r * 3 + c], (xv[r * 3 + c] - mean) / sqrt(var + 1e-6) * w[c] + b[c], 1e-12);
    }
  }
  sources_free(&s);
  cm_graph_free(g);

  /* SyncBN: the moments go through all_reduce(mean); the graph verifies. */
  g = cm_graph_new();
  x = input(g, "x", 2, xd);
  y = cm_nn_batch_norm(g, x, 1e-6, 4, "bn");
  int n_reduce = 0;
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_ALL_REDUCE) {
      n_reduce++;
      CHECK(g->nodes[i].attrs.mode == CM_MODE_MEAN && g->nodes[i].attrs.ranks == 4);
    }
  CHECK(n_reduce == 2);
  cm_err err = {0};
  CHECK(y >= 0 && cm_graph_add_output(g, y, &err) == CM_OK);
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  cm_graph_free(g);

  /* One sample has no batch statistics: an error naming the module. */
  g = cm_graph_new();
  int64_t one[2] = {1, 3};
  x = input(g, "x", 2, one);
  CHECK(cm_nn_batch_norm(g, x, 1e-6, 1, "proj.bn0") == -1);
  CHECK(cm_graph_error(g) && strstr(cm_graph_error(g), "proj.bn0"));
  cm_graph_free(g);
}

static void test_l2_normalize(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {3, 4};
  int x = input(g, "x", 2, xd);
  int y = cm_nn_l2_normalize(g, x);
  sources s;
  sources_random(&s, g);
  double *xv = src(&s, g, "x");
  for (int j = 0; j < 4; j++) xv[8 + j] = 1e-14 * (j + 1); /* norm below eps: divide by eps */
  double out[12];
  if (eval_node(g, &s, y, out)) {
    for (int r = 0; r < 3; r++) {
      double nrm = 0;
      for (int j = 0; j < 4; j++) nrm += xv[r * 4 + j] * xv[r * 4 + j];
      nrm = sqrt(nrm);
      for (int j = 0; j < 4; j++)
        CHECK_NEAR(out[r * 4 + j], xv[r * 4 + j] / (nrm > 1e-12 ? nrm : 1e-12), 1e-12);
    }
    CHECK_NEAR(out[8], 1e-2, 1e-12);
  }
  sources_free(&s);
  cm_graph_free(g);
}

static void test_patchify_and_conv(void) {
  cm_graph *g = cm_graph_new();
  const int N = 2, C = 3, H = 6, P = 3, G = H / P;
  int64_t xd[4] = {N, C, H, H};
  int x = input(g, "img", 4, xd);
  int y = cm_nn_patchify(g, x, P);
  CHECK(g->nodes[y].type.dims[1] == G * G && g->nodes[y].type.dims[2] == P * P * C);
  int conv =
      cm_nn_conv2d(g, x, 4, 3, 3, 1, 1, true, "conv", cm_nn_init_xavier(), cm_nn_init_zeros());
  sources s;
  sources_random(&s, g);
  double *img = src(&s, g, "img");
  double out[2 * 4 * 27];
  if (eval_node(g, &s, y, out)) {
    for (int n = 0; n < N; n++)
      for (int ph = 0; ph < G; ph++)
        for (int pw = 0; pw < G; pw++)
          for (int py = 0; py < P; py++)
            for (int px = 0; px < P; px++)
              for (int c = 0; c < C; c++) {
                double got = out[(n * G * G + ph * G + pw) * (P * P * C) + (py * P + px) * C + c];
                double want = img[((n * C + c) * H + ph * P + py) * H + pw * P + px];
                CHECK(got == want);
              }
  }
  /* Conv 3x3 stride 3 padding 1 over 6x6: 2x2 outputs. */
  CHECK(g->nodes[conv].type.dims[1] == 4 && g->nodes[conv].type.dims[2] == 2);
  double cv[2 * 4 * 4];
  if (eval_node(g, &s, conv, cv)) {
    double *w = src(&s, g, "conv.weight"), *b = src(&s, g, "conv.bias");
    for (int n = 0; n < N; n++)
      for (int o = 0; o < 4; o++)
        for (int i = 0; i < 2; i++)
          for (int j = 0; j < 2; j++) {
            double ref = b[o];
            for (int c = 0; c < C; c++)
              for (int u = 0; u < 3; u++)
                for (int v = 0; v < 3; v++) {
                  int hh = i * 3 - 1 + u, ww = j * 3 - 1 + v;
                  if (hh < 0 || hh >= H || ww < 0 || ww >= H) continue;
                  ref += img[((n * C + c) * H + hh) * H + ww] * w[((o * C + c) * 3 + u) * 3 + v];
                }
            CHECK_NEAR(cv[((n * 4 + o) * 2 + i) * 2 + j], ref, 1e-12);
          }
  }
  sources_free(&s);
  cm_graph_free(g);
}

/* Attention against a per-head loop with the qkv split of mmcv (q, k, v, then heads). */
static void test_attention(void) {
  cm_graph *g = cm_graph_new();
  const int N = 2, T = 3, D = 8, H = 2, DH = D / H;
  int64_t xd[3] = {N, T, D};
  int x = input(g, "x", 3, xd);
  int y = cm_nn_attention(g, x, H, true, "attn");
  CHECK(cm_graph_find(g, "attn.qkv.weight") >= 0 && cm_graph_find(g, "attn.proj.bias") >= 0);
  sources s;
  sources_random(&s, g);
  double out[2 * 3 * 8];
  if (eval_node(g, &s, y, out)) {
    double *xv = src(&s, g, "x"), *wq = src(&s, g, "attn.qkv.weight"),
           *bq = src(&s, g, "attn.qkv.bias"), *wp = src(&s, g, "attn.proj.weight"),
           *bp = src(&s, g, "attn.proj.bias");
    for (int n = 0; n < N; n++) {
      double qkv[3][8 * 3]; /* [part][t * D + d] */
      for (int t = 0; t < T; t++)
        for (int o = 0; o < 3 * D; o++) {
          double acc = bq[o];
          for (int i = 0; i < D; i++) acc += xv[(n * T + t) * D + i] * wq[o * D + i];
          qkv[o / D][t * D + o % D] = acc;
        }
      double ctx[3 * 8];
      for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) {
          double sc[3], mx = -1e300, den = 0;
          for (int u = 0; u < T; u++) {
            sc[u] = 0;
            for (int d = 0; d < DH; d++)
              sc[u] += qkv[0][t * D + h * DH + d] * qkv[1][u * D + h * DH + d];
            sc[u] /= sqrt((double)DH);
            if (sc[u] > mx) mx = sc[u];
          }
          for (int u = 0; u < T; u++) den += exp(sc[u] - mx);
          for (int d = 0; d < DH; d++) {
            double acc = 0;
            for (int u = 0; u < T; u++) acc += exp(sc[u] - mx) / den * qkv[2][u * D + h * DH + d];
            ctx[t * D + h * DH + d] = acc;
          }
        }
      for (int t = 0; t < T; t++)
        for (int o = 0; o < D; o++) {
          double acc = bp[o];
          for (int i = 0; i < D; i++) acc += ctx[t * D + i] * wp[o * D + i];
          CHECK_NEAR(out[(n * T + t) * D + o], acc, 1e-12);
        }
    }
  }
  sources_free(&s);
  cm_graph_free(g);
}

/* loss = sum(y * r) with a fixed random r, so every output element matters. */
static int weighted_sum(cm_graph *g, int y) {
  cm_type t = g->nodes[y].type;
  int64_t n = cm_type_numel(&t);
  double *r = malloc((size_t)n * sizeof *r);
  for (int64_t i = 0; i < n; i++) r[i] = next_sym();
  int rc = cm_const_data(g, NULL, t.dtype, t.rank, t.dims, r);
  free(r);
  int axes[CM_MAX_RANK];
  for (int i = 0; i < t.rank; i++) axes[i] = i;
  return cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, rc, NULL), t.rank, axes, false,
                   "loss");
}

static void gradcheck_all_sources(cm_graph *g, int loss, const char *what) {
  CHECK_MSG(cm_graph_error(g) == NULL, "%s: %s", what, cm_graph_error(g));
  if (cm_graph_error(g)) return;
  sources s;
  sources_random(&s, g);
  int wrt[64], n_wrt = 0;
  for (int i = 0; i < g->n_nodes && n_wrt < 64; i++)
    if (s.ptrs[i]) wrt[n_wrt++] = i;
  cm_gradcheck_result res[64];
  cm_err err = {0};
  cm_status st = cm_gradcheck(g, loss, n_wrt, wrt, s.ptrs, 1e-6, res, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  for (int j = 0; j < n_wrt && st == CM_OK; j++) {
    if (strstr(g->nodes[wrt[j]].name, "fc0.bias")) {
      /* BatchNorm right after fc0 removes any per-channel shift: the gradient is exactly 0. */
      CHECK_MSG(res[j].max_abs_gradient < 1e-8, "%s: %s: gradient %.3g, want 0", what,
                g->nodes[wrt[j]].name, res[j].max_abs_gradient);
      continue;
    }
    CHECK_MSG(res[j].max_rel_error < 1e-6, "%s: %s: relative error %.3g", what,
              g->nodes[wrt[j]].name, res[j].max_rel_error);
    CHECK_MSG(res[j].max_abs_gradient > 1e-9, "%s: %s: zero gradient", what, g->nodes[wrt[j]].name);
  }
  CHECK(n_wrt > 3);
  sources_free(&s);
}

static void test_transformer_block_gradients(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {2, 3, 8};
  int x = input(g, "x", 3, xd);
  int y = cm_nn_transformer_block(g, x, 2, 12, true, 1e-6, "layers.0");
  const char *names[] = {"layers.0.ln1.weight",
                         "layers.0.ln1.bias",
                         "layers.0.attn.qkv.weight",
                         "layers.0.attn.qkv.bias",
                         "layers.0.attn.proj.weight",
                         "layers.0.ln2.bias",
                         "layers.0.ffn.layers.0.0.weight",
                         "layers.0.ffn.layers.1.bias"};
  for (int i = 0; i < 8; i++) CHECK_MSG(cm_graph_find(g, names[i]) >= 0, "missing %s", names[i]);
  int h = cm_graph_find(g, "layers.0.ffn.layers.0.0.weight");
  CHECK(h >= 0 && g->nodes[h].type.dims[0] == 12 && g->nodes[h].type.dims[1] == 8);
  gradcheck_all_sources(g, weighted_sum(g, y), "transformer block");
  cm_graph_free(g);
}

static void test_neck_gradients(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {4, 5};
  int x = input(g, "x", 2, xd);
  int y = cm_nn_nonlinear_neck(g, x, 6, 3, 1e-6, 1, "projector");
  CHECK(cm_graph_find(g, "projector.fc0.bias") >= 0 &&
        cm_graph_find(g, "projector.bn0.weight") >= 0);
  CHECK(cm_graph_find(g, "projector.fc1.weight") >= 0 &&
        cm_graph_find(g, "projector.fc1.bias") < 0);
  int fc0 = cm_graph_find(g, "projector.fc0.weight");
  CHECK(fc0 >= 0 && g->nodes[fc0].attrs.init.kind == CM_INIT_TORCH_DEFAULT);
  int fc0b = cm_graph_find(g, "projector.fc0.bias");
  CHECK(fc0b >= 0 && g->nodes[fc0b].attrs.init.kind == CM_INIT_TORCH_DEFAULT &&
        g->nodes[fc0b].attrs.init.a == 5);
  gradcheck_all_sources(g, weighted_sum(g, cm_nn_l2_normalize(g, y)), "bn neck");
  cm_graph_free(g);
}

static void test_bad_inputs(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[3] = {2, 3, 9};
  int x = input(g, "x", 3, xd);
  CHECK(cm_nn_attention(g, x, 2, true, "blk.attn") == -1); /* 9 % 2 */
  CHECK(cm_graph_error(g) && strstr(cm_graph_error(g), "blk.attn"));
  CHECK(cm_nn_linear(g, x, 4, true, "fc", cm_nn_init_xavier(), cm_nn_init_zeros()) ==
        -1); /* sticky */
  cm_graph_free(g);
  g = cm_graph_new();
  int64_t id[4] = {1, 3, 5, 5};
  x = input(g, "img", 4, id);
  CHECK(cm_nn_patchify(g, x, 2) == -1);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_linear), TEST(test_layer_norm), TEST(test_gelu_softmax_mean),
          TEST(test_batch_norm), TEST(test_l2_normalize), TEST(test_patchify_and_conv),
          TEST(test_attention), TEST(test_transformer_block_gradients), TEST(test_neck_gradients),
          TEST(test_bad_inputs))
