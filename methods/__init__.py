"""Unlearning algorithms and model merging."""

import logging

# peft and the Trainer import bitsandbytes, which on a CPU with AVX-512 BF16 logs at import that
# its optional `kernels` package is missing: no method needs it (QLoRA runs on CUDA, and without
# it on a CPU). Set here, before any method imports them: the CLI, trials and the exported
# unlearn.py all come through this package.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
