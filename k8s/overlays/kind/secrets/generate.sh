#!/bin/sh
# Writes the kind overlay's git-ignored secret env files from their committed .example templates,
# replacing each `changeme-<service>` placeholder with one random password per service, the same
# in every file (the platform's URLs must match the data services' own credentials).
# Refuses to overwrite existing files: delete them (and the data services' PVCs) to rotate.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data="$here/../data/secrets"

for f in "$here/platform.env" "$here/keda-rabbitmq.env" "$data/data-services.env"; do
  if [ -e "$f" ]; then
    echo "generate.sh: $f exists; not overwriting" >&2
    exit 1
  fi
done

random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
rabbitmq=$(random)
postgres=$(random)
redis=$(random)

umask 077
for pair in "$here/platform.env.example:$here/platform.env" \
            "$here/keda-rabbitmq.env.example:$here/keda-rabbitmq.env" \
            "$data/data-services.env.example:$data/data-services.env"; do
  src=${pair%%:*}
  dst=${pair#*:}
  sed -e "s/changeme-rabbitmq/$rabbitmq/g" \
      -e "s/changeme-postgres/$postgres/g" \
      -e "s/changeme-redis/$redis/g" "$src" > "$dst"
  echo "wrote $dst"
done
