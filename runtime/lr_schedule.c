/* runtime/lr_schedule.c — the per-iteration learning-rate and EMA-momentum
 * schedules of CMAE pre-training (CMAE.md §4, §8: mmengine LinearLR warmup then
 * CosineAnnealingLR, both converted to iterations). */
#include "training.h"

#include <math.h>

cm_status cm_lr_schedule_from_config(const cm_model_config *c, int64_t iters_per_epoch,
                                     cm_lr_schedule *out, cm_err *err) {
  if (iters_per_epoch < 1)
    return cm_errorf(err, CM_EINVALID, "schedule: iterations per epoch %lld must be >= 1",
                     (long long)iters_per_epoch);
  if (c->optimizer.batch < 1)
    return cm_errorf(err, CM_EINVALID, "schedule: optimizer.batch %d must be >= 1",
                     c->optimizer.batch);
  if (c->schedule.epochs < 1 || c->schedule.warmup_epochs < 0 ||
      c->schedule.warmup_epochs >= c->schedule.epochs)
    return cm_errorf(err, CM_EINVALID,
                     "schedule: schedule.warmup_epochs %d must lie in [0, schedule.epochs %d)",
                     c->schedule.warmup_epochs, c->schedule.epochs);
  if (!(c->optimizer.base_lr > 0) || !isfinite(c->optimizer.base_lr))
    return cm_errorf(err, CM_EINVALID, "schedule: optimizer.base_lr %g must be > 0",
                     c->optimizer.base_lr);
  if (!(c->schedule.min_lr >= 0) || !isfinite(c->schedule.min_lr))
    return cm_errorf(err, CM_EINVALID, "schedule: schedule.min_lr %g must be >= 0",
                     c->schedule.min_lr);
  if (!(c->schedule.warmup_start_factor > 0 && c->schedule.warmup_start_factor <= 1))
    return cm_errorf(err, CM_EINVALID,
                     "schedule: schedule.warmup_start_factor %g must be in (0, 1]",
                     c->schedule.warmup_start_factor);
  out->peak_lr = c->optimizer.base_lr * c->optimizer.batch / 256.0;
  out->min_lr = c->schedule.min_lr;
  out->warmup_start_factor = c->schedule.warmup_start_factor;
  out->warmup_iters = (int64_t)c->schedule.warmup_epochs * iters_per_epoch;
  out->total_iters = (int64_t)c->schedule.epochs * iters_per_epoch;
  out->momentum_base = c->schedule.momentum_base;
  out->momentum_end = c->schedule.momentum_end;
  return CM_OK;
}

double cm_lr_schedule_lr(const cm_lr_schedule *s, int64_t t) {
  if (t < 0) t = 0;
  if (s->total_iters > 0 && t >= s->total_iters) t = s->total_iters - 1;
  int64_t w = s->warmup_iters;
  if (t < w) {
    double f0 = s->warmup_start_factor;
    return s->peak_lr * (f0 + (1.0 - f0) * (double)t / (double)w);
  }
  int64_t span = s->total_iters - w;
  if (span <= 0) return s->peak_lr;
  double c = cos(M_PI * (double)(t - w) / (double)span);
  return s->min_lr + (s->peak_lr - s->min_lr) * (1.0 + c) / 2.0;
}

double cm_lr_schedule_momentum(const cm_lr_schedule *s, int64_t t) {
  if (t < 0) t = 0;
  if (t > s->total_iters) t = s->total_iters;
  double k = s->total_iters > 0 ? (double)t / (double)s->total_iters : 1.0;
  return s->momentum_end - (s->momentum_end - s->momentum_base) * (cos(M_PI * k) + 1.0) / 2.0;
}
