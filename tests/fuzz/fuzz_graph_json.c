/* libFuzzer target: graph JSON. Any input must either be rejected with
 * CM_EINVALID or give a graph whose JSON reads back to the same text. */
#include "frontend/frontend.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  cm_graph *g = NULL;
  cm_err err = {0};
  cm_status st = cm_graph_from_json((const char *)data, size, &g, &err);
  if (st != CM_OK) {
    /* Bad input is CM_EINVALID with a one-line message, never a crash or CM_EINTERNAL. */
    if (st != CM_EINVALID || g != NULL || strchr(err.msg, '\n') || err.msg[0] == '\0')
      __builtin_trap();
    return 0;
  }
  char *text = cm_graph_to_json(g);
  if (!text) __builtin_trap();
  cm_graph *back = NULL;
  if (cm_graph_from_json(text, strlen(text), &back, &err) != CM_OK) __builtin_trap();
  char *again = cm_graph_to_json(back);
  if (!again || strcmp(text, again) != 0) __builtin_trap();
  if (back->n_nodes != g->n_nodes || back->n_outputs != g->n_outputs) __builtin_trap();
  free(again);
  free(text);
  cm_graph_free(back);
  cm_graph_free(g);
  return 0;
}
