/* passes/rewrite.c — rebuilding a graph node by node, for the clean-up passes. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

cm_status cm_rewriter_begin(cm_rewriter *r, const cm_graph *old, cm_err *err) {
  r->old = old;
  r->g = cm_graph_new();
  r->map = malloc(sizeof(int) * (size_t)(old->n_nodes ? old->n_nodes : 1));
  if (!r->g || !r->map) {
    cm_rewriter_abort(r);
    return cm_errorf(err, CM_EINTERNAL, "rewrite: out of memory");
  }
  for (int i = 0; i < old->n_nodes; i++) r->map[i] = -1;
  return CM_OK;
}

int cm_rewriter_copy(cm_rewriter *r, int id) {
  const cm_node *n = &r->old->nodes[id];
  int stack_inputs[16], *inputs = stack_inputs;
  if (n->n_inputs > 16) inputs = malloc(sizeof(int) * (size_t)n->n_inputs);
  if (!inputs) return -1;
  for (int k = 0; k < n->n_inputs; k++) inputs[k] = r->map[n->inputs[k]];
  int new_id = -1;
  bool mapped = true;
  for (int k = 0; k < n->n_inputs; k++) mapped &= inputs[k] >= 0;
  if (mapped && r->g->error.status == CM_OK) {
    cm_err e;
    const char *name = n->name[0] == '%' ? NULL : n->name;
    new_id = cm_graph_add(r->g, n->op, name, inputs, n->n_inputs, &n->attrs, &e);
    if (new_id < 0) r->g->error = e;
  } else if (!mapped && r->g->error.status == CM_OK) {
    cm_errorf(&r->g->error, CM_EINTERNAL, "rewrite: an input of \"%s\" was dropped", n->name);
  }
  if (inputs != stack_inputs) free(inputs);
  r->map[id] = new_id;
  return new_id;
}

cm_status cm_rewriter_finish(cm_rewriter *r, cm_graph **out, cm_err *err) {
  cm_status st = CM_OK;
  if (r->g->error.status) {
    st = cm_errorf(err, r->g->error.status, "%s", r->g->error.msg);
  } else {
    for (int k = 0; k < r->old->n_outputs && !st; k++) {
      int o = r->map[r->old->outputs[k]];
      if (o < 0)
        st = cm_errorf(err, CM_EINTERNAL, "rewrite: output \"%s\" was dropped",
                       r->old->nodes[r->old->outputs[k]].name);
      else
        st = cm_graph_add_output(r->g, o, err);
    }
    if (!st) st = cm_graph_verify(r->g, err);
  }
  if (st) {
    cm_rewriter_abort(r);
    return st;
  }
  *out = r->g;
  r->g = NULL;
  free(r->map);
  r->map = NULL;
  return CM_OK;
}

void cm_rewriter_abort(cm_rewriter *r) {
  cm_graph_free(r->g);
  free(r->map);
  r->g = NULL;
  r->map = NULL;
}

bool cm_node_is_pinned(const cm_graph *g, int id, const bool *is_output) {
  cm_op op = g->nodes[id].op;
  return is_output[id] || op == CM_OP_ASSIGN || op == CM_OP_INPUT || op == CM_OP_PARAM ||
         op == CM_OP_STATE;
}
