"""
train.py: trains CLIP-GEN from a folder of images, no captions needed.

    python train.py --data imgs/                                  # stage 1 (VQGAN) on one GPU or the CPU
    python train.py --data imgs/ --preset tiny --steps 500        # a small model that trains on a CPU
    torchrun --nproc_per_node=8 train.py --data imgs/             # the same on 8 GPUs (DDP)

The script runs top to bottom in sections: command line, data, distributed set-up, checkpoints, then one
function per stage. Under torchrun every process runs all of it on its share of each batch; rank 0 alone
prints and writes files. Single-process training is the same code with a world size of 1.
"""
import argparse
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms
from torchvision.utils import save_image

import vqgan

# -----------------------------------------------------------------------------------------------------------
# Command line. Every default lives here, once, next to its help text (shown by --help).


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train CLIP-GEN on a folder of images (no captions).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images, searched recursively (jpg, png, webp, bmp)")
    p.add_argument("--out", default="out", help="run folder for checkpoints, sample grids and caches")
    p.add_argument("--stage", default="vqgan", choices=["vqgan"], help="what to train")
    p.add_argument("--preset", default="paper", choices=sorted(vqgan.PRESETS),
                   help="model size: 'paper' is CLIP-GEN's, 'tiny' trains on a CPU in minutes")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per process per step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the VQGAN and discriminator")
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps")
    p.add_argument("--disc-start", type=int, default=10_000,
                   help="step at which the adversarial loss and discriminator training start (taming's "
                        "disc_start): the GAN only helps once reconstructions are roughly right")
    p.add_argument("--perceptual", default="vgg", choices=["vgg", "none"],
                   help="perceptual loss network; 'vgg' downloads torchvision's VGG16 weights once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints and sample grids")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU/process")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = vqgan.PRESETS[args.preset].image_size
    downsample = vqgan.PRESETS[args.preset].downsample
    if args.image_size % downsample:
        p.error(f"--image-size must be a multiple of {downsample} for preset {args.preset!r}")
    for name in ("batch_size", "steps", "log_every", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# -----------------------------------------------------------------------------------------------------------
# Data: every image under a folder, any mode converted to RGB, resized and cropped to a square.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(folder):
    """Sorted paths of all images under `folder` (recursively); exits with a message if there are none."""
    if not os.path.isdir(folder):
        sys.exit(f"error: --data {folder!r} is not a folder")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder, followlinks=True)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        sys.exit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    return paths


def readable_images(paths):
    """Drop files PIL can not parse, naming them in one warning line. This checks headers and (for PNG)
    checksums without decoding pixels, so it is fast; a file that still fails to decode later is replaced
    by another image at load time."""
    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
            good.append(path)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for a bad file
            bad.append(path)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"warning: skipping {len(bad)} unreadable image file(s): {shown}", file=sys.stderr)
    if not good:
        sys.exit("error: none of the image files could be read")
    return good


def open_rgb(path):
    """Any image file -> an 8-bit RGB PIL image, upright (EXIF orientation applied), transparency on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16/32-bit grayscale: scale the used range to 8 bits
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((a * (255.0 / max(a.max(), 255.0))).astype(np.uint8))
        if im.mode == "P" or "A" in im.mode:  # palette or alpha: composite onto white
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


class ImageFolder(Dataset):
    """Square crops of images as (3, S, S) tensors in [-1, 1]: random crop and flip for training, center
    crop for evaluation."""

    def __init__(self, paths, image_size, train=True):
        self.paths = paths
        resize = transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        crop = [transforms.RandomCrop(image_size), transforms.RandomHorizontalFlip()] if train else \
            [transforms.CenterCrop(image_size)]
        to_tensor = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]  # [0, 1] -> [-1, 1]
        self.transform = transforms.Compose([resize, *crop, *to_tensor])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        for attempt in range(len(self.paths)):  # a file that passed the header check but will not decode
            path = self.paths[(i + attempt) % len(self.paths)]
            try:
                return self.transform(open_rgb(path))
            except Exception as e:
                warnings.warn(f"skipping {path}: {e}")
        raise RuntimeError("no image could be decoded")


# -----------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE) and helpers used by every stage.


def setup_distributed(device_arg):
    """-> (rank, world_size, device). NCCL between GPUs, gloo between CPU processes."""
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def mean_over_ranks(values, device):
    """Average a dict of floats/scalar tensors over all processes (only called on logging steps)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def save_checkpoint(obj, path):
    """torch.save to a temp file in the same folder, then an atomic rename: a crash mid-write never
    leaves a truncated checkpoint where a good one was."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def format_eta(seconds):
    return "?" if not math.isfinite(seconds) else time.strftime("%H:%M:%S", time.gmtime(seconds))


def infinite_batches(loader, sampler):
    """Cycle through the loader forever, telling the sampler the epoch so every epoch is shuffled anew
    (and, under DDP, every rank sees a different share of the same permutation)."""
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# -----------------------------------------------------------------------------------------------------------
# Stage 1: the VQGAN (vqgan.py).


def generator_step(model, raw_model, disc, perceptual, opt_g, images, gan_on, autocast, check_dead_codes=True):
    """One VQGAN update: L1 (+ perceptual) reconstruction + codebook losses, plus the adaptively weighted
    adversarial loss once `gan_on`. The discriminator is frozen here, so this step never changes it.
    Returns the (detached) reconstructions and a dict of scalar tensors to log."""
    cfg = raw_model.cfg
    disc.requires_grad_(False)
    with autocast:
        recon, ids, codebook_loss = model(images)
        rec_loss = (recon.float() - images).abs().mean()
        if perceptual is not None:
            rec_loss = rec_loss + cfg.perceptual_weight * perceptual(recon.float(), images)
        gan_loss = -disc(recon).float().mean() if gan_on else torch.zeros((), device=images.device)
    gan_weight = torch.zeros((), device=images.device)
    if gan_on:
        gan_weight = cfg.gan_weight * vqgan.adaptive_gan_weight(rec_loss, gan_loss, raw_model.decoder.conv_out.weight)
    loss = rec_loss + gan_weight * gan_loss + codebook_loss
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    raw_model.quantizer.restart_dead_codes(check=check_dead_codes)
    recon = recon.detach()
    return recon, {"loss": loss.detach(), "rec": rec_loss.detach(), "codebook": codebook_loss.detach(),
                   "gan": gan_loss.detach(), "gan_weight": gan_weight, "psnr": vqgan.psnr(recon, images),
                   "ppl": vqgan.codebook_perplexity(ids, cfg.codebook_size)}


def discriminator_step(disc, opt_d, images, recon, autocast):
    """One PatchGAN update with the hinge loss; `recon` is detached, so no gradient reaches the VQGAN."""
    disc.requires_grad_(True)
    with autocast:
        d_loss = vqgan.hinge_d_loss(disc(images).float(), disc(recon.detach()).float())
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return d_loss.detach()


def train_vqgan(args, rank, world, device):
    master = rank == 0
    torch.manual_seed(args.seed + rank)  # different crops and flips on every rank
    cfg = vqgan.PRESETS[args.preset]
    cfg = vqgan.VQGANConfig(**{**asdict(cfg), "image_size": args.image_size})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # Data
    paths = readable_images(find_images(args.data))
    dataset = ImageFolder(paths, args.image_size, train=True)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True) if world > 1 else None
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(dataset) >= args.batch_size * world, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    batches = infinite_batches(loader, sampler)
    # A fixed batch of held-out views (center crops of the first images) for the reconstruction grids.
    preview = torch.stack([ImageFolder(paths, args.image_size, train=False)[i] for i in range(min(8, len(paths)))])

    # Models and optimizers (Adam with beta1 = 0.5, as taming: GAN training is unstable with more momentum)
    model = vqgan.VQGAN(cfg).to(device)
    disc = vqgan.PatchDiscriminator(cfg).to(device)
    perceptual = vqgan.PerceptualLoss().to(device) if args.perceptual == "vgg" else None
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    raw_model = model
    if world > 1:
        model, disc = DDP(model, device_ids=[device.index] if device.type == "cuda" else None), DDP(disc)
    os.makedirs(args.out, exist_ok=True)
    if master:
        n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
        print(f"VQGAN {n_params(raw_model):.1f}M params, discriminator {n_params(disc):.2f}M | {len(paths)} images, "
              f"{args.image_size}px -> {args.image_size // cfg.downsample}x{args.image_size // cfg.downsample} tokens, "
              f"codebook {cfg.codebook_size} | device {device} x{world} "
              f"{'bf16 autocast' if device.type == 'cuda' else 'float32'} | global batch {args.batch_size * world}")

    def checkpoint(step):
        save_checkpoint({"kind": "vqgan", "config": asdict(cfg), "model": raw_model.state_dict(),
                         "discriminator": (disc.module if world > 1 else disc).state_dict(),
                         "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step, "args": vars(args)},
                        os.path.join(args.out, "vqgan.pt"))
        with torch.no_grad():
            recon = raw_model(preview.to(device))[0].float().clamp(-1, 1).cpu()
        # Top row: inputs; bottom row: reconstructions.
        save_image(torch.cat([preview, recon]) * 0.5 + 0.5, os.path.join(args.out, f"vqgan_{step:07d}.png"),
                   nrow=len(preview))

    # Training loop
    t0, last_log = time.time(), time.time()
    for step in range(1, args.steps + 1):
        images = next(batches).to(device, non_blocking=True)
        gan_on = step > args.disc_start
        recon, logs = generator_step(model, raw_model, disc, perceptual, opt_g, images, gan_on, autocast,
                                     check_dead_codes=step % 10 == 0)  # the check waits for the GPU: not every step
        logs["disc"] = discriminator_step(disc, opt_d, images, recon, autocast) if gan_on else \
            torch.zeros((), device=device)

        if step % args.log_every == 0 or step == args.steps:
            logs = mean_over_ranks(logs, device)
            if master:
                now = time.time()
                speed = args.log_every * args.batch_size * world / (now - last_log)
                eta = (now - t0) / step * (args.steps - step)
                print(f"step {step:>6}/{args.steps} | loss {logs['loss']:.4f} rec {logs['rec']:.4f} "
                      f"codebook {logs['codebook']:.4f} gan {logs['gan']:+.3f} (w {logs['gan_weight']:.3f}) "
                      f"disc {logs['disc']:.3f} | psnr {logs['psnr']:.2f} dB | codes used "
                      f"{raw_model.quantizer.usage(args.log_every):.1%} ppl {logs['ppl']:.1f} | "
                      f"{speed:.1f} img/s | eta {format_eta(eta)}", flush=True)
            last_log = time.time()
        if master and (step % args.save_every == 0 or step == args.steps):
            checkpoint(step)
    if master:
        print(f"done: {os.path.join(args.out, 'vqgan.pt')}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        train_vqgan(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
