/* Graph JSON: round trips over every op and attribute, the examples, number
 * formatting, topological sorting, and error messages for malformed input. */
#include "frontend/frontend.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>
#include <unistd.h>

static bool same_double(double a, double b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  return a == b && signbit(a) == signbit(b);
}

/* Compares the attribute fields an op reads. */
static bool same_attrs(cm_op op, int in_rank, const cm_attrs *a, const cm_attrs *b) {
  unsigned m = cm_op_get_info(op)->attrs;
  if ((m & CM_ATTR_DTYPE) && a->dtype != b->dtype) return false;
  if (m & CM_ATTR_SHAPE) {
    if (a->rank != b->rank) return false;
    for (int i = 0; i < a->rank; i++)
      if (a->shape[i] != b->shape[i]) return false;
  }
  if (m & CM_ATTR_INIT) {
    if (a->init.kind != b->init.kind || !same_double(a->init.a, b->init.a) ||
        !same_double(a->init.b, b->init.b))
      return false;
  }
  if ((m & CM_ATTR_VALUE) && !a->data && !same_double(a->value, b->value)) return false;
  if (m & CM_ATTR_DATA) {
    if ((a->data == NULL) != (b->data == NULL) || a->n_data != b->n_data) return false;
    for (int64_t i = 0; a->data && i < a->n_data; i++)
      if (!same_double(a->data[i], b->data[i])) return false;
  }
  if ((m & CM_ATTR_AXIS) && a->axis != b->axis) return false;
  if (m & CM_ATTR_AXES) {
    if (a->n_axes != b->n_axes) return false;
    for (int i = 0; i < a->n_axes; i++)
      if (a->axes[i] != b->axes[i]) return false;
  }
  if ((m & CM_ATTR_KEEPDIMS) && a->keepdims != b->keepdims) return false;
  for (int i = 0; i < in_rank; i++) {
    if ((m & CM_ATTR_PERM) && a->perm[i] != b->perm[i]) return false;
    if ((m & CM_ATTR_SLICE) &&
        (a->start[i] != b->start[i] || a->stop[i] != b->stop[i] || a->step[i] != b->step[i]))
      return false;
    if ((m & CM_ATTR_PAD) && (a->lo[i] != b->lo[i] || a->hi[i] != b->hi[i])) return false;
  }
  if ((m & CM_ATTR_PAD) && !same_double(a->value, b->value)) return false;
  if ((m & CM_ATTR_TRANSPOSE) &&
      (a->transpose_a != b->transpose_a || a->transpose_b != b->transpose_b))
    return false;
  if ((m & CM_ATTR_CONV) &&
      (memcmp(a->stride, b->stride, sizeof a->stride) ||
       memcmp(a->padding, b->padding, sizeof a->padding) ||
       memcmp(a->dilation, b->dilation, sizeof a->dilation) || a->groups != b->groups))
    return false;
  if ((m & CM_ATTR_MODE) && a->mode != b->mode) return false;
  if ((m & CM_ATTR_RANKS) && a->ranks != b->ranks) return false;
  return true;
}

/* Every node of a has a node of the same name in b with the same op, type,
 * input names and attributes; same outputs. */
static void check_same_graph(const cm_graph *a, const cm_graph *b) {
  CHECK(a->n_nodes == b->n_nodes);
  CHECK(a->n_outputs == b->n_outputs);
  for (int i = 0; i < a->n_nodes; i++) {
    const cm_node *x = &a->nodes[i];
    int j = cm_graph_find(b, x->name);
    CHECK_MSG(j >= 0, "node %s missing", x->name);
    if (j < 0) continue;
    const cm_node *y = &b->nodes[j];
    CHECK_MSG(x->op == y->op, "node %s: op", x->name);
    CHECK_MSG(cm_type_equal(&x->type, &y->type), "node %s: type", x->name);
    CHECK_MSG(x->n_inputs == y->n_inputs, "node %s: inputs", x->name);
    for (int k = 0; k < x->n_inputs && k < y->n_inputs; k++)
      CHECK(strcmp(a->nodes[x->inputs[k]].name, b->nodes[y->inputs[k]].name) == 0);
    int rank = x->n_inputs ? a->nodes[x->inputs[0]].type.rank : 0;
    CHECK_MSG(same_attrs(x->op, rank, &x->attrs, &y->attrs), "node %s: attrs", x->name);
  }
  for (int i = 0; i < a->n_outputs && i < b->n_outputs; i++)
    CHECK(strcmp(a->nodes[a->outputs[i]].name, b->nodes[b->outputs[i]].name) == 0);
}

/* write -> read -> write gives the same text and the same graph. */
static void check_fixed_point(const cm_graph *g) {
  char *text1 = cm_graph_to_json(g);
  CHECK(text1 != NULL);
  if (!text1) return;
  cm_graph *back = NULL;
  cm_err err = {0};
  cm_status st = cm_graph_from_json(text1, strlen(text1), &back, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st == CM_OK) {
    char *text2 = cm_graph_to_json(back);
    CHECK(text2 && strcmp(text1, text2) == 0);
    if (text2 && strcmp(text1, text2) != 0)
      fprintf(stderr, "first:\n%s\nsecond:\n%s\n", text1, text2);
    check_same_graph(g, back);
    check_same_graph(back, g);
    free(text2);
  }
  cm_graph_free(back);
  free(text1);
}

/* A graph that uses every op and every kind of attribute, with non-default values. */
static cm_graph *build_every_op(void) {
  cm_graph *g = cm_graph_new();
  int64_t d24[] = {2, 4}, d42[] = {4, 2}, d8[] = {8}, d234[] = {2, 3, 4};
  int x = cm_input(g, "x", CM_F32, 2, d24);
  int xi = cm_input(g, "idx", CM_I32, 2, d24);
  int img = cm_input(g, "img", CM_F32, 4, (int64_t[]){1, 4, 5, 5});
  int w = cm_param(g, "fc.weight", CM_F32, 2, d42, (cm_init){CM_INIT_NORMAL, 0.5, 0.02});
  int p2 = cm_param(g, "p2", CM_F32, 2, d24, (cm_init){CM_INIT_TRUNC_NORMAL, 0, 0.1});
  int p3 = cm_param(g, "p3", CM_F32, 1, d8, (cm_init){CM_INIT_UNIFORM, -0.25, 0.75});
  int p4 = cm_param(g, "p4", CM_F32, 2, d24, (cm_init){CM_INIT_XAVIER_UNIFORM, 1.5, 0});
  int p5 = cm_param(g, "p5", CM_F32, 2, d24, (cm_init){CM_INIT_TORCH_DEFAULT, 7, 0});
  int p6 = cm_param(g, "p6", CM_F32, 2, d24, (cm_init){CM_INIT_TORCH_DEFAULT, 0, 0});
  int p7 = cm_param(g, "p7", CM_F32, 2, d24, (cm_init){CM_INIT_NONE, 0, 0});
  int cw =
      cm_param(g, "conv.weight", CM_F32, 4, (int64_t[]){6, 2, 3, 3}, (cm_init){CM_INIT_ONES, 0, 0});
  int s = cm_state(g, "step", CM_F32, 0, NULL, (cm_init){CM_INIT_ZEROS, 0, 0});
  int s2 = cm_state(g, "ema", CM_F32, 2, d24, (cm_init){CM_INIT_CONSTANT, 0.999, 0});
  int one = cm_const_scalar(g, "one", CM_F32, 1.0);
  int negz = cm_const_scalar(g, "negzero", CM_F64, -0.0);
  int ninf = cm_const_fill(g, "ninf", CM_F32, 2, d24, -INFINITY);
  double vals[8] = {0.1, -2.5, 1.0 / 3.0, 1e-300, 5e-324, 1.7976931348623157e308, NAN, INFINITY};
  int cd = cm_const_data(g, "cdata", CM_F64, 2, d24, vals);
  int cb = cm_const_data(g, "cbool", CM_BOOL, 2, d24, (double[]){1, 0, 0, 1, 1, 1, 0, 0});
  int io = cm_iota(g, "io", CM_I32, 2, d24, 1);
  int io0 = cm_iota(g, NULL, CM_F32, 1, d8, 0);
  (void)ninf, (void)p6, (void)p7, (void)io0, (void)negz;

  static const cm_op unary[] = {CM_OP_NEG,  CM_OP_ABS,   CM_OP_EXP,          CM_OP_LOG,
                                CM_OP_SQRT, CM_OP_RSQRT, CM_OP_RECIP,        CM_OP_TANH,
                                CM_OP_ERF,  CM_OP_RELU,  CM_OP_STOP_GRADIENT};
  int u = x;
  for (size_t i = 0; i < sizeof unary / sizeof unary[0]; i++) u = cm_unary(g, unary[i], u, NULL);
  int c = cm_cast(g, u, CM_BF16, "as_bf16");
  c = cm_cast(g, c, CM_F32, NULL);
  static const cm_op binary[] = {CM_OP_ADD, CM_OP_SUB, CM_OP_MUL, CM_OP_DIV,
                                 CM_OP_MAX, CM_OP_MIN, CM_OP_POW};
  int b = c;
  for (size_t i = 0; i < sizeof binary / sizeof binary[0]; i++)
    b = cm_binary(g, binary[i], b, p2, NULL);
  int lt = cm_binary(g, CM_OP_LT, b, x, "lt");
  int le = cm_binary(g, CM_OP_LE, b, x, NULL);
  int eq = cm_binary(g, CM_OP_EQ, lt, le, NULL);
  int ne = cm_binary(g, CM_OP_NE, eq, cb, NULL);
  int sel = cm_select(g, ne, b, p4, "sel");
  int rs = cm_reduce(g, CM_OP_REDUCE_SUM, sel, 1, (int[]){-1}, true, "rs");
  int rm = cm_reduce(g, CM_OP_REDUCE_MAX, sel, 2, (int[]){1, 0}, false, "rm");
  int rsb = cm_broadcast(g, rs, 2, d24, "rsb");
  int rmb = cm_broadcast(g, rm, 2, d24, NULL);
  int r3 = cm_reshape(g, cm_binary(g, CM_OP_ADD, rsb, rmb, NULL), 3, (int64_t[]){2, 2, 2}, "r3");
  int pm = cm_permute(g, r3, (int[]){2, 0, 1}, "pm");
  int sl = cm_slice(g, pm, (int64_t[]){0, 1, 0}, (int64_t[]){2, 2, 2}, (int64_t[]){2, 1, 1}, "sl");
  int sl2 = cm_slice(g, x, (int64_t[]){0, 1}, (int64_t[]){2, 3}, NULL, "sl2");
  int cc = cm_concat(g, 3, (int[]){x, sl2, p5}, 1, "cc");
  int cc0 = cm_concat(g, 1, (int[]){x}, 0, NULL);
  int pd = cm_pad(g, x, (int64_t[]){1, 0}, (int64_t[]){0, 2}, -1.5, "pd");
  int pd0 = cm_pad(g, x, (int64_t[]){0, 0}, (int64_t[]){0, 1}, 0, NULL);
  int ga = cm_gather(g, x, xi, 1, "ga");
  int sc = cm_scatter_add(g, x, xi, p2, 0, "sc");
  int mm = cm_matmul(g, x, w, false, false, "mm");
  int mmt = cm_matmul(g, x, x, true, false, "mmt");
  int mmb = cm_matmul(g, cm_input(g, "batch", CM_F32, 3, d234), x, false, true, "mmb");
  int cv = cm_conv2d(g, img, cw, (int[]){2, 1}, (int[]){1, 0}, (int[]){1, 2}, 2, "cv");
  int cv1 = cm_conv2d(g, img, cw, NULL, NULL, NULL, 2, NULL);
  cm_attrs a;
  cm_attrs_default(&a);
  a.stride[0] = 2, a.padding[0] = 1, a.dilation[1] = 2, a.groups = 2;
  a.rank = 4;
  memcpy(a.shape, (int64_t[]){1, 4, 5, 5}, 4 * sizeof(int64_t));
  int gi = cm_graph_add(g, CM_OP_CONV2D_GRAD_INPUT, "gi", (int[]){cv, cw}, 2, &a, NULL);
  memcpy(a.shape, (int64_t[]){6, 2, 3, 3}, 4 * sizeof(int64_t));
  int gw = cm_graph_add(g, CM_OP_CONV2D_GRAD_WEIGHT, "gw", (int[]){img, cv}, 2, &a, NULL);
  int ar = cm_all_reduce(g, mm, CM_MODE_MEAN, 2, "ar");
  int ar1 = cm_all_reduce(g, mm, CM_MODE_SUM, 1, NULL);
  int ag = cm_all_gather(g, mm, 1, 4, "ag");
  int as = cm_assign(g, s, cm_binary(g, CM_OP_ADD, s, one, NULL), "step.next");
  int as2 = cm_assign(g, s2, sc, NULL);
  int outs[] = {sl, cc, cc0, pd, pd0, ga, mmt, mmb, cv1, gi, gw, ar, ar1, ag, as, as2, cd, io, p3};
  for (size_t i = 0; i < sizeof outs / sizeof outs[0]; i++) cm_graph_add_output(g, outs[i], NULL);
  return g;
}

static void test_round_trip_every_op(void) {
  cm_graph *g = build_every_op();
  CHECK_MSG(cm_graph_error(g) == NULL, "%s", cm_graph_error(g));
  if (cm_graph_error(g)) {
    cm_graph_free(g);
    return;
  }
  cm_err err = {0};
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  /* The test covers the whole op table: a new op must be added here. */
  bool seen[CM_OP_COUNT] = {false};
  for (int i = 0; i < g->n_nodes; i++) seen[g->nodes[i].op] = true;
  for (int op = 0; op < CM_OP_COUNT; op++)
    CHECK_MSG(seen[op], "op %s is not in the round-trip graph", cm_op_name((cm_op)op));
  check_fixed_point(g);

  /* Spot checks of the text: canonical attributes and shortest numbers. */
  char *text = cm_graph_to_json(g);
  CHECK_STR_CONTAINS(text, "\"format\":\t\"cmaec.graph/1\"");
  CHECK_STR_CONTAINS(text, "[0.1, -2.5, 0.3333333333333333, 1e-300, 4.94065645841247e-324, "
                           "1.7976931348623157e+308, \"nan\", \"inf\"]");
  CHECK_STR_CONTAINS(text, "\"value\":\t\"-inf\"");
  CHECK_STR_CONTAINS(text, "\"value\":\t-0");
  CHECK_STR_CONTAINS(text, "\"name\":\t\"%"); /* builder names are kept */
  CHECK_STR_CONTAINS(text, "\"stride\":\t[2, 1]");
  CHECK_STR_CONTAINS(text, "\"dilation\":\t[1, 2]");
  CHECK_STR_CONTAINS(text, "\"mode\":\t\"mean\"");
  CHECK_STR_CONTAINS(text, "\"axes\":\t[0, 1]"); /* sorted by the builder */
  CHECK_STR_CONTAINS(text, "\"kind\":\t\"trunc_normal\"");
  CHECK_STR_CONTAINS(text, "\"kind\":\t\"torch_default\",\n\t\t\t\t\"fan_in\":\t7");
  /* p7 has no initializer, so no "init" key; the last param p6 has no fan_in. */
  CHECK(
      strstr(text, "\"name\":\t\"p7\",\n\t\t\t\"dtype\":\t\"f32\",\n\t\t\t\"shape\":\t[2, 4]\n") !=
      NULL);
  free(text);
  cm_graph_free(g);
}

static void test_numbers_are_shortest(void) {
  /* 0.1 prints as 0.1 (not 0.10000000000000001), 1/3 needs 16 digits, 0.1+0.2 needs 17;
   * 2^40 is an exact integer. */
  cm_graph *g = cm_graph_new();
  int64_t d3[] = {4};
  int c =
      cm_const_data(g, "c", CM_F64, 1, d3, (double[]){0.1, 1.0 / 3.0, 0.1 + 0.2, 1099511627776.0});
  cm_graph_add_output(g, c, NULL);
  char *text = cm_graph_to_json(g);
  CHECK_STR_CONTAINS(text, "[0.1, 0.3333333333333333, 0.30000000000000004, 1099511627776]");
  cm_graph *back = NULL;
  cm_err err = {0};
  CHECK(cm_graph_from_json(text, strlen(text), &back, &err) == CM_OK);
  if (back) {
    CHECK(back->nodes[0].attrs.data[0] == 0.1);
    CHECK(back->nodes[0].attrs.data[1] == 1.0 / 3.0);
    CHECK(back->nodes[0].attrs.data[2] == 0.1 + 0.2);
    CHECK(back->nodes[0].attrs.data[3] == 1099511627776.0);
  }
  cm_graph_free(back);
  free(text);
  cm_graph_free(g);
}

/* Random graphs of elementwise ops with random constant data. */
static void test_round_trip_random(void) {
  test_rng state = {0x9e3779b97f4a7c15ull};
  for (int round = 0; round < 20; round++) {
    cm_graph *g = cm_graph_new();
    int64_t dims[] = {3, 2};
    int ids[16], n = 0;
    ids[n++] = cm_input(g, "x", CM_F32, 2, dims);
    double data[6];
    for (int i = 0; i < 6; i++) {
      data[i] = (test_uniform(&state) - 0.5) * 1e3;
    }
    ids[n++] = cm_const_data(g, NULL, CM_F32, 2, dims, data);
    while (n < 16) {
      uint64_t bits = test_rng_next(&state);
      int a = ids[(bits >> 33) % (uint64_t)n], b = ids[(bits >> 40) % (uint64_t)n];
      cm_op op = (bits >> 50) % 2 ? CM_OP_ADD : CM_OP_MUL;
      ids[n++] = (bits >> 45) % 3 ? cm_binary(g, op, a, b, NULL) : cm_unary(g, CM_OP_TANH, a, NULL);
    }
    cm_graph_add_output(g, ids[15], NULL);
    CHECK(cm_graph_error(g) == NULL);
    check_fixed_point(g);
    cm_graph_free(g);
  }
}

static void test_examples(void) {
  static const char *paths[] = {"examples/mlp.json", "examples/ops_tour.json"};
  for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
    cm_graph *g = NULL;
    cm_err err = {0};
    cm_status st = cm_graph_load(paths[i], &g, &err);
    CHECK_MSG(st == CM_OK, "%s", err.msg);
    if (!g) continue;
    CHECK(cm_graph_verify(g, &err) == CM_OK);
    CHECK(g->n_outputs >= 1);
    check_fixed_point(g);
    cm_graph_free(g);
  }
  /* mlp: the loss is a scalar output, the params carry initializers. */
  cm_graph *g = NULL;
  cm_err err = {0};
  if (cm_graph_load("examples/mlp.json", &g, &err) == CM_OK) {
    int loss = cm_graph_find(g, "loss");
    CHECK(loss >= 0 && g->nodes[loss].type.rank == 0);
    CHECK(g->outputs[0] == loss);
    int w = cm_graph_find(g, "fc1.weight");
    CHECK(w >= 0 && g->nodes[w].op == CM_OP_PARAM && g->nodes[w].attrs.init.kind != CM_INIT_NONE);
    cm_graph_free(g);
  }
}

/* Nodes may come in any order; sorting keeps file order where it can. */
static void test_topological_sort(void) {
  const char *text = "{\"format\": \"cmaec.graph/1\","
                     " \"inputs\": [{\"name\": \"x\", \"dtype\": \"f32\", \"shape\": [2]}],"
                     " \"nodes\": ["
                     "  {\"name\": \"d\", \"op\": \"add\", \"inputs\": [\"c\", \"b\"]},"
                     "  {\"name\": \"a\", \"op\": \"neg\", \"inputs\": [\"x\"]},"
                     "  {\"name\": \"c\", \"op\": \"exp\", \"inputs\": [\"b\"]},"
                     "  {\"name\": \"b\", \"op\": \"tanh\", \"inputs\": [\"a\"]},"
                     "  {\"name\": \"e\", \"op\": \"relu\", \"inputs\": [\"x\"]}],"
                     " \"outputs\": [\"d\", \"e\"]}";
  cm_graph *g = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_graph_from_json(text, strlen(text), &g, &err) == CM_OK, "%s", err.msg);
  if (!g) return;
  /* Depth-first from d: a, b, c, then d; e keeps its place after them. */
  const char *expect[] = {"x", "a", "b", "c", "d", "e"};
  CHECK(g->n_nodes == 6);
  for (int i = 0; i < 6 && i < g->n_nodes; i++) CHECK(strcmp(g->nodes[i].name, expect[i]) == 0);
  CHECK(g->n_outputs == 2 && g->outputs[0] == 4 && g->outputs[1] == 5);
  cm_graph_free(g);
}

typedef struct bad_case {
  const char *json;
  const char *expect;
} bad_case;

#define HEAD                                                                                       \
  "{\"format\": \"cmaec.graph/1\", \"inputs\": [{\"name\": \"x\", \"dtype\": \"f32\", \"shape\": " \
  "[4, 8]}], "

static void test_errors(void) {
  static const bad_case cases[] = {
      {"", "(root): empty document"},
      {"{\"format\": \"cmaec.graph/1\",\n  \"nodes\": [\n    {\"name\": }",
       "(root): JSON syntax error near line 3 column 14"},
      {"[1, 2]", "(root): expected an object, got an array"},
      {"{\"format\": \"x\"}", "format: expected \"cmaec.graph/1\", got \"x\""},
      {"{\"nodes\": []}", "(root): missing \"format\""},
      {"{\"format\": \"cmaec.graph/1\", \"extra\": 1}", "(root): unknown key \"extra\""},
      {HEAD "\"params\": [{\"name\": \"w\", \"dtype\": \"f32\", \"shape\": [2, 3, 0]}]}",
       "params[0].shape[2]: dimension 0 is not >= 1"},
      {HEAD "\"params\": [{\"name\": \"w\", \"dtype\": \"f32\", \"shape\": [2.5]}]}",
       "params[0].shape[0]: expected an integer, got 2.5"},
      {HEAD "\"params\": [{\"name\": \"w\", \"dtype\": \"f32\", \"shape\": [1048576, 2097152]}]}",
       "params[0].shape: the shape has more than 2^40 elements"},
      {HEAD
       "\"nodes\": [{\"name\": \"y\", \"op\": \"add\", \"inputs\": [\"x\", \"x\"], \"axis\": 1}]}",
       "nodes[0] \"y\" (add): unknown attribute \"axis\""},
      {HEAD "\"nodes\": [{\"name\": \"y\", \"op\": \"neg\", \"inputs\": [\"x\"]}, "
            "{\"name\": \"z\", \"op\": \"add\", \"inputs\": [\"y\", \"h2\"]}]}",
       "nodes[1].inputs[1]: no value named \"h2\""},
      {HEAD "\"nodes\": [{\"name\": \"q\", \"op\": \"neg\", \"inputs\": [\"x\"]}, "
            "{\"name\": \"a\", \"op\": \"neg\", \"inputs\": [\"b\"]}, "
            "{\"name\": \"b\", \"op\": \"neg\", \"inputs\": [\"a\"]}]}",
       "nodes[1] \"a\": cycle: a -> b -> a"},
      {HEAD "\"nodes\": [{\"name\": \"a\", \"op\": \"neg\", \"inputs\": [\"a\"]}]}",
       "nodes[0] \"a\": cycle: a -> a"},
      {HEAD "\"nodes\": [{\"name\": \"x\", \"op\": \"neg\", \"inputs\": [\"x\"]}]}",
       "nodes[0] \"x\": duplicate name (also inputs[0])"},
      {HEAD "\"params\": [{\"name\": \"w\", \"dtype\": \"f32\", \"shape\": [16, 4]}], "
            "\"nodes\": [{\"name\": \"qk\", \"op\": \"matmul\", \"inputs\": [\"x\", \"w\"]}]}",
       "nodes[0] \"qk\" (matmul): f32[4,8] x f32[16,4]: inner dimensions 8 and 16 differ"},
      {HEAD "\"nodes\": [{\"name\": \"y\", \"op\": \"neg\", \"inputs\": [\"x\"]}], "
            "\"outputs\": [\"z\"]}",
       "outputs[0]: no value named \"z\""},
      {HEAD "\"nodes\": [{\"name\": \"y\", \"op\": \"reduce_sum\", \"inputs\": [\"x\"], "
            "\"keepdims\": 1}]}",
       "nodes[0].keepdims: expected true or false, got a number"},
      {HEAD "\"nodes\": [{\"name\": \"y\", \"op\": \"frobnicate\", \"inputs\": [\"x\"]}]}",
       "nodes[0] \"y\": unknown op \"frobnicate\""},
      {HEAD "\"nodes\": [{\"name\": \"bad name\", \"op\": \"neg\", \"inputs\": [\"x\"]}]}",
       "nodes[0].name: invalid name \"bad name\""},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"f32\", \"shape\": [2], "
            "\"data\": [1, 2, 3]}]}",
       "nodes[0] \"c\" (const): \"data\" has 3 numbers, f32[2] has 2 elements"},
      {HEAD
       "\"nodes\": [{\"name\": \"p\", \"op\": \"permute\", \"inputs\": [\"x\"], \"perm\": [0]}]}",
       "nodes[0] \"p\" (permute): \"perm\" has 1 entries, the input has rank 2"},
      {HEAD "\"nodes\": [{\"name\": \"y\", \"op\": \"neg\", \"inputs\": [\"x\"], "
            "\"inputs\": [\"x\"]}]}",
       "nodes[0]: duplicate key \"inputs\""},
      {HEAD "\"params\": [{\"name\": \"w\", \"dtype\": \"f32\", \"shape\": [2], "
            "\"init\": {\"kind\": \"gaussian\"}}]}",
       "params[0].init.kind: unknown init kind \"gaussian\""},
      {HEAD
       "\"nodes\": [{\"name\": \"y\", \"op\": \"cast\", \"inputs\": [\"x\"], \"dtype\": \"f8\"}]}",
       "nodes[0].dtype: unknown dtype \"f8\""},
      {"{\"format\": \"cmaec.graph/1\"} trailing",
       "(root): JSON syntax error near line 1 column 29"},
      /* values outside their dtype, named by their path */
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"i32\", \"shape\": [2], "
            "\"data\": [1, 3e9]}]}",
       "nodes[0].data[1]: 3000000000 is outside i32 (an integer in [-2147483648, 2147483647])"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"i32\", "
            "\"value\": \"nan\"}]}",
       "nodes[0].value: nan is outside i32"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"i32\", "
            "\"value\": 1.5}]}",
       "nodes[0].value: 1.5 is outside i32"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"i64\", "
            "\"value\": 1e19}]}",
       "nodes[0].value: 1e+19 is outside i64"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"bool\", "
            "\"shape\": [2], \"data\": [0, 2]}]}",
       "nodes[0].data[1]: 2 is outside bool (0 or 1)"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"bool\", "
            "\"value\": 0.5}]}",
       "nodes[0].value: 0.5 is outside bool"},
      {HEAD "\"nodes\": [{\"name\": \"xi\", \"op\": \"cast\", \"inputs\": [\"x\"], "
            "\"dtype\": \"i32\"}, {\"name\": \"p\", \"op\": \"pad\", \"inputs\": [\"xi\"], "
            "\"lo\": [1, 0], \"value\": 0.25}]}",
       "nodes[1].value: 0.25 is outside i32"},
      {HEAD "\"state\": [{\"name\": \"s\", \"dtype\": \"i32\", \"shape\": [2], "
            "\"init\": {\"kind\": \"constant\", \"value\": 3e9}}]}",
       "state[0].init.value: 3000000000 is outside i32"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"f32\", "
            "\"shape\": [2], \"value\": 1, \"data\": [1, 2]}]}",
       "nodes[0] \"c\" (const): \"value\" and \"data\" are both given"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"f32\", "
            "\"value\": 1e400}]}",
       "nodes[0].value: the number overflows to infinity (write \"inf\" or \"-inf\")"},
      {HEAD "\"nodes\": [{\"name\": \"c\", \"op\": \"const\", \"dtype\": \"f64\", "
            "\"shape\": [2], \"data\": [1, -1e400]}]}",
       "nodes[0].data[1]: the number overflows to infinity"},
      {HEAD "\"nodes\": [{\"name\": \"p\", \"op\": \"pad\", \"inputs\": [\"x\"], "
            "\"hi\": [0, 9007199254740992]}]}",
       "padding hi 9007199254740992 on axis 1 is out of range [0, 2^40]"},
      /* a NUL escape would end the C string: "x\u0000y" read as "x" */
      {HEAD "\"nodes\": [{\"name\": \"y\\u0000z\", \"op\": \"neg\", \"inputs\": [\"x\"]}]}",
       "nodes[0].name: \\u0000 (NUL) in a string"},
      {HEAD "\"nodes\": [{\"name\": \"y\", \"op\": \"neg\", \"inputs\": [\"x\\u0000\"]}]}",
       "nodes[0].inputs[0]: \\u0000 (NUL) in a string"},
      {"{\"format\": \"cmaec.graph/1\", \"x\\u0000\": 1}", "(root): \\u0000 (NUL) in a string"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    cm_graph *g = (cm_graph *)&test_failures; /* must be reset to NULL */
    cm_err err = {0};
    cm_status st = cm_graph_from_json(cases[i].json, strlen(cases[i].json), &g, &err);
    CHECK_MSG(st == CM_EINVALID, "case %zu: status %d", i, (int)st);
    CHECK_MSG(err.status == CM_EINVALID, "case %zu", i);
    CHECK_MSG(g == NULL, "case %zu", i);
    CHECK_STR_CONTAINS(err.msg, cases[i].expect);
    CHECK_MSG(strchr(err.msg, '\n') == NULL, "case %zu: message has a newline", i);
  }
  /* Not NUL-terminated: the reader must stay inside len. */
  char buf[8] = {'{', '"', 'a', '"', ':', '1', '}', 'X'};
  cm_graph *g = NULL;
  cm_err err = {0};
  CHECK(cm_graph_from_json(buf, 7, &g, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "(root): unknown key \"a\"");
  /* An escaped backslash before "u0000" is no NUL; the name is then invalid. */
  const char *esc = HEAD "\"nodes\": [{\"name\": \"y\\\\u0000\", \"op\": \"neg\", "
                         "\"inputs\": [\"x\"]}]}";
  CHECK(cm_graph_from_json(esc, strlen(esc), &g, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[0].name: invalid name \"y\\x5cu0000\"");
  /* A UTF-8 byte-order mark before the document is skipped. */
  const char *bom = "\xef\xbb\xbf" HEAD "\"outputs\": [\"x\"]}";
  CHECK_MSG(cm_graph_from_json(bom, strlen(bom), &g, &err) == CM_OK, "%s", err.msg);
  CHECK(g && g->n_nodes == 1);
  cm_graph_free(g);
  g = NULL;
  /* Names with control characters are escaped, keeping the message on one line. */
  const char *ctl = "{\"format\": \"a\\nb\"}";
  CHECK(cm_graph_from_json(ctl, strlen(ctl), &g, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "got \"a\\x0ab\"");
}

static void test_files(void) {
  char dir[] = "/tmp/cmaec_json_XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[256], text_path[256];
  snprintf(path, sizeof path, "%s/g.json", dir);
  snprintf(text_path, sizeof text_path, "%s/g.txt", dir);
  cm_graph *g = build_every_op();
  cm_err err = {0};
  CHECK_MSG(cm_graph_save_json(g, path, &err) == CM_OK, "%s", err.msg);
  cm_graph *back = NULL;
  CHECK_MSG(cm_graph_load(path, &back, &err) == CM_OK, "%s", err.msg);
  if (back) check_same_graph(g, back);
  cm_graph_free(back);
  back = NULL;

  /* Text IR is recognized by content. */
  FILE *f = fopen(text_path, "w");
  CHECK(f != NULL);
  if (f) {
    CHECK(cm_graph_print(g, f, &err) == CM_OK);
    fclose(f);
    cm_status st = cm_graph_load(text_path, &back, &err);
    CHECK_MSG(st == CM_OK, "%s", err.msg);
    if (back) check_same_graph(g, back);
    cm_graph_free(back);
  }

  /* A byte-order mark before '{' is still graph JSON (not text IR). */
  f = fopen(path, "w");
  if (f) {
    fputs("\xef\xbb\xbf\n{\"format\": \"cmaec.graph/1\", \"inputs\": [{\"name\": \"x\", "
          "\"dtype\": \"f32\", \"shape\": [2]}], \"outputs\": [\"x\"]}\n",
          f);
    fclose(f);
  }
  back = NULL;
  CHECK_MSG(cm_graph_load(path, &back, &err) == CM_OK, "%s", err.msg);
  CHECK(back && back->n_nodes == 1 && back->n_outputs == 1);
  cm_graph_free(back);
  back = NULL;

  /* Errors carry the path. */
  const char *bad = "{\"format\": \"cmaec.graph/1\", \"outputs\": [\"nothing\"]}";
  f = fopen(path, "w");
  if (f) {
    fputs(bad, f);
    fclose(f);
  }
  back = NULL;
  CHECK(cm_graph_load(path, &back, &err) == CM_EINVALID);
  CHECK(back == NULL);
  CHECK(strncmp(err.msg, path, strlen(path)) == 0);
  CHECK_STR_CONTAINS(err.msg, ": outputs[0]: no value named \"nothing\"");

  char *data = NULL;
  size_t len = 1;
  CHECK(cm_read_file("/nonexistent/cmaec.json", &data, &len, &err) == CM_EINVALID);
  CHECK(data == NULL && len == 0);
  CHECK_STR_CONTAINS(err.msg, "/nonexistent/cmaec.json: cannot open");
  CHECK(cm_read_file(path, &data, &len, &err) == CM_OK);
  CHECK(len == strlen(bad) && data && data[len] == '\0' && data[0] == '{');
  free(data);

  unlink(path);
  unlink(text_path);
  rmdir(dir);
  cm_graph_free(g);
}

static double next_uniform(test_rng *r) {
  return test_uniform(r) * 2.0 - 1.0;
}

/* examples/mlp.json computes what it says: relu(x W1^T + b1) W2^T + b2 and
 * loss = sum((y - target)^2) / 8, checked against plain loops. */
static void test_mlp_example_values(void) {
  cm_graph *g = NULL;
  cm_err err = {0};
  if (cm_graph_load("examples/mlp.json", &g, &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    return;
  }
  test_rng rng = {12345};
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof(cm_tensor));
  const cm_tensor **srcp = calloc((size_t)g->n_nodes, sizeof(cm_tensor *));
  cm_tensor *values = calloc((size_t)g->n_nodes, sizeof(cm_tensor));
  for (int i = 0; i < g->n_nodes; i++) {
    cm_op op = g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&src[i], g->nodes[i].type, &err) == CM_OK);
    for (int64_t k = 0; k < cm_type_numel(&g->nodes[i].type); k++)
      cm_tensor_set_f64(&src[i], k, next_uniform(&rng));
    srcp[i] = &src[i];
  }
  cm_eval_opts opts = {CM_PRECISION_F64};
  cm_status st = cm_eval(g, srcp, values, &opts, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st == CM_OK) {
    const cm_tensor *x = &src[cm_graph_find(g, "x")], *t = &src[cm_graph_find(g, "target")];
    const cm_tensor *w1 = &src[cm_graph_find(g, "fc1.weight")];
    const cm_tensor *b1 = &src[cm_graph_find(g, "fc1.bias")];
    const cm_tensor *w2 = &src[cm_graph_find(g, "fc2.weight")];
    const cm_tensor *b2 = &src[cm_graph_find(g, "fc2.bias")];
    double loss = 0;
    for (int n = 0; n < 4; n++) {
      double h[5];
      for (int j = 0; j < 5; j++) {
        double acc = cm_tensor_get_f64(b1, j);
        for (int k = 0; k < 3; k++)
          acc += cm_tensor_get_f64(x, n * 3 + k) * cm_tensor_get_f64(w1, j * 3 + k);
        h[j] = acc > 0 ? acc : 0;
      }
      for (int o = 0; o < 2; o++) {
        double y = cm_tensor_get_f64(b2, o);
        for (int j = 0; j < 5; j++) y += h[j] * cm_tensor_get_f64(w2, o * 5 + j);
        CHECK_NEAR(cm_tensor_get_f64(&values[cm_graph_find(g, "y")], n * 2 + o), y, 1e-6);
        double d = y - cm_tensor_get_f64(t, n * 2 + o);
        loss += d * d;
      }
    }
    CHECK_NEAR(cm_tensor_get_f64(&values[cm_graph_find(g, "loss")], 0), loss / 8, 1e-6);
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&values[i]);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  free(src);
  free(srcp);
  free(values);
  cm_graph_free(g);
}

/* examples/ops_tour.json: a few of its values by hand. */
static void test_ops_tour_values(void) {
  cm_graph *g = NULL;
  cm_err err = {0};
  if (cm_graph_load("examples/ops_tour.json", &g, &err) != CM_OK) {
    CHECK_MSG(false, "%s", err.msg);
    return;
  }
  test_rng rng = {777};
  cm_tensor *src = calloc((size_t)g->n_nodes, sizeof(cm_tensor));
  const cm_tensor **srcp = calloc((size_t)g->n_nodes, sizeof(cm_tensor *));
  cm_tensor *v = calloc((size_t)g->n_nodes, sizeof(cm_tensor));
  for (int i = 0; i < g->n_nodes; i++) {
    cm_op op = g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&src[i], g->nodes[i].type, &err) == CM_OK);
    bool is_index = strcmp(g->nodes[i].name, "idx") == 0;
    for (int64_t k = 0; k < cm_type_numel(&g->nodes[i].type); k++) {
      double r = next_uniform(&rng);
      cm_tensor_set_f64(&src[i], k, is_index ? (double)(int)((r + 1) * 1.5) : r);
    }
    srcp[i] = &src[i];
  }
  cm_eval_opts opts = {CM_PRECISION_F64};
  cm_status st = cm_eval(g, srcp, v, &opts, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st == CM_OK) {
#define VAL(name, i) cm_tensor_get_f64(&v[cm_graph_find(g, name)], i)
#define SRC(name, i) cm_tensor_get_f64(&src[cm_graph_find(g, name)], i)
    for (int r = 0; r < 3; r++)
      for (int c = 0; c < 4; c++) {
        double want = (r == 0 || c == 3) ? -1.0 : SRC("x", (r - 1) * 3 + c);
        CHECK_NEAR(VAL("padded", r * 4 + c), want, 1e-12);
      }
    for (int n = 0; n < 2; n++)
      for (int i = 0; i < 3; i++) {
        int64_t j = cm_tensor_get_i64(&src[cm_graph_find(g, "idx")], n * 3 + i);
        double x = SRC("x", n * 3 + i);
        /* x_t[n,i] = x_3x2[i,n] = x[(2i+n)/3, (2i+n)%3] */
        double xt = SRC("x", 2 * i + n);
        double want = (x > 0 ? x : xt) + SRC("x", n * 3 + j) + i;
        CHECK_NEAR(VAL("mix2", n * 3 + i), want, 1e-12);
      }
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 2; j++) {
        double d0 = SRC("img", i * 3 + j) - SRC("img", (i + 1) * 3 + j + 1);
        double d1 = 0.5 * (SRC("img", 9 + i * 3 + j) + SRC("img", 9 + i * 3 + j + 1) +
                           SRC("img", 9 + (i + 1) * 3 + j) + SRC("img", 9 + (i + 1) * 3 + j + 1));
        CHECK_NEAR(VAL("conv", i * 2 + j), d0, 1e-12);
        CHECK_NEAR(VAL("conv", 4 + i * 2 + j), d1, 1e-12);
      }
    for (int n = 0; n < 2; n++) {
      /* joined = x | x[:,1:3] | x[:,0:3:2]: its max is the max of row n of x. */
      double m = fmax(fmax(SRC("x", n * 3), SRC("x", n * 3 + 1)), SRC("x", n * 3 + 2));
      CHECK_NEAR(VAL("row_max", n), m, 1e-12);
    }
    CHECK_NEAR(VAL("count_call", 0), SRC("calls", 0) + 1, 1e-12);
#undef VAL
#undef SRC
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&v[i]);
  }
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&src[i]);
  free(src);
  free(srcp);
  free(v);
  cm_graph_free(g);
}

/* The complete example in docs/graph-format.md is valid. */
static void test_doc_example(void) {
  char *doc = NULL;
  size_t len = 0;
  cm_err err = {0};
  CHECK_MSG(cm_read_file("docs/graph-format.md", &doc, &len, &err) == CM_OK, "%s", err.msg);
  if (!doc) return;
  char *start = strstr(doc, "```json\n");
  char *end = start ? strstr(start + 8, "```") : NULL;
  CHECK(start && end);
  if (start && end) {
    cm_graph *g = NULL;
    CHECK_MSG(cm_graph_from_json(start + 8, (size_t)(end - start - 8), &g, &err) == CM_OK, "%s",
              err.msg);
    CHECK(g && g->n_nodes == 10 && g->n_outputs == 2);
    cm_graph_free(g);
  }
  free(doc);
}

TEST_MAIN(TEST(test_round_trip_every_op), TEST(test_numbers_are_shortest),
          TEST(test_round_trip_random), TEST(test_examples), TEST(test_topological_sort),
          TEST(test_errors), TEST(test_files), TEST(test_mlp_example_values),
          TEST(test_ops_tour_values), TEST(test_doc_example))
