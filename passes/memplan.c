/* passes/memplan.c — one arena for every value passed between groups.
 *
 * A buffer is a group output other than an assign (an assign's result is
 * written straight into its state's own buffer; sources have their own
 * buffers too). It lives from the position of the group computing it to the
 * position of the last group reading it (graph outputs: to the end of the
 * step), both ends included: a group reading one buffer and writing another
 * needs both at once. Buffers are packed as XLA's heap simulator does with its
 * best-fit, largest-first strategy: largest first (ties: earlier start), each
 * at the smallest gap among the buffers already placed whose lifetimes
 * intersect its own, or above them all when no gap is large enough. Sizes
 * and offsets are multiples of 64 bytes. Placing is quadratic in the number
 * of buffers, fine for the thousands of a training step. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>

#define ARENA_ALIGN 64

typedef struct buffer {
  int node;
  int64_t size; /* aligned */
  int start, end;
  int64_t offset; /* -1 until placed */
} buffer;

static int by_size_then_start(const void *pa, const void *pb) {
  const buffer *a = pa, *b = pb;
  if (a->size != b->size) return a->size > b->size ? -1 : 1;
  if (a->start != b->start) return a->start < b->start ? -1 : 1;
  return (a->node > b->node) - (a->node < b->node);
}

typedef struct range {
  int64_t lo, hi;
} range;

static int by_lo(const void *pa, const void *pb) {
  const range *a = pa, *b = pb;
  return (a->lo > b->lo) - (a->lo < b->lo);
}

/* The offset for `b` given the ranges taken by live neighbours (sorted here):
 * the smallest free gap that holds it, else the top of the taken ranges. */
static int64_t best_fit(range *taken, int n_taken, int64_t size) {
  qsort(taken, (size_t)n_taken, sizeof *taken, by_lo);
  int64_t cursor = 0, best = -1, best_gap = 0;
  for (int i = 0; i < n_taken; i++) {
    int64_t gap = taken[i].lo - cursor;
    if (gap >= size && (best < 0 || gap < best_gap)) best = cursor, best_gap = gap;
    if (taken[i].hi > cursor) cursor = taken[i].hi;
  }
  return best >= 0 ? best : cursor;
}

/* A collective over ranks > 1 may run asynchronously (the backends start an all_reduce at its
 * group and wait for it just before the first group reading its result): its input stays live
 * until then, the first reader of its output (the end of the step when none). */
static void extend_async_inputs(const cm_graph *g, const cm_plan *p, const int *pos,
                                const int *buffer_of, buffer *bufs) {
  for (int gi = 0; gi < p->n_groups; gi++) {
    const cm_group *gr = &p->groups[gi];
    if (gr->kind != CM_GROUP_COLLECTIVE) continue;
    for (int i = 0; i < gr->n_nodes; i++) {
      const cm_node *n = &g->nodes[gr->nodes[i]];
      int in = buffer_of[n->inputs[0]], out = buffer_of[gr->nodes[i]];
      if (n->op != CM_OP_ALL_REDUCE || n->attrs.ranks < 2 || in < 0) continue;
      int wait = p->n_groups - 1;
      for (int gj = 0; gj < p->n_groups; gj++)
        for (int j = 0; j < p->groups[gj].n_inputs; j++)
          if (out >= 0 && p->groups[gj].inputs[j] == gr->nodes[i] && pos[gj] < wait) wait = pos[gj];
      if (wait > bufs[in].end) bufs[in].end = wait;
    }
  }
}

cm_status cm_pass_memplan(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  cm_status st;
  if ((!s->plan || s->plan->n_order == 0) && (st = cm_pass_schedule(s, NULL, err))) return st;
  const cm_graph *g = s->g;
  cm_plan *p = s->plan;
  int n = g->n_nodes, ng = p->n_groups;
  if (p->n_nodes != n || p->n_order != ng)
    return cm_errorf(err, CM_EINVALID, "memplan: the plan does not match the graph or its order");
  int *pos = malloc(sizeof(int) * ((size_t)ng + 1));
  int *buffer_of = malloc(sizeof(int) * ((size_t)n + 1));
  buffer *bufs = malloc(sizeof(buffer) * ((size_t)n + 1));
  range *taken = malloc(sizeof(range) * ((size_t)n + 1));
  int64_t *offset = malloc(sizeof(int64_t) * ((size_t)n + 1));
  if (!pos || !buffer_of || !bufs || !taken || !offset) {
    st = cm_errorf(err, CM_EINTERNAL, "memplan: out of memory");
    goto done;
  }
  for (int k = 0; k < ng; k++) pos[p->order[k]] = k;
  for (int v = 0; v < n; v++) buffer_of[v] = -1, offset[v] = -1;
  int nb = 0;
  int64_t unplanned = 0;
  for (int k = 0; k < ng; k++) {
    const cm_group *gr = &p->groups[p->order[k]];
    for (int j = 0; j < gr->n_outputs; j++) {
      int v = gr->outputs[j];
      if (g->nodes[v].op == CM_OP_ASSIGN || buffer_of[v] >= 0) continue;
      int64_t size = ((int64_t)cm_type_nbytes(&g->nodes[v].type) + ARENA_ALIGN - 1) / ARENA_ALIGN *
                     ARENA_ALIGN;
      bufs[nb] = (buffer){v, size, k, k, -1};
      buffer_of[v] = nb++;
      unplanned += size;
    }
  }
  for (int gi = 0; gi < ng; gi++) {
    const cm_group *gr = &p->groups[gi];
    for (int j = 0; j < gr->n_inputs; j++) {
      int b = buffer_of[gr->inputs[j]];
      if (b >= 0 && pos[gi] > bufs[b].end) bufs[b].end = pos[gi];
    }
  }
  for (int k = 0; k < g->n_outputs; k++) {
    int b = buffer_of[g->outputs[k]];
    if (b >= 0) bufs[b].end = ng - 1;
  }
  extend_async_inputs(g, p, pos, buffer_of, bufs);
  qsort(bufs, (size_t)nb, sizeof *bufs, by_size_then_start);
  int64_t arena = 0;
  for (int i = 0; i < nb; i++) {
    buffer *b = &bufs[i];
    int n_taken = 0;
    for (int j = 0; j < i; j++)
      if (bufs[j].start <= b->end && b->start <= bufs[j].end)
        taken[n_taken++] = (range){bufs[j].offset, bufs[j].offset + bufs[j].size};
    b->offset = best_fit(taken, n_taken, b->size);
    offset[b->node] = b->offset;
    if (b->offset + b->size > arena) arena = b->offset + b->size;
  }
  free(p->offset);
  p->offset = offset;
  offset = NULL;
  p->arena_bytes = arena;
  p->unplanned_bytes = unplanned;
  if (stat)
    snprintf(stat->detail, sizeof stat->detail,
             "buffers %d, arena %lld B, unplanned %lld B, %.1f %%", nb, (long long)arena,
             (long long)unplanned, unplanned ? 100.0 * (double)arena / (double)unplanned : 100.0);
  st = CM_OK;
done:
  free(pos), free(buffer_of), free(bufs), free(taken), free(offset);
  return st;
}
