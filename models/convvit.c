/* models/convvit.c — the hybrid ConvViT encoder of ConvMAE (CMAE.md §9, §2c).
 *
 * Parameter names under <prefix> follow ConvMAE's modules (models_convmae.py,
 * vision_transformer.py), so state_dicts map one to one:
 *   patch_embed1.proj      conv in_chans -> C1, kernel = stride = stage_patches[0], bias
 *   patch_embed1.norm      LayerNorm over channels, eps 1e-5 (then GELU)
 *   patch_embed2.{proj,norm}  C1 -> C2, kernel = stride = stage_patches[1]
 *   patch_embed3.{proj,norm}  C2 -> D,  kernel = stride = stage_patches[2]
 *   patch_embed4           Linear D -> D
 *   blocks1.N, blocks2.N   CBlock: norm1, conv1 (1x1), attn (5x5 depthwise,
 *                          padding 2), conv2 (1x1), norm2, mlp.fc1 (1x1 C -> hC),
 *                          mlp.fc2 (1x1 hC -> C); LNs eps 1e-5 over channels
 *   blocks3.N              transformer block: norm1, attn.qkv, attn.proj, norm2,
 *                          mlp.fc1, mlp.fc2; LNs eps encoder.ln_eps (1e-6)
 *   stage1_output_decode   conv C1 -> D, kernel = stride = stage_patches[1] * [2] (fuse only)
 *   stage2_output_decode   conv C2 -> D, kernel = stride = stage_patches[2] (fuse only)
 *   pos_embed              [1, L, D] fixed 2-D sin-cos, no cls slot (frozen)
 *   norm                   final LN, eps encoder.ln_eps (fuse only)
 * Each module's params are "<module>.weight" and "<module>.bias".
 *
 * Init as ConvMAE: Linear xavier_uniform + zero bias, LN ones/zeros, the
 * patch_embed3 conv xavier over its 2-D view; every other conv keeps PyTorch's
 * default (the bias bound uses the weight's fan_in). */
#include "models.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ConvMAE's conv-stage LayerNorms are plain nn.LayerNorm(dim). */
#define CONVVIT_CONV_LN_EPS 1e-5
#define CONVVIT_DWCONV_KERNEL 5

/* "<base>.<fmt...>" into buf; false (with the graph error set) when it does not fit. */
static bool convvit_name(cm_graph *g, char *buf, size_t size, const char *base, const char *fmt,
                         ...) __attribute__((format(printf, 5, 6)));
static bool convvit_name(cm_graph *g, char *buf, size_t size, const char *base, const char *fmt,
                         ...) {
  int n = snprintf(buf, size, "%s.", base);
  if (n < 0 || (size_t)n >= size) {
    cm_graph_fail(g, "convvit \"%s\": parameter name prefix too long", base);
    return false;
  }
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(buf + n, size - (size_t)n, fmt, ap);
  va_end(ap);
  if (m < 0 || (size_t)(n + m) >= size) {
    cm_graph_fail(g, "convvit \"%s\": parameter name too long", base);
    return false;
  }
  return true;
}

static cm_init convvit_conv_bias_init(int64_t in_per_group, int kernel) {
  return cm_nn_init_torch_default(in_per_group * kernel * kernel);
}

/* LayerNorm over the channel axis of an NCHW map. With back = false the result
 * stays NHWC (stage 3 flattens it to tokens anyway). */
static int convvit_channel_norm(cm_graph *g, int x, double eps, const char *name, bool back) {
  static const int to_nhwc[4] = {0, 2, 3, 1}, to_nchw[4] = {0, 3, 1, 2};
  int y = cm_nn_layer_norm(g, cm_permute(g, x, to_nhwc, NULL), eps, name);
  return back ? cm_permute(g, y, to_nchw, NULL) : y;
}

/* ConvMAE PatchEmbed: conv (kernel = stride = patch) -> LN over channels -> GELU. */
static int convvit_patch_embed(cm_graph *g, int x, int out_channels, int patch, const char *name,
                               cm_init w_init, bool back_to_nchw) {
  char buf[256];
  if (x < 0) return -1;
  int64_t in_channels = g->nodes[x].type.dims[1];
  if (!convvit_name(g, buf, sizeof buf, name, "proj")) return -1;
  int y = cm_nn_conv2d(g, x, out_channels, patch, patch, 0, 1, true, buf, w_init,
                       convvit_conv_bias_init(in_channels, patch));
  if (!convvit_name(g, buf, sizeof buf, name, "norm")) return -1;
  y = convvit_channel_norm(g, y, CONVVIT_CONV_LN_EPS, buf, back_to_nchw);
  return cm_nn_gelu(g, y);
}

/* 1x1 conv with PyTorch's default init. */
static int convvit_pointwise(cm_graph *g, int x, int out_channels, const char *name) {
  if (x < 0) return -1;
  int64_t in_channels = g->nodes[x].type.dims[1];
  return cm_nn_conv2d(g, x, out_channels, 1, 1, 0, 1, true, name, cm_nn_init_torch_default(0),
                      convvit_conv_bias_init(in_channels, 1));
}

/* CBlock: x + conv2(dwconv5x5(keep * conv1(LN x))), then x + fc2(GELU(fc1(LN x))).
 * keep is [n, C, H, W] or -1 when nothing is masked. */
static int convvit_cblock(cm_graph *g, int x, int keep, int hidden, const char *name) {
  char buf[256];
  if (x < 0) return -1;
  int channels = (int)g->nodes[x].type.dims[1];

  if (!convvit_name(g, buf, sizeof buf, name, "norm1")) return -1;
  int h = convvit_channel_norm(g, x, CONVVIT_CONV_LN_EPS, buf, true);
  if (!convvit_name(g, buf, sizeof buf, name, "conv1")) return -1;
  h = convvit_pointwise(g, h, channels, buf);
  /* The masked convolution: masked positions enter the depthwise conv as zeros. */
  if (keep >= 0) h = cm_binary(g, CM_OP_MUL, h, keep, NULL);
  if (!convvit_name(g, buf, sizeof buf, name, "attn")) return -1;
  h = cm_nn_conv2d(g, h, channels, CONVVIT_DWCONV_KERNEL, 1, CONVVIT_DWCONV_KERNEL / 2, channels,
                   true, buf, cm_nn_init_torch_default(0),
                   convvit_conv_bias_init(1, CONVVIT_DWCONV_KERNEL));
  if (!convvit_name(g, buf, sizeof buf, name, "conv2")) return -1;
  h = convvit_pointwise(g, h, channels, buf);
  x = cm_binary(g, CM_OP_ADD, x, h, NULL);

  if (!convvit_name(g, buf, sizeof buf, name, "norm2")) return -1;
  h = convvit_channel_norm(g, x, CONVVIT_CONV_LN_EPS, buf, true);
  if (!convvit_name(g, buf, sizeof buf, name, "mlp.fc1")) return -1;
  h = cm_nn_gelu(g, convvit_pointwise(g, h, hidden, buf));
  if (!convvit_name(g, buf, sizeof buf, name, "mlp.fc2")) return -1;
  h = convvit_pointwise(g, h, channels, buf);
  return cm_binary(g, CM_OP_ADD, x, h, NULL);
}

/* Pre-norm transformer block (ConvMAE/timm Block, no layer scale). */
static int convvit_transformer_block(cm_graph *g, int x, const cm_model_config *cfg,
                                     const char *name) {
  char buf[256];
  if (x < 0) return -1;
  int width = (int)g->nodes[x].type.dims[2];
  int hidden = (int)(width * cfg->encoder.mlp_ratio);
  if (!convvit_name(g, buf, sizeof buf, name, "norm1")) return -1;
  int h = cm_nn_layer_norm(g, x, cfg->encoder.ln_eps, buf);
  if (!convvit_name(g, buf, sizeof buf, name, "attn")) return -1;
  h = cm_nn_attention(g, h, cfg->encoder.heads, cfg->encoder.qkv_bias, buf);
  x = cm_binary(g, CM_OP_ADD, x, h, NULL);
  if (!convvit_name(g, buf, sizeof buf, name, "norm2")) return -1;
  h = cm_nn_layer_norm(g, x, cfg->encoder.ln_eps, buf);
  if (!convvit_name(g, buf, sizeof buf, name, "mlp.fc1")) return -1;
  h = cm_nn_gelu(g, cm_nn_linear(g, h, hidden, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros()));
  if (!convvit_name(g, buf, sizeof buf, name, "mlp.fc2")) return -1;
  h = cm_nn_linear(g, h, width, true, buf, cm_nn_init_xavier(), cm_nn_init_zeros());
  return cm_binary(g, CM_OP_ADD, x, h, NULL);
}

/* keep [n, L] -> [n, C, g*r, g*r]: each token cell becomes an r x r block
 * (nearest upsampling by reshape + broadcast + reshape), then spread over channels. */
static int convvit_stage_keep(cm_graph *g, int keep, int64_t grid, int64_t repeat,
                              int64_t channels) {
  if (keep < 0) return -1;
  int64_t n = g->nodes[keep].type.dims[0], side = grid * repeat;
  int64_t cells[6] = {n, 1, grid, 1, grid, 1};
  int64_t blocks[6] = {n, 1, grid, repeat, grid, repeat};
  int64_t map[4] = {n, 1, side, side}, full[4] = {n, channels, side, side};
  int k = cm_reshape(g, keep, 6, cells, NULL);
  k = cm_reshape(g, cm_broadcast(g, k, 6, blocks, NULL), 4, map, NULL);
  return cm_broadcast(g, k, 4, full, NULL);
}

/* NCHW map on the token grid [n, D, g, g] -> tokens [n, L, D]. */
static int convvit_map_to_tokens(cm_graph *g, int x) {
  if (x < 0) return -1;
  cm_type t = g->nodes[x].type;
  int64_t flat[3] = {t.dims[0], t.dims[1], t.dims[2] * t.dims[3]};
  static const int to_tokens[3] = {0, 2, 1};
  return cm_permute(g, cm_reshape(g, x, 3, flat, NULL), to_tokens, NULL);
}

/* Checks the config and the operands against each other; -1 (graph error set) on a mismatch. */
static int convvit_check(cm_graph *g, const cm_model_config *cfg, int img, int ids_keep, int mask,
                         const char *prefix, int64_t *grid_out) {
  const char *where = prefix ? prefix : "(null)";
  if (!cfg || !prefix)
    return cm_graph_fail(g, "convvit \"%s\": config and prefix are required", where);
  int64_t product = 1;
  for (int s = 0; s < CM_MODEL_MAX_STAGES; s++) {
    if (cfg->encoder.stage_patches[s] < 1 || cfg->encoder.stage_widths[s] < 1 ||
        cfg->encoder.stage_depths[s] < 0)
      return cm_graph_fail(g,
                           "convvit \"%s\": stage %d: encoder.stage_patches %d and "
                           "encoder.stage_widths %d must be >= 1, encoder.stage_depths %d >= 0",
                           where, s, cfg->encoder.stage_patches[s], cfg->encoder.stage_widths[s],
                           cfg->encoder.stage_depths[s]);
    product *= cfg->encoder.stage_patches[s];
  }
  int width = cfg->encoder.width, heads = cfg->encoder.heads;
  if (cfg->encoder.stage_widths[2] != width)
    return cm_graph_fail(g,
                         "convvit \"%s\": encoder.stage_widths[2] %d must equal encoder.width %d",
                         where, cfg->encoder.stage_widths[2], width);
  if (heads < 1 || width % heads != 0)
    return cm_graph_fail(g, "convvit \"%s\": encoder.heads %d does not divide encoder.width %d",
                         where, heads, width);
  if (!(cfg->encoder.mlp_ratio > 0) || (int)(width * cfg->encoder.mlp_ratio) < 1)
    return cm_graph_fail(g, "convvit \"%s\": encoder.mlp_ratio %g gives no hidden units", where,
                         cfg->encoder.mlp_ratio);
  int image = cfg->data.image_size;
  if (image < 1 || image % product != 0)
    return cm_graph_fail(g,
                         "convvit \"%s\": data.image_size %d is not a multiple of the product %lld "
                         "of encoder.stage_patches",
                         where, image, (long long)product);
  int64_t grid = image / product, tokens = grid * grid;

  cm_type it = g->nodes[img].type;
  if (!cm_dtype_is_float(it.dtype) || it.rank != 4 || it.dims[1] != cfg->data.in_chans ||
      it.dims[2] != image || it.dims[3] != image) {
    char tb[64];
    return cm_graph_fail(g, "convvit \"%s\": img is %s, expected a float [n, %d, %d, %d]", where,
                         cm_type_str(&it, tb, sizeof tb), cfg->data.in_chans, image, image);
  }
  int64_t n = it.dims[0];
  if (mask >= 0) {
    cm_type mt = g->nodes[mask].type;
    if (!cm_dtype_is_float(mt.dtype) || mt.rank != 2 || mt.dims[0] != n || mt.dims[1] != tokens) {
      char tb[64];
      return cm_graph_fail(g, "convvit \"%s\": mask is %s, expected a float [%lld, %lld]", where,
                           cm_type_str(&mt, tb, sizeof tb), (long long)n, (long long)tokens);
    }
  }
  if (ids_keep >= 0) {
    cm_type kt = g->nodes[ids_keep].type;
    if (!cm_dtype_is_int(kt.dtype) || kt.rank != 2 || kt.dims[0] != n || kt.dims[1] > tokens) {
      char tb[64];
      return cm_graph_fail(g, "convvit \"%s\": ids_keep is %s, expected an int [%lld, <= %lld]",
                           where, cm_type_str(&kt, tb, sizeof tb), (long long)n, (long long)tokens);
    }
  }
  *grid_out = grid;
  return 0;
}

int cm_convvit_encoder(cm_graph *g, const cm_model_config *cfg, int img, int ids_keep, int mask,
                       bool fuse, const char *prefix) {
  if (!g || img < 0 || g->error.status != CM_OK) return -1;
  if (img >= g->n_nodes || ids_keep >= g->n_nodes || mask >= g->n_nodes)
    return cm_graph_fail(g, "convvit \"%s\": operand node id out of range", prefix ? prefix : "");
  int64_t grid = 0;
  if (convvit_check(g, cfg, img, ids_keep, mask, prefix, &grid) < 0) return -1;

  const int *widths = cfg->encoder.stage_widths, *depths = cfg->encoder.stage_depths;
  const int *patches = cfg->encoder.stage_patches;
  int width = cfg->encoder.width;
  cm_dtype dt = g->nodes[img].type.dtype;
  int64_t n = g->nodes[img].type.dims[0], tokens = grid * grid;
  /* stage s runs at grid * repeat[s]: the later stages' patches merge down to the token grid */
  int64_t repeat[2] = {(int64_t)patches[1] * patches[2], patches[2]};
  char name[256];

  int keep = -1;
  if (mask >= 0) {
    int m = g->nodes[mask].type.dtype == dt ? mask : cm_cast(g, mask, dt, NULL);
    int64_t dims[2] = {n, tokens};
    keep = cm_binary(g, CM_OP_SUB, cm_const_fill(g, NULL, dt, 2, dims, 1.0), m, NULL);
  }

  /* Stages 1 and 2: conv patch embedding and CBlocks on the masked maps. */
  int x = img, stage_out[2] = {-1, -1};
  for (int s = 0; s < 2; s++) {
    if (!convvit_name(g, name, sizeof name, prefix, "patch_embed%d", s + 1)) return -1;
    x = convvit_patch_embed(g, x, widths[s], patches[s], name, cm_nn_init_torch_default(0), true);
    int stage_keep = convvit_stage_keep(g, keep, grid, repeat[s], widths[s]);
    int hidden = (int)(widths[s] * cfg->encoder.mlp_ratio);
    for (int b = 0; b < depths[s]; b++) {
      if (!convvit_name(g, name, sizeof name, prefix, "blocks%d.%d", s + 1, b)) return -1;
      x = convvit_cblock(g, x, stage_keep, hidden, name);
    }
    stage_out[s] = x;
  }

  /* Stage 3: tokens, pos embed, gather of the visible ones, transformer. */
  cm_init flat_xavier = cm_nn_init_xavier();
  flat_xavier.b = 1; /* ConvMAE inits patch_embed3 over w.view(w.size(0), -1) */
  if (!convvit_name(g, name, sizeof name, prefix, "patch_embed3")) return -1;
  x = convvit_patch_embed(g, x, width, patches[2], name, flat_xavier, false);
  int64_t token_dims[3] = {n, tokens, width};
  x = cm_reshape(g, x, 3, token_dims, NULL); /* NHWC [n, g, g, D] is already token-major */
  if (!convvit_name(g, name, sizeof name, prefix, "patch_embed4")) return -1;
  x = cm_nn_linear(g, x, width, true, name, cm_nn_init_xavier(), cm_nn_init_zeros());
  if (!convvit_name(g, name, sizeof name, prefix, "pos_embed")) return -1;
  int64_t pos_dims[3] = {1, tokens, width};
  int pos = cm_param(g, name, dt, 3, pos_dims, (cm_init){CM_INIT_SINCOS_2D, 0, 0});
  x = cm_binary_bcast(g, CM_OP_ADD, x, pos, NULL);
  if (ids_keep >= 0) x = cm_nn_gather_tokens(g, x, ids_keep);
  for (int b = 0; b < depths[2]; b++) {
    if (!convvit_name(g, name, sizeof name, prefix, "blocks3.%d", b)) return -1;
    x = convvit_transformer_block(g, x, cfg, name);
  }
  if (!fuse) return x;

  /* Multi-scale fusion: side outputs on the token grid, same visible ids, summed before the LN. */
  int sum = x;
  for (int s = 0; s < 2; s++) {
    if (!convvit_name(g, name, sizeof name, prefix, "stage%d_output_decode", s + 1)) return -1;
    int k = (int)repeat[s];
    int side = cm_nn_conv2d(g, stage_out[s], width, k, k, 0, 1, true, name,
                            cm_nn_init_torch_default(0), convvit_conv_bias_init(widths[s], k));
    side = convvit_map_to_tokens(g, side);
    if (ids_keep >= 0) side = cm_nn_gather_tokens(g, side, ids_keep);
    sum = cm_binary(g, CM_OP_ADD, sum, side, NULL);
  }
  if (!convvit_name(g, name, sizeof name, prefix, "norm")) return -1;
  return cm_nn_layer_norm(g, sum, cfg->encoder.ln_eps, name);
}
