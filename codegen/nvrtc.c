/* codegen/nvrtc.c — NVRTC, loaded with dlopen at run time: compiles CUDA C to CUBIN and reads the
 * per-kernel resource figures (registers, stack, spills, shared memory) out of the ptxas log.
 *
 * The binary never links against libnvrtc: every entry point is resolved with dlsym, and the few
 * NVRTC types are declared here, so this file builds without the CUDA headers and runs where no
 * CUDA is installed (cm_nvrtc_load then fails with "NVRTC not found: ...").
 *
 * Declarations for codegen/codegen.h (to be moved there):
 *
 * The API is declared in codegen/codegen.h. */
#include "codegen.h"

#include <ctype.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- NVRTC's types, declared here so no CUDA header is needed -------------------------------- */

typedef int nvrtc_result;                     /* nvrtcResult: NVRTC_SUCCESS = 0 */
typedef struct nvrtc_program_ *nvrtc_program; /* nvrtcProgram: opaque */
enum { NVRTC_OK = 0, NVRTC_INVALID_OPTION = 5, NVRTC_COMPILATION = 6 };

#ifndef CMAEC_CUDA_INCLUDE_DIR
#define CMAEC_CUDA_INCLUDE_DIR "/usr/local/cuda/include"
#endif

struct cm_nvrtc {
  void *lib;
  int major, minor;
  char version[32];
  int n_archs;
  int *archs; /* supported sm numbers, e.g. 75 80 86 89 90 100 ... */
  const char *(*get_error_string)(nvrtc_result);
  nvrtc_result (*version_fn)(int *, int *);
  nvrtc_result (*get_num_supported_archs)(int *);
  nvrtc_result (*get_supported_archs)(int *);
  nvrtc_result (*create_program)(nvrtc_program *, const char *, const char *, int,
                                 const char *const *, const char *const *);
  nvrtc_result (*destroy_program)(nvrtc_program *);
  nvrtc_result (*compile_program)(nvrtc_program, int, const char *const *);
  nvrtc_result (*get_cubin_size)(nvrtc_program, size_t *);
  nvrtc_result (*get_cubin)(nvrtc_program, char *);
  nvrtc_result (*get_program_log_size)(nvrtc_program, size_t *);
  nvrtc_result (*get_program_log)(nvrtc_program, char *);
};

static const char *nv_str(const cm_nvrtc *n, nvrtc_result r) {
  const char *s = n->get_error_string ? n->get_error_string(r) : NULL;
  return s ? s : "NVRTC_ERROR unknown";
}

cm_status cm_nvrtc_load(cm_nvrtc **out, cm_err *err) {
  *out = NULL;
  const char *override = getenv("CMAEC_NVRTC_LIBRARY");
  const char *const only[] = {override, NULL};
  char why[400];
  void *lib =
      cm_dlopen_first(override && override[0] ? only : cm_nvrtc_library_names, why, sizeof why);
  if (!lib) return cm_errorf(err, CM_EINVALID, "NVRTC not found: %s", why);
  cm_nvrtc *n = calloc(1, sizeof *n);
  if (!n) return cm_errorf(err, CM_EINTERNAL, "NVRTC: out of memory");
  n->lib = lib;
  struct {
    const char *sym;
    void **slot;
  } table[] = {
      {"nvrtcGetErrorString", (void **)&n->get_error_string},
      {"nvrtcVersion", (void **)&n->version_fn},
      {"nvrtcGetNumSupportedArchs", (void **)&n->get_num_supported_archs},
      {"nvrtcGetSupportedArchs", (void **)&n->get_supported_archs},
      {"nvrtcCreateProgram", (void **)&n->create_program},
      {"nvrtcDestroyProgram", (void **)&n->destroy_program},
      {"nvrtcCompileProgram", (void **)&n->compile_program},
      {"nvrtcGetCUBINSize", (void **)&n->get_cubin_size},
      {"nvrtcGetCUBIN", (void **)&n->get_cubin},
      {"nvrtcGetProgramLogSize", (void **)&n->get_program_log_size},
      {"nvrtcGetProgramLog", (void **)&n->get_program_log},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    void *p = dlsym(lib, table[i].sym);
    if (!p) {
      cm_nvrtc_unload(n);
      return cm_errorf(err, CM_EINVALID, "NVRTC: symbol %s missing from the loaded library",
                       table[i].sym);
    }
    /* Object pointer to function pointer: the dlsym idiom POSIX guarantees. */
    memcpy(table[i].slot, &p, sizeof p);
  }
  nvrtc_result r = n->version_fn(&n->major, &n->minor);
  if (r != NVRTC_OK) {
    cm_errorf(err, CM_EINVALID, "NVRTC: nvrtcVersion failed: %s", nv_str(n, r));
    cm_nvrtc_unload(n);
    return CM_EINVALID;
  }
  snprintf(n->version, sizeof n->version, "%d.%d", n->major, n->minor);
  int count = 0;
  r = n->get_num_supported_archs(&count);
  if (r == NVRTC_OK && count > 0 && count < 1000) {
    n->archs = calloc((size_t)count, sizeof *n->archs);
    if (!n->archs) {
      cm_nvrtc_unload(n);
      return cm_errorf(err, CM_EINTERNAL, "NVRTC: out of memory");
    }
    if (n->get_supported_archs(n->archs) == NVRTC_OK) n->n_archs = count;
  }
  *out = n;
  return CM_OK;
}

void cm_nvrtc_unload(cm_nvrtc *n) {
  if (!n) return;
  /* The library itself stays loaded (no dlclose): NVRTC keeps process-wide state, and unloading
   * it would hide its allocations from LeakSanitizer, which then reports them as leaks. */
  free(n->archs);
  free(n);
}

const char *cm_nvrtc_version(const cm_nvrtc *n) {
  return n->version;
}

/* ---- ptxas -v log ------------------------------------------------------------------------- */

/* The number just before `unit` in line (e.g. "12" of "Used 12 registers"), or -1. */
static int number_before(const char *line, const char *line_end, const char *unit) {
  size_t ul = strlen(unit);
  for (const char *p = line; p + ul <= line_end; p++) {
    if (memcmp(p, unit, ul) != 0) continue;
    const char *q = p;
    while (q > line && q[-1] == ' ') q--;
    const char *digits_end = q;
    while (q > line && isdigit((unsigned char)q[-1])) q--;
    if (q == digits_end) continue;
    long v = 0;
    for (const char *d = q; d < digits_end && v < INT32_MAX; d++) v = v * 10 + (*d - '0');
    return v > INT32_MAX ? INT32_MAX : (int)v;
  }
  return -1;
}

/* Where s occurs in [line, line_end), or NULL (never looks past the line). */
static const char *line_find(const char *line, const char *line_end, const char *s) {
  size_t len = strlen(s);
  for (const char *p = line; p + len <= line_end; p++)
    if (*p == s[0] && memcmp(p, s, len) == 0) return p;
  return NULL;
}

/* Copies the name that follows prefix in line (stopping at a quote or the line's end). */
static bool name_after(const char *line, const char *line_end, const char *prefix, char *name,
                       size_t cap) {
  const char *p = line_find(line, line_end, prefix);
  if (!p) return false;
  p += strlen(prefix);
  const char *e = p;
  while (e < line_end && *e != '\'' && *e != '\r') e++;
  size_t len = (size_t)(e - p);
  if (len == 0) return false;
  if (len >= cap) len = cap - 1;
  memcpy(name, p, len);
  name[len] = 0;
  return true;
}

static int find_kernel(const cm_cuda_kernel_info *k, int n, const char *name) {
  for (int i = n - 1; i >= 0; i--)
    if (strcmp(k[i].name, name) == 0) return i;
  return -1;
}

cm_status cm_ptxas_parse(const char *log, cm_cuda_kernel_info **out, int *n_out, cm_err *err) {
  *out = NULL;
  *n_out = 0;
  cm_cuda_kernel_info *k = NULL;
  int n = 0, cap = 0;
  int current = -1; /* the entry the next "Used ..." line belongs to */
  int props = -1;   /* the entry the next "bytes stack frame" line belongs to */
  const char *line = log ? log : "";
  while (*line) {
    const char *end = strchr(line, '\n');
    if (!end) end = line + strlen(line);
    char name[128];
    if (name_after(line, end, "Compiling entry function '", name, sizeof name)) {
      /* ptxas compiles each entry once: no search for an earlier one. */
      if (n == cap) {
        int ncap = cap ? cap * 2 : 8;
        cm_cuda_kernel_info *nk = realloc(k, (size_t)ncap * sizeof *nk);
        if (!nk) {
          free(k);
          return cm_errorf(err, CM_EINTERNAL, "ptxas log: out of memory");
        }
        k = nk;
        cap = ncap;
      }
      int i = n++;
      memset(&k[i], 0, sizeof k[i]);
      snprintf(k[i].name, sizeof k[i].name, "%s", name);
      k[i].registers = k[i].stack_bytes = k[i].spill_store_bytes = k[i].spill_load_bytes = -1;
      k[i].shared_bytes = k[i].const_bytes = -1;
      current = props = i;
    } else if (name_after(line, end, "Function properties for ", name, sizeof name)) {
      /* They follow the entry's "Compiling entry function" line. Non-entry (device) functions
       * have properties too; those are not kernels. */
      props = n > 0 && strcmp(k[n - 1].name, name) == 0 ? n - 1 : -1;
    } else if (number_before(line, end, "bytes stack frame") >= 0) {
      if (props >= 0) {
        k[props].stack_bytes = number_before(line, end, "bytes stack frame");
        k[props].spill_store_bytes = number_before(line, end, "bytes spill stores");
        k[props].spill_load_bytes = number_before(line, end, "bytes spill loads");
      }
      props = -1;
    } else if (line_find(line, end, "ptxas info") && line_find(line, end, ": Used ")) {
      if (current >= 0) {
        k[current].registers = number_before(line, end, "registers");
        int smem = number_before(line, end, "bytes smem");
        k[current].shared_bytes = smem >= 0 ? smem : 0;
        k[current].const_bytes = number_before(line, end, "bytes cmem[0]");
      }
      current = -1;
    }
    line = *end ? end + 1 : end;
  }
  /* An entry with no "Function properties" lines uses no stack and spills nothing. */
  for (int i = 0; i < n; i++) {
    if (k[i].stack_bytes < 0) k[i].stack_bytes = 0;
    if (k[i].spill_store_bytes < 0) k[i].spill_store_bytes = 0;
    if (k[i].spill_load_bytes < 0) k[i].spill_load_bytes = 0;
    if (k[i].shared_bytes < 0) k[i].shared_bytes = 0;
    if (k[i].const_bytes < 0) k[i].const_bytes = 0; /* CUDA 13 reports no cmem for parameters */
  }
  *out = k;
  *n_out = n;
  return CM_OK;
}

/* ---- compiling ----------------------------------------------------------------------------- */

void cm_cubin_free(cm_cubin *c) {
  if (!c) return;
  free(c->data);
  free(c->log);
  free(c->kernels);
  memset(c, 0, sizeof *c);
}

const cm_cuda_kernel_info *cm_cubin_kernel(const cm_cubin *c, const char *name) {
  int i = find_kernel(c->kernels, c->n_kernels, name);
  return i >= 0 ? &c->kernels[i] : NULL;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Checks arch is "sm_<digits>" with an optional letter suffix ("sm_90a"), and that NVRTC lists
 * the number among its supported architectures. */
static cm_status check_arch(const cm_nvrtc *n, const char *name, const char *arch, cm_err *err) {
  const char *p = arch && strncmp(arch, "sm_", 3) == 0 ? arch + 3 : NULL;
  int num = 0, digits = 0;
  while (p && isdigit((unsigned char)*p) && digits < 4) num = num * 10 + (*p++ - '0'), digits++;
  if (p && isalpha((unsigned char)*p)) p++;
  if (!p || digits == 0 || *p)
    return cm_errorf(err, CM_EINVALID,
                     "%s: NVRTC arch \"%s\" is not of the form sm_<number>[a|f] (e.g. sm_90)", name,
                     arch ? arch : "(null)");
  if (n->n_archs <= 0) return CM_OK; /* NVRTC did not say: let the compile decide */
  for (int i = 0; i < n->n_archs; i++)
    if (n->archs[i] == num) return CM_OK;
  char list[256] = "";
  size_t len = 0;
  for (int i = 0; i < n->n_archs && len + 16 < sizeof list; i++)
    len += (size_t)snprintf(list + len, sizeof list - len, "%ssm_%d", i ? " " : "", n->archs[i]);
  return cm_errorf(err, CM_EINVALID, "%s: NVRTC %s does not support arch %s (supported: %s)", name,
                   n->version, arch, list);
}

/* The first line of log that reports an error (else its first non-empty line), without the
 * newline, into buf. */
static void first_error_line(const char *log, char *buf, size_t cap) {
  buf[0] = 0;
  const char *hit = NULL;
  for (const char *line = log; *line;) {
    const char *end = strchr(line, '\n');
    if (!end) end = line + strlen(line);
    if (line_find(line, end, "error")) {
      hit = line;
      break;
    }
    line = *end ? end + 1 : end;
  }
  if (!hit) {
    hit = log;
    while (*hit == '\n' || *hit == '\r' || *hit == ' ') hit++;
  }
  size_t len = strcspn(hit, "\r\n");
  if (len >= cap) len = cap - 1;
  memcpy(buf, hit, len);
  buf[len] = 0;
}

static cm_status fetch_log(cm_nvrtc *n, nvrtc_program prog, cm_cubin *out, cm_err *err) {
  size_t size = 0;
  if (n->get_program_log_size(prog, &size) != NVRTC_OK) size = 0;
  out->log = malloc(size + 1);
  if (!out->log) return cm_errorf(err, CM_EINTERNAL, "NVRTC: out of memory for the log");
  out->log[0] = 0;
  if (size > 0 && n->get_program_log(prog, out->log) != NVRTC_OK) out->log[0] = 0;
  out->log[size] = 0;
  return CM_OK;
}

cm_status cm_nvrtc_compile(cm_nvrtc *n, const char *source, const char *name, const char *arch,
                           const char *const *extra_options, int n_extra, cm_cubin *out,
                           cm_err *err) {
  memset(out, 0, sizeof *out);
  if (!name || !name[0]) name = "kernel.cu";
  if (!n || !source || n_extra < 0 || (n_extra > 0 && !extra_options))
    return cm_errorf(err, CM_EINVALID, "%s: NVRTC compile: bad arguments", name);
  cm_status st = check_arch(n, name, arch, err);
  if (st != CM_OK) return st;

  char arch_opt[64], include_opt[600];
  snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", arch);
  const char *inc = getenv("CMAEC_CUDA_INCLUDE_DIR");
  snprintf(include_opt, sizeof include_opt, "-I%s", inc && inc[0] ? inc : CMAEC_CUDA_INCLUDE_DIR);
  const char *fixed[] = {arch_opt, "-default-device", "--std=c++17", include_opt,
                         "--ptxas-options=-v"};
  int n_fixed = (int)(sizeof fixed / sizeof fixed[0]);
  const char **opts = calloc((size_t)(n_fixed + n_extra), sizeof *opts);
  if (!opts) return cm_errorf(err, CM_EINTERNAL, "%s: NVRTC: out of memory", name);
  for (int i = 0; i < n_fixed; i++) opts[i] = fixed[i];
  for (int i = 0; i < n_extra; i++) opts[n_fixed + i] = extra_options[i];

  double t0 = now_ms();
  nvrtc_program prog = NULL;
  nvrtc_result r = n->create_program(&prog, source, name, 0, NULL, NULL);
  if (r != NVRTC_OK) {
    free(opts);
    return cm_errorf(err, CM_EINVALID, "%s: nvrtcCreateProgram failed: %s", name, nv_str(n, r));
  }
  r = n->compile_program(prog, n_fixed + n_extra, opts);
  free(opts);
  st = fetch_log(n, prog, out, err);
  if (st != CM_OK) goto done;
  if (r != NVRTC_OK) {
    char first[700];
    first_error_line(out->log, first, sizeof first);
    if (r == NVRTC_COMPILATION)
      st = cm_errorf(err, CM_EINVALID, "%s: CUDA compile error for %s: %s", name, arch,
                     first[0] ? first : "(empty log)");
    else
      st = cm_errorf(err, r == NVRTC_INVALID_OPTION ? CM_EINVALID : CM_EINTERNAL,
                     "%s: nvrtcCompileProgram for %s failed: %s%s%s", name, arch, nv_str(n, r),
                     first[0] ? ": " : "", first);
    goto done;
  }
  size_t size = 0;
  r = n->get_cubin_size(prog, &size);
  if (r != NVRTC_OK || size == 0) {
    st = cm_errorf(err, CM_EINVALID, "%s: no CUBIN for %s: %s", name, arch,
                   r != NVRTC_OK ? nv_str(n, r) : "empty");
    goto done;
  }
  out->data = malloc(size);
  if (!out->data) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory for a %zu-byte CUBIN", name, size);
    goto done;
  }
  r = n->get_cubin(prog, out->data);
  if (r != NVRTC_OK) {
    st = cm_errorf(err, CM_EINTERNAL, "%s: nvrtcGetCUBIN failed: %s", name, nv_str(n, r));
    goto done;
  }
  out->size = size;
  st = cm_ptxas_parse(out->log, &out->kernels, &out->n_kernels, err);
  if (st != CM_OK) cm_err_prefix(err, "%s: ", name);
done:
  n->destroy_program(&prog);
  if (st != CM_OK) { /* keep the log; drop a partial result */
    free(out->data);
    free(out->kernels);
    out->data = NULL;
    out->kernels = NULL;
    out->size = 0;
    out->n_kernels = 0;
  }
  out->compile_ms = now_ms() - t0;
  return st;
}
