"""The experiment suite: grid expansion, variant builders, statistics, and a --quick run end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engram import EngramConfig
from engram._json_config import ConfigError
from engram.model import ModelConfig, MoEConfig
from engram.model.accounting import allocate, estimate_parameters
from engram.research import Experiment, load_experiment, summarize
from engram.research.experiment import QUICK_TRAIN, as_overencoding, bundled_experiments
from engram.research.report import describe, markdown, t_quantile_95
from engram.training.config import TrainConfig
from tests.cli_runs import make_workspace, run_engram

BASE = ModelConfig(
    vocab_size=300,
    d_model=32,
    n_layers=3,
    n_heads=2,
    ffn_hidden=96,
    max_seq_len=64,
    n_dense_layers=1,
    moe=MoEConfig(n_routed_experts=8, top_k=2, expert_hidden=32),
)
TEMPLATE = EngramConfig(layer_ids=[1], n_head_per_ngram=2, n_embed_per_ngram=16, pad_id=0, table_init_std=0.005)


def experiment(**changes) -> Experiment:
    fields = dict(
        name="tiny",
        question="does it work?",
        base=BASE,
        engram=TEMPLATE,
        train=TrainConfig(steps=4, batch_size=2, seq_len=16, threads=1, device="cpu"),
        baseline="moe",
        seeds=[0, 1],
        variants=[
            {"name": "moe"},
            {"name": "engram", "rho": 0.8},
            {"name": "fewer-experts", "rho": 0.8, "tables": False},
            {"name": "matched", "rho": 0.8, "match": "total_and_active"},
            {"name": "bigram", "rho": 0.8, "engram_set": ["max_ngram_size=2", "engram_vocab_size=[2]"]},
            {"name": "constant", "rho": 0.8, "set": ["engram.addressing=constant"]},
            {"name": "fixed-backbone", "add_engram": True, "set": ["engram.engram_vocab_size=[101, 101]"], "x": 101},
            {"name": "oe", "rho": 0.8, "memory": "overencoding"},
        ],
    )
    return Experiment.from_dict({**{k: v for k, v in fields.items()}, **changes})


def test_grid_is_variants_times_seeds_with_the_seed_in_the_recipe():
    exp = experiment()
    plans = exp.runs()
    assert [(p.variant, p.seed) for p in plans] == [(v.name, s) for v in exp.variants for s in (0, 1)]
    assert all(p.train == dataclasses.replace(exp.train, seed=p.seed) for p in plans)
    quick = exp.runs(quick=True)
    assert all(p.train == dataclasses.replace(exp.train, seed=p.seed, **QUICK_TRAIN) for p in quick)
    # Runs of one variant share the model; the fingerprint tells every run apart.
    assert plans[0].model == plans[1].model
    assert len({p.fingerprint("/data") for p in plans}) == len(plans)


def test_each_variant_builds_the_model_it_names():
    exp = experiment()
    build = {v.name: exp.model_config(v) for v in exp.variants}
    allocation = allocate(BASE, 0.8, TEMPLATE)
    assert build["moe"] == BASE
    assert build["engram"] == allocation.engram
    assert build["fewer-experts"] == dataclasses.replace(allocation.engram, engram=None)
    assert build["matched"] == allocate(BASE, 0.8, TEMPLATE, match="total_and_active").engram
    # engram_set changes the template before the allocation: the bigram tables absorb the whole budget.
    bigram = build["bigram"]
    assert bigram.engram.max_ngram_size == 2
    assert abs(estimate_parameters(bigram).total / estimate_parameters(BASE).total - 1) < 0.01
    # set changes the finished model: the allocation's sizes stay, the addressing changes.
    assert build["constant"].engram == dataclasses.replace(allocation.engram.engram, addressing="constant")
    assert build["fixed-backbone"].moe == BASE.moe and build["fixed-backbone"].engram.engram_vocab_size == [101, 101]


def test_overencoding_gets_the_table_parameters_of_the_engram_model():
    engram_model = allocate(BASE, 0.8, TEMPLATE).engram
    oe = as_overencoding(engram_model)
    assert oe.engram.variant == "overencoding" and oe.engram.layer_ids == [0]
    assert oe.engram.n_embed_per_ngram == BASE.d_model and oe.moe == engram_model.moe
    budget = estimate_parameters(engram_model).engram_tables
    used = estimate_parameters(oe).engram_tables
    # The largest equal base size within the budget: one more row per head would exceed it.
    one_more = dataclasses.replace(
        oe, engram=dataclasses.replace(oe.engram, engram_vocab_size=[s + 1 for s in oe.engram.engram_vocab_size])
    )
    assert used <= budget < estimate_parameters(one_more).engram_tables
    with pytest.raises(ValueError, match="needs rho or add_engram"):
        as_overencoding(BASE)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"baseline": "nope"}, "baseline: must name a variant"),
        ({"variants": [{"name": "moe"}, {"name": "moe"}]}, "repeated: \\['moe'\\]"),
        ({"variants": [{"name": "moe", "tables": False}]}, "tables=false removes the tables of an allocation"),
        ({"variants": [{"name": "a b"}], "baseline": "a b"}, "letters, digits"),
        ({"seeds": [1, 1]}, "seeds: must be distinct"),
        ({"comparisons": [["moe", "nope"]]}, "comparisons: each must be two variant names"),
    ],
)
def test_bad_experiments_are_refused_with_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        experiment(**changes)


def test_a_bad_override_names_the_file_and_the_variant(tmp_path):
    exp = experiment(variants=[{"name": "moe"}, {"name": "bad", "rho": 0.8, "set": ["engram.nope=1"]}])
    path = tmp_path / "bad.json"
    path.write_text(exp.to_json())
    with pytest.raises(ConfigError, match=r"bad\.json: variants: variant bad: set: .*unknown key 'nope'"):
        load_experiment(path)
    with pytest.raises(FileNotFoundError, match="iso-parameter"):
        load_experiment("no-such-experiment")


def test_bundled_experiments_load_and_build_every_model():
    bundled = bundled_experiments()
    assert "iso-parameter" in bundled
    for path in bundled.values():
        exp = load_experiment(path)
        assert exp.baseline in [v.name for v in exp.variants]
        assert len(exp.seeds) >= 3


# -- statistics -------------------------------------------------------------------------------------
def test_describe_against_a_hand_computation():
    values = [1.0, 2.0, 4.0]
    stats = describe(values)
    mean = 7 / 3
    std = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(mean, abs=1e-15)
    assert stats["std"] == pytest.approx(std, abs=1e-15)
    assert stats["ci95"] == pytest.approx(4.303 * std / math.sqrt(3), abs=1e-12)
    assert describe([5.0]) == {"n": 1, "mean": 5.0, "std": None, "ci95": None}
    assert describe([])["mean"] is None
    assert t_quantile_95(1) == 12.706 and t_quantile_95(30) == 2.042 and t_quantile_95(500) == 1.96


def _record(variant: str, seed: int, loss: float) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "val_loss": loss,
        "test_loss": loss + 0.5,
        "params_total": 10,
        "params_active": 5,
        "params_tables": 0,
    }


def test_summary_pairs_runs_by_seed():
    exp = experiment(
        variants=[{"name": "moe"}, {"name": "engram", "rho": 0.8}, {"name": "noisy", "rho": 0.9}],
        comparisons=[["noisy", "engram"]],
    )
    records = [
        _record("moe", 0, 5.0), _record("moe", 1, 5.2), _record("moe", 2, 5.1),
        _record("engram", 0, 4.9), _record("engram", 1, 5.08), _record("engram", 2, 5.01),
        _record("noisy", 0, 4.5), _record("noisy", 1, 5.6),  # seed 2 not finished
    ]  # fmt: skip
    summary = summarize(dataclasses.replace(exp, seeds=[0, 1, 2]), records)
    engram, noisy = summary["variants"][1], summary["variants"][2]
    diffs = [4.9 - 5.0, 5.08 - 5.2, 5.01 - 5.1]
    expected = describe(diffs)
    assert engram["paired"]["val_loss"]["mean"] == pytest.approx(expected["mean"], abs=1e-12)
    assert engram["paired"]["val_loss"]["ci95"] == pytest.approx(expected["ci95"], abs=1e-12)
    assert engram["paired"]["val_loss"]["resolved"]  # -0.103 +- 0.038: the interval excludes 0
    # Paired over the seeds both finished; the unpaired spread would hide nothing here either way.
    assert noisy["seeds"] == [0, 1] and noisy["paired"]["val_loss"]["n"] == 2
    assert noisy["paired"]["val_loss"]["mean"] == pytest.approx(((4.5 - 5.0) + (5.6 - 5.2)) / 2, abs=1e-12)
    assert not noisy["paired"]["val_loss"]["resolved"]
    assert summary["variants"][0]["paired"] == {} and summary["runs_complete"] == 8
    (comparison,) = summary["comparisons"]
    assert comparison["a"] == "noisy" and comparison["b"] == "engram"
    assert comparison["paired"]["test_loss"]["mean"] == pytest.approx(((4.5 - 4.9) + (5.6 - 5.08)) / 2, abs=1e-12)
    table = markdown(summary)
    assert "| `noisy` − `engram` | 2 | +0.0600 ± 5.8448 | +0.0600 ± 5.8448 | - |" in table
    assert "| `engram` | 10 | 5 | 0 | 3 | 4.9967 ± 0.0907 | -0.1033 ± 0.0379 * |" in table


def test_sweep_slope_is_fitted_per_seed_against_log_x():
    sizes = [100, 1000, 10000, 100000]
    exp = experiment(
        variants=[{"name": "moe"}] + [{"name": f"rows-{n}", "rho": 0.8, "x": n} for n in sizes],
    )
    exp = dataclasses.replace(exp, seeds=[0, 1, 2], log_x=True)
    rng = np.random.default_rng(0)
    losses = {(n, s): 6.0 - (0.10 + 0.01 * s) * math.log10(n) + rng.normal(0, 0.01) for n in sizes for s in range(3)}
    records = [_record("moe", s, 6.0) for s in range(3)]
    records += [_record(f"rows-{n}", s, losses[n, s]) for n in sizes for s in range(3)]
    records = [r for r in records if (r["variant"], r["seed"]) != ("rows-100", 2)]  # seed 2 fits on 3 sizes
    trend = summarize(exp, records)["trend"]["val_loss"]
    expected = [
        np.polyfit(np.log10([n for n in sizes if (n, s) != (100, 2)]),
                   [losses[n, s] for n in sizes if (n, s) != (100, 2)], 1)[0]
        for s in range(3)
    ]  # fmt: skip
    assert trend["n"] == 3 and trend["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert trend["std"] == pytest.approx(np.std(expected, ddof=1), abs=1e-12)
    assert trend["resolved"]  # slopes near -0.10, -0.11, -0.12: clearly below 0
    assert "Least-squares slope over the swept variants, per decade of x" in markdown(summarize(exp, records))
    # With two sizes there is no line to fit, and an experiment without x has no trend.
    two = [r for r in records if r["variant"] in ("moe", "rows-100", "rows-1000")]
    assert summarize(exp, two)["trend"] == {}


# -- end to end ------------------------------------------------------------------------------------
def test_quick_experiment_runs_skips_and_resumes(tmp_path):
    work = make_workspace(tmp_path)
    exp = Experiment.from_dict(
        {
            **experiment().to_dict(),
            "variants": [{"name": "moe"}, {"name": "engram", "rho": 0.8}],
            "seeds": [0],
            "data": str(work["data"]),
            "tokenizer": str(work["tokenizer"]),
        }
    )
    path = tmp_path / "tiny.json"
    path.write_text(exp.to_json())
    out = tmp_path / "out"

    result = run_engram("experiment", "run", path, "--quick", "--out", out, cache=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 runs, 0 complete, 2 to train" in result.stdout
    folder = out / "tiny-quick"
    finals = {v: json.loads((folder / v / "seed0" / "final.json").read_text()) for v in ("moe", "engram")}
    assert finals["engram"]["step"] == QUICK_TRAIN["steps"]
    assert "val_loss_engram_off" in finals["engram"] and "val_loss_engram_off" not in finals["moe"]
    report = json.loads((folder / "results.json").read_text())
    by_name = {v["name"]: v for v in report["summary"]["variants"]}
    assert by_name["engram"]["metrics"]["test_loss"]["mean"] == finals["engram"]["test_loss"]
    assert by_name["engram"]["paired"]["test_loss"]["mean"] == pytest.approx(
        finals["engram"]["test_loss"] - finals["moe"]["test_loss"], abs=1e-12
    )
    assert (folder / "results.png").stat().st_size > 0 and (folder / "results.csv").read_text().count("\n") == 3

    # The committed results.json brings the finished runs back on another machine: the dataset in another
    # folder, a fresh output folder. A record of another spec is left out.
    moved = Experiment.from_dict({**exp.to_dict(), "data": str(shutil.copytree(work["data"], tmp_path / "moved"))})
    moved_path = tmp_path / "moved.json"
    moved_path.write_text(moved.to_json())
    results = json.loads((folder / "results.json").read_text())
    results["runs"].append({**results["runs"][0], "seed": 1})
    results["runs"].append({**results["runs"][0], "variant": "engram", "fingerprint": "0" * 64})
    (tmp_path / "results.json").write_text(json.dumps(results))
    out2 = tmp_path / "out2"
    imported = run_engram(
        "experiment", "import", moved_path, tmp_path / "results.json", "--quick", "--out", out2, cache=tmp_path
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "2 runs imported" in imported.stdout and "2 records left out" in imported.stdout
    assert f"{results['runs'][0]['variant']} seed 1: experiment 'tiny' has no run of this variant and seed" in (
        imported.stdout
    ), imported.stdout
    assert "engram seed 0: another model, recipe or dataset" in imported.stdout
    assert json.loads((out2 / "tiny-quick" / "engram" / "seed0" / "final.json").read_text()) == finals["engram"]
    skipped = run_engram("experiment", "run", moved_path, "--quick", "--out", out2, cache=tmp_path)
    assert "2 runs, 2 complete, 0 to train" in skipped.stdout, skipped.stdout + skipped.stderr

    # A complete run is skipped; a run without its result is resumed from its last checkpoint, not retrained.
    (folder / "engram" / "seed0" / "final.json").unlink()
    again = run_engram("experiment", "run", path, "--quick", "--out", out, cache=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 1 complete, 1 to train" in again.stdout
    redone = json.loads((folder / "engram" / "seed0" / "final.json").read_text())
    for key in ("val_loss", "test_loss", "val_loss_engram_off", "step"):
        assert redone[key] == finals["engram"][key]
    steps = [
        json.loads(line)["step"] for line in (folder / "engram" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps))  # no step trained twice

    # A changed experiment does not mix with the runs of the old one.
    changed = Experiment.from_dict({**exp.to_dict(), "engram": {**exp.engram.to_dict(), "seed": 5}})
    path.write_text(changed.to_json())
    refused = run_engram("experiment", "run", path, "--quick", "--out", out, cache=tmp_path)
    assert refused.returncode == 2 and "holds a run of another spec" in refused.stderr
    shutil.rmtree(folder / "engram")
    assert not (folder / "engram").exists()


def test_sigterm_stops_every_run_with_a_checkpoint_and_the_rerun_resumes(tmp_path):
    work = make_workspace(tmp_path)
    steps = 300
    exp = Experiment.from_dict(
        {
            **experiment().to_dict(),
            "name": "long",
            "variants": [{"name": "moe"}, {"name": "engram", "rho": 0.8}],
            "seeds": [0],
            "data": str(work["data"]),
            "tokenizer": str(work["tokenizer"]),
            "train": {**experiment().train.to_dict(), "steps": steps, "log_every": 1, "checkpoint_every": 0},
        }
    )
    path = tmp_path / "long.json"
    path.write_text(exp.to_json())
    out = tmp_path / "out"
    env = {**os.environ, "ENGRAM_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen(
        [sys.executable, "-m", "engram.cli.main", "experiment", "run", str(path), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    runs = [out / "long" / variant / "seed0" for variant in ("moe", "engram")]
    deadline = time.monotonic() + 120
    while not all((r / "metrics.jsonl").is_file() and (r / "metrics.jsonl").stat().st_size for r in runs):
        assert runner.poll() is None, runner.communicate()[0]
        assert time.monotonic() < deadline, "the runs did not start training within 120 s"
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 130, output
    assert "every running run finishes its step and saves a checkpoint" in output
    for run_dir in runs:
        assert not (run_dir / "final.json").exists()
        saved = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
        assert len(saved) == 1 and 0 < saved[0] < steps, saved  # the checkpoint of the step it stopped after

    again = run_engram("experiment", "run", path, "--out", out, cache=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 0 complete, 2 to train" in again.stdout
    for run_dir in runs:
        assert json.loads((run_dir / "final.json").read_text())["step"] == steps
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged = [r["step"] for r in records if "loss" in r]  # training records, not evaluations
        assert logged == list(range(1, steps + 1))  # every step once: resumed, not started over
