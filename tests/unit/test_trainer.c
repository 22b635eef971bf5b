/* tests/unit/test_trainer.c — cm_train on a tiny CMAE variant: the loss falls
 * over 40 steps, 2N straight steps equal N + resume + N bitwise (across an
 * epoch boundary, on an image folder), EMA targets start as copies of their
 * online twins, a huge lr stops naming the step and tensor, a stop request
 * saves a checkpoint, bad options are CM_EINVALID. On the ref backend and the
 * cpu backend. On the emulated CUDA device (tests/emu/emu.h): a checkpoint
 * written there resumes on the CPU and the reverse, the huge lr is located,
 * encoder features equal the reference's. Auto without a driver trains on the
 * CPU and says so. */
#include "../../runtime/training.h"
#include "../emu/emu.h"
#include "../test.h"
#include "../testlib.h"

#include <stdlib.h>

#include <dirent.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#define MODEL "models/cmae_vit_tiny_fmnist.json"

static const char *const tiny[] = {
    "encoder.width=16",         "encoder.depth=1",         "encoder.heads=2",
    "pixel_decoder.width=16",   "pixel_decoder.depth=1",   "pixel_decoder.heads=2",
    "feature_decoder.width=16", "feature_decoder.depth=1", "feature_decoder.heads=2",
    "projector.hidden=32",      "projector.out=16",        "predictor.hidden=32",
    "predictor.out=16",         "data.image_size=16",      "data.master_size=20",
    "schedule.warmup_epochs=0", "optimizer.base_lr=0.1",
};
enum { N_TINY = (int)(sizeof tiny / sizeof tiny[0]) };

static test_rng rng_state = {12345};
static uint64_t next_u64(void) {
  return test_u64(&rng_state);
}

/* root/<class>/<i>.png: 21 gray 28x28 pictures (a bright box on noise). */
static void make_folder(const char *root) {
  char p[1024];
  for (int k = 0; k < 21; k++) {
    snprintf(p, sizeof p, "%s/c%d", root, k % 3);
    mkdir(p, 0777);
    cm_image im;
    cm_err err = {0};
    CHECK(cm_image_alloc(&im, 28, 28, 1, 0, &err) == CM_OK);
    int y0 = (int)(next_u64() % 14), x0 = (int)(next_u64() % 14);
    for (int y = 0; y < 28; y++)
      for (int x = 0; x < 28; x++) {
        bool in = y >= y0 && y < y0 + 12 && x >= x0 && x < x0 + 12;
        im.data[y * 28 + x] = (uint8_t)((in ? 160 : 0) + next_u64() % 90);
      }
    snprintf(p, sizeof p, "%s/c%d/%02d.png", root, k % 3, k);
    CHECK_MSG(cm_png_write(p, &im, &err) == CM_OK, "%s", err.msg);
    cm_image_free(&im);
  }
}

typedef struct run_cfg {
  const char *out, *data;
  cm_train_backend backend;
  int64_t steps;
  bool resume;
  const char *extra[4];
  cm_views_mode views;
  volatile sig_atomic_t *stop;
  bool emulated; /* backend CM_TRAIN_CUDA on the emulated device */
} run_cfg;

static cm_status run(const run_cfg *c, cm_train_result *r, cm_err *err) {
  const char *ov[N_TINY + 8];
  int n = 0;
  for (int i = 0; i < N_TINY; i++) ov[n++] = tiny[i];
  ov[n++] = "train.seed=7";
  ov[n++] = "train.workers=2";
  if (c->views == CM_VIEWS_RRC) ov[n++] = "train.views=rrc";
  for (int i = 0; i < 4 && c->extra[i]; i++) ov[n++] = c->extra[i];
  cm_train_opts o = {0};
  o.model_path = MODEL;
  o.overrides = ov;
  o.n_overrides = n;
  o.data = c->data;
  o.steps = c->steps;
  o.batch = 8;
  o.out_dir = c->out;
  o.resume = c->resume;
  o.backend = c->backend;
  o.stop = c->stop;
  if (c->emulated) {
    o.backend = CM_TRAIN_CUDA;
    o.cuda_driver = emu_driver();
    o.cuda_compiler = emu_compiler();
  }
  return cm_train(&o, r, err);
}

static bool have_fmnist(void) {
  cm_dataset *d = NULL;
  cm_err err = {0};
  bool ok = cm_dataset_open_fmnist(NULL, true, &d, &err) == CM_OK;
  cm_dataset_free(d);
  return ok;
}

static int backends[2], n_backends;
static char tmp_root[256];

/* Both backends are tested: the reference evaluator and the compiled CPU step
 * (one step first, so a broken cpu backend fails here with its message). */
static void pick_backends(void) {
  backends[n_backends++] = CM_TRAIN_REF;
  char out[512], data[512];
  snprintf(out, sizeof out, "%s/probe", tmp_root);
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  run_cfg c = {.out = out, .data = data, .backend = CM_TRAIN_CPU, .steps = 1};
  cm_train_result r;
  cm_err err = {0};
  cm_status st = run(&c, &r, &err);
  CHECK_MSG(st == CM_OK, "cpu backend: %s", err.msg);
  if (st == CM_OK) backends[n_backends++] = CM_TRAIN_CPU;
  test_remove_tree(out);
}

static double mean_col(const cm_metrics_table *t, const char *name, int64_t from, int64_t to) {
  int c = cm_metrics_column(t, name);
  double s = 0;
  for (int64_t i = from; i < to; i++) s += t->values[i * t->n_cols + c];
  return s / (double)(to - from);
}

static void test_loss_falls(void) {
  bool fm = have_fmnist();
  char data[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  for (int b = 0; b < n_backends; b++) {
    char out[512];
    snprintf(out, sizeof out, "%s/falls%d", tmp_root, b);
    run_cfg c = {.out = out, .data = fm ? NULL : data, .backend = backends[b], .steps = 40};
    cm_train_result r;
    cm_err err = {0};
    CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
    CHECK(r.last_step == 40 && r.first_step == 0);
    CHECK(isfinite(r.loss) && r.loss_ct > 0 && r.loss_rc > 0);
    char path[600];
    snprintf(path, sizeof path, "%s/metrics.jsonl", out);
    cm_metrics_table t = {0};
    CHECK_MSG(cm_metrics_read(path, &t, &err) == CM_OK, "%s", err.msg);
    CHECK(t.n_rows == 40);
    if (t.n_rows == 40) {
      double first = mean_col(&t, "loss", 0, 5), last = mean_col(&t, "loss", 35, 40);
      CHECK_MSG(last < first, "backend %d: loss %g -> %g", backends[b], first, last);
      /* total = rc + ct, and the lr / momentum follow the schedule */
      int cl = cm_metrics_column(&t, "loss"), crc = cm_metrics_column(&t, "loss_rc"),
          cct = cm_metrics_column(&t, "loss_ct"), clr = cm_metrics_column(&t, "lr");
      CHECK_NEAR(t.values[7 * t.n_cols + cl],
                 t.values[7 * t.n_cols + crc] + t.values[7 * t.n_cols + cct], 1e-5);
      CHECK_NEAR(t.values[0 * t.n_cols + clr], 0.1 * 8 / 256, 1e-12);
      CHECK(t.values[39 * t.n_cols + clr] < t.values[0 * t.n_cols + clr]);
    }
    cm_metrics_table_free(&t);
    test_remove_tree(out);
  }
}

static void check_same_checkpoints(const char *a, const char *b) {
  cm_tensor_set sa, sb;
  cm_tensor_set_init(&sa);
  cm_tensor_set_init(&sb);
  cm_checkpoint_meta ma = {0}, mb = {0};
  cm_err err = {0};
  CHECK_MSG(cm_checkpoint_load(a, &sa, &ma, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_checkpoint_load(b, &sb, &mb, &err) == CM_OK, "%s", err.msg);
  CHECK(sa.n == sb.n && sa.n > 0);
  int moments = 0, ema = 0, differ = 0;
  for (int i = 0; i < sa.n; i++) {
    const cm_tensor *tb = cm_tensor_set_get(&sb, sa.names[i]);
    bool same = tb && cm_type_equal(&tb->type, &sa.tensors[i].type) &&
                memcmp(tb->data, sa.tensors[i].data, cm_type_nbytes(&tb->type)) == 0;
    CHECK_MSG(same, "tensor %s differs", sa.names[i]);
    differ += !same;
    moments += strncmp(sa.names[i], "optimizer.exp_avg", 17) == 0;
    ema += strncmp(sa.names[i], "target_", 7) == 0;
  }
  CHECK(moments > 0 && ema > 0 && differ == 0);
  CHECK(ma.step == mb.step && ma.epoch == mb.epoch && ma.rng_seed == mb.rng_seed);
  CHECK(ma.config_json && mb.config_json && strcmp(ma.config_json, mb.config_json) == 0);
  cm_checkpoint_meta_free(&ma);
  cm_checkpoint_meta_free(&mb);
  cm_tensor_set_free(&sa);
  cm_tensor_set_free(&sb);
}

/* 21 images at batch 8: 2 steps per epoch, so N = 3 resumes mid-epoch 1 and
 * the run crosses epochs 0 -> 1 -> 2. */
static void test_resume_bitwise(void) {
  char data[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  for (int b = 0; b < n_backends; b++) {
    for (int views = 0; views < 2; views++) {
      char a[512], bb[512], pa[600], pb[600];
      snprintf(a, sizeof a, "%s/straight", tmp_root);
      snprintf(bb, sizeof bb, "%s/resumed", tmp_root);
      cm_views_mode vm = views ? CM_VIEWS_RRC : CM_VIEWS_SHIFT;
      run_cfg c = {.out = a, .data = data, .backend = backends[b], .steps = 6, .views = vm};
      cm_train_result r;
      cm_err err = {0};
      CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
      CHECK(r.steps_per_epoch == 2 && r.dataset_size == 21);
      c.out = bb;
      c.steps = 3;
      CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
      CHECK(r.last_step == 3);
      c.steps = 6;
      c.resume = true;
      CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
      CHECK(r.first_step == 3 && r.last_step == 6);
      snprintf(pa, sizeof pa, "%s/ckpt-6.safetensors", a);
      snprintf(pb, sizeof pb, "%s/ckpt-6.safetensors", bb);
      check_same_checkpoints(pa, pb);
      snprintf(pa, sizeof pa, "%s/metrics.jsonl", a);
      snprintf(pb, sizeof pb, "%s/metrics.jsonl", bb);
      cm_metrics_table ta = {0}, tb = {0};
      CHECK(cm_metrics_read(pa, &ta, &err) == CM_OK);
      CHECK(cm_metrics_read(pb, &tb, &err) == CM_OK);
      CHECK(ta.n_rows == 6 && tb.n_rows == 6);
      static const char *const cols[] = {"step",    "epoch", "loss",     "loss_rc",
                                         "loss_ct", "lr",    "momentum", "grad_norm"};
      for (int64_t i = 0; i < 6 && ta.n_rows == 6 && tb.n_rows == 6; i++)
        for (int k = 0; k < 8; k++) {
          double va = ta.values[i * ta.n_cols + cm_metrics_column(&ta, cols[k])];
          double vb = tb.values[i * tb.n_cols + cm_metrics_column(&tb, cols[k])];
          CHECK_MSG(va == vb, "row %lld %s: %.17g vs %.17g", (long long)i, cols[k], va, vb);
        }
      cm_metrics_table_free(&ta);
      cm_metrics_table_free(&tb);
      test_remove_tree(a);
      test_remove_tree(bb);
    }
  }
}

/* With lr 1e-30 (below every param's rounding) and momentum 1 nothing moves: every EMA target must
 * still equal its online twin, i.e. it started as a copy. */
static void test_ema_starts_as_copy(void) {
  char data[512], out[512], path[600];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(out, sizeof out, "%s/ema", tmp_root);
  run_cfg c = {.out = out,
               .data = data,
               .backend = CM_TRAIN_REF,
               .steps = 2,
               .extra = {"optimizer.base_lr=1e-30", "optimizer.weight_decay=0",
                         "schedule.momentum_base=1", "schedule.momentum_end=1"}};
  cm_train_result r;
  cm_err err = {0};
  CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
  snprintf(path, sizeof path, "%s/ckpt-2.safetensors", out);
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  cm_checkpoint_meta m = {0};
  CHECK_MSG(cm_checkpoint_load(path, &s, &m, &err) == CM_OK, "%s", err.msg);
  cm_checkpoint_meta_free(&m);
  int pairs = 0;
  for (int i = 0; i < s.n; i++) {
    if (strncmp(s.names[i], "target_", 7) != 0) continue;
    const cm_tensor *o = cm_tensor_set_get(&s, s.names[i] + 7);
    /* zero-initialized biases move by ~lr; everything else stays bitwise */
    double worst = o ? 0 : INFINITY;
    int64_t n = o ? cm_type_numel(&o->type) : 0;
    for (int64_t k = 0; k < n; k++)
      worst = fmax(worst, fabs(cm_tensor_get_f64(o, k) - cm_tensor_get_f64(&s.tensors[i], k)));
    CHECK_MSG(worst <= 1e-25, "%s is not a copy of its twin (off by %g)", s.names[i], worst);
    pairs++;
  }
  CHECK(pairs >= 4);
  cm_tensor_set_free(&s);
  test_remove_tree(out);
}

/* train.precision=f16 on each backend: the loss scale state starts at 2^16 (not zero, as
 * the other states), metrics.jsonl has loss_scale and skipped, the checkpoint holds the scale
 * and the resolved precision; a run resumed with train.precision auto continues in f16,
 * bitwise. */
static void test_f16_loss_scale(void) {
  char data[512], out[512], half[512], path[600];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(out, sizeof out, "%s/f16", tmp_root);
  snprintf(half, sizeof half, "%s/f16half", tmp_root);
  for (int b = 0; b < n_backends; b++) {
    run_cfg c = {.out = out, .data = data, .backend = backends[b], .steps = 2};
    c.extra[0] = "train.precision=f16";
    cm_train_result r;
    cm_err err = {0};
    CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
    run_cfg h = c;
    h.out = half, h.steps = 1;
    CHECK_MSG(run(&h, &r, &err) == CM_OK, "%s", err.msg);
    h.steps = 2, h.resume = true;
    h.extra[0] = NULL; /* auto continues in the checkpoint's precision */
    CHECK_MSG(run(&h, &r, &err) == CM_OK, "resumed: %s", err.msg);
    cm_metrics_table t[2] = {{0}, {0}};
    for (int k = 0; k < 2; k++) {
      snprintf(path, sizeof path, "%s/metrics.jsonl", k ? half : out);
      CHECK_MSG(cm_metrics_read(path, &t[k], &err) == CM_OK, "%s", err.msg);
    }
    int cs = cm_metrics_column(&t[0], "loss_scale"), ck = cm_metrics_column(&t[0], "skipped");
    CHECK(cs >= 0 && ck >= 0 && t[0].n_rows == 2 && t[1].n_rows == 2);
    if (cs >= 0 && ck >= 0 && t[0].n_rows == 2) {
      double s1 = t[0].values[cs], s2 = t[0].values[t[0].n_cols + cs], k1 = t[0].values[ck];
      double k2 = t[0].values[t[0].n_cols + ck];
      /* the scale after each step: from 2^16, halved by a skipped step, else kept */
      CHECK_MSG(s1 == (k1 ? 32768 : 65536), "after step 1 (skipped %g): loss scale %g", k1, s1);
      CHECK((k1 == 0 || k1 == 1) && (k2 == 0 || k2 == 1));
      CHECK(s2 == (k2 ? s1 / 2 : s1));
      for (int i = 0; i < 2 && t[1].n_rows == 2; i++)
        for (int j = 0; j < t[0].n_cols; j++) {
          const char *col = t[0].cols[j];
          if (!strcmp(col, "images_per_s") || !strcmp(col, "step_ms")) continue;
          int c1 = cm_metrics_column(&t[1], col);
          double va = t[0].values[i * t[0].n_cols + j];
          double vb = c1 >= 0 ? t[1].values[i * t[1].n_cols + c1] : NAN;
          CHECK_MSG((isnan(va) && isnan(vb)) || va == vb, "row %d %s: %.17g vs %.17g resumed", i,
                    col, va, vb);
        }
    }
    cm_metrics_table_free(&t[0]);
    cm_metrics_table_free(&t[1]);
    cm_tensor_set s;
    cm_tensor_set_init(&s);
    cm_checkpoint_meta m = {0};
    snprintf(path, sizeof path, "%s/ckpt-2.safetensors", out);
    CHECK_MSG(cm_checkpoint_load(path, &s, &m, &err) == CM_OK, "%s", err.msg);
    const cm_tensor *scale = cm_tensor_set_get(&s, "loss_scale");
    CHECK(scale && cm_tensor_get_f64(scale, 0) >= 16384);
    cm_model_config saved;
    CHECK(m.config_json && cm_model_config_from_json_text(m.config_json, &saved, &err) == CM_OK);
    CHECK(!strcmp(saved.train.precision, "f16") && !strcmp(saved.train.loss_scale, "dynamic"));
    cm_checkpoint_meta_free(&m);
    cm_tensor_set_free(&s);
    test_remove_tree(out);
    test_remove_tree(half);
  }
}

static void test_nonfinite(void) {
  char data[512], out[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(out, sizeof out, "%s/nan", tmp_root);
  /* the ref and cpu backends, then the emulated device (states downloaded for the search) */
  for (int b = 0; b <= n_backends; b++) {
    run_cfg c = {.out = out,
                 .data = data,
                 .backend = b < n_backends ? backends[b] : CM_TRAIN_CPU,
                 .emulated = b == n_backends,
                 .steps = 6,
                 .extra = {"optimizer.base_lr=1e30"}};
    cm_train_result r;
    cm_err err = {0};
    CHECK(run(&c, &r, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "non-finite");
    CHECK_STR_CONTAINS(err.msg, "first non-finite tensor in execution order: ");
    CHECK(strncmp(err.msg, "step ", 5) == 0 && r.last_step < 6);
    CHECK_MSG(strstr(err.msg, "not located") == NULL && strstr(err.msg, " = ") != NULL, "%s",
              err.msg);
    test_remove_tree(out);
  }
}

static void test_stop_saves(void) {
  char data[512], out[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(out, sizeof out, "%s/stop", tmp_root);
  volatile sig_atomic_t flag = 1;
  run_cfg c = {.out = out, .data = data, .backend = CM_TRAIN_REF, .steps = 5, .stop = &flag};
  cm_train_result r;
  cm_err err = {0};
  CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
  CHECK(r.interrupted && r.last_step == 1);
  char *latest = NULL;
  CHECK(cm_checkpoint_latest(out, &latest, &err) == CM_OK);
  CHECK(latest && strcmp(latest, r.checkpoint) == 0);
  cm_checkpoint_meta m = {0};
  cm_tensor_set s;
  cm_tensor_set_init(&s);
  CHECK(latest && cm_checkpoint_load(latest, &s, &m, &err) == CM_OK && m.step == 1);
  cm_tensor_set_free(&s);
  cm_checkpoint_meta_free(&m);
  free(latest);
  /* the rest of the run resumes, with the same config only */
  flag = 0;
  c.resume = true;
  c.extra[0] = "train.seed=8";
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "different train.seed");
  c.extra[0] = "train.workers=3"; /* does not change the numbers */
  CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
  CHECK(!r.interrupted && r.first_step == 1 && r.last_step == 5);
  test_remove_tree(out);
}

static void test_bad_options(void) {
  char data[512], out[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(out, sizeof out, "%s/bad", tmp_root);
  cm_train_result r;
  cm_err err = {0};
  run_cfg c = {.out = out, .data = data, .backend = CM_TRAIN_REF, .steps = 1};
  c.resume = true; /* nothing to resume from */
  CHECK(run(&c, &r, &err) != CM_OK);
  c.resume = false;
  c.extra[0] = "encoder.heads=3"; /* does not divide 16 */
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "encoder.heads");
  c.extra[0] = NULL;
  c.data = "/nonexistent/folder";
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  c.data = data;
  c.extra[0] = "train.views=crop";
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.views");
  c.extra[0] = "train.workers=0";
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.workers");
  c.extra[0] = "train.limit=-1";
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "train.limit");
  c.extra[0] = "train.limit=5"; /* fewer images than a batch of 8 */
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "fewer than a batch");
  c.extra[0] = "train.limit=16"; /* two steps per epoch */
  CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
  CHECK(r.dataset_size == 16 && r.steps_per_epoch == 2);
  test_remove_tree(out);
  c.extra[0] = NULL;
  cm_train_opts o = {0};
  CHECK(cm_train(&o, &r, &err) == CM_EINVALID);
  test_remove_tree(out);
}

/* The losses of metrics.jsonl in dir, rows [0, n). */
static void read_losses(const char *dir, double *loss, int n) {
  char path[600];
  snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
  cm_metrics_table t = {0};
  cm_err err = {0};
  CHECK_MSG(cm_metrics_read(path, &t, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(t.n_rows == n, "%s: %lld rows, expected %d", path, (long long)t.n_rows, n);
  int c = cm_metrics_column(&t, "loss");
  for (int i = 0; i < n; i++) loss[i] = i < t.n_rows ? t.values[i * t.n_cols + c] : NAN;
  cm_metrics_table_free(&t);
}

/* The bound between two backends' losses: the kernels differ (order of sums,
 * fused exp/log), so the f32 losses of a few steps agree to ~1e-5 relative. */
static void check_losses_close(const double *a, const double *b, int n, const char *what) {
  for (int i = 0; i < n; i++)
    CHECK_MSG(isfinite(a[i]) && fabs(a[i] - b[i]) <= 1e-4 * fabs(a[i]),
              "%s: step %d loss %.9g vs the CPU's %.9g", what, i + 1, b[i], a[i]);
}

/* Checkpoints hold host tensors: 2 steps on one backend, then 2 more resumed on
 * the other, give the losses of 4 straight CPU steps (cpu -> cuda and cuda -> cpu). */
static void test_cross_backend_resume(void) {
  char data[512], cpu[512], mixed[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(cpu, sizeof cpu, "%s/cpu4", tmp_root);
  snprintf(mixed, sizeof mixed, "%s/mixed", tmp_root);
  cm_train_result r;
  cm_err err = {0};
  run_cfg c = {.out = cpu, .data = data, .backend = CM_TRAIN_CPU, .steps = 4};
  CHECK_MSG(run(&c, &r, &err) == CM_OK, "cpu: %s", err.msg);
  double want[4], got[4];
  read_losses(cpu, want, 4);
  for (int first_on_cuda = 1; first_on_cuda >= 0; first_on_cuda--) {
    run_cfg m = {.out = mixed, .data = data, .backend = CM_TRAIN_CPU, .steps = 2};
    m.extra[0] = "train.precision=f32"; /* auto would be bf16 on the device */
    m.emulated = first_on_cuda;
    CHECK_MSG(run(&m, &r, &err) == CM_OK, "first half: %s", err.msg);
    CHECK(r.last_step == 2);
    CHECK_MSG(strncmp(r.backend, first_on_cuda ? "cuda 0 (" : "cpu", 4) == 0, "ran on %s",
              r.backend);
    m.emulated = !first_on_cuda;
    m.steps = 4;
    m.resume = true;
    CHECK_MSG(run(&m, &r, &err) == CM_OK, "resumed half: %s", err.msg);
    CHECK(r.first_step == 2 && r.last_step == 4);
    read_losses(mixed, got, 4);
    check_losses_close(want, got, 4, first_on_cuda ? "cuda -> cpu" : "cpu -> cuda");
    test_remove_tree(mixed);
  }
  test_remove_tree(cpu);
}

/* Encoder features (cmaec eval) on the emulated device equal the reference evaluator's. */
static void test_features_on_device(void) {
  const char *ov[N_TINY];
  for (int i = 0; i < N_TINY; i++) ov[i] = tiny[i];
  cm_model_config cfg;
  cm_err err = {0};
  CHECK_MSG(cm_model_config_load(MODEL, ov, N_TINY, &cfg, &err) == CM_OK, "%s", err.msg);
  cm_backend_request req = {CM_BACKEND_CUDA, 0, CM_CUDA_GRAPHS_ON, emu_driver(), emu_compiler()};
  cm_backend_choice choice;
  CHECK_MSG(cm_backend_resolve(&req, &choice, &err) == CM_OK, "%s", err.msg);
  enum { N = 3 };
  int S = cfg.data.image_size, C = cfg.data.in_chans;
  float *views = malloc(sizeof(float) * N * (size_t)(C * S * S));
  for (int i = 0; i < N * C * S * S; i++) views[i] = (float)(next_u64() % 2001) / 1000.0f - 1.0f;
  cm_encoder_opts on_device = {.batch = 2, .pool = CM_POOL_MEAN, .seed = 3, .backend = &choice};
  cm_encoder_opts on_ref = {.batch = 2, .pool = CM_POOL_MEAN, .seed = 3, .reference = true};
  cm_encoder *ed = NULL, *er = NULL;
  float *fd = NULL, *fr = NULL;
  CHECK_MSG(cm_encoder_create(&cfg, NULL, &on_device, &ed, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(cm_encoder_create(&cfg, NULL, &on_ref, &er, &err) == CM_OK, "%s", err.msg);
  if (ed && er) {
    CHECK_MSG(strncmp(cm_encoder_backend(ed), "cuda 0 (", 8) == 0, "ran on %s",
              cm_encoder_backend(ed));
    CHECK_MSG(cm_encoder_features(ed, views, N, &fd, &err) == CM_OK, "%s", err.msg);
    CHECK_MSG(cm_encoder_features(er, views, N, &fr, &err) == CM_OK, "%s", err.msg);
  }
  int d = ed ? cm_encoder_dim(ed) : 0;
  double worst = 0, scale = 0;
  for (int i = 0; fd && fr && i < N * d; i++) {
    worst = fmax(worst, fabs((double)fd[i] - fr[i]));
    scale = fmax(scale, fabs((double)fr[i]));
  }
  CHECK(fd && fr && d > 0 && scale > 0);
  CHECK_MSG(worst <= 1e-4 * scale, "device features differ from ref by %g (scale %g)", worst,
            scale);
  free(fd);
  free(fr);
  free(views);
  cm_encoder_free(ed);
  cm_encoder_free(er);
}

/* Without a CUDA driver (setup points $CMAEC_CUDA_DRIVER_LIBRARY nowhere), auto
 * trains on the CPU and says why; cuda is CM_EINVALID naming the driver. */
static void test_auto_without_driver(void) {
  char data[512], out[512];
  snprintf(data, sizeof data, "%s/folder", tmp_root);
  snprintf(out, sizeof out, "%s/auto", tmp_root);
  cm_train_result r;
  cm_err err = {0};
  run_cfg c = {.out = out, .data = data, .backend = CM_TRAIN_AUTO, .steps = 1};
  CHECK_MSG(run(&c, &r, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(strcmp(r.backend, "cpu (auto: no CUDA driver)") == 0, "auto ran on %s", r.backend);
  CHECK(r.last_step == 1);
  test_remove_tree(out);
  c.backend = CM_TRAIN_CUDA;
  CHECK(run(&c, &r, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "CUDA driver not found");
  struct stat st;
  CHECK_MSG(stat(out, &st) != 0, "%s was created without a driver", out);
}

static void setup(void) {
  /* no real GPU in these tests, also on a GPU machine: the emulated one is passed explicitly */
  setenv("CMAEC_CUDA_DRIVER_LIBRARY", "/nonexistent/cmaec-test/libcuda.so.1", 1);
  snprintf(tmp_root, sizeof tmp_root, "/tmp/cmaec_trainer_XXXXXX");
  CHECK(mkdtemp(tmp_root) != NULL);
  char p[512];
  snprintf(p, sizeof p, "%s/folder", tmp_root);
  mkdir(p, 0777);
  make_folder(p);
  pick_backends();
}

static void teardown(void) {
  test_remove_tree(tmp_root);
}

TEST_MAIN(TEST(setup), TEST(test_loss_falls), TEST(test_resume_bitwise),
          TEST(test_ema_starts_as_copy), TEST(test_f16_loss_scale), TEST(test_nonfinite),
          TEST(test_stop_saves), TEST(test_bad_options), TEST(test_cross_backend_resume),
          TEST(test_features_on_device), TEST(test_auto_without_driver), TEST(teardown))
