#!/usr/bin/env bash
# One GPU run of the issue-8 speed comparison, both sides on the same device, one table:
#   PyTorch's paper AlexNet (experiments/torch_reference.py): eager float32, eager bfloat16,
#     torch.compile bfloat16, batch 256;
#   alexnet_jax's real train_step (python -m alexnet_jax.benchmark, configs/benchmark.py): the
#     greedy implementation search at jit/bfloat16/256, then pmap, float32, batch 128 and 512.
#
#   bash experiments/gpu_benchmark.sh      # from the repository root; ~6 minutes on an H100/H200
#
# Writes table.md (table + acceptance ratios), torch.jsonl, jax.jsonl, the logs and
# environment.txt to $OUT when set, else experiments/results/gpu_run/. Each side has its own time
# limit (TORCH_TIMEOUT, JAX_TIMEOUT seconds); both append a row as soon as it is measured, so a
# side cut short keeps its finished rows. Wheels in .whl/ (ml_collections, tqdm: missing from the
# GPU image) are installed to /tmp/site first. PYTHON (default python3), TORCH_ARGS and JAX_ARGS
# (extra flags, e.g. a tiny CPU smoke run of this script) can be set in the environment.
set -u
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-experiments/results/gpu_run}"
mkdir -p "$out"
if compgen -G '.whl/*.whl' > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=3
torch_timeout="${TORCH_TIMEOUT:-110}"
jax_timeout="${JAX_TIMEOUT:-230}"

{
  date -u +'date: %Y-%m-%d %H:%M UTC'
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
    | sed 's/^/gpu: /'
  "$py" - <<'PY' 2>&1
import importlib, sys
print('python:', sys.version.split()[0])
for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'ml_collections'):
  try:
    print(f'{name}:', importlib.import_module(name).__version__)
  except Exception as e:  # report, do not stop the run
    print(f'{name}: unavailable ({type(e).__name__})')
PY
} | tee "$out/environment.txt"

section() {  # name, time limit, command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local note=''
  ((rc == 124)) && note=' (time limit: the rows measured so far are kept)'
  echo "== $name: exit $rc after $((SECONDS - start))s$note"
  ((rc == 0 || rc == 124)) || tail -n 20 "$out/$name.log"
}

# shellcheck disable=SC2086  # *_ARGS are lists of flags
section torch "$torch_timeout" "$py" experiments/torch_reference.py --json="$out/torch.jsonl" \
  ${TORCH_ARGS:-}
# shellcheck disable=SC2086
section jax "$jax_timeout" "$py" -m alexnet_jax.benchmark --config=configs/benchmark.py \
  --json="$out/jax.jsonl" ${JAX_ARGS:-}

rows=$(ls "$out"/torch.jsonl "$out"/jax.jsonl 2>/dev/null | paste -sd, -)
if [[ -n "$rows" ]]; then
  "$py" experiments/gpu_report.py --rows="$rows" --markdown="$out/table.md" 2> "$out/report.log" \
    || tail -n 20 "$out/report.log"
else
  echo 'no rows were measured; see the logs in' "$out"
fi
