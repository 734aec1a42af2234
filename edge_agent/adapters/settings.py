"""The agent's settings: one frozen object from defaults, a TOML file, EDGE_AGENT_* variables,
credential files and command-line flags (highest last).

    /etc/edge-agent/config.toml        [mqtt] broker = "mqtts://broker.lan:8883"
    EDGE_AGENT_MQTT__BROKER=...        nested fields use a double underscore
    $CREDENTIALS_DIRECTORY/mqtt__password          systemd LoadCredential=, read as a secrets
    $CREDENTIALS_DIRECTORY/tls_key                 directory: <section>__<field>; tls_key is
                                                   the client key when mqtt.cert_file is set

Every field is described here and in docs/configuration.md; `edge-agent config` prints the
effective values with secrets masked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edge_agent.core.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/edge-agent/config.toml")
_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _topic_segment(value: str) -> str:
    if not _TOPIC_SAFE.fullmatch(value):
        raise ValueError("use 1-64 letters, digits, '_', '-' or '.' (it becomes a topic level)")
    return value


TopicSegment = Annotated[str, AfterValidator(_topic_segment)]


def _default_device_id() -> str:
    name = socket.gethostname().split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:64]
    return cleaned or "edge-device"


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY; otherwise a per-user directory so a
    # developer can run the agent without root.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edge-agent")
    return Path.home() / ".local" / "state" / "edge-agent"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttSettings(_Section):
    """How the agent reaches its broker."""

    broker: str = Field(
        "mqtt://localhost:1883",
        description="Broker URL: mqtt://HOST[:PORT] (default port 1883) or "
        "mqtts://HOST[:PORT] (8883).",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT protocol version. 5 enables shared subscriptions, response topics "
        "and flow control; 3.1.1 is for old brokers.",
    )
    client_id: str | None = Field(
        None,
        max_length=128,
        description="MQTT client id; default `edge-agent-<device_id>`. Must be stable across "
        "restarts so the broker keeps the agent's session.",
    )
    username: str | None = Field(None, description="Username for the broker, if it needs one.")
    password: SecretStr | None = Field(
        None,
        description="Password for the broker. Prefer a credential file (mqtt__password in "
        "$CREDENTIALS_DIRECTORY, systemd's LoadCredential=) to a value in the config file; "
        "an empty value means none.",
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    topic_prefix: TopicSegment = Field(
        "edge", description="First topic level of every topic the agent uses."
    )
    share_group: TopicSegment = Field(
        "edge-agent",
        description="Shared-subscription group for fleet jobs "
        "($share/<group>/<prefix>/jobs/<kind>).",
    )
    session_expiry_s: int = Field(
        3600,
        ge=0,
        le=7 * 24 * 3600,
        description="How long the broker keeps the agent's session (and its queued jobs) "
        "after a disconnect, in seconds.",
    )
    receive_maximum: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Jobs the broker may have in flight to this agent at once (MQTT 5 "
        "Receive Maximum). Jobs are acknowledged only when answered, so this caps what an "
        "agent can hoard from the fleet's shared subscription (Mosquitto 2.0.11 keeps to "
        "it only until the first acknowledgements, then to its own max_inflight_messages: "
        "docs/delivery.md). Unset: 2 x jobs.parallel, "
        "a batch running and the next one waiting (with less, slots stand empty while "
        "acknowledgements make the round trip: bench/throughput.py), at most "
        "jobs.parallel + jobs.max_queue.",
    )
    max_packet_bytes: int = Field(
        131072,
        ge=1024,
        le=268435455,
        description="The largest MQTT packet the agent publishes. An MQTT 5 broker that "
        "states a smaller Maximum Packet Size in CONNACK gets that one; MQTT 3.1.1 cannot "
        "learn it, so set this to the broker's limit (Mosquitto: max_packet_size). A reply "
        "that would not fit is slimmed, or replaced by a `reply_too_large` answer "
        "(docs/protocol.md).",
    )
    ca_file: Path | None = Field(
        None, description="CA certificate (PEM) to verify the broker; turns TLS on."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    tls_insecure: bool = Field(
        False,
        description="Skip the broker hostname check (never the CA check). For test labs only.",
    )
    reconnect_min_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Base of the reconnect backoff: the n-th retry (from 1) waits a random "
        "time between 0 and min(reconnect_max_s, reconnect_min_s x 2^(n-1)) seconds (full "
        "jitter).",
    )
    reconnect_max_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait between reconnect attempts."
    )
    reply_topic_prefixes: tuple[str, ...] = Field(
        (),
        description="If set, a job's reply topic must start with one of these (e.g. "
        "'edge/replies/'); others are answered on the device's results topic instead.",
    )

    @model_validator(mode="before")
    @classmethod
    def _key_from_credentials(cls, data: Any) -> Any:
        """With a client certificate and no key file, use the `tls_key` credential."""
        if isinstance(data, dict) and data.get("cert_file") and not data.get("key_file"):
            key = credential_file("tls_key")
            if key is not None:
                data = {**data, "key_file": key}
        return data

    @field_validator("password")
    @classmethod
    def _empty_password_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _tls_consistent(self) -> MqttSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "mqtt.cert_file and mqtt.key_file go together (the key may also come from "
                "the tls_key credential)"
            )
        if not self.tls and (self.cert_file is not None or self.tls_insecure):
            what = "cert_file" if self.cert_file is not None else "tls_insecure"
            raise ValueError(
                f"mqtt.{what} is set but TLS is off: use an mqtts:// broker URL or set mqtt.ca_file"
            )
        if self.password is not None and self.username is None:
            raise ValueError("mqtt.password is set but mqtt.username is not")
        return self

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if parts.username is not None or parts.password is not None:
            # the URL is logged and shown in status lines: credentials have their own fields
            raise ValueError(
                "must not hold credentials: use mqtt.username and the mqtt__password credential"
            )
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError("has an invalid port") from exc
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or "localhost"

    @property
    def port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts" or self.ca_file is not None


class ModelSettings(_Section):
    """Which model runs and how llama.cpp runs it."""

    name: str | None = Field(
        None,
        description="A models.lock entry name or a path to a .gguf file. Unset: chosen for "
        "this board (edge-agent select), falling back to the bundled SmolLM2-135M.",
    )
    lock_file: Path | None = Field(
        None, description="models.lock to use; default: the one shipped with the agent."
    )
    dir: Path | None = Field(
        None, description="Where downloaded models live; default <state_dir>/models."
    )
    allow_unpinned: bool = Field(
        False, description="Load files whose models.lock entry has no sha256 (not recommended)."
    )
    n_ctx: int | None = Field(
        None,
        ge=256,
        le=131072,
        description="Context size in tokens; default sized from the job limits: "
        "jobs.max_prompt_chars at 3 characters a token, plus the chat template and the "
        "answer, rounded up to 256. A job that does not fit is answered `context_too_long` "
        "before it runs.",
    )
    n_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads for generation; default all cores on boards with 1 or 2, "
        "else cores - 1.",
    )
    n_threads_batch: int | None = Field(
        None, ge=1, le=256, description="Threads for prompt processing; default all cores."
    )
    n_ubatch: int = Field(
        128,
        ge=16,
        le=4096,
        description="Tokens per compute step. Smaller keeps the compute buffer small "
        "(vocabulary x n_ubatch x 4 bytes of logits).",
    )
    kv_cache_type: Literal["f16", "q8_0"] = Field(
        "f16",
        description="Type of the KV cache. q8_0 (with flash attention) takes half the memory "
        "(21 MiB less with the bundled model, about 120 MiB with Phi-4-mini) and changed 2-4% "
        "of the eval sets' answers with no loss of accuracy beyond noise, but made jobs "
        "15-25% slower here (docs/performance.md): for boards short of RAM.",
    )
    prefix_cache_mb: int = Field(
        32,
        ge=0,
        le=4096,
        description="Memory for saved prompt prefixes (instructions, labels, examples) of "
        "job shapes other than the current one.",
    )
    reserve_mb: int = Field(
        192,
        ge=0,
        le=65536,
        description="RAM kept for the OS when choosing a model, in MiB.",
    )
    reserve_fraction: float = Field(
        0.65,
        ge=0,
        lt=1,
        description="Share of the RAM above 2 GiB also kept back when choosing a model "
        "(what bigger boards run beside the agent, and page cache). With the defaults the "
        "choices follow the deployment table in docs/models.md.",
    )
    mirror: str | None = Field(
        None,
        description="Where `edge-agent models fetch` looks first: an http(s) base URL or a "
        "local directory holding the files by name (air-gapped fleets).",
    )
    exclude_families: tuple[str, ...] = Field(
        (),
        description="Model families never chosen automatically: smollm2, gemma-3, phi-4-mini.",
    )
    min_tokens_per_second: float | None = Field(
        None,
        ge=0,
        description="Prefer speed: skip models whose benchmarked generation speed on this "
        "kind of board is below this.",
    )


class JobSettings(_Section):
    """Limits on what a job may ask, and how jobs are queued."""

    max_queue: int = Field(
        16, ge=1, le=10000, description="Jobs waiting to run; more are rejected as overloaded."
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=32,
        description="Jobs run at once in one batch (each step decodes every running job's "
        "next tokens together, continuous batching). Unset: 4 on boards with 2 or more "
        "cores and 1 GiB or more for the agent, else 1. 1 runs one job at a time, and its "
        "answers are the same bit for bit from run to run; in a batch, a probability can "
        "move by rounding (up to 0.05 measured) with what else runs (docs/performance.md).",
    )
    stop_grace_s: float = Field(
        20.0,
        ge=0,
        le=600,
        description="On a stop (SIGTERM), running jobs get this long to finish; then they "
        "stop unanswered and unacknowledged, and the broker delivers them again after the "
        "restart. Keep it under the unit's TimeoutStopSec (60 s) less about 15 s for the "
        "rest of the shutdown, or systemd kills the agent first and the jobs count as a "
        "crash.",
    )
    fair_window_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Fair shares: a requester (who takes a job's replies) counts as using "
        "the agent while it holds jobs and for this many seconds after its last one. While "
        "more than one does, each may hold at most its share of mqtt.receive_maximum, run "
        "at most all slots but one, and free slots go round the requesters "
        "(docs/delivery.md).",
    )
    aging_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="A queued job's priority rises by one for every this many seconds it "
        "waits, so a lower priority waits a bounded time behind higher ones of the same "
        "requester (0: no aging).",
    )
    new_shapes_per_minute: float = Field(
        6.0,
        ge=0,
        le=6000,
        description="Prompt shapes (instructions, labels, schema, examples) the agent has "
        "not seen recently that one requester may bring a minute: each costs a prefix "
        "evaluation and, for classify, a calibration. Beyond it, `overloaded` with "
        "retry_after_ms. 0: no limit.",
    )
    new_shapes_burst: int = Field(
        4, ge=1, le=1000, description="New prompt shapes a requester may bring at once."
    )
    max_learned_rows: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="Most labeled rows one profile may learn from (profiles.<name>.rows): "
        "the memory of what it learned and the rows it keeps grows with them (reported in "
        "the device info).",
    )
    max_payload_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, description="Largest job message accepted."
    )
    max_text_chars: int = Field(
        2000, ge=1, le=1_000_000, description="Longest `text` a job may carry."
    )
    max_labels: int = Field(32, ge=1, le=200, description="Most labels a classify job may list.")
    max_label_chars: int = Field(64, ge=1, le=1000, description="Longest label.")
    max_instructions_chars: int = Field(
        1500, ge=0, le=100_000, description="Longest `instructions` a job may carry."
    )
    max_examples: int = Field(16, ge=0, le=256, description="Most few-shot examples per job.")
    min_confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Answers less sure than this are marked uncertain (`uncertain` in the "
        "result; status stays done); a job's own `min_confidence` wins. Unset: answers "
        "carry their confidence, and nothing is marked.",
    )
    max_prompt_chars: int = Field(
        4000,
        ge=100,
        le=1_000_000,
        description="Longest prompt a job may make, in characters: its instructions, labels "
        "or schema fields, examples and text together. Bigger jobs are answered "
        "`context_too_long` at once. The default context (model.n_ctx) is sized from it.",
    )
    max_schema_depth: int = Field(6, ge=1, le=32, description="Deepest nesting in a schema.")
    max_schema_properties: int = Field(
        64, ge=1, le=1000, description="Most properties in a schema, counted over all levels."
    )
    max_string_chars: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Longest string the model may write for one extracted value.",
    )
    max_array_items: int = Field(16, ge=0, le=1000, description="Most items in an extracted array.")
    max_enum_values: int = Field(64, ge=1, le=1000, description="Most values in a schema enum.")
    handoff: bool = Field(
        True,
        description="A busy agent hands fleet jobs back to the fleet topic instead of "
        "queueing them (MQTT 5 only). Mosquitto shares jobs round-robin whatever an agent's "
        "load; handing back keeps a slow board from hoarding them (docs/delivery.md).",
    )
    handoff_keep: int = Field(
        0,
        ge=0,
        le=1000,
        description="Fleet jobs a busy agent still keeps waiting before it hands more back.",
    )
    handoff_max_hops: int = Field(
        3, ge=1, le=20, description="A job handed back this many times is kept and queued."
    )
    spool_max: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Replies kept on disk while the broker is unreachable; beyond this the "
        "oldest are dropped (and counted in telemetry).",
    )
    journal_sync: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode of the job journal: full survives power loss "
        "(an fsync per reply), normal only a crash of the agent.",
    )
    dedup_window_s: int = Field(
        24 * 3600,
        ge=0,
        description="How long a job id and its reply are remembered, so a redelivered job "
        "gets the same reply and never runs twice.",
    )


class TelemetrySettings(_Section):
    """What the agent publishes for dashboards."""

    interval_s: float = Field(30.0, gt=0, le=3600, description="Telemetry period in seconds.")
    home_assistant: bool = Field(
        True,
        description="Publish Home Assistant MQTT discovery configs (retained) for the key "
        "sensors, and again whenever Home Assistant announces itself online.",
    )
    discovery_prefix: TopicSegment = Field(
        "homeassistant", description="Home Assistant's MQTT discovery prefix."
    )
    prometheus_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve Prometheus metrics on http://<prometheus_bind>:<port>/metrics; "
        "unset: off.",
    )
    prometheus_bind: str = Field(
        "127.0.0.1",
        description="Address the metrics endpoint listens on; 0.0.0.0 for every interface.",
    )


class ExampleSettings(_Section):
    """One few-shot example of a profile."""

    text: str = Field(description="The example message.")
    answer: str | dict[str, Any] = Field(
        description="Its label (classify) or its data object (extract)."
    )


class ProfileSettings(_Section):
    """A job shape sensors can name with `"profile": "<name>"` instead of sending it."""

    kind: Literal["classify", "extract"] = Field(description="The job kind it is for.")
    instructions: str | None = Field(None, description="Replaces the default instructions.")
    labels: tuple[str, ...] | None = Field(None, description="Labels, for a classify profile.")
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="JSON Schema of the result, for an extract profile."
    )
    examples: tuple[ExampleSettings, ...] = Field(
        (),
        description="Few-shot examples: two or three per label (classify), or per shape of "
        "message (extract), lift small models most (docs/performance.md).",
    )
    label_descriptions: dict[str, str] = Field(
        default_factory=dict, description="A short description of each label (classify)."
    )
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="As jobs.min_confidence, for this profile's jobs."
    )
    rows: Path | None = Field(
        None,
        description="A file of labeled rows to learn from (the format `edge-agent eval` "
        "reads: docs/profiles.md). The agent learns from them when it loads: for classify, "
        "a head over the model's state where the answer begins, its labels the rows'; for "
        "extract, the rows most like a job become its examples. It reports cross-validated "
        "accuracy before it serves.",
    )
    rows_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="The rows file's sha256: a file that differs is a configuration error "
        "(the Ansible role pins it like a model).",
    )


class HealthSettings(_Section):
    """When the agent calls itself degraded, and what it does then."""

    stall_after_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="A thread busy with one item this long without progress (for inference: "
        "without a decoded batch or token) is stalled: health turns degraded.",
    )
    exit_after_s: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="Without a systemd watchdog (WatchdogSec=), the agent exits with status "
        "70 once health has been degraded this long, so its supervisor restarts it. Under "
        "the watchdog it stops pinging instead and systemd restarts it.",
    )


class LogSettings(_Section):
    """Where and how the agent logs."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="json off a terminal, readable on one, unless forced."
    )


class Settings(BaseSettings):
    """Everything the agent reads at start-up."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="EDGE_AGENT_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    device_id: TopicSegment = Field(
        default_factory=_default_device_id,
        description="This board's id in topics; default the host name.",
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Writable directory for models, the job store and the reply spool.",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="Broker connection.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Model choice.")
    jobs: JobSettings = Field(default_factory=JobSettings, description="Job limits and queue.")
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings, description="Telemetry publishing."
    )
    health: HealthSettings = Field(
        default_factory=HealthSettings, description="Stall detection and restarts."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    profiles: dict[TopicSegment, ProfileSettings] = Field(
        default_factory=dict,
        description="Named job shapes ([profiles.<name>]): instructions, labels or schema, "
        "examples. Their fixed prompt is evaluated once and reused by every job naming them.",
    )

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.device_id}"

    @property
    def model_dir(self) -> Path:
        return self.model.dir or self.state_dir / "models"

    @property
    def n_ctx(self) -> int:
        """The context size: configured, or sized from the job limits."""
        if self.model.n_ctx is not None:
            return self.model.n_ctx
        prompt = self.jobs.max_prompt_chars // 3
        template = 128  # the chat template's own tokens around the messages
        answer = 512  # the most tokens an extraction may generate (runner.MAX_NEW_TOKENS)
        return max(512, -(-(prompt + template + answer) // 256) * 256)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_CONFIG_FILE.get())
        credentials = _credential_source(settings_cls)
        middle = (credentials,) if credentials is not None else ()
        changed = _OPERATIONS.get()
        first = (_Given(settings_cls, changed),) if changed else ()
        return (init_settings, *first, env_settings, *middle, toml)


class _ConfigFile:
    """The TOML path for the load in progress (pydantic-settings asks the class, not us)."""

    def __init__(self) -> None:
        self._path: Path | None = None

    def get(self) -> Path | None:
        return self._path

    def set(self, path: Path | None) -> None:
        self._path = path


_CONFIG_FILE = _ConfigFile()


class _Operations:
    """The settings operations persisted, for the load in progress (like _ConfigFile)."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        return self._data

    def set(self, data: dict[str, Any]) -> None:
        self._data = data


_OPERATIONS = _Operations()
# Settings changed by `config` operations with persist (docs/operations.md), under the
# state directory; above the environment and config.toml, below command-line flags.
OPERATIONS_FILE = "settings.operations.json"


class _Given(PydanticBaseSettingsSource):
    """Fixed nested values as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


def operation_settings(state_dir: Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(settings, who set each dotted key, a problem) from the operations file: empty when
    there is none; a file that does not parse is set aside and named as the problem."""
    path = state_dir / OPERATIONS_FILE
    try:
        raw = json.loads(path.read_text())
        settings, by = raw.get("settings", {}), raw.get("by", {})
        if not isinstance(settings, dict) or not isinstance(by, dict):
            raise ValueError("not objects")
    except FileNotFoundError:
        return {}, {}, None
    except (OSError, ValueError, AttributeError) as exc:
        with contextlib.suppress(OSError):
            path.replace(path.with_suffix(".json.bad"))
        return {}, {}, f"{path}: {exc} (set aside as .bad)"
    return settings, by, None


def save_operation_settings(state_dir: Path, settings: dict[str, Any], by: dict[str, Any]) -> None:
    """Replace the operations file atomically (OSError when the disk says no)."""
    path = state_dir / OPERATIONS_FILE
    tmp = path.with_suffix(".json.tmp")
    state_dir.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as fh:
        json.dump({"v": 1, "settings": settings, "by": by}, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _credential_source(settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource | None:
    """systemd credentials ($CREDENTIALS_DIRECTORY) as a pydantic-settings secrets directory:
    the file `mqtt__password` sets mqtt.password. Secrets never come from argv."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or not Path(directory).is_dir():
        return None
    return NestedSecretsSettingsSource(
        SecretsSettingsSource(settings_cls, secrets_dir=directory),
        secrets_dir=directory,
        secrets_prefix="",
        secrets_nested_delimiter="__",
        secrets_dir_max_size=1024 * 1024,
    )


def credential_file(name: str) -> Path | None:
    """A non-empty systemd credential file (an empty one means "not used")."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        return path if path.is_file() and path.stat().st_size > 0 else None
    except OSError:
        return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load settings; `config_file=None` reads /etc/edge-agent/config.toml if it exists.

    `overrides` are command-line values (nested as {"mqtt": {"broker": ...}}); None values are
    dropped so an absent flag never hides the file or the environment.
    """
    explicit = config_file is not None
    path = config_file if explicit else DEFAULT_CONFIG_FILE
    if explicit and (not path.exists() or path.is_dir()):  # type: ignore[union-attr]
        what = "is a directory" if path.is_dir() else "does not exist"  # type: ignore[union-attr]
        raise ConfigError(f"config file {path} {what}")
    # Not only regular files: /dev/null (no settings) or a pipe are files to read too.
    _CONFIG_FILE.set(path if path is not None and path.exists() and not path.is_dir() else None)
    cleaned = _drop_none(overrides)
    try:
        settings = Settings(**cleaned)
        changed, _by, _problem = operation_settings(settings.state_dir)
        if changed:
            # what `config` operations persisted; should it no longer validate (another
            # version, another config.toml), the board starts without it rather than not
            _OPERATIONS.set(changed)
            with contextlib.suppress(ValidationError, ValueError, OSError):
                settings = Settings(**cleaned)
        return settings
    except ValidationError as exc:
        raise ConfigError(_describe(exc, _CONFIG_FILE.get())) from exc
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError(f"cannot read config {_CONFIG_FILE.get()}: {exc}") from exc
    finally:
        _CONFIG_FILE.set(None)
        _OPERATIONS.set({})


def sources(config_file: Path | None = None, **overrides: Any) -> dict[str, dict[str, Any]]:
    """Where each setting's value comes from (`edge-agent config --sources`): for every
    dotted key, its value and its source: `flag`, `operation <id> by <requester> at <time>`,
    `env EDGE_AGENT_...`, `credentials`, `file <path>`, or `default`."""
    settings = load_settings(config_file, **overrides)
    path = config_file if config_file is not None else DEFAULT_CONFIG_FILE
    toml_path = path if path is not None and path.exists() and not path.is_dir() else None
    changed, by, _problem = operation_settings(settings.state_dir)
    credentials = _credential_source(Settings)
    layers: list[tuple[str, dict[str, Any]]] = [
        ("flag", _drop_none(overrides)),
        ("operation", changed),
        ("env", EnvSettingsSource(Settings)()),
        ("credentials", credentials() if credentials is not None else {}),
        (f"file {toml_path}", TomlConfigSettingsSource(Settings, toml_file=toml_path)()),
    ]
    out: dict[str, dict[str, Any]] = {}
    data = settings.model_dump(mode="json")
    if data["mqtt"].get("password"):
        data["mqtt"]["password"] = "**********"  # noqa: S105 - the mask, not a password
    for key, value in _leaves(data):
        source = "default"
        for name, layer in layers:
            if _has(layer, key):
                source = name
                if name == "env":
                    source = "env EDGE_AGENT_" + key.upper().replace(".", "__")
                elif name == "operation":
                    who = by.get(key) or {}
                    source = (f"operation {who.get('id', '?')} by {who.get('requester', '?')}"
                              f" at {who.get('at', '?')}")  # fmt: skip
                break
        out[key] = {"value": value, "source": source}
    return out


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out.extend(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, data)]


def _has(layer: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(layer, dict):
            return False
        found = next((v for k, v in layer.items() if str(k).lower() == part.lower()), _MISSING)
        if found is _MISSING:
            return False
        layer = found
    return True


_MISSING = object()


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


def _describe(exc: ValidationError, path: Path | None) -> str:
    source = f" (file {path}, environment EDGE_AGENT_*, or flags)" if path else ""
    lines = [f"invalid configuration{source}:"]
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "settings"
        lines.append(f"  {field}: {err['msg']}")
    return "\n".join(lines)
