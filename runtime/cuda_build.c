/* runtime/cuda_build.c — a program's kernels built for a CUDA target: each
 * distinct kernel rendered under one name (CM_CUDA_MODULE_KERNEL) with the
 * prelude and compiled as its own module by a cm_cuda_compiler (NVRTC, or the
 * emulated device's host compiler). */
#include "runtime.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

const char *cm_cache_dir(const char *given, char *buf, size_t size) {
  if (given) return *given ? given : NULL;
  const char *e = getenv("CMAEC_CACHE_DIR");
  if (e) return *e ? e : NULL;
  const char *x = getenv("XDG_CACHE_HOME");
  if (x && *x) {
    snprintf(buf, size, "%s/cmaec", x);
    return buf;
  }
  const char *h = getenv("HOME");
  if (!h || !*h) return NULL;
  snprintf(buf, size, "%s/.cache/cmaec", h);
  return buf;
}

/* ---- the NVRTC compiler ---------------------------------------------------- */

static cm_nvrtc *nvrtc_lib;
static cm_err nvrtc_err;
static cm_status nvrtc_status;
static char nvrtc_name[64];
static pthread_once_t nvrtc_once = PTHREAD_ONCE_INIT;

static cm_status nvrtc_compile(void *self, const char *source, const char *name, const char *arch,
                               cm_cubin *out, cm_err *err) {
  return cm_nvrtc_compile(self, source, name, arch, NULL, 0, out, err);
}

static cm_cuda_compiler nvrtc_compiler = {NULL, "cubin", nvrtc_compile, NULL};

static void load_nvrtc(void) {
  nvrtc_status = cm_nvrtc_load(&nvrtc_lib, &nvrtc_err);
  if (nvrtc_status != CM_OK) return;
  snprintf(nvrtc_name, sizeof nvrtc_name, "nvrtc %s", cm_nvrtc_version(nvrtc_lib));
  nvrtc_compiler.name = nvrtc_name;
  nvrtc_compiler.self = nvrtc_lib;
  /* kept loaded for the process, as the driver is */
}

cm_status cm_cuda_compiler_nvrtc(const cm_cuda_compiler **out, cm_err *err) {
  pthread_once(&nvrtc_once, load_nvrtc);
  *out = NULL;
  if (nvrtc_status != CM_OK) {
    if (err) *err = nvrtc_err;
    return nvrtc_status;
  }
  *out = &nvrtc_compiler;
  return CM_OK;
}

/* ---- building ---------------------------------------------------------------- */

cm_status cm_cuda_module_source(const cm_kernel *k, const cm_target *t, bool no_templates,
                                char **source, cm_err *err) {
  *source = NULL;
  cm_kernel anon = *k;
  snprintf(anon.name, sizeof anon.name, "%s", CM_CUDA_MODULE_KERNEL);
  cm_cuda_render_opts ro = {t, no_templates};
  cm_status st = cm_render_cuda(&anon, &ro, true, source, err);
  if (st != CM_OK) {
    free(*source);
    *source = NULL;
    cm_err_prefix(err, "%s: ", k->name);
  }
  return st;
}

void cm_cuda_build_free(cm_cuda_build *b) {
  if (!b) return;
  for (int i = 0; i < b->n_modules; i++) cm_cubin_free(&b->modules[i].image);
  free(b->modules);
  free(b->module_of);
  memset(b, 0, sizeof *b);
}

cm_status cm_cuda_build_program(const cm_kprogram *kp, const cm_target *t, bool no_templates,
                                const cm_cuda_compiler *c, const char *cache_dir, int threads,
                                cm_cuda_build *out, cm_err *err) {
  (void)cache_dir, (void)threads;
  memset(out, 0, sizeof *out);
  int nk = kp->n_kernels;
  char **src = calloc((size_t)nk + 1, sizeof *src);
  out->modules = calloc((size_t)nk + 1, sizeof *out->modules);
  out->module_of = calloc((size_t)nk + 1, sizeof *out->module_of);
  if (!src || !out->modules || !out->module_of) {
    free(src);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  cm_status st = CM_OK;
  double t0 = now_ms();
  for (int i = 0; i < nk && st == CM_OK; i++) {
    st = cm_cuda_module_source(&kp->kernels[i], t, no_templates, &src[i], err);
    if (st != CM_OK) break;
    out->module_of[i] = -1;
    for (int q = 0; q < i; q++)
      if (out->module_of[q] >= 0 && out->modules[out->module_of[q]].kernel == q &&
          strcmp(src[q], src[i]) == 0) {
        out->module_of[i] = out->module_of[q];
        break;
      }
    if (out->module_of[i] < 0) {
      out->module_of[i] = out->n_modules;
      out->modules[out->n_modules++].kernel = i;
    }
  }
  out->render_ms = now_ms() - t0;
  t0 = now_ms();
  out->threads = 1;
  for (int m = 0; m < out->n_modules && st == CM_OK; m++) {
    cm_cuda_module *mod = &out->modules[m];
    const cm_kernel *k = &kp->kernels[mod->kernel];
    char name[96];
    snprintf(name, sizeof name, "%s.cu", k->name);
    st = c->compile(c->self, src[mod->kernel], name, t->arch, &mod->image, err);
    if (st != CM_OK) cm_err_prefix(err, "kernel %s (%s): ", k->name, c->name);
    out->image_bytes += (int64_t)mod->image.size;
  }
  out->compile_ms = now_ms() - t0;
  for (int i = 0; i < nk; i++) free(src[i]);
  free(src);
  if (st != CM_OK) cm_cuda_build_free(out);
  return st;
}
