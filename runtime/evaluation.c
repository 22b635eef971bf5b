/* runtime/evaluation.c — evaluating frozen features: weighted kNN (the
 * InstDisc/DINO rule) and a linear probe (softmax regression trained here).
 * Both are deterministic: fixed iteration orders, fixed tie rules, and a
 * fixed-seed shuffle for mini-batches. */
#include "training.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#define CM_OMP_FOR _Pragma("omp parallel for schedule(dynamic, 4)")
#else
#define CM_OMP_FOR
#endif

static cm_status check_set(const char *what, const float *x, const int32_t *y, int64_t n, int d,
                           int classes, cm_err *err) {
  if (n < 1)
    return cm_errorf(err, CM_EINVALID, "eval: %s set has %lld rows, needs >= 1", what,
                     (long long)n);
  if (!x || !y) return cm_errorf(err, CM_EINVALID, "eval: %s features or labels are NULL", what);
  for (int64_t i = 0; i < n; i++) {
    if (y[i] < 0 || y[i] >= classes)
      return cm_errorf(err, CM_EINVALID, "eval: %s label[%lld] = %d outside [0, %d)", what,
                       (long long)i, (int)y[i], classes);
    for (int j = 0; j < d; j++)
      if (!isfinite(x[i * d + j]))
        return cm_errorf(err, CM_EINVALID, "eval: %s feature [%lld, %d] is not finite", what,
                         (long long)i, j);
  }
  return CM_OK;
}

static cm_status check_args(const float *train, const int32_t *train_labels, int64_t n_train,
                            const float *test, const int32_t *test_labels, int64_t n_test, int d,
                            int classes, cm_err *err) {
  if (d < 1) return cm_errorf(err, CM_EINVALID, "eval: feature dimension %d must be >= 1", d);
  if (classes < 1) return cm_errorf(err, CM_EINVALID, "eval: %d classes, needs >= 1", classes);
  cm_status st = check_set("train", train, train_labels, n_train, d, classes, err);
  return st ? st : check_set("test", test, test_labels, n_test, d, classes, err);
}

/* Rows scaled to unit L2 norm (all-zero rows stay zero). */
static float *normalized(const float *x, int64_t n, int d) {
  float *o = malloc((size_t)n * (size_t)d * sizeof *o);
  if (!o) return NULL;
  for (int64_t i = 0; i < n; i++) {
    double s = 0;
    for (int j = 0; j < d; j++) s += (double)x[i * d + j] * x[i * d + j];
    double inv = s > 0 ? 1.0 / sqrt(s) : 0;
    for (int j = 0; j < d; j++) o[i * d + j] = (float)(x[i * d + j] * inv);
  }
  return o;
}

/* Eight independent float lanes (the compiler vectorizes them without
 * reassociating), summed in a fixed order: fast and deterministic. */
static double dot8(const float *a, const float *b, int d) {
  float acc[8] = {0};
  int j = 0;
  for (; j + 8 <= d; j += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
  double s = 0;
  for (int l = 0; l < 8; l++) s += acc[l];
  for (; j < d; j++) s += (double)a[j] * b[j];
  return s;
}

cm_status cm_knn_classify(const float *train, const int32_t *train_labels, int64_t n_train,
                          const float *test, const int32_t *test_labels, int64_t n_test, int d,
                          int classes, int k, double temperature, int32_t *pred, double *top1,
                          cm_err *err) {
  cm_status st =
      check_args(train, train_labels, n_train, test, test_labels, n_test, d, classes, err);
  if (st) return st;
  if (k < 1) return cm_errorf(err, CM_EINVALID, "knn: k = %d must be >= 1", k);
  if (!(temperature > 0) || !isfinite(temperature))
    return cm_errorf(err, CM_EINVALID, "knn: temperature %g must be > 0", temperature);
  if (k > n_train) k = (int)n_train;
  float *tr = normalized(train, n_train, d), *te = normalized(test, n_test, d);
  int32_t *p = malloc((size_t)n_test * sizeof *p);
  char *failed = calloc((size_t)n_test, 1);
  if (!tr || !te || !p || !failed) {
    st = cm_errorf(err, CM_EINTERNAL, "knn: out of memory");
    goto done;
  }
  CM_OMP_FOR
  for (int64_t q = 0; q < n_test; q++) {
    double *sim = malloc((size_t)k * sizeof *sim);
    int64_t *idx = malloc((size_t)k * sizeof *idx);
    double *votes = calloc((size_t)classes, sizeof *votes);
    if (!sim || !idx || !votes) {
      failed[q] = 1;
    } else {
      /* top-k by similarity, descending; a later (higher-index) row enters
       * only when strictly more similar, so equal similarities keep the lower index */
      int have = 0;
      const float *a = te + q * d;
      for (int64_t i = 0; i < n_train; i++) {
        const float *b = tr + i * d;
        double s = dot8(a, b, d);
        if (have == k && !(s > sim[k - 1])) continue;
        int pos = have < k ? have++ : k - 1;
        while (pos > 0 && s > sim[pos - 1]) {
          sim[pos] = sim[pos - 1];
          idx[pos] = idx[pos - 1];
          pos--;
        }
        sim[pos] = s;
        idx[pos] = i;
      }
      for (int r = 0; r < have; r++) votes[train_labels[idx[r]]] += exp(sim[r] / temperature);
      int best = 0;
      for (int c = 1; c < classes; c++)
        if (votes[c] > votes[best]) best = c; /* equal totals: the smaller class */
      p[q] = best;
    }
    free(sim);
    free(idx);
    free(votes);
  }
  int64_t correct = 0;
  for (int64_t q = 0; q < n_test; q++) {
    if (failed[q]) {
      st = cm_errorf(err, CM_EINTERNAL, "knn: out of memory");
      goto done;
    }
    correct += p[q] == test_labels[q];
  }
  if (pred) memcpy(pred, p, (size_t)n_test * sizeof *p);
  if (top1) *top1 = (double)correct / (double)n_test;
done:
  free(tr);
  free(te);
  free(p);
  free(failed);
  return st;
}

void cm_probe_opts_default(cm_probe_opts *o) {
  o->epochs = 200;
  o->batch = 0;
  o->lr = 0.5;
  o->weight_decay = 1e-4;
  o->seed = 0;
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Four independent double lanes, summed in a fixed order. */
static double dot4(const double *a, const double *b, int d) {
  double acc[4] = {0};
  int j = 0;
  for (; j + 4 <= d; j += 4)
    for (int l = 0; l < 4; l++) acc[l] += a[j + l] * b[j + l];
  double s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; j < d; j++) s += a[j] * b[j];
  return s;
}

/* Softmax probabilities of one standardized row into prob[classes] (w is
 * [classes, d]); returns the argmax. */
static int forward_row(const double *x, const double *w, const double *b, int d, int classes,
                       double *prob) {
  for (int c = 0; c < classes; c++) prob[c] = b[c] + dot4(w + (size_t)c * d, x, d);
  int best = 0;
  for (int c = 1; c < classes; c++)
    if (prob[c] > prob[best]) best = c;
  double mx = prob[best], sum = 0;
  for (int c = 0; c < classes; c++) sum += (prob[c] = exp(prob[c] - mx));
  for (int c = 0; c < classes; c++) prob[c] /= sum;
  return best;
}

static double accuracy(const double *x, const int32_t *y, int64_t n, const double *w,
                       const double *b, int d, int classes, double *prob) {
  int64_t correct = 0;
  for (int64_t i = 0; i < n; i++) correct += forward_row(x + i * d, w, b, d, classes, prob) == y[i];
  return (double)correct / (double)n;
}

cm_status cm_linear_probe(const float *train, const int32_t *train_labels, int64_t n_train,
                          const float *test, const int32_t *test_labels, int64_t n_test, int d,
                          int classes, const cm_probe_opts *opts, double *train_top1,
                          double *test_top1, cm_err *err) {
  cm_status st =
      check_args(train, train_labels, n_train, test, test_labels, n_test, d, classes, err);
  if (st) return st;
  cm_probe_opts o;
  if (opts)
    o = *opts;
  else
    cm_probe_opts_default(&o);
  if (o.epochs < 0 || o.batch < 0 || !(o.lr > 0) || !isfinite(o.lr) || !(o.weight_decay >= 0))
    return cm_errorf(err, CM_EINVALID,
                     "probe: epochs %d, batch %d, lr %g, weight_decay %g: need epochs >= 0, "
                     "batch >= 0, lr > 0, weight_decay >= 0",
                     o.epochs, o.batch, o.lr, o.weight_decay);
  int64_t bs = o.batch == 0 || o.batch > n_train ? n_train : o.batch;
  size_t nd = (size_t)d, nc = (size_t)classes;
  double *xtr = malloc((size_t)n_train * nd * sizeof *xtr);
  double *xte = malloc((size_t)n_test * nd * sizeof *xte);
  double *mean = calloc(nd, sizeof *mean), *sd = calloc(nd, sizeof *sd);
  double *w = calloc(nd * nc, sizeof *w), *vw = calloc(nd * nc, sizeof *vw);
  double *gw = calloc(nd * nc, sizeof *gw);
  double *b = calloc(nc, sizeof *b), *vb = calloc(nc, sizeof *vb), *gb = calloc(nc, sizeof *gb);
  double *prob = malloc(nc * sizeof *prob);
  int64_t *order = malloc((size_t)n_train * sizeof *order);
  if (!xtr || !xte || !mean || !sd || !w || !vw || !gw || !b || !vb || !gb || !prob || !order) {
    st = cm_errorf(err, CM_EINTERNAL, "probe: out of memory");
    goto done;
  }
  for (int64_t i = 0; i < n_train; i++)
    for (int j = 0; j < d; j++) mean[j] += train[i * d + j];
  for (int j = 0; j < d; j++) mean[j] /= (double)n_train;
  for (int64_t i = 0; i < n_train; i++)
    for (int j = 0; j < d; j++) {
      double t = train[i * d + j] - mean[j];
      sd[j] += t * t;
    }
  for (int j = 0; j < d; j++) {
    sd[j] = sqrt(sd[j] / (double)n_train);
    if (!(sd[j] > 1e-12)) sd[j] = 1; /* a constant feature carries nothing; keep it at 0 */
  }
  for (int64_t i = 0; i < n_train; i++)
    for (int j = 0; j < d; j++) xtr[i * d + j] = (train[i * d + j] - mean[j]) / sd[j];
  for (int64_t i = 0; i < n_test; i++)
    for (int j = 0; j < d; j++) xte[i * d + j] = (test[i * d + j] - mean[j]) / sd[j];
  for (int64_t i = 0; i < n_train; i++) order[i] = i;
  uint64_t rs = o.seed ^ 0x5eed5eed5eedull;
  const double mom = 0.9;
  for (int ep = 0; ep < o.epochs; ep++) {
    if (bs < n_train)
      for (int64_t i = n_train - 1; i > 0; i--) { /* Fisher-Yates */
        int64_t j = (int64_t)(splitmix(&rs) % (uint64_t)(i + 1));
        int64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
      }
    for (int64_t s0 = 0; s0 < n_train; s0 += bs) {
      int64_t s1 = s0 + bs < n_train ? s0 + bs : n_train;
      memset(gw, 0, nd * nc * sizeof *gw);
      memset(gb, 0, nc * sizeof *gb);
      for (int64_t r = s0; r < s1; r++) {
        const double *x = xtr + order[r] * d;
        forward_row(x, w, b, d, classes, prob);
        prob[train_labels[order[r]]] -= 1; /* dCE/dlogits = p - onehot */
        for (int c = 0; c < classes; c++) gb[c] += prob[c];
        for (int c = 0; c < classes; c++) {
          double *g = gw + (size_t)c * nd, pc = prob[c];
          for (int j = 0; j < d; j++) g[j] += pc * x[j];
        }
      }
      double inv = 1.0 / (double)(s1 - s0);
      for (size_t i = 0; i < nd * nc; i++) {
        vw[i] = mom * vw[i] + gw[i] * inv + o.weight_decay * w[i];
        w[i] -= o.lr * vw[i];
      }
      for (size_t c = 0; c < nc; c++) {
        vb[c] = mom * vb[c] + gb[c] * inv;
        b[c] -= o.lr * vb[c];
      }
    }
  }
  for (size_t i = 0; i < nd * nc; i++)
    if (!isfinite(w[i])) {
      st = cm_errorf(err, CM_EINVALID, "probe: weights diverged (lr %g too large)", o.lr);
      goto done;
    }
  if (train_top1) *train_top1 = accuracy(xtr, train_labels, n_train, w, b, d, classes, prob);
  if (test_top1) *test_top1 = accuracy(xte, test_labels, n_test, w, b, d, classes, prob);
done:
  free(xtr);
  free(xte);
  free(mean);
  free(sd);
  free(w);
  free(vw);
  free(gw);
  free(b);
  free(vb);
  free(gb);
  free(prob);
  free(order);
  return st;
}
