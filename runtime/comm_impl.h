/* runtime/comm_impl.h — what the kinds of cm_comm share (runtime/comm*.c only): a collective
 * as one value, the backend table each kind fills, and the host reductions. */
#ifndef CMAEC_COMM_IMPL_H
#define CMAEC_COMM_IMPL_H

#include "runtime.h"

#include <pthread.h>
#include <stdbool.h>

typedef enum cm_comm_op {
  CM_COMM_OP_ALL_REDUCE,
  CM_COMM_OP_ALL_GATHER,
  CM_COMM_OP_REDUCE_SCATTER,
  CM_COMM_OP_BROADCAST,
  CM_COMM_OP_BARRIER,
} cm_comm_op;

typedef struct cm_comm_call {
  cm_comm_op op;
  const void *send; /* broadcast: the buffer */
  void *recv;
  int64_t count; /* elements per rank (see each collective in runtime.h) */
  cm_dtype dtype;
  cm_reduce_mode mode;
  int root;
  char what[160];
} cm_comm_call;

typedef struct cm_comm_backend {
  /* Runs one validated collective, failing with the watchdog's message past deadline
   * (cm_comm_now() seconds). */
  cm_status (*run)(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err);
  /* Releases the kind's state; broken: a collective failed (end the job rather than wait). */
  void (*destroy)(cm_comm *c, bool broken);
} cm_comm_backend;

typedef struct cm_comm_request cm_comm_request;

struct cm_comm {
  cm_comm_kind kind;
  int rank, size;
  double timeout_s;
  char description[160];
  const cm_comm_backend *backend;
  void *state; /* the kind's */
  void *compute_stream;
  bool broken;
  char broken_msg[512];
  /* the request queue and the thread that runs it (started by the first asynchronous call) */
  pthread_mutex_t queue_mu;
  pthread_cond_t queue_cv;
  bool thread_started, stopping;
  pthread_t thread;
  cm_comm_request *queue_head, *queue_tail;
};

double cm_comm_now(void); /* monotonic seconds */
const char *cm_comm_op_name(cm_comm_op op);
size_t cm_comm_dtype_bytes(cm_dtype dt);
/* Elements of send and recv of a call on a comm of size ranks. */
int64_t cm_comm_send_count(const cm_comm_call *call, int size);
int64_t cm_comm_recv_count(const cm_comm_call *call, int size);
/* "what (all_reduce, 100 f32 elements)" */
void cm_comm_call_label(const cm_comm_call *call, char *out, size_t size);
/* Fills err with "comm: rank R: <what> (op, N elements) did not finish within T s: ..." */
cm_status cm_comm_timeout_error(const cm_comm *c, const cm_comm_call *call, cm_err *err);
/* Marks c broken (later collectives fail at once) with err's message; returns err->status. */
cm_status cm_comm_break(cm_comm *c, cm_err *err);
/* Two ranks' calls, one string: "rank 0 has all_reduce of 8 f32 elements, rank 1 ..."; true
 * when they disagree on what every rank must agree on. */
bool cm_comm_calls_differ(const cm_comm_call *a, int rank_a, const cm_comm_call *b, int rank_b,
                          char *out, size_t size);

/* Host reductions: an accumulator holds f32 for f32 and bf16, else the dtype itself. */
size_t cm_comm_acc_bytes(cm_dtype dt);
void cm_comm_acc_add(void *acc, const void *src, int64_t n, cm_dtype dt, bool first);
void cm_comm_acc_finish(const void *acc, void *dst, int64_t n, cm_dtype dt, cm_reduce_mode mode,
                        int size);

/* The kinds (comm_mpi.c, comm_tcp.c, comm_nccl.c): fill c's rank, size, description,
 * backend and state. */
cm_status cm_comm_mpi_open(cm_comm *c, cm_err *err);
cm_status cm_comm_tcp_open(cm_comm *c, cm_err *err);
/* bootstrap: an open MPI or TCP comm (moved: freed with c), or NULL for world size 1. */
cm_status cm_comm_nccl_open(cm_comm *c, cm_comm *bootstrap, int device, cm_err *err);

#endif
