#!/usr/bin/env python3
"""Cuts the photographs of `fetch.sh` into the EfficientNet example's 224x224 crops.

    python3 make_images.py PHOTOS_DIR DEST_DIR      (Pillow on the path; fetch.sh runs it)

Calibration and evaluation crops come from different photographs (SOURCES.md lists them).
Crop `i` of a set is cut from photograph `i mod len(set)`: the first crop of each evaluation
photograph is the usual ImageNet evaluation crop (shorter side resized to 256, centre
224x224); every other crop is a random-resized crop (a box of 25-100 % of the photograph's
area, aspect ratio 3/4-4/3, anywhere in it, mirrored with probability 1/2) resized to
224x224, from a seeded generator, so the output is the same on every run (fetch.sh checks
its SHA-256). Writes `images.bin` (u8 RGB, `[n, 224, 224, 3]`, the calibration crops, then
the evaluation crops) and `images.json` (each crop's photograph, box and mirroring).
"""
import json
import math
import os
import random
import sys

from PIL import Image

SIZE = 224
CALIBRATION = ["astronaut.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png",
               "grass.png", "gravel.png", "camera.png", "coins.png", "clock_motion.png",
               "text.png", "cell.png"]
EVALUATION = ["chelsea.png", "coffee.png", "rocket.jpg", "china.jpg", "flower.jpg",
              "grace_hopper.jpg"]
COUNTS = {"calibration": 512, "evaluation": 256}


def centre_crop(img):
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    return img.crop((left, top, left + SIZE, top + SIZE)), [left / s, top / s, (left + SIZE) / s, (top + SIZE) / s], False


def random_crop(img, rng):
    w, h = img.size
    for _ in range(100):
        area = w * h * rng.uniform(0.25, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if cw <= w and ch <= h:
            break
    else:
        cw = ch = min(w, h)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    flip = rng.random() < 0.5
    crop = img.crop((left, top, left + cw, top + ch)).resize((SIZE, SIZE), Image.BILINEAR)
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop, [left, top, left + cw, top + ch], flip


def main():
    photos_dir, dest = sys.argv[1:]
    out = open(os.path.join(dest, "images.bin"), "wb")
    manifest = {"size": SIZE, "layout": "u8 RGB [n, 224, 224, 3]"}
    for name, photos, seed in [("calibration", CALIBRATION, 1), ("evaluation", EVALUATION, 2)]:
        rng = random.Random(seed)
        images = [Image.open(os.path.join(photos_dir, p)).convert("RGB") for p in photos]
        crops = []
        for i in range(COUNTS[name]):
            k = i % len(photos)
            first = i < len(photos)
            crop, box, flip = centre_crop(images[k]) if (first and name == "evaluation") else random_crop(images[k], rng)
            assert crop.size == (SIZE, SIZE) and crop.mode == "RGB"
            out.write(crop.tobytes())
            crops.append({"photo": photos[k], "box": [round(b, 1) for b in box], "mirrored": flip})
        manifest[name] = crops
    out.close()
    json.dump(manifest, open(os.path.join(dest, "images.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
