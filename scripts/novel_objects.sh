#!/usr/bin/env bash
# Novel objects (Deep Compositional Captioning's protocol on Flickr8k): trains the photo model with
# eight objects held out of the image-caption data, scores on the dev split each held-out word's
# F1 of mention beside the usual scores (report.json: "mentions"), and captions the test split,
# as scripts/photos.sh does for the full model (it runs photos.sh with the held-out words).
#
# Every training photograph any of whose five captions says a held-out word (or its plural) is left
# out of cross-entropy, self-critical training and the caption memory; text alone (the vocabulary,
# word2vec) still reads every training caption. The words come from the CNN's ImageNet concepts.
#
# Usage: scripts/novel_objects.sh [EXTRA TRAIN OPTIONS...]   (FLICKR8K_DIR as photos.sh; OUT default runs/novel-objects)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/novel-objects} exec scripts/photos.sh \
  --holdout-words bicycle,bike swing horse basketball car motorcycle,motorbike boat bench "$@"
