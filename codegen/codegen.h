/* codegen/codegen.h — code generation: the contract of the codegen layer.
 *
 * Defines (so far): probes of the compilers cmaec generates code with — LLVM
 * (linked at build time) and NVRTC (loaded with dlopen at run time, so the
 * binary runs where no CUDA is installed). Kernel IR, the renderers and the
 * JIT come with the code-generation issue. */
#ifndef CMAEC_CODEGEN_H
#define CMAEC_CODEGEN_H

#include "../passes/passes.h"

/* What a probe found: found, and a one-line detail (version, or why not). */
typedef struct cm_component {
  const char *name;
  bool found;
  char detail[512];
} cm_component;

void cm_probe_llvm(cm_component *out);
void cm_probe_nvrtc(cm_component *out);

/* dlopen the first loadable of the NULL-terminated names; on failure *why holds
 * the last dlerror() (copied into why_buf). */
void *cm_dlopen_first(const char *const *names, char *why_buf, size_t why_size);

#endif
