/* libFuzzer target: the text IR parser. Whatever parses must print, parse
 * again and print identically. */
#include "ir/ir.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  if (!text) return 0;
  memcpy(text, data, size);
  text[size] = 0;
  cm_graph *g = NULL;
  cm_err err;
  if (cm_graph_parse(text, &g, &err) == CM_OK) {
    char *printed = cm_graph_print_str(g);
    cm_graph *again = NULL;
    if (!printed || cm_graph_parse(printed, &again, &err) != CM_OK) __builtin_trap();
    char *printed_again = cm_graph_print_str(again);
    if (!printed_again || strcmp(printed, printed_again) != 0) __builtin_trap();
    free(printed);
    free(printed_again);
    cm_graph_free(again);
    cm_graph_free(g);
  }
  free(text);
  return 0;
}
