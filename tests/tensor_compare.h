/* tests/tensor_compare.h — the relative error the differential tests compare
 * a backend's tensor with the oracle's by. */
#pragma once

#include <math.h>
#include <stdbool.h>

#include "ir/ir.h"

/* max |x - y| over max |y| (1e-30 at least), over tensors of equal type;
 * INFINITY when a tensor is missing or the types differ. With special_ok, a
 * NaN or infinity in y must be matched exactly by x (an oracle that gives
 * them on purpose: pow edge cases, masked attention); without it any NaN is
 * a failure. */
static inline double test_rel_err(const cm_tensor *x, const cm_tensor *y, bool special_ok) {
  if (!x->data || !y->data || !cm_type_equal(&x->type, &y->type)) return INFINITY;
  double d = 0, m = 0;
  int64_t n = cm_type_numel(&y->type);
  for (int64_t i = 0; i < n; i++) {
    double a = cm_tensor_get_f64(x, i), b = cm_tensor_get_f64(y, i);
    if (!special_ok && (isnan(a) || isnan(b))) return INFINITY;
    if (isnan(a) != isnan(b) || (isinf(b) && a != b)) return INFINITY;
    if (isnan(a) || isinf(b)) continue;
    d = fmax(d, fabs(a - b));
    m = fmax(m, fabs(b));
  }
  return d / fmax(m, 1e-30);
}

/* A backend's tensor against the oracle's f64 value and forward error bound
 * (cm_eval_bounded). ratio: the worst |got - ref| / bound over the elements
 * (got is within the bound iff ratio <= 1; a difference where the bound is 0
 * gives INFINITY); at: where. spread: the largest bound over the largest |ref|
 * (how tight the bound is: near 1 it no longer tells a bug from rounding).
 * NaN must meet NaN and an infinite ref an equal got. */
typedef struct test_bounded {
  double ratio, diff, bound, scale, spread;
  int64_t at;
} test_bounded;

static inline test_bounded test_check_bounded(const cm_tensor *got, const cm_tensor *ref,
                                              const cm_tensor *bound) {
  test_bounded r = {INFINITY, INFINITY, 0, 0, 0, -1};
  if (!got->data || !ref->data || !bound->data || !cm_shape_equal(&got->type, &ref->type) ||
      !cm_shape_equal(&bound->type, &ref->type))
    return r;
  r.ratio = 0, r.diff = 0;
  double max_bound = 0;
  int64_t n = cm_type_numel(&ref->type);
  for (int64_t i = 0; i < n; i++) {
    double a = cm_tensor_get_f64(got, i), b = cm_tensor_get_f64(ref, i);
    double e = cm_tensor_get_f64(bound, i), d = fabs(a - b), q;
    if (isnan(a) || isnan(b) || isinf(b))
      q = (isnan(a) && isnan(b)) || a == b ? 0 : INFINITY;
    else
      q = d == 0 ? 0 : d / e; /* e == 0: INFINITY */
    if (!(q <= r.ratio)) r.ratio = q, r.diff = d, r.bound = e, r.at = i;
    if (!isnan(b) && !isinf(b)) r.scale = fmax(r.scale, fabs(b));
    if (!isnan(e)) max_bound = fmax(max_bound, e);
  }
  r.spread = max_bound / fmax(r.scale, 1e-300);
  return r;
}
