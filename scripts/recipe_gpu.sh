#!/usr/bin/env bash
# A real run on photos: Karpathy's splits of Flickr8k (or COCO), an ImageNet ResNet from
# torchvision, the GoogleNews word2vec vectors, on a GPU. Then the test split with beam search,
# the captions in COCO results format, and the training curves.
#
# Nothing is downloaded here; fetch these first and name them:
#   DATA     dataset_flickr8k.json or dataset_coco.json (Karpathy's caption_datasets.zip)
#   IMAGES   the image folder: Flicker8k_Dataset/, or the COCO folder holding train2014/ and val2014/
#   VECTORS  GoogleNews-vectors-negative300.bin (word2vec binary, 300-d)
#   WEIGHTS  imagenet (torchvision downloads them when online; the default) or a state_dict file
#            such as resnet152-394f9c45.pth
# Example:
#   DATA=~/data/dataset_coco.json IMAGES=~/data/coco VECTORS=~/data/GoogleNews-vectors-negative300.bin \
#     scripts/recipe_gpu.sh
# Other settings (defaults in brackets): OUT [runs/<data set>], ENCODER [resnet152], IMAGE_SIZE [224],
# HIDDEN [512], EPOCHS [20], BATCH [128], LR [1e-3], MIN_COUNT [5], DEVICE [cuda], WORKERS [8],
# PYTHON [.venv/bin/python]. Re-running resumes an interrupted training.
set -euo pipefail
: "${DATA:?set DATA to dataset_flickr8k.json or dataset_coco.json}"
: "${IMAGES:?set IMAGES to the image folder}"
: "${VECTORS:?set VECTORS to GoogleNews-vectors-negative300.bin}"
python=${PYTHON:-.venv/bin/python}
out=${OUT:-runs/$(basename "$DATA" .json)}
captioner=("$python" -m captioner)

resume=()
[ -f "$out/last.pt" ] && resume=(--resume)
"${captioner[@]}" train --data "$DATA" --images "$IMAGES" --out "$out" "${resume[@]}" \
  --encoder "${ENCODER:-resnet152}" --encoder-weights "${WEIGHTS:-imagenet}" --image-size "${IMAGE_SIZE:-224}" \
  --word2vec "$VECTORS" --hidden-size "${HIDDEN:-512}" --dropout 0.5 --min-count "${MIN_COUNT:-5}" \
  --max-caption-length 20 --epochs "${EPOCHS:-20}" --batch-size "${BATCH:-128}" --lr "${LR:-1e-3}" \
  --device "${DEVICE:-cuda}" --num-workers "${WORKERS:-8}"
"${captioner[@]}" evaluate "$out/model.pt" --data "$DATA" --images "$IMAGES" --split test \
  --mode beam --beam-size 3 --device "${DEVICE:-cuda}" \
  --output "$out/test-report.json" --save-captions "$out/test-captions.json" > /dev/null
"${captioner[@]}" plot "$out"
echo "model: $out/model.pt; test report: $out/test-report.json; captions: $out/test-captions.json"
