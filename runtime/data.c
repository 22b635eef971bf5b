/* runtime/data.c — datasets (Fashion-MNIST IDX files, image folders of PNG
 * and JPEG) and the prefetching loader: per-epoch Philox permutation, rank
 * shards, worker threads filling a ring of batches (docs/data.md). */
#include "runtime/training.h"

#include <dirent.h>
#include <errno.h>
#include <jpeglib.h>
#include <png.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define DATA_MAX_WARNINGS 5

void cm_image_free(cm_image *im) {
  if (!im) return;
  free(im->data);
  im->data = NULL;
  im->h = im->w = im->c = 0;
}

/* ---- datasets -------------------------------------------------------------- */

typedef enum { DS_MEMORY, DS_FOLDER } ds_kind;

struct cm_dataset {
  ds_kind kind;
  int64_t n;
  int n_classes, chans;
  char **class_names;
  int32_t *labels;
  /* DS_MEMORY: n images of h x w x chans */
  int h, w;
  uint8_t *pixels;
  /* DS_FOLDER: one path per sample, and whether it was found corrupt */
  char **paths;
  atomic_uchar *bad;
  atomic_llong skipped;
  int64_t max_pixels; /* the largest image decoded (h x w) */
};

static cm_dataset *ds_new(void) {
  cm_dataset *d = calloc(1, sizeof *d);
  if (d) {
    atomic_init(&d->skipped, 0);
    d->max_pixels = CM_DEFAULT_MAX_PIXELS;
  }
  return d;
}

void cm_dataset_set_max_pixels(cm_dataset *d, int64_t max_pixels) {
  d->max_pixels = max_pixels > 0 ? max_pixels : CM_DEFAULT_MAX_PIXELS;
}

int64_t cm_image_file_max_bytes(int64_t max_pixels) {
  return 8 * max_pixels + ((int64_t)16 << 20);
}

int64_t cm_image_decode_bytes(int64_t max_pixels) {
  /* the file with 3 bytes per decoded pixel, or 3 decoded and 3 converted ones */
  return cm_image_file_max_bytes(max_pixels) + 3 * max_pixels;
}

void cm_dataset_free(cm_dataset *d) {
  if (!d) return;
  for (int k = 0; k < d->n_classes; k++) free(d->class_names ? d->class_names[k] : NULL);
  free(d->class_names);
  if (d->paths)
    for (int64_t i = 0; i < d->n; i++) free(d->paths[i]);
  free(d->paths);
  free((void *)d->bad);
  free(d->labels);
  free(d->pixels);
  free(d);
}

int64_t cm_dataset_size(const cm_dataset *d) {
  return d->n;
}
int cm_dataset_n_classes(const cm_dataset *d) {
  return d->n_classes;
}
const char *cm_dataset_class_name(const cm_dataset *d, int k) {
  return k >= 0 && k < d->n_classes ? d->class_names[k] : NULL;
}
int32_t cm_dataset_label(const cm_dataset *d, int64_t i) {
  return i >= 0 && i < d->n ? d->labels[i] : -1;
}
int cm_dataset_channels(const cm_dataset *d) {
  return d->chans;
}
int64_t cm_dataset_skipped(const cm_dataset *d) {
  return atomic_load(&((cm_dataset *)d)->skipped);
}

/* ---- IDX (gzip) ------------------------------------------------------------ */

static cm_status gz_read_all(gzFile f, void *buf, size_t len, const char *path, const char *what,
                             cm_err *err) {
  size_t got = 0;
  while (got < len) {
    unsigned chunk = len - got > (1u << 30) ? (1u << 30) : (unsigned)(len - got);
    int r = gzread(f, (char *)buf + got, chunk);
    if (r < 0) {
      int code;
      const char *m = gzerror(f, &code);
      return cm_errorf(err, CM_EINVALID, "%s: %s: gzip stream error: %s", path, what, m);
    }
    if (r == 0)
      return cm_errorf(err, CM_EINVALID, "%s: truncated: %s needs %zu bytes, file has %zu", path,
                       what, len, got);
    got += (size_t)r;
  }
  return CM_OK;
}

static uint32_t be32(const unsigned char *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Reads an IDX file of unsigned bytes with rank dims: shape and data (malloc'ed). */
static cm_status idx_read(const char *path, int rank, uint32_t *shape, uint8_t **data,
                          cm_err *err) {
  *data = NULL;
  /* a regular file (a FIFO would block, a device never end); the dims below cap the data */
  int fd;
  size_t size;
  cm_status ost = cm_file_open_regular(path, &fd, &size, err);
  if (ost) return ost;
  gzFile f = gzdopen(fd, "rb");
  if (!f) {
    close(fd);
    return cm_errorf(err, CM_EINVALID, "%s: cannot open: %s", path, strerror(errno));
  }
  unsigned char hdr[4 + 4 * 3];
  cm_status st = gz_read_all(f, hdr, 4 + 4 * (size_t)rank, path, "the IDX header", err);
  if (st) goto done;
  uint32_t magic = be32(hdr), want = 0x0800u | (uint32_t)rank;
  if (magic != want) {
    st = cm_errorf(err, CM_EINVALID,
                   "%s: bad IDX magic 0x%08x: expected 0x%08x (unsigned bytes, rank %d)", path,
                   magic, want, rank);
    goto done;
  }
  size_t total = 1;
  for (int i = 0; i < rank; i++) {
    shape[i] = be32(hdr + 4 + 4 * i);
    if (shape[i] == 0 || shape[i] > (1u << 28) || (i > 0 && shape[i] > 4096)) {
      st = cm_errorf(err, CM_EINVALID, "%s: IDX dim %d = %u is out of range", path, i, shape[i]);
      goto done;
    }
    total *= shape[i];
  }
  if (total > ((size_t)1 << 34)) {
    st = cm_errorf(err, CM_EINVALID, "%s: IDX data of %zu bytes is too large", path, total);
    goto done;
  }
  *data = malloc(total);
  if (!*data) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory for %zu bytes", path, total);
    goto done;
  }
  st = gz_read_all(f, *data, total, path, "the IDX data", err);
  if (!st) {
    unsigned char extra;
    if (gzread(f, &extra, 1) != 0)
      st = cm_errorf(err, CM_EINVALID, "%s: trailing data after %zu IDX bytes", path, total);
  }
done:
  gzclose(f);
  if (st) {
    free(*data);
    *data = NULL;
  }
  return st;
}

static const char *const fmnist_classes[10] = {"T-shirt/top", "Trouser",   "Pullover", "Dress",
                                               "Coat",        "Sandal",    "Shirt",    "Sneaker",
                                               "Bag",         "Ankle boot"};

cm_status cm_dataset_open_idx(const char *images_gz, const char *labels_gz, cm_dataset **out,
                              cm_err *err) {
  *out = NULL;
  uint32_t ishape[3] = {0}, lshape[1] = {0};
  uint8_t *pix = NULL, *lab = NULL;
  cm_status st = idx_read(images_gz, 3, ishape, &pix, err);
  if (st) return st;
  st = idx_read(labels_gz, 1, lshape, &lab, err);
  if (st) {
    free(pix);
    return st;
  }
  if (ishape[0] != lshape[0]) {
    free(pix);
    free(lab);
    return cm_errorf(err, CM_EINVALID, "%s: %u images but %s has %u labels", images_gz, ishape[0],
                     labels_gz, lshape[0]);
  }
  cm_dataset *d = ds_new();
  if (!d || !(d->labels = malloc(sizeof(int32_t) * lshape[0]))) {
    free(pix);
    free(lab);
    cm_dataset_free(d);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", images_gz);
  }
  d->kind = DS_MEMORY;
  d->n = ishape[0];
  d->h = (int)ishape[1];
  d->w = (int)ishape[2];
  d->chans = 1;
  d->pixels = pix;
  int maxl = 0;
  for (uint32_t i = 0; i < lshape[0]; i++) {
    d->labels[i] = lab[i];
    if (lab[i] > maxl) maxl = lab[i];
  }
  free(lab);
  d->n_classes = maxl + 1;
  d->class_names = calloc((size_t)d->n_classes, sizeof(char *));
  if (!d->class_names) {
    d->n_classes = 0;
    cm_dataset_free(d);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", images_gz);
  }
  for (int k = 0; k < d->n_classes; k++) {
    char buf[32];
    snprintf(buf, sizeof buf, "%d", k);
    d->class_names[k] = strdup(d->n_classes == 10 ? fmnist_classes[k] : buf);
    if (!d->class_names[k]) {
      cm_dataset_free(d);
      return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", images_gz);
    }
  }
  *out = d;
  return CM_OK;
}

cm_status cm_dataset_open_fmnist(const char *dir, bool train, cm_dataset **out, cm_err *err) {
  if (!dir) dir = getenv("CMAEC_FMNIST_DIR");
  if (!dir || !*dir) dir = "/usr/share/datasets/fashion-mnist";
  char ip[4096], lp[4096];
  const char *pre = train ? "train" : "t10k";
  snprintf(ip, sizeof ip, "%s/%s-images-idx3-ubyte.gz", dir, pre);
  snprintf(lp, sizeof lp, "%s/%s-labels-idx1-ubyte.gz", dir, pre);
  cm_status st = cm_dataset_open_idx(ip, lp, out, err);
  if (st) return st;
  int64_t want = train ? 60000 : 10000;
  if ((*out)->n != want || (*out)->h != 28 || (*out)->w != 28 || (*out)->n_classes != 10) {
    cm_errorf(err, CM_EINVALID,
              "%s: Fashion-MNIST %s split must be %lld 28x28 images in 10 classes, got %lld %dx%d "
              "in %d",
              ip, pre, (long long)want, (long long)(*out)->n, (*out)->h, (*out)->w,
              (*out)->n_classes);
    cm_dataset_free(*out);
    *out = NULL;
    return CM_EINVALID;
  }
  return CM_OK;
}

/* ---- image folder ------------------------------------------------------------ */

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool has_image_ext(const char *name) {
  const char *dot = strrchr(name, '.');
  return dot && (!strcasecmp(dot, ".png") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg"));
}

typedef struct strvec {
  char **v;
  size_t n, cap;
} strvec;

static bool strvec_push(strvec *s, char *x) {
  if (!x) return false;
  if (s->n == s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 16;
    char **v = realloc(s->v, cap * sizeof *v);
    if (!v) {
      free(x);
      return false;
    }
    s->v = v;
    s->cap = cap;
  }
  s->v[s->n++] = x;
  return true;
}

static void strvec_free(strvec *s) {
  for (size_t i = 0; i < s->n; i++) free(s->v[i]);
  free(s->v);
  s->v = NULL;
  s->n = s->cap = 0;
}

/* Entries of dir that are directories (want_dirs) or regular image files, sorted. */
static cm_status list_dir(const char *dir, bool want_dirs, strvec *out, cm_err *err) {
  DIR *dp = opendir(dir);
  if (!dp)
    return cm_errorf(err, CM_EINVALID, "%s: cannot open directory: %s", dir, strerror(errno));
  struct dirent *e;
  while ((e = readdir(dp))) {
    if (e->d_name[0] == '.') continue;
    char p[4096];
    if ((size_t)snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= sizeof p) continue;
    struct stat sb;
    if (stat(p, &sb) != 0) continue;
    bool ok = want_dirs ? S_ISDIR(sb.st_mode) : (S_ISREG(sb.st_mode) && has_image_ext(e->d_name));
    if (ok && !strvec_push(out, strdup(e->d_name))) {
      closedir(dp);
      return cm_errorf(err, CM_EINTERNAL, "%s: out of memory listing", dir);
    }
  }
  closedir(dp);
  if (out->n) qsort(out->v, out->n, sizeof(char *), cmp_str);
  return CM_OK;
}

cm_status cm_dataset_open_folder(const char *dir, int chans, cm_dataset **out, cm_err *err) {
  *out = NULL;
  if (chans != 1 && chans != 3)
    return cm_errorf(err, CM_EINVALID, "%s: image folder channels %d must be 1 or 3", dir, chans);
  strvec classes = {0}, paths = {0};
  size_t nlab = 0, caplab = 0;
  int32_t *labels = NULL;
  cm_status st = list_dir(dir, true, &classes, err);
  if (st) return st;
  if (classes.n == 0 || classes.n > 1000000) {
    strvec_free(&classes);
    return cm_errorf(err, CM_EINVALID, "%s: image folder has no class subdirectories", dir);
  }
  for (size_t k = 0; k < classes.n && !st; k++) {
    char cdir[4096];
    snprintf(cdir, sizeof cdir, "%s/%s", dir, classes.v[k]);
    strvec files = {0};
    st = list_dir(cdir, false, &files, err);
    for (size_t i = 0; i < files.n && !st; i++) {
      char p[4096];
      snprintf(p, sizeof p, "%s/%s", cdir, files.v[i]);
      if (!strvec_push(&paths, strdup(p))) {
        st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
        break;
      }
      if (nlab == caplab) {
        caplab = caplab ? caplab * 2 : 64;
        int32_t *l = realloc(labels, caplab * sizeof *l);
        if (!l) {
          st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
          break;
        }
        labels = l;
      }
      labels[nlab++] = (int32_t)k;
    }
    strvec_free(&files);
  }
  if (!st && paths.n == 0)
    st = cm_errorf(err, CM_EINVALID, "%s: image folder has no *.png / *.jpg / *.jpeg files", dir);
  cm_dataset *d = st ? NULL : ds_new();
  if (!st && (!d || !(d->bad = calloc(paths.n, sizeof(atomic_uchar)))))
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
  if (st) {
    cm_dataset_free(d);
    strvec_free(&classes);
    strvec_free(&paths);
    free(labels);
    return st;
  }
  d->kind = DS_FOLDER;
  d->n = (int64_t)paths.n;
  d->chans = chans;
  d->paths = paths.v;
  d->labels = labels;
  d->n_classes = (int)classes.n;
  d->class_names = classes.v;
  for (size_t i = 0; i < paths.n; i++) atomic_init(&d->bad[i], 0);
  *out = d;
  return CM_OK;
}

/* ---- decoders -------------------------------------------------------------- */

/* The whole image file, regular files only; *limit is set when it is over the cap. */
static cm_status read_file(const char *path, int64_t max_pixels, unsigned char **buf, size_t *len,
                           bool *limit, cm_err *err) {
  *buf = NULL;
  *len = 0;
  int64_t cap = cm_image_file_max_bytes(max_pixels);
  struct stat sb;
  if (stat(path, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size > cap) {
    *limit = true;
    return cm_errorf(err, CM_EINVALID,
                     "%s: a %lld-byte image file, more than the %lld bytes data.max_pixels %lld "
                     "allows (8 per pixel + 16 MiB)",
                     path, (long long)sb.st_size, (long long)cap, (long long)max_pixels);
  }
  char *data;
  cm_status st = cm_read_file_max(path, (size_t)cap, "an image file", &data, len, err);
  *buf = (unsigned char *)data;
  return st;
}

/* An image's header size against the limit, before anything is decoded. */
static cm_status check_pixels(const char *path, uint64_t w, uint64_t h, int64_t max_pixels,
                              bool *limit, cm_err *err) {
  if (w * h <= (uint64_t)max_pixels) return CM_OK;
  *limit = true;
  return cm_errorf(err, CM_EINVALID,
                   "%s: %llux%llu = %llu pixels, more than data.max_pixels %lld (raise it with "
                   "--set data.max_pixels=N, or shrink the image)",
                   path, (unsigned long long)w, (unsigned long long)h, (unsigned long long)(w * h),
                   (long long)max_pixels);
}

/* libpng's simplified API catches its own longjmp and reports through the return value. */
static cm_status decode_png(const char *path, const unsigned char *buf, size_t len,
                            int64_t max_pixels, cm_image *im, bool *limit, cm_err *err) {
  png_image pi;
  memset(&pi, 0, sizeof pi);
  pi.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&pi, buf, len))
    return cm_errorf(err, CM_EINVALID, "%s: corrupt PNG: %s", path, pi.message);
  if (check_pixels(path, pi.width, pi.height, max_pixels, limit, err)) {
    png_image_free(&pi);
    return CM_EINVALID;
  }
  if (pi.width < 1 || pi.height < 1 || pi.width > 16384 || pi.height > 16384) {
    png_image_free(&pi);
    return cm_errorf(err, CM_EINVALID, "%s: PNG size %ux%u out of [1, 16384]", path, pi.width,
                     pi.height);
  }
  bool color = (pi.format & PNG_FORMAT_FLAG_COLOR) != 0;
  pi.format = color ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  im->h = (int)pi.height;
  im->w = (int)pi.width;
  im->c = color ? 3 : 1;
  im->data = malloc(PNG_IMAGE_SIZE(pi));
  if (!im->data) {
    png_image_free(&pi);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  }
  if (!png_image_finish_read(&pi, NULL, im->data, 0, NULL)) {
    cm_errorf(err, CM_EINVALID, "%s: corrupt PNG: %s", path, pi.message);
    png_image_free(&pi);
    cm_image_free(im);
    return CM_EINVALID;
  }
  png_image_free(&pi);
  return CM_OK;
}

typedef struct jpeg_guard {
  struct jpeg_error_mgr mgr;
  jmp_buf jump;
  char msg[JMSG_LENGTH_MAX];
  bool warned;
} jpeg_guard;

static void jpeg_on_error(j_common_ptr cinfo) {
  jpeg_guard *g = (jpeg_guard *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, g->msg);
  longjmp(g->jump, 1);
}

/* A warning (e.g. premature end of data) means the decoded pixels are made up. */
static void jpeg_on_message(j_common_ptr cinfo, int level) {
  jpeg_guard *g = (jpeg_guard *)cinfo->err;
  if (level < 0 && !g->warned) {
    g->warned = true;
    (*cinfo->err->format_message)(cinfo, g->msg);
  }
}

static cm_status decode_jpeg(const char *path, const unsigned char *buf, size_t len,
                             int64_t max_pixels, cm_image *im, bool *limit, cm_err *err) {
  struct jpeg_decompress_struct cinfo;
  jpeg_guard g;
  memset(&g, 0, sizeof g);
  cinfo.err = jpeg_std_error(&g.mgr);
  g.mgr.error_exit = jpeg_on_error;
  g.mgr.emit_message = jpeg_on_message;
  uint8_t *volatile data = NULL;
  if (setjmp(g.jump)) {
    jpeg_destroy_decompress(&cinfo);
    free(data);
    return cm_errorf(err, CM_EINVALID, "%s: corrupt JPEG: %s", path, g.msg);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, buf, (unsigned long)len);
  jpeg_read_header(&cinfo, TRUE);
  if (check_pixels(path, cinfo.image_width, cinfo.image_height, max_pixels, limit, err)) {
    jpeg_destroy_decompress(&cinfo);
    return CM_EINVALID;
  }
  bool gray = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  cinfo.out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  int w = (int)cinfo.output_width, h = (int)cinfo.output_height, c = cinfo.output_components;
  if (w < 1 || h < 1 || w > 16384 || h > 16384 || (c != 1 && c != 3)) {
    jpeg_destroy_decompress(&cinfo);
    return cm_errorf(err, CM_EINVALID, "%s: JPEG %dx%dx%d: size out of [1, 16384] or channels",
                     path, w, h, c);
  }
  data = malloc((size_t)w * h * c);
  if (!data) {
    jpeg_destroy_decompress(&cinfo);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  }
  while (cinfo.output_scanline < cinfo.output_height && !g.warned) {
    JSAMPROW row = data + (size_t)cinfo.output_scanline * w * c;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  if (!g.warned) jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (g.warned) {
    free(data);
    return cm_errorf(err, CM_EINVALID, "%s: corrupt JPEG: %s", path, g.msg);
  }
  im->h = h;
  im->w = w;
  im->c = c;
  im->data = data;
  return CM_OK;
}

static uint8_t luma_u8(const uint8_t *p) {
  int v = (p[0] * 299 + p[1] * 587 + p[2] * 114 + 500) / 1000;
  return (uint8_t)(v > 255 ? 255 : v);
}

static cm_status to_chans(cm_image *im, int chans, const char *path, cm_err *err) {
  if (im->c == chans) return CM_OK;
  size_t n = (size_t)im->h * im->w;
  uint8_t *nd = malloc(n * chans);
  if (!nd) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  for (size_t i = 0; i < n; i++) {
    if (chans == 1)
      nd[i] = luma_u8(im->data + i * 3);
    else
      nd[i * 3] = nd[i * 3 + 1] = nd[i * 3 + 2] = im->data[i];
  }
  free(im->data);
  im->data = nd;
  im->c = chans;
  return CM_OK;
}

cm_status cm_dataset_subset(cm_dataset *d, int64_t n, cm_err *err) {
  if (n < 1)
    return cm_errorf(err, CM_EINVALID, "dataset subset: %lld samples asked, must be >= 1",
                     (long long)n);
  if (n >= d->n) return CM_OK;
  /* sample floor(i * total / n): spread over the whole split, so a folder sorted by
   * class keeps every class; floor(i * total / n) >= i lets it compact in place */
  const int64_t total = d->n;
  size_t sz = (size_t)d->h * d->w * d->chans;
  for (int64_t i = 0; i < n; i++) {
    int64_t src = (int64_t)((__int128)i * total / n);
    d->labels[i] = d->labels[src];
    if (d->kind == DS_MEMORY) {
      if (src != i) memcpy(d->pixels + (size_t)i * sz, d->pixels + (size_t)src * sz, sz);
    } else if (src != i) {
      char *keep = d->paths[src];
      d->paths[src] = NULL;
      free(d->paths[i]);
      d->paths[i] = keep;
      atomic_store(&d->bad[i], atomic_load(&d->bad[src]));
    }
  }
  if (d->kind != DS_MEMORY)
    for (int64_t i = n; i < total; i++) {
      free(d->paths[i]);
      d->paths[i] = NULL;
    }
  d->n = n;
  return CM_OK;
}

/* cm_dataset_get; *limit is set when the image is over the size limits (not corrupt). */
static cm_status dataset_get(const cm_dataset *dc, int64_t i, cm_image *im, bool *limit,
                             cm_err *err) {
  cm_dataset *d = (cm_dataset *)dc; /* only the atomic bad/skipped bookkeeping changes */
  *limit = false;
  memset(im, 0, sizeof *im);
  if (i < 0 || i >= d->n)
    return cm_errorf(err, CM_EINVALID, "dataset: sample %lld out of [0, %lld)", (long long)i,
                     (long long)d->n);
  if (d->kind == DS_MEMORY) {
    size_t sz = (size_t)d->h * d->w * d->chans;
    im->data = malloc(sz);
    if (!im->data) return cm_errorf(err, CM_EINTERNAL, "dataset: out of memory");
    memcpy(im->data, d->pixels + (size_t)i * sz, sz);
    im->h = d->h;
    im->w = d->w;
    im->c = d->chans;
    return CM_OK;
  }
  const char *path = d->paths[i];
  if (atomic_load(&d->bad[i])) /* counted and warned about already: don't decode it again */
    return cm_errorf(err, CM_EINVALID, "%s: skipped: found corrupt before", path);
  unsigned char *buf = NULL;
  size_t len = 0;
  cm_status st = read_file(path, d->max_pixels, &buf, &len, limit, err);
  if (!st) {
    if (len >= 8 && !memcmp(buf, "\x89PNG\r\n\x1a\n", 8))
      st = decode_png(path, buf, len, d->max_pixels, im, limit, err);
    else if (len >= 3 && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF)
      st = decode_jpeg(path, buf, len, d->max_pixels, im, limit, err);
    else
      st = cm_errorf(err, CM_EINVALID, "%s: neither a PNG nor a JPEG (bad signature)", path);
  }
  free(buf);
  if (!st) st = to_chans(im, d->chans, path, err);
  if (st) {
    cm_image_free(im);
    if (st == CM_EINVALID && !*limit && atomic_exchange(&d->bad[i], 1) == 0) {
      long long k = atomic_fetch_add(&d->skipped, 1);
      if (k < DATA_MAX_WARNINGS)
        fprintf(stderr, "cmaec: warning: skipping %s\n", err ? err->msg : path);
      else if (k == DATA_MAX_WARNINGS)
        fprintf(stderr, "cmaec: warning: more corrupt images; see the skipped count\n");
    }
  }
  return st;
}

cm_status cm_dataset_get(const cm_dataset *d, int64_t i, cm_image *im, cm_err *err) {
  bool limit;
  return dataset_get(d, i, im, &limit, err);
}

/* ---- the loader ---------------------------------------------------------------- */

#define SHUFFLE_DOMAIN 0x53ull

typedef struct slot {
  int64_t g; /* the global batch number this slot holds */
  int n, done;
  float *img, *img_t, *mask;
  int32_t *ids_keep, *ids_restore, *labels;
  int64_t *indices;
} slot;

struct cm_loader {
  const cm_dataset *d;
  cm_loader_opts o;
  int64_t global_batch, steps, total; /* batch * world; total batches, -1 unlimited */
  int chans, size, n_keep, n_tokens;
  int depth, n_workers;
  slot *slots;
  pthread_t *threads;
  int n_started;
  pthread_mutex_t mu;
  pthread_cond_t cv_work, cv_ready;
  int64_t next_item; /* next (batch, sample) to claim: g * batch + j */
  int64_t released;  /* batches the consumer is done with */
  int64_t consumed;  /* batches handed out */
  int64_t perm_epoch;
  int64_t *perm;
  bool stop, sync_init;
  cm_status st;
  cm_err err;
};

static void make_perm(const cm_loader *l, int64_t epoch, int64_t *perm) {
  int64_t n = cm_dataset_size(l->d);
  for (int64_t i = 0; i < n; i++) perm[i] = i;
  if (!l->o.shuffle) return;
  uint32_t w[4];
  for (int64_t i = n - 1; i > 0; i--) {
    cm_philox(l->o.seed, (SHUFFLE_DOMAIN << 56) ^ (uint64_t)epoch, (uint64_t)i, w);
    uint64_t v = ((uint64_t)w[0] << 32) | w[1];
    int64_t j = (int64_t)(v % (uint64_t)(i + 1)), t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
}

/* Global batch `step` covers positions [step * G, step * G + len) of the epoch's
 * permutation; rank r takes [floor(r * len / world), floor((r + 1) * len / world)) of it,
 * [r * batch, (r + 1) * batch) for a full one, so a step's samples do not depend on world. */
static void shard_of(const cm_loader *l, int64_t step, int64_t *first, int *count) {
  int64_t left = cm_dataset_size(l->d) - step * l->global_batch;
  int64_t len = left < l->global_batch ? left : l->global_batch, w = l->o.world;
  int64_t lo = l->o.rank * len / w, hi = (l->o.rank + 1) * len / w;
  *first = step * l->global_batch + lo;
  *count = (int)(hi - lo);
}

static int batch_size_of(const cm_loader *l, int64_t g) {
  int64_t first;
  int count;
  shard_of(l, g % l->steps, &first, &count);
  return count;
}

/* One sample into its slot; a corrupt image is replaced by the next good one
 * (its views still drawn with the original index's counter). */
static cm_status fill_sample(cm_loader *l, slot *s, int j, int64_t epoch, int64_t index,
                             cm_err *err) {
  int64_t n = cm_dataset_size(l->d), use = index;
  cm_image im = {0};
  cm_status st = CM_EINVALID;
  for (int64_t t = 0; t < n; t++, use = (use + 1) % n) {
    cm_err e2;
    bool limit;
    st = dataset_get(l->d, use, &im, &limit, &e2);
    if (st == CM_OK) break;
    if (st != CM_EINVALID || limit) { /* an image over the limits stops the run */
      if (err) *err = e2;
      return st;
    }
  }
  if (st) return cm_errorf(err, CM_EINVALID, "loader: every image of the dataset is corrupt");
  size_t plane = (size_t)l->chans * l->size * l->size;
  cm_views_out vo = {0};
  vo.img = s->img + (size_t)j * plane;
  vo.img_t = s->img_t ? s->img_t + (size_t)j * plane : NULL;
  if (l->n_keep > 0) {
    vo.ids_keep = s->ids_keep + (size_t)j * l->n_keep;
    vo.ids_restore = s->ids_restore + (size_t)j * l->n_tokens;
    vo.mask = s->mask + (size_t)j * l->n_tokens;
  }
  st = cm_views_sample(&l->o.views, &im, l->o.seed, epoch, index, &vo, err);
  cm_image_free(&im);
  s->labels[j] = cm_dataset_label(l->d, use);
  s->indices[j] = use;
  return st;
}

static void *worker_main(void *arg) {
  cm_loader *l = arg;
  pthread_mutex_lock(&l->mu);
  for (;;) {
    int64_t g = l->next_item / l->o.batch;
    int j = (int)(l->next_item % l->o.batch);
    while (!l->stop && l->total >= 0 && g >= l->total) pthread_cond_wait(&l->cv_work, &l->mu);
    if (l->stop) break;
    if (j >= batch_size_of(l, g)) { /* past a partial last batch: on to the next batch */
      l->next_item = (g + 1) * l->o.batch;
      continue;
    }
    if (g >= l->released + l->depth) {
      pthread_cond_wait(&l->cv_work, &l->mu);
      continue;
    }
    l->next_item++;
    int64_t epoch = l->o.epoch0 + g / l->steps, step = g % l->steps;
    if (epoch != l->perm_epoch) {
      make_perm(l, epoch, l->perm);
      l->perm_epoch = epoch;
    }
    int64_t first;
    int count;
    shard_of(l, step, &first, &count);
    int64_t index = l->perm[first + j];
    slot *s = &l->slots[g % l->depth];
    pthread_mutex_unlock(&l->mu);
    cm_err e;
    cm_status st = fill_sample(l, s, j, epoch, index, &e);
    pthread_mutex_lock(&l->mu);
    if (st && !l->st) {
      l->st = st;
      l->err = e;
    }
    if (++s->done == s->n || st) pthread_cond_broadcast(&l->cv_ready);
  }
  pthread_mutex_unlock(&l->mu);
  return NULL;
}

int64_t cm_loader_steps_per_epoch(const cm_loader *l) {
  return l->steps;
}

cm_status cm_loader_create(const cm_dataset *d, const cm_loader_opts *o, cm_loader **out,
                           cm_err *err) {
  *out = NULL;
  if (cm_views_check(&o->views, err)) return err ? err->status : CM_EINVALID;
  if (o->batch < 1 || o->workers < 1 || o->workers > CM_MAX_WORKERS || o->depth < 0 ||
      o->depth > 4 || (o->depth > 0 && o->depth < 2))
    return cm_errorf(
        err, CM_EINVALID,
        "loader: batch %d must be >= 1, workers %d in [1, %d], depth %d 0 or in [2, 4]", o->batch,
        o->workers, CM_MAX_WORKERS, o->depth);
  if (o->world < 1 || o->rank < 0 || o->rank >= o->world || o->epochs < 0 || o->epoch0 < 0)
    return cm_errorf(err, CM_EINVALID,
                     "loader: rank %d of world %d must be in [0, world); epochs, epoch0 >= 0",
                     o->rank, o->world);
  if (cm_dataset_channels(d) != o->views.in_chans)
    return cm_errorf(err, CM_EINVALID, "loader: dataset has %d channels, the views want %d",
                     cm_dataset_channels(d), o->views.in_chans);
  int64_t n = cm_dataset_size(d), global_batch = (int64_t)o->batch * o->world;
  int64_t steps = o->drop_last ? n / global_batch : (n + global_batch - 1) / global_batch;
  /* every rank has a sample in every batch (n = 0 would end its loader) */
  int64_t last = n - (steps - 1) * global_batch;
  if (steps < 1 || (!o->drop_last && last < o->world))
    return cm_errorf(err, CM_EINVALID,
                     "loader: %lld samples, global batch %lld (%d samples per rank x %d ranks): "
                     "%s",
                     (long long)n, (long long)global_batch, o->batch, o->world,
                     steps < 1 ? "not one global batch (drop_last)"
                               : "the last global batch leaves a rank without a sample");
  cm_loader *l = calloc(1, sizeof *l);
  if (!l) return cm_errorf(err, CM_EINTERNAL, "loader: out of memory");
  l->d = d;
  l->o = *o;
  l->global_batch = global_batch;
  l->steps = steps;
  l->total = o->epochs ? o->epochs * steps : -1;
  l->chans = o->views.in_chans;
  l->size = o->views.image_size;
  l->n_keep = cm_views_n_keep(&o->views);
  l->n_tokens = l->n_keep > 0 ? cm_views_n_tokens(&o->views) : 0;
  l->depth = o->depth ? o->depth : 3;
  l->n_workers = o->workers;
  l->perm_epoch = -1;
  l->perm = malloc(sizeof(int64_t) * (size_t)cm_dataset_size(d));
  l->slots = calloc((size_t)l->depth, sizeof(slot));
  l->threads = calloc((size_t)l->n_workers, sizeof(pthread_t));
  bool ok = l->perm && l->slots && l->threads;
  size_t B = (size_t)o->batch, plane = (size_t)l->chans * l->size * l->size;
  bool eval = o->views.mode == CM_VIEWS_EVAL;
  for (int k = 0; ok && k < l->depth; k++) {
    slot *s = &l->slots[k];
    s->g = k;
    s->n = k < l->total || l->total < 0 ? batch_size_of(l, k) : 0;
    s->img = malloc(sizeof(float) * B * plane);
    s->img_t = eval ? NULL : malloc(sizeof(float) * B * plane);
    s->labels = malloc(sizeof(int32_t) * B);
    s->indices = malloc(sizeof(int64_t) * B);
    ok = s->img && (eval || s->img_t) && s->labels && s->indices;
    if (ok && l->n_keep > 0) {
      s->ids_keep = malloc(sizeof(int32_t) * B * (size_t)l->n_keep);
      s->ids_restore = malloc(sizeof(int32_t) * B * (size_t)l->n_tokens);
      s->mask = malloc(sizeof(float) * B * (size_t)l->n_tokens);
      ok = s->ids_keep && s->ids_restore && s->mask;
    }
  }
  if (!ok) {
    cm_loader_free(l);
    return cm_errorf(err, CM_EINTERNAL, "loader: out of memory for %d batches of %d", l->depth,
                     o->batch);
  }
  pthread_mutex_init(&l->mu, NULL);
  pthread_cond_init(&l->cv_work, NULL);
  pthread_cond_init(&l->cv_ready, NULL);
  l->sync_init = true;
  for (int t = 0; t < l->n_workers; t++) {
    if (pthread_create(&l->threads[t], NULL, worker_main, l) != 0) {
      cm_loader_free(l);
      return cm_errorf(err, CM_EINTERNAL, "loader: cannot start worker thread %d", t);
    }
    l->n_started++;
  }
  *out = l;
  return CM_OK;
}

cm_status cm_loader_next(cm_loader *l, cm_batch *b, cm_err *err) {
  memset(b, 0, sizeof *b);
  pthread_mutex_lock(&l->mu);
  if (l->consumed > l->released) { /* hand the previous batch's slot back */
    slot *prev = &l->slots[l->released % l->depth];
    l->released++;
    prev->g = l->released - 1 + l->depth;
    prev->done = 0;
    prev->n = l->total < 0 || prev->g < l->total ? batch_size_of(l, prev->g) : 0;
    pthread_cond_broadcast(&l->cv_work);
  }
  int64_t g = l->consumed;
  if (l->total >= 0 && g >= l->total) {
    pthread_mutex_unlock(&l->mu);
    b->epoch = l->o.epoch0 + l->o.epochs;
    b->global_step = g;
    return CM_OK;
  }
  slot *s = &l->slots[g % l->depth];
  while (!l->st && s->done < s->n) pthread_cond_wait(&l->cv_ready, &l->mu);
  if (l->st) {
    cm_status st = l->st;
    if (err) *err = l->err;
    pthread_mutex_unlock(&l->mu);
    return st;
  }
  l->consumed++;
  pthread_mutex_unlock(&l->mu);
  b->n = s->n;
  b->chans = l->chans;
  b->size = l->size;
  b->n_keep = l->n_keep;
  b->n_tokens = l->n_keep > 0 ? l->n_tokens : cm_views_n_tokens(&l->o.views);
  b->img = s->img;
  b->img_t = s->img_t;
  b->ids_keep = s->ids_keep;
  b->ids_restore = s->ids_restore;
  b->mask = s->mask;
  b->labels = s->labels;
  b->indices = s->indices;
  b->epoch = l->o.epoch0 + g / l->steps;
  b->step = g % l->steps;
  b->global_step = g;
  return CM_OK;
}

void cm_loader_free(cm_loader *l) {
  if (!l) return;
  if (l->n_started) {
    pthread_mutex_lock(&l->mu);
    l->stop = true;
    pthread_cond_broadcast(&l->cv_work);
    pthread_mutex_unlock(&l->mu);
    for (int t = 0; t < l->n_started; t++) pthread_join(l->threads[t], NULL);
  }
  if (l->sync_init) {
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv_work);
    pthread_cond_destroy(&l->cv_ready);
  }
  for (int k = 0; l->slots && k < l->depth; k++) {
    slot *s = &l->slots[k];
    free(s->img);
    free(s->img_t);
    free(s->mask);
    free(s->ids_keep);
    free(s->ids_restore);
    free(s->labels);
    free(s->indices);
  }
  free(l->slots);
  free(l->threads);
  free(l->perm);
  free(l);
}
