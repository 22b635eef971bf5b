/* tests/unit/test_random.c — Philox known answers, FNV-1a, and every init
 * kind: determinism, order independence, statistics and bounds. */
#include "ir/ir.h"
#include "tests/test.h"

#include <stdint.h>

static void check_philox(uint64_t key, uint64_t hi, uint64_t lo, const uint32_t want[4]) {
  uint32_t got[4];
  cm_philox(key, hi, lo, got);
  for (int i = 0; i < 4; i++)
    CHECK_MSG(got[i] == want[i], "word %d: got 0x%08x, want 0x%08x", i, got[i], want[i]);
}

/* Random123 known-answer vectors for philox4x32-10 (kat_vectors). Counter
 * words (c0, c1, c2, c3) map to counter_lo = c1:c0, counter_hi = c3:c2; key
 * words (k0, k1) to key = k1:k0. */
static void test_philox_known_answers(void) {
  const uint32_t zero[4] = {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8};
  check_philox(0, 0, 0, zero);
  const uint32_t ones[4] = {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd};
  check_philox(UINT64_MAX, UINT64_MAX, UINT64_MAX, ones);
  const uint32_t pi[4] = {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1};
  check_philox(0x299f31d0a4093822u, 0x0370734413198a2eu, 0x85a308d3243f6a88u, pi);
}

static void test_philox_streams_differ(void) {
  uint32_t a[4], b[4], c[4], d[4];
  cm_philox(1, 2, 3, a);
  cm_philox(1, 2, 4, b);
  cm_philox(1, 3, 3, c);
  cm_philox(2, 2, 3, d);
  CHECK(memcmp(a, b, sizeof a) != 0);
  CHECK(memcmp(a, c, sizeof a) != 0);
  CHECK(memcmp(a, d, sizeof a) != 0);
  uint32_t a2[4];
  cm_philox(1, 2, 3, a2);
  CHECK(memcmp(a, a2, sizeof a) == 0);
}

static void test_hash_fnv1a(void) {
  CHECK(cm_hash_str("") == 0xcbf29ce484222325u);
  CHECK(cm_hash_str("a") == 0xaf63dc4c8601ec8cu);
  CHECK(cm_hash_str("foobar") == 0x85944171f73967e8u);
}

static void test_uniform01(void) {
  CHECK(cm_uniform01(0) == 0.0);
  CHECK(cm_uniform01(0xffffffffu) == 1.0 - 1.0 / 16777216.0);
  CHECK(cm_uniform01(0x80000000u) == 0.5);
  CHECK(cm_uniform01(0x000000ffu) == 0.0); /* low 8 bits are dropped */
  CHECK((float)cm_uniform01(0xffffffffu) < 1.0f);
}

static void test_init_kind_names(void) {
  const char *names[] = {"none",         "zeros",   "ones",           "constant",      "normal",
                         "trunc_normal", "uniform", "xavier_uniform", "torch_default", "sincos_2d"};
  CHECK((int)(sizeof names / sizeof names[0]) == CM_INIT_KIND_COUNT);
  for (int k = 0; k < CM_INIT_KIND_COUNT; k++) {
    CHECK(strcmp(cm_init_kind_name((cm_init_kind)k), names[k]) == 0);
    cm_init_kind got = CM_INIT_KIND_COUNT;
    CHECK(cm_init_kind_from_name(names[k], &got));
    CHECK(got == (cm_init_kind)k);
  }
  cm_init_kind got = CM_INIT_ZEROS;
  CHECK(!cm_init_kind_from_name("Normal", &got));
  CHECK(!cm_init_kind_from_name("", &got));
  CHECK(!cm_init_kind_from_name("xavier", &got));
  CHECK(got == CM_INIT_ZEROS);
  CHECK(strcmp(cm_init_kind_name(CM_INIT_KIND_COUNT), "invalid") == 0);
}

static cm_tensor make(cm_dtype dt, int rank, const int64_t *dims) {
  cm_tensor t;
  cm_err err;
  if (cm_tensor_alloc(&t, cm_type_make(dt, rank, dims), &err) != CM_OK) {
    fprintf(stderr, "alloc failed: %s\n", err.msg);
    exit(1);
  }
  return t;
}

static cm_tensor init_1d(cm_dtype dt, int64_t n, cm_init init, uint64_t seed, const char *name) {
  cm_tensor t = make(dt, 1, &n);
  cm_err err;
  cm_status st = cm_init_tensor(&t, &init, seed, name, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  return t;
}

/* Uniform element i is low + (high - low) * u01(word 0 of philox(seed, hash(name), i)). */
static void test_uniform_stream_definition(void) {
  cm_init init = {CM_INIT_UNIFORM, -3.0, 5.0};
  cm_tensor t = init_1d(CM_F64, 2000, init, 42, "enc.w");
  const int64_t idx[] = {0, 1, 999, 1000, 1999};
  for (int j = 0; j < 5; j++) {
    uint32_t w[4];
    cm_philox(42, cm_hash_str("enc.w"), (uint64_t)idx[j], w);
    double want = -3.0 + 8.0 * cm_uniform01(w[0]);
    CHECK(cm_tensor_get_f64(&t, idx[j]) == want);
  }
  double lo = 1e9, hi = -1e9, sum = 0;
  for (int64_t i = 0; i < 2000; i++) {
    double v = cm_tensor_get_f64(&t, i);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    sum += v;
  }
  CHECK(lo >= -3.0 && lo < -2.9);
  CHECK(hi < 5.0 && hi > 4.9);
  CHECK_NEAR(sum / 2000, 1.0, 0.15); /* mean of U(-3,5); std err 0.05 */
  cm_tensor_free(&t);
}

static void test_determinism_and_order_independence(void) {
  cm_init normal = {CM_INIT_NORMAL, 0.5, 2.0};
  cm_tensor a = init_1d(CM_F32, 5000, normal, 7, "w");
  cm_tensor b = init_1d(CM_F32, 5000, normal, 7, "w");
  CHECK(memcmp(a.data, b.data, 5000 * sizeof(float)) == 0);
  /* A shorter tensor of the same name holds a prefix of the same stream. */
  cm_tensor alone = init_1d(CM_F32, 1001, normal, 7, "w");
  CHECK(((float *)alone.data)[1000] == ((float *)a.data)[1000]);
  CHECK(memcmp(alone.data, a.data, 1001 * sizeof(float)) == 0);
  /* Shape does not matter, only the flat index: [50,100] element 1000 is (10,0). */
  int64_t dims[2] = {50, 100};
  cm_tensor m = make(CM_F32, 2, dims);
  cm_err err;
  CHECK(cm_init_tensor(&m, &normal, 7, "w", &err) == CM_OK);
  CHECK(memcmp(m.data, a.data, 5000 * sizeof(float)) == 0);
  /* Another seed or another name gives another stream. */
  cm_tensor other_seed = init_1d(CM_F32, 5000, normal, 8, "w");
  cm_tensor other_name = init_1d(CM_F32, 5000, normal, 7, "w2");
  int same_seed = 0, same_name = 0;
  for (int i = 0; i < 5000; i++) {
    same_seed += ((float *)other_seed.data)[i] == ((float *)a.data)[i];
    same_name += ((float *)other_name.data)[i] == ((float *)a.data)[i];
  }
  CHECK(same_seed < 5);
  CHECK(same_name < 5);
  cm_tensor_free(&a);
  cm_tensor_free(&b);
  cm_tensor_free(&alone);
  cm_tensor_free(&m);
  cm_tensor_free(&other_seed);
  cm_tensor_free(&other_name);
}

static void test_normal_statistics(void) {
  const int64_t n = 100000;
  cm_init init = {CM_INIT_NORMAL, 1.5, 2.0};
  cm_tensor t = init_1d(CM_F64, n, init, 12345, "stats");
  double sum = 0, sum2 = 0;
  int64_t beyond2 = 0, beyond1 = 0;
  for (int64_t i = 0; i < n; i++) {
    double v = ((double *)t.data)[i];
    CHECK(isfinite(v));
    sum += v;
    sum2 += v * v;
    double z = fabs(v - 1.5) / 2.0;
    beyond1 += z > 1.0;
    beyond2 += z > 2.0;
  }
  double mean = sum / (double)n;
  double std = sqrt(sum2 / (double)n - mean * mean);
  CHECK_NEAR(mean, 1.5, 0.03); /* std err 0.0063 */
  CHECK_NEAR(std, 2.0, 0.015); /* relative; std err ~0.0045 */
  /* Shape of the distribution: P(|z|>1) = 0.3173, P(|z|>2) = 0.0455. */
  CHECK_NEAR((double)beyond1 / (double)n, 0.3173, 0.006);
  CHECK_NEAR((double)beyond2 / (double)n, 0.0455, 0.003);
  cm_tensor_free(&t);
}

static void test_trunc_normal(void) {
  const int64_t n = 100000;
  cm_init tn = {CM_INIT_TRUNC_NORMAL, -1.0, 0.5};
  cm_init nn = {CM_INIT_NORMAL, -1.0, 0.5};
  cm_tensor t = init_1d(CM_F64, n, tn, 99, "pos_embed");
  cm_tensor plain = init_1d(CM_F64, n, nn, 99, "pos_embed");
  double sum = 0, sum2 = 0;
  int64_t redrawn = 0, agree = 0;
  for (int64_t i = 0; i < n; i++) {
    double v = ((double *)t.data)[i], p = ((double *)plain.data)[i];
    CHECK(v >= -2.0 && v <= 0.0);
    sum += v;
    sum2 += v * v;
    if (fabs(p + 1.0) <= 1.0)
      agree += v == p;
    else
      redrawn++;
  }
  /* Where the plain draw is inside the cut, trunc_normal keeps it. */
  CHECK(agree == n - redrawn);
  CHECK(redrawn > 3500 && redrawn < 5600);
  double mean = sum / (double)n;
  double std = sqrt(sum2 / (double)n - mean * mean);
  CHECK_NEAR(mean, -1.0, 0.01);
  /* Std of N(0,1) cut at +-2 is 0.87963. */
  CHECK_NEAR(std / 0.5, 0.87963, 0.01);
  cm_tensor_free(&t);
  cm_tensor_free(&plain);
}

static double max_abs(const cm_tensor *t) {
  double m = 0;
  int64_t n = cm_type_numel(&t->type);
  for (int64_t i = 0; i < n; i++) {
    double v = fabs(cm_tensor_get_f64(t, i));
    m = v > m ? v : m;
  }
  return m;
}

static void test_xavier_uniform(void) {
  cm_err err;
  int64_t d2[2] = {16, 8};
  cm_tensor w = make(CM_F32, 2, d2);
  cm_init x1 = {CM_INIT_XAVIER_UNIFORM, 1.0, 0};
  CHECK(cm_init_tensor(&w, &x1, 3, "fc.w", &err) == CM_OK);
  double bound = sqrt(6.0 / (8 + 16)); /* 0.5 */
  CHECK(bound == 0.5);
  double m = max_abs(&w);
  CHECK(m <= 0.5);
  CHECK(m > 0.48);
  cm_tensor_free(&w);

  int64_t d4[4] = {4, 3, 5, 5}; /* fan_in 3*25 = 75, fan_out 4*25 = 100 */
  cm_tensor k = make(CM_F32, 4, d4);
  cm_init x2 = {CM_INIT_XAVIER_UNIFORM, 2.0, 0};
  CHECK(cm_init_tensor(&k, &x2, 3, "conv.w", &err) == CM_OK);
  bound = 2.0 * sqrt(6.0 / 175.0);
  CHECK_NEAR(bound, 0.370328, 1e-6);
  m = max_abs(&k);
  CHECK(m <= bound * (1 + 1e-7));
  CHECK(m > 0.97 * bound);
  cm_tensor_free(&k);

  int64_t d1 = 8;
  cm_tensor b = make(CM_F32, 1, &d1);
  CHECK(cm_init_tensor(&b, &x1, 3, "fc.b", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"fc.b\"");
  CHECK_STR_CONTAINS(err.msg, "rank >= 2");
  cm_tensor_free(&b);
}

static void test_torch_default(void) {
  cm_err err;
  int64_t d2[2] = {32, 16}; /* Linear(16 -> 32): fan_in 16, bound 0.25 */
  cm_tensor w = make(CM_F32, 2, d2);
  cm_init td = {CM_INIT_TORCH_DEFAULT, 0, 0};
  CHECK(cm_init_tensor(&w, &td, 11, "lin.w", &err) == CM_OK);
  double m = max_abs(&w);
  CHECK(m <= 0.25);
  CHECK(m > 0.245);
  cm_tensor_free(&w);

  int64_t d4[4] = {8, 2, 3, 3}; /* fan_in 2*9 = 18 */
  cm_tensor k = make(CM_F64, 4, d4);
  CHECK(cm_init_tensor(&k, &td, 11, "conv.w", &err) == CM_OK);
  m = max_abs(&k);
  CHECK(m <= 1.0 / sqrt(18.0));
  CHECK(m > 0.97 / sqrt(18.0));
  cm_tensor_free(&k);

  /* A bias takes the weight's fan_in from attribute a. */
  int64_t d1 = 4000;
  cm_tensor b = make(CM_F64, 1, &d1);
  cm_init tb = {CM_INIT_TORCH_DEFAULT, 100.0, 0};
  CHECK(cm_init_tensor(&b, &tb, 11, "lin.b", &err) == CM_OK);
  m = max_abs(&b);
  CHECK(m <= 0.1);
  CHECK(m > 0.099);
  CHECK(cm_init_tensor(&b, &td, 11, "lin.b", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"lin.b\"");
  CHECK_STR_CONTAINS(err.msg, "fan_in");
  cm_tensor_free(&b);
}

static void test_fills_all_dtypes(void) {
  cm_err err;
  int64_t dims[2] = {3, 5};
  for (int dt = 0; dt < CM_DTYPE_COUNT; dt++) {
    cm_tensor t = make((cm_dtype)dt, 2, dims);
    memset(t.data, 0x5a, cm_type_nbytes(&t.type)); /* garbage the fill must overwrite */
    /* a constant must be a value of the dtype: -7.75 is no i32 (nor a bool) */
    double want = cm_dtype_is_float((cm_dtype)dt) ? -7.75 : dt == CM_BOOL ? 1.0 : -7.0;
    cm_init z = {CM_INIT_ZEROS, 0, 0}, o = {CM_INIT_ONES, 0, 0}, c = {CM_INIT_CONSTANT, want, 0};
    CHECK(cm_init_tensor(&t, &z, 1, "t", &err) == CM_OK);
    for (int i = 0; i < 15; i++) CHECK(cm_tensor_get_f64(&t, i) == 0.0);
    CHECK(cm_init_tensor(&t, &o, 1, "t", &err) == CM_OK);
    for (int i = 0; i < 15; i++) CHECK(cm_tensor_get_f64(&t, i) == 1.0);
    CHECK(cm_init_tensor(&t, &c, 1, "t", &err) == CM_OK);
    cm_init frac = {CM_INIT_CONSTANT, -7.75, 0};
    cm_status fst = cm_init_tensor(&t, &frac, 1, "t", &err);
    CHECK(fst == (cm_dtype_is_float((cm_dtype)dt) ? CM_OK : CM_EINVALID));
    if (fst) CHECK_STR_CONTAINS(err.msg, "\"t\": init constant: value -7.75 is outside");
    CHECK(cm_init_tensor(&t, &c, 1, "t", &err) == CM_OK);
    for (int i = 0; i < 15; i++)
      CHECK_MSG(cm_tensor_get_f64(&t, i) == want, "%s: %g", cm_dtype_name((cm_dtype)dt),
                cm_tensor_get_f64(&t, i));
    cm_tensor_free(&t);
  }
  int64_t one = 1;
  cm_tensor i64 = make(CM_I64, 1, &one);
  cm_init big = {CM_INIT_CONSTANT, 4294967296.0 * 3.0, 0};
  CHECK(cm_init_tensor(&i64, &big, 0, "counter", &err) == CM_OK);
  CHECK(((int64_t *)i64.data)[0] == 12884901888);
  cm_tensor_free(&i64);
}

static void test_reduced_precision_rounds_the_draw(void) {
  cm_init init = {CM_INIT_NORMAL, 0.0, 0.02};
  cm_tensor wide = init_1d(CM_F64, 257, init, 5, "emb");
  cm_tensor bf = init_1d(CM_BF16, 257, init, 5, "emb");
  cm_tensor hf = init_1d(CM_F16, 257, init, 5, "emb");
  for (int i = 0; i < 257; i++) {
    double v = ((double *)wide.data)[i];
    CHECK(((uint16_t *)bf.data)[i] == cm_f64_to_bf16(v));
    CHECK(((uint16_t *)hf.data)[i] == cm_f64_to_f16(v));
  }
  cm_tensor_free(&wide);
  cm_tensor_free(&bf);
  cm_tensor_free(&hf);
}

static void test_init_errors(void) {
  cm_err err;
  int64_t dims[2] = {4, 4};
  cm_tensor t = make(CM_I32, 2, dims);
  cm_init normal = {CM_INIT_NORMAL, 0, 1};
  CHECK(cm_init_tensor(&t, &normal, 1, "idx", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"idx\"");
  CHECK_STR_CONTAINS(err.msg, "float dtype");
  cm_init none = {CM_INIT_NONE, 0, 0};
  CHECK(cm_init_tensor(&t, &none, 1, "idx", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "none");
  cm_tensor_free(&t);

  cm_tensor f = make(CM_F32, 2, dims);
  cm_init neg_std = {CM_INIT_TRUNC_NORMAL, 0, -1};
  CHECK(cm_init_tensor(&f, &neg_std, 1, "f", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "std must be >= 0");
  cm_init backwards = {CM_INIT_UNIFORM, 1, 0};
  CHECK(cm_init_tensor(&f, &backwards, 1, "f", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "low 1 > high 0");
  cm_init nan_mean = {CM_INIT_NORMAL, NAN, 1};
  CHECK(cm_init_tensor(&f, &nan_mean, 1, "f", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "finite");
  cm_init bad_kind = {(cm_init_kind)42, 0, 0};
  CHECK(cm_init_tensor(&f, &bad_kind, 1, "f", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "unknown init kind");
  /* std 0 is a constant, not an endless redraw loop. */
  cm_init zero_std = {CM_INIT_TRUNC_NORMAL, 0.25, 0};
  CHECK(cm_init_tensor(&f, &zero_std, 1, "f", &err) == CM_OK);
  for (int i = 0; i < 16; i++) CHECK(((float *)f.data)[i] == 0.25f);
  cm_tensor_free(&f);
}

/* CMAE.md §3: PE(t) = [sin(a w), cos(a w), sin(b w), cos(b w)], a = t / side, b = t % side. */
static void test_sincos_2d(void) {
  int64_t dims[3] = {1, 1 + 9, 8}; /* cls + a 3x3 grid, D = 8, D4 = 2 */
  cm_tensor t;
  CHECK(cm_tensor_alloc(&t, cm_type_make(CM_F64, 3, dims), NULL) == CM_OK);
  cm_init init = {CM_INIT_SINCOS_2D, 1, 0};
  CHECK(cm_init_tensor(&t, &init, 0, "pos_embed", NULL) == CM_OK);
  for (int c = 0; c < 8; c++) CHECK(cm_tensor_get_f64(&t, c) == 0); /* the cls row */
  /* token t = 5 (row 6): a = 1, b = 2; w = [1, 1/100] */
  const double *v = (const double *)t.data + 6 * 8;
  double expect[8] = {sin(1.0), sin(0.01), cos(1.0), cos(0.01),
                      sin(2.0), sin(0.02), cos(2.0), cos(0.02)};
  for (int c = 0; c < 8; c++) CHECK_NEAR(v[c], expect[c], 1e-15);
  cm_init bad = {CM_INIT_SINCOS_2D, 2, 0}; /* 8 rows left: not a square */
  cm_err err;
  CHECK(cm_init_tensor(&t, &bad, 0, "pos_embed", &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "square grid");
  cm_tensor_free(&t);

  /* xavier with flatten: the [O, C*KH*KW] view, fan_out = O */
  int64_t wd[4] = {6, 3, 4, 4};
  CHECK(cm_tensor_alloc(&t, cm_type_make(CM_F64, 4, wd), NULL) == CM_OK);
  cm_init xf = {CM_INIT_XAVIER_UNIFORM, 1, 1};
  CHECK(cm_init_tensor(&t, &xf, 3, "patch_embed.weight", NULL) == CM_OK);
  double bound = sqrt(6.0 / (48 + 6)), maxabs = 0;
  for (int64_t i = 0; i < 288; i++) maxabs = fmax(maxabs, fabs(cm_tensor_get_f64(&t, i)));
  CHECK(maxabs <= bound && maxabs > 0.9 * bound);
  cm_tensor_free(&t);
}

TEST_MAIN(TEST(test_sincos_2d), TEST(test_philox_known_answers), TEST(test_philox_streams_differ),
          TEST(test_hash_fnv1a), TEST(test_uniform01), TEST(test_init_kind_names),
          TEST(test_uniform_stream_definition), TEST(test_determinism_and_order_independence),
          TEST(test_normal_statistics), TEST(test_trunc_normal), TEST(test_xavier_uniform),
          TEST(test_torch_default), TEST(test_fills_all_dtypes),
          TEST(test_reduced_precision_rounds_the_draw), TEST(test_init_errors))
