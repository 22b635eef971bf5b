/* frontend/safetensors.c — named tensor sets and the safetensors format.
 *
 * Layout: an 8-byte little-endian u64 header length N, N bytes of JSON header
 *   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
 *    ..., "__metadata__": {"key": "value"}}
 * then the data buffer; offsets are relative to its start, and the tensors'
 * byte ranges must tile it exactly (no gap, no overlap, nothing left over).
 *
 * The reader trusts nothing: every length, offset, dimension and byte of the
 * header is checked before it is used, and any defect is CM_EINVALID with one
 * line naming the tensor and the rule. Element bytes are copied as they are
 * (little-endian on disk and in memory), so NaN payloads and bf16/f16 bit
 * patterns survive a round trip exactly. */
#include "frontend.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Tensor bytes are copied without swapping: this is only right on a
 * little-endian host, which is all cmaec targets (x86-64, aarch64, CUDA). */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "safetensors.c copies little-endian data as is; add byte swapping");

#define ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000) /* the reference implementation's limit */
#define ST_MAX_EXACT_INT 9007199254740992.0         /* 2^53: larger JSON numbers lose digits */
#define ST_META_KEY "__metadata__"
#define ST_NAME_SHOWN 160 /* bytes of a name shown in a message */

static const struct {
  const char *name;
  cm_dtype dtype;
} st_dtypes[] = {
    {"F32", CM_F32}, {"F64", CM_F64}, {"BF16", CM_BF16}, {"F16", CM_F16},
    {"I32", CM_I32}, {"I64", CM_I64}, {"BOOL", CM_BOOL},
};

static const char *st_dtype_name(cm_dtype dt) {
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
    if (st_dtypes[i].dtype == dt) return st_dtypes[i].name;
  return "?";
}

/* A name as it appears in a message: quoted, escaped (a message is one
 * printable line whatever the file holds) and cut to a readable length. */
static const char *shown_name(const char *s, char out[ST_NAME_SHOWN + 16]) {
  size_t o = 0;
  out[o++] = '"';
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (o >= ST_NAME_SHOWN) {
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    if (*p < 0x20 || *p == 0x7f || *p == '"' || *p == '\\') {
      o += (size_t)snprintf(out + o, 8, "\\x%02x", *p);
    } else {
      out[o++] = (char)*p;
    }
  }
  out[o++] = '"';
  out[o] = '\0';
  return out;
}

/* Well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
 * With json_text, raw control bytes other than JSON whitespace are refused too:
 * JSON never needs them, and inside strings they must be escaped. Returns the
 * offset of the first bad byte, or n. */
static size_t utf8_check(const uint8_t *p, size_t n, bool json_text) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = p[i];
    if (c < 0x80) {
      if (json_text && c < 0x20 && c != '\t' && c != '\n' && c != '\r') return i;
      i++;
      continue;
    }
    size_t extra;
    uint8_t lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
    if (c >= 0xc2 && c <= 0xdf) {
      extra = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      extra = 2;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      extra = 3;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      return i;
    }
    if (n - i <= extra) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k <= extra; k++)
      if ((p[i + k] & 0xc0) != 0x80) return i;
    i += extra + 1;
  }
  return n;
}

static bool str_is_utf8(const char *s) {
  size_t n = strlen(s);
  return utf8_check((const uint8_t *)s, n, false) == n;
}

/* Elements of a type whose dims may be 0; -1 past CM_MAX_ELEMENTS. */
static int64_t checked_numel(const cm_type *t) {
  int64_t n = 1;
  for (int d = 0; d < t->rank; d++)
    if (t->dims[d] == 0) return 0;
  for (int d = 0; d < t->rank; d++) {
    if (t->dims[d] < 0 || t->dims[d] > CM_MAX_ELEMENTS / n) return -1;
    n *= t->dims[d];
  }
  return n;
}

/* "BF16[2,3]" (safetensors spelling; dims may be 0). */
static char *st_type_str(const cm_type *t, char *buf, size_t size) {
  size_t o = (size_t)snprintf(buf, size, "%s[", st_dtype_name(t->dtype));
  for (int d = 0; d < t->rank && o < size; d++)
    o += (size_t)snprintf(buf + o, size - o, "%s%" PRId64, d ? "," : "", t->dims[d]);
  if (o < size) snprintf(buf + o, size - o, "]");
  return buf;
}

/* ---- tensor sets ------------------------------------------------------- */

void cm_tensor_set_init(cm_tensor_set *s) {
  memset(s, 0, sizeof *s);
}

void cm_tensor_set_free(cm_tensor_set *s) {
  if (!s) return;
  for (int i = 0; i < s->n; i++) {
    free(s->names[i]);
    cm_tensor_free(&s->tensors[i]);
  }
  free(s->names);
  free(s->tensors);
  for (int i = 0; i < s->n_meta; i++) {
    free(s->meta_keys[i]);
    free(s->meta_values[i]);
  }
  free(s->meta_keys);
  free(s->meta_values);
  cm_tensor_set_init(s);
}

static int set_find(const cm_tensor_set *s, const char *name) {
  for (int i = 0; i < s->n; i++)
    if (strcmp(s->names[i], name) == 0) return i;
  return -1;
}

const cm_tensor *cm_tensor_set_get(const cm_tensor_set *s, const char *name) {
  if (!s || !name) return NULL;
  int i = set_find(s, name);
  return i < 0 ? NULL : &s->tensors[i];
}

static cm_status set_reserve(cm_tensor_set *s, int want, cm_err *err) {
  if (want <= s->cap) return CM_OK;
  int cap = s->cap ? s->cap : 16;
  while (cap < want) {
    if (cap > INT32_MAX / 2) return cm_errorf(err, CM_EINTERNAL, "tensor set too large");
    cap *= 2;
  }
  char **names = realloc(s->names, sizeof *names * (size_t)cap);
  if (!names) return cm_errorf(err, CM_EINTERNAL, "out of memory growing a tensor set");
  s->names = names;
  cm_tensor *tensors = realloc(s->tensors, sizeof *tensors * (size_t)cap);
  if (!tensors) return cm_errorf(err, CM_EINTERNAL, "out of memory growing a tensor set");
  s->tensors = tensors;
  s->cap = cap;
  return CM_OK;
}

/* A tensor a set may hold: a known dtype, rank 0..6, dims >= 0 (zero-size
 * tensors are legal in files), data present unless it has no bytes. */
static cm_status check_set_tensor(const char *name, const cm_tensor *t, cm_err *err) {
  char nb[ST_NAME_SHOWN + 16];
  if (!t) return cm_errorf(err, CM_EINVALID, "tensor %s: no tensor given", shown_name(name, nb));
  if ((unsigned)t->type.dtype >= CM_DTYPE_COUNT)
    return cm_errorf(err, CM_EINVALID, "tensor %s: invalid dtype %d", shown_name(name, nb),
                     (int)t->type.dtype);
  if (t->type.rank < 0 || t->type.rank > CM_MAX_RANK)
    return cm_errorf(err, CM_EINVALID, "tensor %s: rank %d is outside 0..%d", shown_name(name, nb),
                     t->type.rank, CM_MAX_RANK);
  int64_t n = checked_numel(&t->type);
  if (n < 0)
    return cm_errorf(err, CM_EINVALID,
                     "tensor %s: dims must be >= 0 with at most 2^40 elements in all",
                     shown_name(name, nb));
  if (n > 0 && !t->data)
    return cm_errorf(err, CM_EINVALID, "tensor %s: %" PRId64 " elements but no data",
                     shown_name(name, nb), n);
  return CM_OK;
}

static cm_status check_set_name(const char *name, cm_err *err) {
  if (!name) return cm_errorf(err, CM_EINVALID, "tensor set: no name given");
  if (strcmp(name, ST_META_KEY) == 0)
    return cm_errorf(err, CM_EINVALID, "tensor set: the name \"" ST_META_KEY "\" is reserved");
  return CM_OK;
}

/* Copies a tensor whose dims may be 0 (cm_tensor_alloc allocates at least a byte). */
static cm_status copy_tensor(cm_tensor *dst, const cm_tensor *src, cm_err *err) {
  cm_status st = cm_tensor_alloc(dst, src->type, err);
  if (st) return st;
  size_t nbytes = (size_t)checked_numel(&src->type) * cm_dtype_size(src->type.dtype);
  if (nbytes) memcpy(dst->data, src->data, nbytes);
  return CM_OK;
}

/* On failure t is untouched and still the caller's. */
cm_status cm_tensor_set_take(cm_tensor_set *s, const char *name, cm_tensor *t, cm_err *err) {
  cm_status st = check_set_name(name, err);
  if (!st) st = check_set_tensor(name, t, err);
  if (st) return st;
  int i = set_find(s, name);
  if (i >= 0) {
    cm_tensor_free(&s->tensors[i]);
  } else {
    if ((st = set_reserve(s, s->n + 1, err))) return st;
    char *copy = strdup(name);
    if (!copy) return cm_errorf(err, CM_EINTERNAL, "out of memory copying a tensor name");
    i = s->n++;
    s->names[i] = copy;
  }
  s->tensors[i] = *t;
  t->data = NULL;
  return CM_OK;
}

cm_status cm_tensor_set_add(cm_tensor_set *s, const char *name, const cm_tensor *t, cm_err *err) {
  cm_status st = check_set_name(name, err);
  if (!st) st = check_set_tensor(name, t, err);
  if (st) return st;
  cm_tensor copy;
  if ((st = copy_tensor(&copy, t, err))) return st;
  st = cm_tensor_set_take(s, name, &copy, err);
  cm_tensor_free(&copy); /* empty after a successful take */
  return st;
}

cm_status cm_tensor_set_meta(cm_tensor_set *s, const char *key, const char *value, cm_err *err) {
  if (!key || !value)
    return cm_errorf(err, CM_EINVALID, "tensor set: metadata needs key and value");
  char *v = strdup(value);
  if (!v) return cm_errorf(err, CM_EINTERNAL, "out of memory copying metadata");
  for (int i = 0; i < s->n_meta; i++)
    if (strcmp(s->meta_keys[i], key) == 0) {
      free(s->meta_values[i]);
      s->meta_values[i] = v;
      return CM_OK;
    }
  char *k = strdup(key);
  char **keys = realloc(s->meta_keys, sizeof *keys * ((size_t)s->n_meta + 1));
  if (keys) s->meta_keys = keys;
  char **values = realloc(s->meta_values, sizeof *values * ((size_t)s->n_meta + 1));
  if (values) s->meta_values = values;
  if (!k || !keys || !values) {
    free(k);
    free(v);
    return cm_errorf(err, CM_EINTERNAL, "out of memory adding metadata");
  }
  s->meta_keys[s->n_meta] = k;
  s->meta_values[s->n_meta] = v;
  s->n_meta++;
  return CM_OK;
}

/* ---- parsing ----------------------------------------------------------- */

typedef struct st_entry {
  const char *name; /* points into the cJSON tree */
  cm_type type;
  uint64_t begin, end;
} st_entry;

/* A JSON number that is a non-negative integer small enough to be exact. */
static bool json_uint(const cJSON *j, uint64_t *out) {
  if (!cJSON_IsNumber(j)) return false;
  double d = j->valuedouble;
  if (!(d >= 0 && d <= ST_MAX_EXACT_INT) || d != floor(d)) return false;
  *out = (uint64_t)d;
  return true;
}

static cm_status parse_entry(const cJSON *item, uint64_t data_len, st_entry *e, cm_err *err) {
  char nb[ST_NAME_SHOWN + 16];
  const char *nm = shown_name(item->string, nb);
  if (!cJSON_IsObject(item))
    return cm_errorf(err, CM_EINVALID, "tensor %s: entry is not an object", nm);
  const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
  for (const cJSON *f = item->child; f; f = f->next) {
    const cJSON **slot = strcmp(f->string, "dtype") == 0          ? &dtype
                         : strcmp(f->string, "shape") == 0        ? &shape
                         : strcmp(f->string, "data_offsets") == 0 ? &offsets
                                                                  : NULL;
    char kb[ST_NAME_SHOWN + 16];
    if (!slot)
      return cm_errorf(err, CM_EINVALID, "tensor %s: unknown key %s", nm,
                       shown_name(f->string, kb));
    if (*slot)
      return cm_errorf(err, CM_EINVALID, "tensor %s: duplicate key %s", nm,
                       shown_name(f->string, kb));
    *slot = f;
  }
  if (!dtype) return cm_errorf(err, CM_EINVALID, "tensor %s: missing \"dtype\"", nm);
  if (!shape) return cm_errorf(err, CM_EINVALID, "tensor %s: missing \"shape\"", nm);
  if (!offsets) return cm_errorf(err, CM_EINVALID, "tensor %s: missing \"data_offsets\"", nm);

  if (!cJSON_IsString(dtype))
    return cm_errorf(err, CM_EINVALID, "tensor %s: \"dtype\" is not a string", nm);
  bool known = false;
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
    if (strcmp(dtype->valuestring, st_dtypes[i].name) == 0) {
      e->type.dtype = st_dtypes[i].dtype;
      known = true;
    }
  char db[ST_NAME_SHOWN + 16];
  if (!known)
    return cm_errorf(err, CM_EINVALID,
                     "tensor %s: unsupported dtype %s (supported: F32 F64 BF16 F16 I32 I64 BOOL)",
                     nm, shown_name(dtype->valuestring, db));

  if (!cJSON_IsArray(shape))
    return cm_errorf(err, CM_EINVALID, "tensor %s: \"shape\" is not an array", nm);
  int rank = 0;
  for (const cJSON *d = shape->child; d; d = d->next) {
    if (rank == CM_MAX_RANK)
      return cm_errorf(err, CM_EINVALID, "tensor %s: rank %d exceeds the maximum %d", nm,
                       cJSON_GetArraySize(shape), CM_MAX_RANK);
    uint64_t v;
    if (!json_uint(d, &v))
      return cm_errorf(err, CM_EINVALID, "tensor %s: shape[%d] is not a non-negative integer", nm,
                       rank);
    e->type.dims[rank++] = (int64_t)v;
  }
  e->type.rank = rank;
  int64_t numel = checked_numel(&e->type);
  if (numel < 0)
    return cm_errorf(err, CM_EINVALID, "tensor %s: shape has more than 2^40 elements", nm);
  uint64_t nbytes = (uint64_t)numel * cm_dtype_size(e->type.dtype);

  if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2)
    return cm_errorf(err, CM_EINVALID, "tensor %s: \"data_offsets\" is not an array of 2 numbers",
                     nm);
  for (int k = 0; k < 2; k++) {
    uint64_t v;
    if (!json_uint(cJSON_GetArrayItem(offsets, k), &v))
      return cm_errorf(err, CM_EINVALID,
                       "tensor %s: data_offsets[%d] is not a non-negative integer", nm, k);
    *(k ? &e->end : &e->begin) = v;
  }
  if (e->begin > e->end)
    return cm_errorf(err, CM_EINVALID, "tensor %s: data_offsets begin %" PRIu64 " > end %" PRIu64,
                     nm, e->begin, e->end);
  if (e->end > data_len)
    return cm_errorf(err, CM_EINVALID,
                     "tensor %s: data_offsets end %" PRIu64 " is past the end of the %" PRIu64
                     "-byte data buffer",
                     nm, e->end, data_len);
  if (e->end - e->begin != nbytes) {
    char tb[128];
    return cm_errorf(err, CM_EINVALID,
                     "tensor %s: data_offsets [%" PRIu64 ", %" PRIu64 "] span %" PRIu64
                     " bytes but %s needs %" PRIu64,
                     nm, e->begin, e->end, e->end - e->begin, st_type_str(&e->type, tb, sizeof tb),
                     nbytes);
  }
  return CM_OK;
}

static int cmp_str_ptr(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first name occurring twice (NULL if none); sorts names in place. */
static const char *find_duplicate(const char **names, size_t n) {
  if (n < 2) return NULL;
  qsort(names, n, sizeof *names, cmp_str_ptr);
  for (size_t i = 1; i < n; i++)
    if (strcmp(names[i - 1], names[i]) == 0) return names[i];
  return NULL;
}

static int cmp_entry_range(const void *a, const void *b) {
  const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return 0;
}

/* safetensors requires the byte ranges to tile the data buffer exactly. */
static cm_status check_tiling(st_entry *entries, size_t n, uint64_t data_len, cm_err *err) {
  if (n == 0) {
    if (data_len)
      return cm_errorf(err, CM_EINVALID,
                       "data buffer is %" PRIu64 " bytes but there are no tensors", data_len);
    return CM_OK;
  }
  st_entry **order = malloc(sizeof *order * n);
  if (!order) return cm_errorf(err, CM_EINTERNAL, "out of memory checking data offsets");
  for (size_t i = 0; i < n; i++) order[i] = &entries[i];
  qsort(order, n, sizeof *order, cmp_entry_range);
  uint64_t expected = 0;
  const st_entry *prev = NULL;
  cm_status st = CM_OK;
  char nb[ST_NAME_SHOWN + 16], pb[ST_NAME_SHOWN + 16];
  for (size_t i = 0; i < n && !st; i++) {
    const st_entry *e = order[i];
    if (e->begin < expected)
      st = cm_errorf(err, CM_EINVALID,
                     "tensor %s: data_offsets [%" PRIu64 ", %" PRIu64 "] overlap tensor %s, which "
                     "ends at %" PRIu64,
                     shown_name(e->name, nb), e->begin, e->end, shown_name(prev->name, pb),
                     expected);
    else if (e->begin > expected)
      st = cm_errorf(err, CM_EINVALID,
                     "tensor %s: data_offsets [%" PRIu64 ", %" PRIu64 "] leave a gap of %" PRIu64
                     " bytes after offset %" PRIu64,
                     shown_name(e->name, nb), e->begin, e->end, e->begin - expected, expected);
    expected = e->end;
    prev = e;
  }
  free(order);
  if (!st && expected != data_len)
    st = cm_errorf(err, CM_EINVALID,
                   "data buffer is %" PRIu64 " bytes but the tensors cover only %" PRIu64, data_len,
                   expected);
  return st;
}

static cm_status parse_metadata(const cJSON *meta, cm_tensor_set *out, cm_err *err) {
  if (!cJSON_IsObject(meta))
    return cm_errorf(err, CM_EINVALID, "\"" ST_META_KEY "\" is not an object");
  char kb[ST_NAME_SHOWN + 16];
  size_t n = 0;
  for (const cJSON *kv = meta->child; kv; kv = kv->next, n++)
    if (!cJSON_IsString(kv))
      return cm_errorf(err, CM_EINVALID, "\"" ST_META_KEY "\" key %s: value is not a string",
                       shown_name(kv->string, kb));
  const char **keys = malloc(sizeof *keys * (n ? n : 1));
  if (!keys) return cm_errorf(err, CM_EINTERNAL, "out of memory reading metadata");
  n = 0;
  for (const cJSON *kv = meta->child; kv; kv = kv->next) keys[n++] = kv->string;
  const char *dup = find_duplicate(keys, n);
  cm_status st = CM_OK;
  if (dup)
    st = cm_errorf(err, CM_EINVALID, "\"" ST_META_KEY "\": duplicate key %s", shown_name(dup, kb));
  free(keys);
  if (st) return st;
  /* Keys are distinct, so set_meta appends in file order. */
  for (const cJSON *kv = meta->child; kv && !st; kv = kv->next)
    st = cm_tensor_set_meta(out, kv->string, kv->valuestring, err);
  return st;
}

/* Fills out (initialized by the caller) from a parsed header and the data. */
static cm_status parse_tree(const cJSON *root, const uint8_t *data, uint64_t data_len,
                            cm_tensor_set *out, cm_err *err) {
  if (!cJSON_IsObject(root)) return cm_errorf(err, CM_EINVALID, "header is not a JSON object");
  size_t n = 0;
  const cJSON *meta = NULL;
  for (const cJSON *c = root->child; c; c = c->next) {
    if (strcmp(c->string, ST_META_KEY) != 0) {
      n++;
    } else {
      if (meta) return cm_errorf(err, CM_EINVALID, "duplicate \"" ST_META_KEY "\"");
      meta = c;
    }
  }
  if (n > INT32_MAX / 4) return cm_errorf(err, CM_EINVALID, "header lists too many tensors");
  st_entry *entries = calloc(n ? n : 1, sizeof *entries);
  const char **names = malloc(sizeof *names * (n ? n : 1));
  cm_status st = CM_OK;
  if (!entries || !names) {
    st = cm_errorf(err, CM_EINTERNAL, "out of memory reading the header");
    goto done;
  }
  size_t i = 0;
  for (const cJSON *c = root->child; c && !st; c = c->next) {
    if (c == meta) continue;
    entries[i].name = c->string;
    names[i] = c->string;
    st = parse_entry(c, data_len, &entries[i], err);
    i++;
  }
  if (st) goto done;
  const char *dup = find_duplicate(names, n);
  if (dup) {
    char nb[ST_NAME_SHOWN + 16];
    st = cm_errorf(err, CM_EINVALID, "duplicate tensor name %s", shown_name(dup, nb));
    goto done;
  }
  if ((st = check_tiling(entries, n, data_len, err))) goto done;
  if (meta && (st = parse_metadata(meta, out, err))) goto done;
  if ((st = set_reserve(out, (int)n, err))) goto done;
  for (i = 0; i < n && !st; i++) {
    const st_entry *e = &entries[i];
    size_t nbytes = (size_t)(e->end - e->begin);
    const uint8_t *src = data + e->begin;
    if (e->type.dtype == CM_BOOL) {
      for (size_t k = 0; k < nbytes && !st; k++)
        if (src[k] > 1) {
          char nb[ST_NAME_SHOWN + 16];
          st = cm_errorf(err, CM_EINVALID, "tensor %s: BOOL element %zu is %u, not 0 or 1",
                         shown_name(e->name, nb), k, src[k]);
        }
      if (st) break;
    }
    cm_tensor t;
    if ((st = cm_tensor_alloc(&t, e->type, err))) break;
    if (nbytes) memcpy(t.data, src, nbytes);
    char *name = strdup(e->name);
    if (!name) {
      cm_tensor_free(&t);
      st = cm_errorf(err, CM_EINTERNAL, "out of memory copying a tensor name");
      break;
    }
    out->names[out->n] = name;
    out->tensors[out->n] = t;
    out->n++;
  }
done:
  free(entries);
  free(names);
  return st;
}

static cm_status parse_image(const uint8_t *buf, size_t len, cm_tensor_set *out, cm_err *err) {
  if (!buf && len) return cm_errorf(err, CM_EINTERNAL, "no buffer given");
  if (len < 8)
    return cm_errorf(err, CM_EINVALID,
                     "file is %zu bytes, shorter than 8 bytes (the header length field)", len);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
  if (hlen > ST_MAX_HEADER)
    return cm_errorf(err, CM_EINVALID,
                     "header length %" PRIu64 " exceeds the limit of %" PRIu64 " bytes", hlen,
                     ST_MAX_HEADER);
  if (hlen > len - 8)
    return cm_errorf(err, CM_EINVALID,
                     "header length %" PRIu64 " runs past the end of the %zu-byte file", hlen, len);
  const uint8_t *header = buf + 8;
  size_t bad = utf8_check(header, (size_t)hlen, true);
  if (bad < hlen)
    return cm_errorf(err, CM_EINVALID,
                     header[bad] < 0x20 ? "header has control byte 0x%02x at byte %zu"
                                        : "header is not valid UTF-8 (byte 0x%02x at %zu)",
                     header[bad], bad);
  /* A NUL-terminated copy keeps cJSON inside memory we own, whatever it scans. */
  char *text = malloc((size_t)hlen + 1);
  if (!text) return cm_errorf(err, CM_EINTERNAL, "out of memory reading the header");
  memcpy(text, header, (size_t)hlen);
  text[hlen] = '\0';
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(text, (size_t)hlen, &end, false);
  cm_status st = CM_OK;
  if (!root) {
    size_t at = end && end >= text && end <= text + hlen ? (size_t)(end - text) : 0;
    st = cm_errorf(err, CM_EINVALID, "header is not valid JSON (error near byte %zu)", at);
  } else {
    /* Only padding (whitespace) may follow the JSON value. */
    for (const char *p = end; p < text + hlen; p++)
      if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
        st =
            cm_errorf(err, CM_EINVALID, "header has trailing bytes after the JSON value (byte %zu)",
                      (size_t)(p - text));
        break;
      }
  }
  if (!st) st = parse_tree(root, header + hlen, (uint64_t)(len - 8 - hlen), out, err);
  cJSON_Delete(root);
  free(text);
  return st;
}

/* out is initialized here; on failure it is left empty. */
cm_status cm_safetensors_parse(const uint8_t *buf, size_t len, cm_tensor_set *out, cm_err *err) {
  cm_tensor_set_init(out);
  cm_status st = parse_image(buf, len, out, err);
  if (st) {
    cm_tensor_set_free(out);
    cm_err_prefix(err, "safetensors: ");
  }
  return st;
}

/* The file is mapped, not read: the header (at most ST_MAX_HEADER bytes) is checked
 * first, then the tensors' byte ranges must tile the rest of the file exactly, so
 * only a file whose size the header accounts for has its data touched. */
cm_status cm_safetensors_load(const char *path, cm_tensor_set *out, cm_err *err) {
  cm_tensor_set_init(out);
  const uint8_t *data;
  size_t len;
  cm_status st = cm_file_map(path, &data, &len, err);
  if (st) return st;
  st = parse_image(data, len, out, err);
  if (st) {
    cm_tensor_set_free(out);
    cm_err_prefix(err, "%s: ", path);
  }
  cm_file_unmap(data, len);
  return st;
}

/* ---- writing ----------------------------------------------------------- */

typedef struct strbuf {
  char *p;
  size_t n, cap;
  bool oom;
} strbuf;

static void sb_put(strbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = '\0';
}

static void sb_str(strbuf *b, const char *s) {
  sb_put(b, s, strlen(s));
}

static void sb_fmt(strbuf *b, const char *fmt, uint64_t v) {
  char tmp[32];
  int k = snprintf(tmp, sizeof tmp, fmt, v);
  sb_put(b, tmp, (size_t)k);
}

/* A JSON string literal; s is valid UTF-8 (checked by the caller). */
static void sb_json_string(strbuf *b, const char *s) {
  sb_put(b, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      char esc[2] = {'\\', (char)*p};
      sb_put(b, esc, 2);
    } else if (*p < 0x20) {
      sb_fmt(b, "\\u%04" PRIx64, *p);
    } else {
      sb_put(b, (const char *)p, 1);
    }
  }
  sb_put(b, "\"", 1);
}

cm_status cm_safetensors_serialize(const cm_tensor_set *s, uint8_t **buf, size_t *len,
                                   cm_err *err) {
  *buf = NULL;
  *len = 0;
  char nb[ST_NAME_SHOWN + 16];
  for (int i = 0; i < s->n; i++) {
    cm_status st = check_set_tensor(s->names[i], &s->tensors[i], err);
    if (!st && strcmp(s->names[i], ST_META_KEY) == 0)
      st = cm_errorf(err, CM_EINVALID, "tensor set: the name \"" ST_META_KEY "\" is reserved");
    if (!st && !str_is_utf8(s->names[i]))
      st = cm_errorf(err, CM_EINVALID, "tensor %s: name is not valid UTF-8",
                     shown_name(s->names[i], nb));
    if (st) return cm_err_prefix(err, "safetensors: ");
  }
  for (int i = 0; i < s->n_meta; i++)
    if (!str_is_utf8(s->meta_keys[i]) || !str_is_utf8(s->meta_values[i]))
      return cm_errorf(err, CM_EINVALID, "safetensors: metadata %s is not valid UTF-8",
                       shown_name(s->meta_keys[i], nb));

  strbuf h = {0};
  sb_put(&h, "{", 1);
  if (s->n_meta) {
    sb_str(&h, "\"" ST_META_KEY "\":{");
    for (int i = 0; i < s->n_meta; i++) {
      if (i) sb_put(&h, ",", 1);
      sb_json_string(&h, s->meta_keys[i]);
      sb_put(&h, ":", 1);
      sb_json_string(&h, s->meta_values[i]);
    }
    sb_put(&h, "}", 1);
  }
  uint64_t offset = 0;
  for (int i = 0; i < s->n; i++) {
    const cm_type *t = &s->tensors[i].type;
    if (i || s->n_meta) sb_put(&h, ",", 1);
    sb_json_string(&h, s->names[i]);
    sb_str(&h, ":{\"dtype\":\"");
    sb_str(&h, st_dtype_name(t->dtype));
    sb_str(&h, "\",\"shape\":[");
    for (int d = 0; d < t->rank; d++)
      sb_fmt(&h, d ? ",%" PRIu64 : "%" PRIu64, (uint64_t)t->dims[d]);
    uint64_t nbytes = (uint64_t)checked_numel(t) * cm_dtype_size(t->dtype);
    sb_fmt(&h, "],\"data_offsets\":[%" PRIu64, offset);
    sb_fmt(&h, ",%" PRIu64 "]}", offset + nbytes);
    offset += nbytes;
  }
  sb_put(&h, "}", 1);
  /* Pad so the data starts 8-byte aligned (8 + header length is a multiple of 8). */
  while (!h.oom && h.n % 8) sb_put(&h, " ", 1);
  if (h.oom) {
    free(h.p);
    return cm_errorf(err, CM_EINTERNAL, "safetensors: out of memory writing the header");
  }
  if (h.n > ST_MAX_HEADER) {
    free(h.p);
    return cm_errorf(err, CM_EINVALID, "safetensors: header of %zu bytes exceeds the limit", h.n);
  }
  size_t total = 8 + h.n + (size_t)offset;
  uint8_t *out = malloc(total);
  if (!out) {
    free(h.p);
    return cm_errorf(err, CM_EINTERNAL, "safetensors: out of memory (%zu bytes)", total);
  }
  for (int i = 0; i < 8; i++) out[i] = (uint8_t)((uint64_t)h.n >> (8 * i));
  memcpy(out + 8, h.p, h.n);
  free(h.p);
  size_t at = 8 + h.n;
  for (int i = 0; i < s->n; i++) {
    const cm_tensor *t = &s->tensors[i];
    size_t nbytes = (size_t)checked_numel(&t->type) * cm_dtype_size(t->type.dtype);
    if (nbytes) memcpy(out + at, t->data, nbytes);
    at += nbytes;
  }
  *buf = out;
  *len = total;
  return CM_OK;
}

cm_status cm_safetensors_save(const char *path, const cm_tensor_set *s, cm_err *err) {
  uint8_t *buf;
  size_t len;
  cm_status st = cm_safetensors_serialize(s, &buf, &len, err);
  if (st) return cm_err_prefix(err, "%s: ", path);
  size_t plen = strlen(path);
  char *tmp = malloc(plen + 5);
  if (!tmp) {
    free(buf);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  }
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp", 5);
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    st = cm_errorf(err, CM_EINVALID, "%s: cannot create: %s", tmp, strerror(errno));
  } else {
    bool ok = fwrite(buf, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int saved = errno;
    if (fclose(f) != 0 && ok) {
      ok = false;
      saved = errno;
    }
    if (!ok) {
      st = cm_errorf(err, CM_EINVALID, "%s: cannot write: %s", tmp, strerror(saved));
      remove(tmp);
    } else if (rename(tmp, path) != 0) {
      st = cm_errorf(err, CM_EINVALID, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
      remove(tmp);
    }
  }
  free(tmp);
  free(buf);
  return st;
}
