/* tests/emu/emu.h — the emulated CUDA device: a test target, never a user backend.
 *
 * The CUDA backend's own code (runtime/backend_cuda.c) runs over a second
 * implementation of the driver table (cm_cuda_driver) and of the compiler
 * (cm_cuda_compiler), so that CI, which has no GPU, runs it:
 *   - device memory is host memory (malloc), so AddressSanitizer sees a kernel
 *     that reads or writes outside its allocation;
 *   - a module is the program's rendered CUDA C compiled by the host C++
 *     compiler (with -DCMAEC_EMULATED, under tests/emu/cuda_shim.hpp) into a
 *     shared object: threads and blocks, __syncthreads, shared memory, warp
 *     shuffles and votes, atomics and the prelude's mma helper;
 *   - streams and events are ordered queues, run when the host waits;
 *   - graph capture records a stream's launches and replays them.
 *
 * Two halves, one contract: tests/emu/emu_compiler.c and cuda_shim.hpp make
 * module images; tests/emu/emu_driver.c loads them and calls what they export. */
#ifndef CMAEC_TESTS_EMU_H
#define CMAEC_TESTS_EMU_H

#include "runtime/runtime.h"

#include <stdint.h>

/* The driver table over host memory (tests/emu/emu_driver.c). */
const cm_cuda_driver *emu_driver(void);
/* The compiler: rendered CUDA C under the shim, built by the host C++ compiler
 * into a shared object (tests/emu/emu_compiler.c). Its name carries the C++
 * compiler's version and flags (the cache key). */
const cm_cuda_compiler *emu_compiler(void);

/* The target the emulated device runs: its compute capability's arch (sm_90). */
static inline cm_status emu_device_target(cm_target *t, cm_err *err) {
  const cm_cuda_driver *d = emu_driver();
  int dev = 0, major = 0, minor = 0;
  if (d->init(0) != 0 || d->device_get(&dev, 0) != 0 ||
      d->device_get_attribute(&major, CM_CU_ATTR_CC_MAJOR, dev) != 0 ||
      d->device_get_attribute(&minor, CM_CU_ATTR_CC_MINOR, dev) != 0)
    return cm_errorf(err, CM_EINTERNAL, "emu_device_target: the emulated driver failed");
  char arch[16];
  cm_cuda_arch_for(major, minor, arch, sizeof arch);
  return cm_target_cuda(arch, t, err);
}

/* A module image: this header, then so_bytes of a shared object. */
#define EMU_IMAGE_MAGIC "CMEMUSO1"
typedef struct emu_image_header {
  char magic[8];
  uint64_t so_bytes;
} emu_image_header;

/* What the shared object exports (extern "C"), as the driver calls it: */
/* The number of parameters of __global__ function name (every one 8 bytes: the
 * rendered kernels take pointers only); -1 when the module has no such function. */
typedef int (*emu_module_params_fn)(const char *name);
#define EMU_MODULE_PARAMS_SYMBOL "cm_emu_params"
/* Runs the whole grid of function name (block after block, a block's threads
 * as fibers on the calling thread), params as cuLaunchKernel takes them
 * (params[i] points at parameter i's value). shared_bytes: the dynamic shared
 * memory. Returns a CUresult: 0; 1 (CUDA_ERROR_INVALID_VALUE) for a block of
 * more than 1024 threads or a zero extent; 500 (CUDA_ERROR_NOT_FOUND). */
typedef int (*emu_module_launch_fn)(const char *name, const unsigned grid[3],
                                    const unsigned block[3], unsigned shared_bytes, void **params);
#define EMU_MODULE_LAUNCH_SYMBOL "cm_emu_launch"

/* What the emulated driver has done since the process started (for tests). */
typedef struct emu_counters {
  long launches;       /* kernels run (eager and replayed) */
  long graph_launches; /* graphs replayed */
  long copies;         /* memcpy and memset operations run */
  long modules_loaded;
} emu_counters;
void emu_counters_get(emu_counters *out);

#endif
