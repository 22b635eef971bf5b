/* runtime/runtime.h — running programs: the contract of the runtime layer.
 *
 * Defines (so far): probes of the run-time libraries loaded with dlopen — the
 * CUDA driver (and its GPUs), NCCL and MPI — and the report `cmaec info`
 * prints. Executors, comm, data and the trainer come with their issues. */
#ifndef CMAEC_RUNTIME_H
#define CMAEC_RUNTIME_H

#include "../codegen/codegen.h"

void cm_probe_cuda(cm_component *out);
void cm_probe_nccl(cm_component *out);
void cm_probe_mpi(cm_component *out);

/* Fills up to max components (LLVM, NVRTC, CUDA driver, NCCL, MPI); returns the count. */
int cm_probe_all(cm_component *out, int max);

#endif
