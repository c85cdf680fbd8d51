#!/usr/bin/env bash
# Start a local Prefect server on 127.0.0.1 and serve the deployments unlearn/tofu, unlearn/muse and
# unlearn/requests from this project. Then, in another shell:
#   export PREFECT_API_URL=http://127.0.0.1:${PORT:-4200}/api
#   prefect deployment run unlearn/tofu --watch
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-4200}
BIN=${BIN:-.venv/bin}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_RUNNER_POLL_FREQUENCY=${PREFECT_RUNNER_POLL_FREQUENCY:-5}
mkdir -p "$PREFECT_HOME"
"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 120); do
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; then break; fi
  sleep 1
done
echo "Prefect server: http://127.0.0.1:$PORT (log: $PREFECT_HOME/server.log)"
echo "Serving unlearn/tofu, unlearn/muse, unlearn/requests. In another shell:"
echo "  export PREFECT_API_URL=$PREFECT_API_URL"
echo "  $BIN/prefect deployment run unlearn/tofu --watch"
"$BIN/python" flows/pipelines.py serve
