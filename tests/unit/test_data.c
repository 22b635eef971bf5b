/* tests/unit/test_data.c — datasets and the loader (runtime/data.c): the
 * Fashion-MNIST reader on the Debian files, IDX errors on bad gz files, an
 * image folder of PNG/JPEG files with corrupt ones, and the loader's
 * determinism across worker counts, shards, partial batches and shutdown. */
#include "frontend/frontend.h"
#include "runtime/training.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <jpeglib.h>
#include <png.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

static test_rng rs = {0x9E3779B97F4A7C15ull};
static uint32_t rnd(void) { /* fixed-seed test data */
  return test_u32(&rs);
}

static char tmpdir[256];

static void make_tmpdir(void) {
  if (tmpdir[0]) return;
  snprintf(tmpdir, sizeof tmpdir, "/tmp/cmaec_test_data_XXXXXX");
  CHECK(mkdtemp(tmpdir) != NULL);
}

static void rm_rf(const char *p) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", p);
  CHECK(system(cmd) == 0);
}

/* ---- Fashion-MNIST ------------------------------------------------------------ */

static bool have_fmnist(void) {
  return access("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", R_OK) == 0 ||
         getenv("CMAEC_FMNIST_DIR");
}

/* scripts/install-deps.sh installs the dataset: without it these tests fail, not skip. */
static void test_fmnist(void) {
  CHECK_MSG(have_fmnist(), "dataset-fashion-mnist is not installed (scripts/install-deps.sh)");
  if (!have_fmnist()) return;
  /* Figures from Python's gzip module on the same files. */
  struct {
    bool train;
    int64_t n;
    int first[10];
    uint64_t sum, sum0, weighted123;
  } want[2] = {
      {true, 60000, {9, 0, 0, 3, 0, 2, 7, 2, 5, 5}, 3431114169ull, 76247, 5355518},
      {false, 10000, {9, 2, 1, 1, 6, 1, 4, 6, 5, 7}, 573469082ull, 33456, 6912213},
  };
  for (int s = 0; s < 2; s++) {
    cm_dataset *d = NULL;
    cm_err err = {0};
    CHECK_MSG(cm_dataset_open_fmnist(NULL, want[s].train, &d, &err) == CM_OK, "%s", err.msg);
    if (!d) continue;
    CHECK(cm_dataset_size(d) == want[s].n);
    CHECK(cm_dataset_n_classes(d) == 10);
    CHECK(cm_dataset_channels(d) == 1);
    CHECK(strcmp(cm_dataset_class_name(d, 9), "Ankle boot") == 0);
    CHECK(cm_dataset_class_name(d, 10) == NULL);
    for (int i = 0; i < 10; i++) CHECK(cm_dataset_label(d, i) == want[s].first[i]);
    uint64_t sum = 0, sum0 = 0, w123 = 0;
    int hist[10] = {0};
    for (int64_t i = 0; i < want[s].n; i++) {
      cm_image im;
      if (cm_dataset_get(d, i, &im, &err) != CM_OK) {
        CHECK_MSG(false, "%s", err.msg);
        break;
      }
      if (i == 0) CHECK(im.h == 28 && im.w == 28 && im.c == 1);
      for (int k = 0; k < 784; k++) {
        sum += im.data[k];
        if (i == 0) sum0 += im.data[k];
        if (i == 123) w123 += (uint64_t)(k % 251 + 1) * im.data[k];
      }
      hist[cm_dataset_label(d, i)]++;
      cm_image_free(&im);
    }
    CHECK(sum == want[s].sum);
    CHECK(sum0 == want[s].sum0);
    CHECK(w123 == want[s].weighted123);
    for (int k = 0; k < 10; k++) CHECK(hist[k] == want[s].n / 10); /* balanced classes */
    cm_image im;
    CHECK(cm_dataset_get(d, want[s].n, &im, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "out of");
    CHECK(cm_dataset_skipped(d) == 0);
    cm_dataset_free(d);
  }
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK(cm_dataset_open_fmnist("/nonexistent/dir", true, &d, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "/nonexistent/dir/train-images-idx3-ubyte.gz");
  CHECK(d == NULL);
}

/* ---- IDX errors ------------------------------------------------------------------ */

static void put_be32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)(v >> 24);
  p[1] = (unsigned char)(v >> 16);
  p[2] = (unsigned char)(v >> 8);
  p[3] = (unsigned char)v;
}

/* An IDX file: magic, dims, then data_len bytes of data (may be short of the dims). */
static void write_idx(const char *path, uint32_t magic, int rank, const uint32_t *dims,
                      size_t data_len, uint8_t label_mod) {
  gzFile f = gzopen(path, "wb");
  CHECK(f != NULL);
  if (!f) return;
  unsigned char hdr[16];
  put_be32(hdr, magic);
  for (int i = 0; i < rank; i++) put_be32(hdr + 4 + 4 * i, dims[i]);
  gzwrite(f, hdr, 4 + 4 * (unsigned)rank);
  for (size_t i = 0; i < data_len; i++) {
    unsigned char b = label_mod ? (unsigned char)(rnd() % label_mod) : (unsigned char)rnd();
    gzwrite(f, &b, 1);
  }
  gzclose(f);
}

static void check_idx_error(const char *img, const char *lab, const char *want_path,
                            const char *want_rule) {
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK(cm_dataset_open_idx(img, lab, &d, &err) == CM_EINVALID);
  CHECK(d == NULL);
  CHECK_STR_CONTAINS(err.msg, want_path);
  CHECK_STR_CONTAINS(err.msg, want_rule);
  CHECK(strchr(err.msg, '\n') == NULL);
}

static void test_idx_errors(void) {
  make_tmpdir();
  char img[300], lab[300], bad[300];
  snprintf(img, sizeof img, "%s/img.gz", tmpdir);
  snprintf(lab, sizeof lab, "%s/lab.gz", tmpdir);
  snprintf(bad, sizeof bad, "%s/bad.gz", tmpdir);
  uint32_t idims[3] = {7, 5, 3}, ldims[1] = {7};
  write_idx(img, 0x803, 3, idims, 7 * 5 * 3, 0);
  write_idx(lab, 0x801, 1, ldims, 7, 4);
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_dataset_open_idx(img, lab, &d, &err) == CM_OK, "%s", err.msg);
  if (d) {
    CHECK(cm_dataset_size(d) == 7);
    CHECK(cm_dataset_n_classes(d) <= 4 && cm_dataset_n_classes(d) >= 1);
    cm_image im;
    CHECK(cm_dataset_get(d, 6, &im, &err) == CM_OK);
    CHECK(im.h == 5 && im.w == 3 && im.c == 1);
    cm_image_free(&im);
    cm_dataset_free(d);
  }
  write_idx(bad, 0x802, 3, idims, 7 * 5 * 3, 0); /* wrong magic */
  check_idx_error(bad, lab, bad, "bad IDX magic");
  write_idx(bad, 0x803, 3, idims, 7 * 5 * 3 - 1, 0); /* one byte short */
  check_idx_error(bad, lab, bad, "truncated");
  write_idx(bad, 0x803, 3, idims, 7 * 5 * 3 + 2, 0); /* trailing bytes */
  check_idx_error(bad, lab, bad, "trailing");
  uint32_t zero[3] = {7, 0, 3};
  write_idx(bad, 0x803, 3, zero, 0, 0);
  check_idx_error(bad, lab, bad, "out of range");
  uint32_t six[1] = {6};
  write_idx(bad, 0x801, 1, six, 6, 4); /* count mismatch */
  check_idx_error(img, bad, bad, "labels");
  write_idx(bad, 0x801, 1, ldims, 2, 0); /* header only, short labels */
  check_idx_error(img, bad, bad, "truncated");
  /* a gzip stream cut in the middle */
  FILE *f = fopen(img, "rb");
  unsigned char buf[4096];
  size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
  if (f) fclose(f);
  f = fopen(bad, "wb");
  if (f) {
    fwrite(buf, 1, n / 2, f);
    fclose(f);
  }
  check_idx_error(bad, lab, bad, "");
  check_idx_error("/nonexistent.gz", lab, "/nonexistent.gz", "cannot open");
}

/* ---- image folder ---------------------------------------------------------------- */

static void write_png(const char *path, int w, int h, int c, const uint8_t *px) {
  png_image pi;
  memset(&pi, 0, sizeof pi);
  pi.version = PNG_IMAGE_VERSION;
  pi.width = (png_uint_32)w;
  pi.height = (png_uint_32)h;
  pi.format = c == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  CHECK_MSG(png_image_write_to_file(&pi, path, 0, px, 0, NULL), "%s", pi.message);
}

static void write_jpeg(const char *path, int w, int h, int c, const uint8_t *px) {
  FILE *f = fopen(path, "wb");
  CHECK(f != NULL);
  if (!f) return;
  struct jpeg_compress_struct ci;
  struct jpeg_error_mgr em;
  ci.err = jpeg_std_error(&em);
  jpeg_create_compress(&ci);
  jpeg_stdio_dest(&ci, f);
  ci.image_width = (JDIMENSION)w;
  ci.image_height = (JDIMENSION)h;
  ci.input_components = c;
  ci.in_color_space = c == 3 ? JCS_RGB : JCS_GRAYSCALE;
  jpeg_set_defaults(&ci);
  jpeg_set_quality(&ci, 98, TRUE);
  jpeg_start_compress(&ci, TRUE);
  while (ci.next_scanline < ci.image_height) {
    JSAMPROW row = (JSAMPROW)(px + (size_t)ci.next_scanline * w * c);
    jpeg_write_scanlines(&ci, &row, 1);
  }
  jpeg_finish_compress(&ci);
  jpeg_destroy_compress(&ci);
  fclose(f);
}

/* Smooth, non-constant pixels (JPEG-friendly) with a little noise. */
static uint8_t *make_pixels(int w, int h, int c) {
  uint8_t *p = malloc((size_t)w * h * c);
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      for (int k = 0; k < c; k++)
        p[((size_t)y * w + x) * c + k] = (uint8_t)(30 + 3 * x + 2 * y + 40 * k + rnd() % 3);
  return p;
}

typedef struct folder_file {
  const char *cls, *name;
  int w, h, c;
  int kind; /* 0 png, 1 jpeg, 2 random bytes, 3 cut jpeg, 4 PNG signature + random, 5 cut png */
} folder_file;

/* Sorted order: classes a_cls < b_cls < c_cls; files by name. */
static const folder_file files[] = {
    {"b_cls", "02_rgb.png", 13, 7, 3, 0},  {"b_cls", "01_gray.png", 9, 11, 1, 0},
    {"a_cls", "x_rgb.jpg", 17, 19, 3, 1},  {"a_cls", "y_gray.JPEG", 16, 8, 1, 1},
    {"a_cls", "z_bad.png", 0, 0, 0, 2},    {"c_cls", "m_cut.jpg", 40, 40, 3, 3},
    {"c_cls", "n_rgb.png", 5, 3, 3, 0},    {"c_cls", "o_gray.png", 1, 1, 1, 0},
    {"b_cls", "03_cut.png", 20, 20, 3, 5}, {"c_cls", "p_sig.png", 0, 0, 0, 4},
};
#define N_FILES ((int)(sizeof files / sizeof files[0]))
/* Index of each file in the dataset's sorted order. */
static const int sorted_pos[N_FILES] = {4, 3, 0, 1, 2, 6, 7, 8, 5, 9};

static uint8_t *file_px[N_FILES];

static void build_folder(char *root, size_t len) {
  make_tmpdir();
  snprintf(root, len, "%s/folder", tmpdir);
  mkdir(root, 0755);
  const char *cls[3] = {"c_cls", "a_cls", "b_cls"};
  for (int k = 0; k < 3; k++) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", root, cls[k]);
    mkdir(p, 0755);
  }
  char p[512];
  snprintf(p, sizeof p, "%s/b_cls/notes.txt", root); /* not an image: ignored */
  FILE *f = fopen(p, "w");
  if (f) {
    fputs("hello", f);
    fclose(f);
  }
  snprintf(p, sizeof p, "%s/stray.png", root); /* outside a class: ignored */
  f = fopen(p, "w");
  if (f) fclose(f);
  for (int i = 0; i < N_FILES; i++) {
    const folder_file *ff = &files[i];
    snprintf(p, sizeof p, "%s/%s/%s", root, ff->cls, ff->name);
    if (ff->kind == 2 || ff->kind == 4) {
      f = fopen(p, "wb");
      if (f && ff->kind == 4) fwrite("\x89PNG\r\n\x1a\n", 1, 8, f);
      for (int b = 0; b < 300 && f; b++) fputc((int)(rnd() & 0xFF), f);
      if (f) fclose(f);
      continue;
    }
    file_px[i] = make_pixels(ff->w, ff->h, ff->c);
    if (ff->kind == 0 || ff->kind == 5) write_png(p, ff->w, ff->h, ff->c, file_px[i]);
    if (ff->kind == 1 || ff->kind == 3) write_jpeg(p, ff->w, ff->h, ff->c, file_px[i]);
    if (ff->kind == 3 || ff->kind == 5) {
      struct stat sb;
      CHECK(stat(p, &sb) == 0);
      CHECK(truncate(p, sb.st_size / 2) == 0);
    }
  }
}

static void test_folder(void) {
  char root[300];
  build_folder(root, sizeof root);
  for (int chans = 1; chans <= 3; chans += 2) {
    cm_dataset *d = NULL;
    cm_err err = {0};
    CHECK_MSG(cm_dataset_open_folder(root, chans, &d, &err) == CM_OK, "%s", err.msg);
    if (!d) continue;
    CHECK(cm_dataset_size(d) == N_FILES);
    CHECK(cm_dataset_n_classes(d) == 3);
    CHECK(cm_dataset_channels(d) == chans);
    CHECK(strcmp(cm_dataset_class_name(d, 0), "a_cls") == 0);
    CHECK(strcmp(cm_dataset_class_name(d, 2), "c_cls") == 0);
    for (int i = 0; i < N_FILES; i++) {
      const folder_file *ff = &files[i];
      int pos = sorted_pos[i];
      CHECK(cm_dataset_label(d, pos) == ff->cls[0] - 'a');
      cm_image im;
      cm_status st = cm_dataset_get(d, pos, &im, &err);
      if (ff->kind >= 2) {
        CHECK(st == CM_EINVALID);
        CHECK_STR_CONTAINS(err.msg, ff->name);
        CHECK(im.data == NULL);
        continue;
      }
      CHECK_MSG(st == CM_OK, "%s: %s", ff->name, err.msg);
      if (st) continue;
      CHECK(im.w == ff->w && im.h == ff->h && im.c == chans);
      size_t n = (size_t)ff->w * ff->h;
      double diff = 0;
      int exact = 1;
      for (size_t q = 0; q < n; q++)
        for (int k = 0; k < chans; k++) {
          const uint8_t *s = file_px[i] + q * ff->c;
          int want;
          if (ff->c == chans)
            want = s[k];
          else if (chans == 3)
            want = s[0];
          else
            want = (s[0] * 299 + s[1] * 587 + s[2] * 114 + 500) / 1000;
          int got = im.data[q * chans + k];
          diff += abs(got - want);
          if (got != want) exact = 0;
        }
      diff /= (double)(n * chans);
      if (ff->kind == 0)
        CHECK_MSG(exact, "%s: PNG pixels differ (mean |diff| %g)", ff->name, diff);
      else
        CHECK_MSG(diff < 3.0, "%s: JPEG mean |diff| %g", ff->name, diff);
      cm_image_free(&im);
    }
    CHECK(cm_dataset_skipped(d) == 4);
    cm_image im;
    CHECK(cm_dataset_get(d, 2, &im, &err) == CM_EINVALID); /* again: counted once */
    CHECK(cm_dataset_skipped(d) == 4);

    /* the loader skips the corrupt ones: eval mode over the folder, in order */
    cm_loader_opts lo = {0};
    lo.batch = 3;
    lo.workers = 2;
    lo.world = 1;
    lo.epochs = 1;
    lo.views.mode = CM_VIEWS_EVAL;
    lo.views.image_size = 8;
    lo.views.in_chans = chans;
    for (int k = 0; k < 3; k++) {
      lo.views.mean[k] = 127.5;
      lo.views.std[k] = 50;
    }
    cm_loader *l = NULL;
    CHECK_MSG(cm_loader_create(d, &lo, &l, &err) == CM_OK, "%s", err.msg);
    int seen = 0, batches = 0;
    for (cm_batch b; l && cm_loader_next(l, &b, &err) == CM_OK && b.n > 0; batches++) {
      CHECK(b.img_t == NULL && b.mask == NULL && b.n_keep == 0);
      for (int j = 0; j < b.n; j++, seen++) {
        int64_t ix = b.indices[j];
        CHECK(ix != 2 && ix != 5 && ix != 6 &&
              ix != 9); /* the corrupt ones are replaced by their successors */
        CHECK(b.labels[j] == cm_dataset_label(d, ix));
        for (int q = 0; q < chans * 64; q++) {
          float v = b.img[(size_t)j * chans * 64 + q];
          CHECK(v >= -127.5f / 50 - 1e-5f && v <= 127.5f / 50 + 1e-5f);
        }
      }
    }
    CHECK(seen == N_FILES && batches == 4);
    cm_loader_free(l);
    cm_dataset_free(d);
  }
  cm_dataset *d = NULL;
  cm_err err = {0};
  char p[512];
  snprintf(p, sizeof p, "%s/a_cls", root); /* no class subdirectories */
  CHECK(cm_dataset_open_folder(p, 3, &d, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "no class subdirectories");
  CHECK(cm_dataset_open_folder(root, 2, &d, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "channels");
  for (int i = 0; i < N_FILES; i++) free(file_px[i]);
}

/* ---- the loader ---------------------------------------------------------------- */

static cm_views_opts fmnist_views(void) {
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

typedef struct batch_copy {
  int n;
  size_t bytes;
  unsigned char *data; /* every array, concatenated */
  int64_t epoch, step;
} batch_copy;

static void copy_batch(const cm_batch *b, batch_copy *c) {
  size_t plane = (size_t)b->chans * b->size * b->size;
  size_t parts[7] = {sizeof(float) * b->n * plane,
                     b->img_t ? sizeof(float) * b->n * plane : 0,
                     b->ids_keep ? sizeof(int32_t) * b->n * b->n_keep : 0,
                     b->ids_restore ? sizeof(int32_t) * b->n * b->n_tokens : 0,
                     b->mask ? sizeof(float) * b->n * b->n_tokens : 0,
                     sizeof(int32_t) * b->n,
                     sizeof(int64_t) * b->n};
  const void *src[7] = {b->img,  b->img_t,  b->ids_keep, b->ids_restore,
                        b->mask, b->labels, b->indices};
  c->bytes = 0;
  for (int i = 0; i < 7; i++) c->bytes += parts[i];
  c->data = malloc(c->bytes);
  size_t off = 0;
  for (int i = 0; i < 7; i++) {
    if (parts[i]) memcpy(c->data + off, src[i], parts[i]);
    off += parts[i];
  }
  c->n = b->n;
  c->epoch = b->epoch;
  c->step = b->step;
}

static void test_loader_determinism(void) {
  CHECK_MSG(have_fmnist(), "dataset-fashion-mnist is not installed (scripts/install-deps.sh)");
  if (!have_fmnist()) return;
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_dataset_open_fmnist(NULL, false, &d, &err) == CM_OK, "%s", err.msg);
  if (!d) return;
  enum { NB = 5 };
  batch_copy ref[NB];
  memset(ref, 0, sizeof ref);
  int workers[4] = {1, 2, 4, 4};
  for (int run = 0; run < 4; run++) {
    cm_loader_opts lo = {0};
    lo.batch = 37;
    lo.workers = workers[run];
    lo.depth = run == 3 ? 2 : 4;
    lo.shuffle = true;
    lo.drop_last = true;
    lo.world = 1;
    lo.seed = 1234;
    lo.views = fmnist_views();
    cm_loader *l = NULL;
    CHECK_MSG(cm_loader_create(d, &lo, &l, &err) == CM_OK, "%s", err.msg);
    if (!l) continue;
    CHECK(cm_loader_steps_per_epoch(l) == 10000 / 37);
    for (int k = 0; k < NB; k++) {
      cm_batch b;
      CHECK_MSG(cm_loader_next(l, &b, &err) == CM_OK, "%s", err.msg);
      CHECK(b.n == 37 && b.chans == 1 && b.size == 32 && b.n_tokens == 64 && b.n_keep == 20);
      CHECK(b.step == k && b.epoch == 0 && b.global_step == k);
      batch_copy c;
      copy_batch(&b, &c);
      if (run == 0) {
        ref[k] = c;
        continue;
      }
      CHECK_MSG(c.bytes == ref[k].bytes && memcmp(c.data, ref[k].data, c.bytes) == 0,
                "batch %d differs with %d workers (run %d)", k, workers[run], run);
      free(c.data);
    }
    cm_loader_free(l);
  }
  /* the first batch's content: a shuffled order, masks with 20 visible tokens each */
  int64_t ix[37];
  memcpy(ix, ref[0].data + ref[0].bytes - sizeof ix, sizeof ix);
  int in_order = 0;
  for (int j = 0; j < 37; j++) in_order += ix[j] == j;
  CHECK(in_order < 5);
  for (int k = 0; k < NB; k++) free(ref[k].data);
  cm_dataset_free(d);
}

/* Shards of 2 ranks are disjoint and of equal size, one epoch's permutation. */
static void test_loader_shards(void) {
  CHECK_MSG(have_fmnist(), "dataset-fashion-mnist is not installed (scripts/install-deps.sh)");
  if (!have_fmnist()) return;
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_dataset_open_fmnist(NULL, false, &d, &err) == CM_OK, "%s", err.msg);
  if (!d) return;
  unsigned char *seen = calloc(10000, 1);
  int64_t first_epoch1[2] = {-1, -1}, first_epoch0[2] = {-1, -1};
  for (int rank = 0; rank < 2; rank++) {
    cm_loader_opts lo = {0};
    lo.batch = 97; /* global batches of 194: 51 steps, 106 samples dropped */
    lo.workers = 3;
    lo.shuffle = true;
    lo.drop_last = true;
    lo.rank = rank;
    lo.world = 2;
    lo.seed = 99;
    lo.epochs = 2;
    lo.views = fmnist_views();
    lo.views.mode = CM_VIEWS_EVAL; /* the order is under test, not the views */
    cm_loader *l = NULL;
    CHECK_MSG(cm_loader_create(d, &lo, &l, &err) == CM_OK, "%s", err.msg);
    if (!l) continue;
    CHECK(cm_loader_steps_per_epoch(l) == 5000 / 97);
    int count = 0, batches = 0;
    cm_batch b;
    while (cm_loader_next(l, &b, &err) == CM_OK && b.n > 0) {
      batches++;
      CHECK(b.n == 97);
      if (b.epoch == 0) {
        if (b.step == 0) first_epoch0[rank] = b.indices[0];
        for (int j = 0; j < b.n; j++) {
          CHECK(b.indices[j] >= 0 && b.indices[j] < 10000);
          CHECK_MSG(!seen[b.indices[j]], "index %lld twice", (long long)b.indices[j]);
          seen[b.indices[j]] = 1;
          count++;
        }
      } else if (b.step == 0) {
        first_epoch1[rank] = b.indices[0];
      }
    }
    CHECK(batches == 2 * (5000 / 97));
    CHECK(b.n == 0 && b.epoch == 2);
    CHECK(count == (5000 / 97) * 97);
    cm_loader_free(l);
  }
  CHECK(first_epoch0[0] != first_epoch1[0] || first_epoch0[1] != first_epoch1[1]);
  free(seen);

  /* drop_last off, 3 ranks, no shuffle: global batches of 3000, rank 1 takes [1000, 2000) of
   * each, and [333, 666) of the last one's 1000 */
  cm_loader_opts lo = {0};
  lo.batch = 1000;
  lo.workers = 2;
  lo.world = 3;
  lo.rank = 1;
  lo.epochs = 1;
  lo.views = fmnist_views();
  lo.views.mode = CM_VIEWS_EVAL;
  cm_loader *l = NULL;
  CHECK_MSG(cm_loader_create(d, &lo, &l, &err) == CM_OK, "%s", err.msg);
  int sizes[5] = {0}, nb = 0;
  cm_batch b;
  while (l && cm_loader_next(l, &b, &err) == CM_OK && b.n > 0 && nb < 5) {
    sizes[nb++] = b.n;
    for (int j = 0; j < b.n; j++)
      CHECK(b.indices[j] == b.step * 3000 + (b.step == 3 ? 333 : 1000) + j);
  }
  CHECK(nb == 4 && sizes[0] == 1000 && sizes[3] == 333);
  cm_loader_free(l);

  lo.world = 20000; /* fewer samples than ranks */
  lo.rank = 0;
  CHECK(cm_loader_create(d, &lo, &l, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "samples per rank");
  lo.world = 1;
  lo.views.shift = 9; /* shift + image > master only matters in SHIFT mode */
  lo.views.mode = CM_VIEWS_SHIFT;
  CHECK(cm_loader_create(d, &lo, &l, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "master_size");
  cm_dataset_free(d);
}

/* Stopping at any point joins the workers and frees everything (ASan checks leaks). */
static void test_loader_shutdown(void) {
  CHECK_MSG(have_fmnist(), "dataset-fashion-mnist is not installed (scripts/install-deps.sh)");
  if (!have_fmnist()) return;
  cm_dataset *d = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_dataset_open_fmnist(NULL, false, &d, &err) == CM_OK, "%s", err.msg);
  if (!d) return;
  for (int k = 0; k < 3; k++) {
    cm_loader_opts lo = {0};
    lo.batch = 64;
    lo.workers = 4;
    lo.shuffle = true;
    lo.world = 1;
    lo.seed = 5;
    lo.views = fmnist_views();
    cm_loader *l = NULL;
    CHECK_MSG(cm_loader_create(d, &lo, &l, &err) == CM_OK, "%s", err.msg);
    for (int s = 0; s < k * 2 && l; s++) {
      cm_batch b;
      CHECK(cm_loader_next(l, &b, &err) == CM_OK && b.n == 64);
    }
    cm_loader_free(l); /* mid-epoch, workers busy on the ring */
  }
  cm_dataset_free(d);
}

/* cm_dataset_subset keeps sample floor(i * size / n) as i: labels and pixels
 * (or the decode error of a corrupt file) follow, every class of the
 * class-sorted folder stays, and a bad size is an error. */
static void test_subset(void) {
  char root[300];
  build_folder(root, sizeof root);
  cm_err err = {0};
  for (int64_t n = 1; n <= N_FILES + 1; n++) {
    cm_dataset *full = NULL, *sub = NULL;
    CHECK_MSG(cm_dataset_open_folder(root, 3, &full, &err) == CM_OK, "%s", err.msg);
    CHECK_MSG(cm_dataset_open_folder(root, 3, &sub, &err) == CM_OK, "%s", err.msg);
    if (!full || !sub) {
      cm_dataset_free(full);
      cm_dataset_free(sub);
      return;
    }
    CHECK_MSG(cm_dataset_subset(sub, n, &err) == CM_OK, "%s", err.msg);
    int64_t want_n = n < N_FILES ? n : N_FILES;
    CHECK(cm_dataset_size(sub) == want_n);
    int seen[3] = {0};
    for (int64_t i = 0; i < want_n; i++) {
      int64_t src = n < N_FILES ? i * N_FILES / n : i;
      CHECK(cm_dataset_label(sub, i) == cm_dataset_label(full, src));
      if (cm_dataset_label(sub, i) >= 0 && cm_dataset_label(sub, i) < 3)
        seen[cm_dataset_label(sub, i)] = 1;
      cm_image a, b;
      cm_status sa = cm_dataset_get(sub, i, &a, &err), sb = cm_dataset_get(full, src, &b, &err);
      CHECK(sa == sb);
      if (sa == CM_OK && sb == CM_OK) {
        CHECK(a.h == b.h && a.w == b.w && a.c == b.c);
        CHECK(memcmp(a.data, b.data, (size_t)a.h * a.w * a.c) == 0);
      }
      cm_image_free(&a);
      cm_image_free(&b);
    }
    if (n >= 3) CHECK(seen[0] && seen[1] && seen[2]);
    cm_dataset_free(full);
    cm_dataset_free(sub);
  }
  cm_dataset *d = NULL;
  CHECK_MSG(cm_dataset_open_folder(root, 1, &d, &err) == CM_OK, "%s", err.msg);
  if (d) {
    CHECK(cm_dataset_subset(d, 0, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "must be >= 1");
    CHECK(cm_dataset_size(d) == N_FILES);
  }
  cm_dataset_free(d);
  if (!have_fmnist()) return;
  CHECK_MSG(cm_dataset_open_fmnist(NULL, true, &d, &err) == CM_OK, "%s", err.msg);
  if (!d) return;
  int32_t labels[60];
  for (int i = 0; i < 60; i++) labels[i] = cm_dataset_label(d, (int64_t)i * 1000);
  CHECK(cm_dataset_subset(d, 60, &err) == CM_OK);
  int hist[10] = {0};
  for (int i = 0; i < 60; i++) {
    CHECK(cm_dataset_label(d, i) == labels[i]);
    if (labels[i] >= 0 && labels[i] < 10) hist[labels[i]]++;
  }
  for (int k = 0; k < 10; k++) CHECK_MSG(hist[k] > 0, "class %d missing from the subset", k);
  cm_dataset_free(d);
}

static void cleanup(void) {
  if (tmpdir[0]) rm_rf(tmpdir);
}

TEST_MAIN({"fmnist", test_fmnist}, {"idx_errors", test_idx_errors}, {"folder", test_folder},
          {"loader_determinism", test_loader_determinism}, {"loader_shards", test_loader_shards},
          {"loader_shutdown", test_loader_shutdown}, {"subset", test_subset}, {"cleanup", cleanup})
