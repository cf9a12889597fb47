#!/usr/bin/env bash
# Engine-build benchmark: time `build-llm` on a random-weight Llama-3.1-8B-shaped HF
# checkpoint (bf16, ~16 GB) with tp 1 and tp 2, then a --random-weights llama-3.1-8b build;
# report wall time, peak RSS and sizes.
#
#   scripts/bench_build.sh [WORKDIR]     (default /tmp/kiln-bench-build; needs ~50 GB free)
#
# The source checkpoint is created once (scripts/make_random_hf_checkpoint.py) and all
# outputs are deleted at the end, since they are large.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/kiln-bench-build}
SRC=${SRC:-$WORK/llama8b-hf}
export HF_HUB_OFFLINE=1
mkdir -p "$WORK"
if [ ! -f "$SRC/model.safetensors.index.json" ]; then
    /usr/bin/time -v python scripts/make_random_hf_checkpoint.py --preset llama-3.1-8b --output "$SRC" \
        2> "$WORK/make_source.time"
    grep -E "Elapsed|Maximum resident" "$WORK/make_source.time"
fi
echo "source: $(du -sb "$SRC" | cut -f1) bytes"
for TP in 1 2; do
    OUT="$WORK/llama8b-tp$TP"
    rm -rf "$OUT"
    sync; echo "== build-llm $SRC --output $OUT --tp $TP"
    /usr/bin/time -v build-llm "$SRC" --output "$OUT" --tp "$TP" 2> "$WORK/tp$TP.time"
    grep -E "Elapsed|Maximum resident" "$WORK/tp$TP.time"
    ls -l "$OUT"/rank*.safetensors
    rm -rf "$OUT"
done
[ -n "${KEEP_SOURCE:-}" ] || rm -rf "$SRC"
OUT="$WORK/rand8b"
rm -rf "$OUT"
sync; echo "== build-llm --random-weights llama-3.1-8b --output $OUT"
/usr/bin/time -v build-llm --random-weights llama-3.1-8b --output "$OUT" 2> "$WORK/random.time"
grep -E "Elapsed|Maximum resident" "$WORK/random.time"
ls -l "$OUT"/rank*.safetensors
rm -rf "$OUT"
