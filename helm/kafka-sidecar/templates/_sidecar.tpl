{{/*
Public named templates: add kafka-sidecar to any pod, in this chart or in yours
(docs/kubernetes.md, "Add the sidecar to your own chart").

Each takes one argument, a dict:
  values     the sidecar values: this chart's `sidecar:` block (as a dependency aliased
             kafkaSidecar: .Values.kafkaSidecar.sidecar, which holds this chart's defaults)
  name       the name of the sidecar's ConfigMap (ignored with values.existingConfigMap)
  namespace  optional: metadata.namespace of the ConfigMap
  labels     optional: labels of the ConfigMap
  socketDir  optional: the directory of the app's Unix socket (unixSocket.dir): mounted from
             the pod volume `app-socket` (an emptyDir the app mounts too); app.url must then be
             "unix://<socketDir>/<file>:<path>"
  terminationGracePeriodSeconds
             optional: the pod's; kafka-sidecar.container then fails the render if it is not
             at least shutdown.grace_period + 5s

  kafka-sidecar.configmap    the ConfigMap holding config.toml (a whole manifest)
  kafka-sidecar.container    the container, as a list item: put it under `containers:`, or
                             under `initContainers:` when values.nativeSidecar is true
  kafka-sidecar.volume       the pod volume with config.toml, as a list item for `volumes:`
  kafka-sidecar.checksum     a hash of config.toml for a pod annotation, so that pods roll
                             when the config changes
  kafka-sidecar.configToml   config.toml itself ([dedup] only with dedup.enabled: true)
*/}}

{{- define "kafka-sidecar.configToml" -}}
{{- $v := .values -}}
{{- $port := int ($v.adminPort | default 9464) -}}
{{- $config := dict -}}
{{- include "kafka-sidecar.normalize" (dict "in" ($v.config | default dict) "out" $config) -}}
{{- $admin := dict -}}
{{- if kindIs "map" (get $config "admin") }}{{ $admin = get $config "admin" }}{{ end -}}
{{- $listen := printf "0.0.0.0:%d" $port -}}
{{- with get $admin "listen" -}}
{{- if not (hasSuffix (printf ":%d" $port) (toString .)) -}}
{{- fail (printf "sidecar.config.admin.listen (%s) must use sidecar.adminPort (%d): the probes and the monitoring resources use that port" (toString .) $port) -}}
{{- end -}}
{{- $listen = toString . -}}
{{- end -}}
{{- $_ := set $admin "listen" $listen -}}
{{- $_ := set $config "admin" $admin -}}
{{- include "kafka-sidecar.dedup" $config -}}
{{- toToml $config -}}
{{- end }}

{{/*
[dedup] of a normalized config (in place): refuses Redis URLs carrying a password (they belong
in a Secret, mapped with secretEnv to KAFKA_SIDECAR_DEDUP__REDIS_URL / __CLUSTER_URLS), and
leaves the section out unless dedup.enabled is true (off is the sidecar's default, so the
result is the same; binaries without dedup support then accept the file too).
*/}}
{{- define "kafka-sidecar.dedup" -}}
{{- $dedup := get . "dedup" -}}
{{- if kindIs "map" $dedup -}}
{{- $urls := list -}}
{{- with get $dedup "redis_url" }}{{ $urls = append $urls (toString .) }}{{ end -}}
{{- $cluster := get $dedup "cluster_urls" -}}
{{- if kindIs "slice" $cluster }}{{ $urls = concat $urls $cluster }}{{ else if $cluster }}{{ $urls = concat $urls (splitList "," (toString $cluster)) }}{{ end -}}
{{- range $urls -}}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" (trim (toString .)) -}}
{{- fail "sidecar.config.dedup: a Redis URL with a password does not belong in the ConfigMap: put it in a Secret and map it with sidecar.secretEnv (KAFKA_SIDECAR_DEDUP__REDIS_URL, or KAFKA_SIDECAR_DEDUP__CLUSTER_URLS as a comma-separated list)" -}}
{{- end -}}
{{- end -}}
{{- if ne (toString (get $dedup "enabled")) "true" -}}
{{- $_ := unset . "dedup" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
Copies a values map into .out, turning whole-number floats into integers (Helm reads numbers in
values files as floats; toToml would write `workers = 16.0`, which the sidecar rejects for an
integer key) and dropping nulls (so `key: null` falls back to the sidecar's default).
*/}}
{{- define "kafka-sidecar.normalize" -}}
{{- $out := .out -}}
{{- range $k, $v := .in -}}
{{- if kindIs "map" $v -}}
{{- $child := dict -}}
{{- include "kafka-sidecar.normalize" (dict "in" $v "out" $child) -}}
{{- $_ := set $out $k $child -}}
{{- else if kindIs "slice" $v -}}
{{- $l := list -}}
{{- range $e := $v -}}
{{- if and (kindIs "float64" $e) (eq $e (floor $e)) -}}
{{- $l = append $l (int64 $e) -}}
{{- else -}}
{{- $l = append $l $e -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out $k $l -}}
{{- else if and (kindIs "float64" $v) (eq $v (floor $v)) -}}
{{- $_ := set $out $k (int64 $v) -}}
{{- else if not (kindIs "invalid" $v) -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Seconds of a simple duration ("25s", "1m", "1500ms"); -1 when it is not that simple. */}}
{{- define "kafka-sidecar.durationSeconds" -}}
{{- $d := toString . | trim -}}
{{- if regexMatch "^[0-9]+ms$" $d -}}
{{- div (add (trimSuffix "ms" $d | int) 999) 1000 -}}
{{- else if regexMatch "^[0-9]+s$" $d -}}
{{- trimSuffix "s" $d | int -}}
{{- else if regexMatch "^[0-9]+m$" $d -}}
{{- mul (trimSuffix "m" $d | int) 60 -}}
{{- else -}}
-1
{{- end -}}
{{- end }}

{{- define "kafka-sidecar.configmap" -}}
{{- if not .values.existingConfigMap }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ required "kafka-sidecar.configmap: the argument needs a \"name\"" .name }}
  {{- with .namespace }}
  namespace: {{ . }}
  {{- end }}
  {{- with .labels }}
  labels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
data:
  config.toml: |
    {{- regexReplaceAll "(?m)^[ \t]+$" (include "kafka-sidecar.configToml" . | nindent 4) "" }}
{{- end }}
{{- end }}

{{- define "kafka-sidecar.checksum" -}}
{{- if .values.existingConfigMap -}}
{{- .values.existingConfigMap | sha256sum -}}
{{- else -}}
{{- include "kafka-sidecar.configToml" . | sha256sum -}}
{{- end -}}
{{- end }}

{{- define "kafka-sidecar.volume" -}}
- name: kafka-sidecar-config
  configMap:
    name: {{ .values.existingConfigMap | default .name }}
    items:
      - key: config.toml
        path: config.toml
{{- end }}

{{- define "kafka-sidecar.container" -}}
{{- $v := .values -}}
{{- $port := int ($v.adminPort | default 9464) -}}
{{- if hasKey . "terminationGracePeriodSeconds" -}}
{{- $shutdown := get ($v.config | default dict) "shutdown" | default dict -}}
{{- $grace := get $shutdown "grace_period" | default "25s" -}}
{{- $graceSeconds := include "kafka-sidecar.durationSeconds" $grace | int -}}
{{- if and (ge $graceSeconds 0) (lt (int .terminationGracePeriodSeconds) (add $graceSeconds 5)) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least sidecar.config.shutdown.grace_period (%s) + 5s, the time to commit offsets and leave the group after the drain" (int .terminationGracePeriodSeconds) (toString $grace)) -}}
{{- end -}}
{{- end -}}
{{- with .socketDir -}}
{{- $url := toString (get (get ($v.config | default dict) "app" | default dict) "url" | default "") -}}
{{- if not (hasPrefix (printf "unix://%s/" (trimSuffix "/" (toString .))) $url) -}}
{{- fail (printf "unixSocket.enabled: sidecar.config.app.url (%q) must be \"unix://%s/<socket file>:/<path>\", a socket in the shared emptyDir" $url (trimSuffix "/" (toString .))) -}}
{{- end -}}
{{- end -}}
- name: kafka-sidecar
  image: {{ include "kafka-sidecar.image" $v.image | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy | default "IfNotPresent" }}
  {{- if $v.nativeSidecar }}
  # Native sidecar: starts before the app containers and stops after them.
  restartPolicy: Always
  {{- end }}
  args: ["run"]
  env:
    - name: KAFKA_SIDECAR_CONFIG
      value: /etc/kafka-sidecar/config.toml
    {{- $kafka := get ($v.config | default dict) "kafka" | default dict }}
    {{- if and $v.staticMembership (not (get $kafka "group_instance_id")) }}
    # Static membership: a restarted container rejoins as the same member and gets its
    # partitions back at once, instead of after kafka.session_timeout.
    - name: KAFKA_SIDECAR_KAFKA__GROUP_INSTANCE_ID
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    {{- end }}
    {{- range $v.secretEnv }}
    - name: {{ required "sidecar.secretEnv[].name is required" .name }}
      valueFrom:
        secretKeyRef:
          name: {{ required "sidecar.secretEnv[].secretName is required" .secretName }}
          key: {{ required "sidecar.secretEnv[].key is required" .key }}
          {{- if hasKey . "optional" }}
          optional: {{ .optional }}
          {{- end }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: sidecar-admin
      containerPort: {{ $port }}
      protocol: TCP
  {{- with $v.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Config errors (exit 2, naming the key) show in the pod status.
  terminationMessagePolicy: FallbackToLogsOnError
  volumeMounts:
    - name: kafka-sidecar-config
      mountPath: /etc/kafka-sidecar
      readOnly: true
    {{- with .socketDir }}
    - name: app-socket
      mountPath: {{ . }}
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
