/* tests/unit/test_safetensors_reference.c — cross-check with the reference
 * safetensors implementation (Python package `safetensors`, with numpy) via
 * tests/reference/check_safetensors.py: it reads a file written here and
 * writes one read here. Skips only when python3 is missing; the packages are
 * a test dependency (pip install safetensors numpy). */
#include "frontend/frontend.h"
#include "tests/test.h"

#include <stdint.h>
#include <unistd.h>

static void add(cm_tensor_set *s, const char *name, cm_dtype dt, int rank, const int64_t *dims,
                const void *data) {
  cm_tensor t;
  cm_err err;
  cm_type ty = {dt, rank, {0}};
  for (int d = 0; d < rank; d++) ty.dims[d] = dims[d];
  CHECK(cm_tensor_alloc(&t, ty, &err) == CM_OK);
  size_t n = 1;
  for (int d = 0; d < rank; d++) n *= (size_t)dims[d];
  if (n) memcpy(t.data, data, n * cm_dtype_size(dt));
  CHECK(cm_tensor_set_take(s, name, &t, &err) == CM_OK);
}

/* The contents check_safetensors.py expects (its EXPECTED table). */
static void build_ours(cm_tensor_set *s) {
  cm_err err;
  float a[6];
  for (int i = 0; i < 6; i++) a[i] = (float)((i - 2.5) * 0.75);
  const uint16_t b[4] = {0x3f80, 0xc000, 0x7fc1, 0x0001};
  const uint16_t c[4] = {0x3c00, 0xbc00, 0x7e01, 0x8000};
  const double d[3] = {0.1, -1e300, 5e-324};
  const int32_t e[3] = {-7, 2147483647, -2147483647 - 1};
  const int64_t f = -1234567890123;
  const uint8_t g[4] = {1, 0, 0, 1};
  add(s, "a", CM_F32, 2, (int64_t[]){2, 3}, a);
  add(s, "b", CM_BF16, 1, (int64_t[]){4}, b);
  add(s, "c", CM_F16, 2, (int64_t[]){2, 2}, c);
  add(s, "d", CM_F64, 1, (int64_t[]){3}, d);
  add(s, "e", CM_I32, 1, (int64_t[]){3}, e);
  add(s, "f", CM_I64, 0, NULL, &f);
  add(s, "g", CM_BOOL, 2, (int64_t[]){2, 2}, g);
  add(s, "h", CM_F32, 2, (int64_t[]){0, 4}, NULL);
  CHECK(cm_tensor_set_meta(s, "format", "cmaec", &err) == CM_OK);
  CHECK(cm_tensor_set_meta(s, "note", "x\"y", &err) == CM_OK);
}

static void expect_tensor(const cm_tensor_set *s, const char *name, cm_dtype dt, int rank,
                          const int64_t *dims, const void *data) {
  const cm_tensor *t = cm_tensor_set_get(s, name);
  CHECK_MSG(t != NULL, "no tensor %s", name);
  if (!t) return;
  CHECK_MSG(t->type.dtype == dt && t->type.rank == rank, "%s: dtype/rank", name);
  size_t n = 1;
  for (int d = 0; d < rank && d < t->type.rank; d++) {
    CHECK(t->type.dims[d] == dims[d]);
    n *= (size_t)dims[d];
  }
  CHECK_MSG(memcmp(t->data, data, n * cm_dtype_size(dt)) == 0, "%s: data differs", name);
}

static void test_reference_cross_check(void) {
  if (system("python3 --version >/dev/null 2>&1") != 0) {
    fprintf(stderr, "test_reference_cross_check: python3 missing, skipped\n");
    return;
  }
  char dir[] = "/tmp/cmaec_str_XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char ours[128], theirs[128], cmd[512];
  snprintf(ours, sizeof ours, "%s/ours.safetensors", dir);
  snprintf(theirs, sizeof theirs, "%s/theirs.safetensors", dir);
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  build_ours(&s);
  cm_err err;
  CHECK(cm_safetensors_save(ours, &s, &err) == CM_OK);
  cm_tensor_set_free(&s);
  snprintf(cmd, sizeof cmd, "python3 tests/reference/check_safetensors.py %s %s", ours, theirs);
  int rc = system(cmd);
  CHECK_MSG(rc == 0, "%s exited with %d (3: pip install safetensors numpy)", cmd, rc);

  cm_tensor_set back;
  cm_status st = cm_safetensors_load(theirs, &back, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st == CM_OK) {
    CHECK(back.n == 5);
    float x[6];
    for (int i = 0; i < 6; i++) x[i] = (float)i * 0.5f - 1.0f;
    const uint16_t y[2] = {0x4049, 0xff80};
    const int64_t z[2] = {-3, 9007199254740993};
    const uint8_t m[3] = {1, 0, 1};
    const uint16_t hf[2] = {0x3e00, 0xb400};
    expect_tensor(&back, "x", CM_F32, 2, (int64_t[]){3, 2}, x);
    expect_tensor(&back, "y", CM_BF16, 1, (int64_t[]){2}, y);
    expect_tensor(&back, "z", CM_I64, 1, (int64_t[]){2}, z);
    expect_tensor(&back, "m", CM_BOOL, 1, (int64_t[]){3}, m);
    expect_tensor(&back, "hf", CM_F16, 1, (int64_t[]){2}, hf);
    CHECK(back.n_meta == 1 && strcmp(back.meta_keys[0], "writer") == 0 &&
          strcmp(back.meta_values[0], "safetensors-python") == 0);
  }
  cm_tensor_set_free(&back);
  remove(ours);
  remove(theirs);
  rmdir(dir);
}

TEST_MAIN(TEST(test_reference_cross_check))
