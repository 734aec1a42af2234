"""models.lock and the selection policy: pure functions of the board's facts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_agent.adapters.store import load_lock
from edge_agent.core.catalog import (
    DEFAULT_MODEL,
    GIB,
    MIB,
    Catalog,
    Policy,
    Runtime,
    budget,
    estimate,
    parse_size,
    quality_prior,
    select,
)
from edge_agent.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LOCK = load_lock(ROOT / "models.lock")

FAMILIES = (
    "SmolLM2-135M-Instruct",
    "SmolLM2-360M-Instruct",
    "SmolLM2-1.7B-Instruct",
    "Gemma-3-1B-it",
    "Phi-4-mini-instruct",
)
QUANTS = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


@pytest.mark.parametrize(
    ("ram", "model", "quants"),
    [
        ("512M", "SmolLM2-135M-Instruct", {"Q8_0", "Q6_K"}),
        ("1G", "SmolLM2-360M-Instruct", {"Q6_K", "Q8_0"}),
        ("2G", "Gemma-3-1B-it", {"Q5_K_M", "Q6_K", "Q8_0"}),
        ("4G", "Phi-4-mini-instruct", {"Q3_K_M"}),
        ("8G", "Phi-4-mini-instruct", {"Q5_K_M", "Q6_K"}),
        ("16G", "Phi-4-mini-instruct", {"Q8_0"}),
        ("64G", "Phi-4-mini-instruct", {"Q8_0"}),
    ],
)
def test_default_choices_follow_the_deployment_table(
    ram: str, model: str, quants: set[str]
) -> None:
    chosen = select(LOCK, parse_size(ram), None, Policy()).selected
    assert chosen.entry.model == model
    assert chosen.entry.quant in quants
    assert chosen.fits


def test_the_lock_covers_every_family_and_quant() -> None:
    found = {(e.model, e.quant) for e in LOCK.entries}
    for model in FAMILIES:
        for quant in QUANTS:
            assert (model, quant) in found, (model, quant)
    bundled = [e for e in LOCK.entries if e.bundled is not None]
    assert {e.name for e in bundled} == {DEFAULT_MODEL, "gemma-3-270m-q4_k_m"}
    assert all(e.sha256 and e.size for e in bundled)


def test_every_quality_prior_follows_the_formula() -> None:
    for entry in LOCK.entries:
        assert entry.quality == quality_prior(entry.base_score, entry.quant, entry.params), (
            entry.name
        )


def test_unpinned_entries_say_so() -> None:
    for entry in LOCK.entries:
        if entry.sha256 is None:
            assert entry.notes and "not obtainable here" in entry.notes, entry.name
        assert entry.url or entry.bundled, entry.name
        assert entry.size or entry.approx_size, entry.name


def test_estimate_terms() -> None:
    entry = LOCK.get("phi-4-mini-instruct-q4_k_m")
    assert entry is not None
    est = estimate(entry, Policy().runtime)
    assert est.weights == entry.size
    # f16 (the default): 2 x 32 layers x 8 KV heads x 128 x 2 bytes per token; q8_0 34/64 of it
    assert est.kv_cache == 131072 * 2048
    q8 = estimate(entry, Runtime(kv_cache_type="q8_0"))
    assert q8.kv_cache == 131072 * 2048 * 34 // 64
    assert est.compute >= entry.n_vocab * 128 * 4
    assert est.total == est.weights + est.kv_cache + est.compute + est.outputs + est.agent


def test_cgroup_limit_is_the_budget_when_lower() -> None:
    assert budget(8 * GIB, 1 * GIB, Policy()) == 1 * GIB
    chosen = select(LOCK, 16 * GIB, 1 * GIB, Policy()).selected
    assert chosen.estimate.total <= 1 * GIB
    assert (chosen.entry.model, chosen.entry.quant) == ("Gemma-3-1B-it", "Q3_K_M")


def test_excluded_family_is_never_chosen() -> None:
    chosen = select(LOCK, 8 * GIB, None, Policy(exclude_families=("phi-4-mini",))).selected
    assert chosen.entry.family != "phi-4-mini"
    assert chosen.entry.model == "Gemma-3-1B-it"


def test_speed_floor_prefers_a_faster_model() -> None:
    chosen = select(LOCK, 8 * GIB, None, Policy(min_tokens_per_second=5.0)).selected
    assert (chosen.entry.pi5_tokens_per_second or 0) >= 5.0
    assert chosen.entry.family != "phi-4-mini"


def test_pin_wins_and_the_bundled_default_stays_the_safety_net() -> None:
    selection = select(LOCK, 8 * GIB, None, Policy(pin="gemma-3-1b-it-q4_k_m"))
    assert selection.selected.entry.name == "gemma-3-1b-it-q4_k_m"
    assert [c.entry.name for c in selection.ranked] == ["gemma-3-1b-it-q4_k_m", DEFAULT_MODEL]


def test_nothing_fits_falls_back_to_the_bundled_default() -> None:
    selection = select(LOCK, 300 * MIB, None, Policy())
    assert selection.selected.entry.name == DEFAULT_MODEL
    assert selection.selected.reason.startswith("last resort")


def test_bundled_default_closes_every_chain() -> None:
    for ram in (1 * GIB, 4 * GIB, 32 * GIB):
        assert select(LOCK, ram, None, Policy()).ranked[-1].entry.name == DEFAULT_MODEL


def test_json_form_has_what_ansible_reads() -> None:
    body = select(LOCK, 4 * GIB, None, Policy()).to_dict()
    for key in ("family", "name", "quant", "file", "estimate_bytes"):
        assert key in body["selected"]
    assert len(body["candidates"]) == len(LOCK.entries)
    json.dumps(body)


@settings(max_examples=300, deadline=None)
@given(st.integers(128 * MIB, 128 * GIB), st.one_of(st.none(), st.integers(64 * MIB, 64 * GIB)))
def test_the_choice_never_exceeds_the_budget(ram: int, cgroup: int | None) -> None:
    selection = select(LOCK, ram, cgroup, Policy())
    chosen = selection.selected
    if not chosen.reason.startswith("last resort"):
        assert chosen.estimate.total <= selection.budget_bytes


@settings(max_examples=300, deadline=None)
@given(st.integers(128 * MIB, 96 * GIB), st.integers(1, 32 * GIB))
def test_more_ram_never_picks_a_worse_model(ram: int, extra: int) -> None:
    small = select(LOCK, ram, None, Policy()).selected
    large = select(LOCK, ram + extra, None, Policy()).selected
    # Below ~230 MiB of budget nothing fits and the bundled default runs regardless: the
    # property is about real choices.
    assume(small.fits and not small.reason.startswith("last resort"))
    assert large.entry.quality >= small.entry.quality


def test_sizes_parse() -> None:
    assert parse_size("4G") == 4 * GIB
    assert parse_size("512M") == 512 * MIB
    assert parse_size("1.5GiB") == int(1.5 * GIB)
    assert parse_size("2048") == 2048 * MIB


def test_a_bad_lock_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "models.lock"
    path.write_text(json.dumps({"version": 1, "models": [{"name": "x"}]}))
    with pytest.raises(ConfigError, match=r"models\.0\."):
        load_lock(path)
    dup = json.loads((ROOT / "models.lock").read_text())
    dup["models"].append(dup["models"][0])
    path.write_text(json.dumps(dup))
    with pytest.raises(ConfigError, match="duplicate"):
        load_lock(path)


def test_catalog_replace_keeps_order() -> None:
    entry = LOCK.entries[3].model_copy(update={"sha256": "0" * 64})
    replaced = LOCK.replace(entry)
    assert isinstance(replaced, Catalog)
    assert [e.name for e in replaced.entries] == [e.name for e in LOCK.entries]
    assert replaced.entries[3].sha256 == "0" * 64


def test_measured_speed_beats_the_lock_figure() -> None:
    fast_enough = Policy(min_tokens_per_second=3.0)
    assert select(LOCK, 8 * GIB, None, fast_enough).selected.entry.family == "phi-4-mini"
    measured = Policy(
        min_tokens_per_second=3.0,
        measured_speeds={
            "phi-4-mini-instruct-q6_k": 1.1,
            "phi-4-mini-instruct-q5_k_m": 1.2,
            "phi-4-mini-instruct-q4_k_m": 1.5,
            "phi-4-mini-instruct-q3_k_m": 1.9,
        },
    )
    chosen = select(LOCK, 8 * GIB, None, measured)
    assert chosen.selected.entry.family != "phi-4-mini"
    assert "measured here" in next(
        c.reason for c in chosen.candidates if c.entry.name == "phi-4-mini-instruct-q6_k"
    )


def test_a_q8_0_kv_cache_leaves_room_for_a_better_quant_under_a_tight_limit() -> None:
    q8 = Policy(runtime=Runtime(kv_cache_type="q8_0"))
    chosen = select(LOCK, 16 * GIB, 1 * GIB, q8).selected
    assert (chosen.entry.model, chosen.entry.quant) == ("Gemma-3-1B-it", "Q4_K_M")
