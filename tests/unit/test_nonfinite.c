/* cm_program_first_nonfinite: the first non-finite value of a run in
 * execution order — a source, else the first kernel output — with the node
 * that holds it and its producing op; nothing when every value is finite. */
#include "../test.h"
#include "runtime/runtime.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* x -> a = x*x (overflows for |x| > 1.8e19) -> b = a + 1, reduced to s = sum(b),
 * then t = exp(s) (overflows for s > 88); w a param added to x first. */
static const char graph_text[] = "x: f32[4,8] = input\n"
                                 "w: f32[8] = param\n"
                                 "m: f32[4,8] = state\n"
                                 "xb: f32[4,8] = broadcast(w) {shape=[4,8]}\n"
                                 "xw: f32[4,8] = add(x, xb)\n"
                                 "a: f32[4,8] = mul(xw, xw)\n"
                                 "b: f32[4,8] = add(a, a)\n"
                                 "s: f32[4] = reduce_sum(b) {axes=[1]}\n"
                                 "t: f32[4] = exp(s)\n"
                                 "m.new: f32[4,8] = assign(m, b)\n"
                                 "outputs(a, t, m.new)\n";

typedef struct fixture {
  cm_graph *g;
  cm_program *pr;
  cm_tensor src[16];
  cm_tensor *bound[16];
} fixture;

static bool setup(fixture *f) {
  memset(f, 0, sizeof *f);
  cm_err err = {0};
  CHECK_MSG(cm_graph_parse(graph_text, &f->g, &err) == CM_OK, "%s", err.msg);
  if (!f->g) return false;
  CHECK(f->g->n_nodes <= 16);
  cm_compile_opts o = {.threads = 1, .cache_dir = ""}; /* no object cache */
  CHECK_MSG(cm_compile(f->g, NULL, &o, &f->pr, &err) == CM_OK, "%s", err.msg);
  if (!f->pr) return false;
  for (int i = 0; i < f->g->n_nodes; i++) {
    cm_op op = f->g->nodes[i].op;
    if (op != CM_OP_INPUT && op != CM_OP_PARAM && op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&f->src[i], f->g->nodes[i].type, &err) == CM_OK);
    f->bound[i] = &f->src[i];
  }
  return true;
}

static void teardown(fixture *f) {
  for (int i = 0; i < 16; i++) cm_tensor_free(&f->src[i]);
  cm_program_free(f->pr);
  cm_graph_free(f->g);
}

static cm_tensor *source(fixture *f, const char *name) {
  int id = cm_graph_find(f->g, name);
  CHECK(id >= 0);
  return id >= 0 ? &f->src[id] : NULL;
}

static void fill(cm_tensor *t, double v) {
  for (int64_t i = 0; i < cm_type_numel(&t->type); i++) cm_tensor_set_f64(t, i, v);
}

static void expect(fixture *f, const char *tensor, const char *op) {
  cm_nonfinite nf;
  cm_err err = {0};
  cm_status st = cm_program_first_nonfinite(f->pr, f->bound, &nf, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (!tensor) {
    CHECK_MSG(!nf.found, "all finite, but %s (%s) was reported", nf.tensor, nf.op);
    return;
  }
  CHECK_MSG(nf.found, "expected %s (%s), found nothing", tensor, op);
  if (!nf.found) return;
  CHECK_MSG(strcmp(nf.tensor, tensor) == 0 && strcmp(nf.op, op) == 0,
            "expected %s (%s), got %s (%s) in kernel %s", tensor, op, nf.tensor, nf.op, nf.kernel);
  CHECK_MSG(!isfinite(nf.value), "%s: value %g", nf.tensor, nf.value);
}

static void test_first_nonfinite_in_execution_order(void) {
  fixture f;
  if (!setup(&f)) {
    teardown(&f);
    return;
  }
  /* every value finite */
  fill(source(&f, "x"), 0.5);
  fill(source(&f, "w"), 0.25);
  expect(&f, NULL, NULL);
  /* s = 8 x 2 x 9 = 144 overflows exp (f32: above 88.7): the first non-finite value is t */
  fill(source(&f, "x"), 2.75);
  expect(&f, "t", "exp");
  /* xw = 1e20: a = 1e40 is inf, and so b, s, t and the state after it */
  fill(source(&f, "x"), 1e20);
  expect(&f, "a", "mul");
  /* a NaN in a source comes first of all, whatever follows it */
  fill(source(&f, "x"), 0.5);
  cm_tensor_set_f64(source(&f, "w"), 3, NAN);
  expect(&f, "w", "param");
  /* the state written by the last run (b, finite again) */
  fill(source(&f, "w"), 0.25);
  fill(source(&f, "m"), INFINITY);
  expect(&f, "m", "state");
  teardown(&f);
}

static void test_arguments(void) {
  fixture f;
  if (!setup(&f)) {
    teardown(&f);
    return;
  }
  cm_nonfinite nf;
  cm_err err = {0};
  cm_tensor *x = f.bound[cm_graph_find(f.g, "x")];
  f.bound[cm_graph_find(f.g, "x")] = NULL;
  CHECK(cm_program_first_nonfinite(f.pr, f.bound, &nf, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "source \"x\"");
  f.bound[cm_graph_find(f.g, "x")] = x;
  teardown(&f);
}

TEST_MAIN(TEST(test_first_nonfinite_in_execution_order), TEST(test_arguments))
