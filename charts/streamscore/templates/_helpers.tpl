{{- define "streamscore.name" -}}streamscore-operator{{- end -}}
{{- define "streamscore.fullname" -}}{{ .Release.Name }}-streamscore-operator{{- end -}}
{{- define "streamscore.labels" -}}
app.kubernetes.io/name: streamscore-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "streamscore.selector" -}}
app.kubernetes.io/name: streamscore-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "streamscore.rules" -}}
- apiGroups: [streamscore.io]
  resources: [tenantmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [streamscore.io]
  resources: [tenantmodels/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch, delete]
# Metadata of the Secrets a TenantModel names, for the opt-in label (values are never read).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
