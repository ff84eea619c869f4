"""How a training step updates the model: plain torch AdamW, or a DeepSpeed ZeRO engine
(stage 0-3, optional CPU offload, bf16) when `zero_stage` is set. Both expose the same
three things to the training loop: the module to call, `micro_step`, and `consolidated`
(the full-weight model for evaluation and saving, gathered under ZeRO-3)."""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

import torch
from transformers import PreTrainedModel


class TorchStepper:
    def __init__(self, model: PreTrainedModel, params: Any):
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.learning_rate, weight_decay=0.0)
        self.accumulation = params.gradient_accumulation

    def micro_step(self, loss: torch.Tensor, boundary: bool) -> None:
        (loss / self.accumulation).backward()
        if boundary:
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def consolidated(self) -> PreTrainedModel:
        return self.model


def zero_config(params: Any) -> dict:
    """A DeepSpeed config for one of our parameter sets."""
    zero: dict[str, Any] = {"stage": params.zero_stage}
    if params.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if params.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": params.batch_size,
        "gradient_accumulation_steps": params.gradient_accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(params.bf16)},
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also when offloading
        "steps_per_print": 10**9,
    }


def ensure_distributed() -> None:
    """A process group for DeepSpeed. Under a launcher (torchrun, Ray Train) its variables
    are set; a lone process gets the single-rank ones, so DeepSpeed does not look for MPI."""
    import deepspeed

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedStepper:
    def __init__(self, model: PreTrainedModel, params: Any):
        import deepspeed

        ensure_distributed()
        self.stage = params.zero_stage
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
        self.template = copy.deepcopy(model) if self.stage == 3 else None  # unpartitioned shell to consolidate into
        self.model, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable, config=zero_config(params))

    def micro_step(self, loss: torch.Tensor, boundary: bool) -> None:
        # The engine scales by the accumulation steps and steps only at its boundaries.
        self.model.backward(loss)
        self.model.step()

    def consolidated(self) -> PreTrainedModel:
        """The trained weights in an ordinary module (ZeRO-3 gathers its partitions; every
        rank must call this)."""
        module = self.model.module
        if self.stage != 3:
            return module
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        self.template.load_state_dict(state)
        return self.template.eval()


def make_stepper(model: PreTrainedModel, params: Any) -> TorchStepper | DeepSpeedStepper:
    return DeepSpeedStepper(model, params) if params.zero_stage >= 0 else TorchStepper(model, params)
