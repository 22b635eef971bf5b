/* tools/cmd_step.c — cmaec grad, step, build-step: autodiff and the training
 * step on the reference evaluator. */
#include "cli.h"
#include "runtime/runtime.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char usage_grad[] =
    "usage: cmaec grad GRAPH --loss NAME [--wrt NAME,NAME,...] [--inputs IN.safetensors]\n"
    "                  [--seed N] [--step H] [--max-rel-error X]\n"
    "\n"
    "Differentiates the scalar LOSS with respect to the given nodes (default: every\n"
    "param) and compares each gradient with central finite differences, both computed\n"
    "by the reference evaluator in f64 (each element moved by H * max(1, |x|), H = 1e-6).\n"
    "Prints, per gradient, the element count, the largest gradient magnitude and the\n"
    "max relative error (max |autodiff - fd| / max |gradient|).\n"
    "With --max-rel-error, exits with 1 when any gradient's error exceeds X.\n";

static const char usage_step[] =
    "usage: cmaec step GRAPH --loss NAME --steps N --lr X [--inputs IN.safetensors]\n"
    "                  [--seed N] [--beta1 B] [--beta2 B] [--weight-decay W] [--clip X]\n"
    "                  [--loss-scaling] [--ema ONLINE_PREFIX:TARGET_PREFIX] [--momentum M]\n"
    "                  [--frozen SUBSTRING,...] [--save OUT.safetensors] [--quiet]\n"
    "                  [--backend auto|cpu|cuda|ref] [--device N] [--cuda-graphs on|off]\n"
    "                  [--precision f32|bf16|f16]\n"
    "\n"
    "Builds the training step of GRAPH (AdamW as torch.optim.AdamW; defaults: betas\n"
    "0.9, 0.95, weight decay 0.05 except names containing ln, bias, pos_embed,\n"
    "mask_token, cls_token) and runs N steps on the chosen backend with the same\n"
    "inputs, printing the loss of each step. Params come from IN or their initializer\n"
    "(--seed). --save writes the final params and optimizer state. --precision bf16|f16\n"
    "autocasts the step (the contractions' operands; everything else stays f32).\n"
    "  --backend ref         the reference evaluator\n";

static const char usage_build_step[] =
    "usage: cmaec build-step GRAPH --loss NAME -o STEP.json [--weight-decay W] [--clip X]\n"
    "                        [--loss-scaling] [--ema ONLINE_PREFIX:TARGET_PREFIX]\n"
    "                        [--frozen SUBSTRING,...] [--text]\n"
    "\n"
    "Writes the training-step graph (state, batch, scalars) -> (state', metrics):\n"
    "gradients by autodiff, optional clipping and dynamic loss scaling, AdamW and EMA\n"
    "updates as assign nodes. Runtime scalar inputs: lr, beta1, beta2, step (and\n"
    "momentum with --ema). --text writes text IR instead of JSON.\n";

/* Splits "a,b,c" into a NULL-terminated array of strings (one allocation). */
static char **split_commas(const char *s) {
  if (!s) return NULL;
  size_t n = 1;
  for (const char *p = s; *p; p++) n += *p == ',';
  size_t len = strlen(s) + 1;
  char **out = malloc(sizeof(char *) * (n + 1) + len);
  if (!out) return NULL;
  char *buf = (char *)(out + n + 1);
  memcpy(buf, s, len);
  size_t k = 0;
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) out[k++] = tok;
  out[k] = NULL;
  return out;
}

int cmd_grad(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false},        {"--loss", true, NULL, false},
                       {"--wrt", true, NULL, false},          {"--inputs", true, NULL, false},
                       {"--seed", true, NULL, false},         {"--step", true, NULL, false},
                       {"--max-rel-error", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "grad")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_grad, stdout), EXIT_OK;
  if (n_pos != 1 || !opts[1].given) return fputs(usage_grad, stderr), EXIT_INVALID;
  uint64_t seed = 0;
  double step = 1e-6, max_rel = INFINITY;
  if (opts[4].given && !cli_parse_u64(opts[4].value, &seed))
    return fprintf(stderr, "cmaec grad: --seed %s: not a non-negative integer\n", opts[4].value),
           EXIT_INVALID;
  if (opts[5].given && (!cli_parse_double(opts[5].value, &step) || step <= 0))
    return fprintf(stderr, "cmaec grad: --step %s: not a positive number\n", opts[5].value),
           EXIT_INVALID;
  if (opts[6].given && !cli_parse_double(opts[6].value, &max_rel))
    return fprintf(stderr, "cmaec grad: --max-rel-error %s: not a number\n", opts[6].value),
           EXIT_INVALID;
  cm_graph *g;
  int rc = cli_load_graph(pos[0], &g);
  if (rc) return rc;
  int loss = cli_node(g, pos[0], opts[1].value);
  int *wrt = malloc(sizeof(int) * (size_t)(g->n_nodes + 1));
  cm_gradcheck_result *res = malloc(sizeof *res * (size_t)(g->n_nodes + 1));
  char **names = split_commas(opts[2].value);
  cli_sources src = {0};
  int n_wrt = 0;
  if (loss < 0) {
    rc = EXIT_INVALID;
    goto done;
  }
  if (!wrt || !res || (opts[2].given && !names)) {
    rc = (fprintf(stderr, "cmaec grad: out of memory\n"), EXIT_INTERNAL);
    goto done;
  }
  if (names) {
    for (int k = 0; names[k]; k++) {
      int id = cli_node(g, pos[0], names[k]);
      if (id < 0) {
        rc = EXIT_INVALID;
        goto done;
      }
      wrt[n_wrt++] = id;
    }
  } else {
    for (int i = 0; i < g->n_nodes; i++)
      if (g->nodes[i].op == CM_OP_PARAM) wrt[n_wrt++] = i;
  }
  if ((rc = cli_bind_sources(g, pos[0], opts[3].value, seed, NULL, &src))) goto done;
  cm_err err = {0};
  if (cm_gradcheck(g, loss, n_wrt, wrt, src.bound, step, res, &err)) {
    rc = cli_report(&err, pos[0]);
    goto done;
  }
  printf("%-32s %10s %12s %14s %14s\n", "gradient", "elements", "max|grad|", "max abs error",
         "max rel error");
  bool over = false;
  for (int j = 0; j < n_wrt; j++) {
    printf("%-32s %10lld %12.4e %14.3e %14.3e\n", g->nodes[wrt[j]].name, (long long)res[j].elements,
           res[j].max_abs_gradient, res[j].max_abs_error, res[j].max_rel_error);
    if (!(res[j].max_rel_error <= max_rel)) over = true;
  }
  if (over) {
    fprintf(stderr, "cmaec grad: a gradient's relative error exceeds %g\n", max_rel);
    rc = EXIT_INTERNAL;
  }
done:
  cli_sources_free(&src);
  free(names);
  free(wrt);
  free(res);
  cm_graph_free(g);
  return rc;
}

/* Options shared by step and build-step that shape the optimizer config. */
typedef struct {
  cm_optim_config cfg;
  cm_ema_pair pair;
  char *pair_buf;
  char **frozen;
} optim_options;

static int read_optim_options(cli_option *opts, int n_opts, const char *command, optim_options *o) {
  cm_optim_config_default(&o->cfg);
  o->pair_buf = NULL;
  o->frozen = NULL;
  cli_option *wd = cli_find(opts, n_opts, "--weight-decay");
  cli_option *clip = cli_find(opts, n_opts, "--clip");
  cli_option *ls = cli_find(opts, n_opts, "--loss-scaling");
  cli_option *ema = cli_find(opts, n_opts, "--ema");
  cli_option *frozen = cli_find(opts, n_opts, "--frozen");
  if (wd->given && (!cli_parse_double(wd->value, &o->cfg.weight_decay) || o->cfg.weight_decay < 0))
    return fprintf(stderr, "cmaec %s: --weight-decay %s: not a number >= 0\n", command, wd->value),
           EXIT_INVALID;
  if (clip->given && (!cli_parse_double(clip->value, &o->cfg.clip_norm) || o->cfg.clip_norm <= 0))
    return fprintf(stderr, "cmaec %s: --clip %s: not a positive number\n", command, clip->value),
           EXIT_INVALID;
  o->cfg.loss_scaling = ls->given;
  if (ema->given) {
    const char *colon = strchr(ema->value, ':');
    if (!colon || colon == ema->value || !colon[1])
      return fprintf(stderr, "cmaec %s: --ema %s: expected ONLINE_PREFIX:TARGET_PREFIX\n", command,
                     ema->value),
             EXIT_INVALID;
    o->pair_buf = strdup(ema->value);
    if (!o->pair_buf) return EXIT_INTERNAL;
    o->pair_buf[colon - ema->value] = 0;
    o->pair.online_prefix = o->pair_buf;
    o->pair.target_prefix = o->pair_buf + (colon - ema->value) + 1;
    o->cfg.n_ema = 1;
    o->cfg.ema = &o->pair;
  }
  if (frozen->given) {
    o->frozen = split_commas(frozen->value);
    if (!o->frozen) return EXIT_INTERNAL;
    o->cfg.frozen = (const char *const *)o->frozen;
  }
  return EXIT_OK;
}

static void free_optim_options(optim_options *o) {
  free(o->pair_buf);
  free(o->frozen);
}

int cmd_build_step(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false}, {"--loss", true, NULL, false},
                       {"-o", true, NULL, false},      {"--weight-decay", true, NULL, false},
                       {"--clip", true, NULL, false},  {"--loss-scaling", false, NULL, false},
                       {"--ema", true, NULL, false},   {"--frozen", true, NULL, false},
                       {"--text", false, NULL, false}, {"--output", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "build-step"))
    return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_build_step, stdout), EXIT_OK;
  const char *out_path = opts[2].given ? opts[2].value : opts[9].value;
  if (n_pos != 1 || !opts[1].given || !out_path)
    return fputs(usage_build_step, stderr), EXIT_INVALID;
  optim_options oo;
  int rc = read_optim_options(opts, N_OPTS(opts), "build-step", &oo);
  if (rc) return rc;
  cm_graph *g = NULL, *step = NULL;
  if ((rc = cli_load_graph(pos[0], &g))) goto done;
  int loss = cli_node(g, pos[0], opts[1].value);
  if (loss < 0) {
    rc = EXIT_INVALID;
    goto done;
  }
  cm_err err = {0};
  cm_train_step_info info;
  if (cm_build_train_step(g, loss, &oo.cfg, &step, &info, &err)) {
    rc = cli_report(&err, pos[0]);
    goto done;
  }
  char *text = opts[8].given ? cm_graph_print_str(step) : cm_graph_to_json(step);
  FILE *f = text ? fopen(out_path, "w") : NULL;
  if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
    fprintf(stderr, "%s: cannot write the step graph\n", out_path);
    rc = text ? EXIT_INVALID : EXIT_INTERNAL;
  } else {
    printf("%s: %d nodes; %d params trained (%d with weight decay), %d frozen, %d EMA targets\n",
           out_path, step->n_nodes, info.n_trainable, info.n_decay, info.n_frozen, info.n_ema);
  }
  free(text);
done:
  free_optim_options(&oo);
  cm_graph_free(step);
  cm_graph_free(g);
  return rc;
}

/* Sets a rank-0 f32 tensor. */
static void set_scalar(cm_tensor *t, double v) {
  cm_tensor_set_f64(t, 0, v);
}

/* cmaec step's numbers: --steps, --lr, --seed, --beta1/--beta2, --momentum. */
typedef struct step_numbers {
  uint64_t steps, seed;
  double lr, beta1, beta2, momentum;
} step_numbers;

/* Reads them from opts (indices of cmd_step's table) into v; EXIT_INVALID (reported) on a bad
 * value. */
static int read_step_numbers(const cli_option *opts, step_numbers *v) {
  v->steps = 0;
  v->seed = 0;
  v->lr = 0;
  v->beta1 = 0.9;
  v->beta2 = 0.95;
  v->momentum = 0.996;
  if (!cli_parse_u64(opts[2].value, &v->steps) || v->steps < 1 || v->steps > 100000000)
    return fprintf(stderr, "cmaec step: --steps %s: not a positive integer\n", opts[2].value),
           EXIT_INVALID;
  if (!cli_parse_double(opts[3].value, &v->lr) || v->lr < 0)
    return fprintf(stderr, "cmaec step: --lr %s: not a number >= 0\n", opts[3].value), EXIT_INVALID;
  if (opts[5].given && !cli_parse_u64(opts[5].value, &v->seed))
    return fprintf(stderr, "cmaec step: --seed %s: not a non-negative integer\n", opts[5].value),
           EXIT_INVALID;
  if ((opts[6].given &&
       (!cli_parse_double(opts[6].value, &v->beta1) || v->beta1 < 0 || v->beta1 >= 1)) ||
      (opts[7].given &&
       (!cli_parse_double(opts[7].value, &v->beta2) || v->beta2 < 0 || v->beta2 >= 1)))
    return fprintf(stderr, "cmaec step: --beta1/--beta2 must be in [0, 1)\n"), EXIT_INVALID;
  if (opts[12].given &&
      (!cli_parse_double(opts[12].value, &v->momentum) || v->momentum < 0 || v->momentum > 1))
    return fprintf(stderr, "cmaec step: --momentum %s: not in [0, 1]\n", opts[12].value),
           EXIT_INVALID;
  return EXIT_OK;
}

/* --save: the step graph's params and optimizer state (every param and state
 * tensor, by name) to a safetensors file; the exit code. */
static int save_state(const cm_graph *sg, const cli_sources *src, const char *path, bool quiet) {
  int rc = EXIT_OK;
  cm_err err = {0};
  cm_tensor_set out;
  cm_tensor_set_init(&out);
  for (int i = 0; i < sg->n_nodes && !rc; i++) {
    cm_op op = sg->nodes[i].op;
    if ((op == CM_OP_PARAM || op == CM_OP_STATE) &&
        cm_tensor_set_add(&out, sg->nodes[i].name, &src->tensors[i], &err))
      rc = cli_report(&err, path);
  }
  if (!rc && cm_safetensors_save(path, &out, &err)) rc = cli_report(&err, path);
  cm_tensor_set_free(&out);
  if (!rc && !quiet) printf("saved params and optimizer state to %s\n", path);
  return rc;
}

/* The step's scalar inputs (those it has) bound to scalars[k]; ids[k] = -1 when absent. */
static int bind_scalars(const cm_graph *sg, const char *const *names, int ids[5],
                        cm_tensor scalars[5], cli_sources *src) {
  cm_err err = {0};
  for (int k = 0; k < 5; k++) {
    ids[k] = cm_graph_find(sg, names[k]);
    if (ids[k] < 0) continue;
    if (cm_tensor_alloc(&scalars[k], sg->nodes[ids[k]].type, &err))
      return cli_report(&err, "cmaec step");
    src->bound[ids[k]] = &scalars[k];
  }
  return EXIT_OK;
}

/* --precision f32|bf16|f16 (default f32); false (reported) otherwise. */
static bool parse_precision(const cli_option *op, cm_dtype *low) {
  const char *v = op->given ? op->value : "f32";
  *low = !strcmp(v, "bf16") ? CM_BF16 : !strcmp(v, "f16") ? CM_F16 : CM_F32;
  if (*low == CM_F32 && strcmp(v, "f32") != 0)
    return fprintf(stderr, "cmaec step: --precision %s: expected f32, bf16 or f16\n", v), false;
  return true;
}

int cmd_step(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false},         {"--loss", true, NULL, false},
                       {"--steps", true, NULL, false},         {"--lr", true, NULL, false},
                       {"--inputs", true, NULL, false},        {"--seed", true, NULL, false},
                       {"--beta1", true, NULL, false},         {"--beta2", true, NULL, false},
                       {"--weight-decay", true, NULL, false},  {"--clip", true, NULL, false},
                       {"--loss-scaling", false, NULL, false}, {"--ema", true, NULL, false},
                       {"--momentum", true, NULL, false},      {"--frozen", true, NULL, false},
                       {"--save", true, NULL, false},          {"--quiet", false, NULL, false},
                       {"--backend", true, NULL, false},       {"--device", true, NULL, false},
                       {"--cuda-graphs", true, NULL, false},   {"--precision", true, NULL, false}};
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, N_OPTS(opts), pos, 1, &n_pos, "step")) return EXIT_INVALID;
  cm_dtype low = CM_F32;
  if (!parse_precision(&opts[19], &low)) return EXIT_INVALID;
  cm_backend_request req;
  int rc =
      cli_backend_request(&opts[16], &opts[17], &opts[18], true, CM_BACKEND_AUTO, "step", &req);
  if (rc) return rc;
  if (opts[0].given) return fputs(usage_step, stdout), fputs(cli_backend_usage, stdout), EXIT_OK;
  if (n_pos != 1 || !opts[1].given || !opts[2].given || !opts[3].given)
    return fputs(usage_step, stderr), EXIT_INVALID;
  step_numbers num;
  if ((rc = read_step_numbers(opts, &num))) return rc;
  cm_backend_choice choice;
  cm_err err = {0};
  if (cm_backend_resolve(&req, &choice, &err)) return cli_report(&err, "cmaec step");
  bool compiled = choice.kind != CM_BACKEND_REF;
  uint64_t steps = num.steps, seed = num.seed;
  double lr = num.lr, beta1 = num.beta1, beta2 = num.beta2, momentum = num.momentum;
  bool quiet = opts[15].given;
  optim_options oo;
  rc = read_optim_options(opts, N_OPTS(opts), "step", &oo);
  if (rc) return rc;

  cm_graph *g = NULL, *sg = NULL;
  cm_tensor *values = NULL, *outs = NULL;
  cm_program *pr = NULL;
  cm_tensor scalars[5] = {{{0}, 0}};
  cli_sources src = {0};
  if ((rc = cli_load_graph(pos[0], &g))) goto done;
  int loss = cli_node(g, pos[0], opts[1].value);
  if (loss < 0) {
    rc = EXIT_INVALID;
    goto done;
  }
  cm_train_step_info info;
  if (cm_build_train_step(g, loss, &oo.cfg, &sg, &info, &err) ||
      (low != CM_F32 && cm_autocast(&sg, low, NULL, &err))) {
    rc = cli_report(&err, pos[0]);
    goto done;
  }
  static const char *const scalar_names[] = {"lr", "beta1", "beta2", "step", "momentum", NULL};
  if ((rc = cli_bind_sources(sg, pos[0], opts[4].value, seed, scalar_names, &src))) goto done;
  int scalar_ids[5];
  if ((rc = bind_scalars(sg, scalar_names, scalar_ids, scalars, &src))) goto done;
  set_scalar(&scalars[0], lr);
  set_scalar(&scalars[1], beta1);
  set_scalar(&scalars[2], beta2);
  if (scalar_ids[4] >= 0) set_scalar(&scalars[4], momentum);
  int loss_out = cm_graph_find(sg, g->nodes[loss].name);
  values = calloc((size_t)sg->n_nodes, sizeof *values);
  if (!values) {
    rc = (fprintf(stderr, "cmaec step: out of memory\n"), EXIT_INTERNAL);
    goto done;
  }
  if (!quiet)
    printf("training %d params (%d with weight decay, %d frozen, %d EMA targets), %llu steps; "
           "backend %s, precision %s\n",
           info.n_trainable, info.n_decay, info.n_frozen, info.n_ema, (unsigned long long)steps,
           choice.description, cm_dtype_name(low));
  cm_eval_opts eval_opts = {CM_PRECISION_NATIVE};
  if (compiled) {
    outs = calloc((size_t)sg->n_outputs + 1, sizeof *outs);
    if (!outs) {
      rc = (fprintf(stderr, "cmaec step: out of memory\n"), EXIT_INTERNAL);
      goto done;
    }
    /* states are not resident: each run leaves them updated in src, as on the CPU */
    cm_compile_opts co = {0};
    const cm_target *target = cm_backend_compile_opts(&choice, &co);
    if (cm_compile(sg, target, &co, &pr, &err)) {
      rc = cli_report(&err, pos[0]);
      goto done;
    }
  }
  for (uint64_t t = 1; t <= steps; t++) {
    if (scalar_ids[3] >= 0) set_scalar(&scalars[3], (double)t); /* loss scaling counts steps */
    if (compiled) {
      /* the executor writes every assign into its state in place */
      if (cm_program_run(pr, (cm_tensor *const *)src.bound, outs, &err)) {
        rc = cli_report(&err, pos[0]);
        goto done;
      }
      for (int k = 0; k < sg->n_outputs; k++) {
        if (values[sg->outputs[k]].data)
          cm_tensor_free(&outs[k]);
        else
          values[sg->outputs[k]] = outs[k];
      }
      int gn0 = cm_graph_find(sg, "grad_norm");
      if (loss_out < 0 || !values[loss_out].data || gn0 < 0 || !values[gn0].data) {
        fprintf(stderr, "%s: the step graph does not output the loss and grad_norm\n", pos[0]);
        rc = EXIT_INTERNAL;
        for (int i = 0; i < sg->n_nodes; i++) cm_tensor_free(&values[i]);
        goto done;
      }
    } else if (cm_eval(sg, src.bound, values, &eval_opts, &err)) {
      rc = cli_report(&err, pos[0]);
      goto done;
    }
    double l = cm_tensor_get_f64(&values[loss_out], 0);
    int gn = cm_graph_find(sg, "grad_norm");
    if (!quiet)
      printf("step %llu loss %.9g grad_norm %.6g\n", (unsigned long long)t, l,
             cm_tensor_get_f64(&values[gn], 0));
    if (!isfinite(l)) {
      fprintf(stderr, "%s: step %llu: the loss is not finite (%g)\n", pos[0], (unsigned long long)t,
              l);
      rc = EXIT_INVALID;
    }
    /* The step's side effects: each assign writes its target. */
    for (int i = 0; i < sg->n_nodes; i++) {
      if (sg->nodes[i].op == CM_OP_ASSIGN && !compiled) {
        cm_tensor *target = &src.tensors[sg->nodes[i].inputs[0]];
        memcpy(target->data, values[i].data, cm_type_nbytes(&target->type));
      }
    }
    for (int i = 0; i < sg->n_nodes; i++) cm_tensor_free(&values[i]);
    if (rc) goto done;
  }
  if (opts[14].given) rc = save_state(sg, &src, opts[14].value, quiet);
done:
  cm_program_free(pr);
  free(outs);
  for (int k = 0; k < 5; k++) cm_tensor_free(&scalars[k]);
  cli_sources_free(&src);
  free(values);
  free_optim_options(&oo);
  cm_graph_free(sg);
  cm_graph_free(g);
  return rc;
}
