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
  cm_err *err;
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
  for (int64_t i = 0; i < numel; i++) {
    unravel(i, &out->type, coords);
    int64_t m = coords[r - 2], col = coords[r - 1];
    int64_t ao = batch_offset(a, coords, r) + m * a_m;
    int64_t bo = batch_offset(b, coords, r) + col * b_n;
    double sum = 0;
    uint64_t isum = 0;
    for (int64_t k = 0; k < K; k++) {
      if (ints)
        isum += (uint64_t)cm_tensor_get_i64(a, ao + k * a_k) *
                (uint64_t)cm_tensor_get_i64(b, bo + k * b_k);
      else
        sum += get_real(a, ao + k * a_k) * get_real(b, bo + k * b_k);
    }
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

static cm_status eval_collective(eval_ctx *c, int id) {
  int ranks = c->g->nodes[id].attrs.ranks;
  if (ranks != 1)
    return node_fail(c, id, CM_EINVALID,
                     "ranks is %d: needs a communicator: the oracle evaluates one rank", ranks);
  return eval_copy_of_input(c, id, 0);
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

cm_status cm_eval(const cm_graph *g, const cm_tensor *const *sources, cm_tensor *values,
                  const cm_eval_opts *opts, cm_err *err) {
  if (!g || (!values && g->n_nodes > 0))
    return cm_errorf(err, CM_EINTERNAL, "cm_eval: graph and values are required");
  eval_ctx c = {g, sources, values, opts ? opts->precision : CM_PRECISION_NATIVE, err};
  if (g->n_nodes > 0) memset(values, 0, sizeof *values * (size_t)g->n_nodes);
  for (int id = 0; id < g->n_nodes; id++) {
    cm_status st = eval_node(&c, id);
    if (st == CM_OK) continue;
    for (int k = 0; k <= id; k++) cm_tensor_free(&values[k]);
    memset(values, 0, sizeof *values * (size_t)g->n_nodes);
    return st;
  }
  return CM_OK;
}
