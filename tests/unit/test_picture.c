/* tests/unit/test_picture.c — PNG grids read back exactly (through libpng's
 * own simplified reader, independent of cm_png_read), the 5x7 font, and
 * line plots having the series colour where a known line passes. */
#include "../../runtime/training.h"
#include "../test.h"
#include "../testlib.h"

#include <png.h>
#include <unistd.h>

static test_rng rng_state;
static uint8_t rnd8(void) {
  return (uint8_t)(test_u32(&rng_state) >> 24);
}

/* libpng's simplified API, as an independent reader */
static uint8_t *read_png_simple(const char *path, int *w, int *h, int channels) {
  png_image im;
  memset(&im, 0, sizeof im);
  im.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&im, path)) return NULL;
  im.format = channels == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  uint8_t *buf = malloc(PNG_IMAGE_SIZE(im));
  if (!buf || !png_image_finish_read(&im, NULL, buf, 0, NULL)) {
    free(buf);
    png_image_free(&im);
    return NULL;
  }
  *w = (int)im.width;
  *h = (int)im.height;
  return buf;
}

static void tmp_png(char *path) {
  int fd = mkstemps(path, 4);
  CHECK(fd >= 0);
  close(fd);
}

static void test_grid_png(void) {
  rng_state.s = 5;
  enum { R = 3, C = 4, TW = 5, TH = 7, GAP = 2 };
  cm_image tiles[R * C];
  cm_err err = {0};
  for (int i = 0; i < R * C; i++) {
    /* row 1 is gray (the masked input of `cmaec recon` may be), the others RGB */
    CHECK(cm_image_alloc(&tiles[i], TW, TH, i / C == 1 ? 1 : 3, 0, &err) == CM_OK);
    for (int k = 0; k < TW * TH * tiles[i].c; k++) tiles[i].data[k] = rnd8();
  }
  cm_image g;
  CHECK(cm_image_grid(tiles, R, C, GAP, 255, &g, &err) == CM_OK);
  CHECK(g.w == C * TW + (C - 1) * GAP && g.h == R * TH + (R - 1) * GAP);
  CHECK(g.c == 3);
  char path[] = "/tmp/cmaec_grid_XXXXXX.png";
  tmp_png(path);
  CHECK(cm_png_write(path, &g, &err) == CM_OK);
  int w = 0, h = 0;
  uint8_t *px = read_png_simple(path, &w, &h, 3);
  CHECK(px != NULL);
  CHECK(w == 26 && h == 25);
  int bad = 0;
  for (int y = 0; px && y < h; y++)
    for (int x = 0; x < w; x++)
      for (int c = 0; c < 3; c++) {
        int tx = x % (TW + GAP), ty = y % (TH + GAP);
        uint8_t want = 255;
        if (tx < TW && ty < TH) {
          const cm_image *t = &tiles[(y / (TH + GAP)) * C + x / (TW + GAP)];
          want = t->data[(ty * TW + tx) * t->c + (t->c == 3 ? c : 0)];
        }
        bad += px[(y * w + x) * 3 + c] != want;
      }
  CHECK_MSG(bad == 0, "%d wrong bytes", bad);
  free(px);
  /* cm_png_read gives the same bytes */
  cm_image back;
  CHECK(cm_png_read(path, &back, &err) == CM_OK);
  CHECK(back.w == g.w && back.h == g.h && back.c == 3);
  CHECK(back.data && memcmp(back.data, g.data, (size_t)g.w * g.h * 3) == 0);
  cm_image_free(&back);
  cm_image_free(&g);

  /* all gray: a gray PNG */
  CHECK(cm_image_grid(tiles + C, 1, C, GAP, 0, &g, &err) == CM_OK);
  CHECK(g.c == 1 && g.w == 26 && g.h == 7);
  CHECK(cm_png_write(path, &g, &err) == CM_OK);
  px = read_png_simple(path, &w, &h, 1);
  CHECK(px && w == 26 && h == 7);
  CHECK(px && px[0] == tiles[C].data[0] && px[5] == 0 && px[6] == 0 &&
        px[7] == tiles[C + 1].data[0] && px[25 * 1 + 26 * 6] == tiles[C + 3].data[34]);
  free(px);
  CHECK(cm_png_read(path, &back, &err) == CM_OK);
  CHECK(back.c == 1 && back.data && memcmp(back.data, g.data, 26 * 7) == 0);
  cm_image_free(&back);
  cm_image_free(&g);

  /* errors */
  cm_image odd = tiles[5];
  odd.w = 4;
  cm_image mixed[2] = {tiles[0], odd};
  CHECK(cm_image_grid(mixed, 1, 2, 2, 0, &g, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "tile 1");
  FILE *f = fopen(path, "wb");
  fputs("\x89PNG\r\n\x1a\n garbage", f);
  fclose(f);
  CHECK(cm_png_read(path, &back, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, path);
  CHECK(cm_png_write("/nonexistent-dir/x.png", &tiles[0], &err) == CM_EINVALID);
  remove(path);
  for (int i = 0; i < R * C; i++) cm_image_free(&tiles[i]);
}

static void test_font(void) {
  cm_image im;
  cm_err err = {0};
  CHECK(cm_image_alloc(&im, 23, 9, 3, 255, &err) == CM_OK);
  const uint8_t red[3] = {200, 0, 0};
  cm_image_text(&im, 1, 1, "-1e", 1, red);
  /* '-' at x 1..5: only row 3 set */
  for (int r = 0; r < 7; r++)
    for (int c = 0; c < 5; c++) {
      const uint8_t *p = im.data + ((1 + r) * 23 + 1 + c) * 3;
      CHECK((p[0] == 200) == (r == 3));
    }
  /* '1' at x 7..11: its middle column set in every row, bottom row full width minus the edges */
  for (int r = 0; r < 7; r++) CHECK(im.data[((1 + r) * 23 + 7 + 2) * 3 + 1] == 0);
  CHECK(im.data[((1 + 6) * 23 + 7 + 0) * 3 + 1] == 255);
  CHECK(im.data[((1 + 6) * 23 + 7 + 1) * 3 + 1] == 0);
  /* the separating column and the frame stay background */
  for (int y = 0; y < 9; y++) CHECK(im.data[(y * 23 + 6) * 3] == 255);
  for (int x = 0; x < 23; x++) CHECK(im.data[x * 3] == 255);
  /* 'e' after a digit is the small exponent e (top rows empty); a lone E is a capital */
  CHECK(im.data[((1 + 0) * 23 + 13 + 1) * 3 + 1] == 255 &&
        im.data[((1 + 4) * 23 + 13 + 1) * 3 + 1] == 0);
  cm_image_text(&im, 1, 1, "E", 1, red);
  CHECK(im.data[((1 + 0) * 23 + 1 + 1) * 3 + 1] == 0);
  /* text running off the image is clipped, not written out of bounds */
  cm_image_text(&im, 20, 5, "888", 2, red);
  cm_image_free(&im);
}

static bool near_colour(const cm_image *im, double fx, double fy, const uint8_t rgb[3]) {
  int cx = (int)lround(fx), cy = (int)lround(fy);
  for (int dy = -1; dy <= 1; dy++)
    for (int dx = -1; dx <= 1; dx++) {
      int x = cx + dx, y = cy + dy;
      if (x < 0 || y < 0 || x >= im->w || y >= im->h) continue;
      const uint8_t *p = im->data + ((size_t)y * im->w + x) * 3;
      if (p[0] == rgb[0] && p[1] == rgb[1] && p[2] == rgb[2]) return true;
    }
  return false;
}

static void test_plot(void) {
  enum { N = 101 };
  double x[N], y1[N], y2[N], y3[N];
  for (int i = 0; i < N; i++) {
    x[i] = 0.1 * i; /* 0 .. 10 */
    y1[i] = 2 * x[i] + 1;
    y2[i] = 21 - 0.5 * x[i] * x[i] / 5;
    y3[i] = pow(10, -0.3 * x[i]); /* 1 .. 1e-3: a line on log axes */
  }
  y2[50] = NAN; /* a gap */
  cm_plot_series s[2] = {{.label = "loss_rc", .x = x, .y = y1, .n = N, .rgb = {220, 30, 30}},
                         {.label = "loss_ct", .x = x, .y = y2, .n = N, .rgb = {30, 30, 220}}};
  cm_plot_opts o = {.width = 500, .height = 331, .title = "cmae-vit-tiny: loss", .x_label = "step"};
  cm_image im;
  cm_plot_frame f;
  cm_err err = {0};
  CHECK(cm_plot_render(s, 2, &o, &im, &f, &err) == CM_OK);
  CHECK(im.w == 500 && im.h == 331 && im.c == 3);
  CHECK(f.x0 < f.x1 && f.y0 < f.y1 && f.xmin <= 0 && f.xmax >= 10 && f.ymin <= 1 && f.ymax >= 21);
  int hits = 0, tried = 0;
  for (int i = 5; i <= 60; i += 5) { /* below the legend */
    double px, py;
    cm_plot_map(&f, x[i], y1[i], &px, &py);
    tried++;
    hits += near_colour(&im, px, py, s[0].rgb);
    cm_plot_map(&f, x[i], y2[i], &px, &py);
    if (i != 50) CHECK_MSG(near_colour(&im, px, py, s[1].rgb), "series 2 at x=%g", x[i]);
  }
  CHECK_MSG(hits == tried, "series 1: %d of %d points", hits, tried);
  /* far from both lines (bottom right of the area): no series colour */
  double px, py;
  cm_plot_map(&f, 9.5, 3, &px, &py);
  CHECK(!near_colour(&im, px, py, s[0].rgb) && !near_colour(&im, px, py, s[1].rgb));
  /* the gap at x = 5 leaves no blue there */
  cm_plot_map(&f, 5.0, y2[50], &px, &py);
  CHECK(!near_colour(&im, px, py, s[1].rgb));
  /* axes (black) and tick labels (dark pixels left of the area) */
  const uint8_t black[3] = {0, 0, 0};
  CHECK(near_colour(&im, f.x0, (f.y0 + f.y1) / 2.0, black));
  int dark = 0;
  for (int y = f.y0; y <= f.y1; y++)
    for (int xx = 0; xx < f.x0 - 5; xx++) dark += im.data[(y * im.w + xx) * 3] == 0;
  CHECK_MSG(dark > 50, "%d label pixels", dark);
  int legend_red = 0; /* the legend swatch, top right */
  for (int yy = f.y0; yy < f.y0 + 40; yy++)
    for (int xx = f.x1 - 150; xx < f.x1; xx++) {
      const uint8_t *p = im.data + (yy * im.w + xx) * 3;
      legend_red += p[0] == 220 && p[1] == 30;
    }
  CHECK(legend_red >= 16);
  char path[] = "/tmp/cmaec_plot_XXXXXX.png";
  tmp_png(path);
  CHECK(cm_png_write(path, &im, &err) == CM_OK);
  int w, h;
  uint8_t *rd = read_png_simple(path, &w, &h, 3);
  CHECK(rd && w == 500 && h == 331 && memcmp(rd, im.data, 500 * 331 * 3) == 0);
  free(rd);
  cm_image_free(&im);

  /* log y */
  cm_plot_series l = {.label = "lr", .x = x, .y = y3, .n = N, .rgb = {0, 150, 0}};
  cm_plot_opts lo = {.log_y = true};
  CHECK(cm_plot_render(&l, 1, &lo, &im, &f, &err) == CM_OK);
  CHECK(im.w == 640 && im.h == 400);
  CHECK(f.log_y && f.ymin == -3 && f.ymax == 0);
  for (int i = 10; i <= 100; i += 15) {
    cm_plot_map(&f, x[i], y3[i], &px, &py);
    CHECK_MSG(near_colour(&im, px, py, l.rgb), "log series at x=%g", x[i]);
  }
  /* straight on log axes: the midpoint of the ends lies on the drawn line */
  double ax, ay, bx, by;
  cm_plot_map(&f, x[0], y3[0], &ax, &ay);
  cm_plot_map(&f, x[100], y3[100], &bx, &by);
  CHECK(near_colour(&im, (ax + bx) / 2, (ay + by) / 2, l.rgb));
  cm_image_free(&im);
  CHECK(cm_png_write(path, &im, &err) == CM_EINVALID); /* freed image */
  remove(path);

  /* degenerate: no series, constant series */
  CHECK(cm_plot_render(NULL, 0, NULL, &im, &f, &err) == CM_OK);
  cm_image_free(&im);
  double c1[3] = {4, 4, 4};
  cm_plot_series cs = {.label = NULL, .x = c1, .y = c1, .n = 3, .rgb = {1, 2, 3}};
  CHECK(cm_plot_render(&cs, 1, NULL, &im, &f, &err) == CM_OK);
  cm_plot_map(&f, 4, 4, &px, &py);
  CHECK(near_colour(&im, px, py, cs.rgb));
  cm_image_free(&im);
  double huge[2] = {-1e308, 1e308};
  cm_plot_series hs = {.x = huge, .y = c1, .n = 2};
  CHECK(cm_plot_render(&hs, 1, NULL, &im, &f, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "overflows");
  cm_plot_opts tiny = {.width = 50, .height = 50};
  CHECK(cm_plot_render(&cs, 1, &tiny, &im, &f, &err) == CM_EINVALID);
}

TEST_MAIN(TEST(test_grid_png), TEST(test_font), TEST(test_plot))
