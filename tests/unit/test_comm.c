/* tests/unit/test_comm.c — cm_comm (docs/runtime.md "Communication"): every collective on
 * every dtype against sums the test computes itself from every rank's data (each rank
 * regenerates the others' random inputs from their seeds), in place and asynchronously, on
 * LOCAL groups of threads, on TCP ranks forked from this process, and on MPI ranks started by
 * mpirun (this binary re-run as `test_comm --mpi-rank MODE`); the watchdog (a rank that never
 * calls, a rank killed) and mismatched counts. */
#include "../../runtime/runtime.h"
#include "../test.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { COUNT = 1037, MAX_RANKS = 4 };
static const double unit_f32 = 1.0 / (1 << 24), unit_bf16 = 1.0 / (1 << 8);

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- every rank's inputs, reproducible on every rank ------------------------ */

static uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* element i of rank r's input of case k, as a double the dtype holds exactly */
static double input_value(int k, int r, int64_t i, cm_dtype dt) {
  uint64_t h = mix(((uint64_t)k << 40) ^ ((uint64_t)r << 32) ^ (uint64_t)i);
  if (dt == CM_I32) return (double)(int32_t)(h % 2000001) - 1000000.0;
  if (dt == CM_I64) return (double)((int64_t)(h % 2000000000001ull) - 1000000000000ll);
  double u = (double)(h >> 11) / 9007199254740992.0 * 8.0 - 4.0; /* [-4, 4) */
  return dt == CM_BF16 ? (double)cm_bf16_to_f32(cm_f64_to_bf16(u)) : (double)(float)u;
}

static size_t dtype_bytes(cm_dtype dt) {
  return dt == CM_BF16 ? 2 : dt == CM_I64 ? 8 : 4;
}

static void store(void *buf, int64_t i, cm_dtype dt, double v) {
  if (dt == CM_F32) ((float *)buf)[i] = (float)v;
  if (dt == CM_BF16) ((uint16_t *)buf)[i] = cm_f64_to_bf16(v);
  if (dt == CM_I32) ((int32_t *)buf)[i] = (int32_t)v;
  if (dt == CM_I64) ((int64_t *)buf)[i] = (int64_t)v;
}

static double load(const void *buf, int64_t i, cm_dtype dt) {
  if (dt == CM_F32) return ((const float *)buf)[i];
  if (dt == CM_BF16) return cm_bf16_to_f32(((const uint16_t *)buf)[i]);
  if (dt == CM_I32) return ((const int32_t *)buf)[i];
  return (double)((const int64_t *)buf)[i];
}

static void fill_input(void *buf, int k, int r, int64_t n, cm_dtype dt) {
  for (int64_t i = 0; i < n; i++) store(buf, i, dt, input_value(k, r, i, dt));
}

/* Does got match the sum (mean) over ranks of element i of case k? The bound: a sum of size
 * terms accumulated in f32 errs by at most (size - 1) u sum|x|; MEAN's scaling and bf16's
 * final rounding add a relative unit each. Integers: exact. */
static bool reduced_ok(double got, int k, int64_t i, cm_dtype dt, cm_reduce_mode mode, int size) {
  double sum = 0, abs_sum = 0;
  for (int r = 0; r < size; r++) {
    double v = input_value(k, r, i, dt);
    sum += v;
    abs_sum += fabs(v);
  }
  if (dt == CM_I32 || dt == CM_I64) return got == sum;
  double want = mode == CM_MODE_MEAN ? sum / size : sum;
  double scale = mode == CM_MODE_MEAN ? 1.0 / size : 1.0;
  double bound = (size - 1) * unit_f32 * abs_sum * scale + unit_f32 * fabs(want) * 2;
  if (dt == CM_BF16) bound = bound * (1 + unit_bf16) + unit_bf16 * (fabs(want) + bound);
  return fabs(got - want) <= bound;
}

/* ---- one rank's checks (thread, forked process or MPI rank alike) ------------- */

typedef struct rank_report {
  int failures;
  char first[512];
} rank_report;

static void report_fail(rank_report *rep, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void report_fail(rank_report *rep, const char *fmt, ...) {
  if (rep->failures++ == 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rep->first, sizeof rep->first, fmt, ap);
    va_end(ap);
  }
}

static const cm_dtype dtypes[] = {CM_F32, CM_BF16, CM_I32, CM_I64};

static void check_all_reduce(cm_comm *c, int k, cm_dtype dt, cm_reduce_mode mode, bool in_place,
                             rank_report *rep) {
  int rank = cm_comm_rank(c), size = cm_comm_size(c);
  void *send = malloc(COUNT * dtype_bytes(dt)), *recv = malloc(COUNT * dtype_bytes(dt));
  fill_input(send, k, rank, COUNT, dt);
  cm_err e = {0};
  if (cm_comm_all_reduce(c, send, in_place ? send : recv, COUNT, dt, mode, "test all_reduce", &e) !=
      CM_OK) {
    report_fail(rep, "case %d: all_reduce failed: %s", k, e.msg);
  } else {
    const void *out = in_place ? send : recv;
    for (int64_t i = 0; i < COUNT; i++)
      if (!reduced_ok(load(out, i, dt), k, i, dt, mode, size)) {
        report_fail(rep,
                    "case %d: all_reduce dtype %d mode %d in_place %d: element %" PRId64 " = %.9g",
                    k, (int)dt, (int)mode, (int)in_place, i, load(out, i, dt));
        break;
      }
  }
  free(send);
  free(recv);
}

/* in_place: all_gather's input at the start of its output, reduce_scatter's result at the
 * start of its input */
static void check_gather_scatter(cm_comm *c, int k, cm_dtype dt, bool in_place, rank_report *rep) {
  int rank = cm_comm_rank(c), size = cm_comm_size(c);
  size_t eb = dtype_bytes(dt);
  void *mine = malloc(COUNT * eb), *all = malloc((size_t)size * COUNT * eb);
  fill_input(in_place ? all : mine, k, rank, COUNT, dt);
  cm_err e = {0};
  if (cm_comm_all_gather(c, in_place ? all : mine, all, COUNT, dt, "test all_gather", &e) != CM_OK)
    report_fail(rep, "case %d: all_gather failed: %s", k, e.msg);
  else
    for (int r = 0; r < size; r++)
      for (int64_t i = 0; i < COUNT; i++)
        if (load(all, (int64_t)r * COUNT + i, dt) != input_value(k, r, i, dt)) {
          report_fail(rep, "case %d: all_gather (in place %d): rank %d's element %" PRId64, k,
                      (int)in_place, r, i);
          r = size;
          break;
        }
  /* reduce_scatter: rank r's input of case k + 1 holds size slices; recv: slice `rank` */
  void *full = malloc((size_t)size * COUNT * eb);
  fill_input(full, k + 1, rank, (int64_t)size * COUNT, dt);
  cm_reduce_mode mode = dt == CM_F32 || dt == CM_BF16 ? CM_MODE_MEAN : CM_MODE_SUM;
  void *out = in_place ? full : mine;
  if (cm_comm_reduce_scatter(c, full, out, COUNT, dt, mode, "test reduce_scatter", &e) != CM_OK)
    report_fail(rep, "case %d: reduce_scatter failed: %s", k, e.msg);
  else
    for (int64_t i = 0; i < COUNT; i++)
      if (!reduced_ok(load(out, i, dt), k + 1, (int64_t)rank * COUNT + i, dt, mode, size)) {
        report_fail(rep, "case %d: reduce_scatter dtype %d: element %" PRId64, k, (int)dt, i);
        break;
      }
  /* broadcast from the last rank */
  fill_input(mine, k + 2, rank, COUNT, dt);
  if (cm_comm_broadcast(c, mine, COUNT, dt, size - 1, "test broadcast", &e) != CM_OK)
    report_fail(rep, "case %d: broadcast failed: %s", k, e.msg);
  else
    for (int64_t i = 0; i < COUNT; i++)
      if (load(mine, i, dt) != input_value(k + 2, size - 1, i, dt)) {
        report_fail(rep, "case %d: broadcast dtype %d: element %" PRId64, k, (int)dt, i);
        break;
      }
  free(mine);
  free(all);
  free(full);
}

enum { ASYNC_REQUESTS = 4 };

/* Several all_reduces in flight, a blocking one between them, waited for in reverse order. */
static void check_async(cm_comm *c, rank_report *rep) {
  int rank = cm_comm_rank(c), size = cm_comm_size(c);
  void *buf[ASYNC_REQUESTS + 1];
  cm_comm_request *req[ASYNC_REQUESTS] = {0};
  cm_err e = {0};
  for (int q = 0; q <= ASYNC_REQUESTS; q++) {
    cm_dtype dt = q % 2 ? CM_BF16 : CM_F32;
    buf[q] = malloc(COUNT * dtype_bytes(dt));
    fill_input(buf[q], 100 + q, rank, COUNT, dt);
    cm_status st =
        q == ASYNC_REQUESTS
            ? cm_comm_all_reduce(c, buf[q], buf[q], COUNT, dt, CM_MODE_SUM, "test blocking", &e)
            : cm_comm_all_reduce_start(c, buf[q], buf[q], COUNT, dt, CM_MODE_MEAN, "test async",
                                       &req[q], &e);
    if (st != CM_OK) report_fail(rep, "async request %d failed to start: %s", q, e.msg);
  }
  for (int q = ASYNC_REQUESTS - 1; q >= 0; q--)
    if (req[q] && cm_comm_wait(req[q], &e) != CM_OK) report_fail(rep, "wait %d: %s", q, e.msg);
  for (int q = 0; q <= ASYNC_REQUESTS; q++) {
    cm_dtype dt = q % 2 ? CM_BF16 : CM_F32;
    cm_reduce_mode mode = q == ASYNC_REQUESTS ? CM_MODE_SUM : CM_MODE_MEAN;
    for (int64_t i = 0; i < COUNT; i++)
      if (!reduced_ok(load(buf[q], i, dt), 100 + q, i, dt, mode, size)) {
        report_fail(rep, "async request %d: element %" PRId64, q, i);
        break;
      }
    free(buf[q]);
  }
}

/* Empty collectives (NULL buffers allowed), and one of 4 MiB a rank: larger than a socket's
 * buffer, so TCP's sends and receives come in parts while rank 0 reads the ranks in turn. */
static void check_sizes(cm_comm *c, rank_report *rep) {
  cm_err e = {0};
  if (cm_comm_all_reduce(c, NULL, NULL, 0, CM_F32, CM_MODE_SUM, "empty all_reduce", &e) != CM_OK ||
      cm_comm_all_gather(c, NULL, NULL, 0, CM_I64, "empty all_gather", &e) != CM_OK)
    report_fail(rep, "empty collectives: %s", e.msg);
  enum { LARGE = 1 << 20 };
  float *big = malloc(LARGE * sizeof *big);
  fill_input(big, 300, cm_comm_rank(c), LARGE, CM_F32);
  if (cm_comm_all_reduce(c, big, big, LARGE, CM_F32, CM_MODE_SUM, "large all_reduce", &e) != CM_OK)
    report_fail(rep, "large all_reduce: %s", e.msg);
  else
    for (int64_t i = 0; i < LARGE; i++)
      if (!reduced_ok(big[i], 300, i, CM_F32, CM_MODE_SUM, cm_comm_size(c))) {
        report_fail(rep, "large all_reduce: element %" PRId64 " = %.9g", i, (double)big[i]);
        break;
      }
  free(big);
}

static void check_rank(cm_comm *c, rank_report *rep) {
  check_sizes(c, rep);
  int k = 0;
  for (size_t d = 0; d < sizeof dtypes / sizeof *dtypes; d++) {
    bool is_float = dtypes[d] == CM_F32 || dtypes[d] == CM_BF16;
    for (int in_place = 0; in_place < 2; in_place++) {
      check_all_reduce(c, k++, dtypes[d], CM_MODE_SUM, in_place, rep);
      if (is_float) check_all_reduce(c, k++, dtypes[d], CM_MODE_MEAN, in_place, rep);
    }
    check_gather_scatter(c, 50 + 3 * (int)d, dtypes[d], false, rep);
    check_gather_scatter(c, 70 + 3 * (int)d, dtypes[d], true, rep);
  }
  cm_err e = {0};
  if (cm_comm_barrier(c, "test barrier", &e) != CM_OK) report_fail(rep, "barrier: %s", e.msg);
  check_async(c, rep);
}

/* ---- LOCAL groups ------------------------------------------------------------- */

typedef struct local_job {
  cm_comm *comm;
  void (*body)(cm_comm *c, rank_report *rep);
  rank_report rep;
} local_job;

static void *local_thread(void *arg) {
  local_job *j = arg;
  j->body(j->comm, &j->rep);
  return NULL;
}

/* Runs body on every rank of a LOCAL group of n threads; returns the reports. */
static void run_local(int n, double timeout_s, void (*body)(cm_comm *, rank_report *),
                      local_job *jobs) {
  cm_comm *comms[MAX_RANKS];
  cm_err e = {0};
  CHECK_MSG(cm_comm_local_group(n, timeout_s, comms, &e) == CM_OK, "%s", e.msg);
  if (e.status != CM_OK) return;
  pthread_t th[MAX_RANKS];
  for (int r = 0; r < n; r++) {
    memset(&jobs[r], 0, sizeof jobs[r]);
    jobs[r].comm = comms[r];
    jobs[r].body = body;
    CHECK(pthread_create(&th[r], NULL, local_thread, &jobs[r]) == 0);
  }
  for (int r = 0; r < n; r++) pthread_join(th[r], NULL);
  for (int r = 0; r < n; r++) {
    CHECK(cm_comm_rank(comms[r]) == r && cm_comm_size(comms[r]) == n);
    CHECK(cm_comm_kind_of(comms[r]) == CM_COMM_LOCAL);
    cm_comm_free(comms[r]);
  }
}

static void test_local_collectives(void) {
  for (int n = 2; n <= 3; n++) {
    local_job jobs[MAX_RANKS];
    run_local(n, 30, check_rank, jobs);
    for (int r = 0; r < n; r++)
      CHECK_MSG(jobs[r].rep.failures == 0, "local %d ranks, rank %d: %d failures, first: %s", n, r,
                jobs[r].rep.failures, jobs[r].rep.first);
  }
}

static void test_self(void) {
  cm_comm_opts o = {.kind = CM_COMM_SELF};
  cm_comm *c = NULL;
  cm_err e = {0};
  CHECK_MSG(cm_comm_init(&o, &c, &e) == CM_OK, "%s", e.msg);
  if (!c) return;
  CHECK(cm_comm_size(c) == 1 && cm_comm_rank(c) == 0);
  CHECK_STR_CONTAINS(cm_comm_describe(c), "self");
  rank_report rep = {0};
  check_rank(c, &rep);
  CHECK_MSG(rep.failures == 0, "self: %d failures, first: %s", rep.failures, rep.first);
  /* a bad call is an error naming the rule, not a crash */
  float x = 0;
  CHECK(cm_comm_all_reduce(c, &x, &x, 1, CM_I32, CM_MODE_MEAN, "bad mean", &e) == CM_EINVALID);
  CHECK_STR_CONTAINS(e.msg, "MEAN on f32 or bf16");
  CHECK(cm_comm_broadcast(c, &x, 1, CM_F32, 1, "bad root", &e) == CM_EINVALID);
  CHECK_STR_CONTAINS(e.msg, "root 1");
  CHECK(cm_comm_all_gather(c, &x, &x, 1, CM_F64, "bad dtype", &e) == CM_EINVALID);
  CHECK_STR_CONTAINS(e.msg, "bad dtype");
  cm_comm_free(c);
}

/* Rank 0 sends 8 elements, rank 1 5: both fail naming both counts. */
static void mismatch_body(cm_comm *c, rank_report *rep) {
  float buf[8] = {0};
  int64_t n = cm_comm_rank(c) == 0 ? 8 : 5;
  cm_err e = {0};
  if (cm_comm_all_reduce(c, buf, buf, n, CM_F32, CM_MODE_SUM, "mismatched bucket", &e) == CM_OK)
    report_fail(rep, "mismatched counts succeeded");
  else
    snprintf(rep->first, sizeof rep->first, "%s", e.msg);
}

static void check_mismatch_message(const char *msg, int rank) {
  char me[32];
  snprintf(me, sizeof me, "rank %d:", rank);
  CHECK_STR_CONTAINS(msg, me);
  CHECK_STR_CONTAINS(msg, "mismatched bucket");
  CHECK_STR_CONTAINS(msg, "rank 0 has all_reduce of 8 f32 elements");
  CHECK_STR_CONTAINS(msg, "rank 1 has all_reduce of 5 f32 elements");
}

static void test_local_mismatch(void) {
  local_job jobs[2];
  run_local(2, 30, mismatch_body, jobs);
  for (int r = 0; r < 2; r++) {
    CHECK(jobs[r].rep.failures == 0);
    check_mismatch_message(jobs[r].rep.first, r);
  }
}

/* Rank 1 never calls the all_reduce: rank 0 fails after the timeout (1 s), naming it. */
static double watchdog_elapsed;
static void watchdog_body(cm_comm *c, rank_report *rep) {
  float buf[4] = {0};
  cm_err e = {0};
  if (cm_comm_rank(c) != 0) return;
  double t0 = now_s();
  if (cm_comm_all_reduce(c, buf, buf, 4, CM_F32, CM_MODE_SUM, "grad bucket 7", &e) == CM_OK)
    report_fail(rep, "the all_reduce without rank 1 succeeded");
  watchdog_elapsed = now_s() - t0;
  snprintf(rep->first, sizeof rep->first, "%s", e.msg);
  /* broken: the next collective fails at once */
  t0 = now_s();
  if (cm_comm_barrier(c, "after", &e) == CM_OK || now_s() - t0 > 0.5)
    report_fail(rep, "a collective on a broken comm did not fail at once");
}

static void test_local_watchdog(void) {
  local_job jobs[2];
  run_local(2, 1.0, watchdog_body, jobs);
  CHECK(jobs[0].rep.failures == 0);
  CHECK_STR_CONTAINS(
      jobs[0].rep.first,
      "comm: rank 0: grad bucket 7 (all_reduce, 4 elements) did not finish within 1 s");
  CHECK_MSG(watchdog_elapsed >= 0.9 && watchdog_elapsed < 3.0, "failed after %.2f s",
            watchdog_elapsed);
}

/* ---- TCP ranks: forked processes on loopback ---------------------------------- */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  int port = -1;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) close(fd);
  return port;
}

/* Forks size ranks of the TCP rendezvous, each running body (its return value is its exit
 * status); waits until rank 0 has exited (every rank when all_ranks) or deadline_s, then kills
 * and reaps the rest. status[r]: the exit status, or -1 (killed by a signal or by the test). */
static double fork_tcp_ranks(int size, int (*body)(int rank, int size), bool all_ranks,
                             double deadline_s, int *status) {
  int port = free_port();
  CHECK(port > 0);
  pid_t pids[MAX_RANKS];
  fflush(stdout);
  fflush(stderr);
  double t0 = now_s();
  for (int r = 0; r < size; r++) {
    pids[r] = fork();
    if (pids[r] == 0) {
      char v[32];
      snprintf(v, sizeof v, "%d", r);
      setenv("CMAEC_RANK", v, 1);
      snprintf(v, sizeof v, "%d", size);
      setenv("CMAEC_WORLD_SIZE", v, 1);
      snprintf(v, sizeof v, "%d", port);
      setenv("CMAEC_MASTER_PORT", v, 1);
      setenv("CMAEC_MASTER_ADDR", "127.0.0.1", 1);
      int code = body(r, size);
      fflush(stdout);
      fflush(stderr);
      exit(code); /* not _exit: the sanitizer build checks the rank for leaks */
    }
    status[r] = -1;
  }
  double rank0_done = -1;
  for (int left = size; left > 0 && now_s() - t0 < deadline_s;) {
    for (int r = 0; r < size; r++) {
      int ws = 0;
      if (pids[r] > 0 && waitpid(pids[r], &ws, WNOHANG) == pids[r]) {
        status[r] = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
        pids[r] = 0;
        left--;
        if (r == 0) rank0_done = now_s() - t0;
      }
    }
    if (!all_ranks && pids[0] == 0) break;
    usleep(10000);
  }
  for (int r = 0; r < size; r++)
    if (pids[r] > 0) {
      kill(pids[r], SIGKILL);
      waitpid(pids[r], NULL, 0);
    }
  return rank0_done;
}

static cm_comm *tcp_child_comm(double timeout_s) {
  cm_comm_opts o = {.kind = CM_COMM_AUTO, .timeout_s = timeout_s, .device = -1};
  cm_comm *c = NULL;
  cm_err e = {0};
  if (cm_comm_init(&o, &c, &e) != CM_OK) {
    fprintf(stderr, "rank %s: cm_comm_init: %s\n", getenv("CMAEC_RANK"), e.msg);
    return NULL;
  }
  if (cm_comm_kind_of(c) != CM_COMM_TCP || !strstr(cm_comm_describe(c), "tcp rank")) {
    fprintf(stderr, "AUTO with $CMAEC_WORLD_SIZE chose %s\n", cm_comm_describe(c));
    cm_comm_free(c);
    return NULL;
  }
  return c;
}

static int tcp_collectives_child(int rank, int size) {
  cm_comm *c = tcp_child_comm(20);
  if (!c) return 1;
  rank_report rep = {0};
  if (cm_comm_rank(c) != rank || cm_comm_size(c) != size) report_fail(&rep, "rank or size");
  check_rank(c, &rep);
  if (rep.failures)
    fprintf(stderr, "tcp rank %d: %d failures, first: %s\n", rank, rep.failures, rep.first);
  cm_comm_free(c);
  return rep.failures ? 1 : 0;
}

static void test_tcp_collectives(void) {
  for (int size = 2; size <= 3; size++) {
    int status[MAX_RANKS];
    fork_tcp_ranks(size, tcp_collectives_child, true, 30, status);
    for (int r = 0; r < size; r++)
      CHECK_MSG(status[r] == 0, "tcp %d ranks: rank %d exited with %d", size, r, status[r]);
  }
}

static int tcp_mismatch_child(int rank, int size) {
  cm_comm *c = tcp_child_comm(20);
  if (!c) return 1;
  rank_report rep = {0};
  mismatch_body(c, &rep);
  char me[32];
  snprintf(me, sizeof me, "rank %d:", rank);
  int ok = rep.failures == 0 && strstr(rep.first, me) && strstr(rep.first, "mismatched bucket") &&
           strstr(rep.first, "rank 0 has all_reduce of 8 f32 elements") &&
           strstr(rep.first, "rank 1 has all_reduce of 5 f32 elements");
  if (!ok) fprintf(stderr, "tcp mismatch, rank %d: \"%s\"\n", rank, rep.first);
  cm_comm_free(c);
  return ok ? 0 : 1;
}

static void test_tcp_mismatch(void) {
  int status[2];
  fork_tcp_ranks(2, tcp_mismatch_child, true, 30, status);
  CHECK_MSG(status[0] == 0 && status[1] == 0, "exit statuses %d %d", status[0], status[1]);
}

/* Rank 1 never calls the collective (it sleeps) or is killed with SIGKILL; rank 0 (timeout
 * 2 s) must fail within timeout + 2 s naming the collective, `what` and the rank. */
static int tcp_watchdog_child(int rank, int size, bool kill_rank1) {
  cm_comm *c = tcp_child_comm(2);
  if (!c) return 1;
  cm_err e = {0};
  if (cm_comm_barrier(c, "before", &e) != CM_OK) return 1;
  if (rank == 1) {
    if (kill_rank1) raise(SIGKILL);
    sleep(30);
    return 0;
  }
  float buf[4] = {0};
  double t0 = now_s();
  cm_status st = cm_comm_all_reduce(c, buf, buf, 4, CM_F32, CM_MODE_SUM, "grad bucket 3", &e);
  double took = now_s() - t0;
  bool ok = st != CM_OK && took < 4.0 && strstr(e.msg, "comm: rank 0: grad bucket 3") &&
            strstr(e.msg, "all_reduce") && strstr(e.msg, "rank 1");
  if (!kill_rank1) ok = ok && took > 1.9 && strstr(e.msg, "did not finish within 2 s");
  if (!ok) fprintf(stderr, "tcp watchdog (kill %d): %.2f s: \"%s\"\n", kill_rank1, took, e.msg);
  cm_comm_free(c);
  return ok ? 0 : 1;
}
static int tcp_silent_child(int rank, int size) {
  return tcp_watchdog_child(rank, size, false);
}
static int tcp_killed_child(int rank, int size) {
  return tcp_watchdog_child(rank, size, true);
}

static void test_tcp_watchdog(void) {
  int status[2];
  double took = fork_tcp_ranks(2, tcp_silent_child, false, 10, status);
  CHECK_MSG(status[0] == 0, "silent rank 1: rank 0 exited with %d after %.2f s", status[0], took);
  took = fork_tcp_ranks(2, tcp_killed_child, false, 10, status);
  CHECK_MSG(status[0] == 0, "killed rank 1: rank 0 exited with %d after %.2f s", status[0], took);
  CHECK(status[1] == -1);
}

/* ---- MPI ranks: this binary under mpirun ------------------------------------------
 * test_mpi runs `mpirun -np N test_comm test_mpi_rank` with $CMAEC_COMM_TEST naming what the
 * ranks do; each rank writes its pid (and rank 0 its verdict) next to $CMAEC_COMM_TEST_OUT. */
#ifndef CMAEC_MPIRUN
#define CMAEC_MPIRUN ""
#endif

static void mpi_rank_note(const char *suffix, const char *text) {
  char path[512];
  snprintf(path, sizeof path, "%s.%s", getenv("CMAEC_COMM_TEST_OUT"), suffix);
  FILE *f = fopen(path, "w");
  if (f) {
    fputs(text, f);
    fclose(f);
  }
}

/* Rank 0's all_reduce while rank 1 sleeps or is killed: the verdict file says "ok" or why not. */
static void mpi_rank_watchdog(cm_comm *c, bool kill_rank1) {
  cm_err e = {0};
  if (cm_comm_barrier(c, "before", &e) != CM_OK) mpi_rank_note("verdict0", e.msg);
  if (cm_comm_rank(c) == 1) {
    if (kill_rank1) raise(SIGKILL);
    sleep(60);
    return;
  }
  float buf[4] = {0};
  double t0 = now_s();
  cm_status st = cm_comm_all_reduce(c, buf, buf, 4, CM_F32, CM_MODE_SUM, "grad bucket 3", &e);
  double took = now_s() - t0;
  char verdict[1200];
  bool ok = st != CM_OK && took > 1.9 && took < 4.0 &&
            strstr(e.msg, "comm: rank 0: grad bucket 3 (all_reduce, 4 elements) did not finish "
                          "within 2 s");
  snprintf(verdict, sizeof verdict, "%s after %.2f s: %s", ok ? "ok" : "wrong", took, e.msg);
  mpi_rank_note("verdict0", verdict);
  cm_comm_free(c); /* broken: MPI_Abort, which ends this process and the job */
  mpi_rank_note("verdict0", "wrong: cm_comm_free of a broken MPI comm returned");
}

static void test_mpi_rank(void) {
  const char *mode = getenv("CMAEC_COMM_TEST");
  cm_comm_opts o = {.kind = CM_COMM_AUTO, .timeout_s = 20, .device = -1};
  cm_comm *c = NULL;
  cm_err e = {0};
  if (!mode || !getenv("OMPI_COMM_WORLD_SIZE")) { /* not under mpirun: AUTO is world size 1 */
    CHECK_MSG(cm_comm_init(&o, &c, &e) == CM_OK, "%s", e.msg);
    CHECK(cm_comm_kind_of(c) == CM_COMM_SELF && cm_comm_size(c) == 1);
    cm_comm_free(c);
    return;
  }
  if (strcmp(mode, "collectives") != 0) o.timeout_s = 2;
  CHECK_MSG(cm_comm_init(&o, &c, &e) == CM_OK, "%s", e.msg);
  if (!c) return;
  CHECK(cm_comm_kind_of(c) == CM_COMM_MPI);
  CHECK_STR_CONTAINS(cm_comm_describe(c), "Open MPI");
  char pid[32], suffix[32];
  snprintf(pid, sizeof pid, "%d", (int)getpid());
  snprintf(suffix, sizeof suffix, "pid%d", cm_comm_rank(c));
  mpi_rank_note(suffix, pid);
  if (strcmp(mode, "collectives") == 0) { /* failed checks: a non-zero exit, mpirun's too */
    rank_report rep = {0};
    check_rank(c, &rep);
    CHECK_MSG(rep.failures == 0, "mpi rank %d: %d failures, first: %s", cm_comm_rank(c),
              rep.failures, rep.first);
    cm_comm_free(c);
    return;
  }
  if (strcmp(mode, "mismatch") == 0) { /* the verdict first: the broken comm's free aborts */
    rank_report rep = {0};
    mismatch_body(c, &rep);
    int before = test_failures;
    CHECK(rep.failures == 0);
    check_mismatch_message(rep.first, cm_comm_rank(c));
    snprintf(suffix, sizeof suffix, "verdict%d", cm_comm_rank(c));
    mpi_rank_note(suffix, test_failures == before ? "ok" : rep.first);
    if (cm_comm_rank(c) == 0) { /* rank 1's verdict first: rank 0's abort ends rank 1 */
      char path[512];
      snprintf(path, sizeof path, "%s.verdict1", getenv("CMAEC_COMM_TEST_OUT"));
      for (double t0 = now_s(); access(path, F_OK) != 0 && now_s() - t0 < 10;) usleep(10000);
    }
    cm_comm_free(c);
    return;
  }
  mpi_rank_watchdog(c, strcmp(mode, "killed") == 0);
}

/* Is pid gone (or a zombie nobody waits for)? */
static bool process_gone(int pid) {
  char path[64], state = 0;
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return true;
  int got = fscanf(f, "%*d %*s %c", &state);
  fclose(f);
  return got == 1 && (state == 'Z' || state == 'X');
}

/* Runs mpirun -np n of test_mpi_rank in mode; returns mpirun's exit status (-1: signaled or
 * killed at the deadline); verdict: rank 0's; every rank's pid must be gone after. */
static int run_mpirun(int n, const char *mode, double deadline_s, char *verdict, size_t size) {
  char exe[4096], out[4096], np[16];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
  CHECK(len > 0);
  exe[len > 0 ? len : 0] = 0;
  snprintf(out, sizeof out, "/tmp/cmaec_test_comm_%d_%s", (int)getpid(), mode);
  snprintf(np, sizeof np, "%d", n);
  fflush(stdout);
  fflush(stderr);
  double t0 = now_s();
  pid_t pid = fork();
  if (pid == 0) {
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("CMAEC_COMM_TEST", mode, 1);
    setenv("CMAEC_COMM_TEST_OUT", out, 1);
    /* the sanitizer build: Open MPI's plugins, unloaded by MPI_Finalize, leave one-time
     * allocations that no suppression can name (their module is gone); this process and the
     * LOCAL and TCP ranks check comm.c's leaks */
    char asan[512];
    const char *old = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof asan, "%s%sdetect_leaks=0", old ? old : "", old && *old ? ":" : "");
    setenv("ASAN_OPTIONS", asan, 1);
    /* TCP between the ranks: no shared-memory segments in a container's small /dev/shm */
    execl(CMAEC_MPIRUN, CMAEC_MPIRUN, "-np", np, "--oversubscribe", "--mca", "btl", "self,tcp",
          "--mca", "btl_tcp_if_include", "lo", exe, "test_mpi_rank", (char *)NULL);
    _exit(127);
  }
  int ws = 0, status = -1;
  verdict[0] = 0;
  while (now_s() - t0 < deadline_s && waitpid(pid, &ws, WNOHANG) == 0) usleep(20000);
  if (now_s() - t0 >= deadline_s) {
    kill(pid, SIGKILL);
    waitpid(pid, &ws, 0);
    CHECK_MSG(false, "mpirun %s did not end within %.0f s", mode, deadline_s);
  } else if (WIFEXITED(ws)) {
    status = WEXITSTATUS(ws);
  }
  char path[4200];
  FILE *f = NULL;
  for (int r = 0; r < n; r++) { /* rank r's verdict, if it wrote one, after the others' */
    snprintf(path, sizeof path, "%s.verdict%d", out, r);
    f = fopen(path, "r");
    size_t at = strlen(verdict);
    if (f) {
      at += (size_t)snprintf(verdict + at, size - at, "%s", r == 0 ? "" : "; ");
      size_t got = at < size ? fread(verdict + at, 1, size - 1 - at, f) : 0;
      verdict[at + got] = 0;
      fclose(f);
    }
    remove(path);
  }
  for (int r = 0; r < n; r++) {
    snprintf(path, sizeof path, "%s.pid%d", out, r);
    int rank_pid = 0;
    f = fopen(path, "r");
    CHECK_MSG(f && fscanf(f, "%d", &rank_pid) == 1, "mpi %s: rank %d wrote no pid", mode, r);
    if (f) fclose(f);
    remove(path);
    for (double t1 = now_s(); rank_pid > 0 && !process_gone(rank_pid) && now_s() - t1 < 3;)
      usleep(20000);
    CHECK_MSG(rank_pid <= 0 || process_gone(rank_pid), "mpi %s: rank %d (pid %d) still runs", mode,
              r, rank_pid);
  }
  return status;
}

static void test_mpi(void) {
  CHECK_MSG(CMAEC_MPIRUN[0], "mpirun was not found when cmaec was configured: install Open MPI "
                             "(scripts/install-deps.sh: openmpi-bin libopenmpi-dev)");
  if (!CMAEC_MPIRUN[0]) return;
  char verdict[1400];
  int status = run_mpirun(2, "collectives", 30, verdict, sizeof verdict);
  CHECK_MSG(status == 0, "mpi collectives: mpirun exited with %d", status);
  /* a mismatch breaks the comm: its free ends the job (MPI_Abort, status 1) */
  status = run_mpirun(2, "mismatch", 30, verdict, sizeof verdict);
  CHECK_MSG(strcmp(verdict, "ok; ok") == 0, "mpi mismatch: the ranks said \"%s\"", verdict);
  CHECK_MSG(status == 1, "mpi mismatch: mpirun exited with %d", status);
  status = run_mpirun(2, "silent", 20, verdict, sizeof verdict);
  CHECK_MSG(strncmp(verdict, "ok", 2) == 0, "mpi silent rank: rank 0 said \"%s\"", verdict);
  CHECK_MSG(status != 0, "mpi silent rank: mpirun exited with 0");
  status = run_mpirun(2, "killed", 20, verdict, sizeof verdict);
  CHECK_MSG(status != 0, "mpi killed rank: mpirun exited with 0");
}

/* ---- NCCL ------------------------------------------------------------------------
 * Without a GPU: the library is found and every symbol resolved, then the missing driver is
 * the error (a missing library is one too, naming it). With one: a 1-rank comm through the
 * real NCCL, every collective on device buffers, ordered after a compute stream. */
static void nccl_one_rank(cm_comm *c, const cm_cuda_driver *d) {
  void *stream = NULL;
  CHECK(d->stream_create(&stream, CM_CU_STREAM_NON_BLOCKING) == 0);
  cm_comm_set_compute_stream(c, stream);
  for (size_t k = 0; k < sizeof dtypes / sizeof *dtypes; k++) {
    cm_dtype dt = dtypes[k];
    size_t bytes = COUNT * dtype_bytes(dt);
    void *host = malloc(bytes), *back = malloc(bytes);
    cm_cu_ptr in = 0, out = 0;
    CHECK(d->mem_alloc(&in, bytes) == 0 && d->mem_alloc(&out, bytes) == 0);
    fill_input(host, 200 + (int)k, 0, COUNT, dt);
    CHECK(d->memcpy_htod_async(in, host, bytes, stream) == 0);
    cm_reduce_mode mode = dt == CM_F32 || dt == CM_BF16 ? CM_MODE_MEAN : CM_MODE_SUM;
    cm_err e = {0};
    void *pin = (void *)(uintptr_t)in, *pout = (void *)(uintptr_t)out;
    CHECK_MSG(cm_comm_all_reduce(c, pin, pout, COUNT, dt, mode, "nccl all_reduce", &e) == CM_OK,
              "%s", e.msg);
    cm_comm_request *req = NULL;
    CHECK_MSG(cm_comm_all_reduce_start(c, pout, pout, COUNT, dt, CM_MODE_SUM, "nccl async", &req,
                                       &e) == CM_OK &&
                  cm_comm_wait(req, &e) == CM_OK,
              "%s", e.msg);
    CHECK_MSG(cm_comm_all_gather(c, pout, pout, COUNT, dt, "nccl all_gather", &e) == CM_OK, "%s",
              e.msg);
    CHECK_MSG(cm_comm_broadcast(c, pout, COUNT, dt, 0, "nccl broadcast", &e) == CM_OK, "%s", e.msg);
    CHECK_MSG(cm_comm_barrier(c, "nccl barrier", &e) == CM_OK, "%s", e.msg);
    CHECK(d->memcpy_dtoh_async(back, out, bytes, stream) == 0 &&
          d->stream_synchronize(stream) == 0);
    CHECK_MSG(memcmp(host, back, bytes) == 0, "nccl dtype %d: one rank's result is not its input",
              (int)dt);
    d->mem_free(in);
    d->mem_free(out);
    free(host);
    free(back);
  }
  cm_comm_set_compute_stream(c, NULL);
  d->stream_destroy(stream);
}

static void test_nccl(void) {
  cm_comm_opts o = {.kind = CM_COMM_NCCL, .timeout_s = 20, .device = -1};
  cm_comm *c = NULL;
  cm_err e = {0};
  setenv("CMAEC_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
  CHECK(cm_comm_init(&o, &c, &e) == CM_EINVALID && !c);
  CHECK_STR_CONTAINS(e.msg, "NCCL not found");
  CHECK_STR_CONTAINS(e.msg, "/nonexistent/libnccl.so.2");
  unsetenv("CMAEC_NCCL_LIBRARY");
  const cm_cuda_driver *d = NULL;
  cm_err no_gpu = {0};
  bool gpu = cm_cuda_driver_load(&d, &no_gpu) == CM_OK;
  cm_status st = cm_comm_init(&o, &c, &e);
  if (!gpu) {
    printf("test_nccl: no CUDA driver here: the 1-rank NCCL run is tests/gpu's\n");
    CHECK(st == CM_EINVALID && !c);
    CHECK_STR_CONTAINS(e.msg, "comm nccl: CUDA driver not found");
    return;
  }
  CHECK_MSG(st == CM_OK, "%s", e.msg);
  if (!c) return;
  CHECK_STR_CONTAINS(cm_comm_describe(c), "nccl rank 0/1");
  printf("test_nccl: %s\n", cm_comm_describe(c));
  nccl_one_rank(c, d);
  cm_comm_free(c);
}

TEST_MAIN(TEST(test_self), TEST(test_local_collectives), TEST(test_local_mismatch),
          TEST(test_local_watchdog), TEST(test_tcp_collectives), TEST(test_tcp_mismatch),
          TEST(test_tcp_watchdog), TEST(test_mpi_rank), TEST(test_mpi), TEST(test_nccl))
