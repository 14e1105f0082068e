{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "blazen-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, plus the chart name unless the release name already contains it.
*/}}
{{- define "blazen-operator.fullname" -}}
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

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "blazen-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "blazen-operator.labels" -}}
helm.sh/chart: {{ include "blazen-operator.chart" . }}
{{ include "blazen-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: blazen-fleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "blazen-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blazen-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "blazen-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "blazen-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference. */}}
{{- define "blazen-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The rules the operator needs in every namespace it watches (docs/operator.md). Rendered into one ClusterRole
(all namespaces) or into a Role per watched namespace. Children are server-side applied, so `patch`, never
`update`.
*/}}
{{- define "blazen-operator.namespacedRules" -}}
# The custom resource: kopf watches it and patches its bookkeeping annotations; the operator writes status.
- apiGroups: ["blazen.dev"]
  resources: ["blazenpeers"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["blazen.dev"]
  resources: ["blazenpeers/status"]
  verbs: ["get", "patch", "update"]
# Owner references with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: ["blazen.dev"]
  resources: ["blazenpeers/finalizers"]
  verbs: ["update"]
# The objects a BlazenPeer is reconciled into. Secrets: the token Secret is read (a missing one is reported) and
# the TLS Secret stubs carrying owner references are created. The peers' Role has no rules, so no
# escalate/bind is needed to create it.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts", "secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["cert-manager.io"]
  resources: ["certificates", "issuers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods: the operator asks ready pods (/v1/info) which steps they serve and how many session refs they hold,
# and patches that count in as the pod's controller.kubernetes.io/pod-deletion-cost annotation.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "patch"]
# Events on transitions, through both event APIs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
