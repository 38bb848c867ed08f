{{- define "trivy-gateway.fullname" -}}
{{ .Release.Name }}-trivy-gateway
{{- end -}}

{{- define "trivy-gateway.selectorLabels" -}}
app.kubernetes.io/name: trivy-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trivy-gateway.labels" -}}
{{ include "trivy-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: trivy-gateway-{{ .Chart.Version }}
{{- end -}}
