/* runtime/libraries.c — the CUDA driver, NCCL and MPI, found (or not) at run time. */
#include "runtime.h"

#include <dlfcn.h>
#include <string.h>

typedef int (*cu_init_fn)(unsigned);
typedef int (*cu_count_fn)(int *);
typedef int (*cu_device_fn)(int *, int);
typedef int (*cu_name_fn)(char *, int, int);
typedef int (*cu_attr_fn)(int *, int, int);
typedef int (*cu_version_fn)(int *);

/* CUdevice_attribute values from cuda.h (stable across CUDA versions). */
enum { CU_ATTR_CC_MAJOR = 75, CU_ATTR_CC_MINOR = 76 };

void cm_library_find_cuda(cm_component *out) {
  out->name = "CUDA driver";
  static const char *const names[] = {"libcuda.so.1", "libcuda.so", NULL};
  char why[400];
  void *h = cm_dlopen_first(names, why, sizeof why);
  if (!h) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "not found: %s (no NVIDIA driver here)", why);
    return;
  }
  cu_init_fn init;
  cu_count_fn count;
  cu_device_fn device;
  cu_name_fn name;
  cu_attr_fn attr;
  cu_version_fn version;
  *(void **)&init = dlsym(h, "cuInit");
  *(void **)&count = dlsym(h, "cuDeviceGetCount");
  *(void **)&device = dlsym(h, "cuDeviceGet");
  *(void **)&name = dlsym(h, "cuDeviceGetName");
  *(void **)&attr = dlsym(h, "cuDeviceGetAttribute");
  *(void **)&version = dlsym(h, "cuDriverGetVersion");
  int rc, n = 0, v = 0;
  if (!init || !count || !device || !name || !attr || !version) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "libcuda loaded but lacks driver API symbols");
  } else if ((rc = init(0)) != 0) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "cuInit failed with CUresult %d (no usable GPU)", rc);
  } else if ((rc = count(&n)) != 0 || n == 0) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "driver loaded but no GPU (CUresult %d)", rc);
  } else {
    out->found = true;
    version(&v);
    size_t len =
        (size_t)snprintf(out->detail, sizeof out->detail, "driver %d.%d, %d GPU%s:", v / 1000,
                         (v % 1000) / 10, n, n == 1 ? "" : "s");
    for (int i = 0; i < n && len < sizeof out->detail; i++) {
      int dev = 0, major = 0, minor = 0;
      char gpu[128] = "?";
      device(&dev, i);
      name(gpu, sizeof gpu, dev);
      attr(&major, CU_ATTR_CC_MAJOR, dev);
      attr(&minor, CU_ATTR_CC_MINOR, dev);
      len += (size_t)snprintf(out->detail + len, sizeof out->detail - len, " [%d] %s (sm_%d%d)", i,
                              gpu, major, minor);
    }
  }
  /* Kept loaded: the runtime uses it later, and unloading hides its allocations from LSan. */
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
