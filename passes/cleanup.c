/* passes/cleanup.c — dead-code elimination and common-subexpression elimination. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

static bool *output_flags(const cm_graph *g) {
  bool *is_output = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof *is_output);
  if (is_output)
    for (int k = 0; k < g->n_outputs; k++) is_output[g->outputs[k]] = true;
  return is_output;
}

/* A rewritten graph invalidates any plan made for the old one. */
static cm_status replace_graph(cm_pass_state *s, cm_graph *g) {
  cm_graph_free(s->g);
  s->g = g;
  if (s->plan) {
    cm_plan_free(s->plan);
    s->plan = NULL;
  }
  return CM_OK;
}

/* ---- dce ----------------------------------------------------------------- */

cm_status cm_pass_dce(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  const cm_graph *g = s->g;
  bool *is_output = output_flags(g);
  bool *live = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof *live);
  if (!is_output || !live) {
    free(is_output);
    free(live);
    return cm_errorf(err, CM_EINTERNAL, "dce: out of memory");
  }
  /* Roots: outputs, assigns and the sources (the graph's interface). */
  for (int i = 0; i < g->n_nodes; i++) live[i] = cm_node_is_pinned(g, i, is_output);
  for (int i = g->n_nodes - 1; i >= 0; i--)
    if (live[i])
      for (int k = 0; k < g->nodes[i].n_inputs; k++) live[g->nodes[i].inputs[k]] = true;
  cm_rewriter r;
  cm_status st = cm_rewriter_begin(&r, g, err);
  int removed = 0;
  for (int i = 0; i < g->n_nodes && !st; i++) {
    if (live[i])
      cm_rewriter_copy(&r, i);
    else
      removed++;
  }
  cm_graph *out = NULL;
  if (!st) st = cm_rewriter_finish(&r, &out, err);
  free(is_output);
  free(live);
  if (st) return st;
  snprintf(stat->detail, sizeof stat->detail, "removed %d dead nodes", removed);
  return replace_graph(s, out);
}

/* ---- cse ----------------------------------------------------------------- */

/* Doubles compare bitwise: +0 and -0 are different constants. */
static bool same_double(double x, double y) {
  return memcmp(&x, &y, sizeof x) == 0;
}

static bool attrs_equal(const cm_attrs *a, const cm_attrs *b) {
  if (!same_double(a->value, b->value) || !same_double(a->init.a, b->init.a) ||
      !same_double(a->init.b, b->init.b))
    return false;
  if (a->dtype != b->dtype || a->rank != b->rank || a->n_data != b->n_data || a->axis != b->axis ||
      a->n_axes != b->n_axes || a->keepdims != b->keepdims || a->transpose_a != b->transpose_a ||
      a->transpose_b != b->transpose_b || a->groups != b->groups || a->mode != b->mode ||
      a->ranks != b->ranks || a->init.kind != b->init.kind)
    return false;
  if (memcmp(a->shape, b->shape, sizeof a->shape) || memcmp(a->axes, b->axes, sizeof a->axes) ||
      memcmp(a->perm, b->perm, sizeof a->perm) || memcmp(a->start, b->start, sizeof a->start) ||
      memcmp(a->stop, b->stop, sizeof a->stop) || memcmp(a->step, b->step, sizeof a->step) ||
      memcmp(a->lo, b->lo, sizeof a->lo) || memcmp(a->hi, b->hi, sizeof a->hi) ||
      memcmp(a->stride, b->stride, sizeof a->stride) ||
      memcmp(a->padding, b->padding, sizeof a->padding) ||
      memcmp(a->dilation, b->dilation, sizeof a->dilation))
    return false;
  /* NaN payloads aside, bitwise equality is what "the same constant" means. */
  return a->n_data == 0 || memcmp(a->data, b->data, sizeof(double) * (size_t)a->n_data) == 0;
}

static bool same_node(const cm_node *a, const cm_node *b) {
  if (a->op != b->op || a->n_inputs != b->n_inputs || !cm_type_equal(&a->type, &b->type))
    return false;
  for (int k = 0; k < a->n_inputs; k++)
    if (a->inputs[k] != b->inputs[k]) return false;
  return attrs_equal(&a->attrs, &b->attrs);
}

static uint64_t node_hash(const cm_node *n) {
  uint64_t h = 1469598103934665603ull ^ (uint64_t)n->op;
  for (int k = 0; k < n->n_inputs; k++) h = (h ^ (uint64_t)n->inputs[k]) * 1099511628211ull;
  for (int d = 0; d < n->type.rank; d++) h = (h ^ (uint64_t)n->type.dims[d]) * 1099511628211ull;
  h = (h ^ (uint64_t)n->type.dtype) * 1099511628211ull;
  uint64_t v;
  memcpy(&v, &n->attrs.value, sizeof v);
  return (h ^ v) * 1099511628211ull;
}

static bool cse_candidate(cm_op op) {
  return op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE && op != CM_OP_ASSIGN &&
         op != CM_OP_ALL_REDUCE && op != CM_OP_ALL_GATHER;
}

cm_status cm_pass_cse(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  const cm_graph *g = s->g;
  bool *is_output = output_flags(g);
  int cap = 64;
  while (cap < 2 * g->n_nodes) cap *= 2;
  int *slots = malloc(sizeof(int) * (size_t)cap);
  if (!is_output || !slots) {
    free(is_output);
    free(slots);
    return cm_errorf(err, CM_EINTERNAL, "cse: out of memory");
  }
  for (int i = 0; i < cap; i++) slots[i] = -1;
  cm_rewriter r;
  cm_status st = cm_rewriter_begin(&r, g, err);
  int merged = 0;
  for (int i = 0; i < g->n_nodes && !st; i++) {
    const cm_node *n = &g->nodes[i];
    if (!cse_candidate(n->op)) {
      cm_rewriter_copy(&r, i);
      continue;
    }
    /* Look up the node as it would be in the new graph (inputs mapped). */
    int stack_inputs[16],
        *mapped = n->n_inputs <= 16 ? stack_inputs : malloc(sizeof(int) * (size_t)n->n_inputs);
    if (!mapped) {
      st = cm_errorf(err, CM_EINTERNAL, "cse: out of memory");
      break;
    }
    for (int k = 0; k < n->n_inputs; k++) mapped[k] = r.map[n->inputs[k]];
    cm_node probe = *n;
    probe.inputs = mapped;
    uint64_t h = node_hash(&probe) & (uint64_t)(cap - 1);
    int found = -1;
    for (; slots[h] >= 0; h = (h + 1) & (uint64_t)(cap - 1))
      if (same_node(&r.g->nodes[slots[h]], &probe)) {
        found = slots[h];
        break;
      }
    if (mapped != stack_inputs) free(mapped);
    if (found >= 0 && !is_output[i]) {
      r.map[i] = found;
      merged++;
      continue;
    }
    int id = cm_rewriter_copy(&r, i);
    if (id >= 0 && found < 0) slots[h] = id;
  }
  cm_graph *out = NULL;
  if (!st)
    st = cm_rewriter_finish(&r, &out, err);
  else
    cm_rewriter_abort(&r);
  free(is_output);
  free(slots);
  if (st) return st;
  snprintf(stat->detail, sizeof stat->detail, "merged %d duplicate nodes", merged);
  return replace_graph(s, out);
}
