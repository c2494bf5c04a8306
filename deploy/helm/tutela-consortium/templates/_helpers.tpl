{{/* Names. */}}
{{- define "tutela.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tutela.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tutela.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tutela.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: the common set, and the selector of one component (call with dict "root" . "component" NAME). */}}
{{- define "tutela.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tutela.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tutela
tutela.io/consortium: {{ .Values.consortium | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tutela.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tutela.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tutela.componentLabels" -}}
{{ include "tutela.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tutela.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The image of a component: call with dict "root" . "image" .Values.X.image. */}}
{{- define "tutela.image" -}}
{{- $repo := .image.repository -}}
{{- with .root.Values.image.registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The restricted Pod Security profile, in one place for every Pod of the chart: a fixed non-root
user (the images' 10001), the runtime's default seccomp profile, and for each container no
privilege escalation, no capability and a read-only root filesystem.
*/}}
{{- define "tutela.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
# Re-own the volumes only when their root does not match already: a recursive chmod at every
# start would make the audit checkpoint key group-readable, and the service refuses such a key.
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tutela.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tutela.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The database: "external", "in-cluster" or "sqlite"; both set is an error. */}}
{{- define "tutela.database" -}}
{{- if and .Values.externalDatabase.enabled .Values.postgresql.enabled -}}
{{- fail "externalDatabase.enabled and postgresql.enabled are both true: choose one" -}}
{{- else if .Values.externalDatabase.enabled -}}
{{- if not .Values.externalDatabase.existingSecret -}}
{{- fail "externalDatabase.enabled needs externalDatabase.existingSecret: the Secret holding the database URLs" -}}
{{- end -}}
external
{{- else if .Values.postgresql.enabled -}}
in-cluster
{{- else -}}
sqlite
{{- end -}}
{{- end -}}

{{/* The Secret holding the database URLs (external or in-cluster). */}}
{{- define "tutela.databaseSecret" -}}
{{- if .Values.externalDatabase.enabled -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "tutela.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tutela.coordinatorTlsSecret" -}}
{{- default (printf "%s-coordinator-tls" (include "tutela.fullname" .)) .Values.coordinator.tls.existingSecret -}}
{{- end -}}

{{- define "tutela.auditTlsSecret" -}}
{{- default (printf "%s-audit-tls" (include "tutela.fullname" .)) .Values.audit.tls.existingSecret -}}
{{- end -}}

{{- define "tutela.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "tutela.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{/* The audit service's in-cluster address, as the coordinator dials it. */}}
{{- define "tutela.auditEndpoint" -}}
{{- default (printf "%s-audit.%s.svc:%v" (include "tutela.fullname" .) .Release.Namespace .Values.audit.service.port) .Values.coordinator.config.audit.endpoint -}}
{{- end -}}

{{/* A service's probe (call with dict "root" . "binary" NAME "config" PATH "probes" VALUES "threshold" N). */}}
{{- define "tutela.probe" -}}
exec:
  command:
    - /usr/local/bin/{{ .binary }}
    - --config
    - {{ .config }}
    - probe
    - --timeout-secs
    - {{ sub .probes.timeoutSeconds 1 | max 1 | quote }}
periodSeconds: {{ .probes.periodSeconds }}
timeoutSeconds: {{ .probes.timeoutSeconds }}
failureThreshold: {{ .threshold }}
{{- end -}}

{{/* The egress rule to the database (none for SQLite), as a list item of a NetworkPolicy's egress. */}}
{{- define "tutela.databaseEgress" -}}
{{- $db := include "tutela.database" . -}}
{{- if eq $db "in-cluster" }}
- to:
    - podSelector:
        matchLabels:
          {{- include "tutela.selectorLabels" (dict "root" . "component" "postgresql") | nindent 10 }}
  ports:
    - port: 5432
      protocol: TCP
{{- else if eq $db "external" }}
- ports:
    - port: {{ .Values.externalDatabase.port }}
      protocol: TCP
  {{- with .Values.externalDatabase.networkPolicyPeers }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}
