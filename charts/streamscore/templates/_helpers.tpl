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
# Exactly the verbs the operator uses. Server-side apply creates a missing child, which
# needs `create` besides `patch`; `get` reads children's metadata (ownership checks).
- apiGroups: [streamscore.io]
  resources: [tenantmodels]
  verbs: [list, watch]
- apiGroups: [streamscore.io]
  resources: [tenantmodels/status]
  verbs: [patch]
# The autoscaler (spec.autoscaling) sets the worker count as an HPA does.
- apiGroups: [streamscore.io]
  resources: [tenantmodels/scale]
  verbs: [patch]
# Watched and pruned children.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# Children with a fixed name per TenantModel: watched (one changed or deleted by hand is put
# back at once), never pruned (garbage-collected with their TenantModel).
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch]
# Metadata of the Secrets a TenantModel names, for the opt-in label (values are never read).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Workers' pod IPs: to ask a not-ready worker why (status), and for the rescale (drain,
# resume and status on each worker's admin port 8090).
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
