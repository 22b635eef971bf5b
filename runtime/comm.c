/* runtime/comm.c — cm_comm (docs/runtime.md "Communication"): the API every kind shares
 * (argument checks, the watchdog's messages, the request queue run by one thread per comm),
 * the host reductions, and the kinds SELF (world size 1) and LOCAL (n ranks = n threads). */
#include "comm_impl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { COMM_DEFAULT_TIMEOUT_S = 300 };

double cm_comm_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

const char *cm_comm_op_name(cm_comm_op op) {
  switch (op) {
  case CM_COMM_OP_ALL_REDUCE: return "all_reduce";
  case CM_COMM_OP_ALL_GATHER: return "all_gather";
  case CM_COMM_OP_REDUCE_SCATTER: return "reduce_scatter";
  case CM_COMM_OP_BROADCAST: return "broadcast";
  case CM_COMM_OP_BARRIER: return "barrier";
  }
  return "?";
}

static const char *comm_dtype_name(cm_dtype dt) {
  switch (dt) {
  case CM_F32: return "f32";
  case CM_BF16: return "bf16";
  case CM_I32: return "i32";
  case CM_I64: return "i64";
  default: return "unsupported dtype";
  }
}

size_t cm_comm_dtype_bytes(cm_dtype dt) {
  switch (dt) {
  case CM_F32:
  case CM_I32: return 4;
  case CM_BF16: return 2;
  case CM_I64: return 8;
  default: return 0;
  }
}

int64_t cm_comm_send_count(const cm_comm_call *call, int size) {
  if (call->op == CM_COMM_OP_BARRIER) return 0;
  return call->op == CM_COMM_OP_REDUCE_SCATTER ? call->count * size : call->count;
}

int64_t cm_comm_recv_count(const cm_comm_call *call, int size) {
  if (call->op == CM_COMM_OP_BARRIER) return 0;
  return call->op == CM_COMM_OP_ALL_GATHER ? call->count * size : call->count;
}

void cm_comm_call_label(const cm_comm_call *call, char *out, size_t size) {
  if (call->op == CM_COMM_OP_BARRIER)
    snprintf(out, size, "%s (barrier)", call->what);
  else
    snprintf(out, size, "%s (%s, %" PRId64 " %s elements)", call->what, cm_comm_op_name(call->op),
             call->count, comm_dtype_name(call->dtype));
}

cm_status cm_comm_timeout_error(const cm_comm *c, const cm_comm_call *call, cm_err *err) {
  return cm_errorf(err, CM_EINTERNAL,
                   "comm: rank %d: %s (%s, %" PRId64 " elements) did not finish within %g s: a "
                   "rank died or ranks disagree on the collectives",
                   c->rank, call->what, cm_comm_op_name(call->op), call->count, c->timeout_s);
}

cm_status cm_comm_break(cm_comm *c, cm_err *err) {
  if (!c->broken) {
    c->broken = true;
    snprintf(c->broken_msg, sizeof c->broken_msg, "%s", err ? err->msg : "a collective failed");
  }
  return err ? err->status : CM_EINTERNAL;
}

bool cm_comm_calls_differ(const cm_comm_call *a, int rank_a, const cm_comm_call *b, int rank_b,
                          char *out, size_t size) {
  bool differ = a->op != b->op || a->count != b->count || a->dtype != b->dtype ||
                (a->op == CM_COMM_OP_BROADCAST && a->root != b->root) ||
                ((a->op == CM_COMM_OP_ALL_REDUCE || a->op == CM_COMM_OP_REDUCE_SCATTER) &&
                 a->mode != b->mode);
  if (differ)
    snprintf(out, size,
             "rank %d has %s of %" PRId64 " %s elements (%s, root %d), rank %d has %s of %" PRId64
             " %s elements (%s, root %d)",
             rank_a, cm_comm_op_name(a->op), a->count, comm_dtype_name(a->dtype),
             a->mode == CM_MODE_MEAN ? "mean" : "sum", a->root, rank_b, cm_comm_op_name(b->op),
             b->count, comm_dtype_name(b->dtype), b->mode == CM_MODE_MEAN ? "mean" : "sum",
             b->root);
  return differ;
}

/* ---- host reductions ------------------------------------------------------ */

size_t cm_comm_acc_bytes(cm_dtype dt) {
  return dt == CM_BF16 ? 4 : cm_comm_dtype_bytes(dt);
}

void cm_comm_acc_add(void *acc, const void *src, int64_t n, cm_dtype dt, bool first) {
  switch (dt) {
  case CM_F32: {
    float *a = acc;
    const float *s = src;
    for (int64_t i = 0; i < n; i++) a[i] = first ? s[i] : a[i] + s[i];
    break;
  }
  case CM_BF16: {
    float *a = acc;
    const uint16_t *s = src;
    for (int64_t i = 0; i < n; i++) a[i] = (first ? 0.0f : a[i]) + cm_bf16_to_f32(s[i]);
    break;
  }
  case CM_I32: { /* wraps as two's complement, as NCCL and MPI do, without signed overflow */
    uint32_t *a = acc;
    const uint32_t *s = src;
    for (int64_t i = 0; i < n; i++) a[i] = first ? s[i] : a[i] + s[i];
    break;
  }
  case CM_I64: {
    uint64_t *a = acc;
    const uint64_t *s = src;
    for (int64_t i = 0; i < n; i++) a[i] = first ? s[i] : a[i] + s[i];
    break;
  }
  default: break;
  }
}

void cm_comm_acc_finish(const void *acc, void *dst, int64_t n, cm_dtype dt, cm_reduce_mode mode,
                        int size) {
  float scale = mode == CM_MODE_MEAN ? 1.0f / (float)size : 1.0f;
  if (dt == CM_F32) {
    const float *a = acc;
    float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = mode == CM_MODE_MEAN ? a[i] * scale : a[i];
  } else if (dt == CM_BF16) {
    const float *a = acc;
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++)
      d[i] = cm_f32_to_bf16(mode == CM_MODE_MEAN ? a[i] * scale : a[i]);
  } else if (acc != dst) {
    memmove(dst, acc, (size_t)n * cm_comm_dtype_bytes(dt));
  }
}

/* ---- the request queue ------------------------------------------------------ */

struct cm_comm_request {
  cm_comm *comm;
  cm_comm_call call;
  bool done;
  cm_err err;
  pthread_cond_t done_cv; /* under comm->queue_mu */
  cm_comm_request *next;
};

static cm_status comm_run(cm_comm *c, const cm_comm_call *call, cm_err *err) {
  if (c->broken)
    return cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: an earlier collective failed: %s",
                     c->rank, call->what, c->broken_msg);
  cm_status st = c->backend->run(c, call, cm_comm_now() + c->timeout_s, err);
  if (st != CM_OK) cm_comm_break(c, err);
  return st;
}

static void *comm_thread_main(void *arg) {
  cm_comm *c = arg;
  pthread_mutex_lock(&c->queue_mu);
  for (;;) {
    while (!c->queue_head && !c->stopping) pthread_cond_wait(&c->queue_cv, &c->queue_mu);
    cm_comm_request *r = c->queue_head;
    if (!r) break;
    pthread_mutex_unlock(&c->queue_mu);
    cm_err e = {0};
    comm_run(c, &r->call, &e);
    pthread_mutex_lock(&c->queue_mu);
    r->err = e;
    c->queue_head = r->next;
    if (!c->queue_head) c->queue_tail = NULL;
    r->done = true;
    pthread_cond_broadcast(&r->done_cv);
  }
  pthread_mutex_unlock(&c->queue_mu);
  return NULL;
}

static cm_status comm_enqueue(cm_comm *c, const cm_comm_call *call, cm_comm_request **out,
                              cm_err *err) {
  cm_comm_request *r = calloc(1, sizeof *r);
  if (!r)
    return cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: out of memory", c->rank, call->what);
  r->comm = c;
  r->call = *call;
  pthread_cond_init(&r->done_cv, NULL);
  pthread_mutex_lock(&c->queue_mu);
  if (!c->thread_started) {
    if (pthread_create(&c->thread, NULL, comm_thread_main, c) != 0) {
      pthread_mutex_unlock(&c->queue_mu);
      pthread_cond_destroy(&r->done_cv);
      free(r);
      return cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: cannot start the comm thread",
                       c->rank, call->what);
    }
    c->thread_started = true;
  }
  if (c->queue_tail)
    c->queue_tail->next = r;
  else
    c->queue_head = r;
  c->queue_tail = r;
  pthread_cond_signal(&c->queue_cv);
  pthread_mutex_unlock(&c->queue_mu);
  *out = r;
  return CM_OK;
}

cm_status cm_comm_wait(cm_comm_request *req, cm_err *err) {
  if (!req) return cm_errorf(err, CM_EINVALID, "cm_comm_wait: no request");
  cm_comm *c = req->comm;
  pthread_mutex_lock(&c->queue_mu);
  while (!req->done) pthread_cond_wait(&req->done_cv, &c->queue_mu);
  pthread_mutex_unlock(&c->queue_mu);
  cm_status st = req->err.status;
  if (st != CM_OK && err) *err = req->err;
  pthread_cond_destroy(&req->done_cv);
  free(req);
  return st;
}

/* ---- the API ------------------------------------------------------------------ */

static cm_status comm_check_call(const cm_comm *c, cm_comm_call *call, const char *what,
                                 cm_err *err) {
  snprintf(call->what, sizeof call->what, "%s", what && *what ? what : "unnamed collective");
  if (!c) return cm_errorf(err, CM_EINVALID, "comm: %s: no communicator", call->what);
  const char *op = cm_comm_op_name(call->op);
  if (call->op == CM_COMM_OP_BARRIER) return CM_OK;
  if (!cm_comm_dtype_bytes(call->dtype))
    return cm_errorf(err, CM_EINVALID,
                     "comm: rank %d: %s (%s): dtype %d is not one of f32, bf16, i32, i64", c->rank,
                     call->what, op, (int)call->dtype);
  if (call->count < 0 || call->count > CM_MAX_ELEMENTS / (c->size > 0 ? c->size : 1))
    return cm_errorf(err, CM_EINVALID, "comm: rank %d: %s (%s): count %" PRId64 " out of range",
                     c->rank, call->what, op, call->count);
  if ((call->op == CM_COMM_OP_ALL_REDUCE || call->op == CM_COMM_OP_REDUCE_SCATTER) &&
      call->mode != CM_MODE_SUM &&
      (call->mode != CM_MODE_MEAN || !(call->dtype == CM_F32 || call->dtype == CM_BF16)))
    return cm_errorf(err, CM_EINVALID,
                     "comm: rank %d: %s (%s, %s): the mode must be SUM, or MEAN on f32 or bf16",
                     c->rank, call->what, op, comm_dtype_name(call->dtype));
  if (call->op == CM_COMM_OP_BROADCAST && (call->root < 0 || call->root >= c->size))
    return cm_errorf(err, CM_EINVALID,
                     "comm: rank %d: %s (broadcast): root %d is not a rank of 0..%d", c->rank,
                     call->what, call->root, c->size - 1);
  if (call->count > 0 && (!call->send || (call->op != CM_COMM_OP_BROADCAST && !call->recv)))
    return cm_errorf(err, CM_EINVALID, "comm: rank %d: %s (%s): a NULL buffer", c->rank, call->what,
                     op);
  return CM_OK;
}

/* Blocking: straight to the kind, or behind the requests in flight, in call order. */
static cm_status comm_blocking(cm_comm *c, cm_comm_call *call, const char *what, cm_err *err) {
  cm_status st = comm_check_call(c, call, what, err);
  if (st != CM_OK) return st;
  pthread_mutex_lock(&c->queue_mu);
  bool queued = c->thread_started;
  pthread_mutex_unlock(&c->queue_mu);
  if (!queued) return comm_run(c, call, err);
  cm_comm_request *r = NULL;
  st = comm_enqueue(c, call, &r, err);
  return st != CM_OK ? st : cm_comm_wait(r, err);
}

cm_status cm_comm_all_reduce(cm_comm *c, const void *send, void *recv, int64_t count,
                             cm_dtype dtype, cm_reduce_mode mode, const char *what, cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_ALL_REDUCE,
                       .send = send,
                       .recv = recv,
                       .count = count,
                       .dtype = dtype,
                       .mode = mode};
  return comm_blocking(c, &call, what, err);
}

cm_status cm_comm_all_gather(cm_comm *c, const void *send, void *recv, int64_t count,
                             cm_dtype dtype, const char *what, cm_err *err) {
  cm_comm_call call = {
      .op = CM_COMM_OP_ALL_GATHER, .send = send, .recv = recv, .count = count, .dtype = dtype};
  return comm_blocking(c, &call, what, err);
}

cm_status cm_comm_reduce_scatter(cm_comm *c, const void *send, void *recv, int64_t count,
                                 cm_dtype dtype, cm_reduce_mode mode, const char *what,
                                 cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_REDUCE_SCATTER,
                       .send = send,
                       .recv = recv,
                       .count = count,
                       .dtype = dtype,
                       .mode = mode};
  return comm_blocking(c, &call, what, err);
}

cm_status cm_comm_broadcast(cm_comm *c, void *buf, int64_t count, cm_dtype dtype, int root,
                            const char *what, cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_BROADCAST,
                       .send = buf,
                       .recv = buf,
                       .count = count,
                       .dtype = dtype,
                       .root = root};
  return comm_blocking(c, &call, what, err);
}

cm_status cm_comm_barrier(cm_comm *c, const char *what, cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_BARRIER, .dtype = CM_F32};
  return comm_blocking(c, &call, what, err);
}

cm_status cm_comm_all_reduce_start(cm_comm *c, const void *send, void *recv, int64_t count,
                                   cm_dtype dtype, cm_reduce_mode mode, const char *what,
                                   cm_comm_request **req, cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_ALL_REDUCE,
                       .send = send,
                       .recv = recv,
                       .count = count,
                       .dtype = dtype,
                       .mode = mode};
  if (!req) return cm_errorf(err, CM_EINVALID, "cm_comm_all_reduce_start: no request pointer");
  *req = NULL;
  cm_status st = comm_check_call(c, &call, what, err);
  return st != CM_OK ? st : comm_enqueue(c, &call, req, err);
}

int cm_comm_rank(const cm_comm *c) {
  return c ? c->rank : 0;
}
int cm_comm_size(const cm_comm *c) {
  return c ? c->size : 1;
}
cm_comm_kind cm_comm_kind_of(const cm_comm *c) {
  return c ? c->kind : CM_COMM_SELF;
}
const char *cm_comm_describe(const cm_comm *c) {
  return c ? c->description : "self rank 0/1";
}
void cm_comm_set_compute_stream(cm_comm *c, void *stream) {
  if (c) c->compute_stream = stream;
}

static cm_comm *comm_new(cm_comm_kind kind, double timeout_s) {
  cm_comm *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->kind = kind;
  c->size = 1;
  c->timeout_s = timeout_s > 0 ? timeout_s : COMM_DEFAULT_TIMEOUT_S;
  pthread_mutex_init(&c->queue_mu, NULL);
  pthread_cond_init(&c->queue_cv, NULL);
  return c;
}

void cm_comm_free(cm_comm *c) {
  if (!c) return;
  pthread_mutex_lock(&c->queue_mu);
  bool joined = c->thread_started;
  c->stopping = true;
  pthread_cond_signal(&c->queue_cv);
  pthread_mutex_unlock(&c->queue_mu);
  if (joined) pthread_join(c->thread, NULL);
  if (c->backend && c->backend->destroy) c->backend->destroy(c, c->broken);
  pthread_cond_destroy(&c->queue_cv);
  pthread_mutex_destroy(&c->queue_mu);
  free(c);
}

/* ---- SELF: world size 1 ------------------------------------------------------ */

static cm_status self_run(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err) {
  size_t bytes = (size_t)call->count * cm_comm_dtype_bytes(call->dtype);
  if (call->op != CM_COMM_OP_BARRIER && call->op != CM_COMM_OP_BROADCAST && bytes &&
      call->send != call->recv)
    memmove(call->recv, call->send, bytes);
  return CM_OK;
}

static const cm_comm_backend self_backend = {self_run, NULL};

/* ---- LOCAL: n threads of this process ------------------------------------------
 * The ranks meet at one rendezvous per collective: the last to arrive checks that all called the
 * same collective, computes every rank's result from every rank's buffers (under the lock; the
 * others sleep) and wakes them; one that waits past its deadline breaks the group. */
typedef struct local_group {
  int n, refs;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int64_t generation; /* collectives completed */
  int arrived;
  const cm_comm_call **posted; /* [n]: this generation's calls */
  cm_status result;            /* of the last generation */
  char result_msg[600];
  bool broken;
  char broken_msg[600];
} local_group;

typedef struct local_state {
  local_group *group;
} local_state;

static cm_status local_execute(local_group *g) {
  const cm_comm_call *c0 = g->posted[0];
  int n = g->n;
  for (int r = 1; r < n; r++)
    if (cm_comm_calls_differ(c0, 0, g->posted[r], r, g->result_msg, sizeof g->result_msg))
      return CM_EINVALID;
  size_t eb = cm_comm_dtype_bytes(c0->dtype);
  int64_t count = c0->count;
  if (c0->op == CM_COMM_OP_BARRIER || count == 0) return CM_OK;
  if (c0->op == CM_COMM_OP_BROADCAST) {
    for (int r = 0; r < n; r++)
      if (r != c0->root) memcpy(g->posted[r]->recv, g->posted[c0->root]->send, (size_t)count * eb);
    return CM_OK;
  }
  int64_t total = c0->op == CM_COMM_OP_ALL_REDUCE ? count : count * n;
  size_t scratch_elem = c0->op == CM_COMM_OP_ALL_GATHER ? eb : cm_comm_acc_bytes(c0->dtype);
  unsigned char *scratch = malloc((size_t)total * scratch_elem);
  if (!scratch) {
    snprintf(g->result_msg, sizeof g->result_msg, "out of memory for %" PRId64 " elements", total);
    return CM_EINTERNAL;
  }
  if (c0->op == CM_COMM_OP_ALL_GATHER) {
    for (int r = 0; r < n; r++)
      memcpy(scratch + (size_t)r * (size_t)count * eb, g->posted[r]->send, (size_t)count * eb);
    for (int r = 0; r < n; r++) memcpy(g->posted[r]->recv, scratch, (size_t)total * eb);
  } else {
    for (int r = 0; r < n; r++)
      cm_comm_acc_add(scratch, g->posted[r]->send, total, c0->dtype, r == 0);
    for (int r = 0; r < n; r++) {
      size_t off = c0->op == CM_COMM_OP_REDUCE_SCATTER ? (size_t)r * (size_t)count : 0;
      cm_comm_acc_finish(scratch + off * cm_comm_acc_bytes(c0->dtype), g->posted[r]->recv, count,
                         c0->dtype, c0->mode, n);
    }
  }
  free(scratch);
  return CM_OK;
}

static cm_status local_run(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err) {
  local_group *g = ((local_state *)c->state)->group;
  char label[320];
  cm_comm_call_label(call, label, sizeof label);
  pthread_mutex_lock(&g->mu);
  if (g->broken) {
    cm_status st = cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: the group is broken: %s",
                             c->rank, label, g->broken_msg);
    pthread_mutex_unlock(&g->mu);
    return st;
  }
  g->posted[c->rank] = call;
  int64_t generation = g->generation;
  if (++g->arrived == g->n) {
    g->result = local_execute(g);
    g->arrived = 0;
    g->generation++;
    pthread_cond_broadcast(&g->cv);
  }
  /* pthread_cond_timedwait counts in CLOCK_REALTIME: the monotonic deadline, moved to it */
  struct timespec now_real, until;
  clock_gettime(CLOCK_REALTIME, &now_real);
  double wait_s = deadline - cm_comm_now();
  if (wait_s < 0) wait_s = 0;
  long long wait_ns = (long long)(wait_s * 1e9) + now_real.tv_nsec;
  until.tv_sec = now_real.tv_sec + (time_t)(wait_ns / 1000000000LL);
  until.tv_nsec = (long)(wait_ns % 1000000000LL);
  while (g->generation == generation && !g->broken) {
    if (pthread_cond_timedwait(&g->cv, &g->mu, &until) == ETIMEDOUT &&
        g->generation == generation && !g->broken) {
      cm_comm_timeout_error(c, call, err);
      g->broken = true;
      snprintf(g->broken_msg, sizeof g->broken_msg, "%s", err ? err->msg : "a rank timed out");
      g->arrived--;
      pthread_cond_broadcast(&g->cv);
      pthread_mutex_unlock(&g->mu);
      return CM_EINTERNAL;
    }
  }
  cm_status st = CM_OK;
  if (g->generation == generation)
    st = cm_errorf(err, CM_EINTERNAL, "comm: rank %d: %s: the group broke while waiting: %s",
                   c->rank, label, g->broken_msg);
  else if (g->result != CM_OK)
    st = cm_errorf(err, g->result, "comm: rank %d: %s: ranks disagree: %s", c->rank, label,
                   g->result_msg);
  pthread_mutex_unlock(&g->mu);
  return st;
}

static void local_destroy(cm_comm *c, bool broken) {
  local_state *s = c->state;
  local_group *g = s->group;
  pthread_mutex_lock(&g->mu);
  bool last = --g->refs == 0;
  pthread_mutex_unlock(&g->mu);
  if (last) {
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g->posted);
    free(g);
  }
  free(s);
}

static const cm_comm_backend local_backend = {local_run, local_destroy};

cm_status cm_comm_local_group(int n, double timeout_s, cm_comm **comms, cm_err *err) {
  if (n < 1 || n > 4096 || !comms)
    return cm_errorf(err, CM_EINVALID, "cm_comm_local_group: %d ranks (1..4096) or no array", n);
  local_group *g = calloc(1, sizeof *g);
  const cm_comm_call **posted = calloc((size_t)n, sizeof *posted);
  if (!g || !posted) {
    free(g);
    free(posted);
    return cm_errorf(err, CM_EINTERNAL, "cm_comm_local_group: out of memory");
  }
  g->n = n;
  g->posted = posted;
  pthread_mutex_init(&g->mu, NULL);
  pthread_cond_init(&g->cv, NULL);
  for (int r = 0; r < n; r++) comms[r] = NULL;
  for (int r = 0; r < n; r++) {
    cm_comm *c = comm_new(CM_COMM_LOCAL, timeout_s);
    local_state *s = c ? calloc(1, sizeof *s) : NULL;
    if (!s) {
      free(c);
      for (int k = 0; k < r; k++) cm_comm_free(comms[k]);
      if (r == 0) {
        pthread_cond_destroy(&g->cv);
        pthread_mutex_destroy(&g->mu);
        free(posted);
        free(g);
      }
      return cm_errorf(err, CM_EINTERNAL, "cm_comm_local_group: out of memory");
    }
    s->group = g;
    g->refs++;
    c->rank = r;
    c->size = n;
    c->backend = &local_backend;
    c->state = s;
    snprintf(c->description, sizeof c->description, "local rank %d/%d (threads)", r, n);
    comms[r] = c;
  }
  return CM_OK;
}

/* ---- choosing the kind ---------------------------------------------------------- */

static bool env_set(const char *name) {
  const char *v = getenv(name);
  return v && *v;
}

cm_status cm_comm_init(const cm_comm_opts *o, cm_comm **out, cm_err *err) {
  cm_comm_opts d = {.kind = CM_COMM_AUTO, .timeout_s = 0, .device = -1};
  if (!o) o = &d;
  if (!out) return cm_errorf(err, CM_EINVALID, "cm_comm_init: no output pointer");
  *out = NULL;
  if (!(o->timeout_s >= 0))
    return cm_errorf(err, CM_EINVALID, "cm_comm_init: timeout %g s is negative", o->timeout_s);
  cm_comm_kind kind = o->kind;
  if (kind == CM_COMM_AUTO)
    kind = env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMI_SIZE") ? CM_COMM_MPI
           : env_set("CMAEC_WORLD_SIZE")                          ? CM_COMM_TCP
                                                                  : CM_COMM_SELF;
  if (kind == CM_COMM_LOCAL)
    return cm_errorf(
        err, CM_EINVALID,
        "cm_comm_init: a LOCAL group is made by cm_comm_local_group, not cm_comm_init");
  if (kind < CM_COMM_AUTO || kind > CM_COMM_NCCL)
    return cm_errorf(err, CM_EINVALID, "cm_comm_init: unknown kind %d", (int)kind);
  cm_comm *c = comm_new(kind, o->timeout_s);
  if (!c) return cm_errorf(err, CM_EINTERNAL, "cm_comm_init: out of memory");
  cm_status st = CM_OK;
  if (kind == CM_COMM_SELF) {
    c->backend = &self_backend;
    snprintf(c->description, sizeof c->description, "self rank 0/1");
  } else if (kind == CM_COMM_MPI) {
    st = cm_comm_mpi_open(c, err);
  } else if (kind == CM_COMM_TCP) {
    st = cm_comm_tcp_open(c, err);
  } else {
    cm_comm_opts boot = *o;
    boot.kind = env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMI_SIZE") ? CM_COMM_MPI
                : env_set("CMAEC_WORLD_SIZE")                          ? CM_COMM_TCP
                                                                       : CM_COMM_SELF;
    cm_comm *bootstrap = NULL;
    if (boot.kind != CM_COMM_SELF) st = cm_comm_init(&boot, &bootstrap, err);
    if (st == CM_OK) st = cm_comm_nccl_open(c, bootstrap, o->device, err);
  }
  if (st != CM_OK) {
    c->backend = NULL; /* the kind released what it had opened */
    cm_comm_free(c);
    return st;
  }
  *out = c;
  return CM_OK;
}
