"""The model holder's state machine, apart from its threads and its storage, so it can be tested alone.

Phases::

    idle --begin--> loading --loaded--> ready --begin (pointer moved)--> loading ...
                       |  \\--failed--> failed --begin (retry due)--> loading
                       \\--empty--> no_model --begin (retry due)--> loading

A reload keeps ``current`` (``overlap``) or frees it first (``replace``: :meth:`LoadState.release`);
a failed reload keeps whatever is still loaded. Every transition is a method that checks it is
allowed; the holder calls them under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..loading.versions import LoadedModel
from .shapes import HealthState

PHASES = ("idle", "loading", "ready", "failed", "no_model")
PENDING = "pending"  # what is being loaded before the pointer is read


class TransitionError(RuntimeError):
    """A transition that the state machine does not allow (a bug in the caller)."""


@dataclass
class LoadState:
    """What one serving instance has loaded, is loading, and why it is degraded.

    Attributes:
        phase: one of :data:`PHASES`.
        current: the model that answers requests (also while a new version loads in ``overlap``).
        loading: :data:`PENDING` or the revision being loaded, while ``phase`` is ``loading``.
        releasing: a ``replace`` reload is freeing ``current``: no new request gets it.
        failures: consecutive failed loads (the backoff doubles with each).
        retry_at: monotonic time before which no new load starts after a failure.
        last_error: ``{code, message, at}`` of the last failed load (or ``no_model``).
        problems: why the model served is not what was asked for (``degraded``): each
            ``{cause, problem, repair}``.
        fallbacks: what the last load's walk refused before the model it loaded.
        damaged: the current version's verification failure, while an earlier one serves.
        pointer_etag: the ETag of ``current.json`` the last load went by.
        loads: loads started (single flight: one per burst of first requests).
    """

    phase: str = "idle"
    current: LoadedModel | None = None
    loading: str | None = None
    releasing: bool = False
    failures: int = 0
    retry_at: float = 0.0
    last_error: dict[str, str] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    damaged: dict[str, Any] | None = None
    pointer_etag: str | None = None
    loads: int = 0

    # --- reading ------------------------------------------------------------------------------

    @property
    def public_state(self) -> HealthState:
        """``ready``, ``loading``, ``empty`` (nothing loaded, nothing to load) or ``error``."""
        if self.current is not None and not self.releasing:
            return "ready"
        if self.phase == "loading":
            return "loading"
        if self.phase == "failed":
            return "error"
        return "empty"

    @property
    def degraded(self) -> bool:
        """Serving, but not what was asked for (see :attr:`problems`)."""
        return self.current is not None and bool(self.problems)

    def servable(self) -> LoadedModel | None:
        """The model a new request may use now, or ``None``."""
        return None if self.releasing else self.current

    def may_begin(self, now: float) -> bool:
        """Whether a load may start now (none under way, and no failure's backoff pending)."""
        return self.phase != "loading" and now >= self.retry_at

    # --- transitions --------------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """Start a load (from any phase but ``loading``, once a failure's backoff has passed)."""
        if not self.may_begin(now):
            raise TransitionError(f"cannot start a load in phase {self.phase} (retry at {self.retry_at:.1f}, now {now:.1f})")
        self.phase = "loading"
        self.loading = PENDING
        self.loads += 1

    def resolving(self, revision: str) -> None:
        """The pointer was read: ``revision`` is what is being loaded."""
        self._require("loading")
        self.loading = revision

    def release(self) -> LoadedModel | None:
        """``replace`` reload: stop handing out ``current``; returns it for the caller to free once
        the requests using it are done (then :meth:`released`)."""
        self._require("loading")
        if self.current is not None:
            self.releasing = True
        return self.current

    def released(self) -> None:
        """The old model is freed: nothing is loaded until the new one is."""
        self._require("loading")
        self.current = None
        self.releasing = False

    def unchanged(self, *, pointer_etag: str | None, problems: list[dict[str, Any]]) -> None:
        """The pointer was touched but the model to serve is the one loaded: keep it."""
        self._require("loading")
        if self.current is None:
            raise TransitionError("nothing is loaded to keep")
        self.phase, self.loading, self.releasing = "ready", None, False
        self.pointer_etag = pointer_etag
        self.problems = problems

    def loaded(
        self,
        model: LoadedModel,
        *,
        pointer_etag: str | None,
        fallbacks: list[dict[str, Any]],
        problems: list[dict[str, Any]],
        damaged: dict[str, Any] | None,
    ) -> LoadedModel | None:
        """A load succeeded; returns the model it replaces (``None`` if none), for the caller to free."""
        self._require("loading")
        previous = self.current if self.current is not model else None
        self.phase, self.current, self.loading, self.releasing = "ready", model, None, False
        self.failures, self.retry_at, self.last_error = 0, 0.0, None
        self.pointer_etag, self.fallbacks, self.problems, self.damaged = pointer_etag, fallbacks, problems, damaged
        return previous

    def failed(self, code: str, message: str, *, at: str, now: float, backoff: float, max_backoff: float) -> float:
        """A load failed: back off (doubling up to ``max_backoff``); returns the delay. A model still
        loaded (``overlap``) keeps serving."""
        self._require("loading")
        self.failures += 1
        delay = min(max_backoff, backoff * 2 ** (self.failures - 1))
        self.retry_at = now + delay
        self.last_error = {"code": code, "message": message, "at": at}
        self.phase = "ready" if self.current is not None else "failed"
        self.loading, self.releasing = None, False
        return delay

    def empty(self, message: str, *, at: str, now: float, retry_in: float) -> None:
        """No model was ever isolated: nothing to load yet; try again after ``retry_in`` seconds."""
        self._require("loading")
        self.last_error = {"code": "no_model", "message": message, "at": at}
        self.retry_at = now + retry_in
        self.phase = "ready" if self.current is not None else "no_model"
        self.loading, self.releasing = None, False

    def verified_again(self) -> None:
        """The damaged current version verifies again (after a repair): load it at the next chance."""
        self.damaged = None
        self.fallbacks = []
        self.retry_at = 0.0

    def _require(self, phase: str) -> None:
        if self.phase != phase:
            raise TransitionError(f"expected phase {phase}, in {self.phase}")
