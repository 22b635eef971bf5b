/* models/vit.c — the CMAE ViT encoder and the MAE decoder (CMAE.md §3, §5).
 *
 * Encoder params under <prefix> (CMAEViT / mmcls VisionTransformer keys):
 *   patch_embed.projection  conv in_chans -> D, kernel = stride = patch, bias
 *   pos_embed               [1, 1 + L, D] fixed sin-cos, cls slot 0 (frozen)
 *   cls_token               [1, 1, D] N(0, 0.02)
 *   layers.N.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1}
 *   ln1                     final LN (only when final_norm)
 * Decoder params under <prefix> (MAEPretrainDecoder keys):
 *   decoder_embed, mask_token [1, 1, W], decoder_pos_embed [1, cls + L, W]
 *   (frozen), decoder_blocks.N.*, ln1 (the decoder norm), decoder_pred. */
#include "models.h"

#include <stdarg.h>
#include <stdio.h>

#define VIT_NAME_MAX 256

static bool vit_name(cm_graph *g, char *buf, const char *prefix, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static bool vit_name(cm_graph *g, char *buf, const char *prefix, const char *fmt, ...) {
  int n = snprintf(buf, VIT_NAME_MAX, "%s.", prefix);
  if (n < 0 || n >= VIT_NAME_MAX) {
    cm_graph_fail(g, "parameter prefix \"%s\" is too long", prefix);
    return false;
  }
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(buf + n, (size_t)(VIT_NAME_MAX - n), fmt, ap);
  va_end(ap);
  if (m < 0 || m >= VIT_NAME_MAX - n) {
    cm_graph_fail(g, "parameter name under \"%s\" is too long", prefix);
    return false;
  }
  return true;
}

/* x[:, lo:hi, :] of x [n, T, D]. */
static int vit_tokens(cm_graph *g, int x, int64_t lo, int64_t hi) {
  if (x < 0 || g->error.status != CM_OK) return -1;
  cm_type t = g->nodes[x].type;
  int64_t start[3] = {0, lo, 0}, stop[3] = {t.dims[0], hi, t.dims[2]};
  return cm_slice(g, x, start, stop, NULL, NULL);
}

static int vit_blocks(cm_graph *g, int x, int depth, int heads, int hidden, bool qkv_bias,
                      double eps, const char *prefix, const char *what) {
  char buf[VIT_NAME_MAX];
  for (int i = 0; i < depth && x >= 0; i++) {
    if (!vit_name(g, buf, prefix, "%s.%d", what, i)) return -1;
    x = cm_nn_transformer_block(g, x, heads, hidden, qkv_bias, eps, buf);
  }
  return x;
}

int cm_vit_encoder(cm_graph *g, const cm_model_config *cfg, int img, int ids_keep, bool final_norm,
                   const char *prefix) {
  if (!g || g->error.status != CM_OK || img < 0) return -1;
  if (!cfg || !prefix) return cm_graph_fail(g, "vit encoder: missing config or prefix");
  cm_type t = g->nodes[img].type;
  int patch = cfg->encoder.patch, width = cfg->encoder.width;
  if (t.rank != 4 || patch < 1 || t.dims[2] != t.dims[3] || t.dims[2] % patch != 0 ||
      t.dims[1] != cfg->data.in_chans || width < 4 || width % 4 != 0 || cfg->encoder.depth < 0) {
    char tb[96];
    return cm_graph_fail(
        g,
        "vit encoder \"%s\": img %s needs [n, in_chans %d, S, S] with S divisible by "
        "encoder.patch %d, and encoder.width %d a multiple of 4 (sin-cos embedding)",
        prefix, cm_type_str(&t, tb, sizeof tb), cfg->data.in_chans, patch, width);
  }
  int64_t n = t.dims[0], grid = t.dims[2] / patch, L = grid * grid;
  char buf[VIT_NAME_MAX];
  /* CMAEViT re-inits the conv weight as xavier over its [D, C*p*p] view; the bias keeps
   * PyTorch's default, whose bound uses the weight's fan_in C*p*p. */
  if (!vit_name(g, buf, prefix, "patch_embed.projection")) return -1;
  int x = cm_nn_conv2d(g, img, width, patch, patch, 0, 1, true, buf,
                       (cm_init){CM_INIT_XAVIER_UNIFORM, 1.0, 1.0},
                       cm_nn_init_torch_default(t.dims[1] * patch * patch));
  int64_t flat[3] = {n, width, L};
  const int to_tokens[3] = {0, 2, 1};
  x = cm_permute(g, cm_reshape(g, x, 3, flat, NULL), to_tokens, NULL); /* [n, L, D] */

  if (!vit_name(g, buf, prefix, "pos_embed")) return -1;
  int64_t pd[3] = {1, 1 + L, width};
  int pos = cm_param(g, buf, t.dtype, 3, pd, (cm_init){CM_INIT_SINCOS_2D, 1.0, 0.0});
  x = cm_binary_bcast(g, CM_OP_ADD, x, vit_tokens(g, pos, 1, 1 + L), NULL);
  if (ids_keep >= 0) x = cm_nn_gather_tokens(g, x, ids_keep);

  /* cls + pos_embed[:, :1] as the official forward (the slot is zero, kept for checkpoints). */
  if (!vit_name(g, buf, prefix, "cls_token")) return -1;
  int64_t cd[3] = {1, 1, width};
  int cls = cm_param(g, buf, t.dtype, 3, cd, cm_nn_init_normal(0.02));
  cls = cm_binary(g, CM_OP_ADD, cls, vit_tokens(g, pos, 0, 1), NULL);
  int64_t cls_n[3] = {n, 1, width};
  int parts[2] = {cm_broadcast(g, cls, 3, cls_n, NULL), x};
  x = cm_concat(g, 2, parts, 1, NULL);

  int hidden = (int)(cfg->encoder.mlp_ratio * width);
  x = vit_blocks(g, x, cfg->encoder.depth, cfg->encoder.heads, hidden, cfg->encoder.qkv_bias,
                 cfg->encoder.ln_eps, prefix, "layers");
  if (final_norm) {
    if (!vit_name(g, buf, prefix, "ln1")) return -1;
    x = cm_nn_layer_norm(g, x, cfg->encoder.ln_eps, buf);
  }
  return x;
}

int cm_mae_decoder(cm_graph *g, const cm_model_config *cfg, int width, int depth, int heads,
                   double mlp_ratio, int latent, int ids_restore, bool has_cls, int out_dim,
                   const char *prefix) {
  if (!g || g->error.status != CM_OK || latent < 0 || ids_restore < 0) return -1;
  if (!cfg || !prefix) return cm_graph_fail(g, "mae decoder: missing config or prefix");
  cm_type tl = g->nodes[latent].type, tr = g->nodes[ids_restore].type;
  int cls = has_cls ? 1 : 0;
  if (tl.rank != 3 || tr.rank != 2 || tr.dims[0] != tl.dims[0] || tl.dims[1] - cls < 1 ||
      tl.dims[1] - cls > tr.dims[1] || width < 4 || width % 4 != 0 || depth < 0) {
    char a[96], b[96];
    return cm_graph_fail(g,
                         "mae decoder \"%s\": latent %s and ids_restore %s need [n, %d + K, D] and "
                         "[n, L] with 1 <= K <= L, and width %d a multiple of 4",
                         prefix, cm_type_str(&tl, a, sizeof a), cm_type_str(&tr, b, sizeof b), cls,
                         width);
  }
  int64_t n = tl.dims[0], visible = tl.dims[1] - cls, L = tr.dims[1];
  char buf[VIT_NAME_MAX];
  if (!vit_name(g, buf, prefix, "decoder_embed")) return -1;
  int x = cm_nn_linear(g, latent, width, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros());

  int seq = vit_tokens(g, x, cls, cls + visible);
  if (visible < L) {
    if (!vit_name(g, buf, prefix, "mask_token")) return -1;
    int64_t md[3] = {1, 1, width}, mn[3] = {n, L - visible, width};
    int mask_token = cm_param(g, buf, tl.dtype, 3, md, cm_nn_init_normal(0.02));
    int parts[2] = {seq, cm_broadcast(g, mask_token, 3, mn, NULL)};
    seq = cm_concat(g, 2, parts, 1, NULL);
  }
  seq = cm_nn_gather_tokens(g, seq, ids_restore);
  if (has_cls) {
    int parts[2] = {vit_tokens(g, x, 0, 1), seq};
    seq = cm_concat(g, 2, parts, 1, NULL);
  }

  if (!vit_name(g, buf, prefix, "decoder_pos_embed")) return -1;
  int64_t pd[3] = {1, cls + L, width};
  int pos = cm_param(g, buf, tl.dtype, 3, pd, (cm_init){CM_INIT_SINCOS_2D, (double)cls, 0.0});
  x = cm_binary_bcast(g, CM_OP_ADD, seq, pos, NULL);

  x = vit_blocks(g, x, depth, heads, (int)(mlp_ratio * width), true, cfg->encoder.ln_eps, prefix,
                 "decoder_blocks");
  if (!vit_name(g, buf, prefix, "ln1")) return -1;
  x = cm_nn_layer_norm(g, x, cfg->encoder.ln_eps, buf);
  if (!vit_name(g, buf, prefix, "decoder_pred")) return -1;
  int out = out_dim > 0 ? out_dim : cfg->encoder.patch * cfg->encoder.patch * cfg->data.in_chans;
  x = cm_nn_linear(g, x, out, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros());
  return has_cls ? vit_tokens(g, x, 1, 1 + L) : x;
}
