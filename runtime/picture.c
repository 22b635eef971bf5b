/* runtime/picture.c — images out: PNG files (libpng), tile grids for
 * `cmaec recon`, and line plots of training curves drawn with a built-in
 * 5x7 bitmap font (no font files, no plotting library). */
#include "training.h"

#include <errno.h>
#include <math.h>
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

cm_status cm_image_alloc(cm_image *im, int width, int height, int channels, uint8_t fill,
                         cm_err *err) {
  memset(im, 0, sizeof *im);
  if (width < 1 || height < 1 || width > 65535 || height > 65535)
    return cm_errorf(err, CM_EINVALID, "image: size %dx%d outside 1..65535", width, height);
  if (channels != 1 && channels != 3)
    return cm_errorf(err, CM_EINVALID, "image: %d channels, must be 1 (gray) or 3 (RGB)", channels);
  size_t n = (size_t)width * (size_t)height * (size_t)channels;
  im->data = malloc(n);
  if (!im->data) return cm_errorf(err, CM_EINTERNAL, "image: out of memory (%zu bytes)", n);
  memset(im->data, fill, n);
  im->w = width;
  im->h = height;
  im->c = channels;
  return CM_OK;
}

/* libpng reports errors by longjmp; the message is kept for cm_errorf. */
typedef struct png_ctx {
  jmp_buf jb;
  char msg[256];
} png_ctx;

static void on_png_error(png_structp png, png_const_charp msg) {
  png_ctx *c = png_get_error_ptr(png);
  snprintf(c->msg, sizeof c->msg, "%s", msg);
  longjmp(c->jb, 1);
}
static void on_png_warning(png_structp png, png_const_charp msg) {
  (void)png;
  (void)msg;
}

cm_status cm_png_write(const char *path, const cm_image *im, cm_err *err) {
  if (!im->data || im->w < 1 || im->h < 1 || (im->c != 1 && im->c != 3))
    return cm_errorf(err, CM_EINVALID, "%s: image %dx%d with %d channels cannot be written", path,
                     im->w, im->h, im->c);
  FILE *f = fopen(path, "wb");
  if (!f) return cm_errorf(err, CM_EINVALID, "%s: cannot create: %s", path, strerror(errno));
  png_ctx ctx = {.msg = ""};
  png_structp png =
      png_create_write_struct(PNG_LIBPNG_VER_STRING, &ctx, on_png_error, on_png_warning);
  png_infop info = png ? png_create_info_struct(png) : NULL;
  if (!png || !info) {
    png_destroy_write_struct(&png, &info);
    fclose(f);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  }
  if (setjmp(ctx.jb)) {
    png_destroy_write_struct(&png, &info);
    fclose(f);
    remove(path);
    return cm_errorf(err, CM_EINVALID, "%s: cannot write PNG: %s", path, ctx.msg);
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, (png_uint_32)im->w, (png_uint_32)im->h, 8,
               im->c == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  size_t stride = (size_t)im->w * (size_t)im->c;
  for (int y = 0; y < im->h; y++) png_write_row(png, im->data + (size_t)y * stride);
  png_write_end(png, NULL);
  png_destroy_write_struct(&png, &info);
  if (fclose(f) != 0)
    return cm_errorf(err, CM_EINVALID, "%s: cannot write: %s", path, strerror(errno));
  return CM_OK;
}

cm_status cm_png_read(const char *path, cm_image *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  int fd;
  size_t size;
  cm_status ost = cm_file_open_regular(path, &fd, &size, err);
  if (ost) return ost;
  FILE *f = fdopen(fd, "rb");
  if (!f) {
    close(fd);
    return cm_errorf(err, CM_EINTERNAL, "%s: cannot open: %s", path, strerror(errno));
  }
  png_ctx ctx = {.msg = ""};
  png_structp png =
      png_create_read_struct(PNG_LIBPNG_VER_STRING, &ctx, on_png_error, on_png_warning);
  png_infop info = png ? png_create_info_struct(png) : NULL;
  if (!png || !info) {
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  }
  uint8_t *volatile data = NULL;
  if (setjmp(ctx.jb)) {
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    free(data);
    return cm_errorf(err, CM_EINVALID, "%s: not a readable PNG: %s", path, ctx.msg);
  }
  png_init_io(png, f);
  png_set_user_limits(png, 65535, 65535);
  png_read_info(png, info);
  int ct = png_get_color_type(png, info);
  /* everything to 8-bit gray or RGB, alpha dropped */
  png_set_expand(png);
  png_set_strip_16(png);
  png_set_strip_alpha(png);
  if (ct == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  png_read_update_info(png, info);
  int w = (int)png_get_image_width(png, info), h = (int)png_get_image_height(png, info);
  int ch = png_get_channels(png, info);
  if (ch != 1 && ch != 3) png_error(png, "unsupported channel layout");
  size_t stride = png_get_rowbytes(png, info);
  if (stride != (size_t)w * (size_t)ch) png_error(png, "unexpected row size");
  data = malloc(stride * (size_t)h);
  if (!data) png_error(png, "out of memory");
  for (int y = 0; y < h; y++) png_read_row(png, data + (size_t)y * stride, NULL);
  png_read_end(png, NULL);
  png_destroy_read_struct(&png, &info, NULL);
  fclose(f);
  out->w = w;
  out->h = h;
  out->c = ch;
  out->data = data;
  return CM_OK;
}

cm_status cm_image_grid(const cm_image *tiles, int rows, int cols, int gap, uint8_t background,
                        cm_image *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  if (rows < 1 || cols < 1 || gap < 0)
    return cm_errorf(err, CM_EINVALID,
                     "image grid: %d rows, %d cols, gap %d: need >= 1, >= 1, >= 0", rows, cols,
                     gap);
  int tw = tiles[0].w, th = tiles[0].h, ch = 1;
  for (int i = 0; i < rows * cols; i++) {
    const cm_image *t = &tiles[i];
    if (!t->data || t->w != tw || t->h != th || (t->c != 1 && t->c != 3))
      return cm_errorf(err, CM_EINVALID,
                       "image grid: tile %d is %dx%dx%d, tile 0 is %dx%d (1 or 3 channels)", i,
                       t->w, t->h, t->c, tw, th);
    if (t->c == 3) ch = 3;
  }
  int64_t W = (int64_t)cols * tw + (int64_t)(cols - 1) * gap;
  int64_t H = (int64_t)rows * th + (int64_t)(rows - 1) * gap;
  if (W > 65535 || H > 65535)
    return cm_errorf(err, CM_EINVALID, "image grid: %lldx%lld pixels is too large", (long long)W,
                     (long long)H);
  cm_status st = cm_image_alloc(out, (int)W, (int)H, ch, background, err);
  if (st) return st;
  for (int i = 0; i < rows * cols; i++) {
    const cm_image *t = &tiles[i];
    int ox = (i % cols) * (tw + gap), oy = (i / cols) * (th + gap);
    for (int y = 0; y < th; y++)
      for (int x = 0; x < tw; x++) {
        uint8_t *d = out->data + ((size_t)(oy + y) * out->w + (size_t)(ox + x)) * ch;
        const uint8_t *s = t->data + ((size_t)y * tw + (size_t)x) * t->c;
        for (int c = 0; c < ch; c++) d[c] = s[t->c == 1 ? 0 : c];
      }
  }
  return CM_OK;
}

/* ---- the 5x7 font: 7 rows of 5 bits, bit 4 the leftmost column ---------- */

static const struct {
  char c;
  uint8_t rows[7];
} font[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}},
    {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}},
    {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}},
    {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}},
    {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}},
    {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'A', {0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11}},
    {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}},
    {'D', {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C}},
    {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}},
    {'F', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}},
    {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C}},
    {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}},
    {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}},
    {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}},
    {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}},
    {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}},
    {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}},
    {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}},
    {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}},
    {'X', {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11}},
    {'Y', {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}},
    {'Z', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}},
    {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}},
    {':', {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00}},
    {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
    {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F}},
    {'=', {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00}},
    {',', {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08}},
    {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}},
    {' ', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}},
};

/* the exponent 'e' of numbers ("1e-3"); other letters are upper case */
static const uint8_t small_e[7] = {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E};

static const uint8_t *glyph(char c) {
  static const uint8_t box[7] = {0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F};
  for (size_t i = 0; i < sizeof font / sizeof font[0]; i++)
    if (font[i].c == c) return font[i].rows;
  if (c >= 'a' && c <= 'z') return glyph((char)(c - 'a' + 'A')); /* one case only */
  return box;
}

static void put_px(cm_image *im, int x, int y, const uint8_t rgb[3]) {
  if (x < 0 || y < 0 || x >= im->w || y >= im->h) return;
  uint8_t *p = im->data + ((size_t)y * im->w + (size_t)x) * im->c;
  if (im->c == 1)
    p[0] = (uint8_t)((rgb[0] * 77 + rgb[1] * 150 + rgb[2] * 29) >> 8);
  else
    memcpy(p, rgb, 3);
}

void cm_image_text(cm_image *im, int x, int y, const char *text, int scale, const uint8_t rgb[3]) {
  if (scale < 1) scale = 1;
  for (const char *c = text; *c; c++, x += 6 * scale) {
    bool exponent = *c == 'e' && c > text && ((c[-1] >= '0' && c[-1] <= '9') || c[-1] == '.');
    const uint8_t *g = exponent ? small_e : glyph(*c);
    for (int r = 0; r < 7; r++)
      for (int col = 0; col < 5; col++)
        if (g[r] & (0x10 >> col))
          for (int dy = 0; dy < scale; dy++)
            for (int dx = 0; dx < scale; dx++)
              put_px(im, x + col * scale + dx, y + r * scale + dy, rgb);
  }
}

static int text_width(const char *s, int scale) {
  int n = (int)strlen(s);
  return n ? (6 * n - 1) * scale : 0;
}

/* ---- plots ------------------------------------------------------------- */

void cm_plot_map(const cm_plot_frame *f, double x, double y, double *px, double *py) {
  double yv = f->log_y ? log10(y) : y;
  *px = f->x0 + (x - f->xmin) / (f->xmax - f->xmin) * (f->x1 - f->x0);
  *py = f->y1 - (yv - f->ymin) / (f->ymax - f->ymin) * (f->y1 - f->y0);
}

/* A 1, 2 or 5 times a power of ten near range / target. */
static double nice_step(double range, int target) {
  double raw = range / target, p = pow(10, floor(log10(raw))), m = raw / p;
  return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
}

static bool point_ok(const cm_plot_series *s, int64_t i, bool log_y) {
  return isfinite(s->x[i]) && isfinite(s->y[i]) && (!log_y || s->y[i] > 0);
}

/* Clipped to the plot area. */
static void plot_px(cm_image *im, const cm_plot_frame *f, int x, int y, const uint8_t rgb[3]) {
  if (x < f->x0 || x > f->x1 || y < f->y0 || y > f->y1) return;
  put_px(im, x, y, rgb);
}

static void line(cm_image *im, const cm_plot_frame *f, double ax, double ay, double bx, double by,
                 const uint8_t rgb[3]) {
  /* clamp far-off coordinates so the step count stays bounded */
  double lim = 1e5;
  ax = fmax(-lim, fmin(lim, ax)), ay = fmax(-lim, fmin(lim, ay));
  bx = fmax(-lim, fmin(lim, bx)), by = fmax(-lim, fmin(lim, by));
  double dx = bx - ax, dy = by - ay;
  int steps = (int)ceil(fmax(fabs(dx), fabs(dy)));
  for (int i = 0; i <= steps; i++) {
    double t = steps ? (double)i / steps : 0;
    int x = (int)lround(ax + t * dx), y = (int)lround(ay + t * dy);
    plot_px(im, f, x, y, rgb); /* two pixels thick */
    plot_px(im, f, x, y + 1, rgb);
  }
}

cm_status cm_plot_render(const cm_plot_series *series, int n_series, const cm_plot_opts *opts,
                         cm_image *out, cm_plot_frame *frame, cm_err *err) {
  cm_plot_opts o = opts ? *opts : (cm_plot_opts){0};
  if (o.width == 0) o.width = 640;
  if (o.height == 0) o.height = 400;
  if (o.width < 160 || o.height < 120)
    return cm_errorf(err, CM_EINVALID, "plot: %dx%d is too small (at least 160x120)", o.width,
                     o.height);
  if (n_series < 0) return cm_errorf(err, CM_EINVALID, "plot: %d series", n_series);
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  for (int s = 0; s < n_series; s++) {
    if (series[s].n < 0 || (series[s].n > 0 && (!series[s].x || !series[s].y)))
      return cm_errorf(err, CM_EINVALID, "plot: series %d (%s) has %lld points and no data", s,
                       series[s].label ? series[s].label : "", (long long)series[s].n);
    for (int64_t i = 0; i < series[s].n; i++) {
      if (!point_ok(&series[s], i, o.log_y)) continue;
      double y = o.log_y ? log10(series[s].y[i]) : series[s].y[i];
      xmin = fmin(xmin, series[s].x[i]), xmax = fmax(xmax, series[s].x[i]);
      ymin = fmin(ymin, y), ymax = fmax(ymax, y);
    }
  }
  if (!(xmin <= xmax)) xmin = 0, xmax = 1;
  if (!(ymin <= ymax)) ymin = 0, ymax = 1;
  if (xmax - xmin < 1e-12 * fmax(1, fabs(xmax))) xmin -= 0.5, xmax += 0.5;
  if (ymax - ymin < 1e-12 * fmax(1, fabs(ymax))) ymin -= 0.5, ymax += 0.5;
  if (!isfinite(xmax - xmin) || !isfinite(ymax - ymin))
    return cm_errorf(err, CM_EINVALID, "plot: data range [%g, %g] x [%g, %g] overflows", xmin, xmax,
                     ymin, ymax);
  double ystep;
  if (o.log_y) {
    ymin = floor(ymin), ymax = ceil(ymax);
    if (ymax <= ymin) ymax = ymin + 1;
    ystep = ceil((ymax - ymin) / 8);
  } else {
    ystep = nice_step(ymax - ymin, 5);
    ymin = floor(ymin / ystep) * ystep, ymax = ceil(ymax / ystep) * ystep;
  }
  double xstep = nice_step(xmax - xmin, 6);
  cm_status st = cm_image_alloc(out, o.width, o.height, 3, 255, err);
  if (st) return st;
  cm_plot_frame f = {.x0 = 64,
                     .y0 = o.title ? 22 : 12,
                     .x1 = o.width - 16,
                     .y1 = o.height - (o.x_label ? 38 : 26),
                     .xmin = xmin,
                     .xmax = xmax,
                     .ymin = ymin,
                     .ymax = ymax,
                     .log_y = o.log_y};
  static const uint8_t black[3] = {0, 0, 0}, grid[3] = {225, 225, 225};
  char label[32];
  /* y grid, ticks and labels */
  for (int i = 0;; i++) {
    double v = ymin + i * ystep;
    if (v > ymax + 1e-9 * ystep) break;
    int py = (int)lround(f.y1 - (v - ymin) / (ymax - ymin) * (f.y1 - f.y0));
    for (int x = f.x0; x <= f.x1; x++) put_px(out, x, py, grid);
    for (int x = f.x0 - 4; x < f.x0; x++) put_px(out, x, py, black);
    if (o.log_y)
      snprintf(label, sizeof label, "1e%d", (int)lround(v));
    else
      snprintf(label, sizeof label, "%.4g", fabs(v) < 1e-9 * ystep ? 0.0 : v);
    cm_image_text(out, f.x0 - 7 - text_width(label, 1), py - 3, label, 1, black);
  }
  /* short log ranges: also 2x and 5x each decade */
  for (double dec = ymin; o.log_y && ymax - ymin <= 2 && dec < ymax; dec += 1)
    for (int m = 2; m <= 5; m += 3) {
      double v = dec + log10(m);
      int py = (int)lround(f.y1 - (v - ymin) / (ymax - ymin) * (f.y1 - f.y0));
      for (int x = f.x0; x <= f.x1; x++) put_px(out, x, py, grid);
      for (int x = f.x0 - 3; x < f.x0; x++) put_px(out, x, py, black);
      snprintf(label, sizeof label, "%.4g", pow(10, v));
      cm_image_text(out, f.x0 - 7 - text_width(label, 1), py - 3, label, 1, black);
    }
  /* x grid, ticks and labels (ticks at multiples of the step inside the range) */
  for (double v = ceil(xmin / xstep) * xstep; v <= xmax + 1e-9 * xstep; v += xstep) {
    int px = (int)lround(f.x0 + (v - xmin) / (xmax - xmin) * (f.x1 - f.x0));
    for (int y = f.y0; y <= f.y1; y++) put_px(out, px, y, grid);
    for (int y = f.y1 + 1; y <= f.y1 + 4; y++) put_px(out, px, y, black);
    snprintf(label, sizeof label, "%.4g", fabs(v) < 1e-9 * xstep ? 0.0 : v);
    cm_image_text(out, px - text_width(label, 1) / 2, f.y1 + 7, label, 1, black);
  }
  /* axes */
  for (int x = f.x0; x <= f.x1; x++) put_px(out, x, f.y1, black);
  for (int y = f.y0; y <= f.y1; y++) put_px(out, f.x0, y, black);
  /* curves */
  for (int s = 0; s < n_series; s++) {
    const cm_plot_series *se = &series[s];
    bool have = false;
    double px0 = 0, py0 = 0;
    for (int64_t i = 0; i < se->n; i++) {
      if (!point_ok(se, i, o.log_y)) {
        have = false; /* a gap */
        continue;
      }
      double px, py;
      cm_plot_map(&f, se->x[i], se->y[i], &px, &py);
      if (have)
        line(out, &f, px0, py0, px, py, se->rgb);
      else
        line(out, &f, px, py, px, py, se->rgb);
      px0 = px, py0 = py, have = true;
    }
  }
  /* legend: top right inside the plot area */
  int lw = 0, nl = 0;
  for (int s = 0; s < n_series; s++)
    if (series[s].label && *series[s].label) {
      int w = text_width(series[s].label, 1);
      lw = w > lw ? w : lw;
      nl++;
    }
  if (nl) {
    int bw = lw + 30, bh = nl * 11 + 6, bx = f.x1 - bw - 6, by = f.y0 + 6;
    static const uint8_t white[3] = {255, 255, 255}, frame_c[3] = {120, 120, 120};
    for (int y = by; y <= by + bh; y++)
      for (int x = bx; x <= bx + bw; x++)
        put_px(out, x, y, (y == by || y == by + bh || x == bx || x == bx + bw) ? frame_c : white);
    int row = 0;
    for (int s = 0; s < n_series; s++) {
      if (!series[s].label || !*series[s].label) continue;
      int ty = by + 4 + row * 11;
      for (int x = bx + 4; x < bx + 20; x++) {
        put_px(out, x, ty + 3, series[s].rgb);
        put_px(out, x, ty + 4, series[s].rgb);
      }
      cm_image_text(out, bx + 24, ty, series[s].label, 1, black);
      row++;
    }
  }
  if (o.title) cm_image_text(out, (o.width - text_width(o.title, 1)) / 2, 6, o.title, 1, black);
  if (o.x_label)
    cm_image_text(out, (f.x0 + f.x1 - text_width(o.x_label, 1)) / 2, o.height - 14, o.x_label, 1,
                  black);
  if (frame) *frame = f;
  return CM_OK;
}
