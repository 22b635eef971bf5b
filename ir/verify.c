/* ir/verify.c — whole-graph invariants, checked after any construction or pass. */
#include "ir.h"

#include <stdlib.h>
#include <string.h>

cm_status cm_graph_verify(const cm_graph *g, cm_err *err) {
  cm_status st = CM_OK;
  int *assigned = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof(int));
  if (!assigned) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < g->n_nodes && !st; i++) {
    const cm_node *n = &g->nodes[i];
    const cm_op_info *info = cm_op_get_info(n->op);
    const char *name = n->name ? n->name : "?";
    if (!info) {
      st = cm_errorf(err, CM_EINVALID, "nodes[%d] \"%s\": unknown op %d", i, name, (int)n->op);
      break;
    }
    if (!cm_name_is_valid(n->name)) {
      st = cm_errorf(err, CM_EINVALID, "nodes[%d] \"%s\" (%s): invalid name", i, name, info->name);
      break;
    }
    int found = cm_graph_find(g, n->name);
    if (found != i) {
      st = cm_errorf(err, CM_EINVALID, "nodes[%d] \"%s\" (%s): name also used by nodes[%d]", i,
                     name, info->name, found);
      break;
    }
    if (info->arity >= 0 ? n->n_inputs != info->arity : n->n_inputs < 1) {
      st = cm_errorf(err, CM_EINVALID, "nodes[%d] \"%s\" (%s): takes %d inputs, has %d", i, name,
                     info->name, info->arity, n->n_inputs);
      break;
    }
    for (int k = 0; k < n->n_inputs; k++)
      if (n->inputs[k] < 0 || n->inputs[k] >= i) {
        st = cm_errorf(err, CM_EINVALID,
                       "nodes[%d] \"%s\" (%s): input %d is node %d, which does not precede it", i,
                       name, info->name, k, n->inputs[k]);
        break;
      }
    if (st) break;
    cm_type t;
    cm_err local;
    if (cm_infer_type(g, n->op, n->inputs, n->n_inputs, &n->attrs, &t, &local)) {
      st =
          cm_errorf(err, local.status, "nodes[%d] \"%s\" (%s): %s", i, name, info->name, local.msg);
      break;
    }
    if (!cm_type_equal(&t, &n->type)) {
      char a[128], b[128];
      st = cm_errorf(err, CM_EINVALID, "nodes[%d] \"%s\" (%s): type is %s but inference gives %s",
                     i, name, info->name, cm_type_str(&n->type, a, sizeof a),
                     cm_type_str(&t, b, sizeof b));
      break;
    }
    if (n->op == CM_OP_ASSIGN) {
      int target = n->inputs[0];
      if (assigned[target]) {
        st = cm_errorf(err, CM_EINVALID,
                       "nodes[%d] \"%s\" (assign): \"%s\" is already assigned by \"%s\"", i, name,
                       g->nodes[target].name, g->nodes[assigned[target] - 1].name);
        break;
      }
      assigned[target] = i + 1;
    }
  }
  for (int k = 0; k < g->n_outputs && !st; k++)
    if (g->outputs[k] < 0 || g->outputs[k] >= g->n_nodes)
      st = cm_errorf(err, CM_EINVALID, "outputs[%d]: node %d does not exist", k, g->outputs[k]);
  free(assigned);
  return st;
}
