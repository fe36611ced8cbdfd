"""A cell's identity is its canonical configuration: one spelling of a budget, every method option
with its default filled in by the harness; how it is measured is stored beside it, and a sweep that
asks for more measurement than a record has measures it again."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from harness.budget import parse_budget
from harness.config import load_config
from harness.plan import Machine, Measurement, Plan, cell_id, remeasure_reasons
from harness.registry import get_method_class, make_method, method_names

TOML = """
[run]
results_dir = "{results}"
device = "cpu"
dtype = "fp32"
limit = 8
batch_size = 4
throughput_batch_size = 1
throughput_warmup = 0
throughput_repeats = {repeats}
throughput_latency = false
flops = false
[suites.default]
models = ["tiny"]
methods = {methods}
budgets = {budgets}
[models.tiny]
timm = "deit_tiny_patch16_224"
weights = "random"
data = "synthetic"
{extra}
"""
MACHINE = Machine(dtype="fp32", device_name="cpu (pinned)", throughput_batch_size=1)


def _config(tmp_path, methods=("tome",), budgets=("0.7",), repeats=1, extra=""):
    path = tmp_path / "benchmark.toml"
    path.write_text(TOML.format(results=tmp_path / "r", methods=json.dumps(list(methods)),
                                budgets=json.dumps(list(budgets)), repeats=repeats, extra=extra))
    return load_config(path)


def _ids(tmp_path, **kw) -> dict:
    plan = Plan(_config(tmp_path, **kw), None)
    return {(c.method, c.budget_text): cell_id(plan.cell_key(c, None, MACHINE)) for c in plan.cells}


@pytest.mark.parametrize("spellings, canonical", [(["0.7", "0.70", "7e-1", " 0.700 "], "0.7"),
                                                  (["gmacs=2.9", "gmacs=2.90", "gmacs = 29e-1"], "gmacs=2.9"),
                                                  (["r=13", "r=13.0", "r = 13"], "r=13"), (["1", "1.0"], "1")])
def test_a_budget_has_one_spelling(spellings, canonical):
    assert {parse_budget(s).text for s in spellings} == {canonical}


def test_one_budget_written_twice_plans_one_cell(tmp_path):
    ids = _ids(tmp_path, methods=["tome"], budgets=["0.7", "0.70", "7e-1"])
    assert list(ids) == [("tome", "0.7")]
    assert ids == _ids(tmp_path, methods=["tome"], budgets=["0.7"])


@pytest.mark.parametrize("name", method_names())
def test_every_option_has_a_default_the_harness_fills_in(name):
    cls = get_method_class(name)
    defaults = cls.option_defaults()
    assert set(cls.option_names()) == set(defaults), f"{name}: options without a declared default"
    method = make_method(name)
    assert {k: getattr(method.options, k) for k in defaults} == defaults  # filled before the method reads them
    explicit = make_method(name, {name: dict(defaults)})
    assert explicit.identity_options() == method.identity_options()


@pytest.mark.parametrize("extra", ["[methods.tome]\nprop_attn = true\ninflection = 0",
                                   "[methods.tome]\nr_list = []\n[methods.random]\nseed = 0"])
def test_writing_a_default_keeps_the_id(tmp_path, extra):
    methods, budgets = ["none", "tome", "random@tome"], ["0.7", "r=4"]
    plain = _ids(tmp_path, methods=methods, budgets=budgets)
    if "r_list = []" in extra:  # an empty r_list is not tome's default (None): a new configuration
        assert _ids(tmp_path, methods=methods, budgets=budgets, extra=extra)[("tome", "0.7")] != plain[("tome", "0.7")]
    else:
        assert _ids(tmp_path, methods=methods, budgets=budgets, extra=extra) == plain


def test_a_non_default_option_is_a_new_id(tmp_path):
    plain = _ids(tmp_path, methods=["tome", "evit"])
    changed = _ids(tmp_path, methods=["tome", "evit"], extra="[methods.tome]\nprop_attn = false\n[methods.evit]\nfuse = false")
    assert set(plain.values()).isdisjoint(changed.values())


@pytest.mark.parametrize("name, option, other", [("tome", "prop_attn", False), ("evit", "fuse", False),
                                                 ("random", "seed", 1), ("atc", "linkage", "single")])
def test_a_default_changed_in_code_is_a_new_id(monkeypatch, name, option, other):
    """ToMe and EViT hashed {} for their defaults; a default changed in code must not reuse their records."""
    before = make_method(name).identity_options()
    cls = get_method_class(name)
    hints = typing.get_type_hints(cls.Options)
    changed = [(f.name, hints[f.name], dataclasses.field(default=other if f.name == option else f.default))
               for f in dataclasses.fields(cls.Options)]
    monkeypatch.setattr(cls, "Options", dataclasses.make_dataclass("Options", changed, frozen=True))
    after = make_method(name)
    assert getattr(after.options, option) == other  # the code runs the new default ...
    assert after.identity_options() != before  # ... under a new id


def test_ids_stored_before_defaults_were_filled_stay():
    """ToMe, EViT and Top-K at their defaults hash the ``{}`` they always did (results/reference)."""
    assert [make_method(n).identity_options() for n in ("tome", "evit", "topk")] == [{}, {}, {}]
    assert make_method("random@tome").identity_options() == {"random": {"seed": 0}, "tome": {}}
    assert make_method("tome", {"tome": {"prop_attn": False}}).identity_options() == {"prop_attn": False}


# --- measurement: stored beside the id, measured again when more is asked --------------------------

ASKED = Measurement(warmup=2, repeats=5, latency=True, end_to_end=False, decode_threads=8, flops=True, flops_images=8)


def test_a_record_measured_as_asked_is_done():
    rec = {"status": "ok", "measurement": ASKED.as_record()}
    assert remeasure_reasons(rec, ASKED) == []
    more = {"status": "ok", "measurement": {**ASKED.as_record(), "repeats": 30, "end_to_end": True}}
    assert remeasure_reasons(more, ASKED) == []  # more than asked is as good
    assert remeasure_reasons({"status": "skipped"}, ASKED) == []  # nothing was measured


@pytest.mark.parametrize("change, words", [({"repeats": 7}, "5 timing rounds stored, 7 asked"),
                                           ({"warmup": 10}, "2 warm-up calls stored, 10 asked"),
                                           ({"end_to_end": True}, "no end-to-end throughput stored"),
                                           ({"flops_images": 16}, "fvcore count over 8 images stored, 16 asked")])
def test_a_record_measured_less_than_asked_is_measured_again(change, words):
    rec = {"status": "ok", "measurement": ASKED.as_record()}
    asked = Measurement(**{**ASKED.as_record(), **change})
    assert words in "; ".join(remeasure_reasons(rec, asked))


def test_records_from_before_measurement_was_stored_are_read():
    """The reference records (no ``measurement``) satisfy the CPU defaults they were measured with."""
    from harness.paths import PROJECT_ROOT

    paths = sorted((PROJECT_ROOT / "results" / "reference" / "records").glob("*.json"))
    if not paths:
        pytest.skip("no reference records")
    records = [json.loads(p.read_text()) for p in paths]
    assert all(remeasure_reasons(r, ASKED) == [] for r in records)
    asked = Measurement(**{**ASKED.as_record(), "repeats": 30})
    assert all(remeasure_reasons(r, asked) for r in records if r["status"] == "ok")


def test_repeats_1_then_7_measures_again(tmp_path):
    from harness.runner import Sweep

    lines = []
    first = Sweep(_config(tmp_path, methods=["none"], repeats=1), progress=lines.append).execute()
    assert len(first) == 1 and first[0]["throughput_repeats"] == 1 and first[0]["measurement"]["repeats"] == 1
    again = Sweep(_config(tmp_path, methods=["none"], repeats=1), progress=lines.append).execute()
    assert again == [] and "1 cells, 1 already done, 0 to run" in lines
    lines.clear()
    second = Sweep(_config(tmp_path, methods=["none"], repeats=7), progress=lines.append).execute()
    assert [r["cell_id"] for r in second] == [first[0]["cell_id"]]  # the same cell, measured again
    assert second[0]["throughput_repeats"] == 7
    text = "\n".join(lines)
    assert "1 to run (1 of them stored with less measurement than asked: measured again)" in text
    assert "1 timing rounds stored, 7 asked" in text
    records = list((tmp_path / "r" / "records").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["throughput_repeats"] == 7
    assert Sweep(_config(tmp_path, methods=["none"], repeats=3), progress=lines.append).todo() == []


def test_the_compile_backend_is_part_of_a_compiled_cell(tmp_path):
    def ids(extra):
        path = tmp_path / "benchmark.toml"
        text = TOML.format(results=tmp_path / "r", methods='["tome"]', budgets='["0.7"]', repeats=1, extra="")
        path.write_text(text.replace("[suites.default]", extra + "\n[suites.default]"))
        plan = Plan(load_config(path), None)
        return {cell_id(plan.cell_key(c, None, MACHINE)) for c in plan.cells}

    plain = ids("")
    assert ids('compile_backend = "aot_eager"') == plain  # not compiled: the backend runs nothing
    compiled = ids("compile = true")
    assert compiled != plain and ids('compile = true\ncompile_backend = "aot_eager"') != compiled
