"""The `edge-agent` command line.

Exit statuses: 0 success; 1 failure (a job answered other than `done`, a check that
failed); 2 usage error; 69 broker unreachable; 70 the agent stopped itself because its
health was degraded (a thread died or stalled); 75 timed out waiting for a reply;
78 configuration error (EX_CONFIG), with a message that names the field, or a system
library llama.cpp needs is missing (with the package that provides it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.adapters.settings import Settings, load_settings
from edge_agent.core.errors import ConfigError, EdgeAgentError, EngineUnavailable, ModelError

EX_OK, EX_FAIL = 0, 1
EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 69, 75, 78


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML settings file (default /etc/edge-agent/config.toml if it exists)",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker as mqtt://HOST:PORT or mqtts://HOST:PORT [mqtt.broker, "
        "EDGE_AGENT_MQTT__BROKER]",
    )
    parser.add_argument(
        "--protocol",
        choices=("5", "3.1.1"),
        help="MQTT protocol version [mqtt.protocol, EDGE_AGENT_MQTT__PROTOCOL]",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="[log.level, EDGE_AGENT_LOG__LEVEL]",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        help="json off a terminal, readable on one [log.format, EDGE_AGENT_LOG__FORMAT]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Runs a small language model on this board and serves classify and "
        "extract jobs over MQTT. See README.md and docs/.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run the agent (what the systemd unit starts)",
        description="Load the model, connect to the broker and serve jobs until SIGTERM.",
    )
    _common(run)
    run.add_argument(
        "--device-id", metavar="ID", help="this board's id [device_id, EDGE_AGENT_DEVICE_ID]"
    )
    run.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="models.lock entry or .gguf path [model.name, EDGE_AGENT_MODEL__NAME]",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="writable directory for models and stores [state_dir, EDGE_AGENT_STATE_DIR]",
    )
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser(
        "submit",
        help="publish one job and print its reply",
        description="Publish one job to the fleet (or one device) and wait for the reply. "
        "Exits 0 when the reply's status is done.",
    )
    _common(submit)
    submit.add_argument("kind", choices=("classify", "extract"), nargs="?", help="job kind")
    submit.add_argument("--text", help="the text to classify or extract from")
    submit.add_argument("--labels", help="comma-separated labels (classify)")
    submit.add_argument(
        "--schema", help="JSON Schema of the result object, inline or @file.json (extract)"
    )
    submit.add_argument(
        "--fields",
        help="shorthand schema: name=type,... with types string, number, integer, boolean",
    )
    submit.add_argument("--job", type=Path, metavar="FILE", help="send this job JSON as is")
    submit.add_argument("--id", help="job id (default: a random one)")
    submit.add_argument("--device", metavar="ID", help="address one device instead of the fleet")
    submit.add_argument("--priority", type=int, choices=range(10), metavar="0-9")
    submit.add_argument("--ttl-ms", type=int, metavar="MS", help="deadline, from now")
    submit.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    submit.set_defaults(func=cmd_submit)

    demo = sub.add_parser(
        "demo",
        help="start a local broker and an agent, send sample jobs, print the results",
        description="What `make run` runs: a throwaway Mosquitto on a free port (unless "
        "--broker is given), an agent with the bundled model, a handful of sample sensor "
        "jobs, their replies and one telemetry message. Stops everything it started.",
    )
    demo.add_argument("--broker", metavar="URL", help="use this broker instead of starting one")
    demo.add_argument("--model", metavar="NAME|PATH", help="model for the demo agent")
    demo.add_argument("--protocol", choices=("5", "3.1.1"), default=None)
    demo.set_defaults(func=cmd_demo)

    _add_probe_and_select(sub)
    _add_models(sub)
    _add_bench_and_eval(sub)
    _add_fleet(sub)
    _add_ops(sub)

    config = sub.add_parser(
        "config",
        help="print the effective settings (secrets masked)",
        description="Load settings exactly as `run` would and print them as JSON. The "
        "profiles are checked as `run` checks them, their rows files too (docs/profiles.md): "
        "a bad one exits 78 naming the field, or the file and the line.",
    )
    _common(config)
    config.add_argument("--device-id", metavar="ID")
    config.add_argument("--model", metavar="NAME|PATH")
    config.add_argument("--state-dir", type=Path, metavar="DIR")
    config.add_argument(
        "--sources",
        action="store_true",
        help="print each setting's value and where it came from: flag, operation (who, "
        "when), env EDGE_AGENT_..., credentials, file, default",
    )
    config.set_defaults(func=cmd_config)
    return parser


def _add_probe_and_select(sub: Any) -> None:
    probe = sub.add_parser(
        "probe",
        help="show what this board has (RAM, cgroup, CPU, disk) and how llama.cpp will run",
        description="Read the board's facts: total and available RAM, the cgroup v2 memory "
        "limit and whether the memory controller is on, CPU cores and the features "
        "llama.cpp uses, the board model, free disk in the model directory, and the "
        "threads and context the agent would use.",
    )
    _common(probe)
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(func=cmd_probe)

    choose = sub.add_parser(
        "select",
        help="which model this board would run, and why",
        description="Apply the selection policy (docs/models.md) to this board, or to --ram.",
    )
    _common(choose)
    choose.add_argument(
        "--ram", metavar="SIZE", help="pretend the board has this much RAM (4G, 512M)"
    )
    choose.add_argument(
        "--explain", action="store_true", help="list every candidate and its verdict"
    )
    choose.add_argument("--json", action="store_true", help="print one JSON object")
    choose.add_argument("--model", metavar="NAME", help="pin a models.lock entry [model.name]")
    choose.set_defaults(func=cmd_select)


def _add_bench_and_eval(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure this board: prompt and generation tokens/s, job latency",
        description="Load the model this board runs (or --model) and measure prompt and "
        "generation tokens/s, constrained generation tokens/s, and classify and extract job "
        "latency (p50/p95). The figures are kept in <state_dir>/bench.json, where the "
        "device info and the selector's speed preference (model.min_tokens_per_second) "
        "read them.",
    )
    _common(bench)
    bench.add_argument("--model", metavar="NAME|PATH", help="[model.name]")
    bench.add_argument("--state-dir", type=Path, metavar="DIR", help="[state_dir]")
    bench.add_argument("--rounds", type=int, default=3, help="repetitions (default 3)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench)

    ev = sub.add_parser(
        "eval",
        help="accuracy and latency of models on a classify or extract dataset",
        description="Run every row of DATASET (JSON lines: classify rows {text, labels, "
        "label}, extract rows {text, fields or schema, expected}) through each model, as "
        "jobs run, and print accuracy (classify), exact match, per-field accuracy and "
        "schema validity (extract), latency p50/p95, and how often answers at or above "
        "--min-confidence were right, with a reliability table (confidence bins against "
        "accuracy). Rows are split: a row's `split` (tune or test), else every third row "
        "is a tune row; few-shot examples come from tune rows only, and figures are given "
        "for the test rows (and the tune rows apart).",
    )
    _common(ev)
    ev.add_argument("datasets", nargs="+", type=Path, metavar="DATASET.jsonl")
    ev.add_argument(
        "--model",
        action="append",
        metavar="NAME|PATH",
        help="a models.lock entry or .gguf path; repeat to compare (default: this board's)",
    )
    ev.add_argument("--limit", type=int, help="only the first N rows of each dataset")
    ev.add_argument(
        "--examples",
        type=int,
        default=2,
        metavar="N",
        help="few-shot examples per label (classify) or per job (extract), from the tune "
        "rows of the same shape, as a profile would give them (default 2; 0: none)",
    )
    ev.add_argument(
        "--min-confidence",
        type=float,
        default=0.7,
        metavar="P",
        help="report the accuracy of answers at or above this confidence (default 0.7)",
    )
    ev.add_argument(
        "--learn",
        action="store_true",
        help="compare, side by side on the same held-out folds, zero-shot scoring, fixed "
        "examples (--examples from the other folds) and learning from the other folds' rows "
        "(as a profile with `rows` does), for every shape (label set or schema) of each "
        "dataset (docs/profiles.md)",
    )
    ev.add_argument(
        "--profile",
        metavar="NAME",
        help="as --learn, with the instructions and label descriptions of the configured "
        "profile NAME; its rows must be of its kind (and labels)",
    )
    ev.add_argument("--state-dir", type=Path, metavar="DIR", help="[state_dir]")
    ev.add_argument("--json", action="store_true", help="print a JSON list")
    ev.set_defaults(func=cmd_eval)


def _add_fleet(sub: Any) -> None:
    from edge_agent.core.fleet import COLUMNS

    fleet = sub.add_parser(
        "fleet",
        help="a live table of every device under the topic prefix",
        description="Subscribe to every device's status, info and telemetry and show one row "
        "per device: status, board, model and quant, tokens/s, queue, latency p95, SoC "
        "temperature, seconds since last seen. Refreshes in place; keys 1-9 and 0 sort by "
        "a column, r reverses, q quits. --json prints one snapshot and exits.",
    )
    _common(fleet)
    fleet.add_argument("--json", action="store_true", help="print one snapshot and exit")
    fleet.add_argument(
        "--wait", type=float, default=3.0, help="seconds to listen before --json (default 3)"
    )
    fleet.add_argument("--sort", choices=list(COLUMNS), default="device", help="sort column")
    fleet.add_argument("--reverse", action="store_true", help="sort descending")
    fleet.set_defaults(func=cmd_fleet)


def _add_ops(sub: Any) -> None:
    ops = sub.add_parser(
        "ops",
        help="run an operation on devices, in stages (drain, resume, cancel, log-level, "
        "logs, restart, model, config, bench)",
        description="Run one remote operation (docs/operations.md) on one device, a list, or "
        "every online device, in stages: one device first; once it ends successful and "
        "answers a gate job (a classify job on its own topic; not after drain), a fraction "
        "of the rest; then the others. Stops after the first stage in which a device did "
        "not end successful; later devices are skipped, untouched. Exit 0 only when every "
        "targeted device ended successful. The broker login must have the operator role "
        "(deploy/mosquitto/add-client.sh operator NAME); NAME is taken from mqtt.username.",
        epilog="examples:\n"
        "  edge-agent ops drain --device pi-07 --json\n"
        "  edge-agent ops model gemma-3-270m-q4_k_m --device pi-07 --json\n"
        "  edge-agent ops model auto --all --rollback\n"
        "  edge-agent ops log-level level=debug expiry_s=600 --all\n"
        "  edge-agent ops logs lines=100 --device pi-07\n"
        "  edge-agent ops restart --all --fraction 0.1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(ops)
    ops.add_argument(
        "operation", help="drain, resume, cancel, log-level, logs, restart, model, config or bench"
    )
    ops.add_argument(
        "args",
        nargs="*",
        metavar="KEY=VALUE",
        help="the operation's arguments; VALUE is read as JSON when it parses (60, true), "
        "else as text",
    )
    target = ops.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", action="append", metavar="ID", help="a device (repeatable)")
    target.add_argument("--all", action="store_true", help="every device whose status is online")
    ops.add_argument(
        "--fraction", type=float, default=0.25, help="the second stage's share of the rest "
        "(default 0.25)",
    )  # fmt: skip
    ops.add_argument("--no-gate", action="store_true", help="do not send gate jobs")
    ops.add_argument(
        "--rollback",
        action="store_true",
        help="model: when the run stops at a failure, switch the boards it reached back",
    )
    ops.add_argument(
        "--timeout", type=float, default=600.0, help="seconds each device may take to end "
        "its operation (default 600)",
    )  # fmt: skip
    ops.add_argument("--gate-timeout", type=float, default=60.0, help="seconds (default 60)")
    ops.add_argument(
        "--wait", type=float, default=3.0, help="--all: seconds to collect devices (default 3)"
    )
    ops.add_argument("--id", help="operation id (default: ops-<UTC time>-<random>)")
    ops.add_argument("--json", action="store_true", help="print each device's outcome as JSON")
    ops.set_defaults(func=cmd_ops)


def _add_models(sub: Any) -> None:
    models = sub.add_parser(
        "models",
        help="list, fetch, verify, clean up and pin model files",
        description="The model store: files in the model directory (<state_dir>/models).",
    )
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    m_list = msub.add_parser("list", help="every models.lock entry and whether it is here")
    m_fetch = msub.add_parser(
        "fetch",
        help="download entries (default: the one this board would select)",
        description="Download from the configured mirror (model.mirror), else the entry's "
        "URL; resumes interrupted downloads, checks free disk first, verifies size and "
        "sha256 before moving the file into place.",
    )
    m_fetch.add_argument("names", nargs="*", metavar="NAME")
    m_fetch.add_argument("--mirror", metavar="URL|DIR", help="[model.mirror]")
    m_fetch.add_argument(
        "--allow-unpinned", action="store_true", help="download entries with no sha256 pin"
    )
    m_verify = msub.add_parser(
        "verify",
        help="check files against models.lock; exit 1 on any mismatch",
        description="Check the given files (or every stored model) against the models.lock "
        "entry of the same file name: size and sha256.",
    )
    m_verify.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    m_gc = msub.add_parser(
        "gc",
        help="delete model files other than the current and previous one",
        description="Keep the model loaded last and the one before it (for rollback), and "
        "bundled files; delete other .gguf files and abandoned partial downloads.",
    )
    m_gc.add_argument("--dry-run", action="store_true", help="only say what would go")
    m_lock = msub.add_parser(
        "lock",
        help="compute size and sha256 of a file or URL and write them into models.lock",
        description="Pin an entry: run once on a connected machine (or the Ansible "
        "controller), then ship the updated models.lock with the fleet.",
    )
    m_lock.add_argument("source", metavar="PATH|URL")
    m_lock.add_argument("--name", help="the entry to update (default: matched by file name)")
    m_lock.add_argument("--lock", type=Path, metavar="FILE", help="models.lock to update")
    m_lock.add_argument("--keep", type=Path, metavar="FILE", help="also save the download here")
    for action in (m_list, m_fetch, m_verify, m_gc, m_lock):
        _common(action)
        action.add_argument("--state-dir", type=Path, metavar="DIR", help="[state_dir]")
        action.set_defaults(func=cmd_models)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "device_id": getattr(args, "device_id", None),
        "state_dir": getattr(args, "state_dir", None),
        "mqtt": {
            "broker": getattr(args, "broker", None),
            "protocol": getattr(args, "protocol", None),
        },
        # `eval --model` is a list of models to compare, not the one to run
        "model": {"name": m if isinstance(m := getattr(args, "model", None), str) else None},
        "log": {
            "level": getattr(args, "log_level", None),
            "format": getattr(args, "log_format", None),
        },
    }
    return load_settings(getattr(args, "config", None), **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("EDGE_AGENT_RETRY_INSTANT") == "1":  # tests: retries without waits
        from edge_agent.core import retry

        retry.instant(True)
    if args.func is not cmd_run:
        # Commands print their results on stdout; their logs go to stderr, warnings only.
        from edge_agent.adapters import log

        log.configure(getattr(args, "log_level", None) or "warning", "auto", sys.stderr)
    try:
        return int(args.func(args))
    except (ConfigError, EngineUnavailable) as exc:
        # A restart cannot fix either: the unit's RestartPreventExitStatus=78 keeps it down.
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ModelError as exc:
        print(f"edge-agent: model: {exc}", file=sys.stderr)
        return EX_FAIL
    except EdgeAgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    _limit_malloc_arenas()
    from edge_agent.adapters import log
    from edge_agent.service.app import Agent, install_signal_handlers

    settings = settings_from(args)
    log.configure(settings.log.level, settings.log.format)
    agent = Agent(settings)
    install_signal_handlers(agent)
    return agent.run()


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own arena (up to 8 per core); the agent
    has a handful of threads, each leaving megabytes resident. Two arenas are plenty
    (the same as MALLOC_ARENA_MAX=2, set before any thread starts)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: no arenas to limit
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX


def cmd_config(args: argparse.Namespace) -> int:
    from edge_agent.service.app import job_profiles

    settings = settings_from(args)
    # the profiles as `run` checks them, their rows files too (the Ansible role validates
    # a staged config.toml with this command, before it goes live)
    job_profiles(settings)
    if args.sources:
        from edge_agent.adapters.settings import sources

        overrides = {
            "device_id": args.device_id, "state_dir": args.state_dir,
            "mqtt": {"broker": args.broker, "protocol": args.protocol},
            "model": {"name": args.model},
            "log": {"level": args.log_level, "format": args.log_format},
        }  # fmt: skip
        print(json.dumps(sources(args.config, **overrides), indent=2))
        return EX_OK
    data = settings.model_dump(mode="json")
    if data["mqtt"].get("password"):
        data["mqtt"]["password"] = "**********"  # noqa: S105 - the mask, not a password
    print(json.dumps(data, indent=2))
    return EX_OK


def build_job(args: argparse.Namespace) -> dict[str, Any]:
    """The job `submit` sends, from flags or a file."""
    if args.job is not None:
        given = json.loads(args.job.read_text())
        if not isinstance(given, dict):
            raise ConfigError(f"--job {args.job}: must hold a JSON object")
        given.setdefault("id", args.id or uuid.uuid4().hex[:12])
        return given
    if args.kind is None or args.text is None:
        raise ConfigError("submit: give a kind and --text (or --job FILE)")
    job: dict[str, Any] = {
        "id": args.id or uuid.uuid4().hex[:12],
        "kind": args.kind,
        "text": args.text,
    }
    if args.kind == "classify":
        if not args.labels:
            raise ConfigError("submit classify: --labels a,b,c is required")
        job["labels"] = [label.strip() for label in args.labels.split(",") if label.strip()]
    elif args.schema:
        raw = Path(args.schema[1:]).read_text() if args.schema.startswith("@") else args.schema
        try:
            job["schema"] = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"--schema: not JSON: {exc}") from exc
    elif args.fields:
        from edge_agent.core.schema import schema_for_fields

        pairs = dict(item.split("=", 1) for item in args.fields.split(",") if "=" in item)
        job["schema"] = schema_for_fields(pairs)
    else:
        raise ConfigError("submit extract: --schema or --fields is required")
    if args.priority is not None:
        job["priority"] = args.priority
    if args.ttl_ms is not None:
        job["ttl_ms"] = args.ttl_ms
    return job


def cmd_submit(args: argparse.Namespace) -> int:
    from edge_agent.adapters.mqtt import Requester
    from edge_agent.core.wire import ReplyMessage
    from edge_agent.service.app import topics_for

    settings = settings_from(args)
    job = build_job(args)
    topics = topics_for(settings)
    kind = job.get("kind", args.kind or "classify")
    topic = (
        topics.of_device(args.device).device_jobs(kind) if args.device else topics.fleet_jobs(kind)
    )
    m = settings.mqtt
    nonce = uuid.uuid4().hex[:8]
    client_id = f"edge-submit-{nonce}"
    # A fleet broker (deploy/mosquitto) lets a sensor read only <prefix>/replies/<its username>/#.
    owner = m.username or client_id
    reply_topic = topics.replies(owner, nonce)
    requester = Requester(
        m.host,
        m.port,
        client_id,
        protocol=m.protocol,
        username=m.username,
        password=m.password.get_secret_value() if m.password else None,
        tls_context=_tls_context(settings),
    )
    try:
        requester.connect()
    except ConnectionError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        requester.subscribe(reply_topic)
        correlation = uuid.uuid4().bytes
        if requester.v5:
            requester.publish(
                topic,
                json.dumps(job).encode(),
                response_topic=reply_topic,
                correlation_data=correlation,
            )
        else:
            requester.publish(topic, json.dumps({**job, "reply_to": reply_topic}).encode())
        final = {"done", "failed", "rejected", "expired", "cancelled"}

        def is_answer(msg: Any) -> bool:
            try:
                body = json.loads(msg.payload)
            except ValueError:
                return False  # anything else on the reply topic is not ours to read
            return (
                isinstance(body, dict)
                and body.get("id") == job["id"]
                and body.get("status") in final
            )

        reply = requester.wait_for(is_answer, args.timeout)
    finally:
        requester.close()
    if reply is None:
        print(f"edge-agent: no reply to job {job['id']} within {args.timeout:g} s", file=sys.stderr)
        return EX_TEMPFAIL
    body = json.loads(reply.payload)
    print(json.dumps(body, indent=2, ensure_ascii=False))
    try:  # read through the same model the agent builds replies with
        ReplyMessage.model_validate(body)
    except ValueError as exc:
        first = str(exc).splitlines()[1:3]
        print(f"edge-agent: the reply does not match wire contract v1: {first}", file=sys.stderr)
    return EX_OK if body.get("status") == "done" else EX_FAIL


def _listener(settings: Settings, client_id: str, on_message: Any) -> Any:
    """A connected broker client that hands every message to `on_message` (fleet, ops);
    None, said on stderr, when the broker cannot be reached."""
    from edge_agent.adapters.mqtt import Requester

    m = settings.mqtt
    client = Requester(
        m.host, m.port, client_id, protocol=m.protocol, username=m.username,
        password=m.password.get_secret_value() if m.password else None,
        tls_context=_tls_context(settings), on_message=on_message,
    )  # fmt: skip
    try:
        client.connect()
    except ConnectionError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return None
    return client


def _tls_context(settings: Settings) -> Any:
    if not settings.mqtt.tls:
        return None
    from edge_agent.adapters.mqtt import tls_context

    m = settings.mqtt
    return tls_context(
        str(m.ca_file) if m.ca_file else None,
        str(m.cert_file) if m.cert_file else None,
        str(m.key_file) if m.key_file else None,
        m.tls_insecure,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.cli.demo import run_demo

    return run_demo(broker=args.broker, model=args.model, protocol=args.protocol)


def _probe_report(settings: Settings) -> dict[str, Any]:
    from edge_agent.adapters.probe import available_ram, board_facts, disk_free
    from edge_agent.service.app import parallel_jobs, thread_counts

    board = board_facts()
    gen, batch = thread_counts(settings, board.cpu_cores)
    return {
        **board.to_dict(),
        "ram_available_bytes": available_ram(),
        "model_dir": str(settings.model_dir),
        "disk_free_bytes": disk_free(settings.model_dir),
        "runtime": {
            "n_threads": gen,
            "n_threads_batch": batch,
            "n_ctx": settings.n_ctx,
            "n_ubatch": settings.model.n_ubatch,
            "parallel": parallel_jobs(settings, board.cpu_cores, board.ram_budget_bytes),
        },
    }


def cmd_probe(args: argparse.Namespace) -> int:
    from edge_agent.cli.console import gib

    report = _probe_report(settings_from(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return EX_OK
    cgroup = report["cgroup_memory_max_bytes"]
    controller = {
        True: "on",
        False: "off (add cgroup_enable=memory to the kernel command line)",
        None: "unknown (not cgroup v2)",
    }[report["memory_cgroup_enabled"]]
    features = " ".join(report["cpu_features"]) or "none of note"
    rt = report["runtime"]
    board = report["board_model"] or "unknown"
    print(f"board     {board} ({report['architecture']}, kernel {report['kernel']})")
    print(f"cpu       {report['cpu_cores']} cores; features: {features}")
    total, available = gib(report["ram_total_bytes"]), gib(report["ram_available_bytes"])
    print(f"memory    {total} total, {available} available")
    print(f"cgroup    limit {gib(cgroup) if cgroup else 'none'}; memory controller {controller}")
    print(f"disk      {gib(report['disk_free_bytes'])} free for {report['model_dir']}")
    print(
        f"llama.cpp {rt['n_threads']} threads for generation, {rt['n_threads_batch']} for prompts; "
        f"n_ctx {rt['n_ctx']}, n_ubatch {rt['n_ubatch']}; {rt['parallel']} jobs at once"
    )
    return EX_OK


def cmd_select(args: argparse.Namespace) -> int:
    from edge_agent.adapters.probe import board_facts
    from edge_agent.cli.console import gib, table
    from edge_agent.core.catalog import parse_size
    from edge_agent.service.app import load_catalog
    from edge_agent.service.loader import selection_for

    settings = settings_from(args)
    catalog = load_catalog(settings)
    ram = parse_size(args.ram) if args.ram else None
    selection = selection_for(settings, catalog, board_facts(), ram_bytes=ram)
    if args.json:
        print(json.dumps(selection.to_dict(), indent=2))
        return EX_OK
    chosen = selection.selected
    est = chosen.estimate
    where = f"{gib(selection.ram_bytes)} RAM" + (
        f", cgroup limit {gib(selection.cgroup_limit_bytes)}"
        if selection.cgroup_limit_bytes
        else ""
    )
    print(f"selected  {chosen.entry.name} ({chosen.entry.model} {chosen.entry.quant})")
    print(f"why       {chosen.reason}")
    print(f"budget    {gib(selection.budget_bytes)} of {where}")
    print(
        f"estimate  {gib(est.total)} = weights {gib(est.weights)} + KV cache {gib(est.kv_cache)}"
        f" + compute {gib(est.compute)} + outputs {gib(est.outputs)} + agent {gib(est.agent)}"
    )
    if len(selection.ranked) > 1:
        print("fallbacks " + ", ".join(c.entry.name for c in selection.ranked[1:]))
    if args.explain:
        rows = [
            (
                c.entry.name,
                c.entry.quant,
                f"{c.entry.quality:g}",
                gib(c.estimate.total),
                "yes" if c.entry.pinned else "no",
                "kept" if c.fits else "rejected",
                c.reason,
            )
            for c in sorted(
                selection.candidates, key=lambda c: (-c.entry.quality, c.estimate.total)
            )
        ]
        table(("entry", "quant", "quality", "estimate", "pinned", "verdict", "why"), rows)
    return EX_OK


def cmd_models(args: argparse.Namespace) -> int:
    from edge_agent.service.app import load_catalog

    settings = settings_from(args)
    catalog = load_catalog(settings)
    action = args.models_command
    if action == "list":
        return _models_list(settings, catalog)
    if action == "fetch":
        return _models_fetch(settings, catalog, args)
    if action == "verify":
        return _models_verify(settings, catalog, args.paths)
    if action == "gc":
        return _models_gc(settings, catalog, args.dry_run)
    return _models_lock(settings, catalog, args)


def _models_list(settings: Settings, catalog: Any) -> int:
    from edge_agent.adapters.store import read_selection, stored_path
    from edge_agent.cli.console import mib, table

    current = read_selection(settings.model_dir).get("current")
    rows = []
    for entry in catalog.entries:
        path = stored_path(entry, settings.model_dir)
        here = (
            "bundled"
            if entry.bundled is not None and path.is_file()
            else ("yes" if path.is_file() else "")
        )
        rows.append(
            (
                ("* " if entry.name == current else "") + entry.name,
                entry.quant,
                mib(entry.file_bytes),
                "yes" if entry.pinned else "no",
                here,
            )
        )
    table(
        ("entry", "quant", "size", "pinned", "stored"),
        rows,
        title=f"models in {settings.model_dir} (* loaded last)",
    )
    return EX_OK


def _models_fetch(settings: Settings, catalog: Any, args: argparse.Namespace) -> int:
    from edge_agent.adapters.probe import board_facts
    from edge_agent.adapters.store import fetch
    from edge_agent.cli.console import byte_progress, gib
    from edge_agent.service.loader import selection_for

    names = list(args.names)
    if not names:
        names = [selection_for(settings, catalog, board_facts()).selected.entry.name]
    failed = 0
    for name in names:
        entry = catalog.get(name)
        if entry is None:
            print(f"{name}: not in models.lock", file=sys.stderr)
            failed += 1
            continue
        if entry.bundled is not None:
            print(f"{name}: bundled with its package, nothing to fetch", file=sys.stderr)
            continue
        try:
            with byte_progress(f"fetch {name}") as progress:
                got = fetch(
                    entry,
                    settings.model_dir,
                    mirror=args.mirror or settings.model.mirror,
                    allow_unpinned=args.allow_unpinned or settings.model.allow_unpinned,
                    progress=progress,
                )
        except EdgeAgentError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if got.already_there:
            print(f"{name}: already there and verified ({got.path})")
        else:
            resumed = f", resumed at {gib(got.resumed_from)}" if got.resumed_from else ""
            print(f"{name}: {got.path} from {got.source}{resumed}; sha256 {got.sha256}")
    return EX_FAIL if failed else EX_OK


def _models_verify(settings: Settings, catalog: Any, paths: list[Path]) -> int:
    from edge_agent.adapters.store import stored_files, stored_path, verify
    from edge_agent.cli.console import byte_progress

    targets = list(paths)
    if not targets:
        targets = stored_files(settings.model_dir)
        targets += [
            p
            for e in catalog.entries
            if e.bundled is not None
            if (p := stored_path(e, settings.model_dir)).is_file() and p not in targets
        ]
    if not targets:
        print(f"no model files in {settings.model_dir}")
        return EX_OK
    bad = 0
    for path in targets:
        entry = catalog.by_file(path.name)
        if not path.is_file():
            print(f"FAIL {path}: no such file")
            bad += 1
            continue
        try:
            with byte_progress(f"verify {path.name}") as progress:
                digest = verify(path, entry, allow_unpinned=False, progress=progress)
        except EdgeAgentError as exc:
            print(f"FAIL {path}: {exc}")
            bad += 1
            continue
        print(f"ok   {path} ({entry.name if entry else '?'}, sha256 {digest[:16]}...)")
    return EX_FAIL if bad else EX_OK


def _models_gc(settings: Settings, catalog: Any, dry_run: bool) -> int:
    from edge_agent.adapters.store import plan_gc, read_selection
    from edge_agent.cli.console import mib

    selection = read_selection(settings.model_dir)
    keep = [str(n) for n in (selection.get("current"), selection.get("previous")) if n]
    removals = plan_gc(catalog, settings.model_dir, keep)
    total = 0
    verb, freed = ("would delete", "would free") if dry_run else ("deleted", "freed")
    for removal in removals:
        total += removal.bytes
        print(f"{verb} {removal.path} ({mib(removal.bytes)}): {removal.why}")
        if not dry_run:
            removal.path.unlink(missing_ok=True)
    print(f"kept: {', '.join(keep) or 'nothing recorded yet'}; {freed} {mib(total)}")
    return EX_OK


def _models_lock(settings: Settings, catalog: Any, args: argparse.Namespace) -> int:
    from edge_agent.adapters.store import digest_source, file_name_of, load_lock
    from edge_agent.cli.console import byte_progress
    from edge_agent.core.catalog import dump_lock
    from edge_agent.service.app import default_lock_path

    lock_path = args.lock or settings.model.lock_file or default_lock_path()
    catalog = load_lock(lock_path)
    entry = catalog.get(args.name) if args.name else catalog.by_file(file_name_of(args.source))
    if entry is None:
        wanted = f"named {args.name}" if args.name else f"for file {file_name_of(args.source)}"
        raise ConfigError(f"no models.lock entry {wanted} (add the entry first, or pass --name)")
    with byte_progress(f"hash {file_name_of(args.source)}") as progress:
        size, digest = digest_source(args.source, keep=args.keep, progress=progress)
    if entry.sha256 is not None and entry.sha256 != digest:
        print(
            f"warning: {entry.name} was pinned to {entry.sha256}; replacing it with {digest}",
            file=sys.stderr,
        )
    note = f"Pinned by `edge-agent models lock` from {args.source}."
    updated = entry.model_copy(
        update={"size": size, "sha256": digest, "approx_size": None, "notes": note}
    )
    lock_path.write_text(dump_lock(catalog.replace(updated)))
    print(f"{entry.name}: size {size}, sha256 {digest} -> {lock_path}")
    return EX_OK


def _open_model(settings: Settings, wanted: str | None) -> Any:
    """Load `wanted` (entry or path), or what this board would run: (loaded, board)."""
    from edge_agent.adapters.probe import board_facts
    from edge_agent.service.app import load_catalog, open_engine
    from edge_agent.service.loader import load_model

    board = board_facts()
    if wanted is not None:
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update={"name": wanted})}
        )
    catalog = load_catalog(settings)
    loaded = load_model(settings, catalog, board, lambda path: open_engine(path, settings, board))
    return loaded, board


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.cli.console import step_progress, table
    from edge_agent.service.app import thread_counts
    from edge_agent.service.benchmark import run_bench, save

    settings = settings_from(args)
    loaded, board = _open_model(settings, args.model)
    try:
        with step_progress(f"bench {loaded.ref.name}") as progress:
            result = run_bench(
                loaded.engine,
                model=(loaded.ref.name, loaded.ref.quant, loaded.ref.sha256),
                threads=thread_counts(settings, board.cpu_cores),
                cpu_cores=board.cpu_cores,
                rounds=args.rounds,
                progress=progress,
            )
    finally:
        loaded.engine.close()
    path = save(result, settings.state_dir)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return EX_OK
    r = result
    table(
        ("figure", "value"),
        [
            ("model", f"{r.model} ({r.quant})"),
            ("threads (generation / prompt)", f"{r.n_threads} / {r.n_threads_batch}"),
            ("prompt tokens/s", r.prompt_tokens_per_second),
            ("generation tokens/s", r.tokens_per_second),
            ("constrained generation tokens/s", r.constrained_tokens_per_second),
            ("classify job ms p50 / p95", f"{r.classify_ms_p50} / {r.classify_ms_p95}"),
            ("extract job ms p50 / p95", f"{r.extract_ms_p50} / {r.extract_ms_p95}"),
        ],
    )
    print(f"saved to {path}")
    return EX_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from edge_agent.cli.console import step_progress, table
    from edge_agent.service.evaluation import above, evaluate, reliability
    from edge_agent.service.rows import load_rows

    settings = settings_from(args)
    datasets = [
        (path, load_rows(path)[: args.limit] if args.limit else load_rows(path))
        for path in args.datasets
    ]
    if args.learn or args.profile:
        return _eval_learning(args, settings, datasets)
    results = []
    for wanted in args.model or [None]:
        loaded, _board = _open_model(settings, wanted)
        try:
            for path, rows in datasets:
                with step_progress(f"eval {loaded.ref.name} {path.name}") as progress:

                    def count(done: int, total: int, bar: Any = progress) -> None:
                        bar("rows", done, total)

                    results.append(
                        evaluate(
                            loaded.engine, rows, path.name, loaded.ref.name, args.examples, count
                        )
                    )
        finally:
            loaded.engine.close()
    threshold = args.min_confidence
    if args.json:
        out = []
        for r in results:
            n, acc = above(r.judged, threshold)
            out.append({**r.to_dict(), "min_confidence": threshold,
                        "at_or_above": {"answers": n, "right": acc}})  # fmt: skip
        print(json.dumps(out, indent=2))
        return EX_OK

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines: list[tuple[object, ...]] = []
    models = list(dict.fromkeys(r.model for r in results))
    for model in models:
        mine = [r for r in results if r.model == model]
        for r in mine:
            d, t = r.to_dict(), r.test
            n, acc = above(r.judged, threshold)
            main = t.accuracy if t.accuracy is not None else t.field_accuracy
            tune = r.splits["tune"]
            tuned = tune.accuracy if tune.accuracy is not None else tune.field_accuracy
            lines.append((
                r.model, r.dataset, t.rows, pct(main), pct(t.exact_match), pct(t.validity),
                f"{pct(acc)} of {n}", pct(tuned), d["latency_ms_p50"], d["latency_ms_p95"],
            ))  # fmt: skip
        for kind, attr in (("classify", "accuracy"), ("extract fields", "field_accuracy")):
            scored = [r for r in mine if getattr(r.test, attr) is not None]
            if len(scored) > 1:
                right = sum(r.test.correct if kind == "classify" else r.test.fields_right
                            for r in scored)  # fmt: skip
                total = sum(r.test.classify_rows if kind == "classify" else r.test.fields_total
                            for r in scored)  # fmt: skip
                lines.append((model, f"all ({kind})", sum(r.test.rows for r in scored),
                              pct(right / total), "", "", "", "", "", ""))  # fmt: skip
    table(
        ("model", "dataset", "test rows", "accuracy", "exact", "valid",
         f">= {threshold:g} right", "tune rows", "ms p50", "ms p95"),
        lines,
        title=f"test rows (examples: {args.examples} per label or job, from the tune rows); "
        "'accuracy' is per field for extract sets",
    )  # fmt: skip
    print()
    bins: list[tuple[object, ...]] = []
    for model in models:
        judged = [j for r in results if r.model == model for j in r.judged]
        for b in reliability(judged):
            bins.append((model, f"{b['from']:.1f}-{b['to']:.1f}", b["answers"], pct(b["right"])))
    table(
        ("model", "confidence", "answers", "right"),
        bins,
        title="reliability over the test rows (classify answers and extracted fields)",
    )
    return EX_OK


def _eval_learning(
    args: argparse.Namespace, settings: Settings, datasets: list[tuple[Path, Any]]
) -> int:
    """`eval --learn` / `--profile`: zero-shot, fixed examples and learned, side by side."""
    from edge_agent.cli.console import step_progress, table
    from edge_agent.service.app import configured_profiles
    from edge_agent.service.comparison import METHODS, compare

    profile = None
    if args.profile:
        profiles = configured_profiles(settings)
        if args.profile not in profiles:
            raise ConfigError(
                f"--profile {args.profile}: no such profile in the configuration "
                f"(profiles: {', '.join(sorted(profiles)) or 'none'})"
            )
        profile = profiles[args.profile]
        for path, rows in datasets:
            for row in rows:
                if row["_kind"] != profile.kind:
                    raise ConfigError(
                        f"{path}:{row['_line']}: a {row['_kind']} row; profile "
                        f"{args.profile} is {profile.kind}"
                    )
                if profile.labels and sorted(row["labels"]) != sorted(profile.labels):
                    raise ConfigError(
                        f"{path}:{row['_line']}: its labels are not profile "
                        f"{args.profile}'s ({', '.join(profile.labels)})"
                    )
    results = []
    for wanted in args.model or [None]:
        loaded, _board = _open_model(settings, wanted)
        try:
            for path, rows in datasets:
                with step_progress(f"eval {loaded.ref.name} {path.name}") as progress:
                    results += compare(
                        loaded.engine, loaded.engine.tokens, loaded.engine.facts.n_layer,
                        rows, path.name, loaded.ref.name,
                        profile=profile, examples=args.examples, progress=progress,
                    )  # fmt: skip
        finally:
            loaded.engine.close()
    threshold = args.min_confidence
    if args.json:
        print(json.dumps([r.to_dict(threshold) for r in results], indent=2))
        return EX_OK

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines: list[tuple[object, ...]] = []
    for r in results:
        for name in METHODS:
            m = r.methods[name]
            n, right = m.sure(threshold)
            d = m.to_dict(threshold)
            lines.append((
                r.model, r.dataset, r.shape if len(r.shape) <= 32 else r.shape[:31] + "…",
                r.rows, name, pct(m.accuracy), f"{pct(right)} of {n}",
                d["latency_ms_p50"], d["latency_ms_p95"],
            ))  # fmt: skip
    table(
        ("model", "dataset", "shape", "rows", "method", "accuracy",
         f">= {threshold:g} right", "ms p50", "ms p95"),
        lines,
        title=f"every row held out once ({results[0].folds if results else 5}-fold, "
        f"stratified); examples: {args.examples} per label or job from the other folds; "
        "'accuracy' is per field for extract sets",
    )  # fmt: skip
    return EX_OK


def cmd_fleet(args: argparse.Namespace) -> int:
    import threading
    import time

    from edge_agent.adapters.mqtt import Incoming
    from edge_agent.core.fleet import COLUMNS, FleetState
    from edge_agent.service.app import topics_for

    settings = settings_from(args)
    topics = topics_for(settings)
    m = settings.mqtt
    state = FleetState(m.topic_prefix)
    lock = threading.Lock()

    def on_message(msg: Incoming) -> None:
        with lock:
            state.update(msg.topic, msg.payload)

    client = _listener(settings, f"edge-fleet-{uuid.uuid4().hex[:8]}", on_message)
    if client is None:
        return EX_UNAVAILABLE
    try:
        for leaf in ("status", "info", "telemetry"):
            client.subscribe(topics.all_devices(leaf), qos=0 if leaf == "telemetry" else 1)
        if args.json or not sys.stdout.isatty():
            time.sleep(args.wait)
            with lock:
                print(json.dumps(state.snapshot(), indent=2))
            return EX_OK
        return _fleet_live(state, lock, list(COLUMNS), args.sort, args.reverse)
    finally:
        client.close()


def operation_args(pairs: list[str], operation: str = "") -> dict[str, Any]:
    """KEY=VALUE words as the operation's args: JSON values where they parse (`model NAME`:
    a bare first word is the name)."""
    out: dict[str, Any] = {}
    for i, pair in enumerate(pairs):
        key, sep, value = pair.partition("=")
        if not sep and i == 0 and operation == "model":
            out["name"] = pair
            continue
        if not sep or not key:
            raise ConfigError(f"ops: {pair!r}: arguments are KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_ops(args: argparse.Namespace) -> int:
    import threading

    from edge_agent.adapters.mqtt import Incoming
    from edge_agent.core.campaign import all_successful
    from edge_agent.core.fleet import FleetState
    from edge_agent.core.operations import SEGMENT
    from edge_agent.service.app import topics_for
    from edge_agent.service.campaign import Campaign, new_op_id

    settings = settings_from(args)
    topics = topics_for(settings)
    m = settings.mqtt
    nonce = uuid.uuid4().hex[:8]
    operator = m.username or f"edge-ops-{nonce}"
    op_args = operation_args(args.args, args.operation)
    op_id = args.id or new_op_id()
    if not SEGMENT.match(op_id):
        raise ConfigError(f"ops --id {op_id!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    if not 0 < args.fraction <= 1:
        raise ConfigError("ops --fraction: between 0 (exclusive) and 1")
    fleet = FleetState(m.topic_prefix)
    lock = threading.Lock()
    campaign: list[Campaign] = []

    def on_message(msg: Incoming) -> None:
        if campaign:
            campaign[0].feed(msg.topic, msg.payload)
        with lock:
            fleet.update(msg.topic, msg.payload)

    client = _listener(settings, f"edge-ops-{nonce}", on_message)
    if client is None:
        return EX_UNAVAILABLE
    try:
        devices = _ops_targets(args, client, topics, fleet, lock)
        if not devices:
            print(f"edge-agent: no device online under {m.topic_prefix}/", file=sys.stderr)
            return EX_FAIL
        live = sys.stdout.isatty() and not args.json
        show = _ops_screen(args.operation, op_id) if live else (lambda _o: None)
        run = Campaign(
            client, topics, operator=operator, operation=args.operation, args=op_args,
            op_id=op_id, gate=not args.no_gate, timeout_s=args.timeout,
            gate_timeout_s=args.gate_timeout, fraction=args.fraction, on_change=show,
            rollback=args.rollback,
        )  # fmt: skip
        campaign.append(run)
        run.listen()
        outcomes = run.run(devices)
    finally:
        client.close()
    _ops_summary(args, op_id, outcomes, run)
    return EX_OK if all_successful(outcomes) else EX_FAIL


def _ops_targets(
    args: argparse.Namespace, client: Any, topics: Any, fleet: Any, lock: Any
) -> list[str]:
    """--device IDs as given (checked), or --all: every device whose status is online."""
    import time

    from edge_agent.core.operations import SEGMENT

    if not args.all:
        devices = list(dict.fromkeys(args.device))
        for device in devices:
            if not SEGMENT.match(device):
                raise ConfigError(f"ops --device {device!r}: not a device id")
        return devices
    client.subscribe(topics.all_devices("status"))
    time.sleep(args.wait)
    with lock:
        return [r["device"] for r in fleet.snapshot() if r["status"] == "online"]


def _ops_row(o: Any) -> list[object]:
    detail = o.progress or ""
    if o.error:
        detail = f"{o.error.get('code')}: {o.error.get('message')}"
    elif o.op_result:
        detail = json.dumps(o.op_result, ensure_ascii=False)[:100]
    if o.rollback:
        detail = f"rolled back: {o.rollback}; {detail}"
    return [o.device, o.stage, o.result or o.state or "sent", detail]


def _ops_screen(operation: str, op_id: str) -> Any:
    import threading
    import time

    from edge_agent.cli.console import render_table

    last = [0.0]
    lock = threading.Lock()

    def show(outcomes: list[Any]) -> None:
        with lock:
            now = time.monotonic()
            if now - last[0] < 0.2 and any(o.result is None for o in outcomes):
                return
            last[0] = now
            body = render_table(["device", "stage", "state", "detail"],
                                [_ops_row(o) for o in outcomes])  # fmt: skip
            sys.stdout.write(f"\x1b[H\x1b[2Jedge-agent ops {operation} ({op_id})\n\n{body}\n")
            sys.stdout.flush()

    return show


def _ops_summary(args: argparse.Namespace, op_id: str, outcomes: list[Any], run: Any) -> None:
    from collections import Counter

    from edge_agent.cli.console import table

    operation = args.operation
    if args.json:
        rows = [{**o.to_dict(), "logs": run.log_lines(o.device)} if operation == "logs"
                else o.to_dict() for o in outcomes]  # fmt: skip
        print(json.dumps({"operation": operation, "id": op_id, "devices": rows}, indent=2))
        return
    if operation == "logs":
        for o in outcomes:
            for line in run.log_lines(o.device):
                print(f"{o.device}: {line}")
    table(["device", "stage", "state", "detail"], [_ops_row(o) for o in outcomes],
          title=f"edge-agent ops {operation} ({op_id})")  # fmt: skip
    counts = Counter(o.result for o in outcomes)
    print(", ".join(f"{n} {result}" for result, n in sorted(counts.items(), key=str)))


def _fleet_live(state: Any, lock: Any, columns: list[str], sort: str, reverse: bool) -> int:
    import select
    import termios
    import time
    import tty

    from edge_agent.cli.console import LiveScreen, render_table

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if sys.stdin.isatty() else None
    try:
        if saved is not None:
            tty.setcbreak(fd)
        with LiveScreen() as screen:
            while True:
                with lock:
                    body = render_table(*state.table(sort, reverse))
                    count = len(state.devices)
                keys = "  ".join(f"{(i + 1) % 10}:{c}" for i, c in enumerate(columns))
                screen.show(
                    f"edge-agent fleet: {count} device(s), sorted by {sort}"
                    f"{' (reversed)' if reverse else ''}   {time.strftime('%H:%M:%S')}\n"
                    f"{keys}  r:reverse  q:quit\n\n{body}"
                )
                ready, _, _ = select.select([sys.stdin], [], [], 1.0) if saved else ([], [], [])
                if not ready:
                    if saved is None:
                        time.sleep(1.0)
                    continue
                key = sys.stdin.read(1)
                if key == "q":
                    return EX_OK
                if key == "r":
                    reverse = not reverse
                elif key.isdigit():
                    index = (int(key) - 1) % 10
                    if index < len(columns):
                        sort = columns[index]
    except KeyboardInterrupt:
        return EX_OK
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
