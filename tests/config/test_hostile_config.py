"""Hostile configs (issue 21): YAML alias bombs and duplicate keys, NaN and infinity, numbers as
text, absurd counts and seeds, names that would write outside the runs folder or over what
autosparse keeps there, and duplicate choices.

Each case runs the real command line (``autosparse search``) in-process and asserts what
``test_bad_inputs`` asserts of every bad input: exit code 2, exactly one ``error:`` line that
names the field and the bad value, no traceback, no pydantic type or class name, and nothing
written (the working folder, and so the runs folder, stays as it was). The runs folder holds
an earlier, finished search of the same name (its study, MLflow store and dense cache), and
every file of it is hashed before and after: a refusal leaves it byte for byte.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from autosparse.config import schema
from autosparse.config.hardware import load_profile
from autosparse.config.schema import load_config
from autosparse.config.validation import ConfigError, Strict
from autosparse.config.yaml_loader import parse_yaml
from tests.config.test_bad_inputs import BASE, _check, _run, _set
from tests.search_helpers import fingerprint


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


# the config's own class names (ModelConfig, SparsityRange, ...) never reach a user either
CLASS_NAMES = sorted({c.__name__ for c in _subclasses(Strict)})
BASE_YAML = yaml.safe_dump(BASE, sort_keys=False)


def _bomb(levels: int = 9, width: int = 9, indent: str = "") -> str:
    """A billion-laughs document: ``levels`` anchors, each ``width`` aliases of the one before."""
    text = f"{indent}a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels + 1):
        text += f"{indent}a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n"
    return text


def _with(text: str, **replace: str) -> str:
    """BASE as YAML text with some top-level sections rewritten by hand (``key="..."``)."""
    data = {k: v for k, v in BASE.items() if k not in replace}
    return yaml.safe_dump(data, sort_keys=False) + "".join(replace.values()) + text


# (case id, YAML text written as is, words the one line must hold)
TEXT_CASES = [
    # YAML itself
    ("alias-bomb", BASE_YAML + _bomb(), ["alias", "10,000"]),
    ("alias-bomb-in-kwargs", _with("", data="data:\n  factory: pkg.mod:make\n  kwargs:\n"
                                   + _bomb(indent="    ")), ["alias", "more than the 10,000"]),
    ("alias-recursive", BASE_YAML + "data_loop: &loop [*loop]\n", ["alias", "recursive"]),
    ("duplicate-top-key", BASE_YAML + "seed: 1\nseed: 2\n", ["duplicate key 'seed'", "line"]),
    ("duplicate-section", BASE_YAML + "budget: {trials: 9}\n", ["duplicate key 'budget'",
                                                                "first given at line"]),
    ("duplicate-nested-key", _with("", finetune="finetune:\n  steps: 5\n  lr: 0.01\n  steps: 6\n"),
     ["duplicate key 'steps'", "line"]),
    ("duplicate-flow-key", _with("", budget="budget: {trials: 3, trials: 4}\n"),
     ["duplicate key 'trials'"]),
    ("nesting-too-deep", BASE_YAML + "deep: " + "[" * 3000 + "]" * 3000 + "\n", ["too deeply"]),
    # numbers written as text, or as true/false
    ("seed-quoted", BASE_YAML + "seed: '3'\n", ["seed", "'3'", "without quotes", "4294967295"]),
    ("trials-quoted", _with("", budget='budget:\n  trials: "40"\n'),
     ["budget.trials", "'40'", "without quotes"]),
    ("lr-quoted", _with("", finetune="finetune:\n  lr: '0.001'\n"),
     ["finetune.lr", "'0.001'", "without quotes"]),
    ("mean-quoted", _with("", data="data:\n  mean: ['0.5']\n"), ["data.mean[0]", "'0.5'"]),
    ("steps-yes", _with("", finetune="finetune:\n  steps: yes\n"),
     ["finetune.steps", "true", "whole number"]),
    # YAML 1.2 numbers: 1e20 and 1e400 are numbers, refused by their range
    ("trials-1e20", _with("", budget="budget:\n  trials: 1e20\n"),
     ["budget.trials", "1e+20", "1,000,000"]),
    ("lr-1e400", _with("", finetune="finetune:\n  lr: 1e400\n"), ["finetune.lr", "finite", "inf"]),
]

INF, NAN = float("inf"), float("nan")
RESERVED_WORDS = ["name", "reserved", "dense", "mlflow.db"]
NAME_RULE = ["name", "allowed", "letters, digits"]

# (case id, dotted field, bad value, words the one line must hold)
FIELD_CASES = [
    # NaN and infinity, wherever a number is read
    ("lr-inf", "finetune.lr", INF, ["finetune.lr", "finite", "inf"]),
    ("lr-nan", "finetune.lr", NAN, ["finetune.lr", "finite", "nan"]),
    ("mean-nan", "data.mean", [NAN], ["data.mean", "[0]", "nan", "finite"]),
    ("std-inf", "data.std", [1.0, INF], ["data.std", "[1]", "inf", "finite"]),
    ("train-epochs-inf", "model.train_epochs", INF, ["model.train_epochs", "finite", "inf"]),
    ("finetune-epochs-inf", "finetune.epochs", INF, ["finetune.epochs", "finite", "inf"]),
    ("finetune-epochs-nan", "finetune.epochs", NAN, ["finetune.epochs", "finite", "nan"]),
    ("minutes-inf", "budget.minutes", INF, ["budget.minutes", "finite", "inf"]),
    ("crossover-nan", "strategy.crossover_prob", NAN, ["strategy.crossover_prob", "nan"]),
    ("tolerance-nan", "fidelity.tolerance", NAN, ["fidelity.tolerance", "nan"]),
    ("sparsity-nan", "space.default.sparsity", [0.0, NAN], ["space.default.sparsity", "nan"]),
    ("sparsity-range-nan", "space.default.sparsity", {"low": 0.0, "high": NAN, "step": 0.1},
     ["space.default.sparsity.high", "nan"]),
    ("constraint-bound-inf", "constraints", [{"metric": "size_kb", "op": "<=", "bound": INF}],
     ["constraints[0].bound", "inf", "finite"]),
    ("constraint-bound-nan", "constraints", [{"metric": "accuracy_drop", "op": "<=",
                                              "bound": NAN}], ["constraints[0].bound", "nan"]),
    ("seed-inf", "seed", INF, ["seed", "inf"]),
    # seeds: 0 to 2**32 - 1
    ("seed-negative", "seed", -1, ["seed", "-1", "0 to 4294967295"]),
    ("seed-huge", "seed", 10**30, ["seed", "10000000000", "0 to 4294967295"]),
    ("seed-just-over", "seed", 2**32, ["seed", "4294967296", "0 to 4294967295"]),
    ("split-seed-negative", "data.split_seed", -1, ["data.split_seed", "-1", "4294967295"]),
    ("finetune-seed-huge", "finetune.seed", 2**40, ["finetune.seed", str(2**40), "4294967295"]),
    # counts: each with an upper bound
    ("trials-huge", "budget.trials", 10**20, ["budget.trials", "100000000000000000000",
                                               "1,000,000"]),
    ("trials-just-over", "budget.trials", 1_000_001, ["budget.trials", "1000001", "1,000,000"]),
    ("trials-fraction", "budget.trials", 3.5, ["budget.trials", "3.5", "whole number"]),
    ("train-epochs-huge", "model.train_epochs", 10**9, ["model.train_epochs", "1000000000",
                                                        "10,000"]),
    ("finetune-steps-huge", "finetune.steps", 10**12, ["finetune.steps", "10,000,000"]),
    ("batch-size-huge", "data.batch_size", 10**8, ["data.batch_size", "1,048,576"]),
    ("minutes-huge", "budget.minutes", 1e12, ["budget.minutes", "1000000000000.0", "1,000,000"]),
    ("population-huge", "strategy.population_size", 10**6, ["strategy.population_size",
                                                             "10,000"]),
    ("reeval-huge", "finetune.reeval_seeds", 1000, ["finetune.reeval_seeds", "1000", "100"]),
    ("sparsity-range-tiny-step", "space.default.sparsity", {"low": 0.0, "high": 0.9,
                                                            "step": 1e-9},
     ["space.default.sparsity", "1e-09", "at most 1,000"]),
    # names: one folder inside runs/, not one autosparse keeps there
    ("name-dotdot", "name", "..", [*NAME_RULE, "'..'"]),
    ("name-dot", "name", ".", [*NAME_RULE, "'.'"]),
    ("name-hidden", "name", ".study", [*NAME_RULE, ".study", "cannot start with '.'"]),
    ("name-dash", "name", "-rf", [*NAME_RULE, "-rf", "cannot start with '-'"]),
    ("name-300", "name", "a" * 300, [*NAME_RULE, "300 characters", "100"]),
    ("name-space", "name", "my search", [*NAME_RULE, "' '"]),
    ("name-unicode", "name", "na\u00efve", [*NAME_RULE, "\u00ef"]),
    ("name-mlflow-db", "name", "mlflow.db", [*RESERVED_WORDS, "'mlflow.db'"]),
    ("name-mlflow-journal", "name", "mlflow.db-journal", [*RESERVED_WORDS,
                                                         "'mlflow.db-journal'"]),
    ("name-dense", "name", "dense", [*RESERVED_WORDS, "'dense'"]),
    ("name-dense-case", "name", "Dense", [*RESERVED_WORDS, "'Dense'"]),
    ("name-calibration", "name", "calibration", [*RESERVED_WORDS, "'calibration'"]),
    ("name-mlartifacts", "name", "mlartifacts", [*RESERVED_WORDS, "'mlartifacts'"]),
    ("name-api-configs", "name", "python-api-configs", [*RESERVED_WORDS,
                                                        "'python-api-configs'"]),
    ("name-number", "name", 7, ["name", "text", "7"]),
    # duplicate choices: the same candidate twice
    ("sparsity-twice", "space.default.sparsity", [0.0, 0.5, 0.5],
     ["space.default.sparsity", "0.5", "twice"]),
    ("sparsity-twice-rounded", "space.default.sparsity", [0.5, 0.5000000001],
     ["space.default.sparsity", "0.5", "0.5000000001", "twice"]),
    ("bits-twice", "space.default.bits", [8, 32, 8], ["space.default.bits", "8", "twice"]),
    ("patterns-twice", "space.default.patterns", ["2:4", "unstructured", "2:4"],
     ["space.default.patterns", "'2:4'", "twice"]),
    ("patterns-same-nm", "space.default.patterns", ["2:4", "02:4"],
     ["space.default.patterns", "'2:4' and '02:4'", "twice"]),
    ("criterion-twice", "space.default.criterion", ["magnitude", "magnitude"],
     ["space.default.criterion", "magnitude", "twice"]),
    ("rule-bits-twice", "space.rules", [{"layers": ["conv1"], "bits": [4, 4]}],
     ["space.rules[0].bits", "4", "twice"]),
    # a section given as a word: what is wanted, not a pydantic class
    ("model-as-word", "model", "digits-cnn", ["model", "mapping", "'digits-cnn'"]),
    ("sparsity-as-word", "space.default.sparsity", "half",
     ["space.default.sparsity", "a list or a mapping", "'half'"]),
]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A finished search named like every hostile config (``bad``)."""
    from autosparse.search.runner import run_search

    root = tmp_path_factory.mktemp("earlier")
    config = root / "bad.yaml"
    config.write_text(yaml.safe_dump({**BASE, "budget": {"trials": 2}}))
    run_search(config, runs_dir=root / "runs", printer=lambda line: None)
    return root / "runs"


def _run_beside(earlier: Path, argv: list[str], tmp_path: Path, capsys, monkeypatch):
    """``_run`` with a copy of the earlier search in the runs folder, hashed before and after."""
    runs = tmp_path / "runs"
    shutil.copytree(earlier, runs)
    before = fingerprint(runs)
    code, err = _run(argv, tmp_path, capsys, monkeypatch)
    assert fingerprint(runs) == before, "the earlier search changed"
    return code, err


def _check_hostile(code: int, err: str, words: list[str]) -> None:
    _check(code, err, words)
    for name in CLASS_NAMES:
        assert name not in err, (name, err)


@pytest.mark.parametrize("case,text,words", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_hostile_yaml(case, text, words, earlier, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    code, err = _run_beside(earlier, ["search", str(config)], tmp_path, capsys, monkeypatch)
    _check_hostile(code, err, words)


@pytest.mark.parametrize("case,field,value,words", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_hostile_field(case, field, value, words, earlier, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_set(BASE, field, value)))
    code, err = _run_beside(earlier, ["search", str(config)], tmp_path, capsys, monkeypatch)
    _check_hostile(code, err, words)


# a hardware profile is read by the same loader and models: (case id, text edit, words)
PROFILE_CASES = [
    ("profile-alias-bomb", lambda text: text + _bomb(), ["hardware profile", "alias"]),
    ("profile-duplicate-key", lambda text: text + "name: other\n",
     ["hardware profile", "duplicate key 'name'"]),
    ("profile-nan", lambda text: text.replace("technology_scale: 0.35", "technology_scale: .nan"),
     ["technology_scale", "nan"]),
    ("profile-quoted-number", lambda text: text.replace("technology_scale: 0.35",
                                                        "technology_scale: '0.35'"),
     ["technology_scale", "without quotes"]),
]


@pytest.mark.parametrize("case,edit,words", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_hostile_hardware_profile(case, edit, words, earlier, tmp_path, capsys, monkeypatch):
    profile = tmp_path / "board.yaml"
    text = load_profile("edge-arm-a76").to_yaml()
    assert edit(text) != text
    profile.write_text(edit(text))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**BASE, "hardware": str(profile)}))
    code, err = _run_beside(earlier, ["search", str(config)], tmp_path, capsys, monkeypatch)
    _check_hostile(code, err, ["hardware", *words])


def test_the_hostile_corpus_is_large():
    assert len(TEXT_CASES) + len(FIELD_CASES) + len(PROFILE_CASES) >= 60


def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """4.4 billion nodes in under 1 KB: refused from the document's shape, nothing expanded."""
    config = tmp_path / "c.yaml"
    config.write_text(BASE_YAML + _bomb())
    assert config.stat().st_size < 1024
    started = time.perf_counter()
    code, err = _run(["search", str(config)], tmp_path, capsys, monkeypatch)
    assert time.perf_counter() - started < 0.5
    _check_hostile(code, err, ["alias", "4,412,961,573"])


def test_an_alias_bomb_in_a_fresh_process(tmp_path):
    """The installed command too (a hang would hit the timeout)."""
    config = tmp_path / "c.yaml"
    config.write_text(BASE_YAML + _bomb(levels=12))
    done = subprocess.run([sys.executable, "-m", "autosparse.cli", "--runs-dir",
                           str(tmp_path / "runs"), "search", str(config)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert "alias" in done.stderr and not (tmp_path / "runs").exists()


# What stays allowed: the loader refuses only what is hostile.
def test_yaml_12_numbers_and_shared_anchors_load(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(_with(
        "", space="space:\n  default:\n    sparsity: &levels [0.0, 0.5]\n"
        "    patterns: [unstructured, 2:4]\n    bits: [8, 32]\n"
        "  rules:\n  - layers: [conv1]\n    sparsity: *levels\n    bits: [8]\n",
        finetune="finetune: &ft\n  steps: 5\n  lr: 1e-3\n",
        seed=f"seed: {2**32 - 1}\n"))
    loaded = load_config(config)
    assert loaded.finetune.lr == pytest.approx(0.001)  # YAML 1.1 would read the text '1e-3'
    assert loaded.space.default.patterns == ["unstructured", "2:4"]  # not the base-60 124
    assert loaded.space.rules[0].sparsity == [0.0, 0.5] and loaded.seed == 2**32 - 1


def test_merge_keys_may_override():
    """``<<: *base`` and a key beside it is YAML's override, not a duplicate key."""
    data = parse_yaml("base: &b {steps: 5, lr: 0.01}\nfinetune:\n  <<: *b\n  lr: 0.002\n",
                      "config", "c.yaml")
    assert data["finetune"] == {"steps": 5, "lr": 0.002}


def test_an_unbounded_profile_speedup_stays_allowed(tmp_path):
    """Infinity is refused except where a field's default is infinite (max_speedup)."""
    profile = load_profile("edge-arm-a76")
    text = profile.to_yaml().replace("max_speedup: 2.5", "max_speedup: .inf")
    assert ".inf" in text
    path = tmp_path / "board.yaml"
    path.write_text(text)
    assert math.isinf(load_profile(path).sparsity[0].max_speedup)


def test_reserved_names_cover_what_the_runs_folder_holds():
    """Every name autosparse writes directly under the runs folder is refused as a name."""
    from autosparse.api import API_CONFIGS
    from autosparse.tracking.ui import default_tracking_uri

    written = {"dense", "calibration", "mlartifacts", API_CONFIGS,
               Path(default_tracking_uri(Path("runs")).removeprefix("sqlite:///")).name}
    for name in written:
        with pytest.raises(ConfigError, match="reserved"):
            schema.parse_config(_set(BASE, "name", name))
