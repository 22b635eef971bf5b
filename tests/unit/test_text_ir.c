/* tests/unit/test_text_ir.c — the text IR printer and parser, and the dot writer. */
#include "ir/ir.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>

/* ---- helpers ----------------------------------------------------------- */

static bool same_bits(double a, double b) {
  return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b));
}

/* Compares the attributes an op reads (per-axis lists up to the input rank). */
static bool attrs_equal(const cm_graph *g, const cm_node *n, const cm_attrs *a, const cm_attrs *b) {
  unsigned m = cm_op_get_info(n->op)->attrs;
  int r = n->n_inputs ? g->nodes[n->inputs[0]].type.rank : 0;
  if ((m & CM_ATTR_DTYPE) && a->dtype != b->dtype) return false;
  if (m & CM_ATTR_SHAPE) {
    if (a->rank != b->rank) return false;
    for (int i = 0; i < a->rank; i++)
      if (a->shape[i] != b->shape[i]) return false;
  }
  if (m & CM_ATTR_INIT) {
    if (a->init.kind != b->init.kind) return false;
    if (!same_bits(a->init.a, b->init.a) || !same_bits(a->init.b, b->init.b)) return false;
  }
  if ((m & CM_ATTR_VALUE) && !same_bits(a->value, b->value)) return false;
  if (m & CM_ATTR_DATA) {
    if ((a->data == NULL) != (b->data == NULL) || a->n_data != b->n_data) return false;
    for (int64_t i = 0; a->data && i < a->n_data; i++)
      if (!same_bits(a->data[i], b->data[i])) return false;
  }
  if ((m & CM_ATTR_AXIS) && a->axis != b->axis) return false;
  if (m & CM_ATTR_AXES) {
    if (a->n_axes != b->n_axes) return false;
    for (int i = 0; i < a->n_axes; i++)
      if (a->axes[i] != b->axes[i]) return false;
  }
  if ((m & CM_ATTR_KEEPDIMS) && a->keepdims != b->keepdims) return false;
  for (int i = 0; i < r; i++) {
    if ((m & CM_ATTR_PERM) && a->perm[i] != b->perm[i]) return false;
    if ((m & CM_ATTR_SLICE) &&
        (a->start[i] != b->start[i] || a->stop[i] != b->stop[i] || a->step[i] != b->step[i]))
      return false;
    if ((m & CM_ATTR_PAD) && (a->lo[i] != b->lo[i] || a->hi[i] != b->hi[i])) return false;
  }
  if ((m & CM_ATTR_TRANSPOSE) &&
      (a->transpose_a != b->transpose_a || a->transpose_b != b->transpose_b))
    return false;
  if (m & CM_ATTR_CONV) {
    for (int i = 0; i < 2; i++)
      if (a->stride[i] != b->stride[i] || a->padding[i] != b->padding[i] ||
          a->dilation[i] != b->dilation[i])
        return false;
    if (a->groups != b->groups) return false;
  }
  if ((m & CM_ATTR_MODE) && a->mode != b->mode) return false;
  if ((m & CM_ATTR_RANKS) && a->ranks != b->ranks) return false;
  return true;
}

/* Node by node: op, name, inputs, type, attributes; then outputs. */
static void check_graphs_equal(const cm_graph *a, const cm_graph *b) {
  CHECK(a->n_nodes == b->n_nodes);
  for (int i = 0; i < a->n_nodes && i < b->n_nodes; i++) {
    const cm_node *x = &a->nodes[i], *y = &b->nodes[i];
    CHECK_MSG(x->op == y->op, "node %d: op %s vs %s", i, cm_op_name(x->op), cm_op_name(y->op));
    CHECK_MSG(strcmp(x->name, y->name) == 0, "node %d: name %s vs %s", i, x->name, y->name);
    CHECK_MSG(x->n_inputs == y->n_inputs, "node %d (%s): input count", i, x->name);
    for (int k = 0; k < x->n_inputs && k < y->n_inputs; k++)
      CHECK_MSG(x->inputs[k] == y->inputs[k], "node %d (%s): input %d", i, x->name, k);
    CHECK_MSG(cm_type_equal(&x->type, &y->type), "node %d (%s): type", i, x->name);
    CHECK_MSG(attrs_equal(a, x, &x->attrs, &y->attrs), "node %d (%s, %s): attributes differ", i,
              x->name, cm_op_name(x->op));
  }
  CHECK(a->n_outputs == b->n_outputs);
  for (int i = 0; i < a->n_outputs && i < b->n_outputs; i++) CHECK(a->outputs[i] == b->outputs[i]);
}

/* print, parse, print: identical text and an identical graph. Returns the text. */
static char *check_round_trip(const cm_graph *g) {
  char *text = cm_graph_print_str(g);
  CHECK(text != NULL);
  if (!text) return NULL;
  cm_graph *back = NULL;
  cm_err err = {0};
  cm_status st = cm_graph_parse(text, &back, &err);
  CHECK_MSG(st == CM_OK, "parse failed: %s\n%s", err.msg, text);
  if (st == CM_OK) {
    char *again = cm_graph_print_str(back);
    CHECK(again != NULL);
    if (again) {
      CHECK_MSG(strcmp(text, again) == 0, "texts differ:\n%s\n---\n%s", text, again);
      free(again);
    }
    check_graphs_equal(g, back);
    cm_err verr = {0};
    CHECK_MSG(cm_graph_verify(back, &verr) == CM_OK, "verify: %s", verr.msg);
    cm_graph_free(back);
  }
  return text;
}

static int64_t dims2[2] = {2, 3};

/* A graph with every op and every attribute kind. */
static cm_graph *build_every_op(void) {
  cm_graph *g = cm_graph_new();
  int64_t d3[1] = {3}, d4[1] = {4}, d33[2] = {3, 3}, d34[2] = {3, 4}, d22[2] = {2, 2};
  int x = cm_input(g, "x", CM_F32, 2, dims2);
  int w = cm_param(g, "fc.weight", CM_F32, 2, d34, (cm_init){CM_INIT_NORMAL, 0.5, 0.02});
  cm_param(g, "fc.bias", CM_F32, 1, d4, (cm_init){CM_INIT_ZEROS, 0, 0});
  int st = cm_state(g, "opt/m:0", CM_F32, 1, d4, (cm_init){CM_INIT_CONSTANT, -1.5, 0});
  cm_param(g, "u", CM_F32, 2, dims2, (cm_init){CM_INIT_UNIFORM, -0.25, 0.75});
  cm_param(g, "tn", CM_BF16, 1, d3, (cm_init){CM_INIT_TRUNC_NORMAL, 1e-30, 0.1});
  cm_param(g, "xv", CM_F16, 2, d33, (cm_init){CM_INIT_XAVIER_UNIFORM, 1.4142135623730951, 0});
  cm_param(g, "td", CM_F32, 2, d34, (cm_init){CM_INIT_TORCH_DEFAULT, 0, 0});
  cm_param(g, "td7", CM_F32, 2, d34, (cm_init){CM_INIT_TORCH_DEFAULT, 7, 0});
  cm_state(g, "count", CM_I64, 0, NULL, (cm_init){CM_INIT_ONES, 0, 0});
  cm_param(g, "fed", CM_F64, 1, d3, (cm_init){CM_INIT_NONE, 0, 0});
  double data[6] = {-1, 0.1, 1e-30, 2.5, -0.0, 1e300};
  int c = cm_const_data(g, "c", CM_F32, 2, dims2, data);
  cm_const_fill(g, "cinf", CM_F32, 2, d22, INFINITY);
  cm_const_fill(g, "cninf", CM_F32, 2, d22, -INFINITY);
  cm_const_fill(g, "cnan", CM_F64, 1, d3, NAN);
  cm_const_scalar(g, "third", CM_F64, 1.0 / 3.0);
  cm_const_scalar(g, "zero", CM_F32, 0);
  cm_const_scalar(g, "negzero", CM_F32, -0.0);
  double bools[3] = {1, 0, 1};
  cm_const_data(g, "mask", CM_BOOL, 1, d3, bools);
  int io = cm_iota(g, "io", CM_I64, 2, dims2, 1);
  cm_iota(g, "io0", CM_I32, 1, d4, 0);

  cm_op unary[] = {CM_OP_NEG,   CM_OP_ABS,  CM_OP_EXP, CM_OP_LOG,  CM_OP_SQRT,         CM_OP_RSQRT,
                   CM_OP_RECIP, CM_OP_TANH, CM_OP_ERF, CM_OP_RELU, CM_OP_STOP_GRADIENT};
  int last = x;
  for (size_t i = 0; i < sizeof unary / sizeof unary[0]; i++)
    last = cm_unary(g, unary[i], last, NULL);
  cm_cast(g, x, CM_F16, "h");
  cm_cast(g, x, CM_F32, "same"); /* default dtype: still printed */
  int xb = cm_cast(g, x, CM_BOOL, "xb");
  cm_op binary[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_DIV, CM_OP_MAX, CM_OP_MIN,
                    CM_OP_POW, CM_OP_LT,  CM_OP_LE,  CM_OP_EQ,  CM_OP_NE};
  int cond = -1;
  for (size_t i = 0; i < sizeof binary / sizeof binary[0]; i++) {
    int r = cm_binary(g, binary[i], x, c, NULL);
    if (binary[i] == CM_OP_LT) cond = r;
  }
  cm_binary(g, CM_OP_EQ, xb, xb, "beq");
  cm_select(g, cond, x, last, "sel");
  int axes1[1] = {1}, axes01[2] = {1, 0};
  int rs = cm_reduce(g, CM_OP_REDUCE_SUM, x, 1, axes1, true, "rs");
  cm_reduce(g, CM_OP_REDUCE_MAX, x, 2, axes01, false, "rm");
  cm_reduce(g, CM_OP_REDUCE_SUM, x, 0, NULL, false, "rnone");
  int64_t d32[2] = {3, 2}, d423[3] = {4, 2, 3};
  cm_reshape(g, x, 2, d32, "resh");
  int perm[2] = {1, 0};
  cm_permute(g, x, perm, "perm");
  cm_broadcast(g, rs, 3, d423, "bc");
  int64_t start[2] = {0, 1}, stop[2] = {2, 3}, step[2] = {1, 2}, start0[2] = {0, 0};
  cm_slice(g, x, start, stop, step, "sl");
  cm_slice(g, x, start0, stop, NULL, "sl_default");
  int pair[2] = {x, c};
  cm_concat(g, 2, pair, 1, "cat");
  cm_concat(g, 1, &x, 0, "cat1");
  int64_t lo[2] = {1, 0}, hi[2] = {0, 2};
  cm_pad(g, x, lo, hi, -INFINITY, "pad");
  cm_pad(g, x, hi, lo, 0, "pad0");
  cm_gather(g, x, io, 1, "ga");
  cm_scatter_add(g, x, io, c, 1, "sc");
  int mm = cm_matmul(g, x, w, false, false, "mm");
  cm_matmul(g, x, x, false, true, "mmt");
  cm_matmul(g, x, x, true, false, "mta");
  int64_t dimg[4] = {2, 4, 5, 5}, dk[4] = {6, 2, 3, 3};
  int img = cm_input(g, "img", CM_F32, 4, dimg);
  int k = cm_param(g, "k", CM_F32, 4, dk, (cm_init){CM_INIT_XAVIER_UNIFORM, 1, 0});
  int stride[2] = {2, 1}, padding[2] = {1, 1}, dilation[2] = {1, 2};
  int y = cm_conv2d(g, img, k, stride, padding, dilation, 2, "conv");
  cm_conv2d(g, img, k, NULL, NULL, NULL, 2, "conv_plain");
  cm_attrs ga;
  cm_attrs_default(&ga);
  ga.stride[0] = 2;
  ga.padding[0] = ga.padding[1] = 1;
  ga.dilation[1] = 2;
  ga.groups = 2;
  ga.rank = 4;
  memcpy(ga.shape, dimg, sizeof dimg);
  cm_err err = {0};
  int gi_in[2] = {y, k};
  CHECK(cm_graph_add(g, CM_OP_CONV2D_GRAD_INPUT, "dimg", gi_in, 2, &ga, &err) >= 0);
  memcpy(ga.shape, dk, sizeof dk);
  int gw_in[2] = {img, y};
  CHECK(cm_graph_add(g, CM_OP_CONV2D_GRAD_WEIGHT, "dk", gw_in, 2, &ga, &err) >= 0);
  cm_all_reduce(g, mm, CM_MODE_MEAN, 4, "ar");
  cm_all_reduce(g, mm, CM_MODE_SUM, 1, "ar1");
  int ag = cm_all_gather(g, x, 1, 2, "ag");
  int b = cm_graph_find(g, "fc.bias");
  int upd = cm_binary(g, CM_OP_ADD, st, b, "%1000");
  cm_assign(g, st, upd, "opt/m:0.new");
  CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
  cm_graph_add_output(g, ag, NULL);
  cm_graph_add_output(g, y, NULL);
  cm_graph_add_output(g, ag, NULL);
  return g;
}

/* ---- tests ------------------------------------------------------------- */

static void test_every_op_round_trips(void) {
  cm_graph *g = build_every_op();
  CHECK(cm_graph_error(g) == NULL);
  /* every op appears */
  bool seen[CM_OP_COUNT] = {false};
  for (int i = 0; i < g->n_nodes; i++) seen[g->nodes[i].op] = true;
  for (int op = 0; op < CM_OP_COUNT; op++)
    CHECK_MSG(seen[op], "op %s is not covered", cm_op_name((cm_op)op));
  char *text = check_round_trip(g);
  if (text) {
    /* spot checks of the syntax of each attribute kind */
    CHECK_STR_CONTAINS(text, "# cmaec.graph/1\nx: f32[2,3] = input\n");
    CHECK_STR_CONTAINS(text, "fc.weight: f32[3,4] = param {init=normal(mean=0.5, std=0.02)}\n");
    CHECK_STR_CONTAINS(text, "fc.bias: f32[4] = param {init=zeros}\n");
    CHECK_STR_CONTAINS(text, "opt/m:0: f32[4] = state {init=constant(value=-1.5)}\n");
    CHECK_STR_CONTAINS(text, "u: f32[2,3] = param {init=uniform(low=-0.25, high=0.75)}\n");
    CHECK_STR_CONTAINS(text, "tn: bf16[3] = param {init=trunc_normal(mean=1e-30, std=0.1)}\n");
    CHECK_STR_CONTAINS(text, "{init=xavier_uniform(gain=1.4142135623730951)}\n");
    CHECK_STR_CONTAINS(text, "td: f32[3,4] = param {init=torch_default}\n");
    CHECK_STR_CONTAINS(text, "td7: f32[3,4] = param {init=torch_default(fan_in=7)}\n");
    CHECK_STR_CONTAINS(text, "count: i64[] = state {init=ones}\n");
    CHECK_STR_CONTAINS(text, "fed: f64[3] = param\n");
    CHECK_STR_CONTAINS(text, "c: f32[2,3] = const {data=[-1,0.1,1e-30,2.5,-0,1e+300]}\n");
    CHECK_STR_CONTAINS(text, "cinf: f32[2,2] = const {value=inf}\n");
    CHECK_STR_CONTAINS(text, "cninf: f32[2,2] = const {value=-inf}\n");
    CHECK_STR_CONTAINS(text, "cnan: f64[3] = const {value=nan}\n");
    CHECK_STR_CONTAINS(text, "third: f64[] = const {value=0.3333333333333333}\n");
    CHECK_STR_CONTAINS(text, "zero: f32[] = const\n");
    CHECK_STR_CONTAINS(text, "negzero: f32[] = const {value=-0}\n");
    CHECK_STR_CONTAINS(text, "mask: bool[3] = const {data=[1,0,1]}\n");
    CHECK_STR_CONTAINS(text, "io: i64[2,3] = iota {axis=1}\n");
    CHECK_STR_CONTAINS(text, "io0: i32[4] = iota\n");
    CHECK_STR_CONTAINS(text, " = neg(x)\n");
    CHECK_STR_CONTAINS(text, "h: f16[2,3] = cast(x) {dtype=f16}\n");
    CHECK_STR_CONTAINS(text, "same: f32[2,3] = cast(x) {dtype=f32}\n");
    CHECK_STR_CONTAINS(text, "bool[2,3] = lt(x, c)\n");
    CHECK_STR_CONTAINS(text, "rs: f32[2,1] = reduce_sum(x) {axes=[1], keepdims=true}\n");
    CHECK_STR_CONTAINS(text, "rm: f32[] = reduce_max(x) {axes=[0,1]}\n");
    CHECK_STR_CONTAINS(text, "rnone: f32[2,3] = reduce_sum(x)\n");
    CHECK_STR_CONTAINS(text, "resh: f32[3,2] = reshape(x) {shape=[3,2]}\n");
    CHECK_STR_CONTAINS(text, "perm: f32[3,2] = permute(x) {perm=[1,0]}\n");
    CHECK_STR_CONTAINS(text, "bc: f32[4,2,3] = broadcast(rs) {shape=[4,2,3]}\n");
    CHECK_STR_CONTAINS(text, "sl: f32[2,1] = slice(x) {start=[0,1], stop=[2,3], step=[1,2]}\n");
    CHECK_STR_CONTAINS(text, "sl_default: f32[2,3] = slice(x) {stop=[2,3]}\n");
    CHECK_STR_CONTAINS(text, "cat: f32[2,6] = concat(x, c) {axis=1}\n");
    CHECK_STR_CONTAINS(text, "cat1: f32[2,3] = concat(x)\n");
    CHECK_STR_CONTAINS(text, "pad: f32[3,5] = pad(x) {value=-inf, lo=[1,0], hi=[0,2]}\n");
    CHECK_STR_CONTAINS(text, "pad0: f32[3,5] = pad(x) {lo=[0,2], hi=[1,0]}\n");
    CHECK_STR_CONTAINS(text, "ga: f32[2,3] = gather(x, io) {axis=1}\n");
    CHECK_STR_CONTAINS(text, "sc: f32[2,3] = scatter_add(x, io, c) {axis=1}\n");
    CHECK_STR_CONTAINS(text, "mm: f32[2,4] = matmul(x, fc.weight)\n");
    CHECK_STR_CONTAINS(text, "mmt: f32[2,2] = matmul(x, x) {transpose_b=true}\n");
    CHECK_STR_CONTAINS(text, "mta: f32[3,3] = matmul(x, x) {transpose_a=true}\n");
    CHECK_STR_CONTAINS(text, "conv: f32[2,6,3,3] = conv2d(img, k) {stride=[2,1], padding=[1,1], "
                             "dilation=[1,2], groups=2}\n");
    CHECK_STR_CONTAINS(text, "conv_plain: f32[2,6,3,3] = conv2d(img, k) {groups=2}\n");
    CHECK_STR_CONTAINS(text, "dimg: f32[2,4,5,5] = conv2d_grad_input(conv, k) {shape=[2,4,5,5], "
                             "stride=[2,1], padding=[1,1], dilation=[1,2], groups=2}\n");
    CHECK_STR_CONTAINS(text, "dk: f32[6,2,3,3] = conv2d_grad_weight(img, conv) {shape=[6,2,3,3], ");
    CHECK_STR_CONTAINS(text, "ar: f32[2,4] = all_reduce(mm) {mode=mean, ranks=4}\n");
    CHECK_STR_CONTAINS(text, "ar1: f32[2,4] = all_reduce(mm)\n");
    CHECK_STR_CONTAINS(text, "ag: f32[2,6] = all_gather(x) {axis=1, ranks=2}\n");
    CHECK_STR_CONTAINS(text, "%1000: f32[4] = add(opt/m:0, fc.bias)\n");
    CHECK_STR_CONTAINS(text, "opt/m:0.new: f32[4] = assign(opt/m:0, %1000)\n");
    CHECK_STR_CONTAINS(text, "\noutputs(ag, conv, ag)\n");
    /* the text ends with the outputs line */
    size_t len = strlen(text);
    CHECK(len > 0 && text[len - 1] == '\n');
    free(text);
  }
  cm_graph_free(g);
}

/* Builder names (%<id>) print and parse back as ordinary names. */
static void test_builder_names(void) {
  cm_graph *g = cm_graph_new();
  int x = cm_input(g, NULL, CM_F32, 2, dims2);
  int y = cm_unary(g, CM_OP_EXP, x, NULL);
  int z = cm_binary(g, CM_OP_MUL, x, y, NULL);
  cm_graph_add_output(g, z, NULL);
  char *text = check_round_trip(g);
  if (text) {
    CHECK(strcmp(text, "# cmaec.graph/1\n%0: f32[2,3] = input\n%1: f32[2,3] = exp(%0)\n"
                       "%2: f32[2,3] = mul(%0, %1)\noutputs(%2)\n") == 0);
    free(text);
  }
  cm_graph_free(g);
}

/* Random values (seeded, reproducible) survive the shortest-form printing exactly. */
static void test_random_data_exact(void) {
  cm_graph *g = cm_graph_new();
  enum { N = 64 };
  double data[N];
  test_rng r = {0x9e3779b97f4a7c15ull};
  for (int i = 0; i < N; i++) {
    double m = test_uniform(&r); /* [0,1) with 53 bits */
    int e = (int)test_int(&r, -100, 99);
    data[i] = (i % 2 ? -1 : 1) * ldexp(m + 0.5, e);
  }
  data[3] = 5e-324; /* the smallest subnormal */
  data[4] = 1.7976931348623157e308;
  data[5] = 0.1 + 0.2; /* needs 17 digits */
  int64_t d[1] = {N};
  int c = cm_const_data(g, "r", CM_F64, 1, d, data);
  cm_graph_add_output(g, c, NULL);
  char *text = check_round_trip(g);
  if (text) {
    CHECK_STR_CONTAINS(text, ",4.94065645841247e-324,1.7976931348623157e+308,"
                             "0.30000000000000004,");
    free(text);
  }
  cm_graph_free(g);
}

/* A hand-written canonical text parses and prints back byte for byte. */
static void test_canonical_text(void) {
  const char *text = "# cmaec.graph/1\n"
                     "x: f32[4,8] = input\n"
                     "fc.weight: f32[16,8] = param {init=xavier_uniform(gain=1)}\n"
                     "fc.bias: f32[16] = param {init=zeros}\n"
                     "%3: f32[4,16] = matmul(x, fc.weight) {transpose_b=true}\n"
                     "%4: f32[4,16] = broadcast(fc.bias) {shape=[4,16]}\n"
                     "y: f32[4,16] = add(%3, %4)\n"
                     "s: f32[] = reduce_sum(y) {axes=[0,1]}\n"
                     "c: f32[2,2] = const {data=[1,2,3,4.5]}\n"
                     "outputs(y, s)\n";
  cm_graph *g = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_graph_parse(text, &g, &err) == CM_OK, "%s", err.msg);
  if (!g) return;
  CHECK(g->n_nodes == 8);
  CHECK(g->n_outputs == 2 && g->outputs[0] == 5 && g->outputs[1] == 6);
  const cm_node *mm = &g->nodes[3];
  CHECK(mm->op == CM_OP_MATMUL && strcmp(mm->name, "%3") == 0 && mm->attrs.transpose_b);
  CHECK(mm->n_inputs == 2 && mm->inputs[0] == 0 && mm->inputs[1] == 1);
  CHECK(g->nodes[1].attrs.init.kind == CM_INIT_XAVIER_UNIFORM && g->nodes[1].attrs.init.a == 1);
  CHECK(g->nodes[7].attrs.n_data == 4 && g->nodes[7].attrs.data[3] == 4.5);
  CHECK(g->nodes[6].type.rank == 0 && g->nodes[6].attrs.n_axes == 2);
  char *again = cm_graph_print_str(g);
  CHECK(again && strcmp(again, text) == 0);
  free(again);
  cm_graph_free(g);
}

/* Comments, blank lines, odd spacing, attributes in any order, missing init fields. */
static void test_lenient_input(void) {
  const char *text = "\n   # a comment line\n"
                     "x :f32[ 2 , 3 ]=input   # trailing comment\r\n"
                     "\t\n"
                     "w:f32[3,2]=param{init=normal( std = 0.5 )}\n"
                     "y : f32[3,3] = matmul( x , w ){ transpose_b = true , transpose_a=true }\n"
                     "z: f32[3] = reduce_max(y) {keepdims=false, axes=[-1]}\n"
                     "outputs ( z , y )";
  cm_graph *g = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_graph_parse(text, &g, &err) == CM_OK, "%s", err.msg);
  if (!g) return;
  CHECK(g->nodes[1].attrs.init.kind == CM_INIT_NORMAL);
  CHECK(g->nodes[1].attrs.init.a == 0 && g->nodes[1].attrs.init.b == 0.5);
  CHECK(g->nodes[2].attrs.transpose_a && g->nodes[2].attrs.transpose_b);
  CHECK(g->nodes[3].attrs.n_axes == 1 && g->nodes[3].attrs.axes[0] == 1);
  char *out = cm_graph_print_str(g);
  CHECK(out && strcmp(out, "# cmaec.graph/1\n"
                           "x: f32[2,3] = input\n"
                           "w: f32[3,2] = param {init=normal(mean=0, std=0.5)}\n"
                           "y: f32[3,3] = matmul(x, w) {transpose_a=true, transpose_b=true}\n"
                           "z: f32[3] = reduce_max(y) {axes=[1]}\n"
                           "outputs(z, y)\n") == 0);
  free(out);
  cm_graph_free(g);

  /* a UTF-8 byte-order mark before the first line is skipped */
  CHECK_MSG(cm_graph_parse("\xef\xbb\xbfx: f32[2] = input\noutputs(x)\n", &g, &err) == CM_OK, "%s",
            err.msg);
  CHECK(g && g->n_nodes == 1);
  cm_graph_free(g);

  /* a node may be named "outputs"; an empty graph is one outputs() line */
  CHECK(cm_graph_parse("outputs: f32[1] = input\noutputs(outputs)\n", &g, &err) == CM_OK);
  CHECK(g && g->n_nodes == 1 && g->n_outputs == 1);
  cm_graph_free(g);
  CHECK(cm_graph_parse("# nothing\noutputs()\n", &g, &err) == CM_OK);
  CHECK(g && g->n_nodes == 0 && g->n_outputs == 0);
  cm_graph_free(g);
}

typedef struct bad_case {
  const char *text;
  const char *expect; /* substring of the message */
} bad_case;

static void test_malformed(void) {
  bad_case cases[] = {
      /* unknown op */
      {"x: f32[4,8] = input\ny: f32[4,8] = frobnicate(x)\noutputs(y)\n",
       "line 2:15: unknown op \"frobnicate\""},
      /* unknown name */
      {"x: f32[4,8] = input\ny: f32[4,8] = add(x, h2)\noutputs(y)\n",
       "line 2:22: no value named \"h2\""},
      {"x: f32[4,8] = input\noutputs(x, nope)\n", "line 2:12: no value named \"nope\""},
      /* bad type syntax */
      {"x: f32(4,8) = input\noutputs(x)\n", "line 1:7: expected '[' after dtype f32"},
      {"x: f33[4] = input\noutputs(x)\n", "line 1:4: unknown dtype \"f33\""},
      {"x: f32[4,,8] = input\noutputs(x)\n", "line 1:10: type: expected an integer"},
      {"x: f32[4 = input\noutputs(x)\n", "expected ',' or ']'"},
      /* rank 7 */
      {"x: f32[1,2,1,2,1,2,1] = input\noutputs(x)\n", "rank exceeds the maximum 6"},
      /* dim 0, negative dim, too many elements, int64 overflow */
      {"x: f32[4,0] = input\noutputs(x)\n", "dimension 1 is 0, must be >= 1"},
      {"x: f32[-3] = input\noutputs(x)\n", "dimension 0 is -3, must be >= 1"},
      {"x: f32[1048576,1048577] = input\noutputs(x)\n", "more than 2^40 elements"},
      {"x: f32[99999999999999999999] = input\noutputs(x)\n", "integer out of range"},
      /* type annotation mismatch */
      {"x: f32[4,8] = input\nw: f32[8,16] = param\ny: f32[4,8] = matmul(x, w)\noutputs(y)\n",
       "line 3: \"y\" (matmul): annotated f32[4,8] but inferred f32[4,16]"},
      {"x: f32[4,8] = input\ny: i32[4,8] = neg(x)\noutputs(y)\n",
       "annotated i32[4,8] but inferred f32[4,8]"},
      /* unknown attribute, attribute not of this op */
      {"x: f32[4,8] = input {colour=red}\noutputs(x)\n", "line 1:22: unknown attribute \"colour\""},
      {"x: f32[4,8] = input\ny: f32[4,8] = exp(x) {axis=1}\noutputs(y)\n",
       "op exp has no attribute \"axis\""},
      {"x: f32[4,8] = input {shape=[4,8]}\noutputs(x)\n", "comes from the type annotation"},
      /* attribute of the wrong type */
      {"x: f32[4,8] = input\ny: f32[8,4] = permute(x) {perm=1}\noutputs(y)\n",
       "perm: expected a list"},
      {"x: f32[4,8] = input\ny: f32[4,16] = concat(x, x) {axis=[1]}\noutputs(y)\n",
       "axis: expected an integer"},
      {"x: f32[4,8] = input\ny: f32[4,8] = matmul(x, x) {transpose_b=yes}\noutputs(y)\n",
       "transpose_b: expected true or false"},
      {"x: f32[4,8] = input\ny: f32[4,8] = all_reduce(x) {mode=max}\noutputs(y)\n",
       "mode: expected sum or mean"},
      {"c: f32[] = const {value=abc}\noutputs(c)\n", "value: expected a number"},
      {"c: f32[] = const {value=1e999}\noutputs(c)\n", "number out of range"},
      {"c: f32[] = const {value=0x10}\noutputs(c)\n", "malformed number"},
      {"w: f32[2] = param {init=gaussian}\noutputs(w)\n", "init: unknown kind \"gaussian\""},
      {"w: f32[2] = param {init=normal(gain=2)}\noutputs(w)\n",
       "init: normal has no field \"gain\""},
      {"x: f32[4,8] = input\ny: f32[8,4] = permute(x) {perm=[1,0,2]}\noutputs(y)\n",
       "perm has 3 entries but the input has rank 2"},
      {"x: f32[1,1,4,4] = input\nk: f32[1,1,1,1] = param\ny: f32[1,1,4,4] = conv2d(x, k) "
       "{stride=[1]}\noutputs(y)\n",
       "stride: expected 2 entries"},
      {"c: f32[2] = const {data=[1,2,3]}\noutputs(c)\n", "data has 3 numbers but f32[2] has 2"},
      /* unterminated lists */
      {"c: f32[2] = const {data=[1,2}\noutputs(c)\n", "data: expected ',' or ']'"},
      {"c: f32[2] = const {data=[1,2\noutputs(c)\n", "line 1:25: data: unterminated list"},
      {"x: f32[4,8] = input\ny: f32[4,8] = add(x, x\noutputs(y)\n",
       "line 2:18: unterminated list of values"},
      {"x: f32[4,8] = input\ny: f32[4,8] = exp(x) {\noutputs(y)\n", "unterminated attribute list"},
      {"w: f32[2] = param {init=normal(mean=1\noutputs(w)\n", "init: unterminated field list"},
      /* garbage after the line */
      {"x: f32[4,8] = input\ny: f32[4,8] = exp(x) junk\noutputs(y)\n",
       "line 2:22: unexpected \"junk\" after the node"},
      {"x: f32[4,8] = input\noutputs(x) x\n", "after the outputs list"},
      /* missing '=', missing ':' */
      {"x: f32[4,8] input\noutputs(x)\n", "line 1: missing '='"},
      {"x f32[4,8] = input\noutputs(x)\n", "missing ':'"},
      /* duplicate name, invalid name */
      {"x: f32[4,8] = input\nx: f32[4,8] = input\noutputs(x)\n", "line 2:1: duplicate name \"x\""},
      {"bad name: f32[4,8] = input\noutputs(bad)\n", "invalid name \"bad name\""},
      {"%x: f32[4,8] = input\noutputs(%x)\n", "invalid name \"%x\""},
      /* duplicate attribute, arity (from the builder), the outputs line */
      {"x: f32[4,8] = input\ny: f32[4,8] = matmul(x, x) {transpose_b=true, transpose_b=true}\n"
       "outputs(y)\n",
       "duplicate attribute \"transpose_b\""},
      {"x: f32[4,8] = input\ny: f32[4,8] = exp(x, x)\noutputs(y)\n",
       "line 2: \"y\" (exp): takes 1"},
      {"x: f32[4,8] = input\ny: f32[4,8] = exp\noutputs(y)\n", "takes 1 input"},
      {"x: f32[4,8] = input\n", "missing the final outputs(...) line"},
      {"", "missing the final outputs(...) line"},
      {"x: f32[4,8] = input\noutputs(x)\ny: f32[4,8] = exp(x)\n", "line 3:1: nothing may follow"},
      /* a reference to a later line (SSA) */
      {"y: f32[4,8] = exp(x)\nx: f32[4,8] = input\noutputs(y)\n", "no value named \"x\""},
      /* values outside their dtype; value and data together */
      {"c: i32[] = const {value=3e9}\noutputs(c)\n",
       "line 1: \"c\" (const): value 3000000000 is outside i32"},
      {"c: i64[2] = const {data=[0, 1e19]}\noutputs(c)\n",
       "line 1: \"c\" (const): data[1]: 1e+19 is outside i64"},
      {"c: bool[] = const {value=0.5}\noutputs(c)\n", "value 0.5 is outside bool"},
      {"c: i32[] = const {value=nan}\noutputs(c)\n", "value nan is outside i32"},
      {"c: f32[2] = const {value=1, data=[1,2]}\noutputs(c)\n",
       "line 1:29: \"value\" and \"data\" are both given"},
      {"c: f32[2] = const {data=[1,2], value=0}\noutputs(c)\n", "are both given"},
      {"s: i32[] = state {init=constant(value=1.5)}\noutputs(s)\n",
       "line 1: \"s\" (state): init constant: value 1.5 is outside i32"},
      {"x: f32[2] = input\np: f32[2] = pad(x) {hi=[9007199254740992]}\noutputs(p)\n",
       "padding hi 9007199254740992 on axis 0 is out of range [0, 2^40]"},
      /* initializers: the rule run applies */
      {"w: f32[4] = param {init=normal(std=-1)}\noutputs(w)\n",
       "line 1: \"w\" (param): init normal: std must be >= 0, got -1"},
      /* inference errors from the builder keep the line */
      {"x: f32[4,8] = input\ny: f32[4,8] = slice(x) {stop=[5,8]}\noutputs(y)\n",
       "line 2: \"y\" (slice): f32[4,8]: axis 0"},
  };
  int n = (int)(sizeof cases / sizeof cases[0]);
  CHECK(n >= 12);
  for (int i = 0; i < n; i++) {
    static cm_graph sentinel;
    cm_graph *g = &sentinel; /* must be reset to NULL on failure */
    cm_err err = {0};
    cm_status st = cm_graph_parse(cases[i].text, &g, &err);
    CHECK_MSG(st == CM_EINVALID, "case %d: status %d for:\n%s", i, (int)st, cases[i].text);
    CHECK_MSG(g == NULL, "case %d: a graph came back", i);
    CHECK_MSG(strstr(err.msg, cases[i].expect) != NULL, "case %d: \"%s\" lacks \"%s\"", i, err.msg,
              cases[i].expect);
    CHECK_MSG(strchr(err.msg, '\n') == NULL, "case %d: message has a newline", i);
    if (st == CM_OK) cm_graph_free(g);
  }
}

/* A text is verified as a whole graph, as graph JSON is: rules that no single
 * line breaks (one assign per state) are errors naming the line, and what parses
 * verifies. */
static void test_whole_graph_verified(void) {
  const char *twice = "s: f32[2] = state {init=zeros}\n"
                      "x: f32[2] = input\n"
                      "a1: f32[2] = assign(s, x)\n"
                      "a2: f32[2] = assign(s, x)\n"
                      "outputs(a1, a2)\n";
  static cm_graph sentinel;
  cm_graph *g = &sentinel;
  cm_err err = {0};
  CHECK(cm_graph_parse(twice, &g, &err) == CM_EINVALID);
  CHECK(g == NULL);
  CHECK_STR_CONTAINS(err.msg, "line 4: \"a2\" (assign): \"s\" is already assigned by \"a1\"");
  CHECK(strchr(err.msg, '\n') == NULL);
  /* one assign per target is fine, and a parsed graph always verifies */
  const char *once = "s: f32[2] = state {init=zeros}\n"
                     "t: f32[2] = state {init=zeros}\n"
                     "x: f32[2] = input\n"
                     "a1: f32[2] = assign(s, x)\n"
                     "a2: f32[2] = assign(t, x)\n"
                     "outputs(a1, a2)\n";
  g = NULL;
  CHECK_MSG(cm_graph_parse(once, &g, &err) == CM_OK, "%s", err.msg);
  CHECK(g && cm_graph_verify(g, &err) == CM_OK);
  cm_graph_free(g);
}

/* Every prefix of a valid text, and single-byte mutations of it, fail cleanly or
 * parse (no crash, no leak: run under ASan). */
static void test_truncations_and_mutations(void) {
  cm_graph *g0 = build_every_op();
  char *text = cm_graph_print_str(g0);
  cm_graph_free(g0);
  CHECK(text != NULL);
  if (!text) return;
  size_t len = strlen(text);
  char *copy = malloc(len + 1);
  int ok = 0, bad = 0;
  for (size_t cut = 0; cut < len; cut += 7) {
    memcpy(copy, text, cut);
    copy[cut] = '\0';
    cm_graph *g = NULL;
    cm_err err = {0};
    cm_status st = cm_graph_parse(copy, &g, &err);
    if (st == CM_OK) {
      ok++;
      cm_graph_free(g);
    } else {
      bad++;
      CHECK_MSG(st == CM_EINVALID && strncmp(err.msg, "line ", 5) == 0, "%s", err.msg);
    }
  }
  const char junk[] = "=:,[](){}#-%.e9xq \n";
  test_rng r = {12345};
  for (int trial = 0; trial < 400; trial++) {
    memcpy(copy, text, len + 1);
    copy[test_int(&r, 0, (int64_t)len - 1)] = junk[test_int(&r, 0, (int64_t)sizeof junk - 2)];
    cm_graph *g = NULL;
    cm_err err = {0};
    cm_status st = cm_graph_parse(copy, &g, &err);
    if (st == CM_OK) {
      ok++;
      cm_graph_free(g);
    } else {
      bad++;
      CHECK_MSG(st == CM_EINVALID && strncmp(err.msg, "line ", 5) == 0, "%s", err.msg);
    }
  }
  CHECK(bad > 0 && ok > 0); /* some mutations (comments, digits) stay valid */
  free(copy);
  free(text);
}

static void test_dot(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {4, 8}, dw[2] = {16, 8};
  int x = cm_input(g, "x", CM_F32, 2, d);
  int w = cm_param(g, "fc.weight", CM_F32, 2, dw, (cm_init){CM_INIT_ZEROS, 0, 0});
  int y = cm_matmul(g, x, w, false, true, "y");
  int s = cm_reduce(g, CM_OP_REDUCE_SUM, y, 0, NULL, false, "s");
  int e = cm_unary(g, CM_OP_EXP, s, NULL);
  cm_graph_add_output(g, e, NULL);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  cm_err err = {0};
  CHECK(cm_graph_dot(g, f, &err) == CM_OK);
  fclose(f);
  CHECK(buf != NULL);
  if (buf) {
    CHECK(strncmp(buf, "digraph cmaec {\n", 16) == 0);
    CHECK_STR_CONTAINS(buf, "  n0 [label=\"x\\ninput\\nf32[4,8]\", fillcolor=\"#c6dbef\"];\n");
    CHECK_STR_CONTAINS(buf,
                       "  n1 [label=\"fc.weight\\nparam\\nf32[16,8]\", fillcolor=\"#c6dbef\"];\n");
    CHECK_STR_CONTAINS(buf, "  n2 [label=\"y\\nmatmul\\nf32[4,16]\", fillcolor=\"#fcbba1\"];\n");
    CHECK_STR_CONTAINS(buf,
                       "  n3 [label=\"s\\nreduce_sum\\nf32[4,16]\", fillcolor=\"#fdd0a2\"];\n");
    CHECK_STR_CONTAINS(buf, "  n4 [label=\"%4\\nexp\\nf32[4,16]\", fillcolor=\"#c7e9c0\", "
                            "peripheries=2];\n");
    CHECK_STR_CONTAINS(buf, "  n0 -> n2;\n  n1 -> n2;\n  n2 -> n3;\n  n3 -> n4;\n");
    const char *first = strstr(buf, "peripheries");
    CHECK(first && strstr(first + 1, "peripheries") == NULL); /* only one output */
    size_t n = strlen(buf);
    CHECK(n > 2 && strcmp(buf + n - 2, "}\n") == 0);
  }
  free(buf);
  cm_graph_free(g);

  /* seven categories, seven distinct colors; quotes in names escaped */
  g = cm_graph_new();
  int64_t d1[1] = {4};
  x = cm_input(g, "x", CM_F32, 1, d1);
  int st = cm_state(g, "st", CM_F32, 1, d1, (cm_init){CM_INIT_ZEROS, 0, 0});
  int a = cm_unary(g, CM_OP_NEG, x, "a");
  int r = cm_reduce(g, CM_OP_REDUCE_SUM, a, 0, NULL, false, "r");
  int64_t d41[2] = {4, 1};
  int m = cm_reshape(g, r, 2, d41, "m");
  int mm = cm_matmul(g, m, m, true, false, "mm");
  int ar = cm_all_reduce(g, x, CM_MODE_SUM, 1, "ar");
  cm_assign(g, st, ar, "up");
  (void)mm;
  CHECK(cm_graph_error(g) == NULL);
  /* names are validated by the builder; force a quote to test escaping */
  free(g->nodes[0].name);
  g->nodes[0].name = strdup("q\"b\\");
  buf = NULL;
  f = open_memstream(&buf, &len);
  CHECK(cm_graph_dot(g, f, &err) == CM_OK);
  fclose(f);
  if (buf) {
    const char *colors[] = {"#c6dbef", "#c7e9c0", "#fdd0a2", "#dadaeb",
                            "#fcbba1", "#fff3a0", "#d9d9d9"};
    for (int i = 0; i < 7; i++) {
      CHECK_STR_CONTAINS(buf, colors[i]);
      for (int j = 0; j < i; j++) CHECK(strcmp(colors[i], colors[j]) != 0);
    }
    CHECK_STR_CONTAINS(buf, "label=\"q\\\"b\\\\\\ninput");
  }
  free(buf);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_every_op_round_trips), TEST(test_builder_names), TEST(test_random_data_exact),
          TEST(test_canonical_text), TEST(test_lenient_input), TEST(test_malformed),
          TEST(test_truncations_and_mutations), TEST(test_whole_graph_verified), TEST(test_dot))
