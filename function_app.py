"""Triggers of the isolated question-answering app: every route, schedule and auth level at a glance.

Each body parses the request, calls ``shared``, and shapes the response; the work lives in
``shared/``. Importing this module is cheap and touches no network: settings are read, storage is
reached and the model is loaded on first use, by the module-level ``holder``. With
``APPLICATIONINSIGHTS_CONNECTION_STRING`` set (in Azure), the app's log records go to Application
Insights from every thread (``shared.telemetry.export``); without it, nothing leaves the machine.
"""

from __future__ import annotations

import json

import azure.functions as func

from shared.loading.onnx_artifacts import load_artifact
from shared.refresh import worker
from shared.serving import api
from shared.serving import playground as playground_files
from shared.serving.holder import ModelHolder
from shared.settings import app_insights_from_env
from shared.store import refresh_queue
from shared.telemetry.export import export_app_logs

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

# Events of every thread (the model load's too: the host drops a record logged outside an
# invocation) to Application Insights, once; a no-op without a connection string.
events_export = export_app_logs(app_insights_from_env)

# One per worker process (one process: Flex's default; FUNCTIONS_WORKER_PROCESS_COUNT=1 on Premium): lazily loaded, hot-reloaded.
# QA_BACKEND=onnx (default) serves a version's ONNX artifact when it has a usable one, else torch.
holder = ModelHolder(artifact_loader=load_artifact)


def _http(response: api.ApiResponse | playground_files.FileResponse) -> func.HttpResponse:
    if isinstance(response, playground_files.FileResponse):
        return func.HttpResponse(
            response.body, status_code=response.status, headers=response.headers, mimetype=response.media_type, charset="utf-8"
        )
    return func.HttpResponse(
        json.dumps(response.body, ensure_ascii=False),
        status_code=response.status,
        headers=response.headers,
        mimetype="application/json",
        charset="utf-8",
    )


@app.function_name("ask")
@app.route(route="ask", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def ask(req: func.HttpRequest) -> func.HttpResponse:
    """Answer ``{question, context, ...}`` or ``{"items": [...]}`` from the current model version."""
    return _http(api.ask_request(holder, req.get_body()))


@app.function_name("health")
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    """200 when a model is loaded, 503 with a fixed state code otherwise; ``?warm=1`` starts a load."""
    return _http(api.guarded(lambda: api.health(holder, params=req.params)))


@app.function_name("model")
@app.route(route="model", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def model(req: func.HttpRequest) -> func.HttpResponse:
    """Pointer, stored versions, last refresh, and what this instance loaded (operators)."""
    return _http(api.guarded(lambda: api.model_status(holder)))


@app.function_name("model_refresh")
@app.route(route="model/refresh", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def model_refresh(req: func.HttpRequest) -> func.HttpResponse:
    """Queue a refresh from the Hub (``{"revision"?, "unpin"?}``); 202, the worker does the work.

    Give operators this function's own key (not the master key)."""
    return _http(api.guarded(lambda: api.request_refresh(holder, req.get_body())))


@app.function_name("model_rollback")
@app.route(route="model/rollback", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def model_rollback(req: func.HttpRequest) -> func.HttpResponse:
    """Point ``current.json`` back at ``{"to"?: revision}`` (default: the previous version) and pin it."""
    return _http(api.guarded(lambda: api.rollback(holder, req.get_body())))


@app.function_name("openapi")
@app.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi(req: func.HttpRequest) -> func.HttpResponse:
    """The OpenAPI 3.1 document of these routes; ``?version=3.0`` gives 3.0.3 for API Management."""
    return _http(api.guarded(lambda: api.openapi_document(holder, params=req.params, url=req.url)))


@app.function_name("playground")
@app.route(route="playground", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def playground(req: func.HttpRequest) -> func.HttpResponse:
    """A page to try ``/api/ask`` in a browser (it asks for a function key; the page itself is public)."""
    return _http(api.guarded(lambda: playground_files.playground_page(req.url)))


@app.function_name("playground_file")
@app.route(route="playground/{file}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def playground_file(req: func.HttpRequest) -> func.HttpResponse:
    """The playground's allow-listed style sheet, script and icon."""
    return _http(api.guarded(lambda: playground_files.playground_file(req.route_params.get("file", ""))))


@app.function_name("refresh_schedule")
@app.timer_trigger(arg_name="timer", schedule="%MODEL_REFRESH_SCHEDULE%", run_on_startup=False, use_monitor=True)
def refresh_schedule(timer: func.TimerRequest) -> None:
    """Queue the scheduled refresh; a pinned pointer (after a rollback) is left alone."""
    refresh_queue.enqueue(holder.settings, refresh_queue.RefreshRequest(reason="schedule"))


@app.function_name("refresh_worker")
@app.queue_trigger(arg_name="msg", queue_name="%MODEL_REFRESH_QUEUE%", connection="AzureWebJobsStorage")
def refresh_worker(msg: func.QueueMessage) -> None:
    """Run one refresh (may take minutes); only transient failures raise, so only they retry."""
    worker.handle_message(holder.settings, msg.get_body())
