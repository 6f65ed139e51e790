#!/usr/bin/env bash
# Run the CUDA paths on a GPU machine: training, 8/4-bit, eval, export, resume with the CUDA RNG state,
# and (with 2 or more GPUs) a 2-process torchrun. A few minutes on one GPU; skipped tests say why.
#   scripts/gpu_check.sh            (after: pip install -e ".[test]" with a CUDA build of torch)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__} (CPU build? CUDA_VISIBLE_DEVICES?)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
PY
exec python -m pytest -m gpu -rs -v tests/ "$@"
