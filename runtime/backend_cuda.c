/* runtime/backend_cuda.c — the CUDA backend (cm_backend_cuda): a program's
 * kernels built as modules (cm_cuda_build_program: each distinct kernel once,
 * by a cm_cuda_compiler, through the on-disk cache) and run through a
 * cm_cuda_driver (libcuda, or the tests' emulated device). The whole program's
 * CUDA C (prelude once, every kernel under its own name) is rendered for
 * cm_program_emit.
 *
 * Execution: one device allocation holds the plan's arena, the scratch, the
 * STATUS words, the constants, every source and two landing slots for the
 * inputs. Inputs go host -> pinned slot -> landing slot on the copy stream
 * (fenced by an event), then to their place on the compute stream, so that
 * the next run's inputs can be uploaded (cm_program_prefetch) while a run
 * reads the current ones. Kernels run on the compute stream: the whole
 * program is captured once as a CUDA graph and replayed (CM_CUDA_GRAPHS_ON),
 * or launched stage by stage (graphs off, profiling, a part of the program). */
#include "runtime.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ALIGN 256 /* every region of the device allocation and of the staging buffers */

typedef struct cuda_kernel_rt {
  void **fns;             /* per stage; NULL: a stage that runs inside an earlier one's span */
  cm_cuda_launch *launch; /* per stage */
  cm_cu_ptr *ptrs;        /* per buffer: its device address */
  void **args;            /* per buffer: &ptrs[b], as launch_kernel takes them */
  void **host;            /* per buffer: the host copy buffer() returns (malloc'ed on demand) */
  long *host_run;         /* per buffer: the run that copy holds */
  void **events;          /* profile: n_stages + 1 events around the stages */
  int first_check, n_checks;
} cuda_kernel_rt;

/* A gather/scatter_add index check: its STATUS words (codegen.h), as word indices. */
typedef struct cuda_check {
  int node;
  int64_t key, val; /* -1 until found */
} cuda_check;

typedef struct cuda_source {
  int node;
  bool input, written; /* CM_OP_INPUT; assigned by a kernel */
  size_t bytes;
  size_t at;           /* in the device allocation */
  size_t slot_at;      /* inputs: in a landing / pinned slot; else -1 */
  size_t dl_at;        /* written: in the download staging */
  const char *host;    /* the host memory its device copy was last uploaded from */
  const char *slot[2]; /* inputs: the host memory each pinned slot holds a copy of */
} cuda_source;

typedef struct cuda_state {
  /* compiling */
  char *source;  /* the whole program: prelude, then every kernel */
  size_t *begin; /* per kernel (and one past the last): its text in source; the prelude is
                    source[0, begin[0]) */
  const cm_cuda_compiler *compiler;
  cm_cuda_build build;
  bool compiled; /* build holds the program's modules (not render_only) */
  /* the device */
  const cm_cuda_driver *d;
  int device; /* the driver's CUdevice */
  bool ctx_retained;
  void *ctx, *compute, *copy;
  void **modules;
  int n_loaded;
  cm_cuda_graphs graphs;
  bool profile, resident, ready; /* ready: allocated, may run */
  cuda_kernel_rt *ks;
  /* memory */
  cm_cu_ptr base; /* the one device allocation */
  size_t bytes;
  cm_cu_ptr arena, scratch, status, inputs, landing[2];
  int64_t n_status;
  size_t input_span; /* bytes from the first input to the end of the last */
  cuda_source *srcs;
  int n_srcs;
  void *slot[2]; /* pinned input staging */
  void *dl;      /* pinned download staging: the STATUS words, then the written sources */
  size_t dl_bytes;
  void *ev_up[2];       /* recorded on the copy stream after a slot's upload */
  void *ev_consumed[2]; /* recorded on the compute stream after a landing slot was read */
  bool up_recorded[2], consumed_recorded[2];
  int next_slot, pending_slot; /* pending: prefetched for the next start (-1: none) */
  cuda_check *checks;
  int n_checks;
  /* runs */
  long runs;
  int run_first, run_last;
  bool uploaded;        /* every source uploaded since alloc or states_changed */
  bool states_enqueued; /* the written sources' download is enqueued behind the kernels */
  bool states_current;  /* the host tensors hold the last run's states */
  void *graph, *graph_exec;
  cm_kernel_profile *prof;
  cm_stage_profile *sprof;
  int *sprof_first;
  int n_sprof;
  /* collectives (issue 18): NCCL on device pointers, other kinds through host staging */
  cm_comm *comm;
  bool has_collectives; /* the program runs kernel by kernel: no CUDA graph */
  int *wait_before;     /* per kernel with a collective stage: cm_kprogram_collective_wait */
  char (*what)[160];    /* per kernel: its collective's name in the comm's messages */
  cm_comm_request **pending_req;
  int *pending_wait;
  int n_pending;
  void *staging; /* host buffers of the staged collectives (input, then output) */
  size_t staging_bytes;
} cuda_state;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static size_t align_up(size_t x) {
  return (x + ALIGN - 1) / ALIGN * ALIGN;
}

/* cm_cuda_check with the call and its subject formatted only when it failed. */
__attribute__((format(printf, 4, 5))) static cm_status ck(const cuda_state *cs, int rc, cm_err *err,
                                                          const char *fmt, ...) {
  if (rc == 0) return CM_OK;
  char what[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  return cm_cuda_check(cs->d, rc, what, err);
}

static cm_status oom(cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL, "cuda backend: out of memory");
}

/* ---- compiling --------------------------------------------------------------- */

static cm_status render_program(cuda_state *cs, const cm_kprogram *kp, const cm_target *t,
                                bool no_templates, cm_err *err) {
  cs->begin = calloc((size_t)kp->n_kernels + 1, sizeof *cs->begin);
  if (!cs->begin) return oom(err);
  cm_cuda_render_opts ro = {t, no_templates};
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
  if (!cs->source && !(cs->source = calloc(1, 1))) return oom(err);
  cs->begin[kp->n_kernels] = strlen(cs->source);
  return CM_OK;
}

/* The driver, device bo->device, its primary context (current on this thread)
 * and the two streams; the device must run t's arch. */
static cm_status open_device(cuda_state *cs, const cm_cuda_backend_opts *bo, const cm_target *t,
                             cm_err *err) {
  cs->d = bo ? bo->driver : NULL;
  cm_status st = cs->d ? CM_OK : cm_cuda_driver_load(&cs->d, err);
  if (st != CM_OK) return cm_err_prefix(err, "cuda backend: ");
  const cm_cuda_driver *d = cs->d;
  int ordinal = bo ? bo->device : 0, count = 0;
  /* cm_cuda_driver_load has called it; a driver given in the options may not have */
  if ((st = ck(cs, d->init(0), err, "cuInit (%s)", d->name)) ||
      (st = ck(cs, d->device_get_count(&count), err, "cuDeviceGetCount (%s)", d->name)))
    return st;
  if (ordinal < 0 || ordinal >= count)
    return cm_errorf(err, CM_EINVALID, "cuda backend: device %d: the driver (%s) sees %d device%s",
                     ordinal, d->name, count, count == 1 ? "" : "s");
  int major = 0, minor = 0;
  char name[128] = "";
  if ((st = ck(cs, d->device_get(&cs->device, ordinal), err, "cuDeviceGet(%d)", ordinal)) ||
      (st = ck(cs, d->device_get_name(name, (int)sizeof name, cs->device), err,
               "cuDeviceGetName(%d)", ordinal)) ||
      (st = ck(cs, d->device_get_attribute(&major, CM_CU_ATTR_CC_MAJOR, cs->device), err,
               "cuDeviceGetAttribute(compute capability, device %d)", ordinal)) ||
      (st = ck(cs, d->device_get_attribute(&minor, CM_CU_ATTR_CC_MINOR, cs->device), err,
               "cuDeviceGetAttribute(compute capability, device %d)", ordinal)))
    return st;
  char arch[16];
  cm_cuda_arch_for(major, minor, arch, sizeof arch);
  if (strcmp(arch, t->arch) != 0)
    return cm_errorf(err, CM_EINVALID,
                     "cuda backend: the program is compiled for %s, but device %d (%s, compute "
                     "capability %d.%d) runs %s code",
                     t->arch, ordinal, name, major, minor, arch);
  if ((st = ck(cs, d->primary_ctx_retain(&cs->ctx, cs->device), err,
               "cuDevicePrimaryCtxRetain(device %d)", ordinal)))
    return st;
  cs->ctx_retained = true;
  if ((st = ck(cs, d->ctx_set_current(cs->ctx), err, "cuCtxSetCurrent(device %d)", ordinal)) ||
      (st = ck(cs, d->stream_create(&cs->compute, CM_CU_STREAM_NON_BLOCKING), err,
               "cuStreamCreate(compute)")) ||
      (st = ck(cs, d->stream_create(&cs->copy, CM_CU_STREAM_NON_BLOCKING), err,
               "cuStreamCreate(copy)")))
    return st;
  for (int j = 0; j < 2; j++)
    if ((st = ck(cs, d->event_create(&cs->ev_up[j], CM_CU_EVENT_DISABLE_TIMING), err,
                 "cuEventCreate")) ||
        (st = ck(cs, d->event_create(&cs->ev_consumed[j], CM_CU_EVENT_DISABLE_TIMING), err,
                 "cuEventCreate")))
      return st;
  return CM_OK;
}

/* Per-stage profile entries; flops: 2 per multiply-add of a reduction whose body
 * is a product (matmul, conv), as the CPU backend counts them. */
static cm_status init_profile(cuda_state *cs, const cm_kprogram *kp, cm_err *err) {
  int nk = kp->n_kernels;
  cs->prof = calloc((size_t)nk + 1, sizeof *cs->prof);
  cs->sprof_first = calloc((size_t)nk + 1, sizeof *cs->sprof_first);
  for (int i = 0; i < nk; i++) cs->n_sprof += kp->kernels[i].n_stages;
  cs->sprof = calloc((size_t)cs->n_sprof + 1, sizeof *cs->sprof);
  if (!cs->prof || !cs->sprof_first || !cs->sprof) return oom(err);
  for (int i = 0, at = 0; i < nk; i++) {
    const cm_kernel *k = &kp->kernels[i];
    cs->sprof_first[i] = at;
    cs->prof[i].name = k->name;
    cs->prof[i].kind = k->kind;
    for (int s = 0; s < k->n_stages; s++, at++) {
      const cm_kstage *ks = &k->stages[s];
      cm_stage_profile *sp = &cs->sprof[at];
      sp->kernel = k->name;
      sp->stage = ks;
      sp->kernel_index = i;
      sp->stage_index = s;
      sp->work_items = cm_kstage_work_items(ks);
      if (ks->n_red > 0 && ks->body >= 0 && ks->exprs[ks->body].kind == CM_KX_OP &&
          ks->exprs[ks->body].op == CM_OP_MUL) {
        double f = 2;
        for (int v = 0; v < ks->n_dom; v++) f *= (double)ks->dom[v];
        for (int v = 0; v < ks->n_red; v++) f *= (double)ks->red[v];
        sp->flops = f;
        cs->prof[i].flops += f;
      }
    }
  }
  return CM_OK;
}

/* Every module loaded, every stage function resolved with its launch, the
 * opt-in for dynamic shared memory above the static limit set. */
static cm_status load_modules(cuda_state *cs, const cm_kprogram *kp, const cm_target *t,
                              bool no_templates, cm_err *err) {
  const cm_cuda_driver *d = cs->d;
  cm_status st;
  cs->modules = calloc((size_t)cs->build.n_modules + 1, sizeof *cs->modules);
  cs->ks = calloc((size_t)kp->n_kernels + 1, sizeof *cs->ks);
  if (!cs->modules || !cs->ks) return oom(err);
  for (int m = 0; m < cs->build.n_modules; m++, cs->n_loaded++)
    if ((st = ck(cs, d->module_load_data(&cs->modules[m], cs->build.modules[m].image.data), err,
                 "cuModuleLoadData(kernel %s)", kp->kernels[cs->build.modules[m].kernel].name)))
      return st;
  cm_cuda_render_opts ro = {t, no_templates};
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    cuda_kernel_rt *r = &cs->ks[i];
    r->fns = calloc((size_t)k->n_stages + 1, sizeof *r->fns);
    r->launch = calloc((size_t)k->n_stages + 1, sizeof *r->launch);
    r->ptrs = calloc((size_t)k->n_buffers + 1, sizeof *r->ptrs);
    r->args = calloc((size_t)k->n_buffers + 1, sizeof *r->args);
    r->host = calloc((size_t)k->n_buffers + 1, sizeof *r->host);
    r->host_run = calloc((size_t)k->n_buffers + 1, sizeof *r->host_run);
    if (!r->fns || !r->launch || !r->ptrs || !r->args || !r->host || !r->host_run) return oom(err);
    for (int b = 0; b < k->n_buffers; b++) r->args[b] = &r->ptrs[b];
    for (int s = 0; s < k->n_stages; s++) {
      r->launch[s] = cm_cuda_stage_launch(k, s, &ro);
      if (k->stages[s].cuda.kind == CM_KCUDA_IN_SPAN) continue; /* its function returns at once */
      char fn[64];
      snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, s);
      void *module =
          cs->modules[cm_cuda_stage_module(&cs->build, i, s)]; /* a split kernel's part */
      if ((st = ck(cs, d->module_get_function(&r->fns[s], module, fn), err,
                   "cuModuleGetFunction(%s, kernel %s stage %d)", fn, k->name, s)))
        return st;
      unsigned dyn = r->launch[s].shared_bytes;
      if (dyn > 0 && (int64_t)dyn + k->stages[s].cuda.shared_static > t->shared_bytes_static &&
          (st = ck(cs,
                   d->func_set_attribute(r->fns[s], CM_CU_FUNC_MAX_DYNAMIC_SHARED_BYTES, (int)dyn),
                   err, "cuFuncSetAttribute(max dynamic shared memory %u, kernel %s stage %d)", dyn,
                   k->name, s)))
        return st;
    }
  }
  return CM_OK;
}

/* The collective stages' waits and names; a program with any runs kernel by kernel. */
static cm_status plan_collectives(cuda_state *cs, const cm_kprogram *kp, const cm_graph *g,
                                  cm_comm *comm, cm_err *err) {
  int nk = kp->n_kernels;
  cs->comm = comm;
  cs->wait_before = calloc((size_t)nk + 1, sizeof *cs->wait_before);
  cs->what = calloc((size_t)nk + 1, sizeof *cs->what);
  cs->pending_req = calloc((size_t)nk + 1, sizeof *cs->pending_req);
  cs->pending_wait = calloc((size_t)nk + 1, sizeof *cs->pending_wait);
  if (!cs->wait_before || !cs->what || !cs->pending_req || !cs->pending_wait) return oom(err);
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &kp->kernels[i];
    for (int s = 0; s < k->n_stages; s++) {
      const cm_kcollective *x = &k->stages[s].coll;
      if (x->op == CM_KCOLL_NONE) continue;
      cs->has_collectives = true;
      cs->wait_before[i] = cm_kprogram_collective_wait(kp, i, s);
      cm_kcollective_name(k, s, g, cs->what[i], sizeof cs->what[i]);
      size_t bytes = (size_t)(k->buffers[x->in_buf].numel + k->buffers[x->out_buf].numel) *
                     cm_dtype_size(k->buffers[x->in_buf].dtype);
      if (bytes > cs->staging_bytes) cs->staging_bytes = bytes;
    }
  }
  return CM_OK;
}

static cm_status cuda_compile(cm_program *p, const cm_compile_opts *opts, cm_program_stats *stats,
                              cm_err *err) {
  const cm_target *t = cm_program_target(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  if (t->kind != CM_TARGET_CUDA)
    return cm_errorf(err, CM_EINVALID, "cuda backend: the target is not a CUDA GPU (%s)", t->arch);
  cuda_state *cs = calloc(1, sizeof *cs);
  if (!cs) return oom(err);
  cm_program_set_impl(p, cs);
  cs->pending_slot = -1;
  double t0 = now_ms();
  cm_status st = render_program(cs, kp, t, opts->no_templates, err);
  if (st != CM_OK) return st;
  stats->render_ms = now_ms() - t0;
  stats->n_distinct_kernels = kp->n_kernels;
  if (opts->render_only && opts->compile_only) return CM_OK;
  if (opts->render_only)
    return cm_errorf(err, CM_EINVALID, "cuda backend: render_only needs compile_only");
  const cm_cuda_backend_opts *bo = opts->backend_opts;
  cs->graphs = bo ? bo->graphs : CM_CUDA_GRAPHS_ON;
  cs->profile = opts->profile;
  cs->resident = opts->resident_states;
  /* the device first: a missing driver or a wrong arch costs no compile */
  if (!opts->compile_only && (st = open_device(cs, bo, t, err)) != CM_OK) return st;
  cs->compiler = bo ? bo->compiler : NULL;
  st = cs->compiler ? CM_OK : cm_cuda_compiler_nvrtc(&cs->compiler, err);
  char cbuf[4096];
  const char *cache = cm_cache_dir(opts->cache_dir, cbuf, sizeof cbuf);
  if (st == CM_OK)
    st = cm_cuda_build_program(kp, t, opts->no_templates, cs->compiler, cache,
                               bo ? bo->compile_threads : 0, &cs->build, err);
  cs->compiled = st == CM_OK;
  if (st != CM_OK) return st;
  stats->jit_ms = cs->build.compile_ms;
  stats->jit_modules = cs->build.n_modules;
  stats->n_distinct_kernels = cs->build.n_distinct;
  stats->cache_hits = cs->build.cache_hits;
  stats->cache_misses = cs->build.cache_misses;
  stats->object_bytes = cs->build.image_bytes;
  stats->threads = cs->build.threads;
  if (opts->compile_only) return CM_OK;
  if ((st = plan_collectives(cs, kp, cm_program_graph(p), opts->comm, err)) != CM_OK) return st;
  if ((st = load_modules(cs, kp, t, opts->no_templates, err)) != CM_OK) return st;
  if (cs->profile && (st = init_profile(cs, kp, err)) != CM_OK) return st;
  stats->runnable = true;
  return CM_OK;
}

/* ---- memory -------------------------------------------------------------- */

static bool is_source_op(cm_op op) {
  return op == CM_OP_INPUT || op == CM_OP_PARAM || op == CM_OP_STATE;
}

/* The sources (inputs first, so that they are one span), each with its place in the device
 * allocation from *at on, and in the pinned slots and download staging. */
static cm_status plan_sources(cuda_state *cs, const cm_graph *rg, const cm_kprogram *kp, size_t *at,
                              cm_err *err) {
  cs->srcs = calloc((size_t)rg->n_nodes + 1, sizeof *cs->srcs);
  if (!cs->srcs) return oom(err);
  for (int pass = 0; pass < 2; pass++)
    for (int v = 0; v < rg->n_nodes; v++) {
      const cm_node *n = &rg->nodes[v];
      if (!is_source_op(n->op) || (n->op == CM_OP_INPUT) != (pass == 0)) continue;
      cuda_source *s = &cs->srcs[cs->n_srcs++];
      s->node = v;
      s->input = n->op == CM_OP_INPUT;
      s->bytes = cm_type_nbytes(&n->type);
      for (int i = 0; i < kp->n_kernels; i++)
        for (int b = 0; b < kp->kernels[i].n_buffers; b++) {
          const cm_kbuffer *kb = &kp->kernels[i].buffers[b];
          s->written |= kb->kind == CM_KBUF_SOURCE && kb->node == v && kb->written;
        }
    }
  size_t dl_at = align_up((size_t)cs->n_status * sizeof(int64_t));
  size_t in_begin = *at;
  for (int i = 0; i < cs->n_srcs; i++) {
    cuda_source *s = &cs->srcs[i];
    s->at = *at;
    *at = align_up(*at + s->bytes);
    s->slot_at = s->input ? s->at - in_begin : (size_t)-1;
    if (s->input) cs->input_span = s->at + s->bytes - in_begin;
    if (s->written) {
      s->dl_at = dl_at;
      dl_at = align_up(dl_at + s->bytes);
    }
  }
  cs->dl_bytes = dl_at;
  return CM_OK;
}

/* The STATUS words of kernel i into its checks; returns the next free word. */
static int64_t place_status(cuda_state *cs, const cm_kernel *k, int i, int64_t word) {
  cuda_kernel_rt *r = &cs->ks[i];
  r->first_check = cs->n_checks;
  for (int b = 0; b < k->n_buffers; b++) {
    const cm_kbuffer *kb = &k->buffers[b];
    if (kb->kind != CM_KBUF_STATUS) continue;
    r->ptrs[b] = cs->status + (cm_cu_ptr)word * sizeof(int64_t);
    int c = r->first_check;
    while (c < cs->n_checks && cs->checks[c].node != kb->node) c++;
    if (c == cs->n_checks) cs->checks[cs->n_checks++] = (cuda_check){kb->node, -1, -1};
    if (kb->offset == 0)
      cs->checks[c].key = word;
    else
      cs->checks[c].val = word;
    word += kb->numel;
  }
  r->n_checks = cs->n_checks - r->first_check;
  return word;
}

/* Every constant into the allocation from *at on (uploaded now, once). */
static cm_status place_consts(cuda_state *cs, const cm_graph *rg, const cm_kprogram *kp, size_t *at,
                              bool upload, cm_err *err) {
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      if (kb->kind != CM_KBUF_CONST) continue;
      size_t bytes = (size_t)kb->numel * cm_dtype_size(kb->dtype);
      if (upload) {
        void *data = cm_kernel_const_data(rg, kb, err);
        if (!data)
          return err && err->status != CM_OK
                     ? err->status
                     : cm_errorf(err, CM_EINTERNAL, "kernel %s: const buffer %d has no data",
                                 k->name, b);
        cs->ks[i].ptrs[b] = cs->base + *at;
        /* pageable: the driver has copied it when the call returns; synchronized below */
        cm_status st =
            ck(cs, cs->d->memcpy_htod_async(cs->ks[i].ptrs[b], data, bytes, cs->compute), err,
               "cuMemcpyHtoDAsync(kernel %s const buffer %d, %zu bytes)", k->name, b, bytes);
        if (st == CM_OK)
          st = ck(cs, cs->d->stream_synchronize(cs->compute), err,
                  "cuStreamSynchronize(kernel %s const buffer %d)", k->name, b);
        free(data);
        if (st != CM_OK) return st;
      }
      *at = align_up(*at + bytes);
    }
  }
  return CM_OK;
}

static cm_status cuda_alloc_arena(cm_program *p, cm_program_stats *stats, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  const cm_kprogram *kp = cm_program_kernels(p);
  const cm_graph *rg = cm_program_graph(p);
  const cm_cuda_driver *d = cs->d;
  int nk = kp->n_kernels, n_checks = 0;
  cm_status st;
  for (int i = 0; i < nk; i++)
    for (int b = 0; b < kp->kernels[i].n_buffers; b++)
      if (kp->kernels[i].buffers[b].kind == CM_KBUF_STATUS) {
        cs->n_status += kp->kernels[i].buffers[b].numel;
        n_checks++;
      }
  cs->checks = calloc((size_t)n_checks + 1, sizeof *cs->checks);
  if (!cs->checks) return oom(err);
  /* the layout: arena, scratch, status, constants, sources (inputs first), two landing slots */
  size_t at = align_up((size_t)kp->arena_bytes);
  size_t scratch_at = at;
  at = align_up(at + (size_t)kp->max_scratch_bytes);
  size_t status_at = at;
  at = align_up(at + (size_t)cs->n_status * sizeof(int64_t));
  size_t consts_at = at;
  if ((st = place_consts(cs, rg, kp, &at, false, err)) != CM_OK) return st;
  if ((st = plan_sources(cs, rg, kp, &at, err)) != CM_OK) return st;
  size_t landing_at = at;
  at += 2 * align_up(cs->input_span);
  cs->bytes = at > 0 ? at : ALIGN;
  if ((st = ck(cs, d->mem_alloc(&cs->base, cs->bytes), err,
               "cuMemAlloc(%zu bytes: arena %lld, scratch %lld, sources, constants)", cs->bytes,
               (long long)kp->arena_bytes, (long long)kp->max_scratch_bytes)))
    return st;
  /* zeroed once, as the CPU backend's arena is: runs then start from the same bytes */
  if ((st = ck(cs, d->memset_d8_async(cs->base, 0, cs->bytes, cs->compute), err,
               "cuMemsetD8Async(%zu bytes)", cs->bytes)))
    return st;
  cs->arena = cs->base;
  cs->scratch = cs->base + scratch_at;
  cs->status = cs->base + status_at;
  cs->inputs = cs->n_srcs > 0 ? cs->base + cs->srcs[0].at : 0;
  for (int j = 0; j < 2; j++) cs->landing[j] = cs->base + landing_at + j * align_up(cs->input_span);
  for (int j = 0; j < 2 && cs->input_span > 0; j++)
    if ((st = ck(cs, d->mem_alloc_host(&cs->slot[j], cs->input_span), err,
                 "cuMemAllocHost(input staging, %zu bytes)", cs->input_span)))
      return st;
  if ((st = ck(cs, d->mem_alloc_host(&cs->dl, cs->dl_bytes > 0 ? cs->dl_bytes : ALIGN), err,
               "cuMemAllocHost(download staging, %zu bytes)", cs->dl_bytes)))
    return st;
  int *src_of = malloc(sizeof(int) * (size_t)(rg->n_nodes + 1));
  if (!src_of) return oom(err);
  for (int v = 0; v < rg->n_nodes; v++) src_of[v] = -1;
  for (int i = 0; i < cs->n_srcs; i++) src_of[cs->srcs[i].node] = i;
  int64_t word = 0;
  for (int i = 0; i < nk; i++) {
    const cm_kernel *k = &kp->kernels[i];
    word = place_status(cs, k, i, word);
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      if (kb->kind == CM_KBUF_ARENA) cs->ks[i].ptrs[b] = cs->arena + (cm_cu_ptr)kb->offset;
      if (kb->kind == CM_KBUF_SCRATCH) cs->ks[i].ptrs[b] = cs->scratch + (cm_cu_ptr)kb->offset;
      if (kb->kind == CM_KBUF_SOURCE && kb->node >= 0 && src_of[kb->node] >= 0)
        cs->ks[i].ptrs[b] = cs->base + cs->srcs[src_of[kb->node]].at;
    }
  }
  free(src_of);
  for (int c = 0; c < cs->n_checks; c++)
    if (cs->checks[c].key < 0 || cs->checks[c].val < 0)
      return cm_errorf(err, CM_EINTERNAL, "cuda backend: an index check lacks a status buffer");
  at = consts_at;
  if ((st = place_consts(cs, rg, kp, &at, true, err)) != CM_OK) return st;
  for (int i = 0; cs->profile && i < nk; i++) {
    int ns = kp->kernels[i].n_stages;
    if (!(cs->ks[i].events = calloc((size_t)ns + 2, sizeof(void *)))) return oom(err);
    for (int s = 0; s <= ns; s++)
      if ((st = ck(cs, d->event_create(&cs->ks[i].events[s], CM_CU_EVENT_DEFAULT), err,
                   "cuEventCreate(profile)")))
        return st;
  }
  /* the zeroing and the constants are done before the copy stream writes a landing slot */
  if ((st = ck(cs, d->stream_synchronize(cs->compute), err, "cuStreamSynchronize(allocating)")))
    return st;
  stats->arena_bytes = kp->arena_bytes;
  stats->scratch_bytes = kp->max_scratch_bytes;
  /* the device memory beyond arena and scratch: status words, constants, sources, landing */
  stats->workspace_bytes = (int64_t)(cs->bytes - status_at);
  cs->ready = true;
  return CM_OK;
}

/* ---- uploading ------------------------------------------------------------ */

static cm_status not_ready(const cuda_state *cs, cm_err *err) {
  if (cs && cs->ready) return CM_OK;
  return cm_errorf(err, CM_EINVALID,
                   "cuda backend: the program has no device memory (compiled only: "
                   "cm_compile_opts.compile_only)");
}

static cm_status use_ctx(const cuda_state *cs, cm_err *err) {
  return ck(cs, cs->d->ctx_set_current(cs->ctx), err, "cuCtxSetCurrent");
}

/* Copies the inputs at host[i] (per source; NULL for non-inputs) into pinned slot j and
 * enqueues its upload to landing slot j on the copy stream. */
static cm_status fill_slot(cuda_state *cs, const char *const *host, int j, cm_err *err) {
  const cm_cuda_driver *d = cs->d;
  cm_status st;
  /* the slot's previous upload has left it, the landing slot's previous reader is done */
  if (cs->up_recorded[j] && (st = ck(cs, d->event_synchronize(cs->ev_up[j]), err,
                                     "cuEventSynchronize(input slot %d)", j)))
    return st;
  for (int i = 0; i < cs->n_srcs && cs->srcs[i].input; i++) {
    memcpy((char *)cs->slot[j] + cs->srcs[i].slot_at, host[i], cs->srcs[i].bytes);
    cs->srcs[i].slot[j] = host[i];
  }
  if (cs->consumed_recorded[j] &&
      (st = ck(cs, d->stream_wait_event(cs->copy, cs->ev_consumed[j], 0), err,
               "cuStreamWaitEvent(copy stream, landing slot %d)", j)))
    return st;
  if ((st = ck(cs, d->memcpy_htod_async(cs->landing[j], cs->slot[j], cs->input_span, cs->copy), err,
               "cuMemcpyHtoDAsync(inputs, %zu bytes, copy stream)", cs->input_span)) ||
      (st =
           ck(cs, d->event_record(cs->ev_up[j], cs->copy), err, "cuEventRecord(input slot %d)", j)))
    return st;
  cs->up_recorded[j] = true;
  return CM_OK;
}

static bool slot_holds(const cuda_state *cs, int j, const char *const *host) {
  for (int i = 0; i < cs->n_srcs && cs->srcs[i].input; i++)
    if (cs->srcs[i].slot[j] != host[i]) return false;
  return true;
}

/* The inputs bound now: from the slot prefetched with them, else uploaded now; then, on
 * the compute stream, from the landing slot to their place. */
static cm_status upload_inputs(cuda_state *cs, const char *const *host, cm_err *err) {
  if (cs->input_span == 0) return CM_OK;
  const cm_cuda_driver *d = cs->d;
  cm_status st;
  int j = cs->pending_slot;
  if (j < 0 || !slot_holds(cs, j, host)) {
    j = cs->next_slot;
    if ((st = fill_slot(cs, host, j, err)) != CM_OK) return st;
  }
  cs->pending_slot = -1;
  cs->next_slot = j ^ 1;
  if ((st = ck(cs, d->stream_wait_event(cs->compute, cs->ev_up[j], 0), err,
               "cuStreamWaitEvent(compute stream, input slot %d)", j)) ||
      (st = ck(cs, d->memcpy_dtod_async(cs->inputs, cs->landing[j], cs->input_span, cs->compute),
               err, "cuMemcpyDtoDAsync(inputs, %zu bytes)", cs->input_span)) ||
      (st = ck(cs, d->event_record(cs->ev_consumed[j], cs->compute), err,
               "cuEventRecord(landing slot %d)", j)))
    return st;
  cs->consumed_recorded[j] = true;
  return CM_OK;
}

static cm_status cuda_upload(cm_program *p, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  cm_status st = not_ready(cs, err);
  if (st != CM_OK || (st = use_ctx(cs, err)) != CM_OK) return st;
  const cm_graph *rg = cm_program_graph(p);
  const char **host = calloc((size_t)cs->n_srcs + 1, sizeof *host);
  if (!host) return oom(err);
  for (int i = 0; i < cs->n_srcs && st == CM_OK; i++) {
    cuda_source *s = &cs->srcs[i];
    host[i] = cm_program_source(p, s->node);
    if (s->input) continue;
    /* params and states: every run, or (resident) the first, after states_changed, or
     * when other host memory is bound */
    if (cs->resident && cs->uploaded && s->host == host[i]) continue;
    st = ck(cs, cs->d->memcpy_htod_async(cs->base + s->at, host[i], s->bytes, cs->compute), err,
            "cuMemcpyHtoDAsync(source %s, %zu bytes)", rg->nodes[s->node].name, s->bytes);
    s->host = host[i];
  }
  if (st == CM_OK) st = upload_inputs(cs, host, err);
  free(host);
  if (st == CM_OK) cs->uploaded = true;
  return st;
}

static cm_status cuda_prefetch(cm_program *p, cm_tensor *const *sources, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  cm_status st = not_ready(cs, err);
  if (st != CM_OK || (st = use_ctx(cs, err)) != CM_OK || cs->input_span == 0) return st;
  const char **host = calloc((size_t)cs->n_srcs + 1, sizeof *host);
  if (!host) return oom(err);
  for (int i = 0; i < cs->n_srcs && cs->srcs[i].input; i++)
    host[i] = sources[cs->srcs[i].node]->data;
  int j = cs->pending_slot >= 0 ? cs->pending_slot : cs->next_slot;
  st = fill_slot(cs, host, j, err);
  free(host);
  cs->pending_slot = st == CM_OK ? j : -1;
  return st;
}

/* ---- running --------------------------------------------------------------- */

/* Waits for the all_reduces in flight that must finish before kernel `before` (every one when
 * before is past the last kernel); the first error is kept, the others still waited for. */
static cm_status wait_pending(cuda_state *cs, int before, cm_status st, cm_err *err) {
  int kept = 0;
  for (int q = 0; q < cs->n_pending; q++) {
    if (cs->pending_wait[q] > before) {
      cs->pending_req[kept] = cs->pending_req[q];
      cs->pending_wait[kept++] = cs->pending_wait[q];
      continue;
    }
    cm_err dropped = {0};
    cm_status w = cm_comm_wait(cs->pending_req[q], st == CM_OK ? err : &dropped);
    if (st == CM_OK) st = w;
  }
  cs->n_pending = kept;
  return st;
}

/* A collective stage of kernel i. NCCL: on the device buffers, ordered after the compute
 * stream's work, an all_reduce left in flight until wait_pending. Other kinds (host buffers):
 * the compute stream drained, the input copied to the host, the blocking collective, the
 * result copied back. */
static cm_status run_collective(cuda_state *cs, const cm_kernel *k, int i, const cm_kstage *s,
                                cm_err *err) {
  const cm_cuda_driver *d = cs->d;
  const cm_kcollective *x = &s->coll;
  const cuda_kernel_rt *r = &cs->ks[i];
  cm_dtype dt = k->buffers[x->in_buf].dtype;
  if (!cs->comm || cm_comm_size(cs->comm) != x->ranks)
    return cm_errorf(err, CM_EINVALID, "cuda backend: kernel %s: %s is built for %d ranks, but %s",
                     k->name, cs->what[i], x->ranks,
                     cs->comm ? "the communicator has another size" : "no communicator was given");
  bool gather = x->op == CM_KCOLL_ALL_GATHER;
  if (cm_comm_kind_of(cs->comm) == CM_COMM_NCCL) {
    void *in = (void *)(uintptr_t)r->ptrs[x->in_buf], *out = (void *)(uintptr_t)r->ptrs[x->out_buf];
    cm_comm_set_compute_stream(cs->comm, cs->compute);
    if (gather) return cm_comm_all_gather(cs->comm, in, out, x->count, dt, cs->what[i], err);
    cm_status st = cm_comm_all_reduce_start(cs->comm, in, out, x->count, dt, x->mode, cs->what[i],
                                            &cs->pending_req[cs->n_pending], err);
    if (st == CM_OK) cs->pending_wait[cs->n_pending++] = cs->wait_before[i];
    return st;
  }
  size_t in_bytes = (size_t)x->count * cm_dtype_size(dt);
  size_t out_bytes = (size_t)k->buffers[x->out_buf].numel * cm_dtype_size(dt);
  if (!cs->staging && !(cs->staging = malloc(cs->staging_bytes > 0 ? cs->staging_bytes : 1)))
    return oom(err);
  char *host_in = cs->staging, *host_out = host_in + in_bytes;
  cm_status st =
      ck(cs, d->memcpy_dtoh_async(host_in, r->ptrs[x->in_buf], in_bytes, cs->compute), err,
         "cuMemcpyDtoHAsync(collective input of kernel %s, %zu bytes)", k->name, in_bytes);
  if (st == CM_OK)
    st = ck(cs, d->stream_synchronize(cs->compute), err, "cuStreamSynchronize(before %s)",
            cs->what[i]);
  if (st == CM_OK)
    st = gather ? cm_comm_all_gather(cs->comm, host_in, host_out, x->count, dt, cs->what[i], err)
                : cm_comm_all_reduce(cs->comm, host_in, host_out, x->count, dt, x->mode,
                                     cs->what[i], err);
  if (st == CM_OK)
    st = ck(cs, d->memcpy_htod_async(r->ptrs[x->out_buf], host_out, out_bytes, cs->compute), err,
            "cuMemcpyHtoDAsync(collective output of kernel %s, %zu bytes)", k->name, out_bytes);
  /* the staging buffer is reused by the next collective */
  if (st == CM_OK)
    st = ck(cs, d->stream_synchronize(cs->compute), err, "cuStreamSynchronize(after %s)",
            cs->what[i]);
  return st;
}

static cm_status launch_kernel(cuda_state *cs, const cm_kernel *k, int i, cm_err *err) {
  const cm_cuda_driver *d = cs->d;
  cuda_kernel_rt *r = &cs->ks[i];
  cm_status st;
  for (int s = 0; s < k->n_stages; s++) {
    if (r->events && (st = ck(cs, d->event_record(r->events[s], cs->compute), err,
                              "cuEventRecord(profile, kernel %s)", k->name)))
      return st;
    if (k->stages[s].coll.op != CM_KCOLL_NONE) {
      if ((st = run_collective(cs, k, i, &k->stages[s], err)) != CM_OK) return st;
      continue;
    }
    if (!r->fns[s]) continue;
    const cm_cuda_launch *l = &r->launch[s];
    int rc =
        d->launch_kernel(r->fns[s], l->grid[0], l->grid[1], l->grid[2], l->block[0], l->block[1],
                         l->block[2], l->shared_bytes, cs->compute, r->args, NULL);
    if ((st = ck(cs, rc, err,
                 "cuLaunchKernel(kernel %s stage %d, grid %ux%ux%u, block %ux%ux%u, %u bytes of "
                 "dynamic shared memory)",
                 k->name, s, l->grid[0], l->grid[1], l->grid[2], l->block[0], l->block[1],
                 l->block[2], l->shared_bytes)))
      return st;
  }
  if (r->events)
    return ck(cs, d->event_record(r->events[k->n_stages], cs->compute), err,
              "cuEventRecord(profile, kernel %s)", k->name);
  return CM_OK;
}

/* Captures every launch of the program once (kernels only) and instantiates it. */
static cm_status capture(cuda_state *cs, const cm_kprogram *kp, cm_err *err) {
  const cm_cuda_driver *d = cs->d;
  cm_status st = ck(cs, d->stream_begin_capture(cs->compute, CM_CU_CAPTURE_MODE_THREAD_LOCAL), err,
                    "cuStreamBeginCapture(compute stream)");
  if (st != CM_OK) return st;
  for (int i = 0; i < kp->n_kernels && st == CM_OK; i++)
    st = launch_kernel(cs, &kp->kernels[i], i, err);
  void *graph = NULL;
  int rc = d->stream_end_capture(cs->compute, &graph);
  if (st != CM_OK) { /* the launch's error; the capture is dropped */
    if (graph) d->graph_destroy(graph);
    return cm_err_prefix(err, "capturing the program's CUDA graph: ");
  }
  if ((st = ck(cs, rc, err, "cuStreamEndCapture(%d kernels)", kp->n_kernels))) return st;
  cs->graph = graph;
  return ck(cs, d->graph_instantiate(&cs->graph_exec, graph, 0), err,
            "cuGraphInstantiate(%d kernels)", kp->n_kernels);
}

/* Behind the kernels: the STATUS words, and (a whole run without resident states) the
 * written sources, into the download staging. */
static cm_status enqueue_downloads(cuda_state *cs, bool states, cm_err *err) {
  const cm_cuda_driver *d = cs->d;
  cm_status st = CM_OK;
  if (cs->n_status > 0)
    st = ck(cs,
            d->memcpy_dtoh_async(cs->dl, cs->status, (size_t)cs->n_status * sizeof(int64_t),
                                 cs->compute),
            err, "cuMemcpyDtoHAsync(status words)");
  for (int i = 0; states && i < cs->n_srcs && st == CM_OK; i++)
    if (cs->srcs[i].written)
      st = ck(cs,
              d->memcpy_dtoh_async((char *)cs->dl + cs->srcs[i].dl_at, cs->base + cs->srcs[i].at,
                                   cs->srcs[i].bytes, cs->compute),
              err, "cuMemcpyDtoHAsync(state, %zu bytes)", cs->srcs[i].bytes);
  cs->states_enqueued = states && st == CM_OK;
  return st;
}

static cm_status cuda_run(cm_program *p, int first, int last, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  cm_status st = not_ready(cs, err);
  if (st != CM_OK || (st = use_ctx(cs, err)) != CM_OK) return st;
  const cm_kprogram *kp = cm_program_kernels(p);
  cs->runs++;
  cs->run_first = first;
  cs->run_last = last;
  cs->states_current = false;
  cs->states_enqueued = false;
  bool whole = first == 0 && last == kp->n_kernels;
  if (whole && cs->graphs == CM_CUDA_GRAPHS_ON && !cs->profile && kp->n_kernels > 0 &&
      !cs->has_collectives) {
    if (!cs->graph_exec && (st = capture(cs, kp, err)) != CM_OK) return st;
    st = ck(cs, cs->d->graph_launch(cs->graph_exec, cs->compute), err,
            "cuGraphLaunch(the program's %d kernels)", kp->n_kernels);
  } else {
    for (int i = first; i < last && st == CM_OK; i++) {
      if (cs->n_pending) st = wait_pending(cs, i, st, err);
      if (st == CM_OK) st = launch_kernel(cs, &kp->kernels[i], i, err);
    }
  }
  /* nothing stays in flight past a run (also after an error) */
  if (cs->n_pending) st = wait_pending(cs, INT32_MAX, st, err);
  if (st != CM_OK) return st;
  return enqueue_downloads(cs, whole && !cs->resident, err);
}

static void add_profile(cuda_state *cs, const cm_kprogram *kp) {
  for (int i = cs->run_first; i < cs->run_last; i++) {
    const cm_kernel *k = &kp->kernels[i];
    double total = 0;
    for (int s = 0; s < k->n_stages; s++) {
      float ms = 0;
      if (cs->d->event_elapsed_time(&ms, cs->ks[i].events[s], cs->ks[i].events[s + 1]) != 0) ms = 0;
      cm_stage_profile *sp = &cs->sprof[cs->sprof_first[i] + s];
      sp->total_ms += ms;
      sp->runs++;
      total += ms;
    }
    cs->prof[i].total_ms += total;
    cs->prof[i].runs++;
  }
}

static void copy_states_to_host(cuda_state *cs, const cm_program *p) {
  for (int i = 0; i < cs->n_srcs; i++)
    if (cs->srcs[i].written) {
      char *h = cm_program_source(p, cs->srcs[i].node);
      if (h) memcpy(h, (char *)cs->dl + cs->srcs[i].dl_at, cs->srcs[i].bytes);
    }
  cs->states_enqueued = false;
  cs->states_current = true;
}

static cm_status cuda_finish(cm_program *p, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  cm_status st = not_ready(cs, err);
  if (st != CM_OK || (st = use_ctx(cs, err)) != CM_OK) return st;
  const cm_kprogram *kp = cm_program_kernels(p);
  if ((st =
           ck(cs, cs->d->stream_synchronize(cs->compute), err,
              "running kernels %d to %d (%s) on device %d: cuStreamSynchronize", cs->run_first,
              cs->run_last - 1,
              cs->run_last > cs->run_first ? kp->kernels[cs->run_first].name : "none", cs->device)))
    return st;
  if (cs->profile) add_profile(cs, kp);
  /* the states first: after a failed index check they are updated, as on the CPU */
  if (cs->states_enqueued) copy_states_to_host(cs, p);
  const int64_t *words = cs->dl;
  int bad = -1; /* the failed check of the first node in graph order */
  for (int i = cs->run_first; i < cs->run_last; i++)
    for (int c = cs->ks[i].first_check; c < cs->ks[i].first_check + cs->ks[i].n_checks; c++)
      if (words[cs->checks[c].key] != 0 && (bad < 0 || cs->checks[c].node < cs->checks[bad].node))
        bad = c;
  if (bad >= 0)
    return cm_program_index_error(p, cs->checks[bad].node, words[cs->checks[bad].val],
                                  words[cs->checks[bad].val + 1], err);
  return CM_OK;
}

/* Without resident states: the written sources back to the host tensors, when the run
 * did not already bring them. */
static cm_status cuda_download(cm_program *p, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  cm_status st = not_ready(cs, err);
  if (st != CM_OK || cs->resident || cs->states_current) return st;
  if ((st = use_ctx(cs, err)) != CM_OK || (st = enqueue_downloads(cs, true, err)) != CM_OK ||
      (st = ck(cs, cs->d->stream_synchronize(cs->compute), err,
               "cuStreamSynchronize(downloading the states)")))
    return st;
  copy_states_to_host(cs, p);
  return CM_OK;
}

static cm_status cuda_states_download(cm_program *p, cm_err *err) {
  cuda_state *cs = cm_program_impl(p);
  cm_status st = not_ready(cs, err);
  if (st != CM_OK || !cs->resident || !cs->uploaded) return st;
  if ((st = use_ctx(cs, err)) != CM_OK || (st = enqueue_downloads(cs, true, err)) != CM_OK ||
      (st = ck(cs, cs->d->stream_synchronize(cs->compute), err,
               "cuStreamSynchronize(downloading the states)")))
    return st;
  copy_states_to_host(cs, p);
  return CM_OK;
}

static void cuda_states_changed(cm_program *p) {
  cuda_state *cs = cm_program_impl(p);
  if (cs) cs->uploaded = false;
}

/* A host copy of buffer b of kernel k as the last run left it, downloaded on demand. */
static const void *cuda_buffer(const cm_program *p, int k, int b) {
  cuda_state *cs = cm_program_impl(p);
  if (!cs || !cs->ready || cs->d->ctx_set_current(cs->ctx) != 0) return NULL;
  const cm_kbuffer *kb = &cm_program_kernels(p)->kernels[k].buffers[b];
  cuda_kernel_rt *r = &cs->ks[k];
  if (r->host[b] && r->host_run[b] == cs->runs) return r->host[b];
  size_t bytes = (size_t)kb->numel * cm_dtype_size(kb->dtype);
  if (!r->host[b] && !(r->host[b] = malloc(bytes > 0 ? bytes : 1))) return NULL;
  if (bytes > 0 && (cs->d->memcpy_dtoh_async(r->host[b], r->ptrs[b], bytes, cs->compute) != 0 ||
                    cs->d->stream_synchronize(cs->compute) != 0))
    return NULL;
  r->host_run[b] = cs->runs;
  return r->host[b];
}

static int cuda_profile(const cm_program *p, const cm_kernel_profile **out) {
  const cuda_state *cs = cm_program_impl(p);
  *out = cs && cs->prof ? cs->prof : NULL;
  return *out ? cm_program_kernels(p)->n_kernels : 0;
}

static int cuda_stage_profile(const cm_program *p, const cm_stage_profile **out) {
  const cuda_state *cs = cm_program_impl(p);
  *out = cs && cs->sprof ? cs->sprof : NULL;
  return *out ? cs->n_sprof : 0;
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
    int m = cs->build.module_of[k];
    const cm_cuda_module *mod = &cs->build.modules[m];
    int n_stages = cm_program_kernels(p)->kernels[k].n_stages;
    if (mod->stage_begin != 0 || mod->stage_end != n_stages)
      return cm_errorf(err, CM_EINVALID,
                       "cuda backend: kernel %d is built as several modules (its stages split "
                       "into parts): cm_program_cuda_build holds them",
                       k);
    const cm_cubin *img = &mod->image;
    if (fwrite(img->data, 1, img->size, out) != img->size)
      return cm_errorf(err, CM_EINVALID, "cuda backend: cannot write the module of kernel %d", k);
    return CM_OK;
  }
  return cm_errorf(err, CM_EINVALID, "cuda backend: nothing to emit of kind %d%s", (int)what,
                   what == CM_EMIT_BINARY ? " (one module per kernel: give the kernel; made "
                                            "unless render_only)"
                                          : "");
}

/* Releases the device side (errors ignored: nothing can be done about them here). */
static void close_device(cuda_state *cs, const cm_kprogram *kp) {
  const cm_cuda_driver *d = cs->d;
  if (cs->ctx) d->ctx_set_current(cs->ctx);
  if (cs->compute) d->stream_synchronize(cs->compute);
  if (cs->copy) d->stream_synchronize(cs->copy);
  if (cs->graph_exec) d->graph_exec_destroy(cs->graph_exec);
  if (cs->graph) d->graph_destroy(cs->graph);
  for (int i = 0; cs->ks && i < kp->n_kernels; i++) {
    for (int s = 0; cs->ks[i].events && s <= kp->kernels[i].n_stages; s++)
      if (cs->ks[i].events[s]) d->event_destroy(cs->ks[i].events[s]);
  }
  for (int j = 0; j < 2; j++) {
    if (cs->ev_up[j]) d->event_destroy(cs->ev_up[j]);
    if (cs->ev_consumed[j]) d->event_destroy(cs->ev_consumed[j]);
    if (cs->slot[j]) d->mem_free_host(cs->slot[j]);
  }
  if (cs->dl) d->mem_free_host(cs->dl);
  if (cs->base) d->mem_free(cs->base);
  for (int m = 0; m < cs->n_loaded; m++) d->module_unload(cs->modules[m]);
  if (cs->copy) d->stream_destroy(cs->copy);
  if (cs->compute) d->stream_destroy(cs->compute);
  if (cs->ctx_retained) d->primary_ctx_release(cs->device);
}

static void cuda_free(cm_program *p) {
  cuda_state *cs = cm_program_impl(p);
  if (!cs) return;
  const cm_kprogram *kp = cm_program_kernels(p);
  if (cs->d) close_device(cs, kp);
  for (int i = 0; cs->ks && i < kp->n_kernels; i++) {
    cuda_kernel_rt *r = &cs->ks[i];
    for (int b = 0; r->host && b < kp->kernels[i].n_buffers; b++) free(r->host[b]);
    free(r->fns), free(r->launch), free(r->ptrs), free(r->args), free(r->host);
    free(r->host_run), free(r->events);
  }
  free(cs->ks);
  free(cs->modules);
  free(cs->srcs);
  free(cs->checks);
  free(cs->prof), free(cs->sprof), free(cs->sprof_first);
  free(cs->wait_before), free(cs->what), free(cs->pending_req), free(cs->pending_wait);
  free(cs->staging);
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
    .finish = cuda_finish,
    .prefetch = cuda_prefetch,
    .states_download = cuda_states_download,
    .states_changed = cuda_states_changed,
    .profile = cuda_profile,
    .stage_profile = cuda_stage_profile,
    .emit = cuda_emit,
    .free = cuda_free,
};
