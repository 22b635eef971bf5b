/* tools/cmd_model.c — cmaec summary, build (being written). */
#include "cli.h"

int cmd_summary(int argc, char **argv) {
  (void)argc, (void)argv;
  fprintf(stderr, "cmaec summary: not available yet\n");
  return EXIT_INTERNAL;
}

int cmd_build(int argc, char **argv) {
  (void)argc, (void)argv;
  fprintf(stderr, "cmaec build: not available yet\n");
  return EXIT_INTERNAL;
}
