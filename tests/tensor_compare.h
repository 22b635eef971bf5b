/* tests/tensor_compare.h — how the differential tests compare a backend's
 * tensors with the oracle's: the relative error (older tests), and the
 * forward error bounds of cm_eval_bounded, for a whole short graph
 * (test_oracle) or one kernel of a long one on the backend's own inputs
 * (test_check_group), with a tally of the worst ratio and the loosest bound
 * for the test's report. */
#pragma once

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ir/ir.h"
#include "passes/passes.h"

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
 * (how tight the bound is: near 1 it no longer tells a bug from rounding;
 * INFINITY where a result may overflow). NaN must meet NaN and an infinite ref
 * an equal got. */
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
      q = d == 0 || isinf(e) ? 0 : d / e; /* e == 0: INFINITY; e infinite: anything */
    if (!(q <= r.ratio)) r.ratio = q, r.diff = d, r.bound = e, r.at = i;
    if (!isnan(b) && !isinf(b)) r.scale = fmax(r.scale, fabs(b));
    if (!isnan(e)) max_bound = fmax(max_bound, e);
  }
  r.spread = max_bound / fmax(r.scale, 1e-300);
  return r;
}

/* got (a backend's tensor of a node of dtype dt) against the bounded oracle's
 * value and bound. For an f64 node the oracle, itself evaluated in f64, is one
 * more conforming evaluation, as far from the exact value as the bound allows:
 * |got - ref| <= |got - exact| + |exact - ref| <= 2 bound, and ratio is
 * |got - ref| / (2 bound). For narrower dtypes the oracle's own error (2^-53
 * relative per operation) is negligible against the bound (2^-24 or more). */
static inline test_bounded test_check_node(const cm_tensor *got, const cm_tensor *ref,
                                           const cm_tensor *bound, cm_dtype dt) {
  test_bounded r = test_check_bounded(got, ref, bound);
  if (dt == CM_F64 && isfinite(r.ratio)) r.ratio /= 2, r.bound *= 2, r.spread *= 2;
  return r;
}

/* ---- the tally: what a test's bounded comparisons saw -------------------- */

typedef struct test_tally {
  int compared, unbounded; /* unbounded: tensors with an infinite bound (overflow) */
  int loose;               /* tensors whose bound exceeds 1e-3 of their scale */
  double worst, loosest;   /* the largest ratio and the largest finite spread */
  char worst_at[96], loosest_at[96];
} test_tally;

static inline test_tally *test_tally_get(void) {
  static test_tally t;
  return &t;
}

/* Adds one comparison (labelled what) to the tally; returns r. */
static inline test_bounded test_tally_add(test_bounded r, const char *what) {
  test_tally *t = test_tally_get();
  t->compared++;
  if (!(r.ratio <= t->worst) || t->compared == 1) {
    t->worst = r.ratio;
    snprintf(t->worst_at, sizeof t->worst_at, "%s", what);
  }
  t->unbounded += isinf(r.spread);
  t->loose += isfinite(r.spread) && r.spread > 1e-3;
  if (isfinite(r.spread) && r.spread > t->loosest) {
    t->loosest = r.spread;
    snprintf(t->loosest_at, sizeof t->loosest_at, "%s", what);
  }
  return r;
}

/* Prints the tally (the worst |got - f64| / bound, the loosest finite bound
 * over its tensor's scale and how many exceed 1e-3 of it (a tensor whose
 * exact value is near 0 has only rounding noise to compare), how many had an
 * infinite bound) to stderr and starts a new one. */
static inline void test_tally_report(const char *what) {
  test_tally *t = test_tally_get();
  fprintf(stderr,
          "%s: %d tensors against their error bounds, worst |got - f64| / bound %.3g (%s); "
          "largest finite bound / scale %.2g (%s), %d above 1e-3; %d with an infinite bound\n",
          what, t->compared, t->worst, t->worst_at, t->loosest, t->loosest_at, t->loose,
          t->unbounded);
  memset(t, 0, sizeof *t);
}

/* A tensor over caller-owned data (a backend's buffer): never cm_tensor_free it. */
static inline cm_tensor test_view(cm_type type, const void *data) {
  cm_tensor t;
  t.type = type;
  t.data = (void *)data;
  return t;
}

/* ---- a whole graph against the bounded oracle ----------------------------- */

/* The f64 value and forward error bound of every node of a graph short
 * enough (a few ops, a matmul or two) for bounds carried end to end to stay
 * tight; long graphs are checked kernel by kernel (test_check_group). */
typedef struct test_oracle {
  const cm_graph *g;
  cm_tensor *val, *bnd;
} test_oracle;

static inline cm_status test_oracle_eval(test_oracle *o, const cm_graph *g,
                                         const cm_tensor *const *sources, cm_err *err) {
  o->g = g;
  o->val = calloc((size_t)g->n_nodes + 1, sizeof *o->val);
  o->bnd = calloc((size_t)g->n_nodes + 1, sizeof *o->bnd);
  if (!o->val || !o->bnd) return cm_errorf(err, CM_EINTERNAL, "test_oracle_eval: out of memory");
  return cm_eval_bounded(g, sources, o->val, o->bnd, err);
}

static inline void test_oracle_free(test_oracle *o) {
  for (int i = 0; o->val && o->bnd && i < o->g->n_nodes; i++)
    cm_tensor_free(&o->val[i]), cm_tensor_free(&o->bnd[i]);
  free(o->val), free(o->bnd);
  memset(o, 0, sizeof *o);
}

/* got against node v of the oracle's graph (an assign node: the state's new
 * value), tallied as "what: <node name>". */
static inline test_bounded test_oracle_check(const test_oracle *o, int v, const cm_tensor *got,
                                             const char *what) {
  char label[96];
  snprintf(label, sizeof label, "%s: %s", what, o->g->nodes[v].name);
  return test_tally_add(test_check_node(got, &o->val[v], &o->bnd[v], o->g->nodes[v].type.dtype),
                        label);
}

/* ---- one kernel of a long graph on the backend's own inputs --------------- */

/* Group gi of plan p evaluated alone by the oracle (cm_plan_eval_group_bounded)
 * on what the backend gave it: fed sources from sources[v], every other input
 * from values[v] (views of the backend's buffers are fine: only outputs are
 * replaced and freed). Each output v is checked against got[v] (a tensor of
 * v's type; for an assign, the state's new value) and tallied. Returns the
 * worst check (ratio INFINITY when the evaluation fails, err set), *worst_node
 * the output it was on. */
static inline test_bounded test_check_group(const cm_graph *g, const cm_plan *p, int gi,
                                            const cm_tensor *const *sources, cm_tensor *values,
                                            const cm_tensor *got, const char *what, int *worst_node,
                                            cm_err *err) {
  const cm_group *gr = &p->groups[gi];
  test_bounded worst = {0, 0, 0, 0, 0, -1};
  *worst_node = gr->n_outputs ? gr->outputs[0] : -1;
  cm_tensor *bnd = calloc((size_t)g->n_nodes + 1, sizeof *bnd);
  for (int j = 0; j < gr->n_outputs; j++) memset(&values[gr->outputs[j]], 0, sizeof *values);
  if (!bnd || cm_plan_eval_group_bounded(g, p, gi, sources, values, bnd, err) != CM_OK) {
    free(bnd);
    worst.ratio = INFINITY;
    return worst;
  }
  for (int j = 0; j < gr->n_outputs; j++) {
    int v = gr->outputs[j];
    char label[96];
    snprintf(label, sizeof label, "%s: %s", what, g->nodes[v].name);
    test_bounded r = test_tally_add(
        test_check_node(&got[v], &values[v], &bnd[v], g->nodes[v].type.dtype), label);
    if (!(r.ratio <= worst.ratio) || j == 0) worst = r, *worst_node = v;
    cm_tensor_free(&values[v]), cm_tensor_free(&bnd[v]);
  }
  free(bnd);
  return worst;
}
