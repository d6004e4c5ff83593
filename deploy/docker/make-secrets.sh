#!/usr/bin/env bash
# Secrets of the docker-compose stack, made once into deploy/docker/secrets/ (git-ignored):
# a CA and the broker's certificate (openssl; keystore PKCS12, truststore PEM), random passwords,
# the broker's server.properties (SASL_SSL with SCRAM-SHA-512, StandardAuthorizer) and one env file
# per identity. docker-compose.yml reads them with `env_file:` and mounts; nothing is inline.
# Re-running keeps what exists; delete the folder to rotate everything.
set -euo pipefail
cd "$(dirname "$0")"
out=secrets
[ -f "$out/kafka/server.properties" ] && { echo "$out/ exists: kept"; exit 0; }
umask 077
mkdir -p "$out/tls" "$out/kafka" "$out/mlflow"
pw() { openssl rand -base64 30 | tr -d '/+=\n' | cut -c1-32; }
KEYSTORE_PW=$(pw) BROKER_PW=$(pw) ADMIN_PW=$(pw)
CONTROL_PW=$(pw) SCORER_PW=$(pw) MONITOR_PW=$(pw)
MLFLOW_ADMIN_PW=$(pw) MLFLOW_CARRARA_PW=$(pw) MLFLOW_SCORER_PW=$(pw) FLASK_SECRET=$(pw)

# TLS: the broker is reached as `kafka` inside the network and `localhost` from the host.
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
( cd "$out/tls"
  openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 825 -subj "/CN=Carrara CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  openssl req "${ec[@]}" -keyout broker.key -out broker.csr -subj "/CN=kafka"
  printf 'subjectAltName=DNS:kafka,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > broker.ext
  openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out broker.crt \
    -days 825 -extfile broker.ext
  KEYSTORE_PW=$KEYSTORE_PW openssl pkcs12 -export -in broker.crt -inkey broker.key \
    -certfile ca.crt -name broker -out broker.p12 -passout env:KEYSTORE_PW
  rm -f broker.csr ca.srl broker.ext ) 2>/dev/null

scram='org.apache.kafka.common.security.scram.ScramLoginModule'
plain='org.apache.kafka.common.security.plain.PlainLoginModule'
cat > "$out/kafka/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=kafka:9093
listeners=SASL_SSL://:9092,CONTROLLER://:9093
advertised.listeners=SASL_SSL://kafka:9092
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$scram required username="broker" password="$BROKER_PW";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=$plain required username="broker" password="$BROKER_PW" user_broker="$BROKER_PW";
ssl.keystore.type=PKCS12
ssl.keystore.location=/etc/carrara/tls/broker.p12
ssl.keystore.password=$KEYSTORE_PW
ssl.key.password=$KEYSTORE_PW
ssl.truststore.type=PEM
ssl.truststore.location=/etc/carrara/tls/ca.crt
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:broker;User:admin
allow.everyone.if.no.acl.found=false
log.dirs=/var/lib/kafka/data
num.partitions=3
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
{
  for u in "broker:$BROKER_PW" "admin:$ADMIN_PW" "carrara-control:$CONTROL_PW" \
           "carrara-scorer:$SCORER_PW" "carrara-monitor:$MONITOR_PW"; do
    printf -- '--add-scram SCRAM-SHA-512=[name=%s,password=%s] ' "${u%%:*}" "${u#*:}"
  done
} > "$out/kafka/scram-args"

kafka_env() {  # user password
  printf 'CARRARA_KAFKA_SECURITY_PROTOCOL=SASL_SSL\nCARRARA_KAFKA_SASL_MECHANISM=SCRAM-SHA-512\n'
  printf 'CARRARA_KAFKA_SASL_USERNAME=%s\nCARRARA_KAFKA_SASL_PASSWORD=%s\n' "$1" "$2"
  printf 'CARRARA_KAFKA_SSL_CA_LOCATION=/etc/carrara/tls/ca.crt\n'
}
kafka_env admin "$ADMIN_PW" > "$out/admin.env"
{ kafka_env carrara-control "$CONTROL_PW"
  printf 'MLFLOW_TRACKING_USERNAME=carrara\nMLFLOW_TRACKING_PASSWORD=%s\n' "$MLFLOW_CARRARA_PW"
} > "$out/control.env"
{ kafka_env carrara-scorer "$SCORER_PW"
  printf 'MLFLOW_TRACKING_USERNAME=carrara-scorer\nMLFLOW_TRACKING_PASSWORD=%s\n' "$MLFLOW_SCORER_PW"
} > "$out/scorer.env"
kafka_env carrara-monitor "$MONITOR_PW" > "$out/monitor.env"

cat > "$out/mlflow/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:////var/lib/mlflow-auth/basic_auth.db
admin_username = admin
admin_password = $MLFLOW_ADMIN_PW
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
{ printf 'MLFLOW_AUTH_CONFIG_PATH=/etc/carrara/mlflow/basic_auth.ini\n'
  printf 'MLFLOW_FLASK_SERVER_SECRET_KEY=%s\n' "$FLASK_SECRET"
} > "$out/mlflow.env"
{ printf 'MLFLOW_ADMIN_PASSWORD=%s\nMLFLOW_CARRARA_PASSWORD=%s\n' "$MLFLOW_ADMIN_PW" "$MLFLOW_CARRARA_PW"
  printf 'MLFLOW_SCORER_PASSWORD=%s\n' "$MLFLOW_SCORER_PW"
} > "$out/mlflow-accounts.env"

# The broker runs as uid 1000 (apache/kafka's appuser): let it read its own files.
if [ "$(id -u)" = 0 ]; then chown -R 1000:1000 "$out/kafka" "$out/tls"; fi
chmod 0644 "$out/tls/ca.crt"
echo "secrets written to deploy/docker/$out/ (mode 0600)"
