/* models/nn.c — neural-network building blocks made of IR primitives only.
 *
 * Each block follows the PyTorch module the official CMAE code uses, so a
 * graph built here computes what the reference computes: nn.Linear,
 * nn.LayerNorm (biased variance), nn.GELU (exact erf form), softmax,
 * nn.SyncBatchNorm in training mode, nn.Conv2d, F.normalize, and mmcv's
 * MultiheadAttention / TransformerEncoderLayer (CMAE.md §3). Builders record
 * the first failure in g->error and return -1. */
#include "models.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Parameter names longer than this are rejected (with a graph error). */
#define NN_NAME_MAX 256

/* "<base>.<suffix>" into buf (NN_NAME_MAX); false with the graph error set when too long. */
static bool nn_name(cm_graph *g, char *buf, const char *base, const char *suffix) {
  int n = snprintf(buf, NN_NAME_MAX, "%s.%s", base ? base : "", suffix);
  if (n < 0 || n >= NN_NAME_MAX) {
    cm_graph_fail(g, "parameter name \"%s.%s\" is longer than %d characters", base ? base : "",
                  suffix, NN_NAME_MAX - 1);
    return false;
  }
  return true;
}

static bool nn_ok(const cm_graph *g, int x) {
  return x >= 0 && x < g->n_nodes && g->error.status == CM_OK;
}

cm_init cm_nn_init_xavier(void) {
  return (cm_init){CM_INIT_XAVIER_UNIFORM, 1.0, 0.0};
}
cm_init cm_nn_init_zeros(void) {
  return (cm_init){CM_INIT_ZEROS, 0.0, 0.0};
}
cm_init cm_nn_init_ones(void) {
  return (cm_init){CM_INIT_ONES, 0.0, 0.0};
}
cm_init cm_nn_init_normal(double std) {
  return (cm_init){CM_INIT_NORMAL, 0.0, std};
}
cm_init cm_nn_init_torch_default(int64_t fan_in) {
  return (cm_init){CM_INIT_TORCH_DEFAULT, (double)fan_in, 0.0};
}

static int nn_scalar(cm_graph *g, int like, double v) {
  return cm_const_scalar(g, NULL, g->nodes[like].type.dtype, v);
}

/* x * v with v a scalar constant of x's dtype. */
static int nn_scale(cm_graph *g, int x, double v) {
  if (!nn_ok(g, x)) return -1;
  return cm_binary_bcast(g, CM_OP_MUL, x, nn_scalar(g, x, v), NULL);
}

int cm_nn_linear(cm_graph *g, int x, int out_features, bool bias, const char *name, cm_init w_init,
                 cm_init b_init) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank < 2 || out_features < 1)
    return cm_graph_fail(
        g,
        "linear \"%s\": needs an input of rank >= 2 and out_features >= 1 (rank %d, "
        "out_features %d)",
        name ? name : "?", t.rank, out_features);
  char buf[NN_NAME_MAX];
  if (!nn_name(g, buf, name, "weight")) return -1;
  int64_t wd[2] = {out_features, t.dims[t.rank - 1]};
  int w = cm_param(g, buf, t.dtype, 2, wd, w_init);
  int y = cm_matmul(g, x, w, false, true, NULL);
  if (!bias) return y;
  if (!nn_name(g, buf, name, "bias")) return -1;
  int64_t bd[1] = {out_features};
  int b = cm_param(g, buf, t.dtype, 1, bd, b_init);
  return cm_binary_bcast(g, CM_OP_ADD, y, b, NULL);
}

/* Mean over the last axis, kept as size 1. */
static int nn_mean_last(cm_graph *g, int x) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  int axis = t.rank - 1;
  return cm_nn_mean(g, x, 1, &axis, true);
}

int cm_nn_layer_norm(cm_graph *g, int x, double eps, const char *name) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank < 1) return cm_graph_fail(g, "layer_norm \"%s\": needs rank >= 1", name ? name : "?");
  int centered = cm_binary_bcast(g, CM_OP_SUB, x, nn_mean_last(g, x), NULL);
  int var = nn_mean_last(g, cm_binary(g, CM_OP_MUL, centered, centered, NULL));
  int inv = cm_unary(g, CM_OP_RSQRT, cm_binary_bcast(g, CM_OP_ADD, var, nn_scalar(g, x, eps), NULL),
                     NULL);
  int y = cm_binary_bcast(g, CM_OP_MUL, centered, inv, NULL);
  char buf[NN_NAME_MAX];
  int64_t d[1] = {t.dims[t.rank - 1]};
  if (!nn_name(g, buf, name, "weight")) return -1;
  int w = cm_param(g, buf, t.dtype, 1, d, cm_nn_init_ones());
  if (!nn_name(g, buf, name, "bias")) return -1;
  int b = cm_param(g, buf, t.dtype, 1, d, cm_nn_init_zeros());
  return cm_binary_bcast(g, CM_OP_ADD, cm_binary_bcast(g, CM_OP_MUL, y, w, NULL), b, NULL);
}

int cm_nn_gelu(cm_graph *g, int x) {
  if (!nn_ok(g, x)) return -1;
  int e = cm_unary(g, CM_OP_ERF, nn_scale(g, x, 1.0 / sqrt(2.0)), NULL);
  int one_plus = cm_binary_bcast(g, CM_OP_ADD, e, nn_scalar(g, x, 1.0), NULL);
  return cm_binary(g, CM_OP_MUL, nn_scale(g, x, 0.5), one_plus, NULL);
}

int cm_nn_softmax(cm_graph *g, int x) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank < 1) return cm_graph_fail(g, "softmax: needs rank >= 1");
  int axis = t.rank - 1;
  /* The max only stabilizes; softmax does not depend on it, so no gradient flows through it. */
  int m = cm_unary(g, CM_OP_STOP_GRADIENT, cm_reduce(g, CM_OP_REDUCE_MAX, x, 1, &axis, true, NULL),
                   NULL);
  int e = cm_unary(g, CM_OP_EXP, cm_binary_bcast(g, CM_OP_SUB, x, m, NULL), NULL);
  int s = cm_reduce(g, CM_OP_REDUCE_SUM, e, 1, &axis, true, NULL);
  return cm_binary_bcast(g, CM_OP_DIV, e, s, NULL);
}

int cm_nn_mean(cm_graph *g, int x, int n_axes, const int *axes, bool keepdims) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (n_axes < 0 || n_axes > t.rank || (n_axes > 0 && !axes))
    return cm_graph_fail(g, "mean: %d axes for rank %d", n_axes, t.rank);
  double count = 1;
  for (int i = 0; i < n_axes; i++) {
    int a = axes[i] < 0 ? axes[i] + t.rank : axes[i];
    if (a < 0 || a >= t.rank)
      return cm_graph_fail(g, "mean: axis %d out of range for rank %d", axes[i], t.rank);
    count *= (double)t.dims[a];
  }
  int s = cm_reduce(g, CM_OP_REDUCE_SUM, x, n_axes, axes, keepdims, NULL);
  return nn_scale(g, s, 1.0 / count);
}

int cm_nn_l2_normalize(cm_graph *g, int x) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank < 1) return cm_graph_fail(g, "l2_normalize: needs rank >= 1");
  int axis = t.rank - 1;
  int sq =
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, x, x, NULL), 1, &axis, true, NULL);
  int norm = cm_unary(g, CM_OP_SQRT, sq, NULL);
  int den = cm_binary_bcast(g, CM_OP_MAX, norm, nn_scalar(g, x, 1e-12), NULL);
  return cm_binary_bcast(g, CM_OP_DIV, x, den, NULL);
}

int cm_nn_batch_norm(cm_graph *g, int x, double eps, int ranks, const char *name) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank != 2 || ranks < 1)
    return cm_graph_fail(g, "batch_norm \"%s\": needs x [n, C] and ranks >= 1 (rank %d, ranks %d)",
                         name ? name : "?", t.rank, ranks);
  if (t.dims[0] * ranks < 2)
    return cm_graph_fail(g,
                         "batch_norm \"%s\": training-mode statistics need more than one sample "
                         "(batch %lld over %d ranks)",
                         name ? name : "?", (long long)t.dims[0], ranks);
  int axis0 = 0;
  int mean = cm_nn_mean(g, x, 1, &axis0, true);
  int centered, var;
  if (ranks == 1) {
    centered = cm_binary_bcast(g, CM_OP_SUB, x, mean, NULL);
    var = cm_nn_mean(g, cm_binary(g, CM_OP_MUL, centered, centered, NULL), 1, &axis0, true);
  } else {
    /* SyncBN: every rank's batch has the same size, so the global moments are rank means. */
    int ex2 = cm_nn_mean(g, cm_binary(g, CM_OP_MUL, x, x, NULL), 1, &axis0, true);
    mean = cm_all_reduce(g, mean, CM_MODE_MEAN, ranks, NULL);
    ex2 = cm_all_reduce(g, ex2, CM_MODE_MEAN, ranks, NULL);
    var = cm_binary(g, CM_OP_SUB, ex2, cm_binary(g, CM_OP_MUL, mean, mean, NULL), NULL);
    centered = cm_binary_bcast(g, CM_OP_SUB, x, mean, NULL);
  }
  int inv = cm_unary(g, CM_OP_RSQRT, cm_binary_bcast(g, CM_OP_ADD, var, nn_scalar(g, x, eps), NULL),
                     NULL);
  int y = cm_binary_bcast(g, CM_OP_MUL, centered, inv, NULL);
  char buf[NN_NAME_MAX];
  int64_t d[1] = {t.dims[1]};
  if (!nn_name(g, buf, name, "weight")) return -1;
  int w = cm_param(g, buf, t.dtype, 1, d, cm_nn_init_ones());
  if (!nn_name(g, buf, name, "bias")) return -1;
  int b = cm_param(g, buf, t.dtype, 1, d, cm_nn_init_zeros());
  return cm_binary_bcast(g, CM_OP_ADD, cm_binary_bcast(g, CM_OP_MUL, y, w, NULL), b, NULL);
}

int cm_nn_conv2d(cm_graph *g, int x, int out_channels, int kernel, int stride, int padding,
                 int groups, bool bias, const char *name, cm_init w_init, cm_init b_init) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank != 4 || out_channels < 1 || kernel < 1 || stride < 1 || padding < 0 || groups < 1 ||
      t.dims[1] % groups != 0 || out_channels % groups != 0)
    return cm_graph_fail(
        g,
        "conv2d \"%s\": needs x [N, C, H, W] and channels divisible by groups (rank %d, "
        "C %lld, out %d, groups %d, kernel %d, stride %d, padding %d)",
        name ? name : "?", t.rank, (long long)(t.rank > 1 ? t.dims[1] : 0), out_channels, groups,
        kernel, stride, padding);
  char buf[NN_NAME_MAX];
  if (!nn_name(g, buf, name, "weight")) return -1;
  int64_t wd[4] = {out_channels, t.dims[1] / groups, kernel, kernel};
  int w = cm_param(g, buf, t.dtype, 4, wd, w_init);
  int st[2] = {stride, stride}, pd[2] = {padding, padding};
  int y = cm_conv2d(g, x, w, st, pd, NULL, groups, NULL);
  if (!bias) return y;
  if (!nn_name(g, buf, name, "bias")) return -1;
  int64_t bd[1] = {out_channels};
  int b = cm_param(g, buf, t.dtype, 1, bd, b_init);
  int64_t b4[4] = {1, out_channels, 1, 1};
  return cm_binary_bcast(g, CM_OP_ADD, y, cm_reshape(g, b, 4, b4, NULL), NULL);
}

int cm_nn_patchify(cm_graph *g, int img, int patch) {
  if (!nn_ok(g, img)) return -1;
  cm_type t = g->nodes[img].type;
  if (t.rank != 4 || patch < 1 || t.dims[2] % patch != 0 || t.dims[3] % patch != 0)
    return cm_graph_fail(g, "patchify: needs img [n, C, H, W] with H and W divisible by patch %d",
                         patch);
  int64_t n = t.dims[0], c = t.dims[1], h = t.dims[2] / patch, w = t.dims[3] / patch;
  int64_t split[6] = {n, c, h, patch, w, patch};
  /* n c h py w px -> n h w py px c */
  const int perm[6] = {0, 2, 4, 3, 5, 1};
  int64_t out[3] = {n, h * w, (int64_t)patch * patch * c};
  return cm_reshape(g, cm_permute(g, cm_reshape(g, img, 6, split, NULL), perm, NULL), 3, out, NULL);
}

/* x [n, L, D] -> x[:, ids, :] (models.h). */
int cm_nn_gather_tokens(cm_graph *g, int x, int ids) {
  if (x < 0 || ids < 0 || g->error.status != CM_OK) return -1;
  cm_type tx = g->nodes[x].type, ti = g->nodes[ids].type;
  if (ti.rank != 2 || ti.dims[0] != tx.dims[0] || !cm_dtype_is_int(ti.dtype)) {
    char a[96], b[96];
    return cm_graph_fail(g, "token gather: ids %s do not index tokens %s (want int [n, K])",
                         cm_type_str(&ti, b, sizeof b), cm_type_str(&tx, a, sizeof a));
  }
  int64_t col[3] = {ti.dims[0], ti.dims[1], 1}, full[3] = {ti.dims[0], ti.dims[1], tx.dims[2]};
  int idx = cm_broadcast(g, cm_reshape(g, ids, 3, col, NULL), 3, full, NULL);
  return cm_gather(g, x, idx, 1, NULL);
}

int cm_nn_attention(cm_graph *g, int x, int heads, bool qkv_bias, const char *name) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank != 3 || heads < 1 || t.dims[2] % heads != 0)
    return cm_graph_fail(g, "attention \"%s\": needs x [n, T, D] with D divisible by heads %d",
                         name ? name : "?", heads);
  int64_t n = t.dims[0], tokens = t.dims[1], width = t.dims[2], head_dim = width / heads;
  char buf[NN_NAME_MAX];
  if (!nn_name(g, buf, name, "qkv")) return -1;
  int qkv =
      cm_nn_linear(g, x, (int)(3 * width), qkv_bias, buf, cm_nn_init_xavier(), cm_nn_init_zeros());
  int64_t split[5] = {n, tokens, 3, heads, head_dim};
  const int to_parts[5] = {2, 0, 3, 1, 4}; /* [3, n, heads, T, head_dim] */
  qkv = cm_permute(g, cm_reshape(g, qkv, 5, split, NULL), to_parts, NULL);
  int parts[3];
  for (int p = 0; p < 3; p++) {
    int64_t start[5] = {p, 0, 0, 0, 0}, stop[5] = {p + 1, n, heads, tokens, head_dim};
    int64_t shape[4] = {n, heads, tokens, head_dim};
    parts[p] = cm_reshape(g, cm_slice(g, qkv, start, stop, NULL, NULL), 4, shape, NULL);
  }
  int scores = nn_scale(g, cm_matmul(g, parts[0], parts[1], false, true, NULL),
                        1.0 / sqrt((double)head_dim));
  int y = cm_matmul(g, cm_nn_softmax(g, scores), parts[2], false, false, NULL);
  const int to_tokens[4] = {0, 2, 1, 3};
  int64_t merged[3] = {n, tokens, width};
  y = cm_reshape(g, cm_permute(g, y, to_tokens, NULL), 3, merged, NULL);
  if (!nn_name(g, buf, name, "proj")) return -1;
  return cm_nn_linear(g, y, (int)width, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros());
}

int cm_nn_transformer_block(cm_graph *g, int x, int heads, int hidden, bool qkv_bias, double eps,
                            const char *name) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank != 3 || hidden < 1)
    return cm_graph_fail(g, "transformer block \"%s\": needs x [n, T, D] and hidden >= 1",
                         name ? name : "?");
  int width = (int)t.dims[2];
  char buf[NN_NAME_MAX];
  if (!nn_name(g, buf, name, "ln1")) return -1;
  int h = cm_nn_layer_norm(g, x, eps, buf);
  if (!nn_name(g, buf, name, "attn")) return -1;
  x = cm_binary(g, CM_OP_ADD, x, cm_nn_attention(g, h, heads, qkv_bias, buf), NULL);
  if (!nn_name(g, buf, name, "ln2")) return -1;
  h = cm_nn_layer_norm(g, x, eps, buf);
  if (!nn_name(g, buf, name, "ffn.layers.0.0")) return -1;
  h = cm_nn_gelu(g, cm_nn_linear(g, h, hidden, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros()));
  if (!nn_name(g, buf, name, "ffn.layers.1")) return -1;
  h = cm_nn_linear(g, h, width, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros());
  return cm_binary(g, CM_OP_ADD, x, h, NULL);
}

int cm_nn_nonlinear_neck(cm_graph *g, int x, int hidden, int out, double bn_eps, int ranks,
                         const char *name) {
  if (!nn_ok(g, x)) return -1;
  cm_type t = g->nodes[x].type;
  if (t.rank != 2) return cm_graph_fail(g, "neck \"%s\": needs x [n, C]", name ? name : "?");
  char buf[NN_NAME_MAX];
  /* PyTorch's default Linear init: the bias bound uses the weight's fan_in. */
  if (!nn_name(g, buf, name, "fc0")) return -1;
  int h = cm_nn_linear(g, x, hidden, true, buf, cm_nn_init_torch_default(0),
                       cm_nn_init_torch_default(t.dims[1]));
  if (!nn_name(g, buf, name, "bn0")) return -1;
  h = cm_unary(g, CM_OP_RELU, cm_nn_batch_norm(g, h, bn_eps, ranks, buf), NULL);
  if (!nn_name(g, buf, name, "fc1")) return -1;
  return cm_nn_linear(g, h, out, false, buf, cm_nn_init_torch_default(0), cm_nn_init_zeros());
}
