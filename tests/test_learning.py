"""Profiles that learn from labeled rows (issue 22, docs/profiles.md): the pure decisions
(folds, layer choice, warnings, reports), the head, the rows file's checks, and on the real
bundled models the layer tap, learning, the learned path of a job, the cache bound to the
model file, and an agent that learns at start, reports its figures and answers from them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from edge_agent.adapters import head as heads
from edge_agent.adapters.settings import load_settings
from edge_agent.core.errors import ConfigError
from edge_agent.core.learning import (
    MIN_ROWS_PER_LABEL,
    bag,
    candidate_layers,
    choose_layer,
    classify_report,
    folds_for,
    nearest,
    warnings_for,
)
from edge_agent.core.prompt import classify_plan
from edge_agent.core.protocol import Delivery, JobLimits, Profile, Topics, parse_job
from edge_agent.service.learning import learn, read_profile_rows, with_rows
from edge_agent.service.rows import file_sha256, load_rows
from edge_agent.service.runner import JobRunner
from tests.harness.clients import EVAL_DIR, eval_rows, reply_for

SSH = "loghub_openssh_classify.jsonl"


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the pure decisions -------------------------------------------------------------------


def test_folds_are_stratified_and_a_single_row_is_never_held_out() -> None:
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    folds = folds_for(labels, 5)
    assert folds[-1] == -1  # `c` has one row: always learned from, never scored
    for label, count in (("a", 10), ("b", 5)):
        got = Counter(f for f, x in zip(folds, labels, strict=True) if x == label)
        assert sorted(got) == [0, 1, 2, 3, 4]
        assert set(got.values()) == {count // 5}, label
    # fewer rows per label than folds: as many folds as the largest label has rows
    assert sorted(set(folds_for(["a", "a", "b", "b"], 5))) == [0, 1]


def test_candidate_layers_and_the_margin_rule() -> None:
    assert candidate_layers(30) == (7, 11, 14, 18, 22, 25, 29)  # SmolLM2-135M
    assert candidate_layers(18)[-1] == 17  # Gemma-3-270M: the last layer is always there
    assert candidate_layers(1) == (0,)
    # the last layer, unless another reads the rows at least LAYER_MARGIN better
    assert choose_layer({7: 0.60, 22: 0.69, 29: 0.60}) == 29
    assert choose_layer({7: 0.60, 22: 0.70, 29: 0.60}) == 22
    assert choose_layer({7: 0.95, 22: 0.95, 29: 0.80}) == 22  # of equals, the deeper


def test_warnings_name_a_missing_and_a_thin_label() -> None:
    labels = ["ok"] * MIN_ROWS_PER_LABEL + ["bad"] * 2
    found = warnings_for(["ok", "bad", "ugly"], labels)
    assert any("'ugly' never appears" in w for w in found), found
    assert any("'bad' has 2 rows" in w for w in found), found
    assert not any("'ok'" in w for w in found), found


def test_a_classify_report_counts_per_label_and_the_sure_answers() -> None:
    labels = ["a", "a", "b", "b"]
    held = {0: ("a", 0.9), 1: ("b", 0.6), 2: ("b", 0.95), 3: ("a", 0.8)}
    report = classify_report(["a", "b"], labels, held, 2, "head")
    assert report.accuracy == 0.5
    assert report.per["a"].right == 1 and report.per["b"].right == 1
    assert report.sure == 3  # 0.9, 0.95, 0.8
    assert report.sure_right == pytest.approx(2 / 3)
    body = report.to_dict()
    assert body["per_label"]["a"] == {"rows": 2, "cv_accuracy": 0.5}
    assert json.loads(json.dumps(body)) == body


def test_nearest_rows_share_the_most_tokens() -> None:
    bags = [bag([1, 2, 3, 4]), bag([9, 9, 8]), bag([1, 2, 3, 5])]
    assert nearest(bag([1, 2, 3, 4]), bags, 2) == [0, 2]
    assert nearest(bag([1, 2, 3, 4]), bags, 2, skip=0)[0] == 2


# --- the head -----------------------------------------------------------------------------


def test_a_head_learns_separable_rows_keeps_its_layer_and_reloads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = ["x", "y", "z"]
    centres = rng.normal(0, 1, (3, 16))
    labels = [names[i % 3] for i in range(60)]
    vectors = np.array([centres[i % 3] + rng.normal(0, 0.3, 16) for i in range(60)])
    assert heads.cv_accuracy(vectors, labels, names, folds_for(labels)) >= 0.95
    head = heads.fit(vectors, labels, names).reading(5).calibrated(2.0)
    raw, calibrated = head.predict(vectors[0])
    assert max(raw, key=raw.__getitem__) == "x"
    assert calibrated["x"] < raw["x"]  # a temperature above 1 softens
    heads.save(head, tmp_path / "h.npz")
    again = heads.load(tmp_path / "h.npz")
    assert again is not None
    assert (again.layer, again.temperature, again.labels) == (5, 2.0, tuple(names))
    assert again.predict(vectors[7]) == head.predict(vectors[7])
    (tmp_path / "bad.npz").write_bytes(b"not a head")
    assert heads.load(tmp_path / "bad.npz") is None
    assert heads.load(tmp_path / "missing.npz") is None


def test_calibration_softens_an_overconfident_head() -> None:
    # logits that say 99% and are right 60% of the time: the fitted temperature is > 1
    logits = [np.array([5.0, 0.0]) for _ in range(10)]
    answers = [0] * 6 + [1] * 4
    t = heads.temperature(logits, answers)
    assert t > 1.0
    assert heads.probabilities(logits[0], t)[0] == pytest.approx(0.6, abs=0.05)


# --- the rows file's checks ---------------------------------------------------------------


def test_a_row_that_does_not_parse_names_the_file_and_the_line(tmp_path: Path) -> None:
    good = {"text": "x", "labels": ["a", "b"], "label": "a"}
    cases = [
        ("{not json", "not JSON"),
        (json.dumps({"labels": ["a"], "label": "a"}), "`text`"),
        (json.dumps({"text": "x", "labels": ["a"], "label": "b"}), "`labels`"),
        (json.dumps({"text": "x", "label": "a"}), "neither a classify row"),
        (json.dumps({**good, "split": "train"}), "split"),
    ]
    for line, message in cases:
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(ConfigError) as err:
            load_rows(path)
        assert f"{path}:3:" in str(err.value) and message in str(err.value), err.value


def settings_for(tmp_path: Path, profile: str) -> Any:
    path = tmp_path / "c.toml"
    path.write_text(profile)
    return load_settings(path)


def profiles_of(settings: Any) -> dict[str, Profile]:
    from edge_agent.service.app import configured_profiles

    return configured_profiles(settings)


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"text": "x", "labels": ["ok", "odd"], "label": "odd"}], "", "label 'odd' is not one"),
        ([{"text": "x", "fields": {"a": "string"}, "expected": {"a": "1"}}], "", "extract row"),
        ([{"text": "x", "labels": ["ok", "bad"], "label": "ok"}] * 3, "", "more than"),
        ([{"text": "x", "labels": ["ok", "bad"], "label": "ok"}], f'rows_sha256 = "{"0" * 64}"', "pinned"),
    ],
)  # fmt: skip
def test_a_profiles_rows_are_checked_against_it(
    tmp_path: Path, rows: list[dict[str, Any]], extra: str, message: str
) -> None:
    path = write_rows(tmp_path / "rows.jsonl", rows)
    settings = settings_for(
        tmp_path,
        f'[jobs]\nmax_learned_rows = 2\n[profiles.p]\nkind = "classify"\n'
        f'labels = ["ok", "bad"]\nrows = "{path}"\n{extra}\n',
    )
    with pytest.raises(ConfigError) as err:
        read_profile_rows(settings, profiles_of(settings))
    assert message in str(err.value), err.value


def test_an_extract_rows_expected_must_keep_to_its_schema(tmp_path: Path) -> None:
    fields = {"temp": "number"}
    path = write_rows(
        tmp_path / "rows.jsonl",
        [
            {"text": "t 4", "fields": fields, "expected": {"temp": 4}},
            {"text": "t x", "fields": fields, "expected": {"temp": "warm"}},
        ],
    )
    settings = settings_for(tmp_path, f'[profiles.p]\nkind = "extract"\nrows = "{path}"\n')
    with pytest.raises(ConfigError, match=rf"{path}:2: `expected`"):
        read_profile_rows(settings, profiles_of(settings))


def test_a_classify_profiles_labels_come_from_its_rows(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "labels": ["up", "down"], "label": "up"} for i in range(3)]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    settings = settings_for(tmp_path, f'[profiles.p]\nkind = "classify"\nrows = "{path}"\n')
    configured = profiles_of(settings)
    found = read_profile_rows(settings, configured)
    assert found["p"].sha256 == file_sha256(path)
    assert with_rows(configured, found)["p"].labels == ("up", "down")


def test_a_rows_file_with_a_bad_line_stops_the_agent_with_exit_78(tmp_path: Path) -> None:
    good = {"text": "sshd: session opened", "labels": ["ok", "bad"], "label": "ok"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{broken\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[profiles.ssh]\nkind = "classify"\nrows = "{path}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config),
         "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert f"{path}:3" in result.stderr, result.stderr
    # `edge-agent config` (what the Ansible role validates a staged config.toml with) too
    checked = subprocess.run(
        [sys.executable, "-m", "edge_agent", "config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 78 and f"{path}:3" in checked.stderr, checked.stderr


# --- on the real model --------------------------------------------------------------------


def job_of(body: dict[str, Any], profiles: dict[str, Profile]) -> Any:
    body = {"id": "t", **body}
    delivery = Delivery(f"t/jobs/{body['kind']}", json.dumps(body).encode(), time.time())
    return parse_job(delivery, Topics("t", "t", "t"), JobLimits(), profiles)


def drain(reading: Any) -> Any:
    """Run a generator to its end and give what it returns."""
    while True:
        try:
            next(reading)
        except StopIteration as done:
            return done.value


@pytest.mark.model
def test_the_tap_reads_the_same_with_prefixes_kept_as_fresh(smollm2: Any) -> None:
    """Jobs of two learned profiles alternate: each profile's prefix stays evaluated in a
    sequence of its own, and a read that reuses it gives what a fresh context gives."""
    from edge_agent.adapters.engine.tap import CHUNK, PREFIXES, LayerTap

    plans = [classify_plan(labels, None, ()) for labels in (("ok", "bad"), ("up", "down", "gone"))]  # fmt: skip
    texts = ("disk full on /var", "fan ok", "link to gw-2 lost")

    def new_tap() -> LayerTap:
        return LayerTap(smollm2._ctx.tap(512, 2, CHUNK, 1 + PREFIXES))

    kept = new_tap()
    try:
        reads = []
        for plan, text in [(plans[0], texts[0]), (plans[1], texts[1]), (plans[0], texts[2]), (plans[1], texts[0])]:  # fmt: skip
            reads.append(drain(kept.read(*smollm2.job_tokens(plan, text), (7, 29))))
        assert len(kept._prefixes) == 2  # both prefixes kept
        for i, (plan, text) in enumerate([(plans[0], texts[2]), (plans[1], texts[0])], start=2):
            fresh = new_tap()
            try:
                want = drain(fresh.read(*smollm2.job_tokens(plan, text), (7, 29)))
            finally:
                fresh.close()
            for layer in (7, 29):
                assert np.allclose(reads[i][layer], want[layer], atol=1e-3), (i, layer)
        assert not np.allclose(reads[2][7], reads[2][29])  # two layers, two readings
    finally:
        kept.close()


@pytest.mark.model
@pytest.mark.timeout(900)  # about 30 s quiet; over 300 s beside a CPU hog
def test_a_profile_learns_answers_what_zero_shot_gets_wrong_and_is_bound_to_the_model(
    smollm2: Any, gemma: Any, tmp_path: Path
) -> None:
    """Learn from four folds of the OpenSSH rows; the fifth, never seen, is answered by the
    learned head (the job path: runner.begin → the tap → the head) far better than by
    zero-shot label scoring. The cache is keyed by the model file: another model learns
    anew."""
    rows = eval_rows(SSH)
    labels = [r["label"] for r in rows]
    folds = folds_for(labels)
    train = [r for r, f in zip(rows, folds, strict=True) if f != 0]
    held = [r for r, f in zip(rows, folds, strict=True) if f == 0]
    path = write_rows(tmp_path / "ssh.jsonl", train)
    settings = settings_for(tmp_path, f'[profiles.ssh]\nkind = "classify"\nrows = "{path}"\n')
    configured = profiles_of(settings)
    found = read_profile_rows(settings, configured)
    profiles = with_rows(configured, found)
    cache = tmp_path / "learned"

    def learn_with(engine: Any, sha: str, rows: Any = found) -> tuple[Any, list[dict[str, Any]]]:
        with structlog.testing.capture_logs() as logs:
            got = learn(rows, profiles, engine, engine.tokens, engine.facts.n_layer, sha, cache)
        return got["ssh"], logs

    learned, logs = learn_with(smollm2, "a" * 64)
    assert [e["event"] for e in logs if e["event"].startswith("profile.")] == ["profile.learned"]
    report = learned.report.to_dict()
    assert report["cv_accuracy"] >= 0.9, report
    assert set(report["per_label"]) == set(rows[0]["labels"])
    assert report["warnings"] == []
    learned_runner = JobRunner(smollm2, learned={"ssh": learned}, tokens=smollm2.tokens)
    scoring = JobRunner(smollm2)
    right = {"learned": 0, "zero-shot": 0}
    fixed = []
    for row in held:
        got = learned_runner.run(job_of({"kind": "classify", "profile": "ssh", "text": row["text"]}, profiles), lambda: False).result.model_dump(exclude_none=True)  # fmt: skip
        zero = scoring.run(job_of({"kind": "classify", "text": row["text"], "labels": row["labels"]}, {}), lambda: False).result.model_dump(exclude_none=True)  # fmt: skip
        assert "raw_scores" in got and 0.0 <= got["confidence"] <= 1.0
        right["learned"] += got["label"] == row["label"]
        right["zero-shot"] += zero["label"] == row["label"]
        if got["label"] == row["label"] != zero["label"]:
            fixed.append(row["text"])
    assert fixed, right  # a held-out row zero-shot scoring gets wrong, the profile right
    assert right["learned"] >= 0.9 * len(held), right
    assert right["learned"] > right["zero-shot"], right

    again, logs = learn_with(smollm2, "a" * 64)
    assert "profile.reused" in [e["event"] for e in logs]
    assert again.head is not None and learned.head is not None
    assert np.array_equal(again.head.weights, learned.head.weights)

    # another model file learns anew (two rows a label show it, in a third of the time)
    few: list[dict[str, Any]] = []
    for row in train:
        if sum(r["label"] == row["label"] for r in few) < 2:
            few.append(row)
    path = write_rows(tmp_path / "ssh-few.jsonl", few)
    settings = settings_for(tmp_path, f'[profiles.ssh]\nkind = "classify"\nrows = "{path}"\n')
    other, logs = learn_with(gemma, "b" * 64, read_profile_rows(settings, profiles_of(settings)))
    assert "profile.reused" not in [e["event"] for e in logs]
    assert other.head is not None
    assert other.head.mean.shape != learned.head.mean.shape  # 640 numbers, not 576
    assert len(list(cache.glob("ssh-*.npz"))) == 2


@pytest.mark.model
@pytest.mark.timeout(900)
def test_an_agent_learns_its_profiles_rows_reports_them_and_answers_from_them(
    start_agent: Any, requester: Any, prefix: str, tmp_path: Path
) -> None:
    ssh = eval_rows(SSH)
    held = ssh[::7]
    # every other row of the rest: 60 rows, 10 a label, learned in half the time of 120
    # (cross-validated 1.0 either way)
    train = [r for r in ssh if r not in held][::2]
    sensor = [r for r in eval_rows("sensor_extract.jsonl") if "metric" in r["fields"]]
    rows = write_rows(tmp_path / "ssh.jsonl", train)
    extract = write_rows(tmp_path / "readings.jsonl", sensor[2:])
    config = tmp_path / "c.toml"
    config.write_text(
        f'[profiles.ssh]\nkind = "classify"\nrows = "{rows}"\n'
        f'rows_sha256 = "{file_sha256(rows)}"\n'
        f'[profiles.readings]\nkind = "extract"\nrows = "{extract}"\n'
    )
    # learning 120 rows took ~40 s on 2 quiet cores and 105 s beside a CPU hog (these 60
    # and the readings, ~20 s quiet): the wait ends when the agent is up, so its bound is
    # for a busy machine
    agent = start_agent(extra_args=["--config", str(config)], timeout=600)
    learned = [e for e in agent.log_events() if e.get("event") == "profile.learned"]
    assert {e["profile"] for e in learned} == {"ssh", "readings"}, learned
    requester.subscribe(f"{prefix}/devices/{agent.device_id}/info")
    msg = requester.wait_for(lambda m: m.topic.endswith("/info"), 10)
    assert msg is not None
    capabilities = json.loads(msg.payload)["capabilities"]
    profiles = capabilities["profiles"]
    assert capabilities["profiles_tap_bytes"] > 1_000_000  # its KV cache: MBs, counted
    assert profiles["ssh"]["cv_accuracy"] >= 0.9 and profiles["ssh"]["rows"] == len(train)
    assert set(profiles["ssh"]["per_label"]) == set(ssh[0]["labels"])
    assert set(profiles["readings"]["per_field"]) == set(sensor[0]["expected"])
    reply_topic = f"{prefix}/replies/learn"
    requester.subscribe(reply_topic)
    answers = []
    for start in range(0, len(held), 4):  # a few at a time: the queue's bound is not tested here
        for i in range(start, min(start + 4, len(held))):
            job = {"id": f"l{i}", "profile": "ssh", "text": held[i]["text"]}
            requester.publish(
                f"{prefix}/jobs/classify", json.dumps(job).encode(), response_topic=reply_topic
            )
        answers += [reply_for(requester, f"l{i}") for i in range(start, min(start + 4, len(held)))]
    assert all(a["status"] == "done" for a in answers), [a for a in answers if a["status"] != "done"]  # fmt: skip
    right = sum(a["result"]["label"] == r["label"] for a, r in zip(answers, held, strict=True))
    assert right >= len(held) - 1, [a["result"] for a in answers]
    # each job gets its own nearest rows as examples, yet the profile is one job shape: a
    # burst of more than jobs.new_shapes_burst (4) from one sensor is not refused
    for i in range(6):
        job = {"id": f"x{i}", "profile": "readings", "text": sensor[i % 2]["text"]}
        requester.publish(
            f"{prefix}/jobs/extract", json.dumps(job).encode(), response_topic=reply_topic
        )
    for i in range(6):
        got = reply_for(requester, f"x{i}")
        assert got["status"] == "done", got
        assert set(got["result"]["data"]) == set(sensor[0]["expected"]), got
        if i % 2 == 0:  # TS-1's reading: the learned examples teach every field of it
            assert got["result"]["data"] == sensor[0]["expected"], got


def test_the_eval_rows_readme_counts_match_the_files() -> None:
    readme = (EVAL_DIR / "README.md").read_text()
    for path in sorted(EVAL_DIR.glob("*.jsonl")):
        count = len(load_rows(path))
        assert f"| {path.name} | {count} |" in readme, (path.name, count)
