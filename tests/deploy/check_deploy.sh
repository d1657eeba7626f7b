#!/usr/bin/env bash
# Checks what deploy/ ships (docs/deploy.md, docs/metrics.md):
# - the Kubernetes manifests against the API's schemas (kubernetes-validate from PyPI, strict:
#   an unknown field is an error), and that the checker does reject a broken copy;
# - that the job sizes agree (StatefulSet replicas = --servers, Job completions = --workers);
# - every PromQL expression of the Grafana dashboard parses (promtool check rules) and every
#   shardps_* metric it names is one the code exports.
# Usage: check_deploy.sh SOURCE_DIR WORK_DIR
set -euo pipefail
src=$1
work=$2
mkdir -p "$work"
venv=$work/deploy-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi
manifests=("$src"/deploy/kubernetes/*.yaml)
"$venv/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
sed 's/^  replicas: 2/  replicaz: 2/' "$src/deploy/kubernetes/shardps.yaml" >"$work/broken.yaml"
if "$venv/bin/kubernetes-validate" --strict --quiet "$work/broken.yaml" >/dev/null 2>&1; then
  echo "kubernetes-validate accepted a manifest with an unknown field" >&2
  exit 1
fi
"$venv/bin/python" - "$src/deploy/kubernetes/shardps.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kind = {d["kind"]: d for d in docs}
args = kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
flag = lambda name: args[args.index(name) + 1]
servers, workers = int(flag("--servers")), int(flag("--workers"))
assert kind["StatefulSet"]["spec"]["replicas"] == servers, "StatefulSet replicas != --servers"
job = kind["Job"]["spec"]
assert job["completions"] == workers == job["parallelism"], "Job completions != --workers"
assert job["completionMode"] == "Indexed"
print(f"manifests: {servers} servers, {workers} workers, consistent")
PY
python3 - "$src" "$work/dashboard.rules.yaml" <<'PY'
import json, re, sys, pathlib
src, out = pathlib.Path(sys.argv[1]), sys.argv[2]
dash = json.load(open(src / "deploy/grafana/shardps.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert exprs, "no expressions in the dashboard"
code = "".join(p.read_text() for p in (src / "src").rglob("*.cc"))
missing = set()
for e in exprs:
    for name in re.findall(r"shardps_[a-z_]+", e):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if f'"{base}"' not in code:
            missing.add(base)
assert not missing, f"the dashboard names metrics the code does not export: {sorted(missing)}"
with open(out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(e)}\n")
print(f"dashboard: {len(exprs)} expressions, every metric exported")
PY
promtool check rules "$work/dashboard.rules.yaml"
