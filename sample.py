"""
sample.py: text to image from the shell, with a run trained by train.py (CLIP-GEN section 3.3).

    python sample.py "a green letter t"       # 64 candidates, the best 8 kept, from out/ (or the bundled toy model)
    python sample.py "a red car" "a blue car" --n 16 --keep 4 --guidance 1 --seed 1   # 1/8 of the prior work
    python sample.py --prompts prompts.txt --run runs/imagenet
    python sample.py --image photo.jpg                        # variations of an image
    python sample.py "a dog" --eval-real val_imgs/            # CLIP score and CLIP-feature Frechet distance

Writes each kept image, named after its prompt and the seed, and one grid of them all (a row per prompt) to
--out, and prints their paths with their CLIP scores (100 x cosine similarity of image and prompt). The work
is clipgen.CLIPGen's; this script checks the command line, names the files and reports.

Exit codes: 2 for a bad command line (argparse's convention, also used for our own checks of the arguments:
an empty prompt, a missing --image file), 1 for a run that can not be loaded or a request it can not serve.
"""
import argparse
import os
import re
import sys
import time
import warnings

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torchvision.utils import save_image

import data
import runtime
from clipgen import CANDIDATES, DIFFUSION_STEPS, GUIDANCE, KEEP, TEMPERATURE, CLIPGen


def build_parser():
    p = argparse.ArgumentParser(description="Generate images from text with a trained CLIP-GEN run.",
                                formatter_class=runtime.HelpFormatter)
    p.add_argument("prompts", nargs="*", help="one or more prompts; \"A AND B\" draws what both parts describe "
                   "(composable guidance)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", type=runtime.existing_file,
                   help="a text file with one prompt per line")
    p.add_argument("--image", type=runtime.existing_file, help="make variations of this image instead of following a prompt")
    p.add_argument("--run", help="run folder with vqgan.pt and prior.pt (train.py's --out; default: out, or the "
                                 "bundled toy model while out holds no run)")
    p.add_argument("--out", default="samples", type=runtime.folder, help="folder for the images")
    # Reranking is half of the method: the prior proposes, CLIP keeps the candidates closest to the prompt, so
    # more candidates give better odds that the kept ones are right, at a cost linear in --n.
    p.add_argument("--n", type=runtime.at_least(1), default=CANDIDATES, help="candidates sampled per prompt")
    p.add_argument("--keep", type=runtime.at_least(1), default=KEEP,
                   help="candidates kept per prompt, by CLIP score (at most --n)")
    # Each prompt has its own generator, seeded with --seed, so its images do not depend on the other prompts.
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same seed, prompt, --n and --batch-size give the same images")
    p.add_argument("--temperature", type=runtime.at_least(0.0),
                   help=f"0 = greedy (default: {TEMPERATURE:g} for the GPT prior, 1 for the diffusion prior)")
    p.add_argument("--top-k", type=runtime.at_least(1), help="sample among the k likeliest tokens only")
    p.add_argument("--top-p", type=runtime.between(0, 1, low_open=True), help="nucleus sampling threshold")
    # Guidance pushes each prediction away from the null condition's, which the prior learned with --cond-drop.
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance scale, 1 = off (default: {GUIDANCE:g}, "
                                                  f"or 1 for a prior trained with --cond-drop 0)")
    p.add_argument("--diffusion-steps", type=runtime.at_least(1),
                   help="reverse steps of a diffusion prior (train.py --prior diffusion): fewer are faster "
                        f"(default: {DIFFUSION_STEPS}, or all it was trained with if fewer)")
    # A batch draws its random numbers together, so the batch size is part of what fixes the images.
    p.add_argument("--batch-size", type=runtime.at_least(1), default=32, help="sequences sampled at once")
    # Another CLIP of the same width embeds prompts in another space: allowed, but rarely what you want.
    p.add_argument("--clip", help="CLIP name or path (default: the one the prior was trained with)")
    p.add_argument("--device", default="auto", type=runtime.device_name,
                   help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                   help="of sampling and decoding: 'auto' is bf16 on a GPU that has it, fp16 on one that does not, "
                        "fp32 on a CPU")
    p.add_argument("--eval-real", metavar="DIR", help="also print CLIP scores and the CLIP-feature Frechet distance "
                                                      "to these images")
    p.add_argument("--fid", action="store_true", help="with --eval-real: also FID, FID-1 and FID-2 as papers report "
                                                      "them (downloads the FID Inception weights once, 95 MB)")
    return p


def parse_args(argv=None):
    """The command line, checked before any model is loaded, so a typo costs a second, not a model load."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                args.prompts += [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError:
            p.error(f"--prompts: {args.prompts_file!r} is not UTF-8 text; save it as UTF-8")
    if args.image and args.prompts:
        p.error("give prompts or --image, not both: variations follow the image alone")
    if not args.prompts and not args.image:
        p.error("give a prompt (python sample.py \"a dog\"), --prompts FILE or --image PATH")
    if any(not prompt.strip() for prompt in args.prompts):
        p.error("empty prompt: describe the image you want, e.g. \"a photo of a dog\"")
    for prompt in args.prompts:
        if any(not part.strip() for part in prompt.split(" AND ")):
            p.error(f"prompt {prompt!r} has an empty part: \"A AND B\" composes two descriptions, so give text on "
                    f"both sides of AND")
    if args.eval_real and not args.prompts:
        p.error("--eval-real needs prompts: the CLIP score compares images with their prompts")
    if args.fid and not args.eval_real:
        p.error("--fid compares with real images: give them with --eval-real DIR")
    if args.eval_real and not os.path.isdir(args.eval_real):
        p.error(f"--eval-real: {args.eval_real!r} is not a folder")
    if args.keep > args.n:
        p.error(f"--keep must be between 1 and --n ({args.n})")
    return args


def slug(text, limit=40):
    """A file-name-safe version of a prompt: 'A red car!' -> 'a_red_car'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "prompt"


def unique_names(names):
    """Number repeated names ('x', 'x' -> 'x', 'x_2'), so two prompts never write to the same files."""
    used, result = set(), []
    for name in names:
        candidate, k = name, 1
        while candidate in used:
            k += 1
            candidate = f"{name}_{k}"
        used.add(candidate)
        result.append(candidate)
    return result


# A fresh clone can draw before anything is trained: a letters-world run made with the `small` recipe ships in
# the repository (RESULTS.md 1.5 has its command and accuracy), with the tiny CLIP it was trained with.
HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_RUN, BUNDLED_CLIP = os.path.join(HERE, "toymodel"), os.path.join(HERE, "toyclip.pt")
BUNDLED_NOTICE = ("no trained run in 'out', so this is the bundled toy model (toymodel/): it draws capital letters "
                  "A, O, T and X in red, green, blue or yellow on grey, 64 px, and never saw a blue A, a yellow O, "
                  "a red T or a green X in training. Any prompt works; it draws the nearest of those. Train your "
                  "own with: python train.py --data path/to/images --out out")


def load_run(args):
    """The run's three models, or one error line: a missing or half-trained run, a file that is not a
    checkpoint, a CLIP of the wrong size, or a --diffusion-steps the prior can not take (checked before the
    first sample). Without --run: out, or the bundled toy model while nothing at all is in out."""
    clip = args.clip
    if args.run is None:
        args.run = "out"
        if not any(os.path.exists(os.path.join("out", f)) for f in ("vqgan.pt", "prior.pt")):
            print(BUNDLED_NOTICE, file=sys.stderr)
            args.run, clip = BUNDLED_RUN, clip or BUNDLED_CLIP
    missing = [f for f in ("vqgan.pt", "prior.pt") if not os.path.isfile(os.path.join(args.run, f))]
    if len(missing) == 1:  # stage 1 done, stage 2 not (or a file moved): never sample from something else
        sys.exit(f"error: the run in {args.run!r} has no {missing[0]}; finish training it (python train.py --data "
                 f"path/to/images --out {args.run} --resume) or point --run at a finished run")
    if missing:
        sys.exit(f"error: no trained run in {args.run!r} (it needs vqgan.pt and prior.pt). Train one with\n"
                 f"  python train.py --data path/to/images --out {args.run}\nor point --run at one.")
    try:
        device = None if args.device == "auto" else args.device  # None: CLIPGen picks CUDA if there is one
        gen = CLIPGen.from_checkpoint(args.run, clip=clip, device=device, precision=args.precision)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: could not load the run in {args.run!r}: {e}")
    try:
        gen.check_diffusion_steps(args.diffusion_steps)
    except ValueError as e:
        sys.exit(f"error: --diffusion-steps {args.diffusion_steps}: {e}")
    return gen


def main(argv=None):
    args = parse_args(argv)
    gen = load_run(args)
    # Warnings (a truncated prompt, a VQGAN that is not the prior's) as one plain line each, every time:
    # Python's default shows a source line and hides repeats, which reads like a crash to a user.
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)

    # Sampling is the slow part (a prior step per token, or per diffusion step); a progress line on stderr
    # keeps stdout clean for the list of files and scores, which scripts may parse.
    t0 = time.time()

    def progress(done, total):
        print(f"\rsampling {done}/{total} sequences ({time.time() - t0:.0f}s)", end="\n" if done == total else "",
              file=sys.stderr, flush=True)

    # The same sampling arguments serve prompts and variations; only the condition differs.
    sampling = dict(n=args.n, keep=args.keep, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, progress=progress,
                    diffusion_steps=args.diffusion_steps)
    if args.image:  # read as training reads images (upright, transparency on white), then CLIP's preprocessing
        try:
            image = data.open_rgb(args.image)
        except (OSError, UnidentifiedImageError) as e:
            sys.exit(f"error: could not read --image {args.image!r}: {e}")
        names, labels = [f"variations_{slug(os.path.splitext(os.path.basename(args.image))[0])}"], [args.image]
    else:
        names, labels = unique_names([slug(p) for p in args.prompts]), args.prompts
    try:
        results = [gen.variations(image, **sampling)] if args.image else gen.generate(args.prompts, **sampling)
    except ValueError as e:  # a request the models can not serve (the arguments were checked above)
        sys.exit(f"error: {e}")

    # File names carry the prompt and seed, so the same command writes the same files with the same bytes,
    # and another seed never overwrites them.
    os.makedirs(args.out, exist_ok=True)
    grid = []
    for name, label, kept in zip(names, labels, results):
        print(f"{label}:")
        for rank, (image, score) in enumerate(kept):
            path = os.path.join(args.out, f"{name}_seed{args.seed}_{rank}.png")
            image.save(path)
            print(f"  {path}  CLIP score {score:.2f}")
        grid += [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in kept]  # (3, H, W) uint8
    # One row per prompt, best image first.
    grid_path = os.path.join(args.out, f"{names[0]}{'_etc' if len(names) > 1 else ''}_seed{args.seed}_grid.png")
    save_image(torch.stack(grid).float() / 255, grid_path, nrow=args.keep)
    print(f"grid: {grid_path}")

    # Evaluation scores the images just written (no second round of sampling).
    if args.eval_real:
        try:
            metrics = gen.evaluate(args.prompts, args.eval_real, results=results, fid=args.fid)
        except ValueError as e:  # too few images for a Frechet distance, or none readable
            sys.exit(f"error: --eval-real: {e}")
        except RuntimeError as e:  # the FID weights could not be downloaded
            sys.exit(f"error: --fid: {e}")
        print(f"evaluation with {args.clip or 'the training CLIP'} ({metrics['n_generated']} generated, "
              f"{metrics['n_real']} real images): CLIP score {metrics['clip_score']:.2f} (cosine "
              f"{metrics['clip_cosine']:.4f}, best of {args.n} {metrics['clip_cosine_best']:.4f}), CLIP-feature "
              f"Frechet distance {metrics['frechet_distance']:.4f}")
        if args.fid:
            print(f"FID {metrics['fid']:.2f}, FID-1 {metrics['fid_1']:.2f}, FID-2 {metrics['fid_2']:.2f} (Inception "
                  f"pool3 features; a stable FID needs thousands of images per side)")


if __name__ == "__main__":
    main()
