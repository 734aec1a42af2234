"""The `edge-agent` command line.

Exit statuses: 0 success; 1 failure (a job answered other than `done`, a check that
failed); 2 usage error; 69 broker unreachable; 75 timed out waiting for a reply;
78 configuration error (EX_CONFIG), with a message that names the field.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.errors import ConfigError, EdgeAgentError, ModelError
from edge_agent.settings import Settings, load_settings

EX_OK, EX_FAIL, EX_USAGE = 0, 1, 2
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

    config = sub.add_parser(
        "config",
        help="print the effective settings (secrets masked)",
        description="Load settings exactly as `run` would and print them as JSON.",
    )
    _common(config)
    config.add_argument("--device-id", metavar="ID")
    config.add_argument("--model", metavar="NAME|PATH")
    config.add_argument("--state-dir", type=Path, metavar="DIR")
    config.set_defaults(func=cmd_config)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "device_id": getattr(args, "device_id", None),
        "state_dir": getattr(args, "state_dir", None),
        "mqtt": {
            "broker": getattr(args, "broker", None),
            "protocol": getattr(args, "protocol", None),
        },
        "model": {"name": getattr(args, "model", None)},
        "log": {
            "level": getattr(args, "log_level", None),
            "format": getattr(args, "log_format", None),
        },
    }
    return load_settings(getattr(args, "config", None), **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
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
    from edge_agent import log
    from edge_agent.app import Agent, install_signal_handlers

    settings = settings_from(args)
    log.configure(settings.log.level, settings.log.format)
    agent = Agent(settings)
    install_signal_handlers(agent)
    return agent.run()


def cmd_config(args: argparse.Namespace) -> int:
    settings = settings_from(args)
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
        from edge_agent.schema import schema_for_fields

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
    from edge_agent.app import topics_for
    from edge_agent.mqtt import Requester

    settings = settings_from(args)
    job = build_job(args)
    topics = topics_for(settings)
    kind = job.get("kind", args.kind or "classify")
    topic = (
        f"{settings.mqtt.topic_prefix}/devices/{args.device}/jobs/{kind}"
        if args.device
        else topics.fleet_jobs(kind)
    )
    client_id = f"edge-submit-{uuid.uuid4().hex[:8]}"
    reply_topic = f"{settings.mqtt.topic_prefix}/replies/{client_id}"
    m = settings.mqtt
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
                return False
            return body.get("id") == job["id"] and body.get("status") in final

        reply = requester.wait_for(is_answer, args.timeout)
    finally:
        requester.close()
    if reply is None:
        print(f"edge-agent: no reply to job {job['id']} within {args.timeout:g} s", file=sys.stderr)
        return EX_TEMPFAIL
    body = json.loads(reply.payload)
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return EX_OK if body.get("status") == "done" else EX_FAIL


def _tls_context(settings: Settings) -> Any:
    if not settings.mqtt.tls:
        return None
    import ssl

    m = settings.mqtt
    context = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
    if m.cert_file and m.key_file:
        context.load_cert_chain(str(m.cert_file), str(m.key_file))
    context.check_hostname = not m.tls_insecure
    return context


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo

    return run_demo(broker=args.broker, model=args.model, protocol=args.protocol)
