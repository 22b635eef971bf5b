/* tools/cli_tune.c — cmaec tune: the autotuner over a variant's training step (cm_tune), and
 * the tuning database's report. */
#include "cli.h"

#include <stdlib.h>
#include <string.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_tune[] =
    "usage: cmaec tune MODEL.json [--backend auto|cpu|cuda] [--device N] [--budget SECONDS]\n"
    "                  [--batch N] [--threads N] [--max-candidates N] [--max-stages N]\n"
    "                  [--db PATH] [--measure step|kernel] [--set KEY=VALUE ...]\n"
    "       cmaec tune --report [--db PATH] [--device-id ID]\n"
    "\n"
    "Searches the plans of every distinct tunable kernel stage of the variant's training step\n"
    "(as `cmaec train` builds it, at the batch N, default optimizer.batch; train.precision\n"
    "resolved for the backend) on this machine: the CPU's GEMM register blocks and cache\n"
    "tiles and attention blocks; CUDA's GEMM block and warp tiles, pipeline stages, split-K\n"
    "and row kernels' threads. Most expensive stages first, each with its share of the\n"
    "budget (default 180 s; 0: no limit); the fastest candidate is checked against the oracle.\n"
    "--measure step (the CPU's default): candidates are timed inside whole training steps\n"
    "(a valid batch: random images, sampled masks), every stage's next candidate in the same\n"
    "step, in rounds run by a forked child: with the data, neighbours and caches of training.\n"
    "--measure kernel (CUDA's): each candidate alone on random data. Every trial and the best\n"
    "go to the tuning database (--db, default $CMAEC_CACHE_DIR/tuning.db), keyed by the\n"
    "kernel's structure, the device (CPU, vector bits, threads; GPU, sm, driver) and the\n"
    "search-space version: a second tune searches nothing. Programs compiled later (train,\n"
    "eval, the benches) use the best plans; CMAEC_TUNE=off disables that.\n"
    "--max-candidates N: at most N plans per stage; --max-stages N: only the N most\n"
    "expensive stages. --report prints per stage the default and best times, the speedup\n"
    "and the best plan.\n";

/* Takes the repeatable --set flags out of argv (cli_parse keeps one value per option). */
static int split_sets(int argc, char **argv, const char **sets, int *n_sets, char **args,
                      int *n_args) {
  *n_sets = *n_args = 0;
  for (int i = 0; i < argc; i++) {
    if (i >= 2 && strcmp(argv[i], "--set") == 0) {
      if (i + 1 >= argc)
        return fprintf(stderr, "cmaec tune: option --set needs a value\n"), EXIT_INVALID;
      sets[(*n_sets)++] = argv[++i];
    } else if (i >= 2 && strncmp(argv[i], "--set=", 6) == 0) {
      sets[(*n_sets)++] = argv[i] + 6;
    } else {
      args[(*n_args)++] = argv[i];
    }
  }
  args[*n_args] = NULL;
  return EXIT_OK;
}

typedef struct tune_args {
  const char *model, *db;
  int batch, threads;
  double budget;
  int64_t max_candidates, max_stages;
  bool measure_kernel;
} tune_args;

static bool parse_limit(const cli_option *o, int64_t max, int64_t *out) {
  uint64_t v;
  if (!o->given) return true;
  if (cli_parse_u64(o->value, &v) && v >= 1 && v <= (uint64_t)max) {
    *out = (int64_t)v;
    return true;
  }
  fprintf(stderr, "cmaec tune: %s %s: not an integer in [1, %lld]\n", o->name, o->value,
          (long long)max);
  return false;
}

/* The step, as cm_train builds it for the chosen backend, tuned. */
static int tune_model(const tune_args *a, const char *const *sets, int n_sets,
                      cm_backend_choice *choice) {
  cm_err err = {0};
  cm_model_config cfg;
  if (cm_model_config_load(a->model, sets, n_sets, &cfg, &err)) return cli_report(&err, a->model);
  if (a->batch > 0) cfg.optimizer.batch = a->batch;
  cm_dtype low;
  if (cm_model_config_validate(&cfg, &err) ||
      cm_train_precision_resolve(cfg.train.precision, choice->kind, &low, &err))
    return cli_report(&err, a->model);
  cm_graph *g = NULL;
  if (cm_train_build_step(&cfg, low, &g, NULL, &err)) return cli_report(&err, a->model);
  cm_compile_opts co = {0};
  co.threads = a->threads;
  const cm_target *target = cm_backend_compile_opts(choice, &co);
  cm_tune_opts to = {a->budget, true, a->db, a->max_candidates, (int)a->max_stages, NULL};
  cm_tensor *sources = NULL, **bound = NULL;
  if (!a->measure_kernel && choice->kind == CM_BACKEND_CPU) {
    sources = calloc((size_t)g->n_nodes + 1, sizeof *sources);
    bound = calloc((size_t)g->n_nodes + 1, sizeof *bound);
    if (!sources || !bound) {
      free(sources), free(bound), cm_graph_free(g);
      return fprintf(stderr, "cmaec tune: out of memory\n"), EXIT_INTERNAL;
    }
    if (cm_train_example_sources(&cfg, g, 1, sources, &err)) {
      free(sources), free(bound), cm_graph_free(g);
      return cli_report(&err, a->model);
    }
    for (int i = 0; i < g->n_nodes; i++) bound[i] = sources[i].data ? &sources[i] : NULL;
    to.step_sources = bound;
  }
  cm_tune_stats ts;
  printf("tune %s (batch %d, %s) on %s\n", a->model, cfg.optimizer.batch, cm_dtype_name(low),
         choice->description);
  char cbuf[4096];
  if (!a->db && !cm_cache_dir(NULL, cbuf, sizeof cbuf))
    printf("caching is disabled (CMAEC_CACHE_DIR=\"\"): nothing will be recorded or used\n");
  fflush(stdout);
  cm_status st = cm_tune(g, target, &co, &to, &ts, &err);
  if (sources) cm_train_example_sources_free(g, sources);
  free(sources);
  free(bound);
  cm_graph_free(g);
  if (st) return cli_report(&err, a->model);
  printf("%d tunable stages: %d searched, %d from the database, %d over budget; %d candidates "
         "measured (%d failed), %d pruned; %.1f s\n",
         ts.stages_tunable, ts.searched, ts.from_db, ts.over_budget, ts.candidates, ts.failed,
         ts.pruned, ts.seconds);
  if (ts.searched > 0)
    printf("searched stages: default %.3f ms, tuned %.3f ms (%.2fx)\n", ts.default_ms, ts.tuned_ms,
           ts.tuned_ms > 0 ? ts.default_ms / ts.tuned_ms : 0);
  return EXIT_OK;
}

int cmd_tune(int argc, char **argv) {
  for (int i = 2; i < argc; i++) /* the report's own options: tools/cmd_tune_report.c */
    if (!strcmp(argv[i], "--report")) return cmd_tune_report(argc, argv);
  const char **sets = malloc(sizeof(char *) * (size_t)(argc + 1));
  char **args = malloc(sizeof(char *) * (size_t)(argc + 1));
  int n_sets, n_args, rc;
  if (!sets || !args) {
    free(sets);
    free(args);
    return fprintf(stderr, "cmaec tune: out of memory\n"), EXIT_INTERNAL;
  }
  if ((rc = split_sets(argc, argv, sets, &n_sets, args, &n_args))) goto out;
  cli_option opts[] = {{"--help", false, NULL, false},          {"--backend", true, NULL, false},
                       {"--device", true, NULL, false},         {"--budget", true, NULL, false},
                       {"--batch", true, NULL, false},          {"--threads", true, NULL, false},
                       {"--max-candidates", true, NULL, false}, {"--db", true, NULL, false},
                       {"--report", false, NULL, false},        {"--max-stages", true, NULL, false},
                       {"--measure", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(n_args, args, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "tune")) {
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[0].given) {
    fputs(usage_tune, stdout);
    goto out;
  }
  tune_args a = {n_pos ? pos[0] : NULL, opts[7].value, 0, 0, 180, 0, 0, false};
  int64_t batch = 0, threads = 0;
  if (n_pos != 1) {
    fputs(usage_tune, stderr);
    rc = EXIT_INVALID;
    goto out;
  }
  if (opts[3].given && (!cli_parse_double(opts[3].value, &a.budget) || a.budget < 0)) {
    fprintf(stderr, "cmaec tune: --budget %s: seconds >= 0 (0: no limit)\n", opts[3].value);
    rc = EXIT_INVALID;
    goto out;
  }
  if (!parse_limit(&opts[4], 1000000, &batch) || !parse_limit(&opts[5], 4096, &threads) ||
      !parse_limit(&opts[6], INT64_C(1) << 40, &a.max_candidates) ||
      !parse_limit(&opts[9], 1000000, &a.max_stages)) {
    rc = EXIT_INVALID;
    goto out;
  }
  a.batch = (int)batch, a.threads = (int)threads;
  if (opts[10].given) {
    if (strcmp(opts[10].value, "step") && strcmp(opts[10].value, "kernel")) {
      fprintf(stderr, "cmaec tune: --measure %s: step or kernel\n", opts[10].value);
      rc = EXIT_INVALID;
      goto out;
    }
    a.measure_kernel = !strcmp(opts[10].value, "kernel");
  }
  cm_backend_choice choice;
  if ((rc = cli_backend(&opts[1], &opts[2], NULL, false, CM_BACKEND_AUTO, "tune", &choice)))
    goto out;
  rc = tune_model(&a, sets, n_sets, &choice);
out:
  free(sets);
  free(args);
  return rc;
}
