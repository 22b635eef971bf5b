/* tests/unit/test_nvrtc_variants.c — every kernel of every shipped variant's
 * training step compiles through NVRTC for sm_80 and sm_90, and no template
 * kernel (GEMM, attention) spills registers; the fused attention spans of the
 * CUDA renderer compute what the kernel IR says.
 *
 * Each variant's step is built at its full size at batch 2 (the kernel
 * structure does not depend on the batch), optimized, lowered for CUDA and
 * rendered kernel by kernel. Kernels whose CUDA text is the same up to the
 * kernel's name are compiled once (a transformer's blocks repeat, and the
 * variants share many kernels), PER_PROGRAM per NVRTC program, on two threads.
 *
 * The fused attention spans (forward and backward, at odd shapes) run on the
 * host: their CUDA C compiled by the emulated device's compiler (tests/emu, the
 * host's C++ compiler under the CUDA shim), each kernel's outputs within their
 * forward error bounds on its own inputs (cm_plan_eval_group_bounded).
 *
 * Skips (exit 77) only when NVRTC cannot be loaded. CMAEC_TEST_QUICK=1 (the
 * sanitizer build): the host part only. The argument names one test (ctest
 * runs the variants one entry each, with CMAEC_NVRTC_VARIANTS).
 * CMAEC_NVRTC_VARIANTS=a,b (substrings of the model paths to keep),
 * CMAEC_NVRTC_DUMP=DIR (write each compiled program there),
 * CMAEC_NVRTC_RENDER_ONLY=1 (count the unique kernels, compile nothing). */
#include "../test.h"
#include "../testlib.h"
#include "../model_step.h"
#include "../tensor_compare.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <ctype.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#define PER_PROGRAM 50
#define N_THREADS 2
#define BATCH 2
#define NAME_MARK "@K@" /* stands for the kernel's name in the deduplicated text */

static const char *const VARIANTS[] = {
    "models/cmae_vit_tiny_fmnist.json", "models/cmae_convvit_tiny_fmnist.json",
    "models/cmae_vit_small.json",       "models/cmae_vit_base.json",
    "models/mae_vit_base.json",         "models/cmae_convvit_base.json",
    "models/cmae_vit_large.json"};
#define N_VARIANTS ((int)(sizeof VARIANTS / sizeof VARIANTS[0]))
static const char *const ARCHS[] = {"sm_80", "sm_90"};
#define N_ARCHS 2

/* One distinct stage function for one arch, and what ptxas said of it. The
 * unit of deduplication is a stage's function with its name replaced by
 * NAME_MARK and only the buffer parameters it uses, renumbered in order (the
 * unused ones change neither the code nor the registers; the optimizer's
 * kernels have hundreds of buffers and stages, each summing a few). */
typedef struct ukernel {
  char *text;
  uint64_t hash;
  bool templated;           /* a GEMM or attention stage */
  cm_cuda_kernel_info info; /* after the compile (registers -1: not found) */
  int variant;              /* where it was first seen */
  char origin[96];          /* kernel and stage */
} ukernel;

typedef struct arch_set {
  int n, cap;
  ukernel *u;
  int *table; /* open addressing on hash: index + 1, 0 empty */
  int table_cap;
} arch_set;

static arch_set sets[N_ARCHS];

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t fnv1a(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

/* s with every occurrence of from replaced by to (malloc'ed). */
static char *replace_all(const char *s, const char *from, const char *to) {
  size_t lf = strlen(from), lt = strlen(to), n = 0;
  for (const char *p = strstr(s, from); p; p = strstr(p + lf, from)) n++;
  char *out = malloc(strlen(s) + n * (lt > lf ? lt - lf : 0) + 1), *w = out;
  if (!out) return NULL;
  for (const char *p = s;;) {
    const char *q = strstr(p, from);
    size_t len = q ? (size_t)(q - p) : strlen(p);
    memcpy(w, p, len);
    w += len;
    if (!q) break;
    memcpy(w, to, lt);
    w += lt;
    p = q + lf;
  }
  *w = 0;
  return out;
}

static void table_grow(arch_set *a) {
  int cap = a->table_cap ? a->table_cap * 2 : 1024;
  int *t = calloc((size_t)cap, sizeof *t);
  if (!t) abort();
  for (int i = 0; i < a->n; i++) {
    size_t h = (size_t)(a->u[i].hash % (uint64_t)cap);
    while (t[h]) h = (h + 1) % (size_t)cap;
    t[h] = i + 1;
  }
  free(a->table);
  a->table = t;
  a->table_cap = cap;
}

/* The unit id of text in a (added if new; takes ownership of text). */
static int intern(arch_set *a, char *text, bool templated, const char *origin, int variant,
                  bool *is_new) {
  uint64_t h = fnv1a(text);
  if (2 * (a->n + 1) > a->table_cap) table_grow(a);
  size_t slot = (size_t)(h % (uint64_t)a->table_cap);
  for (; a->table[slot]; slot = (slot + 1) % (size_t)a->table_cap) {
    ukernel *u = &a->u[a->table[slot] - 1];
    if (u->hash == h && strcmp(u->text, text) == 0) {
      free(text);
      *is_new = false;
      u->templated |= templated;
      return a->table[slot] - 1;
    }
  }
  if (a->n == a->cap) {
    a->cap = a->cap ? a->cap * 2 : 256;
    a->u = realloc(a->u, (size_t)a->cap * sizeof *a->u);
    if (!a->u) abort();
  }
  ukernel *u = &a->u[a->n];
  memset(u, 0, sizeof *u);
  u->text = text;
  u->hash = h;
  u->templated = templated;
  u->info.registers = -1;
  u->variant = variant;
  snprintf(u->origin, sizeof u->origin, "%s", origin);
  a->table[slot] = a->n + 1;
  *is_new = true;
  return a->n++;
}

/* Whether buffer parameter b<j> is used in body ("b<j>[" not inside a longer name). */
static bool param_used(const char *body, int j) {
  char pat[32];
  int len = snprintf(pat, sizeof pat, "b%d[", j);
  for (const char *p = strstr(body, pat); p; p = strstr(p + len, pat))
    if (p == body || !(isalnum((unsigned char)p[-1]) || p[-1] == '_')) return true;
  return false;
}

/* The normalized text of the stage function at fn (up to fn_end): name ->
 * NAME_MARK, unused buffer parameters dropped, the rest renamed q0, q1, ...
 * *n_params: the parameters it had. NULL when it is not of the renderer's form. */
static char *normalize_stage(const char *fn, size_t fn_len, const char *fname, int *n_params) {
  char *f = malloc(fn_len + 1);
  if (!f) return NULL;
  memcpy(f, fn, fn_len);
  f[fn_len] = 0;
  char *open = strstr(f, fname), *close = open ? strstr(open, ") {\n") : NULL;
  if (!open || !close) return free(f), NULL;
  const char *body = close + 4;
  size_t cap = fn_len * 2 + 64, len = 0;
  char *out = malloc(cap);
  if (!out) return free(f), NULL;
  len += (size_t)snprintf(out, cap, "%.*s%s(", (int)(open - f), f, NAME_MARK);
  /* parameters: "[const ]T *b<j>" separated by ", " */
  char *params = open + strlen(fname) + 1;
  *close = 0;
  int kept = 0;
  *n_params = 0;
  for (char *tok = params; tok && *tok;) {
    char *sep = strstr(tok, ", ");
    if (sep) *sep = 0;
    char *star = strrchr(tok, '*');
    int j = star && star[1] == 'b' ? atoi(star + 2) : -1;
    (*n_params)++;
    if (j >= 0 && param_used(body, j)) {
      len += (size_t)snprintf(out + len, cap - len, "%s%.*sq%d", kept ? ", " : "",
                              (int)(star + 1 - tok), tok, kept);
      kept++;
    }
    tok = sep ? sep + 2 : NULL;
  }
  len += (size_t)snprintf(out + len, cap - len, ") {\n");
  /* the body with the kept buffers renamed (renumbered in parameter order) */
  char *renamed = strdup(body);
  kept = 0;
  for (int j = 0; j < *n_params && renamed; j++) {
    if (!param_used(body, j)) continue;
    char from[32], to[32];
    snprintf(from, sizeof from, "b%d[", j);
    snprintf(to, sizeof to, "q%d@[", kept++); /* '@' keeps q<n> apart from a later b<n> */
    char *r = replace_all(renamed, from, to);
    free(renamed);
    renamed = r;
  }
  char *clean = renamed ? replace_all(renamed, "@[", "[") : NULL;
  free(renamed);
  if (!clean || len + strlen(clean) + 1 > cap) {
    free(clean), free(out), free(f);
    return NULL;
  }
  memcpy(out + len, clean, strlen(clean) + 1);
  free(clean);
  free(f);
  return out;
}

/* ---- compiling the unique stages, many per program, on two threads ------ */

static cm_nvrtc *nvrtc;
static const char *prelude; /* the renderer's prelude alone */

typedef struct job {
  int arch, first, count;
  double ms;
  bool ok;
  char error[600];
} job;

static job *jobs;
static int n_jobs, next_job;
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;

/* The program holding units [first, first + count) of arch a; unit u is named "u<u>". */
static char *program_text(int a, int first, int count) {
  size_t cap = strlen(prelude) + 1, len = 0;
  for (int i = first; i < first + count; i++) cap += strlen(sets[a].u[i].text) + 256;
  char *p = malloc(cap);
  if (!p) return NULL;
  len += (size_t)snprintf(p, cap, "%s", prelude);
  for (int i = first; i < first + count; i++) {
    char name[32];
    snprintf(name, sizeof name, "u%d", i);
    char *t = replace_all(sets[a].u[i].text, NAME_MARK, name);
    if (!t) {
      free(p);
      return NULL;
    }
    len += (size_t)snprintf(p + len, cap - len, "// %s %s\n%s\n", VARIANTS[sets[a].u[i].variant],
                            sets[a].u[i].origin, t);
    free(t);
  }
  return p;
}

static bool compile_range(int a, int first, int count, double *ms, char *error, size_t esize) {
  char *src = program_text(a, first, count);
  if (!src) {
    snprintf(error, esize, "out of memory");
    return false;
  }
  char fname[64];
  snprintf(fname, sizeof fname, "variants_%s_%d.cu", ARCHS[a], first);
  const char *dump = getenv("CMAEC_NVRTC_DUMP");
  if (dump && dump[0]) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dump, fname);
    FILE *f = fopen(path, "w");
    if (f) fputs(src, f), fclose(f);
  }
  if (getenv("CMAEC_NVRTC_RENDER_ONLY")) {
    free(src);
    *ms = 0;
    return true;
  }
  cm_cubin cb;
  cm_err err = {0};
  cm_status st = cm_nvrtc_compile(nvrtc, src, fname, ARCHS[a], NULL, 0, &cb, &err);
  free(src);
  *ms = cb.compile_ms;
  if (st != CM_OK) {
    snprintf(error, esize, "%s", err.msg);
    cm_cubin_free(&cb);
    return false;
  }
  for (int i = first; i < first + count; i++) {
    char fn[32];
    snprintf(fn, sizeof fn, "u%d", i);
    const cm_cuda_kernel_info *ki = cm_cubin_kernel(&cb, fn);
    if (ki) sets[a].u[i].info = *ki;
  }
  cm_cubin_free(&cb);
  return true;
}

static void *worker(void *arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&job_lock);
    int j = next_job < n_jobs ? next_job++ : -1;
    pthread_mutex_unlock(&job_lock);
    if (j < 0) return NULL;
    job *b = &jobs[j];
    b->ok = compile_range(b->arch, b->first, b->count, &b->ms, b->error, sizeof b->error);
  }
}

/* ---- building and rendering a variant ----------------------------------- */

typedef struct variant_stats {
  int kernels, stages, unique[N_ARCHS], fresh[N_ARCHS], max_params;
  double build_s, render_s;
  int *ids[N_ARCHS]; /* per stage (all kernels in order): its unit id */
} variant_stats;

static variant_stats vstats[N_VARIANTS];

static bool wanted(const char *path) {
  const char *f = getenv("CMAEC_NVRTC_VARIANTS");
  if (!f || !f[0]) return true;
  char buf[512];
  snprintf(buf, sizeof buf, "%s", f);
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ","))
    if (strstr(path, tok)) return true;
  return false;
}

static void collect_variant(int v) {
  const char *path = VARIANTS[v];
  variant_stats *vs = &vstats[v];
  double t0 = now_s();
  cm_err err = {0};
  cm_graph *step = test_build_step(path, NULL, 0, BATCH, NULL, NULL, NULL);
  if (!step) return;
  cm_pass_state ps = {step, NULL};
  cm_status st = cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
  CHECK_MSG(st == CM_OK && ps.plan, "%s: %s", path, err.msg);
  /* the plan once; each arch's program lowers and renders it (cm_compile, rendered only) */
  cm_program *pr[N_ARCHS] = {NULL};
  for (int a = 0; a < N_ARCHS && st == CM_OK && ps.plan; a++) {
    cm_target cuda_target;
    cm_compile_opts co = {.compile_only = true, .render_only = true, .plan = ps.plan};
    st = cm_target_cuda(ARCHS[a], &cuda_target, &err);
    if (st == CM_OK) st = cm_compile(ps.g, &cuda_target, &co, &pr[a], &err);
    CHECK_MSG(st == CM_OK, "%s: compile for %s: %s", path, ARCHS[a], err.msg);
  }
  const cm_kprogram *prog = pr[0] ? cm_program_kernels(pr[0]) : &(cm_kprogram){0};
  vs->build_s = now_s() - t0;
  t0 = now_s();
  vs->kernels = prog->n_kernels;
  for (int i = 0; i < prog->n_kernels; i++) vs->stages += prog->kernels[i].n_stages;
  for (int a = 0; a < N_ARCHS && st == CM_OK; a++) {
    vs->ids[a] = calloc((size_t)vs->stages + 1, sizeof *vs->ids[a]);
    int at = 0;
    for (int i = 0; i < prog->n_kernels && st == CM_OK; i++) {
      const cm_kernel *k = &prog->kernels[i];
      char *src = NULL;
      size_t src_size = 0;
      FILE *mem = open_memstream(&src, &src_size);
      st = mem ? cm_program_emit(pr[a], i, CM_EMIT_SOURCE, mem, &err) : CM_EINTERNAL;
      if (mem) fclose(mem);
      CHECK_MSG(st == CM_OK, "%s %s: render for %s: %s", path, k->name, ARCHS[a], err.msg);
      if (st != CM_OK) {
        free(src);
        break;
      }
      /* one unit per stage function, in stage order */
      const char *fn = strstr(src, "extern \"C\" __global__ void ");
      for (int s = 0; s < k->n_stages; s++) {
        const char *next = fn ? strstr(fn + 1, "extern \"C\" __global__ void ") : NULL;
        size_t len = fn ? (next ? (size_t)(next - fn) : strlen(fn)) : 0;
        char fname[96], origin[96];
        snprintf(fname, sizeof fname, "%s_s%d", k->name, s);
        snprintf(origin, sizeof origin, "%s stage %d", k->name, s);
        int n_params = 0;
        char *norm = fn ? normalize_stage(fn, len, fname, &n_params) : NULL;
        CHECK_MSG(norm != NULL, "%s %s: stage %d not found in the rendered text", path, k->name, s);
        if (!norm) break;
        if (n_params > vs->max_params) vs->max_params = n_params;
        bool is_new;
        int id = intern(&sets[a], norm, k->stages[s].tmpl != CM_KT_NONE, origin, v, &is_new);
        vs->ids[a][at++] = id;
        vs->fresh[a] += is_new;
        fn = next;
      }
      free(src);
    }
    bool *seen = calloc((size_t)sets[a].n + 1, 1);
    for (int i = 0; i < at; i++)
      if (!seen[vs->ids[a][i]]) seen[vs->ids[a][i]] = true, vs->unique[a]++;
    free(seen);
  }
  vs->render_s = now_s() - t0;
  /* CUDA 12.1+ passes up to 32764 bytes of kernel parameters (sm_70 and later) */
  CHECK_MSG(vs->max_params * 8 <= 32764, "%s: a stage takes %d pointers", path, vs->max_params);
  for (int a = 0; a < N_ARCHS; a++) cm_program_free(pr[a]);
  cm_plan_free(ps.plan);
  cm_graph_free(ps.g);
}

static void test_every_variant_through_nvrtc(void) {
  double t_all = now_s();
  for (int v = 0; v < N_VARIANTS; v++)
    if (wanted(VARIANTS[v])) collect_variant(v);
  char *pre = NULL;
  cm_kernel empty;
  cm_kernel_init(&empty, "none");
  cm_err err = {0};
  CHECK(cm_render_cuda(&empty, NULL, true, &pre, &err) == CM_OK);
  cm_kernel_free(&empty);
  prelude = pre ? pre : "";
  /* jobs: arch-major, PER_PROGRAM units each */
  int total = 0;
  for (int a = 0; a < N_ARCHS; a++) total += (sets[a].n + PER_PROGRAM - 1) / PER_PROGRAM;
  jobs = calloc((size_t)total + 1, sizeof *jobs);
  const char *only_arch = getenv("CMAEC_NVRTC_ARCH"); /* debugging: one arch */
  for (int a = 0; a < N_ARCHS; a++)
    for (int f = 0; f < sets[a].n && (!only_arch || !strcmp(only_arch, ARCHS[a])); f += PER_PROGRAM)
      jobs[n_jobs++] =
          (job){a, f, sets[a].n - f < PER_PROGRAM ? sets[a].n - f : PER_PROGRAM, 0, false, ""};
  double t_compile = now_s();
  pthread_t th[N_THREADS];
  /* NVRTC's front end recurses deeply on long kernels: more than the default 8 MiB */
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, (size_t)256 << 20);
  for (int t = 0; t < N_THREADS; t++) CHECK(pthread_create(&th[t], &attr, worker, NULL) == 0);
  pthread_attr_destroy(&attr);
  for (int t = 0; t < N_THREADS; t++) pthread_join(th[t], NULL);
  t_compile = now_s() - t_compile;
  double arch_ms[N_ARCHS] = {0};
  for (int j = 0; j < n_jobs; j++) {
    arch_ms[jobs[j].arch] += jobs[j].ms;
    CHECK_MSG(jobs[j].ok, "%s", jobs[j].error);
    if (jobs[j].ok) continue;
    /* name the units that fail on their own */
    for (int i = jobs[j].first; i < jobs[j].first + jobs[j].count; i++) {
      double ms;
      char e[600];
      const ukernel *u = &sets[jobs[j].arch].u[i];
      if (!compile_range(jobs[j].arch, i, 1, &ms, e, sizeof e))
        fprintf(stderr, "  fails alone: %s %s (unit u%d): %s\n", VARIANTS[u->variant], u->origin, i,
                e);
    }
  }
  /* every stage found; no template stage spills */
  int max_regs[N_ARCHS] = {0}, spilling[N_ARCHS] = {0};
  bool render_only = getenv("CMAEC_NVRTC_RENDER_ONLY") != NULL;
  for (int a = 0; a < N_ARCHS; a++) {
    if (render_only || (only_arch && strcmp(only_arch, ARCHS[a]))) continue;
    for (int i = 0; i < sets[a].n; i++) {
      const ukernel *u = &sets[a].u[i];
      const cm_cuda_kernel_info *ki = &u->info;
      int spill = ki->spill_store_bytes + ki->spill_load_bytes;
      if (ki->registers > max_regs[a]) max_regs[a] = ki->registers;
      spilling[a] += spill > 0;
      CHECK_MSG(ki->registers >= 0, "%s: no ptxas report for %s (%s)", VARIANTS[u->variant],
                u->origin, ARCHS[a]);
      CHECK_MSG(!u->templated || spill == 0,
                "%s: %s (template) spills %d bytes for %s (%d registers)", VARIANTS[u->variant],
                u->origin, spill, ARCHS[a], ki->registers);
      if (spill > 0 && !u->templated)
        fprintf(stderr, "  note: %s %s (generic) spills %d bytes for %s\n", VARIANTS[u->variant],
                u->origin, spill, ARCHS[a]);
    }
  }
  /* per variant: kernels, unique stage functions, max registers, spills */
  for (int v = 0; v < N_VARIANTS; v++) {
    variant_stats *vs = &vstats[v];
    if (!vs->ids[0]) continue;
    for (int a = 0; a < N_ARCHS; a++) {
      int mr = 0, sp = 0, tmpl = 0;
      bool *seen = calloc((size_t)sets[a].n + 1, 1);
      for (int i = 0; i < vs->stages; i++) {
        int id = vs->ids[a][i];
        if (seen[id]) continue;
        seen[id] = true;
        const ukernel *u = &sets[a].u[id];
        if (u->info.registers > mr) mr = u->info.registers;
        sp += u->info.spill_store_bytes + u->info.spill_load_bytes > 0;
        tmpl += u->templated;
      }
      free(seen);
      fprintf(stderr,
              "  %-38s %s: %4d kernels, %4d stages -> %4d unique (%4d new, %3d templates), "
              "max %3d registers, %d spill; <= %d params; built %.1f s, rendered %.1f s\n",
              VARIANTS[v], ARCHS[a], vs->kernels, vs->stages, vs->unique[a], vs->fresh[a], tmpl, mr,
              sp, vs->max_params, vs->build_s, vs->render_s);
      CHECK(vs->unique[a] > 0 && vs->unique[a] <= vs->stages);
    }
    free(vs->ids[0]);
    free(vs->ids[1]);
  }
  for (int a = 0; a < N_ARCHS; a++) {
    fprintf(stderr,
            "  %s: %d unique stage functions in %d programs, NVRTC %.1f s (summed over "
            "programs), max %d registers, %d spill\n",
            ARCHS[a], sets[a].n, (sets[a].n + PER_PROGRAM - 1) / PER_PROGRAM, arch_ms[a] / 1e3,
            max_regs[a], spilling[a]);
    CHECK(sets[a].n > 0);
  }
  fprintf(stderr, "  compiled on %d threads in %.1f s; %.1f s in all\n", N_THREADS, t_compile,
          now_s() - t_all);
  for (int a = 0; a < N_ARCHS; a++) {
    for (int i = 0; i < sets[a].n; i++) free(sets[a].u[i].text);
    free(sets[a].u);
    free(sets[a].table);
  }
  free(jobs);
  free(pre);
}

/* ---- the fused attention rendering, run on the host ----------------------
 *
 * No GPU here: the CUDA C of every kernel of a program is compiled, as one
 * module, by the emulated CUDA device's compiler (tests/emu: the host C++
 * compiler under tests/emu/cuda_shim.hpp, a block's threads as fibers, warp
 * shuffles and the prelude's mma helper emulated) and run block after block;
 * every output of the kernel's group must lie within its error bound, the
 * oracle run on the same inputs (emu_check_program). */

typedef struct emu_prog {
  void *handle;
  emu_module_launch_fn launch;
} emu_prog;

/* Compiles every kernel of p (one function per stage) with emu_compiler() and
 * loads the module; false on failure (a CHECK says which). */
static bool emu_build(const cm_kprogram *p, emu_prog *e) {
  memset(e, 0, sizeof *e);
  cm_cuda_render_opts ro = {NULL, false}; /* sm_80 */
  char *src = NULL;
  cm_err err = {0};
  for (int i = 0; i < p->n_kernels; i++)
    CHECK_MSG(cm_render_cuda(&p->kernels[i], &ro, i == 0, &src, &err) == CM_OK, "%s: %s",
              p->kernels[i].name, err.msg);
  if (!src) return false;
  const cm_cuda_compiler *c = emu_compiler();
  cm_cubin img;
  cm_status st = c->compile(c->self, src, "attention_on_host", "sm_80", &img, &err);
  free(src);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  char path[] = "/tmp/cmaec_emu_XXXXXX";
  int fd = st == CM_OK ? mkstemp(path) : -1;
  size_t so_bytes = img.size - sizeof(emu_image_header);
  bool wrote = fd >= 0 && write(fd, (char *)img.data + sizeof(emu_image_header), so_bytes) ==
                              (ssize_t)so_bytes;
  if (fd >= 0) close(fd);
  cm_cubin_free(&img);
  e->handle = wrote ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  CHECK_MSG(e->handle != NULL, "%s: %s", path, wrote ? dlerror() : "not written");
  if (fd >= 0) unlink(path);
  void *sym = e->handle ? dlsym(e->handle, EMU_MODULE_LAUNCH_SYMBOL) : NULL;
  memcpy(&e->launch, &sym, sizeof sym);
  return sym != NULL;
}

/* Runs kernel k's stages in order, as the CUDA launches would. */
static bool emu_run_kernel(const emu_prog *e, const cm_kernel *k, void **bufs) {
  cm_cuda_render_opts ro = {NULL, false}; /* sm_80 */
  void **args = calloc((size_t)k->n_buffers + 1, sizeof *args);
  if (!args) return false;
  for (int b = 0; b < k->n_buffers; b++) args[b] = &bufs[b];
  bool ok = true;
  for (int st = 0; st < k->n_stages && ok; st++) {
    cm_cuda_launch l = cm_cuda_stage_launch(k, st, &ro);
    char fn[96];
    snprintf(fn, sizeof fn, "%s_s%d", k->name, st);
    int rc = e->launch(fn, l.grid, l.block, l.shared_bytes, args);
    CHECK_MSG(rc == 0, "%s: launch %ux%ux%u x %ux%ux%u: CUresult %d", fn, l.grid[0], l.grid[1],
              l.grid[2], l.block[0], l.block[1], l.block[2], rc);
    ok = rc == 0;
  }
  free(args);
  return ok;
}

static void emu_void_free(void **b, int n) {
  for (int i = 0; i < n; i++) free(b[i]);
  free(b);
}

static void emu_free(emu_prog *e) {
  if (e->handle) dlclose(e->handle);
  memset(e, 0, sizeof *e);
}

static test_rng emu_rng = {0x9e3779b97f4a7c15ull};
static double emu_uniform(void) {
  return test_uniform(&emu_rng);
}

/* Every runnable kernel of p (lowered from plan pl of g) on the host, each
 * against the oracle on its own inputs: the group's inputs random (f32 and bf16 in
 * [-1, 1), other dtypes 0), its other buffers random garbage, consts their
 * data; every output it writes must lie within its forward error bound
 * (cm_plan_eval_group_bounded): any summation order, FMA or not. */
static int emu_bwd_stream_runs; /* streaming backward spans run (render_stream_bwd) */
static int emu_bwd_flash_runs;  /* flash backward spans run (cu_render_flash_bwd) */

static void emu_check_program(const cm_graph *g, const cm_plan *pl, const cm_kprogram *p,
                              int *kernels, int *spans, int *compared) {
  emu_prog e;
  if (!emu_build(p, &e)) {
    emu_free(&e);
    return;
  }
  int n = g->n_nodes;
  cm_tensor *in = calloc((size_t)n, sizeof *in), *vals = calloc((size_t)n, sizeof *vals);
  cm_tensor *got = calloc((size_t)n, sizeof *got);
  const cm_tensor **src = calloc((size_t)n, sizeof *src);
  for (int ki = 0; ki < p->n_kernels; ki++) {
    const cm_kernel *k = &p->kernels[ki];
    const cm_group *gr = &pl->groups[k->group];
    cm_cuda_render_opts ro = {NULL, false}; /* sm_80 */
    bool fused =
        k->n_stages > 1 &&
        (k->stages[0].tmpl == CM_KT_ATTENTION_FWD || k->stages[0].tmpl == CM_KT_ATTENTION_BWD) &&
        cm_cuda_stage_launch(k, 0, &ro).block[0] == 256;
    for (int j = 0; j < gr->n_inputs; j++) {
      int v = gr->inputs[j];
      const cm_node *u = &g->nodes[v];
      CHECK(cm_tensor_alloc(&in[v], u->type, NULL) == CM_OK);
      /* bf16 too: autocast's GEMM operands (zeros would hide any error of the products) */
      if (u->type.dtype == CM_F32 || u->type.dtype == CM_BF16)
        for (int64_t x = 0; x < cm_type_numel(&u->type); x++)
          cm_tensor_set_f64(&in[v], x, emu_uniform() * 2 - 1);
      bool fed = u->op == CM_OP_INPUT || u->op == CM_OP_PARAM || u->op == CM_OP_STATE;
      if (fed)
        src[v] = &in[v];
      else
        vals[v] = in[v];
    }
    void **emu = calloc((size_t)k->n_buffers + 1, sizeof *emu);
    cm_err err = {0};
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      size_t bytes = (size_t)kb->numel * cm_dtype_size(kb->dtype);
      if (kb->kind == CM_KBUF_CONST) {
        emu[b] = cm_kernel_const_data(g, kb, &err);
        CHECK_MSG(emu[b] != NULL, "%s b%d: %s", k->name, b, err.msg);
        continue;
      }
      emu[b] = malloc(bytes + 8);
      if (kb->dtype == CM_F32)
        for (int64_t x = 0; x < kb->numel; x++)
          ((float *)emu[b])[x] = (float)(emu_uniform() * 2 - 1);
      else
        memset(emu[b], 0, bytes);
      if (kb->kind != CM_KBUF_SCRATCH && kb->node >= 0 && in[kb->node].data) {
        CHECK_MSG(bytes == cm_type_nbytes(&in[kb->node].type), "%s b%d: %zu bytes for %s", k->name,
                  b, bytes, g->nodes[kb->node].name);
        if (bytes == cm_type_nbytes(&in[kb->node].type)) memcpy(emu[b], in[kb->node].data, bytes);
      }
    }
    CHECK_MSG(emu_run_kernel(&e, k, emu), "%s: the host run failed", k->name);
    (*kernels)++;
    *spans += fused;
    emu_bwd_stream_runs +=
        fused && k->stages[0].tmpl == CM_KT_ATTENTION_BWD && k->stages[0].attn.stream;
    emu_bwd_flash_runs += k->n_stages > 0 && k->stages[0].cuda.kind == CM_KCUDA_ATTN_FLASH_BWD;
    /* each output: the buffer of its node (an assign: of its state) */
    bool all = true;
    for (int j = 0; j < gr->n_outputs; j++) {
      int v = gr->outputs[j], w = g->nodes[v].op == CM_OP_ASSIGN ? g->nodes[v].inputs[0] : v;
      int b = -1;
      for (int c = 0; c < k->n_buffers && b < 0; c++)
        if (k->buffers[c].node == w && k->buffers[c].kind != CM_KBUF_SCRATCH &&
            k->buffers[c].kind != CM_KBUF_CONST)
          b = c;
      CHECK_MSG(b >= 0, "%s: output %s has no buffer", k->name, g->nodes[v].name);
      if (b < 0) all = false;
      got[v] = test_view(g->nodes[v].type, b >= 0 ? emu[b] : NULL);
    }
    int at = -1;
    test_bounded r = all ? test_check_group(g, pl, k->group, src, vals, got, k->name, &at, &err)
                         : (test_bounded){INFINITY, 0, 0, 0, 0, -1};
    CHECK_MSG(r.ratio <= 1,
              "%s, output %s: |CUDA (host) - f64| = %g at [%lld] exceeds its error bound %g %s",
              k->name, at >= 0 ? g->nodes[at].name : "?", r.diff, (long long)r.at, r.bound,
              err.msg);
    *compared += gr->n_outputs;
    for (int j = 0; j < gr->n_inputs; j++) {
      int v = gr->inputs[j];
      cm_tensor_free(&in[v]);
      memset(&vals[v], 0, sizeof vals[v]);
      src[v] = NULL;
    }
    emu_void_free(emu, k->n_buffers);
  }
  free(in), free(vals), free(got), free(src);
  emu_free(&e);
}

/* Attention (forward and backward) at odd shapes: every kernel (fused
 * attention spans, GEMMs, warp-shuffle reductions, thread-per-point stages) on
 * the host against the bounded oracle. */
static void test_cuda_kernels_on_host(void) {
  static const int64_t shapes[][4] = {{2, 13, 24, 3}, {2, 70, 16, 2}, {3, 5, 8, 2}};
  int kernels = 0, spans = 0, compared = 0;
  for (int si = 0; si < 3; si++) {
    cm_graph *g = cm_graph_new();
    int64_t xd[3] = {shapes[si][0], shapes[si][1], shapes[si][2]};
    int x = cm_input(g, "x", CM_F32, 3, xd);
    int y = cm_nn_attention(g, x, (int)shapes[si][3], true, "attn");
    int sq = cm_binary(g, CM_OP_MUL, y, y, "sq");
    int axes[3] = {0, 1, 2};
    int loss = cm_reduce(g, CM_OP_REDUCE_SUM, sq, 3, axes, false, "loss");
    cm_err err = {0};
    int grad = -1;
    CHECK_MSG(!g->error.status && cm_autodiff(g, loss, 1, &x, &grad, &err) == CM_OK, "%s %s",
              g->error.msg, err.msg);
    CHECK(cm_graph_add_output(g, y, &err) == CM_OK && cm_graph_add_output(g, grad, &err) == CM_OK);
    cm_target cuda_target;
    cm_target_cuda("sm_80", &cuda_target, NULL);
    cm_compile_opts co = {.compile_only = true, .render_only = true};
    cm_program *cp = NULL;
    CHECK_MSG(cm_compile(g, &cuda_target, &co, &cp, &err) == CM_OK, "%s", err.msg);
    if (cp)
      emu_check_program(cm_program_graph(cp), cm_program_plan(cp), cm_program_kernels(cp), &kernels,
                        &spans, &compared);
    cm_program_free(cp);
    cm_graph_free(g);
  }
  fprintf(stderr, "  %d kernels (%d fused attention spans) run on the host, %d outputs compared\n",
          kernels, spans, compared);
  test_tally_report("  attention on the host");
  CHECK(spans >= 6 && kernels >= 12);
}

/* Streaming attention (cm_kattn.stream, forced key blocks of 1, 7 and 16 that
 * do not divide N): the forward graph alone (only O leaves the group) and
 * with P kept as an output, and with the backward (both spans stream), on
 * the host under the shim against the
 * bounded oracle; the streaming functions also compile through NVRTC for sm_80
 * and sm_90 without spills. */
static void test_streaming_attention(void) {
  static const int64_t shapes[][5] = {
      /* n, heads, tokens, dim, bc */
      {2, 3, 13, 5, 7},  {1, 2, 37, 16, 16}, {2, 1, 5, 3, 1},    {1, 1, 70, 8, 16},
      {1, 4, 65, 64, 7}, {1, 3, 2, 1, 1},    {1, 1, 197, 4, 64}, {2, 3, 13, 64, 1},
  };
  enum { NSHAPES = sizeof shapes / sizeof shapes[0] };
  int kernels = 0, spans = 0, compared = 0, streams = 0, compiled = 0, bwd_streams = 0;
  for (int si = 0; si < NSHAPES; si++) {
    for (int keep_p = 0; keep_p < 3; keep_p++) {
      cm_graph *g = cm_graph_new();
      int64_t d[4] = {shapes[si][0], shapes[si][1], shapes[si][2], shapes[si][3]};
      int q = cm_input(g, "q", CM_F32, 4, d), k = cm_input(g, "k", CM_F32, 4, d);
      int v = cm_input(g, "v", CM_F32, 4, d);
      int sc = cm_matmul(g, q, k, false, true, "scores");
      sc = cm_binary_bcast(g, CM_OP_MUL, sc,
                           cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)d[3])), "scaled");
      int pr = cm_nn_softmax(g, sc);
      int y = cm_matmul(g, pr, v, false, false, "y");
      cm_err err = {0};
      CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
      if (keep_p == 1) CHECK(cm_graph_add_output(g, pr, &err) == CM_OK);
      if (keep_p == 2) {
        /* with the backward: its span streams too (render_stream_bwd) */
        int dout = cm_input(g, "dO", CM_F32, 4, d);
        int axes[4] = {0, 1, 2, 3};
        int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 4, axes,
                             false, "loss");
        int wrt[3] = {q, k, v}, grads[3];
        CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
        for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
      }
      cm_target cuda_target;
      cm_target_cuda("sm_80", &cuda_target, NULL);
      cm_compile_opts co = {
          .attn_bc = (int)shapes[si][4], .compile_only = true, .render_only = true};
      cm_program *cp = NULL;
      CHECK_MSG(cm_compile(g, &cuda_target, &co, &cp, &err) == CM_OK, "%s", err.msg);
      const cm_kprogram *prog = cp ? cm_program_kernels(cp) : &(cm_kprogram){0};
      for (int ki = 0; ki < prog->n_kernels; ki++) {
        const cm_kernel *kk = &prog->kernels[ki];
        if (kk->n_stages == 0 || !kk->stages[0].attn.stream) continue;
        bool bwd = kk->stages[0].tmpl == CM_KT_ATTENTION_BWD;
        if (!bwd && kk->stages[0].tmpl != CM_KT_ATTENTION_FWD) continue;
        cm_cuda_render_opts ro = {NULL, false}; /* sm_80 */
        char *src = NULL;
        CHECK_MSG(cm_render_cuda(kk, &ro, true, &src, &err) == CM_OK, "%s", err.msg);
        const char *mark = bwd ? "attention backward, streaming" : "attention forward, streaming";
        CHECK_MSG(src && strstr(src, mark), "%s (shape %d): not rendered as a streaming span",
                  kk->name, si);
        CHECK(cm_cuda_stage_launch(kk, 0, &ro).block[0] == 256);
        if (bwd)
          bwd_streams++;
        else
          streams++;
        char fn[96];
        snprintf(fn, sizeof fn, "%s_s0", kk->name);
        for (int a = 0; a < 2 && src; a++) {
          const char *arch = a ? "sm_90" : "sm_80";
          cm_cubin cub;
          memset(&cub, 0, sizeof cub);
          cm_status cs = cm_nvrtc_compile(nvrtc, src, "stream.cu", arch, NULL, 0, &cub, &err);
          CHECK_MSG(cs == CM_OK, "%s %s: %s", kk->name, arch, err.msg);
          const cm_cuda_kernel_info *ki2 = cs == CM_OK ? cm_cubin_kernel(&cub, fn) : NULL;
          CHECK_MSG(ki2 != NULL, "%s %s: no kernel %s", kk->name, arch, fn);
          if (ki2) {
            CHECK_MSG(ki2->spill_store_bytes == 0 && ki2->spill_load_bytes == 0,
                      "%s %s: spills %d/%d bytes (%d registers)", kk->name, arch,
                      ki2->spill_store_bytes, ki2->spill_load_bytes, ki2->registers);
            if (si == 4 && keep_p)
              fprintf(stderr, "  %s %s: %d registers, %d bytes shared\n", fn, arch, ki2->registers,
                      ki2->shared_bytes);
            compiled++;
          }
          cm_cubin_free(&cub);
        }
        free(src);
      }
      if (cp)
        emu_check_program(cm_program_graph(cp), cm_program_plan(cp), prog, &kernels, &spans,
                          &compared);
      cm_program_free(cp);
      cm_graph_free(g);
    }
  }
  fprintf(stderr,
          "  streaming: %d spans (%d backward spans marked), %d NVRTC compiles; %d kernels (%d "
          "fused) run on the host, %d outputs compared\n",
          streams, bwd_streams, compiled, kernels, spans, compared);
  test_tally_report("  streaming attention on the host");
  CHECK(streams == 3 * NSHAPES && bwd_streams == NSHAPES && compiled == 8 * NSHAPES &&
        spans >= 2 * NSHAPES && compared >= 3 * NSHAPES);
  CHECK_MSG(emu_bwd_stream_runs == NSHAPES, "%d streaming backward spans run on the host",
            emu_bwd_stream_runs);
}

/* Flash attention (cu_render_flash): attention through the autocast pass (Q, K, V and P cast
 * to bf16 for the matmuls, their results cast back to f32, softmax in f32), forward alone, with
 * P kept and with the backward, at odd shapes (tokens 2, 17, 65, 197; head dims 32 and 64; 3
 * batch items x heads): every forward span is planned as flash and renders through mma.sync,
 * every fused bf16 backward span runs its GEMMs on tensor cores; the kernels run on the host
 * under the shim within their bounds; the flash functions compile through NVRTC for sm_80 and
 * sm_90 without spills or stack. The f32 graphs keep the scalar streaming function on CUDA. */
static cm_graph *flash_graph(const int64_t *d, bool bf16, int mode) {
  cm_graph *g = cm_graph_new();
  int q = cm_input(g, "q", CM_F32, 4, d), k = cm_input(g, "k", CM_F32, 4, d);
  int v = cm_input(g, "v", CM_F32, 4, d);
  int sc = cm_matmul(g, q, k, false, true, "scores");
  sc = cm_binary_bcast(g, CM_OP_MUL, sc, cm_const_scalar(g, NULL, CM_F32, 1.0 / sqrt((double)d[3])),
                       "scaled");
  int pr = cm_nn_softmax(g, sc);
  int y = cm_matmul(g, pr, v, false, false, "y");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, y, &err) == CM_OK);
  if (mode == 1) CHECK(cm_graph_add_output(g, pr, &err) == CM_OK);
  if (mode == 2) {
    int dout = cm_input(g, "dO", CM_F32, 4, d);
    int axes[4] = {0, 1, 2, 3};
    int loss = cm_reduce(g, CM_OP_REDUCE_SUM, cm_binary(g, CM_OP_MUL, y, dout, NULL), 4, axes,
                         false, "loss");
    int wrt[3] = {q, k, v}, grads[3];
    CHECK_MSG(cm_autodiff(g, loss, 3, wrt, grads, &err) == CM_OK, "%s", err.msg);
    for (int i = 0; i < 3; i++) CHECK(cm_graph_add_output(g, grads[i], &err) == CM_OK);
  }
  /* bf16: the autocast pass, as on a training step (every matmul, the backward's too) */
  if (bf16) CHECK_MSG(cm_autocast(&g, CM_BF16, NULL, &err) == CM_OK, "%s", err.msg);
  return g;
}

/* NVRTC for sm_80 and sm_90: no spills; registers and shared memory printed once per shape. */
static int flash_nvrtc(const cm_kernel *kk, const char *src, bool print) {
  int compiled = 0;
  char fn[96];
  snprintf(fn, sizeof fn, "%s_s0", kk->name);
  for (int a = 0; a < 2; a++) {
    cm_err err = {0};
    cm_cubin cub;
    memset(&cub, 0, sizeof cub);
    cm_status cs = cm_nvrtc_compile(nvrtc, src, "flash.cu", ARCHS[a], NULL, 0, &cub, &err);
    CHECK_MSG(cs == CM_OK, "%s %s: %s", kk->name, ARCHS[a], err.msg);
    const cm_cuda_kernel_info *ki = cs == CM_OK ? cm_cubin_kernel(&cub, fn) : NULL;
    CHECK_MSG(ki != NULL, "%s %s: no kernel %s", kk->name, ARCHS[a], fn);
    if (ki) {
      /* no local memory at all: the fragments live in registers */
      CHECK_MSG(ki->spill_store_bytes == 0 && ki->spill_load_bytes == 0 && ki->stack_bytes == 0,
                "%s %s: spills %d/%d bytes, stack %d (%d registers)", kk->name, ARCHS[a],
                ki->spill_store_bytes, ki->spill_load_bytes, ki->stack_bytes, ki->registers);
      if (print)
        fprintf(stderr, "  attention %s %s: %d registers, %d bytes shared\n", fn, ARCHS[a],
                ki->registers, ki->shared_bytes);
      compiled++;
    }
    cm_cubin_free(&cub);
  }
  return compiled;
}

/* The flash backward's function (cu_render_flash_bwd): every product on mma.sync, the tile
 * GEMMs (S', dP), the GEMM over rows (dQ) and those over keys (dK, dV; at one token, where rows
 * and keys are the same single index, the planner may take them as GEMMs over rows). */
static bool flash_bwd_source(const char *src, int64_t tokens) {
  return strstr(src, "attention backward, flash") && strstr(src, "cm_mma_16816<true>(fg") &&
         strstr(src, "cm_mma_16816<true>(dq") &&
         (tokens == 1 || strstr(src, "cm_mma_16816<true>(ka_"));
}

static void test_flash_attention(void) {
  static const int64_t shapes[][4] = {/* n, heads, tokens, dim */
                                      {1, 3, 17, 32},
                                      {3, 1, 65, 64},
                                      {1, 3, 197, 32},
                                      {3, 1, 2, 64},
                                      {1, 3, 1, 32}};
  enum { NSHAPES = sizeof shapes / sizeof shapes[0] };
  /* CI runs on the host (the emulator and its C++ compiles take ~2 s a graph): the bf16 graphs
   * at 17 tokens x 32 and 65 x 64 and the f32 training graph at 17 x 32; CMAEC_FLASH_ALL=1
   * (the long entry) every graph. Every graph is planned and rendered either way. */
  const char *all_env = getenv("CMAEC_FLASH_ALL");
  bool all = all_env && all_env[0] == '1';
  int kernels = 0, spans = 0, compared = 0, flash = 0, stream_f32 = 0, fwd = 0, compiled = 0;
  int ran = 0, bwd_mma = 0, bwd197 = 0;
  double t0 = now_s();
  for (int si = 0; si < NSHAPES; si++) {
    for (int bf16 = 0; bf16 < 2; bf16++) {
      for (int mode = 0; mode < 3; mode++) {
        bool run = all || (si == 0 && (bf16 || mode == 2)) || (si == 1 && bf16 && mode == 2);
        cm_graph *g = flash_graph(shapes[si], bf16, mode);
        cm_target cuda_target;
        cm_target_cuda("sm_80", &cuda_target, NULL);
        cm_compile_opts co = {.compile_only = true, .render_only = true};
        cm_program *cp = NULL;
        cm_err err = {0};
        CHECK_MSG(cm_compile(g, &cuda_target, &co, &cp, &err) == CM_OK, "%s", err.msg);
        const cm_kprogram *prog = cp ? cm_program_kernels(cp) : &(cm_kprogram){0};
        for (int ki = 0; ki < prog->n_kernels; ki++) {
          const cm_kernel *kk = &prog->kernels[ki];
          cm_cuda_render_opts ro = {NULL, false}; /* sm_80 */
          if (bf16 && kk->n_stages && kk->stages[0].tmpl == CM_KT_ATTENTION_BWD) {
            char *src = NULL;
            CHECK_MSG(cm_render_cuda(kk, &ro, true, &src, &err) == CM_OK, "%s", err.msg);
            bool mma = src && flash_bwd_source(src, shapes[si][2]);
            CHECK_MSG(kk->stages[0].cuda.kind == CM_KCUDA_ATTN_FLASH_BWD && mma,
                      "%s (shape %d): a bf16 backward span not rendered as the flash backward",
                      kk->name, si);
            bwd_mma += mma;
            /* 197 tokens: the row operands and the dV/dK tiles in dynamic shared memory (more
             * than the static 48 KiB), through NVRTC */
            if (shapes[si][2] == 197 && src) {
              CHECK(cm_cuda_stage_launch(kk, 0, &ro).shared_bytes > 48 * 1024);
              bwd197 += flash_nvrtc(kk, src, true);
            }
            free(src);
          }
          if (kk->n_stages == 0 || kk->stages[0].tmpl != CM_KT_ATTENTION_FWD) continue;
          fwd++;
          char *src = NULL;
          CHECK_MSG(cm_render_cuda(kk, &ro, true, &src, &err) == CM_OK, "%s", err.msg);
          bool is_flash = src && strstr(src, "attention forward, flash") &&
                          strstr(src, "cm_mma_16816<true>(s_[t_]") &&
                          strstr(src, "cm_mma_16816<true>(o_[t_]");
          bool is_stream = src && strstr(src, "attention forward, streaming");
          CHECK_MSG(bf16 ? is_flash : is_stream, "%s (shape %d, %s): rendered as neither", kk->name,
                    si, bf16 ? "bf16 flash" : "f32 streaming");
          CHECK(cm_cuda_stage_launch(kk, 0, &ro).block[0] == (bf16 ? 128u : 256u));
          flash += is_flash, stream_f32 += is_stream;
          if (is_flash && mode == 1 && (all || si < 2)) compiled += flash_nvrtc(kk, src, si < 2);
          free(src);
        }
        if (cp && run) {
          emu_check_program(cm_program_graph(cp), cm_program_plan(cp), prog, &kernels, &spans,
                            &compared);
          ran++;
        }
        cm_program_free(cp);
        cm_graph_free(g);
      }
    }
  }
  fprintf(stderr,
          "  flash: %d forward spans (%d flash bf16, %d streaming f32), %d bf16 backward spans "
          "flash on tensor cores (%d run on the host), %d NVRTC compiles; %d graphs (%d kernels) "
          "run on the host, %d outputs compared, %.1f s\n",
          fwd, flash, stream_f32, bwd_mma, emu_bwd_flash_runs, compiled, ran, kernels, compared,
          now_s() - t0);
  test_tally_report("  flash attention on the host");
  /* tokens 1 has no softmax span to stream; every other shape's forward span is flash (bf16)
   * or streaming (f32) */
  /* the bf16 graph with the backward: fuse.c does not group its forward as attention (a
   * training step's forward it does: test_variant_attention_spans), so it has no forward span */
  CHECK_MSG(bwd197 == 2, "the 197-token bf16 backward span: %d of 2 NVRTC compiles", bwd197);
  /* the bf16 graphs with the backward that run on the host: 17 x 32 and 65 x 64 (all: every
   * shape, one token included) */
  CHECK_MSG(emu_bwd_flash_runs == (all ? NSHAPES : 2), "%d flash backward spans run",
            emu_bwd_flash_runs);
  CHECK_MSG(flash == 2 * (NSHAPES - 1) && stream_f32 == 3 * (NSHAPES - 1) && bwd_mma >= 3 &&
                fwd == flash + stream_f32,
            "%d flash, %d streaming of %d forward spans", flash, stream_f32, fwd);
  CHECK(compiled == (all ? 2 * (NSHAPES - 1) : 4) && ran == (all ? 6 * NSHAPES : 5) &&
        compared >= 2 * ran);
}

/* Every attention span of every shipped variant's training step (batch 2), lowered for sm_80
 * in f32 and after autocast (bf16): the forward spans by plan (flash on tensor cores, scalar
 * streaming, fused) and the backward spans; every forward span must stream (flash for bf16).
 * The tiny variants' forward spans of each distinct shape also run on the host under the shim,
 * within their bounds on their inputs. */
static void variant_spans(const char *path, bool bf16, bool host, int *fwd, int *fwd_flash,
                          int *fwd_stream, int *bwd, int *bwd_stream, int *bwd_mma) {
  cm_err err = {0};
  cm_graph *step = test_build_step(path, NULL, 0, BATCH, NULL, NULL, NULL);
  if (!step) return;
  if (bf16) CHECK_MSG(cm_autocast(&step, CM_BF16, NULL, &err) == CM_OK, "%s: %s", path, err.msg);
  cm_pass_state ps = {step, NULL};
  cm_status st = cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
  CHECK_MSG(st == CM_OK && ps.plan, "%s: %s", path, err.msg);
  cm_target t;
  cm_target_cuda("sm_80", &t, NULL);
  cm_lower_opts lo = {&t, false, 0};
  cm_kprogram kp;
  memset(&kp, 0, sizeof kp);
  if (st == CM_OK && ps.plan)
    CHECK_MSG(cm_lower_plan(ps.g, ps.plan, &lo, &kp, &err) == CM_OK, "%s: %s", path, err.msg);
  /* host: the forward and backward spans of distinct shapes (at most 3 each) also run on the
   * emulated device */
  cm_kprogram sub = {0, calloc(6, sizeof(cm_kernel)), 0, 0};
  int picked[2] = {0, 0};
  for (int i = 0; i < kp.n_kernels; i++) {
    const cm_kstage *s0 = kp.kernels[i].n_stages ? &kp.kernels[i].stages[0] : NULL;
    if (!s0 || (s0->tmpl != CM_KT_ATTENTION_FWD && s0->tmpl != CM_KT_ATTENTION_BWD)) continue;
    bool seen = false, is_fwd = s0->tmpl == CM_KT_ATTENTION_FWD;
    for (int j = 0; j < sub.n_kernels; j++)
      seen |= sub.kernels[j].stages[0].tmpl == s0->tmpl &&
              sub.kernels[j].stages[0].attn.rows == s0->attn.rows &&
              sub.kernels[j].stages[0].red[0] == s0->red[0];
    bool pick = host && sub.kernels && !seen && picked[is_fwd] < 3;
    if (pick) {
      sub.kernels[sub.n_kernels++] = kp.kernels[i];
      picked[is_fwd]++;
    }
    /* bf16 backward spans: the flash backward, every product on tensor cores (the picked ones
     * through NVRTC: no spills, no stack) */
    if (bf16 && !is_fwd) {
      cm_cuda_render_opts ro = {&t, false};
      char *src = NULL;
      CHECK_MSG(cm_render_cuda(&kp.kernels[i], &ro, true, &src, &err) == CM_OK, "%s", err.msg);
      bool mma =
          src && s0->cuda.kind == CM_KCUDA_ATTN_FLASH_BWD && flash_bwd_source(src, s0->attn.rows);
      CHECK_MSG(mma, "%s %s: a bf16 backward span not the flash backward", path,
                kp.kernels[i].name);
      *bwd_mma += mma;
      if (pick && src) CHECK(flash_nvrtc(&kp.kernels[i], src, true) == 2);
      free(src);
    }
    if (s0->tmpl == CM_KT_ATTENTION_FWD) {
      (*fwd)++;
      *fwd_flash += s0->cuda.kind == CM_KCUDA_ATTN_FLASH;
      *fwd_stream += s0->cuda.kind == CM_KCUDA_ATTN_STREAM;
    } else {
      (*bwd)++;
      *bwd_stream += s0->cuda.kind == CM_KCUDA_ATTN_STREAM_BWD;
    }
  }
  if (sub.n_kernels) {
    int kernels = 0, spans = 0, compared = 0;
    emu_check_program(ps.g, ps.plan, &sub, &kernels, &spans, &compared);
    fprintf(stderr,
            "  %s %s: %d forward and %d backward spans run on the host, %d outputs "
            "compared\n",
            path, bf16 ? "bf16" : "f32", picked[1], picked[0], compared);
    CHECK(kernels == sub.n_kernels && compared >= sub.n_kernels);
  }
  free(sub.kernels); /* a view of kp's kernels */
  cm_kprogram_free(&kp);
  cm_plan_free(ps.plan);
  cm_graph_free(ps.g);
}

static void test_variant_attention_spans(void) {
  double t0 = now_s();
  for (int v = 0; v < N_VARIANTS; v++) {
    if (!wanted(VARIANTS[v])) continue;
    for (int bf16 = 0; bf16 < 2; bf16++) {
      int fwd = 0, flash = 0, stream = 0, bwd = 0, bwd_stream = 0, bwd_mma = 0;
      /* the tiny variants' spans run on the emulated device too */
      variant_spans(VARIANTS[v], bf16, strstr(VARIANTS[v], "tiny") != NULL, &fwd, &flash, &stream,
                    &bwd, &bwd_stream, &bwd_mma);
      fprintf(stderr,
              "  %-36s %s: %d forward spans (%d flash, %d streaming), %d backward (%d "
              "streaming, %d flash on tensor cores)\n",
              VARIANTS[v], bf16 ? "bf16" : "f32 ", fwd, flash, stream, bwd, bwd_stream, bwd_mma);
      CHECK_MSG(fwd > 0 && (bf16 ? flash : stream) == fwd, "%s %s: %d of %d forward spans %s",
                VARIANTS[v], bf16 ? "bf16" : "f32", bf16 ? flash : stream, fwd,
                bf16 ? "flash" : "streaming");
      /* bf16: every backward span the flash backward (197 tokens included) */
      CHECK_MSG(!bf16 || (bwd > 0 && bwd_mma == bwd),
                "%s: %d of %d bf16 backward spans flash on "
                "tensor cores",
                VARIANTS[v], bwd_mma, bwd);
    }
  }
  fprintf(stderr, "  %.1f s\n", now_s() - t0);
}

int main(int argc, char **argv) {
  cm_err err = {0};
  const char *only = argc > 1 ? argv[1] : NULL;
  if (argc > 2 ||
      (only && strcmp(only, "test_cuda_kernels_on_host") &&
       strcmp(only, "test_streaming_attention") && strcmp(only, "test_flash_attention") &&
       strcmp(only, "test_variant_attention_spans") &&
       strcmp(only, "test_every_variant_through_nvrtc"))) {
    fprintf(stderr,
            "%s: no test \"%s\"; tests: test_cuda_kernels_on_host test_streaming_attention "
            "test_flash_attention test_variant_attention_spans "
            "test_every_variant_through_nvrtc\n",
            argv[0], argv[argc - 1]);
    return 2;
  }
  if (cm_nvrtc_load(&nvrtc, &err) != CM_OK) {
    fprintf(stderr, "skipped: %s\n", err.msg);
    return 77;
  }
  fprintf(stderr, "NVRTC %s\n", cm_nvrtc_version(nvrtc));
  int before = test_failures;
  if (!only || !strcmp(only, "test_cuda_kernels_on_host")) {
    test_cuda_kernels_on_host();
    fprintf(stderr, "%-40s %s\n", "test_cuda_kernels_on_host",
            test_failures == before ? "ok" : "FAILED");
  }
  before = test_failures;
  if (!only || !strcmp(only, "test_streaming_attention")) {
    test_streaming_attention();
    fprintf(stderr, "%-40s %s\n", "test_streaming_attention",
            test_failures == before ? "ok" : "FAILED");
  }
  before = test_failures;
  if (!only || !strcmp(only, "test_flash_attention")) {
    test_flash_attention();
    fprintf(stderr, "%-40s %s\n", "test_flash_attention",
            test_failures == before ? "ok" : "FAILED");
  }
  before = test_failures;
  if (only && !strcmp(only, "test_variant_attention_spans")) {
    test_variant_attention_spans();
    fprintf(stderr, "%-40s %s\n", "test_variant_attention_spans",
            test_failures == before ? "ok" : "FAILED");
  }
  before = test_failures;
  /* quick mode (the sanitizer build): the host part only */
  const char *q = getenv("CMAEC_TEST_QUICK");
  bool quick = q && q[0] == '1';
  if ((!only && !quick) || (only && !strcmp(only, "test_every_variant_through_nvrtc"))) {
    test_every_variant_through_nvrtc();
    fprintf(stderr, "%-40s %s\n", "test_every_variant_through_nvrtc",
            test_failures == before ? "ok" : "FAILED");
  } else if (quick) {
    fprintf(stderr, "%-40s skipped (CMAEC_TEST_QUICK)\n", "test_every_variant_through_nvrtc");
  }
  cm_nvrtc_unload(nvrtc);
  fprintf(stderr, "%d checks, %d failures\n", test_checks, test_failures);
  return test_failures ? 1 : 0;
}
