/* ir/random.c — the counter-based generator (Philox-4x32-10), string hashing
 * for stream ids, and parameter initialization.
 *
 * Element i of a tensor named `name` under seed s is drawn from
 * philox(key = s, counter_hi = cm_hash_str(name), counter_lo = i), so any
 * element can be computed on its own, in any order, on any thread. Integer
 * bits are identical everywhere; normal draws go through libm log/cos/sin,
 * which well-behaved libms round the same way but C does not promise. */
#include "ir.h"

#include <math.h>
#include <string.h>

/* Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as
 * 1, 2, 3", SC'11): round multipliers and the Weyl sequence that bumps the key. */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define PHILOX_ROUNDS 10

static void philox_round(uint32_t c[4], const uint32_t k[2]) {
  uint64_t p0 = (uint64_t)PHILOX_M0 * c[0];
  uint64_t p1 = (uint64_t)PHILOX_M1 * c[2];
  uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
  uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
  uint32_t n0 = hi1 ^ c[1] ^ k[0];
  uint32_t n2 = hi0 ^ c[3] ^ k[1];
  c[0] = n0;
  c[1] = lo1;
  c[2] = n2;
  c[3] = lo0;
}

void cm_philox(uint64_t key, uint64_t counter_hi, uint64_t counter_lo, uint32_t out[4]) {
  uint32_t k[2] = {(uint32_t)key, (uint32_t)(key >> 32)};
  uint32_t c[4] = {(uint32_t)counter_lo, (uint32_t)(counter_lo >> 32), (uint32_t)counter_hi,
                   (uint32_t)(counter_hi >> 32)};
  for (int r = 0; r < PHILOX_ROUNDS; r++) {
    if (r > 0) {
      k[0] += PHILOX_W0;
      k[1] += PHILOX_W1;
    }
    philox_round(c, k);
  }
  for (int i = 0; i < 4; i++) out[i] = c[i];
}

uint64_t cm_hash_str(const char *s) {
  uint64_t h = 0xcbf29ce484222325u; /* FNV-1a 64 offset basis */
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    h ^= *p;
    h *= 0x100000001b3u; /* FNV-1a 64 prime */
  }
  return h;
}

/* The top 24 bits: every value is exact in f32, so rounding an f32 draw never
 * lands on 1.0. */
double cm_uniform01(uint32_t bits) {
  return (double)(bits >> 8) * (1.0 / 16777216.0);
}

/* ---- init kinds -------------------------------------------------------- */

static const char *const init_kind_names[CM_INIT_KIND_COUNT] = {
    [CM_INIT_NONE] = "none",
    [CM_INIT_ZEROS] = "zeros",
    [CM_INIT_ONES] = "ones",
    [CM_INIT_CONSTANT] = "constant",
    [CM_INIT_NORMAL] = "normal",
    [CM_INIT_TRUNC_NORMAL] = "trunc_normal",
    [CM_INIT_UNIFORM] = "uniform",
    [CM_INIT_XAVIER_UNIFORM] = "xavier_uniform",
    [CM_INIT_TORCH_DEFAULT] = "torch_default",
    [CM_INIT_SINCOS_2D] = "sincos_2d",
};

const char *cm_init_kind_name(cm_init_kind k) {
  if ((unsigned)k >= CM_INIT_KIND_COUNT) return "invalid";
  return init_kind_names[k];
}

bool cm_init_kind_from_name(const char *name, cm_init_kind *out) {
  if (!name) return false;
  for (int k = 0; k < CM_INIT_KIND_COUNT; k++)
    if (strcmp(name, init_kind_names[k]) == 0) {
      if (out) *out = (cm_init_kind)k;
      return true;
    }
  return false;
}

/* ---- initialization ---------------------------------------------------- */

/* Box–Muller on two words. u1 is in (0, 1], so log never sees 0; the smallest
 * u1 (2^-32) caps |z| at about 6.7. */
static void box_muller(uint32_t w0, uint32_t w1, double z[2]) {
  double u1 = ((double)w0 + 1.0) * (1.0 / 4294967296.0);
  double u2 = (double)w1 * (1.0 / 4294967296.0);
  double r = sqrt(-2.0 * log(u1));
  double theta = 6.283185307179586 * u2; /* 2 pi */
  z[0] = r * cos(theta);
  z[1] = r * sin(theta);
}

/* Retry k of element i uses counter_lo = i + k * 2^40: i < CM_MAX_ELEMENTS =
 * 2^40, so retries never collide with another element's counter. */
#define TRUNC_RETRY_SHIFT 40
#define TRUNC_MAX_TRIES 64 /* each try offers 4 candidates; P(all fail) ~ 0.046^256 */

static double standard_normal(uint64_t seed, uint64_t stream, int64_t i) {
  uint32_t w[4];
  cm_philox(seed, stream, (uint64_t)i, w);
  double z[2];
  box_muller(w[0], w[1], z);
  return z[0];
}

/* The first of the candidates z(w0,w1) cos, sin, z(w2,w3) cos, sin of tries
 * 0, 1, ... inside [-2, 2]; try 0's first candidate is the plain normal draw, so
 * trunc_normal agrees with normal wherever normal is in range. */
static double truncated_standard_normal(uint64_t seed, uint64_t stream, int64_t i) {
  for (uint64_t k = 0; k < TRUNC_MAX_TRIES; k++) {
    uint32_t w[4];
    cm_philox(seed, stream, (uint64_t)i + (k << TRUNC_RETRY_SHIFT), w);
    double z[4];
    box_muller(w[0], w[1], z);
    box_muller(w[2], w[3], z + 2);
    for (int c = 0; c < 4; c++)
      if (fabs(z[c]) <= 2.0) return z[c];
  }
  return 0.0; /* unreachable in practice; kept deterministic */
}

static double uniform_draw(uint64_t seed, uint64_t stream, int64_t i, double low, double high) {
  uint32_t w[4];
  cm_philox(seed, stream, (uint64_t)i, w);
  return low + (high - low) * cm_uniform01(w[0]);
}

/* Product of dims 2.. (the receptive field of a conv kernel; 1 for a matrix). */
static double receptive_field(const cm_type *t) {
  double r = 1.0;
  for (int d = 2; d < t->rank; d++) r *= (double)t->dims[d];
  return r;
}

/* The sin-cos grid of a [..., rows, D] tensor: cls leading rows, then a
 * side x side grid; false when the shape does not fit (cm_init_check says why). */
static bool sincos_layout(const cm_type *type, double a, int64_t *cls_out, int64_t *side_out) {
  if (!cm_dtype_is_float(type->dtype) || type->rank < 2) return false;
  int64_t d = type->dims[type->rank - 1], rows = type->dims[type->rank - 2];
  int64_t cls = a >= 0 && a <= (double)rows ? (int64_t)a : -1, side = 0;
  while (cls >= 0 && (side + 1) * (side + 1) <= rows - cls) side++;
  if (cls < 0 || a != (double)cls || side * side != rows - cls || d % 4) return false;
  *cls_out = cls;
  *side_out = side;
  return true;
}

/* CMAE's fixed 2-D sin-cos embedding: for grid position t = (a, b) on a
 * side x side grid, with D4 = D/4 and w_k = 1/10000^(k/D4):
 * [sin(a w), cos(a w), sin(b w), cos(b w)]; the first `cls` rows are zero. */
static void init_sincos_2d(cm_tensor *t, int64_t cls, int64_t side) {
  const cm_type *type = &t->type;
  int64_t d = type->dims[type->rank - 1], rows = type->dims[type->rank - 2];
  int64_t d4 = d / 4, n = cm_type_numel(type);
  for (int64_t i = 0; i < n; i++) {
    int64_t row = (i / d) % rows, col = i % d;
    double v = 0;
    if (row >= cls) {
      int64_t pos = row - cls, part = col / d4, k = col % d4;
      double omega = 1.0 / pow(10000.0, (double)k / (double)d4);
      double coord = (double)(part < 2 ? pos / side : pos % side);
      v = part % 2 == 0 ? sin(coord * omega) : cos(coord * omega);
    }
    cm_tensor_set_f64(t, i, v);
  }
}

/* Uniform bounds of xavier_uniform and torch_default from the shape. */
static cm_status fan_bounds(const cm_init *init, const cm_type *type, const char *tbuf, double *low,
                            double *high, cm_err *err) {
  if (init->kind == CM_INIT_XAVIER_UNIFORM) {
    if (type->rank < 2)
      return cm_errorf(err, CM_EINVALID,
                       "init xavier_uniform needs rank >= 2 (fan_in and fan_out), got %s", tbuf);
    double r = receptive_field(type);
    double fan_in = (double)type->dims[1] * r, fan_out = (double)type->dims[0] * r;
    if (init->b != 0) fan_out = (double)type->dims[0]; /* the 2-D view [dims[0], dims[1] * r] */
    if (fan_in + fan_out <= 0)
      return cm_errorf(err, CM_EINVALID, "init xavier_uniform: zero fans for %s", tbuf);
    *high = fabs(init->a) * sqrt(6.0 / (fan_in + fan_out));
    *low = -*high;
    return CM_OK;
  }
  double fan_in; /* CM_INIT_TORCH_DEFAULT */
  if (init->a > 0) {
    fan_in = init->a;
  } else if (type->rank >= 2) {
    fan_in = (double)type->dims[1] * receptive_field(type);
  } else {
    return cm_errorf(
        err, CM_EINVALID,
        "init torch_default on %s needs fan_in (the weight's, as init attribute a) > 0", tbuf);
  }
  if (fan_in <= 0)
    return cm_errorf(err, CM_EINVALID, "init torch_default: zero fan_in for %s", tbuf);
  *high = 1.0 / sqrt(fan_in);
  *low = -*high;
  return CM_OK;
}

cm_status cm_init_check(const cm_init *init, const cm_type *type, cm_err *err) {
  char tbuf[96];
  cm_type_str(type, tbuf, sizeof tbuf);
  const char *kind = cm_init_kind_name(init->kind);
  switch (init->kind) {
  case CM_INIT_NONE:
  case CM_INIT_ZEROS:
  case CM_INIT_ONES: return CM_OK;
  case CM_INIT_CONSTANT: {
    char why[160];
    if (!cm_value_fits(init->a, type->dtype, why, sizeof why))
      return cm_errorf(err, CM_EINVALID, "init constant: value %s", why);
    return CM_OK;
  }
  case CM_INIT_SINCOS_2D: {
    int64_t cls, side;
    if (!cm_dtype_is_float(type->dtype) || type->rank < 2)
      return cm_errorf(err, CM_EINVALID, "init sincos_2d needs a float [..., rows, D], got %s",
                       tbuf);
    if (!sincos_layout(type, init->a, &cls, &side))
      return cm_errorf(err, CM_EINVALID,
                       "init sincos_2d: %s needs rows = cls (%g) + a square grid and D %% 4 == 0",
                       tbuf, init->a);
    return CM_OK;
  }
  case CM_INIT_NORMAL:
  case CM_INIT_TRUNC_NORMAL:
  case CM_INIT_UNIFORM:
  case CM_INIT_XAVIER_UNIFORM:
  case CM_INIT_TORCH_DEFAULT: break;
  default: return cm_errorf(err, CM_EINVALID, "unknown init kind %d", (int)init->kind);
  }
  /* Random kinds only. */
  if (!cm_dtype_is_float(type->dtype))
    return cm_errorf(err, CM_EINVALID, "init %s needs a float dtype, got %s", kind, tbuf);
  if (!isfinite(init->a) || !isfinite(init->b))
    return cm_errorf(err, CM_EINVALID, "init %s: parameters must be finite, got %g, %g", kind,
                     init->a, init->b);
  if ((init->kind == CM_INIT_NORMAL || init->kind == CM_INIT_TRUNC_NORMAL) && init->b < 0)
    return cm_errorf(err, CM_EINVALID, "init %s: std must be >= 0, got %g", kind, init->b);
  if (init->kind == CM_INIT_UNIFORM && init->a > init->b)
    return cm_errorf(err, CM_EINVALID, "init uniform: low %g > high %g", init->a, init->b);
  double low, high;
  if (init->kind == CM_INIT_XAVIER_UNIFORM || init->kind == CM_INIT_TORCH_DEFAULT)
    return fan_bounds(init, type, tbuf, &low, &high, err);
  return CM_OK;
}

cm_status cm_init_tensor(cm_tensor *t, const cm_init *init, uint64_t seed, const char *name,
                         cm_err *err) {
  const char *shown = name ? name : "";
  if (!t || !init) return cm_errorf(err, CM_EINTERNAL, "\"%s\": no tensor or init given", shown);
  const cm_type *type = &t->type;
  char tbuf[96];
  cm_type_str(type, tbuf, sizeof tbuf);
  const char *kind = cm_init_kind_name(init->kind);
  if ((unsigned)type->dtype >= CM_DTYPE_COUNT || type->rank < 0 || type->rank > CM_MAX_RANK)
    return cm_errorf(err, CM_EINVALID, "\"%s\": init %s: invalid tensor type", shown, kind);
  int64_t n = cm_type_numel(type);
  if (n < 0 || n > CM_MAX_ELEMENTS)
    return cm_errorf(err, CM_EINVALID, "\"%s\": init %s: invalid element count for %s", shown, kind,
                     tbuf);
  if (n > 0 && !t->data)
    return cm_errorf(err, CM_EINTERNAL, "\"%s\": init %s: tensor %s has no data", shown, kind,
                     tbuf);
  if (init->kind == CM_INIT_NONE)
    return cm_errorf(err, CM_EINVALID, "\"%s\": init none: the tensor must be supplied", shown);
  /* the rule the builder and the verifier apply to the node */
  if (cm_init_check(init, type, err)) return cm_err_prefix(err, "\"%s\": ", shown);

  switch (init->kind) {
  case CM_INIT_ZEROS:
  case CM_INIT_ONES:
  case CM_INIT_CONSTANT: {
    double v = init->kind == CM_INIT_ZEROS ? 0.0 : init->kind == CM_INIT_ONES ? 1.0 : init->a;
    for (int64_t i = 0; i < n; i++) cm_tensor_set_f64(t, i, v);
    return CM_OK;
  }
  case CM_INIT_SINCOS_2D: {
    int64_t cls = 0, side = 0;
    sincos_layout(type, init->a, &cls, &side);
    init_sincos_2d(t, cls, side);
    return CM_OK;
  }
  default: break;
  }

  /* Random kinds. */
  uint64_t stream = cm_hash_str(shown);
  if (init->kind == CM_INIT_NORMAL || init->kind == CM_INIT_TRUNC_NORMAL) {
    double mean = init->a, std = init->b;
    for (int64_t i = 0; i < n; i++) {
      double z = init->kind == CM_INIT_NORMAL ? standard_normal(seed, stream, i)
                                              : truncated_standard_normal(seed, stream, i);
      cm_tensor_set_f64(t, i, mean + std * z);
    }
    return CM_OK;
  }
  double low = init->a, high = init->b; /* CM_INIT_UNIFORM */
  if (init->kind != CM_INIT_UNIFORM && fan_bounds(init, type, tbuf, &low, &high, err))
    return cm_err_prefix(err, "\"%s\": ", shown);
  for (int64_t i = 0; i < n; i++) cm_tensor_set_f64(t, i, uniform_draw(seed, stream, i, low, high));
  return CM_OK;
}
