/* codegen/lower.c — plan groups to the kernel IR (to be written). */
#include "codegen.h"

cm_status cm_lower_group(const cm_graph *g, const cm_plan *p, int group, const cm_lower_opts *o,
                         cm_kernel *out, cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_lower_group: not implemented yet");
}
cm_status cm_lower_plan(const cm_graph *g, const cm_plan *p, const cm_lower_opts *o,
                        cm_kprogram *out, cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_lower_plan: not implemented yet");
}
