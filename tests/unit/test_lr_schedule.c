/* tests/unit/test_lr_schedule.c — lr and momentum schedules against the
 * published formulas (mmengine LinearLR + CosineAnnealingLR per iteration,
 * the CMAE momentum hook), and metrics.jsonl / progress output. */
#include "../../runtime/training.h"
#include "../test.h"

#include <unistd.h>

/* mmengine closed forms, written out independently of runtime/lr_schedule.c */
static double ref_lr(double peak, double f0, double eta_min, int64_t w, int64_t total, int64_t t) {
  if (t < w) return peak * (f0 + (1.0 - f0) * (double)t / (double)w);
  double tmax = (double)(total - w);
  return eta_min +
         (peak - eta_min) * (1.0 + cos(3.14159265358979323846 * (double)(t - w) / tmax)) / 2;
}

static void test_lr_default_config(void) {
  cm_model_config c;
  cm_model_config_default(&c);
  cm_lr_schedule s;
  cm_err err = {0};
  CHECK(cm_lr_schedule_from_config(&c, 313, &s, &err) == CM_OK);
  /* linear scaling rule: 1.5e-4 * 4096 / 256 = 2.4e-3 (CMAE.md §8) */
  CHECK_NEAR(s.peak_lr, 2.4e-3, 1e-15);
  CHECK(s.warmup_iters == 40 * 313);
  CHECK(s.total_iters == 300 * 313);
  int64_t w = s.warmup_iters, T = s.total_iters;
  CHECK_NEAR(cm_lr_schedule_lr(&s, 0), 2.4e-3 * 1e-4, 1e-12);
  CHECK_NEAR(cm_lr_schedule_lr(&s, 1), 2.4e-3 * (1e-4 + (1 - 1e-4) / (double)w), 1e-12);
  CHECK_NEAR(cm_lr_schedule_lr(&s, w / 2), 2.4e-3 * (1e-4 + (1 - 1e-4) * 0.5), 1e-12);
  CHECK_NEAR(cm_lr_schedule_lr(&s, w - 1),
             2.4e-3 * (1e-4 + (1 - 1e-4) * (double)(w - 1) / (double)w), 1e-12);
  CHECK_NEAR(cm_lr_schedule_lr(&s, w), 2.4e-3, 1e-12); /* cosine starts at the peak */
  CHECK_NEAR(cm_lr_schedule_lr(&s, w + (T - w) / 2), 1.2e-3, 1e-12);
  CHECK_NEAR(cm_lr_schedule_lr(&s, T - 1), ref_lr(2.4e-3, 1e-4, 0, w, T, T - 1), 1e-14);
  CHECK(cm_lr_schedule_lr(&s, T - 1) > 0 && cm_lr_schedule_lr(&s, T - 1) < 1e-9);
  CHECK(cm_lr_schedule_lr(&s, T + 100) == cm_lr_schedule_lr(&s, T - 1));
  /* monotone up in warmup, down after */
  for (int64_t t = 1; t < T; t += 997) {
    double a = cm_lr_schedule_lr(&s, t - 1), b = cm_lr_schedule_lr(&s, t);
    CHECK_MSG(t <= w ? b > a : b <= a, "t=%lld", (long long)t);
    CHECK_NEAR(b, ref_lr(2.4e-3, 1e-4, 0, w, T, t), 1e-13);
  }
  /* CMAE default: momentum constant 0.996 */
  CHECK_NEAR(cm_lr_schedule_momentum(&s, 0), 0.996, 1e-15);
  CHECK_NEAR(cm_lr_schedule_momentum(&s, T / 3), 0.996, 1e-15);
}

static void test_lr_eta_min_and_no_warmup(void) {
  cm_model_config c;
  cm_model_config_default(&c);
  c.optimizer.base_lr = 1e-3;
  c.optimizer.batch = 96; /* odd batch: peak 3.75e-4 */
  c.schedule.epochs = 7;
  c.schedule.warmup_epochs = 0;
  c.schedule.min_lr = 1e-5;
  cm_lr_schedule s;
  cm_err err = {0};
  CHECK(cm_lr_schedule_from_config(&c, 13, &s, &err) == CM_OK);
  CHECK_NEAR(s.peak_lr, 3.75e-4, 1e-15);
  CHECK(s.warmup_iters == 0 && s.total_iters == 91);
  CHECK_NEAR(cm_lr_schedule_lr(&s, 0), 3.75e-4, 1e-15); /* warmup 0: straight into cosine */
  for (int64_t t = 0; t < 91; t += 7)
    CHECK_NEAR(cm_lr_schedule_lr(&s, t), ref_lr(3.75e-4, 1e-4, 1e-5, 0, 91, t), 1e-15);
  CHECK(cm_lr_schedule_lr(&s, 90) > 1e-5);
  CHECK(cm_lr_schedule_lr(&s, 90) < 1e-5 + 1e-6);

  /* warmup of one iteration: t=0 uses the start factor, t=1 the peak */
  c.schedule.warmup_epochs = 1;
  CHECK(cm_lr_schedule_from_config(&c, 1, &s, &err) == CM_OK);
  CHECK_NEAR(cm_lr_schedule_lr(&s, 0), 3.75e-4 * 1e-4, 1e-15);
  CHECK_NEAR(cm_lr_schedule_lr(&s, 1), 3.75e-4, 1e-15);

  /* errors */
  c.schedule.warmup_epochs = 7;
  CHECK(cm_lr_schedule_from_config(&c, 13, &s, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "warmup_epochs");
  c.schedule.warmup_epochs = 1;
  CHECK(cm_lr_schedule_from_config(&c, 0, &s, &err) == CM_EINVALID);
  c.optimizer.batch = 0;
  CHECK(cm_lr_schedule_from_config(&c, 5, &s, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "optimizer.batch");
}

static void test_momentum_ramp(void) {
  cm_lr_schedule s = {.peak_lr = 1,
                      .warmup_start_factor = 1e-4,
                      .warmup_iters = 3,
                      .total_iters = 1000,
                      .momentum_base = 0.99,
                      .momentum_end = 1.0};
  const double pi = 3.14159265358979323846;
  int64_t ks[] = {0, 1, 250, 499, 500, 501, 999, 1000};
  for (int i = 0; i < 8; i++) {
    double k = (double)ks[i];
    double ref = 1.0 - (1.0 - 0.99) * (cos(pi * k / 1000) + 1) / 2;
    CHECK_NEAR(cm_lr_schedule_momentum(&s, ks[i]), ref, 1e-15);
  }
  CHECK_NEAR(cm_lr_schedule_momentum(&s, 0), 0.99, 1e-15);
  CHECK_NEAR(cm_lr_schedule_momentum(&s, 500), 0.995, 1e-15);
  CHECK_NEAR(cm_lr_schedule_momentum(&s, 1000), 1.0, 1e-15);
  CHECK_NEAR(cm_lr_schedule_momentum(&s, 5000), 1.0, 1e-15);
}

static void test_metrics_roundtrip(void) {
  char path[] = "/tmp/cmaec_metrics_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  close(fd);
  cm_err err = {0};
  cm_metrics_writer *w;
  CHECK(cm_metrics_open(path, -1, &w, &err) == CM_OK);
  const char *names[] = {"grad_norm", "loss_scale"};
  for (int i = 0; i < 5; i++) {
    double extra[] = {0.1 * i + 1.0 / 3.0, 65536};
    cm_metrics_row r = {.step = i,
                        .epoch = i / 2,
                        .loss_rc = 1.0 / (i + 1),
                        .loss_ct = 2.5 - i,
                        .loss = 1.0 / (i + 1) + 2.5 - i,
                        .lr = 1e-4 * i,
                        .momentum = 0.996,
                        .images_per_s = 123.456,
                        .step_ms = 7.25,
                        .n_extra = i >= 2 ? 2 : 0,
                        .extra_names = names,
                        .extra_values = extra};
    if (i == 3) r.loss_ct = NAN;
    CHECK(cm_metrics_write(w, &r, &err) == CM_OK);
  }
  cm_metrics_close(w);
  /* a torn line after a crash mid-write */
  FILE *f = fopen(path, "ab");
  fputs("{\"step\":5,\"epoch\":2,\"loss_r", f);
  fclose(f);
  cm_metrics_table t;
  CHECK(cm_metrics_read(path, &t, &err) == CM_OK);
  CHECK(t.n_rows == 5);
  CHECK(t.n_cols == 11);
  int cs = cm_metrics_column(&t, "step"), cl = cm_metrics_column(&t, "loss_rc"),
      cc = cm_metrics_column(&t, "loss_ct"), cg = cm_metrics_column(&t, "grad_norm");
  CHECK(cs == 0 && cl >= 0 && cc >= 0 && cg >= 0);
  CHECK(cm_metrics_column(&t, "nope") == -1);
  if (cs == 0 && cl >= 0 && cc >= 0 && cg >= 0 && t.n_rows == 5) {
    for (int i = 0; i < 5; i++) {
      CHECK(t.values[i * t.n_cols + cs] == i);
      CHECK(t.values[i * t.n_cols + cl] == 1.0 / (i + 1)); /* %.17g is exact */
      if (i < 2)
        CHECK(isnan(t.values[i * t.n_cols + cg]));
      else
        CHECK(t.values[i * t.n_cols + cg] == 0.1 * i + 1.0 / 3.0);
    }
    CHECK(isnan(t.values[3 * t.n_cols + cc]));
  }
  cm_metrics_table_free(&t);
  /* reopening removes the torn line; resuming from step 3 drops steps 3 and 4 */
  CHECK(cm_metrics_open(path, 3, &w, &err) == CM_OK);
  cm_metrics_row r5 = {.step = 3, .epoch = 1, .loss = 9.5};
  CHECK(cm_metrics_write(w, &r5, &err) == CM_OK);
  cm_metrics_close(w);
  CHECK(cm_metrics_read(path, &t, &err) == CM_OK);
  CHECK(t.n_rows == 4);
  int cls = cm_metrics_column(&t, "loss");
  if (t.n_rows == 4 && cls >= 0) {
    CHECK(t.values[3 * t.n_cols + 0] == 3 && t.values[3 * t.n_cols + cls] == 9.5);
    CHECK(t.values[2 * t.n_cols + 0] == 2);
  }
  cm_metrics_table_free(&t);
  /* a plain reopen keeps everything */
  CHECK(cm_metrics_open(path, -1, &w, &err) == CM_OK);
  cm_metrics_close(w);
  CHECK(cm_metrics_read(path, &t, &err) == CM_OK && t.n_rows == 4);
  cm_metrics_table_free(&t);
  /* appending continues the file; a bad line in the middle is an error with its line number */
  f = fopen(path, "ab");
  fputs("\nnot json\n{\"step\":9}\n", f);
  fclose(f);
  CHECK(cm_metrics_read(path, &t, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, ":6:"); /* 4 rows, an empty line, then the bad one */
  CHECK_STR_CONTAINS(err.msg, path);
  remove(path);
  CHECK(cm_metrics_read(path, &t, &err) == CM_EINVALID);
}

static void test_progress(void) {
  char buf[4096];
  memset(buf, 0, sizeof buf);
  FILE *f = fmemopen(buf, sizeof buf - 1, "w");
  cm_progress p;
  cm_progress_init(&p, f, 10, 4, 0);
  for (int i = 0; i < 10; i++) cm_progress_update(&p, i, 1.5 - 0.1 * i);
  cm_progress_finish(&p);
  fclose(f);
  int lines = 0;
  for (char *c = buf; *c; c++) lines += *c == '\n';
  CHECK_MSG(lines == 3, "%s", buf); /* steps 4, 8 and the last one */
  CHECK_STR_CONTAINS(buf, "step 4/10");
  CHECK_STR_CONTAINS(buf, "step 10/10");
  CHECK_STR_CONTAINS(buf, "loss 0.6000");
  memset(buf, 0, sizeof buf);
  f = fmemopen(buf, sizeof buf - 1, "w");
  cm_progress_init(&p, f, 3, 1, 1);
  for (int i = 0; i < 3; i++) cm_progress_update(&p, i, 2.0);
  cm_progress_finish(&p);
  fclose(f);
  CHECK_STR_CONTAINS(buf, "\r[");
  CHECK_STR_CONTAINS(buf, "3/3");
  CHECK_STR_CONTAINS(buf, "steps/s");
  CHECK_STR_CONTAINS(buf, "eta");
  CHECK(buf[strlen(buf) - 1] == '\n');
}

TEST_MAIN(TEST(test_lr_default_config), TEST(test_lr_eta_min_and_no_warmup),
          TEST(test_momentum_ramp), TEST(test_metrics_roundtrip), TEST(test_progress))
