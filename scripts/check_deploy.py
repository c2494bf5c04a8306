#!/usr/bin/env python3
"""Checks deploy/: the Helm chart and the Containerfiles.

The chart is rendered by Helm's own template engine (Helm's Go SDK v4, through the
helm-python-sdk wheel's libhelm_c: no `helm` binary could be had here) for every values file the
chart ships, linted, and each rendered object validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors) for the oldest Kubernetes the chart
supports and the newest the validator knows. Then what the schemas cannot say:

  - every Pod meets the restricted Pod Security profile (non-root, no privilege escalation, all
    capabilities dropped, RuntimeDefault seccomp, read-only root filesystem; no host namespaces
    or host paths) and has requests and limits; Tutela's containers probe with `... probe`;
  - a default-deny NetworkPolicy covers every Pod of the release, and each Pod has its own;
  - every generated TOML config parses and uses only keys documented in deploy/config/;
  - values that contradict each other fail to render, with a message saying what to change;
  - the Pod checks catch a violation (a copy of a rendered Pod, spoiled on purpose, is refused).

The Containerfiles: hadolint (the Dockerfile linter) finds nothing; each final stage is `FROM scratch` with no RUN, a fixed numeric USER and an
exec-form ENTRYPOINT; the builder images are pinned (tag at least); .dockerignore keeps the build
outputs, virtualenvs, keys and databases out of the build context.

Run with the deploy-check virtualenv (scripts/setup-deploy-check.sh):
  .venv-deploy/bin/python scripts/check_deploy.py
Prints one line per check and ends with "deploy checks: N passed, M failed"; exits 1 on a failure.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "tutela-consortium"
CONTAINERS = ROOT / "deploy" / "containers"
RELEASE = "consortium"
NAMESPACE = "tutela"
# The chart's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
TUTELA_BINARIES = {"tutela-coordinator", "tutela-audit"}

results: list[tuple[bool, str]] = []


def check(ok: bool, what: str, detail: str = "") -> bool:
    results.append((ok, what))
    print(f"{'ok  ' if ok else 'FAIL'} {what}{'' if ok else ': ' + detail}")
    return ok


# ------------------------------------------------------------------------------------------ chart


def values_of(name: str) -> dict:
    if name == "values.yaml":
        return {}
    return yaml.safe_load((CHART / name).read_text()) or {}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind not in WORKLOADS:
        return None
    spec = obj["spec"]
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def pod_security_problems(obj: dict) -> list[str]:
    """What of the restricted profile (and of our own rules) a workload breaks."""
    spec = pod_spec(obj)
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    problems = []
    psc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{name}: {key}")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            problems.append(f"{name}: hostPath volume {v['name']}")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: the service account token is mounted")
    if psc.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod runAsNonRoot is not true")
    if (psc.get("runAsUser") or 1) == 0:
        problems.append(f"{name}: pod runs as UID 0")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod seccompProfile is not RuntimeDefault")
    containers = (spec.get("initContainers") or []) + spec["containers"]
    for c in containers:
        where = f"{name} container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{where}: capabilities are not drop [ALL] with none added")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runs as UID 0")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(kind) or {}):
                problems.append(f"{where}: no cpu and memory {kind}")
    for c in spec["containers"]:
        binary = c["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]
        if binary in TUTELA_BINARIES:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                cmd = ((c.get(probe) or {}).get("exec") or {}).get("command") or []
                if not (cmd and cmd[0] == f"/usr/local/bin/{binary}" and "probe" in cmd):
                    problems.append(f"{name} container {c['name']}: {probe} is not `{binary} probe`")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def network_policy_problems(docs: list[dict]) -> list[str]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    problems = []
    deny = [
        p
        for p in policies
        if set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    for d in docs:
        if pod_spec(d) is None:
            continue
        labels = d["spec"]["template"]["metadata"]["labels"]
        name = f"{d['kind']}/{d['metadata']['name']}"
        if not any(selects(p["spec"]["podSelector"], labels) for p in deny):
            problems.append(f"{name}: no default-deny NetworkPolicy selects it")
        own = [
            p
            for p in policies
            if p not in deny and selects(p["spec"]["podSelector"], labels)
        ]
        if not own:
            problems.append(f"{name}: no NetworkPolicy allows its traffic")
        ports = {
            str(p["containerPort"]) for c in pod_spec(d)["containers"] for p in c.get("ports") or []
        }
        for p in own:
            for rule in p["spec"].get("ingress") or []:
                for port in rule.get("ports") or [{}]:
                    if str(port.get("port")) not in ports:
                        problems.append(
                            f"{p['metadata']['name']}: ingress to port {port.get('port')}, "
                            f"which {name} does not serve"
                        )
    return problems


def documented_keys(example: Path) -> set[str]:
    """The keys deploy/config/<service>.toml shows (set or commented out), as `table.key`."""
    keys, table = set(), ""
    for line in example.read_text().splitlines():
        s = line.strip().lstrip("#").strip()
        m = re.match(r"^\[([a-z_]+)\]$", s)
        if m:
            table = m.group(1)
            continue
        m = re.match(r"^([a-z_]+)\s*=", s)
        if m:
            keys.add(f"{table}.{m.group(1)}" if table else m.group(1))
    return keys


def config_problems(docs: list[dict]) -> list[str]:
    problems = []
    seen = 0
    for d in docs:
        if d["kind"] != "ConfigMap":
            continue
        for fname, text in (d.get("data") or {}).items():
            if not fname.endswith(".toml"):
                continue
            seen += 1
            try:
                parsed = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                problems.append(f"{d['metadata']['name']}/{fname}: not TOML: {e}")
                continue
            documented = documented_keys(ROOT / "deploy" / "config" / fname)
            for k, v in parsed.items():
                flat = [f"{k}.{kk}" for kk in v] if isinstance(v, dict) else [k]
                for key in flat:
                    if key not in documented:
                        problems.append(
                            f"{d['metadata']['name']}/{fname}: key {key} is not in deploy/config/{fname}"
                        )
    if seen < 2:
        problems.append(f"expected the coordinator.toml and audit.toml ConfigMaps, found {seen}")
    return problems


def schema_problems(docs: list[dict]) -> list[str]:
    problems = []
    for version in KUBE_VERSIONS:
        for d in docs:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                problems.append(f"k8s {version} {d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"k8s {version} {d['kind']}: no schema: {e}")
    return problems


def check_chart() -> None:
    values_files = ["values.yaml"] + sorted(
        p.name for p in CHART.glob("values-*.yaml")
    )
    for vf in values_files:
        # Helm's severities: 1 info, 2 warning, 3 error. Warnings fail too.
        lint = helm.lint(str(CHART), values_of(vf), namespace=NAMESPACE)
        bad = [m for m in lint.get("messages") or [] if m.get("severity", 0) >= 2]
        check(not bad and not lint.get("errors"), f"{vf}: helm lint: no warning or error", json.dumps(lint)[:2000])
    expected = {"values.yaml", "values-external-db.yaml", "values-in-cluster-db.yaml"}
    check(expected <= set(values_files), f"the chart ships {sorted(expected)}", str(values_files))
    for vf in values_files:
        try:
            docs = render(values_of(vf))
        except helm.HelmError as e:
            check(False, f"{vf}: renders", str(e))
            continue
        kinds = sorted({d["kind"] for d in docs})
        check(bool(docs), f"{vf}: renders {len(docs)} objects ({', '.join(kinds)})", "nothing rendered")
        p = schema_problems(docs)
        check(not p, f"{vf}: valid against the Kubernetes {' and '.join(KUBE_VERSIONS)} schemas (strict)", "\n  ".join(p))
        workloads = [d for d in docs if pod_spec(d) is not None]
        p = [x for d in workloads for x in pod_security_problems(d)]
        check(bool(workloads) and not p, f"{vf}: {len(workloads)} workloads meet the restricted profile", "\n  ".join(p))
        p = network_policy_problems(docs)
        check(not p, f"{vf}: default-deny and per-Pod NetworkPolicies", "\n  ".join(p))
        p = config_problems(docs)
        check(not p, f"{vf}: generated configs parse and use documented keys only", "\n  ".join(p))
        if vf == "values.yaml":
            # The checks above must be able to fail: spoil a rendered Pod and expect a refusal.
            spoiled = copy.deepcopy(workloads[0])
            c = pod_spec(spoiled)["containers"][0]
            c["securityContext"]["readOnlyRootFilesystem"] = False
            c["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
            misspelt = copy.deepcopy(workloads[0])
            pod_spec(misspelt)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
            found = schema_problems([misspelt])
            check(
                any("readOnlyRootFileSystem" in x for x in found),
                "a misspelt field is refused by the strict schema check",
                str(found),
            )
            found = pod_security_problems(spoiled)
            check(
                any("readOnlyRootFilesystem" in x for x in found)
                and any("capabilities" in x for x in found),
                "a Pod spoiled on purpose is refused by the profile check",
                str(found),
            )
        if vf == "values-external-db.yaml":
            sts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
            audit = next((d for n, d in sts.items() if n.endswith("-audit")), None)
            inits = pod_spec(audit).get("initContainers") if audit else None
            check(
                bool(inits) and inits[0]["args"][:3] == ["init-db", "--database-url-file", "/etc/tutela/db-owner/database-url"],
                f"{vf}: the audit schema and grants are applied by an init container (owner URL as a file)",
                str(inits),
            )
            env = [e for d in sts.values() for c in pod_spec(d)["containers"] for e in c.get("env") or []]
            check(not env, f"{vf}: no database URL in any environment variable", str(env))

    # Values that contradict each other stop the render with a message naming them.
    for values, needle in [
        ({"externalDatabase": {"enabled": True, "existingSecret": "x"}, "postgresql": {"enabled": True}},
         "both true"),
        ({"externalDatabase": {"enabled": True}}, "existingSecret"),
        # The coordinator's audit trail is mandatory (hole (a)): it cannot be switched off.
        ({"coordinator": {"config": {"audit": {"enabled": False}}}}, "refuses to start without [audit]"),
    ]:
        try:
            render(values)
            check(False, f"render refuses {values}", "it rendered")
        except helm.HelmError as e:
            check(needle in str(e), f"render refuses {json.dumps(values)} naming {needle!r}", str(e))


# ------------------------------------------------------------------------------- Containerfiles


def stages(text: str) -> list[list[str]]:
    """The instructions of each stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(s)
        elif not s.upper().startswith("ARG "):
            out.append([s])
    return out


def check_containerfiles() -> None:
    files = sorted(CONTAINERS.glob("*.Containerfile"))
    names = {f.name for f in files}
    expected = {"coordinator.Containerfile", "audit.Containerfile", "cli.Containerfile", "node.Containerfile"}
    check(expected <= names, f"Containerfiles for {sorted(expected)}", str(sorted(names)))
    for f in files:
        text = f.read_text()
        st = stages(text)
        final = st[-1] if st else []
        p = []
        if len(st) < 2:
            p.append("not a multi-stage build")
        if not final or final[0].split()[1] != "scratch":
            p.append(f"the final stage is not FROM scratch: {final[:1]}")
        if any(i.upper().startswith("RUN ") for i in final):
            p.append("the final stage runs commands (it has no shell)")
        users = [i.split()[1] for i in final if i.upper().startswith("USER ")]
        if users != ["10001:10001"]:
            p.append(f"USER is {users}, not the fixed 10001:10001")
        entry = [i for i in final if i.upper().startswith("ENTRYPOINT ")]
        if len(entry) != 1 or not entry[0].split(None, 1)[1].startswith("["):
            p.append("no exec-form ENTRYPOINT")
        for m in re.finditer(r"^ARG (\w+_IMAGE)=(\S+)", text, re.M):
            if ":" not in m.group(2).rsplit("/", 1)[-1] and "@sha256:" not in m.group(2):
                p.append(f"{m.group(1)} is not pinned: {m.group(2)}")
        check(not p, f"{f.name}: scratch final stage, user 10001, exec entrypoint, pinned builder", "; ".join(p))
    hadolint = Path(sys.executable).parent / "hadolint"
    for f in files:
        run = subprocess.run(
            [str(hadolint), "--no-color", "--failure-threshold", "info", str(f)],
            capture_output=True,
            text=True,
        )
        check(run.returncode == 0, f"{f.name}: hadolint finds nothing", run.stdout + run.stderr)
    ignore = (ROOT / ".dockerignore").read_text().split()
    missing = [e for e in ("target", ".git", ".venv", "**/*.key", "**/*.db") if e not in ignore]
    check(not missing, ".dockerignore keeps build outputs, venvs, keys and databases out", str(missing))


def main() -> int:
    check_chart()
    check_containerfiles()
    failed = sum(1 for ok, _ in results if not ok)
    print(f"deploy checks: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
