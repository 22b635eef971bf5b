/* tests/unit/test_views.c — the CMAE views and masks (runtime/views.c):
 * shapes and ranges, the crop geometry (target = online shifted by (dh, dw)
 * with the colour augmentations off), the shared flip, mask counts,
 * determinism in (seed, epoch, index), the RRC and eval modes, the bicubic
 * resize, colour augmentations and option errors. */
#include "frontend/frontend.h"
#include "runtime/training.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>

static test_rng rs = {0x2545F4914F6CDD1Dull};
static uint32_t rnd(void) { /* fixed-seed test data */
  return test_u32(&rs);
}

static cm_image random_image(int h, int w, int c) {
  cm_image im = {h, w, c, malloc((size_t)h * w * c)};
  for (size_t i = 0; i < (size_t)h * w * c; i++) im.data[i] = (uint8_t)(rnd() % 256);
  return im;
}

static cm_views_opts fmnist_opts(void) {
  cm_model_config c;
  cm_err err = {0};
  cm_views_opts o;
  memset(&o, 0, sizeof o);
  if (cm_model_config_load("models/cmae_vit_tiny_fmnist.json", NULL, 0, &c, &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    return o;
  }
  cm_views_opts_from_config(&c, &o);
  return o;
}

static cm_views_opts rgb_opts(void) {
  cm_views_opts o = fmnist_opts();
  o.in_chans = 3;
  o.image_size = 24;
  o.master_size = 31;
  o.shift = 7;
  o.patch = 4;
  const double mean[3] = {123.675, 116.28, 103.53}, sd[3] = {58.395, 57.12, 57.375};
  for (int k = 0; k < 3; k++) {
    o.mean[k] = mean[k];
    o.std[k] = sd[k];
  }
  snprintf(o.mask_kind, sizeof o.mask_kind, "random");
  o.mask_ratio = 0.75;
  return o;
}

typedef struct bufs {
  float *img, *img_t, *mask;
  int32_t *keep, *restore;
  uint8_t *master;
} bufs;

static void bufs_alloc(bufs *b, const cm_views_opts *o, cm_views_out *out) {
  size_t plane = (size_t)o->in_chans * o->image_size * o->image_size;
  int L = cm_views_n_tokens(o);
  b->img = malloc(sizeof(float) * plane);
  b->img_t = malloc(sizeof(float) * plane);
  b->mask = malloc(sizeof(float) * (size_t)L);
  b->keep = malloc(sizeof(int32_t) * (size_t)L);
  b->restore = malloc(sizeof(int32_t) * (size_t)L);
  b->master = malloc((size_t)o->master_size * o->master_size * o->in_chans + 1);
  memset(out, 0, sizeof *out);
  out->img = b->img;
  out->img_t = b->img_t;
  out->mask = b->mask;
  out->ids_keep = b->keep;
  out->ids_restore = b->restore;
  out->master = b->master;
}

static void bufs_free(bufs *b) {
  free(b->img);
  free(b->img_t);
  free(b->mask);
  free(b->keep);
  free(b->restore);
  free(b->master);
}

static void test_mask_counts(void) {
  cm_views_opts o = fmnist_opts();
  CHECK(o.image_size == 32 && o.master_size == 36 && o.shift == 4 && o.in_chans == 1);
  CHECK(cm_views_n_tokens(&o) == 64);
  CHECK(cm_views_n_keep(&o) == 20); /* int(16 * 0.35) = 5 cells of 2x2 */
  cm_image im = random_image(28, 28, 1);
  cm_views_out out;
  bufs b;
  bufs_alloc(&b, &o, &out);
  cm_err err = {0};
  for (int64_t idx = 0; idx < 20; idx++) {
    CHECK_MSG(cm_views_sample(&o, &im, 7, 0, idx, &out, &err) == CM_OK, "%s", err.msg);
    int masked = 0, seen[64] = {0};
    for (int i = 0; i < 64; i++) masked += b.mask[i] == 1.0f;
    CHECK(masked == 44);
    for (int k = 0; k < 20; k++) {
      CHECK(b.keep[k] >= 0 && b.keep[k] < 64);
      if (b.keep[k] < 0 || b.keep[k] >= 64) continue;
      CHECK(b.mask[b.keep[k]] == 0.0f);
      seen[b.keep[k]]++;
    }
    for (int i = 0; i < 64; i++) CHECK(seen[i] <= 1);
    /* ids_restore is a permutation; 2x2 blocks are all visible or all masked */
    int perm[64] = {0};
    for (int i = 0; i < 64; i++)
      if (b.restore[i] >= 0 && b.restore[i] < 64) perm[b.restore[i]]++;
    for (int i = 0; i < 64; i++) CHECK(perm[i] == 1);
    for (int by = 0; by < 4; by++)
      for (int bx = 0; bx < 4; bx++) {
        float m0 = b.mask[(2 * by) * 8 + 2 * bx];
        CHECK(b.mask[(2 * by) * 8 + 2 * bx + 1] == m0 && b.mask[(2 * by + 1) * 8 + 2 * bx] == m0 &&
              b.mask[(2 * by + 1) * 8 + 2 * bx + 1] == m0);
      }
  }
  bufs_free(&b);
  /* random (MAE) masking on the RGB variant: 36 tokens, int(36 * 0.25) = 9 visible */
  cm_views_opts r = rgb_opts();
  CHECK(cm_views_n_tokens(&r) == 36 && cm_views_n_keep(&r) == 9);
  cm_image rgb = random_image(40, 29, 3);
  bufs_alloc(&b, &r, &out);
  CHECK_MSG(cm_views_sample(&r, &rgb, 7, 0, 3, &out, &err) == CM_OK, "%s", err.msg);
  int masked = 0;
  for (int i = 0; i < 36; i++) masked += b.mask[i] == 1.0f;
  CHECK(masked == 27);
  bufs_free(&b);
  free(rgb.data);
  free(im.data);
}

/* Target = online shifted by (dh, dw) with no colour aug; both views are crops
 * of the master; values in the normalized range. */
static void check_geometry(cm_views_opts o, cm_image im) {
  o.jitter_prob = o.grayscale_prob = o.blur_prob = 0;
  int s = o.image_size, m = o.master_size, c = o.in_chans;
  cm_views_out out;
  bufs b;
  bufs_alloc(&b, &o, &out);
  cm_err err = {0};
  int shifted = 0, flips = 0, n = 64;
  for (int64_t idx = 0; idx < n; idx++) {
    CHECK_MSG(cm_views_sample(&o, &im, 11, 2, idx, &out, &err) == CM_OK, "%s", err.msg);
    CHECK(out.dh >= 0 && out.dh <= o.shift && out.dw >= 0 && out.dw <= o.shift);
    CHECK(out.crop[2] >= 1 && out.crop[3] >= 1 && out.crop[0] + out.crop[2] <= im.h &&
          out.crop[1] + out.crop[3] <= im.w);
    CHECK(!out.jitter && !out.gray && !out.blur);
    shifted += out.dh != 0 || out.dw != 0;
    flips += out.flip;
    int bad_t = 0, bad_o = 0, bad_r = 0;
    for (int k = 0; k < c; k++) {
      float lo = (float)((0 - o.mean[k]) / o.std[k]), hi = (float)((255 - o.mean[k]) / o.std[k]);
      for (int y = 0; y < s; y++)
        for (int x = 0; x < s; x++) {
          float on = b.img[((size_t)k * s + y) * s + x], t = b.img_t[((size_t)k * s + y) * s + x];
          float want_o = (float)((b.master[((size_t)y * m + x) * c + k] - o.mean[k]) / o.std[k]);
          float want_t =
              (float)((b.master[((size_t)(y + out.dh) * m + x + out.dw) * c + k] - o.mean[k]) /
                      o.std[k]);
          bad_o += on != want_o;
          bad_t += t != want_t;
          bad_r += on < lo - 1e-5f || on > hi + 1e-5f || t < lo - 1e-5f || t > hi + 1e-5f;
          if (y + out.dh < s && x + out.dw < s)
            bad_t += t != b.img[((size_t)k * s + y + out.dh) * s + x + out.dw];
        }
    }
    CHECK_MSG(bad_o == 0 && bad_t == 0 && bad_r == 0, "sample %lld: %d %d %d", (long long)idx,
              bad_o, bad_t, bad_r);
  }
  CHECK(shifted > n / 2);
  CHECK(flips > n / 5 && flips < n * 4 / 5); /* p = 0.5 */
  bufs_free(&b);
}

static void test_geometry(void) {
  cm_image g = random_image(28, 28, 1), rgb = random_image(45, 38, 3);
  check_geometry(fmnist_opts(), g);
  check_geometry(rgb_opts(), rgb);
  free(g.data);
  free(rgb.data);
}

/* The flip is drawn once and applies to the master: flip_prob 1 mirrors the
 * master of flip_prob 0 (every other draw unchanged). */
static void test_flip_shared(void) {
  cm_views_opts o = rgb_opts();
  cm_image im = random_image(33, 50, 3);
  cm_views_out o0, o1;
  bufs b0, b1;
  bufs_alloc(&b0, &o, &o0);
  bufs_alloc(&b1, &o, &o1);
  cm_err err = {0};
  int m = o.master_size;
  for (int64_t idx = 0; idx < 8; idx++) {
    o.flip_prob = 0;
    CHECK(cm_views_sample(&o, &im, 3, 1, idx, &o0, &err) == CM_OK);
    o.flip_prob = 1;
    CHECK(cm_views_sample(&o, &im, 3, 1, idx, &o1, &err) == CM_OK);
    CHECK(!o0.flip && o1.flip);
    CHECK(memcmp(o0.crop, o1.crop, sizeof o0.crop) == 0 && o0.dh == o1.dh && o0.dw == o1.dw);
    int bad = 0;
    for (int y = 0; y < m; y++)
      for (int x = 0; x < m; x++)
        for (int k = 0; k < 3; k++)
          bad += b1.master[((size_t)y * m + x) * 3 + k] !=
                 b0.master[((size_t)y * m + (m - 1 - x)) * 3 + k];
    CHECK(bad == 0);
    CHECK(memcmp(b0.mask, b1.mask, sizeof(float) * 36) == 0); /* masks: their own stream */
  }
  bufs_free(&b0);
  bufs_free(&b1);
  free(im.data);
}

static bool same_out(const bufs *a, const bufs *b, const cm_views_opts *o) {
  size_t plane = (size_t)o->in_chans * o->image_size * o->image_size;
  int L = cm_views_n_tokens(o), nk = cm_views_n_keep(o);
  return !memcmp(a->img, b->img, plane * 4) && !memcmp(a->img_t, b->img_t, plane * 4) &&
         !memcmp(a->mask, b->mask, (size_t)L * 4) && !memcmp(a->keep, b->keep, (size_t)nk * 4) &&
         !memcmp(a->restore, b->restore, (size_t)L * 4);
}

static void test_determinism(void) {
  cm_views_opts os[2] = {fmnist_opts(), rgb_opts()};
  for (int v = 0; v < 2; v++) {
    cm_views_opts o = os[v];
    o.jitter_prob = o.blur_prob = 1; /* exercise every draw */
    cm_image im = random_image(30, 27, o.in_chans);
    cm_views_out oa, ob;
    bufs a, b;
    bufs_alloc(&a, &o, &oa);
    bufs_alloc(&b, &o, &ob);
    cm_err err = {0};
    CHECK(cm_views_sample(&o, &im, 42, 3, 17, &oa, &err) == CM_OK);
    CHECK(cm_views_sample(&o, &im, 42, 3, 18, &ob, &err) == CM_OK); /* in between: another */
    CHECK(cm_views_sample(&o, &im, 42, 3, 17, &ob, &err) == CM_OK);
    CHECK(same_out(&a, &b, &o));
    CHECK(cm_views_sample(&o, &im, 42, 4, 17, &ob, &err) == CM_OK); /* another epoch */
    CHECK(!same_out(&a, &b, &o));
    CHECK(cm_views_sample(&o, &im, 43, 3, 17, &ob, &err) == CM_OK); /* another seed */
    CHECK(!same_out(&a, &b, &o));
    CHECK(oa.jitter && oa.blur);
    bufs_free(&a);
    bufs_free(&b);
    free(im.data);
  }
}

/* The colour augmentations change the target only; grayscale gives equal channels. */
static void test_colour(void) {
  cm_views_opts o = rgb_opts();
  o.jitter_prob = o.blur_prob = 0;
  o.grayscale_prob = 1;
  cm_image im = random_image(26, 26, 3);
  cm_views_out out;
  bufs b;
  bufs_alloc(&b, &o, &out);
  cm_err err = {0};
  int s = o.image_size;
  size_t p = (size_t)s * s;
  CHECK(cm_views_sample(&o, &im, 1, 0, 0, &out, &err) == CM_OK);
  CHECK(out.gray);
  int bad = 0, colour_online = 0;
  for (size_t i = 0; i < p; i++) {
    float r = b.img_t[i] * (float)o.std[0] + (float)o.mean[0];
    float g = b.img_t[p + i] * (float)o.std[1] + (float)o.mean[1];
    bad += fabsf(r - g) > 1e-3f;
    colour_online += fabsf(b.img[i] * (float)o.std[0] + (float)o.mean[0] -
                           (b.img[p + i] * (float)o.std[1] + (float)o.mean[1])) > 0.5f;
  }
  CHECK(bad == 0);
  CHECK(colour_online > (int)p / 2);
  /* blur lowers the target's pixel-to-pixel variation of a noise image */
  o.grayscale_prob = 0;
  o.blur_prob = 1;
  o.blur_sigma_min = o.blur_sigma_max = 2.0;
  o.crop_scale_min = o.crop_scale_max = 1; /* no upscaling smoothness either way */
  cm_image big = random_image(o.master_size, o.master_size, 3);
  CHECK(cm_views_sample(&o, &big, 1, 0, 0, &out, &err) == CM_OK);
  CHECK(out.blur);
  double tv_o = 0, tv_t = 0;
  for (int y = 0; y < s; y++)
    for (int x = 0; x + 1 < s; x++) {
      tv_o += fabsf(b.img[y * s + x + 1] - b.img[y * s + x]);
      tv_t += fabsf(b.img_t[y * s + x + 1] - b.img_t[y * s + x]);
    }
  CHECK_MSG(tv_t < tv_o / 3, "blurred variation %g vs %g", tv_t, tv_o);
  /* jitter on grayscale data: brightness/contrast only, the target differs */
  cm_views_opts g = fmnist_opts();
  g.jitter_prob = 1;
  g.blur_prob = g.grayscale_prob = 0;
  cm_image gi = random_image(28, 28, 1);
  cm_views_out go;
  bufs gb;
  bufs_alloc(&gb, &g, &go);
  int changed = 0;
  for (int64_t idx = 0; idx < 8; idx++) {
    CHECK(cm_views_sample(&g, &gi, 5, 0, idx, &go, &err) == CM_OK);
    CHECK(go.jitter && !go.gray);
    int sg = g.image_size, mg = g.master_size;
    for (int y = 0; y < sg; y++)
      for (int x = 0; x < sg; x++)
        changed +=
            gb.img_t[y * sg + x] !=
            (float)((gb.master[(size_t)(y + go.dh) * mg + x + go.dw] - g.mean[0]) / g.std[0]);
  }
  CHECK(changed > 8 * 32 * 32 / 2);
  bufs_free(&gb);
  bufs_free(&b);
  free(gi.data);
  free(big.data);
  free(im.data);
}

static void test_rrc_and_eval(void) {
  cm_views_opts o = rgb_opts();
  o.mode = CM_VIEWS_RRC;
  cm_image im = random_image(64, 48, 3);
  cm_views_out out;
  bufs b;
  bufs_alloc(&b, &o, &out);
  cm_err err = {0};
  int differ = 0;
  for (int64_t idx = 0; idx < 16; idx++) {
    CHECK_MSG(cm_views_sample(&o, &im, 9, 0, idx, &out, &err) == CM_OK, "%s", err.msg);
    differ += memcmp(out.crop, out.crop_t, sizeof out.crop) != 0;
    CHECK(out.crop_t[0] + out.crop_t[2] <= 64 && out.crop_t[1] + out.crop_t[3] <= 48);
    double area = (double)out.crop_t[2] * out.crop_t[3] / (64.0 * 48.0);
    CHECK(area > 0.15 && area <= 1.0);
  }
  CHECK(differ == 16);
  /* eval on an image already at image_size: the bicubic at scale 1 is the identity */
  o.mode = CM_VIEWS_EVAL;
  cm_image same = random_image(24, 24, 3);
  out.img_t = NULL;
  CHECK(cm_views_sample(&o, &same, 9, 0, 0, &out, &err) == CM_OK);
  int bad = 0;
  for (int k = 0; k < 3; k++)
    for (int i = 0; i < 24 * 24; i++)
      bad += b.img[k * 576 + i] != (float)((same.data[i * 3 + k] - o.mean[k]) / o.std[k]);
  CHECK(bad == 0);
  /* eval downscale of a constant image stays constant; a ramp keeps its mean */
  cm_image ramp = {96, 72, 3, malloc(96 * 72 * 3)};
  for (int y = 0; y < 96; y++)
    for (int x = 0; x < 72; x++)
      for (int k = 0; k < 3; k++)
        ramp.data[(y * 72 + x) * 3 + k] = (uint8_t)(k == 0 ? 77 : 2 * x + 40);
  CHECK(cm_views_sample(&o, &ramp, 1, 0, 0, &out, &err) == CM_OK);
  double mean_g = 0;
  bad = 0;
  for (int i = 0; i < 576; i++) {
    bad += fabsf(b.img[i] * (float)o.std[0] + (float)o.mean[0] - 77) > 1e-3f;
    mean_g += b.img[576 + i] * o.std[1] + o.mean[1];
    if (i % 24 > 0) bad += b.img[576 + i] <= b.img[576 + i - 1]; /* increasing in x */
  }
  CHECK(bad == 0);
  CHECK_NEAR(mean_g / 576, 40 + 71.0, 0.02);
  free(ramp.data);
  free(same.data);
  bufs_free(&b);
  free(im.data);
}

/* cm_views_resize against Pillow 13's Image.resize(BICUBIC) (and crop + resize)
 * on a 6x5 ramp-like image: within 1 (Pillow rounds in fixed point). */
static void test_resize_pillow(void) {
  uint8_t px[30];
  for (int i = 0; i < 30; i++) px[i] = (uint8_t)((i * 37 + 11) % 256);
  cm_image im = {6, 5, 1, px};
  static const uint8_t up[56] = {
      0,  18,  53,  89,  115, 145, 165, 130, 162, 137, 28,  47,  91,  123, 186, 218, 191, 76, 104,
      88, 46,  112, 133, 167, 202, 247, 149, 17,  48,  75,  112, 139, 166, 184, 190, 186, 91, 25,
      65, 104, 146, 172, 234, 144, 84,  121, 75,  75,  102, 162, 190, 234, 252, 74,  20,  58};
  static const uint8_t down[6] = {113, 96, 128, 145, 143, 98};
  static const uint8_t boxed[24] = {164, 181, 212, 249, 119, 0,   120, 137, 167, 196, 168, 134,
                                    58,  75,  102, 126, 165, 192, 14,  31,  59,  84,  112, 129};
  uint8_t out[56];
  int whole[4] = {0, 0, 6, 5}, box[4] = {2, 1, 3, 4};
  int bad = 0;
  cm_views_resize(&im, whole, 8, 7, true, out);
  for (int i = 0; i < 56; i++) bad += abs(out[i] - up[i]) > 1;
  cm_views_resize(&im, whole, 3, 2, true, out);
  for (int i = 0; i < 6; i++) bad += abs(out[i] - down[i]) > 1;
  cm_views_resize(&im, box, 4, 6, true, out);
  for (int i = 0; i < 24; i++) bad += abs(out[i] - boxed[i]) > 1;
  CHECK_MSG(bad == 0, "%d pixels differ from Pillow by more than 1", bad);
}

static void test_errors(void) {
  cm_views_opts o = fmnist_opts();
  cm_err err = {0};
  CHECK(cm_views_check(&o, &err) == CM_OK);
  o.shift = 5; /* 5 + 32 > 36 */
  CHECK(cm_views_check(&o, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "master_size 36");
  o = fmnist_opts();
  o.patch = 5;
  CHECK(cm_views_check(&o, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "patch");
  o = fmnist_opts();
  o.jitter_prob = 1.5;
  CHECK(cm_views_check(&o, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "probability");
  o = fmnist_opts();
  o.std[0] = 0;
  CHECK(cm_views_check(&o, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "std[0]");
  o = fmnist_opts();
  o.in_chans = 2;
  CHECK(cm_views_check(&o, &err) == CM_EINVALID);
  o = fmnist_opts();
  cm_image empty = {0, 0, 1, NULL};
  cm_views_out out = {0};
  CHECK(cm_views_sample(&o, &empty, 1, 0, 0, &out, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "empty image");
  /* a 3-channel image into a 1-channel variant is converted (luminance) */
  cm_image rgb = random_image(20, 21, 3);
  float img[32 * 32];
  out.img = img;
  CHECK(cm_views_sample(&o, &rgb, 1, 0, 0, &out, &err) == CM_OK);
  free(rgb.data);
}

TEST_MAIN({"mask_counts", test_mask_counts}, {"geometry", test_geometry},
          {"flip_shared", test_flip_shared}, {"determinism", test_determinism},
          {"colour", test_colour}, {"rrc_and_eval", test_rrc_and_eval},
          {"resize_pillow", test_resize_pillow}, {"errors", test_errors})
