#!/usr/bin/env bash
# azd "postdeploy" hook: queue the first model refresh with the deploying user's Entra identity
# (Storage Queue Data Message Sender on the refresh queue, granted by infra/resources.bicep), so
# no function key is needed, then say how to watch it. azd exports the Bicep outputs as
# environment variables; run it by hand with the same variables (`azd env get-values`).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${AZURE_STORAGE_QUEUE_ENDPOINT:?run through azd (azd env get-values) or set it}"
: "${MODEL_REFRESH_QUEUE:=model-refresh}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c "import azure.identity, azure.storage.queue, shared.cli" 2>/dev/null; then
  echo "The project's Python dependencies are not installed for $PYTHON (./scripts/test or ./scripts/run installs them into .venv)." >&2
  echo "Queue the first refresh later: ./scripts/postdeploy.sh, or POST ${SERVICE_API_URI:-https://<app>}/api/model/refresh with the model_refresh key." >&2
  exit 1
fi

# The CLI reads the same settings as the app; only the queue's account is needed to enqueue.
# DefaultAzureCredential picks up `az login` / `azd auth login` (no client id: the user's identity).
export AzureWebJobsStorage__queueServiceUri="$AZURE_STORAGE_QUEUE_ENDPOINT"
export MODEL_REFRESH_QUEUE
if [ -n "${MODEL_ID:-}" ]; then export MODEL_ID; fi
unset AzureWebJobsStorage AzureWebJobsStorage__clientId

echo "Queueing the first model refresh on $MODEL_REFRESH_QUEUE as $(az account show --query user.name -o tsv 2>/dev/null || echo 'the signed-in user')"
# A new role assignment can take a few minutes to apply: try again for up to 5 minutes.
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  if "$PYTHON" -m shared refresh --enqueue; then
    break
  fi
  if [ "$attempt" = 10 ]; then
    echo "Could not queue the refresh. Queue it later: POST ${SERVICE_API_URI:-https://<app>}/api/model/refresh with the model_refresh key, or run this script again." >&2
    exit 1
  fi
  echo "Not yet allowed (role assignments propagate in a few minutes); retrying in 30 s" >&2
  sleep 30
done

cat <<MSG

The refresh runs in the app (copy from the Hub, canary, publish: several minutes for bert-large).
Watch it:
  curl -s "${SERVICE_API_URI:-https://<app>}/api/model?code=\$(az functionapp function keys list -g ${AZURE_RESOURCE_GROUP:-<rg>} -n ${AZURE_FUNCTION_APP_NAME:-<app>} --function-name model --query default -o tsv)"
  curl -s "${SERVICE_API_URI:-https://<app>}/api/health"       # 200 once an instance has loaded the model
Logs: Application Insights ${APPLICATIONINSIGHTS_NAME:-}, query "traces | where message startswith 'event=refresh '" (README, Operations).
MSG
