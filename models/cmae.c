/* models/cmae.c — whole CMAE / MAE forward graphs with their losses (CMAE.md
 * §3-§7, §13).
 *
 * Parameter names are the official state_dict keys (checked against
 * ZhichengHuang/CMAE: algorithms/cmae.py, backbones/vision_transformer.py,
 * cmae_vit.py, transformer_utils.py with mmcv's FFN / PatchEmbed /
 * build_norm_layer, necks/mae_neck.py, necks/nonlinear_neck.py,
 * heads/cmae_head.py). E = backbone or target_backbone, N = layer index:
 *   E.patch_embed.projection.{weight [D, C, p, p], bias [D]}
 *   E.cls_token [1, 1, D]            E.pos_embed [1, 1 + L, D] (frozen)
 *   E.layers.N.ln1.{weight, bias}    E.layers.N.attn.qkv.{weight [3D, D], bias}
 *   E.layers.N.attn.proj.{weight, bias}   E.layers.N.ln2.{weight, bias}
 *   E.layers.N.ffn.layers.0.0.{weight [4D, D], bias}  (Linear, then GELU)
 *   E.layers.N.ffn.layers.1.{weight [D, 4D], bias}
 *   backbone.ln1.{weight, bias}      final norm (build_norm_layer postfix 1); the target has none
 * X = pixel_decoder or feature_decoder (MAEPretrainDecoder):
 *   X.decoder_embed.{weight, bias}   X.mask_token [1, 1, W]   X.decoder_pos_embed (frozen)
 *   X.decoder_blocks.N.*             (same block keys as E.layers.N)
 *   X.ln1.{weight, bias}             the decoder norm (decoder_norm_name = "ln1")
 *   X.decoder_pred.{weight, bias}
 * P = projector, target_projector or head.predictor (NonLinearNeck, 2 layers):
 *   P.fc0.{weight, bias}   P.bn0.{weight, bias}   P.fc1.weight (no bias)
 * The MAE variant (contrastive false) follows algorithms/mae.py, whose decoder
 * module is "neck": neck.decoder_embed.weight, ...
 *
 * Target params are built with the same init kinds as their online twins;
 * CMAE.init_weights copies backbone -> target_backbone and projector ->
 * target_projector, which the trainer does at step 0 (CMAE.md §4).
 *
 * Outputs: loss_rc is the unweighted masked norm-pix MSE (CMAE.md §5),
 * loss_ct = ct_weight * 2 tau * CE (§7), loss = rc_weight * loss_rc + loss_ct. */
#include "models.h"

#include <stdio.h>
#include <string.h>

const char *const cm_model_ema_online_prefixes[] = {"backbone.", "projector.", NULL};
const char *const cm_model_ema_target_prefixes[] = {"target_backbone.", "target_projector.", NULL};
const char *const cm_model_frozen_substrings[] = {"pos_embed", NULL};

static int scalar(cm_graph *g, cm_dtype dt, double v) {
  return cm_const_scalar(g, NULL, dt, v);
}

static int scale(cm_graph *g, int x, double v) {
  if (x < 0 || g->error.status != CM_OK) return -1;
  return cm_binary_bcast(g, CM_OP_MUL, x, scalar(g, g->nodes[x].type.dtype, v), NULL);
}

/* Sum of every element (rank 0). */
static int sum_all(cm_graph *g, int x) {
  if (x < 0 || g->error.status != CM_OK) return -1;
  cm_type t = g->nodes[x].type;
  int axes[CM_MAX_RANK];
  for (int i = 0; i < t.rank; i++) axes[i] = i;
  return cm_reduce(g, CM_OP_REDUCE_SUM, x, t.rank, axes, false, NULL);
}

/* Masked norm-pix MSE (CMAE.md §5): pred [n, L, P], img [n, C, H, W], mask [n, L]. */
static int reconstruction_loss(cm_graph *g, const cm_model_config *cfg, int pred, int img,
                               int mask) {
  int target = cm_unary(g, CM_OP_STOP_GRADIENT, cm_nn_patchify(g, img, cfg->encoder.patch), NULL);
  if (target < 0) return -1;
  cm_type tt = g->nodes[target].type;
  int last = 2;
  if (cfg->loss.norm_pix) {
    int64_t P = tt.dims[2];
    int mean = cm_nn_mean(g, target, 1, &last, true);
    int centered = cm_binary_bcast(g, CM_OP_SUB, target, mean, NULL);
    /* torch.var: unbiased (divides by P - 1). */
    int ss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, centered, centered, NULL), 1,
                       &last, true, NULL);
    int var = scale(g, ss, P > 1 ? 1.0 / (double)(P - 1) : 1.0);
    int inv = cm_unary(
        g, CM_OP_RSQRT,
        cm_binary_bcast(g, CM_OP_ADD, var, scalar(g, tt.dtype, cfg->loss.norm_pix_eps), NULL),
        NULL);
    target =
        cm_unary(g, CM_OP_STOP_GRADIENT, cm_binary_bcast(g, CM_OP_MUL, centered, inv, NULL), NULL);
  }
  int diff = cm_binary(g, CM_OP_SUB, pred, target, "loss_rc/diff");
  int per_patch = cm_nn_mean(g, cm_binary(g, CM_OP_MUL, diff, diff, NULL), 1, &last, false);
  int num = sum_all(g, cm_binary(g, CM_OP_MUL, per_patch, mask, NULL));
  return cm_binary(g, CM_OP_DIV, num, sum_all(g, mask), "loss_rc");
}

/* InfoNCE with the MoCo-v3 2 tau factor (CMAE.md §7): q [n, d], k [n, d] (not yet gathered). */
static int contrastive_loss(cm_graph *g, const cm_model_config *cfg, int ranks, int q, int k,
                            int labels) {
  if (q < 0 || k < 0 || g->error.status != CM_OK) return -1;
  cm_type tq = g->nodes[q].type;
  int64_t n = tq.dims[0], total = n * ranks;
  int keys = cm_all_gather(g, cm_unary(g, CM_OP_STOP_GRADIENT, k, NULL), 0, ranks, NULL);
  int logits = scale(g, cm_matmul(g, q, keys, false, true, NULL), 1.0 / cfg->loss.temperature);
  int last = 1;
  int m = cm_unary(g, CM_OP_STOP_GRADIENT,
                   cm_reduce(g, CM_OP_REDUCE_MAX, logits, 1, &last, true, NULL), NULL);
  int shifted = cm_binary_bcast(g, CM_OP_SUB, logits, m, NULL);
  int lse = cm_unary(
      g, CM_OP_LOG,
      cm_reduce(g, CM_OP_REDUCE_SUM, cm_unary(g, CM_OP_EXP, shifted, NULL), 1, &last, true, NULL),
      NULL);
  int log_prob = cm_binary_bcast(g, CM_OP_SUB, shifted, lse, NULL);
  int64_t grid[2] = {n, total}, col[2] = {n, 1};
  int label_grid = cm_broadcast(g, cm_reshape(g, labels, 2, col, NULL), 2, grid, NULL);
  int onehot = cm_binary(g, CM_OP_EQ, label_grid, cm_iota(g, NULL, CM_I32, 2, grid, 1), NULL);
  int picked = cm_select(g, onehot, log_prob, cm_const_fill(g, NULL, tq.dtype, 2, grid, 0.0), NULL);
  int ce = scale(g, sum_all(g, picked), -1.0 / (double)n);
  return scale(g, ce, cfg->loss.ct_weight * 2.0 * cfg->loss.temperature);
}

static cm_status build_fail(cm_model *m, cm_err *err, cm_status st, const char *msg) {
  cm_errorf(err, st, "cm_model_build: %s", msg);
  cm_model_free(m);
  return st;
}

cm_status cm_model_build(const cm_model_config *cfg, const cm_model_build_opts *opts, cm_model *out,
                         cm_err *err) {
  if (!out) return cm_errorf(err, CM_EINVALID, "cm_model_build: no output model");
  memset(out, 0, sizeof *out);
  out->loss = out->loss_rc = out->loss_ct = -1;
  out->img = out->img_t = out->ids_keep = out->ids_restore = out->mask = out->labels = -1;
  if (!cfg || !opts) return cm_errorf(err, CM_EINVALID, "cm_model_build: no config or options");
  bool vit = strcmp(cfg->arch, "vit") == 0, convvit = strcmp(cfg->arch, "convvit") == 0;
  if (!vit && !convvit)
    return cm_errorf(err, CM_EINVALID,
                     "cm_model_build: arch \"%.16s\" is not \"vit\" or \"convvit\"", cfg->arch);
  if (opts->batch < 1 || opts->ranks < 1)
    return cm_errorf(err, CM_EINVALID, "cm_model_build: batch %d and ranks %d must be >= 1",
                     opts->batch, opts->ranks);
  if (cfg->contrastive && opts->batch * opts->ranks < 2)
    return cm_errorf(err, CM_EINVALID,
                     "cm_model_build: contrastive: BatchNorm in training mode needs a global batch "
                     ">= 2, got batch %d x ranks %d",
                     opts->batch, opts->ranks);
  if (!cm_dtype_is_float(opts->dtype))
    return cm_errorf(err, CM_EINVALID, "cm_model_build: dtype %s is not a float dtype",
                     cm_dtype_name(opts->dtype));
  int size = cfg->data.image_size, patch = cfg->encoder.patch, chans = cfg->data.in_chans;
  if (size < 1 || patch < 1 || size % patch != 0 || chans < 1)
    return cm_errorf(err, CM_EINVALID,
                     "cm_model_build: data.image_size %d must be a positive multiple of "
                     "encoder.patch %d (data.in_chans %d >= 1)",
                     size, patch, chans);
  int grid = size / patch;
  int n_keep = cm_mask_keep_count(cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid);
  if (n_keep < 1)
    return cm_errorf(err, CM_EINVALID,
                     "cm_model_build: mask.kind \"%.16s\" ratio %g block %d on a %dx%d token grid "
                     "keeps no valid token set",
                     cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid, grid);
  if (cfg->contrastive && !(cfg->loss.temperature > 0))
    return cm_errorf(err, CM_EINVALID, "cm_model_build: loss.temperature %g must be > 0",
                     cfg->loss.temperature);

  cm_graph *g = cm_graph_new();
  if (!g) return cm_errorf(err, CM_EINTERNAL, "cm_model_build: out of memory");
  out->g = g;
  out->n_tokens = grid * grid;
  out->n_keep = n_keep;
  int64_t n = opts->batch, L = out->n_tokens;
  cm_dtype dt = opts->dtype;
  int64_t img_dims[4] = {n, chans, size, size}, keep_dims[2] = {n, n_keep}, tok_dims[2] = {n, L};
  out->img = cm_input(g, "img", dt, 4, img_dims);
  if (cfg->contrastive) out->img_t = cm_input(g, "img_t", dt, 4, img_dims);
  out->ids_keep = cm_input(g, "ids_keep", CM_I32, 2, keep_dims);
  out->ids_restore = cm_input(g, "ids_restore", CM_I32, 2, tok_dims);
  out->mask = cm_input(g, "mask", dt, 2, tok_dims);
  /* With one rank the labels are the constant iota, built with the loss. */
  if (cfg->contrastive && opts->ranks > 1) {
    int64_t label_dims[1] = {n};
    out->labels = cm_input(g, "labels", CM_I32, 1, label_dims);
  }

  bool has_cls = vit;
  int latent =
      vit ? cm_vit_encoder(g, cfg, out->img, out->ids_keep, cfg->encoder.final_norm, "backbone")
          : cm_convvit_encoder(g, cfg, out->img, out->ids_keep, out->mask, true, "backbone");
  const char *pixel_name = cfg->contrastive ? "pixel_decoder" : "neck";
  int pred = cm_mae_decoder(g, cfg, cfg->pixel_decoder.width, cfg->pixel_decoder.depth,
                            cfg->pixel_decoder.heads, cfg->pixel_decoder.mlp_ratio, latent,
                            out->ids_restore, has_cls, 0, pixel_name);
  out->loss_rc = reconstruction_loss(g, cfg, pred, out->img, out->mask);
  int loss = scale(g, out->loss_rc, cfg->loss.rc_weight);

  if (cfg->contrastive) {
    int pooled;
    int tok_axis = 1;
    if (cfg->feature_decoder.enabled) {
      /* The feature decoder predicts encoder-width features, so that the
       * online and target projectors (EMA twins) take inputs of one width.
       * The official Linear(512 -> 768) is this for ViT-B, where the pixels
       * of a patch (16*16*3) and the width are both 768. */
      int feat = cm_mae_decoder(g, cfg, cfg->feature_decoder.width, cfg->feature_decoder.depth,
                                cfg->feature_decoder.heads, cfg->feature_decoder.mlp_ratio, latent,
                                out->ids_restore, has_cls, cfg->encoder.width, "feature_decoder");
      pooled = cm_nn_mean(g, feat, 1, &tok_axis, false); /* all L tokens (CMAE#3) */
    } else {
      /* Ablation without a feature decoder: pool the latent's patch tokens. */
      int patches = latent;
      if (has_cls && latent >= 0 && g->error.status == CM_OK) {
        cm_type tl = g->nodes[latent].type;
        int64_t start[3] = {0, 1, 0}, stop[3] = {tl.dims[0], tl.dims[1], tl.dims[2]};
        patches = cm_slice(g, latent, start, stop, NULL, NULL);
      }
      pooled = cm_nn_mean(g, patches, 1, &tok_axis, false);
    }
    int proj = cm_nn_nonlinear_neck(g, pooled, cfg->projector.hidden, cfg->projector.out,
                                    cfg->projector.bn_eps, opts->ranks, "projector");
    int q = cm_nn_l2_normalize(g, cm_nn_nonlinear_neck(g, proj, cfg->predictor.hidden,
                                                       cfg->predictor.out, cfg->predictor.bn_eps,
                                                       opts->ranks, "head.predictor"));

    int latent_t = vit ? cm_vit_encoder(g, cfg, out->img_t, -1, false, "target_backbone")
                       : cm_convvit_encoder(g, cfg, out->img_t, -1, -1, false, "target_backbone");
    int patches_t = latent_t;
    if (has_cls && latent_t >= 0 && g->error.status == CM_OK) {
      cm_type tl = g->nodes[latent_t].type;
      int64_t start[3] = {0, 1, 0}, stop[3] = {tl.dims[0], tl.dims[1], tl.dims[2]};
      patches_t = cm_slice(g, latent_t, start, stop, NULL, NULL);
    }
    int k = cm_nn_l2_normalize(
        g, cm_nn_nonlinear_neck(g, cm_nn_mean(g, patches_t, 1, &tok_axis, false),
                                cfg->projector.hidden, cfg->projector.out, cfg->projector.bn_eps,
                                opts->ranks, "target_projector"));
    int labels = out->labels;
    if (labels < 0) {
      int64_t label_dims[1] = {n};
      labels = cm_iota(g, NULL, CM_I32, 1, label_dims, 0);
    }
    int ct = contrastive_loss(g, cfg, opts->ranks, q, k, labels);
    if (ct >= 0) {
      cm_type tc = g->nodes[ct].type;
      ct = cm_reshape(g, ct, tc.rank, tc.dims, "loss_ct");
    }
    out->loss_ct = ct;
    loss = cm_binary(g, CM_OP_ADD, loss, ct, "loss");
  } else if (loss >= 0) {
    cm_type tl = g->nodes[loss].type;
    loss = cm_reshape(g, loss, tl.rank, tl.dims, "loss");
  }
  out->loss = loss;

  if (cm_graph_error(g)) return build_fail(out, err, g->error.status, cm_graph_error(g));
  cm_err e = {0};
  if (cm_graph_add_output(g, out->loss, &e) || cm_graph_add_output(g, out->loss_rc, &e) ||
      (cfg->contrastive && cm_graph_add_output(g, out->loss_ct, &e)) || cm_graph_verify(g, &e))
    return build_fail(out, err, e.status ? e.status : CM_EINTERNAL, e.msg);
  return CM_OK;
}

void cm_model_free(cm_model *m) {
  if (!m) return;
  cm_graph_free(m->g);
  m->g = NULL;
}
