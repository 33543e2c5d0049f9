#!/bin/sh
# Writes the kind overlay's git-ignored secret files from their committed .example templates,
# replacing each `changeme-<service>` placeholder with one random password per data service and
# per RabbitMQ user, the same in every file (the platform's URLs must match the data services' own
# credentials): platform.env, keda-rabbitmq.env, ../data/secrets/data-services.env and
# ../data/secrets/rabbitmq-definitions.json (RabbitMQ's users, imported at boot); and api-auth.env,
# the API key pepper of the gateway and the read API.
# Refuses to overwrite existing files: delete them (and the PostgreSQL PVC) to rotate.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data="$here/../data/secrets"
outputs="$here/platform.env $here/keda-rabbitmq.env $here/api-auth.env $data/data-services.env $data/rabbitmq-definitions.json"

for f in $outputs; do
  if [ -e "$f" ]; then
    echo "generate.sh: $f exists; not overwriting" >&2
    exit 1
  fi
done

# Hex only: safe inside URLs, JSON strings and sed replacements.
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
rabbitmq_admin=$(random)
rabbitmq_platform=$(random)
rabbitmq_keda=$(random)
rabbitmq_external=$(random)
postgres=$(random)
redis=$(random)
key_pepper=$(random)

umask 077
for dst in $outputs; do
  sed -e "s/changeme-rabbitmq-admin/$rabbitmq_admin/g" \
      -e "s/changeme-rabbitmq-platform/$rabbitmq_platform/g" \
      -e "s/changeme-rabbitmq-keda/$rabbitmq_keda/g" \
      -e "s/changeme-rabbitmq-external/$rabbitmq_external/g" \
      -e "s/changeme-postgres/$postgres/g" \
      -e "s/changeme-redis/$redis/g" \
      -e "s/changeme-key-pepper/$key_pepper/g" "$dst.example" > "$dst"
  if grep -v '^#' "$dst" | grep -q changeme; then  # a template placeholder this script does not know
    echo "generate.sh: $dst still holds a placeholder" >&2
    exit 1
  fi
  echo "wrote $dst"
done
