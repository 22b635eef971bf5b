/* runtime/comm_tcp.c — the TCP rendezvous (CMAEC_RANK, CMAEC_WORLD_SIZE, CMAEC_MASTER_ADDR,
 * CMAEC_MASTER_PORT) and host collectives over its sockets: a star around rank 0
 * (docs/runtime.md "Communication"). Rank 0 listens, every other rank connects and says who
 * it is. Per collective every rank sends rank 0 a header; rank 0 compares them with its own
 * and answers go (or the mismatch, naming both ranks' values); then the payloads go to rank 0,
 * which reduces them in rank order (f32 for f32 and bf16, as LOCAL does) and sends every rank
 * its result. Every wait is bounded by the collective's deadline; a peer that closes its
 * socket (a rank that died) fails the collective at once. Ranks run on one architecture:
 * headers and payloads are in host byte order. */
#include "comm_impl.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum {
  TCP_MAGIC = 0x434d4331, /* "CMC1" */
  TCP_DEFAULT_PORT = 29500,
  TCP_MAX_RANKS = 4096,
  TCP_MSG_MAX = 1024,
};

typedef struct tcp_header {
  uint32_t magic, op;
  int64_t count; /* a verdict: the length of the message that follows (status != 0) */
  int32_t dtype, mode, root, status; /* hello: root = the sender's rank, count = world size */
} tcp_header;

typedef struct tcp_state {
  int *fds; /* rank 0: fds[r] for r >= 1; other ranks: fds[0] is rank 0 */
  int n_fds;
} tcp_state;

typedef struct tcp_io {
  cm_comm *c;
  const cm_comm_call *call;
  double deadline;
  cm_err *err;
} tcp_io;

static void tcp_sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Waits for fd to be ready for events until the deadline; CM_OK or the watchdog's error. */
static cm_status tcp_poll(const tcp_io *io, int fd, short events, int peer) {
  for (;;) {
    double left = io->deadline - cm_comm_now();
    if (left <= 0) {
      cm_comm_timeout_error(io->c, io->call, io->err);
      if (io->err && peer >= 0) {
        size_t len = strlen(io->err->msg);
        snprintf(io->err->msg + len, sizeof io->err->msg - len, " (waiting for rank %d)", peer);
      }
      return CM_EINTERNAL;
    }
    struct pollfd p = {.fd = fd, .events = events};
    int ms = left > 1.0 ? 1000 : (int)(left * 1000) + 1;
    int got = poll(&p, 1, ms);
    if (got > 0) return CM_OK;
    if (got < 0 && errno != EINTR)
      return cm_errorf(io->err, CM_EINTERNAL, "comm: rank %d: %s: poll: %s", io->c->rank,
                       io->call->what, strerror(errno));
  }
}

static cm_status tcp_peer_lost(const tcp_io *io, int peer, const char *why) {
  char label[320];
  cm_comm_call_label(io->call, label, sizeof label);
  return cm_errorf(io->err, CM_EINTERNAL,
                   "comm: rank %d: %s: rank %d's connection %s: a rank died or left", io->c->rank,
                   label, peer, why);
}

static cm_status tcp_send_all(const tcp_io *io, int fd, int peer, const void *buf, size_t n) {
  const unsigned char *p = buf;
  while (n > 0) {
    cm_status st = tcp_poll(io, fd, POLLOUT, peer);
    if (st != CM_OK) return st;
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (k <= 0) return tcp_peer_lost(io, peer, k < 0 ? strerror(errno) : "closed");
    p += k;
    n -= (size_t)k;
  }
  return CM_OK;
}

static cm_status tcp_recv_all(const tcp_io *io, int fd, int peer, void *buf, size_t n) {
  unsigned char *p = buf;
  while (n > 0) {
    cm_status st = tcp_poll(io, fd, POLLIN, peer);
    if (st != CM_OK) return st;
    ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (k == 0) return tcp_peer_lost(io, peer, "closed");
    if (k < 0) return tcp_peer_lost(io, peer, strerror(errno));
    p += k;
    n -= (size_t)k;
  }
  return CM_OK;
}

static tcp_header tcp_header_of(const cm_comm_call *call) {
  tcp_header h = {.magic = TCP_MAGIC,
                  .op = (uint32_t)call->op,
                  .count = call->count,
                  .dtype = (int32_t)call->dtype,
                  .mode = (int32_t)call->mode,
                  .root = call->root};
  return h;
}

static cm_comm_call tcp_call_of(const tcp_header *h) {
  cm_comm_call call = {.op = (cm_comm_op)h->op,
                       .count = h->count,
                       .dtype = (cm_dtype)h->dtype,
                       .mode = (cm_reduce_mode)h->mode,
                       .root = h->root};
  return call;
}

/* ---- rank 0 ---------------------------------------------------------------- */

/* Every rank's header against rank 0's call; answers every rank go or the mismatch. */
static cm_status tcp_root_agree(const tcp_io *io, tcp_state *s) {
  cm_comm *c = io->c;
  char mismatch[TCP_MSG_MAX] = "";
  for (int r = 1; r < c->size; r++) {
    tcp_header h;
    cm_status st = tcp_recv_all(io, s->fds[r], r, &h, sizeof h);
    if (st != CM_OK) return st;
    cm_comm_call theirs = tcp_call_of(&h);
    if (h.magic != TCP_MAGIC)
      snprintf(mismatch, sizeof mismatch, "rank %d sent a malformed header", r);
    else if (!*mismatch)
      cm_comm_calls_differ(io->call, 0, &theirs, r, mismatch, sizeof mismatch);
  }
  tcp_header verdict = tcp_header_of(io->call);
  verdict.status = *mismatch ? 1 : 0;
  verdict.count = (int64_t)strlen(mismatch);
  for (int r = 1; r < c->size; r++) {
    cm_status st = tcp_send_all(io, s->fds[r], r, &verdict, sizeof verdict);
    if (st == CM_OK && verdict.status)
      st = tcp_send_all(io, s->fds[r], r, mismatch, (size_t)verdict.count);
    if (st != CM_OK) return st;
  }
  if (!*mismatch) return CM_OK;
  char label[320];
  cm_comm_call_label(io->call, label, sizeof label);
  return cm_errorf(io->err, CM_EINVALID, "comm: rank 0: %s: ranks disagree: %s", label, mismatch);
}

/* all_reduce, reduce_scatter: the sum in rank order; every rank gets its part. */
static cm_status tcp_root_reduce(const tcp_io *io, tcp_state *s) {
  const cm_comm_call *call = io->call;
  int size = io->c->size;
  int64_t total = cm_comm_send_count(call, size), count = call->count;
  size_t eb = cm_comm_dtype_bytes(call->dtype), ab = cm_comm_acc_bytes(call->dtype);
  unsigned char *acc = malloc((size_t)total * ab), *in = malloc((size_t)total * eb);
  cm_status st =
      acc && in ? CM_OK
                : cm_errorf(io->err, CM_EINTERNAL, "comm: rank 0: %s: out of memory", call->what);
  if (st == CM_OK) cm_comm_acc_add(acc, call->send, total, call->dtype, true);
  for (int r = 1; r < size && st == CM_OK; r++) {
    st = tcp_recv_all(io, s->fds[r], r, in, (size_t)total * eb);
    if (st == CM_OK) cm_comm_acc_add(acc, in, total, call->dtype, false);
  }
  bool scatter = call->op == CM_COMM_OP_REDUCE_SCATTER;
  for (int r = 1; r < size && st == CM_OK; r++) {
    if (r == 1 || scatter)
      cm_comm_acc_finish(acc + (scatter ? (size_t)r * (size_t)count * ab : 0), in, count,
                         call->dtype, call->mode, size);
    st = tcp_send_all(io, s->fds[r], r, in, (size_t)count * eb);
  }
  if (st == CM_OK) cm_comm_acc_finish(acc, call->recv, count, call->dtype, call->mode, size);
  free(acc);
  free(in);
  return st;
}

static cm_status tcp_root_gather(const tcp_io *io, tcp_state *s) {
  const cm_comm_call *call = io->call;
  int size = io->c->size;
  size_t bytes = (size_t)call->count * cm_comm_dtype_bytes(call->dtype);
  unsigned char *all = malloc(bytes * (size_t)size);
  if (!all) return cm_errorf(io->err, CM_EINTERNAL, "comm: rank 0: %s: out of memory", call->what);
  memcpy(all, call->send, bytes);
  cm_status st = CM_OK;
  for (int r = 1; r < size && st == CM_OK; r++)
    st = tcp_recv_all(io, s->fds[r], r, all + (size_t)r * bytes, bytes);
  for (int r = 1; r < size && st == CM_OK; r++)
    st = tcp_send_all(io, s->fds[r], r, all, bytes * (size_t)size);
  if (st == CM_OK) memcpy(call->recv, all, bytes * (size_t)size);
  free(all);
  return st;
}

static cm_status tcp_root_broadcast(const tcp_io *io, tcp_state *s) {
  const cm_comm_call *call = io->call;
  size_t bytes = (size_t)call->count * cm_comm_dtype_bytes(call->dtype);
  cm_status st = CM_OK;
  if (call->root != 0) st = tcp_recv_all(io, s->fds[call->root], call->root, call->recv, bytes);
  for (int r = 1; r < io->c->size && st == CM_OK; r++)
    if (r != call->root) st = tcp_send_all(io, s->fds[r], r, call->recv, bytes);
  return st;
}

/* ---- every rank ---------------------------------------------------------------- */

static cm_status tcp_leaf_run(const tcp_io *io, tcp_state *s) {
  const cm_comm_call *call = io->call;
  int fd = s->fds[0], size = io->c->size;
  tcp_header h = tcp_header_of(call), verdict;
  cm_status st = tcp_send_all(io, fd, 0, &h, sizeof h);
  if (st == CM_OK) st = tcp_recv_all(io, fd, 0, &verdict, sizeof verdict);
  if (st != CM_OK) return st;
  if (verdict.magic != TCP_MAGIC || verdict.status != 0) {
    char mismatch[TCP_MSG_MAX] = "a malformed verdict from rank 0";
    if (verdict.magic == TCP_MAGIC && verdict.count > 0 && verdict.count < TCP_MSG_MAX) {
      st = tcp_recv_all(io, fd, 0, mismatch, (size_t)verdict.count);
      mismatch[st == CM_OK ? verdict.count : 0] = 0;
    }
    char label[320];
    cm_comm_call_label(call, label, sizeof label);
    return cm_errorf(io->err, CM_EINVALID, "comm: rank %d: %s: ranks disagree: %s", io->c->rank,
                     label, mismatch);
  }
  size_t eb = cm_comm_dtype_bytes(call->dtype);
  if (call->op == CM_COMM_OP_BARRIER) return CM_OK;
  if (call->op == CM_COMM_OP_BROADCAST) {
    if (call->root == io->c->rank)
      return tcp_send_all(io, fd, 0, call->send, (size_t)call->count * eb);
    return tcp_recv_all(io, fd, 0, call->recv, (size_t)call->count * eb);
  }
  /* in place: the whole input is sent before any result arrives */
  st = tcp_send_all(io, fd, 0, call->send, (size_t)cm_comm_send_count(call, size) * eb);
  if (st == CM_OK)
    st = tcp_recv_all(io, fd, 0, call->recv, (size_t)cm_comm_recv_count(call, size) * eb);
  return st;
}

static cm_status tcp_run(cm_comm *c, const cm_comm_call *call, double deadline, cm_err *err) {
  tcp_state *s = c->state;
  tcp_io io = {c, call, deadline, err};
  if (c->rank != 0) return tcp_leaf_run(&io, s);
  cm_status st = tcp_root_agree(&io, s);
  if (st != CM_OK || call->count == 0) return st;
  switch (call->op) {
  case CM_COMM_OP_ALL_REDUCE:
  case CM_COMM_OP_REDUCE_SCATTER: return tcp_root_reduce(&io, s);
  case CM_COMM_OP_ALL_GATHER: return tcp_root_gather(&io, s);
  case CM_COMM_OP_BROADCAST: return tcp_root_broadcast(&io, s);
  case CM_COMM_OP_BARRIER: return CM_OK;
  }
  return CM_OK;
}

static void tcp_destroy(cm_comm *c, bool broken) {
  tcp_state *s = c->state;
  if (!s) return;
  for (int i = 0; i < s->n_fds; i++)
    if (s->fds[i] >= 0) close(s->fds[i]);
  free(s->fds);
  free(s);
  c->state = NULL;
}

static const cm_comm_backend tcp_backend = {tcp_run, tcp_destroy};

/* ---- the rendezvous ---------------------------------------------------------- */

static cm_status tcp_env_int(const char *name, long lo, long hi, long fallback, long *out,
                             cm_err *err) {
  const char *v = getenv(name);
  if (!v || !*v) {
    if (fallback < lo) return cm_errorf(err, CM_EINVALID, "comm tcp: $%s is not set", name);
    *out = fallback;
    return CM_OK;
  }
  char *end = NULL;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || *end || x < lo || x > hi)
    return cm_errorf(err, CM_EINVALID, "comm tcp: $%s=\"%s\" is not an integer in %ld..%ld", name,
                     v, lo, hi);
  *out = x;
  return CM_OK;
}

static void tcp_socket_options(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Rank 0: accepts size - 1 ranks, each saying who it is, within the timeout. */
static cm_status tcp_accept_all(cm_comm *c, tcp_state *s, int listener, cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_BARRIER};
  snprintf(call.what, sizeof call.what, "the TCP rendezvous");
  tcp_io io = {c, &call, cm_comm_now() + c->timeout_s, err};
  for (int joined = 1; joined < c->size; joined++) {
    cm_status st = tcp_poll(&io, listener, POLLIN, -1);
    if (st != CM_OK) return cm_err_prefix(err, "(%d of %d ranks joined) ", joined, c->size);
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) {
      joined--;
      continue;
    }
    tcp_socket_options(fd);
    tcp_header hello;
    st = tcp_recv_all(&io, fd, -1, &hello, sizeof hello);
    if (st == CM_OK && (hello.magic != TCP_MAGIC || hello.count != c->size || hello.root < 1 ||
                        hello.root >= c->size || s->fds[hello.root] >= 0))
      st = cm_errorf(err, CM_EINVALID,
                     "comm tcp: rank 0: a peer said rank %d of world size %" PRId64
                     " (this world: %d ranks; each rank 1..%d once)",
                     hello.root, hello.count, c->size, c->size - 1);
    if (st != CM_OK) {
      close(fd);
      return st;
    }
    s->fds[hello.root] = fd;
  }
  tcp_header go = {.magic = TCP_MAGIC, .count = c->size};
  for (int r = 1; r < c->size; r++) {
    cm_status st = tcp_send_all(&io, s->fds[r], r, &go, sizeof go);
    if (st != CM_OK) return st;
  }
  return CM_OK;
}

/* The other ranks: connect (rank 0 may not listen yet: retried until the timeout). */
static cm_status tcp_connect_root(cm_comm *c, tcp_state *s, const struct addrinfo *ai,
                                  cm_err *err) {
  cm_comm_call call = {.op = CM_COMM_OP_BARRIER};
  snprintf(call.what, sizeof call.what, "the TCP rendezvous");
  tcp_io io = {c, &call, cm_comm_now() + c->timeout_s, err};
  int fd = -1, last_errno = 0;
  while (fd < 0) {
    if (cm_comm_now() > io.deadline)
      return cm_errorf(err, CM_EINTERNAL,
                       "comm tcp: rank %d: cannot connect to rank 0 within %g s: %s", c->rank,
                       c->timeout_s, strerror(last_errno));
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
      last_errno = errno;
      close(fd);
      fd = -1;
      tcp_sleep_ms(50);
    }
  }
  tcp_socket_options(fd);
  s->fds[0] = fd;
  tcp_header hello = {.magic = TCP_MAGIC, .count = c->size, .root = c->rank}, go;
  cm_status st = tcp_send_all(&io, fd, 0, &hello, sizeof hello);
  if (st == CM_OK) st = tcp_recv_all(&io, fd, 0, &go, sizeof go);
  if (st == CM_OK && (go.magic != TCP_MAGIC || go.count != c->size))
    st = cm_errorf(err, CM_EINVALID, "comm tcp: rank %d: rank 0 answered the rendezvous wrongly",
                   c->rank);
  return st;
}

static cm_status tcp_listen(const struct addrinfo *ai, int *out, cm_err *err, const char *where) {
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
  if (fd < 0) return cm_errorf(err, CM_EINTERNAL, "comm tcp: socket: %s", strerror(errno));
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, TCP_MAX_RANKS) != 0) {
    cm_status st = cm_errorf(err, CM_EINVALID, "comm tcp: rank 0 cannot listen on %s: %s", where,
                             strerror(errno));
    close(fd);
    return st;
  }
  *out = fd;
  return CM_OK;
}

cm_status cm_comm_tcp_open(cm_comm *c, cm_err *err) {
  long rank = 0, size = 0, port = 0;
  cm_status st = tcp_env_int("CMAEC_WORLD_SIZE", 1, TCP_MAX_RANKS, 0, &size, err);
  if (st == CM_OK) st = tcp_env_int("CMAEC_RANK", 0, size - 1, -1, &rank, err);
  if (st == CM_OK) st = tcp_env_int("CMAEC_MASTER_PORT", 1, 65535, TCP_DEFAULT_PORT, &port, err);
  if (st != CM_OK) return st;
  const char *host = getenv("CMAEC_MASTER_ADDR");
  if (!host || !*host) host = "127.0.0.1";
  char where[300], service[16];
  snprintf(where, sizeof where, "%s:%ld", host, port);
  snprintf(service, sizeof service, "%ld", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
  int gai = getaddrinfo(host, service, &hints, &ai);
  if (gai != 0)
    return cm_errorf(err, CM_EINVALID, "comm tcp: $CMAEC_MASTER_ADDR %s: %s", where,
                     gai_strerror(gai));
  tcp_state *s = calloc(1, sizeof *s);
  int n_fds = rank == 0 ? (int)size : 1;
  if (s) s->fds = malloc((size_t)n_fds * sizeof *s->fds);
  if (!s || !s->fds) {
    freeaddrinfo(ai);
    free(s);
    return cm_errorf(err, CM_EINTERNAL, "comm tcp: out of memory");
  }
  s->n_fds = n_fds;
  for (int i = 0; i < n_fds; i++) s->fds[i] = -1;
  c->rank = (int)rank;
  c->size = (int)size;
  c->state = s;
  if (rank == 0 && size > 1) {
    int listener = -1;
    st = tcp_listen(ai, &listener, err, where);
    if (st == CM_OK) {
      st = tcp_accept_all(c, s, listener, err);
      close(listener);
    }
  } else if (rank != 0) {
    st = tcp_connect_root(c, s, ai, err);
  }
  freeaddrinfo(ai);
  if (st != CM_OK) {
    tcp_destroy(c, true);
    return st;
  }
  c->backend = &tcp_backend;
  snprintf(c->description, sizeof c->description, "tcp rank %d/%d (rendezvous %s)", c->rank,
           c->size, where);
  return CM_OK;
}
