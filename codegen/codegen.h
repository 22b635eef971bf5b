/* codegen/codegen.h — code generation: the contract of the codegen layer.
 *
 * Defines (so far): probes of the compilers cmaec generates code with — LLVM
 * (linked at build time) and NVRTC (loaded with dlopen at run time, so the
 * binary runs where no CUDA is installed) — and NVRTC compilation of CUDA C to
 * CUBIN with the ptxas resource report; the LLVM JIT for the host CPU with an
 * on-disk object cache. The kernel IR and the renderers come with the rest of
 * the code-generation issue. */
#ifndef CMAEC_CODEGEN_H
#define CMAEC_CODEGEN_H

#include "../passes/passes.h"

#include <llvm-c/Types.h>

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
/* Where NVRTC is looked for, in order (NULL-terminated). */
extern const char *const cm_nvrtc_library_names[];

/* ---- the LLVM JIT (codegen/llvm_jit.c) ---------------------------------- */

/* One ORC LLJIT for the host CPU, with an optional on-disk object cache. Not
 * thread-safe: one thread at a time per cm_jit (several cm_jit, also in several
 * processes, may share a cache). */
typedef struct cm_jit cm_jit;
typedef struct cm_jit_opts {
  const char *cache_dir; /* NULL: no disk cache; created (mkdir -p) if missing */
  int opt_level;         /* 0..3: "default<On>" and the code generator's level */
  const char *cpu;       /* NULL: the host CPU (LLVMGetHostCPUName) */
  const char *features;  /* NULL: host features if cpu is NULL, else the CPU's defaults */
  int vector_width;      /* x86: 0 or 512: prefer 512-bit vectors where AVX-512 exists
                            (LLVM tunes Intel cores for 256); 256: prefer 256-bit */
} cm_jit_opts;
typedef struct cm_jit_stats {
  int modules;              /* modules added successfully */
  int cache_hits;           /* objects loaded from the cache (no compile) */
  int cache_misses;         /* modules compiled with a cache (includes rejected files) */
  int cache_rejected;       /* cache files that failed a check (magic, size, key, checksum) */
  int cache_write_failures; /* objects that could not be stored (see cm_jit_cache_error) */
  double compile_ms;        /* verify + passes + code generation */
  double cache_load_ms;     /* reading and checking cache files on hits */
  double lookup_ms;         /* lookups, including linking objects on first use */
} cm_jit_stats;
typedef enum cm_jit_text { CM_JIT_TEXT_IR, CM_JIT_TEXT_ASM } cm_jit_text;

/* Calls into JIT'd code under clang's -fsanitize=function must come from a
 * function marked so (JIT'd code carries no signature word). */
#if defined(__clang__)
#define CM_NO_SANITIZE_FUNCTION __attribute__((no_sanitize("function")))
#else
#define CM_NO_SANITIZE_FUNCTION
#endif

cm_status cm_jit_create(cm_jit **out, const cm_jit_opts *opts, cm_err *err); /* opts NULL: O3 */
void cm_jit_destroy(cm_jit *j);
LLVMContextRef cm_jit_context(cm_jit *j); /* owned by the JIT */
const char *cm_jit_target_description(const cm_jit *j);
/* Verifies, optimizes ("default<On>") and compiles the module for the host, or
 * loads its object from the cache (key: BLAKE3 of the IR text, LLVM version,
 * triple, CPU, features, opt level); takes ownership, also on error. */
cm_status cm_jit_add_module(cm_jit *j, LLVMModuleRef module, cm_err *err);
cm_status cm_jit_lookup(cm_jit *j, const char *symbol, void **address, cm_err *err);
void cm_jit_get_stats(const cm_jit *j, cm_jit_stats *out);
const char *cm_jit_cache_error(const cm_jit *j); /* why the last cache write failed, "" if none */
/* Does not take ownership: optimizes module in place like add_module and
 * renders IR or host assembly (*text malloc'ed). */
cm_status cm_jit_render(cm_jit *j, LLVMModuleRef module, cm_jit_text what, char **text,
                        cm_err *err);
void cm_jit_module_key(cm_jit *j, LLVMModuleRef module, char key[65]); /* sets triple/layout */
void cm_jit_cache_key(const char *ir_text, const char *llvm_version, const char *triple,
                      const char *cpu, const char *features, int opt_level, char key[65]);

/* ---- NVRTC (codegen/nvrtc.c), loaded with dlopen at run time ---------- */

typedef struct cm_nvrtc cm_nvrtc;
/* Loads NVRTC (the names of cm_probe_nvrtc, or only $CMAEC_NVRTC_LIBRARY when set);
 * CM_EINVALID "NVRTC not found: <dlerror>" when absent. */
cm_status cm_nvrtc_load(cm_nvrtc **out, cm_err *err);
void cm_nvrtc_unload(cm_nvrtc *n);
const char *cm_nvrtc_version(const cm_nvrtc *n); /* "13.0" */

/* One kernel's resources as ptxas reports them (0 where the log omits a figure;
 * registers -1 if no "Used" line came). */
typedef struct cm_cuda_kernel_info {
  char name[128]; /* the entry's symbol (mangled unless extern "C") */
  int registers;
  int stack_bytes;
  int spill_store_bytes, spill_load_bytes;
  int shared_bytes; /* static shared memory (smem) */
  int const_bytes;  /* cmem[0] (CUDA 12 counts the parameters there, CUDA 13 omits it) */
} cm_cuda_kernel_info;

typedef struct cm_cubin {
  void *data; /* the CUBIN (an ELF image) */
  size_t size;
  char *log; /* NVRTC's whole program log (warnings, ptxas -v output); "" if empty */
  int n_kernels;
  cm_cuda_kernel_info *kernels;
  double compile_ms; /* wall time of create + compile + fetch */
} cm_cubin;

/* Compiles CUDA C to CUBIN for arch ("sm_80", "sm_90", "sm_90a") with
 * --gpu-architecture=ARCH -default-device --std=c++17 -I<toolkit include dir>
 * --ptxas-options=-v, then the extra options. The include dir:
 * $CMAEC_CUDA_INCLUDE_DIR, else the build's, else /usr/local/cuda/include. name
 * is the source's file name in messages. A compile error gives CM_EINVALID with
 * the first error line of the log; out->log keeps the whole log (also on error;
 * free out with cm_cubin_free either way). An arch NVRTC does not support gives
 * CM_EINVALID naming the supported ones. */
cm_status cm_nvrtc_compile(cm_nvrtc *n, const char *source, const char *name, const char *arch,
                           const char *const *extra_options, int n_extra, cm_cubin *out,
                           cm_err *err);
void cm_cubin_free(cm_cubin *c);
/* The kernel named name in c, or NULL. */
const cm_cuda_kernel_info *cm_cubin_kernel(const cm_cubin *c, const char *name);
/* Parses a ptxas -v log into kernel infos; *out is malloc'ed (NULL when none). */
cm_status cm_ptxas_parse(const char *log, cm_cuda_kernel_info **out, int *n_out, cm_err *err);

#endif
