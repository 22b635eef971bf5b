/* ir/ir.h — the graph IR: the contract of the bottom layer.
 *
 * Defines: errors (cm_err), dtypes and types (cm_dtype, cm_type), tensors
 * (cm_tensor), the op table (cm_op, categories, attribute bits), attributes and
 * initializers (cm_attrs, cm_init), the graph and its builder (cm_graph,
 * cm_graph_add and the cm_<op> convenience builders), type inference, the
 * verifier, the text IR printer and parser, the counter-based RNG, parameter
 * initialization, and the reference evaluator (the oracle).
 *
 * Conventions: library code never exits on bad input. A function that can fail
 * returns cm_status and fills a cm_err with one line naming the place and the
 * rule. Node ids are indices into graph->nodes; an input of a node always has a
 * smaller id (SSA in topological order). */
#ifndef CMAEC_IR_H
#define CMAEC_IR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CMAEC_VERSION "0.1.0"

/* ---- errors ------------------------------------------------------------ */

/* Values double as CLI exit codes. */
typedef enum cm_status {
  CM_OK = 0,
  CM_EINTERNAL = 1, /* a bug or resource failure (out of memory) */
  CM_EINVALID = 2,  /* bad input: file, JSON, graph, shape, attribute */
} cm_status;

typedef struct cm_err {
  cm_status status;
  char msg[1024]; /* one line, no trailing newline */
} cm_err;

/* Sets err (if not NULL) to status and the formatted one-line message; returns status. */
cm_status cm_errorf(cm_err *err, cm_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepends "context" to an error's message, e.g. "nodes[3] ". Returns err->status. */
cm_status cm_err_prefix(cm_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- dtypes and types -------------------------------------------------- */

typedef enum cm_dtype {
  CM_F32,
  CM_F64,
  CM_BF16,
  CM_F16,
  CM_I32,
  CM_I64,
  CM_BOOL,
  CM_DTYPE_COUNT
} cm_dtype;

#define CM_MAX_RANK 6
/* Largest element count of one tensor (2^40); keeps byte sizes far from overflow. */
#define CM_MAX_ELEMENTS ((int64_t)1 << 40)

typedef struct cm_type {
  cm_dtype dtype;
  int rank;                  /* 0 .. CM_MAX_RANK; rank 0 is a scalar */
  int64_t dims[CM_MAX_RANK]; /* each >= 1; entries past rank are 0 */
} cm_type;

const char *cm_dtype_name(cm_dtype dt); /* "f32", ... */
bool cm_dtype_from_name(const char *name, cm_dtype *out);
size_t cm_dtype_size(cm_dtype dt);   /* bytes per element */
bool cm_dtype_is_float(cm_dtype dt); /* f32 f64 bf16 f16 */
bool cm_dtype_is_int(cm_dtype dt);   /* i32 i64 */

cm_type cm_type_make(cm_dtype dt, int rank, const int64_t *dims);
int64_t cm_type_numel(const cm_type *t);
size_t cm_type_nbytes(const cm_type *t);
bool cm_type_equal(const cm_type *a, const cm_type *b);
bool cm_shape_equal(const cm_type *a, const cm_type *b);
/* Writes "f32[4,8]" (scalar: "f32[]") into buf; returns buf. */
char *cm_type_str(const cm_type *t, char *buf, size_t size);
/* Row-major strides in elements. */
void cm_type_strides(const cm_type *t, int64_t strides[CM_MAX_RANK]);

/* Exact IEEE conversions, round to nearest even, NaN and infinity kept. */
float cm_bf16_to_f32(uint16_t h);
uint16_t cm_f32_to_bf16(float f);
float cm_f16_to_f32(uint16_t h);
uint16_t cm_f64_to_f16(double d);
uint16_t cm_f64_to_bf16(double d);
/* Rounds a double to the nearest value representable in dt (for floats) or
 * truncates toward zero and saturates, NaN giving 0 (for ints); bool: x != 0. */
double cm_round_to_dtype(double x, cm_dtype dt);
/* Whether x is a value of dt: for i32 and i64 an integer in range, for bool 0 or
 * 1; every double for the float dtypes (rounded to them, NaN and inf kept). Graph
 * values (const value and data, pad value, init constant) must fit: the builder,
 * the verifier and the readers reject the others. When x does not fit, why
 * receives "<x> is outside <dtype> (<range>)". */
bool cm_value_fits(double x, cm_dtype dt, char *why, size_t size);

/* ---- tensors ----------------------------------------------------------- */

/* A dense row-major tensor; data holds numel elements of type.dtype
 * (bf16/f16 as uint16_t bits, bool as uint8_t 0/1). */
typedef struct cm_tensor {
  cm_type type;
  void *data;
} cm_tensor;

cm_status cm_tensor_alloc(cm_tensor *t, cm_type type, cm_err *err); /* zero-filled */
void cm_tensor_free(cm_tensor *t);
cm_status cm_tensor_copy(cm_tensor *dst, const cm_tensor *src, cm_err *err);
double cm_tensor_get_f64(const cm_tensor *t, int64_t i);
void cm_tensor_set_f64(cm_tensor *t, int64_t i, double v); /* rounds to the dtype */
int64_t cm_tensor_get_i64(const cm_tensor *t, int64_t i);
void cm_tensor_set_i64(cm_tensor *t, int64_t i, int64_t v);

/* ---- the op table ------------------------------------------------------ */

typedef enum cm_category {
  CM_CAT_SOURCE,
  CM_CAT_ELEMENTWISE,
  CM_CAT_REDUCE,
  CM_CAT_MOVEMENT,
  CM_CAT_CONTRACTION,
  CM_CAT_COLLECTIVE,
  CM_CAT_UPDATE,
} cm_category;

/* Attribute bits: which cm_attrs fields an op reads (and the JSON/text keys). */
enum {
  CM_ATTR_DTYPE = 1 << 0,      /* "dtype" */
  CM_ATTR_SHAPE = 1 << 1,      /* "shape" */
  CM_ATTR_INIT = 1 << 2,       /* "init" */
  CM_ATTR_VALUE = 1 << 3,      /* "value" (const fill, pad value) */
  CM_ATTR_DATA = 1 << 4,       /* "data" (const explicit elements) */
  CM_ATTR_AXIS = 1 << 5,       /* "axis" */
  CM_ATTR_AXES = 1 << 6,       /* "axes" */
  CM_ATTR_KEEPDIMS = 1 << 7,   /* "keepdims" */
  CM_ATTR_PERM = 1 << 8,       /* "perm" */
  CM_ATTR_SLICE = 1 << 9,      /* "start", "stop", "step" */
  CM_ATTR_PAD = 1 << 10,       /* "lo", "hi" */
  CM_ATTR_TRANSPOSE = 1 << 11, /* "transpose_a", "transpose_b" */
  CM_ATTR_CONV = 1 << 12,      /* "stride", "padding", "dilation", "groups" */
  CM_ATTR_MODE = 1 << 13,      /* "mode": "sum" | "mean" */
  CM_ATTR_RANKS = 1 << 14,     /* "ranks": world size the graph is compiled for */
};

typedef enum cm_op {
#define CM_OP(id, name, cat, arity, attrs) CM_OP_##id,
#include "ops.def"
#undef CM_OP
  CM_OP_COUNT
} cm_op;

typedef struct cm_op_info {
  const char *name;
  cm_category category;
  int arity; /* -1: one or more */
  unsigned attrs;
} cm_op_info;

const cm_op_info *cm_op_get_info(cm_op op);
const char *cm_op_name(cm_op op);
bool cm_op_from_name(const char *name, cm_op *out);
const char *cm_category_name(cm_category c);

/* ---- attributes and initializers --------------------------------------- */

typedef enum cm_init_kind {
  CM_INIT_NONE, /* must be supplied by the caller */
  CM_INIT_ZEROS,
  CM_INIT_ONES,
  CM_INIT_CONSTANT,       /* a = value */
  CM_INIT_NORMAL,         /* a = mean, b = std */
  CM_INIT_TRUNC_NORMAL,   /* a = mean, b = std, cut at mean +- 2 std (timm) */
  CM_INIT_UNIFORM,        /* U(a, b) */
  CM_INIT_XAVIER_UNIFORM, /* a = gain; fans as PyTorch: fan_in = dims[1]*receptive, fan_out =
                             dims[0]*receptive; b = 1 ("flatten"): fans of the 2-D view
                             [dims[0], rest] (CMAE's patch embedding) */
  CM_INIT_TORCH_DEFAULT,  /* PyTorch Linear/Conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); a =
                             fan_in override if > 0 */
  CM_INIT_SINCOS_2D,      /* fixed 2-D sin-cos position embedding [..., rows, D]: a = leading
                             all-zero rows (cls tokens); the rest is a square grid (CMAE.md §3) */
  CM_INIT_KIND_COUNT
} cm_init_kind;

typedef struct cm_init {
  cm_init_kind kind;
  double a, b;
} cm_init;

const char *cm_init_kind_name(cm_init_kind k);
bool cm_init_kind_from_name(const char *name, cm_init_kind *out);

typedef enum cm_reduce_mode { CM_MODE_SUM, CM_MODE_MEAN } cm_reduce_mode;

/* All attributes of a node; an op reads only the fields its CM_ATTR_* bits name.
 * cm_attrs_default() gives the documented defaults. */
typedef struct cm_attrs {
  cm_dtype dtype; /* sources, cast */
  int rank;       /* rank of shape (sources, reshape, broadcast, conv grads) */
  int64_t shape[CM_MAX_RANK];
  cm_init init; /* param, state */
  double value; /* const fill value; pad value (default 0) */
  double *data; /* const: numel explicit elements (owned by the graph), or NULL */
  int64_t n_data;
  int axis;   /* concat, gather, scatter_add, iota, all_gather */
  int n_axes; /* reduce axes (distinct, any order, sorted on add) */
  int axes[CM_MAX_RANK];
  bool keepdims;
  int perm[CM_MAX_RANK];      /* permute: output axis i is input axis perm[i] */
  int64_t start[CM_MAX_RANK]; /* slice, per axis of the input */
  int64_t stop[CM_MAX_RANK];
  int64_t step[CM_MAX_RANK];     /* >= 1 */
  int64_t lo[CM_MAX_RANK];       /* pad before, >= 0 */
  int64_t hi[CM_MAX_RANK];       /* pad after, >= 0 */
  bool transpose_a, transpose_b; /* matmul: swap the two innermost axes of an operand */
  int stride[2], padding[2], dilation[2], groups; /* conv2d family, (h, w) */
  cm_reduce_mode mode;                            /* all_reduce */
  int ranks;                                      /* collectives: world size (>= 1) */
} cm_attrs;

void cm_attrs_default(cm_attrs *a);

/* ---- the graph --------------------------------------------------------- */

typedef struct cm_node {
  cm_op op;
  char *name; /* unique in the graph; builder gives "%<id>" when none is given */
  int n_inputs;
  int *inputs;  /* node ids, each < this node's id */
  cm_type type; /* result type, from inference */
  cm_attrs attrs;
} cm_node;

typedef struct cm_graph {
  cm_node *nodes;
  int n_nodes, cap_nodes;
  int *outputs; /* node ids */
  int n_outputs, cap_outputs;
  cm_err error;    /* first error of a convenience builder (sticky), status CM_OK if none */
  int *name_slots; /* open-addressing name -> id table (private to ir/graph.c) */
  int name_cap;
} cm_graph;

cm_graph *cm_graph_new(void);
void cm_graph_free(cm_graph *g);
cm_graph *cm_graph_clone(const cm_graph *g);

/* Adds a node: checks arity and attributes, infers the result type. Adding a
 * node may move g->nodes: keep ids, never pointers to nodes, across adds. Returns
 * the new node's id, or -1 with err set ("\"name\" (op): <rule>"). name may be
 * NULL. attrs may be NULL (defaults). The graph copies name, inputs and data. */
int cm_graph_add(cm_graph *g, cm_op op, const char *name, const int *inputs, int n_inputs,
                 const cm_attrs *attrs, cm_err *err);
cm_status cm_graph_add_output(cm_graph *g, int node, cm_err *err);
/* Node id by name, or -1 (a hash lookup). */
int cm_graph_find(const cm_graph *g, const char *name);
/* Gives node id a new name (valid, unused); passes use it to keep a user's
 * name on the node that replaces the one it named. */
cm_status cm_graph_rename(cm_graph *g, int id, const char *name, cm_err *err);

/* Convenience builders. Each returns the node id, or -1 after recording the
 * first error in g->error; any input of -1 makes them return -1 at once, so a
 * model can be built in one go and checked once (cm_graph_error). */
const char *cm_graph_error(const cm_graph *g); /* NULL when no error */
/* Records a builder's own rule failure as the graph's first error (CM_EINVALID;
 * kept if one is already there); returns -1, for `return cm_graph_fail(...)`. */
int cm_graph_fail(cm_graph *g, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cm_input(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims);
int cm_param(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
             cm_init init);
int cm_state(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
             cm_init init);
int cm_const_scalar(cm_graph *g, const char *name, cm_dtype dt, double value);
int cm_const_fill(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
                  double value);
int cm_const_data(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims,
                  const double *data);
int cm_iota(cm_graph *g, const char *name, cm_dtype dt, int rank, const int64_t *dims, int axis);
int cm_unary(cm_graph *g, cm_op op, int x, const char *name);
int cm_binary(cm_graph *g, cm_op op, int a, int b, const char *name);
int cm_select(cm_graph *g, int cond, int a, int b, const char *name);
int cm_cast(cm_graph *g, int x, cm_dtype dt, const char *name);
int cm_reduce(cm_graph *g, cm_op op, int x, int n_axes, const int *axes, bool keepdims,
              const char *name);
int cm_reshape(cm_graph *g, int x, int rank, const int64_t *dims, const char *name);
int cm_permute(cm_graph *g, int x, const int *perm, const char *name);
int cm_broadcast(cm_graph *g, int x, int rank, const int64_t *dims, const char *name);
int cm_slice(cm_graph *g, int x, const int64_t *start, const int64_t *stop, const int64_t *step,
             const char *name); /* step may be NULL (all 1) */
int cm_concat(cm_graph *g, int n, const int *xs, int axis, const char *name);
int cm_pad(cm_graph *g, int x, const int64_t *lo, const int64_t *hi, double value,
           const char *name);
int cm_gather(cm_graph *g, int x, int index, int axis, const char *name);
int cm_scatter_add(cm_graph *g, int base, int index, int updates, int axis, const char *name);
int cm_matmul(cm_graph *g, int a, int b, bool transpose_a, bool transpose_b, const char *name);
int cm_conv2d(cm_graph *g, int x, int w, const int stride[2], const int padding[2],
              const int dilation[2], int groups, const char *name); /* NULL arrays: 1, 0, 1 */
int cm_all_reduce(cm_graph *g, int x, cm_reduce_mode mode, int ranks, const char *name);
int cm_all_gather(cm_graph *g, int x, int axis, int ranks, const char *name);
int cm_assign(cm_graph *g, int target, int value, const char *name);
/* Adds a binary op, inserting broadcast nodes so that both operands take the
 * numpy-broadcast shape of the two (convenience for builders and tests). */
int cm_binary_bcast(cm_graph *g, cm_op op, int a, int b, const char *name);

/* ---- inference and verification ---------------------------------------- */

/* Infers the result type of a node with the given op, inputs (types of the
 * graph's nodes) and attrs. On failure err reads "<rule>" with operand types,
 * e.g. "f32[4,8] x f32[16,4]: inner dimensions 8 and 16 differ"; the caller
 * prefixes the node. */
cm_status cm_infer_type(const cm_graph *g, cm_op op, const int *inputs, int n_inputs,
                        const cm_attrs *attrs, cm_type *out, cm_err *err);
/* Checks the whole graph: SSA order, unique valid names, arity, attributes,
 * types equal to inference, outputs, assign targets (a param or state, at most
 * one assign each). Errors name the node: "nodes[3] \"qk\" (matmul): ...". */
cm_status cm_graph_verify(const cm_graph *g, cm_err *err);
/* cm_graph_verify for readers that name nodes their own way (a line, a JSON
 * path): err holds the rule alone and *bad_node (if not NULL) the node it is
 * about, or -1 when the error names no node ("outputs[k]: ..."). */
cm_status cm_graph_verify_at(const cm_graph *g, int *bad_node, cm_err *err);
/* Names: [A-Za-z0-9_.:/-] characters, or a '%' followed by digits for builder names. */
bool cm_name_is_valid(const char *name);

/* ---- text IR ----------------------------------------------------------- */

/* One line per node:  name: f32[4,8] = op(in0, in1) {attr=value, ...}
 * followed by one line: outputs(a, b). See docs/text-ir.md. */
cm_status cm_graph_print(const cm_graph *g, FILE *out, cm_err *err);
char *cm_graph_print_str(const cm_graph *g); /* malloc'd; NULL on out of memory */
cm_status cm_graph_parse(const char *text, cm_graph **out, cm_err *err);

/* Graphviz dot. */
cm_status cm_graph_dot(const cm_graph *g, FILE *out, cm_err *err);

/* ---- random numbers and initialization --------------------------------- */

/* Philox-4x32-10: counter-based, so any element of any stream can be drawn
 * independently (same seed, same bits, whatever the order or thread count). */
void cm_philox(uint64_t key, uint64_t counter_hi, uint64_t counter_lo, uint32_t out[4]);
uint64_t cm_hash_str(const char *s); /* FNV-1a 64 */
/* U[0,1) with 24 (f32-exact) / 53 random bits. */
double cm_uniform01(uint32_t bits);
/* Fills t (already allocated to the node's type) from init, with elements drawn
 * from the stream (seed, cm_hash_str(name)). CM_INIT_NONE is an error. */
cm_status cm_init_tensor(cm_tensor *t, const cm_init *init, uint64_t seed, const char *name,
                         cm_err *err);
/* Whether init can fill a tensor of type (the rule cm_init_tensor applies; the
 * builder, the verifier and so every reader apply it to params and state).
 * CM_INIT_NONE passes: the tensor is supplied. err reads "init <kind>: <rule>". */
cm_status cm_init_check(const cm_init *init, const cm_type *type, cm_err *err);

/* ---- the oracle (ir/eval.c) -------------------------------------------- */

typedef enum cm_precision {
  CM_PRECISION_NATIVE, /* every value rounded to its node's dtype after each op */
  CM_PRECISION_F64,    /* every floating value kept in f64 (for finite differences) */
} cm_precision;

typedef struct cm_eval_opts {
  cm_precision precision;
} cm_eval_opts;

/* Evaluates every node. sources[i] must be given (non-NULL) for every input,
 * param and state node i, with exactly the node's type (in F64 precision: its
 * shape, any float dtype). values must have g->n_nodes entries; on success
 * values[i] holds node i's value (dtype: the node's, or f64 for floats in F64
 * precision); the caller frees them with cm_tensor_free. Assign nodes evaluate
 * to the new value; nothing is written into sources. On failure every value is
 * freed. */
cm_status cm_eval(const cm_graph *g, const cm_tensor *const *sources, cm_tensor *values,
                  const cm_eval_opts *opts, cm_err *err);
/* cm_eval in F64 precision that also fills bounds (g->n_nodes entries): for
 * every node an f64 tensor of its shape whose elements bound how far any
 * conforming evaluation of the graph in its own dtypes (f32, bf16, ...) may
 * land from the value computed here, whatever its summation order, vector
 * width or FMA contraction: a forward error bound propagated node by node
 * (docs/ops.md, "Error bounds"). The backends are tested against it. The
 * caller frees values and bounds with cm_tensor_free. */
cm_status cm_eval_bounded(const cm_graph *g, const cm_tensor *const *sources, cm_tensor *values,
                          cm_tensor *bounds, cm_err *err);

/* Evaluates one graph compiled for `ranks` ranks (every collective's attrs.ranks == ranks, or 1:
 * a copy) on each rank's sources, in lockstep: a collective combines the ranks' values exactly
 * as cm_comm does (all_reduce SUM/MEAN in f64, rounded once; all_gather concatenates along
 * attrs.axis in rank order). sources[r] and values[r] are rank r's arrays of g->n_nodes (the
 * "rank" input, when the graph has one, is each rank's own source, set by the caller); bounds
 * (optional: then F64 precision, opts ignored) as cm_eval_bounded, per rank: an all_reduce's
 * bound is the sum of the ranks' bounds plus the f32 sum's gamma_ranks term (and the rounding
 * of MEAN's division), an all_gather's the ranks' bounds concatenated (docs/ops.md "Error
 * bounds"). Errors are prefixed "rank R: "; on failure every value is freed. cm_eval and
 * cm_eval_bounded reject a collective over more than one rank. */
cm_status cm_eval_ranks(const cm_graph *g, int ranks, const cm_tensor *const *const *sources,
                        cm_tensor **values, const cm_eval_opts *opts, cm_tensor **bounds,
                        cm_err *err);

/* The error every backend gives for a gather or scatter_add index outside its
 * axis: node id of g, the index, its flat position in the index tensor (input 1)
 * and the axis length: CM_EINVALID, "nodes[<id>] \"<name>\" (<op>): index <v>
 * at [<coordinates>] outside [0, <dim>)". */
cm_status cm_index_error(cm_err *err, const cm_graph *g, int id, int64_t index, int64_t pos,
                         int64_t dim);

#endif
