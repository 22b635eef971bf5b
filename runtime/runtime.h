/* runtime/runtime.h — running programs: the contract of the runtime layer.
 *
 * Defines (so far): probes of the run-time libraries loaded with dlopen — the
 * CUDA driver (and its GPUs), NCCL and MPI — and the report `cmaec info`
 * prints; the CPU executor (runtime/cpu_exec.c). Comm, data and the trainer
 * come with their issues. */
#ifndef CMAEC_RUNTIME_H
#define CMAEC_RUNTIME_H

#include "../codegen/codegen.h"

void cm_probe_cuda(cm_component *out);
void cm_probe_nccl(cm_component *out);
void cm_probe_mpi(cm_component *out);

/* Fills up to max components (LLVM, NVRTC, CUDA driver, NCCL, MPI); returns the count. */
int cm_probe_all(cm_component *out, int max);

/* ---- the CPU executor (runtime/cpu_exec.c) ------------------------------ */

/* A compiled program for the host CPU: the graph's kernels (lowered, rendered
 * with the LLVM renderer, JIT-compiled through the on-disk cache), ordered
 * steps over one arena, run with OpenMP splitting each stage's work items.
 * Threads: opts->threads, else $CMAEC_THREADS, else omp_get_max_threads(). */
typedef struct cm_cpu_program cm_cpu_program;

typedef struct cm_cpu_opts {
  int threads;           /* 0: $CMAEC_THREADS or OpenMP's default */
  const char *cache_dir; /* object cache; NULL: $CMAEC_CACHE_DIR, else
                            $XDG_CACHE_HOME/cmaec or ~/.cache/cmaec; "" disables it */
  bool no_templates;     /* generic loop nests only */
  bool profile;          /* time every kernel (cm_cpu_program_profile) */
  int opt_level;         /* 0: 3 */
} cm_cpu_opts;

typedef struct cm_cpu_stats {
  int n_kernels, n_stages;
  double lower_ms, render_ms, jit_ms; /* building the program */
  int cache_hits, cache_misses;
  int64_t arena_bytes, scratch_bytes, workspace_bytes;
  int threads;
} cm_cpu_stats;

/* Builds the program for g (which must verify) from its plan; when plan is
 * NULL the default pipeline's fuse, schedule and memplan are run on a copy
 * of g first (the program keeps what it needs; g must outlive it). */
cm_status cm_cpu_program_build(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                               cm_cpu_program **out, cm_err *err);
void cm_cpu_program_free(cm_cpu_program *pr);
/* The graph the program runs (g itself, or the optimized copy when built
 * without a plan: its node ids differ, its sources and outputs keep their names). */
const cm_graph *cm_cpu_program_graph(const cm_cpu_program *pr);
/* Runs one evaluation. sources[i] (indexed by node id of g as passed to
 * build, NULL for non-sources) gives every input, param and state with
 * exactly its type; states whose assign the graph holds are updated in place
 * (also params, as the oracle's assign values). outputs[j] receives graph
 * output j (allocated; the caller frees with cm_tensor_free). */
cm_status cm_cpu_program_run(cm_cpu_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                             cm_err *err);
void cm_cpu_program_stats(const cm_cpu_program *pr, cm_cpu_stats *out);
/* With opts->profile: per kernel, total ms over all runs and the number of runs. */
typedef struct cm_kernel_profile {
  const char *name;
  cm_group_kind kind;
  double total_ms;
  int runs;
  double flops; /* per run, counted from the kernel's stages (2 per multiply-add) */
} cm_kernel_profile;
int cm_cpu_program_profile(const cm_cpu_program *pr, const cm_kernel_profile **out);

#endif
