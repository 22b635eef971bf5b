/* tests/unit/test_cmae_reference.c — cmaec's CMAE losses and gradients
 * against an independent JAX implementation written from CMAE.md
 * (tests/reference/cmae_reference.py).
 *
 * Tiny ViT and ConvViT variants (configs built here from the defaults, so no
 * shipped file matters) are built in f64, their params initialized and then
 * perturbed (so LN/BN weights are not 1 and biases not 0), images random and
 * masks from cm_mask_sample. The oracle evaluates the losses and the autodiff
 * gradients of loss with respect to every trained param; the script recomputes
 * them with jax.value_and_grad and must agree to 1e-5 (norm-wise per tensor).
 * The target branch is checked both as at step 0 (target = copy of online) and
 * with its own random params. A corrupted gradient must make the script fail.
 * python3 with jax, safetensors and numpy is a test dependency (CI installs
 * them): without them this test fails rather than skips. CMAE_REFERENCE_KEEP=1
 * keeps the exported files and prints the script's command lines. */
#include "models/models.h"
#include "passes/passes.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

static test_rng rng_state = {0x2545f4914f6cdd1dull};
static double uniform(void) {
  return test_uniform(&rng_state);
}

static bool has_prefix_in(const char *name, const char *const *prefixes) {
  for (int i = 0; prefixes[i]; i++)
    if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0) return true;
  return false;
}

static bool is_frozen(const char *name) {
  for (int i = 0; cm_model_frozen_substrings[i]; i++)
    if (strstr(name, cm_model_frozen_substrings[i])) return true;
  return false;
}

/* The online twin of an EMA target ("target_backbone.x" -> "backbone.x"), or false. */
static bool online_twin(const char *name, char *out, size_t size) {
  for (int i = 0; cm_model_ema_target_prefixes[i]; i++) {
    size_t len = strlen(cm_model_ema_target_prefixes[i]);
    if (strncmp(name, cm_model_ema_target_prefixes[i], len) == 0) {
      snprintf(out, size, "%s%s", cm_model_ema_online_prefixes[i], name + len);
      return true;
    }
  }
  return false;
}

static void tiny_vit(cm_model_config *c) {
  static const char *const sets[] = {"name=tiny_vit_reference",
                                     "data.image_size=16",
                                     "data.in_chans=3",
                                     "data.master_size=24",
                                     "data.shift=4",
                                     "mask.kind=block",
                                     "mask.ratio=0.65",
                                     "mask.block=2",
                                     "encoder.patch=4",
                                     "encoder.width=16",
                                     "encoder.depth=2",
                                     "encoder.heads=2",
                                     "pixel_decoder.width=8",
                                     "pixel_decoder.depth=2",
                                     "pixel_decoder.heads=2",
                                     "feature_decoder.width=8",
                                     "feature_decoder.depth=1",
                                     "feature_decoder.heads=2",
                                     "projector.hidden=16",
                                     "projector.out=8",
                                     "predictor.hidden=16",
                                     "predictor.out=8"};
  cm_model_config_default(c);
  cm_err err = {0};
  for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
    CHECK_MSG(cm_model_config_set(c, sets[i], &err) == CM_OK, "%s: %s", sets[i], err.msg);
  CHECK_MSG(cm_model_config_validate(c, &err) == CM_OK, "%s", err.msg);
}

static void tiny_convvit(cm_model_config *c) {
  tiny_vit(c);
  static const char *const sets[] = {"name=tiny_convvit_reference",
                                     "arch=convvit",
                                     "mask.kind=random",
                                     "mask.ratio=0.75",
                                     "encoder.stage_widths=[8,12,16]",
                                     "encoder.stage_depths=[1,1,2]",
                                     "encoder.stage_patches=[1,2,2]"};
  cm_err err = {0};
  for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
    CHECK_MSG(cm_model_config_set(c, sets[i], &err) == CM_OK, "%s: %s", sets[i], err.msg);
  CHECK_MSG(cm_model_config_validate(c, &err) == CM_OK, "%s", err.msg);
}

static bool write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f) return false;
  bool ok = fputs(text, f) >= 0;
  return fclose(f) == 0 && ok;
}

static int run_reference(const char *dir, const char *out_name) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "python3 tests/reference/cmae_reference.py %s/config.json %s/in.safetensors %s/%s", dir,
           dir, dir, out_name);
  if (getenv("CMAE_REFERENCE_KEEP")) fprintf(stderr, "%s\n", cmd);
  int status = system(cmd);
  return status == -1 || !WIFEXITED(status) ? -1 : WEXITSTATUS(status);
}

/* Exports one case and runs the reference on it; with corrupt, also checks that a
 * gradient off by 1e-3 relative is caught. */
static void run_case(const cm_model_config *cfg, bool copy_target, uint64_t seed, bool corrupt) {
  cm_model m;
  cm_err err = {0};
  cm_model_build_opts opts = {4, 1, CM_F64};
  CHECK_MSG(cm_model_build(cfg, &opts, &m, &err) == CM_OK, "%s", err.msg);
  if (!m.g) return;
  cm_graph *g = m.g;
  int n0 = g->n_nodes;
  cm_tensor *src = calloc((size_t)n0, sizeof *src);
  const cm_tensor **bound = calloc((size_t)n0, sizeof *bound);
  int *wrt = malloc(sizeof(int) * (size_t)n0), *grads = malloc(sizeof(int) * (size_t)n0);
  int n_wrt = 0;

  /* params: initializer, then perturbed, except the fixed pos embeds */
  for (int i = 0; i < n0; i++) {
    const cm_node *n = &g->nodes[i];
    if (n->op != CM_OP_PARAM && n->op != CM_OP_INPUT) continue;
    CHECK(cm_tensor_alloc(&src[i], n->type, &err) == CM_OK);
    bound[i] = &src[i];
    if (n->op != CM_OP_PARAM) continue;
    CHECK_MSG(cm_init_tensor(&src[i], &n->attrs.init, seed, n->name, &err) == CM_OK, "%s", err.msg);
    if (is_frozen(n->name)) continue;
    int64_t cnt = cm_type_numel(&n->type);
    for (int64_t e = 0; e < cnt; e++)
      cm_tensor_set_f64(&src[i], e, cm_tensor_get_f64(&src[i], e) + 0.2 * (uniform() - 0.5));
    if (!has_prefix_in(n->name, cm_model_ema_target_prefixes)) wrt[n_wrt++] = i;
  }
  int n_copied = 0;
  for (int i = 0; i < n0 && copy_target; i++) {
    char twin[512];
    if (g->nodes[i].op != CM_OP_PARAM || !online_twin(g->nodes[i].name, twin, sizeof twin))
      continue;
    int o = cm_graph_find(g, twin);
    CHECK_MSG(o >= 0, "no online twin %s", twin);
    if (o < 0) continue;
    CHECK(cm_type_equal(&src[o].type, &src[i].type));
    memcpy(src[i].data, src[o].data, cm_type_nbytes(&src[i].type));
    n_copied++;
  }
  if (copy_target) CHECK(n_copied > 0);

  /* batch: random views, masks sampled per row */
  int grid = cfg->data.image_size / cfg->encoder.patch, L = grid * grid, batch = opts.batch;
  for (int id = 0; id < 2; id++) {
    int node = id == 0 ? m.img : m.img_t;
    for (int64_t e = 0; node >= 0 && e < cm_type_numel(&src[node].type); e++)
      cm_tensor_set_f64(&src[node], e, 4 * uniform() - 2);
  }
  int n_noise = cm_mask_noise_count(cfg->mask.kind, cfg->mask.block, grid);
  double *u = malloc(sizeof(double) * (size_t)n_noise);
  int32_t keep[4096], restore[4096];
  float mask[4096];
  for (int b = 0; b < batch; b++) {
    for (int k = 0; k < n_noise; k++) u[k] = uniform();
    int kept = cm_mask_sample(cfg->mask.kind, cfg->mask.ratio, cfg->mask.block, grid, u, keep,
                              restore, mask);
    CHECK(kept == m.n_keep && kept < L);
    for (int k = 0; k < kept; k++) cm_tensor_set_i64(&src[m.ids_keep], b * kept + k, keep[k]);
    for (int k = 0; k < L; k++) {
      cm_tensor_set_i64(&src[m.ids_restore], b * L + k, restore[k]);
      cm_tensor_set_f64(&src[m.mask], b * L + k, mask[k]);
    }
  }
  free(u);

  /* forward + gradients on the oracle, in f64 */
  CHECK_MSG(cm_autodiff(g, m.loss, n_wrt, wrt, grads, &err) == CM_OK, "%s", err.msg);
  cm_tensor *values = calloc((size_t)g->n_nodes, sizeof *values);
  const cm_tensor **all_bound = calloc((size_t)g->n_nodes, sizeof *all_bound);
  memcpy(all_bound, bound, sizeof *bound * (size_t)n0);
  cm_eval_opts eo = {CM_PRECISION_F64};
  cm_status st = cm_eval(g, all_bound, values, &eo, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);

  char dir[] = "/tmp/cmae_reference_XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[256];
  if (st == CM_OK) {
    cm_tensor_set in, out;
    cm_tensor_set_init(&in);
    cm_tensor_set_init(&out);
    for (int i = 0; i < n0; i++)
      if (bound[i]) CHECK(cm_tensor_set_add(&in, g->nodes[i].name, &src[i], &err) == CM_OK);
    int outs[3] = {m.loss, m.loss_rc, m.loss_ct};
    for (int k = 0; k < 3; k++)
      if (outs[k] >= 0)
        CHECK(cm_tensor_set_add(&out, g->nodes[outs[k]].name, &values[outs[k]], &err) == CM_OK);
    for (int j = 0; j < n_wrt; j++) {
      char name[512];
      snprintf(name, sizeof name, "grad/%s", g->nodes[wrt[j]].name);
      CHECK(cm_tensor_set_add(&out, name, &values[grads[j]], &err) == CM_OK);
    }
    snprintf(path, sizeof path, "%s/in.safetensors", dir);
    CHECK(cm_safetensors_save(path, &in, &err) == CM_OK);
    snprintf(path, sizeof path, "%s/out.safetensors", dir);
    CHECK(cm_safetensors_save(path, &out, &err) == CM_OK);
    char *json = cm_model_config_to_json(cfg);
    CHECK(json != NULL);
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK(json && write_text(path, json));
    free(json);

    int rc = run_reference(dir, "out.safetensors");
    CHECK_MSG(rc == 0, "%s (%s target): cmae_reference.py exited %d", cfg->name,
              copy_target ? "copied" : "random", rc);
    if (corrupt) {
      /* one element of a (nonzero) gradient off by 1e-3 of its scale must be caught */
      const char *victim = g->nodes[wrt[0]].name;
      for (int j = 0; j < n_wrt; j++)
        if (strstr(g->nodes[wrt[j]].name, "attn.qkv.weight")) victim = g->nodes[wrt[j]].name;
      char name[512];
      snprintf(name, sizeof name, "grad/%s", victim);
      cm_tensor *t = NULL;
      for (int k = 0; k < out.n; k++)
        if (!strcmp(out.names[k], name)) t = &out.tensors[k];
      CHECK(t != NULL);
      if (t) {
        double scale = 0;
        for (int64_t e = 0; e < cm_type_numel(&t->type); e++)
          scale = fmax(scale, fabs(cm_tensor_get_f64(t, e)));
        cm_tensor_set_f64(t, 0, cm_tensor_get_f64(t, 0) + 1e-3 * scale);
        snprintf(path, sizeof path, "%s/bad.safetensors", dir);
        CHECK(cm_safetensors_save(path, &out, &err) == CM_OK);
        CHECK_MSG(run_reference(dir, "bad.safetensors") == 1, "a corrupted %s passed", name);
        unlink(path);
      }
    }
    cm_tensor_set_free(&in);
    cm_tensor_set_free(&out);
    static const char *const files[] = {"in.safetensors", "out.safetensors", "config.json"};
    for (int k = 0; k < 3 && !getenv("CMAE_REFERENCE_KEEP"); k++) {
      snprintf(path, sizeof path, "%s/%s", dir, files[k]);
      unlink(path);
    }
  }
  if (!getenv("CMAE_REFERENCE_KEEP")) rmdir(dir);
  for (int i = 0; i < g->n_nodes; i++) cm_tensor_free(&values[i]);
  for (int i = 0; i < n0; i++) cm_tensor_free(&src[i]);
  free(values);
  free(all_bound);
  free(src);
  free(bound);
  free(wrt);
  free(grads);
  cm_model_free(&m);
}

static void test_vit_target_copied(void) {
  cm_model_config c;
  tiny_vit(&c);
  run_case(&c, true, 11, true);
}

static void test_vit_target_own_params(void) {
  cm_model_config c;
  tiny_vit(&c);
  run_case(&c, false, 12, false);
}

static void test_convvit_target_copied(void) {
  cm_model_config c;
  tiny_convvit(&c);
  run_case(&c, true, 13, false);
}

static void test_convvit_target_own_params(void) {
  cm_model_config c;
  tiny_convvit(&c);
  run_case(&c, false, 14, false);
}

TEST_MAIN(TEST(test_vit_target_copied), TEST(test_vit_target_own_params),
          TEST(test_convvit_target_copied), TEST(test_convvit_target_own_params))
