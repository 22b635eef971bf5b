/* runtime/training.h — training: the training half of the runtime layer.
 *
 * Defines: the data pipeline (datasets, the loader: runtime/data.c; views and
 * masks: runtime/views.c), per-iteration lr/momentum schedules
 * (runtime/lr_schedule.c; not the graph pass passes/schedule.c, which orders
 * kernels), metrics and progress (runtime/metrics.c), checkpoints
 * (runtime/checkpoint.c), evaluation on frozen features — kNN and the linear
 * probe (runtime/evaluation.c), pictures (runtime/picture.c), the trainer
 * (runtime/trainer.c) and the evaluation commands' encoder features and
 * reconstructions (runtime/features.c). Everything here runs graphs through the
 * execution half, runtime/runtime.h. See docs/training.md and docs/data.md. */
#ifndef CMAEC_TRAINING_H
#define CMAEC_TRAINING_H

#include "../frontend/frontend.h"
#include "runtime.h"

#include <signal.h> /* sig_atomic_t */

/* ---- data: datasets, views and masks, the loader ------------------------ */
/* runtime/data.c (datasets, loader) and runtime/views.c (CMAE.md §1-§2);
 * docs/data.md. Every random draw is Philox keyed by the run seed with the
 * counter (epoch, sample index, draw number): a sample's views and mask depend
 * only on (seed, epoch, index), whatever the worker count or batch order. */

struct cm_model_config;

/* A decoded image: uint8, HWC, c = 1 or 3; data owned (cm_image_free). */
typedef struct cm_image {
  int h, w, c;
  uint8_t *data;
} cm_image;
void cm_image_free(cm_image *im);

typedef struct cm_dataset cm_dataset;

/* Fashion-MNIST split from dir (NULL: $CMAEC_FMNIST_DIR, else
 * /usr/share/datasets/fashion-mnist, the Debian package dataset-fashion-mnist):
 * train (60000) or t10k (10000); 28x28x1 images, 10 classes, held in memory. */
cm_status cm_dataset_open_fmnist(const char *dir, bool train, cm_dataset **out, cm_err *err);
/* Any gzip-compressed IDX pair: images (magic 0x00000803, [n, rows, cols]
 * uint8) and labels (0x00000801, [n] uint8 < 256); counts must agree. */
cm_status cm_dataset_open_idx(const char *images_gz, const char *labels_gz, cm_dataset **out,
                              cm_err *err);
/* An image folder dir/<class>/<file>: classes = subdirectories sorted by
 * name, files (*.png, *.jpg, *.jpeg, any case) sorted by name; decoded on
 * demand and converted to chans (1: luminance, 3: gray replicated). */
cm_status cm_dataset_open_folder(const char *dir, int chans, cm_dataset **out, cm_err *err);
void cm_dataset_free(cm_dataset *d);
int64_t cm_dataset_size(const cm_dataset *d);
int cm_dataset_n_classes(const cm_dataset *d);
const char *cm_dataset_class_name(const cm_dataset *d, int k);
int32_t cm_dataset_label(const cm_dataset *d, int64_t i);
int cm_dataset_channels(const cm_dataset *d);
/* Sample i at its native size (thread-safe). A corrupt file is an error, is
 * counted once in cm_dataset_skipped and warned about on stderr (the first 5). */
cm_status cm_dataset_get(const cm_dataset *d, int64_t i, cm_image *out, cm_err *err);
int64_t cm_dataset_skipped(const cm_dataset *d);
/* The largest image an image folder decodes, h x w pixels (default
 * CM_DEFAULT_MAX_PIXELS; the trainer sets data.max_pixels). It is checked from the
 * file's header before decoding, and the file's size against
 * cm_image_file_max_bytes; an image over either is an error naming the file, its
 * size and the limit — not a corrupt file to skip: the loader stops with it. */
#define CM_DEFAULT_MAX_PIXELS ((int64_t)1 << 25)
void cm_dataset_set_max_pixels(cm_dataset *d, int64_t max_pixels);
/* The largest image file read: 8 bytes per pixel (16-bit RGBA stored raw) + 16 MiB. */
int64_t cm_image_file_max_bytes(int64_t max_pixels);
/* The most memory one loader worker takes to decode an image of max_pixels: the
 * file and the decoded pixels, or the decoded and the converted ones. */
int64_t cm_image_decode_bytes(int64_t max_pixels);
/* Keeps n samples spread evenly over d (sample floor(i * size / n) becomes i),
 * so every class of a class-sorted folder stays; n >= size keeps all. */
cm_status cm_dataset_subset(cm_dataset *d, int64_t n, cm_err *err);

typedef enum cm_views_mode {
  CM_VIEWS_SHIFT = 0, /* CMAE: master crop, online = (0, 0) crop, target shifted by (dh, dw) */
  CM_VIEWS_RRC,       /* ablation: online and target independent RandomResizedCrops */
  CM_VIEWS_EVAL,      /* whole image resized to image_size; no augmentation, target or mask */
} cm_views_mode;

typedef struct cm_views_opts {
  cm_views_mode mode;
  int image_size, master_size, shift, in_chans, patch;
  double mean[3], std[3];                                      /* 0..255 scale */
  double crop_scale_min, crop_scale_max, ratio_min, ratio_max; /* 0.2, 1, 3/4, 4/3 */
  double flip_prob;
  double jitter_prob, brightness, contrast, saturation, hue;
  double grayscale_prob;
  double blur_prob, blur_sigma_min, blur_sigma_max;
  bool antialias; /* widen the bicubic filter when downscaling, as Pillow (true) */
  bool mask;      /* draw masks (false: the batch's mask arrays are NULL) */
  char mask_kind[16];
  double mask_ratio;
  int mask_block;
} cm_views_opts;

/* Options from a model config (data.*, mask.*, encoder.patch); mode SHIFT. */
void cm_views_opts_from_config(const struct cm_model_config *c, cm_views_opts *o);
/* Checks sizes (shift + image_size <= master_size, image_size % patch == 0,
 * the mask config), probabilities and ranges. */
cm_status cm_views_check(const cm_views_opts *o, cm_err *err);
int cm_views_n_tokens(const cm_views_opts *o); /* (image_size / patch)^2 */
int cm_views_n_keep(const cm_views_opts *o);   /* visible tokens per sample; 0 without a mask */

/* One sample's outputs: arrays the caller owns ([C,S,S] floats; img_t, the
 * mask arrays and master may be NULL) and what was drawn. */
typedef struct cm_views_out {
  float *img, *img_t;
  int32_t *ids_keep, *ids_restore; /* [n_keep], [L] */
  float *mask;                     /* [L], 1 = masked */
  uint8_t *master;                 /* SHIFT: [M,M,C] master after the flip */
  int crop[4];                     /* the (first) crop: y, x, h, w in the source */
  int crop_t[4];                   /* RRC: the target's crop */
  int flip, dh, dw;
  bool jitter, gray, blur;
} cm_views_out;
cm_status cm_views_sample(const cm_views_opts *o, const cm_image *im, uint64_t seed, int64_t epoch,
                          int64_t index, cm_views_out *out, cm_err *err);
/* Bicubic (a = -0.5, Pillow's) resize of the box (y, x, h, w) of src to
 * oh x ow, uint8 HWC out; edges clamp to the box. */
void cm_views_resize(const cm_image *src, const int box[4], int oh, int ow, bool antialias,
                     uint8_t *out);

typedef struct cm_loader cm_loader;

typedef struct cm_loader_opts {
  int batch;       /* per-rank batch size */
  int workers;     /* decode/augment threads (>= 1) */
  int depth;       /* prefetched batches, 2..4 (0: 3) */
  bool shuffle;    /* a seeded permutation per epoch */
  bool drop_last;  /* drop the last partial batch of each epoch */
  int rank, world; /* shard: of each global batch (batch * world positions of the epoch's
                      permutation) rank r gets [r*batch, (r+1)*batch) (a partial last one:
                      [r*len/world, (r+1)*len/world)), so the samples, views and masks of a
                      step are those of one process at the global batch */
  uint64_t seed;   /* run seed */
  int64_t epoch0;  /* first epoch */
  int64_t epochs;  /* epochs to run; 0: unlimited */
  cm_views_opts views;
} cm_loader_opts;

/* A batch; arrays owned by the loader, valid until the next cm_loader_next. */
typedef struct cm_batch {
  int n; /* samples (0: the loader ran its epochs) */
  int chans, size, n_keep, n_tokens;
  float *img, *img_t;   /* [n,C,S,S]; img_t NULL in EVAL mode */
  int32_t *ids_keep;    /* [n,n_keep] */
  int32_t *ids_restore; /* [n,L] */
  float *mask;          /* [n,L] */
  int32_t *labels;      /* [n] */
  int64_t *indices;     /* [n] dataset indices */
  int64_t epoch, step;  /* step within the epoch */
  int64_t global_step;  /* batches since epoch0 */
} cm_batch;

cm_status cm_loader_create(const cm_dataset *d, const cm_loader_opts *o, cm_loader **out,
                           cm_err *err);
/* Blocks until the next batch is ready. */
cm_status cm_loader_next(cm_loader *l, cm_batch *b, cm_err *err);
int64_t cm_loader_steps_per_epoch(const cm_loader *l);
/* Stops and joins the workers at any point. */
void cm_loader_free(cm_loader *l);

/* ---- trainer support (lr_schedule.c, metrics.c, checkpoint.c, evaluation.c,
 * picture.c) ---------------------------------------------------------------- */

/* Per-iteration lr and momentum schedules, cm_lr_schedule (not the graph pass
 * passes/schedule.c; mmengine semantics, CMAE.md §4 and §8). Iteration
 * t is 0-based: the value used by the t-th optimizer step.
 *   peak = base_lr * global_batch / 256 (the linear scaling rule)
 *   t < W:  lr = peak * (f0 + (1 - f0) * t / W)        (LinearLR, f0 = 1e-4)
 *   t >= W: lr = eta_min + (peak - eta_min) * (1 + cos(pi (t - W) / (T - W))) / 2
 *   momentum(t) = m_end - (m_end - m_base) * (cos(pi t / T) + 1) / 2
 * with W = warmup iterations and T = total iterations; t >= T holds the last value. */
typedef struct cm_lr_schedule {
  double peak_lr, min_lr, warmup_start_factor;
  int64_t warmup_iters, total_iters;
  double momentum_base, momentum_end;
} cm_lr_schedule;

/* From a config's optimizer.* and schedule.* keys (epochs converted to
 * iterations with iters_per_epoch). Errors: non-positive sizes, warmup >= total. */
cm_status cm_lr_schedule_from_config(const cm_model_config *c, int64_t iters_per_epoch,
                                     cm_lr_schedule *out, cm_err *err);
double cm_lr_schedule_lr(const cm_lr_schedule *s, int64_t t);
double cm_lr_schedule_momentum(const cm_lr_schedule *s, int64_t t);

/* Metrics: metrics.jsonl, one JSON object per step, appended and flushed per
 * line. Non-finite values are written as null (read back as NaN). */
typedef struct cm_metrics_row {
  int64_t step;
  int64_t epoch;
  double loss_rc, loss_ct, loss, lr, momentum, images_per_s, step_ms;
  int n_extra; /* further numeric fields, written after the fixed ones */
  const char *const *extra_names;
  const double *extra_values;
  const char *precision; /* NULL, or "f32", "bf16", "f16": written as "precision" */
} cm_metrics_row;

typedef struct cm_metrics_writer cm_metrics_writer;
/* Appends to path (created if absent). A torn last line is removed first;
 * resume_step >= 0 also removes the lines with step >= resume_step (a run
 * resumed from the checkpoint of that step logs them again); < 0 keeps them. */
cm_status cm_metrics_open(const char *path, int64_t resume_step, cm_metrics_writer **out,
                          cm_err *err);
cm_status cm_metrics_write(cm_metrics_writer *w, const cm_metrics_row *row, cm_err *err);
void cm_metrics_close(cm_metrics_writer *w);

/* The file read back as a table: every key seen becomes a column (in order of
 * first appearance); a value missing from a row, null or non-numeric is NaN.
 * A torn last line (no newline, does not parse: a crash mid-write) is skipped;
 * any other bad line is CM_EINVALID naming the path and line. */
typedef struct cm_metrics_table {
  int n_cols;
  int64_t n_rows;
  char **cols;
  double *values; /* n_rows x n_cols, row-major */
} cm_metrics_table;
cm_status cm_metrics_read(const char *path, cm_metrics_table *out, cm_err *err);
int cm_metrics_column(const cm_metrics_table *t, const char *name); /* -1 if absent */
void cm_metrics_table_free(cm_metrics_table *t);

/* Progress: on a terminal one line rewritten in place (bar, step/total, ETA,
 * steps/s, last loss); otherwise a plain line every `every` steps and at the end. */
typedef struct cm_progress {
  FILE *out;
  bool tty;
  int64_t total, every, first_step, last_step;
  double t_start, t_last_draw;
} cm_progress;
/* tty: 1 or 0 forces the mode, -1 asks isatty(fileno(out)). */
void cm_progress_init(cm_progress *p, FILE *out, int64_t total_steps, int64_t every, int tty);
void cm_progress_update(cm_progress *p, int64_t step, double loss);
void cm_progress_finish(cm_progress *p);

/* Checkpoints: one safetensors file holding the named tensors (params, AdamW
 * moments, EMA params: whatever the caller lists) with step, epoch, the RNG
 * state, the resolved config JSON and a CRC-32 of the data in __metadata__.
 * Written to "<path>.tmp" in the same directory, fsync'ed, renamed over path,
 * then the directory fsync'ed: a crash leaves the old file or the new one. */
#define CM_CKPT_MAX_COUNTERS 8
#define CM_CKPT_FORMAT "cmaec.checkpoint/1"
typedef struct cm_checkpoint_meta {
  int64_t step, epoch;
  uint64_t rng_seed;
  int n_rng_counters; /* 0 .. CM_CKPT_MAX_COUNTERS */
  uint64_t rng_counters[CM_CKPT_MAX_COUNTERS];
  char *config_json; /* NULL on save: none; on load malloc'd (NULL if absent) */
} cm_checkpoint_meta;

cm_status cm_checkpoint_write(const char *path, const cm_checkpoint_meta *meta, int n,
                              const char *const *names, const cm_tensor *const *tensors,
                              cm_err *err);
/* dir/ckpt-<step>.safetensors, then dir/latest (its file name and a newline,
 * also replaced atomically); keep > 0 removes all but the newest `keep`
 * ckpt-*.safetensors and leftover ckpt-*.safetensors.tmp. *path_out (may be NULL) gets the file's
 * malloc'd path. */
cm_status cm_checkpoint_save(const char *dir, const cm_checkpoint_meta *meta, int n,
                             const char *const *names, const cm_tensor *const *tensors, int keep,
                             char **path_out, cm_err *err);
/* Validates everything (safetensors structure, format tag, CRC, metadata
 * fields); a torn or corrupt file is CM_EINVALID naming it. */
cm_status cm_checkpoint_load(const char *path, cm_tensor_set *tensors, cm_checkpoint_meta *meta,
                             cm_err *err);
/* The path dir/latest names (malloc'd). */
cm_status cm_checkpoint_latest(const char *dir, char **path, cm_err *err);
void cm_checkpoint_meta_free(cm_checkpoint_meta *meta);

/* Evaluation on frozen features: float [n, d] row-major, labels in [0, classes).
 * kNN: features L2-normalized, cosine similarity, the k most similar train
 * rows (ties in similarity: lower train index first) vote exp(sim / T) for
 * their label (InstDisc/DINO, T = 0.07); the class with the largest total wins
 * and equal totals go to the smaller class index. k > n_train uses all rows.
 * pred (may be NULL) receives the n_test predictions. */
cm_status cm_knn_classify(const float *train, const int32_t *train_labels, int64_t n_train,
                          const float *test, const int32_t *test_labels, int64_t n_test, int d,
                          int classes, int k, double temperature, int32_t *pred, double *top1,
                          cm_err *err);

/* Linear probe: multinomial logistic regression on features standardized
 * with the train mean/std, trained by gradient descent with momentum 0.9 for
 * a fixed number of epochs (batch 0: full batch; otherwise mini-batches in a
 * fixed-seed shuffled order), L2 weight decay; deterministic. */
typedef struct cm_probe_opts {
  int epochs;          /* 100 */
  int batch;           /* 0: full batch */
  double lr;           /* 0.5 */
  double weight_decay; /* 1e-4 */
  uint64_t seed;       /* mini-batch order */
} cm_probe_opts;
void cm_probe_opts_default(cm_probe_opts *o);
cm_status cm_linear_probe(const float *train, const int32_t *train_labels, int64_t n_train,
                          const float *test, const int32_t *test_labels, int64_t n_test, int d,
                          int classes, const cm_probe_opts *opts, double *train_top1,
                          double *test_top1, cm_err *err);

/* Pictures: cm_image of the data section (uint8 HWC, c = 1 gray or 3 RGB). */
cm_status cm_image_alloc(cm_image *im, int w, int h, int c, uint8_t fill, cm_err *err);
cm_status cm_png_write(const char *path, const cm_image *im, cm_err *err);
cm_status cm_png_read(const char *path, cm_image *out, cm_err *err); /* gray or RGB */
/* rows x cols tiles of one size (tile i at row i / cols, column i % cols),
 * `gap` pixels of `background` between them; gray tiles are expanded when
 * others are RGB. */
cm_status cm_image_grid(const cm_image *tiles, int rows, int cols, int gap, uint8_t background,
                        cm_image *out, cm_err *err);

/* Line plots into an RGB image: white background, axes with ticks and numeric
 * labels (a built-in 5x7 font), one polyline per series, a legend. */
typedef struct cm_plot_series {
  const char *label;
  const double *x, *y; /* n points; non-finite (or y <= 0 with log_y) points break the line */
  int64_t n;
  uint8_t rgb[3];
} cm_plot_series;
typedef struct cm_plot_opts {
  int width, height; /* 0: 640 x 400 */
  bool log_y;
  const char *title, *x_label; /* may be NULL */
} cm_plot_opts;
/* Where data coordinates land: plot area [x0, x1] x [y0, y1] in pixels (y0 top). */
typedef struct cm_plot_frame {
  int x0, y0, x1, y1;
  double xmin, xmax, ymin, ymax; /* ymin/ymax are log10 values with log_y */
  bool log_y;
} cm_plot_frame;
cm_status cm_plot_render(const cm_plot_series *series, int n_series, const cm_plot_opts *opts,
                         cm_image *out, cm_plot_frame *frame, cm_err *err);
/* Pixel column/row of a data point in a frame (may lie outside the area). */
void cm_plot_map(const cm_plot_frame *f, double x, double y, double *px, double *py);
/* Draws text with the 5x7 font (scale >= 1) at top-left (x, y); unknown characters draw a box. */
void cm_image_text(cm_image *im, int x, int y, const char *text, int scale, const uint8_t rgb[3]);

/* ---- trainer (runtime/trainer.c; docs/training.md) ----------------------- */

typedef enum cm_train_backend {
  CM_TRAIN_CPU = 0, /* cm_compile for the CPU (the default) */
  CM_TRAIN_REF,     /* the reference evaluator cm_eval (tiny tests) */
  CM_TRAIN_CUDA,    /* cm_compile for a GPU: params and optimizer state resident there */
  CM_TRAIN_AUTO,    /* CUDA when the driver loads and has the device, else the CPU */
} cm_train_backend;

typedef struct cm_train_opts {
  const char *model_path;       /* a variant file (a models/ JSON) */
  const char *const *overrides; /* "key=value", applied in order (train.seed, train.views,
                                   train.workers, train.ckpt_every: docs/models.md) */
  int n_overrides;
  const char *data;    /* NULL or "fashion-mnist": Fashion-MNIST train; else an image folder */
  int64_t steps;       /* > 0: stop once this many steps (in all, resumed ones included) ran */
  int64_t epochs;      /* > 0: sets schedule.epochs and runs that many epochs */
  int batch;           /* > 0: overrides optimizer.batch */
  const char *out_dir; /* metrics.jsonl and checkpoints (created) */
  bool resume;         /* continue from out_dir/latest */
  cm_train_backend backend;
  int threads;                /* cpu backend; 0: its default */
  int device;                 /* cuda: the driver's ordinal */
  cm_cuda_graphs cuda_graphs; /* cuda: the step replayed as one CUDA graph (default on) */
  /* cuda, tests only: the driver and compiler to use (the emulated device of
   * tests/emu/emu.h); NULL: the CUDA driver and NVRTC */
  const cm_cuda_driver *cuda_driver;
  const cm_cuda_compiler *cuda_compiler;
  int64_t log_every;           /* progress lines when not a terminal; 0: 10 */
  int keep;                    /* checkpoints kept (0: 3) */
  FILE *log;                   /* the start/end report and progress; NULL: silent */
  int progress_tty;            /* as cm_progress_init: 1, 0 or -1 (ask isatty) */
  volatile sig_atomic_t *stop; /* set (e.g. by a SIGINT handler): finish the step, save, return */
  bool tune;                   /* cm_tune the step's kernels before compiling it (train --tune) */
  double tune_budget_s;        /* its budget; 0: no limit */
  /* data parallelism (docs/training.md): NULL or world size 1: one process; else this rank
   * of a group that runs the same cm_train: the step is built for cm_comm_size ranks at the
   * per-rank batch optimizer.batch / size, the gradients averaged over the ranks
   * (cm_data_parallel), this rank's share of every global batch drawn by the loader, and
   * rank 0 alone writes the log, metrics and checkpoints (which hold no per-rank state) */
  cm_comm *comm;
} cm_train_opts;

typedef struct cm_train_result {
  int64_t first_step, last_step; /* steps run: (first_step, last_step], 1-based */
  int64_t total_steps, steps_per_epoch, n_params, dataset_size;
  double loss, loss_rc, loss_ct, images_per_s; /* of the last step; images/s over the run */
  bool interrupted;                            /* stopped by *opts->stop */
  char checkpoint[512];                        /* the last checkpoint written ("" if none) */
  char backend[256]; /* the backend it ran on (cm_backend_choice.description) */
} cm_train_result;

/* Trains a variant: builds its training step at the local batch, runs it
 * step by step on the chosen backend with the loader's batches and the
 * schedule's scalars, logs metrics, checkpoints; a non-finite loss is
 * CM_EINVALID naming the step and the first non-finite tensor. When *stop is
 * set it returns CM_OK with result->interrupted after saving a checkpoint. */
cm_status cm_train(const cm_train_opts *opts, cm_train_result *result, cm_err *err);
/* train.precision for a backend: "auto" is bf16 on CUDA (its tensor cores) and f32 on
 * the CPU (no fast bf16 on this project's hosts) and the reference evaluator; "f32",
 * "bf16", "f16" are themselves. CM_EINVALID naming the key otherwise. */
cm_status cm_train_precision_resolve(const char *precision, cm_backend_kind backend, cm_dtype *out,
                                     cm_err *err);
/* The training step cm_train runs, at cfg's optimizer.batch: the f32 model,
 * cm_build_train_step with CMAE's optimizer (optimizer.*, frozen params, EMA pairs,
 * train.loss_scale at `precision`, train.loss_scale_growth), then, for bf16 or f16,
 * cm_autocast to that precision (params, moments, EMA targets and every optimizer
 * value stay f32). n_autocast (may be NULL) receives the contractions rewritten. */
cm_status cm_train_build_step(const cm_model_config *cfg, cm_dtype precision, cm_graph **step,
                              int *n_autocast, cm_err *err);
/* The step one rank of `ranks` runs: the model at the per-rank batch optimizer.batch / ranks
 * (CM_EINVALID unless it divides), built for `ranks` ranks (SyncBN, global InfoNCE negatives:
 * inputs "rank" and "labels"), its parameter gradients averaged over the ranks in buckets of
 * about bucket_bytes (cm_data_parallel; 0: 25 MB) before clipping and the update. ranks 1 is
 * cm_train_build_step. precision may also be f64 (tests): the whole step in f64, whose
 * oracle bounds stay finite where f32's grow past the values. */
cm_status cm_train_build_step_ranks(const cm_model_config *cfg, cm_dtype precision, int ranks,
                                    int64_t bucket_bytes, cm_graph **step, int *n_autocast,
                                    cm_err *err);
/* A valid batch and initial state for `step` (runtime/step_sources.c), with no data set: t (one
 * per node of step) gets every input, param and state: images uniform in [-2, 2], masks
 * sampled per row as cfg's mask says, the optimizer's scalars at typical values, params and
 * states from their initializers (seed). What cm_tune times whole steps on. An input a training
 * step does not have is CM_EINVALID naming it. Free with cm_train_example_sources_free. */
cm_status cm_train_example_sources(const cm_model_config *cfg, const cm_graph *step, uint64_t seed,
                                   cm_tensor *t, cm_err *err);
void cm_train_example_sources_free(const cm_graph *step, cm_tensor *t);
/* ---- evaluation commands (runtime/features.c) -------------------------------
 * The frozen online encoder as a feature extractor (docs/evaluation.md): the
 * variant's encoder on the whole unmasked image (ids_keep -1, the final norm
 * as encoder.final_norm says), params from a checkpoint or their initializers,
 * run over eval views (CM_VIEWS_EVAL) and pooled into one vector per image. */

typedef enum cm_pool {
  CM_POOL_MEAN = 0, /* mean over the patch tokens (default; the cls token excluded) */
  CM_POOL_CLS,      /* the cls token (ViT only) */
} cm_pool;

/* The config a checkpoint was trained with, from its resolved config JSON. */
cm_status cm_model_config_from_json_text(const char *json, cm_model_config *out, cm_err *err);

typedef struct cm_encoder cm_encoder;
typedef struct cm_encoder_opts {
  int batch; /* images per graph run (>= 1) */
  cm_pool pool;
  bool reference; /* run on the reference evaluator cm_eval, not cm_compile's program */
  uint64_t seed;  /* params absent from `params` (all when it is NULL) come from their init */
  /* where cm_compile's program runs (cm_backend_resolve; copied): NULL: the CPU;
   * kind ref: as reference; cuda: params resident on the device */
  const cm_backend_choice *backend;
} cm_encoder_opts;

/* Builds the encoder graph: input "img" f32 [batch, C, S, S], output
 * "features" f32 [batch, d]. params NULL: every param from its initializer
 * with seed (the random-init baseline); otherwise every param must be there
 * by name with the node's exact type (an error names the first missing one).
 * When the CPU executor cannot build the program, falls back to cm_eval (on
 * CUDA that is an error: a GPU was asked for). */
cm_status cm_encoder_create(const cm_model_config *cfg, const cm_tensor_set *params,
                            const cm_encoder_opts *opts, cm_encoder **out, cm_err *err);
void cm_encoder_free(cm_encoder *e);
int cm_encoder_dim(const cm_encoder *e);
const cm_graph *cm_encoder_graph(const cm_encoder *e);
/* The bound source tensors, indexed by node id (NULL for non-params). */
const cm_tensor *const *cm_encoder_params(const cm_encoder *e);
bool cm_encoder_uses_reference(const cm_encoder *e);
/* Where it runs: "ref", or the backend's description ("cpu", "cuda 0 (...)"). */
const char *cm_encoder_backend(const cm_encoder *e);
/* Why the CPU executor could not build the program (NULL when it did, or the
 * reference evaluator was asked for). */
const char *cm_encoder_fallback_reason(const cm_encoder *e);
/* Features of n <= batch images img [n, C, S, S] into out [n, d] (a partial
 * batch is zero-padded). */
cm_status cm_encoder_run(cm_encoder *e, const float *img, int n, float *out, cm_err *err);

/* Eval views of the first `limit` samples of d (limit <= 0: all) as one
 * array [n, C, S, S] (normalized) with their labels; views from the config
 * (data.*), mode CM_VIEWS_EVAL. */
cm_status cm_eval_views(const cm_dataset *d, const cm_model_config *cfg, int64_t limit,
                        float **views, int32_t **labels, int64_t *n, cm_err *err);
/* Features of n views [n, C, S, S] (batch by batch) into a malloc'd [n, d]. */
cm_status cm_encoder_features(cm_encoder *e, const float *views, int64_t n, float **feats,
                              cm_err *err);

/* Reconstruction pictures: for n images (views [n, C, S, S] normalized), a
 * mask drawn from mask.* with seed, the whole model run once; out_masked gets
 * the input with masked patches set to 0 (grey after un-normalizing with the
 * mean) and out_recon the pixel decoder's prediction, de-normalized with each
 * target patch's mean/std when loss.norm_pix; visible patches keep the
 * original pixels. All [n, C, S, S] in the normalized scale. params must hold
 * every param of the model graph. */
cm_status cm_reconstruct(const cm_model_config *cfg, const cm_tensor_set *params,
                         const float *views, int n, uint64_t seed, float *out_masked,
                         float *out_recon, cm_err *err);

/* The online encoder's params under their official timm/MAE names
 * (patch_embed.proj.weight, cls_token, pos_embed, blocks.N.norm1.weight,
 * blocks.N.attn.qkv.weight, blocks.N.mlp.fc1.weight, norm.weight, ...), f32,
 * metadata "variant" and "config". ViT only (convvit: CM_EINVALID). */
cm_status cm_encoder_export(const cm_model_config *cfg, const cm_tensor_set *params,
                            cm_tensor_set *out, cm_err *err);

#endif
