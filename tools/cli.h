/* tools/cli.h — what the cmaec command files share: option parsing, one-line
 * error reporting, graph loading, and binding a graph's sources to tensors. */
#ifndef CMAEC_CLI_H
#define CMAEC_CLI_H

#include "../frontend/frontend.h"
#include "../runtime/training.h"

enum { EXIT_OK = 0, EXIT_INTERNAL = 1, EXIT_INVALID = 2 };

typedef struct cli_option {
  const char *name; /* "--inputs" */
  bool takes_value;
  const char *value; /* the last value given */
  bool given;
} cli_option;

/* Parses argv[first..] into options and positionals; false after printing a
 * one-line error for an unknown option, a missing value or too many arguments. */
bool cli_parse(int argc, char **argv, int first, cli_option *opts, int n_opts,
               const char **positional, int max_positional, int *n_positional, const char *command);
cli_option *cli_find(cli_option *opts, int n_opts, const char *name);

/* Prints err as one line prefixed by place (unless the message already starts
 * with it); returns the exit code for its status. */
int cli_report(const cm_err *err, const char *place);
int cli_load_graph(const char *path, cm_graph **g);
bool cli_parse_u64(const char *s, uint64_t *out);
bool cli_parse_double(const char *s, double *out);
/* Node id by name, or -1 after printing "GRAPH: no node named NAME". */
int cli_node(const cm_graph *g, const char *graph_path, const char *name);

/* Tensors for a graph's sources: inputs from IN, params and state from IN
 * when there, else from their initializer with seed. Owned copies, so a
 * caller may update them (training). */
typedef struct cli_sources {
  int n;
  cm_tensor *tensors;      /* per node; data NULL for non-sources */
  const cm_tensor **bound; /* per node, for cm_eval */
} cli_sources;

/* skip_inputs: input nodes whose names are in this NULL-terminated list are
 * left unbound (the caller fills them, e.g. runtime scalars). */
int cli_bind_sources(const cm_graph *g, const char *graph_path, const char *in_path, uint64_t seed,
                     const char *const *skip_inputs, cli_sources *out);
void cli_sources_free(cli_sources *s);

void cli_print_tensor(const char *name, const cm_tensor *t);

/* --backend auto|cpu|cuda[|ref], --device N, --cuda-graphs on|off of a command
 * (device and graphs NULL where it has none). Parses them into *req (kind:
 * default_kind when --backend is absent); --device or --cuda-graphs with an
 * explicit cpu/ref backend is an error. Returns 0 or the exit code after
 * printing one line "cmaec COMMAND: ...". */
int cli_backend_request(const cli_option *backend, const cli_option *device,
                        const cli_option *graphs, bool ref_allowed, cm_backend_kind default_kind,
                        const char *command, cm_backend_request *req);
/* cli_backend_request, then cm_backend_resolve: "--backend cuda" without a
 * driver is exit 2 with the loader's message. */
int cli_backend(const cli_option *backend, const cli_option *device, const cli_option *graphs,
                bool ref_allowed, cm_backend_kind default_kind, const char *command,
                cm_backend_choice *out);
/* The usage lines of --backend, --device and --cuda-graphs. */
extern const char cli_backend_usage[];

int cmd_check(int argc, char **argv);
int cmd_print(int argc, char **argv);
int cmd_dot(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_grad(int argc, char **argv);
int cmd_step(int argc, char **argv);
int cmd_build_step(int argc, char **argv);
int cmd_summary(int argc, char **argv);
int cmd_train(int argc, char **argv); /* cmaec train */
int cmd_opt(int argc, char **argv);
int cmd_build(int argc, char **argv);
int cmd_compile(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_recon(int argc, char **argv);
int cmd_plot(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_tune(int argc, char **argv); /* tools/cli_tune.c */
/* cmaec tune --report [--db PATH] [--device-id ID] (tools/cmd_tune_report.c): the tuning
 * database's report; `cmaec tune` hands --report here. */
int cmd_tune_report(int argc, char **argv);

#endif
