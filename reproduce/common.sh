# Sourced by reproduce_results.sh and reproduce_presets.sh: arguments, paths and the ml100k_mm features.
# Sets ROOT, OUT, DATA, FEATURES, TEXT, IMAGE and M3, changes to the checkout and encodes the features once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=$(realpath -m "${1:?usage: M3BSR_DATA=DIR bash reproduce/$(basename "$0") OUT  (OUT: a folder outside the checkout)}")
DATA=$(realpath -m "${M3BSR_DATA:?set M3BSR_DATA to the real data folder (ml100k_mm/, retail_rocket/, tmall/)}")
FEATURES=$(realpath -m "${M3BSR_FEATURES:-$OUT/features}")
TEXT="$FEATURES/ml100k_text.parquet"
IMAGE="$FEATURES/ml100k_image.parquet"
cd "$ROOT"  # the commands name files of the checkout (.venv, reproduce/configs) relative to it
M3="${M3:-.venv/bin/m3bsr}"
export OMP_NUM_THREADS=1

# ---------------------------------------------------------------- features of ml100k_mm (once, then reused)
mkdir -p "$OUT" "$FEATURES"
[ -f "$TEXT" ] || $M3 features text "$DATA/ml100k_mm/items.csv" --columns title,overview --out "$TEXT" --quiet
[ -f "$IMAGE" ] || $M3 features image "$DATA/ml100k_mm/posters" --out "$IMAGE" --quiet
