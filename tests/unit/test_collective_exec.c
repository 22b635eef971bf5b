/* tests/unit/test_collective_exec.c — collectives executed by compiled programs (issue 18):
 * n ranks as n threads of this process (cm_comm_local_group), each compiling the same graph
 * into its own cm_program with its rank's communicator and running it on its own sources; every
 * rank's outputs and states against the oracle over the simulated group (cm_eval_ranks), within
 * its forward error bounds. Also what lowering makes of a collective (the kernel IR) and the
 * refusals: a multi-rank graph without a communicator, or with one of another size. */
#include "tests/test.h"

#include "runtime/runtime.h"
#include "tests/emu/emu.h"
#include "tests/model_step.h"
#include "tests/tensor_compare.h"

#include <pthread.h>

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static double uniform(void) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return (double)(rng_state >> 11) / 9007199254740992.0;
}

/* One rank's work: compile g with its comm, run it on its sources (states updated in place). */
typedef struct rank_job {
  const cm_graph *g;
  const cm_target *target; /* NULL: the host CPU */
  cm_compile_opts opts;
  cm_tensor *const *sources; /* by node of g */
  cm_tensor *outputs;        /* g->n_outputs, filled by the run */
  cm_status st;
  cm_err err;
  int profiled; /* with opts.profile: collective stages the profile counted one run of */
} rank_job;

static void *run_rank(void *arg) {
  rank_job *j = arg;
  cm_program *pr = NULL;
  j->st = cm_compile(j->g, j->target, &j->opts, &pr, &j->err);
  if (j->st == CM_OK) j->st = cm_program_run(pr, j->sources, j->outputs, &j->err);
  const cm_stage_profile *sp = NULL;
  int n = j->st == CM_OK ? cm_program_stage_profile(pr, &sp) : 0;
  for (int i = 0; i < n; i++)
    j->profiled += sp[i].stage->coll.op != CM_KCOLL_NONE && sp[i].runs == 1;
  cm_program_free(pr);
  return NULL;
}

/* Runs g on n ranks (threads): sources[r] are rank r's (by node), outputs[r] receive its
 * outputs. False (after a failed CHECK) when a rank failed. */
static bool run_group(const cm_graph *g, int n, const cm_target *target, void *backend_opts,
                      cm_tensor **sources, cm_tensor **outputs, const char *what) {
  cm_comm *comms[4] = {0};
  cm_err err = {0};
  if (n > 4 || cm_comm_local_group(n, 60, comms, &err) != CM_OK) {
    CHECK_MSG(false, "%s: %d local ranks: %s", what, n, err.msg);
    return false;
  }
  rank_job jobs[4];
  pthread_t threads[4];
  for (int r = 0; r < n; r++) {
    jobs[r] = (rank_job){g, target, {0}, NULL, outputs[r], CM_OK, {0}, 0};
    jobs[r].opts.cache_dir = test_module_cache("collexec");
    jobs[r].opts.profile = !target; /* the CPU's profile times the collective stages */
    jobs[r].opts.comm = comms[r];
    jobs[r].opts.backend_opts = backend_opts;
    cm_tensor **src = malloc(sizeof *src * (size_t)g->n_nodes);
    for (int v = 0; v < g->n_nodes; v++) src[v] = sources[r][v].data ? &sources[r][v] : NULL;
    jobs[r].sources = src;
    CHECK(pthread_create(&threads[r], NULL, run_rank, &jobs[r]) == 0);
  }
  bool ok = true;
  for (int r = 0; r < n; r++) {
    pthread_join(threads[r], NULL);
    CHECK_MSG(jobs[r].st == CM_OK, "%s: rank %d of %d: %s", what, r, n, jobs[r].err.msg);
    int collectives = 0;
    for (int v = 0; v < g->n_nodes; v++)
      collectives += g->nodes[v].op == CM_OP_ALL_REDUCE || g->nodes[v].op == CM_OP_ALL_GATHER;
    CHECK_MSG(target || jobs[r].st != CM_OK || jobs[r].profiled == collectives,
              "%s: rank %d: %d of %d collective stages profiled", what, r, jobs[r].profiled,
              collectives);
    ok = ok && jobs[r].st == CM_OK;
    free((void *)jobs[r].sources);
  }
  for (int r = 0; r < n; r++) cm_comm_free(comms[r]);
  return ok;
}

/* Every rank's outputs (and the states its run assigned, in states[r]) against the oracle's
 * group evaluation from the original sources, within the forward error bounds. */
static void check_group(const cm_graph *g, int n, cm_tensor **orig, cm_tensor **outputs,
                        cm_tensor **states, const char *what) {
  const cm_tensor **src[4];
  cm_tensor *val[4], *bnd[4];
  for (int r = 0; r < n; r++) {
    src[r] = calloc((size_t)g->n_nodes, sizeof *src[r]);
    for (int v = 0; v < g->n_nodes; v++) src[r][v] = orig[r][v].data ? &orig[r][v] : NULL;
    val[r] = calloc((size_t)g->n_nodes, sizeof *val[r]);
    bnd[r] = calloc((size_t)g->n_nodes, sizeof *bnd[r]);
  }
  cm_err err = {0};
  cm_status s = cm_eval_ranks(g, n, (const cm_tensor *const *const *)src, val, NULL, bnd, &err);
  CHECK_MSG(s == CM_OK, "%s: cm_eval_ranks: %s", what, err.msg);
  int compared = 0;
  double worst = 0;
  for (int r = 0; s == CM_OK && r < n; r++)
    for (int j = 0; j < g->n_outputs + g->n_nodes; j++) {
      int node = j < g->n_outputs ? g->outputs[j] : j - g->n_outputs;
      const cm_tensor *got = &outputs[r][j];
      if (j >= g->n_outputs) {
        if (!states || g->nodes[node].op != CM_OP_ASSIGN) continue;
        got = &states[r][g->nodes[node].inputs[0]];
      }
      test_bounded b = test_check_bounded(got, &val[r][node], &bnd[r][node]);
      CHECK_MSG(b.ratio <= 1, "%s: rank %d: %s \"%s\": |got - f64| = %g at [%lld] exceeds %g", what,
                r, j < g->n_outputs ? "output" : "state", g->nodes[node].name, b.diff,
                (long long)b.at, b.bound);
      compared++;
      worst = fmax(worst, b.ratio);
    }
  CHECK_MSG(compared > 0, "%s: nothing compared", what);
  fprintf(stderr, "  %s: %d tensors within their bounds, worst |got - f64| / bound %.3g\n", what,
          compared, worst);
  for (int r = 0; r < n; r++) {
    for (int v = 0; v < g->n_nodes; v++) cm_tensor_free(&val[r][v]), cm_tensor_free(&bnd[r][v]);
    free(val[r]), free(bnd[r]), free(src[r]);
  }
}

/* x: f32[4, 6] per rank; outputs: all_reduce SUM of an intermediate (an arena input) read by a
 * later kernel, all_reduce MEAN of the source itself, all_gather on axis 0 (straight into the
 * output) and on axis 1 (rank-major scratch, then permuted). */
static cm_graph *collective_graph(int ranks) {
  cm_graph *g = cm_graph_new();
  int64_t dims[2] = {4, 6};
  int x = cm_input(g, "x", CM_F32, 2, dims);
  int scaled = cm_binary_bcast(g, CM_OP_MUL, x, cm_const_scalar(g, NULL, CM_F32, 1.5), "scaled");
  int sum = cm_all_reduce(g, scaled, CM_MODE_SUM, ranks, "sum");
  int later = cm_binary(g, CM_OP_ADD, cm_unary(g, CM_OP_EXP, sum, NULL), x, "later");
  int mean = cm_all_reduce(g, x, CM_MODE_MEAN, ranks, "mean");
  int rows = cm_all_gather(g, x, 0, ranks, "rows");
  int cols = cm_all_gather(g, cm_unary(g, CM_OP_TANH, x, NULL), 1, ranks, "cols");
  int outs[4] = {later, mean, rows, cols};
  cm_err err = {0};
  for (int i = 0; i < 4; i++)
    CHECK_MSG(cm_graph_add_output(g, outs[i], &err) == CM_OK, "%s; %s", err.msg, cm_graph_error(g));
  CHECK_MSG(cm_graph_verify(g, NULL) == CM_OK, "%s", cm_graph_error(g));
  return g;
}

static void random_sources(const cm_graph *g, cm_tensor *t) {
  for (int v = 0; v < g->n_nodes; v++) {
    const cm_node *n = &g->nodes[v];
    if (n->op != CM_OP_INPUT && n->op != CM_OP_PARAM && n->op != CM_OP_STATE) continue;
    CHECK(cm_tensor_alloc(&t[v], n->type, NULL) == CM_OK);
    for (int64_t e = 0; e < cm_type_numel(&n->type); e++)
      cm_tensor_set_f64(&t[v], e, uniform() * 2 - 1);
  }
}

static void collective_graphs_on(int ranks, const cm_target *target, void *backend_opts,
                                 const char *what) {
  cm_graph *g = collective_graph(ranks);
  cm_tensor *src[4], *out[4];
  for (int r = 0; r < ranks; r++) {
    src[r] = calloc((size_t)g->n_nodes, sizeof *src[r]);
    out[r] = calloc((size_t)g->n_outputs, sizeof *out[r]);
    random_sources(g, src[r]);
  }
  char label[96];
  snprintf(label, sizeof label, "%s, %d ranks", what, ranks);
  if (run_group(g, ranks, target, backend_opts, src, out, label))
    check_group(g, ranks, src, out, NULL, label);
  for (int r = 0; r < ranks; r++) {
    for (int j = 0; j < g->n_outputs; j++) cm_tensor_free(&out[r][j]);
    for (int v = 0; v < g->n_nodes; v++) cm_tensor_free(&src[r][v]);
    free(src[r]), free(out[r]);
  }
  cm_graph_free(g);
}

static void test_collective_graphs(void) {
  for (int ranks = 2; ranks <= 3; ranks++) collective_graphs_on(ranks, NULL, NULL, "cpu");
}

/* The emulated CUDA device: its memory is host memory, so LOCAL ranks (threads) share it; the
 * collectives go through host staging (the path of every comm kind but NCCL). */
static void test_collective_graphs_emulated(void) {
  cm_target t;
  cm_err err = {0};
  CHECK_MSG(emu_device_target(&t, &err) == CM_OK, "%s", err.msg);
  cm_cuda_backend_opts bo = {.driver = emu_driver(), .compiler = emu_compiler()};
  collective_graphs_on(2, &t, &bo, "emulated cuda");
}

/* For every all_reduce stage of kp (run asynchronously): no kernel between it and its wait
 * (cm_kprogram_collective_wait) writes arena bytes its input occupies, and that wait is the
 * first later kernel reading its output. Returns the number of all_reduce stages seen. */
static int check_async_inputs_kept(const cm_kprogram *kp, const char *what) {
  int seen = 0;
  for (int i = 0; i < kp->n_kernels; i++) {
    const cm_kernel *k = &kp->kernels[i];
    for (int s = 0; s < k->n_stages; s++) {
      const cm_kcollective *x = &k->stages[s].coll;
      if (x->op != CM_KCOLL_ALL_REDUCE) continue;
      seen++;
      const cm_kbuffer *in = &k->buffers[x->in_buf];
      int out_node = k->buffers[x->out_buf].node, wait = cm_kprogram_collective_wait(kp, i, s);
      int64_t lo = in->offset, hi = lo + in->numel * (int64_t)cm_dtype_size(in->dtype);
      int first_reader = kp->n_kernels;
      for (int j = i + 1; j < kp->n_kernels; j++)
        for (int b = 0; b < kp->kernels[j].n_buffers; b++) {
          const cm_kbuffer *y = &kp->kernels[j].buffers[b];
          if (y->kind == CM_KBUF_ARENA && y->read && y->node == out_node && j < first_reader)
            first_reader = j;
          if (j >= wait || in->kind != CM_KBUF_ARENA || y->kind != CM_KBUF_ARENA || !y->written)
            continue;
          int64_t ylo = y->offset, yhi = ylo + y->numel * (int64_t)cm_dtype_size(y->dtype);
          CHECK_MSG(yhi <= lo || hi <= ylo,
                    "%s: kernel %s writes [%lld, %lld) while %s's all_reduce reads [%lld, %lld)",
                    what, kp->kernels[j].name, (long long)ylo, (long long)yhi, k->name,
                    (long long)lo, (long long)hi);
        }
      CHECK_MSG(wait == first_reader, "%s: %s waited for before kernel %d, first read by %d", what,
                k->name, wait, first_reader);
    }
  }
  return seen;
}

/* The kernel IR of a collective: one collective stage (and the permute of an inner-axis
 * gather); ranks == 1 stays a copy. */
static void test_lowered_kernels(void) {
  cm_graph *g = collective_graph(2);
  cm_compile_opts o = {.compile_only = true, .render_only = true};
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_OK, "%s", err.msg);
  char *text = NULL;
  size_t size = 0;
  FILE *f = open_memstream(&text, &size);
  if (pr) CHECK(cm_program_emit(pr, -1, CM_EMIT_KERNEL_IR, f, &err) == CM_OK);
  fclose(f);
  CHECK_STR_CONTAINS(text, "collective all_reduce sum ranks 2 count 24");
  CHECK_STR_CONTAINS(text, "collective all_reduce mean ranks 2 count 24");
  CHECK_STR_CONTAINS(text, "collective all_gather axis 0 ranks 2 count 24");
  CHECK_STR_CONTAINS(text, "collective all_gather axis 1 ranks 2 count 24");
  CHECK_STR_CONTAINS(text, "all_gather_permute");
  int collective_stages = 0;
  for (int k = 0; pr && k < cm_program_kernels(pr)->n_kernels; k++)
    for (int s = 0; s < cm_program_kernels(pr)->kernels[k].n_stages; s++)
      collective_stages += cm_program_kernels(pr)->kernels[k].stages[s].coll.op != CM_KCOLL_NONE;
  CHECK_MSG(collective_stages == 4, "%d collective stages", collective_stages);
  if (pr) CHECK(check_async_inputs_kept(cm_program_kernels(pr), "graph") == 2);
  free(text);
  cm_program_free(pr);
  cm_graph_free(g);
  /* one rank: copies, no collective stage */
  g = collective_graph(1);
  CHECK_MSG(cm_compile(g, NULL, &o, &pr, &err) == CM_OK, "%s", err.msg);
  collective_stages = 0;
  for (int k = 0; pr && k < cm_program_kernels(pr)->n_kernels; k++)
    for (int s = 0; s < cm_program_kernels(pr)->kernels[k].n_stages; s++)
      collective_stages += cm_program_kernels(pr)->kernels[k].stages[s].coll.op != CM_KCOLL_NONE;
  CHECK_MSG(collective_stages == 0, "%d collective stages at one rank", collective_stages);
  cm_program_free(pr);
  cm_graph_free(g);
}

static void test_refusals(void) {
  cm_graph *g = collective_graph(2);
  cm_program *pr = NULL;
  cm_err err = {0};
  cm_compile_opts o = {0};
  CHECK(cm_compile(g, NULL, &o, &pr, &err) == CM_EINVALID && !pr);
  CHECK_STR_CONTAINS(err.msg, "\"sum\" (all_reduce) is built for 2 ranks");
  CHECK_STR_CONTAINS(err.msg, "no communicator");
  cm_comm *three[3] = {0};
  CHECK(cm_comm_local_group(3, 5, three, &err) == CM_OK);
  o.comm = three[0];
  memset(&err, 0, sizeof err);
  CHECK(cm_compile(g, NULL, &o, &pr, &err) == CM_EINVALID && !pr);
  CHECK_STR_CONTAINS(err.msg, "is built for 2 ranks, but the communicator has 3");
  for (int r = 0; r < 3; r++) cm_comm_free(three[r]);
  cm_graph_free(g);
}

/* The default variant's step built for 2 ranks (batch 2 each) with the gradients averaged in
 * 64 KiB buckets; cfg and m as test_build_step gives them (m's inputs renumbered). */
static cm_graph *build_dp_step(cm_model_config *cfg, cm_model *m, int *buckets) {
  cm_err err = {0};
  *buckets = 0;
  CHECK_MSG(cm_model_config_load("models/cmae_vit_tiny_fmnist.json", NULL, 0, cfg, &err) == CM_OK,
            "%s", err.msg);
  cm_model_build_opts bo = {2, 2, CM_F32};
  CHECK_MSG(cm_model_build(cfg, &bo, m, &err) == CM_OK && m->g, "%s", err.msg);
  if (!m->g) return NULL;
  cm_optim_config oc = test_model_optim();
  cm_graph *step = NULL;
  cm_train_step_info info;
  CHECK_MSG(cm_build_train_step(m->g, m->loss, &oc, &step, &info, &err) == CM_OK, "%s", err.msg);
  /* the rewrite renumbers nodes: the model's inputs are found again by name */
  int *ids[] = {&m->img, &m->ids_keep, &m->ids_restore, &m->mask};
  char names[4][128] = {{0}};
  for (int i = 0; step && i < 4; i++)
    if (*ids[i] >= 0) snprintf(names[i], sizeof names[i], "%s", step->nodes[*ids[i]].name);
  CHECK_MSG(step && cm_data_parallel(&step, 2, 64 << 10, &err) == CM_OK, "%s", err.msg);
  for (int i = 0; step && i < 4; i++)
    if (*ids[i] >= 0) *ids[i] = cm_graph_find(step, names[i]);
  for (int v = 0; step && v < step->n_nodes; v++)
    *buckets += !strncmp(step->nodes[v].name, "grad_bucket_", 12);
  CHECK_MSG(*buckets > 1, "%d gradient buckets", *buckets);
  return step;
}

/* That step lowered: every bucket an all_reduce stage whose input no kernel overwrites before
 * its wait (memplan's rule for asynchronous collectives). */
static void test_data_parallel_lowered(void) {
  cm_model_config cfg;
  cm_model m;
  int buckets;
  cm_graph *step = build_dp_step(&cfg, &m, &buckets);
  cm_compile_opts lo = {.compile_only = true, .render_only = true};
  cm_program *lowered = NULL;
  cm_err err = {0};
  CHECK_MSG(step && cm_compile(step, NULL, &lo, &lowered, &err) == CM_OK, "%s", err.msg);
  if (lowered) CHECK(check_async_inputs_kept(cm_program_kernels(lowered), "step") >= buckets);
  cm_program_free(lowered);
  cm_graph_free(step);
  cm_model_free(&m);
}

/* That step run on 2 ranks, each on its own images and masks and on the same params and
 * states: every rank's outputs and updated states against the oracle over the group (the
 * bounds carried through the whole step), and the ranks' updated params and states equal bit
 * for bit (each rank applies the same reduced gradients). */
static void test_data_parallel_step(void) {
  const int ranks = 2;
  cm_model_config cfg;
  cm_model m;
  int buckets;
  cm_graph *step = build_dp_step(&cfg, &m, &buckets);
  cm_tensor *src[2], *orig[2], *out[2];
  for (int r = 0; step && r < ranks; r++) {
    src[r] = calloc((size_t)step->n_nodes, sizeof *src[r]);
    orig[r] = calloc((size_t)step->n_nodes, sizeof *orig[r]);
    out[r] = calloc((size_t)step->n_outputs + 1, sizeof *out[r]);
    const cm_tensor **bound = calloc((size_t)step->n_nodes, sizeof *bound);
    rng_state = 0x1234567ull + (uint64_t)r; /* the rank's own data; params from their seeds */
    test_bind_step(step, &cfg, &m, src[r], bound, uniform);
    free(bound);
    int rank = cm_graph_find(step, "rank");
    if (rank >= 0) cm_tensor_set_f64(&src[r][rank], 0, r);
    for (int v = 0; v < step->n_nodes; v++)
      if (src[r][v].data) cm_tensor_copy(&orig[r][v], &src[r][v], NULL);
  }
  if (step && run_group(step, ranks, NULL, NULL, src, out, "data-parallel step")) {
    check_group(step, ranks, orig, out, src, "data-parallel step");
    int differ = 0, states = 0;
    for (int v = 0; v < step->n_nodes; v++) {
      const cm_node *n = &step->nodes[v];
      if (n->op != CM_OP_ASSIGN) continue;
      const cm_tensor *a = &src[0][n->inputs[0]], *b = &src[1][n->inputs[0]];
      states++;
      if (memcmp(a->data, b->data, cm_type_nbytes(&a->type))) {
        differ++;
        CHECK_MSG(false, "state \"%s\" differs between the ranks", step->nodes[n->inputs[0]].name);
      }
    }
    CHECK_MSG(states > 0 && differ == 0, "%d of %d states differ", differ, states);
  }
  for (int r = 0; step && r < ranks; r++) {
    for (int v = 0; v < step->n_nodes; v++) cm_tensor_free(&src[r][v]), cm_tensor_free(&orig[r][v]);
    for (int j = 0; j < step->n_outputs; j++) cm_tensor_free(&out[r][j]);
    free(src[r]), free(orig[r]), free(out[r]);
  }
  cm_graph_free(step);
  cm_model_free(&m);
}

TEST_MAIN(TEST(test_lowered_kernels), TEST(test_refusals), TEST(test_collective_graphs),
          TEST(test_collective_graphs_emulated), TEST(test_data_parallel_lowered),
          TEST(test_data_parallel_step))
