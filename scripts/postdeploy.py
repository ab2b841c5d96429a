"""azd's ``postdeploy`` hook (azure.yaml, through scripts/postdeploy.sh or scripts/postdeploy.ps1):
queue the first model refresh with the deploying user's Entra identity, then run the smoke check.

The message goes on the refresh queue through the Azure CLI (``az storage message put --auth-mode
login``: the user's Storage Queue Data Message Sender role on the queue, granted by infra/), base64
encoded as the host's queue trigger expects (host.json ``messageEncoding``), in the subscription
azd deployed to (``AZURE_SUBSCRIPTION_ID``). Standard library only (and scripts/azure_cli.py beside
it), Python 3.9 or newer: a fresh clone without the project's virtual environment queues it the
same way. A new role assignment can take minutes to apply: that failure is retried for up to 5
minutes; one no wait can fix (signed out, another tenant or subscription) stops at once and says
what to do.

Then ``scripts/smoke`` checks the deployment (health, the model being isolated, the canary
question, OpenAPI, playground), waiting up to SMOKE_WAIT_SECONDS (default 1800) for the first
isolation; SMOKE_WAIT_SECONDS=0 skips it. azd exports the Bicep outputs as environment variables;
run it by hand with the same variables (``azd env get-values``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

if sys.version_info < (3, 9):  # noqa: UP036 - the one line a too-old python3 gets instead of a traceback
    sys.exit(f"error: the postdeploy hook needs Python 3.9 or newer, this is {sys.version.split()[0]}: set PYTHON to a newer one")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/azure_cli.py, even under python -I or -P
from azure_cli import cannot_succeed, last_line, propagating, subscription_args

ROOT = Path(__file__).resolve().parents[1]


def refresh_message(reason: str = "postdeploy") -> str:
    """The queue message the app's refresh worker reads (shared's ``RefreshRequest``), base64."""
    body = {
        "revision": None,
        "explicit": False,
        "reason": reason,
        "requested_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 - its UTC alias is Python 3.11+
        "repair": False,
        "build_artifacts": False,
        "unpin": False,
    }
    return base64.b64encode(json.dumps(body).encode()).decode("ascii")


def account_name(queue_endpoint: str) -> str:
    """``https://ACCOUNT.queue.core.windows.net/`` -> ``ACCOUNT``."""
    host = urllib.parse.urlsplit(queue_endpoint).hostname or ""
    if ".queue." not in host:
        raise SystemExit(f"error: AZURE_STORAGE_QUEUE_ENDPOINT is not a queue endpoint: {queue_endpoint!r}")
    return host.split(".", 1)[0]


def later(app: str) -> str:
    group = os.environ.get("AZURE_RESOURCE_GROUP") or "<rg>"
    name = os.environ.get("AZURE_FUNCTION_APP_NAME") or "<app>"
    subscription = " ".join(subscription_args()) or "--subscription <subscription>"
    return (
        "Queue the first refresh later: run this hook again (azd hooks run postdeploy), or\n"
        f'  curl -X POST "{app}/api/model/refresh?code=$(az functionapp function keys list -g {group} -n {name} {subscription} '
        '--function-name model_refresh --query default -o tsv)"'
    )


def enqueue(app: str) -> bool:
    endpoint = os.environ.get("AZURE_STORAGE_QUEUE_ENDPOINT", "").strip()
    queue = os.environ.get("MODEL_REFRESH_QUEUE", "").strip() or "model-refresh"
    if not endpoint:
        print("error: AZURE_STORAGE_QUEUE_ENDPOINT is not set: run through azd (azd env get-values) or set it", file=sys.stderr)
        return False
    az = shutil.which("az")
    if az is None:
        print("error: the Azure CLI (az) is not installed: it queues the first refresh with your identity.", file=sys.stderr)
        print(later(app), file=sys.stderr)
        return False
    attempts = int(os.environ.get("POSTDEPLOY_ATTEMPTS", "10"))
    pause = float(os.environ.get("POSTDEPLOY_RETRY_SECONDS", "30"))
    command = [
        az, "storage", "message", "put", "--auth-mode", "login", "--account-name", account_name(endpoint),
        "--queue-name", queue, "--content", refresh_message(), *subscription_args(), "--output", "none",
    ]  # fmt: skip
    print(f"Queueing the first model refresh on {queue} ({endpoint}) with your Azure CLI identity", flush=True)
    for attempt in range(1, attempts + 1):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            print("Queued: the app copies the model from the Hub, answers its canary, then serves it (minutes for bert-large).")
            return True
        reason = last_line(done.stderr)
        advice = cannot_succeed(done.stderr)
        if advice is not None or not propagating(done.stderr) or attempt == attempts:
            print(f"error: could not queue the refresh: {reason}", file=sys.stderr)
            if advice is not None:
                print(f"  {advice}", file=sys.stderr)
            print(later(app), file=sys.stderr)
            return False
        print(
            f"Not yet allowed ({reason[:200]}); role assignments take minutes to apply, retrying in {pause:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(pause)
    return False


def main() -> int:
    app = os.environ.get("SERVICE_API_URI", "").strip().rstrip("/") or "https://<app>.azurewebsites.net"
    queued = enqueue(app)
    wait = float(os.environ.get("SMOKE_WAIT_SECONDS", "1800"))
    smoked = 0
    if wait > 0 and app.startswith("http") and "<app>" not in app:
        print(f"\nSmoke check (python scripts/smoke; up to {wait:.0f} s for the first isolation, Ctrl-C to stop waiting):", flush=True)
        smoke = [sys.executable, str(ROOT / "scripts" / "smoke"), "--url", app, "--wait", str(wait)]
        smoked = subprocess.run(smoke, check=False).returncode
    print(
        "\nLogs and charts: Application Insights "
        f"{os.environ.get('APPLICATIONINSIGHTS_NAME', '')} > Workbooks > 'Isolated QA operations' (docs/operations.md)."
    )
    return 0 if queued and smoked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
