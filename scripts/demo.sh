#!/usr/bin/env bash
# The main job on the embedded default: install, generate the shapes world, train a captioner,
# caption a few test images, and say how to use the model. Re-running resumes or reuses what exists.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh serve
data=runs/shapes-data
run=runs/shapes
bin=.venv/bin

echo "== generating the shapes world in $data (green triangles and red stars held out of the training captions)"
"$bin/captioner" synth "$data" --holdout green:triangle red:star
echo "== training (CNN pretraining, word2vec, LSTM decoder) into $run"
resume=()
[ -f "$run/last.pt" ] && resume=(--resume)
"$bin/captioner" train --data "$data/dataset.json" --out "$run" "${resume[@]}"
echo "== captions for five test images (beam search, 2 best each)"
"$bin/python" - "$data/dataset.json" > "$run/demo-images.txt" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve().parent
images = [i for i in json.load(open(sys.argv[1]))["images"] if i["split"] == "test"][:5]
print("\n".join(str(root / i["filepath"] / i["filename"]) for i in images))
PY
"$bin/captioner" caption "$run/model.pt" "$run/demo-images.txt" --mode beam --beam-size 3 --num-captions 2
echo "== scores on the test split, and on the held-out split (every image shows a green triangle or a red star)"
"$bin/captioner" evaluate "$run/model.pt" --data "$data/dataset.json" --split test --output "$run/report.json" > /dev/null

cat <<MSG

Done in $((SECONDS - started)) s. The model is $run/model.pt
  caption your images:  $bin/captioner caption $run/model.pt IMAGE_OR_FOLDER... [--mode beam]
  its scores:           $run/report.json (captioner evaluate; truthful = every fact it states holds)
  serve it over HTTP:   $bin/captioner serve $run/model.pt   (then open http://127.0.0.1:8000/)
  look inside it:       $bin/captioner inspect $run/model.pt $run/demo-images.txt --data $data/dataset.json --output $run/inspect
MSG
