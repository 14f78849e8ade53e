"""
toyworld.py: a small captioned world in which to see, measure and test that clipgen draws what a prompt asks.

Images are one coloured capital letter (A, O, T or X, in PIL's built-in font) at a random size and position
on a plain background of a random grey; their captions say the colour and the letter ("a red letter t").
Four letter-colour combinations are held out of clipgen's training images (each letter and each colour is
still seen with others), so asking for them tests composition, not memory. The world brings:

  - a tiny CLIP trained contrastively on its captions, in OpenAI's architecture and state-dict format, with
    the modality gap of OpenAI's released models added (image and text embeddings of a matching pair at
    cosine ~0.3 instead of ~0.9, zero-shot accuracy unchanged): `toyclip.pt` next to this file;
  - a readout of an image's letter and colour by classical means (a foreground mask, the nearest palette
    colour, the best-overlapping letter template), validated on the world's own images;
  - the evaluation: every combination prompted, the share of kept samples with both attributes right, for
    seen and held-out combinations, and the same readout on VQGAN reconstructions.

    python toyworld.py images --out toy/                  # 3,000 unlabeled 64-px training images
    python train.py --data toy/ --preset small --clip toyclip.pt --out toyrun
    python toyworld.py eval --run toyrun                   # the accuracy table
    python toyworld.py clip --out toyclip.pt              # re-make the shipped CLIP (a few minutes on a CPU)
"""
import argparse
import functools
import itertools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import save_image

import clip_loader
import clipgen
import data

LETTERS = ("A", "O", "T", "X")  # mirror-symmetric, so the training flips do not invent new letters
COLOURS = {"red": (215, 45, 45), "green": (40, 160, 60), "blue": (45, 85, 220), "yellow": (225, 195, 30)}
# A Latin square: every letter and every colour is missing exactly once.
HELD_OUT = (("A", "blue"), ("O", "yellow"), ("T", "red"), ("X", "green"))
COMBINATIONS = list(itertools.product(LETTERS, COLOURS))
SEEN = [c for c in COMBINATIONS if c not in HELD_OUT]
SHIPPED_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyclip.pt")


def caption(letter, colour):
    return f"a {colour} letter {letter.lower()}"


# -----------------------------------------------------------------------------------------------------------
# Images

def render(letter, colour, seed, size=64):
    """One image of the world as an RGB PIL image, a deterministic function of its arguments."""
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


def make_images(folder, n, seed=0, size=64):
    """n unlabeled training images, uniformly over the seen combinations, as PNGs; returns their labels."""
    os.makedirs(folder, exist_ok=True)
    labels = []
    for i in range(n):
        letter, colour = SEEN[data.stable_seed("pick", seed, i) % len(SEEN)]
        render(letter, colour, (seed, i), size).save(os.path.join(folder, f"{i:05d}.png"))
        labels.append((letter, colour))
    return labels


def fresh_images(per_combination, seed=1, size=64, combinations=COMBINATIONS):
    """-> (B, 3, size, size) tensor in [-1, 1] and the (letter, colour) of each row: images never trained on."""
    labels = [c for c in combinations for _ in range(per_combination)]
    images = [render(l, c, ("fresh", seed, i), size) for i, (l, c) in enumerate(labels)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    return x, labels


# -----------------------------------------------------------------------------------------------------------
# Readout: which letter, which colour, by thresholds and templates (no learning, so it can not share a
# model's blind spots).

TEMPLATE = 24  # side of the square masks letters are compared at


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
    """(3, H, W) tensor in [-1, 1] or a PIL image -> (letter, colour); None for what can not be read (too
    few foreground pixels: a blank or smeared sample)."""
    rgb = np.asarray(image, dtype=np.float64) if isinstance(image, Image.Image) else \
        ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    mask, core = _mask(rgb)
    if core.sum() < rgb.shape[0] * rgb.shape[1] / 200:
        return None, None
    mean = rgb[core].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
    shape = _shape(mask)
    iou = {l: (shape & t).sum() / max((shape | t).sum(), 1) for l, t in _templates().items()}
    return max(iou, key=iou.get), colour


# -----------------------------------------------------------------------------------------------------------
# The tiny CLIP: OpenAI's architecture at toy size, trained contrastively on the world's captions.

CLIP_ARCH = clip_loader.CLIPArchitecture(
    embed_dim=64, image_resolution=64, vision_layers=3, vision_width=128, vision_patch_size=8, context_length=16,
    vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
TEMPLATES = ("a {colour} letter {letter}", "the letter {letter} in {colour}", "{colour} {letter}")


def train_clip(steps=800, batch=64, seed=0, log=print):
    """A CLIP (float32, eval mode) trained on rendered images and captions of every combination. Captions
    repeat within a batch, so the contrastive targets are soft: an image matches every caption of its class."""
    torch.manual_seed(seed)
    model = clip_loader.CLIP(CLIP_ARCH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(steps):
        combos = [COMBINATIONS[int(i)] for i in torch.randint(len(COMBINATIONS), (batch,))]
        images, _ = fresh_images(1, seed=("clip", seed, step), combinations=combos)
        texts = [TEMPLATES[int(torch.randint(len(TEMPLATES), ()))].format(colour=c, letter=l.lower()) for l, c in combos]
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
def prompt_embeddings(model):
    tokens = clip_loader.tokenize([caption(l, c) for l, c in COMBINATIONS], model.arch.context_length)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)  # (16, E)


@torch.no_grad()
def clip_report(model, per_combination=8):
    """Zero-shot accuracy (image -> the right one of the 16 captions) and the mean cosine of matching pairs."""
    images, labels = fresh_images(per_combination, seed="report")
    img = F.normalize(model.encode_image(clip_loader.preprocess_tensor(images, model.arch.image_resolution)), dim=-1)
    txt = prompt_embeddings(model)
    target = torch.tensor([COMBINATIONS.index(tuple(y)) for y in labels])
    return {"zero_shot": (img @ txt.t()).argmax(1).eq(target).float().mean().item(),
            "matched_cosine": (img * txt[target]).sum(1).mean().item()}


@torch.no_grad()
def add_modality_gap(model, matched_cosine=0.3):
    """Move every image embedding by one constant vector g, orthogonal to all caption embeddings, until a
    matching image and caption sit at `matched_cosine`, as in OpenAI's models (Liang et al. 2022, "Mind the
    Gap"). Orthogonal to the captions, g changes no image-caption dot product, so zero-shot is unchanged; it
    is written into visual.ln_post.bias (b -> b + d with d @ visual.proj = g), so the file stays an
    ordinary CLIP checkpoint."""
    txt = prompt_embeddings(model)
    g = torch.randn(model.arch.embed_dim, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(txt.t().double())[0].float()  # (E, 16): orthonormal span of the captions
    g = F.normalize(g - basis @ (basis.t() @ g), dim=0)
    proj, bias = model.visual.proj, model.visual.ln_post.bias
    direction = torch.linalg.lstsq(proj.t(), g.unsqueeze(1)).solution.squeeze(1)  # d with d @ proj = g
    start, lo, hi = bias.clone(), 0.0, 1000.0
    for _ in range(40):  # bisection on the length of g
        bias.copy_(start + (lo + hi) / 2 * direction)
        lo, hi = ((lo + hi) / 2, hi) if clip_report(model, 2)["matched_cosine"] > matched_cosine else (lo, (lo + hi) / 2)
    return model


# -----------------------------------------------------------------------------------------------------------
# Evaluation of a trained clipgen run


def evaluate(gen, n=8, keep=2, seeds=1, **sampling):
    """Prompt every combination with sampling seeds 0..seeds-1; -> {"seen", "held_out"} shares of kept
    samples with letter and colour right, the per-combination accuracies, the shares of all kept samples
    with the asked "letter" and the asked "colour", the kept images (a list per combination, all seeds'),
    their mean CLIP score, the CLIP-feature Frechet distance between them and as many fresh images of the
    world (every combination equally), and the sampling time per candidate."""
    kept, t0 = {combo: [] for combo in COMBINATIONS}, time.time()
    for seed in range(seeds):
        results = gen.generate([caption(l, c) for l, c in COMBINATIONS], n=n, keep=keep, seed=seed, **sampling)
        for combo, ranked in zip(COMBINATIONS, results):
            kept[combo] += ranked
    seconds = (time.time() - t0) / (seeds * n * len(COMBINATIONS))
    real, _ = fresh_images(keep * seeds, seed="frechet", size=gen.vqgan.cfg.image_size)
    metrics = gen.score_results(list(kept.values()), gen.embed_images(real))
    kept = {combo: [im for im, _ in ranked] for combo, ranked in kept.items()}
    read = [(read_attributes(im), combo) for combo, ims in kept.items() for im in ims]
    per_combination = {combo: sum(r == c == combo for r, c in read) / len(ims) for combo, ims in kept.items()}
    mean = lambda combos: sum(per_combination[c] for c in combos) / len(combos)
    attribute = lambda i: sum(r[i] == c[i] for r, c in read) / len(read)  # 0: letter, 1: colour
    return {"seen": mean(SEEN), "held_out": mean(HELD_OUT), "per_combination": per_combination,
            "letter": attribute(0), "colour": attribute(1), "images": list(kept.values()),
            "clip_score": metrics["clip_score"], "frechet": metrics["frechet_distance"], "seconds_per_sample": seconds}


@torch.no_grad()
def reconstruction_report(vq, per_combination=16):
    """Readout of VQGAN reconstructions of fresh images, what the prior can at best reach: -> the shares
    with both attributes right ("both"), the letter, the colour, and both on the held-out combinations
    alone, which the tokenizer never saw either (it may recolour them with a colour it saw on that shape)."""
    images, labels = fresh_images(per_combination, seed="recon", size=vq.cfg.image_size)
    recon = torch.cat([vq(images[i:i + 64])[0].clamp(-1, 1) for i in range(0, len(images), 64)])
    read = [read_attributes(x) for x in recon]
    share = lambda pairs: sum(a == b for a, b in pairs) / len(pairs)
    return {"both": share(list(zip(read, labels))),
            "letter": share([(r[0], y[0]) for r, y in zip(read, labels)]),
            "colour": share([(r[1], y[1]) for r, y in zip(read, labels)]),
            "held_out": share([(r, y) for r, y in zip(read, labels) if y in HELD_OUT])}


def main(argv=None):
    p = argparse.ArgumentParser(description="The toy world: training images, its tiny CLIP, evaluation.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("images", help="write unlabeled training images (held-out combinations left out)")
    s.add_argument("--out", required=True, help="folder for the PNGs")
    s.add_argument("--n", type=int, default=3000, help="number of images")
    s.add_argument("--size", type=int, default=64, help="side in pixels")
    s = sub.add_parser("clip", help="train the tiny CLIP and add the modality gap")
    s.add_argument("--out", default=SHIPPED_CLIP, help="checkpoint to write (fp16 state dict)")
    s.add_argument("--steps", type=int, default=800)
    s.add_argument("--no-gap-out", help="also write the CLIP before the gap is added here (for comparisons)")
    s = sub.add_parser("eval", help="prompt every combination of a trained run and read the samples")
    s.add_argument("--run", required=True, help="train.py's --out")
    s.add_argument("--clip", default=None, help="CLIP for the prompts (default: the run's)")
    s.add_argument("--n", type=int, default=8, help="candidates per prompt")
    s.add_argument("--keep", type=int, default=2, help="kept per prompt, by CLIP score")
    s.add_argument("--seeds", type=int, default=1,
                   help="repeat with sampling seeds 0..SEEDS-1 (more samples, less noise)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--diffusion-steps", type=int, default=None,
                   help="reverse steps of a diffusion prior (default: all it was trained with)")
    s.add_argument("--grid", default=None, help="also save the kept samples here as one PNG, a row per letter")
    args = p.parse_args(argv)
    if args.command == "eval" and args.seeds < 1:
        p.error(f"--seeds {args.seeds}: give at least 1")
    if args.command == "eval" and args.diffusion_steps is not None and args.diffusion_steps < 1:
        p.error(f"--diffusion-steps {args.diffusion_steps}: give at least 1")
    if args.command == "images":
        if os.path.isdir(args.out) and os.listdir(args.out):
            p.error(f"--out {args.out!r} is not empty; choose a new folder")
        make_images(args.out, args.n, size=args.size)
        print(f"{args.n} images in {args.out} ({len(SEEN)} combinations; held out: "
              f"{', '.join(caption(*c) for c in HELD_OUT)})")
    elif args.command == "clip":
        t0 = time.time()
        model = train_clip(args.steps)
        print(f"trained in {time.time() - t0:.0f}s: {clip_report(model)}")
        if args.no_gap_out:
            torch.save({k: v.half() for k, v in model.state_dict().items()}, args.no_gap_out)
        print(f"with the modality gap: {clip_report(add_modality_gap(model))}")
        torch.save({k: v.half() for k, v in model.state_dict().items()}, args.out)
        print(f"wrote {args.out}")
    else:
        try:
            gen = clipgen.CLIPGen.from_checkpoint(args.run, clip=args.clip)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        t0 = time.time()
        try:
            result = evaluate(gen, n=args.n, keep=args.keep, seeds=args.seeds, guidance=args.guidance,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              diffusion_steps=args.diffusion_steps)
        except ValueError as e:  # --diffusion-steps for a GPT prior, or more steps than it was trained with
            sys.exit(f"error: {e}")
        print(f"prompts, seen combinations:     {result['seen']:.1%} of samples with letter and colour right")
        print(f"prompts, held-out combinations: {result['held_out']:.1%}   ({time.time() - t0:.0f}s; "
              f"{1000 * result['seconds_per_sample']:.0f} ms per candidate)")
        print(f"all prompts: the asked letter in {result['letter']:.1%} of samples, the asked colour in "
              f"{result['colour']:.1%}")
        print(f"CLIP score of the kept samples {result['clip_score']:.2f}; CLIP-feature Frechet distance to as "
              f"many fresh images {result['frechet']:.4f}")
        recon = reconstruction_report(gen.vqgan.cpu())
        print(f"reconstructions of fresh images: {recon['both']:.1%} (letter {recon['letter']:.1%}, colour "
              f"{recon['colour']:.1%}; held-out combinations {recon['held_out']:.1%})")
        for (l, c), acc in result["per_combination"].items():
            print(f"  {caption(l, c):<22} {acc:.0%}{'  (held out)' if (l, c) in HELD_OUT else ''}")
        if args.grid:
            rows = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for kept in result["images"] for im in kept]
            # A row per letter, a column block per colour: the letter x colour table, held-out cells included.
            save_image(torch.stack(rows).float() / 255, args.grid, nrow=args.keep * args.seeds * len(COLOURS),
                       padding=1)
            print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
