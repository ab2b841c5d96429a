#!/usr/bin/env bash
# Start Azurite (Blob, Queue, Table) on loopback on its default ports, unless one already listens.
# Sourced by scripts/test and scripts/run; stops what it started when the caller exits.
azurite_up() {
  python3 - <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", 10000), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

start_azurite() {
  if azurite_up; then
    echo "Azurite already listening on 127.0.0.1:10000"
    return 0
  fi
  mkdir -p .azurite
  ./node_modules/.bin/azurite --silent --skipApiVersionCheck --disableTelemetry --loose \
    --location .azurite --blobHost 127.0.0.1 --queueHost 127.0.0.1 --tableHost 127.0.0.1 \
    > .azurite/azurite.log 2>&1 &
  AZURITE_PID=$!
  trap 'kill "$AZURITE_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 60); do
    if azurite_up; then
      echo "Azurite started (pid $AZURITE_PID)"
      return 0
    fi
    sleep 0.5
  done
  echo "Azurite did not start; see .azurite/azurite.log" >&2
  cat .azurite/azurite.log >&2 || true
  return 1
}
