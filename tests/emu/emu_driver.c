/* tests/emu/emu_driver.c — the driver half of the emulated CUDA device: a
 * cm_cuda_driver over host memory (tests/emu/emu.h).
 *
 * The semantics follow the real driver closely enough that a backend which is
 * wrong on a GPU is wrong here too:
 *   - init precedes everything; a context must be current (per thread, as
 *     cuCtxSetCurrent makes it) for memory, stream, event and module calls;
 *   - device memory is posix_memalign of exactly the bytes asked (256-byte
 *     aligned as cuMemAlloc), so AddressSanitizer sees a kernel stepping past
 *     its allocation; copies are checked against the allocation table when
 *     they are enqueued; freeing memory or unloading a module first runs the
 *     queued work (cudaFree synchronizes too), so no queued op outlives them;
 *   - nothing runs at enqueue: a stream is a queue that runs when the host
 *     waits (stream, event or context synchronize), so a backend that reads
 *     results before it waits reads stale data. A host-to-device copy reads its
 *     source when it runs, as a copy from pinned memory does;
 *   - the NULL stream (and CU_STREAM_LEGACY, CU_STREAM_PER_THREAD) is one more
 *     queue of its own: it does not synchronize with the other streams;
 *   - a failing kernel makes the context's error sticky (CUDA_ERROR_LAUNCH_FAILED,
 *     or CUDA_ERROR_ILLEGAL_ADDRESS when the module says so, from every call
 *     until the primary context's last release destroys it and all in it);
 *   - stream capture records launches, device copies, memsets and event records
 *     into a graph; a host copy, a synchronize of the capturing stream, an
 *     allocation or a free while a capture of mode global (from any thread) or
 *     thread-local (from its thread) runs is CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
 *     and invalidates the capture, as do a wait on an event recorded outside it
 *     (CUDA_ERROR_STREAM_CAPTURE_ISOLATION: captures do not span streams here, no
 *     fork and join) and a synchronize of an event recorded inside it
 *     (CUDA_ERROR_CAPTURED_EVENT).
 * One mutex guards the whole state; kernels run under it, on the thread that waits. */
#define _GNU_SOURCE
#include "tests/emu/emu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* CUresult values (cuda.h). */
enum {
  EMU_SUCCESS = 0,
  EMU_INVALID_VALUE = 1,
  EMU_OUT_OF_MEMORY = 2,
  EMU_NOT_INITIALIZED = 3,
  EMU_INVALID_DEVICE = 101,
  EMU_INVALID_IMAGE = 200,
  EMU_INVALID_CONTEXT = 201,
  EMU_INVALID_HANDLE = 400,
  EMU_ILLEGAL_STATE = 401,
  EMU_NOT_FOUND = 500,
  EMU_NOT_READY = 600,
  EMU_ILLEGAL_ADDRESS = 700,
  EMU_LAUNCH_OUT_OF_RESOURCES = 701,
  EMU_LAUNCH_FAILED = 719,
  EMU_CAPTURE_UNSUPPORTED = 900,
  EMU_CAPTURE_INVALIDATED = 901,
  EMU_CAPTURE_ISOLATION = 905,
  EMU_CAPTURED_EVENT = 907,
  EMU_CAPTURE_WRONG_THREAD = 908,
};

/* The emulated device's figures. */
enum {
  EMU_SMS = 4,
  EMU_CC_MAJOR = 8,
  EMU_CC_MINOR = 0,
  EMU_MAX_THREADS = 1024,
  EMU_SHARED_DEFAULT = 48 * 1024,
  EMU_SHARED_OPTIN = 163 * 1024, /* compute capability 8.0 (A100): cm_target_cuda("sm_80") */
  EMU_ALIGN = 256,
  EMU_PARAM_BYTES = 8,
};
static const size_t EMU_TOTAL_BYTES = (size_t)8 << 30;
#define EMU_DEVICE_NAME "cmaec emulated device"

/* ---- the objects -------------------------------------------------------- */

typedef struct emu_module {
  struct emu_module *next;
  void *so;
  emu_module_params_fn params;
  emu_module_launch_fn launch;
  struct emu_function *functions;
} emu_module;

typedef struct emu_function {
  struct emu_function *next;
  emu_module *module;
  char *name;
  int params;              /* from the module's cm_emu_params */
  unsigned max_dyn_shared; /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES */
} emu_function;

typedef enum emu_op_kind {
  OP_COPY, /* any direction: the pointers are host addresses */
  OP_MEMSET,
  OP_LAUNCH,
  OP_RECORD,     /* event record */
  OP_WAIT,       /* wait until another stream has run up to an op */
  OP_GRAPH_MARK, /* counts a graph replay when it runs */
} emu_op_kind;

typedef struct emu_op {
  struct emu_op *next;
  emu_op_kind kind;
  long id; /* the order of enqueue across all streams; 0 inside a graph */
  void *dst;
  const void *src;
  size_t bytes;
  unsigned char value;
  emu_function *function;
  unsigned grid[3], block[3], shared;
  struct emu_event *event;
  struct emu_stream *wait_stream;
  long wait_id;
  int nparams;
  uint64_t params[]; /* copied at enqueue, EMU_PARAM_BYTES each */
} emu_op;

/* A recorded graph or its executable copy: an op list, in order. */
typedef struct emu_graph {
  struct emu_graph *next;
  bool executable;
  emu_op *head, *tail;
} emu_graph;

typedef enum emu_capture {
  CAPTURE_NONE,
  CAPTURE_ACTIVE,
  CAPTURE_INVALIDATED,
} emu_capture;

typedef struct emu_stream {
  struct emu_stream *next;
  emu_op *head, *tail;
  long done_id; /* the id of the last op run (ops run in id order) */
  emu_capture capture;
  int capture_mode;         /* CUstreamCaptureMode: 0 global, 1 thread-local, 2 relaxed */
  pthread_t capture_thread; /* the thread that began the capture */
  emu_graph *graph;         /* while capturing */
} emu_stream;

typedef struct emu_event {
  struct emu_event *next;
  unsigned flags;
  emu_stream *record_stream; /* of the last record enqueued; NULL: never recorded */
  long record_id;
  long done_id; /* the last record that ran */
  double done_ms;
  emu_graph *captured_in; /* the capture its last record went into */
} emu_event;

typedef struct emu_alloc {
  uintptr_t base;
  size_t bytes;
} emu_alloc;

typedef struct emu_table {
  emu_alloc *items;
  size_t n, cap;
} emu_table;

typedef struct emu_context {
  int refs; /* primary context retains */
  int sticky;
  emu_stream null_stream;
  emu_stream *streams, *dead_streams; /* dead ones stay until the context goes: ops name them */
  emu_event *events, *dead_events;
  emu_module *modules;
  emu_graph *graphs;
  emu_table device, host;
  size_t device_bytes;
} emu_context;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bool initialized;
static emu_context context;
static long last_id;
static emu_counters counters;
static _Thread_local emu_context *current;

/* ---- helpers ------------------------------------------------------------- */

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The check every context call starts with (the lock held). */
static int need_context(void) {
  if (!initialized) return EMU_NOT_INITIALIZED;
  if (current != &context || context.refs == 0) return EMU_INVALID_CONTEXT;
  return context.sticky;
}

#define LOCKED(call)                                                                               \
  do {                                                                                             \
    pthread_mutex_lock(&lock);                                                                     \
    int locked_rc_ = (call);                                                                       \
    pthread_mutex_unlock(&lock);                                                                   \
    return locked_rc_;                                                                             \
  } while (0)

static bool table_add(emu_table *t, uintptr_t base, size_t bytes) {
  if (t->n == t->cap) {
    size_t cap = t->cap ? 2 * t->cap : 64;
    emu_alloc *items = realloc(t->items, cap * sizeof *items);
    if (!items) return false;
    t->items = items;
    t->cap = cap;
  }
  t->items[t->n++] = (emu_alloc){base, bytes};
  return true;
}

/* The index of the allocation starting at base; -1 when there is none. */
static long table_find_base(const emu_table *t, uintptr_t base) {
  for (size_t i = 0; i < t->n; i++)
    if (t->items[i].base == base) return (long)i;
  return -1;
}

/* Whether [p, p + bytes) lies inside one allocation of t. */
static bool table_covers(const emu_table *t, uintptr_t p, size_t bytes) {
  for (size_t i = 0; i < t->n; i++) {
    const emu_alloc *a = &t->items[i];
    if (p >= a->base && p - a->base <= a->bytes && bytes <= a->bytes - (p - a->base)) return true;
  }
  return false;
}

static void table_remove(emu_table *t, long i) {
  t->items[i] = t->items[--t->n];
}

static emu_op *op_new(emu_op_kind kind, int nparams) {
  emu_op *op = calloc(1, sizeof *op + (size_t)nparams * sizeof op->params[0]);
  if (op) {
    op->kind = kind;
    op->nparams = nparams;
  }
  return op;
}

static emu_op *op_clone(const emu_op *src) {
  size_t size = sizeof *src + (size_t)src->nparams * sizeof src->params[0];
  emu_op *op = malloc(size);
  if (!op) return NULL;
  memcpy(op, src, size);
  op->next = NULL;
  op->id = 0;
  return op;
}

static void ops_free(emu_op *op) {
  while (op) {
    emu_op *next = op->next;
    free(op);
    op = next;
  }
}

static void list_append(emu_op **head, emu_op **tail, emu_op *op) {
  op->next = NULL;
  if (*tail)
    (*tail)->next = op;
  else
    *head = op;
  *tail = op;
}

/* ---- handles --------------------------------------------------------------
 * A handle is the object's address; it is valid while it is on its live list. */

static emu_stream *find_stream(void *handle) {
  /* NULL, CU_STREAM_LEGACY (0x1) and CU_STREAM_PER_THREAD (0x2): the NULL stream */
  if ((uintptr_t)handle <= 2) return &context.null_stream;
  for (emu_stream *s = context.streams; s; s = s->next)
    if (s == handle) return s;
  return NULL;
}

static emu_event *find_event(void *handle) {
  for (emu_event *e = context.events; e; e = e->next)
    if (e == handle) return e;
  return NULL;
}

static emu_module *find_module(void *handle) {
  for (emu_module *m = context.modules; m; m = m->next)
    if (m == handle) return m;
  return NULL;
}

static emu_function *find_function(void *handle) {
  for (emu_module *m = context.modules; m; m = m->next)
    for (emu_function *f = m->functions; f; f = f->next)
      if (f == handle) return f;
  return NULL;
}

static emu_graph *find_graph(void *handle, bool executable) {
  for (emu_graph *g = context.graphs; g; g = g->next)
    if (g == handle && g->executable == executable) return g;
  return NULL;
}

/* ---- running the queues -------------------------------------------------- */

static void run_copy(const emu_op *op) {
  if (op->kind == OP_COPY)
    memmove(op->dst, op->src, op->bytes);
  else
    memset(op->dst, op->value, op->bytes);
  counters.copies++;
}

static int run_launch(const emu_op *op) {
  void *argv[op->nparams > 0 ? op->nparams : 1];
  for (int i = 0; i < op->nparams; i++) argv[i] = (void *)&op->params[i];
  const emu_function *f = op->function;
  int rc = f->module->launch(f->name, op->grid, op->block, op->shared, argv);
  counters.launches++;
  /* an illegal address the module saw stays what it is; any other failure is the
   * driver's unspecified launch failure */
  if (rc == EMU_SUCCESS || rc == EMU_ILLEGAL_ADDRESS) return rc;
  return EMU_LAUNCH_FAILED;
}

/* Runs s's queue in order up to the op until_id (inclusive); waits run the
 * streams they wait on first. A wait always names an op enqueued before it, so
 * the recursion ends. Stops at the context's sticky error and returns it. */
static int run_stream(emu_stream *s, long until_id) {
  while (s->head && s->head->id <= until_id && context.sticky == EMU_SUCCESS) {
    emu_op *op = s->head;
    if (op->kind == OP_WAIT && op->wait_stream->done_id < op->wait_id) {
      int rc = run_stream(op->wait_stream, op->wait_id);
      if (rc) return rc;
    }
    s->head = op->next;
    if (!s->head) s->tail = NULL;
    s->done_id = op->id;
    switch (op->kind) {
    case OP_COPY:
    case OP_MEMSET: run_copy(op); break;
    case OP_LAUNCH: context.sticky = run_launch(op); break;
    case OP_RECORD:
      if (op->event->done_id < op->id) {
        op->event->done_id = op->id;
        op->event->done_ms = now_ms();
      }
      break;
    case OP_WAIT: break;
    case OP_GRAPH_MARK: counters.graph_launches++; break;
    }
    free(op);
  }
  return context.sticky;
}

static int run_all(void) {
  int rc = run_stream(&context.null_stream, last_id);
  for (emu_stream *s = context.streams; s && !rc; s = s->next) rc = run_stream(s, last_id);
  return rc;
}

/* ---- enqueueing ---------------------------------------------------------- */

static void capture_invalidate(emu_stream *s) {
  s->capture = CAPTURE_INVALIDATED;
  ops_free(s->graph->head);
  s->graph->head = s->graph->tail = NULL;
}

/* Whether the calling thread may not make "potentially unsafe" calls (memory
 * allocation and release) because of a capture under way, as cuStreamBeginCapture's
 * mode says; such a call invalidates those captures. */
static bool unsafe_call_in_capture(void) {
  bool refused = false;
  for (emu_stream *s = context.streams; s; s = s->next)
    if (s->capture == CAPTURE_ACTIVE &&
        (s->capture_mode == 0 ||
         (s->capture_mode == 1 && pthread_equal(s->capture_thread, pthread_self())))) {
      capture_invalidate(s);
      refused = true;
    }
  return refused;
}

/* Puts op at the end of s's queue, or of its capture. Takes op (frees it on error). */
static int enqueue(emu_stream *s, emu_op *op) {
  if (s->capture == CAPTURE_INVALIDATED) {
    free(op);
    return EMU_CAPTURE_INVALIDATED;
  }
  if (s->capture == CAPTURE_ACTIVE) {
    if (op->kind == OP_RECORD) op->event->captured_in = s->graph;
    list_append(&s->graph->head, &s->graph->tail, op);
    return EMU_SUCCESS;
  }
  op->id = ++last_id;
  if (op->kind == OP_RECORD) {
    op->event->record_stream = s;
    op->event->record_id = op->id;
    op->event->captured_in = NULL;
  }
  list_append(&s->head, &s->tail, op);
  return EMU_SUCCESS;
}

/* Enqueues a copy or memset after checking its device ends against the allocation
 * table; a host end (dst_device or src_device false) is the caller's memory, unchecked. */
static int enqueue_copy(emu_op_kind kind, void *dst, bool dst_device, const void *src,
                        bool src_device, size_t bytes, unsigned char value, void *stream) {
  int rc = need_context();
  if (rc) return rc;
  emu_stream *s = find_stream(stream);
  if (!s) return EMU_INVALID_HANDLE;
  if (!dst || (kind == OP_COPY && !src)) return EMU_INVALID_VALUE;
  if (dst_device && !table_covers(&context.device, (uintptr_t)dst, bytes)) return EMU_INVALID_VALUE;
  if (src_device && !table_covers(&context.device, (uintptr_t)src, bytes)) return EMU_INVALID_VALUE;
  bool host_side = !dst_device || (kind == OP_COPY && !src_device);
  if (host_side && s->capture == CAPTURE_ACTIVE) {
    capture_invalidate(s);
    return EMU_CAPTURE_UNSUPPORTED;
  }
  if (bytes == 0) return s->capture == CAPTURE_INVALIDATED ? EMU_CAPTURE_INVALIDATED : 0;
  emu_op *op = op_new(kind, 0);
  if (!op) return EMU_OUT_OF_MEMORY;
  op->dst = dst;
  op->src = src;
  op->bytes = bytes;
  op->value = value;
  return enqueue(s, op);
}

/* ---- the device and the context ----------------------------------------- */

static int emu_init(unsigned flags) {
  if (flags != 0) return EMU_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  initialized = true;
  pthread_mutex_unlock(&lock);
  return EMU_SUCCESS;
}

static int emu_driver_get_version(int *version) {
  if (!version) return EMU_INVALID_VALUE;
  *version = 13000;
  return EMU_SUCCESS;
}

static int need_device(int device) {
  pthread_mutex_lock(&lock);
  bool init = initialized;
  pthread_mutex_unlock(&lock);
  if (!init) return EMU_NOT_INITIALIZED;
  return device == 0 ? EMU_SUCCESS : EMU_INVALID_DEVICE;
}

static int emu_device_get_count(int *count) {
  if (!count) return EMU_INVALID_VALUE;
  int rc = need_device(0);
  if (rc) return rc;
  *count = 1;
  return EMU_SUCCESS;
}

static int emu_device_get(int *device, int ordinal) {
  if (!device) return EMU_INVALID_VALUE;
  int rc = need_device(ordinal);
  if (rc) return rc;
  *device = 0;
  return EMU_SUCCESS;
}

static int emu_device_get_name(char *name, int len, int device) {
  if (!name || len <= 0) return EMU_INVALID_VALUE;
  int rc = need_device(device);
  if (rc) return rc;
  snprintf(name, (size_t)len, "%s", EMU_DEVICE_NAME);
  return EMU_SUCCESS;
}

static int emu_device_total_mem(size_t *bytes, int device) {
  if (!bytes) return EMU_INVALID_VALUE;
  int rc = need_device(device);
  if (rc) return rc;
  *bytes = EMU_TOTAL_BYTES;
  return EMU_SUCCESS;
}

/* The CUdevice_attribute values the emulated device answers (cuda.h numbers). */
static bool attribute_value(int attribute, int *value) {
  static const struct {
    int attribute, value;
  } table[] = {
      {CM_CU_ATTR_MAX_THREADS_PER_BLOCK, EMU_MAX_THREADS},
      {2, 1024},               /* MAX_BLOCK_DIM_X */
      {3, 1024},               /* MAX_BLOCK_DIM_Y */
      {4, 64},                 /* MAX_BLOCK_DIM_Z */
      {5, 2147483647},         /* MAX_GRID_DIM_X */
      {6, 65535},              /* MAX_GRID_DIM_Y */
      {7, 65535},              /* MAX_GRID_DIM_Z */
      {8, EMU_SHARED_DEFAULT}, /* MAX_SHARED_MEMORY_PER_BLOCK */
      {9, 65536},              /* TOTAL_CONSTANT_MEMORY */
      {10, 32},                /* WARP_SIZE */
      {12, 65536},             /* MAX_REGISTERS_PER_BLOCK */
      {13, 1410000},           /* CLOCK_RATE (kHz) */
      {CM_CU_ATTR_MULTIPROCESSOR_COUNT, EMU_SMS},
      {39, 2048}, /* MAX_THREADS_PER_MULTIPROCESSOR */
      {41, 1},    /* UNIFIED_ADDRESSING */
      {CM_CU_ATTR_CC_MAJOR, EMU_CC_MAJOR},
      {CM_CU_ATTR_CC_MINOR, EMU_CC_MINOR},
      {81, 100 * 1024}, /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
      {82, 65536},      /* MAX_REGISTERS_PER_MULTIPROCESSOR */
      {CM_CU_ATTR_MAX_SHARED_PER_BLOCK_OPTIN, EMU_SHARED_OPTIN},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (table[i].attribute == attribute) {
      *value = table[i].value;
      return true;
    }
  return false;
}

static int emu_device_get_attribute(int *value, int attribute, int device) {
  if (!value) return EMU_INVALID_VALUE;
  int rc = need_device(device);
  if (rc) return rc;
  return attribute_value(attribute, value) ? EMU_SUCCESS : EMU_INVALID_VALUE;
}

static int primary_ctx_retain(void **ctx, int device) {
  if (!initialized) return EMU_NOT_INITIALIZED;
  if (device != 0) return EMU_INVALID_DEVICE;
  context.refs++;
  *ctx = &context;
  return EMU_SUCCESS;
}

static int emu_primary_ctx_retain(void **ctx, int device) {
  if (!ctx) return EMU_INVALID_VALUE;
  LOCKED(primary_ctx_retain(ctx, device));
}

static void module_free(emu_module *m) {
  for (emu_function *f = m->functions; f;) {
    emu_function *next = f->next;
    free(f->name);
    free(f);
    f = next;
  }
  dlclose(m->so);
  free(m);
}

static void streams_free(emu_stream *s) {
  while (s) {
    emu_stream *next = s->next;
    ops_free(s->head);
    if (s->graph) {
      ops_free(s->graph->head);
      free(s->graph);
    }
    free(s);
    s = next;
  }
}

static void events_free(emu_event *e) {
  while (e) {
    emu_event *next = e->next;
    free(e);
    e = next;
  }
}

/* The last release destroys the context and everything in it, as the driver
 * does; the sticky error goes with it. */
static void context_destroy(void) {
  emu_context *c = &context;
  ops_free(c->null_stream.head);
  if (c->null_stream.graph) {
    ops_free(c->null_stream.graph->head);
    free(c->null_stream.graph);
  }
  streams_free(c->streams);
  streams_free(c->dead_streams);
  events_free(c->events);
  events_free(c->dead_events);
  while (c->graphs) {
    emu_graph *next = c->graphs->next;
    ops_free(c->graphs->head);
    free(c->graphs);
    c->graphs = next;
  }
  while (c->modules) {
    emu_module *next = c->modules->next;
    module_free(c->modules);
    c->modules = next;
  }
  for (size_t i = 0; i < c->device.n; i++) free((void *)c->device.items[i].base);
  for (size_t i = 0; i < c->host.n; i++) free((void *)c->host.items[i].base);
  free(c->device.items);
  free(c->host.items);
  memset(c, 0, sizeof *c);
}

static int primary_ctx_release(int device) {
  if (!initialized) return EMU_NOT_INITIALIZED;
  if (device != 0) return EMU_INVALID_DEVICE;
  if (context.refs == 0) return EMU_INVALID_CONTEXT;
  if (--context.refs == 0) context_destroy();
  return EMU_SUCCESS;
}

static int emu_primary_ctx_release(int device) {
  LOCKED(primary_ctx_release(device));
}

static int ctx_set_current(void *ctx) {
  if (!initialized) return EMU_NOT_INITIALIZED;
  if (ctx && (ctx != &context || context.refs == 0)) return EMU_INVALID_CONTEXT;
  current = ctx;
  return EMU_SUCCESS;
}

static int emu_ctx_set_current(void *ctx) {
  LOCKED(ctx_set_current(ctx));
}

static int ctx_synchronize(void) {
  int rc = need_context();
  if (rc) return rc;
  bool capturing = context.null_stream.capture == CAPTURE_ACTIVE;
  for (emu_stream *s = context.streams; s; s = s->next)
    if (s->capture == CAPTURE_ACTIVE) {
      capture_invalidate(s);
      capturing = true;
    }
  if (capturing) return EMU_CAPTURE_UNSUPPORTED;
  return run_all();
}

static int emu_ctx_synchronize(void) {
  LOCKED(ctx_synchronize());
}

/* ---- memory -------------------------------------------------------------- */

static int mem_get_info(size_t *free_bytes, size_t *total_bytes) {
  int rc = need_context();
  if (rc) return rc;
  *free_bytes = EMU_TOTAL_BYTES - context.device_bytes;
  *total_bytes = EMU_TOTAL_BYTES;
  return EMU_SUCCESS;
}

static int emu_mem_get_info(size_t *free_bytes, size_t *total_bytes) {
  if (!free_bytes || !total_bytes) return EMU_INVALID_VALUE;
  LOCKED(mem_get_info(free_bytes, total_bytes));
}

static int mem_alloc(cm_cu_ptr *ptr, size_t bytes) {
  int rc = need_context();
  if (rc) return rc;
  if (unsafe_call_in_capture()) return EMU_CAPTURE_UNSUPPORTED;
  if (bytes == 0) return EMU_INVALID_VALUE;
  if (bytes > EMU_TOTAL_BYTES - context.device_bytes) return EMU_OUT_OF_MEMORY;
  void *p = NULL;
  /* exactly the bytes asked, so that AddressSanitizer sees a step past the end */
  if (posix_memalign(&p, EMU_ALIGN, bytes) != 0) return EMU_OUT_OF_MEMORY;
  if (!table_add(&context.device, (uintptr_t)p, bytes)) {
    free(p);
    return EMU_OUT_OF_MEMORY;
  }
  context.device_bytes += bytes;
  *ptr = (cm_cu_ptr)(uintptr_t)p;
  return EMU_SUCCESS;
}

static int emu_mem_alloc(cm_cu_ptr *ptr, size_t bytes) {
  if (!ptr) return EMU_INVALID_VALUE;
  LOCKED(mem_alloc(ptr, bytes));
}

/* Like cudaFree, cuMemFree waits for the work queued on the device first (so a
 * pending kernel never touches freed memory); 0 is refused as unknown. */
static int mem_free(cm_cu_ptr ptr) {
  int rc = need_context();
  if (rc) return rc;
  if (unsafe_call_in_capture()) return EMU_CAPTURE_UNSUPPORTED;
  long i = table_find_base(&context.device, (uintptr_t)ptr);
  if (i < 0) return EMU_INVALID_VALUE;
  rc = run_all();
  context.device_bytes -= context.device.items[i].bytes;
  free((void *)context.device.items[i].base);
  table_remove(&context.device, i);
  return rc;
}

static int emu_mem_free(cm_cu_ptr ptr) {
  LOCKED(mem_free(ptr));
}

static int mem_alloc_host(void **ptr, size_t bytes) {
  int rc = need_context();
  if (rc) return rc;
  if (unsafe_call_in_capture()) return EMU_CAPTURE_UNSUPPORTED;
  if (bytes == 0) return EMU_INVALID_VALUE;
  void *p = NULL;
  if (posix_memalign(&p, EMU_ALIGN, bytes) != 0) return EMU_OUT_OF_MEMORY;
  if (!table_add(&context.host, (uintptr_t)p, bytes)) {
    free(p);
    return EMU_OUT_OF_MEMORY;
  }
  *ptr = p;
  return EMU_SUCCESS;
}

static int emu_mem_alloc_host(void **ptr, size_t bytes) {
  if (!ptr) return EMU_INVALID_VALUE;
  LOCKED(mem_alloc_host(ptr, bytes));
}

static int mem_free_host(void *ptr) {
  int rc = need_context();
  if (rc) return rc;
  if (unsafe_call_in_capture()) return EMU_CAPTURE_UNSUPPORTED;
  long i = table_find_base(&context.host, (uintptr_t)ptr);
  if (i < 0) return EMU_INVALID_VALUE;
  rc = run_all();
  free(ptr);
  table_remove(&context.host, i);
  return rc;
}

static int emu_mem_free_host(void *ptr) {
  LOCKED(mem_free_host(ptr));
}

static int emu_memcpy_htod_async(cm_cu_ptr dst, const void *src, size_t bytes, void *stream) {
  LOCKED(enqueue_copy(OP_COPY, (void *)(uintptr_t)dst, true, src, false, bytes, 0, stream));
}

static int emu_memcpy_dtoh_async(void *dst, cm_cu_ptr src, size_t bytes, void *stream) {
  LOCKED(enqueue_copy(OP_COPY, dst, false, (const void *)(uintptr_t)src, true, bytes, 0, stream));
}

static int emu_memcpy_dtod_async(cm_cu_ptr dst, cm_cu_ptr src, size_t bytes, void *stream) {
  LOCKED(enqueue_copy(OP_COPY, (void *)(uintptr_t)dst, true, (const void *)(uintptr_t)src, true,
                      bytes, 0, stream));
}

static int emu_memset_d8_async(cm_cu_ptr dst, unsigned char value, size_t bytes, void *stream) {
  LOCKED(enqueue_copy(OP_MEMSET, (void *)(uintptr_t)dst, true, NULL, false, bytes, value, stream));
}

/* ---- streams and events -------------------------------------------------- */

static int stream_create(void **stream, unsigned flags) {
  int rc = need_context();
  if (rc) return rc;
  if (flags & ~(unsigned)CM_CU_STREAM_NON_BLOCKING) return EMU_INVALID_VALUE;
  emu_stream *s = calloc(1, sizeof *s);
  if (!s) return EMU_OUT_OF_MEMORY;
  s->next = context.streams;
  context.streams = s;
  *stream = s;
  return EMU_SUCCESS;
}

static int emu_stream_create(void **stream, unsigned flags) {
  if (!stream) return EMU_INVALID_VALUE;
  LOCKED(stream_create(stream, flags));
}

/* The stream's queued work still runs (here, now); the object stays on the dead
 * list while ops of other streams may wait on it. */
static int stream_destroy(void *stream) {
  int rc = need_context();
  if (rc) return rc;
  emu_stream *s = find_stream(stream);
  if (!s || s == &context.null_stream) return EMU_INVALID_HANDLE;
  if (s->capture != CAPTURE_NONE) {
    ops_free(s->graph->head);
    free(s->graph);
    s->graph = NULL;
    s->capture = CAPTURE_NONE;
  }
  rc = run_stream(s, last_id);
  for (emu_stream **p = &context.streams; *p; p = &(*p)->next)
    if (*p == s) {
      *p = s->next;
      break;
    }
  s->next = context.dead_streams;
  context.dead_streams = s;
  return rc;
}

static int emu_stream_destroy(void *stream) {
  LOCKED(stream_destroy(stream));
}

static int stream_synchronize(void *stream) {
  int rc = need_context();
  if (rc) return rc;
  emu_stream *s = find_stream(stream);
  if (!s) return EMU_INVALID_HANDLE;
  if (s->capture == CAPTURE_ACTIVE) {
    capture_invalidate(s);
    return EMU_CAPTURE_UNSUPPORTED;
  }
  if (s->capture == CAPTURE_INVALIDATED) return EMU_CAPTURE_INVALIDATED;
  return run_stream(s, last_id);
}

static int emu_stream_synchronize(void *stream) {
  LOCKED(stream_synchronize(stream));
}

/* The wait names the event's last record at the time of the call, as
 * cuStreamWaitEvent does; an event never recorded makes no wait. */
static int stream_wait_event(void *stream, void *event, unsigned flags) {
  int rc = need_context();
  if (rc) return rc;
  emu_stream *s = find_stream(stream);
  emu_event *e = find_event(event);
  if (!s || !e) return EMU_INVALID_HANDLE;
  if (flags != 0) return EMU_INVALID_VALUE;
  if (s->capture == CAPTURE_INVALIDATED) return EMU_CAPTURE_INVALIDATED;
  if (s->capture == CAPTURE_ACTIVE) {
    if (e->captured_in == s->graph) return EMU_SUCCESS; /* the stream's own order */
    capture_invalidate(s);
    return EMU_CAPTURE_ISOLATION; /* work outside the capture: no fork and join here */
  }
  if (!e->record_stream || e->captured_in) return EMU_SUCCESS;
  emu_op *op = op_new(OP_WAIT, 0);
  if (!op) return EMU_OUT_OF_MEMORY;
  op->wait_stream = e->record_stream;
  op->wait_id = e->record_id;
  return enqueue(s, op);
}

static int emu_stream_wait_event(void *stream, void *event, unsigned flags) {
  LOCKED(stream_wait_event(stream, event, flags));
}

static int event_create(void **event, unsigned flags) {
  int rc = need_context();
  if (rc) return rc;
  if (flags & ~(unsigned)(CM_CU_EVENT_DISABLE_TIMING | 1 | 4)) return EMU_INVALID_VALUE;
  emu_event *e = calloc(1, sizeof *e);
  if (!e) return EMU_OUT_OF_MEMORY;
  e->flags = flags;
  e->next = context.events;
  context.events = e;
  *event = e;
  return EMU_SUCCESS;
}

static int emu_event_create(void **event, unsigned flags) {
  if (!event) return EMU_INVALID_VALUE;
  LOCKED(event_create(event, flags));
}

static int event_destroy(void *event) {
  int rc = need_context();
  if (rc) return rc;
  emu_event *e = find_event(event);
  if (!e) return EMU_INVALID_HANDLE;
  for (emu_event **p = &context.events; *p; p = &(*p)->next)
    if (*p == e) {
      *p = e->next;
      break;
    }
  e->next = context.dead_events;
  context.dead_events = e;
  return EMU_SUCCESS;
}

static int emu_event_destroy(void *event) {
  LOCKED(event_destroy(event));
}

static int event_record(void *event, void *stream) {
  int rc = need_context();
  if (rc) return rc;
  emu_event *e = find_event(event);
  emu_stream *s = find_stream(stream);
  if (!e || !s) return EMU_INVALID_HANDLE;
  emu_op *op = op_new(OP_RECORD, 0);
  if (!op) return EMU_OUT_OF_MEMORY;
  op->event = e;
  return enqueue(s, op);
}

static int emu_event_record(void *event, void *stream) {
  LOCKED(event_record(event, stream));
}

static int event_synchronize(void *event) {
  int rc = need_context();
  if (rc) return rc;
  emu_event *e = find_event(event);
  if (!e) return EMU_INVALID_HANDLE;
  if (e->captured_in) { /* the record is part of a capture under way */
    for (emu_stream *s = context.streams; s; s = s->next)
      if (s->graph == e->captured_in) capture_invalidate(s);
    return EMU_CAPTURED_EVENT;
  }
  if (!e->record_stream) return EMU_SUCCESS;
  return run_stream(e->record_stream, e->record_id);
}

static int emu_event_synchronize(void *event) {
  LOCKED(event_synchronize(event));
}

static int event_elapsed_time(float *ms, void *start, void *end) {
  int rc = need_context();
  if (rc) return rc;
  emu_event *a = find_event(start), *b = find_event(end);
  if (!a || !b) return EMU_INVALID_HANDLE;
  if ((a->flags | b->flags) & CM_CU_EVENT_DISABLE_TIMING) return EMU_INVALID_HANDLE;
  if (!a->record_stream || !b->record_stream) return EMU_INVALID_HANDLE;
  if (a->done_id < a->record_id || b->done_id < b->record_id) return EMU_NOT_READY;
  *ms = (float)(b->done_ms - a->done_ms);
  return EMU_SUCCESS;
}

static int emu_event_elapsed_time(float *ms, void *start, void *end) {
  if (!ms) return EMU_INVALID_VALUE;
  LOCKED(event_elapsed_time(ms, start, end));
}

/* ---- modules and launches ------------------------------------------------ */

/* Writes the image's shared object to a temporary file, dlopens it, unlinks it. */
static int module_open(const emu_image_header *h, void **so) {
  const char *dir = getenv("TMPDIR");
  char path[4096];
  snprintf(path, sizeof path, "%s/cmaec-emu-module-XXXXXX.so", dir && *dir ? dir : "/tmp");
  int fd = mkstemps(path, 3);
  if (fd < 0) return EMU_OUT_OF_MEMORY;
  const char *bytes = (const char *)(h + 1);
  size_t left = h->so_bytes;
  while (left > 0) {
    ssize_t n = write(fd, bytes, left);
    if (n <= 0) break;
    bytes += n;
    left -= (size_t)n;
  }
  close(fd);
  *so = left == 0 ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  unlink(path);
  if (left != 0) return EMU_OUT_OF_MEMORY;
  return *so ? EMU_SUCCESS : EMU_INVALID_IMAGE;
}

static int module_load_data(void **module, const void *image) {
  int rc = need_context();
  if (rc) return rc;
  const emu_image_header *h = image;
  if (memcmp(h->magic, EMU_IMAGE_MAGIC, sizeof h->magic) != 0 || h->so_bytes == 0)
    return EMU_INVALID_IMAGE;
  void *so = NULL;
  rc = module_open(h, &so);
  if (rc) return rc;
  emu_module *m = calloc(1, sizeof *m);
  if (!m) {
    dlclose(so);
    return EMU_OUT_OF_MEMORY;
  }
  m->so = so;
  void *params = dlsym(so, EMU_MODULE_PARAMS_SYMBOL), *launch = dlsym(so, EMU_MODULE_LAUNCH_SYMBOL);
  memcpy(&m->params, &params, sizeof params);
  memcpy(&m->launch, &launch, sizeof launch);
  if (!m->params || !m->launch) {
    dlclose(so);
    free(m);
    return EMU_INVALID_IMAGE;
  }
  m->next = context.modules;
  context.modules = m;
  counters.modules_loaded++;
  *module = m;
  return EMU_SUCCESS;
}

static int emu_module_load_data(void **module, const void *image) {
  if (!module || !image) return EMU_INVALID_VALUE;
  LOCKED(module_load_data(module, image));
}

/* Queued launches of the module run first: the code they call goes with it. */
static int module_unload(void *module) {
  int rc = need_context();
  if (rc) return rc;
  emu_module *m = find_module(module);
  if (!m) return EMU_INVALID_HANDLE;
  rc = run_all();
  for (emu_module **p = &context.modules; *p; p = &(*p)->next)
    if (*p == m) {
      *p = m->next;
      break;
    }
  module_free(m);
  return rc;
}

static int emu_module_unload(void *module) {
  LOCKED(module_unload(module));
}

static int module_get_function(void **function, void *module, const char *name) {
  int rc = need_context();
  if (rc) return rc;
  emu_module *m = find_module(module);
  if (!m) return EMU_INVALID_HANDLE;
  for (emu_function *f = m->functions; f; f = f->next)
    if (strcmp(f->name, name) == 0) {
      *function = f;
      return EMU_SUCCESS;
    }
  int params = m->params(name);
  if (params < 0) return EMU_NOT_FOUND;
  emu_function *f = calloc(1, sizeof *f);
  if (!f || !(f->name = strdup(name))) {
    free(f);
    return EMU_OUT_OF_MEMORY;
  }
  f->module = m;
  f->params = params;
  f->max_dyn_shared = EMU_SHARED_DEFAULT;
  f->next = m->functions;
  m->functions = f;
  *function = f;
  return EMU_SUCCESS;
}

static int emu_module_get_function(void **function, void *module, const char *name) {
  if (!function || !name) return EMU_INVALID_VALUE;
  LOCKED(module_get_function(function, module, name));
}

static int func_set_attribute(void *function, int attribute, int value) {
  int rc = need_context();
  if (rc) return rc;
  emu_function *f = find_function(function);
  if (!f) return EMU_INVALID_HANDLE;
  if (attribute == 9) /* PREFERRED_SHARED_MEMORY_CARVEOUT: a hint */
    return value >= -1 && value <= 100 ? EMU_SUCCESS : EMU_INVALID_VALUE;
  if (attribute != CM_CU_FUNC_MAX_DYNAMIC_SHARED_BYTES) return EMU_INVALID_VALUE;
  if (value < 0 || value > EMU_SHARED_OPTIN) return EMU_INVALID_VALUE;
  f->max_dyn_shared = (unsigned)value;
  return EMU_SUCCESS;
}

static int emu_func_set_attribute(void *function, int attribute, int value) {
  LOCKED(func_set_attribute(function, attribute, value));
}

typedef struct emu_launch_config {
  unsigned grid[3], block[3], shared;
} emu_launch_config;

/* cuLaunchKernel's checks of the configuration, at enqueue. */
static bool launch_config_ok(const emu_function *f, const emu_launch_config *c) {
  static const unsigned max_block[3] = {1024, 1024, 64};
  static const unsigned max_grid[3] = {2147483647u, 65535, 65535};
  unsigned long long threads = 1;
  for (int i = 0; i < 3; i++) {
    if (c->grid[i] == 0 || c->block[i] == 0) return false;
    if (c->grid[i] > max_grid[i] || c->block[i] > max_block[i]) return false;
    threads *= c->block[i];
  }
  return threads <= EMU_MAX_THREADS && c->shared <= f->max_dyn_shared;
}

static int launch_kernel(void *function, const emu_launch_config *c, void *stream, void **params,
                         void **extra) {
  int rc = need_context();
  if (rc) return rc;
  emu_function *f = find_function(function);
  emu_stream *s = find_stream(stream);
  if (!f || !s) return EMU_INVALID_HANDLE;
  if (extra || (f->params > 0 && !params)) return EMU_INVALID_VALUE; /* extra: not emulated */
  if (!launch_config_ok(f, c)) return EMU_INVALID_VALUE;
  emu_op *op = op_new(OP_LAUNCH, f->params);
  if (!op) return EMU_OUT_OF_MEMORY;
  op->function = f;
  memcpy(op->grid, c->grid, sizeof op->grid);
  memcpy(op->block, c->block, sizeof op->block);
  op->shared = c->shared;
  for (int i = 0; i < f->params; i++) memcpy(&op->params[i], params[i], EMU_PARAM_BYTES);
  return enqueue(s, op);
}

static int emu_launch_kernel(void *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                             unsigned block_x, unsigned block_y, unsigned block_z,
                             unsigned shared_bytes, void *stream, void **params, void **extra) {
  emu_launch_config c = {{grid_x, grid_y, grid_z}, {block_x, block_y, block_z}, shared_bytes};
  LOCKED(launch_kernel(function, &c, stream, params, extra));
}

/* ---- graphs -------------------------------------------------------------- */

static int stream_begin_capture(void *stream, int mode) {
  int rc = need_context();
  if (rc) return rc;
  emu_stream *s = find_stream(stream);
  if (!s) return EMU_INVALID_HANDLE;
  if (mode < 0 || mode > 2) return EMU_INVALID_VALUE;
  if (s == &context.null_stream) return EMU_CAPTURE_UNSUPPORTED; /* the legacy stream */
  if (s->capture != CAPTURE_NONE) return EMU_ILLEGAL_STATE;
  s->graph = calloc(1, sizeof *s->graph);
  if (!s->graph) return EMU_OUT_OF_MEMORY;
  s->capture = CAPTURE_ACTIVE;
  s->capture_mode = mode;
  s->capture_thread = pthread_self();
  return EMU_SUCCESS;
}

static int emu_stream_begin_capture(void *stream, int mode) {
  LOCKED(stream_begin_capture(stream, mode));
}

static int stream_end_capture(void *stream, void **graph) {
  int rc = need_context();
  if (rc) return rc;
  emu_stream *s = find_stream(stream);
  if (!s) return EMU_INVALID_HANDLE;
  if (s->capture == CAPTURE_NONE) return EMU_ILLEGAL_STATE;
  if (s->capture_mode != 2 && !pthread_equal(s->capture_thread, pthread_self())) {
    capture_invalidate(s);
    return EMU_CAPTURE_WRONG_THREAD;
  }
  emu_graph *g = s->graph;
  bool invalidated = s->capture == CAPTURE_INVALIDATED;
  s->graph = NULL;
  s->capture = CAPTURE_NONE;
  for (emu_event *e = context.events; e; e = e->next)
    if (e->captured_in == g) e->captured_in = NULL;
  if (invalidated) {
    ops_free(g->head);
    free(g);
    *graph = NULL;
    return EMU_CAPTURE_INVALIDATED;
  }
  g->next = context.graphs;
  context.graphs = g;
  *graph = g;
  return EMU_SUCCESS;
}

static int emu_stream_end_capture(void *stream, void **graph) {
  if (!graph) return EMU_INVALID_VALUE;
  LOCKED(stream_end_capture(stream, graph));
}

static int graph_instantiate(void **exec, void *graph) {
  int rc = need_context();
  if (rc) return rc;
  emu_graph *g = find_graph(graph, false);
  if (!g) return EMU_INVALID_HANDLE;
  emu_graph *x = calloc(1, sizeof *x);
  if (!x) return EMU_OUT_OF_MEMORY;
  x->executable = true;
  for (emu_op *op = g->head; op; op = op->next) {
    emu_op *copy = op_clone(op);
    if (!copy) {
      ops_free(x->head);
      free(x);
      return EMU_OUT_OF_MEMORY;
    }
    list_append(&x->head, &x->tail, copy);
  }
  x->next = context.graphs;
  context.graphs = x;
  *exec = x;
  return EMU_SUCCESS;
}

static int emu_graph_instantiate(void **exec, void *graph, unsigned long long flags) {
  if (!exec || flags != 0) return EMU_INVALID_VALUE;
  LOCKED(graph_instantiate(exec, graph));
}

/* Enqueues copies of the graph's ops, in order, then a mark that counts the replay. */
static int graph_launch(void *exec, void *stream) {
  int rc = need_context();
  if (rc) return rc;
  emu_graph *x = find_graph(exec, true);
  emu_stream *s = find_stream(stream);
  if (!x || !s) return EMU_INVALID_HANDLE;
  for (emu_op *op = x->head; op; op = op->next) /* a module unloaded since the capture */
    if (op->kind == OP_LAUNCH && !find_function(op->function)) return EMU_INVALID_HANDLE;
  for (emu_op *op = x->head; op && !rc; op = op->next) {
    emu_op *copy = op_clone(op);
    rc = copy ? enqueue(s, copy) : EMU_OUT_OF_MEMORY;
  }
  emu_op *mark = rc ? NULL : op_new(OP_GRAPH_MARK, 0);
  if (!rc && !mark) rc = EMU_OUT_OF_MEMORY;
  return rc ? rc : enqueue(s, mark);
}

static int emu_graph_launch(void *exec, void *stream) {
  LOCKED(graph_launch(exec, stream));
}

static int graph_destroy(void *graph, bool executable) {
  int rc = need_context();
  if (rc) return rc;
  emu_graph *g = find_graph(graph, executable);
  if (!g) return EMU_INVALID_HANDLE;
  for (emu_graph **p = &context.graphs; *p; p = &(*p)->next)
    if (*p == g) {
      *p = g->next;
      break;
    }
  ops_free(g->head);
  free(g);
  return EMU_SUCCESS;
}

static int emu_graph_exec_destroy(void *exec) {
  LOCKED(graph_destroy(exec, true));
}
static int emu_graph_destroy(void *graph) {
  LOCKED(graph_destroy(graph, false));
}

/* ---- errors -------------------------------------------------------------- */

static const struct {
  int result;
  const char *name, *text;
} error_table[] = {
    {EMU_SUCCESS, "CUDA_SUCCESS", "no error"},
    {EMU_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {EMU_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {EMU_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {EMU_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {EMU_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {EMU_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU",
     "no kernel image is available for execution on the device"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {EMU_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {EMU_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE",
     "the operation cannot be performed in the present state"},
    {EMU_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {EMU_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {EMU_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {EMU_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
     "too many resources requested for launch"},
    {702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"},
    {EMU_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {EMU_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
     "operation not permitted when stream is capturing"},
    {EMU_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
    {902, "CUDA_ERROR_STREAM_CAPTURE_MERGE",
     "operation would result in a merge of separate capture sequences"},
    {903, "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
     "capture was not ended in the same stream as it began"},
    {904, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED", "capturing stream has unjoined work"},
    {EMU_CAPTURE_ISOLATION, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
     "dependency created on uncaptured work in another stream"},
    {906, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
     "operation would make the legacy stream depend on a capturing blocking stream"},
    {EMU_CAPTURED_EVENT, "CUDA_ERROR_CAPTURED_EVENT",
     "operation not permitted on an event last recorded in a capturing stream"},
    {EMU_CAPTURE_WRONG_THREAD, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
     "attempt to terminate a thread-local capture sequence from another thread"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static int error_lookup(int result, const char **name, const char **text) {
  for (size_t i = 0; i < sizeof error_table / sizeof error_table[0]; i++)
    if (error_table[i].result == result) {
      if (name) *name = error_table[i].name;
      if (text) *text = error_table[i].text;
      return EMU_SUCCESS;
    }
  if (name) *name = NULL;
  if (text) *text = NULL;
  return EMU_INVALID_VALUE;
}

static int emu_get_error_name(int result, const char **name) {
  if (!name) return EMU_INVALID_VALUE;
  return error_lookup(result, name, NULL);
}

static int emu_get_error_string(int result, const char **text) {
  if (!text) return EMU_INVALID_VALUE;
  return error_lookup(result, NULL, text);
}

/* ---- the table ----------------------------------------------------------- */

static const cm_cuda_driver emu_table_driver = {
    .name = "emulated",
    .init = emu_init,
    .driver_get_version = emu_driver_get_version,
    .device_get_count = emu_device_get_count,
    .device_get = emu_device_get,
    .device_get_name = emu_device_get_name,
    .device_total_mem = emu_device_total_mem,
    .device_get_attribute = emu_device_get_attribute,
    .primary_ctx_retain = emu_primary_ctx_retain,
    .primary_ctx_release = emu_primary_ctx_release,
    .ctx_set_current = emu_ctx_set_current,
    .ctx_synchronize = emu_ctx_synchronize,
    .mem_get_info = emu_mem_get_info,
    .mem_alloc = emu_mem_alloc,
    .mem_free = emu_mem_free,
    .mem_alloc_host = emu_mem_alloc_host,
    .mem_free_host = emu_mem_free_host,
    .memcpy_htod_async = emu_memcpy_htod_async,
    .memcpy_dtoh_async = emu_memcpy_dtoh_async,
    .memcpy_dtod_async = emu_memcpy_dtod_async,
    .memset_d8_async = emu_memset_d8_async,
    .stream_create = emu_stream_create,
    .stream_destroy = emu_stream_destroy,
    .stream_synchronize = emu_stream_synchronize,
    .stream_wait_event = emu_stream_wait_event,
    .event_create = emu_event_create,
    .event_destroy = emu_event_destroy,
    .event_record = emu_event_record,
    .event_synchronize = emu_event_synchronize,
    .event_elapsed_time = emu_event_elapsed_time,
    .module_load_data = emu_module_load_data,
    .module_unload = emu_module_unload,
    .module_get_function = emu_module_get_function,
    .func_set_attribute = emu_func_set_attribute,
    .launch_kernel = emu_launch_kernel,
    .stream_begin_capture = emu_stream_begin_capture,
    .stream_end_capture = emu_stream_end_capture,
    .graph_instantiate = emu_graph_instantiate,
    .graph_launch = emu_graph_launch,
    .graph_exec_destroy = emu_graph_exec_destroy,
    .graph_destroy = emu_graph_destroy,
    .get_error_name = emu_get_error_name,
    .get_error_string = emu_get_error_string,
};

const cm_cuda_driver *emu_driver(void) {
  return &emu_table_driver;
}

void emu_counters_get(emu_counters *out) {
  pthread_mutex_lock(&lock);
  *out = counters;
  pthread_mutex_unlock(&lock);
}
