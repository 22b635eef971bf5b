/* tools/cmd_train.c — cmaec train: pretraining a model variant (cm_train). */
#include "cli.h"

#include "../runtime/runtime.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_train[] =
    "usage: cmaec train MODEL.json [--data fashion-mnist|DIR] [--epochs N | --steps N]\n"
    "                   [--batch B] [--out DIR] [--resume DIR] [--backend auto|cpu|cuda|ref]\n"
    "                   [--device N] [--cuda-graphs on|off] [--threads N] [--workers N]\n"
    "                   [--log-every N] [--seed N] [--precision auto|f32|bf16|f16]\n"
    "                   [--views shift|rrc] [--ckpt-every N] [--keep N] [--set KEY=VALUE ...]\n"
    "                   [--tune [--tune-budget SECONDS]] [--nproc N]\n"
    "                   [--comm-timeout SECONDS]\n"
    "\n"
    "Pretrains the variant on Fashion-MNIST (default) or an image folder DIR/<class>/<file>:\n"
    "builds its training step (AdamW, EMA targets) at the batch B (default optimizer.batch;\n"
    "the lr scales with it), runs it on the chosen backend (below; ref: the reference\n"
    "evaluator), logs DIR/metrics.jsonl (one row per step) and writes checkpoints\n"
    "DIR/ckpt-<step>.safetensors every --ckpt-every steps (default: only at the end; the\n"
    "newest --keep, default 3, are kept; DIR/latest names the newest). --epochs N sets\n"
    "schedule.epochs; --steps N stops after step N (the schedule stays the config's).\n"
    "--resume DIR continues from DIR/latest exactly where it stopped (params, moments,\n"
    "EMA params, schedule and data order), with the same MODEL and --set flags, on any\n"
    "backend (a checkpoint holds host tensors).\n"
    "--precision sets train.precision (auto: bf16 on CUDA, f32 on the CPU and ref): the\n"
    "contractions' operands; params, AdamW moments and EMA targets stay f32.\n"
    "--tune searches the step's kernel plans first (cmaec tune; default budget 180 s) and\n"
    "trains with the best; without it the tuning database's plans are used when it has them\n"
    "(CMAEC_TUNE=off: never).\n"
    "Ctrl-C finishes the current step, saves a checkpoint and exits with 130.\n"
    "Data parallelism: --nproc N starts N local processes (ranks) that train together\n"
    "(CMAEC_RANK, CMAEC_WORLD_SIZE, CMAEC_MASTER_ADDR, CMAEC_MASTER_PORT; LOCAL_RANK picks\n"
    "the GPU), as does `mpirun -np N cmaec train ...`. B stays the global batch: each rank\n"
    "runs B / N samples of every global batch and the gradients are averaged over the\n"
    "ranks, so the run is that of one process at batch B. Rank 0 alone prints and writes\n"
    "metrics and checkpoints, which resume at any N. --comm-timeout S (default 300) limits\n"
    "every collective: a rank that died or ranks that disagree end the run (exit 1).\n"
    "Default --out: runs/<variant>. Exit codes: 0 ok, 1 internal failure, 2 invalid input\n"
    "(also a non-finite loss), 130 interrupted.\n";

static volatile sig_atomic_t stop_flag = 0;

static void on_sigint(int sig) {
  (void)sig;
  stop_flag = 1;
}

static bool parse_int(const char *s, int64_t max, int64_t *out) {
  uint64_t v;
  if (!cli_parse_u64(s, &v) || v > (uint64_t)max) return false;
  *out = (int64_t)v;
  return true;
}

/* The integer options (--epochs, --steps, --batch, --threads, --workers,
 * --log-every, --ckpt-every, --keep) into o; false (reported) when one is out of range. */
static bool int_options(cli_option *opts, cm_train_opts *o) {
  int64_t v = 0;
  static const struct {
    int opt;
    int64_t max;
  } ints[] = {{2, 1000000},        {3, INT64_C(1) << 40},  {4, 1 << 20},    {8, 4096},
              {9, CM_MAX_WORKERS}, {10, INT64_C(1) << 40}, {13, INT32_MAX}, {14, 1000000}};
  for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
    cli_option *op = &opts[ints[k].opt];
    if (!op->given) continue;
    if (!parse_int(op->value, ints[k].max, &v) || v < 1) {
      fprintf(stderr, "cmaec train: %s %s: not an integer in [1, %lld]\n", op->name, op->value,
              (long long)ints[k].max);
      return false;
    }
    switch (ints[k].opt) {
    case 2: o->epochs = v; break;
    case 3: o->steps = v; break;
    case 4: o->batch = (int)v; break;
    case 8: o->threads = (int)v; break;
    case 10: o->log_every = v; break;
    case 14: o->keep = (int)v; break;
    default: break; /* --workers, --ckpt-every: config keys, set below */
    }
  }
  return true;
}

/* --seed, --views, --workers, --ckpt-every and --precision as config keys (train.*, so
 * checkpoints record them): "key=value" strings in set_buf appended to sets;
 * false (reported) on a bad value. */
static bool config_key_options(const cli_option *opts, const char **sets, int *n_sets,
                               char set_buf[5][64]) {
  static const struct {
    int opt;
    const char *key;
  } keys[] = {
      {11, "train.seed"},       {12, "train.views"},     {9, "train.workers"},
      {13, "train.ckpt_every"}, {17, "train.precision"},
  };
  for (int q = 0; q < 5; q++) {
    const cli_option *op = &opts[keys[q].opt];
    if (!op->given) continue;
    uint64_t u;
    if (keys[q].opt == 11 && (!cli_parse_u64(op->value, &u) || u > INT32_MAX)) {
      fprintf(stderr, "cmaec train: --seed %s: not an integer in [0, %d]\n", op->value, INT32_MAX);
      return false;
    }
    if (keys[q].opt == 12 && strcmp(op->value, "shift") != 0 && strcmp(op->value, "rrc") != 0) {
      fprintf(stderr, "cmaec train: --views %s: expected shift or rrc\n", op->value);
      return false;
    }
    snprintf(set_buf[q], sizeof set_buf[q], "%s=%s", keys[q].key, op->value);
    sets[(*n_sets)++] = set_buf[q];
  }
  return true;
}

/* --tune and --tune-budget into o; false (reported) when misused. */
static bool tune_options(const cli_option *tune, const cli_option *budget, cm_backend_kind kind,
                         cm_train_opts *o) {
  o->tune = tune->given;
  o->tune_budget_s = 180;
  if (budget->given && (!tune->given || !cli_parse_double(budget->value, &o->tune_budget_s) ||
                        o->tune_budget_s < 0)) {
    fprintf(stderr, "cmaec train: --tune-budget %s: seconds >= 0 (0: no limit), with --tune\n",
            budget->value);
    return false;
  }
  if (o->tune && kind == CM_BACKEND_REF) {
    fprintf(stderr,
            "cmaec train: --tune applies to the cpu and cuda backends (ref has no kernels)\n");
    return false;
  }
  return true;
}

/* The world size a launcher gave this process: mpirun (OMPI_COMM_WORLD_SIZE, PMI_SIZE) or
 * --nproc and torchrun-style launchers (CMAEC_WORLD_SIZE); 1 without one. */
static int launched_world(void) {
  static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "CMAEC_WORLD_SIZE"};
  for (size_t k = 0; k < sizeof vars / sizeof vars[0]; k++) {
    const char *v = getenv(vars[k]);
    uint64_t n;
    if (v && cli_parse_u64(v, &n) && n >= 1 && n <= 65536) return (int)n;
  }
  return 1;
}

/* A TCP port free on the loopback now (the kernel's pick); 0 when none. */
static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = 0;
  if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

static double monotonic_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A child's status as a shell reports it (128 + the signal when killed). */
static int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : EXIT_INTERNAL;
}

/* Rank r of nproc: this command again (its argv, --nproc included: the variables say it is a
 * rank), with the rendezvous's variables. Never returns. */
static void exec_rank(char **argv, int r, int nproc, int port) {
  char rank[16], world[16], port_s[16];
  snprintf(rank, sizeof rank, "%d", r);
  snprintf(world, sizeof world, "%d", nproc);
  snprintf(port_s, sizeof port_s, "%d", port);
  setenv("CMAEC_RANK", rank, 1);
  setenv("CMAEC_WORLD_SIZE", world, 1);
  setenv("CMAEC_MASTER_ADDR", "127.0.0.1", 1);
  setenv("CMAEC_MASTER_PORT", port_s, 1);
  setenv("LOCAL_RANK", rank, 1);
  /* the ranks share this machine's cores rather than each taking all of them */
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  char threads[16];
  snprintf(threads, sizeof threads, "%ld", cores > nproc ? cores / nproc : 1);
  setenv("CMAEC_THREADS", threads, 0);
  execv("/proc/self/exe", argv);
  fprintf(stderr, "cmaec train: rank %d: cannot start /proc/self/exe: %s\n", r, strerror(errno));
  _exit(EXIT_INTERNAL);
}

/* cmaec train --nproc N: N ranks of this command on 127.0.0.1, waited for. After the first
 * rank that fails, the others have the watchdog's timeout (+ 1 s) to end by themselves (they
 * report the collective that did not finish); any still running then is killed. Ctrl-C
 * reaches the ranks from the terminal: they agree on it and save. Returns 0, or the first
 * failed rank's status. */
static int launch_ranks(char **argv, int nproc, double timeout_s) {
  int port = free_port();
  pid_t *pids = calloc((size_t)nproc, sizeof *pids);
  if (!port || !pids) {
    free(pids);
    fprintf(stderr, "cmaec train: --nproc: %s\n",
            pids ? "no free TCP port on 127.0.0.1 for the rendezvous" : "out of memory");
    return EXIT_INTERNAL;
  }
  struct sigaction ignore, old;
  memset(&ignore, 0, sizeof ignore);
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  sigaction(SIGINT, &ignore, &old);
  fflush(stdout);
  fflush(stderr);
  int running = 0, rc = EXIT_OK, failed = -1;
  double deadline = 0;
  for (int r = 0; r < nproc; r++) {
    pid_t pid = fork();
    if (pid == 0) {
      sigaction(SIGINT, &old, NULL);
      exec_rank(argv, r, nproc, port);
    }
    if (pid < 0) {
      fprintf(stderr, "cmaec train: cannot start rank %d: %s\n", r, strerror(errno));
      rc = EXIT_INTERNAL, failed = r, deadline = monotonic_s(); /* the started ones are killed */
      break;
    }
    pids[r] = pid;
    running++;
  }
  while (running > 0) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    int r = 0;
    while (pid > 0 && r < nproc && pids[r] != pid) r++;
    if (pid > 0 && r < nproc) {
      pids[r] = 0;
      running--;
      int code = exit_code(status);
      if (code != 0 && failed < 0) {
        failed = r, rc = code, deadline = monotonic_s() + timeout_s + 1;
        if (running)
          fprintf(stderr, "cmaec train: rank %d exited with status %d; the other ranks have %g s\n",
                  r, code, timeout_s + 1);
      }
      continue;
    }
    if (failed >= 0 && monotonic_s() > deadline) {
      for (int k = 0; k < nproc; k++)
        if (pids[k] > 0 && kill(pids[k], SIGKILL) == 0)
          fprintf(stderr, "cmaec train: rank %d killed: still running after rank %d failed\n", k,
                  failed);
      deadline = INFINITY; /* reaped by the next waits */
    }
    struct timespec nap = {0, 20 * 1000 * 1000};
    nanosleep(&nap, NULL);
  }
  sigaction(SIGINT, &old, NULL);
  free(pids);
  return rc;
}

/* --nproc and --comm-timeout; false (reported) when out of range. */
static bool rank_options(const cli_option *nproc_opt, const cli_option *timeout_opt, int *nproc,
                         double *timeout_s) {
  int64_t n = 1;
  *timeout_s = 300;
  if (nproc_opt->given && (!parse_int(nproc_opt->value, 1024, &n) || n < 1)) {
    fprintf(stderr, "cmaec train: --nproc %s: not an integer in [1, 1024]\n", nproc_opt->value);
    return false;
  }
  if (timeout_opt->given &&
      (!cli_parse_double(timeout_opt->value, timeout_s) || !(*timeout_s > 0) || *timeout_s > 1e6)) {
    fprintf(stderr, "cmaec train: --comm-timeout %s: seconds in (0, 1e6]\n", timeout_opt->value);
    return false;
  }
  *nproc = (int)n;
  int world = launched_world();
  if (nproc_opt->given && world > 1 && world != n) {
    fprintf(stderr, "cmaec train: --nproc %d, but the launcher started %d ranks\n", (int)n, world);
    return false;
  }
  return true;
}

/* --out and --resume into o (def_out: the default runs/<variant>); false (reported) when they
 * differ. */
static bool out_options(const cli_option *out, const cli_option *resume, const char *model,
                        cm_train_opts *o, char *def_out, size_t size) {
  if (resume->given) {
    if (out->given && strcmp(out->value, resume->value) != 0) {
      fprintf(stderr, "cmaec train: --out %s and --resume %s differ\n", out->value, resume->value);
      return false;
    }
    o->out_dir = resume->value;
    o->resume = true;
  } else if (out->given) {
    o->out_dir = out->value;
  } else {
    const char *base = strrchr(model, '/');
    base = base ? base + 1 : model;
    size_t len = strlen(base);
    if (len > 5 && strcmp(base + len - 5, ".json") == 0) len -= 5;
    snprintf(def_out, size, "runs/%.*s", (int)len, base);
    o->out_dir = def_out;
  }
  return true;
}

/* Runs cm_train in this process: one rank of a launched group (its comm: NCCL for the CUDA
 * backend, else MPI under mpirun or the TCP rendezvous) or the only process. */
static int run_train(cm_train_opts *o, const char *model, cm_backend_kind kind, bool device_given,
                     double timeout_s) {
  cm_err err = {0};
  cm_comm *comm = NULL;
  int rank = 0;
  if (launched_world() > 1) {
    cm_comm_opts co = {kind == CM_BACKEND_CUDA ? CM_COMM_NCCL : CM_COMM_AUTO, timeout_s, -1};
    if (cm_comm_init(&co, &comm, &err)) return cli_report(&err, model);
    rank = cm_comm_rank(comm);
    o->comm = comm;
    if (rank != 0) o->log = NULL; /* the others print only errors */
    const char *local = getenv("LOCAL_RANK");
    uint64_t dev;
    if (!device_given && local && cli_parse_u64(local, &dev) && dev < 1024) o->device = (int)dev;
  }
  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old);
  cm_train_result r;
  cm_status st = cm_train(o, &r, &err);
  sigaction(SIGINT, &old, NULL);
  int rc = EXIT_OK;
  if (st) {
    rc = cli_report(&err, model);
  } else if (rank == 0) {
    if (r.last_step > r.first_step)
      printf("done: step %lld, loss %.6g (loss_rc %.6g, loss_ct %.6g), %.1f images/s\n",
             (long long)r.last_step, r.loss, r.loss_rc, r.loss_ct, r.images_per_s);
    printf("metrics: %s/metrics.jsonl\n", o->out_dir);
    if (r.checkpoint[0]) printf("checkpoint: %s\n", r.checkpoint);
    if (r.interrupted)
      printf("interrupted at step %lld; continue with --resume %s\n", (long long)r.last_step,
             o->out_dir);
  }
  if (!st && r.interrupted) rc = 130;
  fflush(stdout);
  cm_comm_free(comm); /* after a failed collective: ends the job (MPI_Abort under mpirun) */
  return rc;
}

int cmd_train(int argc, char **argv) {
  const char **sets = malloc(sizeof(char *) * (size_t)(argc + 5));
  char **args = malloc(sizeof(char *) * (size_t)(argc + 1));
  int n_sets = 0, n_args = 0, rc = EXIT_OK;
  if (!sets || !args) {
    free(sets);
    free(args);
    return fprintf(stderr, "cmaec train: out of memory\n"), EXIT_INTERNAL;
  }
  /* --set repeats; cli_parse keeps one value per option */
  for (int i = 0; i < argc; i++) {
    if (i >= 2 && strcmp(argv[i], "--set") == 0) {
      if (i + 1 >= argc) {
        fprintf(stderr, "cmaec train: option --set needs a value\n");
        rc = EXIT_INVALID;
        goto out;
      }
      sets[n_sets++] = argv[++i];
    } else if (i >= 2 && strncmp(argv[i], "--set=", 6) == 0) {
      sets[n_sets++] = argv[i] + 6;
    } else {
      args[n_args++] = argv[i];
    }
  }
  args[n_args] = NULL;
  cli_option opts[] = {
      {"--help", false, NULL, false},       {"--data", true, NULL, false},
      {"--epochs", true, NULL, false},      {"--steps", true, NULL, false},
      {"--batch", true, NULL, false},       {"--out", true, NULL, false},
      {"--resume", true, NULL, false},      {"--backend", true, NULL, false},
      {"--threads", true, NULL, false},     {"--workers", true, NULL, false},
      {"--log-every", true, NULL, false},   {"--seed", true, NULL, false},
      {"--views", true, NULL, false},       {"--ckpt-every", true, NULL, false},
      {"--keep", true, NULL, false},        {"--device", true, NULL, false},
      {"--cuda-graphs", true, NULL, false}, {"--precision", true, NULL, false},
      {"--tune", false, NULL, false},       {"--tune-budget", true, NULL, false},
      {"--nproc", true, NULL, false},       {"--comm-timeout", true, NULL, false},
  };
  const char *pos[1];
  int n_pos;
  if (!cli_parse(n_args, args, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "train")) {
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[0].given) {
    fputs(usage_train, stdout);
    fputs(cli_backend_usage, stdout);
    goto out;
  }
  if (n_pos != 1) {
    fprintf(stderr, "cmaec train: expected one MODEL.json (see cmaec train --help)\n");
    rc = EXIT_INVALID;
    goto out;
  }
  cm_train_opts o = {0};
  o.model_path = pos[0];
  o.data = opts[1].value;
  o.log = stdout;
  o.progress_tty = -1;
  o.stop = &stop_flag;
  int nproc;
  double timeout_s;
  if (!int_options(opts, &o) || !rank_options(&opts[20], &opts[21], &nproc, &timeout_s)) {
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[2].given && opts[3].given) {
    fprintf(stderr, "cmaec train: give --epochs or --steps, not both\n");
    rc = EXIT_INVALID;
    goto out;
  }
  /* the run's settings are config keys (train.*), so checkpoints record them */
  char set_buf[5][64];
  if (!config_key_options(opts, sets, &n_sets, set_buf)) {
    rc = EXIT_INVALID;
    goto out;
  }
  o.overrides = sets;
  o.n_overrides = n_sets;
  /* resolved here too, so that a missing driver stops the run before the data loads */
  cm_backend_choice choice;
  if ((rc = cli_backend(&opts[7], &opts[15], &opts[16], true, CM_BACKEND_AUTO, "train", &choice)))
    goto out;
  cm_backend_request req;
  cli_backend_request(&opts[7], &opts[15], &opts[16], true, CM_BACKEND_AUTO, "train", &req);
  static const cm_train_backend train_kinds[] = {[CM_BACKEND_AUTO] = CM_TRAIN_AUTO,
                                                 [CM_BACKEND_CPU] = CM_TRAIN_CPU,
                                                 [CM_BACKEND_CUDA] = CM_TRAIN_CUDA,
                                                 [CM_BACKEND_REF] = CM_TRAIN_REF};
  o.backend = train_kinds[req.kind];
  char def_out[512];
  if (!tune_options(&opts[18], &opts[19], req.kind, &o) ||
      !out_options(&opts[5], &opts[6], pos[0], &o, def_out, sizeof def_out)) {
    rc = EXIT_INVALID;
    goto out;
  }
  o.device = req.device;
  o.cuda_graphs = req.graphs;
  if (nproc > 1 && launched_world() == 1)
    rc = launch_ranks(argv, nproc, timeout_s);
  else
    rc = run_train(&o, pos[0], choice.kind, opts[15].given, timeout_s);
out:
  free(sets);
  free(args);
  return rc;
}
