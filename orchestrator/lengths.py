"""A sweep's length caps against its data, checked before anything starts. A method whose
max_length (the highest its search space allows) is shorter than examples it trains on cuts
their ends, the answer text it is to forget or keep, in every trial, with nothing to see but a
weaker result; such a sweep is refused with the length that would hold its data. Where none is
cut, a batch pads to its longest example, so the memory plan is made at that length."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.methods.registry import get_method
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig
from unlearn_sweep.orchestrator.plan import PlanRow


def has_tokenizer(model: Path) -> bool:
    """A checkpoint's folder holds its tokenizer; a folder of config.json alone (a size to
    plan for, random weights) does not."""
    return (model / "tokenizer_config.json").is_file()


def check_lengths(config: SweepConfig, rows: list[PlanRow]) -> dict[str, int]:
    """By PlanRow.space, the longest example its trials train on, in the model's own tokens,
    over the folds they train on (the one searched on, and the confirmation's); a ConfigError
    naming the first whose max_length (`rows`: each space's highest) would cut one."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        message = f"{config.model}: no tokenizer to count the data's tokens with ({error})"
        raise ConfigError(config.source, message, field="model") from None
    folds = [config.split] + ([config.confirm.split] if config.confirm else [])
    tasks = {fold: load_task(config.data, fold) for fold in folds}
    longest = {}
    for space, row in {row.space: row for row in rows}.items():  # a space's rows share its highest max_length
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
            longest[space] = max(longest.get(space, 0), cut.longest)
    return longest
