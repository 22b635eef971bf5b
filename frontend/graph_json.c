/* frontend/graph_json.c — graph JSON v1 ("cmaec.graph/1") read and write, and
 * loading a graph file by content. The format is described in
 * docs/graph-format.md; op attributes in docs/ops.md. */
#include "frontend.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* Integers in JSON travel as doubles: only those of magnitude <= 2^53 are exact. */
#define MAX_EXACT_INT ((int64_t)1 << 53)

/* ---- small helpers ----------------------------------------------------- */

/* Quotes a string from the file for an error message: escapes what would break
 * the one-line message and shortens long strings. */
static const char *quoted(const char *s, char *buf, size_t size) {
  size_t n = 0;
  buf[n++] = '"';
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    /* Keep room for one escape, "...", the closing quote and the NUL. */
    if (n + 4 + 3 + 2 > size) {
      memcpy(buf + n, "...", 3);
      n += 3;
      break;
    }
    if (*p < 0x20 || *p == 0x7f || *p == '"' || *p == '\\') {
      snprintf(buf + n, size - n, "\\x%02x", *p);
      n += 4;
    } else {
      buf[n++] = (char)*p;
    }
  }
  buf[n++] = '"';
  buf[n] = '\0';
  return buf;
}

static const char *json_kind(const cJSON *item) {
  if (cJSON_IsString(item)) return "a string";
  if (cJSON_IsNumber(item)) return "a number";
  if (cJSON_IsBool(item)) return "a boolean";
  if (cJSON_IsNull(item)) return "null";
  if (cJSON_IsArray(item)) return "an array";
  if (cJSON_IsObject(item)) return "an object";
  return "something else";
}

/* An exact integer in [lo, hi]. */
static cm_status get_int(const cJSON *item, const char *path, int64_t lo, int64_t hi, int64_t *out,
                         cm_err *err) {
  if (!cJSON_IsNumber(item))
    return cm_errorf(err, CM_EINVALID, "%s: expected an integer, got %s", path, json_kind(item));
  double v = item->valuedouble;
  if (!(fabs(v) <= (double)MAX_EXACT_INT) || v != floor(v))
    return cm_errorf(err, CM_EINVALID, "%s: expected an integer, got %.17g", path, v);
  int64_t i = (int64_t)v;
  if (i < lo || i > hi)
    return cm_errorf(err, CM_EINVALID, "%s: %" PRId64 " is out of range [%" PRId64 ", %" PRId64 "]",
                     path, i, lo, hi);
  *out = i;
  return CM_OK;
}

/* A number; non-finite values are written as the strings "nan", "inf", "-inf". */
static cm_status get_number(const cJSON *item, const char *path, double *out, cm_err *err) {
  if (cJSON_IsNumber(item)) {
    /* a literal past the double range (1e400) parses as inf: say so, not inf */
    if (!isfinite(item->valuedouble))
      return cm_errorf(err, CM_EINVALID,
                       "%s: the number overflows to infinity (write \"inf\" or \"-inf\")", path);
    *out = item->valuedouble;
    return CM_OK;
  }
  if (cJSON_IsString(item)) {
    const char *s = item->valuestring;
    if (strcmp(s, "nan") == 0)
      *out = NAN;
    else if (strcmp(s, "inf") == 0)
      *out = INFINITY;
    else if (strcmp(s, "-inf") == 0)
      *out = -INFINITY;
    else {
      char q[80];
      return cm_errorf(err, CM_EINVALID,
                       "%s: expected a number (or \"nan\", \"inf\", \"-inf\"), got %s", path,
                       quoted(s, q, sizeof q));
    }
    return CM_OK;
  }
  return cm_errorf(err, CM_EINVALID, "%s: expected a number, got %s", path, json_kind(item));
}

static cm_status get_bool(const cJSON *item, const char *path, bool *out, cm_err *err) {
  if (!cJSON_IsBool(item))
    return cm_errorf(err, CM_EINVALID, "%s: expected true or false, got %s", path, json_kind(item));
  *out = cJSON_IsTrue(item);
  return CM_OK;
}

static cm_status get_string(const cJSON *item, const char *path, const char **out, cm_err *err) {
  if (!cJSON_IsString(item) || !item->valuestring)
    return cm_errorf(err, CM_EINVALID, "%s: expected a string, got %s", path, json_kind(item));
  *out = item->valuestring;
  return CM_OK;
}

/* cJSON keeps repeated keys; a repeated key would silently shadow the first. */
static cm_status check_unique_keys(const cJSON *obj, const char *path, cm_err *err) {
  /* Every object of the format has a few dozen keys at most; the bound keeps
   * the pairwise check cheap on hostile input. */
  int count = cJSON_GetArraySize(obj);
  if (count > 64)
    return cm_errorf(err, CM_EINVALID, "%s: %d keys, more than any object of the format has", path,
                     count);
  for (const cJSON *a = obj->child; a; a = a->next)
    for (const cJSON *b = a->next; b; b = b->next)
      if (a->string && b->string && strcmp(a->string, b->string) == 0) {
        char q[80];
        return cm_errorf(err, CM_EINVALID, "%s: duplicate key %s", path,
                         quoted(a->string, q, sizeof q));
      }
  return CM_OK;
}

/* An array of at most max_n exact integers in [lo, hi]. */
static cm_status get_int_array(const cJSON *item, const char *path, int max_n, int64_t lo,
                               int64_t hi, int64_t *vals, int *n, cm_err *err) {
  if (!cJSON_IsArray(item))
    return cm_errorf(err, CM_EINVALID, "%s: expected an array of integers, got %s", path,
                     json_kind(item));
  int count = cJSON_GetArraySize(item);
  if (count > max_n)
    return cm_errorf(err, CM_EINVALID, "%s: has %d entries, at most %d allowed", path, count,
                     max_n);
  int i = 0;
  for (const cJSON *e = item->child; e; e = e->next, i++) {
    char p[160];
    snprintf(p, sizeof p, "%s[%d]", path, i);
    if (get_int(e, p, lo, hi, &vals[i], err)) return err ? err->status : CM_EINVALID;
  }
  *n = count;
  return CM_OK;
}

static cm_status get_shape(const cJSON *item, const char *path, int *rank, int64_t *dims,
                           cm_err *err) {
  if (!cJSON_IsArray(item))
    return cm_errorf(err, CM_EINVALID, "%s: expected an array of dimensions, got %s", path,
                     json_kind(item));
  int count = cJSON_GetArraySize(item);
  if (count > CM_MAX_RANK)
    return cm_errorf(err, CM_EINVALID, "%s: rank %d exceeds the maximum rank %d", path, count,
                     CM_MAX_RANK);
  int64_t numel = 1;
  int i = 0;
  for (const cJSON *e = item->child; e; e = e->next, i++) {
    char p[160];
    snprintf(p, sizeof p, "%s[%d]", path, i);
    int64_t d;
    if (cJSON_IsNumber(e) && e->valuedouble > (double)CM_MAX_ELEMENTS &&
        e->valuedouble == floor(e->valuedouble))
      return cm_errorf(err, CM_EINVALID, "%s: dimension %.0f exceeds 2^40", p, e->valuedouble);
    if (get_int(e, p, INT64_MIN, INT64_MAX, &d, err)) return CM_EINVALID;
    if (d < 1) return cm_errorf(err, CM_EINVALID, "%s: dimension %" PRId64 " is not >= 1", p, d);
    if (d > CM_MAX_ELEMENTS)
      return cm_errorf(err, CM_EINVALID, "%s: dimension %" PRId64 " exceeds 2^40", p, d);
    if (numel > CM_MAX_ELEMENTS / d)
      return cm_errorf(err, CM_EINVALID, "%s: the shape has more than 2^40 elements", path);
    numel *= d;
    dims[i] = d;
  }
  *rank = count;
  return CM_OK;
}

/* stride/padding/dilation: [h, w], or one integer for both. */
static cm_status get_pair(const cJSON *item, const char *path, int lo, int out[2], cm_err *err) {
  int64_t v[2] = {0, 0};
  if (cJSON_IsNumber(item)) {
    if (get_int(item, path, lo, INT32_MAX, &v[0], err)) return CM_EINVALID;
    out[0] = out[1] = (int)v[0];
    return CM_OK;
  }
  int n = 0;
  if (get_int_array(item, path, 2, lo, INT32_MAX, v, &n, err)) return CM_EINVALID;
  if (n != 2) return cm_errorf(err, CM_EINVALID, "%s: expected 2 entries (h, w), got %d", path, n);
  out[0] = (int)v[0];
  out[1] = (int)v[1];
  return CM_OK;
}

/* ---- attributes -------------------------------------------------------- */

enum attr_key {
#define CM_ATTR_KEY(id, key, bit) K_##id,
#include "../ir/attrs.def"
#undef CM_ATTR_KEY
  K_COUNT
};

/* JSON key and the CM_ATTR_* bit that admits it, in the order they are written. */
static const struct {
  const char *key;
  unsigned bit;
} attr_keys[K_COUNT] = {
#define CM_ATTR_KEY(id, key, bit) [K_##id] = {key, bit},
#include "../ir/attrs.def"
#undef CM_ATTR_KEY
};

/* Attributes that must be given. const's shape defaults to a scalar; the rest
 * have the defaults of cm_attrs_default. */
static bool attr_required(cm_op op, enum attr_key k) {
  switch (k) {
  case K_DTYPE: return cm_op_get_info(op)->category == CM_CAT_SOURCE || op == CM_OP_CAST;
  case K_SHAPE: return op != CM_OP_CONST;
  case K_PERM: return true;
  case K_START:
  case K_STOP: return true;
  default: return false;
  }
}

/* One entry of "inputs", "params", "state" or "nodes". */
typedef struct entry {
  const cJSON *obj;
  const char *section;
  int index; /* in its section */
  const char *name;
  cm_op op;
  int n_inputs;
  int *inputs; /* entry indices */
  int id;      /* graph node id once added, else -1 */
  int mark;    /* topological sort: 0 unseen, 1 on the stack, 2 done */
} entry;

typedef struct reader {
  entry *entries;
  int n_entries;
  int *slots; /* name -> entry index, open addressing, -1 empty */
  uint64_t mask;
} reader;

static int reader_find(const reader *r, const char *name) {
  for (uint64_t h = cm_hash_str(name) & r->mask;; h = (h + 1) & r->mask) {
    int e = r->slots[h];
    if (e < 0 || strcmp(r->entries[e].name, name) == 0) return e;
  }
}

static void reader_insert(reader *r, int e) {
  uint64_t h = cm_hash_str(r->entries[e].name) & r->mask;
  while (r->slots[h] >= 0) h = (h + 1) & r->mask;
  r->slots[h] = e;
}

static void place_of(const entry *e, char *buf, size_t size) {
  snprintf(buf, size, "%s[%d]", e->section, e->index);
}

static cm_status parse_init(const cJSON *item, const char *path, cm_init *out, cm_err *err) {
  if (!cJSON_IsObject(item))
    return cm_errorf(err, CM_EINVALID, "%s: expected an object, got %s", path, json_kind(item));
  if (check_unique_keys(item, path, err)) return CM_EINVALID;
  const cJSON *kind_item = cJSON_GetObjectItemCaseSensitive(item, "kind");
  char p[200], q[80];
  if (!kind_item) return cm_errorf(err, CM_EINVALID, "%s: missing \"kind\"", path);
  snprintf(p, sizeof p, "%s.kind", path);
  const char *kind_name = NULL;
  if (get_string(kind_item, p, &kind_name, err)) return CM_EINVALID;
  cm_init init = {CM_INIT_NONE, 0, 0};
  if (!cm_init_kind_from_name(kind_name, &init.kind))
    return cm_errorf(err, CM_EINVALID, "%s: unknown init kind %s", p,
                     quoted(kind_name, q, sizeof q));
  /* Fields per kind, stored into a then b, with their defaults. */
  const char *fields[2] = {NULL, NULL};
  double defaults[2] = {0, 0};
  switch (init.kind) {
  case CM_INIT_CONSTANT: fields[0] = "value"; break;
  case CM_INIT_NORMAL:
  case CM_INIT_TRUNC_NORMAL: fields[0] = "mean", fields[1] = "std", defaults[1] = 1; break;
  case CM_INIT_UNIFORM: fields[0] = "low", fields[1] = "high", defaults[1] = 1; break;
  case CM_INIT_XAVIER_UNIFORM: fields[0] = "gain", fields[1] = "flatten", defaults[0] = 1; break;
  case CM_INIT_SINCOS_2D: fields[0] = "cls"; break;
  case CM_INIT_TORCH_DEFAULT: fields[0] = "fan_in"; break;
  default: break;
  }
  init.a = defaults[0];
  init.b = defaults[1];
  for (const cJSON *f = item->child; f; f = f->next) {
    if (strcmp(f->string, "kind") == 0) continue;
    snprintf(p, sizeof p, "%s.%s", path, f->string);
    if (fields[0] && strcmp(f->string, fields[0]) == 0) {
      if (init.kind == CM_INIT_TORCH_DEFAULT) {
        int64_t fan_in;
        if (get_int(f, p, 0, CM_MAX_ELEMENTS, &fan_in, err)) return CM_EINVALID;
        init.a = (double)fan_in;
      } else if (get_number(f, p, &init.a, err)) {
        return CM_EINVALID;
      }
    } else if (fields[1] && strcmp(f->string, fields[1]) == 0) {
      if (get_number(f, p, &init.b, err)) return CM_EINVALID;
    } else {
      char q2[80];
      return cm_errorf(err, CM_EINVALID, "%s: unknown field %s for init kind %s", path,
                       quoted(f->string, q, sizeof q), quoted(kind_name, q2, sizeof q2));
    }
  }
  *out = init;
  return CM_OK;
}

/* The "data" attribute f (path p): an array of numbers into a malloc'd *data
 * (freed by the caller), which attrs->data points to. */
static cm_status parse_data(const cJSON *f, const char *p, cm_attrs *attrs, double **data,
                            cm_err *err) {
  if (!cJSON_IsArray(f))
    return cm_errorf(err, CM_EINVALID, "%s: expected an array of numbers, got %s", p, json_kind(f));
  cm_status st = CM_OK;
  int count = cJSON_GetArraySize(f);
  *data = malloc(sizeof(double) * (size_t)(count ? count : 1));
  if (!*data) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", p);
  int i = 0;
  for (const cJSON *x = f->child; x && !st; x = x->next, i++) {
    char pi[220];
    snprintf(pi, sizeof pi, "%s[%d]", p, i);
    st = get_number(x, pi, &(*data)[i], err);
  }
  attrs->data = *data;
  attrs->n_data = count;
  return st;
}

/* Reads the attributes of entry e into attrs; *data receives const data
 * (malloc'd, freed by the caller). Per-axis arrays are checked against the
 * rank of the first input, which is already in the graph. */
static cm_status parse_attrs(const cm_graph *g, const reader *r, const entry *e, cm_attrs *attrs,
                             double **data, cm_err *err) {
  const cm_op_info *info = cm_op_get_info(e->op);
  char place[64], p[200], q[80];
  place_of(e, place, sizeof place);
  cm_attrs_default(attrs);
  *data = NULL;
  int in_rank = e->n_inputs > 0 ? g->nodes[r->entries[e->inputs[0]].id].type.rank : 0;
  const cJSON *given[K_COUNT] = {0};

  for (const cJSON *f = e->obj->child; f; f = f->next) {
    const char *key = f->string;
    if (strcmp(key, "name") == 0) continue;
    if (strcmp(e->section, "nodes") == 0 && (strcmp(key, "op") == 0 || strcmp(key, "inputs") == 0))
      continue;
    int k = 0;
    while (k < K_COUNT && !((info->attrs & attr_keys[k].bit) && strcmp(key, attr_keys[k].key) == 0))
      k++;
    if (k == K_COUNT)
      return cm_errorf(err, CM_EINVALID, "%s \"%s\" (%s): unknown attribute %s", place, e->name,
                       info->name, quoted(key, q, sizeof q));
    given[k] = f;
  }
  for (int k = 0; k < K_COUNT; k++)
    if ((info->attrs & attr_keys[k].bit) && !given[k] && attr_required(e->op, (enum attr_key)k))
      return cm_errorf(err, CM_EINVALID, "%s \"%s\" (%s): missing attribute \"%s\"", place, e->name,
                       info->name, attr_keys[k].key);

  for (int k = 0; k < K_COUNT; k++) {
    const cJSON *f = given[k];
    if (!f) continue;
    snprintf(p, sizeof p, "%s.%s", place, attr_keys[k].key);
    int64_t v[CM_MAX_RANK], one;
    int n = 0;
    const char *s = NULL;
    cm_status st = CM_OK;
    switch ((enum attr_key)k) {
    case K_DTYPE:
      if ((st = get_string(f, p, &s, err))) break;
      if (!cm_dtype_from_name(s, &attrs->dtype))
        st = cm_errorf(err, CM_EINVALID, "%s: unknown dtype %s", p, quoted(s, q, sizeof q));
      break;
    case K_SHAPE: st = get_shape(f, p, &attrs->rank, attrs->shape, err); break;
    case K_INIT: st = parse_init(f, p, &attrs->init, err); break;
    case K_VALUE: st = get_number(f, p, &attrs->value, err); break;
    case K_DATA: st = parse_data(f, p, attrs, data, err); break;
    case K_AXIS:
      if (!(st = get_int(f, p, INT32_MIN, INT32_MAX, &one, err))) attrs->axis = (int)one;
      break;
    case K_AXES:
      st = get_int_array(f, p, CM_MAX_RANK, INT32_MIN, INT32_MAX, v, &n, err);
      for (int i = 0; i < n && !st; i++) attrs->axes[i] = (int)v[i];
      attrs->n_axes = n;
      break;
    case K_KEEPDIMS: st = get_bool(f, p, &attrs->keepdims, err); break;
    case K_PERM:
    case K_START:
    case K_STOP:
    case K_STEP:
    case K_LO:
    case K_HI: {
      int64_t lo = k == K_PERM ? INT32_MIN : -MAX_EXACT_INT;
      int64_t hi = k == K_PERM ? INT32_MAX : MAX_EXACT_INT;
      if ((st = get_int_array(f, p, CM_MAX_RANK, lo, hi, v, &n, err))) break;
      if (n != in_rank) {
        st = cm_errorf(err, CM_EINVALID,
                       "%s \"%s\" (%s): \"%s\" has %d entries, the input has rank %d", place,
                       e->name, info->name, attr_keys[k].key, n, in_rank);
        break;
      }
      for (int i = 0; i < n; i++) {
        if (k == K_PERM) attrs->perm[i] = (int)v[i];
        if (k == K_START) attrs->start[i] = v[i];
        if (k == K_STOP) attrs->stop[i] = v[i];
        if (k == K_STEP) attrs->step[i] = v[i];
        if (k == K_LO) attrs->lo[i] = v[i];
        if (k == K_HI) attrs->hi[i] = v[i];
      }
      break;
    }
    case K_TRANSPOSE_A: st = get_bool(f, p, &attrs->transpose_a, err); break;
    case K_TRANSPOSE_B: st = get_bool(f, p, &attrs->transpose_b, err); break;
    case K_STRIDE: st = get_pair(f, p, INT32_MIN, attrs->stride, err); break;
    case K_PADDING: st = get_pair(f, p, INT32_MIN, attrs->padding, err); break;
    case K_DILATION: st = get_pair(f, p, INT32_MIN, attrs->dilation, err); break;
    case K_GROUPS:
      if (!(st = get_int(f, p, INT32_MIN, INT32_MAX, &one, err))) attrs->groups = (int)one;
      break;
    case K_MODE:
      if ((st = get_string(f, p, &s, err))) break;
      if (strcmp(s, "sum") == 0)
        attrs->mode = CM_MODE_SUM;
      else if (strcmp(s, "mean") == 0)
        attrs->mode = CM_MODE_MEAN;
      else
        st = cm_errorf(err, CM_EINVALID, "%s: expected \"sum\" or \"mean\", got %s", p,
                       quoted(s, q, sizeof q));
      break;
    case K_RANKS:
      if (!(st = get_int(f, p, INT32_MIN, INT32_MAX, &one, err))) attrs->ranks = (int)one;
      break;
    case K_COUNT: break;
    }
    if (st) return st;
  }

  if (given[K_DATA]) {
    cm_type t = cm_type_make(attrs->dtype, attrs->rank, attrs->shape);
    int64_t numel = cm_type_numel(&t);
    if (attrs->n_data != numel) {
      char ts[96];
      return cm_errorf(
          err, CM_EINVALID,
          "%s \"%s\" (%s): \"data\" has %" PRId64 " numbers, %s has %" PRId64 " elements", place,
          e->name, info->name, attrs->n_data, cm_type_str(&t, ts, sizeof ts), numel);
    }
  }
  /* Values outside their dtype, named by their path (the builder applies the
   * same rule, cm_value_fits, naming the node). */
  if (given[K_VALUE] && given[K_DATA])
    return cm_errorf(err, CM_EINVALID,
                     "%s \"%s\" (%s): \"value\" and \"data\" are both given (a const takes one)",
                     place, e->name, info->name);
  cm_dtype vdt =
      e->op == CM_OP_PAD ? g->nodes[r->entries[e->inputs[0]].id].type.dtype : attrs->dtype;
  char why[160];
  if (given[K_VALUE] && !cm_value_fits(attrs->value, vdt, why, sizeof why))
    return cm_errorf(err, CM_EINVALID, "%s.value: %s", place, why);
  for (int64_t i = 0; given[K_DATA] && i < attrs->n_data; i++)
    if (!cm_value_fits(attrs->data[i], vdt, why, sizeof why))
      return cm_errorf(err, CM_EINVALID, "%s.data[%" PRId64 "]: %s", place, i, why);
  if (given[K_INIT] && attrs->init.kind == CM_INIT_CONSTANT &&
      !cm_value_fits(attrs->init.a, vdt, why, sizeof why))
    return cm_errorf(err, CM_EINVALID, "%s.init.value: %s", place, why);
  return CM_OK;
}

/* ---- reading ----------------------------------------------------------- */

static void reader_free(reader *r) {
  for (int i = 0; i < r->n_entries; i++) free(r->entries[i].inputs);
  free(r->entries);
  free(r->slots);
}

static cm_status collect_entries(reader *r, const cJSON *root, cm_err *err) {
  static const char *sections[] = {"inputs", "params", "state", "nodes"};
  static const cm_op section_ops[] = {CM_OP_INPUT, CM_OP_PARAM, CM_OP_STATE, CM_OP_COUNT};
  int total = 0;
  for (int s = 0; s < 4; s++) {
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, sections[s]);
    if (!arr) continue;
    if (!cJSON_IsArray(arr))
      return cm_errorf(err, CM_EINVALID, "%s: expected an array, got %s", sections[s],
                       json_kind(arr));
    total += cJSON_GetArraySize(arr);
  }
  r->entries = calloc((size_t)(total ? total : 1), sizeof(entry));
  uint64_t cap = 16;
  while (cap < 2 * (uint64_t)total) cap *= 2;
  r->slots = malloc(sizeof(int) * cap);
  if (!r->entries || !r->slots) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  r->mask = cap - 1;
  for (uint64_t i = 0; i < cap; i++) r->slots[i] = -1;

  char place[64], p[100], q[80];
  for (int s = 0; s < 4; s++) {
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, sections[s]);
    if (!arr) continue;
    int index = 0;
    for (const cJSON *obj = arr->child; obj; obj = obj->next, index++) {
      entry *e = &r->entries[r->n_entries];
      e->obj = obj;
      e->section = sections[s];
      e->index = index;
      e->id = -1;
      place_of(e, place, sizeof place);
      if (!cJSON_IsObject(obj))
        return cm_errorf(err, CM_EINVALID, "%s: expected an object, got %s", place, json_kind(obj));
      if (check_unique_keys(obj, place, err)) return CM_EINVALID;
      const cJSON *name = cJSON_GetObjectItemCaseSensitive(obj, "name");
      if (!name) return cm_errorf(err, CM_EINVALID, "%s: missing \"name\"", place);
      snprintf(p, sizeof p, "%s.name", place);
      if (get_string(name, p, &e->name, err)) return CM_EINVALID;
      if (!cm_name_is_valid(e->name))
        return cm_errorf(err, CM_EINVALID,
                         "%s: invalid name %s: use letters, digits and _ . : / - (or %%<digits>)",
                         p, quoted(e->name, q, sizeof q));
      int other = reader_find(r, e->name);
      if (other >= 0) {
        char other_place[64];
        place_of(&r->entries[other], other_place, sizeof other_place);
        return cm_errorf(err, CM_EINVALID, "%s \"%s\": duplicate name (also %s)", place, e->name,
                         other_place);
      }
      reader_insert(r, r->n_entries);
      r->n_entries++;

      if (section_ops[s] != CM_OP_COUNT) {
        e->op = section_ops[s];
        continue;
      }
      const cJSON *op = cJSON_GetObjectItemCaseSensitive(obj, "op");
      if (!op) return cm_errorf(err, CM_EINVALID, "%s \"%s\": missing \"op\"", place, e->name);
      const char *op_name = NULL;
      snprintf(p, sizeof p, "%s.op", place);
      if (get_string(op, p, &op_name, err)) return CM_EINVALID;
      if (!cm_op_from_name(op_name, &e->op))
        return cm_errorf(err, CM_EINVALID, "%s \"%s\": unknown op %s", place, e->name,
                         quoted(op_name, q, sizeof q));
      if (e->op == CM_OP_INPUT || e->op == CM_OP_PARAM || e->op == CM_OP_STATE)
        return cm_errorf(err, CM_EINVALID,
                         "%s \"%s\": op \"%s\" is declared in \"%s\", not in \"nodes\"", place,
                         e->name, op_name,
                         e->op == CM_OP_INPUT   ? "inputs"
                         : e->op == CM_OP_PARAM ? "params"
                                                : "state");
    }
  }
  return CM_OK;
}

/* Resolves the input names of every node to entry indices. */
static cm_status resolve_inputs(reader *r, cm_err *err) {
  char place[64], p[100], q[80];
  for (int i = 0; i < r->n_entries; i++) {
    entry *e = &r->entries[i];
    if (strcmp(e->section, "nodes") != 0) continue;
    place_of(e, place, sizeof place);
    const cJSON *ins = cJSON_GetObjectItemCaseSensitive(e->obj, "inputs");
    if (!ins) continue;
    snprintf(p, sizeof p, "%s.inputs", place);
    if (!cJSON_IsArray(ins))
      return cm_errorf(err, CM_EINVALID, "%s: expected an array of names, got %s", p,
                       json_kind(ins));
    int count = cJSON_GetArraySize(ins);
    e->inputs = malloc(sizeof(int) * (size_t)(count ? count : 1));
    if (!e->inputs) return cm_errorf(err, CM_EINTERNAL, "out of memory");
    int k = 0;
    for (const cJSON *x = ins->child; x; x = x->next, k++) {
      snprintf(p, sizeof p, "%s.inputs[%d]", place, k);
      const char *s = NULL;
      if (get_string(x, p, &s, err)) return CM_EINVALID;
      int target = reader_find(r, s);
      if (target < 0)
        return cm_errorf(err, CM_EINVALID, "%s: no value named %s", p, quoted(s, q, sizeof q));
      e->inputs[k] = target;
      e->n_inputs = k + 1;
    }
  }
  return CM_OK;
}

/* Depth-first post-order over the nodes in file order: a file already in
 * topological order keeps its order. Iterative, so long chains cannot
 * overflow the C stack. */
static cm_status topo_sort(reader *r, int *order, int *n_order, cm_err *err) {
  int *stack = malloc(sizeof(int) * (size_t)(r->n_entries ? r->n_entries : 1));
  int *next = calloc((size_t)(r->n_entries ? r->n_entries : 1), sizeof(int));
  if (!stack || !next) {
    free(stack);
    free(next);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  cm_status st = CM_OK;
  *n_order = 0;
  for (int root = 0; root < r->n_entries && !st; root++) {
    if (r->entries[root].mark || strcmp(r->entries[root].section, "nodes") != 0) continue;
    int top = 0;
    stack[top++] = root;
    r->entries[root].mark = 1;
    while (top > 0) {
      int cur = stack[top - 1];
      entry *e = &r->entries[cur];
      if (next[cur] < e->n_inputs) {
        int child = e->inputs[next[cur]++];
        entry *c = &r->entries[child];
        if (strcmp(c->section, "nodes") != 0 || c->mark == 2) continue;
        if (c->mark == 1) {
          /* The cycle is the stack from child up to cur, then child again. */
          char path[600];
          size_t len = 0;
          int from = top - 1;
          while (stack[from] != child) from--;
          for (int k = from; k < top; k++) {
            const char *nm = r->entries[stack[k]].name;
            if (len + strlen(nm) + 8 >= sizeof path) {
              len += (size_t)snprintf(path + len, sizeof path - len, "... -> ");
              break;
            }
            len += (size_t)snprintf(path + len, sizeof path - len, "%s -> ", nm);
          }
          snprintf(path + len, sizeof path - len, "%s", c->name);
          char place[64];
          place_of(c, place, sizeof place);
          st = cm_errorf(err, CM_EINVALID, "%s \"%s\": cycle: %s", place, c->name, path);
          break;
        }
        c->mark = 1;
        stack[top++] = child;
      } else {
        e->mark = 2;
        order[(*n_order)++] = cur;
        top--;
      }
    }
  }
  free(stack);
  free(next);
  return st;
}

static cm_status add_entry(cm_graph *g, reader *r, int idx, cm_err *err) {
  entry *e = &r->entries[idx];
  cm_attrs attrs;
  double *data = NULL;
  char place[64];
  place_of(e, place, sizeof place);
  const cm_op_info *info = cm_op_get_info(e->op);
  /* Arity first, so that attribute checks can rely on the inputs. */
  if (info->arity >= 0 ? e->n_inputs != info->arity : e->n_inputs < 1)
    return cm_errorf(err, CM_EINVALID, "%s \"%s\" (%s): takes %s%d input%s, got %d", place, e->name,
                     info->name, info->arity < 0 ? "at least " : "",
                     info->arity < 0 ? 1 : info->arity,
                     info->arity == 1 || info->arity < 0 ? "" : "s", e->n_inputs);
  if (parse_attrs(g, r, e, &attrs, &data, err)) {
    free(data);
    return err ? err->status : CM_EINVALID;
  }
  int ids[64], *inputs = ids;
  if (e->n_inputs > 64) {
    inputs = malloc(sizeof(int) * (size_t)e->n_inputs);
    if (!inputs) {
      free(data);
      return cm_errorf(err, CM_EINTERNAL, "out of memory");
    }
  }
  for (int k = 0; k < e->n_inputs; k++) inputs[k] = r->entries[e->inputs[k]].id;
  e->id = cm_graph_add(g, e->op, e->name, inputs, e->n_inputs, &attrs, err);
  if (inputs != ids) free(inputs);
  free(data);
  if (e->id < 0) return cm_err_prefix(err, "%s ", place);
  return CM_OK;
}

static cm_status add_outputs(const cJSON *root, cm_graph *g, cm_err *err) {
  char q[80];
  const cJSON *outputs = cJSON_GetObjectItemCaseSensitive(root, "outputs");
  if (!outputs) return CM_OK;
  if (!cJSON_IsArray(outputs))
    return cm_errorf(err, CM_EINVALID, "outputs: expected an array of names, got %s",
                     json_kind(outputs));
  int k = 0;
  for (const cJSON *x = outputs->child; x; x = x->next, k++) {
    char p[64];
    snprintf(p, sizeof p, "outputs[%d]", k);
    const char *s = NULL;
    if (get_string(x, p, &s, err)) return CM_EINVALID;
    int id = cm_graph_find(g, s);
    if (id < 0)
      return cm_errorf(err, CM_EINVALID, "%s: no value named %s", p, quoted(s, q, sizeof q));
    if (cm_graph_add_output(g, id, err)) return cm_err_prefix(err, "%s: ", p);
  }
  return CM_OK;
}

static const char *root_keys[] = {"format", "inputs", "params", "state", "nodes", "outputs"};

static cm_status build_graph(const cJSON *root, cm_graph *g, cm_err *err) {
  char q[80];
  if (!cJSON_IsObject(root))
    return cm_errorf(err, CM_EINVALID, "(root): expected an object, got %s", json_kind(root));
  if (check_unique_keys(root, "(root)", err)) return CM_EINVALID;
  for (const cJSON *f = root->child; f; f = f->next) {
    size_t k = 0;
    while (k < sizeof root_keys / sizeof root_keys[0] && strcmp(f->string, root_keys[k]) != 0) k++;
    if (k == sizeof root_keys / sizeof root_keys[0])
      return cm_errorf(err, CM_EINVALID,
                       "(root): unknown key %s (expected format, inputs, params, state, nodes, "
                       "outputs)",
                       quoted(f->string, q, sizeof q));
  }
  const cJSON *format = cJSON_GetObjectItemCaseSensitive(root, "format");
  if (!format)
    return cm_errorf(err, CM_EINVALID, "(root): missing \"format\" (\"%s\")", CM_GRAPH_FORMAT_TAG);
  const char *tag = NULL;
  if (get_string(format, "format", &tag, err)) return CM_EINVALID;
  if (strcmp(tag, CM_GRAPH_FORMAT_TAG) != 0)
    return cm_errorf(err, CM_EINVALID, "format: expected \"%s\", got %s", CM_GRAPH_FORMAT_TAG,
                     quoted(tag, q, sizeof q));

  reader r = {0};
  int *order = NULL, n_order = 0;
  cm_status st = collect_entries(&r, root, err);
  if (!st) st = resolve_inputs(&r, err);
  if (!st) {
    order = malloc(sizeof(int) * (size_t)(r.n_entries ? r.n_entries : 1));
    st =
        order ? topo_sort(&r, order, &n_order, err) : cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  /* Sources first, in section order, then the nodes. */
  for (int i = 0; i < r.n_entries && !st; i++)
    if (strcmp(r.entries[i].section, "nodes") != 0) st = add_entry(g, &r, i, err);
  for (int i = 0; i < n_order && !st; i++) st = add_entry(g, &r, order[i], err);
  free(order);
  if (!st) st = add_outputs(root, g, err);
  /* Every entry was checked as it was added; the rules of the whole graph are
   * the verifier's, as for every reader. Its error names the entry. */
  if (!st) {
    int bad = -1;
    st = cm_graph_verify_at(g, &bad, err);
    for (int i = 0; st && bad >= 0 && i < r.n_entries; i++)
      if (r.entries[i].id == bad) {
        char place[64];
        place_of(&r.entries[i], place, sizeof place);
        cm_err_prefix(err, "%s \"%s\" (%s): ", place, r.entries[i].name,
                      cm_op_name(r.entries[i].op));
      }
  }
  reader_free(&r);
  return st;
}

void cm_text_line_col(const char *text, size_t offset, int *line, int *col) {
  *line = 1;
  *col = 1;
  for (size_t i = 0; i < offset; i++) {
    if (text[i] == '\n') {
      ++*line;
      *col = 1;
    } else {
      ++*col;
    }
  }
}

/* cJSON decodes the escape \u0000 into a NUL that ends the C string: "x\u0000y"
 * would read as "x". Finds the first such escape in a (syntactically valid) JSON
 * text and writes the path of the value or key that holds it into path. */
static bool find_nul_escape(const char *s, size_t len, char *path, size_t size) {
  enum { MAX_DEPTH = 32 };
  struct frame {
    bool array, want_key;
    int index;
    const char *key; /* the raw key text, escapes as written */
    size_t key_len;
  } st[MAX_DEPTH];
  int depth = 0; /* frames past MAX_DEPTH are counted, not kept */
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    struct frame *top = depth > 0 && depth <= MAX_DEPTH ? &st[depth - 1] : NULL;
    if (c == '{' || c == '[') {
      if (depth < MAX_DEPTH) st[depth] = (struct frame){c == '[', c == '{', 0, NULL, 0};
      depth++;
    } else if (c == '}' || c == ']') {
      depth--;
    } else if (c == ',' && top) {
      if (top->array)
        top->index++;
      else
        top->want_key = true;
    } else if (c == '"') {
      size_t start = ++i;
      bool nul = false;
      for (; i < len && s[i] != '"'; i++)
        if (s[i] == '\\' && i + 1 < len) {
          nul |= s[i + 1] == 'u' && i + 5 < len && memcmp(s + i + 2, "0000", 4) == 0;
          i++;
        }
      bool is_key = top && !top->array && top->want_key;
      if (is_key) {
        top->key = s + start;
        top->key_len = i - start;
        top->want_key = false;
      }
      if (!nul) continue;
      /* the path of the enclosing containers, then this value's key or index */
      size_t n = 0;
      path[0] = '\0';
      int kept = depth < MAX_DEPTH ? depth : MAX_DEPTH;
      for (int d = 0; d < kept && n + 1 < size; d++) {
        const struct frame *f = &st[d];
        bool last = d == kept - 1;
        if (last && is_key) break; /* a key: the object's own path */
        if (f->array)
          n += (size_t)snprintf(path + n, size - n, "[%d]", f->index);
        else if (f->key)
          n += (size_t)snprintf(path + n, size - n, "%s%.*s", n ? "." : "",
                                (int)(f->key_len > 40 ? 40 : f->key_len), f->key);
        if (n >= size) n = size - 1;
      }
      if (depth > MAX_DEPTH && n + 4 < size) snprintf(path + n, size - n, "...");
      if (!path[0]) snprintf(path, size, "(root)");
      return true;
    }
  }
  return false;
}

cm_status cm_graph_from_json(const char *text, size_t len, cm_graph **out, cm_err *err) {
  *out = NULL;
  if (!text) len = 0;
  /* a UTF-8 byte-order mark, as some editors write, is not part of the document */
  if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) text += 3, len -= 3;
  if (len == 0)
    return cm_errorf(err, CM_EINVALID, "(root): empty document, expected a JSON object");
  const char *nul = memchr(text, '\0', len);
  if (nul)
    return cm_errorf(err, CM_EINVALID, "(root): NUL byte at offset %zu", (size_t)(nul - text));
  size_t first = 0;
  while (first < len &&
         (text[first] == ' ' || text[first] == '\t' || text[first] == '\n' || text[first] == '\r'))
    first++;
  if (first == len)
    return cm_errorf(err, CM_EINVALID, "(root): empty document, expected a JSON object");
  /* cJSON wants a terminating NUL to reject trailing garbage. */
  char *copy = malloc(len + 1);
  if (!copy) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  memcpy(copy, text, len);
  copy[len] = '\0';
  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(copy, len + 1, &end, 1);
  if (!root) {
    size_t at = end && end >= copy && end <= copy + len ? (size_t)(end - copy) : len;
    int line, col;
    cm_text_line_col(copy, at, &line, &col);
    free(copy);
    return cm_errorf(err, CM_EINVALID, "(root): JSON syntax error near line %d column %d%s", line,
                     col, at >= len ? " (unexpected end of input)" : "");
  }
  char path[200];
  bool has_nul = find_nul_escape(copy, len, path, sizeof path);
  free(copy);
  if (has_nul) {
    cJSON_Delete(root);
    return cm_errorf(err, CM_EINVALID, "%s: \\u0000 (NUL) in a string: not allowed", path);
  }
  cm_graph *g = cm_graph_new();
  if (!g) {
    cJSON_Delete(root);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  cm_status st = build_graph(root, g, err);
  cJSON_Delete(root);
  if (st) {
    cm_graph_free(g);
    return st;
  }
  *out = g;
  return CM_OK;
}

/* ---- writing ----------------------------------------------------------- */

typedef struct writer {
  bool oom;
} writer;

static cJSON *checked(writer *w, cJSON *item) {
  if (!item) w->oom = true;
  return item;
}

static void put(writer *w, cJSON *obj, const char *key, cJSON *item) {
  if (!item) {
    w->oom = true;
    return;
  }
  if (!cJSON_AddItemToObject(obj, key, item)) {
    cJSON_Delete(item);
    w->oom = true;
  }
}

static void append(writer *w, cJSON *arr, cJSON *item) {
  if (!item) {
    w->oom = true;
    return;
  }
  if (!cJSON_AddItemToArray(arr, item)) {
    cJSON_Delete(item);
    w->oom = true;
  }
}

/* Shortest of %.15g, %.16g, %.17g that reads back as the same double. */
static cJSON *number_item(double v) {
  if (isnan(v)) return cJSON_CreateString("nan");
  if (isinf(v)) return cJSON_CreateString(v > 0 ? "inf" : "-inf");
  char buf[40];
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) break;
  }
  return cJSON_CreateRaw(buf);
}

static cJSON *int_item(int64_t v) {
  char buf[32];
  snprintf(buf, sizeof buf, "%" PRId64, v);
  return cJSON_CreateRaw(buf);
}

static cJSON *int_array(writer *w, const int64_t *v, int n) {
  cJSON *arr = checked(w, cJSON_CreateArray());
  for (int i = 0; arr && i < n; i++) append(w, arr, int_item(v[i]));
  return arr;
}

static cJSON *pair_array(writer *w, const int v[2]) {
  int64_t x[2] = {v[0], v[1]};
  return int_array(w, x, 2);
}

static cJSON *init_object(writer *w, const cm_init *init) {
  cJSON *obj = checked(w, cJSON_CreateObject());
  if (!obj) return NULL;
  put(w, obj, "kind", cJSON_CreateString(cm_init_kind_name(init->kind)));
  switch (init->kind) {
  case CM_INIT_CONSTANT: put(w, obj, "value", number_item(init->a)); break;
  case CM_INIT_NORMAL:
  case CM_INIT_TRUNC_NORMAL:
    put(w, obj, "mean", number_item(init->a));
    put(w, obj, "std", number_item(init->b));
    break;
  case CM_INIT_UNIFORM:
    put(w, obj, "low", number_item(init->a));
    put(w, obj, "high", number_item(init->b));
    break;
  case CM_INIT_XAVIER_UNIFORM:
    put(w, obj, "gain", number_item(init->a));
    if (init->b != 0) put(w, obj, "flatten", number_item(init->b));
    break;
  case CM_INIT_SINCOS_2D: put(w, obj, "cls", number_item(init->a)); break;
  case CM_INIT_TORCH_DEFAULT:
    if (init->a > 0) put(w, obj, "fan_in", int_item((int64_t)init->a));
    break;
  default: break;
  }
  return obj;
}

static bool any_differs(const int64_t *v, int n, int64_t dflt) {
  for (int i = 0; i < n; i++)
    if (v[i] != dflt) return true;
  return false;
}

/* Required attributes always; the others where they differ from the default. */
static void write_attrs(writer *w, cJSON *obj, const cm_graph *g, const cm_node *n) {
  const cm_attrs *a = &n->attrs;
  unsigned bits = cm_op_get_info(n->op)->attrs;
  int in_rank = n->n_inputs > 0 ? g->nodes[n->inputs[0]].type.rank : 0;
  cm_attrs d;
  cm_attrs_default(&d);
  if (bits & CM_ATTR_DTYPE) put(w, obj, "dtype", cJSON_CreateString(cm_dtype_name(a->dtype)));
  if (bits & CM_ATTR_SHAPE) put(w, obj, "shape", int_array(w, a->shape, a->rank));
  if ((bits & CM_ATTR_INIT) && a->init.kind != CM_INIT_NONE)
    put(w, obj, "init", init_object(w, &a->init));
  bool has_data = (bits & CM_ATTR_DATA) && a->data;
  if ((bits & CM_ATTR_VALUE) && !has_data && (a->value != 0 || signbit(a->value)))
    put(w, obj, "value", number_item(a->value));
  if (has_data) {
    cJSON *arr = checked(w, cJSON_CreateArray());
    for (int64_t i = 0; arr && i < a->n_data; i++) append(w, arr, number_item(a->data[i]));
    put(w, obj, "data", arr);
  }
  if ((bits & CM_ATTR_AXIS) && a->axis != d.axis) put(w, obj, "axis", int_item(a->axis));
  if ((bits & CM_ATTR_AXES) && a->n_axes > 0) {
    int64_t axes[CM_MAX_RANK];
    for (int i = 0; i < a->n_axes && i < CM_MAX_RANK; i++) axes[i] = a->axes[i];
    put(w, obj, "axes", int_array(w, axes, a->n_axes < CM_MAX_RANK ? a->n_axes : CM_MAX_RANK));
  }
  if ((bits & CM_ATTR_KEEPDIMS) && a->keepdims) put(w, obj, "keepdims", cJSON_CreateTrue());
  if (bits & CM_ATTR_PERM) {
    int64_t perm[CM_MAX_RANK];
    for (int i = 0; i < in_rank; i++) perm[i] = a->perm[i];
    put(w, obj, "perm", int_array(w, perm, in_rank));
  }
  if (bits & CM_ATTR_SLICE) {
    put(w, obj, "start", int_array(w, a->start, in_rank));
    put(w, obj, "stop", int_array(w, a->stop, in_rank));
    if (any_differs(a->step, in_rank, 1)) put(w, obj, "step", int_array(w, a->step, in_rank));
  }
  if (bits & CM_ATTR_PAD) {
    if (any_differs(a->lo, in_rank, 0)) put(w, obj, "lo", int_array(w, a->lo, in_rank));
    if (any_differs(a->hi, in_rank, 0)) put(w, obj, "hi", int_array(w, a->hi, in_rank));
  }
  if ((bits & CM_ATTR_TRANSPOSE) && a->transpose_a) put(w, obj, "transpose_a", cJSON_CreateTrue());
  if ((bits & CM_ATTR_TRANSPOSE) && a->transpose_b) put(w, obj, "transpose_b", cJSON_CreateTrue());
  if (bits & CM_ATTR_CONV) {
    if (memcmp(a->stride, d.stride, sizeof d.stride))
      put(w, obj, "stride", pair_array(w, a->stride));
    if (memcmp(a->padding, d.padding, sizeof d.padding))
      put(w, obj, "padding", pair_array(w, a->padding));
    if (memcmp(a->dilation, d.dilation, sizeof d.dilation))
      put(w, obj, "dilation", pair_array(w, a->dilation));
    if (a->groups != d.groups) put(w, obj, "groups", int_item(a->groups));
  }
  if ((bits & CM_ATTR_MODE) && a->mode != d.mode)
    put(w, obj, "mode", cJSON_CreateString(a->mode == CM_MODE_MEAN ? "mean" : "sum"));
  if ((bits & CM_ATTR_RANKS) && a->ranks != d.ranks) put(w, obj, "ranks", int_item(a->ranks));
}

char *cm_graph_to_json(const cm_graph *g) {
  writer w = {false};
  cJSON *root = cJSON_CreateObject();
  if (!root) return NULL;
  put(&w, root, "format", cJSON_CreateString(CM_GRAPH_FORMAT_TAG));
  cJSON *inputs = checked(&w, cJSON_CreateArray());
  cJSON *params = checked(&w, cJSON_CreateArray());
  cJSON *state = checked(&w, cJSON_CreateArray());
  cJSON *nodes = checked(&w, cJSON_CreateArray());
  cJSON *outputs = checked(&w, cJSON_CreateArray());
  put(&w, root, "inputs", inputs);
  put(&w, root, "params", params);
  put(&w, root, "state", state);
  put(&w, root, "nodes", nodes);
  put(&w, root, "outputs", outputs);
  for (int i = 0; i < g->n_nodes && !w.oom; i++) {
    const cm_node *n = &g->nodes[i];
    cJSON *obj = checked(&w, cJSON_CreateObject());
    if (!obj) break;
    cJSON *section = n->op == CM_OP_INPUT   ? inputs
                     : n->op == CM_OP_PARAM ? params
                     : n->op == CM_OP_STATE ? state
                                            : nodes;
    append(&w, section, obj);
    put(&w, obj, "name", cJSON_CreateString(n->name));
    if (section == nodes) {
      put(&w, obj, "op", cJSON_CreateString(cm_op_name(n->op)));
      if (n->n_inputs > 0) {
        cJSON *ins = checked(&w, cJSON_CreateArray());
        for (int k = 0; ins && k < n->n_inputs; k++)
          append(&w, ins, cJSON_CreateString(g->nodes[n->inputs[k]].name));
        put(&w, obj, "inputs", ins);
      }
    }
    write_attrs(&w, obj, g, n);
  }
  for (int i = 0; i < g->n_outputs && !w.oom; i++)
    append(&w, outputs, cJSON_CreateString(g->nodes[g->outputs[i]].name));
  char *text = w.oom ? NULL : cJSON_Print(root);
  cJSON_Delete(root);
  if (!text) return NULL;
  /* A final newline, so the text is a proper file. */
  size_t len = strlen(text);
  char *with_newline = realloc(text, len + 2);
  if (!with_newline) {
    free(text);
    return NULL;
  }
  with_newline[len] = '\n';
  with_newline[len + 1] = '\0';
  return with_newline;
}

/* ---- files ------------------------------------------------------------- */

/* cm_read_file (bounded, regular files only) is in frontend/files.c. */

cm_status cm_graph_load(const char *path, cm_graph **out, cm_err *err) {
  *out = NULL;
  char *text;
  size_t len;
  cm_status st = cm_read_file(path, &text, &len, err);
  if (st) return st;
  size_t i = len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0 ? 3 : 0; /* a byte-order mark */
  while (i < len && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r')) i++;
  /* Text IR never starts with '[' or '"' and is never blank: those go to the
   * JSON reader too, whose messages fit them better. */
  if (i == len || text[i] == '{' || text[i] == '[' || text[i] == '"') {
    st = cm_graph_from_json(text, len, out, err);
  } else if (memchr(text, '\0', len)) {
    st = cm_errorf(err, CM_EINVALID, "NUL byte in a text IR file");
  } else {
    st = cm_graph_parse(text, out, err);
  }
  free(text);
  if (st) cm_err_prefix(err, "%s: ", path);
  return st;
}

cm_status cm_graph_save_json(const cm_graph *g, const char *path, cm_err *err) {
  char *text = cm_graph_to_json(g);
  if (!text) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory writing graph JSON", path);
  FILE *f = fopen(path, "wb");
  if (!f) {
    int e = errno;
    free(text);
    return cm_errorf(err, CM_EINVALID, "%s: cannot create: %s", path, strerror(e));
  }
  size_t len = strlen(text);
  bool ok = fwrite(text, 1, len, f) == len;
  ok = (fclose(f) == 0) && ok;
  free(text);
  if (!ok) return cm_errorf(err, CM_EINTERNAL, "%s: write failed: %s", path, strerror(errno));
  return CM_OK;
}
