#!/usr/bin/env bash
# The first GPU run, as one script: versions, the CUDA-relevant tests, training throughput of
# an OLMo-2 1B (full bf16, ZeRO-2, QLoRA: tokens/s, MFU, peak memory against the plan), the
# real-size evaluation at 1B (tokens/s per stage, projected minutes per evaluation and screen),
# and a packed against an unpacked sweep of a 150M model (trials/hour, peak memory). Each step
# has its own time limit (8.5 minutes in all, install aside; about 7.9 expected from the steps'
# times on an H200 on 2026-12-04) and the next runs whatever it ends with; every figure goes to
# OUT (default: $OUT, else ./gpu_check), at most 8 files.
#
#   bash benchmarks/gpu_check.sh [OUT]          # on a GPU machine with the project installed
#   SMOKE=1 bash benchmarks/gpu_check.sh [OUT]  # on a CPU: tiny sizes, checks the script
#   STEPS="evaluation sweep" bash benchmarks/gpu_check.sh [OUT]  # a rerun of some steps only
#
# On the lent machine, which lacks most of the stack: build the carry folder here first
# (`python benchmarks/gpu_bundle.py`, into .gpu_bundle), carry it, and this script unpacks it and
# installs the project from the working tree (BUNDLE names another folder).
# TASK names a built toy task to reuse (`unlearn-sweep toy-task --out DIR`); else the bundle's,
# else it is built. DATA: the SemEval data the evaluation step reads (the bundle carries a copy of
# ../shared/data/semeval25, which does not travel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
SMOKE=${SMOKE:-0}
BUNDLE=${BUNDLE:-.gpu_bundle}
STEPS=${STEPS:-versions toy_task tests train evaluation sweep}  # a rerun may name fewer
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
# Models, sweeps and the unpacked bundle go to a scratch folder: OUT holds the figures alone (a
# device run returns at most 8 files of 16 MiB from it).
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -f "$BUNDLE/site.tar.xz" ]; then
    SITE=$WORK/site
    # The project is built from a copy: a build in the tree leaves build/lib, which later wheels ship.
    mkdir -p "$SITE" "$WORK/source" &&
        cp -r pyproject.toml README.md orchestrator methods evaluation corpus search_spaces "$WORK/source" &&
        tar -xJf "$BUNDLE/site.tar.xz" -C "$SITE" &&
        PYTHONPATH="$SITE" "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" \
            "$WORK/source" ||
        { echo "gpu_check: $BUNDLE/site.tar.xz did not install"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    TASK=${TASK:-$BUNDLE/toy_task}
    [ -d "$BUNDLE/semeval25" ] && DATA=${DATA:-$BUNDLE/semeval25}
fi
TASK=${TASK:-$WORK/toy_task}
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
printf 'step\tseconds\texit\n' > "$OUT/steps.tsv"

step() {  # step NAME SECONDS COMMAND...: its output in OUT/NAME.txt, its time and exit code in steps.tsv
    local name=$1 limit=$2 start code
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    start=$(date +%s)
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    code=$?
    printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - start ))" "$code" >> "$OUT/steps.tsv"
    tail -n 8 "$OUT/$name.txt"
}

step versions 15 "$PYTHON" - <<'EOF'
import importlib.metadata as metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
for package in ("transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "ray", "optuna", "mlflow", "vllm"):
    try:
        print(package, metadata.version(package))
    except metadata.PackageNotFoundError:
        print(package, "not installed")
EOF

if [ ! -f "$TASK/toy_task.json" ]; then
    step toy_task 240 "$PYTHON" -m unlearn_sweep.orchestrator.cli toy-task --out "$TASK"
fi
TASK=$(cd "$TASK" && pwd)
export UNLEARN_SWEEP_TEST_TOY_TASK="$TASK"

if [ "$SMOKE" = 1 ]; then
    step tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_compat.py tests/test_memory_plan.py
    step train 300 "$PYTHON" benchmarks/train_throughput.py --smoke --task "$TASK" --dir "$WORK/models" \
        --json "$OUT/train.json"
    step evaluation 300 "$PYTHON" benchmarks/eval_real_size.py --size 110M --fraction 0.002 ${DATA:+--data "$DATA"}
    step sweep 400 "$PYTHON" benchmarks/gpu_sweep.py --smoke --task "$TASK" --dir "$WORK/sweep"
else
    # The tests whose path differs on a GPU: vLLM, bf16 and TF32, QLoRA, DeepSpeed, device placement.
    step tests 70 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_compat.py tests/test_evaluator.py \
        tests/test_methods.py -k "vllm or bf16 or qlora or deepspeed or lora or gpu or device"
    step train 65 "$PYTHON" benchmarks/train_throughput.py --size 1B --task "$TASK" --dir "$WORK/models" \
        --json "$OUT/train.json"
    step evaluation 60 "$PYTHON" benchmarks/eval_real_size.py --size 1B --fraction 0.01 ${DATA:+--data "$DATA"}
    step sweep 300 "$PYTHON" benchmarks/gpu_sweep.py --params 150M --trials 2 --pack 2 --task "$TASK" \
        --dir "$WORK/sweep"
fi
echo "== steps (seconds, exit code; 124: its time limit)"
cat "$OUT/steps.tsv"
