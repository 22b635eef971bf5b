/* tests/unit/test_model_config.c — model-variant files: defaults against
 * CMAE.md, the shipped variants, extends chains, --set, validation, JSON round
 * trips, malformed files (tests/malformed/models/expected.tsv) and the key
 * table in docs/models.md. Runs from the source root.
 *
 * CMAEC_PRINT_MODEL_TABLE=1 prints the Markdown key table for docs/models.md. */
#include "frontend/frontend.h"
#include "tests/test.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <sys/stat.h>
#include <stdbool.h>
#include <unistd.h>

static const char *const shipped[] = {
    "models/cmae_vit_base.json",
    "models/cmae_vit_small.json",
    "models/cmae_vit_large.json",
    "models/cmae_convvit_base.json",
    "models/mae_vit_base.json",
    "models/cmae_vit_tiny_fmnist.json",
    "models/cmae_convvit_tiny_fmnist.json",
};
#define N_SHIPPED ((int)(sizeof shipped / sizeof shipped[0]))

/* ---- helpers ---------------------------------------------------------------- */

static char tmp_dir[64];
static char tmp_files[32][256];
static int n_tmp_files;

static void remove_tmp(void) {
  for (int i = 0; i < n_tmp_files; i++) remove(tmp_files[i]);
  if (tmp_dir[0]) {
    char sub[256];
    snprintf(sub, sizeof sub, "%s/sub", tmp_dir);
    rmdir(sub);
    rmdir(tmp_dir);
  }
}

static const char *tmp_path(const char *name) {
  if (!tmp_dir[0]) {
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/cmaec_model_config_XXXXXX");
    if (!mkdtemp(tmp_dir)) {
      perror("mkdtemp");
      exit(1);
    }
    atexit(remove_tmp);
  }
  static char path[256];
  snprintf(path, sizeof path, "%s/%s", tmp_dir, name);
  return path;
}

/* Writes text to tmp_dir/name (subdirectory "sub/" allowed) and returns the path. */
static const char *write_tmp(const char *name, const char *text) {
  const char *path = tmp_path(name);
  if (strncmp(name, "sub/", 4) == 0) {
    char dir[256];
    snprintf(dir, sizeof dir, "%s/sub", tmp_dir);
    mkdir(dir, 0700);
  }
  FILE *f = fopen(path, "w");
  if (!f) {
    perror(path);
    exit(1);
  }
  fputs(text, f);
  fclose(f);
  /* A stable copy of the path: tmp_path's buffer is reused. */
  for (int i = 0; i < n_tmp_files; i++)
    if (strcmp(tmp_files[i], path) == 0) return tmp_files[i];
  if (n_tmp_files == 32) exit(1);
  snprintf(tmp_files[n_tmp_files], sizeof tmp_files[0], "%s", path);
  return tmp_files[n_tmp_files++];
}

static bool configs_equal(const cm_model_config *a, const cm_model_config *b) {
  char *ja = cm_model_config_to_json(a), *jb = cm_model_config_to_json(b);
  bool same = ja && jb && strcmp(ja, jb) == 0 && memcmp(a, b, sizeof *a) == 0;
  free(ja);
  free(jb);
  return same;
}

/* The value of a dotted key in a JSON config object. */
static const cJSON *lookup(const cJSON *root, const char *key) {
  const char *dot = strchr(key, '.');
  if (!dot) return cJSON_GetObjectItemCaseSensitive(root, key);
  char component[64];
  snprintf(component, sizeof component, "%.*s", (int)(dot - key), key);
  return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, component),
                                          dot + 1);
}

/* Expects CM_EINVALID with a one-line message containing needle. */
static void expect_invalid(cm_status st, const cm_err *err, const char *needle, const char *what) {
  CHECK_MSG(st == CM_EINVALID, "%s: status %d, expected CM_EINVALID", what, (int)st);
  CHECK_MSG(err->status == st, "%s: err->status %d", what, (int)err->status);
  CHECK_MSG(strchr(err->msg, '\n') == NULL, "%s: message has a newline: %s", what, err->msg);
  CHECK_MSG(strstr(err->msg, needle) != NULL, "%s: \"%s\" does not contain \"%s\"", what, err->msg,
            needle);
}

static void expect_load_fails(const char *text, const char *needle) {
  const char *path = write_tmp("bad.json", text);
  cm_model_config c;
  cm_err err = {0};
  cm_status st = cm_model_config_load(path, NULL, 0, &c, &err);
  expect_invalid(st, &err, needle, text);
  CHECK_MSG(strncmp(err.msg, path, strlen(path)) == 0, "%s: not prefixed with the path", err.msg);
}

static void expect_set_fails(const char *assignment, const char *needle) {
  cm_model_config c, before;
  cm_model_config_default(&c);
  before = c;
  cm_err err = {0};
  cm_status st = cm_model_config_set(&c, assignment, &err);
  expect_invalid(st, &err, needle, assignment);
  CHECK_MSG(strncmp(err.msg, "--set ", 6) == 0, "%s: not prefixed with --set", err.msg);
  CHECK_MSG(memcmp(&c, &before, sizeof c) == 0, "%s: a failed --set changed the config",
            assignment);
}

/* ---- defaults ------------------------------------------------------------------ */

static void test_defaults_match_cmae_md(void) {
  cm_model_config c;
  memset(&c, 0x5a, sizeof c);
  cm_model_config_default(&c);
  CHECK(strcmp(c.name, "cmae_vit_base") == 0);
  CHECK(strcmp(c.arch, "vit") == 0);
  CHECK(c.contrastive);
  /* §1 data */
  CHECK(strcmp(c.data.dataset, "imagenet") == 0);
  CHECK(c.data.image_size == 224 && c.data.master_size == 256 && c.data.shift == 31);
  CHECK(c.data.in_chans == 3);
  CHECK_NEAR(c.data.mean[0], 0.485 * 255, 1e-12);
  CHECK_NEAR(c.data.mean[1], 0.456 * 255, 1e-12);
  CHECK_NEAR(c.data.mean[2], 0.406 * 255, 1e-12);
  CHECK_NEAR(c.data.std[0], 0.229 * 255, 1e-12);
  CHECK_NEAR(c.data.std[1], 0.224 * 255, 1e-12);
  CHECK_NEAR(c.data.std[2], 0.225 * 255, 1e-12);
  CHECK(c.data.crop_scale_min == 0.2 && c.data.crop_scale_max == 1.0);
  CHECK(c.data.flip_prob == 0.5 && c.data.jitter_prob == 0.8);
  CHECK(c.data.brightness == 0.4 && c.data.contrast == 0.4 && c.data.saturation == 0.4);
  CHECK(c.data.hue == 0.1 && c.data.grayscale_prob == 0.2);
  CHECK(c.data.blur_prob == 0.5 && c.data.blur_sigma_min == 0.1 && c.data.blur_sigma_max == 2.0);
  /* §2 mask */
  CHECK(strcmp(c.mask.kind, "block") == 0 && c.mask.ratio == 0.65 && c.mask.block == 2);
  /* §3 encoder */
  CHECK(c.encoder.patch == 16 && c.encoder.width == 768 && c.encoder.depth == 12);
  CHECK(c.encoder.heads == 12 && c.encoder.mlp_ratio == 4);
  CHECK(c.encoder.qkv_bias && c.encoder.final_norm && c.encoder.ln_eps == 1e-6);
  int widths[3] = {256, 384, 768}, depths[3] = {2, 2, 11}, patches[3] = {4, 2, 2};
  CHECK(memcmp(c.encoder.stage_widths, widths, sizeof widths) == 0);
  CHECK(memcmp(c.encoder.stage_depths, depths, sizeof depths) == 0);
  CHECK(memcmp(c.encoder.stage_patches, patches, sizeof patches) == 0);
  /* §5, §6 decoders and heads */
  CHECK(c.pixel_decoder.enabled);
  CHECK(c.pixel_decoder.width == 512 && c.pixel_decoder.depth == 8 && c.pixel_decoder.heads == 16);
  CHECK(c.pixel_decoder.mlp_ratio == 4);
  CHECK(c.feature_decoder.enabled && c.feature_decoder.width == 512);
  CHECK(c.feature_decoder.depth == 2 && c.feature_decoder.heads == 16);
  CHECK(c.projector.hidden == 1536 && c.projector.out == 256 && c.projector.bn_eps == 1e-6);
  CHECK(c.predictor.hidden == 1536 && c.predictor.out == 256 && c.predictor.bn_eps == 1e-6);
  /* §7 loss */
  CHECK(c.loss.rc_weight == 1 && c.loss.ct_weight == 1 && c.loss.temperature == 0.07);
  CHECK(c.loss.norm_pix && c.loss.norm_pix_eps == 1e-6);
  /* §8 optimizer and schedule */
  CHECK(c.optimizer.base_lr == 1.5e-4 && c.optimizer.batch == 4096);
  CHECK_NEAR(c.optimizer.base_lr * c.optimizer.batch / 256, 2.4e-3, 1e-12);
  CHECK(c.optimizer.weight_decay == 0.05 && c.optimizer.beta1 == 0.9 && c.optimizer.beta2 == 0.95);
  CHECK(c.optimizer.eps == 1e-8 && c.optimizer.clip_norm == 0);
  CHECK(c.schedule.epochs == 300 && c.schedule.warmup_epochs == 40);
  CHECK(c.schedule.warmup_start_factor == 1e-4 && c.schedule.min_lr == 0);
  CHECK(c.schedule.momentum_base == 0.996 && c.schedule.momentum_end == 0.996);

  cm_err err = {0};
  CHECK_MSG(cm_model_config_validate(&c, &err) == CM_OK, "%s", err.msg);
  /* Defaults fill every byte the same way each time (padding included). */
  cm_model_config d;
  memset(&d, 0xa5, sizeof d);
  cm_model_config_default(&d);
  CHECK(memcmp(&c, &d, sizeof c) == 0);
}

/* ---- shipped variants ---------------------------------------------------------- */

static void test_shipped_variants_load(void) {
  cm_model_config v[N_SHIPPED];
  for (int i = 0; i < N_SHIPPED; i++) {
    cm_err err = {0};
    cm_status st = cm_model_config_load(shipped[i], NULL, 0, &v[i], &err);
    CHECK_MSG(st == CM_OK, "%s: %s", shipped[i], err.msg);
    CHECK_MSG(cm_model_config_validate(&v[i], &err) == CM_OK, "%s: %s", shipped[i], err.msg);
    /* The file name is the variant's name. */
    char expected[128];
    const char *base = strrchr(shipped[i], '/') + 1;
    snprintf(expected, sizeof expected, "%.*s", (int)(strlen(base) - 5), base);
    CHECK_MSG(strcmp(v[i].name, expected) == 0, "%s: name \"%s\"", shipped[i], v[i].name);
  }
  cm_model_config def;
  cm_model_config_default(&def);
  snprintf(def.name, sizeof def.name, "cmae_vit_base");
  /* The official file spells out exactly the defaults. */
  CHECK(configs_equal(&v[0], &def));

  const cm_model_config *small = &v[1], *large = &v[2], *conv = &v[3], *mae = &v[4];
  const cm_model_config *tiny = &v[5], *ctiny = &v[6];
  CHECK(small->encoder.width == 768 && small->encoder.depth == 8 && small->encoder.heads == 8);
  CHECK((int)(small->encoder.width * small->encoder.mlp_ratio) == 2304);
  CHECK(small->pixel_decoder.depth == 8 && small->data.shift == 31);
  CHECK(large->encoder.width == 1024 && large->encoder.depth == 24 && large->encoder.heads == 16);
  CHECK(strcmp(conv->arch, "convvit") == 0 && strcmp(conv->mask.kind, "random") == 0);
  CHECK(conv->mask.ratio == 0.75 && conv->encoder.stage_depths[2] == 11);
  CHECK(conv->encoder.stage_patches[0] * conv->encoder.stage_patches[1] *
            conv->encoder.stage_patches[2] ==
        conv->encoder.patch);
  CHECK(!mae->contrastive && !mae->feature_decoder.enabled && mae->mask.ratio == 0.75);
  CHECK(strcmp(mae->mask.kind, "random") == 0);
  CHECK(strcmp(tiny->data.dataset, "fashion-mnist") == 0 && tiny->data.in_chans == 1);
  CHECK(tiny->data.image_size == 32 && tiny->data.master_size == 36 && tiny->data.shift == 4);
  CHECK(tiny->encoder.patch == 4 && strcmp(tiny->mask.kind, "block") == 0);
  /* The 8x8 grid takes 2x2 blocks: 16 cells, int(16 * 0.35) = 5 kept, 20 tokens visible. */
  CHECK((tiny->data.image_size / tiny->encoder.patch) % tiny->mask.block == 0);
  CHECK(tiny->optimizer.batch == 256 && tiny->schedule.epochs == 10);
  CHECK(tiny->schedule.warmup_epochs == 1 && tiny->projector.out == 128);
  CHECK(tiny->data.mean[0] == 72.94 && tiny->data.std[0] == 90.0);
  /* Keys the tiny file does not name come from the base. */
  CHECK(tiny->loss.temperature == 0.07 && tiny->encoder.mlp_ratio == 4);
  CHECK(strcmp(ctiny->arch, "convvit") == 0 && ctiny->encoder.stage_widths[2] == 128);
  CHECK(ctiny->encoder.stage_patches[0] == 1 && ctiny->data.in_chans == 1);
}

/* ---- extends and overrides ------------------------------------------------------- */

static void test_extends_chain_and_override_order(void) {
  /* base <- sub/mid <- top; each relative to the file that names it. */
  write_tmp("base.json", "{\"name\": \"base\", \"encoder\": {\"depth\": 6, \"heads\": 6},"
                         " \"loss\": {\"temperature\": 0.2}}");
  write_tmp("sub/mid.json", "{\"extends\": \"../base.json\", \"name\": \"mid\","
                            " \"encoder\": {\"depth\": 4}, \"mask\": {\"ratio\": 0.5}}");
  const char *top = write_tmp("top.json", "{\"name\": \"top\", \"extends\": \"sub/mid.json\","
                                          " \"encoder\": {\"width\": 384}}");
  cm_model_config c;
  cm_err err = {0};
  cm_status st = cm_model_config_load(top, NULL, 0, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(strcmp(c.name, "top") == 0); /* the including file wins, wherever the key is */
  CHECK(c.encoder.width == 384);     /* top */
  CHECK(c.encoder.depth == 4);       /* mid overrides base */
  CHECK(c.encoder.heads == 6);       /* base, kept through mid's encoder object */
  CHECK(c.loss.temperature == 0.2);  /* base */
  CHECK(c.mask.ratio == 0.5);        /* mid */
  CHECK(c.encoder.patch == 16);      /* defaults under the chain */
  CHECK(c.projector.hidden == 1536);

  /* --set applies after every file, in order. */
  const char *overrides[] = {"encoder.depth=3", "name=cli", "encoder.depth=5"};
  st = cm_model_config_load(top, overrides, 3, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(c.encoder.depth == 5 && strcmp(c.name, "cli") == 0 && c.encoder.heads == 6);

  /* A dotted key at the top level is the same key. */
  const char *dotted =
      write_tmp("dotted.json", "{\"extends\": \"top.json\", \"encoder.heads\": 8}");
  st = cm_model_config_load(dotted, NULL, 0, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(c.encoder.heads == 8 && c.encoder.width == 384);

  /* Validation runs on the result, after --set: an override can fix or break it. */
  const char *broken = write_tmp("broken.json", "{\"encoder\": {\"heads\": 7}}");
  const char *fix[] = {"encoder.heads=8"};
  st = cm_model_config_load(broken, fix, 1, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  const char *breaks[] = {"encoder.heads=5"};
  st = cm_model_config_load(top, breaks, 1, &c, &err);
  expect_invalid(st, &err, "encoder.heads: 5 does not divide encoder.width 384", "load + --set");
  CHECK_STR_CONTAINS(err.msg, top);
  const char *bad_set[] = {"encoder.depth=six"};
  st = cm_model_config_load(top, bad_set, 1, &c, &err);
  expect_invalid(st, &err,
                 "--set encoder.depth=six: encoder.depth: expected an integer, got \"six\"",
                 "load + bad --set");
}

static void test_set_each_type(void) {
  cm_model_config c;
  cm_model_config_default(&c);
  cm_err err = {0};
  CHECK(cm_model_config_set(&c, "encoder.depth=6", &err) == CM_OK);
  CHECK(c.encoder.depth == 6);
  CHECK(cm_model_config_set(&c, "loss.temperature=0.2", &err) == CM_OK);
  CHECK(c.loss.temperature == 0.2);
  CHECK(cm_model_config_set(&c, "optimizer.base_lr=3e-4", &err) == CM_OK);
  CHECK(c.optimizer.base_lr == 3e-4);
  CHECK(cm_model_config_set(&c, "loss.rc_weight=2", &err) == CM_OK); /* an int for a number */
  CHECK(c.loss.rc_weight == 2.0);
  CHECK(cm_model_config_set(&c, "contrastive=false", &err) == CM_OK);
  CHECK(!c.contrastive);
  CHECK(cm_model_config_set(&c, "encoder.qkv_bias=true", &err) == CM_OK);
  CHECK(c.encoder.qkv_bias);
  CHECK(cm_model_config_set(&c, "mask.kind=random", &err) == CM_OK); /* bare string */
  CHECK(strcmp(c.mask.kind, "random") == 0);
  CHECK(cm_model_config_set(&c, "mask.kind=\"block\"", &err) == CM_OK); /* JSON string */
  CHECK(strcmp(c.mask.kind, "block") == 0);
  CHECK(cm_model_config_set(&c, "name=123", &err) == CM_OK); /* not a string in JSON: bare */
  CHECK(strcmp(c.name, "123") == 0);
  CHECK(cm_model_config_set(&c, "name=a=b c", &err) == CM_OK); /* the first '=' splits */
  CHECK(strcmp(c.name, "a=b c") == 0);
  CHECK(cm_model_config_set(&c, "encoder.stage_depths=[2,2,6]", &err) == CM_OK);
  CHECK(c.encoder.stage_depths[0] == 2 && c.encoder.stage_depths[1] == 2 &&
        c.encoder.stage_depths[2] == 6);
  CHECK(cm_model_config_set(&c, "data.mean=[1.5, 2, 3.25]", &err) == CM_OK);
  CHECK(c.data.mean[0] == 1.5 && c.data.mean[1] == 2 && c.data.mean[2] == 3.25);
  /* Strings fill the whole field: a shorter value leaves no tail of the longer one. */
  CHECK(cm_model_config_set(&c, "name=ab", &err) == CM_OK);
  for (size_t i = 2; i < sizeof c.name; i++) CHECK(c.name[i] == '\0');
  char longest[80];
  snprintf(longest, sizeof longest, "name=%063d", 7);
  CHECK(cm_model_config_set(&c, longest, &err) == CM_OK);
  CHECK(strlen(c.name) == 63);
}

static void test_set_errors(void) {
  expect_set_fails("encoder.depth", "--set encoder.depth: expected KEY=VALUE");
  expect_set_fails("=5", "--set =5: expected KEY=VALUE");
  expect_set_fails("", "--set : expected KEY=VALUE");
  expect_set_fails(
      "encoder.dpeth=6",
      "--set encoder.dpeth=6: encoder.dpeth: unknown key (did you mean encoder.depth?)");
  expect_set_fails("tempreature=0.1", "tempreature: unknown key");
  expect_set_fails("encoder=6",
                   "--set encoder=6: encoder: a section, not a key: set one of its "
                   "keys (patch, width, depth, heads, mlp_ratio, qkv_bias, final_norm, "
                   "ln_eps, stage_widths, stage_depths, stage_patches) as "
                   "encoder.KEY, or give an object of them; got 6");
  expect_set_fails("encoder.depth=six",
                   "--set encoder.depth=six: encoder.depth: expected an integer, got \"six\"");
  expect_set_fails("encoder.depth=6.5", "encoder.depth: expected an integer, got 6.5");
  expect_set_fails("encoder.depth=", "encoder.depth: expected an integer, got \"\"");
  expect_set_fails("encoder.depth=true", "encoder.depth: expected an integer, got true");
  expect_set_fails("encoder.depth=3000000000", "encoder.depth: 3000000000 is out of the int range");
  expect_set_fails("loss.temperature=1e999",
                   "loss.temperature: the number is out of range (magnitude over 1.8e308)");
  expect_set_fails("contrastive=yes", "contrastive: expected true or false, got \"yes\"");
  expect_set_fails("contrastive=1", "contrastive: expected true or false, got 1");
  expect_set_fails("arch=a_string_longer_than_15", "arch: \"a_string_longer_than_15\" is too long");
  expect_set_fails("encoder.stage_widths=[1,2]", "encoder.stage_widths: expected an array of 3");
  expect_set_fails("encoder.stage_widths=[1,2,3.5]",
                   "encoder.stage_widths[2]: expected an integer");
  expect_set_fails("data.std=[1,2,\"x\"]", "data.std[2]: expected a number, got \"x\"");
  expect_set_fails("data.std=5", "data.std: expected an array of 3 numbers, got 5");
  /* A NULL err is allowed: only the status comes back. */
  cm_model_config c;
  cm_model_config_default(&c);
  CHECK(cm_model_config_set(&c, "encoder.depth=six", NULL) == CM_EINVALID);
  CHECK(cm_model_config_set(&c, "encoder.depth=7", NULL) == CM_OK && c.encoder.depth == 7);
  CHECK(cm_model_config_load("tests/malformed/models/cycle_a.json", NULL, 0, &c, NULL) ==
        CM_EINVALID);
  CHECK(cm_model_config_load("tests/malformed/models/encoder_heads.json", NULL, 0, &c, NULL) ==
        CM_EINVALID);
  CHECK(cm_model_config_validate(&c, NULL) == CM_OK);
  /* Control bytes never break the one-line message. */
  expect_set_fails("bad\nkey=1", "bad?key: unknown key");
}

/* ---- validation (in memory) ---------------------------------------------------- */

typedef struct validation_case {
  const char *assignments[3];
  const char *expected;
} validation_case;

static void test_validation_rules(void) {
  static const validation_case cases[] = {
      {{"encoder.heads=7"}, "encoder.heads: 7 does not divide encoder.width 768"},
      {{"feature_decoder.heads=5"}, "feature_decoder.heads: 5 does not divide"},
      {{"feature_decoder.heads=5", "feature_decoder.enabled=false"}, NULL},
      {{"encoder.width=770", "encoder.heads=1"}, "encoder.width: 770 is not divisible by 4"},
      {{"feature_decoder.width=6", "feature_decoder.heads=1"}, "feature_decoder.width: 6"},
      {{"encoder.width=0"}, "encoder.width: must be positive, got 0"},
      {{"pixel_decoder.depth=-1"}, "pixel_decoder.depth: must be positive, got -1"},
      {{"predictor.hidden=0"}, "predictor.hidden: must be positive"},
      {{"data.image_size=0"}, "data.image_size: must be positive"},
      {{"data.image_size=100"}, "encoder.patch: 16 does not divide data.image_size 100"},
      {{"data.image_size=112"}, "mask.block: 2 does not divide the 7x7 patch grid"},
      {{"data.image_size=112", "mask.kind=random"}, NULL},
      {{"mask.block=0"}, "mask.block: must be positive, got 0"},
      {{"mask.ratio=0.9999"}, "mask.ratio: 0.9999 leaves no visible token"},
      {{"mask.ratio=0.99", "mask.kind=random"}, NULL}, /* int(196 * 0.01) = 1 visible */
      {{"mask.ratio=0.999", "mask.kind=random"}, "mask.ratio: 0.999 leaves no visible token"},
      {{"mask.ratio=0"}, NULL},
      {{"data.shift=33"}, "data.shift: 33 + data.image_size 224 exceeds data.master_size 256"},
      {{"data.shift=32"}, NULL},
      {{"data.shift=-1"}, "data.shift: must not be negative"},
      {{"data.in_chans=4"}, "data.in_chans: must be 1 or 3, got 4"},
      {{"data.in_chans=1", "data.std=[58,0,0]"}, NULL}, /* only the first in_chans are used */
      {{"data.std=[58,0,57]"}, "data.std[1]: must be positive, got 0"},
      {{"arch=swin"}, "arch: \"swin\" is not one of vit, convvit"},
      {{"mask.kind=grid"}, "mask.kind: \"grid\" is not one of block, random"},
      {{"data.dataset=cifar"}, "data.dataset: \"cifar\" is not one of"},
      {{"arch=convvit", "encoder.stage_patches=[4,4,2]"},
       "encoder.stage_patches: product 4 x 4 x 2 = 32 is not encoder.patch 16"},
      {{"arch=convvit", "encoder.stage_widths=[256,384,512]"},
       "encoder.stage_widths[2]: 512 is not encoder.width 768"},
      {{"arch=convvit", "encoder.stage_depths=[2,2,0]"}, "encoder.stage_depths[2]"},
      {{"arch=convvit", "encoder.stage_widths=[0,384,768]"}, "encoder.stage_widths[0]: must be"},
      {{"encoder.stage_patches=[4,4,2]"}, NULL}, /* stage keys only matter for convvit */
      {{"loss.temperature=0"}, "loss.temperature: must be positive, got 0"},
      {{"loss.temperature=-0.07"}, "loss.temperature: must be positive"},
      {{"data.jitter_prob=1.01"}, "data.jitter_prob: 1.01 is not a probability in [0, 1]"},
      {{"data.grayscale_prob=-0.2"}, "data.grayscale_prob: -0.2 is not a probability"},
      {{"data.crop_scale_max=1.5"},
       "data.crop_scale_min: need 0 < data.crop_scale_min 0.2 <= "
       "data.crop_scale_max 1.5 <= 1"},
      {{"data.crop_scale_min=0.5", "data.crop_scale_max=0.5"}, NULL},
      {{"optimizer.batch=0"}, "optimizer.batch: must be at least 1, got 0"},
      {{"optimizer.batch=1"}, NULL},
      {{"schedule.warmup_epochs=301"}, "schedule.warmup_epochs: 301 exceeds schedule.epochs 300"},
      {{"schedule.warmup_epochs=300"}, NULL},
      {{"optimizer.beta1=1"}, "optimizer.beta1: 1 is outside [0, 1)"},
      {{"optimizer.beta2=-0.1"}, "optimizer.beta2: -0.1 is outside [0, 1)"},
      {{"encoder.mlp_ratio=2.5"}, NULL}, /* 768 x 2.5 = 1920 */
      {{"encoder.mlp_ratio=0"}, "encoder.mlp_ratio: must be positive"},
      {{"name="}, "name: must not be empty"},
      {{"data.hue=0.6"}, "data.hue: 0.6 is outside [0, 0.5]"},
      {{"data.blur_sigma_min=3"}, "data.blur_sigma_min: need 0 < data.blur_sigma_min 3 <="},
      {{"schedule.momentum_end=1.5"}, "schedule.momentum_end: 1.5 is not a probability"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    cm_model_config c;
    cm_model_config_default(&c);
    cm_err err = {0};
    for (int j = 0; j < 3 && cases[i].assignments[j]; j++) {
      cm_status st = cm_model_config_set(&c, cases[i].assignments[j], &err);
      CHECK_MSG(st == CM_OK, "%s: %s", cases[i].assignments[j], err.msg);
    }
    cm_status st = cm_model_config_validate(&c, &err);
    if (!cases[i].expected)
      CHECK_MSG(st == CM_OK, "case %zu (%s): %s", i, cases[i].assignments[0], err.msg);
    else
      expect_invalid(st, &err, cases[i].expected, cases[i].assignments[0]);
  }
}

/* ---- JSON output ----------------------------------------------------------------- */

static void check_round_trip(const cm_model_config *c, const char *what) {
  char *json = cm_model_config_to_json(c);
  CHECK(json != NULL);
  if (!json) return;
  char *again = cm_model_config_to_json(c);
  CHECK_MSG(again && strcmp(json, again) == 0, "%s: to_json is not deterministic", what);
  free(again);
  const char *path = write_tmp("round_trip.json", json);
  cm_model_config back;
  cm_err err = {0};
  cm_status st = cm_model_config_load(path, NULL, 0, &back, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", what, err.msg);
  CHECK_MSG(st == CM_OK && configs_equal(c, &back), "%s: load(to_json(c)) != c", what);
  if (st == CM_OK && !configs_equal(c, &back)) {
    char *j2 = cm_model_config_to_json(&back);
    fprintf(stderr, "%s\n---\n%s\n", json, j2);
    free(j2);
  }

  /* Every key appears once, grouped by component, nothing else. */
  cJSON *root = cJSON_Parse(json);
  CHECK(root != NULL);
  const cm_model_key *keys;
  int n = cm_model_config_keys(&keys), leaves = 0;
  for (int i = 0; i < n; i++) CHECK_MSG(lookup(root, keys[i].key), "%s: no %s", what, keys[i].key);
  for (const cJSON *m = root ? root->child : NULL; m; m = m->next)
    leaves += cJSON_IsObject(m) ? cJSON_GetArraySize(m) : 1;
  CHECK_MSG(leaves == n, "%s: %d values for %d keys", what, leaves, n);
  cJSON_Delete(root);
  free(json);
}

static void test_to_json_round_trip(void) {
  cm_model_config c;
  cm_model_config_default(&c);
  check_round_trip(&c, "defaults");
  /* Values that need all 17 digits, and every type changed. */
  cm_err err = {0};
  const char *sets[] = {"optimizer.base_lr=0.1",
                        "data.mean=[0.30000000000000004, 1e-300, -2.5]",
                        "name=with \"quotes\" and \\\\ backslash",
                        "contrastive=false",
                        "encoder.stage_widths=[7,8,9]",
                        "loss.temperature=0.123456789012345678"};
  for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++)
    CHECK_MSG(cm_model_config_set(&c, sets[i], &err) == CM_OK, "%s: %s", sets[i], err.msg);
  c.optimizer.base_lr = 1.0 / 3.0;
  check_round_trip(&c, "edited");
  for (int i = 0; i < N_SHIPPED; i++) {
    if (cm_model_config_load(shipped[i], NULL, 0, &c, &err) == CM_OK)
      check_round_trip(&c, shipped[i]);
  }
  /* The output is grouped: the first members are the top-level keys, then the components. */
  cm_model_config_default(&c);
  char *json = cm_model_config_to_json(&c);
  CHECK(json && strstr(json, "\"encoder\"") && strstr(json, "\"depth\""));
  CHECK(json && strstr(json, "\"name\"") < strstr(json, "\"data\""));
  CHECK(json && strstr(json, "\"data\"") < strstr(json, "\"schedule\""));
  free(json);
}

/* ---- malformed files --------------------------------------------------------------- */

static void test_malformed_files(void) {
  const char *dir = "tests/malformed/models";
  char table_path[256];
  snprintf(table_path, sizeof table_path, "%s/expected.tsv", dir);
  FILE *table = fopen(table_path, "r");
  CHECK_MSG(table != NULL, "cannot open %s (run from the source root)", table_path);
  if (!table) return;
  char line[1024], listed[128][96];
  int n_listed = 0;
  while (fgets(line, sizeof line, table)) {
    line[strcspn(line, "\r\n")] = '\0';
    if (!line[0] || line[0] == '#') continue;
    char *tab = strchr(line, '\t');
    CHECK_MSG(tab != NULL, "expected.tsv: no tab in \"%s\"", line);
    if (!tab) continue;
    *tab = '\0';
    const char *file = line, *expect = tab + 1;
    if (n_listed < 128) snprintf(listed[n_listed++], sizeof listed[0], "%s", file);
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    cm_model_config c;
    cm_err err = {0};
    cm_status st = cm_model_config_load(path, NULL, 0, &c, &err);
    expect_invalid(st, &err, expect, path);
    /* The message names a file of this directory first (the one holding the error). */
    CHECK_MSG(strncmp(err.msg, "tests/malformed/models/", 23) == 0, "%s: \"%s\"", path, err.msg);
  }
  fclose(table);
  CHECK_MSG(n_listed >= 20, "only %d malformed files", n_listed);

  /* A malformed file without an expectation would silently go untested. */
  DIR *d = opendir(dir);
  CHECK(d != NULL);
  for (struct dirent *e; d && (e = readdir(d));) {
    size_t len = strlen(e->d_name);
    if (len < 5 || strcmp(e->d_name + len - 5, ".json") != 0) continue;
    bool found = false;
    for (int i = 0; i < n_listed; i++) found |= strcmp(listed[i], e->d_name) == 0;
    CHECK_MSG(found, "%s/%s is not listed in expected.tsv", dir, e->d_name);
  }
  if (d) closedir(d);
}

static void test_malformed_strings(void) {
  expect_load_fails("", "JSON syntax error near line 1");
  expect_load_fails("{\"name\": \"x\"} trailing", "JSON syntax error");
  expect_load_fails("\"just a string\"", "expected a JSON object");
  expect_load_fails("{\"encoder\": {\"dpeth\": 6}}",
                    "encoder.dpeth: unknown key (did you mean encoder.depth?)");
  expect_load_fails("{\"predictor\": {\"hiden\": 6}}",
                    "predictor.hiden: unknown key (did you mean predictor.hidden?)");
  expect_load_fails("{\"encoder\": {\"depth\": 6.0000001}}", "encoder.depth: expected an integer");
  expect_load_fails("{\"encoder\": {\"depth\": null}}",
                    "encoder.depth: expected an integer, got null");
  expect_load_fails("{\"encoder\": {\"depth\": [6]}}",
                    "encoder.depth: expected an integer, got [6]");
  expect_load_fails("{\"mask\": {\"kind\": {\"a\": 1}}}", "mask.kind: expected a string, got {");
  expect_load_fails("{\"data\": {\"dataset\": \"0123456789012345678901234567890123\"}}",
                    "data.dataset: \"0123456789012345678901234567890123\" is too long (34 bytes, "
                    "at most 31)");
  expect_load_fails("{\"extends\": \"missing/base.json\"}", "extends: cannot open");
  expect_load_fails("{\"extends\": \"bad.json\"}", "extends: cycle");
  expect_load_fails("{\"extends\": null}", "extends: expected a file name, got null");
  expect_load_fails("{\"data\": [1]}",
                    "data: a section, not a key: set one of its keys (dataset, ");
  expect_load_fails("{\"encoder\": {\"heads\": 5}}",
                    "encoder.heads: 5 does not divide encoder.width 768");
  expect_load_fails("{\"data\": {\"master_size\": 250}}",
                    "data.shift: 31 + data.image_size 224 exceeds data.master_size 250");
  expect_load_fails("{\"mask\": {\"ratio\": 1}}", "mask.ratio: 1 is outside [0, 1)");
  expect_load_fails("{\"schedule\": {\"warmup_epochs\": 50, \"epochs\": 45}}",
                    "schedule.warmup_epochs: 50 exceeds schedule.epochs 45");
  /* NUL bytes inside the file. */
  const char *path = write_tmp("nul.json", "");
  FILE *f = fopen(path, "wb");
  if (f) {
    fwrite("{\"name\": \"a\0b\"}", 1, 15, f);
    fclose(f);
  }
  cm_model_config c;
  cm_err err = {0};
  expect_invalid(cm_model_config_load(path, NULL, 0, &c, &err), &err, "NUL byte", "nul.json");
  expect_invalid(cm_model_config_load("models/no_such_variant.json", NULL, 0, &c, &err), &err,
                 "models/no_such_variant.json: cannot open", "missing file");

  /* A long cycle names the whole chain. */
  write_tmp("c1.json", "{\"extends\": \"c2.json\"}");
  write_tmp("c2.json", "{\"extends\": \"c3.json\"}");
  const char *c3 = write_tmp("c3.json", "{\"extends\": \"c1.json\"}");
  cm_status st = cm_model_config_load(c3, NULL, 0, &c, &err);
  expect_invalid(st, &err, "c1.json -> ", "cycle of 3");
  CHECK_STR_CONTAINS(err.msg, "c2.json -> ");
  CHECK_STR_CONTAINS(err.msg, "c3.json -> ");
}

/* ---- the key table and docs/models.md ------------------------------------------------ */

/* The docs row of key i: | `key` | type | default | doc | */
static void docs_row(const cm_model_key *k, const cJSON *defaults, char *row, size_t size) {
  char *value = cJSON_PrintUnformatted(lookup(defaults, k->key));
  snprintf(row, size, "| `%s` | %s | `%s` | %s |", k->key, k->type, value ? value : "?", k->doc);
  free(value);
}

static void test_key_table(void) {
  const cm_model_key *keys;
  int n = cm_model_config_keys(&keys);
  /* Every field of cm_model_config except pixel_decoder.enabled (always on). */
  CHECK(n == 78);
  static const char *const types[] = {"int", "number", "bool", "string", "int[3]", "number[3]"};
  for (int i = 0; i < n; i++) {
    bool type_ok = false;
    for (int t = 0; t < 6; t++) type_ok |= strcmp(keys[i].type, types[t]) == 0;
    CHECK_MSG(type_ok, "%s: type %s", keys[i].key, keys[i].type);
    CHECK_MSG(keys[i].doc && keys[i].doc[0] && !strchr(keys[i].doc, '|'), "%s: doc", keys[i].key);
    for (int j = 0; j < i; j++)
      CHECK_MSG(strcmp(keys[i].key, keys[j].key) != 0, "%s twice", keys[i].key);
  }
}

static void test_docs_list_every_key(void) {
  char *docs = NULL;
  size_t len = 0;
  cm_err err = {0};
  CHECK_MSG(cm_read_file("docs/models.md", &docs, &len, &err) == CM_OK, "%s", err.msg);
  cm_model_config c;
  cm_model_config_default(&c);
  char *json = cm_model_config_to_json(&c);
  cJSON *defaults = cJSON_Parse(json);
  const cm_model_key *keys;
  int n_keys = cm_model_config_keys(&keys), n = n_keys;
  bool print = getenv("CMAEC_PRINT_MODEL_TABLE") != NULL;
  if (print) printf("| key | type | default | meaning |\n|---|---|---|---|\n");
  for (int i = 0; i < n; i++) {
    char row[1024];
    docs_row(&keys[i], defaults, row, sizeof row);
    if (print) printf("%s\n", row);
    CHECK_MSG(docs && strstr(docs, row),
              "docs/models.md lacks the row\n%s\n"
              "(regenerate: CMAEC_PRINT_MODEL_TABLE=1 test_model_config "
              "test_docs_list_every_key)",
              row);
  }
  /* No stale rows: every key row of the docs is a key of the table. */
  for (const char *line = docs; line && (line = strstr(line, "\n| `")) != NULL;) {
    line += 4;
    size_t len_key = strcspn(line, "`");
    if (strncmp(line, "models/", 7) == 0) continue;
    bool known = false;
    for (int i = 0; i < n_keys; i++)
      known |= strlen(keys[i].key) == len_key && strncmp(keys[i].key, line, len_key) == 0;
    CHECK_MSG(known, "docs/models.md has a row for an unknown key %.*s", (int)len_key, line);
  }
  /* Every shipped variant is described. */
  for (int i = 0; i < N_SHIPPED; i++) {
    const char *base = strrchr(shipped[i], '/') + 1;
    CHECK_MSG(docs && strstr(docs, base), "docs/models.md does not mention %s", base);
  }
  cJSON_Delete(defaults);
  free(json);
  free(docs);
}

/* Messages that say what is wrong: a section given a value, a number beyond
 * double range, an empty "extends"; and a key set twice in one layer (a file, or
 * the --set flags) in its dotted and its section form is an error naming both. */
static void test_sections_ranges_and_conflicts(void) {
  expect_set_fails("mask.ratio=1e400",
                   "--set mask.ratio=1e400: mask.ratio: the number is out of range (magnitude "
                   "over 1.8e308)");
  expect_set_fails("encoder.depth=-1e400", "encoder.depth: the number is out of range");
  expect_set_fails("data.mean=[1,1e999,3]", "data.mean[1]: the number is out of range");
  expect_set_fails("mask={\"ratio\": 2e308}", "mask.ratio: the number is out of range");
  expect_set_fails("mask=\"block\"", "mask: a section, not a key: set one of its keys (kind, "
                                     "ratio, block) as mask.KEY, or give an object of them; got "
                                     "\"block\"");
  expect_set_fails("mask={\"rate\": 0.5}", "mask.rate: unknown key (did you mean mask.ratio?)");
  expect_set_fails("mask={\"ratio\": 0.5, \"ratio\": 0.6}", "mask.ratio: duplicate key");
  expect_load_fails("{\"mask\": {\"ratio\": 1e400}}",
                    "mask.ratio: the number is out of range (magnitude over 1.8e308)");
  expect_load_fails("{\"extends\": \"\"}", "extends: must name a file, got \"\"");
  expect_load_fails("{\"mask\": 0.5}", "mask: a section, not a key: set one of its keys");

  /* a section object through --set sets the keys it names, and only those */
  cm_model_config c;
  cm_model_config_default(&c);
  cm_err err = {0};
  CHECK_MSG(cm_model_config_set(&c, "encoder={\"depth\": 6, \"heads\": 6}", &err) == CM_OK, "%s",
            err.msg);
  CHECK(c.encoder.depth == 6 && c.encoder.heads == 6 && c.encoder.width == 768);

  /* one file: the dotted and the nested form of a key */
  expect_load_fails("{\"encoder.depth\": 4, \"encoder\": {\"depth\": 6}}",
                    "encoder.depth: set twice, as \"encoder.depth\": 4 and in \"encoder\": "
                    "{\"depth\":6}");
  expect_load_fails("{\"encoder\": {\"depth\": 6}, \"encoder.depth\": 6}",
                    "encoder.depth: set twice, as \"encoder.depth\": 6 and in \"encoder\"");
  /* a base and the file extending it may set one key in either form */
  write_tmp("conflict_base.json", "{\"encoder\": {\"depth\": 6}}");
  const char *sub =
      write_tmp("conflict_sub.json", "{\"extends\": \"conflict_base.json\", \"encoder.depth\": 4}");
  CHECK_MSG(cm_model_config_load(sub, NULL, 0, &c, &err) == CM_OK, "%s", err.msg);
  CHECK(c.encoder.depth == 4);
  /* --set: the same form again is a later override (the last wins) ... */
  const char *same[] = {"encoder.depth=3", "encoder.depth=5", "encoder={\"heads\": 4}",
                        "encoder={\"heads\": 8}"};
  CHECK_MSG(cm_model_config_load(sub, same, 4, &c, &err) == CM_OK, "%s", err.msg);
  CHECK(c.encoder.depth == 5 && c.encoder.heads == 8);
  /* ... but both forms of one key are an error naming both flags */
  const char *mixed[] = {"encoder.depth=3", "name=x", "encoder={\"depth\": 5}"};
  cm_status st = cm_model_config_load(sub, mixed, 3, &c, &err);
  expect_invalid(st, &err,
                 "encoder.depth: set twice, as --set encoder.depth=3 and in --set "
                 "encoder={\"depth\": 5}",
                 "--set in both forms");
}

TEST_MAIN(TEST(test_defaults_match_cmae_md), TEST(test_sections_ranges_and_conflicts),
          TEST(test_shipped_variants_load), TEST(test_extends_chain_and_override_order),
          TEST(test_set_each_type), TEST(test_set_errors), TEST(test_validation_rules),
          TEST(test_to_json_round_trip), TEST(test_malformed_files), TEST(test_malformed_strings),
          TEST(test_key_table), TEST(test_docs_list_every_key))
