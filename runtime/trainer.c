/* runtime/trainer.c — cm_train: the training loop of a model variant
 * (docs/training.md). Everything a step depends on is a function of the
 * seed and the step number (params from their seeded initializers, the
 * loader's draws keyed by (seed, epoch, index), the schedules by step), so a
 * run resumed from a checkpoint continues bitwise as if never stopped. */
#include "training.h"

#include "../models/models.h"
#include "../passes/passes.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { N_SCALARS = 5, N_BATCH_INPUTS = 5 };
static const char *const scalar_names[N_SCALARS] = {"lr", "beta1", "beta2", "step", "momentum"};
static const char *const batch_names[N_BATCH_INPUTS] = {"img", "img_t", "ids_keep", "ids_restore",
                                                        "mask"};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* mkdir -p */
static cm_status make_dirs(const char *dir, cm_err *err) {
  char buf[1024];
  size_t len = strlen(dir);
  if (len == 0 || len >= sizeof buf)
    return cm_errorf(err, CM_EINVALID, "cm_train: output directory \"%s\": bad path", dir);
  memcpy(buf, dir, len + 1);
  for (size_t i = 1; i <= len; i++) {
    if (buf[i] != '/' && buf[i] != 0) continue;
    char c = buf[i];
    buf[i] = 0;
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
      return cm_errorf(err, CM_EINVALID, "cm_train: cannot create directory %s: %s", buf,
                       strerror(errno));
    buf[i] = c;
  }
  struct stat st;
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
    return cm_errorf(err, CM_EINVALID, "cm_train: output directory %s: not a directory", dir);
  /* a file can be created, written and removed there (checkpoints are written the same way) */
  char probe[1100];
  snprintf(probe, sizeof probe, "%s/.cmaec-write-probe-%ld", dir, (long)getpid());
  int fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC, 0666);
  bool wrote = fd >= 0 && write(fd, "x", 1) == 1;
  int e = errno;
  if (fd >= 0) {
    wrote = (close(fd) == 0) && wrote;
    e = wrote ? 0 : errno;
    if (unlink(probe) != 0 && wrote) wrote = false, e = errno;
  }
  if (!wrote)
    return cm_errorf(err, CM_EINVALID, "cm_train: output directory %s: cannot write there: %s", dir,
                     strerror(e));
  return CM_OK;
}

static bool has_prefix(const char *s, const char *p) {
  return strncmp(s, p, strlen(p)) == 0;
}

/* The first non-finite element of a float tensor, or false. */
static bool tensor_nonfinite(const cm_tensor *t, double *bad) {
  if (!t->data || !cm_dtype_is_float(t->type.dtype)) return false;
  int64_t n = cm_type_numel(&t->type);
  for (int64_t i = 0; i < n; i++) {
    double v = cm_tensor_get_f64(t, i);
    if (!isfinite(v)) {
      *bad = v;
      return true;
    }
  }
  return false;
}

typedef struct trainer {
  const cm_train_opts *o;
  const char *resume_ckpt; /* the checkpoint a resumed run continues (NULL: a fresh run) */
  cm_model_config cfg;
  cm_graph *sg;
  cm_tensor *src;             /* per node of sg: params, states, inputs (inputs of slot 0) */
  cm_tensor *src_next;        /* per node: the inputs of slot 1 (the next step's, while one runs) */
  const cm_tensor **bound[2]; /* per input slot, for cm_eval and cm_program_start */
  cm_backend_choice backend;  /* what the program was compiled for (outlives it) */
  cm_tensor *values;          /* ref backend: every node's value */
  cm_tensor *outs;            /* cpu backend: graph outputs */
  cm_program *prog;
  cm_dataset *data;
  cm_loader *loader;
  cm_metrics_writer *metrics;
  int scalar_id[N_SCALARS], batch_id[N_BATCH_INPUTS];
  int rank_id, labels_id; /* the inputs "rank" and "labels" of a step built for ranks > 1 */
  cm_comm *comm;          /* NULL: one process */
  int rank, world;        /* this rank of the data-parallel group (0 of 1 without one) */
  int local_batch;        /* optimizer.batch / world */
  FILE *log;              /* the options' log on rank 0, NULL on the others */
  int out_loss, out_rc, out_ct, out_gn; /* output indices, -1 when absent */
  int out_scale, out_skipped;           /* with loss scaling; else -1 */
  cm_dtype precision;                   /* train.precision, resolved */
  int n_autocast;                       /* contractions autocast rewrote */
  int n_ckpt;
  const char **ckpt_names;
  const cm_tensor **ckpt_tensors;
  char metrics_path[1024];
} trainer;

static void trainer_free(trainer *t) {
  if (t->sg) {
    for (int i = 0; i < t->sg->n_nodes; i++) {
      cm_tensor_free(&t->src[i]);
      if (t->src_next) cm_tensor_free(&t->src_next[i]);
      if (t->values) cm_tensor_free(&t->values[i]);
    }
    for (int j = 0; t->outs && j < t->sg->n_outputs; j++) cm_tensor_free(&t->outs[j]);
  }
  free(t->src);
  free(t->src_next);
  free(t->bound[0]);
  free(t->bound[1]);
  free(t->values);
  free(t->outs);
  free(t->ckpt_names);
  free(t->ckpt_tensors);
  cm_program_free(t->prog);
  cm_loader_free(t->loader);
  cm_dataset_free(t->data);
  cm_metrics_close(t->metrics);
  cm_graph_free(t->sg);
}

static int output_index(const cm_graph *g, const char *name) {
  for (int j = 0; j < g->n_outputs; j++)
    if (strcmp(g->nodes[g->outputs[j]].name, name) == 0) return j;
  return -1;
}

/* The rank's constant inputs in both slots: "rank" and the contrastive targets "labels"
 * (sample i of this rank's share is row i + local_batch * rank of the gathered keys). */
static void set_rank_inputs(trainer *t) {
  for (int slot = 0; slot < 2; slot++) {
    cm_tensor *in = slot ? t->src_next : t->src;
    if (t->rank_id >= 0) cm_tensor_set_f64(&in[t->rank_id], 0, t->rank);
    if (t->labels_id < 0) continue;
    int64_t n = cm_type_numel(&in[t->labels_id].type);
    for (int64_t i = 0; i < n; i++)
      cm_tensor_set_f64(&in[t->labels_id], i, (double)(i + n * t->rank));
  }
}

/* Sources: params and states from their seeded initializers (AdamW moments zero), then
 * every EMA target a copy of its online twin (CMAE.md §4). */
static cm_status init_sources(trainer *t, cm_err *err) {
  const cm_graph *g = t->sg;
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_PARAM && n->op != CM_OP_STATE && n->op != CM_OP_INPUT) continue;
    if (!t->src[i].data && cm_tensor_alloc(&t->src[i], n->type, err)) return CM_EINTERNAL;
    memset(t->src[i].data, 0, cm_type_nbytes(&n->type)); /* again when a step is replayed */
    t->bound[0][i] = t->bound[1][i] = &t->src[i];
    if (n->op == CM_OP_INPUT) {
      if (!t->src_next[i].data && cm_tensor_alloc(&t->src_next[i], n->type, err))
        return CM_EINTERNAL;
      memset(t->src_next[i].data, 0, cm_type_nbytes(&n->type));
      t->bound[1][i] = &t->src_next[i];
    }
    /* states too: the loss scale starts at its constant, not zero */
    if (n->op != CM_OP_INPUT && n->attrs.init.kind != CM_INIT_NONE &&
        cm_init_tensor(&t->src[i], &n->attrs.init, (uint64_t)t->cfg.train.seed, n->name, err))
      return err->status;
  }
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_PARAM) continue;
    for (int k = 0; cm_model_ema_target_prefixes[k] && cm_model_ema_online_prefixes[k]; k++) {
      const char *tp = cm_model_ema_target_prefixes[k];
      if (!has_prefix(n->name, tp)) continue;
      char twin[512];
      snprintf(twin, sizeof twin, "%s%s", cm_model_ema_online_prefixes[k], n->name + strlen(tp));
      int o = cm_graph_find(g, twin);
      if (o < 0 || !cm_type_equal(&g->nodes[o].type, &n->type))
        return cm_errorf(err, CM_EINTERNAL,
                         "cm_train: EMA target %s has no online twin %s of its type", n->name,
                         twin);
      memcpy(t->src[i].data, t->src[o].data, cm_type_nbytes(&n->type));
      break;
    }
  }
  set_rank_inputs(t);
  if (t->prog) cm_program_states_changed(t->prog); /* a replay starts over */
  return CM_OK;
}

/* The first key (group.key) whose value differs between two config JSONs,
 * ignoring the keys that do not change the run's numbers; "" when none. */
static void config_diff(const char *a_json, const char *b_json, char *out, size_t size) {
  static const char *const ignored[] = {"train.workers", "train.ckpt_every", "data.max_pixels"};
  cJSON *a = cJSON_Parse(a_json), *b = cJSON_Parse(b_json);
  out[0] = 0;
  if (!a || !b) {
    snprintf(out, size, "(unreadable config)");
  } else {
    for (cJSON *ga = a->child; ga && !out[0]; ga = ga->next) {
      cJSON *gb = cJSON_GetObjectItemCaseSensitive(b, ga->string);
      if (!cJSON_IsObject(ga)) {
        if (!gb || !cJSON_Compare(ga, gb, 1)) snprintf(out, size, "%s", ga->string);
        continue;
      }
      for (cJSON *ka = ga->child; ka && !out[0]; ka = ka->next) {
        char name[256];
        snprintf(name, sizeof name, "%s.%s", ga->string, ka->string);
        bool skip = false;
        for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++)
          skip |= strcmp(name, ignored[i]) == 0;
        cJSON *kb = gb ? cJSON_GetObjectItemCaseSensitive(gb, ka->string) : NULL;
        if (!skip && (!kb || !cJSON_Compare(ka, kb, 1))) snprintf(out, size, "%s", name);
      }
    }
  }
  cJSON_Delete(a);
  cJSON_Delete(b);
}

static cm_status restore(trainer *t, const char *path, cm_checkpoint_meta *meta, cm_err *err) {
  cm_tensor_set set;
  cm_tensor_set_init(&set);
  cm_status st = cm_checkpoint_load(path, &set, meta, err);
  /* a different config would not continue the same run */
  char *now = st ? NULL : cm_model_config_to_json(&t->cfg);
  char diff[300] = "";
  if (!st && meta->config_json && now) config_diff(meta->config_json, now, diff, sizeof diff);
  free(now);
  if (!st && diff[0])
    st = cm_errorf(err, CM_EINVALID,
                   "%s: the run was trained with a different %s (resume with the same model and "
                   "--set flags)",
                   path, diff);
  for (int i = 0; i < t->sg->n_nodes && !st; i++) {
    const cm_node *n = &t->sg->nodes[i];
    if (n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    const cm_tensor *v = cm_tensor_set_get(&set, n->name);
    char a[128], b[128];
    if (!v)
      st = cm_errorf(err, CM_EINVALID, "%s: checkpoint lacks tensor \"%s\" of the training step",
                     path, n->name);
    else if (!cm_type_equal(&v->type, &n->type))
      st = cm_errorf(err, CM_EINVALID, "%s: tensor \"%s\" is %s but the training step wants %s",
                     path, n->name, cm_type_str(&v->type, a, sizeof a),
                     cm_type_str(&n->type, b, sizeof b));
    else
      memcpy(t->src[i].data, v->data, cm_type_nbytes(&n->type));
  }
  cm_tensor_set_free(&set);
  if (t->prog) cm_program_states_changed(t->prog); /* the device copies are stale now */
  return st;
}

static cm_status save(trainer *t, int64_t step, cm_train_result *r, cm_err *err) {
  /* the checkpoint holds host tensors, so that it resumes on any backend */
  if (t->prog && cm_program_states_download(t->prog, err)) return err->status;
  cm_checkpoint_meta meta = {0};
  meta.step = step;
  meta.epoch = step / cm_loader_steps_per_epoch(t->loader);
  meta.rng_seed = (uint64_t)t->cfg.train.seed;
  /* the loader's position: the epoch of the next step and the batches of it consumed */
  meta.n_rng_counters = 2;
  meta.rng_counters[0] = (uint64_t)meta.epoch;
  meta.rng_counters[1] = (uint64_t)(step % cm_loader_steps_per_epoch(t->loader));
  meta.config_json = cm_model_config_to_json(&t->cfg);
  char *path = NULL;
  cm_status st = cm_checkpoint_save(t->o->out_dir, &meta, t->n_ckpt, t->ckpt_names, t->ckpt_tensors,
                                    t->o->keep > 0 ? t->o->keep : 3, &path, err);
  free(meta.config_json);
  if (!st) snprintf(r->checkpoint, sizeof r->checkpoint, "%s", path);
  free(path);
  return st;
}

/* Input node id of slot `slot` (0, 1). */
static cm_tensor *input_tensor(trainer *t, int slot, int id) {
  return slot ? &t->src_next[id] : &t->src[id];
}

static cm_status copy_batch(trainer *t, int slot, const cm_batch *b, cm_err *err) {
  const void *arrays[N_BATCH_INPUTS] = {b->img, b->img_t, b->ids_keep, b->ids_restore, b->mask};
  for (int k = 0; k < N_BATCH_INPUTS; k++) {
    int id = t->batch_id[k];
    if (id < 0) continue;
    size_t want = cm_type_nbytes(&t->sg->nodes[id].type);
    size_t elem = k == 2 || k == 3 ? sizeof(int32_t) : sizeof(float);
    size_t per = k <= 1   ? (size_t)b->chans * (size_t)b->size * (size_t)b->size
                 : k == 2 ? (size_t)b->n_keep
                          : (size_t)b->n_tokens;
    size_t got = elem * per * (size_t)b->n;
    if (!arrays[k] || got != want)
      return cm_errorf(err, CM_EINTERNAL,
                       "cm_train: loader batch array %s has %zu bytes, the step input wants %zu",
                       batch_names[k], arrays[k] ? got : 0, want);
    memcpy(input_tensor(t, slot, id)->data, arrays[k], want);
  }
  return CM_OK;
}

/* Starts one step on the inputs of `slot`: the reference evaluator runs it
 * whole; a program is started (cm_program_start), finish_step waits for it. */
static cm_status start_step(trainer *t, int slot, cm_err *err) {
  const cm_graph *g = t->sg;
  if (t->backend.kind == CM_BACKEND_REF) {
    for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&t->values[i]);
    cm_eval_opts eo = {CM_PRECISION_NATIVE};
    if (cm_eval(g, t->bound[slot], t->values, &eo, err)) return err->status;
    for (int i = 0; i < g->n_nodes; i++) {
      if (g->nodes[i].op != CM_OP_ASSIGN) continue;
      cm_tensor *target = &t->src[g->nodes[i].inputs[0]];
      memcpy(target->data, t->values[i].data, cm_type_nbytes(&target->type));
    }
    return CM_OK;
  }
  return cm_program_start(t->prog, (cm_tensor *const *)t->bound[slot], err);
}

/* Waits for the step start_step began; afterwards out[j] is graph output j (owned by t). */
static cm_status finish_step(trainer *t, const cm_tensor **out, cm_err *err) {
  const cm_graph *g = t->sg;
  if (t->backend.kind == CM_BACKEND_REF) {
    for (int j = 0; j < g->n_outputs; j++) out[j] = &t->values[g->outputs[j]];
    return CM_OK;
  }
  for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&t->outs[j]);
  if (cm_program_finish(t->prog, t->outs, err)) return err->status;
  for (int j = 0; j < g->n_outputs; j++) out[j] = &t->outs[j];
  return CM_OK;
}

static cm_status run_step(trainer *t, int slot, const cm_tensor **out, cm_err *err) {
  cm_status st = start_step(t, slot, err);
  return st ? st : finish_step(t, out, err);
}

static double out_value(const cm_tensor **out, int j) {
  return j < 0 ? 0.0 : cm_tensor_get_f64(out[j], 0);
}

/* The data workers: at most 4 per CPU core (decoding is CPU-bound; more only take
 * memory) and, for an image folder, their decode memory (cm_image_decode_bytes at
 * data.max_pixels each) at most half of the machine's. */
static cm_status check_workers(const cm_model_config *c, bool folder, cm_err *err) {
  int w = c->train.workers;
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (folder && pages > 0 && page > 0) {
    double need = (double)w * (double)cm_image_decode_bytes(c->data.max_pixels);
    double half = (double)pages * (double)page / 2;
    if (need > half)
      return cm_errorf(err, CM_EINVALID,
                       "train.workers: %d workers could take %.1f GiB of decode memory at "
                       "data.max_pixels %d, more than half of this machine's %.1f GiB (lower "
                       "train.workers or data.max_pixels)",
                       w, need / (1 << 30), c->data.max_pixels, 2 * half / (1 << 30));
  }
  if (cores > 0 && w > 4 * cores)
    return cm_errorf(err, CM_EINVALID,
                     "train.workers: %d is more than 4 per CPU core (%ld on this machine's %ld)", w,
                     4 * cores, cores);
  return CM_OK;
}

/* Step inputs: the batch and the step's scalars (lr, betas, step, momentum). */
static cm_status prepare_step(trainer *t, int slot, const cm_lr_schedule *sched, int64_t step,
                              const cm_batch *b, double sv[N_SCALARS], cm_err *err) {
  if (b->n != t->local_batch)
    return cm_errorf(err, CM_EINTERNAL, "cm_train: step %lld: the loader gave %d samples, not %d",
                     (long long)step, b->n, t->local_batch);
  cm_status st = copy_batch(t, slot, b, err);
  if (st) return st;
  sv[0] = cm_lr_schedule_lr(sched, step - 1);
  sv[1] = t->cfg.optimizer.beta1;
  sv[2] = t->cfg.optimizer.beta2;
  sv[3] = (double)step;
  sv[4] = cm_lr_schedule_momentum(sched, step - 1);
  for (int k = 0; k < N_SCALARS; k++)
    if (t->scalar_id[k] >= 0) cm_tensor_set_f64(input_tensor(t, slot, t->scalar_id[k]), 0, sv[k]);
  return CM_OK;
}

/* The batch of step `step` from the loader into input slot `slot` (with the
 * step's scalars sv), uploaded ahead when the backend can (cm_program_prefetch). */
static cm_status next_batch(trainer *t, int slot, const cm_lr_schedule *sched, int64_t step,
                            cm_batch *b, double sv[N_SCALARS], cm_err *err) {
  cm_status st = cm_loader_next(t->loader, b, err);
  if (!st) st = prepare_step(t, slot, sched, step, b, sv, err);
  if (!st && t->prog) st = cm_program_prefetch(t->prog, (cm_tensor *const *)t->bound[slot], err);
  return st;
}

/* "NAME = op(INPUTS), element E = V" (+ the kernel), or a source "NAME (param), ...". */
static void nonfinite_str(const cm_nonfinite *nf, char *out, size_t size) {
  bool source = !nf->kernel[0] && (strcmp(nf->op, "param") == 0 || strcmp(nf->op, "state") == 0 ||
                                   strcmp(nf->op, "input") == 0);
  if (source)
    snprintf(out, size, "%s (%s), element %lld = %g", nf->tensor, nf->op, (long long)nf->index,
             nf->value);
  else
    snprintf(out, size, "%s = %s(%s), element %lld = %g%s%s", nf->tensor, nf->op, nf->inputs,
             (long long)nf->index, nf->value, nf->kernel[0] ? ", in kernel " : "", nf->kernel);
}

/* The reference evaluator kept every value of the step: the first non-finite one in
 * node order (the order it evaluates them), sources first as they were bound. */
static void nonfinite_ref(trainer *t, cm_nonfinite *nf) {
  const cm_graph *g = t->sg;
  memset(nf, 0, sizeof *nf);
  for (int i = 0; i < g->n_nodes; i++) {
    double v;
    if (!tensor_nonfinite(&t->values[i], &v)) continue;
    const cm_node *n = &g->nodes[i];
    nf->found = true;
    snprintf(nf->tensor, sizeof nf->tensor, "%s", n->name);
    nf->op = cm_op_get_info(n->op)->name;
    size_t used = 0;
    for (int k = 0; k < n->n_inputs && used + 8 < sizeof nf->inputs; k++)
      used += (size_t)snprintf(nf->inputs + used, sizeof nf->inputs - used, "%s%s", k ? ", " : "",
                               g->nodes[n->inputs[k]].name);
    int64_t numel = cm_type_numel(&n->type);
    for (nf->index = 0; nf->index < numel; nf->index++)
      if (!isfinite(cm_tensor_get_f64(&t->values[i], nf->index))) break;
    nf->value = v;
    return;
  }
}

/* The CPU executor keeps no intermediate value and has updated the states in place,
 * so step `step` is run again from the state it started from — the last checkpoint
 * this run wrote or resumed from (else the initial state), replayed up to it; the
 * run is deterministic, so the step goes non-finite the same way — checking every
 * kernel's outputs (cm_program_first_nonfinite). A replay estimated at over
 * five minutes is skipped. Only a failed run pays for this. */
static void nonfinite_cpu(trainer *t, const cm_loader_opts *lo0, const cm_lr_schedule *sched,
                          int64_t step, const char *base_ckpt, double step_s, char *out,
                          size_t size) {
  cm_err err = {0};
  cm_checkpoint_meta meta = {0};
  cm_loader *l = NULL;
  int64_t base = 0;
  cm_status st = CM_OK;
  if (base_ckpt && base_ckpt[0]) {
    /* its step, from the name, to size the replay before loading anything */
    const char *name = strrchr(base_ckpt, '/');
    long long s = -1;
    if (!name || sscanf(name, "/ckpt-%lld.safetensors", &s) != 1 || s < 0 || s >= step) {
      snprintf(out, size, "not located (checkpoint %s is not before step %lld)", base_ckpt,
               (long long)step);
      return;
    }
    base = s;
  }
  int64_t n = step - 1 - base;
  if (n > 20 && (double)n * step_s > 300) {
    snprintf(out, size,
             "not located (it would replay the %lld steps since %s; checkpoint more often with "
             "--ckpt-every to locate it)",
             (long long)n, base ? "the last checkpoint" : "the start");
    return;
  }
  if (t->world > 1) {
    /* a replay would run the collectives again, on whichever ranks got here */
    snprintf(out, size,
             "not located (a data-parallel run: replay it in one process with --resume)");
    return;
  }
  if (t->log) {
    fprintf(t->log,
            "locating the first non-finite value of step %lld: replaying steps %lld..%lld "
            "from %s\n",
            (long long)step, (long long)base + 1, (long long)step, base ? base_ckpt : "the start");
    fflush(t->log);
  }
  if (base) {
    st = restore(t, base_ckpt, &meta, &err);
    if (!st && meta.step != base)
      st = cm_errorf(&err, CM_EINVALID, "%s: holds step %lld", base_ckpt, (long long)meta.step);
  } else {
    st = init_sources(t, &err);
  }
  cm_loader_opts lo = *lo0;
  int64_t spe = cm_loader_steps_per_epoch(t->loader);
  lo.epoch0 = base / spe;
  if (!st) st = cm_loader_create(t->data, &lo, &l, &err);
  cm_batch b;
  for (int64_t k = 0; k < base % spe && !st; k++) st = cm_loader_next(l, &b, &err);
  double sv[N_SCALARS];
  const cm_tensor **outs = calloc((size_t)t->sg->n_outputs + 1, sizeof *outs);
  if (!outs && !st) st = cm_errorf(&err, CM_EINTERNAL, "out of memory");
  for (int64_t k = base + 1; k < step && !st; k++) {
    st = cm_loader_next(l, &b, &err);
    if (!st) st = prepare_step(t, 0, sched, k, &b, sv, &err);
    if (!st) st = run_step(t, 0, outs, &err);
  }
  cm_nonfinite nf = {0};
  if (!st) st = cm_loader_next(l, &b, &err);
  if (!st) st = prepare_step(t, 0, sched, step, &b, sv, &err);
  /* the search reads the states from the host */
  if (!st) st = cm_program_states_download(t->prog, &err);
  if (!st) st = cm_program_first_nonfinite(t->prog, (cm_tensor *const *)t->bound[0], &nf, &err);
  if (st)
    snprintf(out, size, "not located (the replay failed: %s)", err.msg);
  else if (!nf.found)
    snprintf(out, size, "not located (the replayed step %lld stayed finite)", (long long)step);
  else
    nonfinite_str(&nf, out, size);
  free(outs);
  cm_loader_free(l);
  cm_checkpoint_meta_free(&meta);
}

cm_status cm_train_precision_resolve(const char *precision, cm_backend_kind backend, cm_dtype *out,
                                     cm_err *err) {
  static const struct {
    const char *name;
    cm_dtype dtype;
  } known[] = {{"f32", CM_F32}, {"bf16", CM_BF16}, {"f16", CM_F16}};
  if (precision && strcmp(precision, "auto") == 0) {
    /* the CPU here has no fast bf16, and the reference evaluator is the f32 oracle */
    *out = backend == CM_BACKEND_CUDA ? CM_BF16 : CM_F32;
    return CM_OK;
  }
  for (size_t k = 0; precision && k < sizeof known / sizeof known[0]; k++)
    if (strcmp(precision, known[k].name) == 0) {
      *out = known[k].dtype;
      return CM_OK;
    }
  return cm_errorf(err, CM_EINVALID,
                   "train.precision: \"%.32s\" is not one of auto, f32, bf16, f16",
                   precision ? precision : "(null)");
}

cm_status cm_train_build_step(const cm_model_config *cfg, cm_dtype precision, cm_graph **step,
                              int *n_autocast, cm_err *err) {
  return cm_train_build_step_ranks(cfg, precision, 1, 0, step, n_autocast, err);
}

cm_status cm_train_build_step_ranks(const cm_model_config *cfg, cm_dtype precision, int ranks,
                                    int64_t bucket_bytes, cm_graph **step, int *n_autocast,
                                    cm_err *err) {
  *step = NULL;
  if (n_autocast) *n_autocast = 0;
  if (ranks < 1 || cfg->optimizer.batch % ranks != 0)
    return cm_errorf(err, CM_EINVALID,
                     "optimizer.batch: the global batch %d is not a multiple of the %d ranks "
                     "(every rank runs the same step at batch / ranks)",
                     cfg->optimizer.batch, ranks);
  if (precision != CM_F32 && precision != CM_BF16 && precision != CM_F16 && precision != CM_F64)
    return cm_errorf(err, CM_EINVALID,
                     "cm_train_build_step: precision %s is not f32, bf16, f16 or f64",
                     cm_dtype_name(precision));
  cm_optim_config oc;
  cm_optim_config_default(&oc);
  oc.eps = cfg->optimizer.eps;
  oc.weight_decay = cfg->optimizer.weight_decay;
  oc.clip_norm = cfg->optimizer.clip_norm;
  oc.frozen = cm_model_frozen_substrings;
  bool dynamic;
  double fixed;
  if (cm_model_config_loss_scale(cfg, cm_dtype_name(precision), &dynamic, &fixed, err))
    return err->status;
  oc.loss_scaling = dynamic || fixed > 0;
  oc.fixed_loss_scale = fixed > 0;
  if (fixed > 0) oc.init_loss_scale = fixed;
  oc.growth_interval = cfg->train.loss_scale_growth;
  cm_ema_pair pairs[8];
  int np = 0;
  for (; np < 8 && cm_model_ema_online_prefixes[np] && cm_model_ema_target_prefixes[np]; np++) {
    pairs[np].online_prefix = cm_model_ema_online_prefixes[np];
    pairs[np].target_prefix = cm_model_ema_target_prefixes[np];
  }
  oc.n_ema = np;
  oc.ema = pairs;
  /* the model and its optimizer in f32 (master weights, moments, EMA targets); autocast
   * then lowers only the contractions' operands */
  cm_model model = {0};
  cm_model_build_opts bo = {cfg->optimizer.batch / ranks, ranks,
                            precision == CM_F64 ? CM_F64 : CM_F32};
  if (cm_model_build(cfg, &bo, &model, err)) return err->status;
  cm_train_step_info info;
  cm_status st = cm_build_train_step(model.g, model.loss, &oc, step, &info, err);
  cm_model_free(&model);
  /* the gradients averaged over the ranks before clipping sees them (DDP) */
  if (!st && ranks > 1) st = cm_data_parallel(step, ranks, bucket_bytes, err);
  if (!st && precision != CM_F32 && precision != CM_F64)
    st = cm_autocast(step, precision, n_autocast, err);
  if (st) {
    cm_graph_free(*step);
    *step = NULL;
  }
  return st;
}

/* The backend opts asks for (cm_backend_resolve). */
static cm_status choose_backend(trainer *t, cm_train_result *r, cm_err *err) {
  const cm_train_opts *o = t->o;
  static const cm_backend_kind kinds[] = {CM_BACKEND_CPU, CM_BACKEND_REF, CM_BACKEND_CUDA,
                                          CM_BACKEND_AUTO};
  if ((unsigned)o->backend >= sizeof kinds / sizeof kinds[0])
    return cm_errorf(err, CM_EINVALID, "cm_train: unknown backend %d", (int)o->backend);
  cm_backend_request req = {kinds[o->backend], o->device, o->cuda_graphs, o->cuda_driver,
                            o->cuda_compiler};
  if (cm_backend_resolve(&req, &t->backend, err)) return err->status;
  snprintf(r->backend, sizeof r->backend, "%s", t->backend.description);
  return CM_OK;
}

/* train.precision and train.loss_scale resolved for the backend, written back into
 * the config (so the checkpoint and a resume compare the resolved values). */
static cm_status resolve_precision(trainer *t, cm_err *err) {
  cm_model_config *c = &t->cfg;
  if (t->resume_ckpt && strcmp(c->train.precision, "auto") == 0) {
    /* auto continues in the checkpoint's precision, whichever backend trained it */
    cm_tensor_set set;
    cm_tensor_set_init(&set);
    cm_checkpoint_meta meta = {0};
    cm_model_config saved;
    cm_status st = cm_checkpoint_load(t->resume_ckpt, &set, &meta, err);
    if (!st && meta.config_json && !cm_model_config_from_json_text(meta.config_json, &saved, err))
      snprintf(c->train.precision, sizeof c->train.precision, "%s", saved.train.precision);
    cm_checkpoint_meta_free(&meta);
    cm_tensor_set_free(&set);
    if (st) return st;
  }
  if (cm_train_precision_resolve(c->train.precision, t->backend.kind, &t->precision, err))
    return err->status;
  snprintf(c->train.precision, sizeof c->train.precision, "%s", cm_dtype_name(t->precision));
  bool dynamic;
  double fixed;
  if (cm_model_config_loss_scale(c, c->train.precision, &dynamic, &fixed, err)) return err->status;
  if (dynamic) snprintf(c->train.loss_scale, sizeof c->train.loss_scale, "dynamic");
  if (!dynamic && !(fixed > 0)) snprintf(c->train.loss_scale, sizeof c->train.loss_scale, "off");
  return CM_OK;
}

/* This rank of the data-parallel group (opts.comm): the per-rank batch, the log on rank 0. */
static cm_status setup_ranks(trainer *t, cm_err *err) {
  t->comm = t->o->comm;
  t->world = t->comm ? cm_comm_size(t->comm) : 1;
  t->rank = t->comm ? cm_comm_rank(t->comm) : 0;
  t->log = t->rank == 0 ? t->o->log : NULL;
  if (t->cfg.optimizer.batch % t->world != 0)
    return cm_errorf(err, CM_EINVALID,
                     "optimizer.batch: the global batch %d is not a multiple of the %d ranks "
                     "(every rank runs batch / ranks)",
                     t->cfg.optimizer.batch, t->world);
  t->local_batch = t->cfg.optimizer.batch / t->world;
  /* the search times whole steps, whose collectives would wait for the other ranks */
  if (t->world > 1 && t->o->tune)
    return cm_errorf(err, CM_EINVALID,
                     "--tune runs in one process: tune the per-rank step first (cmaec tune "
                     "MODEL --batch %d), and the %d ranks use the tuning database's plans",
                     t->local_batch, t->world);
  if (t->world > 1 && t->backend.kind == CM_BACKEND_REF)
    return cm_errorf(err, CM_EINVALID,
                     "cm_train: the ref backend runs one process (%d ranks need --backend cpu "
                     "or cuda)",
                     t->world);
  return CM_OK;
}

static cm_status setup(trainer *t, cm_train_result *r, cm_err *err) {
  const cm_train_opts *o = t->o;
  cm_status st;
  if (!o->model_path || !o->out_dir)
    return cm_errorf(err, CM_EINVALID, "cm_train: a model path and an output directory are needed");
  if (o->steps < 0 || o->epochs < 0 || o->batch < 0)
    return cm_errorf(err, CM_EINVALID, "cm_train: negative steps/epochs/batch");
  if (cm_model_config_load(o->model_path, o->overrides, o->n_overrides, &t->cfg, err))
    return err->status;
  if (o->batch > 0) t->cfg.optimizer.batch = o->batch;
  if (o->epochs > 0) {
    if (o->epochs > 1000000)
      return cm_errorf(err, CM_EINVALID, "cm_train: --epochs %lld is too large",
                       (long long)o->epochs);
    t->cfg.schedule.epochs = (int)o->epochs;
  }
  if (cm_model_config_validate(&t->cfg, err)) return cm_err_prefix(err, "%s: ", o->model_path);
  /* the backend and the output directory before anything slow (the data, the compile) */
  if ((st = choose_backend(t, r, err))) return st;
  if ((st = resolve_precision(t, err))) return st;
  if ((st = setup_ranks(t, err))) return st;
  if (t->rank == 0 && make_dirs(o->out_dir, err)) return err->status;

  /* data */
  bool fmnist = !o->data || strcmp(o->data, "fashion-mnist") == 0;
  if (fmnist ? cm_dataset_open_fmnist(NULL, true, &t->data, err)
             : cm_dataset_open_folder(o->data, t->cfg.data.in_chans, &t->data, err))
    return err->status;
  if (!fmnist) cm_dataset_set_max_pixels(t->data, t->cfg.data.max_pixels);
  if ((st = check_workers(&t->cfg, !fmnist, err))) return st;
  if (cm_dataset_channels(t->data) != t->cfg.data.in_chans)
    return cm_errorf(err, CM_EINVALID, "%s: dataset has %d channels but data.in_chans is %d",
                     fmnist ? "fashion-mnist" : o->data, cm_dataset_channels(t->data),
                     t->cfg.data.in_chans);
  if (t->cfg.train.limit > cm_dataset_size(t->data))
    return cm_errorf(err, CM_EINVALID, "train.limit: %d is more than the %lld images of %s",
                     t->cfg.train.limit, (long long)cm_dataset_size(t->data),
                     fmnist ? "fashion-mnist" : o->data);
  if (t->cfg.train.limit > 0 && cm_dataset_subset(t->data, t->cfg.train.limit, err))
    return err->status;
  r->dataset_size = cm_dataset_size(t->data);
  if (r->dataset_size < t->cfg.optimizer.batch)
    return cm_errorf(err, CM_EINVALID,
                     "cm_train: the dataset has %lld images, fewer than a batch of %d",
                     (long long)r->dataset_size, t->cfg.optimizer.batch);

  /* the step graph of one rank at the per-rank batch */
  if (cm_train_build_step_ranks(&t->cfg, t->precision, t->world, 0, &t->sg, &t->n_autocast, err))
    return err->status;
  const cm_graph *g = t->sg;
  bool ref = t->backend.kind == CM_BACKEND_REF;
  t->src = calloc((size_t)g->n_nodes + 1, sizeof *t->src);
  t->src_next = calloc((size_t)g->n_nodes + 1, sizeof *t->src_next);
  t->bound[0] = calloc((size_t)g->n_nodes + 1, sizeof *t->bound[0]);
  t->bound[1] = calloc((size_t)g->n_nodes + 1, sizeof *t->bound[1]);
  t->ckpt_names = calloc((size_t)g->n_nodes + 1, sizeof *t->ckpt_names);
  t->ckpt_tensors = calloc((size_t)g->n_nodes + 1, sizeof *t->ckpt_tensors);
  t->outs = calloc((size_t)g->n_outputs + 1, sizeof *t->outs);
  if (ref) t->values = calloc((size_t)g->n_nodes + 1, sizeof *t->values);
  if (!t->src || !t->src_next || !t->bound[0] || !t->bound[1] || !t->ckpt_names ||
      !t->ckpt_tensors || !t->outs || (ref && !t->values))
    return cm_errorf(err, CM_EINTERNAL, "cm_train: out of memory");
  for (int k = 0; k < N_SCALARS; k++) t->scalar_id[k] = cm_graph_find(g, scalar_names[k]);
  for (int k = 0; k < N_BATCH_INPUTS; k++) t->batch_id[k] = cm_graph_find(g, batch_names[k]);
  t->rank_id = t->world > 1 ? cm_graph_find(g, "rank") : -1;
  t->labels_id = t->world > 1 ? cm_graph_find(g, "labels") : -1;
  t->out_loss = output_index(g, "loss");
  t->out_rc = output_index(g, "loss_rc");
  t->out_ct = output_index(g, "loss_ct");
  t->out_gn = output_index(g, "grad_norm");
  t->out_scale = output_index(g, "new_loss_scale");
  t->out_skipped = output_index(g, "skipped");
  if (t->out_loss < 0 || t->out_rc < 0)
    return cm_errorf(err, CM_EINTERNAL, "cm_train: the training step has no loss/loss_rc output");
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op == CM_OP_INPUT) {
      bool known = false;
      for (int k = 0; k < N_SCALARS; k++) known |= t->scalar_id[k] == i;
      for (int k = 0; k < N_BATCH_INPUTS; k++) known |= t->batch_id[k] == i;
      known |= t->rank_id == i || t->labels_id == i;
      if (!known)
        return cm_errorf(err, CM_EINTERNAL,
                         "cm_train: the training step's input \"%s\" has no source", n->name);
    }
  }
  if (init_sources(t, err)) return err->status;
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op == CM_OP_PARAM || n->op == CM_OP_STATE) {
      t->ckpt_names[t->n_ckpt] = n->name;
      t->ckpt_tensors[t->n_ckpt++] = &t->src[i];
    }
    bool target = false;
    for (int k = 0; cm_model_ema_target_prefixes[k]; k++)
      target |= has_prefix(n->name, cm_model_ema_target_prefixes[k]);
    if (n->op == CM_OP_PARAM && !target) r->n_params += cm_type_numel(&n->type);
  }
  if (!ref) {
    cm_compile_opts co = {0};
    co.threads = o->threads;
    co.resident_states = true; /* params and optimizer state stay on a device between steps */
    co.comm = t->comm;         /* the step's collectives: the gradient buckets, SyncBN, InfoNCE */
    const cm_target *target = cm_backend_compile_opts(&t->backend, &co);
    if (o->tune) {
      cm_tune_opts to = {.budget_s = o->tune_budget_s, .progress = t->log != NULL};
      cm_tune_stats ts;
      /* candidates timed inside whole steps (on the CPU) on a batch like the data's */
      cm_tensor *ex = calloc((size_t)g->n_nodes + 1, sizeof *ex);
      cm_tensor **exb = calloc((size_t)g->n_nodes + 1, sizeof *exb);
      cm_status ts_st = ex && exb ? cm_train_example_sources(&t->cfg, g, 1, ex, err)
                                  : cm_errorf(err, CM_EINTERNAL, "out of memory");
      for (int i = 0; ts_st == CM_OK && i < g->n_nodes; i++) exb[i] = ex[i].data ? &ex[i] : NULL;
      to.step_sources = exb;
      if (ts_st == CM_OK) ts_st = cm_tune(g, target, &co, &to, &ts, err);
      if (ex) cm_train_example_sources_free(g, ex);
      free(ex);
      free(exb);
      if (ts_st != CM_OK) return err->status;
      if (t->log)
        fprintf(t->log,
                "tune: %d stages: %d searched, %d from the database, %d over budget in %.0f s\n",
                ts.stages_tunable, ts.searched, ts.from_db, ts.over_budget, ts.seconds);
    }
    if (o->tune) co.tune = CM_TUNE_SEARCH; /* what it found is used whatever $CMAEC_TUNE says */
    if (cm_compile(g, target, &co, &t->prog, err)) return err->status;
  }
  return CM_OK;
}

/* The CUDA build of the step: cold (some module compiled) or warm (all from the cache). */
static void print_compile_figures(const cm_program *pr, const cm_program_stats *cs, FILE *log) {
  const cm_cuda_build *b = cm_program_cuda_build(pr);
  const cm_cuda_compiler *c = cm_program_cuda_compiler(pr);
  int modules = b ? b->n_modules : cs->jit_modules, hits = b ? b->cache_hits : cs->cache_hits;
  fprintf(log,
          "compile (%s): %d kernels, %d modules: %d from the cache, %d compiled by %s; lower "
          "%.0f ms, render %.0f ms, compile %.0f ms; %.1f MiB of images\n",
          hits < modules ? "cold" : "warm", cs->n_kernels, modules, hits, modules - hits,
          c ? c->name : "?", cs->lower_ms, b ? b->render_ms : cs->render_ms,
          b ? b->compile_ms : cs->jit_ms,
          (double)(b ? b->image_bytes : cs->object_bytes) / (1 << 20));
}

/* A resumed run goes on past its checkpoint's step: --steps below it would run backwards. */
static cm_status check_resume_steps(const cm_train_opts *o, const char *ckpt, long long step,
                                    cm_err *err) {
  if (o->steps > 0 && o->steps < step)
    return cm_errorf(err, CM_EINVALID,
                     "cannot resume: --steps %lld is below step %lld of the checkpoint %s (give "
                     "--steps above %lld to train on, or a new --out)",
                     (long long)o->steps, step, ckpt, step);
  return CM_OK;
}

/* A step's metrics outputs. */
typedef struct step_values {
  double loss, rc, ct, gn;
  double scale, skipped; /* with loss scaling */
} step_values;

/* CM_EINVALID naming the first non-finite metric of the step and where the run
 * first produced a non-finite tensor (the reference evaluator's walk, or the
 * CPU backend's replay from ckpt; the run started after step `start` at time
 * t_run); CM_OK when all are finite. */
static cm_status check_finite(trainer *t, const step_values *sv, const cm_loader_opts *lo,
                              const cm_lr_schedule *sched, int64_t step, const char *ckpt,
                              int64_t start, double t_run, cm_err *err) {
  double loss = sv->loss, lrc = sv->rc, lct = sv->ct, gn = sv->gn;
  const char *which = !isfinite(lrc)                      ? "loss_rc"
                      : !isfinite(lct)                    ? "loss_ct"
                      : !isfinite(loss)                   ? "loss"
                      : !isfinite(gn) && sv->skipped != 1 ? "grad_norm" /* a skip is no failure */
                                                          : NULL;
  if (!which) return CM_OK;
  double v = strcmp(which, "loss_rc") == 0   ? lrc
             : strcmp(which, "loss_ct") == 0 ? lct
             : strcmp(which, "loss") == 0    ? loss
                                             : gn;
  char where[600];
  if (t->backend.kind == CM_BACKEND_REF) {
    cm_nonfinite nf;
    nonfinite_ref(t, &nf);
    if (nf.found)
      nonfinite_str(&nf, where, sizeof where);
    else
      snprintf(where, sizeof where, "not located");
  } else {
    double step_s = step > start + 1 ? (now_s() - t_run) / (double)(step - 1 - start) : 1;
    nonfinite_cpu(t, lo, sched, step, ckpt, step_s, where, sizeof where);
  }
  return cm_errorf(err, CM_EINVALID,
                   "step %lld: non-finite %s (%g); first non-finite tensor in execution order: %s",
                   (long long)step, which, v, where);
}

/* Test-only ($CMAEC_TEST_KILL_RANK=R:S, or R:S:stop): rank R dies by SIGKILL (or stops by
 * SIGSTOP, a hung rank) as step S starts, so the tests can check that the other ranks end the
 * run with the watchdog's message (tests/cli/train_ranks.sh). */
static void test_kill_hook(const trainer *t, int64_t step) {
  const char *spec = getenv("CMAEC_TEST_KILL_RANK");
  int rank, n = 0;
  long long at;
  if (!spec || sscanf(spec, "%d:%lld%n", &rank, &at, &n) != 2 || rank != t->rank || at != step)
    return;
  raise(strcmp(spec + n, ":stop") == 0 ? SIGSTOP : SIGKILL);
}

/* With several ranks, what every rank must agree on after a step: the losses become their
 * mean over the ranks (each rank's is of its own share of the global batch), and a stop
 * asked of any rank (Ctrl-C reaches them at different steps) stops all after this step. */
static cm_status agree_step(trainer *t, int64_t step, step_values *v, bool *stopping, cm_err *err) {
  if (t->world == 1) return CM_OK;
  float vals[4] = {(float)v->loss, (float)v->rc, (float)v->ct, *stopping ? 1.0f : 0.0f};
  char what[64];
  snprintf(what, sizeof what, "step %lld losses", (long long)step);
  if (cm_comm_all_reduce(t->comm, vals, vals, 4, CM_F32, CM_MODE_SUM, what, err))
    return err->status;
  v->loss = vals[0] / (float)t->world;
  v->rc = vals[1] / (float)t->world;
  v->ct = vals[2] / (float)t->world;
  *stopping = vals[3] > 0;
  return CM_OK;
}

/* One metrics.jsonl row for the step just run (sc: the step's scalars, lr first). */
static cm_status write_metrics(trainer *t, int64_t step, const cm_batch *b, const double *sc,
                               const step_values *v, double ips, double ms, cm_err *err) {
  cm_metrics_row row = {0};
  row.step = step;
  row.epoch = b->epoch;
  row.loss_rc = v->rc;
  row.loss_ct = v->ct;
  row.loss = v->loss;
  row.lr = sc[0];
  row.momentum = sc[4];
  row.images_per_s = ips;
  row.step_ms = ms;
  const char *xn[3] = {"grad_norm", "loss_scale", "skipped"};
  double xv[3] = {v->gn, v->scale, v->skipped};
  row.n_extra = t->out_scale >= 0 ? 3 : 1;
  row.extra_names = xn;
  row.extra_values = xv;
  row.precision = cm_dtype_name(t->precision);
  return cm_metrics_write(t->metrics, &row, err);
}

/* The run's header: the data, the schedule, the backend (and on CUDA the compile figures). */
static void print_header(const trainer *t, const cm_train_result *r, const cm_lr_schedule *sched,
                         int64_t start) {
  fprintf(t->log,
          "training %s: %lld params, %lld images (%lld steps/epoch at batch %d), steps %lld..%lld "
          "of %lld\n",
          t->cfg.name, (long long)r->n_params, (long long)r->dataset_size,
          (long long)r->steps_per_epoch, t->cfg.optimizer.batch, (long long)start + 1,
          (long long)r->total_steps, (long long)sched->total_iters);
  fprintf(t->log,
          "lr peak %.4g (base %.4g x %d / 256), warmup %lld steps; %d data worker%s; backend %s",
          sched->peak_lr, t->cfg.optimizer.base_lr, t->cfg.optimizer.batch,
          (long long)sched->warmup_iters, t->cfg.train.workers,
          t->cfg.train.workers == 1 ? "" : "s", t->backend.description);
  cm_program_stats cs = {0};
  if (t->prog) cm_program_stats_get(t->prog, &cs);
  if (t->backend.kind == CM_BACKEND_CPU) fprintf(t->log, ", %d threads", cs.threads);
  if (t->world > 1)
    fprintf(t->log, "; %d ranks at batch %d each (%s)", t->world, t->local_batch,
            cm_comm_describe(t->comm));
  fprintf(t->log, "; precision %s", t->cfg.train.precision);
  if (t->n_autocast) fprintf(t->log, " (%d contractions autocast)", t->n_autocast);
  if (cs.tuned_stages > 0) fprintf(t->log, "; tuned plans for %d stages", cs.tuned_stages);
  if (strcmp(t->cfg.train.loss_scale, "off") != 0)
    fprintf(t->log, ", loss scale %s", t->cfg.train.loss_scale);
  fprintf(t->log, "; metrics %s, checkpoints %s/ckpt-<step>.safetensors\n", t->metrics_path,
          t->o->out_dir);
  if (t->backend.kind == CM_BACKEND_CUDA) print_compile_figures(t->prog, &cs, t->log);
  fflush(t->log);
}

cm_status cm_train(const cm_train_opts *o, cm_train_result *r, cm_err *err) {
  memset(r, 0, sizeof *r);
  trainer t = {0};
  t.o = o;
  cm_lr_schedule sched;
  cm_checkpoint_meta meta = {0};
  int64_t start = 0;
  char *ckpt = NULL;
  /* a missing checkpoint is found before the (slow) build */
  cm_status st = o->resume && o->out_dir ? cm_checkpoint_latest(o->out_dir, &ckpt, err) : CM_OK;
  if (st) cm_err_prefix(err, "cannot resume: ");
  /* --steps below the checkpoint, found before the build from its name (ckpt-<step>);
   * its metadata is checked again after the restore */
  const char *base = ckpt ? strrchr(ckpt, '/') : NULL;
  long long named = -1;
  if (!st && base && sscanf(base, "/ckpt-%lld.safetensors", &named) == 1)
    st = check_resume_steps(o, ckpt, named, err);
  t.resume_ckpt = o->resume ? ckpt : NULL;
  if (!st) st = setup(&t, r, err);
  if (st) goto done;

  cm_loader_opts lo = {0};
  lo.batch = t.local_batch;
  lo.workers = t.cfg.train.workers;
  lo.shuffle = true;
  lo.drop_last = true;
  lo.rank = t.rank;
  lo.world = t.world;
  lo.seed = (uint64_t)t.cfg.train.seed;
  cm_views_opts_from_config(&t.cfg, &lo.views);
  lo.views.mode = strcmp(t.cfg.train.views, "rrc") == 0 ? CM_VIEWS_RRC : CM_VIEWS_SHIFT;
  lo.views.mask = true;
  if (o->resume) {
    if ((st = restore(&t, ckpt, &meta, err))) goto done;
    start = meta.step;
    if ((st = check_resume_steps(o, ckpt, start, err))) goto done;
  }
  /* iterations per epoch: floor(n / global batch) (drop_last) */
  r->steps_per_epoch = r->dataset_size / t.cfg.optimizer.batch;
  lo.epoch0 = start / r->steps_per_epoch;
  if ((st = cm_loader_create(t.data, &lo, &t.loader, err))) goto done;
  if (cm_loader_steps_per_epoch(t.loader) != r->steps_per_epoch) {
    st =
        cm_errorf(err, CM_EINTERNAL, "cm_train: the loader has %lld steps per epoch, expected %lld",
                  (long long)cm_loader_steps_per_epoch(t.loader), (long long)r->steps_per_epoch);
    goto done;
  }
  if ((st = cm_lr_schedule_from_config(&t.cfg, r->steps_per_epoch, &sched, err))) goto done;
  r->total_steps = o->steps > 0 ? o->steps : sched.total_iters;
  r->first_step = r->last_step = start;
  if (start > r->total_steps) {
    st = cm_errorf(err, CM_EINVALID,
                   "cannot resume: %s is at step %lld, past the schedule's last step %lld", ckpt,
                   (long long)start, (long long)r->total_steps);
    goto done;
  }
  if (o->resume && start == r->total_steps) {
    if (t.log)
      fprintf(t.log, "nothing to run: %s is at step %lld, the last step of the run\n", ckpt,
              (long long)start);
    snprintf(r->checkpoint, sizeof r->checkpoint, "%s", ckpt);
    goto done;
  }
  snprintf(t.metrics_path, sizeof t.metrics_path, "%s/metrics.jsonl", o->out_dir);
  if (t.rank == 0 && (st = cm_metrics_open(t.metrics_path, start + 1, &t.metrics, err))) goto done;

  if (t.log) print_header(&t, r, &sched, start);

  cm_progress prog;
  cm_progress_init(&prog, t.log ? t.log : stdout, r->total_steps,
                   o->log_every > 0 ? o->log_every : 10, t.log ? o->progress_tty : 0);
  const cm_tensor **out = calloc((size_t)t.sg->n_outputs + 1, sizeof *out);
  if (!out) {
    st = cm_errorf(err, CM_EINTERNAL, "cm_train: out of memory");
    goto done;
  }
  /* skip the batches of the current epoch the checkpointed run consumed */
  cm_batch b;
  for (int64_t k = 0; k < start % r->steps_per_epoch && !st; k++)
    st = cm_loader_next(t.loader, &b, err);
  double t_run = now_s();
  int64_t images = 0;
  /* two input slots: step k runs on slot k % 2 while the next batch fills the other */
  cm_batch batch[2];
  double sv[2][N_SCALARS];
  int slot = 0;
  if (!st) st = next_batch(&t, 0, &sched, start + 1, &batch[0], sv[0], err);
  for (int64_t step = start + 1; step <= r->total_steps && !st; step++, slot ^= 1) {
    double t0 = now_s();
    test_kill_hook(&t, step);
    if ((st = start_step(&t, slot, err))) {
      cm_err_prefix(err, "step %lld: ", (long long)step);
      break;
    }
    /* the next batch is read and uploaded while this step runs */
    cm_err next_err = {0};
    cm_status next_st =
        step < r->total_steps
            ? next_batch(&t, slot ^ 1, &sched, step + 1, &batch[slot ^ 1], sv[slot ^ 1], &next_err)
            : CM_OK;
    if ((st = finish_step(&t, out, err))) {
      cm_err_prefix(err, "step %lld: ", (long long)step);
      break;
    }
    if ((st = next_st)) {
      *err = next_err;
      break;
    }
    step_values v = {out_value(out, t.out_loss),  out_value(out, t.out_rc),
                     out_value(out, t.out_ct),    out_value(out, t.out_gn),
                     out_value(out, t.out_scale), out_value(out, t.out_skipped)};
    bool stopping = o->stop && *o->stop;
    if ((st = agree_step(&t, step, &v, &stopping, err))) break;
    if ((st = check_finite(&t, &v, &lo, &sched, step, r->checkpoint[0] ? r->checkpoint : ckpt,
                           start, t_run, err)))
      break;
    double ms = 1e3 * (now_s() - t0);
    images += (int64_t)batch[slot].n * t.world;
    double ips = (double)images / (now_s() - t_run);
    if (t.metrics && (st = write_metrics(&t, step, &batch[slot], sv[slot], &v, ips, ms, err)))
      break;
    r->last_step = step;
    r->loss = v.loss;
    r->loss_rc = v.rc;
    r->loss_ct = v.ct;
    r->images_per_s = ips;
    if (t.log) cm_progress_update(&prog, step - 1, v.loss); /* 0-based: the step just run */
    bool checkpoint = stopping || step == r->total_steps ||
                      (t.cfg.train.ckpt_every > 0 && step % t.cfg.train.ckpt_every == 0);
    if (checkpoint && t.rank == 0 && (st = save(&t, step, r, err))) break;
    if (stopping) {
      r->interrupted = true;
      break;
    }
  }
  if (t.log) cm_progress_finish(&prog);
  free(out);
  /* the host tensors hold the run's final state */
  if (!st && t.prog) st = cm_program_states_download(t.prog, err);
  if (!st && r->last_step == start && start < r->total_steps && !r->interrupted)
    st = cm_errorf(err, CM_EINTERNAL, "cm_train: no step ran");
done:
  /* which rank failed (the watchdog's messages name it already) */
  if (st && t.world > 1 && !strstr(err->msg, "comm: rank")) cm_err_prefix(err, "rank %d: ", t.rank);
  free(ckpt);
  cm_checkpoint_meta_free(&meta);
  trainer_free(&t);
  return st;
}
