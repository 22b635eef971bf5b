/* frontend/model_config.c — model-variant files (models/<variant>.json):
 * defaults, "extends" chains, --set overrides, validation and JSON output.
 * Everything is driven by one key table (MODEL_KEYS below), so parsing,
 * overrides, output, cm_model_config_keys and docs/models.md cannot drift. */
#include "frontend.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum key_type { KT_INT, KT_NUMBER, KT_BOOL, KT_STRING, KT_INT3, KT_NUMBER3 } key_type;

#define KT_NAME_INT "int"
#define KT_NAME_NUMBER "number"
#define KT_NAME_BOOL "bool"
#define KT_NAME_STRING "string"
#define KT_NAME_INT3 "int[3]"
#define KT_NAME_NUMBER3 "number[3]"

/* The default of a key: n[] for numbers, ints, bools and arrays, s for strings. */
typedef struct key_default {
  double n[3];
  const char *s;
  bool number_as_text; /* a string key that also takes a JSON number, stored as its text */
} key_default;

/* X(key, type, field, doc, default...) — the only list of keys. Docs must not
 * contain '|' (they become Markdown table cells). */
#define MODEL_KEYS(X)                                                                              \
  X("name", STRING, name, "the variant's name", .s = "cmae_vit_base")                              \
  X("arch", STRING, arch, "backbone: vit (plain ViT) or convvit (hybrid ConvViT, CMAE.md §9)",     \
    .s = "vit")                                                                                    \
  X("contrastive", BOOL, contrastive,                                                              \
    "CMAE (true) or plain MAE (false: no target branch, no contrastive loss)", .n = {1})           \
  X("data.dataset", STRING, data.dataset, "imagenet, fashion-mnist or folder", .s = "imagenet")    \
  X("data.image_size", INT, data.image_size, "side of both views fed to the encoders (px)",        \
    .n = {224})                                                                                    \
  X("data.in_chans", INT, data.in_chans, "image channels: 3 (RGB) or 1 (grayscale)", .n = {3})     \
  X("data.master_size", INT, data.master_size, "side of the master crop both views are cut from",  \
    .n = {256})                                                                                    \
  X("data.shift", INT, data.shift, "target-view shift range p: offsets drawn from {0..p} px",      \
    .n = {31})                                                                                     \
  X("data.mean", NUMBER3, data.mean,                                                               \
    "normalization mean per channel, 0-255 scale (the first in_chans are used)",                   \
    .n = {123.675, 116.28, 103.53})                                                                \
  X("data.std", NUMBER3, data.std,                                                                 \
    "normalization std per channel, 0-255 scale (the first in_chans are used)",                    \
    .n = {58.395, 57.12, 57.375})                                                                  \
  X("data.crop_scale_min", NUMBER, data.crop_scale_min,                                            \
    "random resized crop: smallest area fraction of the master crop", .n = {0.2})                  \
  X("data.crop_scale_max", NUMBER, data.crop_scale_max,                                            \
    "random resized crop: largest area fraction of the master crop", .n = {1.0})                   \
  X("data.flip_prob", NUMBER, data.flip_prob,                                                      \
    "horizontal flip probability (shared by both views)", .n = {0.5})                              \
  X("data.jitter_prob", NUMBER, data.jitter_prob, "target view: color jitter probability",         \
    .n = {0.8})                                                                                    \
  X("data.brightness", NUMBER, data.brightness, "color jitter: brightness factor U(1-b, 1+b)",     \
    .n = {0.4})                                                                                    \
  X("data.contrast", NUMBER, data.contrast, "color jitter: contrast factor U(1-c, 1+c)",           \
    .n = {0.4})                                                                                    \
  X("data.saturation", NUMBER, data.saturation,                                                    \
    "color jitter: saturation factor U(1-s, 1+s) (no effect on grayscale data)", .n = {0.4})       \
  X("data.hue", NUMBER, data.hue,                                                                  \
    "color jitter: hue shift U(-h, h) (no effect on grayscale data)", .n = {0.1})                  \
  X("data.grayscale_prob", NUMBER, data.grayscale_prob,                                            \
    "target view: random grayscale probability", .n = {0.2})                                       \
  X("data.blur_prob", NUMBER, data.blur_prob, "target view: Gaussian blur probability",            \
    .n = {0.5})                                                                                    \
  X("data.blur_sigma_min", NUMBER, data.blur_sigma_min, "Gaussian blur: smallest radius (px)",     \
    .n = {0.1})                                                                                    \
  X("data.blur_sigma_max", NUMBER, data.blur_sigma_max, "Gaussian blur: largest radius (px)",      \
    .n = {2.0})                                                                                    \
  X("data.max_pixels", INT, data.max_pixels,                                                       \
    "image folders: the largest image decoded (height x width), checked from its header; "         \
    "each data worker needs up to about 11 bytes per pixel of it",                                 \
    .n = {33554432})                                                                               \
  X("mask.kind", STRING, mask.kind,                                                                \
    "block (official CMAE: block x block patch groups) or random (MAE)", .s = "block")             \
  X("mask.ratio", NUMBER, mask.ratio, "fraction of masked tokens (or blocks), in [0, 1)",          \
    .n = {0.65})                                                                                   \
  X("mask.block", INT, mask.block, "block side in patches (block masking only)", .n = {2})         \
  X("encoder.patch", INT, encoder.patch, "patch side in px (overall stride for convvit)",          \
    .n = {16})                                                                                     \
  X("encoder.width", INT, encoder.width, "token width D (convvit: the stage-3 width)", .n = {768}) \
  X("encoder.depth", INT, encoder.depth,                                                           \
    "transformer blocks (convvit uses encoder.stage_depths instead)", .n = {12})                   \
  X("encoder.heads", INT, encoder.heads, "attention heads", .n = {12})                             \
  X("encoder.mlp_ratio", NUMBER, encoder.mlp_ratio, "MLP hidden width / token width", .n = {4})    \
  X("encoder.qkv_bias", BOOL, encoder.qkv_bias, "bias on the qkv projection", .n = {1})            \
  X("encoder.final_norm", BOOL, encoder.final_norm,                                                \
    "final LayerNorm on the online encoder (the target never has one)", .n = {1})                  \
  X("encoder.ln_eps", NUMBER, encoder.ln_eps, "LayerNorm epsilon of the transformer blocks",       \
    .n = {1e-6})                                                                                   \
  X("encoder.stage_widths", INT3, encoder.stage_widths,                                            \
    "convvit: widths of the 3 stages (the last equals encoder.width)", .n = {256, 384, 768})       \
  X("encoder.stage_depths", INT3, encoder.stage_depths,                                            \
    "convvit: blocks per stage (2 conv stages, then the transformer)", .n = {2, 2, 11})            \
  X("encoder.stage_patches", INT3, encoder.stage_patches,                                          \
    "convvit: patch-embedding stride per stage (product = encoder.patch)", .n = {4, 2, 2})         \
  X("pixel_decoder.width", INT, pixel_decoder.width, "pixel decoder token width", .n = {512})      \
  X("pixel_decoder.depth", INT, pixel_decoder.depth, "pixel decoder blocks", .n = {8})             \
  X("pixel_decoder.heads", INT, pixel_decoder.heads, "pixel decoder attention heads", .n = {16})   \
  X("pixel_decoder.mlp_ratio", NUMBER, pixel_decoder.mlp_ratio, "pixel decoder MLP ratio",         \
    .n = {4})                                                                                      \
  X("feature_decoder.enabled", BOOL, feature_decoder.enabled,                                      \
    "feature decoder on (false: ablation without it)", .n = {1})                                   \
  X("feature_decoder.width", INT, feature_decoder.width, "feature decoder token width",            \
    .n = {512})                                                                                    \
  X("feature_decoder.depth", INT, feature_decoder.depth, "feature decoder blocks", .n = {2})       \
  X("feature_decoder.heads", INT, feature_decoder.heads, "feature decoder attention heads",        \
    .n = {16})                                                                                     \
  X("feature_decoder.mlp_ratio", NUMBER, feature_decoder.mlp_ratio, "feature decoder MLP ratio",   \
    .n = {4})                                                                                      \
  X("projector.hidden", INT, projector.hidden, "projector hidden width (Linear, BN, ReLU)",        \
    .n = {1536})                                                                                   \
  X("projector.out", INT, projector.out, "projector output width", .n = {256})                     \
  X("projector.bn_eps", NUMBER, projector.bn_eps, "projector BatchNorm epsilon", .n = {1e-6})      \
  X("predictor.hidden", INT, predictor.hidden, "predictor hidden width (Linear, BN, ReLU)",        \
    .n = {1536})                                                                                   \
  X("predictor.out", INT, predictor.out, "predictor output width", .n = {256})                     \
  X("predictor.bn_eps", NUMBER, predictor.bn_eps, "predictor BatchNorm epsilon", .n = {1e-6})      \
  X("loss.rc_weight", NUMBER, loss.rc_weight, "weight of the reconstruction loss", .n = {1})       \
  X("loss.ct_weight", NUMBER, loss.ct_weight,                                                      \
    "weight of the contrastive loss (applied on top of the 2 tau factor)", .n = {1})               \
  X("loss.temperature", NUMBER, loss.temperature, "InfoNCE temperature tau", .n = {0.07})          \
  X("loss.norm_pix", BOOL, loss.norm_pix, "normalize each target patch before the MSE", .n = {1})  \
  X("loss.norm_pix_eps", NUMBER, loss.norm_pix_eps, "epsilon of the per-patch normalization",      \
    .n = {1e-6})                                                                                   \
  X("optimizer.base_lr", NUMBER, optimizer.base_lr, "AdamW base lr; lr = base_lr * batch / 256",   \
    .n = {1.5e-4})                                                                                 \
  X("optimizer.batch", INT, optimizer.batch, "global batch size", .n = {4096})                     \
  X("optimizer.weight_decay", NUMBER, optimizer.weight_decay, "AdamW weight decay", .n = {0.05})   \
  X("optimizer.beta1", NUMBER, optimizer.beta1, "AdamW beta1", .n = {0.9})                         \
  X("optimizer.beta2", NUMBER, optimizer.beta2, "AdamW beta2", .n = {0.95})                        \
  X("optimizer.eps", NUMBER, optimizer.eps, "AdamW epsilon", .n = {1e-8})                          \
  X("optimizer.clip_norm", NUMBER, optimizer.clip_norm, "gradient-norm clipping (0: none)",        \
    .n = {0})                                                                                      \
  X("schedule.epochs", INT, schedule.epochs, "training epochs", .n = {300})                        \
  X("schedule.warmup_epochs", INT, schedule.warmup_epochs, "linear warmup epochs", .n = {40})      \
  X("schedule.warmup_start_factor", NUMBER, schedule.warmup_start_factor,                          \
    "lr factor at the start of the warmup", .n = {1e-4})                                           \
  X("schedule.min_lr", NUMBER, schedule.min_lr, "lr at the end of the cosine decay", .n = {0})     \
  X("schedule.momentum_base", NUMBER, schedule.momentum_base, "EMA momentum at the start",         \
    .n = {0.996})                                                                                  \
  X("schedule.momentum_end", NUMBER, schedule.momentum_end,                                        \
    "EMA momentum at the end (cosine ramp between the two)", .n = {0.996})                         \
  X("train.seed", INT, train.seed, "run seed: param init, views, masks, shuffling", .n = {0})      \
  X("train.views", STRING, train.views,                                                            \
    "views: shift (CMAE) or rrc (independent random resized crops, ablation)", .s = "shift")       \
  X("train.workers", INT, train.workers, "data loader threads", .n = {2})                          \
  X("train.ckpt_every", INT, train.ckpt_every,                                                     \
    "steps between checkpoints (0: only at the end of the run)", .n = {0})                         \
  X("train.limit", INT, train.limit,                                                               \
    "train on this many images of the split, spread evenly over it (0: all)", .n = {0})            \
  X("train.precision", STRING, train.precision,                                                    \
    "auto (bf16 on CUDA, f32 on the CPU and ref), f32, bf16 or f16: the contractions' operands",   \
    .s = "auto")                                                                                   \
  X("train.loss_scale", STRING, train.loss_scale,                                                  \
    "auto (dynamic for f16, else off), dynamic, off or a fixed positive number", .s = "auto",      \
    .number_as_text = true)                                                                        \
  X("train.loss_scale_growth", INT, train.loss_scale_growth,                                       \
    "dynamic loss scaling: good steps before the scale doubles", .n = {2000})

typedef struct key_entry {
  const char *key;
  key_type type;
  size_t offset, size;
  key_default def;
} key_entry;

#define FIELD_SIZE(field) sizeof(((cm_model_config *)0)->field)
#define ENTRY(k, t, field, doc, ...)                                                               \
  {k, KT_##t, offsetof(cm_model_config, field), FIELD_SIZE(field), {__VA_ARGS__}},
#define PUBLIC_ENTRY(k, t, field, doc, ...) {k, KT_NAME_##t, doc},

static const key_entry key_table[] = {MODEL_KEYS(ENTRY)};
static const cm_model_key public_keys[] = {MODEL_KEYS(PUBLIC_ENTRY)};
#define N_KEYS ((int)(sizeof key_table / sizeof key_table[0]))

/* Longest "extends" chain; deeper is almost surely a mistake. */
#define MAX_EXTENDS_DEPTH 16

int cm_model_config_keys(const cm_model_key **keys) {
  if (keys) *keys = public_keys;
  return N_KEYS;
}

/* ---- small helpers ------------------------------------------------------ */

/* User text shown in a message: control bytes become '?' so the message stays
 * one line, and long text is shortened. */
static const char *shown(const char *s, char *buf, size_t size) {
  size_t n = 0;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (n + 4 >= size) {
      memcpy(buf + n, "...", 3);
      n += 3;
      break;
    }
    buf[n++] = (char)(*p < 0x20 || *p == 0x7f ? '?' : *p);
  }
  buf[n] = '\0';
  return buf;
}

/* A JSON value as it appears in a message: `"six"`, `6.5`, `[1,2]`. */
static const char *json_shown(const cJSON *item, char *buf, size_t size) {
  char *text = cJSON_PrintUnformatted(item);
  if (!text) {
    snprintf(buf, size, "a value");
    return buf;
  }
  shown(text, buf, size);
  free(text);
  return buf;
}

static const key_entry *find_key(const char *key) {
  for (int i = 0; i < N_KEYS; i++)
    if (strcmp(key_table[i].key, key) == 0) return &key_table[i];
  return NULL;
}

/* Whether name is a component ("encoder"): the part before '.' of some key. */
static bool is_component(const char *name) {
  size_t n = strlen(name);
  for (int i = 0; i < N_KEYS; i++)
    if (strncmp(key_table[i].key, name, n) == 0 && key_table[i].key[n] == '.') return true;
  return false;
}

/* Edit distance with adjacent transpositions (so "dpeth" is one edit from "depth"). */
static int edit_distance(const char *a, const char *b) {
  enum { MAX = 64 };
  size_t la = strlen(a), lb = strlen(b);
  if (la >= MAX || lb >= MAX) return MAX;
  int d[MAX + 1][MAX + 1];
  for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
  for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
  for (size_t i = 1; i <= la; i++) {
    for (size_t j = 1; j <= lb; j++) {
      int cost = a[i - 1] != b[j - 1];
      int best = d[i - 1][j] + 1;
      if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
      if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
          d[i - 2][j - 2] + 1 < best)
        best = d[i - 2][j - 2] + 1;
      d[i][j] = best;
    }
  }
  return d[la][lb];
}

/* Writes to out the key or component name closest to an unknown key, if close
 * enough to be a typo; returns whether there is one. */
static bool did_you_mean(const char *unknown, char *out, size_t size) {
  size_t len = strlen(unknown);
  int limit = len < 6 ? 1 : len < 12 ? 2 : 3, best = limit + 1;
  char candidate[64];
  for (int i = 0; i < N_KEYS; i++) {
    const char *k = key_table[i].key;
    const char *dot = strchr(k, '.');
    /* The key itself, then its component ("encoder"). */
    for (int part = 0; part < (dot ? 2 : 1); part++) {
      size_t n = part ? (size_t)(dot - k) : strlen(k);
      if (n >= sizeof candidate) continue;
      memcpy(candidate, k, n);
      candidate[n] = '\0';
      int d = edit_distance(unknown, candidate);
      if (d < best) {
        best = d;
        snprintf(out, size, "%s", candidate);
      }
    }
  }
  return best <= limit;
}

static cm_status unknown_key(const char *key, cm_err *err) {
  char kb[160], guess[64];
  if (!did_you_mean(key, guess, sizeof guess))
    return cm_errorf(err, CM_EINVALID, "%s: unknown key", shown(key, kb, sizeof kb));
  return cm_errorf(err, CM_EINVALID, "%s: unknown key (did you mean %s?)",
                   shown(key, kb, sizeof kb), guess);
}

/* ---- values -------------------------------------------------------------- */

/* cJSON reads a number beyond double range (1e400) as an infinity, and prints it as null. */
static cm_status out_of_range(const cJSON *item, const char *what, cm_err *err) {
  if (cJSON_IsNumber(item) && !isfinite(item->valuedouble))
    return cm_errorf(err, CM_EINVALID, "%s: the number is out of range (magnitude over 1.8e308)",
                     what);
  return CM_OK;
}

static cm_status json_to_int(const cJSON *item, const char *what, int *out, cm_err *err) {
  char vb[96];
  if (out_of_range(item, what, err)) return CM_EINVALID;
  if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) ||
      item->valuedouble != floor(item->valuedouble))
    return cm_errorf(err, CM_EINVALID, "%s: expected an integer, got %s", what,
                     json_shown(item, vb, sizeof vb));
  double v = item->valuedouble;
  if (v < -2147483648.0 || v > 2147483647.0)
    return cm_errorf(err, CM_EINVALID, "%s: %s is out of the int range", what,
                     json_shown(item, vb, sizeof vb));
  *out = (int)v;
  return CM_OK;
}

static cm_status json_to_number(const cJSON *item, const char *what, double *out, cm_err *err) {
  char vb[96];
  if (out_of_range(item, what, err)) return CM_EINVALID;
  if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble))
    return cm_errorf(err, CM_EINVALID, "%s: expected a number, got %s", what,
                     json_shown(item, vb, sizeof vb));
  *out = item->valuedouble;
  return CM_OK;
}

static cJSON *exact_number(double v);

/* Stores a JSON value into the field of entry e; c is unchanged on error. */
static cm_status apply_value(cm_model_config *c, const key_entry *e, const cJSON *item,
                             cm_err *err) {
  char *field = (char *)c + e->offset;
  char vb[96];
  switch (e->type) {
  case KT_INT: {
    int v = 0;
    cm_status st = json_to_int(item, e->key, &v, err);
    if (st) return st;
    memcpy(field, &v, sizeof v);
    return CM_OK;
  }
  case KT_NUMBER: {
    double v = 0;
    cm_status st = json_to_number(item, e->key, &v, err);
    if (st) return st;
    memcpy(field, &v, sizeof v);
    return CM_OK;
  }
  case KT_BOOL: {
    if (!cJSON_IsBool(item))
      return cm_errorf(err, CM_EINVALID, "%s: expected true or false, got %s", e->key,
                       json_shown(item, vb, sizeof vb));
    bool v = cJSON_IsTrue(item);
    memcpy(field, &v, sizeof v);
    return CM_OK;
  }
  case KT_STRING: {
    if (e->def.number_as_text && cJSON_IsNumber(item)) {
      if (out_of_range(item, e->key, err)) return CM_EINVALID;
      cJSON *text = exact_number(item->valuedouble);
      cm_status st = text && cJSON_IsRaw(text) && strlen(text->valuestring) < e->size
                         ? CM_OK
                         : cm_errorf(err, CM_EINVALID, "%s: %s cannot be stored", e->key,
                                     json_shown(item, vb, sizeof vb));
      if (!st) snprintf(field, e->size, "%s", text->valuestring);
      cJSON_Delete(text);
      return st;
    }
    if (!cJSON_IsString(item))
      return cm_errorf(err, CM_EINVALID, "%s: expected a string, got %s", e->key,
                       json_shown(item, vb, sizeof vb));
    size_t n = strlen(item->valuestring);
    if (n >= e->size)
      return cm_errorf(err, CM_EINVALID, "%s: %s is too long (%zu bytes, at most %zu)", e->key,
                       json_shown(item, vb, sizeof vb), n, e->size - 1);
    memset(field, 0, e->size);
    memcpy(field, item->valuestring, n);
    return CM_OK;
  }
  case KT_INT3:
  case KT_NUMBER3: {
    bool ints = e->type == KT_INT3;
    if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) != 3)
      return cm_errorf(err, CM_EINVALID, "%s: expected an array of 3 %s, got %s", e->key,
                       ints ? "integers" : "numbers", json_shown(item, vb, sizeof vb));
    int iv[3] = {0};
    double dv[3] = {0};
    char what[96];
    for (int i = 0; i < 3; i++) {
      snprintf(what, sizeof what, "%s[%d]", e->key, i);
      const cJSON *el = cJSON_GetArrayItem(item, i);
      cm_status st =
          ints ? json_to_int(el, what, &iv[i], err) : json_to_number(el, what, &dv[i], err);
      if (st) return st;
    }
    if (ints)
      memcpy(field, iv, sizeof iv);
    else
      memcpy(field, dv, sizeof dv);
    return CM_OK;
  }
  }
  return cm_errorf(err, CM_EINTERNAL, "%s: unknown key type", e->key);
}

void cm_model_config_default(cm_model_config *c) {
  memset(c, 0, sizeof *c);
  for (int i = 0; i < N_KEYS; i++) {
    const key_entry *e = &key_table[i];
    char *field = (char *)c + e->offset;
    switch (e->type) {
    case KT_INT: *(int *)field = (int)e->def.n[0]; break;
    case KT_NUMBER: *(double *)field = e->def.n[0]; break;
    case KT_BOOL: *(bool *)field = e->def.n[0] != 0; break;
    case KT_STRING: snprintf(field, e->size, "%s", e->def.s); break;
    case KT_INT3:
      for (int j = 0; j < 3; j++) ((int *)field)[j] = (int)e->def.n[j];
      break;
    case KT_NUMBER3:
      for (int j = 0; j < 3; j++) ((double *)field)[j] = e->def.n[j];
      break;
    }
  }
  /* Not a key: the reconstruction loss always needs the pixel decoder. */
  c->pixel_decoder.enabled = true;
}

/* ---- files ---------------------------------------------------------------- */

/* Which member of one layer (a file, or the --set flags) set each key, in which
 * form: a key may be written dotted ("encoder.depth") or inside its section
 * ("encoder": {"depth": ...}), and one layer setting it both ways is ambiguous. */
enum { FORM_NONE, FORM_DOTTED, FORM_SECTION };
typedef struct key_setters {
  unsigned char form[N_KEYS];
  char by[N_KEYS][200]; /* the setter as shown: "\"encoder.depth\": 4", "--set encoder={...}" */
  bool conflict;        /* the last error was a key set twice (its message names both) */
} key_setters;

static cm_status record_setter(key_setters *ks, const key_entry *e, int form, const char *by,
                               cm_err *err) {
  if (!ks) return CM_OK;
  int i = (int)(e - key_table);
  if (ks->form[i] != FORM_NONE && ks->form[i] != form) {
    const char *dotted = form == FORM_DOTTED ? by : ks->by[i];
    const char *section = form == FORM_SECTION ? by : ks->by[i];
    ks->conflict = true;
    return cm_errorf(err, CM_EINVALID, "%s: set twice, as %s and in %s (keep one)", e->key, dotted,
                     section);
  }
  ks->form[i] = (unsigned char)form;
  snprintf(ks->by[i], sizeof ks->by[i], "%s", by);
  return CM_OK;
}

/* "encoder: a section, not a key: ..." naming the section's keys. */
static cm_status not_a_key(const char *name, const cJSON *got, cm_err *err) {
  char keys[700], nb[64], vb[96];
  size_t used = 0, n = strlen(name);
  keys[0] = '\0';
  for (int i = 0; i < N_KEYS && used + 40 < sizeof keys; i++)
    if (strncmp(key_table[i].key, name, n) == 0 && key_table[i].key[n] == '.')
      used += (size_t)snprintf(keys + used, sizeof keys - used, "%s%s", used ? ", " : "",
                               key_table[i].key + n + 1);
  shown(name, nb, sizeof nb);
  return cm_errorf(
      err, CM_EINVALID,
      "%s: a section, not a key: set one of its keys (%s) as %s.KEY, or give an object "
      "of them; got %s",
      nb, keys, nb, json_shown(got, vb, sizeof vb));
}

/* The keys of a section object ("encoder": {"depth": 6}); by shows the setter. */
static cm_status apply_section(cm_model_config *c, const char *name, const cJSON *obj,
                               key_setters *ks, const char *by, cm_err *err) {
  char kb[160];
  if (!cJSON_IsObject(obj)) return not_a_key(name, obj, err);
  for (const cJSON *m = obj->child; m; m = m->next) {
    for (const cJSON *prev = obj->child; prev != m; prev = prev->next)
      if (strcmp(prev->string, m->string) == 0)
        return cm_errorf(err, CM_EINVALID, "%s.%s: duplicate key", name,
                         shown(m->string, kb, sizeof kb));
    char full[256];
    snprintf(full, sizeof full, "%s.%s", name, m->string);
    const key_entry *e = find_key(full);
    if (!e) return unknown_key(full, err);
    cm_status st = apply_value(c, e, m, err);
    if (!st) st = record_setter(ks, e, FORM_SECTION, by, err);
    if (st) return st;
  }
  return CM_OK;
}

/* One member of a variant file: a key, or a component object of keys. */
static cm_status apply_member(cm_model_config *c, const cJSON *member, key_setters *ks,
                              cm_err *err) {
  char by[200], nb[96], vb[96];
  const char *name = member->string;
  snprintf(by, sizeof by, "\"%s\": %s", shown(name, nb, sizeof nb),
           json_shown(member, vb, sizeof vb));
  const key_entry *e = find_key(name);
  if (e) {
    cm_status st = apply_value(c, e, member, err);
    return st ? st : record_setter(ks, e, FORM_DOTTED, by, err);
  }
  if (!is_component(name)) return unknown_key(name, err);
  return apply_section(c, name, member, ks, by, err);
}

/* The path of "extends" target, relative to the directory of the including file. */
static char *relative_to(const char *including, const char *target) {
  const char *slash = strrchr(including, '/');
  size_t dir = target[0] == '/' || !slash ? 0 : (size_t)(slash - including) + 1;
  size_t n = strlen(target);
  char *out = malloc(dir + n + 1);
  if (!out) return NULL;
  memcpy(out, including, dir);
  memcpy(out + dir, target, n + 1);
  return out;
}

typedef struct extends_chain {
  int n;
  const char *shown[MAX_EXTENDS_DEPTH + 1]; /* paths as written */
  char *real[MAX_EXTENDS_DEPTH + 1];        /* canonical, to detect cycles */
} extends_chain;

static cm_status load_file(const char *path, extends_chain *chain, cm_model_config *c, cm_err *err);

/* Resolves "extends" of the file at path (already on the chain) into c. */
static cm_status load_base(const char *path, const cJSON *extends, extends_chain *chain,
                           cm_model_config *c, cm_err *err) {
  char vb[96], pb[256];
  if (!cJSON_IsString(extends))
    return cm_errorf(err, CM_EINVALID, "%s: extends: expected a file name, got %s", path,
                     json_shown(extends, vb, sizeof vb));
  if (!extends->valuestring[0])
    return cm_errorf(err, CM_EINVALID, "%s: extends: must name a file, got \"\"", path);
  char *base = relative_to(path, extends->valuestring);
  if (!base) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  char *real = realpath(base, NULL);
  cm_status st = CM_OK;
  if (!real) {
    st = cm_errorf(err, CM_EINVALID, "%s: extends: cannot open %s: %s", path,
                   shown(base, pb, sizeof pb), strerror(errno));
  } else {
    for (int i = 0; i < chain->n && !st; i++) {
      if (strcmp(chain->real[i], real) != 0) continue;
      char msg[sizeof err->msg], cycle[sizeof err->msg];
      size_t len = 0;
      for (int j = i; j <= chain->n && len < sizeof msg; j++)
        len += (size_t)snprintf(msg + len, sizeof msg - len, j < chain->n ? "%s -> " : "%s",
                                j < chain->n ? chain->shown[j] : base);
      st = cm_errorf(err, CM_EINVALID, "%s: extends: cycle %s", path,
                     shown(msg, cycle, sizeof cycle));
    }
    if (!st && chain->n > MAX_EXTENDS_DEPTH)
      st = cm_errorf(err, CM_EINVALID, "%s: extends: chain longer than %d files", path,
                     MAX_EXTENDS_DEPTH);
    if (!st) st = load_file(base, chain, c, err);
  }
  free(real);
  free(base);
  return st;
}

static cm_status load_file(const char *path, extends_chain *chain, cm_model_config *c,
                           cm_err *err) {
  char *real = realpath(path, NULL);
  if (!real) return cm_errorf(err, CM_EINVALID, "%s: cannot open: %s", path, strerror(errno));
  chain->shown[chain->n] = path;
  chain->real[chain->n] = real;
  chain->n++;

  char *text = NULL;
  size_t len = 0;
  cJSON *root = NULL;
  key_setters *setters = NULL;
  cm_status st = cm_read_file(path, &text, &len, err);
  if (st) goto done;
  if (memchr(text, '\0', len)) {
    st = cm_errorf(err, CM_EINVALID, "%s: NUL byte in the file", path);
    goto done;
  }
  const char *end = NULL;
  root = cJSON_ParseWithLengthOpts(text, len + 1, &end, 1);
  if (!root) {
    int line, col;
    size_t at = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    if (!end) {
      const char *ep = cJSON_GetErrorPtr();
      at = ep && ep >= text && ep <= text + len ? (size_t)(ep - text) : 0;
    }
    cm_text_line_col(text, at, &line, &col);
    st = cm_errorf(err, CM_EINVALID, "%s: JSON syntax error near line %d column %d", path, line,
                   col);
    goto done;
  }
  if (!cJSON_IsObject(root)) {
    st = cm_errorf(err, CM_EINVALID, "%s: expected a JSON object of hyper-parameters", path);
    goto done;
  }
  for (const cJSON *m = root->child; m; m = m->next) {
    for (const cJSON *prev = root->child; prev != m; prev = prev->next) {
      if (strcmp(prev->string, m->string) == 0) {
        char kb[160];
        st = cm_errorf(err, CM_EINVALID, "%s: %s: duplicate key", path,
                       shown(m->string, kb, sizeof kb));
        goto done;
      }
    }
  }
  const cJSON *extends = cJSON_GetObjectItemCaseSensitive(root, "extends");
  if (extends) {
    st = load_base(path, extends, chain, c, err);
    if (st) goto done;
  } else {
    cm_model_config_default(c);
  }
  setters = calloc(1, sizeof *setters);
  if (!setters) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
    goto done;
  }
  for (const cJSON *m = root->child; m; m = m->next) {
    if (strcmp(m->string, "extends") == 0) continue;
    st = apply_member(c, m, setters, err);
    if (st) {
      cm_err_prefix(err, "%s: ", path);
      goto done;
    }
  }
done:
  free(setters);
  cJSON_Delete(root);
  free(text);
  chain->n--;
  free(chain->real[chain->n]);
  return st;
}

static cm_status config_set(cm_model_config *c, const char *assignment, key_setters *ks,
                            cm_err *err);

cm_status cm_model_config_load(const char *path, const char *const *overrides, int n_overrides,
                               cm_model_config *out, cm_err *err) {
  cm_err local;
  if (!err) err = &local;
  cm_model_config c;
  extends_chain chain = {0};
  cm_status st = load_file(path, &chain, &c, err);
  if (st) return st;
  key_setters *setters = n_overrides > 0 ? calloc(1, sizeof *setters) : NULL;
  if (n_overrides > 0 && !setters) return cm_errorf(err, CM_EINTERNAL, "--set: out of memory");
  for (int i = 0; i < n_overrides && !st; i++) st = config_set(&c, overrides[i], setters, err);
  free(setters);
  if (st) return st;
  if ((st = cm_model_config_validate(&c, err))) {
    cm_err_prefix(err, "%s: ", path);
    return st;
  }
  *out = c;
  return CM_OK;
}

/* ---- --set ----------------------------------------------------------------- */

/* One --set; setters (may be NULL) records the keys it sets and their form. */
static cm_status config_set(cm_model_config *c, const char *assignment, key_setters *ks,
                            cm_err *err) {
  cm_err local;
  if (!err) err = &local;
  char ab[256], by[200];
  const char *eq = strchr(assignment, '=');
  if (!eq || eq == assignment)
    return cm_errorf(err, CM_EINVALID, "--set %s: expected KEY=VALUE",
                     shown(assignment, ab, sizeof ab));
  char key[128];
  size_t klen = (size_t)(eq - assignment);
  if (klen >= sizeof key) klen = sizeof key - 1;
  memcpy(key, assignment, klen);
  key[klen] = '\0';
  const char *text = eq + 1;
  snprintf(by, sizeof by, "--set %s", shown(assignment, ab, sizeof ab));
  cm_status st;
  const key_entry *e = find_key(key);
  if (!e && is_component(key)) {
    /* a section: a JSON object of its keys, applied to a copy so a failure changes nothing */
    cJSON *value = cJSON_ParseWithOpts(text, NULL, 1);
    if (!value) value = cJSON_CreateString(text);
    if (!value) return cm_errorf(err, CM_EINTERNAL, "--set: out of memory");
    cm_model_config copy = *c;
    st = apply_section(&copy, key, value, ks, by, err);
    if (!st) *c = copy;
    cJSON_Delete(value);
  } else if (!e) {
    st = unknown_key(key, err);
  } else {
    cJSON *value = cJSON_ParseWithOpts(text, NULL, 1);
    /* Not JSON (or a non-string for a string key): the text itself, as a string. */
    if (!value || (e->type == KT_STRING && !cJSON_IsString(value))) {
      cJSON_Delete(value);
      value = cJSON_CreateString(text);
      if (!value) return cm_errorf(err, CM_EINTERNAL, "--set: out of memory");
    }
    st = apply_value(c, e, value, err);
    if (!st) st = record_setter(ks, e, FORM_DOTTED, by, err);
    cJSON_Delete(value);
  }
  /* a conflict between two flags names both itself */
  if (st && !(ks && ks->conflict))
    cm_err_prefix(err, "--set %s: ", shown(assignment, ab, sizeof ab));
  return st;
}

cm_status cm_model_config_set(cm_model_config *c, const char *assignment, cm_err *err) {
  return config_set(c, assignment, NULL, err);
}

/* ---- validation ------------------------------------------------------------ */

static bool one_of(const char *s, const char *const *options, int n) {
  for (int i = 0; i < n; i++)
    if (strcmp(s, options[i]) == 0) return true;
  return false;
}

/* Visible tokens of one sample, as the official masking computes them
 * (int(L (1 - ratio)) on the patch or block grid). */
static long visible_tokens(const cm_model_config *c, int grid) {
  bool block = strcmp(c->mask.kind, "block") == 0;
  long cells = block ? (long)(grid / c->mask.block) * (grid / c->mask.block) : (long)grid * grid;
  long keep = (long)((double)cells * (1.0 - c->mask.ratio));
  return block ? keep * c->mask.block * c->mask.block : keep;
}

#define POSITIVE_INT(field, key)                                                                   \
  if (c->field < 1)                                                                                \
  return cm_errorf(err, CM_EINVALID, "%s: must be positive, got %d", key, c->field)
#define POSITIVE_NUM(field, key)                                                                   \
  if (!(c->field > 0))                                                                             \
  return cm_errorf(err, CM_EINVALID, "%s: must be positive, got %g", key, c->field)
#define NONNEGATIVE_NUM(field, key)                                                                \
  if (!(c->field >= 0))                                                                            \
  return cm_errorf(err, CM_EINVALID, "%s: must not be negative, got %g", key, c->field)
#define PROBABILITY(field, key)                                                                    \
  if (!(c->field >= 0 && c->field <= 1))                                                           \
  return cm_errorf(err, CM_EINVALID, "%s: %g is not a probability in [0, 1]", key, c->field)

/* One transformer stack: dims, heads dividing the width, a sin-cos-compatible width,
 * and an integer MLP width. */
static cm_status check_transformer(const char *part, int width, int depth, int heads,
                                   double mlp_ratio, bool need_sincos, cm_err *err) {
  if (width < 1)
    return cm_errorf(err, CM_EINVALID, "%s.width: must be positive, got %d", part, width);
  if (depth < 1)
    return cm_errorf(err, CM_EINVALID, "%s.depth: must be positive, got %d", part, depth);
  if (heads < 1)
    return cm_errorf(err, CM_EINVALID, "%s.heads: must be positive, got %d", part, heads);
  if (width % heads)
    return cm_errorf(err, CM_EINVALID, "%s.heads: %d does not divide %s.width %d", part, heads,
                     part, width);
  if (need_sincos && width % 4)
    return cm_errorf(err, CM_EINVALID,
                     "%s.width: %d is not divisible by 4 (2-D sin-cos position embedding)", part,
                     width);
  if (!(mlp_ratio > 0))
    return cm_errorf(err, CM_EINVALID, "%s.mlp_ratio: must be positive, got %g", part, mlp_ratio);
  double hidden = width * mlp_ratio;
  if (hidden != floor(hidden) || hidden > 1e9)
    return cm_errorf(err, CM_EINVALID, "%s.mlp_ratio: %s.width %d x %g is not a whole MLP width",
                     part, part, width, mlp_ratio);
  return CM_OK;
}

/* The data.* keys. */
static cm_status validate_data(const cm_model_config *c, cm_err *err) {
  static const char *const datasets[] = {"imagenet", "fashion-mnist", "folder"};
  char sb[96];
  if (!one_of(c->data.dataset, datasets, 3))
    return cm_errorf(err, CM_EINVALID,
                     "data.dataset: \"%s\" is not one of imagenet, fashion-mnist, folder",
                     shown(c->data.dataset, sb, sizeof sb));
  POSITIVE_INT(data.image_size, "data.image_size");
  if (c->data.in_chans != 1 && c->data.in_chans != 3)
    return cm_errorf(err, CM_EINVALID, "data.in_chans: must be 1 or 3, got %d", c->data.in_chans);
  POSITIVE_INT(data.master_size, "data.master_size");
  if (c->data.shift < 0)
    return cm_errorf(err, CM_EINVALID, "data.shift: must not be negative, got %d", c->data.shift);
  if ((long)c->data.shift + c->data.image_size > c->data.master_size)
    return cm_errorf(err, CM_EINVALID,
                     "data.shift: %d + data.image_size %d exceeds data.master_size %d",
                     c->data.shift, c->data.image_size, c->data.master_size);
  for (int i = 0; i < c->data.in_chans; i++) {
    if (!(c->data.std[i] > 0))
      return cm_errorf(err, CM_EINVALID, "data.std[%d]: must be positive, got %g", i,
                       c->data.std[i]);
  }
  if (!(c->data.crop_scale_min > 0 && c->data.crop_scale_min <= c->data.crop_scale_max &&
        c->data.crop_scale_max <= 1))
    return cm_errorf(err, CM_EINVALID,
                     "data.crop_scale_min: need 0 < data.crop_scale_min %g <= data.crop_scale_max "
                     "%g <= 1",
                     c->data.crop_scale_min, c->data.crop_scale_max);
  PROBABILITY(data.flip_prob, "data.flip_prob");
  PROBABILITY(data.jitter_prob, "data.jitter_prob");
  PROBABILITY(data.grayscale_prob, "data.grayscale_prob");
  PROBABILITY(data.blur_prob, "data.blur_prob");
  if (!(c->data.brightness >= 0 && c->data.brightness <= 1))
    return cm_errorf(err, CM_EINVALID, "data.brightness: %g is outside [0, 1]", c->data.brightness);
  if (!(c->data.contrast >= 0 && c->data.contrast <= 1))
    return cm_errorf(err, CM_EINVALID, "data.contrast: %g is outside [0, 1]", c->data.contrast);
  if (!(c->data.saturation >= 0 && c->data.saturation <= 1))
    return cm_errorf(err, CM_EINVALID, "data.saturation: %g is outside [0, 1]", c->data.saturation);
  if (!(c->data.hue >= 0 && c->data.hue <= 0.5))
    return cm_errorf(err, CM_EINVALID, "data.hue: %g is outside [0, 0.5]", c->data.hue);
  POSITIVE_INT(data.max_pixels, "data.max_pixels");
  if (!(c->data.blur_sigma_min > 0 && c->data.blur_sigma_min <= c->data.blur_sigma_max))
    return cm_errorf(err, CM_EINVALID,
                     "data.blur_sigma_min: need 0 < data.blur_sigma_min %g <= "
                     "data.blur_sigma_max %g",
                     c->data.blur_sigma_min, c->data.blur_sigma_max);
  return CM_OK;
}

/* ConvViT's three stages: widths, depths, patch sizes multiplying to encoder.patch. */
static cm_status validate_convvit_stages(const cm_model_config *c, cm_err *err) {
  long product = 1;
  for (int s = 0; s < CM_MODEL_MAX_STAGES; s++) {
    if (c->encoder.stage_widths[s] < 1)
      return cm_errorf(err, CM_EINVALID, "encoder.stage_widths[%d]: must be positive, got %d", s,
                       c->encoder.stage_widths[s]);
    if (c->encoder.stage_depths[s] < 0)
      return cm_errorf(err, CM_EINVALID, "encoder.stage_depths[%d]: must not be negative, got %d",
                       s, c->encoder.stage_depths[s]);
    if (c->encoder.stage_patches[s] < 1)
      return cm_errorf(err, CM_EINVALID, "encoder.stage_patches[%d]: must be positive, got %d", s,
                       c->encoder.stage_patches[s]);
    product *= c->encoder.stage_patches[s];
  }
  if (c->encoder.stage_depths[2] < 1)
    return cm_errorf(err, CM_EINVALID,
                     "encoder.stage_depths[2]: the transformer stage needs a block, got %d",
                     c->encoder.stage_depths[2]);
  if (product != c->encoder.patch)
    return cm_errorf(err, CM_EINVALID,
                     "encoder.stage_patches: product %d x %d x %d = %ld is not encoder.patch %d",
                     c->encoder.stage_patches[0], c->encoder.stage_patches[1],
                     c->encoder.stage_patches[2], product, c->encoder.patch);
  if (c->encoder.stage_widths[2] != c->encoder.width)
    return cm_errorf(err, CM_EINVALID, "encoder.stage_widths[2]: %d is not encoder.width %d",
                     c->encoder.stage_widths[2], c->encoder.width);
  return CM_OK;
}

/* train.precision and train.loss_scale (cm_model_config_loss_scale reads the latter). */
static cm_status validate_precision(const cm_model_config *c, cm_err *err) {
  static const char *const precisions[] = {"auto", "f32", "bf16", "f16"};
  char sb[96];
  if (!one_of(c->train.precision, precisions, 4))
    return cm_errorf(err, CM_EINVALID, "train.precision: \"%s\" is not one of auto, f32, bf16, f16",
                     shown(c->train.precision, sb, sizeof sb));
  double fixed;
  bool dynamic;
  if (cm_model_config_loss_scale(c, "f32", &dynamic, &fixed, err)) return err->status;
  if (c->train.loss_scale_growth < 1)
    return cm_errorf(err, CM_EINVALID, "train.loss_scale_growth: must be at least 1, got %d",
                     c->train.loss_scale_growth);
  return CM_OK;
}

cm_status cm_model_config_loss_scale(const cm_model_config *c, const char *precision, bool *dynamic,
                                     double *fixed, cm_err *err) {
  const char *s = c->train.loss_scale;
  char sb[96];
  *dynamic = false;
  *fixed = 0;
  if (strcmp(s, "auto") == 0) {
    *dynamic = strcmp(precision, "f16") == 0;
    return CM_OK;
  }
  if (strcmp(s, "dynamic") == 0) {
    *dynamic = true;
    return CM_OK;
  }
  if (strcmp(s, "off") == 0) return CM_OK;
  char *end = NULL;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s || *end || errno || !isfinite(v) || v <= 0)
    return cm_errorf(err, CM_EINVALID,
                     "train.loss_scale: \"%s\" is not auto, dynamic, off or a positive number",
                     shown(s, sb, sizeof sb));
  *fixed = v;
  return CM_OK;
}

cm_status cm_model_config_validate(const cm_model_config *c, cm_err *err) {
  static const char *const archs[] = {"vit", "convvit"};
  static const char *const kinds[] = {"block", "random"};
  char sb[96];
  if (!c->name[0]) return cm_errorf(err, CM_EINVALID, "name: must not be empty");
  if (!one_of(c->arch, archs, 2))
    return cm_errorf(err, CM_EINVALID, "arch: \"%s\" is not one of vit, convvit",
                     shown(c->arch, sb, sizeof sb));
  bool convvit = strcmp(c->arch, "convvit") == 0;

  cm_status st = validate_data(c, err);
  if (st) return st;

  /* encoder */
  POSITIVE_INT(encoder.patch, "encoder.patch");
  st = check_transformer("encoder", c->encoder.width, convvit ? 1 : c->encoder.depth,
                         c->encoder.heads, c->encoder.mlp_ratio, true, err);
  if (st) return st;
  if (c->data.image_size % c->encoder.patch)
    return cm_errorf(err, CM_EINVALID, "encoder.patch: %d does not divide data.image_size %d",
                     c->encoder.patch, c->data.image_size);
  POSITIVE_NUM(encoder.ln_eps, "encoder.ln_eps");
  if (convvit && (st = validate_convvit_stages(c, err))) return st;

  /* mask */
  int grid = c->data.image_size / c->encoder.patch;
  if (!one_of(c->mask.kind, kinds, 2))
    return cm_errorf(err, CM_EINVALID, "mask.kind: \"%s\" is not one of block, random",
                     shown(c->mask.kind, sb, sizeof sb));
  if (!(c->mask.ratio >= 0 && c->mask.ratio < 1))
    return cm_errorf(err, CM_EINVALID, "mask.ratio: %g is outside [0, 1)", c->mask.ratio);
  if (strcmp(c->mask.kind, "block") == 0) {
    POSITIVE_INT(mask.block, "mask.block");
    if (grid % c->mask.block)
      return cm_errorf(err, CM_EINVALID, "mask.block: %d does not divide the %dx%d patch grid",
                       c->mask.block, grid, grid);
  }
  if (visible_tokens(c, grid) < 1)
    return cm_errorf(err, CM_EINVALID,
                     "mask.ratio: %g leaves no visible token on the %dx%d patch grid",
                     c->mask.ratio, grid, grid);

  /* decoders and heads */
  st = check_transformer("pixel_decoder", c->pixel_decoder.width, c->pixel_decoder.depth,
                         c->pixel_decoder.heads, c->pixel_decoder.mlp_ratio, true, err);
  if (st) return st;
  if (c->feature_decoder.enabled) {
    st = check_transformer("feature_decoder", c->feature_decoder.width, c->feature_decoder.depth,
                           c->feature_decoder.heads, c->feature_decoder.mlp_ratio, true, err);
    if (st) return st;
  }
  POSITIVE_INT(projector.hidden, "projector.hidden");
  POSITIVE_INT(projector.out, "projector.out");
  POSITIVE_NUM(projector.bn_eps, "projector.bn_eps");
  POSITIVE_INT(predictor.hidden, "predictor.hidden");
  POSITIVE_INT(predictor.out, "predictor.out");
  POSITIVE_NUM(predictor.bn_eps, "predictor.bn_eps");

  /* loss */
  NONNEGATIVE_NUM(loss.rc_weight, "loss.rc_weight");
  NONNEGATIVE_NUM(loss.ct_weight, "loss.ct_weight");
  POSITIVE_NUM(loss.temperature, "loss.temperature");
  POSITIVE_NUM(loss.norm_pix_eps, "loss.norm_pix_eps");

  /* optimizer and schedule */
  POSITIVE_NUM(optimizer.base_lr, "optimizer.base_lr");
  if (c->optimizer.batch < 1)
    return cm_errorf(err, CM_EINVALID, "optimizer.batch: must be at least 1, got %d",
                     c->optimizer.batch);
  NONNEGATIVE_NUM(optimizer.weight_decay, "optimizer.weight_decay");
  if (!(c->optimizer.beta1 >= 0 && c->optimizer.beta1 < 1))
    return cm_errorf(err, CM_EINVALID, "optimizer.beta1: %g is outside [0, 1)", c->optimizer.beta1);
  if (!(c->optimizer.beta2 >= 0 && c->optimizer.beta2 < 1))
    return cm_errorf(err, CM_EINVALID, "optimizer.beta2: %g is outside [0, 1)", c->optimizer.beta2);
  POSITIVE_NUM(optimizer.eps, "optimizer.eps");
  NONNEGATIVE_NUM(optimizer.clip_norm, "optimizer.clip_norm");
  POSITIVE_INT(schedule.epochs, "schedule.epochs");
  if (c->schedule.warmup_epochs < 0)
    return cm_errorf(err, CM_EINVALID, "schedule.warmup_epochs: must not be negative, got %d",
                     c->schedule.warmup_epochs);
  if (c->schedule.warmup_epochs > c->schedule.epochs)
    return cm_errorf(err, CM_EINVALID, "schedule.warmup_epochs: %d exceeds schedule.epochs %d",
                     c->schedule.warmup_epochs, c->schedule.epochs);
  if (!(c->schedule.warmup_start_factor > 0 && c->schedule.warmup_start_factor <= 1))
    return cm_errorf(err, CM_EINVALID, "schedule.warmup_start_factor: %g is outside (0, 1]",
                     c->schedule.warmup_start_factor);
  NONNEGATIVE_NUM(schedule.min_lr, "schedule.min_lr");
  PROBABILITY(schedule.momentum_base, "schedule.momentum_base");
  PROBABILITY(schedule.momentum_end, "schedule.momentum_end");

  /* train */
  static const char *const views[] = {"shift", "rrc"};
  if (c->train.seed < 0)
    return cm_errorf(err, CM_EINVALID, "train.seed: must not be negative, got %d", c->train.seed);
  if (!one_of(c->train.views, views, 2))
    return cm_errorf(err, CM_EINVALID, "train.views: \"%s\" is not one of shift, rrc",
                     shown(c->train.views, sb, sizeof sb));
  if (c->train.limit < 0)
    return cm_errorf(err, CM_EINVALID, "train.limit: must not be negative, got %d", c->train.limit);
  if (c->train.workers < 1 || c->train.workers > CM_MAX_WORKERS)
    return cm_errorf(err, CM_EINVALID, "train.workers: %d is outside [1, %d]", c->train.workers,
                     CM_MAX_WORKERS);
  if (c->train.ckpt_every < 0)
    return cm_errorf(err, CM_EINVALID, "train.ckpt_every: must not be negative, got %d",
                     c->train.ckpt_every);
  return validate_precision(c, err);
}

/* ---- output ------------------------------------------------------------------ */

/* The shortest decimal that reads back as exactly v (cJSON's own printer
 * treats numbers within an epsilon as equal, which breaks load(to_json(c)) == c),
 * with the exponent written plainly ("1e-6", not "1e-06"). */
static cJSON *exact_number(double v) {
  /* Only an in-memory config can hold these; written as graph JSON does. */
  if (isnan(v)) return cJSON_CreateString("nan");
  if (isinf(v)) return cJSON_CreateString(v > 0 ? "inf" : "-inf");
  char buf[40];
  for (int precision = 1; precision <= 17; precision++) {
    snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (strtod(buf, NULL) == v) break;
  }
  char *e = strchr(buf, 'e');
  if (e) {
    char *digits = e + 1;
    if (*digits == '+') memmove(digits, digits + 1, strlen(digits));
    if (*digits == '-') digits++;
    while (digits[0] == '0' && digits[1]) memmove(digits, digits + 1, strlen(digits));
  }
  return cJSON_CreateRaw(buf);
}

static cJSON *number_array(const double *v, const int *iv, int n) {
  cJSON *a = cJSON_CreateArray();
  for (int i = 0; a && i < n; i++) {
    cJSON *x = iv ? cJSON_CreateNumber(iv[i]) : exact_number(v[i]);
    if (!x || !cJSON_AddItemToArray(a, x)) {
      cJSON_Delete(x);
      cJSON_Delete(a);
      return NULL;
    }
  }
  return a;
}

static cJSON *value_json(const cm_model_config *c, const key_entry *e) {
  const char *field = (const char *)c + e->offset;
  switch (e->type) {
  case KT_INT: return cJSON_CreateNumber(*(const int *)field);
  case KT_NUMBER: return exact_number(*(const double *)field);
  case KT_BOOL: return cJSON_CreateBool(*(const bool *)field);
  case KT_STRING: {
    /* Bounded: an in-memory config might lack the NUL. */
    char buf[256];
    size_t n = strnlen(field, e->size < sizeof buf ? e->size : sizeof buf - 1);
    memcpy(buf, field, n);
    buf[n] = '\0';
    return cJSON_CreateString(buf);
  }
  case KT_INT3: return number_array(NULL, (const int *)field, 3);
  case KT_NUMBER3: return number_array((const double *)field, NULL, 3);
  }
  return NULL;
}

char *cm_model_config_to_json(const cm_model_config *c) {
  cJSON *root = cJSON_CreateObject();
  if (!root) return NULL;
  for (int i = 0; i < N_KEYS; i++) {
    const key_entry *e = &key_table[i];
    cJSON *parent = root;
    const char *leaf = e->key;
    const char *dot = strchr(e->key, '.');
    if (dot) {
      char component[64];
      snprintf(component, sizeof component, "%.*s", (int)(dot - e->key), e->key);
      parent = cJSON_GetObjectItemCaseSensitive(root, component);
      if (!parent) parent = cJSON_AddObjectToObject(root, component);
      leaf = dot + 1;
    }
    cJSON *v = value_json(c, e);
    if (!parent || !v || !cJSON_AddItemToObject(parent, leaf, v)) {
      cJSON_Delete(v);
      cJSON_Delete(root);
      return NULL;
    }
  }
  char *text = cJSON_Print(root);
  cJSON_Delete(root);
  return text;
}
