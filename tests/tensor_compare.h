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
