/* runtime/checkpoint.c — crash-safe training checkpoints.
 *
 * A checkpoint is a safetensors file (readable by any safetensors reader)
 * whose __metadata__ holds: format (CM_CKPT_FORMAT), step, epoch, rng_seed,
 * rng_counters (comma-separated decimals), config (JSON text, optional) and
 * data_crc32 (CRC-32 of the whole data section, 8 hex digits), so a torn or
 * bit-flipped file is rejected rather than trained on.
 *
 * Tensor data is streamed straight from the caller's buffers (a checkpoint is
 * several copies of the model; serializing it to memory first would double the
 * peak). The file goes to "<path>.tmp", is fsync'ed and renamed over path, and
 * the directory is fsync'ed so the rename itself survives a power loss. */
#include "training.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "checkpoint.c writes little-endian data as is");

static const char *st_dtype_name(cm_dtype dt) {
  switch (dt) {
  case CM_F32: return "F32";
  case CM_F64: return "F64";
  case CM_BF16: return "BF16";
  case CM_F16: return "F16";
  case CM_I32: return "I32";
  case CM_I64: return "I64";
  case CM_BOOL: return "BOOL";
  default: return NULL;
  }
}

/* crc32() takes uInt lengths; feed large tensors in pieces. */
static uLong crc_update(uLong crc, const uint8_t *p, size_t n) {
  while (n > 0) {
    uInt piece = n > (1u << 30) ? (1u << 30) : (uInt)n;
    crc = crc32(crc, p, piece);
    p += piece;
    n -= piece;
  }
  return crc;
}

static bool write_all(int fd, const void *data, size_t n) {
  const uint8_t *p = data;
  while (n > 0) {
    ssize_t k = write(fd, p, n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += k;
    n -= (size_t)k;
  }
  return true;
}

static char *dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  if (!slash) return strdup(".");
  if (slash == path) return strdup("/");
  return strndup(path, (size_t)(slash - path));
}

/* Makes a completed rename durable; some file systems refuse fsync on a
 * directory (EINVAL), which is not a failure of the write. */
static cm_status fsync_dir(const char *path, cm_err *err) {
  char *dir = dir_of(path);
  if (!dir) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  cm_status st = CM_OK;
  if (fd < 0) {
    st =
        cm_errorf(err, CM_EINVALID, "%s: cannot open directory %s: %s", path, dir, strerror(errno));
  } else {
    if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS)
      st = cm_errorf(err, CM_EINVALID, "%s: cannot fsync directory %s: %s", path, dir,
                     strerror(errno));
    close(fd);
  }
  free(dir);
  return st;
}

/* Writes n_parts buffers to path atomically (tmp + fsync + rename + dir fsync). */
static cm_status atomic_write(const char *path, int n_parts, const void *const *parts,
                              const size_t *sizes, cm_err *err) {
  size_t plen = strlen(path);
  char *tmp = malloc(plen + 5);
  if (!tmp) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp", 5);
  cm_status st = CM_OK;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    st = cm_errorf(err, CM_EINVALID, "%s: cannot create: %s", tmp, strerror(errno));
    free(tmp);
    return st;
  }
  bool ok = true;
  for (int i = 0; i < n_parts && ok; i++) ok = write_all(fd, parts[i], sizes[i]);
  if (ok) ok = fsync(fd) == 0;
  int saved = errno;
  if (close(fd) != 0 && ok) {
    ok = false;
    saved = errno;
  }
  if (!ok) {
    st = cm_errorf(err, CM_EINVALID, "%s: cannot write: %s", tmp, strerror(saved));
    unlink(tmp);
  } else if (rename(tmp, path) != 0) {
    st = cm_errorf(err, CM_EINVALID, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    unlink(tmp);
  } else {
    st = fsync_dir(path, err);
  }
  free(tmp);
  return st;
}

static bool add_meta(cJSON *meta, const char *key, const char *value) {
  cJSON *s = cJSON_CreateString(value);
  return s && cJSON_AddItemToObject(meta, key, s);
}

cm_status cm_checkpoint_write(const char *path, const cm_checkpoint_meta *meta, int n,
                              const char *const *names, const cm_tensor *const *tensors,
                              cm_err *err) {
  if (n < 0) return cm_errorf(err, CM_EINVALID, "%s: negative tensor count %d", path, n);
  if (meta->n_rng_counters < 0 || meta->n_rng_counters > CM_CKPT_MAX_COUNTERS)
    return cm_errorf(err, CM_EINVALID, "%s: %d RNG counters, at most %d", path,
                     meta->n_rng_counters, CM_CKPT_MAX_COUNTERS);
  cJSON *root = cJSON_CreateObject();
  cJSON *md = cJSON_CreateObject();
  const void **parts = malloc(((size_t)n + 1) * sizeof *parts);
  size_t *sizes = malloc(((size_t)n + 1) * sizeof *sizes);
  char *header = NULL;
  cm_status st = CM_OK;
  if (!root || !md || !parts || !sizes) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
    goto done;
  }
  uint64_t offset = 0;
  uLong crc = crc32(0L, Z_NULL, 0);
  for (int i = 0; i < n; i++) {
    const cm_tensor *t = tensors[i];
    const char *dt = st_dtype_name(t->type.dtype);
    if (!names[i] || !*names[i] || strcmp(names[i], "__metadata__") == 0) {
      st = cm_errorf(err, CM_EINVALID, "%s: tensor %d: empty or reserved name", path, i);
      goto done;
    }
    if (!dt) {
      st = cm_errorf(err, CM_EINVALID, "%s: tensor %s: dtype %d has no safetensors name", path,
                     names[i], (int)t->type.dtype);
      goto done;
    }
    if (cJSON_GetObjectItemCaseSensitive(root, names[i])) {
      st = cm_errorf(err, CM_EINVALID, "%s: tensor %s: duplicate name", path, names[i]);
      goto done;
    }
    size_t nb = cm_type_nbytes(&t->type);
    if (nb > 0 && !t->data) {
      st = cm_errorf(err, CM_EINVALID, "%s: tensor %s: no data", path, names[i]);
      goto done;
    }
    cJSON *e = cJSON_CreateObject();
    cJSON *shape = cJSON_CreateArray();
    cJSON *offs = cJSON_CreateArray();
    bool ok = e && shape && offs && cJSON_AddItemToObject(root, names[i], e);
    if (!ok) {
      if (!e || !cJSON_GetObjectItemCaseSensitive(root, names[i])) cJSON_Delete(e);
      cJSON_Delete(shape);
      cJSON_Delete(offs);
      st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
      goto done;
    }
    cJSON_AddItemToObject(e, "dtype", cJSON_CreateString(dt));
    for (int r = 0; r < t->type.rank; r++)
      cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->type.dims[r]));
    cJSON_AddItemToObject(e, "shape", shape);
    cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)offset));
    cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(offset + nb)));
    cJSON_AddItemToObject(e, "data_offsets", offs);
    offset += nb;
    crc = crc_update(crc, t->data, nb);
    parts[i + 1] = t->data;
    sizes[i + 1] = nb;
  }
  char num[32], counters[CM_CKPT_MAX_COUNTERS * 21 + 1] = "";
  size_t cl = 0;
  for (int i = 0; i < meta->n_rng_counters; i++)
    cl += (size_t)snprintf(counters + cl, sizeof counters - cl, "%s%" PRIu64, i ? "," : "",
                           meta->rng_counters[i]);
  bool ok = add_meta(md, "format", CM_CKPT_FORMAT);
  snprintf(num, sizeof num, "%" PRId64, meta->step);
  ok = ok && add_meta(md, "step", num);
  snprintf(num, sizeof num, "%" PRId64, meta->epoch);
  ok = ok && add_meta(md, "epoch", num);
  snprintf(num, sizeof num, "%" PRIu64, meta->rng_seed);
  ok = ok && add_meta(md, "rng_seed", num);
  ok = ok && add_meta(md, "rng_counters", counters);
  if (meta->config_json) ok = ok && add_meta(md, "config", meta->config_json);
  snprintf(num, sizeof num, "%08lx", (unsigned long)crc);
  ok = ok && add_meta(md, "data_crc32", num);
  ok = ok && cJSON_AddItemToObject(root, "__metadata__", md);
  if (!ok) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
    goto done;
  }
  md = NULL; /* owned by root now */
  char *json = cJSON_PrintUnformatted(root);
  if (!json) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
    goto done;
  }
  size_t jl = strlen(json), hl = (jl + 7) / 8 * 8; /* data starts 8-byte aligned */
  header = malloc(8 + hl);
  if (!header) {
    free(json);
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
    goto done;
  }
  for (int b = 0; b < 8; b++) header[b] = (char)(((uint64_t)hl >> (8 * b)) & 0xff);
  memcpy(header + 8, json, jl);
  memset(header + 8 + jl, ' ', hl - jl);
  free(json);
  parts[0] = header;
  sizes[0] = 8 + hl;
  st = atomic_write(path, n + 1, parts, sizes, err);
done:
  cJSON_Delete(root);
  cJSON_Delete(md);
  free(parts);
  free(sizes);
  free(header);
  return st;
}

static const char *meta_get(const cm_tensor_set *s, const char *key) {
  for (int i = 0; i < s->n_meta; i++)
    if (strcmp(s->meta_keys[i], key) == 0) return s->meta_values[i];
  return NULL;
}

static bool parse_i64(const char *s, int64_t *out) {
  if (!s || !*s) return false;
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || *end) return false;
  *out = v;
  return true;
}

static bool parse_u64(const char *s, const char **end_out, uint64_t *out) {
  if (!s || *s < '0' || *s > '9') return false;
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno) return false;
  *out = v;
  *end_out = end;
  return true;
}

void cm_checkpoint_meta_free(cm_checkpoint_meta *meta) {
  free(meta->config_json);
  meta->config_json = NULL;
}

static cm_status read_meta(const cm_tensor_set *s, cm_checkpoint_meta *meta, cm_err *err) {
  const char *v = meta_get(s, "format");
  if (!v || strcmp(v, CM_CKPT_FORMAT) != 0)
    return cm_errorf(err, CM_EINVALID, "metadata format is %s%s%s, not " CM_CKPT_FORMAT,
                     v ? "\"" : "", v ? v : "missing", v ? "\"" : "");
  if (!parse_i64(meta_get(s, "step"), &meta->step) || meta->step < 0)
    return cm_errorf(err, CM_EINVALID, "metadata step is missing or not an integer >= 0");
  if (!parse_i64(meta_get(s, "epoch"), &meta->epoch) || meta->epoch < 0)
    return cm_errorf(err, CM_EINVALID, "metadata epoch is missing or not an integer >= 0");
  const char *end;
  v = meta_get(s, "rng_seed");
  if (!parse_u64(v, &end, &meta->rng_seed) || *end)
    return cm_errorf(err, CM_EINVALID, "metadata rng_seed is missing or not a u64");
  v = meta_get(s, "rng_counters");
  if (!v) return cm_errorf(err, CM_EINVALID, "metadata rng_counters is missing");
  meta->n_rng_counters = 0;
  while (*v) {
    if (meta->n_rng_counters == CM_CKPT_MAX_COUNTERS)
      return cm_errorf(err, CM_EINVALID, "metadata rng_counters: more than %d values",
                       CM_CKPT_MAX_COUNTERS);
    if (!parse_u64(v, &end, &meta->rng_counters[meta->n_rng_counters]) || (*end && *end != ','))
      return cm_errorf(err, CM_EINVALID, "metadata rng_counters \"%.64s\" is not a list of u64",
                       meta_get(s, "rng_counters"));
    meta->n_rng_counters++;
    v = *end ? end + 1 : end;
    if (*end == ',' && !*v)
      return cm_errorf(err, CM_EINVALID, "metadata rng_counters ends with a comma");
  }
  v = meta_get(s, "config");
  if (v) {
    cJSON *j = cJSON_Parse(v);
    bool obj = cJSON_IsObject(j);
    cJSON_Delete(j);
    if (!obj) return cm_errorf(err, CM_EINVALID, "metadata config is not a JSON object");
    meta->config_json = strdup(v);
    if (!meta->config_json) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  return CM_OK;
}

cm_status cm_checkpoint_load(const char *path, cm_tensor_set *tensors, cm_checkpoint_meta *meta,
                             cm_err *err) {
  memset(meta, 0, sizeof *meta);
  cm_tensor_set_init(tensors);
  const uint8_t *buf;
  size_t len;
  cm_status st = cm_file_map(path, &buf, &len, err); /* safetensors: sizes from its header */
  if (st) return st;
  st = cm_safetensors_parse(buf, len, tensors, err);
  if (!st) {
    /* the parser has checked the header length lies inside the file */
    uint64_t hl = 0;
    for (int b = 7; b >= 0; b--) hl = (hl << 8) | (uint8_t)buf[b];
    const char *want = meta_get(tensors, "data_crc32");
    char got[16];
    snprintf(got, sizeof got, "%08lx",
             (unsigned long)crc_update(crc32(0L, Z_NULL, 0), buf + 8 + hl, len - 8 - (size_t)hl));
    if (!want)
      st = cm_errorf(err, CM_EINVALID, "metadata data_crc32 is missing");
    else if (strcmp(want, got) != 0)
      st = cm_errorf(err, CM_EINVALID, "data CRC-32 is %s, the header says %.16s: corrupt file",
                     got, want);
    else
      st = read_meta(tensors, meta, err);
  }
  cm_file_unmap(buf, len);
  if (st) {
    cm_tensor_set_free(tensors);
    cm_checkpoint_meta_free(meta);
    cm_err_prefix(err, "checkpoint %s: ", path);
  }
  return st;
}

static char *join(const char *dir, const char *name) {
  size_t a = strlen(dir), b = strlen(name);
  char *p = malloc(a + b + 2);
  if (!p) return NULL;
  memcpy(p, dir, a);
  p[a] = '/';
  memcpy(p + a + 1, name, b + 1);
  return p;
}

/* The step of "ckpt-<step>.safetensors" (exactly that form), else -1. */
static int64_t ckpt_step(const char *name) {
  if (strncmp(name, "ckpt-", 5) != 0) return -1;
  const char *p = name + 5;
  if (*p < '0' || *p > '9') return -1;
  int64_t v = 0;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (v > (INT64_MAX - 9) / 10) return -1;
    v = v * 10 + (*p - '0');
  }
  return strcmp(p, ".safetensors") == 0 ? v : -1;
}

static int cmp_i64_desc(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? 1 : x > y ? -1 : 0;
}

/* Steps of the checkpoints in dir, newest first (malloc'd; *n may be 0). */
static cm_status list_steps(const char *dir, int64_t **steps, int *n, cm_err *err) {
  *steps = NULL;
  *n = 0;
  DIR *d = opendir(dir);
  if (!d) return cm_errorf(err, CM_EINVALID, "%s: cannot list: %s", dir, strerror(errno));
  int cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    int64_t s = ckpt_step(e->d_name);
    if (s < 0) continue;
    if (*n == cap) {
      cap = cap ? 2 * cap : 16;
      int64_t *p = realloc(*steps, (size_t)cap * sizeof *p);
      if (!p) {
        closedir(d);
        free(*steps);
        *steps = NULL;
        return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
      }
      *steps = p;
    }
    (*steps)[(*n)++] = s;
  }
  closedir(d);
  if (*n) qsort(*steps, (size_t)*n, sizeof **steps, cmp_i64_desc);
  return CM_OK;
}

cm_status cm_checkpoint_save(const char *dir, const cm_checkpoint_meta *meta, int n,
                             const char *const *names, const cm_tensor *const *tensors, int keep,
                             char **path_out, cm_err *err) {
  if (path_out) *path_out = NULL;
  if (meta->step < 0)
    return cm_errorf(err, CM_EINVALID, "%s: checkpoint step %" PRId64 " is negative", dir,
                     meta->step);
  char name[64];
  snprintf(name, sizeof name, "ckpt-%" PRId64 ".safetensors", meta->step);
  char *path = join(dir, name), *latest = join(dir, "latest");
  cm_status st = CM_OK;
  if (!path || !latest) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
    goto done;
  }
  st = cm_checkpoint_write(path, meta, n, names, tensors, err);
  if (st) goto done;
  char line[80];
  snprintf(line, sizeof line, "%s\n", name);
  const void *part = line;
  size_t size = strlen(line);
  st = atomic_write(latest, 1, &part, &size, err);
  if (st) goto done;
  if (keep > 0) {
    int64_t *steps;
    int ns;
    st = list_steps(dir, &steps, &ns, err);
    if (st) goto done;
    int kept = 0;
    for (int i = 0; i < ns; i++) {
      if (steps[i] > meta->step) continue; /* never remove a newer run's files */
      if (kept < keep) {
        kept++; /* the newest, starting with the one just written */
        continue;
      }
      char old[64];
      snprintf(old, sizeof old, "ckpt-%" PRId64 ".safetensors", steps[i]);
      char *op = join(dir, old);
      if (op) unlink(op);
      free(op);
    }
    free(steps);
    /* temp files a killed writer left behind (one writer per directory) */
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d))) {
      size_t l = strlen(e->d_name);
      if (l < 4 || strcmp(e->d_name + l - 4, ".tmp") != 0) continue;
      char base[256];
      if (l - 4 >= sizeof base) continue;
      memcpy(base, e->d_name, l - 4);
      base[l - 4] = '\0';
      if (ckpt_step(base) < 0) continue;
      char *tp = join(dir, e->d_name);
      if (tp) unlink(tp);
      free(tp);
    }
    if (d) closedir(d);
  }
done:
  if (!st && path_out) {
    *path_out = path;
    path = NULL;
  }
  free(path);
  free(latest);
  return st;
}

cm_status cm_checkpoint_latest(const char *dir, char **path, cm_err *err) {
  *path = NULL;
  char *lp = join(dir, "latest");
  if (!lp) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
  if (access(lp, F_OK) != 0 && errno == ENOENT) {
    /* no pointer yet (or a pre-pointer layout): the highest step present */
    free(lp);
    int64_t *steps;
    int ns;
    cm_status st = list_steps(dir, &steps, &ns, err);
    if (st) return st;
    if (ns == 0) {
      free(steps);
      return cm_errorf(err, CM_EINVALID, "%s: no checkpoint (no latest, no ckpt-*.safetensors)",
                       dir);
    }
    char name[64];
    snprintf(name, sizeof name, "ckpt-%" PRId64 ".safetensors", steps[0]);
    free(steps);
    *path = join(dir, name);
    return *path ? CM_OK : cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
  }
  char *text = NULL, line[256] = "";
  size_t k = 0;
  cm_status rst = cm_read_file_max(lp, sizeof line - 1, "a latest pointer", &text, &k, err);
  if (rst) {
    free(lp);
    return rst;
  }
  memcpy(line, text, k + 1);
  free(text);
  while (k > 0 && (line[k - 1] == '\n' || line[k - 1] == '\r' || line[k - 1] == ' '))
    line[--k] = '\0';
  if (k == 0 || strchr(line, '/') || strlen(line) != k || strcmp(line, ".") == 0 ||
      strcmp(line, "..") == 0) {
    cm_status st = cm_errorf(err, CM_EINVALID, "%s: does not hold a checkpoint file name", lp);
    free(lp);
    return st;
  }
  free(lp);
  *path = join(dir, line);
  return *path ? CM_OK : cm_errorf(err, CM_EINTERNAL, "%s: out of memory", dir);
}
