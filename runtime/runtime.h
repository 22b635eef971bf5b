/* runtime/runtime.h — running programs: the execution half of the runtime layer.
 *
 * Defines: discovery of the run-time libraries loaded with dlopen — the CUDA
 * driver (and its GPUs), NCCL and MPI — and the report `cmaec info` prints
 * (runtime/libraries.c); execution: cm_compile, the one driver from a graph to
 * running code, cm_program and the cm_backend table a backend fills in
 * (runtime/program.c; the CPU backend runtime/backend_cpu.c, the CUDA backend
 * runtime/backend_cuda.c). The training half (data, views,
 * trainer, checkpoints, metrics, evaluation, pictures) is runtime/training.h,
 * which includes this header. */
#ifndef CMAEC_RUNTIME_H
#define CMAEC_RUNTIME_H

#include "../codegen/codegen.h"

void cm_library_find_cuda(cm_component *out);
void cm_library_find_nccl(cm_component *out);
void cm_library_find_mpi(cm_component *out);

/* Fills up to max components (LLVM, NVRTC, CUDA driver, NCCL, MPI); returns the count. */
int cm_library_find_all(cm_component *out, int max);

/* ---- the CUDA driver API as a table (runtime/cuda_driver.c) ---------------
 *
 * Everything cmaec asks of the CUDA driver goes through one cm_cuda_driver:
 * cm_cuda_driver_load fills it from libcuda.so.1 (dlopen, once per process);
 * the emulated device of the tests (tests/emu/, a test target, never a user
 * backend) fills a second one over host memory. Entries have the driver's
 * signatures (CUresult is int, 0 = CUDA_SUCCESS; handles are void *; device
 * pointers cm_cu_ptr) and the driver's semantics. */
typedef unsigned long long cm_cu_ptr; /* CUdeviceptr */

/* CUdevice_attribute, CUfunction_attribute, stream and capture flags used (cuda.h values). */
enum {
  CM_CU_ATTR_MAX_THREADS_PER_BLOCK = 1,
  CM_CU_ATTR_MULTIPROCESSOR_COUNT = 16,
  CM_CU_ATTR_CC_MAJOR = 75,
  CM_CU_ATTR_CC_MINOR = 76,
  CM_CU_ATTR_MAX_SHARED_PER_BLOCK_OPTIN = 97,
  CM_CU_FUNC_MAX_DYNAMIC_SHARED_BYTES = 8,
  CM_CU_STREAM_NON_BLOCKING = 1,
  CM_CU_EVENT_DEFAULT = 0,
  CM_CU_EVENT_DISABLE_TIMING = 2,
  CM_CU_CAPTURE_MODE_THREAD_LOCAL = 1,
};

typedef struct cm_cuda_driver {
  const char *name; /* "libcuda.so.1", "emulated": in messages */
  int (*init)(unsigned flags);
  int (*driver_get_version)(int *version);
  int (*device_get_count)(int *count);
  int (*device_get)(int *device, int ordinal);
  int (*device_get_name)(char *name, int len, int device);
  int (*device_total_mem)(size_t *bytes, int device);
  int (*device_get_attribute)(int *value, int attribute, int device);
  int (*primary_ctx_retain)(void **ctx, int device);
  int (*primary_ctx_release)(int device);
  int (*ctx_set_current)(void *ctx);
  int (*ctx_synchronize)(void);
  int (*mem_get_info)(size_t *free_bytes, size_t *total_bytes);
  int (*mem_alloc)(cm_cu_ptr *ptr, size_t bytes);
  int (*mem_free)(cm_cu_ptr ptr);
  int (*mem_alloc_host)(void **ptr, size_t bytes); /* pinned */
  int (*mem_free_host)(void *ptr);
  int (*memcpy_htod_async)(cm_cu_ptr dst, const void *src, size_t bytes, void *stream);
  int (*memcpy_dtoh_async)(void *dst, cm_cu_ptr src, size_t bytes, void *stream);
  int (*memcpy_dtod_async)(cm_cu_ptr dst, cm_cu_ptr src, size_t bytes, void *stream);
  int (*memset_d8_async)(cm_cu_ptr dst, unsigned char value, size_t bytes, void *stream);
  int (*stream_create)(void **stream, unsigned flags);
  int (*stream_destroy)(void *stream);
  int (*stream_synchronize)(void *stream);
  int (*stream_wait_event)(void *stream, void *event, unsigned flags);
  int (*event_create)(void **event, unsigned flags);
  int (*event_destroy)(void *event);
  int (*event_record)(void *event, void *stream);
  int (*event_synchronize)(void *event);
  int (*event_elapsed_time)(float *ms, void *start, void *end);
  int (*module_load_data)(void **module, const void *image);
  int (*module_unload)(void *module);
  int (*module_get_function)(void **function, void *module, const char *name);
  int (*func_set_attribute)(void *function, int attribute, int value);
  int (*launch_kernel)(void *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                       unsigned block_x, unsigned block_y, unsigned block_z, unsigned shared_bytes,
                       void *stream, void **params, void **extra);
  int (*stream_begin_capture)(void *stream, int mode);
  int (*stream_end_capture)(void *stream, void **graph);
  int (*graph_instantiate)(void **exec, void *graph, unsigned long long flags);
  int (*graph_launch)(void *exec, void *stream);
  int (*graph_exec_destroy)(void *exec);
  int (*graph_destroy)(void *graph);
  int (*get_error_name)(int result, const char **name);
  int (*get_error_string)(int result, const char **text);
} cm_cuda_driver;

/* Loads the CUDA driver ($CMAEC_CUDA_DRIVER_LIBRARY, else libcuda.so.1) once
 * per process and calls cuInit(0); CM_EINVALID "CUDA driver not found: ..." or
 * naming the failing call when there is no driver or no usable GPU. */
cm_status cm_cuda_driver_load(const cm_cuda_driver **out, cm_err *err);
/* CM_OK for result 0; else CM_EINTERNAL "WHAT: CUDA_ERROR_NAME (the driver's
 * text)". what names the call and its subject (a kernel, its grid). */
cm_status cm_cuda_check(const cm_cuda_driver *d, int result, const char *what, cm_err *err);

/* One GPU as cmaec sees it. */
typedef struct cm_cuda_device {
  int ordinal; /* as the driver numbers them (after CUDA_VISIBLE_DEVICES) */
  char name[128];
  int64_t total_bytes;
  int cc_major, cc_minor, sms;
  int shared_optin; /* bytes of shared memory a block may opt in to */
  char arch[16];    /* what cmaec compiles for it: sm_80, sm_90 (cm_cuda_arch_for) */
} cm_cuda_device;
/* Fills up to max devices of d; returns how many there are (0 on error, *err says why). */
int cm_cuda_devices(const cm_cuda_driver *d, cm_cuda_device *out, int max, cm_err *err);
/* The arch cmaec compiles for a GPU of compute capability major.minor: sm_90 for
 * 9.x and later, sm_80 for 8.x, else "sm_MAJORMINOR". */
void cm_cuda_arch_for(int major, int minor, char *arch, size_t size);

/* ---- compiling CUDA C to module images (runtime/cuda_build.c) ------------
 *
 * A compiler turns one CUDA C translation unit into the image a driver's
 * module_load_data takes: NVRTC's CUBIN for the real driver, a host shared
 * object for the emulated device. Its name goes into the cache key. */
typedef struct cm_cuda_compiler {
  const char *name;         /* e.g. "nvrtc 13.0", "emulated c++ 12.2 -O1": in the cache key */
  const char *image_suffix; /* cache files' suffix: "cubin", "so" */
  /* Compiles source for arch into out (data/size: the image; log and kernels: ptxas's
   * report when there is one). Called from several threads at once. */
  cm_status (*compile)(void *self, const char *source, const char *name, const char *arch,
                       cm_cubin *out, cm_err *err);
  void *self;
} cm_cuda_compiler;
/* The NVRTC compiler (cm_nvrtc_load once per process); CM_EINVALID when NVRTC is absent. */
cm_status cm_cuda_compiler_nvrtc(const cm_cuda_compiler **out, cm_err *err);

/* What cm_backend_cuda takes in cm_compile_opts.backend_opts (NULL: all defaults). */
typedef enum cm_cuda_graphs { CM_CUDA_GRAPHS_ON = 0, CM_CUDA_GRAPHS_OFF = 1 } cm_cuda_graphs;
typedef struct cm_cuda_backend_opts {
  const cm_cuda_driver *driver;     /* NULL: cm_cuda_driver_load */
  const cm_cuda_compiler *compiler; /* NULL: cm_cuda_compiler_nvrtc */
  int device;                       /* the driver's ordinal (0: the first visible GPU) */
  cm_cuda_graphs graphs;            /* the step captured once as a CUDA graph and replayed */
  int compile_threads;              /* parallel compiles; 0: every core */
} cm_cuda_backend_opts;

/* A program's kernels built for a CUDA target: each distinct kernel (kernels that
 * differ only in their name share one) rendered under the name CM_CUDA_MODULE_KERNEL
 * (its stage functions "cmk_s0", "cmk_s1", ...), with the prelude, as one translation
 * unit, compiled by the compiler on `threads` threads, or loaded from the on-disk cache
 * (key: the source, the compiler's name, the options and the arch; the image only,
 * never PTX; written atomically, so processes may share it). */
#define CM_CUDA_MODULE_KERNEL "cmk"
/* A kernel whose module source exceeds the part size ($CMAEC_CUDA_PART_BYTES, else this;
 * 0: never) is split at stage boundaries into several modules ("parts"), each the prelude
 * and some of its stage functions, compiled in parallel: cm_cuda_stage_module says which
 * module holds a stage's function. */
#define CM_CUDA_PART_BYTES ((size_t)512 * 1024)
typedef struct cm_cuda_module {
  char key[65];               /* the cache key (hex) */
  cm_cubin image;             /* what the compiler made (or the cache held): image, ptxas report */
  bool cached;                /* loaded from the cache */
  int kernel;                 /* the first kernel of the program it serves */
  int stage_begin, stage_end; /* the stage functions it holds ([0, n_stages) unless split) */
  double cpu_ms;              /* the compiling thread's CPU time for it (0 when cached) */
} cm_cuda_module;
typedef struct cm_cuda_build {
  int n_modules;
  cm_cuda_module *modules;
  int *module_of; /* per kernel of the program: its (first) module; a split kernel's parts
                     are the modules after it, in stage order */
  int cache_hits, cache_misses; /* misses: modules compiled (every one when there is no cache) */
  int cache_rejected;           /* misses whose file failed a check (then overwritten) */
  int cache_write_failures;     /* compiled modules that could not be stored */
  double render_ms, compile_ms; /* wall times: rendering every kernel; compiling or loading */
  int threads;                  /* compile threads used */
  int64_t image_bytes;
  int n_distinct; /* distinct kernels (n_modules counts a split kernel's parts) */
} cm_cuda_build;
/* Builds every kernel of kp for target t (a CUDA target) with compiler c. cache_dir:
 * the cache's root ("cuda" under it holds the images; NULL or "": no cache); threads
 * 0: every core (modules are rendered serially, then loaded or compiled in parallel,
 * largest first). Errors name the kernel and the compiler's first error line (of the
 * first failing module in module order). A cache that cannot be read or written is
 * not an error: the modules are compiled (cache_write_failures counts them). */
cm_status cm_cuda_build_program(const cm_kprogram *kp, const cm_target *t, bool no_templates,
                                const cm_cuda_compiler *c, const char *cache_dir, int threads,
                                cm_cuda_build *out, cm_err *err);
void cm_cuda_build_free(cm_cuda_build *b);
/* The module of b whose image defines stage `stage` of kernel `kernel` (its function
 * CM_CUDA_MODULE_KERNEL "_s<stage>"): module_of[kernel] unless the kernel was split. */
int cm_cuda_stage_module(const cm_cuda_build *b, int kernel, int stage);
/* The CUDA C of kernel k as its module holds it (prelude, then the kernel under
 * CM_CUDA_MODULE_KERNEL; *source malloc'ed). */
cm_status cm_cuda_module_source(const cm_kernel *k, const cm_target *t, bool no_templates,
                                char **source, cm_err *err);
/* The cache root cm_compile uses: opts->cache_dir, else $CMAEC_CACHE_DIR, else
 * $XDG_CACHE_HOME/cmaec or ~/.cache/cmaec; NULL when disabled (""). */
const char *cm_cache_dir(const char *given, char *buf, size_t size);
/* mkdir -p (the caches' directories); true when path is a directory afterwards (errno set when
 * not). */
bool cm_make_dirs(const char *path);

/* ---- the tuning database (runtime/tuning_db.c) --------------------------
 *
 * The autotuner's memory (docs/runtime.md "Tuning database"): every trial and
 * the best point per key, in one SQLite file shared by processes and ranks. A
 * NULL cm_tune_db (caching disabled) is valid everywhere: puts do nothing,
 * get_best finds nothing, the report says so. */
typedef enum cm_tune_mode {
  CM_TUNE_FROM_ENV = 0,
  CM_TUNE_OFF,
  CM_TUNE_CACHED,
  CM_TUNE_SEARCH
} cm_tune_mode;
/* $CMAEC_TUNE = off|cached|search (unset or empty: cached); CM_EINVALID naming the variable and the
 * allowed values. */
cm_status cm_tune_mode_resolve(cm_tune_mode given, cm_tune_mode *out, cm_err *err);
typedef struct cm_tune_db cm_tune_db;
/* Opens or creates the SQLite database at path (NULL: <cm_cache_dir(NULL)>/tuning.db; caching
 * disabled: *out = NULL and CM_OK), WAL mode, a busy timeout, so several processes and ranks share
 * it. */
cm_status cm_tune_db_open(const char *path, cm_tune_db **out, cm_err *err);
void cm_tune_db_close(cm_tune_db *db);
typedef struct cm_tune_key {
  char kernel[65]; /* cm_kernel_structural_hash */
  int stage;
  char device[192]; /* cm_tune_device_id */
  int version;      /* CM_TUNE_SPACE_VERSION */
} cm_tune_key;
/* CPU: "cpu <llvm cpu> <vector bits> [bf16] threads <n>"; CUDA: "cuda <gpu name> sm_<sm> driver
 * <version>"; the emulated device (a CUDA target, gpu_name NULL): "emulated sm_<sm>". */
void cm_tune_device_id(const cm_target *t, int threads, const char *gpu_name, int driver_version,
                       char *out, size_t size);
/* One candidate's outcome: ms >= 0 its median time, or failure != NULL (compile error, crash,
 * invalid). */
cm_status cm_tune_db_put_trial(cm_tune_db *db, const cm_tune_key *key, const char *point, double ms,
                               const char *failure, cm_err *err);
/* The choice after a search: the best point (ties broken by the caller, deterministically), its
 * time and the default's; label is what the report shows ("k12_gemm s0 gemm 394x192x576"). */
cm_status cm_tune_db_put_best(cm_tune_db *db, const cm_tune_key *key, const char *point,
                              double best_ms, double default_ms, const char *label, cm_err *err);
/* The best recorded for key (records of another version never match): *found false when none. */
cm_status cm_tune_db_get_best(cm_tune_db *db, const cm_tune_key *key, char *point, size_t size,
                              double *best_ms, bool *found, cm_err *err);
/* cmaec tune --report: per key (device NULL: all devices), label, default ms, best ms, speedup,
 * best point, trials, failures; then totals. */
cm_status cm_tune_db_report(cm_tune_db *db, const char *device, FILE *out, cm_err *err);

/* ---- compiling and running programs (runtime/program.c) ----------------- */

/* A program: a graph's plan lowered to kernels (cm_kprogram) for a target,
 * compiled by a backend, run over the backend's arena. cm_compile is the one
 * driver from a graph to running code: every tool, the trainer, the benches and
 * the tests go through it. The generic cm_program_* functions bind and check
 * sources, find outputs and values, and search non-finite values; what is
 * target-specific goes through the program's cm_backend table. */
typedef struct cm_program cm_program;
typedef struct cm_backend cm_backend;

/* What cmaec compile prints of a compiled program (cm_program_emit). */
typedef enum cm_emit {
  CM_EMIT_KERNEL_IR, /* the kernel IR (cm_kernel_print), every backend */
  CM_EMIT_SOURCE,    /* the rendered text: LLVM IR (cpu), CUDA C (cuda) */
  CM_EMIT_OPT_IR,    /* cpu: the LLVM IR after the JIT's optimization pipeline */
  CM_EMIT_ASM,       /* cpu: the machine code as assembly */
  CM_EMIT_BINARY,    /* cuda: the program's CUBIN (whole program only) */
} cm_emit;

typedef struct cm_compile_opts {
  int threads;               /* CPU: 0: $CMAEC_THREADS or OpenMP's default */
  const char *cache_dir;     /* CPU object cache; NULL: $CMAEC_CACHE_DIR, else
                                $XDG_CACHE_HOME/cmaec or ~/.cache/cmaec; "" disables it */
  bool no_templates;         /* generic loop nests only */
  bool profile;              /* time every kernel (cm_program_profile) */
  int opt_level;             /* 0: 3 */
  int attn_bc;               /* > 0: force the attention key block (cm_lower_opts.attn_bc; tests) */
  bool compile_only;         /* compile every kernel, allocate nothing; the program cannot run (its
                                target need not run here: a $CMAEC_CPU this host lacks, a GPU) */
  bool render_only;          /* with compile_only: render every kernel, compile none (what
                                cm_program_emit writes is then all the program holds) */
  const cm_plan *plan;       /* NULL: the default pipeline's passes run on a copy of the graph */
  const cm_backend *backend; /* NULL: the target's (cm_backend_cpu, cm_backend_cuda) */
  void *backend_opts;        /* given to backend->compile as is (NULL for the built-in ones;
                                cm_backend_cuda: a cm_cuda_backend_opts) */
  bool resident_states;      /* device backends: params and states stay on the device between
                                runs (cm_program_states_download, cm_program_states_changed) */
  cm_tune_mode tune;         /* FROM_ENV: $CMAEC_TUNE (default cached); cached or search: every
                                stage the tuning database has a best point for is planned so */
  /* After lowering and the cached plans, before rendering: may replan kp's stages (cm_tune
   * times candidates inside whole steps so; kernels are as cm_lower_plan numbers them). */
  cm_status (*replan)(cm_kprogram *kp, const cm_target *t, void *ctx, cm_err *err);
  void *replan_ctx;
  struct cm_comm *comm; /* the ranks' communicator (issue 18): the backends run the
                           collective stages through it; NULL: world size 1. A graph built
                           for other ranks than its size is CM_EINVALID (unless
                           compile_only) */
} cm_compile_opts;

typedef struct cm_program_stats {
  int n_kernels, n_stages;
  int n_distinct_kernels; /* compiled once each: the others repeat one (same code, other name) */
  double lower_ms, render_ms, jit_ms; /* building the program */
  int cache_hits, cache_misses;
  int64_t arena_bytes, scratch_bytes, workspace_bytes;
  int threads;
  int jit_modules;      /* modules compiled or loaded: one per distinct kernel */
  int64_t object_bytes; /* their objects' size (CPU objects, CUDA CUBINs) */
  int vector_bits;      /* of the target CPU (cm_cpu_target) */
  bool runnable;        /* false: compile_only, or a target this host cannot run */
  int tuned_stages;     /* stages planned by the tuning database's best point (cm_tune) */
  int tune_ignored;     /* records that no longer parse or apply (ignored) */
} cm_program_stats;

/* Compiles g (which must verify) for target (NULL: cm_target_cpu(NULL, NULL):
 * the host or $CMAEC_CPU) through opts->backend or the target's backend. When
 * opts->plan is NULL the default pipeline's fuse, schedule and memplan are run
 * on a copy of g first (the program keeps what it needs; g and the plan must
 * outlive it). A CPU target this host cannot run is refused unless
 * opts->compile_only. */
cm_status cm_compile(const cm_graph *g, const cm_target *target, const cm_compile_opts *opts,
                     cm_program **out, cm_err *err);
void cm_program_free(cm_program *pr);
/* The graph the program runs (g itself, or the optimized copy when built
 * without a plan: its node ids differ, its sources and outputs keep their names). */
const cm_graph *cm_program_graph(const cm_program *pr);
const cm_kprogram *cm_program_kernels(const cm_program *pr);
const cm_plan *cm_program_plan(const cm_program *pr); /* the plan it was lowered from */
const cm_target *cm_program_target(const cm_program *pr);
const cm_backend *cm_program_backend(const cm_program *pr);
/* Runs one evaluation. sources[i] (indexed by node id of g as passed to
 * cm_compile, NULL for non-sources) gives every input, param and state with
 * exactly its type; states whose assign the graph holds are updated in place
 * (also params, as the oracle's assign values). outputs[j] receives graph
 * output j (allocated; the caller frees with cm_tensor_free). outputs may be
 * NULL: nothing is copied out (a large output costs a copy and fresh pages
 * per run), and cm_program_output reads each output where it lies. A
 * gather or scatter_add index outside its axis is CM_EINVALID with the
 * oracle's message (cm_index_error, the first such node in graph order), found
 * after the run: the kernels clamp such an index where they use it, so nothing
 * outside a buffer is touched, but the outputs are garbage and the states the
 * graph assigns are updated. */
cm_status cm_program_run(cm_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                         cm_err *err);
/* cm_program_run in two halves, so that a caller can work while a device runs:
 * cm_program_start binds the sources and enqueues the run (the CPU backend runs
 * it there); cm_program_finish waits for it and copies the outputs (as
 * cm_program_run; outputs may be NULL). Between the two, cm_program_prefetch
 * gives the next run's sources: their inputs (CM_OP_INPUT) are uploaded on a
 * copy stream while this run goes on, and the next cm_program_start with the
 * same tensors uploads them no more (the CPU backend: nothing to do). */
cm_status cm_program_start(cm_program *pr, cm_tensor *const *sources, cm_err *err);
cm_status cm_program_finish(cm_program *pr, cm_tensor *outputs, cm_err *err);
cm_status cm_program_prefetch(cm_program *pr, cm_tensor *const *sources, cm_err *err);
/* With opts->resident_states (device backends): params and states are uploaded
 * by the first run and stay on the device; the host tensors bound at the last
 * run are stale until cm_program_states_download copies every source back to
 * them (for a checkpoint, an evaluation, the end of training), and after the
 * caller writes them it calls cm_program_states_changed, so that the next run
 * uploads them again. Without resident_states, and on the CPU backend, both do
 * nothing: every run leaves the host tensors current. */
cm_status cm_program_states_download(cm_program *pr, cm_err *err);
void cm_program_states_changed(cm_program *pr);
/* Graph output j of the last run where the program keeps it (the arena, or a
 * source it was assigned to), valid until the next run or free; NULL for an
 * output that is a constant, or j out of range. Its type is graph output j's. */
const void *cm_program_output(const cm_program *pr, int j);
/* Where node v of the program's graph (cm_program_graph) lies after the
 * last run: a source's or an assigned state's buffer, or the arena buffer of
 * the kernel that writes it (valid until a later buffer of the memory plan
 * reuses the place: all of them with a plan that reuses none); NULL for a
 * value no kernel writes to memory. */
const void *cm_program_value(const cm_program *pr, int v);
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
/* Runs the program once as cm_program_run does (states updated in place),
 * one kernel at a time, checking each kernel's outputs after it runs and
 * stopping at the first non-finite one. For diagnosis (a step that went
 * non-finite): it reads every value written, so it is slower than a run. */
cm_status cm_program_first_nonfinite(cm_program *pr, cm_tensor *const *sources, cm_nonfinite *out,
                                     cm_err *err);
/* Runs the program once as cm_program_run does (states updated in place), one
 * kernel at a time: visit(pr, k, ctx, err) is called before kernel k runs and
 * once after the last (k = n_kernels); in between, cm_program_value reads what
 * the kernels run so far left (a source: its value as the kernels see it). A
 * visit's error stops the run and is returned. For kernel-by-kernel checks
 * (tests/gpu/gpu_diff.c); slower than a run. */
typedef cm_status (*cm_program_visit)(cm_program *pr, int kernel, void *ctx, cm_err *err);
cm_status cm_program_run_stepwise(cm_program *pr, cm_tensor *const *sources, cm_program_visit visit,
                                  void *ctx, cm_err *err);
void cm_program_stats_get(const cm_program *pr, cm_program_stats *out);
/* With opts->profile: per kernel, total ms over all runs and the number of runs. */
typedef struct cm_kernel_profile {
  const char *name;
  cm_group_kind kind;
  double total_ms;
  int runs;
  double flops; /* per run, counted from the kernel's stages (2 per multiply-add) */
} cm_kernel_profile;
int cm_program_profile(const cm_program *pr, const cm_kernel_profile **out);
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
int cm_program_stage_profile(const cm_program *pr, const cm_stage_profile **out);
/* Writes what was compiled for kernel k (k < 0: the whole program, as one
 * unit) to out (cm_emit): CM_EINVALID when the backend has no such text. */
cm_status cm_program_emit(const cm_program *pr, int k, cm_emit what, FILE *out, cm_err *err);

/* ---- the backend table ---------------------------------------------------
 * A backend is one cm_backend filled in: cm_compile lowers the plan for the
 * target (cm_program_kernels), then calls compile and (unless compile_only)
 * alloc_arena; cm_program_run binds and checks the sources, then calls upload,
 * run(0, n_kernels) and download; cm_program_first_nonfinite calls run one
 * kernel at a time and reads buffers through buffer; cm_program_free calls
 * free. The backend keeps its state with cm_program_set_impl. Every entry
 * returns errors as cm_err naming the kernel or buffer; none may exit. */
struct cm_backend {
  const char *name; /* "cpu", "cuda": in messages */
  /* Renders and compiles every kernel of cm_program_kernels(pr) for
   * cm_program_target(pr) (its constants: cm_kernel_const_data on
   * cm_program_graph(pr)). Fills what it knows of *stats (render/jit ms,
   * cache, modules, object bytes, threads, vector_bits, runnable). Refuses a
   * target this host cannot run unless opts->compile_only. Required. */
  cm_status (*compile)(cm_program *pr, const cm_compile_opts *opts, cm_program_stats *stats,
                       cm_err *err);
  /* Allocates the memory the kernels run over: the plan's arena
   * (cm_kprogram.arena_bytes), scratch, workspace, status words, constants;
   * fills stats' arena/scratch/workspace bytes. Required. */
  cm_status (*alloc_arena)(cm_program *pr, cm_program_stats *stats, cm_err *err);
  /* Before a run, with every source bound (cm_program_source): makes them
   * readable by the kernels (a device copy). NULL: the kernels read host memory. */
  cm_status (*upload)(cm_program *pr, cm_err *err);
  /* Runs kernels [first, last) in order, SOURCE buffers at cm_program_source.
   * After them, a failed gather/scatter_add index check among them is
   * returned as cm_program_index_error of the first such node in graph order.
   * Required. */
  cm_status (*run)(cm_program *pr, int first, int last, cm_err *err);
  /* After a run: writes the states the graph assigns back to their sources'
   * host memory. NULL: the kernels wrote them in place. */
  cm_status (*download)(cm_program *pr, cm_err *err);
  /* Host memory holding buffer b of kernel k after the last run (copied from
   * the device when it lives there), valid until the next run; NULL when it
   * is not kept. Required. */
  const void *(*buffer)(const cm_program *pr, int k, int b);
  /* Device backends that run asynchronously: run enqueues, finish waits for the
   * enqueued work and returns the index error of run's kernels (the states the run
   * assigned reach the host all the same: by download). cm_program_first_nonfinite
   * calls it after each kernel. NULL: run is synchronous. */
  cm_status (*finish)(cm_program *pr, cm_err *err);
  /* cm_program_prefetch: sources[v] (by node v of cm_program_graph, checked; NULL
   * but for the inputs) are the next run's inputs; the sources of a run going on
   * stay bound. NULL: nothing to do. */
  cm_status (*prefetch)(cm_program *pr, cm_tensor *const *sources, cm_err *err);
  /* resident_states: copy every source back to the host tensors bound at the last run;
   * mark them to be uploaded again. NULL: states are never resident. */
  cm_status (*states_download)(cm_program *pr, cm_err *err);
  void (*states_changed)(cm_program *pr);
  /* Per-kernel and per-stage times with opts->profile; NULL: none kept. */
  int (*profile)(const cm_program *pr, const cm_kernel_profile **out);
  int (*stage_profile)(const cm_program *pr, const cm_stage_profile **out);
  /* Writes kernel k's text of kind what (k < 0: the whole program as one
   * unit; never CM_EMIT_KERNEL_IR, which is generic); CM_EINVALID naming the
   * kind when the backend has none. NULL: it has none at all. */
  cm_status (*emit)(const cm_program *pr, int k, cm_emit what, FILE *out, cm_err *err);
  /* Frees the backend's state (cm_program_impl); called once, also after a
   * failed compile or alloc_arena. Required. */
  void (*free)(cm_program *pr);
};
extern const cm_backend cm_backend_cpu; /* runtime/backend_cpu.c: LLVM JIT, OpenMP */
/* False in a build without LLVM (-DCMAEC_LLVM=OFF): cm_backend_cpu's compile then fails with
 * CM_NO_CPU_BACKEND_MESSAGE; --backend auto picks cuda or ref there. */
bool cm_have_cpu_backend(void);
#define CM_NO_CPU_BACKEND_MESSAGE                                                                  \
  "this cmaec was built without LLVM (-DCMAEC_LLVM=OFF): the cpu backend is unavailable; use "     \
  "--backend cuda or ref"
extern const cm_backend cm_backend_cuda; /* runtime/backend_cuda.c: CUDA C through a
                                            cm_cuda_compiler, run through a cm_cuda_driver */
/* The modules of a program compiled by cm_backend_cuda (not render_only), with
 * ptxas's report per stage function; NULL else. */
const cm_cuda_build *cm_program_cuda_build(const cm_program *pr);
/* The compiler that built them (its name: "nvrtc 13.0"); NULL else. */
const cm_cuda_compiler *cm_program_cuda_compiler(const cm_program *pr);
void cm_program_set_impl(cm_program *pr, void *impl);
void *cm_program_impl(const cm_program *pr);
/* The host data of source node v of cm_program_graph(pr) during a run; NULL
 * for any other node. */
char *cm_program_source(const cm_program *pr, int v);
/* The oracle's error for a failed index check of node v of cm_program_graph:
 * index, its flat position (the STATUS words' values). */
cm_status cm_program_index_error(const cm_program *pr, int v, int64_t index, int64_t pos,
                                 cm_err *err);

/* ---- choosing a backend (runtime/backend_select.c) ----------------------
 *
 * Every place a backend is chosen (run, step, train, eval, the benches) goes
 * through cm_backend_resolve: --backend auto|cpu|cuda|ref, --device N,
 * --cuda-graphs on|off become the target, backend options and a description
 * that cm_compile and the run's header line take. */
typedef enum cm_backend_kind {
  CM_BACKEND_AUTO = 0, /* cuda when the driver loads and has the device, else cpu */
  CM_BACKEND_CPU,      /* LLVM JIT on this host */
  CM_BACKEND_CUDA,     /* a GPU through the CUDA driver */
  CM_BACKEND_REF,      /* the reference evaluator cm_eval (no cm_compile) */
} cm_backend_kind;

typedef struct cm_backend_request {
  cm_backend_kind kind;
  int device;            /* the driver's ordinal (--device) */
  cm_cuda_graphs graphs; /* --cuda-graphs */
  /* tests: the emulated device (tests/emu/emu.h); NULL: cm_cuda_driver_load, NVRTC */
  const cm_cuda_driver *driver;
  const cm_cuda_compiler *compiler;
} cm_backend_request;

typedef struct cm_backend_choice {
  cm_backend_kind kind;      /* cpu, cuda or ref: never auto */
  cm_target target;          /* cpu: the host's ($CMAEC_CPU); cuda: the device's arch */
  cm_cuda_backend_opts cuda; /* cuda: cm_compile_opts.backend_opts points here */
  cm_cuda_device device;     /* cuda: the GPU chosen */
  char description[256];     /* "cuda 0 (NAME, sm_90, 132 SMs)", "cpu (auto: no CUDA driver)" */
} cm_backend_choice;

/* "auto", "cpu", "cuda", "ref" (ref only when ref_allowed); CM_EINVALID naming
 * what is available otherwise. */
cm_status cm_backend_parse(const char *name, bool ref_allowed, cm_backend_kind *out, cm_err *err);
/* "on" / "off". */
cm_status cm_backend_parse_graphs(const char *value, cm_cuda_graphs *out, cm_err *err);
/* "N" >= 0. */
cm_status cm_backend_parse_device(const char *value, int *out, cm_err *err);
/* Resolves req: cuda loads the driver (CM_EINVALID "CUDA driver not found: ..."
 * without one) and checks the device is there; auto takes cuda when both hold,
 * else cpu, and says why in the description. */
cm_status cm_backend_resolve(const cm_backend_request *req, cm_backend_choice *out, cm_err *err);
/* Points co at the choice (backend_opts; cuda: resident_states is the caller's)
 * and returns the target to give cm_compile (NULL: the CPU default). The choice
 * must outlive the compile. */
const cm_target *cm_backend_compile_opts(cm_backend_choice *c, cm_compile_opts *co);
const char *cm_backend_kind_name(cm_backend_kind k);

/* ---- the autotuner (runtime/tuner.c) ---------------------------------------
 *
 * cm_tune searches the plans of a program's tunable stages (codegen's tuning spaces) by
 * measuring them, and records every trial and the best in the tuning database; cm_compile
 * then applies the recorded best points (docs/runtime.md "Autotuning"). */
typedef struct cm_tune_opts {
  double budget_s;        /* 0: no limit */
  bool progress;          /* a progress bar on stderr */
  const char *db_path;    /* NULL: the default database */
  int64_t max_candidates; /* per stage, 0: all (tests) */
  int max_stages;         /* the most expensive ones only (the others as lowered), 0: all */
  /* A valid batch and state for the whole graph (per node; cm_train_example_sources): on the
   * CPU, candidates are then timed inside whole runs of the program, every searched stage at
   * once, with the data and caches of a real step; NULL: each kernel alone on random data. */
  cm_tensor *const *step_sources;
} cm_tune_opts;
typedef struct cm_tune_stats {
  int stages_tunable, searched, from_db, candidates, pruned, failed, over_budget;
  double seconds, default_ms, tuned_ms; /* sums over the searched stages (times their kernels) */
} cm_tune_stats;
/* Tunes every distinct tunable stage of g's program for target (most expensive first by the
 * default's measured time or cm_tune_model_cost), within the budget, recording every trial and the
 * best in the database. co as for cm_compile. */
cm_status cm_tune(const cm_graph *g, const cm_target *target, const cm_compile_opts *co,
                  const cm_tune_opts *o, cm_tune_stats *st, cm_err *err);
/* cm_compile's hook, after lowering: with co->tune resolving to cached or search, sets every
 * tunable stage of kp whose key the database (at <cm_cache_dir>/tuning.db; none there: nothing)
 * has to its best point; *applied counts them, *ignored the records that no longer parse or
 * apply. Errors: a bad $CMAEC_TUNE, a database that cannot be read. */
cm_status cm_tune_apply_cached(cm_kprogram *kp, const cm_target *t, const cm_compile_opts *co,
                               int *applied, int *ignored, cm_err *err);
/* The device part of a tuning key for programs compiled for t with co (CPU: its threads as the
 * CPU backend resolves them; CUDA: the GPU and driver co's backend options name). */
void cm_tune_device_for(const cm_target *t, const cm_compile_opts *co, char *out, size_t size);
/* A program running kernel k alone over graph g (runtime/program.c; for measuring one kernel's
 * plans): takes k (moved: the program frees it); every buffer k reads but does not write is bound
 * as a source, by its node (cm_program_run's sources[v] for those nodes, with the node's type);
 * the buffers k writes get an arena of their own. co as for cm_compile (plan and tune unused). */
cm_status cm_program_of_kernel(const cm_graph *g, const cm_plan *plan, cm_kernel *k,
                               const cm_target *t, const cm_compile_opts *co, cm_program **out,
                               cm_err *err);

/* ---- Communication (issue 18) (runtime/comm.c, comm_mpi.c, comm_tcp.c, comm_nccl.c) -------
 *
 * A group of ranks running the same program on their own data (docs/runtime.md
 * "Communication"). Every collective is limited by a watchdog: one that does not finish within
 * the comm's timeout fails (CM_EINTERNAL) naming the rank, the collective, `what` and its size,
 * and the comm is broken from then on (every later collective fails at once). */
typedef struct cm_comm cm_comm;
typedef enum cm_comm_kind {
  CM_COMM_AUTO,  /* cm_comm_init: MPI when started by mpirun (OMPI_COMM_WORLD_SIZE / PMI_SIZE set),
                    else the TCP rendezvous when CMAEC_WORLD_SIZE is set, else SELF */
  CM_COMM_SELF,  /* world size 1: every collective is a copy (or nothing) */
  CM_COMM_LOCAL, /* n ranks = n threads of this process (cm_comm_local_group); tests, simulation */
  CM_COMM_MPI,   /* Open MPI, dlopen("libmpi.so.40"), host buffers (CPU ranks) */
  CM_COMM_TCP,   /* host buffers over the TCP rendezvous's sockets (CPU ranks without MPI) */
  CM_COMM_NCCL,  /* NCCL, dlopen("libnccl.so.2"), device buffers, its own stream; the
                    ncclUniqueId exchanged over MPI or the TCP rendezvous */
} cm_comm_kind;
typedef struct cm_comm_opts {
  cm_comm_kind kind; /* CM_COMM_AUTO */
  double timeout_s;  /* watchdog per collective; 0: 300 s (--comm-timeout) */
  int device;        /* NCCL: CUDA device; -1: $LOCAL_RANK (0 if unset) */
} cm_comm_opts;

/* TCP: CMAEC_RANK, CMAEC_WORLD_SIZE, CMAEC_MASTER_ADDR (default 127.0.0.1), CMAEC_MASTER_PORT
 * (default 29500). NCCL: the bootstrap is MPI under mpirun, else TCP, else world size 1. */
cm_status cm_comm_init(const cm_comm_opts *o, cm_comm **out, cm_err *err);
/* n communicators, one per thread of this process, ranks 0..n-1 (CM_COMM_LOCAL). */
cm_status cm_comm_local_group(int n, double timeout_s, cm_comm **comms, cm_err *err);
int cm_comm_rank(const cm_comm *c);
int cm_comm_size(const cm_comm *c);
cm_comm_kind cm_comm_kind_of(const cm_comm *c);
const char *cm_comm_describe(const cm_comm *c); /* "mpi rank 1/2 (Open MPI 4.1.4)" */

/* Blocking collectives on host buffers (CPU ranks; NCCL ranks: device pointers, enqueued on
 * the comm's stream, and "blocking" means ordered after `stream` when not NULL). `what` names
 * the collective in the watchdog's message ("grad bucket 3 (12.5 MB)", "node 812 all_gather
 * infonce_keys"). Every rank must call the same collectives in the same order with the same
 * counts; a mismatch that the library can see (count, dtype) is an error naming both ranks'
 * values, one it cannot see is caught by the watchdog. send == recv is allowed (in place).
 * dtypes: f32, bf16 (reduced in f32 and rounded back on host kinds), i32, i64 (SUM only);
 * MEAN = SUM / size, in f32. */
cm_status cm_comm_all_reduce(cm_comm *c, const void *send, void *recv, int64_t count,
                             cm_dtype dtype, cm_reduce_mode mode /* SUM or MEAN */,
                             const char *what, cm_err *err);
/* recv holds size * count elements: rank r's send at offset r * count. */
cm_status cm_comm_all_gather(cm_comm *c, const void *send, void *recv, int64_t count,
                             cm_dtype dtype, const char *what, cm_err *err);
/* send holds size * count elements; recv gets this rank's count-element slice of the sum. */
cm_status cm_comm_reduce_scatter(cm_comm *c, const void *send, void *recv, int64_t count,
                                 cm_dtype dtype, cm_reduce_mode mode, const char *what,
                                 cm_err *err);
cm_status cm_comm_broadcast(cm_comm *c, void *buf, int64_t count, cm_dtype dtype, int root,
                            const char *what, cm_err *err);
cm_status cm_comm_barrier(cm_comm *c, const char *what, cm_err *err);

/* Asynchronous all_reduce for overlapping gradient buckets with the backward: queued on the
 * comm's own thread (host) or stream (NCCL) in call order; cm_comm_wait blocks until done.
 * Blocking collectives called while requests are in flight run after them, in call order. */
typedef struct cm_comm_request cm_comm_request;
cm_status cm_comm_all_reduce_start(cm_comm *c, const void *send, void *recv, int64_t count,
                                   cm_dtype dtype, cm_reduce_mode mode, const char *what,
                                   cm_comm_request **req, cm_err *err);
cm_status cm_comm_wait(cm_comm_request *req, cm_err *err); /* frees req */
/* NCCL: the CUDA stream (CUstream) whose work so far every later collective is ordered after
 * (an event recorded on it, waited for by the comm's stream); NULL: none. Other kinds: ignored. */
void cm_comm_set_compute_stream(cm_comm *c, void *stream);
/* Collective: every rank calls it. After a failed collective (the comm is broken) it ends the
 * job instead: MPI_Abort under MPI (this process exits with status 1 and mpirun ends the
 * others), ncclCommAbort under NCCL; TCP and LOCAL close what they hold. NULL: nothing. */
void cm_comm_free(cm_comm *c);

#endif
