"""
toyworld.py: two small captioned worlds in which to see, measure and test that clipgen draws what a prompt
asks, on a laptop.

Each world crosses a colour with a second attribute of another kind, and holds a few combinations out of
clipgen's training images (each value and each colour is still seen with others), so that prompting them
tests composition, not memory:

  - letters: one coloured capital letter (A, O, T or X; 4 colours; 16 combinations, 4 held out), in PIL's
    font at a random size and position on a plain grey: the second attribute is a glyph's shape;
  - textures: an ellipse filled with a pattern in two tones of one colour (stripes, dots, checks or plain;
    5 colours; 20 combinations, 4 held out) on a grey gradient with pixel noise: the second attribute is
    a fine periodic pattern inside a region.

Each world brings a tiny CLIP trained contrastively on its captions, in OpenAI's architecture and file
format, with the modality gap of OpenAI's released models added (a matching image and caption at cosine
~0.3 instead of ~0.9, zero-shot accuracy unchanged): `toyclip.pt` and `toyclip_textures.pt` next to this
file. It brings a readout of an image's two attributes by classical means (thresholds, a palette, templates
or profiles), validated on the world's own images, so it can not share a model's blind spots. And the
evaluation: every combination prompted, the share of kept samples with both attributes right, for seen and
held-out combinations, with the CLIP text embedding as sample.py conditions or, for a diagnosis, the image
embedding of fresh images of the combination; and the same readout on VQGAN reconstructions.

    python toyworld.py images --world textures --out tex/      # 3,000 unlabeled 64-px training images
    python train.py --data tex/ --preset small --clip toyclip_textures.pt --out texrun
    python toyworld.py eval --world textures --run texrun      # the accuracy table
    python toyworld.py clip --world textures                   # re-make the shipped CLIP (minutes on a CPU)
"""
import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import save_image

import clip_loader
import clipgen
import data
import prior

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class World:
    """A captioned world: (value, colour) combinations of its second attribute and a colour."""
    name: str
    attribute: str  # what the second attribute is: "letter", "texture"
    values: tuple
    colours: dict  # colour name -> RGB
    held_out: tuple  # (value, colour) pairs never in the training images
    render: object  # (value, colour, seed, size) -> RGB PIL image, a deterministic function of its arguments
    read: object  # image -> (value, colour), None for what can not be read
    captions: object  # (value, colour) -> its captions; the first is the prompt evaluate asks
    parts: object  # (value, colour) -> the prompt in two parts, "colour AND value" (composable guidance)
    clip_file: str  # the world's gapped tiny CLIP

    @property
    def combinations(self):
        return list(itertools.product(self.values, self.colours))

    @property
    def seen(self):
        return [c for c in self.combinations if c not in self.held_out]

    def caption(self, value, colour):
        return self.captions(value, colour)[0]


def _rgb(image):
    """A PIL image or a (3, H, W) tensor in [-1, 1] -> (H, W, 3) float array in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image, dtype=np.float64)
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()


# -----------------------------------------------------------------------------------------------------------
# The letters world.

LETTERS = ("A", "O", "T", "X")  # mirror-symmetric, so the training flips do not invent new letters
COLOURS = {"red": (215, 45, 45), "green": (40, 160, 60), "blue": (45, 85, 220), "yellow": (225, 195, 30)}
LETTER_TEMPLATES = ("a {colour} letter {letter}", "the letter {letter} in {colour}", "{colour} {letter}")
TEMPLATE = 24  # side of the square masks letters are compared at


def render(letter, colour, seed, size=64):
    """One image of the letters world."""
    rng = np.random.default_rng(data.stable_seed("toyworld", seed))
    # A plain background of a random grey: a texture would be most of every token sequence, and the small
    # prior would spend its capacity on noise instead of on the letter.
    image = Image.new("RGB", (size, size), (round(rng.uniform(170, 215)),) * 3)
    font = ImageFont.load_default(size=int(size * rng.uniform(0.5, 0.75)))
    draw = ImageDraw.Draw(image)
    stroke = max(1, size // 32)  # bold strokes, a few pixels wide at 64 px
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font, stroke_width=stroke)
    x = rng.uniform(2, size - 2 - (right - left)) - left
    y = rng.uniform(2, size - 2 - (bottom - top)) - top
    draw.text((x, y), letter, fill=COLOURS[colour], font=font, stroke_width=stroke, stroke_fill=COLOURS[colour])
    return image


def _mask(rgb):
    """(H, W, 3) float array -> (foreground mask, its core): pixels far from the background colour, which is
    the median of the border (letters never touch it)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    distance = np.abs(rgb - np.median(border, axis=0)).max(axis=-1)
    return distance > 60, distance > 100


def _shape(mask):
    """The mask cropped to its bounding box and resized to TEMPLATE x TEMPLATE: size and position removed."""
    ys, xs = mask.nonzero()
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((TEMPLATE, TEMPLATE), Image.BILINEAR)) > 127


@functools.cache
def _templates():
    return {l: _shape(_mask(np.asarray(render(l, "blue", ("template", l)), dtype=np.float64))[0]) for l in LETTERS}


def read_attributes(image):
    """Letters world: a PIL image or a (3, H, W) tensor in [-1, 1] -> (letter, colour): the nearest palette
    colour to the foreground's core, the letter template that overlaps its mask best; None for what can not
    be read (too few foreground pixels: a blank or smeared sample)."""
    rgb = _rgb(image)
    mask, core = _mask(rgb)
    if core.sum() < rgb.shape[0] * rgb.shape[1] / 200:
        return None, None
    mean = rgb[core].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
    shape = _shape(mask)
    iou = {l: (shape & t).sum() / max((shape | t).sum(), 1) for l, t in _templates().items()}
    return max(iou, key=iou.get), colour


LETTERS_WORLD = World(
    name="letters", attribute="letter", values=LETTERS, colours=COLOURS,
    held_out=(("A", "blue"), ("O", "yellow"), ("T", "red"), ("X", "green")),  # a Latin square
    render=render, read=read_attributes,
    captions=lambda letter, colour: [t.format(colour=colour, letter=letter.lower()) for t in LETTER_TEMPLATES],
    parts=lambda letter, colour: f"something {colour} AND the letter {letter.lower()}",
    clip_file=os.path.join(HERE, "toyclip.pt"))

# -----------------------------------------------------------------------------------------------------------
# The textures world. Two tones of one colour, full (the "ink") and TINT of the way from white to it, fill an
# ellipse in a pattern whose period (7-10 px at 64 px) spans two or three tokens of the small preset.

TEXTURE_COLOURS = {"red": (205, 45, 45), "green": (35, 145, 55), "blue": (45, 85, 215), "yellow": (215, 180, 20),
                   "purple": (135, 55, 185)}
TEXTURES = ("stripes", "dots", "checks", "plain")
TEXTURE_CAPTIONS = {"stripes": ("a {colour} striped patch", "a patch of {colour} stripes", "{colour} stripes"),
                    "dots": ("a {colour} dotted patch", "a patch of {colour} dots", "{colour} dots"),
                    "checks": ("a {colour} checked patch", "a patch of {colour} checks", "{colour} checks"),
                    "plain": ("a plain {colour} patch", "a patch of solid {colour}", "solid {colour}")}
TEXTURE_PARTS = {"stripes": "a striped patch", "dots": "a dotted patch", "checks": "a checked patch",
                 "plain": "a plain patch"}
TINT = 0.45


def render_texture(texture, colour, seed, size=64):
    """One image of the textures world: a grey vertical gradient, an ellipse of random size and position
    filled with the pattern at a random period and phase, and Gaussian pixel noise over all of it."""
    rng = np.random.default_rng(data.stable_seed("textures", seed))
    s = size / 64
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres, (size, size) each
    top, bottom = rng.uniform(150, 215, 2)
    image = np.repeat((top + (bottom - top) * yy / size)[..., None], 3, axis=2)  # (size, size, 3)
    rx, ry = rng.uniform(0.26, 0.4, 2) * size
    cx, cy = rng.uniform(rx + 2 * s, size - rx - 2 * s), rng.uniform(ry + 2 * s, size - ry - 2 * s)
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    period = rng.uniform(7, 10) * s
    u, v = (xx + rng.uniform(0, period)) / period % 1, (yy + rng.uniform(0, period)) / period % 1  # in [0, 1)
    ink = {"stripes": v < 0.5, "dots": (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.27 ** 2, "checks": (u < 0.5) ^ (v < 0.5),
           "plain": np.ones_like(inside)}[texture]
    full = np.array(TEXTURE_COLOURS[colour], dtype=np.float64)
    image[inside] = np.where(ink[inside][:, None], full, 255 - TINT * (255 - full))
    image += rng.normal(0, 5, image.shape)
    return Image.fromarray(image.round().clip(0, 255).astype(np.uint8))


def read_texture(image):
    """Textures world: image -> (texture, colour). The patch is where pixels are saturated (the greys and
    their noise are not). Its colour is the palette colour whose absorbance direction, white minus the
    colour, is closest to the patch's: both tones of a colour share it. Pixels absorbing more than halfway
    between the two tones are ink. In the inner half of the patch's bounding box, the ink share and its
    profiles along rows and columns tell the pattern: almost all ink, or one flat tone, is plain; little ink
    is dots; rows that alternate while columns do not are stripes; the rest is checks."""
    rgb = _rgb(image)
    patch = rgb.max(-1) - rgb.min(-1) > 35  # (H, W) saturation threshold
    if patch.sum() < rgb.shape[0] * rgb.shape[1] / 50:
        return None, None
    absorbance = 255 - rgb[patch]  # (P, 3)
    directions = {c: (255 - np.array(v, float)) / np.linalg.norm(255 - np.array(v, float))
                  for c, v in TEXTURE_COLOURS.items()}
    mean = (absorbance / np.linalg.norm(absorbance, axis=1, keepdims=True).clip(1e-6)).mean(0)
    colour = max(directions, key=lambda c: mean @ directions[c])
    strength = np.zeros(patch.shape)  # 1 for ink, TINT for tint
    strength[patch] = absorbance @ directions[colour] / np.linalg.norm(255 - np.array(TEXTURE_COLOURS[colour], float))
    # The patch's extent from percentiles, which a few noisy background pixels past the threshold can not move.
    (y0, x0), (y1, x1) = np.percentile(np.stack(patch.nonzero(), 1), [2, 98], axis=0).round().astype(int)
    h, w = y1 + 1 - y0, x1 + 1 - x0
    box = slice(y0 + h // 4, y1 + 1 - h // 4), slice(x0 + w // 4, x1 + 1 - w // 4)
    inner = strength[box] > (1 + TINT) / 2
    share = inner.mean()
    # Plain: almost all ink, or one flat tone (a pattern smeared to its mean is no pattern).
    if share > 0.85 or strength[box].std() < 0.12:
        return "plain", colour
    if share < 0.33:
        return "dots", colour
    return ("stripes" if inner.mean(1).std() > 2 * inner.mean(0).std() + 0.1 else "checks"), colour


TEXTURES_WORLD = World(
    name="textures", attribute="texture", values=TEXTURES, colours=TEXTURE_COLOURS,
    # Each texture once, each colour at most once; purple is seen with all four.
    held_out=(("stripes", "blue"), ("dots", "yellow"), ("checks", "red"), ("plain", "green")),
    render=render_texture, read=read_texture,
    captions=lambda texture, colour: [t.format(colour=colour) for t in TEXTURE_CAPTIONS[texture]],
    parts=lambda texture, colour: f"something {colour} AND {TEXTURE_PARTS[texture]}",
    clip_file=os.path.join(HERE, "toyclip_textures.pt"))

WORLDS = {w.name: w for w in (LETTERS_WORLD, TEXTURES_WORLD)}
SHIPPED_CLIP = LETTERS_WORLD.clip_file


# -----------------------------------------------------------------------------------------------------------
# Images

def make_images(folder, n, seed=0, size=64, world=LETTERS_WORLD):
    """n unlabeled training images, uniformly over the seen combinations, as PNGs; returns their labels."""
    os.makedirs(folder, exist_ok=True)
    labels = []
    for i in range(n):
        value, colour = world.seen[data.stable_seed("pick", seed, i) % len(world.seen)]
        world.render(value, colour, (seed, i), size).save(os.path.join(folder, f"{i:05d}.png"))
        labels.append((value, colour))
    return labels


def fresh_images(per_combination, seed=1, size=64, combinations=None, world=LETTERS_WORLD):
    """-> (B, 3, size, size) tensor in [-1, 1] and the (value, colour) of each row: images never trained on,
    per_combination of each combination (default: all of the world's)."""
    labels = [c for c in (combinations or world.combinations) for _ in range(per_combination)]
    images = [world.render(v, c, ("fresh", seed, i), size) for i, (v, c) in enumerate(labels)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    return x, labels


# -----------------------------------------------------------------------------------------------------------
# The tiny CLIP: OpenAI's architecture at toy size, trained contrastively on a world's captions.

CLIP_ARCH = clip_loader.CLIPArchitecture(
    embed_dim=64, image_resolution=64, vision_layers=3, vision_width=128, vision_patch_size=8, context_length=16,
    vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


def train_clip(world=LETTERS_WORLD, steps=800, batch=64, seed=0, log=print):
    """A CLIP (float32, eval mode) trained on rendered images and captions of every combination. Captions
    repeat within a batch, so the contrastive targets are soft: an image matches every caption of its class."""
    torch.manual_seed(seed)
    model = clip_loader.CLIP(CLIP_ARCH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(steps):
        combos = [world.combinations[int(i)] for i in torch.randint(len(world.combinations), (batch,))]
        images, _ = fresh_images(1, seed=("clip", seed, step), combinations=combos, world=world)
        texts = [(lambda cs: cs[int(torch.randint(len(cs), ()))])(world.captions(v, c)) for v, c in combos]
        logits, _ = model(clip_loader.preprocess_tensor(images, 64), clip_loader.tokenize(texts, CLIP_ARCH.context_length))
        same = torch.tensor([[a == b for b in combos] for a in combos], dtype=torch.float)  # (B, B)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"clip step {step:>4}/{steps} | loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def prompt_embeddings(model, world=LETTERS_WORLD):
    tokens = clip_loader.tokenize([world.caption(v, c) for v, c in world.combinations], model.arch.context_length)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)  # (combinations, E)


@torch.no_grad()
def clip_report(model, per_combination=8, world=LETTERS_WORLD):
    """Zero-shot accuracy (image -> the right one of the prompts) and the mean cosine of matching pairs."""
    images, labels = fresh_images(per_combination, seed="report", world=world)
    img = F.normalize(model.encode_image(clip_loader.preprocess_tensor(images, model.arch.image_resolution)), dim=-1)
    txt = prompt_embeddings(model, world)
    target = torch.tensor([world.combinations.index(tuple(y)) for y in labels])
    return {"zero_shot": (img @ txt.t()).argmax(1).eq(target).float().mean().item(),
            "matched_cosine": (img * txt[target]).sum(1).mean().item()}


@torch.no_grad()
def add_modality_gap(model, matched_cosine=0.3, world=LETTERS_WORLD):
    """Move every image embedding by one constant vector g, orthogonal to all caption embeddings, until a
    matching image and caption sit at `matched_cosine`, as in OpenAI's models (Liang et al. 2022, "Mind the
    Gap"). Orthogonal to the captions, g changes no image-caption dot product, so zero-shot is unchanged; it
    is written into visual.ln_post.bias (b -> b + d with d @ visual.proj = g), so the file stays an
    ordinary CLIP checkpoint."""
    txt = prompt_embeddings(model, world)
    g = torch.randn(model.arch.embed_dim, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(txt.t().double())[0].float()  # (E, combinations): orthonormal span of the captions
    g = F.normalize(g - basis @ (basis.t() @ g), dim=0)
    proj, bias = model.visual.proj, model.visual.ln_post.bias
    direction = torch.linalg.lstsq(proj.t(), g.unsqueeze(1)).solution.squeeze(1)  # d with d @ proj = g
    start, lo, hi = bias.clone(), 0.0, 1000.0
    for _ in range(40):  # bisection on the length of g
        bias.copy_(start + (lo + hi) / 2 * direction)
        lo, hi = ((lo + hi) / 2, hi) if clip_report(model, 2, world)["matched_cosine"] > matched_cosine \
            else (lo, (lo + hi) / 2)
    return model


# -----------------------------------------------------------------------------------------------------------
# Evaluation of a trained clipgen run


def scores(world, reads):
    """{(value, colour): [what the readout read of each image asked for it]} -> {"seen", "held_out"}: the mean
    over those combinations of the share read with both attributes right; the share of all images with the
    asked value (world.attribute) and with the asked "colour"; "per_combination" shares, and the held-out
    ones again as "held_out_each", keyed "colour value" for JSON: a held-out mean of 50% may be two
    combinations drawn always and two never, a ceiling of the tokenizer's or a prior that retrieves."""
    per_combination = {combo: sum(r == combo for r in rs) / len(rs) for combo, rs in reads.items()}
    pairs = [(r, combo) for combo, rs in reads.items() for r in rs]
    share = lambda i: sum(r[i] == c[i] for r, c in pairs) / len(pairs)  # 0: the second attribute, 1: colour
    mean = lambda cs: sum(per_combination[c] for c in cs) / len(cs)
    return {"seen": mean(world.seen), "held_out": mean(world.held_out), world.attribute: share(0),
            "colour": share(1), "per_combination": per_combination,
            "held_out_each": {f"{c} {v}": per_combination[v, c] for v, c in world.held_out}}


def sample_and_rank(gen, world, n, seed, condition="text", **sampling):
    """Every combination's n samples at one sampling seed, ranked by CLIP similarity to its prompt, as
    [(PIL image, score)] lists. condition "text" conditions the prior on the prompt's CLIP text embedding,
    as sample.py does; "image" on the CLIP image embedding of a fresh image of the combination (one per seed),
    what the prior was trained on: the two tell the modality gap (image against text) from composition
    (seen against held out under the image condition). "parts": the prompt in parts (world.parts), each
    embedded alone and composed by the sampler."""
    captions = [world.caption(v, c) for v, c in world.combinations]
    if condition in ("text", "parts"):
        prompts = captions if condition == "text" else [world.parts(v, c) for v, c in world.combinations]
        return gen.generate(prompts, n=n, keep=n, seed=seed, **sampling)
    x, _ = fresh_images(1, seed=("condition", seed), size=gen.vqgan.cfg.image_size, world=world)
    images = gen.sample_images(gen.embed_images(x), n, seed=seed, **sampling)  # (P, n, 3, H, W)
    return gen.rerank(images, gen.embed_text(captions), n)


def evaluate(gen, n=clipgen.CANDIDATES, keep=clipgen.KEEP, seeds=1, world=LETTERS_WORLD, condition="text", **sampling):
    """Prompt every combination with sampling seeds 0..seeds-1 and read the `keep` samples CLIP ranks highest
    of n (see sample_and_rank for `condition`). -> scores() of the kept samples, the kept images (a list per
    combination, all seeds'), their mean CLIP score, the CLIP-feature Frechet distance between them and as
    many fresh images of the world, and the sampling time per candidate."""
    kept, t0 = {combo: [] for combo in world.combinations}, time.time()
    for seed in range(seeds):
        for combo, ranked in zip(world.combinations, sample_and_rank(gen, world, n, seed, condition, **sampling)):
            kept[combo] += ranked[:keep]
    seconds = (time.time() - t0) / (seeds * n * len(kept))
    real, _ = fresh_images(keep * seeds, seed="frechet", size=gen.vqgan.cfg.image_size, world=world)
    metrics = gen.score_results(list(kept.values()), gen.embed_images(real))
    images = {combo: [im for im, _ in ranked] for combo, ranked in kept.items()}
    return {**scores(world, {combo: [world.read(im) for im in ims] for combo, ims in images.items()}),
            "images": list(images.values()), "clip_score": metrics["clip_score"],
            "frechet": metrics["frechet_distance"], "seconds_per_sample": seconds}


def diagnose(gen, world, n=16, keep=8, seeds=1, conditions=("image", "text"), **sampling):
    """Where a prompt is lost (issue 22's diagnosis): the prior conditioned on fresh images' CLIP embeddings
    and on the prompts' text embeddings (and, with "parts" in `conditions`, on the prompts in parts), each
    scored on all n samples (the prior alone) and on the best `keep` CLIP keeps of them (as sample.py serves).
    -> {"image, all": scores(), "image, best K": ..., "text, all": ..., ...}, per_combination left out."""
    rows = {}
    for condition in conditions:
        reads = {combo: [] for combo in world.combinations}  # per seed, the ranked samples' reads
        for seed in range(seeds):
            for combo, ranked in zip(world.combinations, sample_and_rank(gen, world, n, seed, condition, **sampling)):
                reads[combo].append([world.read(im) for im, _ in ranked])
        for label, k in (("all", n), (f"best {keep}", keep)):
            result = scores(world, {combo: [r for rs in seed_reads for r in rs[:k]] for combo, seed_reads in reads.items()})
            rows[f"{condition}, {label}"] = {key: v for key, v in result.items() if key != "per_combination"}
    return rows


@torch.no_grad()
def condition_geometry(gen, world, per_combination=32):
    """Where each prompt's condition lies among the conditions the prior trained on, as this prior sees them
    (mean removed if it was trained with --remove-mean). A combination's centre is the normalised mean of its
    fresh images' conditions. -> {"text to own centre": {combination: cosine}, "nearest seen centre":
    {combination: [seen combination, cosine]}}, the nearest other than itself. A held-out prompt can be near its
    own images (the gap is closed) and still far from every condition trained on: the prior then has to compose,
    as nothing it saw is close."""
    p = gen.prior  # either prior: both turn embeddings into conditions with prior.unit_condition
    as_seen = lambda e: prior.unit_condition(e, None, p.null_embedding, p.embedding_mean, p.cfg.remove_mean)
    x, _ = fresh_images(per_combination, seed="geometry", size=gen.clip.arch.image_resolution, world=world)
    images = torch.cat([as_seen(gen.embed_images(x[i:i + 256])) for i in range(0, len(x), 256)])
    centres = F.normalize(images.view(len(world.combinations), per_combination, -1).mean(1), dim=-1)  # (C, E)
    texts = as_seen(gen.embed_text([world.caption(v, c) for v, c in world.combinations]))  # (C, E)
    own = (texts * centres).sum(-1)  # (C,)
    # Each centre against the seen ones, itself and held-out combinations masked out: (C, C)
    cos = (centres @ centres.T).fill_diagonal_(-2)
    cos[:, [i for i, combo in enumerate(world.combinations) if combo in world.held_out]] = -2
    best, nearest = cos.max(1)
    name = lambda i: " ".join(world.combinations[i][::-1])
    return {"text to own centre": {name(i): round(own[i].item(), 3) for i in range(len(own))},
            "nearest seen centre": {name(i): [name(int(j)), round(b.item(), 3)]
                                    for i, (b, j) in enumerate(zip(best, nearest))}}


@torch.no_grad()
def reconstruction_report(vq, per_combination=16, world=LETTERS_WORLD):
    """Readout of VQGAN reconstructions of fresh images, what the prior can at best reach: -> the shares
    with both attributes right ("both"), the second attribute (world.attribute), the colour, and both on
    the held-out combinations, together and each ("held_out_each"): the tokenizer never saw them either, and
    may recolour or retexture one with what it saw on that value."""
    images, labels = fresh_images(per_combination, seed="recon", size=vq.cfg.image_size, world=world)
    recon = torch.cat([vq(images[i:i + 64])[0].clamp(-1, 1) for i in range(0, len(images), 64)])
    reads = {combo: [] for combo in world.combinations}
    for x, label in zip(recon, labels):
        reads[label].append(world.read(x))
    s = scores(world, reads)  # every combination has as many images, so means over them are shares of all
    return {"both": sum(s["per_combination"].values()) / len(reads), world.attribute: s[world.attribute],
            "colour": s["colour"], "held_out": s["held_out"], "held_out_each": s["held_out_each"]}


def bundle_run(run, out, world=LETTERS_WORLD):
    """A trained run as a small folder to ship (the repository's toymodel/, sample.py's fall-back): the models'
    weights in fp16 and the fields loading reads, without the optimizer states, discriminator and random
    states that only resuming needs (a sixth of the size). The prior is told the new VQGAN file's SHA-256,
    since fp16 changes its bytes, and the world's CLIP by file name, not by where it lay when it trained."""
    vq = data.load_checkpoint(os.path.join(run, "vqgan.pt"), "vqgan")
    ckpt = data.load_checkpoint(os.path.join(run, "prior.pt"), "prior")
    half = lambda weights: {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    os.makedirs(out)
    vqgan_path = os.path.join(out, "vqgan.pt")
    torch.save({"kind": "vqgan", "config": vq["config"], "step": vq["step"], "model": half(vq["model"])}, vqgan_path)
    torch.save({**{k: ckpt[k] for k in ("kind", "config", "prior_type", "step", "args")}, "model": half(ckpt["model"]),
                "clip": os.path.basename(world.clip_file), "vqgan": "vqgan.pt",
                "vqgan_sha256": clip_loader.sha256_of(vqgan_path)}, os.path.join(out, "prior.pt"))


def main(argv=None):
    p = argparse.ArgumentParser(description="The toy worlds: training images, their tiny CLIPs, evaluation.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("images", help="write unlabeled training images (held-out combinations left out)")
    s.add_argument("--out", required=True, help="folder for the PNGs")
    s.add_argument("--n", type=int, default=3000, help="number of images")
    s.add_argument("--size", type=int, default=64, help="side in pixels")
    s = sub.add_parser("clip", help="train a world's tiny CLIP and add the modality gap")
    s.add_argument("--out", help="checkpoint to write (fp16 state dict; default: the world's shipped file)")
    s.add_argument("--steps", type=int, default=800)
    s.add_argument("--no-gap-out", help="also write the CLIP before the gap is added here (for comparisons)")
    s = sub.add_parser("eval", help="prompt every combination of a trained run and read the samples")
    s.add_argument("--run", required=True, help="train.py's --out")
    s.add_argument("--clip", default=None, help="CLIP for the prompts (default: the run's)")
    s.add_argument("--n", type=int, default=clipgen.CANDIDATES, help="candidates per prompt (sample.py's default)")
    s.add_argument("--keep", type=int, default=clipgen.KEEP,
                   help="kept per prompt, by CLIP score (sample.py's default)")
    s.add_argument("--seeds", type=int, default=1,
                   help="repeat with sampling seeds 0..SEEDS-1 (more samples, less noise)")
    s.add_argument("--condition", choices=["text", "image", "parts"], default="text",
                   help="condition the prior on the prompt's CLIP text embedding (as sample.py), on the "
                        "image embedding of a fresh image of the combination (a diagnosis), or on the prompt in "
                        "parts, 'colour AND value' (composable guidance)")
    s.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (default: sample.py's, "
                                                  f"{clipgen.GUIDANCE:g}, or 1 for a prior trained with --cond-drop 0)")
    s.add_argument("--temperature", type=float, help=f"sampling temperature (default: sample.py's, "
                                                       f"{clipgen.TEMPERATURE:g} for the GPT, 1 for diffusion)")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--diffusion-steps", type=int, default=None,
                   help=f"reverse steps of a diffusion prior (default: sample.py's, "
                        f"{clipgen.DIFFUSION_STEPS})")
    s.add_argument("--grid", default=None, help="also save the kept samples here as one PNG, a row per value")
    s = sub.add_parser("bundle", help="write a trained run as a small fp16 folder to ship (sample.py's toymodel/)")
    s.add_argument("--run", required=True, help="train.py's --out")
    s.add_argument("--out", required=True, help="new folder for vqgan.pt and prior.pt")
    s = sub.add_parser("diagnose", help="where a run loses the prompt: reconstructions, then the prior on image "
                                        "and on text embeddings, at every prior checkpoint kept; appends JSON lines")
    s.add_argument("--run", required=True, help="train.py's --out (trained with --keep-checkpoints large enough)")
    s.add_argument("--out", required=True, help="file the rows are appended to; rows already there are skipped")
    s.add_argument("--n", type=int, default=16, help="candidates per prompt")
    s.add_argument("--keep", type=int, default=8, help="also scored: the best this many of n, by CLIP score")
    s.add_argument("--seeds", type=int, default=1, help="sampling seeds 0..SEEDS-1")
    s.add_argument("--last", action="store_true", help="only the newest prior checkpoint (prior.pt)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (kept in each row)")
    s.add_argument("--diffusion-steps", type=int, default=None,
                   help=f"reverse steps of a diffusion prior (default: sample.py's, "
                        f"{clipgen.DIFFUSION_STEPS}; kept in each row)")
    s.add_argument("--parts", action="store_true", help="also condition on each prompt in parts, 'colour AND "
                                                        "value' (composable guidance): rows 'parts, ...'")
    for s in sub.choices.values():
        s.add_argument("--world", choices=list(WORLDS), default="letters", help="which toy world")
    args = p.parse_args(argv)
    world = WORLDS[args.world]
    if args.command in ("eval", "diagnose") and args.seeds < 1:
        p.error(f"--seeds {args.seeds}: give at least 1")
    if args.command in ("eval", "diagnose") and args.diffusion_steps is not None and args.diffusion_steps < 1:
        p.error(f"--diffusion-steps {args.diffusion_steps}: give at least 1")
    if args.command == "images":
        if os.path.isdir(args.out) and os.listdir(args.out):
            p.error(f"--out {args.out!r} is not empty; choose a new folder")
        make_images(args.out, args.n, size=args.size, world=world)
        print(f"{args.n} images of the {world.name} world in {args.out} ({len(world.seen)} combinations; held out: "
              f"{', '.join(world.caption(*c) for c in world.held_out)})")
    elif args.command == "clip":
        t0, out = time.time(), args.out or world.clip_file
        model = train_clip(world, args.steps)
        print(f"trained in {time.time() - t0:.0f}s: {clip_report(model, world=world)}")
        if args.no_gap_out:
            torch.save({k: v.half() for k, v in model.state_dict().items()}, args.no_gap_out)
        print(f"with the modality gap: {clip_report(add_modality_gap(model, world=world), world=world)}")
        torch.save({k: v.half() for k, v in model.state_dict().items()}, out)
        print(f"wrote {out}")
    elif args.command == "bundle":
        if os.path.exists(args.out):
            p.error(f"--out {args.out!r} exists; choose a new folder")
        try:
            bundle_run(args.run, args.out, world)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: --run {args.run!r}: {e}")
        print(f"wrote {args.out}: " + ", ".join(f"{f} {os.path.getsize(os.path.join(args.out, f)) / 1e6:.1f} MB"
                                             for f in ("vqgan.pt", "prior.pt")))
    elif args.command == "diagnose":
        diagnose_command(args, world)
    else:
        evaluate_command(args, world)


def diagnose_command(args, world):
    """`toyworld.py diagnose`: diagnose() at every prior checkpoint of a run (or its newest), each row
    appended to --out as one JSON line as soon as it is measured, so that a grid of runs can be stopped and
    started again without measuring anything twice."""
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["run"], r["step"], r["row"], r.get("guidance", 1.0), r.get("diffusion_steps"))
                    for r in map(json.loads, f)}
    run = os.path.abspath(args.run)
    folder = os.path.join(args.run, "checkpoints")
    priors = [os.path.join(args.run, "prior.pt")] if args.last else \
        sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("prior_"))

    def append(step, row, values):
        with open(args.out, "a") as f:
            f.write(json.dumps({"run": run, "world": world.name, "step": step, "row": row, "n": args.n,
                                "keep": args.keep, "seeds": args.seeds, "guidance": args.guidance,
                                "diffusion_steps": args.diffusion_steps, **values}) + "\n")
        print(f"{os.path.basename(run)} step {step} {row}: {values}", flush=True)

    for path in priors:
        gen = clipgen.CLIPGen.from_checkpoint((os.path.join(args.run, "vqgan.pt"), path), device="cpu")
        step = data.load_checkpoint(path, "prior")["step"]
        try:
            gen.check_diffusion_steps(args.diffusion_steps)
        except ValueError as e:  # a GPT prior, or more steps than it was trained with
            sys.exit(f"error: --diffusion-steps {args.diffusion_steps}: {e}")
        # Once per run: the tokenizer's ceiling, and where the prompts' conditions lie (the same at every step).
        for row, measure in (("reconstructions", lambda: reconstruction_report(gen.vqgan, world=world)),
                             ("conditions", lambda: condition_geometry(gen, world))):
            if (run, 0, row, args.guidance, args.diffusion_steps) not in done:
                append(0, row, measure())
                done.add((run, 0, row, args.guidance, args.diffusion_steps))
        conditions = ("image", "text") + ("parts",) * args.parts
        todo = [c for c in conditions if (run, step, f"{c}, all", args.guidance, args.diffusion_steps) not in done]
        if todo:
            for row, values in diagnose(gen, world, n=args.n, keep=args.keep, seeds=args.seeds, conditions=todo,
                                        guidance=args.guidance, diffusion_steps=args.diffusion_steps).items():
                append(step, row, values)


def evaluate_command(args, world):
    """`toyworld.py eval`: the accuracy table of a trained run, printed, and optionally a grid of samples."""
    try:
        gen = clipgen.CLIPGen.from_checkpoint(args.run, clip=args.clip)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    t0 = time.time()
    try:
        result = evaluate(gen, n=args.n, keep=args.keep, seeds=args.seeds, world=world, condition=args.condition,
                          guidance=args.guidance, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          diffusion_steps=args.diffusion_steps)
    except ValueError as e:  # --diffusion-steps for a GPT prior, or more steps than it was trained with
        sys.exit(f"error: {e}")
    name = world.attribute
    print(f"prompts, seen combinations:     {result['seen']:.1%} of samples with {name} and colour right")
    print(f"prompts, held-out combinations: {result['held_out']:.1%}   ({time.time() - t0:.0f}s; "
          f"{1000 * result['seconds_per_sample']:.0f} ms per candidate)")
    print(f"all prompts: the asked {name} in {result[name]:.1%} of samples, the asked colour in "
          f"{result['colour']:.1%}")
    print(f"CLIP score of the kept samples {result['clip_score']:.2f}; CLIP-feature Frechet distance to as "
          f"many fresh images {result['frechet']:.4f}")
    recon = reconstruction_report(gen.vqgan.cpu(), world=world)
    print(f"reconstructions of fresh images: {recon['both']:.1%} ({name} {recon[name]:.1%}, colour "
          f"{recon['colour']:.1%}; held-out combinations {recon['held_out']:.1%})")
    for (v, c), acc in result["per_combination"].items():
        print(f"  {world.caption(v, c):<26} {acc:.0%}{'  (held out)' if (v, c) in world.held_out else ''}")
    if args.grid:
        rows = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for kept in result["images"] for im in kept]
        # A row per value, a column block per colour: the value x colour table, held-out cells included.
        save_image(torch.stack(rows).float() / 255, args.grid, nrow=args.keep * args.seeds * len(world.colours),
                   padding=1)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
