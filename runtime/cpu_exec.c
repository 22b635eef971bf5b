/* runtime/cpu_exec.c — the CPU executor (to be written). */
#include "runtime.h"

cm_status cm_cpu_program_build(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                               cm_cpu_program **out, cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_cpu_program_build: not implemented yet");
}
void cm_cpu_program_free(cm_cpu_program *pr) {}
const cm_graph *cm_cpu_program_graph(const cm_cpu_program *pr) {
  return NULL;
}
cm_status cm_cpu_program_run(cm_cpu_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                             cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_cpu_program_run: not implemented yet");
}
void cm_cpu_program_stats(const cm_cpu_program *pr, cm_cpu_stats *out) {}
int cm_cpu_program_profile(const cm_cpu_program *pr, const cm_kernel_profile **out) {
  return 0;
}
