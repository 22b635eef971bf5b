/* runtime/program.c — cm_compile, the one driver from a graph to running code
 * (pass pipeline, lowering for the target, the backend's compile), and the
 * backend-neutral half of a program: source binding and checks, output and
 * value lookup, the non-finite search, stats. What is target-specific goes
 * through the program's cm_backend table (runtime.h). */
#include "runtime.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct cm_program {
  const cm_graph *g; /* as passed to cm_compile */
  cm_graph *own_g;   /* the optimized copy (NULL when built from a plan) */
  const cm_graph *rg;
  cm_plan *own_plan;
  const cm_plan *plan; /* opts->plan or own_plan */
  cm_kprogram kp;
  cm_target target;
  const cm_backend *be;
  void *impl;     /* the backend's state */
  bool runnable;  /* compiled and allocated: cm_program_run may run it */
  bool in_flight; /* started, not yet finished */
  int *out_id;    /* per output of g: its node in rg */
  int *orig_of;   /* per node of rg: the node of g with the same name (sources), or -1 */
  char **src_ptr; /* per node of rg: bound source data during a run */
  cm_program_stats stats;
};

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static bool is_source(const cm_node *n) {
  return n->op == CM_OP_INPUT || n->op == CM_OP_PARAM || n->op == CM_OP_STATE;
}

void cm_program_free(cm_program *pr) {
  if (!pr) return;
  if (pr->be && pr->be->free) pr->be->free(pr);
  cm_kprogram_free(&pr->kp);
  free(pr->orig_of);
  free(pr->out_id);
  free(pr->src_ptr);
  cm_plan_free(pr->own_plan);
  cm_graph_free(pr->own_g);
  free(pr);
}

/* Maps every source of rg to the node of g it reads, and every output of g to its node of rg. */
static cm_status map_sources_and_outputs(cm_program *pr, cm_err *err) {
  const cm_graph *g = pr->g, *rg = pr->rg;
  pr->orig_of = malloc(sizeof(int) * (size_t)(rg->n_nodes + 1));
  pr->src_ptr = calloc((size_t)rg->n_nodes + 1, sizeof(char *));
  pr->out_id = calloc((size_t)g->n_outputs + 1, sizeof(int));
  if (!pr->orig_of || !pr->src_ptr || !pr->out_id)
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  /* sources by name; builder-named ones ("%6") may be renumbered by the passes,
   * then the k-th source of rg is the k-th source of g (when none was dropped) */
  int n_src_g = 0, n_src_rg = 0, k_src = 0;
  for (int i = 0; i < g->n_nodes; i++) n_src_g += is_source(&g->nodes[i]);
  bool by_position = false;
  for (int i = 0; i < rg->n_nodes; i++)
    if (is_source(&rg->nodes[i])) {
      n_src_rg++;
      by_position |= rg->nodes[i].name[0] == '%';
    }
  by_position = by_position && rg != g && n_src_g == n_src_rg;
  for (int i = 0; i < rg->n_nodes; i++) {
    pr->orig_of[i] = -1;
    if (!is_source(&rg->nodes[i])) continue;
    int o = rg == g ? i : by_position ? -1 : cm_graph_find(g, rg->nodes[i].name);
    if (o >= 0 && (g->nodes[o].op != rg->nodes[i].op ||
                   !cm_type_equal(&g->nodes[o].type, &rg->nodes[i].type)))
      o = -1;
    if (o < 0 && n_src_g == n_src_rg) {
      for (int q = 0, seen = 0; q < g->n_nodes; q++)
        if (is_source(&g->nodes[q]) && seen++ == k_src) o = q;
    }
    k_src++;
    if (o < 0)
      return cm_errorf(err, CM_EINTERNAL, "source \"%s\" of the optimized graph not in the graph",
                       rg->nodes[i].name);
    pr->orig_of[i] = o;
  }
  for (int j = 0; j < g->n_outputs; j++) {
    /* builder-named outputs ("%12") may be renamed by the passes: match by position then */
    const char *name = g->nodes[g->outputs[j]].name;
    int id = rg == g ? g->outputs[j] : cm_graph_find(rg, name);
    if (rg != g && (id < 0 || name[0] == '%') && rg->n_outputs == g->n_outputs) id = rg->outputs[j];
    if (id < 0)
      return cm_errorf(err, CM_EINTERNAL, "output \"%s\" lost by the pipeline",
                       g->nodes[g->outputs[j]].name);
    pr->out_id[j] = id;
  }
  return CM_OK;
}

/* Every collective of the graph is built for the communicator's world size (1 without one). */
static cm_status check_ranks(const cm_graph *rg, const cm_compile_opts *opts, cm_err *err) {
  int size = opts->comm ? cm_comm_size(opts->comm) : 1;
  for (int v = 0; v < rg->n_nodes; v++) {
    const cm_node *n = &rg->nodes[v];
    if ((n->op != CM_OP_ALL_REDUCE && n->op != CM_OP_ALL_GATHER) || n->attrs.ranks == size)
      continue;
    if (!opts->comm)
      return cm_errorf(err, CM_EINVALID,
                       "cm_compile: node \"%s\" (%s) is built for %d ranks, but no communicator "
                       "was given (cm_compile_opts.comm NULL: world size 1)",
                       n->name, cm_op_name(n->op), n->attrs.ranks);
    return cm_errorf(err, CM_EINVALID,
                     "cm_compile: node \"%s\" (%s) is built for %d ranks, but the communicator "
                     "has %d (%s)",
                     n->name, cm_op_name(n->op), n->attrs.ranks, size,
                     cm_comm_describe(opts->comm));
  }
  return CM_OK;
}

cm_status cm_compile(const cm_graph *g, const cm_target *target, const cm_compile_opts *opts,
                     cm_program **out, cm_err *err) {
  *out = NULL;
  cm_compile_opts defaults = {0};
  if (!opts) opts = &defaults;
  cm_program *pr = calloc(1, sizeof *pr);
  if (!pr) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  pr->g = g;
  cm_status st = CM_OK;
  if (target)
    pr->target = *target;
  else if ((st = cm_target_cpu(NULL, NULL, &pr->target, err)) != CM_OK)
    goto fail;
  pr->be = opts->backend                       ? opts->backend
           : pr->target.kind == CM_TARGET_CUDA ? &cm_backend_cuda
                                               : &cm_backend_cpu;
  if (!opts->compile_only && (st = check_ranks(g, opts, err)) != CM_OK) goto fail;
  const cm_plan *p = opts->plan;
  if (!p) {
    cm_pass_state s = {cm_graph_clone(g), NULL};
    if (!s.g) {
      st = cm_errorf(err, CM_EINTERNAL, "out of memory");
      goto fail;
    }
    st = cm_pipeline_run(&s, cm_default_pipeline, NULL, NULL, 0, NULL, err);
    pr->own_g = s.g;
    pr->own_plan = s.plan;
    if (st != CM_OK) goto fail;
    if (!s.plan) {
      st = cm_errorf(err, CM_EINTERNAL, "cm_compile: the pipeline made no plan");
      goto fail;
    }
    p = s.plan;
    pr->rg = s.g;
  } else {
    pr->rg = g;
  }
  pr->plan = p;
  if ((st = map_sources_and_outputs(pr, err)) != CM_OK) goto fail;

  double t0 = now_ms();
  cm_lower_opts lo = {&pr->target, opts->no_templates, opts->attn_bc};
  st = cm_lower_plan(pr->rg, p, &lo, &pr->kp, err);
  if (st != CM_OK) goto fail;
  pr->stats.lower_ms = now_ms() - t0;
  /* tuned plans from the database, before anything is rendered */
  st = cm_tune_apply_cached(&pr->kp, &pr->target, opts, &pr->stats.tuned_stages,
                            &pr->stats.tune_ignored, err);
  if (st == CM_OK && opts->replan) st = opts->replan(&pr->kp, &pr->target, opts->replan_ctx, err);
  if (st != CM_OK) goto fail;
  pr->stats.n_kernels = pr->kp.n_kernels;
  for (int i = 0; i < pr->kp.n_kernels; i++) pr->stats.n_stages += pr->kp.kernels[i].n_stages;

  if ((st = pr->be->compile(pr, opts, &pr->stats, err)) != CM_OK) goto fail;
  if (!opts->compile_only) {
    if ((st = pr->be->alloc_arena(pr, &pr->stats, err)) != CM_OK) goto fail;
    pr->runnable = true;
  }
  *out = pr;
  return CM_OK;
fail:
  cm_program_free(pr);
  return st;
}

/* The graph of a one-kernel program: a node per node of g the kernel reads (an input; a state
 * for a source it updates in place; a copy of a const), its buffers renumbered to it. Buffers
 * k reads but never writes become sources; the arena buffers it writes (node -1) are packed into
 * an arena of their own; its status words keep their node ids apart (they name a node only when
 * an index is out of range, which random inputs of 0 never are). */
static cm_status kernel_graph(const cm_graph *g, cm_kernel *k, cm_graph **out, int64_t *arena_bytes,
                              cm_err *err) {
  cm_graph *kg = cm_graph_new();
  int *map = malloc(sizeof(int) * (size_t)(g->n_nodes + 1));
  if (!kg || !map) {
    cm_graph_free(kg);
    free(map);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  for (int v = 0; v < g->n_nodes; v++) map[v] = -1;
  int64_t end = 0;
  cm_status st = CM_OK;
  for (int b = 0; b < k->n_buffers && st == CM_OK; b++) {
    cm_kbuffer *kb = &k->buffers[b];
    int v = kb->node;
    if (kb->kind == CM_KBUF_ARENA && kb->written) {
      kb->offset = end;
      end += (kb->numel * (int64_t)cm_dtype_size(kb->dtype) + 63) / 64 * 64;
      kb->node = -1;
      continue;
    }
    if (kb->kind == CM_KBUF_STATUS || kb->kind == CM_KBUF_SCRATCH) continue;
    const cm_type *ty = v >= 0 && v < g->n_nodes ? &g->nodes[v].type : NULL;
    if (!ty || ty->dtype != kb->dtype || cm_type_numel(ty) != kb->numel) {
      st = cm_errorf(err, CM_EINVALID,
                     "kernel %s: buffer %d (node %d) is not its node's value: it cannot be "
                     "bound alone",
                     k->name, b, v);
      break;
    }
    if (map[v] < 0) {
      const cm_node *n = &g->nodes[v];
      map[v] = kb->kind == CM_KBUF_CONST
                   ? cm_const_data(kg, NULL, ty->dtype, ty->rank, ty->dims, n->attrs.data)
               : kb->kind == CM_KBUF_SOURCE && kb->written
                   ? cm_state(kg, NULL, ty->dtype, ty->rank, ty->dims, n->attrs.init)
                   : cm_input(kg, NULL, ty->dtype, ty->rank, ty->dims);
      if (map[v] < 0)
        st = cm_errorf(err, CM_EINTERNAL, "kernel %s: %s", k->name, cm_graph_error(kg));
    }
    if (kb->kind == CM_KBUF_ARENA) kb->kind = CM_KBUF_SOURCE, kb->offset = 0;
    kb->node = map[v];
  }
  free(map);
  if (st != CM_OK) {
    cm_graph_free(kg);
    return st;
  }
  *out = kg;
  *arena_bytes = end;
  return CM_OK;
}

cm_status cm_program_of_kernel(const cm_graph *g, const cm_plan *plan, cm_kernel *k,
                               const cm_target *t, const cm_compile_opts *opts, cm_program **out,
                               cm_err *err) {
  *out = NULL;
  cm_program *pr = calloc(1, sizeof *pr);
  cm_kernel *ks = malloc(sizeof *ks);
  if (!pr || !ks) {
    free(pr);
    free(ks);
    cm_kernel_free(k);
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  }
  *ks = *k;
  memset(k, 0, sizeof *k);
  pr->plan = plan;
  pr->target = *t;
  pr->kp.n_kernels = 1;
  pr->kp.kernels = ks;
  pr->kp.max_scratch_bytes = ks->scratch_bytes;
  pr->be = opts->backend                       ? opts->backend
           : pr->target.kind == CM_TARGET_CUDA ? &cm_backend_cuda
                                               : &cm_backend_cpu;
  pr->stats.n_kernels = 1;
  pr->stats.n_stages = ks->n_stages;
  cm_status st = kernel_graph(g, ks, &pr->own_g, &pr->kp.arena_bytes, err);
  if (st == CM_OK) {
    pr->g = pr->rg = pr->own_g;
    st = map_sources_and_outputs(pr, err);
  }
  cm_compile_opts co = *opts;
  co.plan = plan;
  if (st == CM_OK) st = pr->be->compile(pr, &co, &pr->stats, err);
  if (st == CM_OK && !co.compile_only && (st = pr->be->alloc_arena(pr, &pr->stats, err)) == CM_OK)
    pr->runnable = true;
  if (st != CM_OK) {
    cm_program_free(pr);
    return st;
  }
  *out = pr;
  return CM_OK;
}

const cm_graph *cm_program_graph(const cm_program *pr) {
  return pr->rg;
}

const cm_kprogram *cm_program_kernels(const cm_program *pr) {
  return &pr->kp;
}

const cm_plan *cm_program_plan(const cm_program *pr) {
  return pr->plan;
}

const cm_target *cm_program_target(const cm_program *pr) {
  return &pr->target;
}

const cm_backend *cm_program_backend(const cm_program *pr) {
  return pr->be;
}

void cm_program_set_impl(cm_program *pr, void *impl) {
  pr->impl = impl;
}

void *cm_program_impl(const cm_program *pr) {
  return pr->impl;
}

char *cm_program_source(const cm_program *pr, int v) {
  if (v < 0 || v >= pr->rg->n_nodes) return NULL;
  return pr->src_ptr[v];
}

const void *cm_program_output(const cm_program *pr, int j) {
  if (j < 0 || j >= pr->g->n_outputs) return NULL;
  return cm_program_value(pr, pr->out_id[j]);
}

/* The backend's host copy of source v as a kernel sees it; NULL when no kernel reads it. */
static const void *source_on_device(const cm_program *pr, int v) {
  for (int i = 0; i < pr->kp.n_kernels; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].node == v && k->buffers[b].kind == CM_KBUF_SOURCE)
        return pr->be->buffer(pr, i, b);
  }
  return NULL;
}

const void *cm_program_value(const cm_program *pr, int id) {
  if (id < 0 || id >= pr->rg->n_nodes) return NULL;
  const cm_node *n = &pr->rg->nodes[id];
  int src = is_source(n) ? id : n->op == CM_OP_ASSIGN ? n->inputs[0] : -1;
  /* a device backend (one that uploads) holds a source's current value on the device */
  if (src >= 0 && pr->runnable && pr->be->upload) {
    const void *dev = source_on_device(pr, src);
    if (dev) return dev;
  }
  if (src >= 0) return pr->src_ptr[src];
  if (!pr->runnable) return NULL;
  /* the arena buffer of the kernel that writes it */
  for (int i = 0; i < pr->kp.n_kernels; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    for (int b = 0; b < k->n_buffers; b++)
      if (k->buffers[b].node == id && k->buffers[b].kind == CM_KBUF_ARENA && k->buffers[b].written)
        return pr->be->buffer(pr, i, b);
  }
  return NULL;
}

/* The oracle's error (cm_index_error) for a failed check, naming the node of
 * the graph given to cm_compile when the optimized graph kept it (by name). */
cm_status cm_program_index_error(const cm_program *pr, int v, int64_t index, int64_t pos,
                                 cm_err *err) {
  const cm_graph *rg = pr->rg, *g = pr->g;
  const cm_node *n = &rg->nodes[v];
  const cm_type *data = &rg->nodes[n->inputs[0]].type;
  int axis = n->attrs.axis < 0 ? n->attrs.axis + data->rank : n->attrs.axis;
  int id = cm_graph_find(g, n->name);
  if (id >= 0 &&
      (g->nodes[id].op != n->op || g->nodes[id].n_inputs != n->n_inputs ||
       !cm_type_equal(&g->nodes[g->nodes[id].inputs[1]].type, &rg->nodes[n->inputs[1]].type)))
    id = -1;
  return cm_index_error(err, id >= 0 ? g : rg, id >= 0 ? id : v, index, pos, data->dims[axis]);
}

/* Points the program at every source it reads, checking each is given with its node's type. */
static cm_status bind_sources(cm_program *pr, cm_tensor *const *sources, cm_err *err) {
  if (!pr->runnable && pr->target.kind == CM_TARGET_CPU && !pr->target.cpu.runnable)
    return cm_cpu_target_not_runnable(&pr->target.cpu, "cpu backend", err);
  if (!pr->runnable)
    return cm_errorf(err, CM_EINVALID, "%s backend: the program was compiled only (compile_only)",
                     pr->be->name);
  const cm_graph *rg = pr->rg, *g = pr->g;
  for (int i = 0; i < rg->n_nodes; i++) {
    int o = pr->orig_of[i];
    if (o < 0) continue;
    const cm_node *n = &g->nodes[o];
    const cm_tensor *t = sources ? sources[o] : NULL;
    if (!t || !t->data)
      return cm_errorf(err, CM_EINVALID, "source \"%s\" (%s): not given", n->name,
                       cm_op_get_info(n->op)->name);
    if (!cm_type_equal(&t->type, &n->type)) {
      char a[96], b[96];
      return cm_errorf(err, CM_EINVALID, "source \"%s\": given %s, expected %s", n->name,
                       cm_type_str(&t->type, a, sizeof a), cm_type_str(&n->type, b, sizeof b));
    }
    pr->src_ptr[i] = t->data;
  }
  if (pr->be->upload) return pr->be->upload(pr, err);
  return CM_OK;
}

/* Copies graph output j out of the program into a fresh tensor. */
static cm_status copy_output(const cm_program *pr, int j, cm_tensor *out, cm_err *err) {
  const cm_graph *rg = pr->rg, *g = pr->g;
  const cm_node *on = &g->nodes[g->outputs[j]];
  const cm_node *n = &rg->nodes[pr->out_id[j]];
  const char *src = cm_program_output(pr, j);
  void *tmp = NULL;
  if (!src && n->op == CM_OP_CONST && n->attrs.data) {
    cm_kbuffer kb = {CM_KBUF_CONST, n->type.dtype, cm_type_numel(&n->type), pr->out_id[j], 0, 1, 0};
    tmp = cm_kernel_const_data(rg, &kb, err);
    src = tmp;
  }
  cm_status st = cm_tensor_alloc(out, on->type, err);
  if (st == CM_OK && !src && n->op == CM_OP_CONST && !n->attrs.data) {
    for (int64_t e = 0; e < cm_type_numel(&on->type); e++)
      cm_tensor_set_f64(out, e, n->attrs.value);
  } else if (st == CM_OK && !src) {
    st = cm_errorf(err, CM_EINTERNAL, "output \"%s\": no buffer holds its value", on->name);
  } else if (st == CM_OK) {
    memcpy(out->data, src, cm_type_nbytes(&on->type));
  }
  free(tmp);
  return st;
}

static cm_status not_in_flight(const cm_program *pr, const char *what, cm_err *err) {
  if (!pr->in_flight) return CM_OK;
  return cm_errorf(err, CM_EINVALID,
                   "%s: the run started before is not finished "
                   "(cm_program_finish first)",
                   what);
}

cm_status cm_program_start(cm_program *pr, cm_tensor *const *sources, cm_err *err) {
  cm_status st = not_in_flight(pr, "cm_program_start", err);
  if (st == CM_OK) st = bind_sources(pr, sources, err);
  if (st != CM_OK) return st;
  st = pr->be->run(pr, 0, pr->kp.n_kernels, err);
  /* a synchronous backend's run has finished (its index error included) */
  pr->in_flight = st == CM_OK && pr->be->finish;
  return st;
}

cm_status cm_program_finish(cm_program *pr, cm_tensor *outputs, cm_err *err) {
  cm_status st;
  bool was = pr->in_flight;
  pr->in_flight = false;
  if (was && (st = pr->be->finish(pr, err)) != CM_OK) return st;
  if (pr->be->download && (st = pr->be->download(pr, err)) != CM_OK) return st;
  if (!outputs) return CM_OK;
  const cm_graph *g = pr->g;
  for (int j = 0; j < g->n_outputs; j++) memset(&outputs[j], 0, sizeof outputs[j]);
  for (int j = 0; j < g->n_outputs; j++) {
    st = copy_output(pr, j, &outputs[j], err);
    if (st != CM_OK) {
      for (int q = 0; q <= j; q++) cm_tensor_free(&outputs[q]);
      return st;
    }
  }
  return CM_OK;
}

cm_status cm_program_run(cm_program *pr, cm_tensor *const *sources, cm_tensor *outputs,
                         cm_err *err) {
  cm_status st = cm_program_start(pr, sources, err);
  if (st != CM_OK) return st;
  return cm_program_finish(pr, outputs, err);
}

cm_status cm_program_run_stepwise(cm_program *pr, cm_tensor *const *sources, cm_program_visit visit,
                                  void *ctx, cm_err *err) {
  cm_status st = not_in_flight(pr, "cm_program_run_stepwise", err);
  if (st == CM_OK) st = bind_sources(pr, sources, err);
  for (int k = 0; st == CM_OK && k <= pr->kp.n_kernels; k++) {
    if ((st = visit(pr, k, ctx, err)) != CM_OK || k == pr->kp.n_kernels) break;
    if ((st = pr->be->run(pr, k, k + 1, err)) == CM_OK && pr->be->finish)
      st = pr->be->finish(pr, err);
  }
  if (st == CM_OK && pr->be->download) st = pr->be->download(pr, err);
  return st;
}

cm_status cm_program_prefetch(cm_program *pr, cm_tensor *const *sources, cm_err *err) {
  if (!pr->be->prefetch) return CM_OK;
  if (!pr->runnable)
    return cm_errorf(err, CM_EINVALID, "%s backend: the program was compiled only (compile_only)",
                     pr->be->name);
  /* the next run's inputs, checked as cm_program_start checks them, by node of the
   * program's graph; the sources of the run going on stay bound */
  const cm_graph *rg = pr->rg, *g = pr->g;
  cm_tensor **next = calloc((size_t)rg->n_nodes + 1, sizeof *next);
  if (!next) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  cm_status st = CM_OK;
  for (int i = 0; i < rg->n_nodes && st == CM_OK; i++) {
    int o = pr->orig_of[i];
    if (o < 0 || rg->nodes[i].op != CM_OP_INPUT) continue;
    const cm_node *n = &g->nodes[o];
    cm_tensor *t = sources ? sources[o] : NULL;
    if (!t || !t->data)
      st = cm_errorf(err, CM_EINVALID, "cm_program_prefetch: input \"%s\": not given", n->name);
    else if (!cm_type_equal(&t->type, &n->type))
      st = cm_errorf(err, CM_EINVALID, "cm_program_prefetch: input \"%s\": not of its type",
                     n->name);
    next[i] = t;
  }
  if (st == CM_OK) st = pr->be->prefetch(pr, next, err);
  free(next);
  return st;
}

cm_status cm_program_states_download(cm_program *pr, cm_err *err) {
  if (!pr->be->states_download) return CM_OK;
  return pr->be->states_download(pr, err);
}

void cm_program_states_changed(cm_program *pr) {
  if (pr->be->states_changed) pr->be->states_changed(pr);
}

void cm_program_stats_get(const cm_program *pr, cm_program_stats *out) {
  *out = pr->stats;
}

int cm_program_profile(const cm_program *pr, const cm_kernel_profile **out) {
  *out = NULL;
  return pr->be->profile ? pr->be->profile(pr, out) : 0;
}

int cm_program_stage_profile(const cm_program *pr, const cm_stage_profile **out) {
  *out = NULL;
  return pr->be->stage_profile ? pr->be->stage_profile(pr, out) : 0;
}

cm_status cm_program_emit(const cm_program *pr, int k, cm_emit what, FILE *out, cm_err *err) {
  if (k >= pr->kp.n_kernels)
    return cm_errorf(err, CM_EINVALID, "cm_program_emit: kernel %d of %d", k, pr->kp.n_kernels);
  if (what == CM_EMIT_KERNEL_IR) {
    for (int i = k < 0 ? 0 : k; i < (k < 0 ? pr->kp.n_kernels : k + 1); i++)
      cm_kernel_print(&pr->kp.kernels[i], out);
    return CM_OK;
  }
  if (!pr->be->emit)
    return cm_errorf(err, CM_EINVALID, "%s backend: nothing to emit", pr->be->name);
  return pr->be->emit(pr, k, what, out, err);
}

/* ---- diagnosis: the first non-finite value of a run ------------------------ */

/* The first non-finite element of n values of dtype at p, or -1 (-1 too for a
 * non-float dtype). */
static int64_t first_nonfinite_elem(cm_dtype dtype, const void *p, int64_t n, double *value) {
  if (!p || !cm_dtype_is_float(dtype)) return -1;
  cm_tensor view = {{dtype, 1, {n}}, (void *)p};
  for (int64_t e = 0; e < n; e++) {
    double v = cm_tensor_get_f64(&view, e);
    if (!isfinite(v)) {
      *value = v;
      return e;
    }
  }
  return -1;
}

static void describe(const cm_graph *g, int id, const char *kernel, int64_t index, double value,
                     cm_nonfinite *out) {
  const cm_node *n = &g->nodes[id];
  out->found = true;
  snprintf(out->tensor, sizeof out->tensor, "%s", n->name);
  out->op = cm_op_get_info(n->op)->name;
  snprintf(out->kernel, sizeof out->kernel, "%s", kernel);
  size_t used = 0;
  out->inputs[0] = '\0';
  for (int k = 0; k < n->n_inputs && used + 8 < sizeof out->inputs; k++)
    used += (size_t)snprintf(out->inputs + used, sizeof out->inputs - used, "%s%s", k ? ", " : "",
                             g->nodes[n->inputs[k]].name);
  out->index = index;
  out->value = value;
}

cm_status cm_program_first_nonfinite(cm_program *pr, cm_tensor *const *sources, cm_nonfinite *out,
                                     cm_err *err) {
  memset(out, 0, sizeof *out);
  out->index = -1;
  const cm_graph *rg = pr->rg, *g = pr->g;
  /* the sources, in graph order */
  cm_status st = not_in_flight(pr, "cm_program_first_nonfinite", err);
  if (st == CM_OK) st = bind_sources(pr, sources, err);
  if (st != CM_OK) return st;
  for (int i = 0; i < rg->n_nodes; i++) {
    if (pr->orig_of[i] < 0) continue;
    double v;
    int64_t e = first_nonfinite_elem(rg->nodes[i].type.dtype, pr->src_ptr[i],
                                     cm_type_numel(&rg->nodes[i].type), &v);
    if (e >= 0) {
      describe(g, pr->orig_of[i], "", e, v, out);
      return CM_OK;
    }
  }
  /* then each kernel's outputs as it runs: within a kernel, the earliest node wins */
  for (int i = 0; i < pr->kp.n_kernels; i++) {
    const cm_kernel *k = &pr->kp.kernels[i];
    if ((st = pr->be->run(pr, i, i + 1, err)) != CM_OK) return st;
    if (pr->be->finish && (st = pr->be->finish(pr, err)) != CM_OK) return st;
    int best = -1;
    int64_t best_e = -1;
    double best_v = 0;
    for (int b = 0; b < k->n_buffers; b++) {
      const cm_kbuffer *kb = &k->buffers[b];
      if (!kb->written || (kb->kind != CM_KBUF_ARENA && kb->kind != CM_KBUF_SOURCE)) continue;
      /* a written source is a state's new value: named by the assign that writes it */
      int producer = kb->node;
      for (int q = 0; kb->kind == CM_KBUF_SOURCE && q < rg->n_nodes; q++)
        if (rg->nodes[q].op == CM_OP_ASSIGN && rg->nodes[q].inputs[0] == kb->node) producer = q;
      if (producer < 0 || (best >= 0 && producer >= best)) continue;
      double v;
      int64_t e = first_nonfinite_elem(kb->dtype, pr->be->buffer(pr, i, b), kb->numel, &v);
      if (e >= 0) {
        best = producer;
        best_e = e;
        best_v = v;
      }
    }
    if (best >= 0) {
      describe(rg, best, k->name, best_e, best_v, out);
      if (pr->be->download) return pr->be->download(pr, err);
      return CM_OK;
    }
  }
  if (pr->be->download) return pr->be->download(pr, err);
  return CM_OK;
}
