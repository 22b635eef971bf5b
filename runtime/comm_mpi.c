/* runtime/comm_mpi.c — CPU ranks over Open MPI, loaded with dlopen("libmpi.so.40") at run time
 * (docs/runtime.md "Communication"); mpi.h is not needed to build. Open MPI's handles
 * (MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ...) are the addresses of exported objects
 * (ompi_mpi_comm_world, ompi_mpi_float, ompi_mpi_op_sum), found with dlsym; MPI_IN_PLACE is
 * (void *)1 and MPI_STATUS_IGNORE NULL in its ABI. Every collective is the nonblocking MPI call
 * polled with MPI_Test until done or the watchdog's deadline; before it, an all_gather of every
 * rank's (op, count, dtype, mode, root) catches the mismatches MPI cannot see, naming both
 * ranks. A comm broken by a failed collective ends the job with MPI_Abort when freed. */
#include "comm_impl.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum {
  MPI_ABI_THREAD_SERIALIZED = 2, /* Open MPI's MPI_THREAD_* values */
  MPI_ABI_THREAD_MULTIPLE = 3,
  MPI_ABI_VERSION_MAX = 256, /* MPI_MAX_LIBRARY_VERSION_STRING */
  MPI_HEADER_WORDS = 5,      /* op, count, dtype, mode, root */
};
#define MPI_ABI_IN_PLACE ((void *)1)

typedef struct mpi_table {
  void *lib;
  int (*init_thread)(int *argc, char ***argv, int required, int *provided);
  int (*initialized)(int *flag);
  int (*finalized)(int *flag);
  int (*finalize)(void);
  int (*abort)(void *comm, int code);
  int (*comm_rank)(void *comm, int *rank);
  int (*comm_size)(void *comm, int *size);
  int (*get_library_version)(char *version, int *len);
  int (*iallreduce)(const void *send, void *recv, int count, void *dtype, void *op, void *comm,
                    void **req);
  int (*iallgather)(const void *send, int send_count, void *send_dtype, void *recv, int recv_count,
                    void *recv_dtype, void *comm, void **req);
  int (*ireduce_scatter_block)(const void *send, void *recv, int count, void *dtype, void *op,
                               void *comm, void **req);
  int (*ibcast)(void *buf, int count, void *dtype, int root, void *comm, void **req);
  int (*ibarrier)(void *comm, void **req);
  int (*test)(void **req, int *flag, void *status);
  void *comm_world, *dt_byte, *dt_float, *dt_int32, *dt_int64, *op_sum;
} mpi_table;

/* One MPI per process: initialized once, finalized (or aborted) once. */
static mpi_table mpi;
static int mpi_users;
static bool mpi_we_initialized, mpi_done;
static pthread_mutex_t mpi_mu = PTHREAD_MUTEX_INITIALIZER;

static cm_status mpi_load(cm_err *err) {
  if (mpi.lib) return CM_OK;
  const char *name = getenv("CMAEC_MPI_LIBRARY");
  if (!name || !*name) name = "libmpi.so.40";
  /* global: Open MPI's own plugins, dlopen'ed by it, resolve their symbols against libmpi */
  void *lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
  if (!lib)
    return cm_errorf(err, CM_EINVALID, "comm mpi: cannot load %s (Open MPI 4, libopenmpi3): %s",
                     name, dlerror());
  struct {
    void **slot;
    const char *symbol;
  } syms[] = {
      {(void **)&mpi.init_thread, "MPI_Init_thread"},
      {(void **)&mpi.initialized, "MPI_Initialized"},
      {(void **)&mpi.finalized, "MPI_Finalized"},
      {(void **)&mpi.finalize, "MPI_Finalize"},
      {(void **)&mpi.abort, "MPI_Abort"},
      {(void **)&mpi.comm_rank, "MPI_Comm_rank"},
      {(void **)&mpi.comm_size, "MPI_Comm_size"},
      {(void **)&mpi.get_library_version, "MPI_Get_library_version"},
      {(void **)&mpi.iallreduce, "MPI_Iallreduce"},
      {(void **)&mpi.iallgather, "MPI_Iallgather"},
      {(void **)&mpi.ireduce_scatter_block, "MPI_Ireduce_scatter_block"},
      {(void **)&mpi.ibcast, "MPI_Ibcast"},
      {(void **)&mpi.ibarrier, "MPI_Ibarrier"},
      {(void **)&mpi.test, "MPI_Test"},
      {&mpi.comm_world, "ompi_mpi_comm_world"},
      {&mpi.dt_byte, "ompi_mpi_byte"},
      {&mpi.dt_float, "ompi_mpi_float"},
      {&mpi.dt_int32, "ompi_mpi_int32_t"},
      {&mpi.dt_int64, "ompi_mpi_int64_t"},
      {&mpi.op_sum, "ompi_mpi_op_sum"},
  };
  for (size_t i = 0; i < sizeof syms / sizeof *syms; i++) {
    *syms[i].slot = dlsym(lib, syms[i].symbol);
    if (!*syms[i].slot) {
      memset(&mpi, 0, sizeof mpi);
      return cm_errorf(err, CM_EINVALID, "comm mpi: %s has no %s (not Open MPI 4?)", name,
                       syms[i].symbol);
    }
  }
  mpi.lib = lib; /* never closed: MPI cannot be loaded twice in a process */
  return CM_OK;
}

/* Polls req until done or the deadline. */
static cm_status mpi_wait(cm_comm *c, const cm_comm_call *call, void *req, double deadline,
                          cm_err *err) {
  for (int polls = 0;; polls++) {
    int flag = 0;
    mpi.test(&req, &flag, NULL);
    if (flag) return CM_OK;
    if (cm_comm_now() > deadline) return cm_comm_timeout_error(c, call, err);
    if (polls < 1000) {
      sched_yield();
    } else {
      struct timespec ts = {0, 50000};
      nanosleep(&ts, NULL);
    }
  }
}

static void *mpi_dtype(cm_dtype dt) {
  return dt == CM_I32 ? mpi.dt_int32 : dt == CM_I64 ? mpi.dt_int64 : mpi.dt_float;
}

/* Every rank's (op, count, dtype, mode, root) to every rank: the first that differs from rank
 * 0's is an error naming both. */
static cm_status mpi_agree(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err) {
  int64_t mine[MPI_HEADER_WORDS] = {call->op, call->count, call->dtype, call->mode, call->root};
  int64_t *all = malloc((size_t)c->size * sizeof mine);
  if (!all)
    return cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: out of memory", c->rank, call->what);
  void *req = NULL;
  mpi.iallgather(mine, MPI_HEADER_WORDS, mpi.dt_int64, all, MPI_HEADER_WORDS, mpi.dt_int64,
                 mpi.comm_world, &req);
  cm_status st = mpi_wait(c, call, req, deadline, err);
  for (int r = 1; r < c->size && st == CM_OK; r++) {
    const int64_t *h0 = all, *h = all + (size_t)r * MPI_HEADER_WORDS;
    cm_comm_call a = {.op = (cm_comm_op)h0[0],
                      .count = h0[1],
                      .dtype = (cm_dtype)h0[2],
                      .mode = (cm_reduce_mode)h0[3],
                      .root = (int)h0[4]};
    cm_comm_call b = {.op = (cm_comm_op)h[0],
                      .count = h[1],
                      .dtype = (cm_dtype)h[2],
                      .mode = (cm_reduce_mode)h[3],
                      .root = (int)h[4]};
    char mismatch[600], label[320];
    if (cm_comm_calls_differ(&a, 0, &b, r, mismatch, sizeof mismatch)) {
      cm_comm_call_label(call, label, sizeof label);
      st = cm_errorf(err, CM_EINVALID, "comm: rank %d: %s: ranks disagree: %s", c->rank, label,
                     mismatch);
    }
  }
  free(all);
  return st;
}

/* all_reduce and reduce_scatter of bf16: in f32, rounded back. */
static cm_status mpi_reduce_bf16(cm_comm *c, const cm_comm_call *call, double deadline,
                                 cm_err *err) {
  int64_t n_in = cm_comm_send_count(call, c->size), n_out = call->count;
  float *in = malloc((size_t)n_in * sizeof *in), *out = malloc((size_t)n_out * sizeof *out);
  cm_status st = in && out ? CM_OK
                           : cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: out of memory",
                                       c->rank, call->what);
  void *req = NULL;
  if (st == CM_OK) {
    cm_comm_acc_add(in, call->send, n_in, CM_BF16, true);
    if (call->op == CM_COMM_OP_ALL_REDUCE)
      mpi.iallreduce(in, out, (int)n_out, mpi.dt_float, mpi.op_sum, mpi.comm_world, &req);
    else
      mpi.ireduce_scatter_block(in, out, (int)n_out, mpi.dt_float, mpi.op_sum, mpi.comm_world,
                                &req);
    st = mpi_wait(c, call, req, deadline, err);
  }
  if (st == CM_OK) cm_comm_acc_finish(out, call->recv, n_out, CM_BF16, call->mode, c->size);
  free(in);
  free(out);
  return st;
}

static cm_status mpi_run(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err) {
  if (cm_comm_send_count(call, c->size) > INT_MAX || cm_comm_recv_count(call, c->size) > INT_MAX)
    return cm_errorf(err, CM_EINVALID,
                     "comm: rank %d: %s (%s): %" PRId64 " elements a rank is "
                     "more than MPI's int counts",
                     c->rank, call->what, cm_comm_op_name(call->op), call->count);
  cm_status st = mpi_agree(c, call, deadline, err);
  if (st != CM_OK || (call->count == 0 && call->op != CM_COMM_OP_BARRIER)) return st;
  if (call->dtype == CM_BF16 &&
      (call->op == CM_COMM_OP_ALL_REDUCE || call->op == CM_COMM_OP_REDUCE_SCATTER))
    return mpi_reduce_bf16(c, call, deadline, err);
  int count = (int)call->count;
  void *dt = mpi_dtype(call->dtype);
  size_t eb = cm_comm_dtype_bytes(call->dtype);
  if (call->dtype == CM_BF16) { /* all_gather and broadcast: moved as bytes */
    if (call->count > INT_MAX / 2)
      return cm_errorf(err, CM_EINVALID,
                       "comm: rank %d: %s (%s): %" PRId64 " bf16 elements "
                       "are more than MPI's int counts of bytes",
                       c->rank, call->what, cm_comm_op_name(call->op), call->count);
    count *= 2;
    dt = mpi.dt_byte;
  }
  void *req = NULL;
  const void *send = call->send == call->recv ? MPI_ABI_IN_PLACE : call->send;
  switch (call->op) {
  case CM_COMM_OP_ALL_REDUCE:
    mpi.iallreduce(send, call->recv, count, dt, mpi.op_sum, mpi.comm_world, &req);
    break;
  case CM_COMM_OP_REDUCE_SCATTER:
    mpi.ireduce_scatter_block(send, call->recv, count, dt, mpi.op_sum, mpi.comm_world, &req);
    break;
  case CM_COMM_OP_ALL_GATHER:
    if (send == MPI_ABI_IN_PLACE) /* MPI reads this rank's part at its place in recv */
      memmove((char *)call->recv + (size_t)c->rank * (size_t)call->count * eb, call->recv,
              (size_t)call->count * eb);
    mpi.iallgather(send, count, dt, call->recv, count, dt, mpi.comm_world, &req);
    break;
  case CM_COMM_OP_BROADCAST:
    mpi.ibcast(call->recv, count, dt, call->root, mpi.comm_world, &req);
    break;
  case CM_COMM_OP_BARRIER: mpi.ibarrier(mpi.comm_world, &req); break;
  }
  st = mpi_wait(c, call, req, deadline, err);
  if (st == CM_OK && call->mode == CM_MODE_MEAN && call->dtype == CM_F32 &&
      call->op != CM_COMM_OP_ALL_GATHER && call->op != CM_COMM_OP_BROADCAST)
    cm_comm_acc_finish(call->recv, call->recv, call->count, CM_F32, CM_MODE_MEAN, c->size);
  return st;
}

static void mpi_destroy(cm_comm *c, bool broken) {
  pthread_mutex_lock(&mpi_mu);
  if (broken && !mpi_done) {
    fprintf(stderr, "comm: rank %d: ending the MPI job (MPI_Abort): %s\n", c->rank, c->broken_msg);
    fflush(stderr);
    mpi.abort(mpi.comm_world, 1); /* does not return: mpirun ends every rank */
  }
  if (--mpi_users == 0 && mpi_we_initialized && !mpi_done) {
    mpi.finalize();
    mpi_done = true;
  }
  pthread_mutex_unlock(&mpi_mu);
}

static const cm_comm_backend mpi_backend = {mpi_run, mpi_destroy};

static cm_status mpi_start(cm_err *err) {
  cm_status st = mpi_load(err);
  if (st != CM_OK) return st;
  if (mpi_done)
    return cm_errorf(err, CM_EINVALID,
                     "comm mpi: MPI was finalized in this process; it cannot "
                     "start again");
  int flag = 0;
  mpi.initialized(&flag);
  if (flag) return CM_OK;
  int provided = 0;
  if (mpi.init_thread(NULL, NULL, MPI_ABI_THREAD_MULTIPLE, &provided) != 0)
    return cm_errorf(err, CM_EINVALID, "comm mpi: MPI_Init_thread failed");
  mpi_we_initialized = true;
  /* the comm thread and the caller take turns: serialized calls are enough */
  if (provided < MPI_ABI_THREAD_SERIALIZED)
    return cm_errorf(err, CM_EINVALID,
                     "comm mpi: MPI provides thread level %d, cmaec needs "
                     "MPI_THREAD_SERIALIZED (%d) or more",
                     provided, MPI_ABI_THREAD_SERIALIZED);
  return CM_OK;
}

cm_status cm_comm_mpi_open(cm_comm *c, cm_err *err) {
  pthread_mutex_lock(&mpi_mu);
  cm_status st = mpi_start(err);
  if (st == CM_OK) mpi_users++;
  pthread_mutex_unlock(&mpi_mu);
  if (st != CM_OK) return st;
  mpi.comm_rank(mpi.comm_world, &c->rank);
  mpi.comm_size(mpi.comm_world, &c->size);
  char version[MPI_ABI_VERSION_MAX] = "";
  int len = 0;
  mpi.get_library_version(version, &len);
  version[strcspn(version, ",\n")] = 0;
  snprintf(c->description, sizeof c->description, "mpi rank %d/%d (%s)", c->rank, c->size, version);
  c->backend = &mpi_backend;
  return CM_OK;
}
