/* passes/plan.c — fusion plans: the unfused plan, the checker, the group-by-group
 * evaluator and the printer. The schedule (schedule.c) and the memory plan
 * (memplan.c) fill in the plan's order and offsets.
 *
 * Vocabulary: "fed" sources (input, param, state) are given by the caller and
 * belong to no group. const and iota are computed and may be duplicated into
 * every group that uses them (they are free to recompute); any other node is in
 * exactly one group. A group's inputs are the values its nodes read from
 * outside the group; its outputs are its values read by another group, graph
 * outputs, and assigns (their result is written into the target state). */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

static const char *const group_kind_names[CM_GROUP_KIND_COUNT] = {
    [CM_GROUP_ELEMENTWISE] = "elementwise", [CM_GROUP_ROW] = "row",
    [CM_GROUP_REDUCE] = "reduce",           [CM_GROUP_GEMM] = "gemm",
    [CM_GROUP_ATTENTION] = "attention",     [CM_GROUP_CONV] = "conv",
    [CM_GROUP_COLLECTIVE] = "collective",   [CM_GROUP_UPDATE] = "update",
};

const char *cm_group_kind_name(cm_group_kind k) {
  return (unsigned)k < CM_GROUP_KIND_COUNT ? group_kind_names[k] : "?";
}

static bool is_fed(cm_op op) {
  return op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE;
}
static bool is_free(cm_op op) {
  return op == CM_OP_CONST || op == CM_OP_IOTA;
}

static cm_group_kind kind_of_op(cm_op op) {
  switch (cm_op_get_info(op)->category) {
  case CM_CAT_REDUCE: return CM_GROUP_REDUCE;
  case CM_CAT_CONTRACTION: return op == CM_OP_MATMUL ? CM_GROUP_GEMM : CM_GROUP_CONV;
  case CM_CAT_COLLECTIVE: return CM_GROUP_COLLECTIVE;
  case CM_CAT_UPDATE: return CM_GROUP_UPDATE;
  default: return CM_GROUP_ELEMENTWISE; /* elementwise, movement, const, iota */
  }
}

void cm_plan_free(cm_plan *p) {
  if (!p) return;
  for (int i = 0; p->groups && i < p->n_groups; i++) {
    free(p->groups[i].nodes);
    free(p->groups[i].inputs);
    free(p->groups[i].outputs);
  }
  free(p->groups);
  free(p->group_of);
  free(p->order);
  free(p->offset);
  free(p);
}

/* ---- the input/output rule ------------------------------------------------ */

/* Why a value must be written to memory: the first group reading it from
 * outside, or one of these. */
enum { NOT_NEEDED = -1, NEEDED_AS_GRAPH_OUTPUT = -2, NEEDED_AS_ASSIGN = -3 };

/* The exact inputs and outputs of every group, from the node lists and
 * group_of alone (node ids must be in range). in[gi]/out[gi] are malloc'd
 * arrays; reason[v] says why v is written (see above). */
typedef struct expected_io {
  int **in, *n_in, **out, *n_out;
  int *reason;
} expected_io;

static void expected_io_free(expected_io *e, int n_groups) {
  for (int i = 0; i < n_groups; i++) {
    if (e->in) free(e->in[i]);
    if (e->out) free(e->out[i]);
  }
  free(e->in);
  free(e->n_in);
  free(e->out);
  free(e->n_out);
  free(e->reason);
  memset(e, 0, sizeof *e);
}

static cm_status expected_io_compute(const cm_graph *g, const cm_plan *p, expected_io *e,
                                     cm_err *err) {
  int n = g->n_nodes, ng = p->n_groups;
  memset(e, 0, sizeof *e);
  e->in = calloc((size_t)ng + 1, sizeof *e->in);
  e->out = calloc((size_t)ng + 1, sizeof *e->out);
  e->n_in = calloc((size_t)ng + 1, sizeof *e->n_in);
  e->n_out = calloc((size_t)ng + 1, sizeof *e->n_out);
  e->reason = malloc(sizeof(int) * ((size_t)n + 1));
  int *member = malloc(sizeof(int) * ((size_t)n + 1)); /* last group stamped on the node */
  int *listed = malloc(sizeof(int) * ((size_t)n + 1)); /* last group listing it as input */
  int *scratch = malloc(sizeof(int) * ((size_t)n + 1));
  if (!e->in || !e->out || !e->n_in || !e->n_out || !e->reason || !member || !listed || !scratch) {
    free(member), free(listed), free(scratch);
    expected_io_free(e, ng);
    return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
  }
  for (int v = 0; v < n; v++) {
    e->reason[v] = g->nodes[v].op == CM_OP_ASSIGN ? NEEDED_AS_ASSIGN : NOT_NEEDED;
    member[v] = listed[v] = -1;
  }
  for (int k = 0; k < g->n_outputs; k++) e->reason[g->outputs[k]] = NEEDED_AS_GRAPH_OUTPUT;
  cm_status st = CM_OK;
  for (int gi = 0; gi < ng && !st; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_nodes; k++) member[gr->nodes[k]] = gi;
    int count = 0;
    for (int k = 0; k < gr->n_nodes; k++) {
      const cm_node *u = &g->nodes[gr->nodes[k]];
      for (int j = 0; j < u->n_inputs; j++) {
        int v = u->inputs[j];
        if (member[v] == gi || listed[v] == gi) continue;
        listed[v] = gi;
        scratch[count++] = v;
        int producer = p->group_of[v];
        if (producer >= 0 && e->reason[v] == NOT_NEEDED) e->reason[v] = gi;
      }
    }
    e->n_in[gi] = count;
    e->in[gi] = malloc(sizeof(int) * ((size_t)count + 1));
    if (!e->in[gi])
      st = cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
    else
      memcpy(e->in[gi], scratch, sizeof(int) * (size_t)count);
  }
  for (int gi = 0; gi < ng && !st; gi++) {
    const cm_group *gr = &p->groups[gi];
    int count = 0;
    for (int k = 0; k < gr->n_nodes; k++) {
      int v = gr->nodes[k];
      if (p->group_of[v] == gi && e->reason[v] != NOT_NEEDED) scratch[count++] = v;
    }
    e->n_out[gi] = count;
    e->out[gi] = malloc(sizeof(int) * ((size_t)count + 1));
    if (!e->out[gi])
      st = cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
    else
      memcpy(e->out[gi], scratch, sizeof(int) * (size_t)count);
  }
  free(member), free(listed), free(scratch);
  if (st) expected_io_free(e, ng);
  return st;
}

/* ---- the unfused plan ------------------------------------------------------ */

cm_status cm_plan_unfused(const cm_graph *g, cm_plan **out, cm_err *err) {
  *out = NULL;
  cm_plan *p = calloc(1, sizeof *p);
  if (!p) return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
  p->n_nodes = g->n_nodes;
  p->group_of = malloc(sizeof(int) * ((size_t)g->n_nodes + 1));
  p->groups = calloc((size_t)g->n_nodes + 1, sizeof *p->groups);
  if (!p->group_of || !p->groups) goto oom;
  for (int v = 0; v < g->n_nodes; v++) {
    cm_op op = g->nodes[v].op;
    if (is_fed(op)) {
      p->group_of[v] = -1;
      continue;
    }
    cm_group *gr = &p->groups[p->n_groups];
    gr->kind = kind_of_op(op);
    gr->nodes = malloc(sizeof(int));
    if (!gr->nodes) goto oom;
    gr->nodes[0] = v;
    gr->n_nodes = 1;
    p->group_of[v] = p->n_groups++;
  }
  expected_io e;
  cm_status st = expected_io_compute(g, p, &e, err);
  if (st) {
    cm_plan_free(p);
    return st;
  }
  for (int gi = 0; gi < p->n_groups; gi++) { /* hand the arrays over */
    p->groups[gi].inputs = e.in[gi], p->groups[gi].n_inputs = e.n_in[gi];
    p->groups[gi].outputs = e.out[gi], p->groups[gi].n_outputs = e.n_out[gi];
    e.in[gi] = e.out[gi] = NULL;
  }
  expected_io_free(&e, p->n_groups);
  *out = p;
  return CM_OK;
oom:
  cm_plan_free(p);
  return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
}

/* ---- the checker ------------------------------------------------------------ */

static const char *node_name(const cm_graph *g, int v) {
  return g->nodes[v].name;
}

static int64_t aligned_bytes(const cm_type *t) {
  return ((int64_t)cm_type_nbytes(t) + 63) / 64 * 64;
}

/* Compares a group's listed ids with the expected set (order free, no
 * duplicates). stamp is n-sized scratch, all < 0 on entry and on return. */
static cm_status check_same_set(const cm_graph *g, int gi, bool inputs, const int *listed,
                                int n_listed, const int *expected, int n_expected, int *stamp,
                                const int *reason, cm_err *err) {
  const char *what = inputs ? "input" : "output";
  cm_status st = CM_OK;
  for (int k = 0; k < n_expected; k++) stamp[expected[k]] = 1;
  for (int k = 0; k < n_listed && !st; k++) {
    int v = listed[k];
    if (v < 0 || v >= g->n_nodes)
      st = cm_errorf(err, CM_EINVALID, "plan: group %d: %s[%d] = %d is not a node", gi, what, k, v);
    else if (stamp[v] == 2)
      st = cm_errorf(err, CM_EINVALID, "plan: group %d: %s \"%s\" is listed twice", gi, what,
                     node_name(g, v));
    else if (stamp[v] != 1)
      st = cm_errorf(err, CM_EINVALID,
                     inputs ? "plan: group %d: input \"%s\" is not read from outside the group"
                            : "plan: group %d: output \"%s\" is not needed outside the group (no "
                              "other group reads it, not a graph output, not an assign)",
                     gi, node_name(g, v));
    else
      stamp[v] = 2;
  }
  for (int k = 0; k < n_expected && !st; k++) {
    int v = expected[k];
    if (stamp[v] == 2) continue;
    if (inputs)
      st = cm_errorf(err, CM_EINVALID, "plan: group %d reads \"%s\" but does not list it as input",
                     gi, node_name(g, v));
    else if (reason[v] >= 0)
      st = cm_errorf(err, CM_EINVALID,
                     "plan: group %d does not list \"%s\" as output, but group %d reads it", gi,
                     node_name(g, v), reason[v]);
    else
      st = cm_errorf(err, CM_EINVALID, "plan: group %d does not list %s \"%s\" as output", gi,
                     reason[v] == NEEDED_AS_ASSIGN ? "the assign" : "the graph output",
                     node_name(g, v));
  }
  for (int k = 0; k < n_expected; k++) stamp[expected[k]] = -1;
  for (int k = 0; k < n_listed; k++)
    if (listed[k] >= 0 && listed[k] < g->n_nodes) stamp[listed[k]] = -1;
  return st;
}

/* Membership: every fed source in no group; const/iota in any number of
 * groups, group_of naming one of them (or -1); every other node in exactly
 * the group group_of names; node lists topological. */
static cm_status check_membership(const cm_graph *g, const cm_plan *p, int *count, int *stamp,
                                  int *index, cm_err *err) {
  int n = g->n_nodes;
  for (int v = 0; v < n; v++) count[v] = 0, stamp[v] = -1;
  bool *owner_seen = calloc((size_t)n + 1, sizeof *owner_seen);
  if (!owner_seen) return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
  cm_status st = CM_OK;
  for (int gi = 0; gi < p->n_groups && !st; gi++) {
    const cm_group *gr = &p->groups[gi];
    if ((unsigned)gr->kind >= CM_GROUP_KIND_COUNT)
      st = cm_errorf(err, CM_EINVALID, "plan: group %d has an unknown kind %d", gi, (int)gr->kind);
    else if (gr->n_nodes <= 0 || !gr->nodes)
      st = cm_errorf(err, CM_EINVALID, "plan: group %d has no nodes", gi);
    else if (gr->n_inputs < 0 || gr->n_outputs < 0 || (gr->n_inputs && !gr->inputs) ||
             (gr->n_outputs && !gr->outputs))
      st = cm_errorf(err, CM_EINVALID, "plan: group %d has malformed input/output lists", gi);
    for (int k = 0; k < gr->n_nodes && !st; k++) {
      int v = gr->nodes[k];
      if (v < 0 || v >= n) {
        st = cm_errorf(err, CM_EINVALID, "plan: group %d: nodes[%d] = %d is not a node", gi, k, v);
        break;
      }
      const cm_node *u = &g->nodes[v];
      if (stamp[v] == gi) {
        st = cm_errorf(err, CM_EINVALID, "plan: group %d lists \"%s\" twice", gi, u->name);
        break;
      }
      if (is_fed(u->op)) {
        st = cm_errorf(err, CM_EINVALID, "plan: group %d contains the source \"%s\" (%s)", gi,
                       u->name, cm_op_name(u->op));
        break;
      }
      count[v]++;
      if (p->group_of[v] == gi) owner_seen[v] = true;
      if (!is_free(u->op) && p->group_of[v] != gi) {
        st = cm_errorf(err, CM_EINVALID, "plan: \"%s\" is in group %d but group_of says %d",
                       u->name, gi, p->group_of[v]);
        break;
      }
      stamp[v] = gi;
      index[v] = k;
    }
    /* every input inside the group must come earlier in the list */
    for (int k = 0; k < gr->n_nodes && !st; k++) {
      const cm_node *u = &g->nodes[gr->nodes[k]];
      for (int j = 0; j < u->n_inputs && !st; j++) {
        int w = u->inputs[j];
        if (stamp[w] == gi && index[w] >= k)
          st = cm_errorf(err, CM_EINVALID,
                         "plan: group %d is not in topological order: \"%s\" comes before its "
                         "input \"%s\"",
                         gi, u->name, g->nodes[w].name);
      }
    }
  }
  for (int v = 0; v < n && !st; v++) {
    const cm_node *u = &g->nodes[v];
    int owner = p->group_of[v];
    if (is_fed(u->op)) {
      if (owner != -1)
        st = cm_errorf(err, CM_EINVALID, "plan: the source \"%s\" has group %d (sources have -1)",
                       u->name, owner);
    } else if (owner < -1 || owner >= p->n_groups) {
      st = cm_errorf(err, CM_EINVALID, "plan: \"%s\" has group %d of %d", u->name, owner,
                     p->n_groups);
    } else if (is_free(u->op)) {
      if (owner >= 0 && !owner_seen[v])
        st = cm_errorf(err, CM_EINVALID, "plan: \"%s\" has group %d, which does not contain it",
                       u->name, owner);
    } else if (count[v] != 1) {
      st = cm_errorf(err, CM_EINVALID, "plan: \"%s\" (%s) is in %d groups, not exactly one",
                     u->name, cm_op_name(u->op), count[v]);
    }
  }
  /* a value read outside its groups, or a graph output, needs an owner that writes it */
  for (int k = 0; k < g->n_outputs && !st; k++) {
    int v = g->outputs[k];
    if (!is_fed(g->nodes[v].op) && p->group_of[v] < 0)
      st = cm_errorf(err, CM_EINVALID, "plan: the graph output \"%s\" is computed by no group",
                     g->nodes[v].name);
  }
  free(owner_seen);
  return st;
}

static cm_status check_order(const cm_graph *g, const cm_plan *p, int *pos, cm_err *err) {
  if (p->n_order != p->n_groups || !p->order)
    return cm_errorf(err, CM_EINVALID, "schedule: the order has %d groups, the plan %d", p->n_order,
                     p->n_groups);
  for (int gi = 0; gi < p->n_groups; gi++) pos[gi] = -1;
  for (int k = 0; k < p->n_order; k++) {
    int gi = p->order[k];
    if (gi < 0 || gi >= p->n_groups)
      return cm_errorf(err, CM_EINVALID, "schedule: order[%d] = %d is not a group", k, gi);
    if (pos[gi] >= 0)
      return cm_errorf(err, CM_EINVALID, "schedule: group %d is ordered twice (positions %d, %d)",
                       gi, pos[gi], k);
    pos[gi] = k;
  }
  for (int gi = 0; gi < p->n_groups; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_inputs; k++) {
      int v = gr->inputs[k], producer = p->group_of[v];
      if (producer >= 0 && pos[producer] > pos[gi])
        return cm_errorf(err, CM_EINVALID,
                         "schedule: group %d (position %d) reads \"%s\" before group %d "
                         "(position %d) computes it",
                         gi, pos[gi], g->nodes[v].name, producer, pos[producer]);
    }
  }
  /* the in-place rule: an assign's group follows every other reader of the old state */
  int *updater = malloc(sizeof(int) * ((size_t)g->n_nodes + 1));
  if (!updater) return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
  for (int v = 0; v < g->n_nodes; v++) updater[v] = -1;
  for (int v = 0; v < g->n_nodes; v++)
    if (g->nodes[v].op == CM_OP_ASSIGN) updater[g->nodes[v].inputs[0]] = v;
  cm_status st = CM_OK;
  for (int gi = 0; gi < p->n_groups && !st; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_inputs && !st; k++) {
      int x = gr->inputs[k], a = updater[x];
      if (a < 0) continue;
      int ug = p->group_of[a];
      if (ug != gi && pos[ug] < pos[gi])
        st = cm_errorf(err, CM_EINVALID,
                       "schedule: group %d (position %d) reads the state \"%s\" after group %d "
                       "(position %d) updated it in place (\"%s\")",
                       gi, pos[gi], g->nodes[x].name, ug, pos[ug], g->nodes[a].name);
    }
  }
  free(updater);
  return st;
}

/* Live interval of each arena buffer, in schedule positions, computed here
 * independently of memplan.c. */
static cm_status check_memory(const cm_graph *g, const cm_plan *p, const int *pos, cm_err *err) {
  int n = g->n_nodes;
  int *start = malloc(sizeof(int) * ((size_t)n + 1)), *end = malloc(sizeof(int) * ((size_t)n + 1));
  int *buffers = malloc(sizeof(int) * ((size_t)n + 1));
  if (!start || !end || !buffers) {
    free(start), free(end), free(buffers);
    return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
  }
  for (int v = 0; v < n; v++) start[v] = end[v] = -1;
  for (int gi = 0; gi < p->n_groups; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_outputs; k++) {
      int v = gr->outputs[k];
      if (g->nodes[v].op != CM_OP_ASSIGN) start[v] = end[v] = pos[gi];
    }
  }
  for (int gi = 0; gi < p->n_groups; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_inputs; k++) {
      int v = gr->inputs[k];
      if (start[v] >= 0 && pos[gi] > end[v]) end[v] = pos[gi];
    }
  }
  for (int k = 0; k < g->n_outputs; k++)
    if (start[g->outputs[k]] >= 0) end[g->outputs[k]] = p->n_order - 1;
  cm_status st = CM_OK;
  int nb = 0;
  for (int v = 0; v < n && !st; v++) {
    int64_t off = p->offset[v];
    if (start[v] < 0) {
      if (off != -1)
        st = cm_errorf(err, CM_EINVALID,
                       "memplan: \"%s\" has offset %lld but is no arena buffer (a source, an "
                       "assign or a group-internal value)",
                       g->nodes[v].name, (long long)off);
      continue;
    }
    int64_t size = aligned_bytes(&g->nodes[v].type);
    if (off < 0)
      st =
          cm_errorf(err, CM_EINVALID, "memplan: the buffer \"%s\" has no offset", g->nodes[v].name);
    else if (off % 64)
      st = cm_errorf(err, CM_EINVALID, "memplan: \"%s\" at offset %lld is not 64-byte aligned",
                     g->nodes[v].name, (long long)off);
    else if (off + size > p->arena_bytes)
      st = cm_errorf(err, CM_EINVALID, "memplan: \"%s\" [%lld, %lld) ends past the arena (%lld B)",
                     g->nodes[v].name, (long long)off, (long long)(off + size),
                     (long long)p->arena_bytes);
    buffers[nb++] = v;
  }
  for (int i = 0; i < nb && !st; i++) {
    int a = buffers[i];
    int64_t a0 = p->offset[a], a1 = a0 + aligned_bytes(&g->nodes[a].type);
    for (int j = i + 1; j < nb && !st; j++) {
      int b = buffers[j];
      if (start[a] > end[b] || start[b] > end[a]) continue;
      int64_t b0 = p->offset[b], b1 = b0 + aligned_bytes(&g->nodes[b].type);
      if (a0 < b1 && b0 < a1)
        st = cm_errorf(err, CM_EINVALID,
                       "memplan: buffers \"%s\" [%lld, %lld) and \"%s\" [%lld, %lld) overlap while "
                       "both live (groups %d..%d and %d..%d)",
                       g->nodes[a].name, (long long)a0, (long long)a1, g->nodes[b].name,
                       (long long)b0, (long long)b1, start[a], end[a], start[b], end[b]);
    }
  }
  free(start), free(end), free(buffers);
  return st;
}

cm_status cm_plan_verify(const cm_graph *g, const cm_plan *p, cm_err *err) {
  if (!g || !p) return cm_errorf(err, CM_EINVALID, "plan: no plan");
  if (p->n_nodes != g->n_nodes)
    return cm_errorf(err, CM_EINVALID, "plan: made for %d nodes, the graph has %d", p->n_nodes,
                     g->n_nodes);
  if (p->n_groups < 0 || (p->n_groups && !p->groups) || (g->n_nodes && !p->group_of))
    return cm_errorf(err, CM_EINVALID, "plan: malformed group table");
  int n = g->n_nodes;
  int *count = malloc(sizeof(int) * ((size_t)n + 1)),
      *stamp = malloc(sizeof(int) * ((size_t)n + 1));
  int *index = malloc(sizeof(int) * ((size_t)n + 1));
  int *pos = malloc(sizeof(int) * ((size_t)p->n_groups + 1));
  if (!count || !stamp || !index || !pos) {
    free(count), free(stamp), free(index), free(pos);
    return cm_errorf(err, CM_EINTERNAL, "plan: out of memory");
  }
  cm_status st = check_membership(g, p, count, stamp, index, err);
  expected_io e = {0};
  if (!st) st = expected_io_compute(g, p, &e, err);
  for (int v = 0; v < n; v++) stamp[v] = -1;
  for (int gi = 0; gi < p->n_groups && !st; gi++) {
    const cm_group *gr = &p->groups[gi];
    /* a value read from outside must be a fed source or written by its owner */
    for (int k = 0; k < e.n_in[gi] && !st; k++) {
      int v = e.in[gi][k];
      if (!is_fed(g->nodes[v].op) && p->group_of[v] < 0)
        st = cm_errorf(err, CM_EINVALID,
                       "plan: group %d reads \"%s\", which no group computes (a const/iota used "
                       "outside the groups that contain it needs an owner)",
                       gi, node_name(g, v));
    }
    if (!st)
      st = check_same_set(g, gi, true, gr->inputs, gr->n_inputs, e.in[gi], e.n_in[gi], stamp,
                          e.reason, err);
    if (!st)
      st = check_same_set(g, gi, false, gr->outputs, gr->n_outputs, e.out[gi], e.n_out[gi], stamp,
                          e.reason, err);
  }
  expected_io_free(&e, p->n_groups);
  if (!st && p->n_order > 0) st = check_order(g, p, pos, err);
  if (!st && p->offset) {
    if (p->n_order != p->n_groups || !p->order)
      st = cm_errorf(err, CM_EINVALID, "memplan: a memory plan without a schedule");
    else
      st = check_memory(g, p, pos, err);
  }
  free(count), free(stamp), free(index), free(pos);
  return st;
}

/* ---- group-by-group evaluation ---------------------------------------------- */

/* Adds a copy of node v of g to sub under the same name, inputs mapped. */
static int copy_node(cm_graph *sub, const cm_graph *g, int v, const int *map, cm_err *err) {
  const cm_node *u = &g->nodes[v];
  int *ins = malloc(sizeof(int) * ((size_t)u->n_inputs + 1));
  if (!ins) {
    cm_errorf(err, CM_EINTERNAL, "plan-eval: out of memory");
    return -1;
  }
  for (int j = 0; j < u->n_inputs; j++) ins[j] = map[u->inputs[j]];
  int id = cm_graph_add(sub, u->op, u->name, ins, u->n_inputs, &u->attrs, err);
  free(ins);
  return id;
}

/* Evaluates sub with the given sources and moves the values of wanted[] (ids
 * in g, mapped by map) into values. */
static cm_status eval_sub(const cm_graph *sub, const cm_tensor **sub_sources, const int *wanted,
                          int n_wanted, const int *map, cm_tensor *values, cm_tensor *bounds,
                          const cm_eval_opts *opts, cm_err *err) {
  cm_tensor *sub_values = calloc((size_t)sub->n_nodes + 1, sizeof *sub_values);
  cm_tensor *sub_bounds = bounds ? calloc((size_t)sub->n_nodes + 1, sizeof *sub_bounds) : NULL;
  if (!sub_values || (bounds && !sub_bounds)) {
    free(sub_values), free(sub_bounds);
    return cm_errorf(err, CM_EINTERNAL, "plan-eval: out of memory");
  }
  cm_status st = bounds ? cm_eval_bounded(sub, sub_sources, sub_values, sub_bounds, err)
                        : cm_eval(sub, sub_sources, sub_values, opts, err);
  if (!st) {
    for (int k = 0; k < n_wanted; k++) {
      int v = wanted[k];
      cm_tensor_free(&values[v]);
      values[v] = sub_values[map[v]];
      sub_values[map[v]].data = NULL;
      if (bounds) {
        cm_tensor_free(&bounds[v]);
        bounds[v] = sub_bounds[map[v]];
        sub_bounds[map[v]].data = NULL;
      }
    }
    for (int i = 0; i < sub->n_nodes; i++) {
      cm_tensor_free(&sub_values[i]);
      if (sub_bounds) cm_tensor_free(&sub_bounds[i]);
    }
  }
  free(sub_values), free(sub_bounds);
  return st;
}

static cm_status eval_group(const cm_graph *g, const cm_plan *p, int gi,
                            const cm_tensor *const *sources, cm_tensor *values, cm_tensor *bounds,
                            int *map, const cm_eval_opts *opts, cm_err *err) {
  const cm_group *gr = &p->groups[gi];
  cm_graph *sub = cm_graph_new();
  int cap = gr->n_inputs + gr->n_nodes + 1;
  const cm_tensor **sub_sources = calloc((size_t)cap, sizeof *sub_sources);
  if (!sub || !sub_sources) {
    cm_graph_free(sub);
    free(sub_sources);
    return cm_errorf(err, CM_EINTERNAL, "plan-eval: out of memory");
  }
  cm_status st = CM_OK;
  for (int k = 0; k < gr->n_inputs && !st; k++) {
    int v = gr->inputs[k];
    if (v < 0 || v >= g->n_nodes) {
      st = cm_errorf(err, CM_EINVALID, "plan-eval: group %d: input %d is not a node", gi, v);
      break;
    }
    const cm_node *u = &g->nodes[v];
    const cm_tensor *value = is_fed(u->op) ? (sources ? sources[v] : NULL) : &values[v];
    if (!value || !value->data) {
      st = cm_errorf(err, CM_EINVALID, "plan-eval: group %d reads \"%s\", which has no value yet",
                     gi, u->name);
      break;
    }
    /* fed sources keep their op (an assign needs its state target); others become inputs */
    int id = is_fed(u->op) ? copy_node(sub, g, v, map, err)
                           : cm_input(sub, u->name, u->type.dtype, u->type.rank, u->type.dims);
    if (id < 0) {
      if (cm_graph_error(sub))
        cm_errorf(err, CM_EINTERNAL, "plan-eval: group %d: %s", gi, cm_graph_error(sub));
      st = err && err->status ? err->status : CM_EINTERNAL;
      break;
    }
    map[v] = id;
    sub_sources[id] = value;
  }
  for (int k = 0; k < gr->n_nodes && !st; k++) {
    int v = gr->nodes[k];
    if (v < 0 || v >= g->n_nodes) {
      st = cm_errorf(err, CM_EINVALID, "plan-eval: group %d: node %d is not a node", gi, v);
      break;
    }
    const cm_node *u = &g->nodes[v];
    for (int j = 0; j < u->n_inputs && !st; j++)
      if (map[u->inputs[j]] < 0)
        st = cm_errorf(err, CM_EINVALID,
                       "plan-eval: group %d: \"%s\" reads \"%s\", neither in the group nor among "
                       "its inputs",
                       gi, u->name, g->nodes[u->inputs[j]].name);
    if (st) break;
    int id = copy_node(sub, g, v, map, err);
    if (id < 0) {
      st = err && err->status ? err->status : CM_EINTERNAL;
      break;
    }
    map[v] = id;
  }
  for (int k = 0; k < gr->n_outputs && !st; k++) {
    int v = gr->outputs[k];
    if (v < 0 || v >= g->n_nodes || map[v] < 0 || map[v] < gr->n_inputs)
      st = cm_errorf(err, CM_EINVALID, "plan-eval: group %d: output %d is not one of its nodes", gi,
                     v);
  }
  if (!st)
    st = eval_sub(sub, sub_sources, gr->outputs, gr->n_outputs, map, values, bounds, opts, err);
  if (st) cm_err_prefix(err, "group %d (%s): ", gi, cm_group_kind_name(gr->kind));
  /* reset the map for the next group */
  for (int k = 0; k < gr->n_inputs; k++)
    if (gr->inputs[k] >= 0 && gr->inputs[k] < g->n_nodes) map[gr->inputs[k]] = -1;
  for (int k = 0; k < gr->n_nodes; k++)
    if (gr->nodes[k] >= 0 && gr->nodes[k] < g->n_nodes) map[gr->nodes[k]] = -1;
  cm_graph_free(sub);
  free(sub_sources);
  return st;
}

/* Graph outputs that are fed sources: passed through by cm_eval's own rule
 * (F64 precision widens floats), so the result matches cm_eval exactly. */
static cm_status eval_source_outputs(const cm_graph *g, const cm_tensor *const *sources,
                                     cm_tensor *values, int *map, const cm_eval_opts *opts,
                                     cm_err *err) {
  cm_graph *sub = cm_graph_new();
  int *wanted = malloc(sizeof(int) * ((size_t)g->n_outputs + 1));
  const cm_tensor **sub_sources = calloc((size_t)g->n_outputs + 1, sizeof *sub_sources);
  cm_status st = CM_OK;
  if (!sub || !wanted || !sub_sources)
    st = cm_errorf(err, CM_EINTERNAL, "plan-eval: out of memory");
  int n_wanted = 0;
  for (int k = 0; k < g->n_outputs && !st; k++) {
    int v = g->outputs[k];
    if (!is_fed(g->nodes[v].op) || map[v] >= 0) continue;
    int id = copy_node(sub, g, v, map, err);
    if (id < 0) {
      st = err && err->status ? err->status : CM_EINTERNAL;
      break;
    }
    map[v] = id;
    sub_sources[id] = sources ? sources[v] : NULL;
    wanted[n_wanted++] = v;
  }
  if (!st && n_wanted)
    st = eval_sub(sub, sub_sources, wanted, n_wanted, map, values, NULL, opts, err);
  for (int k = 0; k < n_wanted; k++) map[wanted[k]] = -1;
  cm_graph_free(sub);
  free(wanted);
  free(sub_sources);
  return st;
}

cm_status cm_plan_eval(const cm_graph *g, const cm_plan *p, const cm_tensor *const *sources,
                       cm_tensor *values, const cm_eval_opts *opts, cm_err *err) {
  if (!g || !p || (!values && g->n_nodes))
    return cm_errorf(err, CM_EINTERNAL, "plan-eval: graph, plan and values are required");
  if (p->n_nodes != g->n_nodes)
    return cm_errorf(err, CM_EINVALID, "plan-eval: plan made for %d nodes, the graph has %d",
                     p->n_nodes, g->n_nodes);
  int n = g->n_nodes;
  if (n) memset(values, 0, sizeof *values * (size_t)n);
  int *map = malloc(sizeof(int) * ((size_t)n + 1));
  if (!map) return cm_errorf(err, CM_EINTERNAL, "plan-eval: out of memory");
  for (int v = 0; v < n; v++) map[v] = -1;
  cm_status st = eval_source_outputs(g, sources, values, map, opts, err);
  int steps = p->n_order > 0 ? p->n_order : p->n_groups;
  for (int k = 0; k < steps && !st; k++) {
    int gi = p->n_order > 0 ? p->order[k] : k;
    if (gi < 0 || gi >= p->n_groups)
      st = cm_errorf(err, CM_EINVALID, "plan-eval: order[%d] = %d is not a group", k, gi);
    else
      st = eval_group(g, p, gi, sources, values, NULL, map, opts, err);
  }
  free(map);
  if (st)
    for (int v = 0; v < n; v++) cm_tensor_free(&values[v]);
  return st;
}

cm_status cm_plan_eval_group_bounded(const cm_graph *g, const cm_plan *p, int gi,
                                     const cm_tensor *const *sources, cm_tensor *values,
                                     cm_tensor *bounds, cm_err *err) {
  if (!g || !p || !values || !bounds)
    return cm_errorf(err, CM_EINTERNAL, "plan-eval: graph, plan, values and bounds are required");
  if (p->n_nodes != g->n_nodes || gi < 0 || gi >= p->n_groups)
    return cm_errorf(err, CM_EINVALID, "plan-eval: group %d of a plan for %d nodes (graph: %d)", gi,
                     p->n_nodes, g->n_nodes);
  int *map = malloc(sizeof(int) * ((size_t)g->n_nodes + 1));
  if (!map) return cm_errorf(err, CM_EINTERNAL, "plan-eval: out of memory");
  for (int v = 0; v < g->n_nodes; v++) map[v] = -1;
  cm_eval_opts o = {CM_PRECISION_F64};
  cm_status st = eval_group(g, p, gi, sources, values, bounds, map, &o, err);
  free(map);
  return st;
}

/* ---- printing ----------------------------------------------------------------- */

void cm_plan_print(const cm_graph *g, const cm_plan *p, FILE *out) {
  int steps = p->n_order > 0 ? p->n_order : p->n_groups;
  for (int k = 0; k < steps; k++) {
    int gi = p->n_order > 0 ? p->order[k] : k;
    if (gi < 0 || gi >= p->n_groups) continue;
    const cm_group *gr = &p->groups[gi];
    fprintf(out, "group %d %s: nodes", gi, cm_group_kind_name(gr->kind));
    for (int j = 0; j < gr->n_nodes; j++) fprintf(out, " %s", g->nodes[gr->nodes[j]].name);
    fputs(" <- inputs", out);
    if (!gr->n_inputs) fputs(" (none)", out);
    for (int j = 0; j < gr->n_inputs; j++) fprintf(out, " %s", g->nodes[gr->inputs[j]].name);
    fputs(" -> outputs", out);
    if (!gr->n_outputs) fputs(" (none)", out);
    for (int j = 0; j < gr->n_outputs; j++) {
      int v = gr->outputs[j];
      const cm_node *u = &g->nodes[v];
      fprintf(out, " %s", u->name);
      if (u->op == CM_OP_ASSIGN)
        fprintf(out, " [into %s]", g->nodes[u->inputs[0]].name);
      else if (p->offset && p->offset[v] >= 0)
        fprintf(out, " [offset %lld, %lld B]", (long long)p->offset[v],
                (long long)aligned_bytes(&u->type));
    }
    fputc('\n', out);
  }
  if (p->offset)
    fprintf(out, "arena: %lld B (unplanned %lld B, %.1f %%)\n", (long long)p->arena_bytes,
            (long long)p->unplanned_bytes,
            p->unplanned_bytes ? 100.0 * (double)p->arena_bytes / (double)p->unplanned_bytes
                               : 100.0);
  else
    fputs("arena: not planned\n", out);
}
