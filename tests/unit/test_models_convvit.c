/* The hybrid ConvViT encoder (models/convvit.c, CMAE.md §9): shapes and
 * parameter names, the masked convolution (visible tokens never see masked
 * pixels), agreement with a plain-C reference of the ConvMAE forward, gradients
 * against finite differences, and the ConvViT-B parameter count. */
#include "../test.h"
#include "../testlib.h"
#include "models/models.h"
#include "passes/passes.h"

#include <stdarg.h>
#include <stdint.h>

/* ---- configs, graphs and values ------------------------------------------ */

static void tiny_config(cm_model_config *c, int image, int p0, int p1, int p2) {
  memset(c, 0, sizeof *c);
  snprintf(c->arch, sizeof c->arch, "convvit");
  c->data.image_size = image;
  c->data.in_chans = 3;
  c->encoder.patch = p0 * p1 * p2;
  c->encoder.width = 8;
  c->encoder.heads = 2;
  c->encoder.mlp_ratio = 4;
  c->encoder.qkv_bias = true;
  c->encoder.ln_eps = 1e-6;
  c->encoder.stage_widths[0] = 4;
  c->encoder.stage_widths[1] = 6;
  c->encoder.stage_widths[2] = 8;
  for (int s = 0; s < 3; s++) c->encoder.stage_depths[s] = 1;
  c->encoder.stage_patches[0] = p0;
  c->encoder.stage_patches[1] = p1;
  c->encoder.stage_patches[2] = p2;
}

typedef struct {
  cm_graph *g;
  int img, ids_keep, mask, out;
} built;

/* n_keep < 0: no ids_keep; masked false: no mask input. */
static built build(const cm_model_config *c, int batch, int n_keep, bool masked, bool fuse,
                   cm_dtype dt) {
  built b = {cm_graph_new(), -1, -1, -1, -1};
  int image = c->data.image_size;
  int64_t grid = image / c->encoder.patch;
  int64_t img_dims[4] = {batch, c->data.in_chans, image, image};
  b.img = cm_input(b.g, "img", dt, 4, img_dims);
  if (n_keep >= 0) {
    int64_t d[2] = {batch, n_keep};
    b.ids_keep = cm_input(b.g, "ids_keep", CM_I32, 2, d);
  }
  if (masked) {
    int64_t d[2] = {batch, grid * grid};
    b.mask = cm_input(b.g, "mask", CM_F32, 2, d);
  }
  b.out = cm_convvit_encoder(b.g, c, b.img, b.ids_keep, b.mask, fuse, "backbone");
  return b;
}

static test_rng lcg_state = {12345};
static double uniform_pm1(void) {
  return test_uniform(&lcg_state) * 2 - 1;
}

/* Source values: params from their initializers, except that LayerNorm weights
 * and all biases (ones and zeros at init) get random values so that every
 * parameter matters; inputs from the given tensors by name. */
typedef struct {
  cm_tensor *owned;
  const cm_tensor **sources;
  int n;
} values;

static bool is_affine_or_bias(const char *name) {
  return strstr(name, ".bias") || strstr(name, "norm");
}

static values make_values(const cm_graph *g, const cm_tensor *img, const cm_tensor *ids,
                          const cm_tensor *mask) {
  values v = {calloc((size_t)g->n_nodes, sizeof(cm_tensor)),
              calloc((size_t)g->n_nodes, sizeof(cm_tensor *)), g->n_nodes};
  uint64_t saved = lcg_state.s;
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *nd = &g->nodes[i];
    if (nd->op == CM_OP_PARAM) {
      cm_err err;
      CHECK(cm_tensor_alloc(&v.owned[i], nd->type, &err) == CM_OK);
      CHECK_MSG(cm_init_tensor(&v.owned[i], &nd->attrs.init, 7, nd->name, &err) == CM_OK, "%s",
                err.msg);
      if (is_affine_or_bias(nd->name)) {
        /* values depend on the name only, so two graphs get the same params */
        lcg_state.s = cm_hash_str(nd->name);
        int64_t cnt = cm_type_numel(&nd->type);
        bool ln_weight = strstr(nd->name, ".weight") != NULL;
        for (int64_t e = 0; e < cnt; e++)
          cm_tensor_set_f64(&v.owned[i], e, (ln_weight ? 1.0 : 0.0) + 0.3 * uniform_pm1());
      }
      v.sources[i] = &v.owned[i];
    } else if (nd->op == CM_OP_INPUT) {
      if (strcmp(nd->name, "img") == 0) v.sources[i] = img;
      if (strcmp(nd->name, "ids_keep") == 0) v.sources[i] = ids;
      if (strcmp(nd->name, "mask") == 0) v.sources[i] = mask;
    }
  }
  lcg_state.s = saved;
  return v;
}

static void free_values(values *v) {
  for (int i = 0; i < v->n; i++) cm_tensor_free(&v->owned[i]);
  free(v->owned);
  free(v->sources);
}

/* Evaluates b.out natively; returns a copy (caller frees) or an empty tensor on failure. */
static cm_tensor run(const built *b, const values *v) {
  cm_tensor out = {0};
  cm_tensor *vals = calloc((size_t)b->g->n_nodes, sizeof *vals);
  cm_eval_opts opts = {CM_PRECISION_NATIVE};
  cm_err err;
  cm_status st = cm_eval(b->g, v->sources, vals, &opts, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st == CM_OK) {
    CHECK(cm_tensor_copy(&out, &vals[b->out], &err) == CM_OK);
    for (int i = 0; i < b->g->n_nodes; i++) cm_tensor_free(&vals[i]);
  }
  free(vals);
  return out;
}

static cm_tensor random_image(cm_dtype dt, int batch, int chans, int image) {
  int64_t d[4] = {batch, chans, image, image};
  cm_tensor t;
  cm_tensor_alloc(&t, cm_type_make(dt, 4, d), NULL);
  for (int64_t i = 0; i < cm_type_numel(&t.type); i++) cm_tensor_set_f64(&t, i, uniform_pm1());
  return t;
}

/* ids_keep and the matching mask (1 = masked) from per-sample visible lists. */
static void make_mask(int batch, int tokens, int n_keep, const int *keep_lists, cm_tensor *ids,
                      cm_tensor *mask) {
  int64_t di[2] = {batch, n_keep}, dm[2] = {batch, tokens};
  cm_tensor_alloc(ids, cm_type_make(CM_I32, 2, di), NULL);
  cm_tensor_alloc(mask, cm_type_make(CM_F32, 2, dm), NULL);
  for (int b = 0; b < batch; b++) {
    for (int t = 0; t < tokens; t++) cm_tensor_set_f64(mask, b * tokens + t, 1);
    for (int k = 0; k < n_keep; k++) {
      cm_tensor_set_i64(ids, b * n_keep + k, keep_lists[b * n_keep + k]);
      cm_tensor_set_f64(mask, b * tokens + keep_lists[b * n_keep + k], 0);
    }
  }
}

static bool is_verified(const built *b) {
  cm_err err;
  if (cm_graph_error(b->g)) {
    CHECK_MSG(0, "build failed: %s", cm_graph_error(b->g));
    return false;
  }
  cm_status st = cm_graph_verify(b->g, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  return st == CM_OK && b->out >= 0;
}

static bool has_shape(const cm_graph *g, int node, int rank, const int64_t *dims) {
  if (node < 0) return false;
  cm_type t = g->nodes[node].type;
  cm_type want = cm_type_make(t.dtype, rank, dims);
  return cm_shape_equal(&t, &want);
}

static int param_with_shape(const cm_graph *g, const char *name, int rank, const int64_t *dims) {
  int id = cm_graph_find(g, name);
  CHECK_MSG(id >= 0 && g->nodes[id].op == CM_OP_PARAM, "no param %s", name);
  if (id >= 0) CHECK_MSG(has_shape(g, id, rank, dims), "%s has the wrong shape", name);
  return id;
}

/* ---- shapes and names ----------------------------------------------------- */

static void test_shapes_and_names(void) {
  cm_model_config c;
  tiny_config(&c, 16, 2, 2, 2); /* patch 8, a 2 x 2 token grid */
  for (int variant = 0; variant < 4; variant++) {
    bool masked = variant & 1, fuse = variant & 2;
    built b = build(&c, 2, masked ? 3 : -1, masked, fuse, CM_F64);
    if (is_verified(&b)) {
      int64_t want[3] = {2, masked ? 3 : 4, 8};
      CHECK_MSG(has_shape(b.g, b.out, 3, want), "variant %d", variant);
      CHECK(b.g->nodes[b.out].type.dtype == CM_F64);
    }
    CHECK((cm_graph_find(b.g, "backbone.norm.weight") >= 0) == fuse);
    CHECK((cm_graph_find(b.g, "backbone.stage1_output_decode.weight") >= 0) == fuse);
    CHECK((cm_graph_find(b.g, "backbone.stage2_output_decode.bias") >= 0) == fuse);
    if (variant == 3) {
      const cm_graph *g = b.g;
      param_with_shape(g, "backbone.patch_embed1.proj.weight", 4, (int64_t[]){4, 3, 2, 2});
      param_with_shape(g, "backbone.patch_embed1.norm.weight", 1, (int64_t[]){4});
      param_with_shape(g, "backbone.patch_embed2.proj.weight", 4, (int64_t[]){6, 4, 2, 2});
      param_with_shape(g, "backbone.patch_embed3.proj.weight", 4, (int64_t[]){8, 6, 2, 2});
      param_with_shape(g, "backbone.patch_embed3.norm.bias", 1, (int64_t[]){8});
      param_with_shape(g, "backbone.patch_embed4.weight", 2, (int64_t[]){8, 8});
      param_with_shape(g, "backbone.blocks1.0.norm1.weight", 1, (int64_t[]){4});
      param_with_shape(g, "backbone.blocks1.0.conv1.weight", 4, (int64_t[]){4, 4, 1, 1});
      param_with_shape(g, "backbone.blocks1.0.attn.weight", 4, (int64_t[]){4, 1, 5, 5});
      param_with_shape(g, "backbone.blocks1.0.attn.bias", 1, (int64_t[]){4});
      param_with_shape(g, "backbone.blocks1.0.conv2.bias", 1, (int64_t[]){4});
      param_with_shape(g, "backbone.blocks2.0.mlp.fc1.weight", 4, (int64_t[]){24, 6, 1, 1});
      param_with_shape(g, "backbone.blocks2.0.mlp.fc2.weight", 4, (int64_t[]){6, 24, 1, 1});
      param_with_shape(g, "backbone.blocks2.0.norm2.bias", 1, (int64_t[]){6});
      param_with_shape(g, "backbone.blocks3.0.attn.qkv.weight", 2, (int64_t[]){24, 8});
      param_with_shape(g, "backbone.blocks3.0.attn.qkv.bias", 1, (int64_t[]){24});
      param_with_shape(g, "backbone.blocks3.0.attn.proj.weight", 2, (int64_t[]){8, 8});
      param_with_shape(g, "backbone.blocks3.0.mlp.fc1.weight", 2, (int64_t[]){32, 8});
      param_with_shape(g, "backbone.blocks3.0.mlp.fc2.bias", 1, (int64_t[]){8});
      param_with_shape(g, "backbone.stage1_output_decode.weight", 4, (int64_t[]){8, 4, 4, 4});
      param_with_shape(g, "backbone.stage2_output_decode.weight", 4, (int64_t[]){8, 6, 2, 2});
      int pos = param_with_shape(g, "backbone.pos_embed", 3, (int64_t[]){1, 4, 8});
      if (pos >= 0) CHECK(g->nodes[pos].attrs.init.kind == CM_INIT_SINCOS_2D);
      if (pos >= 0) CHECK(g->nodes[pos].attrs.init.a == 0);
      int pe3 = cm_graph_find(g, "backbone.patch_embed3.proj.weight");
      if (pe3 >= 0) {
        CHECK(g->nodes[pe3].attrs.init.kind == CM_INIT_XAVIER_UNIFORM);
        CHECK(g->nodes[pe3].attrs.init.b == 1);
      }
      int pe4 = cm_graph_find(g, "backbone.patch_embed4.weight");
      if (pe4 >= 0) CHECK(g->nodes[pe4].attrs.init.kind == CM_INIT_XAVIER_UNIFORM);
      int dw = cm_graph_find(g, "backbone.blocks1.0.attn.bias");
      if (dw >= 0) { /* PyTorch conv bias default: U(+-1/sqrt(fan_in)), fan_in = 1 * 5 * 5 */
        CHECK(g->nodes[dw].attrs.init.kind == CM_INIT_TORCH_DEFAULT);
        CHECK(g->nodes[dw].attrs.init.a == 25);
      }
      CHECK(cm_graph_find(g, "backbone.blocks1.1.conv1.weight") < 0);
      CHECK(cm_graph_find(g, "backbone.cls_token") < 0);
    }
    cm_graph_free(b.g);
  }
}

static void test_rejects_bad_operands(void) {
  cm_model_config c;
  tiny_config(&c, 16, 2, 2, 2);
  /* a mask over the wrong number of tokens */
  cm_graph *g = cm_graph_new();
  int img = cm_input(g, "img", CM_F64, 4, (int64_t[]){2, 3, 16, 16});
  int mask = cm_input(g, "mask", CM_F32, 2, (int64_t[]){2, 5});
  CHECK(cm_convvit_encoder(g, &c, img, -1, mask, true, "backbone") < 0);
  CHECK(cm_graph_error(g) != NULL);
  if (cm_graph_error(g)) CHECK_STR_CONTAINS(cm_graph_error(g), "mask");
  cm_graph_free(g);
  /* an image that the stage patches do not divide */
  c.data.image_size = 12;
  g = cm_graph_new();
  img = cm_input(g, "img", CM_F64, 4, (int64_t[]){2, 3, 12, 12});
  CHECK(cm_convvit_encoder(g, &c, img, -1, -1, false, "backbone") < 0);
  if (cm_graph_error(g)) CHECK_STR_CONTAINS(cm_graph_error(g), "data.image_size");
  CHECK(cm_graph_error(g) != NULL);
  cm_graph_free(g);
  /* heads not dividing the width */
  tiny_config(&c, 16, 2, 2, 2);
  c.encoder.heads = 3;
  g = cm_graph_new();
  img = cm_input(g, "img", CM_F64, 4, (int64_t[]){2, 3, 16, 16});
  CHECK(cm_convvit_encoder(g, &c, img, -1, -1, false, "backbone") < 0);
  if (cm_graph_error(g)) CHECK_STR_CONTAINS(cm_graph_error(g), "encoder.heads");
  CHECK(cm_graph_error(g) != NULL);
  cm_graph_free(g);
}

/* ---- the masked convolution ----------------------------------------------- */

/* Adds random values to every pixel of the given tokens' patches of sample b. */
static void perturb_patches(cm_tensor *img, int b, int n_tok, const int *toks, int grid,
                            int patch) {
  int64_t C = img->type.dims[1], H = img->type.dims[2], W = img->type.dims[3];
  for (int i = 0; i < n_tok; i++) {
    int row = toks[i] / grid, col = toks[i] % grid;
    for (int64_t ch = 0; ch < C; ch++)
      for (int y = row * patch; y < (row + 1) * patch; y++)
        for (int x = col * patch; x < (col + 1) * patch; x++) {
          int64_t e = ((b * C + ch) * H + y) * W + x;
          cm_tensor_set_f64(img, e, cm_tensor_get_f64(img, e) + 2 * uniform_pm1());
        }
  }
}

static bool same_bits(const cm_tensor *a, const cm_tensor *b) {
  return a->data && b->data && cm_type_equal(&a->type, &b->type) &&
         memcmp(a->data, b->data, cm_type_nbytes(&a->type)) == 0;
}

static void test_masked_pixels_never_reach_visible_tokens(void) {
  cm_model_config c;
  tiny_config(&c, 16, 2, 2, 2); /* stage 1 at 8 x 8: the 5 x 5 dwconv spans several patches */
  const int batch = 2, n_keep = 2, grid = 2, patch = 8;
  /* visible tokens (any order); the masks are not symmetric under transposition */
  const int keep_lists[4] = {2, 0, 3, 2};
  const int masked0[2] = {1, 3}, masked1[2] = {0, 1}, visible0[1] = {0};
  cm_tensor ids, mask;
  make_mask(batch, grid * grid, n_keep, keep_lists, &ids, &mask);
  cm_tensor img = random_image(CM_F64, batch, 3, 16);
  cm_tensor img_masked_changed = {0}, img_visible_changed = {0};
  cm_tensor_copy(&img_masked_changed, &img, NULL);
  perturb_patches(&img_masked_changed, 0, 2, masked0, grid, patch);
  perturb_patches(&img_masked_changed, 1, 2, masked1, grid, patch);
  cm_tensor_copy(&img_visible_changed, &img, NULL);
  perturb_patches(&img_visible_changed, 0, 1, visible0, grid, patch);

  for (int fuse = 0; fuse < 2; fuse++) {
    built b = build(&c, batch, n_keep, true, fuse, CM_F64);
    if (!is_verified(&b)) {
      cm_graph_free(b.g);
      continue;
    }
    values v0 = make_values(b.g, &img, &ids, &mask);
    values v1 = make_values(b.g, &img_masked_changed, &ids, &mask);
    values v2 = make_values(b.g, &img_visible_changed, &ids, &mask);
    cm_tensor y0 = run(&b, &v0), y1 = run(&b, &v1), y2 = run(&b, &v2);
    CHECK_MSG(same_bits(&y0, &y1), "fuse %d: masked pixels changed visible tokens", fuse);
    CHECK_MSG(!same_bits(&y0, &y2), "fuse %d: visible pixels changed nothing", fuse);
    /* without the mask the 5 x 5 conv mixes the patches: the same change leaks */
    built u = build(&c, batch, n_keep, false, fuse, CM_F64);
    if (is_verified(&u)) {
      values u0 = make_values(u.g, &img, &ids, NULL);
      values u1 = make_values(u.g, &img_masked_changed, &ids, NULL);
      cm_tensor z0 = run(&u, &u0), z1 = run(&u, &u1);
      CHECK_MSG(z0.data && !same_bits(&z0, &z1), "fuse %d: the unmasked encoder did not leak",
                fuse);
      cm_tensor_free(&z0);
      cm_tensor_free(&z1);
      free_values(&u0);
      free_values(&u1);
    }
    cm_graph_free(u.g);
    cm_tensor_free(&y0);
    cm_tensor_free(&y1);
    cm_tensor_free(&y2);
    free_values(&v0);
    free_values(&v1);
    free_values(&v2);
    cm_graph_free(b.g);
  }
  cm_tensor_free(&img);
  cm_tensor_free(&img_masked_changed);
  cm_tensor_free(&img_visible_changed);
  cm_tensor_free(&ids);
  cm_tensor_free(&mask);
}

/* A zero mask with all ids in order equals no masking at all, bit for bit. */
static void test_zero_mask_equals_no_mask(void) {
  cm_model_config c;
  tiny_config(&c, 8, 1, 2, 2);
  const int keep_lists[8] = {0, 1, 2, 3, 0, 1, 2, 3};
  cm_tensor ids, mask;
  make_mask(2, 4, 4, keep_lists, &ids, &mask);
  cm_tensor img = random_image(CM_F64, 2, 3, 8);
  built a = build(&c, 2, 4, true, true, CM_F64);
  built b = build(&c, 2, -1, false, true, CM_F64);
  if (is_verified(&a) && is_verified(&b)) {
    values va = make_values(a.g, &img, &ids, &mask), vb = make_values(b.g, &img, NULL, NULL);
    cm_tensor ya = run(&a, &va), yb = run(&b, &vb);
    int64_t want[3] = {2, 4, 8};
    CHECK(has_shape(b.g, b.out, 3, want));
    CHECK(same_bits(&ya, &yb));
    cm_tensor_free(&ya);
    cm_tensor_free(&yb);
    free_values(&va);
    free_values(&vb);
  }
  cm_graph_free(a.g);
  cm_graph_free(b.g);
  cm_tensor_free(&img);
  cm_tensor_free(&ids);
  cm_tensor_free(&mask);
}

/* ---- a plain-C reference of the ConvMAE forward --------------------------- */

typedef struct {
  const cm_graph *g;
  const values *v;
} ref_ctx;

static const double *ref_param(const ref_ctx *r, const char *fmt, ...) {
  char name[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(name, sizeof name, fmt, ap);
  va_end(ap);
  int id = cm_graph_find(r->g, name);
  CHECK_MSG(id >= 0, "reference: no param %s", name);
  static const double zeros[4096];
  return id >= 0 ? (const double *)r->v->sources[id]->data : zeros;
}

/* out[N, O, OH, OW] = conv2d(in[N, C, H, W], w[O, C/groups, k, k]) + b */
static double *ref_conv(const double *in, int N, int C, int H, int W, const double *w,
                        const double *bias, int O, int k, int stride, int pad, int groups,
                        int *OH) {
  int oh = (H + 2 * pad - k) / stride + 1, ow = (W + 2 * pad - k) / stride + 1;
  int cpg = C / groups, opg = O / groups;
  double *out = calloc((size_t)N * O * oh * ow, sizeof(double));
  for (int n = 0; n < N; n++)
    for (int o = 0; o < O; o++)
      for (int i = 0; i < oh; i++)
        for (int j = 0; j < ow; j++) {
          double s = bias[o];
          for (int c = 0; c < cpg; c++)
            for (int u = 0; u < k; u++)
              for (int q = 0; q < k; q++) {
                int y = i * stride - pad + u, x = j * stride - pad + q;
                if (y < 0 || y >= H || x < 0 || x >= W) continue;
                s += in[((n * C + (o / opg) * cpg + c) * H + y) * W + x] *
                     w[((o * cpg + c) * k + u) * k + q];
              }
          out[((n * O + o) * oh + i) * ow + j] = s;
        }
  *OH = oh;
  return out;
}

/* LayerNorm of x viewed as [outer, D, inner] over D (inner = H*W for channels). */
static void ref_ln(double *x, int outer, int D, int inner, const double *gw, const double *gb,
                   double eps) {
  for (int a = 0; a < outer; a++)
    for (int p = 0; p < inner; p++) {
      double mean = 0, var = 0;
      for (int d = 0; d < D; d++) mean += x[(a * D + d) * inner + p];
      mean /= D;
      for (int d = 0; d < D; d++) {
        double t = x[(a * D + d) * inner + p] - mean;
        var += t * t;
      }
      var /= D;
      for (int d = 0; d < D; d++) {
        double *e = &x[(a * D + d) * inner + p];
        *e = (*e - mean) / sqrt(var + eps) * gw[d] + gb[d];
      }
    }
}

static void ref_gelu(double *x, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] = 0.5 * x[i] * (1 + erf(x[i] / sqrt(2.0)));
}

/* out[rows, O] = x[rows, I] W^T + b */
static double *ref_linear(const double *x, int rows, int I, const double *w, const double *b,
                          int O) {
  double *out = malloc(sizeof(double) * (size_t)rows * O);
  for (int r = 0; r < rows; r++)
    for (int o = 0; o < O; o++) {
      double s = b[o];
      for (int i = 0; i < I; i++) s += x[r * I + i] * w[o * I + i];
      out[r * O + o] = s;
    }
  return out;
}

static double *ref_cblock(const ref_ctx *r, double *x, int N, int C, int H, const double *keep,
                          const char *name) {
  size_t sz = (size_t)N * C * H * H;
  int oh;
  double *h = malloc(sizeof(double) * sz);
  memcpy(h, x, sizeof(double) * sz);
  ref_ln(h, N, C, H * H, ref_param(r, "%s.norm1.weight", name), ref_param(r, "%s.norm1.bias", name),
         1e-5);
  double *a = ref_conv(h, N, C, H, H, ref_param(r, "%s.conv1.weight", name),
                       ref_param(r, "%s.conv1.bias", name), C, 1, 1, 0, 1, &oh);
  for (size_t i = 0; i < sz; i++) a[i] *= keep[(i / ((size_t)C * H * H)) * H * H + i % (H * H)];
  double *d = ref_conv(a, N, C, H, H, ref_param(r, "%s.attn.weight", name),
                       ref_param(r, "%s.attn.bias", name), C, 5, 1, 2, C, &oh);
  double *e = ref_conv(d, N, C, H, H, ref_param(r, "%s.conv2.weight", name),
                       ref_param(r, "%s.conv2.bias", name), C, 1, 1, 0, 1, &oh);
  for (size_t i = 0; i < sz; i++) x[i] += e[i];
  memcpy(h, x, sizeof(double) * sz);
  ref_ln(h, N, C, H * H, ref_param(r, "%s.norm2.weight", name), ref_param(r, "%s.norm2.bias", name),
         1e-5);
  double *f = ref_conv(h, N, C, H, H, ref_param(r, "%s.mlp.fc1.weight", name),
                       ref_param(r, "%s.mlp.fc1.bias", name), 4 * C, 1, 1, 0, 1, &oh);
  ref_gelu(f, sz * 4);
  double *o = ref_conv(f, N, 4 * C, H, H, ref_param(r, "%s.mlp.fc2.weight", name),
                       ref_param(r, "%s.mlp.fc2.bias", name), C, 1, 1, 0, 1, &oh);
  for (size_t i = 0; i < sz; i++) x[i] += o[i];
  free(h);
  free(a);
  free(d);
  free(e);
  free(f);
  free(o);
  return x;
}

/* x [T, D] of one sample, in place: pre-norm block with `heads` heads. */
static void ref_transformer_block(const ref_ctx *r, double *x, int T, int D, int heads,
                                  const char *name) {
  int dh = D / heads;
  double *h = malloc(sizeof(double) * (size_t)T * D);
  memcpy(h, x, sizeof(double) * (size_t)T * D);
  ref_ln(h, T, D, 1, ref_param(r, "%s.norm1.weight", name), ref_param(r, "%s.norm1.bias", name),
         1e-6);
  double *qkv = ref_linear(h, T, D, ref_param(r, "%s.attn.qkv.weight", name),
                           ref_param(r, "%s.attn.qkv.bias", name), 3 * D);
  double *att = calloc((size_t)T * D, sizeof(double));
  for (int hd = 0; hd < heads; hd++)
    for (int i = 0; i < T; i++) {
      double s[64], mx = -1e300, tot = 0;
      for (int j = 0; j < T; j++) {
        double dot = 0;
        for (int c = 0; c < dh; c++)
          dot += qkv[i * 3 * D + hd * dh + c] * qkv[j * 3 * D + D + hd * dh + c];
        s[j] = dot / sqrt((double)dh);
        if (s[j] > mx) mx = s[j];
      }
      for (int j = 0; j < T; j++) tot += s[j] = exp(s[j] - mx);
      for (int j = 0; j < T; j++)
        for (int c = 0; c < dh; c++)
          att[i * D + hd * dh + c] += s[j] / tot * qkv[j * 3 * D + 2 * D + hd * dh + c];
    }
  double *p = ref_linear(att, T, D, ref_param(r, "%s.attn.proj.weight", name),
                         ref_param(r, "%s.attn.proj.bias", name), D);
  for (int i = 0; i < T * D; i++) x[i] += p[i];
  memcpy(h, x, sizeof(double) * (size_t)T * D);
  ref_ln(h, T, D, 1, ref_param(r, "%s.norm2.weight", name), ref_param(r, "%s.norm2.bias", name),
         1e-6);
  double *f = ref_linear(h, T, D, ref_param(r, "%s.mlp.fc1.weight", name),
                         ref_param(r, "%s.mlp.fc1.bias", name), 4 * D);
  ref_gelu(f, (size_t)T * 4 * D);
  double *o = ref_linear(f, T, 4 * D, ref_param(r, "%s.mlp.fc2.weight", name),
                         ref_param(r, "%s.mlp.fc2.bias", name), D);
  for (int i = 0; i < T * D; i++) x[i] += o[i];
  free(h);
  free(qkv);
  free(att);
  free(p);
  free(f);
  free(o);
}

/* The ConvMAE forward_encoder with fusion, as a loop nest, for config c
 * (depths 1, 1, 1); returns [N, T, D]. */
static double *ref_encoder(const ref_ctx *r, const cm_model_config *c, const double *img, int N,
                           const int32_t *ids, int T, const float *mask) {
  const int *P = c->encoder.stage_patches, *Cw = c->encoder.stage_widths;
  int image = c->data.image_size, grid = image / (P[0] * P[1] * P[2]), L = grid * grid;
  int D = c->encoder.width, H1, H2, H3, oh;
  /* keep maps by block replication */
  double *keep1, *keep2;
  int side1 = image / P[0], side2 = side1 / P[1];
  keep1 = malloc(sizeof(double) * (size_t)N * side1 * side1);
  keep2 = malloc(sizeof(double) * (size_t)N * side2 * side2);
  for (int n = 0; n < N; n++) {
    for (int y = 0; y < side1; y++)
      for (int x = 0; x < side1; x++)
        keep1[(n * side1 + y) * side1 + x] =
            1 - mask[n * L + (y / (P[1] * P[2])) * grid + x / (P[1] * P[2])];
    for (int y = 0; y < side2; y++)
      for (int x = 0; x < side2; x++)
        keep2[(n * side2 + y) * side2 + x] = 1 - mask[n * L + (y / P[2]) * grid + x / P[2]];
  }
  double *x1 =
      ref_conv(img, N, 3, image, image, ref_param(r, "backbone.patch_embed1.proj.weight"),
               ref_param(r, "backbone.patch_embed1.proj.bias"), Cw[0], P[0], P[0], 0, 1, &H1);
  ref_ln(x1, N, Cw[0], H1 * H1, ref_param(r, "backbone.patch_embed1.norm.weight"),
         ref_param(r, "backbone.patch_embed1.norm.bias"), 1e-5);
  ref_gelu(x1, (size_t)N * Cw[0] * H1 * H1);
  ref_cblock(r, x1, N, Cw[0], H1, keep1, "backbone.blocks1.0");
  double *x2 =
      ref_conv(x1, N, Cw[0], H1, H1, ref_param(r, "backbone.patch_embed2.proj.weight"),
               ref_param(r, "backbone.patch_embed2.proj.bias"), Cw[1], P[1], P[1], 0, 1, &H2);
  ref_ln(x2, N, Cw[1], H2 * H2, ref_param(r, "backbone.patch_embed2.norm.weight"),
         ref_param(r, "backbone.patch_embed2.norm.bias"), 1e-5);
  ref_gelu(x2, (size_t)N * Cw[1] * H2 * H2);
  ref_cblock(r, x2, N, Cw[1], H2, keep2, "backbone.blocks2.0");
  double *x3 = ref_conv(x2, N, Cw[1], H2, H2, ref_param(r, "backbone.patch_embed3.proj.weight"),
                        ref_param(r, "backbone.patch_embed3.proj.bias"), D, P[2], P[2], 0, 1, &H3);
  ref_ln(x3, N, D, L, ref_param(r, "backbone.patch_embed3.norm.weight"),
         ref_param(r, "backbone.patch_embed3.norm.bias"), 1e-5);
  ref_gelu(x3, (size_t)N * D * L);
  double *s1 = ref_conv(x1, N, Cw[0], H1, H1, ref_param(r, "backbone.stage1_output_decode.weight"),
                        ref_param(r, "backbone.stage1_output_decode.bias"), D, P[1] * P[2],
                        P[1] * P[2], 0, 1, &oh);
  double *s2 =
      ref_conv(x2, N, Cw[1], H2, H2, ref_param(r, "backbone.stage2_output_decode.weight"),
               ref_param(r, "backbone.stage2_output_decode.bias"), D, P[2], P[2], 0, 1, &oh);
  double *tok = malloc(sizeof(double) * (size_t)L * D);
  double *out = malloc(sizeof(double) * (size_t)N * T * D);
  const double *pos = ref_param(r, "backbone.pos_embed");
  for (int n = 0; n < N; n++) {
    for (int t = 0; t < L; t++) /* flatten(2).transpose(1, 2) */
      for (int d = 0; d < D; d++) tok[t * D + d] = x3[(n * D + d) * L + t];
    double *e = ref_linear(tok, L, D, ref_param(r, "backbone.patch_embed4.weight"),
                           ref_param(r, "backbone.patch_embed4.bias"), D);
    double *vis = out + (size_t)n * T * D;
    for (int k = 0; k < T; k++)
      for (int d = 0; d < D; d++) {
        int t = ids[n * T + k];
        vis[k * D + d] = e[t * D + d] + pos[t * D + d];
      }
    free(e);
    ref_transformer_block(r, vis, T, D, c->encoder.heads, "backbone.blocks3.0");
    for (int k = 0; k < T; k++)
      for (int d = 0; d < D; d++) {
        int t = ids[n * T + k];
        vis[k * D + d] += s1[(n * D + d) * L + t];
        vis[k * D + d] += s2[(n * D + d) * L + t];
      }
    ref_ln(vis, T, D, 1, ref_param(r, "backbone.norm.weight"), ref_param(r, "backbone.norm.bias"),
           1e-6);
  }
  free(keep1);
  free(keep2);
  free(x1);
  free(x2);
  free(x3);
  free(s1);
  free(s2);
  free(tok);
  return out;
}

static void check_against_reference(int image, int p0, int p1, int p2, int n_keep,
                                    const int *keep_lists) {
  cm_model_config c;
  tiny_config(&c, image, p0, p1, p2);
  int grid = image / (p0 * p1 * p2), batch = 2;
  cm_tensor ids, mask;
  make_mask(batch, grid * grid, n_keep, keep_lists, &ids, &mask);
  cm_tensor img = random_image(CM_F64, batch, 3, image);
  built b = build(&c, batch, n_keep, true, true, CM_F64);
  if (is_verified(&b)) {
    values v = make_values(b.g, &img, &ids, &mask);
    cm_tensor y = run(&b, &v);
    ref_ctx r = {b.g, &v};
    double *want = ref_encoder(&r, &c, img.data, batch, ids.data, n_keep, mask.data);
    double worst = 0, largest = 0;
    for (int64_t i = 0; y.data && i < (int64_t)batch * n_keep * 8; i++) {
      double got = ((double *)y.data)[i];
      if (fabs(got - want[i]) > worst) worst = fabs(got - want[i]);
      if (fabs(want[i]) > largest) largest = fabs(want[i]);
    }
    CHECK(y.data != NULL);
    CHECK_MSG(worst < 1e-12, "image %d patches [%d,%d,%d]: max |graph - reference| = %.3g", image,
              p0, p1, p2, worst);
    CHECK(largest > 0.1); /* LN output: a non-trivial comparison */
    free(want);
    cm_tensor_free(&y);
    free_values(&v);
  }
  cm_graph_free(b.g);
  cm_tensor_free(&img);
  cm_tensor_free(&ids);
  cm_tensor_free(&mask);
}

static void test_matches_reference(void) {
  const int keep_a[4] = {2, 0, 3, 2};
  check_against_reference(16, 2, 2, 2, 2, keep_a);
  const int keep_b[6] = {4, 0, 8, 7, 1, 3}; /* 3 x 3 grid, 3 visible */
  check_against_reference(12, 1, 2, 2, 3, keep_b);
}

/* ---- gradients --------------------------------------------------------- */

static void test_gradients(void) {
  cm_model_config c;
  tiny_config(&c, 8, 1, 2, 2); /* stage 1 at 8 x 8, a 2 x 2 grid */
  const int keep_lists[4] = {3, 0, 1, 2};
  cm_tensor ids, mask;
  make_mask(2, 4, 2, keep_lists, &ids, &mask);
  cm_tensor img = random_image(CM_F64, 2, 3, 8);
  built b = build(&c, 2, 2, true, true, CM_F64);
  if (is_verified(&b)) {
    cm_graph *g = b.g;
    cm_type t = g->nodes[b.out].type;
    int64_t n = cm_type_numel(&t);
    double *r = malloc(sizeof(double) * (size_t)n);
    for (int64_t i = 0; i < n; i++) r[i] = uniform_pm1();
    int rc = cm_const_data(g, "r", t.dtype, t.rank, t.dims, r);
    free(r);
    int prod = cm_binary(g, CM_OP_MUL, b.out, rc, NULL);
    int loss = cm_reduce(g, CM_OP_REDUCE_SUM, prod, 3, (int[]){0, 1, 2}, false, "loss");
    static const char *const names[] = {
        "backbone.blocks1.0.conv1.weight",    "backbone.blocks1.0.attn.weight",
        "backbone.blocks2.0.mlp.fc1.bias",    "backbone.patch_embed1.norm.weight",
        "backbone.patch_embed4.weight",       "backbone.blocks3.0.attn.qkv.weight",
        "backbone.blocks3.0.norm2.bias",      "backbone.stage1_output_decode.weight",
        "backbone.stage2_output_decode.bias", "backbone.norm.weight",
    };
    enum { n_wrt = sizeof names / sizeof names[0] };
    int wrt[n_wrt];
    for (int i = 0; i < n_wrt; i++) {
      wrt[i] = cm_graph_find(g, names[i]);
      CHECK_MSG(wrt[i] >= 0, "no param %s", names[i]);
    }
    CHECK(cm_graph_error(g) == NULL);
    values v = make_values(g, &img, &ids, &mask);
    cm_gradcheck_result res[n_wrt];
    cm_err err;
    cm_status st = cm_gradcheck(g, loss, n_wrt, wrt, v.sources, 1e-6, res, &err);
    CHECK_MSG(st == CM_OK, "%s", err.msg);
    for (int i = 0; i < n_wrt && st == CM_OK; i++) {
      CHECK_MSG(res[i].max_rel_error < 1e-6, "%s: max relative error %.3g", names[i],
                res[i].max_rel_error);
      CHECK_MSG(res[i].max_abs_gradient > 1e-9, "%s: zero gradient", names[i]);
    }
    free_values(&v);
  }
  cm_graph_free(b.g);
  cm_tensor_free(&img);
  cm_tensor_free(&ids);
  cm_tensor_free(&mask);
}

/* ---- ConvViT-B size -------------------------------------------------------- */

static int64_t cblock_params(int64_t C) {
  return 2 * C + (C * C + C) + (25 * C + C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) +
         (4 * C * C + C);
}
static int64_t transformer_params(int64_t D) {
  return 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (4 * D * D + 4 * D) + (4 * D * D + D);
}

static void test_convvit_base_parameter_count(void) {
  cm_model_config c;
  tiny_config(&c, 224, 4, 2, 2);
  c.encoder.width = 768;
  c.encoder.heads = 12;
  int widths[3] = {256, 384, 768}, depths[3] = {2, 2, 11};
  for (int s = 0; s < 3; s++) {
    c.encoder.stage_widths[s] = widths[s];
    c.encoder.stage_depths[s] = depths[s];
  }
  built b = build(&c, 1, 49, true, true, CM_F32);
  if (is_verified(&b)) {
    int64_t want[3] = {1, 49, 768};
    CHECK(has_shape(b.g, b.out, 3, want));
    int64_t count = 0;
    int n_params = 0;
    for (int i = 0; i < b.g->n_nodes; i++)
      if (b.g->nodes[i].op == CM_OP_PARAM) {
        CHECK(strncmp(b.g->nodes[i].name, "backbone.", 9) == 0);
        count += cm_type_numel(&b.g->nodes[i].type);
        n_params++;
      }
    int64_t C1 = 256, C2 = 384, D = 768, formula = 0;
    formula += C1 * 3 * 4 * 4 + C1 + 2 * C1;  /* patch_embed1 */
    formula += C2 * C1 * 2 * 2 + C2 + 2 * C2; /* patch_embed2 */
    formula += D * C2 * 2 * 2 + D + 2 * D;    /* patch_embed3 */
    formula += D * D + D;                     /* patch_embed4 */
    formula += 2 * cblock_params(C1) + 2 * cblock_params(C2) + 11 * transformer_params(D);
    formula += D * C1 * 4 * 4 + D; /* stage1_output_decode */
    formula += D * C2 * 2 * 2 + D; /* stage2_output_decode */
    formula += 196 * D + 2 * D;    /* pos_embed, norm */
    CHECK_MSG(count == formula, "graph %lld, formula %lld", (long long)count, (long long)formula);
    /* modules (weight + bias each): patch embeds, CBlocks, transformer blocks, decodes, norm */
    int modules = 3 * 2 + 1 + 2 * 7 + 2 * 7 + 11 * 6 + 2 + 1;
    CHECK_MSG(n_params == 2 * modules + 1, "%d param tensors", n_params);
    fprintf(stderr, "ConvViT-B online encoder: %lld parameters in %d tensors\n", (long long)count,
            n_params);
    param_with_shape(b.g, "backbone.blocks3.10.mlp.fc2.weight", 2, (int64_t[]){768, 3072});
    CHECK(cm_graph_find(b.g, "backbone.blocks3.11.norm1.weight") < 0);
    param_with_shape(b.g, "backbone.blocks2.1.attn.weight", 4, (int64_t[]){384, 1, 5, 5});
    param_with_shape(b.g, "backbone.stage1_output_decode.weight", 4, (int64_t[]){768, 256, 4, 4});
    param_with_shape(b.g, "backbone.pos_embed", 3, (int64_t[]){1, 196, 768});
  }
  cm_graph_free(b.g);
}

TEST_MAIN(TEST(test_shapes_and_names), TEST(test_rejects_bad_operands),
          TEST(test_masked_pixels_never_reach_visible_tokens), TEST(test_zero_mask_equals_no_mask),
          TEST(test_matches_reference), TEST(test_gradients),
          TEST(test_convvit_base_parameter_count))
