#!/usr/bin/env bash
# The main job on the shipped default model and the demo media: index data/demo, then query it
# once in each direction. Usage: scripts/demo.sh [INDEX_DIR]   (default: a fresh temp folder)
set -euo pipefail
cd "$(dirname "$0")/.."
XMODAL=.venv/bin/xmodal
INDEX=${1:-$(mktemp -d)/demo-index}
DEMO=data/demo
QUERY_WAV="$DEMO/queries/cat_query.wav"
QUERY_IMG="$DEMO/images/cat.jpg"

echo "== indexing $DEMO into $INDEX (model: default)"
$XMODAL index "$DEMO/images" "$DEMO/speech" "$DEMO/notes" --index "$INDEX"
$XMODAL info --index "$INDEX"

echo; echo '== text → image: "a cat"'
$XMODAL search --index "$INDEX" --text "a cat" --to image -k 3

echo; echo "== speech → image: $QUERY_WAV"
$XMODAL search --index "$INDEX" --speech "$QUERY_WAV" --to image -k 3

echo; echo "== image → speech: $QUERY_IMG"
$XMODAL search --index "$INDEX" --image "$QUERY_IMG" --to speech -k 3

echo; echo '== text → speech: "coffee"'
$XMODAL search --index "$INDEX" --text "coffee" --to speech -k 3
