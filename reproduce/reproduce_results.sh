#!/usr/bin/env bash
# Reproduces every number in docs/results.md. Steps are grouped by table. On the measuring machine they ran
# on two job queues, and some ran later than their place here (the comments say which). Every run is
# seeded, so the order does not change a metric.
#
#   M3BSR_DATA=DIR bash reproduce/reproduce_results.sh OUT      (OUT: any folder outside the checkout)
#
# Needs the real data folder DIR (ml100k_mm/, retail_rocket/, tmall/; docs/data.md section 7 lists
# their layout) and the offline item features of ml100k_mm (docs/features.md; produced once by
# `m3bsr features`, then reused), in $M3BSR_FEATURES (default OUT/features), encoded there first when absent:
#   ml100k_text.parquet (MiniLM-L6, 384-d, title + overview)
#   ml100k_image.parquet (EfficientNet-Lite0, 1280-d, posters)
# Runs from anywhere: it changes to the checkout, whose .venv it uses (or $M3, an m3bsr command).
# Measured on a CPU-only machine (2 cores shared with other jobs, load 4-6), two jobs at a time with one
# thread each: step 2 (the fixed-budget table) took 26 min of wall time (m3bsr in one process, the baselines in the other); the
# ablations, FLAG alternatives and probes ~35 min; retail_rocket 5 min; the tmall sample ~20 min. Run
# one after the other, as written here, expect roughly double. Step 2b (the fixed budget at lr 3e-3) took 12 min
# on an almost idle machine. Every run is seeded, so the same machine
# gives the same metrics.
# Steps 6-7 (sweeps, the paper-grid screen and the tuned Table 1) took 03:46-05:56 of wall time on two job
# queues (one thread each) plus an occasional third job: about 4.3 CPU-hours, M3BSR most of it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"  # paths, $M3, the ml100k_mm features

# `/usr/bin/time -v` appends each command's peak RSS ("Maximum resident set size") to $OUT/time.log.
TIME="/usr/bin/time -v -a -o $OUT/time.log"

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
mkdir -p "$OUT/timing"
for m in m3bsr sasrec gru4rec bert4rec mbstr mmsasrec pop; do
  $TIME $M3 train --dataset "$OUT/data/ml100k_mm" --model $m --set train.max_epochs=2 \
      --set train.eval_test=false --device cpu --quiet --overwrite --out "$OUT/timing/$m" \
      > "$OUT/timing/$m.log" 2>&1
done

# ---------------------------------------------------------------- 2. fixed shared budget: ml100k_mm, 3 seeds (docs/results.md section 1)
# (run as two processes sharing one OUT: compare reuses finished runs, so the last call only tabulates)
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr --seeds 0,1,2 $SHARED \
    --out "$OUT/ml100k/compare" --quiet
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec \
    --seeds 0,1,2 $SHARED --out "$OUT/ml100k/compare" --quiet
$M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr,pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec \
    --seeds 0,1,2 $SHARED --out "$OUT/ml100k/compare" --quiet          # → results.md / .csv / .png

# ---------------------------------------------------------------- 2b. the fixed budget at the validation-chosen lr (section 1b)
# (run last, after step 4, once the lr probe of step 3 had chosen 3e-3; same two-process pattern)
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr --seeds 0,1,2 $SHARED --set train.lr=0.003 \
    --out "$OUT/ml100k_lr3/compare" --quiet
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec \
    --seeds 0,1,2 $SHARED --set train.lr=0.003 --out "$OUT/ml100k_lr3/compare" --quiet
$M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr,pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec \
    --seeds 0,1,2 $SHARED --set train.lr=0.003 --out "$OUT/ml100k_lr3/compare" --quiet

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

# Diagnostics for the gap to SASRec (validation only, seed 0, 3 epochs):
#  a learning-rate probe (3e-3 against the default 1e-3 of step 2) for m3bsr and sasrec, and m3bsr
#  on the same split without the content features (id only; same valid/test files, checked with cmp).
for m in m3bsr sasrec; do
  $TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model $m --grid "train.lr=0.003" $SHARED \
      --set train.max_epochs=3 --set seed=0 --out "$OUT/sweeps/${m}_lr" --quiet
done
$M3 prepare "$DATA/ml100k_mm" --preset ml100k_mm --out "$OUT/data/ml100k_id"
$TIME $M3 sweep --dataset "$OUT/data/ml100k_id" --model m3bsr --grid "model.scorer=linear" $SHARED \
    --set train.max_epochs=3 --set seed=0 --out "$OUT/sweeps/m3bsr_idonly" --quiet

# Longer runs at lr 3e-3 (validation only): does M3BSR catch up with more epochs?
# (run between the retail_rocket and tmall steps, on the same queue)
for m in sasrec m3bsr; do
  $TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model $m --grid "train.lr=0.003" $SHARED \
      --set train.max_epochs=15 --set train.patience=3 --set seed=0 --out "$OUT/sweeps/${m}_long" --quiet
done

# ---------------------------------------------------------------- 4. retail_rocket and tmall_u5000 (id only)
# Seed 0 first: one compare call per model (so /usr/bin/time gives each model's peak RSS), then one
# call over all models that only tabulates. retail_rocket then got seeds 1 and 2 (tmall: 1 seed, budget).
for ds in retail_rocket tmall_u5000; do
  for m in pop gru4rec sasrec bert4rec mbstr m3bsr; do
    $TIME $M3 compare --dataset "$OUT/data/$ds" --models $m --seeds 0 $SHARED \
        --out "$OUT/$ds/compare" --quiet
  done
  seeds=0; [ $ds = retail_rocket ] && seeds=0,1,2
  $M3 compare --dataset "$OUT/data/$ds" --models m3bsr,pop,gru4rec,sasrec,bert4rec,mbstr --seeds $seeds \
      $SHARED --out "$OUT/$ds/compare" --quiet
done
# ---------------------------------------------------------------- 6. hyper-parameter sweeps (validation only)
# Section 2 of docs/results.md. Every model: hidden {64,128} x lr {1e-3,3e-3}, up to 30 epochs, patience 3.
SWEEP="--set train.batch_size=64 --set train.device=cpu --set data.max_len=50"
for m in sasrec gru4rec mmsasrec mbstr bert4rec; do
  $TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model $m --grid "model.hidden_size=64,128 train.lr=1e-3,3e-3" \
      $SWEEP --set train.max_epochs=30 --set train.patience=3 --out "$OUT/sw/$m" --emit-best "$OUT/sw/$m.best.yaml" --quiet
done
# M3BSR regularisation at lr 3e-3 (up to 15 epochs, patience 3): dropout x weight decay, then two stronger points.
M3REG="$SWEEP --set train.lr=3e-3 --set train.max_epochs=15 --set train.patience=3"
$TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "model.dropout=0.2,0.5 train.weight_decay=0,1e-4" \
    $M3REG --out "$OUT/sw/m3bsr_reg" --quiet
$TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "train.weight_decay=1e-3" --set model.dropout=0.5 \
    $M3REG --out "$OUT/sw/m3bsr_reg2" --quiet
$TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "model.dropout=0.7" --set train.weight_decay=1e-4 \
    $M3REG --out "$OUT/sw/m3bsr_reg3" --quiet
# M3BSR paper grid, one axis at a time around the defaults, screened at 4 epochs (lr 3e-3): each axis is
# its own sweep; model.T_m=10 is the default point every other axis is compared with.
SCREEN="$SWEEP --set train.lr=3e-3 --set train.max_epochs=4 --set train.patience=4"
for axis in "model.T_m=5,10,15" "model.T_b=5,15" "model.lambda_c=0.01,0.15" "model.lambda_m=0.01,0.15" \
            "model.lambda_b=0.01,0.15" "model.tau=0.1,1.0" "model.hidden_size=128" "model.id_dim=64"; do
  name=$(echo "$axis" | sed 's/=.*//; s/model\.//')
  $TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "$axis" $SCREEN --out "$OUT/sw/m3_$name" --quiet
done
$TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "model.scorer=tied" --set model.id_dim=64 $SCREEN \
    --out "$OUT/sw/m3_tied64" --quiet
# The best screened values together with the best regularisation, trained until early stopping.
$TIME $M3 sweep --dataset "$OUT/data/ml100k_mm" --model m3bsr --grid "model.T_m=15" --set model.lambda_c=0.15 --set model.lambda_m=0.15 --set model.lambda_b=0.15 \
    --set model.dropout=0.5 --set train.weight_decay=1e-4 $M3REG --out "$OUT/sw/m3_combo" --quiet

# ---------------------------------------------------------------- 7. Table 1, tuned: every model at its validation-best setting
# reproduce/configs/ml100k_tuned.yaml holds each model's winner from step 6 (per-model hidden size, lr,
# and M3BSR's regularisation); the epoch budget, early stopping and batch size are shared.
TUNED="--config reproduce/configs/ml100k_tuned.yaml"
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr --seeds 0,1,2 $TUNED --out "$OUT/ml100k_tuned" --quiet
$TIME $M3 compare --dataset "$OUT/data/ml100k_mm" --models pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec --seeds 0,1,2 \
    $TUNED --out "$OUT/ml100k_tuned" --quiet
$M3 compare --dataset "$OUT/data/ml100k_mm" --models m3bsr,pop,gru4rec,sasrec,bert4rec,mbstr,mmsasrec --seeds 0,1,2 \
    $TUNED --out "$OUT/ml100k_tuned" --quiet                    # → results.md / .csv / .png

# ---------------------------------------------------------------- 5. summary tables (docs/results.md sections 2-4)
# The second snippet is the analysis in section 5 of docs/results.md: the share of test targets that
# appeared earlier in the user's auxiliary stream (0) or target stream (1).
.venv/bin/python - "$OUT" <<'EOF'
"""Tables for docs/results.md from the run directories under OUT (argv[1])."""
import json
import re
import sys
from pathlib import Path

OUT = Path(sys.argv[1])


def rss_gb(*needles: str):
    """peak RSS (GB) of the first `/usr/bin/time -v` block (any log under OUT, or OUT/time.log written by
    `time -a -o`) whose command line contains every needle."""
    logs = sorted(OUT.glob("*.log")) + sorted(OUT.glob("*/*.log"))
    for log in logs:
        for block in log.read_text(errors="replace").split("Command being timed:")[1:]:
            cmd = block.splitlines()[0].replace("\"", "") + " "
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", block)
            if m and all(n in cmd for n in needles):
                return f"{int(m.group(1)) / 1e6:.2f}"
    return "n/a"


def best_upto(run: Path, n: int):
    """valid metrics of the best epoch among the first n (strict improvement of full NDCG@10, like the engine)."""
    best = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["epoch"] <= n and (best is None or e["valid"]["full"]["NDCG@10"] > best["valid"]["full"]["NDCG@10"]):
            best = e
    return best


def row(name, valid, epoch, spe, rss, ref=None):
    f, s = valid["full"], valid["sampled"]
    gain = "" if ref is None else f"{100 * (f['NDCG@10'] - ref) / ref:+.1f} %"
    return (f"| {name} | {f['HR@10']:.4f} | {f['NDCG@10']:.4f} | {f['MRR']:.4f} | {s['HR@10']:.4f} | "
            f"{s['NDCG@10']:.4f} | {gain} | {epoch} | {spe} | {rss} |")


print("## ablations and flag alternatives (valid, seed 0, 3 epochs)\n")
print("| variant | full HR@10 | full NDCG@10 | full MRR | sampled HR@10 | sampled NDCG@10 | Δ full NDCG@10 vs default "
      "| best epoch | s/epoch | peak RSS GB |")
print("|---|---|---|---|---|---|---|---|---|---|")
ref_run = OUT / "ml100k/compare/runs/m3bsr-s0"
ref = best_upto(ref_run, 3) if (ref_run / "metrics.jsonl").is_file() else None
if ref:
    spe = [json.loads(l)["seconds"] for l in (ref_run / "metrics.jsonl").read_text().splitlines()][:3]
    print(row("default (m3bsr-s0, epochs 1-3)", ref["valid"], ref["epoch"], f"{sum(spe) / len(spe):.1f}", "see cost"))
names = ["no_cdmd_m", "no_cdmd_b", "no_meie", "no_shared_expert", "no_disentangle", "contrast_literal",
         "fusion_router", "diffusion_loss_literal", "denoise_output_reverse_chain", "denoise_output_none", "scorer_tied"]
logs = {}
for j in sorted((OUT / "queue").glob("job*.sh")):
    m = re.search(r"--out \S*/ablations/(\S+)", j.read_text())
    if m:
        logs[m.group(1)] = j.with_suffix(".log")
for n in names:
    runs = sorted((OUT / "ablations" / n / "runs").glob("*/metrics.json"))
    if not runs:
        print(f"| {n} | not run (budget) |||||||||")
        continue
    mj = json.loads(runs[0].read_text())
    print(row(n, mj["valid"], mj["best_epoch"], f"{mj['seconds_per_epoch']:.1f}", rss_gb(f"/ablations/{n} "),
              ref["valid"]["full"]["NDCG@10"] if ref else None))

print("\n## learning-rate probe (valid, seed 0, 3 epochs; reference = the compare run's first 3 epochs at lr 1e-3)\n")
print("| model | lr | full HR@10 | full NDCG@10 | full MRR | sampled HR@10 | sampled NDCG@10 | Δ full NDCG@10 | best epoch | s/epoch | peak RSS GB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for model in ["m3bsr", "sasrec"]:
    r0 = OUT / f"ml100k/compare/runs/{model}-s0"
    if not (r0 / "metrics.jsonl").is_file():
        continue
    b = best_upto(r0, 3)
    print(row(f"{model} | 0.001", b["valid"], b["epoch"], "", ""))
    runs = sorted((OUT / "sweeps" / f"{model}_lr" / "runs").glob("*/metrics.json"))
    if runs:
        mj = json.loads(runs[0].read_text())
        log = next((j.with_suffix(".log") for j in (OUT / "queue").glob("job*.sh") if f"sweeps/{model}_lr" in j.read_text()), Path("-"))
        print(row(f"{model} | 0.003", mj["valid"], mj["best_epoch"], f"{mj['seconds_per_epoch']:.1f}", rss_gb(f"/sweeps/{model}_lr "),
                  b["valid"]["full"]["NDCG@10"]))
    else:
        print(f"| {model} | 0.003 | not run (budget) ||||||||")

ido = sorted((OUT / "sweeps" / "m3bsr_idonly" / "runs").glob("*/metrics.json"))
b = best_upto(OUT / "ml100k/compare/runs/m3bsr-s0", 3)
if ido:
    mj = json.loads(ido[0].read_text())
    print("\n## m3bsr without content features (ml100k_id: same split, id only; valid, seed 0, 3 epochs)\n")
    print("| input | full HR@10 | full NDCG@10 | full MRR | sampled HR@10 | sampled NDCG@10 | Δ full NDCG@10 | best epoch | s/epoch | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(row("id + text + image (default)", b["valid"], b["epoch"], "", ""))
    print(row("id only", mj["valid"], mj["best_epoch"], f"{mj['seconds_per_epoch']:.1f}",
              rss_gb("/sweeps/m3bsr_idonly "), b["valid"]["full"]["NDCG@10"]))

print("\n## longer runs at lr 3e-3 (valid, seed 0, up to 15 epochs, patience 3): valid full NDCG@10 per epoch\n")
for model in ["sasrec", "m3bsr"]:
    runs = sorted((OUT / "sweeps" / f"{model}_long" / "runs").glob("*/metrics.jsonl"))
    if not runs:
        print(f"* {model}: not run (budget)")
        continue
    eps = [json.loads(l) for l in runs[0].read_text().splitlines()]
    done = (runs[0].parent / "metrics.json").is_file()
    traj = ", ".join(f"{e['valid']['full']['NDCG@10']:.4f}" for e in eps)
    best = max(eps, key=lambda e: e["valid"]["full"]["NDCG@10"])
    print(f"* {model}: {traj} (best {best['valid']['full']['NDCG@10']:.4f} at epoch {best['epoch']}, "
          f"sampled {best['valid']['sampled']['NDCG@10']:.4f}; {'finished' if done else 'stopped by the time limit'})")

print("\n## cost per model (training seconds per epoch = mean over the runs' metrics.json; peak RSS of the process)\n")
print("| dataset | model | runs | s/epoch (mean) | epochs run | peak RSS GB | RSS measured by |")
print("|---|---|---|---|---|---|---|")
for ds in ["ml100k", "retail_rocket", "tmall_u5000"]:
    runs = sorted((OUT / ds / "compare" / "runs").glob("*/metrics.json"))
    by = {}
    for r in runs:
        mj = json.loads(r.read_text())
        by.setdefault(r.parent.name.rsplit("-s", 1)[0], []).append(mj)
    for model, mjs in sorted(by.items()):
        spe = sum(m["seconds_per_epoch"] for m in mjs) / len(mjs)
        eps = ",".join(str(m["epochs"]) for m in mjs)
        if ds == "ml100k":
            src, how = (f"/timing/{model} ",), "2-epoch probe, batch 256 (step 1)"
            if model == "m3bsr":
                src, how = ("--models m3bsr --seeds 0,1,2",), "its 3-seed compare process, batch 64"
        else:
            src, how = (f"/{ds}/compare ", f"--models {model} "), "its compare process, batch 64"
        print(f"| {ds} | {model} | {len(mjs)} | {spe:.1f} | {eps} | {rss_gb(*src)} | {how} |")
EOF
.venv/bin/python - "$OUT" <<'EOF'
import sys
import pandas as pd
for d in ["ml100k_mm", "retail_rocket", "tmall_u5000"]:
    ev = pd.read_parquet(f"{sys.argv[1]}/data/{d}/events.parquet")
    te = pd.read_parquet(f"{sys.argv[1]}/data/{d}/test.parquet")
    j = te[["user", "item", "order"]].merge(ev[["user", "item", "order", "stream"]], on=["user", "item"],
                                            suffixes=("", "_h"))
    j = j[j.order_h < j.order]
    print(d, {f"stream {s}": round(j[j.stream == s].user.nunique() / len(te), 4) for s in (0, 1)})
EOF
