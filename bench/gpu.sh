#!/usr/bin/env bash
# The GPU checks, in one go on a machine with a CUDA GPU, torch and transformers (the rest of
# refdir's dependencies on PYTHONPATH): refdir's CUDA tests; refdir against the paper's code
# (bench/peer.py) on a random-weight model of Llama-3-8B's shape in bfloat16, with op tables of
# one layer's scoring by each; refdir's scoring at a larger batch; `refdir run`'s steps on that
# shape (bench/run_shape.py); the whole suite with its tiny models on the GPU.
# Each part has its own time limit and log under OUT. All parts take about 15 minutes, more
# than one device call may run: PARTS picks some, e.g. PARTS="tests peer".
#
#     [PARTS="tests peer batch shape suite"] bench/gpu.sh PEER_CHECKOUT TOKENIZER_DIR OUT [SHAPE]
set -u
peer=$1 tok=$2 out=$3 shape=${4:-llama-3-8b}
parts=" ${PARTS:-tests peer batch shape suite} "
for part in $parts; do
    case $part in tests|peer|batch|shape|suite) ;; *) echo "unknown part '$part' in PARTS: tests peer batch shape suite" >&2; exit 2 ;; esac
done
mkdir -p "$out"
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
quiet() { grep -v -e '%|' -e 'Warning' -e 'warn(' ; }
want() { [[ $parts == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"
if want tests; then
    echo "== tests/test_cuda.py"
    timeout 180 python3 -m pytest tests/test_cuda.py -p no:cacheprovider -rs 2>&1 | tail -40 | tee "$out/test_cuda.txt"
fi
if want peer; then
    echo "== bench/peer.py --model $shape"
    timeout 300 python3 bench/peer.py --peer "$peer" --model "$shape" --tokenizer "$tok" --device cuda \
        --dtype bfloat16 --layers 4 12 19 25 --parts ce orthogonalize generation selection \
        --profile "$out/profile" --threads "$(nproc)" 2>&1 | quiet | tee "$out/peer.txt"
fi
if want batch; then
    echo "== bench/peer.py --model $shape --score-batch 192 (a layer's 6 x 32 rows in one pass)"
    timeout 200 python3 bench/peer.py --peer "$peer" --model "$shape" --tokenizer "$tok" --device cuda \
        --dtype bfloat16 --layers 12 19 --parts selection --score-batch 192 \
        --profile "$out/profile_batch192" --threads "$(nproc)" 2>&1 | quiet | tee "$out/peer_batch192.txt"
fi
if want shape; then
    echo "== bench/run_shape.py --shape $shape"
    timeout 240 python3 bench/run_shape.py --shape "$shape" --tokenizer "$tok" --device cuda \
        --out "$(mktemp -d)" --threads "$(nproc)" 2>&1 | quiet | tee "$out/run_shape.txt"
fi
if want suite; then
    echo "== the suite with REFDIR_TEST_DEVICE=cuda"
    REFDIR_TEST_DEVICE=cuda timeout 240 python3 -m pytest tests -m "not slow" -n 8 \
        --ignore tests/test_benchmarks.py -p no:cacheprovider 2>&1 | tail -80 | tee "$out/suite_cuda.txt"
fi
