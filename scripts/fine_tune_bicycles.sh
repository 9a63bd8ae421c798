#!/usr/bin/env bash
# Teaching a trained photo model a new object from a hundred photographs: the novel-object model
# (scripts/novel_objects.sh, which never saw a bicycle captioned) fine-tuned with `train --init` on
# 100 of the held-out training photographs that show bicycles (at least two of their five captions
# say bicycle or bike; their five captions each), on the CPU. Then the dev split scored before and
# after: bicycle's F1 of mention, the other seven words' F1 and CIDEr (forgetting).
#
# Usage: scripts/fine_tune_bicycles.sh [EXTRA TRAIN OPTIONS...]
#   MODEL  the model to start from (default runs/novel-objects/model.pt); OUT the run folder
#   (default runs/bicycles); FLICKR8K_DIR as photos.sh; DECODING the decoding (default: photos.sh's)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${FLICKR8K_DIR:-../shared/flickr8k}
model=${MODEL:-runs/novel-objects/model.pt}
out=${OUT:-runs/bicycles}
bin=.venv/bin
[ -f "$model" ] || { echo "fine_tune_bicycles.sh: no $model: run scripts/novel_objects.sh first" >&2; exit 1; }
read -r -a decoding <<< "${DECODING:---mode beam --beam-size 16}"
mkdir -p "$out"
# 100 training photographs that show bicycles (sorted by name), and 50 dev photographs to validate on.
"$bin/python" - "$data" "$out/bicycles.csv" <<'PY'
import csv, sys
from pathlib import Path
from captioner.data.datasets import load_dataset
from captioner.data.mentions import SHOWS, mentions
root, target = Path(sys.argv[1]), sys.argv[2]
dataset = load_dataset(root / "Flickr8k.token.txt", skip_missing=True)
shows = [r for r in dataset.split("train") if sum(mentions(c, ("bicycle", "bike")) for c in r.captions) >= SHOWS]
chosen = sorted(shows, key=lambda r: r.image_id)[:100] + dataset.split("val")[:50]
with open(target, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "caption", "split"])
    for r in chosen:
        writer.writerows([str(r.path), c, r.split] for c in r.captions)
print(f"{len(shows)} training photographs show a bicycle; {min(len(shows), 100)} fine-tune, 50 dev photographs validate", file=sys.stderr)
PY
started=$SECONDS
"$bin/captioner" train --data "$out/bicycles.csv" --out "$out/run" --init "$model" \
  --epochs 4 --lr 1e-3 --batch-size 32 --self-critical-epochs 0 --val-images 50 "$@"
tuned=$((SECONDS - started))
for name in before after; do
  path=$model; [ $name = after ] && path=$out/run/model.pt
  "$bin/captioner" evaluate "$path" --data "$data/Flickr8k.token.txt" --skip-missing --split val "${decoding[@]}" \
    --output "$out/dev-$name.json"
done
"$bin/python" - "$out" "$tuned" <<'PY'
import json, sys
out, tuned = sys.argv[1], sys.argv[2]
for name in ("before", "after"):
    r = json.load(open(f"{out}/dev-{name}.json"))
    f1 = {w: round(m["f1"], 3) for w, m in r["mentions"].items()}
    others = [v for w, v in f1.items() if w != "bicycle"]
    print(f"{name}: bicycle F1 {f1['bicycle']}, the other seven's mean F1 {sum(others) / len(others):.3f}, "
          f"CIDEr {r['cider']:.3f}, BLEU-4 {r['bleu_4']:.3f}, METEOR {r['meteor'] or 0:.3f}  {f1}")
print(f"fine-tuning took {tuned} s")
PY
