/* runtime/features.c — the frozen online encoder as a feature extractor,
 * reconstruction pictures and the encoder export (docs/evaluation.md). */
#include "training.h"

#include "../models/models.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the config of a checkpoint ------------------------------------------- */

/* Applies every member of a (possibly nested) JSON object as "key=value". */
static cm_status apply_json(cm_model_config *c, const cJSON *obj, const char *prefix, cm_err *err) {
  for (const cJSON *m = obj->child; m; m = m->next) {
    char key[256];
    snprintf(key, sizeof key, "%s%s%s", prefix, *prefix ? "." : "", m->string ? m->string : "");
    if (strcmp(key, "extends") == 0) continue;
    if (cJSON_IsObject(m)) {
      cm_status st = apply_json(c, m, key, err);
      if (st) return st;
      continue;
    }
    char *value = cJSON_PrintUnformatted(m);
    if (!value) return cm_errorf(err, CM_EINTERNAL, "config JSON: out of memory");
    size_t len = strlen(key) + strlen(value) + 2;
    char *assignment = malloc(len);
    if (!assignment) {
      free(value);
      return cm_errorf(err, CM_EINTERNAL, "config JSON: out of memory");
    }
    snprintf(assignment, len, "%s=%s", key, value);
    cm_status st = cm_model_config_set(c, assignment, err);
    free(assignment);
    free(value);
    if (st) return st;
  }
  return CM_OK;
}

cm_status cm_model_config_from_json_text(const char *json, cm_model_config *out, cm_err *err) {
  if (!json) return cm_errorf(err, CM_EINVALID, "config JSON: none");
  cJSON *root = cJSON_Parse(json);
  if (!root || !cJSON_IsObject(root)) {
    cJSON_Delete(root);
    return cm_errorf(err, CM_EINVALID, "config JSON: not a JSON object");
  }
  cm_model_config c;
  cm_model_config_default(&c);
  cm_status st = apply_json(&c, root, "", err);
  cJSON_Delete(root);
  if (!st) st = cm_model_config_validate(&c, err);
  if (st) {
    cm_err_prefix(err, "config JSON: ");
    return st;
  }
  *out = c;
  return CM_OK;
}

/* ---- binding sources ------------------------------------------------------- */

static bool same_type(cm_type a, cm_type b) {
  if (a.dtype != b.dtype || a.rank != b.rank) return false;
  for (int i = 0; i < a.rank; i++)
    if (a.dims[i] != b.dims[i]) return false;
  return true;
}

static bool same_shape(cm_type a, cm_type b) {
  if (a.rank != b.rank) return false;
  for (int i = 0; i < a.rank; i++)
    if (a.dims[i] != b.dims[i]) return false;
  return true;
}

/* Fills src[i] for every param/state node of g from params (NULL: init).
 * A float tensor of another dtype is converted (a checkpoint may be f64). */
static cm_status bind_params(const cm_graph *g, const cm_tensor_set *params, uint64_t seed,
                             cm_tensor *src, cm_err *err) {
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *nd = &g->nodes[i];
    if (nd->op != CM_OP_PARAM && nd->op != CM_OP_STATE) continue;
    cm_status st = cm_tensor_alloc(&src[i], nd->type, err);
    if (st) return st;
    if (!params) {
      if ((st = cm_init_tensor(&src[i], &nd->attrs.init, seed, nd->name, err))) return st;
      continue;
    }
    const cm_tensor *t = cm_tensor_set_get(params, nd->name);
    if (!t)
      return cm_errorf(err, CM_EINVALID, "checkpoint has no tensor \"%s\" (a param of the model)",
                       nd->name);
    if (!same_shape(t->type, nd->type) || !cm_dtype_is_float(t->type.dtype))
      return cm_errorf(err, CM_EINVALID,
                       "checkpoint tensor \"%s\": %s of rank %d does not match the param's %s "
                       "shape of rank %d",
                       nd->name, cm_dtype_name(t->type.dtype), t->type.rank,
                       cm_dtype_name(nd->type.dtype), nd->type.rank);
    int64_t n = cm_type_numel(&nd->type);
    if (same_type(t->type, nd->type))
      memcpy(src[i].data, t->data, (size_t)n * cm_dtype_size(nd->type.dtype));
    else
      for (int64_t k = 0; k < n; k++) cm_tensor_set_f64(&src[i], k, cm_tensor_get_f64(t, k));
  }
  return CM_OK;
}

/* ---- the encoder ------------------------------------------------------------ */

struct cm_encoder {
  cm_graph *g;
  int img, out, dim, batch;
  cm_tensor *src;            /* per node: bound sources */
  const cm_tensor **cs;      /* per node: pointers for cm_eval / export */
  cm_tensor **ms;            /* per node: mutable pointers for the CPU executor */
  cm_program *pr;            /* NULL: reference evaluator */
  cm_backend_choice backend; /* what pr was compiled for (outlives it) */
  char fallback[256];        /* why the CPU executor is not used ("" when asked for ref) */
};

static bool is_vit(const cm_model_config *cfg) {
  return strcmp(cfg->arch, "vit") == 0;
}

void cm_encoder_free(cm_encoder *e) {
  if (!e) return;
  if (e->pr) cm_program_free(e->pr);
  if (e->src && e->g)
    for (int i = 0; i < e->g->n_nodes; i++) cm_tensor_free(&e->src[i]);
  free(e->src);
  free(e->cs);
  free(e->ms);
  cm_graph_free(e->g);
  free(e);
}

static cm_status build_encoder_graph(const cm_model_config *cfg, int batch, cm_pool pool,
                                     cm_encoder *e, cm_err *err) {
  bool vit = is_vit(cfg);
  if (!vit && strcmp(cfg->arch, "convvit") != 0)
    return cm_errorf(err, CM_EINVALID, "encoder: arch \"%.16s\" is not \"vit\" or \"convvit\"",
                     cfg->arch);
  if (pool == CM_POOL_CLS && !vit)
    return cm_errorf(err, CM_EINVALID,
                     "encoder: pool cls needs a cls token; arch \"%.16s\" has none (use mean)",
                     cfg->arch);
  cm_graph *g = e->g = cm_graph_new();
  if (!g) return cm_errorf(err, CM_EINTERNAL, "encoder: out of memory");
  int S = cfg->data.image_size;
  int64_t dims[4] = {batch, cfg->data.in_chans, S, S};
  e->img = cm_input(g, "img", CM_F32, 4, dims);
  int lat = vit ? cm_vit_encoder(g, cfg, e->img, -1, cfg->encoder.final_norm, "backbone")
                : cm_convvit_encoder(g, cfg, e->img, -1, -1, true, "backbone");
  if (cm_graph_error(g)) return cm_errorf(err, g->error.status, "encoder: %s", cm_graph_error(g));
  cm_type tl = g->nodes[lat].type;
  int pooled, axis = 1;
  if (pool == CM_POOL_CLS) {
    int64_t start[3] = {0, 0, 0}, stop[3] = {tl.dims[0], 1, tl.dims[2]};
    int cls = cm_slice(g, lat, start, stop, NULL, NULL);
    pooled = cm_nn_mean(g, cls, 1, &axis, false);
  } else {
    int tokens = lat;
    if (vit) {
      int64_t start[3] = {0, 1, 0}, stop[3] = {tl.dims[0], tl.dims[1], tl.dims[2]};
      tokens = cm_slice(g, lat, start, stop, NULL, NULL);
    }
    pooled = cm_nn_mean(g, tokens, 1, &axis, false);
  }
  if (pooled >= 0) {
    cm_type tp = g->nodes[pooled].type;
    pooled = cm_reshape(g, pooled, tp.rank, tp.dims, "features");
  }
  if (cm_graph_error(g)) return cm_errorf(err, g->error.status, "encoder: %s", cm_graph_error(g));
  cm_err e2 = {0};
  if (cm_graph_add_output(g, pooled, &e2) || cm_graph_verify(g, &e2))
    return cm_errorf(err, e2.status ? e2.status : CM_EINTERNAL, "encoder: %s", e2.msg);
  e->out = pooled;
  e->dim = (int)g->nodes[pooled].type.dims[1];
  return CM_OK;
}

cm_status cm_encoder_create(const cm_model_config *cfg, const cm_tensor_set *params,
                            const cm_encoder_opts *opts, cm_encoder **out, cm_err *err) {
  *out = NULL;
  if (!cfg || !opts || opts->batch < 1)
    return cm_errorf(err, CM_EINVALID, "encoder: needs a config and a batch >= 1");
  cm_encoder *e = calloc(1, sizeof *e);
  if (!e) return cm_errorf(err, CM_EINTERNAL, "encoder: out of memory");
  e->batch = opts->batch;
  cm_status st = build_encoder_graph(cfg, opts->batch, opts->pool, e, err);
  if (!st) {
    int nn = e->g->n_nodes;
    e->src = calloc((size_t)nn, sizeof *e->src);
    e->cs = calloc((size_t)nn, sizeof *e->cs);
    e->ms = calloc((size_t)nn, sizeof *e->ms);
    if (!e->src || !e->cs || !e->ms) st = cm_errorf(err, CM_EINTERNAL, "encoder: out of memory");
  }
  if (!st) st = bind_params(e->g, params, opts->seed, e->src, err);
  if (!st) st = cm_tensor_alloc(&e->src[e->img], e->g->nodes[e->img].type, err);
  if (st) {
    cm_encoder_free(e);
    return st;
  }
  for (int i = 0; i < e->g->n_nodes; i++)
    if (e->src[i].data) e->cs[i] = e->ms[i] = &e->src[i];
  if (opts->backend) {
    e->backend = *opts->backend;
  } else {
    e->backend.kind = opts->reference ? CM_BACKEND_REF : CM_BACKEND_CPU;
    cm_target_host(&e->backend.target);
    snprintf(e->backend.description, sizeof e->backend.description, "%s",
             opts->reference ? "ref" : "cpu");
  }
  if (!opts->reference && e->backend.kind != CM_BACKEND_REF) {
    cm_err ce = {0};
    cm_compile_opts co = {0};
    co.resident_states = true; /* the params stay on a device between batches */
    const cm_target *target = cm_backend_compile_opts(&e->backend, &co);
    /* A CPU executor that cannot build this graph (not there yet) is not fatal:
     * the reference evaluator computes the same features, slower. A GPU asked
     * for is not replaced. */
    if (cm_compile(e->g, target, &co, &e->pr, &ce)) {
      e->pr = NULL;
      if (e->backend.kind == CM_BACKEND_CUDA) {
        *err = ce;
        cm_encoder_free(e);
        return cm_err_prefix(err, "encoder on cuda: ");
      }
      snprintf(e->fallback, sizeof e->fallback, "%s", ce.msg);
    }
  }
  *out = e;
  return CM_OK;
}

int cm_encoder_dim(const cm_encoder *e) {
  return e->dim;
}
const cm_graph *cm_encoder_graph(const cm_encoder *e) {
  return e->g;
}
const cm_tensor *const *cm_encoder_params(const cm_encoder *e) {
  return e->cs;
}
bool cm_encoder_uses_reference(const cm_encoder *e) {
  return e->pr == NULL;
}
const char *cm_encoder_backend(const cm_encoder *e) {
  return e->pr ? e->backend.description : "ref";
}
const char *cm_encoder_fallback_reason(const cm_encoder *e) {
  return e->fallback[0] ? e->fallback : NULL;
}

/* One batch on the reference evaluator with its own input tensor, so that
 * threads can run batches side by side (cm_eval only reads the sources). */
static cm_status run_reference(const cm_encoder *e, cm_tensor *in, cm_tensor *result, cm_err *err) {
  int nn = e->g->n_nodes;
  cm_tensor *values = calloc((size_t)nn, sizeof *values);
  const cm_tensor **cs = malloc(sizeof *cs * (size_t)nn);
  if (!values || !cs) {
    free(values);
    free(cs);
    return cm_errorf(err, CM_EINTERNAL, "encoder: out of memory");
  }
  memcpy(cs, e->cs, sizeof *cs * (size_t)nn);
  cs[e->img] = in;
  cm_status st = cm_eval(e->g, cs, values, NULL, err);
  if (!st) {
    *result = values[e->out];
    values[e->out].data = NULL;
    for (int i = 0; i < nn; i++) cm_tensor_free(&values[i]);
  }
  free(values);
  free(cs);
  return st;
}

static cm_status run_batch(cm_encoder *e, cm_tensor *in, const float *img, int n, float *out,
                           cm_err *err) {
  if (n < 1 || n > e->batch)
    return cm_errorf(err, CM_EINVALID, "encoder: %d images for a batch of %d", n, e->batch);
  int64_t per = cm_type_numel(&in->type) / e->batch;
  memcpy(in->data, img, sizeof(float) * (size_t)(per * n));
  memset((float *)in->data + per * n, 0, sizeof(float) * (size_t)(per * (e->batch - n)));
  cm_tensor result = {0};
  cm_status st;
  if (e->pr) {
    e->ms[e->img] = in;
    st = cm_program_run(e->pr, e->ms, &result, err);
    e->ms[e->img] = &e->src[e->img];
  } else {
    st = run_reference(e, in, &result, err);
  }
  if (st) return st;
  memcpy(out, result.data, sizeof(float) * (size_t)n * (size_t)e->dim);
  cm_tensor_free(&result);
  return CM_OK;
}

cm_status cm_encoder_run(cm_encoder *e, const float *img, int n, float *out, cm_err *err) {
  return run_batch(e, &e->src[e->img], img, n, out, err);
}

/* Reference runs of a whole array: batches handed out to worker threads. */
typedef struct feature_job {
  cm_encoder *e;
  const float *views;
  float *feats;
  int64_t n, next, per;
  pthread_mutex_t mu;
  cm_status st;
  cm_err err;
} feature_job;

static void *feature_worker(void *arg) {
  feature_job *j = arg;
  cm_tensor in = {0};
  cm_err err = {0};
  cm_status st = cm_tensor_alloc(&in, j->e->g->nodes[j->e->img].type, &err);
  for (;;) {
    pthread_mutex_lock(&j->mu);
    if (st && !j->st) {
      j->st = st;
      j->err = err;
    }
    int64_t i = j->next;
    j->next += j->e->batch;
    bool stop = j->st || i >= j->n;
    pthread_mutex_unlock(&j->mu);
    if (stop) break;
    int b = (int)(j->n - i < j->e->batch ? j->n - i : j->e->batch);
    st = run_batch(j->e, &in, j->views + i * j->per, b, j->feats + i * j->e->dim, &err);
  }
  cm_tensor_free(&in);
  return NULL;
}

/* Threads for the reference evaluator: $CMAEC_THREADS, else the online CPUs. */
static int reference_threads(int64_t batches) {
  const char *env = getenv("CMAEC_THREADS");
  long t = env && atol(env) > 0 ? atol(env) : sysconf(_SC_NPROCESSORS_ONLN);
  if (t < 1) t = 1;
  if (t > 64) t = 64;
  return (int)(t < batches ? t : batches);
}

cm_status cm_encoder_features(cm_encoder *e, const float *views, int64_t n, float **feats,
                              cm_err *err) {
  *feats = NULL;
  int64_t per = cm_type_numel(&e->g->nodes[e->img].type) / e->batch;
  float *f = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * (size_t)e->dim);
  if (!f) return cm_errorf(err, CM_EINTERNAL, "features: out of memory");
  int64_t batches = (n + e->batch - 1) / e->batch;
  int threads = e->pr ? 1 : reference_threads(batches);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; i += e->batch) {
      int b = (int)(n - i < e->batch ? n - i : e->batch);
      cm_status st = cm_encoder_run(e, views + i * per, b, f + i * e->dim, err);
      if (st) {
        free(f);
        return st;
      }
    }
    *feats = f;
    return CM_OK;
  }
  feature_job j = {.e = e, .views = views, .feats = f, .n = n, .per = per};
  pthread_mutex_init(&j.mu, NULL);
  pthread_t tid[64];
  int started = 0;
  for (int t = 0; t < threads; t++)
    if (pthread_create(&tid[started], NULL, feature_worker, &j) == 0) started++;
  if (started == 0) feature_worker(&j);
  for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
  pthread_mutex_destroy(&j.mu);
  if (j.st) {
    free(f);
    if (err) *err = j.err;
    return j.st;
  }
  *feats = f;
  return CM_OK;
}

/* ---- eval views ------------------------------------------------------------- */

cm_status cm_eval_views(const cm_dataset *d, const cm_model_config *cfg, int64_t limit,
                        float **views, int32_t **labels, int64_t *n, cm_err *err) {
  *views = NULL;
  *labels = NULL;
  *n = 0;
  cm_views_opts o;
  cm_views_opts_from_config(cfg, &o);
  o.mode = CM_VIEWS_EVAL;
  o.mask = false;
  cm_status st = cm_views_check(&o, err);
  if (st) return st;
  if (cm_dataset_channels(d) != o.in_chans)
    return cm_errorf(err, CM_EINVALID,
                     "eval views: the dataset has %d channels, the variant's data.in_chans is %d",
                     cm_dataset_channels(d), o.in_chans);
  int64_t total = cm_dataset_size(d);
  int64_t count = limit > 0 && limit < total ? limit : total;
  int64_t per = (int64_t)o.in_chans * o.image_size * o.image_size;
  float *v = malloc(sizeof(float) * (size_t)(count > 0 ? count : 1) * (size_t)per);
  int32_t *lab = malloc(sizeof(int32_t) * (size_t)(count > 0 ? count : 1));
  if (!v || !lab) {
    free(v);
    free(lab);
    return cm_errorf(err, CM_EINTERNAL, "eval views: out of memory");
  }
  for (int64_t i = 0; i < count; i++) {
    cm_image im = {0};
    if ((st = cm_dataset_get(d, i, &im, err))) break;
    cm_views_out vo;
    memset(&vo, 0, sizeof vo);
    vo.img = v + i * per;
    st = cm_views_sample(&o, &im, 0, 0, i, &vo, err);
    cm_image_free(&im);
    if (st) break;
    lab[i] = cm_dataset_label(d, i);
  }
  if (st) {
    free(v);
    free(lab);
    return st;
  }
  *views = v;
  *labels = lab;
  *n = count;
  return CM_OK;
}

/* ---- reconstruction ----------------------------------------------------------- */

cm_status cm_reconstruct(const cm_model_config *cfg, const cm_tensor_set *params,
                         const float *views, int n, uint64_t seed, float *out_masked,
                         float *out_recon, cm_err *err) {
  if (n < 1) return cm_errorf(err, CM_EINVALID, "recon: %d images (need >= 1)", n);
  int batch = cfg->contrastive && n < 2 ? 2 : n; /* BatchNorm in training mode needs 2 */
  cm_model_build_opts bo = {.batch = batch, .ranks = 1, .dtype = CM_F32};
  cm_model m;
  cm_status st = cm_model_build(cfg, &bo, &m, err);
  if (st) return st;
  cm_graph *g = m.g;
  int diff = cm_graph_find(g, "loss_rc/diff");
  if (diff < 0 || g->nodes[diff].n_inputs < 1) {
    cm_model_free(&m);
    return cm_errorf(err, CM_EINTERNAL, "recon: no node \"loss_rc/diff\" in the model graph");
  }
  int pred = g->nodes[diff].inputs[0];
  cm_err e2 = {0};
  if (cm_graph_add_output(g, pred, &e2)) {
    cm_model_free(&m);
    return cm_errorf(err, e2.status, "recon: %s", e2.msg);
  }
  int C = cfg->data.in_chans, S = cfg->data.image_size, p = cfg->encoder.patch, grid = S / p;
  int L = m.n_tokens, K = m.n_keep, P = p * p * C;
  int64_t per = (int64_t)C * S * S;
  int nn = g->n_nodes;
  cm_tensor *src = calloc((size_t)nn, sizeof *src), *values = calloc((size_t)nn, sizeof *values);
  const cm_tensor **cs = calloc((size_t)nn, sizeof *cs);
  float *mask_all = malloc(sizeof(float) * (size_t)batch * (size_t)L);
  double *u = malloc(sizeof(double) * (size_t)L);
  if (!src || !values || !cs || !mask_all || !u) {
    st = cm_errorf(err, CM_EINTERNAL, "recon: out of memory");
    goto done;
  }
  if ((st = bind_params(g, params, 0, src, err))) goto done;
  int ins[5] = {m.img, m.img_t, m.ids_keep, m.ids_restore, m.mask};
  for (int k = 0; k < 5; k++)
    if (ins[k] >= 0 && (st = cm_tensor_alloc(&src[ins[k]], g->nodes[ins[k]].type, err))) goto done;
  for (int b = 0; b < batch; b++) {
    int s = b < n ? b : n - 1;
    memcpy((float *)src[m.img].data + b * per, views + s * per, sizeof(float) * (size_t)per);
    if (m.img_t >= 0)
      memcpy((float *)src[m.img_t].data + b * per, views + s * per, sizeof(float) * (size_t)per);
    int n_noise = cm_mask_noise_count(cfg->mask.kind, cfg->mask.block, grid);
    for (int j = 0; j < n_noise; j++) {
      uint32_t bits[4];
      cm_philox(seed, (uint64_t)s, (uint64_t)j, bits);
      u[j] = cm_uniform01(bits[0]);
    }
    int kept = cm_mask_sample(cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid, u,
                              (int32_t *)src[m.ids_keep].data + b * K,
                              (int32_t *)src[m.ids_restore].data + b * L, mask_all + b * L);
    if (kept != K) {
      st = cm_errorf(err, CM_EINTERNAL, "recon: the mask keeps %d tokens, the model %d", kept, K);
      goto done;
    }
  }
  memcpy(src[m.mask].data, mask_all, sizeof(float) * (size_t)batch * (size_t)L);
  for (int i = 0; i < nn; i++)
    if (src[i].data) cs[i] = &src[i];
  if ((st = cm_eval(g, cs, values, NULL, err))) goto done;
  const float *pv = values[pred].data; /* [batch, L, P] */
  for (int b = 0; b < n; b++) {
    const float *img = views + b * per;
    for (int t = 0; t < L; t++) {
      int ty = t / grid, tx = t % grid;
      bool masked = mask_all[b * L + t] > 0.5f;
      double mean = 0, var = 0;
      for (int q = 0; q < P; q++) {
        int c = q % C, py = (q / C) / p, px = (q / C) % p;
        mean += img[((int64_t)c * S + ty * p + py) * S + tx * p + px];
      }
      mean /= P;
      for (int q = 0; q < P; q++) {
        int c = q % C, py = (q / C) / p, px = (q / C) % p;
        double dv = img[((int64_t)c * S + ty * p + py) * S + tx * p + px] - mean;
        var += dv * dv;
      }
      var = P > 1 ? var / (P - 1) : var; /* torch.var, unbiased, as the loss */
      double sd = sqrt(var + cfg->loss.norm_pix_eps);
      for (int q = 0; q < P; q++) {
        int c = q % C, py = (q / C) / p, px = (q / C) % p;
        int64_t at = ((int64_t)c * S + ty * p + py) * S + tx * p + px;
        double pr = pv[((int64_t)b * L + t) * P + q];
        if (cfg->loss.norm_pix) pr = pr * sd + mean;
        out_masked[b * per + at] = masked ? 0.0f : img[at];
        out_recon[b * per + at] = masked ? (float)pr : img[at];
      }
    }
  }
done:
  if (src)
    for (int i = 0; i < nn; i++) cm_tensor_free(&src[i]);
  if (values)
    for (int i = 0; i < nn; i++) cm_tensor_free(&values[i]);
  free(src);
  free(values);
  free(cs);
  free(mask_all);
  free(u);
  cm_model_free(&m);
  return st;
}

/* ---- export ----------------------------------------------------------------------- */

/* "backbone.X" -> the timm/MAE name of X, or false when X is not an encoder key. */
static bool official_name(const char *name, char *out, size_t size) {
  static const struct {
    const char *from, *to;
  } parts[] = {{"patch_embed.projection.", "patch_embed.proj."},
               {"ln1.", "norm1."},
               {"ln2.", "norm2."},
               {"ffn.layers.0.0.", "mlp.fc1."},
               {"ffn.layers.1.", "mlp.fc2."}};
  const char *pre = "backbone.";
  if (strncmp(name, pre, strlen(pre)) != 0) return false;
  const char *rest = name + strlen(pre);
  if (strncmp(rest, "ln1.", 4) == 0) return snprintf(out, size, "norm.%s", rest + 4) < (int)size;
  int layer, used = 0;
  if (sscanf(rest, "layers.%d.%n", &layer, &used) == 1 && used > 0) {
    const char *tail = rest + used;
    for (size_t k = 1; k < sizeof parts / sizeof parts[0]; k++)
      if (strncmp(tail, parts[k].from, strlen(parts[k].from)) == 0)
        return snprintf(out, size, "blocks.%d.%s%s", layer, parts[k].to,
                        tail + strlen(parts[k].from)) < (int)size;
    return snprintf(out, size, "blocks.%d.%s", layer, tail) < (int)size;
  }
  if (strncmp(rest, parts[0].from, strlen(parts[0].from)) == 0)
    return snprintf(out, size, "%s%s", parts[0].to, rest + strlen(parts[0].from)) < (int)size;
  return snprintf(out, size, "%s", rest) < (int)size;
}

cm_status cm_encoder_export(const cm_model_config *cfg, const cm_tensor_set *params,
                            cm_tensor_set *out, cm_err *err) {
  cm_tensor_set_init(out);
  if (!is_vit(cfg))
    return cm_errorf(err, CM_EINVALID,
                     "export: arch \"%.16s\" is not supported (the encoder export is for ViT "
                     "variants only)",
                     cfg->arch);
  cm_encoder *e = NULL;
  cm_encoder_opts eo = {.batch = 1, .pool = CM_POOL_MEAN, .reference = true};
  cm_status st = cm_encoder_create(cfg, params, &eo, &e, err);
  if (st) return st;
  const cm_graph *g = e->g;
  for (int i = 0; i < g->n_nodes && !st; i++) {
    const cm_node *nd = &g->nodes[i];
    if (nd->op != CM_OP_PARAM && nd->op != CM_OP_STATE) continue;
    char name[256];
    if (!official_name(nd->name, name, sizeof name)) {
      st = cm_errorf(err, CM_EINTERNAL, "export: param \"%s\" has no official name", nd->name);
      break;
    }
    cm_tensor t = {0};
    cm_type ty = nd->type;
    ty.dtype = CM_F32;
    if ((st = cm_tensor_alloc(&t, ty, err))) break;
    int64_t n = cm_type_numel(&ty);
    for (int64_t k = 0; k < n; k++) cm_tensor_set_f64(&t, k, cm_tensor_get_f64(&e->src[i], k));
    st = cm_tensor_set_take(out, name, &t, err);
    cm_tensor_free(&t);
  }
  cm_encoder_free(e);
  char *json = st ? NULL : cm_model_config_to_json(cfg);
  if (!st && !json) st = cm_errorf(err, CM_EINTERNAL, "export: out of memory");
  if (!st) st = cm_tensor_set_meta(out, "variant", cfg->name, err);
  if (!st) st = cm_tensor_set_meta(out, "arch", cfg->arch, err);
  if (!st) st = cm_tensor_set_meta(out, "config", json, err);
  free(json);
  if (st) cm_tensor_set_free(out);
  return st;
}
