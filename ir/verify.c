/* ir/verify.c — whole-graph invariants, checked after any construction or pass
 * and by every reader of a graph file. */
#include "ir.h"

#include <stdlib.h>
#include <string.h>

cm_status cm_graph_verify_at(const cm_graph *g, int *bad_node, cm_err *err) {
  if (bad_node) *bad_node = -1;
  cm_status st = CM_OK;
  int *assigned = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof(int));
  if (!assigned) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  int i = 0;
  for (; i < g->n_nodes && !st; i++) {
    const cm_node *n = &g->nodes[i];
    const cm_op_info *info = cm_op_get_info(n->op);
    if (!info) {
      st = cm_errorf(err, CM_EINVALID, "unknown op %d", (int)n->op);
      break;
    }
    if (!cm_name_is_valid(n->name)) {
      st = cm_errorf(err, CM_EINVALID, "invalid name");
      break;
    }
    int found = cm_graph_find(g, n->name);
    if (found != i) {
      st = cm_errorf(err, CM_EINVALID, "name also used by nodes[%d]", found);
      break;
    }
    if (info->arity >= 0 ? n->n_inputs != info->arity : n->n_inputs < 1) {
      st = cm_errorf(err, CM_EINVALID, "takes %d inputs, has %d", info->arity, n->n_inputs);
      break;
    }
    for (int k = 0; k < n->n_inputs; k++)
      if (n->inputs[k] < 0 || n->inputs[k] >= i) {
        st = cm_errorf(err, CM_EINVALID, "input %d is node %d, which does not precede it", k,
                       n->inputs[k]);
        break;
      }
    if (st) break;
    cm_type t;
    if ((st = cm_infer_type(g, n->op, n->inputs, n->n_inputs, &n->attrs, &t, err))) break;
    if (!cm_type_equal(&t, &n->type)) {
      char a[128], b[128];
      st = cm_errorf(err, CM_EINVALID, "type is %s but inference gives %s",
                     cm_type_str(&n->type, a, sizeof a), cm_type_str(&t, b, sizeof b));
      break;
    }
    if (n->op == CM_OP_ASSIGN) {
      int target = n->inputs[0];
      if (assigned[target]) {
        st = cm_errorf(err, CM_EINVALID, "\"%s\" is already assigned by \"%s\"",
                       g->nodes[target].name, g->nodes[assigned[target] - 1].name);
        break;
      }
      assigned[target] = i + 1;
    }
  }
  if (st && bad_node) *bad_node = i;
  for (int k = 0; k < g->n_outputs && !st; k++)
    if (g->outputs[k] < 0 || g->outputs[k] >= g->n_nodes)
      st = cm_errorf(err, CM_EINVALID, "outputs[%d]: node %d does not exist", k, g->outputs[k]);
  free(assigned);
  return st;
}

cm_status cm_graph_verify(const cm_graph *g, cm_err *err) {
  int bad = -1;
  cm_err local;
  if (!err) err = &local;
  cm_status st = cm_graph_verify_at(g, &bad, err);
  if (st && bad >= 0) {
    const cm_node *n = &g->nodes[bad];
    cm_err_prefix(err, "nodes[%d] \"%s\" (%s): ", bad, n->name ? n->name : "?", cm_op_name(n->op));
  }
  return st;
}
