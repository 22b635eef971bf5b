/* runtime/runtime.h — running programs: the contract of the runtime layer.
 *
 * Defines (so far): probes of the run-time libraries loaded with dlopen — the
 * CUDA driver (and its GPUs), NCCL and MPI — and the report `cmaec info`
 * prints; the CPU executor (runtime/cpu_exec.c). Comm, data and the trainer
 * come with their issues. */
#ifndef CMAEC_RUNTIME_H
#define CMAEC_RUNTIME_H

#include "../codegen/codegen.h"

void cm_probe_cuda(cm_component *out);
void cm_probe_nccl(cm_component *out);
void cm_probe_mpi(cm_component *out);

/* Fills up to max components (LLVM, NVRTC, CUDA driver, NCCL, MPI); returns the count. */
int cm_probe_all(cm_component *out, int max);

/* ---- the CPU executor (runtime/cpu_exec.c) ------------------------------ */

/* A compiled program for the host CPU: the graph's kernels (lowered, rendered
 * with the LLVM renderer, JIT-compiled through the on-disk cache), ordered
 * steps over one arena, run with OpenMP splitting each stage's work items.
 * Threads: opts->threads, else $CMAEC_THREADS, else omp_get_max_threads(). */
typedef struct cm_cpu_program cm_cpu_program;

typedef struct cm_cpu_opts {
  int threads;           /* 0: $CMAEC_THREADS or OpenMP's default */
  const char *cache_dir; /* object cache; NULL: $CMAEC_CACHE_DIR, else
                            $XDG_CACHE_HOME/cmaec or ~/.cache/cmaec; "" disables it */
  bool no_templates;     /* generic loop nests only */
  bool profile;          /* time every kernel (cm_cpu_program_profile) */
  int opt_level;         /* 0: 3 */
} cm_cpu_opts;

typedef struct cm_cpu_stats {
  int n_kernels, n_stages;
  double lower_ms, render_ms, jit_ms; /* building the program */
  int cache_hits, cache_misses;
  int64_t arena_bytes, scratch_bytes, workspace_bytes;
  int threads;
} cm_cpu_stats;

/* Builds the program for g (which must verify) from its plan; when plan is
 * NULL the default pipeline's fuse, schedule and memplan are run on a copy
 * of g first (the program keeps what it needs; g must outlive it). */
cm_status cm_cpu_program_build(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                               cm_cpu_program **out, cm_err *err);
void cm_cpu_program_free(cm_cpu_program *pr);
/* The graph the program runs (g itself, or the optimized copy when built
 * without a plan: its node ids differ, its sources and outputs keep their names). */
const cm_graph *cm_cpu_program_graph(const cm_cpu_program *pr);
/* Runs one evaluation. sources[i] (indexed by node id of g as passed to
 * build, NULL for non-sources) gives every input, param and state with
 * exactly its type; states whose assign the graph holds are updated in place
 * (also params, as the oracle's assign values). outputs[j] receives graph
 * output j (allocated; the caller frees with cm_tensor_free). */
cm_status cm_cpu_program_run(cm_cpu_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                             cm_err *err);
void cm_cpu_program_stats(const cm_cpu_program *pr, cm_cpu_stats *out);
/* With opts->profile: per kernel, total ms over all runs and the number of runs. */
typedef struct cm_kernel_profile {
  const char *name;
  cm_group_kind kind;
  double total_ms;
  int runs;
  double flops; /* per run, counted from the kernel's stages (2 per multiply-add) */
} cm_kernel_profile;
int cm_cpu_program_profile(const cm_cpu_program *pr, const cm_kernel_profile **out);

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
  int rank, world; /* shard: rank r gets [r*n/G, (r+1)*n/G) of the permutation, n/G floor */
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

#endif
