/* passes/schedule.c — the order in which groups run (the learning-rate schedule
 * is another thing: runtime/lr_schedule.c).
 *
 * A list scheduler over the group dependence graph. A group depends on the
 * groups computing its inputs and, for in-place updates, the group holding an
 * assign to state X depends on every other group reading X (so the old value
 * is read before it is overwritten). Among the groups whose dependences are
 * met, collectives go first (issued as soon as their inputs are ready, so
 * communication overlaps the remaining compute); otherwise the group whose last
 * node comes first in the graph's node order runs first. That keeps the
 * original order wherever the rules allow it: the program stays readable and
 * values die roughly where the author's order lets them. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

typedef struct ready_heap {
  int *items, n;
  const bool *collective;
  const int *key; /* the group's largest node id */
} ready_heap;

/* true when group a must run before group b */
static bool heap_before(const ready_heap *h, int a, int b) {
  if (h->collective[a] != h->collective[b]) return h->collective[a];
  if (h->key[a] != h->key[b]) return h->key[a] < h->key[b];
  return a < b;
}

static void heap_push(ready_heap *h, int x) {
  int i = h->n++;
  h->items[i] = x;
  while (i > 0) {
    int parent = (i - 1) / 2;
    if (!heap_before(h, h->items[i], h->items[parent])) break;
    int t = h->items[i];
    h->items[i] = h->items[parent], h->items[parent] = t;
    i = parent;
  }
}

static int heap_pop(ready_heap *h) {
  int top = h->items[0];
  h->items[0] = h->items[--h->n];
  for (int i = 0;;) {
    int l = 2 * i + 1, r = l + 1, best = i;
    if (l < h->n && heap_before(h, h->items[l], h->items[best])) best = l;
    if (r < h->n && heap_before(h, h->items[r], h->items[best])) best = r;
    if (best == i) break;
    int t = h->items[i];
    h->items[i] = h->items[best], h->items[best] = t;
    i = best;
  }
  return top;
}

/* Dependence edges (pred -> succ) as a compressed adjacency list. */
typedef struct deps {
  int *first; /* n_groups + 1 offsets into succ */
  int *succ;
  int *n_preds;
} deps;

/* Calls add(pred, succ) for every edge; run twice (count, then fill). */
static void for_each_edge(const cm_graph *g, const cm_plan *p, const int *updater_group,
                          void (*add)(deps *, int, int), deps *d) {
  for (int gi = 0; gi < p->n_groups; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_inputs; k++) {
      int v = gr->inputs[k], producer = p->group_of[v];
      if (producer >= 0 && producer != gi) add(d, producer, gi);
      int ug = updater_group[v]; /* v is a state updated in place by group ug */
      if (ug >= 0 && ug != gi) add(d, gi, ug);
    }
  }
}

static void count_edge(deps *d, int pred, int succ) {
  d->first[pred + 1]++;
  d->n_preds[succ]++;
}

static void fill_edge(deps *d, int pred, int succ) {
  d->succ[d->first[pred]++] = succ;
}

static cm_status cycle_error(const cm_graph *g, const cm_plan *p, const deps *d,
                             const bool *scheduled, cm_err *err) {
  /* name one unscheduled group and an unscheduled group it waits for */
  for (int a = 0; a < p->n_groups; a++) {
    if (scheduled[a]) continue;
    for (int e = d->first[a]; e < d->first[a + 1]; e++) {
      int b = d->succ[e];
      if (scheduled[b]) continue;
      return cm_errorf(err, CM_EINVALID,
                       "schedule: no valid order: group %d (\"%s\") and group %d (\"%s\") wait on "
                       "each other through a cycle (a state's update must follow every reader of "
                       "its old value, yet a reader depends on the update)",
                       a, g->nodes[p->groups[a].nodes[p->groups[a].n_nodes - 1]].name, b,
                       g->nodes[p->groups[b].nodes[p->groups[b].n_nodes - 1]].name);
    }
  }
  return cm_errorf(err, CM_EINVALID, "schedule: no valid order (a cycle among groups)");
}

cm_status cm_pass_schedule(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  const cm_graph *g = s->g;
  cm_status st;
  if (!s->plan && (st = cm_plan_unfused(g, &s->plan, err))) return st;
  cm_plan *p = s->plan;
  if (p->n_nodes != g->n_nodes)
    return cm_errorf(err, CM_EINVALID, "schedule: plan made for %d nodes, the graph has %d",
                     p->n_nodes, g->n_nodes);
  int ng = p->n_groups, n = g->n_nodes;
  int *updater_group = malloc(sizeof(int) * ((size_t)n + 1));
  int *key = malloc(sizeof(int) * ((size_t)ng + 1));
  bool *collective = calloc((size_t)ng + 1, sizeof *collective);
  bool *scheduled = calloc((size_t)ng + 1, sizeof *scheduled);
  int *order = malloc(sizeof(int) * ((size_t)ng + 1));
  int *heap_items = malloc(sizeof(int) * ((size_t)ng + 1));
  deps d = {calloc((size_t)ng + 2, sizeof(int)), NULL, calloc((size_t)ng + 1, sizeof(int))};
  if (!updater_group || !key || !collective || !scheduled || !order || !heap_items || !d.first ||
      !d.n_preds) {
    st = cm_errorf(err, CM_EINTERNAL, "schedule: out of memory");
    goto done;
  }
  for (int v = 0; v < n; v++) updater_group[v] = -1;
  for (int v = 0; v < n; v++)
    if (g->nodes[v].op == CM_OP_ASSIGN) updater_group[g->nodes[v].inputs[0]] = p->group_of[v];
  for (int gi = 0; gi < ng; gi++) {
    const cm_group *gr = &p->groups[gi];
    key[gi] = -1;
    for (int k = 0; k < gr->n_nodes; k++)
      if (gr->nodes[k] > key[gi]) key[gi] = gr->nodes[k];
    collective[gi] = gr->kind == CM_GROUP_COLLECTIVE;
  }
  for_each_edge(g, p, updater_group, count_edge, &d);
  for (int gi = 0; gi < ng; gi++) d.first[gi + 1] += d.first[gi];
  d.succ = malloc(sizeof(int) * ((size_t)d.first[ng] + 1));
  if (!d.succ) {
    st = cm_errorf(err, CM_EINTERNAL, "schedule: out of memory");
    goto done;
  }
  for_each_edge(g, p, updater_group, fill_edge, &d); /* advances first[] to the next row */
  for (int gi = ng; gi > 0; gi--) d.first[gi] = d.first[gi - 1];
  d.first[0] = 0;

  ready_heap h = {heap_items, 0, collective, key};
  for (int gi = 0; gi < ng; gi++)
    if (d.n_preds[gi] == 0) heap_push(&h, gi);
  int n_order = 0;
  while (h.n > 0) {
    int gi = heap_pop(&h);
    scheduled[gi] = true;
    order[n_order++] = gi;
    for (int e = d.first[gi]; e < d.first[gi + 1]; e++)
      if (--d.n_preds[d.succ[e]] == 0) heap_push(&h, d.succ[e]);
  }
  if (n_order < ng) {
    st = cycle_error(g, p, &d, scheduled, err);
    goto done;
  }
  /* a collective "moved earlier" runs before some group that precedes it in node order */
  int moved = 0, n_collectives = 0, later_min_key = n;
  for (int k = ng - 1; k >= 0; k--) {
    int gi = order[k];
    if (collective[gi]) {
      n_collectives++;
      if (later_min_key < key[gi]) moved++;
    }
    if (key[gi] < later_min_key) later_min_key = key[gi];
  }
  free(p->order);
  free(p->offset); /* a memory plan belongs to the order it was made for */
  p->offset = NULL;
  p->arena_bytes = p->unplanned_bytes = 0;
  p->order = order;
  p->n_order = ng;
  order = NULL;
  if (stat)
    snprintf(stat->detail, sizeof stat->detail,
             "groups %d, collectives %d, collectives moved earlier %d", ng, n_collectives, moved);
  st = CM_OK;
done:
  free(updater_group), free(key), free(collective), free(scheduled), free(order);
  free(heap_items), free(d.first), free(d.succ), free(d.n_preds);
  return st;
}
