/* tests/unit/test_evaluation.c — kNN (cosine, k, exp(sim/T) votes, tie
 * rules) and the linear probe on synthetic features: separable Gaussian
 * clusters (> 95%), random labels (about chance), a hand-computed example. */
#include "../../runtime/training.h"
#include "../test.h"
#include "../testlib.h"

static test_rng rng_state;
static double uniform(void) {
  return test_uniform(&rng_state);
}
static double gauss(void) {
  double u = uniform(), v = uniform();
  return sqrt(-2 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* n rows of d features around one of `classes` centres (spread apart, not at the origin). */
static void clusters(const double *centres, int classes, int d, int64_t n, double noise, float *x,
                     int32_t *y) {
  for (int64_t i = 0; i < n; i++) {
    int c = (int)(uniform() * classes);
    y[i] = c;
    for (int j = 0; j < d; j++) x[i * d + j] = (float)(centres[c * d + j] + noise * gauss());
  }
}

static void test_gaussian_clusters(void) {
  rng_state.s = 2024;
  enum { C = 5, D = 17, NTR = 503, NTE = 211 };
  double centres[C * D];
  for (int i = 0; i < C * D; i++) centres[i] = 4 * gauss() + 1.5;
  static float xtr[NTR * D], xte[NTE * D];
  static int32_t ytr[NTR], yte[NTE];
  clusters(centres, C, D, NTR, 3.5, xtr, ytr);
  clusters(centres, C, D, NTE, 3.5, xte, yte);
  cm_err err = {0};
  double knn = -1, tr = -1, te = -1;
  static int32_t pred[NTE];
  CHECK(cm_knn_classify(xtr, ytr, NTR, xte, yte, NTE, D, C, 20, 0.07, pred, &knn, &err) == CM_OK);
  CHECK_MSG(knn > 0.95, "knn top1 %.3f", knn);
  int correct = 0;
  for (int i = 0; i < NTE; i++) correct += pred[i] == yte[i];
  CHECK_NEAR(knn, (double)correct / NTE, 1e-15);
  cm_probe_opts o;
  cm_probe_opts_default(&o);
  CHECK(cm_linear_probe(xtr, ytr, NTR, xte, yte, NTE, D, C, &o, &tr, &te, &err) == CM_OK);
  CHECK_MSG(te > 0.95 && tr > 0.95, "probe train %.3f test %.3f", tr, te);
  /* mini-batches of a prime size, and the result is deterministic */
  o.batch = 37;
  o.epochs = 20;
  o.lr = 0.1;
  double te2 = -1, te3 = -2;
  CHECK(cm_linear_probe(xtr, ytr, NTR, xte, yte, NTE, D, C, &o, NULL, &te2, &err) == CM_OK);
  CHECK(cm_linear_probe(xtr, ytr, NTR, xte, yte, NTE, D, C, &o, NULL, &te3, &err) == CM_OK);
  CHECK_MSG(te2 > 0.95, "mini-batch probe %.3f", te2);
  CHECK(te2 == te3);
  fprintf(stderr, "  clusters: knn %.3f, probe train %.3f test %.3f, mini-batch %.3f\n", knn, tr,
          te, te2);
}

static void test_random_labels(void) {
  rng_state.s = 7;
  enum { C = 4, D = 9, NTR = 800, NTE = 600 };
  static float xtr[NTR * D], xte[NTE * D];
  static int32_t ytr[NTR], yte[NTE];
  for (int i = 0; i < NTR * D; i++) xtr[i] = (float)gauss();
  for (int i = 0; i < NTE * D; i++) xte[i] = (float)gauss();
  for (int i = 0; i < NTR; i++) ytr[i] = (int32_t)(uniform() * C);
  for (int i = 0; i < NTE; i++) yte[i] = (int32_t)(uniform() * C);
  cm_err err = {0};
  double knn = -1, te = -1;
  CHECK(cm_knn_classify(xtr, ytr, NTR, xte, yte, NTE, D, C, 20, 0.07, NULL, &knn, &err) == CM_OK);
  /* chance 0.25; the std of the accuracy over 600 rows is ~0.018 */
  CHECK_MSG(knn > 0.17 && knn < 0.33, "knn %.3f", knn);
  CHECK(cm_linear_probe(xtr, ytr, NTR, xte, yte, NTE, D, C, NULL, NULL, &te, &err) == CM_OK);
  CHECK_MSG(te > 0.17 && te < 0.33, "probe %.3f", te);
  fprintf(stderr, "  random labels: knn %.3f, probe %.3f (chance 0.25)\n", knn, te);
}

static void test_hand_computed(void) {
  cm_err err = {0};
  /* test (1,0). sims: A 1, B 0.6, C 0.6, D -1 (A is scaled: cosine ignores it) */
  float tr[] = {5, 0, 0.6f, 0.8f, 0.6f, -0.8f, -1, 0};
  int32_t ytr[] = {0, 1, 1, 0};
  float te[] = {1, 0};
  int32_t yte[] = {1};
  int32_t p = -1;
  double acc;
  /* k = 3, T = 0.07: class 0 gets e^(1/0.07) = 1.6e6, class 1 gets 2 e^(0.6/0.07) = 1.05e4 */
  CHECK(cm_knn_classify(tr, ytr, 4, te, yte, 1, 2, 2, 3, 0.07, &p, &acc, &err) == CM_OK);
  CHECK(p == 0 && acc == 0);
  /* T = 1: class 0 gets e^1 = 2.72, class 1 gets 2 e^0.6 = 3.64 */
  CHECK(cm_knn_classify(tr, ytr, 4, te, yte, 1, 2, 2, 3, 1.0, &p, &acc, &err) == CM_OK);
  CHECK(p == 1 && acc == 1);
  /* k = 4 at T = 1: class 0 adds e^-1 = 0.37 -> 3.09 < 3.64 */
  CHECK(cm_knn_classify(tr, ytr, 4, te, yte, 1, 2, 2, 4, 1.0, &p, &acc, &err) == CM_OK);
  CHECK(p == 1);
  /* k larger than the train set uses all rows */
  CHECK(cm_knn_classify(tr, ytr, 4, te, yte, 1, 2, 2, 99, 1.0, &p, &acc, &err) == CM_OK);
  CHECK(p == 1);

  /* ties. train rows (0,1) label 2 and (0,-1) label 1 are equally similar (0) to (1,0) */
  float tt[] = {0, 1, 0, -1};
  int32_t yt[] = {2, 1};
  int32_t yq[] = {2};
  /* k = 1: equal similarity keeps the lower train index -> its label 2 */
  CHECK(cm_knn_classify(tt, yt, 2, te, yq, 1, 2, 3, 1, 0.07, &p, &acc, &err) == CM_OK);
  CHECK(p == 2 && acc == 1);
  /* k = 2: votes tie (1 each) -> the smaller class index, 1, not train order */
  CHECK(cm_knn_classify(tt, yt, 2, te, yq, 1, 2, 3, 2, 0.07, &p, &acc, &err) == CM_OK);
  CHECK(p == 1 && acc == 0);
  /* an all-zero test row has similarity 0 to everything: a full tie -> class 1 */
  float zero[] = {0, 0};
  CHECK(cm_knn_classify(tt, yt, 2, zero, yq, 1, 2, 3, 2, 0.07, &p, &acc, &err) == CM_OK);
  CHECK(p == 1);

  /* errors */
  int32_t badl[] = {0, 3};
  CHECK(cm_knn_classify(tt, badl, 2, te, yq, 1, 2, 3, 2, 0.07, &p, &acc, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "label[1]");
  float nanx[] = {0, NAN, 0, 1};
  CHECK(cm_knn_classify(nanx, yt, 2, te, yq, 1, 2, 3, 2, 0.07, &p, &acc, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "not finite");
  CHECK(cm_knn_classify(tt, yt, 2, te, yq, 1, 2, 3, 0, 0.07, &p, &acc, &err) == CM_EINVALID);
  CHECK(cm_knn_classify(tt, yt, 2, te, yq, 1, 2, 3, 2, 0, &p, &acc, &err) == CM_EINVALID);
  cm_probe_opts o;
  cm_probe_opts_default(&o);
  o.lr = -1;
  CHECK(cm_linear_probe(tt, yt, 2, te, yq, 1, 2, 3, &o, NULL, &acc, &err) == CM_EINVALID);

  /* the probe on the hand example: one constant feature (sd 0) is harmless */
  float lin[] = {1, 7, 2, 7, -1, 7, -2, 7, 1.5f, 7, -1.5f, 7};
  int32_t ly[] = {1, 1, 0, 0, 1, 0};
  float lt[] = {3, 7, -3, 7};
  int32_t lty[] = {1, 0};
  double trn, tst;
  CHECK(cm_linear_probe(lin, ly, 6, lt, lty, 2, 2, 2, NULL, &trn, &tst, &err) == CM_OK);
  CHECK(trn == 1 && tst == 1);
}

TEST_MAIN(TEST(test_gaussian_clusters), TEST(test_random_labels), TEST(test_hand_computed))
