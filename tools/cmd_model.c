/* tools/cmd_model.c — cmaec summary, build, compile: a model variant's
 * parameters, FLOPs and activation memory, its forward or training-step graph,
 * and its kernels rendered for a target. */
#include "cli.h"

#include "../models/models.h"
#include "../passes/passes.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_summary[] =
    "usage: cmaec summary MODEL.json [--set KEY=VALUE ...] [--batch N] [--json]\n"
    "\n"
    "Builds the variant's forward graph (local batch N, default 2) and its training step\n"
    "(AdamW, CMAE no-decay rule, frozen pos embeds, EMA targets) and prints:\n"
    "- parameter counts per module (first two name components) and role: trainable,\n"
    "  frozen (pos embeds), EMA (target_backbone, target_projector);\n"
    "- FLOPs per image of one training step, 2 x MACs of the matmul and conv nodes of\n"
    "  the real graphs: forward of the trained parts, backward (the nodes autodiff\n"
    "  added), the target forward; next to CMAE.md's convention 3 x forward + target;\n"
    "- activation memory: bytes of the forward values a backward node reads.\n"
    "--set overrides a key of the variant (repeatable); --json prints one JSON object.\n";

static const char usage_build[] =
    "usage: cmaec build MODEL.json -o GRAPH.json [--set KEY=VALUE ...] [--train]\n"
    "                   [--batch N] [--ranks G] [--bucket-mb M] [--text] [--no-opt]\n"
    "\n"
    "Writes the variant's forward graph (inputs img, img_t, ids_keep, ids_restore, mask;\n"
    "outputs loss, loss_rc, loss_ct) or, with --train, its whole training step (AdamW with\n"
    "the CMAE no-decay rule, frozen pos embeds, EMA of the target branch; see build-step).\n"
    "N is the local batch (default: optimizer.batch / G), G the world size (default 1).\n"
    "--set overrides a key of the variant (repeatable); --text writes text IR.\n"
    "With --train and G > 1 the data_parallel pass averages the parameter gradients over the\n"
    "ranks in all_reduce buckets of about M MB (default 25; printed: count and sizes).\n"
    "The training step goes through the default pipeline of passes (simplify, cse, dce,\n"
    "fuse, schedule, memplan; kernels and arena are printed) unless --no-opt.\n";

/* ---- shared: options, config, graphs ------------------------------------ */

typedef struct model_cmd {
  const char **sets; /* the --set values, in order */
  int n_sets;
  char **argv; /* argv without the --set flags */
  int argc;
} model_cmd;

/* Takes the repeatable --set flags out of argv (cli_parse keeps one value per option). */
static int split_sets(int argc, char **argv, const char *command, model_cmd *mc) {
  memset(mc, 0, sizeof *mc);
  mc->sets = malloc(sizeof(char *) * (size_t)argc);
  mc->argv = malloc(sizeof(char *) * (size_t)(argc + 1));
  if (!mc->sets || !mc->argv)
    return fprintf(stderr, "cmaec %s: out of memory\n", command), EXIT_INTERNAL;
  for (int i = 0; i < argc; i++) {
    if (i >= 2 && strcmp(argv[i], "--set") == 0) {
      if (i + 1 >= argc)
        return fprintf(stderr, "cmaec %s: option --set needs a value\n", command), EXIT_INVALID;
      mc->sets[mc->n_sets++] = argv[++i];
    } else if (i >= 2 && strncmp(argv[i], "--set=", 6) == 0) {
      mc->sets[mc->n_sets++] = argv[i] + 6;
    } else {
      mc->argv[mc->argc++] = argv[i];
    }
  }
  mc->argv[mc->argc] = NULL;
  return EXIT_OK;
}

static void model_cmd_free(model_cmd *mc) {
  free(mc->sets);
  free(mc->argv);
}

static bool parse_count(const char *s, int *out) {
  uint64_t v;
  if (!cli_parse_u64(s, &v) || v < 1 || v > 1000000) return false;
  *out = (int)v;
  return true;
}

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The optimizer config every model tool uses: CMAE's no-decay rule, the
 * model's frozen params and its EMA pairs. pairs needs room for 8. */
static void model_optim_config(cm_optim_config *c, cm_ema_pair *pairs) {
  cm_optim_config_default(c);
  c->frozen = cm_model_frozen_substrings;
  int n = 0;
  for (; n < 8 && cm_model_ema_online_prefixes[n] && cm_model_ema_target_prefixes[n]; n++) {
    pairs[n].online_prefix = cm_model_ema_online_prefixes[n];
    pairs[n].target_prefix = cm_model_ema_target_prefixes[n];
  }
  c->n_ema = n;
  c->ema = pairs;
}

static int load_config(const model_cmd *mc, const char *path, cm_model_config *cfg) {
  cm_err err = {0};
  if (cm_model_config_load(path, mc->sets, mc->n_sets, cfg, &err)) return cli_report(&err, path);
  return EXIT_OK;
}

static int build_model(const char *path, const cm_model_config *cfg, int batch, int ranks,
                       cm_model *m) {
  cm_model_build_opts bo = {batch, ranks, CM_F32};
  cm_err err = {0};
  if (cm_model_build(cfg, &bo, m, &err)) return cli_report(&err, path);
  return EXIT_OK;
}

/* The training step; with train.precision bf16 or f16 (not auto: these commands name no
 * backend) autocast as cm_train runs it (docs/training.md "Precision"). */
static int build_step(const char *path, const cm_model_config *cfg, const cm_model *m,
                      cm_graph **step, cm_train_step_info *info) {
  cm_optim_config oc;
  cm_ema_pair pairs[8];
  model_optim_config(&oc, pairs);
  cm_err err = {0};
  cm_dtype low = CM_F32;
  bool explicit_low = strcmp(cfg->train.precision, "auto") != 0;
  if (explicit_low && cm_train_precision_resolve(cfg->train.precision, CM_BACKEND_REF, &low, &err))
    return cli_report(&err, path);
  double fixed = 0;
  if (cm_model_config_loss_scale(cfg, cm_dtype_name(low), &oc.loss_scaling, &fixed, &err))
    return cli_report(&err, path);
  oc.loss_scaling |= fixed > 0, oc.fixed_loss_scale = fixed > 0;
  if (fixed > 0) oc.init_loss_scale = fixed;
  oc.growth_interval = cfg->train.loss_scale_growth;
  if (cm_build_train_step(m->g, m->loss, &oc, step, info, &err) ||
      (low != CM_F32 && cm_autocast(step, low, NULL, &err)))
    return cli_report(&err, path);
  return EXIT_OK;
}

/* ---- parameter roles and modules ---------------------------------------- */

typedef enum { ROLE_TRAINABLE, ROLE_FROZEN, ROLE_EMA, ROLE_COUNT } param_role;

static bool has_prefix_in(const char *name, const char *const *prefixes) {
  for (int i = 0; prefixes[i]; i++)
    if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0) return true;
  return false;
}

static bool has_substring_in(const char *name, const char *const *subs) {
  for (int i = 0; subs[i]; i++)
    if (strstr(name, subs[i])) return true;
  return false;
}

/* As cm_build_train_step decides: an EMA target first, then frozen, else trained. */
static param_role role_of(const char *name) {
  if (has_prefix_in(name, cm_model_ema_target_prefixes)) return ROLE_EMA;
  if (has_substring_in(name, cm_model_frozen_substrings)) return ROLE_FROZEN;
  return ROLE_TRAINABLE;
}

typedef struct module_row {
  char name[160];
  int depth; /* 1: first name component; 2: first two */
  int64_t count[ROLE_COUNT];
} module_row;

typedef struct module_table {
  int n, cap;
  module_row *rows;
} module_table;

static module_row *module_get(module_table *t, const char *name, size_t len, int depth) {
  for (int i = 0; i < t->n; i++)
    if (t->rows[i].depth == depth && strlen(t->rows[i].name) == len &&
        strncmp(t->rows[i].name, name, len) == 0)
      return &t->rows[i];
  if (t->n == t->cap) {
    int cap = t->cap ? 2 * t->cap : 32;
    module_row *rows = realloc(t->rows, sizeof *rows * (size_t)cap);
    if (!rows) return NULL;
    t->rows = rows;
    t->cap = cap;
  }
  module_row *r = &t->rows[t->n++];
  memset(r, 0, sizeof *r);
  if (len >= sizeof r->name) len = sizeof r->name - 1;
  memcpy(r->name, name, len);
  r->depth = depth;
  return r;
}

/* Adds a param to its top-level module and to its two-component module. */
static bool module_add(module_table *t, const char *name, param_role role, int64_t numel) {
  const char *dot1 = strchr(name, '.');
  size_t len1 = dot1 ? (size_t)(dot1 - name) : strlen(name);
  const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
  size_t len2 = dot2 ? (size_t)(dot2 - name) : strlen(name);
  module_row *top = module_get(t, name, len1, 1);
  if (!top) return false;
  top->count[role] += numel;
  if (dot1) {
    module_row *sub = module_get(t, name, len2, 2);
    if (!sub) return false;
    sub->count[role] += numel;
  }
  return true;
}

/* Display order: each top-level module as the graph first names it, followed
 * by its sub-modules in graph order. Fills order[0..t->n). */
static void module_order(const module_table *t, int *order) {
  int k = 0;
  for (int i = 0; i < t->n; i++) {
    if (t->rows[i].depth != 1) continue;
    order[k++] = i;
    size_t len = strlen(t->rows[i].name);
    for (int s = 0; s < t->n; s++) {
      const module_row *r = &t->rows[s];
      if (r->depth == 2 && strncmp(r->name, t->rows[i].name, len) == 0 && r->name[len] == '.')
        order[k++] = s;
    }
  }
}

static int64_t row_total(const module_row *r) {
  return r->count[ROLE_TRAINABLE] + r->count[ROLE_FROZEN] + r->count[ROLE_EMA];
}

/* ---- FLOPs and activations ---------------------------------------------- */

/* 2 x MACs of a contraction node; 0 for any other op. */
static double contraction_flops(const cm_graph *g, int id) {
  const cm_node *n = &g->nodes[id];
  double out = (double)cm_type_numel(&n->type);
  switch (n->op) {
  case CM_OP_MATMUL: {
    const cm_type *a = &g->nodes[n->inputs[0]].type;
    int64_t k = a->rank >= 2 ? a->dims[a->rank - (n->attrs.transpose_a ? 2 : 1)] : a->dims[0];
    return 2.0 * out * (double)k;
  }
  case CM_OP_CONV2D: { /* (x, w): per output, C/groups * KH * KW MACs */
    const cm_type *w = &g->nodes[n->inputs[1]].type;
    return 2.0 * out * (double)(w->dims[1] * w->dims[2] * w->dims[3]);
  }
  case CM_OP_CONV2D_GRAD_INPUT: { /* (dy, w): the forward conv's MACs */
    const cm_type *dy = &g->nodes[n->inputs[0]].type, *w = &g->nodes[n->inputs[1]].type;
    return 2.0 * (double)cm_type_numel(dy) * (double)(w->dims[1] * w->dims[2] * w->dims[3]);
  }
  case CM_OP_CONV2D_GRAD_WEIGHT: { /* (x, dy) -> w: the forward conv's MACs */
    const cm_type *dy = &g->nodes[n->inputs[1]].type, *w = &n->type;
    return 2.0 * (double)cm_type_numel(dy) * (double)(w->dims[1] * w->dims[2] * w->dims[3]);
  }
  default: return 0.0;
  }
}

typedef struct model_costs {
  double forward, backward, target; /* FLOPs for the whole local batch */
  int64_t activation_bytes;
  int64_t params[ROLE_COUNT];
} model_costs;

/* Movement ops that PyTorch would express as views: autograd keeps their base. */
static bool is_view(cm_op op) {
  return op == CM_OP_RESHAPE || op == CM_OP_BROADCAST || op == CM_OP_PERMUTE || op == CM_OP_SLICE;
}

static bool compute_costs(const cm_model *m, const cm_graph *step, model_costs *c) {
  const cm_graph *g = m->g;
  int n0 = g->n_nodes;
  memset(c, 0, sizeof *c);
  if (n0 < 1) return true;
  /* Which inputs each node depends on: bit 0 img_t, bit 1 any other input. */
  unsigned char *dep = calloc((size_t)n0, 1);
  bool *kept = calloc((size_t)n0, sizeof *kept);
  if (!dep || !kept) {
    free(dep);
    free(kept);
    return false;
  }
  for (int i = 0; i < n0; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op == CM_OP_INPUT) dep[i] = i == m->img_t ? 1 : 2;
    for (int k = 0; k < n->n_inputs; k++) dep[i] |= dep[n->inputs[k]];
    double f = contraction_flops(g, i);
    if (dep[i] == 1)
      c->target += f;
    else
      c->forward += f;
    if (n->op == CM_OP_PARAM) c->params[role_of(n->name)] += cm_type_numel(&n->type);
  }
  /* The step graph is the forward graph (same ids) plus what autodiff and AdamW appended. */
  for (int j = n0; j < step->n_nodes; j++) {
    const cm_node *n = &step->nodes[j];
    c->backward += contraction_flops(step, j);
    for (int k = 0; k < n->n_inputs; k++) {
      int x = n->inputs[k];
      while (x < n0 && is_view(step->nodes[x].op)) x = step->nodes[x].inputs[0];
      if (x < n0 && cm_op_get_info(step->nodes[x].op)->category != CM_CAT_SOURCE) kept[x] = true;
    }
  }
  for (int i = 0; i < n0; i++)
    if (kept[i]) c->activation_bytes += (int64_t)cm_type_nbytes(&g->nodes[i].type);
  free(dep);
  free(kept);
  return true;
}

/* ---- cmaec summary ------------------------------------------------------- */

static void print_count(int64_t v) {
  /* 121,123,456-style grouping for the table */
  char digits[32], out[48];
  int n = snprintf(digits, sizeof digits, "%lld", (long long)v), o = 0;
  for (int i = 0; i < n; i++) {
    if (i > 0 && (n - i) % 3 == 0) out[o++] = ',';
    out[o++] = digits[i];
  }
  out[o] = 0;
  printf("%15s", out);
}

static void json_string(const char *s) {
  putchar('"');
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      printf("\\%c", *s);
    else if ((unsigned char)*s < 0x20)
      printf("\\u%04x", (unsigned char)*s);
    else
      putchar(*s);
  }
  putchar('"');
}

int cmd_summary(int argc, char **argv) {
  model_cmd mc;
  int rc = split_sets(argc, argv, "summary", &mc);
  if (rc) return model_cmd_free(&mc), rc;
  cli_option opts[] = {{"--help", false, NULL, false},
                       {"--batch", true, NULL, false},
                       {"--json", false, NULL, false}};
  const char *pos[1];
  int n_pos, batch = 2;
  cm_model model = {0};
  cm_graph *step = NULL;
  module_table mt = {0};
  int *order = NULL;
  if (!cli_parse(mc.argc, mc.argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "summary")) {
    rc = EXIT_INVALID;
    goto done;
  }
  if (opts[0].given) {
    fputs(usage_summary, stdout);
    goto done;
  }
  if (n_pos != 1) {
    fputs(usage_summary, stderr);
    rc = EXIT_INVALID;
    goto done;
  }
  if (opts[1].given && !parse_count(opts[1].value, &batch)) {
    fprintf(stderr, "cmaec summary: --batch %s: not an integer in [1, 1000000]\n", opts[1].value);
    rc = EXIT_INVALID;
    goto done;
  }
  const char *path = pos[0];
  cm_model_config cfg;
  if ((rc = load_config(&mc, path, &cfg))) goto done;
  double t0 = now_seconds();
  if ((rc = build_model(path, &cfg, batch, 1, &model))) goto done;
  double t1 = now_seconds();
  cm_train_step_info info;
  if ((rc = build_step(path, &cfg, &model, &step, &info))) goto done;
  double t2 = now_seconds();

  model_costs c;
  for (int i = 0; i < model.g->n_nodes; i++) {
    const cm_node *n = &model.g->nodes[i];
    if (n->op == CM_OP_PARAM &&
        !module_add(&mt, n->name, role_of(n->name), cm_type_numel(&n->type)))
      rc = EXIT_INTERNAL;
  }
  if (rc || !compute_costs(&model, step, &c)) {
    fprintf(stderr, "cmaec summary: out of memory\n");
    rc = EXIT_INTERNAL;
    goto done;
  }
  order = malloc(sizeof(int) * (size_t)(mt.n + 1));
  if (!order) {
    fprintf(stderr, "cmaec summary: out of memory\n");
    rc = EXIT_INTERNAL;
    goto done;
  }
  module_order(&mt, order);
  double per = 1.0 / (double)batch;
  double fwd = c.forward * per, bwd = c.backward * per, tgt = c.target * per;
  double step_flops = fwd + bwd + tgt, convention = 3.0 * fwd + tgt;

  if (opts[2].given) {
    printf("{\"model\": ");
    json_string(cfg.name);
    printf(", \"arch\": ");
    json_string(cfg.arch);
    printf(", \"contrastive\": %s, \"batch\": %d, \"dtype\": \"f32\",\n",
           cfg.contrastive ? "true" : "false", batch);
    printf(" \"trainable_params\": %lld, \"frozen_params\": %lld, \"ema_params\": %lld, "
           "\"total_params\": %lld,\n",
           (long long)c.params[ROLE_TRAINABLE], (long long)c.params[ROLE_FROZEN],
           (long long)c.params[ROLE_EMA], (long long)(c.params[0] + c.params[1] + c.params[2]));
    printf(" \"forward_flops_per_image\": %.17g, \"backward_flops_per_image\": %.17g, "
           "\"target_flops_per_image\": %.17g, \"step_flops_per_image\": %.17g, "
           "\"step_flops_per_image_convention\": %.17g,\n",
           fwd, bwd, tgt, step_flops, convention);
    printf(" \"activation_bytes\": %lld, \"activation_bytes_per_image\": %.17g,\n",
           (long long)c.activation_bytes, (double)c.activation_bytes * per);
    printf(" \"forward_nodes\": %d, \"step_nodes\": %d, \"build_seconds\": %.6f, "
           "\"step_build_seconds\": %.6f,\n",
           model.g->n_nodes, step->n_nodes, t1 - t0, t2 - t1);
    printf(" \"modules\": [");
    for (int i = 0; i < mt.n; i++) {
      const module_row *r = &mt.rows[order[i]];
      printf("%s\n  {\"name\": ", i ? "," : "");
      json_string(r->name);
      printf(", \"depth\": %d, \"params\": %lld, \"trainable\": %lld, \"frozen\": %lld, "
             "\"ema\": %lld}",
             r->depth, (long long)row_total(r), (long long)r->count[ROLE_TRAINABLE],
             (long long)r->count[ROLE_FROZEN], (long long)r->count[ROLE_EMA]);
    }
    printf("]}\n");
    goto done;
  }

  printf("%s (%s, %s), local batch %d, f32\n\n", cfg.name, cfg.arch,
         cfg.contrastive ? "CMAE" : "MAE", batch);
  printf("%-40s %15s %15s %15s %15s\n", "module", "params", "trainable", "frozen", "EMA");
  for (int i = 0; i < mt.n; i++) {
    const module_row *r = &mt.rows[order[i]];
    printf("%s%-*s ", r->depth == 1 ? "" : "  ", r->depth == 1 ? 40 : 38, r->name);
    print_count(row_total(r));
    for (int role = 0; role < ROLE_COUNT; role++) putchar(' '), print_count(r->count[role]);
    putchar('\n');
  }
  printf("%-40s ", "total");
  print_count(c.params[0] + c.params[1] + c.params[2]);
  for (int role = 0; role < ROLE_COUNT; role++) putchar(' '), print_count(c.params[role]);
  printf("\n\n");
  printf("FLOPs per image, one training step (2 x MACs of matmul and conv nodes; LN, softmax,\n"
         "GELU and the losses' elementwise math not counted, as CMAE.md section 11):\n");
  printf("  forward, trained parts            %10.3f GFLOP\n", fwd * 1e-9);
  printf("  backward (autodiff nodes)         %10.3f GFLOP  (%.3f x forward)\n", bwd * 1e-9,
         fwd > 0 ? bwd / fwd : 0.0);
  printf("  target forward (no gradient)      %10.3f GFLOP\n", tgt * 1e-9);
  printf("  step, exact from the graphs       %10.3f GFLOP\n", step_flops * 1e-9);
  printf("  step, 3 x forward + target        %10.3f GFLOP  (CMAE.md section 11 convention)\n",
         convention * 1e-9);
  printf("  The exact backward is less than 2 x forward: the first layer (patch embedding)\n"
         "  needs no gradient of the image%s.\n\n",
         cfg.contrastive ? ", and the contrastive keys (stop-gradient) carry none" : "");
  printf("activation memory (forward values read by backward nodes): %.2f MiB at batch %d, "
         "%.2f MiB per image\n",
         (double)c.activation_bytes / 1048576.0, batch,
         (double)c.activation_bytes * per / 1048576.0);
  printf("graphs: forward %d nodes (built in %.3f s), training step %d nodes (%d params trained, "
         "autodiff + AdamW in %.3f s)\n",
         model.g->n_nodes, t1 - t0, step->n_nodes, info.n_trainable, t2 - t1);
done:
  free(order);
  free(mt.rows);
  cm_graph_free(step);
  cm_model_free(&model);
  model_cmd_free(&mc);
  return rc;
}

/* ---- cmaec build --------------------------------------------------------- */

/* The data_parallel pass on a step for `ranks` ranks; *report receives its buckets. */
static int reduce_gradients(const char *path, cm_graph **step, int ranks, double bucket_mb,
                            char *report, size_t size) {
  cm_err err = {0};
  if (cm_data_parallel(step, ranks, (int64_t)(bucket_mb * 1e6), &err))
    return cli_report(&err, path);
  int n = 0;
  double total = 0;
  char sizes[512] = "";
  for (;; n++) {
    char name[32];
    snprintf(name, sizeof name, "grad_bucket_%d", n);
    int id = cm_graph_find(*step, name);
    if (id < 0) break;
    double mb = (double)cm_type_nbytes(&(*step)->nodes[id].type) / 1e6;
    total += mb;
    size_t len = strlen(sizes);
    if (len < sizeof sizes - 16)
      snprintf(sizes + len, sizeof sizes - len, "%s%.2f", n ? " " : "", mb);
    else if (!strstr(sizes, "..."))
      snprintf(sizes + len, sizeof sizes - len, " ...");
  }
  snprintf(report, size,
           "  data parallel: %d gradient buckets, %.2f MB (all_reduce mean over %d "
           "ranks; MB: %s)\n",
           n, total, ranks, sizes);
  return EXIT_OK;
}

int cmd_build(int argc, char **argv) {
  model_cmd mc;
  int rc = split_sets(argc, argv, "build", &mc);
  if (rc) return model_cmd_free(&mc), rc;
  cli_option opts[] = {{"--help", false, NULL, false},    {"-o", true, NULL, false},
                       {"--output", true, NULL, false},   {"--train", false, NULL, false},
                       {"--batch", true, NULL, false},    {"--ranks", true, NULL, false},
                       {"--text", false, NULL, false},    {"--no-opt", false, NULL, false},
                       {"--bucket-mb", true, NULL, false}};
  const char *pos[1];
  int n_pos, batch = 0, ranks = 1;
  cm_model model = {0};
  cm_graph *step = NULL;
  cm_plan *plan = NULL;
  char *text = NULL;
  if (!cli_parse(mc.argc, mc.argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "build")) {
    rc = EXIT_INVALID;
    goto done;
  }
  if (opts[0].given) {
    fputs(usage_build, stdout);
    goto done;
  }
  const char *out_path = opts[1].given ? opts[1].value : opts[2].value;
  if (n_pos != 1 || !out_path) {
    fputs(usage_build, stderr);
    rc = EXIT_INVALID;
    goto done;
  }
  for (int k = 4; k <= 5; k++) {
    if (opts[k].given && !parse_count(opts[k].value, k == 4 ? &batch : &ranks)) {
      fprintf(stderr, "cmaec build: %s %s: not an integer in [1, 1000000]\n", opts[k].name,
              opts[k].value);
      rc = EXIT_INVALID;
      goto done;
    }
  }
  double bucket_mb = 25;
  char *end = NULL, buckets[700] = "";
  if (opts[8].given &&
      (bucket_mb = strtod(opts[8].value, &end), !(bucket_mb > 0) || *end || bucket_mb > 1e6)) {
    fprintf(stderr, "cmaec build: --bucket-mb %s: not a number in (0, 1000000]\n", opts[8].value);
    rc = EXIT_INVALID;
    goto done;
  }
  const char *path = pos[0];
  cm_model_config cfg;
  if ((rc = load_config(&mc, path, &cfg))) goto done;
  if (!opts[4].given) {
    if (cfg.optimizer.batch % ranks != 0) {
      fprintf(stderr, "%s: optimizer.batch %d is not divisible by --ranks %d (give --batch)\n",
              path, cfg.optimizer.batch, ranks);
      rc = EXIT_INVALID;
      goto done;
    }
    batch = cfg.optimizer.batch / ranks;
  }
  if ((rc = build_model(path, &cfg, batch, ranks, &model))) goto done;
  cm_train_step_info info = {0};
  if (opts[3].given && (rc = build_step(path, &cfg, &model, &step, &info))) goto done;
  if (step && ranks > 1 &&
      (rc = reduce_gradients(path, &step, ranks, bucket_mb, buckets, sizeof buckets)))
    goto done;
  if (step && !opts[7].given) {
    /* The training step goes through the default pipeline, as the backends run it. */
    cm_pass_state s = {step, NULL};
    cm_err err = {0};
    cm_status st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
    step = s.g;
    plan = s.plan;
    if (st) {
      rc = cli_report(&err, path);
      goto done;
    }
  }
  const cm_graph *out = step ? step : model.g;
  text = opts[6].given ? cm_graph_print_str(out) : cm_graph_to_json(out);
  FILE *f = text ? fopen(out_path, "w") : NULL;
  bool written = f && fputs(text, f) >= 0;
  if (f && fclose(f) != 0) written = false;
  if (!written) {
    fprintf(stderr, "%s: cannot write the graph\n", out_path);
    rc = text ? EXIT_INVALID : EXIT_INTERNAL;
    goto done;
  }
  int64_t n_params = 0, elements = 0;
  for (int i = 0; i < out->n_nodes; i++)
    if (out->nodes[i].op == CM_OP_PARAM) n_params++, elements += cm_type_numel(&out->nodes[i].type);
  if (step) {
    printf("%s: training step of %s (batch %d, ranks %d): %d nodes, %lld params (%lld elements); "
           "%d trained, %d frozen, %d EMA targets\n",
           out_path, cfg.name, batch, ranks, out->n_nodes, (long long)n_params, (long long)elements,
           info.n_trainable, info.n_frozen, info.n_ema);
    fputs(buckets, stdout);
    if (plan)
      printf("  default pipeline: %d kernels, arena %.1f MiB (unplanned %.1f MiB)\n",
             plan->n_groups, (double)plan->arena_bytes / 1048576.0,
             (double)plan->unplanned_bytes / 1048576.0);
  } else
    printf("%s: forward graph of %s (batch %d, ranks %d): %d nodes, %lld params (%lld elements)\n",
           out_path, cfg.name, batch, ranks, out->n_nodes, (long long)n_params,
           (long long)elements);
done:
  free(text);
  cm_plan_free(plan);
  cm_graph_free(step);
  cm_model_free(&model);
  model_cmd_free(&mc);
  return rc;
}

/* ---- cmaec compile --------------------------------------------------------- */

static const char usage_compile[] =
    "usage: cmaec compile MODEL.json|GRAPH.json --target cpu|cuda -o DIR\n"
    "                     [--arch sm_80|sm_90|sm_90a] [--emit LIST] [--set KEY=VALUE ...]\n"
    "                     [--batch N] [--no-templates] [--cache-dir DIR]\n"
    "\n"
    "Compiles a variant's training step (or a graph file: JSON with \"nodes\") through the\n"
    "default pass pipeline, lowers every kernel to the kernel IR and renders it for the\n"
    "target. --emit is a comma-separated list (default: the target's code and stats):\n"
    "  kir    DIR/kernels.kir         the kernel IR\n"
    "  llvm   DIR/kernels.ll, .opt.ll, .s  LLVM IR as rendered, after O3, assembly (cpu)\n"
    "  cuda   DIR/kernels.cu, kernels.ARCH.cubin  CUDA C and its CUBIN from NVRTC (cuda)\n"
    "  stats  DIR/stats.tsv           one row per stage: kernel, kind, template, domain,\n"
    "                                 reduction, work items, FLOPs; with cuda also registers,\n"
    "                                 shared memory, stack and spill bytes from ptxas\n"
    "--arch (cuda) defaults to sm_90. The CUBIN needs NVRTC (no GPU). Each distinct kernel\n"
    "is its own module, compiled on every core, or loaded from the module cache: DIR/cuda\n"
    "under --cache-dir DIR, else $CMAEC_CACHE_DIR, else $XDG_CACHE_HOME/cmaec, else\n"
    "~/.cache/cmaec (\"\" disables it); a second compile of the same code compiles nothing.\n"
    "--target cpu compiles for the host CPU, or for the LLVM CPU named by CMAEC_CPU\n"
    "(x86-64-v3, x86-64-v4, skylake-avx512, znver4, ...), which need not be this host's.\n";

typedef struct emit_set {
  bool kir, llvm, cuda, stats;
} emit_set;

static bool parse_emit(const char *s, emit_set *e) {
  memset(e, 0, sizeof *e);
  const char *p = s;
  while (*p) {
    const char *q = strchr(p, ',');
    size_t n = q ? (size_t)(q - p) : strlen(p);
    if (n == 3 && !strncmp(p, "kir", 3))
      e->kir = true;
    else if (n == 4 && !strncmp(p, "llvm", 4))
      e->llvm = true;
    else if (n == 4 && !strncmp(p, "cuda", 4))
      e->cuda = true;
    else if (n == 5 && !strncmp(p, "stats", 5))
      e->stats = true;
    else
      return false;
    p += n + (q ? 1 : 0);
  }
  return true;
}

/* Writes what the program emits (cm_program_emit, the whole program) to DIR/file. */
static int write_emit(const cm_program *pr, const char *dir, const char *file, cm_emit what,
                      const char *where) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  FILE *f = fopen(path, "wb");
  if (!f) return fprintf(stderr, "%s: cannot write\n", path), EXIT_INVALID;
  cm_err err = {0};
  cm_status st = cm_program_emit(pr, -1, what, f, &err);
  if (fclose(f) != 0 && st == CM_OK)
    return fprintf(stderr, "%s: cannot write\n", path), EXIT_INVALID;
  return st == CM_OK ? EXIT_OK : cli_report(&err, where);
}

static double stage_flops(const cm_kstage *s) {
  if (s->n_red == 0 || s->body < 0) return 0;
  const cm_kexpr *b = &s->exprs[s->body];
  if (b->kind != CM_KX_OP || b->op != CM_OP_MUL) return 0;
  double f = 2;
  for (int i = 0; i < s->n_dom; i++) f *= (double)s->dom[i];
  for (int i = 0; i < s->n_red; i++) f *= (double)s->red[i];
  return f;
}

static void extents_str(const int64_t *d, int n, char *buf, size_t size) {
  size_t used = 0;
  buf[0] = 0;
  for (int i = 0; i < n && used + 24 < size; i++)
    used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? "x" : "", (long long)d[i]);
  if (n == 0) snprintf(buf, size, "-");
}

/* The graph to compile: a variant's training step (through the default
 * pipeline) or a graph file's graph; *plan gets the pipeline's plan. */
static int compile_input(model_cmd *mc, const char *path, int batch, cm_graph **g, cm_plan **plan) {
  /* a graph file is a JSON object with "nodes" (at any position: `build` and `opt -o` write
   * "inputs" first); anything else is read as a variant, whose reader reports a file that
   * cannot be read or parsed */
  bool is_graph = false;
  char *text = NULL;
  size_t len = 0;
  cm_err rerr = {0};
  if (cm_read_file(path, &text, &len, &rerr) == CM_OK) {
    cJSON *root = cJSON_ParseWithLength(text, len);
    is_graph = cJSON_IsObject(root) && cJSON_GetObjectItemCaseSensitive(root, "nodes");
    cJSON_Delete(root);
  }
  free(text);
  int rc;
  if (is_graph) {
    if ((rc = cli_load_graph(path, g))) return rc;
  } else {
    cm_model_config cfg;
    if ((rc = load_config(mc, path, &cfg))) return rc;
    cm_model model = {0};
    if ((rc = build_model(path, &cfg, batch ? batch : cfg.optimizer.batch, 1, &model))) {
      cm_model_free(&model);
      return rc;
    }
    cm_train_step_info info = {0};
    rc = build_step(path, &cfg, &model, g, &info);
    cm_model_free(&model);
    if (rc) return rc;
  }
  cm_pass_state s = {*g, NULL};
  cm_err err = {0};
  cm_status st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, &err);
  *g = s.g;
  *plan = s.plan;
  return st ? cli_report(&err, path) : EXIT_OK;
}

/* What `cmaec compile` was asked for. */
typedef struct compile_args {
  bool help, no_templates;
  const char *path, *dir, *target_name, *arch;
  const char *cache_dir; /* NULL: cm_cache_dir's default */
  cm_target_kind target;
  emit_set emit;
  int batch;
} compile_args;

/* Option parsing: fills *a, or reports a bad invocation (EXIT_INVALID). */
static int compile_parse_args(model_cmd *mc, compile_args *a) {
  cli_option opts[] = {{"--help", false, NULL, false},    {"-o", true, NULL, false},
                       {"--output", true, NULL, false},   {"--target", true, NULL, false},
                       {"--arch", true, NULL, false},     {"--emit", true, NULL, false},
                       {"--batch", true, NULL, false},    {"--no-templates", false, NULL, false},
                       {"--cache-dir", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  memset(a, 0, sizeof *a);
  if (!cli_parse(mc->argc, mc->argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "compile"))
    return EXIT_INVALID;
  if (opts[0].given) return a->help = true, EXIT_OK;
  a->dir = opts[1].given ? opts[1].value : opts[2].value;
  if (n_pos != 1 || !a->dir || !opts[3].given) return fputs(usage_compile, stderr), EXIT_INVALID;
  a->target_name = opts[3].value;
  if (!strcmp(opts[3].value, "cpu"))
    a->target = CM_TARGET_CPU;
  else if (!strcmp(opts[3].value, "cuda"))
    a->target = CM_TARGET_CUDA;
  else {
    fprintf(stderr, "cmaec compile: --target %s: unknown target (cpu, cuda)\n", opts[3].value);
    return EXIT_INVALID;
  }
  a->arch = opts[4].given ? opts[4].value : "sm_90";
  if (opts[4].given && a->target != CM_TARGET_CUDA) {
    fprintf(stderr, "cmaec compile: --arch applies to --target cuda only\n");
    return EXIT_INVALID;
  }
  if (strcmp(a->arch, "sm_80") && strcmp(a->arch, "sm_90") && strcmp(a->arch, "sm_90a")) {
    fprintf(stderr, "cmaec compile: --arch %s: unsupported (sm_80, sm_90, sm_90a)\n", a->arch);
    return EXIT_INVALID;
  }
  a->emit = (emit_set){false, a->target == CM_TARGET_CPU, a->target == CM_TARGET_CUDA, true};
  if (opts[5].given && !parse_emit(opts[5].value, &a->emit)) {
    fprintf(stderr, "cmaec compile: --emit %s: a comma-separated list of kir, llvm, cuda, stats\n",
            opts[5].value);
    return EXIT_INVALID;
  }
  if ((a->emit.llvm && a->target != CM_TARGET_CPU) ||
      (a->emit.cuda && a->target != CM_TARGET_CUDA)) {
    fprintf(stderr, "cmaec compile: --emit %s does not match --target %s\n",
            a->emit.llvm ? "llvm" : "cuda", opts[3].value);
    return EXIT_INVALID;
  }
  if (opts[6].given && !parse_count(opts[6].value, &a->batch)) {
    fprintf(stderr, "cmaec compile: --batch %s: not an integer in [1, 1000000]\n", opts[6].value);
    return EXIT_INVALID;
  }
  a->no_templates = opts[7].given;
  a->cache_dir = opts[8].given ? opts[8].value : NULL;
  a->path = pos[0];
  return EXIT_OK;
}

/* The target: a bad CMAEC_CPU is reported before any work. */
static int compile_target(const compile_args *a, cm_target *tgt) {
  cm_err err = {0};
  if (a->target == CM_TARGET_CPU ? cm_target_cpu(NULL, NULL, tgt, &err)
                                 : cm_target_cuda(a->arch, tgt, &err))
    return cli_report(&err, "cmaec compile");
  return EXIT_OK;
}

/* Compiles g for tgt (compiled only: the CPU's kernels are rendered where emitted, CUDA's
 * through NVRTC when its code or its resource figures are asked for) and prints its sizes. */
static int compile_program(const compile_args *a, cm_graph *g, cm_plan *plan, const cm_target *tgt,
                           bool nvrtc, cm_program **pr) {
  cm_err err = {0};
  cm_compile_opts copts = {.cache_dir = a->cache_dir,
                           .no_templates = a->no_templates,
                           .compile_only = true,
                           .render_only = !nvrtc,
                           .plan = plan};
  if (cm_compile(g, tgt, &copts, pr, &err)) return cli_report(&err, a->path);
  cm_program_stats pst;
  cm_program_stats_get(*pr, &pst);
  const cm_kprogram *prog = cm_program_kernels(*pr);
  printf("%s: %d kernels, %d stages, arena %.1f MiB, scratch %.1f MiB (lowered in %.0f ms)\n",
         a->path, prog->n_kernels, pst.n_stages, (double)prog->arena_bytes / 1048576.0,
         (double)prog->max_scratch_bytes / 1048576.0, pst.lower_ms);
  return EXIT_OK;
}

/* --emit llvm: LLVM IR as rendered, after O3, and assembly. */
static int compile_emit_llvm(const compile_args *a, const cm_program *pr) {
#if !CMAEC_HAVE_LLVM
  fprintf(stderr, "cmaec compile: --emit llvm: %s\n", CM_NO_CPU_BACKEND_MESSAGE);
  return EXIT_INVALID;
#else
  cm_err err = {0};
  cm_jit *jit = NULL;
  cm_jit_opts jo = {NULL, 3, NULL, NULL, 512, true}; /* $CMAEC_CPU may name any CPU */
  if (cm_jit_create(&jit, &jo, &err))                /* for its description of the target */
    return cli_report(&err, "cmaec compile");
  double t0 = now_seconds();
  int rc;
  if (!(rc = write_emit(pr, a->dir, "kernels.ll", CM_EMIT_SOURCE, a->path)) &&
      !(rc = write_emit(pr, a->dir, "kernels.s", CM_EMIT_ASM, a->path)) &&
      !(rc = write_emit(pr, a->dir, "kernels.opt.ll", CM_EMIT_OPT_IR, a->path)))
    printf("  llvm: %s/kernels.ll, kernels.opt.ll, kernels.s for %s (%.0f ms)\n", a->dir,
           cm_jit_target_description(jit), 1e3 * (now_seconds() - t0));
  cm_jit_destroy(jit);
  return rc;
#endif
}

/* --emit cuda: the CUDA C, and DIR/cubin.ARCH/KERNEL.cubin for each distinct kernel (the
 * first kernel it serves names it; the later parts of a split one KERNEL.sSTAGE.cubin); then
 * the compiler's figures when it ran. */
static int compile_emit_cuda(const compile_args *a, const cm_program *pr,
                             const cm_cuda_build *build) {
  int rc;
  if (a->emit.cuda && (rc = write_emit(pr, a->dir, "kernels.cu", CM_EMIT_SOURCE, a->path)))
    return rc;
  if (!build) return EXIT_OK;
  const cm_kprogram *kp = cm_program_kernels(pr);
  char sub[4096];
  snprintf(sub, sizeof sub, "%s/cubin.%s", a->dir, a->arch);
  if (a->emit.cuda && mkdir(sub, 0777) != 0 && errno != EEXIST)
    return fprintf(stderr, "%s: cannot create the directory: %s\n", sub, strerror(errno)),
           EXIT_INVALID;
  int spills = 0, functions = 0;
  for (int m = 0; m < build->n_modules; m++) {
    const cm_cuda_module *mod = &build->modules[m];
    functions += mod->image.n_kernels;
    for (int i = 0; i < mod->image.n_kernels; i++)
      spills +=
          mod->image.kernels[i].spill_store_bytes + mod->image.kernels[i].spill_load_bytes > 0;
    if (!a->emit.cuda) continue;
    char path[4096];
    if (mod->stage_begin == 0) /* a split kernel's later parts: NAME.sSTAGE.cubin */
      snprintf(path, sizeof path, "%s/%s.cubin", sub, kp->kernels[mod->kernel].name);
    else
      snprintf(path, sizeof path, "%s/%s.s%d.cubin", sub, kp->kernels[mod->kernel].name,
               mod->stage_begin);
    FILE *f = fopen(path, "wb");
    bool ok = f && fwrite(mod->image.data, 1, mod->image.size, f) == mod->image.size;
    if ((f && fclose(f) != 0) || !ok)
      return fprintf(stderr, "%s: cannot write\n", path), EXIT_INVALID;
  }
  const cm_cuda_compiler *c = cm_program_cuda_compiler(pr);
  char cbuf[4096];
  const char *cache = cm_cache_dir(a->cache_dir, cbuf, sizeof cbuf);
  printf("  cuda: %d distinct kernels in %d modules (%d functions) for %s by %s: %d from the "
         "cache, %d compiled on %d thread%s in %.0f ms (rendered in %.0f ms); %lld bytes of CUBIN, "
         "%d with spills\n",
         build->n_distinct, build->n_modules, functions, a->arch, c ? c->name : "?",
         build->cache_hits, build->cache_misses, build->threads, build->threads == 1 ? "" : "s",
         build->compile_ms, build->render_ms, (long long)build->image_bytes, spills);
  printf("  cache: %s%s", cache ? cache : "off", cache ? "/cuda" : "");
  int slowest = -1; /* the compile's critical path: no schedule finishes before it */
  double cpu_ms = 0;
  for (int m = 0; m < build->n_modules; m++) {
    cpu_ms += build->modules[m].cpu_ms;
    if (!build->modules[m].cached &&
        (slowest < 0 || build->modules[m].cpu_ms > build->modules[slowest].cpu_ms))
      slowest = m;
  }
  if (slowest >= 0)
    printf("; compile CPU time %.1f s, the largest module %s stages %d..%d %.1f s", cpu_ms / 1e3,
           kp->kernels[build->modules[slowest].kernel].name, build->modules[slowest].stage_begin,
           build->modules[slowest].stage_end - 1, build->modules[slowest].cpu_ms / 1e3);
  if (build->cache_rejected) printf(", %d damaged or stale files replaced", build->cache_rejected);
  if (build->cache_write_failures)
    printf(", %d modules could not be stored", build->cache_write_failures);
  putchar('\n');
  return EXIT_OK;
}

/* One stats.tsv row: a stage's shape and work; with cuda its resources and launch. */
static double stats_row(FILE *f, const cm_kernel *k, int s, const cm_cubin *cubin,
                        const cm_cuda_render_opts *co) { /* cubin: the stage's module */
  const cm_kstage *st = &k->stages[s];
  char dom[128], red[128];
  extents_str(st->dom, st->n_dom, dom, sizeof dom);
  extents_str(st->red, st->n_red, red, sizeof red);
  double fl = stage_flops(st);
  fprintf(f, "%s\t%d\t%s\t%s\t%s\t%s\t%lld\t%.0f", k->name, s, cm_group_kind_name(k->kind),
          st->tmpl == CM_KT_GEMM ? "gemm" : "-", dom, red, (long long)cm_kstage_work_items(st), fl);
  if (co) {
    char fn[160];
    snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, s);
    const cm_cuda_kernel_info *ki = cubin ? cm_cubin_kernel(cubin, fn) : NULL;
    cm_cuda_launch l = cm_cuda_stage_launch(k, s, co);
    fprintf(f, "\t%d\t%d\t%d\t%d\t%ux%ux%u\t%ux%ux%u", ki ? ki->registers : -1,
            ki ? ki->shared_bytes + (int)l.shared_bytes : -1, ki ? ki->stack_bytes : -1,
            ki ? ki->spill_store_bytes + ki->spill_load_bytes : -1, l.grid[0], l.grid[1], l.grid[2],
            l.block[0], l.block[1], l.block[2]);
  }
  fputc('\n', f);
  return fl;
}

/* --emit stats: DIR/stats.tsv, one row per stage. */
static int compile_emit_stats(const compile_args *a, const cm_program *pr, const cm_target *tgt,
                              const cm_cuda_build *build) {
  bool cuda = a->target == CM_TARGET_CUDA;
  cm_cuda_render_opts co = {cuda ? tgt : NULL, a->no_templates};
  const cm_kprogram *prog = cm_program_kernels(pr);
  char spath[4096];
  snprintf(spath, sizeof spath, "%s/stats.tsv", a->dir);
  FILE *stats = fopen(spath, "w");
  if (!stats) return fprintf(stderr, "%s: cannot write\n", spath), EXIT_INVALID;
  fprintf(stats, "kernel\tstage\tkind\ttemplate\tdomain\treduction\twork_items\tflops%s\n",
          cuda ? "\tregisters\tshared_bytes\tstack_bytes\tspill_bytes\tgrid\tblock" : "");
  double total_flops = 0;
  for (int i = 0; i < prog->n_kernels; i++)
    for (int s = 0; s < prog->kernels[i].n_stages; s++)
      total_flops +=
          stats_row(stats, &prog->kernels[i], s,
                    build ? &build->modules[cm_cuda_stage_module(build, i, s)].image : NULL,
                    cuda ? &co : NULL);
  if (fclose(stats) != 0) return fprintf(stderr, "%s: cannot write\n", spath), EXIT_INVALID;
  printf("  stats: %s (%.3f GFLOP in contractions per step)\n", spath, total_flops * 1e-9);
  return EXIT_OK;
}

/* Emit: what --emit asks for, in DIR. */
static int compile_emit(const compile_args *a, const cm_program *pr, const cm_target *tgt,
                        bool nvrtc) {
  int rc;
  if (a->emit.kir && (rc = write_emit(pr, a->dir, "kernels.kir", CM_EMIT_KERNEL_IR, a->path)))
    return rc;
  if (a->emit.llvm && (rc = compile_emit_llvm(a, pr))) return rc;
  const cm_cuda_build *build = nvrtc ? cm_program_cuda_build(pr) : NULL;
  if (nvrtc && !build) {
    fprintf(stderr, "cmaec compile: the CUDA backend made no modules\n");
    return EXIT_INTERNAL;
  }
  if ((rc = compile_emit_cuda(a, pr, build))) return rc;
  return a->emit.stats ? compile_emit_stats(a, pr, tgt, build) : EXIT_OK;
}

int cmd_compile(int argc, char **argv) {
  model_cmd mc;
  int rc = split_sets(argc, argv, "compile", &mc);
  if (rc) return model_cmd_free(&mc), rc;
  compile_args a;
  cm_graph *g = NULL;
  cm_plan *plan = NULL;
  cm_program *pr = NULL;
  cm_target tgt;
  if ((rc = compile_parse_args(&mc, &a)) || a.help) {
    if (a.help) fputs(usage_compile, stdout);
    goto done;
  }
  if ((rc = compile_target(&a, &tgt))) goto done;
  if ((rc = compile_input(&mc, a.path, a.batch, &g, &plan))) goto done;
  if (mkdir(a.dir, 0777) != 0 && errno != EEXIST) {
    fprintf(stderr, "%s: cannot create the directory: %s\n", a.dir, strerror(errno));
    rc = EXIT_INVALID;
    goto done;
  }
  bool nvrtc = a.target == CM_TARGET_CUDA && (a.emit.cuda || a.emit.stats);
  if ((rc = compile_program(&a, g, plan, &tgt, nvrtc, &pr))) goto done;
  rc = compile_emit(&a, pr, &tgt, nvrtc);
done:
  cm_program_free(pr);
  cm_plan_free(plan);
  cm_graph_free(g);
  model_cmd_free(&mc);
  return rc;
}
