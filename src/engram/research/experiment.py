"""An experiment: a named grid of training runs (model variants x seeds) that answers one question.

An experiment file (JSON, bundled ones in ``engram/research/experiments/``) fixes a pure-MoE
baseline, a template of Engram layers, the training recipe, the corpus and the seeds, and lists the
variants. Each variant says how its model is built from the baseline:

    rho set           allocate(base, rho, template, match)      the iso-parameter Engram model
      tables=false      ... without its tables                  the "fewer experts" control
    add_engram=true   base + template (no allocation)            fixed backbone, e.g. memory scaling
    otherwise         the baseline itself
    memory="overencoding"   the same table parameters as n-gram embeddings averaged into the input
    engram_set        overrides of the template before the allocation (ablations at equal parameters)
    set               overrides of the finished model config ("engram.addressing=constant")

Every run of a variant uses the same training recipe, with ``train.seed`` set to the run's seed, so
two variants' runs of one seed see the same batches in the same order: differences between them are
paired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from engram._json_config import ConfigError, JsonConfig, require
from engram.config import EngramConfig
from engram.model.accounting import Match, allocate, estimate_parameters, fit_table_sizes
from engram.model.config import ModelConfig
from engram.training.config import TrainConfig
from engram.training.run import RunSpec, apply_overrides

# A few steps of every run, for tests and a first look (``--quick``).
QUICK_TRAIN = dict(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=0, checkpoint_every=3, log_every=2)


@dataclass
class Variant(JsonConfig):
    """One model of an experiment, built from the experiment's baseline (see the module docstring).

    Attributes:
        name: the variant's name in tables and folders (letters, digits, ``-``, ``_``, ``.``).
        rho: share of the sparse budget kept by routed experts; set: the model is ``allocate``'s.
        match: what the allocation holds equal: ``"total"`` or ``"total_and_active"`` parameters.
        tables: False keeps the allocated backbone (fewer experts, narrower FFN) without Engram.
        add_engram: without ``rho``, add the template's Engram layers to the baseline as they are.
        memory: ``"overencoding"`` turns the model's Engram tables into the OverEncoding baseline
            with the same table parameters (hashed n-gram embeddings averaged into the input).
        engram_set: ``key=value`` overrides of the Engram template, applied before the allocation.
        set: ``key=value`` overrides of the finished model config.
        x: the variant's position on the plot's x axis (rho, table rows, ...); None: a bar chart.
        label: a readable description for the report.
    """

    name: str
    rho: float | None = None
    match: Match = "total"
    tables: bool = True
    add_engram: bool = False
    memory: Literal["engram", "overencoding"] = "engram"
    engram_set: list[str] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    x: float | None = None
    label: str = ""

    def validate(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError("name", f"must be letters, digits, '-', '_' or '.', got {self.name!r}")
        require(self, "rho", gt=0, le=1)
        if self.rho is None and not self.tables:
            raise ConfigError("tables", "tables=false removes the tables of an allocation: set rho too")
        if self.rho is not None and self.add_engram:
            raise ConfigError("add_engram", "rho already adds Engram layers (allocated); drop add_engram")


@dataclass
class Experiment(JsonConfig):
    """A grid of runs: every variant trained once per seed, on one corpus, with one recipe.

    Attributes:
        name: the experiment's name (its folder under the output folder).
        question: what the experiment asks, in one sentence (shown by ``engram experiment list``).
        base: the pure-MoE baseline every variant is built from.
        engram: the template of the Engram layers (its table sizes are replaced by allocations).
        train: the training recipe; ``seed`` is replaced by each run's seed.
        variants: the models.
        baseline: the variant that paired differences are taken against.
        seeds: one run of every variant per seed.
        data: ``"shakespeare"`` (bundled), ``"wikipedia"``, or a prepared dataset folder.
        tokenizer: a ``tokenizer.json`` path for every run; ``None``: DeepSeek-V3 (bundled).
        comparisons: pairs of variant names ``[a, b]`` whose paired difference a - b the report
            gives besides every variant's difference to the baseline (e.g. a model against its control).
        x_label, log_x: the plot's x axis, for variants that set ``x``.
    """

    name: str
    question: str
    base: ModelConfig
    engram: EngramConfig
    train: TrainConfig
    variants: list[Variant]
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: str = "shakespeare"
    tokenizer: str | None = None
    comparisons: list[list[str]] = field(default_factory=list)
    x_label: str = ""
    log_x: bool = False

    def validate(self) -> None:
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError("variants", "needs at least one variant")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError("variants", f"names must be unique, repeated: {duplicates}")
        if self.baseline not in names:
            raise ConfigError("baseline", f"must name a variant ({names}), got {self.baseline!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"must be distinct and at least one, got {self.seeds}")
        require(self, "seeds", ge=0, le=2**32 - 1)
        for pair in self.comparisons:
            if len(pair) != 2 or any(name not in names for name in pair):
                raise ConfigError("comparisons", f"each must be two variant names of {names}, got {pair}")

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"experiment {self.name!r} has no variant {name!r}; it has {[v.name for v in self.variants]}")

    def model_config(self, variant: Variant) -> ModelConfig:
        """The model of ``variant`` (see the module docstring for the order of the steps).

        Raises:
            ValueError: an override names an unknown key, or the allocation does not fit.
        """
        template = _with_overrides(self.engram, variant.engram_set, f"variant {variant.name}: engram_set")
        if variant.rho is not None:
            allocation = allocate(self.base, variant.rho, template, match=variant.match)
            config = allocation.engram if variant.tables else allocation.experts_only
        elif variant.add_engram:
            config = dataclasses.replace(self.base, engram=template)
        else:
            config = self.base
        if variant.memory == "overencoding":
            config = as_overencoding(config)
        return _with_overrides(config, variant.set, f"variant {variant.name}: set")

    def runs(self, quick: bool = False) -> list[RunPlan]:
        """Every run of the grid, variant-major, in the order they are listed."""
        plans = []
        for variant in self.variants:
            model = self.model_config(variant)
            for seed in self.seeds:
                train = dataclasses.replace(self.train, seed=seed, **(QUICK_TRAIN if quick else {}))
                plans.append(RunPlan(self.name, variant.name, seed, model, train, self.tokenizer))
        return plans


@dataclass(frozen=True)
class RunPlan:
    """One run of an experiment: a variant's model trained with one seed."""

    experiment: str
    variant: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    tokenizer: str | None = None

    @property
    def folder(self) -> Path:
        """The run's folder relative to the experiment's folder."""
        return Path(self.variant) / f"seed{self.seed}"

    def spec(self, data_dir: str | Path) -> RunSpec:
        tokenizer = None if self.tokenizer is None else str(Path(self.tokenizer).resolve())
        return RunSpec(model=self.model, train=self.train, data=str(Path(data_dir).resolve()), tokenizer=tokenizer)

    def fingerprint(self, data_fingerprint: str) -> str:
        """SHA-256 of what the run's results depend on: the model, the recipe and the dataset's content
        (its ``TokenDataset.fingerprint``, which covers the tokenizer), not the folders they are in, so
        a finished run is recognised wherever its record is put back (``import_results``)."""
        content = {"model": self.model.to_dict(), "train": self.train.to_dict(), "data": data_fingerprint}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def as_overencoding(config: ModelConfig) -> ModelConfig:
    """The OverEncoding baseline with the table parameters of ``config``'s Engram layers.

    OverEncoding averages hashed n-gram embeddings (orders 2..N, K heads each, rows of d/K) into
    the input embedding (docs/definition.md, "Ablation switches and controls"); its tables get the
    largest equal base size that ``config``'s Engram tables' parameter count allows. The Engram
    projections and convolution have no counterpart, so the total is smaller by their size.
    """
    if config.engram is None:
        raise ValueError("memory='overencoding' replaces Engram layers: the variant needs rho or add_engram")
    budget = estimate_parameters(config).engram_tables
    layers = dataclasses.replace(config.engram, variant="overencoding", layer_ids=[0], n_embed_per_ngram=config.d_model)
    return dataclasses.replace(config, engram=fit_table_sizes(layers, budget, context="the OverEncoding budget"))


def _with_overrides(config: JsonConfig, overrides: list[str], where: str) -> JsonConfig:
    if not overrides:
        return config
    try:
        return type(config).from_dict(apply_overrides(config.to_dict(), overrides))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# -- finding experiments ---------------------------------------------------------------------------
def bundled_experiments() -> dict[str, Path]:
    """The experiments that ship with engram, by name (file stem)."""
    folder = resources.files("engram.research") / "experiments"
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".json")}


def load_experiment(name_or_path: str | Path) -> Experiment:
    """A bundled experiment by name, or an experiment file.

    Raises:
        FileNotFoundError: neither a bundled experiment nor a file (the message lists the bundled ones).
        ConfigError: the file is not a valid experiment (names the file and the key).
    """
    bundled = bundled_experiments()
    path = bundled.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no experiment {str(name_or_path)!r}: not a bundled experiment ({', '.join(sorted(bundled))}) "
            "nor an experiment file"
        )
    experiment = Experiment.load(path)
    try:
        for variant in experiment.variants:  # build every model now: a bad variant fails before any run
            experiment.model_config(variant)
    except ValueError as exc:
        raise ConfigError("variants", str(exc), str(path)) from None
    return experiment
