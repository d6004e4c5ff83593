{{/* Names */}}
{{- define "carrara.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "carrara.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "carrara.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "carrara.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "carrara.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "carrara.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: every object; selector labels take a component (and a pool for scorers). */}}
{{- define "carrara.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "carrara.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: carrara
{{- end -}}

{{/* (dict "root" $ "component" "scorer" "pool" "default") */}}
{{- define "carrara.selectorLabels" -}}
app.kubernetes.io/name: {{ include "carrara.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .pool }}
carrara.io/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{/* The component (and pool) labels alone, next to carrara.labels on an object's metadata. */}}
{{- define "carrara.componentLabels" -}}
app.kubernetes.io/component: {{ .component }}
{{- if .pool }}
carrara.io/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{- define "carrara.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/* The pod-level part every Carrara pod shares: hardening, service account, pull secrets. */}}
{{- define "carrara.podSpecCommon" -}}
serviceAccountName: {{ include "carrara.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "carrara.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/*
The secrets a process uses, as one description both the env and the volume helpers read.
(dict "root" $ "kafka" <identity or nil> "database" bool "redis" bool "mlflow" <credentials or nil>
      "session" bool "signing" bool)
Secrets with a *_FILE setting are mounted as files (a projected volume, mode 0440, readable by the
pod's fsGroup) under /etc/carrara/secrets; the others come from secretKeyRef env vars.
*/}}
{{- define "carrara.secretFiles" -}}
{{- $v := .root.Values -}}
{{- $files := list -}}
{{- with .kafka -}}
{{- if and .existingSecret .passwordKey (or (hasPrefix "SASL_" $v.kafka.securityProtocol)) -}}
{{- $files = append $files (dict "secret" .existingSecret "key" .passwordKey "path" "kafka/password") -}}
{{- end -}}
{{- if and .existingSecret .certKey .keyKey -}}
{{- $files = append $files (dict "secret" .existingSecret "key" .certKey "path" "kafka/client.crt") -}}
{{- $files = append $files (dict "secret" .existingSecret "key" .keyKey "path" "kafka/client.key") -}}
{{- end -}}
{{- if $v.kafka.ca.existingSecret -}}
{{- $files = append $files (dict "secret" $v.kafka.ca.existingSecret "key" $v.kafka.ca.key "path" "kafka/ca.crt") -}}
{{- end -}}
{{- end -}}
{{- if and .session $v.secrets.session.existingSecret -}}
{{- $files = append $files (dict "secret" $v.secrets.session.existingSecret "key" $v.secrets.session.key "path" "session/secret-key") -}}
{{- end -}}
{{- if and .signing $v.secrets.deploymentSigning.existingSecret -}}
{{- $files = append $files (dict "secret" $v.secrets.deploymentSigning.existingSecret "key" $v.secrets.deploymentSigning.key "path" "signing/key") -}}
{{- end -}}
{{- toJson (dict "files" $files) -}}
{{- end -}}

{{- define "carrara.env" -}}
{{- $v := .root.Values -}}
{{- $files := (include "carrara.secretFiles" . | fromJson).files -}}
{{- $paths := dict -}}
{{- range $files }}{{- $_ := set $paths .path true }}{{- end -}}
- name: CARRARA_ENVIRONMENT
  value: {{ $v.environment | quote }}
- name: CARRARA_LOG_LEVEL
  value: {{ $v.log.level | quote }}
- name: CARRARA_LOG_JSON
  value: {{ $v.log.json | quote }}
# The root filesystem is read-only: HOME, temporary files and caches go to the /tmp emptyDir.
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: CARRARA_HOME
  value: /tmp/carrara
- name: CARRARA_MLFLOW_URL
  value: {{ $v.mlflow.url | quote }}
{{- with .kafka }}
- name: CARRARA_KAFKA_BOOTSTRAP
  value: {{ $v.kafka.bootstrap | quote }}
- name: CARRARA_KAFKA_SECURITY_PROTOCOL
  value: {{ $v.kafka.securityProtocol | quote }}
{{- if $v.kafka.saslMechanism }}
- name: CARRARA_KAFKA_SASL_MECHANISM
  value: {{ $v.kafka.saslMechanism | quote }}
{{- if eq $v.kafka.saslMechanism "OAUTHBEARER" }}
- name: CARRARA_KAFKA_OIDC_TOKEN_ENDPOINT_URL
  value: {{ required "kafka.oidc.tokenEndpointUrl is required with OAUTHBEARER" $v.kafka.oidc.tokenEndpointUrl | quote }}
- name: CARRARA_KAFKA_OIDC_CLIENT_ID
  value: {{ required "a Kafka identity needs a username (the OIDC client id)" .username | quote }}
{{- with $v.kafka.oidc.scope }}
- name: CARRARA_KAFKA_OIDC_SCOPE
  value: {{ . | quote }}
{{- end }}
{{- if hasKey $paths "kafka/password" }}
- name: CARRARA_KAFKA_OIDC_CLIENT_SECRET_FILE
  value: /etc/carrara/secrets/kafka/password
{{- end }}
{{- else }}
- name: CARRARA_KAFKA_SASL_USERNAME
  value: {{ required "a Kafka identity needs a username with SASL" .username | quote }}
{{- if hasKey $paths "kafka/password" }}
- name: CARRARA_KAFKA_SASL_PASSWORD_FILE
  value: /etc/carrara/secrets/kafka/password
{{- end }}
{{- end }}
{{- end }}
{{- if hasKey $paths "kafka/ca.crt" }}
- name: CARRARA_KAFKA_SSL_CA_LOCATION
  value: /etc/carrara/secrets/kafka/ca.crt
{{- end }}
{{- if hasKey $paths "kafka/client.crt" }}
- name: CARRARA_KAFKA_SSL_CERTIFICATE_LOCATION
  value: /etc/carrara/secrets/kafka/client.crt
- name: CARRARA_KAFKA_SSL_KEY_LOCATION
  value: /etc/carrara/secrets/kafka/client.key
{{- end }}
{{- range $name, $value := $v.kafka.properties }}
- name: CARRARA_KAFKA__{{ $name | upper | replace "." "_" | replace "-" "_" }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- if .database }}
- name: CARRARA_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "postgres.existingSecret is required" $v.postgres.existingSecret }}
      key: {{ $v.postgres.urlKey }}
{{- end }}
{{- if .redis }}
- name: CARRARA_REDIS_URL
{{- if $v.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret }}
      key: {{ $v.redis.urlKey }}
{{- else }}
  value: {{ $v.redis.url | quote }}
{{- end }}
{{- end }}
{{- with .mlflow }}
{{- if .existingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- if hasKey $paths "session/secret-key" }}
- name: CARRARA_SECRET_KEY_FILE
  value: /etc/carrara/secrets/session/secret-key
{{- end }}
{{- if hasKey $paths "signing/key" }}
- name: CARRARA_DEPLOYMENT_SIGNING_KEY_FILE
  value: /etc/carrara/secrets/signing/key
{{- end }}
{{- if and .signing $v.secrets.deploymentSigning.previousKey }}
- name: CARRARA_DEPLOYMENT_SIGNING_PREVIOUS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default $v.secrets.deploymentSigning.existingSecret $v.secrets.deploymentSigning.previousExistingSecret }}
      key: {{ $v.secrets.deploymentSigning.previousKey }}
{{- end }}
{{- range $name, $value := $v.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Volumes: /tmp (an emptyDir) and, when the process has secret files, the projected secrets. */}}
{{- define "carrara.volumes" -}}
{{- $files := (include "carrara.secretFiles" . | fromJson).files -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
{{- if $files }}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
    {{- range $files }}
      - secret:
          name: {{ .secret }}
          items:
            - key: {{ .key }}
              path: {{ .path }}
    {{- end }}
{{- end }}
{{- end -}}

{{- define "carrara.volumeMounts" -}}
{{- $files := (include "carrara.secretFiles" . | fromJson).files -}}
- name: tmp
  mountPath: /tmp
{{- if $files }}
- name: secrets
  mountPath: /etc/carrara/secrets
  readOnly: true
{{- end }}
{{- end -}}

{{/* NetworkPolicy egress rules: DNS plus the named external services. (dict "root" $ "to" (list "kafka" ...)) */}}
{{- define "carrara.egress" -}}
{{- $np := .root.Values.networkPolicy -}}
- to:
    {{- toYaml $np.dns.peers | nindent 4 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- range .to }}
{{- $svc := get $np . }}
{{- if $svc.ports }}
{{- if $svc.peers }}
- to:
    {{- toYaml $svc.peers | nindent 4 }}
  ports:
{{- else }}
- ports:
{{- end }}
  {{- range $svc.ports }}
    - {protocol: TCP, port: {{ . }}}
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The services a Kafka client reaches: Kafka, and the OIDC token endpoint with OAUTHBEARER. */}}
{{- define "carrara.kafkaServices" -}}
{{- if eq .Values.kafka.saslMechanism "OAUTHBEARER" -}}kafka,oidc{{- else -}}kafka{{- end -}}
{{- end -}}
