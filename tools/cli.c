/* tools/cli.c — the cmaec command line: dispatch and shared helpers.
 *
 * Exit codes: 0 ok, 1 internal failure, 2 invalid input (bad file, graph,
 * tensor or command line). Errors go to stderr as one line "PLACE: message". */
#include "cli.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

bool cli_parse(int argc, char **argv, int first, cli_option *opts, int n_opts,
               const char **positional, int max_positional, int *n_positional,
               const char *command) {
  *n_positional = 0;
  for (int i = first; i < argc; i++) {
    const char *arg = argv[i];
    if (arg[0] == '-' && arg[1] == '-' && arg[2]) {
      const char *eq = strchr(arg, '=');
      size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
      cli_option *o = NULL;
      for (int k = 0; k < n_opts; k++)
        if (strlen(opts[k].name) == len && strncmp(opts[k].name, arg, len) == 0) o = &opts[k];
      if (!o) {
        fprintf(stderr, "cmaec %s: unknown option %.*s (see cmaec %s --help)\n", command, (int)len,
                arg, command);
        return false;
      }
      o->given = true;
      if (o->takes_value) {
        if (eq)
          o->value = eq + 1;
        else if (i + 1 < argc)
          o->value = argv[++i];
        else {
          fprintf(stderr, "cmaec %s: option %s needs a value\n", command, o->name);
          return false;
        }
      } else if (eq) {
        fprintf(stderr, "cmaec %s: option %s takes no value\n", command, o->name);
        return false;
      }
    } else if (strcmp(arg, "-h") == 0) {
      cli_option *help = cli_find(opts, n_opts, "--help");
      if (help) help->given = true;
    } else if (arg[0] == '-' && arg[1] && !arg[2] && cli_find(opts, n_opts, arg)) {
      /* short options (-o, -p) take the next argument */
      cli_option *o = cli_find(opts, n_opts, arg);
      o->given = true;
      if (o->takes_value) {
        if (i + 1 >= argc) {
          fprintf(stderr, "cmaec %s: option %s needs a value\n", command, arg);
          return false;
        }
        o->value = argv[++i];
      }
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

cli_option *cli_find(cli_option *opts, int n_opts, const char *name) {
  for (int k = 0; k < n_opts; k++)
    if (strcmp(opts[k].name, name) == 0) return &opts[k];
  return NULL;
}

int cli_report(const cm_err *err, const char *place) {
  if (place && strncmp(err->msg, place, strlen(place)) != 0)
    fprintf(stderr, "%s: %s\n", place, err->msg);
  else
    fprintf(stderr, "%s\n", err->msg);
  return err->status == CM_EINVALID ? EXIT_INVALID : EXIT_INTERNAL;
}

bool cli_parse_u64(const char *s, uint64_t *out) {
  if (!s || !*s || *s == '-') return false;
  errno = 0;
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end) return false;
  *out = v;
  return true;
}

bool cli_parse_double(const char *s, double *out) {
  if (!s || !*s) return false;
  errno = 0;
  char *end;
  double v = strtod(s, &end);
  if (errno || *end || !isfinite(v)) return false;
  *out = v;
  return true;
}

int cli_load_graph(const char *path, cm_graph **g) {
  cm_err err = {0};
  if (cm_graph_load(path, g, &err)) return cli_report(&err, path);
  return EXIT_OK;
}

int cli_node(const cm_graph *g, const char *graph_path, const char *name) {
  int id = cm_graph_find(g, name);
  if (id < 0) fprintf(stderr, "%s: no node named \"%s\"\n", graph_path, name);
  return id;
}

static bool in_list(const char *name, const char *const *list) {
  for (int i = 0; list && list[i]; i++)
    if (strcmp(name, list[i]) == 0) return true;
  return false;
}

int cli_bind_sources(const cm_graph *g, const char *graph_path, const char *in_path, uint64_t seed,
                     const char *const *skip_inputs, cli_sources *out) {
  memset(out, 0, sizeof *out);
  out->n = g->n_nodes;
  out->tensors = calloc((size_t)g->n_nodes + 1, sizeof *out->tensors);
  out->bound = calloc((size_t)g->n_nodes + 1, sizeof *out->bound);
  if (!out->tensors || !out->bound) {
    fprintf(stderr, "cmaec: out of memory\n");
    return EXIT_INTERNAL;
  }
  cm_err err = {0};
  cm_tensor_set inputs;
  cm_tensor_set_init(&inputs);
  int rc = EXIT_OK;
  if (in_path && cm_safetensors_load(in_path, &inputs, &err)) {
    rc = cli_report(&err, in_path);
    cm_tensor_set_free(&inputs);
    return rc;
  }
  for (int i = 0; i < g->n_nodes && !rc; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    if (n->op == CM_OP_INPUT && in_list(n->name, skip_inputs)) continue;
    const cm_tensor *given = in_path ? cm_tensor_set_get(&inputs, n->name) : NULL;
    char want[128], got[128];
    if (given) {
      if (!cm_type_equal(&given->type, &n->type)) {
        fprintf(stderr, "%s: tensor \"%s\" is %s but %s \"%s\" is %s\n", in_path, n->name,
                cm_type_str(&given->type, got, sizeof got), cm_op_name(n->op), n->name,
                cm_type_str(&n->type, want, sizeof want));
        rc = EXIT_INVALID;
      } else if (cm_tensor_copy(&out->tensors[i], given, &err)) {
        rc = cli_report(&err, "cmaec");
      }
    } else if (n->op == CM_OP_INPUT || n->attrs.init.kind == CM_INIT_NONE) {
      fprintf(stderr, "%s: %s \"%s\" (%s) has no value: give it in --inputs%s\n",
              in_path ? in_path : graph_path, cm_op_name(n->op), n->name,
              cm_type_str(&n->type, want, sizeof want),
              n->op == CM_OP_INPUT ? "" : " or an initializer in the graph");
      rc = EXIT_INVALID;
    } else if (cm_tensor_alloc(&out->tensors[i], n->type, &err) ||
               cm_init_tensor(&out->tensors[i], &n->attrs.init, seed, n->name, &err)) {
      rc = cli_report(&err, graph_path);
    }
    if (!rc) out->bound[i] = &out->tensors[i];
  }
  cm_tensor_set_free(&inputs);
  return rc;
}

void cli_sources_free(cli_sources *s) {
  for (int i = 0; s->tensors && i < s->n; i++) cm_tensor_free(&s->tensors[i]);
  free(s->tensors);
  free(s->bound);
  memset(s, 0, sizeof *s);
}

void cli_print_tensor(const char *name, const cm_tensor *t) {
  char ts[128];
  int64_t n = cm_type_numel(&t->type);
  printf("%s: %s =", name, cm_type_str(&t->type, ts, sizeof ts));
  bool is_int = cm_dtype_is_int(t->type.dtype);
  for (int64_t i = 0; i < n && i < 8; i++) {
    if (is_int)
      printf(" %" PRId64, cm_tensor_get_i64(t, i));
    else
      printf(" %.9g", cm_tensor_get_f64(t, i));
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

const char cli_backend_usage[] =
    "  --backend auto        CUDA when the driver loads and sees the GPU, else the CPU (default)\n"
    "  --backend cpu         the CPU executor: fused kernels JIT-compiled with LLVM, run on\n"
    "                        $CMAEC_THREADS threads (default: all), objects cached in\n"
    "                        $CMAEC_CACHE_DIR (default ~/.cache/cmaec; empty: no cache)\n"
    "  --backend cuda        an NVIDIA GPU through the CUDA driver (libcuda.so.1); CUBINs\n"
    "                        cached in $CMAEC_CACHE_DIR/cuda\n"
    "  --device N            the GPU (default 0; after CUDA_VISIBLE_DEVICES)\n"
    "  --cuda-graphs on|off  replay the step as one CUDA graph (default on)\n";

int cli_backend_request(const cli_option *backend, const cli_option *device,
                        const cli_option *graphs, bool ref_allowed, cm_backend_kind default_kind,
                        const char *command, cm_backend_request *req) {
  memset(req, 0, sizeof *req);
  req->kind = default_kind;
  cm_err err = {0};
  char place[64];
  snprintf(place, sizeof place, "cmaec %s", command);
  if (backend && backend->given && cm_backend_parse(backend->value, ref_allowed, &req->kind, &err))
    return cli_report(&err, place);
  if (device && device->given && cm_backend_parse_device(device->value, &req->device, &err))
    return cli_report(&err, place);
  if (graphs && graphs->given && cm_backend_parse_graphs(graphs->value, &req->graphs, &err))
    return cli_report(&err, place);
  bool cuda_options = (device && device->given) || (graphs && graphs->given);
  if (cuda_options && (req->kind == CM_BACKEND_CPU || req->kind == CM_BACKEND_REF)) {
    fprintf(stderr, "cmaec %s: %s applies to --backend cuda (or auto), not %s\n", command,
            device && device->given ? "--device" : "--cuda-graphs",
            cm_backend_kind_name(req->kind));
    return EXIT_INVALID;
  }
  return EXIT_OK;
}

int cli_backend(const cli_option *backend, const cli_option *device, const cli_option *graphs,
                bool ref_allowed, cm_backend_kind default_kind, const char *command,
                cm_backend_choice *out) {
  cm_backend_request req;
  int rc = cli_backend_request(backend, device, graphs, ref_allowed, default_kind, command, &req);
  if (rc) return rc;
  cm_err err = {0};
  char place[64];
  snprintf(place, sizeof place, "cmaec %s", command);
  if (cm_backend_resolve(&req, out, &err)) return cli_report(&err, place);
  return EXIT_OK;
}

static const char usage_main[] =
    "usage: cmaec <command> [options]\n"
    "\n"
    "cmaec builds CMAE model variants and other dataflow graphs, differentiates and\n"
    "optimizes them, compiles them to kernels (LLVM JIT for the CPU, CUDA C through\n"
    "NVRTC), and runs them on the reference evaluator, the CPU or an NVIDIA GPU.\n"
    "\n"
    "commands:\n"
    "  check GRAPH        verify a graph (JSON or text IR) and print a summary\n"
    "  print GRAPH        print a graph as text IR (or canonical JSON)\n"
    "  dot GRAPH          print a graph as Graphviz dot\n"
    "  run GRAPH          evaluate a graph on inputs from safetensors\n"
    "  grad GRAPH         check autodiff gradients against finite differences\n"
    "  step GRAPH         run AdamW training steps on the reference evaluator\n"
    "  build-step GRAPH   write the training-step graph (AdamW, EMA, clipping, loss scaling)\n"
    "  opt GRAPH          run optimizing passes (simplify, cse, dce, fuse, schedule, memplan)\n"
    "  summary MODEL      parameters, FLOPs and activation memory of a model variant\n"
    "  build MODEL        write a model variant's forward graph or training step\n"
    "  compile MODEL      lower a training step to kernels and render them (LLVM IR, CUDA C)\n"
    "  train MODEL        train a model variant (data, schedule, metrics, checkpoints, resume)\n"
    "  tune MODEL         search the training step's kernel plans; --report: the tuning database\n"
    "  eval CKPT          kNN and linear-probe accuracy of a checkpoint's frozen encoder\n"
    "  recon CKPT         picture of masked inputs and their reconstructions\n"
    "  plot OUT           loss and learning-rate curves of a training run\n"
    "  export CKPT        the online encoder's params under the official timm names\n"
    "  info               version, and which of LLVM, NVRTC, CUDA, NCCL, MPI are available\n"
    "\n"
    "Run 'cmaec <command> --help' for a command's options.\n"
    "Exit codes: 0 ok, 1 internal failure, 2 invalid input.\n";

int main(int argc, char **argv) {
  if (argc < 2) return fputs(usage_main, stderr), EXIT_INVALID;
  const char *cmd = argv[1];
  if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0)
    return fputs(usage_main, stdout), EXIT_OK;
  if (strcmp(cmd, "--version") == 0) return printf("cmaec %s\n", CMAEC_VERSION), EXIT_OK;
  static const struct {
    const char *name;
    int (*fn)(int, char **);
  } commands[] = {{"check", cmd_check},     {"print", cmd_print},
                  {"dot", cmd_dot},         {"run", cmd_run},
                  {"info", cmd_info},       {"grad", cmd_grad},
                  {"step", cmd_step},       {"build-step", cmd_build_step},
                  {"summary", cmd_summary}, {"build", cmd_build},
                  {"opt", cmd_opt},         {"compile", cmd_compile},
                  {"train", cmd_train},     {"eval", cmd_eval},
                  {"recon", cmd_recon},     {"plot", cmd_plot},
                  {"export", cmd_export},   {"tune", cmd_tune}};
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp(cmd, commands[i].name) == 0) return commands[i].fn(argc, argv);
  fprintf(stderr, "cmaec: unknown command \"%s\" (see cmaec --help)\n", cmd);
  return EXIT_INVALID;
}
