#!/usr/bin/env python3
"""Cuts the photographs of `fetch.sh` into the EfficientNet example's 224x224 crops.

    python3 make_images.py PHOTOS_DIR DEST_DIR              (Pillow on the path; fetch.sh runs it)
    python3 make_images.py --natural PHOTOS_DIR DEST_DIR    (fetch_natural.sh runs it)

Calibration and evaluation crops come from different photographs (SOURCES.md lists them).
Crop `i` of a set is cut from photograph `i mod len(set)`: the first crop of each evaluation
photograph is the usual ImageNet evaluation crop (shorter side resized to 256, centre
224x224); every other crop is a random-resized crop (a box of 25-100 % of the photograph's
area, aspect ratio 3/4-4/3, anywhere in it, mirrored with probability 1/2) resized to
224x224, from a seeded generator, so the output is the same on every run (fetch.sh checks
its SHA-256). Writes `images.bin` (u8 RGB, `[n, 224, 224, 3]`, the calibration crops, then
the evaluation crops) and `images.json` (each crop's photograph, box and mirroring).

With `--natural`, writes the other calibration set instead: 512 random-resized crops of the
natural photographs of `fetch_natural.sh` (NATURAL below), as `natural.bin` and
`natural.json`, the same way (seed 3).
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
COUNTS = {"calibration": 512, "evaluation": 256, "natural": 512}
# fetch_natural.sh's photographs (Debian wallpaper packages; face.rgb: scipy's raccoon).
NATURAL = ["Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg",
           "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
           "aitzgorri_by_Aitzol_Berasategi.jpg", "free_by_Peter_Nerlich.jpg",
           "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
           "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
           "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg",
           "Kleiber_by_Lukas_Baubkus.jpg", "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg",
           "Garden.jpg", "GreenMeadow.jpg", "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg",
           "TwoWings.jpg", "Wood.jpg", "face.rgb"]


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


def open_photo(photos_dir, name):
    path = os.path.join(photos_dir, name)
    if name.endswith(".rgb"):
        return Image.frombytes("RGB", (1024, 768), open(path, "rb").read())
    img = Image.open(path).convert("RGB")
    # The largest wallpapers (up to 6 000 pixels wide) at most 2 048 wide: the crops are
    # 224x224 from boxes of a quarter of the photograph or more, so nothing is lost.
    if max(img.size) > 2048:
        s = 2048 / max(img.size)
        img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BILINEAR)
    return img


def main():
    natural = sys.argv[1] == "--natural"
    photos_dir, dest = sys.argv[2:] if natural else sys.argv[1:]
    stem = "natural" if natural else "images"
    out = open(os.path.join(dest, stem + ".bin"), "wb")
    manifest = {"size": SIZE, "layout": "u8 RGB [n, 224, 224, 3]"}
    sets = [("natural", NATURAL, 3)] if natural else [("calibration", CALIBRATION, 1), ("evaluation", EVALUATION, 2)]
    for name, photos, seed in sets:
        rng = random.Random(seed)
        images = [(open_photo if natural else lambda d, p: Image.open(os.path.join(d, p)).convert("RGB"))(photos_dir, p) for p in photos]
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
    json.dump(manifest, open(os.path.join(dest, stem + ".json"), "w"), indent=1)


if __name__ == "__main__":
    main()
