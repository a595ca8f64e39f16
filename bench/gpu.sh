#!/usr/bin/env bash
# The benchmarks on one CUDA GPU, in bf16 on both sides, with a Qwen2.5-0.5B-shaped model built from its
# config with random weights and a tokenizer trained on the spot: nothing is downloaded.
#
#   bash bench/gpu.sh wheels     # on a machine with pip access: put the Python packages the GPU machine may
#                                # lack (the versions this checkout's .venv uses) in .whl/ (about 25 MB,
#                                # plus bitsandbytes' wheel, which holds its CUDA kernels: 125 MB installed)
#   bash bench/gpu.sh [OUT_DIR]  # on the GPU machine, from the repository root: run everything (a few minutes)
#
# The run needs python3 with a CUDA build of torch. Wheels in .whl/ are installed into /tmp/site first when
# present. It writes, under OUT_DIR (default $OUT, else /tmp/tunesmith-gpu-bench): gpu.txt (the card),
# sft.jsonl (LoRA SFT, full SFT, continued pretraining), dpo.jsonl, grpo.jsonl, fsdp.jsonl (2+ GPUs), qlora.jsonl
# (LoRA against QLoRA nf4 and int8, bitsandbytes), and each one's log.
# Goal on GPU (issue "Performance"): >= 2x TRL's tokens/s at <= 0.4x its peak GPU memory (peak_cuda_mib).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="transformers tokenizers huggingface_hub hf_xet peft trl datasets accelerate dill multiprocess xxhash fsspec safetensors bitsandbytes"

if [ "${1:-}" = "wheels" ]; then
    pin() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for name in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name==$(pin "$name")"
    done
    du -sh .whl
    exit 0
fi

out=${1:-${OUT:-/tmp/tunesmith-gpu-bench}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, trl; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)" \
    | tee -a "$out/gpu.txt"

model=/tmp/tunesmith-qwen2.5-0.5b-shaped
[ -f "$model/model.safetensors" ] || python3 bench/make_model.py --shape qwen2.5-0.5b --out "$model" | tee -a "$out/gpu.txt"

python3 bench/sft.py --model-path "$model" --rows 256 --workdir /tmp/tunesmith-gpu-sft 2> "$out/sft.log" | tee "$out/sft.jsonl"
python3 bench/dpo.py --model-path "$model" --pairs 64 --steps 8 --workdir /tmp/tunesmith-gpu-dpo 2> "$out/dpo.log" \
    | tee "$out/dpo.jsonl"
python3 bench/grpo.py --model-path "$model" --steps 4 --workdir /tmp/tunesmith-gpu-grpo 2> "$out/grpo.log" \
    | tee "$out/grpo.jsonl"
# FSDP against DDP, full SFT on every GPU of the machine (at most 8): peak GPU memory per rank and tokens/s.
# FSDP on one rank shards nothing, so a single-GPU machine skips it and says so.
ngpu=$(nvidia-smi -L | wc -l)
if [ "$ngpu" -ge 2 ]; then
    python3 bench/fsdp.py --model-path "$model" --nproc "$(( ngpu < 8 ? ngpu : 8 ))" --rows 128 --max-length 1024 \
        --batch-size 4 --steps 8 --workdir /tmp/tunesmith-gpu-fsdp 2> "$out/fsdp.log" | tee "$out/fsdp.jsonl"
else
    echo "{\"bench\": \"fsdp\", \"skipped\": \"needs at least 2 GPUs, found $ngpu\"}" | tee "$out/fsdp.jsonl"
fi
python3 bench/qlora.py --model-path "$model" --rows 256 --sides lora,nf4,int8 --workdir /tmp/tunesmith-gpu-qlora \
    2> "$out/qlora.log" | tee "$out/qlora.jsonl"
echo "wrote $out: gpu.txt sft.jsonl dpo.jsonl grpo.jsonl fsdp.jsonl qlora.jsonl and their logs"
