#include "shardps/tunables.h"

#include <fmt/format.h>

namespace shardps {

std::string TunablesMarkdown() {
  std::string out =
      "# Configuration\n\n"
      "Every tunable of ShardPS, from its one declaration (`include/shardps/tunables.h`;\n"
      "`shardps tunables --markdown` prints this page, and a test keeps it equal). Each is a\n"
      "flag `--NAME`, a variable and a config-file key `NAME` (under `[subcommand]`); flags win\n"
      "over variables, variables over the file, and every subcommand logs its effective\n"
      "configuration at start-up. In a program that links the library, the same defaults are\n"
      "those of `CoordinatorOptions`, `ServerOptions` and `WorkerOptions`; a worker started by\n"
      "`shardps launch` reads its variables with `WorkerOptions::FromEnvironment`.\n\n"
      "| name | variable | default | what | read by |\n"
      "| --- | --- | --- | --- | --- |\n";
  for (const Tunable* t : tunables::kAll) {
    std::string def = t->default_value.empty() ? "(none)" : fmt::format("`{}`", t->default_value);
    out +=
        fmt::format("| `{}` | `{}` | {} | {} | {} |\n", t->name, t->env, def, t->help, t->used_by);
  }
  out +=
      "\nTransport settings: variables named `UCX_*` reach the ucx backend as its settings\n"
      "(`shardps` passes them from its environment; a program sets\n"
      "`ServerOptions::transport_settings` / `WorkerOptions::transport_settings`).\n";
  return out;
}

}  // namespace shardps
