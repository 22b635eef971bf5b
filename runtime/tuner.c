/* runtime/tuner.c — the autotuner (docs/runtime.md "Autotuning"): cm_tune measures the
 * candidate plans of every distinct tunable stage of a program (codegen's tuning spaces,
 * codegen/tune_space.c) and records every trial and the best in the tuning database
 * (runtime/tuning_db.c); cm_tune_apply_cached is cm_compile's hook that plans each stage the
 * database has a best point for.
 *
 * Measuring one candidate: a copy of the kernel with the point applied (CM_EINVALID: pruned,
 * before compiling) becomes a program of its own (cm_program_of_kernel: the buffers it reads
 * bound as sources holding random data, never zeros), compiled through the normal caches, run
 * once to warm up, then timed (the stage's profile: wall time on the CPU, CUDA events) until
 * the median is steady. On the CPU every candidate runs in a forked child, so that a candidate
 * that crashes or hangs is recorded and skipped; only when fork is unusable (libgomp's thread
 * pool, once the calling process has run OpenMP, hangs a forked child) does it run in-process.
 * On the emulated CUDA device a candidate's time is cm_tune_model_cost: deterministic, so the
 * tuner's tests know its choices. */
#include "runtime.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TUNE_MIN_RUNS 5
#define TUNE_MAX_RUNS 50
#define TUNE_RUN_SECONDS 0.5
#define TUNE_SPREAD 0.03       /* the interquartile range of the runs, relative to the median */
#define TUNE_GIVE_UP 3.0       /* a candidate this many times slower than the best stops */
#define TUNE_CHILD_SECONDS 300 /* a forked candidate that takes longer is killed */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The CPU backend's thread count for co (its resolve_threads; a bad $CMAEC_THREADS is
 * reported by the compile itself). */
static int tune_threads(const cm_compile_opts *co) {
  if (co && co->threads > 0) return co->threads;
  const char *e = getenv("CMAEC_THREADS");
  if (e && *e) {
    char *end;
    long v = strtol(e, &end, 10);
    if (!*end && v >= 1 && v <= 4096) return (int)v;
  }
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

static bool is_emulated(const cm_cuda_driver *d) {
  return d && d->name && strcmp(d->name, "emulated") == 0;
}

/* The CUDA driver co's backend options name (NULL: the real one, when it loads). */
static const cm_cuda_driver *tune_driver(const cm_compile_opts *co) {
  bool cuda_backend = !co || !co->backend || co->backend == &cm_backend_cuda;
  const cm_cuda_backend_opts *bo = co && cuda_backend ? co->backend_opts : NULL;
  if (bo && bo->driver) return bo->driver;
  const cm_cuda_driver *d = NULL;
  cm_err e = {0};
  return cm_cuda_driver_load(&d, &e) == CM_OK ? d : NULL;
}

void cm_tune_device_for(const cm_target *t, const cm_compile_opts *co, char *out, size_t size) {
  if (t->kind == CM_TARGET_CPU) {
    cm_tune_device_id(t, tune_threads(co), NULL, 0, out, size);
    return;
  }
  const cm_cuda_driver *d = tune_driver(co);
  const cm_cuda_backend_opts *bo = co ? co->backend_opts : NULL;
  char name[128] = "";
  int version = 0, dev = 0;
  if (d && !is_emulated(d) && d->device_get(&dev, bo ? bo->device : 0) == 0 &&
      d->device_get_name(name, (int)sizeof name, dev) != 0)
    name[0] = '\0';
  if (d && !is_emulated(d) && d->driver_get_version(&version) != 0) version = 0;
  /* the emulated device is named by gpu_name NULL; a GPU whose name cannot be read, "?" */
  cm_tune_device_id(t, 0, is_emulated(d) ? NULL : name[0] ? name : "?", version, out, size);
}

/* ---- kernels ------------------------------------------------------------------------ */

static cm_status kernel_copy(const cm_kernel *src, cm_kernel *dst, cm_err *err) {
  *dst = *src;
  dst->buffers = malloc(sizeof *dst->buffers * (size_t)(src->n_buffers + 1));
  dst->stages = calloc((size_t)src->n_stages + 1, sizeof *dst->stages);
  dst->cap_buffers = src->n_buffers + 1;
  dst->cap_stages = src->n_stages + 1;
  bool ok = dst->buffers && dst->stages;
  if (ok) memcpy(dst->buffers, src->buffers, sizeof *dst->buffers * (size_t)src->n_buffers);
  for (int s = 0; ok && s < src->n_stages; s++) {
    cm_kstage *d = &dst->stages[s];
    *d = src->stages[s];
    d->exprs = malloc(sizeof *d->exprs * (size_t)(d->n_exprs + 1));
    d->cap_exprs = d->n_exprs + 1;
    if (!d->exprs) {
      d->n_exprs = 0;
      ok = false;
      dst->n_stages = s + 1;
      break;
    }
    memcpy(d->exprs, src->stages[s].exprs, sizeof *d->exprs * (size_t)d->n_exprs);
  }
  if (ok) return CM_OK;
  cm_kernel_free(dst);
  return cm_errorf(err, CM_EINTERNAL, "out of memory");
}

static const char *template_name(const cm_kstage *s) {
  switch (s->tmpl) {
  case CM_KT_GEMM: return "gemm";
  case CM_KT_ATTENTION_FWD: return "attention";
  case CM_KT_ATTENTION_BWD: return "attention_bwd";
  default: return s->n_red > 0 ? "reduce" : "rows";
  }
}

/* "k12_gemm s0 gemm 394x192x576": the kernel, stage, template, domain x reduction extents. */
static void stage_label(const cm_kernel *k, int stage, char *out, size_t size) {
  const cm_kstage *s = &k->stages[stage];
  size_t used = (size_t)snprintf(out, size, "%s s%d %s ", k->name, stage, template_name(s));
  for (int d = 0; d < s->n_dom + s->n_red && used + 24 < size; d++)
    used += (size_t)snprintf(out + used, size - used, "%s%lld", d ? "x" : "",
                             (long long)(d < s->n_dom ? s->dom[d] : s->red[d - s->n_dom]));
}

/* ---- the hook of cm_compile ----------------------------------------------------------- */

/* mkdir -p of the directory holding path (what cannot be made, the open reports). */
static void make_parent_dirs(const char *path) {
  char dir[4200];
  snprintf(dir, sizeof dir, "%s", path);
  char *slash = strrchr(dir, '/');
  if (!slash || slash == dir) return;
  *slash = '\0';
  (void)cm_make_dirs(dir);
}

static cm_status open_db(const char *given, const cm_compile_opts *co, bool must_exist,
                         cm_tune_db **db, cm_err *err) {
  *db = NULL;
  char cbuf[4096], path[4200];
  if (!given) {
    const char *dir = cm_cache_dir(co ? co->cache_dir : NULL, cbuf, sizeof cbuf);
    if (!dir) return CM_OK; /* caching disabled */
    snprintf(path, sizeof path, "%s/tuning.db", dir);
    given = path;
  }
  if (must_exist && access(given, F_OK) != 0) return CM_OK;
  if (!must_exist) make_parent_dirs(given);
  return cm_tune_db_open(given, db, err);
}

/* Applies the point `text` to stage s of k, all or nothing. false: it no longer parses or
 * applies. */
static bool apply_recorded(cm_kernel *k, int s, const cm_target *t, const cm_tune_space *space,
                           const char *text) {
  cm_err e = {0};
  cm_tune_point p;
  cm_kernel copy;
  if (cm_tune_point_parse(space, text, &p, &e) != CM_OK || kernel_copy(k, &copy, &e) != CM_OK)
    return false;
  if (cm_tune_apply(&copy, s, t, &p, &e) != CM_OK) {
    cm_kernel_free(&copy);
    return false;
  }
  cm_kernel_free(k);
  *k = copy;
  return true;
}

/* A database that cannot be read costs the tuned plans, never the compile: one warning a
 * process (every compile of a training run would repeat it), then the default plans. */
static cm_status db_unreadable(const char *path, const cm_err *why) {
  static atomic_flag warned = ATOMIC_FLAG_INIT;
  if (atomic_flag_test_and_set(&warned)) return CM_OK;
  char prefix[4300];
  snprintf(prefix, sizeof prefix, "tuning database %s: ", path);
  const char *msg = why->msg;
  if (!strncmp(msg, prefix, strlen(prefix))) msg += strlen(prefix);
  fprintf(stderr, "cmaec: tuning database %s unreadable: %s; using default plans\n", path, msg);
  return CM_OK;
}

cm_status cm_tune_apply_cached(cm_kprogram *kp, const cm_target *t, const cm_compile_opts *co,
                               int *applied, int *ignored, cm_err *err) {
  *applied = *ignored = 0;
  cm_tune_mode mode;
  if (cm_tune_mode_resolve(co ? co->tune : CM_TUNE_FROM_ENV, &mode, err) != CM_OK)
    return err ? err->status : CM_EINVALID;
  if (mode == CM_TUNE_OFF) return CM_OK;
  char cbuf[4096], path[4200];
  const char *dir = cm_cache_dir(co ? co->cache_dir : NULL, cbuf, sizeof cbuf);
  if (!dir) return CM_OK; /* caching disabled */
  snprintf(path, sizeof path, "%s/tuning.db", dir);
  cm_tune_db *db = NULL;
  cm_err db_err = {0};
  cm_status st = open_db(path, co, true, &db, &db_err);
  if (st != CM_OK) return db_unreadable(path, &db_err);
  if (!db) return CM_OK;
  cm_tune_key key = {.version = CM_TUNE_SPACE_VERSION};
  bool have_device = false;
  for (int i = 0; i < kp->n_kernels && st == CM_OK; i++) {
    cm_kernel *k = &kp->kernels[i];
    bool hashed = false;
    /* a K split point adds or removes a stage: s walks the kernel as lowered (the key's
       stages), at is where that stage is now */
    int lowered = k->n_stages;
    for (int s = 0, at = 0; s < lowered && st == CM_OK; s++, at++) {
      cm_tune_space space;
      cm_err e = {0};
      if (cm_tune_space_of(k, at, t, &space, &e) != CM_OK || space.n_knobs == 0) continue;
      if (!hashed) /* before any stage of it changes: the key is the kernel as lowered */
        cm_kernel_structural_hash(k, key.kernel), hashed = true;
      if (!have_device)
        cm_tune_device_for(t, co, key.device, sizeof key.device), have_device = true;
      key.stage = s;
      char text[256];
      double best_ms;
      bool found = false;
      st = cm_tune_db_get_best(db, &key, text, sizeof text, &best_ms, &found, &db_err);
      if (st != CM_OK || !found) continue;
      int before = k->n_stages;
      if (!apply_recorded(k, at, t, &space, text)) {
        (*ignored)++;
        continue;
      }
      (*applied)++;
      /* split: skip the sum stage it added; merged: the lowered sum stage is gone */
      if (k->n_stages > before) at += k->n_stages - before;
      if (k->n_stages < before) s += before - k->n_stages;
    }
    /* a K split point may add a scratch buffer */
    if (k->scratch_bytes > kp->max_scratch_bytes) kp->max_scratch_bytes = k->scratch_bytes;
  }
  cm_tune_db_close(db);
  return st == CM_OK ? CM_OK : db_unreadable(path, &db_err);
}

/* ---- random sources --------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* Floats in [0.25, 1): never zero, and no log or sqrt of them is undefined; integers 0: a valid
 * index on any axis. */
static void fill_random(cm_tensor *t, uint64_t *seed) {
  int64_t n = cm_type_numel(&t->type);
  bool is_float = cm_dtype_is_float(t->type.dtype);
  if (!is_float) {
    memset(t->data, 0, cm_type_nbytes(&t->type));
    return;
  }
  for (int64_t e = 0; e < n; e++)
    cm_tensor_set_f64(t, e, 0.25 + 0.75 * (double)(rng_next(seed) >> 11) / 9007199254740992.0);
}

/* ---- one candidate ------------------------------------------------------------------------- */

typedef struct tune_ctx {
  const cm_graph *g; /* the program's graph and plan, which the kernels index */
  const cm_plan *plan;
  const cm_target *t;
  cm_compile_opts co; /* each candidate's program is compiled so */
  bool emulated;      /* the emulated CUDA device: times are cm_tune_model_cost */
  bool fork;          /* candidates run in forked children */
} tune_ctx;

typedef struct trial {
  bool ok;   /* ms is its time (or, checking, it agreed with the oracle) */
  double ms; /* the median of its runs */
  int runs;
  char failure[256];
} trial;

typedef struct bound_sources {
  cm_tensor *tensors; /* per node of the graph */
  cm_tensor **ptrs;   /* per node: the tensor bound, or NULL */
} bound_sources;

static void bound_sources_free(bound_sources *b, int n) {
  for (int v = 0; b->tensors && v < n; v++) cm_tensor_free(&b->tensors[v]);
  free(b->tensors);
  free(b->ptrs);
}

/* Random data for every node the one-kernel program reads as a source. */
static cm_status make_sources(const cm_program *pr, bound_sources *out, cm_err *err) {
  const cm_graph *g = cm_program_graph(pr);
  const cm_kernel *k = &cm_program_kernels(pr)->kernels[0];
  out->tensors = calloc((size_t)g->n_nodes + 1, sizeof *out->tensors);
  out->ptrs = calloc((size_t)g->n_nodes + 1, sizeof *out->ptrs);
  if (!out->tensors || !out->ptrs) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  for (int b = 0; b < k->n_buffers; b++) {
    int v = k->buffers[b].node;
    if (k->buffers[b].kind != CM_KBUF_SOURCE || out->ptrs[v]) continue;
    cm_status st = cm_tensor_alloc(&out->tensors[v], g->nodes[v].type, err);
    if (st != CM_OK) return st;
    fill_random(&out->tensors[v], &seed);
    out->ptrs[v] = &out->tensors[v];
  }
  return CM_OK;
}

static double stage_total_ms(const cm_program *pr, int stage) {
  const cm_stage_profile *sp;
  int n = cm_program_stage_profile(pr, &sp);
  return stage < n ? sp[stage].total_ms : 0;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Warm-up, then runs until the median is steady (TUNE_MIN_RUNS within TUNE_SPREAD), at most
 * TUNE_MAX_RUNS or TUNE_RUN_SECONDS, or until it is TUNE_GIVE_UP times slower than best_ms. */
static void time_candidate(cm_program *pr, cm_tensor **src, int stage, double best_ms, trial *r) {
  cm_err e = {0};
  if (cm_program_run(pr, src, NULL, &e) != CM_OK) {
    snprintf(r->failure, sizeof r->failure, "run: %s", e.msg);
    return;
  }
  double times[TUNE_MAX_RUNS], sorted[TUNE_MAX_RUNS], t0 = now_s();
  int n = 0;
  while (n < TUNE_MAX_RUNS) {
    double before = stage_total_ms(pr, stage);
    if (cm_program_run(pr, src, NULL, &e) != CM_OK) {
      snprintf(r->failure, sizeof r->failure, "run: %s", e.msg);
      return;
    }
    times[n++] = stage_total_ms(pr, stage) - before;
    memcpy(sorted, times, sizeof times[0] * (size_t)n);
    qsort(sorted, (size_t)n, sizeof sorted[0], cmp_double);
    double median = sorted[n / 2];
    if (best_ms > 0 && sorted[0] > TUNE_GIVE_UP * best_ms) break;
    if (n >= TUNE_MIN_RUNS && sorted[3 * n / 4] - sorted[n / 4] <= TUNE_SPREAD * median) break;
    if (now_s() - t0 >= TUNE_RUN_SECONDS) break;
  }
  r->ok = true;
  r->ms = sorted[n / 2];
  r->runs = n;
}

/* Whether got (n values of dtype) lies within bound of want, elementwise. */
static bool within_bounds(cm_dtype dtype, const void *got, const cm_tensor *want,
                          const cm_tensor *bound, int64_t n, char *why, size_t size) {
  cm_tensor view = {{dtype, 1, {n}}, (void *)got};
  for (int64_t e = 0; e < n; e++) {
    double g = cm_tensor_get_f64(&view, e), w = cm_tensor_get_f64(want, e);
    double b = cm_tensor_get_f64(bound, e);
    bool same_inf = isinf(w) && g == w;
    if (!(fabs(g - w) <= b) && !same_inf) {
      snprintf(why, size, "element %lld is %.9g, the oracle's %.9g +- %.3g", (long long)e, g, w, b);
      return false;
    }
  }
  return true;
}

/* The node of g a written buffer holds after the run: its own, or for a state updated in place
 * the assign that writes it. */
static int written_node(const cm_graph *g, const cm_kbuffer *kb, int node) {
  if (kb->kind != CM_KBUF_SOURCE) return node;
  for (int q = 0; q < g->n_nodes; q++)
    if (g->nodes[q].op == CM_OP_ASSIGN && g->nodes[q].inputs[0] == node) return q;
  return -1;
}

static bool is_source_op(cm_op op) {
  return op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE;
}

/* The oracle's values and bounds of the kernel's group on the program's inputs: orig[b] is the
 * node of c->g that buffer b of the one-kernel program holds. */
static cm_status oracle_eval(const tune_ctx *c, const cm_program *pr, const int *orig,
                             const bound_sources *bs, cm_tensor *values, cm_tensor *bounds,
                             cm_err *err) {
  const cm_graph *g = c->g;
  const cm_kernel *k = &cm_program_kernels(pr)->kernels[0];
  const cm_tensor **srcs = calloc((size_t)g->n_nodes + 1, sizeof *srcs);
  if (!srcs) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_status st = CM_OK;
  for (int b = 0; b < k->n_buffers && st == CM_OK; b++) {
    int v = orig[b], kv = k->buffers[b].node;
    if (k->buffers[b].kind != CM_KBUF_SOURCE || v < 0 || srcs[v] || values[v].data) continue;
    if (is_source_op(g->nodes[v].op))
      srcs[v] = bs->ptrs[kv];
    else
      st = cm_tensor_copy(&values[v], bs->ptrs[kv], err);
  }
  if (st == CM_OK && k->group < 0)
    st = cm_errorf(err, CM_EINVALID, "kernel %s implements no group of the plan", k->name);
  if (st == CM_OK) st = cm_plan_eval_group_bounded(g, c->plan, k->group, srcs, values, bounds, err);
  free(srcs);
  return st;
}

/* One run on fresh random inputs, every written buffer against the oracle's evaluation of the
 * kernel's group on the same inputs (cm_plan_eval_group_bounded) within its error bounds. */
static void check_candidate(cm_program *pr, const tune_ctx *c, const int *orig, bound_sources *bs,
                            trial *r) {
  const cm_graph *g = c->g;
  const cm_kernel *k = &cm_program_kernels(pr)->kernels[0];
  int n = g->n_nodes;
  cm_tensor *values = calloc((size_t)n + 1, sizeof *values);
  cm_tensor *bounds = calloc((size_t)n + 1, sizeof *bounds);
  cm_err e = {0};
  cm_status st = values && bounds ? oracle_eval(c, pr, orig, bs, values, bounds, &e)
                                  : cm_errorf(&e, CM_EINTERNAL, "out of memory");
  if (st == CM_OK) st = cm_program_run(pr, bs->ptrs, NULL, &e);
  r->ok = st == CM_OK;
  if (st != CM_OK) snprintf(r->failure, sizeof r->failure, "oracle check: %s", e.msg);
  for (int b = 0; r->ok && b < k->n_buffers; b++) {
    const cm_kbuffer *kb = &k->buffers[b];
    if (!kb->written || (kb->kind != CM_KBUF_ARENA && kb->kind != CM_KBUF_SOURCE)) continue;
    int v = written_node(g, kb, orig[b]);
    const void *got = kb->kind == CM_KBUF_SOURCE ? bs->ptrs[kb->node]->data
                                                 : cm_program_backend(pr)->buffer(pr, 0, b);
    if (v < 0 || !got || !values[v].data || cm_type_numel(&values[v].type) != kb->numel) {
      snprintf(r->failure, sizeof r->failure,
               "oracle check: buffer %d of kernel %s holds no output of its group", b, k->name);
      r->ok = false;
      break;
    }
    char why[160];
    if (!within_bounds(kb->dtype, got, &values[v], &bounds[v], kb->numel, why, sizeof why)) {
      snprintf(r->failure, sizeof r->failure, "oracle check: \"%s\": %s", g->nodes[v].name, why);
      r->ok = false;
    }
  }
  for (int v = 0; v < n; v++) {
    if (values) cm_tensor_free(&values[v]);
    if (bounds) cm_tensor_free(&bounds[v]);
  }
  free(values);
  free(bounds);
}

/* Compiles kernel k (owned) alone and times stage `stage` of it, or (check) checks it against
 * the oracle. */
static void candidate_job(const tune_ctx *c, cm_kernel *k, int stage, bool check, double best_ms,
                          trial *r) {
  memset(r, 0, sizeof *r);
  cm_compile_opts co = c->co;
  co.profile = !check;
  co.compile_only = co.render_only = false;
  co.tune = CM_TUNE_OFF;
  co.resident_states = false; /* the check reads the states it updates on the host */
  cm_program *pr = NULL;
  cm_err e = {0};
  int *orig = malloc(sizeof(int) * (size_t)(k->n_buffers + 1));
  if (!orig) {
    snprintf(r->failure, sizeof r->failure, "out of memory");
    cm_kernel_free(k);
    return;
  }
  for (int b = 0; b < k->n_buffers; b++) orig[b] = k->buffers[b].node;
  if (cm_program_of_kernel(c->g, c->plan, k, c->t, &co, &pr, &e) != CM_OK) {
    snprintf(r->failure, sizeof r->failure, "compile: %s", e.msg);
    free(orig);
    return;
  }
  bound_sources bs = {0};
  if (make_sources(pr, &bs, &e) != CM_OK)
    snprintf(r->failure, sizeof r->failure, "inputs: %s", e.msg);
  else if (check)
    check_candidate(pr, c, orig, &bs, r);
  else
    time_candidate(pr, bs.ptrs, stage, best_ms, r);
  bound_sources_free(&bs, cm_program_graph(pr)->n_nodes);
  cm_program_free(pr);
  free(orig);
}

/* Reads a child's trial from fd until it closes or the deadline passes. */
static size_t read_trial(int fd, trial *got, double deadline, bool *timed_out) {
  size_t have = 0;
  *timed_out = false;
  while (have < sizeof *got) {
    int left_ms = (int)((deadline - now_s()) * 1000);
    struct pollfd pfd = {fd, POLLIN, 0};
    int ready = left_ms > 0 ? poll(&pfd, 1, left_ms) : 0;
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) {
      *timed_out = true;
      break;
    }
    ssize_t n = read(fd, (char *)got + have, sizeof *got - have);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    have += (size_t)n;
  }
  return have;
}

/* candidate_job in a forked child, so that a crash or a hang only loses the candidate. */
static void run_forked(const tune_ctx *c, cm_kernel *k, int stage, bool check, double best_ms,
                       trial *r) {
  memset(r, 0, sizeof *r);
  int fds[2];
  if (pipe(fds) != 0) {
    snprintf(r->failure, sizeof r->failure, "pipe: %s", strerror(errno));
    cm_kernel_free(k);
    return;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    trial cr;
    candidate_job(c, k, stage, check, best_ms, &cr);
    ssize_t w = write(fds[1], &cr, sizeof cr);
    _exit(w == (ssize_t)sizeof cr ? 0 : 1);
  }
  close(fds[1]);
  cm_kernel_free(k);
  if (pid < 0) {
    snprintf(r->failure, sizeof r->failure, "fork: %s", strerror(errno));
    close(fds[0]);
    return;
  }
  trial got;
  bool timed_out;
  size_t have = read_trial(fds[0], &got, now_s() + TUNE_CHILD_SECONDS, &timed_out);
  close(fds[0]);
  if (timed_out) kill(pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (have == sizeof got) {
    *r = got;
    r->failure[sizeof r->failure - 1] = '\0';
  } else if (timed_out) {
    snprintf(r->failure, sizeof r->failure, "no result after %d s: killed", TUNE_CHILD_SECONDS);
  } else if (WIFSIGNALED(status)) {
    snprintf(r->failure, sizeof r->failure, "crashed: signal %d (%s)", WTERMSIG(status),
             strsignal(WTERMSIG(status)));
  } else {
    snprintf(r->failure, sizeof r->failure, "the child exited (status %d) before reporting",
             WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  }
}

/* Whether a forked child can run OpenMP: libgomp's thread pool does not survive fork, so once
 * this process has run a parallel region a child's first one hangs. A child tries one. */
static bool fork_usable(void) {
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    int n = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(2) reduction(+ : n)
    n += 1;
#else
    n = 1;
#endif
    _exit(n >= 1 ? 0 : 1);
  }
  if (pid < 0) return false;
  for (int i = 0; i < 200; i++) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) && !WEXITSTATUS(status);
    nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
  }
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  return false;
}

/* Measures (or checks) kernel k (owned), its stage `stage` planned as the candidate. */
static void measure(const tune_ctx *c, cm_kernel *k, int stage, bool check, double best_ms,
                    trial *r) {
  memset(r, 0, sizeof *r);
  if (c->emulated && !check) {
    r->ok = true;
    r->ms = cm_tune_model_cost(k, stage, c->t);
    r->runs = 1;
    cm_kernel_free(k);
    return;
  }
  if (c->fork)
    run_forked(c, k, stage, check, best_ms, r);
  else
    candidate_job(c, k, stage, check, best_ms, r);
}

/* ---- the search ------------------------------------------------------------------------------ */

/* A distinct tunable stage: kernels with the same structure share its key and its plan. */
typedef struct tune_item {
  int kernel, stage; /* its first occurrence */
  int count;         /* kernels of the program with this structure */
  char hash[65];
  cm_tune_space space;
  double cost; /* cm_tune_model_cost of the default, times count */
  char label[160];
} tune_item;

typedef struct tune_run {
  tune_ctx ctx;
  const cm_kprogram *kp;
  const cm_tune_opts *o;
  cm_tune_db *db;
  cm_tune_key key;
  cm_tune_stats *st;
  double t0, deadline; /* deadline 0: none */
  int done, total;     /* stages handled, of all */
  const cm_graph *g;   /* what cm_tune was given (measuring inside the step compiles it) */
  const cm_target *target;
  char (*kernel_hash)[65]; /* per kernel of kp, as lowered */
} tune_run;

static void progress(const tune_run *r, const char *label, int64_t at, int64_t of) {
  if (!r->o->progress) return;
  enum { WIDTH = 24 };
  int filled = r->total ? r->done * WIDTH / r->total : WIDTH;
  char bar[WIDTH + 1];
  for (int i = 0; i < WIDTH; i++) bar[i] = i < filled ? '#' : '.';
  bar[WIDTH] = '\0';
  bool tty = isatty(2);
  if (!tty && at > 1) return; /* a line per stage where the bar cannot be redrawn */
  char count[48] = "";        /* the candidate of the stage, when one is under way */
  if (of > 0) snprintf(count, sizeof count, " (%lld/%lld)", (long long)at, (long long)of);
  fprintf(stderr, "%stune [%s] %d/%d stages %4.0f s  %s%s%s", tty ? "\r\033[K" : "", bar, r->done,
          r->total, now_s() - r->t0, label, count, tty ? "" : "\n");
  fflush(stderr);
}

static cm_status record_trial(tune_run *r, const char *point, const trial *t, cm_err *err) {
  if (!r->db) return CM_OK;
  return cm_tune_db_put_trial(r->db, &r->key, point, t->ok ? t->ms : -1, t->ok ? NULL : t->failure,
                              err);
}

typedef struct measured {
  int64_t index;
  double ms;
} measured;

static int cmp_measured(const void *a, const void *b) {
  const measured *x = a, *y = b;
  if (x->ms != y->ms) return x->ms < y->ms ? -1 : 1;
  return x->index < y->index ? -1 : x->index > y->index; /* ties: the lower point index */
}

/* The index of point p in cm_tune_point_at's order (mixed radix, the first knob fastest, each
 * knob's digit counted from its default); -1 when a value is not a candidate. */
static int64_t point_index(const cm_tune_space *s, const cm_tune_point *p) {
  int64_t index = 0, scale = 1;
  for (int k = 0; k < s->n_knobs; k++) {
    const cm_tune_knob *kn = &s->knobs[k];
    int at = -1;
    for (int v = 0; v < kn->n_values; v++)
      if (kn->values[v] == p->value[k]) at = v;
    if (at < 0) return -1;
    index += scale * ((at - kn->default_index + kn->n_values) % kn->n_values);
    scale *= kn->n_values;
  }
  return index;
}

/* What the search of one stage has measured. */
typedef struct stage_search {
  const tune_item *it;
  double deadline; /* 0: none */
  int64_t limit;   /* candidates at most */
  measured *m;     /* the candidates that ran, in the order they did */
  int n_m;
  int64_t *tried; /* every point index tried (pruned and failed ones too) */
  int64_t n_tried;
  double best;
} stage_search;

static bool search_over(stage_search *ss) {
  if (ss->n_tried >= ss->limit) return true;
  if (ss->n_tried > 0 && ss->deadline > 0 && now_s() > ss->deadline) return true;
  return false;
}

/* Measures point i of the stage unless it was tried; records the trial. */
static cm_status try_point(tune_run *r, stage_search *ss, int64_t i, cm_err *err) {
  for (int64_t q = 0; q < ss->n_tried; q++)
    if (ss->tried[q] == i) return CM_OK;
  if (search_over(ss)) return CM_OK;
  const tune_item *it = ss->it;
  ss->tried[ss->n_tried++] = i;
  progress(r, it->label, ss->n_tried, ss->limit);
  cm_tune_point p;
  cm_tune_point_at(&it->space, i, &p);
  char text[256];
  cm_tune_point_format(&it->space, &p, text, sizeof text);
  cm_kernel copy;
  cm_status st = kernel_copy(&r->kp->kernels[it->kernel], &copy, err);
  if (st != CM_OK) return st;
  trial t = {0};
  cm_err e = {0};
  st = cm_tune_apply(&copy, it->stage, r->ctx.t, &p, &e);
  if (st != CM_OK) {
    cm_kernel_free(&copy);
    if (st != CM_EINVALID) return cm_errorf(err, st, "%s: %s: %s", it->label, text, e.msg);
    snprintf(t.failure, sizeof t.failure, "pruned: %s", e.msg);
    r->st->pruned++;
  } else {
    measure(&r->ctx, &copy, it->stage, false, ss->best, &t);
    r->st->candidates++;
    if (!t.ok) r->st->failed++;
  }
  if ((st = record_trial(r, text, &t, err)) != CM_OK || !t.ok) return st;
  ss->m[ss->n_m++] = (measured){i, t.ms};
  if (ss->best <= 0 || t.ms < ss->best) ss->best = t.ms;
  return CM_OK;
}

static int64_t best_index(const stage_search *ss) {
  int best = 0;
  for (int j = 1; j < ss->n_m; j++)
    if (cmp_measured(&ss->m[j], &ss->m[best]) < 0) best = j;
  return ss->n_m ? ss->m[best].index : 0;
}

/* The indices of the MODEL_FIRST valid points cm_tune_model_cost ranks cheapest (ties: the lower
 * index) among the first MODEL_RANKED of the space, default excepted; returns how many. */
enum { MODEL_FIRST = 3, MODEL_RANKED = 8192 };
static int model_ranked(const tune_run *r, const tune_item *it, int64_t *best) {
  double cost[MODEL_FIRST];
  int n = 0;
  int64_t points = it->space.n_points < MODEL_RANKED ? it->space.n_points : MODEL_RANKED;
  for (int64_t i = 1; i < points; i++) {
    cm_kernel copy;
    cm_err e = {0};
    cm_tune_point p;
    cm_tune_point_at(&it->space, i, &p);
    if (kernel_copy(&r->kp->kernels[it->kernel], &copy, &e) != CM_OK) break;
    bool valid = cm_tune_apply(&copy, it->stage, r->ctx.t, &p, &e) == CM_OK;
    double c = valid ? cm_tune_model_cost(&copy, it->stage, r->ctx.t) : 0;
    cm_kernel_free(&copy);
    if (!valid || (n == MODEL_FIRST && c >= cost[n - 1])) continue;
    int at = n < MODEL_FIRST ? n++ : n - 1; /* insertion, keeping the earlier of equal costs */
    while (at > 0 && cost[at - 1] > c) cost[at] = cost[at - 1], best[at] = best[at - 1], at--;
    cost[at] = c, best[at] = i;
  }
  return n;
}

/* The default, the model's cheapest few, then coordinate descent from the best measured: each
 * knob in turn swept with the others at the best point so far, until a pass changes nothing. */
static cm_status descend(tune_run *r, stage_search *ss, cm_err *err) {
  const cm_tune_space *s = &ss->it->space;
  cm_status st = try_point(r, ss, 0, err);
  int64_t first[MODEL_FIRST];
  int n_first = search_over(ss) ? 0 : model_ranked(r, ss->it, first);
  for (int j = 0; j < n_first && st == CM_OK; j++) st = try_point(r, ss, first[j], err);
  for (int64_t before = -1; st == CM_OK && before != best_index(ss) && !search_over(ss);) {
    before = best_index(ss);
    for (int k = 0; k < s->n_knobs && st == CM_OK; k++) {
      cm_tune_point p;
      cm_tune_point_at(s, best_index(ss), &p);
      for (int v = 0; v < s->knobs[k].n_values && st == CM_OK; v++) {
        p.value[k] = s->knobs[k].values[v];
        st = try_point(r, ss, point_index(s, &p), err);
      }
    }
  }
  return st;
}

/* Measures candidates of item it until the limit or the stage's share of the budget: every
 * point in order on the emulated device (a model's cost) or when they are few, else the model's
 * cheapest few and a coordinate descent. The default (point 0) always runs. */
static cm_status measure_candidates(tune_run *r, stage_search *ss, cm_err *err) {
  enum { EXHAUSTIVE_UP_TO = 24 };
  int64_t n = ss->it->space.n_points;
  if (r->ctx.emulated || n <= EXHAUSTIVE_UP_TO) {
    cm_status st = CM_OK;
    for (int64_t i = 0; i < n && st == CM_OK && !search_over(ss); i++)
      st = try_point(r, ss, i, err);
    return st;
  }
  return descend(r, ss, err);
}

/* Of the candidates m[0..n_m) of item it (default_ms: the default's time, -1: not measured),
 * the fastest that agrees with the oracle becomes the best, in the database and the stats. */
static cm_status finish_item(tune_run *r, const tune_item *it, measured *m, int n_m,
                             double default_ms, double weight, cm_err *err) {
  cm_status st = CM_OK;
  qsort(m, (size_t)n_m, sizeof *m, cmp_measured);
  for (int j = 0; st == CM_OK && default_ms >= 0 && j < n_m; j++) {
    cm_tune_point p;
    cm_tune_point_at(&it->space, m[j].index, &p);
    char text[256];
    cm_tune_point_format(&it->space, &p, text, sizeof text);
    /* the default is the plan every run without tuning uses (and the tests check) */
    trial t = {.ok = true};
    if (m[j].index != 0) {
      cm_kernel copy;
      if ((st = kernel_copy(&r->kp->kernels[it->kernel], &copy, err)) != CM_OK) break;
      cm_err e = {0};
      if (cm_tune_apply(&copy, it->stage, r->ctx.t, &p, &e) != CM_OK) {
        cm_kernel_free(&copy);
        continue;
      }
      measure(&r->ctx, &copy, it->stage, true, 0, &t);
    }
    if (!t.ok) {
      r->st->failed++;
      st = record_trial(r, text, &t, err);
      continue;
    }
    if (r->db) st = cm_tune_db_put_best(r->db, &r->key, text, m[j].ms, default_ms, it->label, err);
    r->st->searched++;
    r->st->default_ms += default_ms * weight;
    r->st->tuned_ms += m[j].ms * weight;
    break;
  }
  return st;
}

/* Searches item it: the fastest candidate that agrees with the oracle becomes the best. */
static cm_status search_item(tune_run *r, const tune_item *it, double stage_deadline, cm_err *err) {
  int64_t n = it->space.n_points;
  if (r->o->max_candidates > 0 && n > r->o->max_candidates) n = r->o->max_candidates;
  stage_search ss = {.it = it, .deadline = stage_deadline, .limit = n};
  ss.m = malloc(sizeof *ss.m * (size_t)(n + 1));
  ss.tried = malloc(sizeof *ss.tried * (size_t)(n + 1));
  if (!ss.m || !ss.tried) {
    free(ss.m);
    free(ss.tried);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  cm_status st = measure_candidates(r, &ss, err);
  free(ss.tried);
  double default_ms = ss.n_m > 0 && ss.m[0].index == 0 ? ss.m[0].ms : -1;
  if (st == CM_OK) st = finish_item(r, it, ss.m, ss.n_m, default_ms, it->count, err);
  free(ss.m);
  return st;
}

static int cmp_items(const void *a, const void *b) {
  const tune_item *x = a, *y = b;
  if (x->cost != y->cost) return x->cost > y->cost ? -1 : 1; /* most expensive first */
  if (x->kernel != y->kernel) return x->kernel < y->kernel ? -1 : 1;
  return x->stage < y->stage ? -1 : x->stage > y->stage;
}

/* The distinct tunable stages of kp (by structural hash and stage), most expensive first; the
 * first max_stages of them (0: all). */
static cm_status collect_items(const cm_kprogram *kp, const cm_target *t, int max_stages,
                               tune_item **out, int *n_out, cm_err *err) {
  int cap = 16, n = 0;
  tune_item *items = malloc(sizeof *items * (size_t)cap);
  if (!items) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    char hash[65] = "";
    for (int s = 0; s < k->n_stages; s++) {
      cm_tune_space space;
      cm_err e = {0};
      if (cm_tune_space_of(k, s, t, &space, &e) != CM_OK || space.n_knobs == 0) continue;
      if (!hash[0]) cm_kernel_structural_hash(k, hash);
      double cost = cm_tune_model_cost(k, s, t);
      int q = 0;
      while (q < n && !(items[q].stage == s && strcmp(items[q].hash, hash) == 0)) q++;
      if (q < n) {
        items[q].count++;
        items[q].cost += cost;
        continue;
      }
      if (n == cap) {
        tune_item *grown = realloc(items, sizeof *items * (size_t)(cap *= 2));
        if (!grown) return free(items), cm_errorf(err, CM_EINTERNAL, "out of memory");
        items = grown;
      }
      tune_item *it = &items[n++];
      memset(it, 0, sizeof *it);
      it->kernel = i, it->stage = s, it->count = 1, it->space = space, it->cost = cost;
      memcpy(it->hash, hash, sizeof it->hash);
      stage_label(k, s, it->label, sizeof it->label);
    }
  }
  qsort(items, (size_t)n, sizeof *items, cmp_items);
  if (max_stages > 0 && n > max_stages) n = max_stages;
  *out = items;
  *n_out = n;
  return CM_OK;
}

/* The items from the database, then the others searched in order, each with its share of what
 * is left of the budget (by cost). */
static cm_status tune_items(tune_run *r, tune_item *items, int n, cm_err *err) {
  bool *cached = calloc((size_t)n + 1, sizeof *cached);
  if (!cached) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_status st = CM_OK;
  double left_cost = 0;
  for (int i = 0; i < n && st == CM_OK; i++) {
    memcpy(r->key.kernel, items[i].hash, sizeof r->key.kernel);
    r->key.stage = items[i].stage;
    char text[256];
    double best_ms = 0;
    if (r->db)
      st = cm_tune_db_get_best(r->db, &r->key, text, sizeof text, &best_ms, &cached[i], err);
    if (cached[i]) {
      r->st->from_db++;
      r->done++;
    } else {
      left_cost += items[i].cost;
    }
  }
  for (int i = 0; i < n && st == CM_OK; i++) {
    if (cached[i]) continue;
    double now = now_s(), stage_deadline = 0;
    if (r->deadline > 0) {
      if (now >= r->deadline) {
        r->st->over_budget++;
        continue;
      }
      double share = left_cost > 0 ? items[i].cost / left_cost : 1;
      stage_deadline = now + (r->deadline - now) * share;
    }
    left_cost -= items[i].cost;
    memcpy(r->key.kernel, items[i].hash, sizeof r->key.kernel);
    r->key.stage = items[i].stage;
    st = search_item(r, &items[i], stage_deadline, err);
    r->done++;
  }
  free(cached);
  return st;
}

/* ---- measuring inside the step ------------------------------------------------------------
 * Rounds: each stage still searching proposes its next candidate (the default, the model's
 * cheapest few, then the coordinate descent, as descend() orders them), a forked child compiles
 * the whole program with every proposal applied, runs it STEP_RUNS times after a warm-up on
 * the caller's step sources, and reports each stage's median time per kernel; the candidates
 * thus run with the data, the neighbours and the caches of a real step. A round that fails
 * (a compile error, a crash) fails every candidate in it. */

enum { STEP_RUNS = 5, STEP_EXHAUSTIVE_UP_TO = 24 };

typedef struct step_state {
  tune_item *it;
  stage_search ss;
  int phase; /* 0: the default, 1: the model's few, 2: the descent, 3: every point, 4: done */
  int64_t first[MODEL_FIRST], next_exhaustive;
  int n_first, at_first, knob, value;
  int64_t pass_best; /* the best when the descent's pass began */
  int64_t proposed;  /* this round's point, -1: none */
  cm_tune_point point;
} step_state;

static bool step_tried(const step_state *s, int64_t i) {
  for (int64_t q = 0; q < s->ss.n_tried; q++)
    if (s->ss.tried[q] == i) return true;
  return false;
}

/* The next point of the state's order not tried yet, -1 at its end. */
static int64_t step_order_next(const tune_run *r, step_state *s) {
  const cm_tune_space *sp = &s->it->space;
  for (;;) {
    int64_t i;
    if (s->phase == 0) {
      i = 0;
      if (sp->n_points <= STEP_EXHAUSTIVE_UP_TO) {
        s->phase = 3, s->next_exhaustive = 1;
      } else {
        s->phase = 1;
        s->n_first = model_ranked(r, s->it, s->first);
      }
    } else if (s->phase == 3) {
      if (s->next_exhaustive >= sp->n_points) return -1;
      i = s->next_exhaustive++;
    } else if (s->phase == 1) {
      if (s->at_first < s->n_first) {
        i = s->first[s->at_first++];
      } else {
        s->phase = 2, s->knob = s->value = 0, s->pass_best = best_index(&s->ss);
        continue;
      }
    } else if (s->phase == 2) {
      if (s->knob >= sp->n_knobs) {
        if (best_index(&s->ss) == s->pass_best) return -1;
        s->knob = s->value = 0, s->pass_best = best_index(&s->ss);
        continue;
      }
      if (s->value >= sp->knobs[s->knob].n_values) {
        s->knob++, s->value = 0;
        continue;
      }
      cm_tune_point p;
      cm_tune_point_at(sp, best_index(&s->ss), &p);
      p.value[s->knob] = sp->knobs[s->knob].values[s->value++];
      i = point_index(sp, &p);
    } else {
      return -1;
    }
    if (i >= 0 && !step_tried(s, i)) return i;
  }
}

/* Proposes the state's next valid candidate (s->proposed; -1: its search is over), recording
 * the invalid ones it passes as pruned. */
static cm_status step_propose(tune_run *r, step_state *s, cm_err *err) {
  s->proposed = -1;
  while (s->phase != 4 && !search_over(&s->ss)) {
    int64_t i = step_order_next(r, s);
    if (i < 0) break;
    s->ss.tried[s->ss.n_tried++] = i;
    cm_tune_point_at(&s->it->space, i, &s->point);
    cm_kernel copy;
    cm_status st = kernel_copy(&r->kp->kernels[s->it->kernel], &copy, err);
    if (st != CM_OK) return st;
    cm_err e = {0};
    st = cm_tune_apply(&copy, s->it->stage, r->ctx.t, &s->point, &e);
    cm_kernel_free(&copy);
    if (st == CM_OK) {
      s->proposed = i;
      return CM_OK;
    }
    char text[256];
    cm_tune_point_format(&s->it->space, &s->point, text, sizeof text);
    if (st != CM_EINVALID) return cm_errorf(err, st, "%s: %s: %s", s->it->label, text, e.msg);
    trial t = {0};
    snprintf(t.failure, sizeof t.failure, "pruned: %s", e.msg);
    r->st->pruned++;
    memcpy(r->key.kernel, s->it->hash, sizeof r->key.kernel);
    r->key.stage = s->it->stage;
    if ((st = record_trial(r, text, &t, err)) != CM_OK) return st;
  }
  s->phase = 4;
  return CM_OK;
}

typedef struct step_round {
  const tune_run *r;
  step_state *states;
  int n;
  /* Which state a kernel's time goes to: owner[kernel] is the one state planning the kernel (its
   * whole time counts: a K split's reduction stage, an epilogue), -1 none, -2 several; then
   * owner_stage[kernel * STEP_STAGES + stage] says per stage (as lowered: a stage that a split
   * adds or removes counts where its index falls). instances[state]: its kernels. */
  int *owner, *owner_stage, *instances;
  int n_kernels;
} step_round;
enum { STEP_STAGES = 16 };

/* cm_compile's replan hook in the round's child: every kernel with a proposing state's
 * structure (kernels are numbered as in r->kp) gets the proposal. */
static cm_status step_replan(cm_kprogram *kp, const cm_target *t, void *ctx, cm_err *err) {
  step_round *rd = ctx;
  if (kp->n_kernels != rd->n_kernels)
    return cm_errorf(err, CM_EINTERNAL, "tune: the step lowered to %d kernels, not %d",
                     kp->n_kernels, rd->n_kernels);
  for (int i = 0; i < kp->n_kernels; i++) {
    rd->owner[i] = -1;
    for (int x = 0; x < STEP_STAGES; x++) rd->owner_stage[i * STEP_STAGES + x] = -1;
    for (int q = 0; q < rd->n; q++) {
      step_state *s = &rd->states[q];
      if (s->proposed < 0 || strcmp(rd->r->kernel_hash[i], s->it->hash) != 0) continue;
      cm_kernel copy;
      cm_status st = kernel_copy(&kp->kernels[i], &copy, err);
      if (st == CM_OK) st = cm_tune_apply(&copy, s->it->stage, t, &s->point, err);
      if (st != CM_OK) return st;
      cm_kernel_free(&kp->kernels[i]);
      kp->kernels[i] = copy;
      rd->owner[i] = rd->owner[i] == -1 ? q : -2;
      if (s->it->stage < STEP_STAGES) rd->owner_stage[i * STEP_STAGES + s->it->stage] = q;
      rd->instances[q]++;
    }
  }
  return CM_OK;
}

typedef struct step_result {
  bool ok;
  char failure[240];
  double ms[]; /* per state: its median ms per kernel, -1: not proposed */
} step_result;

/* The round's child: compile, warm up, STEP_RUNS timed runs; fills res. */
static void step_round_run(step_round *rd, step_result *res) {
  const tune_run *r = rd->r;
  cm_compile_opts co = r->ctx.co;
  co.profile = true;
  co.compile_only = co.render_only = false;
  co.replan = step_replan;
  co.replan_ctx = rd;
  cm_program *pr = NULL;
  cm_err e = {0};
  double *runs = calloc((size_t)rd->n * STEP_RUNS + 1, sizeof *runs);
  if (!runs) {
    snprintf(res->failure, sizeof res->failure, "out of memory");
  } else if (cm_compile(r->g, r->target, &co, &pr, &e) != CM_OK) {
    snprintf(res->failure, sizeof res->failure, "compile: %s", e.msg);
  } else if (cm_program_run(pr, r->o->step_sources, NULL, &e) != CM_OK) {
    snprintf(res->failure, sizeof res->failure, "run: %s", e.msg);
  } else {
    const cm_stage_profile *sp;
    int n_sp = cm_program_stage_profile(pr, &sp);
    double *before = calloc((size_t)n_sp + 1, sizeof *before);
    res->ok = before != NULL;
    for (int j = 0; res->ok && j < STEP_RUNS; j++) {
      for (int x = 0; x < n_sp; x++) before[x] = sp[x].total_ms;
      if (cm_program_run(pr, r->o->step_sources, NULL, &e) != CM_OK) {
        snprintf(res->failure, sizeof res->failure, "run: %s", e.msg);
        res->ok = false;
        break;
      }
      n_sp = cm_program_stage_profile(pr, &sp);
      for (int x = 0; x < n_sp; x++) {
        int k = sp[x].kernel_index, q = k < rd->n_kernels ? rd->owner[k] : -1;
        if (q == -2)
          q = sp[x].stage_index < STEP_STAGES ? rd->owner_stage[k * STEP_STAGES + sp[x].stage_index]
                                              : -1;
        if (q >= 0) runs[q * STEP_RUNS + j] += sp[x].total_ms - before[x];
      }
    }
    free(before);
    for (int q = 0; res->ok && q < rd->n; q++) {
      res->ms[q] = -1;
      if (rd->instances[q] == 0) continue;
      qsort(runs + q * STEP_RUNS, STEP_RUNS, sizeof *runs, cmp_double);
      res->ms[q] = runs[q * STEP_RUNS + STEP_RUNS / 2] / rd->instances[q];
    }
  }
  cm_program_free(pr);
  free(runs);
}

/* One round in a forked child (or here, when children cannot run OpenMP); res as above. */
static void step_round_measure(step_round *rd, step_result *res, size_t res_size) {
  memset(res, 0, res_size);
  if (!rd->r->ctx.fork) {
    step_round_run(rd, res);
    return;
  }
  int fds[2];
  if (pipe(fds) != 0) {
    snprintf(res->failure, sizeof res->failure, "pipe: %s", strerror(errno));
    return;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    step_round_run(rd, res);
    ssize_t w = write(fds[1], res, res_size);
    _exit(w == (ssize_t)res_size ? 0 : 1);
  }
  close(fds[1]);
  if (pid < 0) {
    snprintf(res->failure, sizeof res->failure, "fork: %s", strerror(errno));
    close(fds[0]);
    return;
  }
  size_t have = 0;
  double deadline = now_s() + TUNE_CHILD_SECONDS;
  while (have < res_size) {
    struct pollfd pf = {fds[0], POLLIN, 0};
    int left_ms = (int)((deadline - now_s()) * 1000);
    if (left_ms <= 0 || poll(&pf, 1, left_ms) <= 0) break;
    ssize_t got = read(fds[0], (char *)res + have, res_size - have);
    if (got <= 0) break;
    have += (size_t)got;
  }
  close(fds[0]);
  if (have < res_size) kill(pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (have < res_size) {
    res->ok = false;
    if (WIFSIGNALED(status))
      snprintf(res->failure, sizeof res->failure, "the step crashed: signal %d (%s)",
               WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
      snprintf(res->failure, sizeof res->failure, "the step gave no result");
  }
}

/* Records the round's results in the states and the database. */
static cm_status step_round_record(tune_run *r, step_round *rd, const step_result *res,
                                   cm_err *err) {
  cm_status st = CM_OK;
  for (int q = 0; q < rd->n && st == CM_OK; q++) {
    step_state *s = &rd->states[q];
    if (s->proposed < 0) continue;
    trial t = {
        .ok = res->ok && res->ms[q] >= 0, .ms = res->ok ? res->ms[q] : -1, .runs = STEP_RUNS};
    if (!t.ok) snprintf(t.failure, sizeof t.failure, "%s", res->ok ? "not timed" : res->failure);
    char text[256];
    cm_tune_point_format(&s->it->space, &s->point, text, sizeof text);
    memcpy(r->key.kernel, s->it->hash, sizeof r->key.kernel);
    r->key.stage = s->it->stage;
    r->st->candidates++;
    if (!t.ok) r->st->failed++;
    st = record_trial(r, text, &t, err);
    if (t.ok) {
      s->ss.m[s->ss.n_m++] = (measured){s->proposed, t.ms};
      if (s->ss.best <= 0 || t.ms < s->ss.best) s->ss.best = t.ms;
    } else if (s->proposed == 0) {
      s->phase = 4; /* without the default's time nothing can be compared */
    }
  }
  return st;
}

/* The stages of items[0..n) not in the database, searched in rounds inside the step. */
static cm_status tune_in_step(tune_run *r, tune_item *items, int n, cm_err *err) {
  step_round rd = {.r = r, .n_kernels = r->kp->n_kernels};
  rd.states = calloc((size_t)n + 1, sizeof *rd.states);
  rd.owner = malloc(sizeof *rd.owner * ((size_t)rd.n_kernels + 1));
  rd.owner_stage = malloc(sizeof *rd.owner_stage * ((size_t)rd.n_kernels * STEP_STAGES + 1));
  rd.instances = malloc(sizeof *rd.instances * ((size_t)n + 1));
  size_t res_size = sizeof(step_result) + sizeof(double) * (size_t)(n + 1);
  step_result *res = malloc(res_size);
  cm_status st = rd.states && rd.owner && rd.owner_stage && rd.instances && res
                     ? CM_OK
                     : cm_errorf(err, CM_EINTERNAL, "out of memory");
  for (int i = 0; i < n && st == CM_OK; i++) {
    memcpy(r->key.kernel, items[i].hash, sizeof r->key.kernel);
    r->key.stage = items[i].stage;
    char text[256];
    double best_ms = 0;
    bool cached = false;
    if (r->db) st = cm_tune_db_get_best(r->db, &r->key, text, sizeof text, &best_ms, &cached, err);
    if (cached) {
      r->st->from_db++, r->done++;
      continue;
    }
    step_state *s = &rd.states[rd.n++];
    int64_t limit = items[i].space.n_points;
    if (r->o->max_candidates > 0 && limit > r->o->max_candidates) limit = r->o->max_candidates;
    s->it = &items[i];
    s->ss = (stage_search){.it = &items[i], .limit = limit};
    s->ss.m = malloc(sizeof *s->ss.m * (size_t)(limit + 1));
    s->ss.tried = malloc(sizeof *s->ss.tried * (size_t)(limit + 1));
    if (!s->ss.m || !s->ss.tried) st = cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  for (int round = 1; st == CM_OK; round++) {
    int active = 0;
    for (int q = 0; q < rd.n && st == CM_OK; q++)
      if ((st = step_propose(r, &rd.states[q], err)) == CM_OK && rd.states[q].proposed >= 0)
        active++;
    if (st != CM_OK || active == 0) break;
    /* the last fifth of the budget is the chosen plans' checks against the oracle */
    if (r->deadline > 0 && now_s() >= r->deadline - 0.2 * (r->deadline - r->t0) && round > 1) break;
    char label[64];
    snprintf(label, sizeof label, "round %d: %d stages in the step", round, active);
    progress(r, label, 0, 0);
    memset(rd.instances, 0, sizeof *rd.instances * (size_t)(n + 1));
    step_round_measure(&rd, res, res_size);
    st = step_round_record(r, &rd, res, err);
  }
  for (int q = 0; q < rd.n; q++) {
    step_state *s = &rd.states[q];
    if (st == CM_OK) {
      memcpy(r->key.kernel, s->it->hash, sizeof r->key.kernel);
      r->key.stage = s->it->stage;
      double default_ms = s->ss.n_m > 0 && s->ss.m[0].index == 0 ? s->ss.m[0].ms : -1;
      r->done++;
      /* the budget ended before anything but the default ran: left for a later cm_tune */
      if (default_ms < 0 || (s->phase != 4 && s->ss.n_m <= 1))
        r->st->over_budget++;
      else /* the times are per kernel: the step spends count of them */
        st = finish_item(r, s->it, s->ss.m, s->ss.n_m, default_ms, s->it->count, err);
    }
    free(s->ss.m);
    free(s->ss.tried);
  }
  free(rd.states);
  free(rd.owner);
  free(rd.owner_stage);
  free(rd.instances);
  free(res);
  return st;
}

cm_status cm_tune(const cm_graph *g, const cm_target *target, const cm_compile_opts *co,
                  const cm_tune_opts *o, cm_tune_stats *st, cm_err *err) {
  memset(st, 0, sizeof *st);
  cm_tune_opts defaults = {0};
  if (!o) o = &defaults;
  tune_run r = {.o = o, .st = st, .t0 = now_s()};
  cm_tune_mode mode; /* a bad $CMAEC_TUNE is reported here too, whatever it would say */
  if (cm_tune_mode_resolve(co ? co->tune : CM_TUNE_FROM_ENV, &mode, err) != CM_OK)
    return err ? err->status : CM_EINVALID;
  if (o->budget_s > 0) r.deadline = r.t0 + o->budget_s;
  /* the program as lowered (no tuned plan), rendered by nothing */
  cm_compile_opts lo = co ? *co : (cm_compile_opts){0};
  lo.compile_only = lo.render_only = true;
  lo.profile = false;
  lo.tune = CM_TUNE_OFF;
  cm_program *pr = NULL;
  cm_status s = cm_compile(g, target, &lo, &pr, err);
  if (s != CM_OK) return s;
  const cm_target *t = cm_program_target(pr);
  if (t->kind == CM_TARGET_CPU && !t->cpu.runnable) {
    s = cm_cpu_target_not_runnable(&t->cpu, "cm_tune (candidates run on this host)", err);
    cm_program_free(pr);
    return s;
  }
  r.kp = cm_program_kernels(pr);
  r.ctx = (tune_ctx){cm_program_graph(pr),
                     cm_program_plan(pr),
                     cm_program_target(pr),
                     co ? *co : (cm_compile_opts){0},
                     false,
                     false};
  if (r.ctx.t->kind == CM_TARGET_CUDA)
    r.ctx.emulated = is_emulated(tune_driver(co));
  else
    r.ctx.fork = fork_usable();
  tune_item *items = NULL;
  int n = 0;
  s = collect_items(r.kp, r.ctx.t, o->max_stages, &items, &n, err);
  if (s == CM_OK) s = open_db(o->db_path, co, false, &r.db, err);
  if (s == CM_OK) {
    r.key.version = CM_TUNE_SPACE_VERSION;
    cm_tune_device_for(r.ctx.t, co, r.key.device, sizeof r.key.device);
    st->stages_tunable = r.total = n;
    bool in_step = o->step_sources && r.ctx.t->kind == CM_TARGET_CPU;
    r.g = g, r.target = target;
    r.kernel_hash = in_step ? calloc((size_t)r.kp->n_kernels + 1, sizeof *r.kernel_hash) : NULL;
    for (int i = 0; r.kernel_hash && i < r.kp->n_kernels; i++)
      cm_kernel_structural_hash(&r.kp->kernels[i], r.kernel_hash[i]);
    if (in_step && !r.kernel_hash)
      s = cm_errorf(err, CM_EINTERNAL, "out of memory");
    else
      s = in_step ? tune_in_step(&r, items, n, err) : tune_items(&r, items, n, err);
    free(r.kernel_hash);
  }
  if (o->progress && r.total > 0) {
    progress(&r, "done", 0, 0);
    fputc('\n', stderr);
  }
  st->seconds = now_s() - r.t0;
  if (r.db) cm_tune_db_close(r.db);
  free(items);
  cm_program_free(pr);
  return s;
}
