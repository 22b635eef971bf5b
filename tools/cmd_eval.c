/* tools/cmd_eval.c — cmaec eval, recon, plot, export: frozen-feature
 * evaluation of a checkpoint, reconstruction pictures, training curves and
 * the encoder export (docs/evaluation.md). */
#include "cli.h"

#include "../models/models.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_eval[] =
    "usage: cmaec eval CKPT [--data fashion-mnist|DIR] [--train-limit N] [--test-limit N]\n"
    "                  [--pool mean|cls] [--baselines] [--batch N] [--json]\n"
    "                  [--backend auto|cpu|cuda|ref] [--device N] [--cuda-graphs on|off]\n"
    "       cmaec eval CKPT --features-of IN.safetensors -o OUT.safetensors [--pool ...]\n"
    "\n"
    "Evaluates the frozen online encoder of a checkpoint (a file, or a training OUT\n"
    "directory: its latest) on the test split: kNN top-1 (k 20, cosine, T 0.07) and\n"
    "linear-probe top-1, with features pooled from the whole eval view (mean over the\n"
    "patch tokens by default; cls: the cls token, ViT only). Limits (default 1000\n"
    "train, 1000 test) take the first N images of each split. --baselines adds a\n"
    "randomly initialized encoder of the same variant (seed 0) and raw pixels.\n"
    "--batch: images per graph run (default 16).\n"
    "DIR: a directory with the Fashion-MNIST IDX files, or an image folder with\n"
    "train/ and test/ class subdirectories. --features-of writes the features\n"
    "(\"features\" [n, d]) of the images in IN's \"img\" tensor [n, C, S, S].\n"
    "The features are computed on the chosen backend (ref: the reference evaluator):\n";

static const char usage_recon[] =
    "usage: cmaec recon CKPT -o RECON.png [--n N] [--data fashion-mnist|DIR] [--seed S]\n"
    "                   [--scale K]\n"
    "\n"
    "For the first N (default 8) test images, one row each: the eval view, the masked\n"
    "input (masked patches grey) and the pixel decoder's reconstruction (de-normalized\n"
    "with each patch's own mean/std when loss.norm_pix; visible patches show the\n"
    "original pixels). The mask is drawn from mask.* with seed S (default 0). Each\n"
    "image is drawn K times larger (nearest pixel; default: 4 up to 64 px, else 1).\n";

static const char usage_plot[] =
    "usage: cmaec plot OUT -o CURVES.png\n"
    "\n"
    "Plots OUT/metrics.jsonl (OUT may also be the file): losses (loss, loss_rc,\n"
    "loss_ct; log y when they span more than a factor 20) and the learning rate\n"
    "against the step, one panel above the other.\n";

static const char usage_export[] =
    "usage: cmaec export CKPT --encoder -o ENCODER.safetensors\n"
    "       cmaec export MODEL.json --init-checkpoint -o DIR [--set KEY=VALUE ...] [--seed S]\n"
    "\n"
    "Writes the online encoder's params under the official timm/MAE names\n"
    "(patch_embed.proj.weight, cls_token, pos_embed, blocks.N.norm1.weight,\n"
    "blocks.N.attn.qkv.weight, blocks.N.mlp.fc1.weight, norm.weight, ...) in f32,\n"
    "with the variant and its config in the metadata. ViT variants only.\n"
    "--init-checkpoint writes a checkpoint of freshly initialized params (every\n"
    "param of the variant's forward graph, seed S) into DIR, for tests.\n";

/* ---- shared ---------------------------------------------------------------- */

typedef struct loaded_ckpt {
  char *path;
  cm_tensor_set tensors;
  cm_checkpoint_meta meta;
  cm_model_config cfg;
} loaded_ckpt;

static void loaded_free(loaded_ckpt *c) {
  free(c->path);
  cm_tensor_set_free(&c->tensors);
  cm_checkpoint_meta_free(&c->meta);
}

/* A checkpoint file, or a training directory's latest one, with its config. */
static int load_ckpt(const char *arg, const char *command, loaded_ckpt *c) {
  memset(c, 0, sizeof *c);
  cm_tensor_set_init(&c->tensors);
  cm_err err = {0};
  struct stat sb;
  if (stat(arg, &sb) != 0) {
    fprintf(stderr, "cmaec %s: %s: %s\n", command, arg, strerror(errno));
    return EXIT_INVALID;
  }
  if (S_ISDIR(sb.st_mode)) {
    if (cm_checkpoint_latest(arg, &c->path, &err)) return cli_report(&err, arg);
  } else {
    c->path = strdup(arg);
    if (!c->path) return fprintf(stderr, "cmaec %s: out of memory\n", command), EXIT_INTERNAL;
  }
  if (cm_checkpoint_load(c->path, &c->tensors, &c->meta, &err)) return cli_report(&err, c->path);
  if (!c->meta.config_json) {
    fprintf(stderr, "cmaec %s: %s: the checkpoint has no config in its metadata\n", command,
            c->path);
    return EXIT_INVALID;
  }
  if (cm_model_config_from_json_text(c->meta.config_json, &c->cfg, &err))
    return cli_report(&err, c->path);
  return EXIT_OK;
}

static bool parse_count(const char *s, int64_t lo, int64_t hi, int64_t *out) {
  uint64_t v;
  if (!cli_parse_u64(s, &v) || v < (uint64_t)lo || v > (uint64_t)hi) return false;
  *out = (int64_t)v;
  return true;
}

static bool file_exists(const char *dir, const char *name) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* --data: "fashion-mnist" (the system's copy), a directory with the IDX
 * files, or an image folder with train/ and test/. */
static int open_split(const char *data, bool train, int chans, int64_t max_pixels,
                      cm_dataset **out) {
  cm_err err = {0};
  cm_status st;
  const char *place = data ? data : "fashion-mnist";
  if (!data || strcmp(data, "fashion-mnist") == 0)
    st = cm_dataset_open_fmnist(NULL, train, out, &err);
  else if (file_exists(data, "train-images-idx3-ubyte.gz"))
    st = cm_dataset_open_fmnist(data, train, out, &err);
  else {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", data, train ? "train" : "test");
    st = cm_dataset_open_folder(path, chans, out, &err);
    if (!st) cm_dataset_set_max_pixels(*out, max_pixels);
  }
  return st ? cli_report(&err, place) : EXIT_OK;
}

/* ---- eval ------------------------------------------------------------------ */

typedef struct scores {
  double knn, probe;
} scores;

static int score(const float *tr, const int32_t *trl, int64_t ntr, const float *te,
                 const int32_t *tel, int64_t nte, int d, int classes, scores *s) {
  cm_err err = {0};
  double train_top1;
  cm_probe_opts po;
  cm_probe_opts_default(&po);
  if (cm_knn_classify(tr, trl, ntr, te, tel, nte, d, classes, 20, 0.07, NULL, &s->knn, &err) ||
      cm_linear_probe(tr, trl, ntr, te, tel, nte, d, classes, &po, &train_top1, &s->probe, &err))
    return cli_report(&err, "cmaec eval");
  return EXIT_OK;
}

static int encoder_scores(const loaded_ckpt *c, const cm_tensor_set *params,
                          const cm_encoder_opts *eo, const float *trv, const int32_t *trl,
                          int64_t ntr, const float *tev, const int32_t *tel, int64_t nte,
                          int classes, scores *s, const char **backend) {
  cm_err err = {0};
  cm_encoder *e = NULL;
  float *ftr = NULL, *fte = NULL;
  int rc = EXIT_OK;
  if (cm_encoder_create(&c->cfg, params, eo, &e, &err) ||
      cm_encoder_features(e, trv, ntr, &ftr, &err) || cm_encoder_features(e, tev, nte, &fte, &err))
    rc = cli_report(&err, c->path);
  if (!rc) {
    *backend = cm_encoder_uses_reference(e) ? "ref"
               : eo->backend                ? eo->backend->description
                                            : "cpu";
    const char *why = cm_encoder_fallback_reason(e);
    if (why) fprintf(stderr, "cmaec eval: note: using the reference evaluator: %s\n", why);
    rc = score(ftr, trl, ntr, fte, tel, nte, cm_encoder_dim(e), classes, s);
  }
  free(ftr);
  free(fte);
  cm_encoder_free(e);
  return rc;
}

static int parse_pool(const char *s, cm_pool *pool) {
  if (!s || strcmp(s, "mean") == 0)
    *pool = CM_POOL_MEAN;
  else if (strcmp(s, "cls") == 0)
    *pool = CM_POOL_CLS;
  else
    return fprintf(stderr, "cmaec: --pool %s: expected mean or cls\n", s), EXIT_INVALID;
  return EXIT_OK;
}

/* --features-of IN -o OUT: features of given images (the export reference test). */
static int features_of(const loaded_ckpt *c, cm_encoder_opts *eo, const char *in, const char *out) {
  cm_err err = {0};
  cm_tensor_set is, os;
  cm_tensor_set_init(&is);
  cm_tensor_set_init(&os);
  int rc = EXIT_OK;
  cm_encoder *e = NULL;
  float *f = NULL;
  if (cm_safetensors_load(in, &is, &err)) return cli_report(&err, in);
  const cm_tensor *img = cm_tensor_set_get(&is, "img");
  int S = c->cfg.data.image_size, C = c->cfg.data.in_chans;
  if (!img || img->type.dtype != CM_F32 || img->type.rank != 4 || img->type.dims[1] != C ||
      img->type.dims[2] != S || img->type.dims[3] != S || img->type.dims[0] < 1) {
    fprintf(stderr, "cmaec eval: %s: needs an f32 tensor \"img\" [n, %d, %d, %d]\n", in, C, S, S);
    rc = EXIT_INVALID;
    goto done;
  }
  int64_t n = img->type.dims[0];
  if (eo->batch > n) eo->batch = (int)n;
  if (cm_encoder_create(&c->cfg, &c->tensors, eo, &e, &err) ||
      cm_encoder_features(e, img->data, n, &f, &err)) {
    rc = cli_report(&err, c->path);
    goto done;
  }
  cm_tensor t = {.type = {.dtype = CM_F32, .rank = 2, .dims = {n, cm_encoder_dim(e)}}, .data = f};
  if (cm_tensor_set_take(&os, "features", &t, &err) || cm_safetensors_save(out, &os, &err))
    rc = cli_report(&err, out);
  f = NULL;
done:
  free(f);
  cm_encoder_free(e);
  cm_tensor_set_free(&is);
  cm_tensor_set_free(&os);
  return rc;
}

int cmd_eval(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false},
                       {"--data", true, NULL, false},
                       {"--train-limit", true, NULL, false},
                       {"--test-limit", true, NULL, false},
                       {"--pool", true, NULL, false},
                       {"--baselines", false, NULL, false},
                       {"--backend", true, NULL, false},
                       {"--json", false, NULL, false},
                       {"--batch", true, NULL, false},
                       {"--features-of", true, NULL, false},
                       {"-o", true, NULL, false},
                       {"--device", true, NULL, false},
                       {"--cuda-graphs", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "eval")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_eval, stdout), fputs(cli_backend_usage, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_eval, stderr), EXIT_INVALID;
  int64_t train_limit = 1000, test_limit = 1000, batch = 16;
  if (opts[2].given && !parse_count(opts[2].value, 1, INT64_MAX / 2, &train_limit))
    return fprintf(stderr, "cmaec eval: --train-limit %s: not a positive integer\n", opts[2].value),
           EXIT_INVALID;
  if (opts[3].given && !parse_count(opts[3].value, 1, INT64_MAX / 2, &test_limit))
    return fprintf(stderr, "cmaec eval: --test-limit %s: not a positive integer\n", opts[3].value),
           EXIT_INVALID;
  if (opts[8].given && !parse_count(opts[8].value, 1, 4096, &batch))
    return fprintf(stderr, "cmaec eval: --batch %s: not an integer in [1, 4096]\n", opts[8].value),
           EXIT_INVALID;
  cm_encoder_opts eo = {.batch = (int)batch, .seed = 0};
  if (parse_pool(opts[4].value, &eo.pool)) return EXIT_INVALID;
  if (opts[9].given != opts[10].given)
    return fprintf(stderr, "cmaec eval: --features-of and -o go together\n"), EXIT_INVALID;
  cm_backend_choice choice;
  int rc = cli_backend(&opts[6], &opts[11], &opts[12], true, CM_BACKEND_AUTO, "eval", &choice);
  if (rc) return rc;
  eo.backend = &choice;
  eo.reference = choice.kind == CM_BACKEND_REF;

  loaded_ckpt c;
  rc = load_ckpt(pos[0], "eval", &c);
  if (rc) return loaded_free(&c), rc;
  if (opts[9].given) {
    rc = features_of(&c, &eo, opts[9].value, opts[10].value);
    loaded_free(&c);
    return rc;
  }
  cm_dataset *dtr = NULL, *dte = NULL;
  float *trv = NULL, *tev = NULL;
  int32_t *trl = NULL, *tel = NULL;
  int64_t ntr = 0, nte = 0;
  cm_err err = {0};
  if ((rc = open_split(opts[1].value, true, c.cfg.data.in_chans, c.cfg.data.max_pixels, &dtr)) ||
      (rc = open_split(opts[1].value, false, c.cfg.data.in_chans, c.cfg.data.max_pixels, &dte)))
    goto done;
  if (cm_eval_views(dtr, &c.cfg, train_limit, &trv, &trl, &ntr, &err) ||
      cm_eval_views(dte, &c.cfg, test_limit, &tev, &tel, &nte, &err)) {
    rc = cli_report(&err, opts[1].value ? opts[1].value : "fashion-mnist");
    goto done;
  }
  int classes = cm_dataset_n_classes(dtr);
  if (cm_dataset_n_classes(dte) > classes) classes = cm_dataset_n_classes(dte);
  scores s[3];
  const char *backend = "ref", *backend2 = "ref";
  const char *rows[3] = {"pretrained", "random init", "raw pixels"};
  int n_rows = opts[5].given ? 3 : 1;
  if ((rc = encoder_scores(&c, &c.tensors, &eo, trv, trl, ntr, tev, tel, nte, classes, &s[0],
                           &backend)))
    goto done;
  if (n_rows == 3) {
    if ((rc = encoder_scores(&c, NULL, &eo, trv, trl, ntr, tev, tel, nte, classes, &s[1],
                             &backend2)))
      goto done;
    int S = c.cfg.data.image_size, d = c.cfg.data.in_chans * S * S;
    if ((rc = score(trv, trl, ntr, tev, tel, nte, d, classes, &s[2]))) goto done;
  }
  if (opts[7].given) {
    cJSON *o = cJSON_CreateObject();
    const char *keys[3] = {"pretrained", "random_init", "raw_pixels"};
    cJSON_AddStringToObject(o, "checkpoint", c.path);
    cJSON_AddStringToObject(o, "variant", c.cfg.name);
    cJSON_AddNumberToObject(o, "step", (double)c.meta.step);
    cJSON_AddNumberToObject(o, "n_train", (double)ntr);
    cJSON_AddNumberToObject(o, "n_test", (double)nte);
    cJSON_AddStringToObject(o, "pool", eo.pool == CM_POOL_CLS ? "cls" : "mean");
    cJSON_AddStringToObject(o, "backend", backend);
    for (int r = 0; r < n_rows; r++) {
      cJSON *row = cJSON_AddObjectToObject(o, keys[r]);
      cJSON_AddNumberToObject(row, "knn_top1", s[r].knn);
      cJSON_AddNumberToObject(row, "linear_top1", s[r].probe);
    }
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    if (!text) {
      fprintf(stderr, "cmaec eval: out of memory\n");
      rc = EXIT_INTERNAL;
      goto done;
    }
    printf("%s\n", text);
    free(text);
  } else {
    printf("checkpoint %s (step %lld), %s; %lld train / %lld test images, pool %s, backend %s\n",
           c.path, (long long)c.meta.step, c.cfg.name, (long long)ntr, (long long)nte,
           eo.pool == CM_POOL_CLS ? "cls" : "mean", backend);
    printf("%-12s %8s %8s\n", "features", "kNN", "linear");
    for (int r = 0; r < n_rows; r++)
      printf("%-12s %7.2f%% %7.2f%%\n", rows[r], 100 * s[r].knn, 100 * s[r].probe);
  }
done:
  free(trv);
  free(tev);
  free(trl);
  free(tel);
  cm_dataset_free(dtr);
  cm_dataset_free(dte);
  loaded_free(&c);
  return rc;
}

/* ---- recon ------------------------------------------------------------------ */

/* A normalized view [C, S, S] back to 0..255 pixels. */
/* im is (S * scale)^2: each view pixel becomes a scale x scale square. */
static void to_image(const cm_model_config *cfg, const float *v, int scale, cm_image *im) {
  int C = cfg->data.in_chans, S = cfg->data.image_size, W = S * scale;
  for (int c = 0; c < C; c++)
    for (int y = 0; y < W; y++)
      for (int x = 0; x < W; x++) {
        double p =
            v[((int64_t)c * S + y / scale) * S + x / scale] * cfg->data.std[c] + cfg->data.mean[c];
        p = p < 0 ? 0 : p > 255 ? 255 : p;
        im->data[((int64_t)y * W + x) * C + c] = (uint8_t)lrint(p);
      }
}

int cmd_recon(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}, {"-o", true, NULL, false},
                       {"--n", true, NULL, false},     {"--data", true, NULL, false},
                       {"--seed", true, NULL, false},  {"--scale", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "recon")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_recon, stdout), EXIT_OK;
  if (n_pos != 1 || !opts[1].given) return fputs(usage_recon, stderr), EXIT_INVALID;
  int64_t n = 8;
  uint64_t seed = 0;
  if (opts[2].given && !parse_count(opts[2].value, 1, 256, &n))
    return fprintf(stderr, "cmaec recon: --n %s: not an integer in [1, 256]\n", opts[2].value),
           EXIT_INVALID;
  if (opts[4].given && !cli_parse_u64(opts[4].value, &seed))
    return fprintf(stderr, "cmaec recon: --seed %s: not an unsigned integer\n", opts[4].value),
           EXIT_INVALID;
  int64_t scale = 0;
  if (opts[5].given && !parse_count(opts[5].value, 1, 16, &scale))
    return fprintf(stderr, "cmaec recon: --scale %s: not an integer in [1, 16]\n", opts[5].value),
           EXIT_INVALID;
  loaded_ckpt c;
  int rc = load_ckpt(pos[0], "recon", &c);
  if (rc) return loaded_free(&c), rc;
  if (!scale) scale = c.cfg.data.image_size <= 64 ? 4 : 1;
  cm_dataset *d = NULL;
  float *views = NULL, *masked = NULL, *recon = NULL;
  int32_t *labels = NULL;
  int64_t got = 0;
  cm_image *tiles = NULL, grid = {0};
  cm_err err = {0};
  if ((rc = open_split(opts[3].value, false, c.cfg.data.in_chans, c.cfg.data.max_pixels, &d)))
    goto done;
  if (cm_eval_views(d, &c.cfg, n, &views, &labels, &got, &err)) {
    rc = cli_report(&err, opts[3].value ? opts[3].value : "fashion-mnist");
    goto done;
  }
  int C = c.cfg.data.in_chans, S = c.cfg.data.image_size;
  int64_t per = (int64_t)C * S * S;
  masked = malloc(sizeof(float) * (size_t)(got * per));
  recon = malloc(sizeof(float) * (size_t)(got * per));
  tiles = calloc((size_t)(3 * got), sizeof *tiles);
  if (!masked || !recon || !tiles) {
    fprintf(stderr, "cmaec recon: out of memory\n");
    rc = EXIT_INTERNAL;
    goto done;
  }
  if (cm_reconstruct(&c.cfg, &c.tensors, views, (int)got, seed, masked, recon, &err)) {
    rc = cli_report(&err, c.path);
    goto done;
  }
  for (int64_t i = 0; i < got; i++) {
    const float *src[3] = {views + i * per, masked + i * per, recon + i * per};
    for (int k = 0; k < 3; k++) {
      int W = S * (int)scale;
      if (cm_image_alloc(&tiles[3 * i + k], W, W, C, 0, &err)) {
        rc = cli_report(&err, "cmaec recon");
        goto done;
      }
      to_image(&c.cfg, src[k], (int)scale, &tiles[3 * i + k]);
    }
  }
  if (cm_image_grid(tiles, (int)got, 3, 2, 255, &grid, &err) ||
      cm_png_write(opts[1].value, &grid, &err)) {
    rc = cli_report(&err, opts[1].value);
    goto done;
  }
  printf("wrote %s: %lld rows (view, masked input, reconstruction), %dx%d pixels\n", opts[1].value,
         (long long)got, grid.w, grid.h);
done:
  if (tiles)
    for (int64_t i = 0; i < 3 * got; i++) cm_image_free(&tiles[i]);
  free(tiles);
  cm_image_free(&grid);
  free(views);
  free(masked);
  free(recon);
  free(labels);
  cm_dataset_free(d);
  loaded_free(&c);
  return rc;
}

/* ---- plot ---------------------------------------------------------------------- */

int cmd_plot(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}, {"-o", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "plot")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_plot, stdout), EXIT_OK;
  if (n_pos != 1 || !opts[1].given) return fputs(usage_plot, stderr), EXIT_INVALID;
  char path[4096];
  struct stat sb;
  if (stat(pos[0], &sb) != 0) {
    fprintf(stderr, "cmaec plot: %s: %s\n", pos[0], strerror(errno));
    return EXIT_INVALID;
  }
  snprintf(path, sizeof path, S_ISDIR(sb.st_mode) ? "%s/metrics.jsonl" : "%s", pos[0]);
  cm_metrics_table t = {0};
  cm_err err = {0};
  if (cm_metrics_read(path, &t, &err)) return cli_report(&err, path);
  int rc = EXIT_OK;
  int step = cm_metrics_column(&t, "step");
  if (step < 0 || t.n_rows < 1) {
    fprintf(stderr, "cmaec plot: %s: no rows with a step\n", path);
    cm_metrics_table_free(&t);
    return EXIT_INVALID;
  }
  double *x = malloc(sizeof(double) * (size_t)t.n_rows);
  double *ys = malloc(sizeof(double) * (size_t)t.n_rows * 4);
  cm_image panels[2] = {{0}}, out = {0};
  if (!x || !ys) {
    fprintf(stderr, "cmaec plot: out of memory\n");
    rc = EXIT_INTERNAL;
    goto done;
  }
  for (int64_t r = 0; r < t.n_rows; r++) x[r] = t.values[r * t.n_cols + step];
  static const char *names[4] = {"loss", "loss_rc", "loss_ct", "lr"};
  static const uint8_t colors[4][3] = {
      {31, 119, 180}, {255, 127, 14}, {44, 160, 44}, {214, 39, 40}};
  cm_plot_series loss_s[3], lr_s[1];
  int n_loss = 0, n_lr = 0;
  double lo = INFINITY, hi = -INFINITY;
  for (int k = 0; k < 4; k++) {
    int col = cm_metrics_column(&t, names[k]);
    if (col < 0) continue;
    double *y = ys + (int64_t)k * t.n_rows;
    for (int64_t r = 0; r < t.n_rows; r++) {
      y[r] = t.values[r * t.n_cols + col];
      if (k < 3 && isfinite(y[r]) && y[r] > 0) {
        lo = fmin(lo, y[r]);
        hi = fmax(hi, y[r]);
      }
    }
    cm_plot_series s = {names[k], x, y, t.n_rows, {colors[k][0], colors[k][1], colors[k][2]}};
    if (k < 3)
      loss_s[n_loss++] = s;
    else
      lr_s[n_lr++] = s;
  }
  if (n_loss == 0 && n_lr == 0) {
    fprintf(stderr, "cmaec plot: %s: no loss or lr column\n", path);
    rc = EXIT_INVALID;
    goto done;
  }
  cm_plot_opts po = {.width = 640, .height = 400, .title = "loss", .x_label = "step"};
  po.log_y = isfinite(lo) && hi / lo > 20;
  cm_plot_opts pl = {.width = 640, .height = 400, .title = "learning rate", .x_label = "step"};
  cm_plot_series none = {"(none)", x, ys, 0, {0, 0, 0}};
  if (cm_plot_render(n_loss ? loss_s : &none, n_loss ? n_loss : 1, &po, &panels[0], NULL, &err) ||
      cm_plot_render(n_lr ? lr_s : &none, n_lr ? n_lr : 1, &pl, &panels[1], NULL, &err) ||
      cm_image_grid(panels, 2, 1, 0, 255, &out, &err) || cm_png_write(opts[1].value, &out, &err)) {
    rc = cli_report(&err, opts[1].value);
    goto done;
  }
  printf("wrote %s: %lld steps, %dx%d pixels%s\n", opts[1].value, (long long)t.n_rows, out.w, out.h,
         po.log_y ? ", log-scale loss" : "");
done:
  free(x);
  free(ys);
  cm_image_free(&panels[0]);
  cm_image_free(&panels[1]);
  cm_image_free(&out);
  cm_metrics_table_free(&t);
  return rc;
}

/* ---- export --------------------------------------------------------------------- */

/* The repeatable --set flags out of argv (cli_parse keeps one value per option). */
static int take_sets(int argc, char **argv, const char **sets, int *n_sets, char **rest,
                     int *n_rest) {
  *n_sets = *n_rest = 0;
  for (int i = 0; i < argc; i++) {
    if (i >= 2 && strcmp(argv[i], "--set") == 0) {
      if (i + 1 >= argc)
        return fprintf(stderr, "cmaec export: option --set needs a value\n"), EXIT_INVALID;
      sets[(*n_sets)++] = argv[++i];
    } else if (i >= 2 && strncmp(argv[i], "--set=", 6) == 0) {
      sets[(*n_sets)++] = argv[i] + 6;
    } else {
      rest[(*n_rest)++] = argv[i];
    }
  }
  rest[*n_rest] = NULL;
  return EXIT_OK;
}

/* Every param and state of the variant's forward graph from its initializer. */
static int init_checkpoint(const char *model, const char *const *sets, int n_sets, uint64_t seed,
                           const char *dir) {
  cm_err err = {0};
  cm_model_config cfg;
  if (cm_model_config_load(model, sets, n_sets, &cfg, &err)) return cli_report(&err, model);
  cm_model m;
  cm_model_build_opts bo = {.batch = 2, .ranks = 1, .dtype = CM_F32};
  if (cm_model_build(&cfg, &bo, &m, &err)) return cli_report(&err, model);
  int nn = m.g->n_nodes, n = 0, rc = EXIT_OK;
  cm_tensor *ts = calloc((size_t)nn, sizeof *ts);
  const cm_tensor **tp = calloc((size_t)nn, sizeof *tp);
  const char **names = calloc((size_t)nn, sizeof *names);
  char *json = cm_model_config_to_json(&cfg);
  if (!ts || !tp || !names || !json) {
    fprintf(stderr, "cmaec export: out of memory\n");
    rc = EXIT_INTERNAL;
    goto done;
  }
  for (int i = 0; i < nn; i++) {
    const cm_node *nd = &m.g->nodes[i];
    if (nd->op != CM_OP_PARAM && nd->op != CM_OP_STATE) continue;
    if (cm_tensor_alloc(&ts[n], nd->type, &err) ||
        cm_init_tensor(&ts[n], &nd->attrs.init, seed, nd->name, &err)) {
      rc = cli_report(&err, model);
      goto done;
    }
    names[n] = nd->name;
    tp[n] = &ts[n];
    n++;
  }
  if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
    fprintf(stderr, "cmaec export: %s: %s\n", dir, strerror(errno));
    rc = EXIT_INVALID;
    goto done;
  }
  cm_checkpoint_meta meta = {.step = 0, .epoch = 0, .rng_seed = seed, .config_json = json};
  char *path = NULL;
  if (cm_checkpoint_save(dir, &meta, n, names, tp, 0, &path, &err)) {
    rc = cli_report(&err, dir);
    goto done;
  }
  printf("wrote %s: %d tensors of %s\n", path, n, cfg.name);
  free(path);
done:
  if (ts)
    for (int i = 0; i < n; i++) cm_tensor_free(&ts[i]);
  free(ts);
  free(tp);
  free(names);
  free(json);
  cm_model_free(&m);
  return rc;
}

int cmd_export(int argc, char **argv) {
  const char **sets = malloc(sizeof(char *) * (size_t)argc);
  char **rest = malloc(sizeof(char *) * (size_t)(argc + 1));
  int n_sets, n_rest, rc;
  if (!sets || !rest) {
    free(sets);
    free(rest);
    return fprintf(stderr, "cmaec export: out of memory\n"), EXIT_INTERNAL;
  }
  if ((rc = take_sets(argc, argv, sets, &n_sets, rest, &n_rest))) goto out;
  cli_option opts[] = {{"--help", false, NULL, false},
                       {"-o", true, NULL, false},
                       {"--encoder", false, NULL, false},
                       {"--init-checkpoint", false, NULL, false},
                       {"--seed", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  uint64_t seed = 0;
  if (!cli_parse(n_rest, rest, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "export")) {
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[0].given) {
    fputs(usage_export, stdout);
    goto out;
  }
  if (n_pos != 1 || !opts[1].given || opts[2].given == opts[3].given) {
    fputs(usage_export, stderr);
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[4].given && !cli_parse_u64(opts[4].value, &seed)) {
    fprintf(stderr, "cmaec export: --seed %s: not an unsigned integer\n", opts[4].value);
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[3].given) {
    rc = init_checkpoint(pos[0], sets, n_sets, seed, opts[1].value);
    goto out;
  }
  loaded_ckpt c;
  if ((rc = load_ckpt(pos[0], "export", &c))) {
    loaded_free(&c);
    goto out;
  }
  cm_tensor_set es;
  cm_err err = {0};
  if (cm_encoder_export(&c.cfg, &c.tensors, &es, &err)) {
    rc = cli_report(&err, c.path);
  } else {
    if (cm_safetensors_save(opts[1].value, &es, &err))
      rc = cli_report(&err, opts[1].value);
    else
      printf("wrote %s: %d tensors of the %s online encoder\n", opts[1].value, es.n, c.cfg.name);
    cm_tensor_set_free(&es);
  }
  loaded_free(&c);
out:
  free(sets);
  free(rest);
  return rc;
}
