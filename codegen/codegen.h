/* codegen/codegen.h — code generation: the contract of the codegen layer.
 *
 * Defines (so far): probes of the compilers cmaec generates code with — LLVM
 * (linked at build time) and NVRTC (loaded with dlopen at run time, so the
 * binary runs where no CUDA is installed) — and NVRTC compilation of CUDA C to
 * CUBIN with the ptxas resource report; the LLVM JIT for the host CPU with an
 * on-disk object cache; the kernel IR, the lowering of plan groups to it, its
 * reference interpreter, and the two renderers (LLVM for the host CPU, CUDA C
 * for NVRTC). */
#ifndef CMAEC_CODEGEN_H
#define CMAEC_CODEGEN_H

#include "../passes/passes.h"

/* CMAEC_HAVE_LLVM (the build's CMAEC_LLVM option): 0 leaves out everything that needs LLVM:
 * the JIT, the LLVM renderer and the LLVM types in their declarations. */
#ifndef CMAEC_HAVE_LLVM
#error "CMAEC_HAVE_LLVM is not defined: link the target with cmaec_lib (CMakeLists.txt)"
#endif
#if CMAEC_HAVE_LLVM
#include <llvm-c/Types.h>
#endif

/* What a probe found: found, and a one-line detail (version, or why not). */
typedef struct cm_component {
  const char *name;
  bool found;
  char detail[512];
} cm_component;

void cm_compiler_find_llvm(cm_component *out);
void cm_compiler_find_nvrtc(cm_component *out);

/* dlopen the first loadable of the NULL-terminated names; on failure *why holds
 * the last dlerror() (copied into why_buf). */
void *cm_dlopen_first(const char *const *names, char *why_buf, size_t why_size);
/* Where NVRTC is looked for, in order (NULL-terminated). */
extern const char *const cm_nvrtc_library_names[];

/* ---- the target (codegen/target.c) --------------------------------------
 *
 * What code is generated for, in one description (cm_target) that lowering,
 * both renderers, the JIT, the compile API and the backends read; nothing else
 * derives vector widths, tile defaults or device limits.
 *
 * The CPU part
 *
 * The CPU the LLVM backend generates code for: the host's, or the LLVM CPU
 * named by $CMAEC_CPU (x86-64 hosts: "x86-64", "x86-64-v2", "x86-64-v3",
 * "x86-64-v4", "skylake-avx512", "znver3", "znver4", "znver5", ...; unset, ""
 * or "native": the host). A named CPU brings the features LLVM's X86 target
 * parser gives it (what clang -march=NAME enables), not the host's; its code
 * runs here only where the host has every one of them. The JIT, the lowering's
 * GEMM tiles, the renderer's vector width and the CPU executor all follow it. */
#define CM_CPU_ENV "CMAEC_CPU"
typedef struct cm_cpu_target {
  char cpu[64];        /* the LLVM CPU name */
  char host_cpu[64];   /* the host's, for messages */
  char source[96];     /* where the name came from: "CMAEC_CPU=x86-64-v4", "CPU znver4" */
  bool forced;         /* a named CPU, not the host */
  int vector_bits;     /* the widest vectors: 512 (AVX-512), 256 (AVX), 128 */
  bool dot_bf16;       /* 512-bit vdpbf16ps (avx512bf16): the GEMM's bf16 micro-kernel */
  bool runnable;       /* the host has every enabled feature */
  char missing[256];   /* !runnable: the features the host lacks, "avx512f,avx512bw,..." */
  char features[2048]; /* the enabled features, "+a,+b,..." */
} cm_cpu_target;
/* cpu NULL: $CMAEC_CPU. features NULL: the CPU's own (or the host's); else
 * "+a,-b" applied on top. An unknown name is CM_EINVALID naming where it came
 * from and every name LLVM knows. */
cm_status cm_cpu_target_resolve(const char *cpu, const char *features, cm_cpu_target *out,
                                cm_err *err);
/* CM_EINVALID: "<what>: CMAEC_CPU=X needs F, which this host (H) lacks: ..." */
cm_status cm_cpu_target_not_runnable(const cm_cpu_target *t, const char *what, cm_err *err);

typedef enum cm_target_kind { CM_TARGET_CPU, CM_TARGET_CUDA } cm_target_kind;

typedef struct cm_kgemm_tiles {
  int mc, nc, kc; /* cache blocking: A block mc x kc, B panel kc x nc (multiples of mr/nr) */
  int mr, nr;     /* register block of the micro-kernel (CPU) / warp tile (CUDA) */
} cm_kgemm_tiles;

typedef struct cm_target {
  cm_target_kind kind;
  char arch[64];       /* CPU: the LLVM CPU name; CUDA: "sm_80", "sm_90" */
  int vector_lanes;    /* f32 lanes per vector: 16 (AVX-512), 8 (AVX), 4; CUDA: 1 */
  cm_cpu_target cpu;   /* CPU: the resolved CPU (features, runnable, where it came from) */
  cm_kgemm_tiles gemm; /* GEMM tile defaults before they are fitted to a problem */
  /* CUDA devices of this arch (0 on CPUs) */
  int sm;                      /* 80, 90, ... */
  int warp_size;               /* 32 */
  int max_threads_per_block;   /* 1024 */
  int max_regs_per_thread;     /* 255 */
  int regs_per_sm;             /* 65536 */
  int64_t shared_bytes_static; /* per block without the opt-in attribute: 48 KiB */
  int64_t shared_bytes_max;    /* per block with cuFuncSetAttribute's opt-in */
  bool mma_bf16;               /* tensor-core mma.sync for bf16/f16 operands (sm_80+) */
} cm_target;

/* The CPU target: cpu NULL takes $CMAEC_CPU (unset, "" or "native": the host);
 * features as cm_cpu_target_resolve. Errors as cm_cpu_target_resolve. */
cm_status cm_target_cpu(const char *cpu, const char *features, cm_target *out, cm_err *err);
/* $CMAEC_CPU's target, or the host's when that name is not valid (the error is
 * reported where a program is built): the default wherever no target is given. */
void cm_target_host(cm_target *out);
/* A CUDA target: arch "sm_XY" (XY >= 70), limits of that compute capability.
 * Anything else is CM_EINVALID naming the arch. */
cm_status cm_target_cuda(const char *arch, cm_target *out, cm_err *err);
/* The CPU GEMM tile defaults for vectors of `lanes` f32 (cm_target.gemm). */
cm_kgemm_tiles cm_cpu_gemm_defaults(int lanes);
/* One line: "cpu znver4 (CMAEC_CPU=znver4), 16 f32 lanes, GEMM tiles mc 240 ..." */
void cm_target_print(const cm_target *t, FILE *out);

#if CMAEC_HAVE_LLVM
/* ---- the LLVM JIT (codegen/llvm_jit.c) ---------------------------------- */

/* One ORC LLJIT for the host CPU, with an optional on-disk object cache. Not
 * thread-safe: one thread at a time per cm_jit (several cm_jit, also in several
 * processes, may share a cache). */
typedef struct cm_jit cm_jit;
typedef struct cm_jit_opts {
  const char *cache_dir; /* NULL: no disk cache; created (mkdir -p) if missing */
  int opt_level;         /* 0..3: "default<On>" and the code generator's level */
  const char *cpu;       /* NULL: $CMAEC_CPU, else the host CPU (cm_cpu_target) */
  const char *features;  /* NULL: host features for the host, else the CPU's defaults */
  int vector_width;      /* x86: 0 or 512: prefer 512-bit vectors where AVX-512 exists
                            (LLVM tunes Intel cores for 256); 256: prefer 256-bit */
  bool compile_only;     /* a CPU whose code this host cannot run is accepted (its
                            objects are made and linked; nothing may call them) */
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
  int64_t object_bytes;     /* size of the objects added (compiled or loaded) */
} cm_jit_stats;
typedef enum cm_jit_text { CM_JIT_TEXT_IR, CM_JIT_TEXT_ASM } cm_jit_text;

#endif /* CMAEC_HAVE_LLVM */

/* Calls into JIT'd code under clang's -fsanitize=function must come from a
 * function marked so (JIT'd code carries no signature word). */
#if defined(__clang__)
#define CM_NO_SANITIZE_FUNCTION __attribute__((no_sanitize("function")))
#else
#define CM_NO_SANITIZE_FUNCTION
#endif

#if CMAEC_HAVE_LLVM

cm_status cm_jit_create(cm_jit **out, const cm_jit_opts *opts, cm_err *err); /* opts NULL: O3 */
void cm_jit_destroy(cm_jit *j);
LLVMContextRef cm_jit_context(cm_jit *j); /* owned by the JIT */
const char *cm_jit_target_description(const cm_jit *j);
const cm_cpu_target *cm_jit_target(const cm_jit *j); /* the CPU it compiles for */
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
#endif /* CMAEC_HAVE_LLVM */

/* ---- NVRTC (codegen/nvrtc.c), loaded with dlopen at run time ---------- */

typedef struct cm_nvrtc cm_nvrtc;
/* Loads NVRTC (the names of cm_compiler_find_nvrtc, or only $CMAEC_NVRTC_LIBRARY when set);
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

/* ---- the kernel IR (codegen/kernel.c; cm_kstage_simplify in kernel_simplify.c;
 * the templates' checks, plans and sizes in gemm.c and attention.c) ---------
 *
 * A kernel is what one fusion group (cm_group) becomes: buffers plus stages
 * run in order. A stage is a loop nest over an iteration domain with an
 * optional inner reduction, an expression DAG, and stores:
 *
 *   for (v0 < dom[0]) ... for (v{n_dom-1} < dom[n_dom-1]):      // parallel over the
 *     acc = reduce_{r in red} body(v, r)     (only when n_red > 0) // first n_parallel vars
 *     for each store s: buffers[s.buf][s.index(v)] (+)= s.value(v, acc)
 *
 * Variables: ids 0..n_dom-1 are the domain vars, n_dom..n_dom+n_red-1 the
 * reduction vars (all i64, outermost first). A stage sees every store of the
 * earlier stages (a barrier between stages). Within one iteration every store
 * value is computed before any store is made (an update may read and write the
 * same buffer at the same index; lowering guarantees a stage never reads a
 * buffer it writes at any other index). Stores of different iterations never
 * hit the same element unless the stage is `accumulate` (scatter_add).
 *
 * Arithmetic follows the oracle (ir/eval.c): every CM_KX_OP result is rounded
 * to its dtype (bf16/f16 computed in f32 and rounded, RNE); ints never go
 * through floats. Reductions accumulate in acc_dtype (f32 for f32/bf16/f16
 * values, f64 for f64, the int dtype for ints) in any order (renderers may
 * reassociate: results agree with the oracle to rounding, not bit for bit). */

#define CM_KMAX_VARS 12 /* n_dom + n_red */
#define CM_KMAX_STORES 32

typedef enum cm_kx_kind {
  CM_KX_CONST, /* value (dtype: any; f64 holds every value used) */
  CM_KX_VAR,   /* i64: loop variable `var` */
  CM_KX_ACC,   /* the stage's reduction result (acc_dtype); only in store values */
  CM_KX_LOAD,  /* buffers[buf] (its dtype) at element index a (an i64 expression) */
  CM_KX_OP,    /* an elementwise graph op (cm_op NEG..SELECT, CAST to dtype) on a, b, c;
                  on i64/i32 also index arithmetic: ADD SUB MUL MIN MAX, DIV truncating
                  (C), LT LE EQ NE giving bool, SELECT */
  CM_KX_MOD,   /* i64: a % b (C remainder; lowering uses it with a >= 0, b > 0) */
} cm_kx_kind;

typedef struct cm_kexpr {
  cm_kx_kind kind;
  cm_op op;       /* CM_KX_OP */
  cm_dtype dtype; /* the result's dtype */
  int a, b, c;    /* operand expression ids, each smaller than this one's; -1 unused */
  int var;        /* CM_KX_VAR */
  int buf;        /* CM_KX_LOAD */
  double value;   /* CM_KX_CONST */
} cm_kexpr;

typedef struct cm_kstore {
  int buf;   /* kernel buffer written */
  int index; /* i64 expression over the domain vars: the element index */
  int value; /* expression over the domain vars and ACC; converted to the buffer's dtype
                exactly as CAST would */
} cm_kstore;

typedef enum cm_kreduce { CM_KRED_SUM, CM_KRED_MAX } cm_kreduce;

/* Templates: a stage may carry a recognized pattern that a renderer turns into
 * a specialized skeleton (tiles, register blocking, shared memory). The
 * generic reading of the stage above stays its exact meaning; a renderer
 * without the template renders the generic loop nest. */
typedef enum cm_ktemplate {
  CM_KT_NONE,
  /* dom = [batch..., M, N] (n_dom >= 2), red = [K] (n_red == 1), red_op SUM,
   * body = MUL(gemm_a, gemm_b) (each possibly widened by a CAST to the
   * accumulator's dtype: cm_kx_is_gemm_factor) where expression gemm_a reads only the batch
   * vars, v{n_dom-2} (i) and the reduction var (k), and gemm_b only the batch
   * vars, k and v{n_dom-1} (j): C[b,i,j] = sum_k A(b,i,k) B(b,k,j). Operand
   * expressions may be any prologue (transposed or strided loads, casts,
   * scaling, im2col of a convolution with padding as SELECT): the renderer
   * evaluates them once per element while packing tiles. Store values are the
   * epilogue (bias, activation, residual, transposed store). */
  CM_KT_GEMM,
  /* Attention, forward (S = Q K^T, row max, row sum of exp, P V, and the stores
   * of whatever the graph keeps: P, exp(S - max), ...) and backward (dP = dO V^T,
   * dV = P^T dO, row sums, dQ = dS K, dK = dS^T Q). Carried by the FIRST stage of
   * a span of attn.span consecutive stages; attn describes the span (see
   * cm_kattn). Every stage of the span keeps its exact generic reading: the
   * interpreter and renderers without the template run the stages one after
   * the other. The span's GEMM stages keep CM_KT_GEMM and their gemm_a/gemm_b:
   * those are the template's operand prologues (Q, K, V, dO, P, dS over batch,
   * row, column and feature vars); the stores of the span into buffers that
   * are not local are the epilogue. The first stage itself is the first GEMM
   * (Q K^T, or dO V^T): its gemm_a/gemm_b/tiles stay set. */
  CM_KT_ATTENTION_FWD,
  CM_KT_ATTENTION_BWD,
} cm_ktemplate;

#define CM_KATTN_MAX_LOCAL 8
#define CM_KATTN_MAX_SPAN 16

/* The span of an attention template. Invariants (cm_kernel_verify):
 * - span >= 2 and the span lies inside the kernel; no stage of it accumulates
 *   or carries another attention template; n_parallel == nb on the first stage;
 * - every stage of the span has n_dom >= nb + (br < rows) and dom[0..nb-1] equal
 *   to the first stage's (the batch: heads included), and dom[nb] == rows when
 *   br < rows (var nb is then the query row of every stage);
 * - local[]: SCRATCH buffers accessed (read or written) only by stages of the
 *   span; a buffer that stages of the span both write and read and that is
 *   not local (a group output the span reads back, like exp(S - max)) is
 *   accessed by the span only within the work item's slice (the index rule
 *   below with X = its numel / (batch x rows));
 * - every access to a local buffer is local to one batch item (and one query
 *   row when br < rows): with B the linear index of (v0..v{nb-1}) over the
 *   batch extents and X = local_row[i], the index is (B * rows + v{nb}) * X + r
 *   with 0 <= r < X when br < rows, else B * rows * X + r with 0 <= r < rows * X
 *   (the lowering proves it on the affine form of the index).
 * A fused rendering may therefore run, per work item = one batch item (the
 * first stage's n_parallel == nb leading vars), for each block of br query
 * rows, every stage of the span restricted to those rows (all rows when
 * br == rows), with the local buffers in the per-thread workspace (br rows of
 * each, or one batch item's slice) instead of the scratch area: no N x N value
 * internal to the group goes through memory beyond one per-thread tile. The
 * other stages of the span then run no work (their functions return). */
typedef struct cm_kattn {
  int span;     /* stages covered: this one and the next span - 1 */
  int nb;       /* batch vars shared by the span */
  int64_t rows; /* the query-row extent (N tokens) */
  int br, bc;   /* tunables: query rows per block (br == rows: whole batch item),
                   key block (the CPU rendering keeps whole key rows: the fusion pass
                   only forms attention groups whose rows fit on chip) */
  double scale; /* the softmax scale found in the expressions (0 if none) */
  int n_local;  /* buffers kept per thread by a fused rendering */
  int local[CM_KATTN_MAX_LOCAL];
  int64_t local_row[CM_KATTN_MAX_LOCAL]; /* X: elements per (batch item, query row) */
  int64_t ws_bytes; /* CPU workspace of the fused rendering (cm_kattn_workspace, or
                       cm_kattn_stream_workspace when stream) */
  /* Streaming over key blocks of bc < the key extent (set by the lowering;
   * cm_kattn_stream_check re-derives the roles). Forward spans: the span is
   * exactly S = gemm (stage first), m = rowmax(f(S)), E = exp(g(S) - m),
   * l = rowsum(E), [P = E / l], O = gemm(E / l or P, V), every role f32 and
   * every access to S, m, E, l, P at its canonical (batch, row[, key]) index;
   * a renderer may then run, per query block, the key blocks with a running
   * max and sum (flash attention), and write the values the graph keeps
   * (keep) from the final m and l in a second pass. Backward spans: see role. */
  bool stream;
  int st_max, st_exp, st_sum, st_p, st_out; /* stage indices (st_p -1 when absent) */
  int buf_s, buf_m, buf_e, buf_l, buf_p;    /* the roles' buffers (buf_p -1 when absent) */
  unsigned keep; /* CM_KATTN_KEEP_* bits: roles stored into buffers that are not local */
  /* Backward spans (stream on a CM_KT_ATTENTION_BWD span, br == rows): each
   * stage's role over the key var j (CM_KATTN_ROLE_*): the first stage a
   * GEMM tile (i, j) over its own reduction (ROLE_TILE: dP = dO V^T, or S' = Q K^T
   * of the recomputed backward), later GEMM tiles (ROLE_GEMM_TILE: its dP = dO V^T),
   * elementwise tiles (i, j) (E' = exp(S' c - m), dS), row reductions over j
   * (ROLE_ROWRED: rowsum(dP o P); none in the recomputed backward, whose D comes from
   * outside), GEMMs over rows i reducing over j (dQ = dS K: accumulated over key blocks)
   * and GEMMs over rows j reducing over i (dK = dS^T Q, dV = P^T dO: complete per key
   * block). A GEMM tile's store is an epilogue of its accumulator alone and its operands
   * read no local buffer; the row GEMMs' gemm_a may be any expression of local tiles at
   * their canonical (row, key) index and of buffers the span never writes (P' = E' / z
   * with z loaded per row, cast(P', bf16)); their gemm_b and epilogues read no local.
   * Loads of buffers the span never writes (Q, K, V, dO, the row statistics m, z, D at
   * [batch, i]) are plain loads, evaluated per point. Local buffers are tiles
   * (local_row == keys; f32, or bf16/f16 after autocast: a renderer may keep them as
   * f32, the widening is exact) or row statistics (1, f32). Without a ROWRED stage a
   * streaming rendering makes ONE pass over the key blocks (bc == keys allowed), else
   * two (the first accumulates the row reductions; bc < keys). */
  signed char role[CM_KATTN_MAX_SPAN];
  /* Whole-row rendering (CPU): the register block of each GEMM stage of the
   * span (tunable; index: stage - first; 0 where not a GEMM stage or not
   * planned), chosen by attention.c's cost model for vectors of `lanes` f32
   * within ws_bytes; a renderer with another vector width uses the first
   * stage's tiles for every stage. */
  int lanes;
  short mr[CM_KATTN_MAX_SPAN], nr[CM_KATTN_MAX_SPAN];
  /* The CPU workspace layout (byte offsets), computed once by cm_attn_mark
   * (cm_kattn_layout) for the first stage's register block tiles.mr x tiles.nr;
   * the renderers only read it. Whole rows (cm_kattn_workspace): whole_bytes the
   * total (0: the span has no whole-row layout), local_off[i] each local buffer,
   * pack_off the GEMM packing area. Streaming forward (cm_kattn_stream_workspace):
   * stream_off[0..7] packed Q, packed K/V, S, packed E, O, m, l, alpha. Streaming
   * backward (cm_kattn_bwd_stream_workspace): bwd_fixed[0..3], bwd_local_off[i],
   * stage_off[r]. The streaming total is ws_bytes. */
  int64_t whole_bytes;
  int64_t local_off[CM_KATTN_MAX_LOCAL], pack_off;
  int64_t stream_off[8];
  int64_t bwd_fixed[4], bwd_local_off[CM_KATTN_MAX_LOCAL], stage_off[CM_KATTN_MAX_SPAN];
} cm_kattn;

enum {
  CM_KATTN_ROLE_TILE = 1,      /* [batch, i, j]: a GEMM (first stage) or elementwise */
  CM_KATTN_ROLE_ROWRED = 2,    /* [batch, i(, 1)] reducing over j */
  CM_KATTN_ROLE_GEMM_ROWS = 3, /* [batch, i, c] reducing over j */
  CM_KATTN_ROLE_GEMM_KEYS = 4, /* [batch, j, c] reducing over i */
  CM_KATTN_ROLE_GEMM_TILE = 5, /* [batch, i, j]: a GEMM over its own reduction after the first
                                  stage (dP = dO V^T of the recomputed backward) */
};

#define CM_KATTN_KEEP_S 1u
#define CM_KATTN_KEEP_M 2u
#define CM_KATTN_KEEP_E 4u
#define CM_KATTN_KEEP_L 8u
#define CM_KATTN_KEEP_P 16u

/* The CUDA renderer's plan of one stage (codegen/render_cuda_plan.c): every choice the CUDA
 * emitter makes, computed once from the stage and the cm_target's limits by
 * cm_cuda_plan_kernel; the emitter and cm_cuda_stage_launch only read it. Each field is
 * tunable; the planner's values are the cost model's defaults. */
typedef enum cm_kcuda_kind {
  CM_KCUDA_NONE = 0,        /* not planned */
  CM_KCUDA_GENERIC,         /* grid-stride loop over the domain points */
  CM_KCUDA_GEMM,            /* shared-memory tiled GEMM: register-tiled FMA or mma.sync */
  CM_KCUDA_ATTN_FUSED,      /* attention span in one function, local buffers in shared memory */
  CM_KCUDA_ATTN_STREAM,     /* attention forward span, online softmax over key blocks */
  CM_KCUDA_ATTN_STREAM_BWD, /* attention backward span, two passes over key blocks */
  CM_KCUDA_ATTN_FLASH,      /* attention forward span, online softmax on tensor cores (bf16) */
  CM_KCUDA_IN_SPAN,         /* runs inside the function of an earlier stage's span: empty */
  CM_KCUDA_ROWS,            /* a span of row stages in one function, a warp or block per row */
  CM_KCUDA_ATTN_FLASH_BWD,  /* attention backward span on tensor cores (bf16), a block per batch
                               item, one pass over the key blocks (two with a row reduction) */
} cm_kcuda_kind;

/* generic stages: who computes one domain point */
typedef enum cm_kcuda_red {
  CM_KCUDA_RED_THREAD = 0, /* a thread, serial reduction (or none) */
  CM_KCUDA_RED_WARP,       /* a warp, shuffle reduction */
  CM_KCUDA_RED_BLOCK,      /* a block, tree reduction through shared memory */
} cm_kcuda_red;

typedef struct cm_kcuda_gemm {
  bool mma;           /* tensor-core mma.sync m16n8k16 (bf16/f16 operands) */
  bool bf16;          /* mma operand type: bf16, else f16 */
  int mc, nc, kc;     /* block tile mc x nc, k tile kc */
  int mr, nr;         /* warp tile */
  int warps, threads; /* per block: (mc / mr) * (nc / nr) warps (times split_k with mma) */
  int lr, lc, tm, tn; /* FMA: a warp's lanes as lr x lc, each a tm x tn micro tile */
  cm_dtype t;         /* FMA operand/accumulator dtype (f32 or f64) */
  int64_t batch, M, N, K;
  /* mma (render_cuda_mma.c), each tunable (powers of two; cu_mma_plan_valid derives mc, nc,
   * warps, threads): mc = warps_m * mr, nc = warps_n * nr */
  int warps_m, warps_n;
  int split_k;           /* warp groups per block that share each k tile's 16-deep steps; their
                            sums meet in shared memory before the epilogue */
  int stages;            /* cp.async ring depth: k tiles in flight (2..8) */
  bool swizzle;          /* XOR-swizzled shared rows (else padded by 16 bytes) */
  bool a_outer_k;        /* A's shared tile is [k][m] (ldmatrix.trans), else [m][k] */
  bool b_outer_k;        /* B's shared tile is [k][n] (ldmatrix.trans), else [n][k] */
  bool a_async, b_async; /* operand copied by cp.async (a plain load, 16-byte chunks along the
                            tile's rows); else evaluated (its prologue) into registers */
} cm_kcuda_gemm;

typedef struct cm_kcuda_attn {
  int span, nb;        /* stages in the span, batch vars */
  int threads;         /* per block */
  int64_t rows, batch; /* query rows, batch items */
  bool rowwise;        /* fused: blocks of br query rows (else a whole batch item) */
  int br, nrb;         /* query rows per block, row blocks per batch item */
  int bc, nkb;         /* streaming: keys per step, key blocks */
  int64_t keys, d, dv; /* streaming: keys, Q/K width, V width */
  int64_t kvn;         /* streaming forward: floats of the K/V tile */
  int64_t slot_elems[CM_KATTN_MAX_LOCAL]; /* fused: shared elements of each local buffer */
  int64_t acc_off[CM_KATTN_MAX_SPAN];     /* streaming backward: accumulator offsets (floats) */
  int64_t acc_floats;                     /* streaming backward: accumulator floats */
  int dp, dvp;     /* flash: d padded to the mma's k (16), dv to 16 (zeros in shared memory) */
  bool mma;        /* fused: GEMM stages with bf16 operands on tensor cores (mma.sync m16n8k16) */
  bool dyn_shared; /* fused: the local buffers in dynamic shared memory (above the static 48 KiB) */
  bool bwd_two_pass; /* flash backward: a row reduction over the keys first (autodiff's form) */
} cm_kcuda_attn;

/* A span of row stages (render_cuda_rows.c): every stage of the span runs over the same rows (each
 * stage's row vars, a run of its domain vars whose extents multiply to `rows`), and every buffer
 * the span writes and more than one of its stages accesses is accessed only in the row's own slice
 * (index = high + C*row + low, 0 <= low < C, high a multiple of C*rows). So one warp or block per
 * row may run the stages in order, with a barrier only where a stage reads what another thread of
 * the row wrote. */
#define CM_KCUDA_ROWS_MAX_SPAN 16
#define CM_KCUDA_ROWS_MAX_STATS 8
#define CM_KCUDA_ROWS_MAX_CACHED 4

enum {
  CM_KCUDA_ROWS_UNIFORM = 0, /* one point per row: every thread computes it (reducing
                                cooperatively), the first thread stores */
  CM_KCUDA_ROWS_POINTS,      /* a thread per point of the row, serial reduction */
  CM_KCUDA_ROWS_COOP,        /* the row's points one after another, each reduced cooperatively */
};

typedef struct cm_kcuda_rows {
  int span; /* stages in the span: stage[0] (this one) .. stage[span - 1] */
  short stage[CM_KCUDA_ROWS_MAX_SPAN]; /* in order; the stages between them that are not in it
                                          commute with the later ones and run after the span */
  int64_t rows;                        /* rows of the span */
  bool warp; /* a warp per row (at most 1024 points or reduction steps a stage), else a block */
  int rows_per_block; /* warps per block with a warp per row, else 1 */
  int threads;        /* per block */
  int64_t row_work;   /* the most points x reduction extent one stage has per row */
  signed char row_var[CM_KCUDA_ROWS_MAX_SPAN];    /* per stage: its first row var */
  signed char n_row_vars[CM_KCUDA_ROWS_MAX_SPAN]; /* per stage: its row vars (0 when rows == 1) */
  signed char mode[CM_KCUDA_ROWS_MAX_SPAN];       /* per stage: CM_KCUDA_ROWS_* */
  bool sync_before[CM_KCUDA_ROWS_MAX_SPAN];       /* per stage: a barrier before it */
  int n_stats; /* row statistics kept in registers: one element per row, written only by
                  uniform stages; later stages of the span read the register */
  int stat_buf[CM_KCUDA_ROWS_MAX_STATS];
  signed char stat_from[CM_KCUDA_ROWS_MAX_STATS]; /* the first stage (span index) writing it */
  /* Row slices kept in registers: a buffer one member writes a thread per point and later
   * members read at the same points (the same thread: its point p or reduction step q is the
   * element's place in the row); those members loop over their points by register slot. */
  int n_cached;
  int cached_buf[CM_KCUDA_ROWS_MAX_CACHED];
  signed char cached_from[CM_KCUDA_ROWS_MAX_CACHED]; /* the member writing it */
  int64_t cached_points;                             /* points per row of every cached slice */
  bool unrolled[CM_KCUDA_ROWS_MAX_SPAN];             /* per member: loops by register slot */
} cm_kcuda_rows;

typedef struct cm_kcuda_plan {
  cm_kcuda_kind kind;
  int sm;                     /* the target it was planned for (cm_target.sm) */
  int first;                  /* CM_KCUDA_IN_SPAN: the span's first stage */
  unsigned grid[3], block[3]; /* launch configuration ({1,1,1} for CM_KCUDA_IN_SPAN) */
  int64_t shared_static;      /* bytes of static shared memory per block */
  unsigned shared_dynamic;    /* bytes of dynamic shared memory per block */
  int min_blocks;             /* __launch_bounds__'s blocks per SM */
  cm_kcuda_red red;           /* CM_KCUDA_GENERIC */
  cm_kcuda_gemm gemm;         /* CM_KCUDA_GEMM */
  cm_kcuda_attn attn;         /* CM_KCUDA_ATTN_* */
  cm_kcuda_rows rows;         /* CM_KCUDA_ROWS */
} cm_kcuda_plan;

/* A collective stage: what a collective group (CM_GROUP_COLLECTIVE) with ranks > 1 lowers to.
 * It has no loop nest (n_dom 0, no expressions, no stores: the renderers render an empty
 * function, the interpreter refuses it); the backends execute it through the program's
 * cm_comm (cm_compile_opts.comm) on buffer in_buf (count elements) into out_buf (count
 * elements for all_reduce, ranks * count for all_gather: rank r's at r * count). An
 * all_gather along an axis that is not the outermost non-unit one gathers into a SCRATCH
 * out_buf laid out [rank, input...], and the kernel's next stage (a generic one) permutes it
 * into the graph's output. */
typedef enum cm_kcoll_op {
  CM_KCOLL_NONE = 0, /* a computing stage */
  CM_KCOLL_ALL_REDUCE,
  CM_KCOLL_ALL_GATHER,
} cm_kcoll_op;
typedef struct cm_kcollective {
  cm_kcoll_op op;
  cm_reduce_mode mode; /* all_reduce: SUM or MEAN */
  int axis;            /* all_gather: the graph's axis (>= 0) */
  int ranks;           /* the world size the graph was built for (> 1) */
  int node;            /* the collective node */
  int in_buf, out_buf; /* kernel buffers read and written */
  int64_t count;       /* elements each rank contributes (the input's numel) */
} cm_kcollective;

typedef struct cm_kstage {
  char name[64];
  int n_dom;
  int64_t dom[CM_KMAX_VARS];
  int n_red;                 /* 0: no reduction (body and ACC unused) */
  int64_t red[CM_KMAX_VARS]; /* red[i] is the extent of var n_dom + i */
  cm_kreduce red_op;
  cm_dtype acc_dtype;
  int body; /* expression over all vars, reduced into ACC; -1 when n_red == 0 */
  int n_exprs, cap_exprs;
  cm_kexpr *exprs;
  int n_stores;
  cm_kstore stores[CM_KMAX_STORES];
  bool accumulate; /* stores add into the buffer (scatter_add); the buffer was zeroed by an
                      earlier stage; iterations may collide: the CPU runs such a stage on one
                      thread, CUDA uses atomics */
  int n_parallel;  /* leading domain vars split across threads (0: one work item) */
  cm_ktemplate tmpl;
  int gemm_a, gemm_b; /* CM_KT_GEMM operand expressions */
  cm_kgemm_tiles tiles;
  cm_kattn attn; /* CM_KT_ATTENTION_FWD / _BWD (first stage of the span) */
  /* CUDA targets: the renderer's plan (cm_cuda_plan_kernel) */
  cm_kcuda_plan cuda;
  cm_kcollective coll; /* op != CM_KCOLL_NONE: a collective stage (no loop nest) */
} cm_kstage;

typedef enum cm_kbuf_kind {
  CM_KBUF_ARENA,   /* a group input or output living in the arena (plan offset) */
  CM_KBUF_SOURCE,  /* a source node's own buffer (input, param, state; assigns write here) */
  CM_KBUF_CONST,   /* a const node with explicit data (data points into the graph's attrs,
                      as f64; the kernel reads it converted to dtype, see cm_kernel_const_data) */
  CM_KBUF_SCRATCH, /* a value internal to the group, materialized between stages */
  CM_KBUF_STATUS,  /* i64 words the executor reads after the kernel: the range check of a
                      gather or scatter_add index (node), offset 0: numel - the position of the
                      first index outside its axis (0: none); offset 1: [that index, its
                      position]. The lowering inserts the stages that write them. */
} cm_kbuf_kind;

typedef struct cm_kbuffer {
  cm_kbuf_kind kind;
  cm_dtype dtype;
  int64_t numel;
  int node;       /* the graph node whose value it holds (-1 only for SCRATCH without one) */
  int64_t offset; /* ARENA: byte offset in the arena; SCRATCH: byte offset in the scratch
                     area (64-byte aligned); else 0 */
  bool read, written;
} cm_kbuffer;

typedef struct cm_kernel {
  char name[64]; /* "k<group>_<kind>", a C and LLVM identifier */
  int group;     /* the plan group it implements, -1 for hand-built kernels */
  cm_group_kind kind;
  int n_buffers, cap_buffers;
  cm_kbuffer *buffers;
  int n_stages, cap_stages;
  cm_kstage *stages;
  int64_t scratch_bytes; /* scratch area the stages need (0 if none) */
} cm_kernel;

/* A whole plan lowered: one kernel per group, in the plan's order. */
typedef struct cm_kprogram {
  int n_kernels;
  cm_kernel *kernels;
  int64_t arena_bytes;       /* the plan's arena */
  int64_t max_scratch_bytes; /* the largest kernel scratch */
} cm_kprogram;

/* Builders for kernels (used by the lowering and by tests). Expression
 * builders return the new expression's id, folding constants and identities
 * (x+0, x*1, 0*i for ints); they never fail (they grow the arrays; out of
 * memory aborts the build: cm_kernel_verify reports it). */
void cm_kernel_init(cm_kernel *k, const char *name);
void cm_kernel_free(cm_kernel *k);
int cm_kernel_add_buffer(cm_kernel *k, cm_kbuf_kind kind, cm_dtype dt, int64_t numel, int node,
                         int64_t offset);
cm_kstage *cm_kernel_add_stage(cm_kernel *k, const char *name); /* pointer valid until the
                                                                    next add_stage */
int cm_kx_const(cm_kstage *s, cm_dtype dt, double v);
int cm_kx_var(cm_kstage *s, int var);
int cm_kx_acc(cm_kstage *s);
int cm_kx_load(cm_kstage *s, const cm_kernel *k, int buf, int index);
int cm_kx_op(cm_kstage *s, cm_op op, cm_dtype dt, int a, int b, int c);
int cm_kx_mod(cm_kstage *s, int a, int b);
/* i64 helpers: a + b, a * b, a / b (trunc), a % b, with folding */
int cm_kx_iadd(cm_kstage *s, int a, int b);
int cm_kx_imul(cm_kstage *s, int a, int b);
int cm_kx_idiv(cm_kstage *s, int a, int b);
int cm_kx_imod(cm_kstage *s, int a, int b);
int cm_kx_iconst(cm_kstage *s, int64_t v);
bool cm_kx_is_const(const cm_kstage *s, int e, double *value);
/* Bit mask of the variables an expression depends on (bit v for var v). */
uint32_t cm_kx_vars_used(const cm_kstage *s, int e);
/* Whether expression e is a GEMM body's factor for operand expression
 * `operand`: the operand itself or the operand widened to the stage's
 * accumulator dtype by a CAST (bf16/f16 products are taken in f32). */
bool cm_kx_is_gemm_factor(const cm_kstage *s, int e, int operand);
/* An i64 index expression as sum_v c[v] * v + c0 over the stage's vars (domain then
 * reduction), their ranges known from the extents. Div and mod by a positive constant fold
 * when the dividend is provably non-negative and the part of it that is not a multiple of
 * the divisor provably stays in [0, d). */
typedef struct cm_kaff {
  int64_t c[CM_KMAX_VARS];
  int64_t c0;
} cm_kaff;
/* e's affine form; false when it has none (or overflows, or *budget expressions were
 * visited: the budget bounds the work on deep expressions). */
bool cm_kaff_of(const cm_kstage *s, int e, cm_kaff *out, int *budget);
/* The least and greatest value of a over the stage's var ranges. */
void cm_kaff_range(const cm_kstage *s, const cm_kaff *a, int64_t *lo, int64_t *hi);

/* Rewrites a stage's expressions into an equal but simpler DAG: i64 index
 * arithmetic becomes affine where value ranges from the loop extents allow
 * ((a*c + b) mod c -> b and div -> a when 0 <= b < c, nested div/mod, mod/div
 * pairs recombined, min/max/compare decided by ranges, constants folded) and
 * unreachable expressions go. Stages of templates other than GEMM are left
 * alone. Errors only for malformed stages or out of memory. */
cm_status cm_kstage_simplify(cm_kstage *s, cm_err *err);

/* Where an asynchronous collective (stage `stage` of kernel `kernel` of kp) must have finished:
 * the first later kernel that reads its output or writes its input (a state it reads); n_kernels
 * when none does (the end of the run). */
int cm_kprogram_collective_wait(const cm_kprogram *kp, int kernel, int stage);
/* The name a collective stage goes by in the communicator's messages (its `what`):
 * "grad_bucket_3" (node 812, kernel k40_collective)". */
void cm_kcollective_name(const cm_kernel *k, int stage, const cm_graph *g, char *out, size_t size);
/* Checks a kernel: expression ids and operand order, dtypes of operands,
 * variables in range (reduction vars only in body / gemm operands, ACC only
 * in store values), store buffers writable, template invariants. Errors name
 * the kernel, stage and expression. */
cm_status cm_kernel_verify(const cm_kernel *k, cm_err *err);
/* The CPU workspace layout of a fused attention span starting at stage `first`
 * (register block mr x nr): each local buffer's byte offset (local_off[i],
 * 64-byte aligned; NULL: not wanted), then the GEMM packing area at
 * *pack_off (NULL: not wanted): packed A (round_up(br, mr) x K), packed B
 * (K x round_up(N, nr)) and the C tile, sized for the largest GEMM stage of
 * the span. Returns the total bytes (0 when the span is not well-formed). */
int64_t cm_kattn_workspace(const cm_kernel *k, int first, int mr, int nr, int64_t *local_off,
                           int64_t *pack_off);
/* The floats of packed A (*am) and packed B (*bm) the whole-row rendering of
 * the span at `first` needs with register blocks mr[i] x nr[i] per stage of
 * the span; returns the workspace bytes it then uses (pack_off + A, B and the
 * C tile). */
int64_t cm_kattn_pack_need(const cm_kernel *k, int first, const int *mr, const int *nr, int64_t *am,
                           int64_t *bm);
/* The CPU workspace of a streaming forward span (attn.stream) starting at
 * stage `first` (register block mr x nr), floats 64-byte aligned in this
 * order: packed Q (round_up(br, mr) x d), packed K or V block
 * (max(d x round_up(bc, nr), bc x round_up(dv, nr))), the S tile
 * (round_up(br, mr) x round_up(bc, nr)), packed E (round_up(br, mr) x bc), the
 * O accumulator (round_up(br, mr) x round_up(dv, nr)), then m, l and the
 * rescale factors (round_up(br, mr) each); off[0..7] receive the byte offsets
 * (NULL: not wanted). Returns the total bytes (0 when not streaming). */
int64_t cm_kattn_stream_workspace(const cm_kernel *k, int first, int mr, int nr, int64_t *off);
/* Checks a streaming span (attn.stream on stage `first`): the span invariants,
 * 1 <= bc < keys, and that the recorded roles and keep bits are the ones the
 * lowering's matcher finds (renderers stream only spans that pass). Errors
 * name the kernel, stage and rule. */
cm_status cm_kattn_stream_check(const cm_kernel *k, int first, cm_err *err);
/* The CPU workspace of a streaming backward span (register block mr x nr),
 * 64-byte aligned regions: fixed[0] the packed A of the first stage
 * (round_up(rows, mr) x d), fixed[1] a packed A block, fixed[2] a packed B
 * block, fixed[3] the C tile; per local buffer (local_off[i]) a tile of
 * round_up(rows, mr) x round_up(bc, nr) or a row statistic of round_up(rows, mr);
 * per stage of the span (stage_off[r], r = stage - first; 0 when none) the
 * accumulator of a row GEMM (round_up(rows, mr) x round_up(C, nr)), the
 * packed B of a key GEMM (rows x round_up(C, nr)) or the packed A of a later
 * GEMM tile (round_up(rows, mr) x its reduction). NULL: not wanted. Returns
 * the total bytes (0 when not a streaming backward span). */
int64_t cm_kattn_bwd_stream_workspace(const cm_kernel *k, int first, int mr, int nr,
                                      int64_t fixed[4], int64_t *local_off, int64_t *stage_off);
/* Fills the workspace layout of the attention span at `first` (cm_kattn's
 * whole_bytes, local_off, pack_off, stream_off, bwd_fixed, bwd_local_off,
 * stage_off) from the layout functions above with register block mr x nr: the
 * whole-row layout always, the streaming one of the span's template when
 * attn.stream. */
void cm_kattn_layout(cm_kernel *k, int first, int mr, int nr);
/* Checks the span invariants of the attention template on stage `first`
 * (cm_kernel_verify calls it; the lowering uses it to keep only spans that
 * hold). Errors name the kernel, stage and the rule broken. */
cm_status cm_kattn_check(const cm_kernel *k, int first, cm_err *err);
/* Bytes of scratch a renderer that fuses the attention spans needs: the
 * kernel's scratch without the local buffers of its spans (<= scratch_bytes). */
int64_t cm_kernel_fused_scratch_bytes(const cm_kernel *k);
/* Human-readable kernel IR (stable; used by `cmaec compile --emit kir` and tests). */
void cm_kernel_print(const cm_kernel *k, FILE *out);
/* A CM_KBUF_CONST buffer's contents converted to its dtype (malloc'ed; the
 * caller frees). */
void *cm_kernel_const_data(const cm_graph *g, const cm_kbuffer *b, cm_err *err);
/* The kernel IR's reference semantics: runs every stage serially. bufs[i] is
 * buffer i's base address (scratch buffers included: the caller points them
 * into a scratch area of k->scratch_bytes). */
cm_status cm_kernel_interpret(const cm_kernel *k, void *const *bufs, cm_err *err);
void cm_kprogram_free(cm_kprogram *p);

/* ---- lowering (codegen/lower.c) ------------------------------------------ */

typedef struct cm_lower_opts {
  const cm_target *target; /* NULL: cm_target_host() */
  bool no_templates;       /* generic loop nests only (for differential tests) */
  int attn_bc;             /* > 0: the key block of attention spans (tests of the streaming
                              template); 0: the lowering's choice */
} cm_lower_opts;

/* Lowers one group of a scheduled and memory-planned plan (memplan has run:
 * p->offset is set). Every node kind a group can hold is lowered; errors name
 * the group, node and op. */
cm_status cm_lower_group(const cm_graph *g, const cm_plan *p, int group, const cm_lower_opts *o,
                         cm_kernel *out, cm_err *err);
/* Lowers every group in p->order. */
cm_status cm_lower_plan(const cm_graph *g, const cm_plan *p, const cm_lower_opts *o,
                        cm_kprogram *out, cm_err *err);

/* ---- the LLVM renderer (codegen/render_llvm.c) -------------------------- */

/* One function per stage, named "<kernel>_s<stage index>", with the C type
 * cm_cpu_stage_fn: it runs work items [begin, end) of the stage. Work items:
 * generic stages, the product of the first n_parallel domain extents (1 when
 * n_parallel == 0); GEMM stages, batch x ceil(M/mc) x ceil(N/nc) blocks. ws is
 * a per-thread workspace of at least cm_kstage_workspace_bytes bytes, 64-byte
 * aligned (GEMM packing). bufs[i] is buffer i's base address. */
typedef void (*cm_cpu_stage_fn)(char *const *bufs, int64_t begin, int64_t end, char *ws);
int64_t cm_kstage_work_items(const cm_kstage *s);
int64_t cm_kstage_workspace_bytes(const cm_kstage *s, cm_target_kind t);

#if CMAEC_HAVE_LLVM
typedef struct cm_llvm_render_opts {
  int vector_width;        /* elements per vector on the innermost axis (f32), overriding
                              the target's vector_lanes (tests); 0: the target's */
  bool no_templates;       /* render GEMM stages as generic loop nests */
  const cm_target *target; /* NULL: cm_target_host() */
} cm_llvm_render_opts;

/* Attention spans (CM_KT_ATTENTION_*) render fused: the first stage's function
 * runs the whole span per batch item (workspace: attn.ws_bytes), the other
 * stages' functions return at once; a span that does not fit the renderer's
 * tiles renders generic. */
/* True when the LLVM renderer (templates on) renders stage s with the packed
 * GEMM: its work items are then GEMM blocks, else the generic ones. A
 * contraction accumulating in another dtype than f32 keeps CM_KT_GEMM (CUDA
 * renders it) but renders here as a loop nest. */
bool cm_llvm_stage_is_gemm(const cm_kstage *s);
/* Adds the kernel's stage functions to module m (in the module's context). */
cm_status cm_render_llvm(const cm_kernel *k, LLVMModuleRef m, const cm_llvm_render_opts *o,
                         cm_err *err);
#endif /* CMAEC_HAVE_LLVM */

/* ---- the CUDA renderer (codegen/render_cuda*.c) ------------------------- */

typedef struct cm_cuda_launch {
  unsigned grid[3], block[3];
  unsigned shared_bytes; /* dynamic shared memory */
} cm_cuda_launch;

typedef struct cm_cuda_render_opts {
  const cm_target *target; /* a CUDA target (cm_target_cuda); NULL: sm_80 */
  bool no_templates;       /* every stage a generic loop nest */
} cm_cuda_render_opts;

/* Plans every stage of a lowered kernel for CUDA target t (stage->cuda): the skeleton, tiles,
 * threads, grid and shared memory, within t's limits. Lowering calls it for CUDA targets; the
 * renderer plans kernels without plans (or planned for another target) itself, without storing
 * them. */
cm_status cm_cuda_plan_kernel(cm_kernel *k, const cm_target *t, cm_err *err);
/* After a tuner changed the tunable fields of stage `stage`'s tensor-core GEMM plan (warps_m,
 * warps_n, mr, nr, kc, split_k, stages, swizzle, a_async/b_async to false): checks them and
 * derives the rest (mc, nc, warps, threads, grid, block, dynamic shared memory, launch bounds).
 * Likewise an FMA GEMM plan from the stage's tiles (mc, nc, kc, mr, nr), a rows plan from its
 * warp and threads, and a generic plan from its red and threads (block[0]).
 * CM_EINVALID naming the kernel, stage and rule when they make no template for t. */
cm_status cm_cuda_plan_refit(cm_kernel *k, int stage, const cm_target *t, cm_err *err);
/* One line, e.g. "cuda sm_80 gemm mma bf16: block 64x64 k 32 warp 32x32 (4 warps), batch 1 M 130
 * N 260 K 300; grid 5x3x1 block 128x1x1 shared 10240+0" (shared: static+dynamic bytes). */
void cm_kcuda_plan_print(const cm_kcuda_plan *p, FILE *out);
/* The K split (cm_gemm_split_k: S partial GEMMs into scratch, then a sum stage with the
 * original stores) of a bf16/f16 GEMM stage for CUDA target t, when even the largest tensor-core
 * tiles leave SMs idle over a long K (weight gradients); 0: none (render_cuda_mma.c). */
int cm_cuda_gemm_k_split(const cm_kstage *s, const cm_target *t);

/* CUDA C for the kernel: one extern "C" __global__ function per stage named
 * "<kernel>_s<stage index>" taking one pointer per kernel buffer, in buffer
 * order (then nothing else). Appends to *source (malloc'ed/realloc'ed; *source
 * may be NULL); with a prelude (types, bf16/f16 rounding helpers) when
 * with_prelude. */
cm_status cm_render_cuda(const cm_kernel *k, const cm_cuda_render_opts *o, bool with_prelude,
                         char **source, cm_err *err);
/* The launch configuration of stage i of k. */
cm_cuda_launch cm_cuda_stage_launch(const cm_kernel *k, int stage, const cm_cuda_render_opts *o);

/* ---- tuning spaces (codegen/tune_space.c) --------------------------------
 *
 * The autotuner's view of a lowered kernel's plan: per stage, the knobs a renderer really
 * honours, each with its candidates (the cost model's default among them), applying a point
 * (pruning what makes no valid plan before anything is compiled), a structural hash that keys
 * the tuning database, and a deterministic cost model (the emulated CUDA device's "time"). */
#define CM_TUNE_SPACE_VERSION                                                                      \
  2 /* bump when a space or a knob's meaning changes: old records are ignored */
#define CM_TUNE_MAX_KNOBS 8
#define CM_TUNE_MAX_VALUES 16
typedef struct cm_tune_knob {
  char name[16]; /* "mr", "nr", "kc", "mc", "nc", "k_split", "threads_n", "bc", "br", "warps_m",
                    "stages", "split_k", "vec", ... */
  int n_values;
  int values[CM_TUNE_MAX_VALUES]; /* candidates, ascending, the default among them */
  int default_index;              /* the cost model's choice (the plan as lowered) */
} cm_tune_knob;
typedef struct cm_tune_space {
  int n_knobs; /* 0: nothing to tune in this stage */
  cm_tune_knob knobs[CM_TUNE_MAX_KNOBS];
  int64_t n_points; /* product of the n_values */
} cm_tune_space;
typedef struct cm_tune_point {
  int value[CM_TUNE_MAX_KNOBS]; /* a value per knob (values, not indices) */
} cm_tune_point;
/* The tunable fields of stage `stage` of a lowered kernel for target t (CPU: GEMM tiles
 * mr/nr/mc/nc/kc, K split, attention bc/br and register blocks; CUDA: block/warp tiles, stages,
 * split_k, flash attention's warps and key block, threads per row). The CPU's row and reduction
 * stages have none yet (their vector width and unroll are the renderer's constants). */
cm_status cm_tune_space_of(const cm_kernel *k, int stage, const cm_target *t, cm_tune_space *out,
                           cm_err *err);
void cm_tune_point_default(const cm_tune_space *s, cm_tune_point *out);
/* Point i of 0..n_points-1 in a fixed order, point 0 the default. */
void cm_tune_point_at(const cm_tune_space *s, int64_t i, cm_tune_point *out);
/* Sets the stage's tunable fields to p and re-derives what depends on them (tile clamps, attention
 * workspace layout, CUDA launch and shared memory via cm_cuda_plan_refit...). CM_EINVALID naming
 * kernel, stage, knob and rule when p makes no valid plan for t (too much shared memory or
 * registers, workspace over budget, a tile the template cannot take): that is the pruning before
 * compiling. */
cm_status cm_tune_apply(cm_kernel *k, int stage, const cm_target *t, const cm_tune_point *p,
                        cm_err *err);
/* "mr=6,nr=16,kc=256" (knobs in order); parse checks names and that each value is a candidate. */
int cm_tune_point_format(const cm_tune_space *s, const cm_tune_point *p, char *buf, size_t size);
cm_status cm_tune_point_parse(const cm_tune_space *s, const char *text, cm_tune_point *out,
                              cm_err *err);
/* 64 hex chars: the kernel's stages, expressions and buffers (kinds, dtypes, sizes, numbered by
 * first use) — names, the group number and arena offsets left out, so equal kernels of two layers
 * or two programs hash alike. */
void cm_kernel_structural_hash(const cm_kernel *k, char out[65]);
/* A deterministic cost (arbitrary units, larger = slower) of stage `stage` under its current plan
 * for target t: a roofline-style model (FLOPs / peak, bytes / bandwidth, padding waste, occupancy,
 * launches). The emulated CUDA device's "time", so the tuner's tests are exact. */
double cm_tune_model_cost(const cm_kernel *k, int stage, const cm_target *t);

#endif
