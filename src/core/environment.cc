#include "core/environment.h"

namespace shardps {

Environment::Environment(char** envp) {
  for (char** e = envp; e && *e; ++e) entries_.emplace_back(*e);
}

std::optional<std::string> Environment::Get(std::string_view name) const {
  for (const auto& kv : entries_) {
    if (kv.size() > name.size() && kv[name.size()] == '=' && kv.compare(0, name.size(), name) == 0)
      return kv.substr(name.size() + 1);
  }
  return std::nullopt;
}

std::vector<char*> Environment::Envp() const {
  std::vector<char*> out;
  for (const auto& kv : entries_) out.push_back(const_cast<char*>(kv.c_str()));
  out.push_back(nullptr);
  return out;
}

std::vector<std::pair<std::string, std::string>> Environment::WithPrefix(
    std::string_view prefix) const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& kv : entries_) {
    auto eq = kv.find('=');
    if (eq == std::string::npos || kv.compare(0, prefix.size(), prefix) != 0) continue;
    out.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  return out;
}

}  // namespace shardps
