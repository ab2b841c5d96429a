"""The JSON bodies of the HTTP routes that serving makes, one frozen dataclass each (:mod:`shared.wire`).

The OpenAPI document (:mod:`.openapi`) publishes the schemas made from these classes, the request
validator (:mod:`.validation`) runs those of the requests, and the handlers send :func:`to_json`
of an instance: one definition per shape. Shapes made in a lower layer live there: a question and
its answer in ``engine/question_answering.py`` (``QAItem``, ``Answer``), what an instance loaded in
``loading/versions.py``, the error body in ``errors.py``, the refresh body in ``store/refresh_queue.py``,
the limits in ``settings.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Literal

from ..engine.question_answering import Answer, QAItem
from ..loading.versions import Loaded
from ..settings import ARTIFACT_VARIANTS, BACKENDS, MAX_TOP_K
from ..store.model_files import Pointer
from ..store.status import StoreStatus
from ..wire import Param, wire_field

HealthState = Literal["ready", "loading", "empty", "error"]


# --- /api/ask ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AskBatch:
    """Several questions in one request (``{"items": [...]}``)."""

    items: tuple[QAItem, ...] = wire_field(schema={"minItems": 1, "maxItems": Param("max_items")})


@dataclass(frozen=True)
class Served:
    """Which model answered, on every answer of ``/api/ask``."""

    model_id: str = wire_field()
    revision: str = wire_field("the stored version that answered")
    backend: str = wire_field(schema={"enum": list(BACKENDS)})
    variant: str = wire_field(schema={"enum": list(ARTIFACT_VARIANTS)})


@dataclass(frozen=True)
class Answers:
    """The answers of one item that asked for more than one (``top_k`` above 1)."""

    answers: tuple[Answer, ...] = wire_field("best first", schema={"maxItems": MAX_TOP_K})


@dataclass(frozen=True)
class AskAnswer(Served, Answer):
    """The answer to one item with ``top_k`` 1: its fields and the model's, in one object."""

    wire_description: ClassVar[str] = "one item with top_k 1"


@dataclass(frozen=True)
class AskAnswers(Served, Answers):
    """The answers to one item with ``top_k`` above 1, and the model's fields."""

    wire_description: ClassVar[str] = "one item with top_k above 1"


@dataclass(frozen=True)
class Results:
    """One result per item of a batch, in order."""

    results: tuple[Answer | Answers, ...] = wire_field("one per item, in order", schema={"maxItems": Param("max_items")})


@dataclass(frozen=True)
class AskResults(Served, Results):
    """The answers to a batch, and the model's fields."""

    wire_description: ClassVar[str] = "a batch (`items`)"


def item_result(answers: list[Answer], top_k: int) -> Answer | Answers:
    """One item's answers as ``/api/ask`` gives them: the answer itself for ``top_k`` 1, else the list."""
    return answers[0] if top_k == 1 and len(answers) == 1 else Answers(tuple(answers))


def ask_response(results: list[list[Answer]], items: list[QAItem], served: Served, *, batch: bool) -> AskAnswer | AskAnswers | AskResults:
    """The 200 of ``/api/ask``: each item's answers (:func:`item_result`) with the model that gave them."""
    model = asdict(served)
    if batch:
        return AskResults(results=tuple(item_result(a, item.top_k) for a, item in zip(results, items, strict=True)), **model)
    single = item_result(results[0], items[0].top_k)
    if isinstance(single, Answers):
        return AskAnswers(answers=single.answers, **model)
    return AskAnswer(**asdict(single), **model)


# --- health and the operator routes ---------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """``GET /api/health``: the state as fixed codes (no reasons, no settings), and what is loaded."""

    state: HealthState = wire_field()
    degraded: bool = wire_field("serving, but not what was asked for (an earlier version, a fallback)")
    model_id: str | None = wire_field(default=None, omit_none=True)
    revision: str | None = wire_field(default=None, omit_none=True)
    load_seconds: float | None = wire_field(default=None, omit_none=True, schema={"minimum": 0})
    backend: str | None = wire_field(default=None, omit_none=True, schema={"enum": list(BACKENDS)})
    variant: str | None = wire_field(default=None, omit_none=True, schema={"enum": list(ARTIFACT_VARIANTS)})


@dataclass(frozen=True)
class RollbackBody:
    """The body of ``POST /api/model/rollback`` (the document's ``RollbackRequest``)."""

    wire_description: ClassVar[str] = "`{{}}` or an empty body rolls back to the previous version; at most {max_operator_body_bytes} bytes"

    to: str | None = wire_field("a stored revision", default=None, optional=True)


@dataclass(frozen=True)
class RefreshQueued:
    """``POST /api/model/refresh``'s 202: the refresh is on the queue; the worker does the work."""

    status: Literal["queued"] = wire_field()
    message_id: str = wire_field("the queue message's id")
    queue: str = wire_field("MODEL_REFRESH_QUEUE")
    revision: str | None = wire_field("the revision asked for; null: MODEL_REVISION")
    moves_pinned_pointer: bool = wire_field("true when the refresh may move a pinned pointer (it names a revision, or unpin)")
    repair: bool = wire_field()
    build_artifacts: bool = wire_field()
    result: str = wire_field("where the outcome shows")


@dataclass(frozen=True)
class RollbackResult:
    """The pointer after a rollback (``POST /api/model/rollback`` and ``python -m shared rollback``)."""

    revision: str = wire_field("the version now current")
    previous: tuple[str, ...] = wire_field("the versions before it, newest first")
    pinned: bool = wire_field("a scheduled refresh leaves a pinned pointer alone")

    @classmethod
    def of(cls, pointer: Pointer) -> RollbackResult:
        return cls(revision=pointer.revision, previous=tuple(pointer.previous), pinned=pointer.pinned)


# --- GET /api/model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadProblem:
    """Why what an instance serves is not what was asked for."""

    cause: Literal["pointer", "version", "artifact"] = wire_field(
        "pointer: current.json damaged or missing; version: the current version damaged or gone; artifact: an expected "
        "ONNX artifact damaged, unusable or missing"
    )
    problem: str = wire_field()
    repair: str = wire_field("the command that repairs it")


@dataclass(frozen=True)
class LoadError:
    """The last failed load of an instance."""

    code: str = wire_field()
    message: str = wire_field()
    at: str = wire_field(schema={"format": "date-time"})


@dataclass(frozen=True)
class DamagedVersion:
    """The current version failed verification and is not served; a background check re-hashes it."""

    revision: str = wire_field()
    code: str = wire_field()
    message: str = wire_field()
    repair: str = wire_field()
    at: str = wire_field(schema={"format": "date-time"})
    next_check_at: str | None = wire_field(schema={"format": "date-time"})


@dataclass(frozen=True)
class Fallback:
    """A load tried and refused before what is loaded."""

    revision: str = wire_field()
    backend: str = wire_field(schema={"enum": list(BACKENDS)})
    variant: str = wire_field(schema={"enum": list(ARTIFACT_VARIANTS)})
    code: str = wire_field()
    message: str = wire_field()


@dataclass(frozen=True)
class InstanceStatus:
    """What this instance has loaded, is loading, and its last load error (another instance may differ)."""

    state: HealthState = wire_field()
    degraded: bool = wire_field()
    problems: tuple[LoadProblem, ...] = wire_field("why what is served is not what was asked for (degraded), each with its repair")
    loaded: Loaded | None = wire_field()
    loading: str | None = wire_field('"pending" or the revision being loaded')
    last_error: LoadError | None = wire_field()
    damaged: DamagedVersion | None = wire_field()
    fallbacks: tuple[Fallback, ...] = wire_field("tried and refused before what is loaded")
    last_pointer_check: str | None = wire_field(schema={"format": "date-time"})
    load_mode: Literal["memory", "disk"] | None = wire_field()
    reload: Literal["overlap", "replace"] | None = wire_field()
    poll_seconds: float | None = wire_field(schema={"minimum": 0})
    backend: Literal["onnx", "torch"] | None = wire_field()
    quantize: Literal["none", "int8"] | None = wire_field()


@dataclass(frozen=True)
class ModelStatus(StoreStatus):
    """``GET /api/model``: what is stored (:class:`~shared.store.status.StoreStatus`) and what this instance serves."""

    instance: InstanceStatus = wire_field("this instance (another instance may have loaded something else)")

    @classmethod
    def of(cls, store: StoreStatus, instance: InstanceStatus) -> ModelStatus:
        return cls(**{field.name: getattr(store, field.name) for field in fields(StoreStatus)}, instance=instance)
