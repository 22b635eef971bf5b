/* tools/cmd_graph.c — cmaec check, print, dot, run, info. */
#include "cli.h"
#include "runtime/runtime.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_check[] =
    "usage: cmaec check GRAPH\n"
    "\n"
    "Reads GRAPH (graph JSON, or text IR when the file does not start with '{'),\n"
    "verifies it, and prints a summary: nodes by category and op, sources, outputs.\n"
    "An invalid graph prints one line 'GRAPH: place: rule' and exits with 2.\n";

static const char usage_print[] =
    "usage: cmaec print GRAPH [--json]\n"
    "\n"
    "Prints GRAPH as text IR (one line per node), or as canonical graph JSON with --json.\n";

static const char usage_dot[] = "usage: cmaec dot GRAPH\n"
                                "\n"
                                "Prints GRAPH in Graphviz dot; nodes are coloured by op category.\n"
                                "Example: cmaec dot examples/mlp.json | dot -Tpng -o mlp.png\n";

static const char usage_run[] =
    "usage: cmaec run GRAPH [--inputs IN.safetensors] [--outputs OUT.safetensors]\n"
    "                 [--backend auto|cpu|cuda|ref] [--device N] [--cuda-graphs on|off]\n"
    "                 [--seed N] [--precision native|f64] [--quiet]\n"
    "\n"
    "Evaluates GRAPH. Every input node is read from IN (by name, exact dtype and shape).\n"
    "Params and state are read from IN when present there, else initialized from their\n"
    "initializer with --seed (default 0); one with no initializer must be in IN.\n"
    "Outputs are written to OUT under their node names (and printed unless --quiet).\n"
    "  --backend ref         the reference evaluator (the default with --precision f64)\n"
    "  --precision native    each value in its node's dtype (default)\n"
    "  --precision f64       floating values kept in f64 (outputs written as f64; ref only)\n";

static const char usage_info[] = "usage: cmaec info\n"
                                 "\n"
                                 "Prints the version and, for each of LLVM, NVRTC, the CUDA\n"
                                 "driver, NCCL and MPI, whether it was found, and why not\n"
                                 "where not; then the CUDA devices (ordinal, name, memory,\n"
                                 "compute capability, SMs, the arch kernels are compiled for).\n";

int cmd_check(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "check")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_check, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_check, stderr), EXIT_INVALID;
  cm_graph *g;
  int rc = cli_load_graph(pos[0], &g);
  if (rc) return rc;
  int per_op[CM_OP_COUNT] = {0}, per_cat[8] = {0};
  int64_t param_elems = 0, state_elems = 0;
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    per_op[n->op]++;
    per_cat[cm_op_get_info(n->op)->category]++;
    if (n->op == CM_OP_PARAM) param_elems += cm_type_numel(&n->type);
    if (n->op == CM_OP_STATE) state_elems += cm_type_numel(&n->type);
  }
  printf("%s: ok: %d nodes, %d outputs\n", pos[0], g->n_nodes, g->n_outputs);
  printf("  inputs %d, params %d (%" PRId64 " elements), state %d (%" PRId64 " elements)\n",
         per_op[CM_OP_INPUT], per_op[CM_OP_PARAM], param_elems, per_op[CM_OP_STATE], state_elems);
  for (int c = 0; c <= CM_CAT_UPDATE; c++) {
    if (!per_cat[c]) continue;
    printf("  %-12s %4d:", cm_category_name((cm_category)c), per_cat[c]);
    for (int op = 0; op < CM_OP_COUNT; op++)
      if (per_op[op] && cm_op_get_info((cm_op)op)->category == (cm_category)c)
        printf(" %s %d", cm_op_name((cm_op)op), per_op[op]);
    printf("\n");
  }
  for (int k = 0; k < g->n_outputs; k++) {
    char t[128];
    const cm_node *n = &g->nodes[g->outputs[k]];
    printf("  output %s: %s\n", n->name, cm_type_str(&n->type, t, sizeof t));
  }
  cm_graph_free(g);
  return EXIT_OK;
}

int cmd_print(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}, {"--json", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "print")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_print, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_print, stderr), EXIT_INVALID;
  cm_graph *g;
  int rc = cli_load_graph(pos[0], &g);
  if (rc) return rc;
  cm_err err = {0};
  if (opts[1].given) {
    char *json = cm_graph_to_json(g);
    if (!json)
      rc = (fprintf(stderr, "cmaec print: out of memory\n"), EXIT_INTERNAL);
    else
      fputs(json, stdout), fputc('\n', stdout);
    free(json);
  } else if (cm_graph_print(g, stdout, &err)) {
    rc = cli_report(&err, "cmaec print");
  }
  cm_graph_free(g);
  return rc;
}

int cmd_dot(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "dot")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_dot, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_dot, stderr), EXIT_INVALID;
  cm_graph *g;
  int rc = cli_load_graph(pos[0], &g);
  if (rc) return rc;
  cm_err err = {0};
  if (cm_graph_dot(g, stdout, &err)) rc = cli_report(&err, "cmaec dot");
  cm_graph_free(g);
  return rc;
}

int cmd_run(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false},      {"--inputs", true, NULL, false},
                       {"--outputs", true, NULL, false},    {"--backend", true, NULL, false},
                       {"--seed", true, NULL, false},       {"--precision", true, NULL, false},
                       {"--quiet", false, NULL, false},     {"--device", true, NULL, false},
                       {"--cuda-graphs", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "run")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_run, stdout), fputs(cli_backend_usage, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_run, stderr), EXIT_INVALID;
  const char *in_path = opts[1].value, *out_path = opts[2].value;
  bool quiet = opts[6].given;
  uint64_t seed = 0;
  if (opts[4].given && !cli_parse_u64(opts[4].value, &seed)) {
    fprintf(stderr, "cmaec run: --seed %s: not a non-negative integer\n", opts[4].value);
    return EXIT_INVALID;
  }
  cm_eval_opts eval_opts = {CM_PRECISION_NATIVE};
  if (opts[5].given) {
    if (strcmp(opts[5].value, "f64") == 0)
      eval_opts.precision = CM_PRECISION_F64;
    else if (strcmp(opts[5].value, "native") != 0) {
      fprintf(stderr, "cmaec run: --precision %s: use native or f64\n", opts[5].value);
      return EXIT_INVALID;
    }
  }
  bool f64 = eval_opts.precision == CM_PRECISION_F64;
  cm_backend_request req;
  int rc = cli_backend_request(&opts[3], &opts[7], &opts[8], true,
                               f64 ? CM_BACKEND_REF : CM_BACKEND_AUTO, "run", &req);
  if (rc) return rc;
  if (f64 && req.kind != CM_BACKEND_REF) {
    fprintf(stderr, "cmaec run: --precision f64 needs --backend ref\n");
    return EXIT_INVALID;
  }
  cm_backend_choice choice;
  cm_err berr = {0};
  if (cm_backend_resolve(&req, &choice, &berr)) return cli_report(&berr, "cmaec run");
  bool compiled = choice.kind != CM_BACKEND_REF;

  cm_graph *g;
  if ((rc = cli_load_graph(pos[0], &g))) return rc;
  cm_err err = {0};
  cli_sources src;
  cm_tensor_set outputs;
  cm_tensor_set_init(&outputs);
  cm_tensor *values = calloc((size_t)g->n_nodes + 1, sizeof *values);
  bool evaluated = false;
  if (!values) {
    rc = (fprintf(stderr, "cmaec run: out of memory\n"), EXIT_INTERNAL);
    goto done_graph;
  }
  if ((rc = cli_bind_sources(g, pos[0], in_path, seed, NULL, &src))) goto done;
  if (compiled) {
    cm_program *pr = NULL;
    cm_tensor *outs = calloc((size_t)g->n_outputs + 1, sizeof *outs);
    cm_compile_opts co = {0};
    const cm_target *target = cm_backend_compile_opts(&choice, &co);
    if (!outs || cm_compile(g, target, &co, &pr, &err) ||
        cm_program_run(pr, (cm_tensor *const *)src.bound, outs, &err)) {
      cm_program_free(pr);
      free(outs);
      rc = outs ? cli_report(&err, pos[0])
                : (fprintf(stderr, "cmaec run: out of memory\n"), EXIT_INTERNAL);
      goto done;
    }
    cm_program_free(pr);
    /* the printing below reads values[] as after cm_eval; an output listed twice keeps one copy */
    for (int k = 0; k < g->n_outputs; k++) {
      if (values[g->outputs[k]].data)
        cm_tensor_free(&outs[k]);
      else
        values[g->outputs[k]] = outs[k];
    }
    free(outs);
  } else if (cm_eval(g, src.bound, values, &eval_opts, &err)) {
    rc = cli_report(&err, pos[0]);
    goto done;
  }
  evaluated = true;
  for (int k = 0; k < g->n_outputs; k++) {
    const cm_node *n = &g->nodes[g->outputs[k]];
    if (!quiet) cli_print_tensor(n->name, &values[g->outputs[k]]);
    if (out_path && cm_tensor_set_add(&outputs, n->name, &values[g->outputs[k]], &err)) {
      rc = cli_report(&err, out_path);
      goto done;
    }
  }
  if (out_path) {
    if (cm_tensor_set_meta(&outputs, "producer", "cmaec " CMAEC_VERSION, &err) ||
        cm_safetensors_save(out_path, &outputs, &err)) {
      rc = cli_report(&err, out_path);
      goto done;
    }
    if (!quiet)
      printf("wrote %d output%s to %s\n", g->n_outputs, g->n_outputs == 1 ? "" : "s", out_path);
  }
done:
  if (evaluated)
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&values[i]);
  cli_sources_free(&src);
done_graph:
  free(values);
  cm_tensor_set_free(&outputs);
  cm_graph_free(g);
  return rc;
}

/* The GPUs --backend cuda can run on (--device N), or why there are none. */
static void print_cuda_devices(void) {
  const cm_cuda_driver *d = NULL;
  cm_err err = {0};
  if (cm_cuda_driver_load(&d, &err)) {
    printf("CUDA devices: none (%s); --backend auto runs on the CPU\n", err.msg);
    return;
  }
  enum { MAX_DEVICES = 64 };
  cm_cuda_device devs[MAX_DEVICES];
  int n = cm_cuda_devices(d, devs, MAX_DEVICES, &err);
  if (n == 0) {
    printf("CUDA devices: none (%s); --backend auto runs on the CPU\n",
           err.status ? err.msg : "the driver sees no GPU");
    return;
  }
  printf("CUDA devices (--device N; CUDA_VISIBLE_DEVICES=%s):\n",
         getenv("CUDA_VISIBLE_DEVICES") ? getenv("CUDA_VISIBLE_DEVICES") : "unset");
  for (int i = 0; i < n && i < MAX_DEVICES; i++)
    printf("  [%d] %s: %.1f GiB, compute capability %d.%d, %d SMs, %d KiB shared per block; "
           "kernels compiled for %s\n",
           devs[i].ordinal, devs[i].name, (double)devs[i].total_bytes / (1 << 30), devs[i].cc_major,
           devs[i].cc_minor, devs[i].sms, devs[i].shared_optin / 1024, devs[i].arch);
}

int cmd_info(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 0, &n_pos, "info")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_info, stdout), EXIT_OK;
  printf("cmaec %s\n", CMAEC_VERSION);
  cm_component comps[8];
  int n = cm_library_find_all(comps, 8);
  for (int i = 0; i < n; i++)
    printf("  %-12s %-9s %s\n", comps[i].name, comps[i].found ? "found" : "not found",
           comps[i].detail);
  print_cuda_devices();
  return EXIT_OK;
}
