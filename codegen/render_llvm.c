/* codegen/render_llvm.c — kernel IR to LLVM IR through the C API (to be written). */
#include "codegen.h"

cm_status cm_render_llvm(const cm_kernel *k, LLVMModuleRef m, const cm_llvm_render_opts *o,
                         cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cm_render_llvm: not implemented yet");
}
