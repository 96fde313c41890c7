{{/*
Names and labels. Object names start with the release's full name, so two releases (and the
plain manifests) can live in one cluster without sharing any cluster-scoped object.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "layercache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name when it already contains the chart name. */}}
{{- define "layercache.fullname" -}}
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

{{/* `name-version` for the helm.sh/chart label. */}}
{{- define "layercache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: never change across upgrades (selectors are immutable). */}}
{{- define "layercache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "layercache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object: the selector labels plus chart and version, then commonLabels
(merged: a commonLabels key the chart sets itself never doubles it, the chart's wins). */}}
{{- define "layercache.labels" -}}
{{- $chart := include "layercache.chartLabels" . | fromYaml }}
{{- merge $chart (.Values.commonLabels | default dict) | toYaml }}
{{- end }}

{{- define "layercache.chartLabels" -}}
helm.sh/chart: {{ include "layercache.chart" . }}
{{ include "layercache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: layercache
{{- end }}

{{/*
Labels `extra` (a map, may be empty) merged under `base` (a label block): a key of both
keeps base's value, so user labels never double or override a selector label.
Call with (dict "base" (include ...) "extra" .Values.x.labels).
*/}}
{{- define "layercache.mergeLabels" -}}
{{- merge (.base | fromYaml) (.extra | default dict) | toYaml }}
{{- end }}

{{/*
Per-component names, labels and selectors; call with (dict "ctx" $ "component" "operator").
Pod-template labels are the selector labels only, without the chart version, so an upgrade
that changes nothing in a Pod does not roll every agent.
*/}}
{{- /* The full name is cut before the suffix is added, so every suffix survives whole
and the names of two components never collide, nor exceed 63 characters. */}}
{{- define "layercache.componentName" -}}
{{- $suffix := printf "-%s" .component }}
{{- printf "%s%s" (include "layercache.fullname" .ctx | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "layercache.componentLabels" -}}
{{- $labels := include "layercache.labels" .ctx | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" .component }}
{{- toYaml $labels }}
{{- end }}

{{- define "layercache.componentSelectorLabels" -}}
{{ include "layercache.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image reference: repository@digest, or repository:tag (default: appVersion). */}}
{{- define "layercache.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Lease (in the release namespace) the operator replicas elect their leader with. */}}
{{- define "layercache.leaseName" -}}
{{- include "layercache.componentName" (dict "ctx" . "component" "operator") }}
{{- end }}

{{/* Where registryCA's ConfigMap is mounted, and the file the settings point at. */}}
{{- define "layercache.registryCADir" -}}
/etc/layercache/registry-ca
{{- end }}

{{/* Settings both workloads share: insecure registries and the registry CA. */}}
{{- define "layercache.sharedEnv" -}}
{{- with .Values.insecureRegistries }}
- name: LAYERCACHE_INSECURE_REGISTRIES
  value: {{ join "," . | quote }}
{{- end }}
{{- if .Values.registryCA.configMap }}
- name: LAYERCACHE_REGISTRY_CA_FILE
  value: {{ printf "%s/%s" (include "layercache.registryCADir" .) .Values.registryCA.key | quote }}
{{- end }}
{{- end }}

{{/*
User settings (`env`: a map of LAYERCACHE_* to values) as env entries, sorted by name. A
variable the chart sets itself (`reserved`) fails the render instead of silently doubling,
and so does one that would break the install (`layercache.fixedEnv`). Numbers and booleans
render as YAML wrote them (104857600, 12.5, true), never in Go's float notation.
Call with (dict "env" .Values.x.env "reserved" (list "NAME" ...) "what" "x.env").
*/}}
{{- define "layercache.userEnv" -}}
{{- $reserved := concat .reserved (list "LAYERCACHE_INSECURE_REGISTRIES" "LAYERCACHE_REGISTRY_CA_FILE") }}
{{- $fixed := include "layercache.fixedEnv" . | fromYaml }}
{{- range $name, $value := .env }}
{{- if has $name $reserved }}
{{- fail (printf "%s.%s is set by the chart; use the chart's own value for it" $.what $name) }}
{{- end }}
{{- with get $fixed $name }}
{{- fail (printf "%s.%s cannot be set: %s" $.what $name .) }}
{{- end }}
- name: {{ $name }}
  value: {{ ternary $value ($value | toJson) (kindIs "string" $value) | quote }}
{{- end }}
{{- end }}

{{/* Settings `env` must not change, and why (a YAML map: name → reason). */}}
{{- define "layercache.fixedEnv" -}}
LAYERCACHE_CREDENTIALS_SECRET: the chart's RBAC grants access to the Secret layercache-registry-credentials by name only
LAYERCACHE_REGISTRY_SECRET: the chart's RBAC grants access to the Secret layercache-registry-credentials by name only
LAYERCACHE_PEER_TOKEN_SECRET: the chart's RBAC grants access to the Secret layercache-peer-token by name only
{{- end }}

{{/* The registry CA volume mount and volume, when registryCA.configMap is set. */}}
{{- define "layercache.registryCAMount" -}}
{{- if .Values.registryCA.configMap }}
- name: registry-ca
  mountPath: {{ include "layercache.registryCADir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "layercache.registryCAVolume" -}}
{{- if .Values.registryCA.configMap }}
- name: registry-ca
  configMap:
    name: {{ .Values.registryCA.configMap }}
{{- end }}
{{- end }}
