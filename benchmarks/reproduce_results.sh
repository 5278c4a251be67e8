#!/usr/bin/env bash
# Reproduces every number in docs/results.md, in the order they were produced.
#
#   bash benchmarks/reproduce_results.sh [OUT]      (OUT defaults to /work/results; never inside the repo)
#
# Needs the real data under ../shared/data (see /work/shared/data/README.md) and the offline item
# features of ml100k_mm (docs/features.md; produced once by `m3bsr features`, then reused):
#   TEXT=.../ml100k_text.parquet (MiniLM-L6, 384-d, title + overview)
#   IMAGE=.../ml100k_image.parquet (EfficientNet-Lite0, 1280-d, posters)
# Measured on a CPU-only machine (2 cores shared with other jobs): the ml100k_mm part took ~45 min of
# wall time with two jobs at a time, one thread each. Every run is seeded, so the same machine gives
# the same metrics.
set -euo pipefail
OUT=${1:-/work/results}
DATA=${DATA:-../shared/data}
TEXT=${TEXT:-/work/cache/ml100k_text.parquet}
IMAGE=${IMAGE:-/work/cache/ml100k_image.parquet}
M3="${M3:-.venv/bin/m3bsr}"
export OMP_NUM_THREADS=1
# `/usr/bin/time -v` reports the peak RSS ("Maximum resident set size") of each command.
TIME="/usr/bin/time -v"

# The shared budget of every model (fairness: same epochs, early stopping, batch, lr, hidden size, window).
SHARED="--set train.max_epochs=5 --set train.patience=2 --set train.batch_size=64 --set train.lr=0.001
        --set model.hidden_size=64 --set data.max_len=50 --set train.device=cpu"

# ---------------------------------------------------------------- 0. prepared datasets
$M3 prepare "$DATA/ml100k_mm" --preset ml100k_mm --out "$OUT/data/ml100k_mm" \
    --set features.text="$TEXT" --set features.image="$IMAGE"
$M3 prepare "$DATA/retail_rocket" --preset retail_rocket --out "$OUT/data/retail_rocket"
# Tmall: a documented user sample (5,000 of the 31,882 users, numpy default_rng(0), without replacement),
# all events of the sampled users kept, then the normal preset pipeline.
mkdir -p "$OUT/src/tmall_u5000"
.venv/bin/python - "$DATA/tmall/events.csv.gz" "$OUT/src/tmall_u5000/events.csv.gz" <<'EOF'
import sys
import numpy as np
import pandas as pd
ev = pd.read_csv(sys.argv[1])
users = np.sort(ev["user"].unique())
keep = np.random.default_rng(0).choice(users, size=5000, replace=False)
ev[ev["user"].isin(keep)].to_csv(sys.argv[2], index=False)
EOF
$M3 prepare "$OUT/src/tmall_u5000" --preset tmall --out "$OUT/data/tmall_u5000"

# ---------------------------------------------------------------- 1. cost probe (seconds/epoch, peak RSS)
# 2 epochs of each model at the engine defaults (batch 256), test not evaluated.
for m in m3bsr sasrec gru4rec bert4rec mbstr mmsasrec pop; do
  $TIME $M3 train --dataset "$OUT/data/ml100k_mm" --model $m --set train.max_epochs=2 \
      --set train.eval_test=false --device cpu --quiet --overwrite --out "$OUT/timing/$m" \
      > "$OUT/timing/$m.log" 2>&1
done

# ---------------------------------------------------------------- 2. Table 1: ml100k_mm, 3 seeds
# (run as two processes sharing one OUT: compare reuses finished runs, so the last call only tabulates)
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr --seeds 0,1,2 $SHARED \
    --out "$OUT/ml100k/compare" --quiet
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec \
    --seeds 0,1,2 $SHARED --out "$OUT/ml100k/compare" --quiet
$M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr,pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec \
    --seeds 0,1,2 $SHARED --out "$OUT/ml100k/compare" --quiet          # → results.md / .csv / .png

# ---------------------------------------------------------------- 3. ablations and FLAG alternatives
# Validation only, seed 0, 3 epochs (the reference is the default m3bsr-s0 run of step 2, best valid
# over its first 3 epochs, read from its metrics.jsonl).
for v in no_cdmd_m no_cdmd_b no_meie no_shared_expert no_disentangle; do
  $TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "model.$v=true" $SHARED \
      --set train.max_epochs=3 --set seed=0 --out "$OUT/ablations/$v" --quiet
done
for v in contrast=literal fusion=router diffusion_loss=literal denoise_output=reverse_chain \
         denoise_output=none scorer=tied; do
  $TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "model.$v" $SHARED \
      --set train.max_epochs=3 --set seed=0 --out "$OUT/ablations/${v/=/_}" --quiet
done

# ---------------------------------------------------------------- 4. retail_rocket and tmall_u5000 (id only)
# One seed; one compare call per model (so /usr/bin/time gives each model's peak RSS), then one
# call over all models that only tabulates.
for ds in retail_rocket tmall_u5000; do
  for m in pop gru4rec sasrec bert4rec mbstr m3bsr; do
    $TIME $M3 compare --dataset "$OUT/data/$ds" --models $m --seeds 0 $SHARED \
        --out "$OUT/$ds/compare" --quiet
  done
  $M3 compare --dataset "$OUT/data/$ds" --models m3bsr,pop,gru4rec,sasrec,bert4rec,mbstr --seeds 0 \
      $SHARED --out "$OUT/$ds/compare" --quiet
done
