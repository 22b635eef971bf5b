/* ir/graph.c — the op table, attributes, graph construction and the builders. */
#include "ir.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- the op table ------------------------------------------------------ */

static const cm_op_info op_table[CM_OP_COUNT] = {
#define CM_OP(id, name, cat, arity, attrs) [CM_OP_##id] = {name, cat, arity, attrs},
#include "ops.def"
#undef CM_OP
};

const cm_op_info *cm_op_get_info(cm_op op) {
  return (unsigned)op < CM_OP_COUNT ? &op_table[op] : NULL;
}
const char *cm_op_name(cm_op op) {
  return (unsigned)op < CM_OP_COUNT ? op_table[op].name : "?";
}

bool cm_op_from_name(const char *name, cm_op *out) {
  for (int i = 0; i < CM_OP_COUNT; i++)
    if (strcmp(op_table[i].name, name) == 0) {
      *out = (cm_op)i;
      return true;
    }
  return false;
}

const char *cm_category_name(cm_category c) {
  static const char *names[] = {"source",      "elementwise", "reduce", "movement",
                                "contraction", "collective",  "update"};
  return (unsigned)c < sizeof names / sizeof names[0] ? names[c] : "?";
}

void cm_attrs_default(cm_attrs *a) {
  memset(a, 0, sizeof *a);
  a->dtype = CM_F32;
  for (int i = 0; i < CM_MAX_RANK; i++) {
    a->step[i] = 1;
    a->perm[i] = i;
  }
  a->stride[0] = a->stride[1] = 1;
  a->dilation[0] = a->dilation[1] = 1;
  a->groups = 1;
  a->ranks = 1;
  a->mode = CM_MODE_SUM;
}

/* Keeps only the fields an op reads, so that two nodes with the same meaning
 * have the same bytes (printing, hashing and comparing stay simple). */
static void attrs_canonical(cm_op op, const cm_attrs *in, cm_attrs *out) {
  unsigned m = op_table[op].attrs;
  cm_attrs_default(out);
  if (!in) return;
  if (m & CM_ATTR_DTYPE) out->dtype = in->dtype;
  if (m & CM_ATTR_SHAPE) {
    out->rank = in->rank;
    memcpy(out->shape, in->shape, sizeof out->shape);
    for (int i = in->rank < 0 ? 0 : in->rank; i < CM_MAX_RANK; i++) out->shape[i] = 0;
  }
  if (m & CM_ATTR_INIT) out->init = in->init;
  if (m & CM_ATTR_VALUE) out->value = in->value;
  if (m & CM_ATTR_DATA) {
    out->data = in->data;
    out->n_data = in->data ? in->n_data : 0;
  }
  if (m & CM_ATTR_AXIS) out->axis = in->axis;
  if (m & CM_ATTR_AXES) {
    out->n_axes = in->n_axes;
    memcpy(out->axes, in->axes, sizeof out->axes);
  }
  if (m & CM_ATTR_KEEPDIMS) out->keepdims = in->keepdims;
  if (m & CM_ATTR_PERM) memcpy(out->perm, in->perm, sizeof out->perm);
  if (m & CM_ATTR_SLICE) {
    memcpy(out->start, in->start, sizeof out->start);
    memcpy(out->stop, in->stop, sizeof out->stop);
    memcpy(out->step, in->step, sizeof out->step);
  }
  if (m & CM_ATTR_PAD) {
    memcpy(out->lo, in->lo, sizeof out->lo);
    memcpy(out->hi, in->hi, sizeof out->hi);
  }
  if (m & CM_ATTR_TRANSPOSE) {
    out->transpose_a = in->transpose_a;
    out->transpose_b = in->transpose_b;
  }
  if (m & CM_ATTR_CONV) {
    memcpy(out->stride, in->stride, sizeof out->stride);
    memcpy(out->padding, in->padding, sizeof out->padding);
    memcpy(out->dilation, in->dilation, sizeof out->dilation);
    out->groups = in->groups;
  }
  if (m & CM_ATTR_MODE) out->mode = in->mode;
  if (m & CM_ATTR_RANKS) out->ranks = in->ranks;
}

/* ---- names ------------------------------------------------------------- */

bool cm_name_is_valid(const char *name) {
  if (!name || !*name) return false;
  if (name[0] == '%') {
    if (!name[1]) return false;
    for (const char *p = name + 1; *p; p++)
      if (*p < '0' || *p > '9') return false;
    return true;
  }
  for (const char *p = name; *p; p++) {
    char c = *p;
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == ':' || c == '/' || c == '-';
    if (!ok) return false;
  }
  return true;
}

static bool name_table_grow(cm_graph *g) {
  int cap = g->name_cap ? g->name_cap * 2 : 64;
  int *slots = malloc(sizeof(int) * (size_t)cap);
  if (!slots) return false;
  for (int i = 0; i < cap; i++) slots[i] = -1;
  for (int id = 0; id < g->n_nodes; id++) {
    uint64_t h = cm_hash_str(g->nodes[id].name) & (uint64_t)(cap - 1);
    while (slots[h] >= 0) h = (h + 1) & (uint64_t)(cap - 1);
    slots[h] = id;
  }
  free(g->name_slots);
  g->name_slots = slots;
  g->name_cap = cap;
  return true;
}

int cm_graph_find(const cm_graph *g, const char *name) {
  if (!g->name_cap || !name) return -1;
  uint64_t mask = (uint64_t)(g->name_cap - 1);
  for (uint64_t h = cm_hash_str(name) & mask;; h = (h + 1) & mask) {
    int id = g->name_slots[h];
    if (id < 0) return -1;
    if (strcmp(g->nodes[id].name, name) == 0) return id;
  }
}

/* ---- graphs ------------------------------------------------------------ */

cm_graph *cm_graph_new(void) {
  cm_graph *g = calloc(1, sizeof *g);
  return g;
}

static void node_free(cm_node *n) {
  free(n->name);
  free(n->inputs);
  free(n->attrs.data);
}

void cm_graph_free(cm_graph *g) {
  if (!g) return;
  for (int i = 0; i < g->n_nodes; i++) node_free(&g->nodes[i]);
  free(g->nodes);
  free(g->outputs);
  free(g->name_slots);
  free(g);
}

cm_graph *cm_graph_clone(const cm_graph *g) {
  cm_graph *c = cm_graph_new();
  if (!c) return NULL;
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (cm_graph_add(c, n->op, n->name, n->inputs, n->n_inputs, &n->attrs, NULL) != i) {
      cm_graph_free(c);
      return NULL;
    }
  }
  for (int i = 0; i < g->n_outputs; i++)
    if (cm_graph_add_output(c, g->outputs[i], NULL)) {
      cm_graph_free(c);
      return NULL;
    }
  c->error = g->error;
  return c;
}

/* A builder name is "%<id>"; should a loaded graph already use that name,
 * the next free "%<id + k * n>" is taken, so builder names never collide. */
static const char *display_name(const cm_graph *g, const char *name, int id, char *buf,
                                size_t size) {
  if (name) return name;
  long long candidate = id;
  do {
    snprintf(buf, size, "%%%lld", candidate);
    candidate += g->n_nodes + 1;
  } while (cm_graph_find(g, buf) >= 0);
  return buf;
}

int cm_graph_add(cm_graph *g, cm_op op, const char *name, const int *inputs, int n_inputs,
                 const cm_attrs *attrs, cm_err *err) {
  int id = g->n_nodes;
  char auto_name[32];
  const char *shown = display_name(g, name, id, auto_name, sizeof auto_name);
  if ((unsigned)op >= CM_OP_COUNT) {
    cm_errorf(err, CM_EINVALID, "\"%s\": unknown op %d", shown, (int)op);
    return -1;
  }
  const cm_op_info *info = &op_table[op];
  if (!cm_name_is_valid(shown)) {
    cm_errorf(err, CM_EINVALID,
              "\"%s\" (%s): invalid name: use letters, digits and _ . : / - (or %%<digits>)", shown,
              info->name);
    return -1;
  }
  if (cm_graph_find(g, shown) >= 0) {
    cm_errorf(err, CM_EINVALID, "\"%s\" (%s): duplicate name", shown, info->name);
    return -1;
  }
  if (info->arity >= 0 ? n_inputs != info->arity : n_inputs < 1) {
    cm_errorf(err, CM_EINVALID, "\"%s\" (%s): takes %s%d input%s, got %d", shown, info->name,
              info->arity < 0 ? "at least " : "", info->arity < 0 ? 1 : info->arity,
              info->arity == 1 || info->arity < 0 ? "" : "s", n_inputs);
    return -1;
  }
  for (int i = 0; i < n_inputs; i++)
    if (inputs[i] < 0 || inputs[i] >= id) {
      cm_errorf(err, CM_EINVALID, "\"%s\" (%s): input %d is node %d, which does not precede it",
                shown, info->name, i, inputs[i]);
      return -1;
    }

  cm_attrs a;
  attrs_canonical(op, attrs, &a);
  /* Reduce axes: negative counts from the end; stored sorted. */
  if ((info->attrs & CM_ATTR_AXES) && n_inputs == 1) {
    int rank = g->nodes[inputs[0]].type.rank;
    for (int i = 0; i < a.n_axes && i < CM_MAX_RANK; i++)
      if (a.axes[i] < 0) a.axes[i] += rank;
    for (int i = 1; i < a.n_axes && i < CM_MAX_RANK; i++)
      for (int j = i; j > 0 && a.axes[j - 1] > a.axes[j]; j--) {
        int t = a.axes[j];
        a.axes[j] = a.axes[j - 1];
        a.axes[j - 1] = t;
      }
  }

  cm_type type;
  cm_err local;
  if (cm_infer_type(g, op, inputs, n_inputs, &a, &type, &local)) {
    if (err) {
      *err = local;
      cm_err_prefix(err, "\"%s\" (%s): ", shown, info->name);
    }
    return -1;
  }

  if (g->n_nodes == g->cap_nodes) {
    int cap = g->cap_nodes ? g->cap_nodes * 2 : 64;
    cm_node *nodes = realloc(g->nodes, sizeof(cm_node) * (size_t)cap);
    if (!nodes) goto oom;
    g->nodes = nodes;
    g->cap_nodes = cap;
  }
  cm_node *n = &g->nodes[id];
  memset(n, 0, sizeof *n);
  n->op = op;
  n->type = type;
  n->attrs = a;
  n->attrs.data = NULL;
  n->name = strdup(shown);
  n->inputs = malloc(sizeof(int) * (size_t)(n_inputs ? n_inputs : 1));
  if (a.data && a.n_data > 0) {
    n->attrs.data = malloc(sizeof(double) * (size_t)a.n_data);
    if (n->attrs.data) memcpy(n->attrs.data, a.data, sizeof(double) * (size_t)a.n_data);
  }
  if (!n->name || !n->inputs || (a.data && a.n_data > 0 && !n->attrs.data)) {
    node_free(n);
    goto oom;
  }
  if (n_inputs) memcpy(n->inputs, inputs, sizeof(int) * (size_t)n_inputs);
  n->n_inputs = n_inputs;
  g->n_nodes++;
  /* Keep the name table at most half full. */
  if (2 * g->n_nodes > g->name_cap) {
    if (!name_table_grow(g)) {
      g->n_nodes--;
      node_free(n);
      goto oom;
    }
  } else {
    uint64_t mask = (uint64_t)(g->name_cap - 1);
    uint64_t h = cm_hash_str(n->name) & mask;
    while (g->name_slots[h] >= 0) h = (h + 1) & mask;
    g->name_slots[h] = id;
  }
  return id;
oom:
  cm_errorf(err, CM_EINTERNAL, "\"%s\" (%s): out of memory", shown, info->name);
  return -1;
}

cm_status cm_graph_rename(cm_graph *g, int id, const char *name, cm_err *err) {
  if (id < 0 || id >= g->n_nodes)
    return cm_errorf(err, CM_EINVALID, "rename: node %d does not exist", id);
  if (!cm_name_is_valid(name))
    return cm_errorf(err, CM_EINVALID, "rename: \"%s\" is not a valid name", name);
  int other = cm_graph_find(g, name);
  if (other == id) return CM_OK;
  if (other >= 0) return cm_errorf(err, CM_EINVALID, "rename: \"%s\" is taken", name);
  char *copy = strdup(name);
  if (!copy) return cm_errorf(err, CM_EINTERNAL, "rename: out of memory");
  free(g->nodes[id].name);
  g->nodes[id].name = copy;
  /* Rebuild the name table: renames are rare. */
  int cap = g->name_cap;
  g->name_cap = cap / 2;
  if (!name_table_grow(g)) {
    g->name_cap = cap;
    return cm_errorf(err, CM_EINTERNAL, "rename: out of memory");
  }
  return CM_OK;
}

cm_status cm_graph_add_output(cm_graph *g, int node, cm_err *err) {
  if (node < 0 || node >= g->n_nodes)
    return cm_errorf(err, CM_EINVALID, "output: node %d does not exist", node);
  if (g->n_outputs == g->cap_outputs) {
    int cap = g->cap_outputs ? g->cap_outputs * 2 : 8;
    int *outs = realloc(g->outputs, sizeof(int) * (size_t)cap);
    if (!outs) return cm_errorf(err, CM_EINTERNAL, "out of memory");
    g->outputs = outs;
    g->cap_outputs = cap;
  }
  g->outputs[g->n_outputs++] = node;
  return CM_OK;
}

/* ---- convenience builders ---------------------------------------------- */

int cm_graph_fail(cm_graph *g, const char *fmt, ...) {
  if (g->error.status == CM_OK) {
    char msg[sizeof g->error.msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cm_errorf(&g->error, CM_EINVALID, "%s", msg);
  }
  return -1;
}

const char *cm_graph_error(const cm_graph *g) {
  return g->error.status == CM_OK ? NULL : g->error.msg;
}

/* Adds a node, or records the first failure in g->error (sticky). */
static int build(cm_graph *g, cm_op op, const char *name, const int *inputs, int n_inputs,
                 const cm_attrs *a) {
  for (int i = 0; i < n_inputs; i++)
    if (inputs[i] < 0) return -1;
  if (g->error.status != CM_OK) return -1;
  cm_err err;
  int id = cm_graph_add(g, op, name, inputs, n_inputs, a, &err);
  if (id < 0) g->error = err;
  return id;
}

static void set_shape(cm_attrs *a, int rank, const int64_t *dims) {
  a->rank = rank;
  for (int i = 0; i < rank && i < CM_MAX_RANK; i++) a->shape[i] = dims[i];
}

static int source(cm_graph *g, cm_op op, const char *name, cm_dtype dt, int rank,
                  const int64_t *dims, cm_init init) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.dtype = dt;
  set_shape(&a, rank, dims);
  a.init = init;
  return build(g, op, name, NULL, 0, &a);
}

int cm_input(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims) {
  cm_init none = {CM_INIT_NONE, 0, 0};
  return source(g, CM_OP_INPUT, name, dt, rank, dims, none);
}
int cm_param(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
             cm_init init) {
  return source(g, CM_OP_PARAM, name, dt, rank, dims, init);
}
int cm_state(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
             cm_init init) {
  return source(g, CM_OP_STATE, name, dt, rank, dims, init);
}

int cm_const_fill(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
                  double value) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.dtype = dt;
  set_shape(&a, rank, dims);
  a.value = value;
  return build(g, CM_OP_CONST, name, NULL, 0, &a);
}
int cm_const_scalar(cm_graph *g, const char *name, cm_dtype dt, double value) {
  return cm_const_fill(g, name, dt, 0, NULL, value);
}
int cm_const_data(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
                  const double *data) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.dtype = dt;
  set_shape(&a, rank, dims);
  cm_type t = cm_type_make(dt, rank, dims);
  a.data = (double *)data;
  a.n_data = rank <= CM_MAX_RANK ? cm_type_numel(&t) : 0;
  return build(g, CM_OP_CONST, name, NULL, 0, &a);
}
int cm_iota(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims, int axis) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.dtype = dt;
  set_shape(&a, rank, dims);
  a.axis = axis;
  return build(g, CM_OP_IOTA, name, NULL, 0, &a);
}

int cm_unary(cm_graph *g, cm_op op, int x, const char *name) {
  return build(g, op, name, &x, 1, NULL);
}
int cm_binary(cm_graph *g, cm_op op, int a, int b, const char *name) {
  int in[2] = {a, b};
  return build(g, op, name, in, 2, NULL);
}
int cm_select(cm_graph *g, int cond, int a, int b, const char *name) {
  int in[3] = {cond, a, b};
  return build(g, CM_OP_SELECT, name, in, 3, NULL);
}
int cm_cast(cm_graph *g, int x, cm_dtype dt, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.dtype = dt;
  return build(g, CM_OP_CAST, name, &x, 1, &a);
}
int cm_reduce(cm_graph *g, cm_op op, int x, int n_axes, const int *axes, bool keepdims,
              const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.n_axes = n_axes;
  for (int i = 0; i < n_axes && i < CM_MAX_RANK; i++) a.axes[i] = axes[i];
  a.keepdims = keepdims;
  return build(g, op, name, &x, 1, &a);
}
int cm_reshape(cm_graph *g, int x, int rank, const int64_t *dims, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  set_shape(&a, rank, dims);
  return build(g, CM_OP_RESHAPE, name, &x, 1, &a);
}
int cm_permute(cm_graph *g, int x, const int *perm, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  int rank = x >= 0 && x < g->n_nodes ? g->nodes[x].type.rank : 0;
  for (int i = 0; i < rank; i++) a.perm[i] = perm[i];
  return build(g, CM_OP_PERMUTE, name, &x, 1, &a);
}
int cm_broadcast(cm_graph *g, int x, int rank, const int64_t *dims, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  set_shape(&a, rank, dims);
  return build(g, CM_OP_BROADCAST, name, &x, 1, &a);
}
int cm_slice(cm_graph *g, int x, const int64_t *start, const int64_t *stop, const int64_t *step,
             const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  int rank = x >= 0 && x < g->n_nodes ? g->nodes[x].type.rank : 0;
  for (int i = 0; i < rank; i++) {
    a.start[i] = start[i];
    a.stop[i] = stop[i];
    a.step[i] = step ? step[i] : 1;
  }
  return build(g, CM_OP_SLICE, name, &x, 1, &a);
}
int cm_concat(cm_graph *g, int n, const int *xs, int axis, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.axis = axis;
  return build(g, CM_OP_CONCAT, name, xs, n, &a);
}
int cm_pad(cm_graph *g, int x, const int64_t *lo, const int64_t *hi, double value,
           const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  int rank = x >= 0 && x < g->n_nodes ? g->nodes[x].type.rank : 0;
  for (int i = 0; i < rank; i++) {
    a.lo[i] = lo[i];
    a.hi[i] = hi[i];
  }
  a.value = value;
  return build(g, CM_OP_PAD, name, &x, 1, &a);
}
int cm_gather(cm_graph *g, int x, int index, int axis, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.axis = axis;
  int in[2] = {x, index};
  return build(g, CM_OP_GATHER, name, in, 2, &a);
}
int cm_scatter_add(cm_graph *g, int base, int index, int updates, int axis, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.axis = axis;
  int in[3] = {base, index, updates};
  return build(g, CM_OP_SCATTER_ADD, name, in, 3, &a);
}
int cm_matmul(cm_graph *g, int a_, int b_, bool transpose_a, bool transpose_b, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.transpose_a = transpose_a;
  a.transpose_b = transpose_b;
  int in[2] = {a_, b_};
  return build(g, CM_OP_MATMUL, name, in, 2, &a);
}
int cm_conv2d(cm_graph *g, int x, int w, const int stride[2], const int padding[2],
              const int dilation[2], int groups, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  for (int i = 0; i < 2; i++) {
    if (stride) a.stride[i] = stride[i];
    if (padding) a.padding[i] = padding[i];
    if (dilation) a.dilation[i] = dilation[i];
  }
  a.groups = groups;
  int in[2] = {x, w};
  return build(g, CM_OP_CONV2D, name, in, 2, &a);
}
int cm_all_reduce(cm_graph *g, int x, cm_reduce_mode mode, int ranks, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.mode = mode;
  a.ranks = ranks;
  return build(g, CM_OP_ALL_REDUCE, name, &x, 1, &a);
}
int cm_all_gather(cm_graph *g, int x, int axis, int ranks, const char *name) {
  cm_attrs a;
  cm_attrs_default(&a);
  a.axis = axis;
  a.ranks = ranks;
  return build(g, CM_OP_ALL_GATHER, name, &x, 1, &a);
}
int cm_assign(cm_graph *g, int target, int value, const char *name) {
  int in[2] = {target, value};
  return build(g, CM_OP_ASSIGN, name, in, 2, NULL);
}

int cm_binary_bcast(cm_graph *g, cm_op op, int a, int b, const char *name) {
  if (a < 0 || b < 0 || g->error.status != CM_OK) return -1;
  const cm_type ta = g->nodes[a].type, tb = g->nodes[b].type;
  int rank = ta.rank > tb.rank ? ta.rank : tb.rank;
  int64_t dims[CM_MAX_RANK];
  for (int i = 0; i < rank; i++) {
    int ia = i - (rank - ta.rank), ib = i - (rank - tb.rank);
    int64_t da = ia >= 0 ? ta.dims[ia] : 1, db = ib >= 0 ? tb.dims[ib] : 1;
    if (da != db && da != 1 && db != 1) {
      char sa[96], sb[96];
      cm_errorf(&g->error, CM_EINVALID, "\"%s\" (%s): %s and %s do not broadcast",
                name ? name : "?", cm_op_name(op), cm_type_str(&ta, sa, sizeof sa),
                cm_type_str(&tb, sb, sizeof sb));
      return -1;
    }
    dims[i] = da > db ? da : db;
  }
  cm_type target = cm_type_make(ta.dtype, rank, dims);
  if (!cm_shape_equal(&ta, &target)) a = cm_broadcast(g, a, rank, dims, NULL);
  if (!cm_shape_equal(&tb, &target)) b = cm_broadcast(g, b, rank, dims, NULL);
  return cm_binary(g, op, a, b, name);
}
