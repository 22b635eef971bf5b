/* tools/cmd_opt.c — cmaec opt: run a pipeline of passes over a graph. */
#include "cli.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

static const char usage_opt[] =
    "usage: cmaec opt GRAPH [-p PIPELINE] [--print-after=PASS[,PASS]] [--print-after-all]\n"
    "                 [--verify-each] [--stats] [--json] [-o OUT.json]\n"
    "\n"
    "Runs the comma-separated pipeline of passes over GRAPH (default:\n"
    "simplify,cse,dce,flash_backward,fuse,schedule,memplan) and prints the result as text IR,\n"
    "followed by the plan (kernels in order, arena offsets) when the pipeline made one.\n"
    "  -p PIPELINE          passes to run, in order\n"
    "  --print-after=P      print the graph (and plan) after pass P (to stderr)\n"
    "  --print-after-all    print after every pass\n"
    "  --verify-each        verify the graph (and plan) after every pass\n"
    "  --stats              print per-pass time and statistics instead of the IR\n"
    "  --json               with --stats: one JSON object\n"
    "  -o OUT.json          write the optimized graph as graph JSON\n"
    "Passes:\n";

int cmd_opt(int argc, char **argv) {
  cli_option opts[] = {
      {"--help", false, NULL, false},        {"-p", true, NULL, false},
      {"--print-after", true, NULL, false},  {"--print-after-all", false, NULL, false},
      {"--verify-each", false, NULL, false}, {"--stats", false, NULL, false},
      {"--json", false, NULL, false},        {"-o", true, NULL, false},
      {"--pipeline", true, NULL, false}};
  const int n_opts = (int)(sizeof opts / sizeof opts[0]);
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, n_opts, pos, 1, &n_pos, "opt")) return EXIT_INVALID;
  if (opts[0].given) {
    fputs(usage_opt, stdout);
    for (const cm_pass_info *p = cm_passes(); p->name; p++) printf("  %-10s %s\n", p->name, p->doc);
    return EXIT_OK;
  }
  if (n_pos != 1) return fputs(usage_opt, stderr), EXIT_INVALID;
  const char *pipeline = opts[1].given   ? opts[1].value
                         : opts[8].given ? opts[8].value
                                         : cm_default_pipeline;
  cm_graph *g;
  int rc = cli_load_graph(pos[0], &g);
  if (rc) return rc;
  cm_pass_state s = {g, NULL};
  cm_pipeline_opts po = {opts[4].given, opts[3].given, opts[2].value, stderr};
  cm_pass_stat stats[64];
  int n_stats = 0;
  cm_err err = {0};
  if (cm_pipeline_run(&s, pipeline, &po, stats, 64, &n_stats, &err)) {
    rc = cli_report(&err, pos[0]);
    goto done;
  }
  int per_kind[CM_GROUP_KIND_COUNT] = {0};
  for (int k = 0; s.plan && k < s.plan->n_groups; k++) per_kind[s.plan->groups[k].kind]++;
  if (opts[5].given && opts[6].given) {
    /* cJSON writes the strings, so a path or detail with quotes stays valid JSON. */
    cJSON *o = cJSON_CreateObject(), *passes = cJSON_AddArrayToObject(o, "passes");
    cJSON_AddStringToObject(o, "graph", pos[0]);
    cJSON_AddNumberToObject(o, "nodes", s.g->n_nodes);
    for (int i = 0; i < n_stats; i++) {
      cJSON *p = cJSON_CreateObject();
      cJSON_AddStringToObject(p, "pass", stats[i].pass);
      cJSON_AddNumberToObject(p, "ms", stats[i].ms);
      cJSON_AddNumberToObject(p, "nodes_before", stats[i].nodes_before);
      cJSON_AddNumberToObject(p, "nodes_after", stats[i].nodes_after);
      cJSON_AddStringToObject(p, "detail", stats[i].detail);
      cJSON_AddItemToArray(passes, p);
    }
    if (s.plan) {
      cJSON_AddNumberToObject(o, "kernels", s.plan->n_groups);
      cJSON *by_kind = cJSON_AddObjectToObject(o, "kernels_by_kind");
      for (int k = 0; k < CM_GROUP_KIND_COUNT; k++)
        cJSON_AddNumberToObject(by_kind, cm_group_kind_name((cm_group_kind)k), per_kind[k]);
      cJSON_AddNumberToObject(o, "arena_bytes", (double)s.plan->arena_bytes);
      cJSON_AddNumberToObject(o, "unplanned_bytes", (double)s.plan->unplanned_bytes);
    }
    char *text = cJSON_PrintUnformatted(o);
    if (text)
      puts(text);
    else
      rc = (fprintf(stderr, "cmaec opt: out of memory\n"), EXIT_INTERNAL);
    cJSON_free(text);
    cJSON_Delete(o);
  } else if (opts[5].given) {
    printf("%-10s %10s %10s %10s  %s\n", "pass", "ms", "nodes in", "nodes out", "detail");
    for (int i = 0; i < n_stats; i++)
      printf("%-10s %10.2f %10d %10d  %s\n", stats[i].pass, stats[i].ms, stats[i].nodes_before,
             stats[i].nodes_after, stats[i].detail);
    if (s.plan) {
      printf("kernels: %d (", s.plan->n_groups);
      for (int k = 0; k < CM_GROUP_KIND_COUNT; k++)
        printf("%s%s %d", k ? ", " : "", cm_group_kind_name((cm_group_kind)k), per_kind[k]);
      printf(")\n");
      if (s.plan->unplanned_bytes)
        printf("arena: %lld bytes, unplanned %lld bytes (%.1f %%)\n",
               (long long)s.plan->arena_bytes, (long long)s.plan->unplanned_bytes,
               100.0 * (double)s.plan->arena_bytes / (double)s.plan->unplanned_bytes);
    }
  } else if (opts[7].given) {
    if (cm_graph_save_json(s.g, opts[7].value, &err)) rc = cli_report(&err, opts[7].value);
  } else {
    if (cm_graph_print(s.g, stdout, &err))
      rc = cli_report(&err, "cmaec opt");
    else if (s.plan)
      cm_plan_print(s.g, s.plan, stdout);
  }
done:
  cm_plan_free(s.plan);
  cm_graph_free(s.g);
  return rc;
}
