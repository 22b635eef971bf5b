/* runtime/cuda_build.c — a program's kernels built for a CUDA target: each
 * distinct kernel rendered under one name (CM_CUDA_MODULE_KERNEL) with the
 * prelude and compiled as its own module (a very large one split into parts
 * at its stages) by a cm_cuda_compiler (NVRTC, or the emulated device's host
 * compiler), on several threads, through an on-disk cache of module images.
 *
 * The cache: <root>/cuda/<key>.<image_suffix>, key = 128 bits of hash (hex) of
 * the key material (a format tag, the compiler's name, its options, the arch
 * and the module's whole source). A file holds a header (magic, format
 * version, sizes, a checksum), the key material itself, the image, the
 * compiler's log (ptxas's report; never PTX) and the kernel infos it reported.
 * A load compares the stored key material byte for byte, so a hash collision
 * is a miss, never a wrong module; a file failing any check is a miss and is
 * overwritten. Files are written to a unique temporary name in the same
 * directory, fsync'ed and renamed, so processes sharing the cache see whole
 * files only. No LLVM here: the GPU machines build without it. */
#include "runtime.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef CMAEC_CUDA_INCLUDE_DIR
#define CMAEC_CUDA_INCLUDE_DIR "/usr/local/cuda/include"
#endif

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The calling thread's CPU time: what a module's compile costs, however loaded the machine. */
static double thread_cpu_ms(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return 0;
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

const char *cm_cache_dir(const char *given, char *buf, size_t size) {
  if (given) return *given ? given : NULL;
  const char *e = getenv("CMAEC_CACHE_DIR");
  if (e) return *e ? e : NULL;
  const char *x = getenv("XDG_CACHE_HOME");
  if (x && *x) {
    snprintf(buf, size, "%s/cmaec", x);
    return buf;
  }
  const char *h = getenv("HOME");
  if (!h || !*h) return NULL;
  snprintf(buf, size, "%s/.cache/cmaec", h);
  return buf;
}

/* ---- the NVRTC compiler ---------------------------------------------------- */

static cm_nvrtc *nvrtc_lib;
static cm_err nvrtc_err;
static cm_status nvrtc_status;
static char nvrtc_name[64];
/* What cm_nvrtc_compile passes besides the arch (codegen/nvrtc.c): in the cache key, so a
 * different include dir (another toolkit's headers) is another module. */
static char nvrtc_options[700];
static pthread_once_t nvrtc_once = PTHREAD_ONCE_INIT;

static cm_status nvrtc_compile(void *self, const char *source, const char *name, const char *arch,
                               cm_cubin *out, cm_err *err) {
  return cm_nvrtc_compile(self, source, name, arch, NULL, 0, out, err);
}

static cm_cuda_compiler nvrtc_compiler = {NULL, "cubin", nvrtc_compile, NULL};

static void load_nvrtc(void) {
  nvrtc_status = cm_nvrtc_load(&nvrtc_lib, &nvrtc_err);
  if (nvrtc_status != CM_OK) return;
  snprintf(nvrtc_name, sizeof nvrtc_name, "nvrtc %s", cm_nvrtc_version(nvrtc_lib));
  const char *inc = getenv("CMAEC_CUDA_INCLUDE_DIR");
  snprintf(nvrtc_options, sizeof nvrtc_options,
           "-default-device --std=c++17 -I%s --ptxas-options=-v",
           inc && inc[0] ? inc : CMAEC_CUDA_INCLUDE_DIR);
  nvrtc_compiler.name = nvrtc_name;
  nvrtc_compiler.self = nvrtc_lib;
  /* kept loaded for the process, as the driver is */
}

cm_status cm_cuda_compiler_nvrtc(const cm_cuda_compiler **out, cm_err *err) {
  pthread_once(&nvrtc_once, load_nvrtc);
  *out = NULL;
  if (nvrtc_status != CM_OK) {
    if (err) *err = nvrtc_err;
    return nvrtc_status;
  }
  *out = &nvrtc_compiler;
  return CM_OK;
}

/* Options a compiler applies that its name does not say (NVRTC's fixed list; other
 * compilers carry their flags in their name). */
static const char *compiler_options(const cm_cuda_compiler *c) {
  return c == &nvrtc_compiler ? nvrtc_options : "";
}

/* ---- hashing ------------------------------------------------------------------ */

/* FNV-1a over 64-bit words with an xorshift after each multiply (every step a bijection,
 * so any single changed word changes the result), then a murmur3 finalizer. Two
 * instances with other bases and primes make the 128-bit file name. */
static uint64_t hash_bytes(const void *data, size_t n, uint64_t basis, uint64_t prime) {
  const unsigned char *p = data;
  uint64_t h = basis ^ (uint64_t)n;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    h = (h ^ w) * prime;
    h ^= h >> 29;
  }
  uint64_t tail = 0;
  memcpy(&tail, p + i, n - i);
  h = (h ^ tail) * prime;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  return h ^ (h >> 33);
}

static uint64_t hash_a(const void *data, size_t n) {
  return hash_bytes(data, n, 0xcbf29ce484222325ull, 0x100000001b3ull);
}

static uint64_t hash_b(const void *data, size_t n) {
  return hash_bytes(data, n, 0x6a09e667f3bcc909ull, 0x9e3779b97f4a7c15ull);
}

/* ---- the cache file ------------------------------------------------------------ */

#define CACHE_MAGIC "CMCUMOD\0"
#define CACHE_FORMAT_VERSION 2u
#define CACHE_KEY_TAG "cmaec cuda module cache 1"
/* A file larger than this is not read (it cannot be one of ours). */
#define CACHE_MAX_FILE_BYTES ((uint64_t)1 << 31)

typedef struct cache_header {
  char magic[8];
  uint32_t version;
  uint32_t header_bytes; /* sizeof(cache_header): another layout is a miss */
  uint32_t info_bytes;   /* sizeof(cm_cuda_kernel_info), likewise */
  uint32_t n_kernels;    /* the image's functions as the compiler reported them */
  uint64_t key_bytes, image_bytes, log_bytes;
  uint64_t checksum; /* hash_a of everything after the header */
} cache_header;

/* The key material of one module (malloc'ed; *len its length). */
static char *key_material(const cm_cuda_compiler *c, const char *arch, const char *source,
                          size_t *len) {
  const char *opts = compiler_options(c);
  size_t src_len = strlen(source);
  size_t cap = strlen(CACHE_KEY_TAG) + strlen(c->name) + strlen(opts) + strlen(arch) + src_len + 96;
  char *m = malloc(cap);
  if (!m) return NULL;
  int head = snprintf(m, cap, "%s\ncompiler %s\noptions %s\narch %s\nsource %zu\n", CACHE_KEY_TAG,
                      c->name, opts, arch, src_len);
  memcpy(m + head, source, src_len + 1);
  *len = (size_t)head + src_len;
  return m;
}

static void key_hex(const char *material, size_t len, char key[65]) {
  snprintf(key, 65, "%016llx%016llx", (unsigned long long)hash_a(material, len),
           (unsigned long long)hash_b(material, len));
}

static bool read_all(int fd, void *buf, size_t n) {
  char *p = buf;
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= (size_t)r;
  }
  return true;
}

static bool write_all(int fd, const void *buf, size_t n) {
  const char *p = buf;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= (size_t)w;
  }
  return true;
}

typedef enum cache_lookup { CACHE_ABSENT, CACHE_HIT, CACHE_REJECTED } cache_lookup;

/* Checks a cache file's whole content against the key material; on success moves its
 * image and log into out. */
static cache_lookup cache_parse(const char *file, size_t size, const char *material, size_t mlen,
                                cm_cubin *out) {
  cache_header h;
  if (size < sizeof h) return CACHE_REJECTED;
  memcpy(&h, file, sizeof h);
  const char *body = file + sizeof h;
  uint64_t body_bytes = size - sizeof h;
  uint64_t info_total = (uint64_t)h.n_kernels * h.info_bytes;
  if (memcmp(h.magic, CACHE_MAGIC, sizeof h.magic) != 0 || h.version != CACHE_FORMAT_VERSION ||
      h.header_bytes != sizeof h || h.info_bytes != sizeof(cm_cuda_kernel_info) ||
      h.key_bytes != mlen || h.image_bytes == 0 || h.image_bytes > body_bytes ||
      h.log_bytes > body_bytes || info_total > body_bytes ||
      h.key_bytes + h.image_bytes + h.log_bytes + info_total != body_bytes)
    return CACHE_REJECTED;
  if (memcmp(body, material, mlen) != 0 || hash_a(body, body_bytes) != h.checksum)
    return CACHE_REJECTED;
  out->data = malloc(h.image_bytes);
  out->log = malloc(h.log_bytes + 1);
  out->kernels = malloc(info_total + 1);
  if (!out->data || !out->log || !out->kernels) {
    cm_cubin_free(out);
    return CACHE_ABSENT; /* out of memory: compile instead */
  }
  memcpy(out->data, body + mlen, h.image_bytes);
  memcpy(out->log, body + mlen + h.image_bytes, h.log_bytes);
  out->log[h.log_bytes] = 0;
  out->size = h.image_bytes;
  if (info_total) memcpy(out->kernels, body + mlen + h.image_bytes + h.log_bytes, info_total);
  out->n_kernels = (int)h.n_kernels;
  return CACHE_HIT;
}

static cache_lookup cache_load(const char *path, const char *material, size_t mlen, cm_cubin *out) {
  memset(out, 0, sizeof *out);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? CACHE_ABSENT : CACHE_REJECTED;
  struct stat stt;
  cache_lookup r = CACHE_REJECTED;
  char *file = NULL;
  if (fstat(fd, &stt) == 0 && S_ISREG(stt.st_mode) &&
      (uint64_t)stt.st_size >= sizeof(cache_header) &&
      (uint64_t)stt.st_size <= CACHE_MAX_FILE_BYTES) {
    size_t size = (size_t)stt.st_size;
    file = malloc(size);
    if (!file)
      r = CACHE_ABSENT;
    else if (read_all(fd, file, size))
      r = cache_parse(file, size, material, mlen, out);
  }
  free(file);
  close(fd);
  return r;
}

static atomic_uint temp_counter;

/* Writes a module's file atomically: a unique temporary name in the same directory (pid,
 * worker, counter), fsync, rename over path. False when anything fails (nothing is left). */
static bool cache_store(const char *dir, const char *path, int worker, const char *material,
                        size_t mlen, const cm_cubin *img) {
  char tmp[4200];
  unsigned serial = atomic_fetch_add(&temp_counter, 1u);
  int n = snprintf(tmp, sizeof tmp, "%s/.tmp-%ld-%d-%u", dir, (long)getpid(), worker, serial);
  if (n < 0 || (size_t)n >= sizeof tmp) return false;
  size_t log_len = img->log ? strlen(img->log) : 0;
  cache_header h;
  memset(&h, 0, sizeof h);
  memcpy(h.magic, CACHE_MAGIC, sizeof h.magic);
  h.version = CACHE_FORMAT_VERSION;
  h.header_bytes = sizeof h;
  h.key_bytes = mlen;
  h.image_bytes = img->size;
  h.log_bytes = log_len;
  h.info_bytes = sizeof(cm_cuda_kernel_info);
  h.n_kernels = img->n_kernels > 0 && img->kernels ? (uint32_t)img->n_kernels : 0;
  size_t info_total = (size_t)h.n_kernels * sizeof(cm_cuda_kernel_info);
  size_t body_len = mlen + img->size + log_len + info_total;
  char *body = malloc(body_len ? body_len : 1);
  if (!body) return false;
  memcpy(body, material, mlen);
  memcpy(body + mlen, img->data, img->size);
  if (log_len) memcpy(body + mlen + img->size, img->log, log_len);
  if (info_total) memcpy(body + mlen + img->size + log_len, img->kernels, info_total);
  h.checksum = hash_a(body, body_len);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  bool ok =
      fd >= 0 && write_all(fd, &h, sizeof h) && write_all(fd, body, body_len) && fsync(fd) == 0;
  free(body);
  if (fd >= 0 && close(fd) != 0) ok = false;
  if (ok && rename(tmp, path) == 0) return true;
  if (fd >= 0) unlink(tmp);
  return false;
}

bool cm_make_dirs(const char *path) {
  char buf[4096];
  if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return false;
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (mkdir(buf, 0777) != 0 && errno != EEXIST) return false;
    *p = '/';
  }
  if (mkdir(buf, 0777) != 0 && errno != EEXIST) return false;
  struct stat stt;
  return stat(buf, &stt) == 0 && S_ISDIR(stt.st_mode);
}

/* A temporary file older than this was left by a process that died while writing it. */
#define CACHE_STALE_TEMP_SECONDS 3600

/* Removes such leftovers from dir (a store takes milliseconds: a younger one may be in use). */
static void remove_stale_temps(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  time_t now = time(NULL);
  for (struct dirent *e = readdir(d); e; e = readdir(d)) {
    if (strncmp(e->d_name, ".tmp-", 5) != 0) continue;
    char path[4400];
    struct stat stt;
    if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) < (int)sizeof path &&
        lstat(path, &stt) == 0 && S_ISREG(stt.st_mode) &&
        now - stt.st_mtime > CACHE_STALE_TEMP_SECONDS)
      unlink(path);
  }
  closedir(d);
}

/* ---- building ---------------------------------------------------------------- */

cm_status cm_cuda_module_source(const cm_kernel *k, const cm_target *t, bool no_templates,
                                char **source, cm_err *err) {
  *source = NULL;
  cm_kernel anon = *k;
  snprintf(anon.name, sizeof anon.name, "%s", CM_CUDA_MODULE_KERNEL);
  cm_cuda_render_opts ro = {t, no_templates};
  cm_status st = cm_render_cuda(&anon, &ro, true, source, err);
  if (st != CM_OK) {
    free(*source);
    *source = NULL;
    cm_err_prefix(err, "%s: ", k->name);
  }
  return st;
}

void cm_cuda_build_free(cm_cuda_build *b) {
  if (!b) return;
  for (int i = 0; i < b->n_modules; i++) cm_cubin_free(&b->modules[i].image);
  free(b->modules);
  free(b->module_of);
  memset(b, 0, sizeof *b);
}

/* ---- splitting a large module --------------------------------------------------
 *
 * One kernel can be most of a program's compile: the optimizer's reduction over every
 * parameter of ViT-B renders to 4.5 MB (317 stage functions of 886 parameters each) and
 * takes NVRTC 24 s alone. A kernel whose module source exceeds the part size is split at
 * its stages' comment lines ("// stage N", "// stages A..B") into translation units of at
 * most that size (the prelude and the kernel's banner, then whole stages), compiled in
 * parallel as modules of their own. */

typedef struct module_part {
  size_t begin, end;          /* the stages' text in the kernel's source */
  int stage_begin, stage_end; /* the stage functions it defines */
} module_part;

/* The stage number N of the next stage function in [*p, end): a line `extern "C" __global__
 * ... cmk_sN(`; -1 when none. Moves *p past it. */
static int next_stage_function(const char **p, const char *end) {
  static const char line[] = "\nextern \"C\" __global__ ", fn[] = " " CM_CUDA_MODULE_KERNEL "_s";
  for (const char *q = strstr(*p, line); q && q < end; q = strstr(q + 1, line)) {
    const char *eol = strchr(q + 1, '\n');
    const char *f = strstr(q + 1, fn);
    if (!f || (eol && f > eol)) continue;
    const char *d = f + sizeof fn - 1;
    int n = 0, digits = 0;
    while (*d >= '0' && *d <= '9' && digits < 9) n = n * 10 + (*d++ - '0'), digits++;
    if (digits == 0 || *d != '(') continue;
    *p = d;
    return n;
  }
  return -1;
}

/* Splits src (a module of n_stages stage functions) into at most max parts of at most
 * limit bytes each (a larger stage alone); *head: the bytes every part starts with.
 * Returns the count, or 1 (the whole source, parts[0]) when src is small enough or its
 * stages cannot be told apart. */
static int split_module(const char *src, int n_stages, size_t limit, module_part *parts, int max,
                        size_t *head) {
  size_t len = strlen(src);
  parts[0] = (module_part){0, len, 0, n_stages};
  *head = 0;
  const char *banner = strstr(src, "\n// kernel " CM_CUDA_MODULE_KERNEL ":");
  const char *first = banner ? strstr(banner, "\n// stage") : NULL;
  if (limit == 0 || len <= limit || !first || max < 2) return 1;
  size_t h = (size_t)(first + 1 - src);
  int n = 0, next_stage = 0;
  const char *chunk = first + 1;
  while (*chunk) {
    const char *after = strstr(chunk + 1, "\n// stage");
    const char *end = after ? after + 1 : src + len;
    int lo = -1, hi = -1;
    for (const char *p = chunk;;) {
      int stage = next_stage_function(&p, end);
      if (stage < 0) break;
      if (stage != next_stage) return 1; /* not the stages in order: keep it whole */
      lo = lo < 0 ? stage : lo;
      hi = stage;
      next_stage++;
    }
    if (lo < 0) return 1;
    size_t bytes = (size_t)(end - chunk), b = (size_t)(chunk - src);
    if (n > 0 && h + (parts[n - 1].end - parts[n - 1].begin) + bytes <= limit) {
      parts[n - 1].end = b + bytes;
      parts[n - 1].stage_end = hi + 1;
    } else {
      if (n == max) return 1;
      parts[n++] = (module_part){b, b + bytes, lo, hi + 1};
    }
    chunk = end;
  }
  if (next_stage != n_stages || n < 2) {
    parts[0] = (module_part){0, len, 0, n_stages};
    return 1;
  }
  *head = h;
  return n;
}

/* The part size: $CMAEC_CUDA_PART_BYTES (0: never split), else CM_CUDA_PART_BYTES. */
static size_t part_bytes(void) {
  const char *e = getenv("CMAEC_CUDA_PART_BYTES");
  if (!e || !*e) return CM_CUDA_PART_BYTES;
  char *end = NULL;
  unsigned long long v = strtoull(e, &end, 10);
  return end && !*end ? (size_t)v : CM_CUDA_PART_BYTES;
}

/* What the compile threads share: the modules to make, the next one to take, and
 * per module its outcome. */
typedef struct build_work {
  const cm_kprogram *kp;
  const cm_target *t;
  const cm_cuda_compiler *c;
  const char *dir; /* <root>/cuda, or NULL: no cache */
  char **src;      /* per module: its whole translation unit */
  cm_cuda_build *out;
  int *order; /* modules, largest source first */
  atomic_int next;
  atomic_int first_failed; /* the first failed module in module order (n_modules: none);
                              modules after it are not built */
  cm_status *status;       /* per module */
  cm_err *errs;            /* per module */
  bool *rejected, *write_failed;
} build_work;

typedef struct build_worker {
  build_work *w;
  int index;
} build_worker;

/* "kernel NAME" and, for a part of a split kernel, its stages. */
static void module_title(const build_work *w, int m, char *buf, size_t size) {
  const cm_cuda_module *mod = &w->out->modules[m];
  const cm_kernel *k = &w->kp->kernels[mod->kernel];
  if (mod->stage_begin == 0 && mod->stage_end == k->n_stages)
    snprintf(buf, size, "kernel %s", k->name);
  else
    snprintf(buf, size, "kernel %s stages %d..%d", k->name, mod->stage_begin, mod->stage_end - 1);
}

/* Loads module m from the cache or compiles it (and stores it). */
static void build_module(build_work *w, int m, int worker) {
  cm_cuda_module *mod = &w->out->modules[m];
  const cm_kernel *k = &w->kp->kernels[mod->kernel];
  const char *source = w->src[m];
  char title[200];
  module_title(w, m, title, sizeof title);
  size_t mlen = 0;
  char *material = key_material(w->c, w->t->arch, source, &mlen);
  if (!material) {
    w->status[m] = cm_errorf(&w->errs[m], CM_EINTERNAL, "%s: out of memory", title);
    return;
  }
  key_hex(material, mlen, mod->key);
  char path[4200];
  bool cache = w->dir && snprintf(path, sizeof path, "%s/%s.%s", w->dir, mod->key,
                                  w->c->image_suffix) < (int)sizeof path;
  double t0 = now_ms();
  cache_lookup found = cache ? cache_load(path, material, mlen, &mod->image) : CACHE_ABSENT;
  if (found == CACHE_HIT) {
    mod->cached = true;
    mod->image.compile_ms = now_ms() - t0;
    free(material);
    return;
  }
  w->rejected[m] = found == CACHE_REJECTED;
  char name[96];
  if (mod->stage_begin == 0)
    snprintf(name, sizeof name, "%s.cu", k->name);
  else
    snprintf(name, sizeof name, "%s.s%d.cu", k->name, mod->stage_begin);
  double cpu0 = thread_cpu_ms();
  cm_status st = w->c->compile(w->c->self, source, name, w->t->arch, &mod->image, &w->errs[m]);
  mod->cpu_ms = thread_cpu_ms() - cpu0;
  if (st != CM_OK) {
    cm_err_prefix(&w->errs[m], "%s (%s): ", title, w->c->name);
  } else if (!mod->image.data || mod->image.size == 0) {
    st = cm_errorf(&w->errs[m], CM_EINTERNAL, "%s (%s): the compiler made an empty image", title,
                   w->c->name);
  } else if (w->dir) {
    w->write_failed[m] = !cache || !cache_store(w->dir, path, worker, material, mlen, &mod->image);
  }
  w->status[m] = st;
  free(material);
}

static void *build_thread(void *arg) {
  build_worker *bw = arg;
  build_work *w = bw->w;
  for (;;) {
    int i = atomic_fetch_add(&w->next, 1);
    if (i >= w->out->n_modules) break;
    int m = w->order[i];
    if (m > atomic_load(&w->first_failed)) continue;
    build_module(w, m, bw->index);
    int first = atomic_load(&w->first_failed);
    while (w->status[m] != CM_OK && m < first &&
           !atomic_compare_exchange_weak(&w->first_failed, &first, m)) {
    }
  }
  return NULL;
}

typedef struct module_size {
  size_t source_bytes;
  int module;
} module_size;

static int larger_source_first(const void *a, const void *b) {
  const module_size *x = a, *y = b;
  if (x->source_bytes != y->source_bytes) return x->source_bytes > y->source_bytes ? -1 : 1;
  return x->module - y->module;
}

/* Renders every kernel (src[i]) and gives each its distinct kernel (*distinct_of, and
 * first[d] the first kernel of distinct d): kernels whose sources are equal share one
 * (compared by hash, then text). */
static cm_status render_and_dedup(const cm_kprogram *kp, const cm_target *t, bool no_templates,
                                  char **src, int *distinct_of, int *first, int *n_distinct,
                                  cm_err *err) {
  int nk = kp->n_kernels;
  uint64_t *hash = calloc((size_t)nk + 1, sizeof *hash);
  if (!hash) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_status st = CM_OK;
  *n_distinct = 0;
  for (int i = 0; i < nk && st == CM_OK; i++) {
    st = cm_cuda_module_source(&kp->kernels[i], t, no_templates, &src[i], err);
    if (st != CM_OK) break;
    hash[i] = hash_a(src[i], strlen(src[i]));
    distinct_of[i] = -1;
    for (int d = 0; d < *n_distinct; d++) {
      int q = first[d];
      if (hash[q] == hash[i] && strcmp(src[q], src[i]) == 0) {
        distinct_of[i] = d;
        break;
      }
    }
    if (distinct_of[i] < 0) {
      distinct_of[i] = *n_distinct;
      first[(*n_distinct)++] = i;
    }
  }
  free(hash);
  return st;
}

/* The modules of the distinct kernels (first[0..n_distinct)), each split by split_module:
 * out->modules, out->module_of (per kernel: its first module) and *msrc (per module: its
 * translation unit, malloc'ed). */
static cm_status make_modules(const cm_kprogram *kp, char **src, const int *distinct_of,
                              const int *first, int n_distinct, cm_cuda_build *out, char ***msrc,
                              cm_err *err) {
  size_t limit = part_bytes();
  int cap = n_distinct + 1, max_parts = 1;
  for (int d = 0; d < n_distinct; d++) {
    size_t len = strlen(src[first[d]]);
    int parts = limit ? (int)(len / limit) + 2 : 1; /* a bound: greedy parts are over half full */
    max_parts = parts * 2 > max_parts ? parts * 2 : max_parts;
    cap += parts * 2;
  }
  out->modules = calloc((size_t)cap, sizeof *out->modules);
  *msrc = calloc((size_t)cap, sizeof **msrc);
  int *first_module = calloc((size_t)n_distinct + 1, sizeof *first_module);
  module_part *parts = calloc((size_t)max_parts, sizeof *parts);
  if (!out->modules || !*msrc || !first_module || !parts) {
    free(first_module), free(parts);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  cm_status st = CM_OK;
  for (int d = 0; d < n_distinct && st == CM_OK; d++) {
    const char *s = src[first[d]];
    size_t head = 0;
    int np = split_module(s, kp->kernels[first[d]].n_stages, limit, parts, max_parts, &head);
    first_module[d] = out->n_modules;
    for (int p = 0; p < np && st == CM_OK; p++) {
      int m = out->n_modules++;
      cm_cuda_module *mod = &out->modules[m];
      mod->kernel = first[d];
      mod->stage_begin = parts[p].stage_begin;
      mod->stage_end = parts[p].stage_end;
      size_t body = parts[p].end - parts[p].begin;
      char *t = (*msrc)[m] = malloc(head + body + 1);
      if (!t) {
        st = cm_errorf(err, CM_EINTERNAL, "out of memory");
        break;
      }
      memcpy(t, s, head);
      memcpy(t + head, s + parts[p].begin, body);
      t[head + body] = 0;
    }
  }
  for (int i = 0; i < kp->n_kernels && st == CM_OK; i++)
    out->module_of[i] = first_module[distinct_of[i]];
  free(first_module), free(parts);
  return st;
}

int cm_cuda_stage_module(const cm_cuda_build *b, int kernel, int stage) {
  int m = b->module_of[kernel];
  while (m + 1 < b->n_modules && stage >= b->modules[m].stage_end &&
         b->modules[m + 1].kernel == b->modules[m].kernel)
    m++;
  return m;
}

/* The threads to use: threads, or every core for 0; at most one per module. */
static int thread_count(int threads, int n_modules) {
  long n = threads > 0 ? threads : sysconf(_SC_NPROCESSORS_ONLN);
  if (n < 1) n = 1;
  if (n > n_modules) n = n_modules > 0 ? n_modules : 1;
  return (int)n;
}

/* Runs the modules on w's threads (the caller's among them); joins them all. */
static cm_status run_workers(build_work *w, int threads, cm_err *err) {
  int n = w->out->n_modules;
  module_size *sizes = calloc((size_t)n + 1, sizeof *sizes);
  pthread_t *tid = calloc((size_t)threads, sizeof *tid);
  build_worker *bw = calloc((size_t)threads, sizeof *bw);
  if (!sizes || !tid || !bw) {
    free(sizes), free(tid), free(bw);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  for (int m = 0; m < n; m++) sizes[m] = (module_size){strlen(w->src[m]), m};
  qsort(sizes, (size_t)n, sizeof *sizes, larger_source_first);
  for (int m = 0; m < n; m++) w->order[m] = sizes[m].module;
  free(sizes);
  int started = 1; /* worker 0 is this thread */
  for (int i = 0; i < threads; i++) bw[i] = (build_worker){w, i};
  for (int i = 1; i < threads; i++) {
    if (pthread_create(&tid[i], NULL, build_thread, &bw[i]) != 0) break;
    started++;
  }
  build_thread(&bw[0]);
  for (int i = 1; i < started; i++) pthread_join(tid[i], NULL);
  w->out->threads = started;
  free(tid), free(bw);
  return CM_OK;
}

/* Counts the outcome into out (the first failure in module order is the error). */
static cm_status collect(const build_work *w, bool unusable, cm_err *err) {
  cm_cuda_build *out = w->out;
  for (int m = 0; m < out->n_modules; m++)
    if (w->status[m] != CM_OK) {
      *err = w->errs[m];
      return w->status[m];
    }
  for (int m = 0; m < out->n_modules; m++) {
    const cm_cuda_module *mod = &out->modules[m];
    if (!mod->image.data) /* not reached: a failure stops the build before */
      return cm_errorf(err, CM_EINTERNAL, "kernel %s: no image", w->kp->kernels[mod->kernel].name);
    out->cache_hits += mod->cached;
    out->cache_misses += !mod->cached;
    out->cache_rejected += w->rejected[m];
    out->cache_write_failures += unusable ? !mod->cached : w->write_failed[m];
    out->image_bytes += (int64_t)mod->image.size;
  }
  return CM_OK;
}

cm_status cm_cuda_build_program(const cm_kprogram *kp, const cm_target *t, bool no_templates,
                                const cm_cuda_compiler *c, const char *cache_dir, int threads,
                                cm_cuda_build *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  if (!c || !c->compile || !c->name || !c->image_suffix || threads < 0)
    return cm_errorf(err, CM_EINVALID, "cm_cuda_build_program: %s",
                     threads < 0 ? "threads < 0" : "the compiler lacks a name, suffix or compile");
  int nk = kp->n_kernels, n_distinct = 0;
  char **src = calloc((size_t)nk + 1, sizeof *src), **msrc = NULL;
  int *distinct_of = calloc((size_t)nk + 1, sizeof *distinct_of);
  int *first = calloc((size_t)nk + 1, sizeof *first);
  out->module_of = calloc((size_t)nk + 1, sizeof *out->module_of);
  build_work w = {.kp = kp, .t = t, .c = c, .out = out};
  char dir[4096];
  cm_status st = CM_OK;
  if (!src || !distinct_of || !first || !out->module_of) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto done;
  }
  double t0 = now_ms();
  st = render_and_dedup(kp, t, no_templates, src, distinct_of, first, &n_distinct, err);
  if (st == CM_OK) st = make_modules(kp, src, distinct_of, first, n_distinct, out, &msrc, err);
  out->n_distinct = n_distinct;
  out->render_ms = now_ms() - t0;
  if (st != CM_OK) goto done;
  int nm = out->n_modules;
  w.src = msrc;
  w.first_failed = nm;
  w.order = calloc((size_t)nm + 1, sizeof *w.order);
  w.status = calloc((size_t)nm + 1, sizeof *w.status);
  w.errs = calloc((size_t)nm + 1, sizeof *w.errs);
  w.rejected = calloc((size_t)nm + 1, sizeof *w.rejected);
  w.write_failed = calloc((size_t)nm + 1, sizeof *w.write_failed);
  if (!w.order || !w.status || !w.errs || !w.rejected || !w.write_failed) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory");
    goto done;
  }
  if (cache_dir && *cache_dir && snprintf(dir, sizeof dir, "%s/cuda", cache_dir) < (int)sizeof dir)
    w.dir = dir;
  t0 = now_ms();
  bool unusable = w.dir && !cm_make_dirs(w.dir); /* then every compiled module fails to be stored */
  if (unusable) w.dir = NULL;
  if (w.dir) remove_stale_temps(w.dir);
  st = run_workers(&w, thread_count(threads, nm), err);
  out->compile_ms = now_ms() - t0;
  if (st == CM_OK) st = collect(&w, unusable, err);
done:
  for (int i = 0; i < nk && src; i++) free(src[i]);
  for (int m = 0; m < out->n_modules && msrc; m++) free(msrc[m]);
  free(src), free(msrc), free(distinct_of), free(first);
  free(w.order), free(w.status), free(w.errs), free(w.rejected), free(w.write_failed);
  if (st != CM_OK) cm_cuda_build_free(out);
  return st;
}
