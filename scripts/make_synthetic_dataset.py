"""Draw the synthetic reference faces and CSVs of dataset/generated_img (run once; outputs are committed).

Six cartoon identities that differ in skin tone, hair colour and hair style, so that a cheap
pixel reward can tell them apart. Real runs replace this folder with photos of real faces.
"""

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw

IDENTITIES = {
    # name: (skin RGB, hair RGB, long hair?)
    "ref_pale_blond": ((250, 224, 200), (235, 200, 90), True),
    "ref_tan_black": ((205, 150, 110), (30, 25, 20), False),
    "ref_dark_black": ((110, 70, 45), (15, 10, 10), False),
    "ref_light_red": ((240, 200, 175), (180, 60, 30), True),
    "ref_olive_brown": ((190, 160, 120), (90, 55, 30), True),
    "ref_medium_grey": ((170, 120, 90), (150, 150, 150), False),
}
TRAIN = [
    ("ref_pale_blond", "a woman with long blond hair smiles in the park"),
    ("ref_tan_black", "a man with short dark hair walks on the street"),
    ("ref_dark_black", "a man with short dark hair talks in the room"),
    ("ref_light_red", "a woman with long red hair walks in the park"),
    ("ref_pale_blond;ref_tan_black", "two people talk together in the park"),
    ("ref_dark_black;ref_light_red", "a man and a woman walk together on the street"),
    ("ref_olive_brown;ref_tan_black", "two people smile together in the room"),
]
TEST = [
    ("ref_olive_brown", "a woman with long brown hair smiles in the room"),
    ("ref_medium_grey", "a man with short hair walks in the park"),
    ("ref_medium_grey;ref_light_red", "a man and a woman talk together in the park"),
]


def draw_face(skin, hair, long_hair, size=96) -> Image.Image:
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    s = size / 96
    if long_hair:
        draw.rectangle([20 * s, 30 * s, 76 * s, 92 * s], fill=hair)
    draw.ellipse([26 * s, 20 * s, 70 * s, 74 * s], fill=skin)
    draw.chord([22 * s, 12 * s, 74 * s, 52 * s], 180, 360, fill=hair)
    for x in (38, 58):
        draw.ellipse([(x - 3) * s, 42 * s, (x + 3) * s, 48 * s], fill=(40, 30, 30))
    draw.arc([38 * s, 52 * s, 58 * s, 64 * s], 20, 160, fill=(150, 40, 40), width=max(1, int(2 * s)))
    draw.rectangle([40 * s, 74 * s, 56 * s, 96 * s], fill=skin)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dataset/generated_img")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (skin, hair, long_hair) in IDENTITIES.items():
        draw_face(skin, hair, long_hair).save(out / f"{name}.png")
    for split, rows in (("train", TRAIN), ("test", TEST)):
        with open(out / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ref_paths", "prompt"])
            for refs, prompt in rows:
                writer.writerow([";".join(f"{r}.png" for r in refs.split(";")), prompt])


if __name__ == "__main__":
    main()
