"""The one place that reads app settings: a frozen :class:`Settings` built from the environment.

Every setting of the app is parsed here by a tiny tested parser; a bad value fails early with
the setting's name. Nothing else in the project reads ``os.environ``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from .errors import SettingsError
from .wire import wire_field

DEFAULT_MODEL_ID = "google-bert/bert-large-uncased-whole-word-masking-finetuned-squad"
DEFAULT_CANARY = {
    "question": "What is the capital of France?",
    "context": "Paris is the capital and most populous city of France.",
    "answer": "Paris",
}

KEY_VAULT_REFERENCE = "@Microsoft.KeyVault("
SECRET_SETTINGS = ("HF_TOKEN",)  # refused when used, not when read: serving needs no Hub token

_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CONTAINER_RE = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_QUEUE_RE = _CONTAINER_RE


def unresolved_reference(name: str) -> SettingsError:
    """The error for a setting that still holds a Key Vault reference: App Service puts the
    reference itself (``@Microsoft.KeyVault(...)``) in the setting when it cannot resolve it."""
    return SettingsError(
        f"{name} holds an unresolved Key Vault reference (@Microsoft.KeyVault(...)), not a value: the platform could not "
        "read the secret. Check the identity (the app's keyVaultReferenceIdentity exists and is the one with the role), "
        "the role (Key Vault Secrets User on the vault; a new assignment takes minutes to apply), the secret's name, and "
        "the network (the vault must accept the app's requests); then restart the app so the reference is resolved again "
        "(docs/operations.md, When something is wrong)"
    )


def is_unresolved_reference(raw: str | None) -> bool:
    return raw is not None and raw.strip().startswith(KEY_VAULT_REFERENCE)


class _ResolvedEnv(Mapping[str, str]):
    """The environment as the settings read it: a value that is still a Key Vault reference is
    refused with the setting's name (never used as a connection string, a name or a token)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __getitem__(self, key: str) -> str:
        return self._check(key, self._env[key])

    def get(self, key: str, default: Any = None) -> Any:
        return self._check(key, self._env.get(key, default))

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)

    @staticmethod
    def _check(key: str, value: str | None) -> Any:
        if key not in SECRET_SETTINGS and is_unresolved_reference(value):
            raise unresolved_reference(key)
        return value


def parse_int(name: str, raw: str | None, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Parse an integer setting, or return ``default`` when it is unset or blank."""
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
    return value


def parse_float(name: str, raw: str | None, default: float, *, minimum: float = 0.0) -> float:
    """Parse a number setting, or return ``default`` when it is unset or blank."""
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...], default: str) -> str:
    """Parse a setting that takes one of a few words (case-insensitive)."""
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def parse_batch_windows(name: str, raw: str | None) -> int | Literal["auto"]:
    """Parse ``QA_BATCH_WINDOWS``: ``auto`` (the default: runs sized for this CPU by the engine)
    or a fixed number of windows per run, at least 1."""
    if raw is None or raw.strip().lower() in ("", "auto"):
        return "auto"
    try:
        return parse_int(name, raw, 1)
    except SettingsError:
        raise SettingsError(f"{name} must be auto or a whole number of at least 1, got {raw!r}") from None


def parse_model_id(name: str, raw: str | None, default: str) -> str:
    """Parse a Hub model id (``owner/name`` or ``name``); it becomes a blob path prefix."""
    value = default if raw is None or raw.strip() == "" else raw.strip()
    if not _MODEL_ID_RE.match(value) or ".." in value:
        raise SettingsError(f"{name} must look like 'owner/name' (letters, digits, . _ -), got {value!r}")
    return value


def parse_name(name: str, raw: str | None, default: str, pattern: re.Pattern[str], what: str) -> str:
    """Parse a container or queue name against Azure's naming rules."""
    value = default if raw is None or raw.strip() == "" else raw.strip()
    if not pattern.match(value):
        raise SettingsError(f"{name} must be a valid {what} name (3-63 lower-case letters, digits, -), got {value!r}")
    return value


def parse_container(name: str, raw: str | None, default: str) -> str:
    """Parse a Blob container name (``MODEL_CONTAINER``, a command's ``--container``)."""
    return parse_name(name, raw, default, _CONTAINER_RE, "container")


ARTIFACT_VARIANTS = ("fp32", "int8")  # the ONNX artifact variants: the one list of them
BACKENDS = ("onnx", "torch")  # what runs a model (QA_BACKEND): ONNX Runtime, else torch


def variant_for(quantize: str) -> str:
    """The variant a ``QA_QUANTIZE`` value serves: ``int8`` for ``int8``, else ``fp32``."""
    return "int8" if quantize == "int8" else "fp32"


def parse_artifacts(name: str, raw: str | None) -> tuple[str, ...]:
    """Parse ``MODEL_ARTIFACTS``: a comma list of ONNX variants to build (``fp32,int8``), or ``none``."""
    if raw is None or raw.strip() == "":
        return ARTIFACT_VARIANTS
    words = [w.strip().lower() for w in raw.split(",") if w.strip()]
    if words == ["none"]:
        return ()
    unknown = [w for w in words if w not in ARTIFACT_VARIANTS]
    if unknown or not words:
        raise SettingsError(f"{name} must be a comma list of {', '.join(ARTIFACT_VARIANTS)}, or none; got {raw!r}")
    return tuple(v for v in ARTIFACT_VARIANTS if v in words)


@dataclass(frozen=True)
class Canary:
    """The question a staged version must answer before it is published."""

    question: str
    context: str
    answer: str | None = None

    def expected_answer(self, model_id: str) -> str | None:
        """The answer to insist on: the default canary's only for the default model (other
        models must merely answer it), a configured canary's always."""
        if self == Canary(**DEFAULT_CANARY) and model_id != DEFAULT_MODEL_ID:
            return None
        return self.answer


def parse_canary(name: str, raw: str | None) -> Canary:
    """Parse ``MODEL_CANARY``: JSON with ``question``, ``context`` and optionally ``answer``."""
    if raw is None or raw.strip() == "":
        return Canary(**DEFAULT_CANARY)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise SettingsError(f"{name} must be JSON like {json.dumps(DEFAULT_CANARY)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("question"), str) or not isinstance(data.get("context"), str):
        raise SettingsError(f"{name} must be a JSON object with string 'question' and 'context'")
    answer = data.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise SettingsError(f"{name}: 'answer' must be a string when given")
    if not data["question"].strip() or not data["context"].strip():
        raise SettingsError(f"{name}: 'question' and 'context' must not be empty")
    return Canary(question=data["question"], context=data["context"], answer=answer)


# bounds of a question's options: fixed, not settings
MIN_TOP_K = 1
MAX_TOP_K = 20
MIN_ANSWER_LEN = 1
MAX_ANSWER_LEN = 512
OPERATOR_BODY_MAX_BYTES = 4096  # bytes of a refresh or rollback body


def _limit(default: int, setting: str, description: str) -> Any:
    return wire_field(f"{description} ({setting})", default=default, metadata={"setting": setting})


@dataclass(frozen=True)
class Limits:
    """What one request may ask, declared once: :meth:`Settings.from_env` reads the five settings
    (their defaults are here), the request validator (``shared/serving/validation.py``) and the
    engine (tokens, windows) enforce them, and the OpenAPI document states them (``info.x-limits``
    and the bounds of its request schemas). Over a size limit is a 413 that names the setting."""

    wire_description: ClassVar[str] = "The limits of this deployment (its settings in parentheses)"

    max_context_chars: int = _limit(25_000, "QA_MAX_CONTEXT_CHARS", "characters of one context")
    max_question_chars: int = _limit(1_000, "QA_MAX_QUESTION_CHARS", "characters of one question")
    max_question_tokens: int = _limit(64, "QA_MAX_QUESTION_TOKENS", "tokens of one question")
    max_items: int = _limit(32, "QA_MAX_ITEMS", "items of one request")
    max_windows: int = _limit(48, "QA_MAX_WINDOWS", "windows of the model's sequence length over all the items of one request")
    max_top_k: int = wire_field("answers one item may ask for (top_k)", default=MAX_TOP_K, init=False)
    max_answer_len: int = wire_field("tokens of one answer (max_answer_len)", default=MAX_ANSWER_LEN, init=False)
    max_ask_body_bytes: int = wire_field("bytes of an /api/ask body (from the limits above)", default=0, init=False)
    max_operator_body_bytes: int = wire_field("bytes of a refresh or rollback body", default=OPERATOR_BODY_MAX_BYTES, init=False)

    def __post_init__(self) -> None:
        # a JSON string may spend 6 bytes on one character (\uXXXX)
        body = self.max_items * (self.max_context_chars + self.max_question_chars) * 6 + 64 * 1024
        object.__setattr__(self, "max_ask_body_bytes", body)

    @classmethod
    def setting(cls, name: str) -> str | None:
        """The setting of limit ``name`` (``QA_MAX_CONTEXT_CHARS``); ``None`` for a fixed one."""
        found = {f.name: f.metadata.get("setting") for f in fields(cls)}
        return found.get(name)

    def says(self, name: str) -> str:
        """Limit ``name`` as a message gives it: ``300 (QA_MAX_CONTEXT_CHARS)``."""
        setting = self.setting(name)
        value = getattr(self, name)
        return f"{value} ({setting})" if setting else str(value)


def parse_limits(env: Mapping[str, str]) -> Limits:
    """The request limits: each setting of :class:`Limits` (a whole number of at least 1), or its default."""
    values = {}
    for limit in fields(Limits):
        setting, default = limit.metadata.get("setting"), limit.default
        if setting and isinstance(default, int):
            values[limit.name] = parse_int(setting, env.get(setting), default)
    return Limits(**values)


@dataclass(frozen=True)
class StorageConnection:
    """How to reach Blob (and Queue) Storage: a connection string, or service URIs + identity."""

    setting: str
    connection_string: str | None = None
    blob_service_uri: str | None = None
    queue_service_uri: str | None = None
    client_id: str | None = None

    def __repr__(self) -> str:  # never print the account key
        how = "connection string" if self.connection_string else f"identity at {self.blob_service_uri}"
        return f"StorageConnection({self.setting}: {how})"


def check_account_key(setting: str, connection_string: str) -> str:
    """``connection_string`` if its ``AccountKey`` (when it has one) decodes as base64; a key that
    does not (truncated or mangled when copied) is named here, before any request is signed with it."""
    import base64
    import binascii

    for part in connection_string.split(";"):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "accountkey":
            try:
                base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise SettingsError(
                    f"{setting}: AccountKey is not valid base64 ({len(value.strip())} characters; an account key has 88, "
                    "ending in ==): copy it again, whole, from the storage account's Access keys"
                ) from None
    return connection_string


def parse_storage(env: Mapping[str, str]) -> StorageConnection | None:
    """Find the model storage: ``MODEL_STORAGE`` (a connection string, or ``__blobServiceUri`` for
    managed identity), else ``AzureWebJobsStorage`` (string, ``__blobServiceUri`` or
    ``__accountName``). ``None`` when neither is set."""
    for prefix in ("MODEL_STORAGE", "AzureWebJobsStorage"):
        conn = env.get(prefix, "").strip()
        if conn:
            return StorageConnection(setting=prefix, connection_string=check_account_key(prefix, conn))
        uri = env.get(f"{prefix}__blobServiceUri", "").strip()
        account = env.get(f"{prefix}__accountName", "").strip() if prefix == "AzureWebJobsStorage" else ""
        if not uri and account:
            uri = f"https://{account}.blob.core.windows.net"
        if uri:
            if not uri.startswith(("https://", "http://")):
                raise SettingsError(f"{prefix}__blobServiceUri must be a URL like https://ACCOUNT.blob.core.windows.net")
            return StorageConnection(setting=prefix, blob_service_uri=uri, client_id=env.get(f"{prefix}__clientId", "").strip() or None)
    return None


def parse_connection_string(name: str, raw: str | None) -> StorageConnection | None:
    """A storage connection string setting (``AZURE_STORAGE_CONNECTION_STRING``), or ``None`` when unset."""
    value = (raw or "").strip()
    return StorageConnection(setting=name, connection_string=check_account_key(name, value)) if value else None


def parse_queue_storage(env: Mapping[str, str]) -> StorageConnection | None:
    """The refresh queue's account: ``AzureWebJobsStorage``, as the queue trigger binds to it
    (a connection string, ``__queueServiceUri``, or ``__accountName``)."""
    prefix = "AzureWebJobsStorage"
    conn = env.get(prefix, "").strip()
    if conn:
        return StorageConnection(setting=prefix, connection_string=check_account_key(prefix, conn))
    uri = env.get(f"{prefix}__queueServiceUri", "").strip()
    account = env.get(f"{prefix}__accountName", "").strip()
    if not uri and account:
        uri = f"https://{account}.queue.core.windows.net"
    if not uri:
        return None
    return StorageConnection(setting=prefix, queue_service_uri=uri, client_id=env.get(f"{prefix}__clientId", "").strip() or None)


@dataclass(frozen=True)
class AppInsights:
    """Where the app's own events go: an Application Insights resource and how to sign in to it.

    ``identity``: ``Authorization=AAD``, a Microsoft Entra token of the managed identity
    (``client_id`` names a user-assigned one; ``None``: the system-assigned one), as the resource
    accepts once its local (key) authentication is off. ``role_name``: the app's name
    (``WEBSITE_SITE_NAME``), the ``cloud_RoleName`` of the exported events, as the host's.
    """

    connection_string: str
    identity: bool = False
    client_id: str | None = None
    role_name: str | None = None

    @property
    def ingestion_endpoint(self) -> str:
        return _semicolon_pairs(self.connection_string).get("ingestionendpoint", "the global endpoint")

    def __repr__(self) -> str:  # the connection string carries the resource's instrumentation key
        how = f"identity {self.client_id or 'system-assigned'}" if self.identity else "instrumentation key"
        return f"AppInsights({self.ingestion_endpoint}, {how})"


def _semicolon_pairs(raw: str) -> dict[str, str]:
    """``A=x;B=y`` -> ``{"a": "x", "b": "y"}`` (names lower-cased, blank parts skipped); a part
    without ``=`` is kept under ``""`` so that the parsers can refuse it."""
    pairs = {}
    for part in raw.split(";"):
        if part.strip():
            name, sep, value = part.partition("=")
            pairs[name.strip().lower() if sep else ""] = value.strip()
    return pairs


def parse_app_insights_connection(name: str, raw: str | None) -> str | None:
    """Parse ``APPLICATIONINSIGHTS_CONNECTION_STRING``: ``InstrumentationKey=...;IngestionEndpoint=...``
    as the resource's Overview shows it; ``None`` when unset (no telemetry is exported)."""
    if raw is None or raw.strip() == "":
        return None
    pairs = _semicolon_pairs(raw)
    if "" in pairs or not pairs.get("instrumentationkey"):
        raise SettingsError(
            f"{name} must be the resource's connection string, InstrumentationKey=...;IngestionEndpoint=https://... "
            "(Application Insights > Overview > Connection String)"
        )
    endpoint = pairs.get("ingestionendpoint")
    if endpoint is not None and not endpoint.startswith(("https://", "http://")):
        raise SettingsError(f"{name}: IngestionEndpoint must be a URL like https://REGION.in.applicationinsights.azure.com/")
    return raw.strip()


def parse_app_insights_authentication(name: str, raw: str | None) -> tuple[bool, str | None]:
    """Parse ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` as the platform defines it:
    ``Authorization=AAD`` (the system-assigned identity) or ``Authorization=AAD;ClientId=ID`` (a
    user-assigned one), parts in any order. Returns ``(identity, client_id)``; ``(False, None)``
    when unset (the instrumentation key alone, which a resource with local auth off refuses)."""
    if raw is None or raw.strip() == "":
        return False, None
    pairs = _semicolon_pairs(raw)
    unknown = sorted(set(pairs) - {"authorization", "clientid"})
    if unknown or pairs.get("authorization", "").lower() != "aad" or ("clientid" in pairs and not pairs["clientid"]):
        raise SettingsError(f"{name} must be Authorization=AAD or Authorization=AAD;ClientId=<the identity's client id>, got {raw!r}")
    return True, pairs.get("clientid")


def app_insights_from_env(env: Mapping[str, str] | None = None) -> AppInsights | None:
    """The telemetry target from ``env`` (default: the process environment), or ``None`` when
    ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is unset: local runs and tests export nothing.

    Read apart from :class:`Settings` because telemetry starts when the app is imported, before
    the app's settings are read (on first use), and a bad model setting must still be reported.

    Raises:
        SettingsError: a telemetry setting has a bad value; the message names it.
    """
    env = _ResolvedEnv(os.environ if env is None else env)
    connection = parse_app_insights_connection("APPLICATIONINSIGHTS_CONNECTION_STRING", env.get("APPLICATIONINSIGHTS_CONNECTION_STRING"))
    if connection is None:
        return None
    identity, client_id = parse_app_insights_authentication(
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", env.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")
    )
    role = env.get("WEBSITE_SITE_NAME", "").strip() or None
    return AppInsights(connection_string=connection, identity=identity, client_id=client_id, role_name=role)


LoadMode = Literal["memory", "disk"]
LOAD_MODES: tuple[LoadMode, ...] = ("memory", "disk")
ReloadMode = Literal["overlap", "replace"]


@dataclass(frozen=True)
class Settings:
    """Every setting of the app, parsed once. Build with :meth:`from_env`."""

    storage: StorageConnection | None = field(repr=True, default=None)
    queue_storage: StorageConnection | None = None
    container: str = "models"
    model_id: str = DEFAULT_MODEL_ID
    model_revision: str = "main"
    refresh_schedule: str | None = None
    keep_versions: int = 3
    load_mode: LoadMode = "memory"
    cache_dir: str | None = None
    poll_seconds: float = 60.0
    reload: ReloadMode = "replace"
    canary: Canary | None = field(default_factory=lambda: Canary(**DEFAULT_CANARY))
    quantize: str = "none"
    backend: str = "onnx"
    artifacts: tuple[str, ...] = ARTIFACT_VARIANTS
    threads: int | None = None
    memory_mb: int | None = None
    limits: Limits = field(default_factory=Limits)
    batch_windows: int | Literal["auto"] = "auto"
    max_concurrent: int = 2
    deadline_seconds: float = 60.0
    refresh_queue: str = "model-refresh"
    hf_token_setting: str | None = field(default=None, repr=False)  # HF_TOKEN as read; use hf_token
    hf_endpoint: str | None = None
    transfer_concurrency: int = 4
    block_size: int = 8 * 1024 * 1024
    # the account ``adopt`` reads a container from, as the scripts that uploaded it did
    # (AZURE_STORAGE_CONNECTION_STRING); the app itself never uses it
    adopt_storage: StorageConnection | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``env`` (default: the process environment).

        Raises:
            SettingsError: a setting has a bad value; the message names it.
        """
        raw = os.environ if env is None else env
        env = _ResolvedEnv(raw)
        load_mode = parse_choice("MODEL_LOAD_MODE", env.get("MODEL_LOAD_MODE"), LOAD_MODES, "memory")
        cache_dir = env.get("MODEL_CACHE_DIR", "").strip() or None
        if load_mode == "disk" and cache_dir is None:
            raise SettingsError("MODEL_CACHE_DIR must be set when MODEL_LOAD_MODE=disk (a folder on local disk)")
        default_reload = "replace" if load_mode == "memory" else "overlap"
        return cls(
            storage=parse_storage(env),
            queue_storage=parse_queue_storage(env),
            container=parse_container("MODEL_CONTAINER", env.get("MODEL_CONTAINER"), "models"),
            model_id=parse_model_id("MODEL_ID", env.get("MODEL_ID"), DEFAULT_MODEL_ID),
            model_revision=(env.get("MODEL_REVISION", "").strip() or "main"),
            refresh_schedule=env.get("MODEL_REFRESH_SCHEDULE", "").strip() or None,
            keep_versions=parse_int("MODEL_KEEP_VERSIONS", env.get("MODEL_KEEP_VERSIONS"), 3, minimum=2),
            load_mode=load_mode,  # type: ignore[arg-type]
            cache_dir=cache_dir,
            poll_seconds=parse_float("MODEL_POLL_SECONDS", env.get("MODEL_POLL_SECONDS"), 60.0, minimum=0.0),
            reload=parse_choice("MODEL_RELOAD", env.get("MODEL_RELOAD"), ("overlap", "replace"), default_reload),  # type: ignore[arg-type]
            canary=parse_canary("MODEL_CANARY", env.get("MODEL_CANARY")),
            quantize=parse_choice("QA_QUANTIZE", env.get("QA_QUANTIZE"), ("none", "int8"), "none"),
            backend=parse_choice("QA_BACKEND", env.get("QA_BACKEND"), BACKENDS, "onnx"),
            artifacts=parse_artifacts("MODEL_ARTIFACTS", env.get("MODEL_ARTIFACTS")),
            threads=parse_int("QA_THREADS", env.get("QA_THREADS"), 0, maximum=256) or None,
            memory_mb=parse_int("QA_MEMORY_MB", env.get("QA_MEMORY_MB"), 0, minimum=0, maximum=1 << 20) or None,
            limits=parse_limits(env),
            batch_windows=parse_batch_windows("QA_BATCH_WINDOWS", env.get("QA_BATCH_WINDOWS")),
            max_concurrent=parse_int("QA_MAX_CONCURRENT", env.get("QA_MAX_CONCURRENT"), 2),
            deadline_seconds=parse_float("QA_DEADLINE_SECONDS", env.get("QA_DEADLINE_SECONDS"), 60.0, minimum=1.0),
            refresh_queue=parse_name("MODEL_REFRESH_QUEUE", env.get("MODEL_REFRESH_QUEUE"), "model-refresh", _QUEUE_RE, "queue"),
            hf_token_setting=raw.get("HF_TOKEN", "").strip() or None,
            hf_endpoint=(env.get("HF_ENDPOINT", "").strip().rstrip("/") or None),
            transfer_concurrency=parse_int("MODEL_TRANSFER_CONCURRENCY", env.get("MODEL_TRANSFER_CONCURRENCY"), 4, maximum=32),
            block_size=parse_int("MODEL_BLOCK_SIZE_MB", env.get("MODEL_BLOCK_SIZE_MB"), 8, maximum=100) * 1024 * 1024,
            adopt_storage=parse_connection_string("AZURE_STORAGE_CONNECTION_STRING", env.get("AZURE_STORAGE_CONNECTION_STRING")),
        )

    @property
    def variant(self) -> str:
        """The ONNX artifact variant (and torch precision) these settings serve (:func:`variant_for`)."""
        return variant_for(self.quantize)

    @property
    def hf_token(self) -> str | None:
        """The Hub token, or ``None``. Raises :class:`SettingsError` naming HF_TOKEN when it is
        still an unresolved Key Vault reference: it is never sent to the Hub as a token. Only
        the Hub download reads it, so serving an isolated model goes on meanwhile."""
        if is_unresolved_reference(self.hf_token_setting):
            raise unresolved_reference("HF_TOKEN")
        return self.hf_token_setting

    def require_queue_storage(self) -> StorageConnection:
        """The refresh queue's account, or a :class:`SettingsError` that says what to set."""
        if self.queue_storage is None:
            raise SettingsError(
                "No queue storage configured: set AzureWebJobsStorage (UseDevelopmentStorage=true for Azurite), "
                "or AzureWebJobsStorage__queueServiceUri / __accountName for managed identity"
            )
        return self.queue_storage

    def require_storage(self) -> StorageConnection:
        """The storage connection, or a :class:`SettingsError` that says what to set."""
        if self.storage is None:
            raise SettingsError(
                "No storage configured: set MODEL_STORAGE to a connection string "
                "(UseDevelopmentStorage=true for Azurite) or MODEL_STORAGE__blobServiceUri for managed identity"
            )
        return self.storage
