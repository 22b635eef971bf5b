/* The CUDA backend (runtime/backend_cuda.c) running programs on the emulated
 * device (tests/emu: emu_driver() and emu_compiler(), a test target): random
 * graphs within the oracle's error bounds; index-check errors as the CPU
 * backend gives them; a CUDA graph replayed equals the same kernels launched
 * eagerly, to the bit; resident states and their download; prefetched inputs;
 * what the backend asks of the driver (one device allocation, modules, a
 * graph per program) and its errors (a wrong arch, a failed launch naming
 * kernel, stage, grid and block); a kernel writing out of bounds is caught;
 * and three training steps of the default variant against the CPU backend. */
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "../model_step.h"
#include "models/models.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static test_rng rng = {0xc0dacafe};
static double uniform(void) {
  return test_uniform(&rng);
}

/* The CPU backend is built with LLVM (CMAEC_LLVM=OFF builds the oracle and CUDA backends only). */
static const bool have_cpu = CMAEC_HAVE_LLVM;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- a driver that counts and fails on demand, over the emulated one ------ */

static cm_cuda_driver spy;
static struct {
  int mem_alloc, mem_alloc_host, module_load, graph_instantiate, set_attribute;
  int fail_launch_at; /* > 0: the launch with this number (from 1) fails */
  int launches;
} spied;

static int spy_mem_alloc(cm_cu_ptr *p, size_t bytes) {
  spied.mem_alloc++;
  return emu_driver()->mem_alloc(p, bytes);
}
static int spy_mem_alloc_host(void **p, size_t bytes) {
  spied.mem_alloc_host++;
  return emu_driver()->mem_alloc_host(p, bytes);
}
static int spy_module_load(void **m, const void *image) {
  spied.module_load++;
  return emu_driver()->module_load_data(m, image);
}
static int spy_graph_instantiate(void **exec, void *graph, unsigned long long flags) {
  spied.graph_instantiate++;
  return emu_driver()->graph_instantiate(exec, graph, flags);
}
static int spy_set_attribute(void *f, int attribute, int value) {
  spied.set_attribute++;
  return emu_driver()->func_set_attribute(f, attribute, value);
}
enum { OUT_OF_RESOURCES = 701 }; /* CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES */
static int spy_launch(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                      unsigned bz, unsigned shared, void *stream, void **params, void **extra) {
  if (++spied.launches == spied.fail_launch_at) return OUT_OF_RESOURCES;
  return emu_driver()->launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra);
}

static const cm_cuda_driver *spy_driver(void) {
  spy = *emu_driver();
  spy.name = "emulated (spied)";
  spy.mem_alloc = spy_mem_alloc;
  spy.mem_alloc_host = spy_mem_alloc_host;
  spy.module_load_data = spy_module_load;
  spy.graph_instantiate = spy_graph_instantiate;
  spy.func_set_attribute = spy_set_attribute;
  spy.launch_kernel = spy_launch;
  memset(&spied, 0, sizeof spied);
  return &spy;
}

/* ---- compiling and running on the emulated device ------------------------ */

/* The target the emulated device runs (its compute capability's arch). */
static cm_target device_target(void) {
  cm_target t;
  memset(&t, 0, sizeof t);
  cm_err err = {0};
  CHECK_MSG(emu_device_target(&t, &err) == CM_OK, "%s", err.msg);
  return t;
}

typedef struct emu_run_opts {
  cm_cuda_graphs graphs;
  bool resident, profile;
  const cm_plan *plan;
  const cm_cuda_driver *driver; /* NULL: emu_driver() */
} emu_run_opts;

static cm_status compile_emu(const cm_graph *g, const emu_run_opts *ro, cm_program **pr,
                             cm_err *err) {
  cm_target t = device_target();
  cm_cuda_backend_opts bo = {ro->driver ? ro->driver : emu_driver(), emu_compiler(), 0, ro->graphs,
                             0};
  cm_compile_opts o = {.cache_dir = test_module_cache("test_cuda_backend"),
                       .backend_opts = &bo,
                       .resident_states = ro->resident,
                       .profile = ro->profile,
                       .plan = ro->plan};
  return cm_compile(g, &t, &o, pr, err);
}

/* Copies of g's sources (by node), so that runs update their own states. */
static cm_tensor **copy_sources(const cm_graph *g, const cm_tensor *const *src, cm_tensor *store) {
  cm_tensor **ptr = calloc((size_t)g->n_nodes + 1, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++)
    if (src[i]) {
      CHECK(cm_tensor_copy(&store[i], src[i], NULL) == CM_OK);
      ptr[i] = &store[i];
    }
  return ptr;
}

static void free_tensors(cm_tensor *t, int n) {
  for (int i = 0; t && i < n; i++) cm_tensor_free(&t[i]);
  free(t);
}

static bool same_bits(const cm_tensor *a, const cm_tensor *b) {
  return a->data && b->data && cm_type_equal(&a->type, &b->type) &&
         memcmp(a->data, b->data, cm_type_nbytes(&a->type)) == 0;
}

/* ---- random graphs against the oracle ------------------------------------- */

/* g on the emulated device: every output and assigned state within its bound
 * (cm_eval_bounded). Returns the worst |gpu - f64| / bound, -1 on failure. */
static double check_graph(const cm_graph *g, const cm_tensor *const *src, const char *what) {
  cm_err err = {0};
  cm_tensor *v = calloc((size_t)g->n_nodes, sizeof *v),
            *bnd = calloc((size_t)g->n_nodes, sizeof *bnd);
  CHECK_MSG(cm_eval_bounded(g, src, v, bnd, &err) == CM_OK, "%s: eval: %s", what, err.msg);
  cm_tensor *st = calloc((size_t)g->n_nodes, sizeof *st);
  cm_tensor *out = calloc((size_t)g->n_outputs + 1, sizeof *out);
  cm_tensor **ptr = copy_sources(g, src, st);
  cm_program *pr = NULL;
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, false, false, NULL, NULL};
  cm_status s = compile_emu(g, &ro, &pr, &err);
  if (s == CM_OK) s = cm_program_run(pr, ptr, out, &err);
  CHECK_MSG(s == CM_OK, "%s: %s", what, err.msg);
  double worst = s == CM_OK ? 0 : -1;
  for (int j = 0; s == CM_OK && j < g->n_outputs + g->n_nodes; j++) {
    int node = j < g->n_outputs ? g->outputs[j] : j - g->n_outputs;
    if (j >= g->n_outputs && g->nodes[node].op != CM_OP_ASSIGN) continue;
    const cm_tensor *got = j < g->n_outputs ? &out[j] : &st[g->nodes[node].inputs[0]];
    test_bounded r = test_check_bounded(got, &v[node], &bnd[node]);
    CHECK_MSG(r.ratio <= 1, "%s: %s \"%s\": |gpu - f64| = %g at [%lld] exceeds its bound %g", what,
              j < g->n_outputs ? "output" : "state", g->nodes[node].name, r.diff, (long long)r.at,
              r.bound);
    worst = fmax(worst, r.ratio);
  }
  cm_program_free(pr);
  free_tensors(out, g->n_outputs);
  free_tensors(st, g->n_nodes);
  free_tensors(v, g->n_nodes);
  free_tensors(bnd, g->n_nodes);
  free(ptr);
  return worst;
}

static void test_random_graphs(void) {
  bool quick = getenv("CMAEC_TEST_QUICK") != NULL;
  int n = quick ? 4 : 12, ran = 0;
  double worst = 0;
  for (int i = 0; i < n; i++) {
    rng.s = 4100 + (uint64_t)i * 17;
    cm_graph *g = test_random_graph(&rng, 2);
    CHECK_MSG(g && cm_graph_error(g) == NULL, "graph %d: %s", i, g ? cm_graph_error(g) : "oom");
    if (!g || cm_graph_error(g) || g->n_outputs == 0) {
      cm_graph_free(g);
      continue;
    }
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    test_fill_sources(&rng, g, t, src);
    char what[64];
    snprintf(what, sizeof what, "random graph %d", i);
    double e = check_graph(g, src, what);
    worst = fmax(worst, e);
    ran += e >= 0;
    free_tensors(t, g->n_nodes);
    free(src);
    cm_graph_free(g);
  }
  CHECK_MSG(ran == n, "%d of %d graphs ran", ran, n);
  fprintf(stderr, "  %d random graphs on the emulated device, worst |gpu - f64| / bound %.3g\n",
          ran, worst);
}

/* ---- index checks ---------------------------------------------------------- */

/* A gather whose index lies outside its axis: the oracle's error and the CPU backend's (where
 * it is built), word for word; a good run between two bad ones. */
static void test_index_errors(void) {
  cm_graph *g = cm_graph_new();
  int64_t dx[2] = {2, 3}, di[2] = {2, 2};
  int x = cm_input(g, "x", CM_F32, 2, dx), i = cm_input(g, "i", CM_I32, 2, di);
  cm_graph_add_output(g, cm_gather(g, x, i, 1, "g"), NULL);
  CHECK(cm_graph_error(g) == NULL);
  cm_tensor t[2];
  memset(t, 0, sizeof t);
  CHECK(cm_tensor_alloc(&t[0], g->nodes[x].type, NULL) == CM_OK);
  CHECK(cm_tensor_alloc(&t[1], g->nodes[i].type, NULL) == CM_OK);
  for (int e = 0; e < 6; e++) cm_tensor_set_f64(&t[0], e, e + 1);
  static const double bad[4] = {0, 2, 1, 7}, good[4] = {0, 2, 1, 0};
  cm_tensor *ptr[2] = {&t[0], &t[1]};
  const cm_tensor *cptr[2] = {&t[0], &t[1]};
  cm_err cpu_err = {0}, err = {0}, oracle_err = {0};
  cm_program *cpu = NULL, *gpu = NULL;
  if (have_cpu) {
    cm_compile_opts co = {.cache_dir = ""};
    CHECK(cm_compile(g, NULL, &co, &cpu, &cpu_err) == CM_OK);
  }
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, false, false, NULL, NULL};
  CHECK_MSG(compile_emu(g, &ro, &gpu, &err) == CM_OK, "%s", err.msg);
  for (int run = 0; gpu && run < 3; run++) {
    const double *idx = run == 1 ? good : bad; /* a good run between two bad ones */
    for (int e = 0; e < 4; e++) cm_tensor_set_f64(&t[1], e, idx[e]);
    cm_tensor out[1], *v = calloc((size_t)g->n_nodes, sizeof *v);
    memset(out, 0, sizeof out);
    memset(&err, 0, sizeof err), memset(&cpu_err, 0, sizeof cpu_err);
    memset(&oracle_err, 0, sizeof oracle_err);
    cm_eval_opts eo = {CM_PRECISION_NATIVE};
    cm_status so = cm_eval(g, cptr, v, &eo, &oracle_err);
    cm_status sg = cm_program_run(gpu, ptr, out, &err);
    CHECK_MSG(so == sg && !strcmp(oracle_err.msg, err.msg),
              "run %d: oracle %d \"%s\", gpu %d \"%s\"", run, so, oracle_err.msg, sg, err.msg);
    if (cpu) {
      cm_status sc = cm_program_run(cpu, ptr, NULL, &cpu_err);
      CHECK_MSG(sc == sg && !strcmp(cpu_err.msg, err.msg), "run %d: cpu %d \"%s\", gpu %d \"%s\"",
                run, sc, cpu_err.msg, sg, err.msg);
    }
    if (run == 1) {
      CHECK(sg == CM_OK && cm_tensor_get_f64(&out[0], 1) == 3 &&
            cm_tensor_get_f64(&out[0], 3) == 4);
    } else {
      CHECK_MSG(sg == CM_EINVALID && strstr(err.msg, "index 7 at [1,1] outside [0, 3)"), "%s",
                err.msg);
    }
    cm_tensor_free(&out[0]);
    for (int k = 0; so == CM_OK && k < g->n_nodes; k++) cm_tensor_free(&v[k]);
    free(v);
  }
  cm_program_free(cpu);
  cm_program_free(gpu);
  cm_tensor_free(&t[0]), cm_tensor_free(&t[1]);
  cm_graph_free(g);
}

/* ---- graphs replayed, eager launches, resident states, prefetch ----------- */

/* s <- s * 0.5 + tanh(x @ w); out = sum(s): a state updated by every run. */
static cm_graph *state_graph(int *x_id, int *s_id) {
  cm_graph *g = cm_graph_new();
  int64_t dx[2] = {5, 7}, dw[2] = {7, 3}, ds[2] = {5, 3};
  cm_init zeros = {CM_INIT_ZEROS, 0, 0};
  int x = cm_input(g, "x", CM_F32, 2, dx), w = cm_input(g, "w", CM_F32, 2, dw);
  int s = cm_state(g, "s", CM_F32, 2, ds, zeros);
  int half = cm_const_fill(g, NULL, CM_F32, 2, ds, 0.5);
  int h = cm_unary(g, CM_OP_TANH, cm_matmul(g, x, w, false, false, NULL), NULL);
  int nv = cm_binary(g, CM_OP_ADD, cm_binary(g, CM_OP_MUL, s, half, NULL), h, "nv");
  cm_assign(g, s, nv, "upd");
  int axes[2] = {0, 1};
  cm_graph_add_output(g, cm_reduce(g, CM_OP_REDUCE_SUM, nv, 2, axes, false, "total"), NULL);
  CHECK(cm_graph_error(g) == NULL);
  *x_id = x, *s_id = s;
  return g;
}

/* Runs pr `runs` times on copies of src; keeps every run's outputs and the final sources. */
static void run_times(cm_program *pr, const cm_graph *g, const cm_tensor *const *src, int runs,
                      cm_tensor *outs, cm_tensor *final) {
  cm_tensor **ptr = copy_sources(g, src, final);
  cm_err err = {0};
  for (int r = 0; r < runs; r++)
    CHECK_MSG(cm_program_run(pr, ptr, &outs[r * g->n_outputs], &err) == CM_OK, "run %d: %s", r,
              err.msg);
  free(ptr);
}

/* The same random graphs (with state updates) captured as a CUDA graph and
 * replayed, and launched eagerly: every output and state the same bits. */
static void test_graph_replay_equals_eager(void) {
  enum { RUNS = 3 };
  for (int i = 0; i < 4; i++) {
    rng.s = 900 + (uint64_t)i;
    cm_graph *g = i == 0 ? NULL : test_random_graph(&rng, 3);
    int x, s;
    if (!g) g = state_graph(&x, &s);
    cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
    const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
    test_fill_sources(&rng, g, t, src);
    cm_tensor *outs[2], *fin[2];
    emu_counters c0, c1;
    for (int mode = 0; mode < 2; mode++) {
      outs[mode] = calloc((size_t)(RUNS * g->n_outputs + 1), sizeof(cm_tensor));
      fin[mode] = calloc((size_t)g->n_nodes, sizeof(cm_tensor));
      emu_run_opts ro = {mode ? CM_CUDA_GRAPHS_OFF : CM_CUDA_GRAPHS_ON, false, false, NULL,
                         spy_driver()};
      cm_program *pr = NULL;
      cm_err err = {0};
      CHECK_MSG(compile_emu(g, &ro, &pr, &err) == CM_OK, "graph %d: %s", i, err.msg);
      emu_counters_get(&c0);
      if (pr) run_times(pr, g, src, RUNS, outs[mode], fin[mode]);
      emu_counters_get(&c1);
      /* ON: one graph, instantiated once, replayed every run; OFF: none */
      long replays = c1.graph_launches - c0.graph_launches;
      CHECK_MSG(replays == (mode ? 0 : RUNS) && spied.graph_instantiate == (mode ? 0 : 1),
                "graph %d, graphs %s: %ld replays, %d instantiations", i, mode ? "off" : "on",
                replays, spied.graph_instantiate);
      CHECK_MSG(c1.launches - c0.launches > 0 && (c1.launches - c0.launches) % RUNS == 0,
                "graph %d: %ld launches", i, c1.launches - c0.launches);
      /* one device allocation; pinned staging for two input slots and the downloads */
      bool inputs = false;
      for (int v = 0; v < g->n_nodes; v++) inputs |= g->nodes[v].op == CM_OP_INPUT;
      CHECK_MSG(spied.mem_alloc == 1 && spied.mem_alloc_host == (inputs ? 3 : 1),
                "%d device, %d pinned allocations", spied.mem_alloc, spied.mem_alloc_host);
      cm_program_free(pr);
    }
    for (int r = 0; r < RUNS * g->n_outputs; r++)
      CHECK_MSG(same_bits(&outs[0][r], &outs[1][r]), "graph %d: output %d of run %d differs", i,
                r % g->n_outputs, r / g->n_outputs);
    for (int v = 0; v < g->n_nodes; v++)
      CHECK_MSG(!src[v] || same_bits(&fin[0][v], &fin[1][v]), "graph %d: source %s differs", i,
                g->nodes[v].name);
    free_tensors(outs[0], RUNS * g->n_outputs), free_tensors(outs[1], RUNS * g->n_outputs);
    free_tensors(fin[0], g->n_nodes), free_tensors(fin[1], g->n_nodes);
    free_tensors(t, g->n_nodes);
    free(src);
    cm_graph_free(g);
  }
}

/* resident_states: the host state is left as bound until states_download,
 * which brings what non-resident runs leave in it; after the caller writes it
 * (states_changed) the next run starts from the host's value. */
static void test_resident_states(void) {
  int x, s;
  cm_graph *g = state_graph(&x, &s);
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  rng.s = 31;
  test_fill_sources(&rng, g, t, src);
  cm_err err = {0};
  cm_program *res = NULL, *plain = NULL;
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, true, false, NULL, NULL};
  CHECK_MSG(compile_emu(g, &ro, &res, &err) == CM_OK, "%s", err.msg);
  ro.resident = false;
  CHECK_MSG(compile_emu(g, &ro, &plain, &err) == CM_OK, "%s", err.msg);
  if (!res || !plain) goto done;
  cm_tensor *st_r = calloc((size_t)g->n_nodes, sizeof *st_r);
  cm_tensor *st_p = calloc((size_t)g->n_nodes, sizeof *st_p);
  cm_tensor **pr_ = copy_sources(g, src, st_r), **pp = copy_sources(g, src, st_p);
  for (int r = 0; r < 3; r++) {
    cm_tensor o_r[1], o_p[1];
    memset(o_r, 0, sizeof o_r);
    memset(o_p, 0, sizeof o_p);
    CHECK(cm_program_run(res, pr_, o_r, &err) == CM_OK);
    CHECK(cm_program_run(plain, pp, o_p, &err) == CM_OK);
    CHECK_MSG(same_bits(o_r, o_p), "run %d: the outputs differ", r);
    /* the host copy is stale: still the initial state; the plain program's is current */
    CHECK_MSG(same_bits(&st_r[s], src[s]) && !same_bits(&st_p[s], src[s]),
              "run %d: resident host state %s", r,
              same_bits(&st_r[s], src[s]) ? "ok, plain not updated" : "updated");
    /* the state's value, read where the program keeps it, is current */
    int upd = cm_graph_find(g, "upd");
    const void *dev = cm_program_value(res, upd);
    CHECK(dev && !memcmp(dev, st_p[s].data, cm_type_nbytes(&st_p[s].type)));
    cm_tensor_free(o_r), cm_tensor_free(o_p);
  }
  CHECK(cm_program_states_download(res, &err) == CM_OK);
  CHECK_MSG(same_bits(&st_r[s], &st_p[s]), "the downloaded state differs");
  /* the caller writes the state: without states_changed the device keeps its own */
  for (int e = 0; e < cm_type_numel(&st_r[s].type); e++) {
    cm_tensor_set_f64(&st_r[s], e, 0.25 * e);
    cm_tensor_set_f64(&st_p[s], e, 0.25 * e);
  }
  cm_program_states_changed(res);
  cm_tensor o_r[1], o_p[1];
  memset(o_r, 0, sizeof o_r);
  memset(o_p, 0, sizeof o_p);
  CHECK(cm_program_run(res, pr_, o_r, &err) == CM_OK);
  CHECK(cm_program_run(plain, pp, o_p, &err) == CM_OK);
  CHECK_MSG(same_bits(o_r, o_p), "after states_changed: the outputs differ");
  CHECK(cm_program_states_download(res, &err) == CM_OK);
  CHECK_MSG(same_bits(&st_r[s], &st_p[s]), "after states_changed: the state differs");
  cm_tensor_free(o_r), cm_tensor_free(o_p);
  free_tensors(st_r, g->n_nodes), free_tensors(st_p, g->n_nodes);
  free(pr_), free(pp);
done:
  cm_program_free(res);
  cm_program_free(plain);
  free_tensors(t, g->n_nodes);
  free(src);
  cm_graph_free(g);
}

/* Prefetched inputs are copied when prefetched and not again at the start that
 * binds the same tensors; other tensors are uploaded at the start. */
static void test_prefetch(void) {
  int x, s;
  cm_graph *g = state_graph(&x, &s);
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  rng.s = 77;
  test_fill_sources(&rng, g, t, src);
  enum { RUNS = 4 };
  cm_tensor xs[RUNS], ref[RUNS], got[RUNS];
  memset(xs, 0, sizeof xs);
  memset(ref, 0, sizeof ref);
  memset(got, 0, sizeof got);
  for (int r = 0; r < RUNS; r++) {
    CHECK(cm_tensor_alloc(&xs[r], g->nodes[x].type, NULL) == CM_OK);
    test_fill(&rng, &xs[r]);
  }
  cm_err err = {0};
  cm_program *a = NULL, *b = NULL;
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, true, false, NULL, NULL};
  CHECK_MSG(compile_emu(g, &ro, &a, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(compile_emu(g, &ro, &b, &err) == CM_OK, "%s", err.msg);
  if (!a || !b) goto done;
  cm_tensor *st_a = calloc((size_t)g->n_nodes, sizeof *st_a);
  cm_tensor *st_b = calloc((size_t)g->n_nodes, sizeof *st_b);
  cm_tensor **pa = copy_sources(g, src, st_a), **pb = copy_sources(g, src, st_b);
  /* the reference: one run after another */
  for (int r = 0; r < RUNS; r++) {
    pa[x] = &xs[r];
    CHECK(cm_program_run(a, pa, &ref[r], &err) == CM_OK);
  }
  /* the same, each next input prefetched while a run goes on; run 2's input is overwritten
   * after its prefetch (the run reads the prefetched copy), run 3 starts with other tensors
   * than the prefetched ones (they are uploaded at the start) */
  cm_tensor other;
  CHECK(cm_tensor_copy(&other, &xs[3], NULL) == CM_OK);
  pb[x] = &xs[0];
  CHECK(cm_program_start(b, pb, &err) == CM_OK);
  for (int r = 0; r < RUNS; r++) {
    if (r + 1 < RUNS) {
      cm_tensor **next = calloc((size_t)g->n_nodes, sizeof *next);
      memcpy(next, pb, sizeof *next * (size_t)g->n_nodes); /* w: the same tensor each run */
      next[x] = &xs[r + 1];
      CHECK_MSG(cm_program_prefetch(b, next, &err) == CM_OK, "%s", err.msg);
      free(next);
    }
    if (r + 1 == 2) test_fill(&rng, &xs[2]);
    CHECK_MSG(cm_program_finish(b, &got[r], &err) == CM_OK, "run %d: %s", r, err.msg);
    /* a second start before the finish is refused */
    if (r + 1 < RUNS) {
      pb[x] = r + 1 == 3 ? &other : &xs[r + 1];
      CHECK(cm_program_start(b, pb, &err) == CM_OK);
      if (r == 0) {
        cm_err e2 = {0};
        CHECK(cm_program_start(b, pb, &e2) == CM_EINVALID);
        CHECK_STR_CONTAINS(e2.msg, "not finished");
      }
    }
  }
  for (int r = 0; r < RUNS; r++)
    CHECK_MSG(same_bits(&got[r], &ref[r]), "run %d: the output differs with prefetch", r);
  CHECK(cm_program_states_download(a, &err) == CM_OK &&
        cm_program_states_download(b, &err) == CM_OK);
  CHECK(same_bits(&st_a[s], &st_b[s]));
  cm_tensor_free(&other);
  for (int r = 0; r < RUNS; r++) cm_tensor_free(&ref[r]), cm_tensor_free(&got[r]);
  pa[x] = pb[x] = NULL;
  free_tensors(st_a, g->n_nodes), free_tensors(st_b, g->n_nodes);
  free(pa), free(pb);
done:
  for (int r = 0; r < RUNS; r++) cm_tensor_free(&xs[r]);
  cm_program_free(a);
  cm_program_free(b);
  free_tensors(t, g->n_nodes);
  free(src);
  cm_graph_free(g);
}

/* ---- profile and the first non-finite value ---------------------------------- */

/* With profile: every kernel and stage timed by events around it, the program launched
 * eagerly (no graph replayed). */
static void test_profile(void) {
  int x, s;
  cm_graph *g = state_graph(&x, &s);
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  rng.s = 8;
  test_fill_sources(&rng, g, t, src);
  cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) ptr[i] = (cm_tensor *)src[i];
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, false, true, NULL, NULL};
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(compile_emu(g, &ro, &pr, &err) == CM_OK, "%s", err.msg);
  emu_counters c0, c1;
  emu_counters_get(&c0);
  for (int r = 0; pr && r < 2; r++) CHECK(cm_program_run(pr, ptr, NULL, &err) == CM_OK);
  emu_counters_get(&c1);
  CHECK(c1.graph_launches == c0.graph_launches && c1.launches > c0.launches);
  const cm_kernel_profile *kprof = NULL;
  const cm_stage_profile *sprof = NULL;
  int nk = pr ? cm_program_profile(pr, &kprof) : 0,
      ns = pr ? cm_program_stage_profile(pr, &sprof) : 0;
  const cm_kprogram *kp = pr ? cm_program_kernels(pr) : NULL;
  int stages = 0;
  for (int i = 0; kp && i < kp->n_kernels; i++) stages += kp->kernels[i].n_stages;
  CHECK_MSG(kp && nk == kp->n_kernels && ns == stages && nk > 0, "%d kernels, %d stages profiled",
            nk, ns);
  for (int i = 0; i < nk; i++)
    CHECK_MSG(kprof[i].runs == 2 && kprof[i].total_ms >= 0 && kprof[i].name &&
                  !strcmp(kprof[i].name, kp->kernels[i].name),
              "kernel %d: %d runs, %g ms", i, kprof[i].runs, kprof[i].total_ms);
  double sum = 0;
  for (int i = 0; i < ns; i++) {
    CHECK(sprof[i].runs == 2 && sprof[i].total_ms >= 0 && sprof[i].stage);
    sum += sprof[i].total_ms;
  }
  double ksum = 0;
  for (int i = 0; i < nk; i++) ksum += kprof[i].total_ms;
  CHECK_MSG(fabs(sum - ksum) <= 1e-6 * fmax(1, ksum), "stages %g ms, kernels %g ms", sum, ksum);
  cm_program_free(pr);
  free(ptr);
  free_tensors(t, g->n_nodes);
  free(src);
  cm_graph_free(g);
}

/* cm_program_first_nonfinite on the device: kernel by kernel, buffers read back. */
static void test_first_nonfinite(void) {
  cm_graph *g = cm_graph_new();
  int64_t d[1] = {4};
  int x = cm_input(g, "x", CM_F32, 1, d);
  int y = cm_unary(g, CM_OP_LOG, x, "y");
  cm_graph_add_output(g, y, NULL);
  cm_graph_add_output(g, cm_unary(g, CM_OP_TANH, y, "z"), NULL);
  cm_tensor t;
  memset(&t, 0, sizeof t);
  CHECK(cm_tensor_alloc(&t, g->nodes[x].type, NULL) == CM_OK);
  for (int e = 0; e < 4; e++) cm_tensor_set_f64(&t, e, e == 2 ? -1.0 : 1.0 + e);
  cm_tensor *src[4] = {&t, NULL, NULL, NULL};
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, false, false, NULL, NULL};
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(compile_emu(g, &ro, &pr, &err) == CM_OK, "%s", err.msg);
  cm_nonfinite nf;
  memset(&nf, 0, sizeof nf);
  if (pr) CHECK_MSG(cm_program_first_nonfinite(pr, src, &nf, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(nf.found && nf.index == 2 && nf.op && !strcmp(nf.op, "log") && isnan(nf.value),
            "found %d at %lld (%s)", nf.found, (long long)nf.index, nf.op ? nf.op : "-");
  /* the program runs as usual after it */
  cm_tensor out[2];
  memset(out, 0, sizeof out);
  if (pr) CHECK(cm_program_run(pr, src, out, &err) == CM_OK && isnan(cm_tensor_get_f64(out, 2)));
  cm_tensor_free(&out[0]), cm_tensor_free(&out[1]);
  cm_program_free(pr);
  cm_tensor_free(&t);
  cm_graph_free(g);
}

/* ---- errors ---------------------------------------------------------------- */

static void test_errors(void) {
  int x, s;
  cm_graph *g = state_graph(&x, &s);
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  rng.s = 5;
  test_fill_sources(&rng, g, t, src);
  cm_tensor **ptr = calloc((size_t)g->n_nodes, sizeof *ptr);
  for (int i = 0; i < g->n_nodes; i++) ptr[i] = (cm_tensor *)src[i];
  cm_err err = {0};
  /* code for another arch than the device runs: refused, naming both */
  cm_target dev = device_target(), other;
  CHECK(cm_target_cuda(dev.sm >= 90 ? "sm_80" : "sm_90", &other, &err) == CM_OK);
  cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_ON, 0};
  cm_compile_opts o = {.cache_dir = test_module_cache("test_cuda_backend"), .backend_opts = &bo};
  cm_program *pr = NULL;
  CHECK(cm_compile(g, &other, &o, &pr, &err) == CM_EINVALID && !pr);
  CHECK_MSG(strstr(err.msg, other.arch) && strstr(err.msg, dev.arch), "%s", err.msg);
  /* a device the driver does not have */
  bo.device = 3;
  CHECK(cm_compile(g, &dev, &o, &pr, &err) == CM_EINVALID && !pr);
  CHECK_STR_CONTAINS(err.msg, "device 3");
  bo.device = 0;
  /* a failed launch names the kernel, its stage, grid and block and the driver's error,
   * eagerly and while capturing */
  for (int mode = 0; mode < 2; mode++) {
    emu_run_opts ro = {mode ? CM_CUDA_GRAPHS_ON : CM_CUDA_GRAPHS_OFF, false, false, NULL,
                       spy_driver()};
    CHECK_MSG(compile_emu(g, &ro, &pr, &err) == CM_OK, "%s", err.msg);
    if (!pr) continue;
    spied.fail_launch_at = 2;
    memset(&err, 0, sizeof err);
    CHECK(cm_program_run(pr, ptr, NULL, &err) == CM_EINTERNAL);
    const char *name = NULL;
    spy.get_error_name(OUT_OF_RESOURCES, &name);
    CHECK_MSG(name && strstr(err.msg, name), "%s", err.msg);
    CHECK_MSG(strstr(err.msg, "cuLaunchKernel(kernel k") && strstr(err.msg, " stage ") &&
                  strstr(err.msg, "grid ") && strstr(err.msg, "block "),
              "%s", err.msg);
    if (mode) CHECK_STR_CONTAINS(err.msg, "capturing the program's CUDA graph");
    /* the program runs again (the next launches succeed) */
    spied.fail_launch_at = 0;
    CHECK_MSG(cm_program_run(pr, ptr, NULL, &err) == CM_OK, "%s", err.msg);
    cm_program_free(pr);
    pr = NULL;
  }
  free(ptr);
  free_tensors(t, g->n_nodes);
  free(src);
  cm_graph_free(g);
}

/* A kernel writing past its buffer: device memory is host memory, so a write past the end
 * of an allocation is AddressSanitizer's to catch (the emulated compiler instruments modules
 * in the sanitizer build). A module made by the emulated compiler, in the rendered kernels'
 * form (extern "C" __global__, pointer parameters), writes one float past a 64-float
 * allocation in a forked child, which must die with the sanitizer's report. The release
 * build has no such check on kernels: there the driver's own check is asserted instead, a
 * device copy past the end of an allocation refused. */
static bool asan_build(void) {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  return true;
#endif
#endif
  return false;
}

static void test_out_of_bounds_write(void) {
  const cm_cuda_driver *d = emu_driver();
  if (!asan_build()) {
    void *ctx = NULL;
    int dev = 0;
    cm_cu_ptr buf = 0;
    CHECK(d->init(0) == 0 && d->device_get(&dev, 0) == 0 && d->primary_ctx_retain(&ctx, dev) == 0);
    CHECK(d->ctx_set_current(ctx) == 0 && d->mem_alloc(&buf, 256) == 0);
    CHECK_MSG(d->memcpy_dtod_async(buf + 128, buf, 256, NULL) != 0,
              "a copy past the end of an allocation was accepted");
    CHECK(d->ctx_synchronize() == 0 && d->mem_free(buf) == 0 && d->primary_ctx_release(dev) == 0);
    fprintf(stderr, "  release build: the driver refuses a copy out of bounds; kernels writing "
                    "out of bounds are caught in the sanitizer build\n");
    return;
  }
  static const char source[] = "extern \"C\" __global__ void cmk_s0(float *a) {\n"
                               "  a[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;\n"
                               "}\n";
  const cm_cuda_compiler *c = emu_compiler();
  cm_target t = device_target();
  cm_cubin img = {0};
  cm_err err = {0};
  CHECK_MSG(c->compile(c->self, source, "oob.cu", t.arch, &img, &err) == CM_OK, "%s", err.msg);
  fflush(stderr);
  int pipe_fd[2];
  CHECK(pipe(pipe_fd) == 0);
  pid_t child = fork();
  if (child == 0) { /* its stderr (the sanitizer's report) goes to the parent */
    close(pipe_fd[0]);
    dup2(pipe_fd[1], 2);
    void *ctx = NULL, *mod = NULL, *fn = NULL;
    cm_cu_ptr buf = 0;
    int dev = 0;
    if (d->init(0) || d->device_get(&dev, 0) || d->primary_ctx_retain(&ctx, dev) ||
        d->ctx_set_current(ctx) || d->module_load_data(&mod, img.data) ||
        d->module_get_function(&fn, mod, "cmk_s0") || d->mem_alloc(&buf, 64 * sizeof(float)))
      _exit(3);
    void *args[1] = {&buf};
    /* 65 threads for 64 floats */
    if (d->launch_kernel(fn, 1, 1, 1, 65, 1, 1, 0, NULL, args, NULL) || d->ctx_synchronize())
      _exit(4);
    _exit(0);
  }
  close(pipe_fd[1]);
  static char report[1 << 16], sink[4096];
  size_t got = 0, cap = sizeof report - 1;
  for (ssize_t r = 1; r > 0;) { /* the report's start kept, the rest drained */
    r = got < cap ? read(pipe_fd[0], report + got, cap - got) : read(pipe_fd[0], sink, sizeof sink);
    if (r > 0 && got < cap) got += (size_t)r;
  }
  report[got] = 0;
  close(pipe_fd[0]);
  int status = 0;
  CHECK(child > 0 && waitpid(child, &status, 0) == child);
  bool died = !(WIFEXITED(status) && (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) >= 3));
  CHECK_MSG(died, "the out-of-bounds write was not caught (child status %d)", status);
  CHECK_MSG(strstr(report, "heap-buffer-overflow") && strstr(report, "WRITE of size 4"),
            "the child's report: %.300s", report);
  fprintf(stderr, "  a kernel writing one float past its allocation: caught (%s)\n",
          strstr(report, "heap-buffer-overflow") ? "AddressSanitizer: heap-buffer-overflow" : "?");
  cm_cubin_free(&img);
}

/* ---- the default variant's training step ------------------------------------ */

/* Every kernel of the last run of pr on its own inputs (as the device left them, sources
 * `before`) within its error bound. Returns the worst |gpu - f64| / bound. */
static double check_kernels(const cm_program *pr, const char *what, const cm_graph *rg,
                            const cm_plan *p, const cm_tensor *const *before, int step) {
  int n = rg->n_nodes;
  cm_tensor *got = calloc((size_t)n, sizeof *got), *val = calloc((size_t)n, sizeof *val);
  cm_tensor *bnd = calloc((size_t)n, sizeof *bnd);
  for (int gi = 0; gi < p->n_groups; gi++)
    for (int k = 0; k < p->groups[gi].n_outputs; k++) {
      int v = p->groups[gi].outputs[k];
      const void *data = cm_program_value(pr, v);
      cm_type t = rg->nodes[v].op == CM_OP_ASSIGN ? rg->nodes[rg->nodes[v].inputs[0]].type
                                                  : rg->nodes[v].type;
      if (data && cm_tensor_alloc(&got[v], t, NULL) == CM_OK)
        memcpy(got[v].data, data, cm_type_nbytes(&t));
    }
  double worst = 0;
  cm_err err = {0};
  for (int k = 0; k < p->n_order; k++) {
    const cm_group *gr = &p->groups[p->order[k]];
    for (int j = 0; j < gr->n_inputs; j++) val[gr->inputs[j]] = got[gr->inputs[j]]; /* shared */
    for (int j = 0; j < gr->n_outputs; j++) memset(&val[gr->outputs[j]], 0, sizeof *val);
    cm_status es = cm_plan_eval_group_bounded(rg, p, p->order[k], before, val, bnd, &err);
    CHECK_MSG(es == CM_OK, "%s step %d: group %d: %s", what, step, p->order[k], err.msg);
    for (int j = 0; es == CM_OK && j < gr->n_outputs; j++) {
      int v = gr->outputs[j];
      test_bounded r = test_check_bounded(&got[v], &val[v], &bnd[v]);
      CHECK_MSG(r.ratio <= 1,
                "%s step %d: kernel %d (%s), output %s: |%s - f64| = %g at [%lld] exceeds its "
                "error bound %g",
                what, step, k, cm_group_kind_name(gr->kind), rg->nodes[v].name, what, r.diff,
                (long long)r.at, r.bound);
      worst = fmax(worst, r.ratio);
    }
    for (int j = 0; j < gr->n_outputs; j++) {
      cm_tensor_free(&val[gr->outputs[j]]);
      cm_tensor_free(&bnd[gr->outputs[j]]);
    }
    for (int j = 0; j < gr->n_inputs; j++) memset(&val[gr->inputs[j]], 0, sizeof *val);
  }
  free_tensors(got, n);
  free(val);
  free(bnd);
  return worst;
}

/* What compiling gpu (over the spied driver) asked of the driver: one device allocation,
 * every module loaded once, the dynamic shared memory opt-in for exactly the stages whose
 * plan needs more than the static limit. */
static void check_loading(const cm_program *gpu) {
  const cm_kprogram *kp = cm_program_kernels(gpu);
  const cm_target *t = cm_program_target(gpu);
  const cm_cuda_build *b = cm_program_cuda_build(gpu);
  cm_cuda_render_opts ro = {t, false};
  int opt_in = 0;
  for (int i = 0; i < kp->n_kernels; i++)
    for (int s = 0; s < kp->kernels[i].n_stages; s++) {
      const cm_kstage *st = &kp->kernels[i].stages[s];
      unsigned dyn = cm_cuda_stage_launch(&kp->kernels[i], s, &ro).shared_bytes;
      opt_in += st->cuda.kind != CM_KCUDA_IN_SPAN && dyn > 0 &&
                (int64_t)dyn + st->cuda.shared_static > t->shared_bytes_static;
    }
  CHECK_MSG(b && spied.mem_alloc == 1 && spied.module_load == b->n_modules &&
                spied.set_attribute == opt_in,
            "%d device allocations, %d modules loaded of %d, %d opt-ins for %d stages",
            spied.mem_alloc, spied.module_load, b ? b->n_modules : -1, spied.set_attribute, opt_in);
  fprintf(stderr, "  %d modules loaded, %d stages opted in to more dynamic shared memory\n",
          spied.module_load, opt_in);
}

/* Three steps of models/cmae_vit_tiny_fmnist.json (batch 2) on the emulated device (the
 * CUDA graph replayed, states resident) and on the CPU backend, both from the device's states
 * each step: every kernel within its derived error bound on its own inputs
 * (cm_plan_eval_group_bounded, as test_cpu_exec checks the CPU), the device's every step, the
 * CPU's on the last step (the states two device steps left). Whole-step bounds are not
 * used: carried through a step they say nothing (issue 13), and where they are numbers the
 * CPU was seen just past one. */
static void test_model_steps(void) {
  double t0 = now_s();
  bool quick = getenv("CMAEC_TEST_QUICK") != NULL;
  cm_err err = {0};
  cm_optim_config oc = test_model_optim();
  oc.eps = 1; /* the update a smooth function of the gradient (see test_cpu_exec) */
  cm_model_config cfg;
  cm_model m;
  cm_graph *step = test_build_step("models/cmae_vit_tiny_fmnist.json", NULL, 0, 2, &oc, &cfg, &m);
  if (!step) return;
  int n0 = step->n_nodes;
  cm_tensor *t = calloc((size_t)n0, sizeof *t);
  const cm_tensor **src0 = calloc((size_t)n0, sizeof *src0);
  rng.s = 4242;
  test_bind_step(step, &cfg, &m, t, src0, uniform);
  cm_graph *rg = cm_graph_clone(step);
  cm_plan *p = test_plan_without_reuse(&rg);
  int n = rg->n_nodes;
  /* the optimized graph's sources by name: cur holds the states between steps */
  cm_tensor *cur = calloc((size_t)n, sizeof *cur), *cpu_st = calloc((size_t)n, sizeof *cpu_st);
  cm_tensor **gpu_ptr = calloc((size_t)n, sizeof *gpu_ptr),
            **cpu_ptr = calloc((size_t)n, sizeof *cpu_ptr);
  const cm_tensor **before = calloc((size_t)n, sizeof *before);
  for (int v = 0; v < n; v++) {
    const cm_node *u = &rg->nodes[v];
    if (u->op != CM_OP_INPUT && u->op != CM_OP_PARAM && u->op != CM_OP_STATE) continue;
    int o = cm_graph_find(step, u->name);
    CHECK_MSG(o >= 0 && src0[o], "source %s", u->name);
    if (o >= 0 && src0[o]) cm_tensor_copy(&cur[v], src0[o], NULL);
    gpu_ptr[v] = &cur[v];
  }
  cm_program *gpu = NULL, *cpu = NULL;
  emu_run_opts ro = {CM_CUDA_GRAPHS_ON, true, false, p, spy_driver()};
  CHECK_MSG(p && compile_emu(rg, &ro, &gpu, &err) == CM_OK, "emulated device: %s", err.msg);
  double t_compile = now_s() - t0;
  if (gpu) check_loading(gpu);
  cm_compile_opts co = {.cache_dir = "", .plan = p};
  if (have_cpu) CHECK_MSG(p && cm_compile(rg, NULL, &co, &cpu, &err) == CM_OK, "cpu: %s", err.msg);
  double worst_kernel = 0, worst_cpu = 0, t_run = 0, t_oracle = 0;
  for (int k = 0; gpu && (cpu || !have_cpu) && k < 3; k++) {
    /* both from the states the device holds (downloaded: cur) */
    cm_tensor *snap = calloc((size_t)n, sizeof *snap);
    for (int v = 0; v < n; v++)
      if (gpu_ptr[v]) {
        cm_tensor_copy(&snap[v], &cur[v], NULL);
        cm_tensor_free(&cpu_st[v]);
        cm_tensor_copy(&cpu_st[v], &cur[v], NULL);
        before[v] = &snap[v], cpu_ptr[v] = &cpu_st[v];
      }
    cm_tensor *gout = calloc((size_t)rg->n_outputs + 1, sizeof *gout);
    cm_tensor *cout = calloc((size_t)rg->n_outputs + 1, sizeof *cout);
    double t1 = now_s();
    CHECK_MSG(cm_program_run(gpu, gpu_ptr, gout, &err) == CM_OK, "step %d: %s", k, err.msg);
    t_run += now_s() - t1;
    if (cpu)
      CHECK_MSG(cm_program_run(cpu, cpu_ptr, cout, &err) == CM_OK, "step %d: cpu: %s", k, err.msg);
    /* the device's kernels on their own inputs every step (the sanitizer build,
     * CMAEC_TEST_QUICK: the last); the CPU's on the last step, from the same states */
    double t2 = now_s();
    if (!quick || k == 2)
      worst_kernel = fmax(worst_kernel, check_kernels(gpu, "gpu", rg, p, before, k));
    if (cpu && k == 2) worst_cpu = check_kernels(cpu, "cpu", rg, p, before, k);
    t_oracle += now_s() - t2;
    CHECK(cm_program_states_download(gpu, &err) == CM_OK);
    if (rg->n_outputs > 0)
      fprintf(stderr, "  step %d: %s gpu %.9g cpu %.9g\n", k, rg->nodes[rg->outputs[0]].name,
              cm_tensor_get_f64(&gout[0], 0), cpu ? cm_tensor_get_f64(&cout[0], 0) : NAN);
    free_tensors(snap, n);
    free_tensors(gout, rg->n_outputs), free_tensors(cout, rg->n_outputs);
  }
  cm_program_stats ps = {0};
  if (gpu) cm_program_stats_get(gpu, &ps);
  fprintf(stderr,
          "  cmae_vit_tiny_fmnist b2, 3 steps: %d kernels (%d modules, %d cached), worst "
          "kernel |gpu - f64| / bound %.3g (cpu %.3g); compile %.1f s, 3 emulated steps "
          "%.1f s, oracle %.1f s, all %.1f s\n",
          ps.n_kernels, ps.jit_modules, ps.cache_hits, worst_kernel, worst_cpu, t_compile, t_run,
          t_oracle, now_s() - t0);
  cm_program_free(gpu);
  cm_program_free(cpu);
  free_tensors(cur, n), free_tensors(cpu_st, n);
  free(gpu_ptr), free(cpu_ptr), free(before);
  free_tensors(t, n0);
  free(src0);
  cm_plan_free(p);
  cm_graph_free(rg);
  cm_graph_free(step);
}

TEST_MAIN(TEST(test_random_graphs), TEST(test_index_errors), TEST(test_graph_replay_equals_eager),
          TEST(test_resident_states), TEST(test_prefetch), TEST(test_profile),
          TEST(test_first_nonfinite), TEST(test_errors), TEST(test_out_of_bounds_write),
          TEST(test_model_steps))
