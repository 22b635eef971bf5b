/* runtime/views.c — the CMAE views and masks of one sample (CMAE.md §1-§2):
 * RandomResizedCrop to the master, shared flip, online (0, 0) crop, shifted
 * target with ColorJitter / RandomGrayscale / GaussianBlur, Normalize, and the
 * token mask. Every draw is Philox(seed; epoch, index, draw). */
#include "frontend/frontend.h"
#include "models/models.h"
#include "runtime/training.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Counter layout: hi = domain << 56 | epoch; lo = index << 24 | sub-stream
 * << 20 | block, so the mask draws never depend on how many draws the
 * augmentations took. */
#define VIEWS_DOMAIN 0x56ull
enum { SUB_VIEWS = 0, SUB_MASK = 1 };

typedef struct rng {
  uint64_t key, hi, lo;
  uint32_t buf[4];
  int pos;
} rng;

static void rng_init(rng *r, uint64_t seed, int64_t epoch, int64_t index, int sub) {
  r->key = seed;
  r->hi = (VIEWS_DOMAIN << 56) ^ (uint64_t)epoch;
  r->lo = ((uint64_t)index << 24) | ((uint64_t)sub << 20);
  r->pos = 4;
}

static uint32_t rng_u32(rng *r) {
  if (r->pos == 4) {
    cm_philox(r->key, r->hi, r->lo++, r->buf);
    r->pos = 0;
  }
  return r->buf[r->pos++];
}

static double rng_unif(rng *r) { /* 53 bits, [0, 1) */
  uint64_t a = rng_u32(r) >> 5, b = rng_u32(r) >> 6;
  return ((double)a * 67108864.0 + (double)b) * (1.0 / 9007199254740992.0);
}

static double rng_range(rng *r, double lo, double hi) {
  return lo + (hi - lo) * rng_unif(r);
}

static int rng_int(rng *r, int lo, int hi) { /* inclusive; 64-bit modulo: bias < 2^-32 */
  uint64_t v = ((uint64_t)rng_u32(r) << 32) | rng_u32(r);
  return lo + (int)(v % (uint64_t)(hi - lo + 1));
}

/* ---- options ------------------------------------------------------------- */

void cm_views_opts_from_config(const struct cm_model_config *c, cm_views_opts *o) {
  memset(o, 0, sizeof *o);
  o->mode = CM_VIEWS_SHIFT;
  o->image_size = c->data.image_size;
  o->master_size = c->data.master_size;
  o->shift = c->data.shift;
  o->in_chans = c->data.in_chans;
  o->patch = c->encoder.patch;
  for (int i = 0; i < 3; i++) {
    o->mean[i] = c->data.mean[i];
    o->std[i] = c->data.std[i];
  }
  o->crop_scale_min = c->data.crop_scale_min;
  o->crop_scale_max = c->data.crop_scale_max;
  o->ratio_min = 3.0 / 4.0;
  o->ratio_max = 4.0 / 3.0;
  o->flip_prob = c->data.flip_prob;
  o->jitter_prob = c->data.jitter_prob;
  o->brightness = c->data.brightness;
  o->contrast = c->data.contrast;
  o->saturation = c->data.saturation;
  o->hue = c->data.hue;
  o->grayscale_prob = c->data.grayscale_prob;
  o->blur_prob = c->data.blur_prob;
  o->blur_sigma_min = c->data.blur_sigma_min;
  o->blur_sigma_max = c->data.blur_sigma_max;
  o->antialias = true;
  o->mask = true;
  snprintf(o->mask_kind, sizeof o->mask_kind, "%s", c->mask.kind);
  o->mask_ratio = c->mask.ratio;
  o->mask_block = c->mask.block;
}

static bool prob_ok(double p) {
  return p >= 0 && p <= 1;
}

cm_status cm_views_check(const cm_views_opts *o, cm_err *err) {
  if (o->mode != CM_VIEWS_SHIFT && o->mode != CM_VIEWS_RRC && o->mode != CM_VIEWS_EVAL)
    return cm_errorf(err, CM_EINVALID, "views: mode %d is not shift, rrc or eval", (int)o->mode);
  if (o->in_chans != 1 && o->in_chans != 3)
    return cm_errorf(err, CM_EINVALID, "views: in_chans %d must be 1 or 3", o->in_chans);
  if (o->image_size < 1 || o->image_size > 4096)
    return cm_errorf(err, CM_EINVALID, "views: image_size %d out of [1, 4096]", o->image_size);
  if (o->mode == CM_VIEWS_SHIFT) {
    if (o->shift < 0 || o->master_size > 4096 || (int64_t)o->shift + o->image_size > o->master_size)
      return cm_errorf(err, CM_EINVALID,
                       "views: shift %d + image_size %d must be <= master_size %d (and shift >= 0)",
                       o->shift, o->image_size, o->master_size);
  }
  for (int c = 0; c < o->in_chans; c++)
    if (!(o->std[c] > 0) || !isfinite(o->mean[c]))
      return cm_errorf(err, CM_EINVALID, "views: std[%d] = %g must be > 0, mean finite", c,
                       o->std[c]);
  if (o->mode == CM_VIEWS_EVAL) return CM_OK;
  if (!(o->crop_scale_min > 0 && o->crop_scale_min <= o->crop_scale_max &&
        o->crop_scale_max <= 1) ||
      !(o->ratio_min > 0 && o->ratio_min <= o->ratio_max))
    return cm_errorf(err, CM_EINVALID,
                     "views: crop scale (%g, %g) must satisfy 0 < min <= max <= 1 and ratio "
                     "(%g, %g) 0 < min <= max",
                     o->crop_scale_min, o->crop_scale_max, o->ratio_min, o->ratio_max);
  if (!prob_ok(o->flip_prob) || !prob_ok(o->jitter_prob) || !prob_ok(o->grayscale_prob) ||
      !prob_ok(o->blur_prob))
    return cm_errorf(err, CM_EINVALID,
                     "views: a probability (flip, jitter, grayscale, blur) is "
                     "outside [0, 1]");
  if (o->brightness < 0 || o->brightness > 1 || o->contrast < 0 || o->contrast > 1 ||
      o->saturation < 0 || o->saturation > 1 || o->hue < 0 || o->hue > 0.5)
    return cm_errorf(err, CM_EINVALID,
                     "views: jitter strengths must be in [0, 1] (hue [0, 0.5]): %g %g %g %g",
                     o->brightness, o->contrast, o->saturation, o->hue);
  if (o->blur_prob > 0 &&
      !(o->blur_sigma_min > 0 && o->blur_sigma_min <= o->blur_sigma_max && o->blur_sigma_max < 64))
    return cm_errorf(err, CM_EINVALID,
                     "views: blur sigma (%g, %g) must satisfy 0 < min <= max < 64",
                     o->blur_sigma_min, o->blur_sigma_max);
  if (o->mask) {
    if (o->patch < 1 || o->image_size % o->patch != 0)
      return cm_errorf(err, CM_EINVALID, "views: image_size %d is not a multiple of patch %d",
                       o->image_size, o->patch);
    int grid = o->image_size / o->patch;
    if (cm_mask_keep_count(o->mask_kind, o->mask_ratio, o->mask_block, grid) < 0 ||
        cm_mask_noise_count(o->mask_kind, o->mask_block, grid) < 0)
      return cm_errorf(err, CM_EINVALID,
                       "views: mask kind \"%s\" ratio %g block %d does not fit the %dx%d grid",
                       o->mask_kind, o->mask_ratio, o->mask_block, grid, grid);
  }
  return CM_OK;
}

int cm_views_n_tokens(const cm_views_opts *o) {
  if (o->patch < 1) return 0;
  int g = o->image_size / o->patch;
  return g * g;
}

int cm_views_n_keep(const cm_views_opts *o) {
  if (!o->mask || o->mode == CM_VIEWS_EVAL || o->patch < 1) return 0;
  return cm_mask_keep_count(o->mask_kind, o->mask_ratio, o->mask_block, o->image_size / o->patch);
}

/* ---- bicubic resize (Pillow's separable filter, a = -0.5) ------------------ */

static double cubic(double x) {
  const double a = -0.5;
  x = fabs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/* Taps of each output position over an input of n samples: start, count and
 * normalised weights (at most kmax each). */
typedef struct taps {
  int kmax;
  int *start, *count;
  double *w;
} taps;

static bool taps_make(taps *t, int n_in, int n_out, bool antialias) {
  double scale = (double)n_in / n_out;
  double fs = antialias && scale > 1 ? scale : 1;
  double support = 2 * fs;
  t->kmax = (int)ceil(support) * 2 + 1;
  t->start = malloc(sizeof(int) * (size_t)n_out);
  t->count = malloc(sizeof(int) * (size_t)n_out);
  t->w = malloc(sizeof(double) * (size_t)n_out * (size_t)t->kmax);
  if (!t->start || !t->count || !t->w) return false;
  for (int o = 0; o < n_out; o++) {
    double center = (o + 0.5) * scale;
    int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
    if (lo < 0) lo = 0;
    if (hi > n_in) hi = n_in;
    if (hi - lo > t->kmax) hi = lo + t->kmax;
    double *w = t->w + (size_t)o * (size_t)t->kmax, sum = 0;
    for (int k = 0; k < hi - lo; k++) {
      w[k] = cubic((k + lo - center + 0.5) / fs);
      sum += w[k];
    }
    for (int k = 0; k < hi - lo; k++) w[k] = sum != 0 ? w[k] / sum : 0;
    t->start[o] = lo;
    t->count[o] = hi - lo;
  }
  return true;
}

static void taps_free(taps *t) {
  free(t->start);
  free(t->count);
  free(t->w);
}

static uint8_t to_u8(double v) {
  if (!(v > 0)) return 0;
  if (v >= 255) return 255;
  return (uint8_t)lrint(v);
}

void cm_views_resize(const cm_image *src, const int box[4], int oh, int ow, bool antialias,
                     uint8_t *out) {
  int y0 = box[0], x0 = box[1], bh = box[2], bw = box[3], c = src->c;
  taps th = {0}, tv = {0};
  double *tmp = malloc(sizeof(double) * (size_t)bh * (size_t)ow * (size_t)c);
  if (!tmp || !taps_make(&th, bw, ow, antialias) || !taps_make(&tv, bh, oh, antialias)) {
    /* out of memory: a nearest-neighbour fallback keeps the output defined */
    for (int y = 0; y < oh; y++)
      for (int x = 0; x < ow; x++)
        for (int k = 0; k < c; k++)
          out[((size_t)y * ow + x) * c + k] =
              src->data[((size_t)(y0 + y * bh / oh) * src->w + x0 + x * bw / ow) * c + k];
    free(tmp);
    taps_free(&th);
    taps_free(&tv);
    return;
  }
  for (int y = 0; y < bh; y++) {
    const uint8_t *row = src->data + ((size_t)(y0 + y) * src->w + x0) * c;
    for (int x = 0; x < ow; x++) {
      const double *w = th.w + (size_t)x * th.kmax;
      for (int k = 0; k < c; k++) {
        double s = 0;
        for (int j = 0; j < th.count[x]; j++) s += w[j] * row[(size_t)(th.start[x] + j) * c + k];
        tmp[((size_t)y * ow + x) * c + k] = to_u8(s); /* Pillow keeps a uint8 intermediate */
      }
    }
  }
  for (int y = 0; y < oh; y++) {
    const double *w = tv.w + (size_t)y * tv.kmax;
    for (int x = 0; x < ow; x++)
      for (int k = 0; k < c; k++) {
        double s = 0;
        for (int j = 0; j < tv.count[y]; j++)
          s += w[j] * tmp[((size_t)(tv.start[y] + j) * ow + x) * c + k];
        out[((size_t)y * ow + x) * c + k] = to_u8(s);
      }
  }
  free(tmp);
  taps_free(&th);
  taps_free(&tv);
}

/* ---- geometry -------------------------------------------------------------- */

/* CMAE's RandomResizedCrop: 10 attempts, then a centre crop clamped to the ratio range. */
static void random_resized_crop(const cm_views_opts *o, rng *r, int H, int W, int box[4]) {
  double area = (double)H * W, lr0 = log(o->ratio_min), lr1 = log(o->ratio_max);
  for (int a = 0; a < 10; a++) {
    double ta = area * rng_range(r, o->crop_scale_min, o->crop_scale_max);
    double ar = exp(rng_range(r, lr0, lr1));
    int w = (int)lrint(sqrt(ta * ar)), h = (int)lrint(sqrt(ta / ar));
    if (w > 0 && h > 0 && w <= W && h <= H) {
      box[0] = rng_int(r, 0, H - h);
      box[1] = rng_int(r, 0, W - w);
      box[2] = h;
      box[3] = w;
      return;
    }
  }
  double in_ratio = (double)W / H;
  int w = W, h = H;
  if (in_ratio < o->ratio_min) {
    h = (int)lrint(w / o->ratio_min);
  } else if (in_ratio > o->ratio_max) {
    w = (int)lrint(h * o->ratio_max);
  }
  if (h < 1) h = 1;
  if (w < 1) w = 1;
  if (h > H) h = H;
  if (w > W) w = W;
  box[0] = (H - h) / 2;
  box[1] = (W - w) / 2;
  box[2] = h;
  box[3] = w;
}

static void hflip(uint8_t *p, int h, int w, int c) {
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w / 2; x++)
      for (int k = 0; k < c; k++) {
        uint8_t *a = p + ((size_t)y * w + x) * c + k,
                *b = p + ((size_t)y * w + (w - 1 - x)) * c + k;
        uint8_t t = *a;
        *a = *b;
        *b = t;
      }
}

/* ---- colour (on uint8 HWC, rounding after each op as PIL does) ------------ */

static double luma(const uint8_t *px, int c) { /* PIL "L": ITU-R 601-2 */
  return c == 1 ? px[0] : (px[0] * 299 + px[1] * 587 + px[2] * 114) / 1000.0;
}

static void brightness(uint8_t *p, size_t n, int c, double f) {
  for (size_t i = 0; i < n * c; i++) p[i] = to_u8(p[i] * f);
}

static void contrast(uint8_t *p, size_t n, int c, double f) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m += luma(p + i * c, c);
  m = floor(m / (double)n + 0.5);
  for (size_t i = 0; i < n * c; i++) p[i] = to_u8(m + f * (p[i] - m));
}

static void saturation(uint8_t *p, size_t n, double f) {
  for (size_t i = 0; i < n; i++) {
    double g = floor(luma(p + i * 3, 3) + 0.5);
    for (int k = 0; k < 3; k++) p[i * 3 + k] = to_u8(g + f * (p[i * 3 + k] - g));
  }
}

static void hue_shift(uint8_t *p, size_t n, double shift) {
  for (size_t i = 0; i < n; i++) {
    double r = p[i * 3] / 255.0, g = p[i * 3 + 1] / 255.0, b = p[i * 3 + 2] / 255.0;
    double mx = fmax(r, fmax(g, b)), mn = fmin(r, fmin(g, b)), d = mx - mn, h = 0;
    if (d > 0) {
      if (mx == r)
        h = fmod((g - b) / d + 6, 6) / 6;
      else if (mx == g)
        h = ((b - r) / d + 2) / 6;
      else
        h = ((r - g) / d + 4) / 6;
    }
    double s = mx > 0 ? d / mx : 0, v = mx;
    h = fmod(h + shift + 1, 1);
    double hh = h * 6;
    int sec = (int)hh % 6;
    double f = hh - floor(hh), pp = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
    double rgb[6][3] = {{v, t, pp}, {q, v, pp}, {pp, v, t}, {pp, q, v}, {t, pp, v}, {v, pp, q}};
    for (int k = 0; k < 3; k++) p[i * 3 + k] = to_u8(rgb[sec][k] * 255);
  }
}

/* CMAE's quirk: BGR-ordered luma weights on an RGB array (CMAE.md §1 5b). */
static void grayscale(uint8_t *p, size_t n) {
  const double wr = 0.114, wg = 0.587, wb = 0.2989, ws = wr + wg + wb;
  for (size_t i = 0; i < n; i++) {
    uint8_t g = to_u8((wr * p[i * 3] + wg * p[i * 3 + 1] + wb * p[i * 3 + 2]) / ws);
    p[i * 3] = p[i * 3 + 1] = p[i * 3 + 2] = g;
  }
}

/* A true Gaussian of std sigma (PIL approximates it with box passes), radius
 * ceil(3 sigma), edges clamped. */
static bool gaussian_blur(uint8_t *p, int h, int w, int c, double sigma) {
  int r = (int)ceil(3 * sigma);
  if (r < 1) r = 1;
  double *k = malloc(sizeof(double) * (size_t)(2 * r + 1));
  double *tmp = malloc(sizeof(double) * (size_t)h * w * c);
  if (!k || !tmp) {
    free(k);
    free(tmp);
    return false;
  }
  double sum = 0;
  for (int i = -r; i <= r; i++) sum += k[i + r] = exp(-(double)i * i / (2 * sigma * sigma));
  for (int i = 0; i <= 2 * r; i++) k[i] /= sum;
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      for (int ch = 0; ch < c; ch++) {
        double s = 0;
        for (int i = -r; i <= r; i++) {
          int xx = x + i < 0 ? 0 : x + i >= w ? w - 1 : x + i;
          s += k[i + r] * p[((size_t)y * w + xx) * c + ch];
        }
        tmp[((size_t)y * w + x) * c + ch] = s;
      }
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      for (int ch = 0; ch < c; ch++) {
        double s = 0;
        for (int i = -r; i <= r; i++) {
          int yy = y + i < 0 ? 0 : y + i >= h ? h - 1 : y + i;
          s += k[i + r] * tmp[((size_t)yy * w + x) * c + ch];
        }
        p[((size_t)y * w + x) * c + ch] = to_u8(s);
      }
  free(k);
  free(tmp);
  return true;
}

static void normalize(const cm_views_opts *o, const uint8_t *p, int stride_w, int s, float *out) {
  int c = o->in_chans;
  for (int k = 0; k < c; k++) {
    double m = o->mean[k], sd = o->std[k];
    for (int y = 0; y < s; y++)
      for (int x = 0; x < s; x++)
        out[((size_t)k * s + y) * s + x] =
            (float)((p[((size_t)y * stride_w + x) * c + k] - m) / sd);
  }
}

/* Target-only colour augmentation (CMAE.md §1 5a-c); draws are taken in a
 * fixed order whatever the probabilities say. */
static bool target_aug(const cm_views_opts *o, rng *r, uint8_t *p, int s, cm_views_out *out) {
  size_t n = (size_t)s * s;
  int c = o->in_chans;
  out->jitter = rng_unif(r) < o->jitter_prob;
  double fb = rng_range(r, 1 - o->brightness, 1 + o->brightness);
  double fc = rng_range(r, 1 - o->contrast, 1 + o->contrast);
  double fs = rng_range(r, 1 - o->saturation, 1 + o->saturation);
  double fh = rng_range(r, -o->hue, o->hue);
  int order[4] = {0, 1, 2, 3};
  for (int i = 3; i > 0; i--) {
    int j = rng_int(r, 0, i), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  if (out->jitter)
    for (int i = 0; i < 4; i++) {
      if (order[i] == 0) brightness(p, n, c, fb);
      if (order[i] == 1) contrast(p, n, c, fc);
      if (order[i] == 2 && c == 3) saturation(p, n, fs);
      if (order[i] == 3 && c == 3) hue_shift(p, n, fh);
    }
  out->gray = rng_unif(r) < o->grayscale_prob && c == 3;
  if (out->gray) grayscale(p, n);
  out->blur = rng_unif(r) < o->blur_prob;
  double sigma = rng_range(r, o->blur_sigma_min, o->blur_sigma_max);
  if (out->blur && !gaussian_blur(p, s, s, c, sigma)) return false;
  return true;
}

/* The image with in_chans channels (a converted copy when needed). */
static cm_status convert_chans(const cm_image *im, int c, cm_image *tmp, const cm_image **use,
                               cm_err *err) {
  *use = im;
  if (im->c == c) return CM_OK;
  if ((im->c != 1 && im->c != 3) || im->h < 1 || im->w < 1)
    return cm_errorf(err, CM_EINVALID, "views: image %dx%dx%d: channels must be 1 or 3", im->h,
                     im->w, im->c);
  size_t n = (size_t)im->h * im->w;
  tmp->h = im->h;
  tmp->w = im->w;
  tmp->c = c;
  tmp->data = malloc(n * c);
  if (!tmp->data) return cm_errorf(err, CM_EINTERNAL, "views: out of memory converting channels");
  for (size_t i = 0; i < n; i++) {
    if (c == 3)
      tmp->data[i * 3] = tmp->data[i * 3 + 1] = tmp->data[i * 3 + 2] = im->data[i];
    else
      tmp->data[i] = to_u8(luma(im->data + i * 3, 3));
  }
  *use = tmp;
  return CM_OK;
}

cm_status cm_views_sample(const cm_views_opts *o, const cm_image *im, uint64_t seed, int64_t epoch,
                          int64_t index, cm_views_out *out, cm_err *err) {
  if (cm_views_check(o, err)) return err ? err->status : CM_EINVALID;
  if (!im || !im->data || im->h < 1 || im->w < 1)
    return cm_errorf(err, CM_EINVALID, "views: sample %lld has an empty image", (long long)index);
  cm_image conv = {0};
  const cm_image *src;
  if (convert_chans(im, o->in_chans, &conv, &src, err)) return err ? err->status : CM_EINVALID;
  int c = o->in_chans, s = o->image_size, m = o->master_size;
  out->flip = out->dh = out->dw = 0;
  out->jitter = out->gray = out->blur = false;
  memset(out->crop_t, 0, sizeof out->crop_t);
  cm_status st = CM_OK;
  uint8_t *a = NULL, *b = NULL;
  rng r;
  rng_init(&r, seed, epoch, index, SUB_VIEWS);
  if (o->mode == CM_VIEWS_EVAL) {
    a = malloc((size_t)s * s * c);
    if (!a) {
      st = cm_errorf(err, CM_EINTERNAL, "views: out of memory");
      goto done;
    }
    int box[4] = {0, 0, src->h, src->w};
    memcpy(out->crop, box, sizeof box);
    cm_views_resize(src, box, s, s, true, a);
    if (out->img) normalize(o, a, s, s, out->img);
    goto done;
  }
  if (o->mode == CM_VIEWS_SHIFT) {
    a = malloc((size_t)m * m * c);
    b = malloc((size_t)s * s * c);
    if (!a || !b) {
      st = cm_errorf(err, CM_EINTERNAL, "views: out of memory");
      goto done;
    }
    random_resized_crop(o, &r, src->h, src->w, out->crop);
    out->flip = rng_unif(&r) < o->flip_prob;
    cm_views_resize(src, out->crop, m, m, o->antialias, a);
    if (out->flip) hflip(a, m, m, c);
    if (out->master) memcpy(out->master, a, (size_t)m * m * c);
    out->dh = rng_int(&r, 0, o->shift);
    out->dw = rng_int(&r, 0, o->shift);
    for (int y = 0; y < s; y++)
      memcpy(b + (size_t)y * s * c, a + ((size_t)(y + out->dh) * m + out->dw) * c, (size_t)s * c);
    if (out->img) normalize(o, a, m, s, out->img);
  } else {
    a = malloc((size_t)s * s * c);
    b = malloc((size_t)s * s * c);
    if (!a || !b) {
      st = cm_errorf(err, CM_EINTERNAL, "views: out of memory");
      goto done;
    }
    random_resized_crop(o, &r, src->h, src->w, out->crop);
    out->flip = rng_unif(&r) < o->flip_prob;
    random_resized_crop(o, &r, src->h, src->w, out->crop_t);
    cm_views_resize(src, out->crop, s, s, o->antialias, a);
    cm_views_resize(src, out->crop_t, s, s, o->antialias, b);
    if (out->flip) {
      hflip(a, s, s, c);
      hflip(b, s, s, c);
    }
    if (out->img) normalize(o, a, s, s, out->img);
  }
  if (!target_aug(o, &r, b, s, out)) {
    st = cm_errorf(err, CM_EINTERNAL, "views: out of memory in the target blur");
    goto done;
  }
  if (out->img_t) normalize(o, b, s, s, out->img_t);
  if (o->mask && (out->ids_keep || out->ids_restore || out->mask)) {
    int grid = s / o->patch, L = grid * grid;
    int nn = cm_mask_noise_count(o->mask_kind, o->mask_block, grid);
    int nk = cm_mask_keep_count(o->mask_kind, o->mask_ratio, o->mask_block, grid);
    double *u = malloc(sizeof(double) * (size_t)(nn > 0 ? nn : 1));
    int32_t *keep = out->ids_keep ? NULL : malloc(sizeof(int32_t) * (size_t)(nk > 0 ? nk : 1));
    int32_t *rest = out->ids_restore ? NULL : malloc(sizeof(int32_t) * (size_t)L);
    float *mk = out->mask ? NULL : malloc(sizeof(float) * (size_t)L);
    if (!u || (!out->ids_keep && !keep) || (!out->ids_restore && !rest) || (!out->mask && !mk)) {
      st = cm_errorf(err, CM_EINTERNAL, "views: out of memory for the mask");
    } else {
      rng rm;
      rng_init(&rm, seed, epoch, index, SUB_MASK);
      for (int i = 0; i < nn; i++) u[i] = rng_unif(&rm);
      int got = cm_mask_sample(
          o->mask_kind, o->mask_ratio, o->mask_block, grid, u, out->ids_keep ? out->ids_keep : keep,
          out->ids_restore ? out->ids_restore : rest, out->mask ? out->mask : mk);
      if (got != nk)
        st = cm_errorf(err, CM_EINTERNAL, "views: cm_mask_sample returned %d, expected %d keeps",
                       got, nk);
    }
    free(u);
    free(keep);
    free(rest);
    free(mk);
  }
done:
  free(a);
  free(b);
  free(conv.data);
  return st;
}
