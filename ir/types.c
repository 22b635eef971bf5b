/* ir/types.c — errors, dtypes, types, tensors, float16/bfloat16 rounding. */
#include "ir.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors ------------------------------------------------------------ */

cm_status cm_errorf(cm_err *err, cm_status status, const char *fmt, ...) {
  if (!err) return status;
  err->status = status;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  va_end(ap);
  /* One line: a message never carries a newline. */
  for (char *p = err->msg; *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
  return status;
}

cm_status cm_err_prefix(cm_err *err, const char *fmt, ...) {
  if (!err) return CM_EINTERNAL;
  char prefix[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prefix, sizeof prefix, fmt, ap);
  va_end(ap);
  size_t plen = strlen(prefix), mlen = strlen(err->msg);
  if (plen >= sizeof err->msg) plen = sizeof err->msg - 1;
  if (plen + mlen >= sizeof err->msg) mlen = sizeof err->msg - 1 - plen;
  memmove(err->msg + plen, err->msg, mlen);
  memcpy(err->msg, prefix, plen);
  err->msg[plen + mlen] = 0;
  return err->status;
}

/* ---- dtypes ------------------------------------------------------------ */

static const struct {
  const char *name;
  size_t size;
} dtype_table[CM_DTYPE_COUNT] = {
    [CM_F32] = {"f32", 4}, [CM_F64] = {"f64", 8}, [CM_BF16] = {"bf16", 2}, [CM_F16] = {"f16", 2},
    [CM_I32] = {"i32", 4}, [CM_I64] = {"i64", 8}, [CM_BOOL] = {"bool", 1},
};

const char *cm_dtype_name(cm_dtype dt) {
  return (unsigned)dt < CM_DTYPE_COUNT ? dtype_table[dt].name : "?";
}

bool cm_dtype_from_name(const char *name, cm_dtype *out) {
  for (int i = 0; i < CM_DTYPE_COUNT; i++)
    if (strcmp(name, dtype_table[i].name) == 0) {
      *out = (cm_dtype)i;
      return true;
    }
  return false;
}

size_t cm_dtype_size(cm_dtype dt) {
  return (unsigned)dt < CM_DTYPE_COUNT ? dtype_table[dt].size : 0;
}
bool cm_dtype_is_float(cm_dtype dt) {
  return dt == CM_F32 || dt == CM_F64 || dt == CM_BF16 || dt == CM_F16;
}
bool cm_dtype_is_int(cm_dtype dt) {
  return dt == CM_I32 || dt == CM_I64;
}

/* ---- types ------------------------------------------------------------- */

cm_type cm_type_make(cm_dtype dt, int rank, const int64_t *dims) {
  cm_type t;
  memset(&t, 0, sizeof t);
  t.dtype = dt;
  t.rank = rank;
  for (int i = 0; i < rank && i < CM_MAX_RANK; i++) t.dims[i] = dims[i];
  return t;
}

int64_t cm_type_numel(const cm_type *t) {
  int64_t n = 1;
  for (int i = 0; i < t->rank; i++) n *= t->dims[i];
  return n;
}

size_t cm_type_nbytes(const cm_type *t) {
  return (size_t)cm_type_numel(t) * cm_dtype_size(t->dtype);
}

bool cm_shape_equal(const cm_type *a, const cm_type *b) {
  if (a->rank != b->rank) return false;
  for (int i = 0; i < a->rank; i++)
    if (a->dims[i] != b->dims[i]) return false;
  return true;
}

bool cm_type_equal(const cm_type *a, const cm_type *b) {
  return a->dtype == b->dtype && cm_shape_equal(a, b);
}

char *cm_type_str(const cm_type *t, char *buf, size_t size) {
  size_t n = (size_t)snprintf(buf, size, "%s[", cm_dtype_name(t->dtype));
  for (int i = 0; i < t->rank && n < size; i++)
    n += (size_t)snprintf(buf + n, size - n, "%s%lld", i ? "," : "", (long long)t->dims[i]);
  if (n < size) snprintf(buf + n, size - n, "]");
  return buf;
}

void cm_type_strides(const cm_type *t, int64_t strides[CM_MAX_RANK]) {
  int64_t s = 1;
  for (int i = CM_MAX_RANK - 1; i >= 0; i--) {
    if (i >= t->rank) {
      strides[i] = 0;
      continue;
    }
    strides[i] = s;
    s *= t->dims[i];
  }
}

/* ---- 16-bit floats ----------------------------------------------------- */

/* Rounds x to a binary format with `precision` significand bits (implicit bit
 * included), smallest normal exponent emin (value 2^emin) and largest finite
 * value max_finite; ties to even, subnormals gradual. Exact in double since
 * every 16-bit value and every rounding step is representable. */
static double round_to_format(double x, int precision, int emin, double max_finite) {
  if (isnan(x) || isinf(x) || x == 0) return x;
  double ax = fabs(x);
  int e;
  frexp(ax, &e); /* ax = m * 2^e, m in [0.5, 1) so the leading bit is 2^(e-1) */
  int lead = e - 1;
  if (lead < emin) lead = emin; /* subnormal: fixed quantum */
  double quantum = ldexp(1.0, lead - (precision - 1));
  double r = nearbyint(ax / quantum) * quantum; /* default rounding mode: ties to even */
  /* Overflow: values at or beyond max + half an ulp round to infinity. */
  double ulp_max = ldexp(1.0, ilogb(max_finite) - (precision - 1));
  if (ax >= max_finite + ulp_max / 2)
    r = INFINITY;
  else if (r > max_finite)
    r = max_finite;
  return copysign(r, x);
}

float cm_bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t cm_f32_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u); /* quiet NaN */
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)((bits + rounding) >> 16);
}

uint16_t cm_f64_to_bf16(double d) {
  if (isnan(d)) return signbit(d) ? 0xffc0u : 0x7fc0u;
  double r = round_to_format(d, 8, -126, 3.38953138925153547590470800371487866880e+38);
  return cm_f32_to_bf16((float)r); /* r is exactly a bf16 value, so this is exact */
}

float cm_f16_to_f32(uint16_t h) {
  int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0)
    v = ldexp((double)mant, -24);
  else if (exp == 31)
    v = mant ? NAN : INFINITY;
  else
    v = ldexp((double)(mant | 0x400), exp - 25);
  return (float)(sign ? -v : v);
}

uint16_t cm_f64_to_f16(double d) {
  if (isnan(d)) return signbit(d) ? 0xfe00u : 0x7e00u;
  double r = round_to_format(d, 11, -14, 65504.0);
  uint16_t sign = signbit(r) ? 0x8000u : 0;
  double a = fabs(r);
  if (isinf(a)) return sign | 0x7c00u;
  if (a == 0) return sign;
  if (a < ldexp(1.0, -14)) return sign | (uint16_t)(a / ldexp(1.0, -24)); /* subnormal */
  int e;
  double m = frexp(a, &e); /* a = m*2^e, m in [0.5,1) */
  uint16_t exp = (uint16_t)(e - 1 + 15);
  uint16_t mant = (uint16_t)((m * 2 - 1) * 1024);
  return sign | (uint16_t)(exp << 10) | mant;
}

double cm_round_to_dtype(double x, cm_dtype dt) {
  switch (dt) {
  case CM_F32: return (double)(float)x;
  case CM_F64: return x;
  case CM_BF16: return round_to_format(x, 8, -126, 3.38953138925153547590470800371487866880e+38);
  case CM_F16: return round_to_format(x, 11, -14, 65504.0);
  case CM_I32:
  case CM_I64: {
    if (isnan(x)) return 0;
    double lo = dt == CM_I32 ? -2147483648.0 : -9223372036854775808.0;
    double hi = dt == CM_I32 ? 2147483647.0 : 9223372036854775807.0;
    double t = trunc(x);
    return t < lo ? lo : t > hi ? hi : t;
  }
  case CM_BOOL: return x != 0;
  default: return x;
  }
}

/* Shortest of %.15g, %.16g, %.17g that reads back as x ("nan", "inf" as such). */
static void shortest(double x, char *buf, size_t size) {
  if (isnan(x)) {
    snprintf(buf, size, "nan");
    return;
  }
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, size, "%.*g", prec, x);
    if (prec == 17 || strtod(buf, NULL) == x) return;
  }
}

bool cm_value_fits(double x, cm_dtype dt, char *why, size_t size) {
  bool ok;
  const char *range;
  switch (dt) {
  case CM_I32:
    ok = x == trunc(x) && x >= -2147483648.0 && x <= 2147483647.0;
    range = "an integer in [-2147483648, 2147483647]";
    break;
  case CM_I64: /* 2^63 is the first double past INT64_MAX */
    ok = x == trunc(x) && x >= -9223372036854775808.0 && x < 9223372036854775808.0;
    range = "an integer in [-2^63, 2^63)";
    break;
  case CM_BOOL:
    ok = x == 0 || x == 1;
    range = "0 or 1";
    break;
  default: return true; /* floats take any double, rounded to the dtype */
  }
  if (!ok && why && size) {
    char v[40];
    shortest(x, v, sizeof v);
    snprintf(why, size, "%s is outside %s (%s)", v, cm_dtype_name(dt), range);
  }
  return ok;
}

/* ---- tensors ----------------------------------------------------------- */

cm_status cm_tensor_alloc(cm_tensor *t, cm_type type, cm_err *err) {
  t->type = type;
  size_t n = cm_type_nbytes(&type);
  t->data = calloc(n ? n : 1, 1);
  if (!t->data) return cm_errorf(err, CM_EINTERNAL, "out of memory allocating %zu bytes", n);
  return CM_OK;
}

void cm_tensor_free(cm_tensor *t) {
  if (!t) return;
  free(t->data);
  t->data = NULL;
}

cm_status cm_tensor_copy(cm_tensor *dst, const cm_tensor *src, cm_err *err) {
  cm_status st = cm_tensor_alloc(dst, src->type, err);
  if (st) return st;
  size_t n = cm_type_nbytes(&src->type);
  if (n) memcpy(dst->data, src->data, n);
  return CM_OK;
}

double cm_tensor_get_f64(const cm_tensor *t, int64_t i) {
  switch (t->type.dtype) {
  case CM_F32: return ((const float *)t->data)[i];
  case CM_F64: return ((const double *)t->data)[i];
  case CM_BF16: return cm_bf16_to_f32(((const uint16_t *)t->data)[i]);
  case CM_F16: return cm_f16_to_f32(((const uint16_t *)t->data)[i]);
  case CM_I32: return ((const int32_t *)t->data)[i];
  case CM_I64: return (double)((const int64_t *)t->data)[i];
  case CM_BOOL: return ((const uint8_t *)t->data)[i] != 0;
  default: return 0;
  }
}

void cm_tensor_set_f64(cm_tensor *t, int64_t i, double v) {
  switch (t->type.dtype) {
  case CM_F32: ((float *)t->data)[i] = (float)v; break;
  case CM_F64: ((double *)t->data)[i] = v; break;
  case CM_BF16: ((uint16_t *)t->data)[i] = cm_f64_to_bf16(v); break;
  case CM_F16: ((uint16_t *)t->data)[i] = cm_f64_to_f16(v); break;
  case CM_I32: ((int32_t *)t->data)[i] = (int32_t)cm_round_to_dtype(v, CM_I32); break;
  case CM_I64: {
    double r = cm_round_to_dtype(v, CM_I64);
    /* 2^63 itself is out of range for int64: saturate explicitly. */
    ((int64_t *)t->data)[i] = r >= 9223372036854775807.0 ? INT64_MAX : (int64_t)r;
    break;
  }
  case CM_BOOL: ((uint8_t *)t->data)[i] = v != 0; break;
  default: break;
  }
}

int64_t cm_tensor_get_i64(const cm_tensor *t, int64_t i) {
  switch (t->type.dtype) {
  case CM_I32: return ((const int32_t *)t->data)[i];
  case CM_I64: return ((const int64_t *)t->data)[i];
  case CM_BOOL: return ((const uint8_t *)t->data)[i] != 0;
  default: {
    double v = cm_round_to_dtype(cm_tensor_get_f64(t, i), CM_I64);
    return v >= 9223372036854775807.0 ? INT64_MAX : (int64_t)v;
  }
  }
}

void cm_tensor_set_i64(cm_tensor *t, int64_t i, int64_t v) {
  switch (t->type.dtype) {
  case CM_I32: ((int32_t *)t->data)[i] = (int32_t)(uint32_t)(uint64_t)v; break; /* wraps */
  case CM_I64: ((int64_t *)t->data)[i] = v; break;
  case CM_BOOL: ((uint8_t *)t->data)[i] = v != 0; break;
  default: cm_tensor_set_f64(t, i, (double)v); break;
  }
}
