#!/usr/bin/env bash
# Main job: train a slimmable ResNet-18 on Fashion-MNIST at 4 widths with Algorithm 1 and switchable BN
# (about 10 minutes on 2 CPU cores), then print test top-1, MACs, active parameters and latency per width.
# A second run reuses the finished run (or resumes an interrupted one) instead of starting over.
# Extra arguments go to `slimmable train`, e.g.  bash run.sh --set train.epochs=1
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
bash scripts/get_fashion_mnist.sh || echo "[data] continuing: slimmable will report what is missing"
RECIPE=fmnist_slim_resnet18  # packaged: slimmable/recipes/fmnist_slim_resnet18.yaml
OUT=${SLIMMABLE_OUT:-runs/fmnist_slim_resnet18}
if [ -f "$OUT/final_metrics.json" ]; then
    echo "[run] $OUT already holds a finished run: showing its results (delete $OUT to train again)"
    exec .venv/bin/slimmable report "$OUT"
fi
if [ -f "$OUT/last.pt" ]; then
    echo "[run] $OUT holds an unfinished run: resuming it from $OUT/last.pt"
    exec .venv/bin/slimmable train --resume "$OUT/last.pt" "$@"
fi
exec .venv/bin/slimmable train --recipe "$RECIPE" --out "$OUT" "$@"
