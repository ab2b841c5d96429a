"""Triggers of the isolated question-answering app: every route, schedule and auth level at a glance.

Each body parses the request, calls ``shared``, and shapes the response; the work lives in
``shared/``. Nothing heavy happens at import: the model loads on first use.
"""

from __future__ import annotations

import json

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.function_name("health")
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    """Liveness of this instance."""
    return func.HttpResponse(json.dumps({"state": "up"}), status_code=200, mimetype="application/json")
