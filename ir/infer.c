/* ir/infer.c — the type rule of every op: checks operands and attributes and
 * gives the result type. Messages name the operand types and the rule. */
#include "ir.h"

#include <math.h>
#include <string.h>

static const char *tstr(const cm_type *t, char *buf) {
  return cm_type_str(t, buf, 128);
}

/* Checks a shape given as an attribute or declaration. */
static cm_status check_shape(int rank, const int64_t *dims, const char *what, cm_err *err) {
  if (rank < 0 || rank > CM_MAX_RANK)
    return cm_errorf(err, CM_EINVALID, "%s has rank %d, more than %d", what, rank, CM_MAX_RANK);
  int64_t n = 1;
  for (int i = 0; i < rank; i++) {
    if (dims[i] < 1)
      return cm_errorf(err, CM_EINVALID, "%s: dimension %d is %lld, not >= 1", what, i,
                       (long long)dims[i]);
    if (dims[i] > CM_MAX_ELEMENTS || n > CM_MAX_ELEMENTS / dims[i])
      return cm_errorf(err, CM_EINVALID, "%s: more than 2^40 elements", what);
    n *= dims[i];
  }
  return CM_OK;
}

static cm_status infer_source(cm_op op, const cm_attrs *a, cm_type *out, cm_err *err) {
  if ((unsigned)a->dtype >= CM_DTYPE_COUNT)
    return cm_errorf(err, CM_EINVALID, "invalid dtype %d", (int)a->dtype);
  cm_status st = check_shape(a->rank, a->shape, "shape", err);
  if (st) return st;
  *out = cm_type_make(a->dtype, a->rank, a->shape);
  if (op == CM_OP_CONST && a->data && a->n_data != cm_type_numel(out))
    return cm_errorf(err, CM_EINVALID, "data has %lld elements but shape %s has %lld",
                     (long long)a->n_data, tstr(out, (char[128]){0}),
                     (long long)cm_type_numel(out));
  if (op == CM_OP_CONST) {
    char why[160];
    if (a->data && (a->value != 0 || signbit(a->value)))
      return cm_errorf(err, CM_EINVALID,
                       "\"value\" and \"data\" are both given (a const takes one)");
    for (int64_t i = 0; a->data && i < a->n_data; i++)
      if (!cm_value_fits(a->data[i], a->dtype, why, sizeof why))
        return cm_errorf(err, CM_EINVALID, "data[%lld]: %s", (long long)i, why);
    if (!a->data && !cm_value_fits(a->value, a->dtype, why, sizeof why))
      return cm_errorf(err, CM_EINVALID, "value %s", why);
  }
  if (op == CM_OP_IOTA &&
      (a->axis < 0 || a->axis >= (a->rank ? a->rank : 1) || (a->rank == 0 && a->axis != 0)))
    return cm_errorf(err, CM_EINVALID, "axis %d outside [0, %d)", a->axis, a->rank);
  if (op == CM_OP_IOTA && a->dtype == CM_BOOL)
    return cm_errorf(err, CM_EINVALID, "iota of bool is not allowed");
  if ((op == CM_OP_PARAM || op == CM_OP_STATE) && (unsigned)a->init.kind >= CM_INIT_KIND_COUNT)
    return cm_errorf(err, CM_EINVALID, "invalid init kind %d", (int)a->init.kind);
  if (op == CM_OP_PARAM && !cm_dtype_is_float(a->dtype))
    return cm_errorf(err, CM_EINVALID, "a param must have a float dtype, not %s",
                     cm_dtype_name(a->dtype));
  if (op == CM_OP_PARAM || op == CM_OP_STATE) return cm_init_check(&a->init, out, err);
  return CM_OK;
}

static bool unary_accepts(cm_op op, cm_dtype dt) {
  switch (op) {
  case CM_OP_NEG:
  case CM_OP_ABS:
  case CM_OP_RELU: return cm_dtype_is_float(dt) || cm_dtype_is_int(dt);
  case CM_OP_STOP_GRADIENT:
  case CM_OP_CAST: return true;
  default: return cm_dtype_is_float(dt);
  }
}

static cm_status infer_elementwise(cm_op op, const cm_type *const *in, int n, const cm_attrs *a,
                                   cm_type *out, cm_err *err) {
  char b0[128], b1[128], b2[128];
  if (n == 1) {
    if (!unary_accepts(op, in[0]->dtype))
      return cm_errorf(err, CM_EINVALID, "%s: dtype %s is not accepted", tstr(in[0], b0),
                       cm_dtype_name(in[0]->dtype));
    *out = *in[0];
    if (op == CM_OP_CAST) {
      if ((unsigned)a->dtype >= CM_DTYPE_COUNT)
        return cm_errorf(err, CM_EINVALID, "invalid dtype %d", (int)a->dtype);
      out->dtype = a->dtype;
    }
    return CM_OK;
  }
  if (op == CM_OP_SELECT) {
    if (in[0]->dtype != CM_BOOL)
      return cm_errorf(err, CM_EINVALID, "condition %s is not bool", tstr(in[0], b0));
    if (!cm_shape_equal(in[0], in[1]) || !cm_type_equal(in[1], in[2]))
      return cm_errorf(err, CM_EINVALID,
                       "%s ? %s : %s: the condition and both values must have one shape and the "
                       "values one dtype",
                       tstr(in[0], b0), tstr(in[1], b1), tstr(in[2], b2));
    *out = *in[1];
    return CM_OK;
  }
  if (!cm_shape_equal(in[0], in[1]))
    return cm_errorf(err, CM_EINVALID,
                     "%s and %s: shapes differ (broadcast explicitly with a broadcast node)",
                     tstr(in[0], b0), tstr(in[1], b1));
  if (in[0]->dtype != in[1]->dtype)
    return cm_errorf(err, CM_EINVALID, "%s and %s: dtypes differ (cast explicitly)",
                     tstr(in[0], b0), tstr(in[1], b1));
  cm_dtype dt = in[0]->dtype;
  bool is_num = cm_dtype_is_float(dt) || cm_dtype_is_int(dt);
  bool ok;
  switch (op) {
  case CM_OP_POW: ok = cm_dtype_is_float(dt); break;
  case CM_OP_EQ:
  case CM_OP_NE: ok = true; break;
  default: ok = is_num; break;
  }
  if (!ok)
    return cm_errorf(err, CM_EINVALID, "%s and %s: dtype %s is not accepted", tstr(in[0], b0),
                     tstr(in[1], b1), cm_dtype_name(dt));
  *out = *in[0];
  if (op == CM_OP_LT || op == CM_OP_LE || op == CM_OP_EQ || op == CM_OP_NE) out->dtype = CM_BOOL;
  return CM_OK;
}

static cm_status infer_reduce(const cm_type *x, const cm_attrs *a, cm_type *out, cm_err *err) {
  char b0[128];
  if (!cm_dtype_is_float(x->dtype) && !cm_dtype_is_int(x->dtype))
    return cm_errorf(err, CM_EINVALID, "%s: dtype %s is not accepted", tstr(x, b0),
                     cm_dtype_name(x->dtype));
  if (a->n_axes < 0 || a->n_axes > x->rank)
    return cm_errorf(err, CM_EINVALID, "%s: %d axes for rank %d", tstr(x, b0), a->n_axes, x->rank);
  bool reduced[CM_MAX_RANK] = {false};
  for (int i = 0; i < a->n_axes; i++) {
    int ax = a->axes[i];
    if (ax < 0 || ax >= x->rank)
      return cm_errorf(err, CM_EINVALID, "%s: axis %d outside [0, %d)", tstr(x, b0), ax, x->rank);
    if (reduced[ax])
      return cm_errorf(err, CM_EINVALID, "%s: axis %d listed twice", tstr(x, b0), ax);
    reduced[ax] = true;
  }
  *out = *x;
  out->rank = 0;
  memset(out->dims, 0, sizeof out->dims);
  for (int i = 0; i < x->rank; i++) {
    if (!reduced[i])
      out->dims[out->rank++] = x->dims[i];
    else if (a->keepdims)
      out->dims[out->rank++] = 1;
  }
  return CM_OK;
}

static cm_status infer_permute(const cm_type *x, const cm_attrs *a, cm_type *out, cm_err *err) {
  char b0[128];
  bool seen[CM_MAX_RANK] = {false};
  *out = *x;
  for (int i = 0; i < x->rank; i++) {
    int p = a->perm[i];
    if (p < 0 || p >= x->rank || seen[p])
      return cm_errorf(err, CM_EINVALID, "%s: perm is not a permutation of 0..%d", tstr(x, b0),
                       x->rank - 1);
    seen[p] = true;
    out->dims[i] = x->dims[p];
  }
  return CM_OK;
}

static cm_status infer_broadcast(const cm_type *x, const cm_attrs *a, cm_type *out, cm_err *err) {
  char b0[128], b1[128];
  cm_status st = check_shape(a->rank, a->shape, "shape", err);
  if (st) return st;
  cm_type target = cm_type_make(x->dtype, a->rank, a->shape);
  if (a->rank < x->rank)
    return cm_errorf(err, CM_EINVALID, "%s to %s: the target has a lower rank", tstr(x, b0),
                     tstr(&target, b1));
  for (int i = 0; i < x->rank; i++) {
    int64_t d = x->dims[i], t = a->shape[a->rank - x->rank + i];
    if (d != 1 && d != t)
      return cm_errorf(err, CM_EINVALID, "%s to %s: dimension %d is %lld, neither 1 nor %lld",
                       tstr(x, b0), tstr(&target, b1), i, (long long)d, (long long)t);
  }
  *out = target;
  return CM_OK;
}

static cm_status infer_slice(const cm_type *x, const cm_attrs *a, cm_type *out, cm_err *err) {
  char b0[128];
  *out = *x;
  for (int i = 0; i < x->rank; i++) {
    int64_t s = a->start[i], e = a->stop[i], k = a->step[i];
    if (k < 1)
      return cm_errorf(err, CM_EINVALID, "%s: step %lld on axis %d is not >= 1", tstr(x, b0),
                       (long long)k, i);
    if (s < 0 || s >= e || e > x->dims[i])
      return cm_errorf(err, CM_EINVALID, "%s: axis %d: need 0 <= start %lld < stop %lld <= %lld",
                       tstr(x, b0), i, (long long)s, (long long)e, (long long)x->dims[i]);
    out->dims[i] = (e - s + k - 1) / k;
  }
  return CM_OK;
}

static cm_status infer_concat(const cm_type *const *in, int n, const cm_attrs *a, cm_type *out,
                              cm_err *err) {
  char b0[128], b1[128];
  const cm_type *x = in[0];
  if (x->rank == 0) return cm_errorf(err, CM_EINVALID, "cannot concatenate scalars");
  if (a->axis < 0 || a->axis >= x->rank)
    return cm_errorf(err, CM_EINVALID, "%s: axis %d outside [0, %d)", tstr(x, b0), a->axis,
                     x->rank);
  *out = *x;
  for (int k = 1; k < n; k++) {
    const cm_type *y = in[k];
    bool ok = y->rank == x->rank && y->dtype == x->dtype;
    for (int i = 0; ok && i < x->rank; i++)
      if (i != a->axis && y->dims[i] != x->dims[i]) ok = false;
    if (!ok)
      return cm_errorf(err, CM_EINVALID,
                       "input 0 is %s but input %d is %s: dtype and dims other than axis %d must "
                       "match",
                       tstr(x, b0), k, tstr(y, b1), a->axis);
    out->dims[a->axis] += y->dims[a->axis];
    if (out->dims[a->axis] > CM_MAX_ELEMENTS)
      return cm_errorf(err, CM_EINVALID, "result has more than 2^40 elements");
  }
  return check_shape(out->rank, out->dims, "result", err);
}

static cm_status infer_pad(const cm_type *x, const cm_attrs *a, cm_type *out, cm_err *err) {
  char b0[128];
  *out = *x;
  for (int i = 0; i < x->rank; i++) {
    for (int side = 0; side < 2; side++) {
      int64_t v = side ? a->hi[i] : a->lo[i];
      if (v < 0 || v > CM_MAX_ELEMENTS)
        return cm_errorf(err, CM_EINVALID,
                         "%s: padding %s %lld on axis %d is out of range [0, 2^40]", tstr(x, b0),
                         side ? "hi" : "lo", (long long)v, i);
    }
    out->dims[i] = x->dims[i] + a->lo[i] + a->hi[i];
  }
  char why[160];
  if (!cm_value_fits(a->value, x->dtype, why, sizeof why))
    return cm_errorf(err, CM_EINVALID, "%s: value %s", tstr(x, b0), why);
  return check_shape(out->rank, out->dims, "result", err);
}

/* gather / scatter_add: index (int) matches the data's dims except along axis. */
static cm_status check_indexed(const cm_type *data, const cm_type *index, int axis,
                               const char *what, cm_err *err) {
  char b0[128], b1[128];
  if (!cm_dtype_is_int(index->dtype))
    return cm_errorf(err, CM_EINVALID, "index %s is not an integer tensor", tstr(index, b1));
  if (data->rank == 0) return cm_errorf(err, CM_EINVALID, "%s is a scalar", tstr(data, b0));
  if (axis < 0 || axis >= data->rank)
    return cm_errorf(err, CM_EINVALID, "%s: axis %d outside [0, %d)", tstr(data, b0), axis,
                     data->rank);
  if (index->rank != data->rank)
    return cm_errorf(err, CM_EINVALID, "%s and index %s: ranks differ", tstr(data, b0),
                     tstr(index, b1));
  for (int i = 0; i < data->rank; i++)
    if (i != axis && index->dims[i] != data->dims[i])
      return cm_errorf(err, CM_EINVALID,
                       "%s %s and index %s: dimension %d differs (only axis %d may)", what,
                       tstr(data, b0), tstr(index, b1), i, axis);
  return CM_OK;
}

static cm_status infer_matmul(const cm_type *a, const cm_type *b, const cm_attrs *at, cm_type *out,
                              cm_err *err) {
  char b0[128], b1[128];
  if (a->rank < 2 || b->rank < 2)
    return cm_errorf(err, CM_EINVALID, "%s x %s: both operands need rank >= 2", tstr(a, b0),
                     tstr(b, b1));
  if (a->dtype != b->dtype)
    return cm_errorf(err, CM_EINVALID, "%s x %s: dtypes differ", tstr(a, b0), tstr(b, b1));
  if (!cm_dtype_is_float(a->dtype) && !cm_dtype_is_int(a->dtype))
    return cm_errorf(err, CM_EINVALID, "%s x %s: dtype %s is not accepted", tstr(a, b0),
                     tstr(b, b1), cm_dtype_name(a->dtype));
  int64_t m = at->transpose_a ? a->dims[a->rank - 1] : a->dims[a->rank - 2];
  int64_t ka = at->transpose_a ? a->dims[a->rank - 2] : a->dims[a->rank - 1];
  int64_t kb = at->transpose_b ? b->dims[b->rank - 1] : b->dims[b->rank - 2];
  int64_t n = at->transpose_b ? b->dims[b->rank - 2] : b->dims[b->rank - 1];
  if (ka != kb)
    return cm_errorf(err, CM_EINVALID, "%s x %s%s: inner dimensions %lld and %lld differ",
                     tstr(a, b0), tstr(b, b1),
                     at->transpose_a || at->transpose_b
                         ? (at->transpose_a
                                ? (at->transpose_b ? " (both transposed)" : " (a transposed)")
                                : " (b transposed)")
                         : "",
                     (long long)ka, (long long)kb);
  int ba = a->rank - 2, bb = b->rank - 2, batch = ba > bb ? ba : bb;
  out->dtype = a->dtype;
  out->rank = batch + 2;
  memset(out->dims, 0, sizeof out->dims);
  for (int i = 0; i < batch; i++) {
    int ia = i - (batch - ba), ib = i - (batch - bb);
    int64_t da = ia >= 0 ? a->dims[ia] : 1, db = ib >= 0 ? b->dims[ib] : 1;
    if (da != db && da != 1 && db != 1)
      return cm_errorf(err, CM_EINVALID, "%s x %s: batch dimensions %lld and %lld do not broadcast",
                       tstr(a, b0), tstr(b, b1), (long long)da, (long long)db);
    out->dims[i] = da > db ? da : db;
  }
  out->dims[batch] = m;
  out->dims[batch + 1] = n;
  return check_shape(out->rank, out->dims, "result", err);
}

static cm_status check_conv_attrs(const cm_attrs *a, cm_err *err) {
  for (int i = 0; i < 2; i++) {
    if (a->stride[i] < 1)
      return cm_errorf(err, CM_EINVALID, "stride [%d,%d] must be >= 1", a->stride[0], a->stride[1]);
    if (a->dilation[i] < 1)
      return cm_errorf(err, CM_EINVALID, "dilation [%d,%d] must be >= 1", a->dilation[0],
                       a->dilation[1]);
    if (a->padding[i] < 0 || a->padding[i] > (1 << 20))
      return cm_errorf(err, CM_EINVALID, "padding [%d,%d] must be in [0, 2^20]", a->padding[0],
                       a->padding[1]);
  }
  if (a->groups < 1) return cm_errorf(err, CM_EINVALID, "groups %d must be >= 1", a->groups);
  return CM_OK;
}

/* The conv2d output type for x and w, or an error naming both. */
static cm_status conv_output(const cm_type *x, const cm_type *w, const cm_attrs *a, cm_type *out,
                             cm_err *err) {
  char b0[128], b1[128];
  cm_status st = check_conv_attrs(a, err);
  if (st) return st;
  if (x->rank != 4 || w->rank != 4)
    return cm_errorf(err, CM_EINVALID, "input %s and weight %s: both must be rank 4 (NCHW, OIHW)",
                     tstr(x, b0), tstr(w, b1));
  if (x->dtype != w->dtype || !cm_dtype_is_float(x->dtype))
    return cm_errorf(err, CM_EINVALID, "input %s and weight %s: need one float dtype", tstr(x, b0),
                     tstr(w, b1));
  int64_t c = x->dims[1], o = w->dims[0], g = a->groups;
  if (c % g || o % g)
    return cm_errorf(err, CM_EINVALID,
                     "input %s and weight %s: groups %lld must divide channels %lld and outputs "
                     "%lld",
                     tstr(x, b0), tstr(w, b1), (long long)g, (long long)c, (long long)o);
  if (w->dims[1] != c / g)
    return cm_errorf(err, CM_EINVALID,
                     "input %s and weight %s: weight has %lld input channels, need %lld / groups "
                     "%lld = %lld",
                     tstr(x, b0), tstr(w, b1), (long long)w->dims[1], (long long)c, (long long)g,
                     (long long)(c / g));
  out->dtype = x->dtype;
  out->rank = 4;
  memset(out->dims, 0, sizeof out->dims);
  out->dims[0] = x->dims[0];
  out->dims[1] = o;
  for (int i = 0; i < 2; i++) {
    int64_t span = (int64_t)a->dilation[i] * (w->dims[2 + i] - 1) + 1;
    int64_t padded = x->dims[2 + i] + 2 * (int64_t)a->padding[i];
    if (padded < span)
      return cm_errorf(err, CM_EINVALID,
                       "input %s and weight %s: the padded input (%lld) is smaller than the "
                       "dilated kernel (%lld) on axis %d",
                       tstr(x, b0), tstr(w, b1), (long long)padded, (long long)span, 2 + i);
    out->dims[2 + i] = (padded - span) / a->stride[i] + 1;
  }
  return CM_OK;
}

static cm_status infer_conv_grad(cm_op op, const cm_type *in0, const cm_type *in1,
                                 const cm_attrs *a, cm_type *out, cm_err *err) {
  char b0[128], b1[128];
  cm_status st = check_shape(a->rank, a->shape, "shape", err);
  if (st) return st;
  if (a->rank != 4) return cm_errorf(err, CM_EINVALID, "shape must have rank 4, not %d", a->rank);
  cm_type declared = cm_type_make(in0->dtype, 4, a->shape);
  cm_type x, w, dy_expected;
  const cm_type *dy;
  if (op == CM_OP_CONV2D_GRAD_INPUT) { /* (dy, w), shape = x */
    dy = in0;
    w = *in1;
    x = declared;
  } else { /* (x, dy), shape = w */
    x = *in0;
    dy = in1;
    w = declared;
  }
  st = conv_output(&x, &w, a, &dy_expected, err);
  if (st) return st;
  if (!cm_type_equal(dy, &dy_expected))
    return cm_errorf(err, CM_EINVALID,
                     "gradient %s does not match the conv2d output %s of input %s and weight %s",
                     tstr(dy, b0), tstr(&dy_expected, b1), tstr(&x, (char[128]){0}),
                     tstr(&w, (char[128]){0}));
  *out = op == CM_OP_CONV2D_GRAD_INPUT ? x : w;
  return CM_OK;
}

cm_status cm_infer_type(const cm_graph *g, cm_op op, const int *inputs, int n_inputs,
                        const cm_attrs *a, cm_type *out, cm_err *err) {
  const cm_op_info *info = cm_op_get_info(op);
  if (!info) return cm_errorf(err, CM_EINVALID, "unknown op %d", (int)op);
  if (info->arity >= 0 ? n_inputs != info->arity : n_inputs < 1)
    return cm_errorf(err, CM_EINVALID, "takes %d inputs, got %d", info->arity, n_inputs);
  const cm_type *in[3] = {NULL, NULL, NULL};
  for (int i = 0; i < n_inputs && i < 3; i++) {
    if (inputs[i] < 0 || inputs[i] >= g->n_nodes)
      return cm_errorf(err, CM_EINVALID, "input %d is node %d, which does not exist", i, inputs[i]);
    in[i] = &g->nodes[inputs[i]].type;
  }
  memset(out, 0, sizeof *out);
  switch (info->category) {
  case CM_CAT_SOURCE: return infer_source(op, a, out, err);
  case CM_CAT_ELEMENTWISE: return infer_elementwise(op, in, n_inputs, a, out, err);
  case CM_CAT_REDUCE: return infer_reduce(in[0], a, out, err);
  default: break;
  }
  char b0[128], b1[128];
  switch (op) {
  case CM_OP_RESHAPE: {
    cm_status st = check_shape(a->rank, a->shape, "shape", err);
    if (st) return st;
    cm_type t = cm_type_make(in[0]->dtype, a->rank, a->shape);
    if (cm_type_numel(&t) != cm_type_numel(in[0]))
      return cm_errorf(err, CM_EINVALID, "%s to %s: element counts %lld and %lld differ",
                       tstr(in[0], b0), tstr(&t, b1), (long long)cm_type_numel(in[0]),
                       (long long)cm_type_numel(&t));
    *out = t;
    return CM_OK;
  }
  case CM_OP_PERMUTE: return infer_permute(in[0], a, out, err);
  case CM_OP_BROADCAST: return infer_broadcast(in[0], a, out, err);
  case CM_OP_SLICE: return infer_slice(in[0], a, out, err);
  case CM_OP_CONCAT: {
    const cm_type *types[64];
    if (n_inputs > 64)
      return cm_errorf(err, CM_EINVALID, "concat of %d inputs; at most 64", n_inputs);
    for (int i = 0; i < n_inputs; i++) {
      if (inputs[i] < 0 || inputs[i] >= g->n_nodes)
        return cm_errorf(err, CM_EINVALID, "input %d is node %d, which does not exist", i,
                         inputs[i]);
      types[i] = &g->nodes[inputs[i]].type;
    }
    return infer_concat(types, n_inputs, a, out, err);
  }
  case CM_OP_PAD: return infer_pad(in[0], a, out, err);
  case CM_OP_GATHER: {
    cm_status st = check_indexed(in[0], in[1], a->axis, "data", err);
    if (st) return st;
    *out = *in[1];
    out->dtype = in[0]->dtype;
    return CM_OK;
  }
  case CM_OP_SCATTER_ADD: {
    cm_status st = check_indexed(in[0], in[1], a->axis, "base", err);
    if (st) return st;
    if (!cm_shape_equal(in[1], in[2]) || in[2]->dtype != in[0]->dtype)
      return cm_errorf(err, CM_EINVALID,
                       "index %s and updates %s: need one shape, and updates the dtype of base %s",
                       tstr(in[1], b0), tstr(in[2], b1), tstr(in[0], (char[128]){0}));
    if (!cm_dtype_is_float(in[0]->dtype) && !cm_dtype_is_int(in[0]->dtype))
      return cm_errorf(err, CM_EINVALID, "base %s: dtype not accepted", tstr(in[0], b0));
    *out = *in[0];
    return CM_OK;
  }
  case CM_OP_MATMUL: return infer_matmul(in[0], in[1], a, out, err);
  case CM_OP_CONV2D: return conv_output(in[0], in[1], a, out, err);
  case CM_OP_CONV2D_GRAD_INPUT:
  case CM_OP_CONV2D_GRAD_WEIGHT: return infer_conv_grad(op, in[0], in[1], a, out, err);
  case CM_OP_ALL_REDUCE:
    if (a->ranks < 1) return cm_errorf(err, CM_EINVALID, "ranks %d must be >= 1", a->ranks);
    if (a->mode != CM_MODE_SUM && a->mode != CM_MODE_MEAN)
      return cm_errorf(err, CM_EINVALID, "mode %d is neither sum nor mean", (int)a->mode);
    if (!cm_dtype_is_float(in[0]->dtype) && !cm_dtype_is_int(in[0]->dtype))
      return cm_errorf(err, CM_EINVALID, "%s: dtype not accepted", tstr(in[0], b0));
    *out = *in[0];
    return CM_OK;
  case CM_OP_ALL_GATHER:
    if (a->ranks < 1 || a->ranks > 65536)
      return cm_errorf(err, CM_EINVALID, "ranks %d must be in [1, 65536]", a->ranks);
    if (in[0]->rank == 0 || a->axis < 0 || a->axis >= in[0]->rank)
      return cm_errorf(err, CM_EINVALID, "%s: axis %d outside [0, %d)", tstr(in[0], b0), a->axis,
                       in[0]->rank);
    *out = *in[0];
    out->dims[a->axis] *= a->ranks;
    return check_shape(out->rank, out->dims, "result", err);
  case CM_OP_ASSIGN: {
    const cm_node *target = &g->nodes[inputs[0]];
    if (target->op != CM_OP_PARAM && target->op != CM_OP_STATE)
      return cm_errorf(err, CM_EINVALID, "target \"%s\" is a %s, not a param or state",
                       target->name, cm_op_name(target->op));
    if (!cm_type_equal(in[0], in[1]))
      return cm_errorf(err, CM_EINVALID, "target \"%s\" is %s but the value is %s", target->name,
                       tstr(in[0], b0), tstr(in[1], b1));
    *out = *in[0];
    return CM_OK;
  }
  default: break;
  }
  return cm_errorf(err, CM_EINTERNAL, "no type rule for op %s", info->name);
}
