/* codegen/render_cuda.c — kernel IR to CUDA C (to be written). */
#include "codegen.h"

cm_status cm_render_cuda(const cm_kernel *k, const cm_cuda_render_opts *o, bool with_prelude,
                         char **source, cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_render_cuda: not implemented yet");
}
cm_cuda_launch cm_cuda_stage_launch(const cm_kernel *k, int stage, const cm_cuda_render_opts *o) {
  cm_cuda_launch l = {{1, 1, 1}, {1, 1, 1}, 0};
  return l;
}
