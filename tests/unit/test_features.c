/* tests/unit/test_features.c — the frozen encoder as a feature extractor:
 * shapes, determinism, agreement with an independent cm_eval of the same
 * graph, params from a tensor set (missing ones named), the pixel baseline
 * equal to the eval views, kNN/probe accuracies on a tiny image folder,
 * reconstructions and the encoder export's names and values. */
#include "../../models/models.h"
#include "../../runtime/training.h"
#include "../test.h"
#include "../testlib.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

static test_rng rng_state = {12345};
static double next_unit(void) {
  return test_uniform(&rng_state);
}

/* A tiny ViT: 12x12 gray images, 4x4 patches (3x3 grid), width 12, 3 heads. */
static void tiny_config(cm_model_config *c, const char *arch) {
  cm_model_config_default(c);
  const char *sets[] = {"data.image_size=12",      "data.in_chans=1",
                        "data.master_size=14",     "data.shift=2",
                        "data.mean=[100,100,100]", "data.std=[60,60,60]",
                        "mask.kind=random",        "mask.ratio=0.5",
                        "encoder.patch=4",         "encoder.width=12",
                        "encoder.depth=2",         "encoder.heads=3",
                        "pixel_decoder.width=8",   "pixel_decoder.depth=1",
                        "pixel_decoder.heads=2",   "feature_decoder.width=8",
                        "feature_decoder.depth=1", "feature_decoder.heads=2",
                        "projector.hidden=16",     "projector.out=8",
                        "predictor.hidden=16",     "predictor.out=8"};
  cm_err err = {0};
  for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
    CHECK_MSG(cm_model_config_set(c, sets[i], &err) == CM_OK, "%s", err.msg);
  if (strcmp(arch, "convvit") == 0) {
    const char *cs[] = {"arch=convvit", "encoder.stage_widths=[8,10,12]",
                        "encoder.stage_depths=[1,1,1]", "encoder.stage_patches=[1,2,2]",
                        "encoder.depth=1"};
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
      CHECK_MSG(cm_model_config_set(c, cs[i], &err) == CM_OK, "%s", err.msg);
  }
  CHECK_MSG(cm_model_config_validate(c, &err) == CM_OK, "%s", err.msg);
}

static float *random_views(int n, int per) {
  float *v = malloc(sizeof(float) * (size_t)n * (size_t)per);
  for (int i = 0; i < n * per; i++) v[i] = (float)(2 * next_unit() - 1);
  return v;
}

/* The encoder's params as a named set (what a checkpoint holds). */
static void params_set(const cm_encoder *e, cm_tensor_set *s) {
  cm_tensor_set_init(s);
  const cm_graph *g = cm_encoder_graph(e);
  const cm_tensor *const *p = cm_encoder_params(e);
  cm_err err = {0};
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_PARAM)
      CHECK(cm_tensor_set_add(s, g->nodes[i].name, p[i], &err) == 0);
}

static double max_abs_diff(const float *a, const float *b, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
  return m;
}

static void test_config_json(void) {
  cm_model_config c, back;
  tiny_config(&c, "vit");
  char *j = cm_model_config_to_json(&c);
  cm_err err = {0};
  CHECK_MSG(cm_model_config_from_json_text(j, &back, &err) == CM_OK, "%s", err.msg);
  char *j2 = cm_model_config_to_json(&back);
  CHECK(j && j2 && strcmp(j, j2) == 0);
  free(j);
  free(j2);
  CHECK(cm_model_config_from_json_text("[1]", &back, &err) == CM_EINVALID);
  CHECK(cm_model_config_from_json_text("{\"encoder\": {\"heads\": 5}}", &back, &err) ==
        CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "encoder.heads") != NULL, "%s", err.msg);
}

static void test_encoder_features(void) {
  cm_model_config c;
  tiny_config(&c, "vit");
  cm_err err = {0};
  int n = 5, per = 144;
  float *views = random_views(n, per);
  for (int pool = 0; pool < 2; pool++) {
    cm_encoder_opts eo = {.batch = 3, .pool = (cm_pool)pool, .reference = true, .seed = 0};
    cm_encoder *e = NULL;
    CHECK_MSG(cm_encoder_create(&c, NULL, &eo, &e, &err) == CM_OK, "%s", err.msg);
    if (!e) continue;
    CHECK(cm_encoder_dim(e) == 12);
    float *f1 = NULL, *f2 = NULL, one[12];
    CHECK(cm_encoder_features(e, views, n, &f1, &err) == CM_OK);
    CHECK(cm_encoder_features(e, views, n, &f2, &err) == CM_OK);
    CHECK(f1 && f2 && memcmp(f1, f2, sizeof(float) * (size_t)n * 12) == 0); /* deterministic */
    /* A sample's features do not depend on its batch-mates (or the padding). */
    CHECK(cm_encoder_run(e, views + 4 * per, 1, one, &err) == CM_OK);
    CHECK(max_abs_diff(one, f1 + 4 * 12, 12) == 0);
    CHECK(cm_encoder_run(e, views, 4, one, &err) == CM_EINVALID);

    /* An independent cm_eval of the same graph on the first batch. */
    const cm_graph *g = cm_encoder_graph(e);
    const cm_tensor *const *p = cm_encoder_params(e);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    cm_tensor *vals = calloc((size_t)g->n_nodes, sizeof *vals), img = {0};
    int in = cm_graph_find(g, "img"), out = g->outputs[0];
    CHECK(in >= 0 && g->n_outputs == 1 && strcmp(g->nodes[out].name, "features") == 0);
    CHECK(cm_tensor_alloc(&img, g->nodes[in].type, &err) == CM_OK);
    memcpy(img.data, views, sizeof(float) * 3 * (size_t)per);
    for (int i = 0; i < g->n_nodes; i++) src[i] = p[i];
    src[in] = &img;
    CHECK(cm_eval(g, src, vals, NULL, &err) == CM_OK);
    CHECK(vals[out].type.rank == 2 && vals[out].type.dims[0] == 3 && vals[out].type.dims[1] == 12);
    CHECK(max_abs_diff(vals[out].data, f1, 36) == 0);
    /* Features are not constant across images. */
    CHECK(max_abs_diff(f1, f1 + 12, 12) > 1e-4);
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&vals[i]);
    cm_tensor_free(&img);
    free(vals);
    free(src);

    /* The same params from a named set give the same features; another
     * checkpoint (perturbed) gives others; a missing param is named. */
    cm_tensor_set s;
    params_set(e, &s);
    cm_encoder *e2 = NULL;
    float *f3 = NULL;
    CHECK_MSG(cm_encoder_create(&c, &s, &eo, &e2, &err) == CM_OK, "%s", err.msg);
    CHECK(e2 && cm_encoder_features(e2, views, n, &f3, &err) == CM_OK);
    CHECK(f3 && max_abs_diff(f1, f3, (int64_t)n * 12) == 0);
    cm_encoder_free(e2);
    free(f3);
    f3 = NULL;
    for (int i = 0; i < s.n; i++) {
      float *d = s.tensors[i].data;
      for (int64_t k = 0; k < cm_type_numel(&s.tensors[i].type); k++)
        d[k] += (float)(0.05 * (2 * next_unit() - 1));
    }
    CHECK(cm_encoder_create(&c, &s, &eo, &e2, &err) == CM_OK);
    CHECK(e2 && cm_encoder_features(e2, views, n, &f3, &err) == CM_OK);
    CHECK(f3 && max_abs_diff(f1, f3, (int64_t)n * 12) > 1e-3);
    cm_encoder_free(e2);
    free(f3);
    cm_tensor_set_free(&s);
    cm_tensor_set_init(&s);
    params_set(e, &s);
    cm_tensor_set rest;
    cm_tensor_set_init(&rest);
    for (int i = 0; i < s.n; i++)
      if (strcmp(s.names[i], "backbone.layers.1.attn.qkv.weight") != 0)
        CHECK(cm_tensor_set_add(&rest, s.names[i], &s.tensors[i], &err) == CM_OK);
    CHECK(rest.n == s.n - 1);
    CHECK(cm_encoder_create(&c, &rest, &eo, &e2, &err) == CM_EINVALID && !e2);
    CHECK_MSG(strstr(err.msg, "backbone.layers.1.attn.qkv.weight") != NULL, "%s", err.msg);
    cm_tensor_set_free(&rest);
    cm_tensor_set_free(&s);
    cm_encoder_free(e);
    free(f1);
    free(f2);
  }
  free(views);

  /* cls pooling needs a cls token. */
  cm_model_config cv;
  tiny_config(&cv, "convvit");
  cm_encoder_opts eo = {.batch = 2, .pool = CM_POOL_CLS, .reference = true};
  cm_encoder *e = NULL;
  CHECK(cm_encoder_create(&cv, NULL, &eo, &e, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "cls") != NULL, "%s", err.msg);
  eo.pool = CM_POOL_MEAN;
  CHECK_MSG(cm_encoder_create(&cv, NULL, &eo, &e, &err) == CM_OK, "%s", err.msg);
  CHECK(e && cm_encoder_dim(e) == 12);
  cm_encoder_free(e);
}

static void remove_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *en;
  char p[1024];
  while ((en = readdir(d))) {
    if (en->d_name[0] == '.') continue;
    snprintf(p, sizeof p, "%s/%s", dir, en->d_name);
    struct stat sb;
    if (stat(p, &sb) == 0 && S_ISDIR(sb.st_mode))
      remove_tree(p);
    else
      unlink(p);
  }
  closedir(d);
  rmdir(dir);
}

/* A two-class folder: bright blobs top-left (class a) or bottom-right (b),
 * 10x14 images so the eval view resizes. */
static void write_split(const char *dir, int per_class) {
  mkdir(dir, 0777);
  cm_err err = {0};
  for (int k = 0; k < 2; k++) {
    char cd[1024];
    snprintf(cd, sizeof cd, "%s/%c", dir, 'a' + k);
    mkdir(cd, 0777);
    for (int i = 0; i < per_class; i++) {
      cm_image im = {0};
      CHECK(cm_image_alloc(&im, 14, 10, 1, 0, &err) == CM_OK);
      for (int y = 0; y < 10; y++)
        for (int x = 0; x < 14; x++) {
          bool on = k == 0 ? (y < 5 && x < 7) : (y >= 5 && x >= 7);
          im.data[y * 14 + x] = (uint8_t)((on ? 180 : 30) + 60 * next_unit());
        }
      char p[1100];
      snprintf(p, sizeof p, "%s/%03d.png", cd, i);
      CHECK(cm_png_write(p, &im, &err) == CM_OK);
      cm_image_free(&im);
    }
  }
}

static void test_views_and_scores(void) {
  char root[] = "/tmp/test_features_XXXXXX";
  if (!mkdtemp(root)) {
    CHECK(false);
    return;
  }
  char tr[1100], te[1100];
  snprintf(tr, sizeof tr, "%s/train", root);
  snprintf(te, sizeof te, "%s/test", root);
  write_split(tr, 13);
  write_split(te, 7);
  cm_model_config c;
  tiny_config(&c, "vit");
  cm_err err = {0};
  cm_dataset *dtr = NULL, *dte = NULL;
  CHECK_MSG(cm_dataset_open_folder(tr, 1, &dtr, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_dataset_open_folder(te, 1, &dte, &err) == CM_OK, "%s", err.msg);
  if (!dtr || !dte) goto out;
  float *trv = NULL, *tev = NULL;
  int32_t *trl = NULL, *tel = NULL;
  int64_t ntr = 0, nte = 0;
  CHECK(cm_eval_views(dtr, &c, 0, &trv, &trl, &ntr, &err) == CM_OK && ntr == 26);
  CHECK(cm_eval_views(dte, &c, 11, &tev, &tel, &nte, &err) == CM_OK && nte == 11);
  /* The pixel baseline is the eval view itself. */
  cm_views_opts o;
  cm_views_opts_from_config(&c, &o);
  o.mode = CM_VIEWS_EVAL;
  o.mask = false;
  float view[144];
  for (int64_t i = 0; i < ntr; i += 5) {
    cm_image im = {0};
    CHECK(cm_dataset_get(dtr, i, &im, &err) == CM_OK);
    cm_views_out vo;
    memset(&vo, 0, sizeof vo);
    vo.img = view;
    CHECK(cm_views_sample(&o, &im, 0, 0, i, &vo, &err) == CM_OK);
    CHECK(max_abs_diff(view, trv + i * 144, 144) == 0);
    CHECK(trl[i] == cm_dataset_label(dtr, i));
    cm_image_free(&im);
  }
  CHECK(trl[0] == 0 && trl[25] == 1);
  double knn = -1, probe = -1, train_top1;
  CHECK(cm_knn_classify(trv, trl, ntr, tev, tel, nte, 144, 2, 20, 0.07, NULL, &knn, &err) == 0);
  CHECK(knn == 1.0); /* the classes are separable in pixels */
  cm_encoder_opts eo = {.batch = 4, .reference = true};
  cm_encoder *e = NULL;
  float *ftr = NULL, *fte = NULL;
  CHECK(cm_encoder_create(&c, NULL, &eo, &e, &err) == CM_OK);
  CHECK(e && cm_encoder_features(e, trv, ntr, &ftr, &err) == CM_OK);
  CHECK(e && cm_encoder_features(e, tev, nte, &fte, &err) == CM_OK);
  cm_probe_opts po;
  cm_probe_opts_default(&po);
  if (ftr && fte) {
    CHECK(cm_knn_classify(ftr, trl, ntr, fte, tel, nte, 12, 2, 20, 0.07, NULL, &knn, &err) == 0);
    CHECK(cm_linear_probe(ftr, trl, ntr, fte, tel, nte, 12, 2, &po, &train_top1, &probe, &err) ==
          0);
    CHECK(knn >= 0 && knn <= 1 && probe >= 0 && probe <= 1);
  }
  cm_encoder_free(e);
  free(ftr);
  free(fte);
  /* A dataset of the wrong channel count is refused. */
  cm_model_config c3 = c;
  c3.data.in_chans = 3;
  float *v3 = NULL;
  int32_t *l3 = NULL;
  int64_t n3 = 0;
  CHECK(cm_eval_views(dtr, &c3, 4, &v3, &l3, &n3, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "in_chans") != NULL, "%s", err.msg);
  free(trv);
  free(tev);
  free(trl);
  free(tel);
out:
  cm_dataset_free(dtr);
  cm_dataset_free(dte);
  remove_tree(root);
}

static void test_reconstruct(void) {
  cm_model_config c;
  tiny_config(&c, "vit");
  cm_err err = {0};
  cm_model m;
  cm_model_build_opts bo = {.batch = 2, .ranks = 1, .dtype = CM_F32};
  CHECK_MSG(cm_model_build(&c, &bo, &m, &err) == CM_OK, "%s", err.msg);
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  for (int i = 0; i < m.g->n_nodes; i++) {
    const cm_node *nd = &m.g->nodes[i];
    if (nd->op != CM_OP_PARAM) continue;
    cm_tensor t = {0};
    CHECK(cm_tensor_alloc(&t, nd->type, &err) == CM_OK);
    CHECK(cm_init_tensor(&t, &nd->attrs.init, 3, nd->name, &err) == CM_OK);
    CHECK(cm_tensor_set_take(&s, nd->name, &t, &err) == CM_OK);
  }
  int n_keep = m.n_keep;
  cm_model_free(&m);
  int n = 3, per = 144;
  float *views = random_views(n, per), *masked = malloc(sizeof(float) * 3 * 144),
        *recon = malloc(sizeof(float) * 3 * 144);
  CHECK_MSG(cm_reconstruct(&c, &s, views, n, 9, masked, recon, &err) == CM_OK, "%s", err.msg);
  int n_masked = 0, finite = 1, differs = 0;
  for (int i = 0; i < n * per; i++) {
    finite &= isfinite(recon[i]);
    if (masked[i] == 0 && views[i] != 0) {
      n_masked++;
      differs += recon[i] != views[i];
    } else {
      CHECK(masked[i] == views[i] && recon[i] == views[i]);
    }
  }
  /* ratio 0.5 of 9 tokens: 5 visible (keep = 9 * (1 - 0.5) rounded), 4 masked x 16 pixels. */
  CHECK_MSG(n_masked == n * (9 - n_keep) * 16, "%s", "masked pixel count");
  CHECK(finite && differs > n_masked / 2);
  /* Another seed masks other patches. */
  float *masked2 = malloc(sizeof(float) * 3 * 144), *recon2 = malloc(sizeof(float) * 3 * 144);
  CHECK(cm_reconstruct(&c, &s, views, n, 10, masked2, recon2, &err) == CM_OK);
  CHECK(memcmp(masked, masked2, sizeof(float) * 3 * 144) != 0);
  /* A single image (BatchNorm in the contrastive branch needs two: padded). */
  CHECK_MSG(cm_reconstruct(&c, &s, views, 1, 9, masked2, recon2, &err) == CM_OK, "%s", err.msg);
  CHECK(memcmp(masked, masked2, sizeof(float) * 144) == 0);
  /* Missing decoder params are named. */
  cm_tensor_set part;
  cm_tensor_set_init(&part);
  for (int i = 0; i < s.n; i++)
    if (strncmp(s.names[i], "pixel_decoder.", 14) != 0)
      CHECK(cm_tensor_set_add(&part, s.names[i], &s.tensors[i], &err) == CM_OK);
  CHECK(cm_reconstruct(&c, &part, views, n, 9, masked2, recon2, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "pixel_decoder.") != NULL, "%s", err.msg);
  cm_tensor_set_free(&part);

  /* Export: the online encoder only, official names, the same values. */
  cm_tensor_set ex;
  CHECK_MSG(cm_encoder_export(&c, &s, &ex, &err) == CM_OK, "%s", err.msg);
  const char *names[] = {"patch_embed.proj.weight",
                         "patch_embed.proj.bias",
                         "cls_token",
                         "pos_embed",
                         "blocks.0.norm1.weight",
                         "blocks.1.attn.qkv.weight",
                         "blocks.1.attn.proj.bias",
                         "blocks.0.norm2.bias",
                         "blocks.1.mlp.fc1.weight",
                         "blocks.0.mlp.fc2.bias",
                         "norm.weight",
                         "norm.bias"};
  const char *from[] = {"backbone.patch_embed.projection.weight",
                        "backbone.patch_embed.projection.bias",
                        "backbone.cls_token",
                        "backbone.pos_embed",
                        "backbone.layers.0.ln1.weight",
                        "backbone.layers.1.attn.qkv.weight",
                        "backbone.layers.1.attn.proj.bias",
                        "backbone.layers.0.ln2.bias",
                        "backbone.layers.1.ffn.layers.0.0.weight",
                        "backbone.layers.0.ffn.layers.1.bias",
                        "backbone.ln1.weight",
                        "backbone.ln1.bias"};
  CHECK(ex.n == 4 + 2 * 12 + 2);
  for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
    const cm_tensor *a = cm_tensor_set_get(&ex, names[k]), *b = cm_tensor_set_get(&s, from[k]);
    CHECK_MSG(a && b, "%s", names[k]);
    if (a && b)
      CHECK_MSG(a->type.dtype == CM_F32 && memcmp(a->data, b->data, cm_type_nbytes(&b->type)) == 0,
                "%s", names[k]);
  }
  for (int i = 0; i < ex.n; i++)
    CHECK_MSG(strstr(ex.names[i], "backbone") == NULL, "%s", ex.names[i]);
  bool has_config = false;
  for (int i = 0; i < ex.n_meta; i++) has_config |= strcmp(ex.meta_keys[i], "config") == 0;
  CHECK(has_config);
  cm_tensor_set_free(&ex);
  cm_model_config cv;
  tiny_config(&cv, "convvit");
  CHECK(cm_encoder_export(&cv, &s, &ex, &err) == CM_EINVALID);
  CHECK_MSG(strstr(err.msg, "ViT") != NULL, "%s", err.msg);
  cm_tensor_set_free(&s);
  free(views);
  free(masked);
  free(recon);
  free(masked2);
  free(recon2);
}

TEST_MAIN({"config_json", test_config_json}, {"encoder_features", test_encoder_features},
          {"views_and_scores", test_views_and_scores}, {"reconstruct", test_reconstruct})
