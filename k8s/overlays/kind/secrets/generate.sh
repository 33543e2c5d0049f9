#!/bin/sh
# Writes the kind overlay's git-ignored secret files from their committed .example templates,
# replacing each `changeme-<name>` placeholder with one random value per name, the same in every file
# (the services' URLs must match the data services' own credentials):
#   secrets/{gateway,worker,collector,dispatcher,read-api,migrate}.env   one Secret per service
#   secrets/keda-rabbitmq.env                                  KEDA's monitoring-only RabbitMQ user
#   ../data/secrets/postgres.env                               the PostgreSQL users' passwords
#   ../data/secrets/redis-auth.conf                            Redis's password
#   ../data/secrets/rabbitmq-definitions.json                  RabbitMQ's users, imported at boot
# Refuses to overwrite existing files: delete them (and the PostgreSQL PVC) to rotate.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data="$here/../data/secrets"
outputs=""
for service in gateway worker collector dispatcher read-api migrate keda-rabbitmq; do
  outputs="$outputs $here/$service.env"
done
outputs="$outputs $data/postgres.env $data/redis-auth.conf $data/rabbitmq-definitions.json"
# No name is the prefix of another: each sed expression replaces whole placeholders only.
names="rabbitmq-admin rabbitmq-gateway rabbitmq-worker rabbitmq-collector rabbitmq-dispatcher rabbitmq-keda
rabbitmq-external postgres-superuser postgres-migrate postgres-gateway postgres-worker postgres-collector
postgres-dispatcher postgres-read-api
redis key-pepper"

for f in $outputs; do
  if [ -e "$f" ]; then
    echo "generate.sh: $f exists; not overwriting" >&2
    exit 1
  fi
done

# Hex only: safe inside URLs, JSON strings, config files and sed replacements.
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
substitutions=""
for name in $names; do
  substitutions="$substitutions -e s/changeme-$name/$(random)/g"
done

umask 077
for dst in $outputs; do
  # shellcheck disable=SC2086  # one word per sed argument
  sed $substitutions "$dst.example" > "$dst"
  if grep -v '^#' "$dst" | grep -q changeme; then  # a template placeholder this script does not know
    echo "generate.sh: $dst still holds a placeholder" >&2
    exit 1
  fi
  echo "wrote $dst"
done
