/* models/models.h — CMAE model builders: the contract of the models layer.
 *
 * Defines: neural-network building blocks made of IR primitives (cm_nn_*),
 * host-side mask generation (random and block, CMAE.md §2), and the builders
 * that expand a cm_model_config (frontend.h) into a forward graph with the
 * official parameter names (cm_model_build). Uses ir/ and frontend/ only.
 *
 * Conventions: every builder takes and returns node ids and records the first
 * failure in g->error (the graph's sticky builder error), so a whole model is
 * built and then checked once. Parameter names are the official PyTorch
 * state_dict keys ("backbone.layers.0.attn.qkv.weight"); a module's params are
 * "<name>.weight" / "<name>.bias". Linear weights are stored [out, in] as
 * PyTorch and applied with matmul(x, W, transpose_b). */
#ifndef CMAEC_MODELS_H
#define CMAEC_MODELS_H

#include "../frontend/frontend.h"

/* ---- building blocks ---------------------------------------------------- */

/* Initializers used by the official code (CMAE.md §3-§6). */
cm_init cm_nn_init_xavier(void); /* xavier_uniform, gain 1 */
cm_init cm_nn_init_zeros(void);
cm_init cm_nn_init_ones(void);
cm_init cm_nn_init_normal(double std);            /* N(0, std^2) */
cm_init cm_nn_init_torch_default(int64_t fan_in); /* fan_in 0: from the weight's shape */

/* y = x W^T + b over the last axis: x [..., in] -> [..., out]; params
 * "<name>.weight" [out, in] (w_init) and, when bias, "<name>.bias" [out] (b_init). */
int cm_nn_linear(cm_graph *g, int x, int out_features, bool bias, const char *name, cm_init w_init,
                 cm_init b_init);
/* LayerNorm over the last axis (biased variance, as PyTorch), eps; params
 * "<name>.weight" (ones) and "<name>.bias" (zeros) of the last dim. */
int cm_nn_layer_norm(cm_graph *g, int x, double eps, const char *name);
/* Exact GELU: x/2 (1 + erf(x / sqrt 2)). */
int cm_nn_gelu(cm_graph *g, int x);
/* Softmax over the last axis, max-subtracted (the max through stop_gradient). */
int cm_nn_softmax(cm_graph *g, int x);
/* Mean over the given axes (keepdims as given). */
int cm_nn_mean(cm_graph *g, int x, int n_axes, const int *axes, bool keepdims);
/* x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize, eps 1e-12). */
int cm_nn_l2_normalize(cm_graph *g, int x);
/* BatchNorm1d in training mode over axis 0 of x [n, C] with affine params
 * "<name>.weight" (ones), "<name>.bias" (zeros); biased variance. When
 * ranks > 1 the batch statistics are averaged over ranks with all_reduce(mean)
 * of E[x] and E[x^2] (SyncBN; the ranks' batches have equal size). */
int cm_nn_batch_norm(cm_graph *g, int x, double eps, int ranks, const char *name);
/* conv2d with an optional bias: params "<name>.weight" [O, C/groups, k, k] and
 * "<name>.bias" [O] broadcast over N, H, W. */
int cm_nn_conv2d(cm_graph *g, int x, int out_channels, int kernel, int stride, int padding,
                 int groups, bool bias, const char *name, cm_init w_init, cm_init b_init);
/* [n, C, H, W] -> [n, (H/p)(W/p), p*p*C], the per-patch vector ordered
 * (py*p + px)*C + c as the official patchify (CMAE.md §5). */
int cm_nn_patchify(cm_graph *g, int img, int patch);
/* x [n, L, D] -> x[:, ids, :] with ids int [n, K] (take_along_axis over the
 * tokens, ids broadcast over D): the visible tokens of a masked sequence. */
int cm_nn_gather_tokens(cm_graph *g, int x, int ids);
/* Multi-head self-attention of mmcv's MultiheadAttention on x [n, T, D] (the
 * same graph as timm's Attention, which ConvViT's blocks use):
 * params "<name>.qkv" (Linear D -> 3D, bias when qkv_bias) and "<name>.proj"
 * (Linear D -> D, bias), both xavier_uniform with zero bias; scores scaled by
 * head_dim^-0.5. */
int cm_nn_attention(cm_graph *g, int x, int heads, bool qkv_bias, const char *name);
/* Pre-norm TransformerEncoderLayer (CMAE.md §3): x + attn(ln1(x)), then
 * x + ffn(ln2(x)) with ffn Linear(D, hidden) -> GELU -> Linear(hidden, D).
 * Params "<name>.ln1", "<name>.attn.{qkv,proj}", "<name>.ln2",
 * "<name>.ffn.layers.0.0", "<name>.ffn.layers.1" (the official keys). */
int cm_nn_transformer_block(cm_graph *g, int x, int heads, int hidden, bool qkv_bias, double eps,
                            const char *name);
/* NonLinearNeck with num_layers 2 (CMAE.md §6) on x [n, C]: "<name>.fc0"
 * (Linear C -> hidden, bias), "<name>.bn0" (BatchNorm, training mode, SyncBN
 * over ranks), ReLU, "<name>.fc1" (Linear hidden -> out, no bias); Linear
 * weights and biases keep PyTorch's default init. Returns [n, out]. */
int cm_nn_nonlinear_neck(cm_graph *g, int x, int hidden, int out, double bn_eps, int ranks,
                         const char *name);

/* ---- masks (host side) ------------------------------------------------- */

/* Mask indices for one sample, drawn with uniforms u[0..n_noise) (the noise of
 * CMAE.md §2; n_noise = L for random masking, L / block^2 for block masking):
 *  ids_keep[0..n_keep) visible tokens, ids_restore[0..L) the unshuffle
 *  permutation, mask[0..L) 1 = masked, 0 = visible. Returns n_keep, or -1 on
 *  invalid arguments. grid = side of the token grid (L = grid^2). */
int cm_mask_sample(const char *kind, double ratio, int block, int grid, const double *u,
                   int32_t *ids_keep, int32_t *ids_restore, float *mask);
/* Number of noise values and visible tokens for a config. */
int cm_mask_noise_count(const char *kind, int block, int grid);
int cm_mask_keep_count(const char *kind, double ratio, int block, int grid);

/* ---- encoders and decoders (used by cm_model_build; public for tests) ---- */

/* ViT encoder (CMAE.md §3): patch embedding conv, fixed sin-cos pos embed added
 * before masking, gather of ids_keep (i32 [n, n_keep]; -1 keeps all tokens in
 * order), cls token prepended, pre-norm blocks, final LN when final_norm.
 * Params under prefix ("backbone", "target_backbone"). Returns [n, 1 + T, D]
 * with the cls token first. */
int cm_vit_encoder(cm_graph *g, const cm_model_config *cfg, int img, int ids_keep, bool final_norm,
                   const char *prefix);
/* Hybrid ConvViT encoder (CMAE.md §9): conv stages with LN + GELU patch
 * embeddings and CBlocks (the 5x5 depthwise conv sees keep = 1 - mask,
 * upsampled to each stage; mask f32 [n, L], -1 for none), stage-3 transformer
 * on the ids_keep tokens (-1: all), and when fuse is set the multi-scale side
 * outputs added before a final LN (the online encoder of §9b). No cls token:
 * returns [n, T, D]. */
int cm_convvit_encoder(cm_graph *g, const cm_model_config *cfg, int img, int ids_keep, int mask,
                       bool fuse, const char *prefix);
/* The MAE decoder (CMAE.md §5) with width/depth/heads/mlp_ratio from dec:
 * embed, mask tokens, unshuffle by gather with ids_restore, fixed sin-cos
 * embedding, blocks, LN, prediction to out_dim (0: patch*patch*in_chans, the
 * pixels of a patch). latent is [n, (has_cls) + n_keep, D]. Returns
 * [n, L, out_dim] (cls dropped). */
int cm_mae_decoder(cm_graph *g, const cm_model_config *cfg, int width, int depth, int heads,
                   double mlp_ratio, int latent, int ids_restore, bool has_cls, int out_dim,
                   const char *prefix);

/* ---- whole models ------------------------------------------------------- */

typedef struct cm_model_build_opts {
  int batch;      /* local batch n (>= 1; >= 2 where BatchNorm needs it) */
  int ranks;      /* world size G (1: collectives are identities) */
  cm_dtype dtype; /* params and activations: f32, or f64 for reference tests */
} cm_model_build_opts;

/* A built forward graph: inputs, outputs and where the pieces are. Inputs:
 *   "img"        [n, C, H, W] online view
 *   "img_t"      [n, C, H, W] target view (contrastive variants)
 *   "ids_keep"   i32 [n, n_keep]   visible token indices (CMAE.md §2)
 *   "ids_restore" i32 [n, L]      unshuffle permutation
 *   "mask"       [n, L]            1 = masked
 *   "labels"     i32 [n]           contrastive targets i + n*rank (only when ranks > 1)
 * Outputs (in this order): "loss", "loss_rc", and for contrastive variants
 * "loss_ct". */
typedef struct cm_model {
  cm_graph *g;
  int loss, loss_rc, loss_ct; /* node ids; loss_ct -1 without the contrastive branch */
  int img, img_t, ids_keep, ids_restore, mask, labels; /* input node ids, -1 when absent */
  int n_tokens, n_keep;                                /* L and visible tokens */
} cm_model;

cm_status cm_model_build(const cm_model_config *cfg, const cm_model_build_opts *opts, cm_model *out,
                         cm_err *err);
void cm_model_free(cm_model *m);

/* How the step builder treats a model's params (plain strings, so this layer
 * does not depend on passes/): EMA pairs (online prefix, target prefix) and
 * the substrings of frozen param names. NULL-terminated. */
extern const char *const cm_model_ema_online_prefixes[];
extern const char *const cm_model_ema_target_prefixes[];
extern const char *const cm_model_frozen_substrings[];

#endif
