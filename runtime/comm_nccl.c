/* runtime/comm_nccl.c — GPU ranks over NCCL, loaded with dlopen("libnccl.so.2") at run time
 * (docs/runtime.md "Communication"): one communicator per process and GPU, its own CUDA stream
 * (from the driver table, runtime/cuda_driver.c), ordered after the compute stream
 * (cm_comm_set_compute_stream) by an event. The ncclUniqueId goes from rank 0 to the others
 * over the bootstrap comm (MPI under mpirun, else the TCP rendezvous). A collective is enqueued
 * on the comm's stream and the calling thread (the caller's, or the comm thread for the
 * asynchronous ones) polls its completion event and ncclCommGetAsyncError until the deadline;
 * past it, the comm is broken and freeing it calls ncclCommAbort. NCCL cannot see mismatched
 * counts: the watchdog catches them. Enum values are nccl.h's (NCCL 2.10 and later). */
#include "comm_impl.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum {
  NCCL_ID_BYTES = 128,
  NCCL_INT32 = 2,
  NCCL_INT64 = 4,
  NCCL_FLOAT32 = 7,
  NCCL_BFLOAT16 = 9,
  NCCL_SUM = 0,
  NCCL_AVG = 4,
  NCCL_SUCCESS = 0,
  NCCL_IN_PROGRESS = 7,
  CUDA_NOT_READY = 600, /* CUDA_ERROR_NOT_READY */
};

typedef struct nccl_id {
  char internal[NCCL_ID_BYTES];
} nccl_id;

typedef struct nccl_table {
  void *lib;
  int (*get_version)(int *version);
  int (*get_unique_id)(nccl_id *id);
  int (*comm_init_rank)(void **comm, int ranks, nccl_id id, int rank);
  int (*all_reduce)(const void *send, void *recv, size_t count, int dtype, int op, void *comm,
                    void *stream);
  int (*all_gather)(const void *send, void *recv, size_t count, int dtype, void *comm,
                    void *stream);
  int (*reduce_scatter)(const void *send, void *recv, size_t count, int dtype, int op, void *comm,
                        void *stream);
  int (*broadcast)(const void *send, void *recv, size_t count, int dtype, int root, void *comm,
                   void *stream);
  int (*comm_abort)(void *comm);
  int (*comm_destroy)(void *comm);
  int (*comm_get_async_error)(void *comm, int *result);
  const char *(*get_error_string)(int result);
} nccl_table;

typedef struct nccl_state {
  nccl_table nccl;
  const cm_cuda_driver *cuda;
  int (*event_query)(void *event); /* cuEventQuery: not in the driver table */
  void *ctx, *stream, *compute_done, *comm_done, *comm;
  int device;
  cm_cu_ptr scratch; /* the barrier's one int */
  cm_comm *bootstrap;
} nccl_state;

static cm_status nccl_load(nccl_table *t, cm_err *err) {
  const char *override = getenv("CMAEC_NCCL_LIBRARY");
  const char *const only[] = {override, NULL};
  static const char *const names[] = {"libnccl.so.2", "/usr/local/cuda/lib64/libnccl.so.2", NULL};
  char why[400];
  t->lib = cm_dlopen_first(override && *override ? only : names, why, sizeof why);
  if (!t->lib) return cm_errorf(err, CM_EINVALID, "comm nccl: NCCL not found: %s", why);
  struct {
    void **slot;
    const char *symbol;
  } syms[] = {
      {(void **)&t->get_version, "ncclGetVersion"},
      {(void **)&t->get_unique_id, "ncclGetUniqueId"},
      {(void **)&t->comm_init_rank, "ncclCommInitRank"},
      {(void **)&t->all_reduce, "ncclAllReduce"},
      {(void **)&t->all_gather, "ncclAllGather"},
      {(void **)&t->reduce_scatter, "ncclReduceScatter"},
      {(void **)&t->broadcast, "ncclBroadcast"},
      {(void **)&t->comm_abort, "ncclCommAbort"},
      {(void **)&t->comm_destroy, "ncclCommDestroy"},
      {(void **)&t->comm_get_async_error, "ncclCommGetAsyncError"},
      {(void **)&t->get_error_string, "ncclGetErrorString"},
  };
  for (size_t i = 0; i < sizeof syms / sizeof *syms; i++) {
    *syms[i].slot = dlsym(t->lib, syms[i].symbol);
    if (!*syms[i].slot)
      return cm_errorf(err, CM_EINVALID, "comm nccl: the NCCL library has no %s", syms[i].symbol);
  }
  return CM_OK;
}

static cm_status nccl_check(const nccl_state *s, int result, const cm_comm *c, const char *what,
                            cm_err *err) {
  if (result == NCCL_SUCCESS || result == NCCL_IN_PROGRESS) return CM_OK;
  return cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: NCCL error %d (%s)", c->rank, what,
                   result, s->nccl.get_error_string(result));
}

static int nccl_dtype(cm_dtype dt) {
  return dt == CM_I32    ? NCCL_INT32
         : dt == CM_I64  ? NCCL_INT64
         : dt == CM_BF16 ? NCCL_BFLOAT16
                         : NCCL_FLOAT32;
}

/* Waits for the comm stream's work so far: the event polled with NCCL's own errors. */
static cm_status nccl_finish(cm_comm *c, nccl_state *s, const cm_comm_call *call, double deadline,
                             cm_err *err) {
  cm_status st = cm_cuda_check(s->cuda, s->cuda->event_record(s->comm_done, s->stream),
                               "comm nccl: cuEventRecord", err);
  for (int polls = 0; st == CM_OK; polls++) {
    int q = s->event_query(s->comm_done);
    if (q == 0) return CM_OK;
    if (q != CUDA_NOT_READY) return cm_cuda_check(s->cuda, q, "comm nccl: cuEventQuery", err);
    int async = NCCL_SUCCESS;
    s->nccl.comm_get_async_error(s->comm, &async);
    st = nccl_check(s, async, c, call->what, err);
    if (st == CM_OK && cm_comm_now() > deadline) st = cm_comm_timeout_error(c, call, err);
    if (polls < 1000) {
      sched_yield();
    } else {
      struct timespec ts = {0, 20000};
      nanosleep(&ts, NULL);
    }
  }
  return st;
}

static cm_status nccl_enqueue(cm_comm *c, nccl_state *s, const cm_comm_call *call, cm_err *err) {
  size_t eb = cm_comm_dtype_bytes(call->dtype), n = (size_t)call->count;
  int dt = nccl_dtype(call->dtype), op = call->mode == CM_MODE_MEAN ? NCCL_AVG : NCCL_SUM;
  cm_cu_ptr send = (cm_cu_ptr)(uintptr_t)call->send, recv = (cm_cu_ptr)(uintptr_t)call->recv;
  cm_cu_ptr mine = recv + (cm_cu_ptr)((size_t)c->rank * n * eb); /* NCCL's in-place slot */
  const cm_cuda_driver *d = s->cuda;
  int r = NCCL_SUCCESS;
  switch (call->op) {
  case CM_COMM_OP_ALL_REDUCE:
    r = s->nccl.all_reduce(call->send, call->recv, n, dt, op, s->comm, s->stream);
    break;
  case CM_COMM_OP_ALL_GATHER:
    if (send == recv && c->rank > 0) { /* ours: the input at the start; NCCL's: at rank's slot */
      cm_status st = cm_cuda_check(d, d->memcpy_dtod_async(mine, recv, n * eb, s->stream),
                                   "comm nccl: cuMemcpyDtoDAsync", err);
      if (st != CM_OK) return st;
      send = mine;
    }
    r = s->nccl.all_gather((void *)(uintptr_t)send, call->recv, n, dt, s->comm, s->stream);
    break;
  case CM_COMM_OP_REDUCE_SCATTER:
    if (send == recv && c->rank > 0) { /* NCCL writes in place at the rank's slot */
      r = s->nccl.reduce_scatter(call->send, (void *)(uintptr_t)mine, n, dt, op, s->comm,
                                 s->stream);
      if (r == NCCL_SUCCESS || r == NCCL_IN_PROGRESS)
        return cm_cuda_check(d, d->memcpy_dtod_async(recv, mine, n * eb, s->stream),
                             "comm nccl: cuMemcpyDtoDAsync", err);
    } else {
      r = s->nccl.reduce_scatter(call->send, call->recv, n, dt, op, s->comm, s->stream);
    }
    break;
  case CM_COMM_OP_BROADCAST:
    r = s->nccl.broadcast(call->send, call->recv, n, dt, call->root, s->comm, s->stream);
    break;
  case CM_COMM_OP_BARRIER:
    r = s->nccl.all_reduce((void *)(uintptr_t)s->scratch, (void *)(uintptr_t)s->scratch, 1,
                           NCCL_INT32, NCCL_SUM, s->comm, s->stream);
    break;
  }
  return nccl_check(s, r, c, call->what, err);
}

static cm_status nccl_run(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err) {
  nccl_state *s = c->state;
  const cm_cuda_driver *d = s->cuda;
  cm_status st = cm_cuda_check(d, d->ctx_set_current(s->ctx), "comm nccl: cuCtxSetCurrent", err);
  if (st == CM_OK && c->compute_stream) {
    st = cm_cuda_check(d, d->event_record(s->compute_done, c->compute_stream),
                       "comm nccl: cuEventRecord (compute)", err);
    if (st == CM_OK)
      st = cm_cuda_check(d, d->stream_wait_event(s->stream, s->compute_done, 0),
                         "comm nccl: cuStreamWaitEvent", err);
  }
  if (st == CM_OK && (call->count > 0 || call->op == CM_COMM_OP_BARRIER))
    st = nccl_enqueue(c, s, call, err);
  if (st == CM_OK) st = nccl_finish(c, s, call, deadline, err);
  return st;
}

static void nccl_destroy(cm_comm *c, bool broken) {
  nccl_state *s = c->state;
  if (!s) return;
  const cm_cuda_driver *d = s->cuda;
  if (s->comm) (broken ? s->nccl.comm_abort : s->nccl.comm_destroy)(s->comm);
  if (d && s->ctx) {
    d->ctx_set_current(s->ctx);
    if (!broken && s->stream) d->stream_synchronize(s->stream);
    if (s->scratch) d->mem_free(s->scratch);
    if (s->compute_done) d->event_destroy(s->compute_done);
    if (s->comm_done) d->event_destroy(s->comm_done);
    if (s->stream) d->stream_destroy(s->stream);
    d->primary_ctx_release(s->device);
  }
  if (s->bootstrap && broken && !s->bootstrap->broken) { /* MPI: end the job there too */
    s->bootstrap->broken = true;
    snprintf(s->bootstrap->broken_msg, sizeof s->bootstrap->broken_msg, "%s", c->broken_msg);
  }
  cm_comm_free(s->bootstrap);
  free(s);
  c->state = NULL;
}

static const cm_comm_backend nccl_backend = {nccl_run, nccl_destroy};

static int nccl_default_device(void) {
  const char *names[] = {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"};
  for (int i = 0; i < 2; i++) {
    const char *v = getenv(names[i]);
    if (v && *v) return atoi(v);
  }
  return 0;
}

/* The device's context, the comm's stream, its events and the barrier's scratch int. */
static cm_status nccl_cuda_setup(nccl_state *s, int ordinal, cm_err *err) {
  cm_status st = cm_cuda_driver_load(&s->cuda, err);
  if (st != CM_OK) return cm_err_prefix(err, "comm nccl: ");
  const cm_cuda_driver *d = s->cuda;
  void *lib = dlopen(d->name, RTLD_NOW | RTLD_NOLOAD);
  if (lib) *(void **)&s->event_query = dlsym(lib, "cuEventQuery");
  if (!s->event_query)
    return cm_errorf(err, CM_EINVALID,
                     "comm nccl: the CUDA driver %s has no cuEventQuery (NCCL "
                     "needs the real driver)",
                     d->name);
  st = cm_cuda_check(d, d->device_get(&s->device, ordinal), "comm nccl: cuDeviceGet", err);
  if (st == CM_OK)
    st = cm_cuda_check(d, d->primary_ctx_retain(&s->ctx, s->device),
                       "comm nccl: cuDevicePrimaryCtxRetain", err);
  if (st != CM_OK) {
    s->ctx = NULL;
    return cm_err_prefix(err, "device %d: ", ordinal);
  }
  st = cm_cuda_check(d, d->ctx_set_current(s->ctx), "comm nccl: cuCtxSetCurrent", err);
  if (st == CM_OK)
    st = cm_cuda_check(d, d->stream_create(&s->stream, CM_CU_STREAM_NON_BLOCKING),
                       "comm nccl: cuStreamCreate", err);
  if (st == CM_OK)
    st = cm_cuda_check(d, d->event_create(&s->compute_done, CM_CU_EVENT_DISABLE_TIMING),
                       "comm nccl: cuEventCreate", err);
  if (st == CM_OK)
    st = cm_cuda_check(d, d->event_create(&s->comm_done, CM_CU_EVENT_DISABLE_TIMING),
                       "comm nccl: cuEventCreate", err);
  if (st == CM_OK)
    st = cm_cuda_check(d, d->mem_alloc(&s->scratch, sizeof(int32_t)), "comm nccl: cuMemAlloc", err);
  if (st == CM_OK)
    st = cm_cuda_check(d, d->memset_d8_async(s->scratch, 0, sizeof(int32_t), s->stream),
                       "comm nccl: cuMemsetD8Async", err);
  return st;
}

/* Rank 0's id to every rank. Every rank takes part even after failing to set up (else the others
 * would wait for it until the watchdog): the ranks first count their failures. */
static cm_status nccl_exchange_id(cm_comm *c, cm_comm *bootstrap, nccl_id *id, cm_status mine,
                                  cm_err *err) {
  int32_t failed = mine != CM_OK, failed_ranks = 0;
  cm_err boot_err = {0};
  cm_status st = cm_comm_all_reduce(bootstrap, &failed, &failed_ranks, 1, CM_I32, CM_MODE_SUM,
                                    "the NCCL setup's outcome", &boot_err);
  if (st == CM_OK && !failed && failed_ranks)
    st = cm_errorf(&boot_err, CM_EINVALID,
                   "comm nccl: rank %d: %d other rank(s) failed to set "
                   "up NCCL (their messages say why)",
                   c->rank, (int)failed_ranks);
  if (st == CM_OK)
    st = cm_comm_broadcast(bootstrap, id, NCCL_ID_BYTES / 4, CM_I32, 0, "the NCCL unique id",
                           &boot_err);
  if (mine != CM_OK) return mine;
  if (st != CM_OK && err) *err = boot_err;
  return st;
}

cm_status cm_comm_nccl_open(cm_comm *c, cm_comm *bootstrap, int device, cm_err *err) {
  nccl_state *s = calloc(1, sizeof *s);
  if (!s) {
    cm_comm_free(bootstrap);
    return cm_errorf(err, CM_EINTERNAL, "comm nccl: out of memory");
  }
  s->bootstrap = bootstrap;
  c->state = s;
  c->rank = bootstrap ? bootstrap->rank : 0;
  c->size = bootstrap ? bootstrap->size : 1;
  int ordinal = device >= 0 ? device : nccl_default_device();
  cm_status st = nccl_load(&s->nccl, err);
  if (st == CM_OK) st = nccl_cuda_setup(s, ordinal, err);
  nccl_id id;
  memset(&id, 0, sizeof id);
  if (st == CM_OK && c->rank == 0)
    st = nccl_check(s, s->nccl.get_unique_id(&id), c, "ncclGetUniqueId", err);
  if (bootstrap) st = nccl_exchange_id(c, bootstrap, &id, st, err);
  if (st == CM_OK)
    st = nccl_check(s, s->nccl.comm_init_rank(&s->comm, c->size, id, c->rank), c,
                    "ncclCommInitRank", err);
  if (st != CM_OK) {
    s->comm = NULL;
    nccl_destroy(c, false);
    return st;
  }
  int version = 0;
  s->nccl.get_version(&version);
  snprintf(c->description, sizeof c->description,
           "nccl rank %d/%d (NCCL %d.%d.%d, device %d, bootstrap %s)", c->rank, c->size,
           version / 10000, version / 100 % 100, version % 100, ordinal,
           bootstrap ? (bootstrap->kind == CM_COMM_MPI ? "mpi" : "tcp") : "none");
  c->backend = &nccl_backend;
  return CM_OK;
}
