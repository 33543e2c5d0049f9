#!/bin/sh
# Run once by the postgres image, on an empty data directory (/docker-entrypoint-initdb.d), as its
# superuser on the socket of the temporary init server: the platform's users (mlp-roles.psql). The
# passwords are read from the Secret mlp-postgres mounted as files: on no command line, in no environment.
set -eu
exec psql --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=secrets="${MLP_POSTGRES_SECRETS:-/run/secrets/mlp-postgres}" --set=database="$POSTGRES_DB" \
  --file="$(dirname "$0")/mlp-roles.psql"
