/* tests/fuzz/fuzz_safetensors.c — libFuzzer target for the safetensors reader.
 *
 * Any input must parse or fail cleanly (ASan/UBSan watch for out-of-bounds
 * reads and leaks). What parses must serialize, and the serialized image must
 * parse back to the same set and serialize to the same bytes; a mismatch traps. */
#include "frontend/frontend.h"

#include <stdlib.h>
#include <string.h>

static void check(bool ok) {
  if (!ok) __builtin_trap();
}

static bool sets_equal(const cm_tensor_set *a, const cm_tensor_set *b) {
  if (a->n != b->n || a->n_meta != b->n_meta) return false;
  for (int i = 0; i < a->n; i++) {
    const cm_type *x = &a->tensors[i].type, *y = &b->tensors[i].type;
    if (strcmp(a->names[i], b->names[i]) || x->dtype != y->dtype || x->rank != y->rank)
      return false;
    size_t n = 1;
    for (int d = 0; d < x->rank; d++) {
      if (x->dims[d] != y->dims[d]) return false;
      n *= (size_t)x->dims[d];
    }
    n *= cm_dtype_size(x->dtype);
    if (n && memcmp(a->tensors[i].data, b->tensors[i].data, n)) return false;
  }
  for (int i = 0; i < a->n_meta; i++)
    if (strcmp(a->meta_keys[i], b->meta_keys[i]) || strcmp(a->meta_values[i], b->meta_values[i]))
      return false;
  return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  cm_tensor_set first;
  cm_err err;
  cm_status st = cm_safetensors_parse(data, size, &first, &err);
  if (st != CM_OK) {
    check(st == CM_EINVALID && first.n == 0 && strchr(err.msg, '\n') == NULL);
    return 0;
  }
  uint8_t *image = NULL, *image2 = NULL;
  size_t len = 0, len2 = 0;
  check(cm_safetensors_serialize(&first, &image, &len, &err) == CM_OK);
  cm_tensor_set second;
  check(cm_safetensors_parse(image, len, &second, &err) == CM_OK);
  check(sets_equal(&first, &second));
  check(cm_safetensors_serialize(&second, &image2, &len2, &err) == CM_OK);
  check(len == len2 && memcmp(image, image2, len) == 0);
  free(image);
  free(image2);
  cm_tensor_set_free(&first);
  cm_tensor_set_free(&second);
  return 0;
}
