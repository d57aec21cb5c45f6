"""SmoothQuant scales for the int8 text path, into a bundle (`engine.text.text_variant` says
when it runs: by default on x86 CPUs with VNNI, for a bundle with these scales).

    .venv/bin/python scripts/text_int8_scales.py MANIFEST [--model default] [--captions 512]

Dynamic int8 quantizes each matmul's input per call with one range for the whole tensor, so a
few large activation channels cost the rest their precision. SmoothQuant divides each input
channel by a scale and multiplies the weight's column by it (the same float32 function), moving
that range into the weights, which are quantized per output channel. The scales come from the
largest activations seen on real captions: `--captions` of MANIFEST's captions (every k-th,
in file order), leaving out the captions of the photos the trainer holds out to pick its epoch
(`trainer.train.held_out_images` with the default seed), so that those stay a held-out check.
Writes `text_int8_scales.safetensors` into the model's bundle (not part of its fingerprint:
only the int8 path's vectors change; `engine.model.TEXT_SCALES_FILE`).

On the default model (13th session; `/work/runs/s13/smooth_probe.py`, the same recipe):
calibrated on 512 training captions, the int8 vectors came to cosine 0.9981 of float32's
(median over 1,500 held-out captions) against 0.9933 without scales; 40 captions gave 0.9960.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401 - the product's thread settings before torch

# isort: split
from engine.model import load_model, resolve_model, save_text_scales  # noqa: E402
from engine.text import MiniLMTower, smoothing_scales  # noqa: E402
from trainer.manifest import read_manifest  # noqa: E402
from trainer.train import TrainConfig, held_out_images  # noqa: E402

BATCH = 32


def calibration_captions(manifest: str | Path, count: int) -> list[str]:
    """`count` captions of `manifest`, every k-th in file order, none of a held-out photo."""
    rows = read_manifest(manifest).rows
    images = list(dict.fromkeys(r.image for r in rows))
    held = {images[i] for i in held_out_images(len(images), TrainConfig())}
    pool = [r.caption for r in rows if r.image not in held]
    if not pool:
        raise SystemExit(f"{manifest}: no captions to calibrate on")
    step = max(1, len(pool) // count)
    return pool[::step][:count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", help="TSV with image and caption columns (training captions)")
    ap.add_argument("--model", default="default", help="model name or bundle path")
    ap.add_argument("--captions", type=int, default=512, help="captions to calibrate on")
    args = ap.parse_args()
    model = load_model(args.model)
    tower = model.text_tower
    if not isinstance(tower, MiniLMTower):
        raise SystemExit(f"{args.model}: only the MiniLM tower has an int8 path")
    captions = calibration_captions(args.manifest, args.captions)
    batches = (tower.tokenize(captions[i : i + BATCH]) for i in range(0, len(captions), BATCH))
    scales = smoothing_scales(tower.model, batches)
    bundle = resolve_model(args.model)
    save_text_scales(bundle, scales)
    print(f"{bundle}: scales for {len(scales)} matmuls from {len(captions)} captions")


if __name__ == "__main__":
    main()
