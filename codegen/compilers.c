/* codegen/compilers.c — which compilers are available, and why not where not. */
#include "codegen.h"

#include <dlfcn.h>
#include <string.h>
#if CMAEC_HAVE_LLVM
#include <llvm-c/Core.h>
#include <llvm-c/TargetMachine.h>
#endif

void *cm_dlopen_first(const char *const *names, char *why_buf, size_t why_size) {
  if (why_size) why_buf[0] = 0;
  for (int i = 0; names[i]; i++) {
    void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (h) return h;
    const char *e = dlerror();
    if (why_size) snprintf(why_buf, why_size, "%s", e ? e : "dlopen failed");
  }
  return NULL;
}

void cm_compiler_find_llvm(cm_component *out) {
  out->name = "LLVM";
#if !CMAEC_HAVE_LLVM
  out->found = false;
  snprintf(out->detail, sizeof out->detail,
           "left out of this build (-DCMAEC_LLVM=OFF): no cpu backend; use --backend cuda or ref");
#else
  unsigned major, minor, patch;
  LLVMGetVersion(&major, &minor, &patch);
  char *cpu = LLVMGetHostCPUName();
  out->found = true;
  snprintf(out->detail, sizeof out->detail, "%u.%u.%u (linked; host CPU %s)", major, minor, patch,
           cpu ? cpu : "?");
  LLVMDisposeMessage(cpu);
#endif
}

const char *const cm_nvrtc_library_names[] = {"libnvrtc.so.13",
                                              "libnvrtc.so.12",
                                              "libnvrtc.so",
                                              "/usr/local/cuda/lib64/libnvrtc.so.13",
                                              "/usr/local/cuda/lib64/libnvrtc.so.12",
                                              "/usr/local/cuda/lib64/libnvrtc.so",
                                              NULL};

typedef int (*nvrtc_version_fn)(int *, int *);

void cm_compiler_find_nvrtc(cm_component *out) {
  out->name = "NVRTC";
  char why[400];
  void *h = cm_dlopen_first(cm_nvrtc_library_names, why, sizeof why);
  if (!h) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "not found: %s", why);
    return;
  }
  nvrtc_version_fn version;
  *(void **)&version = dlsym(h, "nvrtcVersion");
  int major = 0, minor = 0;
  if (!version || version(&major, &minor) != 0) {
    out->found = false;
    snprintf(out->detail, sizeof out->detail, "loaded but nvrtcVersion failed");
  } else {
    out->found = true;
    snprintf(out->detail, sizeof out->detail, "%d.%d (compiles CUDA C to CUBIN; no GPU needed)",
             major, minor);
  }
  /* Kept loaded: the runtime uses it later, and unloading hides its allocations from LSan. */
}
