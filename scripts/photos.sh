#!/usr/bin/env bash
# Photographs: trains a captioner on Flickr8k, scores it on the dev split and captions the test
# split, on the CPU. Run scripts/setup.sh first. A rerun resumes: cached CNN features are reused,
# training goes on from last.pt, and the test captions from where their file stopped.
#
# Usage: scripts/photos.sh [EXTRA TRAIN OPTIONS...]
#   FLICKR8K_DIR  the data set (default ../shared/flickr8k): Flickr8k.token.txt, the split lists, images/
#   OUT           the run folder (default runs/flickr8k)
# e.g. the same decoder without attention: OUT=runs/flickr8k-pooled scripts/photos.sh --pool-grid 1
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
data=${FLICKR8K_DIR:-../shared/flickr8k}
out=${OUT:-runs/flickr8k}
bin=.venv/bin
[ -x "$bin/captioner" ] || { echo "photos.sh: no .venv: run scripts/setup.sh first" >&2; exit 1; }
for f in Flickr8k.token.txt Flickr_8k.testImages.txt images; do
  [ -e "$data/$f" ] || { echo "photos.sh: no $f in $data: set FLICKR8K_DIR to the Flickr8k folder" >&2; exit 1; }
done
mkdir -p "$out"

# EfficientNet-Lite0 at 224 px with ImageNet weights and its classifier's concepts (the photo
# default), attention over its 7 x 7 grid, word2vec trained on the training captions; the photo
# preset (captioner/options.py PRESETS, `captioner train --help`): 6 epochs of cross-entropy, then
# one of self-critical training on CIDEr-D, the steps in bfloat16 (float32 weights); each epoch's
# greedy dev scores (to keep the best) on 500 of the 1,000 dev photographs, for time. How these were
# chosen: docs/photos.md.
# The model's default decoding, set by the preset: beam search of 16 (the widest), re-ranked by the
# captions of the 20 training photographs most like each photograph (the model keeps them:
# captioner/consensus.py) and by what the CNN's classifier sees, with the copy of its concepts
# boosted by 1; chosen on dev, docs/photos.md and docs/concepts.md. evaluate and caption use it.
train_options=(--preset photos)
echo "== training on $data into $out (the CNN's features first, once)"
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
"$bin/captioner" train --data "$data/Flickr8k.token.txt" --skip-missing --out "$out" \
  "${train_options[@]}" "${resume[@]}" "$@"
trained=$SECONDS

echo "== the dev split's scores (beam search) into $out/report.json"
"$bin/captioner" evaluate "$out/model.pt" --data "$data/Flickr8k.token.txt" --skip-missing --split val \
  --output "$out/report.json" --save-captions "$out/dev-captions.json"
evaluated=$SECONDS

echo "== captions of the test split (beam search) into $out/test-captions.jsonl"
root=$(cd "$data" && pwd)
sed -e 's/\r$//' -e '/^$/d' -e "s|^|$root/images/|" "$data/Flickr_8k.testImages.txt" > "$out/test-images.txt"
"$bin/captioner" caption "$out/model.pt" "$out/test-images.txt" --output "$out/test-captions.jsonl"

epochs=$("$bin/python" -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
seconds = [row["seconds"] for row in rows]
print(" + ".join(str(round(s)) for s in seconds), "=", round(sum(seconds)))
' "$out/metrics.jsonl")
cat <<MSG

Done in $((SECONDS - started)) s: training $((trained - started)) s (its epochs, each with its validation:
$epochs s; the rest is reading the data and the CNN's features), dev evaluation $((evaluated - trained)) s,
test captions $((SECONDS - evaluated)) s. The model is $out/model.pt
  its dev scores:       $out/report.json
  caption photographs:  $bin/captioner caption $out/model.pt IMAGE_OR_FOLDER...
  serve it over HTTP:   $bin/captioner serve $out/model.pt   (then open http://127.0.0.1:8000/)
MSG
