/* runtime/runtime.h — running programs: the execution half of the runtime layer.
 *
 * Defines: discovery of the run-time libraries loaded with dlopen — the CUDA
 * driver (and its GPUs), NCCL and MPI — and the report `cmaec info` prints
 * (runtime/libraries.c); the CPU executor (runtime/cpu_exec.c). The training
 * half (data, views, trainer, checkpoints, metrics, evaluation, pictures) is
 * runtime/training.h, which includes this header. */
#ifndef CMAEC_RUNTIME_H
#define CMAEC_RUNTIME_H

#include "../codegen/codegen.h"

void cm_library_find_cuda(cm_component *out);
void cm_library_find_nccl(cm_component *out);
void cm_library_find_mpi(cm_component *out);

/* Fills up to max components (LLVM, NVRTC, CUDA driver, NCCL, MPI); returns the count. */
int cm_library_find_all(cm_component *out, int max);

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
  int attn_bc;           /* > 0: force the attention key block (cm_lower_opts.attn_bc; tests) */
} cm_cpu_opts;

typedef struct cm_cpu_stats {
  int n_kernels, n_stages;
  int n_distinct_kernels; /* compiled once each: the others repeat one (same code, other name) */
  double lower_ms, render_ms, jit_ms; /* building the program */
  int cache_hits, cache_misses;
  int64_t arena_bytes, scratch_bytes, workspace_bytes;
  int threads;
  int jit_modules;      /* modules compiled or loaded: one per distinct kernel */
  int64_t object_bytes; /* their objects' size */
  int vector_bits;      /* of the target CPU (cm_cpu_target) */
  bool runnable;        /* false: built compile_only for a CPU this host cannot run */
} cm_cpu_stats;

/* Builds the program for g (which must verify) from its plan; when plan is
 * NULL the default pipeline's fuse, schedule and memplan are run on a copy
 * of g first (the program keeps what it needs; g must outlive it). */
cm_status cm_cpu_program_build(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                               cm_cpu_program **out, cm_err *err);
/* Builds refuse a $CMAEC_CPU whose features this host lacks (cm_cpu_target);
 * cm_cpu_program_compile builds for it all the same (every kernel compiled and
 * linked, stats filled), and then cm_cpu_program_run refuses to run it. */
cm_status cm_cpu_program_compile(const cm_graph *g, const cm_plan *plan, const cm_cpu_opts *opts,
                                 cm_cpu_program **out, cm_err *err);
void cm_cpu_program_free(cm_cpu_program *pr);
/* The graph the program runs (g itself, or the optimized copy when built
 * without a plan: its node ids differ, its sources and outputs keep their names). */
const cm_graph *cm_cpu_program_graph(const cm_cpu_program *pr);
/* Runs one evaluation. sources[i] (indexed by node id of g as passed to
 * build, NULL for non-sources) gives every input, param and state with
 * exactly its type; states whose assign the graph holds are updated in place
 * (also params, as the oracle's assign values). outputs[j] receives graph
 * output j (allocated; the caller frees with cm_tensor_free). outputs may be
 * NULL: nothing is copied out (a large output costs a copy and fresh pages
 * per run), and cm_cpu_program_output reads each output where it lies. A
 * gather or scatter_add index outside its axis is CM_EINVALID with the
 * oracle's message (cm_index_error, the first such node in graph order), found
 * after the run: the kernels clamp such an index where they use it, so nothing
 * outside a buffer is touched, but the outputs are garbage and the states the
 * graph assigns are updated. */
cm_status cm_cpu_program_run(cm_cpu_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                             cm_err *err);
/* Graph output j of the last run where the program keeps it (the arena, or a
 * source it was assigned to), valid until the next run or free; NULL for an
 * output that is a constant, or j out of range. Its type is graph output j's. */
const void *cm_cpu_program_output(const cm_cpu_program *pr, int j);
/* Where node v of the program's graph (cm_cpu_program_graph) lies after the
 * last run: a source's or an assigned state's buffer, or the arena buffer of
 * the kernel that writes it (valid until a later buffer of the memory plan
 * reuses the place: all of them with a plan that reuses none); NULL for a
 * value no kernel writes to memory. */
const void *cm_cpu_program_value(const cm_cpu_program *pr, int v);
/* Where a run first produces a non-finite value, in execution order: a float
 * source (graph order), else the first kernel whose outputs hold one (within a
 * kernel, the earliest node; a state's new value is named by its assign). */
typedef struct cm_nonfinite {
  bool found;
  char tensor[128]; /* the node holding it */
  const char *op;   /* its op: "param", "state", "input" for a source */
  char kernel[64];  /* the kernel that wrote it; "" for a source */
  char inputs[256]; /* the node's inputs, comma-separated */
  int64_t index;    /* its first non-finite element */
  double value;
} cm_nonfinite;
/* Runs the program once as cm_cpu_program_run does (states updated in place),
 * checking each kernel's outputs after it runs and stopping at the first
 * non-finite one. For diagnosis (a step that went non-finite): it reads every
 * value written, so it is slower than a run. */
cm_status cm_cpu_program_first_nonfinite(cm_cpu_program *pr, cm_tensor *const *sources,
                                         cm_nonfinite *out, cm_err *err);
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
/* With opts->profile: per stage of every kernel (kernels in order, stages in
 * order), total ms over all runs and the number of runs. */
typedef struct cm_stage_profile {
  const char *kernel; /* the kernel's name */
  const cm_kstage *stage;
  int kernel_index, stage_index;
  int64_t work_items;
  double total_ms;
  int runs;
  double flops; /* per run, as cm_kernel_profile counts them */
} cm_stage_profile;
int cm_cpu_program_stage_profile(const cm_cpu_program *pr, const cm_stage_profile **out);

#endif
