"""Settings: TOML file, EDGE_AGENT_* environment, flags; bad config exits 78 naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.adapters.settings import Settings, load_settings
from edge_agent.core.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "edge_agent.adapters.settings.DEFAULT_CONFIG_FILE", Path("/nonexistent/config.toml")
    )
    s = load_settings()
    assert s.mqtt.broker == "mqtt://localhost:1883"
    assert s.mqtt.protocol == "5"
    assert s.client_id == f"edge-agent-{s.device_id}"


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path, 'device_id = "from-file"\n[mqtt]\nbroker = "mqtt://file:1883"\nkeepalive_s = 20\n'
    )
    assert load_settings(path).mqtt.keepalive_s == 20
    monkeypatch.setenv("EDGE_AGENT_MQTT__BROKER", "mqtt://env:1884")
    s = load_settings(path)
    assert (s.device_id, s.mqtt.broker, s.mqtt.keepalive_s) == ("from-file", "mqtt://env:1884", 20)
    s = load_settings(path, mqtt={"broker": "mqtts://flag:8883"}, device_id=None)
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.tls) == ("flag", 8883, True)
    assert s.device_id == "from-file"  # a flag that was not given hides nothing


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValueError, match="frozen"):
        s.device_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[mqtt]\nkeepalive_s = 0\n", "mqtt.keepalive_s"),
        ('[mqtt]\nbroker = "http://x"\n', "mqtt.broker"),
        ('device_id = "has/slash"\n', "device_id"),
        ("[jobs]\nmax_queue = -1\n", "jobs.max_queue"),
        ("[mqtt]\nkeeplive_s = 3\n", "mqtt.keeplive_s"),
        ('[mqtt]\npassword = "x"\n', "mqtt.password"),
        ("[jobs]\nparallel = 0\n", "jobs.parallel"),
        ("[jobs]\nparallel = 33\n", "jobs.parallel"),
        ('[jobs]\nparallel = "four"\n', "jobs.parallel"),
        ("[mqtt]\nreceive_maximum = 0\n", "mqtt.receive_maximum"),
        ("[mqtt]\nreceive_maximum = 99999999999999999999\n", "mqtt.receive_maximum"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_malformed_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(write(tmp_path, "[mqtt\nbroker = 1"))


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt__password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = write(tmp_path, '[mqtt]\nusername = "pi-1"\npassword = "from-the-file"\n')
    s = load_settings(path)
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == "s3cret"  # the credential beats the file
    assert "s3cret" not in repr(s)


def test_empty_credentials_mean_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt__password").write_text("")
    (creds / "tls_key").write_text("")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings(write(tmp_path, 'device_id = "pi-1"\n'))
    assert s.mqtt.password is None
    assert s.mqtt.key_file is None


def test_client_key_from_the_tls_key_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tls_key").write_text("-----BEGIN PRIVATE KEY-----\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = '[mqtt]\nbroker = "mqtts://b:8883"\ncert_file = "/etc/edge-agent/pi-1.crt"\n'
    s = load_settings(write(tmp_path, text))
    assert s.mqtt.key_file == creds / "tls_key"
    # without a certificate the key credential is not used
    assert load_settings(write(tmp_path, 'device_id = "x"\n')).mqtt.key_file is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[mqtt]\ncert_file = "/c.pem"\nkey_file = "/k.pem"\n', "TLS is off"),
        ("[mqtt]\ntls_insecure = true\n", "TLS is off"),
        ('[mqtt]\nbroker = "mqtts://b"\ncert_file = "/c.pem"\n', "go together"),
        ('[mqtt]\npassword = "x"\n', "username is not"),
        ('[mqtt]\nbroker = "mqtt://pi:hunter2@b"\n', "must not hold credentials"),
    ],
)
def test_inconsistent_tls_settings_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text))


def test_every_field_is_described() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel], where: str) -> None:
        for name, info in model.model_fields.items():
            assert info.description, f"{where}{name} has no description"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{where}{name}.")

    walk(Settings, "")


def test_cli_exits_78_and_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "[telemetry]\ninterval_s = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 78
    assert "telemetry.interval_s" in result.stderr


def test_configuration_doc_matches_the_code() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_config_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_a_bad_profile_is_a_config_error_naming_it(tmp_path: Path) -> None:
    from edge_agent.service.app import job_profiles

    good = write(tmp_path, '[profiles.sev]\nkind = "classify"\nlabels = ["a", "b"]\n')
    assert set(job_profiles(load_settings(good))) == {"sev"}
    bad = write(tmp_path, '[profiles.sev]\nkind = "classify"\nlabels = []\n')
    with pytest.raises(ConfigError, match=r"profiles\.sev"):
        job_profiles(load_settings(bad))
    schema = write(
        tmp_path,
        '[profiles.r]\nkind = "extract"\nschema = {type = "object", properties = {a = {type = "string", pattern = "x"}}}\n',
    )
    with pytest.raises(ConfigError, match=r"profiles\.r.*pattern"):
        job_profiles(load_settings(schema))


def test_profile_label_descriptions_and_thresholds_are_checked(tmp_path: Path) -> None:
    from edge_agent.service.app import job_profiles

    base = '[profiles.sev]\nkind = "classify"\nlabels = ["ok", "alarm"]\n'
    good = write(
        tmp_path, base + 'min_confidence = 0.7\nlabel_descriptions = {alarm = "needs a person"}\n'
    )
    profile = job_profiles(load_settings(good))["sev"]
    assert profile.label_descriptions == (("alarm", "needs a person"),)
    assert profile.min_confidence == 0.7
    unknown = write(tmp_path, base + 'label_descriptions = {fire = "flames"}\n')
    with pytest.raises(ConfigError, match=r"profiles\.sev.*'fire' is not one of the labels"):
        job_profiles(load_settings(unknown))
    for bad in ("min_confidence = 1.5", "min_confidence = -0.1", 'min_confidence = "high"'):
        with pytest.raises(ConfigError, match="min_confidence"):
            load_settings(write(tmp_path, base + bad + "\n"))
    with pytest.raises(ConfigError, match="min_confidence"):
        load_settings(write(tmp_path, "[jobs]\nmin_confidence = 2\n"))


def test_a_config_file_that_is_not_a_regular_file_is_read_and_a_directory_is_refused(
    tmp_path: Path,
) -> None:
    assert load_settings(Path("/dev/null")).mqtt.broker == "mqtt://localhost:1883"
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path)


def test_job_limits_defaults_are_the_settings_defaults() -> None:
    """core.protocol.JobLimits() (used by tests, eval and tools) must not drift from the
    jobs.* settings the agent runs with."""
    from edge_agent.core.protocol import JobLimits
    from edge_agent.service.app import job_limits

    assert job_limits(load_settings(Path("/dev/null"))) == JobLimits()


def test_reconnect_backoff_grows_with_full_jitter_up_to_its_ceiling() -> None:
    from edge_agent.adapters.mqtt import reconnect_delay

    assert reconnect_delay(1, 0.5, 30, rand=lambda: 0.999) == pytest.approx(0.4995)
    assert reconnect_delay(4, 0.5, 30, rand=lambda: 1.0) == 4.0  # 0.5 x 2^3
    assert reconnect_delay(10_000, 0.5, 30, rand=lambda: 1.0) == 30  # capped, no overflow
    assert reconnect_delay(3, 0.5, 30, rand=lambda: 0.0) == 0.0  # full jitter reaches 0
    assert reconnect_delay(0, 0.5, 30, rand=lambda: 1.0) == 0.5  # attempts count from 1


def test_jobs_at_once_and_the_receive_window_follow_the_board_unless_set() -> None:
    from edge_agent.service.app import link_config, parallel_jobs

    gib = 1024**3
    assert parallel_jobs(Settings(), cores=2, ram_bytes=2 * gib) == 4
    assert parallel_jobs(Settings(), cores=1, ram_bytes=8 * gib) == 1
    assert parallel_jobs(Settings(), cores=4, ram_bytes=gib // 2) == 1
    assert parallel_jobs(Settings(jobs={"parallel": 7}), cores=1, ram_bytes=gib // 2) == 7
    # a batch running and the next one waiting; 2 at one job at a time, as before
    assert link_config(Settings(), None, parallel=1).receive_maximum == 2
    assert link_config(Settings(), None, parallel=4).receive_maximum == 8
    # never more than the queue takes: the broker's extra jobs would be refused
    small = Settings(jobs={"parallel": 32, "max_queue": 4})
    assert link_config(small, None, parallel=32).receive_maximum == 36
    mine = Settings(mqtt={"receive_maximum": 3})
    assert link_config(mine, None, parallel=4).receive_maximum == 3
