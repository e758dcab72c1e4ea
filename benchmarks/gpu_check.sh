#!/usr/bin/env bash
# The --device cuda checks in one go, for a machine with a CUDA GPU: the GPU tests, then the benchmarks (unload of
# the 1.6 GiB and 3B-shaped bases, merges into a base and to an adapter, extract, resize) on cuda and on cpu side by
# side, on the same machine, back to back.
#
#   bash benchmarks/gpu_check.sh                              # everything; logs to $OUT (default /tmp/adaptool-gpu-check)
#   STEPS="gpu_tests unload_3b unload_3b_cpu" bash benchmarks/gpu_check.sh   # some steps
#
# Runs from a checkout without installing it (PYTHONPATH); wheels in .whl/ (e.g. peft==0.21.2, the tests' oracle)
# are installed to /tmp/site first when present. Each step has its own time limit so one slow step cannot eat the rest.
set -u
OUT=${OUT:-/tmp/adaptool-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
py=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers, peft, safetensors; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'peft', peft.__version__, 'safetensors', safetensors.__version__)"
nproc; free -g | head -2

# STEPS: which steps to run (default all), e.g. STEPS="gpu_tests extract" bash benchmarks/gpu_check.sh
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
want gpu_tests && step gpu_tests 120 $py -m pytest -p no:cacheprovider -q -n 8 -x \
    tests/test_engine_gpu.py tests/adapters/test_families.py::test_every_type_on_cuda_matches_cpu \
    tests/commands/test_resize.py::test_cuda_matches_cpu tests/test_device.py
want unload_16L && step unload_16L 90 $py benchmarks/unload.py --device cuda --layers 16 --skip-peft --repeat 2
want unload_16L_cpu && step unload_16L_cpu 80 $py benchmarks/unload.py --device cpu --layers 16 --skip-peft --repeat 2
want unload_3b && step unload_3b 150 $py benchmarks/unload.py --device cuda --shape 3b --layers 28 --repeat 1
want unload_3b_cpu && step unload_3b_cpu 80 $py benchmarks/unload.py --device cpu --shape 3b --layers 28 --repeat 1
want merge_base && step merge_base 100 $py benchmarks/merge.py --device cuda --sections base --into-base ties dare_ties \
    --repeat 1
want merge_adapter && step merge_adapter 120 $py benchmarks/merge.py --device cuda --sections adapter --peft
want merge_adapter_cpu && step merge_adapter_cpu 120 $py benchmarks/merge.py --device cpu --sections adapter --peft
want extract && step extract 120 $py benchmarks/extract.py --device cuda --repeat 1 --mergekit ""
want extract_cpu && step extract_cpu 90 $py benchmarks/extract.py --device cpu --repeat 1 --mergekit ""
want resize && step resize 70 $py benchmarks/resize.py --device cuda --runs 2
want resize_cpu && step resize_cpu $(( ${BUDGET:-530} - SECONDS )) $py benchmarks/resize.py --device cpu --runs 2
exit 0
