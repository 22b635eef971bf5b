/* ir/eval.c — the reference evaluator (the oracle): defines what every op
 * computes (docs/ops.md), with naive element-by-element loops over row-major
 * indices. Speed is no goal; being obviously right is.
 *
 * Numbers: floats are computed in double and rounded once to the node's dtype
 * when stored (CM_PRECISION_NATIVE), or kept in double (CM_PRECISION_F64).
 * Ints are computed in int64/uint64 so that large i64 values never pass through
 * double; add/sub/mul wrap, integer division truncates, x/0 is 0 and
 * INT_MIN/-1 wraps to INT_MIN, so no input triggers undefined behaviour.
 * Sums (reduce_sum, matmul, conv, scatter_add) accumulate in double (floats) or
 * wrap in uint64 (ints) and round once at the end. */
#include "ir.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

typedef struct eval_ctx {
  const cm_graph *g;
  const cm_tensor *const *sources;
  cm_tensor *values;
  cm_precision precision;
  cm_tensor *bounds; /* NULL, or n_nodes forward error bounds (F64 precision) */
  cm_err *err;
  const struct eval_ctx *group; /* cm_eval_ranks: every rank's context, in rank order */
  int n_ranks;                  /* 0 under cm_eval */
} eval_ctx;

/* ---- errors ------------------------------------------------------------ */

/* Fails with "nodes[id] \"name\" (op): <rule>". */
__attribute__((format(printf, 4, 5))) static cm_status
node_fail(const eval_ctx *c, int id, cm_status st, const char *fmt, ...) {
  char rule[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(rule, sizeof rule, fmt, ap);
  va_end(ap);
  const cm_node *n = &c->g->nodes[id];
  return cm_errorf(c->err, st, "nodes[%d] \"%s\" (%s): %s", id, n->name ? n->name : "",
                   cm_op_name(n->op), rule);
}

/* ---- element access with the cast rules of docs/ops.md ---------------- */

static bool is_int(cm_dtype dt) {
  return dt == CM_I32 || dt == CM_I64;
}

/* Two's-complement wrap of the low bits to dt's width, without relying on
 * implementation-defined unsigned-to-signed conversion. */
static int64_t wrap_int(uint64_t u, cm_dtype dt) {
  if (dt == CM_I32) {
    uint32_t w = (uint32_t)u;
    return w >= UINT32_C(0x80000000) ? (int64_t)w - INT64_C(0x100000000) : (int64_t)w;
  }
  if (u >= UINT64_C(1) << 63) return -(int64_t)(~u) - 1;
  return (int64_t)u;
}

/* float -> int: truncate toward zero, NaN -> 0, saturate out of range. */
static int64_t float_to_int(double x, cm_dtype dt) {
  if (isnan(x)) return 0;
  double t = trunc(x);
  if (dt == CM_I32) {
    if (t >= 2147483647.0) return INT32_MAX;
    if (t <= -2147483648.0) return INT32_MIN;
    return (int64_t)t;
  }
  if (t >= 9223372036854775808.0) return INT64_MAX;
  if (t <= -9223372036854775808.0) return INT64_MIN;
  return (int64_t)t;
}

static int significand_bits(cm_dtype dt) {
  switch (dt) {
  case CM_F32: return 24;
  case CM_BF16: return 8;
  case CM_F16: return 11;
  default: return 53;
  }
}

/* int -> float dt, rounded once (ties to even) in integer arithmetic: going
 * through double first would round twice for i64 values above 2^53. The result
 * has at most significand_bits(dt) bits, so storing it into dt is exact. */
static double int_to_float(int64_t v, cm_dtype dt) {
  uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
  int p = significand_bits(dt), bits = 0;
  for (uint64_t m = mag; m; m >>= 1) bits++;
  if (bits <= p) return (double)v;
  int shift = bits - p;
  uint64_t q = mag >> shift;
  uint64_t rem = mag & ((UINT64_C(1) << shift) - 1), half = UINT64_C(1) << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) q++;
  double r = ldexp((double)q, shift);
  return v < 0 ? -r : r;
}

/* Reads an element as a double (ints converted, bool 0/1). */
static double get_real(const cm_tensor *t, int64_t i) {
  if (is_int(t->type.dtype)) return (double)cm_tensor_get_i64(t, i);
  return cm_tensor_get_f64(t, i);
}

/* Writes a real number into any dtype with the cast rules. */
static void put_real(cm_tensor *t, int64_t i, double v) {
  cm_dtype dt = t->type.dtype;
  if (is_int(dt))
    cm_tensor_set_i64(t, i, float_to_int(v, dt));
  else if (dt == CM_BOOL)
    cm_tensor_set_f64(t, i, v != 0 ? 1.0 : 0.0);
  else
    cm_tensor_set_f64(t, i, v);
}

/* Writes an integer into any dtype with the cast rules (ints wrap). */
static void put_int(cm_tensor *t, int64_t i, int64_t v) {
  cm_dtype dt = t->type.dtype;
  if (is_int(dt))
    cm_tensor_set_i64(t, i, wrap_int((uint64_t)v, dt));
  else if (dt == CM_BOOL)
    cm_tensor_set_f64(t, i, v != 0 ? 1.0 : 0.0);
  else
    cm_tensor_set_f64(t, i, int_to_float(v, dt));
}

/* dst[di] = src[si] converted to dst's dtype: the cast op, and every copy. */
static void copy_elem(cm_tensor *dst, int64_t di, const cm_tensor *src, int64_t si) {
  if (is_int(src->type.dtype))
    put_int(dst, di, cm_tensor_get_i64(src, si));
  else
    put_real(dst, di, cm_tensor_get_f64(src, si));
}

/* ---- index helpers ----------------------------------------------------- */

static void unravel(int64_t idx, const cm_type *t, int64_t coords[CM_MAX_RANK]) {
  for (int k = t->rank - 1; k >= 0; k--) {
    coords[k] = idx % t->dims[k];
    idx /= t->dims[k];
  }
}

static int64_t ravel(const int64_t coords[CM_MAX_RANK], const cm_type *t) {
  int64_t strides[CM_MAX_RANK], idx = 0;
  cm_type_strides(t, strides);
  for (int k = 0; k < t->rank; k++) idx += coords[k] * strides[k];
  return idx;
}

static int normalize_axis(int axis, int rank) {
  return axis < 0 ? axis + rank : axis;
}

static const cm_tensor *input_value(const eval_ctx *c, int id, int k) {
  return &c->values[c->g->nodes[id].inputs[k]];
}

/* ---- sources ----------------------------------------------------------- */

static cm_status eval_fed(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *s = c->sources ? c->sources[id] : NULL;
  if (!s || !s->data) return node_fail(c, id, CM_EINVALID, "no value given");
  bool dtype_ok = s->type.dtype == n->type.dtype;
  /* F64 precision takes any float dtype for a float node (converted below). */
  if (c->precision == CM_PRECISION_F64 && cm_dtype_is_float(n->type.dtype))
    dtype_ok = cm_dtype_is_float(s->type.dtype);
  if (!dtype_ok || !cm_shape_equal(&s->type, &n->type)) {
    char given[128], want[128];
    return node_fail(c, id, CM_EINVALID, "given %s but the node is %s",
                     cm_type_str(&s->type, given, sizeof given),
                     cm_type_str(&n->type, want, sizeof want));
  }
  int64_t numel = cm_type_numel(&n->type);
  for (int64_t i = 0; i < numel; i++) copy_elem(out, i, s, i);
  return CM_OK;
}

static cm_status eval_const(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  int64_t numel = cm_type_numel(&n->type);
  if (n->attrs.data && n->attrs.n_data != numel)
    return node_fail(c, id, CM_EINVALID, "data has %lld elements, the shape needs %lld",
                     (long long)n->attrs.n_data, (long long)numel);
  for (int64_t i = 0; i < numel; i++)
    put_real(out, i, n->attrs.data ? n->attrs.data[i] : n->attrs.value);
  return CM_OK;
}

static cm_status eval_iota(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  int axis = normalize_axis(n->attrs.axis, n->type.rank);
  int64_t numel = cm_type_numel(&n->type), coords[CM_MAX_RANK];
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &n->type, coords);
    put_int(out, i, n->type.rank ? coords[axis] : 0);
  }
  return CM_OK;
}

/* ---- elementwise ------------------------------------------------------- */

static double unary_real(cm_op op, double x) {
  switch (op) {
  case CM_OP_NEG: return -x;
  case CM_OP_ABS: return fabs(x);
  case CM_OP_EXP: return exp(x);
  case CM_OP_LOG: return log(x);
  case CM_OP_SQRT: return sqrt(x);
  case CM_OP_RSQRT: return 1.0 / sqrt(x);
  case CM_OP_RECIP: return 1.0 / x;
  case CM_OP_TANH: return tanh(x);
  case CM_OP_ERF: return erf(x);
  case CM_OP_RELU: return isnan(x) ? x : x > 0 ? x : 0.0;
  default: return x;
  }
}

static int64_t unary_int(cm_op op, int64_t x, cm_dtype dt) {
  uint64_t negated = (uint64_t)0 - (uint64_t)x;
  switch (op) {
  case CM_OP_NEG: return wrap_int(negated, dt);
  case CM_OP_ABS: return x < 0 ? wrap_int(negated, dt) : x;
  case CM_OP_RELU: return x > 0 ? x : 0;
  default: return x;
  }
}

static cm_status eval_unary(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *x = input_value(c, id, 0);
  int64_t numel = cm_type_numel(&n->type);
  bool int_path = is_int(out->type.dtype) && is_int(x->type.dtype);
  for (int64_t i = 0; i < numel; i++) {
    if (n->op == CM_OP_CAST || n->op == CM_OP_STOP_GRADIENT)
      copy_elem(out, i, x, i);
    else if (int_path)
      put_int(out, i, unary_int(n->op, cm_tensor_get_i64(x, i), x->type.dtype));
    else
      put_real(out, i, unary_real(n->op, get_real(x, i)));
  }
  return CM_OK;
}

static double binary_real(cm_op op, double a, double b) {
  switch (op) {
  case CM_OP_ADD: return a + b;
  case CM_OP_SUB: return a - b;
  case CM_OP_MUL: return a * b;
  case CM_OP_DIV: return a / b;
  case CM_OP_MAX: return isnan(a) || isnan(b) ? NAN : a > b ? a : b;
  case CM_OP_MIN: return isnan(a) || isnan(b) ? NAN : a < b ? a : b;
  case CM_OP_POW: return pow(a, b);
  default: return NAN;
  }
}

static int64_t binary_int(cm_op op, int64_t a, int64_t b, cm_dtype dt) {
  switch (op) {
  case CM_OP_ADD: return wrap_int((uint64_t)a + (uint64_t)b, dt);
  case CM_OP_SUB: return wrap_int((uint64_t)a - (uint64_t)b, dt);
  case CM_OP_MUL: return wrap_int((uint64_t)a * (uint64_t)b, dt);
  case CM_OP_DIV:
    if (b == 0) return 0;
    if (a == INT64_MIN && b == -1) return INT64_MIN; /* the one overflowing quotient */
    return wrap_int((uint64_t)(a / b), dt);
  case CM_OP_MAX: return a > b ? a : b;
  case CM_OP_MIN: return a < b ? a : b;
  default: return float_to_int(binary_real(op, (double)a, (double)b), dt);
  }
}

static bool compare_op(cm_op op) {
  return op == CM_OP_LT || op == CM_OP_LE || op == CM_OP_EQ || op == CM_OP_NE;
}

/* Ints compare as ints (exact beyond 2^53); NaN compares unequal to all. */
static bool compare(cm_op op, const cm_tensor *a, const cm_tensor *b, int64_t i) {
  if (is_int(a->type.dtype) && is_int(b->type.dtype)) {
    int64_t x = cm_tensor_get_i64(a, i), y = cm_tensor_get_i64(b, i);
    return op == CM_OP_LT ? x < y : op == CM_OP_LE ? x <= y : op == CM_OP_EQ ? x == y : x != y;
  }
  double x = get_real(a, i), y = get_real(b, i);
  return op == CM_OP_LT ? x < y : op == CM_OP_LE ? x <= y : op == CM_OP_EQ ? x == y : x != y;
}

static cm_status eval_binary(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *a = input_value(c, id, 0), *b = input_value(c, id, 1);
  int64_t numel = cm_type_numel(&n->type);
  cm_dtype dt = out->type.dtype;
  bool int_path = is_int(a->type.dtype) && is_int(b->type.dtype) && is_int(dt);
  for (int64_t i = 0; i < numel; i++) {
    if (compare_op(n->op))
      put_int(out, i, compare(n->op, a, b, i));
    else if (int_path)
      put_int(out, i, binary_int(n->op, cm_tensor_get_i64(a, i), cm_tensor_get_i64(b, i), dt));
    else
      put_real(out, i, binary_real(n->op, get_real(a, i), get_real(b, i)));
  }
  return CM_OK;
}

static cm_status eval_select(eval_ctx *c, int id) {
  cm_tensor *out = &c->values[id];
  const cm_tensor *cond = input_value(c, id, 0);
  const cm_tensor *a = input_value(c, id, 1), *b = input_value(c, id, 2);
  int64_t numel = cm_type_numel(&out->type);
  for (int64_t i = 0; i < numel; i++) copy_elem(out, i, get_real(cond, i) != 0 ? a : b, i);
  return CM_OK;
}

/* ---- reductions -------------------------------------------------------- */

typedef struct accum {
  double real;
  uint64_t sum; /* ints: wrapping sum */
  int64_t max;  /* ints */
  bool seen;
} accum;

static cm_status eval_reduce(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *x = input_value(c, id, 0);
  int rank = x->type.rank;
  bool reduced[CM_MAX_RANK] = {false};
  for (int k = 0; k < n->attrs.n_axes && k < CM_MAX_RANK; k++) {
    int a = normalize_axis(n->attrs.axes[k], rank);
    if (a >= 0 && a < rank) reduced[a] = true;
  }
  /* Input axis -> stride in the output (0 for a reduced axis). */
  int64_t out_strides[CM_MAX_RANK], map[CM_MAX_RANK];
  cm_type_strides(&out->type, out_strides);
  for (int a = 0, oa = 0; a < rank; a++) {
    map[a] = reduced[a] ? 0 : out_strides[oa];
    if (!reduced[a] || n->attrs.keepdims) oa++;
  }
  int64_t out_numel = cm_type_numel(&out->type), numel = cm_type_numel(&x->type);
  accum *acc = calloc((size_t)out_numel, sizeof *acc);
  if (!acc) return node_fail(c, id, CM_EINTERNAL, "out of memory");
  bool ints = is_int(x->type.dtype), is_max = n->op == CM_OP_REDUCE_MAX;
  int64_t coords[CM_MAX_RANK];
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &x->type, coords);
    int64_t o = 0;
    for (int a = 0; a < rank; a++) o += coords[a] * map[a];
    accum *r = &acc[o];
    if (ints) {
      int64_t v = cm_tensor_get_i64(x, i);
      r->sum += (uint64_t)v;
      if (!r->seen || v > r->max) r->max = v;
    } else {
      double v = cm_tensor_get_f64(x, i);
      if (!is_max)
        r->real += v;
      else if (!r->seen || isnan(v) || (!isnan(r->real) && v > r->real))
        r->real = v;
    }
    r->seen = true;
  }
  for (int64_t o = 0; o < out_numel; o++) {
    if (ints)
      put_int(out, o, is_max ? acc[o].max : wrap_int(acc[o].sum, CM_I64));
    else
      put_real(out, o, acc[o].real);
  }
  free(acc);
  return CM_OK;
}

/* ---- movement ---------------------------------------------------------- */

/* Every movement op is "out[i] = x[source index of i]" or a fill value. */
static cm_status eval_movement(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  const cm_attrs *at = &n->attrs;
  cm_tensor *out = &c->values[id];
  const cm_tensor *x = input_value(c, id, 0);
  int64_t numel = cm_type_numel(&out->type), coords[CM_MAX_RANK], src[CM_MAX_RANK];
  int rank = out->type.rank, xrank = x->type.rank;
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &out->type, coords);
    bool inside = true;
    switch (n->op) {
    case CM_OP_PERMUTE:
      for (int k = 0; k < rank; k++) src[at->perm[k]] = coords[k];
      break;
    case CM_OP_BROADCAST:
      for (int k = 0; k < xrank; k++) {
        int64_t oc = coords[k + rank - xrank];
        src[k] = x->type.dims[k] == 1 ? 0 : oc;
      }
      break;
    case CM_OP_SLICE:
      for (int k = 0; k < rank; k++) src[k] = at->start[k] + coords[k] * at->step[k];
      break;
    case CM_OP_PAD:
      for (int k = 0; k < rank; k++) {
        src[k] = coords[k] - at->lo[k];
        if (src[k] < 0 || src[k] >= x->type.dims[k]) inside = false;
      }
      break;
    default: /* reshape: same row-major order */ copy_elem(out, i, x, i); continue;
    }
    if (inside)
      copy_elem(out, i, x, ravel(src, &x->type));
    else
      put_real(out, i, at->value);
  }
  return CM_OK;
}

static cm_status eval_concat(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  int axis = normalize_axis(n->attrs.axis, out->type.rank);
  int64_t numel = cm_type_numel(&out->type), coords[CM_MAX_RANK];
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &out->type, coords);
    /* Walk the inputs until the one holding this position along axis. */
    int k = 0;
    const cm_tensor *x = input_value(c, id, 0);
    while (coords[axis] >= x->type.dims[axis] && k + 1 < n->n_inputs) {
      coords[axis] -= x->type.dims[axis];
      x = input_value(c, id, ++k);
    }
    copy_elem(out, i, x, ravel(coords, &x->type));
  }
  return CM_OK;
}

cm_status cm_index_error(cm_err *err, const cm_graph *g, int id, int64_t index, int64_t pos,
                         int64_t dim) {
  const cm_node *n = &g->nodes[id];
  const cm_type *t = &g->nodes[n->inputs[1]].type;
  int64_t coords[CM_MAX_RANK];
  unravel(pos, t, coords);
  char where[160];
  size_t len = 0;
  where[len++] = '[';
  for (int k = 0; k < t->rank && len < sizeof where - 24; k++)
    len += (size_t)snprintf(where + len, sizeof where - len, "%s%lld", k ? "," : "",
                            (long long)coords[k]);
  snprintf(where + len, sizeof where - len, "]");
  return cm_errorf(err, CM_EINVALID, "nodes[%d] \"%s\" (%s): index %lld at %s outside [0, %lld)",
                   id, n->name ? n->name : "", cm_op_name(n->op), (long long)index, where,
                   (long long)dim);
}

/* The index of gather/scatter_add at flat position i, checked against [0, dim). */
static cm_status checked_index(eval_ctx *c, int id, const cm_tensor *index, int64_t i, int64_t dim,
                               int64_t *out) {
  int64_t v = cm_tensor_get_i64(index, i);
  *out = v >= 0 && v < dim ? v : 0;
  if (v >= 0 && v < dim) return CM_OK;
  return cm_index_error(c->err, c->g, id, v, i, dim);
}

static cm_status eval_gather(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *x = input_value(c, id, 0), *index = input_value(c, id, 1);
  int axis = normalize_axis(n->attrs.axis, x->type.rank);
  int64_t numel = cm_type_numel(&out->type), coords[CM_MAX_RANK];
  for (int64_t i = 0; i < numel; i++) {
    int64_t j;
    cm_status st = checked_index(c, id, index, i, x->type.dims[axis], &j);
    if (st) return st;
    unravel(i, &out->type, coords);
    coords[axis] = j;
    copy_elem(out, i, x, ravel(coords, &x->type));
  }
  return CM_OK;
}

static cm_status eval_scatter_add(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *base = input_value(c, id, 0), *index = input_value(c, id, 1);
  const cm_tensor *updates = input_value(c, id, 2);
  int axis = normalize_axis(n->attrs.axis, base->type.rank);
  int64_t out_numel = cm_type_numel(&out->type), numel = cm_type_numel(&index->type);
  accum *acc = calloc((size_t)out_numel, sizeof *acc);
  if (!acc) return node_fail(c, id, CM_EINTERNAL, "out of memory");
  bool ints = is_int(out->type.dtype);
  for (int64_t o = 0; o < out_numel; o++) {
    if (ints)
      acc[o].sum = (uint64_t)cm_tensor_get_i64(base, o);
    else
      acc[o].real = get_real(base, o);
  }
  int64_t coords[CM_MAX_RANK];
  for (int64_t i = 0; i < numel; i++) {
    int64_t j;
    cm_status st = checked_index(c, id, index, i, base->type.dims[axis], &j);
    if (st) {
      free(acc);
      return st;
    }
    unravel(i, &index->type, coords);
    coords[axis] = j;
    accum *r = &acc[ravel(coords, &base->type)];
    if (ints)
      r->sum += (uint64_t)cm_tensor_get_i64(updates, i);
    else
      r->real += get_real(updates, i);
  }
  for (int64_t o = 0; o < out_numel; o++) {
    if (ints)
      put_int(out, o, wrap_int(acc[o].sum, CM_I64));
    else
      put_real(out, o, acc[o].real);
  }
  free(acc);
  return CM_OK;
}

/* ---- contractions ------------------------------------------------------ */

/* Flat offset of the batch part of an operand for the output's batch coords
 * (numpy broadcasting: axes align right, size-1 axes repeat). */
static int64_t batch_offset(const cm_tensor *t, const int64_t *out_coords, int out_rank) {
  int64_t strides[CM_MAX_RANK], off = 0;
  cm_type_strides(&t->type, strides);
  for (int k = 0; k < t->type.rank - 2; k++) {
    int64_t oc = out_coords[k + out_rank - t->type.rank];
    off += (t->type.dims[k] == 1 ? 0 : oc) * strides[k];
  }
  return off;
}

/* The elements of an f64 tensor (every float value in F64 precision, every
 * bound), or NULL: the matmul loops read them directly, the same values in the
 * same order as get_real / cm_tensor_get_f64, several times faster. */
static const double *f64_elems(const cm_tensor *t) {
  return t->type.dtype == CM_F64 ? (const double *)t->data : NULL;
}

static bool all_zero(const double *p, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (p[i] != 0) return false;
  return true;
}

static cm_status eval_matmul(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *a = input_value(c, id, 0), *b = input_value(c, id, 1);
  int ra = a->type.rank, rb = b->type.rank, r = out->type.rank;
  bool ta = n->attrs.transpose_a, tb = n->attrs.transpose_b;
  int64_t sa[CM_MAX_RANK], sb[CM_MAX_RANK], coords[CM_MAX_RANK];
  cm_type_strides(&a->type, sa);
  cm_type_strides(&b->type, sb);
  /* Strides of a's (m, k) and b's (k, n) after the optional transposes. */
  int64_t a_m = ta ? sa[ra - 1] : sa[ra - 2], a_k = ta ? sa[ra - 2] : sa[ra - 1];
  int64_t b_k = tb ? sb[rb - 1] : sb[rb - 2], b_n = tb ? sb[rb - 2] : sb[rb - 1];
  int64_t K = ta ? a->type.dims[ra - 2] : a->type.dims[ra - 1];
  int64_t numel = cm_type_numel(&out->type);
  bool ints = is_int(out->type.dtype);
  const double *pa = f64_elems(a), *pb = f64_elems(b);
  int64_t N = out->type.dims[r - 1];
  double *acc = !ints && pa && pb && b_n == 1 ? calloc((size_t)N, sizeof *acc) : NULL;
  if (acc) { /* b's rows contiguous: a row of sums at a time, each still summed in k order */
    for (int64_t i0 = 0; i0 < numel; i0 += N) {
      unravel(i0, &out->type, coords);
      const double *ar = pa + batch_offset(a, coords, r) + coords[r - 2] * a_m;
      const double *br = pb + batch_offset(b, coords, r);
      for (int64_t j = 0; j < N; j++) acc[j] = 0;
      for (int64_t k = 0; k < K; k++) {
        double x = ar[k * a_k];
        const double *bk = br + k * b_k;
        for (int64_t j = 0; j < N; j++) acc[j] += x * bk[j];
      }
      for (int64_t j = 0; j < N; j++) put_real(out, i0 + j, acc[j]);
    }
    free(acc);
    return CM_OK;
  }
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &out->type, coords);
    int64_t m = coords[r - 2], col = coords[r - 1];
    int64_t ao = batch_offset(a, coords, r) + m * a_m;
    int64_t bo = batch_offset(b, coords, r) + col * b_n;
    double sum = 0;
    uint64_t isum = 0;
    if (ints)
      for (int64_t k = 0; k < K; k++)
        isum += (uint64_t)cm_tensor_get_i64(a, ao + k * a_k) *
                (uint64_t)cm_tensor_get_i64(b, bo + k * b_k);
    else if (pa && pb)
      for (int64_t k = 0; k < K; k++) sum += pa[ao + k * a_k] * pb[bo + k * b_k];
    else
      for (int64_t k = 0; k < K; k++) sum += get_real(a, ao + k * a_k) * get_real(b, bo + k * b_k);
    if (ints)
      put_int(out, i, wrap_int(isum, CM_I64));
    else
      put_real(out, i, sum);
  }
  return CM_OK;
}

typedef struct conv_geom {
  int64_t N, C, H, W, O, Cg, KH, KW, OH, OW, Og;
  int64_t sh, sw, ph, pw, dh, dw;
} conv_geom;

static conv_geom conv_geom_make(const cm_type *x, const cm_type *w, const cm_type *y,
                                const cm_attrs *at) {
  conv_geom q;
  q.N = x->dims[0], q.C = x->dims[1], q.H = x->dims[2], q.W = x->dims[3];
  q.O = w->dims[0], q.Cg = w->dims[1], q.KH = w->dims[2], q.KW = w->dims[3];
  q.OH = y->dims[2], q.OW = y->dims[3];
  q.Og = at->groups > 0 ? q.O / at->groups : q.O;
  q.sh = at->stride[0], q.sw = at->stride[1];
  q.ph = at->padding[0], q.pw = at->padding[1];
  q.dh = at->dilation[0], q.dw = at->dilation[1];
  return q;
}

/* conv2d and its two gradients are one bilinear form
 * B(x, w, dy) = sum over (n,o,i,j,c,u,v) of x[n,gC+c,h,w'] w[o,c,u,v] dy[n,o,i,j];
 * each op accumulates the partial of B w.r.t. its output, which makes the
 * gradients the exact adjoints of conv2d. acc has the output's numel. */
static void conv_accumulate(const conv_geom *q, cm_op op, const cm_tensor *in0,
                            const cm_tensor *in1, double *acc) {
  for (int64_t n = 0; n < q->N; n++)
    for (int64_t o = 0; o < q->O; o++)
      for (int64_t i = 0; i < q->OH; i++)
        for (int64_t j = 0; j < q->OW; j++)
          for (int64_t c = 0; c < q->Cg; c++)
            for (int64_t u = 0; u < q->KH; u++)
              for (int64_t v = 0; v < q->KW; v++) {
                int64_t h = i * q->sh - q->ph + u * q->dh, w = j * q->sw - q->pw + v * q->dw;
                if (h < 0 || h >= q->H || w < 0 || w >= q->W) continue;
                int64_t ch = (o / q->Og) * q->Cg + c;
                int64_t xi = ((n * q->C + ch) * q->H + h) * q->W + w;
                int64_t wi = ((o * q->Cg + c) * q->KH + u) * q->KW + v;
                int64_t yi = ((n * q->O + o) * q->OH + i) * q->OW + j;
                switch (op) {
                case CM_OP_CONV2D: acc[yi] += get_real(in0, xi) * get_real(in1, wi); break;
                case CM_OP_CONV2D_GRAD_INPUT:
                  acc[xi] += get_real(in0, yi) * get_real(in1, wi);
                  break;
                default: acc[wi] += get_real(in0, xi) * get_real(in1, yi); break;
                }
              }
}

static cm_status eval_conv(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_tensor *out = &c->values[id];
  const cm_tensor *in0 = input_value(c, id, 0), *in1 = input_value(c, id, 1);
  const cm_type *x = &in0->type, *w = &in1->type, *y = &out->type;
  if (n->op == CM_OP_CONV2D_GRAD_INPUT) x = &out->type, w = &in1->type, y = &in0->type;
  if (n->op == CM_OP_CONV2D_GRAD_WEIGHT) x = &in0->type, w = &out->type, y = &in1->type;
  conv_geom q = conv_geom_make(x, w, y, &n->attrs);
  int64_t numel = cm_type_numel(&out->type);
  double *acc = calloc((size_t)numel, sizeof *acc);
  if (!acc) return node_fail(c, id, CM_EINTERNAL, "out of memory");
  conv_accumulate(&q, n->op, in0, in1, acc);
  for (int64_t i = 0; i < numel; i++) put_real(out, i, acc[i]);
  free(acc);
  return CM_OK;
}

/* ---- collectives and update -------------------------------------------- */

static cm_status eval_copy_of_input(eval_ctx *c, int id, int k) {
  cm_tensor *out = &c->values[id];
  const cm_tensor *x = input_value(c, id, k);
  int64_t numel = cm_type_numel(&out->type);
  for (int64_t i = 0; i < numel; i++) copy_elem(out, i, x, i);
  return CM_OK;
}

/* Over several ranks (cm_eval_ranks, in lockstep): every rank's input is
 * already there. all_reduce sums in f64 (ints wrap) and rounds once; MEAN
 * divides the sum by the ranks; all_gather puts rank r's block at r * len. */
static cm_status eval_collective(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int ranks = n->attrs.ranks, x = n->inputs[0];
  if (ranks == 1) return eval_copy_of_input(c, id, 0);
  if (ranks != c->n_ranks)
    return node_fail(c, id, CM_EINVALID,
                     c->n_ranks ? "ranks is %d but cm_eval_ranks evaluates %d ranks"
                                : "ranks is %d: cm_eval evaluates one rank (cm_eval_ranks "
                                  "evaluates a group of ranks)",
                     ranks, c->n_ranks);
  cm_tensor *out = &c->values[id];
  int64_t numel = cm_type_numel(&out->type);
  if (n->op == CM_OP_ALL_GATHER) {
    int64_t coords[CM_MAX_RANK], len = c->g->nodes[x].type.dims[n->attrs.axis];
    for (int64_t i = 0; i < numel; i++) {
      unravel(i, &out->type, coords);
      int r = (int)(coords[n->attrs.axis] / len);
      coords[n->attrs.axis] %= len;
      const cm_tensor *in = &c->group[r].values[x];
      copy_elem(out, i, in, ravel(coords, &in->type));
    }
    return CM_OK;
  }
  bool mean = n->attrs.mode == CM_MODE_MEAN;
  for (int64_t i = 0; i < numel; i++) {
    if (is_int(out->type.dtype)) {
      uint64_t s = 0;
      for (int r = 0; r < ranks; r++) s += (uint64_t)cm_tensor_get_i64(&c->group[r].values[x], i);
      int64_t v = wrap_int(s, CM_I64);
      put_int(out, i, mean ? v / ranks : v);
    } else {
      double s = 0;
      for (int r = 0; r < ranks; r++) s += get_real(&c->group[r].values[x], i);
      put_real(out, i, mean ? s / ranks : s);
    }
  }
  return CM_OK;
}

/* ---- forward error bounds ---------------------------------------------- */

/* A bound on how far a conforming evaluation of the graph in its own dtypes
 * may be from the exact value, which the F64 oracle stands in for (its own
 * error is 2^29 times smaller). The model of a conforming evaluation (what the
 * backends promise, docs/ops.md "Error bounds"):
 *  - every float result is rounded to its dtype (unit roundoff u = 2^-p), or
 *    kept wider; exact ops (neg, abs, relu, max, movement) add nothing;
 *  - a sum of n terms (reduce_sum, matmul, conv, scatter_add) accumulates in
 *    f32 or wider, in any order, with or without FMA: error at most
 *    gamma_n = n u / (1 - n u) times the sum of |terms| (Higham, Accuracy and
 *    Stability of Numerical Algorithms, 2nd ed., (3.5) and Sec. 4.2);
 *  - div, recip and sqrt within 2 u (a reciprocal times x, as simplified
 *    kernels compute x/c); rsqrt within 3 u; exp, log, tanh, erf and pow
 *    within FN_ROUNDINGS u (the inline f32 functions measure <= 2 ulp of the
 *    rounded result, test_vmath; an ulp is at most 2 u);
 *  - values below the smallest normal may be flushed: an absolute slack of
 *    one smallest normal per rounding.
 * An input error e propagates through an op exactly, by evaluating the op at
 * the ends of the interval [x - e, x + e] (every unary op is monotone on its
 * domain; binary ops are monotone in each operand where the divisor or base
 * keeps its sign): the bound holds for any error, not only to first order.
 * A comparison or float-to-int cast whose interval straddles its threshold
 * may flip: its bound is the jump, and select then takes the distance
 * between its branches. */

#define FN_ROUNDINGS 8.0

static double unit_roundoff(cm_dtype dt) {
  return ldexp(1.0, -significand_bits(dt));
}
/* Sums of narrower floats accumulate in f32 (CPU loops, tensor-core mma). */
static double accum_roundoff(cm_dtype dt) {
  return dt == CM_F64 ? ldexp(1.0, -53) : ldexp(1.0, -24);
}
static double smallest_normal(cm_dtype dt) {
  switch (dt) {
  case CM_F64: return 0x1p-1022;
  case CM_F16: return 0x1p-14;
  default: return 0x1p-126; /* f32, bf16 */
  }
}
static double gamma_n(double n, double u) {
  double nu = n * u;
  return nu < 0.5 ? nu / (1 - nu) : INFINITY;
}

static double bnd(const eval_ctx *c, int node, int64_t i) {
  return cm_tensor_get_f64(&c->bounds[node], i);
}
static double val(const eval_ctx *c, int node, int64_t i) {
  return get_real(&c->values[node], i);
}

/* The bound of a float result y that the op computes from inputs already
 * off by at most prop, with `roundings` roundings of unit u on the way. A
 * result that may reach past the largest finite value of dt overflows to
 * +-inf (IEEE 754 round to nearest: at 2^128 (1 - 2^-25) in f32), at any
 * distance from y, which the f64 value does not show: its bound is infinite
 * (pow(1e10, 4) is 1e40 here, inf in f32). */
static double rounded(cm_dtype dt, double y, double prop, double roundings) {
  if (!cm_dtype_is_float(dt)) return prop;
  double u = unit_roundoff(dt);
  double b = prop + roundings * u * (fabs(y) + prop) + (roundings > 0 ? smallest_normal(dt) : 0);
  return isinf(cm_round_to_dtype(fabs(y) + b, dt)) ? INFINITY : b;
}

/* max |f(z) - f(x)| over z in [x - e, x + e] for a monotone f; the interval
 * ends must lie in f's domain, or the bound is infinite. */
static double spread1(cm_op op, double x, double e) {
  if (e == 0) return 0;
  double y = unary_real(op, x), lo = unary_real(op, x - e), hi = unary_real(op, x + e);
  double d = fmax(fabs(lo - y), fabs(hi - y));
  if (op == CM_OP_SQRT && x - e < 0) d = fmax(d, y); /* sqrt's domain ends at 0 */
  if ((op == CM_OP_RECIP || op == CM_OP_RSQRT || op == CM_OP_LOG) && x - e <= 0 && x + e >= 0)
    return INFINITY;
  return isnan(d) ? INFINITY : d;
}

static double unary_roundings(cm_op op) {
  switch (op) {
  case CM_OP_NEG:
  case CM_OP_ABS:
  case CM_OP_RELU:
  case CM_OP_STOP_GRADIENT: return 0;
  case CM_OP_SQRT:
  case CM_OP_RECIP: return 2;
  case CM_OP_RSQRT: return 3;
  case CM_OP_CAST: return 1;
  default: return FN_ROUNDINGS; /* exp log tanh erf */
  }
}

/* The jump of trunc (float -> int, saturating like float_to_int) over
 * [x - e, x + e]. */
static double trunc_spread(double x, double e, cm_dtype dt) {
  if (e == 0) return 0;
  double t = (double)float_to_int(x, dt);
  return fmax(fabs((double)float_to_int(x - e, dt) - t), fabs((double)float_to_int(x + e, dt) - t));
}

static void bound_unary(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int x = n->inputs[0];
  cm_dtype dt = n->type.dtype, xdt = c->g->nodes[x].type.dtype;
  int64_t numel = cm_type_numel(&n->type);
  for (int64_t i = 0; i < numel; i++) {
    double v = val(c, x, i), e = bnd(c, x, i), y = val(c, id, i), b;
    if (n->op == CM_OP_CAST || n->op == CM_OP_STOP_GRADIENT) {
      if (is_int(dt) && cm_dtype_is_float(xdt))
        b = trunc_spread(v, e, dt);
      else if (dt == CM_BOOL)
        b = e == 0 ? 0 : (v - e <= 0 && v + e >= 0) ? 1 : 0;
      else if (n->op == CM_OP_CAST && cm_dtype_is_float(dt) &&
               (is_int(xdt) || xdt == CM_BOOL || significand_bits(dt) < significand_bits(xdt)))
        b = rounded(dt, y, e, 1);
      else
        b = e;
    } else if (!cm_dtype_is_float(dt)) {
      b = e == 0 ? 0 : fabs(unary_real(n->op, v + e) - y) + fabs(unary_real(n->op, v - e) - y);
    } else {
      b = rounded(dt, y, spread1(n->op, v, e), unary_roundings(n->op));
    }
    cm_tensor_set_f64(&c->bounds[id], i, b);
  }
}

/* max |op(a', b') - op(a, b)| over the operand intervals: the corners, and
 * a zero base for pow (where x^even has its minimum). */
static double spread2(cm_op op, double a, double ea, double b, double eb) {
  if (ea == 0 && eb == 0) return 0;
  switch (op) {
  case CM_OP_ADD:
  case CM_OP_SUB: return ea + eb;
  case CM_OP_MUL: return fabs(a) * eb + fabs(b) * ea + ea * eb;
  case CM_OP_MAX:
  case CM_OP_MIN: return fmax(ea, eb);
  case CM_OP_DIV:
    if (b - eb <= 0 && b + eb >= 0) return INFINITY;
    break;
  case CM_OP_POW:
    if (eb > 0 && a - ea <= 0) return INFINITY; /* a varying exponent needs a positive base */
    break;
  default: break;
  }
  double y = binary_real(op, a, b), d = 0;
  const double as[3] = {a - ea, a + ea, 0}, bs[2] = {b - eb, b + eb};
  int n_a = op == CM_OP_POW && a - ea < 0 && a + ea > 0 ? 3 : 2;
  for (int i = 0; i < n_a; i++)
    for (int j = 0; j < 2; j++) d = fmax(d, fabs(binary_real(op, as[i], bs[j]) - y));
  return isnan(d) ? INFINITY : d;
}

/* Can the comparison flip when each operand moves within its bound? */
static bool compare_uncertain(cm_op op, double a, double ea, double b, double eb) {
  if (ea == 0 && eb == 0) return false;
  double gap = a - b, slack = ea + eb;
  if (op == CM_OP_EQ || op == CM_OP_NE) return fabs(gap) <= slack;
  return fabs(gap) <= slack; /* lt, le: the sign of a - b can change */
}

static void bound_binary(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int a = n->inputs[0], b = n->inputs[1];
  cm_dtype dt = n->type.dtype;
  int64_t numel = cm_type_numel(&n->type);
  double roundings = n->op == CM_OP_MAX || n->op == CM_OP_MIN ? 0
                     : n->op == CM_OP_DIV                     ? 2
                     : n->op == CM_OP_POW                     ? FN_ROUNDINGS
                                                              : 1;
  for (int64_t i = 0; i < numel; i++) {
    double va = val(c, a, i), ea = bnd(c, a, i), vb = val(c, b, i), eb = bnd(c, b, i), r;
    if (compare_op(n->op)) {
      r = compare_uncertain(n->op, va, ea, vb, eb) ? 1 : 0;
    } else {
      double y = val(c, id, i), k = roundings;
      /* pow computed as exp(b log a) loses |b log a| more roundings */
      if (n->op == CM_OP_POW && va > 0) k += fabs(vb * log(va));
      r = rounded(dt, y, spread2(n->op, va, ea, vb, eb), k);
    }
    cm_tensor_set_f64(&c->bounds[id], i, r);
  }
}

static void bound_select(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int cond = n->inputs[0], a = n->inputs[1], b = n->inputs[2];
  int64_t numel = cm_type_numel(&n->type);
  for (int64_t i = 0; i < numel; i++) {
    double ea = bnd(c, a, i), eb = bnd(c, b, i), r;
    if (bnd(c, cond, i) == 0)
      r = val(c, cond, i) != 0 ? ea : eb;
    else /* either branch may be taken */
      r = fabs(val(c, a, i) - val(c, b, i)) + fmax(ea, eb);
    cm_tensor_set_f64(&c->bounds[id], i, r);
  }
}

/* A sum's bound: what its terms carry plus gamma_n of the sum of |terms|
 * (each term widened by its own bound). */
static double sum_bound(cm_dtype dt, double y, double n_terms, double abs_sum, double prop) {
  if (!cm_dtype_is_float(dt)) return prop;
  double acc = gamma_n(n_terms, accum_roundoff(dt)) * (abs_sum + prop);
  double store = significand_bits(dt) < 24 ? 1 : 0; /* bf16/f16 store after an f32 sum */
  return rounded(dt, y, prop + acc, store) + n_terms * smallest_normal(dt);
}

static cm_status bound_reduce(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int x = n->inputs[0];
  const cm_type *xt = &c->g->nodes[x].type;
  int64_t out_numel = cm_type_numel(&n->type), numel = cm_type_numel(xt);
  /* the same output map as eval_reduce */
  bool reduced[CM_MAX_RANK] = {false};
  for (int k = 0; k < n->attrs.n_axes && k < CM_MAX_RANK; k++) {
    int ax = normalize_axis(n->attrs.axes[k], xt->rank);
    if (ax >= 0 && ax < xt->rank) reduced[ax] = true;
  }
  cm_type ot = n->type;
  int64_t out_strides[CM_MAX_RANK], map[CM_MAX_RANK], coords[CM_MAX_RANK];
  cm_type_strides(&ot, out_strides);
  for (int ax = 0, oa = 0; ax < xt->rank; ax++) {
    map[ax] = reduced[ax] ? 0 : out_strides[oa];
    if (!reduced[ax] || n->attrs.keepdims) oa++;
  }
  double *abs_sum = calloc((size_t)out_numel, sizeof *abs_sum);
  double *prop = calloc((size_t)out_numel, sizeof *prop);
  if (!abs_sum || !prop) {
    free(abs_sum), free(prop);
    return node_fail(c, id, CM_EINTERNAL, "out of memory");
  }
  bool is_max = n->op == CM_OP_REDUCE_MAX;
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, xt, coords);
    int64_t o = 0;
    for (int ax = 0; ax < xt->rank; ax++) o += coords[ax] * map[ax];
    double e = bnd(c, x, i);
    if (is_max) {
      prop[o] = fmax(prop[o], e); /* max is 1-Lipschitz in the sup norm */
    } else {
      prop[o] += e;
      abs_sum[o] += fabs(val(c, x, i));
    }
  }
  double terms = out_numel ? (double)(numel / out_numel) : 0;
  for (int64_t o = 0; o < out_numel; o++)
    cm_tensor_set_f64(&c->bounds[id], o,
                      is_max ? prop[o]
                             : sum_bound(n->type.dtype, val(c, id, o), terms, abs_sum[o], prop[o]));
  free(abs_sum), free(prop);
  return CM_OK;
}

/* Movement ops carry each element's bound with it; pad's fill value and a
 * concat or gather are exact copies. Recomputes the source index like
 * eval_movement/eval_concat/eval_gather. */
static void bound_movement(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  const cm_attrs *at = &n->attrs;
  int x = n->inputs[0];
  const cm_type *xt = &c->g->nodes[x].type, *ot = &n->type;
  int64_t numel = cm_type_numel(ot), coords[CM_MAX_RANK], src[CM_MAX_RANK];
  int rank = ot->rank, xrank = xt->rank;
  double fill =
      cm_dtype_is_float(ot->dtype) ? fabs(cm_round_to_dtype(at->value, ot->dtype) - at->value) : 0;
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, ot, coords);
    bool inside = true;
    int64_t si = i;
    switch (n->op) {
    case CM_OP_PERMUTE:
      for (int k = 0; k < rank; k++) src[at->perm[k]] = coords[k];
      si = ravel(src, xt);
      break;
    case CM_OP_BROADCAST:
      for (int k = 0; k < xrank; k++) src[k] = xt->dims[k] == 1 ? 0 : coords[k + rank - xrank];
      si = ravel(src, xt);
      break;
    case CM_OP_SLICE:
      for (int k = 0; k < rank; k++) src[k] = at->start[k] + coords[k] * at->step[k];
      si = ravel(src, xt);
      break;
    case CM_OP_PAD:
      for (int k = 0; k < rank; k++) {
        src[k] = coords[k] - at->lo[k];
        if (src[k] < 0 || src[k] >= xt->dims[k]) inside = false;
      }
      if (inside) si = ravel(src, xt);
      break;
    case CM_OP_CONCAT: {
      int axis = normalize_axis(at->axis, rank), k = 0;
      x = n->inputs[0];
      while (coords[axis] >= c->g->nodes[x].type.dims[axis] && k + 1 < n->n_inputs) {
        coords[axis] -= c->g->nodes[x].type.dims[axis];
        x = n->inputs[++k];
      }
      si = ravel(coords, &c->g->nodes[x].type);
      break;
    }
    case CM_OP_GATHER: {
      int axis = normalize_axis(at->axis, c->g->nodes[n->inputs[0]].type.rank);
      int index = n->inputs[1];
      if (bnd(c, index, i) != 0) { /* an uncertain index may fetch any element */
        cm_tensor_set_f64(&c->bounds[id], i, INFINITY);
        continue;
      }
      coords[axis] = cm_tensor_get_i64(&c->values[index], i);
      si = ravel(coords, xt);
      break;
    }
    default: break; /* reshape, copies: same row-major order */
    }
    cm_tensor_set_f64(&c->bounds[id], i, inside ? bnd(c, x, si) : fill);
  }
}

static cm_status bound_scatter_add(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int base = n->inputs[0], index = n->inputs[1], upd = n->inputs[2];
  const cm_type *bt = &c->g->nodes[base].type, *it = &c->g->nodes[index].type;
  int axis = normalize_axis(n->attrs.axis, bt->rank);
  int64_t out_numel = cm_type_numel(&n->type), numel = cm_type_numel(it), coords[CM_MAX_RANK];
  double *abs_sum = calloc((size_t)out_numel, sizeof *abs_sum);
  double *prop = calloc((size_t)out_numel, sizeof *prop);
  double *terms = calloc((size_t)out_numel, sizeof *terms);
  if (!abs_sum || !prop || !terms) {
    free(abs_sum), free(prop), free(terms);
    return node_fail(c, id, CM_EINTERNAL, "out of memory");
  }
  for (int64_t o = 0; o < out_numel; o++)
    abs_sum[o] = fabs(val(c, base, o)), prop[o] = bnd(c, base, o), terms[o] = 1;
  bool uncertain = false;
  for (int64_t i = 0; i < numel; i++) {
    uncertain |= bnd(c, index, i) != 0;
    unravel(i, it, coords);
    coords[axis] = cm_tensor_get_i64(&c->values[index], i);
    int64_t o = ravel(coords, bt);
    abs_sum[o] += fabs(val(c, upd, i)), prop[o] += bnd(c, upd, i), terms[o] += 1;
  }
  for (int64_t o = 0; o < out_numel; o++)
    cm_tensor_set_f64(&c->bounds[id], o,
                      uncertain
                          ? INFINITY
                          : sum_bound(n->type.dtype, val(c, id, o), terms[o], abs_sum[o], prop[o]));
  free(abs_sum), free(prop), free(terms);
  return CM_OK;
}

static void bound_matmul(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int ia = n->inputs[0], ib = n->inputs[1];
  const cm_tensor *a = &c->values[ia], *b = &c->values[ib];
  const cm_tensor *ea = &c->bounds[ia], *eb = &c->bounds[ib];
  int ra = a->type.rank, rb = b->type.rank, r = n->type.rank;
  bool ta = n->attrs.transpose_a, tb = n->attrs.transpose_b;
  int64_t sa[CM_MAX_RANK], sb[CM_MAX_RANK], coords[CM_MAX_RANK];
  cm_type_strides(&a->type, sa);
  cm_type_strides(&b->type, sb);
  int64_t a_m = ta ? sa[ra - 1] : sa[ra - 2], a_k = ta ? sa[ra - 2] : sa[ra - 1];
  int64_t b_k = tb ? sb[rb - 1] : sb[rb - 2], b_n = tb ? sb[rb - 2] : sb[rb - 1];
  int64_t K = ta ? a->type.dims[ra - 2] : a->type.dims[ra - 1];
  int64_t numel = cm_type_numel(&n->type);
  const double *pa = f64_elems(a), *pb = f64_elems(b), *pea = f64_elems(ea), *peb = f64_elems(eb);
  int64_t N = n->type.dims[r - 1];
  /* exact operands carry nothing */
  bool exact = pa && pb && pea && peb && all_zero(pea, cm_type_numel(&ea->type)) &&
               all_zero(peb, cm_type_numel(&eb->type));
  double *acc = pa && pb && pea && peb && b_n == 1 ? calloc(2 * (size_t)N, sizeof *acc) : NULL;
  if (acc) { /* as eval_matmul: a row at a time */
    double *abs_sum = acc, *prop = acc + N;
    for (int64_t i0 = 0; i0 < numel; i0 += N) {
      unravel(i0, &n->type, coords);
      int64_t ao = batch_offset(a, coords, r) + coords[r - 2] * a_m,
              bo = batch_offset(b, coords, r);
      for (int64_t j = 0; j < 2 * N; j++) acc[j] = 0;
      for (int64_t k = 0; k < K; k++) {
        double x = fabs(pa[ao + k * a_k]), ex = pea[ao + k * a_k];
        const double *bk = pb + bo + k * b_k, *ebk = peb + bo + k * b_k;
        for (int64_t j = 0; j < N; j++) abs_sum[j] += x * fabs(bk[j]);
        if (!exact)
          for (int64_t j = 0; j < N; j++) {
            double y = fabs(bk[j]), ey = ebk[j];
            prop[j] += x * ey + y * ex + ex * ey;
          }
      }
      for (int64_t j = 0; j < N; j++)
        cm_tensor_set_f64(
            &c->bounds[id], i0 + j,
            sum_bound(n->type.dtype, val(c, id, i0 + j), (double)K, abs_sum[j], prop[j]));
    }
    free(acc);
    return;
  }
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &n->type, coords);
    int64_t ao = batch_offset(a, coords, r) + coords[r - 2] * a_m;
    int64_t bo = batch_offset(b, coords, r) + coords[r - 1] * b_n;
    double abs_sum = 0, prop = 0;
    if (exact)
      for (int64_t k = 0; k < K; k++) abs_sum += fabs(pa[ao + k * a_k]) * fabs(pb[bo + k * b_k]);
    else if (pa && pb && pea && peb)
      for (int64_t k = 0; k < K; k++) {
        double x = fabs(pa[ao + k * a_k]), y = fabs(pb[bo + k * b_k]);
        double ex = pea[ao + k * a_k], ey = peb[bo + k * b_k];
        abs_sum += x * y;
        prop += x * ey + y * ex + ex * ey;
      }
    else
      for (int64_t k = 0; k < K; k++) {
        double x = fabs(get_real(a, ao + k * a_k)), y = fabs(get_real(b, bo + k * b_k));
        double ex = cm_tensor_get_f64(ea, ao + k * a_k), ey = cm_tensor_get_f64(eb, bo + k * b_k);
        abs_sum += x * y;
        prop += x * ey + y * ex + ex * ey;
      }
    cm_tensor_set_f64(&c->bounds[id], i,
                      sum_bound(n->type.dtype, val(c, id, i), (double)K, abs_sum, prop));
  }
}

/* conv_accumulate's loops, summing per output |term|, the terms' carried
 * bounds and their count (taps in the padding are not terms). */
static void bound_conv(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int i0 = n->inputs[0], i1 = n->inputs[1];
  const cm_tensor *in0 = &c->values[i0], *in1 = &c->values[i1];
  const cm_tensor *e0 = &c->bounds[i0], *e1 = &c->bounds[i1];
  const cm_type *x = &in0->type, *w = &in1->type, *y = &n->type;
  if (n->op == CM_OP_CONV2D_GRAD_INPUT) x = &n->type, w = &in1->type, y = &in0->type;
  if (n->op == CM_OP_CONV2D_GRAD_WEIGHT) x = &in0->type, w = &n->type, y = &in1->type;
  conv_geom q = conv_geom_make(x, w, y, &n->attrs);
  int64_t numel = cm_type_numel(&n->type);
  double *abs_sum = calloc((size_t)numel, sizeof *abs_sum);
  double *prop = calloc((size_t)numel, sizeof *prop);
  double *terms = calloc((size_t)numel, sizeof *terms);
  if (abs_sum && prop && terms)
    for (int64_t nb = 0; nb < q.N; nb++)
      for (int64_t o = 0; o < q.O; o++)
        for (int64_t i = 0; i < q.OH; i++)
          for (int64_t j = 0; j < q.OW; j++)
            for (int64_t ch = 0; ch < q.Cg; ch++)
              for (int64_t u = 0; u < q.KH; u++)
                for (int64_t v = 0; v < q.KW; v++) {
                  int64_t h = i * q.sh - q.ph + u * q.dh, wc = j * q.sw - q.pw + v * q.dw;
                  if (h < 0 || h >= q.H || wc < 0 || wc >= q.W) continue;
                  int64_t cin = (o / q.Og) * q.Cg + ch;
                  int64_t xi = ((nb * q.C + cin) * q.H + h) * q.W + wc;
                  int64_t wi = ((o * q.Cg + ch) * q.KH + u) * q.KW + v;
                  int64_t yi = ((nb * q.O + o) * q.OH + i) * q.OW + j;
                  int64_t k0, k1, out;
                  switch (n->op) {
                  case CM_OP_CONV2D: k0 = xi, k1 = wi, out = yi; break;
                  case CM_OP_CONV2D_GRAD_INPUT: k0 = yi, k1 = wi, out = xi; break;
                  default: k0 = xi, k1 = yi, out = wi; break;
                  }
                  double p = fabs(get_real(in0, k0)), r = fabs(get_real(in1, k1));
                  double ep = cm_tensor_get_f64(e0, k0), er = cm_tensor_get_f64(e1, k1);
                  abs_sum[out] += p * r;
                  prop[out] += p * er + r * ep + ep * er;
                  terms[out] += 1;
                }
  for (int64_t i = 0; i < numel; i++)
    cm_tensor_set_f64(&c->bounds[id], i,
                      abs_sum && prop && terms
                          ? sum_bound(n->type.dtype, val(c, id, i), terms[i], abs_sum[i], prop[i])
                          : INFINITY);
  free(abs_sum), free(prop), free(terms);
}

/* Sources and constants are exact once rounded to their dtype. */
static void bound_exact_after_rounding(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int64_t numel = cm_type_numel(&n->type);
  for (int64_t i = 0; i < numel; i++) {
    double v = val(c, id, i);
    double r = cm_dtype_is_float(n->type.dtype) ? fabs(cm_round_to_dtype(v, n->type.dtype) - v) : 0;
    cm_tensor_set_f64(&c->bounds[id], i, isnan(r) ? 0 : r);
  }
}

static void bound_copy(eval_ctx *c, int id, int k) {
  int x = c->g->nodes[id].inputs[k];
  int64_t numel = cm_type_numel(&c->g->nodes[id].type);
  for (int64_t i = 0; i < numel; i++) cm_tensor_set_f64(&c->bounds[id], i, bnd(c, x, i));
}

/* all_reduce: the ranks' bounds add up, plus the f32 sum of `ranks` terms
 * (gamma_ranks, as reduce_sum) and for MEAN the rounding of the division;
 * all_gather: each rank's bounds in its block. */
static void bound_collective(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  int ranks = n->attrs.ranks, x = n->inputs[0];
  int64_t numel = cm_type_numel(&n->type), coords[CM_MAX_RANK];
  for (int64_t i = 0; i < numel; i++) {
    double b;
    if (n->op == CM_OP_ALL_GATHER) {
      int64_t len = c->g->nodes[x].type.dims[n->attrs.axis];
      unravel(i, &n->type, coords);
      int r = (int)(coords[n->attrs.axis] / len);
      coords[n->attrs.axis] %= len;
      b = cm_tensor_get_f64(&c->group[r].bounds[x], ravel(coords, &c->g->nodes[x].type));
    } else {
      double abs_sum = 0, prop = 0, y = val(c, id, i);
      for (int r = 0; r < ranks; r++) {
        abs_sum += fabs(get_real(&c->group[r].values[x], i));
        prop += cm_tensor_get_f64(&c->group[r].bounds[x], i);
      }
      bool mean = n->attrs.mode == CM_MODE_MEAN;
      b = sum_bound(n->type.dtype, mean ? y * ranks : y, ranks, abs_sum, prop);
      if (mean) b = rounded(n->type.dtype, y, b / ranks, 1);
    }
    cm_tensor_set_f64(&c->bounds[id], i, b);
  }
}

static cm_status bound_node_op(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  cm_type bt = n->type;
  bt.dtype = CM_F64;
  cm_status st = cm_tensor_alloc(&c->bounds[id], bt, c->err);
  if (st) return st;
  switch (cm_op_get_info(n->op)->category) {
  case CM_CAT_SOURCE: bound_exact_after_rounding(c, id); return CM_OK;
  case CM_CAT_MOVEMENT:
    if (n->op == CM_OP_SCATTER_ADD) return bound_scatter_add(c, id);
    bound_movement(c, id);
    return CM_OK;
  case CM_CAT_REDUCE: return bound_reduce(c, id);
  case CM_CAT_CONTRACTION:
    if (n->op == CM_OP_MATMUL)
      bound_matmul(c, id);
    else
      bound_conv(c, id);
    return CM_OK;
  case CM_CAT_COLLECTIVE:
    if (n->attrs.ranks > 1)
      bound_collective(c, id);
    else
      bound_copy(c, id, 0);
    return CM_OK;
  case CM_CAT_UPDATE: bound_copy(c, id, 1); return CM_OK;
  default: break;
  }
  if (n->op == CM_OP_SELECT)
    bound_select(c, id);
  else if (n->n_inputs == 1)
    bound_unary(c, id);
  else
    bound_binary(c, id);
  return CM_OK;
}

/* A NaN bound (an interval product 0 * inf, inf - inf) means no bound: it is
 * made infinite, so that a later max, select or comparison (fmax drops a NaN)
 * cannot turn it into a finite one. */
static cm_status bound_node(eval_ctx *c, int id) {
  cm_status st = bound_node_op(c, id);
  if (st) return st;
  double *b = c->bounds[id].data;
  for (int64_t i = 0, n = cm_type_numel(&c->bounds[id].type); i < n; i++)
    if (isnan(b[i])) b[i] = INFINITY;
  return CM_OK;
}

/* ---- driver ------------------------------------------------------------ */

/* The oracle trusts a verified graph, but an unverified one must not make it
 * read out of bounds: check the structure and that the stored type is what
 * inference gives. A failure here is the caller's bug: CM_EINTERNAL. */
static cm_status check_node(eval_ctx *c, int id) {
  const cm_node *n = &c->g->nodes[id];
  if ((unsigned)n->op >= CM_OP_COUNT)
    return cm_errorf(c->err, CM_EINTERNAL, "nodes[%d]: unknown op %d", id, (int)n->op);
  const cm_op_info *info = cm_op_get_info(n->op);
  if (info->arity >= 0 ? n->n_inputs != info->arity : n->n_inputs < 1)
    return node_fail(c, id, CM_EINTERNAL, "takes %s%d inputs, got %d (verify the graph first)",
                     info->arity < 0 ? "at least " : "", info->arity < 0 ? 1 : info->arity,
                     n->n_inputs);
  if (n->n_inputs > 0 && !n->inputs) return node_fail(c, id, CM_EINTERNAL, "no input list");
  for (int k = 0; k < n->n_inputs; k++)
    if (n->inputs[k] < 0 || n->inputs[k] >= id)
      return node_fail(c, id, CM_EINTERNAL, "input %d is node %d, which does not precede it", k,
                       n->inputs[k]);
  cm_type inferred;
  cm_err ierr;
  if (cm_infer_type(c->g, n->op, n->inputs, n->n_inputs, &n->attrs, &inferred, &ierr) != CM_OK)
    return node_fail(c, id, CM_EINTERNAL, "%s (verify the graph first)", ierr.msg);
  if (!cm_type_equal(&inferred, &n->type)) {
    char have[128], want[128];
    return node_fail(c, id, CM_EINTERNAL, "type %s differs from the inferred %s",
                     cm_type_str(&n->type, have, sizeof have),
                     cm_type_str(&inferred, want, sizeof want));
  }
  return CM_OK;
}

static cm_status eval_node(eval_ctx *c, int id) {
  cm_status st = check_node(c, id);
  if (st) return st;
  const cm_node *n = &c->g->nodes[id];
  cm_type vt = n->type;
  if (c->precision == CM_PRECISION_F64 && cm_dtype_is_float(vt.dtype)) vt.dtype = CM_F64;
  st = cm_tensor_alloc(&c->values[id], vt, c->err);
  if (st)
    return cm_err_prefix(c->err, "nodes[%d] \"%s\" (%s): ", id, n->name ? n->name : "",
                         cm_op_name(n->op));
  switch (n->op) {
  case CM_OP_INPUT:
  case CM_OP_PARAM:
  case CM_OP_STATE: return eval_fed(c, id);
  case CM_OP_CONST: return eval_const(c, id);
  case CM_OP_IOTA: return eval_iota(c, id);
  case CM_OP_NEG:
  case CM_OP_ABS:
  case CM_OP_EXP:
  case CM_OP_LOG:
  case CM_OP_SQRT:
  case CM_OP_RSQRT:
  case CM_OP_RECIP:
  case CM_OP_TANH:
  case CM_OP_ERF:
  case CM_OP_RELU:
  case CM_OP_STOP_GRADIENT:
  case CM_OP_CAST: return eval_unary(c, id);
  case CM_OP_ADD:
  case CM_OP_SUB:
  case CM_OP_MUL:
  case CM_OP_DIV:
  case CM_OP_MAX:
  case CM_OP_MIN:
  case CM_OP_POW:
  case CM_OP_LT:
  case CM_OP_LE:
  case CM_OP_EQ:
  case CM_OP_NE: return eval_binary(c, id);
  case CM_OP_SELECT: return eval_select(c, id);
  case CM_OP_REDUCE_SUM:
  case CM_OP_REDUCE_MAX: return eval_reduce(c, id);
  case CM_OP_RESHAPE:
  case CM_OP_PERMUTE:
  case CM_OP_BROADCAST:
  case CM_OP_SLICE:
  case CM_OP_PAD: return eval_movement(c, id);
  case CM_OP_CONCAT: return eval_concat(c, id);
  case CM_OP_GATHER: return eval_gather(c, id);
  case CM_OP_SCATTER_ADD: return eval_scatter_add(c, id);
  case CM_OP_MATMUL: return eval_matmul(c, id);
  case CM_OP_CONV2D:
  case CM_OP_CONV2D_GRAD_INPUT:
  case CM_OP_CONV2D_GRAD_WEIGHT: return eval_conv(c, id);
  case CM_OP_ALL_REDUCE:
  case CM_OP_ALL_GATHER: return eval_collective(c, id);
  case CM_OP_ASSIGN: return eval_copy_of_input(c, id, 1);
  case CM_OP_COUNT: break;
  }
  return node_fail(c, id, CM_EINTERNAL, "the oracle has no rule for this op");
}

static cm_status eval_graph(const cm_graph *g, const cm_tensor *const *sources, cm_tensor *values,
                            const cm_eval_opts *opts, cm_tensor *bounds, cm_err *err) {
  if (!g || (!values && g->n_nodes > 0))
    return cm_errorf(err, CM_EINTERNAL, "cm_eval: graph and values are required");
  eval_ctx c = {g,      sources, values, opts ? opts->precision : CM_PRECISION_NATIVE,
                bounds, err,     NULL,   0};
  if (g->n_nodes > 0) memset(values, 0, sizeof *values * (size_t)g->n_nodes);
  if (c.bounds && g->n_nodes > 0) memset(c.bounds, 0, sizeof *c.bounds * (size_t)g->n_nodes);
  for (int id = 0; id < g->n_nodes; id++) {
    cm_status st = eval_node(&c, id);
    if (st == CM_OK && c.bounds) st = bound_node(&c, id);
    if (st == CM_OK) continue;
    for (int k = 0; k <= id; k++) {
      cm_tensor_free(&values[k]);
      if (c.bounds) cm_tensor_free(&c.bounds[k]);
    }
    memset(values, 0, sizeof *values * (size_t)g->n_nodes);
    return st;
  }
  return CM_OK;
}

cm_status cm_eval(const cm_graph *g, const cm_tensor *const *sources, cm_tensor *values,
                  const cm_eval_opts *opts, cm_err *err) {
  return eval_graph(g, sources, values, opts, NULL, err);
}

cm_status cm_eval_bounded(const cm_graph *g, const cm_tensor *const *sources, cm_tensor *values,
                          cm_tensor *bounds, cm_err *err) {
  if (!bounds && g && g->n_nodes > 0)
    return cm_errorf(err, CM_EINTERNAL, "cm_eval_bounded: bounds are required");
  cm_eval_opts o = {CM_PRECISION_F64};
  return eval_graph(g, sources, values, &o, bounds, err);
}

/* The ranks' graphs advance node by node together, so a collective finds
 * every rank's input computed. */
cm_status cm_eval_ranks(const cm_graph *g, int ranks, const cm_tensor *const *const *sources,
                        cm_tensor **values, const cm_eval_opts *opts, cm_tensor **bounds,
                        cm_err *err) {
  if (!g || !values || !sources || ranks < 1)
    return cm_errorf(err, CM_EINTERNAL,
                     "cm_eval_ranks: graph, sources, values and ranks >= 1 are required");
  for (int r = 0; r < ranks; r++)
    if ((!values[r] || (bounds && !bounds[r])) && g->n_nodes > 0)
      return cm_errorf(err, CM_EINTERNAL, "cm_eval_ranks: rank %d has no values or bounds", r);
  eval_ctx *ctx = calloc((size_t)ranks, sizeof *ctx);
  if (!ctx) return cm_errorf(err, CM_EINTERNAL, "cm_eval_ranks: out of memory");
  cm_precision precision = bounds ? CM_PRECISION_F64 : opts ? opts->precision : CM_PRECISION_NATIVE;
  for (int r = 0; r < ranks; r++) {
    ctx[r] =
        (eval_ctx){g, sources[r], values[r], precision, bounds ? bounds[r] : NULL, err, ctx, ranks};
    if (g->n_nodes == 0) continue;
    memset(values[r], 0, sizeof *values[r] * (size_t)g->n_nodes);
    if (bounds) memset(bounds[r], 0, sizeof *bounds[r] * (size_t)g->n_nodes);
  }
  cm_status st = CM_OK;
  int id = 0, r = 0;
  for (; id < g->n_nodes && !st; id++)
    for (r = 0; r < ranks && !st; r++) {
      st = eval_node(&ctx[r], id);
      if (!st && bounds) st = bound_node(&ctx[r], id);
    }
  if (st) {
    cm_err_prefix(err, "rank %d: ", r - 1);
    for (int q = 0; q < ranks; q++)
      for (int k = 0; k < id; k++) {
        cm_tensor_free(&values[q][k]);
        if (bounds) cm_tensor_free(&bounds[q][k]);
      }
  }
  free(ctx);
  return st;
}
