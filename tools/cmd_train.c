/* tools/cmd_train.c — cmaec train: pretraining a model variant (cm_train). */
#include "cli.h"

#include "../runtime/runtime.h"

#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_train[] =
    "usage: cmaec train MODEL.json [--data fashion-mnist|DIR] [--epochs N | --steps N]\n"
    "                   [--batch B] [--out DIR] [--resume DIR] [--backend auto|cpu|cuda|ref]\n"
    "                   [--device N] [--cuda-graphs on|off] [--threads N] [--workers N]\n"
    "                   [--log-every N] [--seed N] [--precision auto|f32|bf16|f16]\n"
    "                   [--views shift|rrc] [--ckpt-every N] [--keep N] [--set KEY=VALUE ...]\n"
    "                   [--tune [--tune-budget SECONDS]]\n"
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
  o.overrides = sets;
  o.n_overrides = n_sets;
  o.data = opts[1].value;
  o.log = stdout;
  o.progress_tty = -1;
  o.stop = &stop_flag;
  if (!int_options(opts, &o)) {
    rc = EXIT_INVALID;
    goto out;
  }
  o.tune = opts[18].given;
  o.tune_budget_s = 180;
  if (opts[19].given && (!opts[18].given || !cli_parse_double(opts[19].value, &o.tune_budget_s) ||
                         o.tune_budget_s < 0)) {
    fprintf(stderr, "cmaec train: --tune-budget %s: seconds >= 0 (0: no limit), with --tune\n",
            opts[19].value);
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
  o.device = req.device;
  o.cuda_graphs = req.graphs;
  char def_out[512];
  if (opts[6].given) {
    if (opts[5].given && strcmp(opts[5].value, opts[6].value) != 0) {
      fprintf(stderr, "cmaec train: --out %s and --resume %s differ\n", opts[5].value,
              opts[6].value);
      rc = EXIT_INVALID;
      goto out;
    }
    o.out_dir = opts[6].value;
    o.resume = true;
  } else if (opts[5].given) {
    o.out_dir = opts[5].value;
  } else {
    const char *base = strrchr(pos[0], '/');
    base = base ? base + 1 : pos[0];
    size_t len = strlen(base);
    if (len > 5 && strcmp(base + len - 5, ".json") == 0) len -= 5;
    snprintf(def_out, sizeof def_out, "runs/%.*s", (int)len, base);
    o.out_dir = def_out;
  }

  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old);
  cm_train_result r;
  cm_err err = {0};
  cm_status st = cm_train(&o, &r, &err);
  sigaction(SIGINT, &old, NULL);
  if (st) {
    rc = cli_report(&err, pos[0]);
    goto out;
  }
  if (r.last_step > r.first_step)
    printf("done: step %lld, loss %.6g (loss_rc %.6g, loss_ct %.6g), %.1f images/s\n",
           (long long)r.last_step, r.loss, r.loss_rc, r.loss_ct, r.images_per_s);
  printf("metrics: %s/metrics.jsonl\n", o.out_dir);
  if (r.checkpoint[0]) printf("checkpoint: %s\n", r.checkpoint);
  if (r.interrupted) {
    printf("interrupted at step %lld; continue with --resume %s\n", (long long)r.last_step,
           o.out_dir);
    rc = 130;
  }
out:
  free(sets);
  free(args);
  return rc;
}
