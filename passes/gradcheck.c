/* passes/gradcheck.c — autodiff gradients against central finite differences,
 * both computed by the oracle in f64. */
#include "passes.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Evaluates g in f64 and copies node `id`'s value into out (caller frees). */
static cm_status eval_node(const cm_graph *g, const cm_tensor *const *sources, int id,
                           cm_tensor *out, cm_err *err) {
  cm_tensor *values = calloc((size_t)g->n_nodes, sizeof *values);
  if (!values) return cm_errorf(err, CM_EINTERNAL, "gradcheck: out of memory");
  cm_eval_opts opts = {CM_PRECISION_F64};
  cm_status st = cm_eval(g, sources, values, &opts, err);
  if (!st) {
    *out = values[id];
    values[id].data = NULL;
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&values[i]);
  }
  free(values);
  return st;
}

static double scalar_of(const cm_tensor *t) {
  return cm_tensor_get_f64(t, 0);
}

cm_status cm_gradcheck(const cm_graph *g, int loss, int n_wrt, const int *wrt,
                       const cm_tensor *const *sources, double step, cm_gradcheck_result *results,
                       cm_err *err) {
  cm_graph *dg = cm_graph_clone(g);
  int *grads = malloc(sizeof(int) * (size_t)(n_wrt ? n_wrt : 1));
  cm_tensor *copies = calloc((size_t)g->n_nodes, sizeof *copies);
  const cm_tensor **src = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof *src);
  cm_tensor *values = NULL;
  cm_status st = CM_OK;
  if (!dg || !grads || !copies || !src) {
    st = cm_errorf(err, CM_EINTERNAL, "gradcheck: out of memory");
    goto done;
  }
  if ((st = cm_autodiff(dg, loss, n_wrt, wrt, grads, err))) goto done;
  /* Sources as f64 copies, so perturbations are exact. */
  for (int i = 0; i < g->n_nodes; i++) {
    if (!sources[i]) continue;
    cm_type t = sources[i]->type;
    if (cm_dtype_is_float(t.dtype)) t.dtype = CM_F64;
    if ((st = cm_tensor_alloc(&copies[i], t, err))) goto done;
    int64_t n = cm_type_numel(&t);
    for (int64_t e = 0; e < n; e++) {
      if (cm_dtype_is_float(t.dtype))
        cm_tensor_set_f64(&copies[i], e, cm_tensor_get_f64(sources[i], e));
      else
        cm_tensor_set_i64(&copies[i], e, cm_tensor_get_i64(sources[i], e));
    }
    src[i] = &copies[i];
  }
  const cm_tensor **dsrc = calloc((size_t)dg->n_nodes, sizeof *dsrc);
  values = calloc((size_t)dg->n_nodes, sizeof *values);
  if (!dsrc || !values) {
    free(dsrc);
    st = cm_errorf(err, CM_EINTERNAL, "gradcheck: out of memory");
    goto done;
  }
  memcpy(dsrc, src, sizeof *src * (size_t)g->n_nodes);
  cm_eval_opts opts = {CM_PRECISION_F64};
  st = cm_eval(dg, dsrc, values, &opts, err);
  free(dsrc);
  if (st) {
    free(values);
    values = NULL;
    goto done;
  }
  for (int j = 0; j < n_wrt && !st; j++) {
    cm_gradcheck_result *r = &results[j];
    memset(r, 0, sizeof *r);
    r->node = wrt[j];
    const cm_tensor *ad = &values[grads[j]];
    cm_tensor *x = &copies[wrt[j]];
    if (!x->data) {
      st = cm_errorf(err, CM_EINVALID, "gradcheck: \"%s\" is not a source with a value",
                     g->nodes[wrt[j]].name);
      break;
    }
    int64_t n = cm_type_numel(&x->type);
    double max_diff = 0, max_ref = 0;
    for (int64_t e = 0; e < n && !st; e++) {
      double x0 = cm_tensor_get_f64(x, e), h = step * fmax(1.0, fabs(x0));
      cm_tensor lp = {0}, lm = {0};
      cm_tensor_set_f64(x, e, x0 + h);
      st = eval_node(g, src, loss, &lp, err);
      cm_tensor_set_f64(x, e, x0 - h);
      if (!st) st = eval_node(g, src, loss, &lm, err);
      cm_tensor_set_f64(x, e, x0);
      if (st) {
        cm_tensor_free(&lp);
        break;
      }
      double fd = (scalar_of(&lp) - scalar_of(&lm)) / (2 * h);
      cm_tensor_free(&lp);
      cm_tensor_free(&lm);
      double a = cm_tensor_get_f64(ad, e);
      double diff = fabs(a - fd);
      if (!(diff <= max_diff)) max_diff = diff; /* NaN sticks */
      max_ref = fmax(max_ref, fmax(fabs(fd), fabs(a)));
    }
    r->max_abs_error = max_diff;
    r->max_abs_gradient = max_ref;
    r->max_rel_error = max_diff / fmax(max_ref, 1e-8);
    r->elements = n;
  }
done:
  if (values) {
    for (int i = 0; i < dg->n_nodes; i++) cm_tensor_free(&values[i]);
    free(values);
  }
  if (copies)
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&copies[i]);
  free(copies);
  free(src);
  free(grads);
  cm_graph_free(dg);
  return st;
}
