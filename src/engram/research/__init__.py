"""Research tooling: experiments as grids of runs (variants x seeds), their runner and their reports."""

from engram.research.experiment import Experiment, RunPlan, Variant, load_experiment
from engram.research.report import summarize
from engram.research.runner import run_experiment

__all__ = ["Experiment", "RunPlan", "Variant", "load_experiment", "run_experiment", "summarize"]
