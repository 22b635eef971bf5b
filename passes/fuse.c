/* passes/fuse.c — the fusion pass: groups nodes into kernels by op category
 * (in the spirit of TVM FuseOps) and fills s->plan.
 *
 * The rules, in the order they are applied:
 * 0. Duplication. A broadcast that expands its operand and has several
 *    consumers is cloned, one copy per consumer, so each consumer's kernel
 *    reads the small operand instead of a materialized expansion (the only
 *    duplication that saves a round trip to memory; const and iota are sources,
 *    free in every group). When anything is cloned, s->g is replaced.
 * 1. Update regions. Assigns whose target is a param with optimizer state
 *    ("optimizer.exp_avg.<p>" is assigned too) or an "optimizer.*" state are
 *    optimizer updates; assigns to any other param are EMA updates. All
 *    elementwise/movement nodes whose every consumer lies in a region join it
 *    (reverse topological order), giving one multi-tensor UPDATE group for
 *    the optimizer and one for the EMA. Other assigns (loss scale) are fused
 *    like elementwise nodes.
 * 2. Greedy forward placement, node by node in topological order. A node may
 *    join only the group of its inputs with the latest position; every group
 *    then reads only from groups placed before it, so the groups stay acyclic
 *    by construction (no path can leave a group and come back). It joins when
 *    the group's kind accepts it:
 *    - elementwise/movement chains fuse together;
 *    - a reduction joins its elementwise producers (REDUCE); then values per
 *      reduced row (STAT) and values over the row domain (ROW) join, a
 *      broadcast of a STAT value back over exactly the reduced axes joins when
 *      a row fits on chip (<= 16384 elements; ROW group), further reductions
 *      over the same rows join, and one final full reduction (to a scalar) may
 *      close the group (log-softmax + cross-entropy);
 *    - a contraction starts a group (GEMM/CONV); its elementwise epilogue over
 *      the output domain joins, and may end in a transpose/slice (absorbed by
 *      the store) or a reduction over rows (the bias gradient); any such
 *      "closing" step (also the full reduction above) ends its value's chain:
 *      only reshapes of it stay in the group;
 *    - attention: a reduction over the innermost axis of a batched matmul's
 *      output joins the GEMM, and a batched matmul that contracts a value of
 *      those rows joins it too (ATTENTION). In the backward, the matmul that
 *      shares an operand with such a batched matmul joins as a sibling (dV
 *      beside dP). A group that started this way but never got its second
 *      matmul is re-fused at the end with the attention rules off. Matmuls
 *      with a weight operand (a param seen through views) never take part.
 *      The backward in flash_backward's form (a recomputed E' = exp(S'c − m)
 *      with no row sum of its own) is formed as a whole instead, when the
 *      placement reaches its last node: one ATTENTION group from E' forward to
 *      dV, dQ, dK and back over the producers read only by it (dP, dS, the
 *      broadcasts of m, z and −D/z); what reads it waits and is placed after.
 *    After a node is placed, every elementwise group whose only remaining
 *    external use is this node merges into its group (fusion into the
 *    consumer); into a contraction itself only cheap prologues merge (unary
 *    elementwise, casts, scaling by a scalar, transposes/reshapes/slices).
 *    Reductions and contractions are never duplicated.
 * Everything is linear in the node count, except sorting the groups. */
#include "passes.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROW_FITS_ELEMENTS 16384
#define SIBLING_SCAN 16 /* consumers looked at per operand for a sibling matmul */

typedef enum {
  FK_EW,        /* elementwise/movement (with assigns: UPDATE) */
  FK_SEALED,    /* scatter_add: nothing joins it */
  FK_REDUCE,    /* reductions over one row domain (ROW once it broadcasts back) */
  FK_GEMM,      /* one contraction and its epilogue */
  FK_GEMM_SIB,  /* two batched matmuls sharing an operand: attention backward, so far */
  FK_GEMM_ROW,  /* batched matmul + row reductions: attention, so far */
  FK_ATTENTION, /* ... + a matmul contracting those rows */
  FK_CONV,
  FK_COLLECTIVE,
  FK_UPDATE, /* an update region */
  FK_NORM,   /* the multi-tensor gradient-norm reduction */
} fuse_kind;

/* Where a node's value lives within its group. */
typedef enum {
  LV_FREE,  /* depends on no reduction/contraction of the group: computable anywhere */
  LV_ROW,   /* over the group's row (or contraction output) domain */
  LV_STAT,  /* one value per reduced row */
  LV_TOTAL, /* a full reduction: nothing follows it in the group */
  LV_OUT2,  /* output of a second matmul of an attention group */
  LV_SIB,   /* output of a sibling matmul */
} fuse_level;

typedef struct {
  fuse_kind kind;
  int parent;   /* union-find: merged groups point at their survivor */
  int64_t key;  /* position: groups read only from groups with smaller keys */
  int ext_uses; /* consumer edges from the group's nodes to nodes outside it */
  cm_type row_shape;
  unsigned row_axes;
  int64_t row_numel, stat_numel;
  bool fits, bcast_back, has_assign;
  int n_heavy;           /* reductions and contractions */
  int first_contraction; /* node id, -1 if none */
  int head, tail;        /* member nodes, linked through fuser.next */
  bool dead;             /* merged away or re-fused */
  int64_t max_input_key; /* latest key among the groups it reads from, -1 if none */
} fuse_group;

typedef struct {
  const cm_graph *g;
  int *cstart, *clist; /* consumers (one entry per input edge) */
  int *group_of;       /* raw group ids, -1: none (yet) */
  unsigned char *level;
  int *next; /* next member of the same group, -1 at the end */
  fuse_group *groups;
  int n_groups, cap_groups;
  bool allow_attention;
  int min_cand;     /* only groups >= this id may be joined or merged */
  int64_t next_key; /* key of the next new group */
  int64_t key_step;
  bool oom;
} fuser;

static int find(fuser *f, int gid) {
  while (f->groups[gid].parent != gid) {
    f->groups[gid].parent = f->groups[f->groups[gid].parent].parent;
    gid = f->groups[gid].parent;
  }
  return gid;
}

static int group_of(fuser *f, int node) {
  int gid = f->group_of[node];
  return gid < 0 ? -1 : find(f, gid);
}

static int new_group(fuser *f, fuse_kind kind) {
  if (f->n_groups == f->cap_groups) {
    int cap = f->cap_groups ? 2 * f->cap_groups : 64;
    fuse_group *grown = realloc(f->groups, sizeof *grown * (size_t)cap);
    if (!grown) {
      f->oom = true;
      return -1;
    }
    f->groups = grown;
    f->cap_groups = cap;
  }
  int id = f->n_groups++;
  fuse_group *fg = &f->groups[id];
  memset(fg, 0, sizeof *fg);
  fg->kind = kind;
  fg->parent = id;
  fg->key = f->next_key;
  f->next_key += f->key_step;
  fg->head = fg->tail = -1;
  fg->max_input_key = -1;
  fg->first_contraction = -1;
  return id;
}

static int n_consumers(const fuser *f, int node) {
  return f->cstart[node + 1] - f->cstart[node];
}

static void add_to(fuser *f, int node, int gid, fuse_level lv) {
  const cm_node *n = &f->g->nodes[node];
  f->group_of[node] = gid;
  f->level[node] = (unsigned char)lv;
  fuse_group *fg = &f->groups[gid];
  f->next[node] = -1;
  if (fg->tail >= 0)
    f->next[fg->tail] = node;
  else
    fg->head = node;
  fg->tail = node;
  fg->ext_uses += n_consumers(f, node);
  for (int k = 0; k < n->n_inputs; k++) {
    int gx = group_of(f, n->inputs[k]);
    if (gx == gid)
      fg->ext_uses--;
    else if (gx >= 0 && f->groups[gx].key > fg->max_input_key)
      fg->max_input_key = f->groups[gx].key;
  }
  if (n->op == CM_OP_ASSIGN) fg->has_assign = true;
  cm_category cat = cm_op_get_info(n->op)->category;
  if (cat == CM_CAT_REDUCE || cat == CM_CAT_CONTRACTION) fg->n_heavy++;
  if (cat == CM_CAT_CONTRACTION && fg->first_contraction < 0) fg->first_contraction = node;
}

static unsigned axes_mask(const cm_node *n, int rank) {
  unsigned m = 0;
  for (int k = 0; k < n->attrs.n_axes; k++) {
    int a = n->attrs.axes[k] < 0 ? n->attrs.axes[k] + rank : n->attrs.axes[k];
    m |= 1u << a;
  }
  return m;
}

/* Sets a group's row domain: the shape reduced (or the contraction's output) and the axes. */
static void set_rows(fuse_group *fg, cm_type shape, unsigned axes) {
  fg->row_shape = shape;
  fg->row_axes = axes;
  fg->row_numel = cm_type_numel(&shape);
  int64_t row_len = 1;
  for (int i = 0; i < shape.rank; i++)
    if (axes & (1u << i)) row_len *= shape.dims[i];
  fg->stat_numel = fg->row_numel / row_len;
  fg->fits = row_len <= ROW_FITS_ELEMENTS;
}

/* A param seen through views and casts: a layer's weight, not an activation. */
static bool is_weight(const cm_graph *g, int x) {
  for (int depth = 0; depth < 16; depth++) {
    const cm_node *n = &g->nodes[x];
    if (n->op == CM_OP_PARAM || n->op == CM_OP_STATE) return true;
    if (n->op != CM_OP_RESHAPE && n->op != CM_OP_PERMUTE && n->op != CM_OP_BROADCAST &&
        n->op != CM_OP_CAST && n->op != CM_OP_SLICE)
      return false;
    x = n->inputs[0];
  }
  return false;
}

/* A matmul of two activations (no weight) over equal batch axes (no
 * broadcasting) of rank >= 3: the shape of attention's matmuls. */
static bool is_batched_matmul(const cm_graph *g, int node) {
  const cm_node *n = &g->nodes[node];
  if (n->op != CM_OP_MATMUL || n->type.rank < 3) return false;
  const cm_type *a = &g->nodes[n->inputs[0]].type, *b = &g->nodes[n->inputs[1]].type;
  if (a->rank != n->type.rank || b->rank != n->type.rank) return false;
  for (int i = 0; i < n->type.rank - 2; i++)
    if (a->dims[i] != b->dims[i]) return false;
  return !is_weight(g, n->inputs[0]) && !is_weight(g, n->inputs[1]);
}

/* The broadcast expands exactly the group's reduced axes of its row shape. */
static bool broadcasts_back(const fuse_group *fg, const cm_graph *g, int node) {
  const cm_node *n = &g->nodes[node];
  const cm_type *in = &g->nodes[n->inputs[0]].type;
  if (!cm_shape_equal(&n->type, &fg->row_shape)) return false;
  int lead = n->type.rank - in->rank;
  for (int i = 0; i < n->type.rank; i++) {
    int64_t d = i < lead ? 1 : in->dims[i - lead], full = n->type.dims[i];
    if (fg->row_axes & (1u << i)) {
      if (full != 1 && d != 1) return false;
    } else if (d != full) {
      return false;
    }
  }
  return true;
}

/* The common level of a node's inputs inside gid, ignoring LV_FREE; returns
 * false on a conflict. *lv = LV_FREE when no input has another level; *numel:
 * the element count of one input at that level. */
static bool inner_level(fuser *f, int node, int gid, fuse_level *lv, int64_t *numel) {
  const cm_node *n = &f->g->nodes[node];
  *lv = LV_FREE;
  *numel = 0;
  for (int k = 0; k < n->n_inputs; k++) {
    int x = n->inputs[k];
    if (group_of(f, x) != gid || f->level[x] == LV_FREE) continue;
    fuse_level l = (fuse_level)f->level[x];
    if (*lv != LV_FREE && *lv != l) return false;
    *lv = l;
    *numel = cm_type_numel(&f->g->nodes[x].type);
  }
  return true;
}

static bool is_rowish(fuse_kind k) {
  return k == FK_REDUCE || k == FK_GEMM_ROW || k == FK_ATTENTION;
}

/* Whether node may join group gid, and at which level. */
static bool try_join(fuser *f, int node, int gid, fuse_level *out) {
  const cm_graph *g = f->g;
  const cm_node *n = &g->nodes[node];
  fuse_group *fg = &f->groups[gid];
  cm_category cat = cm_op_get_info(n->op)->category;
  int64_t numel = cm_type_numel(&n->type);
  if (fg->kind == FK_SEALED || fg->kind == FK_COLLECTIVE || fg->kind == FK_UPDATE ||
      fg->kind == FK_NORM)
    return false;
  fuse_level lv;
  int64_t in_numel;
  if (!inner_level(f, node, gid, &lv, &in_numel)) return false;
  if (lv == LV_TOTAL) { /* closes its group: only a view of it follows */
    if (n->op != CM_OP_RESHAPE) return false;
    *out = LV_TOTAL;
    return true;
  }
  switch (cat) {
  case CM_CAT_ELEMENTWISE:
  case CM_CAT_MOVEMENT:
    if (n->op == CM_OP_SCATTER_ADD) return false;
    if (fg->kind == FK_EW) {
      *out = LV_FREE;
      return true;
    }
    /* a transpose or slice of a contraction's output is absorbed by the store:
     * the group's last step for that value */
    if ((n->op == CM_OP_PERMUTE || n->op == CM_OP_SLICE) &&
        (((fg->kind == FK_GEMM || fg->kind == FK_CONV) && lv == LV_ROW) || lv == LV_OUT2)) {
      *out = LV_TOTAL;
      return true;
    }
    if (cat == CM_CAT_MOVEMENT && n->op != CM_OP_RESHAPE && n->op != CM_OP_BROADCAST) return false;
    if (n->op == CM_OP_BROADCAST) {
      if (lv == LV_STAT && is_rowish(fg->kind) && fg->fits && broadcasts_back(fg, g, node)) {
        fg->bcast_back = true;
        *out = LV_ROW;
        return true;
      }
      if (lv == LV_FREE && fg->kind == FK_REDUCE && cm_shape_equal(&n->type, &fg->row_shape)) {
        *out = LV_FREE;
        return true;
      }
      return false;
    }
    if (lv == LV_FREE) { /* only values over the rows of a reduction */
      if (fg->kind != FK_REDUCE || numel != fg->row_numel) return false;
      *out = LV_FREE;
      return true;
    }
    if (n->op == CM_OP_RESHAPE) {
      *out = lv;
      return true;
    }
    if ((lv == LV_ROW && numel == fg->row_numel) || (lv == LV_STAT && numel == fg->stat_numel) ||
        ((lv == LV_OUT2 || lv == LV_SIB) && numel == in_numel)) {
      *out = lv;
      return true;
    }
    return false;
  case CM_CAT_REDUCE: {
    int x = n->inputs[0];
    const cm_type *tx = &g->nodes[x].type;
    unsigned axes = axes_mask(n, tx->rank);
    if (group_of(f, x) != gid) return false;
    if (fg->kind == FK_EW) {
      if (fg->has_assign) return false;
      fg->kind = FK_REDUCE;
      set_rows(fg, *tx, axes);
      *out = LV_STAT;
      return true;
    }
    bool same_rows = cm_shape_equal(tx, &fg->row_shape) && axes == fg->row_axes;
    if (is_rowish(fg->kind) && (lv == LV_ROW || (lv == LV_FREE && fg->kind == FK_REDUCE))) {
      if (same_rows) {
        *out = LV_STAT;
        return true;
      }
      /* any other reduction of the rows' values closes the group (accumulated
       * across rows: the loss of log-softmax + cross-entropy, the column sums of
       * LayerNorm's weight gradient) */
      if (cm_type_numel(tx) == fg->row_numel && lv == LV_ROW) {
        *out = LV_TOTAL;
        return true;
      }
      if (cm_type_numel(tx) == fg->row_numel && numel == 1) {
        *out = LV_TOTAL;
        return true;
      }
      return false;
    }
    if ((fg->kind == FK_GEMM || fg->kind == FK_GEMM_SIB) && f->allow_attention && lv == LV_ROW &&
        fg->first_contraction >= 0 && is_batched_matmul(g, fg->first_contraction) &&
        cm_shape_equal(tx, &fg->row_shape) && axes == 1u << (tx->rank - 1)) {
      set_rows(fg, *tx, axes);
      if (!fg->fits) return false;
      fg->kind = FK_GEMM_ROW;
      *out = LV_STAT;
      return true;
    }
    /* the bias gradient: sums of a contraction's output over rows, in its epilogue */
    if ((fg->kind == FK_GEMM || fg->kind == FK_CONV) && lv == LV_ROW &&
        cm_type_numel(tx) == fg->row_numel) {
      *out = LV_TOTAL;
      return true;
    }
    return false;
  }
  case CM_CAT_CONTRACTION: {
    if (!f->allow_attention || !is_batched_matmul(g, node)) return false;
    if (fg->kind != FK_GEMM_ROW && fg->kind != FK_ATTENTION) return false;
    bool rows = false;
    for (int k = 0; k < 2; k++) {
      int x = n->inputs[k];
      if (group_of(f, x) != gid) continue;
      if (f->level[x] == LV_ROW && cm_type_numel(&g->nodes[x].type) == fg->row_numel)
        rows = true;
      else if (f->level[x] != LV_FREE)
        return false;
    }
    if (!rows) return false;
    fg->kind = FK_ATTENTION;
    *out = LV_OUT2;
    return true;
  }
  case CM_CAT_UPDATE:
    if (fg->kind != FK_EW) return false;
    *out = LV_FREE;
    return true;
  default: return false;
  }
}

/* Cheap enough to recompute while loading a contraction's operand. */
static bool cheap_prologue_node(fuser *f, int node, int gid) {
  const cm_graph *g = f->g;
  const cm_node *n = &g->nodes[node];
  switch (n->op) {
  case CM_OP_RESHAPE:
  case CM_OP_PERMUTE:
  case CM_OP_SLICE:
  case CM_OP_BROADCAST: return true;
  default: break;
  }
  if (cm_op_get_info(n->op)->category != CM_CAT_ELEMENTWISE) return false;
  int full = 0; /* operands of full size read from memory */
  for (int k = 0; k < n->n_inputs; k++) {
    int x = n->inputs[k];
    if (group_of(f, x) == gid) continue;
    const cm_node *xn = &g->nodes[x];
    bool small = xn->op == CM_OP_CONST || xn->op == CM_OP_IOTA || cm_type_numel(&xn->type) == 1;
    if (!small) full++;
  }
  return full <= (n->n_inputs == 1 ? 1 : 0);
}

static bool cheap_prologue(fuser *f, int hid) {
  for (int v = f->groups[hid].head; v >= 0; v = f->next[v])
    if (!cheap_prologue_node(f, v, hid)) return false;
  return true;
}

/* Merges group hid into gid (hid's only external uses were `edges` edges into gid). */
static void merge(fuser *f, int hid, int gid, int edges) {
  fuse_group *h = &f->groups[hid], *fg = &f->groups[gid];
  fg->ext_uses += h->ext_uses - edges;
  fg->has_assign |= h->has_assign;
  if (h->max_input_key > fg->max_input_key) fg->max_input_key = h->max_input_key;
  if (h->head >= 0) {
    if (fg->tail >= 0)
      f->next[fg->tail] = h->head;
    else
      fg->head = h->head;
    fg->tail = h->tail;
  }
  h->parent = gid;
  h->dead = true;
  h->head = h->tail = -1;
}

/* An elementwise group whose only remaining external uses are this node's
 * inputs: it fuses into the node's group (fusion into the consumer). */
static bool absorbable(fuser *f, int node, int hid) {
  const cm_node *n = &f->g->nodes[node];
  if (hid < 0 || hid < f->min_cand) return false;
  fuse_group *h = &f->groups[hid];
  if (h->kind != FK_EW || h->has_assign) return false;
  int edges = 0;
  for (int j = 0; j < n->n_inputs; j++) edges += group_of(f, n->inputs[j]) == hid;
  if (h->ext_uses != edges) return false;
  bool into_contraction = cm_op_get_info(n->op)->category == CM_CAT_CONTRACTION;
  return !into_contraction || cheap_prologue(f, hid);
}

static void merge_producers(fuser *f, int node, int gid) {
  const cm_node *n = &f->g->nodes[node];
  fuse_kind kind = f->groups[gid].kind;
  if (kind == FK_SEALED || kind == FK_COLLECTIVE || kind == FK_UPDATE || kind == FK_NORM) return;
  for (int k = 0; k < n->n_inputs; k++) {
    int hid = group_of(f, n->inputs[k]);
    if (hid == gid || !absorbable(f, node, hid)) continue;
    int edges = 0;
    for (int j = 0; j < n->n_inputs; j++) edges += group_of(f, n->inputs[j]) == hid;
    merge(f, hid, gid, edges);
  }
}

/* attention backward: a batched matmul sharing an operand with the lone batched
 * matmul of a later group joins it as a sibling (dV beside dP). */
static int sibling_group(fuser *f, int node) {
  const cm_node *n = &f->g->nodes[node];
  int64_t latest = -1;
  for (int k = 0; k < n->n_inputs; k++) {
    int gx = group_of(f, n->inputs[k]);
    if (gx >= 0 && f->groups[gx].key > latest) latest = f->groups[gx].key;
  }
  for (int k = 0; k < 2; k++) {
    int x = n->inputs[k];
    int end = f->cstart[x + 1];
    if (end - f->cstart[x] > SIBLING_SCAN) end = f->cstart[x] + SIBLING_SCAN;
    for (int e = f->cstart[x]; e < end; e++) {
      int c = f->clist[e];
      if (c >= node || !is_batched_matmul(f->g, c)) continue;
      int gc = group_of(f, c);
      if (gc < f->min_cand || gc < 0) continue;
      fuse_group *fg = &f->groups[gc];
      if (fg->kind == FK_GEMM && fg->n_heavy == 1 && fg->key > latest) return gc;
    }
  }
  return -1;
}

static void place(fuser *f, int node) {
  const cm_graph *g = f->g;
  const cm_node *n = &g->nodes[node];
  cm_category cat = cm_op_get_info(n->op)->category;
  if (cat == CM_CAT_SOURCE || f->group_of[node] >= 0) return;
  /* The candidate: the latest input group that will not be absorbed; groups
   * that will be absorbed may be later, as long as what they read is earlier. */
  int cand = -1, cand_any = -1;
  int64_t absorbed_reads = -1;
  for (int k = 0; k < n->n_inputs; k++) {
    int gx = group_of(f, n->inputs[k]);
    if (gx < f->min_cand || gx < 0) continue;
    if (cand_any < 0 || f->groups[gx].key > f->groups[cand_any].key) cand_any = gx;
    if (absorbable(f, node, gx)) {
      if (f->groups[gx].max_input_key > absorbed_reads)
        absorbed_reads = f->groups[gx].max_input_key;
      continue;
    }
    if (cand < 0 || f->groups[gx].key > f->groups[cand].key) cand = gx;
  }
  if (cand < 0 || absorbed_reads >= f->groups[cand].key) cand = cand_any;
  /* every other input group must come before the candidate (or be absorbed) */
  for (int k = 0; k < n->n_inputs && cand >= 0; k++) {
    int gx = group_of(f, n->inputs[k]);
    if (gx >= 0 && gx != cand && f->groups[gx].key >= f->groups[cand].key &&
        !absorbable(f, node, gx))
      cand = -1;
  }
  fuse_level lv = LV_FREE;
  int gid = -1;
  if (cand >= 0 && try_join(f, node, cand, &lv)) {
    gid = cand;
  } else if (f->allow_attention && is_batched_matmul(g, node) &&
             (gid = sibling_group(f, node)) >= 0) {
    f->groups[gid].kind = FK_GEMM_SIB;
    lv = LV_SIB;
  } else {
    fuse_kind kind = FK_EW;
    switch (cat) {
    case CM_CAT_REDUCE: kind = FK_REDUCE; break;
    case CM_CAT_CONTRACTION: kind = n->op == CM_OP_MATMUL ? FK_GEMM : FK_CONV; break;
    case CM_CAT_COLLECTIVE: kind = FK_COLLECTIVE; break;
    default: kind = n->op == CM_OP_SCATTER_ADD ? FK_SEALED : FK_EW; break;
    }
    gid = new_group(f, kind);
    if (gid < 0) return;
    fuse_group *fg = &f->groups[gid];
    if (kind == FK_REDUCE) {
      const cm_type *tx = &g->nodes[n->inputs[0]].type;
      set_rows(fg, *tx, axes_mask(n, tx->rank));
      lv = LV_STAT;
    } else if (kind == FK_GEMM || kind == FK_CONV) {
      set_rows(fg, n->type, 0);
      lv = LV_ROW;
    }
  }
  add_to(f, node, gid, lv);
  merge_producers(f, node, gid);
}

/* ---- the flash attention backward ------------------------------------------ */

/* The attention backward in the form passes/flash_backward.c leaves (its S, E,
 * P recomputed from Q, K and the row statistics m, z; D = rowsum(dO∘O) outside)
 * is one ATTENTION group, formed as a whole rather than greedily: the
 * recomputation, dP = dO Vᵀ, dS and the three contractions dV, dQ, dK over its
 * rows, the broadcasts of m, z and −D/z and that row statistic itself. Its
 * anchor is a recomputed E' = exp(sub(S'·c, broadcast m)) — an exp with no row
 * sum of its own (the forward's E has one) — whose S' is a batched matmul. */
typedef struct flash_set {
  int anchor;      /* E' */
  int first, last; /* smallest and largest member id */
  bool formed;
} flash_set;

static bool is_row_sum_of(const cm_graph *g, int r, int x) {
  const cm_node *n = &g->nodes[r];
  return n->op == CM_OP_REDUCE_SUM && n->inputs[0] == x && n->attrs.n_axes == 1 &&
         n->attrs.axes[0] == g->nodes[x].type.rank - 1;
}

/* E' and its recomputation chain back to S' (members: flash[v] = s), or false. */
static bool flash_anchor(fuser *f, int e, int s, int *flash) {
  const cm_graph *g = f->g;
  const cm_node *en = &g->nodes[e];
  if (en->op != CM_OP_EXP || en->type.rank < 3) return false;
  for (int k = f->cstart[e]; k < f->cstart[e + 1]; k++)
    if (is_row_sum_of(g, f->clist[k], e)) return false; /* the forward's own E */
  int sub = en->inputs[0];
  if (g->nodes[sub].op != CM_OP_SUB) return false;
  int chain[6], n = 0, x = g->nodes[sub].inputs[0];
  chain[n++] = e, chain[n++] = sub;
  if (g->nodes[x].op == CM_OP_MUL) {
    int k = g->nodes[g->nodes[x].inputs[1]].op == CM_OP_CONST ? 0 : 1;
    if (g->nodes[g->nodes[x].inputs[1 - k]].op != CM_OP_CONST) return false;
    chain[n++] = x;
    x = g->nodes[x].inputs[k];
  }
  if (g->nodes[x].op == CM_OP_CAST) chain[n++] = x, x = g->nodes[x].inputs[0];
  if (!is_batched_matmul(g, x) || !cm_shape_equal(&g->nodes[x].type, &en->type)) return false;
  chain[n++] = x;
  for (int k = 0; k < n; k++)
    if (flash[chain[k]] >= 0 || f->group_of[chain[k]] >= 0) return false;
  for (int k = 0; k < n; k++) flash[chain[k]] = s;
  return true;
}

/* Whether x may join set s given its consumers (all in s, at least one). */
static bool consumed_by_set(const fuser *f, const int *flash, int x, int s) {
  if (f->cstart[x + 1] == f->cstart[x]) return false;
  for (int k = f->cstart[x]; k < f->cstart[x + 1]; k++)
    if (flash[f->clist[k]] != s) return false;
  return true;
}

/* A value of the rows (E's shape) or of the row statistics (one per row),
 * computed from such values: what the backward computes per tile or per row. */
static bool row_or_stat_value(const cm_graph *g, int x, const cm_type *rows, int64_t stat_numel) {
  const cm_node *n = &g->nodes[x];
  int64_t numel = cm_type_numel(&n->type);
  cm_category cat = cm_op_get_info(n->op)->category;
  if (numel == cm_type_numel(rows) && cm_shape_equal(&n->type, rows))
    return cat == CM_CAT_ELEMENTWISE || n->op == CM_OP_BROADCAST || is_batched_matmul(g, x);
  if (numel != stat_numel) return false;
  return cat == CM_CAT_ELEMENTWISE || n->op == CM_OP_RESHAPE;
}

/* Grows set s from its anchor chain: forward through the rows' elementwise
 * values to the contractions reading them (and their f32 casts), then back
 * over producers whose every consumer is in the set. Returns false (members
 * cleared) when the set is not convex or has fewer than three contractions. */
static bool grow_flash_set(fuser *f, int *flash, int s, flash_set *fs, unsigned char *sink) {
  const cm_graph *g = f->g;
  const cm_type *rows = &g->nodes[fs->anchor].type;
  int64_t stat_numel = cm_type_numel(rows) / rows->dims[rows->rank - 1];
  int n_sinks = 0;
  fs->first = fs->last = fs->anchor;
  for (int v = fs->anchor + 1; v < g->n_nodes; v++) {
    const cm_node *n = &g->nodes[v];
    bool reads = false;
    for (int k = 0; k < n->n_inputs; k++) reads |= flash[n->inputs[k]] == s && !sink[n->inputs[k]];
    bool sink_cast = n->op == CM_OP_CAST && flash[n->inputs[0]] == s && sink[n->inputs[0]] == 1;
    if ((!reads && !sink_cast) || flash[v] >= 0 || f->group_of[v] >= 0) continue;
    if (is_batched_matmul(g, v)) {
      flash[v] = s, sink[v] = 1, n_sinks++;
    } else if (sink_cast) {
      flash[v] = s, sink[v] = 2;
    } else if (row_or_stat_value(g, v, rows, stat_numel) &&
               cm_type_numel(&n->type) == cm_type_numel(rows)) {
      flash[v] = s;
    } else {
      continue;
    }
    fs->last = v;
  }
  for (int v = fs->last; v >= 0; v--) {
    if (flash[v] >= 0 || f->group_of[v] >= 0 || !consumed_by_set(f, flash, v, s)) continue;
    if (!row_or_stat_value(g, v, rows, stat_numel)) continue;
    flash[v] = s;
    if (v < fs->first) fs->first = v;
  }
  /* convex: nothing outside leaves the set and comes back */
  bool ok = n_sinks >= 3;
  unsigned char *after = f->level; /* scratch: depends on the set from outside it */
  for (int v = fs->first; v <= fs->last && ok; v++) {
    after[v] = 0;
    if (flash[v] == s) continue;
    const cm_node *n = &g->nodes[v];
    for (int k = 0; k < n->n_inputs; k++) {
      int x = n->inputs[k];
      if (x >= fs->first && (flash[x] == s || after[x])) after[v] = 1;
    }
    for (int k = f->cstart[v]; k < f->cstart[v + 1] && after[v]; k++)
      if (flash[f->clist[k]] == s) ok = false;
  }
  for (int v = fs->first; v <= fs->last; v++) after[v] = 0;
  if (!ok)
    for (int v = fs->first; v <= fs->last; v++)
      if (flash[v] == s) flash[v] = -1, sink[v] = 0;
  return ok;
}

/* Finds the flash backward sets; flash[v] = set index or -1. */
static int find_flash_sets(fuser *f, int *flash, flash_set **sets, unsigned char *sink) {
  const cm_graph *g = f->g;
  int n = 0, cap = 0;
  *sets = NULL;
  for (int v = 0; v < g->n_nodes; v++) flash[v] = -1, sink[v] = 0;
  for (int v = 0; v < g->n_nodes && !f->oom; v++) {
    if (g->nodes[v].op != CM_OP_EXP || flash[v] >= 0) continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 16;
      flash_set *grown = realloc(*sets, sizeof *grown * (size_t)cap);
      if (!grown) {
        f->oom = true;
        break;
      }
      *sets = grown;
    }
    if (!flash_anchor(f, v, n, flash)) continue;
    (*sets)[n] = (flash_set){v, v, v, false};
    if (grow_flash_set(f, flash, n, &(*sets)[n], sink)) {
      n++;
    } else {
      for (int u = 0; u < g->n_nodes; u++)
        if (flash[u] == n) flash[u] = -1;
    }
  }
  return n;
}

/* Places set s as one attention group (its members in order). */
static void form_flash_group(fuser *f, const int *flash, const unsigned char *sink, int s,
                             flash_set *fs) {
  const cm_graph *g = f->g;
  int gid = new_group(f, FK_ATTENTION);
  if (gid < 0) return;
  const cm_type *rows = &g->nodes[fs->anchor].type;
  set_rows(&f->groups[gid], *rows, 1u << (rows->rank - 1));
  f->groups[gid].bcast_back = true;
  for (int v = fs->first; v <= fs->last; v++) {
    if (flash[v] != s) continue;
    fuse_level lv = sink[v]                                                   ? LV_OUT2
                    : cm_type_numel(&g->nodes[v].type) == cm_type_numel(rows) ? LV_ROW
                                                                              : LV_STAT;
    add_to(f, v, gid, lv);
  }
  fs->formed = true;
}

/* Node order with the flash sets deferred: a set's members and everything
 * reading them wait until its last member, then the set becomes a group and
 * the waiting nodes are placed after it, in order. */
static void place_all(fuser *f) {
  const cm_graph *g = f->g;
  int n = g->n_nodes;
  int *flash = malloc(sizeof(int) * ((size_t)n + 1)),
      *waiting = malloc(sizeof(int) * ((size_t)n + 1));
  unsigned char *sink = malloc((size_t)n + 1), *waits = calloc((size_t)n + 1, 1);
  flash_set *sets = NULL;
  if (!flash || !waiting || !sink || !waits) {
    f->oom = true;
    free(flash), free(waiting), free(sink), free(waits);
    return;
  }
  int n_sets = find_flash_sets(f, flash, &sets, sink), n_waiting = 0;
  for (int v = 0; v < n && !f->oom; v++) {
    if (flash[v] >= 0) {
      if (v != sets[flash[v]].last) continue;
      form_flash_group(f, flash, sink, flash[v], &sets[flash[v]]);
      int kept = 0; /* place what waited, unless it waits for another set */
      for (int i = 0; i < n_waiting; i++) {
        int w = waiting[i];
        bool blocked = false;
        for (int k = 0; k < g->nodes[w].n_inputs; k++) {
          int x = g->nodes[w].inputs[k];
          blocked |= (flash[x] >= 0 && !sets[flash[x]].formed) || waits[x];
        }
        if (blocked) {
          waiting[kept++] = w;
        } else {
          waits[w] = 0;
          place(f, w);
        }
      }
      n_waiting = kept;
      continue;
    }
    bool wait = false;
    for (int k = 0; k < g->nodes[v].n_inputs && n_sets; k++) {
      int x = g->nodes[v].inputs[k];
      wait |= (flash[x] >= 0 && !sets[flash[x]].formed) || waits[x];
    }
    if (wait) {
      waits[v] = 1;
      waiting[n_waiting++] = v;
    } else {
      place(f, v);
    }
  }
  for (int i = 0; i < n_waiting && !f->oom; i++) place(f, waiting[i]); /* none: sets all formed */
  free(flash), free(waiting), free(sink), free(waits), free(sets);
}

/* ---- update regions ------------------------------------------------------ */

enum { REGION_NONE, REGION_NORM, REGION_OPTIMIZER, REGION_EMA, REGION_OTHER, REGION_COUNT };

static int cmp_int(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Per node: the update region it belongs to (REGION_NONE for most). */
static cm_status classify_regions(const fuser *f, unsigned char *region, cm_err *err) {
  const cm_graph *g = f->g;
  static const char moment[] = "optimizer.exp_avg.";
  int n_named = 0;
  for (int v = 0; v < g->n_nodes; v++) n_named += g->nodes[v].op == CM_OP_ASSIGN;
  const char **with_state = malloc(sizeof(char *) * ((size_t)n_named + 1));
  if (!with_state) return cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
  n_named = 0;
  for (int v = 0; v < g->n_nodes; v++) {
    const cm_node *n = &g->nodes[v];
    if (n->op != CM_OP_ASSIGN) continue;
    const char *t = g->nodes[n->inputs[0]].name;
    if (strncmp(t, moment, sizeof moment - 1) == 0) with_state[n_named++] = t + sizeof moment - 1;
  }
  qsort(with_state, (size_t)n_named, sizeof *with_state, cmp_str);
  for (int v = g->n_nodes - 1; v >= 0; v--) {
    const cm_node *n = &g->nodes[v];
    region[v] = REGION_NONE;
    cm_category cat = cm_op_get_info(n->op)->category;
    if (n->op == CM_OP_ASSIGN) {
      const cm_node *t = &g->nodes[n->inputs[0]];
      if (t->op == CM_OP_STATE && strncmp(t->name, "optimizer.", 10) == 0)
        region[v] = REGION_OPTIMIZER;
      else if (t->op == CM_OP_PARAM)
        region[v] = bsearch(&t->name, with_state, (size_t)n_named, sizeof *with_state, cmp_str)
                        ? REGION_OPTIMIZER
                        : REGION_EMA;
      else
        region[v] = REGION_OTHER;
      continue;
    }
    if (cat != CM_CAT_ELEMENTWISE && cat != CM_CAT_MOVEMENT) continue;
    if (n->op == CM_OP_SCATTER_ADD || n_consumers(f, v) == 0) continue;
    /* the earliest region among the consumers, when they all lie in regions */
    int r = REGION_COUNT;
    for (int e = f->cstart[v]; e < f->cstart[v + 1] && r; e++) {
      int c = region[f->clist[e]];
      r = c == REGION_NONE ? REGION_NONE : (c < r ? c : r);
    }
    region[v] = (unsigned char)(r == REGION_COUNT ? REGION_NONE : r);
  }
  /* The gradient norm (the step's "grad_norm"): every reduction and
   * elementwise node that serves only it is one multi-tensor reduction, not
   * one kernel per parameter. It runs before the updates that may use it. */
  int norm = cm_graph_find(g, "grad_norm");
  if (norm >= 0 && region[norm] == REGION_NONE) {
    region[norm] = REGION_NORM;
    for (int v = norm - 1; v >= 0; v--) {
      cm_category cat = cm_op_get_info(g->nodes[v].op)->category;
      if (region[v] != REGION_NONE || n_consumers(f, v) == 0 ||
          (cat != CM_CAT_ELEMENTWISE && cat != CM_CAT_MOVEMENT && cat != CM_CAT_REDUCE) ||
          g->nodes[v].op == CM_OP_SCATTER_ADD)
        continue;
      /* Serving only the norm; or, for elementwise work, only the norm and the
       * updates (a gradient's last add): the norm kernel computes and writes it,
       * the update reads it, so it is not a kernel of its own. */
      bool all_norm = true, all_regions = true, any_norm = false;
      for (int e = f->cstart[v]; e < f->cstart[v + 1]; e++) {
        int c = region[f->clist[e]];
        all_norm &= c == REGION_NORM;
        all_regions &= c != REGION_NONE;
        any_norm |= c == REGION_NORM;
      }
      if (all_norm || (all_regions && any_norm && cat != CM_CAT_REDUCE)) region[v] = REGION_NORM;
    }
  }
  free(with_state);
  return CM_OK;
}

/* ---- the driver ---------------------------------------------------------- */

static bool group_is_final(const fuse_group *fg) {
  return fg->kind != FK_GEMM_ROW && fg->kind != FK_GEMM_SIB;
}

static cm_group_kind plan_kind(const fuse_group *fg) {
  switch (fg->kind) {
  case FK_EW:
  case FK_SEALED: return fg->has_assign ? CM_GROUP_UPDATE : CM_GROUP_ELEMENTWISE;
  case FK_REDUCE: return fg->bcast_back ? CM_GROUP_ROW : CM_GROUP_REDUCE;
  case FK_GEMM:
  case FK_GEMM_SIB:
  case FK_GEMM_ROW: return CM_GROUP_GEMM;
  case FK_ATTENTION: return CM_GROUP_ATTENTION;
  case FK_CONV: return CM_GROUP_CONV;
  case FK_COLLECTIVE: return CM_GROUP_COLLECTIVE;
  case FK_UPDATE: return CM_GROUP_UPDATE;
  case FK_NORM: return CM_GROUP_REDUCE;
  }
  return CM_GROUP_ELEMENTWISE;
}

/* Re-fuses a group that began as attention but did not end as one, with the
 * attention rules off; its parts keep its place in the order. */
static void refuse(fuser *f, int gid) {
  int head = f->groups[gid].head;
  int64_t key = f->groups[gid].key;
  f->groups[gid].head = f->groups[gid].tail = -1;
  f->groups[gid].kind = FK_EW;
  f->groups[gid].parent = gid;
  int count = 0;
  for (int v = head; v >= 0; v = f->next[v]) count++;
  int *nodes = malloc(sizeof(int) * ((size_t)count + 1));
  if (!nodes) {
    f->oom = true;
    return;
  }
  count = 0;
  for (int v = head; v >= 0; v = f->next[v]) nodes[count++] = v;
  /* members in topological order (merges appended lists out of order) */
  qsort(nodes, (size_t)count, sizeof *nodes, cmp_int);
  for (int i = 0; i < count; i++) f->group_of[nodes[i]] = -1;
  f->groups[gid].dead = true;
  f->groups[gid].kind = FK_UPDATE; /* never joined again */
  f->allow_attention = false;
  f->min_cand = f->n_groups;
  f->next_key = key + 1;
  f->key_step = 1;
  for (int i = 0; i < count && !f->oom; i++) place(f, nodes[i]);
  free(nodes);
}

/* ---- duplication of expanding broadcasts ---------------------------------- */

static bool is_expanding_broadcast(const cm_graph *g, int v) {
  const cm_node *n = &g->nodes[v];
  return n->op == CM_OP_BROADCAST &&
         cm_type_numel(&g->nodes[n->inputs[0]].type) < cm_type_numel(&n->type);
}

/* A copy of g where every expanding broadcast read by several nodes has one
 * copy per reader; *out stays NULL when there is nothing to clone. */
static cm_status clone_broadcasts(const cm_graph *g, cm_graph **out, int *n_cloned, cm_err *err) {
  *out = NULL;
  *n_cloned = 0;
  int n = g->n_nodes;
  int *readers = calloc((size_t)n + 1, sizeof *readers),
      *last = malloc(sizeof(int) * ((size_t)n + 1));
  int *map = malloc(sizeof(int) * ((size_t)n + 1));
  if (!readers || !last || !map) {
    free(readers), free(last), free(map);
    return cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
  }
  for (int v = 0; v < n; v++) last[v] = -1;
  for (int v = 0; v < n; v++)
    for (int k = 0; k < g->nodes[v].n_inputs; k++) {
      int x = g->nodes[v].inputs[k];
      if (last[x] != v) readers[x]++, last[x] = v;
    }
  int wanted = 0;
  for (int v = 0; v < n; v++) wanted += is_expanding_broadcast(g, v) && readers[v] > 1;
  cm_status st = CM_OK;
  cm_graph *ng = NULL;
  if (!wanted) goto done;
  ng = cm_graph_new();
  if (!ng) {
    st = cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
    goto done;
  }
  for (int v = 0; v < n; v++) readers[v] = 0; /* now: readers served so far */
  for (int v = 0; v < n && !st; v++) {
    const cm_node *u = &g->nodes[v];
    int in[64], *ins = u->n_inputs <= 64 ? in : malloc(sizeof(int) * (size_t)u->n_inputs);
    if (!ins) {
      st = cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
      break;
    }
    for (int k = 0; k < u->n_inputs && !st; k++) {
      int x = u->inputs[k];
      ins[k] = map[x];
      bool seen = false; /* x read twice by this node: one copy */
      for (int j = 0; j < k; j++) seen |= u->inputs[j] == x;
      if (seen) {
        for (int j = 0; j < k; j++)
          if (u->inputs[j] == x) ins[k] = ins[j];
        continue;
      }
      if (!is_expanding_broadcast(g, x) || readers[x]++ == 0) continue;
      int src = map[g->nodes[x].inputs[0]];
      int c = cm_graph_add(ng, CM_OP_BROADCAST, NULL, &src, 1, &g->nodes[x].attrs, err);
      if (c < 0) st = err && err->status ? err->status : CM_EINTERNAL;
      ins[k] = c;
      ++*n_cloned;
    }
    if (!st) {
      const char *name = u->name[0] == '%' ? NULL : u->name; /* builder names given afresh */
      map[v] = cm_graph_add(ng, u->op, name, ins, u->n_inputs, &u->attrs, err);
      if (map[v] < 0) st = err && err->status ? err->status : CM_EINTERNAL;
    }
    if (ins != in) free(ins);
  }
  for (int k = 0; k < g->n_outputs && !st; k++)
    st = cm_graph_add_output(ng, map[g->outputs[k]], err);
  if (!st) st = cm_graph_verify(ng, err);
  if (st) {
    cm_err_prefix(err, "fuse: cloning broadcasts: ");
    cm_graph_free(ng);
    ng = NULL;
  }
done:
  free(readers), free(last), free(map);
  *out = ng;
  return st;
}

/* ---- the plan ------------------------------------------------------------- */

typedef struct {
  int64_t key;
  int gid;
} keyed;

static int cmp_keyed(const void *a, const void *b) {
  int64_t x = ((const keyed *)a)->key, y = ((const keyed *)b)->key;
  return (x > y) - (x < y);
}

static bool is_free_source(cm_op op) {
  return op == CM_OP_CONST || op == CM_OP_IOTA;
}

/* Builds the cm_plan from the final groups: const/iota copied into every group
 * reading them, inputs and outputs by the plan's rule. */
static cm_status build_plan(fuser *f, cm_plan **out, cm_err *err) {
  const cm_graph *g = f->g;
  int n = g->n_nodes;
  cm_status st = CM_OK;
  cm_plan *p = calloc(1, sizeof *p);
  int *final_of = malloc(sizeof(int) * ((size_t)n + 1)),
      *stamp = malloc(sizeof(int) * ((size_t)n + 1));
  int *count = NULL, *fill = NULL, *members = NULL;
  bool *is_output = calloc((size_t)n + 1, sizeof *is_output);
  keyed *order = malloc(sizeof *order * ((size_t)f->n_groups + 1));
  int *final_id = malloc(sizeof(int) * ((size_t)f->n_groups + 1));
  if (!p || !final_of || !stamp || !is_output || !order || !final_id) goto oom;
  p->n_nodes = n;
  int ng = 0;
  for (int gid = 0; gid < f->n_groups; gid++)
    if (!f->groups[gid].dead) order[ng++] = (keyed){f->groups[gid].key, gid};
  /* a graph output that is a const/iota read by no group gets a group of its own */
  for (int k = 0; k < g->n_outputs; k++) is_output[g->outputs[k]] = true;
  qsort(order, (size_t)ng, sizeof *order, cmp_keyed);
  for (int i = 0; i < f->n_groups; i++) final_id[i] = -1;
  for (int i = 0; i < ng; i++) final_id[order[i].gid] = i;
  for (int v = 0; v < n; v++) {
    int gid = group_of(f, v);
    final_of[v] = gid < 0 ? -1 : final_id[gid];
    stamp[v] = -1;
  }
  int extra = 0; /* lone const/iota outputs */
  for (int v = 0; v < n; v++)
    if (is_free_source(g->nodes[v].op) && is_output[v]) final_of[v] = -2; /* decided below */
  p->groups = calloc((size_t)ng + (size_t)g->n_outputs + 1, sizeof *p->groups);
  p->group_of = malloc(sizeof(int) * ((size_t)n + 1));
  count = calloc((size_t)ng + (size_t)g->n_outputs + 1, sizeof *count);
  if (!p->groups || !p->group_of || !count) goto oom;
  /* members without const/iota, per group in node order (CSR) */
  for (int v = 0; v < n; v++) {
    const cm_node *u = &g->nodes[v];
    for (int k = 0; k < u->n_inputs; k++) stamp[u->inputs[k]] = 0; /* read by some node */
  }
  for (int v = 0; v < n; v++)
    if (final_of[v] == -2) { /* an output const: its own group when no group reads it */
      final_of[v] = -1;
      if (stamp[v] < 0) final_of[v] = ng + extra++;
    }
  p->n_groups = ng + extra;
  fill = calloc((size_t)p->n_groups + 2, sizeof *fill);
  members = malloc(sizeof(int) * ((size_t)n + 1));
  if (!fill || !members) goto oom;
  for (int v = 0; v < n; v++)
    if (final_of[v] >= 0) fill[final_of[v] + 1]++;
  for (int gi = 0; gi < p->n_groups; gi++) fill[gi + 1] += fill[gi];
  for (int gi = 0; gi <= p->n_groups; gi++) count[gi] = fill[gi]; /* cursors */
  for (int v = 0; v < n; v++)
    if (final_of[v] >= 0) members[count[final_of[v]]++] = v;
  /* each group's list: a const/iota copy just before its first reader */
  for (int v = 0; v < n; v++) stamp[v] = -1;
  for (int gi = 0; gi < p->n_groups; gi++) {
    cm_group *gr = &p->groups[gi];
    gr->kind = gi < ng ? plan_kind(&f->groups[order[gi].gid]) : CM_GROUP_ELEMENTWISE;
    int total = 0;
    for (int m = fill[gi]; m < fill[gi + 1]; m++) {
      const cm_node *u = &g->nodes[members[m]];
      total++;
      for (int k = 0; k < u->n_inputs; k++) {
        int x = u->inputs[k];
        if (is_free_source(g->nodes[x].op) && stamp[x] != gi) stamp[x] = gi, total++;
      }
    }
    gr->nodes = malloc(sizeof(int) * ((size_t)total + 1));
    if (!gr->nodes) goto oom;
    for (int m = fill[gi]; m < fill[gi + 1]; m++) {
      int v = members[m];
      const cm_node *u = &g->nodes[v];
      for (int k = 0; k < u->n_inputs; k++) {
        int x = u->inputs[k];
        if (is_free_source(g->nodes[x].op) && stamp[x] != -2 - gi) {
          stamp[x] = -2 - gi;
          gr->nodes[gr->n_nodes++] = x;
        }
      }
      gr->nodes[gr->n_nodes++] = v;
    }
  }
  for (int v = 0; v < n; v++)
    p->group_of[v] = final_of[v] >= 0 && !is_free_source(g->nodes[v].op) ? final_of[v] : -1;
  /* an output const is owned by the first group that has a copy */
  for (int v = 0; v < n; v++)
    if (is_free_source(g->nodes[v].op) && is_output[v]) p->group_of[v] = -1;
  for (int gi = 0; gi < p->n_groups; gi++) {
    cm_group *gr = &p->groups[gi];
    for (int k = 0; k < gr->n_nodes; k++) {
      int v = gr->nodes[k];
      if (is_free_source(g->nodes[v].op) && is_output[v] && p->group_of[v] < 0) p->group_of[v] = gi;
    }
  }
  /* inputs and outputs */
  for (int v = 0; v < n; v++) stamp[v] = -1;
  int *scratch = final_of; /* reused: node ids */
  for (int gi = 0; gi < p->n_groups; gi++) {
    cm_group *gr = &p->groups[gi];
    int n_in = 0;
    for (int k = 0; k < gr->n_nodes; k++) stamp[gr->nodes[k]] = gi;
    for (int k = 0; k < gr->n_nodes; k++) {
      const cm_node *u = &g->nodes[gr->nodes[k]];
      for (int j = 0; j < u->n_inputs; j++) {
        int x = u->inputs[j];
        if (stamp[x] == gi || stamp[x] == -2 - gi) continue;
        stamp[x] = -2 - gi;
        scratch[n_in++] = x;
      }
    }
    gr->inputs = malloc(sizeof(int) * ((size_t)n_in + 1));
    if (!gr->inputs) goto oom;
    memcpy(gr->inputs, scratch, sizeof(int) * (size_t)n_in);
    gr->n_inputs = n_in;
  }
  for (int gi = 0; gi < p->n_groups; gi++) {
    cm_group *gr = &p->groups[gi];
    int n_out = 0;
    for (int k = 0; k < gr->n_nodes; k++) {
      int v = gr->nodes[k];
      if (p->group_of[v] != gi) continue;
      bool needed = is_output[v] || g->nodes[v].op == CM_OP_ASSIGN;
      for (int e = f->cstart[v]; e < f->cstart[v + 1] && !needed; e++)
        needed = p->group_of[f->clist[e]] != gi;
      if (needed) scratch[n_out++] = v;
    }
    gr->outputs = malloc(sizeof(int) * ((size_t)n_out + 1));
    if (!gr->outputs) goto oom;
    memcpy(gr->outputs, scratch, sizeof(int) * (size_t)n_out);
    gr->n_outputs = n_out;
  }
  *out = p;
  p = NULL;
  goto done;
oom:
  st = cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
done:
  if (p) cm_plan_free(p);
  free(final_of), free(stamp), free(count), free(fill), free(members), free(is_output), free(order),
      free(final_id);
  return st;
}

static cm_status fuse_graph(const cm_graph *g, cm_plan **out, cm_err *err) {
  *out = NULL;
  int n = g->n_nodes;
  fuser f;
  memset(&f, 0, sizeof f);
  f.g = g;
  f.cstart = calloc((size_t)n + 2, sizeof *f.cstart);
  f.group_of = malloc(sizeof(int) * ((size_t)n + 1));
  f.level = calloc((size_t)n + 1, 1);
  f.next = malloc(sizeof(int) * ((size_t)n + 1));
  unsigned char *region = malloc((size_t)n + 1);
  int edges = 0;
  for (int v = 0; v < n; v++) edges += g->nodes[v].n_inputs;
  f.clist = malloc(sizeof(int) * ((size_t)edges + 1));
  cm_status st = CM_OK;
  if (!f.cstart || !f.group_of || !f.level || !f.next || !region || !f.clist) {
    st = cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
    goto done;
  }
  for (int v = 0; v < n; v++)
    for (int k = 0; k < g->nodes[v].n_inputs; k++) f.cstart[g->nodes[v].inputs[k] + 1]++;
  for (int v = 0; v < n; v++) f.cstart[v + 1] += f.cstart[v];
  for (int v = 0; v < n; v++) f.next[v] = f.cstart[v]; /* fill cursor */
  for (int v = 0; v < n; v++)
    for (int k = 0; k < g->nodes[v].n_inputs; k++) f.clist[f.next[g->nodes[v].inputs[k]]++] = v;
  for (int v = 0; v < n; v++) f.group_of[v] = -1, f.next[v] = -1;
  if ((st = classify_regions(&f, region, err))) goto done;
  /* the update regions: last in the order, optimizer before EMA before the rest */
  f.next_key = INT64_MAX - 2 * REGION_COUNT;
  f.key_step = 1;
  int region_group[REGION_COUNT] = {-1, -1, -1, -1, -1};
  for (int r = 1; r < REGION_COUNT; r++) {
    bool any = false;
    for (int v = 0; v < n && !any; v++) any = region[v] == r;
    if (any && (region_group[r] = new_group(&f, r == REGION_NORM ? FK_NORM : FK_UPDATE)) < 0)
      f.oom = true;
  }
  for (int v = 0; v < n && !f.oom; v++)
    if (region[v]) add_to(&f, v, region_group[region[v]], LV_FREE);
  f.next_key = 0;
  f.key_step = (int64_t)1 << 20;
  f.allow_attention = true;
  place_all(&f);
  int n_main = f.n_groups;
  for (int gid = 0; gid < n_main && !f.oom; gid++)
    if (!f.groups[gid].dead && find(&f, gid) == gid && !group_is_final(&f.groups[gid]))
      refuse(&f, gid);
  if (f.oom) {
    st = cm_errorf(err, CM_EINTERNAL, "fuse: out of memory");
    goto done;
  }
  st = build_plan(&f, out, err);
done:
  free(f.cstart), free(f.clist), free(f.group_of), free(f.level), free(f.next), free(f.groups);
  free(region);
  return st;
}

cm_status cm_pass_fuse(cm_pass_state *s, cm_pass_stat *stat, cm_err *err) {
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int before = s->g->n_nodes, n_cloned = 0;
  cm_graph *cloned = NULL;
  cm_status st = clone_broadcasts(s->g, &cloned, &n_cloned, err);
  if (st) return st;
  if (cloned) {
    cm_graph_free(s->g);
    s->g = cloned;
  }
  cm_plan *plan = NULL;
  if ((st = fuse_graph(s->g, &plan, err))) return st;
  if (s->plan) cm_plan_free(s->plan);
  s->plan = plan;
  if (stat) {
    clock_gettime(CLOCK_MONOTONIC, &t1);
    stat->pass = "fuse";
    stat->ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-6;
    stat->nodes_before = before;
    stat->nodes_after = s->g->n_nodes;
    int by_kind[CM_GROUP_KIND_COUNT] = {0};
    for (int i = 0; i < plan->n_groups; i++) by_kind[plan->groups[i].kind]++;
    int len = snprintf(stat->detail, sizeof stat->detail, "%d groups:", plan->n_groups);
    for (int k = 0; k < CM_GROUP_KIND_COUNT && len > 0 && len < (int)sizeof stat->detail; k++)
      if (by_kind[k])
        len += snprintf(stat->detail + len, sizeof stat->detail - (size_t)len, " %d %s", by_kind[k],
                        cm_group_kind_name((cm_group_kind)k));
    if (len > 0 && len < (int)sizeof stat->detail)
      snprintf(stat->detail + len, sizeof stat->detail - (size_t)len, "; %d broadcasts cloned",
               n_cloned);
  }
  return CM_OK;
}
