/* runtime/libraries.c — the CUDA driver, NCCL and MPI, found (or not) at run time. */
#include "runtime.h"

#include <dlfcn.h>
#include <string.h>

void cm_library_find_cuda(cm_component *out) {
  out->name = "CUDA driver";
  const cm_cuda_driver *d = NULL;
  cm_err err = {0};
  if (cm_cuda_driver_load(&d, &err)) {
    out->found = false;
    const char *why = err.msg;
    if (strncmp(why, "CUDA driver not found: ", 23) == 0) why += 23; /* the row names it */
    snprintf(out->detail, sizeof out->detail, "%s", why);
    return;
  }
  enum { MAX_DEVICES = 16 };
  cm_cuda_device devs[MAX_DEVICES];
  int n = cm_cuda_devices(d, devs, MAX_DEVICES, &err), v = 0;
  if (n == 0) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "driver loaded but no GPU (%s)",
             err.status ? err.msg : "the driver counts none");
    return;
  }
  out->found = true;
  if (d->driver_get_version) d->driver_get_version(&v);
  size_t len =
      (size_t)snprintf(out->detail, sizeof out->detail, "driver %d.%d, %d GPU%s:", v / 1000,
                       (v % 1000) / 10, n, n == 1 ? "" : "s");
  for (int i = 0; i < n && i < MAX_DEVICES && len < sizeof out->detail; i++)
    len += (size_t)snprintf(out->detail + len, sizeof out->detail - len, " [%d] %s (sm_%d%d)", i,
                            devs[i].name, devs[i].cc_major, devs[i].cc_minor);
}

typedef int (*nccl_version_fn)(int *);

void cm_library_find_nccl(cm_component *out) {
  out->name = "NCCL";
  static const char *const names[] = {"libnccl.so.2", "libnccl.so",
                                      "/usr/local/cuda/lib64/libnccl.so.2", NULL};
  char why[400];
  void *h = cm_dlopen_first(names, why, sizeof why);
  if (!h) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "not found: %s", why);
    return;
  }
  nccl_version_fn version;
  *(void **)&version = dlsym(h, "ncclGetVersion");
  int v = 0;
  if (!version || version(&v) != 0) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "loaded but ncclGetVersion failed");
  } else {
    out->found = true;
    /* NCCL >= 2.9 encodes major*10000 + minor*100 + patch. */
    snprintf(out->detail, sizeof out->detail, "%d.%d.%d (needs a GPU to run)", v / 10000,
             (v % 10000) / 100, v % 100);
  }
  /* Kept loaded: the runtime uses it later, and unloading hides its allocations from LSan. */
}

typedef int (*mpi_libversion_fn)(char *, int *);

void cm_library_find_mpi(cm_component *out) {
  out->name = "MPI";
  static const char *const names[] = {"libmpi.so.40", "libmpi.so.12", "libmpi.so", NULL};
  char why[400];
  void *h = cm_dlopen_first(names, why, sizeof why);
  if (!h) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "not found: %s (install openmpi-bin libopenmpi-dev)",
             why);
    return;
  }
  mpi_libversion_fn libversion;
  *(void **)&libversion = dlsym(h, "MPI_Get_library_version");
  char text[8192] = "";
  int len = 0;
  if (!libversion || libversion(text, &len) != 0) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "loaded but MPI_Get_library_version failed");
  } else {
    out->found = true;
    char *nl = strpbrk(text, "\n,");
    if (nl) *nl = 0;
    snprintf(out->detail, sizeof out->detail, "%.500s", text);
  }
  /* Kept loaded: the runtime uses it later, and unloading hides its allocations from LSan. */
}

int cm_library_find_all(cm_component *out, int max) {
  void (*probes[])(cm_component *) = {cm_compiler_find_llvm, cm_compiler_find_nvrtc,
                                      cm_library_find_cuda, cm_library_find_nccl,
                                      cm_library_find_mpi};
  int n = 0;
  for (size_t i = 0; i < sizeof probes / sizeof probes[0] && n < max; i++) {
    memset(&out[n], 0, sizeof out[n]);
    probes[i](&out[n++]);
  }
  return n;
}
