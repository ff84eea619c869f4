"""A sweep's length caps against its data, checked before anything starts. A method whose
max_length (the highest its search space allows) is shorter than examples it trains on cuts
their ends, the answer text it is to forget or keep, in every trial, with nothing to see but a
weaker result; such a sweep is refused with the length that would hold its data."""

from __future__ import annotations

from transformers import AutoTokenizer
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.methods.registry import get_method
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig
from unlearn_sweep.orchestrator.plan import PlanRow


def check_lengths(config: SweepConfig, rows: list[PlanRow]) -> None:
    """A ConfigError naming the first method's max_length that cuts examples of a fold its
    trials train on (the one searched on, and the confirmation's), counted with the model's
    own tokenizer; `rows` (the memory plan's) hold each method's highest max_length."""
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    folds = [config.split] + ([config.confirm.split] if config.confirm else [])
    tasks = {fold: load_task(config.data, fold) for fold in folds}
    caps = {row.space: row for row in rows}  # a method's rows share its highest max_length
    for space, row in caps.items():
        method = get_method(row.method)
        for fold, task in tasks.items():
            _, _, cut = method.examples(tokenizer, task, row.params)
            if cut.cut:
                raise ConfigError(
                    config.source,
                    f"{row.method}: {cut} of {f'the {fold} fold' if fold else 'the data'} with the model's "
                    f"tokenizer; their answers would be cut in every trial: give max_length {cut.longest} or more",
                    field=f"search_space_overrides.{space}.max_length",
                )
