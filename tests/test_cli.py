"""Bad input gets one clear line and exit code 2; good input stores records and a report."""
import json

import pytest

from harness.cli import _parser, main


@pytest.fixture(autouse=True)
def _cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_ls_methods_lists_knobs(capsys):
    code, out, _ = _run(capsys, "ls", "methods")
    assert code == 0
    assert any(l.startswith("none") for l in out.splitlines())
    assert "keep_rate" in out


def test_ls_methods_imports_no_method_and_no_torch():
    """The listing reads the methods' sources: neither torch nor a method module is imported."""
    import subprocess
    import sys

    code = ("import sys; from harness.cli import main; main(['ls', 'methods']); "
            "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('harness.methods.')]; "
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tome " in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "randon"], "did you mean 'random'"),
    (["--budgets", "1.5"], "out of range"),
    (["--budgets", "-1"], "out of range"),
    (["--budgets", "r=13", "--methods", "random"], "no selected method has knob 'r'"),
    (["--data-root", "/nonexistent/place"], "/nonexistent/place"),
    (["--device", "cuda:7"] , "cuda"),
    (["--budgets", "0.7,,0.5"], "--budgets '0.7,,0.5' has an empty item"),
    (["--methods", "none,"], "--methods 'none,' has an empty item"),
])
def test_bad_input_exit_2(capsys, tmp_path, shared, argv, needle):
    stored = _store_one(tmp_path / "r")
    code, _, err = _run(capsys, "run", "--results", str(tmp_path / "r"), *argv)
    assert code == 2
    assert needle in _one_line_error(err)
    assert {p.name: p.read_text() for p in (tmp_path / "r/records").glob("*.json")} == stored  # nothing lost


def _store_one(results) -> dict:
    import shutil
    from pathlib import Path

    (results / "records").mkdir(parents=True)
    src = next((Path(__file__).parent / "fixtures/schema_v1").glob("*.json"))
    shutil.copy(src, results / "records" / src.name)
    return {p.name: p.read_text() for p in (results / "records").glob("*.json")}


def test_unknown_data_source(capsys, tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text('[suites.default]\nmodels = ["m"]\n[models.m]\ntimm = "deit_tiny_patch16_224"\ndata = "cifar100"\n')
    code, _, err = _run(capsys, "run", "--config", str(cfg), "--results", str(tmp_path / "r"))
    assert code == 2 and "data must be one of cifar10, imagenet, synthetic" in _one_line_error(err)


def test_missing_data_file_says_where(capsys, tmp_path, shared):
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    for f in ("deit_tiny_cifar10.json", "deit_tiny_cifar10.safetensors"):
        (root / "models" / f).symlink_to(shared / "models" / f)
    code, _, err = _run(capsys, "run", "--data-root", str(root), "--models", "deit_tiny_cifar10", "--methods", "none",
                        "--limit", "4", "--results", str(tmp_path / "r"))
    line = _one_line_error(err)
    assert code == 2 and "CIFAR-10 archive not found" in line and str(root / "datasets") in line


@pytest.mark.parametrize("content,needle", [(b"\x00garbage" * 10, "corrupt"), ("truncated", "corrupt"),
                                            (None, "does not fit")])
def test_bad_checkpoint_exit_2(capsys, tmp_path, shared, content, needle):
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "datasets").symlink_to(shared / "datasets")
    card = json.loads((shared / "models/deit_tiny_cifar10.json").read_text())
    if content is None:  # a real file for another architecture
        (root / "models/deit_tiny_cifar10.safetensors").symlink_to(shared / "models/deit_small_cifar10.safetensors")
    elif content == "truncated":
        whole = (shared / "models/deit_tiny_cifar10.safetensors").read_bytes()
        (root / "models/deit_tiny_cifar10.safetensors").write_bytes(whole[: len(whole) // 2])
    else:
        (root / "models/deit_tiny_cifar10.safetensors").write_bytes(content)
    (root / "models/deit_tiny_cifar10.json").write_text(json.dumps(card))
    results = tmp_path / "r"
    code, _, err = _run(capsys, "run", "--data-root", str(root), "--models", "deit_tiny_cifar10", "--methods", "none",
                        "--limit", "4", "--results", str(results))
    assert code == 2 and needle in _one_line_error(err)
    assert not list(results.glob("records/*.json"))


@pytest.mark.parametrize("toml,needle", [("[run\nlimit = 3", "line 1"), ("[run]\nlimt = 3", "unknown key 'limt'"),
                                         ("[run]\nlimit = 'x'", "expected int"), ("[bogus]\n", "unknown section")])
def test_malformed_config_exit_2(capsys, tmp_path, toml, needle):
    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(toml)
    code, _, err = _run(capsys, "run", "--config", str(cfg))
    assert code == 2 and needle in _one_line_error(err)


def test_unwritable_results_dir(capsys, tmp_path, shared):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "run", "--results", str(blocker / "sub"), "--models", "deit_tiny_cifar10",
                        "--methods", "none", "--limit", "4")
    assert code == 2 and "not writable" in _one_line_error(err)


def test_report_without_results(capsys, tmp_path):
    code, _, err = _run(capsys, "report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "rep"))
    assert code == 2 and "no results" in _one_line_error(err)


def test_flags_are_never_abbreviated(capsys):
    args = _parser().parse_args(["run", "--data", "synthetic"])
    assert args.data == "synthetic" and args.data_root is None  # once, --data was taken for --data-root
    for argv in (["run", "--data-r", "x"], ["run", "--model", "m"], ["ls", "models", "--data-r", "x"]):
        with pytest.raises(SystemExit) as exc:
            _parser().parse_args(argv)
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("argv,needle", [
    (["--weights", "/no/such/file.safetensors"], "--weights takes random, pretrained or a checkpoint file"),
    (["--data", "imagenet2"], "--data takes synthetic, cifar10, imagenet or imagenet:PATH"),
    (["--data", "cifar10:/x"], "--data takes"),
    (["--weights", "random", "--data", "cifar10"], "random weights give meaningless accuracy"),
    (["--data", "imagenet:/no/such/val", "--weights", "random"], "random weights"),
])
def test_bad_weights_or_data_exit_2(capsys, tmp_path, argv, needle):
    code, _, err = _run(capsys, "run", "--models", "deit_tiny_patch16_224", "--methods", "none",
                        "--results", str(tmp_path / "r"), *argv)
    assert code == 2 and needle in _one_line_error(err)


def test_missing_imagenet_folder_says_where(capsys, tmp_path):
    from safetensors.torch import save_file
    import timm

    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), tmp_path / "w.safetensors")
    code, _, err = _run(capsys, "run", "--models", "deit_tiny_patch16_224", "--methods", "none", "--weights",
                        str(tmp_path / "w.safetensors"), "--data", f"imagenet:{tmp_path / 'nope'}", "--results",
                        str(tmp_path / "r"))
    assert code == 2 and f"ImageNet folder not found: looked for {tmp_path / 'nope'}" in _one_line_error(err)


def test_ls_models_shows_how_entries_resolve(capsys, tmp_path, shared):  # model b is a card: needs the data root
    cfg = tmp_path / "b.toml"
    cfg.write_text('[models.a]\ntimm = "vit_small_patch16_224"\ncheckpoint = "w.pth"\n'
                   '[models.b]\ncard = "deit_tiny_cifar10"\ndata = "synthetic"\n')
    code, out, _ = _run(capsys, "ls", "models", "--config", str(cfg))
    assert code == 0
    assert "timm vit_small_patch16_224, weights checkpoint w.pth, data imagenet" in out
    assert "card deit_tiny_cifar10, weights card's, data synthetic" in out


def test_a_reference_name_without_a_data_root_says_so(monkeypatch, tmp_path):
    """A fresh clone placed away from the data: one line naming the missing data root, not 400 timm names."""
    import harness.paths as paths
    from harness.errors import HarnessError
    from harness.loading.models import resolve_model

    monkeypatch.delenv(paths.ENV_DATA_ROOT, raising=False)
    monkeypatch.setattr(paths, "_data_root_candidates", lambda: [tmp_path / "nowhere" / "shared"])
    with pytest.raises(HarnessError) as info:
        resolve_model("deit_tiny_cifar10", {}, paths.DataRoot())
    message = str(info.value)
    assert "no data root" in message and "deit_tiny_cifar10.json" in message and "vit_base" not in message


RANDOM_SUITE = """
[run]
results_dir = "{results}"
device = "cpu"
[suites.default]
models = ["{model}"]
methods = ["none", "tome"]
budgets = ["0.7"]
"""


def test_a_random_model_name_means_the_same_in_a_config_file(tmp_path):
    """``arch.random`` in a config's models, with no [models] entry: the cells of ``--models arch.random``."""
    from harness.sweep.config import load_config
    from harness.paths import DEFAULT_CONFIG
    from harness.sweep.runner import Sweep, override

    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(RANDOM_SUITE.format(results=tmp_path / "r", model="deit_tiny_patch16_224.random"))
    mine = Sweep(load_config(cfg))
    mine.check_inputs()  # once a traceback: "Invalid pretrained tag (random)"
    spec = mine.plan.specs["deit_tiny_patch16_224.random"]
    assert (spec.arch, spec.weights, spec.data) == ("deit_tiny_patch16_224", "random", "synthetic")
    # the command line's spelling, resolved through the shipped config's [models."deit_tiny_patch16_224.random"]
    shipped = override(load_config(DEFAULT_CONFIG), {"results_dir": str(tmp_path / "r"), "device": "cpu"},
                       {"models": ["deit_tiny_patch16_224.random"], "methods": ["none", "tome"], "budgets": ["0.7"]})
    cli = Sweep(shipped)
    assert cli.plan.specs["deit_tiny_patch16_224.random"] == spec
    assert [mine.cell_id(c) for c in mine.cells] == [cli.cell_id(c) for c in cli.cells]


@pytest.mark.parametrize("where", ["config", "flag"])
def test_an_unknown_pretrained_tag_is_one_line(capsys, tmp_path, where):
    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(RANDOM_SUITE.format(results=tmp_path / "r", model="deit_tiny_patch16_224.bogus"))
    flag = ["--models", "deit_tiny_patch16_224.bogus"] if where == "flag" else []
    code, _, err = _run(capsys, "run", "--config", str(cfg), *flag)
    line = _one_line_error(err)
    assert code == 2 and "no pretrained tag 'bogus' for deit_tiny_patch16_224" in line and "fb_in1k" in line


TOKENMAP_SEARCH = """
[run]
results_dir = "{results}"
calib_limit = 16
[methods.diffrate]
epochs = 1
batch_size = 8
"""


@pytest.mark.slow
def test_tokenmap_diffrate_searches_as_the_runner_does(capsys, caplog, tmp_path, shared):
    """DiffRate's default (search) mode: the runner's calibration service, here on 16 training images."""
    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(TOKENMAP_SEARCH.format(results=tmp_path / "results"))
    code, out, err = _run(capsys, "tokenmap", "--config", str(cfg), "--methods", "diffrate", "--images", "1",
                          "--out", str(tmp_path / "rep"), "--data-root", str(shared))
    assert code == 0, err
    assert len(list((tmp_path / "rep" / "figures").glob("tokenmap_deit_tiny_cifar10_0.7_*.png"))) == 1
    searched = list((tmp_path / "results" / "cache" / "diffrate").glob("*.json"))
    assert len(searched) == 1 and json.loads(searched[0].read_text())["search_images"] == 16
    assert not [r.message for r in caplog.records if r.levelname == "WARNING" and "diffrate" in r.message]


@pytest.mark.parametrize("depths,needle", [("a", "1-based block numbers"), ("0,4", "1-based block numbers"),
                                           ("4,13", "past deit_tiny_cifar10's last block (12)")])
def test_tokenmap_bad_depths_is_one_line(capsys, tmp_path, shared, depths, needle):
    code, _, err = _run(capsys, "tokenmap", "--model", "deit_tiny_cifar10", "--methods", "tome", "--images", "1",
                        "--depths", depths, "--out", str(tmp_path / "rep"))
    assert code == 2
    assert needle in _one_line_error(err)


def _error_and_hint(err: str, hint: str) -> str:
    """The error line of a two-line message: ``error: ...`` and a second line starting with ``hint``."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith(hint), err
    return lines[0]


@pytest.mark.parametrize("argv,nearest,usage", [
    (["run", "--method", "tome"], "unrecognized argument --method; did you mean --methods?", "python -m harness run "),
    (["run", "--model=deit_tiny_cifar10"], "--model; did you mean --models?", "python -m harness run "),
    (["tokenmap", "--depth", "4"], "--depth; did you mean --depths?", "python -m harness tokenmap "),
    (["ls", "methods", "--data-rot", "x"], "--data-rot; did you mean --data-root?",
     "python -m harness ls [options] {methods,models,suites,recipes}"),
    (["run", "-v"], "-v (an option of python -m harness itself: put it before run)", "python -m harness run "),
])
def test_a_wrong_flag_names_the_nearest_with_its_commands_usage(capsys, tmp_path, argv, nearest, usage):
    """The subcommand's own usage in one line (not the top level's) and its closest option string."""
    stored = _store_one(tmp_path / "r")
    with pytest.raises(SystemExit) as exc:
        main([argv[0], "--results", str(tmp_path / "r")] + argv[1:] if argv[0] == "run" else argv)
    assert exc.value.code == 2
    line = _error_and_hint(capsys.readouterr().err, f"usage: {usage}")
    assert nearest in line and "{ls,run" not in line
    assert {p.name: p.read_text() for p in (tmp_path / "r/records").glob("*.json")} == stored


@pytest.mark.parametrize("methods,unknown", [("none,tomee", "tomee"), ("random@tomee", "tomee"), ("rand@tome", "rand")])
def test_a_misspelt_method_is_one_line_before_torch_loads(tmp_path, methods, unknown):
    import subprocess
    import sys

    stored = _store_one(tmp_path / "r")
    code = (f"import sys; from harness.cli import main; code = main(['run', '--methods', {methods!r}, '--results', "
            f"{str(tmp_path / 'r')!r}]); print('TORCH', 'torch' in sys.modules, 'CODE', code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "TORCH False CODE 2" in proc.stdout, (proc.stdout, proc.stderr)
    line = _one_line_error(proc.stderr)
    assert f"unknown method {unknown!r}; did you mean" in line
    assert {p.name: p.read_text() for p in (tmp_path / "r/records").glob("*.json")} == stored


VIT_FAMILY = ("vit_", "deit", "eva", "beit", "flexivit", "aimv2")  # aimv2: a timm VisionTransformer


@pytest.mark.parametrize("name,first", [("deit_tiny_cifar", "deit_tiny_cifar10"), ("davit_tny", None),
                                        ("vit_smal_patch16_224", "vit_small_patch16_224")])
def test_a_misspelt_model_suggests_five_vits_and_how_to_list_them(capsys, tmp_path, shared, name, first):
    """At most five names, each of a ViT family the seam patches (never levit, mobilevit, maxvit, davit)."""
    import re

    stored = _store_one(tmp_path / "r")
    code, _, err = _run(capsys, "run", "--results", str(tmp_path / "r"), "--models", name)
    assert code == 2
    line = _error_and_hint(err, "hint: python -m harness ls models lists them")
    assert line.startswith(f"error: unknown model {name!r}") and len(line) < 300
    suggested = re.findall(r"'([^']+)'", line.partition("did you mean")[2])
    assert 0 < len(suggested) <= 5 and all(s.startswith(VIT_FAMILY) for s in suggested), line
    assert first is None or suggested[0] == first
    assert {p.name: p.read_text() for p in (tmp_path / "r/records").glob("*.json")} == stored


def test_only_the_named_third_party_warnings_are_quiet_and_only_inside_main():
    import warnings

    from harness.cli import _quiet_third_party

    before = list(warnings.filters)
    main(["ls", "methods"])
    assert warnings.filters == before  # nothing global, even in-process
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_third_party()
        warnings.warn_explicit("`torch.jit.script` is deprecated. Please switch", FutureWarning, "_script.py", 1,
                               module="torch.jit._script")
        warnings.warn("`torch.jit.script` is deprecated. Please switch", FutureWarning)  # another module: shown
        warnings.warn_explicit("something else", FutureWarning, "_script.py", 1, module="torch.jit._script")
    assert [(str(w.message), w.filename) for w in seen] == [
        ("`torch.jit.script` is deprecated. Please switch", __file__), ("something else", "_script.py")]


def test_a_default_small_run_prints_no_future_warning(tmp_path, shared):
    """fvcore's ``torch.jit.script is deprecated`` once landed in every run's progress output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--models", "deit_tiny_cifar10", "--methods", "none",
                           "--limit", "2", "--repeats", "1", "--device", "cpu", "--no-report",
                           "--data-root", str(shared), "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GMACs" in proc.stdout  # fvcore counted (imported): the warning's source ran
    assert "Warning" not in proc.stderr + proc.stdout, proc.stderr


def _starts(lines: list[str], word: str) -> set[int]:
    return {l.index(word) for l in lines if word in l}


def test_ls_methods_columns_fit_a_long_name(capsys, monkeypatch):
    from harness import registry

    infos = [registry.MethodInfo("random@zerotprune_extra_long", "keep_rate", "DESC long.", "m", False),
             registry.MethodInfo("tome", "r", "DESC short.", "m", False),
             registry.MethodInfo("none", "", "DESC none.", "m", True)]
    monkeypatch.setattr(registry, "method_infos", lambda: infos)
    code, out, _ = _run(capsys, "ls", "methods")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert len(_starts(lines, "knob")) == 1 and len(_starts(lines, "DESC")) == 1, out
    assert lines[0].startswith("random@zerotprune_extra_long knob keep_rate DESC")  # one space: no wasted width


def test_ls_models_and_suites_columns_fit_a_long_name(capsys, tmp_path, shared):
    long = "vit_small_patch16_224.a_tag_longer_than_the_old_column"
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'[models."{long}"]\ntimm = "vit_small_patch16_224"\nweights = "random"\ndata = "synthetic"\n'
                   f'[suites.a_suite_name_past_ten]\nmodels = ["{long}"]\nmethods = ["tome"]\nbudgets = ["0.7"]\n'
                   f'[suites.a_suite_name_past_ten.budgets_by_model]\n"{long}" = ["0.5"]\n'
                   '[suites.s]\nmodels = ["deit_tiny_cifar10"]\nmethods = ["tome"]\nbudgets = ["0.7"]\n')
    code, out, _ = _run(capsys, "ls", "models", "--config", str(cfg), "--data-root", str(shared))
    rows = out.splitlines()[:-1]
    assert code == 0 and any(l.startswith(long + " timm") for l in rows)
    assert len({len(l) - len(l.split(maxsplit=1)[1]) for l in rows}) == 1, out  # descriptions in one column
    code, out, _ = _run(capsys, "ls", "suites", "--config", str(cfg))
    assert code == 0 and len(_starts(out.splitlines(), "models ")) == 1, out
    assert f"\n{'':21s}   {long}: budgets 0.5\n" in out
