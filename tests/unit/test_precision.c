/* Mixed-precision training (docs/training.md "Precision"): train.precision and
 * train.loss_scale resolved; the training step cm_train builds (cm_train_build_step)
 * autocast with every param and optimizer state still f32; dynamic loss scaling on the
 * oracle (an overflowing f16 step changes nothing but the scale, normal steps are the
 * unscaled computation within the oracle's bounds, the scale doubles after
 * train.loss_scale_growth good steps); and the bf16 step of the default variant on the
 * CPU backend and the emulated CUDA device, every kernel within its error bound on its
 * own inputs. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../model_step.h"
#include "models/models.h"
#include "runtime/training.h"
#include "tests/emu/emu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static test_rng rng = {0x5ca1ab1e};
static double uniform(void) {
  return test_uniform(&rng);
}

static const bool have_cpu = CMAEC_HAVE_LLVM;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static bool is_contraction(cm_op op) {
  return op == CM_OP_MATMUL || op == CM_OP_CONV2D || op == CM_OP_CONV2D_GRAD_INPUT ||
         op == CM_OP_CONV2D_GRAD_WEIGHT;
}

/* The default variant at batch 2 with extra "key=value" overrides. */
static bool tiny_config(cm_model_config *cfg, const char *const *sets, int n_sets) {
  cm_err err = {0};
  bool ok =
      cm_model_config_load("models/cmae_vit_tiny_fmnist.json", sets, n_sets, cfg, &err) == CM_OK;
  CHECK_MSG(ok, "%s", err.msg);
  cfg->optimizer.batch = 2;
  return ok;
}

static void bind_by_name(const cm_graph *g, const cm_graph *ref, const cm_tensor *const *rsrc,
                         cm_tensor *t, const cm_tensor **src);

/* ---- the keys ---------------------------------------------------------------- */

static void test_keys(void) {
  cm_err err = {0};
  cm_dtype dt = CM_I32;
  CHECK(cm_train_precision_resolve("auto", CM_BACKEND_CPU, &dt, &err) == CM_OK && dt == CM_F32);
  CHECK(cm_train_precision_resolve("auto", CM_BACKEND_REF, &dt, &err) == CM_OK && dt == CM_F32);
  CHECK(cm_train_precision_resolve("auto", CM_BACKEND_CUDA, &dt, &err) == CM_OK && dt == CM_BF16);
  CHECK(cm_train_precision_resolve("f16", CM_BACKEND_CPU, &dt, &err) == CM_OK && dt == CM_F16);
  CHECK(cm_train_precision_resolve("bf16", CM_BACKEND_CPU, &dt, &err) == CM_OK && dt == CM_BF16);
  CHECK(cm_train_precision_resolve("fp8", CM_BACKEND_CPU, &dt, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.precision");

  cm_model_config c;
  cm_model_config_default(&c);
  bool dynamic = true;
  double fixed = -1;
  CHECK(strcmp(c.train.precision, "auto") == 0 && strcmp(c.train.loss_scale, "auto") == 0);
  CHECK(cm_model_config_loss_scale(&c, "f16", &dynamic, &fixed, &err) == CM_OK && dynamic &&
        fixed == 0);
  CHECK(cm_model_config_loss_scale(&c, "bf16", &dynamic, &fixed, &err) == CM_OK && !dynamic &&
        fixed == 0);
  /* a JSON number is kept as its text */
  CHECK(cm_model_config_set(&c, "train.loss_scale=1024", &err) == CM_OK);
  CHECK(strcmp(c.train.loss_scale, "1024") == 0);
  CHECK(cm_model_config_loss_scale(&c, "f16", &dynamic, &fixed, &err) == CM_OK && !dynamic &&
        fixed == 1024);
  CHECK(cm_model_config_set(&c, "train.loss_scale=off", &err) == CM_OK);
  CHECK(cm_model_config_loss_scale(&c, "f16", &dynamic, &fixed, &err) == CM_OK && !dynamic &&
        fixed == 0);
  CHECK(cm_model_config_set(&c, "train.loss_scale=dynamic", &err) == CM_OK);
  CHECK(cm_model_config_loss_scale(&c, "f32", &dynamic, &fixed, &err) == CM_OK && dynamic);
  CHECK(cm_model_config_set(&c, "train.loss_scale=-4", &err) == CM_OK);
  CHECK(cm_model_config_validate(&c, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.loss_scale");
  CHECK(cm_model_config_set(&c, "train.loss_scale=auto", &err) == CM_OK);
  CHECK(cm_model_config_set(&c, "train.precision=f64", &err) == CM_OK);
  CHECK(cm_model_config_validate(&c, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.precision: \"f64\" is not one of auto, f32, bf16, f16");
  CHECK(cm_model_config_set(&c, "train.precision=bf16", &err) == CM_OK);
  CHECK(cm_model_config_set(&c, "train.loss_scale_growth=0", &err) == CM_OK);
  CHECK(cm_model_config_validate(&c, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.loss_scale_growth");
}

/* ---- the autocast step's types ---------------------------------------------- */

/* The bf16 and f16 steps have the f32 step's sources (same names and types: a checkpoint
 * moves between them), all f32, and every contraction of the f32 step became one with
 * low-precision operands. */
static void test_step_types(void) {
  static const char *const f16_sets[] = {"train.precision=f16"};
  cm_model_config cfg;
  if (!tiny_config(&cfg, NULL, 0)) return;
  cm_err err = {0};
  cm_graph *f32 = NULL;
  int n32 = -1;
  CHECK_MSG(cm_train_build_step(&cfg, CM_F32, &f32, &n32, &err) == CM_OK, "%s", err.msg);
  if (!f32) return;
  CHECK(n32 == 0);
  int contractions = 0;
  for (int i = 0; i < f32->n_nodes; i++) contractions += is_contraction(f32->nodes[i].op);
  CHECK(contractions > 50);
  for (int low = 0; low < 2; low++) {
    cm_dtype dt = low ? CM_F16 : CM_BF16;
    cm_model_config c = cfg;
    if (low) CHECK(cm_model_config_set(&c, f16_sets[0], &err) == CM_OK);
    cm_graph *g = NULL;
    int n = -1;
    CHECK_MSG(cm_train_build_step(&c, dt, &g, &n, &err) == CM_OK, "%s", err.msg);
    if (!g) continue;
    CHECK_MSG(n == contractions, "%s: %d contractions rewritten of %d", cm_dtype_name(dt), n,
              contractions);
    int low_ops = 0, sources = 0, sources32 = 0;
    for (int i = 0; i < g->n_nodes; i++) {
      const cm_node *u = &g->nodes[i];
      if (is_contraction(u->op)) {
        bool operands_low =
            g->nodes[u->inputs[0]].type.dtype == dt && g->nodes[u->inputs[1]].type.dtype == dt;
        CHECK_MSG(operands_low, "%s: %s has operands other than %s", cm_dtype_name(dt), u->name,
                  cm_dtype_name(dt));
        low_ops += operands_low;
      }
      if (u->op != CM_OP_PARAM && u->op != CM_OP_STATE) continue;
      sources++;
      CHECK_MSG(u->type.dtype == CM_F32, "%s: %s is %s", cm_dtype_name(dt), u->name,
                cm_dtype_name(u->type.dtype));
      int o = cm_graph_find(f32, u->name);
      bool loss_scaling = !strncmp(u->name, "loss_scale", 10) || !strcmp(u->name, "optimizer.step");
      CHECK_MSG(loss_scaling == (low == 1 && o < 0), "%s: %s", cm_dtype_name(dt), u->name);
      if (o >= 0) CHECK(cm_type_equal(&f32->nodes[o].type, &u->type));
    }
    CHECK(low_ops == contractions);
    for (int i = 0; i < f32->n_nodes; i++)
      sources32 += f32->nodes[i].op == CM_OP_PARAM || f32->nodes[i].op == CM_OP_STATE;
    /* f16 scales its loss dynamically (auto): three states more, and the step count is one */
    CHECK(sources == sources32 + (low ? 3 : 0));
    CHECK((cm_graph_find(g, "step") >= 0) == !low);
    cm_graph_free(g);
  }
  cm_graph_free(f32);
}

/* ---- dynamic loss scaling on the oracle ----------------------------------------- */

/* loss = weight * mean((relu(x W1) W2 - y)^2) (a sum over the 32 elements / 32), x [8, 16], W1 [16,
 * 32], W2 [32, 4]. */
static cm_graph *mlp(double weight) {
  cm_graph *g = cm_graph_new();
  int64_t dx[2] = {8, 16}, d1[2] = {16, 32}, d2[2] = {32, 4}, dy[2] = {8, 4};
  cm_init init = {CM_INIT_NORMAL, 0, 0.3};
  double x[128], y[32];
  for (int i = 0; i < 128; i++) x[i] = uniform() * 2 - 1;
  for (int i = 0; i < 32; i++) y[i] = uniform() * 2 - 1;
  int xi = cm_const_data(g, NULL, CM_F32, 2, dx, x), yi = cm_const_data(g, NULL, CM_F32, 2, dy, y);
  int w1 = cm_param(g, "w1", CM_F32, 2, d1, init), w2 = cm_param(g, "w2", CM_F32, 2, d2, init);
  int h = cm_unary(g, CM_OP_RELU, cm_matmul(g, xi, w1, false, false, NULL), NULL);
  int e = cm_binary(g, CM_OP_SUB, cm_matmul(g, h, w2, false, false, NULL), yi, NULL);
  int axes[2] = {0, 1};
  int l = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, e, e, NULL), 2, axes, false, NULL);
  l = cm_binary(g, CM_OP_MUL, l, cm_const_scalar(g, NULL, CM_F32, weight / 32), "loss");
  cm_graph_add_output(g, l, NULL);
  CHECK(cm_graph_error(g) == NULL);
  return g;
}

/* The f16 training step of mlp(weight) with dynamic loss scaling from init_scale. */
static cm_graph *mlp_step(double weight, double init_scale, bool scaling, cm_dtype low) {
  rng.s = 31; /* the same x and y in every step graph */
  cm_graph *fwd = mlp(weight);
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  oc.loss_scaling = scaling;
  oc.init_loss_scale = init_scale;
  oc.growth_interval = 2;
  cm_graph *sg = NULL;
  cm_train_step_info info;
  cm_err err = {0};
  CHECK_MSG(cm_build_train_step(fwd, cm_graph_find(fwd, "loss"), &oc, &sg, &info, &err) == CM_OK,
            "%s", err.msg);
  if (sg && low != CM_F32) CHECK_MSG(cm_autocast(&sg, low, NULL, &err) == CM_OK, "%s", err.msg);
  cm_graph_free(fwd);
  return sg;
}

/* Sources of a step graph: params from their initializers (seed 3), states as initialized,
 * the scalars. */
static void bind_sources(const cm_graph *g, cm_tensor *t, const cm_tensor **src) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&t[i], n->type, NULL) == CM_OK);
    src[i] = &t[i];
    if (n->op != CM_OP_INPUT) CHECK(cm_init_tensor(&t[i], &n->attrs.init, 3, n->name, NULL) == 0);
    double v = !strcmp(n->name, "lr")      ? 1e-2
               : !strcmp(n->name, "beta1") ? 0.9
               : !strcmp(n->name, "beta2") ? 0.95
                                           : 1; /* step */
    if (n->op == CM_OP_INPUT) cm_tensor_set_f64(&t[i], 0, v);
  }
}

/* One native step of g: values (freed by the caller) and the assigns written back into t. */
static void native_step(const cm_graph *g, cm_tensor *t, const cm_tensor **src, cm_tensor *values) {
  cm_eval_opts eo = {CM_PRECISION_NATIVE};
  cm_err err = {0};
  CHECK_MSG(cm_eval(g, src, values, &eo, &err) == CM_OK, "%s", err.msg);
  for (int i = 0; i < g->n_nodes && values[i].data; i++)
    if (g->nodes[i].op == CM_OP_ASSIGN) {
      cm_tensor *dst = &t[g->nodes[i].inputs[0]];
      memcpy(dst->data, values[i].data, cm_type_nbytes(&dst->type));
    }
}

static double output(const cm_graph *g, const cm_tensor *values, const char *name) {
  int id = cm_graph_find(g, name);
  CHECK_MSG(id >= 0 && values[id].data, "no value %s", name);
  return id >= 0 && values[id].data ? cm_tensor_get_f64(&values[id], 0) : NAN;
}

/* A loss weight that overflows f16 at the initial scale: the step keeps every param,
 * moment and the step count, halves the scale and says it skipped. */
static void test_f16_overflow_skips(void) {
  cm_graph *g = mlp_step(1e4, 65536, true, CM_F16);
  if (!g) return;
  int n = g->n_nodes;
  cm_tensor *t = calloc((size_t)n, sizeof *t), *v = calloc((size_t)n, sizeof *v);
  cm_tensor *before = calloc((size_t)n, sizeof *before);
  const cm_tensor **src = calloc((size_t)n, sizeof *src);
  bind_sources(g, t, src);
  for (int i = 0; i < n; i++)
    if (src[i]) CHECK(cm_tensor_copy(&before[i], src[i], NULL) == CM_OK);
  native_step(g, t, src, v);
  CHECK(output(g, v, "skipped") == 1);
  CHECK(isfinite(output(g, v, "loss")));
  for (int i = 0; i < n; i++) {
    const cm_node *u = &g->nodes[i];
    if (u->op != CM_OP_PARAM && u->op != CM_OP_STATE) continue;
    bool same = memcmp(t[i].data, before[i].data, cm_type_nbytes(&u->type)) == 0;
    if (!strcmp(u->name, "loss_scale"))
      CHECK(cm_tensor_get_f64(&t[i], 0) == 32768);
    else
      CHECK_MSG(same, "%s changed on a skipped step", u->name);
  }
  for (int i = 0; i < n; i++)
    cm_tensor_free(&t[i]), cm_tensor_free(&v[i]), cm_tensor_free(&before[i]);
  free(t), free(v), free(before), free(src);
  cm_graph_free(g);
}

/* Normal f16 steps: within the oracle's bounds of the step graph, whose f64 evaluation is
 * the unscaled computation (a power-of-two scale is exact): the f64 values of the
 * scaled f16 step equal those of the unscaled f32 step to f64 rounding. */
static void test_f16_scaled_step_bounded(void) {
  cm_graph *g = mlp_step(1, 256, true, CM_F16), *ref = mlp_step(1, 256, false, CM_F32);
  if (!g || !ref) return cm_graph_free(g), cm_graph_free(ref);
  int n = g->n_nodes, nr = ref->n_nodes;
  cm_tensor *t = calloc((size_t)n, sizeof *t), *v = calloc((size_t)n, sizeof *v);
  cm_tensor *ov = calloc((size_t)n, sizeof *ov), *ob = calloc((size_t)n, sizeof *ob);
  cm_tensor *rt = calloc((size_t)nr, sizeof *rt), *rv = calloc((size_t)nr, sizeof *rv);
  const cm_tensor **src = calloc((size_t)n, sizeof *src), **rsrc = calloc((size_t)nr, sizeof *rsrc);
  bind_sources(g, t, src);
  bind_sources(ref, rt, rsrc);
  cm_err err = {0};
  CHECK_MSG(cm_eval_bounded(g, src, ov, ob, &err) == CM_OK, "%s", err.msg);
  cm_eval_opts f64 = {CM_PRECISION_F64};
  CHECK_MSG(cm_eval(ref, rsrc, rv, &f64, &err) == CM_OK, "%s", err.msg);
  native_step(g, t, src, v);
  CHECK(output(g, v, "skipped") == 0);
  static const char *const updates[] = {"update/w1", "update/w2", "update/optimizer.exp_avg.w1",
                                        "update/optimizer.exp_avg_sq.w2"};
  for (int k = 0; k < 4; k++) {
    int a = cm_graph_find(g, updates[k]), b = cm_graph_find(ref, updates[k]);
    CHECK_MSG(a >= 0 && b >= 0, "%s", updates[k]);
    if (a < 0 || b < 0 || !ov[a].data) continue;
    test_bounded r = test_check_bounded(&v[a], &ov[a], &ob[a]);
    CHECK_MSG(r.ratio <= 1, "%s: |f16 - f64| = %g at [%lld] exceeds its bound %g", updates[k],
              r.diff, (long long)r.at, r.bound);
    double worst = 0;
    for (int64_t e = 0; e < cm_type_numel(&ov[a].type); e++) {
      double x = cm_tensor_get_f64(&ov[a], e), y = cm_tensor_get_f64(&rv[b], e);
      worst = fmax(worst, fabs(x - y) / fmax(fabs(y), 1e-30));
    }
    CHECK_MSG(worst <= 1e-12, "%s: scaled f64 differs from unscaled by %g", updates[k], worst);
  }
  /* two more steps: the scale doubles after growth_interval = 2 good ones */
  for (int i = 0; i < n; i++) cm_tensor_free(&v[i]);
  native_step(g, t, src, v);
  CHECK(output(g, v, "skipped") == 0);
  CHECK(cm_tensor_get_f64(&t[cm_graph_find(g, "loss_scale")], 0) == 512);
  CHECK(cm_tensor_get_f64(&t[cm_graph_find(g, "optimizer.step")], 0) == 2);
  for (int i = 0; i < n; i++)
    cm_tensor_free(&t[i]), cm_tensor_free(&v[i]), cm_tensor_free(&ov[i]), cm_tensor_free(&ob[i]);
  for (int i = 0; i < nr; i++) cm_tensor_free(&rt[i]), cm_tensor_free(&rv[i]);
  free(t), free(v), free(ov), free(ob), free(rt), free(rv), free(src), free(rsrc);
  cm_graph_free(g);
  cm_graph_free(ref);
}

/* The trainer's f16 step of the default variant, from the config: train.loss_scale_growth
 * good steps double the scale; a huge loss weight overflows and skips (EMA targets too). */
static void test_f16_model_step_from_config(void) {
  for (int overflow = 0; overflow < 2; overflow++) {
    /* the default variant narrowed (the same modules): the oracle runs it in seconds */
    static const char *const sets[] = {
        "encoder.width=32",         "encoder.heads=2",           "encoder.depth=1",
        "pixel_decoder.width=16",   "pixel_decoder.heads=2",     "pixel_decoder.depth=1",
        "feature_decoder.width=16", "feature_decoder.heads=2",   "projector.hidden=16",
        "projector.out=8",          "predictor.hidden=16",       "predictor.out=8",
        "train.precision=f16",      "train.loss_scale_growth=2", "loss.rc_weight=1e6"};
    int n_sets = (int)(sizeof sets / sizeof sets[0]);
    cm_model_config cfg;
    if (!tiny_config(&cfg, sets, overflow ? n_sets : n_sets - 1)) return;
    cm_err err = {0};
    cm_graph *g = NULL;
    CHECK_MSG(cm_train_build_step(&cfg, CM_F16, &g, NULL, &err) == CM_OK, "%s", err.msg);
    if (!g) return;
    cm_model_build_opts mo = {2, 1, CM_F32};
    cm_model m = {0};
    cm_graph *f32 = NULL;
    CHECK(cm_model_build(&cfg, &mo, &m, &err) == CM_OK);
    CHECK(cm_train_build_step(&cfg, CM_F32, &f32, NULL, &err) == CM_OK);
    if (!m.g || !f32) {
      cm_graph_free(g), cm_graph_free(f32);
      if (m.g) cm_model_free(&m);
      return;
    }
    /* the f32 step's nodes are the model's (autocast renumbers): bind it, then by name */
    int n = g->n_nodes, n32 = f32->n_nodes;
    cm_tensor *t32 = calloc((size_t)n32, sizeof *t32);
    const cm_tensor **src32 = calloc((size_t)n32, sizeof *src32);
    rng.s = 99;
    test_bind_step(f32, &cfg, &m, t32, src32, uniform);
    cm_tensor *t = calloc((size_t)n, sizeof *t), *v = calloc((size_t)n, sizeof *v);
    cm_tensor *before = calloc((size_t)n, sizeof *before);
    const cm_tensor **src = calloc((size_t)n, sizeof *src);
    bind_by_name(g, f32, src32, t, src);
    for (int i = 0; i < n32; i++) cm_tensor_free(&t32[i]);
    free(t32), free(src32);
    cm_graph_free(f32);
    for (int i = 0; i < n; i++)
      if (src[i]) CHECK(cm_tensor_copy(&before[i], src[i], NULL) == CM_OK);
    int scale = cm_graph_find(g, "loss_scale"), steps = cm_graph_find(g, "optimizer.step");
    CHECK(scale >= 0 && steps >= 0);
    /* 2^16, the initial scale, overflows this model's f16 gradients (GradScaler would skip a
     * few steps to find its scale): start where they fit */
    if (scale >= 0 && !overflow) cm_tensor_set_f64(&t[scale], 0, 256);
    for (int k = 1; k <= (overflow ? 1 : 2) && scale >= 0 && steps >= 0; k++) {
      native_step(g, t, src, v);
      CHECK(output(g, v, "skipped") == overflow);
      CHECK(isfinite(output(g, v, "loss")));
      double want = overflow ? 32768 : k == 2 ? 512 : 256;
      CHECK_MSG(cm_tensor_get_f64(&t[scale], 0) == want, "step %d: scale %g, want %g", k,
                cm_tensor_get_f64(&t[scale], 0), want);
      CHECK(cm_tensor_get_f64(&t[steps], 0) == (overflow ? 0 : k));
      for (int i = 0; i < n; i++) cm_tensor_free(&v[i]);
    }
    int unchanged = 0, params = 0;
    for (int i = 0; i < n; i++) {
      const cm_node *u = &g->nodes[i];
      if (u->op != CM_OP_PARAM) continue;
      params++;
      unchanged += memcmp(t[i].data, before[i].data, cm_type_nbytes(&u->type)) == 0;
    }
    /* skipped: every param (online and EMA target) as it was; trained: the online ones moved */
    if (overflow) CHECK_MSG(unchanged == params, "%d of %d params unchanged", unchanged, params);
    if (!overflow) CHECK_MSG(unchanged < params / 2, "%d of %d unchanged", unchanged, params);
    for (int i = 0; i < n; i++) cm_tensor_free(&t[i]), cm_tensor_free(&before[i]);
    free(t), free(v), free(before), free(src);
    cm_model_free(&m);
    cm_graph_free(g);
  }
}

/* ---- the bf16 step of the default variant on the backends ---------------------- */

/* The target the emulated device runs (its compute capability's arch). */
static bool emu_target(cm_target *t) {
  cm_err err = {0};
  bool ok = emu_device_target(t, &err) == CM_OK;
  CHECK_MSG(ok, "%s", err.msg);
  return ok;
}

/* Sources of g by name from those of ref (same type), else from their initializers. */
static void bind_by_name(const cm_graph *g, const cm_graph *ref, const cm_tensor *const *rsrc,
                         cm_tensor *t, const cm_tensor **src) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *u = &g->nodes[i];
    if (u->op != CM_OP_INPUT && u->op != CM_OP_PARAM && u->op != CM_OP_STATE) continue;
    int o = cm_graph_find(ref, u->name);
    if (o >= 0 && rsrc[o] && cm_type_equal(&ref->nodes[o].type, &u->type)) {
      CHECK(cm_tensor_copy(&t[i], rsrc[o], NULL) == CM_OK);
    } else {
      CHECK_MSG(u->op != CM_OP_INPUT, "input %s has no value", u->name);
      CHECK(cm_tensor_alloc(&t[i], u->type, NULL) == CM_OK);
      CHECK(cm_init_tensor(&t[i], &u->attrs.init, 7, u->name, NULL) == CM_OK);
    }
    src[i] = &t[i];
  }
}

/* One run of pr from copies of src, then every kernel on its own inputs (what the run left)
 * within its error bound. Returns the worst |backend - f64| / bound. */
static double run_and_check(cm_program *pr, const char *what, const cm_graph *rg, const cm_plan *p,
                            const cm_tensor *const *src) {
  int n = rg->n_nodes;
  cm_tensor *run = calloc((size_t)n, sizeof *run), *got = calloc((size_t)n, sizeof *got);
  cm_tensor *val = calloc((size_t)n, sizeof *val);
  cm_tensor **ptr = calloc((size_t)n, sizeof *ptr);
  cm_tensor *outs = calloc((size_t)rg->n_outputs + 1, sizeof *outs);
  for (int v = 0; v < n; v++)
    if (src[v]) {
      CHECK(cm_tensor_copy(&run[v], src[v], NULL) == CM_OK);
      ptr[v] = &run[v];
    }
  cm_err err = {0};
  double worst = INFINITY;
  if (cm_program_run(pr, ptr, outs, &err) != CM_OK) {
    CHECK_MSG(false, "%s: %s", what, err.msg);
    goto done;
  }
  for (int gi = 0; gi < p->n_groups; gi++)
    for (int k = 0; k < p->groups[gi].n_outputs; k++) {
      int v = p->groups[gi].outputs[k];
      const void *data = cm_program_value(pr, v);
      cm_type t = rg->nodes[v].op == CM_OP_ASSIGN ? rg->nodes[rg->nodes[v].inputs[0]].type
                                                  : rg->nodes[v].type;
      if (data && cm_tensor_alloc(&got[v], t, NULL) == CM_OK)
        memcpy(got[v].data, data, cm_type_nbytes(&t));
    }
  worst = 0;
  for (int k = 0; k < p->n_order; k++) {
    const cm_group *gr = &p->groups[p->order[k]];
    for (int j = 0; j < gr->n_inputs; j++) val[gr->inputs[j]] = got[gr->inputs[j]]; /* shared */
    int at = -1;
    test_bounded r = test_check_group(rg, p, p->order[k], src, val, got, what, &at, &err);
    CHECK_MSG(r.ratio <= 1,
              "%s: kernel %d (%s), output %s: |%s - f64| = %g at [%lld] exceeds its error bound "
              "%g%s%s",
              what, k, cm_group_kind_name(gr->kind), at >= 0 ? rg->nodes[at].name : "?", what,
              r.diff, (long long)r.at, r.bound, err.msg[0] ? ": " : "", err.msg);
    worst = fmax(worst, r.ratio);
    for (int j = 0; j < gr->n_inputs; j++) memset(&val[gr->inputs[j]], 0, sizeof *val);
  }
  if (rg->n_outputs > 0)
    fprintf(stderr, "  %s: %s %.9g, worst kernel |%s - f64| / bound %.3g\n", what,
            rg->nodes[rg->outputs[0]].name, cm_tensor_get_f64(&outs[0], 0), what, worst);
done:
  for (int v = 0; v < n; v++) cm_tensor_free(&run[v]), cm_tensor_free(&got[v]);
  for (int j = 0; j < rg->n_outputs; j++) cm_tensor_free(&outs[j]);
  free(run), free(got), free(val), free(ptr), free(outs);
  return worst;
}

/* The bf16 training step of models/cmae_vit_tiny_fmnist.json (batch 2) as cm_train builds
 * it, compiled for the CPU backend (on_device false) or the emulated CUDA device: one step
 * from the same states, every kernel within its derived error bound on its own inputs.
 * optimizer.eps is 1 so that the update is a smooth function of the gradient (as in
 * test_cpu_exec). */
static void bf16_step_kernels(bool on_device) {
  double t0 = now_s();
  static const char *const sets[] = {"train.precision=bf16", "optimizer.eps=1"};
  cm_model_config cfg;
  if (!tiny_config(&cfg, sets, 2)) return;
  cm_err err = {0};
  cm_graph *f32 = NULL, *g = NULL;
  int n_cast = 0;
  CHECK_MSG(cm_train_build_step(&cfg, CM_F32, &f32, NULL, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_train_build_step(&cfg, CM_BF16, &g, &n_cast, &err) == CM_OK, "%s", err.msg);
  cm_model_build_opts mo = {2, 1, CM_F32};
  cm_model m = {0};
  CHECK(cm_model_build(&cfg, &mo, &m, &err) == CM_OK);
  if (!f32 || !g || !m.g) {
    cm_graph_free(f32), cm_graph_free(g);
    if (m.g) cm_model_free(&m);
    return;
  }
  int n32 = f32->n_nodes;
  cm_tensor *t32 = calloc((size_t)n32, sizeof *t32);
  const cm_tensor **src32 = calloc((size_t)n32, sizeof *src32);
  rng.s = 4242;
  test_bind_step(f32, &cfg, &m, t32, src32, uniform);
  cm_graph *rg = g;
  g = NULL;
  cm_plan *p = test_plan_without_reuse(&rg);
  int n = rg->n_nodes;
  cm_tensor *t = calloc((size_t)n, sizeof *t);
  const cm_tensor **src = calloc((size_t)n, sizeof *src);
  bind_by_name(rg, f32, src32, t, src);
  double worst_cpu = 0, worst_gpu = 0, t_cpu = 0, t_gpu = 0;
  cm_program *cpu = NULL, *gpu = NULL;
  if (have_cpu && p && !on_device) {
    double t1 = now_s();
    cm_compile_opts co = {.cache_dir = "", .plan = p};
    CHECK_MSG(cm_compile(rg, NULL, &co, &cpu, &err) == CM_OK, "cpu: %s", err.msg);
    if (cpu) worst_cpu = run_and_check(cpu, "cpu", rg, p, src);
    t_cpu = now_s() - t1;
  }
  cm_target target;
  if (p && on_device && emu_target(&target)) {
    double t1 = now_s();
    cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_OFF, 0};
    cm_compile_opts co = {
        .cache_dir = test_module_cache("test_precision"), .backend_opts = &bo, .plan = p};
    CHECK_MSG(cm_compile(rg, &target, &co, &gpu, &err) == CM_OK, "emulated device: %s", err.msg);
    if (gpu) worst_gpu = run_and_check(gpu, "gpu", rg, p, src);
    t_gpu = now_s() - t1;
  }
  fprintf(stderr,
          "  cmae_vit_tiny_fmnist bf16 b2: %d contractions autocast; worst kernel / bound: cpu "
          "%.3g (%.1f s), emulated device %.3g (%.1f s); all %.1f s\n",
          n_cast, worst_cpu, t_cpu, worst_gpu, t_gpu, now_s() - t0);
  cm_program_free(cpu);
  cm_program_free(gpu);
  for (int v = 0; v < n; v++) cm_tensor_free(&t[v]);
  for (int v = 0; v < n32; v++) cm_tensor_free(&t32[v]);
  free(t), free(src), free(t32), free(src32);
  cm_plan_free(p);
  cm_graph_free(rg);
  cm_graph_free(f32);
  cm_model_free(&m);
}

static void test_bf16_step_kernels_cpu(void) {
  CHECK(have_cpu); /* the build without LLVM leaves this test out (CMakeLists.txt) */
  bf16_step_kernels(false);
}

static void test_bf16_step_kernels_emulated(void) {
  bf16_step_kernels(true);
}

TEST_MAIN(TEST(test_keys), TEST(test_step_types), TEST(test_f16_overflow_skips),
          TEST(test_f16_scaled_step_bounded), TEST(test_f16_model_step_from_config),
          TEST(test_bf16_step_kernels_cpu), TEST(test_bf16_step_kernels_emulated))
