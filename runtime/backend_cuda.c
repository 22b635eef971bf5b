/* runtime/backend_cuda.c — the CUDA backend (cm_backend_cuda): a program's
 * kernels built as modules (cm_cuda_build_program: each distinct kernel once,
 * by a cm_cuda_compiler, through the on-disk cache) and run through a
 * cm_cuda_driver. The whole program's CUDA C (prelude once, every kernel under
 * its own name) is rendered for cm_program_emit. */
#include "runtime.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct cuda_state {
  char *source;  /* the whole program: prelude, then every kernel */
  size_t *begin; /* per kernel (and one past the last): its text in source; the prelude is
                    source[0, begin[0]) */
  const cm_cuda_compiler *compiler;
  cm_cuda_build build;
  bool compiled; /* build holds the program's modules (not render_only) */
} cuda_state;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static cm_status not_yet(const char *what, cm_err *err) {
  return cm_errorf(err, CM_EINVALID,
                   "cuda backend: %s: CUDA execution arrives with issue 15 (programs for a CUDA "
                   "target are compiled only: cm_compile_opts.compile_only)",
                   what);
}

static cm_status cuda_compile(cm_program *p, const cm_compile_opts *opts, cm_program_stats *stats,
                              cm_err *err) {
  const cm_target *t = cm_program_target(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  if (t->kind != CM_TARGET_CUDA)
    return cm_errorf(err, CM_EINVALID, "cuda backend: the target is not a CUDA GPU (%s)", t->arch);
  cuda_state *cs = calloc(1, sizeof *cs);
  if (!cs) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_program_set_impl(p, cs);
  cs->begin = calloc((size_t)kp->n_kernels + 1, sizeof *cs->begin);
  if (!cs->begin) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_cuda_render_opts ro = {t, opts->no_templates};
  double t0 = now_ms();
  for (int i = 0; i < kp->n_kernels; i++) {
    size_t at = cs->source ? strlen(cs->source) : 0;
    cm_status st = cm_render_cuda(&kp->kernels[i], &ro, i == 0, &cs->source, err);
    if (st != CM_OK) return st;
    if (i == 0) { /* the prelude comes first: the kernel's own text starts at its banner */
      const char *k0 = strstr(cs->source + at, "// kernel ");
      at = k0 ? (size_t)(k0 - cs->source) : at;
    }
    cs->begin[i] = at;
  }
  if (!cs->source && !(cs->source = calloc(1, 1)))
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cs->begin[kp->n_kernels] = strlen(cs->source);
  stats->render_ms = now_ms() - t0;
  stats->n_distinct_kernels = kp->n_kernels;
  if (opts->render_only) return CM_OK;
  const cm_cuda_backend_opts *bo = opts->backend_opts;
  cs->compiler = bo ? bo->compiler : NULL;
  cm_status st = cs->compiler ? CM_OK : cm_cuda_compiler_nvrtc(&cs->compiler, err);
  char cbuf[4096];
  const char *cache = cm_cache_dir(opts->cache_dir, cbuf, sizeof cbuf);
  if (st == CM_OK)
    st = cm_cuda_build_program(kp, t, opts->no_templates, cs->compiler, cache,
                               bo ? bo->compile_threads : 0, &cs->build, err);
  cs->compiled = st == CM_OK;
  if (st != CM_OK) return st;
  stats->jit_ms = cs->build.compile_ms;
  stats->jit_modules = cs->build.n_modules;
  stats->n_distinct_kernels = cs->build.n_modules;
  stats->cache_hits = cs->build.cache_hits;
  stats->cache_misses = cs->build.cache_misses;
  stats->object_bytes = cs->build.image_bytes;
  if (!opts->compile_only) return not_yet("cm_compile without compile_only", err);
  return CM_OK;
}

static cm_status cuda_alloc_arena(cm_program *p, cm_program_stats *stats, cm_err *err) {
  (void)p, (void)stats;
  return not_yet("alloc_arena", err);
}

static cm_status cuda_upload(cm_program *p, cm_err *err) {
  (void)p;
  return not_yet("upload", err);
}

static cm_status cuda_run(cm_program *p, int first, int last, cm_err *err) {
  (void)p, (void)first, (void)last;
  return not_yet("run", err);
}

static cm_status cuda_download(cm_program *p, cm_err *err) {
  (void)p;
  return not_yet("download", err);
}

static const void *cuda_buffer(const cm_program *p, int k, int b) {
  (void)p, (void)k, (void)b;
  return NULL;
}

static cm_status cuda_emit(const cm_program *p, int k, cm_emit what, FILE *out, cm_err *err) {
  const cuda_state *cs = cm_program_impl(p);
  int nk = cm_program_kernels(p)->n_kernels;
  if (what == CM_EMIT_SOURCE) {
    size_t b = k < 0 ? 0 : cs->begin[k], e = k < 0 ? cs->begin[nk] : cs->begin[k + 1];
    if (e > b && fwrite(cs->source + b, 1, e - b, out) != e - b)
      return cm_errorf(err, CM_EINVALID, "cuda backend: cannot write the CUDA C");
    return CM_OK;
  }
  if (what == CM_EMIT_BINARY && k >= 0 && cs->compiled) {
    const cm_cubin *img = &cs->build.modules[cs->build.module_of[k]].image;
    if (fwrite(img->data, 1, img->size, out) != img->size)
      return cm_errorf(err, CM_EINVALID, "cuda backend: cannot write the module of kernel %d", k);
    return CM_OK;
  }
  return cm_errorf(err, CM_EINVALID, "cuda backend: nothing to emit of kind %d%s", (int)what,
                   what == CM_EMIT_BINARY ? " (one module per kernel: give the kernel; made "
                                            "unless render_only)"
                                          : "");
}

static void cuda_free(cm_program *p) {
  cuda_state *cs = cm_program_impl(p);
  if (!cs) return;
  free(cs->source);
  free(cs->begin);
  cm_cuda_build_free(&cs->build);
  free(cs);
  cm_program_set_impl(p, NULL);
}

const cm_cuda_build *cm_program_cuda_build(const cm_program *p) {
  if (cm_program_backend(p) != &cm_backend_cuda) return NULL;
  const cuda_state *cs = cm_program_impl(p);
  return cs && cs->compiled ? &cs->build : NULL;
}

const cm_cuda_compiler *cm_program_cuda_compiler(const cm_program *p) {
  if (cm_program_backend(p) != &cm_backend_cuda) return NULL;
  const cuda_state *cs = cm_program_impl(p);
  return cs && cs->compiled ? cs->compiler : NULL;
}

const cm_backend cm_backend_cuda = {
    .name = "cuda",
    .compile = cuda_compile,
    .alloc_arena = cuda_alloc_arena,
    .upload = cuda_upload,
    .run = cuda_run,
    .download = cuda_download,
    .buffer = cuda_buffer,
    .profile = NULL,
    .stage_profile = NULL,
    .emit = cuda_emit,
    .free = cuda_free,
};
