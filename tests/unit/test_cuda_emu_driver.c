/* tests/unit/test_cuda_emu_driver.c — the emulated CUDA driver (tests/emu/emu_driver.c) on its
 * own: the order of init and context, memory and its bounds, deferred stream queues and event
 * waits across streams, event timing, launch checks, a failing kernel's sticky error, capture
 * and replay, module images. The modules are made here: a small C++ source exporting
 * cm_emu_params and cm_emu_launch by hand, built with the host C++ compiler; and, through
 * emu_compiler(), the CUDA C the renderer makes for a kernel (an elementwise stage and a
 * row reduction), run eagerly and replayed from a capture. */
#define _GNU_SOURCE
#include "tests/emu/emu.h"
#include "codegen/codegen.h"
#include "tests/test.h"

#include <pthread.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#ifdef TEST_ASAN
/* the module instrumented too, so that a kernel's stores are checked */
#define MODULE_FLAGS "-O1 -shared -fPIC -fsanitize=address -fno-omit-frame-pointer"
#else
#define MODULE_FLAGS "-O1 -shared -fPIC"
#endif

static const cm_cuda_driver *d;

/* The test module: add_one(x, n) adds 1 to x[0..n), scale2(x, n) doubles them (one element
 * per thread of the grid), store_config(x) writes the shared bytes and the thread count,
 * fail(code) returns code, write_past(x, n) stores x[n]. */
static const char *MODULE_SOURCE =
    "#include <cstdint>\n"
    "#include <cstring>\n"
    "extern \"C\" int cm_emu_params(const char *name) {\n"
    "  if (!strcmp(name, \"add_one\") || !strcmp(name, \"scale2\")) return 2;\n"
    "  if (!strcmp(name, \"store_config\")) return 1;\n"
    "  if (!strcmp(name, \"write_past\")) return 2;\n"
    "  if (!strcmp(name, \"fail\")) return 1;\n"
    "  return -1;\n"
    "}\n"
    "extern \"C\" int cm_emu_launch(const char *name, const unsigned grid[3],\n"
    "                               const unsigned block[3], unsigned shared, void **params) {\n"
    "  uint64_t threads = (uint64_t)grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];\n"
    "  if (!strcmp(name, \"add_one\") || !strcmp(name, \"scale2\")) {\n"
    "    float *x = *(float **)params[0];\n"
    "    uint64_t n = *(uint64_t *)params[1];\n"
    "    bool add = name[0] == 'a';\n"
    "    for (uint64_t i = 0; i < threads && i < n; i++) x[i] = add ? x[i] + 1 : x[i] * 2;\n"
    "    return 0;\n"
    "  }\n"
    "  if (!strcmp(name, \"store_config\")) {\n"
    "    float *x = *(float **)params[0];\n"
    "    x[0] = (float)shared;\n"
    "    x[1] = (float)threads;\n"
    "    return 0;\n"
    "  }\n"
    "  if (!strcmp(name, \"fail\")) return (int)*(uint64_t *)params[0];\n"
    "  if (!strcmp(name, \"write_past\")) {\n"
    "    float *x = *(float **)params[0];\n"
    "    x[*(uint64_t *)params[1]] = 1;\n"
    "    return 0;\n"
    "  }\n"
    "  return 500;\n"
    "}\n";

/* The module image (header + shared object), built once. */
static unsigned char *image;

static unsigned char *build_image(void) {
  if (image) return image;
  char dir[] = "/tmp/cmaec-emu-driver-test-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char src[128], so[128], cmd[512];
  snprintf(src, sizeof src, "%s/module.cpp", dir);
  snprintf(so, sizeof so, "%s/module.so", dir);
  FILE *f = fopen(src, "w");
  CHECK(f != NULL);
  if (!f) return NULL;
  fputs(MODULE_SOURCE, f);
  fclose(f);
  snprintf(cmd, sizeof cmd, "'%s' " MODULE_FLAGS " -o %s %s", CMAEC_EMU_CXX, so, src);
  CHECK_MSG(system(cmd) == 0, "%s", cmd);
  f = fopen(so, "rb");
  CHECK(f != NULL);
  if (f) {
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    image = malloc(sizeof(emu_image_header) + (size_t)bytes);
    emu_image_header h = {.so_bytes = (uint64_t)bytes};
    memcpy(h.magic, EMU_IMAGE_MAGIC, sizeof h.magic);
    memcpy(image, &h, sizeof h);
    CHECK(fread(image + sizeof h, 1, (size_t)bytes, f) == (size_t)bytes);
    fclose(f);
  }
  unlink(src);
  unlink(so);
  rmdir(dir);
  return image;
}

/* init, the primary context retained and current: every test but the first starts so, and
 * releases it at its end (the last release destroys the context and whatever is in it). */
static void *open_context(void) {
  d = emu_driver();
  void *ctx = NULL;
  CHECK(d->init(0) == 0);
  CHECK(d->primary_ctx_retain(&ctx, 0) == 0);
  CHECK(d->ctx_set_current(ctx) == 0);
  return ctx;
}

static void close_context(void) {
  CHECK(d->primary_ctx_release(0) == 0);
}

static void *load_module(void) {
  void *m = NULL;
  const unsigned char *img = build_image();
  CHECK(img && d->module_load_data(&m, img) == 0);
  return m;
}

static void *function(void *module, const char *name) {
  void *f = NULL;
  CHECK_MSG(d->module_get_function(&f, module, name) == 0, "%s", name);
  return f;
}

/* launches f(x, n) on one block per 256 elements */
static int launch_xn(void *f, cm_cu_ptr x, uint64_t n, void *stream) {
  void *params[] = {&x, &n};
  unsigned blocks = (unsigned)((n + 255) / 256);
  return d->launch_kernel(f, blocks, 1, 1, 256, 1, 1, 0, stream, params, NULL);
}

static const char *error_name(int result) {
  const char *name = NULL;
  d->get_error_name(result, &name);
  return name ? name : "(none)";
}

#define CHECK_RC(call, want)                                                                       \
  do {                                                                                             \
    int rc_ = (call);                                                                              \
    CHECK_MSG(rc_ == (want), "%s: %s, expected %s", #call, error_name(rc_), error_name(want));     \
  } while (0)

/* ---- the tests ----------------------------------------------------------- */

/* First in the binary: nothing before init; nothing without a context after it. */
static void test_init_and_context(void) {
  d = emu_driver();
  cm_cu_ptr p = 0;
  int count = -1;
  void *ctx = NULL;
  CHECK_RC(d->device_get_count(&count), 3);
  CHECK_RC(d->mem_alloc(&p, 64), 3);
  CHECK_RC(d->primary_ctx_retain(&ctx, 0), 3);
  const char *name = NULL, *text = NULL;
  CHECK(d->get_error_name(3, &name) == 0 && strcmp(name, "CUDA_ERROR_NOT_INITIALIZED") == 0);
  CHECK(d->get_error_string(901, &text) == 0 && strstr(text, "capture") != NULL);
  CHECK_RC(d->get_error_name(12345, &name), 1);
  CHECK_RC(d->init(0), 0);
  CHECK_RC(d->mem_alloc(&p, 64), 201);
  void *s = NULL;
  CHECK_RC(d->stream_create(&s, 0), 201);
  CHECK_RC(d->module_load_data(&ctx, build_image()), 201);
  CHECK_RC(d->device_get(&count, 1), 101);
  CHECK_RC(d->primary_ctx_retain(&ctx, 0), 0);
  CHECK_RC(d->mem_alloc(&p, 64), 201); /* retained but not current */
  CHECK_RC(d->ctx_set_current(ctx), 0);
  CHECK_RC(d->mem_alloc(&p, 64), 0);
  CHECK_RC(d->mem_free(p), 0);
  CHECK_RC(d->primary_ctx_release(0), 0);
  CHECK_RC(d->mem_alloc(&p, 64), 201); /* the context went with its last release */
  CHECK_RC(d->primary_ctx_release(0), 201);
}

static void test_device(void) {
  open_context();
  cm_cuda_device dev[2];
  cm_err err = {0};
  CHECK(cm_cuda_devices(d, dev, 2, &err) == 1);
  CHECK(strcmp(dev[0].name, "cmaec emulated device") == 0);
  CHECK(dev[0].cc_major == 8 && dev[0].cc_minor == 0 && strcmp(dev[0].arch, "sm_80") == 0);
  CHECK(dev[0].sms == 4 && dev[0].shared_optin == 163 * 1024);
  CHECK(dev[0].total_bytes == (int64_t)8 << 30);
  int threads = 0;
  CHECK_RC(d->device_get_attribute(&threads, CM_CU_ATTR_MAX_THREADS_PER_BLOCK, 0), 0);
  CHECK(threads == 1024);
  CHECK_RC(d->device_get_attribute(&threads, 100000, 0), 1);
  CHECK(cm_cuda_check(d, 719, "kernel k grid 4x1x1", &err) != CM_OK);
  CHECK_STR_CONTAINS(err.msg, "CUDA_ERROR_LAUNCH_FAILED");
  CHECK_STR_CONTAINS(err.msg, "kernel k grid 4x1x1");
  close_context();
}

static void test_memory(void) {
  open_context();
  enum { N = 1000 };
  float in[N], out[N];
  for (int i = 0; i < N; i++) in[i] = (float)i * 0.5f;
  size_t free0 = 0, total = 0, free1 = 0;
  CHECK_RC(d->mem_get_info(&free0, &total), 0);
  cm_cu_ptr a = 0, b = 0;
  CHECK_RC(d->mem_alloc(&a, sizeof in), 0);
  CHECK_RC(d->mem_alloc(&b, sizeof in), 0);
  CHECK(a % 256 == 0 && b % 256 == 0);
  CHECK_RC(d->mem_get_info(&free1, &total), 0);
  CHECK(free0 - free1 == 2 * sizeof in && total == (size_t)8 << 30);
  CHECK_RC(d->memcpy_htod_async(a, in, sizeof in, NULL), 0);
  CHECK_RC(d->memcpy_dtod_async(b, a, sizeof in, NULL), 0);
  CHECK_RC(d->memset_d8_async(b, 0, 4 * sizeof(float), NULL), 0);
  CHECK_RC(d->memcpy_dtoh_async(out, b, sizeof out, NULL), 0);
  CHECK_RC(d->stream_synchronize(NULL), 0);
  CHECK(out[0] == 0 && out[3] == 0 && out[4] == in[4] && out[N - 1] == in[N - 1]);
  /* copies must lie inside one allocation, at both ends */
  CHECK_RC(d->memcpy_htod_async(a + 4, in, sizeof in, NULL), 1);
  CHECK_RC(d->memcpy_dtoh_async(out, a - 4, 8, NULL), 1);
  CHECK_RC(d->memcpy_dtod_async(b, a + sizeof in - 4, 8, NULL), 1);
  CHECK_RC(d->memset_d8_async(b + sizeof in, 0, 1, NULL), 1);
  CHECK_RC(d->memcpy_dtoh_async(out, a + sizeof in - 4, 4, NULL), 0);
  CHECK_RC(d->mem_free(a + 4), 1);
  CHECK_RC(d->mem_free(a), 0);
  CHECK_RC(d->mem_free(a), 1);
  CHECK_RC(d->memcpy_htod_async(a, in, 4, NULL), 1); /* freed */
  CHECK_RC(d->mem_alloc(&a, 0), 1);
  CHECK_RC(d->mem_alloc(&a, (size_t)9 << 30), 2);
  void *pinned = NULL;
  CHECK_RC(d->mem_alloc_host(&pinned, 4096), 0);
  CHECK_RC(d->memcpy_dtoh_async(pinned, b, sizeof in, NULL), 0);
  CHECK_RC(d->ctx_synchronize(), 0);
  CHECK(((float *)pinned)[N - 1] == in[N - 1]);
  CHECK_RC(d->mem_free_host(pinned), 0);
  CHECK_RC(d->mem_free_host(pinned), 1);
  CHECK_RC(d->mem_free(b), 0);
  close_context();
}

/* Nothing runs at enqueue: the host buffer is untouched until the host waits. */
static void test_deferred(void) {
  open_context();
  void *s = NULL;
  CHECK_RC(d->stream_create(&s, CM_CU_STREAM_NON_BLOCKING), 0);
  float in[4] = {1, 2, 3, 4}, out[4] = {0};
  cm_cu_ptr a = 0;
  CHECK_RC(d->mem_alloc(&a, sizeof in), 0);
  CHECK_RC(d->memcpy_htod_async(a, in, sizeof in, s), 0);
  CHECK_RC(d->memcpy_dtoh_async(out, a, sizeof out, s), 0);
  CHECK(out[0] == 0 && out[3] == 0);
  CHECK_RC(d->stream_synchronize(NULL), 0); /* another stream's wait runs nothing of s */
  CHECK(out[0] == 0);
  CHECK_RC(d->stream_synchronize(s), 0);
  CHECK(out[0] == 1 && out[3] == 4);
  CHECK_RC(d->stream_destroy(s), 0);
  CHECK_RC(d->stream_synchronize(s), 400);
  CHECK_RC(d->mem_free(a), 0);
  close_context();
}

/* Kernels run in queue order, with their parameters as they were at enqueue. */
static void test_queue_order(void) {
  open_context();
  void *m = load_module();
  void *add = function(m, "add_one"), *scale = function(m, "scale2");
  enum { N = 700 };
  float x[N], y[N];
  for (int i = 0; i < N; i++) x[i] = (float)i;
  cm_cu_ptr p = 0;
  CHECK_RC(d->mem_alloc(&p, sizeof x), 0);
  emu_counters c0, c1;
  emu_counters_get(&c0);
  CHECK_RC(d->memcpy_htod_async(p, x, sizeof x, NULL), 0);
  cm_cu_ptr arg = p;
  uint64_t n = N;
  void *params[] = {&arg, &n};
  CHECK_RC(d->launch_kernel(add, 3, 1, 1, 256, 1, 1, 0, NULL, params, NULL), 0);
  n = 10; /* copied at enqueue: the first launch still covers N */
  arg = 0;
  CHECK_RC(launch_xn(scale, p, N, NULL), 0);
  CHECK_RC(d->memcpy_dtoh_async(y, p, sizeof y, NULL), 0);
  emu_counters_get(&c1);
  CHECK(c1.launches == c0.launches);
  CHECK_RC(d->ctx_synchronize(), 0);
  emu_counters_get(&c1);
  CHECK(c1.launches - c0.launches == 2 && c1.copies - c0.copies == 2);
  bool all = true;
  for (int i = 0; i < N; i++) all &= y[i] == (x[i] + 1) * 2;
  CHECK(all);
  CHECK_RC(d->mem_free(p), 0);
  CHECK_RC(d->module_unload(m), 0);
  CHECK_RC(d->module_unload(m), 400);
  close_context();
}

/* B waits on an event A records: syncing B alone runs A's work up to the record first. */
static void test_cross_stream_wait(void) {
  open_context();
  void *m = load_module();
  void *add = function(m, "add_one"), *scale = function(m, "scale2");
  void *a = NULL, *b = NULL, *e = NULL;
  CHECK_RC(d->stream_create(&a, 0), 0);
  CHECK_RC(d->stream_create(&b, 0), 0);
  CHECK_RC(d->event_create(&e, CM_CU_EVENT_DISABLE_TIMING), 0);
  float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8] = {0}, z[8] = {0};
  cm_cu_ptr p = 0;
  CHECK_RC(d->mem_alloc(&p, sizeof x), 0);
  CHECK_RC(d->memcpy_htod_async(p, x, sizeof x, a), 0);
  CHECK_RC(launch_xn(add, p, 8, a), 0);
  CHECK_RC(d->event_record(e, a), 0);
  CHECK_RC(launch_xn(add, p, 8, a), 0); /* after the record: B does not wait for it */
  CHECK_RC(d->stream_wait_event(b, e, 0), 0);
  CHECK_RC(launch_xn(scale, p, 8, b), 0);
  CHECK_RC(d->memcpy_dtoh_async(y, p, sizeof y, b), 0);
  CHECK_RC(d->stream_synchronize(b), 0);
  CHECK(y[0] == 4 && y[7] == 18);
  CHECK_RC(d->memcpy_dtoh_async(z, p, sizeof z, a), 0);
  CHECK_RC(d->event_synchronize(e), 0); /* the record already ran: the rest of A has not */
  CHECK(z[0] == 0);
  CHECK_RC(d->stream_synchronize(a), 0);
  CHECK(z[0] == 5 && z[7] == 19);
  /* without a wait B runs on its own: it sees the buffer as A left it before B's sync */
  CHECK_RC(d->memcpy_htod_async(p, x, sizeof x, a), 0);
  CHECK_RC(d->memcpy_dtoh_async(y, p, sizeof y, b), 0);
  CHECK_RC(d->stream_synchronize(b), 0);
  CHECK(y[0] == 5);
  CHECK_RC(d->event_destroy(e), 0);
  CHECK_RC(d->event_destroy(e), 400);
  CHECK_RC(d->stream_destroy(a), 0);
  CHECK_RC(d->stream_destroy(b), 0);
  CHECK_RC(d->mem_free(p), 0);
  close_context();
}

static void test_event_timing(void) {
  open_context();
  void *start = NULL, *end = NULL, *untimed = NULL, *never = NULL, *s = NULL;
  CHECK_RC(d->stream_create(&s, 0), 0);
  CHECK_RC(d->event_create(&start, CM_CU_EVENT_DEFAULT), 0);
  CHECK_RC(d->event_create(&end, CM_CU_EVENT_DEFAULT), 0);
  CHECK_RC(d->event_create(&untimed, CM_CU_EVENT_DISABLE_TIMING), 0);
  CHECK_RC(d->event_create(&never, CM_CU_EVENT_DEFAULT), 0);
  enum { N = 1 << 22 };
  cm_cu_ptr p = 0;
  CHECK_RC(d->mem_alloc(&p, N), 0);
  CHECK_RC(d->event_record(start, s), 0);
  CHECK_RC(d->memset_d8_async(p, 7, N, s), 0);
  CHECK_RC(d->event_record(end, s), 0);
  CHECK_RC(d->event_record(untimed, s), 0);
  float ms = -1;
  CHECK_RC(d->event_elapsed_time(&ms, start, end), 600);
  CHECK_RC(d->event_synchronize(end), 0);
  CHECK_RC(d->event_elapsed_time(&ms, start, end), 0);
  CHECK(ms > 0 && ms < 10000);
  CHECK_RC(d->event_elapsed_time(&ms, start, untimed), 400);
  CHECK_RC(d->event_elapsed_time(&ms, start, never), 400);
  CHECK_RC(d->stream_synchronize(s), 0);
  CHECK_RC(d->event_synchronize(never), 0);
  CHECK_RC(d->mem_free(p), 0);
  close_context();
}

static void test_launch_checks(void) {
  open_context();
  void *m = load_module();
  void *store = function(m, "store_config");
  void *f = NULL;
  CHECK_RC(d->module_get_function(&f, m, "no_such_kernel"), 500);
  float out[2] = {0};
  cm_cu_ptr p = 0;
  CHECK_RC(d->mem_alloc(&p, sizeof out), 0);
  void *params[] = {&p};
  CHECK_RC(d->launch_kernel(store, 1, 1, 1, 1025, 1, 1, 0, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 1, 1, 1, 32, 32, 2, 0, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 0, 1, 1, 32, 1, 1, 0, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 1, 65536, 1, 32, 1, 1, 0, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 1, 1, 1, 1, 1, 65, 0, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 1, 1, 1, 32, 1, 1, 48 * 1024 + 1, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL), 1);
  CHECK_RC(d->func_set_attribute(store, CM_CU_FUNC_MAX_DYNAMIC_SHARED_BYTES, 163 * 1024 + 1), 1);
  CHECK_RC(d->func_set_attribute(store, CM_CU_FUNC_MAX_DYNAMIC_SHARED_BYTES, 64 * 1024), 0);
  CHECK_RC(d->launch_kernel(store, 1, 1, 1, 32, 1, 1, 64 * 1024 + 1, NULL, params, NULL), 1);
  CHECK_RC(d->launch_kernel(store, 2, 3, 1, 32, 4, 1, 64 * 1024, NULL, params, NULL), 0);
  CHECK_RC(d->memcpy_dtoh_async(out, p, sizeof out, NULL), 0);
  CHECK_RC(d->ctx_synchronize(), 0);
  CHECK(out[0] == 64 * 1024 && out[1] == 2 * 3 * 32 * 4);
  CHECK_RC(d->mem_free(p), 0);
  close_context();
}

/* A kernel failing when it runs: the sync says so, and the error sticks to the context. */
static void test_launch_failure(void) {
  open_context();
  void *m = load_module();
  void *fail = function(m, "fail");
  cm_cu_ptr p = 0;
  CHECK_RC(d->mem_alloc(&p, 16), 0);
  uint64_t code = 1; /* the module's CUDA_ERROR_INVALID_VALUE */
  void *params[] = {&code};
  CHECK_RC(d->launch_kernel(fail, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL), 0);
  CHECK_RC(d->stream_synchronize(NULL), 719);
  CHECK_RC(d->memset_d8_async(p, 0, 16, NULL), 719);
  CHECK_RC(d->ctx_synchronize(), 719);
  close_context();
  open_context(); /* a new context: the error went with the old one */
  m = load_module();
  fail = function(m, "fail");
  CHECK_RC(d->mem_alloc(&p, 16), 0);
  code = 700; /* an illegal address stays one */
  CHECK_RC(d->launch_kernel(fail, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL), 0);
  code = 0;
  CHECK_RC(d->launch_kernel(fail, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL), 0);
  CHECK_RC(d->ctx_synchronize(), 700);
  CHECK_RC(d->mem_free(p), 700);
  close_context();
}

/* Launches f on x (N floats) as the test's step: add, scale, add, and a device copy. */
static void step(void *add, void *scale, cm_cu_ptr x, cm_cu_ptr copy, uint64_t n, void *s) {
  CHECK_RC(launch_xn(add, x, n, s), 0);
  CHECK_RC(launch_xn(scale, x, n, s), 0);
  CHECK_RC(launch_xn(add, x, n, s), 0);
  CHECK_RC(d->memcpy_dtod_async(copy, x, n * sizeof(float), s), 0);
}

static void test_graph_replay(void) {
  open_context();
  void *m = load_module();
  void *add = function(m, "add_one"), *scale = function(m, "scale2");
  void *s = NULL;
  CHECK_RC(d->stream_create(&s, 0), 0);
  enum { N = 300, REPLAYS = 3 };
  float x[N], eager[N], replayed[N], copy[N];
  for (int i = 0; i < N; i++) x[i] = (float)(i % 17) - 8;
  cm_cu_ptr a = 0, b = 0, ca = 0, cb = 0;
  CHECK_RC(d->mem_alloc(&a, sizeof x), 0);
  CHECK_RC(d->mem_alloc(&b, sizeof x), 0);
  CHECK_RC(d->mem_alloc(&ca, sizeof x), 0);
  CHECK_RC(d->mem_alloc(&cb, sizeof x), 0);
  CHECK_RC(d->memcpy_htod_async(a, x, sizeof x, s), 0);
  CHECK_RC(d->memcpy_htod_async(b, x, sizeof x, s), 0);
  for (int r = 0; r < REPLAYS; r++) step(add, scale, a, ca, N, s);
  CHECK_RC(d->stream_synchronize(s), 0);
  void *graph = NULL, *exec = NULL;
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 401);
  step(add, scale, b, cb, N, s);
  CHECK_RC(d->stream_end_capture(s, &graph), 0);
  CHECK_RC(d->memcpy_dtoh_async(replayed, b, sizeof x, s), 0);
  CHECK_RC(d->stream_synchronize(s), 0);
  CHECK(memcmp(replayed, x, sizeof x) == 0); /* recorded, not run */
  CHECK_RC(d->graph_instantiate(&exec, graph, 0), 0);
  CHECK_RC(d->graph_destroy(graph), 0); /* the executable copy stands alone */
  emu_counters c0, c1;
  emu_counters_get(&c0);
  for (int r = 0; r < REPLAYS; r++) CHECK_RC(d->graph_launch(exec, s), 0);
  CHECK_RC(d->memcpy_dtoh_async(eager, a, sizeof x, s), 0);
  CHECK_RC(d->memcpy_dtoh_async(replayed, b, sizeof x, s), 0);
  CHECK_RC(d->memcpy_dtoh_async(copy, cb, sizeof x, s), 0);
  CHECK_RC(d->stream_synchronize(s), 0);
  emu_counters_get(&c1);
  CHECK(c1.graph_launches - c0.graph_launches == REPLAYS);
  CHECK(c1.launches - c0.launches == 3 * REPLAYS);
  CHECK(memcmp(eager, replayed, sizeof x) == 0 && memcmp(copy, replayed, sizeof x) == 0);
  CHECK(eager[0] == ((((-8 + 1) * 2 + 1 + 1) * 2 + 1 + 1) * 2 + 1));
  CHECK_RC(d->graph_exec_destroy(exec), 0);
  CHECK_RC(d->graph_launch(exec, s), 400);
  /* a replay whose module was unloaded since the capture */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  step(add, scale, b, cb, N, s);
  CHECK_RC(d->stream_end_capture(s, &graph), 0);
  CHECK_RC(d->graph_instantiate(&exec, graph, 0), 0);
  CHECK_RC(d->module_unload(m), 0);
  CHECK_RC(d->graph_launch(exec, s), 400);
  CHECK_RC(d->stream_destroy(s), 0);
  close_context();
}

/* A second thread during a capture: allocates, or ends the capture. */
typedef struct capture_peer {
  void *ctx, *stream;
  bool end;
  int alloc_rc, end_rc;
} capture_peer;

static void *capture_peer_work(void *arg) {
  capture_peer *peer = arg;
  peer->alloc_rc = d->ctx_set_current(peer->ctx);
  cm_cu_ptr p = 0;
  if (!peer->alloc_rc) peer->alloc_rc = d->mem_alloc(&p, 16);
  if (!peer->alloc_rc) peer->alloc_rc = d->mem_free(p);
  void *graph = NULL;
  if (peer->end) peer->end_rc = d->stream_end_capture(peer->stream, &graph);
  return NULL;
}

/* What the real driver refuses inside a capture, and the capture it invalidates. */
static void test_capture_invalidated(void) {
  void *ctx = open_context();
  void *m = load_module();
  void *add = function(m, "add_one");
  void *s = NULL, *graph = NULL;
  CHECK_RC(d->stream_create(&s, 0), 0);
  cm_cu_ptr p = 0;
  float host[4] = {0};
  CHECK_RC(d->mem_alloc(&p, sizeof host), 0);
  CHECK_RC(d->stream_begin_capture(NULL, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 900);
  CHECK_RC(d->stream_end_capture(s, &graph), 401);
  /* a synchronize of the capturing stream */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(launch_xn(add, p, 4, s), 0);
  CHECK_RC(d->stream_synchronize(s), 900);
  CHECK_RC(launch_xn(add, p, 4, s), 901);
  graph = &graph;
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  CHECK(graph == NULL);
  /* a host copy */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(d->memcpy_htod_async(p, host, sizeof host, s), 900);
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  /* a context synchronize while a stream captures */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(d->ctx_synchronize(), 900);
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  /* an allocation by the capturing thread (thread-local mode); another thread may allocate */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  capture_peer peer = {.ctx = ctx, .stream = s};
  pthread_t t;
  CHECK(pthread_create(&t, NULL, capture_peer_work, &peer) == 0);
  pthread_join(t, NULL);
  CHECK_RC(peer.alloc_rc, 0);
  CHECK_RC(launch_xn(add, p, 4, s), 0); /* the peer's allocation left the capture alone */
  cm_cu_ptr q = 0;
  CHECK_RC(d->mem_alloc(&q, 16), 900);
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  /* an event recorded in the capture, synchronized */
  void *e = NULL;
  CHECK_RC(d->event_create(&e, 0), 0);
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(d->event_record(e, s), 0);
  CHECK_RC(d->event_synchronize(e), 907);
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  /* a wait on work outside the capture */
  CHECK_RC(d->event_record(e, NULL), 0);
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(d->stream_wait_event(s, e, 0), 905);
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  /* a wait on a record of the same capture is the stream's own order */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  CHECK_RC(d->event_record(e, s), 0);
  CHECK_RC(d->stream_wait_event(s, e, 0), 0);
  CHECK_RC(d->stream_end_capture(s, &graph), 0);
  CHECK(graph != NULL);
  CHECK_RC(d->graph_destroy(graph), 0);
  /* a capture ended by another thread */
  CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
  peer.end = true;
  CHECK(pthread_create(&t, NULL, capture_peer_work, &peer) == 0);
  pthread_join(t, NULL);
  CHECK_RC(peer.end_rc, 908);
  CHECK_RC(d->stream_end_capture(s, &graph), 901);
  /* the stream works as before once the capture ended */
  CHECK_RC(d->memcpy_htod_async(p, host, sizeof host, s), 0);
  CHECK_RC(launch_xn(add, p, 4, s), 0);
  CHECK_RC(d->memcpy_dtoh_async(host, p, sizeof host, s), 0);
  CHECK_RC(d->stream_synchronize(s), 0);
  CHECK(host[0] == 1 && host[3] == 1);
  CHECK_RC(d->stream_destroy(s), 0);
  close_context();
}

static void test_module_images(void) {
  open_context();
  const unsigned char *good = build_image();
  CHECK(good != NULL);
  if (!good) return;
  emu_image_header h;
  memcpy(&h, good, sizeof h);
  size_t bytes = sizeof h + h.so_bytes;
  unsigned char *bad = malloc(bytes);
  memcpy(bad, good, bytes);
  void *m = NULL;
  bad[0] = 'X';
  CHECK_RC(d->module_load_data(&m, bad), 200);
  memcpy(bad, good, sizeof h);
  memset(bad + sizeof h, 0x5a, h.so_bytes); /* the right magic, not a shared object */
  CHECK_RC(d->module_load_data(&m, bad), 200);
  free(bad);
  emu_counters c0, c1;
  emu_counters_get(&c0);
  void *m1 = load_module(), *m2 = load_module();
  emu_counters_get(&c1);
  CHECK(c1.modules_loaded - c0.modules_loaded == 2 && m1 != m2);
  void *f = function(m1, "add_one");
  CHECK_RC(d->module_unload(m1), 0);
  CHECK_RC(d->func_set_attribute(f, CM_CU_FUNC_MAX_DYNAMIC_SHARED_BYTES, 0), 400);
  CHECK(function(m2, "add_one") != NULL);
  CHECK_RC(d->module_unload(m2), 0);
  close_context();
}

/* Several threads, each with the context current and its own stream. */
static void *thread_work(void *ctx) {
  int *ok = malloc(sizeof *ok);
  *ok = 0;
  if (d->ctx_set_current(ctx) != 0) return ok;
  void *m = NULL, *f = NULL, *s = NULL;
  enum { N = 2000 };
  float *x = calloc(N, sizeof *x);
  cm_cu_ptr p = 0;
  if (d->module_load_data(&m, image) == 0 && d->module_get_function(&f, m, "add_one") == 0 &&
      d->stream_create(&s, 0) == 0 && d->mem_alloc(&p, N * sizeof *x) == 0) {
    int rc = d->memcpy_htod_async(p, x, N * sizeof *x, s);
    for (int r = 0; r < 10 && !rc; r++) rc = launch_xn(f, p, N, s);
    if (!rc) rc = d->memcpy_dtoh_async(x, p, N * sizeof *x, s);
    if (!rc) rc = d->stream_synchronize(s);
    *ok = !rc && x[0] == 10 && x[N - 1] == 10;
    d->mem_free(p);
    d->stream_destroy(s);
    d->module_unload(m);
  }
  free(x);
  return ok;
}

static void test_threads(void) {
  void *ctx = open_context();
  CHECK(build_image() != NULL);
  enum { THREADS = 4 };
  pthread_t t[THREADS];
  for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, thread_work, ctx) == 0);
  for (int i = 0; i < THREADS; i++) {
    void *ok = NULL;
    pthread_join(t[i], &ok);
    CHECK_MSG(ok && *(int *)ok, "thread %d", i);
    free(ok);
  }
  close_context();
  free(image);
  image = NULL;
}

/* What a launch costs the emulated driver (enqueue, parameter copy, run) with a kernel that
 * does almost nothing: printed, and every launch counted. */
static void test_launch_overhead(void) {
  open_context();
  void *m = load_module();
  void *store = function(m, "store_config");
  cm_cu_ptr p = 0;
  CHECK_RC(d->mem_alloc(&p, 2 * sizeof(float)), 0);
  void *params[] = {&p};
  enum { LAUNCHES = 20000 };
  emu_counters c0, c1;
  emu_counters_get(&c0);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int rc = 0;
  for (int i = 0; i < LAUNCHES && !rc; i++)
    rc = d->launch_kernel(store, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
  CHECK_RC(rc, 0);
  CHECK_RC(d->stream_synchronize(NULL), 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  emu_counters_get(&c1);
  CHECK(c1.launches - c0.launches == LAUNCHES);
  double us = ((double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3);
  fprintf(stderr, "  %d launches enqueued and run: %.2f us each\n", LAUNCHES, us / LAUNCHES);
  close_context();
}

/* ---- rendered CUDA C through the emulated compiler ------------------------ */

enum { ROWS = 8, ROW_LEN = 250, N_X = ROWS * ROW_LEN };

/* stage 0: y = x * 2 + 1; stage 1: out[i] = sum of row i of y (a block-wide reduction) */
static void build_rendered_kernel(cm_kernel *k) {
  cm_kernel_init(k, "t_emu");
  int x = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, N_X, -1, 0);
  int y = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, N_X, -1, 0);
  int out = cm_kernel_add_buffer(k, CM_KBUF_ARENA, CM_F32, ROWS, -1, 0);
  cm_kstage *s = cm_kernel_add_stage(k, "scale");
  s->n_dom = 1;
  s->dom[0] = N_X;
  s->n_parallel = 1;
  int v = cm_kx_var(s, 0);
  int ld = cm_kx_load(s, k, x, v);
  s->stores[0] =
      (cm_kstore){y, v,
                  cm_kx_op(s, CM_OP_ADD, CM_F32,
                           cm_kx_op(s, CM_OP_MUL, CM_F32, ld, cm_kx_const(s, CM_F32, 2), -1),
                           cm_kx_const(s, CM_F32, 1), -1)};
  s->n_stores = 1;
  s = cm_kernel_add_stage(k, "rowsum");
  s->n_dom = 1;
  s->dom[0] = ROWS;
  s->n_parallel = 1;
  s->n_red = 1;
  s->red[0] = ROW_LEN;
  s->red_op = CM_KRED_SUM;
  s->acc_dtype = CM_F32;
  int idx =
      cm_kx_iadd(s, cm_kx_imul(s, cm_kx_var(s, 0), cm_kx_iconst(s, ROW_LEN)), cm_kx_var(s, 1));
  s->body = cm_kx_load(s, k, y, idx);
  s->stores[0] = (cm_kstore){out, cm_kx_var(s, 0), cm_kx_acc(s)};
  s->n_stores = 1;
}

/* Runs the kernel's stages on stream s (eagerly, or into its capture). */
static void launch_rendered(const cm_kernel *k, const cm_cuda_render_opts *ro, void *const *fns,
                            void **args, void *s) {
  for (int i = 0; i < k->n_stages; i++) {
    cm_cuda_launch l = cm_cuda_stage_launch(k, i, ro);
    CHECK_RC(d->launch_kernel(fns[i], l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1],
                              l.block[2], l.shared_bytes, s, args, NULL),
             0);
  }
}

static void test_rendered_cuda(void) {
  open_context();
  cm_err err = {0};
  cm_target t;
  CHECK_MSG(cm_target_cuda("sm_80", &t, &err) == CM_OK, "%s", err.msg);
  cm_kernel k;
  build_rendered_kernel(&k);
  cm_cuda_render_opts ro = {&t, false};
  char *source = NULL;
  CHECK_MSG(cm_cuda_module_source(&k, &t, false, &source, &err) == CM_OK, "%s", err.msg);
  const cm_cuda_compiler *c = emu_compiler();
  cm_cubin img = {0};
  CHECK_MSG(source && c->compile(c->self, source, "t_emu.cu", "sm_80", &img, &err) == CM_OK, "%s",
            err.msg);
  void *m = NULL, *fns[2] = {NULL, NULL};
  CHECK_RC(img.data ? d->module_load_data(&m, img.data) : 200, 0);
  if (m) {
    fns[0] = function(m, CM_CUDA_MODULE_KERNEL "_s0");
    fns[1] = function(m, CM_CUDA_MODULE_KERNEL "_s1");
  }
  float x[N_X], y[N_X], out[ROWS], replayed[ROWS];
  for (int i = 0; i < N_X; i++) x[i] = (float)((i * 37) % 101) / 16.0f - 3.0f;
  cm_cu_ptr bufs[3] = {0};
  CHECK_RC(d->mem_alloc(&bufs[0], sizeof x), 0);
  CHECK_RC(d->mem_alloc(&bufs[1], sizeof y), 0);
  CHECK_RC(d->mem_alloc(&bufs[2], sizeof out), 0);
  void *args[3] = {&bufs[0], &bufs[1], &bufs[2]};
  void *s = NULL, *graph = NULL, *exec = NULL;
  CHECK_RC(d->stream_create(&s, 0), 0);
  if (fns[0] && fns[1]) {
    CHECK_RC(d->memcpy_htod_async(bufs[0], x, sizeof x, s), 0);
    launch_rendered(&k, &ro, fns, args, s);
    CHECK_RC(d->memcpy_dtoh_async(y, bufs[1], sizeof y, s), 0);
    CHECK_RC(d->memcpy_dtoh_async(out, bufs[2], sizeof out, s), 0);
    CHECK_RC(d->stream_synchronize(s), 0);
    bool ys = true;
    for (int i = 0; i < N_X; i++) ys &= y[i] == x[i] * 2 + 1;
    CHECK(ys);
    for (int r = 0; r < ROWS; r++) {
      double want = 0;
      for (int j = 0; j < ROW_LEN; j++) want += (double)x[r * ROW_LEN + j] * 2 + 1;
      CHECK_NEAR(out[r], want, 1e-5);
    }
    /* the same stages captured and replayed over a zeroed output */
    CHECK_RC(d->stream_begin_capture(s, CM_CU_CAPTURE_MODE_THREAD_LOCAL), 0);
    launch_rendered(&k, &ro, fns, args, s);
    CHECK_RC(d->stream_end_capture(s, &graph), 0);
    CHECK_RC(d->graph_instantiate(&exec, graph, 0), 0);
    CHECK_RC(d->memset_d8_async(bufs[2], 0, sizeof out, s), 0);
    CHECK_RC(d->graph_launch(exec, s), 0);
    CHECK_RC(d->memcpy_dtoh_async(replayed, bufs[2], sizeof out, s), 0);
    CHECK_RC(d->stream_synchronize(s), 0);
    CHECK(memcmp(out, replayed, sizeof out) == 0);
  }
  CHECK_RC(d->stream_destroy(s), 0);
  close_context();
  cm_cubin_free(&img);
  free(source);
  cm_kernel_free(&k);
}

#ifdef TEST_ASAN
/* Device memory is exactly the bytes asked: AddressSanitizer stops a kernel that stores one
 * float past its buffer (in a child process, which the report ends). */
static void test_asan_sees_overrun(void) {
  CHECK(build_image() != NULL);
  int pipe_fd[2];
  CHECK(pipe(pipe_fd) == 0);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(pipe_fd[1], 2);
    open_context();
    void *m = load_module();
    void *f = function(m, "write_past");
    cm_cu_ptr p = 0;
    int rc = d->mem_alloc(&p, 10 * sizeof(float));
    if (!rc) rc = launch_xn(f, p, 10, NULL);
    if (!rc) rc = d->stream_synchronize(NULL);
    _exit(rc == 0 ? 0 : 3); /* reached only when nothing saw the store */
  }
  close(pipe_fd[1]);
  char report[65536];
  size_t got = 0;
  ssize_t n;
  while (got < sizeof report - 1 &&
         (n = read(pipe_fd[0], report + got, sizeof report - 1 - got)) > 0)
    got += (size_t)n;
  report[got] = 0;
  close(pipe_fd[0]);
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK_MSG(!WIFEXITED(status) || WEXITSTATUS(status) != 0, "the overrun went unseen");
  CHECK_STR_CONTAINS(report, "heap-buffer-overflow");
}
#define TEST_ASAN_CASES , TEST(test_asan_sees_overrun)
#else
#define TEST_ASAN_CASES
#endif

TEST_MAIN(TEST(test_init_and_context), TEST(test_device), TEST(test_memory), TEST(test_deferred),
          TEST(test_queue_order), TEST(test_cross_stream_wait), TEST(test_event_timing),
          TEST(test_launch_checks), TEST(test_launch_failure), TEST(test_graph_replay),
          TEST(test_capture_invalidated), TEST(test_module_images), TEST(test_threads),
          TEST(test_launch_overhead), TEST(test_rendered_cuda) TEST_ASAN_CASES)
