/* runtime/tune_pending.h — TEMPORARY: the contract's declarations of codegen/tune_space.c
 * (helper tunespace) until their branches are merged;
 * deleted then. */
#ifndef CMAEC_TUNE_PENDING_H
#define CMAEC_TUNE_PENDING_H
#include "runtime.h"
#include <stdio.h>

#define CM_TUNE_SPACE_VERSION 1
#define CM_TUNE_MAX_KNOBS 8
#define CM_TUNE_MAX_VALUES 16
typedef struct cm_tune_knob {
  char name[16];
  int n_values;
  int values[CM_TUNE_MAX_VALUES];
  int default_index;
} cm_tune_knob;
typedef struct cm_tune_space {
  int n_knobs;
  cm_tune_knob knobs[CM_TUNE_MAX_KNOBS];
  int64_t n_points;
} cm_tune_space;
typedef struct cm_tune_point {
  int value[CM_TUNE_MAX_KNOBS];
} cm_tune_point;
cm_status cm_tune_space_of(const cm_kernel *k, int stage, const cm_target *t, cm_tune_space *out,
                           cm_err *err);
void cm_tune_point_default(const cm_tune_space *s, cm_tune_point *out);
void cm_tune_point_at(const cm_tune_space *s, int64_t i, cm_tune_point *out);
cm_status cm_tune_apply(cm_kernel *k, int stage, const cm_target *t, const cm_tune_point *p,
                        cm_err *err);
int cm_tune_point_format(const cm_tune_space *s, const cm_tune_point *p, char *buf, size_t size);
cm_status cm_tune_point_parse(const cm_tune_space *s, const char *text, cm_tune_point *out,
                              cm_err *err);
void cm_kernel_structural_hash(const cm_kernel *k, char out[65]);
double cm_tune_model_cost(const cm_kernel *k, int stage, const cm_target *t);

#endif
