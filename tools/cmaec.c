/* tools/cmaec.c — the cmaec command line: dispatch, options, one-line errors.
 *
 * Exit codes: 0 ok, 1 internal failure, 2 invalid input (bad file, graph,
 * tensor or command line). Errors go to stderr as one line "PLACE: message". */
#include "../frontend/frontend.h"
#include "../runtime/runtime.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { EXIT_OK = 0, EXIT_INTERNAL = 1, EXIT_INVALID = 2 };

/* ---- options ----------------------------------------------------------- */

typedef struct {
  const char *name;     /* "--inputs" */
  bool takes_value;
  const char *value;    /* set when given */
  bool given;
} option;

/* Parses argv[first..] into options and positionals. Returns false (after a
 * one-line error) on an unknown option or a missing value. */
static bool parse_options(int argc, char **argv, int first, option *opts, int n_opts,
                          const char **positional, int max_positional, int *n_positional,
                          const char *command) {
  *n_positional = 0;
  for (int i = first; i < argc; i++) {
    const char *arg = argv[i];
    if (arg[0] == '-' && arg[1] == '-' && arg[2]) {
      const char *eq = strchr(arg, '=');
      size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
      option *o = NULL;
      for (int k = 0; k < n_opts; k++)
        if (strlen(opts[k].name) == len && strncmp(opts[k].name, arg, len) == 0) o = &opts[k];
      if (!o) {
        fprintf(stderr, "cmaec %s: unknown option %.*s (see cmaec %s --help)\n", command, (int)len,
                arg, command);
        return false;
      }
      o->given = true;
      if (o->takes_value) {
        if (eq) o->value = eq + 1;
        else if (i + 1 < argc) o->value = argv[++i];
        else {
          fprintf(stderr, "cmaec %s: option %s needs a value\n", command, o->name);
          return false;
        }
      } else if (eq) {
        fprintf(stderr, "cmaec %s: option %s takes no value\n", command, o->name);
        return false;
      }
    } else if (strcmp(arg, "-h") == 0) {
      for (int k = 0; k < n_opts; k++)
        if (strcmp(opts[k].name, "--help") == 0) opts[k].given = true;
    } else {
      if (*n_positional >= max_positional) {
        fprintf(stderr, "cmaec %s: unexpected argument \"%s\" (see cmaec %s --help)\n", command,
                arg, command);
        return false;
      }
      positional[(*n_positional)++] = arg;
    }
  }
  return true;
}

static int report(const cm_err *err, const char *place) {
  if (place && strncmp(err->msg, place, strlen(place)) != 0)
    fprintf(stderr, "%s: %s\n", place, err->msg);
  else fprintf(stderr, "%s\n", err->msg);
  return err->status == CM_EINVALID ? EXIT_INVALID : EXIT_INTERNAL;
}

static bool parse_u64(const char *s, uint64_t *out) {
  if (!s || !*s || *s == '-') return false;
  errno = 0;
  char *end;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || *end) return false;
  *out = v;
  return true;
}

/* ---- help texts --------------------------------------------------------- */

static const char usage_main[] =
    "usage: cmaec <command> [options]\n"
    "\n"
    "cmaec compiles dataflow graphs (and, in time, CMAE model variants) and runs them.\n"
    "\n"
    "commands:\n"
    "  check GRAPH     verify a graph (JSON or text IR) and print a summary\n"
    "  print GRAPH     print a graph as text IR\n"
    "  dot GRAPH       print a graph as Graphviz dot\n"
    "  run GRAPH       evaluate a graph on inputs from safetensors\n"
    "  info            version, and which of LLVM, NVRTC, CUDA, NCCL, MPI are available\n"
    "\n"
    "Run 'cmaec <command> --help' for a command's options.\n"
    "Exit codes: 0 ok, 1 internal failure, 2 invalid input.\n";

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

static const char usage_dot[] =
    "usage: cmaec dot GRAPH\n"
    "\n"
    "Prints GRAPH in Graphviz dot; nodes are coloured by op category.\n"
    "Example: cmaec dot examples/mlp.json | dot -Tpng -o mlp.png\n";

static const char usage_run[] =
    "usage: cmaec run GRAPH [--inputs IN.safetensors] [--outputs OUT.safetensors]\n"
    "                 [--backend ref] [--seed N] [--precision native|f64] [--quiet]\n"
    "\n"
    "Evaluates GRAPH. Every input node is read from IN (by name, exact dtype and shape).\n"
    "Params and state are read from IN when present there, else initialized from their\n"
    "initializer with --seed (default 0); one with no initializer must be in IN.\n"
    "Outputs are written to OUT under their node names (and printed unless --quiet).\n"
    "  --backend ref         the reference evaluator (the only backend so far)\n"
    "  --precision native    each value in its node's dtype (default)\n"
    "  --precision f64       floating values kept in f64 (outputs written as f64)\n";

static const char usage_info[] = "usage: cmaec info\n"
                                 "\n"
                                 "Prints the version and, for each of LLVM, NVRTC, the CUDA\n"
                                 "driver (and GPUs), NCCL and MPI, whether it was found, and\n"
                                 "why not where not.\n";

/* ---- commands ----------------------------------------------------------- */

static int load_graph(const char *path, cm_graph **g) {
  cm_err err = {0};
  if (cm_graph_load(path, g, &err)) return report(&err, path);
  return EXIT_OK;
}

static int cmd_check(int argc, char **argv) {
  option opts[] = {{"--help", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!parse_options(argc, argv, 2, opts, 1, pos, 1, &n_pos, "check")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_check, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_check, stderr), EXIT_INVALID;
  cm_graph *g;
  int rc = load_graph(pos[0], &g);
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

static int cmd_print(int argc, char **argv) {
  option opts[] = {{"--help", false, NULL, false}, {"--json", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!parse_options(argc, argv, 2, opts, 2, pos, 1, &n_pos, "print")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_print, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_print, stderr), EXIT_INVALID;
  cm_graph *g;
  int rc = load_graph(pos[0], &g);
  if (rc) return rc;
  cm_err err = {0};
  if (opts[1].given) {
    char *json = cm_graph_to_json(g);
    if (!json) rc = (fprintf(stderr, "cmaec print: out of memory\n"), EXIT_INTERNAL);
    else fputs(json, stdout), fputc('\n', stdout);
    free(json);
  } else if (cm_graph_print(g, stdout, &err)) {
    rc = report(&err, "cmaec print");
  }
  cm_graph_free(g);
  return rc;
}

static int cmd_dot(int argc, char **argv) {
  option opts[] = {{"--help", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!parse_options(argc, argv, 2, opts, 1, pos, 1, &n_pos, "dot")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_dot, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_dot, stderr), EXIT_INVALID;
  cm_graph *g;
  int rc = load_graph(pos[0], &g);
  if (rc) return rc;
  cm_err err = {0};
  if (cm_graph_dot(g, stdout, &err)) rc = report(&err, "cmaec dot");
  cm_graph_free(g);
  return rc;
}

/* Prints a tensor's type and up to 8 values, then min / max / mean. */
static void print_tensor(const char *name, const cm_tensor *t) {
  char ts[128];
  int64_t n = cm_type_numel(&t->type);
  printf("%s: %s =", name, cm_type_str(&t->type, ts, sizeof ts));
  bool is_int = cm_dtype_is_int(t->type.dtype);
  for (int64_t i = 0; i < n && i < 8; i++) {
    if (is_int) printf(" %" PRId64, cm_tensor_get_i64(t, i));
    else printf(" %.9g", cm_tensor_get_f64(t, i));
  }
  if (n > 8) {
    double lo = INFINITY, hi = -INFINITY, sum = 0;
    for (int64_t i = 0; i < n; i++) {
      double v = cm_tensor_get_f64(t, i);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      sum += v;
    }
    printf(" ... (min %.9g, max %.9g, mean %.9g)", lo, hi, sum / (double)n);
  }
  printf("\n");
}

static int cmd_run(int argc, char **argv) {
  option opts[] = {{"--help", false, NULL, false},     {"--inputs", true, NULL, false},
                   {"--outputs", true, NULL, false},   {"--backend", true, NULL, false},
                   {"--seed", true, NULL, false},      {"--precision", true, NULL, false},
                   {"--quiet", false, NULL, false}};
  const int n_opts = (int)(sizeof opts / sizeof opts[0]);
  const char *pos[1];
  int n_pos;
  if (!parse_options(argc, argv, 2, opts, n_opts, pos, 1, &n_pos, "run")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_run, stdout), EXIT_OK;
  if (n_pos != 1) return fputs(usage_run, stderr), EXIT_INVALID;
  const char *in_path = opts[1].value, *out_path = opts[2].value;
  if (opts[3].given && strcmp(opts[3].value, "ref") != 0) {
    fprintf(stderr, "cmaec run: --backend %s: unknown backend (available: ref)\n", opts[3].value);
    return EXIT_INVALID;
  }
  uint64_t seed = 0;
  if (opts[4].given && !parse_u64(opts[4].value, &seed)) {
    fprintf(stderr, "cmaec run: --seed %s: not a non-negative integer\n", opts[4].value);
    return EXIT_INVALID;
  }
  cm_eval_opts eval_opts = {CM_PRECISION_NATIVE};
  if (opts[5].given) {
    if (strcmp(opts[5].value, "f64") == 0) eval_opts.precision = CM_PRECISION_F64;
    else if (strcmp(opts[5].value, "native") != 0) {
      fprintf(stderr, "cmaec run: --precision %s: use native or f64\n", opts[5].value);
      return EXIT_INVALID;
    }
  }

  cm_graph *g;
  int rc = load_graph(pos[0], &g);
  if (rc) return rc;
  cm_err err = {0};
  cm_tensor_set inputs, outputs;
  cm_tensor_set_init(&inputs);
  cm_tensor_set_init(&outputs);
  cm_tensor *owned = calloc((size_t)g->n_nodes + 1, sizeof *owned);
  const cm_tensor **sources = calloc((size_t)g->n_nodes + 1, sizeof *sources);
  cm_tensor *values = calloc((size_t)g->n_nodes + 1, sizeof *values);
  bool evaluated = false;
  if (!owned || !sources || !values) {
    rc = (fprintf(stderr, "cmaec run: out of memory\n"), EXIT_INTERNAL);
    goto done;
  }
  if (in_path && cm_safetensors_load(in_path, &inputs, &err)) {
    rc = report(&err, in_path);
    goto done;
  }
  for (int i = 0; i < g->n_nodes && !rc; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    const cm_tensor *given = in_path ? cm_tensor_set_get(&inputs, n->name) : NULL;
    char want[128], got[128];
    if (given) {
      if (!cm_type_equal(&given->type, &n->type)) {
        fprintf(stderr, "%s: tensor \"%s\" is %s but %s \"%s\" is %s\n", in_path, n->name,
                cm_type_str(&given->type, got, sizeof got), cm_op_name(n->op), n->name,
                cm_type_str(&n->type, want, sizeof want));
        rc = EXIT_INVALID;
      }
      sources[i] = given;
    } else if (n->op == CM_OP_INPUT || n->attrs.init.kind == CM_INIT_NONE) {
      fprintf(stderr, "%s: %s \"%s\" (%s) has no value: give it in --inputs%s\n",
              in_path ? in_path : pos[0], cm_op_name(n->op), n->name,
              cm_type_str(&n->type, want, sizeof want),
              n->op == CM_OP_INPUT ? "" : " or an initializer in the graph");
      rc = EXIT_INVALID;
    } else {
      if (cm_tensor_alloc(&owned[i], n->type, &err) ||
          cm_init_tensor(&owned[i], &n->attrs.init, seed, n->name, &err)) {
        rc = report(&err, pos[0]);
        break;
      }
      sources[i] = &owned[i];
    }
  }
  if (rc) goto done;
  if (cm_eval(g, sources, values, &eval_opts, &err)) {
    rc = report(&err, pos[0]);
    goto done;
  }
  evaluated = true;
  for (int k = 0; k < g->n_outputs; k++) {
    const cm_node *n = &g->nodes[g->outputs[k]];
    if (!opts[6].given) print_tensor(n->name, &values[g->outputs[k]]);
    if (out_path && cm_tensor_set_add(&outputs, n->name, &values[g->outputs[k]], &err)) {
      rc = report(&err, out_path);
      goto done;
    }
  }
  if (out_path) {
    if (cm_tensor_set_meta(&outputs, "producer", "cmaec " CMAEC_VERSION, &err) ||
        cm_safetensors_save(out_path, &outputs, &err)) {
      rc = report(&err, out_path);
      goto done;
    }
    if (!opts[6].given) printf("wrote %d output%s to %s\n", g->n_outputs,
                               g->n_outputs == 1 ? "" : "s", out_path);
  }
done:
  if (evaluated)
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&values[i]);
  if (owned)
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&owned[i]);
  free(owned);
  free(sources);
  free(values);
  cm_tensor_set_free(&inputs);
  cm_tensor_set_free(&outputs);
  cm_graph_free(g);
  return rc;
}

static int cmd_info(int argc, char **argv) {
  option opts[] = {{"--help", false, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!parse_options(argc, argv, 2, opts, 1, pos, 0, &n_pos, "info")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_info, stdout), EXIT_OK;
  printf("cmaec %s\n", CMAEC_VERSION);
  cm_component comps[8];
  int n = cm_probe_all(comps, 8);
  for (int i = 0; i < n; i++)
    printf("  %-12s %-9s %s\n", comps[i].name, comps[i].found ? "found" : "not found",
           comps[i].detail);
  return EXIT_OK;
}

int main(int argc, char **argv) {
  if (argc < 2) return fputs(usage_main, stderr), EXIT_INVALID;
  const char *cmd = argv[1];
  if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0)
    return fputs(usage_main, stdout), EXIT_OK;
  if (strcmp(cmd, "--version") == 0) return printf("cmaec %s\n", CMAEC_VERSION), EXIT_OK;
  static const struct {
    const char *name;
    int (*fn)(int, char **);
  } commands[] = {{"check", cmd_check}, {"print", cmd_print}, {"dot", cmd_dot},
                  {"run", cmd_run},     {"info", cmd_info}};
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp(cmd, commands[i].name) == 0) return commands[i].fn(argc, argv);
  fprintf(stderr, "cmaec: unknown command \"%s\" (see cmaec --help)\n", cmd);
  return EXIT_INVALID;
}
