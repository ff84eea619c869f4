"""RMU reads one decoder layer's activations. The pass that reads them (forward, and backward of
a loss on them) run cut after that layer (methods/rmu.py: layer_activations) against the whole
model, logits included, as before; an OLMo-2 of random weights with OLMo's vocabulary, on the
CPU, one thread. Both passes alternate, the median of each is printed and their ratio.

    python benchmarks/rmu_layer_cut.py [--layers 16] [--layer 3] [--hidden 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM
from unlearn_sweep.methods.rmu import layer_activations
from unlearn_sweep.methods.training import Batch

OLMO_VOCAB = 100_352  # OLMo-2's output layer


def whole_model(model: Olmo2ForCausalLM, batch: Batch, layer: int) -> torch.Tensor:
    """The earlier pass: every layer and every position's logits."""
    outputs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return outputs.hidden_states[layer + 1][batch.attention_mask.bool()].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--layer", type=int, default=3, help="the layer RMU steers (WMDP: 7 of 32)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Olmo2Config(
        vocab_size=OLMO_VOCAB,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    model = Olmo2ForCausalLM(config)
    ids = torch.randint(0, OLMO_VOCAB, (args.batch, args.length))
    mask = torch.ones_like(ids)
    batch = Batch(ids, mask, torch.full_like(ids, -100))
    times: dict[str, list[float]] = {"cut": [], "whole": []}
    passes = {"cut": layer_activations, "whole": whole_model}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, activations in passes.items():
            start = time.perf_counter()
            activations(model, batch, args.layer).pow(2).mean().backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    cut, whole = (statistics.median(times[name][1:]) for name in ("cut", "whole"))
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"OLMo-2 {parameters:.0f}M parameters, {args.layers} layers, vocabulary {OLMO_VOCAB}, layer {args.layer}, "
        f"batch {args.batch} x {args.length} tokens, CPU, one thread, median of {args.repeats}"
    )
    print(f"whole model: {whole:.2f} s   cut after layer {args.layer}: {cut:.2f} s   ({whole / cut:.1f}x)")


if __name__ == "__main__":
    main()
