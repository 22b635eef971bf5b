/* Tests of the ViT CMAE / MAE builders (models/vit.c, models/cmae.c): tiny
 * models evaluated by the oracle in f64 with seeded inits and sampled masks
 * (losses recomputed independently from the oracle's predictions and
 * projections), a gradient check of the whole CMAE loss, and the names,
 * shapes and parameter counts of the official cmae_vit_base configuration. */
#include "../../models/models.h"
#include "../../passes/passes.h"
#include "../test.h"
#include "../testlib.h"

#include <stdint.h>

static test_rng rng_state = {0x853c49e6748fea9bull};
static double next_u(void) {
  return test_uniform(&rng_state);
}

/* The official config shrunk: 8x8 images, patch 2 (a 4x4 grid, 2x2 blocks of 4 cells). */
static void tiny_config(cm_model_config *c, bool contrastive) {
  cm_model_config_default(c);
  c->contrastive = contrastive;
  c->data.image_size = 8;
  c->data.in_chans = 3;
  c->mask.ratio = 0.5; /* int(4 * 0.5) = 2 cells = 8 visible tokens */
  c->encoder.patch = 2;
  c->encoder.width = 16;
  c->encoder.depth = 2;
  c->encoder.heads = 2;
  c->pixel_decoder.width = 8;
  c->pixel_decoder.depth = 1;
  c->pixel_decoder.heads = 2;
  c->feature_decoder.width = 8;
  c->feature_decoder.depth = 1;
  c->feature_decoder.heads = 2;
  c->projector.hidden = 16;
  c->projector.out = 8;
  c->predictor.hidden = 16;
  c->predictor.out = 8;
}

typedef struct run {
  cm_model m;
  cm_tensor *src;
  const cm_tensor **ptrs;
  cm_tensor *vals; /* after evaluate */
} run;

static bool run_build(run *r, const cm_model_config *cfg, int batch) {
  memset(r, 0, sizeof *r);
  cm_model_build_opts opts = {batch, 1, CM_F64};
  cm_err err = {0};
  cm_status st = cm_model_build(cfg, &opts, &r->m, &err);
  CHECK_MSG(st == CM_OK, "build: %s", err.msg);
  return st == CM_OK;
}

/* Params from cm_init_tensor (seed 11), images uniform in [-2, 2], masks sampled per row. */
static void run_sources(run *r, const cm_model_config *cfg) {
  cm_graph *g = r->m.g;
  r->src = calloc((size_t)g->n_nodes, sizeof *r->src);
  r->ptrs = calloc((size_t)g->n_nodes, sizeof *r->ptrs);
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *nd = &g->nodes[i];
    if (nd->op != CM_OP_PARAM && nd->op != CM_OP_INPUT) continue;
    cm_tensor_alloc(&r->src[i], nd->type, NULL);
    r->ptrs[i] = &r->src[i];
    if (nd->op == CM_OP_PARAM) {
      cm_err err = {0};
      CHECK_MSG(cm_init_tensor(&r->src[i], &nd->attrs.init, 11, nd->name, &err) == CM_OK, "%s",
                err.msg);
    } else if (i == r->m.img || i == r->m.img_t) {
      for (int64_t e = 0; e < cm_type_numel(&nd->type); e++)
        cm_tensor_set_f64(&r->src[i], e, 4.0 * next_u() - 2.0);
    }
  }
  int64_t n = g->nodes[r->m.img].type.dims[0];
  int grid = cfg->data.image_size / cfg->encoder.patch, L = grid * grid;
  int n_noise = cm_mask_noise_count(cfg->mask.kind, cfg->mask.block, grid);
  for (int64_t b = 0; b < n; b++) {
    double u[256];
    int32_t keep[256], restore[256];
    float mask[256];
    for (int i = 0; i < n_noise; i++) u[i] = next_u();
    int k = cm_mask_sample(cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid, u, keep, restore,
                           mask);
    CHECK(k == r->m.n_keep);
    for (int i = 0; i < k; i++) cm_tensor_set_i64(&r->src[r->m.ids_keep], b * k + i, keep[i]);
    for (int t = 0; t < L; t++) {
      cm_tensor_set_i64(&r->src[r->m.ids_restore], b * L + t, restore[t]);
      cm_tensor_set_f64(&r->src[r->m.mask], b * L + t, mask[t]);
    }
  }
}

static bool run_eval(run *r) {
  r->vals = calloc((size_t)r->m.g->n_nodes, sizeof *r->vals);
  cm_eval_opts opts = {CM_PRECISION_F64};
  cm_err err = {0};
  cm_status st = cm_eval(r->m.g, r->ptrs, r->vals, &opts, &err);
  CHECK_MSG(st == CM_OK, "eval: %s", err.msg);
  if (st != CM_OK) {
    free(r->vals);
    r->vals = NULL;
  }
  return st == CM_OK;
}

static double val(const run *r, int node, int64_t i) {
  return cm_tensor_get_f64(&r->vals[node], i);
}

static void run_free(run *r) {
  if (r->m.g) {
    for (int i = 0; i < r->m.g->n_nodes; i++) {
      if (r->src) cm_tensor_free(&r->src[i]);
      if (r->vals) cm_tensor_free(&r->vals[i]);
    }
  }
  free(r->src);
  free(r->ptrs);
  free(r->vals);
  cm_model_free(&r->m);
}

static int find_op(const cm_graph *g, cm_op op) {
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == op) return i;
  return -1;
}

/* L_rc recomputed from the oracle's pred: own patchify, unbiased per-patch variance. */
static double reference_rc(const run *r, const cm_model_config *cfg, int pred) {
  const cm_tensor *img = r->ptrs[r->m.img], *mask = r->ptrs[r->m.mask];
  int64_t n = img->type.dims[0], C = img->type.dims[1], S = img->type.dims[2];
  int p = cfg->encoder.patch, grid = (int)S / p, P = p * p * (int)C;
  double num = 0, den = 0, t[768];
  for (int64_t b = 0; b < n; b++)
    for (int i = 0; i < grid * grid; i++) {
      int gy = i / grid, gx = i % grid;
      double mean = 0, var = 0;
      for (int py = 0; py < p; py++)
        for (int px = 0; px < p; px++)
          for (int c = 0; c < C; c++)
            t[(py * p + px) * C + c] =
                cm_tensor_get_f64(img, ((b * C + c) * S + gy * p + py) * S + gx * p + px);
      for (int j = 0; j < P; j++) mean += t[j] / P;
      for (int j = 0; j < P; j++) var += (t[j] - mean) * (t[j] - mean) / (P - 1);
      double se = 0;
      for (int j = 0; j < P; j++) {
        double d = val(r, pred, (b * grid * grid + i) * P + j) - (t[j] - mean) / sqrt(var + 1e-6);
        se += d * d / P;
      }
      double mk = cm_tensor_get_f64(mask, b * grid * grid + i);
      num += mk * se;
      den += mk;
    }
  return num / den;
}

static void test_tiny_cmae(void) {
  cm_model_config cfg;
  tiny_config(&cfg, true);
  run r;
  if (!run_build(&r, &cfg, 3)) return;
  cm_graph *g = r.m.g;
  CHECK(r.m.n_tokens == 16 && r.m.n_keep == 8);
  CHECK(g->n_outputs == 3 && g->outputs[0] == r.m.loss && g->outputs[1] == r.m.loss_rc &&
        g->outputs[2] == r.m.loss_ct);
  CHECK(strcmp(g->nodes[r.m.loss].name, "loss") == 0 &&
        strcmp(g->nodes[r.m.loss_rc].name, "loss_rc") == 0);
  CHECK(strcmp(g->nodes[r.m.loss_ct].name, "loss_ct") == 0);
  CHECK(r.m.img_t >= 0 && r.m.labels == -1 && cm_graph_find(g, "labels") < 0);
  int ids = cm_graph_find(g, "ids_keep");
  CHECK(ids == r.m.ids_keep && g->nodes[ids].type.dtype == CM_I32 &&
        g->nodes[ids].type.dims[1] == 8);
  run_sources(&r, &cfg);
  if (!run_eval(&r)) {
    run_free(&r);
    return;
  }
  double loss = val(&r, r.m.loss, 0), rc = val(&r, r.m.loss_rc, 0), ct = val(&r, r.m.loss_ct, 0);
  CHECK(isfinite(loss) && isfinite(rc) && isfinite(ct));
  CHECK(rc > 0 && ct > 0);
  CHECK_NEAR(loss, cfg.loss.rc_weight * rc + ct, 1e-14);

  /* pred is the first operand of the named difference. */
  int diff = cm_graph_find(g, "loss_rc/diff");
  CHECK(diff >= 0);
  if (diff >= 0) {
    int pred = g->nodes[diff].inputs[0];
    CHECK(g->nodes[pred].type.dims[1] == 16 && g->nodes[pred].type.dims[2] == 12);
    CHECK_NEAR(rc, reference_rc(&r, &cfg, pred), 1e-12);
  }

  /* InfoNCE recomputed from q (the matmul's first operand) and the gathered keys. */
  int gather = find_op(g, CM_OP_ALL_GATHER), logits = -1;
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_MATMUL && g->nodes[i].inputs[1] == gather) logits = i;
  CHECK(gather >= 0 && logits >= 0);
  if (logits >= 0) {
    int q = g->nodes[logits].inputs[0], k = g->nodes[gather].inputs[0];
    CHECK(g->nodes[q].type.dims[0] == 3 && g->nodes[q].type.dims[1] == 8);
    CHECK(g->nodes[k].op == CM_OP_STOP_GRADIENT);
    double tau = cfg.loss.temperature, ce = 0;
    for (int i = 0; i < 3; i++) {
      double z[3], mx = -1e300, den = 0, nq = 0, nk = 0;
      for (int d = 0; d < 8; d++) {
        nq += val(&r, q, i * 8 + d) * val(&r, q, i * 8 + d);
        nk += val(&r, k, i * 8 + d) * val(&r, k, i * 8 + d);
      }
      CHECK_NEAR(nq, 1.0, 1e-12); /* L2-normalized rows */
      CHECK_NEAR(nk, 1.0, 1e-12);
      for (int j = 0; j < 3; j++) {
        z[j] = 0;
        for (int d = 0; d < 8; d++) z[j] += val(&r, q, i * 8 + d) * val(&r, k, j * 8 + d) / tau;
        if (z[j] > mx) mx = z[j];
      }
      for (int j = 0; j < 3; j++) den += exp(z[j] - mx);
      ce += -(z[i] - mx - log(den)) / 3;
    }
    CHECK_NEAR(ct, cfg.loss.ct_weight * 2 * tau * ce, 1e-12);
    /* Cosine logits are bounded by 1/tau: CE lies within log(n) +- 2/tau. */
    CHECK(ce > 0 && fabs(ce - log(3.0)) <= 2 / tau);
  }
  run_free(&r);
}

static void test_tiny_mae(void) {
  cm_model_config cfg;
  tiny_config(&cfg, false);
  run r;
  if (!run_build(&r, &cfg, 2)) return;
  cm_graph *g = r.m.g;
  CHECK(g->n_outputs == 2 && r.m.loss_ct == -1 && r.m.img_t == -1);
  CHECK(cm_graph_find(g, "img_t") < 0 && find_op(g, CM_OP_ALL_GATHER) < 0);
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_PARAM)
      CHECK_MSG(strncmp(g->nodes[i].name, "backbone.", 9) == 0 ||
                    strncmp(g->nodes[i].name, "neck.", 5) == 0,
                "unexpected MAE param %s", g->nodes[i].name);
  CHECK(cm_graph_find(g, "neck.decoder_pred.weight") >= 0);
  CHECK(cm_graph_find(g, "backbone.ln1.weight") >= 0);
  run_sources(&r, &cfg);
  if (run_eval(&r)) {
    double loss = val(&r, r.m.loss, 0), rc = val(&r, r.m.loss_rc, 0);
    CHECK(isfinite(loss) && rc > 0);
    CHECK_NEAR(loss, cfg.loss.rc_weight * rc, 1e-14);
    int diff = cm_graph_find(g, "loss_rc/diff");
    if (diff >= 0) CHECK_NEAR(rc, reference_rc(&r, &cfg, g->nodes[diff].inputs[0]), 1e-12);
  }
  run_free(&r);
}

/* Visible tokens see the image only through their own patch: changing a masked
 * patch of img leaves the encoder output unchanged, while the loss moves. */
static void test_masked_patches_hidden(void) {
  cm_model_config cfg;
  tiny_config(&cfg, false);
  cfg.loss.norm_pix = true;
  run r;
  if (!run_build(&r, &cfg, 1)) return;
  run_sources(&r, &cfg);
  int ln =
      -1; /* the encoder's final LN output feeds the decoder embed; find decoder_embed's matmul */
  int w = cm_graph_find(r.m.g, "neck.decoder_embed.weight");
  for (int i = 0; i < r.m.g->n_nodes && w >= 0; i++)
    if (r.m.g->nodes[i].op == CM_OP_MATMUL && r.m.g->nodes[i].inputs[1] == w)
      ln = r.m.g->nodes[i].inputs[0];
  CHECK(ln >= 0);
  if (ln < 0 || !run_eval(&r)) {
    run_free(&r);
    return;
  }
  cm_tensor before;
  cm_tensor_copy(&before, &r.vals[ln], NULL);
  double loss0 = val(&r, r.m.loss, 0);
  /* Perturb every pixel of the first masked token. */
  int masked = -1;
  for (int t = 0; t < 16 && masked < 0; t++)
    if (cm_tensor_get_f64(r.ptrs[r.m.mask], t) == 1.0) masked = t;
  CHECK(masked >= 0);
  cm_tensor *img = &r.src[r.m.img];
  for (int c = 0; c < 3; c++)
    for (int py = 0; py < 2; py++)
      for (int px = 0; px < 2; px++) {
        int64_t e = ((int64_t)c * 8 + (masked / 4) * 2 + py) * 8 + (masked % 4) * 2 + px;
        cm_tensor_set_f64(img, e, cm_tensor_get_f64(img, e) + 0.5 + py - px);
      }
  for (int i = 0; i < r.m.g->n_nodes; i++) cm_tensor_free(&r.vals[i]);
  free(r.vals);
  r.vals = NULL;
  if (run_eval(&r)) {
    for (int64_t e = 0; e < cm_type_numel(&before.type); e++)
      CHECK(cm_tensor_get_f64(&r.vals[ln], e) == cm_tensor_get_f64(&before, e));
    CHECK(fabs(val(&r, r.m.loss, 0) - loss0) > 1e-6);
  }
  cm_tensor_free(&before);
  run_free(&r);
}

static void test_cmae_gradients(void) {
  cm_model_config cfg;
  tiny_config(&cfg, true);
  cfg.encoder.depth = 1;
  run r;
  if (!run_build(&r, &cfg, 3)) return;
  run_sources(&r, &cfg);
  const char *names[] = {"backbone.cls_token",
                         "backbone.patch_embed.projection.bias",
                         "backbone.layers.0.ln1.weight",
                         "backbone.ln1.bias",
                         "pixel_decoder.mask_token",
                         "pixel_decoder.decoder_pred.bias",
                         "feature_decoder.decoder_embed.bias",
                         "feature_decoder.decoder_blocks.0.ln2.weight",
                         "projector.bn0.weight",
                         "head.predictor.bn0.bias"};
  enum { NW = 10 };
  int wrt[NW];
  for (int i = 0; i < NW; i++) {
    wrt[i] = cm_graph_find(r.m.g, names[i]);
    CHECK_MSG(wrt[i] >= 0, "missing %s", names[i]);
    if (wrt[i] < 0) {
      run_free(&r);
      return;
    }
  }
  cm_gradcheck_result res[NW];
  cm_err err = {0};
  cm_status st = cm_gradcheck(r.m.g, r.m.loss, NW, wrt, r.ptrs, 1e-6, res, &err);
  CHECK_MSG(st == CM_OK, "gradcheck: %s", err.msg);
  for (int i = 0; i < NW && st == CM_OK; i++) {
    CHECK_MSG(res[i].max_rel_error < 1e-6, "%s: relative error %.3g (abs %.3g)", names[i],
              res[i].max_rel_error, res[i].max_abs_error);
    CHECK_MSG(res[i].max_abs_gradient > 1e-9, "%s: zero gradient", names[i]);
  }
  run_free(&r);
}

static void test_multi_rank_graph(void) {
  cm_model_config cfg;
  tiny_config(&cfg, true);
  cm_model m;
  cm_model_build_opts opts = {2, 4, CM_F32};
  cm_err err = {0};
  CHECK_MSG(cm_model_build(&cfg, &opts, &m, &err) == CM_OK, "%s", err.msg);
  if (!m.g) return;
  CHECK(m.labels >= 0 && cm_graph_find(m.g, "labels") == m.labels);
  CHECK(m.g->nodes[m.labels].op == CM_OP_INPUT && m.g->nodes[m.labels].type.dtype == CM_I32);
  int gather = find_op(m.g, CM_OP_ALL_GATHER);
  CHECK(gather >= 0 && m.g->nodes[gather].type.dims[0] == 8 && m.g->nodes[gather].attrs.ranks == 4);
  int reduces = 0;
  for (int i = 0; i < m.g->n_nodes; i++) reduces += m.g->nodes[i].op == CM_OP_ALL_REDUCE;
  CHECK(reduces == 6); /* mean and E[x^2] of three BatchNorms */
  cm_model_free(&m);
}

static void test_build_errors(void) {
  cm_model_config cfg;
  tiny_config(&cfg, true);
  cm_model m;
  cm_err err = {0};
  cm_model_build_opts one = {1, 1, CM_F64};
  CHECK(cm_model_build(&cfg, &one, &m, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "batch");
  CHECK(m.g == NULL);
  cm_model_build_opts ok = {2, 1, CM_F64};
  cfg.encoder.heads = 3; /* 16 % 3 */
  CHECK(cm_model_build(&cfg, &ok, &m, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "backbone.layers.0.attn");
  tiny_config(&cfg, true);
  snprintf(cfg.arch, sizeof cfg.arch, "resnet");
  CHECK(cm_model_build(&cfg, &ok, &m, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "resnet");
  tiny_config(&cfg, true);
  cfg.data.image_size = 9;
  CHECK(cm_model_build(&cfg, &ok, &m, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "image_size");
}

/* Assembly for arch "convvit" (CMAE.md §9c): no cls anywhere, decoders over L
 * tokens, the same losses. Checks the wiring, not the ConvViT encoder itself. */
static void test_tiny_convvit_cmae(void) {
  cm_model_config cfg;
  tiny_config(&cfg, true);
  snprintf(cfg.arch, sizeof cfg.arch, "convvit");
  cfg.data.image_size = 16;
  cfg.encoder.patch = 4; /* 2 * 1 * 2: a 4x4 token grid */
  cfg.encoder.width = 8;
  cfg.encoder.depth = 1;
  const int widths[3] = {4, 6, 8}, patches[3] = {2, 1, 2};
  for (int s = 0; s < 3; s++) {
    cfg.encoder.stage_widths[s] = widths[s];
    cfg.encoder.stage_depths[s] = 1;
    cfg.encoder.stage_patches[s] = patches[s];
  }
  run r;
  if (!run_build(&r, &cfg, 2)) return;
  cm_graph *g = r.m.g;
  CHECK(r.m.n_tokens == 16 && r.m.n_keep == 8);
  int pos = cm_graph_find(g, "pixel_decoder.decoder_pos_embed");
  CHECK(pos >= 0 && g->nodes[pos].type.dims[1] == 16 && g->nodes[pos].attrs.init.a == 0);
  CHECK(cm_graph_find(g, "backbone.cls_token") < 0 &&
        cm_graph_find(g, "target_backbone.cls_token") < 0);
  CHECK(cm_graph_find(g, "feature_decoder.mask_token") >= 0);
  run_sources(&r, &cfg);
  if (run_eval(&r)) {
    double loss = val(&r, r.m.loss, 0), rc = val(&r, r.m.loss_rc, 0), ct = val(&r, r.m.loss_ct, 0);
    CHECK(isfinite(loss) && rc > 0 && ct > 0);
    CHECK_NEAR(loss, rc + ct, 1e-14);
    int diff = cm_graph_find(g, "loss_rc/diff");
    if (diff >= 0) CHECK_NEAR(rc, reference_rc(&r, &cfg, g->nodes[diff].inputs[0]), 1e-12);
  }
  run_free(&r);
}

/* The official cmae_vit_base: names, shapes and parameter counts (CMAE.md §11). */
static void test_official_base(void) {
  cm_model_config cfg;
  cm_model_config_default(&cfg);
  CHECK(strcmp(cfg.arch, "vit") == 0 && cfg.contrastive);
  cm_model m;
  cm_model_build_opts opts = {2, 1, CM_F32};
  cm_err err = {0};
  CHECK_MSG(cm_model_build(&cfg, &opts, &m, &err) == CM_OK, "%s", err.msg);
  if (!m.g) return;
  const cm_graph *g = m.g;
  CHECK(m.n_tokens == 196 && m.n_keep == 68);
  static const struct {
    const char *name;
    int rank;
    int64_t dims[4];
  } expect[] = {
      {"backbone.patch_embed.projection.weight", 4, {768, 3, 16, 16}},
      {"backbone.patch_embed.projection.bias", 1, {768}},
      {"backbone.cls_token", 3, {1, 1, 768}},
      {"backbone.pos_embed", 3, {1, 197, 768}},
      {"backbone.layers.11.attn.qkv.weight", 2, {2304, 768}},
      {"backbone.layers.11.attn.qkv.bias", 1, {2304}},
      {"backbone.layers.0.attn.proj.weight", 2, {768, 768}},
      {"backbone.layers.5.ln1.weight", 1, {768}},
      {"backbone.layers.5.ln2.bias", 1, {768}},
      {"backbone.layers.3.ffn.layers.0.0.weight", 2, {3072, 768}},
      {"backbone.layers.3.ffn.layers.1.weight", 2, {768, 3072}},
      {"backbone.ln1.weight", 1, {768}},
      {"target_backbone.layers.11.ffn.layers.1.bias", 1, {768}},
      {"target_backbone.pos_embed", 3, {1, 197, 768}},
      {"pixel_decoder.decoder_embed.weight", 2, {512, 768}},
      {"pixel_decoder.mask_token", 3, {1, 1, 512}},
      {"pixel_decoder.decoder_pos_embed", 3, {1, 197, 512}},
      {"pixel_decoder.decoder_blocks.7.attn.qkv.weight", 2, {1536, 512}},
      {"pixel_decoder.ln1.weight", 1, {512}},
      {"pixel_decoder.decoder_pred.weight", 2, {768, 512}},
      {"feature_decoder.decoder_blocks.1.ffn.layers.0.0.weight", 2, {2048, 512}},
      {"projector.fc0.weight", 2, {1536, 768}},
      {"projector.bn0.weight", 1, {1536}},
      {"projector.fc1.weight", 2, {256, 1536}},
      {"target_projector.fc0.bias", 1, {1536}},
      {"head.predictor.fc0.weight", 2, {1536, 256}},
      {"head.predictor.fc1.weight", 2, {256, 1536}},
  };
  for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++) {
    int id = cm_graph_find(g, expect[i].name);
    CHECK_MSG(id >= 0 && g->nodes[id].op == CM_OP_PARAM, "missing param %s", expect[i].name);
    if (id < 0) continue;
    cm_type t = g->nodes[id].type;
    CHECK_MSG(t.rank == expect[i].rank && t.dtype == CM_F32, "%s: rank %d", expect[i].name, t.rank);
    for (int d = 0; d < t.rank && d < 4; d++)
      CHECK_MSG(t.dims[d] == expect[i].dims[d], "%s: dim %d is %lld", expect[i].name, d,
                (long long)t.dims[d]);
  }
  const char *absent[] = {"target_backbone.ln1.weight", "projector.fc1.bias",
                          "feature_decoder.decoder_blocks.2.ln1.weight",
                          "backbone.layers.12.ln1.weight", "pixel_decoder.cls_token"};
  for (int i = 0; i < 5; i++)
    CHECK_MSG(cm_graph_find(g, absent[i]) < 0, "unexpected %s", absent[i]);

  /* Inits of the official code. */
  int pe = cm_graph_find(g, "backbone.patch_embed.projection.weight");
  CHECK(g->nodes[pe].attrs.init.kind == CM_INIT_XAVIER_UNIFORM && g->nodes[pe].attrs.init.b == 1);
  int peb = cm_graph_find(g, "backbone.patch_embed.projection.bias");
  CHECK(g->nodes[peb].attrs.init.kind == CM_INIT_TORCH_DEFAULT &&
        g->nodes[peb].attrs.init.a == 768);
  int pos = cm_graph_find(g, "pixel_decoder.decoder_pos_embed");
  CHECK(g->nodes[pos].attrs.init.kind == CM_INIT_SINCOS_2D && g->nodes[pos].attrs.init.a == 1);
  int cls = cm_graph_find(g, "backbone.cls_token");
  CHECK(g->nodes[cls].attrs.init.kind == CM_INIT_NORMAL && g->nodes[cls].attrs.init.b == 0.02);
  int qkv = cm_graph_find(g, "target_backbone.layers.2.attn.qkv.weight");
  CHECK(g->nodes[qkv].attrs.init.kind == CM_INIT_XAVIER_UNIFORM && g->nodes[qkv].attrs.init.b == 0);

  /* Counts: trainable = neither frozen nor an EMA target. */
  double trainable = 0, ema = 0, part[5] = {0};
  const char *parts[5] = {"backbone.", "pixel_decoder.", "feature_decoder.", "projector.",
                          "head.predictor."};
  for (int i = 0; i < g->n_nodes; i++) {
    if (g->nodes[i].op != CM_OP_PARAM) continue;
    const char *name = g->nodes[i].name;
    double numel = (double)cm_type_numel(&g->nodes[i].type);
    bool frozen = false, target = false;
    for (int k = 0; cm_model_frozen_substrings[k]; k++)
      frozen |= strstr(name, cm_model_frozen_substrings[k]) != NULL;
    for (int k = 0; cm_model_ema_target_prefixes[k]; k++)
      target |= strncmp(name, cm_model_ema_target_prefixes[k],
                        strlen(cm_model_ema_target_prefixes[k])) == 0;
    if (target) ema += numel;
    if (frozen || target) continue;
    trainable += numel;
    for (int k = 0; k < 5; k++)
      if (strncmp(name, parts[k], strlen(parts[k])) == 0) part[k] += numel;
  }
  CHECK_MSG(fabs(trainable - 121.1e6) < 0.1e6, "trainable %.0f", trainable);
  CHECK_MSG(fabs(part[0] - 85.65e6) < 0.01e6, "encoder %.0f", part[0]);
  CHECK(part[0] == 85647360.0); /* patch embed + cls + 12 blocks + final LN */
  CHECK_MSG(fabs(part[1] - 26.01e6) < 0.01e6, "pixel decoder %.0f", part[1]);
  CHECK_MSG(fabs(part[2] - 7.09e6) < 0.01e6, "feature decoder %.0f", part[2]);
  CHECK_MSG(fabs(part[3] - 1.58e6) < 0.01e6, "projector %.0f", part[3]);
  CHECK_MSG(fabs(part[4] - 0.79e6) < 0.01e6, "predictor %.0f", part[4]);
  CHECK_MSG(fabs(ema - (85.80e6 + 1.58e6)) < 0.01e6, "EMA copies %.0f", ema);
  /* Every EMA target has an online twin of the same shape. */
  for (int i = 0; i < g->n_nodes; i++) {
    if (g->nodes[i].op != CM_OP_PARAM) continue;
    const char *name = g->nodes[i].name;
    for (int k = 0; cm_model_ema_target_prefixes[k]; k++) {
      size_t len = strlen(cm_model_ema_target_prefixes[k]);
      if (strncmp(name, cm_model_ema_target_prefixes[k], len) != 0) continue;
      char twin[256];
      snprintf(twin, sizeof twin, "%s%s", cm_model_ema_online_prefixes[k], name + len);
      int o = cm_graph_find(g, twin);
      CHECK_MSG(o >= 0, "no online twin for %s", name);
      if (o >= 0) CHECK(cm_shape_equal(&g->nodes[o].type, &g->nodes[i].type));
    }
  }
  cm_model_free(&m);
}

TEST_MAIN(TEST(test_tiny_cmae), TEST(test_tiny_mae), TEST(test_masked_patches_hidden),
          TEST(test_cmae_gradients), TEST(test_multi_rank_graph), TEST(test_build_errors),
          TEST(test_tiny_convvit_cmae), TEST(test_official_base))
