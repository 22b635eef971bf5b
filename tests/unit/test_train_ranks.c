/* tests/unit/test_train_ranks.c — data-parallel cm_train (issue 18): 2 ranks as 2 threads of
 * this process (cm_comm_local_group), each running cm_train at batch 4 on the CPU backend,
 * against one process at the global batch 8. Each check runs one step from a checkpoint:
 * 1 -> 2 (a one-process run's checkpoints resumed at 2 ranks) and 2 -> 1 (a 2-rank run's
 * resumed in one process); the tiny variant has 2 steps an epoch, so step 3 starts epoch 1.
 *
 * - The same math: from that state and the step's batch (the loader's global batch, and its
 *   2 shards), the one-process step and the 2-rank step built in f64 give every new param,
 *   AdamW moment and EMA target and the losses (the ranks' mean) within the oracle's bounds
 *   of each other (cm_eval_bounded, cm_eval_ranks), and the 2 ranks' states are equal. In f32
 *   the oracle's bounds of a whole step grow past the values (LayerNorm's rsqrt of a variance
 *   whose bound exceeds it), so only f64 gives a finite, derived bound.
 * - The trainer runs that math: the checkpoint and the metrics' losses cm_train writes at
 *   either world size equal, bitwise, the step's f32 program run by this test on the same
 *   state and inputs (at 2 ranks: 2 programs over a LOCAL group, losses averaged in f32).
 *   How close that program is to its graph is the backends' tests' business
 *   (test_collective_exec for the collective stages). */
#include "../../runtime/training.h"
#include "../test.h"
#include "../testlib.h"

#include <dirent.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

enum { BATCH = 8, RANKS = 2 };

/* narrow, one block per transformer: the f64 bounds of the whole step stay finite for more of
 * its values (they grow about tenfold per reduction and LayerNorm, test_eval_ranks) */
#define NARROW_DECODERS                                                                            \
  "pixel_decoder.width=8", "pixel_decoder.depth=1", "pixel_decoder.heads=1",                       \
      "feature_decoder.width=8", "feature_decoder.depth=1", "feature_decoder.heads=1",             \
      "projector.hidden=8", "projector.out=4", "predictor.hidden=8", "predictor.out=4",            \
      "schedule.warmup_epochs=0", "optimizer.base_lr=0.1", "train.seed=7", "train.workers=1",      \
      "train.ckpt_every=1"
static const char *const vit_overrides[] = {"encoder.width=8",     "encoder.depth=1",
                                            "encoder.heads=1",     "data.image_size=16",
                                            "data.master_size=20", NARROW_DECODERS};
static const char *const convvit_overrides[] = {"encoder.stage_widths=[4,8,8]",
                                                "encoder.stage_depths=[1,1,1]",
                                                "encoder.width=8",
                                                "encoder.heads=1",
                                                "encoder.depth=1",
                                                NARROW_DECODERS};

typedef struct model_case {
  const char *name, *path;
  const char *const *overrides;
  int n_overrides;
} model_case;
static const model_case models[] = {
    {"vit", "models/cmae_vit_tiny_fmnist.json", vit_overrides,
     (int)(sizeof vit_overrides / sizeof *vit_overrides)},
    {"convvit", "models/cmae_convvit_tiny_fmnist.json", convvit_overrides,
     (int)(sizeof convvit_overrides / sizeof *convvit_overrides)},
};
static const model_case *model = &models[0]; /* the variant under test */

static char root[256], folder[300];

/* folder/<class>/<i>.png: 21 gray 28x28 pictures (a bright box on noise, a fixed LCG). */
static void make_folder(void) {
  uint64_t s = 12345;
  char p[512];
  for (int k = 0; k < 21; k++) {
    snprintf(p, sizeof p, "%s/c%d", folder, k % 3);
    mkdir(p, 0777);
    cm_image im;
    cm_err err = {0};
    CHECK(cm_image_alloc(&im, 28, 28, 1, 0, &err) == CM_OK);
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    int y0 = (int)((s >> 33) % 14), x0 = (int)((s >> 45) % 14);
    for (int i = 0; i < 28 * 28; i++) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      bool in = i / 28 >= y0 && i / 28 < y0 + 12 && i % 28 >= x0 && i % 28 < x0 + 12;
      im.data[i] = (uint8_t)((in ? 160 : 0) + (s >> 33) % 90);
    }
    snprintf(p, sizeof p, "%s/c%d/%02d.png", folder, k % 3, k);
    CHECK_MSG(cm_png_write(p, &im, &err) == CM_OK, "%s", err.msg);
    cm_image_free(&im);
  }
}

typedef struct rank_run {
  cm_train_opts o;
  cm_train_result r;
  cm_status st;
  cm_err err;
} rank_run;

static void *rank_main(void *arg) {
  rank_run *rr = arg;
  rr->st = cm_train(&rr->o, &rr->r, &rr->err);
  cm_comm_free(rr->o.comm); /* collective: every rank's thread */
  return NULL;
}

/* cm_train at `world` ranks (threads) into out, to step `steps`, resumed or fresh. */
static bool train(int world, const char *out, int64_t steps, bool resume) {
  cm_comm *comms[RANKS] = {0};
  cm_err err = {0};
  if (world > 1 && cm_comm_local_group(world, 120, comms, &err) != CM_OK) {
    CHECK_MSG(false, "cm_comm_local_group: %s", err.msg);
    return false;
  }
  rank_run runs[RANKS];
  pthread_t th[RANKS];
  for (int r = 0; r < world; r++) {
    memset(&runs[r], 0, sizeof runs[r]);
    cm_train_opts *o = &runs[r].o;
    o->model_path = model->path;
    o->overrides = model->overrides;
    o->n_overrides = model->n_overrides;
    o->data = folder;
    o->steps = steps;
    o->batch = BATCH;
    o->out_dir = out;
    o->resume = resume;
    o->backend = CM_TRAIN_CPU;
    o->threads = 1;
    o->keep = 100;
    o->comm = comms[r];
    CHECK(pthread_create(&th[r], NULL, rank_main, &runs[r]) == 0);
  }
  bool ok = true;
  for (int r = 0; r < world; r++) {
    pthread_join(th[r], NULL);
    CHECK_MSG(runs[r].st == CM_OK, "%d ranks, rank %d: %s", world, r, runs[r].err.msg);
    ok = ok && runs[r].st == CM_OK;
  }
  return ok;
}

static void copy_file(const char *from, const char *to) {
  FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
  CHECK_MSG(in && out, "copy %s to %s", from, to);
  char buf[65536];
  size_t n;
  while (in && out && (n = fread(buf, 1, sizeof buf, in)) > 0) CHECK(fwrite(buf, 1, n, out) == n);
  if (in) fclose(in);
  if (out) fclose(out);
}

/* A new run directory `dir` holding only the checkpoint of step k of run `from`. */
static void fork_run(const char *from, int64_t k, const char *dir) {
  char a[512], b[512];
  test_remove_tree(dir);
  mkdir(dir, 0777);
  snprintf(a, sizeof a, "%s/ckpt-%lld.safetensors", from, (long long)k);
  snprintf(b, sizeof b, "%s/ckpt-%lld.safetensors", dir, (long long)k);
  copy_file(a, b);
  snprintf(b, sizeof b, "%s/latest", dir);
  FILE *f = fopen(b, "w");
  CHECK(f != NULL);
  if (f) fprintf(f, "ckpt-%lld.safetensors\n", (long long)k), fclose(f);
}

/* The oracle of one step at `world` ranks: the step graph and, per rank, every node's value
 * and bound, evaluated from checkpoint `state` on the batch of step `step`. */
typedef struct oracle {
  cm_graph *g;
  cm_tensor *values[RANKS], *bounds[RANKS];
} oracle;

static void oracle_free(oracle *o) {
  for (int r = 0; r < RANKS; r++) {
    for (int i = 0; o->g && o->values[r] && i < o->g->n_nodes; i++) {
      cm_tensor_free(&o->values[r][i]);
      cm_tensor_free(&o->bounds[r][i]);
    }
    free(o->values[r]);
    free(o->bounds[r]);
  }
  cm_graph_free(o->g);
}

/* Rank r's inputs of step `step` into src (allocated): its loader share, the schedule's
 * scalars, "rank" and "labels" (as cm_train sets them). */
static bool step_inputs(const cm_model_config *cfg, const cm_graph *g, int world, int r,
                        int64_t step, cm_tensor *src) {
  cm_err err = {0};
  cm_dataset *d = NULL;
  cm_loader *l = NULL;
  bool ok = cm_dataset_open_folder(folder, cfg->data.in_chans, &d, &err) == CM_OK;
  int64_t spe = ok ? cm_dataset_size(d) / BATCH : 1;
  cm_lr_schedule sched;
  ok = ok && cm_lr_schedule_from_config(cfg, spe, &sched, &err) == CM_OK;
  cm_loader_opts lo = {0};
  lo.batch = BATCH / world;
  lo.workers = 1;
  lo.shuffle = lo.drop_last = true;
  lo.rank = r;
  lo.world = world;
  lo.seed = (uint64_t)cfg->train.seed;
  lo.epoch0 = (step - 1) / spe;
  cm_views_opts_from_config(cfg, &lo.views);
  ok = ok && cm_loader_create(d, &lo, &l, &err) == CM_OK;
  cm_batch b = {0};
  for (int64_t k = 0; ok && k <= (step - 1) % spe; k++) ok = cm_loader_next(l, &b, &err) == CM_OK;
  CHECK_MSG(ok && b.n == BATCH / world, "rank %d's batch of step %lld: %s", r, (long long)step,
            err.msg);
  const void *arrays[5] = {b.img, b.img_t, b.ids_keep, b.ids_restore, b.mask};
  static const char *const batch_names[5] = {"img", "img_t", "ids_keep", "ids_restore", "mask"};
  double scalars[5] = {cm_lr_schedule_lr(&sched, step - 1), cfg->optimizer.beta1,
                       cfg->optimizer.beta2, (double)step,
                       cm_lr_schedule_momentum(&sched, step - 1)};
  static const char *const scalar_names[5] = {"lr", "beta1", "beta2", "step", "momentum"};
  for (int i = 0; ok && i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_INPUT) continue;
    ok = cm_tensor_alloc(&src[i], n->type, &err) == CM_OK;
    int64_t numel = cm_type_numel(&n->type);
    bool known = false;
    for (int k = 0; ok && k < 5; k++) {
      for (int64_t j = 0; strcmp(n->name, batch_names[k]) == 0 && j < numel; j++, known = true)
        cm_tensor_set_f64(&src[i], j,
                          k == 2 || k == 3 ? ((const int32_t *)arrays[k])[j]
                                           : ((const float *)arrays[k])[j]);
      if (strcmp(n->name, scalar_names[k]) == 0)
        cm_tensor_set_f64(&src[i], 0, scalars[k]), known = true;
    }
    if (strcmp(n->name, "rank") == 0) cm_tensor_set_f64(&src[i], 0, r), known = true;
    for (int64_t j = 0; strcmp(n->name, "labels") == 0 && j < numel; j++)
      cm_tensor_set_f64(&src[i], j, (double)(j + numel * r)), known = true;
    CHECK_MSG(known, "step input %s has no source in the test", n->name);
    ok = ok && known;
  }
  cm_loader_free(l);
  cm_dataset_free(d);
  return ok;
}

static bool oracle_run(int world, const char *state, int64_t step, oracle *out) {
  /* the whole step in f64: its bounds stay finite */
  memset(out, 0, sizeof *out);
  cm_err err = {0};
  cm_model_config cfg;
  CHECK_MSG(cm_model_config_load(model->path, model->overrides, model->n_overrides, &cfg, &err) ==
                CM_OK,
            "%s", err.msg);
  cfg.optimizer.batch = BATCH;
  bool ok = cm_train_build_step_ranks(&cfg, CM_F64, world, 0, &out->g, NULL, &err) == CM_OK;
  CHECK_MSG(ok, "%s", err.msg);
  cm_tensor_set set;
  cm_tensor_set_init(&set);
  cm_checkpoint_meta meta = {0};
  ok = ok && cm_checkpoint_load(state, &set, &meta, &err) == CM_OK;
  const cm_graph *g = out->g;
  int n = ok ? g->n_nodes : 0;
  cm_tensor *src[RANKS] = {0};
  const cm_tensor **bound[RANKS] = {0};
  for (int r = 0; ok && r < world; r++) {
    src[r] = calloc((size_t)n, sizeof *src[r]);
    bound[r] = calloc((size_t)n, sizeof *bound[r]);
    out->values[r] = calloc((size_t)n, sizeof *out->values[r]);
    out->bounds[r] = calloc((size_t)n, sizeof *out->bounds[r]);
    ok = src[r] && bound[r] && out->values[r] && out->bounds[r] &&
         step_inputs(&cfg, g, world, r, step, src[r]);
    for (int i = 0; ok && i < n; i++) {
      const cm_node *nd = &g->nodes[i];
      if (nd->op == CM_OP_PARAM || nd->op == CM_OP_STATE) {
        const cm_tensor *t = cm_tensor_set_get(&set, nd->name);
        CHECK_MSG(t != NULL, "%s: no %s", state, nd->name);
        ok = t != NULL && cm_tensor_alloc(&src[r][i], nd->type, &err) == CM_OK;
        for (int64_t e = 0; ok && e < cm_type_numel(&nd->type); e++)
          cm_tensor_set_f64(&src[r][i], e, cm_tensor_get_f64(t, e));
      }
      if (nd->op == CM_OP_PARAM || nd->op == CM_OP_STATE || nd->op == CM_OP_INPUT)
        bound[r][i] = &src[r][i];
    }
  }
  if (ok && world == 1)
    ok = cm_eval_bounded(g, bound[0], out->values[0], out->bounds[0], &err) == CM_OK;
  else if (ok)
    ok = cm_eval_ranks(g, world, (const cm_tensor *const *const *)bound, out->values, NULL,
                       out->bounds, &err) == CM_OK;
  CHECK_MSG(ok, "the oracle of step %lld at %d ranks: %s", (long long)step, world, err.msg);
  for (int r = 0; r < world; r++) {
    for (int i = 0; src[r] && i < n; i++) cm_tensor_free(&src[r][i]);
    free(src[r]);
    free(bound[r]);
  }
  cm_checkpoint_meta_free(&meta);
  cm_tensor_set_free(&set);
  return ok;
}

/* The assign node of state `name` in g (its new value), or -1 (not updated). */
static int assign_of(const cm_graph *g, const char *name) {
  for (int i = 0; i < g->n_nodes; i++)
    if (g->nodes[i].op == CM_OP_ASSIGN && strcmp(g->nodes[g->nodes[i].inputs[0]].name, name) == 0)
      return i;
  return -1;
}

static int output_node(const cm_graph *g, const char *name) {
  for (int j = 0; j < g->n_outputs; j++)
    if (strcmp(g->nodes[g->outputs[j]].name, name) == 0) return g->outputs[j];
  return -1;
}

/* The same math: the new value of every updated param and state, and the losses, of the
 * one-process step (o1) and the 2-rank step (o2) within the sum of their bounds; the ranks'
 * new states equal. */
static void compare_math(const oracle *o1, const oracle *o2, int64_t step) {
  const cm_graph *g1 = o1->g, *g2 = o2->g;
  int64_t compared = 0, over = 0, unequal = 0, infinite = 0;
  double worst = 0; /* the largest |V1 - V2| / bound */
  char first[300] = "";
  for (int a1 = 0; a1 < g1->n_nodes; a1++) {
    if (g1->nodes[a1].op != CM_OP_ASSIGN) continue;
    const char *name = g1->nodes[g1->nodes[a1].inputs[0]].name;
    int a2 = assign_of(g2, name);
    CHECK_MSG(a2 >= 0, "%s: updated by one process, not by 2 ranks", name);
    if (a2 < 0) continue;
    for (int64_t e = 0; e < cm_type_numel(&g1->nodes[a1].type); e++, compared++) {
      double v1 = cm_tensor_get_f64(&o1->values[0][a1], e);
      double v2 = cm_tensor_get_f64(&o2->values[0][a2], e);
      double allowed =
          cm_tensor_get_f64(&o1->bounds[0][a1], e) + cm_tensor_get_f64(&o2->bounds[0][a2], e);
      unequal += v2 != cm_tensor_get_f64(&o2->values[1][a2], e);
      if (!isfinite(allowed)) { /* a pole of rsqrt upstream: nothing derived to check */
        infinite++;
        continue;
      }
      if (!(fabs(v1 - v2) <= allowed) && !over++)
        snprintf(first, sizeof first, "%s[%lld]: one process %.17g, 2 ranks %.17g, bound %.3g",
                 name, (long long)e, v1, v2, allowed);
      if (allowed > 0 && fabs(v1 - v2) / allowed > worst) worst = fabs(v1 - v2) / allowed;
    }
  }
  CHECK_MSG(over == 0, "step %lld: %lld of %lld new values past the bound; the first: %s",
            (long long)step, (long long)over, (long long)compared, first);
  CHECK_MSG(unequal == 0, "step %lld: the ranks' new states differ in %lld elements",
            (long long)step, (long long)unequal);
  /* ViT: about 30 % finite; ConvViT (its convolution stages, SyncBN) about 2 % */
  CHECK_MSG(compared - infinite > 0, "step %lld: all %lld of %lld bounds infinite", (long long)step,
            (long long)infinite, (long long)compared);
  printf("step %lld: %lld of %lld new values of params and states with a finite f64 bound, "
         "within it (the largest |difference| / bound %.3g)\n",
         (long long)step, (long long)(compared - infinite), (long long)compared, worst);
  static const char *const losses[3] = {"loss", "loss_rc", "loss_ct"};
  for (int k = 0; k < 3; k++) {
    int l1 = output_node(g1, losses[k]), l2 = output_node(g2, losses[k]);
    double v2 = 0, b2 = 0;
    for (int r = 0; r < RANKS; r++) {
      v2 += cm_tensor_get_f64(&o2->values[r][l2], 0) / RANKS;
      b2 += cm_tensor_get_f64(&o2->bounds[r][l2], 0) / RANKS;
    }
    double v1 = cm_tensor_get_f64(&o1->values[0][l1], 0);
    double allowed = cm_tensor_get_f64(&o1->bounds[0][l1], 0) + b2 + 4 * ldexp(fabs(v2), -53);
    CHECK_MSG(fabs(v1 - v2) <= allowed,
              "step %lld %s: one process %.17g, 2 ranks' mean %.17g, "
              "bound %.3g",
              (long long)step, losses[k], v1, v2, allowed);
    printf("step %lld %s: one process %.17g, 2 ranks' mean %.17g, bound %.3g\n", (long long)step,
           losses[k], v1, v2, allowed);
  }
}

/* One rank's f32 program of the step, as cm_train compiles it, run on its sources. */
typedef struct program_job {
  const cm_graph *g;
  cm_comm *comm;
  cm_tensor *sources; /* by node; the states are updated in place */
  cm_tensor *outputs; /* g->n_outputs */
  cm_status st;
  cm_err err;
} program_job;

static void *program_main(void *arg) {
  program_job *j = arg;
  cm_compile_opts co = {0};
  co.threads = 1;
  co.comm = j->comm;
  cm_program *pr = NULL;
  cm_tensor **bound = calloc((size_t)j->g->n_nodes, sizeof *bound);
  for (int i = 0; bound && i < j->g->n_nodes; i++)
    bound[i] = j->sources[i].data ? &j->sources[i] : NULL;
  j->st = bound ? cm_compile(j->g, NULL, &co, &pr, &j->err) : CM_EINTERNAL;
  if (j->st == CM_OK) j->st = cm_program_run(pr, bound, j->outputs, &j->err);
  cm_program_free(pr);
  free(bound);
  cm_comm_free(j->comm);
  return NULL;
}

/* The trainer's checkpoint and metrics of step `step` in dir (run at `world` ranks from the
 * checkpoint of step - 1 in state_dir) equal, bitwise, the step's f32 program run here. */
static void check_trainer_run(int world, const char *state_dir, const char *dir, int64_t step) {
  char state[512], path[512];
  snprintf(state, sizeof state, "%s/ckpt-%lld.safetensors", state_dir, (long long)step - 1);
  cm_err err = {0};
  cm_model_config cfg;
  CHECK(cm_model_config_load(model->path, model->overrides, model->n_overrides, &cfg, &err) ==
        CM_OK);
  cfg.optimizer.batch = BATCH;
  cm_graph *g = NULL;
  cm_tensor_set set, got;
  cm_tensor_set_init(&set);
  cm_tensor_set_init(&got);
  cm_checkpoint_meta meta = {0}, meta_got = {0};
  snprintf(path, sizeof path, "%s/ckpt-%lld.safetensors", dir, (long long)step);
  bool ok = cm_train_build_step_ranks(&cfg, CM_F32, world, 0, &g, NULL, &err) == CM_OK &&
            cm_checkpoint_load(state, &set, &meta, &err) == CM_OK &&
            cm_checkpoint_load(path, &got, &meta_got, &err) == CM_OK;
  CHECK_MSG(ok, "%s", err.msg);
  cm_comm *comms[RANKS] = {0};
  ok = ok && (world == 1 || cm_comm_local_group(world, 120, comms, &err) == CM_OK);
  program_job jobs[RANKS];
  memset(jobs, 0, sizeof jobs);
  pthread_t th[RANKS];
  for (int r = 0; ok && r < world; r++) {
    jobs[r].g = g;
    jobs[r].comm = comms[r];
    jobs[r].sources = calloc((size_t)g->n_nodes, sizeof *jobs[r].sources);
    jobs[r].outputs = calloc((size_t)g->n_outputs, sizeof *jobs[r].outputs);
    ok =
        jobs[r].sources && jobs[r].outputs && step_inputs(&cfg, g, world, r, step, jobs[r].sources);
    for (int i = 0; ok && i < g->n_nodes; i++) {
      const cm_node *n = &g->nodes[i];
      const cm_tensor *t =
          n->op == CM_OP_PARAM || n->op == CM_OP_STATE ? cm_tensor_set_get(&set, n->name) : NULL;
      if (t)
        ok = cm_tensor_alloc(&jobs[r].sources[i], n->type, &err) == CM_OK &&
             (memcpy(jobs[r].sources[i].data, t->data, cm_type_nbytes(&n->type)), true);
    }
  }
  for (int r = 0; ok && r < world; r++)
    CHECK(pthread_create(&th[r], NULL, program_main, &jobs[r]) == 0);
  for (int r = 0; ok && r < world; r++) {
    pthread_join(th[r], NULL);
    CHECK_MSG(jobs[r].st == CM_OK, "rank %d's program: %s", r, jobs[r].err.msg);
    ok = ok && jobs[r].st == CM_OK;
  }
  int64_t states = 0, differ = 0;
  for (int i = 0; ok && i < g->n_nodes; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    const cm_tensor *t = cm_tensor_set_get(&got, n->name);
    states++;
    if (!t || memcmp(t->data, jobs[0].sources[i].data, cm_type_nbytes(&n->type)) != 0)
      CHECK_MSG(!differ++, "%d ranks, step %lld: %s differs from the program's", world,
                (long long)step, n->name);
  }
  CHECK(!ok || (states > 100 && differ == 0));
  /* the metrics' losses: rank 0's metrics hold the f32 mean of the ranks' losses */
  static const char *const losses[3] = {"loss", "loss_rc", "loss_ct"};
  cm_metrics_table tab = {0};
  snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
  ok = ok && cm_metrics_read(path, &tab, &err) == CM_OK;
  int64_t row = 0; /* the step's row */
  while (ok && row < tab.n_rows &&
         tab.values[row * tab.n_cols + cm_metrics_column(&tab, "step")] != (double)step)
    row++;
  CHECK_MSG(ok && row < tab.n_rows, "%s: no row of step %lld", path, (long long)step);
  for (int k = 0; ok && row < tab.n_rows && k < 3; k++) {
    int j = 0;
    while (j < g->n_outputs && strcmp(g->nodes[g->outputs[j]].name, losses[k]) != 0) j++;
    float sum = 0;
    for (int r = 0; r < world && j < g->n_outputs; r++)
      sum += (float)cm_tensor_get_f64(&jobs[r].outputs[j], 0);
    float mean = sum / (float)world;
    double logged = tab.values[row * tab.n_cols + cm_metrics_column(&tab, losses[k])];
    CHECK_MSG(logged == (double)mean, "%d ranks, step %lld: metrics %s %.9g, the program's %.9g",
              world, (long long)step, losses[k], logged, (double)mean);
  }
  cm_metrics_table_free(&tab);
  for (int r = 0; r < world; r++) {
    for (int i = 0; jobs[r].sources && i < g->n_nodes; i++) cm_tensor_free(&jobs[r].sources[i]);
    for (int j = 0; jobs[r].outputs && j < g->n_outputs; j++) cm_tensor_free(&jobs[r].outputs[j]);
    free(jobs[r].sources);
    free(jobs[r].outputs);
  }
  cm_checkpoint_meta_free(&meta);
  cm_checkpoint_meta_free(&meta_got);
  cm_tensor_set_free(&set);
  cm_tensor_set_free(&got);
  cm_graph_free(g);
}

/* Step `step` from checkpoint step - 1 of state_dir, run by one process (x_dir) and by 2 ranks
 * (y_dir): the same math, and each trainer run its program. */
static void check_step(const char *state_dir, const char *x_dir, const char *y_dir, int64_t step) {
  char state[512];
  snprintf(state, sizeof state, "%s/ckpt-%lld.safetensors", state_dir, (long long)step - 1);
  oracle o1, o2;
  if (oracle_run(1, state, step, &o1) && oracle_run(RANKS, state, step, &o2))
    compare_math(&o1, &o2, step);
  oracle_free(&o1);
  oracle_free(&o2);
  check_trainer_run(1, state_dir, x_dir, step);
  check_trainer_run(RANKS, state_dir, y_dir, step);
}

/* 1 -> 2: the one-process run's checkpoint of step 2 resumed at 2 ranks for a step (step 3
 * starts the second epoch). The ViT variant; the ConvViT one when its case is named (ctest's
 * long entry unit.test_train_ranks.convvit: its cold compile takes minutes). */
static void test_one_to_two(void) {
  for (size_t m = 0; m < sizeof models / sizeof *models; m++) {
    if (test_cases_selected() ? !test_case_wanted(models[m].name) : m != 0) continue;
    model = &models[m];
    char one[300], two[300];
    snprintf(one, sizeof one, "%s/one_%s", root, model->name);
    snprintf(two, sizeof two, "%s/two_from_2_%s", root, model->name);
    if (!train(1, one, 3, false)) continue;
    fork_run(one, 2, two);
    if (train(RANKS, two, 3, true)) check_step(one, one, two, 3);
  }
  model = &models[0];
}

/* 2 -> 1: a 2-rank run's checkpoint of step 1 resumed in one process for a step. Not in the
 * sanitizer build (CMAEC_TEST_QUICK, ~10x slower): there 1 -> 2 alone, and
 * tests/cli/train_ranks.sh resumes 2 -> 1. */
static void test_two_to_one(void) {
  if (getenv("CMAEC_TEST_QUICK")) return;
  char two[300], one[300];
  snprintf(two, sizeof two, "%s/two", root);
  snprintf(one, sizeof one, "%s/one_from_two", root);
  if (!train(RANKS, two, 2, false)) return;
  fork_run(two, 1, one);
  if (train(1, one, 2, true)) check_step(two, one, two, 2);
}

static void setup(void) {
  snprintf(root, sizeof root, "/tmp/cmaec_test_train_ranks_%ld", (long)getpid());
  snprintf(folder, sizeof folder, "%s/folder", root);
  test_remove_tree(root);
  mkdir(root, 0777);
  mkdir(folder, 0777);
  make_folder();
  setenv("CMAEC_TUNE", "off", 1);
}

static void cleanup(void) {
  test_remove_tree(root);
}

TEST_MAIN(TEST(setup), TEST(test_one_to_two), TEST(test_two_to_one), TEST(cleanup))
