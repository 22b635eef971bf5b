/* Types, 16-bit float conversions, the builder, type inference and the verifier. */
#include "../test.h"
#include "ir/ir.h"

#include <stdint.h>

static void test_dtypes(void) {
  static const char *names[] = {"f32", "f64", "bf16", "f16", "i32", "i64", "bool"};
  static const size_t sizes[] = {4, 8, 2, 2, 4, 8, 1};
  for (int i = 0; i < CM_DTYPE_COUNT; i++) {
    cm_dtype dt;
    CHECK(strcmp(cm_dtype_name((cm_dtype)i), names[i]) == 0);
    CHECK(cm_dtype_from_name(names[i], &dt) && dt == (cm_dtype)i);
    CHECK(cm_dtype_size((cm_dtype)i) == sizes[i]);
  }
  cm_dtype dt;
  CHECK(!cm_dtype_from_name("float32", &dt));
  CHECK(cm_dtype_is_float(CM_BF16) && !cm_dtype_is_float(CM_I32) && cm_dtype_is_int(CM_I64));
  int64_t dims[3] = {4, 1, 7};
  cm_type t = cm_type_make(CM_F16, 3, dims);
  char buf[64];
  CHECK(strcmp(cm_type_str(&t, buf, sizeof buf), "f16[4,1,7]") == 0);
  CHECK(cm_type_numel(&t) == 28 && cm_type_nbytes(&t) == 56);
  int64_t strides[CM_MAX_RANK];
  cm_type_strides(&t, strides);
  CHECK(strides[0] == 7 && strides[1] == 7 && strides[2] == 1);
  cm_type s = cm_type_make(CM_BOOL, 0, NULL);
  CHECK(strcmp(cm_type_str(&s, buf, sizeof buf), "bool[]") == 0 && cm_type_numel(&s) == 1);
}

static void test_bf16(void) {
  CHECK(cm_f32_to_bf16(1.0f) == 0x3f80);
  CHECK(cm_f32_to_bf16(-2.0f) == 0xc000);
  CHECK(cm_bf16_to_f32(0x3f80) == 1.0f);
  /* 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1. */
  CHECK(cm_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80);
  CHECK(cm_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);
  CHECK(cm_f64_to_bf16(1.0 + 0x1p-8) == 0x3f80);
  /* Just above the tie in f64 must round up (a double rounding through f32 would not). */
  CHECK(cm_f64_to_bf16(1.0 + 0x1p-8 + 0x1p-40) == 0x3f81);
  CHECK(cm_f64_to_bf16(INFINITY) == 0x7f80 && cm_f64_to_bf16(-INFINITY) == 0xff80);
  CHECK(isnan(cm_bf16_to_f32(cm_f64_to_bf16(NAN))));
  CHECK(cm_f64_to_bf16(1e39) == 0x7f80); /* overflow */
  /* Every non-NaN bf16 survives bf16 -> f32 -> bf16 and bf16 -> f64 -> bf16. */
  int bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = cm_bf16_to_f32((uint16_t)h);
    if (isnan(f)) continue;
    if (cm_f32_to_bf16(f) != h || cm_f64_to_bf16((double)f) != h) bad++;
    if (cm_round_to_dtype((double)f, CM_BF16) != (double)f) bad++;
  }
  CHECK_MSG(bad == 0, "%d bf16 patterns do not round trip", bad);
}

static void test_f16(void) {
  CHECK(cm_f64_to_f16(1.0) == 0x3c00);
  CHECK(cm_f64_to_f16(65504.0) == 0x7bff);
  CHECK(cm_f64_to_f16(65519.99) == 0x7bff);
  CHECK(cm_f64_to_f16(65520.0) == 0x7c00); /* the tie rounds to even: infinity */
  CHECK(cm_f64_to_f16(0x1p-24) == 0x0001); /* smallest subnormal */
  CHECK(cm_f64_to_f16(0x1p-25) == 0x0000); /* tie with 0 rounds to even 0 */
  CHECK(cm_f64_to_f16(0x1p-25 + 0x1p-40) == 0x0001);
  CHECK(cm_f64_to_f16(-0.0) == 0x8000);
  CHECK(cm_f64_to_f16(1.0 / 3.0) == 0x3555);
  CHECK(cm_f16_to_f32(0x3555) == (float)0x1.554p-2);
  CHECK(cm_f16_to_f32(0xfc00) == -INFINITY);
  CHECK(isnan(cm_f16_to_f32(cm_f64_to_f16(NAN))));
  int bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = cm_f16_to_f32((uint16_t)h);
    if (isnan(f)) continue;
    if (cm_f64_to_f16((double)f) != h) bad++;
    if (cm_round_to_dtype((double)f, CM_F16) != (double)f) bad++;
  }
  CHECK_MSG(bad == 0, "%d f16 patterns do not round trip", bad);
}

static void test_round_to_dtype(void) {
  CHECK(cm_round_to_dtype(1.0 + 0x1p-30, CM_F32) == 1.0);
  CHECK(cm_round_to_dtype(1.0 + 0x1p-30, CM_F64) == 1.0 + 0x1p-30);
  CHECK(cm_round_to_dtype(-2.7, CM_I32) == -2.0);
  CHECK(cm_round_to_dtype(NAN, CM_I64) == 0.0);
  CHECK(cm_round_to_dtype(1e20, CM_I32) == 2147483647.0);
  CHECK(cm_round_to_dtype(-0.5, CM_BOOL) == 1.0);
  cm_tensor t;
  int64_t d = 3;
  CHECK(cm_tensor_alloc(&t, cm_type_make(CM_I32, 1, &d), NULL) == CM_OK);
  cm_tensor_set_i64(&t, 0, (int64_t)INT32_MAX + 1); /* wraps */
  CHECK(cm_tensor_get_i64(&t, 0) == INT32_MIN);
  cm_tensor_set_f64(&t, 1, -7.9);
  CHECK(cm_tensor_get_i64(&t, 1) == -7);
  cm_tensor_free(&t);
}

static void test_op_table(void) {
  cm_op op;
  CHECK(cm_op_from_name("matmul", &op) && op == CM_OP_MATMUL);
  CHECK(!cm_op_from_name("conv3d", &op));
  CHECK(cm_op_get_info(CM_OP_CONCAT)->arity == -1);
  CHECK(cm_op_get_info(CM_OP_SELECT)->arity == 3);
  CHECK(cm_op_get_info(CM_OP_REDUCE_MAX)->category == CM_CAT_REDUCE);
  CHECK(cm_op_get_info(CM_OP_ALL_GATHER)->category == CM_CAT_COLLECTIVE);
  CHECK(cm_op_get_info(CM_OP_ASSIGN)->category == CM_CAT_UPDATE);
  CHECK(strcmp(cm_op_name(CM_OP_SCATTER_ADD), "scatter_add") == 0);
  /* Every op has a distinct name that maps back to it. */
  for (int i = 0; i < CM_OP_COUNT; i++)
    CHECK(cm_op_from_name(cm_op_name((cm_op)i), &op) && (int)op == i);
  CHECK(cm_op_get_info(CM_OP_COUNT) == NULL);
}

/* Builds a node and returns the error message of a failure ("" on success). */
static const char *try_add(cm_graph *g, cm_op op, const char *name, const int *in, int n,
                           const cm_attrs *a) {
  static cm_err err;
  memset(&err, 0, sizeof err);
  int id = cm_graph_add(g, op, name, in, n, a, &err);
  if (id >= 0) return "";
  CHECK(err.status == CM_EINVALID);
  CHECK(strchr(err.msg, '\n') == NULL);
  return err.msg;
}

/* Matmul and elementwise inference and their errors. */
static void infer_binary(cm_graph *g, int a, int b, int c, int ia) {
  int in[3] = {a, b};
  CHECK_STR_CONTAINS(try_add(g, CM_OP_MATMUL, "qk", in, 2, NULL),
                     "\"qk\" (matmul): f32[4,8] x f32[16,4]: inner dimensions 8 and 16 differ");
  int mm = cm_matmul(g, a, c, false, false, "mm");
  CHECK(mm >= 0 && g->nodes[mm].type.dims[0] == 4 && g->nodes[mm].type.dims[1] == 4);
  int mt = cm_matmul(g, a, b, true, true, "mt"); /* [8,4] x [4,16] */
  CHECK(mt >= 0 && g->nodes[mt].type.dims[0] == 8 && g->nodes[mt].type.dims[1] == 16);

  in[0] = a, in[1] = c;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_ADD, "s", in, 2, NULL), "f32[4,8] and f32[8,4]: shapes");
  in[1] = ia;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_ADD, "s", in, 2, NULL), "dtypes differ");
  CHECK_STR_CONTAINS(try_add(g, CM_OP_EXP, "e", &ia, 1, NULL), "dtype i32 is not accepted");
  CHECK_STR_CONTAINS(try_add(g, CM_OP_ADD, "s", in, 1, NULL), "takes 2 inputs, got 1");
  in[0] = a, in[1] = a;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_ADD, "a", in, 2, NULL), "\"a\" (add): duplicate name");
  CHECK_STR_CONTAINS(try_add(g, CM_OP_ADD, "bad name", in, 2, NULL), "invalid name");
  int lt = cm_binary(g, CM_OP_LT, a, a, "lt");
  CHECK(lt >= 0 && g->nodes[lt].type.dtype == CM_BOOL);
  int sel = cm_select(g, lt, a, a, "sel");
  CHECK(sel >= 0);
  in[0] = a, in[1] = a, in[2] = a;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_SELECT, "sel2", in, 3, NULL),
                     "condition f32[4,8] is not bool");
}

/* Reductions, reshape and permute. */
static void infer_shapes(cm_graph *g, int a) {
  cm_attrs at;
  cm_attrs_default(&at);
  at.n_axes = 2, at.axes[0] = -1, at.axes[1] = 0;
  int r = cm_graph_add(g, CM_OP_REDUCE_SUM, "r", &a, 1, &at, NULL);
  CHECK(r >= 0 && g->nodes[r].type.rank == 0);
  CHECK(g->nodes[r].attrs.axes[0] == 0 && g->nodes[r].attrs.axes[1] == 1); /* normalized, sorted */
  at.keepdims = true;
  int rk = cm_graph_add(g, CM_OP_REDUCE_MAX, "rk", &a, 1, &at, NULL);
  CHECK(rk >= 0 && g->nodes[rk].type.rank == 2 && g->nodes[rk].type.dims[1] == 1);
  at.axes[0] = 5;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_REDUCE_SUM, "r2", &a, 1, &at), "axis 5 outside [0, 2)");
  at.axes[0] = 0;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_REDUCE_SUM, "r2", &a, 1, &at), "axis 0 listed twice");

  cm_attrs_default(&at);
  at.rank = 3, at.shape[0] = 2, at.shape[1] = 4, at.shape[2] = 4;
  CHECK(cm_graph_add(g, CM_OP_RESHAPE, "rs", &a, 1, &at, NULL) >= 0);
  at.shape[2] = 5;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_RESHAPE, "rs2", &a, 1, &at), "element counts 32 and 40");
  at.rank = 7;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_RESHAPE, "rs2", &a, 1, &at), "rank 7");
  at.rank = 2, at.shape[0] = 0;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_RESHAPE, "rs2", &a, 1, &at), "not >= 1");
  at.shape[0] = (int64_t)1 << 39, at.shape[1] = 4;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_RESHAPE, "rs2", &a, 1, &at), "2^40");

  int perm[2] = {1, 0};
  int p = cm_permute(g, a, perm, "p");
  CHECK(p >= 0 && g->nodes[p].type.dims[0] == 8);
  cm_attrs_default(&at);
  at.perm[0] = 0, at.perm[1] = 0;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_PERMUTE, "p2", &a, 1, &at), "not a permutation");
}

/* Broadcast, slice, concat, pad, gather and scatter. */
static void infer_movement(cm_graph *g, int a, int c) {
  cm_attrs at;
  int in[3];
  int64_t one8[2] = {1, 8}, d348[3] = {3, 4, 8};
  int row = cm_input(g, "row", CM_F32, 2, one8);
  int bc = cm_broadcast(g, row, 3, d348, "bc");
  CHECK(bc >= 0 && g->nodes[bc].type.rank == 3);
  cm_attrs_default(&at);
  at.rank = 2, at.shape[0] = 4, at.shape[1] = 9;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_BROADCAST, "bc2", &row, 1, &at),
                     "f32[1,8] to f32[4,9]: dimension 1 is 8, neither 1 nor 9");

  int64_t s0[2] = {1, 0}, s1[2] = {4, 8}, st[2] = {2, 3};
  int sl = cm_slice(g, a, s0, s1, st, "sl");
  CHECK(sl >= 0 && g->nodes[sl].type.dims[0] == 2 && g->nodes[sl].type.dims[1] == 3);
  cm_attrs_default(&at);
  at.stop[0] = 5, at.stop[1] = 8;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_SLICE, "sl2", &a, 1, &at), "stop 5 <= 4");
  at.stop[0] = 4, at.step[1] = 0;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_SLICE, "sl2", &a, 1, &at), "step 0");

  int cat_in[3] = {a, a, a};
  int cat = cm_concat(g, 3, cat_in, 1, "cat");
  CHECK(cat >= 0 && g->nodes[cat].type.dims[1] == 24);
  cat_in[1] = c;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_CONCAT, "cat2", cat_in, 3, &(cm_attrs){.axis = 1}),
                     "input 1 is f32[8,4]");

  int64_t lo[2] = {1, 0}, hi[2] = {0, 2};
  int pd = cm_pad(g, a, lo, hi, 0.5, "pd");
  CHECK(pd >= 0 && g->nodes[pd].type.dims[0] == 5 && g->nodes[pd].type.dims[1] == 10);

  int64_t d3[3] = {2, 5, 3}, i3[3] = {2, 7, 3};
  int x3 = cm_input(g, "x3", CM_F32, 3, d3);
  int idx = cm_input(g, "idx", CM_I64, 3, i3);
  int ga = cm_gather(g, x3, idx, 1, "ga");
  CHECK(ga >= 0 && g->nodes[ga].type.dims[1] == 7 && g->nodes[ga].type.dtype == CM_F32);
  int upd = cm_input(g, "upd", CM_F32, 3, i3);
  int sc = cm_scatter_add(g, x3, idx, upd, 1, "sc");
  CHECK(sc >= 0 && cm_type_equal(&g->nodes[sc].type, &g->nodes[x3].type));
  in[0] = x3, in[1] = idx;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_GATHER, "ga2", in, 2, &(cm_attrs){.axis = 0}),
                     "dimension 1 differs");
  in[1] = x3;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_GATHER, "ga2", in, 2, &(cm_attrs){.axis = 1}),
                     "not an integer tensor");
}

/* Grouped conv2d and its gradients. */
static void infer_conv(cm_graph *g) {
  cm_attrs at;
  int in[3];
  int64_t xd[4] = {2, 6, 9, 9}, wd[4] = {4, 3, 3, 3};
  int x = cm_input(g, "x", CM_F32, 4, xd);
  int w = cm_input(g, "w", CM_F32, 4, wd);
  int stride[2] = {2, 2}, pad[2] = {1, 1};
  int cv = cm_conv2d(g, x, w, stride, pad, NULL, 2, "cv");
  CHECK(cv >= 0 && g->nodes[cv].type.dims[1] == 4 && g->nodes[cv].type.dims[2] == 5);
  CHECK(cm_conv2d(g, x, w, stride, pad, NULL, 4, "cv2") < 0);
  CHECK_STR_CONTAINS(cm_graph_error(g), "groups 4 must divide channels 6 and outputs 4");
  g->error.status = CM_OK; /* clear the sticky error for the rest of the test */
  cm_attrs_default(&at);
  at.stride[0] = at.stride[1] = 2, at.padding[0] = at.padding[1] = 1, at.groups = 2;
  at.rank = 4;
  memcpy(at.shape, xd, sizeof xd);
  in[0] = cv, in[1] = w;
  int gi = cm_graph_add(g, CM_OP_CONV2D_GRAD_INPUT, "gi", in, 2, &at, NULL);
  CHECK(gi >= 0 && cm_type_equal(&g->nodes[gi].type, &g->nodes[x].type));
  memcpy(at.shape, wd, sizeof wd);
  in[0] = x, in[1] = cv;
  int gw = cm_graph_add(g, CM_OP_CONV2D_GRAD_WEIGHT, "gw", in, 2, &at, NULL);
  CHECK(gw >= 0 && cm_type_equal(&g->nodes[gw].type, &g->nodes[w].type));
  in[1] = x;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_CONV2D_GRAD_WEIGHT, "gw2", in, 2, &at),
                     "does not match the conv2d output");
}

static void test_inference(void) {
  cm_graph *g = cm_graph_new();
  int64_t d48[2] = {4, 8}, d164[2] = {16, 4}, d84[2] = {8, 4};
  int a = cm_input(g, "a", CM_F32, 2, d48);
  int b = cm_input(g, "b", CM_F32, 2, d164);
  int c = cm_input(g, "c", CM_F32, 2, d84);
  int ia = cm_input(g, "ia", CM_I32, 2, d48);
  CHECK(cm_graph_error(g) == NULL);
  infer_binary(g, a, b, c, ia);
  infer_shapes(g, a);
  infer_movement(g, a, c);
  infer_conv(g);

  int in[3];
  int ag = cm_all_gather(g, a, 0, 4, "ag");
  CHECK(ag >= 0 && g->nodes[ag].type.dims[0] == 16);
  int ar = cm_all_reduce(g, a, CM_MODE_MEAN, 2, "ar");
  CHECK(ar >= 0);

  in[0] = a, in[1] = a;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_ASSIGN, "as", in, 2, NULL), "not a param or state");
  cm_init zeros = {CM_INIT_ZEROS, 0, 0};
  int m = cm_state(g, "m", CM_F32, 2, d48, zeros);
  int as = cm_assign(g, m, a, "as");
  CHECK(as >= 0);
  CHECK(cm_graph_error(g) == NULL);
  CHECK(cm_graph_verify(g, NULL) == CM_OK);

  /* A second assign to m is caught by the verifier. */
  cm_err err;
  in[0] = m, in[1] = a;
  CHECK(cm_graph_add(g, CM_OP_ASSIGN, "as2", in, 2, NULL, NULL) >= 0);
  CHECK(cm_graph_verify(g, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "\"as2\" (assign): \"m\" is already assigned by \"as\"");
  cm_graph_free(g);
}

static void test_builder_sticky_and_bcast(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {3, 1}, e[1] = {5};
  int a = cm_input(g, NULL, CM_F32, 2, d);
  int b = cm_input(g, NULL, CM_F32, 1, e);
  CHECK(strcmp(g->nodes[a].name, "%0") == 0 && strcmp(g->nodes[b].name, "%1") == 0);
  CHECK(cm_graph_find(g, "%1") == b && cm_graph_find(g, "nope") == -1);
  int s = cm_binary_bcast(g, CM_OP_MUL, a, b, "s");
  CHECK(s >= 0 && g->nodes[s].type.rank == 2 && g->nodes[s].type.dims[0] == 3 &&
        g->nodes[s].type.dims[1] == 5);
  CHECK(g->n_nodes == 5); /* two broadcast nodes were inserted */
  int bad = cm_binary(g, CM_OP_ADD, a, b, "bad");
  CHECK(bad < 0 && cm_graph_error(g) != NULL);
  /* Sticky: everything after the first error returns -1 and keeps the first message. */
  int after = cm_unary(g, CM_OP_EXP, a, "after");
  CHECK(after < 0);
  CHECK_STR_CONTAINS(cm_graph_error(g), "\"bad\" (add)");
  CHECK(cm_unary(g, CM_OP_EXP, -1, "neg") < 0);
  cm_graph_free(g);
}

static void test_many_nodes_and_clone(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {3};
  int x = cm_input(g, "x", CM_F32, 1, d);
  for (int i = 0; i < 5000; i++) x = cm_unary(g, i % 2 ? CM_OP_NEG : CM_OP_ABS, x, NULL);
  CHECK(cm_graph_error(g) == NULL && g->n_nodes == 5001);
  CHECK(cm_graph_find(g, "%4321") == 4321);
  CHECK(cm_graph_add_output(g, x, NULL) == CM_OK);
  cm_graph *c = cm_graph_clone(g);
  CHECK(c && c->n_nodes == g->n_nodes && c->n_outputs == 1 && c->outputs[0] == x);
  CHECK(c && cm_graph_verify(c, NULL) == CM_OK);
  cm_graph_free(c);
  /* A corrupted type is caught by the verifier with the node named. */
  g->nodes[17].type.dims[0] = 4;
  cm_err err;
  CHECK(cm_graph_verify(g, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "nodes[17] \"%17\" (abs): type is f32[4] but inference gives f32[3]");
  cm_graph_free(g);
}

static void test_const_data(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[2] = {2, 2};
  double v[4] = {1, 2, 3, 4.5};
  int k = cm_const_data(g, "k", CM_F32, 2, d, v);
  CHECK(k >= 0 && g->nodes[k].attrs.n_data == 4 && g->nodes[k].attrs.data != v);
  CHECK(g->nodes[k].attrs.data && g->nodes[k].attrs.data[3] == 4.5);
  cm_attrs a;
  cm_attrs_default(&a);
  a.rank = 2, a.shape[0] = 2, a.shape[1] = 3, a.data = v, a.n_data = 4;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_CONST, "k2", NULL, 0, &a), "data has 4 elements");
  cm_graph_free(g);
}

/* Initializers are checked where they enter (builder, verifier, every reader) by
 * the rule cm_init_tensor applies at run time: one rule, one message. */
static void test_init_checked(void) {
  int64_t d1[1] = {4}, d2[2] = {4, 8}, d3[3] = {1, 5, 8};
  struct {
    cm_dtype dt;
    int rank;
    const int64_t *dims;
    cm_init init;
    const char *expect; /* NULL: accepted */
  } cases[] = {
      {CM_F32, 1, d1, {CM_INIT_NORMAL, 0, -1}, "init normal: std must be >= 0, got -1"},
      {CM_F32, 1, d1, {CM_INIT_TRUNC_NORMAL, 0, -0.5}, "std must be >= 0, got -0.5"},
      {CM_F32, 1, d1, {CM_INIT_UNIFORM, 1, 0}, "init uniform: low 1 > high 0"},
      {CM_F32, 1, d1, {CM_INIT_SINCOS_2D, 0, 0}, "init sincos_2d needs a float [..., rows, D]"},
      {CM_F32, 3, d3, {CM_INIT_SINCOS_2D, 0, 0}, "needs rows = cls (0) + a square grid"},
      {CM_F32, 3, d3, {CM_INIT_SINCOS_2D, 1, 0}, NULL},
      {CM_F32, 1, d1, {CM_INIT_XAVIER_UNIFORM, 1, 0}, "init xavier_uniform needs rank >= 2"},
      {CM_F32, 2, d2, {CM_INIT_XAVIER_UNIFORM, 1, 0}, NULL},
      {CM_F32, 1, d1, {CM_INIT_TORCH_DEFAULT, 0, 0}, "needs fan_in"},
      {CM_F32, 1, d1, {CM_INIT_TORCH_DEFAULT, 8, 0}, NULL},
      {CM_F32, 1, d1, {CM_INIT_NORMAL, INFINITY, 1}, "parameters must be finite"},
      {CM_I32, 1, d1, {CM_INIT_NORMAL, 0, 1}, "init normal needs a float dtype, got i32[4]"},
      {CM_I32, 1, d1, {CM_INIT_ONES, 0, 0}, NULL},
      {CM_F32, 1, d1, {CM_INIT_NONE, 0, 0}, NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    /* the builder (a state: params must be float) */
    cm_graph *g = cm_graph_new();
    int s = cm_state(g, "s", cases[i].dt, cases[i].rank, cases[i].dims, cases[i].init);
    if (cases[i].expect) {
      CHECK_MSG(s < 0 && cm_graph_error(g), "case %zu accepted", i);
      if (cm_graph_error(g)) {
        CHECK_STR_CONTAINS(cm_graph_error(g), "\"s\" (state): ");
        CHECK_STR_CONTAINS(cm_graph_error(g), cases[i].expect);
      }
    } else {
      CHECK_MSG(s >= 0, "case %zu: %s", i, cm_graph_error(g));
    }
    cm_graph_free(g);
    /* the verifier, on a node changed after it was built */
    g = cm_graph_new();
    int z =
        cm_state(g, "z", cases[i].dt, cases[i].rank, cases[i].dims, (cm_init){CM_INIT_ZEROS, 0, 0});
    CHECK(z >= 0);
    if (z >= 0) g->nodes[z].attrs.init = cases[i].init;
    cm_err err = {0};
    cm_status st = cm_graph_verify(g, &err);
    CHECK_MSG(st == (cases[i].expect ? CM_EINVALID : CM_OK), "case %zu: %s", i, err.msg);
    if (cases[i].expect && st) CHECK_STR_CONTAINS(err.msg, cases[i].expect);
    /* the run-time rule agrees */
    if (cases[i].init.kind != CM_INIT_NONE) {
      cm_tensor t;
      CHECK(cm_tensor_alloc(&t, cm_type_make(cases[i].dt, cases[i].rank, cases[i].dims), NULL) ==
            CM_OK);
      st = cm_init_tensor(&t, &cases[i].init, 0, "s", &err);
      CHECK_MSG(st == (cases[i].expect ? CM_EINVALID : CM_OK), "case %zu: %s", i, err.msg);
      if (cases[i].expect && st) CHECK_STR_CONTAINS(err.msg, cases[i].expect);
      cm_tensor_free(&t);
    }
    cm_graph_free(g);
  }
}

/* Values enter the graph as doubles (const value and data, pad value, init
 * constant); one outside its dtype is an error where it enters, not a value the
 * backends round each their own way (i32 3e9: INT_MAX on the oracle, wrapped on
 * the CPU). Floats take any double (rounded to the dtype, NaN and inf kept). */
static void test_values_checked(void) {
  struct {
    cm_dtype dt;
    double v;
    const char *expect; /* NULL: accepted */
  } cases[] = {
      {CM_I32, 3e9, "value 3000000000 is outside i32"},
      {CM_I32, -2147483649.0, "value -2147483649 is outside i32"},
      {CM_I32, NAN, "value nan is outside i32"},
      {CM_I32, 1.5, "value 1.5 is outside i32"},
      {CM_I32, INFINITY, "value inf is outside i32"},
      {CM_I64, 1e19, "value 1e+19 is outside i64"},
      {CM_I64, 9223372036854775808.0, "e+18 is outside i64"},
      {CM_BOOL, 2, "value 2 is outside bool"},
      {CM_BOOL, 0.5, "value 0.5 is outside bool"},
      {CM_BOOL, -1, "value -1 is outside bool"},
      {CM_I32, 2147483647.0, NULL},
      {CM_I32, -2147483648.0, NULL},
      {CM_I64, -9223372036854775808.0, NULL},
      {CM_I64, 4611686018427387904.0, NULL},
      {CM_BOOL, 1, NULL},
      {CM_BOOL, -0.0, NULL},
      {CM_F32, 1e300, NULL},
      {CM_F16, NAN, NULL},
      {CM_BF16, -INFINITY, NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *want = cases[i].expect;
    int64_t d2[1] = {2};
    /* const value */
    cm_graph *g = cm_graph_new();
    int c = cm_const_fill(g, "c", cases[i].dt, 1, d2, cases[i].v);
    CHECK_MSG((c >= 0) == !want, "case %zu: %s", i, cm_graph_error(g));
    if (want && cm_graph_error(g)) CHECK_STR_CONTAINS(cm_graph_error(g), want);
    cm_graph_free(g);
    /* const data: the element is named */
    g = cm_graph_new();
    double data[2] = {0, cases[i].v};
    c = cm_const_data(g, "c", cases[i].dt, 1, d2, data);
    CHECK_MSG((c >= 0) == !want, "case %zu: %s", i, cm_graph_error(g));
    if (want && cm_graph_error(g)) {
      CHECK_STR_CONTAINS(cm_graph_error(g), "\"c\" (const): data[1]: ");
      CHECK_STR_CONTAINS(cm_graph_error(g), strncmp(want, "value ", 6) ? want : want + 6);
    }
    cm_graph_free(g);
    /* pad value, in the input's dtype */
    g = cm_graph_new();
    int x = cm_input(g, "x", cases[i].dt, 1, d2);
    int64_t lo[1] = {1}, hi[1] = {0};
    int p = cm_pad(g, x, lo, hi, cases[i].v, "p");
    CHECK_MSG((p >= 0) == !want, "case %zu: %s", i, cm_graph_error(g));
    if (want && cm_graph_error(g)) CHECK_STR_CONTAINS(cm_graph_error(g), want);
    cm_graph_free(g);
    /* init constant of a state, here and in cm_init_tensor */
    g = cm_graph_new();
    cm_init init = {CM_INIT_CONSTANT, cases[i].v, 0};
    int st = cm_state(g, "s", cases[i].dt, 1, d2, init);
    CHECK_MSG((st >= 0) == !want, "case %zu: %s", i, cm_graph_error(g));
    if (want && cm_graph_error(g)) {
      CHECK_STR_CONTAINS(cm_graph_error(g), "init constant: ");
      CHECK_STR_CONTAINS(cm_graph_error(g), want);
    }
    cm_graph_free(g);
    /* the verifier, on a value changed after the node was built */
    g = cm_graph_new();
    c = cm_const_fill(g, "c", cases[i].dt, 1, d2, 0);
    if (c >= 0) g->nodes[c].attrs.value = cases[i].v;
    cm_err err = {0};
    CHECK_MSG((cm_graph_verify(g, &err) == CM_OK) == !want, "case %zu: %s", i, err.msg);
    if (want) CHECK_STR_CONTAINS(err.msg, want);
    cm_graph_free(g);
  }
  /* value and data are one or the other */
  cm_graph *g = cm_graph_new();
  cm_attrs a;
  cm_attrs_default(&a);
  double v[2] = {1, 2};
  a.rank = 1, a.shape[0] = 2, a.data = v, a.n_data = 2, a.value = 3;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_CONST, "k", NULL, 0, &a), "\"value\" and \"data\"");
  /* pad sizes past 2^40 are out of range, not "negative" */
  int64_t d1[1] = {2}, lo[1] = {0}, hi[1] = {(int64_t)1 << 53};
  int x = cm_input(g, "x", CM_F32, 1, d1);
  cm_attrs pa;
  cm_attrs_default(&pa);
  pa.lo[0] = lo[0], pa.hi[0] = hi[0];
  const char *msg = try_add(g, CM_OP_PAD, "p", &x, 1, &pa);
  CHECK_STR_CONTAINS(msg, "padding hi 9007199254740992 on axis 0 is out of range [0, 2^40]");
  CHECK(strstr(msg, ">= 0") == NULL);
  pa.hi[0] = -1;
  CHECK_STR_CONTAINS(try_add(g, CM_OP_PAD, "p", &x, 1, &pa),
                     "padding hi -1 on axis 0 is out of range [0, 2^40]");
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_dtypes), TEST(test_bf16), TEST(test_f16), TEST(test_round_to_dtype),
          TEST(test_op_table), TEST(test_inference), TEST(test_builder_sticky_and_bcast),
          TEST(test_many_nodes_and_clone), TEST(test_const_data), TEST(test_init_checked),
          TEST(test_values_checked))
