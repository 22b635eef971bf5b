/* tests/unit/test_safetensors.c — tensor sets, safetensors round trips (every
 * dtype, rank 0..6, bit-exact), hand-built files, metadata, save/load, and
 * malformed images that must fail with a one-line message. */
#include "frontend/frontend.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

static test_rng rng_state = {0x9e3779b97f4a7c15u};
static uint64_t rnd(void) {
  return test_u64(&rng_state);
}

/* An image: 8-byte LE header_len, then header, then data. */
static uint8_t *image_with_len(uint64_t header_len, const char *header, const void *data,
                               size_t data_len, size_t *len) {
  size_t hn = strlen(header);
  *len = 8 + hn + data_len;
  uint8_t *buf = malloc(*len);
  for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(header_len >> (8 * i));
  memcpy(buf + 8, header, hn);
  if (data_len) memcpy(buf + 8 + hn, data, data_len);
  return buf;
}

static uint8_t *image(const char *header, const void *data, size_t data_len, size_t *len) {
  return image_with_len(strlen(header), header, data, data_len, len);
}

static void expect_invalid_buf(const uint8_t *buf, size_t len, const char *want, int line) {
  cm_tensor_set s;
  cm_err err = {0};
  cm_status st = cm_safetensors_parse(buf, len, &s, &err);
  CHECK_MSG(st == CM_EINVALID, "line %d: status %d (want %s)", line, (int)st, want);
  if (st == CM_EINVALID) {
    CHECK_MSG(strstr(err.msg, want) != NULL, "line %d: \"%s\" lacks \"%s\"", line, err.msg, want);
    CHECK_MSG(strncmp(err.msg, "safetensors: ", 13) == 0, "line %d: %s", line, err.msg);
    CHECK(strchr(err.msg, '\n') == NULL);
  }
  CHECK(s.n == 0 && s.names == NULL && s.tensors == NULL && s.n_meta == 0);
  cm_tensor_set_free(&s);
}

/* header + data -> must be rejected with a message containing want */
static void expect_invalid_at(const char *header, const void *data, size_t data_len,
                              const char *want, int line) {
  size_t len;
  uint8_t *buf = image(header, data, data_len, &len);
  expect_invalid_buf(buf, len, want, line);
  free(buf);
}
#define EXPECT_INVALID(header, data, n, want) expect_invalid_at(header, data, n, want, __LINE__)

static cm_tensor make_tensor(cm_dtype dt, int rank, const int64_t *dims) {
  cm_tensor t;
  cm_type ty = {dt, rank, {0}};
  for (int d = 0; d < rank; d++) ty.dims[d] = dims[d];
  cm_err err;
  if (cm_tensor_alloc(&t, ty, &err) != CM_OK) {
    fprintf(stderr, "%s\n", err.msg);
    exit(1);
  }
  return t;
}

static void fill_random_bits(cm_tensor *t) {
  int64_t n = 1;
  for (int d = 0; d < t->type.rank; d++) n *= t->type.dims[d];
  size_t es = cm_dtype_size(t->type.dtype);
  uint8_t *p = t->data;
  for (int64_t i = 0; i < n; i++) {
    uint64_t r = rnd();
    if (t->type.dtype == CM_BOOL)
      p[i] = (uint8_t)(r >> 40) & 1;
    else
      memcpy(p + (size_t)i * es, &r, es);
  }
  /* Plant NaN payloads and a negative zero: bits must survive, not values. */
  if (n >= 2) {
    uint32_t f32_nan = 0x7fa12345; /* signaling, with payload */
    uint64_t f64_nan = 0xfff80000deadbeefu;
    uint16_t bf16_nan = 0xff81, f16_nan = 0x7d01, neg_zero16 = 0x8000;
    uint32_t neg_zero32 = 0x80000000u;
    switch (t->type.dtype) {
    case CM_F32:
      memcpy(p, &f32_nan, 4);
      memcpy(p + 4, &neg_zero32, 4);
      break;
    case CM_F64: memcpy(p, &f64_nan, 8); break;
    case CM_BF16:
      memcpy(p, &bf16_nan, 2);
      memcpy(p + 2, &neg_zero16, 2);
      break;
    case CM_F16:
      memcpy(p, &f16_nan, 2);
      memcpy(p + 2, &neg_zero16, 2);
      break;
    default: break;
    }
  }
}

static bool sets_equal(const cm_tensor_set *a, const cm_tensor_set *b) {
  if (a->n != b->n || a->n_meta != b->n_meta) return false;
  for (int i = 0; i < a->n; i++) {
    if (strcmp(a->names[i], b->names[i]) != 0) return false;
    const cm_type *x = &a->tensors[i].type, *y = &b->tensors[i].type;
    if (x->dtype != y->dtype || x->rank != y->rank) return false;
    int64_t n = 1;
    for (int d = 0; d < x->rank; d++) {
      if (x->dims[d] != y->dims[d]) return false;
      n *= x->dims[d];
    }
    size_t nbytes = (size_t)n * cm_dtype_size(x->dtype);
    if (nbytes && memcmp(a->tensors[i].data, b->tensors[i].data, nbytes) != 0) return false;
  }
  for (int i = 0; i < a->n_meta; i++)
    if (strcmp(a->meta_keys[i], b->meta_keys[i]) || strcmp(a->meta_values[i], b->meta_values[i]))
      return false;
  return true;
}

static void test_round_trip_every_dtype_and_rank(void) {
  const int64_t dims[CM_MAX_RANK] = {3, 1, 2, 4, 1, 2};
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  cm_err err;
  for (int dt = 0; dt < CM_DTYPE_COUNT; dt++)
    for (int rank = 0; rank <= CM_MAX_RANK; rank++) {
      char name[64];
      snprintf(name, sizeof name, "layer%d.%s/r%d", dt, cm_dtype_name((cm_dtype)dt), rank);
      cm_tensor t = make_tensor((cm_dtype)dt, rank, dims);
      fill_random_bits(&t);
      CHECK(cm_tensor_set_take(&s, name, &t, &err) == CM_OK);
      CHECK(t.data == NULL);
    }
  CHECK(s.n == CM_DTYPE_COUNT * (CM_MAX_RANK + 1));
  uint8_t *buf;
  size_t len;
  CHECK(cm_safetensors_serialize(&s, &buf, &len, &err) == CM_OK);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
  CHECK(hlen % 8 == 0);
  CHECK(buf[8] == '{');
  CHECK(buf[8 + hlen - 1] == '}' || buf[8 + hlen - 1] == ' ');
  cm_tensor_set back;
  cm_status st = cm_safetensors_parse(buf, len, &back, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(sets_equal(&s, &back));
  /* The NaN payload of the f32 rank-1 tensor, read back as bits. */
  const cm_tensor *f = cm_tensor_set_get(&back, "layer0.f32/r1");
  CHECK(f != NULL && f->type.rank == 1 && f->type.dims[0] == 3);
  if (f) CHECK(((uint32_t *)f->data)[0] == 0x7fa12345u && ((uint32_t *)f->data)[1] == 0x80000000u);
  const cm_tensor *h = cm_tensor_set_get(&back, "layer3.f16/r6");
  if (h) CHECK(((uint16_t *)h->data)[0] == 0x7d01);
  CHECK(h != NULL);
  /* Writing what was read gives the same bytes. */
  uint8_t *buf2;
  size_t len2;
  CHECK(cm_safetensors_serialize(&back, &buf2, &len2, &err) == CM_OK);
  CHECK(len2 == len && memcmp(buf, buf2, len) == 0);
  free(buf);
  free(buf2);
  cm_tensor_set_free(&s);
  cm_tensor_set_free(&back);
}

static void test_exact_header_bytes(void) {
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  cm_err err;
  int64_t d[2] = {2, 3};
  cm_tensor w = make_tensor(CM_F32, 2, d);
  for (int i = 0; i < 6; i++) ((float *)w.data)[i] = (float)i * 0.5f - 1.0f;
  CHECK(cm_tensor_set_add(&s, "w", &w, &err) == CM_OK);
  cm_tensor_free(&w);
  int64_t one = 1;
  cm_tensor b = make_tensor(CM_BF16, 1, &one);
  ((uint16_t *)b.data)[0] = 0x3fc0; /* 1.5 */
  CHECK(cm_tensor_set_add(&s, "b\"q", &b, &err) == CM_OK);
  cm_tensor_free(&b);
  CHECK(cm_tensor_set_meta(&s, "format", "pt", &err) == CM_OK);
  uint8_t *buf;
  size_t len;
  CHECK(cm_safetensors_serialize(&s, &buf, &len, &err) == CM_OK);
  const char *want = "{\"__metadata__\":{\"format\":\"pt\"},"
                     "\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                     "\"b\\\"q\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[24,26]}}";
  size_t wn = strlen(want), padded = (wn + 7) / 8 * 8;
  CHECK(len == 8 + padded + 26);
  CHECK(buf[0] == (uint8_t)padded && buf[1] == 0 && buf[7] == 0);
  CHECK(memcmp(buf + 8, want, wn) == 0);
  for (size_t i = wn; i < padded; i++) CHECK(buf[8 + i] == ' ');
  float f2;
  memcpy(&f2, buf + 8 + padded + 8, 4);
  CHECK(f2 == 0.0f);
  CHECK(buf[8 + padded + 24] == 0xc0 && buf[8 + padded + 25] == 0x3f);
  free(buf);
  cm_tensor_set_free(&s);
}

/* A file laid out by hand: offsets out of name order, padding, LE data. */
static void test_parse_hand_built(void) {
  const char *header = "{\"b\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[8,16]},"
                       " \"a\" : {\"shape\":[2],\"dtype\":\"F32\",\"data_offsets\":[0,8]},"
                       "\"__metadata__\":{\"k\":\"v\"}}   \n";
  uint8_t data[16] = {0x00, 0x00, 0xc0, 0x3f,                          /* 1.5f */
                      0x00, 0x00, 0x00, 0xc0,                          /* -2.0f */
                      0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}; /* -5 */
  size_t len;
  uint8_t *buf = image(header, data, sizeof data, &len);
  cm_tensor_set s;
  cm_err err;
  cm_status st = cm_safetensors_parse(buf, len, &s, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(s.n == 2);
  if (s.n == 2) {
    CHECK(strcmp(s.names[0], "b") == 0 && strcmp(s.names[1], "a") == 0);
    CHECK(s.tensors[0].type.dtype == CM_I64 && s.tensors[0].type.rank == 0);
    CHECK(((int64_t *)s.tensors[0].data)[0] == -5);
    const cm_tensor *a = cm_tensor_set_get(&s, "a");
    CHECK(a && a->type.dtype == CM_F32 && a->type.rank == 1 && a->type.dims[0] == 2);
    if (a) CHECK(((float *)a->data)[0] == 1.5f && ((float *)a->data)[1] == -2.0f);
  }
  CHECK(s.n_meta == 1 && strcmp(s.meta_keys[0], "k") == 0 && strcmp(s.meta_values[0], "v") == 0);
  CHECK(cm_tensor_set_get(&s, "c") == NULL);
  cm_tensor_set_free(&s);
  free(buf);

  /* An empty file with no tensors is valid. */
  buf = image("{}", NULL, 0, &len);
  CHECK(cm_safetensors_parse(buf, len, &s, &err) == CM_OK && s.n == 0);
  cm_tensor_set_free(&s);
  free(buf);
}

static void test_zero_size_tensors(void) {
  const char *header = "{\"e\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                       "\"x\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"z\":{\"dtype\":\"BF16\",\"shape\":[2,0],\"data_offsets\":[0,0]}}";
  int32_t v = -77;
  size_t len;
  uint8_t *buf = image(header, &v, 4, &len);
  cm_tensor_set s;
  cm_err err;
  cm_status st = cm_safetensors_parse(buf, len, &s, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  const cm_tensor *e = cm_tensor_set_get(&s, "e");
  CHECK(e && e->type.rank == 2 && e->type.dims[0] == 0 && e->type.dims[1] == 3);
  const cm_tensor *x = cm_tensor_set_get(&s, "x");
  CHECK(x && ((int32_t *)x->data)[0] == -77);
  uint8_t *buf2;
  size_t len2;
  CHECK(cm_safetensors_serialize(&s, &buf2, &len2, &err) == CM_OK);
  cm_tensor_set back;
  CHECK(cm_safetensors_parse(buf2, len2, &back, &err) == CM_OK);
  CHECK(sets_equal(&s, &back));
  /* Set order is kept, so e gets [0,0], x [0,4], z [4,4]. */
  CHECK(strstr((char *)buf2 + 8,
               "\"z\":{\"dtype\":\"BF16\",\"shape\":[2,0],\"data_offsets\":[4,4]}"));
  free(buf);
  free(buf2);
  cm_tensor_set_free(&s);
  cm_tensor_set_free(&back);
}

static void test_metadata_round_trip(void) {
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  cm_err err;
  CHECK(cm_tensor_set_meta(&s, "format", "pt", &err) == CM_OK);
  CHECK(cm_tensor_set_meta(&s, "quote\"back\\slash", "line1\nline2\ttab", &err) == CM_OK);
  CHECK(cm_tensor_set_meta(&s, "unicode", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", &err) ==
        CM_OK);
  CHECK(cm_tensor_set_meta(&s, "format", "cmaec", &err) == CM_OK); /* replaces */
  CHECK(s.n_meta == 3);
  int64_t two = 2;
  cm_tensor t = make_tensor(CM_I32, 1, &two);
  ((int32_t *)t.data)[0] = 12;
  ((int32_t *)t.data)[1] = -12;
  CHECK(cm_tensor_set_add(&s, "t", &t, &err) == CM_OK);
  cm_tensor_free(&t);
  uint8_t *buf;
  size_t len;
  CHECK(cm_safetensors_serialize(&s, &buf, &len, &err) == CM_OK);
  cm_tensor_set back;
  cm_status st = cm_safetensors_parse(buf, len, &back, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(sets_equal(&s, &back));
  CHECK(back.n_meta == 3 && strcmp(back.meta_values[0], "cmaec") == 0);
  CHECK(back.n_meta == 3 && strcmp(back.meta_values[1], "line1\nline2\ttab") == 0);
  free(buf);
  cm_tensor_set_free(&s);
  cm_tensor_set_free(&back);
}

static void test_set_api(void) {
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  cm_err err;
  int64_t d = 3;
  cm_tensor a = make_tensor(CM_F64, 1, &d);
  for (int i = 0; i < 3; i++) ((double *)a.data)[i] = 0.25 * i + 1;
  CHECK(cm_tensor_set_add(&s, "a", &a, &err) == CM_OK);
  ((double *)a.data)[0] = 99; /* the set holds a copy */
  CHECK(((double *)cm_tensor_set_get(&s, "a")->data)[0] == 1.0);
  /* Replacing frees the old tensor (LSan would report a leak otherwise). */
  int64_t d2[2] = {2, 2};
  cm_tensor b = make_tensor(CM_I64, 2, d2);
  ((int64_t *)b.data)[3] = 5;
  CHECK(cm_tensor_set_add(&s, "a", &b, &err) == CM_OK);
  CHECK(s.n == 1);
  const cm_tensor *got = cm_tensor_set_get(&s, "a");
  CHECK(got->type.dtype == CM_I64 && ((int64_t *)got->data)[3] == 5);
  CHECK(cm_tensor_set_take(&s, "a", &a, &err) == CM_OK); /* replace by take */
  CHECK(a.data == NULL && s.n == 1 && cm_tensor_set_get(&s, "a")->type.dtype == CM_F64);
  for (int i = 0; i < 40; i++) { /* growth past the first capacity */
    char name[16];
    snprintf(name, sizeof name, "n%d", i);
    CHECK(cm_tensor_set_add(&s, name, &b, &err) == CM_OK);
  }
  CHECK(s.n == 41 && strcmp(s.names[40], "n39") == 0);
  CHECK(cm_tensor_set_add(&s, "__metadata__", &b, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "reserved");
  cm_tensor bad = b;
  bad.type.rank = 7;
  CHECK(cm_tensor_set_add(&s, "bad", &bad, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "rank 7");
  cm_tensor nodata = {b.type, NULL};
  CHECK(cm_tensor_set_take(&s, "nodata", &nodata, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "no data");
  CHECK(s.n == 41);
  cm_tensor_free(&b);
  cm_tensor_set_free(&s);
  CHECK(s.n == 0 && s.names == NULL);
  cm_tensor_set_free(&s); /* twice is harmless */
}

static void test_save_and_load(void) {
  char dir[] = "/tmp/cmaec_st_XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[128], tmp[160];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  cm_err err;
  int64_t dims[3] = {2, 3, 4};
  for (int dt = 0; dt < CM_DTYPE_COUNT; dt++) {
    cm_tensor t = make_tensor((cm_dtype)dt, 3, dims);
    fill_random_bits(&t);
    CHECK(cm_tensor_set_take(&s, cm_dtype_name((cm_dtype)dt), &t, &err) == CM_OK);
  }
  CHECK(cm_tensor_set_meta(&s, "step", "1234", &err) == CM_OK);
  cm_status st = cm_safetensors_save(path, &s, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(access(path, F_OK) == 0);
  CHECK(access(tmp, F_OK) != 0);
  cm_tensor_set back;
  st = cm_safetensors_load(path, &back, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(sets_equal(&s, &back));
  cm_tensor_set_free(&back);
  /* Saving again over the file replaces it. */
  CHECK(cm_tensor_set_meta(&s, "step", "1235", &err) == CM_OK);
  CHECK(cm_safetensors_save(path, &s, &err) == CM_OK);
  CHECK(cm_safetensors_load(path, &back, &err) == CM_OK);
  CHECK(back.n_meta == 1 && strcmp(back.meta_values[0], "1235") == 0);
  cm_tensor_set_free(&back);

  /* A truncated file names the path. */
  FILE *f = fopen(path, "r+b");
  CHECK(f != NULL);
  if (f) {
    CHECK(ftruncate(fileno(f), 100) == 0);
    fclose(f);
  }
  CHECK(cm_safetensors_load(path, &back, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, path);
  CHECK(back.n == 0);
  char missing[160];
  snprintf(missing, sizeof missing, "%s/missing.safetensors", dir);
  CHECK(cm_safetensors_load(missing, &back, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "missing.safetensors");
  CHECK(cm_safetensors_load(dir, &back, &err) == CM_EINVALID); /* a directory */
  snprintf(missing, sizeof missing, "%s/no/such/dir/x.safetensors", dir);
  CHECK(cm_safetensors_save(missing, &s, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "cannot create");
  remove(path);
  rmdir(dir);
  cm_tensor_set_free(&s);
}

#define F32_2x3 "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}"

static void test_malformed(void) {
  uint8_t data[64];
  for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(rnd() >> 33) & 1;
  size_t len;
  uint8_t *buf;
  /* Sanity: the base case parses. */
  buf = image(F32_2x3, data, 24, &len);
  cm_tensor_set ok;
  cm_err err;
  CHECK(cm_safetensors_parse(buf, len, &ok, &err) == CM_OK);
  cm_tensor_set_free(&ok);
  /* Short buffers, every length below 8. */
  for (size_t n = 0; n < 8; n++) expect_invalid_buf(buf, n, "shorter than 8 bytes", __LINE__);
  expect_invalid_buf(NULL, 0, "shorter than 8 bytes", __LINE__);
  free(buf);

  buf = image_with_len(1000, F32_2x3, data, 24, &len);
  expect_invalid_buf(buf, len, "header length 1000 runs past the end of the", __LINE__);
  free(buf);
  buf = image_with_len(UINT64_MAX, F32_2x3, data, 24, &len);
  expect_invalid_buf(buf, len, "exceeds the limit", __LINE__);
  free(buf);
  buf = image_with_len((uint64_t)1 << 40, F32_2x3, data, 24, &len);
  expect_invalid_buf(buf, len, "exceeds the limit", __LINE__);
  free(buf);

  EXPECT_INVALID("", NULL, 0, "not valid JSON");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\"", data, 24, "not valid JSON");
  EXPECT_INVALID("{\"w\" 5}", NULL, 0, "not valid JSON");
  EXPECT_INVALID("[1,2]", NULL, 0, "not a JSON object");
  EXPECT_INVALID("\"w\"", NULL, 0, "not a JSON object");
  EXPECT_INVALID("{} x", NULL, 0, "trailing bytes");
  EXPECT_INVALID("{\"w\xff\":{}}", NULL, 0, "not valid UTF-8");
  EXPECT_INVALID("{\"w\xc0\xaf\":{}}", NULL, 0, "not valid UTF-8");     /* overlong */
  EXPECT_INVALID("{\"w\xed\xa0\x80\":{}}", NULL, 0, "not valid UTF-8"); /* surrogate */
  EXPECT_INVALID("{\"w\xe2\x82\":{}}", NULL, 0, "not valid UTF-8");     /* cut short */
  EXPECT_INVALID("{\"w\x01\":{}}", NULL, 0, "control byte 0x01");
  EXPECT_INVALID("{\"w\":5}", NULL, 0, "tensor \"w\": entry is not an object");
  EXPECT_INVALID("{\"w\":[]}", NULL, 0, "tensor \"w\": entry is not an object");
  EXPECT_INVALID("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                 "tensor \"w\": missing \"dtype\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", data, 4,
                 "tensor \"w\": missing \"shape\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", data, 4,
                 "tensor \"w\": missing \"data_offsets\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                 "\"dtype\" is not a string");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":{},\"data_offsets\":[0,4]}}", data, 4,
                 "\"shape\" is not an array");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,4]}}", data, 4,
                 "\"data_offsets\" is not an array of 2");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":\"0,4\"}}", data, 4,
                 "\"data_offsets\" is not an array of 2");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,4]}}", data, 4,
                 "data_offsets[0] is not a non-negative integer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,\"4\"]}}", data, 4,
                 "data_offsets[1] is not a non-negative integer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", data,
                 4, "unknown key \"x\"");
  EXPECT_INVALID(
      "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
      "duplicate key \"dtype\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", data, 4,
                 "tensor \"w\": unsupported dtype \"U8\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[0,4]}}", data, 4,
                 "tensor \"w\": unsupported dtype \"F8_E4M3\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                 "unsupported dtype \"f32\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"BOOL\",\"shape\":[1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}",
                 data, 1, "tensor \"w\": rank 7 exceeds the maximum 6");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,24]}}", data, 24,
                 "tensor \"w\": shape[1] is not a non-negative integer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,10]}}", data, 10,
                 "shape[0] is not a non-negative integer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[true],\"data_offsets\":[0,4]}}", data, 4,
                 "shape[0] is not a non-negative integer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", data, 4,
                 "shape[0] is not a non-negative integer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296,4294967296],"
                 "\"data_offsets\":[0,8]}}",
                 data, 8, "more than 2^40 elements");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,0]}}", data, 24,
                 "begin 24 > end 0");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,48]}}", data, 24,
                 "end 48 is past the end of the 24-byte data buffer");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", data, 20,
                 "span 20 bytes but F32[2,3] needs 24");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[0,2]}}", data, 2,
                 "span 2 bytes but BF16[0] needs 0");
  /* Overlap: a [0,24), b [16,40). */
  EXPECT_INVALID("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[16,40]}}",
                 data, 40, "tensor \"b\": data_offsets [16, 40] overlap tensor \"a\"");
  /* The same range twice. */
  EXPECT_INVALID("{\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                 data, 8, "overlap");
  /* Gap: a [0,8), b [12,20). */
  EXPECT_INVALID("{\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
                 data, 20, "leave a gap of 4 bytes");
  EXPECT_INVALID("{\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[4,12]}}", data, 12,
                 "gap of 4 bytes after offset 0");
  /* Bytes after the last tensor. */
  EXPECT_INVALID(F32_2x3, data, 28, "data buffer is 28 bytes but the tensors cover only 24");
  EXPECT_INVALID("{}", data, 3, "data buffer is 3 bytes but there are no tensors");
  EXPECT_INVALID("{\"__metadata__\":{\"k\":5}}", NULL, 0, "key \"k\": value is not a string");
  EXPECT_INVALID("{\"__metadata__\":[\"k\"]}", NULL, 0, "\"__metadata__\" is not an object");
  EXPECT_INVALID("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", NULL, 0, "duplicate key \"k\"");
  EXPECT_INVALID("{\"__metadata__\":{},\"__metadata__\":{}}", NULL, 0,
                 "duplicate \"__metadata__\"");
  EXPECT_INVALID("{\"w\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"w\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                 data, 8, "duplicate tensor name \"w\"");
  /* BOOL bytes must be 0 or 1. */
  uint8_t bools[4] = {1, 0, 2, 1};
  EXPECT_INVALID("{\"m\":{\"dtype\":\"BOOL\",\"shape\":[4],\"data_offsets\":[0,4]}}", bools, 4,
                 "tensor \"m\": BOOL element 2 is 2, not 0 or 1");
  /* A name with a newline is shown escaped; the message stays one line. */
  EXPECT_INVALID("{\"a\\nb\":5}", NULL, 0, "tensor \"a\\x0ab\": entry is not an object");
  /* A deeply nested header is an error, not a stack overflow. */
  char deep[4200];
  size_t o = 0;
  deep[o++] = '{';
  deep[o++] = '"';
  deep[o++] = 'w';
  deep[o++] = '"';
  deep[o++] = ':';
  for (int i = 0; i < 2000; i++) deep[o++] = '[';
  for (int i = 0; i < 2000; i++) deep[o++] = ']';
  deep[o++] = '}';
  deep[o] = '\0';
  EXPECT_INVALID(deep, NULL, 0, "not valid JSON");
}

/* Every malformed file the generator writes fails with its listed message
 * (the CLI test relies on the same list). Skips only without python3. */
static void test_malformed_generator_files(void) {
  if (system("python3 -c 'import struct, json' >/dev/null 2>&1") != 0) {
    fprintf(stderr, "test_malformed_generator_files: python3 missing, skipped\n");
    return;
  }
  char dir[] = "/tmp/cmaec_stm_XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char cmd[256];
  snprintf(cmd, sizeof cmd, "python3 tests/malformed/make_safetensors.py %s", dir);
  CHECK(system(cmd) == 0);
  FILE *tsv = fopen("tests/malformed/expected_safetensors.tsv", "r");
  CHECK(tsv != NULL);
  int n_files = 0;
  char line[512];
  while (tsv && fgets(line, sizeof line, tsv)) {
    line[strcspn(line, "\r\n")] = '\0';
    char *tab = strchr(line, '\t');
    if (line[0] == '#' || !tab) continue;
    *tab = '\0';
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, line);
    cm_tensor_set s;
    cm_err err = {0};
    cm_status st = cm_safetensors_load(path, &s, &err);
    CHECK_MSG(st == CM_EINVALID, "%s: status %d", line, (int)st);
    CHECK_MSG(strstr(err.msg, tab + 1) != NULL, "%s: \"%s\" lacks \"%s\"", line, err.msg, tab + 1);
    CHECK_STR_CONTAINS(err.msg, line); /* names the file */
    cm_tensor_set_free(&s);
    remove(path);
    n_files++;
  }
  if (tsv) fclose(tsv);
  CHECK(n_files >= 10);
  char valid[400];
  snprintf(valid, sizeof valid, "%s/valid.safetensors", dir);
  cm_tensor_set s;
  cm_err err;
  cm_status st = cm_safetensors_load(valid, &s, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(s.n >= 1);
  cm_tensor_set_free(&s);
  remove(valid);
  CHECK(rmdir(dir) == 0); /* nothing left behind that the list does not name */
}

TEST_MAIN(TEST(test_round_trip_every_dtype_and_rank), TEST(test_exact_header_bytes),
          TEST(test_parse_hand_built), TEST(test_zero_size_tensors), TEST(test_metadata_round_trip),
          TEST(test_set_api), TEST(test_save_and_load), TEST(test_malformed),
          TEST(test_malformed_generator_files))
