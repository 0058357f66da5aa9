{{/* Names and labels of this chart's own resources (usage (a)). */}}

{{- define "kafka-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kafka-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kafka-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kafka-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kafka-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kafka-sidecar.labels" -}}
helm.sh/chart: {{ include "kafka-sidecar.chart" . }}
{{ include "kafka-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels selecting the pods that run the sidecar: podSelector, or this chart's Deployment. */}}
{{- define "kafka-sidecar.podSelectorLabels" -}}
{{- if .Values.podSelector }}
{{- toYaml .Values.podSelector }}
{{- else }}
{{- include "kafka-sidecar.selectorLabels" . }}
{{- end }}
{{- end }}

{{- define "kafka-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kafka-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The sidecar's ConfigMap name in usage (a). */}}
{{- define "kafka-sidecar.configMapName" -}}
{{- printf "%s-config" (include "kafka-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "repository:tag" or "repository@digest" of an image block. */}}
{{- define "kafka-sidecar.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}
{{- end }}
