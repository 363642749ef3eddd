#!/bin/sh
# The coordinator container's entry: initialise the data directory once (keys, schema, the first admin
# token — printed to the log this one time: keep it), then serve on all interfaces with the arguments the
# container was given (TLS files, --db, --mqtt ..., or --insecure for a lab).
set -eu
DATA="${FLEETLOOP_DATA_DIR:-/data}"
DB_ARGS=""
if [ -n "${FLEETLOOP_DB:-}" ]; then DB_ARGS="--db ${FLEETLOOP_DB}"; fi
if [ ! -e "$DATA/.initialised" ]; then
  # shellcheck disable=SC2086
  fleetloop cloud init --dir "$DATA" $DB_ARGS
  touch "$DATA/.initialised"
fi
# shellcheck disable=SC2086
exec fleetloop cloud serve --dir "$DATA" --host 0.0.0.0 --http-port 8080 --grpc-port 50051 $DB_ARGS "$@"
