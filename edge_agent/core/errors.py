"""The exceptions edge-agent raises, and the stable codes that reach the wire.

    EdgeAgentError
    ├── ConfigError           bad settings; the CLI exits with status 78 (EX_CONFIG)
    ├── JobError              a job that cannot be run; carries a wire `code`
    ├── ModelError            a model file that cannot be used
    │   ├── ModelNotFound
    │   ├── ChecksumMismatch
    │   ├── UnpinnedModel
    │   └── ModelLoadError
    ├── EngineError           inference failed while running a job
    ├── EngineUnavailable     llama.cpp's libraries cannot be loaded on this system
    └── StoreError            the model store or job store failed

Foreign exceptions are translated at the adapter that meets them (`raise ... from`),
so callers only ever catch these.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Machine-readable `error.code` values of wire contract v1 (docs/protocol.md).

    Values are part of the contract: never rename one, only add.
    """

    # rejected: the job never ran
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_ENCODING = "bad_encoding"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    UNKNOWN_KIND = "unknown_kind"
    INVALID_LABELS = "invalid_labels"
    INVALID_SCHEMA = "invalid_schema"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    TEXT_TOO_LONG = "text_too_long"
    INVALID_REPLY_TO = "invalid_reply_to"
    UNKNOWN_PROFILE = "unknown_profile"
    OVERLOADED = "overloaded"
    DUPLICATE_ID = "duplicate_id"
    CONTEXT_TOO_LONG = "context_too_long"
    RETAINED_JOB = "retained_job"
    # the device is drained for maintenance (operation `drain`): send it to the fleet
    DRAINING = "draining"
    # failed: the job ran and could not finish
    CONTEXT_OVERFLOW = "context_overflow"
    INFERENCE_ERROR = "inference_error"
    JOB_CRASHED = "job_crashed"
    INTERNAL_ERROR = "internal_error"
    # the job cost more than any job may (docs/delivery.md, "Fair shares")
    COST_EXCEEDED = "cost_exceeded"
    # the answer was larger than the broker accepts (MQTT 5 Maximum Packet Size)
    REPLY_TOO_LARGE = "reply_too_large"
    # expired / cancelled
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The settings are invalid; the message names the field."""


# A message that reaches the wire is cut to this many characters: messages quote what a
# job sent (a field name, a label, a path), and a job may send 64 KiB of it.
MAX_MESSAGE_CHARS = 300


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked with "…" when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


class JobError(EdgeAgentError):
    """A job that cannot be run as given; `code` goes on the wire (the message cut to
    MAX_MESSAGE_CHARS)."""

    def __init__(self, code: Code, message: str) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message


class ModelError(EdgeAgentError):
    """A model file that cannot be used."""


class ModelNotFound(ModelError):
    """The model file or bundled package is not there."""


class ChecksumMismatch(ModelError):
    """The file's size or sha256 differs from its models.lock entry."""


class UnpinnedModel(ModelError):
    """The models.lock entry has no sha256 and unpinned files are not allowed."""


class ModelLoadError(ModelError):
    """llama.cpp refused to load the file (format, architecture or memory)."""


class EngineError(EdgeAgentError):
    """Inference failed while running a job."""

    def __init__(self, code: Code, message: str) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message


class EngineUnavailable(EdgeAgentError):
    """llama.cpp's shared libraries cannot be loaded (a system library is missing); the CLI
    exits with status 78, since restarting cannot fix it."""


class StoreError(EdgeAgentError):
    """A store (models or jobs) could not read or write."""
