/* frontend/frontend.h — files in, files out: the contract of the frontend layer.
 *
 * Defines: graph JSON v1 read/write (cmaec.graph/1, docs/graph-format.md),
 * loading a graph from JSON or text IR by content, named tensor sets,
 * safetensors read/write, and model-variant files (models/<variant>.json:
 * hyper-parameters by component, "extends", --set overrides; docs/models.md). Uses ir/ only. Every
 * reader validates everything it reads and returns CM_EINVALID with a one-line message naming the
 * place (JSON path, node, tensor) and the rule; none reads out of bounds. */
#ifndef CMAEC_FRONTEND_H
#define CMAEC_FRONTEND_H

#include "../ir/ir.h"

#define CM_GRAPH_FORMAT_TAG "cmaec.graph/1"

/* ---- graph JSON -------------------------------------------------------- */

/* Parses graph JSON text (len bytes, need not be NUL-terminated). Nodes may be
 * listed in any order; they are sorted topologically, and a cycle is an error
 * naming a node on it. Errors: "nodes[7].inputs[1]: no value named \"h2\"". */
cm_status cm_graph_from_json(const char *text, size_t len, cm_graph **out, cm_err *err);
/* Writes graph JSON (malloc'd, NUL-terminated, pretty-printed); NULL on out of
 * memory. write(read(x)) is a fixed point: writing what was read gives the same text. */
char *cm_graph_to_json(const cm_graph *g);
/* Reads a file: graph JSON if its first non-blank byte is '{', '[' or '"' or
 * the file is blank, else text IR. Errors are prefixed with the path. */
cm_status cm_graph_load(const char *path, cm_graph **out, cm_err *err);
cm_status cm_graph_save_json(const cm_graph *g, const char *path, cm_err *err);

/* ---- named tensors and safetensors ------------------------------------- */

typedef struct cm_tensor_set {
  int n, cap;
  char **names;
  cm_tensor *tensors;
  int n_meta; /* "__metadata__" string pairs */
  char **meta_keys, **meta_values;
} cm_tensor_set;

void cm_tensor_set_init(cm_tensor_set *s);
void cm_tensor_set_free(cm_tensor_set *s);
/* Adds a copy of t under name (replacing an existing entry of that name). */
cm_status cm_tensor_set_add(cm_tensor_set *s, const char *name, const cm_tensor *t, cm_err *err);
/* Takes ownership of t->data (t is left empty). */
cm_status cm_tensor_set_take(cm_tensor_set *s, const char *name, cm_tensor *t, cm_err *err);
const cm_tensor *cm_tensor_set_get(const cm_tensor_set *s, const char *name);
cm_status cm_tensor_set_meta(cm_tensor_set *s, const char *key, const char *value, cm_err *err);

/* Parses a safetensors image of len bytes: 8-byte little-endian header length,
 * JSON header, data. Checks dtypes, shapes (rank <= 6, dims >= 0 fitting the
 * byte range), offsets in order, inside the data and matching dtype x shape,
 * header length inside the buffer. Zero-sized dims are read but rejected as
 * graph values later. */
cm_status cm_safetensors_parse(const uint8_t *buf, size_t len, cm_tensor_set *out, cm_err *err);
cm_status cm_safetensors_load(const char *path, cm_tensor_set *out, cm_err *err);
/* Serializes (tensors in set order, data 8-byte aligned header). */
cm_status cm_safetensors_serialize(const cm_tensor_set *s, uint8_t **buf, size_t *len, cm_err *err);
/* Writes to path.tmp, flushes, fsyncs and renames, so a crash never leaves a broken file. */
cm_status cm_safetensors_save(const char *path, const cm_tensor_set *s, cm_err *err);

/* Line and column (1-based) of a byte offset in text, for syntax errors. */
void cm_text_line_col(const char *text, size_t offset, int *line, int *col);

/* ---- bounded file reads (frontend/files.c; docs/cli.md "Limits") --------- */

/* Every reader takes regular files only (a directory, FIFO, device or socket is
 * refused before it is read) up to its format's cap, and an error names the
 * file and the cap. */
#define CM_MAX_TEXT_FILE_BYTES ((size_t)64 << 20) /* graph JSON, text IR, model variant files */
/* Opens path read-only when it is a regular file: the descriptor and its size. */
cm_status cm_file_open_regular(const char *path, int *fd, size_t *size, cm_err *err);
/* Reads a whole regular file of at most max bytes (malloc'd, NUL-terminated, *len
 * without the NUL); what names the kind of file in the message ("a metrics file"). */
cm_status cm_read_file_max(const char *path, size_t max, const char *what, char **data, size_t *len,
                           cm_err *err);
/* cm_read_file_max with the cap of a graph or model file, CM_MAX_TEXT_FILE_BYTES. */
cm_status cm_read_file(const char *path, char **data, size_t *len, cm_err *err);
/* Maps a regular file read-only (NULL and 0 for an empty one), for formats whose
 * header says how much of the file to read (safetensors): only the bytes looked at
 * are read. Release with cm_file_unmap. */
cm_status cm_file_map(const char *path, const uint8_t **data, size_t *len, cm_err *err);
void cm_file_unmap(const uint8_t *data, size_t len);

/* ---- model variants (frontend/model_config.c) --------------------------- */

#define CM_MODEL_MAX_STAGES 3
#define CM_MAX_WORKERS 64 /* train.workers: data loader threads */

/* Every hyper-parameter of a CMAE variant, by component. The defaults are the
 * official cmae_vit_base configuration (CMAE.md); each field is one key of
 * the variant file ("encoder.depth") with its type, default and meaning in
 * docs/models.md. Strings are fixed buffers so a config is a plain value. */
typedef struct cm_model_config {
  char name[64];    /* "name": the variant's name */
  char arch[16];    /* "arch": "vit" | "convvit" */
  bool contrastive; /* "contrastive": CMAE (true) or plain MAE (false: no target branch) */
  struct {
    char dataset[32];       /* "imagenet" | "fashion-mnist" | "folder" */
    int image_size;         /* view size fed to the encoders (224) */
    int in_chans;           /* 3 (1 for Fashion-MNIST) */
    int master_size;        /* master crop size (256) */
    int shift;              /* target view shift range p: offsets drawn from [0, p] (31) */
    double mean[3], std[3]; /* normalization, on the 0..255 scale */
    double crop_scale_min, crop_scale_max; /* random resized crop area (0.2, 1.0) */
    double flip_prob;                      /* 0.5 */
    double jitter_prob, brightness, contrast, saturation, hue; /* 0.8, 0.4, 0.4, 0.4, 0.1 */
    double grayscale_prob;                                     /* 0.2 */
    double blur_prob, blur_sigma_min, blur_sigma_max;          /* 0.5, 0.1, 2.0 */
    int max_pixels; /* image folders: the largest image decoded, h x w (2^25) */
  } data;
  struct {
    char kind[16]; /* "block" (official: 2x2 blocks) | "random" (MAE) */
    double ratio;  /* 0.65 (block) / 0.75 (random) */
    int block;     /* block side in patches (2) */
  } mask;
  struct {
    int patch;               /* 16 */
    int width, depth, heads; /* 768, 12, 12 (ViT); for convvit: the stage-3 transformer */
    double mlp_ratio;        /* 4 */
    bool qkv_bias;           /* true */
    bool final_norm;         /* online final LN (true); the target never has one */
    double ln_eps;           /* 1e-6 */
    /* convvit only: three stages, the last one a transformer of width `width` */
    int stage_widths[CM_MODEL_MAX_STAGES];  /* [256, 384, 768] */
    int stage_depths[CM_MODEL_MAX_STAGES];  /* [2, 2, 11] */
    int stage_patches[CM_MODEL_MAX_STAGES]; /* [4, 2, 2]: product = patch */
  } encoder;
  struct {
    bool enabled;            /* feature decoder only: false drops it (ablation) */
    int width, depth, heads; /* pixel: 512, 8, 16; feature: 512, 2, 16 */
    double mlp_ratio;        /* 4 */
  } pixel_decoder, feature_decoder;
  struct {
    int hidden, out; /* 1536, 256 */
    double bn_eps;   /* 1e-6 */
  } projector, predictor;
  struct {
    double rc_weight, ct_weight; /* 1, 1 */
    double temperature;          /* 0.07; loss_ct = ct_weight * 2 tau * CE */
    bool norm_pix;               /* normalize each target patch (true) */
    double norm_pix_eps;         /* 1e-6 */
  } loss;
  struct {
    double base_lr;                         /* 1.5e-4; lr = base_lr * batch / 256 */
    int batch;                              /* global batch (4096) */
    double weight_decay, beta1, beta2, eps; /* 0.05, 0.9, 0.95, 1e-8 */
    double clip_norm;                       /* 0: none */
  } optimizer;
  struct {
    int epochs, warmup_epochs;          /* 300, 40 */
    double warmup_start_factor;         /* 1e-4 */
    double min_lr;                      /* 0 */
    double momentum_base, momentum_end; /* EMA 0.996, 0.996 */
  } schedule;
  struct {
    int seed;              /* params, views, masks and shuffling (0) */
    char views[8];         /* "shift" (CMAE's views) | "rrc" (independent crops, ablation) */
    int workers;           /* loader threads (2) */
    int ckpt_every;        /* steps between checkpoints; 0: only at the end */
    int limit;             /* images of the split trained on, spread evenly; 0: all */
    char precision[8];     /* "auto" | "f32" | "bf16" | "f16" (docs/training.md) */
    char loss_scale[24];   /* "auto" | "dynamic" | "off" | a positive number */
    int loss_scale_growth; /* dynamic: good steps before the scale doubles (2000) */
  } train;
} cm_model_config;

/* The official cmae_vit_base configuration. */
void cm_model_config_default(cm_model_config *c);
/* Reads a variant file: "extends" (a path relative to the file; chains allowed,
 * cycles are errors) is read first, then this file's keys override it; then
 * each "key=value" of overrides (the --set flags) applies; then the whole
 * config is validated. Errors name the file and key: "models/x.json:
 * encoder.heads: 7 does not divide encoder.width 768". */
cm_status cm_model_config_load(const char *path, const char *const *overrides, int n_overrides,
                               cm_model_config *out, cm_err *err);
/* Applies one "key=value" (value in JSON syntax; bare strings allowed). */
cm_status cm_model_config_set(cm_model_config *c, const char *assignment, cm_err *err);
/* Impossible combinations (heads not dividing width, image not divisible by
 * patch, shift + image > master, mask ratio outside [0, 1), ...), naming the key. */
cm_status cm_model_config_validate(const cm_model_config *c, cm_err *err);
/* train.loss_scale for a run at `precision` ("f32", "bf16", "f16"): *dynamic
 * (GradScaler-style, "dynamic", or "auto" at f16), or a fixed scale *fixed > 0,
 * or neither (off). CM_EINVALID naming the key when it is none of those. */
cm_status cm_model_config_loss_scale(const cm_model_config *c, const char *precision, bool *dynamic,
                                     double *fixed, cm_err *err);
/* The resolved config as one JSON object with every key (malloc'd). */
char *cm_model_config_to_json(const cm_model_config *c);

/* The key table, for docs and tools. */
typedef struct cm_model_key {
  const char *key;  /* "encoder.depth" */
  const char *type; /* "int", "number", "bool", "string", "int[3]", "number[3]" */
  const char *doc;  /* one line */
} cm_model_key;
int cm_model_config_keys(const cm_model_key **keys);

#endif
